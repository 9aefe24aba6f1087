//! Tunnels: one per WebSocket connection, relaying frames between the client leg and the
//! backend leg and owning the connection's whole life.
//!
//! Lifecycle: the proxy upgrades the client and dials the backend ([`crate::proxy`]), then
//! [`Tunnel::start`] spawns the actor on the accepting worker. It relays frames in order on
//! each leg ([`relay`]), pings both legs ([`heartbeat`]), holds back a fast sender while the
//! other leg is slow ([`gate`]), and ends with a close frame to each leg that can still take
//! one. [`Registry`] lists live tunnels so shutdown and draining can reach them.

mod actor;
mod gate;
pub mod heartbeat;
pub mod relay;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::Recipient;
use dashmap::DashMap;

pub use actor::{BackendLeg, End, Tunnel, TunnelParams};
pub use relay::Ending;

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

/// Every live tunnel, reachable from any thread (shutdown, draining).
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    tunnels: DashMap<u64, Recipient<End>>,
}

impl Registry {
    pub fn len(&self) -> usize {
        self.tunnels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tunnels.is_empty()
    }

    /// Asks every live tunnel to end with `ending`.
    pub fn end_all(&self, ending: Ending) {
        for tunnel in self.tunnels.iter() {
            tunnel.value().do_send(End(ending));
        }
    }

    fn insert(self: &Arc<Self>, tunnel: Recipient<End>) -> RegistryEntry {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.tunnels.insert(id, tunnel);
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
