//! `wsgate demo`: two built-in echo backends on loopback and the gateway in front of them,
//! from an embedded configuration, so a newcomer sees the whole path work with nothing
//! else installed. Each backend also serves a small page (through the gateway, as plain
//! HTTP) whose script opens a WebSocket and shows which backend answered.

use std::net::SocketAddr;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use actix_ws::Message;
use futures_util::StreamExt;

use crate::supervisor::{Shutdown, Supervisor};

/// The demo's configuration; `{LISTEN}`, `{BACKEND_1}` and `{BACKEND_2}` are filled in.
const DEMO_CONFIG: &str = r#"
[gateway]
workers = 1

[defaults]
ping_interval = "20s"

[[listener]]
name = "demo"
bind = "{LISTEN}"

# The page and the WebSocket come through the same route, as in a real app.
[[route]]
path = "/"
upstream = "echo"

[upstream.echo]
balance = "round_robin"
servers = ["{BACKEND_1}", "{BACKEND_2}"]
"#;

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>wsgate demo</title>
<style>body{font:16px system-ui,sans-serif;margin:2em;max-width:40em}
#log{background:#f4f4f4;padding:1em;white-space:pre-wrap;min-height:8em}</style></head>
<body><h1>wsgate demo</h1>
<p>This page came from <b>{NAME}</b> through the gateway. Each click opens a new WebSocket
through the gateway; round-robin sends it to the next backend.</p>
<button id="go">Open a WebSocket</button>
<div id="log"></div>
<script>
const log = (t) => { document.getElementById('log').textContent += t + "\n"; };
document.getElementById('go').onclick = () => {
  const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
  ws.onopen = () => ws.send('hello at ' + new Date().toISOString());
  ws.onmessage = (e) => { log(e.data); if (!e.data.startsWith('connected')) ws.close(1000, 'done'); };
  ws.onclose = (e) => log('closed: ' + e.code + ' ' + e.reason);
};
</script></body></html>
"#;

/// A running echo backend.
pub struct EchoBackend {
    pub name: String,
    pub addr: SocketAddr,
    handle: ServerHandle,
}

impl EchoBackend {
    /// Starts on `127.0.0.1:0` in the current actix system. WebSocket: says
    /// `connected to NAME`, then echoes every message (fragments as they come). HTTP: the
    /// demo page.
    pub fn start(name: &str) -> std::io::Result<EchoBackend> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), name)
    }

    /// Starts on `listen`.
    pub fn start_on(listen: SocketAddr, name: &str) -> std::io::Result<EchoBackend> {
        let owned = name.to_string();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(owned.clone()))
                .default_service(web::to(echo))
        })
        .workers(1)
        .disable_signals()
        .bind(listen)?;
        let addr = server
            .addrs()
            .first()
            .copied()
            .ok_or_else(|| std::io::Error::other("no address bound"))?;
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Ok(EchoBackend {
            name: name.to_string(),
            addr,
            handle,
        })
    }

    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

async fn echo(
    req: HttpRequest,
    body: web::Payload,
    name: web::Data<String>,
) -> actix_web::Result<HttpResponse> {
    let upgrade = req.headers().get("upgrade").is_some();
    if !upgrade {
        return Ok(HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body(PAGE.replace("{NAME}", &name)));
    }
    let (response, mut session, stream) = actix_ws::handle(&req, body)?;
    let mut stream = stream.max_frame_size(16 * 1024 * 1024);
    let name = name.get_ref().clone();
    actix_rt::spawn(async move {
        if session.text(format!("connected to {name}")).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = stream.next().await {
            let sent = match msg {
                Message::Text(t) => session.text(t).await,
                Message::Binary(b) => session.binary(b).await,
                Message::Continuation(item) => session.continuation(item).await,
                Message::Ping(p) => session.pong(&p).await,
                Message::Pong(_) | Message::Nop => Ok(()),
                Message::Close(reason) => {
                    let _ = session.close(reason).await;
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    Ok(response)
}

/// The embedded demo configuration for a gateway on `listen` in front of `backends`.
pub fn config(listen: SocketAddr, backends: [SocketAddr; 2]) -> String {
    DEMO_CONFIG
        .replace("{LISTEN}", &listen.to_string())
        .replace("{BACKEND_1}", &backends[0].to_string())
        .replace("{BACKEND_2}", &backends[1].to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo backend: {0}")]
    Backend(#[from] std::io::Error),
    #[error("demo configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Start(#[from] crate::supervisor::StartError),
}

/// Runs one echo backend on `listen` until SIGINT/SIGTERM.
pub async fn serve_echo(listen: SocketAddr, name: &str) -> Result<(), DemoError> {
    let backend = EchoBackend::start_on(listen, name)?;
    println!("echo backend {name} on {}", backend.addr);
    crate::stop_signal().await;
    backend.stop().await;
    Ok(())
}

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(listen: SocketAddr) -> Result<(), DemoError> {
    let backends = [
        EchoBackend::start("backend-1")?,
        EchoBackend::start("backend-2")?,
    ];
    let text = config(listen, [backends[0].addr, backends[1].addr]);
    let config = crate::config::parse(&text, "<embedded demo config>")?;
    let started = Supervisor::start(config, None)?;
    let gateway = started.listeners.first().map_or(listen, |l| l.addr);
    println!("wsgate demo is running.");
    println!(
        "  backends:  {} ({}), {} ({})",
        backends[0].name, backends[0].addr, backends[1].name, backends[1].addr
    );
    println!("  page:      http://{gateway}/   (open it in a browser)");
    println!("  websocket: ws://{gateway}/ws  (e.g. `websocat ws://{gateway}/ws`)");
    println!("Press Ctrl-C to stop.");
    crate::stop_signal().await;
    let _ = started.supervisor.send(Shutdown).await;
    for backend in backends {
        backend.stop().await;
    }
    Ok(())
}
