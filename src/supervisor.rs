//! The supervisor: owns the running configuration, the listeners and the published
//! snapshot, and is the only place they change (start, reload, shutdown).
//!
//! Workers never message it per request: they read the snapshot it publishes through
//! [`Shared`]. It lives on the main actix system thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message, ResponseActFuture, WrapFuture};
use actix_web::web;
use arc_swap::ArcSwap;

use crate::config::Config;
use crate::listener::{self, BindError, RunningListener};
use crate::proxy::Shared;
use crate::proxy::upstream_client;
use crate::snapshot::Snapshot;
use crate::tunnel::{Ending, Registry};

pub struct Supervisor {
    config: Arc<Config>,
    shared: web::Data<Shared>,
    listeners: Vec<RunningListener>,
}

/// A listener as bound, for callers that asked for port 0.
#[derive(Debug, Clone)]
pub struct BoundListener {
    pub name: String,
    pub addr: SocketAddr,
}

impl Supervisor {
    /// Binds every listener of `config` and publishes its first snapshot. Call inside an
    /// actix system.
    pub fn start(
        config: Config,
    ) -> Result<(actix::Addr<Supervisor>, Vec<BoundListener>), BindError> {
        crate::install_crypto_provider();
        let config = Arc::new(config);
        let shared = web::Data::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::build(Arc::clone(&config), 1, None)),
            registry: Arc::new(Registry::default()),
        });
        let upstream_tls = upstream_client::default_tls();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            match listener::start(
                l,
                config.gateway.workers,
                shared.clone(),
                Arc::clone(&upstream_tls),
            ) {
                Ok(running) => listeners.push(running),
                Err(err) => {
                    for started in &listeners {
                        drop(started.handle.stop(false));
                    }
                    return Err(err);
                }
            }
        }
        let bound = listeners
            .iter()
            .map(|l| BoundListener {
                name: l.config.name.clone(),
                addr: l.local_addr,
            })
            .collect();
        for l in &listeners {
            tracing::info!(listener = %l.config.name, addr = %l.local_addr, "listening");
        }
        tracing::info!(generation = 1, sha256 = %config.source.sha256, path = %config.source.path,
            routes = config.routes.len(), upstreams = config.upstreams.len(), "configuration loaded");
        let supervisor = Supervisor {
            config,
            shared,
            listeners,
        };
        Ok((supervisor.start(), bound))
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

/// Graceful shutdown: stop accepting, send every tunnel a 1001 close, wait for the close
/// handshakes (at most `shutdown_timeout`), then stop the listeners.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        let handles: Vec<_> = self.listeners.iter().map(|l| l.handle.clone()).collect();
        let registry = Arc::clone(&self.shared.registry);
        let deadline = Instant::now() + self.config.gateway.shutdown_timeout;
        tracing::info!(tunnels = registry.len(), "shutting down");
        Box::pin(
            async move {
                for handle in &handles {
                    handle.pause().await;
                }
                registry.end_all(Ending::Shutdown);
                while !registry.is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if !registry.is_empty() {
                    tracing::warn!(
                        tunnels = registry.len(),
                        "shutdown_timeout passed with tunnels still open"
                    );
                }
                for handle in handles {
                    handle.stop(false).await;
                }
                tracing::info!("stopped");
            }
            .into_actor(self),
        )
    }
}
