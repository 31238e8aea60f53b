//! Routing and delivery through the whole gateway: devices publish over MQTT,
//! ARC simulators (real HTTP servers on loopback) receive signed deliveries
//! and report progress back through the gateway's API.

mod common;

use std::time::Duration;

use common::{stores, unique, BrokerChoice, Harness, StoreChoice, WAIT};
use firmware_sim::arc::{self, ArcConfig, ArcSim, Delay, Mode};
use serde_json::{json, Value};
use telegate::model::AlarmId;

/// A simulated ARC with its own secret and token.
async fn arc_sim(name: &str, gateway_api: Option<String>) -> ArcSim {
    let mut config = ArcConfig::new(format!("{name}-secret"), format!("{name}-token"));
    config.gateway_api = gateway_api;
    config.answer_delay = Delay::Fixed(Duration::from_millis(20));
    config.resolve_delay = Delay::Fixed(Duration::from_millis(20));
    ArcSim::start(config).await.expect("ARC simulator starts")
}

fn provider(id: &str, sim: &ArcSim) -> String {
    format!(
        "[[provider]]\nid = \"{id}\"\nurl = \"{url}\"\nsecret = \"{id}-secret\"\ntoken = \"{id}-token\"\ntimeout_s = 2\n",
        url = sim.url()
    )
}

/// A contract for `tenant` from `north` with fallback `south`, failing over
/// after one second, in force from 2020 to 2099.
fn contract(
    id: &str,
    tenant: &str,
    primary: &str,
    fallback: &[&str],
    starts: &str,
    ends: &str,
) -> String {
    let fallback: Vec<String> = fallback.iter().map(|f| format!("\"{f}\"")).collect();
    format!(
        "[[contract]]\nid = \"{id}\"\nprovider = \"{primary}\"\nfallback = [{}]\ntenants = [\"{tenant}\"]\n\
         starts = {starts}\nends = {ends}\n\
         failover_after_s = {{ critical = 1, urgent = 1, technical = 1, routine = 1 }}\n",
        fallback.join(", ")
    )
}

/// Two ARCs, one contract for a fresh tenant (north first, south as its
/// fallback, failing over after `failover_s` seconds), and a gateway.
struct TwoArcs {
    north: ArcSim,
    south: ArcSim,
    tenant: String,
    h: Harness,
}

/// Starts [`TwoArcs`] with the gateway storing in `store`.
async fn two_arcs_on(
    store: &StoreChoice,
    contract_id: &str,
    default_provider: &str,
    failover_s: u32,
    north_mode: Mode,
) -> TwoArcs {
    let north = arc_sim("north", None).await;
    let south = arc_sim("south", None).await;
    north.set_mode(north_mode).await.unwrap();
    let tenant = unique("t");
    let delivery = format!(
        "{}{}{}[routing]\ndefault_provider = \"{default_provider}\"\n",
        provider("north", &north),
        provider("south", &south),
        contract(
            contract_id,
            &tenant,
            "north",
            &["south"],
            "2020-01-01",
            "2099-12-31"
        )
        .replace(
            "critical = 1, urgent = 1",
            &format!("critical = {failover_s}, urgent = {failover_s}")
        ),
    );
    let h = Harness::start_on(&BrokerChoice::Embedded, store, &delivery).await;
    TwoArcs {
        north,
        south,
        tenant,
        h,
    }
}

fn alarm_id(reply: &Value) -> AlarmId {
    reply["alarm_id"]
        .as_str()
        .expect("alarm_id")
        .parse()
        .expect("uuid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_reaches_the_arc_signed_with_every_field_and_every_stage_is_stored() {
    for store in stores() {
        eprintln!("store: {}", store.name());
        an_alarm_reaches_the_arc_on(&store).await;
    }
}

async fn an_alarm_reaches_the_arc_on(store: &StoreChoice) {
    let TwoArcs {
        north,
        south,
        tenant,
        h,
    } = two_arcs_on(store, "C-1", "south", 1, Mode::Accept).await;
    let mut dev = h.device(&tenant, "pendant-4").await;
    let reply = dev
        .send(
            json!({"seq": 12, "cid": "1101", "ts": "2026-11-22T10:15:30.123Z", "zone": 3,
                     "sensor": "pendant", "battery_pct": 77, "rssi": -61, "lat": 53.1, "lon": -1.5,
                     "text": "help"}),
        )
        .await;
    assert_eq!(reply["status"], "accepted");
    let id = alarm_id(&reply);
    let got = north
        .wait_for_alarm(&id.to_string(), WAIT)
        .await
        .expect("the contracted ARC got the alarm");

    // Headers: signature over timestamp and body, idempotency key.
    let header = |name: &str| got.header(name).map(str::to_owned).unwrap_or_default();
    assert_eq!(header("idempotency-key"), id.to_string());
    assert_eq!(header("content-type"), "application/json");
    assert!(header("x-telegate-signature").starts_with("v1="));
    // The simulator checks the signature against its secret and answers 401
    // when it is wrong: it accepted this one, and refused none.
    let stats = north.stats();
    assert_eq!(
        (stats.accepted, stats.bad_signature, stats.bad_body),
        (1, 0, 0)
    );
    let ts: i64 = header("x-telegate-timestamp")
        .parse()
        .expect("unix seconds");
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);

    // Body: every field of the contract.
    let b = &got.body;
    assert_eq!(b["alarm_id"], id.to_string());
    assert_eq!(b["contract_id"], "C-1");
    assert_eq!(b["uncontracted"], false);
    assert_eq!(b["tenant"], tenant.as_str());
    assert_eq!(b["device_id"], "pendant-4");
    assert_eq!(b["seq"], 12);
    assert_eq!(b["class"], "personal_emergency");
    assert_eq!(b["priority"], 1);
    assert_eq!(b["restore"], false);
    assert_eq!(b["raised_at"], "2026-11-22T10:15:30.123Z");
    assert!(arc::is_wire_timestamp(b["received_at"].as_str().unwrap()));
    assert_eq!(b["attempt"], 1);
    assert_eq!(b["fallback"], false);
    assert_eq!(
        b["source"],
        json!({"kind": "mqtt", "id": "devices", "code": "1101"})
    );
    assert_eq!(b["zone"], 3);
    assert_eq!(b["sensor"], "pendant");
    assert_eq!(b["battery_pct"], 77);
    assert_eq!(b["rssi"], -61);
    assert_eq!(b["lat"], 53.1);
    assert_eq!(b["lon"], -1.5);
    assert_eq!(b["text"], "help");
    assert_eq!(south.stats().received, 0, "the fallback was not needed");

    // The store: every stage, in order.
    let store = h.gateway.store.clone();
    let mut stages = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        stages = store.stage_times(id).await.unwrap();
        if stages.iter().any(|s| s.stage == "accepted") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let names: Vec<&str> = stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(
        names,
        ["raised", "received", "stored", "routed", "attempt", "accepted"]
    );
    assert!(
        stages.windows(2).skip(1).all(|w| w[0].at <= w[1].at),
        "in time order"
    );
    assert_eq!(stages[4].provider.as_deref(), Some("north"));
    assert_eq!(stages[5].provider.as_deref(), Some("north"));
    let row = store.outbox_row(id).await.unwrap().unwrap();
    assert_eq!(row.state, "delivered");
    assert_eq!(row.accepted_by.as_deref(), Some("north"));
    h.stop().await;
    north.shutdown().await;
    south.shutdown().await;
}

/// Waits until the alarm's outbox row is delivered and returns its stages.
async fn delivered(h: &Harness, id: AlarmId) -> Vec<telegate::store::StageTime> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row = h.gateway.store.outbox_row(id).await.unwrap().unwrap();
        if row.state == "delivered" {
            return h.gateway.store.stage_times(id).await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered in time: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arc_answering_503_loses_the_alarm_to_the_fallback_after_the_failover_time_and_not_back()
{
    for store in stores() {
        eprintln!("store: {}", store.name());
        an_arc_answering_503_loses_the_alarm_to_the_fallback_after_the_failover_time_and_not_back_on(&store).await;
    }
}

async fn an_arc_answering_503_loses_the_alarm_to_the_fallback_after_the_failover_time_and_not_back_on(
    store: &StoreChoice,
) {
    let TwoArcs {
        north,
        south,
        tenant,
        h,
    } = two_arcs_on(store, "C-2", "north", 1, Mode::Unavailable).await;
    let mut dev = h.device(&tenant, "fall-2").await;
    let reply = dev.send(json!({"seq": 1, "event": "fall"})).await;
    let id = alarm_id(&reply);
    let got = south
        .wait_for_alarm(&id.to_string(), WAIT)
        .await
        .expect("the fallback got it");
    assert_eq!(got.body["fallback"], true);
    assert_eq!(got.body["contract_id"], "C-2");
    assert!(
        got.attempt >= 2,
        "attempt counts across providers: {}",
        got.attempt
    );

    let stages = delivered(&h, id).await;
    let stored = stages.iter().find(|s| s.stage == "stored").unwrap().at;
    let attempts: Vec<_> = stages.iter().filter(|s| s.stage == "attempt").collect();
    let first_south = attempts
        .iter()
        .find(|s| s.provider.as_deref() == Some("south"))
        .unwrap();
    assert!(
        first_south.at - stored >= chrono::Duration::milliseconds(1000),
        "failover waited for the failover time: {:?}",
        first_south.at - stored
    );
    assert!(
        attempts
            .iter()
            .filter(|s| s.provider.as_deref() == Some("north"))
            .count()
            >= 2,
        "north was retried"
    );
    assert!(
        attempts
            .iter()
            .filter(|s| s.provider.as_deref() == Some("north"))
            .all(|s| s.at < first_south.at),
        "never back to north after the failover"
    );
    assert_eq!(north.stats().accepted, 0);
    let row = h.gateway.store.outbox_row(id).await.unwrap().unwrap();
    assert_eq!(row.accepted_by.as_deref(), Some("south"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_fails_over_at_once() {
    for store in stores() {
        eprintln!("store: {}", store.name());
        a_4xx_fails_over_at_once_on(&store).await;
    }
}

async fn a_4xx_fails_over_at_once_on(store: &StoreChoice) {
    // A long failover time: only a permanent rejection can move it this soon.
    let TwoArcs {
        north,
        south,
        tenant,
        h,
    } = two_arcs_on(store, "C-3", "north", 600, Mode::Reject(422)).await;
    let mut dev = h.device(&tenant, "smoke-3").await;
    let reply = dev.send(json!({"seq": 1, "sia": "FA"})).await;
    let id = alarm_id(&reply);
    let got = south
        .wait_for_alarm(&id.to_string(), WAIT)
        .await
        .expect("fallback got it");
    assert_eq!(got.body["fallback"], true);
    assert_eq!(got.attempt, 2);
    let stages = delivered(&h, id).await;
    let stored = stages.iter().find(|s| s.stage == "stored").unwrap().at;
    let accepted = stages.iter().find(|s| s.stage == "accepted").unwrap().at;
    assert!(
        accepted - stored < chrono::Duration::seconds(60),
        "failed over at once, not after 600 s"
    );
    assert_eq!(
        north.stats().rejected,
        1,
        "one attempt at the rejecting provider"
    );
    let row = h.gateway.store.outbox_row(id).await.unwrap().unwrap();
    assert_eq!(row.rejected, ["north"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontracted_and_expired_contract_alarms_go_to_the_default_provider_flagged() {
    let north = arc_sim("north", None).await;
    let spare = arc_sim("spare", None).await;
    let covered = unique("t");
    let expired = unique("t");
    let delivery = format!(
        "{}{}{}{}[routing]\ndefault_provider = \"spare\"\n",
        provider("north", &north),
        provider("spare", &spare),
        contract("LIVE", &covered, "north", &[], "2020-01-01", "2099-12-31"),
        contract("GONE", &expired, "north", &[], "2020-01-01", "2021-12-31"),
    );
    let h = Harness::start_with(&BrokerChoice::Embedded, &delivery).await;
    let mut nobody = h.device(&unique("t"), "unit-1").await;
    let mut lapsed = h.device(&expired, "unit-2").await;
    let mut live = h.device(&covered, "unit-3").await;
    let a = alarm_id(&nobody.send(json!({"seq": 1, "event": "fall"})).await);
    let b = alarm_id(&lapsed.send(json!({"seq": 1, "event": "fall"})).await);
    let c = alarm_id(&live.send(json!({"seq": 1, "event": "fall"})).await);
    for id in [a, b] {
        let got = spare
            .wait_for_alarm(&id.to_string(), WAIT)
            .await
            .expect("default provider got it");
        assert_eq!(got.body["contract_id"], Value::Null);
        assert_eq!(got.body["uncontracted"], true);
        assert_eq!(got.body["fallback"], false);
    }
    let got = north
        .wait_for_alarm(&c.to_string(), WAIT)
        .await
        .expect("contracted provider got it");
    assert_eq!(got.body["contract_id"], "LIVE");
    assert_eq!(
        north.accepted_ids().len(),
        1,
        "the expired contract was not used"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_pending_at_a_restart_are_delivered_after_it() {
    let north = arc_sim("north", None).await;
    north.set_mode(Mode::Down).await.unwrap();
    let tenant = unique("t");
    let delivery = format!(
        "{}{}[routing]\ndefault_provider = \"north\"\n",
        provider("north", &north),
        contract("C-5", &tenant, "north", &[], "2020-01-01", "2099-12-31"),
    );
    let h = Harness::start_with(&BrokerChoice::Embedded, &delivery).await;
    let mut dev = h.device(&tenant, "unit-5").await;
    let mut ids = Vec::new();
    for seq in 1..=3 {
        ids.push(alarm_id(
            &dev.send(json!({"seq": seq, "event": "panic"})).await,
        ));
    }
    assert_eq!(h.gateway.store.count_outbox_pending().await.unwrap(), 3);
    let db = h.dir.path().join("telegate.db");
    assert!(h.gateway.shutdown(Duration::from_secs(10)).await);

    // The same store, started again (no MQTT this time), with the ARC back.
    north.set_mode(Mode::Accept).await.unwrap();
    let config = telegate::config::Config::from_toml_str(
        &format!(
            "[store]\nurl = \"sqlite://{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n[deliver]\npoll_ms = 20\n{delivery}",
            db.display()
        ),
        "restart.toml",
        &|_| None,
    )
    .unwrap();
    let again = telegate::app::start(config, telegate::clock::system())
        .await
        .unwrap();
    assert!(
        north.wait_for_accepted(3, WAIT).await,
        "all three delivered after the restart"
    );
    let got = north.accepted_ids();
    for id in &ids {
        assert!(got.contains(&id.to_string()));
    }
    assert!(again.shutdown(Duration::from_secs(10)).await);
    drop(h.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_api_answers_every_status_of_the_contract() {
    for store in stores() {
        eprintln!("store: {}", store.name());
        the_progress_api_answers_every_status_of_the_contract_on(&store).await;
    }
}

async fn the_progress_api_answers_every_status_of_the_contract_on(store: &StoreChoice) {
    let TwoArcs {
        north, tenant, h, ..
    } = two_arcs_on(store, "C-6", "north", 1, Mode::Accept).await;
    let api = h.gateway.api_url();
    let http = reqwest::Client::new();
    let mut dev = h.device(&tenant, "pendant-6").await;
    let id = alarm_id(
        &dev.send(json!({"seq": 1, "event": "personal_emergency"}))
            .await,
    );
    north
        .wait_for_alarm(&id.to_string(), WAIT)
        .await
        .expect("delivered");
    delivered(&h, id).await;
    let received = h
        .gateway
        .store
        .alarm(id)
        .await
        .unwrap()
        .unwrap()
        .received_at;
    let at = |offset_ms: i64| {
        telegate::model::wire_time(received + chrono::Duration::milliseconds(offset_ms))
    };

    let post = |path_id: String, token: Option<&str>, body: String| {
        let mut req = http
            .post(format!("{api}/v1/alarms/{path_id}/progress"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    let answered =
        json!({"state": "answered", "at": at(1500), "outcome": "spoke to client"}).to_string();

    assert_eq!(
        status(post(id.to_string(), None, answered.clone()).await.unwrap()),
        401
    );
    assert_eq!(
        status(
            post(id.to_string(), Some("wrong"), answered.clone())
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(
        status(
            post("not-a-uuid".into(), Some("north-token"), answered.clone())
                .await
                .unwrap()
        ),
        404
    );
    assert_eq!(
        status(
            post(
                AlarmId::new_v7().to_string(),
                Some("north-token"),
                answered.clone()
            )
            .await
            .unwrap()
        ),
        404
    );
    assert_eq!(
        status(
            post(id.to_string(), Some("south-token"), answered.clone())
                .await
                .unwrap()
        ),
        403,
        "never offered to south"
    );
    assert_eq!(
        status(
            post(id.to_string(), Some("north-token"), "{not json".into())
                .await
                .unwrap()
        ),
        400
    );
    for bad in [
        json!({"state": "closed", "at": at(1)}),
        json!({"state": "answered"}),
        json!({"state": "answered", "at": at(-1000)}),
        json!({"state": "answered", "at": telegate::model::wire_time(chrono::Utc::now() + chrono::Duration::seconds(120))}),
    ] {
        assert_eq!(
            status(
                post(id.to_string(), Some("north-token"), bad.to_string())
                    .await
                    .unwrap()
            ),
            422,
            "{bad}"
        );
    }
    // Accepted, then repeated (keeps the first `at`), then resolved, then
    // answered again: backwards.
    let ok = post(id.to_string(), Some("north-token"), answered.clone())
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(
        body,
        json!({"alarm_id": id.to_string(), "state": "answered"})
    );
    let again = json!({"state": "answered", "at": at(9000)}).to_string();
    assert_eq!(
        status(
            post(id.to_string(), Some("north-token"), again)
                .await
                .unwrap()
        ),
        200
    );
    let resolved = json!({"state": "resolved", "at": at(20_000)}).to_string();
    assert_eq!(
        status(
            post(id.to_string(), Some("north-token"), resolved)
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        status(
            post(id.to_string(), Some("north-token"), answered)
                .await
                .unwrap()
        ),
        409
    );

    let stages = h.gateway.store.stage_times(id).await.unwrap();
    let answered_at = stages.iter().find(|s| s.stage == "answered").unwrap();
    assert_eq!(
        answered_at.at,
        received + chrono::Duration::milliseconds(1500),
        "first `at` kept"
    );
    assert_eq!(answered_at.provider.as_deref(), Some("north"));
    assert!(stages.iter().any(|s| s.stage == "resolved"));

    // Health and readiness.
    assert_eq!(
        status(http.get(format!("{api}/healthz")).send().await.unwrap()),
        200
    );
    assert_eq!(
        status(http.get(format!("{api}/readyz")).send().await.unwrap()),
        200
    );
    let metrics = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("telegate_progress_reports_total 2"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_arc_simulator_reports_answered_and_resolved_through_the_api() {
    let tenant = unique("t");
    // The simulator needs the gateway's API address, and the gateway the
    // simulator's: start the simulator with the address the API will have.
    let api_port = telegate::broker::free_port().unwrap();
    let north = arc_sim("north", Some(format!("http://127.0.0.1:{api_port}"))).await;
    let delivery = format!(
        "{}{}[routing]\ndefault_provider = \"north\"\n",
        provider("north", &north),
        contract("C-7", &tenant, "north", &[], "2020-01-01", "2099-12-31"),
    )
    .replacen(
        "[[provider]]",
        &format!("[api]\nlisten = \"127.0.0.1:{api_port}\"\n[[provider]]"),
        1,
    );
    let h = Harness::start_with(&BrokerChoice::Embedded, &delivery).await;
    let mut dev = h.device(&tenant, "pendant-7").await;
    let id = alarm_id(&dev.send(json!({"seq": 1, "event": "fall"})).await);
    assert!(
        north.wait_for_progress(2, WAIT).await,
        "answered and resolved reported"
    );
    let reports = north.progress_reports();
    assert!(reports.iter().all(|r| r.status == Some(200)), "{reports:?}");
    let stages = h.gateway.store.stage_times(id).await.unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s.stage.as_str()).collect();
    assert!(names.ends_with(&["answered", "resolved"]), "{names:?}");
    let answered = stages.iter().find(|s| s.stage == "answered").unwrap();
    let accepted = stages.iter().find(|s| s.stage == "accepted").unwrap();
    assert!(answered.at >= accepted.at);
    h.stop().await;
}

/// What [`slow_provider`] saw: deliveries at once, per lane, and in order.
#[derive(Default)]
struct SlowSeen {
    connections: std::sync::atomic::AtomicUsize,
    /// Deliveries under way now and at most, life (critical and urgent)
    /// and technical (technical and routine).
    now: [std::sync::atomic::AtomicUsize; 2],
    most: [std::sync::atomic::AtomicUsize; 2],
    /// Each delivery's priority, in the order they arrived.
    order: std::sync::Mutex<Vec<u64>>,
}

/// A provider that takes `hold` to answer each delivery with 200.
async fn slow_provider(hold: Duration) -> (String, std::sync::Arc<SlowSeen>) {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering::SeqCst;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alarms", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(SlowSeen::default());
    let server = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            server.connections.fetch_add(1, SeqCst);
            let seen = server.clone();
            let answer =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        let delivery: Value = serde_json::from_slice(&body).unwrap_or_default();
                        let priority = delivery["priority"].as_u64().unwrap_or(0);
                        let lane = usize::from(priority > 2);
                        seen.order.lock().unwrap().push(priority);
                        let now = seen.now[lane].fetch_add(1, SeqCst) + 1;
                        seen.most[lane].fetch_max(now, SeqCst);
                        tokio::time::sleep(hold).await;
                        seen.now[lane].fetch_sub(1, SeqCst);
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{}"),
                        )))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), answer),
            );
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_lane_keeps_to_max_in_flight_and_a_flood_of_technical_alarms_does_not_hold_up_a_panic()
{
    use std::sync::atomic::Ordering::SeqCst;
    let (url, seen) = slow_provider(Duration::from_millis(100)).await;
    let tenant = unique("t");
    let delivery = format!(
        "[[provider]]\nid = \"slow\"\nurl = \"{url}\"\nsecret = \"s\"\ntoken = \"t\"\n\n\
         [routing]\ndefault_provider = \"slow\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = telegate::broker::free_port().unwrap();
    let toml = common::config_with(
        &BrokerChoice::Embedded,
        port,
        &unique("tg-"),
        &dir.path().join("telegate.db"),
        &delivery,
    )
    .replace(
        "[deliver]\npoll_ms = 20\n",
        "[deliver]\npoll_ms = 20\nmax_in_flight = 2\n",
    );
    let config = telegate::config::Config::from_toml_str(&toml, "lanes.toml", &|_| None).unwrap();
    assert_eq!(config.deliver.max_in_flight, 2);
    let gateway = telegate::app::start(config, telegate::clock::system())
        .await
        .unwrap();
    assert!(gateway.wait_ready(WAIT).await);
    let mut dev = common::Device::connect("127.0.0.1", port, &tenant, "hub-7").await;
    // Twelve technical alarms take at least 600 ms through two slots of
    // 100 ms each. Once the first two are at the provider, a panic must not
    // wait for the other ten.
    for seq in 1..=12 {
        dev.send_raw(json!({"seq": seq, "event": "mains_fail"}).to_string())
            .await;
    }
    common::wait_until("two technical alarms at the provider", || {
        seen.order.lock().unwrap().len() >= 2
    })
    .await;
    dev.send(json!({"seq": 13, "event": "panic"})).await;
    common::wait_until("all thirteen delivered", || {
        seen.order.lock().unwrap().len() == 13
    })
    .await;
    let order = seen.order.lock().unwrap().clone();
    let panic_at = order
        .iter()
        .position(|&p| p == 1)
        .expect("the panic arrived");
    assert!(
        panic_at <= 4,
        "the panic waited behind technical alarms: {order:?}"
    );
    assert_eq!(seen.most[1].load(SeqCst), 2, "technical deliveries at once");
    assert_eq!(seen.most[0].load(SeqCst), 1, "life deliveries at once");
    // A connection per worker: two for the technical lane, one for life.
    assert!(
        seen.connections.load(SeqCst) <= 3,
        "{} connections",
        seen.connections.load(SeqCst)
    );
    assert!(gateway.shutdown(Duration::from_secs(10)).await);
}
