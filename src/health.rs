//! Active health checks: every server of an upstream with a `health_check` is probed every
//! `interval` (a TCP connect, an HTTP GET that must answer 2xx/3xx, or a WebSocket upgrade
//! that must answer 101); `fall` failures in a row take it out of rotation, `rise` passes
//! bring it back. Existing tunnels are left alone either way. One task on the supervisor's
//! thread drives all checks and reads the current snapshot each round, so reloads need no
//! bookkeeping here. (Servers reached over TLS are probed with a TCP connect.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{HealthCheck, Probe};
use crate::pool::Server;
use crate::proxy::Shared;

/// The checker's resolution: a probe runs at most this late.
const TICK: Duration = Duration::from_millis(50);

/// How long the checker sleeps while no upstream has a health check: a reload that adds
/// one is picked up within this time, and an idle gateway does not wake 20 times a second.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Probes one server once.
pub async fn probe(server: &Server, check: &HealthCheck) -> bool {
    let target = (server.config.host.as_str(), server.config.port);
    let attempt = async {
        let mut stream = TcpStream::connect(target).await.ok()?;
        let probe = if server.config.tls {
            Probe::Tcp
        } else {
            check.probe
        };
        let request = match probe {
            Probe::Tcp => return Some(true),
            Probe::Http => format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: wsgate-health\r\nConnection: close\r\n\r\n",
                check.path, server.config.addr
            ),
            Probe::WebSocket => format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: wsgate-health\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: d3NnYXRlLWhlYWx0aC1rZXk=\r\n\r\n",
                check.path, server.config.addr
            ),
        };
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        // "HTTP/1.1 101", "HTTP/1.1 204", ...
        let status = std::str::from_utf8(&head[9..12])
            .ok()?
            .parse::<u16>()
            .ok()?;
        Some(match probe {
            Probe::WebSocket => status == 101,
            _ => (200..400).contains(&status),
        })
    };
    matches!(
        tokio::time::timeout(check.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// Runs until the actix system stops.
pub async fn run(shared: web::Data<Shared>) {
    let mut next: HashMap<(String, String), Instant> = HashMap::new();
    let mut pause = TICK;
    loop {
        tokio::time::sleep(pause).await;
        let snapshot = shared.snapshot.load_full();
        let now = Instant::now();
        pause = IDLE_TICK;
        for (name, pool) in &snapshot.pools {
            let Some(check) = pool.config.health_check.clone() else {
                continue;
            };
            pause = TICK;
            for server in &pool.servers {
                let key = (name.clone(), server.config.addr.clone());
                let due = next.entry(key).or_insert(now);
                if *due > now {
                    continue;
                }
                *due = now + check.interval;
                let server = Arc::clone(server);
                let check = check.clone();
                actix_rt::spawn(async move {
                    let passed = probe(&server, &check).await;
                    server.record_probe(passed, check.rise, check.fall);
                });
            }
        }
        // Forget servers that left every pool.
        next.retain(|(name, addr), _| {
            snapshot
                .pools
                .get(name)
                .is_some_and(|p| p.servers.iter().any(|s| &s.config.addr == addr))
        });
    }
}
