//! The pseudo-terminal port and the serial simulator against small in-test peers that open the port by its
//! symlink, as the gateway does, and answer as the serial wire contracts say.
#![cfg(unix)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use firmware_sim::serial::lines::{ACK, DC4, NAK};
use firmware_sim::serial::{LineFormat, PtyLink, SerialSim, SerialSimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

const WAIT: Duration = Duration::from_secs(30);

/// The other side of the port: opens the symlink as the gateway would and reads lines.
struct Peer {
    port: SerialStream,
    buffer: Vec<u8>,
    terminators: &'static [u8],
}

impl Peer {
    fn open(link: &Path, format: LineFormat) -> Peer {
        let port = tokio_serial::new(link.to_string_lossy(), 9_600)
            .open_native_async()
            .unwrap();
        Peer {
            port,
            buffer: Vec::new(),
            terminators: match format {
                LineFormat::Surgard => &[DC4],
                LineFormat::ContactId | LineFormat::TelecareLine => b"\r\n",
            },
        }
    }

    /// The next line without its terminator; blank lines are skipped. `None` when the port closed.
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self
                .buffer
                .iter()
                .position(|b| self.terminators.contains(b))
            {
                let line: Vec<u8> = self.buffer.drain(..=end).take(end).collect();
                if line.is_empty() {
                    continue;
                }
                return Some(line);
            }
            let mut chunk = [0; 1_024];
            match tokio::time::timeout(WAIT, self.port.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buffer.extend_from_slice(&chunk[..n]),
                Ok(_) => return None,
                Err(_) => panic!("no line within {WAIT:?}"),
            }
        }
    }

    async fn answer(&mut self, bytes: &[u8]) {
        self.port.write_all(bytes).await.unwrap();
    }
}

/// Whether `line` is a well-formed Sur-Gard Contact ID or SIA line (no garbage before it).
fn clean_surgard(line: &[u8]) -> bool {
    line.len() == 20
        && line.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
        && (line.starts_with(b"5011 18") || line.starts_with(b"3011    "))
}

fn config(format: LineFormat, link: PathBuf, count: u64) -> SerialSimConfig {
    SerialSimConfig {
        format,
        link,
        rate: 0.0,
        count: Some(count),
        baud: 115_200,
        ..SerialSimConfig::default()
    }
}

#[tokio::test]
async fn pty_link_carries_bytes_both_ways_without_echo() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link_path = dir.path().join("port");
    std::fs::write(&link_path, "a plain file is replaced").unwrap();
    let mut link = PtyLink::create(&link_path).unwrap();
    assert_eq!(link.link(), link_path);
    assert_eq!(std::fs::read_link(&link_path).unwrap(), link.device());
    assert!(link.device().starts_with("/dev/"), "{:?}", link.device());

    // Written before anyone opened the port: it waits in the terminal, and nothing comes back.
    let sent = b"5011 181234E12101001\x14line\r\nnext\n";
    link.write_all(sent).await.unwrap();
    assert_eq!(
        link.read_some(Duration::from_millis(200)).await.unwrap(),
        b""
    );

    let mut peer = tokio_serial::new(link_path.to_string_lossy(), 9_600)
        .open_native_async()
        .unwrap();
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let mut chunk = [0; 256];
        let n = tokio::time::timeout(WAIT, peer.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        received.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(received, sent, "no CR/NL translation");

    let answer = b"\x06\x15ACK unit-0001 1 a-1\r\n";
    peer.write_all(answer).await.unwrap();
    let mut back = Vec::new();
    while back.len() < answer.len() {
        let bytes = link.read_some(WAIT).await.unwrap();
        assert!(!bytes.is_empty(), "the answer arrives");
        back.extend_from_slice(&bytes);
    }
    assert_eq!(back, answer);
    // Nothing of what the master wrote came back to it, and nothing of the answer went back to the peer.
    assert_eq!(
        link.read_some(Duration::from_millis(200)).await.unwrap(),
        b""
    );
    let mut chunk = [0; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), peer.read(&mut chunk))
            .await
            .is_err(),
        "the peer reads no echo"
    );

    // A second link at the same path points at a new device.
    let second = PtyLink::create(&link_path).unwrap();
    assert_ne!(second.device(), link.device());
    assert_eq!(std::fs::read_link(&link_path).unwrap(), second.device());
}

#[tokio::test]
async fn closing_the_link_ends_the_peers_reads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link_path = dir.path().join("port");
    let link = PtyLink::create(&link_path).unwrap();
    let mut peer = tokio_serial::new(link_path.to_string_lossy(), 9_600)
        .open_native_async()
        .unwrap();
    link.close();
    let mut chunk = [0; 64];
    match tokio::time::timeout(WAIT, peer.read(&mut chunk))
        .await
        .expect("the read ends")
    {
        Ok(n) => assert_eq!(n, 0, "EOF"),
        Err(err) => assert!(err.raw_os_error().is_some(), "{err}"),
    }
    assert!(
        std::fs::symlink_metadata(&link_path).is_ok(),
        "the symlink stays"
    );
}

#[tokio::test]
async fn surgard_lines_acknowledged_at_once_are_all_settled() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("receiver");
    let sim = SerialSim::start(config(LineFormat::Surgard, link.clone(), 20))
        .await
        .unwrap();
    assert_eq!(sim.link(), link);
    let mut peer = Peer::open(&link, LineFormat::Surgard);
    let gateway = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(line) = peer.line().await {
            assert!(clean_surgard(&line), "{:?}", String::from_utf8_lossy(&line));
            lines.push(String::from_utf8(line).unwrap());
            peer.answer(&[ACK]).await;
        }
        lines
    });
    assert!(sim.wait_acked(WAIT).await, "{:?}", sim.stats());
    let records = sim.records();
    let stats = sim.stop().await;
    assert_eq!(
        (
            stats.sent,
            stats.acked,
            stats.naks,
            stats.resends,
            stats.waiting
        ),
        (20, 20, 0, 0, 0)
    );
    let lines = gateway.await.unwrap();
    let texts: Vec<String> = records.iter().map(|r| r.text.clone()).collect();
    assert_eq!(lines, texts);
    for record in &records {
        assert_eq!(record.sends, 1);
        assert!(record.acked_at.is_some());
        assert_eq!(record.account.len(), 4);
        assert!(
            record.text.contains(&record.account),
            "{} {}",
            record.text,
            record.account
        );
        let code = record.code.as_bytes();
        if record.text.starts_with('5') {
            assert!(matches!(code[0], b'1' | b'3' | b'6'), "{}", record.code);
            let letter = match code[0] {
                b'1' => 'E',
                b'3' => 'R',
                _ => 'P',
            };
            assert_eq!(
                &record.text[11..15],
                format!("{letter}{}", &record.code[1..])
            );
        } else {
            assert_eq!(&record.text[14..16], record.code);
        }
    }
}

#[tokio::test]
async fn a_nak_makes_the_line_go_again_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("cid");
    let sim = SerialSim::start(config(LineFormat::ContactId, link.clone(), 2))
        .await
        .unwrap();
    let mut peer = Peer::open(&link, LineFormat::ContactId);
    let gateway = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(line) = peer.line().await {
            let answer = if lines.is_empty() { NAK } else { ACK };
            lines.push(String::from_utf8(line).unwrap());
            peer.answer(&[answer]).await;
        }
        lines
    });
    assert!(sim.wait_acked(WAIT).await, "{:?}", sim.stats());
    let records = sim.records();
    let stats = sim.stop().await;
    assert_eq!(
        (stats.sent, stats.acked, stats.naks, stats.resends),
        (2, 2, 1, 1)
    );
    let lines = gateway.await.unwrap();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0], lines[1], "the same line again");
    assert_eq!(lines[0], records[0].text);
    assert_eq!(lines[2], records[1].text);
    assert_eq!(records[0].sends, 2);
    for line in &lines {
        assert_eq!(line.len(), 16, "{line}");
        let sum: u32 = line
            .bytes()
            .map(|b| match b {
                b'0' => 10,
                b'1'..=b'9' => u32::from(b - b'0'),
                b'B'..=b'F' => u32::from(b - b'A') + 10,
                other => panic!("{other}"),
            })
            .sum();
        assert_eq!(sum % 15, 0, "{line}");
    }
}

#[tokio::test]
async fn silence_makes_the_line_go_again_after_the_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("receiver");
    let sim = SerialSim::start(SerialSimConfig {
        ack_timeout: Duration::from_millis(200),
        ..config(LineFormat::Surgard, link.clone(), 1)
    })
    .await
    .unwrap();
    let mut peer = Peer::open(&link, LineFormat::Surgard);
    let first = peer.line().await.unwrap();
    // No answer: the simulator sends the same line again.
    let second = peer.line().await.unwrap();
    assert_eq!(first, second);
    peer.answer(&[ACK]).await;
    assert!(sim.wait_acked(WAIT).await, "{:?}", sim.stats());
    let stats = sim.stop().await;
    assert_eq!((stats.sent, stats.acked, stats.naks), (1, 1, 0));
    assert!(stats.resends >= 1, "{stats:?}");
}

#[tokio::test]
async fn garbled_lines_are_refused_and_sent_again_clean() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("receiver");
    let sim = SerialSim::start(SerialSimConfig {
        garbage_share: 1.0,
        ..config(LineFormat::Surgard, link.clone(), 5)
    })
    .await
    .unwrap();
    let mut peer = Peer::open(&link, LineFormat::Surgard);
    let gateway = tokio::spawn(async move {
        let (mut clean, mut garbled) = (0, 0);
        while let Some(line) = peer.line().await {
            if clean_surgard(&line) {
                clean += 1;
                peer.answer(&[ACK]).await;
            } else {
                garbled += 1;
                assert!(line.len() > 20);
                peer.answer(&[NAK]).await;
            }
        }
        (clean, garbled)
    });
    assert!(sim.wait_acked(WAIT).await, "{:?}", sim.stats());
    let stats = sim.stop().await;
    assert_eq!(
        (
            stats.sent,
            stats.acked,
            stats.garbage_bursts,
            stats.naks,
            stats.resends
        ),
        (5, 5, 5, 5, 5)
    );
    assert_eq!(gateway.await.unwrap(), (5, 5));
}

#[tokio::test]
async fn surgard_heartbeats_are_written_and_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("receiver");
    let sim = SerialSim::start(SerialSimConfig {
        heartbeat: Some(Duration::from_millis(50)),
        ..config(LineFormat::Surgard, link.clone(), 0)
    })
    .await
    .unwrap();
    let mut peer = Peer::open(&link, LineFormat::Surgard);
    for _ in 0..3 {
        let line = peer.line().await.unwrap();
        assert_eq!(line, b"1011           @    ");
        peer.answer(&[ACK]).await;
    }
    assert!(
        sim.wait_until(WAIT, |_, stats| stats.heartbeat_acks >= 3)
            .await
    );
    let stats = sim.stop().await;
    assert_eq!(
        (stats.sent, stats.acked),
        (0, 0),
        "heartbeats are not lines"
    );
    assert!(stats.heartbeats >= 3);
}

#[tokio::test]
async fn unplugged_lines_wait_and_go_again_on_the_new_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("receiver");
    let sim = SerialSim::start(config(LineFormat::Surgard, link.clone(), 3))
        .await
        .unwrap();
    let first_device = sim.device().unwrap();
    assert_eq!(std::fs::read_link(&link).unwrap(), first_device);
    let mut peer = Peer::open(&link, LineFormat::Surgard);
    let first = peer.line().await.unwrap();
    peer.answer(&[ACK]).await;
    // The second line is read and never answered: the port is unplugged under it.
    let second = peer.line().await.unwrap();
    assert_ne!(first, second);
    sim.unplug();
    assert_eq!(peer.line().await, None, "the peer's port closes");
    assert!(
        sim.wait_until(WAIT, |_, stats| stats.unplugs == 1).await,
        "{:?}",
        sim.stats()
    );
    assert_eq!(sim.device(), None);
    assert_eq!(sim.stats().waiting, 1);

    sim.replug().await.unwrap();
    let second_device = sim.device().unwrap();
    assert_ne!(second_device, first_device);
    assert_eq!(std::fs::read_link(&link).unwrap(), second_device);
    let mut peer = Peer::open(&link, LineFormat::Surgard);
    assert_eq!(peer.line().await.unwrap(), second, "the waiting line again");
    peer.answer(&[ACK]).await;
    let third = peer.line().await.unwrap();
    peer.answer(&[ACK]).await;
    assert!(sim.wait_acked(WAIT).await, "{:?}", sim.stats());
    let records = sim.records();
    let stats = sim.stop().await;
    assert_eq!(
        (stats.sent, stats.acked, stats.unplugs, stats.resends),
        (3, 3, 1, 1)
    );
    assert_eq!(records[1].sends, 2);
    assert_eq!(records[2].text.as_bytes(), third);
}

#[tokio::test]
async fn telecare_answers_are_matched_by_unit_and_seq() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("units");
    let sim = SerialSim::start(SerialSimConfig {
        window: 4,
        accounts: 3,
        garbage_share: 0.3,
        heartbeat: Some(Duration::from_millis(300)),
        ..config(LineFormat::TelecareLine, link.clone(), 24)
    })
    .await
    .unwrap();
    let mut peer = Peer::open(&link, LineFormat::TelecareLine);
    let gateway = tokio::spawn(async move {
        // Alarms are answered in pairs, the second first; unreadable lines at once with `NAK - -`, and the
        // first alarm of unit-0002 once with a NAK that names it.
        let mut pending: Vec<(String, String)> = Vec::new();
        let mut refused_once = false;
        let mut alarms = 0;
        let mut heartbeats = 0;
        while let Some(line) = peer.line().await {
            let Some(text) = std::str::from_utf8(&line)
                .ok()
                .filter(|t| t.starts_with("ALARM ") || t.starts_with("HEARTBEAT "))
            else {
                peer.answer(b"NAK - - not_text\n").await;
                continue;
            };
            let fields: Vec<&str> = text.split(' ').collect();
            let (unit, seq) = (fields[1].to_owned(), fields[2].to_owned());
            if fields[0] == "HEARTBEAT" {
                heartbeats += 1;
                peer.answer(format!("ACK {unit} {seq}\n").as_bytes()).await;
                continue;
            }
            alarms += 1;
            if unit == "unit-0002" && seq == "1" && !refused_once {
                refused_once = true;
                peer.answer(format!("NAK {unit} {seq} busy\n").as_bytes())
                    .await;
                continue;
            }
            pending.push((unit, seq));
            if pending.len() == 2 {
                for (unit, seq) in pending.drain(..).rev() {
                    peer.answer(format!("ACK {unit} {seq} id-{unit}-{seq}\n").as_bytes())
                        .await;
                }
            }
        }
        (alarms, heartbeats)
    });
    assert!(sim.wait_acked(WAIT).await, "{:?}", sim.stats());
    let records = sim.records();
    let stats = sim.stop().await;
    let (alarms, _) = gateway.await.unwrap();
    assert_eq!((stats.sent, stats.acked, stats.waiting), (24, 24, 0));
    assert_eq!(alarms as u64, 24 + stats.resends - stats.garbage_bursts);
    assert_eq!(stats.naks, stats.garbage_bursts + 1, "{stats:?}");
    let mut last_seq: HashMap<String, u32> = HashMap::new();
    for record in &records {
        let seq = record.seq.unwrap();
        assert_eq!(
            record.alarm_id.as_deref(),
            Some(format!("id-{}-{seq}", record.account).as_str()),
            "{record:?}"
        );
        let previous = last_seq.insert(record.account.clone(), seq).unwrap_or(0);
        assert_eq!(seq, previous + 1, "{record:?}");
        assert!(
            record
                .text
                .starts_with(&format!("ALARM {} {seq} {} ", record.account, record.code))
                || record.text == format!("ALARM {} {seq} {}", record.account, record.code)
        );
    }
}

#[tokio::test]
async fn writes_keep_to_the_baud_rate_and_new_lines_to_the_rate() {
    // 200 bytes a second: five 21-byte lines take at least (105 - 20) / 200 s, the first 20 bytes going
    // out at once.
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("slow");
    let started = std::time::Instant::now();
    let sim = SerialSim::start(SerialSimConfig {
        baud: 2_000,
        ..config(LineFormat::Surgard, link.clone(), 5)
    })
    .await
    .unwrap();
    let mut peer = Peer::open(&link, LineFormat::Surgard);
    let gateway = tokio::spawn(async move {
        while peer.line().await.is_some() {
            peer.answer(&[ACK]).await;
        }
    });
    assert!(sim.wait_acked(WAIT).await, "{:?}", sim.stats());
    assert!(
        started.elapsed() >= Duration::from_millis(425),
        "{:?}",
        started.elapsed()
    );
    sim.stop().await;
    gateway.await.unwrap();

    // 20 new lines a second: ten take at least 9 / 20 s.
    let link = dir.path().join("paced");
    let started = std::time::Instant::now();
    let sim = SerialSim::start(SerialSimConfig {
        rate: 20.0,
        ..config(LineFormat::ContactId, link.clone(), 10)
    })
    .await
    .unwrap();
    let mut peer = Peer::open(&link, LineFormat::ContactId);
    let gateway = tokio::spawn(async move {
        while peer.line().await.is_some() {
            peer.answer(&[ACK]).await;
        }
    });
    assert!(sim.wait_acked(WAIT).await, "{:?}", sim.stats());
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    sim.stop().await;
    gateway.await.unwrap();
}
