//! The headers a backend receives and the headers a client gets back: end-to-end headers
//! pass, hop-by-hop headers (RFC 9110 §7.6.1) stop at the gateway, and the forwarding
//! headers nginx users set by hand (`X-Forwarded-For`, `X-Real-IP`, ...) are set for them.

use std::net::IpAddr;

use actix_http::header::{self, HeaderMap, HeaderName, HeaderValue};

use smallvec::SmallVec;

use super::Head;

/// Headers that describe one connection and never cross the gateway.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::CONTENT_LENGTH, // recomputed from the body each hop
];

/// Negotiated per WebSocket leg. Extensions are the exception the upgrade makes itself:
/// permessage-deflate offers pass ([`deflate_offers`]), as frames cross the gateway as
/// they came; any other extension could give frame bits a meaning the relay would not
/// know, so it is never offered to the backend.
const WEBSOCKET_PER_LEG: [HeaderName; 4] = [
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_EXTENSIONS,
    header::SEC_WEBSOCKET_ACCEPT,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Facts about the client's request that the forwarding headers carry.
pub struct Forwarded<'a> {
    /// The client (X-Real-IP).
    pub client_ip: IpAddr,
    /// The hop the request came from, appended to X-Forwarded-For.
    pub peer_ip: IpAddr,
    /// `http` or `https`: how the client reached the gateway.
    pub proto: &'static str,
    /// The Host the client asked for.
    pub host: Option<&'a [u8]>,
    /// Replaces Host toward the backend (`host_header` on the route).
    pub host_override: Option<&'a str>,
}

/// The elements of a comma-separated header list (RFC 9110 §5.6.1) over all of the
/// header's values, trimmed; empty elements included.
pub fn list_elements<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

/// Whether a header list (all of the header's values) has `token`, in any case.
pub fn has_token<'a>(values: impl Iterator<Item = &'a [u8]>, token: &[u8]) -> bool {
    list_elements(values).any(|t| t.eq_ignore_ascii_case(token))
}

/// The tokens of a message's `Connection` header values: the headers they name are
/// hop-by-hop for that message.
fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> SmallVec<[&'a [u8]; 4]> {
    list_elements(values).collect()
}

/// The one rule for both directions: hop-by-hop headers (the fixed ones and those the
/// message's `Connection` names) and the per-leg WebSocket headers stop at the gateway.
/// Case-insensitive, so it serves parsed heads (any case) and header maps alike.
fn stops_here(name: &[u8], connection_tokens: &[&[u8]]) -> bool {
    HOP_BY_HOP
        .iter()
        .chain(&WEBSOCKET_PER_LEG)
        .chain([&KEEP_ALIVE, &PROXY_CONNECTION])
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
        || connection_tokens
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name))
}

/// The extension named by one element of a `Sec-WebSocket-Extensions` list (RFC 6455
/// §9.1: `name *( ";" param )`).
fn extension_name(element: &[u8]) -> &[u8] {
    element
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

fn is_permessage_deflate(element: &[u8]) -> bool {
    extension_name(element).eq_ignore_ascii_case(b"permessage-deflate")
}

fn extension_elements<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> impl Iterator<Item = &'a [u8]> {
    list_elements(values).filter(|e| !e.is_empty())
}

/// The client's permessage-deflate offers (RFC 7692) among its `Sec-WebSocket-Extensions`
/// values, as one value for the backend; `None` if it made none.
pub fn deflate_offers<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut offers = Vec::new();
    for offer in extension_elements(values).filter(|e| is_permessage_deflate(e)) {
        if !offers.is_empty() {
            offers.extend_from_slice(b", ");
        }
        offers.extend_from_slice(offer);
    }
    (!offers.is_empty()).then_some(offers)
}

/// Checks the extensions a backend agreed to (its `Sec-WebSocket-Extensions` values)
/// against what was offered: `Ok(true)` if permessage-deflate is in use, `Ok(false)` if no
/// extension is; an error names what a client must refuse (RFC 6455 §4.1: an extension
/// that was not offered).
pub fn agreed_deflate<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    offered: bool,
) -> Result<bool, String> {
    let mut agreed = false;
    for element in extension_elements(values) {
        let problem = if !offered || !is_permessage_deflate(element) {
            "an extension that was not offered"
        } else if agreed {
            "permessage-deflate twice"
        } else {
            agreed = true;
            continue;
        };
        return Err(format!(
            "the backend agreed to {problem}: {:?}",
            String::from_utf8_lossy(element)
        ));
    }
    Ok(agreed)
}

/// Appends `name: value\r\n` to a head being written.
pub fn put_header(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    head.extend_from_slice(name);
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// An address as forwarding headers write it (an IPv4-mapped IPv6 address as IPv4), on
/// the stack: a handshake writes two.
struct IpText {
    /// The longest form is `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`.
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// IPv4, the common case, is written by hand: `Display` cost as much as the rest of the
/// headers together (callgrind).
fn ip_text(ip: IpAddr) -> IpText {
    let mut text = IpText {
        buf: [0; 45],
        len: 0,
    };
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut push = |b: u8| {
                text.buf[text.len] = b;
                text.len += 1;
            };
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    push(b'.');
                }
                if octet >= 100 {
                    push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    push(b'0' + octet / 10 % 10);
                }
                push(b'0' + octet % 10);
            }
        }
        v6 => {
            use std::io::Write as _;
            let mut rest = &mut text.buf[..];
            // Cannot fail: the longest address fits.
            let _ = write!(rest, "{v6}");
            text.len = 45 - rest.len();
        }
    }
    text
}

/// Where the headers for a backend go: a header map (plain HTTP, sent by awc) or the bytes
/// of a request head (a WebSocket upgrade, written by the gateway itself). Names and
/// values come from a parsed head or from the gateway, so they are valid as they are.
pub trait HeaderSink {
    fn put(&mut self, name: &[u8], value: &[u8]);
}

impl HeaderSink for HeaderMap {
    fn put(&mut self, name: &[u8], value: &[u8]) {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            self.append(name, value);
        }
    }
}

impl HeaderSink for Vec<u8> {
    fn put(&mut self, name: &[u8], value: &[u8]) {
        put_header(self, name, value);
    }
}

/// The headers to send to the backend for a client request with head `incoming`.
pub fn to_backend(incoming: &impl Head, fwd: &Forwarded<'_>) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(incoming.fields().count() + 5);
    forward(incoming, fwd, &mut out);
    out
}

/// Headers the gateway writes itself toward the backend; the client's are dropped.
const SET_BY_THE_GATEWAY: [HeaderName; 5] = [
    header::HOST,
    X_FORWARDED_FOR,
    X_REAL_IP,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
];

/// Puts the headers to send to the backend into `out`: the client's end-to-end headers,
/// then Host and the forwarding headers. Returns whether a Host header was put.
pub fn forward(incoming: &impl Head, fwd: &Forwarded<'_>, out: &mut impl HeaderSink) -> bool {
    let tokens = connection_tokens(incoming.values("connection"));
    for (name, value) in incoming.fields() {
        let set_here = || {
            SET_BY_THE_GATEWAY
                .iter()
                .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
        };
        if !stops_here(name, &tokens) && !set_here() {
            out.put(name, value);
        }
    }
    let host = fwd.host_override.map(str::as_bytes).or(fwd.host);
    if let Some(host) = host {
        out.put(b"host", host);
    }
    if let Some(original) = fwd.host {
        out.put(X_FORWARDED_HOST.as_str().as_bytes(), original);
    }
    // nginx's $proxy_add_x_forwarded_for: the list the client sent, then the hop it came
    // from (the client itself unless a trusted balancer is in between).
    let peer_ip = ip_text(fwd.peer_ip);
    let mut previous = incoming
        .values("x-forwarded-for")
        .filter(|v| v.is_ascii())
        .peekable();
    if previous.peek().is_none() {
        out.put(X_FORWARDED_FOR.as_str().as_bytes(), peer_ip.as_bytes());
    } else {
        let mut xff = Vec::new();
        for hop in previous {
            xff.extend_from_slice(hop);
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(peer_ip.as_bytes());
        out.put(X_FORWARDED_FOR.as_str().as_bytes(), &xff);
    }
    out.put(
        X_REAL_IP.as_str().as_bytes(),
        ip_text(fwd.client_ip).as_bytes(),
    );
    out.put(X_FORWARDED_PROTO.as_str().as_bytes(), fwd.proto.as_bytes());
    host.is_some()
}

/// Copies a backend response's end-to-end headers into `out` (the client's response).
pub fn to_client(backend: &HeaderMap, out: &mut HeaderMap) {
    let tokens = connection_tokens(
        backend
            .get_all(header::CONNECTION)
            .map(HeaderValue::as_bytes),
    );
    for (name, value) in backend.iter() {
        if !stops_here(name.as_str().as_bytes(), &tokens) {
            out.append(name.clone(), value.clone());
        }
    }
}

/// The end-to-end headers of a backend's answer given as raw `(name, value)` pairs (a
/// head parsed without building a header map); the rule of [`to_client`].
pub fn end_to_end<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
) -> impl Iterator<Item = (&'a str, &'a [u8])> {
    let tokens = connection_tokens(
        pairs
            .clone()
            .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
            .map(|(_, value)| value),
    );
    pairs.filter(move |(name, _)| !stops_here(name.as_bytes(), &tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_permessage_deflate_offers_reach_the_backend() {
        let offers = |values: &[&str]| {
            deflate_offers(values.iter().map(|v| v.as_bytes()))
                .map(|o| String::from_utf8(o).unwrap())
        };
        // What browsers send.
        assert_eq!(
            offers(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some("permessage-deflate; client_max_window_bits")
        );
        assert_eq!(
            offers(&[
                "x-webkit-deflate-frame, Permessage-Deflate ;server_no_context_takeover",
                "foo; bar=1,permessage-deflate"
            ])
            .as_deref(),
            Some("Permessage-Deflate ;server_no_context_takeover, permessage-deflate")
        );
        assert_eq!(offers(&["x-webkit-deflate-frame", " , "]), None);
        assert_eq!(offers(&[]), None);
    }

    #[test]
    fn the_backend_may_agree_only_to_one_permessage_deflate_that_was_offered() {
        let agreed =
            |values: &[&str], offered| agreed_deflate(values.iter().map(|v| v.as_bytes()), offered);
        assert_eq!(agreed(&[], true), Ok(false));
        assert_eq!(agreed(&[], false), Ok(false));
        assert_eq!(
            agreed(&["permessage-deflate; server_max_window_bits=10"], true),
            Ok(true)
        );
        assert!(agreed(&["permessage-deflate"], false).is_err());
        assert!(agreed(&["x-webkit-deflate-frame"], true).is_err());
        assert!(
            agreed(&["permessage-deflate", "permessage-deflate"], true)
                .is_err_and(|e| e.contains("twice"))
        );
        assert!(agreed(&["permessage-deflate, foo"], true).is_err());
    }

    #[test]
    fn addresses_are_written_like_display_does() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip).as_bytes(), ip.to_string().as_bytes());
        }
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(ip_text(mapped).as_bytes(), b"10.1.2.3");
        let longest: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(ip_text(longest).as_bytes(), longest.to_string().as_bytes());
    }

    fn head(pairs: &[(&'static str, &'static str)]) -> actix_http::RequestHead {
        let mut head = actix_http::RequestHead::default();
        for (k, v) in pairs {
            head.headers_mut()
                .append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        head
    }

    #[test]
    fn forwarding_headers_are_set_and_hop_by_hop_stripped() {
        let incoming = head(&[
            ("host", "chat.example.com"),
            ("connection", "Upgrade, X-Private"),
            ("upgrade", "websocket"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "abc"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("sec-websocket-protocol", "v1, v2"),
            ("cookie", "a=1"),
            ("origin", "https://chat.example.com"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        let out = to_backend(
            &incoming,
            &Forwarded {
                client_ip: "::ffff:127.0.0.7".parse().unwrap(),
                peer_ip: "::ffff:127.0.0.7".parse().unwrap(),
                proto: "https",
                host: incoming.value("host"),
                host_override: None,
            },
        );
        let get = |k: &str| out.get(k).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(get("host").as_deref(), Some("chat.example.com"));
        assert_eq!(
            get("x-forwarded-for").as_deref(),
            Some("203.0.113.9, 127.0.0.7")
        );
        assert_eq!(get("x-real-ip").as_deref(), Some("127.0.0.7"));
        assert_eq!(get("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(get("x-forwarded-host").as_deref(), Some("chat.example.com"));
        assert_eq!(get("sec-websocket-protocol").as_deref(), Some("v1, v2"));
        assert_eq!(get("cookie").as_deref(), Some("a=1"));
        assert_eq!(get("origin").as_deref(), Some("https://chat.example.com"));
        for gone in [
            "connection",
            "upgrade",
            "x-private",
            "keep-alive",
            "sec-websocket-key",
            "sec-websocket-extensions",
        ] {
            assert_eq!(get(gone), None, "{gone} must not reach the backend");
        }
    }

    #[test]
    fn host_override_replaces_host_but_x_forwarded_host_keeps_the_original() {
        let incoming = head(&[("host", "public.example.com")]);
        let out = to_backend(
            &incoming,
            &Forwarded {
                client_ip: "10.0.0.1".parse().unwrap(),
                peer_ip: "10.0.0.1".parse().unwrap(),
                proto: "http",
                host: incoming.value("host"),
                host_override: Some("backend.internal:9000"),
            },
        );
        assert_eq!(out.get("host").unwrap(), "backend.internal:9000");
        assert_eq!(out.get("x-forwarded-host").unwrap(), "public.example.com");
    }
}
