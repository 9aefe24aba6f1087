//! Edge protection counters: how many tunnels are open in total, per route and per client
//! address, and the permits that hold a tunnel's place until it ends.
//!
//! Every handshake takes three permits and every tunnel's end gives them back, so what a
//! count costs is paid twice per connection: the gateway-wide count is one atomic, and
//! the per-key counts hash their key with a hasher chosen for who picks the keys.

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
#[derive(Debug, Default)]
pub struct Limits {
    pub total: Arc<Total>,
    pub per_route: Arc<Counter<Arc<str>, RouteHasher>>,
    pub per_ip: Arc<Counter<IpAddr>>,
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
