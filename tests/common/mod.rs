//! Shared test harness: a real gateway (in-process, real SQLite file, or a
//! fresh PostgreSQL database when `TELEGATE_TEST_POSTGRES_URL` is set) behind
//! a real broker (the embedded one, or Mosquitto when
//! `TELEGATE_TEST_MQTT_URL` is set), and simulated devices that talk MQTT.
#![allow(dead_code)]

pub mod process;

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;
use telegate::app::Gateway;
use telegate::config::Config;
use tokio::sync::mpsc;

/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Which broker a test runs against.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// rumqttd inside the gateway, on a free loopback port.
    Embedded,
    /// An external broker such as Mosquitto: host and port.
    External { host: String, port: u16 },
}

impl BrokerChoice {
    pub fn name(&self) -> &'static str {
        match self {
            BrokerChoice::Embedded => "embedded",
            BrokerChoice::External { .. } => "external",
        }
    }
}

/// The embedded broker always; the external one when the variable is set.
pub fn brokers() -> Vec<BrokerChoice> {
    let mut list = vec![BrokerChoice::Embedded];
    match std::env::var("TELEGATE_TEST_MQTT_URL") {
        Ok(url) => match parse_mqtt_url(&url) {
            Some((host, port)) => list.push(BrokerChoice::External { host, port }),
            None => eprintln!("TELEGATE_TEST_MQTT_URL={url:?} is not mqtt://host:port; skipping the external broker"),
        },
        Err(_) => eprintln!("TELEGATE_TEST_MQTT_URL not set: external-broker runs skipped"),
    }
    list
}

fn parse_mqtt_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("mqtt://")?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None => Some((rest.to_owned(), 1883)),
    }
}

/// Which store a gateway under test uses.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// A fresh SQLite file in the harness's temporary folder.
    Sqlite,
    /// A fresh database of its own on the PostgreSQL server that `url` (any
    /// database on it) points at.
    Postgres { url: String },
}

impl StoreChoice {
    pub fn name(&self) -> &'static str {
        match self {
            StoreChoice::Sqlite => "sqlite",
            StoreChoice::Postgres { .. } => "postgres",
        }
    }
}

/// SQLite always; PostgreSQL too when `TELEGATE_TEST_POSTGRES_URL` is set.
pub fn stores() -> Vec<StoreChoice> {
    let mut list = vec![StoreChoice::Sqlite];
    match std::env::var("TELEGATE_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => list.push(StoreChoice::Postgres { url }),
        _ => eprintln!("TELEGATE_TEST_POSTGRES_URL not set: PostgreSQL runs skipped"),
    }
    list
}

/// Every broker with every store: the runs a test makes when it covers both.
pub fn matrix() -> Vec<(BrokerChoice, StoreChoice)> {
    let stores = stores();
    brokers()
        .into_iter()
        .flat_map(|b| stores.iter().map(move |s| (b.clone(), s.clone())))
        .collect()
}

/// The PostgreSQL URL and the external broker's host and port, when both
/// `TELEGATE_TEST_POSTGRES_URL` and `TELEGATE_TEST_MQTT_URL` are set.
pub fn external_services() -> Option<(String, String, u16)> {
    let pg = stores().into_iter().find_map(|s| match s {
        StoreChoice::Postgres { url } => Some(url),
        StoreChoice::Sqlite => None,
    });
    let mqtt = brokers().into_iter().find_map(|b| match b {
        BrokerChoice::External { host, port } => Some((host, port)),
        BrokerChoice::Embedded => None,
    });
    let (pg, (host, port)) = (pg?, mqtt?);
    Some((pg, host, port))
}

/// The names of an alarm's stages, in order.
pub async fn stage_names(
    store: &telegate::store::Store,
    id: telegate::model::AlarmId,
) -> Vec<String> {
    store
        .stage_times(id)
        .await
        .expect("stage times")
        .into_iter()
        .map(|s| s.stage)
        .collect()
}

/// A database of its own on the test PostgreSQL server, created empty and
/// dropped (best-effort, even when the test fails) when this is dropped.
pub struct PgDatabase {
    /// The URL the database was created through; it is dropped through it.
    admin_url: String,
    pub name: String,
    /// The URL of the new database.
    pub url: String,
}

impl PgDatabase {
    pub async fn create(admin_url: &str) -> PgDatabase {
        use sqlx::Connection;
        let name = unique("tg_").to_lowercase();
        let mut url = url::Url::parse(admin_url).expect("TELEGATE_TEST_POSTGRES_URL is a URL");
        url.set_path(&format!("/{name}"));
        let mut admin = sqlx::PgConnection::connect(admin_url)
            .await
            .expect("connect to TELEGATE_TEST_POSTGRES_URL");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        let _ = admin.close().await;
        PgDatabase {
            admin_url: admin_url.to_owned(),
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside a runtime (or while a test unwinds): do the
        // async work on a thread of its own.
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// A short random name, so tests sharing one external broker never see each
/// other's devices.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &id[..10])
}

/// Serialises tests that use the external broker: every gateway subscribes
/// to all device topics, so two at once would answer each other's devices.
static EXTERNAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running gateway and what a test needs to talk to it.
pub struct Harness {
    pub gateway: Gateway,
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub broker: BrokerChoice,
    /// Keeps the SQLite file until the test ends.
    pub dir: tempfile::TempDir,
    /// The PostgreSQL database the gateway stores in, if it does.
    pub database: Option<PgDatabase>,
    _external: Option<tokio::sync::MutexGuard<'static, ()>>,
}

/// Providers and routing for tests that do not look at delivery: one
/// provider nobody listens for, so alarms stay in the outbox.
pub const NO_DELIVERY: &str = r#"
[[provider]]
id = "arc-test"
kind = "http"
url = "http://127.0.0.1:9/alarms"
secret = "s3cret"
token = "t0ken"

[routing]
default_provider = "arc-test"
"#;

/// The TOML for a gateway on `broker`, storing in `db`, with no provider
/// that accepts deliveries.
pub fn config_toml(
    broker: &BrokerChoice,
    port: u16,
    client_id: &str,
    db: &std::path::Path,
) -> String {
    config_with(broker, port, client_id, db, NO_DELIVERY)
}

/// The TOML for a gateway on `broker`, storing in `db`, with `delivery`
/// (providers, contracts, routing, optionally `[api]`) appended.
pub fn config_with(
    broker: &BrokerChoice,
    port: u16,
    client_id: &str,
    db: &std::path::Path,
    delivery: &str,
) -> String {
    let store_url = format!("sqlite://{}", db.display());
    config_on(broker, port, client_id, &store_url, delivery)
}

/// The TOML for a gateway on `broker`, storing at `store_url`, with
/// `delivery` appended.
pub fn config_on(
    broker: &BrokerChoice,
    port: u16,
    client_id: &str,
    store_url: &str,
    delivery: &str,
) -> String {
    let (scheme, host) = match broker {
        BrokerChoice::Embedded => ("embedded", "127.0.0.1".to_owned()),
        BrokerChoice::External { host, .. } => ("mqtt", host.clone()),
    };
    // A test that names its own API address brings its own [api] table.
    let api = if delivery.contains("[api]") {
        ""
    } else {
        "[api]\nlisten = \"127.0.0.1:0\"\n"
    };
    format!(
        r#"
[store]
url = "{store_url}"

{api}

[ingest]
batch_wait_ms = 1

[deliver]
poll_ms = 20

[[mqtt]]
id = "devices"
url = "{scheme}://{host}:{port}"
client_id = "{client_id}"
{delivery}"#
    )
}

impl Harness {
    /// Starts a gateway against `broker` with a fresh SQLite file.
    pub async fn start(broker: &BrokerChoice) -> Harness {
        Harness::start_with(broker, NO_DELIVERY).await
    }

    /// Starts a gateway with these providers, contracts and routing.
    pub async fn start_with(broker: &BrokerChoice, delivery: &str) -> Harness {
        Harness::start_on(broker, &StoreChoice::Sqlite, delivery).await
    }

    /// Starts a gateway on `store` with these providers, contracts and
    /// routing.
    pub async fn start_on(broker: &BrokerChoice, store: &StoreChoice, delivery: &str) -> Harness {
        let external = match broker {
            BrokerChoice::External { .. } => Some(EXTERNAL.lock().await),
            BrokerChoice::Embedded => None,
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let (host, port) = match broker {
            BrokerChoice::Embedded => (
                "127.0.0.1".to_owned(),
                telegate::broker::free_port().expect("free port"),
            ),
            BrokerChoice::External { host, port } => (host.clone(), *port),
        };
        let client_id = unique("tg-");
        let (store_url, database) = match store {
            StoreChoice::Sqlite => (
                format!("sqlite://{}", dir.path().join("telegate.db").display()),
                None,
            ),
            StoreChoice::Postgres { url } => {
                let database = PgDatabase::create(url).await;
                (database.url.clone(), Some(database))
            }
        };
        let toml = config_on(broker, port, &client_id, &store_url, delivery);
        let config =
            Config::from_toml_str(&toml, "test.toml", &|_| None).expect("valid test config");
        let gateway = telegate::app::start(config, telegate::clock::system())
            .await
            .expect("gateway starts");
        assert!(gateway.wait_ready(WAIT).await, "gateway subscribed in time");
        Harness {
            gateway,
            host,
            port,
            client_id,
            broker: broker.clone(),
            dir,
            database,
            _external: external,
        }
    }

    /// A device on this gateway's broker, listening for its replies.
    pub async fn device(&self, tenant: &str, device_id: &str) -> Device {
        Device::connect(&self.host, self.port, tenant, device_id).await
    }

    /// Stops the gateway; on an external broker also removes its persistent
    /// session so that the broker stops queueing for it.
    pub async fn stop(self) {
        assert!(
            self.gateway.shutdown(Duration::from_secs(10)).await,
            "clean shutdown"
        );
        if let BrokerChoice::External { .. } = self.broker {
            forget_session(&self.host, self.port, &self.client_id).await;
        }
    }
}

/// Removes a client's persistent session from an external broker, so the
/// broker stops queueing for it.
pub async fn forget_session(host: &str, port: u16, client_id: &str) {
    telegate::source::mqtt::end_session(host, port, client_id, Duration::from_secs(5)).await;
}

/// Holds the external broker for one test at a time (see [`EXTERNAL`]).
pub async fn external_broker_lock() -> tokio::sync::MutexGuard<'static, ()> {
    EXTERNAL.lock().await
}

/// Makes the gateway's SQLite store refuse every alarm of `tenant`, as a
/// full disk would, until [`StoreRefusal::lift`].
pub struct StoreRefusal {
    pool: sqlx::SqlitePool,
}

impl StoreRefusal {
    pub async fn new(h: &Harness, tenant: &str) -> StoreRefusal {
        let db = h.dir.path().join("telegate.db");
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("open the test store");
        sqlx::query(&format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON alarms WHEN NEW.tenant = '{tenant}' \
             BEGIN SELECT RAISE(ABORT, 'no space left'); END"
        ))
        .execute(&pool)
        .await
        .expect("create the refusing trigger");
        StoreRefusal { pool }
    }

    /// The store takes the tenant's alarms again.
    pub async fn lift(self) {
        sqlx::query("DROP TRIGGER refuse")
            .execute(&self.pool)
            .await
            .expect("drop the refusing trigger");
        self.pool.close().await;
    }
}

/// A simulated device: publishes on its topics and collects its replies.
pub struct Device {
    pub tenant: String,
    pub device_id: String,
    pub client: AsyncClient,
    acks: mpsc::UnboundedReceiver<Value>,
}

impl Device {
    pub async fn connect(host: &str, port: u16, tenant: &str, device_id: &str) -> Device {
        let mut options = MqttOptions::new(unique("dev-"), host, port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, eventloop) = AsyncClient::new(options, 100);
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let topic = format!("telecare/{tenant}/{device_id}/ack");
        client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        tokio::spawn(drive(eventloop, ack_tx, subscribed_tx));
        tokio::time::timeout(WAIT, subscribed_rx)
            .await
            .expect("device subscribed in time")
            .expect("device event loop alive");
        Device {
            tenant: tenant.to_owned(),
            device_id: device_id.to_owned(),
            client,
            acks,
        }
    }

    pub fn topic(&self, kind: &str) -> String {
        format!("telecare/{}/{}/{kind}", self.tenant, self.device_id)
    }

    /// Publishes raw bytes as an alarm.
    pub async fn send_raw(&self, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(self.topic("alarm"), QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Publishes a JSON alarm and waits for the gateway's reply.
    pub async fn send(&mut self, payload: Value) -> Value {
        self.send_raw(payload.to_string()).await;
        self.next_reply().await
    }

    /// A reply that has already arrived, if any.
    pub fn try_reply(&mut self) -> Option<Value> {
        self.acks.try_recv().ok()
    }

    /// The next reply on this device's ack topic.
    pub async fn next_reply(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.acks.recv())
            .await
            .expect("a reply within the wait")
            .expect("device connection alive")
    }
}

/// Waits (checking every 10 ms) until `condition` holds; fails the test
/// after [`WAIT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn drive(
    mut eventloop: EventLoop,
    acks: mpsc::UnboundedSender<Value>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(tx) = subscribed.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if acks.send(value).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => {
                if acks.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
