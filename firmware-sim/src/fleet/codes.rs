//! What a simulated device says: the classes of the fleet's mix, their Contact ID and SIA codes (the default
//! table of DESIGN.md), and the payloads that carry them. Pure functions over a random number generator: no
//! I/O, no clock reads (the caller passes the timestamp in).

use std::fmt::Write as _;

use rand::Rng;

/// The sequence number malformed payloads carry where they carry one. Alarms start at 1, so a `rejected`
/// reply with this number (or with none) answers a malformed payload, never an alarm.
pub const MALFORMED_SEQ: u32 = 0;

/// The priority groups of the taxonomy, most urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    Critical,
    Urgent,
    Technical,
    Routine,
}

impl Group {
    pub const ALL: [Group; 4] = [
        Group::Critical,
        Group::Urgent,
        Group::Technical,
        Group::Routine,
    ];

    /// The taxonomy's priority number (1 critical … 4 routine).
    pub fn priority(self) -> u8 {
        match self {
            Group::Critical => 1,
            Group::Urgent => 2,
            Group::Technical => 3,
            Group::Routine => 4,
        }
    }
}

/// One class the fleet sends, with the codes DESIGN.md's default table gives it. An empty list means the
/// class has no code in that column, so alarms of the class go out in another form.
#[derive(Debug, PartialEq, Eq)]
pub struct ClassCodes {
    /// The taxonomy class name, as sent in the `event` form.
    pub class: &'static str,
    pub group: Group,
    /// Contact ID event codes (three digits, without the qualifier).
    pub cid: &'static [u16],
    /// SIA codes of the alarm itself.
    pub sia_alarm: &'static [&'static str],
    /// SIA codes of its restore.
    pub sia_restore: &'static [&'static str],
}

impl ClassCodes {
    /// Whether an alarm (or restore) of this class can be sent in `form`.
    pub fn has_form(&self, form: Form, restore: bool) -> bool {
        match form {
            Form::Event => true,
            Form::Cid => !self.cid.is_empty(),
            Form::Sia if restore => !self.sia_restore.is_empty(),
            Form::Sia => !self.sia_alarm.is_empty(),
        }
    }
}

const fn class(
    class: &'static str,
    group: Group,
    cid: &'static [u16],
    sia_alarm: &'static [&'static str],
    sia_restore: &'static [&'static str],
) -> ClassCodes {
    ClassCodes {
        class,
        group,
        cid,
        sia_alarm,
        sia_restore,
    }
}

/// Every class the fleet sends, grouped by priority.
pub const CLASSES: &[ClassCodes] = &[
    class(
        "personal_emergency",
        Group::Critical,
        &[100, 101],
        &["MA", "QA"],
        &["MH", "MR", "QH", "QR"],
    ),
    class("fall", Group::Critical, &[], &[], &[]),
    class(
        "fire",
        Group::Critical,
        &[110, 111, 114],
        &["FA", "KA"],
        &["FH", "KH"],
    ),
    class("carbon_monoxide", Group::Critical, &[162], &[], &[]),
    class(
        "inactivity",
        Group::Urgent,
        &[102, 641, 654],
        &["NA"],
        &["NS"],
    ),
    class("flood", Group::Urgent, &[113, 154], &["WA"], &["WH"]),
    class("temperature_low", Group::Urgent, &[159], &["ZA"], &["ZH"]),
    class("bed_exit", Group::Urgent, &[], &[], &[]),
    class("door_exit", Group::Urgent, &[], &[], &[]),
    class("mains_fail", Group::Technical, &[301], &["AT"], &["AR"]),
    class(
        "low_battery",
        Group::Technical,
        &[302, 309, 311, 384],
        &["YT", "XT"],
        &["YR", "XR"],
    ),
    class(
        "comms_fail",
        Group::Technical,
        &[350, 351, 352, 354, 356],
        &["YC", "YS"],
        &["YK"],
    ),
    class(
        "supervision_lost",
        Group::Technical,
        &[147, 355, 381],
        &["BZ"],
        &[],
    ),
    class("tamper", Group::Technical, &[137, 383], &["TA"], &["TR"]),
    class(
        "test",
        Group::Routine,
        &[601, 602, 603, 608],
        &["RP", "RX", "RY"],
        &[],
    ),
    class("check_in", Group::Routine, &[642], &[], &[]),
    class("cancel", Group::Routine, &[406], &[], &[]),
    class("info", Group::Routine, &[305], &["RR"], &[]),
];

/// How often each priority group is drawn, as weights (they need not add up to 1), and how many technical
/// alarms are restores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mix {
    pub critical: f64,
    pub urgent: f64,
    pub technical: f64,
    pub routine: f64,
    /// The share (0.0–1.0) of technical alarms that are restores (the condition cleared).
    pub restore_share: f64,
}

impl Default for Mix {
    /// 7 % critical, 13 % urgent, 55 % technical, 25 % routine; 10 % of technical alarms are restores.
    fn default() -> Mix {
        Mix {
            critical: 0.07,
            urgent: 0.13,
            technical: 0.55,
            routine: 0.25,
            restore_share: 0.10,
        }
    }
}

impl Mix {
    fn weight(&self, group: Group) -> f64 {
        match group {
            Group::Critical => self.critical,
            Group::Urgent => self.urgent,
            Group::Technical => self.technical,
            Group::Routine => self.routine,
        }
    }

    /// Every problem with this mix.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for group in Group::ALL {
            let weight = self.weight(group);
            if !weight.is_finite() || weight < 0.0 {
                problems.push(format!(
                    "mix: the {group:?} weight {weight} is not a number >= 0"
                ));
            }
        }
        let total: f64 = Group::ALL.iter().map(|g| self.weight(*g)).sum();
        if problems.is_empty() && total <= 0.0 {
            problems.push("mix: every weight is 0".to_owned());
        }
        if !(0.0..=1.0).contains(&self.restore_share) {
            problems.push(format!(
                "mix: restore_share {} is not between 0 and 1",
                self.restore_share
            ));
        }
        problems
    }

    /// Draws a group by weight. The mix must be free of problems.
    fn draw_group(&self, rng: &mut impl Rng) -> Group {
        let total: f64 = Group::ALL.iter().map(|g| self.weight(*g)).sum();
        let mut point = rng.gen::<f64>() * total;
        for group in Group::ALL {
            let weight = self.weight(group);
            if point < weight {
                return group;
            }
            point -= weight;
        }
        // Rounding can leave the point just past the last weight: take the last group that has one.
        Group::ALL
            .into_iter()
            .rev()
            .find(|g| self.weight(*g) > 0.0)
            .unwrap_or(Group::Technical)
    }
}

/// The three ways a payload can carry its code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// `"event": "<class name>"`.
    Event,
    /// `"cid": "<qualifier><event code>"`.
    Cid,
    /// `"sia": "<two letters>"`.
    Sia,
}

impl Form {
    pub const ALL: [Form; 3] = [Form::Event, Form::Cid, Form::Sia];
}

/// The code of one alarm, in the form it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Event,
    /// Qualifier (1 new, 3 restore) and the three-digit event code.
    Cid {
        qualifier: u8,
        event: u16,
    },
    Sia(&'static str),
}

/// One alarm's content, apart from the sequence number and the time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    pub class: &'static ClassCodes,
    pub restore: bool,
    pub code: Code,
    pub battery_pct: u8,
    pub rssi: i16,
}

impl Signal {
    /// Draws a class by the mix, then whether it is a restore, a form and a code, and the telemetry.
    pub fn draw(rng: &mut impl Rng, mix: &Mix) -> Signal {
        let group = mix.draw_group(rng);
        let members = CLASSES.iter().filter(|c| c.group == group);
        let pick = rng.gen_range(0..members.clone().count());
        let class = members.clone().nth(pick).unwrap_or(&CLASSES[0]);
        let restore = group == Group::Technical && rng.gen_bool(mix.restore_share);
        let mut form = Form::ALL[rng.gen_range(0..Form::ALL.len())];
        if !class.has_form(form, restore) {
            let forms: Vec<Form> = Form::ALL
                .into_iter()
                .filter(|f| class.has_form(*f, restore))
                .collect();
            form = forms[rng.gen_range(0..forms.len())];
        }
        let code = match form {
            Form::Event => Code::Event,
            Form::Cid => Code::Cid {
                qualifier: if restore { 3 } else { 1 },
                event: class.cid[rng.gen_range(0..class.cid.len())],
            },
            Form::Sia => {
                let codes = if restore {
                    class.sia_restore
                } else {
                    class.sia_alarm
                };
                Code::Sia(codes[rng.gen_range(0..codes.len())])
            }
        };
        let battery_pct = if class.class == "low_battery" && !restore {
            rng.gen_range(3..=15)
        } else {
            rng.gen_range(20..=100)
        };
        Signal {
            class,
            restore,
            code,
            battery_pct,
            rssi: rng.gen_range(-110..=-45),
        }
    }

    /// The form the code is sent in.
    pub fn form(&self) -> Form {
        match self.code {
            Code::Event => Form::Event,
            Code::Cid { .. } => Form::Cid,
            Code::Sia(_) => Form::Sia,
        }
    }

    /// The alarm payload: `{"seq":n,<code>,"ts":"…","battery_pct":n,"rssi":n}`, with `"restore":true` after an
    /// `event` code when the alarm is a restore (the `cid` and `sia` codes say so themselves).
    /// `ts` must already be in the wire form (it is inserted as it is).
    pub fn payload(&self, seq: u32, ts: &str) -> String {
        let mut out = String::with_capacity(128);
        let _ = write!(out, "{{\"seq\":{seq},");
        let _ = match self.code {
            Code::Event if self.restore => {
                write!(out, "\"event\":\"{}\",\"restore\":true", self.class.class)
            }
            Code::Event => write!(out, "\"event\":\"{}\"", self.class.class),
            Code::Cid { qualifier, event } => write!(out, "\"cid\":\"{qualifier}{event:03}\""),
            Code::Sia(code) => write!(out, "\"sia\":\"{code}\""),
        };
        let _ = write!(
            out,
            ",\"ts\":\"{ts}\",\"battery_pct\":{},\"rssi\":{}}}",
            self.battery_pct, self.rssi
        );
        out
    }
}

/// The kinds of broken payload the fleet injects; each breaks a required rule of the wire contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Not JSON at all (the gateway cannot read a `seq`).
    NotJson,
    /// `"seq": "0"`: a string, not a JSON integer (no `seq` in the reply).
    SeqAsString,
    /// Both `event` and `cid`.
    TwoCodes,
    /// A `cid` that is not four digits starting with 1, 3 or 6.
    BadCid,
}

impl Malformed {
    pub const ALL: [Malformed; 4] = [
        Malformed::NotJson,
        Malformed::SeqAsString,
        Malformed::TwoCodes,
        Malformed::BadCid,
    ];

    pub fn draw(rng: &mut impl Rng) -> Malformed {
        Malformed::ALL[rng.gen_range(0..Malformed::ALL.len())]
    }

    /// The payload; where it has a readable `seq`, that is [`MALFORMED_SEQ`].
    pub fn payload(self, ts: &str) -> String {
        let seq = MALFORMED_SEQ;
        match self {
            Malformed::NotJson => format!("seq={seq} event=test ts={ts}"),
            Malformed::SeqAsString => {
                format!("{{\"seq\":\"{seq}\",\"event\":\"test\",\"ts\":\"{ts}\"}}")
            }
            Malformed::TwoCodes => {
                format!("{{\"seq\":{seq},\"event\":\"fall\",\"cid\":\"1101\",\"ts\":\"{ts}\"}}")
            }
            Malformed::BadCid => format!("{{\"seq\":{seq},\"cid\":\"11A1\",\"ts\":\"{ts}\"}}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde_json::Value;

    use super::*;

    /// The priority table of DESIGN.md ("Taxonomy and priority"), as written there.
    const DESIGN_PRIORITIES: &str = "\
| 1 critical | `unknown` (a code nobody has mapped yet), `personal_emergency` (pendant, pull cord, base button), `fall`, `fire` (smoke, heat), `carbon_monoxide`, `gas`, `seizure`, `panic` |
| 2 urgent | `inactivity`, `bed_exit`, `chair_exit`, `door_exit`, `flood`, `temperature_high`, `temperature_low`, `medication_missed`, `carer_no_show` |
| 3 technical | `mains_fail`, `low_battery`, `tamper`, `device_fault`, `comms_fail`, `supervision_lost`, `heartbeat_missed` |
| 4 routine | `test`, `cancel`, `check_in`, `info` |";

    /// The default code table of DESIGN.md, as written there.
    const DESIGN_CODES: &str = "\
| `personal_emergency` | 100, 101 | MA, QA / MH, MR, QH, QR |
| `panic` | 120, 121, 122 | PA / PH |
| `fire` | 110, 111, 114 | FA, KA / FH, KH |
| `gas` | 151 | GA / GH |
| `carbon_monoxide` | 162 | — |
| `inactivity` | 102, 641, 654 | NA / NS |
| `flood` | 113, 154 | WA / WH |
| `temperature_high` | 158 | — |
| `temperature_low` | 159 | ZA / ZH |
| `check_in` | 642 | — |
| `mains_fail` | 301 | AT / AR |
| `low_battery` | 302, 309, 311, 384 | YT, XT / YR, XR |
| `tamper` | 137, 383 | TA / TR |
| `supervision_lost` | 147, 355, 381 | BZ |
| `comms_fail` | 350, 351, 352, 354, 356 | YC, YS / YK |
| `device_fault` | 344, 380, 391, 393 | MT, QT, FT |
| `cancel` | 406 | — |
| `test` | 601, 602, 603, 608 | RP, RX, RY |
| `info` | 305 | RR |";

    #[derive(Default)]
    struct DesignRow {
        cid: HashSet<u16>,
        sia_alarm: HashSet<String>,
        sia_restore: HashSet<String>,
    }

    fn cells(line: &str) -> Vec<&str> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect()
    }

    fn codes_list(text: &str) -> impl Iterator<Item = &str> {
        text.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && *c != "—")
    }

    fn design_codes() -> HashMap<String, DesignRow> {
        let mut rows = HashMap::new();
        for line in DESIGN_CODES.lines() {
            let cells = cells(line);
            let class = cells[0].trim_matches('`').to_owned();
            let mut row = DesignRow::default();
            for code in codes_list(cells[1]) {
                row.cid.insert(code.parse().unwrap());
            }
            let (alarm, restore) = cells[2].split_once('/').unwrap_or((cells[2], ""));
            row.sia_alarm = codes_list(alarm).map(str::to_owned).collect();
            row.sia_restore = codes_list(restore).map(str::to_owned).collect();
            rows.insert(class, row);
        }
        rows
    }

    fn design_priorities() -> HashMap<String, u8> {
        let mut priorities = HashMap::new();
        for line in DESIGN_PRIORITIES.lines() {
            let cells = cells(line);
            let priority: u8 = cells[0][..1].parse().unwrap();
            for part in cells[1].split('`').skip(1).step_by(2) {
                priorities.insert(part.to_owned(), priority);
            }
        }
        priorities
    }

    #[test]
    fn every_code_the_fleet_can_send_is_in_the_design_table_for_its_class() {
        let design = design_codes();
        let priorities = design_priorities();
        for class in CLASSES {
            assert_eq!(
                priorities.get(class.class),
                Some(&class.group.priority()),
                "{} has the priority of DESIGN.md",
                class.class
            );
            let Some(row) = design.get(class.class) else {
                assert!(
                    class.cid.is_empty()
                        && class.sia_alarm.is_empty()
                        && class.sia_restore.is_empty(),
                    "{} has no row in DESIGN.md, so no codes",
                    class.class
                );
                continue;
            };
            for code in class.cid {
                assert!(row.cid.contains(code), "{}: CID {code}", class.class);
            }
            for code in class.sia_alarm {
                assert!(row.sia_alarm.contains(*code), "{}: SIA {code}", class.class);
            }
            for code in class.sia_restore {
                assert!(
                    row.sia_restore.contains(*code),
                    "{}: SIA restore {code}",
                    class.class
                );
            }
        }
    }

    #[test]
    fn the_fleet_uses_every_code_of_its_classes() {
        // Not required by the contract, but a class listed with fewer codes than DESIGN.md is likely a typo.
        let design = design_codes();
        for class in CLASSES {
            if let Some(row) = design.get(class.class) {
                assert_eq!(row.cid.len(), class.cid.len(), "{}", class.class);
                assert_eq!(
                    row.sia_alarm.len(),
                    class.sia_alarm.len(),
                    "{}",
                    class.class
                );
                assert_eq!(
                    row.sia_restore.len(),
                    class.sia_restore.len(),
                    "{}",
                    class.class
                );
            }
        }
    }

    #[test]
    fn drawn_signals_follow_the_table_and_the_mix() {
        let design = design_codes();
        let mix = Mix::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut groups: HashMap<Group, usize> = HashMap::new();
        let mut forms: HashMap<Form, usize> = HashMap::new();
        let mut restores = 0;
        let n = 20_000;
        for _ in 0..n {
            let signal = Signal::draw(&mut rng, &mix);
            *groups.entry(signal.class.group).or_default() += 1;
            *forms.entry(signal.form()).or_default() += 1;
            if signal.restore {
                restores += 1;
                assert_eq!(signal.class.group, Group::Technical);
            }
            let row = design.get(signal.class.class);
            match signal.code {
                Code::Event => {}
                Code::Cid { qualifier, event } => {
                    assert_eq!(qualifier, if signal.restore { 3 } else { 1 });
                    assert!(row.is_some_and(|r| r.cid.contains(&event)));
                }
                Code::Sia(code) => {
                    let row = row.unwrap();
                    let list = if signal.restore {
                        &row.sia_restore
                    } else {
                        &row.sia_alarm
                    };
                    assert!(list.contains(code), "{} {code}", signal.class.class);
                }
            }
            assert!(signal.battery_pct <= 100);
            if ["fall", "bed_exit", "door_exit"].contains(&signal.class.class) {
                assert_eq!(signal.form(), Form::Event);
            }
        }
        let share = |g: Group| groups.get(&g).copied().unwrap_or(0) as f64 / n as f64;
        assert!((share(Group::Critical) - 0.07).abs() < 0.015, "{groups:?}");
        assert!((share(Group::Urgent) - 0.13).abs() < 0.02, "{groups:?}");
        assert!((share(Group::Technical) - 0.55).abs() < 0.02, "{groups:?}");
        assert!((share(Group::Routine) - 0.25).abs() < 0.02, "{groups:?}");
        let technical = groups[&Group::Technical] as f64;
        assert!((restores as f64 / technical - 0.10).abs() < 0.02);
        for form in Form::ALL {
            assert!(forms[&form] > n / 5, "{forms:?}");
        }
    }

    #[test]
    fn a_mix_can_leave_groups_out() {
        let mix = Mix {
            critical: 1.0,
            urgent: 0.0,
            technical: 0.0,
            routine: 0.0,
            restore_share: 0.5,
        };
        assert!(mix.problems().is_empty());
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1_000 {
            let signal = Signal::draw(&mut rng, &mix);
            assert_eq!(signal.class.group, Group::Critical);
            assert!(!signal.restore);
        }
        let bad = Mix {
            critical: -1.0,
            urgent: f64::NAN,
            technical: 0.0,
            routine: 0.0,
            restore_share: 2.0,
        };
        assert_eq!(bad.problems().len(), 3, "{:?}", bad.problems());
        let zero = Mix {
            critical: 0.0,
            urgent: 0.0,
            technical: 0.0,
            routine: 0.0,
            restore_share: 0.0,
        };
        assert_eq!(zero.problems().len(), 1);
    }

    #[test]
    fn payloads_are_json_objects_with_one_code() {
        let mut rng = StdRng::seed_from_u64(3);
        let ts = "2026-11-22T10:15:30.123Z";
        for seq in 1..2_000 {
            let signal = Signal::draw(&mut rng, &Mix::default());
            let text = signal.payload(seq, ts);
            let value: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["seq"].as_u64(), Some(u64::from(seq)));
            assert_eq!(value["ts"], ts);
            let codes = ["event", "cid", "sia"]
                .iter()
                .filter(|k| value.get(**k).is_some())
                .count();
            assert_eq!(codes, 1, "{text}");
            match signal.code {
                Code::Event => {
                    assert_eq!(value["event"], signal.class.class);
                    assert_eq!(value.get("restore").is_some(), signal.restore, "{text}");
                }
                Code::Cid { .. } => {
                    let cid = value["cid"].as_str().unwrap();
                    assert_eq!(cid.len(), 4);
                    assert!(cid.starts_with('1') || cid.starts_with('3'));
                    assert!(cid.bytes().all(|b| b.is_ascii_digit()));
                }
                Code::Sia(code) => assert_eq!(value["sia"], code),
            }
        }
    }

    #[test]
    fn malformed_payloads_break_a_required_rule() {
        let ts = "2026-11-22T10:15:30.123Z";
        for kind in Malformed::ALL {
            let text = kind.payload(ts);
            let value: Result<Value, _> = serde_json::from_str(&text);
            let broken = match value {
                Err(_) => true,
                Ok(value) => {
                    let seq_ok = value["seq"].is_u64();
                    let codes = ["event", "cid", "sia"]
                        .iter()
                        .filter(|k| value.get(**k).is_some())
                        .count();
                    let cid_ok = value.get("cid").is_none_or(|c| {
                        c.as_str().is_some_and(|c| {
                            c.len() == 4
                                && c.bytes().all(|b| b.is_ascii_digit())
                                && matches!(c.as_bytes()[0], b'1' | b'3' | b'6')
                        })
                    });
                    !seq_ok || codes != 1 || !cid_ok
                }
            };
            assert!(broken, "{kind:?}: {text}");
        }
    }
}
