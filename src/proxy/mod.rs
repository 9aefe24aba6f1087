//! The request path: a connection's first request head ([`first_request`]), then a route,
//! then either the connection taken over for a WebSocket tunnel ([`websocket`]) or a plain
//! HTTP request forwarded ([`http`], with awc clients from [`upstream_client`]); both read
//! the request through one interface ([`head`]) and send the same forwarding headers
//! ([`headers`]).

mod error;
pub mod first_request;
pub mod head;
pub mod headers;
mod http;
pub mod upstream_client;
pub mod websocket;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

use actix_web::{HttpRequest, HttpResponse, web};
use arc_swap::ArcSwap;

pub use error::ProxyError;
pub use head::Head;
pub use upstream_client::UpstreamClients;

use crate::config::HashKey;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::snapshot::{Route, Snapshot};
use crate::tunnel::Registry;

/// State every worker shares: the published snapshot and the live tunnels.
#[derive(Debug)]
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Arc<Registry>,
    /// Reloads that failed (bad file, bind error); the running config stayed.
    pub reloads_rejected: AtomicU64,
    /// Tunnel counts the connection limits are checked against.
    pub limits: Limits,
    /// Bytes waiting in tunnels toward legs that read slower than their peer sends.
    pub buffered: Arc<AtomicUsize>,
    /// Graceful shutdown has begun (readiness turns false).
    pub shutting_down: AtomicBool,
    pub metrics: Metrics,
}

impl Shared {
    pub fn new(snapshot: Snapshot) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry: Arc::new(Registry::default()),
            reloads_rejected: AtomicU64::new(0),
            limits: Limits::new(crate::limits::open_file_limit()),
            buffered: Arc::new(AtomicUsize::new(0)),
            shutting_down: AtomicBool::new(false),
            metrics: Metrics::default(),
        }
    }

    /// The generation of the configuration in effect.
    pub fn generation(&self) -> u64 {
        self.snapshot.load().generation
    }
}

/// The largest request head forwarded. actix-http stops reading a head at this size too,
/// but a head that arrives in one read can get past it, so the proxy checks again.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Which listener accepted the request.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub name: Arc<str>,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    /// Answer everything with a 308 to `https://` on this port (`redirect_https`).
    pub redirect_https: Option<u16>,
    /// Peers whose X-Forwarded-For names the client (`real_ip_from`).
    pub real_ip_from: Arc<[ipnet::IpNet]>,
}

/// The 308 toward `https://host[:port]/path?query` for a request on a plain listener.
pub fn redirect(head: &impl Head, port: u16) -> ProxyError {
    let host = request_host(head).unwrap_or("localhost");
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let path = head.path();
    let query = head.query().map_or(String::new(), |q| format!("?{q}"));
    ProxyError::Redirect(format!("https://{host}{port}{path}{query}"))
}

/// A request matched to its route, with what both proxy paths need.
pub struct Matched {
    pub route: Arc<Route>,
    /// The client: the TCP peer, the PROXY header's source, or (from a `real_ip_from` peer)
    /// the rightmost untrusted X-Forwarded-For address. Hashing, limits and logs use it.
    pub client_ip: IpAddr,
    /// The hop the request came from (what X-Forwarded-For gets appended).
    pub peer_ip: IpAddr,
    /// Path and query as the backend should see them (after `rewrite`).
    pub backend_path: String,
}

impl Matched {
    /// The servers to try for this request, best first (a consistent-hash upstream hashes
    /// the request's value of its `hash_key`, the client's address without one), or why
    /// there is none: every server out of rotation, or every one in it full.
    pub fn candidates(&self, head: &impl Head) -> Result<crate::pool::Candidates, ProxyError> {
        let pool = &self.route.pool;
        let servers = pool.candidates(self.client_ip, hash_value(&pool.config.hash_key, head));
        if !servers.is_empty() {
            Ok(servers)
        } else if pool.servers.iter().any(|s| s.available()) {
            Err(ProxyError::Busy("server max_connections"))
        } else {
            Err(ProxyError::NoHealthyServer(
                self.route.config.upstream.clone(),
            ))
        }
    }
}

/// The request's value of a hash key, as sent (nginx's `$http_NAME`, `$cookie_NAME`,
/// `$arg_NAME`: not decoded); `None` for the client address or a value the request lacks
/// or sends empty (nginx does not hash an empty key either: every such client would land
/// on one server).
fn hash_value<'a>(key: &'a HashKey, head: &'a impl Head) -> Option<&'a [u8]> {
    let pairs = |text: &'a [u8], separator: u8| {
        text.split(move |&b| b == separator).map(|pair| {
            let pair = pair.trim_ascii();
            match pair.iter().position(|&b| b == b'=') {
                Some(eq) => (&pair[..eq], &pair[eq + 1..]),
                None => (pair, &pair[pair.len()..]),
            }
        })
    };
    let value = match key {
        HashKey::RemoteAddr => None,
        HashKey::Header(name) => head.value(name),
        HashKey::Cookie(name) => head
            .values("cookie")
            .flat_map(|v| pairs(v, b';'))
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, value)| value),
        HashKey::Query(name) => pairs(head.query()?.as_bytes(), b'&')
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, value)| value),
    };
    value.filter(|value| !value.is_empty())
}

/// The Host the client asked for, without port, from the Host header or the
/// absolute-form request target.
fn request_host(head: &impl Head) -> Option<&str> {
    let host = match head.value("host").and_then(ascii_text) {
        Some(host) => host,
        None => head.target_host()?,
    };
    Some(match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    })
}

/// Matches a request to its route in the current snapshot.
pub fn match_route(
    shared: &Shared,
    listener: &ListenerInfo,
    head: &impl Head,
) -> Result<Matched, ProxyError> {
    if head.wire_len() > MAX_HEAD_BYTES {
        return Err(ProxyError::HeadTooLarge);
    }
    let snapshot = shared.snapshot.load();
    let path = head.path();
    let host = request_host(head);
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
    let backend_path = match head.query() {
        Some(query) => format!("{rewritten}?{query}"),
        None => rewritten,
    };
    // Only a Unix-socket peer has no address; it hashes like loopback.
    let peer_ip = head
        .peer_addr()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| a.ip());
    Ok(Matched {
        route: Arc::clone(route),
        client_ip: real_client(peer_ip, head, &listener.real_ip_from),
        peer_ip,
        backend_path,
    })
}

/// nginx's realip module with `real_ip_recursive on`: from a trusted peer, walk
/// X-Forwarded-For from the right and take the first address that is not trusted.
fn real_client(peer: IpAddr, head: &impl Head, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&ip.to_canonical()));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers::list_elements(head.values("x-forwarded-for"))
        .filter_map(ascii_text)
        .filter_map(|hop| hop.parse().ok())
        .collect();
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    client
}

/// The handler of every plain HTTP request (WebSocket upgrades are taken over before they
/// reach it, see [`websocket::serve_upgrade`]).
pub async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
    listener: web::Data<ListenerInfo>,
    clients: web::Data<UpstreamClients>,
) -> Result<HttpResponse, ProxyError> {
    if let Some(port) = listener.redirect_https {
        return Err(redirect(req.head(), port));
    }
    let started = std::time::Instant::now();
    let matched = match_route(&shared, &listener, req.head())?;
    if !matched.route.config.access_log {
        return http::proxy(req, payload, matched, &listener, &clients).await;
    }
    let (route, client) = (matched.route.label.clone(), matched.client_ip);
    let (method, path) = (req.method().clone(), req.uri().to_string());
    let result = http::proxy(req, payload, matched, &listener, &clients).await;
    let status = match &result {
        Ok(response) => response.status(),
        Err(err) => actix_web::ResponseError::status_code(err),
    };
    // At the response head: a streamed body goes on afterwards.
    tracing::info!(target: "wsgate::access", client = %client, route = %route, method = %method,
        path = %path, status = status.as_u16(), duration_ms = started.elapsed().as_millis() as u64, "http");
    result
}

/// A header value as text, if it is ASCII (as actix-http's `to_str` takes it).
fn ascii_text(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value)
        .ok()
        .filter(|text| text.is_ascii())
}

/// Errors of connecting to a backend that say the gateway ran out of something (file
/// descriptors, memory, local ports), not that the server is unreachable: the client is
/// told to retry and the server is not blamed (nginx, likewise, does not hold a failed
/// `socket()` against the peer).
fn is_local_exhaustion(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// `host:port` for a URL, with brackets around an IPv6 literal.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::RequestHead;
    use actix_web::http::header;

    #[test]
    fn hash_values_are_read_as_sent_and_missing_ones_are_none() {
        let mut head = RequestHead::default();
        head.uri = "/chat?flag&room=a%20b&sid=".parse().unwrap();
        head.headers.append(
            header::COOKIE,
            header::HeaderValue::from_static("theme=dark; session=s-1; blank="),
        );
        head.headers
            .append(header::COOKIE, header::HeaderValue::from_static("other=2"));
        head.headers.append(
            header::HeaderName::from_static("x-user-id"),
            header::HeaderValue::from_static("u42"),
        );
        let value =
            |key: HashKey| hash_value(&key, &head).map(|v| String::from_utf8(v.to_vec()).unwrap());
        assert_eq!(value(HashKey::RemoteAddr), None);
        assert_eq!(
            value(HashKey::Header("x-user-id".into())).as_deref(),
            Some("u42")
        );
        assert_eq!(value(HashKey::Header("x-other".into())), None);
        assert_eq!(
            value(HashKey::Cookie("session".into())).as_deref(),
            Some("s-1")
        );
        assert_eq!(value(HashKey::Cookie("other".into())).as_deref(), Some("2"));
        assert_eq!(value(HashKey::Cookie("sess".into())), None);
        assert_eq!(value(HashKey::Cookie("blank".into())), None);
        assert_eq!(
            value(HashKey::Query("room".into())).as_deref(),
            Some("a%20b")
        );
        // Empty values hash like missing ones (on the client's address).
        assert_eq!(value(HashKey::Query("flag".into())), None);
        assert_eq!(value(HashKey::Query("sid".into())), None);
        assert_eq!(value(HashKey::Query("ro".into())), None);
        let mut bare = RequestHead::default();
        bare.uri = "/chat".parse().unwrap();
        assert_eq!(hash_value(&HashKey::Query("room".into()), &bare), None);
    }
}
