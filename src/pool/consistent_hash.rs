//! Ketama consistent hashing, point for point the ring nginx builds for
//! `hash $remote_addr consistent` (`ngx_http_upstream_hash_module.c`): a user who migrates
//! from nginx keeps every client on the backend it had.
//!
//! For each server, `base = crc32(host, "\0", port)` with host and port split at the last
//! ':' of the configured text; then `weight * 160` points, each `crc32(base, prev)` where
//! `prev` is the previous point's hash as 4 little-endian bytes (0 for the first). Points
//! are sorted, equal hashes keep the first. A key maps to the first point whose hash is
//! `>= crc32(key)`, wrapping to the start. The ring depends only on the configuration, so
//! every replica, process and run agrees.

use smallvec::SmallVec;

use super::Order;
use crate::config::defaults::KETAMA_POINTS_PER_WEIGHT;

#[derive(Debug)]
pub struct KetamaRing {
    /// (hash, server index), sorted by hash.
    points: Vec<(u32, usize)>,
    servers: usize,
}

impl KetamaRing {
    /// `servers` yields each server's configured `host:port` text and weight.
    pub fn new<'a>(servers: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let mut points = Vec::new();
        let mut count = 0;
        for (index, (addr, weight)) in servers.into_iter().enumerate() {
            count += 1;
            let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
            let mut base = crc32fast::Hasher::new();
            base.update(host.as_bytes());
            base.update(&[0]);
            base.update(port.as_bytes());
            let mut prev: u32 = 0;
            for _ in 0..weight * KETAMA_POINTS_PER_WEIGHT {
                let mut h = base.clone();
                h.update(&prev.to_le_bytes());
                prev = h.finalize();
                points.push((prev, index));
            }
        }
        // Stable sort + dedup keeps the earlier server on a (rare) hash collision.
        points.sort_by_key(|p| p.0);
        points.dedup_by_key(|p| p.0);
        KetamaRing {
            points,
            servers: count,
        }
    }

    /// Server indices for `key`: its ring successor first, then the next distinct servers
    /// walking the ring (nginx's order when a server fails).
    pub fn order(&self, key: &[u8]) -> Order {
        let mut out = Order::new();
        if self.points.is_empty() {
            return out;
        }
        let hash = crc32fast::hash(key);
        let start = self.points.partition_point(|p| p.0 < hash);
        let mut seen: SmallVec<[bool; 16]> = smallvec::smallvec![false; self.servers];
        for k in 0..self.points.len() {
            let server = self.points[(start + k) % self.points.len()].1;
            if !seen[server] {
                seen[server] = true;
                out.push(server);
                if out.len() == self.servers {
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nginx_chash");

    /// Golden vectors recorded from real nginx by `tests/fixtures/nginx_chash/record.py`.
    #[test]
    fn matches_nginx_hash_remote_addr_consistent() {
        let mut sets = 0;
        for set in ["three", "five", "mixed"] {
            let servers = std::fs::read_to_string(format!("{FIXTURES}/{set}.servers")).unwrap();
            let servers: Vec<(String, u32)> = servers
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let (addr, weight) = l.split_once(' ').unwrap();
                    (addr.to_string(), weight.trim().parse().unwrap())
                })
                .collect();
            let ring = KetamaRing::new(servers.iter().map(|(a, w)| (a.as_str(), *w)));
            let csv = std::fs::read_to_string(format!("{FIXTURES}/{set}.csv")).unwrap();
            let mut checked = 0;
            for line in csv.lines().skip(1) {
                let (client, expected) = line.split_once(',').unwrap();
                let got = &servers[ring.order(client.as_bytes())[0]].0;
                assert_eq!(got, expected, "set {set}, client {client}");
                checked += 1;
            }
            assert!(checked >= 1000, "set {set} has only {checked} vectors");
            sets += 1;
        }
        assert_eq!(sets, 3);
    }

    #[test]
    fn ring_ignores_server_order() {
        let a = KetamaRing::new([("10.0.0.1:80", 1), ("10.0.0.2:80", 2)]);
        let b = KetamaRing::new([("10.0.0.2:80", 2), ("10.0.0.1:80", 1)]);
        for i in 0..500 {
            let key = format!("192.168.{}.{}", i / 250, i % 250);
            let name =
                |ring: &KetamaRing, order: [&'static str; 2]| order[ring.order(key.as_bytes())[0]];
            assert_eq!(
                name(&a, ["10.0.0.1:80", "10.0.0.2:80"]),
                name(&b, ["10.0.0.2:80", "10.0.0.1:80"])
            );
        }
    }

    #[test]
    fn removing_a_server_moves_only_its_own_keys() {
        let full = KetamaRing::new([("a:1", 1), ("b:1", 1), ("c:1", 1), ("d:1", 1)]);
        let without_c = KetamaRing::new([("a:1", 1), ("b:1", 1), ("d:1", 1)]);
        let names_full = ["a", "b", "c", "d"];
        let names_less = ["a", "b", "d"];
        let mut moved = 0;
        for i in 0..2000 {
            let key = format!("10.{}.{}.1", i / 256, i % 256);
            let before = names_full[full.order(key.as_bytes())[0]];
            let after = names_less[without_c.order(key.as_bytes())[0]];
            if before != "c" {
                assert_eq!(before, after, "key {key} moved although its server stayed");
            } else {
                moved += 1;
            }
        }
        assert!(
            moved > 200,
            "c should own about a quarter of the keys, owned {moved}"
        );
    }
}
