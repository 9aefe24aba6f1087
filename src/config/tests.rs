use super::*;

const MINIMAL: &str = r#"
[[listener]]
bind = "127.0.0.1:8080"

[[route]]
upstream = "u"

[upstream.u]
servers = ["127.0.0.1:9000"]
"#;

fn error_of(text: &str) -> String {
    match parse(text, "config.toml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn minimal_config_takes_every_default() {
    let config = parse(MINIMAL, "config.toml").unwrap();
    assert_eq!(config.listeners[0].name, "listener0");
    assert_eq!(config.routes[0].path, "/");
    assert_eq!(config.routes[0].host, HostMatch::Any);
    assert_eq!(config.routes[0].settings, TunnelSettings::default());
    assert_eq!(config.upstreams["u"].balance, Balance::RoundRobin);
    assert_eq!(config.upstreams["u"].servers[0].weight, 1);
    assert_eq!(config.source.sha256.len(), 64);
}

#[test]
fn routes_inherit_defaults_and_override_them() {
    let config = parse(
        r#"
        [defaults]
        ping_interval = "5s"
        max_frame_size = "1MiB"
        permessage_deflate = false
        [[route]]
        path = "/a/"
        upstream = "u"
        [[route]]
        path = "/b/"
        upstream = "u"
        ping_interval = "500ms"
        idle_timeout = "2m"
        permessage_deflate = true
        [upstream.u]
        balance = "consistent_hash"
        hash_key = "remote_addr"
        servers = ["10.0.0.1:9000", { addr = "[::1]:9001", weight = 2 }, { addr = "10.0.0.3:9000", backup = true }]
        "#,
        "c.toml",
    )
    .unwrap();
    let a = &config.routes[0].settings;
    let b = &config.routes[1].settings;
    assert_eq!(a.ping_interval, Duration::from_secs(5));
    assert_eq!(a.max_frame_size, 1024 * 1024);
    assert_eq!(b.ping_interval, Duration::from_millis(500));
    assert_eq!(b.idle_timeout, Duration::from_secs(120));
    assert_eq!(b.max_frame_size, 1024 * 1024);
    assert!(TunnelSettings::default().permessage_deflate);
    assert!(!a.permessage_deflate);
    assert!(b.permessage_deflate);
    assert_eq!(config.upstreams["u"].hash_key, HashKey::RemoteAddr);
    for (text, key) in [
        ("header:X-User-Id", HashKey::Header("x-user-id".into())),
        ("cookie:session", HashKey::Cookie("session".into())),
        ("query:room", HashKey::Query("room".into())),
    ] {
        let config = parse(
            &format!("[upstream.u]\nbalance = \"consistent_hash\"\nhash_key = \"{text}\"\nservers = [\"a:1\"]\n"),
            "c.toml",
        )
        .unwrap();
        assert_eq!(config.upstreams["u"].hash_key, key);
    }
    let servers = &config.upstreams["u"].servers;
    assert_eq!(
        (servers[1].host.as_str(), servers[1].port, servers[1].weight),
        ("::1", 9001, 2)
    );
    assert_eq!(servers[1].addr, "[::1]:9001");
    assert_eq!(
        servers.iter().map(|s| s.backup).collect::<Vec<_>>(),
        [false, false, true]
    );
}

/// Every rejected file names the place and the problem.
#[test]
fn errors_name_file_line_column_and_problem() {
    let cases: &[(&str, &str)] = &[
        (
            "[[listener]]\nbind = \"127.0.0.1:8080\"\nbnid = 1\n",
            "config.toml:3:1: unknown field `bnid`",
        ),
        ("[gateway\n", "config.toml:1:9:"),
        (
            "[[route]]\nupstream = \"missing\"\n",
            "config.toml:2:12: route names upstream \"missing\", which is not defined (defined: none)",
        ),
        (
            "[upstream.u]\nservers = []\n",
            "config.toml:2:11: upstream \"u\" has an empty pool: list at least one server",
        ),
        (
            "[[listener]]\nbind = \"127.0.0.1:8080\"\n[[listener]]\nbind = \"127.0.0.1:8080\"\n",
            "config.toml:4:8: duplicate bind: 127.0.0.1:8080 is already bound by another listener",
        ),
        (
            "[defaults]\nping_interval = \"soon\"\n",
            "config.toml:2:17: invalid duration \"soon\"",
        ),
        (
            "[defaults]\nmax_frame_size = \"12 parsecs\"\n",
            "config.toml:2:18: invalid size \"12 parsecs\"",
        ),
        (
            "[defaults]\npong_timeout = \"0s\"\n",
            "config.toml:2:16: must be above zero",
        ),
        (
            "[upstream.u]\nbalance = \"random\"\nservers = [\"a:1\"]\n",
            "config.toml:2:11: unknown balance \"random\"",
        ),
        (
            "[upstream.u]\nservers = [\"no-port\"]\n",
            "config.toml:2:12: invalid server address \"no-port\"",
        ),
        (
            "[upstream.u]\nservers = [{ addr = \"a:1\", weight = 0 }]\n",
            "config.toml:2:12: weight must be at least 1",
        ),
        (
            "[upstream.u]\nservers = [\"a:1\", \"a:1\"]\n",
            "config.toml:2:19: server \"a:1\" is listed twice",
        ),
        (
            "[upstream.u]\nbalance = \"consistent_hash\"\nhash_key = \"cookie:\"\nservers = [\"a:1\"]\n",
            "config.toml:3:12: unknown hash_key \"cookie:\": expected \"remote_addr\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"",
        ),
        (
            "[upstream.u]\nhash_key = \"header:x-user\"\nservers = [\"a:1\"]\n",
            "config.toml:2:12: hash_key needs balance = \"consistent_hash\"",
        ),
        (
            "[upstream.u]\nservers = [{ addr = \"a:1\", backup = true }]\n",
            "config.toml:2:11: upstream \"u\" has only backup servers",
        ),
        (
            "[[route]]\npath = \"socket\"\nupstream = \"u\"\n[upstream.u]\nservers = [\"a:1\"]\n",
            "config.toml:2:8: path \"socket\" must start with '/'",
        ),
        (
            "[[route]]\nhost = \"a.*.com\"\nupstream = \"u\"\n[upstream.u]\nservers = [\"a:1\"]\n",
            "config.toml:2:8: '*' is only allowed as the first label",
        ),
        (
            "[[route]]\nupstream = \"u\"\n[[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"a:1\"]\n",
            "config.toml:4:12: duplicate route",
        ),
        (
            "[[route]]\nupstream = \"u\"\nlisteners = [\"nope\"]\n[upstream.u]\nservers = [\"a:1\"]\n",
            "config.toml:3:14: route names listener \"nope\", which is not defined",
        ),
        (
            "[upstream.u]\nhash_key = \"remote_addr\"\nservers = [\"a:1\"]\n",
            "config.toml:2:12: hash_key needs balance = \"consistent_hash\"",
        ),
        (
            "[gateway]\nadmin = \"not an address\"\n",
            "config.toml:2:9: invalid address \"not an address\"",
        ),
    ];
    for (text, expected) in cases {
        let got = error_of(text);
        assert!(
            got.starts_with(expected),
            "for:\n{text}\nexpected: {expected}\ngot:      {got}"
        );
    }
}

#[test]
fn line_column_counts_characters_from_one() {
    let text = "ab\nçd\nxyz";
    assert_eq!(line_column(text, 0), (1, 1));
    assert_eq!(line_column(text, 3), (2, 1));
    assert_eq!(line_column(text, 5), (2, 2));
    assert_eq!(line_column(text, text.len()), (3, 4));
}

#[test]
fn shipped_configs_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut checked = 0;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    if let Ok(examples) = std::fs::read_dir(format!("{dir}/examples")) {
        paths.extend(examples.map(|e| e.unwrap().path()));
    }
    for path in paths {
        if path.extension().is_some_and(|e| e == "toml") {
            load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected config/config.toml and examples, checked {checked}"
    );
}
