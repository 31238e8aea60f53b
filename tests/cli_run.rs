//! The real `telegate` binary: `run` serves devices on an embedded broker and
//! stops cleanly on SIGTERM with what it acknowledged in the store; its log,
//! written to a pipe, is plain text without the embedded broker's chatter.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::{unique, Device, WAIT};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_devices_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = telegate::broker::free_port().unwrap();
    let db = dir.path().join("data").join("telegate.db");
    let config = dir.path().join("telegate.toml");
    std::fs::write(
        &config,
        common::config_toml(&common::BrokerChoice::Embedded, port, &unique("tg-"), &db),
    )
    .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_telegate"))
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("telegate starts");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while !log.iter().any(|l: &String| l.contains("telegate ready")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => panic!(
                "telegate did not report ready; log so far:\n{}",
                log.join("\n")
            ),
        }
    }
    assert!(
        log.iter().any(|l| l.contains("do not survive a restart")),
        "embedded broker warning missing:\n{}",
        log.join("\n")
    );

    let tenant = unique("t");
    let mut dev = Device::connect("127.0.0.1", port, &tenant, "pendant-1").await;
    let reply = dev.send(json!({"seq": 1, "event": "fall"})).await;
    assert_eq!(reply["status"], "accepted");
    // A device that goes away is routine, not an error for the log.
    drop(dev);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status after SIGTERM: {exit:?}");
    log.extend(lines.iter());
    let text = log.join("\n");
    assert!(
        log.iter().any(|l| l.contains("shutting down")),
        "no shutdown line:\n{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "terminal colour codes in a piped log:\n{text}"
    );
    assert!(
        !text.contains("rumqttd"),
        "the embedded broker's own log lines with RUST_LOG=info:\n{text}"
    );

    // What was acknowledged is in the store the next process opens.
    let store = telegate::store::Store::open(&telegate::config::StoreUrl::Sqlite(db))
        .await
        .unwrap();
    let rows = store.alarms_of_device(&tenant, "pendant-1").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id.to_string(), reply["alarm_id"].as_str().unwrap());
}
