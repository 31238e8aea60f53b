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
//!   flood of technical signals never takes the slots a fall needs.
//! - Every attempt, its outcome, the acceptance and a dead letter are stage
//!   rows of the alarm.

pub mod http;
pub mod plan;

use std::collections::HashMap;
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

impl Provider {
    /// The limit of one attempt.
    pub fn timeout(&self) -> Duration {
        match self {
            Provider::Http(p) => p.timeout(),
        }
    }

    /// # Errors
    /// As the adapter's `deliver`.
    pub async fn deliver(
        &self,
        delivery: &Delivery,
        now: DateTime<Utc>,
    ) -> Result<Receipt, DeliveryError> {
        match self {
            Provider::Http(p) => p.deliver(delivery, now).await,
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

/// The priority lanes of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    /// Critical and urgent alarms.
    Life,
    /// Technical and routine signals.
    Technical,
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

/// Claims due outbox rows and delivers them.
pub struct Dispatcher {
    store: Store,
    providers: HashMap<String, Arc<Provider>>,
    /// Bounds on deliveries in flight, per provider and lane.
    lanes: HashMap<(String, Lane), Arc<Semaphore>>,
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
        let mut providers = HashMap::new();
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
            providers.insert(p.id.clone(), Arc::new(provider));
            for lane in [Lane::Life, Lane::Technical] {
                lanes.insert(
                    (p.id.clone(), lane),
                    Arc::new(Semaphore::new(config.deliver.max_in_flight)),
                );
            }
        }
        Ok(Dispatcher {
            store,
            providers,
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
        // Rows claimed from the outbox (at most `claim_batch` at a time) and
        // rows handed over by ingest (bounded by the hand-off's room).
        let mut claimed = JoinSet::new();
        let mut handed = JoinSet::new();
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
            while claimed.try_join_next().is_some() {}
            while handed.try_join_next().is_some() {}
            let room = limit.saturating_sub(claimed.len());
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
                            claimed.spawn(self.attempt(row, now, results.clone()));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot claim outbox rows"),
                }
            }
            let room = limit.saturating_sub(claimed.len());
            claim = false;
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                rows = self.handed.rx.recv(), if handed_open => match rows {
                    Some(rows) => self.spawn_handed(&mut handed, rows, &results),
                    None => handed_open = false,
                },
                // With the room full, or more probably due, claim again as
                // soon as an attempt ends.
                Some(_) = claimed.join_next(), if claimed_all || room == 0 => claim = true,
                () = wake.notified() => claim = true,
                _ = poll.tick() => claim = true,
            }
        }
        // Attempts already under way finish (each is bounded by its
        // provider's timeout) and are recorded; claims not started yet
        // keep their lease and are released at the next start.
        while claimed.join_next().await.is_some() {}
        while handed.join_next().await.is_some() {}
    }

    fn spawn_handed(
        &self,
        tasks: &mut JoinSet<()>,
        rows: Vec<Claimed>,
        results: &mpsc::Sender<AttemptRecord>,
    ) {
        let now = self.clock.now();
        for row in rows {
            let room = RoomGuard(self.handed.room.clone());
            let attempt = self.attempt(row, now, results.clone());
            tasks.spawn(async move {
                attempt.await;
                drop(room);
            });
        }
    }

    /// One attempt of one claimed row, as a task.
    fn attempt(
        &self,
        claimed: Claimed,
        now: DateTime<Utc>,
        results: mpsc::Sender<AttemptRecord>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let plan = claimed.plan.clone().at(now);
        let provider_id = plan.provider().to_owned();
        let provider = self.providers.get(&provider_id).cloned();
        let lane = self
            .lanes
            .get(&(provider_id.clone(), Lane::of(claimed.alarm.priority)))
            .cloned();
        let clock = self.clock.clone();
        let metrics = self.metrics.clone();
        async move {
            let _permit = match &lane {
                Some(lane) => lane.clone().acquire_owned().await.ok(),
                None => None,
            };
            let started_at = clock.now();
            // An attempt must end while the claim holds, or another claim
            // could deliver the alarm at the same time. A row that waited
            // too long for its slot is left to be claimed again.
            let limit = provider.as_ref().map_or(Duration::ZERO, |p| p.timeout());
            if add(started_at, limit) >= claimed.lease_until {
                Metrics::inc(&metrics.claims_lapsed);
                tracing::debug!(
                    alarm_id = %claimed.alarm.id,
                    provider = %provider_id,
                    "claim ran short while waiting for a delivery slot; the row will be claimed again"
                );
                return;
            }
            let delivery = Delivery {
                contract_id: claimed.contract_id.clone(),
                attempt: plan.attempts.saturating_add(1),
                fallback: plan.is_fallback(),
                alarm: claimed.alarm,
            };
            let result = match &provider {
                Some(p) => p.deliver(&delivery, started_at).await,
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
            .emit(&metrics);
            let record = AttemptRecord {
                alarm_id: delivery.alarm.id,
                provider: provider_id,
                started_at,
                finished_at,
                detail,
                decision,
            };
            if results.send(record).await.is_err() {
                tracing::error!(
                    "delivery recorder stopped; the claim will be retried after its lease"
                );
            }
        }
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
