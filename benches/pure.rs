//! The pure hot paths, per core: MQTT JSON payload parsing, normalisation
//! into an alarm, de-duplication within a batch, and SLA computation over
//! 100,000 alarms.
//!
//! `cargo bench --bench pure`

use std::time::Duration;

use chrono::{DateTime, Utc};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use std::collections::HashMap;

use telegate::config::{AnswerTarget, ContractConfig, FailoverAfter};
use telegate::model::DedupeKey;
use telegate::sla::{self, SlaRow};
use telegate::source::mqtt::payload::{normalise, parse_alarm, parse_topic};
use telegate::taxonomy::CodeTable;

const PAYLOADS: [&[u8]; 3] = [
    br#"{"seq": 4211, "cid": "1101", "ts": "2026-11-22T10:15:30.123Z", "zone": 3, "battery_pct": 80, "rssi": -67}"#,
    br#"{"seq": 4212, "sia": "AT", "ts": "2026-11-22T10:15:31.456Z", "battery_pct": 79}"#,
    br#"{"seq": 4213, "event": "fall", "ts": "2026-11-22T10:15:32.789Z", "lat": 52.92, "lon": -1.47, "text": "kitchen"}"#,
];

fn bench_mqtt(c: &mut Criterion) {
    let table = CodeTable::default();
    let topic = "telecare/derbyshire/unit-0042/alarm";
    let now: DateTime<Utc> = "2026-11-22T10:15:33Z".parse().expect("time");
    let mut group = c.benchmark_group("mqtt_json");
    group.throughput(Throughput::Elements(PAYLOADS.len() as u64));
    group.bench_function("parse", |b| {
        b.iter(|| {
            for p in PAYLOADS {
                let _ = black_box(parse_alarm(black_box(p)));
            }
        });
    });
    group.bench_function("parse_and_normalise", |b| {
        b.iter(|| {
            for p in PAYLOADS {
                let Ok(t) = parse_topic(topic) else { continue };
                if let Ok(payload) = parse_alarm(black_box(p)) {
                    black_box(normalise(&t, payload, &table, "devices", now, p.to_vec()));
                }
            }
        });
    });
    group.finish();
}

fn bench_sla(c: &mut Criterion) {
    let contracts: Vec<ContractConfig> = (0..10)
        .map(|i| ContractConfig {
            id: format!("C-{i}"),
            provider: "north".into(),
            fallback: vec!["south".into()],
            tenants: vec![format!("tenant-{i}")],
            starts: chrono::NaiveDate::from_ymd_opt(2026, 4, 1).expect("date"),
            ends: chrono::NaiveDate::from_ymd_opt(2027, 3, 31).expect("date"),
            answer_targets: vec![
                AnswerTarget {
                    within_s: 60,
                    pct: 97.5,
                },
                AnswerTarget {
                    within_s: 180,
                    pct: 99.0,
                },
            ],
            failover_after_s: FailoverAfter::default(),
        })
        .collect();
    let base: DateTime<Utc> = "2026-11-01T00:00:00Z".parse().expect("time");
    // A deterministic spread of latencies and answer times.
    let rows: Vec<SlaRow> = (0..100_000u64)
        .map(|i| {
            let received = base + chrono::Duration::seconds(i as i64 * 13);
            SlaRow {
                contract_id: (i % 11 != 10).then(|| format!("C-{}", i % 10)),
                received_at: received,
                accepted_at: Some(
                    received + chrono::Duration::milliseconds((i * 7919 % 900) as i64 + 5),
                ),
                by_fallback: i % 97 == 0,
                answered_at: (i % 53 != 0)
                    .then(|| received + chrono::Duration::seconds((i * 104_729 % 200) as i64)),
            }
        })
        .collect();
    let mut group = c.benchmark_group("sla");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("compute_100k_alarms", |b| {
        b.iter(|| black_box(sla::compute(black_box(&rows), &contracts)));
    });
    group.finish();
}

/// De-duplication as the store does it within a batch: each alarm's key is
/// built and checked against the keys already seen (the batch's and those the
/// store returned), here a full batch of 512 with one in ten a re-send.
fn bench_dedupe(c: &mut Criterion) {
    let ts: DateTime<Utc> = "2026-11-22T10:15:30.123Z".parse().expect("time");
    let signals: Vec<(String, u64)> = (0..512u64)
        .map(|i| {
            let device = if i % 10 == 9 { i - 1 } else { i };
            (format!("unit-{device:05}"), device)
        })
        .collect();
    let mut group = c.benchmark_group("dedupe");
    group.throughput(Throughput::Elements(signals.len() as u64));
    group.bench_function("batch_of_512", |b| {
        b.iter(|| {
            let mut seen: HashMap<String, u64> = HashMap::with_capacity(signals.len());
            let mut duplicates = 0u32;
            for (device, seq) in black_box(&signals) {
                let key = DedupeKey::for_device_signal(
                    "derbyshire",
                    device,
                    *seq,
                    "1101",
                    false,
                    Some(ts),
                );
                match seen.entry(key.as_str().to_owned()) {
                    std::collections::hash_map::Entry::Occupied(_) => duplicates += 1,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(*seq);
                    }
                }
            }
            black_box(duplicates)
        });
    });
    group.finish();
}

criterion_group!(benches, bench_mqtt, bench_dedupe, bench_sla);
criterion_main!(benches);
