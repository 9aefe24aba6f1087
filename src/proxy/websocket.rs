//! The WebSocket path. actix-http hands every `Upgrade: websocket` request over with its
//! raw connection; this module checks the upgrade, dials the route's servers in balancer
//! order until one accepts, answers the client with the backend's choices, and gives both
//! raw connections to a new [`Tunnel`].
//!
//! The backend leg is dialled here rather than with awc: the upgrade is one request and
//! one response head, and awc's general client (pool, codec, date service, boxed
//! connection layers) cost more CPU per handshake than everything else in the gateway
//! (measured with callgrind, see BENCHMARKS.md). The client's `Sec-WebSocket-Key` goes to
//! the backend as it is, so the backend's `Sec-WebSocket-Accept` is checked against the
//! very value the client expects.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_codec::Framed;
use actix_http::h1;
use actix_http::{Request, StatusCode};
use actix_web::ResponseError;
use actix_web::web;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::headers::{self, Forwarded};
use super::{Head, ListenerInfo, MAX_HEAD_BYTES, ProxyError, Shared, authority, match_route};
use crate::config::TunnelSettings;
use crate::limits::Permits;
use crate::metrics;
use crate::pool::Server;
use crate::tunnel::{ClientAddr, Io, LegIo, Tunnel, TunnelParams, TunnelTask};

/// A backend answer or a refusal has to reach the client within this time, or the client
/// is not reading and is dropped.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the upgrade service of one worker needs.
pub struct UpgradeContext {
    pub shared: web::Data<Shared>,
    pub listener: ListenerInfo,
    /// TLS settings for `wss://` servers of upstreams without their own (`ca`, ...).
    pub upstream_tls: Arc<rustls::ClientConfig>,
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
    /// The gateway itself could not open a connection (out of file descriptors, memory or
    /// local ports): no fault of the server, and every other server would fail alike.
    Local(String),
}

/// actix-http's upgrade service, for an upgrade that follows other requests on a
/// keep-alive connection (a connection's first request is read in
/// [`super::first_request`]).
pub async fn serve_upgrade<T: Io>(
    req: Request,
    framed: Framed<T, h1::Codec>,
    ctx: Rc<UpgradeContext>,
) -> Result<(), actix_http::Error> {
    // Only the socket and the bytes already read from it are kept; the HTTP codec, its
    // buffers and the request are dropped before the tunnel's long life begins.
    let actix_codec::FramedParts { io, read_buf, .. } = framed.into_parts();
    if let Some(tunnel) = upgrade(req.head(), Box::new(io), read_buf.freeze(), &ctx).await {
        // A task of its own: actix-http's connection future, which would hold this one,
        // is large and would stay allocated for the tunnel's whole life.
        actix_rt::spawn(tunnel);
    }
    Ok(())
}

/// Answers a WebSocket upgrade on the client's raw connection (`early`: bytes that came
/// after the request head), then starts the tunnel: returns it, for the caller's task to
/// run (`None`: the upgrade was refused or the client left).
pub async fn upgrade(
    req: &impl Head,
    mut client: Box<dyn Io>,
    early: Bytes,
    ctx: &UpgradeContext,
) -> Option<TunnelTask> {
    let started = std::time::Instant::now();
    let outcome = match ctx.listener.redirect_https {
        Some(port) => Err(super::redirect(req, port)),
        // Boxed: the dial's large future would otherwise make every connection's larger.
        None => Box::pin(accept(req, ctx)).await,
    };
    match outcome {
        Ok(accepted) => {
            let written =
                tokio::time::timeout(CLIENT_WRITE_TIMEOUT, client.write_all(&accepted.response))
                    .await;
            if !matches!(written, Ok(Ok(()))) {
                metrics::handshake(&ctx.shared.metrics, "client_gone");
                return None;
            }
            metrics::handshake(&ctx.shared.metrics, "ok");
            ctx.shared
                .metrics
                .handshake_seconds
                .observe(started.elapsed().as_secs_f64());
            Some(Tunnel::start(
                LegIo { io: client, early },
                accepted.backend,
                accepted.params,
            ))
        }
        Err(err) => {
            metrics::handshake(&ctx.shared.metrics, err.result_label());
            let response = refusal(&err);
            let _ = tokio::time::timeout(CLIENT_WRITE_TIMEOUT, async {
                client.write_all(&response).await?;
                client.shutdown().await
            })
            .await;
            None
        }
    }
}

struct Accepted {
    /// The 101 response for the client.
    response: Vec<u8>,
    backend: LegIo,
    params: TunnelParams,
}

async fn accept(req: &impl Head, ctx: &UpgradeContext) -> Result<Accepted, ProxyError> {
    let matched = match_route(&ctx.shared, &ctx.listener, req)?;
    // Refuse a malformed upgrade before any backend is bothered with it.
    let key = checked_key(req)?;
    let accept_key = actix_http::ws::hash_key(key);
    let route = &matched.route;
    let settings = route.config.settings;
    if !route.config.allowed_origins.is_empty() {
        let origin = req
            .value("origin")
            .and_then(super::ascii_text)
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
    // The upgrade request is written once, for every server tried: the request line, the
    // forwarded headers, then the upgrade headers with the client's key. Only the Host
    // header of a client that sent none names the server, so it goes last.
    let mut request = Vec::with_capacity(1024);
    request.extend_from_slice(b"GET ");
    request.extend_from_slice(matched.backend_path.as_bytes());
    request.extend_from_slice(b" HTTP/1.1\r\n");
    let host_put = headers::forward(
        req,
        &Forwarded {
            client_ip: matched.client_ip,
            peer_ip: matched.peer_ip,
            proto: ctx.listener.proto,
            host: req.value("host"),
            host_override: route.config.host_header.as_deref(),
        },
        &mut request,
    );
    // Frames cross the gateway as they came, so a compression the two ends agree on works
    // end to end; only permessage-deflate is offered (see `headers::deflate_offers`).
    let offers = settings
        .permessage_deflate
        .then(|| headers::deflate_offers(req.values("sec-websocket-extensions")))
        .flatten();
    if let Some(offers) = &offers {
        headers::put_header(&mut request, b"sec-websocket-extensions", offers);
    }
    request.extend_from_slice(
        b"connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: ",
    );
    request.extend_from_slice(key);
    request.extend_from_slice(b"\r\n");
    let for_every_server = request.len();
    let expected = Expected {
        accept_key: &accept_key,
        deflate_offered: offers.is_some(),
    };
    let tls = route.pool.tls.as_ref().unwrap_or(&ctx.upstream_tls);
    let mut last_error = None;
    let candidates = matched.candidates(req)?;
    let upstream_config = &route.pool.config;
    for server in candidates {
        request.truncate(for_every_server);
        if !host_put {
            let host = authority(&server.config.host, server.config.port);
            headers::put_header(&mut request, b"host", host.as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        match dial(&server, tls, &request, &expected, &settings).await {
            Ok(answer) => {
                server.record_success();
                return Ok(Accepted {
                    response: answer.client_response,
                    backend: answer.leg,
                    params: TunnelParams {
                        settings,
                        permits,
                        buffered: Arc::clone(&ctx.shared.buffered),
                        counters: ctx.shared.metrics.relay_counters(),
                        shared: ctx.shared.clone(),
                        access_log: route.config.access_log,
                        registry: Arc::clone(&ctx.shared.registry),
                        lease: server.lease(),
                        upstream: Arc::clone(&route.upstream),
                        client_addr: ClientAddr(req.peer_addr()),
                        route: route.label.clone(),
                        permessage_deflate: answer.deflate,
                    },
                });
            }
            Err(DialError::Refused(status)) => {
                tracing::info!(server = %server.config, %status, "backend refused the upgrade");
                return Err(ProxyError::Refused(status));
            }
            Err(DialError::Local(detail)) => {
                tracing::warn!(route = %route.label, server = %server.config, error = %detail,
                    "cannot open a backend connection: the gateway is out of resources");
                return Err(ProxyError::Exhausted(detail));
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

/// Checks an upgrade request (RFC 6455 §4.2.1) and returns its `Sec-WebSocket-Key`.
fn checked_key(req: &impl Head) -> Result<&[u8], ProxyError> {
    use base64::Engine as _;
    if req.method() != "GET" {
        return Err(ProxyError::BadUpgrade("the method must be GET"));
    }
    if !headers::has_token(req.values("upgrade"), b"websocket") {
        return Err(ProxyError::BadUpgrade(
            "the Upgrade header must be \"websocket\"",
        ));
    }
    if !headers::has_token(req.values("connection"), b"upgrade") {
        return Err(ProxyError::BadUpgrade(
            "the Connection header must include \"upgrade\"",
        ));
    }
    match req.value("sec-websocket-version") {
        None => {
            return Err(ProxyError::BadUpgrade(
                "the Sec-WebSocket-Version header is missing",
            ));
        }
        Some(b"13") => {}
        Some(_) => return Err(ProxyError::UnsupportedVersion),
    }
    // Room for what base64 estimates 24 characters decode to (18); a key must give 16.
    let mut nonce = [0u8; 18];
    match req.value("sec-websocket-key") {
        Some(key)
            if key.len() == 24
                && base64::engine::general_purpose::STANDARD.decode_slice(key, &mut nonce)
                    == Ok(16) =>
        {
            Ok(key)
        }
        _ => Err(ProxyError::BadUpgrade(
            "the Sec-WebSocket-Key header is missing or not 16 bytes of base64",
        )),
    }
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
    let (total_cap, cap_name) = limits.total_cap(gateway.max_connections);
    let Some(total) = limits.total.acquire(total_cap) else {
        return Err(ProxyError::Busy(cap_name));
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

/// What a backend's answer must agree with.
struct Expected<'a> {
    /// The `Sec-WebSocket-Accept` the client's key calls for.
    accept_key: &'a [u8],
    /// A permessage-deflate offer went to the backend.
    deflate_offered: bool,
}

/// A backend that accepted the upgrade.
struct BackendAnswer {
    /// The 101 for the client, with the backend's end-to-end headers.
    client_response: Vec<u8>,
    leg: LegIo,
    /// The backend agreed to permessage-deflate.
    deflate: bool,
}

/// Connects to `server` (TCP within `connect_timeout`, then TLS for a TLS server), sends
/// the upgrade request and reads the answer (within `handshake_timeout`).
async fn dial(
    server: &Server,
    tls: &Arc<rustls::ClientConfig>,
    request: &[u8],
    expected: &Expected<'_>,
    settings: &TunnelSettings,
) -> Result<BackendAnswer, DialError> {
    // One timer for both deadlines, re-armed in place after the connect: a second timer
    // would be one more made, registered and removed on every handshake.
    let deadline = tokio::time::sleep(settings.connect_timeout);
    tokio::pin!(deadline);
    let connected = tokio::select! {
        biased;
        connected = connect(server) => connected,
        () = &mut deadline => {
            return Err(DialError::Timeout(format!(
                "no TCP connection within connect_timeout ({:?})",
                settings.connect_timeout
            )));
        }
    };
    let tcp = match connected {
        Ok(tcp) => tcp,
        Err(err) if super::is_local_exhaustion(&err) => {
            return Err(DialError::Local(format!("connect: {err}")));
        }
        Err(err) => return Err(DialError::Failed(format!("connect: {err}"))),
    };
    deadline
        .as_mut()
        .reset(tokio::time::Instant::now() + settings.handshake_timeout);
    let exchange = async {
        let mut io: Box<dyn Io> = if server.config.tls {
            let name = rustls_pki_types::ServerName::try_from(server.config.host.clone())
                .map_err(|err| DialError::Failed(format!("TLS server name: {err}")))?;
            // Boxed: a TLS handshake's state is large, and inline it would make every
            // plain dial's future (moved into place on each handshake) as large.
            let connecting = tokio_rustls::TlsConnector::from(Arc::clone(tls)).connect(name, tcp);
            let stream = Box::pin(connecting)
                .await
                .map_err(|err| DialError::Failed(format!("TLS: {err}")))?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        io.write_all(request).await.map_err(|err| {
            // A plain connect's own error comes with its first write (see `connect`).
            let step = if is_connect_error(&err) {
                "connect"
            } else {
                "sending the upgrade"
            };
            DialError::Failed(format!("{step}: {err}"))
        })?;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            if let Some(answer) = read_answer(&buf, expected)? {
                // Split only if frames came behind the 101: splitting allocates.
                let early = if buf.len() > answer.head_len {
                    buf.split_off(answer.head_len).freeze()
                } else {
                    Bytes::new()
                };
                return Ok(BackendAnswer {
                    client_response: answer.client_response,
                    leg: LegIo { io, early },
                    deflate: answer.deflate,
                });
            }
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(DialError::Failed(format!(
                    "the answer's head is larger than {MAX_HEAD_BYTES} bytes"
                )));
            }
            buf.reserve(1024);
            let n = io
                .read_buf(&mut buf)
                .await
                .map_err(|err| DialError::Failed(format!("reading the answer: {err}")))?;
            if n == 0 {
                return Err(DialError::Failed(
                    "the backend closed the connection before answering the upgrade".into(),
                ));
            }
        }
    };
    tokio::select! {
        biased;
        answer = exchange => answer,
        () = deadline => Err(DialError::Timeout(format!(
            "no upgrade answer within handshake_timeout ({:?})",
            settings.handshake_timeout
        ))),
    }
}

/// A TCP connection to `server`, Nagle off (relayed small frames must not wait for a
/// delayed ACK), returned once the connect is over, whichever way. A host that is an IP
/// address is dialled as it is; a name is looked up on every dial (a container's address
/// changes when it is recreated), and its addresses are tried in turn.
///
/// Unlike `TcpStream::connect`, this does not read the socket's error once the connect is
/// over (a `getsockopt` on every handshake): a connect that failed fails the stream's
/// first write with its error, which `dial` reports as the connect's. A TLS server's
/// first write is the TLS library's, so for it the error is read here.
async fn connect(server: &Server) -> std::io::Result<TcpStream> {
    let tls = server.config.tls;
    if let Some(address) = server.address {
        return connect_to(address, tls).await;
    }
    let mut last_error = None;
    for address in
        tokio::net::lookup_host((server.config.host.as_str(), server.config.port)).await?
    {
        match connect_to(address, tls).await {
            Ok(tcp) => return Ok(tcp),
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{:?} resolves to no address", server.config.host),
        )
    }))
}

/// The errors only a connect ends with: met on a stream's first write, they are the
/// connect's (see [`connect`]).
fn is_connect_error(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionRefused | HostUnreachable | NetworkUnreachable
    )
}

async fn connect_to(address: SocketAddr, read_error: bool) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    // Quick ACKs off before the connect: the handshake's last ACK then travels with the
    // upgrade request (or TLS hello) sent right after it, one TCP segment less per dial
    // (HAProxy's tcp-smart-connect).
    socket.set_tcp_quickack(false)?;
    match socket.connect(&address.into()) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(err) => return Err(err),
    }
    let tcp = TcpStream::from_std(socket.into())?;
    // Not `writable()`: its future queues a waiter under the stream's lock, where this
    // takes the stream's one write-waker slot (callgrind: ~500 instructions less).
    std::future::poll_fn(|cx| tcp.poll_write_ready(cx)).await?;
    if read_error && let Some(err) = tcp.take_error()? {
        return Err(err);
    }
    Ok(tcp)
}

/// A complete 101 answer: how long its head is and the client's response made from it.
struct ParsedAnswer {
    head_len: usize,
    client_response: Vec<u8>,
    deflate: bool,
}

/// Parses the backend's answer once its head is complete (`None` until then).
fn read_answer(buf: &[u8], expected: &Expected<'_>) -> Result<Option<ParsedAnswer>, DialError> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut answer = httparse::Response::new(&mut slots);
    let head_len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(DialError::Failed(format!("malformed answer: {err}"))),
    };
    let code = answer.code.unwrap_or(0);
    if code != 101 {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
        return Err(DialError::Refused(status));
    }
    let value = |name: &str| {
        answer
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if !value("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
        return Err(DialError::Failed(
            "101 without \"Upgrade: websocket\"".into(),
        ));
    }
    if value("sec-websocket-accept").map(<[u8]>::trim_ascii) != Some(expected.accept_key) {
        return Err(DialError::Failed(
            "the Sec-WebSocket-Accept of the answer does not match the key".into(),
        ));
    }
    let extensions = || {
        answer
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
            .map(|h| h.value)
    };
    let deflate = headers::agreed_deflate(extensions(), expected.deflate_offered)
        .map_err(DialError::Failed)?;
    let mut response = Vec::with_capacity(256);
    response.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    headers::put_header(&mut response, b"Sec-WebSocket-Accept", expected.accept_key);
    for agreed in extensions() {
        headers::put_header(&mut response, b"Sec-WebSocket-Extensions", agreed);
    }
    // The backend's subprotocol choice, cookies and other end-to-end headers reach the
    // client; the per-leg WebSocket headers do not.
    let pairs = answer.headers.iter().map(|h| (h.name, h.value));
    for (name, value) in headers::end_to_end(pairs) {
        headers::put_header(&mut response, name.as_bytes(), value);
    }
    response.extend_from_slice(b"\r\n");
    Ok(Some(ParsedAnswer {
        head_len,
        client_response: response,
        deflate,
    }))
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
        _ if err.retry_after() => head.push_str("Retry-After: 1\r\n"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend connection's first bytes carry the ACK of the backend's SYN-ACK: two
    /// segments (SYN, then the request) where a plain connect sends three.
    #[tokio::test]
    async fn a_dial_sends_no_bare_ack_before_its_first_bytes() {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = backend.local_addr().unwrap();
        let request = b"GET / HTTP/1.1\r\n\r\n";

        let dialled = connect_to(address, false).await.unwrap();
        assert_eq!(dialled.try_write(request).unwrap(), request.len());
        assert_eq!(crate::test_sockets::tcp_segments_sent(&dialled), 2);

        let plain = TcpStream::connect(address).await.unwrap();
        plain.set_nodelay(true).unwrap();
        assert_eq!(plain.try_write(request).unwrap(), request.len());
        assert_eq!(crate::test_sockets::tcp_segments_sent(&plain), 3);
    }

    /// RFC 6455 §1.3's example key and its accept value.
    const ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    const OFFERED: Expected = Expected {
        accept_key: ACCEPT,
        deflate_offered: true,
    };

    fn answer(head: &str) -> Result<Option<ParsedAnswer>, DialError> {
        read_answer(head.as_bytes(), &OFFERED)
    }

    #[test]
    fn a_good_answer_becomes_the_clients_101_with_end_to_end_headers() {
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\
                    Sec-WebSocket-Extensions: permessage-deflate\r\nX-Hop: 1\r\nSet-Cookie: a=1\r\n\r\n";
        let mut bytes = head.as_bytes().to_vec();
        bytes.extend_from_slice(b"\x81\x00");
        let parsed = read_answer(&bytes, &OFFERED).unwrap().unwrap();
        assert!(parsed.deflate);
        assert_eq!(
            parsed.head_len,
            head.len(),
            "the frame after the head is not part of it"
        );
        let response = String::from_utf8(parsed.client_response).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(response.ends_with("\r\n\r\n"));
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(response.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(response.contains("Set-Cookie: a=1\r\n"));
        assert!(response.contains("Sec-WebSocket-Extensions: permessage-deflate\r\n"));
        for gone in ["X-Hop", "Upgrade, X-Hop"] {
            assert!(
                !response.contains(gone),
                "{gone} reached the client: {response}"
            );
        }
    }

    #[test]
    fn bad_answers_fail_the_server_and_refusals_keep_their_status() {
        assert!(matches!(answer("HTTP/1.1 101 Switching"), Ok(None)));
        assert!(matches!(
            answer("HTTP/1.1 403 Forbidden\r\n\r\n"),
            Err(DialError::Refused(StatusCode::FORBIDDEN))
        ));
        assert!(matches!(
            answer("HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"),
            Err(DialError::Failed(_))
        ));
        assert!(matches!(
            answer("HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: wrong=\r\n\r\n"),
            Err(DialError::Failed(_))
        ));
        assert!(matches!(
            answer("NOT HTTP\r\n\r\n"),
            Err(DialError::Failed(_))
        ));
    }

    #[test]
    fn an_extension_that_was_not_offered_fails_the_server() {
        let agreeing = |extension: &str| {
            format!(
                "HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
                 Sec-WebSocket-Extensions: {extension}\r\n\r\n"
            )
        };
        let not_offered = Expected {
            accept_key: ACCEPT,
            deflate_offered: false,
        };
        assert!(matches!(
            read_answer(agreeing("permessage-deflate").as_bytes(), &not_offered),
            Err(DialError::Failed(_))
        ));
        assert!(matches!(
            answer(&agreeing("x-webkit-deflate-frame")),
            Err(DialError::Failed(_))
        ));
        let plain = "HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let parsed = answer(plain).unwrap().unwrap();
        assert!(!parsed.deflate);
        assert!(
            !String::from_utf8(parsed.client_response)
                .unwrap()
                .contains("Extensions")
        );
    }
}
