//! The SQLite store: one file, WAL journal, `synchronous=FULL`.
//!
//! Group-commit batches become a handful of multi-row statements in one
//! transaction (each statement through sqlx costs a thread hand-off, so one
//! INSERT per row would throw away most of what batching buys).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::{AlarmOutcome, Batch, QuarantineEntry, QuarantineRow, StageTime, StoreError};
use crate::model::{
    from_millis, to_millis, Alarm, AlarmClass, AlarmDetails, AlarmId, Priority, SourceKind,
    SourceRef,
};

/// Bound parameters per statement; SQLite allows 32,766.
const MAX_PARAMS: usize = 32_000;
const ALARM_COLUMNS: usize = 23;
const QUARANTINE_COLUMNS: usize = 9;
const OUTBOX_COLUMNS: usize = 5;

const ALARM_SELECT: &str = "SELECT id, tenant, device_id, account, seq, class, priority, restore, \
     zone, sensor, battery_pct, rssi, lat, lon, text, raised_at, received_at, stored_at, \
     source_kind, source_id, source_code, raw FROM alarms";

/// An SQLite database behind a connection pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
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
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    pub(super) async fn commit_batch(
        &self,
        batch: &Batch,
        stored_at: DateTime<Utc>,
        dedupe_since: DateTime<Utc>,
    ) -> Result<Vec<AlarmOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;

        // Which keys are already stored within the window?
        let mut existing: HashMap<String, AlarmId> = HashMap::new();
        let keys: Vec<&str> = batch
            .alarms
            .iter()
            .map(|(_, a)| a.dedupe_key.as_str())
            .collect();
        for chunk in keys.chunks(MAX_PARAMS - 1) {
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT id, dedupe_key FROM alarms WHERE received_at >= ");
            q.push_bind(to_millis(dedupe_since));
            q.push(" AND dedupe_key IN (");
            let mut list = q.separated(", ");
            for key in chunk {
                list.push_bind(*key);
            }
            list.push_unseparated(") ORDER BY received_at");
            for row in q.build().fetch_all(&mut *tx).await? {
                let id: String = row.try_get("id")?;
                let key: String = row.try_get("dedupe_key")?;
                existing.entry(key).or_insert(parse_id(&id)?);
            }
        }

        // Decide per alarm; a key seen earlier in this batch is a duplicate too.
        let mut outcomes = Vec::with_capacity(batch.alarms.len());
        let mut fresh = Vec::with_capacity(batch.alarms.len());
        for (id, alarm) in &batch.alarms {
            match existing.get(alarm.dedupe_key.as_str()) {
                Some(first) => outcomes.push(AlarmOutcome::Duplicate(*first)),
                None => {
                    existing.insert(alarm.dedupe_key.as_str().to_owned(), *id);
                    outcomes.push(AlarmOutcome::Stored(*id));
                    fresh.push((id.to_string(), alarm));
                }
            }
        }

        let stored_ms = to_millis(stored_at);
        for chunk in fresh.chunks(MAX_PARAMS / ALARM_COLUMNS) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO alarms (id, tenant, device_id, account, seq, class, priority, \
                 restore, zone, sensor, battery_pct, rssi, lat, lon, text, raised_at, \
                 received_at, stored_at, source_kind, source_id, source_code, raw, dedupe_key) ",
            );
            q.push_values(chunk, |mut row, (id, a)| {
                let d = &a.details;
                row.push_bind(id.as_str())
                    .push_bind(a.tenant.as_str())
                    .push_bind(a.device_id.as_str())
                    .push_bind(a.account.as_deref())
                    .push_bind(a.seq.map(|s| s as i64))
                    .push_bind(a.class.name())
                    .push_bind(i64::from(a.priority().number()))
                    .push_bind(a.restore)
                    .push_bind(d.zone.map(i64::from))
                    .push_bind(d.sensor.as_deref())
                    .push_bind(d.battery_pct.map(i64::from))
                    .push_bind(d.rssi.map(i64::from))
                    .push_bind(d.lat)
                    .push_bind(d.lon)
                    .push_bind(d.text.as_deref())
                    .push_bind(a.raised_at.map(to_millis))
                    .push_bind(to_millis(a.received_at))
                    .push_bind(stored_ms)
                    .push_bind(a.source.kind.name())
                    .push_bind(a.source.id.as_str())
                    .push_bind(a.source.code.as_str())
                    .push_bind(a.raw.as_slice())
                    .push_bind(a.dedupe_key.as_str());
            });
            q.build().execute(&mut *tx).await?;
        }
        for chunk in fresh.chunks(MAX_PARAMS / OUTBOX_COLUMNS) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO outbox (alarm_id, priority, state, created_at, due_at) ",
            );
            q.push_values(chunk, |mut row, (id, a)| {
                row.push_bind(id.as_str())
                    .push_bind(i64::from(a.priority().number()))
                    .push_bind("pending")
                    .push_bind(stored_ms)
                    .push_bind(stored_ms);
            });
            q.build().execute(&mut *tx).await?;
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

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

fn parse_id(id: &str) -> Result<AlarmId, StoreError> {
    id.parse()
        .map_err(|e| StoreError::Corrupt(format!("alarm id {id:?}: {e}")))
}

fn alarm_from_row(r: &SqliteRow) -> Result<Alarm, StoreError> {
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {e}"));
    let id: String = r.try_get("id")?;
    let class: String = r.try_get("class")?;
    let priority: i64 = r.try_get("priority")?;
    let kind: String = r.try_get("source_kind")?;
    let seq: Option<i64> = r.try_get("seq")?;
    let zone: Option<i64> = r.try_get("zone")?;
    let battery: Option<i64> = r.try_get("battery_pct")?;
    let rssi: Option<i64> = r.try_get("rssi")?;
    Ok(Alarm {
        id: parse_id(&id)?,
        tenant: r.try_get("tenant")?,
        device_id: r.try_get("device_id")?,
        account: r.try_get("account")?,
        seq: seq.and_then(|s| u64::try_from(s).ok()),
        class: AlarmClass::from_str(&class).map_err(|e| corrupt("class", &e))?,
        priority: Priority::from_number(priority).ok_or_else(|| corrupt("priority", &priority))?,
        restore: r.try_get("restore")?,
        raised_at: r.try_get::<Option<i64>, _>("raised_at")?.map(from_millis),
        received_at: from_millis(r.try_get("received_at")?),
        stored_at: from_millis(r.try_get("stored_at")?),
        source: SourceRef {
            kind: SourceKind::from_str(&kind).map_err(|e| corrupt("source_kind", &e))?,
            id: r.try_get("source_id")?,
            code: r.try_get("source_code")?,
        },
        details: AlarmDetails {
            zone: zone.and_then(|z| u32::try_from(z).ok()),
            sensor: r.try_get("sensor")?,
            battery_pct: battery.and_then(|b| u8::try_from(b).ok()),
            rssi: rssi.and_then(|x| i32::try_from(x).ok()),
            lat: r.try_get("lat")?,
            lon: r.try_get("lon")?,
            text: r.try_get("text")?,
        },
        raw: r.try_get("raw")?,
    })
}
