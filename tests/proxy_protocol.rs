//! Client addresses behind balancers: the PROXY protocol (v1 and v2) from trusted L4
//! balancers, X-Forwarded-For from trusted L7 ones, and replicas agreeing on backends.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn v1(source: Ipv4Addr, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {source} 127.0.0.1 {port} 80\r\n").into_bytes()
}

fn v2(source: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&source.octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

fn config(listener_extra: &str, balance: &str, servers: usize) -> String {
    let list: Vec<String> = (1..=servers)
        .map(|i| format!("\"{{BACKEND_{i}}}\""))
        .collect();
    format!(
        "[gateway]\nworkers = 1\n[[listener]]\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[route]]\nupstream = \"u\"\n[upstream.u]\nbalance = \"{balance}\"\nservers = [{}]\n",
        list.join(", ")
    )
}

/// A WebSocket through the gateway, preceded by `preamble` on the raw connection.
async fn connect_with(
    gateway: SocketAddr,
    preamble: &[u8],
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, String> {
    let mut tcp = TcpStream::connect(gateway).await.unwrap();
    tcp.write_all(preamble).await.unwrap();
    let request = format!("ws://{gateway}/").into_client_request().unwrap();
    match tokio::time::timeout(STEP, tokio_tungstenite::client_async(request, tcp)).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_and_v2_addresses_become_the_client_address() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &config(
            "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]",
            "round_robin",
            1,
        ),
        &[backend.addr],
    );
    for (header, source) in [
        (v1(Ipv4Addr::new(203, 0, 113, 7), 5555), "203.0.113.7"),
        (v2(Ipv4Addr::new(198, 51, 100, 9), 40000), "198.51.100.9"),
    ] {
        let mut ws = connect_with(addr(&gw), &header)
            .await
            .expect("handshake after the PROXY header");
        assert_eq!(whoami(&mut ws).await, "b");
        let seen = backend.last();
        assert_eq!(
            seen.headers.get("x-forwarded-for").map(String::as_str),
            Some(source)
        );
        assert_eq!(
            seen.headers.get("x-real-ip").map(String::as_str),
            Some(source)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_sources_and_malformed_headers_are_refused_and_counted() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let untrusted = gateway(
        &config(
            "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]",
            "round_robin",
            1,
        ),
        &[backend.addr],
    );
    assert!(
        connect_with(addr(&untrusted), &v1(Ipv4Addr::new(203, 0, 113, 7), 1))
            .await
            .is_err()
    );
    let gw = gateway(
        &config(
            "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]",
            "round_robin",
            1,
        ),
        &[backend.addr],
    );
    let mut raw = TcpStream::connect(addr(&gw)).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(STEP, raw.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    assert!(
        answer.is_empty(),
        "a request without PROXY header gets no answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(backend.handshakes(), 0);
    for (name, g) in [("untrusted source", &untrusted), ("no header", &gw)] {
        // The refusal is counted on the worker thread; give it a moment to be seen here.
        let deadline = std::time::Instant::now() + STEP;
        loop {
            let text = g.shared().metrics.render(g.shared());
            if text.contains("wsgate_proxy_protocol_refused_total 1") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: refusal not counted\n{text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_an_l4_balancer_send_each_client_to_the_same_backend() {
    let backends = [
        WsBackend::start("b1", Behavior::Echo).await,
        WsBackend::start("b2", Behavior::Echo).await,
        WsBackend::start("b3", Behavior::Echo).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let text = config(
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]",
        "consistent_hash",
        3,
    );
    let replica_a = gateway(&text, &addrs);
    let replica_b = gateway(&text, &addrs);
    let mut spread = std::collections::HashSet::new();
    for i in 0..60u8 {
        let source = Ipv4Addr::new(100, 64, i / 16, 1 + i % 16);
        let a = whoami(
            &mut connect_with(addr(&replica_a), &v2(source, 1000))
                .await
                .unwrap(),
        )
        .await;
        let b = whoami(
            &mut connect_with(addr(&replica_b), &v1(source, 2000))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(a, b, "client {source}");
        spread.insert(a);
    }
    assert_eq!(spread.len(), 3, "60 clients reach all backends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_from_a_trusted_l7_balancer_names_the_client() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &config("real_ip_from = [\"127.0.0.1\"]", "round_robin", 1),
        &[backend.addr],
    );
    let mut request = format!("ws://{}/", addr(&gw))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("x-forwarded-for", "198.51.100.4".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(whoami(&mut ws).await, "b");
    let seen = backend.last();
    assert_eq!(
        seen.headers.get("x-real-ip").map(String::as_str),
        Some("198.51.100.4")
    );
    assert_eq!(
        seen.headers.get("x-forwarded-for").map(String::as_str),
        Some("198.51.100.4, 127.0.0.1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_trusted_proxies_applies_to_the_next_connection() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let text = |trusted: &str| {
        config(
            &format!("name = \"edge\"\nproxy_protocol = true\ntrusted_proxies = [\"{trusted}\"]"),
            "round_robin",
            1,
        )
        .replace("{BACKEND_1}", &backend.addr.to_string())
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text("10.0.0.0/8")).unwrap();
    let gw = gateway_watching(&path);
    let edge = gw.addr("edge").unwrap();
    let header = v1(Ipv4Addr::new(203, 0, 113, 7), 5555);
    assert!(
        connect_with(edge, &header).await.is_err(),
        "untrusted at first"
    );

    // The balancer's address is added to the file: the same socket now takes its header.
    std::fs::write(&path, text("127.0.0.0/8")).unwrap();
    let mut ws = eventually(
        "trusted_proxies applied",
        std::time::Duration::from_secs(3),
        || async { connect_with(edge, &header).await.ok() },
    )
    .await;
    assert_eq!(whoami(&mut ws).await, "b");
    assert_eq!(
        backend
            .last()
            .headers
            .get("x-forwarded-for")
            .map(String::as_str),
        Some("203.0.113.7")
    );
}
