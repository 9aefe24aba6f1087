//! Prometheus metrics. Every metric name is declared here, and nowhere else.
//!
//! Counters on the relay path are plain atomics the tunnel resolves once when it starts
//! (no lookup, no lock per batch); gauges of live state (tunnels per route and server,
//! server health, configuration generation) are read from the snapshot when scraped.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::proxy::Shared;

pub const HANDSHAKES: &str = "wsgate_handshakes";
pub const HANDSHAKE_SECONDS: &str = "wsgate_handshake_duration_seconds";
pub const MESSAGES: &str = "wsgate_relayed_messages";
pub const BYTES: &str = "wsgate_relayed_bytes";
pub const CLOSES: &str = "wsgate_close_frames";
pub const RELOADS: &str = "wsgate_config_reloads";
pub const TLS_FAILURES: &str = "wsgate_tls_handshake_failures";
pub const PROXY_REFUSED: &str = "wsgate_proxy_protocol_refused";
pub const GENERATION: &str = "wsgate_config_generation";
pub const TUNNELS_ROUTE: &str = "wsgate_live_tunnels_by_route";
pub const TUNNELS_SERVER: &str = "wsgate_live_tunnels_by_server";
pub const SERVER_UP: &str = "wsgate_server_up";
pub const MAX_TUNNELS: &str = "wsgate_max_tunnels";

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every `result` label a handshake can have (resolved to counters once: a handshake
/// then costs no label allocation or hash lookup).
const HANDSHAKE_RESULTS: [&str; 10] = [
    "ok",
    "client_gone",
    "no_route",
    "bad_request",
    "upstream_unavailable",
    "timeout",
    "upstream_refused",
    "redirected",
    "limited",
    "forbidden_origin",
];

/// Sides a close frame can come from, and the codes counted without a lookup (1000–1015).
const CLOSE_SIDES: [&str; 3] = ["client", "backend", "gateway"];
const COMMON_CLOSE_CODES: std::ops::RangeInclusive<u16> = 1000..=1015;

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    handshake_counters: [Counter; HANDSHAKE_RESULTS.len()],
    relay: [(Counter, Counter); 2],
    /// `[side][code - 1000]`, and `[side][16]` for a close frame without a code.
    common_closes: [[Counter; 17]; CLOSE_SIDES.len()],
    handshakes: Family<Labels, Counter>,
    pub handshake_seconds: Histogram,
    messages: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    closes: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    pub tls_failures: Counter,
    pub proxy_protocol_refused: Counter,
    generation: Gauge,
    tunnels_route: Family<Labels, Gauge>,
    tunnels_server: Family<Labels, Gauge>,
    server_up: Family<Labels, Gauge>,
    /// +Inf when nothing caps the tunnels.
    max_tunnels: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            handshake_counters: Default::default(),
            relay: Default::default(),
            common_closes: Default::default(),
            handshakes: Family::default(),
            // 0.5 ms to ~8 s.
            handshake_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            messages: Family::default(),
            bytes: Family::default(),
            closes: Family::default(),
            reloads: Family::default(),
            tls_failures: Counter::default(),
            proxy_protocol_refused: Counter::default(),
            generation: Gauge::default(),
            tunnels_route: Family::default(),
            tunnels_server: Family::default(),
            server_up: Family::default(),
            max_tunnels: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            HANDSHAKES,
            "WebSocket handshakes by result",
            m.handshakes.clone(),
        );
        registry.register(
            HANDSHAKE_SECONDS,
            "Time from upgrade request to 101 sent",
            m.handshake_seconds.clone(),
        );
        registry.register(MESSAGES, "Frames relayed, by direction", m.messages.clone());
        registry.register(BYTES, "Bytes relayed, by direction", m.bytes.clone());
        registry.register(
            CLOSES,
            "Close frames, by the side that sent them and code",
            m.closes.clone(),
        );
        registry.register(
            RELOADS,
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            TLS_FAILURES,
            "TLS handshakes that failed",
            m.tls_failures.clone(),
        );
        registry.register(
            PROXY_REFUSED,
            "Connections refused for an untrusted source or a bad PROXY protocol header",
            m.proxy_protocol_refused.clone(),
        );
        registry.register(
            GENERATION,
            "Generation of the configuration in effect",
            m.generation.clone(),
        );
        registry.register(
            TUNNELS_ROUTE,
            "Live tunnels by route",
            m.tunnels_route.clone(),
        );
        registry.register(
            TUNNELS_SERVER,
            "Live tunnels by upstream server",
            m.tunnels_server.clone(),
        );
        registry.register(
            SERVER_UP,
            "1 if the server is in rotation (health checks)",
            m.server_up.clone(),
        );
        registry.register(
            MAX_TUNNELS,
            "Tunnels the gateway takes at most: the lower of max_connections and what the open-file limit leaves room for",
            m.max_tunnels.clone(),
        );
        let handshake_counters =
            HANDSHAKE_RESULTS.map(|r| m.handshakes.get_or_create_owned(&labels(&[("result", r)])));
        let pair = |direction: &str| {
            let l = labels(&[("direction", direction)]);
            (
                m.messages.get_or_create_owned(&l),
                m.bytes.get_or_create_owned(&l),
            )
        };
        let relay = [pair("client_to_backend"), pair("backend_to_client")];
        let common_closes = CLOSE_SIDES.map(|side| {
            std::array::from_fn(|i| {
                let code = match COMMON_CLOSE_CODES.clone().nth(i) {
                    Some(code) => code.to_string(),
                    None => "none".to_string(),
                };
                m.closes
                    .get_or_create_owned(&labels(&[("side", side), ("code", &code)]))
            })
        });
        Metrics {
            registry,
            handshake_counters,
            relay,
            common_closes,
            ..m
        }
    }
}

/// A handshake's outcome, as the `result` label.
pub fn handshake(metrics: &Metrics, result: &str) {
    let known = HANDSHAKE_RESULTS.iter().position(|r| *r == result);
    match known {
        Some(i) => metrics.handshake_counters[i].inc(),
        None => metrics
            .handshakes
            .get_or_create(&labels(&[("result", result)]))
            .inc(),
    };
}

impl Metrics {
    /// The counters a tunnel adds to for frames and bytes, `[client→backend, backend→client]`.
    pub fn relay_counters(&self) -> [(Counter, Counter); 2] {
        self.relay.clone()
    }

    /// A close frame sent by `side` (client, backend or gateway) with `code`.
    pub fn close(&self, side: &str, code: Option<u16>) {
        let common = match code {
            None => Some(16),
            Some(c) if COMMON_CLOSE_CODES.contains(&c) => Some(usize::from(c - 1000)),
            Some(_) => None,
        };
        if let (Some(s), Some(c)) = (CLOSE_SIDES.iter().position(|x| *x == side), common) {
            self.common_closes[s][c].inc();
            return;
        }
        let code = code.map_or_else(|| "none".to_string(), |c| c.to_string());
        self.closes
            .get_or_create(&labels(&[("side", side), ("code", &code)]))
            .inc();
    }

    pub fn reload(&self, result: &str) {
        self.reloads
            .get_or_create(&labels(&[("result", result)]))
            .inc();
    }

    /// The text exposition, with live gauges read from `shared` now.
    pub fn render(&self, shared: &Shared) -> String {
        let snapshot = shared.snapshot.load();
        self.generation.set(snapshot.generation as i64);
        let (max_tunnels, _) = shared
            .limits
            .total_cap(snapshot.config.gateway.max_connections);
        self.max_tunnels.set(if max_tunnels == usize::MAX {
            f64::INFINITY
        } else {
            max_tunnels as f64
        });
        self.tunnels_route.clear();
        for route in &snapshot.routes {
            let live = shared.limits.per_route.count(&route.label);
            self.tunnels_route
                .get_or_create(&labels(&[("route", &route.label)]))
                .set(live as i64);
        }
        self.tunnels_server.clear();
        self.server_up.clear();
        for (name, pool) in &snapshot.pools {
            for server in &pool.servers {
                let l = labels(&[("upstream", name), ("server", &server.config.addr)]);
                self.tunnels_server
                    .get_or_create(&l)
                    .set(server.live_tunnels() as i64);
                self.server_up
                    .get_or_create(&l)
                    .set(i64::from(server.available()));
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
