//! Alarms per second committed through the ingest path (queue → group-commit
//! writer → SQLite with `synchronous=FULL`), with group commit and with one
//! transaction per alarm.
//!
//! `cargo bench --bench ingest`; criterion prints the throughput in
//! elements (alarms) per second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use telegate::config::{Config, IngestConfig, StoreUrl};
use telegate::ingest::{self, Ingest};
use telegate::metrics::Metrics;
use telegate::model::{AlarmClass, AlarmDetails, DedupeKey, NewAlarm, SourceKind, SourceRef};
use telegate::route::Router;
use telegate::store::Store;

/// Alarms submitted concurrently per iteration.
const ALARMS: usize = 1_000;

static SEQ: AtomicU64 = AtomicU64::new(0);

fn alarm() -> NewAlarm {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let device = format!("dev-{}", seq % 500);
    let code = "1101".to_owned();
    NewAlarm {
        dedupe_key: DedupeKey::for_device_signal("bench", &device, seq, &code, false, None),
        tenant: "bench".into(),
        device_id: device,
        account: None,
        seq: Some(seq),
        class: AlarmClass::PersonalEmergency,
        restore: false,
        raised_at: None,
        received_at: Utc::now(),
        source: SourceRef {
            kind: SourceKind::Mqtt,
            id: "bench".into(),
            code,
        },
        details: AlarmDetails {
            battery_pct: Some(80),
            ..AlarmDetails::default()
        },
        raw: br#"{"seq":1,"cid":"1101","battery_pct":80}"#.to_vec(),
    }
}

async fn submit_all(ingest: &Ingest) {
    let mut pending = Vec::with_capacity(ALARMS);
    for _ in 0..ALARMS {
        pending.push(ingest.enqueue_alarm(alarm()).await.expect("ingest open"));
    }
    for p in pending {
        p.wait().await.expect("committed");
    }
}

fn bench_ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let routing = Config::from_toml_str(
        "[[provider]]\nid = \"arc\"\nurl = \"http://127.0.0.1:9/a\"\nsecret = \"s\"\ntoken = \"t\"\n\
         [routing]\ndefault_provider = \"arc\"\n",
        "bench.toml",
        &|_| None,
    )
    .expect("bench config");
    let mut group = c.benchmark_group("ingest_sqlite");
    group.throughput(Throughput::Elements(ALARMS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, batch_max, wait_ms) in [("group_commit", 512, 2), ("txn_per_alarm", 1, 0)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = StoreUrl::Sqlite(dir.path().join("bench.db"));
        let store = rt.block_on(Store::open(&url)).expect("store opens");
        let config = IngestConfig {
            batch_max,
            batch_wait: Duration::from_millis(wait_ms),
            dedupe_window: Duration::from_secs(600),
            queue: 10_000,
        };
        let (ingest, writer) = ingest::channel(
            store,
            config,
            Arc::new(Router::new(&routing)),
            telegate::clock::system(),
            Arc::new(Metrics::default()),
            Arc::new(tokio::sync::Notify::new()),
        );
        rt.spawn(writer.run());
        group.bench_with_input(BenchmarkId::new(name, ALARMS), &ingest, |b, ingest| {
            b.to_async(&rt).iter(|| submit_all(ingest));
        });
    }
    group.finish();
}

criterion_group!(benches, bench_ingest);
criterion_main!(benches);
