//! Alarms per second committed through the ingest path (queue → group-commit
//! writer → store), with group commit and with one transaction per alarm:
//! SQLite with `synchronous=FULL` always, and PostgreSQL when
//! `TELEGATE_TEST_POSTGRES_URL` is set (each run in a fresh database of its
//! own on that server, dropped afterwards).
//!
//! `cargo bench --bench ingest`; criterion prints the throughput in
//! elements (alarms) per second.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use telegate::config::{IngestConfig, StoreUrl};
use telegate::ingest::{self, Ingest};
use telegate::metrics::Metrics;
use telegate::route::Router;
use telegate::store::Store;

#[path = "support/pg.rs"]
mod pg;
use pg::PgDatabase;
#[path = "support/workload.rs"]
mod workload;
use workload::alarm;

/// Alarms submitted concurrently per iteration.
const ALARMS: usize = 1_000;

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
    let rt = workload::runtime();
    let router = Arc::new(workload::router());

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
        commit_interval: Duration::ZERO,
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
