//! TLS termination with certificates made in the test: wss:// end to end, SNI, the
//! protocol floor, a rotated certificate served without restart, the https redirect.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A test CA and leaf certificates it signs, written as PEM files in a directory.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki {
            ca,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes `NAME.pem` and `NAME.key` for a leaf valid for `names`; returns its DER.
    fn leaf(&self, file: &str, names: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.path(&format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.as_ref().der().clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}

/// A TLS connection to the gateway for `sni`; returns the stream and the leaf it presented.
async fn tls_connect(
    pki: &Pki,
    gateway: std::net::SocketAddr,
    sni: &str,
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
) {
    let connector = tokio_rustls::TlsConnector::from(pki.client_config());
    let tcp = TcpStream::connect(gateway).await.unwrap();
    let tls = tokio::time::timeout(
        STEP,
        connector.connect(ServerName::try_from(sni.to_string()).unwrap(), tcp),
    )
    .await
    .expect("TLS handshake in time")
    .expect("TLS handshake");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    (tls, leaf)
}

fn tls_config(
    pki: &Pki,
    backend: std::net::SocketAddr,
    extra_listener: &str,
) -> (String, std::path::PathBuf) {
    let text = format!(
        r#"
        [gateway]
        workers = 1
        [[listener]]
        name = "tls"
        bind = "127.0.0.1:0"
        tls = {{ certs = [{{ cert = "a.pem", key = "a.key" }}, {{ cert = "b.pem", key = "b.key" }}] }}
        {extra_listener}
        [[route]]
        upstream = "u"
        [upstream.u]
        servers = ["{backend}"]
        "#
    );
    let path = pki.path("config.toml");
    std::fs::write(&path, &text).unwrap();
    (text, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_end_to_end_with_sni_choosing_the_certificate() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let b = pki.leaf("b", &["b.test", "*.b.test"]);
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let (_, path) = tls_config(&pki, backend.addr, "");
    let gw = gateway_watching(&path);
    let addr = gw.addr("tls").unwrap();

    let (_, leaf) = tls_connect(&pki, addr, "a.test").await;
    assert_eq!(leaf, a);
    let (_, leaf) = tls_connect(&pki, addr, "x.b.test").await;
    assert_eq!(leaf, b);

    let (stream, _) = tls_connect(&pki, addr, "b.test").await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://b.test/chat", stream)
        .await
        .unwrap();
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("over tls"));
    let seen = backend.last();
    assert_eq!(
        seen.headers.get("x-forwarded-proto").map(String::as_str),
        Some("https")
    );
    assert_eq!(seen.headers.get("host").map(String::as_str), Some("b.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_the_next_handshake() {
    let pki = Pki::new();
    let old = pki.leaf("a", &["a.test"]);
    pki.leaf("b", &["b.test"]);
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let (_, path) = tls_config(&pki, backend.addr, "");
    let gw = gateway_watching(&path);
    let addr = gw.addr("tls").unwrap();
    let (kept, leaf) = tls_connect(&pki, addr, "a.test").await;
    assert_eq!(leaf, old);

    // A broken file first: the old certificate stays.
    std::fs::write(pki.path("a.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(tls_connect(&pki, addr, "a.test").await.1, old);

    let new = pki.leaf("a", &["a.test"]);
    assert_ne!(new, old);
    let started = Instant::now();
    loop {
        if tls_connect(&pki, addr, "a.test").await.1 == new {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_and_tls_1_2_under_min_version_1_3_are_refused() {
    let pki = Pki::new();
    pki.leaf("a", &["a.test"]);
    pki.leaf("b", &["b.test"]);
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let (text, path) = tls_config(&pki, backend.addr, "");
    let gw = gateway_watching(&path);
    let addr = gw.addr("tls").unwrap();
    let s_client = |version: &str| {
        std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-servername",
                "a.test",
                version,
            ])
            .args(["-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed")
    };
    let tls11 = s_client("-tls1_1");
    assert!(!tls11.status.success(), "a TLS 1.1 handshake must fail");
    let tls12 = s_client("-tls1_2");
    assert!(
        tls12.status.success(),
        "TLS 1.2 is accepted by default: {}",
        String::from_utf8_lossy(&tls12.stderr)
    );
    drop(gw);

    std::fs::write(&path, text.replace("}] }", "}], min_version = \"1.3\" }")).unwrap();
    let gw = gateway_watching(&path);
    let addr = gw.addr("tls").unwrap();
    let tls12 = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "a.test",
            "-tls1_2",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !tls12.status.success(),
        "min_version = \"1.3\" refuses TLS 1.2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_redirects_to_https_with_308() {
    let pki = Pki::new();
    pki.leaf("a", &["a.test"]);
    pki.leaf("b", &["b.test"]);
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let (_, path) = tls_config(
        &pki,
        backend.addr,
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nredirect_https = 8443\n",
    );
    let gw = gateway_watching(&path);
    let plain = gw.addr("plain").unwrap();
    let (status, head, _) = http(
        plain,
        "GET /chat/room?x=1 HTTP/1.1\r\nHost: a.test:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 308);
    assert!(
        head.contains("location: https://a.test:8443/chat/room?x=1")
            || head.contains("Location: https://a.test:8443/chat/room?x=1"),
        "{head}"
    );
    // A WebSocket upgrade on the plain port is redirected as well.
    let (status, head, _) = http(
        plain,
        "GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(status, 308);
    assert!(
        head.contains("Location: https://a.test:8443/chat"),
        "{head}"
    );
}

/// A WebSocket echo backend behind TLS, with a certificate for 127.0.0.1 from `pki`.
async fn tls_backend(pki: &Pki) -> std::net::SocketAddr {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &pki.ca)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                use futures_util::StreamExt;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Over TLS too, the close handshake that a client starts ends with the gateway's Close
/// reply, TLS's close_notify and the FIN in one TCP segment. Before, a tunnel that
/// finished in the poll that wrote the reply closed without close_notify (a truncation to
/// a TLS client: rustls reads it as an error), in two segments, and one ended by a
/// shutdown took three. Every tunnel must send close_notify, and the fewest segments of
/// three tunnels counts (the gateway's ACK of the client's Close rides on the reply unless
/// the reply takes longer than the delayed-ACK time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_close_reply_close_notify_and_fin_reach_the_client_in_one_segment() {
    let gw = TlsEcho::start().await;
    let mut fewest = u32::MAX;
    for _ in 0..3 {
        let mut tls = gw.tunnel().await;
        // A masked Close with code 1000 (mask 0: the payload as it is).
        let (rest, segments) =
            last_close_over_tls(&mut tls, &[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]).await;
        assert_eq!(
            rest,
            [0x88, 0x02, 0x03, 0xE8],
            "the close reply, then close_notify"
        );
        fewest = fewest.min(segments);
    }
    assert_eq!(
        fewest, 1,
        "segments from the client's Close to the end of TCP"
    );
}

/// A close handshake that the backend starts ends over TLS with close_notify and the FIN
/// in one TCP segment after the client's Close reply (two before: tokio-rustls's shutdown
/// writes close_notify by itself); the fewest of three tunnels counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_close_the_backend_starts_ends_with_close_notify_and_fin_in_one_segment() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TlsEcho::start().await;
    let mut fewest = u32::MAX;
    for _ in 0..3 {
        let mut tls = gw.tunnel().await;
        // The text "close 4000" (mask 0) asks the echo backend to close with 4000.
        let mut ask = vec![0x81, 0x80 | 10, 0, 0, 0, 0];
        ask.extend_from_slice(b"close 4000");
        tls.write_all(&ask).await.unwrap();
        let mut header = [0u8; 2];
        tokio::time::timeout(STEP, tls.read_exact(&mut header))
            .await
            .expect("the backend's Close in time")
            .unwrap();
        assert_eq!(header[0], 0x88, "a Close from the backend");
        let mut payload = vec![0u8; usize::from(header[1])];
        tls.read_exact(&mut payload).await.unwrap();
        assert_eq!(payload[..2], [0x0F, 0xA0], "code 4000");
        let (rest, segments) =
            last_close_over_tls(&mut tls, &[0x88, 0x82, 0, 0, 0, 0, 0x0F, 0xA0]).await;
        assert!(rest.is_empty(), "nothing after the Close: {rest:?}");
        fewest = fewest.min(segments);
    }
    assert_eq!(
        fewest, 1,
        "segments from the client's Close reply to the end of TCP"
    );
}

/// A TLS listener in front of the echo backend, for raw WebSocket tunnels over TLS.
struct TlsEcho {
    pki: Pki,
    addr: std::net::SocketAddr,
    _gateway: GatewayThread,
    _backend: WsBackend,
}

impl TlsEcho {
    async fn start() -> TlsEcho {
        let pki = Pki::new();
        pki.leaf("a", &["a.test"]);
        pki.leaf("b", &["b.test"]);
        let backend = WsBackend::start("b1", Behavior::Echo).await;
        let (_, path) = tls_config(&pki, backend.addr, "");
        let gateway = gateway_watching(&path);
        let addr = gateway.addr("tls").unwrap();
        TlsEcho {
            pki,
            addr,
            _gateway: gateway,
            _backend: backend,
        }
    }

    /// A TLS connection upgraded to a WebSocket, its 101 read.
    async fn tunnel(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        use tokio::io::AsyncWriteExt;
        let (mut tls, _) = tls_connect(&self.pki, self.addr, "a.test").await;
        tls.write_all(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        tls
    }
}

/// Sends the client's last Close, then reads to close_notify and on to the end of TCP;
/// returns what came before close_notify and the TCP segments the client's socket
/// received from the Close on.
async fn last_close_over_tls(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    close: &[u8],
) -> (Vec<u8>, u32) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let before = test_sockets::tcp_segments_received(tls.get_ref().0);
    tls.write_all(close).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut rest))
        .await
        .expect("the gateway's close_notify in time")
        .unwrap();
    let mut after = [0u8; 64];
    let n = tokio::time::timeout(STEP, tls.get_mut().0.read(&mut after))
        .await
        .expect("the gateway ended TCP in time")
        .unwrap();
    assert_eq!(n, 0, "nothing after close_notify but the end of TCP");
    (
        rest,
        test_sockets::tcp_segments_received(tls.get_ref().0) - before,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_wss_is_verified_against_the_configured_ca() {
    let pki = Pki::new();
    let backend = tls_backend(&pki).await;
    std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
    let stranger = Pki::new();
    std::fs::write(pki.path("other-ca.pem"), stranger.ca.pem()).unwrap();
    let text = format!(
        "[gateway]\nworkers = 1\n[[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/good/\"\nupstream = \"good\"\n[[route]]\npath = \"/bad/\"\nupstream = \"bad\"\n\
         [upstream.good]\nca = \"ca.pem\"\nservers = [\"wss://{backend}\"]\n\
         [upstream.bad]\nca = \"other-ca.pem\"\nservers = [\"wss://{backend}\"]\n"
    );
    std::fs::write(pki.path("config.toml"), text).unwrap();
    let gw = gateway_watching(&pki.path("config.toml"));
    let addr = gw.listeners[0].addr;
    let mut ws = connect(&format!("ws://{addr}/good/x")).await;
    ws.send(Message::text("through wss")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("through wss"));
    let (status, body) = refused_status(&format!("ws://{addr}/bad/x")).await;
    assert_eq!(status, 502, "{body}");
}

/// How long a reload may take to reach new connections in these tests.
const RELOADED: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_tls_on_and_off_on_the_same_socket_and_open_tunnels_carry_on() {
    let pki = Pki::new();
    pki.leaf("a", &["a.test"]);
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let plain = format!(
        "[gateway]\nworkers = 2\n[[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\n\
         [[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"{}\"]\n",
        backend.addr
    );
    let with_tls = plain.replace(
        "bind = \"127.0.0.1:0\"\n",
        "bind = \"127.0.0.1:0\"\ntls = { cert = \"a.pem\", key = \"a.key\" }\n",
    );
    let path = pki.path("config.toml");
    std::fs::write(&path, &plain).unwrap();
    let gw = gateway_watching(&path);
    let addr = gw.addr("edge").unwrap();
    let url = format!("ws://{addr}/");
    let mut plain_tunnel = connect(&url).await;
    let write = |text: &str| {
        let tmp = pki.path("config.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };

    // TLS on, same port: a TLS client gets through, a plain one no longer does.
    write(&with_tls);
    let mut wss = eventually("TLS is served after the reload", RELOADED, || async {
        let connector = tokio_rustls::TlsConnector::from(pki.client_config());
        let tcp = TcpStream::connect(addr).await.ok()?;
        let name = ServerName::try_from("a.test").unwrap();
        let stream = tokio::time::timeout(Duration::from_secs(1), connector.connect(name, tcp))
            .await
            .ok()?
            .ok()?;
        let (ws, _) = tokio_tungstenite::client_async("wss://a.test/", stream)
            .await
            .ok()?;
        Some(ws)
    })
    .await;
    let forwarded_proto = || backend.last().headers.get("x-forwarded-proto").cloned();
    echoes(&mut wss, "over tls").await;
    assert_eq!(forwarded_proto().as_deref(), Some("https"));
    eventually("a plain client is refused", RELOADED, || async {
        tokio::time::timeout(STEP, tokio_tungstenite::connect_async(&url))
            .await
            .expect("an answer in time")
            .is_err()
            .then_some(())
    })
    .await;
    // The tunnel accepted before the change is still plain and still flows.
    echoes(&mut plain_tunnel, "plain").await;

    // TLS off again: plain clients are served, the TLS tunnel carries on.
    write(&plain);
    let mut again = eventually("plain is served again", RELOADED, || async {
        tokio::time::timeout(STEP, tokio_tungstenite::connect_async(&url))
            .await
            .ok()?
            .ok()
            .map(|(ws, _)| ws)
    })
    .await;
    echoes(&mut again, "plain again").await;
    assert_eq!(forwarded_proto().as_deref(), Some("http"));
    echoes(&mut wss, "still tls").await;
}

/// Sends `text` and expects it back.
async fn echoes<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_data(ws).await, Message::text(text));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_puts_a_server_behind_tls_dials_it_with_tls() {
    let pki = Pki::new();
    let backend = tls_backend(&pki).await;
    std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
    // max_fails = 0: the failures while the file says plain must not take the server out.
    let config = |server: &str| {
        format!(
            "[gateway]\nworkers = 1\n[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n\
             [upstream.u]\nca = \"ca.pem\"\nmax_fails = 0\nservers = [\"{server}\"]\n"
        )
    };
    let path = pki.path("config.toml");
    std::fs::write(&path, config(&format!("ws://{backend}"))).unwrap();
    let gw = gateway_watching(&path);
    let url = format!("ws://{}/", gw.listeners[0].addr);
    let (status, body) = refused_status(&url).await;
    assert_eq!(status, 502, "a plain dial to a TLS server: {body}");
    // The same address, now with wss://.
    let tmp = pki.path("config.toml.tmp");
    std::fs::write(&tmp, config(&format!("wss://{backend}"))).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let mut ws = eventually("the server is dialled with TLS", RELOADED, || async {
        Some(tokio_tungstenite::connect_async(&url).await.ok()?.0)
    })
    .await;
    echoes(&mut ws, "over TLS now").await;
}
