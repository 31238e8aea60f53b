//! The embedded MQTT broker (rumqttd) for the demo, tests and small sites.
//!
//! rumqttd keeps sessions in memory: messages it holds do not survive a
//! restart of the process. `Broker::start` blocks and binds from its config,
//! so it runs on its own thread on an address picked beforehand;
//! [`EmbeddedBroker::start`] returns once the port accepts connections.
//!
//! The gateway's own subscription does not go through a socket: it takes
//! messages over rumqttd's in-process link ([`LocalLink`]), which hands them
//! over without a PUBACK or a window of 100 unacknowledged messages (a
//! constant in rumqttd that caps a subscriber at 100 messages per commit
//! cycle). What the link has handed over lives in the same process as the
//! broker's copy would, so the gateway holds each message until it is
//! committed and takes it again when the commit fails, as the broker would
//! send it again (see `source::mqtt`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};

/// Why the embedded broker did not come up.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot resolve broker address {0}")]
    Address(String),
    #[error("embedded broker on {addr} did not start listening within {secs} s")]
    NotListening { addr: SocketAddr, secs: u64 },
    #[error("cannot start the embedded broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the embedded broker refused the gateway's in-process link: {0}")]
    Link(String),
}

/// A running in-process broker. It stops with the process.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

/// A connection to the embedded broker's router inside this process: it
/// subscribes at QoS 0, so the router forwards without waiting for
/// acknowledgements, and pauses when the link's buffer of 200 messages is
/// full until the reader asks for more.
pub struct LocalLink {
    pub(crate) tx: LinkTx,
    pub(crate) rx: LinkRx,
}

impl std::fmt::Debug for LocalLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLink")
            .field("connection", &self.rx.id())
            .finish()
    }
}

/// The largest MQTT packet the embedded broker accepts, in bytes. Larger than
/// the 4 KiB payload limit so that oversized payloads reach the gateway and
/// are rejected with a reason instead of dropping the device's connection.
const MAX_PACKET: usize = 256 * 1024;

impl EmbeddedBroker {
    /// Starts rumqttd on `host:port` and waits until it listens.
    ///
    /// # Errors
    /// When the address does not resolve or nothing listens within 10 s.
    pub async fn start(host: &str, port: u16) -> Result<EmbeddedBroker, BrokerError> {
        Ok(EmbeddedBroker::launch(host, port, None).await?.0)
    }

    /// Starts rumqttd like [`EmbeddedBroker::start`], with an in-process
    /// link for the client `client_id`.
    ///
    /// # Errors
    /// As [`EmbeddedBroker::start`], and when the router refuses the link.
    pub async fn start_linked(
        host: &str,
        port: u16,
        client_id: &str,
    ) -> Result<(EmbeddedBroker, LocalLink), BrokerError> {
        let (broker, link) = EmbeddedBroker::launch(host, port, Some(client_id.to_owned())).await?;
        let link = link.ok_or_else(|| BrokerError::Link("the broker thread ended".into()))?;
        Ok((broker, link))
    }

    async fn launch(
        host: &str,
        port: u16,
        link_for: Option<String>,
    ) -> Result<(EmbeddedBroker, Option<LocalLink>), BrokerError> {
        let addr = tokio::net::lookup_host((host, port))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| BrokerError::Address(format!("{host}:{port}")))?;
        let config = broker_config(addr);
        let (link_tx, link_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                // The router runs from here on; a link needs only the router.
                let mut broker = rumqttd::Broker::new(config);
                match link_for {
                    Some(client_id) => {
                        let link = broker
                            .link(&client_id)
                            .map(|(tx, rx)| LocalLink { tx, rx })
                            .map_err(|e| BrokerError::Link(e.to_string()));
                        let _ = link_tx.send(link);
                    }
                    // Nothing to send: dropping the sender says so, and
                    // `launch` goes on to wait for the port.
                    None => drop(link_tx),
                }
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, %addr, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        let link = match link_rx.await {
            Ok(link) => Some(link?),
            Err(_) => None,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                return Err(BrokerError::NotListening { addr, secs: 10 });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        nodelay_on_listener(addr);
        Ok((EmbeddedBroker { addr }, link))
    }
}

/// Sets `TCP_NODELAY` on the broker's listening socket, which Linux copies
/// to every connection it accepts. rumqttd leaves it off, so each small
/// packet it writes (a PUBLISH to the gateway, a PUBACK to a device) while
/// an earlier one is unacknowledged waits for TCP's delayed
/// acknowledgement, up to 40 ms; with its window of 100 unacknowledged
/// messages per subscriber that caps throughput as well as adding latency.
/// rumqttd has no setting for it and binds the socket itself, so the socket
/// is found among this process's socket descriptors by its address and set
/// through a duplicate (`pidfd_getfd`), which shares the socket's options.
#[cfg(target_os = "linux")]
fn nodelay_on_listener(addr: SocketAddr) {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    let found = (|| {
        let pidfd = pidfd_open(getpid(), PidfdFlags::empty()).ok()?;
        let fds = std::fs::read_dir("/proc/self/fd").ok()?;
        for entry in fds.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // Only sockets are duplicated: closing a duplicate of a file
            // would drop every POSIX lock this process holds on it, SQLite's
            // among them.
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
            if !is_socket {
                continue;
            }
            let Ok(dup) = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) else {
                continue;
            };
            let bound = rustix::net::getsockname(&dup)
                .ok()
                .and_then(|a| SocketAddr::try_from(a).ok());
            if bound == Some(addr) && rustix::net::sockopt::socket_acceptconn(&dup).unwrap_or(false)
            {
                return rustix::net::sockopt::set_tcp_nodelay(&dup, true).ok();
            }
        }
        None
    })();
    if found.is_none() {
        tracing::warn!(%addr, "cannot set TCP_NODELAY on the embedded broker's sockets; replies may lag by up to 40 ms");
    }
}

#[cfg(not(target_os = "linux"))]
fn nodelay_on_listener(_addr: SocketAddr) {}

fn broker_config(addr: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "v4-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PACKET,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // rumqttd keeps every message in its filter's log, read or not,
            // until the log passes its limit and drops its oldest segment.
            // Each filter's log holds at most 10 segments of 4 MiB (about
            // 200,000 alarms of 200 bytes, half a minute at full load);
            // larger segments only cost memory.
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 10,
            // Each device's reply topic has a log of its own that only
            // grows by a reply at a time, so at 40 MiB it would keep every
            // reply ever sent: two segments of 4 KiB keep about the last 50.
            custom_segment: Some(HashMap::from([(
                "telecare/+/+/ack".to_owned(),
                SegmentConfig {
                    max_segment_size: 4 * 1024,
                    max_segment_count: 2,
                },
            )])),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    }
}

/// A loopback port that was free a moment ago (for tests and the demo).
///
/// # Errors
/// When no socket can be bound.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
