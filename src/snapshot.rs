//! The snapshot request handlers read: one validated configuration with its routes and
//! pools, published atomically by the supervisor. A handler loads it once per request and
//! never waits on a mailbox; a reload swaps in a new one while old requests finish on theirs.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, HostMatch, RouteConfig};
use crate::pool::Pool;

/// A route with its pool resolved.
#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    pub pool: Arc<Pool>,
    /// `host/path -> upstream`, for logs.
    pub label: Arc<str>,
    /// The upstream's name, shared by the tunnels it serves (draining is per upstream).
    pub upstream: Arc<str>,
}

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    pub pools: HashMap<String, Arc<Pool>>,
    pub routes: Vec<Arc<Route>>,
}

impl Snapshot {
    /// Builds the snapshot for `config`. Pools whose upstream did not change are taken
    /// whole from `previous` (keeping round-robin position), and servers that stay keep
    /// their live counters.
    ///
    /// `upstream_tls` holds the client TLS settings of every upstream with TLS servers.
    pub fn build(
        config: Arc<Config>,
        generation: u64,
        previous: Option<&Snapshot>,
        upstream_tls: &HashMap<String, Arc<rustls::ClientConfig>>,
    ) -> Snapshot {
        let mut pools = HashMap::new();
        for (name, upstream) in &config.upstreams {
            let old = previous.and_then(|p| p.pools.get(name));
            let pool = match old {
                Some(old) if old.config == *upstream => Arc::clone(old),
                _ => Arc::new(Pool::build(
                    Arc::clone(upstream),
                    upstream_tls.get(name).cloned(),
                    |server| {
                        previous?
                            .pools
                            .values()
                            .flat_map(|p| p.servers.iter())
                            // The same endpoint keeps the server and its counters (a new
                            // weight or role is the pool's business); the same address
                            // with TLS switched on or off is a new endpoint, dialled anew.
                            .find(|s| s.config.addr == server.addr && s.config.tls == server.tls)
                            .cloned()
                    },
                )),
            };
            pools.insert(name.clone(), pool);
        }
        let routes = config
            .routes
            .iter()
            .filter_map(|route| {
                let pool = Arc::clone(pools.get(&route.upstream)?);
                let host = match &route.host {
                    HostMatch::Any => "*".to_string(),
                    HostMatch::Exact(h) => h.clone(),
                    HostMatch::Suffix(s) => format!("*{s}"),
                };
                Some(Arc::new(Route {
                    label: Arc::from(format!("{host}{} -> {}", route.path, route.upstream)),
                    upstream: Arc::from(route.upstream.as_str()),
                    config: route.clone(),
                    pool,
                }))
            })
            .collect();
        Snapshot {
            generation,
            config,
            pools,
            routes,
        }
    }

    /// The route for a request on `listener` to `host` (no port, any case) and `path`.
    ///
    /// Among routes that serve the listener and match both, a route naming the host
    /// exactly beats a wildcard (the longer suffix first), which beats a route without
    /// host; then the longest path prefix wins.
    pub fn route(&self, listener: &str, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let host = host.map(|h| h.trim_end_matches('.'));
        self.routes
            .iter()
            .filter(|r| {
                r.config.listeners.is_empty() || r.config.listeners.iter().any(|l| l == listener)
            })
            .filter(|r| path.starts_with(r.config.path.as_str()))
            .filter_map(|r| {
                let rank = match (&r.config.host, host) {
                    (HostMatch::Any, _) => (0, 0),
                    (HostMatch::Exact(want), Some(h)) if h.eq_ignore_ascii_case(want) => (2, 0),
                    (HostMatch::Suffix(suffix), Some(h))
                        if h.len() > suffix.len()
                            && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix) =>
                    {
                        (1, suffix.len())
                    }
                    _ => return None,
                };
                Some((rank, r.config.path.len(), r))
            })
            .max_by_key(|(rank, path_len, _)| (*rank, *path_len))
            .map(|(_, _, r)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(toml: &str) -> Snapshot {
        let config = crate::config::parse(toml, "test.toml").unwrap();
        Snapshot::build(Arc::new(config), 1, None, &HashMap::new())
    }

    const ROUTES: &str = r#"
        [[listener]]
        name = "public"
        bind = "127.0.0.1:0"
        [[listener]]
        name = "internal"
        bind = "127.0.0.1:0"
        [[route]]
        path = "/"
        upstream = "web"
        [[route]]
        path = "/socket/"
        upstream = "chat"
        [[route]]
        host = "chat.example.com"
        path = "/"
        upstream = "chat"
        [[route]]
        host = "*.example.com"
        path = "/"
        upstream = "wild"
        [[route]]
        host = "*.eu.example.com"
        path = "/"
        upstream = "eu"
        [[route]]
        path = "/admin/"
        upstream = "web"
        listeners = ["internal"]
        [upstream.web]
        servers = ["127.0.0.1:1"]
        [upstream.chat]
        servers = ["127.0.0.1:2"]
        [upstream.wild]
        servers = ["127.0.0.1:3"]
        [upstream.eu]
        servers = ["127.0.0.1:4"]
    "#;

    fn upstream(s: &Snapshot, listener: &str, host: Option<&str>, path: &str) -> Option<String> {
        s.route(listener, host, path)
            .map(|r| r.config.upstream.clone())
    }

    #[test]
    fn longest_prefix_wins() {
        let s = snapshot(ROUTES);
        assert_eq!(
            upstream(&s, "public", None, "/socket/x").as_deref(),
            Some("chat")
        );
        assert_eq!(
            upstream(&s, "public", None, "/socket").as_deref(),
            Some("web")
        );
        assert_eq!(
            upstream(&s, "public", Some("other.org"), "/x").as_deref(),
            Some("web")
        );
    }

    #[test]
    fn exact_host_beats_wildcard_beats_no_host() {
        let s = snapshot(ROUTES);
        assert_eq!(
            upstream(&s, "public", Some("CHAT.example.com"), "/").as_deref(),
            Some("chat")
        );
        assert_eq!(
            upstream(&s, "public", Some("news.example.com"), "/").as_deref(),
            Some("wild")
        );
        assert_eq!(
            upstream(&s, "public", Some("a.eu.example.com."), "/").as_deref(),
            Some("eu")
        );
        assert_eq!(
            upstream(&s, "public", Some("example.com"), "/").as_deref(),
            Some("web")
        );
    }

    #[test]
    fn listener_restricted_routes_only_serve_their_listener() {
        let s = snapshot(ROUTES);
        assert_eq!(
            upstream(&s, "public", None, "/admin/x").as_deref(),
            Some("web")
        );
        assert_eq!(
            s.route("internal", None, "/admin/x")
                .map(|r| r.config.path.as_str()),
            Some("/admin/")
        );
        assert_eq!(
            s.route("public", None, "/admin/x")
                .map(|r| r.config.path.as_str()),
            Some("/")
        );
    }

    #[test]
    fn no_match_is_none() {
        let s = snapshot(
            r#"
            [[route]]
            path = "/ws/"
            upstream = "u"
            [upstream.u]
            servers = ["127.0.0.1:1"]
        "#,
        );
        assert!(s.route("listener0", None, "/other").is_none());
    }

    #[test]
    fn unchanged_pools_are_reused_by_the_next_snapshot() {
        let first = snapshot(ROUTES);
        let again = Snapshot::build(Arc::clone(&first.config), 2, Some(&first), &HashMap::new());
        for (name, pool) in &first.pools {
            assert!(Arc::ptr_eq(pool, &again.pools[name]), "{name}");
        }
    }
}
