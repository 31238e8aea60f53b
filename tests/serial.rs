//! Serial ingest through the whole gateway, over real pseudo-terminals:
//! receiver and unit lines in, the right ACK/NAK bytes back, deliveries at an
//! ARC simulator out. The gateway opens the link path the way it opens a
//! USB serial adapter.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{BrokerChoice, Harness, WAIT};
use firmware_sim::arc::{Accepted, ArcConfig, ArcSim};
use firmware_sim::serial::{LineFormat, PtyLink, SerialSim, SerialSimConfig};
use serde_json::Value;

/// The kernel reuses a closed pseudo-terminal's number for the next one
/// created, so a gateway reopening its port after an unplug could open
/// another test's new port: the tests that make ports run one at a time.
static PTYS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ACK: u8 = 0x06;
const NAK: u8 = 0x15;

/// A gateway with serial ports and an ARC that takes every alarm.
struct Rig {
    arc: ArcSim,
    h: Harness,
}

/// A pseudo-terminal at a fresh link path, and a gateway with one port on
/// it (`extra` adds keys to its `[[serial]]` entry).
async fn one_port(
    id: &str,
    format: &str,
    extra: &str,
) -> (tempfile::TempDir, PathBuf, PtyLink, Rig) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(id);
    let link = PtyLink::create(&path).expect("pty");
    let rig = Rig::start(port(id, &path, format, extra)).await;
    (dir, path, link, rig)
}

/// The `[[serial]]` entry for a port.
fn port(id: &str, link: &Path, format: &str, extra: &str) -> String {
    format!(
        "[[serial]]\nid = \"{id}\"\npath = \"{}\"\nformat = \"{format}\"\ntenant = \"borough\"\n{extra}\n",
        link.display()
    )
}

impl Rig {
    /// Starts an ARC and a gateway with these `[[serial]]` entries (their
    /// ports must exist: the gateway is ready once every port is open).
    async fn start(ports: String) -> Rig {
        let arc = ArcSim::start(ArcConfig::new("arc-secret", "arc-token"))
            .await
            .expect("ARC simulator starts");
        let delivery = format!(
            "{}\n[[provider]]\nid = \"arc\"\nurl = \"{}\"\nsecret = \"arc-secret\"\ntoken = \"arc-token\"\n\n\
             [routing]\ndefault_provider = \"arc\"\n",
            ports,
            arc.url()
        );
        let h = Harness::start_with(&BrokerChoice::Embedded, &delivery).await;
        Rig { arc, h }
    }

    /// Waits for the ARC to hold a delivery matching `what`.
    async fn delivered(&self, what: impl Fn(&Value) -> bool) -> Accepted {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(a) = self.arc.accepted().into_iter().find(|a| what(&a.body)) {
                return a;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no matching delivery; the ARC has {:?}",
                self.arc
                    .accepted()
                    .iter()
                    .map(|a| &a.body)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many deliveries the ARC holds that match `what`.
    fn count(&self, what: impl Fn(&Value) -> bool) -> usize {
        self.arc.accepted().iter().filter(|a| what(&a.body)).count()
    }

    /// The newest quarantine rows, newest first.
    async fn quarantine(&self) -> Vec<telegate::store::QuarantineRow> {
        self.h
            .gateway
            .store
            .quarantine(10)
            .await
            .expect("quarantine")
    }

    async fn stop(self) {
        self.h.stop().await;
        self.arc.shutdown().await;
    }
}

fn code(body: &Value) -> &str {
    body["source"]["code"].as_str().unwrap_or("")
}

/// Writes a line and returns the answer bytes.
async fn exchange(link: &mut PtyLink, line: &[u8]) -> Vec<u8> {
    link.write_all(line).await.expect("write to the port");
    let answer = link.read_some(WAIT).await.expect("read from the port");
    assert!(
        !answer.is_empty(),
        "no answer to {:?}",
        String::from_utf8_lossy(line)
    );
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_lines_are_acknowledged_once_stored_and_delivered() {
    let _ports = PTYS.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rx1");
    let mut link = PtyLink::create(&path).expect("pty");
    let rig = Rig::start(port(
        "rx1",
        &path,
        "surgard",
        "[[serial.map]]\naccount = \"4321\"\ntenant = \"shire\"\ndevice_id = \"flat-12\"\n",
    ))
    .await;

    // A Contact ID line: ACK only once it is in the store.
    assert_eq!(
        exchange(&mut link, b"5011 181234E10101003\x14").await,
        [ACK]
    );
    let stored = rig
        .h
        .gateway
        .store
        .alarms_of_device("borough", "1234")
        .await
        .expect("query");
    assert_eq!(stored.len(), 1, "stored before the ACK");
    let a = rig.delivered(|b| b["device_id"] == "1234").await;
    assert_eq!(a.body["tenant"], "borough");
    assert_eq!(a.body["class"], "personal_emergency");
    assert_eq!(a.body["priority"], 1);
    assert_eq!(a.body["restore"], false);
    assert_eq!(a.body["zone"], 3);
    assert_eq!(a.body["source"]["kind"], "serial");
    assert_eq!(a.body["source"]["id"], "rx1");
    assert_eq!(code(&a.body), "1101");
    assert_eq!(stored[0].account.as_deref(), Some("1234"));
    assert_eq!(stored[0].raw, b"5011 181234E10101003");

    // A SIA line, a restore, and the map sending an account elsewhere.
    assert_eq!(
        exchange(&mut link, b"3011      4321WA0007\x14").await,
        [ACK]
    );
    let a = rig.delivered(|b| code(b) == "WA").await;
    assert_eq!(
        (a.body["tenant"].as_str(), a.body["device_id"].as_str()),
        (Some("shire"), Some("flat-12"))
    );
    assert_eq!(a.body["class"], "flood");
    assert_eq!(
        exchange(&mut link, b"5011 181234R30100009\x14").await,
        [ACK]
    );
    let a = rig.delivered(|b| code(b) == "3301").await;
    assert_eq!(a.body["class"], "mains_fail");
    assert_eq!(a.body["restore"], true);

    // A heartbeat is acknowledged and stores nothing.
    let before = rig.h.gateway.store.count_alarms().await.expect("count");
    assert_eq!(
        exchange(&mut link, b"1011           @    \x14").await,
        [ACK]
    );
    assert_eq!(
        rig.h.gateway.store.count_alarms().await.expect("count"),
        before
    );

    // A line that cannot be read: NAK, quarantined with its bytes.
    assert_eq!(
        exchange(&mut link, b"5011 181234X10101003\x14").await,
        [NAK]
    );
    let q = rig.quarantine().await;
    let row = q
        .iter()
        .find(|r| r.entry.raw == b"5011 181234X10101003")
        .expect("quarantined");
    assert_eq!(row.entry.reason, "malformed");
    assert_eq!(row.entry.source_id, "rx1");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_line_is_acknowledged_again_and_delivered_once() {
    let _ports = PTYS.lock().await;
    let (_dir, _, mut link, rig) = one_port("rx1", "surgard", "").await;

    let line = b"5011 185555E11101002\x14";
    assert_eq!(exchange(&mut link, line).await, [ACK]);
    // The receiver did not see the ACK and sends the line again.
    assert_eq!(exchange(&mut link, line).await, [ACK]);
    // Another line afterwards proves the re-send was handled in full.
    assert_eq!(
        exchange(&mut link, b"5011 185555E60200000\x14").await,
        [ACK]
    );
    rig.delivered(|b| code(b) == "1602").await;
    assert_eq!(
        rig.count(|b| code(b) == "1111"),
        1,
        "the re-send is not delivered again"
    );
    let stored = rig
        .h
        .gateway
        .store
        .alarms_of_device("borough", "5555")
        .await
        .expect("query");
    assert_eq!(stored.len(), 2);
    assert_eq!(
        rig.h
            .gateway
            .metrics
            .alarms_duplicate
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_contact_id_checksums_are_verified() {
    let _ports = PTYS.lock().await;
    let (_dir, _, mut link, rig) = one_port("dialler", "contact-id", "").await;

    assert_eq!(
        exchange(&mut link, b"1234 18 1101 01 001 B\r\n").await,
        [ACK]
    );
    let a = rig.delivered(|b| b["device_id"] == "1234").await;
    assert_eq!(code(&a.body), "1101");
    // One digit changed: the checksum no longer adds up.
    assert_eq!(
        exchange(&mut link, b"1234 18 1101 01 002 B\r\n").await,
        [NAK]
    );
    let q = rig.quarantine().await;
    assert_eq!(q[0].entry.reason, "bad_checksum");
    assert_eq!(q[0].entry.device_id.as_deref(), Some("1234"));
    // The device that sent it gets one device_fault for a person to look at.
    let fault = rig.delivered(|b| b["class"] == "device_fault").await;
    assert_eq!(fault.body["device_id"], "1234");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telecare_units_get_their_alarm_id_back_and_the_same_id_for_a_resend() {
    let _ports = PTYS.lock().await;
    let (_dir, _, mut link, rig) = one_port("hub", "telecare-line", "").await;

    let line = b"ALARM unit-7 41 fall zone=2 battery=64 ts=2026-11-22T10:15:30.123Z\n";
    let first = String::from_utf8(exchange(&mut link, line).await).expect("text");
    let fields: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(fields[..3], ["ACK", "unit-7", "41"], "{first}");
    let alarm_id = fields[3].to_owned();
    let again = String::from_utf8(exchange(&mut link, line).await).expect("text");
    assert_eq!(again, format!("ACK unit-7 41 {alarm_id}\n"));

    let a = rig.delivered(|b| b["alarm_id"] == alarm_id.as_str()).await;
    assert_eq!(a.body["device_id"], "unit-7");
    assert_eq!(a.body["seq"], 41);
    assert_eq!(a.body["class"], "fall");
    assert_eq!(a.body["battery_pct"], 64);
    assert_eq!(a.body["raised_at"], "2026-11-22T10:15:30.123Z");

    assert_eq!(
        exchange(&mut link, b"HEARTBEAT unit-7 42\n").await,
        b"ACK unit-7 42\n"
    );
    assert_eq!(
        exchange(&mut link, b"ALARM unit-7 43 Fall\n").await,
        b"NAK unit-7 43 malformed\n"
    );
    assert_eq!(
        exchange(&mut link, b"\x01\x02garbage\n").await,
        b"NAK - - not_text\n"
    );
    rig.stop().await;
}

/// Every line the simulator had acknowledged reached the ARC exactly once.
fn assert_each_line_delivered_once(sim_lines: &[firmware_sim::serial::SentLine], arc: &ArcSim) {
    let mut expected: Vec<(String, String)> = sim_lines
        .iter()
        .map(|l| (l.account.clone(), l.code.clone()))
        .collect();
    expected.sort();
    let mut got: Vec<(String, String)> = arc
        .accepted()
        .iter()
        .filter(|a| a.body["source"]["kind"] == "serial")
        .map(|a| {
            (
                a.body["device_id"].as_str().unwrap_or("").to_owned(),
                code(&a.body).to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got, expected,
        "one delivery per line, none lost, none twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bursts_and_an_unplugged_port_lose_nothing() {
    let _ports = PTYS.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rx-sim");
    let sim = SerialSim::start(SerialSimConfig {
        format: LineFormat::Surgard,
        link: path.clone(),
        rate: 100.0,
        count: Some(150),
        baud: 115_200,
        garbage_share: 0.2,
        accounts: 40,
        ack_timeout: Duration::from_millis(500),
        seed: 7,
        ..SerialSimConfig::default()
    })
    .await
    .expect("simulator starts");
    let rig = Rig::start(port("rx-sim", &path, "surgard", "")).await;

    // Unplug part-way through, and plug back in.
    common::wait_until("50 lines acknowledged", || sim.stats().acked >= 50).await;
    sim.unplug();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.replug().await.expect("replug");
    assert!(
        sim.wait_acked(WAIT).await,
        "every line acknowledged: {:?}",
        sim.stats()
    );

    let records = sim.records();
    assert_eq!(records.len(), 150);
    assert!(
        sim.stats().garbage_bursts > 0 && sim.stats().naks > 0,
        "{:?}",
        sim.stats()
    );
    common::wait_until("every line delivered", || {
        rig.count(|b| b["source"]["kind"] == "serial") >= records.len()
    })
    .await;
    assert_each_line_delivered_once(&records, &rig.arc);
    // Bad lines raised one device_fault for the port, not one per line.
    let faults = rig.count(|b| b["class"] == "device_fault");
    assert_eq!(faults, 1);
    sim.stop().await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_down_too_long_raises_comms_fail_and_its_restore() {
    let _ports = PTYS.lock().await;
    let (_dir, path, mut link, rig) = one_port("rx2", "surgard", "comms_fail_after_s = 1").await;
    assert_eq!(
        exchange(&mut link, b"5011 181234E10101003\x14").await,
        [ACK]
    );

    link.close();
    let down = rig.delivered(|b| b["class"] == "comms_fail").await;
    assert_eq!(down.body["device_id"], "rx2");
    assert_eq!(down.body["restore"], false);
    assert_eq!(down.body["priority"], 3);

    // Plugged back in at the same path: the restore, and lines flow again.
    let mut link = PtyLink::create(&path).expect("pty");
    let up = rig
        .delivered(|b| b["class"] == "comms_fail" && b["restore"] == true)
        .await;
    assert_eq!(up.body["device_id"], "rx2");
    assert_eq!(
        exchange(&mut link, b"5011 181234E10101004\x14").await,
        [ACK]
    );
    let comms = rig.count(|b| b["class"] == "comms_fail");
    assert_eq!(comms, 2, "one alarm and one restore for one outage");
    rig.stop().await;
}
