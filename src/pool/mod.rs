//! Upstream pools: the servers of each upstream, their live counters, and the balancers
//! that order them for a new connection.
//!
//! A [`Pool`] is immutable once built except for atomics and the round-robin cursor, so
//! every worker reads it through the published snapshot without a mailbox. Balancers only
//! *order* candidates (first choice first, each server at most once); the dialer walks that
//! order, so retry and health filtering stay outside the algorithms.

mod consistent_hash;
mod round_robin;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::config::{Balance, ServerConfig, UpstreamConfig};

/// Positions of servers in a balancer's list, in the order to try them: on the stack for
/// the pools of up to 8 servers that most upstreams are, since one is made per handshake.
pub type Order = SmallVec<[usize; 8]>;

/// The servers to try for one new connection, best first (see [`Pool::candidates`]).
/// Room for 4 rather than [`Order`]'s 8: the list lives in the handshake's future across
/// every dial, and that future is allocated per connection; a larger pool spills to the
/// heap, as every pool did before.
pub type Candidates = SmallVec<[Arc<Server>; 4]>;

pub use consistent_hash::KetamaRing;
pub use round_robin::SmoothWeightedRoundRobin;

/// A backend server as the running gateway knows it. Shared by every snapshot whose pool
/// lists the same address, so its counters survive reloads.
#[derive(Debug)]
pub struct Server {
    /// The endpoint (address, host, port, TLS) as first configured. A reload that keeps the
    /// server keeps this too: its weight and role now are in the pool's `config.servers`.
    pub config: ServerConfig,
    /// The server's socket address when its host is an IP address, parsed once: such a
    /// server is dialled without a name lookup.
    pub address: Option<SocketAddr>,
    /// Tunnels currently open to this server, across all workers.
    live_tunnels: AtomicUsize,
    /// Passive health: failures in the current window, the window's start, and until when
    /// the server is out (milliseconds on the process clock).
    fails: AtomicU32,
    window_start_ms: AtomicU64,
    down_until_ms: AtomicU64,
    /// Active health: up (the default until probes say otherwise), and how many probes in
    /// a row have disagreed with that.
    active_up: AtomicBool,
    streak: AtomicU32,
}

/// Milliseconds since the process started: a clock shared by every worker.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        let address = config
            .host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, config.port));
        Server {
            config,
            address,
            live_tunnels: AtomicUsize::new(0),
            fails: AtomicU32::new(0),
            window_start_ms: AtomicU64::new(0),
            down_until_ms: AtomicU64::new(0),
            active_up: AtomicBool::new(true),
            streak: AtomicU32::new(0),
        }
    }

    pub fn live_tunnels(&self) -> usize {
        self.live_tunnels.load(Ordering::Relaxed)
    }

    /// Neither taken out by passive health (recent failures) nor by active probes.
    pub fn available(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
            && self.down_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    /// Up according to active health checks.
    pub fn healthy(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    /// One active probe's result: `fall` failures in a row take an up server out, `rise`
    /// passes in a row bring a down one back.
    pub fn record_probe(&self, passed: bool, rise: u32, fall: u32) {
        let up = self.active_up.load(Ordering::Relaxed);
        if passed == up {
            self.streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= if up { fall } else { rise } {
            self.active_up.store(!up, Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
            if up {
                tracing::warn!(server = %self.config, "health check failed {fall} times: out of rotation");
            } else {
                tracing::info!(server = %self.config, "health check passed {rise} times: back in rotation");
            }
        }
    }

    /// A connect failure or timeout (not a refused upgrade): after `max_fails` of them within
    /// `fail_timeout`, the server is out for `fail_timeout` (nginx's passive health check).
    pub fn record_failure(&self, max_fails: u32, fail_timeout: Duration) {
        if max_fails == 0 {
            return;
        }
        let now = now_ms();
        let window = fail_timeout.as_millis() as u64;
        if now.saturating_sub(self.window_start_ms.load(Ordering::Relaxed)) > window {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
        }
        if self.fails.fetch_add(1, Ordering::Relaxed) + 1 >= max_fails {
            self.down_until_ms.store(now + window, Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
            tracing::warn!(server = %self.config, ?fail_timeout, "server failed {max_fails} time(s): out of rotation");
        }
    }

    /// A tunnel was established: the failure count starts over.
    pub fn record_success(&self) {
        self.fails.store(0, Ordering::Relaxed);
    }

    /// Counts a tunnel to this server until the returned lease is dropped.
    pub fn lease(self: &Arc<Self>) -> ServerLease {
        self.live_tunnels.fetch_add(1, Ordering::Relaxed);
        ServerLease(Arc::clone(self))
    }
}

/// One live tunnel's hold on a server (HAProxy's `server_take_conn`/`server_drop_conn`).
#[derive(Debug)]
pub struct ServerLease(Arc<Server>);

impl ServerLease {
    pub fn server(&self) -> &Arc<Server> {
        &self.0
    }
}

impl Drop for ServerLease {
    fn drop(&mut self) {
        self.0.live_tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum Balancer {
    RoundRobin(SmoothWeightedRoundRobin),
    ConsistentHash(KetamaRing),
    /// Ties among the least loaded go round-robin, from this cursor.
    LeastConn(AtomicUsize),
}

/// The servers of one upstream and the algorithm that orders them.
#[derive(Debug)]
pub struct Pool {
    pub config: Arc<UpstreamConfig>,
    /// Every server, in configuration order (index-aligned with `config.servers`).
    pub servers: Vec<Arc<Server>>,
    /// Client TLS settings for the servers reached over TLS.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Indices into `servers` of the servers the balancer orders, and of the backups, which
    /// are tried only after all of those (nginx's `backup`), in a rotation of their own.
    primary: Vec<usize>,
    backup: Vec<usize>,
    balancer: Balancer,
    backup_rotation: SmoothWeightedRoundRobin,
}

impl Pool {
    /// Builds the pool for `config`, taking existing [`Server`]s from `existing` where the
    /// address is the same so that live counters carry over.
    pub fn build(
        config: Arc<UpstreamConfig>,
        tls: Option<Arc<rustls::ClientConfig>>,
        existing: impl Fn(&ServerConfig) -> Option<Arc<Server>>,
    ) -> Pool {
        let servers: Vec<Arc<Server>> = config
            .servers
            .iter()
            .map(|s| existing(s).unwrap_or_else(|| Arc::new(Server::new(s.clone()))))
            .collect();
        let (backup, primary): (Vec<usize>, Vec<usize>) =
            (0..servers.len()).partition(|&i| config.servers[i].backup);
        let weights = |indices: &[usize]| -> Vec<u32> {
            indices.iter().map(|&i| config.servers[i].weight).collect()
        };
        let balancer = match config.balance {
            Balance::RoundRobin => {
                Balancer::RoundRobin(SmoothWeightedRoundRobin::new(weights(&primary)))
            }
            Balance::ConsistentHash => Balancer::ConsistentHash(KetamaRing::new(
                primary
                    .iter()
                    .map(|&i| (config.servers[i].addr.as_str(), config.servers[i].weight)),
            )),
            Balance::LeastConn => Balancer::LeastConn(AtomicUsize::new(0)),
        };
        let backup_rotation = SmoothWeightedRoundRobin::new(weights(&backup));
        Pool {
            config,
            servers,
            tls,
            primary,
            backup,
            balancer,
            backup_rotation,
        }
    }

    /// The servers to try for a new connection from `client`, best first, each once;
    /// servers out of rotation (health checks) or at their `max_connections` are left out.
    /// A consistent-hash pool hashes `key` (the request's value of its `hash_key`) or,
    /// without one, the client.
    pub fn candidates(&self, client: IpAddr, key: Option<&[u8]>) -> Candidates {
        let n = self.primary.len();
        // Positions in `primary`.
        let order: Order = match &self.balancer {
            Balancer::RoundRobin(rr) => rr.order(),
            Balancer::ConsistentHash(ring) => {
                let order = match key {
                    Some(key) => ring.order(key),
                    None => ring.order(hash_key(client).as_bytes()),
                };
                match self.config.hash_balance_percent {
                    0 => order,
                    percent => self.bounded(order, percent),
                }
            }
            Balancer::LeastConn(cursor) => {
                let start = cursor.fetch_add(1, Ordering::Relaxed);
                let mut order: Order = (0..n).map(|k| (start + k) % n).collect();
                // Load relative to weight (live_a / w_a < live_b / w_b, cross-multiplied);
                // the sort is stable, so ties keep the rotated order.
                let live: SmallVec<[u64; 8]> = self
                    .primary
                    .iter()
                    .map(|&i| self.servers[i].live_tunnels() as u64)
                    .collect();
                let weight = |k: usize| u64::from(self.config.servers[self.primary[k]].weight);
                order.sort_by(|&a, &b| (live[a] * weight(b)).cmp(&(live[b] * weight(a))));
                order
            }
        };
        let backups = if self.backup.is_empty() {
            Order::new()
        } else {
            self.backup_rotation.order()
        };
        order
            .into_iter()
            .map(|k| self.primary[k])
            .chain(backups.into_iter().map(|k| self.backup[k]))
            .filter(|&i| self.servers[i].available() && self.has_room(i))
            .map(|i| Arc::clone(&self.servers[i]))
            .collect()
    }

    /// Server `i` is under its `max_connections` (a limit a burst of handshakes on several
    /// workers may overshoot by a few: the count is read, not reserved).
    fn has_room(&self, i: usize) -> bool {
        match self.config.servers[i].max_connections {
            0 => true,
            max => self.servers[i].live_tunnels() < max as usize,
        }
    }

    /// Consistent hashing with bounded loads (Mirrokni et al.; HAProxy's and Envoy's
    /// `hash_balance_factor`): servers already holding more than `percent`% of the average
    /// (counting the new tunnel) go to the back of the ring order, so keys stay sticky
    /// while their server is under the bound and move to the next ring server when not.
    fn bounded(&self, order: Order, percent: u32) -> Order {
        let live = |k: usize| self.servers[self.primary[k]].live_tunnels();
        let total: usize = (0..self.primary.len()).map(live).sum();
        let n = self.primary.len().max(1);
        // ceil(factor × (total + 1) / n)
        let bound = ((total + 1) * percent as usize).div_ceil(n * 100);
        let (under, over): (Order, Order) = order.into_iter().partition(|&k| live(k) < bound);
        under.into_iter().chain(over).collect()
    }
}

/// The client address as nginx writes `$remote_addr` (IPv4-mapped IPv6 as plain IPv4),
/// so consistent hashing maps clients exactly as `hash $remote_addr consistent` does.
pub fn hash_key(client: IpAddr) -> String {
    client.to_canonical().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;

    fn upstream(balance: Balance, servers: &[(&str, u32)]) -> Arc<UpstreamConfig> {
        Arc::new(UpstreamConfig {
            name: "u".into(),
            balance,
            hash_key: crate::config::HashKey::RemoteAddr,
            servers: servers
                .iter()
                .map(|(addr, weight)| {
                    // "~" in front of an address makes it a backup.
                    let (addr, backup) = match addr.strip_prefix('~') {
                        Some(addr) => (addr, true),
                        None => (*addr, false),
                    };
                    let (host, port) = addr.rsplit_once(':').unwrap();
                    ServerConfig {
                        addr: addr.to_string(),
                        host: host.into(),
                        port: port.parse().unwrap(),
                        weight: *weight,
                        backup,
                        max_connections: 0,
                        tls: false,
                    }
                })
                .collect(),
            drain_timeout: std::time::Duration::ZERO,
            drain_spread: std::time::Duration::ZERO,
            tls: Default::default(),
            hash_balance_percent: 0,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            health_check: None,
        })
    }

    #[test]
    fn candidates_list_every_server_once_first_choice_first() {
        for balance in [Balance::RoundRobin, Balance::ConsistentHash] {
            let pool = Pool::build(
                upstream(
                    balance,
                    &[("10.0.0.1:1", 1), ("10.0.0.2:1", 3), ("10.0.0.3:1", 1)],
                ),
                None,
                |_| None,
            );
            for i in 0..50u8 {
                let order = pool.candidates(IpAddr::from([10, 1, 0, i]), None);
                let mut addrs: Vec<&str> = order.iter().map(|s| s.config.addr.as_str()).collect();
                addrs.sort();
                assert_eq!(
                    addrs,
                    ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"],
                    "{balance:?}"
                );
            }
        }
    }

    #[test]
    fn backups_come_after_every_other_server_and_first_once_those_are_out() {
        for balance in [
            Balance::RoundRobin,
            Balance::ConsistentHash,
            Balance::LeastConn,
        ] {
            let pool = Pool::build(
                upstream(
                    balance,
                    &[
                        ("~10.0.0.9:1", 1),
                        ("10.0.0.1:1", 1),
                        ("~10.0.0.8:1", 1),
                        ("10.0.0.2:1", 2),
                    ],
                ),
                None,
                |_| None,
            );
            let backups = |order: &[Arc<Server>]| -> Vec<bool> {
                order.iter().map(|s| s.config.backup).collect()
            };
            let mut first_backup = std::collections::HashSet::new();
            for i in 0..40u8 {
                let order = pool.candidates(IpAddr::from([10, 1, 0, i]), None);
                assert_eq!(backups(&order), [false, false, true, true], "{balance:?}");
                first_backup.insert(order[2].config.addr.clone());
            }
            assert_eq!(first_backup.len(), 2, "the backups take turns: {balance:?}");
            // Both others out of rotation: the backups are the candidates.
            for i in [1, 3] {
                pool.servers[i].record_failure(1, Duration::from_secs(10));
            }
            let order = pool.candidates(IpAddr::from([10, 1, 0, 1]), None);
            assert_eq!(backups(&order), [true, true], "{balance:?}");
        }
    }

    #[test]
    fn a_server_at_its_max_connections_is_left_out_until_a_tunnel_ends() {
        let mut config =
            (*upstream(Balance::RoundRobin, &[("10.0.0.1:1", 1), ("10.0.0.2:1", 1)])).clone();
        config.servers[0].max_connections = 1;
        let pool = Pool::build(Arc::new(config), None, |_| None);
        let client = IpAddr::from([10, 1, 0, 1]);
        let lease = pool.servers[0].lease();
        for _ in 0..4 {
            let order = pool.candidates(client, None);
            assert_eq!(order.len(), 1);
            assert_eq!(order[0].config.addr, "10.0.0.2:1");
        }
        drop(lease);
        let seen: std::collections::HashSet<String> = (0..4)
            .map(|_| pool.candidates(client, None)[0].config.addr.clone())
            .collect();
        assert_eq!(seen.len(), 2, "back in rotation: {seen:?}");
    }

    #[test]
    fn rebuilt_pool_keeps_servers_and_their_counters() {
        let old = Pool::build(
            upstream(Balance::RoundRobin, &[("a:1", 1), ("b:1", 1)]),
            None,
            |_| None,
        );
        let lease = old.servers[1].lease();
        let new = Pool::build(
            upstream(Balance::ConsistentHash, &[("b:1", 1), ("c:1", 1)]),
            None,
            |s| old.servers.iter().find(|o| o.config == *s).cloned(),
        );
        assert!(Arc::ptr_eq(&new.servers[0], &old.servers[1]));
        assert_eq!(new.servers[0].live_tunnels(), 1);
        assert_eq!(new.servers[1].live_tunnels(), 0);
        drop(lease);
        assert_eq!(new.servers[0].live_tunnels(), 0);
    }

    #[test]
    fn hash_key_writes_mapped_ipv6_as_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.5".parse().unwrap();
        assert_eq!(hash_key(mapped), "127.0.0.5");
        assert_eq!(hash_key("::1".parse().unwrap()), "::1");
    }
}
