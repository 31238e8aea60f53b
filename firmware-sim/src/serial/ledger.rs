//! The ledger of a simulated port: every line offered, what waits to be written, which answers are owed,
//! and how an answer settles a line. It does no I/O and reads no clock: the driver passes the time in.
//!
//! Matching answers to lines:
//! - `surgard` and `contact-id` answers are bare ACK/NAK bytes, so they are matched by order. Every copy
//!   written (a line, a re-send, a heartbeat) owes one answer, and `owed` lists them in write order; an
//!   answer settles the oldest. An answer to a copy of a line that is already acknowledged is spent on that
//!   copy, so a late answer to a re-send never settles a newer line. To keep it so, no new line is written
//!   while `window` answers are owed. When the peer misses an answer (it read a line and then restarted,
//!   say), the owed list would stay ahead of the answers for good; so when the line has been quiet for
//!   `ack_timeout` and the oldest owed answer is `2 × ack_timeout` old, it is written off.
//! - `telecare-line` answers name the unit and `seq`, so they are matched by those. A `NAK - -` (a line the
//!   gateway could not read at all) settles the oldest line whose latest copy went out behind garbage.
//! - A NAK re-sends the line at once (up to [`MAX_IMMEDIATE_RESENDS`] NAKs in a row; after that it waits for
//!   the timeout); silence for `ack_timeout` after the latest copy re-sends it. A line is never dropped.
//! - Unplugging forgets the owed answers and the outbox (the peer of that pseudo-terminal is gone) but no
//!   line; replugging queues every unacknowledged line again.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::debug;

use super::lines::{parse_answer, Answer, ACK, NAK};
use super::{LineFormat, SentLine, SerialStats};

/// NAKs in a row for one line that are each followed by an immediate re-send; after that the line waits for
/// the timeout, so a peer that rejects everything does not get a tight loop.
pub const MAX_IMMEDIATE_RESENDS: u32 = 3;
/// The longest `telecare-line` answer kept; the rest of a longer one is cut (and it is then unreadable).
const MAX_ANSWER: usize = 512;
/// Heartbeats of `telecare-line` remembered while waiting for their ACK.
const MAX_PENDING_HEARTBEATS: usize = 1_024;

/// A line the driver made, to offer.
#[derive(Clone, Debug)]
pub struct NewLine {
    pub record: SentLine,
    /// The line with its terminator.
    pub bytes: Vec<u8>,
    /// The unit number and `seq` (`telecare-line`).
    pub key: Option<(u32, u32)>,
    /// Garbage to write before its first copy.
    pub garbage: Option<Vec<u8>>,
}

/// One offered line.
struct Entry {
    record: SentLine,
    bytes: Vec<u8>,
    key: Option<(u32, u32)>,
    /// Written before the first copy, then dropped.
    garbage: Option<Vec<u8>>,
    /// When its latest copy was written completely.
    last_write: Option<Instant>,
    /// A copy waits in the outbox (or is being written).
    queued: bool,
    naks_in_row: u32,
}

/// What a chunk of the outbox carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carries {
    /// A copy of entry `entry`, with a garbage burst before it when `garbled`.
    Line { entry: usize, garbled: bool },
    /// A heartbeat; `telecare-line` ones have a unit and `seq` to match the ACK.
    Heartbeat { key: Option<(u32, u32)> },
}

struct Chunk {
    bytes: Vec<u8>,
    /// Bytes of it already written.
    written: usize,
    carries: Carries,
}

/// An answer owed by the peer of a `surgard` or `contact-id` port.
#[derive(Clone, Copy, Debug)]
struct Owed {
    /// The entry, or `None` for a heartbeat.
    entry: Option<usize>,
    /// When the copy was written.
    at: Instant,
}

/// The ledger; see the module header.
pub struct Ledger {
    format: LineFormat,
    window: usize,
    ack_timeout: Duration,
    /// Every line offered, in order.
    entries: Vec<Entry>,
    /// Offered lines not yet acknowledged, oldest first.
    unacked: BTreeSet<usize>,
    /// `surgard`, `contact-id`: the answers owed, in write order.
    owed: VecDeque<Owed>,
    /// `telecare-line`: unacknowledged lines by unit number and `seq`.
    by_key: HashMap<(u32, u32), usize>,
    /// `telecare-line`: heartbeats waiting for their ACK, oldest first.
    heartbeats: VecDeque<(u32, u32)>,
    /// `telecare-line`: lines whose latest copy went out behind garbage and is not answered yet.
    garbled: VecDeque<usize>,
    /// What waits to be written, in order.
    outbox: VecDeque<Chunk>,
    /// Whether a port is open.
    connected: bool,
    /// When the latest answer came from the current port.
    last_answer: Option<Instant>,
    /// A `telecare-line` answer not yet ended.
    partial: Vec<u8>,
    /// The counters, `waiting` apart (derived).
    stats: SerialStats,
}

impl Ledger {
    pub fn new(format: LineFormat, window: usize, ack_timeout: Duration) -> Ledger {
        Ledger {
            format,
            window: window.max(1),
            ack_timeout,
            entries: Vec::new(),
            unacked: BTreeSet::new(),
            owed: VecDeque::new(),
            by_key: HashMap::new(),
            heartbeats: VecDeque::new(),
            garbled: VecDeque::new(),
            outbox: VecDeque::new(),
            connected: false,
            last_answer: None,
            partial: Vec::new(),
            stats: SerialStats::default(),
        }
    }

    /// Answers come back as bare ACK/NAK bytes, matched by order.
    fn by_order(&self) -> bool {
        self.format != LineFormat::TelecareLine
    }

    pub fn stats(&self) -> SerialStats {
        SerialStats {
            waiting: self.unacked.len() as u64,
            ..self.stats
        }
    }

    /// Lines offered so far.
    pub fn offered(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn records(&self) -> Vec<SentLine> {
        self.entries.iter().map(|e| e.record.clone()).collect()
    }

    /// Counts a deliberate unplug.
    pub fn count_unplug(&mut self) {
        self.stats.unplugs += 1;
    }

    /// Whether the window has room for a new line.
    pub fn room(&self) -> bool {
        let in_flight = if self.by_order() {
            self.unacked.len().max(self.owed.len() + self.outbox.len())
        } else {
            self.unacked.len()
        };
        in_flight < self.window
    }

    /// Takes a new line into the window; queues it when a port is open.
    pub fn offer(&mut self, line: NewLine) {
        let index = self.entries.len();
        if let Some(key) = line.key {
            self.by_key.insert(key, index);
        }
        self.entries.push(Entry {
            record: line.record,
            bytes: line.bytes,
            key: line.key,
            garbage: line.garbage,
            last_write: None,
            queued: false,
            naks_in_row: 0,
        });
        self.unacked.insert(index);
        if self.connected {
            self.queue(index);
        }
    }

    /// Queues a copy of entry `index`, unless one is queued already or it is acknowledged.
    fn queue(&mut self, index: usize) {
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        if entry.queued || entry.record.acked_at.is_some() {
            return;
        }
        entry.queued = true;
        let (mut bytes, garbled) = match &entry.garbage {
            Some(garbage) if entry.record.sends == 0 => (garbage.clone(), true),
            _ => (Vec::new(), false),
        };
        bytes.extend_from_slice(&entry.bytes);
        self.outbox.push_back(Chunk {
            bytes,
            written: 0,
            carries: Carries::Line {
                entry: index,
                garbled,
            },
        });
    }

    /// Whether a heartbeat may be queued: a port is open and no other heartbeat waits unwritten (so
    /// heartbeats due faster than the baud rate allows cannot pile up).
    pub fn wants_heartbeat(&self) -> bool {
        self.connected
            && !self.outbox.iter().any(|chunk| {
                chunk.written == 0 && matches!(chunk.carries, Carries::Heartbeat { .. })
            })
    }

    /// Queues a heartbeat (with its terminator) when a port is open; `key` is its unit number and `seq` on
    /// `telecare-line`.
    pub fn queue_heartbeat(&mut self, bytes: Vec<u8>, key: Option<(u32, u32)>) {
        if self.connected {
            self.outbox.push_back(Chunk {
                bytes,
                written: 0,
                carries: Carries::Heartbeat { key },
            });
        }
    }

    /// The next bytes to write, at most `max`.
    pub fn next_bytes(&self, max: usize) -> Option<&[u8]> {
        if !self.connected {
            return None;
        }
        let chunk = self.outbox.front()?;
        let rest = chunk.bytes.get(chunk.written..)?;
        Some(&rest[..rest.len().min(max)])
    }

    /// `n` bytes of the outbox were written at `now`.
    pub fn wrote(&mut self, n: usize, now: Instant, wall: SystemTime) {
        let Some(chunk) = self.outbox.front_mut() else {
            return;
        };
        chunk.written += n;
        if chunk.written < chunk.bytes.len() {
            return;
        }
        let Some(chunk) = self.outbox.pop_front() else {
            return;
        };
        match chunk.carries {
            Carries::Line { entry, garbled } => {
                let Some(e) = self.entries.get_mut(entry) else {
                    return;
                };
                e.queued = false;
                e.record.sends += 1;
                e.last_write = Some(now);
                if e.record.sends == 1 {
                    e.record.first_sent = wall;
                    self.stats.sent += 1;
                } else {
                    self.stats.resends += 1;
                }
                if garbled {
                    e.garbage = None;
                    self.stats.garbage_bursts += 1;
                    if !self.by_order() {
                        self.garbled.push_back(entry);
                    }
                }
                if self.by_order() {
                    self.owed.push_back(Owed {
                        entry: Some(entry),
                        at: now,
                    });
                }
            }
            Carries::Heartbeat { key } => {
                self.stats.heartbeats += 1;
                if self.by_order() {
                    self.owed.push_back(Owed {
                        entry: None,
                        at: now,
                    });
                } else if let Some(key) = key {
                    if self.heartbeats.len() == MAX_PENDING_HEARTBEATS {
                        self.heartbeats.pop_front();
                    }
                    self.heartbeats.push_back(key);
                }
            }
        }
    }

    /// Bytes the peer wrote.
    pub fn received(&mut self, bytes: &[u8], now: Instant, wall: SystemTime) {
        if self.by_order() {
            for &b in bytes {
                match b {
                    ACK => self.answer_in_order(true, now, wall),
                    NAK => self.answer_in_order(false, now, wall),
                    other => debug!(byte = other, "a byte that is neither ACK nor NAK ignored"),
                }
            }
            return;
        }
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                self.answer_line(&line, now, wall);
            } else if self.partial.len() < MAX_ANSWER {
                self.partial.push(b);
            }
        }
    }

    fn answer_in_order(&mut self, ack: bool, now: Instant, wall: SystemTime) {
        self.last_answer = Some(now);
        if !ack {
            self.stats.naks += 1;
        }
        let Some(owed) = self.owed.pop_front() else {
            debug!(ack, "an answer with none owed ignored");
            return;
        };
        match owed.entry {
            None if ack => self.stats.heartbeat_acks += 1,
            None => debug!("a heartbeat was answered NAK"),
            Some(entry) if ack => self.acknowledge(entry, None, wall),
            Some(entry) => self.rejected(entry),
        }
    }

    fn answer_line(&mut self, line: &[u8], now: Instant, wall: SystemTime) {
        let Ok(text) = std::str::from_utf8(line) else {
            debug!("an answer that is not UTF-8 ignored");
            return;
        };
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return;
        }
        self.last_answer = Some(now);
        match parse_answer(text) {
            None => debug!(answer = text, "an unreadable answer ignored"),
            Some(Answer::Ack {
                unit,
                seq,
                alarm_id,
            }) => {
                let Some(unit) = unit_number(unit) else {
                    debug!(answer = text, "an answer for a unit of no one here ignored");
                    return;
                };
                if alarm_id.is_none() {
                    if let Some(at) = self.heartbeats.iter().position(|k| *k == (unit, seq)) {
                        self.heartbeats.remove(at);
                        self.stats.heartbeat_acks += 1;
                        return;
                    }
                }
                match self.by_key.get(&(unit, seq)) {
                    Some(&entry) => self.acknowledge(entry, alarm_id.map(str::to_owned), wall),
                    None => debug!(answer = text, "an ACK for nothing outstanding ignored"),
                }
            }
            Some(Answer::Nak { unit, seq }) => {
                self.stats.naks += 1;
                match (unit.and_then(unit_number), seq) {
                    (Some(unit), Some(seq)) => {
                        if let Some(&entry) = self.by_key.get(&(unit, seq)) {
                            self.garbled.retain(|g| *g != entry);
                            self.rejected(entry);
                        } else if let Some(at) =
                            self.heartbeats.iter().position(|k| *k == (unit, seq))
                        {
                            self.heartbeats.remove(at);
                            debug!(answer = text, "a heartbeat was answered NAK");
                        }
                    }
                    _ => match self.garbled.pop_front() {
                        Some(entry) => self.rejected(entry),
                        None => debug!(answer = text, "a NAK for a line that was not garbled"),
                    },
                }
            }
        }
    }

    /// Settles entry `index` as acknowledged (unless it is already).
    fn acknowledge(&mut self, index: usize, alarm_id: Option<String>, wall: SystemTime) {
        if !self.unacked.remove(&index) {
            return;
        }
        self.stats.acked += 1;
        self.garbled.retain(|g| *g != index);
        // A copy queued but not started is not needed any more.
        self.outbox.retain(|chunk| {
            chunk.written > 0
                || !matches!(chunk.carries, Carries::Line { entry, .. } if entry == index)
        });
        let still_queued = self
            .outbox
            .iter()
            .any(|chunk| matches!(chunk.carries, Carries::Line { entry, .. } if entry == index));
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        entry.record.acked_at = Some(wall);
        entry.record.alarm_id = alarm_id;
        entry.queued = still_queued;
        if let Some(key) = entry.key {
            self.by_key.remove(&key);
        }
    }

    /// Entry `index` was answered NAK: re-send it at once, unless a copy is already on its way or it was
    /// rejected too often in a row.
    fn rejected(&mut self, index: usize) {
        if !self.unacked.contains(&index) {
            return;
        }
        let newer_copy_owed = self.owed.iter().any(|o| o.entry == Some(index));
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        entry.naks_in_row += 1;
        if entry.queued || newer_copy_owed || entry.naks_in_row > MAX_IMMEDIATE_RESENDS {
            return;
        }
        if self.connected {
            self.queue(index);
        }
    }

    /// Writes off owed answers that will not come (see the module header).
    pub fn expire(&mut self, now: Instant) {
        let quiet = self
            .last_answer
            .is_none_or(|at| now >= at + self.ack_timeout);
        if !quiet {
            return;
        }
        while let Some(owed) = self.owed.front() {
            if now < owed.at + self.ack_timeout * 2 {
                break;
            }
            debug!(line = ?owed.entry, "an answer that never came written off");
            self.owed.pop_front();
        }
    }

    /// Queues a re-send of every line whose latest copy has gone unanswered for `ack_timeout`.
    pub fn queue_resends(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        let due: Vec<usize> = self
            .unacked
            .iter()
            .copied()
            .filter(|&i| {
                self.entries.get(i).is_some_and(|e| {
                    !e.queued && e.last_write.is_some_and(|at| now >= at + self.ack_timeout)
                })
            })
            .collect();
        for index in due {
            self.queue(index);
        }
    }

    /// When [`Ledger::expire`] or [`Ledger::queue_resends`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        let resend = self
            .unacked
            .iter()
            .filter_map(|&i| self.entries.get(i))
            .filter(|e| !e.queued)
            .filter_map(|e| e.last_write)
            .min()
            .map(|at| at + self.ack_timeout);
        let expiry = self.owed.front().map(|owed| {
            let old = owed.at + self.ack_timeout * 2;
            match self.last_answer {
                Some(at) => old.max(at + self.ack_timeout),
                None => old,
            }
        });
        match (resend, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The port was closed: the answers owed and the outbox are gone with it; the lines stay.
    pub fn unplugged(&mut self) {
        self.connected = false;
        self.outbox.clear();
        self.owed.clear();
        self.garbled.clear();
        self.heartbeats.clear();
        self.partial.clear();
        self.last_answer = None;
        for entry in &mut self.entries {
            entry.queued = false;
        }
    }

    /// A port is open: every unacknowledged line is queued, oldest first.
    pub fn plugged(&mut self) {
        self.connected = true;
        let waiting: Vec<usize> = self.unacked.iter().copied().collect();
        for index in waiting {
            self.queue(index);
        }
    }
}

/// The number of a unit id `unit-NNNN`.
fn unit_number(unit: &str) -> Option<u32> {
    let digits = unit.strip_prefix("unit-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(index: u64, text: &str, key: Option<(u32, u32)>, garbage: bool) -> NewLine {
        NewLine {
            record: SentLine {
                index,
                text: text.to_owned(),
                account: "0001".to_owned(),
                seq: key.map(|k| k.1),
                code: "1101".to_owned(),
                critical: true,
                first_sent: SystemTime::UNIX_EPOCH,
                acked_at: None,
                alarm_id: None,
                sends: 0,
            },
            bytes: format!("{text}\n").into_bytes(),
            key,
            garbage: garbage.then(|| b"xx".to_vec()),
        }
    }

    /// Writes everything in the outbox at `now`; returns what was written.
    fn flush(ledger: &mut Ledger, now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(bytes) = ledger.next_bytes(usize::MAX) {
            let bytes = bytes.to_vec();
            out.extend_from_slice(&bytes);
            ledger.wrote(bytes.len(), now, SystemTime::now());
        }
        out
    }

    const TIMEOUT: Duration = Duration::from_secs(4);

    #[test]
    fn answers_in_order_settle_the_oldest_copy() {
        let t0 = Instant::now();
        let mut ledger = Ledger::new(LineFormat::Surgard, 1, TIMEOUT);
        ledger.plugged();
        ledger.offer(line(0, "A", None, false));
        assert!(!ledger.room());
        assert_eq!(flush(&mut ledger, t0), b"A\n");
        // Silence: re-sent after the timeout.
        ledger.queue_resends(t0 + TIMEOUT);
        assert_eq!(flush(&mut ledger, t0 + TIMEOUT), b"A\n");
        // The late answer to the first copy settles A; the second copy still owes its answer, so B waits.
        ledger.received(&[ACK], t0 + TIMEOUT, SystemTime::now());
        assert_eq!(ledger.stats().acked, 1);
        assert!(!ledger.room());
        ledger.received(&[ACK], t0 + TIMEOUT, SystemTime::now());
        assert!(ledger.room());
        ledger.offer(line(1, "B", None, false));
        assert_eq!(flush(&mut ledger, t0 + TIMEOUT), b"B\n");
        ledger.received(&[NAK], t0 + TIMEOUT, SystemTime::now());
        assert_eq!(
            flush(&mut ledger, t0 + TIMEOUT),
            b"B\n",
            "NAK re-sends at once"
        );
        ledger.received(&[ACK], t0 + TIMEOUT, SystemTime::now());
        let stats = ledger.stats();
        assert_eq!(
            (
                stats.sent,
                stats.acked,
                stats.naks,
                stats.resends,
                stats.waiting
            ),
            (2, 2, 1, 2, 0)
        );
    }

    #[test]
    fn answers_that_never_come_are_written_off_after_a_quiet_spell() {
        let t0 = Instant::now();
        let mut ledger = Ledger::new(LineFormat::ContactId, 1, TIMEOUT);
        ledger.plugged();
        ledger.offer(line(0, "A", None, false));
        flush(&mut ledger, t0);
        let t1 = t0 + Duration::from_secs(1);
        ledger.queue_resends(t1 + TIMEOUT);
        flush(&mut ledger, t1);
        // The peer lost the first copy and answers the second: A is settled, one answer stays owed.
        ledger.received(&[ACK], t1, SystemTime::now());
        assert!(!ledger.room());
        ledger.expire(t1 + TIMEOUT);
        assert!(!ledger.room(), "not yet two timeouts old");
        assert_eq!(ledger.next_deadline(), Some(t1 + TIMEOUT * 2));
        ledger.expire(t1 + TIMEOUT * 2);
        assert!(ledger.room());
    }

    #[test]
    fn garbled_lines_and_unplugs_keep_every_line() {
        let t0 = Instant::now();
        let mut ledger = Ledger::new(LineFormat::TelecareLine, 4, TIMEOUT);
        ledger.offer(line(0, "ALARM unit-0001 1 fall", Some((1, 1)), true));
        assert_eq!(
            ledger.next_bytes(100),
            None,
            "nothing written while unplugged"
        );
        ledger.plugged();
        ledger.offer(line(1, "ALARM unit-0002 1 MA", Some((2, 1)), false));
        assert_eq!(
            flush(&mut ledger, t0),
            b"xxALARM unit-0001 1 fall\nALARM unit-0002 1 MA\n"
        );
        ledger.received(
            b"NAK - - not_text\nACK unit-0002 1 a-2\n",
            t0,
            SystemTime::now(),
        );
        assert_eq!(flush(&mut ledger, t0), b"ALARM unit-0001 1 fall\n");
        ledger.unplugged();
        ledger.count_unplug();
        ledger.plugged();
        assert_eq!(flush(&mut ledger, t0), b"ALARM unit-0001 1 fall\n");
        ledger.received(b"ACK unit-0001 1 a-1\r\n", t0, SystemTime::now());
        let records = ledger.records();
        assert_eq!(records[0].alarm_id.as_deref(), Some("a-1"));
        assert_eq!(records[0].sends, 3);
        assert_eq!(records[1].alarm_id.as_deref(), Some("a-2"));
        let stats = ledger.stats();
        assert_eq!(
            (
                stats.sent,
                stats.acked,
                stats.naks,
                stats.resends,
                stats.garbage_bursts,
                stats.unplugs
            ),
            (2, 2, 1, 2, 1, 1)
        );
    }

    #[test]
    fn unit_numbers_are_read_strictly() {
        assert_eq!(unit_number("unit-0001"), Some(1));
        assert_eq!(unit_number("unit-12345"), Some(12_345));
        for bad in ["unit-", "unit-+1", "unit-1a", "device-1", "0001"] {
            assert_eq!(unit_number(bad), None, "{bad}");
        }
    }
}
