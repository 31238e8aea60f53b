//! The `firmware-sim serial` command: runs a simulated port that an in-test peer answers, prints its counters
//! as one line, and exits 64 on bad arguments.
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialPortBuilderExt;

use common::{Running, BIN};

const WAIT: Duration = Duration::from_secs(30);

/// Starts the simulator and waits for its start line on stderr; the rest of stderr goes to the receiver.
fn start(args: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .arg("serial")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    loop {
        let line = lines
            .recv_timeout(WAIT)
            .expect("the simulator prints its port");
        if line.starts_with("serial: ") && line.contains(" -> /dev/") {
            break;
        }
    }
    (Running(Some(child)), lines)
}

/// Answers ACK to every line on the port at `link` (lines end at `terminator`), reopening it whenever it
/// closes, until `stop` is set.
async fn answer_everything(
    link: PathBuf,
    terminator: u8,
    stop: tokio_util::sync::CancellationToken,
) -> u64 {
    let mut lines = 0;
    while !stop.is_cancelled() {
        let Ok(mut port) = tokio_serial::new(link.to_string_lossy(), 9_600).open_native_async()
        else {
            // Unplugged: the symlink points at a device that is gone until the port is plugged in again.
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(20)) => continue,
            }
        };
        let mut chunk = [0; 1_024];
        loop {
            let n = tokio::select! {
                () = stop.cancelled() => return lines,
                read = port.read(&mut chunk) => match read {
                    Ok(n) if n > 0 => n,
                    _ => break,
                },
            };
            for _ in chunk[..n].iter().filter(|b| **b == terminator) {
                lines += 1;
                if port.write_all(&[0x06]).await.is_err() {
                    break;
                }
            }
        }
    }
    lines
}

async fn wait_for_exit(running: &mut Running) -> std::process::Output {
    let child = running.0.take().unwrap();
    tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the simulator exits")
    .unwrap()
    .unwrap()
}

fn last_line(stdout: &[u8]) -> String {
    String::from_utf8_lossy(stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_counted_run_ends_when_every_line_is_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("cid");
    let link_arg = link.to_string_lossy().into_owned();
    let (mut running, _stderr) = start(&[
        "--format",
        "contact-id",
        "--link",
        &link_arg,
        "--count",
        "3",
        "--rate",
        "0",
        "--seed",
        "7",
    ]);
    let stop = tokio_util::sync::CancellationToken::new();
    let peer = tokio::spawn(answer_everything(link.clone(), b'\n', stop.clone()));
    let output = wait_for_exit(&mut running).await;
    stop.cancel();
    assert_eq!(peer.await.unwrap(), 3);
    assert!(output.status.success(), "{:?}", output.status);
    assert_eq!(
        last_line(&output.stdout),
        "serial: sent=3 acked=3 naks=0 resends=0 garbage=0 unplugs=0 waiting=0"
    );
}

#[tokio::test]
async fn sigterm_drains_and_prints_the_counters_across_unplugs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("receiver");
    let link_arg = link.to_string_lossy().into_owned();
    let (mut running, stderr) = start(&[
        "--link",
        &link_arg,
        "--rate",
        "100",
        "--baud",
        "115200",
        "--heartbeat-s",
        "0.05",
        "--garbage-share",
        "0",
        "--unplug-every-s",
        "0.3",
        "--unplug-for-s",
        "0.1",
    ]);
    let stop = tokio_util::sync::CancellationToken::new();
    let peer = tokio::spawn(answer_everything(link.clone(), 0x14, stop.clone()));
    // Wait for an unplug and the replug after it, then stop the simulator.
    let replugged = tokio::task::spawn_blocking(move || loop {
        match stderr.recv_timeout(WAIT) {
            Ok(line) if line.contains("plugged in again") => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    });
    assert!(
        replugged.await.unwrap(),
        "the port was unplugged and plugged in again"
    );
    let pid = running.0.as_ref().map(Child::id).unwrap();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = wait_for_exit(&mut running).await;
    stop.cancel();
    peer.await.unwrap();
    assert!(output.status.success(), "{:?}", output.status);
    let line = last_line(&output.stdout);
    let fields: std::collections::HashMap<&str, u64> = line
        .strip_prefix("serial: ")
        .unwrap()
        .split(' ')
        .map(|f| {
            let (k, v) = f.split_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    assert_eq!(fields.len(), 7, "{line}");
    assert!(fields["sent"] > 0, "{line}");
    assert_eq!(fields["sent"], fields["acked"], "{line}");
    assert!(fields["unplugs"] >= 1, "{line}");
    assert_eq!(fields["waiting"], 0, "{line}");
}

#[test]
fn bad_arguments_exit_64_with_a_reason() {
    let link = Path::new("/nonexistent-dir/port")
        .to_string_lossy()
        .into_owned();
    for (args, reason) in [
        (vec!["--format", "sia"], "unknown line format"),
        (vec!["--receiver", "100"], "receiver 100"),
        (vec!["--line", "12"], "line 12"),
        (
            vec!["--format", "contact-id", "--heartbeat-s", "5"],
            "no heartbeat",
        ),
        (vec!["--window", "0"], "window"),
        (vec!["--ack-timeout-ms", "0"], "ack_timeout"),
        (vec!["--garbage-share", "2"], "between 0 and 1"),
        (vec!["--unplug-every-s", "5"], "--unplug-for-s"),
        (vec!["--accounts", "10000"], "accounts 10000"),
    ] {
        let output = Command::new(BIN)
            .args(["serial", "--link", &link])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    let output = Command::new(BIN).args(["serial"]).output().unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--link"));
}
