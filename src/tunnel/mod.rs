//! Tunnels: one per WebSocket connection, relaying frames between the client leg and the
//! backend leg and owning the connection's whole life.
//!
//! Lifecycle: the proxy dials the backend and answers the client's upgrade
//! ([`crate::proxy`]), then [`Tunnel::start`] makes the tunnel's actor and relay from both
//! raw sockets, as one future ([`TunnelTask`]) that the connection's task runs from then
//! on. The relay ([`relay`]) forwards frames as they came ([`pump`], on [`wire`]
//! headers), holds back a fast sender while the other leg is slow, and ends with a close
//! frame to each leg that can still take one ([`ending`] says which); the actor
//! ([`actor`]) pings both legs ([`heartbeat`]) and owns the tunnel's life. [`Registry`]
//! lists live tunnels so shutdown and draining can reach them.

mod actor;
pub mod ending;
pub mod heartbeat;
pub mod pump;
mod relay;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::Recipient;
use dashmap::DashMap;

pub use actor::{End, Tunnel, TunnelParams, TunnelTask};
pub use ending::Ending;
pub use relay::{ClientAddr, Io, LegIo};

use crate::pool::Server;

/// One side of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    Client = 0,
    Backend = 1,
}

impl Leg {
    pub fn other(self) -> Leg {
        match self {
            Leg::Client => Leg::Backend,
            Leg::Backend => Leg::Client,
        }
    }
}

/// A live tunnel as the registry lists it.
#[derive(Debug)]
struct Entry {
    upstream: Arc<str>,
    server: Arc<Server>,
    tunnel: Recipient<End>,
}

/// Every live tunnel, reachable from any thread (shutdown, draining).
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    /// Keyed by the registry's own sequence numbers, which no client chooses: foldhash
    /// rather than SipHash, for an insert and a remove on every tunnel.
    tunnels: DashMap<u64, Entry, foldhash::fast::RandomState>,
}

impl Registry {
    pub fn len(&self) -> usize {
        self.tunnels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tunnels.is_empty()
    }

    /// Asks every live tunnel to end with `ending`, spread uniformly (with jitter) over
    /// `spread` (zero: all at once).
    pub fn end_all(&self, ending: Ending, spread: Duration) {
        let targets: Vec<Recipient<End>> = self.tunnels.iter().map(|e| e.tunnel.clone()).collect();
        let n = targets.len().max(1);
        for (i, tunnel) in targets.into_iter().enumerate() {
            let share = (i as f64 + fastrand::f64()) / n as f64;
            tunnel.do_send(End {
                ending,
                after: spread.mul_f64(share),
            });
        }
    }

    /// Closes (1012) the tunnels that `upstream` sent to `server`: the first after
    /// `timeout`, the others spread uniformly with jitter over the following `spread`, so
    /// their clients do not reconnect in one burst. Returns how many were scheduled.
    pub fn drain(
        &self,
        upstream: &str,
        server: &str,
        timeout: Duration,
        spread: Duration,
    ) -> usize {
        let targets: Vec<Recipient<End>> = self
            .tunnels
            .iter()
            .filter(|e| &*e.upstream == upstream && e.server.config.addr == server)
            .map(|e| e.tunnel.clone())
            .collect();
        let n = targets.len();
        for (i, tunnel) in targets.into_iter().enumerate() {
            // Slot i of n, at a random point inside its slot.
            let share = (i as f64 + fastrand::f64()) / n as f64;
            tunnel.do_send(End {
                ending: Ending::Drained,
                after: timeout + spread.mul_f64(share),
            });
        }
        n
    }

    fn insert(
        self: &Arc<Self>,
        upstream: Arc<str>,
        server: Arc<Server>,
        tunnel: Recipient<End>,
    ) -> RegistryEntry {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.tunnels.insert(
            id,
            Entry {
                upstream,
                server,
                tunnel,
            },
        );
        RegistryEntry {
            id,
            registry: Arc::clone(self),
        }
    }
}

/// A tunnel's place in the registry, removed when the tunnel is dropped.
#[derive(Debug)]
struct RegistryEntry {
    id: u64,
    registry: Arc<Registry>,
}

impl Drop for RegistryEntry {
    fn drop(&mut self) {
        self.registry.tunnels.remove(&self.id);
    }
}
