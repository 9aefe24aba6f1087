//! Smooth weighted round-robin, nginx's algorithm: with weights 5,1,1 it yields
//! a a b a c a a rather than a a a a a b c, so a heavy server never takes a burst.

use std::sync::Mutex;

use super::Order;

#[derive(Debug)]
pub struct SmoothWeightedRoundRobin {
    weights: Vec<i64>,
    total: i64,
    /// Current weights. A lock per *new connection* (never per frame) is cheap next to
    /// the TCP connect that follows it.
    current: Mutex<Vec<i64>>,
}

impl SmoothWeightedRoundRobin {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let weights: Vec<i64> = weights.into_iter().map(i64::from).collect();
        SmoothWeightedRoundRobin {
            total: weights.iter().sum(),
            current: Mutex::new(vec![0; weights.len()]),
            weights,
        }
    }

    /// Picks the next server, then the rest in configuration order after it.
    pub fn order(&self) -> Order {
        let n = self.weights.len();
        let first = {
            // A poisoned lock only means another thread panicked mid-pick; the weights
            // are still usable numbers.
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            let mut best = 0;
            for (i, w) in self.weights.iter().enumerate() {
                current[i] += w;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= self.total;
            best
        };
        (0..n).map(|k| (first + k) % n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_sequence_matches_nginx_for_5_1_1() {
        let rr = SmoothWeightedRoundRobin::new([5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| rr.order()[0]).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_alternate_and_spread_evenly() {
        let rr = SmoothWeightedRoundRobin::new([1, 1, 1]);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[rr.order()[0]] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn fallback_order_continues_after_the_pick() {
        let rr = SmoothWeightedRoundRobin::new([1, 1, 1]);
        assert_eq!(rr.order().as_slice(), [0, 1, 2]);
        assert_eq!(rr.order().as_slice(), [1, 2, 0]);
    }
}
