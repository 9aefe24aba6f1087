//! Traffic listeners and the worker threads that serve them. Every worker accepts on every
//! listener's socket itself and serves the connections it accepted, so a connection is
//! handled by the thread that woke for it: no hand-off from an accept thread (measured: that
//! hand-off was a wake-up and a context switch per connection, see BENCHMARKS.md).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::{HttpService, error::DispatchError};
use actix_service::{Service, ServiceFactory, fn_factory, fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, web};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::ListenerConfig;
use crate::proxy::first_request::{self, FirstRequest, Replay};
use crate::proxy::websocket::{self, UpgradeContext};
use crate::proxy::{self, ListenerInfo, Shared, UpstreamClients};
use crate::tls::{self, CertResolver};
use crate::tunnel::{Io, TunnelTask};

/// Connections the kernel queues for a listener before the workers accept them (capped by
/// `net.core.somaxconn`): a burst of clients reconnecting at once must not be refused.
const LISTEN_BACKLOG: i32 = 4096;

/// After an accept error other than a connection that died in the queue (typically out of
/// file descriptors), wait this long before trying again instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The worker threads (actix arbiters) that accept and serve connections; tunnels live on
/// the worker that accepted them. Stopped and joined when dropped.
pub struct Workers {
    arbiters: Vec<actix_rt::Arbiter>,
}

impl Workers {
    /// Starts `n` workers. Call inside an actix system.
    pub fn start(n: usize) -> Workers {
        Workers {
            arbiters: (0..n.max(1)).map(|_| actix_rt::Arbiter::new()).collect(),
        }
    }

    /// How many workers run.
    pub fn count(&self) -> usize {
        self.arbiters.len()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        for arbiter in self.arbiters.drain(..) {
            let _ = arbiter.join();
        }
    }
}

/// Whether a listener's workers accept connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepting {
    Yes,
    /// New connections wait in the kernel's queue (shutting down: balancers stop sending).
    Paused,
    /// The socket is closed; connections already accepted carry on.
    Closed,
}

/// A bound, running listener.
pub struct RunningListener {
    pub config: ListenerConfig,
    /// The address actually bound (port 0 in the file becomes the OS's choice).
    pub local_addr: SocketAddr,
    /// A TLS listener's certificates, reloadable in place.
    pub tls: Option<Arc<CertResolver>>,
    accepting: watch::Sender<Accepting>,
    /// The listening socket (each worker has its own handle on it): kept so that new
    /// settings can be served on it without a moment with no socket listening.
    socket: std::net::TcpListener,
}

impl RunningListener {
    /// Stops accepting; the socket stays open so clients queue instead of being refused.
    pub fn pause(&self) {
        self.accepting.send_replace(Accepting::Paused);
    }

    /// Closes the socket (once this listener is dropped too); tunnels and requests
    /// already accepted carry on.
    pub fn close(&self) {
        self.accepting.send_replace(Accepting::Closed);
    }

    /// The same socket, to be served with `config`'s settings (same name and address):
    /// serving it starts new workers' accept loops, and dropping this listener then ends
    /// the old ones. Connections waiting in the queue meanwhile are taken by either.
    pub fn reuse(&self, config: &ListenerConfig) -> Result<BoundSocket, BindError> {
        let socket = self.socket.try_clone().map_err(|source| BindError {
            name: config.name.clone(),
            bind: config.bind,
            source,
        })?;
        Ok(BoundSocket {
            config: config.clone(),
            socket,
            local_addr: self.local_addr,
        })
    }
}

impl Drop for RunningListener {
    fn drop(&mut self) {
        self.close();
    }
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

/// Binds and listens on the listener's address (`SO_REUSEADDR`, so a restart does not wait
/// for the old process's connections in TIME_WAIT; a deep backlog).
pub fn bind(config: &ListenerConfig) -> Result<BoundSocket, BindError> {
    use socket2::{Domain, Socket, Type};
    let bind_error = |source| BindError {
        name: config.name.clone(),
        bind: config.bind,
        source,
    };
    let socket = Socket::new(
        Domain::for_address(config.bind),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(bind_error)?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&config.bind.into()).map_err(bind_error)?;
    socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
    // Two TCP options set once here for every connection: Linux copies both to each
    // socket it accepts, so no system call per connection sets them. After `listen`,
    // which resets the second.
    // Nagle off: relayed small frames must not wait for the peer's delayed ACK.
    socket.set_tcp_nodelay(true).map_err(bind_error)?;
    // Quick ACKs off: a client's request (or TLS hello) is acknowledged by the answer
    // that follows it, not by a bare ACK first, one TCP segment less per connection
    // (HAProxy's tcp-smart-accept does the same). Without an answer, the kernel still
    // sends the ACK after its delayed-ACK time (40 ms), and it leaves this mode by
    // itself when the connection's traffic stops being request and answer.
    socket.set_tcp_quickack(false).map_err(bind_error)?;
    let socket = std::net::TcpListener::from(socket);
    let local_addr = socket.local_addr().map_err(bind_error)?;
    Ok(BoundSocket {
        config: config.clone(),
        socket,
        local_addr,
    })
}

/// Readies a bound socket to be served on every worker (a TLS listener terminates TLS with
/// the certificates `tls` resolves): everything that can fail happens here, a handle on the
/// socket for each worker, so that a reload readies every listener before it changes
/// anything and then serves them with [`ReadyListener::serve`], which cannot fail.
///
/// Built from actix-http directly rather than actix-web's `HttpServer` for one reason:
/// its upgrade hook hands a WebSocket request over with the raw connection, so the tunnel
/// relays bytes itself instead of going through a message channel per frame.
pub fn prepare(
    bound: BoundSocket,
    workers: &Workers,
    shared: web::Data<Shared>,
    upstream_tls: Arc<rustls::ClientConfig>,
    tls: Option<Arc<CertResolver>>,
    client_header_timeout: Duration,
) -> Result<ReadyListener, BindError> {
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
    let (accepting, state) = watch::channel(Accepting::Yes);
    let mut accept_loops = Vec::with_capacity(workers.arbiters.len());
    for arbiter in &workers.arbiters {
        // Every worker waits on the same socket; the kernel gives each connection to one.
        let socket = socket.try_clone().map_err(|source| BindError {
            name: config.name.clone(),
            bind: config.bind,
            source,
        })?;
        let worker = Worker {
            socket,
            state: state.clone(),
            front: Arc::clone(&front),
            upgrade: UpgradeContext {
                shared: shared.clone(),
                listener: info.clone(),
                upstream_tls: Arc::clone(&upstream_tls),
            },
            client_header_timeout,
        };
        accept_loops.push((arbiter.handle(), worker));
    }
    Ok(ReadyListener {
        listener: RunningListener {
            config,
            local_addr,
            tls,
            accepting,
            socket,
        },
        accept_loops,
    })
}

/// A listener with a socket handle for each worker, not yet accepting (see [`prepare`]).
/// Dropped unserved, it closes those handles: no connection is accepted with its settings.
pub struct ReadyListener {
    listener: RunningListener,
    accept_loops: Vec<(actix_rt::ArbiterHandle, Worker)>,
}

impl ReadyListener {
    pub fn name(&self) -> &str {
        &self.listener.config.name
    }

    /// Starts every worker's accept loop.
    pub fn serve(self) -> RunningListener {
        for (arbiter, worker) in self.accept_loops {
            // An arbiter only refuses work once it is stopping, i.e. at shutdown, when
            // nothing new is served anyway.
            arbiter.spawn_fn(move || {
                actix_rt::spawn(worker.run());
            });
        }
        self.listener
    }
}

/// One worker's share of a listener: its accept loop.
struct Worker {
    socket: std::net::TcpListener,
    state: watch::Receiver<Accepting>,
    front: Arc<Front>,
    upgrade: UpgradeContext,
    client_header_timeout: Duration,
}

impl Worker {
    /// Accepts until the listener is closed; each connection is served by a task of its own
    /// on this worker.
    async fn run(mut self) {
        let name = Arc::clone(&self.upgrade.listener.name);
        let listener = match tokio::net::TcpListener::from_std(self.socket) {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!(listener = %name, "cannot serve the socket: {err}");
                return;
            }
        };
        let upgrade = Rc::new(self.upgrade);
        let header_timeout = self.client_header_timeout;
        let service = match http_service(header_timeout, &upgrade).new_service(()).await {
            Ok(service) => Rc::new(service),
            Err(()) => {
                tracing::error!(listener = %name, "cannot build the HTTP service");
                return;
            }
        };
        // Accept errors in a row: the first is a warning, the rest (every pause, for as long
        // as the gateway is out of descriptors) are debug lines until an accept succeeds.
        let mut failed_accepts: u64 = 0;
        loop {
            let accepting = *self.state.borrow_and_update();
            match accepting {
                Accepting::Closed => return,
                Accepting::Paused => {
                    if self.state.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                Accepting::Yes => {}
            }
            tokio::select! {
                biased;
                changed = self.state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((io, peer)) => {
                        if failed_accepts > 0 {
                            tracing::info!(listener = %name, failed_accepts, "accepting again");
                            failed_accepts = 0;
                        }
                        // Boxed: the handshake's state (and its handles on this worker's
                        // services) lives only until the upgrade is answered; the task
                        // then holds nothing but the tunnel (its actor's context and its
                        // relay), for the tunnel's whole life.
                        let handshake = Box::pin(serve_connection(
                            io,
                            peer,
                            Arc::clone(&self.front),
                            Rc::clone(&service),
                            Rc::clone(&upgrade),
                            header_timeout,
                        ));
                        actix_rt::spawn(Connection::Handshake(handshake));
                    }
                    Err(err) if is_connection_error(&err) => {}
                    Err(err) => {
                        if failed_accepts == 0 {
                            tracing::warn!(listener = %name, "accept failed: {err}; retrying every {ACCEPT_ERROR_PAUSE:?} (quietly until it works again)");
                        } else {
                            tracing::debug!(listener = %name, failed_accepts, "accept failed: {err}");
                        }
                        failed_accepts += 1;
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
            }
        }
    }
}

/// An accepted connection's task: the handshake, then the tunnel it opened, if any.
///
/// Not an async block: a task's allocation is sized by its future's largest state, and an
/// async block keeps the handshake's `Option<TunnelTask>` beside the tunnel moved out of it
/// (measured when the tunnel was 112 bytes: a 384-byte task per tunnel, 256 this way).
/// Not futures-util's `then` either: every wake-up of the tunnel comes through this poll,
/// and its `Flatten` and `OptionFuture` layers cost ~20 instructions per wake-up more
/// than the one match here (callgrind: 2,242 against 2,223 per read, BENCHMARKS.md).
enum Connection<H> {
    Handshake(Pin<Box<H>>),
    Tunnel(TunnelTask),
}

impl<H: Future<Output = Option<TunnelTask>>> Future for Connection<H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let connection = self.get_mut();
        loop {
            match connection {
                Connection::Tunnel(tunnel) => return Pin::new(tunnel).poll(cx),
                Connection::Handshake(handshake) => match handshake.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => return Poll::Ready(()),
                    // The handshake's state is dropped here, before the tunnel's first poll.
                    Poll::Ready(Some(tunnel)) => *connection = Connection::Tunnel(tunnel),
                },
            }
        }
    }
}

/// One accepted connection up to its tunnel: the PROXY header and TLS, the first request,
/// then either the WebSocket upgrade (which returns the tunnel, for the caller's task to
/// run) or plain HTTP until the connection ends.
async fn serve_connection(
    io: TcpStream,
    peer: SocketAddr,
    front: Arc<Front>,
    service: Rc<impl Service<(Replay, Option<SocketAddr>)>>,
    upgrade: Rc<UpgradeContext>,
    header_timeout: Duration,
) -> Option<TunnelTask> {
    let (mut io, peer) = front.accept(io, peer).await.ok()?;
    let peer = Some(peer);
    match first_request::read(&mut io, peer, header_timeout).await {
        FirstRequest::Upgrade(head) => {
            websocket::upgrade(&head, io, head.after_head(), &upgrade).await
        }
        FirstRequest::Http(read) => {
            // Boxed, like every rarer branch here: the handshake's future is as large as
            // its largest branch, and it is allocated for every connection.
            let serving = service.call((Replay::new(read, io), peer));
            let _ = Box::pin(serving).await;
            None
        }
        FirstRequest::Done => None,
    }
}

/// Errors of one queued connection (it died before it was accepted), not of the listener.
fn is_connection_error(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
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
    /// The PROXY header read and checked, TLS terminated (Nagle is already off: the
    /// listening socket passed that on); returns the stream and the client's address
    /// (`peer` as accept gave it, or the one a trusted PROXY header names).
    async fn accept(
        &self,
        io: TcpStream,
        mut peer: SocketAddr,
    ) -> Result<(Box<dyn Io>, SocketAddr), DispatchError> {
        let io: Box<dyn Io> = if self.proxy_protocol {
            let trusted = self
                .trusted_proxies
                .iter()
                .any(|net| net.contains(&peer.ip()));
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
                peer = addr.source;
            }
            Box::new(stream)
        } else {
            Box::new(io)
        };
        let Some(acceptor) = &self.acceptor else {
            return Ok((io, peer));
        };
        // Boxed: a TLS handshake's state would otherwise enlarge every connection's task.
        let handshake = Box::pin(acceptor.accept(io));
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
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

/// The HTTP/1.1 service of one worker, for connections whose first request is not a
/// WebSocket upgrade: plain requests go to the HTTP proxy, a later upgrade on the same
/// connection to the tunnel path.
fn http_service(
    client_header_timeout: Duration,
    upgrade: &Rc<UpgradeContext>,
) -> impl ServiceFactory<
    (Replay, Option<std::net::SocketAddr>),
    Config = (),
    Response = (),
    Error = DispatchError,
    InitError = (),
> + use<> {
    // Runs once per worker: the backend clients are per worker (awc is !Send).
    let clients = web::Data::new(UpstreamClients::new(Arc::clone(&upgrade.upstream_tls)));
    let upgrade = Rc::clone(upgrade);
    let app = App::new()
        .app_data(upgrade.shared.clone())
        .app_data(web::Data::new(upgrade.listener.clone()))
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
                    websocket::serve_upgrade::<Replay>(req, framed, Rc::clone(&upgrade))
                }))
            }
        }))
        .h1(map_config(app, |_| AppConfig::default()))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn listener_config() -> ListenerConfig {
        ListenerConfig {
            name: "test".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            redirect_https: None,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            real_ip_from: Vec::new(),
        }
    }

    /// Accepts one connection on `listener` after its client sent a request, and returns,
    /// once the request is read and before any answer, whether the accepted socket has
    /// Nagle off, whether it reports quick ACKs on (off: delayed-ACK mode) and how many
    /// TCP segments it has sent (its SYN-ACK is not its own).
    fn accepted_socket(listener: &std::net::TcpListener) -> (bool, bool, u32) {
        listener.set_nonblocking(false).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let mut request = [0u8; 18];
        accepted.read_exact(&mut request).unwrap();
        let options = socket2::SockRef::from(&accepted);
        (
            options.tcp_nodelay().unwrap(),
            options.tcp_quickack().unwrap(),
            crate::test_sockets::tcp_segments_sent(&accepted),
        )
    }

    #[test]
    fn accepted_connections_have_nagle_off_and_send_no_bare_ack_for_a_request() {
        let bound = bind(&listener_config()).unwrap();
        let (nodelay, quickack, segments) = accepted_socket(&bound.socket);
        assert!(
            nodelay,
            "Nagle's algorithm is on for an accepted connection"
        );
        // In delayed-ACK ("pingpong") mode the request's ACK waits for the answer (or the
        // delayed-ACK time, 40 ms); a socket that has received data outside that mode
        // reports quick ACKs on.
        assert!(
            !quickack,
            "an accepted connection acknowledges its request at once"
        );
        assert_eq!(segments, 0, "a bare ACK went out for the request");

        // A socket set up without the two options reads the opposite: Nagle on, quick
        // ACKs on, the request ACKed at once.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(accepted_socket(&plain), (false, true, 1));
    }
}
