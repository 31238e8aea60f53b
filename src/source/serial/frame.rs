//! What the serial line formats decode to and answer with, and the line
//! splitting they share.
//!
//! Every format is line based: a terminator ends a line, a line longer than
//! the format allows is discarded up to the next terminator (and reported
//! once), and blank lines are skipped. Decoding never fails on input: a line
//! that cannot be read becomes [`Frame::Invalid`] with a reason, so one bad
//! line never stops the port.

use std::fmt;

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use tokio_util::codec::{AnyDelimiterCodec, Decoder};

use crate::model::AlarmId;
use crate::source::code::Code;

/// ACK, the answer to a line that was stored (or needs no storing).
pub const ACK: u8 = 0x06;
/// NAK, the answer to a line that cannot be read.
pub const NAK: u8 = 0x15;
/// DC4, the line terminator of receiver automation output.
pub const DC4: u8 = 0x14;

/// One decoded line.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// An alarm signal to store.
    Signal(Signal),
    /// A keep-alive: answered at once, nothing stored.
    Heartbeat(Heartbeat),
    /// A line that cannot be read: answered NAK and quarantined.
    Invalid(Invalid),
}

/// An alarm signal as a line carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// Receiver number (`RR` of receiver output), when the line names one.
    pub receiver: Option<String>,
    /// Receiver line number (`L`), when the line names one.
    pub line: Option<String>,
    /// The panel account, or the unit id of a dispersed unit.
    pub account: String,
    /// The unit's sequence number (`telecare-line` only).
    pub seq: Option<u64>,
    pub code: Code,
    /// An explicit restore flag (the code may also say restore).
    pub restore: bool,
    pub zone: Option<u32>,
    /// The unit's clock, when it sent one.
    pub raised_at: Option<DateTime<Utc>>,
    pub battery_pct: Option<u8>,
    pub rssi: Option<i32>,
    /// Optional fields dropped because their value was bad.
    pub dropped: Vec<&'static str>,
    /// The line as received, without its terminator.
    pub raw: Vec<u8>,
}

impl Signal {
    /// A signal with only the fields every format has.
    pub fn new(account: String, code: Code, raw: Vec<u8>) -> Signal {
        Signal {
            receiver: None,
            line: None,
            account,
            seq: None,
            code,
            restore: false,
            zone: None,
            raised_at: None,
            battery_pct: None,
            rssi: None,
            dropped: Vec::new(),
            raw,
        }
    }
}

/// A keep-alive line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The unit and sequence number to answer, for formats that name them.
    pub unit: Option<String>,
    pub seq: Option<u64>,
}

/// Why a line could not be read (a metric label and quarantine reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// Longer than the format allows; discarded up to the next terminator.
    TooLong,
    /// Bytes outside printable ASCII.
    NotText,
    /// Not the shape the format defines.
    Malformed,
    /// A Contact ID checksum that does not add up.
    BadChecksum,
    /// A well-formed line of a kind this format does not decode.
    Unsupported,
}

impl InvalidReason {
    pub const COUNT: usize = 5;
    /// Every reason, in metric order.
    pub const ALL: [InvalidReason; InvalidReason::COUNT] = [
        InvalidReason::TooLong,
        InvalidReason::NotText,
        InvalidReason::Malformed,
        InvalidReason::BadChecksum,
        InvalidReason::Unsupported,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::TooLong => "line_too_long",
            InvalidReason::NotText => "not_text",
            InvalidReason::Malformed => "malformed",
            InvalidReason::BadChecksum => "bad_checksum",
            InvalidReason::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: InvalidReason,
    /// The explanation for a person.
    pub detail: String,
    /// The account or unit, when the line said which before it went wrong.
    pub account: Option<String>,
    /// The unit's sequence number, when readable (`telecare-line`).
    pub seq: Option<u64>,
    /// The line as received (for a line too long, its first bytes).
    pub raw: Vec<u8>,
}

impl Invalid {
    pub fn new(reason: InvalidReason, detail: impl Into<String>, raw: &[u8]) -> Invalid {
        Invalid {
            reason,
            detail: detail.into(),
            account: None,
            seq: None,
            raw: raw.to_vec(),
        }
    }
}

/// What the gateway answers a line with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Stored (or a re-send of a stored alarm), or a heartbeat.
    Ack {
        unit: Option<String>,
        seq: Option<u64>,
        alarm_id: Option<AlarmId>,
    },
    /// The line cannot be read.
    Nak {
        unit: Option<String>,
        seq: Option<u64>,
        reason: InvalidReason,
    },
}

/// A line from the splitter.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line without its terminator.
    Text(Bytes),
    /// The first bytes of a line longer than the limit; the rest is being
    /// discarded up to the next terminator.
    TooLong(Vec<u8>),
}

/// Splits bytes into lines at any of a format's terminators, with a length
/// limit, skipping blank lines (a CR LF after a DC4, a header LF).
#[derive(Debug)]
pub struct Lines {
    inner: AnyDelimiterCodec,
    max: usize,
}

impl Lines {
    pub fn new(terminators: &[u8], max: usize) -> Lines {
        Lines {
            inner: AnyDelimiterCodec::new_with_max_length(terminators.to_vec(), Vec::new(), max),
            max,
        }
    }

    /// The longest line accepted, in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The next complete line in `buf`, if there is one.
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Option<Line> {
        loop {
            match self.inner.decode(buf) {
                Ok(Some(line)) if is_blank(&line) => continue,
                Ok(Some(line)) => return Some(Line::Text(line)),
                Ok(None) => return None,
                Err(_) => {
                    let head = buf[..buf.len().min(self.max)].to_vec();
                    return Some(Line::TooLong(head));
                }
            }
        }
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0))
}

/// The line as text, when it is printable ASCII (spaces allowed).
pub fn printable(line: &[u8]) -> Option<&str> {
    if line.iter().all(|b| (0x20..=0x7e).contains(b)) {
        std::str::from_utf8(line).ok()
    } else {
        None
    }
}

/// The [`Invalid`] for a line with bytes outside printable ASCII.
pub fn not_text(line: &[u8]) -> Invalid {
    let at = line
        .iter()
        .position(|b| !(0x20..=0x7e).contains(b))
        .unwrap_or(0);
    Invalid::new(
        InvalidReason::NotText,
        format!(
            "byte 0x{:02x} at offset {at} is not printable ASCII",
            line.get(at).copied().unwrap_or(0)
        ),
        line,
    )
}

/// The [`Invalid`] for a line over the limit.
pub fn too_long(head: Vec<u8>, max: usize) -> Invalid {
    Invalid {
        reason: InvalidReason::TooLong,
        detail: format!("line longer than {max} bytes; discarded up to the next terminator"),
        account: None,
        seq: None,
        raw: head,
    }
}

/// Answers of the single-byte kind (receivers): ACK or NAK.
pub fn encode_byte_answer(answer: &Answer, dst: &mut BytesMut) {
    dst.extend_from_slice(match answer {
        Answer::Ack { .. } => &[ACK],
        Answer::Nak { .. } => &[NAK],
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut splitter = Lines::new(&[DC4, b'\r', b'\n'], max);
        let mut buf = BytesMut::from(input);
        std::iter::from_fn(|| splitter.next_line(&mut buf)).collect()
    }

    #[test]
    fn splits_at_every_terminator_and_skips_blank_lines() {
        let got = lines(b"\nabc\x14\r\ndef\r\n\x14ghi", 32);
        assert_eq!(
            got,
            vec![
                Line::Text(Bytes::from_static(b"abc")),
                Line::Text(Bytes::from_static(b"def"))
            ]
        );
    }

    #[test]
    fn a_long_line_is_reported_once_and_the_next_line_survives() {
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b"\x14good\x14");
        let got = lines(&input, 16);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(&got[0], Line::TooLong(head) if head.len() == 16));
        assert_eq!(got[1], Line::Text(Bytes::from_static(b"good")));
    }
}
