//! Crashes and restarts of the real `telegate` binary while a device fleet
//! publishes: nothing acknowledged to a device is lost, nothing is stored
//! twice, and the store agrees with the provider.
//!
//! By default the store is SQLite and the broker the embedded one, inside the
//! gateway process, so each kill also takes the broker down with whatever it
//! held: the devices' re-sends are what brings unacknowledged alarms back
//! (DESIGN.md guarantee 1). With `TELEGATE_TEST_POSTGRES_URL` and
//! `TELEGATE_TEST_MQTT_URL` set, each test runs again on PostgreSQL and
//! Mosquitto, where the broker outlives the kills and keeps the gateway's
//! persistent session.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::process::GatewayProcess;
use common::unique;
use firmware_sim::arc::{ArcConfig, ArcSim, Mode};
use firmware_sim::fleet::{Fleet, FleetConfig};
use rand::{Rng, SeedableRng};

/// How long a drain at the end may take before the test fails.
const DRAIN: Duration = Duration::from_secs(60);

/// The store and broker a run uses.
enum Variant {
    /// SQLite file, rumqttd inside the gateway: kills take the broker down too.
    Embedded,
    /// A PostgreSQL database of its own and an external broker (Mosquitto)
    /// that outlives the kills and keeps the gateway's persistent session.
    External {
        database: common::PgDatabase,
        host: String,
        port: u16,
        /// One test at a time on the shared broker: every gateway subscribes
        /// to all device topics and would answer the other test's devices.
        _lock: tokio::sync::MutexGuard<'static, ()>,
    },
}

/// SQLite + embedded always; PostgreSQL + Mosquitto when both variables are set.
async fn variants() -> Vec<Variant> {
    let mut list = vec![Variant::Embedded];
    match common::external_services() {
        Some((url, host, port)) => list.push(Variant::External {
            database: common::PgDatabase::create(&url).await,
            host,
            port,
            _lock: common::external_broker_lock().await,
        }),
        None => eprintln!("PostgreSQL + Mosquitto run skipped: needs both TELEGATE_TEST_POSTGRES_URL and TELEGATE_TEST_MQTT_URL"),
    }
    list
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    store_url: telegate::config::StoreUrl,
    broker_host: String,
    broker_port: u16,
    client_id: String,
    variant: Variant,
    tenant: String,
    arc: ArcSim,
}

impl Setup {
    fn name(&self) -> &'static str {
        match self.variant {
            Variant::Embedded => "sqlite+embedded",
            Variant::External { .. } => "postgres+mosquitto",
        }
    }

    /// On an external broker, removes the gateway's persistent session so
    /// the broker stops queueing for it.
    async fn forget_session(&self) {
        if let Variant::External { .. } = self.variant {
            common::forget_session(&self.broker_host, self.broker_port, &self.client_id).await;
        }
    }
}

async fn setup(variant: Variant) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (store_url, store_toml, broker_host, broker_port, mqtt_url) = match &variant {
        Variant::Embedded => {
            let db = dir.path().join("telegate.db");
            let port = telegate::broker::free_port().unwrap();
            (
                telegate::config::StoreUrl::Sqlite(db.clone()),
                format!("sqlite://{}", db.display()),
                "127.0.0.1".to_owned(),
                port,
                format!("embedded://127.0.0.1:{port}"),
            )
        }
        Variant::External {
            database,
            host,
            port,
            ..
        } => (
            telegate::config::StoreUrl::Postgres(database.url.clone()),
            database.url.clone(),
            host.clone(),
            *port,
            format!("mqtt://{host}:{port}"),
        ),
    };
    let arc = ArcSim::start(ArcConfig::new("crash-secret", "crash-token"))
        .await
        .unwrap();
    let tenant = unique("t");
    let client_id = unique("tg-");
    let config = dir.path().join("telegate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[store]
url = "{store_toml}"
[api]
listen = "127.0.0.1:0"
[deliver]
instance_id = "crash-test"
poll_ms = 20
[[mqtt]]
id = "devices"
url = "{mqtt_url}"
client_id = "{client_id}"
[[provider]]
id = "north"
url = "{url}"
secret = "crash-secret"
token = "crash-token"
timeout_s = 2
[[contract]]
id = "CRASH"
provider = "north"
tenants = ["{tenant}"]
starts = 2020-01-01
ends = 2099-12-31
[routing]
default_provider = "north"
"#,
            url = arc.url(),
        ),
    )
    .unwrap();
    Setup {
        _dir: dir,
        config,
        store_url,
        broker_host,
        broker_port,
        client_id,
        variant,
        tenant,
        arc,
    }
}

async fn start_fleet(s: &Setup, seed: u64) -> Fleet {
    let mut config = FleetConfig::new(s.broker_host.clone(), s.broker_port);
    config.client_prefix = unique("fleet-");
    config.connections = 2;
    config.tenants = vec![s.tenant.clone()];
    config.devices = 20;
    config.rate = 150.0;
    config.heartbeat_interval = Duration::ZERO;
    config.resend_after = Duration::from_millis(300);
    config.seed = seed;
    Fleet::start(config).await.expect("fleet starts")
}

/// Waits until the provider has accepted every alarm a device was told is
/// safe; returns those that it has not.
async fn unaccepted(fleet: &Fleet, arc: &ArcSim, within: Duration) -> Vec<String> {
    let acked: HashSet<String> = fleet
        .alarms()
        .into_iter()
        .filter(|a| matches!(a.status.as_deref(), Some("accepted" | "duplicate")))
        .filter_map(|a| a.alarm_id)
        .collect();
    let deadline = Instant::now() + within;
    loop {
        let accepted = arc.accepted_ids();
        let missing: Vec<String> = acked.difference(&accepted).cloned().collect();
        if missing.is_empty() || Instant::now() >= deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the run: every (device, seq) one alarm, the store and the provider
/// in agreement.
async fn check_store(s: &Setup, fleet: &Fleet) {
    let store = telegate::store::Store::open(&s.store_url).await.unwrap();
    let sent = fleet.alarms();
    let devices: HashSet<&str> = sent.iter().map(|a| a.device_id.as_str()).collect();
    let mut ids_by_key: HashMap<(String, u64), Vec<String>> = HashMap::new();
    for device in devices {
        for alarm in store.alarms_of_device(&s.tenant, device).await.unwrap() {
            let seq = alarm.seq.expect("device alarms carry a seq");
            ids_by_key
                .entry((alarm.device_id.clone(), seq))
                .or_default()
                .push(alarm.id.to_string());
        }
    }
    for a in &sent {
        let ids = ids_by_key
            .get(&(a.device_id.clone(), u64::from(a.seq)))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            ids.len(),
            1,
            "{} seq {}: one alarm id, found {ids:?}",
            a.device_id,
            a.seq
        );
        assert_eq!(
            a.alarm_id.as_ref(),
            Some(&ids[0]),
            "the device was told the stored id"
        );
    }
    let accepted = s.arc.accepted_ids();
    for ids in ids_by_key.values() {
        let id: telegate::model::AlarmId = ids[0].parse().unwrap();
        let row = store.outbox_row(id).await.unwrap().expect("outbox row");
        assert_eq!(row.state, "delivered", "{id}: {row:?}");
        assert!(
            accepted.contains(&ids[0]),
            "{id} recorded delivered but the provider does not have it"
        );
    }
    assert_eq!(
        accepted.len(),
        ids_by_key.len(),
        "the provider has exactly the stored alarms"
    );
    store.close().await;
}

/// The end of a run: the provider has every acknowledged alarm, the
/// gateway stops cleanly, the store agrees, and the broker forgets us.
async fn finish(s: &Setup, fleet: Fleet, gateway: GatewayProcess) {
    let missing = unaccepted(&fleet, &s.arc, DRAIN).await;
    assert!(
        missing.is_empty(),
        "{}: acknowledged but never accepted: {missing:?}",
        s.name()
    );
    assert!(gateway.stop().success());
    check_store(s, &fleet).await;
    fleet.shutdown().await;
    s.forget_session().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_gateway_repeatedly_loses_nothing_acknowledged() {
    for variant in variants().await {
        let s = setup(variant).await;
        // The provider is down while the gateway is killed: acknowledged
        // alarms wait in the outbox, where a kill must not lose them.
        s.arc.set_mode(Mode::Down).await.unwrap();
        let mut gateway = GatewayProcess::start(&s.config);
        let fleet = start_fleet(&s, 11).await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(300..900))).await;
            gateway.crash();
            gateway = GatewayProcess::start(&s.config);
        }
        assert!(
            fleet
                .wait_until(Duration::from_secs(30), |st| st.sent >= 300)
                .await,
            "{}: {:?}",
            s.name(),
            fleet.stats()
        );
        fleet.stop_sending();
        assert!(
            fleet.drain(DRAIN).await,
            "{}: every alarm acknowledged: {:?}",
            s.name(),
            fleet.stats()
        );

        s.arc.set_mode(Mode::Accept).await.unwrap();
        finish(&s, fleet, gateway).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_mid_stream_exits_0_and_loses_nothing() {
    for variant in variants().await {
        let s = setup(variant).await;
        let gateway = GatewayProcess::start(&s.config);
        let fleet = start_fleet(&s, 12).await;
        assert!(
            fleet
                .wait_until(Duration::from_secs(30), |st| st.acked >= 100)
                .await
        );
        let status = gateway.stop();
        assert!(
            status.success(),
            "{}: SIGTERM mid-stream exits 0: {status:?}",
            s.name()
        );
        let gateway = GatewayProcess::start(&s.config);
        assert!(
            fleet
                .wait_until(Duration::from_secs(30), |st| st.acked >= 250)
                .await
        );
        fleet.stop_sending();
        assert!(
            fleet.drain(DRAIN).await,
            "{}: {:?}",
            s.name(),
            fleet.stats()
        );
        finish(&s, fleet, gateway).await;
    }
}
