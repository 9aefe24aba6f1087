//! The WebSocket path. actix-http hands every `Upgrade: websocket` request over with its
//! raw connection; this module checks the upgrade, dials the route's servers in balancer
//! order until one accepts, answers the client with the backend's choices, and gives both
//! raw connections to a new [`Tunnel`].

use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_codec::Framed;
use actix_http::h1;
use actix_http::header::{self, HeaderMap};
use actix_http::ws::Codec;
use actix_http::{HttpMessage, Request, StatusCode};
use actix_web::ResponseError;
use actix_web::web;
use awc::error::{ConnectError, SendRequestError, WsClientError};
use tokio::io::AsyncWriteExt as _;

use super::headers::{self, Forwarded};
use super::{ListenerInfo, ProxyError, Shared, UpstreamClients, authority, match_route};
use crate::config::TunnelSettings;
use crate::limits::Permits;
use crate::metrics;
use crate::pool::Server;
use crate::tunnel::{Io, LegIo, Tunnel, TunnelParams};

/// A backend answer or a refusal has to reach the client within this time, or the client
/// is not reading and is dropped.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the upgrade service of one worker needs.
pub struct UpgradeContext {
    pub shared: web::Data<Shared>,
    pub listener: ListenerInfo,
    pub clients: web::Data<UpstreamClients>,
}

/// Why one server could not take the tunnel.
#[derive(Debug)]
enum DialError {
    /// No TCP connection or no upgrade answer in time: try the next server.
    Timeout(String),
    /// Connection refused, reset, or a broken answer: try the next server.
    Failed(String),
    /// The backend answered the upgrade with a non-101 status: the client gets it as-is.
    Refused(StatusCode),
}

/// The upgrade service: answers the client on its raw connection, then starts the tunnel.
pub async fn serve_upgrade<T: Io>(
    req: Request,
    framed: Framed<T, h1::Codec>,
    ctx: Rc<UpgradeContext>,
) -> Result<(), actix_http::Error> {
    // Only the socket and the bytes already read from it are kept; the HTTP codec, its
    // buffers and the request are dropped before the tunnel's long life begins.
    let actix_codec::FramedParts {
        io: mut client,
        read_buf,
        ..
    } = framed.into_parts();
    // Boxed: the dial's large future would otherwise stay part of this one (and of every
    // tunnel's memory) while it waits for the tunnel to end.
    let started = std::time::Instant::now();
    let outcome = match ctx.listener.redirect_https {
        Some(port) => Err(super::redirect(req.head(), port)),
        None => Box::pin(accept(&req, &ctx)).await,
    };
    drop(req);
    match outcome {
        Ok(accepted) => {
            let written =
                tokio::time::timeout(CLIENT_WRITE_TIMEOUT, client.write_all(&accepted.response))
                    .await;
            if !matches!(written, Ok(Ok(()))) {
                metrics::handshake(&ctx.shared.metrics, "client_gone");
                return Ok(());
            }
            metrics::handshake(&ctx.shared.metrics, "ok");
            ctx.shared
                .metrics
                .handshake_seconds
                .observe(started.elapsed().as_secs_f64());
            Tunnel::start(
                LegIo {
                    io: Box::new(client),
                    early: read_buf.freeze(),
                },
                accepted.backend,
                accepted.params,
            );
        }
        Err(err) => {
            metrics::handshake(&ctx.shared.metrics, err.result_label());
            let response = refusal(&err);
            let _ = tokio::time::timeout(CLIENT_WRITE_TIMEOUT, async {
                client.write_all(&response).await?;
                client.shutdown().await
            })
            .await;
        }
    }
    Ok(())
}

struct Accepted {
    /// The 101 response for the client.
    response: Vec<u8>,
    backend: LegIo,
    params: TunnelParams,
}

async fn accept(req: &Request, ctx: &UpgradeContext) -> Result<Accepted, ProxyError> {
    let matched = match_route(&ctx.shared, &ctx.listener, req.head())?;
    // Refuse a malformed upgrade before any backend is bothered with it.
    actix_http::ws::verify_handshake(req.head())?;
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| actix_http::ws::hash_key(k.as_bytes()))
        .ok_or(ProxyError::BadUpgrade(
            "the Sec-WebSocket-Key header is missing",
        ))?;
    let route = &matched.route;
    let settings = route.config.settings;
    if !route.config.allowed_origins.is_empty() {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .unwrap_or("");
        if !route
            .config
            .allowed_origins
            .iter()
            .any(|allowed| allowed.allows(origin))
        {
            return Err(ProxyError::OriginNotAllowed(origin.to_string()));
        }
    }
    let permits = permits(&ctx.shared, &matched)?;
    let to_backend = headers::to_backend(
        req.headers(),
        &Forwarded {
            client_ip: matched.client_ip,
            peer_ip: matched.peer_ip,
            proto: ctx.listener.proto,
            host: req.headers().get(header::HOST),
            host_override: route.config.host_header.as_deref(),
        },
    );
    let client = ctx
        .clients
        .get(settings.connect_timeout, route.pool.tls.as_ref());
    let mut last_error = None;
    let candidates = route.pool.candidates(matched.client_ip);
    if candidates.is_empty() {
        return Err(ProxyError::NoHealthyServer(route.config.upstream.clone()));
    }
    let upstream_config = &route.pool.config;
    for server in candidates {
        match dial(
            &client,
            &server,
            &matched.backend_path,
            &to_backend,
            &settings,
        )
        .await
        {
            Ok((backend_response, framed)) => {
                server.record_success();
                let mut response = String::from(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
                );
                let _ = write!(
                    response,
                    "Sec-WebSocket-Accept: {}\r\n",
                    String::from_utf8_lossy(&key)
                );
                // The backend's subprotocol choice, cookies and other end-to-end headers
                // reach the client; the per-leg WebSocket headers do not.
                let mut forwarded = HeaderMap::new();
                headers::to_client(backend_response.headers(), &mut forwarded);
                let mut response = response.into_bytes();
                for (name, value) in forwarded.iter() {
                    response.extend_from_slice(name.as_str().as_bytes());
                    response.extend_from_slice(b": ");
                    response.extend_from_slice(value.as_bytes());
                    response.extend_from_slice(b"\r\n");
                }
                response.extend_from_slice(b"\r\n");
                let actix_codec::FramedParts { io, read_buf, .. } = framed.into_parts();
                return Ok(Accepted {
                    response,
                    backend: LegIo {
                        io: Box::new(io),
                        early: read_buf.freeze(),
                    },
                    params: TunnelParams {
                        settings,
                        permits,
                        buffered: Arc::clone(&ctx.shared.buffered),
                        counters: ctx.shared.metrics.relay_counters(),
                        shared: ctx.shared.clone(),
                        access_log: route.config.access_log,
                        registry: Arc::clone(&ctx.shared.registry),
                        lease: server.lease(),
                        upstream: Arc::from(route.config.upstream.as_str()),
                        client_addr: req.peer_addr().map_or_else(String::new, |a| a.to_string()),
                        route: route.label.clone(),
                    },
                });
            }
            Err(DialError::Refused(status)) => {
                tracing::info!(server = %server.config, %status, "backend refused the upgrade");
                return Err(ProxyError::Refused(status));
            }
            Err(err) => {
                server.record_failure(upstream_config.max_fails, upstream_config.fail_timeout);
                tracing::warn!(route = %route.label, server = %server.config, error = ?err,
                    "backend unreachable, trying the next server");
                last_error = Some(err);
            }
        }
    }
    let upstream = route.config.upstream.clone();
    Err(match last_error {
        Some(DialError::Timeout(detail)) => ProxyError::Timeout { upstream, detail },
        Some(DialError::Failed(detail)) => ProxyError::Unavailable { upstream, detail },
        _ => ProxyError::Unavailable {
            upstream,
            detail: "no servers".to_string(),
        },
    })
}

/// Places for one more tunnel under every limit, or the refusal that applies.
fn permits(shared: &Shared, matched: &super::Matched) -> Result<Permits, ProxyError> {
    let limits = &shared.limits;
    let gateway = &shared.snapshot.load().config.gateway;
    let Some(ip) = limits.per_ip.acquire(
        matched.client_ip.to_canonical(),
        gateway.max_connections_per_ip,
    ) else {
        return Err(ProxyError::TooManyFromAddress);
    };
    let Some(total) = limits.total.acquire((), gateway.max_connections) else {
        return Err(ProxyError::Busy("gateway max_connections"));
    };
    let Some(route) = limits.per_route.acquire(
        matched.route.label.clone(),
        matched.route.config.max_connections,
    ) else {
        return Err(ProxyError::Busy("route max_connections"));
    };
    Ok(Permits {
        _total: total,
        _route: route,
        _ip: ip,
    })
}

type BackendFramed = Framed<awc::BoxedSocket, Codec>;

async fn dial(
    client: &awc::Client,
    server: &Server,
    path: &str,
    headers: &HeaderMap,
    settings: &TunnelSettings,
) -> Result<(awc::ClientResponse, BackendFramed), DialError> {
    let scheme = if server.config.tls { "wss" } else { "ws" };
    let url = format!(
        "{scheme}://{}{path}",
        authority(&server.config.host, server.config.port)
    );
    let mut request = client.ws(url);
    for (name, value) in headers.iter() {
        request = request.header(name.clone(), value.clone());
    }
    match tokio::time::timeout(settings.handshake_timeout, request.connect()).await {
        Err(_) => Err(DialError::Timeout(format!(
            "no upgrade answer within handshake_timeout ({:?})",
            settings.handshake_timeout
        ))),
        Ok(Ok(connected)) => Ok(connected),
        Ok(Err(WsClientError::InvalidResponseStatus(status))) => Err(DialError::Refused(status)),
        Ok(Err(WsClientError::SendRequest(SendRequestError::Connect(ConnectError::Timeout)))) => {
            Err(DialError::Timeout(format!(
                "no TCP connection within connect_timeout ({:?})",
                settings.connect_timeout
            )))
        }
        Ok(Err(err)) => Err(DialError::Failed(err.to_string())),
    }
}

/// The whole HTTP response that refuses an upgrade, connection closing after it.
fn refusal(err: &ProxyError) -> Vec<u8> {
    let status = err.status_code();
    let body = format!("wsgate: {err}\n");
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    match err {
        ProxyError::Redirect(location) => head.push_str(&format!("Location: {location}\r\n")),
        ProxyError::Busy(_) | ProxyError::TooManyFromAddress | ProxyError::NoHealthyServer(_) => {
            head.push_str("Retry-After: 1\r\n")
        }
        _ => {}
    }
    if matches!(
        err,
        ProxyError::UnsupportedVersion | ProxyError::BadUpgrade(_)
    ) {
        // RFC 6455 §4.4: tell the client which version to retry with.
        head.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    head.push_str("\r\n");
    let mut response = head.into_bytes();
    response.extend_from_slice(body.as_bytes());
    response
}
