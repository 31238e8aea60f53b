//! Ingest: the handle sources give signals to, and the group-commit writer
//! behind it.
//!
//! # Design
//! Sources call [`Ingest::enqueue_alarm`] (or [`Ingest::enqueue_quarantine`])
//! in arrival order. Enqueueing waits for room in a bounded queue — that is
//! the back-pressure on sources: alarms are never dropped, and a source that
//! cannot enqueue stops reading. It returns a [`Pending`] that resolves once
//! the signal's batch has committed.
//!
//! One writer task ([`Writer::run`]) drains the queue into batches: it takes
//! whatever is queued (up to `batch_max`), writes the batch in one
//! transaction and then answers every sender. When the queue was empty, the
//! first signal waits at most `batch_wait` for company. While a batch
//! commits, the next one gathers, so under load batches grow by themselves
//! and throughput follows; a batch that gathered that way is written at
//! once, unless at least [`BUSY_BACKLOG`] signals are waiting: then the
//! commit starts no sooner than `commit_interval` after the last one
//! started. Each commit has a cost whatever it carries (an `fsync`, the
//! pages of every table and index it touches, its statements' hand-offs to
//! the database thread), and on a busy machine committing as fast as commits
//! end spent that cost hundreds of times a second for batches of 50–100.
//! Below the threshold, as in everyday traffic, nothing waits.
//!
//! Life first starts here: when a backlog has formed, the writer looks at up
//! to [`LOOKAHEAD`] batches' worth of queued signals and fills the batch with
//! critical and urgent alarms before technical and routine signals, each kind
//! in arrival order; what did not fit waits, first in line, for the next
//! batch. So in a storm a fall is stored (and handed to delivery) within a
//! batch or two, not behind every signal that came before it. Without a
//! backlog batches are committed in queue order. Either way a sender's answer
//! comes when its own batch commits; sources that must answer in order (MQTT
//! acknowledgements, serial lines) wait for their signals in order.
//!
//! When a commit fails every sender of that batch gets an error and must not
//! acknowledge its signal (the device or broker will send it again).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::clock::SharedClock;
use crate::config::IngestConfig;
use crate::deliver::plan::Plan;
use crate::deliver::{Claimed, Handoff};
use crate::events;
use crate::metrics::Metrics;
use crate::model::{from_millis, to_millis, AlarmId, NewAlarm};
use crate::route::Router;
use crate::store::{AlarmOutcome, Batch, BatchAlarm, QuarantineEntry, Store};

/// What became of an alarm handed to ingest. Both mean "safe in the store".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored as a new alarm.
    Accepted(AlarmId),
    /// The same alarm was already stored; this is its id.
    Duplicate(AlarmId),
}

impl IngestOutcome {
    pub fn alarm_id(self) -> AlarmId {
        match self {
            IngestOutcome::Accepted(id) | IngestOutcome::Duplicate(id) => id,
        }
    }
}

/// Why a signal was not committed. The sender must not be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("ingest has shut down")]
    Closed,
    #[error("the store could not commit: {0}")]
    Store(String),
}

type AlarmReply = oneshot::Sender<Result<IngestOutcome, IngestError>>;
type QuarantineReply = oneshot::Sender<Result<(), IngestError>>;

enum Job {
    Alarm(NewAlarm, AlarmReply),
    Quarantine(QuarantineEntry, QuarantineReply),
}

impl Job {
    /// Whether [`life_first`] puts the job ahead of the others.
    fn is_life(&self) -> bool {
        match self {
            Job::Alarm(alarm, _) => alarm.priority().is_life(),
            Job::Quarantine(..) => false,
        }
    }
}

/// How many batches' worth of queued signals the writer looks at when it
/// puts life-lane alarms first.
pub const LOOKAHEAD: usize = 4;

/// A signal waiting for its batch to commit.
pub struct Pending<T> {
    rx: oneshot::Receiver<Result<T, IngestError>>,
}

impl<T> Pending<T> {
    /// A result that is known already (for input that needs no commit).
    pub fn ready(value: Result<T, IngestError>) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(value);
        Pending { rx }
    }

    /// Waits for the commit.
    ///
    /// # Errors
    /// [`IngestError`] when the batch did not commit or the writer stopped.
    pub async fn wait(self) -> Result<T, IngestError> {
        self.rx.await.unwrap_or(Err(IngestError::Closed))
    }
}

/// The handle sources hold. Cheap to clone; when the last clone is dropped
/// the writer finishes the queue and stops.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
}

impl Ingest {
    /// Queues an alarm for the next batch, waiting while the queue is full.
    ///
    /// # Errors
    /// [`IngestError::Closed`] when the writer has stopped.
    pub async fn enqueue_alarm(
        &self,
        alarm: NewAlarm,
    ) -> Result<Pending<IngestOutcome>, IngestError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Alarm(alarm, tx))
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(Pending { rx })
    }

    /// Queues a quarantine entry for the next batch.
    ///
    /// # Errors
    /// [`IngestError::Closed`] when the writer has stopped.
    pub async fn enqueue_quarantine(
        &self,
        entry: QuarantineEntry,
    ) -> Result<Pending<()>, IngestError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Quarantine(entry, tx))
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(Pending { rx })
    }

    /// Stores an alarm and waits for the commit.
    ///
    /// # Errors
    /// As [`Pending::wait`].
    pub async fn submit(&self, alarm: NewAlarm) -> Result<IngestOutcome, IngestError> {
        self.enqueue_alarm(alarm).await?.wait().await
    }
}

/// The group-commit writer: the only task that writes new alarms.
pub struct Writer {
    rx: mpsc::Receiver<Job>,
    /// Signals taken from the queue that life-lane alarms went ahead of, in
    /// arrival order; they come before anything still queued.
    held: VecDeque<Job>,
    store: Store,
    config: IngestConfig,
    /// Routes each new alarm; the route is stored with its outbox row.
    router: Arc<Router>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    /// Where new alarms go for delivery once committed; `None` when nothing
    /// delivers in this process (rows then wait in the outbox).
    handoff: Option<Handoff>,
}

/// Creates the ingest handle and its writer; spawn [`Writer::run`].
pub fn channel(
    store: Store,
    config: IngestConfig,
    router: Arc<Router>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    handoff: Option<Handoff>,
) -> (Ingest, Writer) {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    (
        Ingest { tx },
        Writer {
            rx,
            held: VecDeque::new(),
            store,
            config,
            router,
            clock,
            metrics,
            handoff,
        },
    )
}

/// Signals waiting when a commit ends from which the next commit keeps to
/// `commit_interval` (see the module documentation).
pub const BUSY_BACKLOG: usize = 64;

impl Writer {
    /// Commits batches until every [`Ingest`] handle is dropped and the
    /// queue is empty.
    pub async fn run(mut self) {
        let max = self.config.batch_max.max(1);
        let mut jobs: Vec<Job> = Vec::with_capacity(max);
        let mut last_start = tokio::time::Instant::now();
        loop {
            // Jobs that queued up while the last batch committed are a batch
            // already: waiting for more would only hold them longer.
            let waiting = self.held.len() + self.rx.len();
            let backlog = waiting > 0;
            if waiting >= BUSY_BACKLOG && !self.config.commit_interval.is_zero() {
                tokio::time::sleep_until(last_start + self.config.commit_interval).await;
            }
            if self.held.is_empty() && self.rx.recv_many(&mut jobs, max).await == 0 {
                break;
            }
            if backlog {
                let rx = &mut self.rx;
                life_first(
                    &mut self.held,
                    &mut jobs,
                    max,
                    || rx.try_recv().ok(),
                    Job::is_life,
                );
            } else {
                self.gather(&mut jobs, max).await;
            }
            last_start = tokio::time::Instant::now();
            self.commit(&mut jobs).await;
        }
        tracing::debug!("ingest writer stopped");
    }

    /// Waits up to `batch_wait` for the batch to fill.
    async fn gather(&mut self, jobs: &mut Vec<Job>, max: usize) {
        if self.config.batch_wait == Duration::ZERO {
            return;
        }
        gather_until(&mut self.rx, jobs, max, self.config.batch_wait).await;
    }

    async fn commit(&mut self, jobs: &mut Vec<Job>) {
        let now = self.clock.now();
        let mut batch = Batch::default();
        let mut alarm_replies = Vec::new();
        let mut quarantine_replies = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Alarm(alarm, reply) => {
                    let route =
                        self.router
                            .route(&alarm.tenant, alarm.priority(), alarm.received_at);
                    batch.alarms.push(BatchAlarm {
                        id: AlarmId::new_v7(),
                        alarm,
                        route,
                        leased: false,
                    });
                    alarm_replies.push(reply);
                }
                Job::Quarantine(entry, reply) => {
                    batch.quarantine.push(entry);
                    quarantine_replies.push(reply);
                }
            }
        }
        let granted = self.claim_for_handoff(&mut batch, now);
        let since = dedupe_since(now, self.config.dedupe_window);
        match self.store.commit_batch(&batch, now, since).await {
            Ok(outcomes) => {
                Metrics::inc(&self.metrics.store_commits);
                Metrics::add(&self.metrics.quarantined, batch.quarantine.len() as u64);
                let mut handed = Vec::with_capacity(granted);
                let mut unclaimed = false;
                for ((b, outcome), reply) in
                    batch.alarms.into_iter().zip(outcomes).zip(alarm_replies)
                {
                    let answer = match outcome {
                        AlarmOutcome::Stored(id) => {
                            events::AlarmStored {
                                id,
                                alarm: &b.alarm,
                                stored_at: now,
                            }
                            .emit(&self.metrics);
                            if b.leased {
                                if let Some(lease) = &batch.lease {
                                    handed.push(Claimed {
                                        plan: Plan::first(&b.route, from_millis(to_millis(now))),
                                        contract_id: b.route.contract_id,
                                        alarm: b.alarm.into_stored(id, now),
                                        lease_until: lease.until,
                                    });
                                }
                            } else {
                                unclaimed = true;
                            }
                            IngestOutcome::Accepted(id)
                        }
                        AlarmOutcome::Duplicate(id) => {
                            events::DuplicateReceived {
                                id,
                                alarm: &b.alarm,
                            }
                            .emit(&self.metrics);
                            IngestOutcome::Duplicate(id)
                        }
                    };
                    let _ = reply.send(Ok(answer));
                }
                for reply in quarantine_replies {
                    let _ = reply.send(Ok(()));
                }
                if let Some(handoff) = &self.handoff {
                    handoff.give_back(granted - handed.len());
                    // Most urgent first, as the outbox is claimed.
                    handed.sort_by_key(|c| c.alarm.priority.number());
                    handoff.hand(handed);
                    if unclaimed {
                        handoff.wake();
                    }
                }
            }
            Err(err) => {
                if let Some(handoff) = &self.handoff {
                    handoff.give_back(granted);
                }
                Metrics::inc(&self.metrics.store_commit_failures);
                let message = err.to_string();
                tracing::error!(
                    error = %message,
                    alarms = batch.alarms.len(),
                    quarantined = batch.quarantine.len(),
                    "store commit failed; senders are not acknowledged and will re-send"
                );
                for reply in alarm_replies {
                    let _ = reply.send(Err(IngestError::Store(message.clone())));
                }
                for reply in quarantine_replies {
                    let _ = reply.send(Err(IngestError::Store(message.clone())));
                }
            }
        }
    }

    /// Marks as many alarms of the batch as the hand-off has room for, most
    /// urgent first, to be stored claimed by this instance; returns how many.
    fn claim_for_handoff(&self, batch: &mut Batch, now: DateTime<Utc>) -> usize {
        let Some(handoff) = &self.handoff else {
            return 0;
        };
        let granted = handoff.take(batch.alarms.len());
        if granted == 0 {
            return 0;
        }
        let mut order: Vec<usize> = (0..batch.alarms.len()).collect();
        if granted < order.len() {
            order.sort_by_key(|&i| batch.alarms[i].alarm.priority().number());
        }
        for &i in order.iter().take(granted) {
            batch.alarms[i].leased = true;
        }
        batch.lease = Some(handoff.lease(now));
        granted
    }
}

/// Fills `batch` (up to `max`) from `held`, then `batch` itself, then
/// `more()`: everything in view, at most [`LOOKAHEAD`] × `max`, in arrival
/// order. Jobs that `is_life` go first, each kind keeping its order; what
/// does not fit is held, in order, for the next batch.
fn life_first<T>(
    held: &mut VecDeque<T>,
    batch: &mut Vec<T>,
    max: usize,
    mut more: impl FnMut() -> Option<T>,
    is_life: impl Fn(&T) -> bool,
) {
    let mut view: Vec<T> = held.drain(..).collect();
    view.append(batch);
    while view.len() < LOOKAHEAD * max {
        match more() {
            Some(job) => view.push(job),
            None => break,
        }
    }
    let (life, rest): (Vec<T>, Vec<T>) = view.into_iter().partition(|job| is_life(job));
    for job in life.into_iter().chain(rest) {
        if batch.len() < max {
            batch.push(job);
        } else {
            held.push_back(job);
        }
    }
}

/// Adds to `batch` what `rx` receives within `wait`, up to `max` in all;
/// returns early when the batch is full or the channel closes.
pub(crate) async fn gather_until<T>(
    rx: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    wait: Duration,
) {
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        let room = max - batch.len();
        match tokio::time::timeout_at(deadline, rx.recv_many(batch, room)).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn dedupe_since(now: DateTime<Utc>, window: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(window)
        .ok()
        .and_then(|w| now.checked_sub_signed(w))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal in a test: its arrival number and whether it is a life-lane alarm.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Signal(u32, bool);

    fn is_life(signal: &Signal) -> bool {
        signal.1
    }

    fn numbers(signals: &[Signal]) -> Vec<u32> {
        signals.iter().map(|s| s.0).collect()
    }

    #[test]
    fn under_a_backlog_life_alarms_go_first_and_the_rest_keep_their_order() {
        // Eighteen technical signals queued, then two falls; batches of four.
        let mut queue: VecDeque<Signal> = (0..18).map(|n| Signal(n, false)).collect();
        queue.push_back(Signal(18, true));
        queue.push_back(Signal(19, true));
        let mut held = VecDeque::new();
        let mut batch = Vec::new();
        let mut batches = Vec::new();
        while !(queue.is_empty() && held.is_empty()) {
            life_first(&mut held, &mut batch, 4, || queue.pop_front(), is_life);
            batches.push(numbers(&batch));
            batch.clear();
        }
        // The falls are out of view of the first batch (16 signals) but in the
        // second: they lead it, and nothing is lost, repeated or reordered.
        assert_eq!(batches[0], vec![0, 1, 2, 3]);
        assert_eq!(batches[1], vec![18, 19, 4, 5]);
        let all: Vec<u32> = batches.concat();
        let technical: Vec<u32> = all.iter().copied().filter(|n| *n < 18).collect();
        assert_eq!(technical, (0..18).collect::<Vec<u32>>());
        assert_eq!(all.len(), 20);
    }

    #[test]
    fn what_is_held_stays_bounded_and_comes_before_the_queue() {
        let mut queue: VecDeque<Signal> = (0..100).map(|n| Signal(n, n % 10 == 9)).collect();
        let mut held = VecDeque::new();
        let mut batch = vec![Signal(1000, false)];
        // The batch already holds the oldest signal taken from the queue.
        life_first(&mut held, &mut batch, 8, || queue.pop_front(), is_life);
        assert_eq!(batch.len(), 8);
        assert_eq!(numbers(&batch[..3]), vec![9, 19, 29]);
        assert_eq!(batch[3], Signal(1000, false), "the oldest technical signal");
        assert_eq!(held.len() + batch.len(), LOOKAHEAD * 8);
        let oldest_queued = queue.front().map_or(u32::MAX, |s| s.0);
        let mut second = Vec::new();
        life_first(&mut held, &mut second, 8, || queue.pop_front(), is_life);
        // Held technical signals go before any still queued.
        assert!(second.iter().filter(|s| !s.1).all(|s| s.0 < oldest_queued));
    }

    /// A writer on a fresh SQLite store, committing at most `batch_max`
    /// signals at a time; the handle, the store and the store's folder.
    async fn writer_with(
        batch_max: usize,
        commit_interval: Duration,
    ) -> (Ingest, Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = crate::config::StoreUrl::Sqlite(dir.path().join("store.db"));
        let store = Store::open(&url).await.expect("SQLite store opens");
        let config = crate::config::Config::from_toml_str(
            "[[provider]]\nid = \"arc\"\nurl = \"http://127.0.0.1:1/a\"\nsecret = \"s\"\ntoken = \"t\"\n\
             [routing]\ndefault_provider = \"arc\"\n",
            "test.toml",
            &|_| None,
        )
        .expect("valid configuration");
        let ingest_config = IngestConfig {
            batch_max,
            commit_interval,
            ..IngestConfig::default()
        };
        let (ingest, writer) = channel(
            store.clone(),
            ingest_config,
            Arc::new(Router::new(&config)),
            crate::clock::system(),
            Arc::new(Metrics::default()),
            None,
        );
        tokio::spawn(writer.run());
        (ingest, store, dir)
    }

    /// Enqueues `n` distinct alarms at once and returns the distinct times
    /// they were stored at, in order.
    async fn commit_times(ingest: &Ingest, store: &Store, n: u64) -> Vec<DateTime<Utc>> {
        use crate::source::mqtt::payload::{normalise, parse_alarm, parse_topic};
        // Device alarms as the MQTT source makes them.
        let topic = parse_topic("telecare/tn/d1/alarm").expect("topic");
        let table = crate::taxonomy::CodeTable::default();
        let mut pending = Vec::new();
        for seq in 0..n {
            let raw = format!(r#"{{"seq": {seq}, "event": "fall"}}"#).into_bytes();
            let payload = parse_alarm(&raw).expect("payload");
            let alarm = normalise(&topic, payload, &table, "devices", Utc::now(), raw);
            pending.push(ingest.enqueue_alarm(alarm).await.expect("queued"));
        }
        let mut times = Vec::new();
        for p in pending {
            let id = p.wait().await.expect("committed").alarm_id();
            let alarm = store.alarm(id).await.expect("read").expect("stored");
            times.push(alarm.stored_at);
        }
        times.dedup();
        times
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_a_backlog_commits_start_an_interval_apart_and_a_short_queue_does_not_wait() {
        // 300 alarms at once, 100 a commit: the two commits that find 100 or
        // more waiting start no sooner than the interval after the last.
        let interval = Duration::from_millis(400);
        let (ingest, store, _dir) = writer_with(100, interval).await;
        let times = commit_times(&ingest, &store, 300).await;
        assert!(times.len() >= 3, "{times:?}");
        let least = chrono::Duration::from_std(interval).expect("interval")
            - chrono::Duration::milliseconds(2);
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] >= least,
                "commits closer than the interval: {times:?}"
            );
        }

        // 50 alarms, 10 a commit: never 64 waiting, so no commit waits.
        let interval = Duration::from_secs(5);
        let (ingest, store, _dir) = writer_with(10, interval).await;
        let times = commit_times(&ingest, &store, 50).await;
        assert!(times.len() >= 5, "{times:?}");
        let span = *times.last().expect("times") - times[0];
        assert!(
            span < chrono::Duration::from_std(interval).expect("interval"),
            "{times:?}"
        );
    }
}
