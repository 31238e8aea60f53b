//! The embedded MQTT broker (rumqttd) for the demo, tests and small sites.
//!
//! rumqttd keeps sessions in memory: messages it holds do not survive a
//! restart of the process. `Broker::start` blocks and binds from its config,
//! so it runs on its own thread on an address picked beforehand;
//! [`EmbeddedBroker::start`] returns once the port accepts connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Why the embedded broker did not come up.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot resolve broker address {0}")]
    Address(String),
    #[error("embedded broker on {addr} did not start listening within {secs} s")]
    NotListening { addr: SocketAddr, secs: u64 },
    #[error("cannot start the embedded broker thread: {0}")]
    Thread(std::io::Error),
}

/// A running in-process broker. It stops with the process.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
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
        let addr = tokio::net::lookup_host((host, port))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| BrokerError::Address(format!("{host}:{port}")))?;
        let config = broker_config(addr);
        std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, %addr, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                return Err(BrokerError::NotListening { addr, secs: 10 });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        nodelay_on_listener(addr);
        Ok(EmbeddedBroker { addr })
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
            // Each filter's log holds at most 10 segments of 4 MiB (about
            // 200,000 alarms of 200 bytes, half a minute at full load)
            // before the oldest is dropped; larger segments only cost memory.
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
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
