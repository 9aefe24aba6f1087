//! The configuration file as written: serde types that mirror the TOML one to one.
//!
//! Every struct denies unknown keys, so a typo is an error with its position rather than a
//! silently ignored setting. Fields that validation checks beyond their type keep their
//! [`Spanned`] position so that a semantic error can still name `file:line:column`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

/// A duration written for humans: `"500ms"`, `"4s"`, `"2m"`, `"0s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration such as "500ms", "4s" or "2m""#)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(text.trim())
                    .map(HumanDuration)
                    .map_err(|err| {
                        E::custom(format!(
                            r#"invalid duration {text:?}: {err} (write e.g. "500ms", "4s", "2m")"#
                        ))
                    })
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// A size written for humans: `"64KiB"`, `"16MiB"`, or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size such as "64KiB" or "16MiB""#)
            }
            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<HumanSize, E> {
                Ok(HumanSize(bytes))
            }
            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<HumanSize, E> {
                u64::try_from(bytes)
                    .map(HumanSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanSize, E> {
                text.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|size| HumanSize(size.as_u64()))
                    .map_err(|err| {
                        E::custom(format!(
                            r#"invalid size {text:?}: {err} (write e.g. "64KiB", "16MiB")"#
                        ))
                    })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Declares a struct that carries the per-tunnel settings next to its own fields, so
/// `[defaults]` and every `[[route]]` accept exactly the same keys (serde's `flatten` cannot
/// be combined with `deny_unknown_fields`).
macro_rules! with_tunnel_settings {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            pub connect_timeout: Option<Spanned<HumanDuration>>,
            pub handshake_timeout: Option<Spanned<HumanDuration>>,
            pub response_timeout: Option<Spanned<HumanDuration>>,
            pub ping_interval: Option<Spanned<HumanDuration>>,
            pub pong_timeout: Option<Spanned<HumanDuration>>,
            pub idle_timeout: Option<HumanDuration>,
            pub max_frame_size: Option<Spanned<HumanSize>>,
            pub max_message_size: Option<Spanned<HumanSize>>,
            pub max_buffer: Option<Spanned<HumanSize>>,
            pub slow_consumer: Option<Spanned<String>>,
            pub slow_consumer_timeout: Option<Spanned<HumanDuration>>,
            pub permessage_deflate: Option<bool>,
        }

        impl $name {
            /// The tunnel settings this table sets, without its other keys.
            pub fn settings(&self) -> RawSettings {
                RawSettings {
                    connect_timeout: self.connect_timeout.clone(),
                    handshake_timeout: self.handshake_timeout.clone(),
                    response_timeout: self.response_timeout.clone(),
                    ping_interval: self.ping_interval.clone(),
                    pong_timeout: self.pong_timeout.clone(),
                    idle_timeout: self.idle_timeout,
                    max_frame_size: self.max_frame_size.clone(),
                    max_message_size: self.max_message_size.clone(),
                    max_buffer: self.max_buffer.clone(),
                    slow_consumer: self.slow_consumer.clone(),
                    slow_consumer_timeout: self.slow_consumer_timeout.clone(),
                    permessage_deflate: self.permessage_deflate,
                }
            }
        }
    };
}

with_tunnel_settings! {
    /// `[defaults]`: the tunnel settings every route inherits.
    #[derive(Default)]
    pub struct RawSettings {}
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub defaults: RawSettings,
    #[serde(default)]
    pub listener: Vec<RawListener>,
    #[serde(default)]
    pub route: Vec<RawRoute>,
    #[serde(default)]
    pub upstream: BTreeMap<String, Spanned<RawUpstream>>,
}

/// `[gateway]`: process-wide settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub admin: Option<Spanned<String>>,
    pub workers: Option<Spanned<usize>>,
    pub shutdown_timeout: Option<HumanDuration>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub client_header_timeout: Option<HumanDuration>,
    pub shutdown_spread: Option<HumanDuration>,
    pub shutdown_delay: Option<HumanDuration>,
}

/// One `[[listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<Spanned<String>>,
    pub bind: Spanned<String>,
    pub tls: Option<Spanned<RawTls>>,
    pub redirect_https: Option<Spanned<RawRedirect>>,
    pub proxy_protocol: Option<Spanned<bool>>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    pub real_ip_from: Option<Vec<Spanned<String>>>,
}

/// `tls = { cert = "…", key = "…" }` or `tls = { certs = [{ cert, key }, …] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub certs: Option<Vec<RawCertPair>>,
    pub min_version: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertPair {
    pub cert: String,
    pub key: String,
}

/// `redirect_https = true` (to port 443) or `redirect_https = 8443`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawRedirect {
    On(bool),
    Port(i64),
}

with_tunnel_settings! {
    /// One `[[route]]`.
    pub struct RawRoute {
        pub host: Option<Spanned<String>>,
        pub path: Option<Spanned<String>>,
        pub rewrite: Option<Spanned<String>>,
        pub upstream: Spanned<String>,
        pub listeners: Option<Vec<Spanned<String>>>,
        pub host_header: Option<Spanned<String>>,
        pub max_connections: Option<usize>,
        pub allowed_origins: Option<Vec<Spanned<String>>>,
        pub access_log: Option<bool>,
    }
}

/// One `[upstream.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub balance: Option<Spanned<String>>,
    pub hash_key: Option<Spanned<String>>,
    pub servers: Spanned<Vec<Spanned<RawServer>>>,
    pub drain_timeout: Option<HumanDuration>,
    pub drain_spread: Option<HumanDuration>,
    pub tls: Option<bool>,
    pub ca: Option<String>,
    pub insecure_skip_verify: Option<bool>,
    pub hash_balance_factor: Option<Spanned<f64>>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<HumanDuration>,
    pub health_check: Option<Spanned<RawHealthCheck>>,
}

/// `[upstream.NAME.health_check]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub interval: Option<HumanDuration>,
    pub timeout: Option<HumanDuration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub probe: Option<Spanned<String>>,
    pub path: Option<String>,
}

/// A server: `"host:port"` or `{ addr = "host:port", weight = 2, backup = true,
/// max_connections = 5000 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawServer {
    Addr(String),
    Table(RawServerTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTable {
    pub addr: String,
    pub weight: Option<u32>,
    pub backup: Option<bool>,
    pub max_connections: Option<u32>,
}
