//! Edge protection counters: how many tunnels are open in total, per route and per client
//! address, and the permits that hold a tunnel's place until it ends; and the process's
//! open-file limit, which caps the total whatever the configuration says.
//!
//! Every handshake takes three permits and every tunnel's end gives them back, so what a
//! count costs is paid twice per connection: the gateway-wide count is one atomic, and
//! the per-key counts hash their key with a hasher chosen for who picks the keys.
//!
//! Each tunnel holds two sockets, so a gateway whose open-file limit is lower than twice
//! its tunnels would run out of descriptors mid-handshake: `accept` fails and clients
//! wait in the kernel's queue with no answer. Instead the total is capped at what the
//! limit leaves room for ([`tunnel_room`]), and an upgrade above it gets the same 503 +
//! `Retry-After` as one above `max_connections`, while a reserve of descriptors keeps
//! the gateway able to accept, answer plain HTTP and refuse.

use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// Live tunnels per key, shared by every worker. `S` hashes the keys: keys a client
/// chooses (its address) need the standard library's keyed SipHash, so that nobody can
/// send a run of addresses that collide; keys from the configuration (route names) can
/// take a faster hasher.
#[derive(Debug)]
pub struct Counter<K, S = RandomState>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    S: BuildHasher + Clone,
{
    counts: DashMap<K, usize, S>,
}

impl<K, S> Default for Counter<K, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    S: BuildHasher + Default + Clone,
{
    fn default() -> Self {
        Counter {
            counts: DashMap::default(),
        }
    }
}

impl<K, S> Counter<K, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    S: BuildHasher + Clone,
{
    /// A place for one more tunnel under `key`, unless `max` (0 = no limit) are open.
    pub fn acquire(self: &Arc<Self>, key: K, max: usize) -> Option<Permit<K, S>> {
        let mut count = self.counts.entry(key.clone()).or_insert(0);
        if max != 0 && *count >= max {
            return None;
        }
        *count += 1;
        drop(count);
        Some(Permit {
            counter: Arc::clone(self),
            key,
        })
    }

    pub fn count(&self, key: &K) -> usize {
        self.counts.get(key).map_or(0, |c| *c)
    }
}

/// One tunnel's place under a key, given back when dropped.
#[derive(Debug)]
pub struct Permit<K, S = RandomState>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    S: BuildHasher + Clone,
{
    counter: Arc<Counter<K, S>>,
    key: K,
}

impl<K, S> Drop for Permit<K, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    S: BuildHasher + Clone,
{
    fn drop(&mut self) {
        // Remove the entry at zero so that addresses seen once do not accumulate.
        self.counter.counts.remove_if_mut(&self.key, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// Live tunnels in the whole gateway: one number, so one atomic rather than a map.
#[derive(Debug, Default)]
pub struct Total {
    open: AtomicUsize,
}

impl Total {
    /// A place for one more tunnel, unless `max` (0 = no limit) are open.
    pub fn acquire(self: &Arc<Self>, max: usize) -> Option<TotalPermit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (max == 0 || open < max).then_some(open + 1)
            })
            .ok()?;
        Some(TotalPermit {
            total: Arc::clone(self),
        })
    }
}

/// One tunnel's place in the gateway-wide count, given back when dropped.
#[derive(Debug)]
pub struct TotalPermit {
    total: Arc<Total>,
}

impl Drop for TotalPermit {
    fn drop(&mut self) {
        self.total.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Route names come from the configuration, not from clients: nobody outside can choose
/// them to collide, so they take foldhash instead of SipHash.
type RouteHasher = foldhash::fast::RandomState;

/// The counters the gateway enforces its limits with.
#[derive(Debug)]
pub struct Limits {
    pub total: Arc<Total>,
    pub per_route: Arc<Counter<Arc<str>, RouteHasher>>,
    pub per_ip: Arc<Counter<IpAddr>>,
    /// The process's open-file limit when the gateway started (`None`: no limit).
    pub open_file_limit: Option<u64>,
    /// Tunnels that limit leaves room for (see [`tunnel_room`]).
    pub tunnel_room: usize,
}

impl Limits {
    /// Counters at zero, the total capped at what `open_file_limit` leaves room for.
    pub fn new(open_file_limit: Option<u64>) -> Limits {
        Limits {
            total: Arc::default(),
            per_route: Arc::default(),
            per_ip: Arc::default(),
            open_file_limit,
            tunnel_room: tunnel_room(open_file_limit),
        }
    }

    /// The gateway-wide cap in effect for `max_connections` (0 = none): the lower of it and
    /// the room the open-file limit leaves, with the name of whichever sets it (for the
    /// refusal's text).
    pub fn total_cap(&self, max_connections: usize) -> (usize, &'static str) {
        if max_connections == 0 || max_connections > self.tunnel_room {
            (self.tunnel_room, "open-file limit")
        } else {
            (max_connections, "gateway max_connections")
        }
    }
}

/// Descriptors kept out of tunnels' reach: the listening sockets (one per worker and
/// listener), the workers' event queues, the admin listener, health checks, plain HTTP
/// requests and their backend connections, and clients being refused. A fixed part for a
/// small limit, and a share of a large one, where more of everything runs; never more
/// than half the limit.
fn reserved_descriptors(limit: u64) -> u64 {
    (128 + limit / 64).min(limit / 2)
}

/// Tunnels a process with the open-file limit `limit` has room for: two sockets each,
/// after the reserve. `None` (no limit, or unknown) leaves no cap.
pub fn tunnel_room(limit: Option<u64>) -> usize {
    match limit {
        Some(limit) if limit != rlimit::INFINITY => {
            usize::try_from((limit - reserved_descriptors(limit)) / 2).unwrap_or(usize::MAX)
        }
        _ => usize::MAX,
    }
}

/// The process's open-file limit (the soft one, which the kernel enforces); `None` if
/// there is none or it cannot be read.
pub fn open_file_limit() -> Option<u64> {
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, _)) if soft != rlimit::INFINITY => Some(soft),
        _ => None,
    }
}

/// The open-file limit before and after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    pub before: u64,
    pub now: u64,
}

/// Raises the soft open-file limit to the hard one, as a server that holds a socket per
/// client should: systemd starts services with a soft limit of 1,024 (room for 440
/// tunnels) under a hard one of 524,288 that the process may raise itself to, and login
/// shells often hand out the same 1,024. What an administrator sets (`ulimit -Hn`,
/// systemd's `LimitNOFILE=`, docker's `--ulimit nofile=`) is the hard limit, and stays
/// the ceiling.
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    let (before, _) = rlimit::Resource::NOFILE.get()?;
    let now = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok(OpenFileLimit { before, now })
}

/// The permits a tunnel holds for its life.
#[derive(Debug)]
pub struct Permits {
    pub _total: TotalPermit,
    pub _route: Permit<Arc<str>, RouteHasher>,
    pub _ip: Permit<IpAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_up_to_the_limit_and_give_back_on_drop() {
        let counter = Arc::new(Counter::<&'static str>::default());
        let a = counter.acquire("x", 2).unwrap();
        let b = counter.acquire("x", 2).unwrap();
        assert!(counter.acquire("x", 2).is_none());
        assert!(counter.acquire("y", 2).is_some(), "other keys are separate");
        drop(a);
        assert_eq!(counter.count(&"x"), 1);
        assert!(counter.acquire("x", 2).is_some());
        drop(b);
        assert!(
            counter.counts.get("x").is_none(),
            "a key at zero is forgotten"
        );
    }

    #[test]
    fn zero_means_no_limit() {
        let counter = Arc::new(Counter::<u8>::default());
        let held: Vec<_> = (0..1000).map(|_| counter.acquire(1, 0).unwrap()).collect();
        assert_eq!(counter.count(&1), 1000);
        drop(held);
        assert_eq!(counter.count(&1), 0);
    }

    #[test]
    fn the_open_file_limit_leaves_room_for_two_sockets_per_tunnel_after_a_reserve() {
        // 1,024 (a shell's or systemd's default): 144 kept back.
        assert_eq!(tunnel_room(Some(1024)), 440);
        // This machine's hard limit: 440 kept back.
        assert_eq!(tunnel_room(Some(20_000)), 9_780);
        // Docker's and systemd's usual hard limits: a share of ~1.6 % kept back.
        assert_eq!(tunnel_room(Some(524_288)), 257_984);
        // A tiny limit keeps half for everything else, and still leaves some room.
        assert_eq!(tunnel_room(Some(100)), 25);
        assert_eq!(tunnel_room(None), usize::MAX);
        assert_eq!(tunnel_room(Some(rlimit::INFINITY)), usize::MAX);
    }

    #[test]
    fn the_total_cap_is_the_lower_of_max_connections_and_the_room() {
        let limits = Limits::new(Some(20_000));
        assert_eq!(limits.total_cap(100), (100, "gateway max_connections"));
        assert_eq!(limits.total_cap(9_780), (9_780, "gateway max_connections"));
        assert_eq!(limits.total_cap(65_536), (9_780, "open-file limit"));
        assert_eq!(limits.total_cap(0), (9_780, "open-file limit"));
    }

    #[test]
    fn the_total_counts_up_to_its_limit_and_gives_back_on_drop() {
        let total = Arc::new(Total::default());
        let open = |total: &Total| total.open.load(Ordering::Acquire);
        let a = total.acquire(2).unwrap();
        let b = total.acquire(2).unwrap();
        assert!(total.acquire(2).is_none(), "a third over a limit of 2");
        assert_eq!(open(&total), 2, "a refused permit is not counted");
        drop(a);
        let c = total.acquire(2).unwrap();
        drop((b, c));
        assert_eq!(open(&total), 0);
        let unlimited: Vec<_> = (0..1000).map(|_| total.acquire(0).unwrap()).collect();
        assert_eq!(open(&total), 1000);
        drop(unlimited);
        assert_eq!(open(&total), 0);
    }
}
