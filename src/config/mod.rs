//! Configuration: the TOML file, its validation, and the validated [`Config`] the rest of
//! the gateway reads.
//!
//! ```text
//!   config.toml --toml/serde--> RawConfig --validate--> Config
//!                (syntax, unknown keys, types)  (references, ranges, duplicates)
//! ```
//! A route's tunnel settings come from the route, else `[defaults]`, else the constants in
//! [`defaults`]. Every error names `file:line:column` and the problem.

pub mod defaults;
pub mod diff;
mod raw;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use toml::Spanned;

use raw::{RawConfig, RawServer, RawSettings, RawUpstream};

/// A configuration file that could not be used, with the place that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The validated configuration. Cheap to share: handlers hold it behind an `Arc`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from and the SHA-256 of the bytes, for logs and `/status`.
    pub source: ConfigSource,
    pub gateway: GatewayConfig,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    pub upstreams: BTreeMap<String, Arc<UpstreamConfig>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub admin: Option<SocketAddr>,
    pub workers: usize,
    pub shutdown_timeout: Duration,
    /// Tunnels the gateway holds at most (0 = no limit); 503 above it.
    pub max_connections: usize,
    /// Tunnels one client address may hold (0 = no limit); 429 above it.
    pub max_connections_per_ip: usize,
    /// Time a client has to send its request head (408 after it).
    pub client_header_timeout: Duration,
    /// Shutdown's 1001 close frames are spread over this long, so clients do not all
    /// reconnect to the other replicas in the same instant.
    pub shutdown_spread: Duration,
    /// After readiness turns false, new connections are still served this long, so the
    /// balancer in front notices before anything is refused (Kubernetes' preStop sleep).
    pub shutdown_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// Terminates TLS (`wss://`, `https://`) with these certificates.
    pub tls: Option<TlsConfig>,
    /// Answers every request with a 308 to `https://` on this port instead of proxying.
    pub redirect_https: Option<u16>,
    /// Connections start with a PROXY protocol header (v1 or v2) from one of
    /// `trusted_proxies`; its source address is the client's address everywhere.
    pub proxy_protocol: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests from these addresses carry the client's address in X-Forwarded-For (an L7
    /// balancer in front): the rightmost address not in this list is the client's.
    pub real_ip_from: Vec<ipnet::IpNet>,
}

/// A TLS listener's certificates (chosen by SNI) and protocol floor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub certs: Vec<CertFiles>,
    /// Offer TLS 1.3 only (`min_version = "1.3"`); otherwise TLS 1.2 and 1.3. Nothing older
    /// is ever offered.
    pub tls13_only: bool,
}

/// A certificate chain and its key, as PEM files (paths relative to the config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything a tunnel (and a proxied HTTP request) needs from its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelSettings {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub response_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// Zero means never.
    pub idle_timeout: Duration,
    pub max_frame_size: usize,
    pub max_message_size: usize,
    pub max_buffer: usize,
    /// `slow_consumer = "close"`: a leg that keeps `max_buffer` full for this long is
    /// closed with 1008. `None` (`"wait"`, the default): it is only held back.
    pub slow_consumer_timeout: Option<Duration>,
    /// Pass the client's permessage-deflate offer (RFC 7692) to the backend: frames stay
    /// compressed end to end. Off: the legs never agree on it, and the frame and message
    /// limits count uncompressed bytes.
    pub permessage_deflate: bool,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        TunnelSettings {
            connect_timeout: defaults::CONNECT_TIMEOUT,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            response_timeout: defaults::RESPONSE_TIMEOUT,
            ping_interval: defaults::PING_INTERVAL,
            pong_timeout: defaults::PONG_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_frame_size: defaults::MAX_FRAME_SIZE as usize,
            max_message_size: defaults::MAX_MESSAGE_SIZE as usize,
            max_buffer: defaults::MAX_BUFFER as usize,
            slow_consumer_timeout: None,
            permessage_deflate: true,
        }
    }
}

/// How a route matches the request's Host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Any,
    /// Lower-case host without port.
    Exact(String),
    /// `*.example.com`, stored as the lower-case suffix `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub host: HostMatch,
    /// Path prefix; the longest matching prefix wins.
    pub path: String,
    /// Replaces the matched prefix before the request goes to the backend.
    pub rewrite: Option<String>,
    pub upstream: String,
    /// Listener names this route serves; empty = every listener.
    pub listeners: Vec<String>,
    /// Host header sent to the backend; `None` passes the client's Host through.
    pub host_header: Option<String>,
    /// Tunnels this route holds at most (0 = no limit); 503 above it.
    pub max_connections: usize,
    /// Origins allowed to open a WebSocket here (empty = any); 403 otherwise.
    pub allowed_origins: Vec<OriginMatch>,
    /// Log one line per tunnel when it ends (nginx `access_log`; off for noisy routes).
    pub access_log: bool,
    pub settings: TunnelSettings,
}

/// One `allowed_origins` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginMatch {
    /// `https://app.example.com`: scheme, host and port as the browser sends them.
    Exact(String),
    /// `app.example.com`: that host, any scheme or port.
    Host(String),
    /// `*.example.com`: any host under it, stored as `.example.com`.
    Suffix(String),
}

impl OriginMatch {
    /// Whether the `Origin` header value is allowed by this entry.
    pub fn allows(&self, origin: &str) -> bool {
        let host = origin
            .split_once("://")
            .map_or(origin, |(_, rest)| rest)
            .split(['/', ':'])
            .next()
            .unwrap_or("");
        match self {
            OriginMatch::Exact(o) => origin.eq_ignore_ascii_case(o),
            OriginMatch::Host(h) => host.eq_ignore_ascii_case(h),
            OriginMatch::Suffix(s) => {
                host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    ConsistentHash,
    /// Fewest live tunnels relative to weight: the fit for long-lived WebSockets.
    LeastConn,
}

/// What `consistent_hash` hashes: nginx's `hash $remote_addr consistent`, or with
/// `$http_NAME`, `$cookie_NAME` or `$arg_NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    RemoteAddr,
    /// A request header (its first value), by lower-case name.
    Header(String),
    Cookie(String),
    /// A query-string parameter.
    Query(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: Balance,
    /// What `consistent_hash` hashes; a request without that value hashes on the client's
    /// address.
    pub hash_key: HashKey,
    pub servers: Vec<ServerConfig>,
    /// When a reload removes a server, its tunnels are closed (1012) this long after the
    /// reload; zero keeps them until they close by themselves.
    pub drain_timeout: Duration,
    /// Those closes are spread uniformly, with jitter, over this long after `drain_timeout`.
    pub drain_spread: Duration,
    /// How TLS servers of this upstream are verified.
    pub tls: UpstreamTls,
    /// Consistent hash with bounded loads: no server takes a new tunnel while it holds more
    /// than this many hundredths of the average (125 = 1.25×); 0 = unbounded.
    pub hash_balance_percent: u32,
    /// Passive health: this many connect failures within `fail_timeout` take a server out
    /// for `fail_timeout` (0 = never).
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Active health checks, if configured.
    pub health_check: Option<HealthCheck>,
}

/// Active health checks of an upstream's servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that bring a down server back.
    pub rise: u32,
    /// Consecutive failures that take an up server out.
    pub fall: u32,
    pub probe: Probe,
    /// Path of the HTTP and WebSocket probes.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The TCP connection opens.
    Tcp,
    /// `GET path` answers 2xx or 3xx.
    Http,
    /// A WebSocket upgrade to `path` answers 101.
    WebSocket,
}

/// Verification of an upstream's TLS servers (`wss://`/`https://` or `tls = true`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamTls {
    /// PEM file of the CAs to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Accept any certificate (logged as a warning at every load).
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerConfig {
    /// The address as configured, scheme left out (`host:port`); the consistent-hash ring
    /// hashes it.
    pub addr: String,
    pub host: String,
    pub port: u16,
    pub weight: u32,
    /// Tried only after every other server of the upstream (nginx's `backup`).
    pub backup: bool,
    /// Tunnels this server takes at most (nginx's `max_conns`); 0 = no limit.
    pub max_connections: u32,
    /// Reached over TLS (`wss://`, `https://`, or `tls = true` on the upstream).
    pub tls: bool,
}

impl fmt::Display for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
        path: path.display().to_string(),
        reason: err.to_string(),
    })?;
    parse(&text, &path.display().to_string())
}

/// Validates configuration text; `path` is used in error messages and `source`.
pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
    let at = |span: Range<usize>, message: String| {
        let (line, column) = line_column(text, span.start);
        ConfigError::Invalid {
            path: path.to_string(),
            line,
            column,
            message,
        }
    };
    let raw: RawConfig = toml::from_str(text).map_err(|err| {
        let message = err.message().trim().to_string();
        at(err.span().unwrap_or(0..0), message)
    })?;
    let sha256 = format!("{:x}", Sha256::digest(text.as_bytes()));
    let base = Path::new(path)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    Validator {
        at: &at,
        base: &base,
    }
    .config(
        raw,
        ConfigSource {
            path: path.to_string(),
            sha256,
        },
    )
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

struct Validator<'a> {
    at: &'a dyn Fn(Range<usize>, String) -> ConfigError,
    /// The config file's directory: relative paths in the file start there.
    base: &'a Path,
}

impl Validator<'_> {
    fn err<T>(&self, span: Range<usize>, message: impl Into<String>) -> Result<T, ConfigError> {
        Err((self.at)(span, message.into()))
    }

    fn config(&self, raw: RawConfig, source: ConfigSource) -> Result<Config, ConfigError> {
        let gateway = self.gateway(&raw)?;
        let listeners = self.listeners(&raw)?;
        let upstreams = raw
            .upstream
            .iter()
            .map(|(name, upstream)| Ok((name.clone(), Arc::new(self.upstream(name, upstream)?))))
            .collect::<Result<BTreeMap<_, _>, ConfigError>>()?;
        let base = self.settings(&raw.defaults.settings(), &TunnelSettings::default())?;
        let mut routes = Vec::with_capacity(raw.route.len());
        let mut seen = HashSet::new();
        for route in &raw.route {
            let routed = self.route(route, &base, &upstreams, &listeners)?;
            let key = (
                routed.host.clone(),
                routed.path.clone(),
                routed.listeners.clone(),
            );
            if !seen.insert(key) {
                let span = route.path.as_ref().unwrap_or(&route.upstream).span();
                return self.err(
                    span,
                    format!(
                        "duplicate route: another route already matches host {:?} and path {:?}",
                        route.host.as_ref().map_or("*", |h| h.get_ref().as_str()),
                        routed.path
                    ),
                );
            }
            routes.push(routed);
        }
        Ok(Config {
            source,
            gateway,
            listeners,
            routes,
            upstreams,
        })
    }

    fn gateway(&self, raw: &RawConfig) -> Result<GatewayConfig, ConfigError> {
        let admin = match &raw.gateway.admin {
            Some(addr) => Some(self.socket_addr(addr)?),
            None => None,
        };
        let workers = match &raw.gateway.workers {
            Some(w) if *w.get_ref() == 0 => {
                return self.err(w.span(), "workers must be at least 1");
            }
            Some(w) => *w.get_ref(),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        Ok(GatewayConfig {
            admin,
            workers,
            shutdown_timeout: raw
                .gateway
                .shutdown_timeout
                .map_or(defaults::SHUTDOWN_TIMEOUT, |d| d.0),
            max_connections: raw
                .gateway
                .max_connections
                .unwrap_or(defaults::MAX_CONNECTIONS),
            max_connections_per_ip: raw
                .gateway
                .max_connections_per_ip
                .unwrap_or(defaults::MAX_CONNECTIONS_PER_IP),
            client_header_timeout: raw
                .gateway
                .client_header_timeout
                .map_or(defaults::CLIENT_HEADER_TIMEOUT, |d| d.0),
            shutdown_spread: raw.gateway.shutdown_spread.map_or(Duration::ZERO, |d| d.0),
            shutdown_delay: raw.gateway.shutdown_delay.map_or(Duration::ZERO, |d| d.0),
        })
    }

    fn listeners(&self, raw: &RawConfig) -> Result<Vec<ListenerConfig>, ConfigError> {
        let mut out: Vec<ListenerConfig> = Vec::with_capacity(raw.listener.len());
        for (index, listener) in raw.listener.iter().enumerate() {
            let bind = self.socket_addr(&listener.bind)?;
            let name = match &listener.name {
                Some(name) if name.get_ref().is_empty() => {
                    return self.err(name.span(), "listener name must not be empty");
                }
                Some(name) => name.get_ref().clone(),
                None => format!("listener{index}"),
            };
            if let Some(other) = out.iter().find(|l| l.name == name) {
                let span = listener
                    .name
                    .as_ref()
                    .map_or(listener.bind.span(), |n| n.span());
                return self.err(span, format!("duplicate listener name {:?}", other.name));
            }
            // Port 0 asks the OS for a free port, so two of them never collide.
            if bind.port() != 0 && out.iter().any(|l| l.bind == bind) {
                return self.err(
                    listener.bind.span(),
                    format!("duplicate bind: {bind} is already bound by another listener"),
                );
            }
            let tls = match &listener.tls {
                Some(tls) => Some(self.tls(tls)?),
                None => None,
            };
            let redirect_https = match &listener.redirect_https {
                None => None,
                Some(r) if matches!(r.get_ref(), raw::RawRedirect::On(false)) => None,
                Some(r) if tls.is_some() => {
                    return self.err(
                        r.span(),
                        "redirect_https is for plain listeners; this one terminates TLS",
                    );
                }
                Some(r) => match r.get_ref() {
                    raw::RawRedirect::Port(p) => match u16::try_from(*p) {
                        Ok(port) if port > 0 => Some(port),
                        _ => {
                            return self
                                .err(r.span(), format!("redirect_https port {p} is not a port"));
                        }
                    },
                    raw::RawRedirect::On(_) => Some(443),
                },
            };
            let nets =
                |list: &Option<Vec<Spanned<String>>>| -> Result<Vec<ipnet::IpNet>, ConfigError> {
                    let mut out = Vec::new();
                    for cidr in list.iter().flatten() {
                        let text = cidr.get_ref().trim();
                        let net = text
                            .parse::<ipnet::IpNet>()
                            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                        match net {
                            Ok(net) => out.push(net),
                            Err(_) => {
                                return self.err(cidr.span(), format!("invalid address or CIDR {text:?}: write e.g. \"10.0.0.0/8\" or \"192.0.2.7\""));
                            }
                        }
                    }
                    Ok(out)
                };
            let trusted_proxies = nets(&listener.trusted_proxies)?;
            let proxy_protocol = listener
                .proxy_protocol
                .as_ref()
                .is_some_and(|p| *p.get_ref());
            if let Some(p) = &listener.proxy_protocol
                && proxy_protocol
                && trusted_proxies.is_empty()
            {
                return self.err(p.span(), "proxy_protocol needs trusted_proxies = [\"CIDR\", …]: the balancers allowed to send the header");
            }
            out.push(ListenerConfig {
                name,
                bind,
                tls,
                redirect_https,
                proxy_protocol,
                trusted_proxies,
                real_ip_from: nets(&listener.real_ip_from)?,
            });
        }
        Ok(out)
    }

    fn tls(&self, tls: &Spanned<raw::RawTls>) -> Result<TlsConfig, ConfigError> {
        let raw = tls.get_ref();
        let path = |p: &str| self.base.join(p);
        let certs = match (&raw.cert, &raw.key, &raw.certs) {
            (Some(cert), Some(key), None) => vec![CertFiles {
                cert: path(cert),
                key: path(key),
            }],
            (None, None, Some(pairs)) if !pairs.is_empty() => pairs
                .iter()
                .map(|p| CertFiles {
                    cert: path(&p.cert),
                    key: path(&p.key),
                })
                .collect(),
            _ => {
                return self.err(
                    tls.span(),
                    "tls needs `cert` and `key`, or `certs = [{ cert = \"…\", key = \"…\" }, …]`",
                );
            }
        };
        let tls13_only = match &raw.min_version {
            None => false,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => false,
                "1.3" => true,
                other => {
                    return self.err(v.span(), format!("min_version {other:?}: expected \"1.2\" or \"1.3\" (older versions are never offered)"));
                }
            },
        };
        Ok(TlsConfig { certs, tls13_only })
    }

    fn socket_addr(&self, text: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        match text.get_ref().parse::<SocketAddr>() {
            Ok(addr) => Ok(addr),
            Err(_) => match text.get_ref().to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(addr)) => Ok(addr),
                _ => self.err(
                    text.span(),
                    format!(
                        "invalid address {:?}: expected ip:port such as \"0.0.0.0:8080\"",
                        text.get_ref()
                    ),
                ),
            },
        }
    }

    fn settings(
        &self,
        raw: &RawSettings,
        inherited: &TunnelSettings,
    ) -> Result<TunnelSettings, ConfigError> {
        let size = |value: &Option<Spanned<raw::HumanSize>>, fallback: usize| match value {
            Some(s) if s.get_ref().0 == 0 => self.err(s.span(), "a size limit must be above zero"),
            Some(s) => usize::try_from(s.get_ref().0)
                .or_else(|_| self.err(s.span(), "size does not fit this machine")),
            None => Ok(fallback),
        };
        let positive = |value: &Option<Spanned<raw::HumanDuration>>,
                        fallback: Duration,
                        problem: &str| match value {
            Some(d) if d.get_ref().0.is_zero() => self.err(d.span(), problem),
            Some(d) => Ok(d.get_ref().0),
            None => Ok(fallback),
        };
        const HEARTBEAT: &str =
            "must be above zero (heartbeats cannot be turned off: they find dead peers)";
        Ok(TunnelSettings {
            connect_timeout: positive(
                &raw.connect_timeout,
                inherited.connect_timeout,
                "connect_timeout must be above zero",
            )?,
            handshake_timeout: positive(
                &raw.handshake_timeout,
                inherited.handshake_timeout,
                "handshake_timeout must be above zero",
            )?,
            response_timeout: positive(
                &raw.response_timeout,
                inherited.response_timeout,
                "response_timeout must be above zero",
            )?,
            ping_interval: positive(&raw.ping_interval, inherited.ping_interval, HEARTBEAT)?,
            pong_timeout: positive(&raw.pong_timeout, inherited.pong_timeout, HEARTBEAT)?,
            idle_timeout: raw.idle_timeout.map_or(inherited.idle_timeout, |d| d.0),
            max_frame_size: size(&raw.max_frame_size, inherited.max_frame_size)?,
            max_message_size: size(&raw.max_message_size, inherited.max_message_size)?,
            max_buffer: size(&raw.max_buffer, inherited.max_buffer)?,
            permessage_deflate: raw
                .permessage_deflate
                .unwrap_or(inherited.permessage_deflate),
            slow_consumer_timeout: {
                let timeout = match &raw.slow_consumer_timeout {
                    Some(t) if t.get_ref().0.is_zero() => {
                        return self.err(t.span(), "slow_consumer_timeout must be above zero");
                    }
                    Some(t) => t.get_ref().0,
                    None => inherited
                        .slow_consumer_timeout
                        .unwrap_or(defaults::SLOW_CONSUMER_TIMEOUT),
                };
                match &raw.slow_consumer {
                    None => inherited.slow_consumer_timeout.map(|_| timeout),
                    Some(s) => match s.get_ref().as_str() {
                        "wait" => None,
                        "close" => Some(timeout),
                        other => {
                            return self.err(s.span(), format!("unknown slow_consumer {other:?}: expected \"wait\" or \"close\""));
                        }
                    },
                }
            },
        })
    }

    fn route(
        &self,
        route: &raw::RawRoute,
        base: &TunnelSettings,
        upstreams: &BTreeMap<String, Arc<UpstreamConfig>>,
        listeners: &[ListenerConfig],
    ) -> Result<RouteConfig, ConfigError> {
        let upstream = route.upstream.get_ref();
        if !upstreams.contains_key(upstream) {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            return self.err(
                route.upstream.span(),
                format!(
                    "route names upstream {upstream:?}, which is not defined (defined: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        let host = match &route.host {
            None => HostMatch::Any,
            Some(h) => {
                let text = h.get_ref().trim().to_ascii_lowercase();
                if text.is_empty() || text.contains(['/', ' ', ':']) {
                    return self.err(
                        h.span(),
                        format!("invalid host {:?}: write a name such as \"chat.example.com\" or \"*.example.com\"", h.get_ref()),
                    );
                }
                match text.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') && suffix.len() > 1 => {
                        HostMatch::Suffix(suffix.to_string())
                    }
                    Some(_) => {
                        return self
                            .err(h.span(), "a wildcard host must look like \"*.example.com\"");
                    }
                    None if text.contains('*') => {
                        return self.err(
                            h.span(),
                            "'*' is only allowed as the first label: \"*.example.com\"",
                        );
                    }
                    None => HostMatch::Exact(text),
                }
            }
        };
        let path = match &route.path {
            None => "/".to_string(),
            Some(p) if !p.get_ref().starts_with('/') => {
                return self.err(
                    p.span(),
                    format!("path {:?} must start with '/'", p.get_ref()),
                );
            }
            Some(p) => p.get_ref().clone(),
        };
        let rewrite = match &route.rewrite {
            None => None,
            Some(r) if !r.get_ref().starts_with('/') => {
                return self.err(
                    r.span(),
                    format!("rewrite {:?} must start with '/'", r.get_ref()),
                );
            }
            Some(r) => Some(r.get_ref().clone()),
        };
        let mut names = Vec::new();
        for name in route.listeners.iter().flatten() {
            if !listeners.iter().any(|l| &l.name == name.get_ref()) {
                return self.err(
                    name.span(),
                    format!(
                        "route names listener {:?}, which is not defined",
                        name.get_ref()
                    ),
                );
            }
            names.push(name.get_ref().clone());
        }
        let host_header = match &route.host_header {
            Some(h) if h.get_ref().is_empty() || h.get_ref().contains(char::is_whitespace) => {
                return self.err(
                    h.span(),
                    "host_header must be a host name, optionally with :port",
                );
            }
            Some(h) => Some(h.get_ref().clone()),
            None => None,
        };
        let mut allowed_origins = Vec::new();
        for origin in route.allowed_origins.iter().flatten() {
            let text = origin
                .get_ref()
                .trim()
                .trim_end_matches('/')
                .to_ascii_lowercase();
            allowed_origins.push(if text.contains("://") {
                OriginMatch::Exact(text)
            } else if let Some(suffix) = text.strip_prefix('*') {
                if !suffix.starts_with('.') || suffix.len() < 2 {
                    return self.err(origin.span(), "a wildcard origin must look like \"*.example.com\"");
                }
                OriginMatch::Suffix(suffix.to_string())
            } else if text.is_empty() || text.contains(['*', ' ', '/']) {
                return self.err(
                    origin.span(),
                    format!("invalid origin {:?}: write \"https://app.example.com\", \"app.example.com\" or \"*.example.com\"", origin.get_ref()),
                );
            } else {
                OriginMatch::Host(text)
            });
        }
        Ok(RouteConfig {
            host,
            path,
            rewrite,
            upstream: upstream.clone(),
            listeners: names,
            host_header,
            max_connections: route.max_connections.unwrap_or(0),
            access_log: route.access_log.unwrap_or(true),
            allowed_origins,
            settings: self.settings(&route.settings(), base)?,
        })
    }

    fn upstream(
        &self,
        name: &str,
        upstream: &Spanned<RawUpstream>,
    ) -> Result<UpstreamConfig, ConfigError> {
        let raw = upstream.get_ref();
        let balance = match &raw.balance {
            None => Balance::RoundRobin,
            Some(b) => match b.get_ref().as_str() {
                "round_robin" => Balance::RoundRobin,
                "consistent_hash" => Balance::ConsistentHash,
                "least_conn" => Balance::LeastConn,
                other => {
                    return self.err(
                        b.span(),
                        format!("unknown balance {other:?}: expected \"round_robin\", \"least_conn\" or \"consistent_hash\""),
                    );
                }
            },
        };
        let hash_key = match &raw.hash_key {
            None => HashKey::RemoteAddr,
            Some(key) => {
                if balance != Balance::ConsistentHash {
                    return self.err(key.span(), "hash_key needs balance = \"consistent_hash\"");
                }
                let text = key.get_ref().as_str();
                let is_name = |name: &str| {
                    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b'=')
                };
                match text.split_once(':') {
                    None if text == "remote_addr" => HashKey::RemoteAddr,
                    Some(("header", name)) if is_name(name) => {
                        HashKey::Header(name.to_ascii_lowercase())
                    }
                    Some(("cookie", name)) if is_name(name) => HashKey::Cookie(name.to_string()),
                    Some(("query", name)) if is_name(name) => HashKey::Query(name.to_string()),
                    _ => {
                        return self.err(
                            key.span(),
                            format!("unknown hash_key {text:?}: expected \"remote_addr\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\""),
                        );
                    }
                }
            }
        };
        let hash_balance_percent = match &raw.hash_balance_factor {
            None => 0,
            Some(f) if balance != Balance::ConsistentHash => {
                return self.err(
                    f.span(),
                    "hash_balance_factor needs balance = \"consistent_hash\"",
                );
            }
            Some(f) if !(*f.get_ref() > 1.0 && *f.get_ref() <= 100.0) => {
                return self.err(
                    f.span(),
                    "hash_balance_factor must be above 1.0 (1.25 is usual)",
                );
            }
            Some(f) => (f.get_ref() * 100.0).round() as u32,
        };
        if raw.servers.get_ref().is_empty() {
            return self.err(
                raw.servers.span(),
                format!("upstream {name:?} has an empty pool: list at least one server"),
            );
        }
        let mut servers: Vec<ServerConfig> = Vec::new();
        for server in raw.servers.get_ref() {
            let (addr, weight, backup, max_connections) = match server.get_ref() {
                RawServer::Addr(addr) => (addr.clone(), defaults::SERVER_WEIGHT, false, 0),
                RawServer::Table(t) => (
                    t.addr.clone(),
                    t.weight.unwrap_or(defaults::SERVER_WEIGHT),
                    t.backup == Some(true),
                    t.max_connections.unwrap_or(0),
                ),
            };
            if weight == 0 {
                return self.err(server.span(), "weight must be at least 1");
            }
            let (addr, tls) = match addr.split_once("://") {
                Some(("wss" | "https", rest)) => (rest.trim_end_matches('/').to_string(), true),
                Some(("ws" | "http", rest)) => (
                    rest.trim_end_matches('/').to_string(),
                    raw.tls == Some(true),
                ),
                Some((scheme, _)) => {
                    return self.err(
                        server.span(),
                        format!("unknown scheme {scheme:?}: write host:port, ws://, wss://, http:// or https://"),
                    );
                }
                None => (addr, raw.tls == Some(true)),
            };
            let Some((host, port)) = split_host_port(&addr) else {
                return self.err(
                    server.span(),
                    format!("invalid server address {addr:?}: expected host:port such as \"10.0.0.1:9000\""),
                );
            };
            if servers.iter().any(|s| s.addr == addr) {
                return self.err(server.span(), format!("server {addr:?} is listed twice"));
            }
            servers.push(ServerConfig {
                tls,
                addr,
                host,
                port,
                weight,
                backup,
                max_connections,
            });
        }
        if servers.iter().all(|s| s.backup) {
            return self.err(
                raw.servers.span(),
                format!("upstream {name:?} has only backup servers: a backup is tried after the others, so at least one must not be one"),
            );
        }
        Ok(UpstreamConfig {
            name: name.to_string(),
            balance,
            hash_key,
            servers,
            drain_timeout: raw.drain_timeout.map_or(defaults::DRAIN_TIMEOUT, |d| d.0),
            drain_spread: raw.drain_spread.map_or(defaults::DRAIN_SPREAD, |d| d.0),
            hash_balance_percent,
            max_fails: raw.max_fails.unwrap_or(defaults::MAX_FAILS),
            fail_timeout: raw.fail_timeout.map_or(defaults::FAIL_TIMEOUT, |d| d.0),
            health_check: match &raw.health_check {
                None => None,
                Some(hc) => Some(self.health_check(hc)?),
            },
            tls: UpstreamTls {
                ca: raw.ca.as_ref().map(|ca| self.base.join(ca)),
                insecure_skip_verify: raw.insecure_skip_verify == Some(true),
            },
        })
    }
}

impl Validator<'_> {
    fn health_check(&self, hc: &Spanned<raw::RawHealthCheck>) -> Result<HealthCheck, ConfigError> {
        let raw = hc.get_ref();
        let probe = match raw.probe.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
            None | Some(("tcp", _)) => Probe::Tcp,
            Some(("http", _)) => Probe::Http,
            Some(("websocket", _)) => Probe::WebSocket,
            Some((other, span)) => {
                return self.err(
                    span,
                    format!("unknown probe {other:?}: expected \"tcp\", \"http\" or \"websocket\""),
                );
            }
        };
        let check = HealthCheck {
            interval: raw.interval.map_or(defaults::HEALTH_INTERVAL, |d| d.0),
            timeout: raw.timeout.map_or(defaults::HEALTH_TIMEOUT, |d| d.0),
            rise: raw.rise.unwrap_or(defaults::HEALTH_RISE),
            fall: raw.fall.unwrap_or(defaults::HEALTH_FALL),
            probe,
            path: raw.path.clone().unwrap_or_else(|| "/".to_string()),
        };
        if check.interval.is_zero() || check.timeout.is_zero() || check.rise == 0 || check.fall == 0
        {
            return self.err(
                hc.span(),
                "health_check interval, timeout, rise and fall must be above zero",
            );
        }
        if !check.path.starts_with('/') {
            return self.err(hc.span(), "health_check path must start with '/'");
        }
        Ok(check)
    }
}

/// Splits `host:port` or `[v6]:port` at the last colon.
fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ']) {
        return None;
    }
    Some((host.to_string(), port))
}

/// The path given on the command line, made absolute without resolving symlinks (a
/// Kubernetes ConfigMap mount is a symlink farm whose target changes on update).
pub fn absolute_path(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests;
