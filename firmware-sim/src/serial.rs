//! The serial simulator: an alarm receiver (`surgard`, `contact-id`) or a line of dispersed units
//! (`telecare-line`) writing alarm lines to a pseudo-terminal that the gateway opens as its serial port, by
//! the serial wire contracts of DESIGN.md.
//!
//! Design:
//! - [`PtyLink`] is the port: a pseudo-terminal pair with a symlink to its slave end at the path the
//!   gateway's configuration names. Unplugging closes it; replugging makes a new one at the same path.
//! - One task drives the port. It offers new lines at the configured rate (drawn from a seeded generator
//!   with the fleet's mix of classes, so a seed repeats a run), writes no faster than the baud rate allows,
//!   reads the answers, and re-sends lines that were refused or not answered. It never awaits anything but
//!   the port, the clock and its commands, and it keeps no lock across an await.
//! - The [`ledger`] decides, without I/O, what to write next and which line an answer settles; one mutex
//!   guards it so the handle can read counters and records. Waiters watch a version counter bumped after
//!   every change ([`SerialSim::wait_acked`], [`SerialSim::drain`]).
//! - A line is never dropped: it waits through NAKs, silence, unplugs and broken ports until it is
//!   acknowledged.
//!
//! What goes over the line:
//! - `surgard`: Sur-Gard receiver automation output, each line ended by DC4 (0x14): Contact ID
//!   `5RRL 18AAAAQXYZGGCCC` (`Q` as `E`, `R`, `P`), SIA `3RRL    AAAAAAXXZZZZ` (about 30 % of lines of classes
//!   that have a SIA code; the account right-aligned in six characters) and, when configured, the heartbeat
//!   `1RRL` + 11 spaces + `@` + 4 spaces. Answers are single bytes, ACK 0x06 or NAK 0x15, in order.
//! - `contact-id`: raw 16-digit Contact ID messages `AAAA18QXYZGGCCCS` ended by CR LF; answers as above.
//! - `telecare-line`: `ALARM <unit> <seq> <code> [ts=…] [zone=…]` and `HEARTBEAT <unit> <seq>`, ended by
//!   LF; answers `ACK <unit> <seq> [<alarm_id>]`, `NAK <unit> <seq> <reason>`, `NAK - - <reason>`.

mod ledger;
pub mod lines;
mod pty;

pub use pty::PtyLink;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::ledger::{Ledger, NewLine};
use self::lines::{LineCode, DC4};
use crate::arc::wire_time;
use crate::fleet::Mix;

/// The acknowledgement timeout of Sur-Gard receivers.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(4);
/// The most accounts or units: their numbers have four digits.
pub const MAX_ACCOUNTS: u32 = 9_999;
/// How far the line generator catches up after the window held it back: at most this much of its rate.
const MAX_CATCH_UP: Duration = Duration::from_secs(1);
/// The largest read from the port at once.
const READ_CHUNK: usize = 4_096;
/// How long [`SerialSim::stop`] waits for the task before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The line format of a simulated port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// Sur-Gard receiver automation output (Contact ID, SIA and heartbeat lines, DC4-terminated).
    Surgard,
    /// Raw 16-digit Contact ID messages, CR LF-terminated.
    ContactId,
    /// The line protocol of dispersed units, LF-terminated.
    TelecareLine,
}

impl LineFormat {
    pub const ALL: [LineFormat; 3] = [
        LineFormat::Surgard,
        LineFormat::ContactId,
        LineFormat::TelecareLine,
    ];

    /// The name on the command line and in the gateway's configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            LineFormat::Surgard => "surgard",
            LineFormat::ContactId => "contact-id",
            LineFormat::TelecareLine => "telecare-line",
        }
    }
}

impl fmt::Display for LineFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line format name that is none of `surgard`, `contact-id`, `telecare-line`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown line format {0:?} (expected surgard, contact-id or telecare-line)")]
pub struct LineFormatParseError(pub String);

impl FromStr for LineFormat {
    type Err = LineFormatParseError;

    fn from_str(s: &str) -> Result<LineFormat, LineFormatParseError> {
        LineFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| LineFormatParseError(s.to_owned()))
    }
}

/// How a simulated port is set up. [`Default`] gives the library defaults; change fields as needed.
#[derive(Debug, Clone)]
pub struct SerialSimConfig {
    pub format: LineFormat,
    /// The symlink path the gateway's configuration names; it is replaced by a link to the new device.
    pub link: PathBuf,
    /// Distinct lines offered per second; 0 offers them as fast as the window and the baud rate allow.
    pub rate: f64,
    /// Stop offering new lines after this many; `None` offers them until stopped.
    pub count: Option<u64>,
    /// Pacing: never more than `baud / 10` bytes a second (8N1 is 10 bits a byte), re-sends and garbage
    /// included.
    pub baud: u32,
    /// Lines awaiting an answer at once: 1 is stop-and-wait, what receivers do.
    pub window: usize,
    /// Silence this long after a line's latest copy re-sends it.
    pub ack_timeout: Duration,
    /// The share (0.0–1.0) of lines whose first copy is written right after a burst of garbage bytes.
    pub garbage_share: f64,
    /// Distinct accounts (`surgard`, `contact-id`) or units (`telecare-line`), 1–9999.
    pub accounts: u32,
    /// The Sur-Gard receiver number `RR` (0–99).
    pub receiver: u8,
    /// The Sur-Gard line number `L` (0–9).
    pub line: u8,
    /// A heartbeat this often: the receiver's (`surgard`), or each unit's, spread over the interval
    /// (`telecare-line`). `contact-id` has no heartbeat line.
    pub heartbeat: Option<Duration>,
    /// Seeds the line generator, so a run can be repeated.
    pub seed: u64,
}

impl Default for SerialSimConfig {
    /// `surgard` at `firmware-sim-serial` in the working directory, 5 lines a second without end, 9600
    /// baud, stop-and-wait with a 4 s timeout, no garbage, 50 accounts, receiver 1, line 1, no heartbeat,
    /// seed 1.
    fn default() -> SerialSimConfig {
        SerialSimConfig {
            format: LineFormat::Surgard,
            link: PathBuf::from("firmware-sim-serial"),
            rate: 5.0,
            count: None,
            baud: 9_600,
            window: 1,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            garbage_share: 0.0,
            accounts: 50,
            receiver: 1,
            line: 1,
            heartbeat: None,
            seed: 1,
        }
    }
}

impl SerialSimConfig {
    /// Every problem with this configuration, for one message.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.link.as_os_str().is_empty() || self.link.file_name().is_none() {
            problems.push(format!("link {:?} does not name a file", self.link));
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            problems.push(format!("rate {} is not a number >= 0", self.rate));
        }
        if self.baud < 10 {
            problems.push(format!(
                "baud {} is below 10 (one byte a second)",
                self.baud
            ));
        }
        if self.window == 0 {
            problems.push("window must be at least 1".to_owned());
        }
        if self.ack_timeout.is_zero() {
            problems.push("ack_timeout must be more than 0".to_owned());
        }
        if !(0.0..=1.0).contains(&self.garbage_share) {
            problems.push(format!(
                "garbage_share {} is not between 0 and 1",
                self.garbage_share
            ));
        }
        if !(1..=MAX_ACCOUNTS).contains(&self.accounts) {
            problems.push(format!(
                "accounts {} is not between 1 and {MAX_ACCOUNTS}",
                self.accounts
            ));
        }
        if self.receiver > 99 {
            problems.push(format!(
                "receiver {} does not fit two digits",
                self.receiver
            ));
        }
        if self.line > 9 {
            problems.push(format!("line {} does not fit one digit", self.line));
        }
        match self.heartbeat {
            Some(every) if every.is_zero() => {
                problems.push("heartbeat must be more than 0 when set".to_owned())
            }
            Some(_) if self.format == LineFormat::ContactId => {
                problems.push("contact-id has no heartbeat line".to_owned())
            }
            _ => {}
        }
        problems
    }
}

/// Counters of everything the simulator did and heard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SerialStats {
    /// Distinct lines written at least once.
    pub sent: u64,
    /// Distinct lines acknowledged.
    pub acked: u64,
    /// NAK answers received.
    pub naks: u64,
    /// Copies of lines written again (after a NAK, a timeout or a replug).
    pub resends: u64,
    /// Garbage bursts written.
    pub garbage_bursts: u64,
    /// Heartbeat lines written.
    pub heartbeats: u64,
    /// Heartbeats acknowledged.
    pub heartbeat_acks: u64,
    /// Deliberate unplugs.
    pub unplugs: u64,
    /// Lines offered and not yet acknowledged.
    pub waiting: u64,
}

/// `sent=N acked=N naks=N resends=N garbage=N unplugs=N waiting=N`, the CLI's summary line after `serial: `.
impl fmt::Display for SerialStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} acked={} naks={} resends={} garbage={} unplugs={} waiting={}",
            self.sent,
            self.acked,
            self.naks,
            self.resends,
            self.garbage_bursts,
            self.unplugs,
            self.waiting
        )
    }
}

/// The record of one distinct line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentLine {
    /// Its number, from 0, in the order offered.
    pub index: u64,
    /// The line without its terminator (and without any garbage written before it).
    pub text: String,
    /// The account as the line writes it (`1234`), or the unit id (`unit-0001`).
    pub account: String,
    /// The unit's sequence number (`telecare-line`).
    pub seq: Option<u32>,
    /// The code: Contact ID as qualifier digit and event (`1101`, also for Sur-Gard's `E101`), a SIA code
    /// (`MA`), or an event name (`fall`).
    pub code: String,
    /// Whether its class has priority 1.
    pub critical: bool,
    /// When its first copy was written; until then, when it was offered.
    pub first_sent: SystemTime,
    /// When the answer that settled it arrived.
    pub acked_at: Option<SystemTime>,
    /// The gateway's alarm id, from a `telecare-line` ACK.
    pub alarm_id: Option<String>,
    /// Copies written.
    pub sends: u32,
}

/// What the handle asks of the task.
enum Command {
    Unplug,
    Replug(oneshot::Sender<io::Result<()>>),
}

/// A running serial simulator. Dropping it stops it; [`SerialSim::stop`] also returns the final counters.
pub struct SerialSim {
    inner: Arc<Inner>,
}

struct Inner {
    /// The symlink every pseudo-terminal is reached by.
    link: PathBuf,
    /// Lines to offer in all, if limited.
    count: Option<u64>,
    /// The ledger (see the module header).
    ledger: Mutex<Ledger>,
    /// The device of the open port, if one is open.
    device: Mutex<Option<PathBuf>>,
    /// Bumped after every change, for the waiters.
    version: watch::Sender<u64>,
    commands: mpsc::UnboundedSender<Command>,
    /// Cancelled by [`SerialSim::stop_offering`]: no new lines.
    offering: CancellationToken,
    /// Cancelled by [`SerialSim::stop`]: the task ends.
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn stats(&self) -> SerialStats {
        lock(&self.ledger).stats()
    }
}

impl SerialSim {
    /// Validates the configuration, creates the pseudo-terminal and its symlink, and starts offering lines.
    ///
    /// # Errors
    /// `InvalidInput` listing every configuration problem; the error of [`PtyLink::create`] when the port
    /// cannot be made.
    pub async fn start(config: SerialSimConfig) -> io::Result<SerialSim> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                problems.join("; "),
            ));
        }
        let link = PtyLink::create(&config.link)?;
        let mut ledger = Ledger::new(config.format, config.window, config.ack_timeout);
        ledger.plugged();
        let (commands, receiver) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            link: config.link.clone(),
            count: config.count,
            ledger: Mutex::new(ledger),
            device: Mutex::new(Some(link.device().to_path_buf())),
            version: watch::Sender::new(0),
            commands,
            offering: CancellationToken::new(),
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        });
        info!(
            link = %config.link.display(),
            device = %link.device().display(),
            format = %config.format,
            rate = config.rate,
            window = config.window,
            baud = config.baud,
            "serial simulator started"
        );
        let driver = Driver::new(Arc::clone(&inner), link, receiver, &config);
        *lock(&inner.task) = Some(tokio::spawn(driver.run()));
        Ok(SerialSim { inner })
    }

    /// The symlink the gateway opens.
    pub fn link(&self) -> &Path {
        &self.inner.link
    }

    /// The device the symlink points at while the port is plugged in.
    pub fn device(&self) -> Option<PathBuf> {
        lock(&self.inner.device).clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> SerialStats {
        self.inner.stats()
    }

    /// The record of every distinct line offered, in order.
    pub fn records(&self) -> Vec<SentLine> {
        lock(&self.inner.ledger).records()
    }

    /// Closes the port now ("unplug"). Lines not yet acknowledged wait; nothing is dropped.
    pub fn unplug(&self) {
        let _ = self.inner.commands.send(Command::Unplug);
    }

    /// A new pseudo-terminal at the same link path (closing the current one, if any); unacknowledged lines
    /// are sent again (counted as resends).
    ///
    /// # Errors
    /// The error of [`PtyLink::create`]; the port then stays unplugged. `BrokenPipe` when the simulator has
    /// stopped.
    pub async fn replug(&self) -> io::Result<()> {
        let stopped = || io::Error::new(io::ErrorKind::BrokenPipe, "the serial simulator stopped");
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Replug(reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Stops offering new lines; unacknowledged ones go on being re-sent.
    pub fn stop_offering(&self) {
        self.inner.offering.cancel();
    }

    /// Waits until `count` lines were offered and all are acknowledged; false on timeout. Without a count,
    /// waits until every line offered so far is acknowledged.
    pub async fn wait_acked(&self, timeout: Duration) -> bool {
        let count = self.inner.count;
        self.wait_until(timeout, |offered, stats| {
            stats.waiting == 0 && count.is_none_or(|n| offered >= n)
        })
        .await
    }

    /// Waits until every line offered so far is acknowledged; false on timeout.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |_, stats| stats.waiting == 0)
            .await
    }

    /// Waits until `done` holds for the lines offered and the counters; false on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(u64, &SerialStats) -> bool,
    ) -> bool {
        let mut version = self.inner.version.subscribe();
        let wait = async {
            version
                .wait_for(|_| {
                    let ledger = lock(&self.inner.ledger);
                    done(ledger.offered(), &ledger.stats())
                })
                .await
                .is_ok()
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Stops, closes the port, and returns the final counters.
    pub async fn stop(self) -> SerialStats {
        self.inner.stop.cancel();
        let task = lock(&self.inner.task).take();
        if let Some(mut task) = task {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                warn!("the serial simulator did not stop in time; aborting it");
                task.abort();
            }
        }
        let stats = self.inner.stats();
        info!(%stats, "serial simulator stopped");
        stats
    }
}

impl Drop for SerialSim {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

/// Makes the lines and heartbeats, from the seed.
struct Generator {
    format: LineFormat,
    /// Draws everything about each line, in order, so the same seed gives the same lines.
    rng: StdRng,
    mix: Mix,
    accounts: u32,
    receiver: u8,
    line: u8,
    garbage_share: f64,
    /// Lines made per account, by account number − 1.
    made: Vec<u64>,
    /// `telecare-line`: the next alarm `seq` per unit.
    seqs: Vec<u32>,
    /// `telecare-line`: the latest heartbeat `seq` per unit.
    heartbeat_seqs: Vec<u32>,
    /// `telecare-line`: the unit whose heartbeat is next, from 0.
    heartbeat_turn: u32,
}

impl Generator {
    fn new(config: &SerialSimConfig) -> Generator {
        let units = config.accounts as usize;
        Generator {
            format: config.format,
            rng: StdRng::seed_from_u64(config.seed),
            mix: Mix::default(),
            accounts: config.accounts,
            receiver: config.receiver,
            line: config.line,
            garbage_share: config.garbage_share,
            made: vec![0; units],
            seqs: vec![1; units],
            heartbeat_seqs: vec![0; units],
            heartbeat_turn: 0,
        }
    }

    /// Line number `index` (from 0), offered at `wall`.
    fn make(&mut self, index: u64, wall: SystemTime) -> NewLine {
        let account = self.rng.gen_range(1..=self.accounts);
        let drawn = lines::draw(&mut self.rng, &self.mix, self.format);
        let slot = (account - 1) as usize;
        let n = self.made.get(slot).copied().unwrap_or(0);
        if let Some(made) = self.made.get_mut(slot) {
            *made += 1;
        }
        let (group, zone, sia_zone) = lines::numbers(account, n);
        let (qualifier, event) = match drawn.code {
            LineCode::ContactId { qualifier, event } => (qualifier, event),
            // `draw` gives Contact ID or SIA codes only for the receiver formats; this is never used there.
            LineCode::Sia(_) | LineCode::Event(_) => (lines::Qualifier::New, 100),
        };
        let (account_text, seq, text) = match self.format {
            LineFormat::Surgard => {
                let account_text = lines::account(account);
                let text = match drawn.code {
                    LineCode::Sia(code) => {
                        lines::surgard_sia(self.receiver, self.line, &account_text, code, sia_zone)
                    }
                    LineCode::ContactId { .. } | LineCode::Event(_) => lines::surgard_contact_id(
                        self.receiver,
                        self.line,
                        &account_text,
                        qualifier,
                        event,
                        group,
                        zone,
                    ),
                };
                (account_text, None, text)
            }
            LineFormat::ContactId => (
                lines::account(account),
                None,
                lines::contact_id_message(account, qualifier, event, group, zone),
            ),
            LineFormat::TelecareLine => {
                let unit = lines::unit(account);
                let seq = self.seqs.get(slot).copied().unwrap_or(1);
                if let Some(next) = self.seqs.get_mut(slot) {
                    *next = seq.checked_add(1).unwrap_or(1);
                }
                let ts = self
                    .rng
                    .gen_bool(lines::TS_SHARE)
                    .then(|| wire_time(Utc::now()));
                let zone = self
                    .rng
                    .gen_bool(lines::ZONE_SHARE)
                    .then(|| self.rng.gen_range(1..=32));
                let text =
                    lines::telecare_alarm(&unit, seq, &drawn.code.text(), ts.as_deref(), zone);
                (unit, Some(seq), text)
            }
        };
        let garbage = (self.garbage_share > 0.0 && self.rng.gen_bool(self.garbage_share))
            .then(|| lines::garbage(&mut self.rng));
        let mut bytes = text.clone().into_bytes();
        bytes.extend_from_slice(lines::terminator(self.format));
        NewLine {
            record: SentLine {
                index,
                text,
                account: account_text,
                seq,
                code: drawn.code.text(),
                critical: drawn.critical(),
                first_sent: wall,
                acked_at: None,
                alarm_id: None,
                sends: 0,
            },
            bytes,
            key: seq.map(|seq| (account, seq)),
            garbage,
        }
    }

    /// The next heartbeat with its terminator, and its unit number and `seq` on `telecare-line`.
    fn heartbeat(&mut self) -> (Vec<u8>, Option<(u32, u32)>) {
        match self.format {
            LineFormat::TelecareLine => {
                let slot = self.heartbeat_turn as usize;
                self.heartbeat_turn = (self.heartbeat_turn + 1) % self.accounts.max(1);
                let seq = match self.heartbeat_seqs.get_mut(slot) {
                    Some(seq) => {
                        *seq = seq.checked_add(1).unwrap_or(1);
                        *seq
                    }
                    None => 1,
                };
                let unit = slot as u32 + 1;
                let mut bytes = lines::telecare_heartbeat(&lines::unit(unit), seq).into_bytes();
                bytes.push(b'\n');
                (bytes, Some((unit, seq)))
            }
            LineFormat::Surgard | LineFormat::ContactId => {
                let mut bytes = lines::surgard_heartbeat(self.receiver, self.line).into_bytes();
                bytes.push(DC4);
                (bytes, None)
            }
        }
    }
}

/// What woke the task.
enum Event {
    Stop,
    Command(Option<Command>),
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
    Timer,
}

/// The task that owns the port.
struct Driver {
    inner: Arc<Inner>,
    /// The open port; `None` while unplugged.
    port: Option<PtyLink>,
    commands: mpsc::UnboundedReceiver<Command>,
    generator: Generator,
    /// Lines offered so far.
    offered: u64,
    /// The pause between new lines; `None` offers them as fast as the window allows.
    line_every: Option<Duration>,
    /// When the next new line is due.
    next_line: Instant,
    /// The pause between heartbeats, if any.
    heartbeat_every: Option<Duration>,
    next_heartbeat: Instant,
    /// How long one byte takes on the line.
    byte_time: Duration,
    /// The most bytes written at once: a tenth of a second's worth, so pacing stays smooth.
    max_write: usize,
    /// When the line is free for the next write.
    free_at: Instant,
}

impl Driver {
    fn new(
        inner: Arc<Inner>,
        port: PtyLink,
        commands: mpsc::UnboundedReceiver<Command>,
        config: &SerialSimConfig,
    ) -> Driver {
        let now = Instant::now();
        let line_every = (config.rate > 0.0)
            .then(|| Duration::try_from_secs_f64(1.0 / config.rate).unwrap_or(Duration::MAX));
        let heartbeat_every = config.heartbeat.map(|every| match config.format {
            LineFormat::TelecareLine => every / config.accounts.max(1),
            LineFormat::Surgard | LineFormat::ContactId => every,
        });
        let bytes_per_second = config.baud / 10;
        Driver {
            inner,
            port: Some(port),
            commands,
            generator: Generator::new(config),
            offered: 0,
            line_every,
            next_line: now,
            heartbeat_every: heartbeat_every.map(|every| every.max(Duration::from_millis(1))),
            next_heartbeat: now + heartbeat_every.unwrap_or_default(),
            byte_time: Duration::from_secs(1) / bytes_per_second.max(1),
            max_write: (bytes_per_second / 10).max(1) as usize,
            free_at: now,
        }
    }

    /// Whether new lines may still be offered.
    fn offering(&self) -> bool {
        !self.inner.offering.is_cancelled() && self.inner.count.is_none_or(|n| self.offered < n)
    }

    async fn run(mut self) {
        let mut buffer = vec![0; READ_CHUNK];
        loop {
            let now = Instant::now();
            let (deadline, chunk) = self.prepare(now);
            self.inner.changed();
            let can_write = chunk.is_some() && self.free_at <= now;
            let event = {
                let (reader, writer) = match self.port.as_mut().map(PtyLink::halves) {
                    Some((reader, writer)) => (Some(reader), Some(writer)),
                    None => (None, None),
                };
                let read = async {
                    match reader {
                        Some(reader) => reader.read(&mut buffer).await,
                        None => std::future::pending().await,
                    }
                };
                let write = async {
                    match (writer, &chunk) {
                        (Some(writer), Some(chunk)) if can_write => writer.write(chunk).await,
                        _ => std::future::pending().await,
                    }
                };
                let sleep = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    () = self.inner.stop.cancelled() => Event::Stop,
                    command = self.commands.recv() => Event::Command(command),
                    read = read => Event::Read(read),
                    written = write => Event::Wrote(written),
                    () = sleep => Event::Timer,
                }
            };
            match event {
                Event::Stop | Event::Command(None) => break,
                Event::Command(Some(Command::Unplug)) => self.unplug(true),
                Event::Command(Some(Command::Replug(reply))) => {
                    let _ = reply.send(self.replug());
                }
                Event::Read(Ok(0)) => self.broken("the port reached its end"),
                Event::Read(Ok(n)) => {
                    let bytes = buffer.get(..n).unwrap_or_default();
                    lock(&self.inner.ledger).received(bytes, Instant::now(), SystemTime::now());
                }
                Event::Read(Err(err)) => self.broken(&format!("reading failed: {err}")),
                Event::Wrote(Ok(0)) => self.broken("the port takes no more bytes"),
                Event::Wrote(Ok(n)) => {
                    let now = Instant::now();
                    lock(&self.inner.ledger).wrote(n, now, SystemTime::now());
                    self.free_at = self.free_at.max(now) + self.byte_time * n as u32;
                }
                Event::Wrote(Err(err)) => self.broken(&format!("writing failed: {err}")),
                Event::Timer => {}
            }
        }
        if let Some(port) = self.port.take() {
            port.close();
        }
        *lock(&self.inner.device) = None;
        self.inner.changed();
    }

    /// Does what is due at `now` (write-offs, re-sends, new lines, heartbeats). Returns when to wake up
    /// next, and the bytes to write next.
    fn prepare(&mut self, now: Instant) -> (Option<Instant>, Option<Vec<u8>>) {
        let inner = Arc::clone(&self.inner);
        let mut ledger = lock(&inner.ledger);
        ledger.expire(now);
        ledger.queue_resends(now);
        while self.offering() && ledger.room() {
            if let Some(every) = self.line_every {
                if now < self.next_line {
                    break;
                }
                let floor = now.checked_sub(MAX_CATCH_UP).unwrap_or(now);
                self.next_line = (self.next_line + every).max(floor);
            }
            let line = self.generator.make(self.offered, SystemTime::now());
            ledger.offer(line);
            self.offered += 1;
        }
        if let Some(every) = self.heartbeat_every {
            if now >= self.next_heartbeat {
                if ledger.wants_heartbeat() {
                    let (bytes, key) = self.generator.heartbeat();
                    ledger.queue_heartbeat(bytes, key);
                }
                self.next_heartbeat += every;
                if self.next_heartbeat <= now {
                    self.next_heartbeat = now + every;
                }
            }
        }
        let mut deadline = ledger.next_deadline();
        let mut wake_at = |at: Instant| {
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        };
        if self.line_every.is_some() && self.offering() && ledger.room() {
            wake_at(self.next_line);
        }
        if self.heartbeat_every.is_some() {
            wake_at(self.next_heartbeat);
        }
        let chunk = ledger.next_bytes(self.max_write).map(<[u8]>::to_vec);
        if chunk.is_some() && self.free_at > now {
            wake_at(self.free_at);
        }
        (deadline, chunk)
    }

    /// Closes the port; `deliberate` counts it as an unplug.
    fn unplug(&mut self, deliberate: bool) {
        let Some(port) = self.port.take() else {
            return;
        };
        port.close();
        *lock(&self.inner.device) = None;
        let mut ledger = lock(&self.inner.ledger);
        ledger.unplugged();
        if deliberate {
            ledger.count_unplug();
            debug!(link = %self.inner.link.display(), "port unplugged");
        }
    }

    /// A new port at the same link.
    fn replug(&mut self) -> io::Result<()> {
        self.unplug(true);
        let port = PtyLink::create(&self.inner.link)?;
        info!(
            link = %self.inner.link.display(),
            device = %port.device().display(),
            "port plugged in again"
        );
        *lock(&self.inner.device) = Some(port.device().to_path_buf());
        self.port = Some(port);
        lock(&self.inner.ledger).plugged();
        Ok(())
    }

    /// The port failed: it is closed, and the lines wait for a replug.
    fn broken(&mut self, why: &str) {
        warn!(link = %self.inner.link.display(), why, "the port failed; lines wait for a replug");
        self.unplug(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_line_has_the_cli_format() {
        let stats = SerialStats {
            sent: 10,
            acked: 9,
            naks: 2,
            resends: 3,
            garbage_bursts: 1,
            heartbeats: 7,
            heartbeat_acks: 7,
            unplugs: 1,
            waiting: 1,
        };
        assert_eq!(
            stats.to_string(),
            "sent=10 acked=9 naks=2 resends=3 garbage=1 unplugs=1 waiting=1"
        );
    }

    #[test]
    fn formats_have_names() {
        for format in LineFormat::ALL {
            assert_eq!(format.to_string().parse::<LineFormat>(), Ok(format));
        }
        assert_eq!(
            "contact-id".parse::<LineFormat>(),
            Ok(LineFormat::ContactId)
        );
        assert!("sia".parse::<LineFormat>().is_err());
    }

    #[test]
    fn config_problems_are_all_reported() {
        let config = SerialSimConfig::default();
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        let bad = SerialSimConfig {
            format: LineFormat::ContactId,
            link: PathBuf::new(),
            rate: -1.0,
            count: None,
            baud: 0,
            window: 0,
            ack_timeout: Duration::ZERO,
            garbage_share: 1.5,
            accounts: 0,
            receiver: 100,
            line: 10,
            heartbeat: Some(Duration::from_secs(30)),
            seed: 1,
        };
        assert_eq!(bad.problems().len(), 10, "{:?}", bad.problems());
    }

    #[test]
    fn the_same_seed_makes_the_same_lines() {
        for format in LineFormat::ALL {
            let config = SerialSimConfig {
                format,
                garbage_share: 0.2,
                ..SerialSimConfig::default()
            };
            let make = || {
                let mut generator = Generator::new(&config);
                (0..200)
                    .map(|i| {
                        let line = generator.make(i, SystemTime::UNIX_EPOCH);
                        (line.record.code, line.record.account, line.garbage)
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(make(), make(), "{format}");
        }
    }

    #[test]
    fn generated_lines_have_their_format() {
        for format in LineFormat::ALL {
            let config = SerialSimConfig {
                format,
                accounts: 3,
                ..SerialSimConfig::default()
            };
            let mut generator = Generator::new(&config);
            let mut seqs = std::collections::HashMap::new();
            let mut texts = std::collections::HashSet::new();
            for i in 0..2_000 {
                let line = generator.make(i, SystemTime::UNIX_EPOCH);
                let text = &line.record.text;
                assert!(texts.insert(text.clone()), "{text} repeats");
                assert_eq!(
                    line.bytes,
                    [text.as_bytes(), lines::terminator(format)].concat()
                );
                match format {
                    LineFormat::Surgard => {
                        assert!(text.starts_with("5011 18") || text.starts_with("3011    "));
                        assert_eq!(text.len(), 20, "{text}");
                    }
                    LineFormat::ContactId => {
                        assert_eq!(text.len(), 16, "{text}");
                        assert_eq!(&text[..4], line.record.account);
                        assert_eq!(&text[6..10], line.record.code);
                    }
                    LineFormat::TelecareLine => {
                        let fields: Vec<&str> = text.split(' ').collect();
                        assert_eq!(fields[0], "ALARM");
                        assert_eq!(fields[1], line.record.account);
                        assert_eq!(fields[3], line.record.code);
                        let seq = line.record.seq.unwrap();
                        assert_eq!(fields[2], seq.to_string());
                        let last = seqs.insert(line.record.account.clone(), seq).unwrap_or(0);
                        assert_eq!(seq, last + 1, "{text}");
                        assert_eq!(line.key, Some((fields[1][5..].parse().unwrap(), seq)));
                    }
                }
            }
        }
    }

    #[test]
    fn heartbeats_have_their_format() {
        let mut surgard = Generator::new(&SerialSimConfig::default());
        assert_eq!(
            surgard.heartbeat(),
            (b"1011           @    \x14".to_vec(), None)
        );
        let mut units = Generator::new(&SerialSimConfig {
            format: LineFormat::TelecareLine,
            accounts: 2,
            ..SerialSimConfig::default()
        });
        let beats: Vec<_> = (0..4).map(|_| units.heartbeat()).collect();
        assert_eq!(
            beats[0],
            (b"HEARTBEAT unit-0001 1\n".to_vec(), Some((1, 1)))
        );
        assert_eq!(
            beats[1],
            (b"HEARTBEAT unit-0002 1\n".to_vec(), Some((2, 1)))
        );
        assert_eq!(
            beats[3],
            (b"HEARTBEAT unit-0002 2\n".to_vec(), Some((2, 2)))
        );
    }
}
