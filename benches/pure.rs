//! The pure hot paths, per core: MQTT JSON payload parsing, normalisation
//! into an alarm, and SLA computation over 100,000 alarms.
//!
//! `cargo bench --bench pure`

use std::time::Duration;

use chrono::{DateTime, Utc};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use telegate::config::{AnswerTarget, ContractConfig, FailoverAfter};
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

criterion_group!(benches, bench_mqtt, bench_sla);
criterion_main!(benches);
