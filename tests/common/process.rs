//! The real `telegate` binary as a child process, for tests of restarts,
//! crashes and several instances.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `telegate run` child process.
pub struct GatewayProcess {
    child: Child,
    /// Everything it logged, collected by a reader thread.
    log: mpsc::Receiver<String>,
}

impl GatewayProcess {
    /// Starts the gateway and waits until it reports ready.
    pub fn start(config: &Path) -> GatewayProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_telegate"))
            .args(["run", "--grace-s", "10", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("telegate starts");
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let process = GatewayProcess { child, log };
        process.wait_for_log("telegate ready", Duration::from_secs(30));
        process
    }

    pub fn wait_for_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match self
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(needle) => return,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no {needle:?} from telegate; log:\n{}", seen.join("\n")),
            }
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {name}");
    }

    /// SIGKILL: no chance to finish anything.
    pub fn crash(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.child.wait().expect("telegate exits")
    }
}
