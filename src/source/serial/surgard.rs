//! `surgard`: the automation output of Sur-Gard-style receivers, which
//! decode analogue alarm calls and print one event per line for the
//! monitoring computer.
//!
//! Lines end with DC4 (0x14); a CR or LF also ends one, so receivers that
//! add them work too. The first character names the protocol:
//! - `5RRLs18AAAAQXYZGGCCC`: Contact ID. `RR` receiver, `L` line, `s` a
//!   space, `18` (or `98`) the message type, `AAAA` the account (receivers
//!   with longer accounts print more digits), `Q` the qualifier as `E` (new),
//!   `R` (restore) or `P` (status), `XYZ` the event, `GG` the group, `CCC`
//!   the zone or user. Example: `5011 181234E12101001`.
//! - `3RRLssssAAAAAAXXYYYY`: SIA. Four spaces, the account right-aligned in
//!   six characters, the two-letter SIA code, the zone in four digits.
//! - `1RRL` + spaces + `@` + spaces: the receiver's heartbeat, about every
//!   30 s.
//!
//! Every line is answered with one byte: ACK (0x06) once stored, or at once
//! for a heartbeat; NAK (0x15) for a line that cannot be read. A receiver
//! that gets a NAK, or nothing within 4 s, sends the line again (up to three
//! times).

use bytes::BytesMut;

use super::codec::{LineCodec, LineFormat};
use super::frame::{
    encode_byte_answer, not_text, printable, Answer, Frame, Heartbeat, Invalid, InvalidReason,
    Signal, DC4,
};
use crate::source::code::{three_digits, Code};
use crate::taxonomy::Qualifier;

/// The Sur-Gard receiver output format.
#[derive(Debug)]
pub struct Surgard;

/// A codec for Sur-Gard receiver output.
pub type SurgardCodec = LineCodec<Surgard>;

impl LineFormat for Surgard {
    const NAME: &'static str = "surgard";
    const TERMINATORS: &'static [u8] = &[DC4, b'\r', b'\n'];
    const MAX_LINE: usize = 64;

    fn parse(line: &[u8]) -> Frame {
        match parse(line) {
            Ok(frame) => frame,
            Err(invalid) => Frame::Invalid(invalid),
        }
    }

    fn encode(answer: &Answer, dst: &mut BytesMut) {
        encode_byte_answer(answer, dst);
    }
}

fn parse(raw: &[u8]) -> Result<Frame, Invalid> {
    let text = printable(raw).ok_or_else(|| not_text(raw))?;
    let text = text.trim_end();
    let malformed = |detail: &str| Invalid::new(InvalidReason::Malformed, detail, raw);
    let (protocol, receiver, line, rest) = match text.as_bytes() {
        [p, r1, r2, l, ..] if [r1, r2, l].iter().all(|b| b.is_ascii_alphanumeric()) => {
            (*p, &text[1..3], &text[3..4], &text[4..])
        }
        _ => {
            return Err(malformed(
                "shorter than a receiver header (protocol, receiver, line)",
            ))
        }
    };
    let mut signal = match protocol {
        b'5' => contact_id(rest, raw)?,
        b'3' => sia(rest, raw)?,
        b'1' if rest.trim() == "@" => {
            return Ok(Frame::Heartbeat(Heartbeat {
                unit: None,
                seq: None,
            }))
        }
        other => {
            return Err(Invalid::new(
                InvalidReason::Unsupported,
                format!("protocol identifier {:?} is not decoded", char::from(other)),
                raw,
            ))
        }
    };
    signal.receiver = Some(receiver.to_owned());
    signal.line = Some(line.to_owned());
    Ok(Frame::Signal(signal))
}

/// `s18AAAAQXYZGGCCC` after the header.
fn contact_id(rest: &str, raw: &[u8]) -> Result<Signal, Invalid> {
    let malformed = |detail: &str| Invalid::new(InvalidReason::Malformed, detail, raw);
    let rest = rest.trim_start();
    let body = rest
        .strip_prefix("18")
        .or_else(|| rest.strip_prefix("98"))
        .ok_or_else(|| malformed("Contact ID message type must be 18 or 98"))?;
    // The account is whatever stands before the last nine characters
    // (qualifier, event, group, zone).
    let split = body
        .len()
        .checked_sub(9)
        .filter(|at| *at > 0 && body.is_char_boundary(*at))
        .ok_or_else(|| {
            malformed("Contact ID line too short for account, qualifier, event, group and zone")
        })?;
    let (account, tail) = body.split_at(split);
    let account = valid_account(account.trim())
        .ok_or_else(|| malformed("account must be 1-10 hex digits"))?;
    let tail = tail.as_bytes();
    let qualifier = match tail[0] {
        b'E' | b'1' => Qualifier::New,
        b'R' | b'3' => Qualifier::Restore,
        b'P' | b'6' => Qualifier::Status,
        _ => {
            let mut invalid = malformed("Contact ID qualifier must be E, R or P");
            invalid.account = Some(account.to_owned());
            return Err(invalid);
        }
    };
    let Some(event) = three_digits(&tail[1..4]) else {
        let mut invalid = malformed("Contact ID event must be three digits");
        invalid.account = Some(account.to_owned());
        return Err(invalid);
    };
    let mut signal = Signal::new(
        account.to_owned(),
        Code::ContactId { qualifier, event },
        raw.to_vec(),
    );
    signal.zone = decimal(&tail[6..9]);
    Ok(signal)
}

/// `ssssAAAAAAXXYYYY` after the header.
fn sia(rest: &str, raw: &[u8]) -> Result<Signal, Invalid> {
    let malformed = |detail: &str| Invalid::new(InvalidReason::Malformed, detail, raw);
    let rest = rest.trim();
    let split = rest
        .len()
        .checked_sub(6)
        .filter(|at| *at > 0)
        .ok_or_else(|| malformed("SIA line too short for account, code and zone"))?;
    let (account, tail) = rest.split_at(split);
    let account = valid_account(account.trim())
        .ok_or_else(|| malformed("account must be 1-10 hex digits"))?;
    let code = crate::source::code::parse_sia(&tail[..2]).ok_or_else(|| {
        let mut invalid = malformed("SIA code must be two upper-case letters");
        invalid.account = Some(account.to_owned());
        invalid
    })?;
    let mut signal = Signal::new(account.to_owned(), code, raw.to_vec());
    signal.zone = decimal(&tail.as_bytes()[2..]);
    Ok(signal)
}

/// An account: 1–10 hex digits.
fn valid_account(account: &str) -> Option<&str> {
    ((1..=10).contains(&account.len()) && account.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(account)
}

/// A zone or user number, when the field is decimal.
fn decimal(field: &[u8]) -> Option<u32> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::source::serial::frame::{ACK, NAK};

    fn decode_all(input: &[u8]) -> Vec<Frame> {
        let mut codec = SurgardCodec::new();
        let mut buf = BytesMut::from(input);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            frames.push(frame);
        }
        frames
    }

    fn signal(frame: &Frame) -> &Signal {
        match frame {
            Frame::Signal(s) => s,
            other => panic!("expected a signal, got {other:?}"),
        }
    }

    #[test]
    fn decodes_the_manuals_contact_id_line() {
        let frames = decode_all(b"5011 181234E12101001\x14");
        assert_eq!(frames.len(), 1);
        let s = signal(&frames[0]);
        assert_eq!(s.receiver.as_deref(), Some("01"));
        assert_eq!(s.line.as_deref(), Some("1"));
        assert_eq!(s.account, "1234");
        assert_eq!(
            s.code,
            Code::ContactId {
                qualifier: Qualifier::New,
                event: 121
            }
        );
        assert_eq!(s.zone, Some(1));
        assert_eq!(s.raw, b"5011 181234E12101001");
    }

    #[test]
    fn restore_and_status_qualifiers_and_longer_accounts() {
        let frames = decode_all(b"5021 98123456R30200007\x14\r\n5011 181234P14700003\x14");
        let restore = signal(&frames[0]);
        assert_eq!(restore.account, "123456");
        assert_eq!(restore.code.original(), "3302");
        assert_eq!(restore.zone, Some(7));
        assert_eq!(signal(&frames[1]).code.original(), "6147");
    }

    #[test]
    fn decodes_sia_lines_with_padded_accounts() {
        let frames = decode_all(b"3011    001234MA0003\x143011      1234FA0012\x14");
        let s = signal(&frames[0]);
        assert_eq!(s.account, "001234");
        assert_eq!(s.code, Code::Sia("MA".into()));
        assert_eq!(s.zone, Some(3));
        assert_eq!(signal(&frames[1]).account, "1234");
        assert_eq!(signal(&frames[1]).zone, Some(12));
    }

    #[test]
    fn the_heartbeat_line_is_a_heartbeat() {
        let frames = decode_all(b"1011           @    \x14");
        assert_eq!(
            frames,
            vec![Frame::Heartbeat(Heartbeat {
                unit: None,
                seq: None
            })]
        );
    }

    #[test]
    fn bad_lines_are_invalid_with_a_reason() {
        let cases: &[(&[u8], InvalidReason)] = &[
            (b"5011 181234X12101001", InvalidReason::Malformed),
            (b"5011 171234E12101001", InvalidReason::Malformed),
            (b"5011 181234E1A101001", InvalidReason::Malformed),
            (b"5011 18E12101001", InvalidReason::Malformed),
            (b"3011    001234ma0003", InvalidReason::Malformed),
            (b"7011 something", InvalidReason::Unsupported),
            (b"50", InvalidReason::Malformed),
            (b"5011 18\xff234E12101001", InvalidReason::NotText),
        ];
        for (line, reason) in cases {
            let mut input = line.to_vec();
            input.push(DC4);
            let frames = decode_all(&input);
            match frames.as_slice() {
                [Frame::Invalid(invalid)] => {
                    assert_eq!(invalid.reason, *reason, "{}", String::from_utf8_lossy(line));
                    assert_eq!(invalid.raw, *line);
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(line)),
            }
        }
    }

    #[test]
    fn answers_are_single_bytes() {
        let mut codec = SurgardCodec::new();
        let mut out = BytesMut::new();
        codec
            .encode(
                Answer::Ack {
                    unit: None,
                    seq: None,
                    alarm_id: None,
                },
                &mut out,
            )
            .unwrap();
        codec
            .encode(
                Answer::Nak {
                    unit: None,
                    seq: None,
                    reason: InvalidReason::Malformed,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(&out[..], &[ACK, NAK]);
    }
}
