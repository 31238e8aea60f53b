//! MQTT ingest through the gateway's public interfaces: a real broker, a
//! real SQLite file, devices that publish and read their replies.

mod common;

use common::{brokers, matrix, unique, Device, Harness, NO_DELIVERY};
use serde_json::json;
use telegate::metrics::Metrics;
use telegate::model::{AlarmClass, AlarmId, SourceKind};
use telegate::source::mqtt::payload::RejectReason;

fn alarm_id(reply: &serde_json::Value) -> AlarmId {
    reply["alarm_id"]
        .as_str()
        .expect("reply has an alarm_id")
        .parse()
        .expect("alarm_id is a UUID")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_is_accepted_only_once_it_is_stored_with_its_timestamps() {
    for (broker, store) in matrix() {
        let h = Harness::start_on(&broker, &store, NO_DELIVERY).await;
        let tenant = unique("t");
        let mut dev = h.device(&tenant, "pendant-1").await;
        let reply = dev
            .send(json!({"seq": 1, "cid": "1101", "ts": "2026-11-22T10:15:30.123Z", "zone": 2, "battery_pct": 90}))
            .await;
        assert_eq!(
            reply["status"],
            "accepted",
            "{}/{}: {reply}",
            broker.name(),
            store.name()
        );
        assert_eq!(reply["seq"], 1);
        let id = alarm_id(&reply);

        // The reply came after the commit: the row is there now.
        let alarm = h
            .gateway
            .store
            .alarm(id)
            .await
            .unwrap()
            .expect("alarm row stored");
        assert_eq!(alarm.tenant, tenant);
        assert_eq!(alarm.device_id, "pendant-1");
        assert_eq!(alarm.class, AlarmClass::PersonalEmergency);
        assert_eq!(alarm.priority.number(), 1);
        assert!(!alarm.restore);
        assert_eq!(alarm.seq, Some(1));
        assert_eq!(alarm.details.zone, Some(2));
        assert_eq!(alarm.details.battery_pct, Some(90));
        assert_eq!(alarm.source.kind, SourceKind::Mqtt);
        assert_eq!(alarm.source.id, "devices");
        assert_eq!(alarm.source.code, "1101");
        assert!(alarm.stored_at >= alarm.received_at);
        let stages = common::stage_names(&h.gateway.store, id).await;
        assert_eq!(stages[..4], ["raised", "received", "stored", "routed"]);
        assert_eq!(
            h.gateway.store.count_outbox_pending().await.unwrap(),
            1,
            "queued for delivery with the alarm"
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_is_a_duplicate_with_the_same_alarm_id() {
    for (broker, store) in matrix() {
        let h = Harness::start_on(&broker, &store, NO_DELIVERY).await;
        let mut dev = h.device(&unique("t"), "fall-1").await;
        let payload = json!({"seq": 7, "event": "fall", "ts": "2026-11-22T10:00:00.000Z"});
        let first = dev.send(payload.clone()).await;
        let second = dev.send(payload.clone()).await;
        let third = dev.send(payload).await;
        assert_eq!(first["status"], "accepted");
        assert_eq!(second["status"], "duplicate", "{}", broker.name());
        assert_eq!(third["status"], "duplicate");
        assert_eq!(alarm_id(&first), alarm_id(&second));
        assert_eq!(alarm_id(&first), alarm_id(&third));
        let rows = h
            .gateway
            .store
            .alarms_of_device(&dev.tenant, "fall-1")
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "one alarm however often it is re-sent");
        assert_eq!(Metrics::get(&h.gateway.metrics.alarms_duplicate), 2);
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_sequence_number_with_another_code_is_a_new_alarm() {
    for (broker, store) in matrix() {
        let h = Harness::start_on(&broker, &store, NO_DELIVERY).await;
        let mut dev = h.device(&unique("t"), "unit-9").await;
        // A device that rebooted starts its sequence numbers again.
        let before = dev.send(json!({"seq": 1, "cid": "1301"})).await;
        let after = dev.send(json!({"seq": 1, "cid": "1101"})).await;
        let restore = dev.send(json!({"seq": 1, "cid": "3301"})).await;
        for r in [&before, &after, &restore] {
            assert_eq!(r["status"], "accepted", "{}: {r}", broker.name());
        }
        assert_ne!(alarm_id(&before), alarm_id(&after));
        assert_ne!(alarm_id(&before), alarm_id(&restore));
        let rows = h
            .gateway
            .store
            .alarms_of_device(&dev.tenant, "unit-9")
            .await
            .unwrap();
        let classes: Vec<_> = rows.iter().map(|a| (a.class, a.restore)).collect();
        assert_eq!(
            classes,
            [
                (AlarmClass::MainsFail, false),
                (AlarmClass::PersonalEmergency, false),
                (AlarmClass::MainsFail, true)
            ]
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_rejected_and_quarantined_and_the_next_good_alarm_is_accepted() {
    let cases: Vec<(Vec<u8>, RejectReason, Option<u64>)> = vec![
        (b"not json".to_vec(), RejectReason::NotJson, None),
        (b"[1,2,3]".to_vec(), RejectReason::NotObject, None),
        (
            br#"{"event":"fall"}"#.to_vec(),
            RejectReason::MissingSeq,
            None,
        ),
        (
            br#"{"seq":"5","event":"fall"}"#.to_vec(),
            RejectReason::BadSeq,
            None,
        ),
        (
            br#"{"seq":5.0,"event":"fall"}"#.to_vec(),
            RejectReason::BadSeq,
            None,
        ),
        (
            br#"{"seq":4294967296,"event":"fall"}"#.to_vec(),
            RejectReason::BadSeq,
            None,
        ),
        (br#"{"seq":6}"#.to_vec(), RejectReason::MissingCode, Some(6)),
        (
            br#"{"seq":7,"event":"fall","cid":"1101"}"#.to_vec(),
            RejectReason::SeveralCodes,
            Some(7),
        ),
        (
            br#"{"seq":8,"cid":"9101"}"#.to_vec(),
            RejectReason::BadCid,
            Some(8),
        ),
        (
            br#"{"seq":9,"sia":"m"}"#.to_vec(),
            RejectReason::BadSia,
            Some(9),
        ),
        (
            br#"{"seq":10,"event":"Fall Detected"}"#.to_vec(),
            RejectReason::BadEvent,
            Some(10),
        ),
        (
            format!(
                r#"{{"seq":11,"event":"fall","text":"{}"}}"#,
                "x".repeat(5000)
            )
            .into_bytes(),
            RejectReason::TooLarge,
            None,
        ),
    ];
    for (broker, store) in matrix() {
        let h = Harness::start_on(&broker, &store, NO_DELIVERY).await;
        let mut dev = h.device(&unique("t"), "hub-3").await;
        for (i, (payload, reason, seq)) in cases.iter().enumerate() {
            dev.send_raw(payload.clone()).await;
            let good_seq = 1000 + i as u64;
            dev.send_raw(json!({"seq": good_seq, "event": "fall"}).to_string())
                .await;
            let rejected = dev.next_reply().await;
            assert_eq!(
                rejected["status"],
                "rejected",
                "{}: case {i}: {rejected}",
                broker.name()
            );
            let text = rejected["reason"].as_str().expect("reason text");
            assert!(text.starts_with(reason.as_str()), "case {i}: {text}");
            match seq {
                Some(s) => assert_eq!(rejected["seq"], *s, "case {i}"),
                None => assert!(rejected.get("seq").is_none(), "case {i}: {rejected}"),
            }
            let good = dev.next_reply().await;
            assert_eq!(
                good["status"], "accepted",
                "case {i}: the next good alarm is accepted"
            );
            assert_eq!(good["seq"], good_seq);
            assert!(h.gateway.metrics.rejected(*reason) > 0, "case {i} counted");
        }
        let metrics = &h.gateway.metrics;
        assert_eq!(metrics.rejected_total(), cases.len() as u64);
        assert_eq!(metrics.rejected(RejectReason::BadSeq), 3);
        // Every broken payload is kept raw, with its reason.
        let quarantined = h.gateway.store.quarantine(100).await.unwrap();
        assert_eq!(quarantined.len(), cases.len());
        let mut raws: Vec<_> = quarantined.iter().map(|q| q.entry.raw.clone()).collect();
        raws.reverse();
        let sent: Vec<_> = cases.iter().map(|c| c.0.clone()).collect();
        assert_eq!(raws, sent);
        assert!(quarantined
            .iter()
            .all(|q| q.entry.device_id.as_deref() == Some("hub-3")));
        // One device_fault alarm for the device, however many broken payloads.
        let rows = h
            .gateway
            .store
            .alarms_of_device(&dev.tenant, "hub-3")
            .await
            .unwrap();
        let faults: Vec<_> = rows
            .iter()
            .filter(|a| a.class == AlarmClass::DeviceFault)
            .collect();
        assert_eq!(faults.len(), 1, "at most one device_fault an hour");
        assert_eq!(faults[0].source.kind, SourceKind::Internal);
        assert_eq!(
            rows.iter().filter(|a| a.class == AlarmClass::Fall).count(),
            cases.len()
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_event_names_and_codes_become_class_unknown() {
    for (broker, store) in matrix() {
        let h = Harness::start_on(&broker, &store, NO_DELIVERY).await;
        let mut dev = h.device(&unique("t"), "sensor-2").await;
        for (seq, payload) in [
            (1, json!({"seq": 1, "event": "levitation_detected"})),
            (2, json!({"seq": 2, "cid": "1130"})),
            (3, json!({"seq": 3, "sia": "UA"})),
        ] {
            let reply = dev.send(payload).await;
            assert_eq!(reply["status"], "accepted", "{}: seq {seq}", broker.name());
            let alarm = h
                .gateway
                .store
                .alarm(alarm_id(&reply))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(alarm.class, AlarmClass::Unknown, "seq {seq}");
            assert_eq!(alarm.priority.number(), 1, "unknown is critical");
        }
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_optional_field_is_dropped_and_the_alarm_accepted() {
    for (broker, store) in matrix() {
        let h = Harness::start_on(&broker, &store, NO_DELIVERY).await;
        let mut dev = h.device(&unique("t"), "smoke-1").await;
        let reply = dev
            .send(json!({"seq": 3, "sia": "FA", "battery_pct": 150, "rssi": "strong", "lat": 52.92, "lon": "west", "text": "kitchen", "firmware": "2.1"}))
            .await;
        assert_eq!(reply["status"], "accepted", "{}", broker.name());
        let alarm = h
            .gateway
            .store
            .alarm(alarm_id(&reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(alarm.class, AlarmClass::Fire);
        assert_eq!(alarm.details.battery_pct, None);
        assert_eq!(alarm.details.rssi, None);
        assert_eq!(alarm.details.lon, None);
        assert_eq!(alarm.details.lat, Some(52.92));
        assert_eq!(alarm.details.text.as_deref(), Some("kitchen"));
        // Unknown fields are kept in the raw payload.
        let raw: serde_json::Value = serde_json::from_slice(&alarm.raw).unwrap();
        assert_eq!(raw["firmware"], "2.1");
        assert_eq!(Metrics::get(&h.gateway.metrics.fields_dropped), 3);
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_replay_is_not_a_new_alarm() {
    for broker in brokers() {
        // The broker must exist before the gateway subscribes: start the
        // gateway once, have a device leave a retained alarm, then restart
        // the gateway with a fresh session so the broker replays it.
        let h = Harness::start(&broker).await;
        let tenant = unique("t");
        let mut dev = h.device(&tenant, "door-1").await;
        dev.client
            .publish(
                dev.topic("alarm"),
                rumqttc::QoS::AtLeastOnce,
                true,
                json!({"seq": 1, "event": "door_exit"}).to_string(),
            )
            .await
            .unwrap();
        // Published while the gateway is subscribed, it arrives as a live message.
        let live = dev.next_reply().await;
        assert_eq!(live["status"], "accepted");

        // A second gateway subscribing now gets the stored copy, flagged retained.
        let second = telegate::config::Config::from_toml_str(
            &common::config_toml(
                &match &broker {
                    common::BrokerChoice::Embedded => common::BrokerChoice::External {
                        host: h.host.clone(),
                        port: h.port,
                    },
                    other => other.clone(),
                },
                h.port,
                &unique("tg2-"),
                &h.dir.path().join("second.db"),
            ),
            "second.toml",
            &|_| None,
        )
        .unwrap();
        let g2 = telegate::app::start(second, telegate::clock::system())
            .await
            .unwrap();
        assert!(g2.wait_ready(common::WAIT).await);
        // A later live alarm gets exactly one reply from each gateway; the
        // retained replay gets none and no row.
        let mut probe = Device::connect(&h.host, h.port, &tenant, "door-2").await;
        probe
            .send_raw(json!({"seq": 5, "event": "fall"}).to_string())
            .await;
        let r1 = probe.next_reply().await;
        let r2 = probe.next_reply().await;
        assert_eq!(
            (r1["status"].clone(), r2["status"].clone()),
            (json!("accepted"), json!("accepted"))
        );
        assert_eq!(
            g2.store
                .alarms_of_device(&tenant, "door-1")
                .await
                .unwrap()
                .len(),
            0,
            "{}",
            broker.name()
        );
        assert!(Metrics::get(&g2.metrics.retained_ignored) >= 1);
        assert!(g2.shutdown(std::time::Duration::from_secs(10)).await);
        // Clear the retained message for later runs on a shared broker.
        dev.client
            .publish(
                dev.topic("alarm"),
                rumqttc::QoS::AtLeastOnce,
                true,
                Vec::new(),
            )
            .await
            .unwrap();
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_with_bad_segments_is_quarantined_without_a_reply() {
    for (broker, store) in matrix() {
        let h = Harness::start_on(&broker, &store, NO_DELIVERY).await;
        let tenant = unique("t");
        let mut dev = h.device(&tenant, "good-1").await;
        let long = "d".repeat(65);
        dev.client
            .publish(
                format!("telecare/{tenant}/{long}/alarm"),
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({"seq": 1, "event": "fall"}).to_string(),
            )
            .await
            .unwrap();
        let reply = dev.send(json!({"seq": 2, "event": "fall"})).await;
        assert_eq!(reply["status"], "accepted", "{}", broker.name());
        assert_eq!(reply["seq"], 2);
        let q = h.gateway.store.quarantine(10).await.unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].entry.reason, "bad_topic");
        assert_eq!(h.gateway.metrics.rejected(RejectReason::BadTopic), 1);
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_when_the_store_cannot_commit_and_the_alarm_is_taken_once_it_can() {
    for broker in brokers() {
        let h = Harness::start(&broker).await;
        let tenant = unique("t");
        // Make every commit that includes this tenant fail, as a full disk would.
        let refusal = common::StoreRefusal::new(&h, &tenant).await;
        let mut dev = h.device(&tenant, "pendant-9").await;
        dev.send_raw(json!({"seq": 1, "event": "personal_emergency"}).to_string())
            .await;
        let metrics = h.gateway.metrics.clone();
        common::wait_until("a failed commit", || {
            Metrics::get(&metrics.store_commit_failures) >= 1
        })
        .await;
        assert_eq!(
            dev.try_reply(),
            None,
            "{}: no reply without a commit",
            broker.name()
        );
        assert!(h
            .gateway
            .store
            .alarms_of_device(&tenant, "pendant-9")
            .await
            .unwrap()
            .is_empty());

        // Once the store can commit again, the message the gateway never
        // acknowledged comes back (from the broker, or from the gateway's own
        // hold when it reads the embedded broker in-process) and is accepted.
        refusal.lift().await;
        let reply = dev.next_reply().await;
        assert_eq!(reply["status"], "accepted", "{}: {reply}", broker.name());
        let rows = h
            .gateway
            .store
            .alarms_of_device(&tenant, "pendant-9")
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].id, alarm_id(&reply));
        h.stop().await;
    }
}
