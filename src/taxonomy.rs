//! Mapping protocol codes (Contact ID event codes, SIA codes, event names)
//! onto the alarm taxonomy.
//!
//! [`CodeTable::default`] is the table of DESIGN.md. A device model can
//! override single codes (one maker's fall detector reports Contact ID 120,
//! another's inactivity 102) with [`CodeTable::override_contact_id`] and
//! [`CodeTable::override_sia`]. A code in no table is never dropped: it maps to
//! [`AlarmClass::Unknown`], which is critical.

use std::collections::HashMap;

use crate::model::AlarmClass;

/// The class a code maps to and whether the code itself means "restore".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    pub class: AlarmClass,
    pub restore: bool,
}

/// A Contact ID event qualifier (the `Q` of `ACCT MT Q XYZ GG CCC S`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qualifier {
    /// 1: new event or opening.
    New,
    /// 3: restore or closing.
    Restore,
    /// 6: previously reported condition still present.
    Status,
}

impl Qualifier {
    pub fn from_digit(d: u8) -> Option<Qualifier> {
        match d {
            1 => Some(Qualifier::New),
            3 => Some(Qualifier::Restore),
            6 => Some(Qualifier::Status),
            _ => None,
        }
    }

    /// The digit Contact ID writes for this qualifier.
    pub fn digit(self) -> u8 {
        match self {
            Qualifier::New => 1,
            Qualifier::Restore => 3,
            Qualifier::Status => 6,
        }
    }
}

/// Contact ID event codes per class (DESIGN.md).
const CONTACT_ID: &[(AlarmClass, &[u16])] = &[
    (AlarmClass::PersonalEmergency, &[100, 101]),
    (AlarmClass::Panic, &[120, 121, 122]),
    (AlarmClass::Fire, &[110, 111, 114]),
    (AlarmClass::Gas, &[151]),
    (AlarmClass::CarbonMonoxide, &[162]),
    (AlarmClass::Inactivity, &[102, 641, 654]),
    (AlarmClass::Flood, &[113, 154]),
    (AlarmClass::TemperatureHigh, &[158]),
    (AlarmClass::TemperatureLow, &[159]),
    (AlarmClass::CheckIn, &[642]),
    (AlarmClass::MainsFail, &[301]),
    (AlarmClass::LowBattery, &[302, 309, 311, 384]),
    (AlarmClass::Tamper, &[137, 383]),
    (AlarmClass::SupervisionLost, &[147, 355, 381]),
    (AlarmClass::CommsFail, &[350, 351, 352, 354, 356]),
    (AlarmClass::DeviceFault, &[344, 380, 391, 393]),
    (AlarmClass::Cancel, &[406]),
    (AlarmClass::Test, &[601, 602, 603, 608]),
    (AlarmClass::Info, &[305]),
];

/// SIA codes per class: (alarm codes, restore codes) (DESIGN.md).
const SIA: &[(AlarmClass, &[&str], &[&str])] = &[
    (
        AlarmClass::PersonalEmergency,
        &["MA", "QA"],
        &["MH", "MR", "QH", "QR"],
    ),
    (AlarmClass::Panic, &["PA"], &["PH"]),
    (AlarmClass::Fire, &["FA", "KA"], &["FH", "KH"]),
    (AlarmClass::Gas, &["GA"], &["GH"]),
    (AlarmClass::Inactivity, &["NA"], &["NS"]),
    (AlarmClass::Flood, &["WA"], &["WH"]),
    (AlarmClass::TemperatureLow, &["ZA"], &["ZH"]),
    (AlarmClass::MainsFail, &["AT"], &["AR"]),
    (AlarmClass::LowBattery, &["YT", "XT"], &["YR", "XR"]),
    (AlarmClass::Tamper, &["TA"], &["TR"]),
    (AlarmClass::SupervisionLost, &["BZ"], &[]),
    (AlarmClass::CommsFail, &["YC", "YS"], &["YK"]),
    (AlarmClass::DeviceFault, &["MT", "QT", "FT"], &[]),
    (AlarmClass::Test, &["RP", "RX", "RY"], &[]),
    (AlarmClass::Info, &["RR"], &[]),
];

/// Maps codes to classes. Cheap to share behind an `Arc`; built once.
#[derive(Debug, Clone)]
pub struct CodeTable {
    contact_id: HashMap<u16, AlarmClass>,
    sia: HashMap<[u8; 2], Mapped>,
}

impl Default for CodeTable {
    fn default() -> Self {
        let mut contact_id = HashMap::new();
        for (class, codes) in CONTACT_ID {
            for code in *codes {
                contact_id.insert(*code, *class);
            }
        }
        let mut sia = HashMap::new();
        for (class, alarms, restores) in SIA {
            for (codes, restore) in [(alarms, false), (restores, true)] {
                for code in codes.iter() {
                    if let Some(key) = sia_key(code) {
                        sia.insert(
                            key,
                            Mapped {
                                class: *class,
                                restore,
                            },
                        );
                    }
                }
            }
        }
        CodeTable { contact_id, sia }
    }
}

fn sia_key(code: &str) -> Option<[u8; 2]> {
    match code.as_bytes() {
        [a, b] => Some([*a, *b]),
        _ => None,
    }
}

impl CodeTable {
    /// Maps a Contact ID event: the qualifier decides `restore` (only 3 is a
    /// restore), the three-digit event code decides the class.
    pub fn contact_id(&self, qualifier: Qualifier, event: u16) -> Mapped {
        Mapped {
            class: self
                .contact_id
                .get(&event)
                .copied()
                .unwrap_or(AlarmClass::Unknown),
            restore: qualifier == Qualifier::Restore,
        }
    }

    /// Maps a two-letter SIA code; the code itself says whether it restores.
    pub fn sia(&self, code: &str) -> Mapped {
        sia_key(code)
            .and_then(|key| self.sia.get(&key).copied())
            .unwrap_or(Mapped {
                class: AlarmClass::Unknown,
                restore: false,
            })
    }

    /// Maps an event name: a taxonomy class name, or `unknown` for any other.
    pub fn event(&self, name: &str) -> AlarmClass {
        AlarmClass::from_name(name).unwrap_or(AlarmClass::Unknown)
    }

    /// Makes a Contact ID event code map to `class` (a device model override).
    pub fn override_contact_id(&mut self, event: u16, class: AlarmClass) {
        self.contact_id.insert(event, class);
    }

    /// Makes a SIA code map to `class`, as an alarm or a restore.
    pub fn override_sia(&mut self, code: &str, class: AlarmClass, restore: bool) {
        if let Some(key) = sia_key(code) {
            self.sia.insert(key, Mapped { class, restore });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contact_id_row_maps_to_its_class() {
        let table = CodeTable::default();
        let mut seen = 0;
        for (class, codes) in CONTACT_ID {
            for code in *codes {
                let m = table.contact_id(Qualifier::New, *code);
                assert_eq!(
                    m,
                    Mapped {
                        class: *class,
                        restore: false
                    },
                    "CID {code}"
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 43);
        // Spot checks against the table in DESIGN.md, independent of CONTACT_ID.
        assert_eq!(
            table.contact_id(Qualifier::New, 101).class,
            AlarmClass::PersonalEmergency
        );
        assert_eq!(
            table.contact_id(Qualifier::New, 162).class,
            AlarmClass::CarbonMonoxide
        );
        assert_eq!(
            table.contact_id(Qualifier::New, 654).class,
            AlarmClass::Inactivity
        );
        assert_eq!(
            table.contact_id(Qualifier::New, 384).class,
            AlarmClass::LowBattery
        );
        assert_eq!(
            table.contact_id(Qualifier::New, 406).class,
            AlarmClass::Cancel
        );
        assert_eq!(
            table.contact_id(Qualifier::New, 305).class,
            AlarmClass::Info
        );
    }

    #[test]
    fn every_sia_row_maps_to_its_class_and_restore_flag() {
        let table = CodeTable::default();
        let mut seen = 0;
        for (class, alarms, restores) in SIA {
            for code in alarms.iter() {
                assert_eq!(
                    table.sia(code),
                    Mapped {
                        class: *class,
                        restore: false
                    },
                    "SIA {code}"
                );
                seen += 1;
            }
            for code in restores.iter() {
                assert_eq!(
                    table.sia(code),
                    Mapped {
                        class: *class,
                        restore: true
                    },
                    "SIA {code}"
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 39);
        assert_eq!(
            table.sia("QR"),
            Mapped {
                class: AlarmClass::PersonalEmergency,
                restore: true
            }
        );
        assert_eq!(table.sia("BZ").class, AlarmClass::SupervisionLost);
        assert_eq!(
            table.sia("YK"),
            Mapped {
                class: AlarmClass::CommsFail,
                restore: true
            }
        );
    }

    #[test]
    fn qualifier_three_restores_and_one_and_six_do_not() {
        let table = CodeTable::default();
        assert!(!table.contact_id(Qualifier::New, 101).restore);
        assert!(table.contact_id(Qualifier::Restore, 101).restore);
        let status = table.contact_id(Qualifier::Status, 301);
        assert_eq!(
            status,
            Mapped {
                class: AlarmClass::MainsFail,
                restore: false
            }
        );
        assert_eq!(Qualifier::from_digit(6), Some(Qualifier::Status));
        assert_eq!(Qualifier::from_digit(2), None);
    }

    #[test]
    fn unknown_codes_are_unknown_and_critical() {
        let table = CodeTable::default();
        let cid = table.contact_id(Qualifier::New, 130);
        assert_eq!(cid.class, AlarmClass::Unknown);
        assert_eq!(cid.class.priority().number(), 1);
        assert_eq!(table.sia("UA").class, AlarmClass::Unknown);
        assert_eq!(table.sia("XYZ").class, AlarmClass::Unknown);
        assert_eq!(table.event("levitation"), AlarmClass::Unknown);
        assert_eq!(table.event("fall"), AlarmClass::Fall);
    }

    #[test]
    fn a_device_model_can_override_a_code() {
        let mut table = CodeTable::default();
        table.override_contact_id(120, AlarmClass::Fall);
        assert_eq!(
            table.contact_id(Qualifier::New, 120).class,
            AlarmClass::Fall
        );
        table.override_sia("UA", AlarmClass::Seizure, false);
        assert_eq!(table.sia("UA").class, AlarmClass::Seizure);
        // Other codes keep the default.
        assert_eq!(
            table.contact_id(Qualifier::New, 121).class,
            AlarmClass::Panic
        );
    }
}
