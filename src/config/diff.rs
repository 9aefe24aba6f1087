//! What a reload changes: a pure comparison of two configurations, so the supervisor only
//! applies the result and the rules are tested as a table.

use std::collections::BTreeSet;
use std::fmt;

use super::{Config, HostMatch, RouteConfig, UpstreamConfig};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    ListenerAdded(String),
    ListenerRemoved(String),
    /// Same name, new address: the old socket closes, the new one opens.
    ListenerRebound(String),
    /// Same name and address, other settings (TLS, PROXY protocol, trusted or real-IP
    /// sources, redirect, or the `[gateway]` header timeout every listener applies): the
    /// socket stays open, new connections get the new settings.
    ListenerChanged(String),
    RouteAdded(String),
    RouteRemoved(String),
    /// Same host, path and listeners; another upstream, rewrite or setting.
    RouteChanged(String),
    UpstreamAdded(String),
    UpstreamRemoved(String),
    ServerAdded {
        upstream: String,
        server: String,
    },
    ServerRemoved {
        upstream: String,
        server: String,
    },
    /// Any setting of the upstream (balance, health, drain, TLS, ...) or of a server that
    /// stays (weight, scheme).
    UpstreamChanged(String),
    /// `[gateway]` settings: `workers` at the next restart, the others at once.
    GatewayChanged,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::ListenerAdded(n) => write!(f, "+listener {n}"),
            Change::ListenerRemoved(n) => write!(f, "-listener {n}"),
            Change::ListenerRebound(n) => write!(f, "~listener {n} (new address)"),
            Change::ListenerChanged(n) => write!(f, "~listener {n}"),
            Change::RouteAdded(r) => write!(f, "+route {r}"),
            Change::RouteRemoved(r) => write!(f, "-route {r}"),
            Change::RouteChanged(r) => write!(f, "~route {r}"),
            Change::UpstreamAdded(u) => write!(f, "+upstream {u}"),
            Change::UpstreamRemoved(u) => write!(f, "-upstream {u}"),
            Change::ServerAdded { upstream, server } => write!(f, "+server {upstream}/{server}"),
            Change::ServerRemoved { upstream, server } => write!(f, "-server {upstream}/{server}"),
            Change::UpstreamChanged(u) => write!(f, "~upstream {u}"),
            Change::GatewayChanged => write!(f, "~gateway"),
        }
    }
}

/// One line for the log: `+route /v2/, -server chat/10.0.0.1:9000` or `no changes`.
pub fn summary(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no changes".to_string();
    }
    changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn route_key(route: &RouteConfig) -> String {
    let host = match &route.host {
        HostMatch::Any => String::new(),
        HostMatch::Exact(h) => h.clone(),
        HostMatch::Suffix(s) => format!("*{s}"),
    };
    if route.listeners.is_empty() {
        format!("{host}{}", route.path)
    } else {
        format!("{host}{} on {}", route.path, route.listeners.join("+"))
    }
}

/// The changes from `old` to `new`, sorted.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes = BTreeSet::new();
    if old.gateway != new.gateway {
        changes.insert(Change::GatewayChanged);
    }
    let header_timeout_changed =
        old.gateway.client_header_timeout != new.gateway.client_header_timeout;
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => changes.insert(Change::ListenerAdded(l.name.clone())),
            Some(o) if o.bind != l.bind => changes.insert(Change::ListenerRebound(l.name.clone())),
            Some(o) if o != l || header_timeout_changed => {
                changes.insert(Change::ListenerChanged(l.name.clone()))
            }
            Some(_) => false,
        };
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|l| l.name == o.name) {
            changes.insert(Change::ListenerRemoved(o.name.clone()));
        }
    }
    for r in &new.routes {
        let key = route_key(r);
        match old.routes.iter().find(|o| route_key(o) == key) {
            None => changes.insert(Change::RouteAdded(key)),
            Some(o) if o != r => changes.insert(Change::RouteChanged(key)),
            Some(_) => false,
        };
    }
    for o in &old.routes {
        let key = route_key(o);
        if !new.routes.iter().any(|r| route_key(r) == key) {
            changes.insert(Change::RouteRemoved(key));
        }
    }
    for (name, u) in &new.upstreams {
        let Some(o) = old.upstreams.get(name) else {
            changes.insert(Change::UpstreamAdded(name.clone()));
            continue;
        };
        for s in &u.servers {
            if !o.servers.iter().any(|os| os.addr == s.addr) {
                changes.insert(Change::ServerAdded {
                    upstream: name.clone(),
                    server: s.addr.clone(),
                });
            }
        }
        for os in &o.servers {
            if !u.servers.iter().any(|s| s.addr == os.addr) {
                changes.insert(Change::ServerRemoved {
                    upstream: name.clone(),
                    server: os.addr.clone(),
                });
            }
        }
        // A server that stays with another weight or scheme, or any setting of the upstream
        // itself; servers coming and going are their own changes above.
        let kept_server_changed = u
            .servers
            .iter()
            .any(|s| o.servers.iter().any(|os| os.addr == s.addr && os != s));
        let without_servers = |c: &UpstreamConfig| UpstreamConfig {
            servers: Vec::new(),
            ..c.clone()
        };
        if kept_server_changed || without_servers(o) != without_servers(u) {
            changes.insert(Change::UpstreamChanged(name.clone()));
        }
    }
    for name in old.upstreams.keys() {
        if !new.upstreams.contains_key(name) {
            changes.insert(Change::UpstreamRemoved(name.clone()));
        }
    }
    changes.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [[listener]]
        name = "public"
        bind = "127.0.0.1:8080"
        [[route]]
        path = "/chat/"
        upstream = "chat"
        [upstream.chat]
        servers = ["10.0.0.1:9000", "10.0.0.2:9000"]
    "#;

    fn config(text: &str) -> Config {
        super::super::parse(text, "t.toml").unwrap()
    }

    fn changed(edit: impl Fn(&str) -> String) -> Vec<String> {
        diff(&config(BASE), &config(&edit(BASE)))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn table_of_edits_and_their_changes() {
        type Edit = Box<dyn Fn(&str) -> String>;
        let table: Vec<(&str, Edit, Vec<&str>)> = vec![
            ("nothing", Box::new(|b: &str| b.to_string()), vec![]),
            (
                "comment and whitespace only",
                Box::new(|b: &str| format!("# edited\n{b}\n\n")),
                vec![],
            ),
            (
                "add a server",
                Box::new(|b: &str| {
                    b.replace(
                        "\"10.0.0.2:9000\"]",
                        "\"10.0.0.2:9000\", \"10.0.0.3:9000\"]",
                    )
                }),
                vec!["+server chat/10.0.0.3:9000"],
            ),
            (
                "remove a server",
                Box::new(|b: &str| b.replace(", \"10.0.0.2:9000\"", "")),
                vec!["-server chat/10.0.0.2:9000"],
            ),
            (
                "switch balance",
                Box::new(|b: &str| {
                    b.replace(
                        "[upstream.chat]",
                        "[upstream.chat]\nbalance = \"consistent_hash\"",
                    )
                }),
                vec!["~upstream chat"],
            ),
            (
                "change a weight",
                Box::new(|b: &str| {
                    b.replace(
                        "\"10.0.0.1:9000\"",
                        "{ addr = \"10.0.0.1:9000\", weight = 3 }",
                    )
                }),
                vec!["~upstream chat"],
            ),
            (
                "put a server behind TLS",
                Box::new(|b: &str| b.replace("\"10.0.0.1:9000\"", "\"wss://10.0.0.1:9000\"")),
                vec!["~upstream chat"],
            ),
            (
                "take servers out after one failure in 30 s",
                Box::new(|b: &str| {
                    b.replace("[upstream.chat]", "[upstream.chat]\nfail_timeout = \"30s\"")
                }),
                vec!["~upstream chat"],
            ),
            (
                "add a route and its upstream",
                Box::new(|b: &str| {
                    format!(
                        "{b}\n[[route]]\npath = \"/v2/\"\nupstream = \"v2\"\n[upstream.v2]\nservers = [\"10.0.0.9:1\"]\n"
                    )
                }),
                vec!["+route /v2/", "+upstream v2"],
            ),
            (
                "change a route's setting",
                Box::new(|b: &str| {
                    b.replace(
                        "upstream = \"chat\"",
                        "upstream = \"chat\"\nping_interval = \"5s\"",
                    )
                }),
                vec!["~route /chat/"],
            ),
            (
                "change the defaults a route inherits",
                Box::new(|b: &str| format!("[defaults]\nmax_frame_size = \"1MiB\"\n{b}")),
                vec!["~route /chat/"],
            ),
            (
                "add a listener",
                Box::new(|b: &str| {
                    format!("{b}\n[[listener]]\nname = \"admin\"\nbind = \"127.0.0.1:8081\"\n")
                }),
                vec!["+listener admin"],
            ),
            (
                "move a listener",
                Box::new(|b: &str| b.replace("127.0.0.1:8080", "127.0.0.1:8082")),
                vec!["~listener public (new address)"],
            ),
            (
                "accept the PROXY protocol on a listener",
                Box::new(|b: &str| {
                    b.replace(
                        "bind = \"127.0.0.1:8080\"",
                        "bind = \"127.0.0.1:8080\"\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]",
                    )
                }),
                vec!["~listener public"],
            ),
            (
                "change the header timeout every listener applies",
                Box::new(|b: &str| format!("[gateway]\nclient_header_timeout = \"5s\"\n{b}")),
                vec!["~gateway", "~listener public"],
            ),
            (
                "rename a listener",
                Box::new(|b: &str| b.replace("name = \"public\"", "name = \"web\"")),
                vec!["+listener web", "-listener public"],
            ),
            (
                "change the gateway section",
                Box::new(|b: &str| format!("[gateway]\nworkers = 7\n{b}")),
                vec!["~gateway"],
            ),
        ];
        for (what, edit, expected) in table {
            let mut got = changed(edit);
            let mut expected: Vec<String> = expected.into_iter().map(String::from).collect();
            got.sort();
            expected.sort();
            assert_eq!(got, expected, "{what}");
        }
    }

    #[test]
    fn summary_is_one_line() {
        let changes = diff(
            &config(BASE),
            &config(&BASE.replace(", \"10.0.0.2:9000\"", "")),
        );
        assert_eq!(summary(&changes), "-server chat/10.0.0.2:9000");
        assert_eq!(summary(&[]), "no changes");
    }
}
