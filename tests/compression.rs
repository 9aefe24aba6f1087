//! permessage-deflate (RFC 7692) end to end: the client's offer reaches the backend, the
//! backend's agreement reaches the client, and compressed frames (RSV1 set) cross the
//! gateway as they came. Both ends are raw sockets here: the test's WebSocket library
//! does not implement the extension, and the frames are the point.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// RFC 7692 §7.2.3.1: "Hello" compressed, in one unmasked frame with RSV1 set.
const HELLO: [u8; 9] = [0xC1, 0x07, 0xF2, 0x48, 0xCD, 0xC9, 0xC9, 0x07, 0x00];

/// The same compressed message as a client sends it: masked, RSV1 set.
fn masked_hello() -> Vec<u8> {
    let key = [0x37, 0xFA, 0x21, 0x3D];
    let mut frame = vec![0xC1, 0x80 | 7];
    frame.extend_from_slice(&key);
    frame.extend(HELLO[2..].iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// A backend for one connection that agrees to permessage-deflate when offered it (with
/// `server_no_context_takeover`, as a server may), sends the compressed "Hello", and
/// returns the upgrade head it got with the first `expect` bytes that came after it.
async fn deflate_backend(
    expect: usize,
) -> (SocketAddr, tokio::task::JoinHandle<(String, Vec<u8>)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let head = read_head(&mut stream).await;
        let offered = accept_upgrade(
            &mut stream,
            &head,
            "permessage-deflate; server_no_context_takeover",
        )
        .await;
        if offered {
            stream.write_all(&HELLO).await.unwrap();
        }
        let got = read_exactly(&mut stream, expect).await;
        (head, got)
    });
    (addr, task)
}

/// Opens a WebSocket through the gateway offering permessage-deflate (and an extension
/// the gateway does not know), returning the socket and the gateway's 101.
async fn upgrade(gateway: SocketAddr) -> (TcpStream, String) {
    let mut client = TcpStream::connect(gateway).await.unwrap();
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-private-frames\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (client, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_frames_cross_the_gateway_when_both_ends_agree() {
    let hello = masked_hello();
    let (backend, seen) = deflate_backend(hello.len()).await;
    let gw = gateway(&simple_config(1, ""), &[backend]);
    let (mut client, answer) = upgrade(addr(&gw)).await;
    assert_eq!(
        header(&answer, "sec-websocket-extensions"),
        Some("permessage-deflate; server_no_context_takeover"),
        "the backend's agreement reaches the client: {answer}"
    );
    assert_eq!(read_exactly(&mut client, HELLO.len()).await, HELLO);
    client.write_all(&hello).await.unwrap();
    let (head, got) = seen.await.unwrap();
    assert_eq!(
        got, hello,
        "the client's compressed frame reaches the backend as sent"
    );
    assert_eq!(
        header(&head, "sec-websocket-extensions"),
        Some("permessage-deflate; client_max_window_bits"),
        "only the offer the gateway understands reaches the backend: {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_permessage_deflate_off_nothing_is_agreed_and_a_compressed_frame_is_refused() {
    // Two bytes for the backend: the first ones after the upgrade are the gateway's close.
    let (backend, seen) = deflate_backend(2).await;
    let gw = gateway(&simple_config(1, "permessage_deflate = false"), &[backend]);
    let (mut client, answer) = upgrade(addr(&gw)).await;
    assert_eq!(
        header(&answer, "sec-websocket-extensions"),
        None,
        "{answer}"
    );
    client.write_all(&masked_hello()).await.unwrap();
    // RFC 7692 §6: RSV1 without the extension fails the connection (1002).
    let close = read_exactly(&mut client, 4).await;
    assert_eq!(close[0], 0x88, "a close frame: {close:?}");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1002);
    let (head, got) = seen.await.unwrap();
    assert_eq!(header(&head, "sec-websocket-extensions"), None, "{head}");
    assert_eq!(
        got[0], 0x88,
        "the backend gets a close frame, not the compressed one"
    );
}

/// The page the browser test loads: it opens a WebSocket to the same host, reports what it
/// got and which extension was agreed (a plain request to `/report/DATA/EXTENSIONS`), and
/// answers with a message of its own.
const PAGE: &str = "<!doctype html><body>waiting</body><script>\
    const ws = new WebSocket('ws://' + location.host + '/ws');\
    ws.onmessage = (e) => { fetch('/report/' + e.data + '/' + ws.extensions);\
                            ws.send('Hello from the browser, compressed'); };\
    ws.onerror = () => { fetch('/report/error/'); };\
    </script>";

/// What the browser's side of the test reached the backend with.
enum FromBrowser {
    /// The path of a `/report/...` request.
    Report(String),
    /// The first byte of the browser's WebSocket message (its FIN, RSV and opcode bits).
    FirstByte(u8),
}

/// A backend for a browser: `/report/...` requests are passed on, any other plain GET gets
/// [`PAGE`]; an upgrade is agreed with permessage-deflate and gets the compressed "Hello".
async fn browser_backend(to_test: tokio::sync::mpsc::Sender<FromBrowser>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let to_test = to_test.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                if header(&head, "sec-websocket-key").is_none() {
                    let body = if path.starts_with("/report/") {
                        let _ = to_test.send(FromBrowser::Report(path)).await;
                        ""
                    } else {
                        PAGE
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    return;
                }
                let agreed = accept_upgrade(&mut stream, &head, "permessage-deflate").await;
                // Without the extension the page still gets "Hello", uncompressed.
                let hello: &[u8] = if !agreed { b"\x81\x05Hello" } else { &HELLO };
                stream.write_all(hello).await.unwrap();
                let byte = read_exactly(&mut stream, 1).await;
                let _ = to_test.send(FromBrowser::FirstByte(byte[0])).await;
            });
        }
    });
    addr
}

/// Ends the browser and every process it started when the test ends, however it ends.
struct Browser(std::process::Child);

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium runs in a process group of its own (renderer, GPU and zygote processes).
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_gets_compression_through_the_gateway() {
    let (to_test, mut from_browser) = tokio::sync::mpsc::channel(4);
    let backend = browser_backend(to_test).await;
    let gw = gateway(&simple_config(1, ""), &[backend]);
    let profile = tempfile::tempdir().unwrap();
    let _browser = Browser(
        headless_chromium(profile.path())
            .arg(format!("http://{}/page", addr(&gw)))
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromium is installed (.ci/run installs Debian's chromium)"),
    );
    let (mut report, mut first_byte) = (None, None);
    while report.is_none() || first_byte.is_none() {
        match tokio::time::timeout(Duration::from_secs(30), from_browser.recv())
            .await
            .expect("the page reports and its message arrives within 30 s")
            .unwrap()
        {
            FromBrowser::Report(path) => report = Some(path),
            FromBrowser::FirstByte(byte) => first_byte = Some(byte),
        }
    }
    assert_eq!(
        report.as_deref(),
        Some("/report/Hello/permessage-deflate"),
        "the browser inflated the backend's compressed frame and names the extension"
    );
    let first_byte = first_byte.unwrap();
    assert_eq!(
        first_byte & 0x40,
        0x40,
        "the browser's message arrived compressed (RSV1): {first_byte:#x}"
    );
}
