//! Observable internal events. Each type emits its structured log line and
//! bumps its metric from one place, so logs and metrics cannot disagree.
//!
//! Logs carry ids only (tenant, device, alarm), never payload contents
//! beyond a rejection's reason: personal data stays in the store.

use chrono::{DateTime, Utc};

use crate::deliver::plan::{Decision, Plan};
use crate::metrics::Metrics;
use crate::model::{wire_time, Alarm, AlarmId, NewAlarm};
use crate::source::mqtt::payload::{DroppedField, RejectReason};
use crate::source::serial::frame::InvalidReason;

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

/// A serial line that could not be read: answered NAK and quarantined.
pub struct SerialLineRejected<'a> {
    pub source_id: &'a str,
    pub reason: InvalidReason,
    pub detail: &'a str,
}

impl SerialLineRejected<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        Metrics::inc(&metrics.serial_rejected[self.reason as usize]);
        tracing::warn!(
            source = self.source_id,
            reason = self.reason.as_str(),
            detail = self.detail,
            "serial line rejected and quarantined"
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
    pub reason: &'a str,
}

impl DeviceFaultRaised<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        Metrics::inc(&metrics.device_faults_raised);
        tracing::warn!(
            tenant = self.tenant,
            device_id = self.device_id,
            reason = self.reason,
            "device_fault raised for broken input"
        );
    }
}

/// One delivery attempt and what follows from it.
pub struct DeliveryAttempted<'a> {
    pub alarm: &'a Alarm,
    pub provider: &'a str,
    pub attempt: u32,
    pub fallback: bool,
    pub detail: &'a str,
    pub decision: &'a Decision,
    /// The plan the attempt was made under.
    pub before: &'a Plan,
}

impl DeliveryAttempted<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        Metrics::inc(&metrics.deliveries_attempted);
        let a = self.alarm;
        match self.decision {
            Decision::Delivered => {
                Metrics::inc(&metrics.deliveries_accepted);
                tracing::debug!(
                    alarm_id = %a.id, provider = self.provider, attempt = self.attempt,
                    fallback = self.fallback, detail = self.detail, "alarm accepted by provider"
                );
            }
            Decision::Retry { plan, due_at } => {
                Metrics::inc(&metrics.deliveries_failed);
                tracing::warn!(
                    alarm_id = %a.id, provider = self.provider, attempt = self.attempt,
                    detail = self.detail, next_provider = plan.provider(),
                    next_at = %wire_time(*due_at), "delivery attempt failed"
                );
                if plan.position != self.before.position && !self.before.exhausted {
                    Metrics::inc(&metrics.failovers);
                    tracing::info!(
                        alarm_id = %a.id, from = self.provider, to = plan.provider(),
                        priority = a.priority.number(), "failing over to the next provider"
                    );
                }
                if plan.exhausted && !self.before.exhausted {
                    Metrics::inc(&metrics.chains_exhausted);
                    tracing::error!(
                        alarm_id = %a.id, tenant = %a.tenant, class = a.class.name(),
                        chain = ?plan.chain,
                        "no provider accepted the alarm before its deadlines; retrying every provider in turn"
                    );
                }
            }
            Decision::DeadLetter { plan } => {
                Metrics::inc(&metrics.deliveries_failed);
                Metrics::inc(&metrics.dead_letters);
                tracing::error!(
                    alarm_id = %a.id, tenant = %a.tenant, device_id = %a.device_id,
                    class = a.class.name(), rejected_by = ?plan.rejected,
                    "DEAD LETTER: every provider rejected the alarm; a person must act"
                );
            }
        }
    }
}
