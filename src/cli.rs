//! Command-line interface.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::defaults::CONFIG_PATH;
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "wsgate",
    version,
    about = "A WebSocket-aware load-balancing gateway"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (like `nginx -t`).
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = CONFIG_PATH)]
        config: PathBuf,
    },
    /// Exit 0 if the gateway's admin listener answers /healthz (a container HEALTHCHECK
    /// that needs no curl).
    Health {
        /// The admin listener.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
    /// Run one built-in echo backend (the demo's), e.g. as a compose service.
    Echo {
        #[arg(long, default_value = "0.0.0.0:9000")]
        listen: SocketAddr,
        /// The name it answers with.
        #[arg(long, default_value = "echo")]
        name: String,
    },
    /// Start two built-in echo backends and the gateway in front of them, with an
    /// embedded configuration: a working demo with nothing else running.
    Demo {
        /// Where the gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}
