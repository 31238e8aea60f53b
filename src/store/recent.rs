//! The dedupe keys of the SQLite store's recent alarms, held in memory.
//!
//! A disk index in key order costs every new alarm a write of one page
//! picked at random (keys are spread over devices), which made that index
//! most of what a batch wrote to the WAL. Instead the store keeps, for each
//! key stored within the dedupe window, a 64-bit hash and the alarm's rowid;
//! rows are appended to the `alarms` table in rowid order and found again by
//! rowid, and a match is checked against the row itself (key and time), so
//! a hash collision can at worst miss a duplicate, never swallow an alarm.
//!
//! Other processes writing the same file are caught up with under the write
//! lock: every row with a rowid above the highest one seen is folded in
//! before a batch is checked.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// A stored alarm as the set knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub rowid: i64,
    /// Milliseconds since the epoch.
    pub received_at: i64,
}

/// Keys stored within the window, by hash.
#[derive(Debug, Default)]
pub(super) struct RecentKeys {
    /// Key hash → the latest stored alarm with that hash.
    latest: HashMap<u64, Entry>,
    /// Every alarm folded in, oldest first, to expire them.
    order: VecDeque<(u64, Entry)>,
    /// Highest rowid folded in; `None` until loaded from the table.
    seen: Option<i64>,
}

impl RecentKeys {
    pub(super) fn hash(key: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        hasher.finish()
    }

    /// The highest rowid folded in, or `None` when the set has not been
    /// loaded (or was dropped).
    pub(super) fn seen(&self) -> Option<i64> {
        self.seen
    }

    /// Forgets everything: the next batch loads the window again.
    pub(super) fn reset(&mut self) {
        *self = RecentKeys::default();
    }

    /// Marks the set loaded up to `rowid` (the table's highest, 0 if empty).
    pub(super) fn loaded_to(&mut self, rowid: i64) {
        self.seen = Some(self.seen.map_or(rowid, |s| s.max(rowid)));
    }

    /// Folds in a stored alarm. A later alarm with the same key replaces
    /// the earlier one: it was stored because the earlier one had left the
    /// window.
    pub(super) fn insert(&mut self, key: &str, entry: Entry) {
        let hash = RecentKeys::hash(key);
        self.latest.insert(hash, entry);
        self.order.push_back((hash, entry));
        self.loaded_to(entry.rowid);
    }

    /// Drops alarms received before `since` (milliseconds). Alarms are
    /// folded in roughly in time order; one received out of order may stay
    /// a little longer, which is harmless because every match is checked
    /// against the window.
    pub(super) fn expire(&mut self, since: i64) {
        while let Some((hash, entry)) = self.order.front().copied() {
            if entry.received_at >= since {
                break;
            }
            self.order.pop_front();
            if self.latest.get(&hash) == Some(&entry) {
                self.latest.remove(&hash);
            }
        }
    }

    /// The stored alarm whose key may be `key`: check it against its row.
    pub(super) fn candidate(&self, key: &str) -> Option<Entry> {
        self.latest.get(&RecentKeys::hash(key)).copied()
    }

    pub(super) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rowid: i64, received_at: i64) -> Entry {
        Entry { rowid, received_at }
    }

    #[test]
    fn a_stored_key_is_a_candidate_until_it_leaves_the_window() {
        let mut keys = RecentKeys::default();
        assert_eq!(keys.seen(), None);
        keys.insert("a", at(1, 100));
        keys.insert("b", at(2, 150));
        assert_eq!(keys.seen(), Some(2));
        assert_eq!(keys.candidate("a"), Some(at(1, 100)));
        assert_eq!(keys.candidate("c"), None);

        keys.expire(120);
        assert_eq!(keys.candidate("a"), None);
        assert_eq!(keys.candidate("b"), Some(at(2, 150)));
        assert_eq!(keys.len(), 1);
        // The highest rowid stays: rows below it are known.
        assert_eq!(keys.seen(), Some(2));
    }

    #[test]
    fn a_key_stored_again_points_at_the_new_alarm_even_when_the_old_expires_late() {
        let mut keys = RecentKeys::default();
        keys.insert("late", at(1, 500)); // received out of order
        keys.insert("a", at(2, 100));
        keys.insert("a", at(3, 900));
        keys.expire(600);
        // "late" is at the front and expired; "a"'s first entry expires
        // with it but must not take the new entry along.
        assert_eq!(keys.candidate("a"), Some(at(3, 900)));
        assert_eq!(keys.candidate("late"), None);
    }

    #[test]
    fn reset_forgets_everything() {
        let mut keys = RecentKeys::default();
        keys.insert("a", at(7, 100));
        keys.reset();
        assert_eq!(keys.seen(), None);
        assert_eq!(keys.candidate("a"), None);
        keys.loaded_to(0);
        assert_eq!(keys.seen(), Some(0));
    }
}
