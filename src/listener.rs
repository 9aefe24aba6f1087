//! Traffic listeners: one actix-web server per `[[listener]]`, so each can be added,
//! paused or stopped on its own when the configuration changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::rc::Rc;

use actix_http::{HttpService, error::DispatchError};
use actix_server::ServerHandle;
use actix_service::{ServiceFactory, ServiceFactoryExt, fn_factory, fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, web};
use tokio::net::TcpStream;

use crate::config::ListenerConfig;
use crate::proxy::websocket::{self, UpgradeContext};
use crate::proxy::{self, ListenerInfo, Shared, UpstreamClients};
use crate::tls::{self, CertResolver};
use crate::tunnel::Io;

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
    /// A TLS listener's certificates, reloadable in place.
    pub tls: Option<Arc<CertResolver>>,
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

/// Starts serving a bound socket on `workers` worker threads of its own; a TLS listener
/// terminates TLS with the certificates `tls` resolves.
///
/// Built from actix-http directly rather than actix-web's `HttpServer` for one reason:
/// its upgrade hook hands a WebSocket request over with the raw connection, so the tunnel
/// relays bytes itself instead of going through a message channel per frame.
pub fn serve(
    bound: BoundSocket,
    workers: usize,
    shared: web::Data<Shared>,
    upstream_tls: Arc<rustls::ClientConfig>,
    tls: Option<Arc<CertResolver>>,
    client_header_timeout: Duration,
) -> Result<RunningListener, BindError> {
    let BoundSocket {
        config,
        socket,
        local_addr,
    } = bound;
    let info = ListenerInfo {
        name: Arc::from(config.name.as_str()),
        proto: if tls.is_some() { "https" } else { "http" },
        redirect_https: config.redirect_https,
        real_ip_from: Arc::from(config.real_ip_from.as_slice()),
    };
    let builder = actix_server::Server::build()
        .workers(workers)
        .disable_signals()
        .max_concurrent_connections(MAX_CONNECTIONS_PER_WORKER)
        // A listener removed by a reload stops accepting but its tunnels live on until they
        // close; the supervisor ends them itself at shutdown.
        .shutdown_timeout(RETIRED_LISTENER_GRACE_SECS);
    let name = config.name.clone();
    let acceptor = match (&config.tls, tls.clone()) {
        (Some(tls_config), Some(resolver)) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            tls::server_config(tls_config, resolver),
        ))),
        _ => None,
    };
    let front = Arc::new(Front {
        acceptor,
        proxy_protocol: config.proxy_protocol,
        trusted_proxies: config.trusted_proxies.clone(),
        shared: shared.clone(),
    });
    let server = builder
        .listen(name, socket, move || {
            let front = Arc::clone(&front);
            fn_service(move |io: TcpStream| {
                let front = Arc::clone(&front);
                async move { front.accept(io).await }
            })
            .and_then(http_service::<Box<dyn Io>>(
                client_header_timeout,
                &shared,
                &info,
                &upstream_tls,
            ))
        })
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
        tls,
    })
}

/// A TLS client has this long to finish its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A balancer has this long to send its PROXY protocol header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What happens to a connection before HTTP: the PROXY protocol header, then TLS.
struct Front {
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    proxy_protocol: bool,
    trusted_proxies: Vec<ipnet::IpNet>,
    shared: web::Data<Shared>,
}

impl Front {
    /// Nagle off (relayed small frames must not wait for a delayed ACK), the PROXY header
    /// read and checked, TLS terminated; returns the stream and the client's address.
    async fn accept(
        &self,
        io: TcpStream,
    ) -> Result<(Box<dyn Io>, Option<SocketAddr>), DispatchError> {
        let _ = io.set_nodelay(true);
        let mut peer = io.peer_addr().ok();
        let io: Box<dyn Io> = if self.proxy_protocol {
            let trusted =
                peer.is_some_and(|p| self.trusted_proxies.iter().any(|net| net.contains(&p.ip())));
            if !trusted {
                self.shared.metrics.proxy_protocol_refused.inc();
                tracing::debug!(peer = ?peer, "PROXY protocol from an untrusted address: refused");
                return Err(DispatchError::Io(std::io::Error::other(
                    "untrusted PROXY source",
                )));
            }
            let parsed = tokio::time::timeout(
                PROXY_HEADER_TIMEOUT,
                proxy_header::io::ProxiedStream::create_from_tokio(
                    io,
                    proxy_header::ParseConfig::default(),
                ),
            )
            .await;
            let stream = match parsed {
                Ok(Ok(stream)) => stream,
                _ => {
                    self.shared.metrics.proxy_protocol_refused.inc();
                    tracing::debug!(peer = ?peer, "missing or malformed PROXY protocol header: refused");
                    return Err(DispatchError::Io(std::io::Error::other("bad PROXY header")));
                }
            };
            if let Some(addr) = stream.proxy_header().proxied_address() {
                peer = Some(addr.source);
            }
            Box::new(stream)
        } else {
            Box::new(io)
        };
        let Some(acceptor) = &self.acceptor else {
            return Ok((io, peer));
        };
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(Ok(tls)) => Ok((Box::new(tls), peer)),
            Ok(Err(err)) => {
                self.shared.metrics.tls_failures.inc();
                Err(DispatchError::Io(err))
            }
            Err(_) => {
                self.shared.metrics.tls_failures.inc();
                Err(DispatchError::SlowRequestTimeout)
            }
        }
    }
}

/// The HTTP/1.1 service of one worker over connections of type `T`: WebSocket upgrades go
/// to the tunnel path, everything else to the plain HTTP proxy.
fn http_service<T: Io>(
    client_header_timeout: Duration,
    shared: &web::Data<Shared>,
    info: &ListenerInfo,
    upstream_tls: &Arc<rustls::ClientConfig>,
) -> impl ServiceFactory<
    (T, Option<std::net::SocketAddr>),
    Config = (),
    Response = (),
    Error = DispatchError,
    InitError = (),
> + use<T> {
    // Runs once per worker: the backend clients are per worker (awc is !Send).
    let clients = web::Data::new(UpstreamClients::new(Arc::clone(upstream_tls)));
    let upgrade = Rc::new(UpgradeContext {
        shared: shared.clone(),
        listener: info.clone(),
        clients: clients.clone(),
    });
    let app = App::new()
        .app_data(shared.clone())
        .app_data(web::Data::new(info.clone()))
        .app_data(clients)
        // The proxy streams bodies; actix's default payload limits do not apply.
        .default_service(web::to(proxy::handle));
    HttpService::build()
        // Against slowloris: the whole request head within this time, or 408.
        .client_request_timeout(client_header_timeout)
        // Once a response (or a tunnel) is done, end the TCP connection at once instead of
        // lingering for the client to do it: RFC 6455 §7.1.1 wants the server to close
        // first, and a waiting client would wait actix's 1 s.
        .client_disconnect_timeout(Duration::ZERO)
        .upgrade(fn_factory(move || {
            let upgrade = Rc::clone(&upgrade);
            async move {
                Ok::<_, ()>(fn_service(move |(req, framed)| {
                    websocket::serve_upgrade::<T>(req, framed, Rc::clone(&upgrade))
                }))
            }
        }))
        .h1(map_config(app, |_| AppConfig::default()))
}
