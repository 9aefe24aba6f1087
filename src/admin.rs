//! The admin listener (`[gateway] admin`), separate from traffic listeners. Endpoints:
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 while the configuration is loaded and the listeners are bound and
//!   the gateway is not shutting down, 503 otherwise (readiness: an orchestrator or L4
//!   balancer stops sending new connections here as soon as shutdown begins).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};

use crate::proxy::Shared;

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(shared: web::Data<Shared>) -> HttpResponse {
    if shared.shutting_down.load(Ordering::Relaxed) {
        HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body("shutting down\n")
    } else {
        HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n")
    }
}

/// Binds the admin listener and serves it on one worker thread.
pub fn start(
    addr: SocketAddr,
    shared: web::Data<Shared>,
) -> std::io::Result<(ServerHandle, SocketAddr)> {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(shared.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
    })
    .workers(1)
    .disable_signals()
    .bind(addr)?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok((handle, bound))
}
