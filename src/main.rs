//! The `telegate` command: parses the command line, loads configuration,
//! sets up logging and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use telegate::config::Config;

/// Exit status for configuration problems (`EX_USAGE`).
const EX_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "telegate",
    version,
    about = "Alarm-monitoring gateway for commissioned telecare services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Seconds to finish in-flight work after SIGTERM/SIGINT.
        #[arg(long, default_value_t = 10)]
        grace_s: u64,
    },
    /// Check a configuration file and report every problem.
    Check {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => ExitCode::SUCCESS,
            Err(err) => {
                for line in err.lines() {
                    eprintln!("{line}");
                }
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Run { config, grace_s } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(err) => {
                    for line in err.lines() {
                        eprintln!("{line}");
                    }
                    return ExitCode::from(EX_CONFIG);
                }
            };
            init_tracing();
            match run(config, Duration::from_secs(grace_s)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("telegate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn run(config: Config, grace: Duration) -> anyhow::Result<()> {
    let gateway = telegate::app::start(config, telegate::clock::system()).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    if !gateway.shutdown(grace).await {
        tracing::warn!("grace period ran out; unacknowledged signals will be re-sent");
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
