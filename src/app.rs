//! The application shell: wires the pipeline and spawns its tasks. Read
//! [`start`] top to bottom to see the whole gateway.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{BrokerError, EmbeddedBroker};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::ingest::{self, Ingest};
use crate::metrics::Metrics;
use crate::source::mqtt::MqttSource;
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
    #[error("serial.{0}: serial sources are not available in this version of telegate")]
    SerialUnsupported(String),
}

/// A running gateway.
pub struct Gateway {
    /// The store, for inspection (tests, reports).
    pub store: Store,
    /// The gateway's counters.
    pub metrics: Arc<Metrics>,
    /// Embedded brokers started for `embedded://` sources.
    pub brokers: Vec<EmbeddedBroker>,
    /// A handle to ingest; dropped at shutdown so that the writer can finish.
    ingest: Option<Ingest>,
    /// Stops the sources.
    cancel: CancellationToken,
    /// The sources' tasks.
    sources: TaskTracker,
    /// The group-commit writer; it ends when every ingest handle is gone.
    writer: JoinHandle<()>,
    /// Which sources are up.
    ready: Readiness,
}

/// Starts the gateway described by a validated configuration.
///
/// # Errors
/// When the store cannot be opened or an embedded broker cannot start.
pub async fn start(config: Config, clock: SharedClock) -> Result<Gateway, AppError> {
    if let Some(serial) = config.serial.first() {
        return Err(AppError::SerialUnsupported(serial.id.clone()));
    }
    let metrics = Arc::new(Metrics::default());
    let table = Arc::new(CodeTable::default());

    // store: migrated before anything is accepted.
    let store = Store::open(&config.store.url).await?;

    // The embedded broker, when a source asks for one.
    let mut brokers = Vec::new();
    for mqtt in config.mqtt.iter().filter(|m| m.url.embedded) {
        let broker = EmbeddedBroker::start(&mqtt.url.host, mqtt.url.port)
            .await
            .map_err(|source| AppError::Broker {
                id: mqtt.id.clone(),
                source,
            })?;
        tracing::warn!(
            source = %mqtt.id,
            addr = %broker.addr,
            "embedded MQTT broker started: messages it holds do not survive a restart; \
             use Mosquitto or a clustered broker where that matters"
        );
        brokers.push(broker);
    }

    // ingest: one group-commit writer behind a bounded queue.
    let (ingest, writer) = ingest::channel(
        store.clone(),
        config.ingest.clone(),
        clock.clone(),
        metrics.clone(),
    );
    let writer = tokio::spawn(writer.run());

    // sources: each runs until shutdown.
    let cancel = CancellationToken::new();
    let sources = TaskTracker::new();
    let ready = Readiness::new(config.mqtt.len());
    for mqtt in &config.mqtt {
        let source = Source::Mqtt(MqttSource::new(
            mqtt.clone(),
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
        store = ?config.store.url,
        "telegate started"
    );

    Ok(Gateway {
        store,
        metrics,
        brokers,
        ingest: Some(ingest),
        cancel,
        sources,
        writer,
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

    /// Stops taking input, lets the sources acknowledge what was committed,
    /// finishes the last batch and closes the store. Returns false when the
    /// grace period ran out first (nothing acknowledged is lost either way:
    /// the store is the source of truth).
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        self.cancel.cancel();
        let sources_done = tokio::time::timeout(grace, self.sources.wait())
            .await
            .is_ok();
        self.ingest = None;
        let writer_done = tokio::time::timeout(grace, &mut self.writer).await.is_ok();
        self.store.close().await;
        sources_done && writer_done
    }
}
