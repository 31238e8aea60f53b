//! `telegate demo`: a short run loses nothing and prints a sensible table.

use std::process::Command;
use std::time::Duration;

use telegate::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_demo_loses_nothing_and_fills_the_table() {
    let options = DemoOptions {
        duration: Duration::from_secs(4),
        rate: 40.0,
        devices: 60,
        seed: 7,
    };
    let mut lines = Vec::new();
    let report = demo::run(options, |p| lines.push(*p))
        .await
        .expect("demo runs");
    assert_eq!(report.lost, 0, "{}", report.summary_line());
    assert!(
        report.sent >= 60,
        "the fleet sent at about the rate: {}",
        report.sent
    );
    assert!(
        report.delivered >= report.sent,
        "every alarm delivered: {}",
        report.summary_line()
    );
    assert!(report.stored >= report.sent, "{}", report.summary_line());
    assert!(!lines.is_empty(), "progress was reported");
    assert!(lines.windows(2).all(|w| w[0].sent <= w[1].sent));

    let ids: Vec<Option<&str>> = report
        .slas
        .iter()
        .map(|s| s.contract_id.as_deref())
        .collect();
    assert_eq!(
        ids,
        [Some("DCC-DEMO"), Some("NCC-DEMO"), None],
        "two contracts, then the uncontracted tenant"
    );
    let alarms: u64 = report.slas.iter().map(|s| s.alarms).sum();
    assert_eq!(
        alarms, report.stored,
        "every stored alarm is in one row of the table"
    );
    for s in &report.slas {
        assert!(s.alarms > 0, "{s:?}");
        assert_eq!(s.delivered, s.alarms, "{s:?}");
        let (p50, p99) = (s.p50_ms.unwrap(), s.p99_ms.unwrap());
        assert!(p50 <= p99 && p99 < 30_000.0, "{s:?}");
    }
    for s in &report.slas[..2] {
        assert_eq!(s.targets.len(), 2);
        let achieved = s.targets[1].achieved_pct.unwrap();
        assert!(
            achieved > 50.0 && achieved <= 100.0,
            "operators answered most alarms: {s:?}"
        );
    }
    let table = telegate::sla::render_table(&report.slas);
    assert!(
        table.lines().count() == 4
            && table.contains("DCC-DEMO")
            && table.contains("(uncontracted)"),
        "{table}"
    );
}

#[test]
fn the_demo_command_ends_with_the_summary_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_telegate"))
        .args(["demo", "--duration", "2", "--rate", "20", "--devices", "20"])
        .output()
        .expect("telegate demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    let fields: Vec<(&str, u64)> = last
        .strip_prefix("demo: ")
        .expect("last line starts with 'demo: '")
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k, v.parse().expect("a count"))
        })
        .collect();
    let keys: Vec<&str> = fields.iter().map(|f| f.0).collect();
    assert_eq!(keys, ["sent", "stored", "delivered", "duplicates", "lost"]);
    assert_eq!(fields[4].1, 0, "lost");
    assert!(
        stdout.lines().next().unwrap_or("").starts_with("contract"),
        "the table comes first:\n{stdout}"
    );
}
