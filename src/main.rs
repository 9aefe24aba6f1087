//! `wsgate` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

use wsgate::cli::{Cli, Command};
use wsgate::{config, demo, telemetry};

/// jemalloc rather than glibc's malloc: every connection allocates a few 128-byte-aligned
/// blocks (tokio's task cells and I/O registrations), which glibc serves slowly (830
/// instructions each under callgrind) and by splitting chunks.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for a configuration that cannot be used (sysexits `EX_CONFIG`).
const EXIT_CONFIG: u8 = 78;
/// Exit status when the gateway cannot start (for example, a port in use).
const EXIT_START: u8 = 1;

/// GET /healthz on the admin listener, with a short timeout.
fn health(admin: std::net::SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&admin, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: wsgate\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    if &head[9..12] == b"200" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "answered {}",
            String::from_utf8_lossy(&head)
        )))
    }
}

/// Raises the soft open-file limit to the hard one before serving: each tunnel holds two
/// sockets, and a default soft limit of 1,024 would cap the gateway at a few hundred.
fn raise_open_file_limit() {
    match wsgate::limits::raise_open_file_limit() {
        Ok(limit) if limit.now > limit.before => {
            tracing::info!(
                from = limit.before,
                to = limit.now,
                "open-file limit raised to the hard limit"
            )
        }
        Ok(_) => {}
        Err(err) => tracing::warn!("cannot raise the open-file limit: {err}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Check { config: path } => match config::load(&path) {
            Ok(config) => {
                println!(
                    "{}: ok ({} listeners, {} routes, {} upstreams)",
                    path.display(),
                    config.listeners.len(),
                    config.routes.len(),
                    config.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config: path } => {
            let path = config::absolute_path(&path);
            let config = match config::load(&path) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("{err}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            raise_open_file_limit();
            match actix_rt::System::new().block_on(wsgate::run(config, Some(path))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("{err}");
                    ExitCode::from(EXIT_START)
                }
            }
        }
        Command::Health { admin } => match health(admin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("wsgate health: {admin}: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Echo { listen, name } => {
            raise_open_file_limit();
            match actix_rt::System::new().block_on(demo::serve_echo(listen, &name)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("{err}");
                    ExitCode::from(EXIT_START)
                }
            }
        }
        Command::Demo { listen } => {
            raise_open_file_limit();
            match actix_rt::System::new().block_on(demo::run(listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("{err}");
                    ExitCode::from(EXIT_START)
                }
            }
        }
    }
}
