//! The device fleet against an in-process MQTT broker (rumqttd) and a small stand-in gateway that answers
//! alarms on the ack topics as DESIGN.md's wire contract says.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_sim::fleet::{Fleet, FleetConfig, FleetStats, SentAlarm};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

const WAIT: Duration = Duration::from_secs(30);

/// Starts rumqttd on a free loopback port on its own thread and waits until it listens.
async fn start_broker() -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let server = ServerSettings {
        name: "v4-test".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name(format!("broker-{port}"))
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        })
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not listen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    port
}

/// One alarm PUBLISH the stand-in gateway saw.
#[derive(Clone, Debug)]
struct Received {
    topic: String,
    payload: Vec<u8>,
    /// The reply sent, if any.
    reply: Option<Value>,
}

#[derive(Default)]
struct GatewayState {
    received: Vec<Received>,
    /// (alarm topic, seq, ts) → alarm id.
    ids: HashMap<(String, u64, String), String>,
    /// Copies seen per (alarm topic, seq, ts), ignored ones included.
    copies: HashMap<(String, u64, String), u32>,
    /// Distinct alarms in the order first answered: (alarm topic, seq, ts).
    distinct: Vec<(String, u64, String)>,
    heartbeats: Vec<(String, Value)>,
    next_id: u64,
}

/// How the stand-in gateway answers well-formed alarms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// `accepted` or `duplicate`.
    Answer,
    /// Ignores the first copies of each alarm, as a gateway does whose store cannot commit, then answers.
    IgnoreFirst(u32),
    /// `rejected`, as for a payload it cannot accept.
    RejectAll,
}

/// A stand-in for the gateway's MQTT source: answers each alarm on its ack topic with `accepted` (a fresh id)
/// or `duplicate` (the id of the earlier alarm with the same device, seq and ts), and malformed payloads with
/// `rejected`.
#[derive(Clone)]
struct Gateway {
    state: Arc<Mutex<GatewayState>>,
}

impl Gateway {
    async fn start(port: u16, behaviour: Behaviour) -> Gateway {
        let state = Arc::new(Mutex::new(GatewayState::default()));
        // Replies go out on a connection of their own, published from a task that does not poll.
        let mut options = MqttOptions::new("gateway-replies", "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        let (replier, replier_loop) = AsyncClient::new(options, 1_000);
        tokio::spawn(pump(replier_loop));
        let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((topic, payload)) = reply_rx.recv().await {
                if replier
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });

        let mut options = MqttOptions::new("gateway-alarms", "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client
            .subscribe("telecare/+/+/alarm", QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .subscribe("telecare/+/+/heartbeat", QoS::AtLeastOnce)
            .await
            .unwrap();
        let (ready_tx, mut ready_rx) = watch::channel(0);
        let gateway = Gateway {
            state: Arc::clone(&state),
        };
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => ready_tx.send_modify(|n| *n += 1),
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let answer = answer(&state, &publish.topic, &publish.payload, behaviour);
                        if let Some(reply) = answer {
                            let _ = reply_tx.send(reply);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, ready_rx.wait_for(|n| *n >= 2))
            .await
            .expect("the stand-in gateway subscribes")
            .unwrap();
        gateway
    }

    fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    fn distinct(&self) -> Vec<(String, u64, String)> {
        self.state.lock().unwrap().distinct.clone()
    }

    fn heartbeats(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().heartbeats.clone()
    }
}

async fn pump(mut eventloop: EventLoop) {
    loop {
        if eventloop.poll().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn rejected(seq: Option<u64>, reason: &str) -> Value {
    match seq {
        Some(seq) => json!({"seq": seq, "status": "rejected", "reason": reason}),
        None => json!({"status": "rejected", "reason": reason}),
    }
}

/// Decides the reply to one PUBLISH and records it: `(ack topic, payload)`, or `None` for no reply.
fn answer(
    state: &Mutex<GatewayState>,
    topic: &str,
    payload: &[u8],
    behaviour: Behaviour,
) -> Option<(String, Vec<u8>)> {
    let mut state = state.lock().unwrap();
    if let Some(base) = topic.strip_suffix("/heartbeat") {
        let value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        state.heartbeats.push((base.to_owned(), value));
        return None;
    }
    let base = topic.strip_suffix("/alarm")?;
    let ack_topic = format!("{base}/ack");
    let reply = match serde_json::from_slice::<Value>(payload) {
        Err(_) => rejected(None, "not_json"),
        Ok(value) => match value.get("seq").and_then(Value::as_u64) {
            None => rejected(None, "bad_seq"),
            Some(seq) => {
                let codes: Vec<&str> = ["event", "cid", "sia"]
                    .into_iter()
                    .filter(|k| value.get(*k).is_some())
                    .collect();
                let cid_ok = value.get("cid").is_none_or(|cid| {
                    cid.as_str().is_some_and(|c| {
                        c.len() == 4
                            && c.bytes().all(|b| b.is_ascii_digit())
                            && matches!(c.as_bytes()[0], b'1' | b'3' | b'6')
                    })
                });
                if codes.len() != 1 {
                    rejected(Some(seq), "several_codes")
                } else if !cid_ok {
                    rejected(Some(seq), "bad_cid")
                } else if behaviour == Behaviour::RejectAll {
                    rejected(Some(seq), "rejected_by_test")
                } else {
                    let ts = value
                        .get("ts")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let key = (topic.to_owned(), seq, ts);
                    let copies = state.copies.entry(key.clone()).or_insert(0);
                    *copies += 1;
                    let ignore_first = match behaviour {
                        Behaviour::IgnoreFirst(n) => n,
                        _ => 0,
                    };
                    if *copies <= ignore_first {
                        state.received.push(Received {
                            topic: topic.to_owned(),
                            payload: payload.to_vec(),
                            reply: None,
                        });
                        return None;
                    }
                    match state.ids.get(&key) {
                        Some(id) => json!({"seq": seq, "alarm_id": id, "status": "duplicate"}),
                        None => {
                            state.next_id += 1;
                            let id = format!("alarm-{}", state.next_id);
                            state.ids.insert(key.clone(), id.clone());
                            state.distinct.push(key);
                            json!({"seq": seq, "alarm_id": id, "status": "accepted"})
                        }
                    }
                }
            }
        },
    };
    state.received.push(Received {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        reply: Some(reply.clone()),
    });
    Some((ack_topic, reply.to_string().into_bytes()))
}

fn config(port: u16) -> FleetConfig {
    let mut config = FleetConfig::new("127.0.0.1", port);
    config.devices = 20;
    config.rate = 200.0;
    config.heartbeat_interval = Duration::ZERO;
    config
}

/// Runs the fleet until it has raised `alarms` alarms (or malformed payloads), stops it sending and drains it.
async fn run_until(fleet: &Fleet, alarms: u64) -> FleetStats {
    assert!(
        fleet
            .wait_until(WAIT, |s| s.sent + s.malformed_sent >= alarms)
            .await,
        "the fleet sends: {:?}",
        fleet.stats()
    );
    fleet.stop_sending();
    assert!(fleet.drain(WAIT).await, "drained: {:?}", fleet.stats());
    fleet.stats()
}

fn parse(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alarm_is_acknowledged_and_the_counts_add_up() {
    let port = start_broker().await;
    let gateway = Gateway::start(port, Behaviour::Answer).await;
    let mut config = config(port);
    config.heartbeat_interval = Duration::from_millis(200);
    let fleet = Fleet::start(config).await.unwrap();
    let stats = run_until(&fleet, 300).await;
    // Heartbeats have stopped; let the last ones arrive.
    let heartbeats = stats.heartbeats as usize;
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.heartbeats().len() < heartbeats && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = fleet.stats();
    fleet.clone().shutdown().await;

    assert!(stats.sent >= 300, "{stats:?}");
    assert_eq!(stats.outstanding, 0);
    assert_eq!(stats.acked, stats.sent);
    assert_eq!(stats.accepted + stats.duplicates, stats.acked, "{stats:?}");
    assert_eq!(stats.rejected, 0);
    assert_eq!(stats.malformed_sent, 0);
    assert_eq!(stats.injected_duplicates, 0);
    assert_eq!(stats.bad_replies, 0);
    assert_eq!(
        stats.published,
        stats.sent + stats.resends + stats.heartbeats,
        "{stats:?}"
    );
    assert!(stats.heartbeats > 20, "{stats:?}");

    let alarms = fleet.alarms();
    assert_eq!(alarms.len() as u64, stats.sent);
    let ids: HashSet<_> = alarms.iter().filter_map(|a| a.alarm_id.clone()).collect();
    assert_eq!(ids.len(), alarms.len(), "one alarm id per alarm");
    let mut seqs: HashMap<&str, Vec<u32>> = HashMap::new();
    for alarm in &alarms {
        assert!(alarm.acked_at.is_some_and(|at| at >= alarm.first_published));
        assert!(alarm.status.as_deref() == Some("accepted"), "{alarm:?}");
        assert!(["derbyshire", "notts"].contains(&alarm.tenant.as_str()));
        seqs.entry(&alarm.device_id).or_default().push(alarm.seq);
    }
    for (device, seqs) in seqs {
        let expected: Vec<u32> = (1..=seqs.len() as u32).collect();
        assert_eq!(seqs, expected, "{device}: seq starts at 1 and counts up");
    }
    assert_eq!(gateway.distinct().len() as u64, stats.sent);

    // Every payload follows the wire contract.
    for received in gateway.received() {
        let value = parse(&received.payload);
        assert!(value["seq"].is_u64());
        let ts = value["ts"].as_str().unwrap();
        assert!(firmware_sim::arc::is_wire_timestamp(ts), "{ts}");
        assert!(value["battery_pct"].as_u64().is_some_and(|b| b <= 100));
        assert!(value["rssi"].as_i64().is_some_and(|r| r < 0));
        let parts: Vec<&str> = received.topic.split('/').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "telecare");
        assert!(parts[2].starts_with("unit-"));
    }
    // Heartbeats: `{"seq": n}` counting up per device, spread over the devices.
    let heartbeats = gateway.heartbeats();
    assert_eq!(heartbeats.len() as u64, stats.heartbeats);
    let mut last: HashMap<String, u64> = HashMap::new();
    for (device, value) in heartbeats {
        let seq = value["seq"].as_u64().unwrap();
        let previous = last.insert(device.clone(), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "{device}");
    }
    assert_eq!(last.len(), 20, "every device sends heartbeats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_alarms_are_resent_until_acknowledged() {
    let port = start_broker().await;
    let gateway = Gateway::start(port, Behaviour::IgnoreFirst(2)).await;
    let mut config = config(port);
    config.rate = 50.0;
    config.resend_after = Duration::from_millis(100);
    let fleet = Fleet::start(config).await.unwrap();
    let stats = run_until(&fleet, 40).await;
    fleet.clone().shutdown().await;

    assert!(stats.resends >= 2 * stats.sent, "{stats:?}");
    assert_eq!(stats.acked, stats.sent);
    assert_eq!(stats.outstanding, 0);
    // The first two copies were ignored (not stored), so the third is the first the gateway accepts.
    assert_eq!(stats.accepted, stats.sent, "{stats:?}");
    assert_eq!(stats.published, stats.sent + stats.resends);
    // Every copy of an alarm carries the same payload: the same seq and ts.
    let mut copies: HashMap<(String, u64), HashSet<Vec<u8>>> = HashMap::new();
    for received in gateway.received() {
        let seq = parse(&received.payload)["seq"].as_u64().unwrap();
        copies
            .entry((received.topic, seq))
            .or_default()
            .insert(received.payload);
    }
    assert_eq!(copies.len() as u64, stats.sent);
    assert!(copies.values().all(|payloads| payloads.len() == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_alarm_is_counted_and_not_resent() {
    let port = start_broker().await;
    let gateway = Gateway::start(port, Behaviour::RejectAll).await;
    let mut config = config(port);
    config.rate = 50.0;
    config.resend_after = Duration::from_millis(300);
    let fleet = Fleet::start(config).await.unwrap();
    let stats = run_until(&fleet, 20).await;
    // Past several re-send periods: nothing more is published.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let later = fleet.stats();
    fleet.clone().shutdown().await;

    assert_eq!(stats.rejected_alarms, stats.sent, "{stats:?}");
    assert_eq!(stats.rejected, stats.sent);
    assert_eq!(stats.acked, 0);
    assert_eq!(stats.outstanding, 0);
    assert_eq!(later.published, stats.published, "{later:?}");
    assert_eq!(gateway.received().len() as u64, stats.sent + stats.resends);
    for alarm in fleet.alarms() {
        assert_eq!(alarm.status.as_deref(), Some("rejected"));
        assert!(alarm.acked_at.is_some() && alarm.alarm_id.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_duplicates_are_answered_duplicate() {
    let port = start_broker().await;
    let gateway = Gateway::start(port, Behaviour::Answer).await;
    let mut config = config(port);
    config.duplicate_share = 1.0;
    let fleet = Fleet::start(config).await.unwrap();
    let stats = run_until(&fleet, 100).await;
    assert!(
        fleet.wait_until(WAIT, |s| s.duplicates >= stats.sent).await,
        "{:?}",
        fleet.stats()
    );
    let stats = fleet.stats();
    fleet.clone().shutdown().await;

    assert_eq!(stats.resends, 0, "the gateway answers at once: {stats:?}");
    assert_eq!(stats.duplicates, stats.sent, "{stats:?}");
    assert_eq!(stats.injected_duplicates, stats.sent);
    assert_eq!(stats.accepted, stats.sent);
    assert_eq!(gateway.distinct().len() as u64, stats.sent);
    let duplicate_replies = gateway
        .received()
        .iter()
        .filter(|r| r.reply.as_ref().is_some_and(|v| v["status"] == "duplicate"))
        .count();
    assert_eq!(duplicate_replies as u64, stats.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooted_device_starts_its_seq_again_and_its_alarms_are_new() {
    let port = start_broker().await;
    let gateway = Gateway::start(port, Behaviour::Answer).await;
    let mut config = config(port);
    config.devices = 5;
    config.rate = 100.0;
    config.reboot_share = 0.2;
    let fleet = Fleet::start(config).await.unwrap();
    let stats = run_until(&fleet, 150).await;
    fleet.clone().shutdown().await;

    assert!(stats.reboots > 0, "{stats:?}");
    assert_eq!(stats.acked, stats.sent);
    let alarms = fleet.alarms();
    let mut first: HashMap<&str, Vec<&SentAlarm>> = HashMap::new();
    for alarm in alarms.iter().filter(|a| a.seq == 1) {
        first.entry(&alarm.device_id).or_default().push(alarm);
    }
    let rebooted: Vec<_> = first.values().filter(|list| list.len() >= 2).collect();
    assert!(
        !rebooted.is_empty(),
        "some device has two alarms with seq 1"
    );
    for list in rebooted {
        let ts: HashSet<_> = list.iter().map(|a| a.first_published).collect();
        assert_eq!(ts.len(), list.len(), "different ts");
        let ids: HashSet<_> = list.iter().map(|a| a.alarm_id.clone()).collect();
        assert_eq!(ids.len(), list.len(), "different alarm ids");
        assert!(list.iter().all(|a| a.status.as_deref() == Some("accepted")));
    }
    // The stand-in gateway saw every alarm as a distinct one.
    let distinct = gateway.distinct();
    assert_eq!(distinct.len() as u64, stats.sent);
    let restarts = distinct.iter().filter(|(_, seq, _)| *seq == 1).count();
    assert_eq!(restarts, first.values().map(Vec::len).sum::<usize>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_rejected_and_not_counted_as_alarms() {
    let port = start_broker().await;
    let gateway = Gateway::start(port, Behaviour::Answer).await;
    let mut config = config(port);
    config.malformed_share = 0.2;
    let fleet = Fleet::start(config).await.unwrap();
    run_until(&fleet, 200).await;
    assert!(
        fleet
            .wait_until(WAIT, |s| s.rejected >= s.malformed_sent)
            .await,
        "{:?}",
        fleet.stats()
    );
    let stats = fleet.stats();
    fleet.clone().shutdown().await;

    assert!(stats.malformed_sent > 0, "{stats:?}");
    assert_eq!(stats.rejected, stats.malformed_sent, "{stats:?}");
    assert_eq!(stats.rejected_alarms, 0);
    assert_eq!(stats.acked, stats.sent);
    assert_eq!(fleet.alarms().len() as u64, stats.sent);
    assert!(fleet.alarms().iter().all(|a| a.seq >= 1));
    assert_eq!(gateway.distinct().len() as u64, stats.sent);
    let rejected_replies = gateway
        .received()
        .iter()
        .filter(|r| r.reply.as_ref().is_some_and(|v| v["status"] == "rejected"))
        .count();
    assert_eq!(rejected_replies as u64, stats.malformed_sent);
}

/// The first `n` distinct alarm payloads the stand-in saw, without `ts`.
fn first_payloads(gateway: &Gateway, n: usize) -> Vec<(String, Value)> {
    gateway
        .received()
        .into_iter()
        .take(n)
        .map(|r| {
            let mut value = parse(&r.payload);
            if let Some(object) = value.as_object_mut() {
                object.remove("ts");
            }
            (r.topic, value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_alarms() {
    let mut runs = Vec::new();
    for seed in [42, 42, 43] {
        let port = start_broker().await;
        let gateway = Gateway::start(port, Behaviour::Answer).await;
        let mut config = config(port);
        // One connection keeps the arrival order equal to the order raised.
        config.connections = 1;
        config.rate = 500.0;
        config.seed = seed;
        let fleet = Fleet::start(config).await.unwrap();
        run_until(&fleet, 50).await;
        fleet.shutdown().await;
        let payloads = first_payloads(&gateway, 50);
        assert_eq!(payloads.len(), 50);
        runs.push(payloads);
    }
    assert_eq!(runs[0], runs[1]);
    assert_ne!(runs[0], runs[2], "another seed gives other alarms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_use_every_code_form_and_the_configured_mix() {
    let port = start_broker().await;
    let gateway = Gateway::start(port, Behaviour::Answer).await;
    let mut config = config(port);
    config.devices = 200;
    config.rate = 2_000.0;
    let fleet = Fleet::start(config).await.unwrap();
    let stats = run_until(&fleet, 2_000).await;
    fleet.clone().shutdown().await;
    let alarms = fleet.alarms();
    let n = alarms.len() as f64;
    assert_eq!(alarms.len() as u64, stats.sent);

    let groups: [(&str, &[&str], f64); 4] = [
        (
            "critical",
            &["personal_emergency", "fall", "fire", "carbon_monoxide"],
            0.07,
        ),
        (
            "urgent",
            &[
                "inactivity",
                "flood",
                "temperature_low",
                "bed_exit",
                "door_exit",
            ],
            0.13,
        ),
        (
            "technical",
            &[
                "mains_fail",
                "low_battery",
                "comms_fail",
                "supervision_lost",
                "tamper",
            ],
            0.55,
        ),
        ("routine", &["test", "check_in", "cancel", "info"], 0.25),
    ];
    for (name, classes, share) in groups {
        let count = alarms
            .iter()
            .filter(|a| classes.contains(&a.class.as_str()))
            .count() as f64;
        assert!(
            (count / n - share).abs() < 0.05,
            "{name}: {count} of {n}, expected about {share}"
        );
    }
    let critical = alarms.iter().filter(|a| a.critical).count() as f64;
    assert!(critical / n < 0.15, "critical is a small minority");
    assert!(critical > 0.0);
    let technical = groups[2].1;
    let restores = alarms.iter().filter(|a| a.restore).count();
    assert!(restores > 0);
    assert!(alarms
        .iter()
        .filter(|a| a.restore)
        .all(|a| technical.contains(&a.class.as_str())));

    let mut forms: HashMap<&str, usize> = HashMap::new();
    for received in gateway.received() {
        let value = parse(&received.payload);
        let form = ["event", "cid", "sia"]
            .into_iter()
            .find(|k| value.get(*k).is_some())
            .unwrap();
        *forms.entry(form).or_default() += 1;
        if let Some(cid) = value["cid"].as_str() {
            assert!(cid.starts_with('1') || cid.starts_with('3'), "{cid}");
        }
        if let Some(sia) = value["sia"].as_str() {
            assert!(sia.len() == 2 && sia.bytes().all(|b| b.is_ascii_uppercase()));
        }
    }
    let total: usize = forms.values().sum();
    for form in ["event", "cid", "sia"] {
        let count = forms.get(form).copied().unwrap_or(0);
        assert!(count * 10 > total, "{form}: {count} of {total}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_and_a_missing_broker_are_errors() {
    let mut config = FleetConfig::new("127.0.0.1", 1);
    config.tenants.clear();
    config.duplicate_share = 2.0;
    let err = Fleet::start(config).await.err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("tenants") && err.to_string().contains("duplicate_share"));

    let mut config = FleetConfig::new("127.0.0.1", 1883);
    config.devices = 0;
    let err = Fleet::start(config).await.err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);

    // Nothing listens on this port: the fleet gives up after 10 s.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let err = Fleet::start(FleetConfig::new("127.0.0.1", port))
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_drains_and_prints_the_summary() {
    let port = start_broker().await;
    let _gateway = Gateway::start(port, Behaviour::Answer).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(["fleet", "--broker", &format!("mqtt://127.0.0.1:{port}")])
        .args(["--devices", "10", "--rate", "50", "--duration", "1"])
        .args(["--tenants", "derbyshire,notts,rutland", "--seed", "5"])
        .args(["--duplicates", "0.1", "--malformed", "0.05"])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let line = stdout.lines().last().unwrap_or_default();
    assert!(line.starts_with("fleet: sent="), "{line}");
    let fields: HashMap<&str, u64> = line["fleet: ".len()..]
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    let keys = [
        "sent",
        "acked",
        "accepted",
        "duplicates",
        "rejected",
        "resends",
        "malformed",
        "reboots",
        "heartbeats",
        "outstanding",
    ];
    assert_eq!(fields.len(), keys.len(), "{line}");
    for key in keys {
        assert!(fields.contains_key(key), "{key} in {line}");
    }
    assert!(fields["sent"] > 10, "{line}");
    assert_eq!(fields["outstanding"], 0);

    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(["fleet", "--broker", "http://nowhere", "--reboots", "2"])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(["fleet", "--broker", "mqtt://127.0.0.1:1", "--devices", "0"])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
}
