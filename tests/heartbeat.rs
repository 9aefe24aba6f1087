//! Heartbeats on both legs: the gateway's pings, dead-leg detection, and what each leg is
//! told when its peer dies.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const FAST: &str = "ping_interval = \"200ms\"\npong_timeout = \"300ms\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_stops_answering_gets_the_client_a_1011_in_time() {
    let backend = WsBackend::start("wedged", Behavior::Silent).await;
    let gw = gateway(&simple_config(1, FAST), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    let started = Instant::now();
    let (code, reason) = close_code(&mut ws).await;
    let took = started.elapsed();
    assert_eq!((code, reason.as_str()), (1011, "backend stopped answering"));
    // Within ping_interval + pong_timeout, plus scheduling slack.
    assert!(
        took >= Duration::from_millis(450),
        "closed too early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(500 + 1500),
        "closed too late: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_pings_the_client_and_consumes_the_pong() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, FAST), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    let mut pings = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while pings < 3 && Instant::now() < deadline {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Ping(payload) => {
                assert_eq!(payload.as_ref(), b"wsgate-hb");
                pings += 1;
            }
            other => panic!("only pings expected, got {other:?}"),
        }
    }
    assert_eq!(
        pings, 3,
        "the client answers (tungstenite pongs), so the tunnel lives on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_and_the_backend_told_1001() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(&simple_config(1, FAST), &[backend.addr]);
    let gateway_addr = addr(&gw);
    // A client that upgrades and then never reads nor answers pings.
    let mut raw = TcpStream::connect(gateway_addr).await.unwrap();
    raw.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: {gateway_addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // The gateway ends the tunnel: the client's socket is closed within the deadline.
    let started = Instant::now();
    let mut sink = vec![0u8; 4096];
    loop {
        match tokio::time::timeout(STEP, raw.read(&mut sink))
            .await
            .expect("socket closed in time")
        {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The backend was told why its peer is gone.
    assert_eq!(backend.handshakes(), 1);
    assert_eq!(backend.first_close().await, 1001);
}
