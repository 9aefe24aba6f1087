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

/// How long a retired listener's workers wait for its tunnels (a year: until they close).
const RETIRED_LISTENER_GRACE_SECS: u64 = 365 * 24 * 3600;

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

/// A listening socket not yet served: binding is split from serving so a reload can bind
/// every new listener (and fail as a whole) before anything else changes.
pub struct BoundSocket {
    config: ListenerConfig,
    socket: std::net::TcpListener,
    pub local_addr: SocketAddr,
}

/// Binds the listener's address.
pub fn bind(config: &ListenerConfig) -> Result<BoundSocket, BindError> {
    let bind_error = |source| BindError {
        name: config.name.clone(),
        bind: config.bind,
        source,
    };
    let socket = std::net::TcpListener::bind(config.bind).map_err(bind_error)?;
    let local_addr = socket.local_addr().map_err(bind_error)?;
    Ok(BoundSocket {
        config: config.clone(),
        socket,
        local_addr,
    })
}

/// Starts serving a bound socket on `workers` worker threads of its own.
pub fn serve(
    bound: BoundSocket,
    workers: usize,
    shared: web::Data<Shared>,
    upstream_tls: Arc<rustls::ClientConfig>,
) -> Result<RunningListener, BindError> {
    let BoundSocket {
        config,
        socket,
        local_addr,
    } = bound;
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
    // A listener removed by a reload stops accepting but its tunnels live on until they
    // close; the supervisor ends them itself at shutdown.
    .shutdown_timeout(RETIRED_LISTENER_GRACE_SECS)
    .listen(socket)
    .map_err(|source| BindError {
        name: config.name.clone(),
        bind: config.bind,
        source,
    })?
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(RunningListener {
        config,
        local_addr,
        handle,
    })
}
