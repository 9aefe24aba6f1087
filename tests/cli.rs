//! The binary as an operator runs it: `check`, `run`, `--version`, SIGTERM, and a process
//! that runs out of file descriptors.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio_tungstenite::tungstenite;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("config.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_config_and_names_the_place_of_an_error() {
    let ok = Command::new(BIN)
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/config.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(": ok"));

    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "[[route]]\nupstream = \"nope\"\n");
    let bad = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:2:12: route names upstream \"nope\"",
            path.display()
        )),
        "{stderr}"
    );
}

#[test]
fn run_refuses_a_missing_file_and_a_port_in_use() {
    let missing = Command::new(BIN)
        .args(["run", "-c", "/nonexistent/wsgate.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/wsgate.toml"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            "[[listener]]\nname = \"web\"\nbind = \"{}\"\n[[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"127.0.0.1:1\"]\n",
            taken.local_addr().unwrap()
        ),
    );
    let busy = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(busy.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains("listener \"web\" cannot bind") && stderr.contains("in use"),
        "{stderr}"
    );
}

#[test]
fn version_and_help() {
    let version = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("wsgate {}", env!("CARGO_PKG_VERSION"))
    );
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for cmd in ["run", "check", "demo"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_500_clients_1001_spread_over_shutdown_spread_then_exits_0() {
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let port = free_port();
    let admin = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            "[gateway]\nworkers = 1\nadmin = \"127.0.0.1:{admin}\"\nshutdown_spread = \"400ms\"\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n\
             [[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"{}\"]\n",
            backend.addr
        ),
    );
    let mut child = Process::new(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    let mut clients = Vec::new();
    for _ in 0..500 {
        clients.push(connect(&format!("ws://127.0.0.1:{port}/")).await);
    }
    let admin_addr: std::net::SocketAddr = ([127, 0, 0, 1], admin).into();
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    assert_eq!(http(admin_addr, &get("/healthz")).await.0, 200);
    assert_eq!(http(admin_addr, &get("/readyz")).await.0, 200);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled = Instant::now();
    // While the tunnels are being closed, readiness is already false.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if http(admin_addr, &get("/readyz")).await.0 == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness did not turn false on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Each client waits on its own task, so each close time is its own.
    let waits: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let close = close_code(&mut ws).await;
                (close, signalled.elapsed())
            })
        })
        .collect();
    let mut times = Vec::new();
    for wait in waits {
        let (close, at) = wait.await.unwrap();
        assert_eq!(close, (1001, "gateway shutting down".to_string()));
        times.push(at);
    }
    times.sort();
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(
        last - first >= Duration::from_millis(200),
        "not spread: first {first:?}, last {last:?}"
    );
    let deadline = Instant::now() + STEP;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
}

/// Runs the gateway on `config` with at most `limit` open files, its log in `log`, and
/// waits until it listens on `port`.
fn run_with_fd_limit(
    config: &std::path::Path,
    limit: usize,
    log: &std::path::Path,
    port: u16,
) -> Process {
    // bash lowers the open-file limit, then becomes the gateway (same pid).
    let child = Process::new(
        Command::new("bash")
            .arg("-c")
            .arg(format!("ulimit -n {limit} && exec \"$0\" run -c \"$1\""))
            .arg(BIN)
            .arg(config)
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    child
}

/// The open file descriptors of a process numbered below `limit` (one inherited from the
/// test runner may sit above it and does not use up a number the process can open).
fn open_fds(pid: u32, limit: usize) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .filter(|&fd| fd < limit)
        .count()
}

/// Opens idle TCP connections to `port` until process `pid` holds `target` descriptors
/// (each one the gateway accepts costs it one while it waits for a request head), and
/// the count holds there: descriptors that close on their own (a probe connection, a
/// tunnel finishing its close) are topped up, or they would free places later.
async fn fill_fds(
    pid: u32,
    limit: usize,
    port: u16,
    target: usize,
    idle: &mut Vec<tokio::net::TcpStream>,
) {
    for _ in 0..2 * target {
        let before = open_fds(pid, limit);
        if before >= target {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if open_fds(pid, limit) == target {
                return;
            }
            continue;
        }
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
        let deadline = Instant::now() + STEP;
        while open_fds(pid, limit) == before {
            assert!(Instant::now() < deadline, "the gateway did not accept");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    panic!(
        "the gateway's descriptors did not settle at {target}: {}",
        open_fds(pid, limit)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_is_a_503_and_a_pause_not_a_fault_of_the_backend() {
    const LIMIT: usize = 64;
    let backend = WsBackend::start("b", Behavior::Echo).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // max_fails = 1 (the default): a backend blamed once would be out for 10 s.
    let path = write_config(
        &dir,
        &format!(
            "[gateway]\nworkers = 1\nclient_header_timeout = \"60s\"\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n\
             [[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"{}\"]\n",
            backend.addr
        ),
    );
    let log_path = dir.path().join("stderr.log");
    let mut child = run_with_fd_limit(&path, LIMIT, &log_path, port);
    let pid = child.id();
    let url = format!("ws://127.0.0.1:{port}/");
    let mut tunnel = connect(&url).await;
    assert_eq!(whoami(&mut tunnel).await, "b");

    // One descriptor left: the client's connection is accepted, the backend's cannot be
    // opened. The client is told to retry; the backend is not blamed.
    let mut idle = Vec::new();
    fill_fds(pid, LIMIT, port, LIMIT - 1, &mut idle).await;
    // The refused connection's descriptor is given back just after the answer.
    let given_back = || {
        eventually("the refused connection closed", STEP, || async {
            (open_fds(pid, LIMIT) == LIMIT - 1).then_some(())
        })
    };
    let (status, body) = refused_status(&url).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Too many open files"), "{body}");
    given_back().await;
    // A plain HTTP request is refused the same way.
    let (status, head, body) = http(
        ([127, 0, 0, 1], port).into(),
        "GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(String::from_utf8_lossy(&body).contains("Too many open files"));
    given_back().await;

    // None left: accepting fails, the gateway pauses and tries again; a client waits in
    // the queue and is served once descriptors are free.
    fill_fds(pid, LIMIT, port, LIMIT, &mut idle).await;
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { tokio_tungstenite::connect_async(url).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "answered although no descriptor was free"
    );
    drop(idle);
    // The gateway gives the descriptors back one by one: the queued client is accepted with
    // the first, and is served, or refused cleanly if its backend connection came before
    // the second one. Either way it is answered, not left waiting.
    match tokio::time::timeout(STEP, waiting)
        .await
        .expect("the queued client is answered once descriptors are free")
        .unwrap()
    {
        Ok((mut served, _)) => assert_eq!(whoami(&mut served).await, "b"),
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(err) => panic!("the queued client: {err}"),
    }
    // The backend was never taken out of rotation (it would be for 10 s), and the first
    // tunnel lived on.
    let mut fresh = eventually(
        "a new tunnel once descriptors are free",
        Duration::from_secs(3),
        || async { Some(tokio_tungstenite::connect_async(&url).await.ok()?.0) },
    )
    .await;
    assert_eq!(whoami(&mut fresh).await, "b");
    assert_eq!(whoami(&mut tunnel).await, "b");

    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("accept failed"), "{log}");
    assert!(log.contains("out of resources"), "{log}");
}

/// A reload that cannot get every descriptor it needs is rejected whole: none of it is
/// applied, not its routes either (they were, while the listener it changed was not
/// served again), and the same file applies once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_short_of_descriptors_is_rejected_whole() {
    const LIMIT: usize = 64;
    let old = WsBackend::start("old", Behavior::Echo).await;
    let new = WsBackend::start("new", Behavior::Echo).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "[gateway]\nworkers = 1\nclient_header_timeout = \"60s\"\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n\
         [[route]]\nupstream = \"old\"\n[upstream.old]\nservers = [\"{}\"]\n",
        old.addr
    );
    // A new route, and a listener served again (its header timeout changes).
    let reloaded = |comment: &str| {
        format!(
            "# {comment}\n{}\n[[route]]\npath = \"/new\"\nupstream = \"new\"\n[upstream.new]\nservers = [\"{}\"]\n",
            base.replace("\"60s\"", "\"59s\""),
            new.addr
        )
    };
    let path = write_config(&dir, &base);
    let write_by_rename = |text: String| {
        let tmp = dir.path().join("config.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    let log_path = dir.path().join("stderr.log");
    let mut child = run_with_fd_limit(&path, LIMIT, &log_path, port);
    let pid = child.id();
    let new_url = format!("ws://127.0.0.1:{port}/new");
    assert_eq!(whoami_at(&new_url).await, "old");

    // One descriptor left: enough to read the file and take a second handle on the
    // listening socket, not for the worker's own handle.
    let mut idle = Vec::new();
    fill_fds(pid, LIMIT, port, LIMIT - 1, &mut idle).await;
    write_by_rename(reloaded("first try"));
    let log = eventually("the reload is rejected", STEP, || async {
        let log = std::fs::read_to_string(&log_path).unwrap();
        log.contains("reload rejected").then_some(log)
    })
    .await;
    assert!(log.contains("Too many open files"), "{log}");
    drop(idle);
    eventually("the idle connections closed", STEP, || async {
        (open_fds(pid, LIMIT) < LIMIT / 2).then_some(())
    })
    .await;
    assert_eq!(
        whoami_at(&new_url).await,
        "old",
        "a rejected reload's route is served"
    );

    write_by_rename(reloaded("second try"));
    eventually(
        "the same file applies with descriptors free",
        STEP,
        || async {
            let (mut ws, _) = tokio_tungstenite::connect_async(&new_url).await.ok()?;
            (whoami(&mut ws).await == "new").then_some(())
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}
