//! Frames through a tunnel: data, large and fragmented messages, control frames, close
//! codes both ways, subprotocols, limits.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_binary_and_large_messages_round_trip() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/chat", addr(&gw))).await;

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("hello"));

    let binary: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(binary));

    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await.into_data().as_ref(), &big[..]);

    let big_text = "ü".repeat(512 * 1024); // 1 MiB of two-byte characters
    ws.send(Message::text(big_text.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text(big_text));

    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_keep_their_order() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    for i in 0..2000 {
        ws.feed(Message::text(i.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..2000 {
        assert_eq!(next_data(&mut ws).await, Message::text(i.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_then_reads_again_gets_every_message_in_order() {
    // More than every socket buffer on the way and back holds (~40 MiB on loopback), so
    // back-pressure stops each leg in turn: the client's unread echoes stop the gateway
    // writing to it, then reading the backend, whose blocked echoes stop it reading, so the
    // gateway's writes to it stop, then its reads of the client, then the client's writes.
    // Reading again must wake each of them back in that order: a leg whose socket became
    // writable again restarts the other leg's reads.
    const COUNT: usize = 1024;
    const SIZE: usize = 64 * 1024;
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    // No heartbeat within the test: a ping wakes both legs and would hide a stall.
    let gw = gateway(
        &simple_config(1, "max_buffer = \"16KiB\"\nping_interval = \"5m\""),
        &[backend.addr],
    );
    let ws = connect(&format!("ws://{}/", addr(&gw))).await;
    let (mut tx, mut rx) = ws.split();
    let message = |i: usize| {
        let mut payload = vec![(i % 251) as u8; SIZE];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        Message::binary(payload)
    };
    let writer = tokio::spawn(async move {
        for i in 0..COUNT {
            tx.send(message(i)).await.unwrap();
        }
        tx
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !writer.is_finished(),
        "the client could write all {COUNT} messages without reading: nothing held it back"
    );
    let read_all = async {
        for i in 0..COUNT {
            match rx.next().await {
                Some(Ok(got)) => assert!(got == message(i), "message {i} differs"),
                other => panic!("message {i}: {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("the tunnel stalled after the client read again");
    let mut tx = writer.await.unwrap();
    tx.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_code_and_reason_pass_from_client_to_backend_and_back() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye-4001".into(),
    })))
    .await
    .unwrap();
    // tungstenite's backend echoes the close code in its reply; the gateway relays it.
    assert_eq!(close_code(&mut ws).await, (4001, "bye-4001".to_string()));
    // The gateway then ends the TCP connection (RFC 6455 §7.1.1: the server closes first).
    let end = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("TCP end in time");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
}

/// RFC 6455 §7.1.1: after the close handshake the server ends TCP first and holds
/// TIME_WAIT. Toward the backend the gateway is the client: it waits for the backend's
/// end instead of closing first (which would hold one of its own ports toward the backend
/// for a minute per tunnel), and toward the client it is the server: the client's TCP
/// ends at once, not when the backend gets round to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_backend_closes_the_gateway_leaves_ending_tcp_to_the_backend() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let gw = gateway(&simple_config(1, ""), &[backend_addr]);
    let (client_done_tx, client_done) = tokio::sync::oneshot::channel::<()>();
    let backend = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let head = read_head(&mut stream).await;
        accept_upgrade(&mut stream, &head, "").await;
        // The backend closes the WebSocket (1001, unmasked)...
        stream.write_all(&[0x88, 0x02, 0x03, 0xE9]).await.unwrap();
        // ...and gets the client's reply (masked, the code echoed).
        let reply = read_exactly(&mut stream, 8).await;
        assert_eq!(reply[..2], [0x88, 0x82], "a masked close reply");
        // The client's TCP ends while the backend still holds its own leg open.
        tokio::time::timeout(STEP, client_done)
            .await
            .expect("the client's TCP ended in time")
            .unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
        assert!(
            read.is_err(),
            "the gateway ended TCP toward the backend before the backend did: {read:?}"
        );
        // Now the backend ends TCP, as a server does.
    });
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    let close = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("a close in time");
    assert!(
        matches!(close, Some(Ok(Message::Close(Some(_))))),
        "{close:?}"
    );
    // The reply goes out with the next poll; then the TCP end, well before the gateway's
    // close deadline (5 s) would force it.
    let end = tokio::time::timeout(Duration::from_secs(3), ws.next())
        .await
        .expect("the client's TCP ends without waiting for the backend");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
    client_done_tx.send(()).unwrap();
    backend.await.unwrap();
    // The tunnel ends once the backend has ended TCP.
    eventually("the tunnel ended", STEP, || async {
        gw.shared().registry.is_empty().then_some(())
    })
    .await;
}

/// The close handshake that a client starts ends with the gateway's Close reply and its
/// FIN in one TCP segment, as HAProxy sends them, not two. Counted on the client's socket:
/// the segments it received from its Close until its read saw the end of TCP. The
/// gateway's ACK of the client's Close rides on the reply unless the reply takes longer
/// than the delayed-ACK time (40 ms on Linux), so the fewest of three tunnels counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_reply_and_the_fin_reach_the_client_in_one_segment() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut fewest = u32::MAX;
    for _ in 0..3 {
        let mut client = RawClient::connect(addr(&gw)).await;
        let before = test_sockets::tcp_segments_received(&client.0);
        client.send_frame(true, 0x8, &1000u16.to_be_bytes()).await;
        let mut rest = Vec::new();
        tokio::time::timeout(STEP, client.0.read_to_end(&mut rest))
            .await
            .expect("the gateway ended TCP in time")
            .unwrap();
        assert_eq!(
            rest,
            [0x88, 0x02, 0x03, 0xE8],
            "the close reply, then the end of TCP"
        );
        fewest = fewest.min(test_sockets::tcp_segments_received(&client.0) - before);
    }
    assert_eq!(
        fewest, 1,
        "segments from the client's Close to the end of TCP"
    );
}

/// Opens a WebSocket through `gateway` with `frames` right behind the upgrade request, in
/// one write; returns the socket once the gateway's 101 is read.
async fn upgrade_with(gateway: std::net::SocketAddr, frames: &[u8]) -> TcpStream {
    let mut request = format!(
        "GET / HTTP/1.1\r\nHost: {gateway}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(frames);
    let mut client = TcpStream::connect(gateway).await.unwrap();
    client.write_all(&request).await.unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client
}

/// A gateway in front of a raw backend that answers the upgrade with `frames` right behind
/// its 101, in one write, and then hands back the first `n` bytes the gateway sends it.
fn gateway_to_raw_backend(
    frames: Vec<u8>,
    n: usize,
) -> (GatewayThread, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let gw = gateway(&simple_config(1, ""), &[listener.local_addr().unwrap()]);
    let backend = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (mut stream, _) = listener.accept().await.unwrap();
        let head = read_head(&mut stream).await;
        accept_upgrade_with(&mut stream, &head, "", &frames).await;
        read_exactly(&mut stream, n).await
    });
    (gw, backend)
}

/// The code of a close frame a client sent (masked): 2 header bytes, 4 of mask, the code.
fn masked_close_code(frame: &[u8]) -> u16 {
    assert_eq!(frame[0], 0x88, "a close frame: {frame:?}");
    assert_eq!(frame[1] & 0x80, 0x80, "masked, as from a client: {frame:?}");
    u16::from_be_bytes([frame[6] ^ frame[2], frame[7] ^ frame[3]])
}

/// The code of a close frame a server sent (unmasked).
fn close_code_of(frame: &[u8]) -> u16 {
    assert_eq!(frame[0], 0x88, "a close frame: {frame:?}");
    u16::from_be_bytes([frame[2], frame[3]])
}

/// Frames that come in the same write as a handshake (the client's right behind its
/// upgrade request, the backend's right behind its 101) are read with the handshake and
/// relayed like any other, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_come_with_the_handshakes_are_relayed() {
    // "hi there", masked with 0x01020304 as a client must.
    let mask = [1u8, 2, 3, 4];
    let mut from_client = vec![0x81, 0x88];
    from_client.extend_from_slice(&mask);
    from_client.extend(b"hi there".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let from_backend = [&[0x81u8, 16][..], b"from the backend"].concat();
    let (gw, backend) = gateway_to_raw_backend(from_backend.clone(), from_client.len());
    let mut client = upgrade_with(addr(&gw), &from_client).await;
    assert_eq!(
        read_exactly(&mut client, from_backend.len()).await,
        from_backend,
        "the backend's frame reached the client"
    );
    let got = tokio::time::timeout(STEP, backend).await.unwrap().unwrap();
    assert_eq!(got, from_client, "the client's frame reached the backend");
}

/// A broken frame right behind the upgrade request (unmasked, from a client) ends the
/// tunnel as it would later on: a 1002 close to the client, a 1001 close to the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_frame_that_comes_with_the_upgrade_gets_the_client_a_1002() {
    let (gw, backend) = gateway_to_raw_backend(Vec::new(), 8);
    let unmasked = [0x81, 0x02, b'h', b'i'];
    let mut client = upgrade_with(addr(&gw), &unmasked).await;
    assert_eq!(close_code_of(&read_exactly(&mut client, 4).await), 1002);
    let to_backend = tokio::time::timeout(STEP, backend).await.unwrap().unwrap();
    assert_eq!(masked_close_code(&to_backend), 1001);
}

/// A backend that breaks the protocol (a masked frame: servers never mask), right behind
/// its 101, fails the tunnel as it would later on: a 1014 close to the client, a 1002
/// close to the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_frame_that_comes_with_the_101_gets_the_client_a_1014() {
    let masked = vec![0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    let (gw, backend) = gateway_to_raw_backend(masked, 8);
    let mut client = upgrade_with(addr(&gw), &[]).await;
    assert_eq!(close_code_of(&read_exactly(&mut client, 4).await), 1014);
    let to_backend = tokio::time::timeout(STEP, backend).await.unwrap().unwrap();
    assert_eq!(masked_close_code(&to_backend), 1002);
}

/// A backend that never answers the close handshake holds the tunnel only until the close
/// deadline (5 s): then both legs' TCP ends and the tunnel is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_the_backend_never_answers_ends_at_the_close_deadline() {
    let backend = WsBackend::start("mute", Behavior::Silent).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    let started = std::time::Instant::now();
    ws.send(Message::Close(None)).await.unwrap();
    let end = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("the gateway ends the tunnel within the close deadline");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "ended before the close deadline: {:?}",
        started.elapsed()
    );
    eventually("the tunnel ended", STEP, || async {
        gw.shared().registry.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_close_code_reaches_the_client() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    ws.send(Message::text("close 4002")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, (4002, "bye 4002".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_ping_reaches_the_backend_and_its_pong_comes_back() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    ws.send(Message::Ping(Bytes::from_static(b"app-ping")))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Pong(payload) => {
                assert_eq!(payload.as_ref(), b"app-ping");
                break;
            }
            Message::Ping(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_chosen_subprotocol_reaches_the_client() {
    let backend = WsBackend::start_with("b1", Behavior::Echo, Some("v2.chat")).await;
    let gw = gateway(&simple_config(1, ""), &[backend.addr]);
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/",
            addr(&gw)
        ))
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "v1.chat, v2.chat".parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "v2.chat"
    );
    assert_eq!(
        backend
            .last()
            .headers
            .get("sec-websocket-protocol")
            .map(String::as_str),
        Some("v1.chat, v2.chat")
    );
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_closed_with_1009() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let gw = gateway(
        &simple_config(
            1,
            "max_frame_size = \"64KiB\"\nmax_message_size = \"100KiB\"",
        ),
        &[backend.addr],
    );
    // One frame over max_frame_size.
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    ws.send(Message::binary(vec![0u8; 64 * 1024 + 1]))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1009);

    // Frames under the limit, but a fragmented message over max_message_size.
    let mut raw = RawClient::connect(addr(&gw)).await;
    raw.send_frame(false, 0x2, &[1u8; 60 * 1024]).await;
    raw.send_frame(true, 0x0, &[2u8; 60 * 1024]).await;
    let (opcode, payload) = raw.read_frame_skipping_pings().await;
    assert_eq!(opcode.1, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009);
}

/// A fragmented message keeps its frame boundaries through the gateway (no reassembly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_are_relayed_with_their_boundaries() {
    // actix-ws echoes fragments 1:1, so what comes back shows what the backend received.
    let (backend_addr, _backend) = demo_backend();
    let gw = gateway(&simple_config(1, ""), &[backend_addr]);
    let mut raw = RawClient::connect(addr(&gw)).await;
    let hello = raw.read_frame_skipping_pings().await;
    assert_eq!(hello.0, (true, 0x1), "the demo backend greets first");

    raw.send_frame(false, 0x1, b"frag-one ").await;
    raw.send_frame(false, 0x0, b"frag-two ").await;
    raw.send_frame(true, 0x0, b"frag-three").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let ((fin, opcode), payload) = raw.read_frame_skipping_pings().await;
        got.push((fin, opcode, String::from_utf8(payload).unwrap()));
    }
    assert_eq!(
        got,
        [
            (false, 0x1, "frag-one ".to_string()),
            (false, 0x0, "frag-two ".to_string()),
            (true, 0x0, "frag-three".to_string()),
        ]
    );
}

/// The demo's actix-ws echo backend on its own thread.
fn demo_backend() -> (std::net::SocketAddr, DemoBackendThread) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let backend = wsgate::demo::EchoBackend::start("demo").unwrap();
            tx.send(backend.addr).unwrap();
            let _ = stop_rx.await;
            backend.stop().await;
        });
    });
    let addr = rx.recv_timeout(STEP).unwrap();
    (addr, DemoBackendThread(Some(stop_tx), Some(thread)))
}

struct DemoBackendThread(
    Option<tokio::sync::oneshot::Sender<()>>,
    Option<std::thread::JoinHandle<()>>,
);

impl Drop for DemoBackendThread {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.1.take() {
            let _ = thread.join();
        }
    }
}

/// A WebSocket client on a raw socket, to send and see individual frames.
struct RawClient(TcpStream);

impl RawClient {
    async fn connect(gateway: std::net::SocketAddr) -> RawClient {
        let mut stream = TcpStream::connect(gateway).await.unwrap();
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {gateway}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(STEP, stream.read_exact(&mut byte))
                .await
                .unwrap()
                .unwrap();
            head.push(byte[0]);
            assert!(head.len() < 8192);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        RawClient(stream)
    }

    async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut frame = vec![(u8::from(fin) << 7) | opcode];
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&frame).await.unwrap();
    }

    /// ((fin, opcode), payload) of the next frame that is not a ping.
    async fn read_frame_skipping_pings(&mut self) -> ((bool, u8), Vec<u8>) {
        loop {
            let mut head = [0u8; 2];
            tokio::time::timeout(STEP, self.0.read_exact(&mut head))
                .await
                .unwrap()
                .unwrap();
            let len = match head[1] & 0x7f {
                126 => {
                    let mut ext = [0u8; 2];
                    self.0.read_exact(&mut ext).await.unwrap();
                    u16::from_be_bytes(ext) as usize
                }
                127 => {
                    let mut ext = [0u8; 8];
                    self.0.read_exact(&mut ext).await.unwrap();
                    u64::from_be_bytes(ext) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            self.0.read_exact(&mut payload).await.unwrap();
            let opcode = head[0] & 0x0f;
            if opcode != 0x9 {
                return ((head[0] & 0x80 != 0, opcode), payload);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_quiet_tunnel_but_heartbeats_do_not_keep_it_open() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let gw = gateway(
        &simple_config(1, "ping_interval = \"100ms\"\nidle_timeout = \"400ms\""),
        &[backend.addr],
    );
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    let started = std::time::Instant::now();
    // tungstenite answers the gateway's pings, so both legs stay alive but idle.
    let (code, reason) = close_code(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}
