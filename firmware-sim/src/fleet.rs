//! The device fleet simulator: many simulated telecare devices raising alarms and heartbeats over MQTT, by
//! the device → gateway wire contract of DESIGN.md, and re-sending each alarm until the gateway acknowledges
//! it on the device's `…/ack` topic.
//!
//! Design:
//! - Devices share a few MQTT connections (client ids `{prefix}-1` …). Each connection subscribes to
//!   `telecare/{tenant}/+/ack` for the tenants of its devices and routes each reply by its topic. When there
//!   are at least as many tenants as connections, devices are assigned to connections by tenant, so each
//!   reply reaches exactly one connection; with fewer tenants, connections share a tenant and each ignores
//!   the replies meant for another connection's devices.
//! - Per connection, a poller owns the rumqttc event loop and never awaits anything but the loop itself;
//!   a sender takes publish jobs from a bounded queue and awaits the client. The queue (and the client's
//!   request channel behind it) is the back-pressure: when the broker is slow, the generator waits.
//! - Four more tasks: the generator (alarms at the configured rate, from a seeded generator, so the same
//!   seed and configuration give the same alarms), the heartbeats (spread evenly over the interval), and the
//!   timer task, which re-sends unacknowledged alarms (doubling the pause up to 30 s) and publishes the
//!   injected duplicates. Pollers never publish: they push timers and wake the timer task.
//! - One mutex guards the devices, the record of every alarm, the counters and the timers, so that an alarm
//!   is settled exactly once however many replies arrive. Waiters watch a version counter bumped after every
//!   change ([`Fleet::wait_until`], [`Fleet::drain`]).
//! - A reply is matched to an alarm by device and `seq`. Two rules keep that unambiguous: a device reboots
//!   (its `seq` restarts at 1) only once it has no unacknowledged alarm, a reboot drawn earlier waiting
//!   until then; and a `duplicate` reply carrying the alarm id of one of the device's earlier alarms is a late
//!   answer to that alarm's re-send, not an answer to a newer alarm with the same `seq`. Malformed payloads
//!   carry `seq` 0 (alarms start at 1) or none, so their `rejected` replies never settle an alarm.
//! - The record of an alarm keeps its payload only while it may be published again.

mod codes;

pub use codes::{ClassCodes, Code, Form, Group, Malformed, Mix, Signal, CLASSES, MALFORMED_SEQ};

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::arc::wire_time;

/// The longest pause between two re-sends of one alarm.
pub const MAX_RESEND_BACKOFF: Duration = Duration::from_secs(30);
/// How long [`Fleet::start`] waits for every connection's SUBACK.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Publish jobs waiting for one connection's sender.
const JOB_QUEUE: usize = 1_024;
/// Requests waiting in one rumqttc client's channel.
const REQUEST_QUEUE: usize = 1_024;
/// How often the generator wakes up; at high rates it emits several alarms per tick.
const GENERATOR_TICK: Duration = Duration::from_millis(5);
/// The most the generator or the heartbeats catch up after falling behind, in seconds of their rate:
/// beyond that the backlog is skipped rather than sent in one burst.
const MAX_CATCH_UP_S: f64 = 1.0;
/// Alarm ids of its settled alarms a device remembers, to recognise late replies.
const RECENT_IDS: usize = 8;
/// The largest MQTT packet read or written.
const MAX_PACKET: usize = 64 * 1024;
/// The longest pause before reconnecting after a connection error.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// How long a connection gets to send its DISCONNECT at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);
/// How long shutdown waits for the tasks before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a fleet is set up. [`FleetConfig::new`] gives the defaults; change fields as needed.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// The broker's host name or address.
    pub host: String,
    pub port: u16,
    /// Connection `n` (from 1) has client id `{client_prefix}-{n}`.
    pub client_prefix: String,
    /// MQTT connections the devices share (at most one per device is used).
    pub connections: usize,
    /// Tenants; devices are spread over them round-robin.
    pub tenants: Vec<String>,
    /// Devices, named `unit-0001`, `unit-0002`, …
    pub devices: usize,
    /// New alarms per second across the fleet, on average (0 sends none).
    pub rate: f64,
    /// Each device sends a heartbeat this often; zero sends none.
    pub heartbeat_interval: Duration,
    /// The pause before the first re-send of an unacknowledged alarm; it doubles, up to 30 s.
    pub resend_after: Duration,
    /// The share (0.0–1.0) of acknowledged alarms published once more, expecting `duplicate`.
    pub duplicate_share: f64,
    /// The share (0.0–1.0) of alarms replaced by a malformed payload, expecting `rejected`.
    pub malformed_share: f64,
    /// The chance (0.0–1.0) per alarm that its device reboots first, so its `seq` restarts at 1.
    pub reboot_share: f64,
    /// The classes and restores drawn.
    pub mix: Mix,
    /// Seeds the random number generators, so a run can be repeated.
    pub seed: u64,
}

impl FleetConfig {
    /// Client prefix `fleet`, 4 connections, tenants `derbyshire` and `notts`, 100 devices, 10 alarms/s, a
    /// heartbeat every 60 s, the first re-send after 2 s, no injections, the default [`Mix`], seed 1.
    pub fn new(host: impl Into<String>, port: u16) -> FleetConfig {
        FleetConfig {
            host: host.into(),
            port,
            client_prefix: "fleet".to_owned(),
            connections: 4,
            tenants: vec!["derbyshire".to_owned(), "notts".to_owned()],
            devices: 100,
            rate: 10.0,
            heartbeat_interval: Duration::from_secs(60),
            resend_after: Duration::from_secs(2),
            duplicate_share: 0.0,
            malformed_share: 0.0,
            reboot_share: 0.0,
            mix: Mix::default(),
            seed: 1,
        }
    }

    /// Every problem with this configuration, for one message.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.host.is_empty() {
            problems.push("host is empty".to_owned());
        }
        if self.client_prefix.is_empty() {
            problems.push("client_prefix is empty".to_owned());
        }
        if self.connections == 0 {
            problems.push("connections must be at least 1".to_owned());
        }
        if self.tenants.is_empty() {
            problems.push("there are no tenants".to_owned());
        }
        for tenant in &self.tenants {
            if !valid_segment(tenant) {
                problems.push(format!(
                    "tenant {tenant:?} is not 1-64 characters of [A-Za-z0-9._-]"
                ));
            }
        }
        if self.devices == 0 {
            problems.push("devices must be at least 1".to_owned());
        } else if self.devices > u32::MAX as usize {
            problems.push(format!("{} devices are too many", self.devices));
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            problems.push(format!("rate {} is not a number >= 0", self.rate));
        }
        if self.resend_after.is_zero() {
            problems.push("resend_after must be more than 0".to_owned());
        }
        for (name, share) in [
            ("duplicate_share", self.duplicate_share),
            ("malformed_share", self.malformed_share),
            ("reboot_share", self.reboot_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                problems.push(format!("{name} {share} is not between 0 and 1"));
            }
        }
        problems.extend(self.mix.problems());
        problems
    }
}

/// True for a tenant or device id: 1–64 characters of `[A-Za-z0-9._-]`.
fn valid_segment(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The device id of device `index` (from 0): `unit-0001`, …
pub fn device_id(index: usize) -> String {
    format!("unit-{:04}", index + 1)
}

/// Counters of everything the fleet did and heard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetStats {
    /// Distinct alarms raised.
    pub sent: u64,
    /// Every PUBLISH handed to the MQTT clients: alarms, re-sends, injected duplicates, malformed payloads
    /// and heartbeats.
    pub published: u64,
    /// Re-sends of unacknowledged alarms.
    pub resends: u64,
    /// Distinct alarms answered `accepted` or `duplicate`.
    pub acked: u64,
    /// Distinct alarms whose first answer was `accepted`.
    pub accepted: u64,
    /// Replies with status `duplicate` (to re-sends or injected duplicates).
    pub duplicates: u64,
    /// Replies with status `rejected` (to alarms or malformed payloads).
    pub rejected: u64,
    /// Distinct alarms whose answer was `rejected`.
    pub rejected_alarms: u64,
    /// Malformed payloads published.
    pub malformed_sent: u64,
    /// Acknowledged alarms published once more on purpose.
    pub injected_duplicates: u64,
    /// Device reboots (each restarts that device's `seq` at 1).
    pub reboots: u64,
    /// Heartbeats published.
    pub heartbeats: u64,
    /// Replies that could not be read (not JSON, unknown status, no `seq` where one is needed).
    pub bad_replies: u64,
    /// Alarms not yet answered: `sent - acked - rejected_alarms`.
    pub outstanding: u64,
}

/// `sent=N acked=N accepted=N duplicates=N rejected=N resends=N malformed=N reboots=N heartbeats=N
/// outstanding=N`, the CLI's summary line after `fleet: `.
impl fmt::Display for FleetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} acked={} accepted={} duplicates={} rejected={} resends={} malformed={} reboots={} \
             heartbeats={} outstanding={}",
            self.sent,
            self.acked,
            self.accepted,
            self.duplicates,
            self.rejected,
            self.resends,
            self.malformed_sent,
            self.reboots,
            self.heartbeats,
            self.outstanding
        )
    }
}

/// The record of one distinct alarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentAlarm {
    pub tenant: String,
    pub device_id: String,
    pub seq: u32,
    /// The taxonomy class.
    pub class: String,
    /// Whether the class has priority 1.
    pub critical: bool,
    /// Whether it is a restore.
    pub restore: bool,
    /// How the code was sent.
    pub form: Form,
    /// When it was raised and first queued for publishing; also its payload's `ts`.
    pub first_published: DateTime<Utc>,
    /// When the answer that settled it arrived.
    pub acked_at: Option<DateTime<Utc>>,
    /// The gateway's alarm id, from that answer.
    pub alarm_id: Option<String>,
    /// That answer's status: `accepted`, `duplicate` or `rejected`.
    pub status: Option<String>,
}

/// The status of a gateway reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Accepted,
    Duplicate,
    Rejected,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Duplicate => "duplicate",
            Status::Rejected => "rejected",
        }
    }
}

/// A gateway reply, as far as it could be read.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    seq: Option<u32>,
    alarm_id: Option<String>,
    status: Status,
}

/// Reads a reply; `None` when it is not one (not a JSON object, or no known status).
fn parse_reply(payload: &[u8]) -> Option<Reply> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let status = match value.get("status")?.as_str()? {
        "accepted" => Status::Accepted,
        "duplicate" => Status::Duplicate,
        "rejected" => Status::Rejected,
        _ => return None,
    };
    Some(Reply {
        seq: value
            .get("seq")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok()),
        alarm_id: value
            .get("alarm_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        status,
    })
}

/// A running fleet. Cheap to clone; every clone controls the same fleet.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tenant names, indexed by [`DeviceInfo::tenant`].
    tenants: Vec<String>,
    /// What never changes about each device, by index.
    devices: Vec<DeviceInfo>,
    /// `telecare/{tenant}/{device_id}/ack` → device index, to route replies.
    ack_topics: HashMap<String, usize>,
    /// Each connection's job queue, by connection index.
    queues: Vec<mpsc::Sender<Job>>,
    /// The pause before an alarm's first re-send.
    resend_after: Duration,
    /// The chance that an acknowledged alarm is published once more.
    duplicate_share: f64,
    /// Devices, records, counters and timers (see the module header).
    state: Mutex<State>,
    /// Counted by the senders, outside the lock.
    published: AtomicU64,
    /// Bumped after every change, for the waiters.
    version: watch::Sender<u64>,
    /// Wakes the timer task when a timer earlier than all others was added.
    timers_changed: Notify,
    /// Cancelled by [`Fleet::stop_sending`]: no new alarms or heartbeats.
    sending: CancellationToken,
    /// Cancelled by [`Fleet::shutdown`]: every task stops.
    stop: CancellationToken,
    /// Every task, aborted at shutdown if it does not stop in time.
    tasks: Mutex<JoinSet<()>>,
}

struct DeviceInfo {
    /// Index into `Inner::tenants`.
    tenant: usize,
    device_id: String,
    /// The connection it publishes on and gets its replies from.
    connection: usize,
    alarm_topic: String,
    heartbeat_topic: String,
}

struct State {
    devices: Vec<DeviceState>,
    /// Every distinct alarm, in the order raised; [`Timer::alarm`] indexes it.
    alarms: Vec<AlarmEntry>,
    /// Counters except `published` (an atomic) and `outstanding` (derived).
    stats: FleetStats,
    /// Re-sends and injected duplicates, earliest first.
    timers: BinaryHeap<Reverse<Timer>>,
    /// Draws the duplicate injections, apart from the generator's draws, whose sequence must not depend on
    /// when replies arrive.
    inject_rng: StdRng,
}

#[derive(Default)]
struct DeviceState {
    /// The `seq` of its next alarm.
    next_seq: u32,
    /// Its unanswered alarms: `seq` and index into `State::alarms`.
    awaiting: Vec<(u32, usize)>,
    /// Alarm ids of its latest settled alarms, newest last.
    recent_ids: VecDeque<String>,
    /// A reboot was drawn and waits for `awaiting` to empty.
    reboot_pending: bool,
    /// The `seq` of its last heartbeat.
    heartbeat_seq: u64,
}

/// The record of one alarm; [`Fleet::alarms`] turns it into a [`SentAlarm`].
struct AlarmEntry {
    /// Index into `Inner::devices`.
    device: u32,
    seq: u32,
    signal: Signal,
    first_published: DateTime<Utc>,
    acked_at: Option<DateTime<Utc>>,
    alarm_id: Option<String>,
    status: Option<Status>,
    /// Kept while it may be published again: unanswered, or waiting for its injected duplicate.
    payload: Option<Bytes>,
    /// The pause before its next re-send.
    backoff: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    due: Instant,
    /// Index into `State::alarms`.
    alarm: usize,
    kind: TimerKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Resend,
    Duplicate,
}

/// One PUBLISH for a connection's sender.
struct Job {
    topic: String,
    payload: Bytes,
}

/// How the connections are coming up, for [`Fleet::start`].
#[derive(Clone, Default)]
struct Startup {
    /// Connections whose subscriptions have been acknowledged.
    ready: usize,
    /// The latest connection error.
    last_error: Option<String>,
    /// Set when the broker refused a subscription: starting fails at once.
    refused: Option<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Which connection each device uses: whole tenants per connection when there are at least as many tenants
/// as connections (each reply then reaches one connection), otherwise round-robin over the devices.
fn assign_connection(device: usize, tenants: usize, connections: usize) -> usize {
    if tenants >= connections {
        (device % tenants) % connections
    } else {
        device % connections
    }
}

impl Fleet {
    /// Validates the configuration, connects to the broker and subscribes to the ack topics, then starts
    /// sending. Returns once every connection's subscriptions are acknowledged, so no reply can be missed.
    ///
    /// # Errors
    /// `InvalidInput` listing every configuration problem; `TimedOut` when a connection has no SUBACK within
    /// 10 s (with the last connection error); `ConnectionRefused` when the broker refuses a subscription.
    pub async fn start(config: FleetConfig) -> io::Result<Fleet> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(invalid_input(problems.join("; ")));
        }
        let connections = config.connections.min(config.devices);
        let devices: Vec<DeviceInfo> = (0..config.devices)
            .map(|index| {
                let tenant = index % config.tenants.len();
                let device_id = device_id(index);
                let base = format!("telecare/{}/{device_id}", config.tenants[tenant]);
                DeviceInfo {
                    tenant,
                    connection: assign_connection(index, config.tenants.len(), connections),
                    alarm_topic: format!("{base}/alarm"),
                    heartbeat_topic: format!("{base}/heartbeat"),
                    device_id,
                }
            })
            .collect();
        let ack_topics = devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                let tenant = &config.tenants[device.tenant];
                (format!("telecare/{tenant}/{}/ack", device.device_id), index)
            })
            .collect();
        let mut filters: Vec<Vec<SubscribeFilter>> = vec![Vec::new(); connections];
        for device in &devices {
            let path = format!("telecare/{}/+/ack", config.tenants[device.tenant]);
            let list = &mut filters[device.connection];
            if !list.iter().any(|f| f.path == path) {
                list.push(SubscribeFilter::new(path, QoS::AtLeastOnce));
            }
        }
        let mut receivers = Vec::with_capacity(connections);
        let mut queues = Vec::with_capacity(connections);
        for _ in 0..connections {
            let (tx, rx) = mpsc::channel(JOB_QUEUE);
            queues.push(tx);
            receivers.push(rx);
        }
        let inner = Arc::new(Inner {
            tenants: config.tenants.clone(),
            ack_topics,
            queues,
            resend_after: config.resend_after,
            duplicate_share: config.duplicate_share,
            state: Mutex::new(State {
                devices: (0..devices.len())
                    .map(|_| DeviceState {
                        next_seq: 1,
                        ..DeviceState::default()
                    })
                    .collect(),
                alarms: Vec::new(),
                stats: FleetStats::default(),
                timers: BinaryHeap::new(),
                inject_rng: StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15),
            }),
            devices,
            published: AtomicU64::new(0),
            version: watch::Sender::new(0),
            timers_changed: Notify::new(),
            sending: CancellationToken::new(),
            stop: CancellationToken::new(),
            tasks: Mutex::new(JoinSet::new()),
        });
        let fleet = Fleet {
            inner: Arc::clone(&inner),
        };

        let (startup_tx, mut startup_rx) = watch::channel(Startup::default());
        let startup_tx = Arc::new(startup_tx);
        for (connection, (jobs, filters)) in receivers.into_iter().zip(filters).enumerate() {
            let client_id = format!("{}-{}", config.client_prefix, connection + 1);
            let mut options = MqttOptions::new(client_id.clone(), &config.host, config.port);
            options
                .set_keep_alive(Duration::from_secs(30))
                .set_max_packet_size(MAX_PACKET, MAX_PACKET)
                .set_clean_session(true)
                // Publishes and PUBACKs already queued share one write.
                .set_max_request_batch(64);
            let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
            // Small packets go out at once instead of waiting for TCP's
            // acknowledgement of the previous one.
            let mut network = eventloop.network_options();
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            let poller = Poller {
                inner: Arc::clone(&inner),
                connection,
                client_id,
                client: client.clone(),
                filters,
                startup: Arc::clone(&startup_tx),
            };
            fleet.spawn(poller.run(eventloop));
            fleet.spawn(send_jobs(Arc::clone(&inner), client, jobs));
        }

        let wait = async {
            startup_rx
                .wait_for(|s| s.ready >= connections || s.refused.is_some())
                .await
                .map(|startup| startup.clone())
        };
        let outcome = match tokio::time::timeout(START_TIMEOUT, wait).await {
            Ok(Ok(startup)) => match startup.refused {
                Some(reason) => Err(io::Error::new(io::ErrorKind::ConnectionRefused, reason)),
                None => Ok(()),
            },
            Ok(Err(_)) => Err(io::Error::other("the MQTT connections stopped")),
            Err(_) => {
                let startup = startup_rx.borrow().clone();
                let detail = startup
                    .last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the broker at {}:{} did not acknowledge the subscriptions of {} of {connections} \
                         connections within {} s{detail}",
                        config.host,
                        config.port,
                        connections - startup.ready.min(connections),
                        START_TIMEOUT.as_secs()
                    ),
                ))
            }
        };
        if let Err(err) = outcome {
            fleet.clone().shutdown().await;
            return Err(err);
        }

        fleet.spawn(run_timers(Arc::clone(&inner)));
        if config.rate > 0.0 {
            let generator = Generator {
                inner: Arc::clone(&inner),
                rng: StdRng::seed_from_u64(config.seed),
                rate: config.rate,
                mix: config.mix,
                malformed_share: config.malformed_share,
                reboot_share: config.reboot_share,
            };
            fleet.spawn(generator.run());
        }
        if !config.heartbeat_interval.is_zero() {
            fleet.spawn(send_heartbeats(
                Arc::clone(&inner),
                config.heartbeat_interval,
            ));
        }
        info!(
            host = %config.host,
            port = config.port,
            devices = config.devices,
            tenants = config.tenants.len(),
            connections,
            rate = config.rate,
            "fleet started"
        );
        Ok(fleet)
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        lock(&self.inner.tasks).spawn(task);
    }

    /// The counters so far.
    pub fn stats(&self) -> FleetStats {
        self.inner.stats()
    }

    /// The record of every distinct alarm, in the order raised.
    pub fn alarms(&self) -> Vec<SentAlarm> {
        let inner = &self.inner;
        let state = lock(&inner.state);
        state
            .alarms
            .iter()
            .map(|entry| {
                let device = &inner.devices[entry.device as usize];
                SentAlarm {
                    tenant: inner.tenants[device.tenant].clone(),
                    device_id: device.device_id.clone(),
                    seq: entry.seq,
                    class: entry.signal.class.class.to_owned(),
                    critical: entry.signal.class.group == Group::Critical,
                    restore: entry.signal.restore,
                    form: entry.signal.form(),
                    first_published: entry.first_published,
                    acked_at: entry.acked_at,
                    alarm_id: entry.alarm_id.clone(),
                    status: entry.status.map(|s| s.as_str().to_owned()),
                }
            })
            .collect()
    }

    /// Stops raising alarms and sending heartbeats; unacknowledged alarms go on being re-sent.
    pub fn stop_sending(&self) {
        self.inner.sending.cancel();
    }

    /// Waits until every alarm sent so far is answered (`outstanding == 0`); false on timeout.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |stats| stats.outstanding == 0)
            .await
    }

    /// Waits until `done` holds for the counters; false on timeout.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&FleetStats) -> bool) -> bool {
        let mut version = self.inner.version.subscribe();
        let wait = async {
            version
                .wait_for(|_| done(&self.inner.stats()))
                .await
                .is_ok()
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Stops every task and disconnects; unanswered alarms stay unanswered.
    pub async fn shutdown(self) {
        self.inner.sending.cancel();
        self.inner.stop.cancel();
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        let joined = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            warn!("fleet tasks did not stop in time; aborting them");
            tasks.shutdown().await;
        }
        info!(stats = %self.inner.stats(), "fleet stopped");
    }
}

impl Inner {
    fn stats(&self) -> FleetStats {
        let mut stats = lock(&self.state).stats;
        stats.published = self.published.load(Ordering::Relaxed);
        stats.outstanding = stats
            .sent
            .saturating_sub(stats.acked)
            .saturating_sub(stats.rejected_alarms);
        stats
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Adds a timer, waking the timer task when it is now the earliest.
    fn add_timer(&self, state: &mut State, timer: Timer) {
        state.timers.push(Reverse(timer));
        if state.timers.peek() == Some(&Reverse(timer)) {
            self.timers_changed.notify_one();
        }
    }

    /// Queues jobs for their connections' senders, in order. False when the fleet is shutting down.
    async fn dispatch(&self, jobs: &mut Vec<(usize, Job)>) -> bool {
        for (connection, job) in jobs.drain(..) {
            let sent = tokio::select! {
                biased;
                () = self.stop.cancelled() => false,
                sent = self.queues[connection].send(job) => sent.is_ok(),
            };
            if !sent {
                return false;
            }
        }
        true
    }

    /// Handles one PUBLISH that reached connection `connection`.
    fn on_reply(&self, connection: usize, topic: &str, payload: &[u8]) {
        let Some(&device) = self.ack_topics.get(topic) else {
            debug!(
                topic,
                "message on a topic of no device of this fleet ignored"
            );
            return;
        };
        if self.devices[device].connection != connection {
            // A reply for a device on another connection that shares this tenant: that one handles it.
            return;
        }
        let now = Utc::now();
        let mut state = lock(&self.state);
        let Some(reply) = parse_reply(payload) else {
            state.stats.bad_replies += 1;
            drop(state);
            debug!(topic, "unreadable reply ignored");
            self.changed();
            return;
        };
        match reply.status {
            Status::Accepted | Status::Duplicate => {
                if reply.status == Status::Duplicate {
                    state.stats.duplicates += 1;
                }
                match reply.seq {
                    Some(seq) => self.settle_acked(&mut state, device, seq, reply, now),
                    None => state.stats.bad_replies += 1,
                }
            }
            Status::Rejected => {
                state.stats.rejected += 1;
                if let Some(seq) = reply.seq {
                    let awaiting = state.devices[device]
                        .awaiting
                        .iter()
                        .position(|(s, _)| *s == seq);
                    if let Some(position) = awaiting {
                        let (_, alarm) = state.devices[device].awaiting.swap_remove(position);
                        let entry = &mut state.alarms[alarm];
                        entry.status = Some(Status::Rejected);
                        entry.acked_at = Some(now);
                        entry.payload = None;
                        state.stats.rejected_alarms += 1;
                        let device_id = &self.devices[device].device_id;
                        // Once loudly; a gateway that rejects everything must not flood the log.
                        if state.stats.rejected_alarms == 1 {
                            warn!(device_id, seq, "the gateway rejected an alarm");
                        } else {
                            debug!(device_id, seq, "the gateway rejected an alarm");
                        }
                    }
                }
            }
        }
        drop(state);
        self.changed();
    }

    /// Settles the device's alarm `seq` on an `accepted` or `duplicate` reply, unless the reply is a late
    /// answer to an earlier alarm (see the module header).
    fn settle_acked(
        &self,
        state: &mut State,
        device: usize,
        seq: u32,
        reply: Reply,
        now: DateTime<Utc>,
    ) {
        let device_state = &mut state.devices[device];
        let Some(position) = device_state.awaiting.iter().position(|(s, _)| *s == seq) else {
            return;
        };
        if reply.status == Status::Duplicate {
            if let Some(id) = &reply.alarm_id {
                if device_state.recent_ids.contains(id) {
                    return;
                }
            }
        }
        let (_, alarm) = device_state.awaiting.swap_remove(position);
        if let Some(id) = &reply.alarm_id {
            if device_state.recent_ids.len() == RECENT_IDS {
                device_state.recent_ids.pop_front();
            }
            device_state.recent_ids.push_back(id.clone());
        }
        let inject = self.duplicate_share > 0.0 && state.inject_rng.gen_bool(self.duplicate_share);
        let entry = &mut state.alarms[alarm];
        entry.acked_at = Some(now);
        entry.alarm_id = reply.alarm_id;
        entry.status = Some(reply.status);
        state.stats.acked += 1;
        if reply.status == Status::Accepted {
            state.stats.accepted += 1;
        }
        if inject {
            let timer = Timer {
                due: Instant::now(),
                alarm,
                kind: TimerKind::Duplicate,
            };
            self.add_timer(state, timer);
        } else {
            state.alarms[alarm].payload = None;
        }
    }
}

/// Owns one connection's event loop: reads the replies and keeps the subscriptions in place.
struct Poller {
    inner: Arc<Inner>,
    connection: usize,
    client_id: String,
    client: AsyncClient,
    filters: Vec<SubscribeFilter>,
    startup: Arc<watch::Sender<Startup>>,
}

impl Poller {
    async fn run(self, mut eventloop: EventLoop) {
        let mut backoff = Duration::from_millis(100);
        let mut ready = false;
        loop {
            let event = tokio::select! {
                biased;
                () = self.inner.stop.cancelled() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    self.inner
                        .on_reply(self.connection, &publish.topic, &publish.payload);
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != ConnectReturnCode::Success {
                        self.report_error(format!("connection refused: {:?}", ack.code));
                        continue;
                    }
                    backoff = Duration::from_millis(100);
                    debug!(client_id = %self.client_id, "fleet connection up");
                    self.subscribe(&mut ready);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                        let reason =
                            format!("the broker refused the subscriptions of {}", self.client_id);
                        warn!(client_id = %self.client_id, "{reason}");
                        self.startup.send_modify(|s| s.refused = Some(reason));
                    } else if !ready {
                        ready = true;
                        self.startup.send_modify(|s| s.ready += 1);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    self.report_error(err.to_string());
                    tokio::select! {
                        () = self.inner.stop.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
                }
            }
        }
        // Shutting down: say goodbye to the broker when it is there.
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }

    /// Subscribes from a task of its own, because the request may wait behind queued publishes and the
    /// poller must not wait for its own event loop.
    fn subscribe(&self, ready: &mut bool) {
        if self.filters.is_empty() {
            if !*ready {
                *ready = true;
                self.startup.send_modify(|s| s.ready += 1);
            }
            return;
        }
        let client = self.client.clone();
        let filters = self.filters.clone();
        let client_id = self.client_id.clone();
        let stop = self.inner.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                result = client.subscribe_many(filters) => {
                    if let Err(err) = result {
                        debug!(%client_id, error = %err, "cannot subscribe");
                    }
                }
            }
        });
    }

    fn report_error(&self, error: String) {
        warn!(client_id = %self.client_id, %error, "fleet connection error");
        self.startup.send_modify(|s| s.last_error = Some(error));
    }
}

/// Publishes one connection's jobs, in order, until shutdown.
async fn send_jobs(inner: Arc<Inner>, client: AsyncClient, mut jobs: mpsc::Receiver<Job>) {
    loop {
        let job = tokio::select! {
            biased;
            () = inner.stop.cancelled() => break,
            job = jobs.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        let published = tokio::select! {
            biased;
            () = inner.stop.cancelled() => break,
            result = client.publish_bytes(job.topic, QoS::AtLeastOnce, false, job.payload) => result,
        };
        match published {
            Ok(()) => {
                inner.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                debug!(error = %err, "the MQTT client is gone; the sender stops");
                break;
            }
        }
    }
}

/// Raises alarms (and malformed payloads) at the configured rate.
struct Generator {
    inner: Arc<Inner>,
    /// Draws everything about each alarm, in order, so the same seed gives the same alarms.
    rng: StdRng,
    rate: f64,
    mix: Mix,
    malformed_share: f64,
    reboot_share: f64,
}

impl Generator {
    async fn run(mut self) {
        let inner = Arc::clone(&self.inner);
        let burst = (self.rate * MAX_CATCH_UP_S).ceil().max(1.0) as u64;
        let mut pacer = Pacer::new(GENERATOR_TICK, self.rate, burst, 0);
        let mut jobs = Vec::new();
        while let Some(due) = pacer.next(&inner.sending).await {
            self.make(due.end - due.start, &mut jobs);
            inner.changed();
            // A batch already made is sent even after `stop_sending`: its alarms are counted.
            if !inner.dispatch(&mut jobs).await {
                break;
            }
        }
    }

    /// Makes `n` alarms or malformed payloads under one lock.
    fn make(&mut self, n: u64, jobs: &mut Vec<(usize, Job)>) {
        let inner = &*self.inner;
        let now = Utc::now();
        let ts = wire_time(now);
        let due = Instant::now() + inner.resend_after;
        let mut state = lock(&inner.state);
        let state = &mut *state;
        let devices = inner.devices.len();
        for _ in 0..n {
            let device = self.rng.gen_range(0..devices);
            let reboot = self.reboot_share > 0.0 && self.rng.gen_bool(self.reboot_share);
            let malformed = self.malformed_share > 0.0 && self.rng.gen_bool(self.malformed_share);
            let info = &inner.devices[device];
            let device_state = &mut state.devices[device];
            device_state.reboot_pending |= reboot;
            if device_state.reboot_pending && device_state.awaiting.is_empty() {
                device_state.reboot_pending = false;
                device_state.next_seq = 1;
                device_state.heartbeat_seq = 0;
                state.stats.reboots += 1;
                debug!(device_id = %info.device_id, "device rebooted");
            }
            if malformed {
                let payload = Malformed::draw(&mut self.rng).payload(&ts);
                state.stats.malformed_sent += 1;
                jobs.push((
                    info.connection,
                    Job {
                        topic: info.alarm_topic.clone(),
                        payload: Bytes::from(payload),
                    },
                ));
                continue;
            }
            let signal = Signal::draw(&mut self.rng, &self.mix);
            let device_state = &mut state.devices[device];
            let seq = device_state.next_seq;
            device_state.next_seq = seq.checked_add(1).unwrap_or(1);
            let alarm = state.alarms.len();
            device_state.awaiting.push((seq, alarm));
            let payload = Bytes::from(signal.payload(seq, &ts));
            state.alarms.push(AlarmEntry {
                device: device as u32,
                seq,
                signal,
                first_published: now,
                acked_at: None,
                alarm_id: None,
                status: None,
                payload: Some(payload.clone()),
                backoff: inner.resend_after,
            });
            state.stats.sent += 1;
            let timer = Timer {
                due,
                alarm,
                kind: TimerKind::Resend,
            };
            inner.add_timer(state, timer);
            jobs.push((
                info.connection,
                Job {
                    topic: info.alarm_topic.clone(),
                    payload,
                },
            ));
        }
    }
}

/// Re-sends unanswered alarms and publishes injected duplicates when their timers fall due.
async fn run_timers(inner: Arc<Inner>) {
    let mut jobs = Vec::new();
    loop {
        let next = {
            let mut guard = lock(&inner.state);
            let state = &mut *guard;
            let now = Instant::now();
            while let Some(&Reverse(timer)) = state.timers.peek() {
                if timer.due > now {
                    break;
                }
                state.timers.pop();
                let entry = &mut state.alarms[timer.alarm];
                let Some(payload) = entry.payload.clone() else {
                    continue;
                };
                let info = &inner.devices[entry.device as usize];
                match timer.kind {
                    TimerKind::Resend if entry.status.is_none() => {
                        let backoff = entry.backoff;
                        entry.backoff = (backoff * 2).min(MAX_RESEND_BACKOFF);
                        state.stats.resends += 1;
                        state.timers.push(Reverse(Timer {
                            due: now + backoff,
                            ..timer
                        }));
                    }
                    TimerKind::Resend => continue,
                    TimerKind::Duplicate => {
                        entry.payload = None;
                        state.stats.injected_duplicates += 1;
                    }
                }
                jobs.push((
                    info.connection,
                    Job {
                        topic: info.alarm_topic.clone(),
                        payload,
                    },
                ));
            }
            state.timers.peek().map(|Reverse(timer)| timer.due)
        };
        if !jobs.is_empty() {
            inner.changed();
            if !inner.dispatch(&mut jobs).await {
                return;
            }
        }
        let sleep = async {
            match next {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = inner.stop.cancelled() => return,
            () = inner.timers_changed.notified() => {}
            () = sleep => {}
        }
    }
}

/// Paces a stream of events on a timer: at each tick, the events due since
/// the last one, `per_second` on average from the start. After a stall it
/// catches up at most `burst` events at once, so a process that was paused
/// does not flood the broker when it wakes.
struct Pacer {
    tick: tokio::time::Interval,
    per_second: f64,
    /// Events due at the very start (1: the first is due at once).
    offset: u64,
    burst: u64,
    started: Instant,
    /// Events handed out so far (or skipped by the burst limit).
    made: u64,
}

impl Pacer {
    fn new(every: Duration, per_second: f64, burst: u64, offset: u64) -> Pacer {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Pacer {
            tick,
            per_second,
            offset,
            burst,
            started: Instant::now(),
            made: 0,
        }
    }

    /// The numbers of the events now due; `None` once `stop` fires.
    async fn next(&mut self, stop: &CancellationToken) -> Option<std::ops::Range<u64>> {
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                _ = self.tick.tick() => {}
            }
            let target =
                (self.started.elapsed().as_secs_f64() * self.per_second) as u64 + self.offset;
            let mut due = target.saturating_sub(self.made);
            if due > self.burst {
                self.made = target - self.burst;
                due = self.burst;
            }
            if due > 0 {
                let range = self.made..self.made + due;
                self.made += due;
                return Some(range);
            }
        }
    }
}

/// Sends each device's heartbeat once per `interval`, the devices' turns spread evenly over it.
async fn send_heartbeats(inner: Arc<Inner>, interval: Duration) {
    let devices = inner.devices.len() as u64;
    let per_second = devices as f64 / interval.as_secs_f64();
    let tick_every = interval
        .checked_div(devices.min(u64::from(u32::MAX)) as u32)
        .unwrap_or(interval)
        .clamp(GENERATOR_TICK, Duration::from_millis(100));
    let burst = ((per_second * MAX_CATCH_UP_S).ceil() as u64).max(devices);
    // Device k % n has its turn at (k / n) intervals plus (k % n) / n of one.
    let mut pacer = Pacer::new(tick_every, per_second, burst, 1);
    let mut jobs = Vec::new();
    while let Some(due) = pacer.next(&inner.sending).await {
        {
            let mut state = lock(&inner.state);
            for k in due {
                let device = (k % devices) as usize;
                let device_state = &mut state.devices[device];
                device_state.heartbeat_seq += 1;
                let payload = format!("{{\"seq\":{}}}", device_state.heartbeat_seq);
                state.stats.heartbeats += 1;
                let info = &inner.devices[device];
                jobs.push((
                    info.connection,
                    Job {
                        topic: info.heartbeat_topic.clone(),
                        payload: Bytes::from(payload),
                    },
                ));
            }
        }
        inner.changed();
        if !inner.dispatch(&mut jobs).await {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_line_has_the_cli_format() {
        let stats = FleetStats {
            sent: 10,
            published: 99,
            resends: 3,
            acked: 9,
            accepted: 8,
            duplicates: 2,
            rejected: 1,
            rejected_alarms: 0,
            malformed_sent: 1,
            injected_duplicates: 1,
            reboots: 4,
            heartbeats: 50,
            bad_replies: 0,
            outstanding: 1,
        };
        assert_eq!(
            stats.to_string(),
            "sent=10 acked=9 accepted=8 duplicates=2 rejected=1 resends=3 malformed=1 reboots=4 \
             heartbeats=50 outstanding=1"
        );
    }

    #[test]
    fn config_problems_are_all_reported() {
        let mut config = FleetConfig::new("127.0.0.1", 1883);
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        config.tenants = vec!["ok".into(), "not/ok".into()];
        config.devices = 0;
        config.connections = 0;
        config.rate = f64::NAN;
        config.resend_after = Duration::ZERO;
        config.duplicate_share = 1.5;
        config.malformed_share = -0.1;
        config.reboot_share = 2.0;
        assert_eq!(config.problems().len(), 8, "{:?}", config.problems());
        config.tenants.clear();
        assert!(config.problems().iter().any(|p| p.contains("no tenants")));
    }

    #[test]
    fn devices_are_named_and_assigned_to_connections() {
        assert_eq!(device_id(0), "unit-0001");
        assert_eq!(device_id(9_999), "unit-10000");
        // Enough tenants: each tenant's devices share one connection.
        for device in 0..100 {
            let tenant = device % 5;
            assert_eq!(assign_connection(device, 5, 4), tenant % 4);
        }
        // Fewer tenants than connections: round-robin.
        let used: std::collections::HashSet<usize> =
            (0..100).map(|d| assign_connection(d, 2, 4)).collect();
        assert_eq!(used.len(), 4);
    }

    #[test]
    fn replies_are_read_without_trusting_them() {
        assert_eq!(
            parse_reply(br#"{"seq": 5, "alarm_id": "a-1", "status": "accepted"}"#),
            Some(Reply {
                seq: Some(5),
                alarm_id: Some("a-1".into()),
                status: Status::Accepted
            })
        );
        assert_eq!(
            parse_reply(br#"{"status": "rejected", "reason": "not_json"}"#),
            Some(Reply {
                seq: None,
                alarm_id: None,
                status: Status::Rejected
            })
        );
        assert_eq!(
            parse_reply(br#"{"seq": "5", "status": "duplicate"}"#).map(|r| r.seq),
            Some(None)
        );
        assert_eq!(
            parse_reply(br#"{"seq": 99999999999, "status": "duplicate"}"#).map(|r| r.seq),
            Some(None)
        );
        for bad in [
            &b"not json"[..],
            br#"[1, 2]"#,
            br#"{"seq": 1}"#,
            br#"{"seq": 1, "status": "maybe"}"#,
            br#"{"seq": 1, "status": 7}"#,
            b"",
        ] {
            assert_eq!(parse_reply(bad), None);
        }
    }
}
