//! The ARC (alarm receiving centre) simulator: an HTTP server that plays a provider receiving telegate's
//! deliveries (`POST /alarms`), and, when given the gateway's API, reports back when its simulated operator
//! answered and resolved each alarm (`POST /v1/alarms/{id}/progress`).
//!
//! Design:
//! - One mutex guards the mode, the records, the counters and the random number generators, so that deciding
//!   a delivery's answer and recording it are one step: under concurrent re-sends an alarm is accepted once.
//! - The listener sits behind its own async mutex, because changing it awaits: [`Mode::Down`] closes it (and
//!   the open connections) so the port refuses connections, and leaving `Down` binds the same address again.
//! - Two generators, both seeded from [`ArcConfig::seed`]: one draws the `fail_share` answers, the other the
//!   operator delays, so the sequence of 200/503 answers does not depend on whether progress is reported.
//! - Waiters ([`ArcSim::wait_for_accepted`] and friends) watch a version counter bumped after each record.

mod check;
mod delay;

pub use check::{is_wire_timestamp, sign, verify, MAX_SKEW_S};
pub use delay::{Delay, DelayParseError, MAX_DELAY};

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

/// The delivery endpoint's path: a provider `url` is `http://ADDR/alarms`.
pub const ALARMS_PATH: &str = "/alarms";

/// The largest delivery body read; a larger one is answered 413.
const MAX_BODY: usize = 2 * 1024 * 1024;
/// How long closing the listener may take before its task is aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long open connections get to finish their request when the port goes down.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// The longest pause between two attempts of one progress report.
const MAX_PROGRESS_BACKOFF: Duration = Duration::from_secs(10);
/// The timeout of one progress request.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// How a simulator is set up. [`ArcConfig::new`] gives the defaults; change fields as needed.
#[derive(Clone)]
pub struct ArcConfig {
    /// Where to listen; port 0 picks a free port, which is kept across down periods.
    pub listen: SocketAddr,
    /// The HMAC key deliveries are signed with.
    pub secret: String,
    /// The bearer token for progress reports to the gateway.
    pub token: String,
    /// The gateway's API base URL (e.g. `http://127.0.0.1:8080`); `None` sends no progress reports.
    pub gateway_api: Option<String>,
    /// The share (0.0–1.0) of new deliveries answered 503 although the mode is `Accept`.
    pub fail_share: f64,
    /// The `Retry-After` header (seconds) on every 503, when set.
    pub retry_after_s: Option<u64>,
    /// From acceptance until the operator answers.
    pub answer_delay: Delay,
    /// From the answer until the operator resolves the alarm.
    pub resolve_delay: Delay,
    /// Seeds the random number generators, so a run can be repeated.
    pub seed: u64,
    /// Attempts per progress report (the first and the retries after a connection error or 5xx); at least 1.
    pub progress_attempts: u32,
    /// The pause before the first retry of a progress report; it doubles each time, up to 10 s.
    pub progress_backoff: Duration,
    /// Keeps every accepted delivery and progress report, for [`ArcSim::accepted`],
    /// [`ArcSim::wait_for_alarm`] and [`ArcSim::progress_reports`]. Without them only the counters and the
    /// accepted ids are kept, so that a long run's memory grows by about 100 bytes a delivery instead of
    /// 1.2 KB (with a 450-byte body); the command-line ARC, which only prints its counters, runs without them.
    pub keep_records: bool,
}

impl ArcConfig {
    /// Listens on `127.0.0.1:0`, no gateway, `fail_share` 0, no `Retry-After`, answer after `fixed:1s`,
    /// resolve after `fixed:5s`, seed 1, six attempts per progress report starting 500 ms apart, records kept.
    pub fn new(secret: impl Into<String>, token: impl Into<String>) -> ArcConfig {
        ArcConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            secret: secret.into(),
            token: token.into(),
            gateway_api: None,
            fail_share: 0.0,
            retry_after_s: None,
            answer_delay: Delay::Fixed(Duration::from_secs(1)),
            resolve_delay: Delay::Fixed(Duration::from_secs(5)),
            seed: 1,
            progress_attempts: 6,
            progress_backoff: Duration::from_millis(500),
            keep_records: true,
        }
    }

    /// Every problem with this configuration, for one message.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&self.fail_share) {
            problems.push(format!(
                "fail_share {} is not between 0 and 1",
                self.fail_share
            ));
        }
        if let Some(problem) = self.answer_delay.problem() {
            problems.push(format!("answer_delay: {problem}"));
        }
        if let Some(problem) = self.resolve_delay.problem() {
            problems.push(format!("resolve_delay: {problem}"));
        }
        if let Some(base) = &self.gateway_api {
            if let Err(problem) = gateway_base(base) {
                problems.push(format!("gateway_api: {problem}"));
            }
        }
        problems
    }
}

/// Leaves the secret and the token out.
impl fmt::Debug for ArcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArcConfig")
            .field("listen", &self.listen)
            .field("secret", &"<redacted>")
            .field("token", &"<redacted>")
            .field("gateway_api", &self.gateway_api)
            .field("fail_share", &self.fail_share)
            .field("retry_after_s", &self.retry_after_s)
            .field("answer_delay", &self.answer_delay)
            .field("resolve_delay", &self.resolve_delay)
            .field("seed", &self.seed)
            .field("progress_attempts", &self.progress_attempts)
            .field("progress_backoff", &self.progress_backoff)
            .field("keep_records", &self.keep_records)
            .finish()
    }
}

fn gateway_base(base: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(base).map_err(|err| format!("{base:?} is not a URL: {err}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(format!("{base:?} is not an http(s) base URL"));
    }
    Ok(url)
}

/// How the simulator answers deliveries that pass the signature and body checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 for a new alarm (or 503 for `fail_share` of them), 409 for one already accepted.
    Accept,
    /// 503 for everything, with `Retry-After` when configured.
    Unavailable,
    /// This status for everything (e.g. 400, 422: a permanent rejection).
    Reject(u16),
    /// The port is closed: connections are refused.
    Down,
}

/// One accepted delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// The alarm id (the body's `alarm_id`, equal to the `Idempotency-Key` header).
    pub alarm_id: String,
    /// The whole body.
    pub body: Value,
    /// Every request header, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// When the simulator received it.
    pub received_at: DateTime<Utc>,
    /// The body's `attempt`.
    pub attempt: u64,
    /// The body's `fallback`.
    pub fallback: bool,
}

impl Accepted {
    /// The first value of a header, by its lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The state a progress report moves an alarm to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProgressState {
    Answered,
    Resolved,
}

impl ProgressState {
    /// The wire name: `answered` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProgressState::Answered => "answered",
            ProgressState::Resolved => "resolved",
        }
    }

    fn outcome(self) -> &'static str {
        match self {
            ProgressState::Answered => "operator spoke to client",
            ProgressState::Resolved => "resolved",
        }
    }
}

impl fmt::Display for ProgressState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One progress report, after its last attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressReport {
    pub alarm_id: String,
    pub state: ProgressState,
    /// The HTTP status of the last attempt; `None` when it got no response.
    pub status: Option<u16>,
}

/// Counters of everything the simulator saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArcStats {
    /// Requests to the delivery endpoint.
    pub received: u64,
    /// New alarms answered 200.
    pub accepted: u64,
    /// Alarms already accepted, answered 409.
    pub duplicates: u64,
    /// Answered 503 (mode `Unavailable`, or the `fail_share`).
    pub unavailable: u64,
    /// Answered with the status of mode `Reject`.
    pub rejected: u64,
    /// Answered 401: timestamp or signature missing, stale or wrong.
    pub bad_signature: u64,
    /// Answered 400: no `Idempotency-Key`, not JSON, or a body that breaks the contract.
    pub bad_body: u64,
    /// Progress reports the gateway answered 2xx.
    pub progress_sent: u64,
    /// Progress reports given up: a 4xx (or other non-2xx, non-5xx), or every attempt failed.
    pub progress_failed: u64,
}

/// `received=N accepted=N duplicates=N unavailable=N rejected=N bad_signature=N progress_sent=N
/// progress_failed=N`, the CLI's summary line after `arc: `.
impl fmt::Display for ArcStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received={} accepted={} duplicates={} unavailable={} rejected={} bad_signature={} \
             progress_sent={} progress_failed={}",
            self.received,
            self.accepted,
            self.duplicates,
            self.unavailable,
            self.rejected,
            self.bad_signature,
            self.progress_sent,
            self.progress_failed
        )
    }
}

/// A running simulator. Cheap to clone; every clone controls the same server.
#[derive(Clone)]
pub struct ArcSim {
    inner: Arc<Inner>,
}

struct Inner {
    /// How long each delivery waits before it is decided (a slow ARC), in
    /// milliseconds; 0 answers at once.
    response_delay_ms: std::sync::atomic::AtomicU64,
    /// The bound address, kept so that leaving `Down` binds the same port.
    addr: SocketAddr,
    /// The HMAC key for deliveries.
    secret: Vec<u8>,
    /// The bearer token for progress reports.
    token: String,
    /// The gateway API base; `None` disables progress reports.
    gateway: Option<reqwest::Url>,
    /// `Retry-After` on 503s.
    retry_after: Option<HeaderValue>,
    fail_share: f64,
    answer_delay: Delay,
    resolve_delay: Delay,
    progress_attempts: u32,
    progress_backoff: Duration,
    keep_records: bool,
    /// Sends progress reports; never follows redirects.
    client: reqwest::Client,
    /// Mode, records, counters and generators (see the module header).
    state: Mutex<State>,
    /// Bumped after every change to the records, for the waiters.
    version: watch::Sender<u64>,
    /// The listener's lifecycle.
    listening: tokio::sync::Mutex<Listening>,
    /// Pending progress reports, aborted at shutdown.
    tasks: Mutex<Tasks>,
}

struct State {
    mode: Mode,
    accepted: Vec<Record>,
    accepted_ids: IdSet,
    stats: ArcStats,
    progress: Vec<ProgressReport>,
    /// Draws the `fail_share` answers.
    fail_rng: StdRng,
    /// Draws the operator delays.
    delay_rng: StdRng,
}

/// One accepted delivery as kept: the body and headers as received, made into
/// an [`Accepted`] only when asked for. A parsed body and a string per header
/// cost dozens of allocations a delivery, and the memory they take grows with
/// every delivery of a load run.
#[derive(Clone)]
struct Record {
    alarm_id: String,
    body: Box<[u8]>,
    /// `name: value` lines, one per header, in the order received.
    headers: String,
    received_at: DateTime<Utc>,
    attempt: u64,
    fallback: bool,
}

impl Record {
    fn new(
        delivery: check::Delivery,
        body: &[u8],
        headers: &HeaderMap,
        received_at: DateTime<Utc>,
    ) -> Record {
        let mut lines = String::with_capacity(256);
        for (name, value) in headers {
            lines.push_str(name.as_str());
            lines.push_str(": ");
            // Header values never hold a line break (hyper refuses them).
            lines.push_str(&String::from_utf8_lossy(value.as_bytes()));
            lines.push('\n');
        }
        Record {
            alarm_id: delivery.alarm_id,
            body: body.into(),
            headers: lines,
            received_at,
            attempt: delivery.attempt,
            fallback: delivery.fallback,
        }
    }

    fn to_accepted(&self) -> Accepted {
        Accepted {
            alarm_id: self.alarm_id.clone(),
            // The body passed the checks, so it parses.
            body: serde_json::from_slice(&self.body).unwrap_or(Value::Null),
            headers: self
                .headers
                .lines()
                .filter_map(|line| line.split_once(": "))
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
            received_at: self.received_at,
            attempt: self.attempt,
            fallback: self.fallback,
        }
    }
}

/// The accepted alarm ids with the time each was first accepted, spread
/// over [`ID_SHARDS`] maps. A hash map grows
/// by moving every id at once, under the state lock that every delivery
/// waits for: one set of 917,504 ids took 170–190 ms to grow, long enough to
/// show in a load bench's p99. Shards of equal shares would all grow within
/// the same second or so; shard `i` takes a share in proportion to
/// `2^(i/64)`, so the shards reach their growth points one at a time, 64 of
/// them spread evenly over each doubling of the set.
struct IdSet {
    shards: Vec<HashMap<String, DateTime<Utc>>>,
    /// Shard `i` takes the ids whose hash is at most `bounds[i]` (and above
    /// the bound before it).
    bounds: Vec<u64>,
}

const ID_SHARDS: usize = 64;

impl Default for IdSet {
    fn default() -> IdSet {
        let weight = |i: usize| (i as f64 / ID_SHARDS as f64).exp2();
        let total: f64 = (0..ID_SHARDS).map(weight).sum();
        let mut below = 0.0;
        let mut bounds: Vec<u64> = (0..ID_SHARDS)
            .map(|i| {
                below += weight(i) / total;
                // The cast saturates at u64::MAX.
                (below * u64::MAX as f64) as u64
            })
            .collect();
        if let Some(last) = bounds.last_mut() {
            *last = u64::MAX;
        }
        IdSet {
            shards: (0..ID_SHARDS).map(|_| HashMap::new()).collect(),
            bounds,
        }
    }
}

impl IdSet {
    fn shard(&self, id: &str) -> usize {
        let mut hasher = DefaultHasher::new();
        id.hash(&mut hasher);
        let hash = hasher.finish();
        // The last bound is u64::MAX, so every hash has a shard.
        self.bounds.partition_point(|&bound| bound < hash)
    }

    fn contains(&self, id: &str) -> bool {
        self.shards[self.shard(id)].contains_key(id)
    }

    /// When `id` was first accepted.
    fn accepted_at(&self, id: &str) -> Option<DateTime<Utc>> {
        self.shards[self.shard(id)].get(id).copied()
    }

    /// Adds `id`, accepted at `at`; an id already there keeps its first time.
    fn insert(&mut self, id: String, at: DateTime<Utc>) {
        let shard = self.shard(&id);
        self.shards[shard].entry(id).or_insert(at);
    }

    fn to_set(&self) -> HashSet<String> {
        let mut set = HashSet::with_capacity(self.shards.iter().map(HashMap::len).sum());
        set.extend(self.shards.iter().flat_map(HashMap::keys).cloned());
        set
    }
}

struct Listening {
    /// The server while the port is open.
    current: Option<Server>,
    /// Servers whose listener is closed but whose connections have not all finished yet.
    draining: Vec<JoinHandle<()>>,
    /// Set by [`ArcSim::shutdown`]: the port stays closed.
    shut_down: bool,
}

struct Tasks {
    set: JoinSet<()>,
    /// Set at shutdown: no new tasks start.
    closed: bool,
}

/// One listener and its connections, served by hyper's HTTP/1 server.
///
/// Straight on hyper rather than through a web framework: the simulator shares
/// the machine with the gateway in the load bench, and a framework's boxed
/// handler future (an allocation of over a kilobyte a request) and routing
/// took a tenth of the bench's time for the one route it has.
struct Server {
    /// Starts the graceful shutdown: stop accepting, finish open requests.
    stop: oneshot::Sender<()>,
    /// Resolves (with an error) when the listener is dropped, i.e. the port is closed.
    closed: oneshot::Receiver<()>,
    /// The accept loop, then the wait for open connections; aborting it
    /// aborts the connections too.
    task: JoinHandle<()>,
}

impl Server {
    fn spawn(listener: TcpListener, inner: Arc<Inner>) -> Server {
        let (stop, mut stop_rx) = oneshot::channel::<()>();
        let (dropped, closed) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let http = hyper::server::conn::http1::Builder::new();
            let graceful = GracefulShutdown::new();
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    // Either a stop or a dropped sender means: stop.
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            while connections.try_join_next().is_some() {}
                            let _ = stream.set_nodelay(true);
                            let inner = Arc::clone(&inner);
                            let service = service_fn(move |request| {
                                serve(Arc::clone(&inner), request)
                            });
                            let connection = graceful
                                .watch(http.serve_connection(TokioIo::new(stream), service));
                            connections.spawn(async move {
                                if let Err(err) = connection.await {
                                    debug!(error = %err, "ARC simulator connection ended with an error");
                                }
                            });
                        }
                        // Out of file descriptors and the like: pause rather than spin.
                        Err(err) => {
                            warn!(error = %err, "ARC simulator cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
            drop(listener);
            drop(dropped);
            graceful.shutdown().await;
            while connections.join_next().await.is_some() {}
        });
        Server { stop, closed, task }
    }

    /// Closes the port, gives open connections a moment to finish, and returns the task if they have not.
    async fn close(self) -> Option<JoinHandle<()>> {
        let Server {
            stop,
            closed,
            mut task,
        } = self;
        let _ = stop.send(());
        if tokio::time::timeout(CLOSE_GRACE, closed).await.is_err() {
            task.abort();
            return None;
        }
        match tokio::time::timeout(DRAIN_GRACE, &mut task).await {
            Ok(_) => None,
            Err(_) => Some(task),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

impl ArcSim {
    /// Validates the configuration, binds the listener and starts serving.
    ///
    /// # Errors
    /// `InvalidInput` listing every configuration problem; or the bind error.
    pub async fn start(config: ArcConfig) -> io::Result<ArcSim> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(invalid_input(problems.join("; ")));
        }
        let gateway = config
            .gateway_api
            .as_deref()
            .map(gateway_base)
            .transpose()
            .map_err(invalid_input)?;
        let retry_after = config.retry_after_s.map(HeaderValue::from);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(PROGRESS_TIMEOUT)
            .build()
            .map_err(io::Error::other)?;

        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            response_delay_ms: std::sync::atomic::AtomicU64::new(0),
            addr,
            secret: config.secret.into_bytes(),
            token: config.token,
            gateway,
            retry_after,
            fail_share: config.fail_share,
            answer_delay: config.answer_delay,
            resolve_delay: config.resolve_delay,
            progress_attempts: config.progress_attempts.max(1),
            progress_backoff: config.progress_backoff,
            keep_records: config.keep_records,
            client,
            state: Mutex::new(State {
                mode: Mode::Accept,
                accepted: Vec::new(),
                accepted_ids: IdSet::default(),
                stats: ArcStats::default(),
                progress: Vec::new(),
                fail_rng: StdRng::seed_from_u64(config.seed),
                delay_rng: StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15),
            }),
            version: watch::Sender::new(0),
            listening: tokio::sync::Mutex::new(Listening {
                current: None,
                draining: Vec::new(),
                shut_down: false,
            }),
            tasks: Mutex::new(Tasks {
                set: JoinSet::new(),
                closed: false,
            }),
        });
        let server = Server::spawn(listener, Arc::clone(&inner));
        inner.listening.lock().await.current = Some(server);
        info!(%addr, "ARC simulator listening");
        Ok(ArcSim { inner })
    }

    /// The bound address (the port stays the same across down periods).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The delivery URL, `http://{addr}/alarms`.
    pub fn url(&self) -> String {
        format!("http://{}{ALARMS_PATH}", self.inner.addr)
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        lock(&self.inner.state).mode
    }

    /// Makes every delivery wait `delay` before it is decided (a slow ARC);
    /// `Duration::ZERO` answers at once again.
    pub fn set_response_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.inner
            .response_delay_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes how deliveries are answered. `Down` returns once the port refuses connections (open
    /// connections get up to a second to finish their request); leaving `Down` binds the same address again.
    ///
    /// # Errors
    /// `InvalidInput` for `Reject` with a code that is not an HTTP status (100–999); the bind error when the
    /// port cannot be taken again (the mode stays `Down`); an error after [`ArcSim::shutdown`].
    pub async fn set_mode(&self, mode: Mode) -> io::Result<()> {
        if let Mode::Reject(code) = mode {
            StatusCode::from_u16(code)
                .map_err(|_| invalid_input(format!("{code} is not an HTTP status")))?;
        }
        let mut listening = self.inner.listening.lock().await;
        if listening.shut_down {
            return Err(io::Error::other("the ARC simulator has been shut down"));
        }
        listening.draining.retain(|task| !task.is_finished());
        if mode == Mode::Down {
            // First the mode, so requests still in flight on closing connections get 503.
            lock(&self.inner.state).mode = Mode::Down;
            if let Some(server) = listening.current.take() {
                listening.draining.extend(server.close().await);
            }
        } else {
            if listening.current.is_none() {
                let listener = TcpListener::bind(self.inner.addr).await?;
                listening.current = Some(Server::spawn(listener, Arc::clone(&self.inner)));
            }
            lock(&self.inner.state).mode = mode;
        }
        info!(?mode, addr = %self.inner.addr, "ARC simulator mode changed");
        Ok(())
    }

    /// Waits `after`, goes `Down` for `down_for`, then returns to the mode it had before (`Accept` if that
    /// was `Down`).
    ///
    /// # Errors
    /// As [`ArcSim::set_mode`].
    pub async fn down_period(&self, after: Duration, down_for: Duration) -> io::Result<()> {
        tokio::time::sleep(after).await;
        let before = self.mode();
        self.set_mode(Mode::Down).await?;
        tokio::time::sleep(down_for).await;
        let back = if before == Mode::Down {
            Mode::Accept
        } else {
            before
        };
        self.set_mode(back).await
    }

    /// Every accepted delivery, in the order accepted (none when [`ArcConfig::keep_records`] is off).
    pub fn accepted(&self) -> Vec<Accepted> {
        let records = lock(&self.inner.state).accepted.clone();
        records.iter().map(Record::to_accepted).collect()
    }

    /// The ids of every accepted alarm.
    pub fn accepted_ids(&self) -> HashSet<String> {
        lock(&self.inner.state).accepted_ids.to_set()
    }

    /// When each of `alarm_ids` was first accepted, in their order (`None`
    /// for one never accepted), read at once. Kept with or without
    /// [`ArcConfig::keep_records`], at about 100 bytes an accepted alarm: a
    /// load run that needs each alarm's time to the ARC keeps no records.
    pub fn accepted_at<'a>(
        &self,
        alarm_ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<Option<DateTime<Utc>>> {
        let state = lock(&self.inner.state);
        alarm_ids
            .into_iter()
            .map(|id| state.accepted_ids.accepted_at(id))
            .collect()
    }

    /// The counters so far.
    pub fn stats(&self) -> ArcStats {
        lock(&self.inner.state).stats
    }

    /// Every finished progress report, in the order finished (none when [`ArcConfig::keep_records`] is off).
    pub fn progress_reports(&self) -> Vec<ProgressReport> {
        lock(&self.inner.state).progress.clone()
    }

    /// Waits until at least `n` deliveries have been accepted; false on timeout.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |state| state.stats.accepted >= n as u64)
            .await
    }

    /// Waits until `alarm_id` has been accepted and returns its record; `None` on timeout, and always when
    /// [`ArcConfig::keep_records`] is off.
    pub async fn wait_for_alarm(&self, alarm_id: &str, timeout: Duration) -> Option<Accepted> {
        let found = |state: &State| {
            state
                .accepted
                .iter()
                .find(|a| a.alarm_id == alarm_id)
                .map(Record::to_accepted)
        };
        if self
            .wait_until(timeout, |state| found(state).is_some())
            .await
        {
            found(&lock(&self.inner.state))
        } else {
            None
        }
    }

    /// Waits until at least `n` progress reports have finished (sent or given up); false on timeout.
    pub async fn wait_for_progress(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |state| {
            state.stats.progress_sent + state.stats.progress_failed >= n as u64
        })
        .await
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let mut version = self.inner.version.subscribe();
        let wait = version.wait_for(|_| done(&lock(&self.inner.state)));
        let result = tokio::time::timeout(timeout, wait).await;
        matches!(result, Ok(Ok(_)))
    }

    /// Closes the port for good and cancels the pending progress reports.
    pub async fn shutdown(self) {
        {
            let mut listening = self.inner.listening.lock().await;
            listening.shut_down = true;
            if let Some(server) = listening.current.take() {
                listening.draining.extend(server.close().await);
            }
            for task in listening.draining.drain(..) {
                task.abort();
            }
        }
        let mut pending = {
            let mut tasks = lock(&self.inner.tasks);
            tasks.closed = true;
            std::mem::take(&mut tasks.set)
        };
        pending.shutdown().await;
        info!(addr = %self.inner.addr, "ARC simulator stopped");
    }
}

/// What the simulator decided about one request.
enum Outcome {
    Accepted {
        alarm_id: String,
        attempt: u64,
        fallback: bool,
        /// The operator's delays when progress is reported.
        delays: Option<(Duration, Duration)>,
    },
    Duplicate {
        alarm_id: String,
    },
    Unavailable {
        alarm_id: String,
    },
    Rejected {
        alarm_id: String,
        status: StatusCode,
    },
    BadSignature(&'static str),
    BadRequest(Vec<String>),
}

type Response = hyper::Response<Full<Bytes>>;

/// A response with a body of JSON.
fn json_response(status: StatusCode, body: &Value) -> Response {
    fixed(status, Bytes::from(body.to_string()))
}

/// A response with `body`, sent as JSON.
fn fixed(status: StatusCode, body: Bytes) -> Response {
    let mut response = hyper::Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Every request: `POST /alarms` is a delivery; other methods on that path
/// are 405 and other paths 404, both without a body.
async fn serve(
    inner: Arc<Inner>,
    request: Request<Incoming>,
) -> Result<Response, std::convert::Infallible> {
    let bare = |status: StatusCode| {
        let mut response = hyper::Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != ALARMS_PATH {
        return Ok(bare(StatusCode::NOT_FOUND));
    }
    if request.method() != Method::POST {
        let mut response = bare(StatusCode::METHOD_NOT_ALLOWED);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Ok(response);
    }
    let (head, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return Ok(bare(StatusCode::PAYLOAD_TOO_LARGE));
        }
        // The sender went away mid-body: nothing was delivered.
        Err(err) => {
            debug!(error = %err, "delivery body not read");
            return Ok(bare(StatusCode::BAD_REQUEST));
        }
    };
    Ok(deliver(inner, &head.headers, body).await)
}

/// The delivery endpoint.
async fn deliver(inner: Arc<Inner>, headers: &HeaderMap, body: Bytes) -> Response {
    // A slow ARC: the delivery is decided only after the delay, so a sender
    // that gives up (or dies) meanwhile has delivered nothing.
    let delay = inner
        .response_delay_ms
        .load(std::sync::atomic::Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let now = Utc::now();
    let checked = check::check(headers, &body, &inner.secret, now.timestamp());
    let outcome = inner.decide(checked, headers, &body, now);
    inner.respond(outcome)
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Decides the answer and records it, in one step under the state lock.
    fn decide(
        &self,
        checked: Result<check::Delivery, check::Refusal>,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Outcome {
        let mut state = self.state();
        state.stats.received += 1;
        let delivery = match checked {
            Ok(delivery) => delivery,
            Err(check::Refusal::Signature(reason)) => {
                state.stats.bad_signature += 1;
                return Outcome::BadSignature(reason);
            }
            Err(check::Refusal::Request(problems)) => {
                state.stats.bad_body += 1;
                return Outcome::BadRequest(problems);
            }
        };
        let alarm_id = delivery.alarm_id.clone();
        let mode = state.mode;
        match mode {
            // A connection still open while the port goes down.
            Mode::Down | Mode::Unavailable => {
                state.stats.unavailable += 1;
                Outcome::Unavailable { alarm_id }
            }
            Mode::Reject(code) => {
                state.stats.rejected += 1;
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
                Outcome::Rejected { alarm_id, status }
            }
            Mode::Accept if state.accepted_ids.contains(&alarm_id) => {
                state.stats.duplicates += 1;
                Outcome::Duplicate { alarm_id }
            }
            Mode::Accept => {
                let fail_share = self.fail_share;
                if fail_share > 0.0 && state.fail_rng.gen_bool(fail_share) {
                    state.stats.unavailable += 1;
                    return Outcome::Unavailable { alarm_id };
                }
                let delays = self.gateway.is_some().then(|| {
                    let answer = self.answer_delay.sample(&mut state.delay_rng);
                    let resolve = self.resolve_delay.sample(&mut state.delay_rng);
                    (answer, resolve)
                });
                state.stats.accepted += 1;
                state.accepted_ids.insert(alarm_id.clone(), now);
                let (attempt, fallback) = (delivery.attempt, delivery.fallback);
                if self.keep_records {
                    state
                        .accepted
                        .push(Record::new(delivery, body, headers, now));
                }
                drop(state);
                self.version.send_modify(|v| *v += 1);
                Outcome::Accepted {
                    alarm_id,
                    attempt,
                    fallback,
                    delays,
                }
            }
        }
    }

    /// Logs the outcome, starts the progress reports of a new alarm, and builds the response.
    fn respond(self: &Arc<Self>, outcome: Outcome) -> Response {
        match outcome {
            Outcome::Accepted {
                alarm_id,
                attempt,
                fallback,
                delays,
            } => {
                info!(%alarm_id, attempt, fallback, "delivery accepted");
                if let Some((answer, resolve)) = delays {
                    self.spawn_progress(alarm_id, answer, resolve);
                }
                // The commonest answer, written once.
                fixed(
                    StatusCode::OK,
                    Bytes::from_static(br#"{"status":"accepted"}"#),
                )
            }
            Outcome::Duplicate { alarm_id } => {
                info!(%alarm_id, "delivery of an alarm already accepted: 409");
                json_response(StatusCode::CONFLICT, &json!({"status": "duplicate"}))
            }
            Outcome::Unavailable { alarm_id } => {
                info!(%alarm_id, "delivery answered unavailable: 503");
                let mut response = json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "unavailable"}),
                );
                if let Some(retry_after) = &self.retry_after {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, retry_after.clone());
                }
                response
            }
            Outcome::Rejected { alarm_id, status } => {
                info!(%alarm_id, status = status.as_u16(), "delivery rejected");
                json_response(status, &json!({"status": "rejected"}))
            }
            Outcome::BadSignature(reason) => {
                info!(reason, "delivery refused: 401");
                json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "bad signature", "reason": reason}),
                )
            }
            Outcome::BadRequest(problems) => {
                info!(?problems, "delivery refused: 400");
                json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "bad request", "problems": problems}),
                )
            }
        }
    }

    fn spawn_progress(self: &Arc<Self>, alarm_id: String, answer: Duration, resolve: Duration) {
        let mut tasks = lock(&self.tasks);
        if tasks.closed {
            return;
        }
        // Reap finished reports so the set holds only pending ones.
        while tasks.set.try_join_next().is_some() {}
        let inner = Arc::clone(self);
        tasks.set.spawn(async move {
            tokio::time::sleep(answer).await;
            inner.report(&alarm_id, ProgressState::Answered).await;
            tokio::time::sleep(resolve).await;
            inner.report(&alarm_id, ProgressState::Resolved).await;
        });
    }

    /// Sends one progress report, retrying connection errors and 5xx with a doubling backoff, and records it.
    async fn report(&self, alarm_id: &str, state: ProgressState) {
        let Some(base) = &self.gateway else {
            return;
        };
        let mut url = base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments
                .pop_if_empty()
                .extend(["v1", "alarms", alarm_id, "progress"]);
        }
        let at = wire_time(Utc::now());
        let body = json!({"state": state.as_str(), "at": at, "outcome": state.outcome()});

        let mut backoff = self.progress_backoff;
        let mut status = None;
        let mut sent = false;
        for attempt in 1..=self.progress_attempts {
            let result = self
                .client
                .post(url.clone())
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await;
            let retriable = match result {
                Ok(response) => {
                    let code = response.status();
                    status = Some(code.as_u16());
                    sent = code.is_success();
                    code.is_server_error()
                }
                Err(err) => {
                    status = None;
                    debug!(%alarm_id, %state, attempt, error = %err, "progress report failed");
                    true
                }
            };
            if !retriable || attempt == self.progress_attempts {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_PROGRESS_BACKOFF);
        }

        if sent {
            info!(%alarm_id, %state, "progress reported");
        } else {
            warn!(%alarm_id, %state, ?status, "progress report given up");
        }
        let mut record = self.state();
        if sent {
            record.stats.progress_sent += 1;
        } else {
            record.stats.progress_failed += 1;
        }
        if self.keep_records {
            record.progress.push(ProgressReport {
                alarm_id: alarm_id.to_owned(),
                state,
                status,
            });
        }
        drop(record);
        self.version.send_modify(|v| *v += 1);
    }
}

/// A timestamp in the wire form: RFC 3339, UTC, milliseconds, `Z`.
pub fn wire_time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_ids_spread_over_shards_of_growing_shares() {
        let mut ids = IdSet::default();
        let start = Utc::now();
        for i in 0..64_000 {
            ids.insert(
                format!("alarm-{i}"),
                start + chrono::Duration::milliseconds(i),
            );
        }
        assert!(ids.contains("alarm-0") && ids.contains("alarm-63999"));
        assert!(!ids.contains("alarm-64000"));
        // A second acceptance keeps the first time.
        ids.insert("alarm-7".to_owned(), start + chrono::Duration::seconds(600));
        assert_eq!(
            ids.accepted_at("alarm-7"),
            Some(start + chrono::Duration::milliseconds(7))
        );
        assert_eq!(ids.accepted_at("alarm-64000"), None);
        assert_eq!(ids.to_set().len(), 64_000);
        // Shares run from 1 to nearly 2: the last shard holds about twice
        // the first (1,000 × 0.69 and × 1.38 on average).
        let first = ids.shards[0].len();
        let last = ids.shards[ID_SHARDS - 1].len();
        assert!((550..850).contains(&first), "first shard {first}");
        assert!((1_200..1_600).contains(&last), "last shard {last}");
        assert!(ids.shards.iter().all(|s| !s.is_empty()));
    }

    #[test]
    fn stats_line_has_the_cli_format() {
        let stats = ArcStats {
            received: 9,
            accepted: 5,
            duplicates: 1,
            unavailable: 1,
            rejected: 1,
            bad_signature: 1,
            bad_body: 0,
            progress_sent: 10,
            progress_failed: 0,
        };
        assert_eq!(
            stats.to_string(),
            "received=9 accepted=5 duplicates=1 unavailable=1 rejected=1 bad_signature=1 \
             progress_sent=10 progress_failed=0"
        );
    }

    #[test]
    fn config_problems_are_all_reported_and_secrets_hidden() {
        let mut config = ArcConfig::new("very-secret", "very-token");
        config.fail_share = 1.5;
        config.gateway_api = Some("not a url".to_owned());
        config.answer_delay = Delay::Uniform {
            min: Duration::from_secs(2),
            max: Duration::from_secs(1),
        };
        assert_eq!(config.problems().len(), 3, "{:?}", config.problems());
        let debug = format!("{config:?}");
        assert!(!debug.contains("very-secret") && !debug.contains("very-token"));
    }

    #[test]
    fn wire_time_has_millis_and_z() {
        let at = DateTime::from_timestamp_millis(1_795_000_000_123).unwrap();
        let text = wire_time(at);
        assert!(is_wire_timestamp(&text), "{text}");
        assert!(text.ends_with(".123Z"));
    }
}
