//! Sources: where signals come in. A source runs until shutdown and hands
//! what it reads to an [`crate::ingest::Ingest`] handle, acknowledging its
//! sender only once the store has committed.

pub mod code;
pub mod fault;
pub mod mqtt;
pub mod serial;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Counts the sources that are up (subscribed, port open), for readiness
/// checks. Each source reports once, the first time it is up.
#[derive(Debug, Clone)]
pub struct Readiness {
    up: Arc<watch::Sender<usize>>,
    expected: usize,
}

impl Readiness {
    /// Readiness of `expected` sources.
    pub fn new(expected: usize) -> Readiness {
        Readiness {
            up: Arc::new(watch::channel(0).0),
            expected,
        }
    }

    /// A source reports that it is up.
    pub fn source_up(&self) {
        self.up.send_modify(|n| *n += 1);
    }

    /// True when every source is up.
    pub fn is_ready(&self) -> bool {
        *self.up.borrow() >= self.expected
    }

    /// Waits until every source is up.
    pub async fn all_up(&self) {
        let mut rx = self.up.subscribe();
        let expected = self.expected;
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|n| *n >= expected).await;
    }

    /// Waits until every source is up; false when `timeout` passed first.
    pub async fn wait(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.all_up()).await.is_ok()
    }
}

/// Every kind of source the gateway runs (a closed set).
pub enum Source {
    Mqtt(mqtt::MqttSource),
    Serial(serial::SerialSource),
}

impl Source {
    /// Runs the source until `cancel` fires and its acknowledgements are out.
    pub async fn run(self, ready: Readiness, cancel: CancellationToken) {
        match self {
            Source::Mqtt(source) => source.run(ready, cancel).await,
            Source::Serial(source) => source.run(ready, cancel).await,
        }
    }
}
