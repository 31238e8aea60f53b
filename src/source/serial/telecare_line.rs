//! `telecare-line`: the line protocol of dispersed units on a serial line
//! (a stable contract, specified in the README).
//!
//! ASCII lines ended by LF (a CR before it is ignored), at most 256 bytes,
//! fields separated by spaces:
//! - unit → gateway: `ALARM <unit> <seq> <code> [key=value …]` and
//!   `HEARTBEAT <unit> <seq>`. `<unit>` is 1–64 characters of
//!   `[A-Za-z0-9._-]`; `<seq>` is 0–4294967295 and the same on every re-send;
//!   `<code>` is a Contact ID qualifier and event (`1101`), a SIA code (`MA`)
//!   or an event name (`fall`). Optional keys: `ts` (RFC 3339), `zone`,
//!   `battery` (0–100), `rssi` (dBm), `restore` (`1` or `0`). Unknown keys
//!   are ignored; a key with a bad value is dropped and the alarm kept.
//! - gateway → unit: `ACK <unit> <seq> <alarm_id>` once stored (a re-send
//!   gets the same id), `ACK <unit> <seq>` for a heartbeat,
//!   `NAK <unit> <seq> <reason>` for a line that cannot be accepted, with
//!   `-` for a unit or seq it could not read. Nothing when the gateway
//!   cannot store: the unit sends again.

use bytes::BytesMut;
use chrono::{DateTime, Utc};

use super::codec::{LineCodec, LineFormat};
use super::frame::{not_text, printable, Answer, Frame, Heartbeat, Invalid, InvalidReason, Signal};
use crate::source::code::Code;
use crate::source::mqtt::payload::valid_segment;

/// The telecare unit line protocol.
#[derive(Debug)]
pub struct TelecareLine;

/// A codec for the telecare unit line protocol.
pub type TelecareLineCodec = LineCodec<TelecareLine>;

impl LineFormat for TelecareLine {
    const NAME: &'static str = "telecare-line";
    const TERMINATORS: &'static [u8] = b"\n\r";
    const MAX_LINE: usize = 256;

    fn parse(line: &[u8]) -> Frame {
        match parse(line) {
            Ok(frame) => frame,
            Err(invalid) => Frame::Invalid(invalid),
        }
    }

    fn encode(answer: &Answer, dst: &mut BytesMut) {
        let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_owned());
        let seq = |s: &Option<u64>| s.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let line = match answer {
            Answer::Ack {
                unit,
                seq: n,
                alarm_id: Some(id),
            } => format!("ACK {} {} {id}\n", dash(unit), seq(n)),
            Answer::Ack {
                unit,
                seq: n,
                alarm_id: None,
            } => format!("ACK {} {}\n", dash(unit), seq(n)),
            Answer::Nak {
                unit,
                seq: n,
                reason,
            } => format!("NAK {} {} {reason}\n", dash(unit), seq(n)),
        };
        dst.extend_from_slice(line.as_bytes());
    }
}

fn parse(raw: &[u8]) -> Result<Frame, Invalid> {
    let text = printable(raw).ok_or_else(|| not_text(raw))?;
    let malformed = |detail: &str| Invalid::new(InvalidReason::Malformed, detail, raw);
    let mut fields = text.split_ascii_whitespace();
    let kind = fields.next().unwrap_or("");
    if kind != "ALARM" && kind != "HEARTBEAT" {
        return Err(malformed("a line starts with ALARM or HEARTBEAT"));
    }
    let unit = fields
        .next()
        .filter(|u| valid_segment(u))
        .ok_or_else(|| malformed("unit must be 1-64 characters of [A-Za-z0-9._-]"))?;
    let with_unit = |mut invalid: Invalid, seq: Option<u64>| {
        invalid.account = Some(unit.to_owned());
        invalid.seq = seq;
        invalid
    };
    let seq = fields
        .next()
        .and_then(|s| {
            s.parse::<u32>()
                .ok()
                .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(u64::from)
        .ok_or_else(|| with_unit(malformed("seq must be a whole number 0-4294967295"), None))?;
    if kind == "HEARTBEAT" {
        return Ok(Frame::Heartbeat(Heartbeat {
            unit: Some(unit.to_owned()),
            seq: Some(seq),
        }));
    }
    let code = fields.next().and_then(Code::parse_any).ok_or_else(|| {
        with_unit(
            malformed(
                "code must be a Contact ID code (1101), a SIA code (MA) or an event name (fall)",
            ),
            Some(seq),
        )
    })?;
    let mut signal = Signal::new(unit.to_owned(), code, raw.to_vec());
    signal.seq = Some(seq);
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            return Err(with_unit(
                malformed("fields after the code are key=value"),
                Some(seq),
            ));
        };
        let ok = match key {
            "ts" => set(&mut signal.raised_at, parse_time(value)),
            "zone" => set(&mut signal.zone, value.parse().ok()),
            "battery" => set(
                &mut signal.battery_pct,
                value.parse().ok().filter(|p| *p <= 100),
            ),
            "rssi" => set(&mut signal.rssi, value.parse().ok()),
            "restore" => match value {
                "1" => {
                    signal.restore = true;
                    true
                }
                "0" => true,
                _ => false,
            },
            _ => true,
        };
        if !ok {
            signal.dropped.push(match key {
                "ts" => "ts",
                "zone" => "zone",
                "battery" => "battery",
                "rssi" => "rssi",
                _ => "restore",
            });
        }
    }
    Ok(Frame::Signal(signal))
}

/// Sets a field when the value parsed; false when it did not.
fn set<T>(field: &mut Option<T>, value: Option<T>) -> bool {
    let ok = value.is_some();
    if ok {
        *field = value;
    }
    ok
}

fn parse_time(value: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::model::AlarmId;
    use crate::taxonomy::Qualifier;

    fn decode_all(input: &[u8]) -> Vec<Frame> {
        let mut codec = TelecareLineCodec::new();
        let mut buf = BytesMut::from(input);
        std::iter::from_fn(|| codec.decode(&mut buf).unwrap()).collect()
    }

    #[test]
    fn decodes_alarms_in_all_three_code_forms_with_options() {
        let frames = decode_all(
            b"ALARM unit-1 7 1101 zone=3 battery=80 rssi=-70 ts=2026-11-22T10:15:30.123Z\r\n\
              ALARM unit-1 8 MA\nALARM unit-2 1 fall restore=1\n",
        );
        let signals: Vec<&Signal> = frames
            .iter()
            .map(|f| match f {
                Frame::Signal(s) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(signals.len(), 3);
        assert_eq!(signals[0].account, "unit-1");
        assert_eq!(signals[0].seq, Some(7));
        assert_eq!(
            signals[0].code,
            Code::ContactId {
                qualifier: Qualifier::New,
                event: 101
            }
        );
        assert_eq!(signals[0].zone, Some(3));
        assert_eq!(signals[0].battery_pct, Some(80));
        assert_eq!(signals[0].rssi, Some(-70));
        assert_eq!(
            signals[0].raised_at.map(crate::model::wire_time).as_deref(),
            Some("2026-11-22T10:15:30.123Z")
        );
        assert_eq!(signals[1].code, Code::Sia("MA".into()));
        assert!(signals[2].restore);
    }

    #[test]
    fn bad_optional_values_are_dropped_and_the_alarm_kept() {
        let frames = decode_all(b"ALARM u 1 fall battery=101 ts=yesterday colour=red\n");
        let [Frame::Signal(s)] = frames.as_slice() else {
            panic!("{frames:?}")
        };
        assert_eq!(s.battery_pct, None);
        assert_eq!(s.dropped, vec!["battery", "ts"]);
    }

    #[test]
    fn heartbeats_name_their_unit() {
        assert_eq!(
            decode_all(b"HEARTBEAT unit-9 44\n"),
            vec![Frame::Heartbeat(Heartbeat {
                unit: Some("unit-9".into()),
                seq: Some(44)
            })]
        );
    }

    #[test]
    fn unreadable_lines_say_as_much_as_they_can() {
        let cases: &[(&[u8], Option<&str>, Option<u64>)] = &[
            (b"PING", None, None),
            (b"ALARM", None, None),
            (b"ALARM bad/unit 1 fall", None, None),
            (b"ALARM u1 x fall", Some("u1"), None),
            (b"ALARM u1 4294967296 fall", Some("u1"), None),
            (b"ALARM u1 5 Fall", Some("u1"), Some(5)),
            (b"ALARM u1 5 fall zone", Some("u1"), Some(5)),
        ];
        for (line, unit, seq) in cases {
            let mut input = line.to_vec();
            input.push(b'\n');
            match decode_all(&input).as_slice() {
                [Frame::Invalid(invalid)] => {
                    assert_eq!(invalid.account.as_deref(), *unit, "{line:?}");
                    assert_eq!(invalid.seq, *seq, "{line:?}");
                }
                other => panic!("{line:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn answers_are_lines() {
        let mut codec = TelecareLineCodec::new();
        let mut out = BytesMut::new();
        let id: AlarmId = "0192f5a0-0000-7000-8000-000000000001".parse().unwrap();
        for answer in [
            Answer::Ack {
                unit: Some("u1".into()),
                seq: Some(5),
                alarm_id: Some(id),
            },
            Answer::Ack {
                unit: Some("u1".into()),
                seq: Some(6),
                alarm_id: None,
            },
            Answer::Nak {
                unit: None,
                seq: None,
                reason: InvalidReason::Malformed,
            },
        ] {
            codec.encode(answer, &mut out).unwrap();
        }
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "ACK u1 5 0192f5a0-0000-7000-8000-000000000001\nACK u1 6\nNAK - - malformed\n"
        );
    }
}
