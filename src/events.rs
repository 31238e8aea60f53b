//! Observable internal events. Each type emits its structured log line and
//! bumps its metric from one place, so logs and metrics cannot disagree.
//!
//! Logs carry ids only (tenant, device, alarm), never payload contents
//! beyond a rejection's reason: personal data stays in the store.

use chrono::{DateTime, Utc};

use crate::metrics::Metrics;
use crate::model::{wire_time, AlarmId, NewAlarm};
use crate::source::mqtt::payload::{DroppedField, RejectReason};

/// A new alarm was committed.
pub struct AlarmStored<'a> {
    pub id: AlarmId,
    pub alarm: &'a NewAlarm,
    pub stored_at: DateTime<Utc>,
}

impl AlarmStored<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        Metrics::inc(&metrics.alarms_stored);
        tracing::debug!(
            alarm_id = %self.id,
            tenant = %self.alarm.tenant,
            device_id = %self.alarm.device_id,
            class = self.alarm.class.name(),
            priority = self.alarm.priority().number(),
            stored_at = %wire_time(self.stored_at),
            "alarm stored"
        );
    }
}

/// A re-send of an alarm already stored.
pub struct DuplicateReceived<'a> {
    pub id: AlarmId,
    pub alarm: &'a NewAlarm,
}

impl DuplicateReceived<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        Metrics::inc(&metrics.alarms_duplicate);
        tracing::debug!(
            alarm_id = %self.id,
            tenant = %self.alarm.tenant,
            device_id = %self.alarm.device_id,
            seq = ?self.alarm.seq,
            "duplicate of a stored alarm"
        );
    }
}

/// Input that broke the wire contract and was quarantined.
pub struct PayloadRejected<'a> {
    pub source_id: &'a str,
    pub reference: &'a str,
    pub reason: RejectReason,
    pub detail: &'a str,
}

impl PayloadRejected<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        Metrics::inc(&metrics.rejected[self.reason as usize]);
        tracing::warn!(
            source = self.source_id,
            reference = self.reference,
            reason = self.reason.as_str(),
            detail = self.detail,
            "input rejected and quarantined"
        );
    }
}

/// Optional fields with bad values were dropped; the alarm was kept.
pub struct FieldsDropped<'a> {
    pub tenant: &'a str,
    pub device_id: &'a str,
    pub dropped: &'a [DroppedField],
}

impl FieldsDropped<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        Metrics::add(&metrics.fields_dropped, self.dropped.len() as u64);
        let fields: Vec<String> = self
            .dropped
            .iter()
            .map(|d| format!("{} ({})", d.field, d.reason))
            .collect();
        tracing::warn!(
            tenant = self.tenant,
            device_id = self.device_id,
            fields = %fields.join(", "),
            "optional fields dropped"
        );
    }
}

/// A `device_fault` alarm raised for a device that sends broken input.
pub struct DeviceFaultRaised<'a> {
    pub tenant: &'a str,
    pub device_id: &'a str,
    pub reason: RejectReason,
}

impl DeviceFaultRaised<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        Metrics::inc(&metrics.device_faults_raised);
        tracing::warn!(
            tenant = self.tenant,
            device_id = self.device_id,
            reason = self.reason.as_str(),
            "device_fault raised for broken input"
        );
    }
}
