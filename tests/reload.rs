//! Hot reload by editing the configuration file: the torture run (live tunnels keep
//! flowing through 20 rewrites, valid changes show within 1 s, invalid files are
//! rejected), listeners following the file, and draining removed servers.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

/// How long a change may take to be in effect for new connections.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);

/// The same for checks whose every attempt takes a while itself (a timeout to expire, a
/// server to stop).
const RELOADED: Duration = Duration::from_secs(5);

struct Reloadable {
    dir: tempfile::TempDir,
    gw: GatewayThread,
}

impl Reloadable {
    fn start(text: &str) -> Reloadable {
        if std::env::var_os("RUST_LOG").is_some() {
            wsgate::telemetry::init(wsgate::telemetry::LogFormat::Pretty);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let gw = gateway_watching(&path);
        Reloadable { dir, gw }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Writes the file in place (truncate + write), as most editors and `>` do.
    fn write_in_place(&self, text: &str) {
        std::fs::write(self.path(), text).unwrap();
    }

    /// Writes a temporary file and renames it over the config, as vim, sed -i and
    /// Kubernetes do.
    fn write_by_rename(&self, text: &str) {
        let tmp: PathBuf = self.dir.path().join(".config.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }

    fn generation(&self) -> u64 {
        self.gw.shared().generation()
    }

    fn rejected(&self) -> u64 {
        self.gw.shared().reloads_rejected.load(Ordering::Relaxed)
    }

    /// Waits until `done` holds, at most `VISIBLE_WITHIN`; returns the time it took.
    async fn within(&self, what: &str, mut done: impl FnMut(&Self) -> bool) -> Duration {
        let started = Instant::now();
        while !done(self) {
            assert!(
                started.elapsed() < VISIBLE_WITHIN,
                "{what}: not in effect within {VISIBLE_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        started.elapsed()
    }
}

/// The configuration of one torture step.
#[derive(Clone)]
struct Shape {
    servers: Vec<SocketAddr>,
    consistent_hash: bool,
    extra_routes: Vec<String>,
    extra_listeners: Vec<u16>,
}

impl Shape {
    fn render(&self) -> String {
        let servers: Vec<String> = self.servers.iter().map(|s| format!("\"{s}\"")).collect();
        let mut text = String::from(
            "[gateway]\nworkers = 2\n[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n\
             [[route]]\npath = \"/ws/\"\nupstream = \"u\"\n",
        );
        for route in &self.extra_routes {
            text += &format!("[[route]]\npath = \"{route}\"\nupstream = \"u\"\n");
        }
        for (i, port) in self.extra_listeners.iter().enumerate() {
            text += &format!("[[listener]]\nname = \"extra{i}\"\nbind = \"127.0.0.1:{port}\"\n");
        }
        text += &format!(
            "[upstream.u]\nbalance = \"{}\"\nservers = [{}]\n",
            if self.consistent_hash {
                "consistent_hash"
            } else {
                "round_robin"
            },
            servers.join(", ")
        );
        text
    }
}

const INVALID: [(&str, &str); 4] = [
    ("syntax error", "[[listener]\nbind = \"127.0.0.1:0\"\n"),
    (
        "unknown key",
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nbindd = 1\n",
    ),
    (
        "empty pool",
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n[upstream.u]\nservers = []\n",
    ),
    (
        "missing upstream",
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n[[route]]\nupstream = \"nope\"\n",
    ),
];

/// One tunnel exchanging numbered messages until told to stop; returns how many round
/// trips it made. Any loss, duplicate, reordering or drop fails the test.
async fn numbered_exchange(
    url: String,
    id: usize,
    stop: Arc<AtomicBool>,
    total: Arc<AtomicU64>,
) -> u64 {
    let mut ws = connect(&url).await;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let text = format!("t{id}-{seq}");
        ws.send(Message::text(text.clone()))
            .await
            .unwrap_or_else(|e| panic!("tunnel {id} dropped: {e}"));
        let echoed = next_data(&mut ws).await;
        assert_eq!(
            echoed,
            Message::text(text),
            "tunnel {id}: lost, duplicated or reordered"
        );
        seq += 1;
        total.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ws.close(None).await.unwrap();
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_torture_keeps_every_tunnel_and_applies_only_valid_files() {
    let backends = [
        WsBackend::start("b1", Behavior::Echo).await,
        WsBackend::start("b2", Behavior::Echo).await,
        WsBackend::start("b3", Behavior::Echo).await,
    ];
    let mut shape = Shape {
        servers: vec![backends[0].addr, backends[1].addr],
        consistent_hash: false,
        extra_routes: vec![],
        extra_listeners: vec![],
    };
    let gw = Reloadable::start(&shape.render());
    let main = gw.gw.addr("main").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut tunnels = Vec::new();
    for id in 0..200 {
        let url = format!("ws://{main}/ws/t{id}");
        tunnels.push(tokio::spawn(numbered_exchange(
            url,
            id,
            Arc::clone(&stop),
            Arc::clone(&total),
        )));
    }
    // New handshakes all through the run must all succeed.
    let prober_stop = Arc::clone(&stop);
    let prober = tokio::spawn(async move {
        let mut ok = 0u64;
        while !prober_stop.load(Ordering::Relaxed) {
            let name = whoami_at(&format!("ws://{main}/ws/probe")).await;
            assert!(name.starts_with('b'), "{name}");
            ok += 1;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ok
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut latencies = Vec::new();
    let mut invalid_seen = 0;
    let mut valid_steps = 0;
    for step in 0..20 {
        let by_rename = step % 2 == 1;
        let write = |text: &str| {
            if by_rename {
                gw.write_by_rename(text)
            } else {
                gw.write_in_place(text)
            }
        };
        if step % 5 == 2 || step % 5 == 4 {
            // An invalid file: logged, counted, ignored.
            let (what, text) = INVALID[invalid_seen % INVALID.len()];
            invalid_seen += 1;
            let (generation, rejected) = (gw.generation(), gw.rejected());
            write(text);
            gw.within(&format!("rejecting {what}"), |g| g.rejected() > rejected)
                .await;
            assert_eq!(gw.generation(), generation, "{what} must not be applied");
            // Put the valid file back (same bytes as the running config: no reload).
            write(&shape.render());
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(gw.generation(), generation);
            continue;
        }
        let generation = gw.generation();
        let (b1, b2, b3) = (backends[0].addr, backends[1].addr, backends[2].addr);
        let what = match valid_steps {
            0 | 8 => {
                shape.servers.push(b3);
                "add a server"
            }
            1 => {
                shape.servers.retain(|s| *s != b1);
                "remove a server"
            }
            9 => {
                shape.servers.retain(|s| *s != b2);
                "remove a server"
            }
            2 | 7 => {
                shape.consistent_hash = !shape.consistent_hash;
                "switch balance"
            }
            4 | 10 => {
                shape.extra_listeners.push(free_port());
                "add a listener"
            }
            5 => {
                shape.servers.retain(|s| *s != b3);
                shape.servers.push(b1);
                "swap servers"
            }
            _ => {
                shape.extra_routes.push(format!("/r{step}/"));
                "add a route"
            }
        };
        valid_steps += 1;
        let written = Instant::now();
        write(&shape.render());
        gw.within(&format!("step {step}: {what}"), |g| {
            g.generation() > generation
        })
        .await;
        latencies.push(written.elapsed());
        // New connections see the change.
        match what {
            "add a route" => {
                let route = shape.extra_routes.last().unwrap();
                assert!(
                    whoami_at(&format!("ws://{main}{route}x"))
                        .await
                        .starts_with('b')
                );
            }
            "add a listener" => {
                let port = *shape.extra_listeners.last().unwrap();
                assert!(
                    whoami_at(&format!("ws://127.0.0.1:{port}/ws/"))
                        .await
                        .starts_with('b')
                );
            }
            "remove a server" | "swap servers" | "add a server" => {
                let names: Vec<String> = shape
                    .servers
                    .iter()
                    .map(|s| backends.iter().find(|b| b.addr == *s).unwrap().name.clone())
                    .collect();
                for _ in 0..6 {
                    let got = whoami_at(&format!("ws://{main}/ws/")).await;
                    assert!(names.contains(&got), "{what}: {got} is not in {names:?}");
                }
            }
            _ => {
                if shape.consistent_hash {
                    let first = whoami_at(&format!("ws://{main}/ws/")).await;
                    for _ in 0..4 {
                        assert_eq!(
                            whoami_at(&format!("ws://{main}/ws/")).await,
                            first,
                            "hash is sticky"
                        );
                    }
                }
            }
        }
    }
    assert_eq!((valid_steps, invalid_seen), (12, 8));

    stop.store(true, Ordering::Relaxed);
    let mut per_tunnel = Vec::new();
    for t in tunnels {
        per_tunnel.push(t.await.expect("no tunnel failed"));
    }
    let probes = prober.await.expect("no new handshake failed");
    assert!(
        per_tunnel.iter().all(|n| *n > 10),
        "every tunnel kept exchanging: {per_tunnel:?}"
    );
    latencies.sort();
    println!(
        "reload torture: {} round trips on 200 tunnels, {probes} probe handshakes, {} valid reloads: \
         write→in effect median {:?}, max {:?}",
        total.load(Ordering::Relaxed),
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_listener_stops_accepting_but_its_tunnels_live_on() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let port = free_port();
    let base = format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"{}\"]\n",
        backend.addr
    );
    let gw = Reloadable::start(&format!(
        "{base}[[listener]]\nname = \"side\"\nbind = \"127.0.0.1:{port}\"\n"
    ));
    let mut tunnel = connect(&format!("ws://127.0.0.1:{port}/")).await;

    let generation = gw.generation();
    gw.write_by_rename(&base);
    gw.within("remove a listener", |g| g.generation() > generation)
        .await;
    let started = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            break;
        }
        assert!(
            started.elapsed() < VISIBLE_WITHIN,
            "the removed listener still accepts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tunnel.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_data(&mut tunnel).await, Message::text("still here"));
    tunnel.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_failure_rejects_the_whole_reload() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let other = WsBackend::start("b2", Behavior::Echo).await;
    let base = |server: SocketAddr| {
        format!(
            "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"{server}\"]\n"
        )
    };
    let gw = Reloadable::start(&base(backend.addr));
    let main = gw.gw.addr("main").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (generation, rejected) = (gw.generation(), gw.rejected());
    // A new server *and* a listener on a port in use: neither may take effect.
    gw.write_in_place(&format!(
        "{}[[listener]]\nname = \"busy\"\nbind = \"{}\"\n",
        base(other.addr),
        taken.local_addr().unwrap()
    ));
    gw.within("reject a busy port", |g| g.rejected() > rejected)
        .await;
    let shared = gw.gw.shared();
    let metrics = shared.metrics.render(shared);
    assert!(
        metrics.contains("wsgate_config_reloads_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
    assert_eq!(gw.generation(), generation);
    assert_eq!(whoami_at(&format!("ws://{main}/")).await, "b1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_server_tunnels_get_1012_after_drain_timeout_spread_over_drain_spread() {
    let leaving = WsBackend::start("leaving", Behavior::Echo).await;
    let staying = WsBackend::start("staying", Behavior::Echo).await;
    let config = |servers: &str| {
        format!(
            "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n\
             [upstream.u]\ndrain_timeout = \"300ms\"\ndrain_spread = \"600ms\"\nservers = [{servers}]\n"
        )
    };
    let gw = Reloadable::start(&config(&format!(
        "\"{}\", \"{}\"",
        leaving.addr, staying.addr
    )));
    let main = gw.gw.addr("main").unwrap();
    let mut on_leaving = Vec::new();
    let mut on_staying = Vec::new();
    for _ in 0..16 {
        let mut ws = connect(&format!("ws://{main}/")).await;
        ws.send(Message::text("whoami")).await.unwrap();
        match next_data(&mut ws).await.into_text().unwrap().as_str() {
            "leaving" => on_leaving.push(ws),
            _ => on_staying.push(ws),
        }
    }
    assert_eq!((on_leaving.len(), on_staying.len()), (8, 8));

    let generation = gw.generation();
    gw.write_by_rename(&config(&format!("\"{}\"", staying.addr)));
    gw.within("remove a server", |g| g.generation() > generation)
        .await;
    let applied = Instant::now();
    // Each client waits for its close on its own task, so every time is its own.
    let waits: Vec<_> = on_leaving
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let (code, _) = close_code(&mut ws).await;
                (code, applied.elapsed())
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for wait in waits {
        let (code, at) = wait.await.unwrap();
        assert_eq!(code, 1012);
        closed_at.push(at);
    }
    closed_at.sort();
    let (first, last) = (closed_at[0], closed_at[closed_at.len() - 1]);
    assert!(
        first >= Duration::from_millis(250),
        "closed before drain_timeout: {closed_at:?}"
    );
    assert!(
        last <= Duration::from_millis(300 + 600 + 500),
        "spread too long: {closed_at:?}"
    );
    assert!(
        last - first >= Duration::from_millis(200),
        "not spread: {closed_at:?}"
    );
    for ws in on_staying.iter_mut() {
        ws.send(Message::text("whoami")).await.unwrap();
        assert_eq!(next_data(ws).await, Message::text("staying"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_follows_the_file() {
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let (first, second) = (free_port(), free_port());
    let text = |admin: Option<u16>| {
        let admin = admin.map_or(String::new(), |p| format!("admin = \"127.0.0.1:{p}\"\n"));
        format!(
            "[gateway]\n{admin}[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n\
             [[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"{}\"]\n",
            backend.addr
        )
    };
    let healthz = |port: u16| async move {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        tokio::time::timeout(STEP, stream.read_to_end(&mut answer))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"))
    };
    let gw = Reloadable::start(&text(Some(first)));
    assert_eq!(healthz(first).await, Some(true));
    let main = gw.gw.addr("main").unwrap();
    let mut tunnel = connect(&format!("ws://{main}/")).await;

    // Moved: the new address answers, the old one is closed, the tunnel is untouched.
    gw.write_by_rename(&text(Some(second)));
    eventually("the admin listener moved", RELOADED, || async {
        (healthz(second).await == Some(true) && healthz(first).await.is_none()).then_some(())
    })
    .await;
    // Removed: nothing answers any more.
    gw.write_by_rename(&text(None));
    eventually("the admin listener closed", RELOADED, || async {
        healthz(second).await.is_none().then_some(())
    })
    .await;
    tunnel.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_data(&mut tunnel).await, Message::text("still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_header_timeout_applies_to_the_next_connection() {
    use tokio::io::AsyncReadExt;
    let backend = WsBackend::start("b1", Behavior::Echo).await;
    let text = |timeout: &str| {
        format!(
            "[gateway]\nclient_header_timeout = \"{timeout}\"\n[[listener]]\nname = \"main\"\n\
             bind = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"{}\"]\n",
            backend.addr
        )
    };
    let gw = Reloadable::start(&text("60s"));
    let main = gw.gw.addr("main").unwrap();
    let mut before = tokio::net::TcpStream::connect(main).await.unwrap();

    gw.write_by_rename(&text("300ms"));
    // A connection that sends nothing is answered 408 once the new timeout is served.
    eventually("the new header timeout applied", RELOADED, || async {
        let mut idle = tokio::net::TcpStream::connect(main).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), idle.read_to_end(&mut answer)).await;
        answer.starts_with(b"HTTP/1.1 408").then_some(())
    })
    .await;
    // The connection accepted before the reload keeps the timeout it came in with.
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), before.read(&mut byte))
            .await
            .is_err(),
        "the earlier connection was answered under the new timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_reloaded_weight() {
    let admin_port = free_port();
    let config = |server: &str| {
        format!(
            "[gateway]\nworkers = 1\nadmin = \"127.0.0.1:{admin_port}\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n\
             [[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [{server}]\n"
        )
    };
    let gw = Reloadable::start(&config("\"10.0.0.1:9000\""));
    let admin = gw.gw.admin.expect("admin bound");
    let weight = || async move {
        let (_, _, body) = http(
            admin,
            "GET /status HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
        )
        .await;
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        status["upstreams"][0]["servers"][0]["weight"].as_u64()
    };
    assert_eq!(weight().await, Some(1));
    // The server stays (its counters with it); the status shows the weight it has now.
    gw.write_by_rename(&config("{ addr = \"10.0.0.1:9000\", weight = 3 }"));
    eventually("the new weight on /status", VISIBLE_WITHIN, || async {
        (weight().await == Some(3)).then_some(())
    })
    .await;
}
