//! Counters the gateway keeps about itself.
//!
//! Every counter is a plain atomic so that the hot path pays one relaxed
//! increment. [`Metrics::render`] writes them in the Prometheus text format
//! for the API's `/metrics` endpoint; tests read them directly.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::source::mqtt::payload::RejectReason;
use crate::source::serial::frame::InvalidReason;

/// The gateway's counters. Shared behind an `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// PUBLISH packets taken from MQTT sources (alarms, heartbeats, status).
    pub mqtt_messages: AtomicU64,
    /// Alarms committed as new rows.
    pub alarms_stored: AtomicU64,
    /// Re-sends recognised as an alarm already stored.
    pub alarms_duplicate: AtomicU64,
    /// Heartbeats received.
    pub heartbeats: AtomicU64,
    /// Retained messages replayed by the broker and not taken as new signals.
    pub retained_ignored: AtomicU64,
    /// Payloads and topics rejected, by reason (indexed by `RejectReason as usize`).
    pub rejected: [AtomicU64; RejectReason::COUNT],
    /// Rows written to the quarantine table.
    pub quarantined: AtomicU64,
    /// `device_fault` alarms raised for devices that sent broken payloads.
    pub device_faults_raised: AtomicU64,
    /// Optional fields dropped because their value was bad.
    pub fields_dropped: AtomicU64,
    /// Group-commit transactions committed.
    pub store_commits: AtomicU64,
    /// Group-commit transactions that failed (their senders got no answer).
    pub store_commit_failures: AtomicU64,
    /// Delivery attempts made, whatever their outcome.
    pub deliveries_attempted: AtomicU64,
    /// Attempts a provider accepted.
    pub deliveries_accepted: AtomicU64,
    /// Attempts that failed (retried, failed over or dead-lettered).
    pub deliveries_failed: AtomicU64,
    /// Claimed rows left undelivered because their lease ran short while
    /// they waited for a delivery slot (they are claimed again).
    pub claims_lapsed: AtomicU64,
    /// Alarms handed to the next provider in their chain.
    pub failovers: AtomicU64,
    /// Alarms whose every deadline passed without acceptance.
    pub chains_exhausted: AtomicU64,
    /// Alarms every provider rejected.
    pub dead_letters: AtomicU64,
    /// Progress reports (answered/resolved) recorded.
    pub progress_reports: AtomicU64,
    /// Sequence numbers devices skipped (messages lost before the gateway).
    pub seq_gaps: AtomicU64,
    /// Skipped sequence numbers that arrived late after all.
    pub seq_gaps_filled: AtomicU64,
    /// Lines read from serial ports (signals, heartbeats, bad lines).
    pub serial_lines: AtomicU64,
    /// Serial lines rejected, by reason (indexed by `InvalidReason as usize`).
    pub serial_rejected: [AtomicU64; InvalidReason::COUNT],
    /// Serial ports lost or failing to open.
    pub serial_port_lost: AtomicU64,
    /// `comms_fail` alarms raised for ports down too long.
    pub comms_fails_raised: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// How many payloads were rejected for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        Metrics::get(&self.rejected[reason as usize])
    }

    /// All rejections, whatever the reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(Metrics::get).sum()
    }

    /// The counters in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let plain: [(&str, &str, &AtomicU64); 23] = [
            (
                "telegate_mqtt_messages_total",
                "MQTT PUBLISH packets received",
                &self.mqtt_messages,
            ),
            (
                "telegate_alarms_stored_total",
                "alarms committed to the store",
                &self.alarms_stored,
            ),
            (
                "telegate_alarms_duplicate_total",
                "re-sends answered as duplicates",
                &self.alarms_duplicate,
            ),
            (
                "telegate_heartbeats_total",
                "heartbeats received",
                &self.heartbeats,
            ),
            (
                "telegate_retained_ignored_total",
                "retained replays not taken as signals",
                &self.retained_ignored,
            ),
            (
                "telegate_quarantined_total",
                "rows written to quarantine",
                &self.quarantined,
            ),
            (
                "telegate_device_faults_raised_total",
                "device_fault alarms raised for broken input",
                &self.device_faults_raised,
            ),
            (
                "telegate_fields_dropped_total",
                "optional fields dropped for bad values",
                &self.fields_dropped,
            ),
            (
                "telegate_store_commits_total",
                "group-commit transactions committed",
                &self.store_commits,
            ),
            (
                "telegate_store_commit_failures_total",
                "group-commit transactions that failed",
                &self.store_commit_failures,
            ),
            (
                "telegate_deliveries_attempted_total",
                "delivery attempts made",
                &self.deliveries_attempted,
            ),
            (
                "telegate_deliveries_accepted_total",
                "delivery attempts accepted by a provider",
                &self.deliveries_accepted,
            ),
            (
                "telegate_deliveries_failed_total",
                "delivery attempts that failed",
                &self.deliveries_failed,
            ),
            (
                "telegate_claims_lapsed_total",
                "claimed outbox rows whose lease ran short before a delivery slot came free",
                &self.claims_lapsed,
            ),
            (
                "telegate_failovers_total",
                "alarms handed to the next provider",
                &self.failovers,
            ),
            (
                "telegate_chains_exhausted_total",
                "alarms past every deadline without acceptance",
                &self.chains_exhausted,
            ),
            (
                "telegate_dead_letters_total",
                "alarms every provider rejected",
                &self.dead_letters,
            ),
            (
                "telegate_progress_reports_total",
                "answered/resolved reports recorded",
                &self.progress_reports,
            ),
            (
                "telegate_seq_gaps_total",
                "sequence numbers devices skipped",
                &self.seq_gaps,
            ),
            (
                "telegate_seq_gaps_filled_total",
                "skipped sequence numbers that arrived late",
                &self.seq_gaps_filled,
            ),
            (
                "telegate_serial_lines_total",
                "lines read from serial ports",
                &self.serial_lines,
            ),
            (
                "telegate_serial_port_lost_total",
                "serial ports lost or failing to open",
                &self.serial_port_lost,
            ),
            (
                "telegate_comms_fails_raised_total",
                "comms_fail alarms raised for ports down too long",
                &self.comms_fails_raised,
            ),
        ];
        for (name, help, counter) in plain {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                Metrics::get(counter)
            );
        }
        by_reason(
            &mut out,
            "telegate_rejected_total",
            "payloads rejected, by reason",
            RejectReason::ALL.map(|r| (r.as_str(), self.rejected(r))),
        );
        by_reason(
            &mut out,
            "telegate_serial_rejected_total",
            "serial lines rejected, by reason",
            InvalidReason::ALL
                .map(|r| (r.as_str(), Metrics::get(&self.serial_rejected[r as usize]))),
        );
        out
    }
}

/// Writes a counter with a `reason` label.
fn by_reason<const N: usize>(out: &mut String, name: &str, help: &str, counts: [(&str, u64); N]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, count) in counts {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {count}");
    }
}
