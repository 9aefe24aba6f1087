//! The WebSocket path: check the client's upgrade, dial the route's servers in balancer
//! order until one accepts, answer the client's upgrade with the backend's choices, and
//! hand both legs to a new [`Tunnel`].

use std::sync::Arc;

use actix_codec::Framed;
use actix_http::ws::Codec;
use actix_web::http::StatusCode;
use actix_web::http::header::HeaderMap;
use actix_web::{HttpRequest, HttpResponse, web};
use awc::error::{ConnectError, SendRequestError, WsClientError};

use super::headers::{self, Forwarded};
use super::{ListenerInfo, Matched, ProxyError, Shared, UpstreamClients, authority};
use crate::config::TunnelSettings;
use crate::pool::Server;
use crate::tunnel::{BackendLeg, Tunnel, TunnelParams};

type BackendFramed = Framed<awc::BoxedSocket, Codec>;

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

pub(super) async fn proxy(
    req: HttpRequest,
    payload: web::Payload,
    matched: Matched,
    shared: &Shared,
    listener: &ListenerInfo,
    clients: &UpstreamClients,
) -> Result<HttpResponse, ProxyError> {
    // Refuse a malformed upgrade before any backend is bothered with it.
    actix_http::ws::verify_handshake(req.head())?;
    let route = &matched.route;
    let settings = route.config.settings;
    let to_backend = headers::to_backend(
        req.headers(),
        &Forwarded {
            client_ip: matched.client_ip,
            proto: listener.proto,
            host: req.headers().get(actix_web::http::header::HOST),
            host_override: route.config.host_header.as_deref(),
        },
    );
    let client = clients.get(settings.connect_timeout);
    let mut last_error = None;
    for server in route.pool.candidates(matched.client_ip) {
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
                return upgrade(
                    req,
                    payload,
                    backend_response,
                    framed,
                    &server,
                    &matched,
                    shared,
                );
            }
            Err(DialError::Refused(status)) => {
                tracing::info!(server = %server.config, %status, "backend refused the upgrade");
                return Err(ProxyError::Refused(status));
            }
            Err(err) => {
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

async fn dial(
    client: &awc::Client,
    server: &Server,
    path: &str,
    headers: &HeaderMap,
    settings: &TunnelSettings,
) -> Result<(awc::ClientResponse, BackendFramed), DialError> {
    let url = format!(
        "ws://{}{path}",
        authority(&server.config.host, server.config.port)
    );
    let mut request = client.ws(url).max_frame_size(settings.max_frame_size);
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

fn upgrade(
    req: HttpRequest,
    payload: web::Payload,
    backend_response: awc::ClientResponse,
    framed: BackendFramed,
    server: &Arc<Server>,
    matched: &Matched,
    shared: &Shared,
) -> Result<HttpResponse, ProxyError> {
    let settings = matched.route.config.settings;
    let (mut response, session, client_stream) = actix_ws::handle(&req, payload)
        .map_err(|_| ProxyError::BadUpgrade("the upgrade request was rejected"))?;
    // The backend's subprotocol choice, cookies and other end-to-end headers reach the
    // client; the per-leg WebSocket headers stay with actix-ws's own.
    headers::to_client(backend_response.headers(), response.headers_mut());
    Tunnel::start(
        session,
        client_stream.max_frame_size(settings.max_frame_size),
        BackendLeg {
            framed,
            lease: server.lease(),
        },
        TunnelParams {
            settings,
            registry: Arc::clone(&shared.registry),
            upstream: Arc::from(matched.route.config.upstream.as_str()),
            client_addr: req.peer_addr().map_or_else(String::new, |a| a.to_string()),
            route: matched.route.label.clone(),
        },
    );
    Ok(response)
}
