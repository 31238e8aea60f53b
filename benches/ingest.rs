//! Alarms per second committed through the ingest path (queue → group-commit
//! writer → store), with group commit and with one transaction per alarm:
//! SQLite with `synchronous=FULL` always, and PostgreSQL when
//! `TELEGATE_TEST_POSTGRES_URL` is set (each run in a fresh database of its
//! own on that server, dropped afterwards).
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

#[path = "support/pg.rs"]
mod pg;
use pg::PgDatabase;

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

/// The two ways of committing: group commit as configured by default, and
/// one transaction per alarm.
const MODES: [(&str, usize, u64); 2] = [("group_commit", 512, 2), ("txn_per_alarm", 1, 0)];

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
    let router = Arc::new(Router::new(&routing));

    let mut group = c.benchmark_group("ingest_sqlite");
    group.throughput(Throughput::Elements(ALARMS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, batch_max, wait_ms) in MODES {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = StoreUrl::Sqlite(dir.path().join("bench.db"));
        let store = rt.block_on(Store::open(&url)).expect("store opens");
        let ingest = start_ingest(&rt, store.clone(), &router, batch_max, wait_ms);
        group.bench_with_input(BenchmarkId::new(name, ALARMS), &ingest, |b, ingest| {
            b.to_async(&rt).iter(|| submit_all(ingest));
        });
        rt.block_on(store.close());
    }
    group.finish();

    let Some(server) = std::env::var("TELEGATE_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    else {
        println!("TELEGATE_TEST_POSTGRES_URL not set: PostgreSQL ingest groups skipped");
        return;
    };
    let mut group = c.benchmark_group("ingest_postgres");
    group.throughput(Throughput::Elements(ALARMS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, batch_max, wait_ms) in MODES {
        let database = rt
            .block_on(PgDatabase::create(&server))
            .expect("create a bench database");
        let url = StoreUrl::Postgres(database.url.clone());
        let store = rt.block_on(Store::open(&url)).expect("store opens");
        let ingest = start_ingest(&rt, store.clone(), &router, batch_max, wait_ms);
        group.bench_with_input(BenchmarkId::new(name, ALARMS), &ingest, |b, ingest| {
            b.to_async(&rt).iter(|| submit_all(ingest));
        });
        rt.block_on(store.close());
        rt.block_on(database.drop_now());
    }
    group.finish();
}

/// Starts a group-commit writer on `store` and returns its handle.
fn start_ingest(
    rt: &tokio::runtime::Runtime,
    store: Store,
    router: &Arc<Router>,
    batch_max: usize,
    wait_ms: u64,
) -> Ingest {
    let config = IngestConfig {
        batch_max,
        batch_wait: Duration::from_millis(wait_ms),
        dedupe_window: Duration::from_secs(600),
        queue: 10_000,
    };
    let (ingest, writer) = ingest::channel(
        store,
        config,
        Arc::clone(router),
        telegate::clock::system(),
        Arc::new(Metrics::default()),
        None,
    );
    rt.spawn(writer.run());
    ingest
}

criterion_group!(benches, bench_ingest);
criterion_main!(benches);
