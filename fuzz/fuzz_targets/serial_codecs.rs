//! Arbitrary bytes through every serial line codec, in arbitrary reads:
//! no panic, a bounded buffer, and a good line after a terminator is still
//! decoded (the port never stalls).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use telegate::source::serial::codec::{LineCodec, LineFormat};
use telegate::source::serial::contact_id::ContactId;
use telegate::source::serial::frame::Frame;
use telegate::source::serial::surgard::Surgard;
use telegate::source::serial::telecare_line::TelecareLine;
use tokio_util::codec::Decoder;

fn check<F: LineFormat>(data: &[u8], good: &[u8]) {
    let Some((&read, data)) = data.split_first() else {
        return;
    };
    let read = usize::from(read).max(1);
    let mut codec = LineCodec::<F>::new();
    let mut buf = BytesMut::new();
    let mut input = data.to_vec();
    input.push(F::TERMINATORS[0]);
    input.extend_from_slice(good);
    let mut last = None;
    for chunk in input.chunks(read) {
        buf.extend_from_slice(chunk);
        while let Some(frame) = codec.decode(&mut buf).expect("decoding never errors") {
            last = Some(frame);
        }
        assert!(buf.len() <= F::MAX_LINE + 1, "buffer grew to {}", buf.len());
    }
    assert!(
        matches!(last, Some(Frame::Signal(_))),
        "the good line after the garbage was not decoded: {last:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    check::<Surgard>(data, b"5011 181234E10101003\x14");
    check::<ContactId>(data, b"123418110101001B\r\n");
    check::<TelecareLine>(data, b"ALARM unit-1 9 fall\n");
});
