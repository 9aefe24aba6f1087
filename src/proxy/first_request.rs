//! A connection's first request head, read by the gateway itself. Most WebSocket clients
//! open a connection for the upgrade alone, so an upgrade found here goes straight to the
//! tunnel path, read in place as an [`UpgradeHead`], without actix-http's connection
//! dispatcher (whose per-connection setup was the largest user-space cost of a handshake
//! under callgrind, see BENCHMARKS.md). Anything else is served by actix-http from the
//! first byte: [`Replay`] gives it the bytes read here before the rest of the connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::MAX_HEAD_BYTES;
use super::head::{MAX_HEADERS, UpgradeHead};
use crate::tunnel::Io;

/// The first read's buffer; it doubles up to [`MAX_HEAD_BYTES`] for a larger head.
const FIRST_READ: usize = 2048;

/// What the first request turned out to be.
pub enum FirstRequest {
    /// A WebSocket upgrade: its head (which also holds the bytes that followed it).
    Upgrade(UpgradeHead),
    /// Anything else, for actix-http: the bytes read so far, to replay.
    Http(Bytes),
    /// Answered here (408, 431) or the client left.
    Done,
}

/// Reads the connection's first request head within `timeout`. A head still incomplete
/// after `timeout` is answered 408, one over [`MAX_HEAD_BYTES`] 431; both close.
pub async fn read(
    io: &mut Box<dyn Io>,
    peer: Option<SocketAddr>,
    timeout: Duration,
) -> FirstRequest {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let reading = async {
        loop {
            match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            // The blank line that ends a head: `UpgradeHead` parses it (once). Only a head
            // without one yet is parsed here, to tell a partial head from a broken one.
            if memchr::memmem::find(&buf, b"\r\n\r\n").is_some() {
                return Some(true);
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::Request::new(&mut slots).parse(&buf) {
                Ok(httparse::Status::Complete(_)) | Err(_) => return Some(true),
                Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                    return Some(false);
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() == buf.capacity() {
                        buf.reserve(buf.capacity());
                    }
                }
            }
        }
    };
    let refusal: &[u8] = match tokio::time::timeout(timeout, reading).await {
        Ok(None) => return FirstRequest::Done,
        Ok(Some(true)) => return classify(buf.freeze(), peer),
        Ok(Some(false)) => {
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        }
        Err(_) => b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    };
    let _ = tokio::time::timeout(timeout, async {
        io.write_all(refusal).await?;
        io.shutdown().await
    })
    .await;
    FirstRequest::Done
}

/// An upgrade to WebSocket is read in place; everything else, malformed heads included,
/// goes to actix-http as bytes.
fn classify(buf: Bytes, peer: Option<SocketAddr>) -> FirstRequest {
    match UpgradeHead::parse(buf, peer) {
        Ok(head) => FirstRequest::Upgrade(head),
        Err(buf) => FirstRequest::Http(buf),
    }
}

/// A connection whose first bytes were already read: reads return those first.
pub struct Replay {
    early: Bytes,
    io: Box<dyn Io>,
}

impl Replay {
    pub fn new(early: Bytes, io: Box<dyn Io>) -> Replay {
        Replay { early, io }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.early.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, out);
        }
        let n = self.early.len().min(out.remaining());
        out.put_slice(&self.early[..n]);
        self.early.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl Io for Replay {
    fn poll_write_last(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.io.poll_write_last(cx, buf)
    }

    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_end(cx)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_is_taken_with_the_bytes_after_it_and_anything_else_left_whole() {
        let upgrade = "GET /chat HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x01\x00";
        let FirstRequest::Upgrade(head) = classify(Bytes::from(upgrade), None) else {
            panic!("not taken as an upgrade");
        };
        assert_eq!(crate::proxy::Head::path(&head), "/chat");
        assert_eq!(&head.after_head()[..], b"\x01\x00");
        let plain = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        match classify(Bytes::from(plain), None) {
            FirstRequest::Http(bytes) => assert_eq!(&bytes[..], plain.as_bytes()),
            _ => panic!("a plain request was not left to actix-http"),
        }
    }

    #[tokio::test]
    async fn replay_gives_the_bytes_read_first_in_any_read_size_then_the_connection() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (near, mut far) = tokio::io::duplex(64);
        let mut replay = Replay::new(Bytes::from_static(b"GET / HTT"), Box::new(near));
        far.write_all(b"P/1.1\r\n\r\n").await.unwrap();
        drop(far);
        let mut got = Vec::new();
        let mut small = [0u8; 4];
        loop {
            let n = replay.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
    }
}
