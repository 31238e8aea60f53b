//! The `firmware-sim arc` command: starts, serves deliveries, and prints its counters on SIGTERM.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Running, BIN};
use firmware_sim::arc::sign;

const SECRET: &str = "cli-secret-value";
const TOKEN: &str = "cli-token-value";

fn free_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn arc_serves_and_prints_stats_on_sigterm() {
    let addr = free_port();
    let mut child = Command::new(BIN)
        .args(["arc", "--listen", &addr.to_string()])
        .args(["--secret", SECRET, "--token", TOKEN])
        .args(["--answer-delay", "exp:20s", "--seed", "3"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut running = Running(Some(child));

    let (lines_tx, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = Vec::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the simulator logs that it listens");
        let ready = line.contains("ARC simulator listening");
        log.push(line);
        if ready {
            break;
        }
    }

    let body =
        br#"{"alarm_id":"c-1","contract_id":null,"uncontracted":true,"tenant":"t","device_id":"d",
        "seq":1,"class":"panic","priority":1,"restore":false,"raised_at":null,
        "received_at":"2026-11-22T10:15:30.123Z","attempt":1,"fallback":false,
        "source":{"kind":"serial","id":"receiver-1","code":"1120"}}"#;
    let ts = chrono::Utc::now().timestamp().to_string();
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/alarms"))
        .header("content-type", "application/json")
        .header("idempotency-key", "c-1")
        .header("x-telegate-timestamp", &ts)
        .header("x-telegate-signature", sign(SECRET.as_bytes(), &ts, body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let pid = running.0.as_ref().map(Child::id).unwrap();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let child = running.0.take().unwrap();
    let output: Output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the simulator exits on SIGTERM")
    .unwrap()
    .unwrap();
    reader.join().unwrap();
    log.extend(lines.try_iter());

    assert!(output.status.success(), "{:?}", output.status);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.lines().last(),
        Some(
            "arc: received=1 accepted=1 duplicates=0 unavailable=0 rejected=0 bad_signature=0 \
             progress_sent=0 progress_failed=0"
        ),
        "{stdout}"
    );
    let log = log.join("\n");
    assert!(log.contains("c-1"), "{log}");
    assert!(
        !log.contains(SECRET) && !log.contains(TOKEN),
        "secrets in the log: {log}"
    );
}

#[test]
fn bad_arguments_exit_64_with_a_reason() {
    for (args, reason) in [
        (vec!["--fail-share", "2"], "between 0 and 1"),
        (vec!["--answer-delay", "soon"], "invalid delay"),
        (vec!["--down-after", "5"], "--down-for"),
    ] {
        let output = Command::new(BIN)
            .args([
                "arc",
                "--listen",
                "127.0.0.1:0",
                "--secret",
                "s",
                "--token",
                "t",
            ])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}
