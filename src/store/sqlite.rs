//! The SQLite store: one file, WAL journal, `synchronous=FULL`.
//!
//! Group-commit batches become a handful of multi-row statements in one
//! transaction (each statement through sqlx costs a thread hand-off, so one
//! INSERT per row would throw away most of what batching buys).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{
    Arguments, Connection, Encode, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool, Type,
};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::recent::{Entry, RecentKeys};
use super::rows::{
    alarm_from_row, join_claims, json_list, millis, outbox_from_row, parse_id,
    update_outbox_from_v, ALARM_SELECT, OUTBOX_FIELDS,
};
use super::{
    AlarmOutcome, Batch, OutboxRow, ProgressReport, ProgressResult, ProgressState, QuarantineEntry,
    QuarantineRow, StageTime, StoreError,
};
use crate::deliver::plan::{Decision, Plan};
use crate::deliver::{AttemptRecord, Claimed};
use crate::model::{from_millis, to_millis, Alarm, AlarmId, SourceKind};

/// Bound parameters per statement; SQLite allows 32,766.
const MAX_PARAMS: usize = 32_000;
const ALARM_COLUMNS: usize = 23;
const QUARANTINE_COLUMNS: usize = 9;
const OUTBOX_COLUMNS: usize = 8;
const STAGE_COLUMNS: usize = 6;
const OUTCOME_COLUMNS: usize = 10;

/// Rows per multi-row statement for a table of `columns`: a power of two, so
/// that padding a statement's rows ([`MultiRow`]) never goes past
/// [`MAX_PARAMS`].
const fn rows_per_statement(columns: usize) -> usize {
    1 << (MAX_PARAMS / columns).ilog2()
}

/// One kind of multi-row statement: `head`, then `VALUES (?, …), …`, then
/// `tail`, its rows padded with NULL rows up to the next power of two.
///
/// SQLite compiles each statement text, and sqlx keeps compiled statements by
/// their text. With a row count that follows the batch, nearly every write
/// was compiled afresh, which took a fifth of the writer thread's time. With
/// padding a table has a dozen texts at most, each compiled once; the NULL
/// rows are filtered out (`WHERE column1 IS NOT NULL`) or match nothing. Each
/// text is also built once and kept: writing it out again for every batch,
/// placeholder by placeholder (sqlx's `QueryBuilder`), took about a seventh
/// of the store's instructions.
struct MultiRow {
    head: &'static str,
    tail: &'static str,
    columns: usize,
    /// The text for 2^i rows at index i.
    texts: [OnceLock<String>; 16],
}

impl MultiRow {
    const fn new(head: &'static str, columns: usize, tail: &'static str) -> MultiRow {
        MultiRow {
            head,
            tail,
            columns,
            texts: [const { OnceLock::new() }; 16],
        }
    }

    /// The text for `rows` rows, a power of two.
    fn text(&self, rows: usize) -> Option<&str> {
        let cell = self.texts.get(rows.trailing_zeros() as usize)?;
        Some(cell.get_or_init(|| {
            let row = format!("({})", vec!["?"; self.columns].join(", "));
            let mut text = String::with_capacity(
                self.head.len() + 7 + rows * (row.len() + 2) + self.tail.len(),
            );
            text.push_str(self.head);
            text.push_str("VALUES ");
            for i in 0..rows {
                if i > 0 {
                    text.push_str(", ");
                }
                text.push_str(&row);
            }
            text.push_str(self.tail);
            text
        }))
    }

    /// Arguments for `rows` rows of this statement.
    fn rows<'q>(&'static self, rows: usize) -> Rows<'q> {
        let mut args = SqliteArguments::default();
        args.reserve(rows * self.columns, 0);
        Rows {
            statement: self,
            rows,
            bound: 0,
            args,
            error: None,
        }
    }
}

/// The arguments of one [`MultiRow`] statement, bound row after row, column
/// after column.
struct Rows<'q> {
    statement: &'static MultiRow,
    rows: usize,
    bound: usize,
    args: SqliteArguments<'q>,
    error: Option<BoxDynError>,
}

impl<'q> Rows<'q> {
    fn bind<T: 'q + Encode<'q, Sqlite> + Type<Sqlite>>(&mut self, value: T) -> &mut Self {
        if let Err(e) = self.args.add(value) {
            self.error.get_or_insert(e);
        }
        self.bound += 1;
        self
    }

    /// The statement with its rows, padded with NULL rows: the padding's
    /// parameters are left unbound, which SQLite reads as NULL (sqlx clears
    /// a statement's bindings before it binds, and stops at the last value
    /// given).
    fn query(self) -> Result<Query<'q, Sqlite, SqliteArguments<'q>>, StoreError> {
        let MultiRow { head, columns, .. } = *self.statement;
        if self.bound != self.rows * columns {
            return Err(StoreError::Database(sqlx::Error::Protocol(format!(
                "{} values bound for {} rows of {columns} columns ({head}…)",
                self.bound, self.rows
            ))));
        }
        let padded = self.rows.next_power_of_two();
        let text = self.statement.text(padded).ok_or_else(|| {
            StoreError::Database(sqlx::Error::Protocol(format!(
                "{padded} rows in one statement ({head}…)"
            )))
        })?;
        match self.error {
            Some(e) => Err(StoreError::Database(sqlx::Error::Encode(e))),
            None => Ok(sqlx::query_with(text, self.args)),
        }
    }
}

/// The rows go in in the order of their values, each with a rowid one above
/// the table's highest: a statement that inserted `n` rows gave them the
/// `n` rowids up to its last one. Returning each row's rowid and key instead
/// sent every row back across the database thread's channel.
static INSERT_ALARMS: MultiRow = MultiRow::new(
    "INSERT INTO alarms (id, tenant, device_id, account, seq, class, priority, \
     restore, zone, sensor, battery_pct, rssi, lat, lon, text, raised_at, \
     received_at, stored_at, source_kind, source_id, source_code, raw, dedupe_key) \
     SELECT * FROM (",
    ALARM_COLUMNS,
    ") WHERE column1 IS NOT NULL",
);

/// A new row is `pending`, and stored, routed and due when its batch is
/// stored: written into the text instead of bound for every row.
static INSERT_OUTBOX: MultiRow = MultiRow::new(
    "INSERT INTO outbox (alarm_id, priority, state, contract_id, chain, \
     failover_after_ms, stored_at, routed_at, due_at, lease_owner, lease_until) \
     SELECT column1, column2, 'pending', column3, column4, column5, \
     column6, column6, column6, column7, column8 FROM (",
    OUTBOX_COLUMNS,
    ") WHERE column1 IS NOT NULL",
);

/// An attempt's stage rows from one row of values: the attempt, then its
/// acceptance (`outcome` 1) or the alarm's dead letter (`outcome` 2). Each
/// text bound costs two copies and two frees (sqlx's and SQLite's), so the
/// id, provider and detail are bound once and the stage names are written
/// into the text. `NOT MATERIALIZED`: the values are read three times, in
/// place, not copied into a temporary table first.
static INSERT_STAGES: MultiRow = MultiRow::new(
    "WITH v(alarm_id, started_at, provider, detail, outcome, finished_at) \
     AS NOT MATERIALIZED (",
    STAGE_COLUMNS,
    ") INSERT INTO alarm_stages (alarm_id, stage, at, provider, detail) \
     SELECT alarm_id, 'attempt', started_at, provider, detail FROM v \
     WHERE alarm_id IS NOT NULL \
     UNION ALL SELECT alarm_id, 'accepted', finished_at, provider, detail FROM v \
     WHERE outcome = 1 \
     UNION ALL SELECT alarm_id, 'dead_letter', finished_at, NULL, \
     'every provider rejected the alarm' FROM v WHERE outcome = 2",
);

static UPDATE_OUTCOMES: MultiRow = MultiRow::new(
    "WITH v(alarm_id, state, position, rejected, exhausted, attempts, \
     provider_attempts, due_at, accepted_at, accepted_by) AS (",
    OUTCOME_COLUMNS,
    concat!(
        ") ",
        update_outbox_from_v!(),
        "FROM v WHERE outbox.alarm_id = v.alarm_id"
    ),
);

/// An SQLite database: a pool of connections for reading, and one
/// connection that every write of this process goes through.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Writers of this process take turns here. SQLite allows one writer at
    /// a time; a connection that finds the file locked sleeps in growing
    /// steps (1, 2, 5, 10 ms, …) before it tries again, whereas a queue
    /// hands the turn on the moment the previous writer is done.
    writer: Arc<Mutex<Writer>>,
}

/// What a turn at writing holds: the connection writes go through and the
/// recent dedupe keys, which only a writer may read or change.
///
/// One connection for every write keeps SQLite's page cache: in WAL mode a
/// connection drops its whole cache when it finds that another connection
/// has written since its last transaction, so writers that alternate between
/// connections each start cold.
#[derive(Debug)]
pub(super) struct Writer {
    pub(super) recent: RecentKeys,
    conn: Option<SqliteConnection>,
    /// Set when a transaction could not begin: the connection is opened
    /// again for the next turn.
    broken: bool,
    options: SqliteConnectOptions,
}

/// A turn at writing; see [`SqliteStore::write_turn`].
pub(super) type WriteTurn = OwnedMutexGuard<Writer>;

impl Writer {
    /// A write transaction on the writer's connection, and the recent keys.
    /// `BEGIN IMMEDIATE` takes the write lock up front: a deferred
    /// transaction that reads first and writes later fails at once with
    /// SQLITE_BUSY when another process wrote in between, and the busy
    /// timeout cannot help it.
    pub(super) async fn begin(
        &mut self,
    ) -> Result<(&mut RecentKeys, sqlx::Transaction<'_, Sqlite>), StoreError> {
        let Writer {
            recent,
            conn,
            broken,
            options,
        } = self;
        let conn = open(conn, broken, options).await?;
        match conn.begin_with("BEGIN IMMEDIATE").await {
            Ok(tx) => Ok((recent, tx)),
            Err(e) => {
                *broken = true;
                Err(e.into())
            }
        }
    }

    /// The writer's connection for a single statement outside a transaction.
    async fn conn(&mut self) -> Result<&mut SqliteConnection, StoreError> {
        open(&mut self.conn, &mut self.broken, &self.options).await
    }

    async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}

/// The writer's connection, opened again when it was marked broken or is
/// missing.
async fn open<'c>(
    conn: &'c mut Option<SqliteConnection>,
    broken: &mut bool,
    options: &SqliteConnectOptions,
) -> Result<&'c mut SqliteConnection, StoreError> {
    if std::mem::take(broken) {
        if let Some(old) = conn.take() {
            let _ = old.close().await;
        }
    }
    Ok(match conn {
        Some(c) => c,
        slot @ None => slot.insert(SqliteConnection::connect_with(options).await?),
    })
}

impl SqliteStore {
    /// The connection pool, for the operator queries of `admin.rs`.
    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Opens (creating when missing) and migrates the database at `path`.
    ///
    /// # Errors
    /// When the folder cannot be created or the database cannot be opened.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: path.display().to_string(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            // The schema declares its references, and every write keeps
            // them (an alarm's outbox row in the alarm's transaction, stages
            // only for stored alarms, retention deleting children first;
            // the tests check with `PRAGMA foreign_key_check`). Enforcing
            // them looked up the alarm's key for every outbox and stage row
            // written: 7 % of a delivered alarm's store instructions.
            .foreign_keys(false)
            // A multi-row INSERT inside a transaction keeps a statement
            // journal; past 64 KiB SQLite spills it to a temporary file,
            // which costs an open, writes and a close per batch.
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let conn = SqliteConnection::connect_with(&options).await?;
        Ok(SqliteStore {
            pool,
            writer: Arc::new(Mutex::new(Writer {
                recent: RecentKeys::default(),
                conn: Some(conn),
                broken: false,
                options,
            })),
        })
    }

    /// Waits for this process's turn to write; hold it until the write has
    /// committed.
    pub(super) async fn write_turn(&self) -> WriteTurn {
        self.writer.clone().lock_owned().await
    }

    pub(super) async fn commit_batch(
        &self,
        batch: &Batch,
        stored_at: DateTime<Utc>,
        dedupe_since: DateTime<Utc>,
    ) -> Result<Vec<AlarmOutcome>, StoreError> {
        let since_ms = to_millis(dedupe_since);
        let mut turn = self.write_turn().await;
        let (recent, mut tx) = turn.begin().await?;
        catch_up(recent, &mut tx, since_ms).await?;
        recent.expire(since_ms);

        // Which keys are already stored within the window? The set names
        // candidates; their rows decide.
        let mut candidates: Vec<i64> = batch
            .alarms
            .iter()
            .filter_map(|b| recent.candidate(b.alarm.dedupe_key.as_str()))
            .map(|e| e.rowid)
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        let mut existing: HashMap<String, AlarmId> = HashMap::new();
        for chunk in candidates.chunks(MAX_PARAMS) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT id, dedupe_key, received_at FROM alarms WHERE rowid IN (",
            );
            let mut list = q.separated(", ");
            for rowid in chunk {
                list.push_bind(*rowid);
            }
            list.push_unseparated(")");
            for row in q.build().fetch_all(&mut *tx).await? {
                let received_at: i64 = row.try_get("received_at")?;
                if received_at >= since_ms {
                    let id: String = row.try_get("id")?;
                    existing.insert(row.try_get("dedupe_key")?, parse_id(&id)?);
                }
            }
        }

        // Decide per alarm; a key seen earlier in this batch is a duplicate too.
        let mut outcomes = Vec::with_capacity(batch.alarms.len());
        let mut fresh = Vec::with_capacity(batch.alarms.len());
        for b in &batch.alarms {
            match existing.get(b.alarm.dedupe_key.as_str()) {
                Some(first) => outcomes.push(AlarmOutcome::Duplicate(*first)),
                None => {
                    existing.insert(b.alarm.dedupe_key.as_str().to_owned(), b.id);
                    outcomes.push(AlarmOutcome::Stored(b.id));
                    fresh.push((b.id.to_string(), b));
                }
            }
        }

        let stored_ms = to_millis(stored_at);
        let mut inserted = Vec::with_capacity(fresh.len());
        for chunk in fresh.chunks(rows_per_statement(ALARM_COLUMNS)) {
            let mut row = INSERT_ALARMS.rows(chunk.len());
            for (id, b) in chunk {
                let a = &b.alarm;
                let d = &a.details;
                row.bind(id.as_str())
                    .bind(a.tenant.as_str())
                    .bind(a.device_id.as_str())
                    .bind(a.account.as_deref())
                    .bind(a.seq.map(|s| s as i64))
                    .bind(a.class.name())
                    .bind(i64::from(a.priority().number()))
                    .bind(a.restore)
                    .bind(d.zone.map(i64::from))
                    .bind(d.sensor.as_deref())
                    .bind(d.battery_pct.map(i64::from))
                    .bind(d.rssi.map(i64::from))
                    .bind(d.lat)
                    .bind(d.lon)
                    .bind(d.text.as_deref())
                    .bind(a.raised_at.map(to_millis))
                    .bind(to_millis(a.received_at))
                    .bind(stored_ms)
                    .bind(a.source.kind.name())
                    .bind(a.source.id.as_str())
                    .bind(a.source.code.as_str())
                    .bind(a.raw.as_slice())
                    .bind(a.dedupe_key.as_str());
            }
            let done = row.query()?.execute(&mut *tx).await?;
            let n = chunk.len() as u64;
            if done.rows_affected() != n {
                return Err(StoreError::Corrupt(format!(
                    "{} of {n} alarm rows inserted",
                    done.rows_affected()
                )));
            }
            let first = done.last_insert_rowid() - n as i64 + 1;
            inserted.extend(chunk.iter().zip(first..).map(|((_, b), rowid)| {
                let entry = Entry {
                    rowid,
                    received_at: to_millis(b.alarm.received_at),
                };
                (b.alarm.dedupe_key.as_str(), entry)
            }));
        }
        // The last use of the ids: handed over, not copied (sqlx copies a
        // borrowed text on its way to the database thread).
        for chunk in fresh.chunks_mut(rows_per_statement(OUTBOX_COLUMNS)) {
            let mut row = INSERT_OUTBOX.rows(chunk.len());
            for (id, b) in chunk {
                let chain = serde_json::to_string(&b.route.chain).unwrap_or_else(|_| "[]".into());
                let (lease_owner, lease_until) = batch.lease_of(b);
                row.bind(std::mem::take(id))
                    .bind(i64::from(b.alarm.priority().number()))
                    .bind(b.route.contract_id.as_deref())
                    .bind(chain)
                    .bind(millis(b.route.failover_after))
                    .bind(stored_ms)
                    .bind(lease_owner)
                    .bind(lease_until);
            }
            row.query()?.execute(&mut *tx).await?;
        }
        for chunk in batch.quarantine.chunks(MAX_PARAMS / QUARANTINE_COLUMNS) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO quarantine (received_at, source_kind, source_id, reference, tenant, \
                 device_id, reason, detail, raw) ",
            );
            q.push_values(chunk, |mut row, e| {
                row.push_bind(to_millis(e.received_at))
                    .push_bind(e.source_kind.name())
                    .push_bind(e.source_id.as_str())
                    .push_bind(e.reference.as_str())
                    .push_bind(e.tenant.as_deref())
                    .push_bind(e.device_id.as_deref())
                    .push_bind(e.reason.as_str())
                    .push_bind(e.detail.as_str())
                    .push_bind(e.raw.as_slice());
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        for (key, entry) in inserted {
            recent.insert(key, entry);
        }
        Ok(outcomes)
    }

    pub(super) async fn alarm(&self, id: AlarmId) -> Result<Option<Alarm>, StoreError> {
        let row = sqlx::query(&format!("{ALARM_SELECT} WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| alarm_from_row(&r)).transpose()
    }

    pub(super) async fn alarms_of_device(
        &self,
        tenant: &str,
        device_id: &str,
    ) -> Result<Vec<Alarm>, StoreError> {
        let rows = sqlx::query(&format!(
            "{ALARM_SELECT} WHERE tenant = ? AND device_id = ? ORDER BY id"
        ))
        .bind(tenant)
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alarm_from_row).collect()
    }

    pub(super) async fn stage_times(&self, id: AlarmId) -> Result<Vec<StageTime>, StoreError> {
        let id = id.to_string();
        let mut stages = Vec::new();
        if let Some(row) =
            sqlx::query("SELECT raised_at, received_at, stored_at FROM alarms WHERE id = ?")
                .bind(&id)
                .fetch_optional(&self.pool)
                .await?
        {
            for stage in ["raised", "received", "stored"] {
                let at: Option<i64> = row.try_get(format!("{stage}_at").as_str())?;
                if let Some(at) = at {
                    stages.push(StageTime {
                        stage: stage.to_owned(),
                        at: from_millis(at),
                        provider: None,
                        detail: None,
                    });
                }
            }
        }
        if let Some(row) =
            sqlx::query("SELECT routed_at, contract_id FROM outbox WHERE alarm_id = ?")
                .bind(&id)
                .fetch_optional(&self.pool)
                .await?
        {
            let contract: Option<String> = row.try_get("contract_id")?;
            stages.push(StageTime {
                stage: "routed".to_owned(),
                at: from_millis(row.try_get("routed_at")?),
                provider: None,
                detail: Some(contract.unwrap_or_else(|| "uncontracted".to_owned())),
            });
        }
        let rows = sqlx::query(
            "SELECT stage, at, provider, detail FROM alarm_stages WHERE alarm_id = ? \
             ORDER BY at, rowid",
        )
        .bind(&id)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            stages.push(StageTime {
                stage: row.try_get("stage")?,
                at: from_millis(row.try_get("at")?),
                provider: row.try_get("provider")?,
                detail: row.try_get("detail")?,
            });
        }
        Ok(stages)
    }

    pub(super) async fn count_alarms(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM alarms")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) async fn count_outbox_pending(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) async fn quarantine(&self, limit: u32) -> Result<Vec<QuarantineRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, received_at, source_kind, source_id, reference, tenant, device_id, \
             reason, detail, raw FROM quarantine ORDER BY id DESC LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("source_kind")?;
                Ok(QuarantineRow {
                    id: r.try_get("id")?,
                    entry: QuarantineEntry {
                        received_at: from_millis(r.try_get("received_at")?),
                        source_kind: SourceKind::from_str(&kind)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        source_id: r.try_get("source_id")?,
                        reference: r.try_get("reference")?,
                        tenant: r.try_get("tenant")?,
                        device_id: r.try_get("device_id")?,
                        reason: r.try_get("reason")?,
                        detail: r.try_get("detail")?,
                        raw: r.try_get("raw")?,
                    },
                })
            })
            .collect()
    }

    pub(super) async fn release_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let mut turn = self.write_turn().await;
        let done = sqlx::query(
            "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
        )
        .bind(owner)
        .execute(turn.conn().await?)
        .await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn claim_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let now_ms = to_millis(now);
        let mut turn = self.write_turn().await;
        let rows = sqlx::query(
            "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE alarm_id IN ( \
                 SELECT alarm_id FROM outbox WHERE state = 'pending' AND due_at <= ? \
                 AND (lease_until IS NULL OR lease_until <= ?) \
                 ORDER BY priority, due_at LIMIT ?) \
             RETURNING alarm_id, priority, due_at, contract_id, chain, position, rejected, \
                 exhausted, attempts, provider_attempts, failover_after_ms, stored_at",
        )
        .bind(owner)
        .bind(to_millis(lease_until))
        .bind(now_ms)
        .bind(now_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(turn.conn().await?)
        .await?;
        drop(turn);
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut plans = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get("alarm_id")?;
            let priority: i64 = r.try_get("priority")?;
            let due: i64 = r.try_get("due_at")?;
            let plan = Plan {
                chain: json_list(r.try_get("chain")?)?,
                position: usize::try_from(r.try_get::<i64, _>("position")?).unwrap_or(0),
                rejected: json_list(r.try_get("rejected")?)?,
                exhausted: r.try_get("exhausted")?,
                attempts: u32::try_from(r.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
                provider_attempts: u32::try_from(r.try_get::<i64, _>("provider_attempts")?)
                    .unwrap_or(u32::MAX),
                stored_at: from_millis(r.try_get("stored_at")?),
                failover_after: Duration::from_millis(
                    u64::try_from(r.try_get::<i64, _>("failover_after_ms")?).unwrap_or(0),
                ),
            };
            let contract_id: Option<String> = r.try_get("contract_id")?;
            plans.push((priority, due, id, contract_id, plan));
        }
        plans.sort_by_key(|p| (p.0, p.1));
        let mut alarms: HashMap<String, Alarm> = HashMap::with_capacity(plans.len());
        for chunk in plans.chunks(MAX_PARAMS) {
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new(format!("{ALARM_SELECT} WHERE id IN ("));
            let mut list = q.separated(", ");
            for (_, _, id, _, _) in chunk {
                list.push_bind(id.as_str());
            }
            list.push_unseparated(")");
            for row in q.build().fetch_all(&self.pool).await? {
                let alarm = alarm_from_row(&row)?;
                alarms.insert(alarm.id.to_string(), alarm);
            }
        }
        join_claims(plans, alarms, lease_until)
    }

    pub(super) async fn record_attempts(
        &self,
        records: &[AttemptRecord],
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut turn = self.write_turn().await;
        let (_, mut tx) = turn.begin().await?;
        // Each alarm's id is written out once: read by the stage rows, then
        // handed over to the outbox rows' update.
        let mut ids: Vec<String> = records.iter().map(|r| r.alarm_id.to_string()).collect();
        // Stage rows: the attempt, then an acceptance or a dead letter.
        let per = rows_per_statement(STAGE_COLUMNS);
        for (chunk, ids) in records.chunks(per).zip(ids.chunks(per)) {
            let mut row = INSERT_STAGES.rows(chunk.len());
            for (r, id) in chunk.iter().zip(ids) {
                let outcome = match r.decision {
                    Decision::Delivered => Some(1_i64),
                    Decision::DeadLetter { .. } => Some(2),
                    Decision::Retry { .. } => None,
                };
                row.bind(id.as_str())
                    .bind(to_millis(r.started_at))
                    .bind(r.provider.as_str())
                    .bind(r.detail.as_str())
                    .bind(outcome)
                    .bind(to_millis(r.finished_at));
            }
            row.query()?.execute(&mut *tx).await?;
        }
        // Outbox rows: the new state, claims released.
        let per = rows_per_statement(OUTCOME_COLUMNS);
        for (chunk, ids) in records.chunks(per).zip(ids.chunks_mut(per)) {
            let mut row = UPDATE_OUTCOMES.rows(chunk.len());
            for (r, id) in chunk.iter().zip(ids) {
                let (state, plan, due, accepted_at, accepted_by) = match &r.decision {
                    Decision::Delivered => (
                        "delivered",
                        None,
                        r.finished_at,
                        Some(to_millis(r.finished_at)),
                        Some(r.provider.as_str()),
                    ),
                    Decision::Retry { plan, due_at } => {
                        ("pending", Some(plan), *due_at, None, None)
                    }
                    Decision::DeadLetter { plan } => {
                        ("dead_letter", Some(plan), r.finished_at, None, None)
                    }
                };
                row.bind(std::mem::take(id))
                    .bind(state)
                    .bind(plan.map(|p| i64::try_from(p.position).unwrap_or(0)))
                    .bind(plan.map(|p| {
                        serde_json::to_string(&p.rejected).unwrap_or_else(|_| "[]".into())
                    }))
                    .bind(plan.map(|p| p.exhausted))
                    .bind(plan.map(|p| i64::from(p.attempts)))
                    .bind(plan.map(|p| i64::from(p.provider_attempts)))
                    .bind(to_millis(due))
                    .bind(accepted_at)
                    .bind(accepted_by);
            }
            row.query()?.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn outbox_row(&self, id: AlarmId) -> Result<Option<OutboxRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {OUTBOX_FIELDS} FROM outbox WHERE alarm_id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| outbox_from_row(&r)).transpose()
    }

    pub(super) async fn attempted_by(
        &self,
        id: AlarmId,
        provider: &str,
    ) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM alarm_stages WHERE alarm_id = ? AND stage = 'attempt' AND provider = ? LIMIT 1",
        )
        .bind(id.to_string())
        .bind(provider)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    pub(super) async fn record_progress(
        &self,
        report: &ProgressReport,
    ) -> Result<ProgressResult, StoreError> {
        let id = report.alarm_id.to_string();
        let mut turn = self.write_turn().await;
        let (_, mut tx) = turn.begin().await?;
        let states: Vec<String> = sqlx::query_scalar(
            "SELECT stage FROM alarm_stages WHERE alarm_id = ? AND stage IN ('answered', 'resolved')",
        )
        .bind(&id)
        .fetch_all(&mut *tx)
        .await?;
        let has = |s: ProgressState| states.iter().any(|x| x == s.name());
        // Going backwards is checked first: once resolved, `answered` is
        // refused even when it was reported before.
        if report.state == ProgressState::Answered && has(ProgressState::Resolved) {
            return Ok(ProgressResult::Backwards);
        }
        if has(report.state) {
            return Ok(ProgressResult::Repeated);
        }
        sqlx::query(
            "INSERT OR IGNORE INTO alarm_stages (alarm_id, stage, at, provider, detail, reported_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(report.state.name())
        .bind(to_millis(report.at))
        .bind(&report.provider)
        .bind(report.outcome.as_deref())
        .bind(to_millis(report.reported_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ProgressResult::Recorded)
    }

    pub(super) async fn count_delivered(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE state = 'delivered'")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) async fn sla_rows(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::sla::SlaRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.contract_id, a.received_at, o.accepted_at, o.accepted_by, o.chain, \
                 (SELECT s.at FROM alarm_stages s \
                  WHERE s.alarm_id = a.id AND s.stage = 'answered') AS answered_at \
             FROM alarms a JOIN outbox o ON o.alarm_id = a.id \
             WHERE a.received_at >= ? AND a.received_at < ?",
        )
        .bind(to_millis(from))
        .bind(to_millis(to))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let chain = json_list(r.try_get("chain")?)?;
                let accepted_by: Option<String> = r.try_get("accepted_by")?;
                Ok(crate::sla::SlaRow {
                    contract_id: r.try_get("contract_id")?,
                    received_at: from_millis(r.try_get("received_at")?),
                    accepted_at: r.try_get::<Option<i64>, _>("accepted_at")?.map(from_millis),
                    by_fallback: accepted_by.is_some_and(|p| chain.first() != Some(&p)),
                    answered_at: r.try_get::<Option<i64>, _>("answered_at")?.map(from_millis),
                })
            })
            .collect()
    }

    pub(super) async fn close(&self) {
        self.writer.lock().await.close().await;
        self.pool.close().await;
    }
}

/// Brings the recent-key set up to date inside a write transaction: loads
/// the window on first use, then folds in the rows other processes stored
/// since (rowids only grow while rows are appended). Should the highest
/// rowid have gone down (the newest rows deleted), the set is loaded again.
async fn catch_up(
    recent: &mut RecentKeys,
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    since_ms: i64,
) -> Result<(), StoreError> {
    if let Some(seen) = recent.seen() {
        let (newer, top) = stored_keys(tx, "rowid > ?", seen).await?;
        if top >= seen {
            for (key, entry) in newer {
                recent.insert(&key, entry);
            }
            return Ok(());
        }
        recent.reset();
    }
    let (window, top) = stored_keys(tx, "received_at >= ?", since_ms).await?;
    for (key, entry) in window {
        recent.insert(&key, entry);
    }
    recent.loaded_to(top);
    tracing::debug!(keys = recent.len(), "recent dedupe keys loaded");
    Ok(())
}

/// The keys of the alarms that `filter` (one `?`, bound to `bound`)
/// selects, in rowid order, and the table's highest rowid (0 when empty).
async fn stored_keys(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    filter: &'static str,
    bound: i64,
) -> Result<(Vec<(String, Entry)>, i64), StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT rowid AS rowid, dedupe_key, received_at FROM alarms WHERE {filter} \
         UNION ALL SELECT max(rowid), NULL, NULL FROM alarms"
    ))
    .bind(bound)
    .fetch_all(&mut **tx)
    .await?;
    let mut top = 0;
    let mut keys = Vec::with_capacity(rows.len());
    for row in &rows {
        match key_entry(row)? {
            Some(key) => keys.push(key),
            None => top = row.try_get::<Option<i64>, _>("rowid")?.unwrap_or(0),
        }
    }
    keys.sort_by_key(|(_, e)| e.rowid);
    Ok((keys, top))
}

/// A `(rowid, dedupe_key, received_at)` row as a recent key; `None` for a
/// row without a key (the highest-rowid row of [`stored_keys`]).
fn key_entry(row: &SqliteRow) -> Result<Option<(String, Entry)>, StoreError> {
    let Some(key) = row.try_get::<Option<String>, _>("dedupe_key")? else {
        return Ok(None);
    };
    let entry = Entry {
        rowid: row.try_get("rowid")?,
        received_at: row.try_get("received_at")?,
    };
    Ok(Some((key, entry)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_statements_stay_within_the_parameter_limit() {
        for columns in [
            ALARM_COLUMNS,
            OUTBOX_COLUMNS,
            STAGE_COLUMNS,
            OUTCOME_COLUMNS,
        ] {
            let rows = rows_per_statement(columns);
            assert!(rows.is_power_of_two());
            assert!(rows * columns <= MAX_PARAMS, "{columns} columns");
            assert!(rows * 2 * columns > MAX_PARAMS, "{columns} columns");
        }
    }

    #[test]
    fn a_statement_is_padded_to_a_power_of_two_rows_with_its_text_built_once() {
        use sqlx::Execute;
        static PAIRS: MultiRow = MultiRow::new(
            "INSERT INTO t (a, b) SELECT * FROM (",
            2,
            ") WHERE column1 IS NOT NULL",
        );
        for n in 1..=70_usize {
            let mut rows = PAIRS.rows(n);
            for i in 0..n {
                rows.bind(i64::try_from(i).unwrap()).bind("x");
            }
            let query = rows.query().unwrap();
            let text = query.sql();
            let padded = n.next_power_of_two();
            assert_eq!(text.matches("(?, ?)").count(), padded, "{n} rows");
            assert!(text.starts_with("INSERT INTO t (a, b) SELECT * FROM (VALUES (?, ?)"));
            assert!(text.ends_with("(?, ?)) WHERE column1 IS NOT NULL"));
            assert!(std::ptr::eq(text, PAIRS.text(padded).unwrap()));
        }
    }

    #[test]
    fn a_row_bound_short_is_an_error_not_a_statement() {
        static PAIRS: MultiRow = MultiRow::new("INSERT INTO t (a, b) ", 2, "");
        let mut rows = PAIRS.rows(2);
        rows.bind(1_i64).bind("x").bind(2_i64);
        assert!(rows.query().is_err());
    }
}
