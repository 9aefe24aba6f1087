//! The request head as the proxy path reads it. [`Head`] is one interface over the two
//! heads a request can arrive with: actix-http's (plain HTTP, and an upgrade that follows
//! other requests on a keep-alive connection) and [`UpgradeHead`], the gateway's own parse
//! of a connection's first request when it is a WebSocket upgrade. Routing, balancing,
//! the upgrade checks and the forwarded headers are written once, against [`Head`].
//!
//! [`UpgradeHead`] exists because the first request is on every handshake's path:
//! building actix-http's request for it (each name interned, each value checked, a hash
//! per lookup) cost more than parsing it (callgrind, BENCHMARKS.md). It keeps httparse's
//! result as offsets into the bytes read, and looks headers up by a scan: an upgrade
//! carries a handful of them.

use std::mem::MaybeUninit;
use std::net::SocketAddr;

use actix_http::RequestHead;
use bytes::Bytes;

/// What the proxy reads of a request head. Header names are matched in any case.
pub trait Head {
    fn method(&self) -> &str;
    /// The request target's path (without the query).
    fn path(&self) -> &str;
    fn query(&self) -> Option<&str>;
    /// The host of an absolute-form target (`GET http://host/ HTTP/1.1`).
    fn target_host(&self) -> Option<&str>;
    /// The TCP peer, or the source a trusted PROXY protocol header named.
    fn peer_addr(&self) -> Option<SocketAddr>;
    /// Every header as `(name, value)`, in the order sent.
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])>;
    /// The values of the headers called `name`, in the order sent.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]>;
    /// The head's size on the wire (near enough for actix-http's).
    fn wire_len(&self) -> usize;

    /// The first value of the header called `name`.
    fn value<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl Head for RequestHead {
    fn method(&self) -> &str {
        self.method.as_str()
    }

    fn path(&self) -> &str {
        self.uri.path()
    }

    fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    fn target_host(&self) -> Option<&str> {
        self.uri.host()
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers()
            .iter()
            .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.headers()
            .get_all(name)
            .map(actix_http::header::HeaderValue::as_bytes)
    }

    fn wire_len(&self) -> usize {
        let target = self.uri.path().len() + self.uri.query().map_or(0, |q| q.len() + 1);
        let line = self.method.as_str().len() + target + 12;
        line + self
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
    }
}

/// Headers a first request may have; one with more goes to actix-http, which decides.
pub const MAX_HEADERS: usize = 96;

/// Where one header's name and value lie in the bytes read.
#[derive(Debug, Clone, Copy)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

/// A connection's first request, parsed by the gateway: a `GET` upgrade to WebSocket,
/// HTTP/1.1, with an origin-form target (`/path?query`).
#[derive(Debug)]
pub struct UpgradeHead {
    /// The bytes read, the head first.
    buf: Bytes,
    head_len: usize,
    /// Where the target's path ends (`?` or the target's end) and the target ends.
    path_end: u32,
    target_end: u32,
    target_start: u32,
    fields: Box<[Field]>,
    peer: Option<SocketAddr>,
}

impl UpgradeHead {
    /// Parses `buf`'s head, or hands `buf` back for anything but a complete WebSocket
    /// upgrade request that this type reads as actix-http would (other requests,
    /// absolute-form targets, bytes outside visible ASCII in the target, more than
    /// [`MAX_HEADERS`] headers, malformed heads): actix-http serves those.
    pub fn parse(buf: Bytes, peer: Option<SocketAddr>) -> Result<UpgradeHead, Bytes> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let Ok(httparse::Status::Complete(head_len)) =
            parsed.parse_with_uninit_headers(&buf, &mut slots)
        else {
            return Err(buf);
        };
        let upgrade_values = parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("upgrade"))
            .map(|h| h.value);
        let is_upgrade = parsed.method == Some("GET")
            && parsed.version == Some(1)
            && super::headers::has_token(upgrade_values, b"websocket");
        let Some(target) = parsed
            .path
            .filter(|target| is_upgrade && is_origin_form(target))
        else {
            return Err(buf);
        };
        let base = buf.as_ptr() as usize;
        let at = |part: &[u8]| {
            let start = (part.as_ptr() as usize - base) as u32;
            (start, start + part.len() as u32)
        };
        let (target_start, target_end) = at(target.as_bytes());
        let path_len = target.find('?').unwrap_or(target.len()) as u32;
        let fields = parsed
            .headers
            .iter()
            .map(|h| Field {
                name: at(h.name.as_bytes()),
                value: at(h.value),
            })
            .collect();
        Ok(UpgradeHead {
            head_len,
            path_end: target_start + path_len,
            target_end,
            target_start,
            fields,
            peer,
            buf,
        })
    }

    /// The bytes that came after the head.
    pub fn after_head(&self) -> Bytes {
        self.buf.slice(self.head_len..)
    }

    fn text(&self, (start, end): (u32, u32)) -> &str {
        // Checked to be visible ASCII when parsed (`is_origin_form`).
        std::str::from_utf8(&self.buf[start as usize..end as usize]).unwrap_or_default()
    }

    fn bytes(&self, (start, end): (u32, u32)) -> &[u8] {
        &self.buf[start as usize..end as usize]
    }
}

/// `/path?query` in visible ASCII, as actix-http's URI parser takes it; anything else (an
/// absolute-form or `*` target, a fragment, other bytes) is left to actix-http.
fn is_origin_form(target: &str) -> bool {
    target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
}

impl Head for UpgradeHead {
    fn method(&self) -> &str {
        "GET"
    }

    fn path(&self) -> &str {
        self.text((self.target_start, self.path_end))
    }

    fn query(&self) -> Option<&str> {
        (self.path_end < self.target_end).then(|| self.text((self.path_end + 1, self.target_end)))
    }

    fn target_host(&self) -> Option<&str> {
        None
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|f| (self.bytes(f.name), self.bytes(f.value)))
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        // Names are compared before any value is sliced: most fields are passed over.
        self.fields
            .iter()
            .filter(move |f| self.bytes(f.name).eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| self.bytes(f.value))
    }

    fn wire_len(&self) -> usize {
        self.head_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> Result<UpgradeHead, Bytes> {
        UpgradeHead::parse(Bytes::from(head.to_string()), None)
    }

    #[test]
    fn an_upgrade_is_read_in_place_with_the_bytes_after_it() {
        let head = "GET /chat?x=1&y HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nX-Two: 1\r\nx-two: 2\r\n\r\n\x01\x00";
        let Ok(head) = parsed(head) else {
            panic!("not taken as an upgrade");
        };
        assert_eq!(head.method(), "GET");
        assert_eq!(head.path(), "/chat");
        assert_eq!(head.query(), Some("x=1&y"));
        assert_eq!(head.value("HOST"), Some(&b"a"[..]));
        assert_eq!(head.values("x-two").collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(head.value("origin"), None);
        assert_eq!(head.fields().count(), 4);
        assert_eq!(&head.after_head()[..], b"\x01\x00");
        let bare = parsed("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert_eq!((bare.path(), bare.query()), ("/", None));
        assert_eq!(bare.after_head().len(), 0);
    }

    #[test]
    fn anything_else_is_handed_back_whole() {
        for head in [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            match parsed(head) {
                Err(bytes) => assert_eq!(&bytes[..], head.as_bytes()),
                Ok(_) => panic!("{head:?} was taken as an upgrade"),
            }
        }
        // One header more than the limit goes to actix-http, which decides.
        let crowded = format!(
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_HEADERS)
        );
        assert!(parsed(&crowded).is_err_and(|bytes| bytes.len() == crowded.len()));
        let full = format!(
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_HEADERS - 1)
        );
        assert!(parsed(&full).is_ok());
    }

    #[test]
    fn both_heads_read_alike() {
        let text = "GET /a/b?q=1 HTTP/1.1\r\nHost: h:1\r\nUpgrade: websocket\r\nCookie: a=1\r\ncookie: b=2\r\n\r\n";
        let ours = parsed(text).unwrap();
        let mut theirs = RequestHead::default();
        theirs.uri = "/a/b?q=1".parse().unwrap();
        for (name, value) in ours.fields() {
            theirs.headers_mut().append(
                actix_http::header::HeaderName::from_bytes(name).unwrap(),
                actix_http::header::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        assert_eq!(ours.path(), theirs.path());
        assert_eq!(ours.query(), theirs.query());
        assert_eq!(
            ours.values("cookie").collect::<Vec<_>>(),
            theirs.values("Cookie").collect::<Vec<_>>()
        );
        assert_eq!(ours.value("host"), theirs.value("host"));
        assert_eq!(ours.wire_len(), text.len());
        // actix-http's head is measured without the blank line.
        assert_eq!(theirs.wire_len() + 2, text.len());
    }
}
