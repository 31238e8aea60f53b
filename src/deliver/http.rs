//! The HTTP provider adapter: a signed JSON POST per delivery (DESIGN.md,
//! "Provider delivery (HTTP)").
//!
//! Headers: `Content-Type: application/json`, `Idempotency-Key: {alarm_id}`,
//! `X-Telegate-Timestamp: {unix seconds}`, `X-Telegate-Signature:
//! v1={hex HMAC-SHA256(secret, timestamp + "." + body)}`. Redirects are never
//! followed: a 3xx is a rejection like any other 4xx.
//!
//! Each delivery worker holds its own HTTP/1 connection ([`Link`]) made with
//! hyper's connection API over rustls, and sends its deliveries on it one
//! after another: no pool to check a connection out of and back into, no
//! task spawned per request to return it, and the request target and `Host`
//! header are worked out once per provider. A general-purpose client's
//! per-request work (URL parsing, redirect and proxy handling) was a sixth
//! of the gateway's tokio workers' time at thousands of deliveries a second;
//! a pooled client's check-out and hand-back, with a task per attempt, cost
//! a few per cent more.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER,
};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Serialize;
use sha2::Sha256;
use tower_service::Service;

use super::{Delivery, DeliveryError, Receipt};
use crate::config::ProviderConfig;
use crate::model::{wire_time, AlarmId};

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static TIMESTAMP: HeaderName = HeaderName::from_static("x-telegate-timestamp");
static SIGNATURE: HeaderName = HeaderName::from_static("x-telegate-signature");

type Connector = HttpsConnector<HttpConnector>;

/// Why a provider's HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the URL is not usable for HTTP: {0}")]
    Url(#[from] http::uri::InvalidUri),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the URL's user name and password cannot be sent as Basic credentials")]
    Credentials,
    #[error("the URL has no host to send as the Host header")]
    Host,
}

/// A provider reached over HTTP.
#[derive(Debug, Clone)]
pub struct HttpProvider {
    id: String,
    /// The URL without user information: what the connector dials.
    uri: Uri,
    /// The request target: the URL's path and query.
    target: Uri,
    /// The URL's host, and port when it is not the scheme's default.
    host: HeaderValue,
    /// `Basic` credentials from the URL's user information; never logged.
    authorization: Option<HeaderValue>,
    /// The HMAC key, ready to sign; never logged.
    key: SigningKey,
    connector: Connector,
    /// The limit of one attempt.
    timeout: Duration,
}

/// One delivery worker's connection to a provider: opened on the first
/// delivery, kept alive between deliveries, and opened again when the
/// provider closed it or an attempt broke it off.
#[derive(Debug, Default)]
pub struct Link {
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl Link {
    /// Whether a connection is open (it may still turn out to be closed by
    /// the provider when the next request goes out).
    fn is_open(&self) -> bool {
        self.sender.as_ref().is_some_and(|s| !s.is_closed())
    }
}

impl HttpProvider {
    /// The limit of one attempt.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Builds the adapter for one `[[provider]]`.
    ///
    /// # Errors
    /// When the URL cannot be used as a request target, or TLS cannot be set up.
    pub fn new(config: &ProviderConfig) -> Result<HttpProvider, ClientError> {
        let (uri, authorization) = target(&config.url)?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let target = Uri::try_from(path)?;
        let host = match (uri.host(), uri.port()) {
            (Some(host), Some(port)) => HeaderValue::from_str(&format!("{host}:{port}")),
            (Some(host), None) => HeaderValue::from_str(host),
            (None, _) => return Err(ClientError::Host),
        }
        .map_err(|_| ClientError::Host)?;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(config.timeout.min(Duration::from_secs(5))));
        let connector = HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        Ok(HttpProvider {
            id: config.id.clone(),
            uri,
            target,
            host,
            authorization,
            key: SigningKey::new(config.secret.expose().as_bytes()),
            connector,
            timeout: config.timeout,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Delivers one alarm on `link`. `now` is the signing time.
    ///
    /// # Errors
    /// A [`DeliveryError`]; [`DeliveryError::is_retriable`] says whether the
    /// same provider may be tried again.
    pub async fn deliver(
        &self,
        link: &mut Link,
        delivery: &Delivery,
        now: DateTime<Utc>,
    ) -> Result<Receipt, DeliveryError> {
        let body = serde_json::to_vec(&body(delivery))
            .map_err(|e| DeliveryError::Request(e.to_string()))?;
        let timestamp = now.timestamp().to_string();
        let header =
            |v: &str| HeaderValue::from_str(v).map_err(|e| DeliveryError::Request(e.to_string()));
        let signature = header(&self.key.sign(&timestamp, &body))?;
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.target.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            IDEMPOTENCY_KEY.clone(),
            header(&delivery.alarm.id.to_string())?,
        );
        headers.insert(TIMESTAMP.clone(), header(&timestamp)?);
        headers.insert(SIGNATURE.clone(), signature);
        if let Some(credentials) = &self.authorization {
            headers.insert(AUTHORIZATION, credentials.clone());
        }
        match tokio::time::timeout(self.timeout, self.exchange(link, request)).await {
            Ok(result) => {
                let head = result?;
                classify(head.status, &head.headers)
            }
            Err(_) => {
                // A request cut off mid-way leaves the connection unusable
                // (hyper closes it); the next delivery opens another.
                link.sender = None;
                Err(DeliveryError::Timeout)
            }
        }
    }

    /// Sends `request` on the link's connection (opening one when there is
    /// none) and reads the whole response, so the connection can carry the
    /// next request. A request that never left on a kept-alive connection
    /// the provider had closed meanwhile is sent once more on a new one.
    async fn exchange(
        &self,
        link: &mut Link,
        mut request: Request<Full<Bytes>>,
    ) -> Result<http::response::Parts, DeliveryError> {
        let mut reused = link.is_open();
        loop {
            let sender = match &mut link.sender {
                Some(sender) if !sender.is_closed() => sender,
                slot => {
                    reused = false;
                    slot.insert(Box::pin(self.connect()).await?)
                }
            };
            let sent = match sender.ready().await {
                Ok(()) => sender.try_send_request(request).await,
                Err(e) if reused => {
                    link.sender = None;
                    tracing::debug!(provider = %self.id, error = %e, "kept-alive connection closed; opening another");
                    reused = false;
                    continue;
                }
                Err(e) => {
                    link.sender = None;
                    return Err(DeliveryError::Connect(error_chain(&e)));
                }
            };
            match sent {
                Ok(response) => return self.read_to_end(link, response).await,
                Err(mut e) => {
                    link.sender = None;
                    match e.take_message() {
                        Some(unsent) if reused => {
                            request = unsent;
                            reused = false;
                        }
                        _ => return Err(DeliveryError::Connect(error_chain(e.error()))),
                    }
                }
            }
        }
    }

    /// Reads the rest of a response; its head is the verdict. A body cut off
    /// leaves the connection unusable, but the provider's answer stands.
    async fn read_to_end(
        &self,
        link: &mut Link,
        response: Response<Incoming>,
    ) -> Result<http::response::Parts, DeliveryError> {
        let (head, mut body) = response.into_parts();
        while let Some(frame) = body.frame().await {
            if let Err(e) = frame {
                tracing::debug!(provider = %self.id, error = %e, "response body cut off");
                link.sender = None;
                break;
            }
        }
        Ok(head)
    }

    /// Opens a connection to the provider and starts driving it.
    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, DeliveryError> {
        let failed = |e: &(dyn std::error::Error + 'static)| {
            if timed_out(e) {
                DeliveryError::Timeout
            } else {
                DeliveryError::Connect(error_chain(e))
            }
        };
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| failed(&*e))?;
        let stream = connector
            .call(self.uri.clone())
            .await
            .map_err(|e| failed(&*e))?;
        let (sender, connection) = http1::handshake(stream).await.map_err(|e| failed(&e))?;
        let provider = self.id.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%provider, error = %e, "provider connection ended");
            }
        });
        Ok(sender)
    }
}

/// The request target, and `Basic` credentials when the URL has user
/// information (`https://user:password@host/…`), which is taken out of the
/// target so that it is sent only as the `Authorization` header.
fn target(url: &url::Url) -> Result<(Uri, Option<HeaderValue>), ClientError> {
    use base64::Engine as _;
    if url.username().is_empty() && url.password().is_none() {
        return Ok((url.as_str().parse()?, None));
    }
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8_lossy()
            .into_owned()
    };
    let credentials = format!(
        "{}:{}",
        decode(url.username()),
        url.password().map(decode).unwrap_or_default()
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
    let mut value =
        HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| ClientError::Credentials)?;
    value.set_sensitive(true);
    let mut bare = url.clone();
    // Neither fails on an http(s) URL with a host (configuration checked
    // both); if one did, the URL is refused rather than sent as it is.
    bare.set_username("")
        .map_err(|()| ClientError::Credentials)?;
    bare.set_password(None)
        .map_err(|()| ClientError::Credentials)?;
    Ok((bare.as_str().parse()?, Some(value)))
}

/// Whether a client error was a time-out (connecting: the exchange as a
/// whole has its own limit).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = s.source();
    }
    false
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
    SigningKey::new(secret).sign(timestamp, body)
}

/// A provider's HMAC key with its padded blocks already hashed: each
/// signature starts from a copy instead of hashing the key again.
#[derive(Clone)]
struct SigningKey(Hmac<Sha256>);

impl SigningKey {
    fn new(secret: &[u8]) -> SigningKey {
        // HMAC accepts keys of any length, so this cannot fail.
        match Hmac::<Sha256>::new_from_slice(secret) {
            Ok(mac) => SigningKey(mac),
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    fn sign(&self, timestamp: &str, body: &[u8]) -> String {
        let mut mac = self.0.clone();
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1={}", hex::encode(mac.finalize().into_bytes()))
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
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

    fn provider_at(url: &str, timeout: Duration) -> HttpProvider {
        HttpProvider::new(&ProviderConfig {
            id: "arc".into(),
            kind: crate::config::ProviderKind::Http,
            url: url.parse().unwrap(),
            secret: crate::config::Secret::new("arc-secret"),
            token: crate::config::Secret::new("arc-token"),
            timeout,
        })
        .unwrap()
    }

    #[test]
    fn a_provider_printed_for_debugging_shows_neither_its_key_nor_its_credentials() {
        let provider = provider_at(
            "http://user:pass@127.0.0.1:9/alarms",
            Duration::from_secs(1),
        );
        let printed = format!("{provider:?}");
        let key_bytes = format!("{:?}", b"arc-secret".to_vec());
        for secret in [
            "arc-secret",
            &key_bytes[1..key_bytes.len() - 1],
            "pass",
            "dXNlcjpwYXNz",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
    }

    /// Delivers alarm `n` on `link`; the status of the provider's acceptance.
    async fn status(provider: &HttpProvider, link: &mut Link, n: u128) -> u16 {
        provider
            .deliver(link, &numbered(n), Utc::now())
            .await
            .unwrap()
            .status
    }

    fn numbered(n: u128) -> Delivery {
        let mut d = delivery(AlarmDetails::default(), Some("c-1"));
        d.alarm.id = AlarmId(uuid::Uuid::from_u128(
            0x0190_f3a0_7b1c_7cc0_8000_0000_0000_0000 + n,
        ));
        d
    }

    #[tokio::test]
    async fn a_delivery_is_signed_and_accepted_then_a_repeat_is_a_conflict_that_counts_as_delivered(
    ) {
        use firmware_sim::arc::{ArcConfig, ArcSim};
        let arc = ArcSim::start(ArcConfig::new("arc-secret", "arc-token"))
            .await
            .unwrap();
        let provider = provider_at(&arc.url(), Duration::from_secs(5));
        let mut link = Link::default();
        let d = numbered(1);
        let now = Utc::now();
        assert_eq!(
            provider.deliver(&mut link, &d, now).await.unwrap().status,
            200
        );
        assert_eq!(
            provider.deliver(&mut link, &d, now).await.unwrap().status,
            409
        );
        let accepted = arc.accepted();
        assert_eq!(accepted.len(), 1);
        let header = |name: &str| {
            accepted[0]
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header("idempotency-key"), Some(d.alarm.id.to_string()));
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
        assert_eq!(
            header("x-telegate-timestamp"),
            Some(now.timestamp().to_string())
        );
        assert!(header("x-telegate-signature").is_some_and(|v| v.starts_with("v1=")));
        assert!(header("host").is_some());
        arc.shutdown().await;
    }

    /// What [`counting_server`] saw.
    #[derive(Default)]
    struct Seen {
        connections: std::sync::atomic::AtomicUsize,
        /// Each request's head (request line and headers), lower-cased.
        heads: std::sync::Mutex<Vec<String>>,
    }

    /// A loopback HTTP/1.1 server that answers every request with 200 and
    /// counts the connections it accepts; without `keep_alive` it closes
    /// each connection after one answer.
    async fn counting_server(userinfo: &str, keep_alive: bool) -> (String, std::sync::Arc<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{userinfo}{}/alarms", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(Seen::default());
        let server = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                server
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = server.clone();
                let answer = hyper::service::service_fn(move |request: Request<_>| {
                    let mut head = format!(
                        "{} {} {:?}",
                        request.method(),
                        request.uri(),
                        request.version()
                    );
                    for (name, value) in request.headers() {
                        head.push_str(&format!(
                            "\r\n{name}: {}",
                            String::from_utf8_lossy(value.as_bytes())
                        ));
                    }
                    seen.heads.lock().unwrap().push(head.to_lowercase());
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"{}"),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), answer),
                );
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn credentials_in_the_url_are_sent_as_basic_authorization_and_nowhere_else() {
        let (url, seen) = counting_server("arc%40user:pa%3Ass@", true).await;
        let provider = provider_at(&url, Duration::from_secs(5));
        let mut link = Link::default();
        assert_eq!(status(&provider, &mut link, 1).await, 200);
        let heads = seen.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 1);
        // base64("arc@user:pa:ss"), lower-cased by the server.
        assert!(
            heads[0].contains("\r\nauthorization: basic yxjjqhvzzxi6cge6c3m="),
            "{}",
            heads[0]
        );
        assert!(
            heads[0].starts_with("post /alarms http/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(!heads[0].contains("user"), "{}", heads[0]);
        let port = url::Url::parse(&url).unwrap().port().unwrap();
        assert!(
            heads[0].contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")),
            "{}",
            heads[0]
        );
        let (bare, seen) = counting_server("", true).await;
        let provider = provider_at(&bare, Duration::from_secs(5));
        status(&provider, &mut Link::default(), 2).await;
        assert!(!seen.heads.lock().unwrap()[0].contains("authorization"));
    }

    #[tokio::test]
    async fn deliveries_one_after_another_share_one_connection() {
        let (url, seen) = counting_server("", true).await;
        let provider = provider_at(&url, Duration::from_secs(5));
        let mut link = Link::default();
        for n in 0..20 {
            assert_eq!(status(&provider, &mut link, n).await, 200);
        }
        assert_eq!(
            seen.connections.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert_eq!(seen.heads.lock().unwrap().len(), 20);
    }

    #[tokio::test]
    async fn a_connection_the_provider_closed_is_replaced_without_losing_the_delivery() {
        let (url, seen) = counting_server("", false).await;
        let provider = provider_at(&url, Duration::from_secs(5));
        let mut link = Link::default();
        for n in 0..3 {
            assert_eq!(status(&provider, &mut link, n).await, 200);
            // The server said `Connection: close`; the link notices.
            let closed = async {
                while link.is_open() {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), closed)
                .await
                .unwrap();
        }
        assert_eq!(
            seen.connections.load(std::sync::atomic::Ordering::SeqCst),
            3
        );
        assert_eq!(seen.heads.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_provider_slower_than_the_timeout_is_a_retriable_timeout() {
        use firmware_sim::arc::{ArcConfig, ArcSim};
        let arc = ArcSim::start(ArcConfig::new("arc-secret", "arc-token"))
            .await
            .unwrap();
        arc.set_response_delay(Duration::from_secs(3));
        let provider = provider_at(&arc.url(), Duration::from_millis(300));
        let mut link = Link::default();
        let e = provider
            .deliver(&mut link, &numbered(1), Utc::now())
            .await
            .unwrap_err();
        assert!(matches!(e, DeliveryError::Timeout), "{e}");
        assert!(e.is_retriable());
        // The cut-off request's connection is given up; the next delivery
        // on the same link goes out on a new one.
        arc.set_response_delay(Duration::ZERO);
        assert_eq!(status(&provider, &mut link, 2).await, 200);
        arc.shutdown().await;
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_retriable_connect_error() {
        use firmware_sim::arc::{ArcConfig, ArcSim, Mode};
        let arc = ArcSim::start(ArcConfig::new("arc-secret", "arc-token"))
            .await
            .unwrap();
        arc.set_mode(Mode::Down).await.unwrap();
        let provider = provider_at(&arc.url(), Duration::from_secs(5));
        let e = provider
            .deliver(&mut Link::default(), &numbered(1), Utc::now())
            .await
            .unwrap_err();
        assert!(matches!(e, DeliveryError::Connect(_)), "{e}");
        assert!(e.is_retriable());
        arc.shutdown().await;
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
