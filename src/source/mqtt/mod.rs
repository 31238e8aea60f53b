//! The MQTT source: device topics in, `…/ack` replies out.
//!
//! # Design
//! Three loops run together in [`MqttSource::run`]:
//! - the **poller** owns the subscribing connection (persistent session,
//!   manual acknowledgements). For each PUBLISH it parses the topic and
//!   payload, hands the result to ingest in arrival order and passes a
//!   ticket to the acknowledger. It never awaits anything on its own MQTT
//!   connection (rumqttc can deadlock when the polling task awaits a request).
//! - the **acknowledger** takes tickets in arrival order, waits for each
//!   commit and only then sends the PUBACK to the broker (so PUBACKs go out
//!   in the order the broker sent the messages, as MQTT and rumqttd require),
//!   and queues the device's reply.
//! - the **replier** publishes replies on a second connection, because
//!   acknowledgements and publishes would otherwise share one request channel.
//!
//! When a commit fails, nothing is acknowledged and no reply is sent: the
//! acknowledger marks the connection as failed and the poller drops it.
//! The broker keeps the unacknowledged messages in the persistent session and
//! sends them again after the reconnect (and devices re-send anyway).
//!
//! With the embedded broker, the poller reads the broker's router over an
//! in-process link instead of a socket ([`LocalLink`]): no PUBACKs and no
//! window of 100 unacknowledged messages. The message a link handed over is
//! in this process's memory, as the broker's copy would be, so the gateway
//! keeps it until its commit: a message whose commit failed goes back to the
//! poller, which takes it again after a back-off, as the broker would send
//! it again after a reconnect.
//!
//! Every connection gets a fresh client, so a PUBACK meant for one
//! connection can never be sent on the next one, where packet ids restart.
//!
//! Queues: the poller must never wait for the acknowledger. The
//! acknowledger's PUBACKs go out through the connection's request channel,
//! which only the poller's polling drains; a poller waiting for room in a
//! full ticket queue while the acknowledger waits for room in a full request
//! channel would stop both for good, and the broker would drop the silent
//! connection. So tickets are unbounded: what bounds them is the broker's
//! window of unacknowledged messages and the bounded ingest queue, the one
//! place where the poller waits (and stops reading) until the store catches
//! up. A broker does not always keep to its window (Mosquitto, configured
//! for 1,000, was seen with over 100,000 unacknowledged messages out while
//! PUBACKs lagged behind a flood), so no channel size can rule that stall out.

mod gaps;
pub mod payload;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet,
    Publish, QoS, SubscribeFilter,
};
use rumqttd::Notification;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::payload::{
    ack_topic, normalise, parse_alarm, parse_heartbeat, parse_topic, RejectReason, Rejection,
    Reply, TopicKind,
};
use crate::broker::LocalLink;
use crate::clock::SharedClock;
use crate::config::MqttConfig;
use crate::events;
use crate::ingest::{Ingest, IngestOutcome, Pending};
use crate::metrics::Metrics;
use crate::model::SourceKind;
use crate::source::fault::{device_fault_alarm, FaultInput, FaultLimiter};
use crate::source::Readiness;
use crate::store::QuarantineEntry;
use crate::taxonomy::CodeTable;

/// Requests (PUBACKs) waiting for the subscribing connection to send them:
/// the most packet ids a connection can have outstanding.
const MAX_OUTSTANDING: usize = 65_535;
/// Largest packet read or written; above the payload limit so that an
/// oversized payload is rejected with a reason instead of dropping the link.
const MAX_PACKET: usize = 256 * 1024;
/// Replies waiting to be published.
const REPLY_QUEUE: usize = 10_000;
/// How long shutdown waits for acknowledgements and replies to go out.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// One MQTT source, built from a `[[mqtt]]` entry.
pub struct MqttSource {
    config: MqttConfig,
    ingest: Ingest,
    table: Arc<CodeTable>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    /// The embedded broker's in-process link, read instead of a socket.
    link: Option<LocalLink>,
    /// Capacity of the subscribing connection's request channel.
    requests: usize,
}

/// What the acknowledger must wait for before acknowledging a message.
enum Work {
    /// Nothing to commit (heartbeat, status, retained replay).
    Nothing,
    /// An alarm; answer the device after the commit.
    Alarm {
        pending: Pending<IngestOutcome>,
        reply_topic: String,
        seq: u64,
    },
    /// Quarantined input; answer `rejected` after the commit when there is
    /// a device to answer.
    Quarantined {
        pending: Pending<()>,
        reply: Option<(String, Reply)>,
    },
}

/// How a message is acknowledged once its work has committed.
enum Acker {
    /// A PUBACK on the connection it came on.
    Puback(AsyncClient),
    /// Nothing to send (it came over the in-process link); when the commit
    /// fails, it goes back to the poller to be taken again.
    Held,
}

enum Ticket {
    Message {
        /// Which connection the message came on.
        epoch: u64,
        acker: Acker,
        publish: Publish,
        work: Work,
    },
    /// Answered once every earlier ticket has been handled.
    Flush(oneshot::Sender<()>),
}

/// How one connection ended.
enum Ended {
    Shutdown,
    Lost(String),
}

impl MqttSource {
    pub fn new(
        config: MqttConfig,
        ingest: Ingest,
        table: Arc<CodeTable>,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> MqttSource {
        MqttSource {
            config,
            ingest,
            table,
            clock,
            metrics,
            link: None,
            requests: MAX_OUTSTANDING,
        }
    }

    /// Reads the embedded broker over `link` instead of a socket.
    #[must_use]
    pub fn with_link(mut self, link: LocalLink) -> MqttSource {
        self.link = Some(link);
        self
    }

    /// Runs until `cancel` fires, then acknowledges what was committed and
    /// stops.
    pub async fn run(mut self, ready: Readiness, cancel: CancellationToken) {
        let (ticket_tx, ticket_rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = mpsc::channel(REPLY_QUEUE);
        let (failed_tx, failed_rx) = watch::channel(0u64);
        let (retake_tx, retake_rx) = mpsc::unbounded_channel();
        let retakes = Arc::new(AtomicU32::new(0));
        let link = self.link.take();
        let replier = run_replier(self.options(true), reply_rx, self.config.id.clone());
        let failures = Failures {
            epoch: failed_tx,
            retake: retake_tx,
            retakes: retakes.clone(),
        };
        let acker = run_acknowledger(ticket_rx, reply_tx, failures);
        let poller = Poller {
            source: &self,
            faults: FaultLimiter::default(),
            epoch: 0,
            backoff: Duration::from_millis(100),
            seqs: gaps::SeqTracker::default(),
            gap_logged: None,
            ready: Some(ready),
        };
        let poller = async {
            match link {
                Some(link) => {
                    poller
                        .run_linked(link, ticket_tx, retake_rx, &retakes, cancel)
                        .await;
                }
                None => poller.run(ticket_tx, failed_rx, cancel).await,
            }
        };
        tokio::join!(poller, acker, replier);
        tracing::info!(source = %self.config.id, "MQTT source stopped");
    }

    fn options(&self, replies: bool) -> MqttOptions {
        let client_id = if replies {
            format!("{}-replies", self.config.client_id)
        } else {
            self.config.client_id.clone()
        };
        let mut options = MqttOptions::new(client_id, &self.config.url.host, self.config.url.port);
        options
            .set_keep_alive(Duration::from_secs(u64::from(
                self.config.keep_alive_s.max(5),
            )))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_clean_session(replies)
            .set_manual_acks(!replies);
        if let Some(user) = &self.config.username {
            let password = self
                .config
                .password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default();
            options.set_credentials(user.clone(), password);
        }
        options
    }

    fn filters(&self) -> Vec<SubscribeFilter> {
        self.filter_paths()
            .into_iter()
            .map(|path| SubscribeFilter::new(path, QoS::AtLeastOnce))
            .collect()
    }

    fn filter_paths(&self) -> Vec<String> {
        ["alarm", "heartbeat", "status"]
            .into_iter()
            .map(|kind| {
                let topic = format!("telecare/+/+/{kind}");
                match &self.config.shared_group {
                    Some(group) => format!("$share/{group}/{topic}"),
                    None => topic,
                }
            })
            .collect()
    }
}

/// How the acknowledger reports a commit that failed.
struct Failures {
    /// The connection whose messages must not be acknowledged any more.
    epoch: watch::Sender<u64>,
    /// Messages from the in-process link, to be taken again.
    retake: mpsc::UnboundedSender<Publish>,
    /// Rounds of messages taken again since a commit last succeeded.
    retakes: Arc<AtomicU32>,
}

struct Poller<'a> {
    source: &'a MqttSource,
    /// When each device last got a `device_fault` alarm for broken input.
    faults: FaultLimiter,
    /// Counts connections; tickets carry it so that a failed connection's
    /// messages are never acknowledged on a later one.
    epoch: u64,
    /// Wait before the next reconnect; reset when a connection is accepted.
    backoff: Duration,
    /// Last sequence numbers per device, to notice a broker dropping messages.
    seqs: gaps::SeqTracker,
    /// When a sequence gap was last logged (logged at most once a minute).
    gap_logged: Option<tokio::time::Instant>,
    /// Reported (then dropped) the first time the subscriptions are in place.
    ready: Option<Readiness>,
}

impl Poller<'_> {
    async fn run(
        mut self,
        tickets: mpsc::UnboundedSender<Ticket>,
        mut failed: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) {
        let id = self.source.config.id.clone();
        loop {
            self.epoch += 1;
            let (client, mut eventloop) = client(self.source.options(false), self.source.requests);
            let ended = self
                .connection(&client, &mut eventloop, &tickets, &mut failed, &cancel)
                .await;
            match ended {
                Ended::Shutdown => break,
                Ended::Lost(reason) => {
                    let wait = self.backoff;
                    tracing::warn!(source = %id, %reason, retry_in_ms = wait.as_millis() as u64, "MQTT connection lost");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                    self.backoff = (wait * 2).min(Duration::from_secs(10));
                }
            }
            if cancel.is_cancelled() {
                break;
            }
        }
    }

    async fn connection(
        &mut self,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
        tickets: &mpsc::UnboundedSender<Ticket>,
        failed: &mut watch::Receiver<u64>,
        cancel: &CancellationToken,
    ) -> Ended {
        let id = &self.source.config.id;
        loop {
            let event = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    self.drain(client, eventloop, tickets).await;
                    return Ended::Shutdown;
                }
                changed = failed.changed() => {
                    if changed.is_ok() && *failed.borrow_and_update() == self.epoch {
                        return Ended::Lost("store commit failed; reconnecting so the broker re-sends".into());
                    }
                    continue;
                }
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ConnAck {
                    session_present,
                    code,
                }))) => {
                    if code != ConnectReturnCode::Success {
                        return Ended::Lost(format!("broker refused the connection: {code:?}"));
                    }
                    tracing::info!(source = %id, session_present, "MQTT connected");
                    self.backoff = Duration::from_millis(100);
                    // A resumed session keeps its subscriptions; subscribing
                    // again would replay every retained message.
                    if session_present {
                        self.report_ready();
                    } else if let Err(e) = client.try_subscribe_many(self.source.filters()) {
                        return Ended::Lost(format!("cannot subscribe: {e}"));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let acker = Acker::Puback(client.clone());
                    if !self.take(publish, acker, tickets).await {
                        return Ended::Shutdown;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    tracing::debug!(source = %id, codes = ?ack.return_codes, "subscribed");
                    self.report_ready();
                }
                Ok(_) => {}
                Err(e) => return Ended::Lost(e.to_string()),
            }
        }
    }

    /// Hands one message to ingest and its ticket to the acknowledger;
    /// false once the acknowledger has stopped.
    async fn take(
        &mut self,
        publish: Publish,
        acker: Acker,
        tickets: &mpsc::UnboundedSender<Ticket>,
    ) -> bool {
        let work = self.handle(&publish).await;
        let ticket = Ticket::Message {
            epoch: self.epoch,
            acker,
            publish,
            work,
        };
        tickets.send(ticket).is_ok()
    }

    /// Reads the embedded broker over its in-process link until `cancel`
    /// fires. Messages whose commit failed come back on `retake` and are
    /// taken again after a back-off that grows while commits keep failing.
    async fn run_linked(
        mut self,
        link: LocalLink,
        tickets: mpsc::UnboundedSender<Ticket>,
        mut retake: mpsc::UnboundedReceiver<Publish>,
        retakes: &AtomicU32,
        cancel: CancellationToken,
    ) {
        let id = self.source.config.id.clone();
        let LocalLink { mut tx, mut rx } = link;
        let filters = self.source.filter_paths();
        let mut unacknowledged = filters.len();
        for filter in filters {
            if let Err(e) = tx.subscribe(filter) {
                tracing::error!(source = %id, error = %e, "cannot subscribe on the embedded broker; this source takes no messages");
                return;
            }
        }
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(first) = retake.recv() => {
                    let rounds = retakes.fetch_add(1, Ordering::Relaxed).min(7);
                    let wait = (Duration::from_millis(100) * 2u32.pow(rounds))
                        .min(Duration::from_secs(10));
                    tracing::warn!(source = %id, retry_in_ms = wait.as_millis() as u64, "store commit failed; taking the messages again");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                    let mut again = vec![first];
                    while let Ok(publish) = retake.try_recv() {
                        again.push(publish);
                    }
                    for publish in again {
                        if !self.take(publish, Acker::Held, &tickets).await {
                            return;
                        }
                    }
                }
                next = rx.next() => {
                    let handled = match next {
                        Ok(Some(Notification::Forward(forward))) => {
                            let publish = from_link(forward.publish);
                            if !self.take(publish, Acker::Held, &tickets).await {
                                return;
                            }
                            Ok(())
                        }
                        // The only acknowledgements the link gets: SUBACKs.
                        Ok(Some(Notification::DeviceAck(_))) => {
                            unacknowledged = unacknowledged.saturating_sub(1);
                            if unacknowledged == 0 {
                                tracing::info!(source = %id, "subscribed on the embedded broker over its in-process link");
                                self.report_ready();
                            }
                            Ok(())
                        }
                        // The router paused until what it handed over is
                        // taken: it has been.
                        Ok(Some(Notification::Unschedule)) => rx.wake().await,
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = handled {
                        tracing::error!(source = %id, error = %e, "the embedded broker stopped; this source takes no more messages");
                        break;
                    }
                }
            }
        }
        flush(&tickets).await;
    }

    fn report_ready(&mut self) {
        if let Some(ready) = self.ready.take() {
            ready.source_up();
        }
    }

    /// Stops taking messages, lets the acknowledger send every PUBACK it
    /// owes, then disconnects. Messages that arrive meanwhile are left
    /// unacknowledged for the broker to send again.
    async fn drain(
        &self,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
        tickets: &mpsc::UnboundedSender<Ticket>,
    ) {
        let flush = async {
            flush(tickets).await;
            let _ = client.try_disconnect();
        };
        let pump = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(FLUSH_GRACE, async { tokio::join!(flush, pump) }).await;
    }

    /// Turns one PUBLISH into work for ingest, in arrival order.
    async fn handle(&mut self, publish: &Publish) -> Work {
        let metrics = &self.source.metrics;
        Metrics::inc(&metrics.mqtt_messages);
        let now = self.source.clock.now();
        let topic = match parse_topic(&publish.topic) {
            Ok(t) => t,
            Err(e) => {
                let rejection = Rejection {
                    seq: None,
                    reason: RejectReason::BadTopic,
                    detail: e.to_string(),
                };
                return self.quarantine(publish, None, rejection, now).await;
            }
        };
        if publish.retain {
            // A stored message replayed on subscribe, not a new signal.
            Metrics::inc(&metrics.retained_ignored);
            tracing::debug!(topic = %publish.topic, "retained message ignored");
            return Work::Nothing;
        }
        match topic.kind {
            TopicKind::Alarm => match parse_alarm(&publish.payload) {
                Ok(payload) => {
                    if !payload.dropped.is_empty() {
                        events::FieldsDropped {
                            tenant: topic.tenant,
                            device_id: topic.device_id,
                            dropped: &payload.dropped,
                        }
                        .emit(metrics);
                    }
                    let seq = payload.seq;
                    self.check_sequence(topic.tenant, topic.device_id, seq);
                    let alarm = normalise(
                        &topic,
                        payload,
                        &self.source.table,
                        &self.source.config.id,
                        now,
                        publish.payload.to_vec(),
                    );
                    let reply_topic = ack_topic(topic.tenant, topic.device_id);
                    match self.source.ingest.enqueue_alarm(alarm).await {
                        Ok(pending) => Work::Alarm {
                            pending,
                            reply_topic,
                            seq,
                        },
                        Err(e) => Work::Alarm {
                            pending: Pending::ready(Err(e)),
                            reply_topic,
                            seq,
                        },
                    }
                }
                Err(rejection) => {
                    let device = (topic.tenant.to_owned(), topic.device_id.to_owned());
                    self.quarantine(publish, Some(device), rejection, now).await
                }
            },
            TopicKind::Heartbeat => match parse_heartbeat(&publish.payload) {
                Ok(_) => {
                    Metrics::inc(&metrics.heartbeats);
                    Work::Nothing
                }
                Err(mut rejection) => {
                    // Heartbeats get no reply, rejected or not.
                    rejection.detail = format!("heartbeat: {}", rejection.detail);
                    let device = (topic.tenant.to_owned(), topic.device_id.to_owned());
                    match self.quarantine(publish, Some(device), rejection, now).await {
                        Work::Quarantined { pending, .. } => Work::Quarantined {
                            pending,
                            reply: None,
                        },
                        other => other,
                    }
                }
            },
            TopicKind::Status => {
                tracing::debug!(topic = %publish.topic, "device status");
                Work::Nothing
            }
            TopicKind::Ack => Work::Nothing,
        }
    }

    /// Counts sequence numbers a device skipped (and takes back those that
    /// arrive late), and warns at most once a minute: skipped numbers mean
    /// messages were lost before they reached the gateway.
    fn check_sequence(&mut self, tenant: &str, device_id: &str, seq: u64) {
        let metrics = &self.source.metrics;
        match self.seqs.observe(tenant, device_id, seq) {
            gaps::SeqEvent::InOrder => {}
            gaps::SeqEvent::Filled => Metrics::inc(&metrics.seq_gaps_filled),
            gaps::SeqEvent::Gap { missing } => {
                Metrics::add(&metrics.seq_gaps, missing);
                let now = tokio::time::Instant::now();
                if self
                    .gap_logged
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
                {
                    self.gap_logged = Some(now);
                    tracing::warn!(
                        source = %self.source.config.id,
                        tenant,
                        device_id,
                        seq,
                        missing,
                        "a device skipped sequence numbers: messages are being lost before they reach \
                         the gateway (check the broker's max_queued_messages and persistent sessions; \
                         see config/mosquitto.conf)"
                    );
                }
            }
        }
    }

    /// Keeps broken input in quarantine, answers the device `rejected` when
    /// there is one, and raises a `device_fault` for it at most once an hour.
    async fn quarantine(
        &mut self,
        publish: &Publish,
        device: Option<(String, String)>,
        rejection: Rejection,
        now: DateTime<Utc>,
    ) -> Work {
        let source = self.source;
        events::PayloadRejected {
            source_id: &source.config.id,
            reference: &publish.topic,
            reason: rejection.reason,
            detail: &rejection.detail,
        }
        .emit(&source.metrics);
        let entry = QuarantineEntry {
            received_at: now,
            source_kind: SourceKind::Mqtt,
            source_id: source.config.id.clone(),
            reference: publish.topic.chars().take(1024).collect(),
            tenant: device.as_ref().map(|d| d.0.clone()),
            device_id: device.as_ref().map(|d| d.1.clone()),
            reason: rejection.reason.as_str().to_owned(),
            detail: rejection.detail.clone(),
            raw: publish.payload.to_vec(),
        };
        let pending = match source.ingest.enqueue_quarantine(entry).await {
            Ok(p) => p,
            Err(e) => Pending::ready(Err(e)),
        };
        let Some((tenant, device_id)) = device else {
            return Work::Quarantined {
                pending,
                reply: None,
            };
        };
        self.raise_device_fault(&tenant, &device_id, &publish.payload, &rejection, now)
            .await;
        let reply = Reply::Rejected {
            seq: rejection.seq,
            reason: rejection.reason_text(),
        };
        Work::Quarantined {
            pending,
            reply: Some((ack_topic(&tenant, &device_id), reply)),
        }
    }

    async fn raise_device_fault(
        &mut self,
        tenant: &str,
        device_id: &str,
        raw: &[u8],
        rejection: &Rejection,
        now: DateTime<Utc>,
    ) {
        if !self.faults.admit(tenant, device_id, now) {
            return;
        }
        events::DeviceFaultRaised {
            tenant,
            device_id,
            reason: rejection.reason.as_str(),
        }
        .emit(&self.source.metrics);
        let alarm = device_fault_alarm(
            &FaultInput {
                tenant,
                device_id,
                source_id: &self.source.config.id,
                reason: rejection.reason.as_str(),
                explanation: &rejection.reason_text(),
                raw,
            },
            now,
        );
        // The fault alarm is stored like any other; nobody waits for it.
        if let Err(e) = self.source.ingest.enqueue_alarm(alarm).await {
            tracing::error!(error = %e, tenant, device_id, "cannot queue device_fault alarm");
        }
    }
}

/// Waits until the acknowledger has handled every ticket sent so far.
async fn flush(tickets: &mpsc::UnboundedSender<Ticket>) {
    let (done_tx, done_rx) = oneshot::channel();
    if tickets.send(Ticket::Flush(done_tx)).is_ok() {
        let _ = done_rx.await;
    }
}

/// Acknowledges messages in arrival order once their work has committed.
async fn run_acknowledger(
    mut tickets: mpsc::UnboundedReceiver<Ticket>,
    replies: mpsc::Sender<(String, Reply)>,
    failures: Failures,
) {
    let mut failed_epoch = 0u64;
    while let Some(ticket) = tickets.recv().await {
        let (epoch, acker, publish, work) = match ticket {
            Ticket::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Ticket::Message {
                epoch,
                acker,
                publish,
                work,
            } => (epoch, acker, publish, work),
        };
        let writes = !matches!(work, Work::Nothing);
        let (committed, reply) = match work {
            Work::Nothing => (true, None),
            Work::Alarm {
                pending,
                reply_topic,
                seq,
            } => match pending.wait().await {
                Ok(IngestOutcome::Accepted(alarm_id)) => {
                    (true, Some((reply_topic, Reply::Accepted { seq, alarm_id })))
                }
                Ok(IngestOutcome::Duplicate(alarm_id)) => (
                    true,
                    Some((reply_topic, Reply::Duplicate { seq, alarm_id })),
                ),
                Err(_) => (false, None),
            },
            Work::Quarantined { pending, reply } => match pending.wait().await {
                Ok(()) => (true, reply),
                Err(_) => (false, None),
            },
        };
        if !committed {
            match acker {
                // Acknowledge nothing more on this connection: the broker
                // must send this message again, and PUBACKs must stay in
                // order.
                Acker::Puback(_) => {
                    if failed_epoch != epoch {
                        failed_epoch = epoch;
                        let _ = failures.epoch.send(epoch);
                    }
                }
                Acker::Held => {
                    let _ = failures.retake.send(publish);
                }
            }
            continue;
        }
        if writes {
            failures.retakes.store(0, Ordering::Relaxed);
        }
        if let Acker::Puback(client) = acker {
            if epoch != failed_epoch {
                // Fails only when the connection is gone; the broker re-sends.
                let _ = client.ack(&publish).await;
            }
        }
        if let Some(reply) = reply {
            if replies.send(reply).await.is_err() {
                tracing::warn!("reply publisher stopped; device replies are not sent");
            }
        }
    }
}

/// A message from the in-process link as the MQTT client would have read it.
/// The router has checked that the topic is UTF-8 before storing it.
fn from_link(publish: rumqttd::protocol::Publish) -> Publish {
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let mut message = Publish::new(topic, QoS::AtLeastOnce, Vec::new());
    message.retain = publish.retain;
    message.payload = publish.payload;
    message
}

/// Most queued requests (PUBACKs, replies) that leave in one write.
const REQUEST_BATCH: usize = 64;

/// An MQTT client whose small packets go out at once. Without
/// `TCP_NODELAY`, a PUBLISH or PUBACK written while the previous one is not
/// yet acknowledged by TCP waits for that acknowledgement, which the peer
/// may delay by up to 40 ms. Requests already queued leave together, in one
/// write (at 8,000 alarms/s through Mosquitto, 1.1 `writev` calls an alarm
/// instead of 3.0 with one per PUBACK and reply).
pub fn client(mut options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    options.set_max_request_batch(REQUEST_BATCH);
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Ends a client's persistent session on a broker: connects with its id and
/// a clean session, then disconnects. A gateway instance that is retired
/// (or a test or bench run that is over) leaves a session that stays
/// subscribed to every device topic and makes the broker queue every alarm
/// for a client that never comes back. True when the broker confirmed.
pub async fn end_session(host: &str, port: u16, client_id: &str, limit: Duration) -> bool {
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_clean_session(true);
    let (client, mut eventloop) = self::client(options, 10);
    let ended = tokio::time::timeout(limit, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_disconnect();
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    ended == Ok(true)
}

/// Publishes device replies on a connection of their own.
async fn run_replier(
    options: MqttOptions,
    mut replies: mpsc::Receiver<(String, Reply)>,
    id: String,
) {
    let (client, mut eventloop) = client(options, 1024);
    let done = CancellationToken::new();
    let publisher = async {
        while let Some((topic, reply)) = replies.recv().await {
            if let Err(e) = client
                .publish(topic, QoS::AtLeastOnce, false, reply.to_json())
                .await
            {
                tracing::warn!(source = %id, error = %e, "cannot queue reply");
            }
        }
        let _ = client.try_disconnect();
        done.cancel();
    };
    let poller = async {
        let mut backoff = Duration::from_millis(100);
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                () = async { done.cancelled().await; tokio::time::sleep(FLUSH_GRACE).await } => break,
            };
            match event {
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(Event::Incoming(Packet::ConnAck(_))) => backoff = Duration::from_millis(100),
                Ok(_) => {}
                Err(e) => {
                    if done.is_cancelled() {
                        break;
                    }
                    tracing::warn!(source = %id, error = %e, "reply connection lost");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    };
    tokio::join!(publisher, poller);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{free_port, EmbeddedBroker};
    use crate::config::Config;
    use crate::route::Router;
    use crate::store::Store;

    /// PUBACKs that queue up faster than the connection sends them (here a
    /// request channel of two, against the broker's window of 100) must not
    /// stop the source: every alarm of a flood is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_with_lagging_pubacks_does_not_stall_the_source() {
        const ALARMS: usize = 3_000;
        let port = free_port().expect("free port");
        let _broker = EmbeddedBroker::start("127.0.0.1", port)
            .await
            .expect("broker starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let toml = format!(
            "[store]\nurl = \"sqlite://{}\"\n\n[[mqtt]]\nid = \"devices\"\n\
             url = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"flood\"\n\n\
             [[provider]]\nid = \"arc\"\nurl = \"http://127.0.0.1:9/alarms\"\n\
             secret = \"s\"\ntoken = \"t\"\n\n[routing]\ndefault_provider = \"arc\"\n",
            dir.path().join("flood.db").display()
        );
        let config = Config::from_toml_str(&toml, "flood.toml", &|_| None).expect("config");
        let store = Store::open(&config.store.url).await.expect("store");
        let metrics = Arc::new(Metrics::default());
        let clock = crate::clock::system();
        let (ingest, writer) = crate::ingest::channel(
            store.clone(),
            config.ingest.clone(),
            Arc::new(Router::new(&config)),
            clock.clone(),
            metrics.clone(),
            None,
        );
        let writer = tokio::spawn(writer.run());
        let mut source = MqttSource::new(
            config.mqtt[0].clone(),
            ingest,
            Arc::new(CodeTable::default()),
            clock,
            metrics,
        );
        source.requests = 2;
        let ready = Readiness::new(1);
        let cancel = CancellationToken::new();
        let run = tokio::spawn(source.run(ready.clone(), cancel.clone()));
        assert!(
            ready.wait(Duration::from_secs(10)).await,
            "source subscribed"
        );

        let mut options = MqttOptions::new("flood-devices", "127.0.0.1", port);
        options.set_inflight(1000);
        let (devices, mut eventloop) = client(options, 1000);
        let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        let publisher = tokio::spawn(async move {
            for i in 0..ALARMS {
                let payload =
                    format!(r#"{{"seq": {i}, "event": "fall", "ts": "2026-11-22T10:15:30.123Z"}}"#);
                let topic = format!("telecare/flood/dev{}/alarm", i % 50);
                if devices
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut stored = 0;
        while tokio::time::Instant::now() < deadline {
            stored = store.count_alarms().await.expect("count");
            if stored as usize == ALARMS {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            stored as usize, ALARMS,
            "every alarm of the flood is stored"
        );
        cancel.cancel();
        run.await.expect("source stops");
        writer.await.expect("writer stops");
        publisher.abort();
        driver.abort();
    }
}
