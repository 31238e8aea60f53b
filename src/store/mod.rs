//! The store: the source of truth for every alarm and what happened to it.
//!
//! # Guarantees
//! - [`Store::commit_batch`] writes a whole group-commit batch (new alarms,
//!   their outbox rows, quarantine rows) in one transaction. A sender is told
//!   its alarm is safe only after that transaction has committed; SQLite runs
//!   in WAL mode with `synchronous=FULL` and PostgreSQL with its default
//!   `synchronous_commit = on`, so a commit survives a power cut.
//! - De-duplication (DESIGN.md guarantee 3) happens inside the same
//!   transaction: a signal whose [`crate::model::DedupeKey`] matches an alarm received
//!   within the window gets that alarm's id back instead of a new row. This
//!   holds across gateway instances sharing one PostgreSQL database too: a
//!   batch locks its keys before it looks for them (see `postgres.rs`).
//!   SQLite finds the window's keys in memory instead of a disk index in
//!   key order, and catches up with other processes' rows under the write
//!   lock (see `recent.rs`).
//! - Every alarm gets an outbox row in the transaction that stores it, so no
//!   alarm can sit between "stored" and "queued for delivery".
//! - Claims are leases: a crashed instance's claims expire and the rows are
//!   claimed again. On PostgreSQL, instances claim with
//!   `FOR UPDATE SKIP LOCKED`, so no row is claimed by two at once.
//!
//! # Layout
//! The same tables and columns in both databases (`migrations/sqlite`,
//! `migrations/postgres`); the indexes differ only where de-duplication
//! does (SQLite indexes `received_at`, PostgreSQL the dedupe key):
//! - `alarms`: one row per alarm, with the ingest timestamps (`raised_at`,
//!   `received_at`, `stored_at`) as milliseconds since the epoch.
//! - `alarm_stages`: later stages (routed, attempts, accepted, answered,
//!   resolved), appended.
//! - `outbox`: alarms still to deliver, by priority and due time.
//! - `quarantine`: raw input that could not be accepted, with the reason.
//!
//! Backends are a closed set ([`Store`] is an enum): SQLite (`sqlite://…`,
//! the embedded default) and PostgreSQL (`postgres://…`, where several
//! instances share one database). Each builds its queries at run time and
//! batches into multi-row statements (SQLite: multi-row `VALUES`;
//! PostgreSQL: array binds and `UNNEST`).

mod admin;
mod postgres;
mod recent;
mod rows;
mod sqlite;

use chrono::{DateTime, Utc};

use crate::config::StoreUrl;
use crate::deliver::{AttemptRecord, Claimed};
use crate::model::{Alarm, AlarmId, NewAlarm, SourceKind};
use crate::route::Route;

pub use admin::{prune_periodically, Attention, ListedAlarm, Pruned};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Errors from the store. Any of them means "not committed": the sender must
/// not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the folder for {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

/// Raw input kept for inspection because it could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineEntry {
    pub received_at: DateTime<Utc>,
    pub source_kind: SourceKind,
    pub source_id: String,
    /// Where it came from within the source: the MQTT topic, the port.
    pub reference: String,
    /// Tenant and device, when the input said which.
    pub tenant: Option<String>,
    pub device_id: Option<String>,
    /// A short machine-readable reason (a metric label).
    pub reason: String,
    /// The explanation for a person.
    pub detail: String,
    pub raw: Vec<u8>,
}

/// A quarantine row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRow {
    pub id: i64,
    pub entry: QuarantineEntry,
}

/// What happened to one alarm of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmOutcome {
    /// Stored as a new alarm with this id.
    Stored(AlarmId),
    /// The same alarm was already stored (or came earlier in this batch).
    Duplicate(AlarmId),
}

impl AlarmOutcome {
    pub fn alarm_id(self) -> AlarmId {
        match self {
            AlarmOutcome::Stored(id) | AlarmOutcome::Duplicate(id) => id,
        }
    }
}

/// An alarm of a group-commit batch.
#[derive(Debug)]
pub struct BatchAlarm {
    /// The id it gets if it is not a duplicate.
    pub id: AlarmId,
    pub alarm: NewAlarm,
    /// Where it is to be delivered; stored with its outbox row.
    pub route: Route,
    /// Store its outbox row already claimed under the batch's [`Lease`]
    /// (when the batch has one), for this instance to deliver straight away.
    pub leased: bool,
}

/// A claim on outbox rows: nobody else claims them until it runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The instance that holds the rows.
    pub owner: String,
    pub until: DateTime<Utc>,
}

/// One group-commit batch.
#[derive(Debug, Default)]
pub struct Batch {
    pub alarms: Vec<BatchAlarm>,
    pub quarantine: Vec<QuarantineEntry>,
    /// The claim under which `leased` alarms are stored.
    pub lease: Option<Lease>,
}

impl Batch {
    /// The lease of an alarm's outbox row as stored: owner and expiry in
    /// milliseconds, or neither.
    fn lease_of(&self, alarm: &BatchAlarm) -> (Option<&str>, Option<i64>) {
        match &self.lease {
            Some(lease) if alarm.leased => (
                Some(lease.owner.as_str()),
                Some(crate::model::to_millis(lease.until)),
            ),
            _ => (None, None),
        }
    }
}

/// An answered/resolved report from a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressState {
    Answered,
    Resolved,
}

impl ProgressState {
    pub fn name(self) -> &'static str {
        match self {
            ProgressState::Answered => "answered",
            ProgressState::Resolved => "resolved",
        }
    }
}

/// A progress report to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressReport {
    pub alarm_id: AlarmId,
    pub provider: String,
    pub state: ProgressState,
    /// The provider's time for the state.
    pub at: DateTime<Utc>,
    /// When the gateway received the report.
    pub reported_at: DateTime<Utc>,
    pub outcome: Option<String>,
}

/// What recording a progress report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressResult {
    Recorded,
    /// The state was reported before; the first report's time is kept.
    Repeated,
    /// The alarm is already further along (answered after resolved).
    Backwards,
}

/// Where an alarm stands in delivery (an outbox row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// `pending`, `delivered` or `dead_letter`.
    pub state: String,
    pub contract_id: Option<String>,
    pub chain: Vec<String>,
    pub position: usize,
    pub rejected: Vec<String>,
    pub exhausted: bool,
    pub attempts: u32,
    pub due_at: DateTime<Utc>,
    pub routed_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub accepted_by: Option<String>,
}

/// A stage timestamp of an alarm, as [`Store::stage_times`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageTime {
    /// `raised`, `received`, `stored`, then the later stages.
    pub stage: String,
    pub at: DateTime<Utc>,
    pub provider: Option<String>,
    pub detail: Option<String>,
}

/// The store, whichever database is behind it. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Store {
    /// Opens the store at `url`, creating and migrating it as needed (a
    /// PostgreSQL database must exist; its tables are created).
    ///
    /// # Errors
    /// When the database cannot be opened or migrated.
    pub async fn open(url: &StoreUrl) -> Result<Store, StoreError> {
        match url {
            StoreUrl::Sqlite(path) => Ok(Store::Sqlite(SqliteStore::open(path).await?)),
            StoreUrl::Postgres(url) => Ok(Store::Postgres(PgStore::open(url).await?)),
        }
    }

    /// Writes a batch in one transaction and says, per alarm and in order,
    /// whether it was stored or was a duplicate. `stored_at` is the stored
    /// timestamp of the new rows; signals received since `dedupe_since` are
    /// candidates for de-duplication.
    ///
    /// # Errors
    /// When the transaction does not commit; then nothing of the batch is
    /// stored.
    pub async fn commit_batch(
        &self,
        batch: &Batch,
        stored_at: DateTime<Utc>,
        dedupe_since: DateTime<Utc>,
    ) -> Result<Vec<AlarmOutcome>, StoreError> {
        match self {
            Store::Sqlite(s) => s.commit_batch(batch, stored_at, dedupe_since).await,
            Store::Postgres(s) => s.commit_batch(batch, stored_at, dedupe_since).await,
        }
    }

    /// The alarm with this id.
    ///
    /// # Errors
    /// On a database failure or a corrupt row.
    pub async fn alarm(&self, id: AlarmId) -> Result<Option<Alarm>, StoreError> {
        match self {
            Store::Sqlite(s) => s.alarm(id).await,
            Store::Postgres(s) => s.alarm(id).await,
        }
    }

    /// Every stage timestamp of an alarm, oldest first.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn stage_times(&self, id: AlarmId) -> Result<Vec<StageTime>, StoreError> {
        match self {
            Store::Sqlite(s) => s.stage_times(id).await,
            Store::Postgres(s) => s.stage_times(id).await,
        }
    }

    /// How many alarms are stored.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn count_alarms(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.count_alarms().await,
            Store::Postgres(s) => s.count_alarms().await,
        }
    }

    /// Alarms of one device, oldest first.
    ///
    /// # Errors
    /// On a database failure or a corrupt row.
    pub async fn alarms_of_device(
        &self,
        tenant: &str,
        device_id: &str,
    ) -> Result<Vec<Alarm>, StoreError> {
        match self {
            Store::Sqlite(s) => s.alarms_of_device(tenant, device_id).await,
            Store::Postgres(s) => s.alarms_of_device(tenant, device_id).await,
        }
    }

    /// The newest quarantine rows, newest first.
    ///
    /// # Errors
    /// On a database failure or a corrupt row.
    pub async fn quarantine(&self, limit: u32) -> Result<Vec<QuarantineRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.quarantine(limit).await,
            Store::Postgres(s) => s.quarantine(limit).await,
        }
    }

    /// Outbox rows waiting for delivery.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn count_outbox_pending(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.count_outbox_pending().await,
            Store::Postgres(s) => s.count_outbox_pending().await,
        }
    }

    /// Drops the claims `owner` holds (its earlier life's, at start-up).
    ///
    /// # Errors
    /// On a database failure.
    pub async fn release_leases(&self, owner: &str) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.release_leases(owner).await,
            Store::Postgres(s) => s.release_leases(owner).await,
        }
    }

    /// Claims up to `limit` due outbox rows for `owner` until `lease_until`,
    /// most urgent first.
    ///
    /// # Errors
    /// On a database failure or a corrupt row.
    pub async fn claim_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        match self {
            Store::Sqlite(s) => s.claim_due(owner, now, lease_until, limit).await,
            Store::Postgres(s) => s.claim_due(owner, now, lease_until, limit).await,
        }
    }

    /// Records delivery attempts and their consequences in one transaction
    /// and releases the claims.
    ///
    /// # Errors
    /// On a database failure; then nothing is recorded.
    pub async fn record_attempts(&self, records: &[AttemptRecord]) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.record_attempts(records).await,
            Store::Postgres(s) => s.record_attempts(records).await,
        }
    }

    /// The delivery state of an alarm.
    ///
    /// # Errors
    /// On a database failure or a corrupt row.
    pub async fn outbox_row(&self, id: AlarmId) -> Result<Option<OutboxRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.outbox_row(id).await,
            Store::Postgres(s) => s.outbox_row(id).await,
        }
    }

    /// Whether the alarm was ever offered to `provider`: an attempt was
    /// made, or one is under way.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn offered_to(
        &self,
        id: AlarmId,
        provider: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        if let Some(row) = self.outbox_row(id).await? {
            let in_flight = row.lease_until.is_some_and(|until| until > now)
                && row.chain.get(row.position).is_some_and(|p| p == provider);
            if in_flight {
                return Ok(true);
            }
        }
        match self {
            Store::Sqlite(s) => s.attempted_by(id, provider).await,
            Store::Postgres(s) => s.attempted_by(id, provider).await,
        }
    }

    /// Records an answered/resolved report.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn record_progress(
        &self,
        report: &ProgressReport,
    ) -> Result<ProgressResult, StoreError> {
        match self {
            Store::Sqlite(s) => s.record_progress(report).await,
            Store::Postgres(s) => s.record_progress(report).await,
        }
    }

    /// How many alarms a provider has accepted.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn count_delivered(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.count_delivered().await,
            Store::Postgres(s) => s.count_delivered().await,
        }
    }

    /// The SLA rows of every alarm received in `[from, to)`.
    ///
    /// # Errors
    /// On a database failure or a corrupt row.
    pub async fn sla_rows(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::sla::SlaRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.sla_rows(from, to).await,
            Store::Postgres(s) => s.sla_rows(from, to).await,
        }
    }

    /// Closes the connections; later calls fail.
    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await,
            Store::Postgres(s) => s.close().await,
        }
    }
}
