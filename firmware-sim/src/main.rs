//! The `firmware-sim` command line: parses arguments, sets up logging and runs a simulator from the library.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
#[cfg(unix)]
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use firmware_sim::arc::{ArcConfig, ArcSim, Delay};
use firmware_sim::fleet::{Fleet, FleetConfig};
#[cfg(unix)]
use firmware_sim::serial::{LineFormat, SerialSim, SerialSimConfig};
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
    /// Run a fleet of simulated devices that send alarms and heartbeats over MQTT.
    Fleet(FleetArgs),
    /// Run an alarm receiver or a line of dispersed units on a pseudo-terminal (a simulated serial port).
    #[cfg(unix)]
    Serial(SerialArgs),
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

#[derive(Args)]
struct FleetArgs {
    /// The MQTT broker: mqtt://HOST:PORT (tcp:// and a bare HOST:PORT work too; the port defaults to 1883).
    #[arg(long, value_parser = parse_broker)]
    broker: Broker,
    /// Simulated devices (unit-0001, unit-0002, ...).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Tenants, comma-separated; devices are spread over them round-robin.
    #[arg(long, value_delimiter = ',', default_value = "derbyshire,notts")]
    tenants: Vec<String>,
    /// New alarms per second across the fleet.
    #[arg(long, default_value_t = 10.0, value_parser = parse_non_negative)]
    rate: f64,
    /// Seconds to send for (Ctrl-C stops earlier).
    #[arg(long, default_value_t = 60.0, value_parser = parse_non_negative)]
    duration: f64,
    /// Seconds between one device's heartbeats; 0 sends none.
    #[arg(long, default_value_t = 60.0, value_parser = parse_non_negative)]
    heartbeat_s: f64,
    /// Seconds before the first re-send of an unacknowledged alarm (doubling, up to 30).
    #[arg(long, default_value_t = 2.0, value_parser = parse_non_negative)]
    resend_s: f64,
    /// Share (0-1) of acknowledged alarms published once more.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    duplicates: f64,
    /// Share (0-1) of alarms replaced by a malformed payload.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    malformed: f64,
    /// Chance (0-1) per alarm that its device reboots first (its seq restarts at 1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    reboots: f64,
    /// MQTT connections the devices share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Client id prefix: the connections are PREFIX-1, PREFIX-2, ...
    #[arg(long, default_value = "fleet")]
    client_prefix: String,
    /// Seed of the random number generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[cfg(unix)]
#[derive(Args)]
struct SerialArgs {
    /// Line format: surgard, contact-id or telecare-line.
    #[arg(long, default_value = "surgard")]
    format: LineFormat,
    /// Path of the symlink to the pseudo-terminal (the gateway's [[serial]] path); replaced if it exists.
    #[arg(long)]
    link: PathBuf,
    /// New lines per second; 0 sends them as fast as the window and the baud rate allow.
    #[arg(long, default_value_t = 5.0, value_parser = parse_non_negative)]
    rate: f64,
    /// Lines to send in all; the run ends once all are acknowledged (default: no limit).
    #[arg(long)]
    count: Option<u64>,
    /// Seconds to send for (default: until --count lines are acknowledged, or Ctrl-C).
    #[arg(long, value_parser = parse_non_negative)]
    duration_s: Option<f64>,
    /// Baud rate: at most baud/10 bytes a second are written.
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// Lines awaiting an answer at once [default: 1, or 16 for telecare-line].
    #[arg(long)]
    window: Option<usize>,
    /// Milliseconds without an answer before a line is sent again.
    #[arg(long, default_value_t = 4000)]
    ack_timeout_ms: u64,
    /// Share (0-1) of lines written right after a burst of garbage bytes.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    garbage_share: f64,
    /// Distinct accounts (surgard, contact-id) or units (telecare-line).
    #[arg(long, default_value_t = 50)]
    accounts: u32,
    /// Sur-Gard receiver number (RR).
    #[arg(long, default_value_t = 1)]
    receiver: u8,
    /// Sur-Gard line number (L).
    #[arg(long, default_value_t = 1)]
    line: u8,
    /// Seconds between heartbeats (each unit's, for telecare-line); 0 sends none [default: 30 for surgard,
    /// none otherwise].
    #[arg(long, value_parser = parse_non_negative)]
    heartbeat_s: Option<f64>,
    /// Seconds between unplugs of the port (with --unplug-for-s).
    #[arg(long, requires = "unplug_for_s", value_parser = parse_positive)]
    unplug_every_s: Option<f64>,
    /// Seconds the port stays unplugged (with --unplug-every-s).
    #[arg(long, requires = "unplug_every_s", value_parser = parse_non_negative)]
    unplug_for_s: Option<f64>,
    /// Seed of the line generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[cfg(unix)]
impl SerialArgs {
    fn config(&self) -> SerialSimConfig {
        let heartbeat_s = self.heartbeat_s.unwrap_or(match self.format {
            LineFormat::Surgard => 30.0,
            LineFormat::ContactId | LineFormat::TelecareLine => 0.0,
        });
        SerialSimConfig {
            format: self.format,
            link: self.link.clone(),
            rate: self.rate,
            count: self.count,
            baud: self.baud,
            window: self.window.unwrap_or(match self.format {
                LineFormat::TelecareLine => 16,
                LineFormat::Surgard | LineFormat::ContactId => 1,
            }),
            ack_timeout: Duration::from_millis(self.ack_timeout_ms),
            garbage_share: self.garbage_share,
            accounts: self.accounts,
            receiver: self.receiver,
            line: self.line,
            heartbeat: (heartbeat_s > 0.0).then(|| seconds(heartbeat_s)),
            seed: self.seed,
        }
    }
}

/// A broker address from `--broker`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Broker {
    host: String,
    port: u16,
}

fn parse_broker(text: &str) -> Result<Broker, String> {
    let bad = || format!("{text:?} is not mqtt://HOST:PORT");
    let rest = ["mqtt://", "tcp://"]
        .iter()
        .find_map(|scheme| text.strip_prefix(scheme))
        .unwrap_or(text);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '@', '?', '#']) || rest.contains("://") {
        return Err(bad());
    }
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            Some(_) => return Err(bad()),
            None => (rest, None),
        }
    };
    let port = match port {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(bad)?,
        None => 1883,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Broker {
        host: host.to_owned(),
        port,
    })
}

fn parse_non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a number >= 0")),
    }
}

#[cfg(unix)]
fn parse_positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a number > 0")),
    }
}

impl FleetArgs {
    fn config(&self) -> FleetConfig {
        let mut config = FleetConfig::new(self.broker.host.clone(), self.broker.port);
        config.client_prefix = self.client_prefix.clone();
        config.connections = self.connections;
        config.tenants = self.tenants.clone();
        config.devices = self.devices;
        config.rate = self.rate;
        config.heartbeat_interval = seconds(self.heartbeat_s);
        config.resend_after = seconds(self.resend_s);
        config.duplicate_share = self.duplicates;
        config.malformed_share = self.malformed;
        config.reboot_share = self.reboots;
        config.seed = self.seed;
        config
    }
}

/// Seconds from the command line (already checked to be finite and >= 0), saturating at a very long time.
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX)
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
        // Nothing reads the deliveries back: the counters are all it prints.
        config.keep_records = false;
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
        Command::Fleet(args) => run_fleet(args).await,
        #[cfg(unix)]
        Command::Serial(args) => run_serial(args).await,
    };
    match result {
        Ok(code) => code,
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
async fn run_arc(args: ArcArgs) -> anyhow::Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}

/// How often the fleet prints its progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The longest wait for outstanding alarms after the fleet stops sending.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the fleet for the duration (or until Ctrl-C or SIGTERM), drains, and prints the counters as one line
/// on stdout. Exits 1 when alarms are still unanswered after the drain.
async fn run_fleet(args: FleetArgs) -> anyhow::Result<ExitCode> {
    let config = args.config();
    let fleet = Fleet::start(config).await.with_context(|| {
        format!(
            "starting the fleet against {}:{}",
            args.broker.host, args.broker.port
        )
    })?;
    let started = tokio::time::Instant::now();
    let run_for = tokio::time::sleep(seconds(args.duration));
    let stop = shutdown_signal();
    tokio::pin!(run_for, stop);
    let mut progress = tokio::time::interval_at(started + PROGRESS_EVERY, PROGRESS_EVERY);
    let mut last_sent = 0;
    loop {
        tokio::select! {
            () = &mut run_for => break,
            () = &mut stop => break,
            _ = progress.tick() => {
                let stats = fleet.stats();
                let rate = (stats.sent - last_sent) as f64 / PROGRESS_EVERY.as_secs_f64();
                last_sent = stats.sent;
                eprintln!(
                    "fleet: {:>4}s sent={} acked={} outstanding={} resends={} rejected={} heartbeats={} rate={rate:.1}/s",
                    started.elapsed().as_secs(),
                    stats.sent,
                    stats.acked,
                    stats.outstanding,
                    stats.resends,
                    stats.rejected,
                    stats.heartbeats,
                );
            }
        }
    }
    fleet.stop_sending();
    let outstanding = fleet.stats().outstanding;
    if outstanding > 0 {
        eprintln!(
            "fleet: stopped sending; waiting up to {} s for {outstanding} unanswered alarms",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    fleet.drain(DRAIN_TIMEOUT).await;
    let stats = fleet.stats();
    fleet.shutdown().await;
    println!("fleet: {stats}");
    Ok(if stats.outstanding > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How often the serial simulator prints its progress line.
#[cfg(unix)]
const SERIAL_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The longest wait for unacknowledged lines after Ctrl-C or SIGTERM.
#[cfg(unix)]
const SIGNAL_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the serial simulator until `--count` lines are acknowledged, `--duration-s` is over, or Ctrl-C or
/// SIGTERM; drains, and prints the counters as one line on stdout. Exits 1 when lines are still
/// unacknowledged after the drain.
#[cfg(unix)]
async fn run_serial(args: SerialArgs) -> anyhow::Result<ExitCode> {
    let sim = SerialSim::start(args.config())
        .await
        .with_context(|| format!("starting the serial simulator at {}", args.link.display()))?;
    let device = sim
        .device()
        .map_or_else(|| "-".to_owned(), |d| d.display().to_string());
    eprintln!(
        "serial: {} on {} -> {device}",
        args.format,
        args.link.display()
    );
    let started = tokio::time::Instant::now();
    let (signalled, unplugged) = run_serial_until_done(&args, &sim, started).await;
    if unplugged {
        replug(&sim).await;
    }
    sim.stop_offering();
    let waiting = sim.stats().waiting;
    if waiting > 0 {
        let timeout = if signalled {
            SIGNAL_DRAIN_TIMEOUT
        } else {
            DRAIN_TIMEOUT
        };
        eprintln!(
            "serial: stopped offering; waiting up to {} s for {waiting} unacknowledged lines",
            timeout.as_secs()
        );
        // Another Ctrl-C or SIGTERM cuts the drain short.
        tokio::select! {
            _ = sim.drain(timeout) => {}
            () = shutdown_signal() => {}
        }
    }
    let stats = sim.stop().await;
    println!("serial: {stats}");
    Ok(if stats.waiting > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs until the count is acknowledged, the duration is over, or a signal; unplugs and replugs the port
/// on schedule meanwhile. Returns whether a signal ended it and whether the port is unplugged.
#[cfg(unix)]
async fn run_serial_until_done(
    args: &SerialArgs,
    sim: &SerialSim,
    started: tokio::time::Instant,
) -> (bool, bool) {
    let run_for = async {
        match args.duration_s {
            Some(duration) => tokio::time::sleep(seconds(duration)).await,
            None => std::future::pending().await,
        }
    };
    let all_acked = async {
        match args.count {
            Some(_) => {
                sim.wait_acked(Duration::MAX).await;
            }
            None => std::future::pending().await,
        }
    };
    let stop = shutdown_signal();
    tokio::pin!(run_for, all_acked, stop);
    let mut progress =
        tokio::time::interval_at(started + SERIAL_PROGRESS_EVERY, SERIAL_PROGRESS_EVERY);
    // Periodic unplugging: (every, for how long), and when the port next changes state.
    let unplugs = args
        .unplug_every_s
        .zip(args.unplug_for_s)
        .map(|(every, down)| (seconds(every), seconds(down)));
    let mut unplugged = false;
    let mut next_toggle = unplugs.map(|(every, _)| started + every);
    let mut last_sent = 0;
    let mut signalled = false;
    loop {
        let toggle = async {
            match next_toggle {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut run_for => break,
            () = &mut all_acked => break,
            () = &mut stop => {
                signalled = true;
                break;
            }
            () = toggle => {
                let Some((every, down)) = unplugs else { continue };
                if unplugged {
                    replug(sim).await;
                    unplugged = false;
                    next_toggle = Some(tokio::time::Instant::now() + every);
                } else {
                    sim.unplug();
                    eprintln!("serial: unplugged for {:.1} s", down.as_secs_f64());
                    unplugged = true;
                    next_toggle = Some(tokio::time::Instant::now() + down);
                }
            }
            _ = progress.tick() => {
                let stats = sim.stats();
                let rate = (stats.sent - last_sent) as f64 / SERIAL_PROGRESS_EVERY.as_secs_f64();
                last_sent = stats.sent;
                eprintln!(
                    "serial: {:>4}s sent={} acked={} waiting={} naks={} resends={} garbage={} heartbeats={} \
                     unplugs={} rate={rate:.1}/s",
                    started.elapsed().as_secs(),
                    stats.sent,
                    stats.acked,
                    stats.waiting,
                    stats.naks,
                    stats.resends,
                    stats.garbage_bursts,
                    stats.heartbeats,
                    stats.unplugs,
                );
            }
        }
    }
    (signalled, unplugged)
}

/// Plugs the simulated port in again, logging a failure (the lines then wait).
#[cfg(unix)]
async fn replug(sim: &SerialSim) {
    match sim.replug().await {
        Ok(()) => {
            let device = sim
                .device()
                .map_or_else(|| "-".to_owned(), |d| d.display().to_string());
            eprintln!("serial: plugged in again -> {device}");
        }
        Err(err) => error!(error = %err, "cannot plug the port in again"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_are_parsed() {
        let broker = |host: &str, port| Broker {
            host: host.to_owned(),
            port,
        };
        assert_eq!(
            parse_broker("mqtt://127.0.0.1:1883"),
            Ok(broker("127.0.0.1", 1883))
        );
        assert_eq!(
            parse_broker("tcp://broker.local"),
            Ok(broker("broker.local", 1883))
        );
        assert_eq!(
            parse_broker("localhost:2883"),
            Ok(broker("localhost", 2883))
        );
        assert_eq!(parse_broker("mqtt://[::1]:1884/"), Ok(broker("::1", 1884)));
        for bad in [
            "",
            "mqtt://",
            "mqtt://host:port",
            "mqtt://host:0",
            "mqtt://host:70000",
            "http://host:1883",
            "mqtt://user@host:1883",
            "mqtt://host:1883/path",
            "::1:1883",
        ] {
            assert!(parse_broker(bad).is_err(), "{bad:?}");
        }
    }
}
