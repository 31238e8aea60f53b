//! The MQTT wire contract of DESIGN.md, as pure functions: topics, alarm and
//! heartbeat payloads, and the gateway's replies.
//!
//! Bytes become a typed [`AlarmPayload`] (or a [`Rejection`] with a reason);
//! [`normalise`] turns a payload into a [`NewAlarm`]. Nothing here does I/O
//! or reads a clock.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::model::{AlarmDetails, AlarmId, DedupeKey, NewAlarm, SourceKind, SourceRef};
pub use crate::source::code::Code;
use crate::source::code::{parse_cid, parse_sia, valid_event_name};
use crate::taxonomy::CodeTable;

/// The largest alarm payload accepted, in bytes.
pub const MAX_PAYLOAD: usize = 4 * 1024;
/// Longest `sensor` value kept.
const MAX_SENSOR: usize = 128;
/// Longest `text` value kept.
const MAX_TEXT: usize = 1024;

/// What a device topic is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Alarm,
    Heartbeat,
    Status,
    /// The gateway's own replies; it never takes these as input.
    Ack,
}

/// A parsed `telecare/{tenant}/{device_id}/{kind}` topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTopic<'a> {
    pub tenant: &'a str,
    pub device_id: &'a str,
    pub kind: TopicKind,
}

/// Why a topic is not a device topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is not telecare/{{tenant}}/{{device_id}}/{{alarm|heartbeat|status}}")]
    Shape,
    #[error("topic segment {0:?} is not 1-64 characters of [A-Za-z0-9._-]")]
    BadSegment(String),
}

/// True for a tenant or device id: 1–64 characters of `[A-Za-z0-9._-]`.
pub fn valid_segment(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a device topic; segments are matched case-sensitively.
pub fn parse_topic(topic: &str) -> Result<DeviceTopic<'_>, TopicError> {
    let mut parts = topic.split('/');
    let (Some("telecare"), Some(tenant), Some(device_id), Some(kind), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TopicError::Shape);
    };
    let kind = match kind {
        "alarm" => TopicKind::Alarm,
        "heartbeat" => TopicKind::Heartbeat,
        "status" => TopicKind::Status,
        "ack" => TopicKind::Ack,
        _ => return Err(TopicError::Shape),
    };
    for segment in [tenant, device_id] {
        if !valid_segment(segment) {
            return Err(TopicError::BadSegment(segment.chars().take(80).collect()));
        }
    }
    Ok(DeviceTopic {
        tenant,
        device_id,
        kind,
    })
}

/// The topic the gateway answers a device's alarms on.
pub fn ack_topic(tenant: &str, device_id: &str) -> String {
    format!("telecare/{tenant}/{device_id}/ack")
}

/// An optional field that was dropped because its value broke the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedField {
    pub field: &'static str,
    pub reason: &'static str,
}

/// A well-formed alarm payload.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmPayload {
    pub seq: u64,
    pub code: Code,
    /// The `restore` field, when sent with a valid value.
    pub restore: Option<bool>,
    /// The device's clock (`ts`).
    pub ts: Option<DateTime<Utc>>,
    pub details: AlarmDetails,
    /// Optional fields dropped for bad values (logged by the caller).
    pub dropped: Vec<DroppedField>,
}

/// Why a payload was rejected. The names are metric labels and appear in the
/// `reason` of a `rejected` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    TooLarge,
    NotJson,
    NotObject,
    MissingSeq,
    BadSeq,
    MissingCode,
    SeveralCodes,
    BadEvent,
    BadCid,
    BadSia,
    BadTopic,
}

impl RejectReason {
    /// How many reasons there are (the size of the metric array).
    pub const COUNT: usize = 11;

    pub const ALL: [RejectReason; RejectReason::COUNT] = [
        RejectReason::TooLarge,
        RejectReason::NotJson,
        RejectReason::NotObject,
        RejectReason::MissingSeq,
        RejectReason::BadSeq,
        RejectReason::MissingCode,
        RejectReason::SeveralCodes,
        RejectReason::BadEvent,
        RejectReason::BadCid,
        RejectReason::BadSia,
        RejectReason::BadTopic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::NotJson => "not_json",
            RejectReason::NotObject => "not_object",
            RejectReason::MissingSeq => "missing_seq",
            RejectReason::BadSeq => "bad_seq",
            RejectReason::MissingCode => "missing_code",
            RejectReason::SeveralCodes => "several_codes",
            RejectReason::BadEvent => "bad_event",
            RejectReason::BadCid => "bad_cid",
            RejectReason::BadSia => "bad_sia",
            RejectReason::BadTopic => "bad_topic",
        }
    }
}

/// A payload the gateway cannot accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The sequence number, when it could be read.
    pub seq: Option<u64>,
    pub reason: RejectReason,
    /// A human-readable explanation for the device's maker.
    pub detail: String,
}

impl Rejection {
    fn new(seq: Option<u64>, reason: RejectReason, detail: impl Into<String>) -> Rejection {
        Rejection {
            seq,
            reason,
            detail: detail.into(),
        }
    }

    /// The `reason` text of the reply: the label, then the explanation.
    pub fn reason_text(&self) -> String {
        format!("{}: {}", self.reason.as_str(), self.detail)
    }
}

/// Parses an alarm payload by the rules of DESIGN.md.
///
/// # Errors
/// A [`Rejection`] for a payload that breaks a required rule. Bad optional
/// fields are not errors: they are dropped and listed in
/// [`AlarmPayload::dropped`].
pub fn parse_alarm(payload: &[u8]) -> Result<AlarmPayload, Rejection> {
    alarm_of(&parse_fields(payload)?)
}

fn alarm_of(obj: &Fields) -> Result<AlarmPayload, Rejection> {
    let seq = parse_seq(obj)?;
    let code = parse_code(obj, seq)?;

    let mut dropped = Vec::new();
    let restore = optional(obj, "restore", &mut dropped, |v| {
        v.as_bool().ok_or("not a boolean")
    });
    let ts = optional(obj, "ts", &mut dropped, |v| {
        let s = v.as_str().ok_or("not a string")?;
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| "not an RFC 3339 timestamp")
    });
    let details = AlarmDetails {
        zone: optional(obj, "zone", &mut dropped, |v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or("not an integer 0-4294967295")
        }),
        sensor: optional(obj, "sensor", &mut dropped, |v| {
            bounded_string(v, MAX_SENSOR)
        }),
        battery_pct: optional(obj, "battery_pct", &mut dropped, |v| {
            v.as_u64()
                .filter(|n| *n <= 100)
                .and_then(|n| u8::try_from(n).ok())
                .ok_or("not an integer 0-100")
        }),
        rssi: optional(obj, "rssi", &mut dropped, |v| {
            v.as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or("not an integer")
        }),
        lat: optional(obj, "lat", &mut dropped, |v| {
            v.as_f64()
                .filter(|x| (-90.0..=90.0).contains(x))
                .ok_or("not a number -90..90")
        }),
        lon: optional(obj, "lon", &mut dropped, |v| {
            v.as_f64()
                .filter(|x| (-180.0..=180.0).contains(x))
                .ok_or("not a number -180..180")
        }),
        text: optional(obj, "text", &mut dropped, |v| bounded_string(v, MAX_TEXT)),
    };
    Ok(AlarmPayload {
        seq,
        code,
        restore,
        ts,
        details,
        dropped,
    })
}

/// The fields of a payload object that the contract names, each as sent
/// (`Some(Value::Null)` for an explicit `null`; the last one wins when a name
/// repeats, as in a [`Map`]). Any other field is skipped without being built:
/// reading into this instead of a whole `Map<String, Value>` saves a copied
/// key and a tree node for every field of every alarm.
#[derive(Debug, Default)]
struct Fields {
    values: [Option<Value>; FIELDS.len()],
}

const FIELDS: [&str; 13] = [
    "seq",
    "event",
    "cid",
    "sia",
    "restore",
    "ts",
    "zone",
    "sensor",
    "battery_pct",
    "rssi",
    "lat",
    "lon",
    "text",
];

impl Fields {
    fn slot(name: &str) -> Option<usize> {
        FIELDS.iter().position(|f| *f == name)
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(Fields::slot(name)?)?.as_ref()
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn from_map(map: Map<String, Value>) -> Fields {
        let mut fields = Fields::default();
        for (name, value) in map {
            if let Some(slot) = Fields::slot(&name).and_then(|i| fields.values.get_mut(i)) {
                *slot = Some(value);
            }
        }
        fields
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Fields;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Fields::default();
                while let Some(Name(slot)) = map.next_key()? {
                    match slot.and_then(|i| fields.values.get_mut(i)) {
                        Some(value) => *value = Some(map.next_value()?),
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }
        d.deserialize_map(Object)
    }
}

/// A field's name, as its place in [`FIELDS`] (`None` for any other name),
/// read without being copied.
struct Name(Option<usize>);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = Name;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Name, E> {
                Ok(Name(Fields::slot(name)))
            }
        }
        d.deserialize_identifier(Text)
    }
}

/// The first layer of every payload, read into its [`Fields`]. A payload
/// that does not read is read again as a whole value, for the rejection
/// [`parse_object`] gives it.
fn parse_fields(payload: &[u8]) -> Result<Fields, Rejection> {
    if payload.len() <= MAX_PAYLOAD {
        if let Ok(fields) = serde_json::from_slice(payload) {
            return Ok(fields);
        }
    }
    parse_object(payload).map(Fields::from_map)
}

/// The first layer of every payload: at most [`MAX_PAYLOAD`] bytes of JSON
/// holding an object.
fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, Rejection> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Rejection::new(
            None,
            RejectReason::TooLarge,
            format!("payload is {} bytes, at most {MAX_PAYLOAD}", payload.len()),
        ));
    }
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Rejection::new(None, RejectReason::NotJson, format!("not JSON: {e}")))?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(Rejection::new(
            None,
            RejectReason::NotObject,
            "payload is not a JSON object",
        )),
    }
}

fn bounded_string(v: &Value, max: usize) -> Result<String, &'static str> {
    match v.as_str() {
        Some(s) if s.chars().count() <= max => Ok(s.to_owned()),
        Some(_) => Err("too long"),
        None => Err("not a string"),
    }
}

/// Reads an optional field; a present field with a bad value is dropped and
/// recorded. `null` counts as absent.
fn optional<T>(
    obj: &Fields,
    field: &'static str,
    dropped: &mut Vec<DroppedField>,
    parse: impl FnOnce(&Value) -> Result<T, &'static str>,
) -> Option<T> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(v) => match parse(v) {
            Ok(x) => Some(x),
            Err(reason) => {
                dropped.push(DroppedField { field, reason });
                None
            }
        },
    }
}

fn parse_seq(obj: &Fields) -> Result<u64, Rejection> {
    match obj.get("seq") {
        None => Err(Rejection::new(
            None,
            RejectReason::MissingSeq,
            "seq is required",
        )),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(seq) if seq <= u64::from(u32::MAX) => Ok(seq),
            _ => Err(Rejection::new(
                None,
                RejectReason::BadSeq,
                "seq must be an integer 0-4294967295",
            )),
        },
        Some(_) => Err(Rejection::new(
            None,
            RejectReason::BadSeq,
            "seq must be a JSON integer, not a string or other value",
        )),
    }
}

fn parse_code(obj: &Fields, seq: u64) -> Result<Code, Rejection> {
    let present: Vec<&str> = ["event", "cid", "sia"]
        .into_iter()
        .filter(|k| obj.contains_key(k))
        .collect();
    let seq = Some(seq);
    match present.as_slice() {
        [] => Err(Rejection::new(
            seq,
            RejectReason::MissingCode,
            "one of event, cid or sia is required",
        )),
        ["event"] => {
            let name = obj.get("event").and_then(Value::as_str).unwrap_or("");
            if valid_event_name(name) {
                Ok(Code::Event(name.to_owned()))
            } else {
                Err(Rejection::new(
                    seq,
                    RejectReason::BadEvent,
                    "event must be 1-64 characters of [a-z0-9_] starting with a letter",
                ))
            }
        }
        ["cid"] => obj
            .get("cid")
            .and_then(Value::as_str)
            .and_then(parse_cid)
            .ok_or_else(|| {
                Rejection::new(
                    seq,
                    RejectReason::BadCid,
                    "cid must be four digits, the first 1, 3 or 6",
                )
            }),
        ["sia"] => match obj.get("sia").and_then(Value::as_str).and_then(parse_sia) {
            Some(code) => Ok(code),
            None => Err(Rejection::new(
                seq,
                RejectReason::BadSia,
                "sia must be two upper-case letters",
            )),
        },
        several => Err(Rejection::new(
            seq,
            RejectReason::SeveralCodes,
            format!(
                "exactly one of event, cid or sia is allowed, got {}",
                several.join(", ")
            ),
        )),
    }
}

/// Parses a heartbeat payload: `{"seq": n}` or empty. Returns the sequence
/// number when there is one.
///
/// # Errors
/// A [`Rejection`] for anything else.
pub fn parse_heartbeat(payload: &[u8]) -> Result<Option<u64>, Rejection> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let obj = parse_fields(payload)?;
    if obj.contains_key("seq") {
        parse_seq(&obj).map(Some)
    } else {
        Ok(None)
    }
}

/// Turns a parsed alarm payload into a [`NewAlarm`].
pub fn normalise(
    topic: &DeviceTopic<'_>,
    payload: AlarmPayload,
    table: &CodeTable,
    source_id: &str,
    received_at: DateTime<Utc>,
    raw: Vec<u8>,
) -> NewAlarm {
    let (class, code_restores) = payload.code.classify(table);
    let restore = code_restores || payload.restore == Some(true);
    let code = payload.code.original();
    let dedupe_key = DedupeKey::for_device_signal(
        topic.tenant,
        topic.device_id,
        payload.seq,
        &code,
        restore,
        payload.ts,
    );
    NewAlarm {
        tenant: topic.tenant.to_owned(),
        device_id: topic.device_id.to_owned(),
        account: None,
        seq: Some(payload.seq),
        class,
        restore,
        raised_at: payload.ts,
        received_at,
        source: SourceRef {
            kind: SourceKind::Mqtt,
            id: source_id.to_owned(),
            code,
        },
        details: payload.details,
        raw,
        dedupe_key,
    }
}

/// The gateway's answer on `…/ack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Accepted { seq: u64, alarm_id: AlarmId },
    Duplicate { seq: u64, alarm_id: AlarmId },
    Rejected { seq: Option<u64>, reason: String },
}

impl Reply {
    /// The JSON body of the reply.
    pub fn to_json(&self) -> Vec<u8> {
        let value = match self {
            Reply::Accepted { seq, alarm_id } => serde_json::json!({
                "seq": seq, "alarm_id": alarm_id.to_string(), "status": "accepted"
            }),
            Reply::Duplicate { seq, alarm_id } => serde_json::json!({
                "seq": seq, "alarm_id": alarm_id.to_string(), "status": "duplicate"
            }),
            Reply::Rejected {
                seq: Some(seq),
                reason,
            } => serde_json::json!({ "seq": seq, "status": "rejected", "reason": reason }),
            Reply::Rejected { seq: None, reason } => {
                serde_json::json!({ "status": "rejected", "reason": reason })
            }
        };
        value.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AlarmClass;
    use crate::taxonomy::Qualifier;

    fn reason(payload: &str) -> RejectReason {
        parse_alarm(payload.as_bytes()).unwrap_err().reason
    }

    /// What `parse_alarm` gave when it read every payload into a whole
    /// `Map<String, Value>`.
    fn by_whole_map(payload: &[u8]) -> Result<AlarmPayload, Rejection> {
        alarm_of(&Fields::from_map(parse_object(payload)?))
    }

    #[test]
    fn the_named_fields_read_alone_give_what_the_whole_object_gave() {
        for payload in [
            r#"{"seq": 1, "event": "fall"}"#,
            r#"{"seq": 1, "event": "fall", "seq": 2}"#,
            r#"{"s\u0065q": 3, "ci\u0064": "1101", "text": "a\"b\\c\u00e9"}"#,
            r#"{"seq": 1, "cid": null, "event": "fall"}"#,
            r#"{"seq": 1, "event": "fall", "extra": {"seq": 9, "deep": [1, {"a": null}]}}"#,
            r#"{"seq": 1, "sia": "BA", "zone": null, "lat": "52", "rssi": 1e400}"#,
            r#"{"seq": "1", "event": "fall"}"#,
            r#"{"seq": -1}"#,
            r#"{}"#,
            r#"[1, 2]"#,
            r#"[1,"#,
            r#"5 x"#,
            r#"{"seq": 1, "event": "fall"} trailing"#,
            r#"{"seq": 1, "event": "fall""#,
            r#"{"seq": 1, "event": "fa\ud800ll"}"#,
            "",
            "null",
        ] {
            assert_eq!(
                parse_alarm(payload.as_bytes()),
                by_whole_map(payload.as_bytes()),
                "{payload}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn objects_of_named_and_other_fields_read_alike(
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "seq", "event", "cid", "sia", "restore", "ts", "zone", "sensor",
                        "battery_pct", "rssi", "lat", "lon", "text", "s\\u0065q", "other", "",
                    ]),
                    proptest::sample::select(vec![
                        "null", "true", "0", "7", "-3", "4294967296", "1.5", "1e3", "\"fall\"",
                        "\"1101\"", "\"BA\"", "\"2026-11-22T10:15:30Z\"", "[]", "{\"seq\": 1}",
                        "\"x\\ny\"",
                    ]),
                ),
                0..10,
            )
        ) {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            let payload = format!("{{{}}}", body.join(", "));
            proptest::prop_assert_eq!(
                parse_alarm(payload.as_bytes()),
                by_whole_map(payload.as_bytes()),
                "{}", payload
            );
        }
    }

    #[test]
    fn topics_follow_the_contract() {
        let t = parse_topic("telecare/derbyshire/unit-7.A_b/alarm").unwrap();
        assert_eq!(
            (t.tenant, t.device_id, t.kind),
            ("derbyshire", "unit-7.A_b", TopicKind::Alarm)
        );
        assert_eq!(
            parse_topic("telecare/x/y/heartbeat").unwrap().kind,
            TopicKind::Heartbeat
        );
        assert_eq!(
            parse_topic("telecare/x/y/status").unwrap().kind,
            TopicKind::Status
        );
        assert_eq!(parse_topic("telecare/x/y/other"), Err(TopicError::Shape));
        assert_eq!(
            parse_topic("telecare/x/y/alarm/extra"),
            Err(TopicError::Shape)
        );
        assert_eq!(parse_topic("Telecare/x/y/alarm"), Err(TopicError::Shape));
        assert!(matches!(
            parse_topic("telecare/x y/d/alarm"),
            Err(TopicError::BadSegment(_))
        ));
        assert!(matches!(
            parse_topic("telecare//d/alarm"),
            Err(TopicError::BadSegment(_))
        ));
        let long = "a".repeat(65);
        assert!(parse_topic(&format!("telecare/{long}/d/alarm")).is_err());
        assert!(parse_topic(&format!("telecare/{}/d/alarm", &long[..64])).is_ok());
    }

    #[test]
    fn a_full_payload_parses() {
        let p = parse_alarm(
            br#"{"seq": 42, "cid": "1101", "ts": "2026-11-22T10:15:30.123Z", "zone": 3,
                 "sensor": "pendant", "battery_pct": 80, "rssi": -70, "lat": 52.9, "lon": -1.47,
                 "text": "help", "extra": {"kept": true}}"#,
        )
        .unwrap();
        assert_eq!(p.seq, 42);
        assert_eq!(
            p.code,
            Code::ContactId {
                qualifier: Qualifier::New,
                event: 101
            }
        );
        assert_eq!(p.code.original(), "1101");
        assert_eq!(p.details.zone, Some(3));
        assert_eq!(p.details.battery_pct, Some(80));
        assert_eq!(p.details.rssi, Some(-70));
        assert_eq!(p.details.text.as_deref(), Some("help"));
        assert!(p.dropped.is_empty());
        assert_eq!(
            p.ts.map(crate::model::wire_time).as_deref(),
            Some("2026-11-22T10:15:30.123Z")
        );
    }

    #[test]
    fn seq_must_be_a_json_integer_in_range() {
        assert_eq!(reason(r#"{"event":"fall"}"#), RejectReason::MissingSeq);
        assert_eq!(
            reason(r#"{"seq":"5","event":"fall"}"#),
            RejectReason::BadSeq
        );
        assert_eq!(
            reason(r#"{"seq":5.0,"event":"fall"}"#),
            RejectReason::BadSeq
        );
        assert_eq!(reason(r#"{"seq":-1,"event":"fall"}"#), RejectReason::BadSeq);
        assert_eq!(
            reason(r#"{"seq":4294967296,"event":"fall"}"#),
            RejectReason::BadSeq
        );
        assert_eq!(
            parse_alarm(br#"{"seq":4294967295,"event":"fall"}"#)
                .unwrap()
                .seq,
            4294967295
        );
        assert_eq!(parse_alarm(br#"{"seq":0,"event":"fall"}"#).unwrap().seq, 0);
    }

    #[test]
    fn exactly_one_code_is_required() {
        assert_eq!(reason(r#"{"seq":1}"#), RejectReason::MissingCode);
        assert_eq!(
            reason(r#"{"seq":1,"event":"fall","sia":"MA"}"#),
            RejectReason::SeveralCodes
        );
        let r = parse_alarm(br#"{"seq":9,"cid":"1101","sia":"MA"}"#).unwrap_err();
        assert_eq!(r.seq, Some(9), "seq is reported when it could be read");
    }

    #[test]
    fn malformed_codes_are_rejected() {
        assert_eq!(
            reason(r#"{"seq":1,"event":"Fall"}"#),
            RejectReason::BadEvent
        );
        assert_eq!(reason(r#"{"seq":1,"event":""}"#), RejectReason::BadEvent);
        assert_eq!(reason(r#"{"seq":1,"event":7}"#), RejectReason::BadEvent);
        assert_eq!(reason(r#"{"seq":1,"cid":"2101"}"#), RejectReason::BadCid);
        assert_eq!(reason(r#"{"seq":1,"cid":"110"}"#), RejectReason::BadCid);
        assert_eq!(reason(r#"{"seq":1,"cid":1101}"#), RejectReason::BadCid);
        assert_eq!(reason(r#"{"seq":1,"sia":"ma"}"#), RejectReason::BadSia);
        assert_eq!(reason(r#"{"seq":1,"sia":"MAX"}"#), RejectReason::BadSia);
    }

    #[test]
    fn shapes_and_sizes_are_checked() {
        assert_eq!(reason("not json"), RejectReason::NotJson);
        assert_eq!(reason("[1,2]"), RejectReason::NotObject);
        let big = format!(
            r#"{{"seq":1,"event":"fall","text":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD)
        );
        assert_eq!(reason(&big), RejectReason::TooLarge);
        assert_eq!(
            parse_alarm(&[0xff, 0xfe]).unwrap_err().reason,
            RejectReason::NotJson
        );
    }

    #[test]
    fn bad_optional_fields_are_dropped_not_rejected() {
        let p = parse_alarm(
            br#"{"seq":1,"event":"fall","battery_pct":101,"rssi":"weak","ts":"yesterday",
                 "zone":-2,"lat":91,"restore":"yes","text":"ok"}"#,
        )
        .unwrap();
        let fields: Vec<_> = p.dropped.iter().map(|d| d.field).collect();
        assert_eq!(
            fields,
            ["restore", "ts", "zone", "battery_pct", "rssi", "lat"]
        );
        assert_eq!(p.details.text.as_deref(), Some("ok"));
        assert_eq!(p.details.battery_pct, None);
    }

    #[test]
    fn normalising_maps_codes_and_restores() {
        let table = CodeTable::default();
        let topic = parse_topic("telecare/t1/d1/alarm").unwrap();
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let norm = |json: &str| {
            let p = parse_alarm(json.as_bytes()).unwrap();
            normalise(&topic, p, &table, "devices", now, json.as_bytes().to_vec())
        };
        let a = norm(r#"{"seq":1,"cid":"3101"}"#);
        assert_eq!((a.class, a.restore), (AlarmClass::PersonalEmergency, true));
        assert_eq!(a.source.code, "3101");
        let b = norm(r#"{"seq":1,"sia":"MH"}"#);
        assert_eq!((b.class, b.restore), (AlarmClass::PersonalEmergency, true));
        let c = norm(r#"{"seq":1,"event":"fall","restore":true}"#);
        assert_eq!((c.class, c.restore), (AlarmClass::Fall, true));
        let d = norm(r#"{"seq":1,"event":"levitation"}"#);
        assert_eq!(d.class, AlarmClass::Unknown);
        assert_eq!(d.priority().number(), 1);
        let e = norm(r#"{"seq":1,"cid":"6301"}"#);
        assert_eq!((e.class, e.restore), (AlarmClass::MainsFail, false));
        // The same seq with another code is another alarm.
        assert_ne!(
            norm(r#"{"seq":1,"cid":"1101"}"#).dedupe_key,
            norm(r#"{"seq":1,"cid":"1100"}"#).dedupe_key
        );
        assert_eq!(
            norm(r#"{"seq":1,"cid":"1101"}"#).dedupe_key,
            norm(r#"{"seq":1,"cid":"1101"}"#).dedupe_key
        );
    }

    #[test]
    fn heartbeats_are_empty_or_carry_a_seq() {
        assert_eq!(parse_heartbeat(b""), Ok(None));
        assert_eq!(parse_heartbeat(b"{\"seq\":7}"), Ok(Some(7)));
        assert_eq!(parse_heartbeat(b"{}"), Ok(None));
        assert!(parse_heartbeat(b"{\"seq\":\"7\"}").is_err());
        assert!(parse_heartbeat(b"nonsense").is_err());
    }

    #[test]
    fn replies_match_the_wire_contract() {
        let id: AlarmId = "0190f5a8-7b1c-7cc3-9d2e-1a2b3c4d5e6f".parse().unwrap();
        let v: Value = serde_json::from_slice(
            &Reply::Accepted {
                seq: 5,
                alarm_id: id,
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"seq":5,"alarm_id":"0190f5a8-7b1c-7cc3-9d2e-1a2b3c4d5e6f","status":"accepted"})
        );
        let v: Value = serde_json::from_slice(
            &Reply::Duplicate {
                seq: 5,
                alarm_id: id,
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(v["status"], "duplicate");
        let v: Value = serde_json::from_slice(
            &Reply::Rejected {
                seq: None,
                reason: "not_json: x".into(),
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status":"rejected","reason":"not_json: x"})
        );
    }
}
