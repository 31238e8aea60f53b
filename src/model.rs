//! The alarm model: one shape for every signal, whatever protocol carried it.
//!
//! Sources turn their frames into a [`NewAlarm`] (what the device said, plus
//! when and where it was received). The store gives it an identity and keeps
//! it as an [`Alarm`]. Classes and priorities are closed sets; the mapping of
//! protocol codes onto them lives in [`crate::taxonomy`].

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How urgent an alarm is. Lower numbers are more urgent; delivery lanes are
/// ordered by this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Critical = 1,
    Urgent = 2,
    Technical = 3,
    Routine = 4,
}

impl Priority {
    /// Critical and urgent: the alarms that "life first" puts ahead of
    /// technical and routine signals.
    pub fn is_life(self) -> bool {
        matches!(self, Priority::Critical | Priority::Urgent)
    }

    /// Every priority, most urgent first.
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::Urgent,
        Priority::Technical,
        Priority::Routine,
    ];

    /// The number used on the wire and in the store (1–4).
    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn from_number(n: i64) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| i64::from(p.number()) == n)
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Urgent => "urgent",
            Priority::Technical => "technical",
            Priority::Routine => "routine",
        }
    }
}

/// Declares the alarm classes once, with their wire names and priorities, so
/// that the name table, the parser and the priority mapping cannot drift apart.
macro_rules! alarm_classes {
    ($($variant:ident = $name:literal => $priority:ident,)+) => {
        /// The taxonomy of DESIGN.md. `Unknown` is a code nobody has mapped
        /// yet; it is critical because an unrecognised signal from a
        /// life-safety device must be looked at.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum AlarmClass {
            $($variant,)+
        }

        impl AlarmClass {
            /// Every class, in the order of the taxonomy table.
            pub const ALL: &'static [AlarmClass] = &[$(AlarmClass::$variant,)+];

            /// The class name used on the wire and in the store.
            pub fn name(self) -> &'static str {
                match self {
                    $(AlarmClass::$variant => $name,)+
                }
            }

            /// The priority every alarm of this class gets.
            pub fn priority(self) -> Priority {
                match self {
                    $(AlarmClass::$variant => Priority::$priority,)+
                }
            }

            /// The class with this exact (case-sensitive) name, if there is one.
            pub fn from_name(name: &str) -> Option<AlarmClass> {
                match name {
                    $($name => Some(AlarmClass::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

alarm_classes! {
    Unknown = "unknown" => Critical,
    PersonalEmergency = "personal_emergency" => Critical,
    Fall = "fall" => Critical,
    Fire = "fire" => Critical,
    CarbonMonoxide = "carbon_monoxide" => Critical,
    Gas = "gas" => Critical,
    Seizure = "seizure" => Critical,
    Panic = "panic" => Critical,
    Inactivity = "inactivity" => Urgent,
    BedExit = "bed_exit" => Urgent,
    ChairExit = "chair_exit" => Urgent,
    DoorExit = "door_exit" => Urgent,
    Flood = "flood" => Urgent,
    TemperatureHigh = "temperature_high" => Urgent,
    TemperatureLow = "temperature_low" => Urgent,
    MedicationMissed = "medication_missed" => Urgent,
    CarerNoShow = "carer_no_show" => Urgent,
    MainsFail = "mains_fail" => Technical,
    LowBattery = "low_battery" => Technical,
    Tamper = "tamper" => Technical,
    DeviceFault = "device_fault" => Technical,
    CommsFail = "comms_fail" => Technical,
    SupervisionLost = "supervision_lost" => Technical,
    HeartbeatMissed = "heartbeat_missed" => Technical,
    Test = "test" => Routine,
    Cancel = "cancel" => Routine,
    CheckIn = "check_in" => Routine,
    Info = "info" => Routine,
}

impl fmt::Display for AlarmClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AlarmClass {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AlarmClass::from_name(s).ok_or_else(|| UnknownName(s.to_owned()))
    }
}

/// A name that is not in a closed set (a class, a source kind).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown name {0:?}")]
pub struct UnknownName(pub String);

/// The kind of source a signal arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Mqtt,
    Serial,
    /// Raised by the gateway itself (device faults, supervision).
    Internal,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Mqtt => "mqtt",
            SourceKind::Serial => "serial",
            SourceKind::Internal => "internal",
        }
    }
}

impl FromStr for SourceKind {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mqtt" => Ok(SourceKind::Mqtt),
            "serial" => Ok(SourceKind::Serial),
            "internal" => Ok(SourceKind::Internal),
            other => Err(UnknownName(other.to_owned())),
        }
    }
}

/// Where a signal came from and what it originally said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub kind: SourceKind,
    /// The configured id of the source (`[[mqtt]] id`, `[[serial]] id`).
    pub id: String,
    /// The original code as the device sent it: an event name, a Contact ID
    /// qualifier and event code (`1101`), or a SIA code (`MA`).
    pub code: String,
}

/// Optional measurements and context a device may send with an alarm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlarmDetails {
    pub zone: Option<u32>,
    pub sensor: Option<String>,
    pub battery_pct: Option<u8>,
    pub rssi: Option<i32>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub text: Option<String>,
}

/// A normalised signal that has not been stored yet.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlarm {
    pub tenant: String,
    pub device_id: String,
    /// Panel account, for receivers that report one.
    pub account: Option<String>,
    /// Device sequence number; serial lines carry none.
    pub seq: Option<u64>,
    pub class: AlarmClass,
    pub restore: bool,
    /// The device's clock, when it sent one.
    pub raised_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub source: SourceRef,
    pub details: AlarmDetails,
    /// The payload exactly as received.
    pub raw: Vec<u8>,
    /// What makes two signals "the same alarm" (DESIGN.md guarantee 3); see
    /// [`DedupeKey`].
    pub dedupe_key: DedupeKey,
}

impl NewAlarm {
    pub fn priority(&self) -> Priority {
        self.class.priority()
    }

    /// The alarm as stored under `id` at `stored_at`: exactly what reading
    /// the row back gives (times kept to the millisecond).
    pub fn into_stored(self, id: AlarmId, stored_at: DateTime<Utc>) -> Alarm {
        let ms = |t: DateTime<Utc>| from_millis(to_millis(t));
        Alarm {
            id,
            priority: self.priority(),
            tenant: self.tenant,
            device_id: self.device_id,
            account: self.account,
            seq: self.seq,
            class: self.class,
            restore: self.restore,
            raised_at: self.raised_at.map(ms),
            received_at: ms(self.received_at),
            stored_at: ms(stored_at),
            source: self.source,
            details: self.details,
            raw: self.raw,
        }
    }
}

/// The identity of a signal for de-duplication. Two signals with equal keys
/// received within the de-duplication window are one alarm.
///
/// It is a string so that both stores can index it, built from
/// length-prefixed parts so that no choice of field values can make two
/// different signals collide.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupeKey(String);

impl DedupeKey {
    /// The key of a device signal: tenant, device, sequence number, code
    /// (with the restore flag) and device time when sent.
    pub fn for_device_signal(
        tenant: &str,
        device_id: &str,
        seq: u64,
        code: &str,
        restore: bool,
        raised_at: Option<DateTime<Utc>>,
    ) -> DedupeKey {
        let ts = raised_at.map(|t| t.timestamp_millis().to_string());
        DedupeKey::from_parts(&[
            "dev",
            tenant,
            device_id,
            &seq.to_string(),
            code,
            if restore { "r" } else { "a" },
            ts.as_deref().unwrap_or(""),
        ])
    }

    /// Builds a key from parts; each part is length-prefixed.
    pub fn from_parts(parts: &[&str]) -> DedupeKey {
        let mut key = String::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
        for part in parts {
            key.push_str(&part.len().to_string());
            key.push(':');
            key.push_str(part);
        }
        DedupeKey(key)
    }

    /// Rebuilds a key read back from the store.
    pub fn from_stored(key: String) -> DedupeKey {
        DedupeKey(key)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The identity of a stored alarm: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AlarmId(pub Uuid);

impl AlarmId {
    /// A new time-ordered id.
    pub fn new_v7() -> AlarmId {
        AlarmId(Uuid::now_v7())
    }
}

impl fmt::Display for AlarmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for AlarmId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(AlarmId)
    }
}

/// A stored alarm.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    pub id: AlarmId,
    pub tenant: String,
    pub device_id: String,
    pub account: Option<String>,
    pub seq: Option<u64>,
    pub class: AlarmClass,
    pub priority: Priority,
    pub restore: bool,
    pub raised_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub stored_at: DateTime<Utc>,
    pub source: SourceRef,
    pub details: AlarmDetails,
    pub raw: Vec<u8>,
}

/// Formats a timestamp the way every wire contract does: RFC 3339, UTC,
/// milliseconds, `Z`.
pub fn wire_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A timestamp as milliseconds since the Unix epoch (how the store keeps it).
pub fn to_millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The inverse of [`to_millis`]; out-of-range values clamp to the epoch.
pub fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_round_trips_through_its_name() {
        for class in AlarmClass::ALL {
            assert_eq!(AlarmClass::from_name(class.name()), Some(*class));
            let json = serde_json::to_string(class).unwrap();
            assert_eq!(json, format!("\"{}\"", class.name()));
        }
        assert_eq!(AlarmClass::ALL.len(), 28);
    }

    #[test]
    fn priorities_follow_the_taxonomy() {
        use AlarmClass::*;
        for c in [
            Unknown,
            PersonalEmergency,
            Fall,
            Fire,
            CarbonMonoxide,
            Gas,
            Seizure,
            Panic,
        ] {
            assert_eq!(c.priority(), Priority::Critical, "{c}");
        }
        for c in [
            Inactivity,
            BedExit,
            ChairExit,
            DoorExit,
            Flood,
            TemperatureHigh,
            TemperatureLow,
            MedicationMissed,
            CarerNoShow,
        ] {
            assert_eq!(c.priority(), Priority::Urgent, "{c}");
        }
        for c in [
            MainsFail,
            LowBattery,
            Tamper,
            DeviceFault,
            CommsFail,
            SupervisionLost,
            HeartbeatMissed,
        ] {
            assert_eq!(c.priority(), Priority::Technical, "{c}");
        }
        for c in [Test, Cancel, CheckIn, Info] {
            assert_eq!(c.priority(), Priority::Routine, "{c}");
        }
        assert_eq!(Priority::Critical.number(), 1);
        assert_eq!(Priority::Routine.number(), 4);
    }

    #[test]
    fn class_names_are_case_sensitive() {
        assert_eq!(AlarmClass::from_name("Fall"), None);
        assert_eq!(AlarmClass::from_name("fall"), Some(AlarmClass::Fall));
    }

    #[test]
    fn dedupe_keys_do_not_collide_across_field_boundaries() {
        let a = DedupeKey::for_device_signal("ab", "c", 1, "fall", false, None);
        let b = DedupeKey::for_device_signal("a", "bc", 1, "fall", false, None);
        assert_ne!(a, b);
        let restore = DedupeKey::for_device_signal("ab", "c", 1, "fall", true, None);
        assert_ne!(a, restore);
    }

    #[test]
    fn wire_time_has_milliseconds_and_z() {
        let t = DateTime::parse_from_rfc3339("2026-11-22T10:15:30.123456+00:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(wire_time(t), "2026-11-22T10:15:30.123Z");
        assert_eq!(
            from_millis(to_millis(t)),
            t - chrono::Duration::microseconds(456)
        );
    }
}
