//! The checks on one delivery, in the order the provider contract states them (DESIGN.md, "Provider delivery").
//!
//! Pure functions over the headers and the raw body; the caller passes the current time.

use std::borrow::Cow;
use std::fmt;

use hmac::{Hmac, Mac};
use hyper::http::{header, HeaderMap};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far `X-Telegate-Timestamp` may be from the receiver's clock, either way.
pub const MAX_SKEW_S: u64 = 300;

/// The signature telegate sends: `v1=` and the lowercase hex HMAC-SHA256 of `timestamp + "." + body`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    hmac_of(secret, &[timestamp.as_bytes(), b".", body])
}

fn hmac_of(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC is defined for keys of every length (long keys are hashed), so this cannot fail.
    #[allow(clippy::expect_used)]
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Whether `signature` (the whole header value, `v1=<hex>`) signs `timestamp` and `body` with `secret`.
/// The comparison is in constant time.
pub fn verify(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex_digest) = signature.strip_prefix("v1=") else {
        return false;
    };
    let lowercase_hex = hex_digest.len() == 64
        && hex_digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !lowercase_hex {
        return false;
    }
    match hex::decode(hex_digest) {
        Ok(digest) => mac(secret, timestamp, body).verify_slice(&digest).is_ok(),
        Err(_) => false,
    }
}

/// A delivery that passed every check (its body is the caller's, unchanged).
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The alarm id, equal to the `Idempotency-Key` header.
    pub alarm_id: String,
    /// The body's `attempt`.
    pub attempt: u64,
    /// The body's `fallback`.
    pub fallback: bool,
}

/// Why a delivery was refused before the mode was consulted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401: the timestamp or signature is missing, stale or wrong.
    Signature(&'static str),
    /// 400: the `Idempotency-Key`, `Content-Type` or body breaks the contract; every problem found.
    Request(Vec<String>),
}

/// Runs every check on one delivery.
///
/// # Errors
/// The first failing stage: the signature (401), then the idempotency key, then the body (both 400).
pub fn check(
    headers: &HeaderMap,
    body: &[u8],
    secret: &[u8],
    now_unix: i64,
) -> Result<Delivery, Refusal> {
    check_signature(headers, body, secret, now_unix).map_err(Refusal::Signature)?;
    let key = header_str(headers, "idempotency-key")
        .filter(|key| !key.is_empty())
        .ok_or_else(|| Refusal::Request(vec!["missing Idempotency-Key header".to_owned()]))?;
    check_body(headers, body, key).map_err(Refusal::Request)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn check_signature(
    headers: &HeaderMap,
    body: &[u8],
    secret: &[u8],
    now_unix: i64,
) -> Result<(), &'static str> {
    let timestamp =
        header_str(headers, "x-telegate-timestamp").ok_or("missing X-Telegate-Timestamp")?;
    let seconds: i64 = Some(timestamp)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or("malformed X-Telegate-Timestamp")?;
    if now_unix.abs_diff(seconds) > MAX_SKEW_S {
        return Err("X-Telegate-Timestamp too far from now");
    }
    let signature =
        header_str(headers, "x-telegate-signature").ok_or("missing X-Telegate-Signature")?;
    if verify(secret, timestamp, body, signature) {
        Ok(())
    } else {
        Err("X-Telegate-Signature does not match")
    }
}

fn check_body(headers: &HeaderMap, body: &[u8], key: &str) -> Result<Delivery, Vec<String>> {
    let json_type = header_str(headers, header::CONTENT_TYPE.as_str())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(vec!["Content-Type is not application/json".to_owned()]);
    }
    match quick_check(body, key) {
        Some(delivery) => Ok(delivery),
        None => check_fields(body, key),
    }
}

/// The fields the contract requires, borrowed from the body. Parsing into this
/// costs a fraction of building a [`Value`] (an allocation per field), which
/// matters at thousands of deliveries a second. A body it takes passes every
/// check of [`check_fields`]; a body it does not take (a missing field, a wrong
/// type, a repeated field) goes through [`check_fields`], which lists every
/// problem.
#[derive(Deserialize)]
struct Required<'a> {
    #[serde(borrow)]
    alarm_id: Cow<'a, str>,
    #[serde(borrow)]
    tenant: Cow<'a, str>,
    #[serde(borrow)]
    device_id: Cow<'a, str>,
    #[serde(borrow)]
    class: Cow<'a, str>,
    priority: u64,
    attempt: u64,
    fallback: bool,
    // Checked for its type only.
    #[allow(dead_code)]
    uncontracted: bool,
    #[serde(borrow)]
    received_at: Cow<'a, str>,
    #[allow(dead_code)]
    source: AnObject,
}

/// Any JSON object, its contents skipped.
struct AnObject;

impl<'de> Deserialize<'de> for AnObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<AnObject, D::Error> {
        struct Skip;
        impl<'de> Visitor<'de> for Skip {
            type Value = AnObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnObject, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnObject)
            }
        }
        deserializer.deserialize_map(Skip)
    }
}

/// The cheap check of a well-formed body: the delivery when every rule holds, `None` when
/// [`check_fields`] must look.
fn quick_check(body: &[u8], key: &str) -> Option<Delivery> {
    // serde takes a struct from a JSON array too; the contract wants an object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let fields: Required<'_> = serde_json::from_slice(body).ok()?;
    let holds = fields.alarm_id == key
        && !fields.tenant.is_empty()
        && !fields.device_id.is_empty()
        && !fields.class.is_empty()
        && (1..=4).contains(&fields.priority)
        && fields.attempt >= 1
        && is_wire_timestamp(&fields.received_at);
    holds.then(|| Delivery {
        alarm_id: key.to_owned(),
        attempt: fields.attempt,
        fallback: fields.fallback,
    })
}

/// Every rule of the contract on the body, each broken one listed.
fn check_fields(body: &[u8], key: &str) -> Result<Delivery, Vec<String>> {
    let value: Value =
        serde_json::from_slice(body).map_err(|err| vec![format!("body is not JSON: {err}")])?;
    let Value::Object(fields) = &value else {
        return Err(vec!["body is not a JSON object".to_owned()]);
    };

    let mut problems = Vec::new();
    match fields.get("alarm_id") {
        Some(Value::String(id)) if id == key => {}
        Some(Value::String(_)) => {
            problems.push("alarm_id does not match the Idempotency-Key header".to_owned())
        }
        _ => problems.push("alarm_id must be a string".to_owned()),
    }
    for name in ["tenant", "device_id", "class"] {
        if !matches!(fields.get(name), Some(Value::String(s)) if !s.is_empty()) {
            problems.push(format!("{name} must be a non-empty string"));
        }
    }
    if !matches!(uint(fields, "priority"), Some(1..=4)) {
        problems.push("priority must be an integer 1-4".to_owned());
    }
    let attempt = uint(fields, "attempt").filter(|n| *n >= 1);
    if attempt.is_none() {
        problems.push("attempt must be an integer of at least 1".to_owned());
    }
    for name in ["fallback", "uncontracted"] {
        if !matches!(fields.get(name), Some(Value::Bool(_))) {
            problems.push(format!("{name} must be a boolean"));
        }
    }
    if !matches!(fields.get("received_at"), Some(Value::String(s)) if is_wire_timestamp(s)) {
        problems.push(
            "received_at must be an RFC 3339 UTC timestamp with milliseconds and Z".to_owned(),
        );
    }
    if !matches!(fields.get("source"), Some(Value::Object(_))) {
        problems.push("source must be an object".to_owned());
    }
    let fallback = matches!(fields.get("fallback"), Some(Value::Bool(true)));

    match attempt {
        Some(attempt) if problems.is_empty() => Ok(Delivery {
            alarm_id: key.to_owned(),
            attempt,
            fallback,
        }),
        _ => Err(problems),
    }
}

/// A JSON integer (not `"5"`, not `5.0`) that fits in a `u64`.
fn uint(fields: &Map<String, Value>, name: &str) -> Option<u64> {
    fields.get(name).and_then(Value::as_u64)
}

/// The wire form of a timestamp: `2026-11-22T10:15:30.123Z`.
pub fn is_wire_timestamp(text: &str) -> bool {
    text.len() == 24
        && text.as_bytes().get(19) == Some(&b'.')
        && chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.3fZ").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::http::HeaderValue;
    use serde_json::json;

    const SECRET: &[u8] = b"s3cret";
    const NOW: i64 = 1_795_000_000;

    #[test]
    fn known_hmac_vector() {
        let digest = hmac_of(b"key", &[b"The quick brown fox jumps over the lazy dog"]);
        assert_eq!(
            hex::encode(digest.finalize().into_bytes()),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn signs_timestamp_dot_body() {
        let raw = hmac_of(b"key", &[b"1700000000.{}"]);
        let expected = format!("v1={}", hex::encode(raw.finalize().into_bytes()));
        assert_eq!(sign(b"key", "1700000000", b"{}"), expected);
        assert!(verify(b"key", "1700000000", b"{}", &expected));
        assert!(!verify(b"key", "1700000001", b"{}", &expected));
        assert!(!verify(b"other", "1700000000", b"{}", &expected));
        assert!(!verify(
            b"key",
            "1700000000",
            b"{}",
            &expected.to_uppercase()
        ));
        assert!(!verify(b"key", "1700000000", b"{}", &expected[3..]));
        assert!(!verify(b"key", "1700000000", b"{}", "v1=zz"));
    }

    fn body(alarm_id: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "alarm_id": alarm_id, "contract_id": null, "uncontracted": false, "tenant": "t1",
            "device_id": "d1", "seq": 7, "class": "fall", "priority": 1, "restore": false,
            "raised_at": null, "received_at": "2026-11-22T10:15:30.123Z", "attempt": 2,
            "fallback": true, "source": {"kind": "mqtt", "id": "devices", "code": "fall"}
        }))
        .unwrap()
    }

    fn headers(body: &[u8], timestamp: i64, key: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let ts = timestamp.to_string();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("x-telegate-timestamp", ts.parse().unwrap());
        headers.insert(
            "x-telegate-signature",
            sign(SECRET, &ts, body).parse().unwrap(),
        );
        if let Some(key) = key {
            headers.insert("idempotency-key", key.parse().unwrap());
        }
        headers
    }

    #[test]
    fn accepts_a_good_delivery() {
        let body = body("a1");
        let delivery = check(&headers(&body, NOW - 300, Some("a1")), &body, SECRET, NOW).unwrap();
        assert_eq!(delivery.alarm_id, "a1");
        assert_eq!(delivery.attempt, 2);
        assert!(delivery.fallback);
    }

    #[test]
    fn refuses_in_contract_order() {
        let good = body("a1");
        let stale = check(&headers(&good, NOW - 301, Some("a1")), &good, SECRET, NOW);
        assert!(matches!(stale, Err(Refusal::Signature(_))));
        let future = check(&headers(&good, NOW + 301, Some("a1")), &good, SECRET, NOW);
        assert!(matches!(future, Err(Refusal::Signature(_))));
        let wrong_secret = check(&headers(&good, NOW, Some("a1")), &good, b"nope", NOW);
        assert!(matches!(wrong_secret, Err(Refusal::Signature(_))));
        // A bad signature wins over a missing key.
        let both = check(&headers(&good, NOW, None), &good, b"nope", NOW);
        assert!(matches!(both, Err(Refusal::Signature(_))));
        let no_key = check(&headers(&good, NOW, None), &good, SECRET, NOW);
        assert!(matches!(no_key, Err(Refusal::Request(_))));
        let mismatch = check(&headers(&good, NOW, Some("a2")), &good, SECRET, NOW);
        assert!(matches!(mismatch, Err(Refusal::Request(p)) if p[0].contains("Idempotency-Key")));
    }

    #[test]
    fn reports_every_body_problem() {
        let bad = serde_json::to_vec(&json!({
            "alarm_id": "a1", "tenant": "", "device_id": "d1", "class": "fall", "priority": 5,
            "attempt": 0, "fallback": "no", "uncontracted": false,
            "received_at": "2026-11-22T10:15:30Z", "source": "mqtt"
        }))
        .unwrap();
        let Err(Refusal::Request(problems)) =
            check(&headers(&bad, NOW, Some("a1")), &bad, SECRET, NOW)
        else {
            panic!("expected a request refusal");
        };
        assert_eq!(problems.len(), 6, "{problems:?}");
        for text in [b"[1]".as_slice(), b"not json", b"{\"priority\": 1.0}"] {
            let result = check(&headers(text, NOW, Some("a1")), text, SECRET, NOW);
            assert!(matches!(result, Err(Refusal::Request(_))));
        }
    }

    /// Every way a field of the good body can break: gone, null, each wrong type, out of range.
    fn variants() -> Vec<Vec<u8>> {
        let good: Value = serde_json::from_slice(&body("a1")).unwrap();
        let Value::Object(fields) = &good else {
            unreachable!()
        };
        let values = [
            json!(null),
            json!(""),
            json!("a1"),
            json!("1"),
            json!(0),
            json!(1),
            json!(4),
            json!(5),
            json!(-1),
            json!(1.0),
            json!(true),
            json!([]),
            json!({}),
            json!("2026-11-22T10:15:30.123Z"),
        ];
        let mut bodies = vec![serde_json::to_vec(&good).unwrap()];
        for name in fields.keys() {
            let mut without = fields.clone();
            without.remove(name);
            bodies.push(serde_json::to_vec(&without).unwrap());
            for value in &values {
                let mut changed = fields.clone();
                changed.insert(name.clone(), value.clone());
                bodies.push(serde_json::to_vec(&changed).unwrap());
            }
        }
        let text = String::from_utf8(body("a1")).unwrap();
        bodies.extend(
            [
                // A repeated field: the last one wins in a `Value`.
                text.replacen("{", r#"{"priority": 9, "#, 1),
                text.replacen("{", r#"{"priority": 1, "#, 1),
                text.replacen(r#""a1""#, r#""a\u0031""#, 1),
                format!("  \n{text}  "),
                format!("[{text}]"),
                r#"["a1", "t1", "d1", "fall", 1, 2, true, false, "2026-11-22T10:15:30.123Z", {}]"#
                    .to_owned(),
                text.replacen("}", "", 1),
            ]
            .map(String::into_bytes),
        );
        bodies
    }

    #[test]
    fn the_quick_check_takes_only_what_the_full_check_takes() {
        let mut quick = 0;
        for body in variants() {
            let shown = String::from_utf8_lossy(&body).into_owned();
            let full = check_fields(&body, "a1");
            if let Some(delivery) = quick_check(&body, "a1") {
                quick += 1;
                assert_eq!(full.as_ref(), Ok(&delivery), "{shown}");
            }
            let headers = headers(&body, NOW, Some("a1"));
            let checked = check(&headers, &body, SECRET, NOW);
            match (checked, full) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{shown}"),
                (Err(Refusal::Request(got)), Err(want)) => assert_eq!(got, want, "{shown}"),
                (got, want) => panic!("{shown}: check gave {got:?}, the full check {want:?}"),
            }
        }
        // The good body, its values changed within their rules, escaped and padded: the quick path.
        assert!(quick >= 6, "only {quick} bodies took the quick path");
        assert!(quick_check(&body("a1"), "a1").is_some());
        assert!(quick_check(b"[1]", "a1").is_none());
    }

    #[test]
    fn wire_timestamps() {
        assert!(is_wire_timestamp("2026-11-22T10:15:30.123Z"));
        assert!(!is_wire_timestamp("2026-11-22T10:15:30Z"));
        assert!(!is_wire_timestamp("2026-11-22T10:15:30.123+00:00"));
        assert!(!is_wire_timestamp("2026-11-22T10:15:30.1234Z"));
        assert!(!is_wire_timestamp("2026-13-22T10:15:30.123Z"));
    }
}
