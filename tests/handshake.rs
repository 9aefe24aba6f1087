//! Upgrades: what the backend sees, which status each kind of failure answers, and
//! failover to the next server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_sees_forwarding_headers_and_the_clients_headers() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut request = format!("ws://{}/chat?room=7", addr(&gw))
        .into_client_request()
        .unwrap();
    let h = request.headers_mut();
    h.insert("host", "chat.example.com".parse().unwrap());
    h.insert("origin", "https://chat.example.com".parse().unwrap());
    h.insert("cookie", "session=abc".parse().unwrap());
    h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    h.insert(
        "sec-websocket-extensions",
        "permessage-deflate".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text("x")).await.unwrap();
    let _ = next_data(&mut ws).await;

    let seen = backend.last();
    let get = |k: &str| seen.headers.get(k).map(String::as_str);
    assert_eq!(seen.path, "/chat?room=7");
    assert_eq!(get("host"), Some("chat.example.com"));
    assert_eq!(get("origin"), Some("https://chat.example.com"));
    assert_eq!(get("cookie"), Some("session=abc"));
    assert_eq!(get("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
    assert_eq!(get("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(get("x-forwarded-proto"), Some("http"));
    assert_eq!(get("x-forwarded-host"), Some("chat.example.com"));
    assert_eq!(
        get("sec-websocket-extensions"),
        Some("permessage-deflate"),
        "a permessage-deflate offer passes (tests/compression.rs)"
    );
    assert_eq!(get("upgrade"), Some("websocket"));
    assert_eq!(get("sec-websocket-version"), Some("13"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_get_400_426_and_404_with_a_reason() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &simple_config(1, "").replace("path = \"/\"", "path = \"/ws/\""),
        &[backend.addr],
    );
    let a = addr(&gw);
    let upgrade = |extra: &str| {
        format!(
            "GET /ws/x HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
        )
    };
    let (status, _, body) = http(a, &upgrade("Sec-WebSocket-Version: 13\r\n")).await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("Sec-WebSocket-Key"),
        "{body:?}"
    );

    let (status, _, body) = http(
        a,
        &upgrade("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("Sec-WebSocket-Version"),
        "{body:?}"
    );

    // A key must be 16 bytes in canonical base64: too short, or with bits set past them.
    for key in ["c2hvcnQ=", "dGhlIHNhbXBsZSBub25jZR=="] {
        let (status, _, body) = http(
            a,
            &upgrade(&format!(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            )),
        )
        .await;
        assert_eq!(status, 400, "{key}");
        assert!(
            String::from_utf8_lossy(&body).contains("16 bytes of base64"),
            "{body:?}"
        );
    }
    let (status, _, body) = http(
        a,
        &format!(
            "GET /ws/x HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("Connection"),
        "{body:?}"
    );

    let (status, head, _) = http(
        a,
        &upgrade("Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
    )
    .await;
    assert_eq!(status, 426);
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );

    let (status, _, body) = http(
        a,
        &format!(
            "POST /ws/x HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 0\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("GET"), "{body:?}");

    let (status, body) = refused_status(&format!("ws://{a}/elsewhere")).await;
    assert_eq!(status, 404);
    assert!(body.contains("no route"), "{body}");
    assert_eq!(
        backend.handshakes(),
        0,
        "no bad handshake reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusal_passes_through_as_is() {
    let backend = WsBackend::start("b", Behavior::Refuse(403)).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let (status, _) = refused_status(&format!("ws://{}/", addr(&gw))).await;
    assert_eq!(status, 403);
    assert_eq!(
        backend.handshakes(),
        1,
        "a refusal is not retried elsewhere"
    );
}

/// A port that refuses connections: bound once, then released.
fn dead_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_server_is_skipped_for_the_next_one() {
    let live = WsBackend::start("live", Behavior::Echo).await;
    let gw = gateway(&simple_config(2, ""), &[dead_port(), live.addr]);
    for _ in 0..4 {
        let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
        ws.send(Message::text("whoami")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("live"));
    }
    assert_eq!(live.handshakes(), 4);
}

/// A server named by a host name rather than an IP address is looked up on every dial,
/// and each of its addresses is tried in turn (`localhost` may come first as `::1`, where
/// nothing listens: the IPv4 address after it takes the tunnel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_named_by_host_name_is_looked_up_and_dialled() {
    let live = WsBackend::start("live", Behavior::Echo).await;
    let by_name = simple_config(1, "").replace(
        "\"{BACKEND_1}\"",
        &format!("\"localhost:{}\"", live.addr.port()),
    );
    let gw = gateway(&by_name, &[]);
    for _ in 0..2 {
        assert_eq!(whoami_at(&format!("ws://{}/", addr(&gw))).await, "live");
    }
    assert_eq!(live.handshakes(), 2);
    // Every address of the name refuses: a failed dial, 502 (`/etc/hosts` answers for
    // `localhost`: no lookup leaves the machine).
    let refusing = simple_config(1, "").replace(
        "\"{BACKEND_1}\"",
        &format!("\"localhost:{}\"", dead_port().port()),
    );
    let gw = gateway(&refusing, &[]);
    let (status, _) = refused_status(&format!("ws://{}/", addr(&gw))).await;
    assert_eq!(status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_tunnels_only_when_the_other_servers_cannot() {
    let primary = WsBackend::start("primary", Behavior::Echo).await;
    let backup = WsBackend::start("backup", Behavior::Echo).await;
    let with_backup = simple_config(2, "").replace(
        "\"{BACKEND_2}\"",
        "{ addr = \"{BACKEND_2}\", backup = true }",
    );
    let gw = gateway(&with_backup, &[primary.addr, backup.addr]);
    for _ in 0..6 {
        assert_eq!(whoami_at(&format!("ws://{}/", addr(&gw))).await, "primary");
    }
    assert_eq!(backup.handshakes(), 0);
    // The only other server cannot be reached: the backup takes the tunnel.
    let gw = gateway(&with_backup, &[dead_port(), backup.addr]);
    for _ in 0..2 {
        assert_eq!(whoami_at(&format!("ws://{}/", addr(&gw))).await, "backup");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_host_gets_the_host_of_each_server_tried() {
    use tokio::io::AsyncWriteExt;
    let live = WsBackend::start("live", Behavior::Echo).await;
    // Round-robin tries the dead server first, with a request naming it; the live one
    // must get a request naming the live server, not one that still names the first.
    let gw = gateway(&simple_config(2, ""), &[dead_port(), live.addr]);
    let mut stream = tokio::net::TcpStream::connect(addr(&gw)).await.unwrap();
    stream
        .write_all(
            b"GET /no-host HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let seen = live.last();
    assert_eq!(seen.path, "/no-host");
    assert_eq!(
        seen.headers.get("host").map(String::as_str),
        Some(live.addr.to_string().as_str()),
        "the Host written for the live server: {:?}",
        seen.headers
    );
    assert_eq!(
        seen.headers.get("sec-websocket-key").map(String::as_str),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_servers_down_is_502() {
    let gw = gateway(&simple_config(2, ""), &[dead_port(), dead_port()]);
    let (status, body) = refused_status(&format!("ws://{}/", addr(&gw))).await;
    assert_eq!(status, 502);
    assert!(body.contains("no server could be reached"), "{body}");
    // A refused connect shows only at the first write (no SO_ERROR read after it), and is
    // still named the connect's failure.
    assert!(body.contains("connect: "), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_never_answers_the_upgrade_is_504_after_handshake_timeout() {
    let mute = WsBackend::start("mute", Behavior::Mute).await;
    let gw = gateway(
        &simple_config(1, "handshake_timeout = \"300ms\""),
        &[mute.addr],
    );
    let started = Instant::now();
    let (status, _) = refused_status(&format!("ws://{}/", addr(&gw))).await;
    assert_eq!(status, 504);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mute_server_is_followed_by_the_next_server() {
    let mute = WsBackend::start("mute", Behavior::Mute).await;
    let live = WsBackend::start("live", Behavior::Echo).await;
    let gw = gateway(
        &simple_config(2, "handshake_timeout = \"200ms\""),
        &[mute.addr, live.addr],
    );
    for _ in 0..2 {
        let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
        ws.send(Message::text("whoami")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("live"));
    }
}

/// Reads one response head (and its body, by Content-Length) from a raw connection.
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "connection closed"
        );
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head
}

/// A gateway routing host `ws.test` to `backend`, and a connection to it whose first
/// request was plain HTTP (a 404 for another host), so actix-http serves what follows.
async fn after_a_plain_request(
    backend: &WsBackend,
) -> (wsgate::GatewayThread, tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let gw = gateway(
        r#"
        [gateway]
        workers = 1
        [[listener]]
        name = "test"
        bind = "127.0.0.1:0"
        [[route]]
        host = "ws.test"
        path = "/"
        upstream = "u"
        [upstream.u]
        servers = ["{BACKEND_1}"]
        "#,
        &[backend.addr],
    );
    let mut stream = tokio::net::TcpStream::connect(addr(&gw)).await.unwrap();
    stream
        .write_all(b"GET /page HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await
        .unwrap();
    let head = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    (gw, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_after_a_plain_request_on_the_same_connection_is_tunnelled() {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let (_gw, mut stream) = after_a_plain_request(&backend).await;
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the accept key for the client's key: {head}"
    );
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    ws.send(Message::text("after keep-alive")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("after keep-alive"));
    assert_eq!(backend.handshakes(), 1);
}

/// The first request head is complete at its blank line, whenever that arrives: a head
/// sent in pieces is tunnelled, and a broken head is refused at once even before its blank
/// line (not left to the header timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_in_pieces_is_tunnelled_and_a_broken_unfinished_head_is_400_at_once() {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut stream = tokio::net::TcpStream::connect(addr(&gw)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let head = "GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    // Cut inside a header, right before the final CRLF, and between the two CRLFs.
    let cuts = [0, 20, head.len() - 4, head.len() - 2, head.len()];
    for piece in cuts.windows(2) {
        stream
            .write_all(&head.as_bytes()[piece[0]..piece[1]])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let answer = read_response(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    ws.send(Message::text("in pieces")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("in pieces"));

    let mut broken = tokio::net::TcpStream::connect(addr(&gw)).await.unwrap();
    broken
        .write_all(b"GET /chat HTTP/1.1\r\nHost ws.test\r\n")
        .await
        .unwrap();
    // 400, not the 408 of the header timeout (which is longer than this bound).
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut broken))
        .await
        .expect("a broken head is answered without waiting for its end");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(backend.handshakes(), 1);
}

/// A backend that reads one request head and answers it with `answer` (then closes).
async fn raw_backend(answer: Vec<u8>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(&answer).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upgrade_answers_are_502_with_the_reason() {
    let closes = raw_backend(Vec::new()).await;
    let wrong_accept = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: not-the-right-one=\r\n\r\n"
            .to_vec(),
    )
    .await;
    // The client offered no extension, so the backend may agree to none.
    let stray_extension = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
          Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
            .to_vec(),
    )
    .await;
    let mut huge = b"HTTP/1.1 101 Switching Protocols\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 40 * 1024));
    let huge = raw_backend(huge).await;
    for (backend, reason) in [
        (closes, "closed the connection before answering"),
        (wrong_accept, "Sec-WebSocket-Accept"),
        (huge, "larger than 32768 bytes"),
    ] {
        let gw = gateway(&simple_config(1, ""), &[backend]);
        let (status, body) = refused_status(&format!("ws://{}/", addr(&gw))).await;
        assert_eq!(status, 502, "{reason}: {body}");
        assert!(body.contains(reason), "{reason}: {body}");
    }
    // The gateway passes the client's key on, so the backend's fixed answer matches the key
    // of RFC 6455 §1.3 that this client sends (and no extension offer).
    let gw = gateway(&simple_config(1, ""), &[stray_extension]);
    let (status, _, body) = http(
        addr(&gw),
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("an extension that was not offered"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_upgrade_head_later_on_a_keep_alive_connection_never_reaches_the_backend() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let (_gw, mut stream) = after_a_plain_request(&backend).await;
    // Whichever layer stops it (actix-http's read limit or the proxy's own check), a head
    // over 32 KiB is answered 431 or cut, and the backend never sees it.
    let head = format!(
        "GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the connection is ended");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert_eq!(backend.handshakes(), 0);
}
