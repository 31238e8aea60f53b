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
//!
//! Memory: about 25 bytes a key (a hash map slot of hash, rowid and time),
//! so some 15–25 MB for a ten-minute window at a sustained 1,000 alarms a
//! second, and little at the rates a region really sends.
//!
//! The keys are spread over [`SHARDS`] maps by the top bits of their hash. A
//! hash map grows by moving every key at once, under the write turn that
//! every batch waits for: one map of 917,504 keys took about 30 ms to grow
//! on this project's machine; a shard grows alone, at a sixty-fourth of that.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// How far the window must move on before expired keys are swept out
/// (milliseconds); a sweep visits every key.
const SWEEP_EVERY_MS: i64 = 10_000;

/// Maps the keys are spread over (a power of two).
const SHARDS: usize = 64;

/// A stored alarm as the set knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub rowid: i64,
    /// Milliseconds since the epoch.
    pub received_at: i64,
}

/// Keys stored within the window, by hash.
#[derive(Debug)]
pub(super) struct RecentKeys {
    /// Key hash → the latest stored alarm with that hash, in [`SHARDS`]
    /// maps chosen by the hash's top bits.
    latest: Vec<HashMap<u64, Entry>>,
    /// Highest rowid folded in; `None` until loaded from the table.
    seen: Option<i64>,
    /// The window start of the last sweep.
    swept_to: i64,
}

impl Default for RecentKeys {
    fn default() -> RecentKeys {
        RecentKeys {
            latest: (0..SHARDS).map(|_| HashMap::new()).collect(),
            seen: None,
            swept_to: i64::MIN,
        }
    }
}

impl RecentKeys {
    fn hash(key: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        hasher.finish()
    }

    /// The shard of a key hash: its top bits.
    fn shard_of(hash: u64) -> usize {
        (hash >> (u64::BITS - SHARDS.ilog2())) as usize
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
        self.latest[RecentKeys::shard_of(hash)].insert(hash, entry);
        self.loaded_to(entry.rowid);
    }

    /// Drops keys received before `since` (milliseconds), once the window
    /// has moved on far enough since the last sweep. Keys kept a little
    /// longer are harmless: every match is checked against the window.
    pub(super) fn expire(&mut self, since: i64) {
        if since.saturating_sub(self.swept_to) < SWEEP_EVERY_MS {
            return;
        }
        for shard in &mut self.latest {
            shard.retain(|_, e| e.received_at >= since);
            if shard.capacity() > 4 * shard.len().max(1024) {
                shard.shrink_to_fit();
            }
        }
        self.swept_to = since;
    }

    /// The stored alarm whose key may be `key`: check it against its row.
    pub(super) fn candidate(&self, key: &str) -> Option<Entry> {
        let hash = RecentKeys::hash(key);
        self.latest[RecentKeys::shard_of(hash)].get(&hash).copied()
    }

    pub(super) fn len(&self) -> usize {
        self.latest.iter().map(HashMap::len).sum()
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
        keys.insert("a", at(1, 100_000));
        keys.insert("b", at(2, 150_000));
        assert_eq!(keys.seen(), Some(2));
        assert_eq!(keys.candidate("a"), Some(at(1, 100_000)));
        assert_eq!(keys.candidate("c"), None);

        keys.expire(120_000);
        assert_eq!(keys.candidate("a"), None);
        assert_eq!(keys.candidate("b"), Some(at(2, 150_000)));
        assert_eq!(keys.len(), 1);
        // The highest rowid stays: rows below it are known.
        assert_eq!(keys.seen(), Some(2));
    }

    #[test]
    fn sweeps_wait_until_the_window_has_moved_on() {
        let mut keys = RecentKeys::default();
        keys.insert("a", at(1, 100_000));
        keys.insert("b", at(2, 105_000));
        keys.expire(101_000);
        assert_eq!(keys.len(), 1);
        // Too soon after the last sweep: "b" stays for now.
        keys.expire(106_000);
        assert_eq!(keys.candidate("b"), Some(at(2, 105_000)));
        keys.expire(111_000);
        assert_eq!(keys.len(), 0);
    }

    #[test]
    fn a_key_stored_again_points_at_the_new_alarm() {
        let mut keys = RecentKeys::default();
        keys.insert("a", at(2, 100_000));
        keys.insert("a", at(3, 900_000));
        keys.expire(600_000);
        assert_eq!(keys.candidate("a"), Some(at(3, 900_000)));
    }

    #[test]
    fn many_keys_are_all_found_and_expire_by_time() {
        let mut keys = RecentKeys::default();
        for i in 0..10_000 {
            keys.insert(&format!("dev-{i}"), at(i, 100_000 + i));
        }
        assert_eq!(keys.len(), 10_000);
        assert!(keys.latest.iter().all(|shard| !shard.is_empty()));
        assert!(
            (0..10_000).all(|i| keys.candidate(&format!("dev-{i}")) == Some(at(i, 100_000 + i)))
        );

        keys.expire(105_000);
        assert_eq!(keys.len(), 5_000);
        assert_eq!(keys.candidate("dev-4999"), None);
        assert_eq!(keys.candidate("dev-5000"), Some(at(5_000, 105_000)));
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
