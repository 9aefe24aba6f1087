//! The admin listener (`[gateway] admin`), separate from traffic listeners. Endpoints:
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 while the configuration is loaded and the listeners are bound and
//!   the gateway is not shutting down, 503 otherwise (readiness: an orchestrator or L4
//!   balancer stops sending new connections here as soon as shutdown begins);
//! - `GET /metrics`: Prometheus text format (names in [`crate::metrics`]);
//! - `GET /status`: JSON: configuration generation and hash, listeners, routes, upstreams
//!   with each server's health and live tunnels;
//! - `GET /`: a small status page (no external assets) that renders `/status` and refreshes
//!   itself.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};

use serde_json::json;

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

async fn metrics(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(shared.metrics.render(&shared))
}

async fn status(shared: web::Data<Shared>) -> HttpResponse {
    let snapshot = shared.snapshot.load();
    let config = &snapshot.config;
    let listeners: Vec<_> = config
        .listeners
        .iter()
        .map(|l| json!({ "name": l.name, "bind": l.bind.to_string(), "tls": l.tls.is_some() }))
        .collect();
    let routes: Vec<_> = snapshot
        .routes
        .iter()
        .map(|r| {
            json!({
                "route": &*r.label,
                "path": r.config.path,
                "upstream": r.config.upstream,
                "live_tunnels": shared.limits.per_route.count(&r.label),
            })
        })
        .collect();
    let upstreams: Vec<_> = snapshot
        .pools
        .iter()
        .map(|(name, pool)| {
            // The weight as the pool has it now: a server kept across a reload keeps the
            // configuration it was first built with.
            let servers: Vec<_> = pool
                .servers
                .iter()
                .zip(&pool.config.servers)
                .map(|(s, configured)| {
                    json!({
                        "addr": s.config.addr,
                        "weight": configured.weight,
                        "backup": configured.backup,
                        "max_connections": configured.max_connections,
                        "healthy": s.healthy(),
                        "in_rotation": s.available(),
                        "live_tunnels": s.live_tunnels(),
                    })
                })
                .collect();
            json!({ "name": name, "balance": format!("{:?}", pool.config.balance), "servers": servers })
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "generation": snapshot.generation,
        "config": { "path": config.source.path, "sha256": config.source.sha256 },
        "ready": !shared.shutting_down.load(Ordering::Relaxed),
        "live_tunnels": shared.registry.len(),
        // What caps the tunnels besides max_connections (null: no open-file limit).
        "open_file_limit": shared.limits.open_file_limit,
        "tunnel_room": (shared.limits.tunnel_room != usize::MAX).then_some(shared.limits.tunnel_room),
        "reloads_rejected": shared.reloads_rejected.load(Ordering::Relaxed),
        "listeners": listeners,
        "routes": routes,
        "upstreams": upstreams,
    }))
}

async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(STATUS_PAGE)
}

const STATUS_PAGE: &str = include_str!("status.html");

/// Binds the admin listener and serves it on one worker thread.
pub fn start(
    addr: SocketAddr,
    shared: web::Data<Shared>,
) -> std::io::Result<(ServerHandle, SocketAddr)> {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(shared.clone())
            .route("/", web::get().to(page))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
            .route("/status", web::get().to(status))
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
