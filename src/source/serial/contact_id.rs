//! `contact-id`: raw Contact ID messages, one per line, as a dialler or a
//! simple receiver writes them: `ACCT MT Q XYZ GG CCC S`, 16 digits, spaces
//! between the fields allowed, ended by CR or LF.
//!
//! - `ACCT` the account (4 digits, B–F allowed), `MT` the message type (18
//!   or 98), `Q` the qualifier (1 new, 3 restore, 6 status), `XYZ` the event,
//!   `GG` the group, `CCC` the zone or user, `S` the check digit.
//! - The check: every digit counts its value, except 0, which counts 10,
//!   and B–F, which count 11–15; the sum of all 16 must be a multiple of 15.
//!   A message whose sum is not is rejected (NAK) and quarantined.
//!   `1234 18 1101 01 001 B` and `1234 18 3602 00 000 F` are valid.
//!
//! Answers are the receiver bytes: ACK (0x06) once stored, NAK (0x15) for a
//! line that cannot be read.

use bytes::BytesMut;

use super::codec::{LineCodec, LineFormat};
use super::frame::{
    encode_byte_answer, not_text, printable, Answer, Frame, Invalid, InvalidReason, Signal, DC4,
};
use crate::source::code::{three_digits, Code};
use crate::taxonomy::Qualifier;

/// The raw Contact ID format.
#[derive(Debug)]
pub struct ContactId;

/// A codec for raw Contact ID messages.
pub type ContactIdCodec = LineCodec<ContactId>;

/// Digits in a message.
const DIGITS: usize = 16;

impl LineFormat for ContactId {
    const NAME: &'static str = "contact-id";
    const TERMINATORS: &'static [u8] = &[b'\r', b'\n', DC4];
    const MAX_LINE: usize = 64;

    fn parse(line: &[u8]) -> Frame {
        match parse(line) {
            Ok(signal) => Frame::Signal(signal),
            Err(invalid) => Frame::Invalid(invalid),
        }
    }

    fn encode(answer: &Answer, dst: &mut BytesMut) {
        encode_byte_answer(answer, dst);
    }
}

/// What a Contact ID digit counts in the checksum; `A` is accepted as 0
/// (the tone that carries 0).
fn digit_value(b: u8) -> Option<u32> {
    match b {
        b'0' | b'A' | b'a' => Some(10),
        b'1'..=b'9' => Some(u32::from(b - b'0')),
        b'B'..=b'F' => Some(u32::from(b - b'A') + 10),
        b'b'..=b'f' => Some(u32::from(b - b'a') + 10),
        _ => None,
    }
}

/// The check digit that completes 15 digits.
pub fn check_digit(digits: &[u8]) -> Option<u8> {
    let sum: u32 = digits
        .iter()
        .map(|b| digit_value(*b))
        .sum::<Option<u32>>()?;
    Some(match (15 - sum % 15) % 15 {
        0 => b'F',
        10 => b'0',
        n @ 11..=14 => b'B' + (n - 11) as u8,
        n => b'0' + n as u8,
    })
}

fn parse(raw: &[u8]) -> Result<Signal, Invalid> {
    let text = printable(raw).ok_or_else(|| not_text(raw))?;
    let malformed = |detail: &str| Invalid::new(InvalidReason::Malformed, detail, raw);
    let digits: Vec<u8> = text.bytes().filter(|b| *b != b' ').collect();
    if digits.len() != DIGITS {
        return Err(malformed("a Contact ID message has 16 digits"));
    }
    if digits.iter().any(|b| digit_value(*b).is_none()) {
        return Err(malformed("Contact ID digits are 0-9 and B-F"));
    }
    // Fields read as decimal use 0 for the A tone.
    let norm: Vec<u8> = digits
        .iter()
        .map(|b| {
            if b.eq_ignore_ascii_case(&b'A') {
                b'0'
            } else {
                b.to_ascii_uppercase()
            }
        })
        .collect();
    let account = String::from_utf8_lossy(&norm[..4]).into_owned();
    let with_account = |mut invalid: Invalid| {
        invalid.account = Some(account.clone());
        invalid
    };
    let sum: u32 = digits.iter().filter_map(|b| digit_value(*b)).sum();
    if sum % 15 != 0 {
        let expected = check_digit(&digits[..DIGITS - 1])
            .map(char::from)
            .unwrap_or('?');
        return Err(with_account(Invalid::new(
            InvalidReason::BadChecksum,
            format!(
                "checksum does not add up: check digit {} where {expected} was expected",
                char::from(digits[DIGITS - 1])
            ),
            raw,
        )));
    }
    if &norm[4..6] != b"18" && &norm[4..6] != b"98" {
        return Err(with_account(malformed("message type must be 18 or 98")));
    }
    let qualifier = Qualifier::from_digit(norm[6].wrapping_sub(b'0'))
        .ok_or_else(|| with_account(malformed("qualifier must be 1, 3 or 6")))?;
    let event = three_digits(&norm[7..10])
        .ok_or_else(|| with_account(malformed("event must be three decimal digits")))?;
    let mut signal = Signal::new(account, Code::ContactId { qualifier, event }, raw.to_vec());
    signal.zone = three_digits(&norm[12..15]).map(u32::from);
    Ok(signal)
}

#[cfg(test)]
mod tests {
    use tokio_util::codec::Decoder;

    use super::*;

    fn decode_one(line: &[u8]) -> Frame {
        let mut codec = ContactIdCodec::new();
        let mut buf = BytesMut::from(line);
        buf.extend_from_slice(b"\r\n");
        let frame = codec.decode(&mut buf).unwrap().expect("a frame");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        frame
    }

    #[test]
    fn the_reference_checksums_hold() {
        assert_eq!(check_digit(b"123418110101001"), Some(b'B'));
        assert_eq!(check_digit(b"123418360200000"), Some(b'F'));
    }

    #[test]
    fn decodes_valid_messages_with_or_without_spaces() {
        for line in [&b"123418110101001B"[..], b"1234 18 1101 01 001 B"] {
            let Frame::Signal(s) = decode_one(line) else {
                panic!("not a signal")
            };
            assert_eq!(s.account, "1234");
            assert_eq!(
                s.code,
                Code::ContactId {
                    qualifier: Qualifier::New,
                    event: 101
                }
            );
            assert_eq!(s.zone, Some(1));
            assert_eq!(s.raw, line);
        }
        let Frame::Signal(s) = decode_one(b"123418360200000F") else {
            panic!("not a signal")
        };
        assert_eq!(s.code.original(), "3602");
    }

    #[test]
    fn a_bad_checksum_is_rejected_and_names_the_account() {
        let Frame::Invalid(invalid) = decode_one(b"123418110101001C") else {
            panic!("accepted a bad checksum")
        };
        assert_eq!(invalid.reason, InvalidReason::BadChecksum);
        assert_eq!(invalid.account.as_deref(), Some("1234"));
        assert!(
            invalid.detail.contains("B was expected"),
            "{}",
            invalid.detail
        );
    }

    #[test]
    fn malformed_messages_are_rejected() {
        for line in [
            &b"12341811010100"[..],
            b"123418110101001BB",
            b"1234181101G1001B",
            b"1234 18 1101 01 001 \xff",
        ] {
            assert!(matches!(decode_one(line), Frame::Invalid(_)), "{line:?}");
        }
        // A valid checksum around a qualifier that is not 1, 3 or 6.
        let mut digits = b"12341820010100".to_vec();
        digits.push(b'1');
        let check = check_digit(&digits).unwrap();
        digits.push(check);
        let Frame::Invalid(invalid) = decode_one(&digits) else {
            panic!("accepted qualifier 2")
        };
        assert_eq!(invalid.reason, InvalidReason::Malformed);
    }
}
