//! The store's work for a delivered alarm, without the rest of the gateway:
//! each iteration commits one group-commit batch of alarms with their outbox
//! rows (claimed for delivery, as the ingest writer stores them), then
//! records the provider's acceptance of each (the attempt and acceptance
//! stages, and the outbox row's new state), as the delivery recorder does.
//! SQLite with `synchronous=FULL`, in a temporary folder.
//!
//! What is timed is the CPU the process spends (every thread: the runtime's
//! and SQLite's), not the time on the clock, which waits for the disk's
//! flushes and varies with them far more than the work does.
//!
//! `cargo bench --bench store`; criterion prints the time per batch and the
//! throughput in elements (delivered alarms) per second of CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use telegate::config::StoreUrl;
use telegate::deliver::plan::Decision;
use telegate::deliver::AttemptRecord;
use telegate::model::AlarmId;
use telegate::route::Router;
use telegate::store::{Batch, BatchAlarm, Lease, Store};

#[path = "support/workload.rs"]
mod workload;

/// Alarms per batch: about what the writer gathers at 8,000 alarms/s, and
/// not a power of two, so the multi-row statements carry their padding as
/// most batches do.
const ALARMS: usize = 100;

/// Batches run, all iterations together.
static BATCHES: AtomicU64 = AtomicU64::new(0);

fn batch(router: &Router) -> Batch {
    let alarms = (0..ALARMS)
        .map(|_| {
            let alarm = workload::alarm();
            let route = router.route(&alarm.tenant, alarm.priority(), alarm.received_at);
            BatchAlarm {
                id: AlarmId::new_v7(),
                alarm,
                route,
                leased: true,
            }
        })
        .collect();
    Batch {
        alarms,
        quarantine: Vec::new(),
        lease: Some(Lease {
            owner: "bench".into(),
            until: Utc::now() + chrono::Duration::seconds(60),
        }),
    }
}

/// The CPU time the process has used so far, all its threads together.
fn process_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec for the call to fill in.
    let done = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(done, 0, "the process CPU clock is readable");
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

async fn store_and_deliver(store: &Store, batch: Batch) {
    let now = Utc::now();
    let stored = store
        .commit_batch(&batch, now, now - chrono::Duration::seconds(600))
        .await
        .expect("batch commits");
    let records: Vec<AttemptRecord> = stored
        .iter()
        .map(|outcome| AttemptRecord {
            alarm_id: outcome.alarm_id(),
            provider: "arc".into(),
            started_at: now,
            finished_at: Utc::now(),
            detail: "HTTP 200".into(),
            decision: Decision::Delivered,
        })
        .collect();
    store
        .record_attempts(&records)
        .await
        .expect("attempts recorded");
}

fn bench_store(c: &mut Criterion) {
    let rt = workload::runtime();
    let router = workload::router();
    let dir = tempfile::tempdir().expect("temp dir");
    let url = StoreUrl::Sqlite(dir.path().join("bench.db"));
    let store = rt.block_on(Store::open(&url)).expect("store opens");

    let mut group = c.benchmark_group("store_sqlite");
    group.throughput(Throughput::Elements(ALARMS as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("delivered_alarms", |b| {
        b.to_async(&rt).iter_custom(|iterations| {
            let (store, router) = (&store, &router);
            async move {
                let mut spent = Duration::ZERO;
                BATCHES.fetch_add(iterations, Ordering::Relaxed);
                for _ in 0..iterations {
                    let batch = batch(router);
                    let before = process_cpu();
                    store_and_deliver(store, batch).await;
                    spent += process_cpu().saturating_sub(before);
                }
                spent
            }
        });
    });
    group.finish();
    rt.block_on(store.close());
    // For instruction counts under `valgrind --tool=callgrind … --profile-time N`.
    println!(
        "store bench: {} alarms stored and delivered",
        BATCHES.load(Ordering::Relaxed) * ALARMS as u64
    );
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
