//! Edge protection counters: how many tunnels are open in total, per route and per client
//! address, and the permits that hold a tunnel's place until it ends.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

/// Live tunnels per key, shared by every worker.
#[derive(Debug)]
pub struct Counter<K: Hash + Eq + Clone + Send + Sync + 'static> {
    counts: DashMap<K, usize>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Default for Counter<K> {
    fn default() -> Self {
        Counter {
            counts: DashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Counter<K> {
    /// A place for one more tunnel under `key`, unless `max` (0 = no limit) are open.
    pub fn acquire(self: &Arc<Self>, key: K, max: usize) -> Option<Permit<K>> {
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
pub struct Permit<K: Hash + Eq + Clone + Send + Sync + 'static> {
    counter: Arc<Counter<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Drop for Permit<K> {
    fn drop(&mut self) {
        // Remove the entry at zero so that addresses seen once do not accumulate.
        self.counter.counts.remove_if_mut(&self.key, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// The counters the gateway enforces its limits with.
#[derive(Debug, Default)]
pub struct Limits {
    pub total: Arc<Counter<()>>,
    pub per_route: Arc<Counter<Arc<str>>>,
    pub per_ip: Arc<Counter<IpAddr>>,
}

/// The permits a tunnel holds for its life.
#[derive(Debug)]
pub struct Permits {
    pub _total: Permit<()>,
    pub _route: Permit<Arc<str>>,
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
}
