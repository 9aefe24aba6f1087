//! tokio-floor: the least a proxy on wsgate's runtime can do, to measure that runtime's
//! floor beside nginx. A plain TCP proxy on tokio's current-thread runtime with a
//! `LocalSet` (the shape actix-rt gives each wsgate worker): one task per connection,
//! `copy_bidirectional` between client and backend (round robin), no HTTP, no WebSocket
//! parsing, no actor. The upgrade and the frames pass through it as bytes.
//!
//!   tokio-floor --listen 127.0.0.1:8097 --backends 127.0.0.1:9001,127.0.0.1:9002
//!   bench/run.sh "tokio-floor=bench/harness/wsload/target/release/tokio-floor --listen 127.0.0.1:{PORT} --backends {BACKENDS},8097"

use std::net::SocketAddr;

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(about = "A bare TCP proxy on tokio's current-thread runtime (a runtime's floor)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Backends, comma-separated, taken in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    backends: Vec<SocketAddr>,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(args.listen).await.expect("bind --listen");
        let mut turn = 0usize;
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                // Out of descriptors, say: a pause, not a spin that would count as its CPU.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let backend = args.backends[turn % args.backends.len()];
            turn = turn.wrapping_add(1);
            tokio::task::spawn_local(async move {
                let _ = client.set_nodelay(true);
                let Ok(mut server) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
}
