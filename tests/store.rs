//! The store through its public API, against every backend: SQLite (a
//! temporary file) always, and PostgreSQL when `TELEGATE_TEST_POSTGRES_URL`
//! is set (each test in a database of its own, dropped at the end).
//!
//! Times are passed in explicitly, so leases and windows are exact.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use common::{stores, PgDatabase, StoreChoice};
use telegate::config::StoreUrl;
use telegate::deliver::plan::{Decision, Plan};
use telegate::deliver::{AttemptRecord, Claimed};
use telegate::model::{
    AlarmClass, AlarmDetails, AlarmId, DedupeKey, NewAlarm, SourceKind, SourceRef,
};
use telegate::route::Route;
use telegate::sla::SlaRow;
use telegate::store::{
    AlarmOutcome, Batch, BatchAlarm, Lease, ProgressReport, ProgressResult, ProgressState,
    QuarantineEntry, Store,
};

/// A store under test and what keeps its database alive.
struct TestStore {
    store: Store,
    name: &'static str,
    _dir: Option<tempfile::TempDir>,
    _database: Option<PgDatabase>,
}

impl TestStore {
    async fn open(choice: &StoreChoice) -> TestStore {
        eprintln!("store: {}", choice.name());
        match choice {
            StoreChoice::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = StoreUrl::Sqlite(dir.path().join("store.db"));
                TestStore {
                    store: Store::open(&url).await.expect("SQLite store opens"),
                    name: choice.name(),
                    _dir: Some(dir),
                    _database: None,
                }
            }
            StoreChoice::Postgres { url } => {
                let database = PgDatabase::create(url).await;
                let url = StoreUrl::Postgres(database.url.clone());
                TestStore {
                    store: Store::open(&url).await.expect("PostgreSQL store opens"),
                    name: choice.name(),
                    _dir: None,
                    _database: Some(database),
                }
            }
        }
    }

    async fn close(self) {
        self.store.close().await;
    }
}

/// 2026-11-22T10:00:00Z plus `ms` milliseconds.
fn t(ms: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap() + chrono::Duration::milliseconds(ms)
}

fn signal(device: &str, seq: u64, class: AlarmClass, received_at: DateTime<Utc>) -> NewAlarm {
    let code = class.name().to_owned();
    NewAlarm {
        dedupe_key: DedupeKey::for_device_signal("tn", device, seq, &code, false, None),
        tenant: "tn".into(),
        device_id: device.into(),
        account: None,
        seq: Some(seq),
        class,
        restore: false,
        raised_at: None,
        received_at,
        source: SourceRef {
            kind: SourceKind::Mqtt,
            id: "devices".into(),
            code,
        },
        details: AlarmDetails::default(),
        raw: format!("{{\"seq\":{seq}}}").into_bytes(),
    }
}

fn route(contract: Option<&str>) -> Route {
    Route {
        contract_id: contract.map(str::to_owned),
        chain: vec!["north".into(), "south".into()],
        failover_after: Duration::from_secs(10),
    }
}

fn batch_of(alarms: Vec<NewAlarm>) -> Batch {
    Batch {
        alarms: alarms
            .into_iter()
            .map(|alarm| BatchAlarm {
                id: AlarmId::new_v7(),
                alarm,
                route: route(Some("C-1")),
                leased: false,
            })
            .collect(),
        quarantine: Vec::new(),
        lease: None,
    }
}

/// Commits `alarms` as one batch stored at `stored_at` (window: the last
/// ten minutes) and returns their ids.
async fn commit(store: &Store, alarms: Vec<NewAlarm>, stored_at: DateTime<Utc>) -> Vec<AlarmId> {
    let window = chrono::Duration::minutes(10);
    store
        .commit_batch(&batch_of(alarms), stored_at, stored_at - window)
        .await
        .expect("batch commits")
        .into_iter()
        .map(AlarmOutcome::alarm_id)
        .collect()
}

fn attempt(c: &Claimed, at: DateTime<Utc>, detail: &str, decision: Decision) -> AttemptRecord {
    AttemptRecord {
        alarm_id: c.alarm.id,
        provider: c.plan.provider().to_owned(),
        started_at: at,
        finished_at: at + chrono::Duration::milliseconds(50),
        detail: detail.to_owned(),
        decision,
    }
}

fn stage_names(stages: &[telegate::store::StageTime]) -> Vec<&str> {
    stages.iter().map(|s| s.stage.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_alarms_outbox_rows_and_quarantine_rows_with_their_times() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let mut fall = signal("d1", 1, AlarmClass::Fall, t(0));
        fall.raised_at = Some(t(-2_000));
        fall.account = Some("acct".into());
        fall.details = AlarmDetails {
            zone: Some(3),
            sensor: Some("pendant".into()),
            battery_pct: Some(77),
            rssi: Some(-61),
            lat: Some(53.1),
            lon: Some(-1.5),
            text: Some("help".into()),
        };
        let flood = signal("d2", 1, AlarmClass::Flood, t(5));
        let mut batch = batch_of(vec![fall.clone(), flood]);
        batch.alarms[1].route = route(None);
        batch.quarantine.push(QuarantineEntry {
            received_at: t(7),
            source_kind: SourceKind::Mqtt,
            source_id: "devices".into(),
            reference: "telecare/tn/d3/alarm".into(),
            tenant: Some("tn".into()),
            device_id: Some("d3".into()),
            reason: "not_json".into(),
            detail: "expected a JSON object".into(),
            raw: vec![0xff, 0x00, b'{'],
        });
        let ids: Vec<AlarmId> = batch.alarms.iter().map(|b| b.id).collect();
        let outcomes = store
            .commit_batch(&batch, t(20), t(20) - chrono::Duration::minutes(10))
            .await
            .expect("batch commits");
        assert_eq!(
            outcomes,
            [AlarmOutcome::Stored(ids[0]), AlarmOutcome::Stored(ids[1])],
            "{}",
            ts.name
        );

        let stored = store.alarm(ids[0]).await.unwrap().expect("alarm stored");
        assert_eq!(stored.id, ids[0]);
        assert_eq!(stored.tenant, "tn");
        assert_eq!(stored.device_id, "d1");
        assert_eq!(stored.account.as_deref(), Some("acct"));
        assert_eq!(stored.seq, Some(1));
        assert_eq!(stored.class, AlarmClass::Fall);
        assert_eq!(stored.priority.number(), 1);
        assert!(!stored.restore);
        assert_eq!(stored.raised_at, Some(t(-2_000)));
        assert_eq!(stored.received_at, t(0));
        assert_eq!(stored.stored_at, t(20));
        assert_eq!(stored.source, fall.source);
        assert_eq!(stored.details, fall.details);
        assert_eq!(stored.raw, fall.raw);
        assert!(store.alarm(AlarmId::new_v7()).await.unwrap().is_none());

        let stages = store.stage_times(ids[0]).await.unwrap();
        assert_eq!(
            stage_names(&stages),
            ["raised", "received", "stored", "routed"]
        );
        let times: Vec<_> = stages.iter().map(|s| s.at).collect();
        assert_eq!(times, [t(-2_000), t(0), t(20), t(20)]);
        assert_eq!(stages[3].detail.as_deref(), Some("C-1"));
        let stages = store.stage_times(ids[1]).await.unwrap();
        assert_eq!(stage_names(&stages), ["received", "stored", "routed"]);
        assert_eq!(stages[2].detail.as_deref(), Some("uncontracted"));

        let row = store.outbox_row(ids[0]).await.unwrap().expect("outbox row");
        assert_eq!(row.state, "pending");
        assert_eq!(row.contract_id.as_deref(), Some("C-1"));
        assert_eq!(row.chain, ["north", "south"]);
        assert_eq!(row.position, 0);
        assert!(row.rejected.is_empty());
        assert!(!row.exhausted);
        assert_eq!(row.attempts, 0);
        assert_eq!((row.due_at, row.routed_at), (t(20), t(20)));
        assert_eq!((row.lease_owner, row.lease_until), (None, None));
        assert_eq!((row.accepted_at, row.accepted_by), (None, None));

        assert_eq!(store.count_alarms().await.unwrap(), 2);
        assert_eq!(store.count_outbox_pending().await.unwrap(), 2);
        assert_eq!(store.count_delivered().await.unwrap(), 0);
        let of_device = store.alarms_of_device("tn", "d2").await.unwrap();
        assert_eq!(of_device.len(), 1);
        assert_eq!(of_device[0].id, ids[1]);

        let quarantined = store.quarantine(10).await.unwrap();
        assert_eq!(quarantined.len(), 1);
        assert_eq!(quarantined[0].entry, batch.quarantine[0]);

        // A batch of quarantine rows alone is fine too.
        let only_quarantine = Batch {
            alarms: Vec::new(),
            quarantine: vec![batch.quarantine[0].clone()],
            lease: None,
        };
        let none = store
            .commit_batch(&only_quarantine, t(30), t(0))
            .await
            .unwrap();
        assert!(none.is_empty());
        let quarantined = store.quarantine(10).await.unwrap();
        assert_eq!(quarantined.len(), 2);
        assert!(quarantined[0].id > quarantined[1].id, "newest first");
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_signal_within_the_window_is_one_alarm_and_outside_it_a_new_one() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let window = chrono::Duration::minutes(10);
        let first = signal("d1", 7, AlarmClass::Fall, t(0));
        let stored = store
            .commit_batch(&batch_of(vec![first.clone()]), t(10), t(10) - window)
            .await
            .unwrap();
        let AlarmOutcome::Stored(id) = stored[0] else {
            panic!("{}: first copy not stored: {stored:?}", ts.name)
        };

        // A re-send a minute later: the same id, no new row.
        let resend = signal("d1", 7, AlarmClass::Fall, t(60_000));
        let again = store
            .commit_batch(
                &batch_of(vec![resend.clone()]),
                t(60_010),
                t(60_010) - window,
            )
            .await
            .unwrap();
        assert_eq!(again, [AlarmOutcome::Duplicate(id)], "{}", ts.name);

        // Duplicates within one batch: the first is stored, the rest point
        // at it; other signals in the batch are unaffected.
        let batch = batch_of(vec![
            signal("d2", 1, AlarmClass::Fall, t(70_000)),
            signal("d2", 2, AlarmClass::Fall, t(70_001)),
            signal("d2", 1, AlarmClass::Fall, t(70_002)),
            resend.clone(),
        ]);
        let ids: Vec<AlarmId> = batch.alarms.iter().map(|b| b.id).collect();
        let outcomes = store
            .commit_batch(&batch, t(70_010), t(70_010) - window)
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            [
                AlarmOutcome::Stored(ids[0]),
                AlarmOutcome::Stored(ids[1]),
                AlarmOutcome::Duplicate(ids[0]),
                AlarmOutcome::Duplicate(id),
            ],
            "{}",
            ts.name
        );

        // The same signal after the window: a new alarm (a rebooted device
        // that counts from the start again).
        let later = signal("d1", 7, AlarmClass::Fall, t(700_000));
        let outcomes = store
            .commit_batch(&batch_of(vec![later]), t(700_010), t(700_010) - window)
            .await
            .unwrap();
        let AlarmOutcome::Stored(new_id) = outcomes[0] else {
            panic!("{}: outside the window: {outcomes:?}", ts.name)
        };
        assert_ne!(new_id, id);
        assert_eq!(store.count_alarms().await.unwrap(), 4);
        assert_eq!(store.count_outbox_pending().await.unwrap(), 4);
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_resent_signal_of_a_large_batch_finds_its_own_first_copy() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        // Some alarms first, so that the batch's rows do not start at 1, and
        // a batch whose size is not a power of two.
        commit(
            store,
            vec![signal("earlier", 1, AlarmClass::Fall, t(0))],
            t(5),
        )
        .await;
        let signals: Vec<NewAlarm> = (0..37)
            .map(|i| signal(&format!("d{i}"), i, AlarmClass::Fall, t(1_000 + i as i64)))
            .collect();
        let first = commit(store, signals.clone(), t(2_000)).await;
        // Re-sent in the opposite order, each signal is a duplicate of its
        // own first copy.
        let resent: Vec<NewAlarm> = signals.into_iter().rev().collect();
        let window = chrono::Duration::minutes(10);
        let outcomes = store
            .commit_batch(&batch_of(resent), t(3_000), t(3_000) - window)
            .await
            .unwrap();
        let expected: Vec<AlarmOutcome> = first
            .iter()
            .rev()
            .map(|id| AlarmOutcome::Duplicate(*id))
            .collect();
        assert_eq!(outcomes, expected, "{}", ts.name);
        assert_eq!(store.count_alarms().await.unwrap(), 38, "{}", ts.name);
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_batch_through_a_padded_statement_writes_its_own_rows_only() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        // Four rows, then three through the same statement padded to four:
        // nothing of the first batch's fourth row is written again.
        let four = (0..4).map(|i| signal("e", i, AlarmClass::Fall, t(4_000 + i as i64)));
        commit(store, four.collect(), t(4_500)).await;
        let three = (4..7).map(|i| signal("e", i, AlarmClass::Fall, t(4_000 + i as i64)));
        commit(store, three.collect(), t(4_600)).await;
        assert_eq!(store.count_alarms().await.unwrap(), 7, "{}", ts.name);
        assert_eq!(
            store.count_outbox_pending().await.unwrap(),
            7,
            "{}",
            ts.name
        );
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_half_way_stores_nothing_and_later_batches_commit() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        // More failures than the pool has connections: a failed commit must
        // leave no connection holding a transaction or the write lock.
        for round in 0..6u64 {
            // Two alarms under one id: the second insert breaks the primary
            // key after the first has gone in.
            let mut batch = batch_of(vec![
                signal("d1", round, AlarmClass::Fall, t(0)),
                signal("d2", round, AlarmClass::Flood, t(0)),
            ]);
            batch.alarms[1].id = batch.alarms[0].id;
            let failed = store.commit_batch(&batch, t(10), t(0)).await;
            assert!(failed.is_err(), "{}: round {round}: {failed:?}", ts.name);
            assert_eq!(store.count_alarms().await.unwrap(), round, "{}", ts.name);
            assert_eq!(store.count_outbox_pending().await.unwrap(), round);

            // The same signals, sent again as a sound batch, are new alarms.
            let ids = commit(
                store,
                vec![signal("d1", round, AlarmClass::Fall, t(0))],
                t(20),
            )
            .await;
            let stored = store.alarm(ids[0]).await.unwrap().expect("stored");
            assert_eq!(stored.device_id, "d1");
        }
        assert_eq!(store.count_outbox_pending().await.unwrap(), 6);
        ts.close().await;
    }
}

/// SQLite stores keep the window's keys in memory; two processes on one
/// file (here two stores) and a store opened again must still see every
/// alarm the others stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stores_sharing_a_file_and_a_reopened_store_find_each_others_duplicates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = StoreUrl::Sqlite(dir.path().join("shared.db"));
    let window = chrono::Duration::minutes(10);
    let first = Store::open(&url).await.expect("opens");
    let second = Store::open(&url).await.expect("opens");
    let outcome = |store: &Store, device: &str, at: i64| {
        let store = store.clone();
        let batch = batch_of(vec![signal(device, 1, AlarmClass::Fall, t(at))]);
        async move {
            store
                .commit_batch(&batch, t(at + 10), t(at + 10) - window)
                .await
                .expect("commits")[0]
        }
    };

    let AlarmOutcome::Stored(d1) = outcome(&first, "d1", 0).await else {
        panic!("d1 not stored")
    };
    assert_eq!(
        outcome(&second, "d1", 1_000).await,
        AlarmOutcome::Duplicate(d1)
    );
    // Both have loaded their keys now; later rows reach the other too.
    let AlarmOutcome::Stored(d2) = outcome(&second, "d2", 2_000).await else {
        panic!("d2 not stored")
    };
    assert_eq!(
        outcome(&first, "d2", 3_000).await,
        AlarmOutcome::Duplicate(d2)
    );
    first.close().await;
    second.close().await;

    let reopened = Store::open(&url).await.expect("opens again");
    assert_eq!(
        outcome(&reopened, "d1", 4_000).await,
        AlarmOutcome::Duplicate(d1)
    );
    assert_eq!(
        outcome(&reopened, "d2", 5_000).await,
        AlarmOutcome::Duplicate(d2)
    );
    // Outside the window the same signal is a new alarm.
    let AlarmOutcome::Stored(later) = outcome(&reopened, "d1", 700_000).await else {
        panic!("d1 not stored again after the window")
    };
    assert_ne!(later, d1);
    assert_eq!(reopened.count_alarms().await.unwrap(), 3);
    reopened.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_of_one_signal_store_one_alarm() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        // As two gateway instances would: each its own batch, at once.
        for round in 0..5u64 {
            let mut tasks = Vec::new();
            for n in 0..6u64 {
                let store = ts.store.clone();
                let alarms = vec![
                    signal("d1", round, AlarmClass::Fall, t(0)),
                    signal(&format!("other-{n}"), round, AlarmClass::Flood, t(0)),
                ];
                tasks.push(tokio::spawn(
                    async move { commit(&store, alarms, t(10)).await },
                ));
            }
            let mut ids = HashSet::new();
            for task in tasks {
                ids.insert(task.await.expect("task")[0]);
            }
            assert_eq!(ids.len(), 1, "{}: round {round}: {ids:?}", ts.name);
        }
        assert_eq!(ts.store.count_alarms().await.unwrap(), 5 * 7);
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_rows_are_claimed_most_urgent_first_and_not_again_until_the_lease_ends() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let routine = commit(store, vec![signal("d1", 1, AlarmClass::Test, t(0))], t(0)).await[0];
        let urgent = commit(store, vec![signal("d2", 1, AlarmClass::Flood, t(5))], t(10)).await[0];
        let critical =
            commit(store, vec![signal("d3", 1, AlarmClass::Fall, t(15))], t(20)).await[0];
        let later = commit(
            store,
            vec![signal("d4", 1, AlarmClass::Fall, t(900))],
            t(1_000),
        )
        .await[0];

        assert!(store
            .claim_due("a", t(-1), t(30_000), 10)
            .await
            .unwrap()
            .is_empty());

        // Two at a time: the most urgent first; `later` is not due yet.
        let first = store.claim_due("a", t(500), t(30_500), 2).await.unwrap();
        let ids: Vec<AlarmId> = first.iter().map(|c| c.alarm.id).collect();
        assert_eq!(ids, [critical, urgent], "{}", ts.name);
        let c = &first[0];
        assert_eq!(c.contract_id.as_deref(), Some("C-1"));
        assert_eq!(c.alarm.class, AlarmClass::Fall);
        assert_eq!(c.plan.chain, ["north", "south"]);
        assert_eq!((c.plan.position, c.plan.attempts), (0, 0));
        assert_eq!(c.plan.stored_at, t(20));
        assert_eq!(c.plan.failover_after, Duration::from_secs(10));
        let row = store.outbox_row(critical).await.unwrap().unwrap();
        assert_eq!(row.lease_owner.as_deref(), Some("a"));
        assert_eq!(row.lease_until, Some(t(30_500)));

        let rest = store.claim_due("b", t(2_000), t(32_000), 10).await.unwrap();
        let ids: Vec<AlarmId> = rest.iter().map(|c| c.alarm.id).collect();
        assert_eq!(ids, [later, routine], "{}: leased rows skipped", ts.name);
        assert!(store
            .claim_due("c", t(30_499), t(60_000), 10)
            .await
            .unwrap()
            .is_empty());

        // Once the lease has run out, another owner gets the rows.
        let again = store
            .claim_due("c", t(30_500), t(60_000), 10)
            .await
            .unwrap();
        let ids: Vec<AlarmId> = again.iter().map(|c| c.alarm.id).collect();
        assert_eq!(ids, [critical, urgent], "{}", ts.name);
        let row = store.outbox_row(urgent).await.unwrap().unwrap();
        assert_eq!(row.lease_owner.as_deref(), Some("c"));
        ts.close().await;
    }
}

/// Rows stored already claimed (the hand-off from ingest to delivery) are
/// claimed by nobody else until the lease runs out, and then read back
/// exactly as the writer handed them over.
#[tokio::test]
async fn rows_stored_with_a_lease_stay_with_their_owner_until_it_runs_out() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let fall = signal("d1", 1, AlarmClass::Fall, t(0));
        let mut batch = batch_of(vec![fall.clone(), signal("d2", 1, AlarmClass::Test, t(1))]);
        batch.alarms[0].leased = true;
        batch.lease = Some(Lease {
            owner: "gw-1".into(),
            until: t(30_000),
        });
        let stored_at = t(5);
        let ids: Vec<AlarmId> = store
            .commit_batch(&batch, stored_at, t(-600_000))
            .await
            .expect("batch commits")
            .into_iter()
            .map(AlarmOutcome::alarm_id)
            .collect();

        let leased = store.outbox_row(ids[0]).await.unwrap().unwrap();
        assert_eq!(leased.lease_owner.as_deref(), Some("gw-1"), "{}", ts.name);
        assert_eq!(leased.lease_until, Some(t(30_000)));
        let free = store.outbox_row(ids[1]).await.unwrap().unwrap();
        assert_eq!((free.lease_owner, free.lease_until), (None, None));

        let other = store
            .claim_due("gw-2", t(100), t(60_000), 10)
            .await
            .unwrap();
        let claimed: Vec<AlarmId> = other.iter().map(|c| c.alarm.id).collect();
        assert_eq!(claimed, [ids[1]], "{}: only the unleased row", ts.name);

        let after = store
            .claim_due("gw-2", t(30_000), t(60_000), 10)
            .await
            .unwrap();
        assert_eq!(after.len(), 1, "{}: the lease ran out", ts.name);
        let row = &after[0];
        assert_eq!(
            row.alarm,
            fall.into_stored(ids[0], stored_at),
            "{}",
            ts.name
        );
        assert_eq!(row.plan, Plan::first(&route(Some("C-1")), stored_at));
        assert_eq!(row.contract_id.as_deref(), Some("C-1"));
        assert_eq!(row.lease_until, t(60_000));
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_return_the_same_row() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let alarms: Vec<NewAlarm> = (0..200)
            .map(|n| signal(&format!("d{}", n % 13), n, AlarmClass::Fall, t(0)))
            .collect();
        commit(&ts.store, alarms, t(0)).await;
        let mut tasks = Vec::new();
        for owner in 0..4 {
            let store = ts.store.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let claimed = store
                        .claim_due(&format!("instance-{owner}"), t(1_000), t(60_000), 7)
                        .await
                        .expect("claim");
                    if claimed.is_empty() {
                        return got;
                    }
                    got.extend(claimed.into_iter().map(|c| c.alarm.id));
                }
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("task"));
        }
        let distinct: HashSet<AlarmId> = all.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            all.len(),
            "{}: a row claimed twice",
            ts.name
        );
        assert_eq!(all.len(), 200, "{}", ts.name);
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_move_rows_to_delivered_retry_or_dead_letter_with_their_stages() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let ids = commit(
            store,
            vec![
                signal("d1", 1, AlarmClass::Fall, t(0)),
                signal("d2", 1, AlarmClass::Fall, t(0)),
                signal("d3", 1, AlarmClass::Fall, t(0)),
            ],
            t(10),
        )
        .await;
        let claimed = store.claim_due("a", t(100), t(30_000), 10).await.unwrap();
        assert_eq!(claimed.len(), 3);
        let by_id = |id: AlarmId| claimed.iter().find(|c| c.alarm.id == id).expect("claimed");
        let (delivered, retried, dead) = (by_id(ids[0]), by_id(ids[1]), by_id(ids[2]));

        let mut retry_plan = retried.plan.clone();
        retry_plan.attempts = 1;
        retry_plan.provider_attempts = 0;
        retry_plan.position = 1;
        let mut dead_plan = dead.plan.clone();
        dead_plan.attempts = 2;
        dead_plan.provider_attempts = 1;
        dead_plan.rejected = vec!["north".into(), "south".into()];
        store
            .record_attempts(&[
                attempt(delivered, t(200), "HTTP 200", Decision::Delivered),
                attempt(
                    retried,
                    t(200),
                    "timed out",
                    Decision::Retry {
                        plan: retry_plan,
                        due_at: t(5_000),
                    },
                ),
                attempt(
                    dead,
                    t(200),
                    "HTTP 400",
                    Decision::DeadLetter { plan: dead_plan },
                ),
            ])
            .await
            .unwrap();
        store.record_attempts(&[]).await.unwrap();

        let row = store.outbox_row(ids[0]).await.unwrap().unwrap();
        assert_eq!(row.state, "delivered", "{}", ts.name);
        assert_eq!(row.accepted_by.as_deref(), Some("north"));
        assert_eq!(row.accepted_at, Some(t(250)));
        assert_eq!(row.attempts, 1);
        assert_eq!((row.lease_owner, row.lease_until), (None, None));
        let stages = store.stage_times(ids[0]).await.unwrap();
        assert_eq!(
            stage_names(&stages),
            ["received", "stored", "routed", "attempt", "accepted"]
        );
        assert_eq!(stages[3].at, t(200));
        assert_eq!(stages[3].provider.as_deref(), Some("north"));
        assert_eq!(stages[3].detail.as_deref(), Some("HTTP 200"));
        assert_eq!(stages[4].at, t(250));

        let row = store.outbox_row(ids[1]).await.unwrap().unwrap();
        assert_eq!(row.state, "pending", "{}", ts.name);
        assert_eq!((row.position, row.attempts), (1, 1));
        assert_eq!(row.due_at, t(5_000));
        assert_eq!((row.lease_owner, row.lease_until), (None, None));
        let stages = store.stage_times(ids[1]).await.unwrap();
        assert_eq!(
            stage_names(&stages),
            ["received", "stored", "routed", "attempt"]
        );
        assert_eq!(stages[3].detail.as_deref(), Some("timed out"));

        let row = store.outbox_row(ids[2]).await.unwrap().unwrap();
        assert_eq!(row.state, "dead_letter", "{}", ts.name);
        assert_eq!(row.rejected, ["north", "south"]);
        assert_eq!(row.attempts, 2);
        let stages = store.stage_times(ids[2]).await.unwrap();
        assert_eq!(
            stage_names(&stages),
            ["received", "stored", "routed", "attempt", "dead_letter"]
        );
        assert_eq!(stages[4].provider, None);
        assert_eq!(stages[4].at, t(250));
        assert_eq!(
            stages[4].detail.as_deref(),
            Some("every provider rejected the alarm")
        );

        assert_eq!(store.count_delivered().await.unwrap(), 1);
        assert_eq!(store.count_outbox_pending().await.unwrap(), 1);

        // Only the retried alarm comes back, when due, at its new position.
        assert!(store
            .claim_due("a", t(4_999), t(60_000), 10)
            .await
            .unwrap()
            .is_empty());
        let again = store.claim_due("a", t(5_000), t(60_000), 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].alarm.id, ids[1]);
        assert_eq!(again[0].plan.position, 1);
        assert_eq!(again[0].plan.attempts, 1);
        assert_eq!(again[0].plan.provider(), "south");
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_is_offered_to_a_provider_once_attempted_or_while_in_flight() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let id = commit(store, vec![signal("d1", 1, AlarmClass::Fall, t(0))], t(10)).await[0];
        assert!(!store.offered_to(id, "north", t(20)).await.unwrap());

        let claimed = store.claim_due("a", t(20), t(30_000), 1).await.unwrap();
        assert!(
            store.offered_to(id, "north", t(25)).await.unwrap(),
            "in flight"
        );
        assert!(!store.offered_to(id, "south", t(25)).await.unwrap());
        assert!(
            !store.offered_to(id, "north", t(30_000)).await.unwrap(),
            "{}: the lease ran out before any attempt",
            ts.name
        );

        let mut plan = claimed[0].plan.clone();
        plan.attempts = 1;
        plan.position = 1;
        store
            .record_attempts(&[attempt(
                &claimed[0],
                t(100),
                "HTTP 503",
                Decision::Retry {
                    plan,
                    due_at: t(200),
                },
            )])
            .await
            .unwrap();
        assert!(
            store.offered_to(id, "north", t(300)).await.unwrap(),
            "attempted"
        );
        assert!(!store.offered_to(id, "south", t(300)).await.unwrap());
        assert!(!store
            .offered_to(AlarmId::new_v7(), "north", t(300))
            .await
            .unwrap());
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_recorded_once_and_never_goes_backwards() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let ids = commit(
            store,
            vec![
                signal("d1", 1, AlarmClass::Fall, t(0)),
                signal("d2", 1, AlarmClass::Fall, t(0)),
            ],
            t(10),
        )
        .await;
        let report = |id: AlarmId, state: ProgressState, at: i64| ProgressReport {
            alarm_id: id,
            provider: "north".into(),
            state,
            at: t(at),
            reported_at: t(at + 5),
            outcome: Some("carer sent".into()),
        };
        let answered = report(ids[0], ProgressState::Answered, 1_000);
        assert_eq!(
            store.record_progress(&answered).await.unwrap(),
            ProgressResult::Recorded,
            "{}",
            ts.name
        );
        let repeat = report(ids[0], ProgressState::Answered, 2_000);
        assert_eq!(
            store.record_progress(&repeat).await.unwrap(),
            ProgressResult::Repeated
        );
        let resolved = report(ids[0], ProgressState::Resolved, 3_000);
        assert_eq!(
            store.record_progress(&resolved).await.unwrap(),
            ProgressResult::Recorded
        );
        assert_eq!(
            store.record_progress(&repeat).await.unwrap(),
            ProgressResult::Backwards,
            "{}: answered after resolved",
            ts.name
        );
        assert_eq!(
            store.record_progress(&resolved).await.unwrap(),
            ProgressResult::Repeated
        );
        let stages = store.stage_times(ids[0]).await.unwrap();
        assert_eq!(
            stage_names(&stages),
            ["received", "stored", "routed", "answered", "resolved"]
        );
        assert_eq!(stages[3].at, t(1_000), "the first report's time is kept");
        assert_eq!(stages[3].provider.as_deref(), Some("north"));
        assert_eq!(stages[3].detail.as_deref(), Some("carer sent"));

        // Resolved without answered: answered can no longer come.
        let resolved = report(ids[1], ProgressState::Resolved, 1_000);
        assert_eq!(
            store.record_progress(&resolved).await.unwrap(),
            ProgressResult::Recorded
        );
        let answered = report(ids[1], ProgressState::Answered, 900);
        assert_eq!(
            store.record_progress(&answered).await.unwrap(),
            ProgressResult::Backwards
        );
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sla_rows_carry_acceptance_fallback_and_answer_times() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let mut batch = batch_of(vec![
            signal("d1", 1, AlarmClass::Fall, t(0)),
            signal("d2", 1, AlarmClass::Fall, t(1_000)),
            signal("d3", 1, AlarmClass::Fall, t(2_000)),
            signal("d4", 1, AlarmClass::Fall, t(-1)),
            signal("d5", 1, AlarmClass::Fall, t(10_000)),
        ]);
        batch.alarms[2].route = route(None);
        let ids: Vec<AlarmId> = batch.alarms.iter().map(|b| b.id).collect();
        store
            .commit_batch(&batch, t(2_010), t(-600_000))
            .await
            .unwrap();
        let claimed = store.claim_due("a", t(2_100), t(60_000), 10).await.unwrap();
        let by_id = |id: AlarmId| claimed.iter().find(|c| c.alarm.id == id).expect("claimed");
        // d1 accepted by the primary, d2 by the fallback, d3 not at all.
        let mut fallback = by_id(ids[1]).clone();
        fallback.plan.position = 1;
        store
            .record_attempts(&[
                attempt(by_id(ids[0]), t(3_000), "HTTP 200", Decision::Delivered),
                attempt(&fallback, t(4_000), "HTTP 200", Decision::Delivered),
            ])
            .await
            .unwrap();
        store
            .record_progress(&ProgressReport {
                alarm_id: ids[0],
                provider: "north".into(),
                state: ProgressState::Answered,
                at: t(20_000),
                reported_at: t(20_100),
                outcome: None,
            })
            .await
            .unwrap();

        let mut rows = store.sla_rows(t(0), t(10_000)).await.unwrap();
        rows.sort_by_key(|r| r.received_at);
        assert_eq!(
            rows,
            [
                SlaRow {
                    contract_id: Some("C-1".into()),
                    received_at: t(0),
                    accepted_at: Some(t(3_050)),
                    by_fallback: false,
                    answered_at: Some(t(20_000)),
                },
                SlaRow {
                    contract_id: Some("C-1".into()),
                    received_at: t(1_000),
                    accepted_at: Some(t(4_050)),
                    by_fallback: true,
                    answered_at: None,
                },
                SlaRow {
                    contract_id: None,
                    received_at: t(2_000),
                    accepted_at: None,
                    by_fallback: false,
                    answered_at: None,
                },
            ],
            "{}",
            ts.name
        );
        ts.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_leases_let_the_rows_be_claimed_again_at_once() {
    for choice in stores() {
        let ts = TestStore::open(&choice).await;
        let store = &ts.store;
        let ids = commit(
            store,
            vec![
                signal("d1", 1, AlarmClass::Fall, t(0)),
                signal("d2", 1, AlarmClass::Flood, t(0)),
                signal("d3", 1, AlarmClass::Test, t(0)),
            ],
            t(10),
        )
        .await;
        assert_eq!(
            store
                .claim_due("old", t(20), t(60_000), 2)
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            store
                .claim_due("other", t(20), t(60_000), 2)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(store.release_leases("nobody").await.unwrap(), 0);
        assert_eq!(store.release_leases("old").await.unwrap(), 2, "{}", ts.name);
        let row = store.outbox_row(ids[0]).await.unwrap().unwrap();
        assert_eq!((row.lease_owner, row.lease_until), (None, None));
        let row = store.outbox_row(ids[2]).await.unwrap().unwrap();
        assert_eq!(
            row.lease_owner.as_deref(),
            Some("other"),
            "other owners keep theirs"
        );

        let again = store.claim_due("new", t(30), t(60_000), 10).await.unwrap();
        let got: Vec<AlarmId> = again.iter().map(|c| c.alarm.id).collect();
        assert_eq!(got, [ids[0], ids[1]], "{}", ts.name);
        ts.close().await;
    }
}

/// A SQLite database written before the index changes of 2026-11-23: its
/// pending alarm is still claimed for delivery and its dead letter still
/// listed for an operator once the store opens it and brings it up to date.
#[tokio::test]
async fn a_sqlite_database_from_the_first_schema_opens_with_its_work_intact() {
    use sqlx::ConnectOptions as _;
    use telegate::store::Attention;

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("old.db");
    // The schema as the first release left it: its two migrations only.
    let first = dir.path().join("first-migrations");
    std::fs::create_dir(&first).unwrap();
    for name in [
        "20261122000001_init.sql",
        "20261122000002_dedupe_keys_in_memory.sql",
    ] {
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations/sqlite")
            .join(name);
        std::fs::copy(from, first.join(name)).unwrap();
    }
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .connect()
        .await
        .unwrap();
    sqlx::migrate::Migrator::new(first.as_path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    let (pending, dead) = (AlarmId::new_v7(), AlarmId::new_v7());
    for (id, received, state) in [(pending, 1_000, "pending"), (dead, 2_000, "dead_letter")] {
        sqlx::query(
            "INSERT INTO alarms (id, tenant, device_id, class, priority, restore, received_at, \
             stored_at, source_kind, source_id, source_code, raw, dedupe_key) \
             VALUES (?, 'tn', 'd1', 'personal_emergency', 1, 0, ?, ?, 'mqtt', 'm', '1101', x'7b7d', ?)",
        )
        .bind(id.to_string())
        .bind(received)
        .bind(received)
        .bind(format!("key-{id}"))
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO outbox (alarm_id, priority, state, chain, failover_after_ms, stored_at, \
             routed_at, due_at) VALUES (?, 1, ?, '[\"arc\"]', 60000, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(state)
        .bind(received)
        .bind(received)
        .bind(received)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    drop(conn);

    let store = Store::open(&StoreUrl::Sqlite(path))
        .await
        .expect("the old database opens and is brought up to date");
    let claimed = store
        .claim_due("gw", t(5_000), t(65_000), 10)
        .await
        .unwrap();
    let got: Vec<AlarmId> = claimed.iter().map(|c| c.alarm.id).collect();
    assert_eq!(got, [pending], "only the pending alarm is due");
    let listed = store
        .alarms_needing_attention(Attention::DeadLetter, 10)
        .await
        .unwrap();
    let got: Vec<AlarmId> = listed.iter().map(|l| l.id).collect();
    assert_eq!(got, [dead]);
    assert_eq!(store.alarms_of_device("tn", "d1").await.unwrap().len(), 2);
    store.close().await;
}
