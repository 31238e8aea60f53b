//! Operator commands on a gateway's store: `telegate alarms` lists the alarms
//! that need a person (dead letters, stuck), `telegate redeliver` queues one
//! for delivery again. They open the store the configuration names, so they
//! work beside a running gateway (SQLite in WAL mode, or PostgreSQL).

use std::fmt::Write as _;

use chrono::Utc;

use crate::config::Config;
use crate::model::{wire_time, AlarmId};
use crate::store::{Attention, ListedAlarm, Store, StoreError};

/// Why an operator command failed. `Usage` is the operator's mistake (exit
/// 64); the rest is the store's.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("{0}")]
    Usage(String),
    #[error("no alarm {0}")]
    NoSuchAlarm(AlarmId),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Lists alarms needing attention as a table, or as JSON lines.
///
/// # Errors
/// When the store cannot be read.
pub async fn list(
    config: &Config,
    which: Attention,
    limit: u32,
    json: bool,
) -> Result<String, OperatorError> {
    let store = Store::open(&config.store.url).await?;
    let alarms = store.alarms_needing_attention(which, limit).await;
    store.close().await;
    let alarms = alarms?;
    Ok(if json {
        json_lines(&alarms)
    } else {
        table(which, &alarms)
    })
}

fn table(which: Attention, alarms: &[ListedAlarm]) -> String {
    if alarms.is_empty() {
        return format!("no {} alarms\n", which.name());
    }
    let mut out = format!(
        "{:<36}  {:<24}  {:<16}  {:<18}  {:>3}  {:>8}  {:<24}  {}\n",
        "alarm_id",
        "received_at",
        "tenant",
        "class",
        "pri",
        "attempts",
        "rejected_by",
        "last attempt"
    );
    for a in alarms {
        let _ = writeln!(
            out,
            "{:<36}  {:<24}  {:<16}  {:<18}  {:>3}  {:>8}  {:<24}  {}",
            a.id,
            wire_time(a.received_at),
            a.tenant,
            a.class,
            a.priority,
            a.outbox.attempts,
            if a.outbox.rejected.is_empty() {
                "-".to_owned()
            } else {
                a.outbox.rejected.join(",")
            },
            a.last_attempt.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(out, "{} {} alarm(s)", alarms.len(), which.name());
    out
}

fn json_lines(alarms: &[ListedAlarm]) -> String {
    let mut out = String::new();
    for a in alarms {
        let line = serde_json::json!({
            "alarm_id": a.id.to_string(),
            "tenant": a.tenant,
            "device_id": a.device_id,
            "class": a.class,
            "priority": a.priority,
            "received_at": wire_time(a.received_at),
            "state": a.outbox.state,
            "contract_id": a.outbox.contract_id,
            "chain": a.outbox.chain,
            "rejected_by": a.outbox.rejected,
            "attempts": a.outbox.attempts,
            "last_attempt": a.last_attempt,
        });
        let _ = writeln!(out, "{line}");
    }
    out
}

/// Queues an alarm for delivery again, along its chain or to one provider.
///
/// # Errors
/// [`OperatorError::Usage`] for a malformed id or an unknown provider,
/// [`OperatorError::NoSuchAlarm`], or a store failure.
pub async fn redeliver(
    config: &Config,
    alarm_id: &str,
    provider: Option<&str>,
) -> Result<String, OperatorError> {
    let id: AlarmId = alarm_id
        .parse()
        .map_err(|_| OperatorError::Usage(format!("{alarm_id:?} is not an alarm id (a UUID)")))?;
    if let Some(p) = provider {
        if config.provider(p).is_none() {
            let known: Vec<&str> = config.providers.iter().map(|p| p.id.as_str()).collect();
            return Err(OperatorError::Usage(format!(
                "no provider {p:?} in the configuration (known: {})",
                known.join(", ")
            )));
        }
    }
    let store = Store::open(&config.store.url).await?;
    let row = store.redeliver(id, provider, Utc::now()).await;
    store.close().await;
    match row? {
        Some(row) => Ok(format!(
            "alarm {id} queued for delivery to {} (chain {}); a running gateway picks it up within its poll interval\n",
            row.chain.first().map_or("?", String::as_str),
            row.chain.join(" → ")
        )),
        None => Err(OperatorError::NoSuchAlarm(id)),
    }
}
