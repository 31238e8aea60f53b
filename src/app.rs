//! The application shell: wires the pipeline and spawns its tasks. Read
//! [`start`] top to bottom to see the whole gateway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::broker::{BrokerError, EmbeddedBroker};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::deliver::{self, BuildError, Dispatcher};
use crate::ingest::{self, Ingest};
use crate::metrics::Metrics;
use crate::route::Router;
use crate::source::mqtt::MqttSource;
use crate::source::serial::SerialSource;
use crate::source::{Readiness, Source};
use crate::store::{Store, StoreError};
use crate::taxonomy::CodeTable;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("mqtt.{id}: {source}")]
    Broker { id: String, source: BrokerError },
    #[error("{0}")]
    Deliver(#[from] BuildError),
    #[error("api.listen {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Gateway {
    /// The store, for inspection (tests, reports).
    pub store: Store,
    /// The gateway's counters.
    pub metrics: Arc<Metrics>,
    /// Embedded brokers started for `embedded://` sources.
    pub brokers: Vec<EmbeddedBroker>,
    /// Where the API listens (the bound address when `api.listen` asked
    /// for port 0).
    pub api_addr: SocketAddr,
    /// A handle to ingest; dropped at shutdown so that the writer can finish.
    ingest: Option<Ingest>,
    /// Stops the sources.
    cancel: CancellationToken,
    /// The sources' tasks.
    sources: TaskTracker,
    /// The group-commit writer; it ends when every ingest handle is gone.
    writer: JoinHandle<()>,
    /// Stops the dispatcher and the API once input has stopped.
    cancel_delivery: CancellationToken,
    dispatcher: JoinHandle<()>,
    api: JoinHandle<()>,
    /// Which sources are up.
    ready: Readiness,
}

/// Starts the gateway described by a validated configuration.
///
/// # Errors
/// When the store cannot be opened or an embedded broker cannot start.
pub async fn start(config: Config, clock: SharedClock) -> Result<Gateway, AppError> {
    let metrics = Arc::new(Metrics::default());
    let table = Arc::new(CodeTable::default());

    // store: migrated before anything is accepted.
    let store = Store::open(&config.store.url).await?;

    // The embedded broker, when a source asks for one; that source reads it
    // over an in-process link.
    let mut brokers = Vec::new();
    let mut links = HashMap::new();
    for mqtt in config.mqtt.iter().filter(|m| m.url.embedded) {
        let (broker, link) =
            EmbeddedBroker::start_linked(&mqtt.url.host, mqtt.url.port, &mqtt.client_id)
                .await
                .map_err(|source| AppError::Broker {
                    id: mqtt.id.clone(),
                    source,
                })?;
        links.insert(mqtt.id.clone(), link);
        tracing::warn!(
            source = %mqtt.id,
            addr = %broker.addr,
            "embedded MQTT broker started: messages it holds do not survive a restart; \
             use Mosquitto or a clustered broker where that matters"
        );
        brokers.push(broker);
    }

    // deliver: what ingest hands over, and due outbox rows (retries, rows
    // stored beyond the hand-off's room, a crashed instance's claims). The
    // claims an earlier run left are released before ingest starts storing
    // claimed rows of its own.
    let (handoff, handed) = deliver::handoff(&config.deliver);
    let cancel_delivery = CancellationToken::new();
    let dispatcher = Dispatcher::new(
        &config,
        store.clone(),
        clock.clone(),
        metrics.clone(),
        handed,
    )?;
    dispatcher.release_earlier_claims().await;

    // ingest → route: one group-commit writer behind a bounded queue; each
    // new alarm is routed and queued for delivery in the same transaction,
    // and goes straight to the dispatcher once committed, already claimed.
    let (ingest, writer) = ingest::channel(
        store.clone(),
        config.ingest.clone(),
        Arc::new(Router::new(&config)),
        clock.clone(),
        metrics.clone(),
        Some(handoff),
    );
    let writer = tokio::spawn(writer.run());
    let dispatcher = tokio::spawn(dispatcher.run(cancel_delivery.clone()));

    // sources: each runs until shutdown.
    let cancel = CancellationToken::new();
    let sources = TaskTracker::new();
    let ready = Readiness::new(config.mqtt.len() + config.serial.len());
    for mqtt in &config.mqtt {
        let mut source = MqttSource::new(
            mqtt.clone(),
            ingest.clone(),
            table.clone(),
            clock.clone(),
            metrics.clone(),
        );
        if let Some(link) = links.remove(&mqtt.id) {
            source = source.with_link(link);
        }
        let source = Source::Mqtt(source);
        sources.spawn(source.run(ready.clone(), cancel.child_token()));
    }
    for serial in &config.serial {
        let source = Source::Serial(SerialSource::new(
            serial.clone(),
            ingest.clone(),
            table.clone(),
            clock.clone(),
            metrics.clone(),
        ));
        sources.spawn(source.run(ready.clone(), cancel.child_token()));
    }
    sources.close();
    tracing::info!(
        mqtt_sources = config.mqtt.len(),
        serial_sources = config.serial.len(),
        store = ?config.store.url,
        "telegate started"
    );
    let readiness = ready.clone();
    tokio::spawn(async move {
        readiness.all_up().await;
        tracing::info!("telegate ready: every source is up");
    });

    // Housekeeping: closed alarms past the retention period are pruned.
    tokio::spawn(crate::store::prune_periodically(
        store.clone(),
        config.retention.clone(),
        clock.clone(),
        cancel_delivery.clone(),
    ));

    // The API: progress reports, health, readiness, metrics.
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: config.api.listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| AppError::Listen {
        addr: config.api.listen,
        source,
    })?;
    let state = ApiState::new(
        &config,
        store.clone(),
        clock.clone(),
        metrics.clone(),
        ready.clone(),
    );
    let stop_api = cancel_delivery.clone();
    let api = tokio::spawn(async move {
        let served = axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move { stop_api.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "API server stopped");
        }
    });
    tracing::info!(%api_addr, "API listening");

    Ok(Gateway {
        store,
        metrics,
        brokers,
        api_addr,
        ingest: Some(ingest),
        cancel,
        sources,
        writer,
        cancel_delivery,
        dispatcher,
        api,
        ready,
    })
}

impl Gateway {
    /// An ingest handle (for tests and benches that feed the store directly).
    pub fn ingest(&self) -> Option<Ingest> {
        self.ingest.clone()
    }

    /// True once every source is up (subscribed to its broker).
    pub fn is_ready(&self) -> bool {
        self.ready.is_ready()
    }

    /// Waits until every source is up; false when `timeout` passed first.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.ready.wait(timeout).await
    }

    /// The base URL of the API, e.g. `http://127.0.0.1:8080`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// Stops taking input, lets the sources acknowledge what was committed,
    /// finishes the last batch, lets deliveries under way finish and record,
    /// then closes the API and the store. Returns false when the grace
    /// period ran out first (nothing acknowledged is lost either way: the
    /// store is the source of truth, and unfinished deliveries are retried
    /// at the next start).
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        self.cancel.cancel();
        let sources_done = tokio::time::timeout_at(deadline, self.sources.wait())
            .await
            .is_ok();
        self.ingest = None;
        let writer_done = tokio::time::timeout_at(deadline, &mut self.writer)
            .await
            .is_ok();
        self.cancel_delivery.cancel();
        let dispatcher_done = tokio::time::timeout_at(deadline, &mut self.dispatcher)
            .await
            .is_ok();
        let api_done = tokio::time::timeout_at(deadline, &mut self.api)
            .await
            .is_ok();
        if !dispatcher_done {
            self.dispatcher.abort();
        }
        self.store.close().await;
        sources_done && writer_done && dispatcher_done && api_done
    }
}
