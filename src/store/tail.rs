//! The records of the last commits, kept in memory so that the uplink reads live traffic
//! without the disk.
//!
//! The committer adds each commit's appended records once they are durable, in sequence
//! order, and drops the oldest beyond [`TAIL_RECORDS`] or [`TAIL_BYTES`]. A read is served here
//! only when every sequence it asks for that exists is here: the tail holds a gap-free run of
//! sequences up to the newest appended one (a failed commit, whose sequences are given up,
//! empties it). Deleted records are left out by the caller, as for a read from the log.

use std::collections::VecDeque;

use prost::Message;

use crate::proto::OutboxRecord;

/// Records kept at most.
pub(super) const TAIL_RECORDS: usize = 4096;
/// Encoded bytes kept at most.
pub(super) const TAIL_BYTES: usize = 512 * 1024;

/// Records read: (sequence, record), and the sequences that did not decode.
pub(super) type Found = (Vec<(u64, OutboxRecord)>, Vec<u64>);

#[derive(Debug, Default)]
pub(super) struct Tail {
    /// (sequence, encoded record), oldest first, sequences consecutive.
    records: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
}

impl Tail {
    /// Adds a durable record. A sequence that does not follow the newest one starts the tail
    /// again.
    pub fn push(&mut self, seq: u64, encoded: Vec<u8>) {
        if let Some((last, _)) = self.records.back() {
            if last.checked_add(1) != Some(seq) {
                self.clear();
            }
        }
        self.bytes += encoded.len();
        self.records.push_back((seq, encoded));
        while self.records.len() > TAIL_RECORDS || self.bytes > TAIL_BYTES {
            match self.records.pop_front() {
                Some((_, e)) => self.bytes -= e.len(),
                None => break,
            }
        }
    }

    /// Forgets every record (their sequences may no longer follow on).
    pub fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }

    /// Up to `max` records with sequences from `from` and before `before`, passing over those
    /// `gone` names (deleted: they do not count towards `max`), or `None` when the tail does not
    /// hold all of them (the log must be read).
    pub fn read(
        &self,
        from: u64,
        before: u64,
        max: usize,
        gone: impl Fn(u64) -> bool,
    ) -> Option<Found> {
        let first = self.records.front()?.0;
        if from < first {
            return None;
        }
        let mut out = Vec::new();
        let mut corrupt = Vec::new();
        if max == 0 || from >= before {
            return Some((out, corrupt));
        }
        let skip = usize::try_from(from - first).unwrap_or(usize::MAX);
        for (seq, encoded) in self.records.iter().skip(skip) {
            if *seq >= before || out.len() >= max {
                break;
            }
            if gone(*seq) {
                continue;
            }
            match OutboxRecord::decode(encoded.as_slice()) {
                Ok(record) => out.push((*seq, record)),
                Err(_) => corrupt.push(*seq),
            }
        }
        Some((out, corrupt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(topic: &str) -> Vec<u8> {
        OutboxRecord {
            topic: topic.to_owned(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn topics(found: &Found) -> Vec<(u64, String)> {
        found.0.iter().map(|(s, r)| (*s, r.topic.clone())).collect()
    }

    #[test]
    fn reads_what_it_holds_and_refuses_what_it_does_not() {
        let mut tail = Tail::default();
        assert!(
            tail.read(0, u64::MAX, 10, |_| false).is_none(),
            "empty: the log is read"
        );
        for seq in 5..10 {
            tail.push(seq, encoded(&format!("t/{seq}")));
        }
        assert!(
            tail.read(4, u64::MAX, 10, |_| false).is_none(),
            "older than the tail"
        );
        let found = tail.read(6, u64::MAX, 2, |_| false).expect("held");
        assert_eq!(topics(&found), [(6, "t/6".into()), (7, "t/7".into())]);
        let found = tail.read(8, 9, 10, |_| false).expect("held");
        assert_eq!(topics(&found), [(8, "t/8".into())]);
        // Past the newest: nothing yet, and no need for the log.
        assert_eq!(
            tail.read(10, u64::MAX, 10, |_| false)
                .expect("held")
                .0
                .len(),
            0
        );
    }

    #[test]
    fn a_gap_in_the_sequences_starts_it_again() {
        let mut tail = Tail::default();
        tail.push(1, encoded("a"));
        tail.push(2, encoded("b"));
        tail.push(5, encoded("c"));
        assert!(tail.read(2, u64::MAX, 10, |_| false).is_none());
        assert_eq!(
            topics(&tail.read(5, u64::MAX, 10, |_| false).expect("held")),
            [(5, "c".into())]
        );
    }

    #[test]
    fn it_keeps_to_its_bounds() {
        let mut tail = Tail::default();
        for seq in 0..(TAIL_RECORDS as u64 + 10) {
            tail.push(seq, encoded("x"));
        }
        assert_eq!(tail.records.len(), TAIL_RECORDS);
        assert!(tail.read(9, u64::MAX, 1, |_| false).is_none());
        assert!(tail.read(10, u64::MAX, 1, |_| false).is_some());
        let big = vec![0u8; TAIL_BYTES / 2 + 1];
        tail.push(TAIL_RECORDS as u64 + 10, big.clone());
        tail.push(TAIL_RECORDS as u64 + 11, big);
        assert_eq!(tail.records.len(), 1, "two halves and more do not fit");
        assert!(tail.bytes <= TAIL_BYTES);
    }
}
