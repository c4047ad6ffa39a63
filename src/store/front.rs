//! The outbox's front: which records are live, where the oldest one is, and a bounded index of
//! the oldest ones for walking forward as the hub acknowledges them.
//!
//! Live records are the [`Kind::Append`](super::format::Kind) records from the cursor's
//! `first_seq` on, less those deleted out of order. The index holds up to [`INDEX_CAP`] of them
//! from the front; when it runs short it is refilled by reading the log forward, so neither
//! memory nor the time to open grows with the backlog.

use std::collections::{BTreeMap, VecDeque};

use super::format::{self, Cursor, Kind};
use super::log::{Files, Flow};
use super::KEY_COST;

/// Entries the index holds at most (24 bytes each).
pub(super) const INDEX_CAP: usize = 65_536;
/// Entries one refill reads at most.
const REFILL: usize = 8_192;

/// One live record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub seq: u64,
    pub position: u64,
    /// Cumulative outbox bytes before the record.
    pub cum: u64,
    /// What the record counts against `max_bytes`.
    pub size: u64,
}

pub(super) struct Front {
    pub cursor: Cursor,
    index: VecDeque<Entry>,
    /// The index holds every live record up to the tail.
    complete: bool,
    /// Where a refill goes on reading (when not complete).
    scan_from: u64,
    /// Records deleted while an older one is still live: sequence → size.
    deleted: BTreeMap<u64, u64>,
    /// The sizes in `deleted`, summed.
    deleted_bytes: u64,
}

impl Front {
    /// The front as a recovered cursor describes it; the index fills on first use.
    pub fn new(cursor: Cursor) -> Front {
        let complete = cursor.first_seq >= cursor.next_seq;
        Front {
            cursor,
            index: VecDeque::new(),
            complete,
            scan_from: cursor.position,
            deleted: BTreeMap::new(),
            deleted_bytes: 0,
        }
    }

    pub fn records(&self) -> u64 {
        self.cursor
            .next_seq
            .saturating_sub(self.cursor.first_seq)
            .saturating_sub(self.deleted.len() as u64)
    }

    pub fn bytes(&self) -> u64 {
        self.cursor
            .cum_next
            .saturating_sub(self.cursor.cum)
            .saturating_sub(self.deleted_bytes)
    }

    fn mark_deleted(&mut self, seq: u64, size: u64) {
        if self.deleted.insert(seq, size).is_none() {
            self.deleted_bytes += size;
        }
    }

    fn unmark_deleted(&mut self, seq: u64) -> bool {
        match self.deleted.remove(&seq) {
            Some(size) => {
                self.deleted_bytes -= size;
                true
            }
            None => false,
        }
    }

    /// Notes a record made durable at `position`.
    pub fn appended(&mut self, entry: Entry) {
        if self.cursor.first_seq >= self.cursor.next_seq {
            // Nothing was live: this record is the front.
            self.cursor.position = entry.position;
            self.cursor.cum = entry.cum;
            self.cursor.first_seq = entry.seq;
        }
        self.cursor.next_seq = entry.seq + 1;
        self.cursor.cum_next = entry.cum + entry.size;
        if self.index.back().is_some_and(|e| e.seq >= entry.seq) {
            // A refill within the same batch already read it from the log.
            return;
        }
        if self.complete {
            if self.index.len() < INDEX_CAP {
                self.index.push_back(entry);
            } else {
                self.complete = false;
                self.scan_from = entry.position;
            }
        }
    }

    /// Notes records that were given sequences but never became durable (a failed commit).
    pub fn lost(&mut self, entries: &[Entry]) {
        for e in entries {
            if self.cursor.first_seq >= self.cursor.next_seq {
                self.cursor.first_seq = e.seq + 1;
                self.cursor.cum = e.cum + e.size;
            } else {
                self.mark_deleted(e.seq, e.size);
            }
            self.cursor.next_seq = e.seq + 1;
            self.cursor.cum_next = e.cum + e.size;
        }
    }

    /// The oldest live record, reading the log forward when the index ran short.
    pub fn oldest(&mut self, files: &Files) -> std::io::Result<Option<Entry>> {
        if self.index.is_empty() && !self.complete {
            self.refill(files)?;
        }
        Ok(self.index.front().copied())
    }

    fn refill(&mut self, files: &Files) -> std::io::Result<()> {
        let first = self.cursor.first_seq;
        let mut added = 0;
        let mut last_end = None;
        let report = files.scan(self.scan_from, u64::MAX, |position, kind, body| {
            if kind == Kind::Append {
                if let Some((seq, cum, encoded)) = format::split_append(body) {
                    if seq >= first && self.index.back().is_none_or(|e| e.seq < seq) {
                        self.index.push_back(Entry {
                            seq,
                            position,
                            cum,
                            size: encoded.len() as u64 + KEY_COST,
                        });
                        added += 1;
                    }
                }
            }
            last_end = Some(position + format::record_len(body.len()));
            if added >= REFILL {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })?;
        if added >= REFILL {
            self.scan_from = last_end.unwrap_or(report.end);
        } else {
            self.complete = true;
        }
        Ok(())
    }

    /// Removes acknowledged records; returns how many were live.
    pub fn delete(&mut self, seqs: &[u64], files: &Files) -> std::io::Result<u64> {
        let mut gone = 0;
        for &seq in seqs {
            if seq < self.cursor.first_seq || seq >= self.cursor.next_seq {
                continue;
            }
            if self.deleted.contains_key(&seq) {
                continue;
            }
            let size = self.size_of(seq).unwrap_or(0);
            self.mark_deleted(seq, size);
            gone += 1;
        }
        self.advance(files)?;
        Ok(gone)
    }

    /// Drops the oldest live record (the bound, or its age); returns it.
    pub fn drop_oldest(&mut self, files: &Files) -> std::io::Result<Option<Entry>> {
        let Some(entry) = self.oldest(files)? else {
            return Ok(None);
        };
        self.mark_deleted(entry.seq, entry.size);
        self.advance(files)?;
        Ok(Some(entry))
    }

    fn size_of(&self, seq: u64) -> Option<u64> {
        let first = self.index.front()?.seq;
        let guess = seq.checked_sub(first)? as usize;
        match self.index.get(guess) {
            Some(e) if e.seq == seq => Some(e.size),
            _ => self
                .index
                .binary_search_by_key(&seq, |e| e.seq)
                .ok()
                .and_then(|i| self.index.get(i))
                .map(|e| e.size),
        }
    }

    /// Moves the front past deleted records.
    fn advance(&mut self, files: &Files) -> std::io::Result<()> {
        loop {
            match self.oldest(files)? {
                Some(e) if self.unmark_deleted(e.seq) => {
                    self.index.pop_front();
                    self.cursor.first_seq = e.seq + 1;
                    self.cursor.cum = e.cum + e.size;
                }
                Some(e) => {
                    self.cursor.first_seq = e.seq;
                    self.cursor.position = e.position;
                    self.cursor.cum = e.cum;
                    break;
                }
                None => {
                    // Nothing live: the front is where the next record will go.
                    self.cursor.first_seq = self.cursor.next_seq;
                    self.cursor.cum = self.cursor.cum_next;
                    break;
                }
            }
        }
        let first = self.cursor.first_seq;
        while let Some((&seq, &size)) = self.deleted.first_key_value() {
            if seq >= first {
                break;
            }
            self.deleted.pop_first();
            self.deleted_bytes -= size;
        }
        Ok(())
    }

    /// Where the record with sequence `seq` is, when the index holds it.
    pub fn position_of(&self, seq: u64) -> Option<u64> {
        let first = self.index.front()?.seq;
        let i = seq.checked_sub(first)? as usize;
        match self.index.get(i) {
            Some(e) if e.seq == seq => Some(e.position),
            _ => None,
        }
    }

    pub fn is_deleted(&self, seq: u64) -> bool {
        seq < self.cursor.first_seq || self.deleted.contains_key(&seq)
    }
}
