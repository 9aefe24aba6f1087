//! Plain HTTP on the same routes: requests and responses forwarded with their status,
//! headers and bodies, and bodies streamed both ways without growing the gateway's memory.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHUNK: usize = 64 * 1024;

/// An HTTP backend (actix-web, own thread): `/download/N` streams N chunks of 64 KiB,
/// `/upload` counts the bytes it is sent, anything else echoes method, path and headers.
struct HttpBackend {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpBackend {
    fn start() -> HttpBackend {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = HttpServer::new(|| {
                    App::new()
                        .route("/download/{chunks}", web::get().to(download))
                        .route("/upload", web::post().to(upload))
                        .default_service(web::to(describe))
                })
                .workers(1)
                .disable_signals()
                .bind("127.0.0.1:0")
                .unwrap();
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle())).unwrap();
                let _ = server.await;
            });
        });
        let (addr, handle) = rx.recv_timeout(STEP).unwrap();
        HttpBackend {
            addr,
            handle,
            thread: Some(thread),
        }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        std::thread::spawn(move || futures_executor_block_on(handle.stop(false)))
            .join()
            .unwrap();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

fn futures_executor_block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

async fn download(path: web::Path<u64>) -> HttpResponse {
    let chunk = web::Bytes::from(vec![b'x'; CHUNK]);
    let chunks = path.into_inner();
    let body = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, actix_web::Error>(chunk.clone())),
    );
    HttpResponse::Ok()
        .insert_header(("x-backend", "http-1"))
        .streaming(body)
}

async fn upload(mut body: web::Payload) -> HttpResponse {
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => total += bytes.len() as u64,
            Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
        }
    }
    HttpResponse::Ok().body(total.to_string())
}

async fn describe(req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let mut lines = vec![format!("{} {}", req.method(), req.uri())];
    let mut headers: Vec<String> = req
        .headers()
        .iter()
        .map(|(k, v)| format!("{}: {}", k, v.to_str().unwrap_or("")))
        .collect();
    headers.sort();
    lines.extend(headers);
    lines.push(format!("body: {}", String::from_utf8_lossy(&body)));
    HttpResponse::build(actix_web::http::StatusCode::from_u16(218).unwrap())
        .insert_header(("set-cookie", "a=1"))
        .insert_header(("x-custom", "yes"))
        .body(lines.join("\n"))
}

fn http_gateway(backend: &HttpBackend) -> GatewayThread {
    gateway(
        &simple_config(1, "").replace("path = \"/\"", "path = \"/app/\"\nrewrite = \"/\""),
        &[backend.addr],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_are_forwarded_with_status_headers_and_body() {
    let backend = HttpBackend::start();
    let gw = http_gateway(&backend);
    let a = addr(&gw);
    let (status, head, body) = http(
        a,
        "POST /app/echo?q=1 HTTP/1.1\r\nHost: site.example\r\nContent-Length: 5\r\n\
         Cookie: s=1\r\nConnection: close\r\nX-Forwarded-For: 10.9.9.9\r\n\r\nhello",
    )
    .await;
    assert_eq!(status, 218);
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("set-cookie: a=1") && head.contains("x-custom: yes"),
        "{head}"
    );
    let body = String::from_utf8(body).unwrap();
    assert!(body.starts_with("POST /echo?q=1\n"), "{body}");
    for expected in [
        "host: site.example",
        "cookie: s=1",
        "x-forwarded-for: 10.9.9.9, 127.0.0.1",
        "x-real-ip: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: site.example",
        "body: hello",
    ] {
        assert!(
            body.contains(expected),
            "backend should see {expected:?}:\n{body}"
        );
    }
    assert!(
        !body.contains("connection: close"),
        "hop-by-hop header leaked:\n{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_download_streams_through_without_growing_memory() {
    let backend = HttpBackend::start();
    let gw = http_gateway(&backend);
    let chunks = (1u64 << 30) / CHUNK as u64;
    let mut stream = TcpStream::connect(addr(&gw)).await.unwrap();
    stream
        .write_all(
            format!("GET /app/download/{chunks} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let before = rss_bytes();
    let mut peak = before;
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head_seen = false;
    loop {
        let n = tokio::time::timeout(STEP, stream.read(&mut buf))
            .await
            .expect("data keeps flowing")
            .unwrap();
        if n == 0 {
            break;
        }
        let mut data = &buf[..n];
        if !head_seen {
            let split = data
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("head in the first read")
                + 4;
            assert!(
                data.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&data[..split])
            );
            data = &data[split..];
            head_seen = true;
        }
        total += data.len() as u64;
        if total % (64 << 20) < n as u64 {
            peak = peak.max(rss_bytes());
        }
    }
    // Chunked encoding adds a few bytes per chunk: at least the payload came through.
    assert!(total >= 1 << 30, "received {total} bytes");
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 128 << 20,
        "RSS grew {growth} bytes while streaming 1 GiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_streams_through() {
    let backend = HttpBackend::start();
    let gw = http_gateway(&backend);
    let size: u64 = 256 << 20;
    let mut stream = TcpStream::connect(addr(&gw)).await.unwrap();
    stream
        .write_all(format!("POST /app/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let before = rss_bytes();
    let chunk = vec![7u8; CHUNK];
    let mut sent = 0;
    while sent < size {
        tokio::time::timeout(STEP, stream.write_all(&chunk))
            .await
            .expect("upload keeps flowing")
            .unwrap();
        sent += CHUNK as u64;
    }
    let growth = rss_bytes().saturating_sub(before);
    let mut response = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with(&size.to_string()),
        "backend counted other than {size}: {response}"
    );
    assert!(
        growth < 128 << 20,
        "RSS grew {growth} bytes while uploading 256 MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_http_backend_is_502_and_no_route_is_404() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = gateway(
        &simple_config(1, "").replace("path = \"/\"", "path = \"/app/\""),
        &[dead],
    );
    let (status, _, body) = http(
        addr(&gw),
        "GET /app/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 502);
    assert!(String::from_utf8_lossy(&body).contains("no server could be reached"));
    // That failure took the only server out of rotation (max_fails = 1): the next request
    // is told to come back, as an upgrade would be.
    let (status, head, body) = http(
        addr(&gw),
        "GET /app/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(String::from_utf8_lossy(&body).contains("out of rotation"));
    let (status, _, _) = http(
        addr(&gw),
        "GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404);
}
