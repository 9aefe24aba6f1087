//! Test harness: the gateway in-process on 127.0.0.1:0, real backends and real clients
//! on loopback sockets. Everything a test starts stops when its handle drops.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use wsgate::GatewayThread;

/// The kernel's TCP segment counters, read as the unit tests read them.
#[path = "../../src/test_sockets.rs"]
pub mod test_sockets;

/// Waits (at most [`STEP`]) until something accepts TCP connections on 127.0.0.1:`port`,
/// such as a gateway process just started.
pub fn wait_listening(port: u16) {
    let deadline = std::time::Instant::now() + STEP;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process, killed and reaped when dropped: a test that fails half-way leaves no
/// process behind. Derefs to the [`std::process::Child`].
pub struct Process(Option<std::process::Child>);

impl Process {
    pub fn new(child: std::process::Child) -> Process {
        Process(Some(child))
    }

    /// The child, no longer killed on drop (for `wait_with_output`, which consumes it).
    pub fn into_inner(mut self) -> std::process::Child {
        self.0
            .take()
            .expect("a Process holds its child until dropped")
    }
}

impl std::ops::Deref for Process {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0
            .as_ref()
            .expect("a Process holds its child until dropped")
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0
            .as_mut()
            .expect("a Process holds its child until dropped")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Stops a gateway process the way an orchestrator does (SIGTERM, a graceful shutdown),
/// waits for it, and returns what it wrote to its standard error (piped, with
/// `--log-format json`) and the JSON log lines in it.
pub async fn stop_and_read_json_log(child: Process) -> (String, Vec<serde_json::Value>) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let child = child.into_inner();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let lines = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (stderr, lines)
}

/// GET `path` from an admin listener; the body, which must come with a 200.
pub async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let (status, _, body) = http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{path}");
    String::from_utf8(body).unwrap()
}

/// The value of the metric line that starts with `prefix` (name and labels) in a
/// `/metrics` text.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Every test step that waits on the network waits at most this long.
pub const STEP: Duration = Duration::from_secs(10);

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Starts a gateway from TOML text; `{BACKEND_n}` placeholders are replaced by the
/// addresses given, and listeners should bind `127.0.0.1:0`.
pub fn gateway(toml: &str, backends: &[SocketAddr]) -> GatewayThread {
    // Logs show with `--nocapture` and `RUST_LOG=wsgate=debug`.
    if std::env::var_os("RUST_LOG").is_some() {
        wsgate::telemetry::init(wsgate::telemetry::LogFormat::Pretty);
    }
    let mut text = toml.to_string();
    for (i, addr) in backends.iter().enumerate() {
        text = text.replace(&format!("{{BACKEND_{}}}", i + 1), &addr.to_string());
    }
    let config = wsgate::config::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    GatewayThread::spawn(config).expect("gateway starts")
}

/// Starts a gateway from a configuration file it then watches and reloads.
pub fn gateway_watching(path: &std::path::Path) -> GatewayThread {
    if std::env::var_os("RUST_LOG").is_some() {
        wsgate::telemetry::init(wsgate::telemetry::LogFormat::Pretty);
    }
    let config = wsgate::config::load(path).unwrap_or_else(|e| panic!("{e}"));
    GatewayThread::spawn_watching(config, Some(path.to_path_buf())).expect("gateway starts")
}

/// Tries `attempt` every 20 ms until it gives a value, at most `within`; `what` names the
/// awaited outcome in the failure.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut attempt: impl FnMut() -> F,
) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(done) = attempt().await {
            return done;
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The single listener's address.
pub fn addr(gw: &GatewayThread) -> SocketAddr {
    gw.listeners[0].addr
}

/// A minimal one-route config in front of the given number of backends.
pub fn simple_config(backends: usize, extra_defaults: &str) -> String {
    let servers: Vec<String> = (1..=backends)
        .map(|i| format!("\"{{BACKEND_{i}}}\""))
        .collect();
    format!(
        r#"
        [gateway]
        workers = 1
        [defaults]
        {extra_defaults}
        [[listener]]
        name = "test"
        bind = "127.0.0.1:0"
        [[route]]
        path = "/"
        upstream = "u"
        [upstream.u]
        servers = [{}]
        "#,
        servers.join(", ")
    )
}

/// What a backend saw of one handshake.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub peer: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Echoes messages; answers the text "whoami" with its name; closes with code N when
    /// sent the text "close N".
    Echo,
    /// Completes the handshake, then never reads or writes (a wedged backend).
    Silent,
    /// Answers the upgrade with this status.
    Refuse(u16),
    /// Accepts TCP but never answers the handshake.
    Mute,
    /// Drops the TCP connection (no close frame) when the first message arrives.
    DropOnMessage,
    /// Sends this many bytes in 1 MiB binary frames as fast as the socket takes them.
    Flood(u64),
}

/// What a backend connection records for the test to look at.
#[derive(Clone)]
struct Records {
    seen: Arc<Mutex<Vec<Seen>>>,
    closes: Arc<Mutex<Vec<u16>>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
}

/// A WebSocket backend on 127.0.0.1:0 (tokio-tungstenite).
pub struct WsBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Close codes received from the gateway, in order.
    pub closes: Arc<Mutex<Vec<u16>>>,
    /// Bytes a `Flood` backend has handed to its socket so far.
    pub sent: Arc<std::sync::atomic::AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
}

impl WsBackend {
    pub async fn start(name: &str, behavior: Behavior) -> WsBackend {
        Self::start_with(name, behavior, None).await
    }

    /// An echo backend on a chosen port (one that was just free).
    pub async fn start_on(port: u16, name: &str) -> WsBackend {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        Self::listen(listener, name, Behavior::Echo, None)
    }

    /// `protocol`: the subprotocol to choose if the client offers it.
    pub async fn start_with(
        name: &str,
        behavior: Behavior,
        protocol: Option<&'static str>,
    ) -> WsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::listen(listener, name, behavior, protocol)
    }

    fn listen(
        listener: TcpListener,
        name: &str,
        behavior: Behavior,
        protocol: Option<&'static str>,
    ) -> WsBackend {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closes = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let task_seen = Arc::clone(&seen);
        let task_closes = Arc::clone(&closes);
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task_sent = Arc::clone(&sent);
        let task_name = name.to_string();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => {
                        let Ok((stream, peer)) = accepted else { break };
                        let records = Records {
                            seen: Arc::clone(&task_seen),
                            closes: Arc::clone(&task_closes),
                            sent: Arc::clone(&task_sent),
                        };
                        let name = task_name.clone();
                        tokio::spawn(serve(stream, peer, behavior, protocol, records, name));
                    }
                }
            }
        });
        WsBackend {
            name: name.to_string(),
            addr,
            seen,
            closes,
            sent,
            stop: Some(stop_tx),
        }
    }

    /// Waits (bounded) until the backend has received a close frame and returns its code.
    pub async fn first_close(&self) -> u16 {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(code) = self.closes.lock().unwrap().first() {
                return *code;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "backend got no close frame"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn handshakes(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("backend saw a handshake")
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

// tungstenite's handshake callback must return its (large) error response by value.
#[allow(clippy::result_large_err)]
async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    behavior: Behavior,
    protocol: Option<&'static str>,
    rec: Records,
    name: String,
) {
    if behavior == Behavior::Mute {
        // Hold the socket open without a word until the peer gives up.
        let mut sink = [0u8; 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(STEP * 3, stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
        return;
    }
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        rec.seen.lock().unwrap().push(Seen {
            path: req.uri().to_string(),
            headers,
            peer,
        });
        if let Behavior::Refuse(status) = behavior {
            let mut refusal = ErrorResponse::new(Some(format!("refused by {name}")));
            *refusal.status_mut() = StatusCode::from_u16(status).unwrap();
            return Err(refusal);
        }
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(p) = protocol
            && offered.split(',').any(|o| o.trim() == p)
        {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(p));
        }
        Ok(resp)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config())).await
    else {
        return;
    };
    if behavior == Behavior::Silent {
        tokio::time::sleep(STEP * 3).await;
        return;
    }
    if let Behavior::Flood(total) = behavior {
        let frame = tokio_tungstenite::tungstenite::Bytes::from(vec![7u8; 1 << 20]);
        while rec.sent.load(std::sync::atomic::Ordering::Relaxed) < total {
            if ws.send(Message::Binary(frame.clone())).await.is_err() {
                return;
            }
            rec.sent
                .fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        tokio::time::sleep(STEP).await;
        return;
    }
    while let Some(Ok(msg)) = ws.next().await {
        if behavior == Behavior::DropOnMessage {
            // Gone without a word, like a killed process (the kernel sends FIN/RST).
            return;
        }
        let reply = match msg {
            Message::Text(t) if t.as_str() == "whoami" => Message::text(name.clone()),
            Message::Text(t) if t.as_str().starts_with("close ") => {
                let code: u16 = t.as_str()[6..].parse().unwrap();
                let _ = ws
                    .close(Some(tungstenite::protocol::CloseFrame {
                        code: code.into(),
                        reason: format!("bye {code}").into(),
                    }))
                    .await;
                // Drain until the peer's close reply ends the stream.
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            Message::Text(_) | Message::Binary(_) => msg,
            // tungstenite queues the pong for a ping by itself; flush it.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                let _ = ws.flush().await;
                continue;
            }
            Message::Close(frame) => {
                rec.closes
                    .lock()
                    .unwrap()
                    .push(frame.map_or(1005, |f| f.code.into()));
                let _ = ws.flush().await;
                continue;
            }
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

/// Connects a WebSocket client to `url`.
pub async fn connect(url: &str) -> Client {
    let (ws, _) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
    )
    .await
    .expect("connect in time")
    .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    ws
}

/// Connects from a chosen loopback source address (for hashing by client address).
pub async fn connect_from(
    source: IpAddr,
    gateway: SocketAddr,
    path: &str,
) -> WebSocketStream<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = socket.connect(gateway).await.unwrap();
    let url = format!("ws://{gateway}{path}");
    let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake in time")
        .expect("handshake");
    ws
}

/// The handshake error status for `url`, which must be refused.
pub async fn refused_status(url: &str) -> (u16, String) {
    match tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .expect("answer in time")
    {
        Ok(_) => panic!("{url}: expected a refused handshake"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("{url}: unexpected error {e}"),
    }
}

/// The next data message (text or binary), skipping pings and pongs.
pub async fn next_data<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("message in time")
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Reads until the close frame and returns its code and reason; then lets the client's
/// automatic close reply go out (as a real client's would) and waits for the TCP end.
pub async fn close_code<S>(ws: &mut WebSocketStream<S>) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let close = loop {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                break (frame.code.into(), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => break (1005, String::new()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    };
    let _ = tokio::time::timeout(STEP, ws.next()).await;
    close
}

/// Sends a raw HTTP/1.1 request and returns (status, head, body); the body is read by
/// its Content-Length, or to the end of the connection without one.
pub async fn http(addr: SocketAddr, request: &str) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let split = loop {
        if let Some(split) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break split;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(STEP, stream.read(&mut chunk))
            .await
            .expect("head in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before a complete head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut body = buf[split + 4..].to_vec();
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match length {
        Some(len) => {
            while body.len() < len {
                let mut chunk = vec![0u8; 65536];
                let n = tokio::time::timeout(STEP, stream.read(&mut chunk))
                    .await
                    .expect("body in time")
                    .unwrap();
                assert!(n > 0, "connection closed inside the body");
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            tokio::time::timeout(STEP, stream.read_to_end(&mut body))
                .await
                .expect("body in time")
                .unwrap();
        }
    }
    (status, head, body)
}

/// Asks an echo backend through `ws` which backend it is.
pub async fn whoami<S>(ws: &mut WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text("whoami")).await.unwrap();
    next_data(ws).await.into_text().unwrap().to_string()
}

/// Opens a WebSocket to `url`, asks which backend answers, and closes it.
pub async fn whoami_at(url: &str) -> String {
    let mut ws = connect(url).await;
    let name = whoami(&mut ws).await;
    let _ = ws.close(None).await;
    name
}

/// Debian's Chromium, headless, with its profile in `profile` (`.ci/run` installs it).
pub fn headless_chromium(profile: &std::path::Path) -> std::process::Command {
    let mut chromium = std::process::Command::new("chromium");
    chromium
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    chromium
}

/// A loopback port that is free now (bound, then released) for a listener to take.
pub fn free_port() -> u16 {
    // Below the ephemeral range (32768 and up here): an outgoing connection of a test running
    // alongside could otherwise take the port between this check and the bind that uses it.
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// The process's resident set size in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Reads an HTTP head byte by byte (nothing after it is consumed).
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(STEP, stream.read(&mut byte))
            .await
            .expect("a head in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed inside a head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Reads exactly `n` bytes.
pub async fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    tokio::time::timeout(STEP, stream.read_exact(&mut bytes))
        .await
        .expect("bytes in time")
        .unwrap();
    bytes
}

/// A header's value in a raw head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Answers the upgrade in `head` with a 101, agreeing to `agreement` if permessage-deflate
/// was offered; returns whether it was.
pub async fn accept_upgrade(stream: &mut TcpStream, head: &str, agreement: &str) -> bool {
    accept_upgrade_with(stream, head, agreement, &[]).await
}

/// [`accept_upgrade`] with `frames` right behind the 101, in the same write.
pub async fn accept_upgrade_with(
    stream: &mut TcpStream,
    head: &str,
    agreement: &str,
    frames: &[u8],
) -> bool {
    let key = header(head, "sec-websocket-key").unwrap();
    let offered = header(head, "sec-websocket-extensions")
        .is_some_and(|offers| offers.contains("permessage-deflate"));
    let agreed = if offered {
        format!("Sec-WebSocket-Extensions: {agreement}\r\n")
    } else {
        String::new()
    };
    let mut answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{agreed}\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes())
    )
    .into_bytes();
    answer.extend_from_slice(frames);
    stream.write_all(&answer).await.unwrap();
    offered
}
