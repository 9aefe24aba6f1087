//! Why a request was not proxied, and the HTTP status each reason answers with.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("the request head is larger than {} bytes", super::MAX_HEAD_BYTES)]
    HeadTooLarge,
    #[error("bad WebSocket upgrade request: {0}")]
    BadUpgrade(&'static str),
    #[error("unsupported WebSocket version: this gateway speaks version 13")]
    UnsupportedVersion,
    #[error("upstream {upstream:?}: no server could be reached (last error: {detail})")]
    Unavailable { upstream: String, detail: String },
    #[error("upstream {upstream:?}: no server answered in time (last error: {detail})")]
    Timeout { upstream: String, detail: String },
    #[error("the backend refused the WebSocket upgrade with status {0}")]
    Refused(StatusCode),
    #[error("this address serves https only: {0}")]
    Redirect(String),
    #[error("too many open connections ({0}), try again shortly")]
    Busy(&'static str),
    #[error("the gateway cannot open a backend connection now ({0}), try again shortly")]
    Exhausted(String),
    #[error("too many open connections from your address, try again shortly")]
    TooManyFromAddress,
    #[error("origin {0:?} may not open a WebSocket here")]
    OriginNotAllowed(String),
    #[error("upstream {0:?}: every server is out of rotation after failures, try again shortly")]
    NoHealthyServer(String),
}

impl ProxyError {
    /// Refusals that pass: the answer carries `Retry-After: 1`.
    pub fn retry_after(&self) -> bool {
        matches!(
            self,
            ProxyError::Busy(_)
                | ProxyError::TooManyFromAddress
                | ProxyError::NoHealthyServer(_)
                | ProxyError::Exhausted(_)
        )
    }

    /// The `result` label of the handshake metric.
    pub fn result_label(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::BadUpgrade(_)
            | ProxyError::UnsupportedVersion
            | ProxyError::HeadTooLarge => "bad_request",
            ProxyError::Unavailable { .. } | ProxyError::NoHealthyServer(_) => {
                "upstream_unavailable"
            }
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Refused(_) => "upstream_refused",
            ProxyError::Redirect(_) => "redirected",
            ProxyError::Busy(_) | ProxyError::TooManyFromAddress | ProxyError::Exhausted(_) => {
                "limited"
            }
            ProxyError::OriginNotAllowed(_) => "forbidden_origin",
        }
    }
}

impl ResponseError for ProxyError {
    fn status_code(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadUpgrade(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            ProxyError::Unavailable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Refused(status) => *status,
            ProxyError::Redirect(_) => StatusCode::PERMANENT_REDIRECT,
            ProxyError::Busy(_) | ProxyError::NoHealthyServer(_) | ProxyError::Exhausted(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::TooManyFromAddress => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::OriginNotAllowed(_) => StatusCode::FORBIDDEN,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.content_type("text/plain; charset=utf-8");
        if let ProxyError::HeadTooLarge = self {
            // The rest of an oversized head may still be on its way: end the connection.
            response.force_close();
        }
        if let ProxyError::Redirect(location) = self {
            response.insert_header((header::LOCATION, location.as_str()));
        }
        if self.retry_after() {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from_static("1")));
        }
        if matches!(
            self,
            ProxyError::UnsupportedVersion | ProxyError::BadUpgrade(_)
        ) {
            // RFC 6455 §4.4: tell the client which version to retry with.
            response.insert_header((
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            ));
        }
        response.body(format!("wsgate: {self}\n"))
    }
}
