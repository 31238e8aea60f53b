//! Decoding rows into the store's types, once for both backends.
//!
//! The backends' SQL differs (placeholders, `UNNEST` against multi-row
//! `VALUES`, `SKIP LOCKED`), but the rows they return have the same columns
//! with types that decode to the same Rust types: BIGINT/INTEGER to `i64`,
//! BOOLEAN/INTEGER to `bool`, TEXT to `String`, BYTEA/BLOB to `Vec<u8>`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Decode, Row, Type};

/// What an attempt's outcome `v` sets on its outbox row, claims released:
/// the `UPDATE outbox` both stores make from a batch of outcomes.
macro_rules! update_outbox_from_v {
    () => {
        "UPDATE outbox SET state = v.state, \
         position = COALESCE(v.position, outbox.position), \
         rejected = COALESCE(v.rejected, outbox.rejected), \
         exhausted = COALESCE(v.exhausted, outbox.exhausted), \
         attempts = COALESCE(v.attempts, outbox.attempts + 1), \
         provider_attempts = COALESCE(v.provider_attempts, outbox.provider_attempts), \
         due_at = v.due_at, accepted_at = v.accepted_at, accepted_by = v.accepted_by, \
         lease_owner = NULL, lease_until = NULL "
    };
}
pub(super) use update_outbox_from_v;

use super::{OutboxRow, StoreError};
use crate::deliver::plan::Plan;
use crate::deliver::Claimed;
use crate::model::{
    from_millis, Alarm, AlarmClass, AlarmDetails, AlarmId, Priority, SourceKind, SourceRef,
};

/// Reads a column, whatever the backend.
fn get<'r, R, T>(r: &'r R, column: &'r str) -> Result<T, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    r.try_get(column)
}

/// A row selected by [`ALARM_SELECT`] as an [`Alarm`].
pub(super) fn alarm_from_row<'r, R>(r: &'r R) -> Result<Alarm, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {e}"));
    let id: String = get(r, "id")?;
    let class: String = get(r, "class")?;
    let priority: i64 = get(r, "priority")?;
    let kind: String = get(r, "source_kind")?;
    let seq: Option<i64> = get(r, "seq")?;
    let zone: Option<i64> = get(r, "zone")?;
    let battery: Option<i64> = get(r, "battery_pct")?;
    let rssi: Option<i64> = get(r, "rssi")?;
    Ok(Alarm {
        id: parse_id(&id)?,
        tenant: get(r, "tenant")?,
        device_id: get(r, "device_id")?,
        account: get(r, "account")?,
        seq: seq.and_then(|s| u64::try_from(s).ok()),
        class: AlarmClass::from_str(&class).map_err(|e| corrupt("class", &e))?,
        priority: Priority::from_number(priority).ok_or_else(|| corrupt("priority", &priority))?,
        restore: get(r, "restore")?,
        raised_at: get::<_, Option<i64>>(r, "raised_at")?.map(from_millis),
        received_at: from_millis(get(r, "received_at")?),
        stored_at: from_millis(get(r, "stored_at")?),
        source: SourceRef {
            kind: SourceKind::from_str(&kind).map_err(|e| corrupt("source_kind", &e))?,
            id: get(r, "source_id")?,
            code: get(r, "source_code")?,
        },
        details: AlarmDetails {
            zone: zone.and_then(|z| u32::try_from(z).ok()),
            sensor: get(r, "sensor")?,
            battery_pct: battery.and_then(|b| u8::try_from(b).ok()),
            rssi: rssi.and_then(|x| i32::try_from(x).ok()),
            lat: get(r, "lat")?,
            lon: get(r, "lon")?,
            text: get(r, "text")?,
        },
        raw: get(r, "raw")?,
    })
}

/// A row of [`OUTBOX_FIELDS`] as an [`OutboxRow`].
pub(super) fn outbox_from_row<'r, R>(r: &'r R) -> Result<OutboxRow, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(OutboxRow {
        state: get(r, "state")?,
        contract_id: get(r, "contract_id")?,
        chain: json_list(get(r, "chain")?)?,
        position: usize::try_from(get::<_, i64>(r, "position")?).unwrap_or(0),
        rejected: json_list(get(r, "rejected")?)?,
        exhausted: get(r, "exhausted")?,
        attempts: u32::try_from(get::<_, i64>(r, "attempts")?).unwrap_or(u32::MAX),
        due_at: from_millis(get(r, "due_at")?),
        routed_at: from_millis(get(r, "routed_at")?),
        lease_owner: get(r, "lease_owner")?,
        lease_until: get::<_, Option<i64>>(r, "lease_until")?.map(from_millis),
        accepted_at: get::<_, Option<i64>>(r, "accepted_at")?.map(from_millis),
        accepted_by: get(r, "accepted_by")?,
    })
}

/// Selects the columns [`alarm_from_row`] reads; add a `WHERE`.
pub(super) const ALARM_SELECT: &str =
    "SELECT id, tenant, device_id, account, seq, class, priority, restore, \
     zone, sensor, battery_pct, rssi, lat, lon, text, raised_at, received_at, stored_at, \
     source_kind, source_id, source_code, raw FROM alarms";

/// The columns [`outbox_from_row`] reads.
pub(super) const OUTBOX_FIELDS: &str = "state, contract_id, chain, position, rejected, exhausted, \
     attempts, due_at, routed_at, lease_owner, lease_until, accepted_at, accepted_by";

/// A provider list kept as JSON text.
pub(super) fn json_list(text: String) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt(format!("provider list {text:?}: {e}")))
}

/// A duration as stored: whole milliseconds.
pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// An alarm id read back from the store.
pub(super) fn parse_id(id: &str) -> Result<AlarmId, StoreError> {
    id.parse()
        .map_err(|e| StoreError::Corrupt(format!("alarm id {id:?}: {e}")))
}

/// A claimed outbox row as read back: priority, due time, alarm id, contract and plan.
pub(super) type ClaimedPlan = (i64, i64, String, Option<String>, Plan);

/// Joins claimed outbox rows (in claim order) with their alarms.
pub(super) fn join_claims(
    plans: Vec<ClaimedPlan>,
    mut alarms: HashMap<String, Alarm>,
    lease_until: DateTime<Utc>,
) -> Result<Vec<Claimed>, StoreError> {
    plans
        .into_iter()
        .map(|(_, _, id, contract_id, plan)| {
            let alarm = alarms
                .remove(&id)
                .ok_or_else(|| StoreError::Corrupt(format!("outbox row {id} has no alarm")))?;
            Ok(Claimed {
                alarm,
                contract_id,
                plan,
                lease_until,
            })
        })
        .collect()
}
