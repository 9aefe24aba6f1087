//! Horizontal scale-out on the host: HAProxy (Debian's) in TCP mode with send-proxy-v2 in
//! front of two wsgate processes in front of three backends. Both replicas send each client
//! address to the same backend, backends see the client's address, and a rolling restart
//! (SIGTERM one replica; HAProxy's check on /readyz moves new connections) fails nothing.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn replica(
    dir: &std::path::Path,
    name: &str,
    port: u16,
    admin: u16,
    backends: &[SocketAddr],
) -> Process {
    let servers: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[gateway]\nworkers = 1\nadmin = \"127.0.0.1:{admin}\"\nshutdown_delay = \"1s\"\n\
             [[listener]]\nbind = \"127.0.0.1:{port}\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
             [[route]]\nupstream = \"u\"\n[upstream.u]\nbalance = \"consistent_hash\"\nservers = [{}]\n",
            servers.join(", ")
        ),
    )
    .unwrap();
    // Held before the wait, so that a replica that never listens is killed too.
    let child = Process::new(
        Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["run", "-c"])
            .arg(&path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_with_send_proxy_v2_in_front_of_two_replicas() {
    let backends = [
        WsBackend::start("b1", Behavior::Echo).await,
        WsBackend::start("b2", Behavior::Echo).await,
        WsBackend::start("b3", Behavior::Echo).await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let (p1, a1, p2, a2, front) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let mut r1 = replica(dir.path(), "r1", p1, a1, &addrs);
    let _r2 = replica(dir.path(), "r2", p2, a2, &addrs);
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 8000\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
             frontend ws\n    bind 127.0.0.1:{front}\n    default_backend gateways\n\
             backend gateways\n    balance roundrobin\n    option httpchk GET /readyz\n\
             \x20   server r1 127.0.0.1:{p1} send-proxy-v2 check port {a1} inter 200ms fall 1 rise 2\n\
             \x20   server r2 127.0.0.1:{p2} send-proxy-v2 check port {a2} inter 200ms fall 1 rise 2\n"
        ),
    )
    .unwrap();
    let _haproxy = Process::new(
        Command::new("haproxy")
            .args(["-f"])
            .arg(&cfg)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy is installed (.ci/run installs Debian's haproxy)"),
    );
    wait_listening(front);
    let front: SocketAddr = ([127, 0, 0, 1], front).into();

    // 1,000 client addresses, each connecting twice: HAProxy's round-robin sends the two
    // connections to different replicas, which must pick the same backend.
    for i in 0..1000u32 {
        let client = IpAddr::V4(Ipv4Addr::new(127, 10 + (i / 250) as u8, (i % 250) as u8, 1));
        let first = whoami(&mut connect_from(client, front, "/").await).await;
        let second = whoami(&mut connect_from(client, front, "/").await).await;
        assert_eq!(first, second, "client {client}: the replicas disagree");
        if i % 200 == 0 {
            let seen = backends.iter().find(|b| b.name == first).unwrap().last();
            assert_eq!(
                seen.headers.get("x-forwarded-for").map(String::as_str),
                Some(client.to_string().as_str())
            );
        }
    }

    // Rolling restart: SIGTERM replica 1 while new connections keep coming.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober_stop = std::sync::Arc::clone(&stop);
    let prober = tokio::spawn(async move {
        let mut ok = 0;
        while !prober_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let name = whoami_at(&format!("ws://{front}/")).await;
            assert!(name.starts_with('b'), "{name}");
            ok += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ok
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Command::new("kill")
        .args(["-TERM", &r1.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + STEP;
    let exit = loop {
        if let Some(exit) = r1.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "replica 1 did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ok = prober
        .await
        .expect("no new connection failed during the rolling restart");
    assert!(ok > 20, "{ok} connections during the restart");
}
