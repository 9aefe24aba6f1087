//! Upstream pools: the servers of each upstream, their live counters, and the balancers
//! that order them for a new connection.
//!
//! A [`Pool`] is immutable once built except for atomics and the round-robin cursor, so
//! every worker reads it through the published snapshot without a mailbox. Balancers only
//! *order* candidates (first choice first, each server at most once); the dialer walks that
//! order, so retry and health filtering stay outside the algorithms.

mod consistent_hash;
mod round_robin;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{Balance, ServerConfig, UpstreamConfig};

pub use consistent_hash::KetamaRing;
pub use round_robin::SmoothWeightedRoundRobin;

/// A backend server as the running gateway knows it. Shared by every snapshot whose pool
/// lists the same address, so its counters survive reloads.
#[derive(Debug)]
pub struct Server {
    pub config: ServerConfig,
    /// Tunnels currently open to this server, across all workers.
    live_tunnels: AtomicUsize,
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        Server {
            config,
            live_tunnels: AtomicUsize::new(0),
        }
    }

    pub fn live_tunnels(&self) -> usize {
        self.live_tunnels.load(Ordering::Relaxed)
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
}

/// The servers of one upstream and the algorithm that orders them.
#[derive(Debug)]
pub struct Pool {
    pub config: Arc<UpstreamConfig>,
    pub servers: Vec<Arc<Server>>,
    /// Client TLS settings for the servers reached over TLS.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    balancer: Balancer,
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
        let balancer = match config.balance {
            Balance::RoundRobin => Balancer::RoundRobin(SmoothWeightedRoundRobin::new(
                config.servers.iter().map(|s| s.weight),
            )),
            Balance::ConsistentHash => Balancer::ConsistentHash(KetamaRing::new(
                config.servers.iter().map(|s| (s.addr.as_str(), s.weight)),
            )),
        };
        Pool {
            config,
            servers,
            tls,
            balancer,
        }
    }

    /// The servers to try for a new connection from `client`, best first, each once.
    pub fn candidates(&self, client: IpAddr) -> Vec<Arc<Server>> {
        let order: Vec<usize> = match &self.balancer {
            Balancer::RoundRobin(rr) => rr.order(),
            Balancer::ConsistentHash(ring) => ring.order(hash_key(client).as_bytes()),
        };
        order
            .into_iter()
            .map(|i| Arc::clone(&self.servers[i]))
            .collect()
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
            servers: servers
                .iter()
                .map(|(addr, weight)| {
                    let (host, port) = addr.rsplit_once(':').unwrap();
                    ServerConfig {
                        addr: addr.to_string(),
                        host: host.into(),
                        port: port.parse().unwrap(),
                        weight: *weight,
                        tls: false,
                    }
                })
                .collect(),
            drain_timeout: std::time::Duration::ZERO,
            drain_spread: std::time::Duration::ZERO,
            tls: Default::default(),
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
                let order = pool.candidates(IpAddr::from([10, 1, 0, i]));
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
