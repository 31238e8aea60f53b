//! `device_fault` alarms for devices that send input the gateway cannot
//! accept (DESIGN.md guarantee 2): at most one per device per hour, so that
//! a person looks at the device without being flooded.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::model::{AlarmClass, AlarmDetails, DedupeKey, NewAlarm, SourceKind, SourceRef};

/// A device gets at most one `device_fault` alarm per this period.
pub const FAULT_PERIOD: chrono::Duration = chrono::Duration::hours(1);
/// Devices remembered before the expired ones are forgotten.
const REMEMBERED: usize = 100_000;
/// Most raw bytes kept with a fault alarm.
const MAX_RAW: usize = 4 * 1024;

/// Remembers when each device last raised a fault.
#[derive(Debug, Default)]
pub struct FaultLimiter {
    last: HashMap<(String, String), DateTime<Utc>>,
}

impl FaultLimiter {
    /// True (and remembered) when the device may raise a fault now.
    pub fn admit(&mut self, tenant: &str, device_id: &str, now: DateTime<Utc>) -> bool {
        let key = (tenant.to_owned(), device_id.to_owned());
        if let Some(last) = self.last.get(&key) {
            if now.signed_duration_since(*last) < FAULT_PERIOD {
                return false;
            }
        }
        if self.last.len() >= REMEMBERED {
            self.last
                .retain(|_, last| now.signed_duration_since(*last) < FAULT_PERIOD);
        }
        self.last.insert(key, now);
        true
    }
}

/// Why a device is faulty, for the alarm.
pub struct FaultInput<'a> {
    pub tenant: &'a str,
    pub device_id: &'a str,
    /// The source that received the input.
    pub source_id: &'a str,
    /// The machine-readable reason (`bad_json`, `bad_checksum`, …).
    pub reason: &'a str,
    /// The explanation for a person.
    pub explanation: &'a str,
    pub raw: &'a [u8],
}

/// The `device_fault` alarm for broken input.
pub fn device_fault_alarm(input: &FaultInput<'_>, now: DateTime<Utc>) -> NewAlarm {
    NewAlarm {
        tenant: input.tenant.to_owned(),
        device_id: input.device_id.to_owned(),
        account: None,
        seq: None,
        class: AlarmClass::DeviceFault,
        restore: false,
        raised_at: None,
        received_at: now,
        source: SourceRef {
            kind: SourceKind::Internal,
            id: input.source_id.to_owned(),
            code: format!("bad_input:{}", input.reason),
        },
        details: AlarmDetails {
            text: Some(format!(
                "device sends input the gateway cannot accept: {}",
                input.explanation
            )),
            ..AlarmDetails::default()
        },
        raw: input.raw[..input.raw.len().min(MAX_RAW)].to_vec(),
        dedupe_key: DedupeKey::from_parts(&[
            "fault",
            input.tenant,
            input.device_id,
            &now.timestamp_millis().to_string(),
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_fault_per_device_per_hour() {
        let t0 = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(20_000);
        let mut limiter = FaultLimiter::default();
        assert!(limiter.admit("t", "d", t0));
        assert!(!limiter.admit("t", "d", t0 + chrono::Duration::minutes(59)));
        assert!(limiter.admit("t", "other", t0));
        assert!(limiter.admit("t", "d", t0 + FAULT_PERIOD));
    }
}
