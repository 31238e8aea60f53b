//! Alarm codes as devices send them, whatever the transport: a taxonomy
//! event name, a Contact ID qualifier and event code, or a SIA code. Shared by
//! the MQTT payloads and the serial line formats, so that `1101` or `MA`
//! means the same alarm on every source.

use crate::model::AlarmClass;
use crate::taxonomy::{CodeTable, Qualifier};

/// The code of one signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    /// A taxonomy class name (or a well-formed name not in it).
    Event(String),
    /// Contact ID qualifier and three-digit event code.
    ContactId { qualifier: Qualifier, event: u16 },
    /// A two-letter SIA code.
    Sia(String),
}

impl Code {
    /// The code as the device sent it, e.g. `fall`, `1101`, `MA`.
    pub fn original(&self) -> String {
        match self {
            Code::Event(name) => name.clone(),
            Code::ContactId { qualifier, event } => {
                format!("{}{event:03}", qualifier.digit())
            }
            Code::Sia(code) => code.clone(),
        }
    }

    /// The class the code maps to, and whether the code itself says
    /// "restore" (an event name never does).
    pub fn classify(&self, table: &CodeTable) -> (AlarmClass, bool) {
        match self {
            Code::Event(name) => (table.event(name), false),
            Code::ContactId { qualifier, event } => {
                let m = table.contact_id(*qualifier, *event);
                (m.class, m.restore)
            }
            Code::Sia(code) => {
                let m = table.sia(code);
                (m.class, m.restore)
            }
        }
    }

    /// A code written in any of its three forms: four digits with the first
    /// 1, 3 or 6 (Contact ID), two upper-case letters (SIA), or an event name.
    pub fn parse_any(s: &str) -> Option<Code> {
        parse_cid(s)
            .or_else(|| parse_sia(s))
            .or_else(|| valid_event_name(s).then(|| Code::Event(s.to_owned())))
    }
}

/// An event name is well-formed when it looks like a taxonomy class name:
/// 1–64 characters of `[a-z0-9_]`, starting with a letter.
pub fn valid_event_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=64).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

/// A Contact ID code: four digits, the qualifier (1, 3 or 6) then the event.
pub fn parse_cid(s: &str) -> Option<Code> {
    let b = s.as_bytes();
    if b.len() != 4 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let qualifier = Qualifier::from_digit(b[0] - b'0')?;
    let event = three_digits(&b[1..])?;
    Some(Code::ContactId { qualifier, event })
}

/// A SIA code: two upper-case letters.
pub fn parse_sia(s: &str) -> Option<Code> {
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase())).then(|| Code::Sia(s.to_owned()))
}

/// Three ASCII digits as a number.
pub fn three_digits(b: &[u8]) -> Option<u16> {
    match b {
        [x, y, z] if b.iter().all(u8::is_ascii_digit) => {
            Some(u16::from(x - b'0') * 100 + u16::from(y - b'0') * 10 + u16::from(z - b'0'))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_are_told_apart() {
        assert_eq!(
            Code::parse_any("1101"),
            Some(Code::ContactId {
                qualifier: Qualifier::New,
                event: 101
            })
        );
        assert_eq!(Code::parse_any("MA"), Some(Code::Sia("MA".into())));
        assert_eq!(Code::parse_any("fall"), Some(Code::Event("fall".into())));
        for bad in ["2101", "110", "Fall", "", "M1", "11011", "1a"] {
            assert_eq!(Code::parse_any(bad), None, "{bad}");
        }
    }

    #[test]
    fn codes_keep_their_original_text() {
        for s in ["1101", "3602", "6147", "MA", "fall"] {
            assert_eq!(Code::parse_any(s).map(|c| c.original()).as_deref(), Some(s));
        }
    }
}
