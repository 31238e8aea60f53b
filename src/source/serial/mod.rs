//! Serial sources: alarm receivers and dispersed units on serial lines.
//!
//! # Design
//! Each `[[serial]]` port is one task ([`SerialSource::run`]). It opens the
//! port, and while the port is up two loops run together:
//! - the **reader** decodes lines with the port's [`LineFormat`], hands
//!   signals to ingest in arrival order, and passes a ticket per line to the
//!   answerer. Decoding never fails on input: a bad line becomes a NAK and a
//!   quarantine row, so a bad device cannot block its port.
//! - the **answerer** takes tickets in arrival order, waits for each commit
//!   and only then writes the ACK (DESIGN.md guarantee 1). A line whose
//!   commit failed gets no answer, so the sender sends it again.
//!
//! Serial lines carry no sequence number (except `telecare-line`): the same
//! line from the same port and account within the de-duplication window is
//! a re-send, stored once and acknowledged again.
//!
//! A port that fails or disappears (an unplugged USB adapter, a closed
//! pseudo-terminal) is reopened with backoff. Down for longer than
//! `comms_fail_after_s`, it raises a `comms_fail` alarm for the receiver;
//! when it is back, the restore.

pub mod codec;
pub mod contact_id;
pub mod frame;
pub mod surgard;
pub mod telecare_line;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use self::codec::{LineCodec, LineFormat};
use self::frame::{Answer, Frame, Invalid, Signal};
use crate::clock::SharedClock;
use crate::config::{Parity, SerialConfig, SerialFormat};
use crate::events;
use crate::ingest::{Ingest, IngestError, IngestOutcome, Pending};
use crate::metrics::Metrics;
use crate::model::{AlarmClass, AlarmDetails, DedupeKey, NewAlarm, SourceKind, SourceRef};
use crate::source::fault::{device_fault_alarm, FaultInput, FaultLimiter};
use crate::source::Readiness;
use crate::store::QuarantineEntry;
use crate::taxonomy::CodeTable;

/// Lines waiting for their answer. Receivers send one line at a time; units
/// on `telecare-line` may pipeline.
const TICKETS: usize = 1024;
/// The first wait before reopening a port; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long shutdown waits for answers to committed lines to go out.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// One serial port, built from a `[[serial]]` entry.
pub struct SerialSource {
    config: SerialConfig,
    ingest: Ingest,
    table: Arc<CodeTable>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

/// What the answerer waits for before answering a line.
enum Ticket {
    /// Nothing to commit (a heartbeat).
    Ready(Answer),
    /// An alarm: ACK after the commit.
    Alarm {
        pending: Pending<IngestOutcome>,
        unit: Option<String>,
        seq: Option<u64>,
    },
    /// A bad line: NAK once it is quarantined.
    Quarantined { pending: Pending<()>, nak: Answer },
}

/// How a port's session ended.
enum Ended {
    Shutdown,
    Lost(String),
}

impl SerialSource {
    pub fn new(
        config: SerialConfig,
        ingest: Ingest,
        table: Arc<CodeTable>,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> SerialSource {
        SerialSource {
            config,
            ingest,
            table,
            clock,
            metrics,
        }
    }

    /// Runs the port until `cancel` fires and the answers to committed lines
    /// are out.
    pub async fn run(self, ready: Readiness, cancel: CancellationToken) {
        match self.config.format {
            SerialFormat::Surgard => self.run_format::<surgard::Surgard>(ready, cancel).await,
            SerialFormat::ContactId => {
                self.run_format::<contact_id::ContactId>(ready, cancel)
                    .await;
            }
            SerialFormat::TelecareLine => {
                self.run_format::<telecare_line::TelecareLine>(ready, cancel)
                    .await;
            }
        }
    }

    async fn run_format<F: LineFormat>(self, ready: Readiness, cancel: CancellationToken) {
        let mut port = Port {
            source: &self,
            faults: FaultLimiter::default(),
            down_since: None,
            comms_fail_raised: false,
            reported_ready: false,
        };
        let mut backoff = FIRST_BACKOFF;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            match self.open() {
                Ok(stream) => {
                    backoff = FIRST_BACKOFF;
                    port.opened(&ready).await;
                    match port.serve::<F>(stream, &cancel).await {
                        Ended::Shutdown => break,
                        Ended::Lost(reason) => {
                            Metrics::inc(&self.metrics.serial_port_lost);
                            tracing::warn!(
                                source = %self.config.id, path = %self.config.path.display(),
                                reason, "serial port lost; reopening"
                            );
                            port.down_since = Some(self.clock.now());
                        }
                    }
                }
                Err(e) => {
                    if port.down_since.is_none() {
                        Metrics::inc(&self.metrics.serial_port_lost);
                        tracing::warn!(
                            source = %self.config.id, path = %self.config.path.display(),
                            error = %e, "cannot open serial port; retrying with backoff"
                        );
                        port.down_since = Some(self.clock.now());
                    } else {
                        tracing::debug!(source = %self.config.id, error = %e, "serial port still down");
                    }
                }
            }
            let wait = port
                .check_comms_fail()
                .await
                .map_or(backoff, |left| left.min(backoff));
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        tracing::debug!(source = %self.config.id, "serial source stopped");
    }

    fn open(&self) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
        let c = &self.config;
        let data_bits = match c.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        };
        let parity = match c.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        };
        let stop_bits = if c.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        };
        // The path may be a symlink (udev's /dev/serial/by-id names, a
        // simulator's link): open what it points at now.
        let path = std::fs::canonicalize(&c.path).unwrap_or_else(|_| c.path.clone());
        tokio_serial::new(path.to_string_lossy(), c.baud)
            .data_bits(data_bits)
            .parity(parity)
            .stop_bits(stop_bits)
            .flow_control(tokio_serial::FlowControl::None)
            .open_native_async()
    }

    /// The tenant and device a signal belongs to.
    fn locate(
        &self,
        receiver: Option<&str>,
        line: Option<&str>,
        account: &str,
    ) -> (String, String) {
        let mapping = self
            .config
            .map
            .iter()
            .find(|m| m.matches(receiver, line, account));
        let tenant = mapping
            .and_then(|m| m.tenant.clone())
            .unwrap_or_else(|| self.config.tenant.clone());
        let device_id = mapping
            .and_then(|m| m.device_id.clone())
            .unwrap_or_else(|| account.to_owned());
        (tenant, device_id)
    }

    /// Turns a decoded signal into a [`NewAlarm`].
    fn normalise(&self, signal: Signal, received_at: DateTime<Utc>) -> NewAlarm {
        let (tenant, device_id) = self.locate(
            signal.receiver.as_deref(),
            signal.line.as_deref(),
            &signal.account,
        );
        let (class, code_restores) = signal.code.classify(&self.table);
        let restore = code_restores || signal.restore;
        let code = signal.code.original();
        let dedupe_key = match signal.seq {
            Some(seq) => DedupeKey::for_device_signal(
                &tenant,
                &device_id,
                seq,
                &code,
                restore,
                signal.raised_at,
            ),
            // No sequence number: the same line from the same port and
            // account is a re-send.
            None => DedupeKey::from_parts(&[
                "serial",
                &self.config.id,
                &signal.account,
                String::from_utf8_lossy(&signal.raw).trim(),
            ]),
        };
        let account = signal.seq.is_none().then(|| signal.account.clone());
        NewAlarm {
            tenant,
            device_id,
            account,
            seq: signal.seq,
            class,
            restore,
            raised_at: signal.raised_at,
            received_at,
            source: SourceRef {
                kind: SourceKind::Serial,
                id: self.config.id.clone(),
                code,
            },
            details: AlarmDetails {
                zone: signal.zone,
                battery_pct: signal.battery_pct,
                rssi: signal.rssi,
                ..AlarmDetails::default()
            },
            raw: signal.raw,
            dedupe_key,
        }
    }

    /// The `comms_fail` alarm (or its restore) for this port.
    fn comms_fail_alarm(
        &self,
        restore: bool,
        outage_since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> NewAlarm {
        let c = &self.config;
        let text = if restore {
            format!("serial port {} is back", c.path.display())
        } else {
            format!(
                "serial port {} down since {}",
                c.path.display(),
                crate::model::wire_time(outage_since)
            )
        };
        NewAlarm {
            tenant: c.tenant.clone(),
            device_id: c.id.clone(),
            account: None,
            seq: None,
            class: AlarmClass::CommsFail,
            restore,
            raised_at: None,
            received_at: now,
            source: SourceRef {
                kind: SourceKind::Internal,
                id: c.id.clone(),
                code: if restore {
                    "port_restored"
                } else {
                    "port_down"
                }
                .to_owned(),
            },
            details: AlarmDetails {
                text: Some(text),
                ..AlarmDetails::default()
            },
            raw: Vec::new(),
            // One alarm and one restore per outage, however often it is
            // submitted.
            dedupe_key: DedupeKey::from_parts(&[
                "comms",
                &c.id,
                if restore { "r" } else { "a" },
                &outage_since.timestamp_millis().to_string(),
            ]),
        }
    }
}

/// The state of one port across reopenings.
struct Port<'a> {
    source: &'a SerialSource,
    faults: FaultLimiter,
    /// When the current outage began.
    down_since: Option<DateTime<Utc>>,
    /// Whether this outage has raised `comms_fail`.
    comms_fail_raised: bool,
    reported_ready: bool,
}

impl Port<'_> {
    async fn opened(&mut self, ready: &Readiness) {
        let source = self.source;
        tracing::info!(
            source = %source.config.id, path = %source.config.path.display(),
            format = %source.config.format, "serial port open"
        );
        if !self.reported_ready {
            self.reported_ready = true;
            ready.source_up();
        }
        if let Some(since) = self.down_since.take() {
            if std::mem::take(&mut self.comms_fail_raised) {
                let now = source.clock.now();
                self.submit_internal(source.comms_fail_alarm(true, since, now))
                    .await;
            }
        }
    }

    /// Raises `comms_fail` when the outage has lasted long enough; returns
    /// how long until it will have, while it has not.
    async fn check_comms_fail(&mut self) -> Option<Duration> {
        let since = self.down_since?;
        if self.comms_fail_raised {
            return None;
        }
        let source = self.source;
        let now = source.clock.now();
        let down_for = now
            .signed_duration_since(since)
            .to_std()
            .unwrap_or_default();
        if down_for < source.config.comms_fail_after {
            return Some(source.config.comms_fail_after - down_for);
        }
        tracing::error!(
            source = %source.config.id, path = %source.config.path.display(),
            down_s = down_for.as_secs(), "serial port down too long: comms_fail raised"
        );
        Metrics::inc(&source.metrics.comms_fails_raised);
        self.comms_fail_raised = true;
        self.submit_internal(source.comms_fail_alarm(false, since, now))
            .await;
        None
    }

    /// Stores an alarm the gateway raises itself. The port is down, so
    /// nothing waits on this task: it retries until the store takes it.
    async fn submit_internal(&self, alarm: NewAlarm) {
        let ingest = self.source.ingest.clone();
        let id = self.source.config.id.clone();
        tokio::spawn(async move {
            let mut wait = FIRST_BACKOFF;
            loop {
                match ingest.submit(alarm.clone()).await {
                    Ok(_) => return,
                    Err(IngestError::Closed) => {
                        tracing::error!(source = %id, class = alarm.class.name(), "gateway stopping: port alarm not stored");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(source = %id, error = %e, "port alarm not stored yet; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
    }

    /// Reads and answers lines until the port goes away or `cancel` fires.
    async fn serve<F: LineFormat>(
        &mut self,
        stream: tokio_serial::SerialStream,
        cancel: &CancellationToken,
    ) -> Ended {
        let (reader, writer) = tokio::io::split(stream);
        let mut frames = FramedRead::new(reader, LineCodec::<F>::new());
        let sink = FramedWrite::new(writer, LineCodec::<F>::new());
        let (tickets, queue) = mpsc::channel(TICKETS);
        let answerer = tokio::spawn(answer(queue, sink, self.source.config.id.clone()));
        let ended = loop {
            let frame = tokio::select! {
                () = cancel.cancelled() => break Ended::Shutdown,
                frame = frames.next() => frame,
            };
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => break Ended::Lost(e.to_string()),
                None => break Ended::Lost("the port closed".into()),
            };
            let ticket = self.handle(frame).await;
            if tickets.send(ticket).await.is_err() {
                break Ended::Lost("the port stopped taking answers".into());
            }
        };
        drop(tickets);
        match ended {
            // Committed lines are answered before the port closes.
            Ended::Shutdown => {
                if tokio::time::timeout(FLUSH_GRACE, answerer).await.is_err() {
                    tracing::warn!(source = %self.source.config.id, "answers not all written before shutdown");
                }
            }
            // The answerer stops at its first failed write.
            Ended::Lost(_) => answerer.abort(),
        }
        ended
    }

    async fn handle(&mut self, frame: Frame) -> Ticket {
        let source = self.source;
        Metrics::inc(&source.metrics.serial_lines);
        let now = source.clock.now();
        match frame {
            Frame::Heartbeat(hb) => {
                Metrics::inc(&source.metrics.heartbeats);
                Ticket::Ready(Answer::Ack {
                    unit: hb.unit,
                    seq: hb.seq,
                    alarm_id: None,
                })
            }
            Frame::Signal(signal) => {
                let unit = signal.seq.map(|_| signal.account.clone());
                let seq = signal.seq;
                if !signal.dropped.is_empty() {
                    tracing::warn!(
                        source = %source.config.id, account = %signal.account,
                        fields = ?signal.dropped, "optional fields dropped"
                    );
                    Metrics::add(&source.metrics.fields_dropped, signal.dropped.len() as u64);
                }
                let alarm = source.normalise(signal, now);
                let pending = match source.ingest.enqueue_alarm(alarm).await {
                    Ok(p) => p,
                    Err(e) => Pending::ready(Err(e)),
                };
                Ticket::Alarm { pending, unit, seq }
            }
            Frame::Invalid(invalid) => self.quarantine(invalid, now).await,
        }
    }

    /// Keeps a bad line in quarantine, answers NAK once it is stored, and
    /// raises a `device_fault` at most once an hour for the device (or, when
    /// the line did not say which, for the port).
    async fn quarantine(&mut self, invalid: Invalid, now: DateTime<Utc>) -> Ticket {
        let source = self.source;
        let c = &source.config;
        events::SerialLineRejected {
            source_id: &c.id,
            reason: invalid.reason,
            detail: &invalid.detail,
        }
        .emit(&source.metrics);
        let (tenant, device_id) = match &invalid.account {
            Some(account) => source.locate(None, None, account),
            None => (c.tenant.clone(), c.id.clone()),
        };
        let entry = QuarantineEntry {
            received_at: now,
            source_kind: SourceKind::Serial,
            source_id: c.id.clone(),
            reference: c.path.display().to_string(),
            tenant: Some(tenant.clone()),
            device_id: invalid.account.as_ref().map(|_| device_id.clone()),
            reason: invalid.reason.as_str().to_owned(),
            detail: invalid.detail.clone(),
            raw: invalid.raw.clone(),
        };
        let pending = match source.ingest.enqueue_quarantine(entry).await {
            Ok(p) => p,
            Err(e) => Pending::ready(Err(e)),
        };
        if self.faults.admit(&tenant, &device_id, now) {
            events::DeviceFaultRaised {
                tenant: &tenant,
                device_id: &device_id,
                reason: invalid.reason.as_str(),
            }
            .emit(&source.metrics);
            let alarm = device_fault_alarm(
                &FaultInput {
                    tenant: &tenant,
                    device_id: &device_id,
                    source_id: &c.id,
                    reason: invalid.reason.as_str(),
                    explanation: &invalid.detail,
                    raw: &invalid.raw,
                },
                now,
            );
            // Stored like any other alarm; nobody waits for it.
            if let Err(e) = source.ingest.enqueue_alarm(alarm).await {
                tracing::error!(error = %e, tenant, device_id, "cannot queue device_fault alarm");
            }
        }
        let nak = Answer::Nak {
            unit: invalid.account.filter(|_| invalid.seq.is_some()),
            seq: invalid.seq,
            reason: invalid.reason,
        };
        Ticket::Quarantined { pending, nak }
    }
}

/// Writes answers in line order, each once its line has committed.
async fn answer<W, F>(
    mut queue: mpsc::Receiver<Ticket>,
    mut sink: FramedWrite<W, LineCodec<F>>,
    source_id: String,
) where
    W: tokio::io::AsyncWrite + Unpin,
    F: LineFormat,
{
    while let Some(ticket) = queue.recv().await {
        let answer = match ticket {
            Ticket::Ready(answer) => Some(answer),
            Ticket::Alarm { pending, unit, seq } => match pending.wait().await {
                Ok(outcome) => Some(Answer::Ack {
                    unit,
                    seq,
                    alarm_id: Some(outcome.alarm_id()),
                }),
                Err(e) => {
                    tracing::warn!(source = %source_id, error = %e, "line not stored: no answer, the sender will re-send");
                    None
                }
            },
            Ticket::Quarantined { pending, nak } => match pending.wait().await {
                Ok(()) => Some(nak),
                Err(e) => {
                    tracing::warn!(source = %source_id, error = %e, "bad line not quarantined: no answer");
                    None
                }
            },
        };
        let Some(answer) = answer else { continue };
        // Flush when nothing else is ready, so that answers to a burst of
        // pipelined lines go out together.
        let written = if queue.is_empty() {
            sink.send(answer).await
        } else {
            sink.feed(answer).await
        };
        if let Err(e) = written {
            tracing::debug!(source = %source_id, error = %e, "cannot write answer; the port is gone");
            return;
        }
    }
    let _ = sink.flush().await;
}
