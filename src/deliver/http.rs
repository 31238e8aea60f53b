//! The HTTP provider adapter: a signed JSON POST per delivery (DESIGN.md,
//! "Provider delivery (HTTP)").
//!
//! Headers: `Content-Type: application/json`, `Idempotency-Key: {alarm_id}`,
//! `X-Telegate-Timestamp: {unix seconds}`, `X-Telegate-Signature:
//! v1={hex HMAC-SHA256(secret, timestamp + "." + body)}`. Redirects are never
//! followed (reqwest would turn a redirected POST into a GET).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Serialize;
use sha2::Sha256;

use super::{Delivery, DeliveryError, Receipt};
use crate::config::ProviderConfig;
use crate::model::{wire_time, AlarmId};

/// A provider reached over HTTP.
#[derive(Debug, Clone)]
pub struct HttpProvider {
    id: String,
    url: url::Url,
    /// The HMAC key; never logged.
    secret: Vec<u8>,
    client: reqwest::Client,
    /// The limit of one attempt.
    timeout: Duration,
}

impl HttpProvider {
    /// The limit of one attempt.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Builds the adapter for one `[[provider]]`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS set-up).
    pub fn new(config: &ProviderConfig) -> Result<HttpProvider, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(HttpProvider {
            id: config.id.clone(),
            url: config.url.clone(),
            secret: config.secret.expose().as_bytes().to_vec(),
            client,
            timeout: config.timeout,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Delivers one alarm. `now` is the signing time.
    ///
    /// # Errors
    /// A [`DeliveryError`]; [`DeliveryError::is_retriable`] says whether the
    /// same provider may be tried again.
    pub async fn deliver(
        &self,
        delivery: &Delivery,
        now: DateTime<Utc>,
    ) -> Result<Receipt, DeliveryError> {
        let body = serde_json::to_vec(&body(delivery))
            .map_err(|e| DeliveryError::Request(e.to_string()))?;
        let timestamp = now.timestamp().to_string();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let header =
            |v: &str| HeaderValue::from_str(v).map_err(|e| DeliveryError::Request(e.to_string()));
        headers.insert("idempotency-key", header(&delivery.alarm.id.to_string())?);
        headers.insert("x-telegate-timestamp", header(&timestamp)?);
        headers.insert(
            "x-telegate-signature",
            header(&sign(&self.secret, &timestamp, &body))?,
        );
        let response = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    DeliveryError::Timeout
                } else {
                    DeliveryError::Connect(error_chain(&e))
                }
            })?;
        classify(response.status(), response.headers())
    }
}

/// Turns a response status into a receipt or an error.
fn classify(status: StatusCode, headers: &HeaderMap) -> Result<Receipt, DeliveryError> {
    if status.is_success() || status == StatusCode::CONFLICT {
        return Ok(Receipt {
            status: status.as_u16(),
        });
    }
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Err(DeliveryError::Status {
        code: status.as_u16(),
        retry_after,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `v1=` and the lowercase hex HMAC-SHA256 of `timestamp + "." + body`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The JSON body of a delivery, written straight from the alarm. Fields are
/// in alphabetical order (the order of `serde_json`'s map, which built the
/// body before), and the optional details are left out when absent.
#[derive(Serialize)]
pub struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<&'a str>,
    alarm_id: AlarmId,
    attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    battery_pct: Option<u8>,
    class: &'static str,
    contract_id: Option<&'a str>,
    device_id: &'a str,
    fallback: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    lat: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lon: Option<f64>,
    priority: u8,
    raised_at: Option<String>,
    received_at: String,
    restore: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    rssi: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sensor: Option<&'a str>,
    seq: Option<u64>,
    source: BodySource<'a>,
    tenant: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    uncontracted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<u32>,
}

/// The `source` object of [`Body`].
#[derive(Serialize)]
struct BodySource<'a> {
    code: &'a str,
    id: &'a str,
    kind: &'static str,
}

/// The JSON body of a delivery.
pub fn body(d: &Delivery) -> Body<'_> {
    let a = &d.alarm;
    let details = &a.details;
    Body {
        account: a.account.as_deref(),
        alarm_id: a.id,
        attempt: d.attempt,
        battery_pct: details.battery_pct,
        class: a.class.name(),
        contract_id: d.contract_id.as_deref(),
        device_id: &a.device_id,
        fallback: d.fallback,
        lat: details.lat,
        lon: details.lon,
        priority: a.priority.number(),
        raised_at: a.raised_at.map(wire_time),
        received_at: wire_time(a.received_at),
        restore: a.restore,
        rssi: details.rssi,
        sensor: details.sensor.as_deref(),
        seq: a.seq,
        source: BodySource {
            code: &a.source.code,
            id: &a.source.id,
            kind: a.source.kind.name(),
        },
        tenant: &a.tenant,
        text: details.text.as_deref(),
        uncontracted: d.contract_id.is_none(),
        zone: details.zone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Alarm, AlarmClass, AlarmDetails, SourceKind, SourceRef};

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // The HMAC itself, against the published test vector.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"The quick brown fox jumps over the lazy dog");
        let whole = hex::encode(mac.finalize().into_bytes());
        assert_eq!(
            whole,
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        // And what is signed: the timestamp, a dot, the body.
        let joined = sign(b"key", "The", b"quick");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"The.quick");
        assert_eq!(
            joined,
            format!("v1={}", hex::encode(mac.finalize().into_bytes()))
        );
    }

    fn delivery(details: AlarmDetails, contract_id: Option<&str>) -> Delivery {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        Delivery {
            alarm: Alarm {
                id: "0190f3a0-7b1c-7cc0-8000-00000000002a".parse().unwrap(),
                tenant: "north".into(),
                device_id: "unit-\"7\"".into(),
                account: details.zone.map(|_| "1234".into()),
                seq: Some(41),
                class: AlarmClass::Fall,
                priority: AlarmClass::Fall.priority(),
                restore: false,
                raised_at: details.zone.map(|_| at("2026-11-22T10:15:30.123Z")),
                received_at: at("2026-11-22T10:15:30.456Z"),
                stored_at: at("2026-11-22T10:15:30.460Z"),
                source: SourceRef {
                    kind: SourceKind::Mqtt,
                    id: "devices".into(),
                    code: "fall".into(),
                },
                details,
                raw: Vec::new(),
            },
            contract_id: contract_id.map(Into::into),
            attempt: 2,
            fallback: true,
        }
    }

    #[test]
    fn the_body_has_every_field_of_the_contract_in_a_fixed_order() {
        let full = AlarmDetails {
            zone: Some(3),
            sensor: Some("hall".into()),
            battery_pct: Some(87),
            rssi: Some(-71),
            lat: Some(51.5),
            lon: Some(-0.125),
            text: Some("caf\u{e9} \"x\"".into()),
        };
        let whole = serde_json::to_string(&body(&delivery(full, Some("c-1")))).unwrap();
        assert_eq!(
            whole,
            r#"{"account":"1234","alarm_id":"0190f3a0-7b1c-7cc0-8000-00000000002a","attempt":2,"#
                .to_owned()
                + r#""battery_pct":87,"class":"fall","contract_id":"c-1","device_id":"unit-\"7\"","#
                + r#""fallback":true,"lat":51.5,"lon":-0.125,"priority":1,"#
                + r#""raised_at":"2026-11-22T10:15:30.123Z","received_at":"2026-11-22T10:15:30.456Z","#
                + r#""restore":false,"rssi":-71,"sensor":"hall","seq":41,"#
                + r#""source":{"code":"fall","id":"devices","kind":"mqtt"},"tenant":"north","#
                + r#""text":"café \"x\"","uncontracted":false,"zone":3}"#
        );
        let bare = serde_json::to_string(&body(&delivery(AlarmDetails::default(), None))).unwrap();
        assert_eq!(
            bare,
            r#"{"alarm_id":"0190f3a0-7b1c-7cc0-8000-00000000002a","attempt":2,"class":"fall","#
                .to_owned()
                + r#""contract_id":null,"device_id":"unit-\"7\"","fallback":true,"priority":1,"#
                + r#""raised_at":null,"received_at":"2026-11-22T10:15:30.456Z","restore":false,"#
                + r#""seq":41,"source":{"code":"fall","id":"devices","kind":"mqtt"},"#
                + r#""tenant":"north","uncontracted":true}"#
        );
    }

    #[test]
    fn statuses_are_classified_as_the_contract_says() {
        let h = HeaderMap::new();
        for ok in [200, 201, 202, 204, 409] {
            assert!(
                classify(StatusCode::from_u16(ok).unwrap(), &h).is_ok(),
                "{ok}"
            );
        }
        for retry in [408, 425, 429, 500, 502, 503, 504] {
            let e = classify(StatusCode::from_u16(retry).unwrap(), &h).unwrap_err();
            assert!(e.is_retriable(), "{retry}");
        }
        for reject in [301, 302, 307, 308, 400, 401, 403, 404, 410, 422] {
            let e = classify(StatusCode::from_u16(reject).unwrap(), &h).unwrap_err();
            assert!(!e.is_retriable(), "{reject}");
        }
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let e = classify(StatusCode::SERVICE_UNAVAILABLE, &h).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    }
}
