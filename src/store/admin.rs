//! What operators do to the store by hand, and housekeeping: listing alarms
//! that need a person (dead letters, stuck), sending one again, and pruning
//! closed alarms after the retention period.
//!
//! "Stuck" is derived, not stored: an outbox row still `pending` whose every
//! failover deadline has passed (`exhausted`). It is still being retried, in
//! turn, by every provider that has not rejected it.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{OutboxRow, Store, StoreError};
use crate::model::{from_millis, to_millis, AlarmId};

/// Which alarms to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// Every provider in the chain rejected the alarm.
    DeadLetter,
    /// Still being retried past every deadline of its chain.
    Stuck,
}

impl Attention {
    pub fn name(self) -> &'static str {
        match self {
            Attention::DeadLetter => "dead-letter",
            Attention::Stuck => "stuck",
        }
    }
}

/// An alarm that needs a person, with where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedAlarm {
    pub id: AlarmId,
    pub tenant: String,
    pub device_id: String,
    pub class: String,
    pub priority: u8,
    pub received_at: DateTime<Utc>,
    pub outbox: OutboxRow,
    /// The last attempt's outcome, e.g. `HTTP 503`.
    pub last_attempt: Option<String>,
}

/// What a prune pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub alarms: u64,
    pub quarantine: u64,
}

/// A listed row as both backends return it.
struct Listed {
    id: String,
    tenant: String,
    device_id: String,
    class: String,
    priority: i64,
    received_at: i64,
    last_attempt: Option<String>,
}

impl Listed {
    fn read<'r, R: Row>(r: &'r R) -> Result<Listed, sqlx::Error>
    where
        &'r str: sqlx::ColumnIndex<R>,
        String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        Ok(Listed {
            id: r.try_get("id")?,
            tenant: r.try_get("tenant")?,
            device_id: r.try_get("device_id")?,
            class: r.try_get("class")?,
            priority: r.try_get("priority")?,
            received_at: r.try_get("received_at")?,
            last_attempt: r.try_get("last_attempt")?,
        })
    }
}

const LIST_SQL: &str = "SELECT a.id, a.tenant, a.device_id, a.class, a.priority, a.received_at, \
     (SELECT s.detail FROM alarm_stages s WHERE s.alarm_id = a.id AND s.stage = 'attempt' \
      ORDER BY s.at DESC LIMIT 1) AS last_attempt \
     FROM alarms a JOIN outbox o ON o.alarm_id = a.id";

impl Store {
    /// Alarms that need a person, oldest first.
    ///
    /// # Errors
    /// On a database failure or a corrupt row.
    pub async fn alarms_needing_attention(
        &self,
        which: Attention,
        limit: u32,
    ) -> Result<Vec<ListedAlarm>, StoreError> {
        let filter = match which {
            Attention::DeadLetter => "o.state = 'dead_letter'",
            Attention::Stuck => "o.state = 'pending' AND o.exhausted",
        };
        // The two backends' rows differ in type; read them through one shape.
        let rows: Vec<Listed> = match self {
            Store::Sqlite(s) => {
                let rows = sqlx::query(&format!(
                    "{LIST_SQL} WHERE {filter} ORDER BY a.received_at LIMIT ?"
                ))
                .bind(i64::from(limit))
                .fetch_all(s.pool())
                .await?;
                rows.iter().map(Listed::read).collect::<Result<_, _>>()?
            }
            Store::Postgres(p) => {
                let rows = sqlx::query(&format!(
                    "{LIST_SQL} WHERE {filter} ORDER BY a.received_at LIMIT $1"
                ))
                .bind(i64::from(limit))
                .fetch_all(p.pool())
                .await?;
                rows.iter().map(Listed::read).collect::<Result<_, _>>()?
            }
        };
        let mut listed = Vec::with_capacity(rows.len());
        for r in rows {
            let id: AlarmId =
                r.id.parse()
                    .map_err(|e| StoreError::Corrupt(format!("alarm id {:?}: {e}", r.id)))?;
            let outbox = self
                .outbox_row(id)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("alarm {id} has no outbox row")))?;
            listed.push(ListedAlarm {
                id,
                tenant: r.tenant,
                device_id: r.device_id,
                class: r.class,
                priority: u8::try_from(r.priority).unwrap_or(0),
                received_at: from_millis(r.received_at),
                outbox,
                last_attempt: r.last_attempt,
            });
        }
        Ok(listed)
    }

    /// Queues an alarm for delivery again, now: along its chain from the
    /// start (deadlines counted from now), or to `provider` alone. Works on
    /// delivered, dead-lettered and pending alarms alike; the provider gets
    /// the same alarm id, so it can tell a repeat. Returns the new outbox
    /// row, or `None` for an unknown alarm.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn redeliver(
        &self,
        id: AlarmId,
        provider: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<OutboxRow>, StoreError> {
        let chain = provider.map(|p| serde_json::json!([p]).to_string());
        let updated = match self {
            Store::Sqlite(s) => {
                let mut turn = s.write_turn().await;
                let (_, mut tx) = turn.begin().await?;
                let done = sqlx::query(
                    "UPDATE outbox SET state = 'pending', chain = COALESCE(?, chain), position = 0, \
                     rejected = '[]', exhausted = 0, provider_attempts = 0, stored_at = ?, due_at = ?, \
                     lease_owner = NULL, lease_until = NULL, accepted_at = NULL, accepted_by = NULL \
                     WHERE alarm_id = ?",
                )
                .bind(chain.as_deref())
                .bind(to_millis(now))
                .bind(to_millis(now))
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() > 0 {
                    sqlx::query(
                        "INSERT INTO alarm_stages (alarm_id, stage, at, provider, detail) \
                         VALUES (?, 'redeliver', ?, ?, 'requested by an operator')",
                    )
                    .bind(id.to_string())
                    .bind(to_millis(now))
                    .bind(provider)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                done.rows_affected() > 0
            }
            Store::Postgres(p) => {
                let mut tx = p.pool().begin().await?;
                let done = sqlx::query(
                    "UPDATE outbox SET state = 'pending', chain = COALESCE($1, chain), position = 0, \
                     rejected = '[]', exhausted = FALSE, provider_attempts = 0, stored_at = $2, \
                     due_at = $2, lease_owner = NULL, lease_until = NULL, accepted_at = NULL, \
                     accepted_by = NULL WHERE alarm_id = $3",
                )
                .bind(chain.as_deref())
                .bind(to_millis(now))
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() > 0 {
                    sqlx::query(
                        "INSERT INTO alarm_stages (alarm_id, stage, at, provider, detail) \
                         VALUES ($1, 'redeliver', $2, $3, 'requested by an operator')",
                    )
                    .bind(id.to_string())
                    .bind(to_millis(now))
                    .bind(provider)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                done.rows_affected() > 0
            }
        };
        if updated {
            self.outbox_row(id).await
        } else {
            Ok(None)
        }
    }

    /// Deletes up to `batch` closed alarms (accepted by a provider) received
    /// before `before`, with their stages and outbox rows, and quarantine rows
    /// older than `before`. One short transaction, so ingest waits at most
    /// for one batch; call again until it returns fewer than `batch`.
    ///
    /// # Errors
    /// On a database failure; then nothing of this batch is deleted.
    pub async fn prune_batch(
        &self,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<Pruned, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let mut turn = s.write_turn().await;
                let (_, mut tx) = turn.begin().await?;
                let ids: Vec<String> = sqlx::query_scalar(
                    "SELECT a.id FROM alarms a JOIN outbox o ON o.alarm_id = a.id \
                     WHERE o.state = 'delivered' AND a.received_at < ? LIMIT ?",
                )
                .bind(to_millis(before))
                .bind(i64::from(batch))
                .fetch_all(&mut *tx)
                .await?;
                let mut pruned = Pruned::default();
                if !ids.is_empty() {
                    let list = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
                    for table in ["alarm_stages", "outbox"] {
                        sqlx::query(&format!(
                            "DELETE FROM {table} WHERE alarm_id IN (SELECT value FROM json_each(?))"
                        ))
                        .bind(&list)
                        .execute(&mut *tx)
                        .await?;
                    }
                    let done = sqlx::query(
                        "DELETE FROM alarms WHERE id IN (SELECT value FROM json_each(?))",
                    )
                    .bind(&list)
                    .execute(&mut *tx)
                    .await?;
                    pruned.alarms = done.rows_affected();
                }
                let done = sqlx::query(
                    "DELETE FROM quarantine WHERE id IN \
                     (SELECT id FROM quarantine WHERE received_at < ? LIMIT ?)",
                )
                .bind(to_millis(before))
                .bind(i64::from(batch))
                .execute(&mut *tx)
                .await?;
                pruned.quarantine = done.rows_affected();
                tx.commit().await?;
                Ok(pruned)
            }
            Store::Postgres(p) => {
                let mut tx = p.pool().begin().await?;
                let ids: Vec<String> = sqlx::query_scalar(
                    "SELECT a.id FROM alarms a JOIN outbox o ON o.alarm_id = a.id \
                     WHERE o.state = 'delivered' AND a.received_at < $1 LIMIT $2",
                )
                .bind(to_millis(before))
                .bind(i64::from(batch))
                .fetch_all(&mut *tx)
                .await?;
                let mut pruned = Pruned::default();
                if !ids.is_empty() {
                    for table in ["alarm_stages", "outbox"] {
                        sqlx::query(&format!("DELETE FROM {table} WHERE alarm_id = ANY($1)"))
                            .bind(&ids)
                            .execute(&mut *tx)
                            .await?;
                    }
                    let done = sqlx::query("DELETE FROM alarms WHERE id = ANY($1)")
                        .bind(&ids)
                        .execute(&mut *tx)
                        .await?;
                    pruned.alarms = done.rows_affected();
                }
                let done = sqlx::query(
                    "DELETE FROM quarantine WHERE id IN \
                     (SELECT id FROM quarantine WHERE received_at < $1 LIMIT $2)",
                )
                .bind(to_millis(before))
                .bind(i64::from(batch))
                .execute(&mut *tx)
                .await?;
                pruned.quarantine = done.rows_affected();
                tx.commit().await?;
                Ok(pruned)
            }
        }
    }
}

/// Prunes closed alarms past the retention period every `interval`, in
/// batches with a pause between them so that ingest is never held up for
/// long, until `cancel` fires.
pub async fn prune_periodically(
    store: Store,
    retention: crate::config::RetentionConfig,
    clock: crate::clock::SharedClock,
    cancel: tokio_util::sync::CancellationToken,
) {
    let Some(keep) = retention
        .keep
        .and_then(|k| chrono::Duration::from_std(k).ok())
    else {
        return;
    };
    loop {
        let before = clock.now() - keep;
        let mut total = Pruned::default();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            match store.prune_batch(before, retention.batch).await {
                Ok(p) => {
                    total.alarms += p.alarms;
                    total.quarantine += p.quarantine;
                    if p.alarms < u64::from(retention.batch)
                        && p.quarantine < u64::from(retention.batch)
                    {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "retention: cannot prune closed alarms");
                    break;
                }
            }
            // Let the ingest writer in between batches.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if total != Pruned::default() {
            tracing::info!(
                alarms = total.alarms,
                quarantine = total.quarantine,
                "retention: pruned closed alarms"
            );
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(retention.interval) => {}
        }
    }
}
