//! The ARC simulator over real HTTP on loopback.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use firmware_sim::arc::{
    is_wire_timestamp, sign, ArcConfig, ArcSim, Delay, Mode, ProgressReport, ProgressState,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const SECRET: &str = "arc-secret";
const TOKEN: &str = "arc-token";
const WAIT: Duration = Duration::from_secs(5);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WAIT)
        .build()
        .unwrap()
}

/// A delivery body as telegate sends it.
fn alarm(alarm_id: &str) -> Value {
    json!({
        "alarm_id": alarm_id,
        "contract_id": "DCC-2026-AT",
        "uncontracted": false,
        "tenant": "derbyshire",
        "device_id": "pendant-17",
        "seq": 42,
        "class": "fall",
        "priority": 1,
        "restore": false,
        "raised_at": null,
        "received_at": "2026-11-22T10:15:30.123Z",
        "attempt": 1,
        "fallback": false,
        "source": {"kind": "mqtt", "id": "devices", "code": "fall"},
        "battery_pct": 80
    })
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Sends a delivery signed with `secret` at `timestamp`, with the idempotency key `key`.
async fn send_as(
    client: &reqwest::Client,
    sim: &ArcSim,
    secret: &str,
    timestamp: i64,
    key: Option<&str>,
    body: &[u8],
) -> reqwest::Response {
    let ts = timestamp.to_string();
    let mut request = client
        .post(sim.url())
        .header("content-type", "application/json")
        .header("x-telegate-timestamp", &ts)
        .header("x-telegate-signature", sign(secret.as_bytes(), &ts, body))
        .body(body.to_vec());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

async fn deliver(client: &reqwest::Client, sim: &ArcSim, alarm_id: &str) -> StatusCode {
    let body = serde_json::to_vec(&alarm(alarm_id)).unwrap();
    let response = send_as(client, sim, SECRET, now_unix(), Some(alarm_id), &body).await;
    StatusCode::from_u16(response.status().as_u16()).unwrap()
}

async fn start(config: ArcConfig) -> ArcSim {
    ArcSim::start(config).await.unwrap()
}

#[tokio::test]
async fn a_signed_delivery_is_accepted_and_recorded() {
    let sim = start(ArcConfig::new(SECRET, TOKEN)).await;
    assert_eq!(sim.url(), format!("http://{}/alarms", sim.addr()));
    let client = client();
    let body = alarm("01J0000000000000000000000A");
    let bytes = serde_json::to_vec(&body).unwrap();
    let ts = now_unix();
    let response = send_as(
        &client,
        &sim,
        SECRET,
        ts,
        Some("01J0000000000000000000000A"),
        &bytes,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": "accepted"})
    );

    let record = sim
        .wait_for_alarm("01J0000000000000000000000A", WAIT)
        .await
        .unwrap();
    assert_eq!(record.body, body);
    assert_eq!(record.attempt, 1);
    assert!(!record.fallback);
    assert_eq!(
        record.header("idempotency-key"),
        Some("01J0000000000000000000000A")
    );
    assert_eq!(record.header("content-type"), Some("application/json"));
    let ts = ts.to_string();
    assert_eq!(record.header("x-telegate-timestamp"), Some(ts.as_str()));
    let signature = sign(SECRET.as_bytes(), &ts, &bytes);
    assert_eq!(
        record.header("x-telegate-signature"),
        Some(signature.as_str())
    );
    assert!(record
        .headers
        .iter()
        .all(|(name, _)| *name == name.to_lowercase()));
    assert!((chrono::Utc::now() - record.received_at).num_seconds() < 5);

    assert!(sim.wait_for_accepted(1, WAIT).await);
    assert!(!sim.wait_for_accepted(2, Duration::from_millis(50)).await);
    assert_eq!(
        sim.accepted_ids(),
        ["01J0000000000000000000000A".to_owned()].into()
    );
    let stats = sim.stats();
    assert_eq!((stats.received, stats.accepted), (1, 1));
    assert!(sim.progress_reports().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_repeat_is_409_and_recorded_once() {
    let sim = start(ArcConfig::new(SECRET, TOKEN)).await;
    let client = client();
    assert_eq!(deliver(&client, &sim, "a-1").await, StatusCode::OK);
    assert_eq!(deliver(&client, &sim, "a-1").await, StatusCode::CONFLICT);
    assert_eq!(deliver(&client, &sim, "a-1").await, StatusCode::CONFLICT);
    assert_eq!(sim.accepted().len(), 1);
    let stats = sim.stats();
    assert_eq!(
        (stats.received, stats.accepted, stats.duplicates),
        (3, 1, 2)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn only_post_to_the_delivery_path_is_a_delivery() {
    let sim = start(ArcConfig::new(SECRET, TOKEN)).await;
    let client = client();
    let elsewhere = sim.url().replace("/alarms", "/alarm");
    let response = client.post(&elsewhere).body("{}").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let response = client.get(sim.url()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(
        response.headers().get("allow").map(|v| v.as_bytes()),
        Some(&b"POST"[..])
    );
    // A body past the limit is refused before it is checked.
    let huge = vec![b' '; 3 * 1024 * 1024];
    let response = send_as(&client, &sim, SECRET, now_unix(), Some("big"), &huge).await;
    assert_eq!(response.status().as_u16(), 413);
    assert_eq!(sim.stats().received, 0);
    // And deliveries still go through.
    assert_eq!(deliver(&client, &sim, "a-1").await, StatusCode::OK);
    assert_eq!(sim.stats().accepted, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_signatures_and_bodies_are_refused_and_not_recorded() {
    let sim = start(ArcConfig::new(SECRET, TOKEN)).await;
    let client = client();
    let body = serde_json::to_vec(&alarm("b-1")).unwrap();
    let now = now_unix();

    let wrong_secret = send_as(&client, &sim, "other", now, Some("b-1"), &body).await;
    assert_eq!(wrong_secret.status(), 401);
    // A minute past the 300 s window either way: the simulator reads its own
    // clock, which may have ticked on since `now` (the exact boundary is
    // tested against a fixed clock in the unit tests of `check`).
    let stale = send_as(&client, &sim, SECRET, now - 360, Some("b-1"), &body).await;
    assert_eq!(stale.status(), 401);
    let future = send_as(&client, &sim, SECRET, now + 360, Some("b-1"), &body).await;
    assert_eq!(future.status(), 401);
    let no_headers = client
        .post(sim.url())
        .header("content-type", "application/json")
        .header("idempotency-key", "b-1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(no_headers.status(), 401);
    let ts = now.to_string();
    let no_signature = client
        .post(sim.url())
        .header("content-type", "application/json")
        .header("idempotency-key", "b-1")
        .header("x-telegate-timestamp", &ts)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(no_signature.status(), 401);
    // The body was signed, then changed.
    let tampered = client
        .post(sim.url())
        .header("content-type", "application/json")
        .header("idempotency-key", "b-1")
        .header("x-telegate-timestamp", &ts)
        .header("x-telegate-signature", sign(SECRET.as_bytes(), &ts, b"{}"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(tampered.status(), 401);

    let no_key = send_as(&client, &sim, SECRET, now, None, &body).await;
    assert_eq!(no_key.status(), 400);
    let wrong_key = send_as(&client, &sim, SECRET, now, Some("b-2"), &body).await;
    assert_eq!(wrong_key.status(), 400);
    let not_json = send_as(&client, &sim, SECRET, now, Some("b-1"), b"alarm!").await;
    assert_eq!(not_json.status(), 400);
    let mut missing = alarm("b-1");
    missing.as_object_mut().unwrap().remove("source");
    missing["priority"] = json!(5);
    let missing = serde_json::to_vec(&missing).unwrap();
    let response = send_as(&client, &sim, SECRET, now, Some("b-1"), &missing).await;
    assert_eq!(response.status(), 400);
    let problems = response.json::<Value>().await.unwrap()["problems"].clone();
    assert_eq!(problems.as_array().map(Vec::len), Some(2), "{problems}");
    let plain_text = client
        .post(sim.url())
        .header("content-type", "text/plain")
        .header("idempotency-key", "b-1")
        .header("x-telegate-timestamp", &ts)
        .header("x-telegate-signature", sign(SECRET.as_bytes(), &ts, &body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(plain_text.status(), 400);

    assert!(sim.accepted().is_empty());
    let stats = sim.stats();
    assert_eq!(stats.received, 11);
    assert_eq!(stats.bad_signature, 6);
    assert_eq!(stats.bad_body, 5);
    assert_eq!(stats.accepted, 0);
    // The good delivery still goes through afterwards.
    assert_eq!(deliver(&client, &sim, "b-1").await, StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn unavailable_is_503_with_retry_after_when_set() {
    let mut config = ArcConfig::new(SECRET, TOKEN);
    config.retry_after_s = Some(2);
    let sim = start(config).await;
    let client = client();
    sim.set_mode(Mode::Unavailable).await.unwrap();
    assert_eq!(sim.mode(), Mode::Unavailable);
    let body = serde_json::to_vec(&alarm("u-1")).unwrap();
    let response = send_as(&client, &sim, SECRET, now_unix(), Some("u-1"), &body).await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    assert!(sim.accepted().is_empty());
    sim.set_mode(Mode::Accept).await.unwrap();
    assert_eq!(deliver(&client, &sim, "u-1").await, StatusCode::OK);
    let stats = sim.stats();
    assert_eq!((stats.unavailable, stats.accepted), (1, 1));
    sim.shutdown().await;

    let sim = start(ArcConfig::new(SECRET, TOKEN)).await;
    sim.set_mode(Mode::Unavailable).await.unwrap();
    let response = send_as(&client, &sim, SECRET, now_unix(), Some("u-1"), &body).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn reject_answers_its_status() {
    let sim = start(ArcConfig::new(SECRET, TOKEN)).await;
    let client = client();
    sim.set_mode(Mode::Reject(422)).await.unwrap();
    assert_eq!(
        deliver(&client, &sim, "r-1").await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    sim.set_mode(Mode::Reject(400)).await.unwrap();
    assert_eq!(deliver(&client, &sim, "r-1").await, StatusCode::BAD_REQUEST);
    assert!(sim.set_mode(Mode::Reject(42)).await.is_err());
    assert_eq!(sim.mode(), Mode::Reject(400));
    assert!(sim.accepted().is_empty());
    assert_eq!(sim.stats().rejected, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn down_refuses_connections_and_comes_back_on_the_same_port() {
    let sim = start(ArcConfig::new(SECRET, TOKEN)).await;
    let addr = sim.addr();
    let client = client();
    // A pooled keep-alive connection exists before the port goes down.
    assert_eq!(deliver(&client, &sim, "d-1").await, StatusCode::OK);

    sim.set_mode(Mode::Down).await.unwrap();
    let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let body = serde_json::to_vec(&alarm("d-2")).unwrap();
    let ts = now_unix().to_string();
    let result = client
        .post(sim.url())
        .header("content-type", "application/json")
        .header("idempotency-key", "d-2")
        .header("x-telegate-timestamp", &ts)
        .header("x-telegate-signature", sign(SECRET.as_bytes(), &ts, &body))
        .body(body)
        .send()
        .await;
    assert!(result.is_err(), "{result:?}");
    // Down twice is fine.
    sim.set_mode(Mode::Down).await.unwrap();

    sim.set_mode(Mode::Accept).await.unwrap();
    assert_eq!(sim.addr(), addr);
    assert_eq!(deliver(&client, &sim, "d-2").await, StatusCode::OK);
    assert_eq!(
        sim.accepted_ids(),
        ["d-1".to_owned(), "d-2".to_owned()].into()
    );
    sim.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn down_period_closes_then_reopens() {
    let sim = start(ArcConfig::new(SECRET, TOKEN)).await;
    let addr = sim.addr();
    let period = sim.down_period(Duration::from_millis(50), Duration::from_millis(400));
    let probe = async {
        let before = tokio::net::TcpStream::connect(addr).await.is_ok();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let during = tokio::net::TcpStream::connect(addr).await.is_ok();
        (before, during)
    };
    let (result, (before, during)) = tokio::join!(period, probe);
    result.unwrap();
    assert!(
        before && !during,
        "open before: {before}, open during: {during}"
    );
    assert_eq!(sim.mode(), Mode::Accept);
    assert_eq!(deliver(&client(), &sim, "dp-1").await, StatusCode::OK);
    sim.shutdown().await;
}

async fn answers(seed: u64) -> Vec<u16> {
    let mut config = ArcConfig::new(SECRET, TOKEN);
    config.fail_share = 0.5;
    config.seed = seed;
    let sim = start(config).await;
    let client = client();
    let mut statuses = Vec::new();
    for n in 0..60 {
        statuses.push(deliver(&client, &sim, &format!("f-{n}")).await.as_u16());
    }
    let failed = statuses.iter().filter(|s| **s == 503).count() as u64;
    let stats = sim.stats();
    assert_eq!(stats.unavailable, failed);
    assert_eq!(stats.accepted + stats.unavailable, 60);
    sim.shutdown().await;
    statuses
}

#[tokio::test]
async fn fail_share_is_reproducible_and_about_right() {
    let first = answers(7).await;
    let second = answers(7).await;
    assert_eq!(first, second);
    assert!(first.iter().all(|s| *s == 200 || *s == 503));
    let failed = first.iter().filter(|s| **s == 503).count();
    assert!((15..=45).contains(&failed), "{failed} of 60 answered 503");
}

#[tokio::test]
async fn bad_config_is_refused_with_every_problem() {
    let mut config = ArcConfig::new(SECRET, TOKEN);
    config.fail_share = 2.0;
    config.gateway_api = Some("ftp://nowhere".to_owned());
    let err = ArcSim::start(config).await.err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let message = err.to_string();
    assert!(
        message.contains("fail_share") && message.contains("gateway_api"),
        "{message}"
    );
}

/// One progress report as the stand-in gateway saw it.
#[derive(Debug)]
struct Seen {
    at: Instant,
    alarm_id: String,
    authorization: Option<String>,
    body: Value,
}

/// A stand-in for the gateway's progress API: records each report and answers from `answers` (then 200).
async fn gateway(answers: Vec<u16>) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    #[derive(Clone)]
    struct Stand {
        seen: mpsc::UnboundedSender<Seen>,
        answers: Arc<Mutex<Vec<u16>>>,
    }
    async fn progress(
        State(stand): State<Stand>,
        Path(alarm_id): Path<String>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        let _ = stand.seen.send(Seen {
            at: Instant::now(),
            alarm_id: alarm_id.clone(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: body.clone(),
        });
        let status = {
            let mut answers = stand.answers.lock().unwrap();
            if answers.is_empty() {
                200
            } else {
                answers.remove(0)
            }
        };
        (
            StatusCode::from_u16(status).unwrap(),
            Json(json!({"alarm_id": alarm_id, "state": body["state"]})),
        )
    }
    let (seen, rx) = mpsc::unbounded_channel();
    let stand = Stand {
        seen,
        answers: Arc::new(Mutex::new(answers)),
    };
    let app = Router::new()
        .route("/v1/alarms/{alarm_id}/progress", post(progress))
        .with_state(stand);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

fn progress_config(gateway: SocketAddr) -> ArcConfig {
    let mut config = ArcConfig::new(SECRET, TOKEN);
    config.gateway_api = Some(format!("http://{gateway}"));
    config.answer_delay = "fixed:20ms".parse().unwrap();
    config.resolve_delay = "fixed:20ms".parse().unwrap();
    config.progress_backoff = Duration::from_millis(10);
    config
}

#[tokio::test]
async fn progress_is_reported_answered_then_resolved() {
    let (gateway, mut seen) = gateway(Vec::new()).await;
    let sim = start(progress_config(gateway)).await;
    let client = client();
    let sent_at = Instant::now();
    let before = chrono::Utc::now();
    assert_eq!(deliver(&client, &sim, "p-1").await, StatusCode::OK);

    let answered = next(&mut seen).await;
    let resolved = next(&mut seen).await;
    for (report, state, outcome) in [
        (&answered, "answered", "operator spoke to client"),
        (&resolved, "resolved", "resolved"),
    ] {
        assert_eq!(report.alarm_id, "p-1");
        assert_eq!(report.authorization.as_deref(), Some("Bearer arc-token"));
        assert_eq!(report.body["state"], state);
        assert_eq!(report.body["outcome"], outcome);
        let at = report.body["at"].as_str().unwrap();
        assert!(is_wire_timestamp(at), "{at}");
        let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
        assert!(at >= before - chrono::Duration::milliseconds(1));
    }
    assert!(answered.at >= sent_at + Duration::from_millis(20));
    assert!(resolved.at >= answered.at + Duration::from_millis(20));
    let answered_at = answered.body["at"].as_str().unwrap();
    let resolved_at = resolved.body["at"].as_str().unwrap();
    assert!(answered_at < resolved_at, "{answered_at} {resolved_at}");

    assert!(sim.wait_for_progress(2, WAIT).await);
    assert_eq!(
        sim.progress_reports(),
        vec![
            ProgressReport {
                alarm_id: "p-1".to_owned(),
                state: ProgressState::Answered,
                status: Some(200)
            },
            ProgressReport {
                alarm_id: "p-1".to_owned(),
                state: ProgressState::Resolved,
                status: Some(200)
            },
        ]
    );
    let stats = sim.stats();
    assert_eq!((stats.progress_sent, stats.progress_failed), (2, 0));

    // A duplicate delivery starts no second round of reports.
    assert_eq!(deliver(&client, &sim, "p-1").await, StatusCode::CONFLICT);
    assert!(
        tokio::time::timeout(Duration::from_millis(150), seen.recv())
            .await
            .is_err()
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn without_records_it_still_counts_refuses_repeats_and_reports_progress() {
    let (gateway, mut seen) = gateway(Vec::new()).await;
    let mut config = progress_config(gateway);
    config.keep_records = false;
    let sim = start(config).await;
    let client = client();
    let before = chrono::Utc::now();
    assert_eq!(deliver(&client, &sim, "n-1").await, StatusCode::OK);
    let between = chrono::Utc::now();
    assert_eq!(deliver(&client, &sim, "n-2").await, StatusCode::OK);
    assert_eq!(deliver(&client, &sim, "n-1").await, StatusCode::CONFLICT);
    assert!(sim.wait_for_accepted(2, WAIT).await);
    assert_eq!(
        sim.accepted_ids(),
        ["n-1", "n-2"].map(str::to_owned).into_iter().collect()
    );
    // Each alarm's first acceptance time is kept all the same; the repeat
    // of n-1 does not move it.
    let [first, second, never] = sim.accepted_at(["n-1", "n-2", "n-3"])[..] else {
        panic!("one answer per id");
    };
    let first = first.expect("n-1 was accepted");
    assert!(
        before <= first && first <= between,
        "n-1 accepted at {first}"
    );
    assert!(second.is_some_and(|at| at >= between));
    assert_eq!(never, None);
    // Two alarms, each answered and resolved.
    for _ in 0..4 {
        next(&mut seen).await;
    }
    assert!(sim.wait_for_progress(4, WAIT).await);

    assert!(sim.accepted().is_empty());
    assert!(sim.progress_reports().is_empty());
    let stats = sim.stats();
    assert_eq!(
        (stats.received, stats.accepted, stats.duplicates),
        (3, 2, 1)
    );
    assert_eq!((stats.progress_sent, stats.progress_failed), (4, 0));
    sim.shutdown().await;
}

#[tokio::test]
async fn progress_retries_5xx_but_not_4xx() {
    // answered: 503, then 200; resolved: 403 (not retried).
    let (gateway, mut seen) = gateway(vec![503, 200, 403]).await;
    let sim = start(progress_config(gateway)).await;
    let client = client();
    assert_eq!(deliver(&client, &sim, "p-2").await, StatusCode::OK);
    assert!(sim.wait_for_progress(2, WAIT).await);
    let states: Vec<String> = [
        next(&mut seen).await,
        next(&mut seen).await,
        next(&mut seen).await,
    ]
    .iter()
    .map(|s| s.body["state"].as_str().unwrap_or_default().to_owned())
    .collect();
    assert_eq!(states, ["answered", "answered", "resolved"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), seen.recv())
            .await
            .is_err()
    );
    let statuses: Vec<_> = sim.progress_reports().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Some(200), Some(403)]);
    let stats = sim.stats();
    assert_eq!((stats.progress_sent, stats.progress_failed), (1, 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn progress_to_an_absent_gateway_gives_up() {
    // A port with nothing listening.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut config = progress_config(closed);
    config.progress_attempts = 3;
    let sim = start(config).await;
    assert_eq!(deliver(&client(), &sim, "p-3").await, StatusCode::OK);
    assert!(sim.wait_for_progress(2, WAIT).await);
    assert!(sim.progress_reports().iter().all(|r| r.status.is_none()));
    assert_eq!(sim.stats().progress_failed, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_cancels_pending_progress() {
    let (gateway, mut seen) = gateway(Vec::new()).await;
    let mut config = progress_config(gateway);
    config.answer_delay = Delay::Fixed(Duration::from_millis(300));
    let sim = start(config).await;
    assert_eq!(deliver(&client(), &sim, "p-4").await, StatusCode::OK);
    let handle = sim.clone();
    sim.shutdown().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), seen.recv())
            .await
            .is_err()
    );
    assert!(handle.progress_reports().is_empty());
    assert!(handle.set_mode(Mode::Accept).await.is_err());
}

#[test]
fn delay_strings_parse_or_explain() {
    let ms = Duration::from_millis;
    assert_eq!("fixed:2s".parse::<Delay>(), Ok(Delay::Fixed(ms(2000))));
    assert_eq!(
        "uniform:5s..30s".parse::<Delay>(),
        Ok(Delay::Uniform {
            min: ms(5000),
            max: ms(30_000)
        })
    );
    assert_eq!(
        "exp:20s".parse::<Delay>(),
        Ok(Delay::Exponential { mean: ms(20_000) })
    );
    assert_eq!(
        "lognormal:30s,0.5".parse::<Delay>(),
        Ok(Delay::LogNormal {
            median: ms(30_000),
            sigma: 0.5
        })
    );
    assert_eq!("fixed:250ms".parse::<Delay>(), Ok(Delay::Fixed(ms(250))));
    assert_eq!("fixed:2m".parse::<Delay>(), Ok(Delay::Fixed(ms(120_000))));
    for garbage in [
        "soon",
        "fixed:two",
        "weibull:3s",
        "uniform:9s..1s",
        "lognormal:3s",
    ] {
        let err = garbage.parse::<Delay>().unwrap_err().to_string();
        assert!(
            err.contains("invalid delay") && err.contains(garbage),
            "{err}"
        );
    }
}
