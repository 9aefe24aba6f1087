//! The request path: match a route, then either upgrade to a WebSocket tunnel
//! ([`websocket`]) or forward a plain HTTP request ([`http`]), with the same forwarding
//! headers ([`headers`]) and backend clients ([`upstream_client`]) for both.

mod error;
pub mod headers;
mod http;
pub mod upstream_client;
mod websocket;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use arc_swap::ArcSwap;

pub use error::ProxyError;
pub use upstream_client::UpstreamClients;

use crate::snapshot::{Route, Snapshot};
use crate::tunnel::Registry;

/// State every worker shares: the published snapshot and the live tunnels.
#[derive(Debug)]
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Arc<Registry>,
    /// Reloads that failed (bad file, bind error); the running config stayed.
    pub reloads_rejected: AtomicU64,
}

impl Shared {
    pub fn new(snapshot: Snapshot) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry: Arc::new(Registry::default()),
            reloads_rejected: AtomicU64::new(0),
        }
    }

    /// The generation of the configuration in effect.
    pub fn generation(&self) -> u64 {
        self.snapshot.load().generation
    }
}

/// Which listener accepted the request.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub name: Arc<str>,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
}

/// A request matched to its route, with what both proxy paths need.
pub struct Matched {
    pub route: Arc<Route>,
    pub client_ip: IpAddr,
    /// Path and query as the backend should see them (after `rewrite`).
    pub backend_path: String,
}

/// The Host the client asked for, without port, from the Host header or the
/// absolute-form request target.
fn request_host(req: &HttpRequest) -> Option<&str> {
    let host = match req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        Some(host) => host,
        None => req.uri().host()?,
    };
    Some(match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    })
}

/// The one handler of every traffic listener.
pub async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
    listener: web::Data<ListenerInfo>,
    clients: web::Data<UpstreamClients>,
) -> Result<HttpResponse, ProxyError> {
    let snapshot = shared.snapshot.load();
    let path = req.uri().path();
    let host = request_host(&req);
    let Some(route) = snapshot.route(&listener.name, host, path) else {
        return Err(ProxyError::NoRoute {
            host: host.unwrap_or("").to_string(),
            path: path.to_string(),
        });
    };
    let rewritten = match &route.config.rewrite {
        Some(rewrite) => format!("{rewrite}{}", &path[route.config.path.len()..]),
        None => path.to_string(),
    };
    let backend_path = match req.uri().query() {
        Some(query) => format!("{rewritten}?{query}"),
        None => rewritten,
    };
    let matched = Matched {
        route: Arc::clone(route),
        // Only a Unix-socket peer has no address; it hashes like loopback.
        client_ip: req
            .peer_addr()
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| a.ip()),
        backend_path,
    };
    drop(snapshot);
    let wants_websocket = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        });
    if wants_websocket {
        websocket::proxy(req, payload, matched, &shared, &listener, &clients).await
    } else {
        http::proxy(req, payload, matched, &listener, &clients).await
    }
}

/// `host:port` for a URL, with brackets around an IPv6 literal.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
