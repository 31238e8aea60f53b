//! The simulated device fleet against the real gateway: devices re-send what
//! the gateway did not acknowledge, and a device that reboots (its sequence
//! numbers start again) never has a new alarm swallowed as a duplicate.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{unique, BrokerChoice, Harness, WAIT};
use firmware_sim::fleet::{Fleet, FleetConfig};
use telegate::metrics::Metrics;

fn fleet_config(h: &Harness, tenant: &str) -> FleetConfig {
    let mut config = FleetConfig::new(h.host.clone(), h.port);
    config.client_prefix = unique("fleet-");
    config.connections = 2;
    config.tenants = vec![tenant.to_owned()];
    config.devices = 10;
    config.rate = 100.0;
    config.heartbeat_interval = Duration::ZERO;
    config.resend_after = Duration::from_millis(200);
    config.seed = 3;
    config
}

/// Every alarm row of `tenant`, by (device, seq, raised_at).
async fn rows(h: &Harness, fleet: &Fleet, tenant: &str) -> Vec<telegate::model::Alarm> {
    let devices: HashSet<String> = fleet.alarms().into_iter().map(|a| a.device_id).collect();
    let mut all = Vec::new();
    for device in devices {
        all.extend(
            h.gateway
                .store
                .alarms_of_device(tenant, &device)
                .await
                .unwrap(),
        );
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_resend_until_acknowledged_and_each_alarm_is_stored_once() {
    let h = Harness::start(&BrokerChoice::Embedded).await;
    let tenant = unique("t");
    // The store refuses this tenant's alarms for a while: no replies, so the
    // devices must re-send.
    let refusal = common::StoreRefusal::new(&h, &tenant).await;

    let fleet = Fleet::start(fleet_config(&h, &tenant))
        .await
        .expect("fleet starts");
    assert!(
        fleet.wait_until(WAIT, |s| s.resends >= 5).await,
        "devices re-send while unanswered: {:?}",
        fleet.stats()
    );
    assert_eq!(
        fleet.stats().acked,
        0,
        "nothing is acknowledged while the store refuses"
    );
    fleet.stop_sending();
    refusal.lift().await;
    assert!(
        fleet.drain(WAIT).await,
        "every alarm acknowledged once the store is back: {:?}",
        fleet.stats()
    );

    let stats = fleet.stats();
    assert!(stats.sent > 0 && stats.acked == stats.sent, "{stats:?}");
    let stored = rows(&h, &fleet, &tenant).await;
    assert_eq!(
        stored.len() as u64,
        stats.sent,
        "each alarm stored once however often it was sent"
    );
    let ids: HashSet<String> = fleet
        .alarms()
        .into_iter()
        .filter_map(|a| a.alarm_id)
        .collect();
    let stored_ids: HashSet<String> = stored.iter().map(|a| a.id.to_string()).collect();
    assert_eq!(
        ids, stored_ids,
        "the ids the devices got are the stored alarms"
    );
    assert!(Metrics::get(&h.gateway.metrics.store_commit_failures) > 0);
    fleet.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooted_device_starts_its_sequence_again_and_nothing_is_swallowed() {
    let h = Harness::start(&BrokerChoice::Embedded).await;
    let tenant = unique("t");
    let mut config = fleet_config(&h, &tenant);
    config.devices = 4;
    config.reboot_share = 0.3;
    let fleet = Fleet::start(config).await.expect("fleet starts");
    assert!(
        fleet
            .wait_until(WAIT, |s| s.reboots >= 6 && s.sent >= 60)
            .await,
        "{:?}",
        fleet.stats()
    );
    fleet.stop_sending();
    assert!(fleet.drain(WAIT).await, "{:?}", fleet.stats());

    let sent = fleet.alarms();
    // Some device used the same sequence number for two different alarms.
    let mut by_seq: HashMap<(String, u32), usize> = HashMap::new();
    for a in &sent {
        *by_seq.entry((a.device_id.clone(), a.seq)).or_default() += 1;
    }
    assert!(
        by_seq.values().any(|&n| n >= 2),
        "reboots reused sequence numbers"
    );
    // Every one of them was a new alarm to the gateway.
    assert!(
        sent.iter().all(|a| a.status.as_deref() == Some("accepted")),
        "none answered duplicate"
    );
    let ids: HashSet<_> = sent.iter().filter_map(|a| a.alarm_id.clone()).collect();
    assert_eq!(ids.len(), sent.len(), "a distinct alarm id for every alarm");
    assert_eq!(rows(&h, &fleet, &tenant).await.len(), sent.len());
    fleet.shutdown().await;
    h.stop().await;
}
