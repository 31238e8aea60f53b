//! What a simulated receiver or unit writes, byte for byte: the lines of each format, the Contact ID check
//! digit and the garbage bursts; what the classes of the fleet's mix become in each format; and how the
//! gateway's `telecare-line` answers are read. Pure functions over a random number generator: no I/O, no
//! clock reads (the caller passes the timestamp in).

use rand::Rng;

use super::LineFormat;
use crate::fleet::{ClassCodes, Code, Form, Group, Mix, Signal, CLASSES};

/// DC4, the terminator of Sur-Gard receiver output.
pub const DC4: u8 = 0x14;
/// ACK, the gateway's answer to a stored `surgard` or `contact-id` line (or a heartbeat).
pub const ACK: u8 = 0x06;
/// NAK, the gateway's answer to a line it cannot read.
pub const NAK: u8 = 0x15;
/// Bytes a garbage burst never contains: DC4, CR and LF. The gateway ends a line at any of them in the
/// receiver formats, so a burst without them always merges into the line written after it.
pub const LINE_ENDS: [u8; 3] = [DC4, b'\r', b'\n'];
/// The longest garbage burst.
pub const MAX_GARBAGE: usize = 64;
/// The share of `surgard` lines sent as SIA, among classes that have a SIA code.
pub const SIA_SHARE: f64 = 0.3;
/// The share of Contact ID codes of technical alarms (not restores) sent with qualifier 6, "still present".
pub const STATUS_SHARE: f64 = 0.1;
/// The share of `telecare-line` alarms that carry `ts=`.
pub const TS_SHARE: f64 = 0.9;
/// The share of `telecare-line` alarms that carry `zone=`.
pub const ZONE_SHARE: f64 = 0.5;
/// Contact ID groups (partitions) drawn: 01–08.
const GROUPS: u16 = 8;
/// Contact ID zones or users drawn: 001–999.
const ZONES: u16 = 999;
/// SIA zones drawn: 0001–9999.
const SIA_ZONES: u16 = 9_999;
/// The stride of the per-account walk through groups and zones: prime, and coprime to `GROUPS * ZONES`
/// (2³·3³·37) and to `SIA_ZONES` (3²·11·101), so consecutive lines of one account visit every combination
/// once before any repeats.
const STRIDE: u64 = 5_003;

/// The Contact ID qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qualifier {
    /// 1, `E`: a new event.
    New,
    /// 3, `R`: a restore.
    Restore,
    /// 6, `P`: a status report, the condition still present.
    Status,
}

impl Qualifier {
    /// The digit of raw Contact ID (`1`, `3`, `6`).
    pub fn digit(self) -> char {
        match self {
            Qualifier::New => '1',
            Qualifier::Restore => '3',
            Qualifier::Status => '6',
        }
    }

    /// The letter of Sur-Gard output (`E`, `R`, `P`).
    pub fn letter(self) -> char {
        match self {
            Qualifier::New => 'E',
            Qualifier::Restore => 'R',
            Qualifier::Status => 'P',
        }
    }
}

/// The code a line carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineCode {
    /// A Contact ID qualifier and three-digit event.
    ContactId { qualifier: Qualifier, event: u16 },
    /// A two-letter SIA code.
    Sia(&'static str),
    /// A taxonomy class name (`telecare-line` only).
    Event(&'static str),
}

impl LineCode {
    /// The code as records show it: `1101` (qualifier digit and event), `MA`, or `fall`.
    pub fn text(&self) -> String {
        match *self {
            LineCode::ContactId { qualifier, event } => format!("{}{event:03}", qualifier.digit()),
            LineCode::Sia(code) => code.to_owned(),
            LineCode::Event(name) => name.to_owned(),
        }
    }
}

/// What one line says, apart from its account, numbers and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drawn {
    pub class: &'static ClassCodes,
    pub restore: bool,
    pub code: LineCode,
}

impl Drawn {
    /// Whether the class has priority 1.
    pub fn critical(&self) -> bool {
        self.class.group == Group::Critical
    }
}

/// Draws what a line says, from the fleet's mix.
///
/// - `telecare-line` keeps the fleet's three forms (event name, Contact ID, SIA); a restore drawn in the
///   event form goes out as Contact ID with qualifier 3, because the line has no restore flag.
/// - `surgard` sends a class that has a SIA code as SIA in [`SIA_SHARE`] of cases, otherwise Contact ID.
/// - `contact-id` sends Contact ID only.
///
/// Where a class has no Contact ID code (`fall`, `bed_exit`, `door_exit`) but one is needed, a class of the
/// same priority group that has one is sent instead, so the group mix holds.
pub fn draw(rng: &mut impl Rng, mix: &Mix, format: LineFormat) -> Drawn {
    let signal = Signal::draw(rng, mix);
    let restore = signal.restore;
    match format {
        LineFormat::TelecareLine => {
            let code = match signal.code {
                Code::Event if !restore => LineCode::Event(signal.class.class),
                Code::Sia(code) => LineCode::Sia(code),
                Code::Cid { event, .. } => LineCode::ContactId {
                    qualifier: qualifier(rng, signal.class, restore),
                    event,
                },
                Code::Event => return contact_id_of(rng, signal.class, restore),
            };
            Drawn {
                class: signal.class,
                restore,
                code,
            }
        }
        LineFormat::Surgard
            if signal.class.has_form(Form::Sia, restore) && rng.gen_bool(SIA_SHARE) =>
        {
            let codes = if restore {
                signal.class.sia_restore
            } else {
                signal.class.sia_alarm
            };
            Drawn {
                class: signal.class,
                restore,
                code: LineCode::Sia(codes[rng.gen_range(0..codes.len())]),
            }
        }
        LineFormat::Surgard | LineFormat::ContactId => contact_id_of(rng, signal.class, restore),
    }
}

/// A Contact ID code of `class`, or of a class of its group that has one.
fn contact_id_of(rng: &mut impl Rng, class: &'static ClassCodes, restore: bool) -> Drawn {
    let class = if class.cid.is_empty() {
        let others = CLASSES
            .iter()
            .filter(|c| c.group == class.group && !c.cid.is_empty());
        let count = others.clone().count();
        if count == 0 {
            // Every group has a class with a Contact ID code; should the table change, take the first class.
            &CLASSES[0]
        } else {
            others
                .clone()
                .nth(rng.gen_range(0..count))
                .unwrap_or(&CLASSES[0])
        }
    } else {
        class
    };
    // Restores are drawn for technical classes only, and every technical class has a Contact ID code.
    let restore = restore && !class.cid.is_empty();
    let event = class
        .cid
        .get(rng.gen_range(0..class.cid.len().max(1)))
        .copied()
        .unwrap_or(100);
    Drawn {
        class,
        restore,
        code: LineCode::ContactId {
            qualifier: qualifier(rng, class, restore),
            event,
        },
    }
}

fn qualifier(rng: &mut impl Rng, class: &ClassCodes, restore: bool) -> Qualifier {
    if restore {
        Qualifier::Restore
    } else if class.group == Group::Technical && rng.gen_bool(STATUS_SHARE) {
        Qualifier::Status
    } else {
        Qualifier::New
    }
}

/// The group (01–08) and zone or user (001–999) of an account's `n`-th Contact ID line (from 0), and the zone
/// (0001–9999) of its `n`-th SIA line. The numbers walk every combination in a scrambled order before any
/// repeats, so two distinct lines of one account are never the same text within the gateway's
/// de-duplication window (serial lines carry no sequence number: the same line from the same account is a
/// re-send there). `account` shifts each account's walk.
pub fn numbers(account: u32, n: u64) -> (u16, u16, u16) {
    let start = u64::from(account).wrapping_mul(2_654_435_761);
    let combos = u64::from(GROUPS) * u64::from(ZONES);
    let cid = (n.wrapping_mul(STRIDE).wrapping_add(start)) % combos;
    let sia = (n.wrapping_mul(STRIDE).wrapping_add(start)) % u64::from(SIA_ZONES);
    // Both are below their modulus, which fits in u16.
    let group = (cid / u64::from(ZONES)) as u16 + 1;
    let zone = (cid % u64::from(ZONES)) as u16 + 1;
    (group, zone, sia as u16 + 1)
}

/// The account of number `n` (from 1) for the receiver formats: four digits.
pub fn account(n: u32) -> String {
    format!("{n:04}")
}

/// The unit id of number `n` (from 1) for `telecare-line`: `unit-0001`, …
pub fn unit(n: u32) -> String {
    format!("unit-{n:04}")
}

/// A Sur-Gard Contact ID line without its terminator: `5RRLs18AAAAQXYZGGCCC`, e.g. `5011 181234E12101001`.
pub fn surgard_contact_id(
    receiver: u8,
    line: u8,
    account: &str,
    qualifier: Qualifier,
    event: u16,
    group: u16,
    zone: u16,
) -> String {
    format!(
        "5{receiver:02}{line} 18{account}{}{event:03}{group:02}{zone:03}",
        qualifier.letter()
    )
}

/// A Sur-Gard SIA line without its terminator: `3RRL`, four spaces, the account right-aligned in six
/// characters, the SIA code, the zone in four digits; e.g. `3011    001234MA0003`.
pub fn surgard_sia(receiver: u8, line: u8, account: &str, code: &str, zone: u16) -> String {
    format!("3{receiver:02}{line}    {account:>6}{code}{zone:04}")
}

/// A Sur-Gard heartbeat line without its terminator: `1RRL`, 11 spaces, `@`, 4 spaces.
pub fn surgard_heartbeat(receiver: u8, line: u8) -> String {
    format!("1{receiver:02}{line}{}@{}", " ".repeat(11), " ".repeat(4))
}

/// A raw Contact ID message without its terminator: `ACCT 18 Q XYZ GG CCC S`, 16 characters, no spaces
/// (with `account` up to 9999, `event` up to 999, `group` up to 99 and `zone` up to 999).
pub fn contact_id_message(
    account: u32,
    qualifier: Qualifier,
    event: u16,
    group: u16,
    zone: u16,
) -> String {
    let mut message = format!(
        "{account:04}18{}{event:03}{group:02}{zone:03}",
        qualifier.digit()
    );
    // Only decimal digits went in, and every one of them has a value.
    message.push(check_digit(&message).unwrap_or('F'));
    message
}

/// The Contact ID check digit of the first 15 characters: every digit counts its value, except 0, which
/// counts 10, and B–F, which count 11–15; the check digit makes the sum of all 16 a multiple of 15. A check
/// value of 0 is written `F`, 10 is written `0`, 11–14 are `B`–`E`. `None` for a character that is not a
/// Contact ID digit.
pub fn check_digit(digits: &str) -> Option<char> {
    let mut sum = 0u32;
    for b in digits.bytes() {
        sum += match b {
            b'0' => 10,
            b'1'..=b'9' => u32::from(b - b'0'),
            b'B'..=b'F' => u32::from(b - b'A') + 10,
            _ => return None,
        };
    }
    let r = (15 - sum % 15) % 15;
    Some(match r {
        0 => 'F',
        10 => '0',
        // 11..=14 are B..E; 1..=9 are the digits.
        11..=14 => char::from(b'A' + (r - 10) as u8),
        _ => char::from(b'0' + r as u8),
    })
}

/// A `telecare-line` alarm without its terminator: `ALARM <unit> <seq> <code> [ts=<ts>] [zone=<n>]`.
/// `ts` must already be in the wire form.
pub fn telecare_alarm(
    unit: &str,
    seq: u32,
    code: &str,
    ts: Option<&str>,
    zone: Option<u16>,
) -> String {
    let mut line = format!("ALARM {unit} {seq} {code}");
    if let Some(ts) = ts {
        line.push_str(" ts=");
        line.push_str(ts);
    }
    if let Some(zone) = zone {
        line.push_str(&format!(" zone={zone}"));
    }
    line
}

/// A `telecare-line` heartbeat without its terminator: `HEARTBEAT <unit> <seq>`.
pub fn telecare_heartbeat(unit: &str, seq: u32) -> String {
    format!("HEARTBEAT {unit} {seq}")
}

/// What ends a line of the format: DC4 for `surgard`, CR LF for `contact-id`, LF for `telecare-line`.
pub fn terminator(format: LineFormat) -> &'static [u8] {
    match format {
        LineFormat::Surgard => &[DC4],
        LineFormat::ContactId => b"\r\n",
        LineFormat::TelecareLine => b"\n",
    }
}

/// A burst of 1–[`MAX_GARBAGE`] random bytes without any of [`LINE_ENDS`].
pub fn garbage(rng: &mut impl Rng) -> Vec<u8> {
    let len = rng.gen_range(1..=MAX_GARBAGE);
    let mut burst = Vec::with_capacity(len);
    while burst.len() < len {
        let b: u8 = rng.gen();
        if !LINE_ENDS.contains(&b) {
            burst.push(b);
        }
    }
    burst
}

/// A `telecare-line` answer from the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// `ACK <unit> <seq> [<alarm_id>]`: stored (with the alarm id), or a heartbeat seen (without).
    Ack {
        unit: &'a str,
        seq: u32,
        alarm_id: Option<&'a str>,
    },
    /// `NAK <unit> <seq> <reason>`, with `None` for a `-` (a line the gateway could not read that far).
    Nak {
        unit: Option<&'a str>,
        seq: Option<u32>,
    },
}

/// Reads one answer line (without its LF; a CR before it is ignored). `None` when it is not one.
pub fn parse_answer(line: &str) -> Option<Answer<'_>> {
    let mut fields = line.split_ascii_whitespace();
    let kind = fields.next()?;
    let unit = fields.next()?;
    let seq = fields.next()?;
    match kind {
        "ACK" => Some(Answer::Ack {
            unit,
            seq: seq.parse().ok()?,
            alarm_id: fields.next(),
        }),
        "NAK" => Some(Answer::Nak {
            unit: (unit != "-").then_some(unit),
            seq: if seq == "-" {
                None
            } else {
                Some(seq.parse().ok()?)
            },
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn surgard_lines_match_the_receiver_manual() {
        assert_eq!(
            surgard_contact_id(1, 1, "1234", Qualifier::New, 121, 1, 1),
            "5011 181234E12101001"
        );
        assert_eq!(
            surgard_contact_id(12, 3, "0042", Qualifier::Restore, 301, 8, 999),
            "5123 180042R30108999"
        );
        assert_eq!(
            surgard_contact_id(1, 1, "0001", Qualifier::Status, 302, 2, 17),
            "5011 180001P30202017"
        );
        assert_eq!(surgard_sia(1, 1, "001234", "MA", 3), "3011    001234MA0003");
        assert_eq!(surgard_sia(1, 1, "1234", "FA", 12), "3011      1234FA0012");
        assert_eq!(surgard_heartbeat(1, 1), "1011           @    ");
        assert_eq!(surgard_heartbeat(1, 1).len(), 20);
        assert_eq!(terminator(LineFormat::Surgard), &[0x14]);
    }

    #[test]
    fn contact_id_check_digits_match_the_standard_examples() {
        assert_eq!(check_digit("123418110101001"), Some('B'));
        assert_eq!(check_digit("123418360200000"), Some('F'));
        assert_eq!(
            contact_id_message(1234, Qualifier::New, 101, 1, 1),
            "123418110101001B"
        );
        assert_eq!(
            contact_id_message(1234, Qualifier::Status, 602, 0, 0),
            "123418660200000C"
        );
        assert_eq!(
            contact_id_message(1234, Qualifier::Restore, 602, 0, 0),
            "123418360200000F"
        );
        // The 15 digits sum to 91 (each 0 counts 10), so the check value is 14, written E.
        assert_eq!(
            contact_id_message(7, Qualifier::New, 101, 1, 1),
            "000718110101001E"
        );
        assert_eq!(check_digit("12341811010100X"), None);
        assert_eq!(terminator(LineFormat::ContactId), b"\r\n");
    }

    /// The sum of all 16 digits, 0 counting 10 and B–F 11–15.
    fn weighted_sum(message: &str) -> u32 {
        message
            .bytes()
            .map(|b| match b {
                b'0' => 10,
                b'1'..=b'9' => u32::from(b - b'0'),
                b'B'..=b'F' => u32::from(b - b'A') + 10,
                other => panic!("not a Contact ID digit: {other}"),
            })
            .sum()
    }

    #[test]
    fn every_contact_id_message_adds_up_to_a_multiple_of_15() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut checks = HashSet::new();
        for _ in 0..5_000 {
            let account = rng.gen_range(1..=9_999);
            let qualifier =
                [Qualifier::New, Qualifier::Restore, Qualifier::Status][rng.gen_range(0..3)];
            let message = contact_id_message(
                account,
                qualifier,
                rng.gen_range(100..=999),
                rng.gen_range(0..=99),
                rng.gen_range(0..=999),
            );
            assert_eq!(message.len(), 16, "{message}");
            assert_eq!(weighted_sum(&message) % 15, 0, "{message}");
            checks.insert(message.as_bytes()[15]);
        }
        // Every check character occurs: 1-9, 0 (for 10), B-E, F (for 0).
        assert_eq!(checks.len(), 15, "{checks:?}");
    }

    #[test]
    fn telecare_lines_have_the_documented_fields() {
        assert_eq!(
            telecare_alarm(
                "unit-0007",
                12,
                "1101",
                Some("2026-11-22T10:15:30.123Z"),
                Some(3)
            ),
            "ALARM unit-0007 12 1101 ts=2026-11-22T10:15:30.123Z zone=3"
        );
        assert_eq!(
            telecare_alarm("unit-0001", 1, "fall", None, None),
            "ALARM unit-0001 1 fall"
        );
        assert_eq!(
            telecare_alarm("unit-0001", 2, "MA", None, Some(1)),
            "ALARM unit-0001 2 MA zone=1"
        );
        assert_eq!(telecare_heartbeat("unit-0002", 5), "HEARTBEAT unit-0002 5");
        assert_eq!(terminator(LineFormat::TelecareLine), b"\n");
        assert_eq!(unit(1), "unit-0001");
        assert_eq!(account(42), "0042");
    }

    #[test]
    fn telecare_answers_are_read_without_trusting_them() {
        assert_eq!(
            parse_answer("ACK unit-0001 7 01JD3K"),
            Some(Answer::Ack {
                unit: "unit-0001",
                seq: 7,
                alarm_id: Some("01JD3K")
            })
        );
        assert_eq!(
            parse_answer("ACK unit-0001 8\r"),
            Some(Answer::Ack {
                unit: "unit-0001",
                seq: 8,
                alarm_id: None
            })
        );
        assert_eq!(
            parse_answer("NAK unit-0002 3 bad code"),
            Some(Answer::Nak {
                unit: Some("unit-0002"),
                seq: Some(3)
            })
        );
        assert_eq!(
            parse_answer("NAK - - not_text"),
            Some(Answer::Nak {
                unit: None,
                seq: None
            })
        );
        for bad in [
            "",
            "ACK",
            "ACK unit-0001",
            "ACK unit-0001 x",
            "ACK unit-0001 99999999999",
            "HELLO unit-0001 1",
            "NAK unit-0001 seven reason",
        ] {
            assert_eq!(parse_answer(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn garbage_never_holds_a_terminator() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut lengths = HashSet::new();
        let mut seen = [false; 256];
        for _ in 0..20_000 {
            let burst = garbage(&mut rng);
            assert!((1..=MAX_GARBAGE).contains(&burst.len()));
            lengths.insert(burst.len());
            for b in &burst {
                assert!(!LINE_ENDS.contains(b), "{burst:?}");
                seen[usize::from(*b)] = true;
            }
        }
        assert_eq!(lengths.len(), MAX_GARBAGE);
        // Every other byte value occurs.
        assert_eq!(seen.iter().filter(|s| **s).count(), 256 - LINE_ENDS.len());
    }

    #[test]
    fn drawn_codes_fit_each_format() {
        let mix = Mix::default();
        for format in [
            LineFormat::Surgard,
            LineFormat::ContactId,
            LineFormat::TelecareLine,
        ] {
            let mut rng = StdRng::seed_from_u64(9);
            let mut sia = 0;
            let mut status = 0;
            let mut events = 0;
            let n = 10_000;
            for _ in 0..n {
                let drawn = draw(&mut rng, &mix, format);
                match drawn.code {
                    LineCode::ContactId { qualifier, event } => {
                        assert!(drawn.class.cid.contains(&event), "{drawn:?}");
                        assert_eq!(qualifier == Qualifier::Restore, drawn.restore, "{drawn:?}");
                        if qualifier == Qualifier::Status {
                            status += 1;
                            assert_eq!(drawn.class.group, Group::Technical);
                        }
                    }
                    LineCode::Sia(code) => {
                        sia += 1;
                        assert_ne!(format, LineFormat::ContactId);
                        let list = if drawn.restore {
                            drawn.class.sia_restore
                        } else {
                            drawn.class.sia_alarm
                        };
                        assert!(list.contains(&code), "{drawn:?}");
                    }
                    LineCode::Event(name) => {
                        events += 1;
                        assert_eq!(format, LineFormat::TelecareLine);
                        assert_eq!(name, drawn.class.class);
                        assert!(!drawn.restore);
                    }
                }
            }
            assert!(status > 0, "{format}");
            match format {
                LineFormat::Surgard => {
                    let share = f64::from(sia) / f64::from(n);
                    assert!((0.1..0.3).contains(&share), "{share}");
                }
                LineFormat::ContactId => assert_eq!(sia + events, 0),
                LineFormat::TelecareLine => assert!(sia > n / 10 && events > n / 10),
            }
        }
    }

    #[test]
    fn an_accounts_numbers_do_not_repeat_for_a_long_time() {
        for account in [1, 2, 50, 9_999] {
            let mut cid = HashSet::new();
            let mut sia = HashSet::new();
            for n in 0..u64::from(GROUPS) * u64::from(ZONES) {
                let (group, zone, sia_zone) = numbers(account, n);
                assert!((1..=GROUPS).contains(&group));
                assert!((1..=ZONES).contains(&zone));
                assert!((1..=SIA_ZONES).contains(&sia_zone));
                assert!(cid.insert((group, zone)), "{account} {n}");
                if n < u64::from(SIA_ZONES) {
                    assert!(sia.insert(sia_zone), "{account} {n}");
                }
            }
        }
    }
}
