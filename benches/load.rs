//! The end-to-end load bench: a broker, the gateway as a child process
//! (`telegate run` with a generated configuration) and ARC simulators, all on
//! this machine, driven by a simulated device fleet.
//!
//! ```sh
//! cargo bench --bench load -- --scenario steady|max|storm|serial [--store-url URL] [--broker-url URL] [--keep]
//!     [--gateway-config FILE]
//! ```
//!
//! Each scenario ends with one line on stdout:
//! `load: scenario=NAME store=sqlite|postgres broker=embedded|mosquitto offered=N/s achieved=N/s sent=N
//! delivered=N lost=N p50_ms=X p99_ms=Y crit_p99_ms=Z broker_ratio=R cpu_pct=C rss_mb=M`
//!
//! - latency: device publish → accepted by the ARC simulator; `crit_p99_ms` over critical alarms only;
//! - `lost`: alarms the gateway acknowledged to a device and the ARC never accepted, after a drain of at most
//!   30 s;
//! - `achieved`: alarms delivered per second, from the first publish to the last acceptance;
//! - `broker_ratio`: `achieved` over the raw QoS 1 publish → subscribe rate of the same broker, measured in the
//!   same run with payloads of the same size (the median of three measurements);
//! - `cpu_pct` (0–200 on 2 cores) and `rss_mb` (peak resident memory) are the gateway process's, the embedded
//!   broker included when it is the broker.
//!
//! Before it, on stderr, `load-cpu:` gives the CPU a delivered alarm cost the gateway, the bench (fleet and ARC
//! simulator) and an outside broker on this machine, and the rate the cores would carry at that cost,
//! `load-stages:` (one line per fleet) the p50 and p99 of each stage of an alarm's way from the stage times the
//! gateway stored, and `load: machine:` what a round trip between two threads costs on it at the start of the
//! run.
//!
//! `serial` runs 8 `telecare-line` ports at 115,200 baud at full line rate instead of MQTT and prints
//! `ports=8 baud=115200` in place of the broker fields.

#[path = "support/pg.rs"]
mod pg;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use firmware_sim::arc::{ArcConfig, ArcSim};
use firmware_sim::fleet::{Fleet, FleetConfig, Mix};
use firmware_sim::serial::{LineFormat, SerialSim, SerialSimConfig};
use pg::PgDatabase;
use rumqttc::{Event, MqttOptions, Packet, QoS};

/// Raw broker measurements a run takes; `broker_ratio` uses their median.
const RAW_RUNS: usize = 3;

/// How long the bench waits for stragglers after the offered load stops.
const DRAIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// A fixed rate (--rate, default 1,000/s) with 1 % critical alarms for --duration-s (default 30).
    Steady,
    /// Steps of --step alarms/s (default 2,000) until one loses an alarm or its p99 passes 1 s.
    Max,
    /// 20,000 technical alarms in 2 s and 100 critical ones spread through them.
    Storm,
    /// 8 telecare-line serial ports at 115,200 baud, at full line rate.
    Serial,
}

#[derive(Parser, Debug)]
#[command(about = "End-to-end load bench of the whole gateway")]
struct Args {
    /// The load to offer.
    #[arg(long, value_enum, default_value = "steady")]
    scenario: Scenario,
    /// A PostgreSQL server (postgres://user@host/db); the gateway stores in a fresh database on it.
    #[arg(long)]
    store_url: Option<String>,
    /// An MQTT broker such as Mosquitto (mqtt://host:port) instead of the gateway's embedded one.
    #[arg(long)]
    broker_url: Option<String>,
    /// steady: the offered rate in alarms/s (default 1000).
    #[arg(long)]
    rate: Option<f64>,
    /// steady: seconds of load (default 30); max: seconds per step (default 15).
    #[arg(long)]
    duration_s: Option<u64>,
    /// max: the first step's rate and the step (default 2000).
    #[arg(long, default_value_t = 2000.0)]
    step: f64,
    /// Seeds the simulators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keeps the gateway's folder (configuration, log, SQLite database) and prints where it is, for a
    /// look at the stage times of every alarm afterwards.
    #[arg(long)]
    keep: bool,
    /// A TOML file added to the gateway's generated configuration: sections the bench does not
    /// write, such as `[ingest]` or `[deliver]`, to measure other settings than the defaults.
    #[arg(long, value_name = "FILE")]
    gateway_config: Option<PathBuf>,
    /// The text of --gateway-config, read and checked before anything starts.
    #[arg(skip)]
    gateway_toml: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Where the broker is.
#[derive(Clone, Debug)]
struct Broker {
    embedded: bool,
    host: String,
    port: u16,
}

impl Broker {
    fn name(&self) -> &'static str {
        if self.embedded {
            "embedded"
        } else {
            "mosquitto"
        }
    }
}

/// The gateway as a child process.
struct Gateway {
    child: std::process::Child,
    api: String,
    dir: tempfile::TempDir,
    database: Option<PgDatabase>,
}

impl Gateway {
    async fn start(
        args: &Args,
        sources: &str,
        arc: &ArcSim,
    ) -> Result<Gateway, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (store_url, database) = match &args.store_url {
            Some(server) => {
                let db = PgDatabase::create(server).await.map_err(|e| {
                    format!(
                        "cannot make a database on --store-url {}: {e}",
                        telegate::config::redact_password(server)
                    )
                })?;
                (db.url.clone(), Some(db))
            }
            None => (
                format!("sqlite://{}", dir.path().join("load.db").display()),
                None,
            ),
        };
        let api_port = telegate::broker::free_port()?;
        // The added sections go first: a stray top-level key in them is then
        // reported as such instead of landing in the bench's last table.
        let toml = format!(
            "{}\n[store]\nurl = \"{store_url}\"\n\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n\n{sources}\n\
             [[provider]]\nid = \"arc\"\nurl = \"{}\"\nsecret = \"load-secret\"\ntoken = \"load-token\"\n\n\
             [routing]\ndefault_provider = \"arc\"\n",
            args.gateway_toml,
            arc.url(),
        );
        if let Some(extra) = &args.gateway_config {
            let label = format!("the bench's configuration with {}", extra.display());
            if let Err(e) = telegate::config::Config::from_toml_str(&toml, &label, &|name| {
                std::env::var(name).ok()
            }) {
                if let Some(db) = database {
                    db.drop_now().await;
                }
                return Err(format!("the gateway would not start:\n{e}").into());
            }
        }
        let config = dir.path().join("load.toml");
        std::fs::write(&config, toml)?;
        let log = std::fs::File::create(dir.path().join("gateway.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_telegate"))
            .args(["run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let mut gateway = Gateway {
            child,
            api: format!("http://127.0.0.1:{api_port}"),
            dir,
            database,
        };
        if let Err(e) = gateway.wait_ready().await {
            gateway.stop(false).await;
            return Err(e);
        }
        Ok(gateway)
    }

    async fn wait_ready(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.log()).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                return Err(format!(
                    "the gateway exited as it started ({status}); the end of its log:\n{}",
                    lines[lines.len().saturating_sub(10)..].join("\n")
                )
                .into());
            }
            if let Ok(r) = client.get(format!("{}/readyz", self.api)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the gateway did not become ready within 30 s".into())
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// CPU seconds used so far (user + system).
    fn cpu_s(&self) -> f64 {
        process_cpu_s(&self.child.id().to_string()).unwrap_or(0.0)
    }

    /// The stage times the gateway stored for each alarm of the fleet
    /// `label` that a provider accepted. Read once the load has drained, so
    /// that the reading does not compete with it.
    async fn stage_rows(&self, label: &str) -> Result<Vec<StageRow>, sqlx::Error> {
        // The label is the bench's own (letters, digits and '-'); the
        // fleet's tenants are `{label}-t1` to `{label}-t4`.
        let sql = format!(
            "SELECT a.raised_at, a.received_at, a.stored_at, \
             (SELECT MIN(s.at) FROM alarm_stages s WHERE s.alarm_id = a.id AND s.stage = 'attempt'), \
             o.accepted_at \
             FROM alarms a JOIN outbox o ON o.alarm_id = a.id \
             WHERE o.accepted_at IS NOT NULL AND a.tenant LIKE '{label}-t%'"
        );
        match &self.database {
            Some(db) => {
                let pool = sqlx::PgPool::connect(&db.url).await?;
                let rows = sqlx::query_as(&sql).fetch_all(&pool).await;
                pool.close().await;
                rows
            }
            None => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(self.dir.path().join("load.db"))
                    .read_only(true);
                let pool = sqlx::SqlitePool::connect_with(options).await?;
                let rows = sqlx::query_as(&sql).fetch_all(&pool).await;
                pool.close().await;
                rows
            }
        }
    }

    /// Peak resident memory in MB.
    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    async fn stop(mut self, keep: bool) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let database = self.database.take();
        let mut child = self.child;
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        if let Some(db) = database {
            db.drop_now().await;
        }
        if keep {
            println!("load: kept {}", self.dir.keep().display());
        }
    }
}

/// One accepted alarm's stage times in ms: raised (the device's `ts`, when
/// it first published), received, stored, first delivery attempt, accepted.
type StageRow = (Option<i64>, i64, i64, Option<i64>, Option<i64>);

/// `load-stages:` the p50 and p99 of each stage an alarm passes, in ms
/// (the stored times have a resolution of 1 ms): through the broker into
/// the gateway, into the store (the ingest queue and its group commit), to
/// a delivery slot, and the provider's exchange until accepted.
fn stage_line(label: &str, rows: &[StageRow]) -> String {
    let mut gaps: [Vec<f64>; 4] = Default::default();
    for &(raised, received, stored, attempt, accepted) in rows {
        let (Some(raised), Some(attempt), Some(accepted)) = (raised, attempt, accepted) else {
            continue;
        };
        let times = [raised, received, stored, attempt, accepted];
        for (gap, pair) in gaps.iter_mut().zip(times.windows(2)) {
            gap.push((pair[1] - pair[0]) as f64);
        }
    }
    let names = [
        "publish->received",
        "received->stored",
        "stored->first attempt",
        "first attempt->accepted",
    ];
    let mut parts = Vec::new();
    for (name, gap) in names.iter().zip(gaps.iter_mut()) {
        gap.sort_by(f64::total_cmp);
        parts.push(format!(
            "{name} {:.0}/{:.0}",
            percentile(gap, 50.0),
            percentile(gap, 99.0)
        ));
    }
    format!(
        "load-stages: {label} ({} alarms) p50/p99 ms: {}",
        gaps[0].len(),
        parts.join(", ")
    )
}

/// CPU seconds (user + system) that process `pid` (a number, or `self`)
/// has used so far; `None` when it cannot be read.
fn process_cpu_s(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the whole line.
    Some((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// The process listening on TCP `port` of this machine (the outside broker),
/// found through `/proc/net/tcp*` and the processes' open sockets; `None`
/// when it is not visible, e.g. another user's process without the rights.
fn listener_pid(port: u16) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is field 10.
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            pid.parse::<u32>().ok()?;
            let open = std::fs::read_dir(entry.path().join("fd")).ok()?;
            open.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
                .then_some(pid)
        })
}

/// CPU seconds of the three programs that share the machine in a run.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    gateway: f64,
    bench: Option<f64>,
    /// An outside broker's; `None` for the embedded one (in the gateway's).
    broker: Option<f64>,
}

impl CpuSample {
    fn take(gateway: &Gateway, broker_pid: Option<&str>) -> CpuSample {
        CpuSample {
            gateway: gateway.cpu_s(),
            bench: process_cpu_s("self"),
            broker: broker_pid.and_then(process_cpu_s),
        }
    }
}

/// Microseconds of CPU a delivered alarm cost each program, and the rate the
/// machine's cores would carry at that cost.
#[derive(Debug, Clone, Copy)]
struct CpuPerAlarm {
    gateway_us: f64,
    bench_us: f64,
    broker_us: Option<f64>,
}

impl CpuPerAlarm {
    fn between(before: CpuSample, after: CpuSample, delivered: u64) -> CpuPerAlarm {
        let per = |s: f64| s * 1e6 / delivered.max(1) as f64;
        CpuPerAlarm {
            gateway_us: per(after.gateway - before.gateway),
            bench_us: per(after.bench.unwrap_or(0.0) - before.bench.unwrap_or(0.0)),
            broker_us: before.broker.zip(after.broker).map(|(b, a)| per(a - b)),
        }
    }

    /// The line that puts a run against the machine's cores.
    fn line(&self, broker: &Broker) -> String {
        let total = self.gateway_us + self.bench_us + self.broker_us.unwrap_or(0.0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let broker_us = match (broker.embedded, self.broker_us) {
            (true, _) => "in-gateway".to_owned(),
            (false, Some(us)) => format!("{us:.1}"),
            (false, None) => "unknown".to_owned(),
        };
        format!(
            "load-cpu: per delivered alarm gateway_us={:.1} bench_us={:.1} broker_us={broker_us} \
             total_us={total:.1}; {cores} cores carry about {:.0}/s at that cost",
            self.gateway_us,
            self.bench_us,
            cores as f64 * 1e6 / total.max(1e-3),
        )
    }
}

/// Clock ticks per second, asked once.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// What one run measured.
#[derive(Debug, Default, Clone)]
struct Measured {
    offered: f64,
    achieved: f64,
    sent: u64,
    delivered: u64,
    lost: u64,
    p50_ms: f64,
    p99_ms: f64,
    crit_p99_ms: f64,
    cpu_pct: f64,
    rss_mb: f64,
}

/// One alarm as the load generator saw it.
struct Sent {
    first_sent: DateTime<Utc>,
    critical: bool,
    /// The id the gateway acknowledged it with.
    alarm_id: Option<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latencies, losses and throughput from what was sent and when the ARC
/// first accepted each acknowledged alarm (from [`wait_delivered`]).
fn measure(sent: &[Sent], accepted: &[Option<DateTime<Utc>>], offered: f64) -> Measured {
    let acked = sent.iter().filter(|s| s.alarm_id.is_some());
    let mut all = Vec::new();
    let mut critical = Vec::new();
    let mut lost = 0;
    let first = sent.iter().map(|s| s.first_sent).min();
    let mut last = first;
    for (s, accepted) in acked.zip(accepted) {
        match *accepted {
            Some(at) => {
                let ms = (at - s.first_sent).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                all.push(ms);
                if s.critical {
                    critical.push(ms);
                }
                last = last.max(Some(at));
            }
            None => lost += 1,
        }
    }
    all.sort_by(f64::total_cmp);
    critical.sort_by(f64::total_cmp);
    let span = match (first, last) {
        (Some(f), Some(l)) => (l - f).num_milliseconds().max(1) as f64 / 1000.0,
        _ => 1.0,
    };
    Measured {
        offered,
        achieved: all.len() as f64 / span,
        sent: sent.len() as u64,
        delivered: all.len() as u64,
        lost,
        p50_ms: percentile(&all, 50.0),
        p99_ms: percentile(&all, 99.0),
        crit_p99_ms: percentile(&critical, 99.0),
        ..Measured::default()
    }
}

/// The ARC simulator every delivery goes to. It keeps no records: the bench
/// needs only each alarm's first acceptance time (`ArcSim::accepted_at`), and
/// a record of every delivery, body and headers, grew the bench by gigabytes
/// in a `max` run.
async fn start_arc() -> std::io::Result<ArcSim> {
    let mut config = ArcConfig::new("load-secret", "load-token");
    config.keep_records = false;
    ArcSim::start(config).await
}

/// Every alarm a fleet raised.
fn fleet_sent(fleet: &Fleet) -> Vec<Sent> {
    fleet
        .alarms()
        .into_iter()
        .map(|a| Sent {
            first_sent: a.first_published,
            critical: a.critical,
            alarm_id: a.alarm_id,
        })
        .collect()
}

/// Waits until the ARC holds every alarm the gateway acknowledged, at most
/// until `deadline`, and returns when it first accepted each of them (in the
/// order of `sent`; `None` for one it never did).
async fn wait_delivered(
    arc: &ArcSim,
    sent: &[Sent],
    deadline: Instant,
) -> Vec<Option<DateTime<Utc>>> {
    loop {
        let accepted = arc.accepted_at(sent.iter().filter_map(|s| s.alarm_id.as_deref()));
        if accepted.iter().all(Option::is_some) || Instant::now() >= deadline {
            return accepted;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The raw QoS 1 publish → subscribe rate of a broker, with `payload` bytes
/// a message: one publisher, one subscriber, `n` messages.
async fn raw_broker_rate(broker: &Broker, payload: usize, n: usize) -> f64 {
    let topic = format!("loadbench/{}/raw", uuid::Uuid::new_v4().simple());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut sub_opts = MqttOptions::new(format!("lb-sub-{}", &id[..8]), &broker.host, broker.port);
    sub_opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (sub, mut sub_loop) = telegate::source::mqtt::client(sub_opts, 1000);
    if sub.subscribe(&topic, QoS::AtLeastOnce).await.is_err() {
        return 0.0;
    }
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let receiver = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        let mut got = 0usize;
        let mut started = None;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(10), sub_loop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                    started.get_or_insert_with(Instant::now);
                    got += 1;
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (got, started)
    });
    if tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .is_err()
    {
        return 0.0;
    }
    let mut pub_opts = MqttOptions::new(format!("lb-pub-{}", &id[..8]), &broker.host, broker.port);
    pub_opts.set_inflight(1000);
    pub_opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (publisher, mut pub_loop) = telegate::source::mqtt::client(pub_opts, 1000);
    let driver = tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    let body = vec![b'x'; payload];
    let start = Instant::now();
    for _ in 0..n {
        if publisher
            .publish(&topic, QoS::AtLeastOnce, false, body.clone())
            .await
            .is_err()
        {
            break;
        }
    }
    let (got, _) = receiver.await.unwrap_or((0, None));
    let elapsed = start.elapsed().as_secs_f64();
    driver.abort();
    let _ = sub.disconnect().await;
    got as f64 / elapsed.max(1e-3)
}

/// An outside broker from `--broker-url`, checked to answer before anything
/// starts.
async fn outside_broker(url: &str) -> Result<Broker, Box<dyn std::error::Error>> {
    let parsed =
        url::Url::parse(url).map_err(|e| format!("--broker-url {url:?} is not a URL: {e}"))?;
    if parsed.scheme() != "mqtt" {
        return Err(format!("--broker-url {url:?}: give mqtt://host[:port]").into());
    }
    let broker = Broker {
        embedded: false,
        host: parsed.host_str().unwrap_or("127.0.0.1").to_owned(),
        port: parsed.port().unwrap_or(1883),
    };
    let connect = tokio::net::TcpStream::connect((broker.host.as_str(), broker.port));
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(_)) => Ok(broker),
        Ok(Err(e)) => Err(format!("cannot reach the broker at {url}: {e}").into()),
        Err(_) => Err(format!("cannot reach the broker at {url}: no answer within 5 s").into()),
    }
}

/// The `[[mqtt]]` entry for the broker, with the gateway's client id.
fn mqtt_source(broker: &Broker, client_id: &str) -> String {
    let scheme = if broker.embedded { "embedded" } else { "mqtt" };
    format!(
        "[[mqtt]]\nid = \"devices\"\nurl = \"{scheme}://{}:{}\"\nclient_id = \"{client_id}\"\n",
        broker.host, broker.port,
    )
}

/// Ends the gateway's persistent session on an outside broker. Left there,
/// it would stay subscribed to every device topic and queue every alarm of
/// later runs for a client that never comes back, slowing the broker down
/// run after run (Mosquitto keeps such sessions for days).
async fn forget_session(broker: &Broker, client_id: &str) {
    if broker.embedded {
        return;
    }
    let limit = Duration::from_secs(10);
    if !telegate::source::mqtt::end_session(&broker.host, broker.port, client_id, limit).await {
        eprintln!(
            "load: could not end the gateway's session {client_id:?} on the broker; \
             it stays subscribed until the broker expires it"
        );
    }
}

/// A fleet offering `rate` alarms/s of `mix` to `tenant`-prefixed tenants.
async fn start_fleet(
    broker: &Broker,
    label: &str,
    rate: f64,
    mix: Mix,
    seed: u64,
) -> Result<Fleet, Box<dyn std::error::Error>> {
    let mut config = FleetConfig::new(&broker.host, broker.port);
    config.client_prefix = format!(
        "lb-{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    config.connections = 4;
    config.tenants = (1..=4).map(|i| format!("{label}-t{i}")).collect();
    config.devices = 4000;
    config.rate = rate;
    config.heartbeat_interval = Duration::ZERO;
    config.resend_after = Duration::from_secs(5);
    config.mix = mix;
    config.seed = seed;
    Ok(Fleet::start(config).await?)
}

fn mix(critical: f64, urgent: f64, technical: f64, routine: f64) -> Mix {
    Mix {
        critical,
        urgent,
        technical,
        routine,
        restore_share: 0.1,
    }
}

/// Offers load with `fleets` (label, rate, mix) for `duration`, drains, and
/// measures the gateway.
async fn run_mqtt_load(
    gateway: &Gateway,
    broker: &Broker,
    arc: &ArcSim,
    fleets: &[(&str, f64, Mix)],
    duration: Duration,
    seed: u64,
) -> Result<Measured, Box<dyn std::error::Error>> {
    let mut started = Vec::new();
    for (i, (label, rate, mix)) in fleets.iter().enumerate() {
        started.push(start_fleet(broker, label, *rate, *mix, seed + i as u64).await?);
    }
    // An outside broker's CPU is read when it runs on this machine.
    let local = matches!(
        broker.host.as_str(),
        "127.0.0.1" | "localhost" | "::1" | "[::1]"
    );
    let broker_pid = if broker.embedded || !local {
        None
    } else {
        listener_pid(broker.port)
    };
    let before = CpuSample::take(gateway, broker_pid.as_deref());
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    for fleet in &started {
        fleet.stop_sending();
    }
    let deadline = Instant::now() + DRAIN;
    for fleet in &started {
        fleet
            .drain(deadline.saturating_duration_since(Instant::now()))
            .await;
    }
    let sent: Vec<Sent> = started.iter().flat_map(fleet_sent).collect();
    let accepted = wait_delivered(arc, &sent, deadline).await;
    let after = CpuSample::take(gateway, broker_pid.as_deref());
    let cpu = (after.gateway - before.gateway) / t0.elapsed().as_secs_f64() * 100.0;
    let offered = fleets.iter().map(|f| f.1).sum();
    let mut m = measure(&sent, &accepted, offered);
    m.cpu_pct = cpu;
    eprintln!(
        "{}",
        CpuPerAlarm::between(before, after, m.delivered).line(broker)
    );
    m.rss_mb = gateway.peak_rss_mb();
    for (label, _, _) in fleets {
        match gateway.stage_rows(label).await {
            Ok(rows) => eprintln!("{}", stage_line(label, &rows)),
            Err(e) => eprintln!("load-stages: cannot read the gateway's stage times: {e}"),
        }
    }
    for fleet in started {
        fleet.shutdown().await;
    }
    Ok(m)
}

fn print_line(scenario: &str, args: &Args, broker: &Broker, raw: f64, m: &Measured) {
    let store = if args.store_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    println!(
        "load: scenario={scenario} store={store} broker={} offered={:.0}/s achieved={:.0}/s sent={} delivered={} \
         lost={} p50_ms={:.1} p99_ms={:.1} crit_p99_ms={:.1} broker_ratio={:.3} cpu_pct={:.0} rss_mb={:.0}",
        broker.name(),
        m.offered,
        m.achieved,
        m.sent,
        m.delivered,
        m.lost,
        m.p50_ms,
        m.p99_ms,
        m.crit_p99_ms,
        if raw > 0.0 { m.achieved / raw } else { 0.0 },
        m.cpu_pct,
        m.rss_mb
    );
}

/// Round trips in one round of [`thread_round_trip`], and its rounds.
const ROUND_TRIPS: u32 = 10_000;
const ROUND_TRIP_ROUNDS: usize = 3;

/// What a thread switch costs on this machine now, as `perf bench sched pipe`
/// measures it: two threads passing a byte back and forth over a socket pair,
/// in µs a round trip (the median of three rounds). Mosquitto's work an alarm
/// is mostly system calls and switches, the gateway's mostly its own code, so
/// this moves the raw broker rate, and with it `broker_ratio`, from day to day.
fn thread_round_trip() -> std::io::Result<f64> {
    use std::io::{Read, Write};
    let (mut here, mut there) = std::os::unix::net::UnixStream::pair()?;
    let total = ROUND_TRIP_ROUNDS as u32 * ROUND_TRIPS;
    // The echo ends at its first error, or when `here` closes.
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut byte = [0u8; 1];
        for _ in 0..total {
            there.read_exact(&mut byte)?;
            there.write_all(&byte)?;
        }
        Ok(())
    });
    let mut byte = [0u8; 1];
    let mut each = Vec::with_capacity(ROUND_TRIP_ROUNDS);
    for _ in 0..ROUND_TRIP_ROUNDS {
        let start = Instant::now();
        for _ in 0..ROUND_TRIPS {
            here.write_all(&byte)?;
            here.read_exact(&mut byte)?;
        }
        each.push(start.elapsed().as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS));
    }
    drop(here);
    echo.join()
        .map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    each.sort_by(f64::total_cmp);
    Ok(each[each.len() / 2])
}

/// A typical fleet payload's size, for the raw broker measurement.
fn payload_size(seed: u64) -> usize {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sizes: Vec<usize> = (0..100)
        .map(|i| {
            firmware_sim::fleet::Signal::draw(&mut rng, &Mix::default())
                .payload(1000 + i, "2026-11-22T10:15:30.123Z")
                .len()
        })
        .collect();
    sizes.iter().sum::<usize>() / sizes.len()
}

async fn run_mqtt_scenario(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let broker = match &args.broker_url {
        Some(url) => outside_broker(url).await?,
        None => Broker {
            embedded: true,
            host: "127.0.0.1".to_owned(),
            port: telegate::broker::free_port()?,
        },
    };
    let arc = start_arc().await?;
    let client_id = format!("load-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let gateway = Gateway::start(args, &mqtt_source(&broker, &client_id), &arc).await?;
    eprintln!("load: gateway up (log in {})", gateway.log().display());
    let round_trip = tokio::task::spawn_blocking(thread_round_trip)
        .await
        .map_err(std::io::Error::other)
        .and_then(|timed| timed);
    match round_trip {
        Ok(us) => eprintln!(
            "load: machine: {us:.1} µs a round trip between two threads over a socket pair \
             (median of {ROUND_TRIP_ROUNDS} rounds of {ROUND_TRIPS}); compare runs of different days by it"
        ),
        Err(e) => eprintln!("load: machine: cannot time a thread round trip: {e}"),
    }
    // The raw broker rate is measured after the scenario, so that its burst
    // counts in neither the gateway's CPU share nor its peak memory.
    // Three times, for the median: one measurement of about a second moved by
    // a third between runs on this shared machine.
    let payload = payload_size(args.seed);
    let raw = || async {
        let mut rates = Vec::new();
        for _ in 0..RAW_RUNS {
            rates.push(raw_broker_rate(&broker, payload, 50_000).await);
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        eprintln!(
            "load: raw QoS 1 publish->subscribe rate of the {} broker: {median:.0} msg/s (median of {})",
            broker.name(),
            each.join(", ")
        );
        median
    };
    // Errors end the scenario, not the clean-up below.
    let result: Result<(), Box<dyn std::error::Error>> = async {
        match args.scenario {
            Scenario::Steady => {
                let rate = args.rate.unwrap_or(1000.0);
                let secs = args.duration_s.unwrap_or(30);
                let m = run_mqtt_load(
                    &gateway,
                    &broker,
                    &arc,
                    &[("steady", rate, mix(0.01, 0.09, 0.6, 0.3))],
                    Duration::from_secs(secs),
                    args.seed,
                )
                .await?;
                print_line("steady", args, &broker, raw().await, &m);
                Ok(())
            }
            Scenario::Storm => {
                // 20,000 technical alarms in 2 s, and 100 critical ones spread through them.
                let m = run_mqtt_load(
                    &gateway,
                    &broker,
                    &arc,
                    &[
                        ("storm-tech", 10_000.0, mix(0.0, 0.0, 1.0, 0.0)),
                        ("storm-crit", 50.0, mix(1.0, 0.0, 0.0, 0.0)),
                    ],
                    Duration::from_secs(2),
                    args.seed,
                )
                .await?;
                print_line("storm", args, &broker, raw().await, &m);
                Ok(())
            }
            Scenario::Max => {
                let secs = args.duration_s.unwrap_or(15);
                let mut held: Option<Measured> = None;
                let mut rate = args.step;
                loop {
                    let label = format!("max{}", rate as u64);
                    let m = run_mqtt_load(
                        &gateway,
                        &broker,
                        &arc,
                        &[(&label, rate, mix(0.01, 0.09, 0.6, 0.3))],
                        Duration::from_secs(secs),
                        args.seed,
                    )
                    .await?;
                    let ok = m.lost == 0 && m.p99_ms <= 1000.0 && m.delivered == m.sent;
                    eprintln!(
                        "load-step: offered={rate:.0}/s achieved={:.0}/s sent={} delivered={} lost={} p99_ms={:.1} cpu_pct={:.0} {}",
                        m.achieved, m.sent, m.delivered, m.lost, m.p99_ms, m.cpu_pct,
                        if ok { "held" } else { "did not hold" }
                    );
                    if !ok {
                        break;
                    }
                    held = Some(m);
                    rate += args.step;
                }
                match held {
                    Some(m) => {
                        print_line("max", args, &broker, raw().await, &m);
                        Ok(())
                    }
                    None => Err("not even the first step held".into()),
                }
            }
            Scenario::Serial => Err("the serial scenario uses no broker".into()),
        }
    }
    .await;
    gateway.stop(args.keep).await;
    forget_session(&broker, &client_id).await;
    arc.shutdown().await;
    result
}

/// 8 `telecare-line` ports at 115,200 baud at full line rate.
async fn run_serial_scenario(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    const PORTS: usize = 8;
    const BAUD: u32 = 115_200;
    let links = tempfile::tempdir()?;
    let mut sims = Vec::new();
    let mut sources = String::new();
    for i in 0..PORTS {
        let link = links.path().join(format!("hub{i}"));
        sims.push(
            SerialSim::start(SerialSimConfig {
                format: LineFormat::TelecareLine,
                link: link.clone(),
                rate: 0.0,
                count: None,
                baud: BAUD,
                window: 16,
                accounts: 200,
                seed: args.seed + i as u64,
                ..SerialSimConfig::default()
            })
            .await?,
        );
        sources.push_str(&format!(
            "[[serial]]\nid = \"hub{i}\"\npath = \"{}\"\nformat = \"telecare-line\"\nbaud = {BAUD}\ntenant = \"load-serial\"\n\n",
            link.display()
        ));
    }
    let arc = start_arc().await?;
    let gateway = Gateway::start(args, &sources, &arc).await?;
    let secs = args.duration_s.unwrap_or(15);
    let cpu0 = gateway.cpu_s();
    let t0 = Instant::now();
    let acked0: u64 = sims.iter().map(|s| s.stats().acked).sum();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let acked1: u64 = sims.iter().map(|s| s.stats().acked).sum();
    let window = t0.elapsed().as_secs_f64();
    let cpu = (gateway.cpu_s() - cpu0) / window * 100.0;
    for sim in &sims {
        sim.stop_offering();
    }
    let deadline = Instant::now() + DRAIN;
    for sim in &sims {
        sim.drain(deadline.saturating_duration_since(Instant::now()))
            .await;
    }
    let sent: Vec<Sent> = sims
        .iter()
        .flat_map(|s| s.records())
        .map(|r| Sent {
            first_sent: DateTime::<Utc>::from(r.first_sent),
            critical: r.critical,
            alarm_id: r.alarm_id,
        })
        .collect();
    let accepted = wait_delivered(&arc, &sent, deadline).await;
    let line_rate = (acked1 - acked0) as f64 / window;
    let mut m = measure(&sent, &accepted, line_rate);
    m.cpu_pct = cpu;
    m.rss_mb = gateway.peak_rss_mb();
    let store = if args.store_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    println!(
        "load: scenario=serial store={store} ports={PORTS} baud={BAUD} offered={:.0}/s achieved={:.0}/s sent={} \
         delivered={} lost={} p50_ms={:.1} p99_ms={:.1} crit_p99_ms={:.1} cpu_pct={:.0} rss_mb={:.0}",
        m.offered, m.achieved, m.sent, m.delivered, m.lost, m.p50_ms, m.p99_ms, m.crit_p99_ms, m.cpu_pct, m.rss_mb
    );
    for sim in sims {
        sim.stop().await;
    }
    gateway.stop(args.keep).await;
    arc.shutdown().await;
    Ok(())
}

/// Tables the bench writes into the gateway's configuration itself.
const BENCH_TABLES: [&str; 6] = ["store", "api", "mqtt", "serial", "provider", "routing"];

/// The text of `--gateway-config`: readable TOML that leaves the bench's own
/// tables alone.
fn gateway_toml(path: &std::path::Path) -> Result<String, String> {
    let name = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --gateway-config {name}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("--gateway-config {name} is not TOML: {e}"))?;
    let ours: Vec<String> = table
        .keys()
        .filter(|key| BENCH_TABLES.contains(&key.as_str()))
        .map(|key| format!("[{key}]"))
        .collect();
    if !ours.is_empty() {
        return Err(format!(
            "--gateway-config {name}: the bench writes {} itself; give other sections, \
             such as [ingest] or [deliver]",
            ours.join(", ")
        ));
    }
    Ok(text)
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if let Some(path) = &args.gateway_config {
        match gateway_toml(path) {
            Ok(text) => {
                eprintln!("load: the gateway's configuration adds {}", path.display());
                args.gateway_toml = text;
            }
            Err(e) => {
                eprintln!("load: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if args.scenario == Scenario::Serial {
            run_serial_scenario(&args).await
        } else {
            run_mqtt_scenario(&args).await
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
