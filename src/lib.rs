//! wsgate: a WebSocket-aware load-balancing gateway.
//!
//! # Architecture (one module per box)
//! - [`config`]: the TOML file → validated [`config::Config`], errors with `file:line:column`.
//! - [`supervisor`]: the actor that owns the running config, the listeners and the
//!   published [`snapshot::Snapshot`]; start, reload and shutdown happen there only.
//! - [`snapshot`]: what request handlers read: routes matched to [`pool`]s.
//! - [`pool`]: upstream servers, live counters, and balancers (smooth weighted
//!   round-robin; ketama consistent hashing compatible with nginx).
//! - [`listener`]: the worker threads and the listening sockets they all accept on;
//!   per connection: PROXY protocol, TLS, then HTTP/1.1, WebSocket upgrades taken over raw.
//! - [`proxy`]: the request path: route, then WebSocket upgrade or plain HTTP forwarding.
//! - [`tunnel`]: one actor per WebSocket connection relaying frames between its legs at the
//!   byte level (headers parsed, payloads passed through).
//! - [`watcher`]: the actor that watches the configuration file and asks for reloads.
//! - [`tls`]: TLS termination (SNI, certificate reload) and upstream TLS settings.
//! - [`limits`]: connection caps per gateway, route and client address.
//! - [`health`]: active health checks of upstream servers.
//! - [`metrics`]: every Prometheus metric name; [`admin`]: the admin listener.
//! - [`demo`]: built-in echo backends for `wsgate demo` and `wsgate echo`.
//!
//! # Lexicon
//! - **client**: who connects to the gateway; **backend**/**server**: where it forwards.
//! - **listener**: an address the gateway accepts on. **route**: host + path prefix →
//!   upstream. **upstream**: a named pool of servers with a balance algorithm.
//! - **tunnel**: one proxied WebSocket connection; its **legs** are the client side and
//!   the backend side.
//!
//! # Principles
//! Starting, reloading and connecting may be slow; relaying frames must stay cheap: no
//! per-frame allocation beyond what the codecs need, no lock, no mailbox hop.

pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
pub mod health;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod snapshot;
pub mod supervisor;
pub mod telemetry;
#[cfg(test)]
// Shared with the integration tests (tests/common), which read counters the unit tests
// do not.
#[allow(dead_code)]
mod test_sockets;
pub mod tls;
pub mod tunnel;
pub mod watcher;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use config::Config;
use supervisor::{BoundListener, Shutdown, StartError, Supervisor};

/// Selects ring as rustls' crypto provider (once per process; later calls do nothing).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs the gateway on the current actix system until SIGINT/SIGTERM, then shuts down
/// gracefully.
/// With a `path`, the file is watched and reloaded on change and on SIGHUP.
pub async fn run(config: Config, path: Option<PathBuf>) -> Result<(), StartError> {
    let started = Supervisor::start(config, path)?;
    stop_signal().await;
    // A second signal while shutting down means "now".
    actix_rt::spawn(async {
        stop_signal().await;
        tracing::warn!("second signal: exiting without waiting for tunnels");
        std::process::exit(1);
    });
    let _ = started.supervisor.send(Shutdown).await;
    Ok(())
}

/// A gateway on its own thread and actix system: for tests, benchmarks and the demo.
/// Dropping it shuts the gateway down gracefully and joins the thread.
pub struct GatewayThread {
    pub listeners: Vec<BoundListener>,
    /// The admin listener's address, if configured.
    pub admin: Option<SocketAddr>,
    shared: actix_web::web::Data<proxy::Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GatewayThread {
    pub fn spawn(config: Config) -> Result<GatewayThread, StartError> {
        Self::spawn_watching(config, None)
    }

    /// Like [`GatewayThread::spawn`], reloading from `path` when it changes.
    pub fn spawn_watching(
        config: Config,
        path: Option<PathBuf>,
    ) -> Result<GatewayThread, StartError> {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("wsgate-system".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    match Supervisor::start(config, path) {
                        Ok(started) => {
                            let _ = started_tx.send(Ok((
                                started.listeners,
                                started.shared,
                                started.admin,
                            )));
                            let _ = stop_rx.await;
                            let _ = started.supervisor.send(Shutdown).await;
                        }
                        Err(err) => {
                            let _ = started_tx.send(Err(err));
                        }
                    }
                });
            })
            .map_err(|err| StartError::Thread(err.to_string()))?;
        let started = started_rx.recv().unwrap_or_else(|_| {
            Err(StartError::Thread(
                "the gateway thread died while starting".into(),
            ))
        });
        match started {
            Ok((listeners, shared, admin)) => Ok(GatewayThread {
                listeners,
                admin,
                shared,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Err(err) => {
                let _ = thread.join();
                Err(err)
            }
        }
    }

    /// The state the gateway's workers share (snapshot, tunnels, reload counters).
    pub fn shared(&self) -> &proxy::Shared {
        &self.shared
    }

    /// The bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr)
    }

    /// Shuts down gracefully and waits for the thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for GatewayThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
