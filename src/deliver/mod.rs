//! Delivery: from the outbox to the providers.
//!
//! # Design
//! Every stored alarm has an outbox row carrying its route (contract, provider
//! chain, failover time) and where it stands in that chain ([`plan::Plan`]).
//! The ingest writer stores each new row already claimed by this instance
//! and hands it over once committed ([`Handoff`]); the [`Dispatcher`] also
//! claims due rows (retries, rows beyond the hand-off's room, a dead
//! instance's claims) with a lease in priority order (critical first). It
//! delivers each through its provider's adapter and hands the outcome to a
//! recorder that writes attempts in batches, one transaction per batch.
//!
//! - A claim is a lease (`lease_owner`, `lease_until`): while it holds,
//!   no other claim takes the row; when a process dies, its rows become due
//!   again once the lease expires, and an instance releases its own old
//!   claims at start-up. So an alarm is never lost between "stored" and
//!   "accepted by a provider"; at worst it is delivered twice under one
//!   alarm id, which the `Idempotency-Key` lets the provider recognise.
//! - An attempt must end while its claim holds: a row that waited for a
//!   delivery slot until too little of its lease was left is not delivered
//!   on that claim but claimed again.
//! - Life first: each provider has two lanes (critical and urgent; technical
//!   and routine), each with its own bound on deliveries in flight, so a
//!   flood of technical signals never takes the slots a fall needs. A lane
//!   is a queue served by up to `max_in_flight` workers, each delivering one
//!   alarm at a time on its own kept-alive connection to the provider.
//! - Every attempt, its outcome, the acceptance and a dead letter are stage
//!   rows of the alarm.

pub mod http;
pub mod plan;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::http::HttpProvider;
use self::plan::{AttemptOutcome, Decision, Plan};
use crate::clock::SharedClock;
use crate::config::{Config, DeliverConfig, ProviderKind};
use crate::events;
use crate::metrics::Metrics;
use crate::model::{Alarm, AlarmId, Priority};
use crate::store::{Lease, Store};

/// One delivery of one alarm to one provider.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub alarm: Alarm,
    /// `None` when no contract covers the alarm.
    pub contract_id: Option<String>,
    /// 1-based, counted across providers.
    pub attempt: u32,
    /// True when this provider is not the primary.
    pub fallback: bool,
}

/// A provider's acceptance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub status: u16,
}

/// Why a delivery was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("HTTP {code}")]
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    #[error("timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("provider {0:?} is no longer configured")]
    UnknownProvider(String),
}

impl DeliveryError {
    /// Whether the same provider may be tried again: 408, 425, 429, 5xx,
    /// timeouts and connection errors. Other 4xx and every 3xx are a
    /// permanent rejection by that provider.
    pub fn is_retriable(&self) -> bool {
        match self {
            DeliveryError::Status { code, .. } => {
                matches!(code, 408 | 425 | 429) || (500..600).contains(code)
            }
            DeliveryError::Timeout | DeliveryError::Connect(_) => true,
            DeliveryError::Request(_) | DeliveryError::UnknownProvider(_) => false,
        }
    }

    /// The provider's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The error as the retry policy sees it.
    pub fn outcome(&self) -> AttemptOutcome {
        if self.is_retriable() {
            AttemptOutcome::Retriable {
                retry_after: self.retry_after(),
            }
        } else {
            AttemptOutcome::Rejected
        }
    }
}

/// Every kind of provider adapter (a closed set).
#[derive(Debug, Clone)]
pub enum Provider {
    Http(HttpProvider),
}

/// A delivery worker's connection to its provider, of the provider's kind.
#[derive(Debug)]
pub enum Link {
    Http(http::Link),
}

impl Provider {
    /// The limit of one attempt.
    pub fn timeout(&self) -> Duration {
        match self {
            Provider::Http(p) => p.timeout(),
        }
    }

    /// A link not yet connected; the first delivery on it connects.
    pub fn link(&self) -> Link {
        match self {
            Provider::Http(_) => Link::Http(http::Link::default()),
        }
    }

    /// # Errors
    /// As the adapter's `deliver`.
    pub async fn deliver(
        &self,
        link: &mut Link,
        delivery: &Delivery,
        now: DateTime<Utc>,
    ) -> Result<Receipt, DeliveryError> {
        match (self, link) {
            (Provider::Http(p), Link::Http(link)) => p.deliver(link, delivery, now).await,
        }
    }
}

/// An outbox row claimed for delivery.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub alarm: Alarm,
    pub contract_id: Option<String>,
    pub plan: Plan,
    /// When the claim runs out and another claim may take the row.
    pub lease_until: DateTime<Utc>,
}

/// The sending half of the hand-off from ingest to delivery.
///
/// The ingest writer stores the outbox rows of new alarms already claimed by
/// this instance (a [`Lease`]) and hands them here once they commit, so
/// nothing — no claim statement, no poll — stands between "stored" and
/// "being delivered". Room is bounded: rows beyond it are stored unclaimed
/// and the dispatcher claims them from the outbox as before.
#[derive(Clone)]
pub struct Handoff {
    tx: mpsc::UnboundedSender<Vec<Claimed>>,
    room: Arc<Semaphore>,
    owner: String,
    lease: Duration,
    /// Rung when rows were stored unclaimed, for the dispatcher to claim.
    wake: Arc<Notify>,
}

/// The receiving half, for [`Dispatcher::new`].
pub struct Handed {
    rx: mpsc::UnboundedReceiver<Vec<Claimed>>,
    room: Arc<Semaphore>,
    wake: Arc<Notify>,
}

/// Rows handed over at most: enough to keep every lane busy through a
/// burst; beyond it, rows wait in the outbox.
fn handoff_room(config: &DeliverConfig) -> usize {
    config.claim_batch.max(1) * 8
}

/// Creates the hand-off between the ingest writer and the dispatcher.
pub fn handoff(config: &DeliverConfig) -> (Handoff, Handed) {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(handoff_room(config)));
    let wake = Arc::new(Notify::new());
    (
        Handoff {
            tx,
            room: room.clone(),
            owner: config.instance_id.clone(),
            lease: config.lease,
            wake: wake.clone(),
        },
        Handed { rx, room, wake },
    )
}

impl Handoff {
    /// The lease for rows stored at `now`.
    pub fn lease(&self, now: DateTime<Utc>) -> Lease {
        Lease {
            owner: self.owner.clone(),
            until: add(now, self.lease),
        }
    }

    /// Takes room for up to `wanted` rows and says how many it got. Room
    /// taken and not handed over must be given back with [`Handoff::give_back`].
    pub fn take(&self, wanted: usize) -> usize {
        let n = wanted.min(self.room.available_permits());
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        match self.room.try_acquire_many(n32) {
            Ok(permit) => {
                permit.forget();
                n32 as usize
            }
            Err(_) => 0,
        }
    }

    /// Returns room taken for rows that were not handed over.
    pub fn give_back(&self, n: usize) {
        if n > 0 {
            self.room.add_permits(n);
        }
    }

    /// Hands committed, claimed rows to the dispatcher (most urgent first).
    /// When the dispatcher has stopped the rows stay claimed in the outbox
    /// and are claimed again once the lease runs out.
    pub fn hand(&self, rows: Vec<Claimed>) {
        if !rows.is_empty() && self.tx.send(rows).is_err() {
            tracing::debug!("dispatcher stopped; handed rows wait for their lease to run out");
        }
    }

    /// Tells the dispatcher that rows were stored unclaimed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Gives a handed row's room back when its attempt ends.
struct RoomGuard(Arc<Semaphore>);

impl Drop for RoomGuard {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// The outcome of one attempt, for the store.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub alarm_id: AlarmId,
    pub provider: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// What happened, for people: `HTTP 200`, `HTTP 503`, `timed out`.
    pub detail: String,
    pub decision: Decision,
}

/// The priority lanes of a provider, in the order of a provider's
/// [`LaneQueue`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Critical and urgent alarms.
    Life = 0,
    /// Technical and routine signals.
    Technical = 1,
}

impl Lane {
    fn of(priority: Priority) -> Lane {
        if priority.is_life() {
            Lane::Life
        } else {
            Lane::Technical
        }
    }
}

/// Why the dispatcher could not be built.
#[derive(Debug, thiserror::Error)]
#[error("provider {id}: cannot build the HTTP client: {source}")]
pub struct BuildError {
    id: String,
    source: http::ClientError,
}

/// One attempt waiting for a worker of its provider's lane.
struct Job {
    /// The row, its plan brought up to the time it was queued.
    claimed: Claimed,
    /// Dropped when the attempt ends: gives the row's room back.
    _room: Room,
}

/// The room a row takes while its attempt is waiting or under way, given
/// back when it is dropped.
enum Room {
    /// A row the dispatcher claimed, one of `claim_batch`.
    Claimed { _guard: ClaimGuard },
    /// A row handed over by ingest, one of the hand-off's room.
    Handed { _guard: RoomGuard },
}

/// Claimed rows whose attempt has not ended yet.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    /// Rung as each attempt ends.
    ended: Notify,
}

impl InFlight {
    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// Counts a claimed row in [`InFlight`] until its attempt ends.
struct ClaimGuard(Arc<InFlight>);

impl ClaimGuard {
    fn new(in_flight: &Arc<InFlight>) -> ClaimGuard {
        in_flight.count.fetch_add(1, Ordering::AcqRel);
        ClaimGuard(in_flight.clone())
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_one();
    }
}

/// A provider's lane: attempts wait in its queue for one of at most
/// `max_in_flight` workers, each sending on a connection of its own. A
/// worker is started when attempts are waiting and no worker is idle, so the
/// workers (and connections) follow the lane's concurrency, up to the bound.
struct LaneQueue {
    provider: Arc<Provider>,
    tx: flume::Sender<Job>,
    rx: flume::Receiver<Job>,
    /// Workers waiting for an attempt.
    idle: Arc<AtomicUsize>,
    /// Workers started.
    workers: usize,
}

/// What every worker shares.
#[derive(Clone)]
struct WorkerContext {
    clock: SharedClock,
    metrics: Arc<Metrics>,
    results: mpsc::Sender<AttemptRecord>,
}

/// Claims due outbox rows and delivers them.
pub struct Dispatcher {
    store: Store,
    /// Each provider's lane queues, indexed by [`Lane`].
    lanes: HashMap<String, [LaneQueue; 2]>,
    config: DeliverConfig,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    /// Rows handed over by the ingest writer; its `wake` is rung when rows
    /// were stored unclaimed and after a recorded batch that retries at
    /// once, so that work is claimed without waiting for the next poll.
    handed: Handed,
}

impl Dispatcher {
    /// # Errors
    /// When a provider's HTTP client cannot be built.
    pub fn new(
        config: &Config,
        store: Store,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        handed: Handed,
    ) -> Result<Dispatcher, BuildError> {
        let mut lanes = HashMap::new();
        for p in &config.providers {
            let provider = match p.kind {
                ProviderKind::Http => {
                    Provider::Http(HttpProvider::new(p).map_err(|source| BuildError {
                        id: p.id.clone(),
                        source,
                    })?)
                }
            };
            let provider = Arc::new(provider);
            let queue = || {
                let (tx, rx) = flume::unbounded();
                LaneQueue {
                    provider: provider.clone(),
                    tx,
                    rx,
                    idle: Arc::new(AtomicUsize::new(0)),
                    workers: 0,
                }
            };
            lanes.insert(p.id.clone(), [queue(), queue()]);
        }
        Ok(Dispatcher {
            store,
            lanes,
            config: config.deliver.clone(),
            clock,
            metrics,
            handed,
        })
    }

    /// Releases the outbox rows an earlier run of this instance left
    /// claimed, so they are delivered at once instead of after their lease.
    /// Call it before ingest starts: the rows ingest stores claimed and
    /// hands over carry the same owner, and releasing one of those would let
    /// the poll claim it a second time.
    pub async fn release_earlier_claims(&self) {
        match self.store.release_leases(&self.config.instance_id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "released this instance's earlier outbox claims"),
            Err(e) => tracing::error!(error = %e, "cannot release earlier outbox claims"),
        }
    }

    /// Delivers until `cancel` fires, then lets in-flight attempts finish
    /// and records them.
    pub async fn run(mut self, cancel: CancellationToken) {
        let (results_tx, results_rx) = mpsc::channel(self.config.claim_batch.max(1) * 4);
        let recorder = record_loop(
            self.store.clone(),
            results_rx,
            self.handed.wake.clone(),
            self.metrics.clone(),
        );
        let claimer = self.claim_loop(results_tx, cancel);
        tokio::join!(claimer, recorder);
        tracing::debug!("dispatcher stopped");
    }

    async fn claim_loop(
        &mut self,
        results: mpsc::Sender<AttemptRecord>,
        cancel: CancellationToken,
    ) {
        let context = WorkerContext {
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
            results,
        };
        // The lanes' workers, and the attempts of rows whose provider is no
        // longer configured.
        let mut workers = JoinSet::new();
        // Rows claimed from the outbox whose attempt has not ended (at most
        // `claim_batch`); rows handed over by ingest are bounded by the
        // hand-off's room.
        let in_flight = Arc::new(InFlight::default());
        let mut handed_open = true;
        let limit = self.config.claim_batch.max(1);
        let mut poll = tokio::time::interval(self.config.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let wake = self.handed.wake.clone();
        // Whether to claim at the top of the loop, and whether the last claim
        // filled all the room it had (so more is probably due).
        let mut claim = true;
        let mut claimed_all = false;
        loop {
            while workers.try_join_next().is_some() {}
            let room = limit.saturating_sub(in_flight.count());
            if claim && room > 0 {
                let now = self.clock.now();
                let until = add(now, self.config.lease);
                match self
                    .store
                    .claim_due(&self.config.instance_id, now, until, room)
                    .await
                {
                    Ok(rows) => {
                        claimed_all = rows.len() == room;
                        for row in rows {
                            let room = Room::Claimed {
                                _guard: ClaimGuard::new(&in_flight),
                            };
                            self.enqueue(row, now, room, &mut workers, &context);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot claim outbox rows"),
                }
            }
            let room = limit.saturating_sub(in_flight.count());
            let waiting = in_flight.count() > 0;
            claim = false;
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                rows = self.handed.rx.recv(), if handed_open => match rows {
                    Some(rows) => {
                        let now = self.clock.now();
                        for row in rows {
                            let room = Room::Handed {
                                _guard: RoomGuard(self.handed.room.clone()),
                            };
                            self.enqueue(row, now, room, &mut workers, &context);
                        }
                    }
                    None => handed_open = false,
                },
                // With the room full, or more probably due, claim again as
                // soon as an attempt ends.
                () = in_flight.ended.notified(), if waiting && (claimed_all || room == 0) => claim = true,
                () = wake.notified() => claim = true,
                _ = poll.tick() => claim = true,
            }
        }
        // Attempts already queued or under way finish (each is bounded by
        // its provider's timeout, and one whose claim ran short is left for
        // the next claim) and are recorded; claims not yet made keep waiting
        // in the outbox.
        self.lanes.clear();
        while workers.join_next().await.is_some() {}
    }

    /// Queues one attempt of a claimed or handed row on its provider's lane,
    /// starting a worker when none is idle and the lane has room for one.
    fn enqueue(
        &mut self,
        mut claimed: Claimed,
        now: DateTime<Utc>,
        room: Room,
        workers: &mut JoinSet<()>,
        context: &WorkerContext,
    ) {
        claimed.plan = claimed.plan.at(now);
        let lane = Lane::of(claimed.alarm.priority);
        let job = Job {
            claimed,
            _room: room,
        };
        let Some(queues) = self.lanes.get_mut(job.claimed.plan.provider()) else {
            // Configured once, since removed: the attempt fails at once.
            let context = context.clone();
            workers.spawn(async move { attempt(None, job, &context).await });
            return;
        };
        let queue = &mut queues[lane as usize];
        if queue.tx.send(job).is_err() {
            // Cannot happen while the dispatcher holds the receiver too.
            return;
        }
        if queue.tx.len() > queue.idle.load(Ordering::Acquire)
            && queue.workers < self.config.max_in_flight.max(1)
        {
            queue.workers += 1;
            workers.spawn(work(
                queue.provider.clone(),
                queue.rx.clone(),
                queue.idle.clone(),
                context.clone(),
            ));
        }
    }
}

/// How long a worker keeps its connection open without a delivery.
const LINK_IDLE: Duration = Duration::from_secs(60);

/// A lane's worker: takes the lane's attempts one at a time and makes each on
/// its own connection to the provider, until the lane's queue is closed and
/// empty.
async fn work(
    provider: Arc<Provider>,
    jobs: flume::Receiver<Job>,
    idle: Arc<AtomicUsize>,
    context: WorkerContext,
) {
    let mut link = provider.link();
    loop {
        idle.fetch_add(1, Ordering::AcqRel);
        let job = match tokio::time::timeout(LINK_IDLE, jobs.recv_async()).await {
            Ok(job) => job,
            Err(_) => {
                // Idle for a while: close the connection, then wait on.
                link = provider.link();
                jobs.recv_async().await
            }
        };
        idle.fetch_sub(1, Ordering::AcqRel);
        let Ok(job) = job else { break };
        attempt(Some((&provider, &mut link)), job, &context).await;
    }
}

/// One attempt of one claimed row, on a worker's link to its provider;
/// `None` for a provider no longer configured.
async fn attempt(target: Option<(&Provider, &mut Link)>, job: Job, context: &WorkerContext) {
    let Job { claimed, _room } = job;
    let Claimed {
        alarm,
        contract_id,
        plan,
        lease_until,
    } = claimed;
    let WorkerContext {
        clock,
        metrics,
        results,
    } = context;
    let provider_id = plan.provider().to_owned();
    let started_at = clock.now();
    // An attempt must end while the claim holds, or another claim could
    // deliver the alarm at the same time. A row that waited too long for a
    // worker is left to be claimed again.
    let limit = target.as_ref().map_or(Duration::ZERO, |(p, _)| p.timeout());
    if add(started_at, limit) >= lease_until {
        Metrics::inc(&metrics.claims_lapsed);
        tracing::debug!(
            alarm_id = %alarm.id,
            provider = %provider_id,
            "claim ran short while waiting for a delivery slot; the row will be claimed again"
        );
        return;
    }
    let delivery = Delivery {
        contract_id,
        attempt: plan.attempts.saturating_add(1),
        fallback: plan.is_fallback(),
        alarm,
    };
    let result = match target {
        Some((p, link)) => p.deliver(link, &delivery, started_at).await,
        None => Err(DeliveryError::UnknownProvider(provider_id.clone())),
    };
    let finished_at = clock.now();
    let (outcome, detail) = match &result {
        Ok(receipt) => (AttemptOutcome::Accepted, format!("HTTP {}", receipt.status)),
        Err(e) => (e.outcome(), e.to_string()),
    };
    let decision = plan.next(outcome, finished_at, rand::random());
    events::DeliveryAttempted {
        alarm: &delivery.alarm,
        provider: &provider_id,
        attempt: delivery.attempt,
        fallback: delivery.fallback,
        detail: &detail,
        decision: &decision,
        before: &plan,
    }
    .emit(metrics);
    let record = AttemptRecord {
        alarm_id: delivery.alarm.id,
        provider: provider_id,
        started_at,
        finished_at,
        detail,
        decision,
    };
    if results.send(record).await.is_err() {
        tracing::error!("delivery recorder stopped; the claim will be retried after its lease");
    }
}

/// Most attempt outcomes recorded in one transaction.
const RECORD_MAX: usize = 4096;
/// How long outcomes gather before they are recorded.
const RECORD_WAIT: Duration = Duration::from_millis(20);

/// Writes attempt outcomes in batches; retries a failed write (the rows stay
/// leased meanwhile, so nobody else delivers them). Rings `wake` when an
/// alarm is due again at once.
async fn record_loop(
    store: Store,
    mut results: mpsc::Receiver<AttemptRecord>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::new();
    while results.recv_many(&mut batch, RECORD_MAX).await > 0 {
        // Outcomes are not in a hurry (the provider has the alarm; the row
        // stays claimed): gather them into fewer transactions, each a turn
        // that new alarms would otherwise wait behind.
        crate::ingest::gather_until(&mut results, &mut batch, RECORD_MAX, RECORD_WAIT).await;
        let mut pause = Duration::from_millis(100);
        while let Err(e) = store.record_attempts(&batch).await {
            Metrics::inc(&metrics.store_commit_failures);
            tracing::error!(error = %e, attempts = batch.len(), "cannot record delivery attempts; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        // An alarm passed on to its next provider is due at once; later
        // retries are found by the poll.
        let due_now = batch.iter().any(
            |r| matches!(r.decision, Decision::Retry { due_at, .. } if due_at <= r.finished_at),
        );
        batch.clear();
        if due_now {
            wake.notify_one();
        }
    }
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}
