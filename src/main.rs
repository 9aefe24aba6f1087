//! `wsgate` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

use wsgate::cli::{Cli, Command};
use wsgate::{config, demo, telemetry};

/// Exit status for a configuration that cannot be used (sysexits `EX_CONFIG`).
const EXIT_CONFIG: u8 = 78;
/// Exit status when the gateway cannot start (for example, a port in use).
const EXIT_START: u8 = 1;

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
            match actix_rt::System::new().block_on(wsgate::run(config, Some(path))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("{err}");
                    ExitCode::from(EXIT_START)
                }
            }
        }
        Command::Demo { listen } => match actix_rt::System::new().block_on(demo::run(listen)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(EXIT_START)
            }
        },
    }
}
