//! Delivery: from the outbox to the providers.
//!
//! # Design
//! Every stored alarm has an outbox row carrying its route (contract, provider
//! chain, failover time) and where it stands in that chain ([`plan::Plan`]).
//! The [`Dispatcher`] claims due rows with a lease in priority order
//! (critical first), delivers each through its provider's adapter and hands
//! the outcome to a recorder that writes attempts in batches, one
//! transaction per batch.
//!
//! - A claim is a lease (`lease_owner`, `lease_until`): while it holds,
//!   no other claim takes the row; when a process dies, its rows become due
//!   again once the lease expires, and an instance releases its own old
//!   claims at start-up. So an alarm is never lost between "stored" and
//!   "accepted by a provider"; at worst it is delivered twice under one
//!   alarm id, which the `Idempotency-Key` lets the provider recognise.
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
use crate::store::Store;

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
        match priority {
            Priority::Critical | Priority::Urgent => Lane::Life,
            Priority::Technical | Priority::Routine => Lane::Technical,
        }
    }
}

/// Why the dispatcher could not be built.
#[derive(Debug, thiserror::Error)]
#[error("provider {id}: cannot build the HTTP client: {source}")]
pub struct BuildError {
    id: String,
    source: reqwest::Error,
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
    /// Rung after each ingest commit and each recorded batch, so new and
    /// due-now work is claimed at once instead of at the next poll.
    wake: Arc<Notify>,
}

impl Dispatcher {
    /// # Errors
    /// When a provider's HTTP client cannot be built.
    pub fn new(
        config: &Config,
        store: Store,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
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
            wake,
        })
    }

    /// Delivers until `cancel` fires, then lets in-flight attempts finish
    /// and records them.
    pub async fn run(self, cancel: CancellationToken) {
        match self.store.release_leases(&self.config.instance_id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "released this instance's earlier outbox claims"),
            Err(e) => tracing::error!(error = %e, "cannot release earlier outbox claims"),
        }
        let (results_tx, results_rx) = mpsc::channel(self.config.claim_batch.max(1) * 4);
        let recorder = record_loop(
            self.store.clone(),
            results_rx,
            self.wake.clone(),
            self.metrics.clone(),
        );
        let claimer = self.claim_loop(results_tx, cancel);
        tokio::join!(claimer, recorder);
        tracing::debug!("dispatcher stopped");
    }

    async fn claim_loop(&self, results: mpsc::Sender<AttemptRecord>, cancel: CancellationToken) {
        let mut in_flight = JoinSet::new();
        let limit = self.config.claim_batch.max(1);
        loop {
            while in_flight.try_join_next().is_some() {}
            let room = limit.saturating_sub(in_flight.len());
            let mut claimed_all = false;
            if room > 0 {
                let now = self.clock.now();
                let until = add(now, self.config.lease);
                match self
                    .store
                    .claim_due(&self.config.instance_id, now, until, room)
                    .await
                {
                    Ok(claimed) => {
                        claimed_all = claimed.len() == room;
                        for c in claimed {
                            in_flight.spawn(self.attempt(c, now, results.clone()));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot claim outbox rows"),
                }
            }
            if claimed_all {
                // More may be due; claim again once there is room.
                tokio::select! {
                    () = cancel.cancelled() => break,
                    Some(_) = in_flight.join_next() => {}
                }
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.poll) => {}
                Some(_) = in_flight.join_next(), if room == 0 => {}
            }
        }
        // Attempts already under way finish (each is bounded by its
        // provider's timeout) and are recorded; claims not started yet
        // keep their lease and are released at the next start.
        while in_flight.join_next().await.is_some() {}
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

/// Writes attempt outcomes in batches; retries a failed write (the rows stay
/// leased meanwhile, so nobody else delivers them).
async fn record_loop(
    store: Store,
    mut results: mpsc::Receiver<AttemptRecord>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::new();
    while results.recv_many(&mut batch, 1024).await > 0 {
        let mut pause = Duration::from_millis(100);
        while let Err(e) = store.record_attempts(&batch).await {
            Metrics::inc(&metrics.store_commit_failures);
            tracing::error!(error = %e, attempts = batch.len(), "cannot record delivery attempts; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        batch.clear();
        wake.notify_one();
    }
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}
