//! Routes and balancing through real sockets: prefix rewrite, host routing, round-robin
//! spread, consistent-hash stickiness by client address.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use common::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_rewrite_and_host_routing() {
    let chat = WsBackend::start("chat", Behavior::Echo).await;
    let other = WsBackend::start("other", Behavior::Echo).await;
    let gw = gateway(
        r#"
        [[listener]]
        bind = "127.0.0.1:0"
        [[route]]
        path = "/socket/"
        rewrite = "/"
        upstream = "chat"
        [[route]]
        host = "*.example.com"
        path = "/"
        upstream = "other"
        [upstream.chat]
        servers = ["{BACKEND_1}"]
        [upstream.other]
        servers = ["{BACKEND_2}"]
        "#,
        &[chat.addr, other.addr],
    );
    let a = addr(&gw);
    let mut ws = connect(&format!("ws://{a}/socket/room/1?x=y")).await;
    assert_eq!(whoami(&mut ws).await, "chat");
    assert_eq!(chat.last().path, "/room/1?x=y");

    let mut request = format!("ws://{a}/anything").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("host", "news.example.com:8080".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(whoami(&mut ws).await, "other");
    assert_eq!(other.last().path, "/anything");

    let (status, _) = refused_status(&format!("ws://{a}/anything")).await;
    assert_eq!(
        status, 404,
        "no host route for 127.0.0.1 and no catch-all route"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_by_weight() {
    let b1 = WsBackend::start("b1", Behavior::Echo).await;
    let b2 = WsBackend::start("b2", Behavior::Echo).await;
    let b3 = WsBackend::start("b3", Behavior::Echo).await;
    let gw = gateway(
        r#"
        [[listener]]
        bind = "127.0.0.1:0"
        [[route]]
        upstream = "u"
        [upstream.u]
        servers = ["{BACKEND_1}", { addr = "{BACKEND_2}", weight = 2 }, "{BACKEND_3}"]
        "#,
        &[b1.addr, b2.addr, b3.addr],
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
        *counts.entry(whoami(&mut ws).await).or_default() += 1;
    }
    assert_eq!(counts["b1"], 10);
    assert_eq!(counts["b2"], 20);
    assert_eq!(counts["b3"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_each_client_address_on_its_ring_server() {
    let backends = [
        WsBackend::start("b1", Behavior::Echo).await,
        WsBackend::start("b2", Behavior::Echo).await,
        WsBackend::start("b3", Behavior::Echo).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let gw = gateway(
        r#"
        [[listener]]
        bind = "127.0.0.1:0"
        [[route]]
        upstream = "u"
        [upstream.u]
        balance = "consistent_hash"
        hash_key = "remote_addr"
        servers = ["{BACKEND_1}", "{BACKEND_2}", "{BACKEND_3}"]
        "#,
        &addrs,
    );
    // The ring the gateway must follow (its golden tests pin it to nginx's).
    let texts: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let ring = wsgate::pool::KetamaRing::new(texts.iter().map(|t| (t.as_str(), 1)));
    let mut per_backend = [0usize; 3];
    for i in 0..60u8 {
        let client = IpAddr::V4(Ipv4Addr::new(127, 0, 10 + i / 50, 1 + i % 50));
        let expected = ring.order(client.to_string().as_bytes())[0];
        for _ in 0..2 {
            let mut ws = connect_from(client, addr(&gw), "/").await;
            assert_eq!(
                whoami(&mut ws).await,
                backends[expected].name,
                "client {client}"
            );
        }
        per_backend[expected] += 1;
    }
    assert!(
        per_backend.iter().all(|n| *n > 0),
        "60 clients should reach all 3 servers: {per_backend:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_a_query_parameter_or_a_cookie_follows_the_value_not_the_address() {
    let backends = [
        WsBackend::start("b1", Behavior::Echo).await,
        WsBackend::start("b2", Behavior::Echo).await,
        WsBackend::start("b3", Behavior::Echo).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let config = |key: &str| {
        format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n[upstream.u]\n\
             balance = \"consistent_hash\"\nhash_key = \"{key}\"\n\
             servers = [\"{{BACKEND_1}}\", \"{{BACKEND_2}}\", \"{{BACKEND_3}}\"]\n"
        )
    };
    let texts: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let ring = wsgate::pool::KetamaRing::new(texts.iter().map(|t| (t.as_str(), 1)));
    let expected = |key: &str| backends[ring.order(key.as_bytes())[0]].name.clone();

    // query:room: every client address in a room reaches the room's server.
    let gw = gateway(&config("query:room"), &addrs);
    let mut reached = std::collections::HashSet::new();
    for room in 0..20 {
        let room = format!("room-{room}");
        for host in [1, 2, 3] {
            let client = IpAddr::V4(Ipv4Addr::new(127, 0, 20, host));
            let mut ws = connect_from(client, addr(&gw), &format!("/chat?x=1&room={room}")).await;
            assert_eq!(
                whoami(&mut ws).await,
                expected(&room),
                "{room} from {client}"
            );
        }
        reached.insert(expected(&room));
    }
    assert_eq!(reached.len(), 3, "20 rooms should reach all 3 servers");
    // Without the parameter: the client's address, as with hash_key = "remote_addr".
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 20, 9));
    let mut ws = connect_from(client, addr(&gw), "/chat").await;
    assert_eq!(whoami(&mut ws).await, expected(&client.to_string()));

    // cookie:session, all from one address.
    let gw = gateway(&config("cookie:session"), &addrs);
    for user in 0..12 {
        let session = format!("s{user}");
        let mut request = format!("ws://{}/", addr(&gw))
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "cookie",
            format!("theme=dark; session={session}; lang=en")
                .parse()
                .unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(
            whoami(&mut ws).await,
            expected(&session),
            "session {session}"
        );
    }
}
