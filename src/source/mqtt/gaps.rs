//! Sequence-gap detection: evidence that a broker is dropping messages.
//!
//! Devices number their alarms and re-send each until it is acknowledged,
//! so the gateway should see every sequence number. When a device's number
//! jumps (5, then 9), the numbers in between were lost somewhere — most
//! often in a broker whose per-client queue limit (Mosquitto's
//! `max_queued_messages`) dropped QoS 1 messages for a gateway that was
//! behind. The device re-sends them, so nothing is lost for good, but the
//! deployment needs fixing. A number lower than the last is a reboot (the
//! device starts again) or a late re-send, and is not a gap; a late re-send
//! that fills a gap reported before takes its count back.
//!
//! Pure state: no I/O, no clock.

use std::collections::HashMap;

/// Most devices tracked; beyond it the table starts again (a gap may then go
/// unnoticed, never a false one reported).
const MAX_DEVICES: usize = 200_000;
/// Most missing numbers remembered per device, to credit late arrivals.
const MAX_MISSING: usize = 64;

/// What one alarm's sequence number says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// The next number, a re-send, a reboot or the first from the device.
    InOrder,
    /// `missing` numbers were skipped.
    Gap { missing: u64 },
    /// A number reported missing before has arrived after all.
    Filled,
}

#[derive(Debug, Default)]
struct DeviceSeq {
    last: u64,
    missing: Vec<u64>,
}

/// Last sequence numbers per (tenant, device).
#[derive(Debug, Default)]
pub struct SeqTracker {
    devices: HashMap<(String, String), DeviceSeq>,
}

impl SeqTracker {
    /// Records an alarm's sequence number.
    pub fn observe(&mut self, tenant: &str, device_id: &str, seq: u64) -> SeqEvent {
        if self.devices.len() >= MAX_DEVICES {
            self.devices.clear();
        }
        let key = (tenant.to_owned(), device_id.to_owned());
        let Some(state) = self.devices.get_mut(&key) else {
            self.devices.insert(
                key,
                DeviceSeq {
                    last: seq,
                    missing: Vec::new(),
                },
            );
            return SeqEvent::InOrder;
        };
        if seq > state.last {
            let missing = seq - state.last - 1;
            if missing > 0 {
                let from = state.last + 1;
                let remember = missing.min(MAX_MISSING as u64);
                state.missing.extend((0..remember).map(|i| from + i));
                if state.missing.len() > MAX_MISSING {
                    let excess = state.missing.len() - MAX_MISSING;
                    state.missing.drain(..excess);
                }
            }
            state.last = seq;
            return if missing > 0 {
                SeqEvent::Gap { missing }
            } else {
                SeqEvent::InOrder
            };
        }
        if let Some(pos) = state.missing.iter().position(|&m| m == seq) {
            state.missing.swap_remove(pos);
            return SeqEvent::Filled;
        }
        if seq < state.last && seq <= 1 {
            // Sequence numbers start again: a reboot.
            state.last = seq;
            state.missing.clear();
        }
        SeqEvent::InOrder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_numbers_and_resends_are_not_gaps() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe("t", "d", 7), SeqEvent::InOrder, "first seen");
        assert_eq!(t.observe("t", "d", 8), SeqEvent::InOrder);
        assert_eq!(t.observe("t", "d", 8), SeqEvent::InOrder, "a re-send");
        assert_eq!(t.observe("t", "d", 9), SeqEvent::InOrder);
        assert_eq!(
            t.observe("t", "other", 100),
            SeqEvent::InOrder,
            "devices are separate"
        );
    }

    #[test]
    fn a_jump_is_a_gap_and_a_late_arrival_fills_it() {
        let mut t = SeqTracker::default();
        t.observe("t", "d", 5);
        assert_eq!(t.observe("t", "d", 9), SeqEvent::Gap { missing: 3 });
        assert_eq!(t.observe("t", "d", 7), SeqEvent::Filled);
        assert_eq!(t.observe("t", "d", 7), SeqEvent::InOrder, "filled once");
        assert_eq!(t.observe("t", "d", 10), SeqEvent::InOrder);
    }

    #[test]
    fn a_reboot_starts_again_without_a_gap() {
        let mut t = SeqTracker::default();
        t.observe("t", "d", 40);
        assert_eq!(t.observe("t", "d", 1), SeqEvent::InOrder);
        assert_eq!(t.observe("t", "d", 2), SeqEvent::InOrder);
        assert_eq!(t.observe("t", "d", 4), SeqEvent::Gap { missing: 1 });
    }
}
