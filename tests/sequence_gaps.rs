//! A device whose sequence numbers jump shows messages lost before the
//! gateway (a broker dropping QoS 1 messages): counted, and taken back when
//! the missing alarms arrive late.

mod common;

use common::{brokers, unique, Harness};
use serde_json::json;
use telegate::metrics::Metrics;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_sequence_numbers_are_counted_and_late_arrivals_credited() {
    for broker in brokers() {
        let h = Harness::start(&broker).await;
        let mut dev = h.device(&unique("t"), "unit-1").await;
        for seq in [1, 2, 5] {
            let reply = dev.send(json!({"seq": seq, "event": "test"})).await;
            assert_eq!(reply["status"], "accepted");
        }
        let m = &h.gateway.metrics;
        assert_eq!(
            Metrics::get(&m.seq_gaps),
            2,
            "{}: 3 and 4 never arrived",
            broker.name()
        );
        dev.send(json!({"seq": 3, "event": "test"})).await;
        assert_eq!(Metrics::get(&m.seq_gaps_filled), 1, "3 came late after all");
        // A reboot starts the numbers again: no gap.
        dev.send(json!({"seq": 1, "event": "check_in"})).await;
        dev.send(json!({"seq": 2, "event": "check_in"})).await;
        assert_eq!(Metrics::get(&m.seq_gaps), 2);
        h.stop().await;
    }
}
