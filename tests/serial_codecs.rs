//! Properties of the serial line codecs: arbitrary bytes never panic a
//! codec or stall its port, how the input is split into reads never changes
//! what is decoded, and well-formed lines decode to what they say.

use bytes::BytesMut;
use proptest::prelude::*;
use telegate::source::code::Code;
use telegate::source::serial::codec::{LineCodec, LineFormat};
use telegate::source::serial::contact_id::{check_digit, ContactId};
use telegate::source::serial::frame::{Frame, InvalidReason, DC4};
use telegate::source::serial::surgard::Surgard;
use telegate::source::serial::telecare_line::TelecareLine;
use telegate::taxonomy::Qualifier;
use tokio_util::codec::Decoder;

/// Decodes `input` fed in the given read sizes; returns the frames and the
/// bytes still buffered.
fn decode_chunked<F: LineFormat>(input: &[u8], chunks: &[usize]) -> (Vec<Frame>, usize) {
    let mut codec = LineCodec::<F>::new();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = input;
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        while let Some(frame) = codec.decode(&mut buf).expect("decoding never errors") {
            frames.push(frame);
        }
    }
    (frames, buf.len())
}

fn decode<F: LineFormat>(input: &[u8]) -> Vec<Frame> {
    decode_chunked::<F>(input, &[usize::MAX]).0
}

/// A good line of each format and what it must decode to.
fn good_line<F: LineFormat>() -> (&'static [u8], Code) {
    match F::NAME {
        "surgard" => (
            b"5011 181234E10101003\x14",
            Code::ContactId {
                qualifier: Qualifier::New,
                event: 101,
            },
        ),
        "contact-id" => (
            b"123418110101001B\r\n",
            Code::ContactId {
                qualifier: Qualifier::New,
                event: 101,
            },
        ),
        _ => (b"ALARM unit-1 9 fall\n", Code::Event("fall".into())),
    }
}

fn never_stalls<F: LineFormat>(garbage: &[u8], chunks: &[usize]) -> Result<(), TestCaseError> {
    // Garbage, whatever it holds, then a terminator and a good line: the
    // good line still comes out, last.
    let (good, code) = good_line::<F>();
    let mut input = garbage.to_vec();
    input.push(F::TERMINATORS[0]);
    input.extend_from_slice(good);
    let (frames, buffered) = decode_chunked::<F>(&input, chunks);
    prop_assert_eq!(buffered, 0);
    match frames.last() {
        Some(Frame::Signal(s)) => prop_assert_eq!(&s.code, &code),
        other => prop_assert!(false, "good line lost after garbage: {:?}", other),
    }
    // Whatever the reads, the same frames.
    let (whole, _) = decode_chunked::<F>(&input, &[usize::MAX]);
    prop_assert_eq!(frames, whole);
    Ok(())
}

fn bounded_buffer<F: LineFormat>(garbage: &[u8], chunks: &[usize]) -> Result<(), TestCaseError> {
    let (frames, buffered) = decode_chunked::<F>(garbage, chunks);
    prop_assert!(buffered <= F::MAX_LINE + 1, "{buffered} bytes buffered");
    for frame in &frames {
        if let Frame::Invalid(invalid) = frame {
            prop_assert!(invalid.raw.len() <= F::MAX_LINE);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn surgard_survives_garbage(garbage in proptest::collection::vec(any::<u8>(), 0..400), chunks in proptest::collection::vec(1usize..64, 1..8)) {
        never_stalls::<Surgard>(&garbage, &chunks)?;
        bounded_buffer::<Surgard>(&garbage, &chunks)?;
    }

    #[test]
    fn contact_id_survives_garbage(garbage in proptest::collection::vec(any::<u8>(), 0..400), chunks in proptest::collection::vec(1usize..64, 1..8)) {
        never_stalls::<ContactId>(&garbage, &chunks)?;
        bounded_buffer::<ContactId>(&garbage, &chunks)?;
    }

    #[test]
    fn telecare_line_survives_garbage(garbage in proptest::collection::vec(any::<u8>(), 0..800), chunks in proptest::collection::vec(1usize..64, 1..8)) {
        never_stalls::<TelecareLine>(&garbage, &chunks)?;
        bounded_buffer::<TelecareLine>(&garbage, &chunks)?;
    }

    #[test]
    fn surgard_contact_id_lines_decode_to_their_fields(
        receiver in 0u8..100, line in 0u8..10, account in 0u32..10_000,
        q in prop::sample::select(vec![('E', Qualifier::New), ('R', Qualifier::Restore), ('P', Qualifier::Status)]),
        event in 0u16..1000, group in 0u8..100, zone in 0u16..1000,
    ) {
        let text = format!("5{receiver:02}{line} 18{account:04}{}{event:03}{group:02}{zone:03}", q.0);
        let mut input = text.clone().into_bytes();
        input.push(DC4);
        let frames = decode::<Surgard>(&input);
        let [Frame::Signal(s)] = frames.as_slice() else {
            return Err(TestCaseError::fail(format!("{text}: {frames:?}")));
        };
        prop_assert_eq!(s.receiver.clone(), Some(format!("{receiver:02}")));
        prop_assert_eq!(s.line.clone(), Some(line.to_string()));
        prop_assert_eq!(&s.account, &format!("{account:04}"));
        prop_assert_eq!(&s.code, &Code::ContactId { qualifier: q.1, event });
        prop_assert_eq!(s.zone, Some(u32::from(zone)));
        prop_assert_eq!(&s.raw, text.as_bytes());
    }

    #[test]
    fn surgard_sia_lines_decode_to_their_fields(
        account in 1u32..1_000_000, code in "[A-Z]{2}", zone in 0u16..10_000,
    ) {
        let text = format!("3011    {account:>6}{code}{zone:04}");
        let mut input = text.clone().into_bytes();
        input.push(DC4);
        let frames = decode::<Surgard>(&input);
        let [Frame::Signal(s)] = frames.as_slice() else {
            return Err(TestCaseError::fail(format!("{text}: {frames:?}")));
        };
        prop_assert_eq!(&s.account, &account.to_string());
        prop_assert_eq!(&s.code, &Code::Sia(code));
        prop_assert_eq!(s.zone, Some(u32::from(zone)));
    }

    #[test]
    fn contact_id_checksums_decide(
        digits in "[0-9B-F]{4}(18|98)[136][0-9]{3}[0-9]{2}[0-9]{3}",
        wrong in 0u8..16,
    ) {
        let mut line = digits.clone().into_bytes();
        let check = check_digit(&line).expect("valid digits");
        line.push(check);
        let frames = decode::<ContactId>(&[line.as_slice(), b"\r\n"].concat());
        prop_assert!(matches!(frames.as_slice(), [Frame::Signal(_)]), "{:?}", frames);

        // Any other check digit fails, unless it counts the same (0 and A).
        let other = b"0123456789ABCDEF"[usize::from(wrong)];
        let same = other == check || (check == b'0' && other == b'A');
        let mut bad = digits.into_bytes();
        bad.push(other);
        let frames = decode::<ContactId>(&[bad.as_slice(), b"\r\n"].concat());
        if same {
            prop_assert!(matches!(frames.as_slice(), [Frame::Signal(_)]));
        } else {
            let [Frame::Invalid(invalid)] = frames.as_slice() else {
                return Err(TestCaseError::fail(format!("{frames:?}")));
            };
            prop_assert_eq!(invalid.reason, InvalidReason::BadChecksum);
        }
    }

    #[test]
    fn telecare_lines_decode_to_their_fields(
        unit in "[A-Za-z0-9._-]{1,64}", seq in any::<u32>(),
        code in prop::sample::select(vec!["1101", "3602", "MA", "fall", "low_battery", "XX"]),
        zone in proptest::option::of(any::<u32>()),
    ) {
        let mut text = format!("ALARM {unit} {seq} {code}");
        if let Some(zone) = zone {
            text.push_str(&format!(" zone={zone}"));
        }
        let frames = decode::<TelecareLine>(format!("{text}\r\n").as_bytes());
        let [Frame::Signal(s)] = frames.as_slice() else {
            return Err(TestCaseError::fail(format!("{text}: {frames:?}")));
        };
        prop_assert_eq!(&s.account, &unit);
        prop_assert_eq!(s.seq, Some(u64::from(seq)));
        prop_assert_eq!(s.code.original(), code);
        prop_assert_eq!(s.zone, zone);
    }
}

#[test]
fn a_line_over_the_limit_is_reported_once_and_discarded() {
    let mut input = vec![b'5'; 10_000];
    input.push(DC4);
    input.extend_from_slice(b"5011 181234E10101003\x14");
    let frames = decode::<Surgard>(&input);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert!(matches!(&frames[0], Frame::Invalid(i) if i.reason == InvalidReason::TooLong));
    assert!(matches!(&frames[1], Frame::Signal(_)));
}
