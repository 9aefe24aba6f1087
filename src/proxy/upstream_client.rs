//! The HTTP client each worker uses to forward plain HTTP requests to backends (awc), set
//! up for a proxy: Nagle off (a small response must not wait 40 ms for a delayed ACK), no
//! connection cap (awc's default of 100 would silently stall the 101st request), no
//! default headers (the client's User-Agent passes through), and our own timeouts per
//! route. WebSocket upgrades dial their backends themselves ([`super::websocket`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::Uri;
use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection, ConnectorService};
use tokio::net::TcpStream;

/// Sets TCP_NODELAY on every backend connection; awc has no knob for it.
#[derive(Clone, Default)]
struct NoDelayConnector(ConnectorService);

impl Service<ConnectInfo<Uri>> for NoDelayConnector {
    type Response = Connection<Uri, TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<ConnectInfo<Uri>>::poll_ready(&self.0, cx)
    }

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let connecting = self.0.call(req);
        Box::pin(async move {
            let connection = connecting.await?;
            // Best effort: a socket that refuses the option still works, only slower.
            let _ = connection.io_ref().set_nodelay(true);
            Ok(connection)
        })
    }
}

/// The worker's clients, one per connect timeout and TLS setting in use (awc fixes both
/// per connector).
pub struct UpstreamClients {
    tls: Arc<rustls::ClientConfig>,
    clients: RefCell<HashMap<(Duration, usize), awc::Client>>,
}

/// Clients kept per worker at most; a reload that changes TLS settings makes new ones.
const MAX_CLIENTS: usize = 64;

impl UpstreamClients {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        UpstreamClients {
            tls,
            clients: RefCell::new(HashMap::new()),
        }
    }

    /// The client whose connects give up after `connect_timeout` and which verifies TLS
    /// servers with `tls` (the default roots when `None`).
    pub fn get(
        &self,
        connect_timeout: Duration,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> awc::Client {
        let tls = tls.unwrap_or(&self.tls);
        // The settings' address identifies them: a snapshot builds them once.
        let key = (connect_timeout, Arc::as_ptr(tls) as usize);
        let mut clients = self.clients.borrow_mut();
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&key) {
            clients.clear();
        }
        clients
            .entry(key)
            .or_insert_with(|| {
                let connector = awc::Connector::new()
                    .connector(NoDelayConnector::default())
                    .rustls_0_23(Arc::clone(tls))
                    .timeout(connect_timeout)
                    .limit(0);
                awc::Client::builder()
                    .connector(connector)
                    .no_default_headers()
                    .disable_timeout()
                    .finish()
            })
            .clone()
    }
}

/// TLS settings for backends reached over `wss://`/`https://`: the webpki roots.
pub fn default_tls() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}
