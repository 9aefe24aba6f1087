//! Traffic listeners: one actix-web server per `[[listener]]`, so each can be added,
//! paused or stopped on its own when the configuration changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer, web};

use crate::config::ListenerConfig;
use crate::proxy::{self, ListenerInfo, Shared, UpstreamClients};

/// Connections one worker accepts at most. actix's default (25,000) would cap a 2-worker
/// gateway at 50,000 sockets; tunnels are capped by the open-file limit instead.
const MAX_CONNECTIONS_PER_WORKER: usize = 1 << 20;

/// A bound, running listener.
pub struct RunningListener {
    pub config: ListenerConfig,
    /// The address actually bound (port 0 in the file becomes the OS's choice).
    pub local_addr: SocketAddr,
    pub handle: ServerHandle,
}

#[derive(Debug, thiserror::Error)]
#[error("listener {name:?} cannot bind {bind}: {source}")]
pub struct BindError {
    pub name: String,
    pub bind: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the listener and starts serving on `workers` worker threads.
pub fn start(
    config: &ListenerConfig,
    workers: usize,
    shared: web::Data<Shared>,
    upstream_tls: Arc<rustls::ClientConfig>,
) -> Result<RunningListener, BindError> {
    let bind_error = |source| BindError {
        name: config.name.clone(),
        bind: config.bind,
        source,
    };
    // Bound here rather than by actix so that "address in use" is an error we return.
    let socket = std::net::TcpListener::bind(config.bind).map_err(bind_error)?;
    let local_addr = socket.local_addr().map_err(bind_error)?;
    let info = ListenerInfo {
        name: Arc::from(config.name.as_str()),
        proto: "http",
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(shared.clone())
            .app_data(web::Data::new(info.clone()))
            .app_data(web::Data::new(UpstreamClients::new(Arc::clone(
                &upstream_tls,
            ))))
            // The proxy streams bodies; actix's default payload limits do not apply.
            .default_service(web::to(proxy::handle))
    })
    .workers(workers)
    .disable_signals()
    .tcp_nodelay(true)
    .max_connections(MAX_CONNECTIONS_PER_WORKER)
    // Once a response (or a tunnel's close handshake) is done, end the TCP connection at
    // once instead of lingering for the client to do it: RFC 6455 §7.1.1 wants the server
    // to close first, and a client waiting for that would otherwise wait actix's 1 s.
    .client_disconnect_timeout(Duration::ZERO)
    .listen(socket)
    .map_err(bind_error)?
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(RunningListener {
        config: config.clone(),
        local_addr,
        handle,
    })
}
