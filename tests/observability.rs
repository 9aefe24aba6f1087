//! What operators see: /metrics and /status moving with real traffic, the status page as
//! headless Chromium renders it, and the JSON access log line of a tunnel.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

fn config(admin: u16) -> String {
    format!(
        "[gateway]\nworkers = 1\nadmin = \"127.0.0.1:{admin}\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/ws/\"\nupstream = \"u\"\n[upstream.u]\nservers = [\"{{BACKEND_1}}\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_move_with_traffic() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let admin_port = free_port();
    let gw = gateway(&config(admin_port), &[backend.addr]);
    let admin = gw.admin.expect("admin bound");
    let a = addr(&gw);

    let mut ws = connect(&format!("ws://{a}/ws/x")).await;
    ws.send(Message::text("hello")).await.unwrap();
    next_data(&mut ws).await;
    let (status, _) = refused_status(&format!("ws://{a}/nowhere")).await;
    assert_eq!(status, 404);

    let text = admin_get(admin, "/metrics").await;
    let server = backend.addr.to_string();
    assert_eq!(
        metric(&text, "wsgate_handshakes_total{result=\"ok\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "wsgate_handshakes_total{result=\"no_route\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            &format!("wsgate_live_tunnels_by_server{{upstream=\"u\",server=\"{server}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            &format!("wsgate_server_up{{upstream=\"u\",server=\"{server}\"}}")
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &text,
            "wsgate_relayed_messages_total{direction=\"client_to_backend\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        metric(
            &text,
            "wsgate_relayed_bytes_total{direction=\"backend_to_client\"}"
        )
        .unwrap()
            >= 5.0
    );
    assert_eq!(
        metric(&text, "wsgate_handshake_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(metric(&text, "wsgate_config_generation"), Some(1.0));

    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
    assert_eq!(status["live_tunnels"], 1);
    assert_eq!(status["upstreams"][0]["servers"][0]["live_tunnels"], 1);
    assert_eq!(status["upstreams"][0]["servers"][0]["healthy"], true);

    ws.send(Message::Close(Some(CloseFrame {
        code: 4001.into(),
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let _ = close_code(&mut ws).await;
    let deadline = Instant::now() + STEP;
    loop {
        let text = admin_get(admin, "/metrics").await;
        let closed = metric(
            &text,
            "wsgate_close_frames_total{side=\"client\",code=\"4001\"}",
        ) == Some(1.0);
        let live = metric(
            &text,
            &format!("wsgate_live_tunnels_by_server{{upstream=\"u\",server=\"{server}\"}}"),
        );
        if closed && live == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "close and tunnel end not counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_live_tunnels_in_headless_chromium() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let admin_port = free_port();
    let gw = gateway(&config(admin_port), &[backend.addr]);
    let a = addr(&gw);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&format!("ws://{a}/ws/x")).await);
    }
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        headless_chromium(profile.path())
            .args(["--virtual-time-budget=5000", "--dump-dom"])
            .arg(format!("http://127.0.0.1:{admin_port}/"))
            .stderr(Stdio::null())
            .output()
            .expect("chromium is installed (.ci/run installs Debian's chromium)")
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<span id=\"live\">3</span>"),
        "the page shows 3 live tunnels:\n{dom}"
    );
    assert!(
        dom.contains(&backend.addr.to_string()),
        "the page lists the server"
    );
    assert!(dom.contains("generation 1"), "{dom}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_writes_one_json_access_log_line() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nworkers = 1\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n[[route]]\npath = \"/ws/\"\nupstream = \"u\"\n\
             [[route]]\npath = \"/quiet/\"\nupstream = \"u\"\naccess_log = false\n[upstream.u]\nservers = [\"{}\"]\n",
            backend.addr
        ),
    )
    .unwrap();
    let child = Process::new(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["--log-format", "json", "run", "-c"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    for path in ["/quiet/x", "/ws/x"] {
        let mut ws = connect(&format!("ws://127.0.0.1:{port}{path}")).await;
        ws.send(Message::text("12345")).await.unwrap();
        next_data(&mut ws).await;
        ws.send(Message::Close(Some(CloseFrame {
            code: 1000.into(),
            reason: "".into(),
        })))
        .await
        .unwrap();
        let _ = close_code(&mut ws).await;
    }
    // A plain HTTP request on the logging route: the echo backend is no HTTP server, but
    // whatever it answers is logged.
    let _ = http(
        ([127, 0, 0, 1], port).into(),
        "GET /ws/page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (stderr, lines) = stop_and_read_json_log(child).await;
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["target"] == "wsgate::access")
        .collect();
    let http_line = access
        .iter()
        .find(|v| v["message"] == "http")
        .expect("the plain HTTP request is logged");
    assert_eq!(http_line["path"], "/ws/page", "{http_line}");
    let tunnels: Vec<_> = access.iter().filter(|v| v["message"] == "tunnel").collect();
    assert_eq!(
        tunnels.len(),
        1,
        "one tunnel line, for the route that logs:\n{stderr}"
    );
    let line = tunnels[0];
    assert!(line["route"].as_str().unwrap().contains("/ws/"), "{line}");
    assert_eq!(line["server"], backend.addr.to_string());
    assert_eq!(line["close_code"], 1000);
    assert_eq!(line["closed_by"], "client");
    assert_eq!(line["frames_in"], 2, "the text and the close: {line}");
    assert!(line["bytes_out"].as_u64().unwrap() >= 7, "{line}");
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["duration_ms"].is_u64());
    assert_eq!(
        line["permessage_deflate"], false,
        "the backend agreed to none: {line}"
    );
}
