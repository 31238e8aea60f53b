//! Serial line decoding, per core: lines/s for each format (Sur-Gard
//! receiver output with Contact ID and with SIA lines, raw Contact ID with
//! its checksum, and the telecare unit protocol).
//!
//! `cargo bench --bench serial`
//!
//! For scale: a port at 115,200 baud carries at most 11,520 bytes/s, about
//! 550 Sur-Gard lines or 300 telecare lines a second.

use std::time::Duration;

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use telegate::source::serial::codec::{LineCodec, LineFormat};
use telegate::source::serial::contact_id::{check_digit, ContactId};
use telegate::source::serial::frame::Frame;
use telegate::source::serial::surgard::Surgard;
use telegate::source::serial::telecare_line::TelecareLine;
use tokio_util::codec::Decoder;

/// Lines per iteration.
const LINES: u64 = 1_000;

fn surgard_cid(i: u64) -> String {
    let q = ['E', 'R', 'P'][(i % 3) as usize];
    let event = [101, 111, 301, 602, 147][(i % 5) as usize];
    format!("5011 18{:04}{q}{event:03}01{:03}\x14", i % 10_000, i % 1000)
}

fn surgard_sia(i: u64) -> String {
    let code = ["MA", "FA", "AT", "YT", "RP"][(i % 5) as usize];
    format!("3011    {:>6}{code}{:04}\x14", i % 1_000_000, i % 10_000)
}

fn contact_id(i: u64) -> String {
    let q = [1, 3, 6][(i % 3) as usize];
    let event = [101, 111, 301, 602, 147][(i % 5) as usize];
    let digits = format!("{:04}18{q}{event:03}01{:03}", 1000 + i % 9000, i % 1000);
    let check = check_digit(digits.as_bytes()).map_or('F', char::from);
    format!("{digits}{check}\r\n")
}

fn telecare(i: u64) -> String {
    let code = ["1101", "MA", "fall", "3301", "low_battery"][(i % 5) as usize];
    format!(
        "ALARM unit-{:04} {i} {code} zone={} battery=80 ts=2026-11-22T10:15:30.123Z\n",
        i % 5000,
        i % 16
    )
}

fn bench_format<F: LineFormat>(c: &mut Criterion, name: &str, line: fn(u64) -> String) {
    let input: Vec<u8> = (0..LINES).flat_map(|i| line(i).into_bytes()).collect();
    let mut group = c.benchmark_group("serial_decode");
    group.throughput(Throughput::Elements(LINES));
    group.bench_function(name, |b| {
        b.iter(|| {
            let mut codec = LineCodec::<F>::new();
            let mut buf = BytesMut::from(black_box(input.as_slice()));
            let mut signals = 0u64;
            while let Ok(Some(frame)) = codec.decode(&mut buf) {
                if matches!(frame, Frame::Signal(_)) {
                    signals += 1;
                }
            }
            assert_eq!(signals, LINES, "every line decodes");
            signals
        });
    });
    group.finish();
}

fn bench_serial(c: &mut Criterion) {
    bench_format::<Surgard>(c, "surgard_contact_id", surgard_cid);
    bench_format::<Surgard>(c, "surgard_sia", surgard_sia);
    bench_format::<ContactId>(c, "contact_id", contact_id);
    bench_format::<TelecareLine>(c, "telecare_line", telecare);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_serial
}
criterion_main!(benches);
