//! Alarms that need a person: dead letters and stuck alarms are listed by
//! `telegate alarms` and sent again by `telegate redeliver`; closed alarms
//! are pruned after the retention period and nothing else is.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{unique, BrokerChoice, Harness, WAIT};
use firmware_sim::arc::{ArcConfig, ArcSim, Mode};
use serde_json::{json, Value};
use telegate::metrics::Metrics;
use telegate::model::AlarmId;

/// A gateway with one provider (the simulator) for a fresh tenant, failing
/// over after a second, and a config file the CLI can read.
async fn single_provider(mode: Mode) -> (ArcSim, Harness, String, std::path::PathBuf) {
    let arc = ArcSim::start(ArcConfig::new("op-secret", "op-token"))
        .await
        .unwrap();
    arc.set_mode(mode).await.unwrap();
    let tenant = unique("t");
    let delivery = format!(
        "[[provider]]\nid = \"north\"\nurl = \"{}\"\nsecret = \"op-secret\"\ntoken = \"op-token\"\ntimeout_s = 2\n\
         [[contract]]\nid = \"OP\"\nprovider = \"north\"\ntenants = [\"{tenant}\"]\nstarts = 2020-01-01\nends = 2099-12-31\n\
         failover_after_s = {{ critical = 1, urgent = 1, technical = 1, routine = 1 }}\n\
         [routing]\ndefault_provider = \"north\"\n",
        arc.url()
    );
    let h = Harness::start_with(&BrokerChoice::Embedded, &delivery).await;
    // The same store and providers, for the command line (no broker needed).
    let file = h.dir.path().join("cli.toml");
    std::fs::write(
        &file,
        format!(
            "[store]\nurl = \"sqlite://{}\"\n{delivery}",
            h.dir.path().join("telegate.db").display()
        ),
    )
    .unwrap();
    (arc, h, tenant, file)
}

fn telegate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_telegate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn wait_state(h: &Harness, id: AlarmId, pred: impl Fn(&telegate::store::OutboxRow) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row = h.gateway.store.outbox_row(id).await.unwrap().unwrap();
        if pred(&row) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {row:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_and_can_be_redelivered() {
    let (arc, h, tenant, file) = single_provider(Mode::Reject(400)).await;
    let file = file.to_str().unwrap().to_owned();
    let mut dev = h.device(&tenant, "pendant-1").await;
    let reply = dev.send(json!({"seq": 1, "event": "fall"})).await;
    let id: AlarmId = reply["alarm_id"].as_str().unwrap().parse().unwrap();
    wait_state(&h, id, |r| r.state == "dead_letter").await;
    assert_eq!(Metrics::get(&h.gateway.metrics.dead_letters), 1);

    let (code, out, err) = telegate(&["alarms", "-c", &file, "--state", "dead-letter"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&id.to_string()) && out.contains("fall") && out.contains("north"),
        "{out}"
    );
    assert!(out.contains("1 dead-letter alarm(s)"), "{out}");
    let (code, out, _) = telegate(&["alarms", "-c", &file, "--state", "dead-letter", "--json"]);
    assert_eq!(code, 0);
    let line: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(line["alarm_id"], id.to_string());
    assert_eq!(line["rejected_by"], json!(["north"]));
    let (_, out, _) = telegate(&["alarms", "-c", &file, "--state", "stuck"]);
    assert_eq!(out.trim(), "no stuck alarms");

    // The provider is fixed; an operator sends the alarm again.
    arc.set_mode(Mode::Accept).await.unwrap();
    let (code, out, err) = telegate(&["redeliver", "-c", &file, &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("queued for delivery to north"), "{out}");
    let got = arc
        .wait_for_alarm(&id.to_string(), WAIT)
        .await
        .expect("delivered after redeliver");
    assert_eq!(got.body["alarm_id"], id.to_string());
    wait_state(&h, id, |r| r.state == "delivered").await;
    let stages = common::stage_names(&h.gateway.store, id).await;
    assert!(
        stages.contains(&"dead_letter".to_owned()) && stages.contains(&"redeliver".to_owned()),
        "{stages:?}"
    );

    // Mistakes are reported, not guessed at.
    let (code, _, err) = telegate(&["redeliver", "-c", &file, "not-an-id"]);
    assert_eq!(code, 64, "{err}");
    let (code, _, err) = telegate(&[
        "redeliver",
        "-c",
        &file,
        &id.to_string(),
        "--provider",
        "nowhere",
    ]);
    assert_eq!(code, 64);
    assert!(err.contains("no provider \"nowhere\""), "{err}");
    let (code, _, err) = telegate(&["redeliver", "-c", &file, &AlarmId::new_v7().to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains("no alarm"), "{err}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_retried_past_its_deadlines_is_listed_as_stuck() {
    let (arc, h, tenant, file) = single_provider(Mode::Unavailable).await;
    let file = file.to_str().unwrap().to_owned();
    let mut dev = h.device(&tenant, "smoke-1").await;
    let reply = dev.send(json!({"seq": 1, "sia": "FA"})).await;
    let id: AlarmId = reply["alarm_id"].as_str().unwrap().parse().unwrap();
    wait_state(&h, id, |r| r.exhausted && r.state == "pending").await;
    assert!(Metrics::get(&h.gateway.metrics.chains_exhausted) >= 1);
    let (code, out, err) = telegate(&["alarms", "-c", &file, "--state", "stuck"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&id.to_string()) && out.contains("HTTP 503"),
        "{out}"
    );
    // Still retried: when the provider recovers, it gets the alarm.
    arc.set_mode(Mode::Accept).await.unwrap();
    assert!(arc
        .wait_for_alarm(&id.to_string(), Duration::from_secs(45))
        .await
        .is_some());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_closed_alarms_only() {
    use chrono::Utc;
    use telegate::model::{AlarmClass, AlarmDetails, DedupeKey, NewAlarm, SourceKind, SourceRef};
    use telegate::route::Route;
    use telegate::store::{Batch, BatchAlarm, Store};

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&telegate::config::StoreUrl::Sqlite(dir.path().join("r.db")))
        .await
        .unwrap();
    let old = Utc::now() - chrono::Duration::days(500);
    let alarm = |seq: u64, at| NewAlarm {
        tenant: "t".into(),
        device_id: "d".into(),
        account: None,
        seq: Some(seq),
        class: AlarmClass::Fall,
        restore: false,
        raised_at: None,
        received_at: at,
        source: SourceRef {
            kind: SourceKind::Mqtt,
            id: "m".into(),
            code: "fall".into(),
        },
        details: AlarmDetails::default(),
        raw: b"{}".to_vec(),
        dedupe_key: DedupeKey::for_device_signal("t", "d", seq, "fall", false, Some(at)),
    };
    let route = Route {
        contract_id: None,
        chain: vec!["p".into()],
        failover_after: Duration::from_secs(10),
    };
    let ids: Vec<AlarmId> = (0..5).map(|_| AlarmId::new_v7()).collect();
    let batch = Batch {
        alarms: ids
            .iter()
            .enumerate()
            .map(|(i, id)| BatchAlarm {
                id: *id,
                alarm: alarm(i as u64, if i < 4 { old } else { Utc::now() }),
                route: route.clone(),
                leased: false,
            })
            .collect(),
        quarantine: vec![],
        lease: None,
    };
    store.commit_batch(&batch, old, old).await.unwrap();
    // Three old alarms were delivered; one old alarm never was; one is recent.
    let delivered: Vec<_> = ids[..3]
        .iter()
        .map(|id| telegate::deliver::AttemptRecord {
            alarm_id: *id,
            provider: "p".into(),
            started_at: old,
            finished_at: old,
            detail: "HTTP 200".into(),
            decision: telegate::deliver::plan::Decision::Delivered,
        })
        .collect();
    store.record_attempts(&delivered).await.unwrap();
    let pruned = store
        .prune_batch(Utc::now() - chrono::Duration::days(400), 2)
        .await
        .unwrap();
    assert_eq!(pruned.alarms, 2, "in batches");
    let pruned = store
        .prune_batch(Utc::now() - chrono::Duration::days(400), 2)
        .await
        .unwrap();
    assert_eq!(pruned.alarms, 1);
    assert_eq!(
        store
            .prune_batch(Utc::now() - chrono::Duration::days(400), 2)
            .await
            .unwrap()
            .alarms,
        0
    );
    assert_eq!(
        store.count_alarms().await.unwrap(),
        2,
        "the undelivered and the recent alarm stay"
    );
    assert!(store.alarm(ids[3]).await.unwrap().is_some());
    assert!(store.alarm(ids[0]).await.unwrap().is_none());
    assert!(store.stage_times(ids[0]).await.unwrap().is_empty());
    store.close().await;
    // The store does not have SQLite enforce the schema's references on
    // every write; pruning must leave no stage or outbox row without its
    // alarm all the same.
    use sqlx::Connection;
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", dir.path().join("r.db").display()))
            .await
            .unwrap();
    let orphans = sqlx::query("PRAGMA foreign_key_check")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert!(
        orphans.is_empty(),
        "{} rows without their alarm",
        orphans.len()
    );
}
