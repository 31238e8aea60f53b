//! Two gateway instances on one PostgreSQL and one Mosquitto: a shared
//! subscription splits the input, outbox claims share the deliveries, and
//! when one instance dies the other takes over its claims after the lease
//! while new alarms keep flowing through it.
//!
//! Messages the broker had queued in the dead instance's session wait there
//! until it returns; here the devices' re-sends bring them to the survivor.
//!
//! Needs both `TELEGATE_TEST_POSTGRES_URL` and `TELEGATE_TEST_MQTT_URL`; says
//! so and passes without them.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::process::GatewayProcess;
use common::{unique, PgDatabase};
use firmware_sim::arc::{ArcConfig, ArcSim};
use firmware_sim::fleet::{Fleet, FleetConfig};

const LEASE_S: u64 = 5;

/// What both instances' configurations share.
struct Shared {
    db_url: String,
    host: String,
    port: u16,
    group: String,
    arc_url: String,
    tenant: String,
}

fn instance_config(shared: &Shared, name: &str, api: u16) -> String {
    let Shared {
        db_url,
        host,
        port,
        group,
        arc_url,
        tenant,
    } = shared;
    format!(
        r#"
[store]
url = "{db_url}"
[api]
listen = "127.0.0.1:{api}"
[deliver]
instance_id = "{name}"
lease_s = {LEASE_S}
poll_ms = 50
[[mqtt]]
id = "devices"
url = "mqtt://{host}:{port}"
client_id = "{group}-{name}"
shared_group = "{group}"
[[provider]]
id = "north"
url = "{arc_url}"
secret = "two-secret"
token = "two-token"
timeout_s = 2
[[contract]]
id = "TWO"
provider = "north"
tenants = ["{tenant}"]
starts = 2020-01-01
ends = 2099-12-31
[routing]
default_provider = "north"
"#
    )
}

async fn metric(api: u16, name: &str) -> u64 {
    let text = reqwest::get(format!("http://127.0.0.1:{api}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("metrics answer");
    let text = text.text().await.expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_work_and_the_survivor_takes_over() {
    let Some((pg, host, port)) = common::external_services() else {
        eprintln!("two-instance test skipped: needs TELEGATE_TEST_POSTGRES_URL and TELEGATE_TEST_MQTT_URL");
        return;
    };
    let _lock = common::external_broker_lock().await;
    let db = PgDatabase::create(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    let arc = ArcSim::start(ArcConfig::new("two-secret", "two-token"))
        .await
        .unwrap();
    let tenant = unique("t");
    let group = unique("g");
    let (api_a, api_b) = (
        telegate::broker::free_port().unwrap(),
        telegate::broker::free_port().unwrap(),
    );
    let shared = Shared {
        db_url: db.url.clone(),
        host: host.clone(),
        port,
        group: group.clone(),
        arc_url: arc.url(),
        tenant: tenant.clone(),
    };
    let config = |name: &str, api: u16| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, instance_config(&shared, name, api)).unwrap();
        path
    };
    let (config_a, config_b) = (config("inst-a", api_a), config("inst-b", api_b));
    let a = GatewayProcess::start(&config_a);
    let b = GatewayProcess::start(&config_b);

    let mut fleet_config = FleetConfig::new(host.clone(), port);
    fleet_config.client_prefix = unique("fleet-");
    fleet_config.tenants = vec![tenant.clone()];
    fleet_config.devices = 20;
    fleet_config.rate = 100.0;
    fleet_config.heartbeat_interval = Duration::ZERO;
    fleet_config.resend_after = Duration::from_millis(300);
    fleet_config.seed = 21;
    let fleet = Fleet::start(fleet_config).await.expect("fleet starts");
    assert!(
        fleet
            .wait_until(Duration::from_secs(30), |s| s.acked >= 150)
            .await,
        "{:?}",
        fleet.stats()
    );

    // The shared subscription split the input between the two.
    let (stored_a, stored_b) = (
        metric(api_a, "telegate_alarms_stored_total").await,
        metric(api_b, "telegate_alarms_stored_total").await,
    );
    assert!(
        stored_a > 0 && stored_b > 0,
        "both instances stored alarms: a={stored_a} b={stored_b}"
    );

    // A slow provider: deliveries hang for a while, so instance A holds
    // claims when it dies.
    arc.set_response_delay(Duration::from_secs(3));
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let held = async {
        for _ in 0..100 {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT alarm_id FROM outbox WHERE lease_owner = 'inst-a' AND state = 'pending'",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            if !ids.is_empty() {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Vec::new()
    }
    .await;
    assert!(!held.is_empty(), "instance A claimed deliveries");
    a.crash();
    let acked_at_kill = fleet.stats().acked;
    arc.set_response_delay(Duration::ZERO);

    // New alarms keep flowing through the survivor.
    assert!(
        fleet
            .wait_until(Duration::from_secs(30), |s| s.acked >= acked_at_kill + 100)
            .await,
        "{:?}",
        fleet.stats()
    );
    fleet.stop_sending();
    assert!(
        fleet.drain(Duration::from_secs(60)).await,
        "every alarm acknowledged: {:?}",
        fleet.stats()
    );

    // The dead instance's claims were taken over after the lease.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(LEASE_S * 6);
    loop {
        let states: Vec<String> =
            sqlx::query_scalar("SELECT state FROM outbox WHERE alarm_id = ANY($1)")
                .bind(&held)
                .fetch_all(&pool)
                .await
                .unwrap();
        if states.iter().all(|s| s == "delivered") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "claims of the dead instance not taken over: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Nothing lost, nothing delivered under two alarm ids.
    let acked: HashSet<String> = fleet
        .alarms()
        .into_iter()
        .filter_map(|a| a.alarm_id)
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !acked.is_subset(&arc.accepted_ids()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "acknowledged alarms not delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT id, device_id, seq FROM alarms WHERE tenant = $1")
            .bind(&tenant)
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut ids_per_signal: HashMap<(String, i64), usize> = HashMap::new();
    for (_, device, seq) in &rows {
        *ids_per_signal.entry((device.clone(), *seq)).or_default() += 1;
    }
    assert!(
        ids_per_signal.values().all(|&n| n == 1),
        "one alarm id per (device, seq)"
    );
    let accepted = arc.accepted_ids();
    assert!(
        rows.iter().all(|(id, _, _)| accepted.contains(id)),
        "every stored alarm delivered"
    );
    assert_eq!(
        accepted.len(),
        rows.len(),
        "the provider got exactly the stored alarms"
    );

    assert!(b.stop().success());
    pool.close().await;
    fleet.shutdown().await;
    for name in ["inst-a", "inst-b"] {
        common::forget_session(&host, port, &format!("{group}-{name}")).await;
    }
}
