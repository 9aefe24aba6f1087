//! Picking backends by health and load, and what happens when one dies: passive health
//! (max_fails/fail_timeout), least_conn, bounded-load consistent hashing, a backend dying
//! mid-stream, back-pressure toward a client that stops reading, and checks added by reload.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

fn upstream_config(servers: &str, upstream_extra: &str, defaults: &str) -> String {
    format!(
        "[gateway]\nworkers = 1\n[defaults]\n{defaults}\n[[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[route]]\nupstream = \"u\"\n[upstream.u]\n{upstream_extra}\nservers = [{servers}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_fails_takes_a_server_out_for_fail_timeout_then_it_comes_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &upstream_config(
            &format!("\"127.0.0.1:{port}\", \"{{BACKEND_1}}\""),
            "max_fails = 2\nfail_timeout = \"700ms\"",
            "",
        ),
        &[b.addr],
    );
    let url = format!("ws://{}/", addr(&gw));
    // Server a is down: every tunnel fails over to b, and a is out after two failures.
    for _ in 0..4 {
        assert_eq!(whoami(&mut connect(&url).await).await, "b");
    }
    // a comes back on its port, but stays out of rotation until fail_timeout has passed.
    let a = WsBackend::start_on(port, "a").await;
    let out_since = Instant::now();
    for _ in 0..4 {
        assert_eq!(
            whoami(&mut connect(&url).await).await,
            "b",
            "a must stay out for fail_timeout"
        );
    }
    assert!(
        out_since.elapsed() < Duration::from_millis(600),
        "the check above took too long to mean anything"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(whoami(&mut connect(&url).await).await);
    }
    assert!(
        names.iter().any(|n| n == "a"),
        "a is back after fail_timeout: {names:?}"
    );
    assert!(a.handshakes() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_places_new_tunnels_on_the_least_loaded_server() {
    let a = WsBackend::start("a", Behavior::Echo).await;
    let b = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &upstream_config(
            "\"{BACKEND_1}\", \"{BACKEND_2}\"",
            "balance = \"least_conn\"",
            "",
        ),
        &[a.addr, b.addr],
    );
    let url = format!("ws://{}/", addr(&gw));
    let mut held: HashMap<String, Vec<_>> = HashMap::new();
    for _ in 0..6 {
        let mut ws = connect(&url).await;
        let name = whoami(&mut ws).await;
        held.entry(name).or_default().push(ws);
    }
    assert_eq!(
        (held["a"].len(), held["b"].len()),
        (3, 3),
        "equal load alternates"
    );
    // Close three of a's tunnels: the next three go to a.
    for mut ws in held.get_mut("a").unwrap().drain(..) {
        ws.close(None).await.unwrap();
        let _ = close_code(&mut ws).await;
    }
    let deadline = Instant::now() + STEP;
    for _ in 0..3 {
        loop {
            let mut ws = connect(&url).await;
            match whoami(&mut ws).await.as_str() {
                "a" => break,
                _ => {
                    // The gateway may not have seen the closes yet; give it a moment.
                    assert!(
                        Instant::now() < deadline,
                        "new tunnels did not go to the idle server"
                    );
                    drop(ws);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_load_hashing_caps_every_server_for_1000_client_addresses() {
    let backends = [
        WsBackend::start("s1", Behavior::Echo).await,
        WsBackend::start("s2", Behavior::Echo).await,
        WsBackend::start("s3", Behavior::Echo).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    // The weight-2 server owns about half of the ring: without the bound it would take
    // about 490 of the 1,000 clients.
    let gw = gateway(
        &upstream_config(
            "\"{BACKEND_1}\", { addr = \"{BACKEND_2}\", weight = 2 }, \"{BACKEND_3}\"",
            "balance = \"consistent_hash\"\nhash_balance_factor = 1.25",
            "",
        ),
        &addrs,
    );
    let texts: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let ring =
        wsgate::pool::KetamaRing::new(texts.iter().zip([1, 2, 1]).map(|(t, w)| (t.as_str(), w)));
    let mut held = Vec::new();
    let mut per_server: HashMap<String, usize> = HashMap::new();
    let mut ring_owner: HashMap<String, usize> = HashMap::new();
    for i in 0..1000u32 {
        let client = IpAddr::V4(Ipv4Addr::new(127, 1 + (i / 250) as u8, (i % 250) as u8, 1));
        let mut ws = connect_from(client, addr(&gw), "/").await;
        let name = whoami(&mut ws).await;
        *per_server.entry(name).or_default() += 1;
        let owner = backends[ring.order(client.to_string().as_bytes())[0]]
            .name
            .clone();
        *ring_owner.entry(owner).or_default() += 1;
        held.push(ws);
    }
    let bound = (1000f64 * 1.25 / 3.0).ceil() as usize;
    assert!(
        ring_owner["s2"] > bound,
        "the test needs an unbalanced ring: {ring_owner:?}"
    );
    for (name, n) in &per_server {
        assert!(*n <= bound, "{name} holds {n} > {bound}: {per_server:?}");
    }
    assert!(
        per_server["s2"] >= bound - 20,
        "keys stay on their server up to the bound: {per_server:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_dies_mid_stream_gets_the_client_a_1011_at_once() {
    let backend = WsBackend::start("dies", Behavior::DropOnMessage).await;
    let gw = gateway(&upstream_config("\"{BACKEND_1}\"", "", ""), &[backend.addr]);
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    ws.send(Message::text("bye")).await.unwrap();
    let started = Instant::now();
    assert_eq!(close_code(&mut ws).await.0, 1011);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_back_the_backend_within_max_buffer() {
    let backend = WsBackend::start("flood", Behavior::Flood(100 << 20)).await;
    let gw = gateway(
        &upstream_config("\"{BACKEND_1}\"", "", "max_buffer = \"64KiB\""),
        &[backend.addr],
    );
    // Upgrade, then never read again.
    let _ws = connect(&format!("ws://{}/", addr(&gw))).await;
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        peak = peak.max(gw.shared().buffered.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = backend.sent.load(Ordering::Relaxed);
    assert!(peak > 0, "the gateway never had to hold anything back");
    assert!(
        peak <= 64 * 1024,
        "buffered {peak} bytes for a tunnel limited to 64 KiB"
    );
    assert!(
        sent < 100 << 20,
        "the backend was not held back: it sent {sent} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_a_server_out_and_bring_it_back() {
    let mute = WsBackend::start("mute", Behavior::Mute).await;
    let port = mute.addr.port();
    let b = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &upstream_config(
            "\"{BACKEND_1}\", \"{BACKEND_2}\"",
            "health_check = { interval = \"100ms\", timeout = \"100ms\", rise = 2, fall = 2, probe = \"websocket\", path = \"/health\" }",
            "handshake_timeout = \"5s\"",
        ),
        &[mute.addr, b.addr],
    );
    let server_a = || {
        let snapshot = gw.shared().snapshot.load();
        std::sync::Arc::clone(&snapshot.pools["u"].servers[0])
    };
    let wait_for = |want: bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(3);
        while server_a().healthy() != want {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(
        false,
        "a server that never answers the upgrade probe is taken out",
    );
    let url = format!("ws://{}/", addr(&gw));
    for _ in 0..4 {
        let started = Instant::now();
        assert_eq!(whoami(&mut connect(&url).await).await, "b");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the down server was tried"
        );
    }
    drop(mute);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = WsBackend::start_on(port, "a").await;
    wait_for(true, "a server that answers again comes back");
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(whoami(&mut connect(&url).await).await);
    }
    assert!(names.iter().any(|n| n == "a"), "{names:?}");
    assert!(
        a.seen.lock().unwrap().iter().any(|s| s.path == "/health"),
        "probes use the configured path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_process_killed_with_sigkill_during_traffic_gets_clients_a_1011() {
    use std::io::BufRead;
    // A real backend process: `wsgate demo` runs echo backends; it prints their addresses.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut demo = Process::new(
        std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Read its output on a thread that keeps the pipe open (a closed pipe would make the
    // demo's next print fail).
    let stdout = demo.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("backends:") {
                let _ = line_tx.send(line);
            }
        }
    });
    let line = line_rx
        .recv_timeout(STEP)
        .expect("the demo prints its backends");
    // "  backends:  backend-1 (127.0.0.1:PORT), backend-2 (...)"
    let backend: std::net::SocketAddr = line
        .split('(')
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let gw = gateway(&upstream_config("\"{BACKEND_1}\"", "", ""), &[backend]);
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut ws = connect(&format!("ws://{}/ws", addr(&gw))).await;
        let greeting = next_data(&mut ws).await.into_text().unwrap().to_string();
        assert!(greeting.starts_with("connected to backend-1"), "{greeting}");
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("ping"));
        clients.push(ws);
    }
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    for ws in clients.iter_mut() {
        assert_eq!(close_code(ws).await.0, 1011);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let _ = demo.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_close_ends_a_client_that_stops_reading_with_1008() {
    let backend = WsBackend::start("flood", Behavior::Flood(100 << 20)).await;
    let gw = gateway(
        &upstream_config(
            "\"{BACKEND_1}\"",
            "",
            "max_buffer = \"64KiB\"\nslow_consumer = \"close\"\nslow_consumer_timeout = \"300ms\"",
        ),
        &[backend.addr],
    );
    let mut ws = connect(&format!("ws://{}/", addr(&gw))).await;
    // Stop reading for longer than slow_consumer_timeout, then see how the tunnel ended.
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The frame in flight is finished first, so the close frame arrives intact.
    assert_eq!(close_code(&mut ws).await.0, 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_added_by_a_reload_starts_probing() {
    let mute = WsBackend::start("mute", Behavior::Mute).await;
    let b = WsBackend::start("b", Behavior::Echo).await;
    let text = |upstream_extra: &str| {
        upstream_config("\"{BACKEND_1}\", \"{BACKEND_2}\"", upstream_extra, "")
            .replace("{BACKEND_1}", &mute.addr.to_string())
            .replace("{BACKEND_2}", &b.addr.to_string())
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text("")).unwrap();
    let gw = gateway_watching(&path);
    // No upstream has a check: the checker sleeps its idle tick, the server stays in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mute_server = || {
        let snapshot = gw.shared().snapshot.load();
        std::sync::Arc::clone(&snapshot.pools["u"].servers[0])
    };
    assert!(mute_server().healthy());

    std::fs::write(
        &path,
        text("health_check = { interval = \"100ms\", timeout = \"100ms\", fall = 2, probe = \"websocket\" }"),
    )
    .unwrap();
    // Picked up within the idle tick (1 s) plus two failed probes.
    eventually(
        "the mute server taken out by the new check",
        Duration::from_secs(3),
        || async { (!mute_server().healthy()).then_some(()) },
    )
    .await;
}
