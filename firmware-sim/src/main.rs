//! The `firmware-sim` command line: parses arguments, sets up logging and runs a simulator from the library.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use firmware_sim::arc::{ArcConfig, ArcSim, Delay};
use tracing::error;
use tracing_subscriber::EnvFilter;

/// The exit status for bad arguments (sysexits `EX_USAGE`).
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "firmware-sim", version, about = "Simulators for telegate")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an alarm receiving centre (ARC) that receives deliveries on POST /alarms.
    Arc(ArcArgs),
}

#[derive(Args)]
struct ArcArgs {
    /// Address to listen on; the delivery URL is http://ADDR/alarms.
    #[arg(long, default_value = "127.0.0.1:19001")]
    listen: SocketAddr,
    /// HMAC key the deliveries are signed with.
    #[arg(long)]
    secret: String,
    /// Bearer token for progress reports to the gateway.
    #[arg(long)]
    token: String,
    /// Gateway API base URL for progress reports (e.g. http://127.0.0.1:8080); none when left out.
    #[arg(long)]
    gateway: Option<String>,
    /// Share (0-1) of new deliveries answered 503.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    fail_share: f64,
    /// Retry-After header (seconds) on 503 answers.
    #[arg(long)]
    retry_after_s: Option<u64>,
    /// Delay from acceptance to "answered": fixed:2s, uniform:5s..30s, exp:20s or lognormal:30s,0.5.
    #[arg(long, default_value = "fixed:1s")]
    answer_delay: Delay,
    /// Delay from "answered" to "resolved", in the same forms.
    #[arg(long, default_value = "fixed:5s")]
    resolve_delay: Delay,
    /// Seed of the random number generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds after start when the port goes down (with --down-for).
    #[arg(long, requires = "down_for")]
    down_after: Option<u64>,
    /// Seconds the port stays down (with --down-after).
    #[arg(long, requires = "down_after")]
    down_for: Option<u64>,
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!("{text:?} is not a number between 0 and 1")),
    }
}

impl ArcArgs {
    fn config(&self) -> ArcConfig {
        let mut config = ArcConfig::new(self.secret.clone(), self.token.clone());
        config.listen = self.listen;
        config.gateway_api = self.gateway.clone();
        config.fail_share = self.fail_share;
        config.retry_after_s = self.retry_after_s;
        config.answer_delay = self.answer_delay;
        config.resolve_delay = self.resolve_delay;
        config.seed = self.seed;
        config
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let result = match cli.command {
        Command::Arc(args) => run_arc(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            let usage = err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidInput);
            ExitCode::from(if usage { EX_USAGE } else { 1 })
        }
    }
}

/// Runs the ARC until Ctrl-C or SIGTERM, then prints the counters as one line on stdout.
async fn run_arc(args: ArcArgs) -> anyhow::Result<()> {
    let sim = ArcSim::start(args.config())
        .await
        .with_context(|| format!("starting the ARC simulator on {}", args.listen))?;
    let down_period = async {
        if let (Some(after), Some(down_for)) = (args.down_after, args.down_for) {
            let period = sim.down_period(Duration::from_secs(after), Duration::from_secs(down_for));
            if let Err(err) = period.await {
                error!(error = %err, "the scheduled down period failed");
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = shutdown_signal() => {}
        () = down_period => {}
    }
    let handle = sim.clone();
    sim.shutdown().await;
    println!("arc: {}", handle.stats());
    Ok(())
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(err) => error!(error = %err, "cannot listen for SIGTERM; stopping on Ctrl-C only"),
        }
    }
    if let Err(err) = tokio::signal::ctrl_c().await {
        error!(error = %err, "cannot listen for Ctrl-C");
        std::future::pending::<()>().await;
    }
}
