//! `telegate demo`: the whole service on one machine, in one process.
//!
//! An embedded MQTT broker on a free loopback port, a temporary SQLite
//! store, the gateway, a simulated device fleet across three tenants, and
//! two simulated ARCs under two contracts (each the other's fallback; the
//! third tenant has no contract and goes to the default provider). From 40 %
//! to 70 % of the run the first ARC is down, so that failover shows.
//!
//! At the end the fleet stops sending and everything drains (at most 30 s):
//! unacknowledged alarms are re-sent, the outbox empties, operators answer.
//! The report counts, from the fleet's and the providers' own records:
//! `sent` distinct alarms the fleet sent, `stored` alarm rows, `delivered`
//! alarms accepted by at least one provider, `duplicates` re-sends answered
//! `duplicate`, and `lost` alarms acknowledged to a device and never
//! accepted by a provider.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{Days, Utc};
use firmware_sim::arc::{ArcConfig, ArcSim, Delay, Mode, ProgressState};
use firmware_sim::fleet::{Fleet, FleetConfig};

use crate::config::Config;
use crate::sla::{self, ContractSla};

/// How long the demo waits at most for everything to settle at the end.
pub const DRAIN: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the fleet sends.
    pub duration: Duration,
    /// Alarms per second across the fleet.
    pub rate: f64,
    pub devices: usize,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration: Duration::from_secs(20),
            rate: 50.0,
            devices: 200,
            seed: 1,
        }
    }
}

/// A snapshot for the live progress line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub elapsed: Duration,
    /// True once the fleet has stopped and the demo is draining.
    pub draining: bool,
    pub sent: u64,
    pub stored: u64,
    pub delivered: u64,
    /// Stored alarms not yet accepted by a provider.
    pub in_flight: u64,
    /// Alarms sent per second over the last interval.
    pub per_second: f64,
}

impl Progress {
    pub fn line(&self) -> String {
        format!(
            "demo {:>5.1}s{} sent={} stored={} delivered={} in_flight={} {:.0}/s",
            self.elapsed.as_secs_f64(),
            if self.draining { " draining" } else { "" },
            self.sent,
            self.stored,
            self.delivered,
            self.in_flight,
            self.per_second
        )
    }
}

/// What the demo found.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub slas: Vec<ContractSla>,
    pub sent: u64,
    pub stored: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// Each simulated ARC's own counts, by provider id.
    pub arcs: Vec<(String, firmware_sim::arc::ArcStats)>,
}

impl DemoReport {
    /// The last line of the demo's output.
    pub fn summary_line(&self) -> String {
        format!(
            "demo: sent={} stored={} delivered={} duplicates={} lost={}",
            self.sent, self.stored, self.delivered, self.duplicates, self.lost
        )
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot set up: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo configuration is invalid: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("gateway: {0}")]
    App(#[from] crate::app::AppError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the gateway did not subscribe within 10 s")]
    NotReady,
}

const TENANTS: [&str; 3] = ["derbyshire", "notts", "rutland"];

/// Runs the demo, calling `progress` about once a second.
///
/// # Errors
/// When a part cannot start (no free port, no temporary folder).
pub async fn run(
    options: DemoOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<DemoReport, DemoError> {
    let dir = tempfile::tempdir()?;
    let broker_port = crate::broker::free_port()?;
    let api_port = crate::broker::free_port()?;
    let api = format!("http://127.0.0.1:{api_port}");

    // Operators answer in about 2–2.5 s; a few take much longer.
    let north = start_arc(
        "north",
        &api,
        Delay::LogNormal {
            median: Duration::from_secs(2),
            sigma: 0.5,
        },
        options.seed,
    )
    .await?;
    let south = start_arc(
        "south",
        &api,
        Delay::LogNormal {
            median: Duration::from_millis(2500),
            sigma: 0.5,
        },
        options.seed + 1,
    )
    .await?;

    let config = Config::from_toml_str(
        &config_toml(
            &dir.path().join("telegate.db"),
            broker_port,
            api_port,
            &north,
            &south,
        ),
        "demo.toml",
        &|_| None,
    )?;
    let contracts = config.contracts.clone();
    let gateway = crate::app::start(config, crate::clock::system()).await?;
    if !gateway.wait_ready(Duration::from_secs(10)).await {
        return Err(DemoError::NotReady);
    }

    let mut fleet_config = FleetConfig::new("127.0.0.1", broker_port);
    fleet_config.client_prefix = "demo-fleet".into();
    fleet_config.tenants = TENANTS.iter().map(|t| t.to_string()).collect();
    fleet_config.devices = options.devices.max(1);
    fleet_config.rate = options.rate;
    fleet_config.heartbeat_interval = Duration::from_secs(15);
    fleet_config.duplicate_share = 0.02;
    fleet_config.malformed_share = 0.002;
    fleet_config.reboot_share = 0.002;
    fleet_config.seed = options.seed;
    let fleet = Fleet::start(fleet_config).await?;

    // The first ARC is down from 40 % to 70 % of the run: long enough for
    // critical and urgent alarms to fail over (after 2 s and 4 s).
    let outage = {
        let north = north.clone();
        let d = options.duration;
        tokio::spawn(async move {
            tokio::time::sleep(d.mul_f64(0.4)).await;
            let _ = north.set_mode(Mode::Down).await;
            tokio::time::sleep(d.mul_f64(0.3)).await;
            let _ = north.set_mode(Mode::Accept).await;
        })
    };

    let started = Instant::now();
    let mut last_sent = 0;
    let mut last_tick = started;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let snapshot = |draining: bool, last_sent: &mut u64, last_tick: &mut Instant| {
        let store = gateway.store.clone();
        let sent = fleet.stats().sent;
        let delivered = (north.accepted_ids().len() + south.accepted_ids().len()) as u64;
        let now = Instant::now();
        let per_second = (sent.saturating_sub(*last_sent)) as f64
            / now.duration_since(*last_tick).as_secs_f64().max(0.001);
        *last_sent = sent;
        *last_tick = now;
        async move {
            let stored = store.count_alarms().await.unwrap_or(0);
            let in_flight = store.count_outbox_pending().await.unwrap_or(0);
            Progress {
                elapsed: started.elapsed(),
                draining,
                sent,
                stored,
                delivered,
                in_flight,
                per_second,
            }
        }
    };
    while started.elapsed() < options.duration {
        tick.tick().await;
        progress(&snapshot(false, &mut last_sent, &mut last_tick).await);
    }
    let _ = outage.await;
    north.set_mode(Mode::Accept).await?;

    // Drain: re-sends answered, outbox empty, operators' answers in.
    fleet.stop_sending();
    let deadline = Instant::now() + DRAIN;
    loop {
        let acked = acknowledged_ids(&fleet);
        let accepted = accepted_ids(&north, &south);
        let settled = fleet.stats().outstanding == 0
            && acked.is_subset(&accepted)
            && gateway
                .store
                .count_outbox_pending()
                .await
                .unwrap_or(u64::MAX)
                == 0
            && answered(&north) + answered(&south) >= accepted.len();
        if settled || Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            _ = tick.tick() => progress(&snapshot(true, &mut last_sent, &mut last_tick).await),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }

    let acked = acknowledged_ids(&fleet);
    let accepted = accepted_ids(&north, &south);
    let stats = fleet.stats();
    let rows = gateway
        .store
        .sla_rows(
            chrono::DateTime::<Utc>::UNIX_EPOCH,
            Utc::now() + chrono::Duration::days(1),
        )
        .await?;
    let report = DemoReport {
        slas: sla::compute(&rows, &contracts),
        sent: stats.sent,
        stored: gateway.store.count_alarms().await?,
        delivered: accepted.len() as u64,
        duplicates: stats.duplicates,
        lost: acked.difference(&accepted).count() as u64,
        arcs: vec![
            ("arc-north".into(), north.stats()),
            ("arc-south".into(), south.stats()),
        ],
    };
    fleet.shutdown().await;
    gateway.shutdown(Duration::from_secs(10)).await;
    north.shutdown().await;
    south.shutdown().await;
    Ok(report)
}

async fn start_arc(name: &str, api: &str, answer: Delay, seed: u64) -> std::io::Result<ArcSim> {
    let mut config = ArcConfig::new(format!("{name}-demo-secret"), format!("{name}-demo-token"));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.gateway_api = Some(api.to_owned());
    config.fail_share = 0.02;
    config.retry_after_s = None;
    config.answer_delay = answer;
    config.resolve_delay = Delay::Uniform {
        min: Duration::from_secs(2),
        max: Duration::from_secs(8),
    };
    config.seed = seed;
    ArcSim::start(config).await
}

fn acknowledged_ids(fleet: &Fleet) -> HashSet<String> {
    fleet
        .alarms()
        .into_iter()
        .filter(|a| matches!(a.status.as_deref(), Some("accepted" | "duplicate")))
        .filter_map(|a| a.alarm_id)
        .collect()
}

fn accepted_ids(north: &ArcSim, south: &ArcSim) -> HashSet<String> {
    let mut ids = north.accepted_ids();
    ids.extend(south.accepted_ids());
    ids
}

fn answered(arc: &ArcSim) -> usize {
    arc.progress_reports()
        .iter()
        .filter(|r| r.state == ProgressState::Answered)
        .count()
}

/// The demo's configuration: two providers, two contracts in force today,
/// the third tenant uncontracted.
fn config_toml(
    db: &std::path::Path,
    broker_port: u16,
    api_port: u16,
    north: &ArcSim,
    south: &ArcSim,
) -> String {
    let today = Utc::now()
        .with_timezone(&chrono_tz::Europe::London)
        .date_naive();
    let starts = today.checked_sub_days(Days::new(30)).unwrap_or(today);
    let ends = today.checked_add_days(Days::new(335)).unwrap_or(today);
    let contract = |id: &str, tenant: &str, primary: &str, fallback: &str| {
        format!(
            r#"
[[contract]]
id = "{id}"
provider = "{primary}"
fallback = ["{fallback}"]
tenants = ["{tenant}"]
starts = {starts}
ends = {ends}
answer_targets = [{{ within_s = 10, pct = 97.5 }}, {{ within_s = 30, pct = 99.0 }}]
failover_after_s = {{ critical = 2, urgent = 4, technical = 8, routine = 15 }}
"#
        )
    };
    format!(
        r#"
[store]
url = "sqlite://{db}"

[api]
listen = "127.0.0.1:{api_port}"

[deliver]
instance_id = "demo"
poll_ms = 50

[[mqtt]]
id = "devices"
url = "embedded://127.0.0.1:{broker_port}"
client_id = "telegate-demo"

[[provider]]
id = "arc-north"
url = "{north_url}"
secret = "north-demo-secret"
token = "north-demo-token"
timeout_s = 2

[[provider]]
id = "arc-south"
url = "{south_url}"
secret = "south-demo-secret"
token = "south-demo-token"
timeout_s = 2
{c1}{c2}
[routing]
default_provider = "arc-south"
"#,
        db = db.display(),
        north_url = north.url(),
        south_url = south.url(),
        c1 = contract("DCC-DEMO", "derbyshire", "arc-north", "arc-south"),
        c2 = contract("NCC-DEMO", "notts", "arc-south", "arc-north"),
    )
}
