//! The plain HTTP path: forward the request to the route's servers with awc, streaming the
//! body both ways so a large upload or download never sits in the gateway's memory.

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderMap};
use actix_web::{HttpRequest, HttpResponse, web};
use awc::error::{ConnectError, SendRequestError};

use super::headers::{self, Forwarded};
use super::{Head, ListenerInfo, Matched, ProxyError, UpstreamClients, authority};

/// How the client's request body is framed.
enum Body {
    None,
    Sized(u64),
    Chunked,
}

impl Body {
    fn of(headers: &HeaderMap) -> Body {
        if headers.contains_key(header::TRANSFER_ENCODING) {
            return Body::Chunked;
        }
        match headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(0) | None => Body::None,
            Some(len) => Body::Sized(len),
        }
    }
}

pub(super) async fn proxy(
    req: HttpRequest,
    payload: web::Payload,
    matched: Matched,
    listener: &ListenerInfo,
    clients: &UpstreamClients,
) -> Result<HttpResponse, ProxyError> {
    let route = &matched.route;
    let settings = route.config.settings;
    let to_backend = headers::to_backend(
        req.head(),
        &Forwarded {
            client_ip: matched.client_ip,
            peer_ip: matched.peer_ip,
            proto: listener.proto,
            host: req.head().value("host"),
            host_override: route.config.host_header.as_deref(),
        },
    );
    let client = clients.get(settings.connect_timeout, route.pool.tls.as_ref());
    let body = Body::of(req.headers());
    let mut payload = Some(payload);
    let mut last_error = String::from("no servers");
    let mut timed_out = false;
    for server in matched.candidates(req.head())? {
        let url = format!(
            "{}://{}{}",
            if server.config.tls { "https" } else { "http" },
            authority(&server.config.host, server.config.port),
            matched.backend_path
        );
        let mut request = client
            .request(req.method().clone(), url)
            .timeout(settings.response_timeout);
        *request.headers_mut() = to_backend.clone();
        let sent = match body {
            Body::None => request.send().await,
            // The body can be sent once: a request with a body gets one server.
            _ if payload.is_none() => break,
            Body::Sized(len) => match payload.take() {
                Some(p) => request.send_body(SizedStream::new(len, p)).await,
                None => break,
            },
            Body::Chunked => match payload.take() {
                Some(p) => request.send_stream(p).await,
                None => break,
            },
        };
        match sent {
            Ok(response) => {
                server.record_success();
                return Ok(respond(response));
            }
            Err(SendRequestError::Connect(ConnectError::Io(err)))
                if super::is_local_exhaustion(&err) =>
            {
                tracing::warn!(route = %route.label, server = %server.config, error = %err,
                    "cannot open a backend connection: the gateway is out of resources");
                return Err(ProxyError::Exhausted(format!("connect: {err}")));
            }
            Err(err) => {
                timed_out = matches!(
                    err,
                    SendRequestError::Timeout | SendRequestError::Connect(ConnectError::Timeout)
                );
                // The passive health rule the WebSocket dial applies: no connection, no
                // answer in time or a broken one counts against the server (an answer, even
                // a 5xx, does not; nor does a client whose upload broke off).
                if !matches!(err, SendRequestError::Body(_)) {
                    let upstream = &route.pool.config;
                    server.record_failure(upstream.max_fails, upstream.fail_timeout);
                }
                tracing::warn!(route = %route.label, server = %server.config, error = %err,
                    "backend request failed");
                last_error = err.to_string();
            }
        }
    }
    let upstream = route.config.upstream.clone();
    Err(if timed_out {
        ProxyError::Timeout {
            upstream,
            detail: last_error,
        }
    } else {
        ProxyError::Unavailable {
            upstream,
            detail: last_error,
        }
    })
}

/// The client's response: the backend's status and end-to-end headers, its body streamed.
fn respond(backend: awc::ClientResponse) -> HttpResponse {
    let mut response = HttpResponse::build(backend.status());
    let length = backend
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut extra = HeaderMap::new();
    headers::to_client(backend.headers(), &mut extra);
    for (name, value) in extra {
        response.append_header((name, value));
    }
    match length {
        Some(len) => response.body(SizedStream::new(len, backend)),
        None => response.streaming(backend),
    }
}
