//! Edge protection: allowed origins (403), connection caps per route and in total (503
//! with Retry-After), per client address (429), and the open-file limit (503 too, rather
//! than running out of descriptors). Each limit answers before a backend is dialled, and
//! gives its place back when a tunnel ends.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn config(route_extra: &str, gateway_extra: &str) -> String {
    format!(
        "[gateway]\nworkers = 1\n{gateway_extra}\n[[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[route]]\nupstream = \"u\"\n{route_extra}\n[upstream.u]\nservers = [\"{{BACKEND_1}}\"]\n"
    )
}

/// Sends an upgrade to `a` and checks it is refused as a full gateway is: 503 with
/// `Retry-After: 1`, the body naming the limit (`full`) that refused it.
async fn assert_refused_as_full(a: std::net::SocketAddr, full: &str) {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let (status, head, body) = http(a, &request).await;
    assert_eq!(status, 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(full), "the refusal names {full:?}: {body}");
}

async fn with_origin(url: &str, origin: Option<&str>) -> Result<(), u16> {
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
    {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_origins_may_open_a_websocket() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &config(
            r#"allowed_origins = ["https://app.example.com", "*.partner.org"]"#,
            "",
        ),
        &[backend.addr],
    );
    let url = format!("ws://{}/", addr(&gw));
    assert_eq!(
        with_origin(&url, Some("https://app.example.com")).await,
        Ok(())
    );
    assert_eq!(
        with_origin(&url, Some("https://eu.partner.org")).await,
        Ok(())
    );
    assert_eq!(
        with_origin(&url, Some("http://app.example.com")).await,
        Err(403),
        "scheme differs"
    );
    assert_eq!(with_origin(&url, Some("https://evil.com")).await, Err(403));
    assert_eq!(
        with_origin(&url, Some("https://partner.org.evil.com")).await,
        Err(403)
    );
    assert_eq!(with_origin(&url, None).await, Err(403));
    assert_eq!(
        backend.handshakes(),
        2,
        "refused handshakes never reach the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_cap_answers_503_with_retry_after_and_frees_the_place_on_close() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(&config("max_connections = 2", ""), &[backend.addr]);
    let a = addr(&gw);
    let first = connect(&format!("ws://{a}/")).await;
    let _second = connect(&format!("ws://{a}/")).await;
    assert_refused_as_full(a, "route max_connections").await;
    drop(first);
    let started = Instant::now();
    loop {
        match with_origin(&format!("ws://{a}/"), None).await {
            Ok(()) => break,
            Err(503) if started.elapsed() < Duration::from_secs(3) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("the closed tunnel's place was not given back: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_cap_answers_429_and_spares_other_addresses() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(&config("", "max_connections_per_ip = 2"), &[backend.addr]);
    let a = addr(&gw);
    let busy = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 55));
    let _one = connect_from(busy, a, "/").await;
    let _two = connect_from(busy, a, "/").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((busy, 0).into()).unwrap();
    let stream = socket.connect(a).await.unwrap();
    match tokio_tungstenite::client_async(format!("ws://{a}/"), stream).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429)
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    let mut other = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 56)), a, "/").await;
    other.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_data(&mut other).await, Message::text("hi"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_gets_408_and_a_huge_head_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &config("", "client_header_timeout = \"300ms\""),
        &[backend.addr],
    );
    let a = addr(&gw);
    let mut slow = tokio::net::TcpStream::connect(a).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, slow.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    let mut big = tokio::net::TcpStream::connect(a).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = big.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, big.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    // Past 32 KiB the head is refused: 431 (from actix-http if it stopped reading, from the
    // proxy if the head came in one read), or 408 once the header timeout passes; the
    // connection is closed either way and no backend sees the request.
    assert!(
        answer.is_empty()
            || answer.starts_with("HTTP/1.1 431")
            || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert_eq!(backend.handshakes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_cap_counts_tunnels_of_every_route() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let gw = gateway(
        &format!(
            "[gateway]\nworkers = 1\nmax_connections = 2\n[[listener]]\nbind = \"127.0.0.1:0\"\n\
             [[route]]\npath = \"/a/\"\nupstream = \"u\"\n[[route]]\npath = \"/b/\"\nupstream = \"u\"\n\
             [upstream.u]\nservers = [\"{}\"]\n",
            backend.addr
        ),
        &[],
    );
    let a = addr(&gw);
    let _one = connect(&format!("ws://{a}/a/")).await;
    let _two = connect(&format!("ws://{a}/b/")).await;
    let (status, body) = refused_status(&format!("ws://{a}/a/")).await;
    assert_eq!(status, 503);
    assert!(body.contains("gateway max_connections"), "{body}");
    assert_eq!(backend.handshakes(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_at_its_max_connections_takes_no_more_tunnels() {
    let full = WsBackend::start("full", Behavior::Echo).await;
    let other = WsBackend::start("other", Behavior::Echo).await;
    let config = simple_config(2, "").replace(
        "\"{BACKEND_1}\"",
        "{ addr = \"{BACKEND_1}\", max_connections = 2 }",
    );
    let gw = gateway(&config, &[full.addr, other.addr]);
    let url = format!("ws://{}/", addr(&gw));
    // Round-robin alternates until "full" holds two tunnels; then "other" takes them all.
    let mut held = Vec::new();
    let mut names = Vec::new();
    for _ in 0..6 {
        let mut ws = connect(&url).await;
        names.push(whoami(&mut ws).await);
        held.push(ws);
    }
    assert_eq!(
        names.iter().filter(|n| *n == "full").count(),
        2,
        "{names:?}"
    );
    // Alone in its upstream and full: 503 with Retry-After, until a tunnel ends.
    let alone = simple_config(1, "").replace(
        "\"{BACKEND_1}\"",
        "{ addr = \"{BACKEND_1}\", max_connections = 1 }",
    );
    let gw = gateway(&alone, &[full.addr]);
    let url = format!("ws://{}/", addr(&gw));
    let mut first = connect(&url).await;
    assert_eq!(whoami(&mut first).await, "full");
    assert_refused_as_full(addr(&gw), "server max_connections").await;
    first.close(None).await.unwrap();
    let mut next = eventually("a tunnel once the first ended", STEP, || async {
        Some(tokio_tungstenite::connect_async(&url).await.ok()?.0)
    })
    .await;
    assert_eq!(whoami(&mut next).await, "full");
}

/// Started with a soft open-file limit of 256 under a hard one of 400, the binary raises
/// the soft one to 400 and takes (400 - 134 reserved) / 2 = 133 tunnels: the next upgrade
/// gets 503 + Retry-After at once, where it used to be accepted into a gateway out of
/// descriptors and wait with no answer. A tunnel that ends gives its place back, and the
/// log says what caps the tunnels and how to lift it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_caps_tunnels_with_a_503_instead_of_a_stall() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let port = free_port();
    let admin_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let write_config = |gateway_extra: &str| {
        std::fs::write(
            &path,
            format!(
                "[gateway]\nworkers = 1\nadmin = \"127.0.0.1:{admin_port}\"\n{gateway_extra}\n\
                 [[listener]]\nbind = \"127.0.0.1:{port}\"\n\
                 [[route]]\nupstream = \"u\"\naccess_log = false\n[upstream.u]\nservers = [\"{}\"]\n",
                backend.addr
            ),
        )
        .unwrap()
    };
    // max_connections stays at its default (65,536): far more than the limit allows.
    write_config("");
    let mut command = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    command
        .args(["--log-format", "json", "run", "-c"])
        .arg(&path)
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the child only makes the setrlimit system call.
    unsafe {
        command.pre_exec(|| rlimit::setrlimit(rlimit::Resource::NOFILE, 256, 400));
    }
    let child = Process::new(command.spawn().unwrap());
    wait_listening(port);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["400", "400"],
        "the soft limit is raised to the hard one: {open_files}"
    );
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let admin_status = || async {
        serde_json::from_str::<serde_json::Value>(&admin_get(admin, "/status").await).unwrap()
    };
    let status = admin_status().await;
    assert_eq!(status["open_file_limit"], 400, "{status}");
    assert_eq!(status["tunnel_room"], 133, "{status}");

    let a = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let url = format!("ws://{a}/");
    let mut tunnels = Vec::with_capacity(133);
    for _ in 0..133 {
        tunnels.push(connect(&url).await);
    }
    assert_refused_as_full(a, "open-file limit").await;
    // Tunnels from first to last still relay.
    for ws in tunnels.iter_mut().step_by(33) {
        ws.send(Message::text("still here")).await.unwrap();
        assert_eq!(next_data(ws).await, Message::text("still here"));
    }
    let mut first = tunnels.swap_remove(0);
    first.close(None).await.unwrap();
    let _ = close_code(&mut first).await;
    eventually("the ended tunnel's place is given back", STEP, || async {
        with_origin(&url, None).await.ok()
    })
    .await;

    drop(tunnels);
    // A reload that changes max_connections is checked against the room too: within it,
    // no warning; above it, one.
    let max_tunnels_metric =
        || async { metric(&admin_get(admin, "/metrics").await, "wsgate_max_tunnels ") };
    assert_eq!(max_tunnels_metric().await, Some(133.0));
    for (max, reloaded, cap) in [(100, 2, 100.0), (1_000, 3, 133.0)] {
        write_config(&format!("max_connections = {max}"));
        eventually("the reload is applied", STEP, || async {
            (admin_status().await["generation"].as_u64()? >= reloaded).then_some(())
        })
        .await;
        assert_eq!(
            max_tunnels_metric().await,
            Some(cap),
            "max_connections = {max}"
        );
    }
    // Plain connections have no cap: 420 clients that send nothing use up the limit, and
    // accept fails until they leave. Each run of failed accepts is logged once, not on
    // every retry, and once more when accepting works again (the clients still queued
    // when the first ones leave can make a second, short run).
    let idle: Vec<std::net::TcpStream> = (0..420)
        .map(|_| std::net::TcpStream::connect(a).unwrap())
        .collect();
    let descriptors = format!("/proc/{}/fd", child.id());
    eventually("the gateway uses all 400 descriptors", STEP, || async {
        (std::fs::read_dir(&descriptors).ok()?.count() >= 400).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(idle);
    eventually(
        "a tunnel opens once the idle clients left",
        STEP,
        || async { with_origin(&url, None).await.ok() },
    )
    .await;
    let (stderr, lines) = stop_and_read_json_log(child).await;
    let runs = lines
        .iter()
        .filter(|l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("accept failed"))
        })
        .count();
    let failed_per_run: Vec<u64> = lines
        .iter()
        .filter(|l| l["message"] == "accepting again")
        .map(|l| l["failed_accepts"].as_u64().unwrap())
        .collect();
    assert!(runs >= 1, "accept failed:\n{stderr}");
    assert_eq!(
        runs,
        failed_per_run.len(),
        "one warning and one line when it works again, per run:\n{stderr}"
    );
    assert!(
        failed_per_run[0] >= 3,
        "retried every 100 ms, quietly, while out of descriptors for 300 ms: {failed_per_run:?}"
    );
    let raised = lines
        .iter()
        .find(|l| l["message"] == "open-file limit raised to the hard limit")
        .unwrap_or_else(|| panic!("no line says the limit was raised:\n{stderr}"));
    assert_eq!((&raised["from"], &raised["to"]), (&256.into(), &400.into()));
    let warned = lines
        .iter()
        .find(|l| l["level"] == "WARN" && l["max_connections"] == 65_536)
        .unwrap_or_else(|| panic!("no warning that max_connections cannot be reached:\n{stderr}"));
    assert_eq!(warned["tunnel_room"], 133, "{warned}");
    assert!(
        warned["message"].as_str().unwrap().contains("ulimit -Hn"),
        "the warning says how to lift the limit: {warned}"
    );
    let warned_for = |max: u64| {
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && l["max_connections"] == max)
    };
    assert!(!warned_for(100), "100 tunnels fit in the room:\n{stderr}");
    assert!(
        warned_for(1_000),
        "a reload to 1,000 is warned about:\n{stderr}"
    );
}
