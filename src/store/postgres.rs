//! The PostgreSQL store: for a service that outgrows one machine, with
//! several gateway instances sharing one database.
//!
//! The tables, columns and indexes are those of the SQLite store
//! (`migrations/postgres` mirrors `migrations/sqlite`): timestamps are BIGINT
//! milliseconds, provider lists are JSON text, so both backends share the
//! Rust side. Commits use the server's default `synchronous_commit = on`: a
//! committed batch is on disk (WAL flushed) before the sender is told.
//!
//! # Group commit
//! A batch becomes one statement per table, whatever its size: each column
//! is bound as one array and the rows are rebuilt by `UNNEST`
//! (`INSERT … SELECT * FROM UNNEST($1::text[], …)`). The statement text does
//! not depend on the batch size, so it is prepared once per connection.
//!
//! # De-duplication across instances
//! Two instances can commit the same alarm at the same moment (a device
//! re-sends while the first copy is still in flight, and a shared
//! subscription hands the copies to different instances). Under the default
//! READ COMMITTED isolation both transactions could look for the key, both
//! find nothing and both insert. A unique index cannot prevent it, because
//! the same key *outside* the window must become a new alarm. So each batch
//! first takes a transaction-scoped advisory lock
//! (`pg_advisory_xact_lock`) on a 64-bit hash of every dedupe key in it, in
//! ascending order of the hash (two batches with overlapping keys then
//! never wait for each other in a cycle), and only then looks for existing
//! rows, in a separate statement: that statement's snapshot is taken after
//! the lock is held, so it sees the alarm the other transaction committed
//! before releasing the lock. A hash collision only makes two unrelated
//! batches wait for each other.
//!
//! # Claims
//! `claim_due` picks due rows with `FOR UPDATE SKIP LOCKED`, so several
//! instances claiming at once each get different rows, and none waits for
//! another's claim.
//!
//! # Progress reports
//! A report first locks its alarm row (`FOR NO KEY UPDATE`, which does not
//! block the foreign-key checks of other writers), so that concurrent
//! reports for one alarm are decided one after the other, as SQLite's
//! single writer decides them.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

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
use crate::model::{from_millis, to_millis, Alarm, AlarmId, NewAlarm, SourceKind};

/// Connections in the pool: the ingest writer, the dispatcher, the API and
/// reports, with room for bursts.
const POOL_SIZE: u32 = 8;

/// A PostgreSQL database behind a connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// The connection pool, for the operator queries of `admin.rs`.
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connects to the database at `url` and migrates it.
    ///
    /// # Errors
    /// When the URL is malformed, the server cannot be reached or the
    /// migration fails.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("telegate");
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        // The migrator holds an advisory lock while it runs, so instances
        // starting together migrate one after the other.
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgStore { pool })
    }

    pub(super) async fn commit_batch(
        &self,
        batch: &Batch,
        stored_at: DateTime<Utc>,
        dedupe_since: DateTime<Utc>,
    ) -> Result<Vec<AlarmOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;

        let mut existing: HashMap<String, AlarmId> = HashMap::new();
        if !batch.alarms.is_empty() {
            let keys: Vec<&str> = batch
                .alarms
                .iter()
                .map(|b| b.alarm.dedupe_key.as_str())
                .collect();
            // Serialise with any other transaction committing one of these
            // keys (see the module header); the lock is held until commit.
            let mut locks: Vec<i64> = keys.iter().map(|k| lock_key(k)).collect();
            locks.sort_unstable();
            locks.dedup();
            sqlx::query(
                "SELECT pg_advisory_xact_lock(k) \
                 FROM UNNEST($1::int8[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
            )
            .bind(&locks)
            .execute(&mut *tx)
            .await?;

            // Which keys are already stored within the window?
            let rows = sqlx::query(
                "SELECT id, dedupe_key FROM alarms \
                 WHERE received_at >= $1 AND dedupe_key = ANY($2) ORDER BY received_at",
            )
            .bind(to_millis(dedupe_since))
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let id: String = row.try_get("id")?;
                let key: String = row.try_get("dedupe_key")?;
                existing.entry(key).or_insert(parse_id(&id)?);
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
                    fresh.push(b);
                }
            }
        }

        let stored_ms = to_millis(stored_at);
        if !fresh.is_empty() {
            let ids: Vec<String> = fresh.iter().map(|b| b.id.to_string()).collect();
            let mut c = AlarmColumns::default();
            for b in &fresh {
                c.push(&b.alarm);
            }
            sqlx::query(
                "INSERT INTO alarms (id, tenant, device_id, account, seq, class, priority, \
                 restore, zone, sensor, battery_pct, rssi, lat, lon, text, raised_at, \
                 received_at, stored_at, source_kind, source_id, source_code, raw, dedupe_key) \
                 SELECT id, tenant, device_id, account, seq, class, priority, restore, zone, \
                 sensor, battery_pct, rssi, lat, lon, text, raised_at, received_at, $18, \
                 source_kind, source_id, source_code, raw, dedupe_key \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], \
                 $6::text[], $7::int8[], $8::bool[], $9::int8[], $10::text[], $11::int8[], \
                 $12::int8[], $13::float8[], $14::float8[], $15::text[], $16::int8[], \
                 $17::int8[], $19::text[], $20::text[], $21::text[], $22::bytea[], $23::text[]) \
                 AS t(id, tenant, device_id, account, seq, class, priority, restore, zone, \
                 sensor, battery_pct, rssi, lat, lon, text, raised_at, received_at, \
                 source_kind, source_id, source_code, raw, dedupe_key)",
            )
            .bind(&ids)
            .bind(&c.tenant)
            .bind(&c.device_id)
            .bind(&c.account)
            .bind(&c.seq)
            .bind(&c.class)
            .bind(&c.priority)
            .bind(&c.restore)
            .bind(&c.zone)
            .bind(&c.sensor)
            .bind(&c.battery_pct)
            .bind(&c.rssi)
            .bind(&c.lat)
            .bind(&c.lon)
            .bind(&c.text)
            .bind(&c.raised_at)
            .bind(&c.received_at)
            .bind(stored_ms)
            .bind(&c.source_kind)
            .bind(&c.source_id)
            .bind(&c.source_code)
            .bind(&c.raw)
            .bind(&c.dedupe_key)
            .execute(&mut *tx)
            .await?;

            let chains: Vec<String> = fresh
                .iter()
                .map(|b| serde_json::to_string(&b.route.chain).unwrap_or_else(|_| "[]".into()))
                .collect();
            sqlx::query(
                "INSERT INTO outbox (alarm_id, priority, state, contract_id, chain, \
                 failover_after_ms, stored_at, routed_at, due_at, lease_owner, lease_until) \
                 SELECT id, priority, 'pending', contract_id, chain, failover_after_ms, $6, $6, $6, \
                 lease_owner, lease_until \
                 FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], \
                 $7::text[], $8::int8[]) \
                 AS t(id, priority, contract_id, chain, failover_after_ms, lease_owner, lease_until)",
            )
            .bind(&ids)
            .bind(
                fresh
                    .iter()
                    .map(|b| i64::from(b.alarm.priority().number()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                fresh
                    .iter()
                    .map(|b| b.route.contract_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(&chains)
            .bind(
                fresh
                    .iter()
                    .map(|b| millis(b.route.failover_after))
                    .collect::<Vec<_>>(),
            )
            .bind(stored_ms)
            .bind(
                fresh
                    .iter()
                    .map(|b| batch.lease_of(b).0)
                    .collect::<Vec<_>>(),
            )
            .bind(
                fresh
                    .iter()
                    .map(|b| batch.lease_of(b).1)
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }

        if !batch.quarantine.is_empty() {
            let q = &batch.quarantine;
            sqlx::query(
                "INSERT INTO quarantine (received_at, source_kind, source_id, reference, tenant, \
                 device_id, reason, detail, raw) \
                 SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::bytea[])",
            )
            .bind(
                q.iter()
                    .map(|e| to_millis(e.received_at))
                    .collect::<Vec<_>>(),
            )
            .bind(q.iter().map(|e| e.source_kind.name()).collect::<Vec<_>>())
            .bind(q.iter().map(|e| e.source_id.as_str()).collect::<Vec<_>>())
            .bind(q.iter().map(|e| e.reference.as_str()).collect::<Vec<_>>())
            .bind(q.iter().map(|e| e.tenant.as_deref()).collect::<Vec<_>>())
            .bind(q.iter().map(|e| e.device_id.as_deref()).collect::<Vec<_>>())
            .bind(q.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>())
            .bind(q.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>())
            .bind(q.iter().map(|e| e.raw.as_slice()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    pub(super) async fn alarm(&self, id: AlarmId) -> Result<Option<Alarm>, StoreError> {
        let row = sqlx::query(&format!("{ALARM_SELECT} WHERE id = $1"))
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
            "{ALARM_SELECT} WHERE tenant = $1 AND device_id = $2 ORDER BY id"
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
            sqlx::query("SELECT raised_at, received_at, stored_at FROM alarms WHERE id = $1")
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
            sqlx::query("SELECT routed_at, contract_id FROM outbox WHERE alarm_id = $1")
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
            "SELECT stage, at, provider, detail FROM alarm_stages WHERE alarm_id = $1 \
             ORDER BY at, id",
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
             reason, detail, raw FROM quarantine ORDER BY id DESC LIMIT $1",
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
        let done = sqlx::query(
            "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(&self.pool)
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
        let rows = sqlx::query(
            "UPDATE outbox SET lease_owner = $1, lease_until = $2 WHERE alarm_id IN ( \
                 SELECT alarm_id FROM outbox WHERE state = 'pending' AND due_at <= $3 \
                 AND (lease_until IS NULL OR lease_until <= $3) \
                 ORDER BY priority, due_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING alarm_id, priority, due_at, contract_id, chain, position, rejected, \
                 exhausted, attempts, provider_attempts, failover_after_ms, stored_at",
        )
        .bind(owner)
        .bind(to_millis(lease_until))
        .bind(to_millis(now))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
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
        // RETURNING gives the rows in no particular order.
        plans.sort_by_key(|p| (p.0, p.1));
        let ids: Vec<&str> = plans.iter().map(|p| p.2.as_str()).collect();
        let mut alarms: HashMap<String, Alarm> = HashMap::with_capacity(plans.len());
        for row in sqlx::query(&format!("{ALARM_SELECT} WHERE id = ANY($1)"))
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?
        {
            let alarm = alarm_from_row(&row)?;
            alarms.insert(alarm.id.to_string(), alarm);
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
        // Stage rows: the attempt, then an acceptance or a dead letter.
        let mut stages = StageColumns::default();
        for r in records {
            let id = r.alarm_id.to_string();
            stages.push(&id, "attempt", r.started_at, Some(&r.provider), &r.detail);
            match &r.decision {
                Decision::Delivered => {
                    stages.push(&id, "accepted", r.finished_at, Some(&r.provider), &r.detail);
                }
                Decision::DeadLetter { .. } => {
                    stages.push(
                        &id,
                        "dead_letter",
                        r.finished_at,
                        None,
                        "every provider rejected the alarm",
                    );
                }
                Decision::Retry { .. } => {}
            }
        }
        // Outbox rows: the new state; a column left NULL keeps (or, for
        // `attempts`, advances) the stored value.
        let mut outbox = OutcomeColumns::default();
        for r in records {
            outbox.push(r);
        }

        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO alarm_stages (alarm_id, stage, at, provider, detail) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[])",
        )
        .bind(&stages.alarm_id)
        .bind(&stages.stage)
        .bind(&stages.at)
        .bind(&stages.provider)
        .bind(&stages.detail)
        .execute(&mut *tx)
        .await?;
        sqlx::query(concat!(
            update_outbox_from_v!(),
            "FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::bool[], \
                 $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::text[]) \
             AS v(alarm_id, state, position, rejected, exhausted, attempts, \
                 provider_attempts, due_at, accepted_at, accepted_by) \
             WHERE outbox.alarm_id = v.alarm_id",
        ))
        .bind(&outbox.alarm_id)
        .bind(&outbox.state)
        .bind(&outbox.position)
        .bind(&outbox.rejected)
        .bind(&outbox.exhausted)
        .bind(&outbox.attempts)
        .bind(&outbox.provider_attempts)
        .bind(&outbox.due_at)
        .bind(&outbox.accepted_at)
        .bind(&outbox.accepted_by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn outbox_row(&self, id: AlarmId) -> Result<Option<OutboxRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {OUTBOX_FIELDS} FROM outbox WHERE alarm_id = $1"
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
        let found: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM alarm_stages \
             WHERE alarm_id = $1 AND stage = 'attempt' AND provider = $2)",
        )
        .bind(id.to_string())
        .bind(provider)
        .fetch_one(&self.pool)
        .await?;
        Ok(found)
    }

    pub(super) async fn record_progress(
        &self,
        report: &ProgressReport,
    ) -> Result<ProgressResult, StoreError> {
        let id = report.alarm_id.to_string();
        let mut tx = self.pool.begin().await?;
        // One report per alarm at a time (see the module header).
        sqlx::query("SELECT 1 FROM alarms WHERE id = $1 FOR NO KEY UPDATE")
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
        let states: Vec<String> = sqlx::query_scalar(
            "SELECT stage FROM alarm_stages \
             WHERE alarm_id = $1 AND stage IN ('answered', 'resolved')",
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
        let done = sqlx::query(
            "INSERT INTO alarm_stages (alarm_id, stage, at, provider, detail, reported_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
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
        if done.rows_affected() == 0 {
            return Ok(ProgressResult::Repeated);
        }
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
             WHERE a.received_at >= $1 AND a.received_at < $2",
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
        self.pool.close().await;
    }
}

/// `alarms` rows to insert, one array per column (`id` and `stored_at`
/// are bound separately).
#[derive(Default)]
struct AlarmColumns<'a> {
    tenant: Vec<&'a str>,
    device_id: Vec<&'a str>,
    account: Vec<Option<&'a str>>,
    seq: Vec<Option<i64>>,
    class: Vec<&'static str>,
    priority: Vec<i64>,
    restore: Vec<bool>,
    zone: Vec<Option<i64>>,
    sensor: Vec<Option<&'a str>>,
    battery_pct: Vec<Option<i64>>,
    rssi: Vec<Option<i64>>,
    lat: Vec<Option<f64>>,
    lon: Vec<Option<f64>>,
    text: Vec<Option<&'a str>>,
    raised_at: Vec<Option<i64>>,
    received_at: Vec<i64>,
    source_kind: Vec<&'static str>,
    source_id: Vec<&'a str>,
    source_code: Vec<&'a str>,
    raw: Vec<&'a [u8]>,
    dedupe_key: Vec<&'a str>,
}

impl<'a> AlarmColumns<'a> {
    fn push(&mut self, a: &'a NewAlarm) {
        let d = &a.details;
        self.tenant.push(&a.tenant);
        self.device_id.push(&a.device_id);
        self.account.push(a.account.as_deref());
        self.seq
            .push(a.seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX)));
        self.class.push(a.class.name());
        self.priority.push(i64::from(a.priority().number()));
        self.restore.push(a.restore);
        self.zone.push(d.zone.map(i64::from));
        self.sensor.push(d.sensor.as_deref());
        self.battery_pct.push(d.battery_pct.map(i64::from));
        self.rssi.push(d.rssi.map(i64::from));
        self.lat.push(d.lat);
        self.lon.push(d.lon);
        self.text.push(d.text.as_deref());
        self.raised_at.push(a.raised_at.map(to_millis));
        self.received_at.push(to_millis(a.received_at));
        self.source_kind.push(a.source.kind.name());
        self.source_id.push(&a.source.id);
        self.source_code.push(&a.source.code);
        self.raw.push(&a.raw);
        self.dedupe_key.push(a.dedupe_key.as_str());
    }
}

/// `alarm_stages` rows to insert, one array per column.
#[derive(Default)]
struct StageColumns<'a> {
    alarm_id: Vec<String>,
    stage: Vec<&'static str>,
    at: Vec<i64>,
    provider: Vec<Option<&'a str>>,
    detail: Vec<&'a str>,
}

impl<'a> StageColumns<'a> {
    fn push(
        &mut self,
        alarm_id: &str,
        stage: &'static str,
        at: DateTime<Utc>,
        provider: Option<&'a str>,
        detail: &'a str,
    ) {
        self.alarm_id.push(alarm_id.to_owned());
        self.stage.push(stage);
        self.at.push(to_millis(at));
        self.provider.push(provider);
        self.detail.push(detail);
    }
}

/// Outbox updates after attempts, one array per column of the `UNNEST`.
#[derive(Default)]
struct OutcomeColumns<'a> {
    alarm_id: Vec<String>,
    state: Vec<&'static str>,
    position: Vec<Option<i64>>,
    rejected: Vec<Option<String>>,
    exhausted: Vec<Option<bool>>,
    attempts: Vec<Option<i64>>,
    provider_attempts: Vec<Option<i64>>,
    due_at: Vec<i64>,
    accepted_at: Vec<Option<i64>>,
    accepted_by: Vec<Option<&'a str>>,
}

impl<'a> OutcomeColumns<'a> {
    fn push(&mut self, r: &'a AttemptRecord) {
        let (state, plan, due, accepted_at, accepted_by) = match &r.decision {
            Decision::Delivered => (
                "delivered",
                None,
                r.finished_at,
                Some(to_millis(r.finished_at)),
                Some(r.provider.as_str()),
            ),
            Decision::Retry { plan, due_at } => ("pending", Some(plan), *due_at, None, None),
            Decision::DeadLetter { plan } => ("dead_letter", Some(plan), r.finished_at, None, None),
        };
        self.alarm_id.push(r.alarm_id.to_string());
        self.state.push(state);
        self.position
            .push(plan.map(|p| i64::try_from(p.position).unwrap_or(0)));
        self.rejected
            .push(plan.map(|p| serde_json::to_string(&p.rejected).unwrap_or_else(|_| "[]".into())));
        self.exhausted.push(plan.map(|p| p.exhausted));
        self.attempts.push(plan.map(|p| i64::from(p.attempts)));
        self.provider_attempts
            .push(plan.map(|p| i64::from(p.provider_attempts)));
        self.due_at.push(to_millis(due));
        self.accepted_at.push(accepted_at);
        self.accepted_by.push(accepted_by);
    }
}

/// The advisory-lock key of a dedupe key: the first 64 bits of its SHA-256,
/// the same in every instance and every release.
fn lock_key(dedupe_key: &str) -> i64 {
    let digest = Sha256::digest(dedupe_key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_tell_keys_apart() {
        assert_eq!(lock_key("3:dev1:a"), lock_key("3:dev1:a"));
        assert_ne!(lock_key("3:dev1:a"), lock_key("3:dev1:b"));
    }
}
