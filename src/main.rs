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
    /// List alarms that need a person: dead letters (every provider rejected
    /// them) or stuck (still being retried past every failover deadline).
    Alarms {
        /// The configuration file (its store is read).
        #[arg(short, long)]
        config: PathBuf,
        /// Which alarms.
        #[arg(long, value_enum)]
        state: AttentionArg,
        /// At most this many, oldest first.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Queue an alarm for delivery again, along its chain from the start or
    /// to one provider.
    Redeliver {
        /// The configuration file (its store is updated).
        #[arg(short, long)]
        config: PathBuf,
        /// The alarm id.
        alarm_id: String,
        /// Deliver to this provider only.
        #[arg(long)]
        provider: Option<String>,
    },
    /// Run everything on embedded defaults: broker, store, device fleet and
    /// two simulated ARCs, then print the SLA table and a summary line.
    Demo {
        /// Seconds the fleet sends alarms.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Alarms per second across the fleet.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Simulated devices.
        #[arg(long, default_value_t = 200)]
        devices: usize,
        /// Seed for the fleet and the ARCs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AttentionArg {
    DeadLetter,
    Stuck,
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
        Command::Demo {
            duration,
            rate,
            devices,
            seed,
        } => {
            init_tracing("error");
            let options = telegate::demo::DemoOptions {
                duration: Duration::from_secs(duration),
                rate,
                devices,
                seed,
            };
            match demo(options) {
                Ok(report) => {
                    for (id, stats) in &report.arcs {
                        eprintln!("{id}: {stats}");
                    }
                    println!("{}", telegate::sla::render_table(&report.slas));
                    println!("{}", report.summary_line());
                    if report.lost > 0 {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("telegate demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Alarms {
            config,
            state,
            limit,
            json,
        } => {
            let Some(config) = load(&config) else {
                return ExitCode::from(EX_CONFIG);
            };
            let which = match state {
                AttentionArg::DeadLetter => telegate::store::Attention::DeadLetter,
                AttentionArg::Stuck => telegate::store::Attention::Stuck,
            };
            operator(async move { telegate::operator::list(&config, which, limit, json).await })
        }
        Command::Redeliver {
            config,
            alarm_id,
            provider,
        } => {
            let Some(config) = load(&config) else {
                return ExitCode::from(EX_CONFIG);
            };
            operator(async move {
                telegate::operator::redeliver(&config, &alarm_id, provider.as_deref()).await
            })
        }
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
            init_tracing("info");
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

/// Loads a configuration, printing every problem; `None` when invalid.
fn load(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(config) => Some(config),
        Err(err) => {
            for line in err.lines() {
                eprintln!("{line}");
            }
            None
        }
    }
}

/// Runs an operator command: its output on stdout, or the error on stderr
/// with exit 64 for a usage mistake and 1 otherwise.
fn operator(
    command: impl std::future::Future<Output = Result<String, telegate::operator::OperatorError>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("telegate: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("telegate: {e}");
            match e {
                telegate::operator::OperatorError::Usage(_) => ExitCode::from(EX_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Logs to stderr at `default` level unless `RUST_LOG` says otherwise, in
/// colour only on a terminal. The embedded broker logs every client
/// disconnect as an error, which is not one an operator can act on, so it is
/// silent unless `RUST_LOG` names it (`RUST_LOG=info,rumqttd=warn`).
fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let quiet_broker = |directives: &str| {
        if directives.contains("rumqttd") {
            directives.to_owned()
        } else {
            format!("{directives},rumqttd=off")
        }
    };
    let asked = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|asked| match EnvFilter::try_new(quiet_broker(&asked)) {
            Ok(filter) => Some(filter),
            Err(e) => {
                eprintln!(
                    "telegate: RUST_LOG={asked:?} is not a log filter ({e}); logging at {default}"
                );
                None
            }
        });
    let filter = asked.unwrap_or_else(|| EnvFilter::new(quiet_broker(default)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Runs the demo with a live progress line on stderr: rewritten in place on
/// a terminal, a line every 5 s otherwise.
#[tokio::main]
async fn demo(
    options: telegate::demo::DemoOptions,
) -> Result<telegate::demo::DemoReport, telegate::demo::DemoError> {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stderr().is_terminal();
    let mut last_printed = std::time::Instant::now();
    let report = telegate::demo::run(options, |p| {
        let line = p.line();
        if terminal {
            eprint!("\r{line:<100}");
            let _ = std::io::stderr().flush();
        } else if last_printed.elapsed() >= Duration::from_secs(5) {
            eprintln!("{line}");
            last_printed = std::time::Instant::now();
        }
    })
    .await;
    if terminal {
        eprintln!();
    }
    report
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
