//! The supervisor: owns the running configuration, the listeners and the published
//! snapshot, and is the only place they change (start, reload, shutdown).
//!
//! Workers never message it per request: they read the snapshot it publishes through
//! [`Shared`]. It lives on the main actix system thread. A reload is
//! read → parse → validate → diff → apply; any failure leaves everything as it was.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context, Handler, Message, ResponseActFuture, WrapFuture};
use actix_web::dev::ServerHandle;
use actix_web::web;
use sha2::{Digest, Sha256};

use crate::config::diff::{self, Change};
use crate::config::{self, Config, ListenerConfig};
use crate::limits::Limits;
use crate::listener::{self, BindError, RunningListener, Workers};
use crate::proxy::Shared;
use crate::proxy::upstream_client;
use crate::snapshot::Snapshot;
use crate::tls::{self, CertResolver};
use crate::tunnel::Ending;
use crate::watcher::{FileWatcher, WatchAlso};

pub struct Supervisor {
    config: Arc<Config>,
    /// The file to reload from; `None` for an embedded configuration.
    path: Option<PathBuf>,
    shared: web::Data<Shared>,
    listeners: Vec<RunningListener>,
    /// The threads that accept and serve every listener's connections; `None` once shut
    /// down. Their number is fixed at start (`[gateway] workers`).
    workers: Option<Workers>,
    upstream_tls: Arc<rustls::ClientConfig>,
    watcher: Option<actix::Addr<FileWatcher>>,
    admin: Option<ServerHandle>,
}

/// The client TLS settings of every upstream that has TLS servers.
fn upstream_tls(config: &Config) -> Result<HashMap<String, Arc<rustls::ClientConfig>>, StartError> {
    let mut out = HashMap::new();
    for (name, upstream) in &config.upstreams {
        if !upstream.servers.iter().any(|s| s.tls) {
            continue;
        }
        if upstream.tls.insecure_skip_verify {
            tracing::warn!(upstream = %name, "insecure_skip_verify: the certificates of this upstream's servers are not verified");
        }
        let client =
            tls::upstream_client_config(&upstream.tls).map_err(|source| StartError::Tls {
                name: format!("upstream {name}"),
                source,
            })?;
        out.insert(name.clone(), client);
    }
    Ok(out)
}

/// Every certificate and key file the configuration names (the watcher watches them).
fn cert_files(config: &Config) -> Vec<PathBuf> {
    config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .flat_map(|tls| {
            tls.certs
                .iter()
                .flat_map(|c| [c.cert.clone(), c.key.clone()])
        })
        .collect()
}

/// A TLS listener's certificates, loaded (a bad file fails the start or the reload).
fn certificates(l: &ListenerConfig) -> Result<Option<Arc<CertResolver>>, StartError> {
    match &l.tls {
        None => Ok(None),
        Some(tls) => Ok(Some(CertResolver::new(tls::load_all(tls).map_err(
            |source| StartError::Tls {
                name: l.name.clone(),
                source,
            },
        )?))),
    }
}

/// Binds and starts the admin listener at `addr`, if one is configured; returns its handle
/// and the address bound.
fn start_admin(
    addr: Option<SocketAddr>,
    shared: &web::Data<Shared>,
) -> Result<(Option<ServerHandle>, Option<SocketAddr>), StartError> {
    let Some(addr) = addr else {
        return Ok((None, None));
    };
    let (handle, bound) = crate::admin::start(addr, shared.clone()).map_err(|source| {
        StartError::Bind(BindError {
            name: "admin".into(),
            bind: addr,
            source,
        })
    })?;
    Ok((Some(handle), Some(bound)))
}

/// Why the gateway could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("{name}: {source}")]
    Tls { name: String, source: tls::TlsError },
    #[error("cannot start the gateway thread: {0}")]
    Thread(String),
}

/// A listener as bound, for callers that asked for port 0.
#[derive(Debug, Clone)]
pub struct BoundListener {
    pub name: String,
    pub addr: SocketAddr,
}

/// What [`Supervisor::start`] hands back.
pub struct Started {
    pub supervisor: actix::Addr<Supervisor>,
    pub listeners: Vec<BoundListener>,
    pub shared: web::Data<Shared>,
    /// Where the admin listener is bound, if configured.
    pub admin: Option<SocketAddr>,
}

/// Says when `max_connections` asks for more tunnels than the open-file limit leaves room
/// for: upgrades above the room get 503 whatever the file says, and the fix is outside
/// the file.
fn warn_if_out_of_room(limits: &Limits, max_connections: usize) {
    if max_connections > limits.tunnel_room {
        tracing::warn!(
            max_connections,
            open_file_limit = limits.open_file_limit,
            tunnel_room = limits.tunnel_room,
            "max_connections is more tunnels than the open-file limit leaves room for: \
             upgrades above tunnel_room get 503; raise the hard limit (ulimit -Hn, systemd \
             LimitNOFILE=, docker --ulimit nofile=) or lower max_connections"
        );
    }
}

impl Supervisor {
    /// Binds every listener of `config`, publishes its first snapshot and, with a `path`,
    /// watches that file for changes. Call inside an actix system.
    pub fn start(config: Config, path: Option<PathBuf>) -> Result<Started, StartError> {
        crate::install_crypto_provider();
        let config = Arc::new(config);
        let shared = web::Data::new(Shared::new(Snapshot::build(
            Arc::clone(&config),
            1,
            None,
            &upstream_tls(&config)?,
        )));
        let upstream_tls = upstream_client::default_tls();
        let mut bound = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            bound.push((listener::bind(l)?, certificates(l)?));
        }
        let workers = Workers::start(config.gateway.workers);
        let mut listeners = Vec::with_capacity(bound.len());
        for (socket, tls) in bound {
            let running = listener::prepare(
                socket,
                &workers,
                shared.clone(),
                Arc::clone(&upstream_tls),
                tls,
                config.gateway.client_header_timeout,
            )?
            .serve();
            tracing::info!(listener = %running.config.name, addr = %running.local_addr, "listening");
            listeners.push(running);
        }
        let bound = listeners
            .iter()
            .map(|l| BoundListener {
                name: l.config.name.clone(),
                addr: l.local_addr,
            })
            .collect();
        tracing::info!(generation = 1, sha256 = %config.source.sha256, path = %config.source.path,
            routes = config.routes.len(), upstreams = config.upstreams.len(), "configuration loaded");
        match shared.limits.open_file_limit {
            Some(limit) => tracing::info!(
                open_file_limit = limit,
                tunnel_room = shared.limits.tunnel_room,
                "open files: the limit leaves room for tunnel_room tunnels (two sockets each, after a reserve)"
            ),
            None => tracing::info!("open files: no limit"),
        }
        warn_if_out_of_room(&shared.limits, config.gateway.max_connections);
        // The watcher is in place before this returns, so no edit made after start is missed.
        let ctx = Context::<Supervisor>::new();
        let watcher = path.as_ref().and_then(|path| {
            FileWatcher::start(path, ctx.address().recipient())
                .map_err(|err| {
                    tracing::warn!("not watching {}: {err}; reload with SIGHUP", path.display())
                })
                .ok()
        });
        if let Some(watcher) = &watcher {
            watcher.do_send(WatchAlso(cert_files(&config)));
        }
        let (admin, admin_addr) = start_admin(config.gateway.admin, &shared)?;
        if let Some(addr) = admin_addr {
            tracing::info!(addr = %addr, "admin listening");
        }
        let supervisor = Supervisor {
            admin,
            config,
            path,
            shared: shared.clone(),
            listeners,
            workers: Some(workers),
            upstream_tls,
            watcher,
        };
        Ok(Started {
            supervisor: ctx.run(supervisor),
            listeners: bound,
            shared,
            admin: admin_addr,
        })
    }

    fn reject(&self, problem: &dyn std::fmt::Display) {
        self.shared.reloads_rejected.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.reload("rejected");
        tracing::error!(
            generation = self.shared.generation(),
            "reload rejected, configuration unchanged: {problem}"
        );
    }

    fn reload(&mut self, trigger: &str) {
        let Some(path) = self.path.clone() else {
            tracing::warn!(
                trigger,
                "reload asked for, but the configuration is embedded"
            );
            return;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => return self.reject(&format!("{}: cannot read: {err}", path.display())),
        };
        // Reading the file fires events of its own, and editors write twice: the same
        // bytes are no change.
        if format!("{:x}", Sha256::digest(text.as_bytes())) == self.config.source.sha256 {
            // The certificates may have changed instead.
            self.reload_certificates();
            return;
        }
        let new = match config::parse(&text, &path.display().to_string()) {
            Ok(new) => Arc::new(new),
            Err(err) => return self.reject(&err),
        };
        let changes = diff::diff(&self.config, &new);
        if let Err(err) = self.apply(&new, &changes) {
            return self.reject(&err);
        }
        let generation = self.shared.generation();
        tracing::info!(generation, sha256 = %new.source.sha256, trigger,
            changes = %diff::summary(&changes), "configuration applied");
        if new.gateway.max_connections != self.config.gateway.max_connections {
            warn_if_out_of_room(&self.shared.limits, new.gateway.max_connections);
        }
        self.shared.metrics.reload("applied");
        self.drain(&changes, &new);
        self.config = new;
        self.reload_certificates();
        if let Some(watcher) = &self.watcher {
            watcher.do_send(WatchAlso(cert_files(&self.config)));
        }
    }

    /// Reads every TLS listener's certificates again; a file that does not load keeps the
    /// certificate in use, and says why.
    fn reload_certificates(&self) {
        for l in &self.listeners {
            let (Some(resolver), Some(tls)) = (
                &l.tls,
                self.config
                    .listeners
                    .iter()
                    .find(|c| c.name == l.config.name)
                    .and_then(|c| c.tls.as_ref()),
            ) else {
                continue;
            };
            match resolver.reload(tls) {
                Ok(()) => tracing::debug!(listener = %l.config.name, "certificates loaded"),
                Err(err) => tracing::error!(listener = %l.config.name,
                    "certificate not reloaded, the current one stays: {err}"),
            }
        }
    }

    /// Binds and readies what is new, then publishes the snapshot, retires what is gone and
    /// serves what is new. Everything that can fail (binding, certificates, a socket handle
    /// per worker, the admin address) happens before anything changes, so a reload is
    /// applied whole or not at all.
    fn apply(&mut self, new: &Arc<Config>, changes: &[Change]) -> Result<(), StartError> {
        let mut bound = Vec::new();
        let mut served_again = Vec::new();
        for change in changes {
            let (Change::ListenerAdded(name)
            | Change::ListenerRebound(name)
            | Change::ListenerChanged(name)) = change
            else {
                continue;
            };
            let Some(l) = new.listeners.iter().find(|l| &l.name == name) else {
                continue;
            };
            if let Change::ListenerChanged(_) = change {
                // Same address, new settings: the running socket is served again with them,
                // and connections already accepted keep the old ones.
                if let Some(running) = self.listeners.iter().find(|o| o.config.name == *name) {
                    served_again.push((running.reuse(l)?, certificates(l)?));
                }
            } else {
                // A listener taking over the exact address of one this reload removes fails
                // here: the old socket is still open, and closing it first could not be undone
                // if the reload is then rejected. Such a move takes two reloads.
                bound.push((listener::bind(l)?, certificates(l)?));
            }
        }
        // Each worker's handle on the sockets (a descriptor each: this fails when the
        // gateway is out of them). Shutting down (a SIGHUP can still arrive), nothing new
        // is served any more.
        let (added, changed) = match &self.workers {
            Some(workers) => {
                let prepare = |(socket, tls)| {
                    listener::prepare(
                        socket,
                        workers,
                        self.shared.clone(),
                        Arc::clone(&self.upstream_tls),
                        tls,
                        new.gateway.client_header_timeout,
                    )
                };
                (
                    bound
                        .into_iter()
                        .map(prepare)
                        .collect::<Result<Vec<_>, _>>()?,
                    served_again
                        .into_iter()
                        .map(prepare)
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
            None => (Vec::new(), Vec::new()),
        };
        let tls = upstream_tls(new)?;
        // A new admin address is bound last of all that can fail (a server once started has
        // to be stopped); the old one closes once everything is applied.
        let admin = if self.workers.is_some() && new.gateway.admin != self.config.gateway.admin {
            Some(start_admin(new.gateway.admin, &self.shared)?)
        } else {
            None
        };
        let generation = self.shared.generation() + 1;
        let previous = self.shared.snapshot.load_full();
        self.shared.snapshot.store(Arc::new(Snapshot::build(
            Arc::clone(new),
            generation,
            Some(&previous),
            &tls,
        )));
        for change in changes {
            if let Change::ListenerRemoved(name) | Change::ListenerRebound(name) = change {
                self.retire_if(|old| old.config.name == *name);
            }
        }
        if let Some((handle, bound)) = admin {
            if let Some(old) = std::mem::replace(&mut self.admin, handle) {
                actix_rt::spawn(old.stop(true));
            }
            match bound {
                Some(addr) => tracing::info!(addr = %addr, "admin listening"),
                None => tracing::info!("admin listener closed"),
            }
        }
        if let Some(workers) = &self.workers
            && new.gateway.workers != workers.count()
        {
            tracing::warn!(
                running = workers.count(),
                configured = new.gateway.workers,
                "[gateway] workers changes at the next restart"
            );
        }
        for ready in added {
            let running = ready.serve();
            tracing::info!(listener = %running.config.name, addr = %running.local_addr, "listening");
            self.listeners.push(running);
        }
        for ready in changed {
            // Dropping the old one ends its workers' accept loops; the socket stays open.
            let Some(old) = self
                .listeners
                .iter_mut()
                .find(|o| o.config.name == ready.name())
            else {
                continue;
            };
            *old = ready.serve();
            tracing::info!(listener = %old.config.name, addr = %old.local_addr,
                tls = old.tls.is_some(), "listener serves new settings");
        }
        Ok(())
    }

    /// Closes the listeners that match; their live tunnels and requests carry on.
    fn retire_if(&mut self, matches: impl Fn(&RunningListener) -> bool) {
        let (gone, kept): (Vec<_>, Vec<_>) = self.listeners.drain(..).partition(|l| matches(l));
        self.listeners = kept;
        for l in gone {
            tracing::info!(listener = %l.config.name, addr = %l.local_addr, "listener retired");
            l.close();
        }
    }

    /// Schedules the tunnels of servers that left their pool to close, if the upstream
    /// asks for draining.
    fn drain(&self, changes: &[Change], new: &Config) {
        for change in changes {
            let Change::ServerRemoved { upstream, server } = change else {
                continue;
            };
            let settings = new
                .upstreams
                .get(upstream)
                .or_else(|| self.config.upstreams.get(upstream));
            let Some(settings) = settings.filter(|u| !u.drain_timeout.is_zero()) else {
                continue;
            };
            let n = self.shared.registry.drain(
                upstream,
                server,
                settings.drain_timeout,
                settings.drain_spread,
            );
            tracing::info!(upstream, server, tunnels = n, timeout = ?settings.drain_timeout,
                spread = ?settings.drain_spread, "draining tunnels of a removed server");
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        actix_rt::spawn(crate::health::run(self.shared.clone()));
        let supervisor = ctx.address();
        actix_rt::spawn(async move {
            let Ok(mut hangup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hangup.recv().await.is_some() {
                if supervisor.try_send(Reload { trigger: "SIGHUP" }).is_err() {
                    break;
                }
            }
        });
    }
}

/// Re-read the configuration file.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Reload {
    /// What asked: the file watcher or SIGHUP (for the log).
    pub trigger: &'static str,
}

impl Handler<Reload> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Reload, _: &mut Self::Context) {
        self.reload(msg.trigger);
    }
}

/// Graceful shutdown: stop accepting, send every tunnel a 1001 close, wait for the close
/// handshakes (at most `shutdown_timeout`), then stop the listeners.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        self.watcher = None;
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        let admin = self.admin.take();
        let listeners = std::mem::take(&mut self.listeners);
        let workers = self.workers.take();
        let registry = Arc::clone(&self.shared.registry);
        let deadline = Instant::now() + self.config.gateway.shutdown_timeout;
        let spread = self.config.gateway.shutdown_spread;
        let delay = self.config.gateway.shutdown_delay;
        tracing::info!(tunnels = registry.len(), "shutting down");
        Box::pin(
            async move {
                // Readiness is already false; keep serving while the balancer notices.
                tokio::time::sleep(delay).await;
                for listener in &listeners {
                    listener.pause();
                }
                registry.end_all(Ending::Shutdown, spread);
                while !registry.is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if !registry.is_empty() {
                    tracing::warn!(
                        tunnels = registry.len(),
                        "shutdown_timeout passed with tunnels still open"
                    );
                }
                drop(listeners);
                // Stops the worker threads (whatever they still serve is cut) and joins them.
                drop(workers);
                if let Some(admin) = admin {
                    admin.stop(false).await;
                }
                tracing::info!("stopped");
            }
            .into_actor(self),
        )
    }
}
