//! Opening the log: finding the segments, the tail and the state, after a clean stop, a crash
//! or a power cut alike.
//!
//! Rules (the module doc of `mod.rs` has the format):
//! 1. Every `*.seg` file's first record says which chunk it holds; a file whose first record is
//!    not intact holds nothing (a spare).
//! 2. The newest chunk's [`Start`] names the last checkpoint that was complete when it began.
//!    The state (outbox cursor, keyed entries) is rebuilt by reading from that checkpoint to the
//!    end of the newest chunk — a bounded stretch, never the whole backlog.
//! 3. Damage is passed over and counted: a bad body by its length, a bad header by looking for
//!    the next position where a header written for it stands. Damage at the very end of the
//!    newest chunk is a torn write (counted as torn); the tail is the end of the last intact
//!    record. Nothing here panics or refuses to open because of what the files hold.
//! 4. Chunks older than both the outbox front and the checkpoint are dead: their files are
//!    spares.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::format::{self, Cursor, Kind, Start};
use super::log::{self, Chunk, Files, Flow, Found, ScanReport};
use super::KEY_COST;

/// A keyed entry's place in the log: its [`Kind::Set`] record and the bytes it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Place {
    pub position: u64,
    pub value_len: u64,
}

pub(super) type Entries = HashMap<(u8, Vec<u8>), Place>;

/// What opening found.
pub(super) struct Recovered {
    pub files: Arc<Files>,
    pub epoch: u64,
    pub cursor: Cursor,
    pub entries: Entries,
    /// Where the last complete checkpoint began.
    pub checkpoint: u64,
    /// The newest chunk, and where its intact data ends.
    pub tail_chunk: u64,
    pub tail: u64,
    /// Segment files holding no live chunk.
    pub spares: Vec<Found>,
    pub report: ScanReport,
    /// Bytes read to rebuild the state, and how long opening took.
    pub scanned: u64,
    pub elapsed_ms: u64,
}

/// Opens the log in `dir`. `None` when it holds no chunk at all (a new store).
/// `writable`: the files are opened for writing and leftovers of an unfinished segment
/// creation are removed; without it nothing in `dir` changes.
pub(super) fn recover(
    dir: &Path,
    segment_bytes: u64,
    writable: bool,
) -> std::io::Result<Option<Recovered>> {
    let began = Instant::now();
    let (segment, found) = log::list_segments(dir, segment_bytes, writable)?;
    let mut chunks: BTreeMap<u64, (Found, Start)> = BTreeMap::new();
    let mut spares = Vec::new();
    for f in found {
        match f.start {
            Some(start) => match chunks.get(&start.chunk) {
                Some(_) => {
                    tracing::warn!(path = %f.path.display(), chunk = start.chunk, "a second segment claims the same chunk; left as a spare");
                    spares.push(f);
                }
                None => {
                    chunks.insert(start.chunk, (f, start));
                }
            },
            None => spares.push(f),
        }
    }
    let Some((&tail_chunk, (_, newest))) = chunks.iter().next_back() else {
        return Ok(None);
    };
    let newest = *newest;
    let files = Arc::new(Files {
        segment_bytes: segment,
        chunks: Default::default(),
        durable_tail: Default::default(),
    });
    {
        let mut map = match files.chunks.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (&n, (f, start)) in &chunks {
            let file = Arc::new(f.file.try_clone()?);
            map.insert(n, Chunk::new(file, f.path.clone(), start.next_seq));
        }
    }
    // Readers may look at everything while the state is rebuilt.
    files
        .durable_tail
        .store(u64::MAX, std::sync::atomic::Ordering::Release);

    let oldest = chunks.keys().next().copied().unwrap_or(tail_chunk);
    let present = |p: u64| chunks.contains_key(&files.chunk_of(p));
    let replay = |from: u64| -> std::io::Result<(Replay, ScanReport)> {
        let mut state = Replay {
            checkpoint_at: from,
            cursor: Cursor {
                first_seq: newest.next_seq,
                position: from,
                cum: 0,
                next_seq: newest.next_seq,
                cum_next: 0,
            },
            entries: Entries::new(),
            checkpoint: from,
            complete: false,
            first: true,
            scanned: 0,
        };
        let report = files.scan(from, u64::MAX, |position, kind, body| {
            state.apply(position, kind, body);
            Flow::Continue
        })?;
        Ok((state, report))
    };
    let (mut state, mut report) = if present(newest.checkpoint) {
        replay(newest.checkpoint)?
    } else {
        replay(oldest * segment)?
    };
    if !state.complete && newest.fallback != newest.checkpoint && present(newest.fallback) {
        // The newest segment's own checkpoint was torn: the one before it still stands.
        (state, report) = replay(newest.fallback)?;
    }
    if !state.complete {
        tracing::error!(
            checkpoint = newest.checkpoint,
            "no complete checkpoint in the log; the state is rebuilt from what is there"
        );
    }
    let tail = tail_chunk * segment + report.end.max(format::record_len(super::START_BODY));
    if report.corrupt > 0 || report.torn > 0 {
        tracing::warn!(
            corrupt = report.corrupt,
            torn = report.torn,
            "the store's log had damaged records; they were passed over"
        );
    }
    let Replay {
        mut cursor,
        entries,
        checkpoint,
        scanned,
        ..
    } = state;
    if cursor.first_seq >= cursor.next_seq {
        cursor.position = tail;
        cursor.cum = cursor.cum_next;
    }
    // Chunks older than both the outbox front and the checkpoint hold nothing live.
    let live_from = files.chunk_of(cursor.position.min(checkpoint));
    let dead: Vec<u64> = chunks.range(..live_from).map(|(&n, _)| n).collect();
    {
        let mut map = match files.chunks.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        for n in dead {
            map.remove(&n);
            if let Some((f, _)) = chunks.remove(&n) {
                spares.push(f);
            }
        }
    }
    Ok(Some(Recovered {
        files,
        epoch: newest.epoch,
        cursor,
        entries,
        checkpoint,
        tail_chunk,
        tail,
        spares,
        report,
        scanned,
        elapsed_ms: began.elapsed().as_millis() as u64,
    }))
}

/// The state as the records from a checkpoint on rebuild it.
struct Replay {
    /// Where the replay began (a checkpoint's first record, if intact).
    checkpoint_at: u64,
    cursor: Cursor,
    entries: Entries,
    /// The last complete checkpoint seen.
    checkpoint: u64,
    /// The checkpoint the replay began at was seen complete.
    complete: bool,
    first: bool,
    scanned: u64,
}

impl Replay {
    fn apply(&mut self, position: u64, kind: Kind, body: &[u8]) {
        self.scanned += format::record_len(body.len());
        let first = std::mem::take(&mut self.first);
        match kind {
            Kind::Start => {
                if let Some(start) = Start::decode(body) {
                    self.cursor.next_seq = self.cursor.next_seq.max(start.next_seq);
                }
            }
            Kind::CheckpointBegin => {
                if first && position == self.checkpoint_at {
                    if let Some(cursor) = Cursor::decode(body) {
                        self.cursor = cursor;
                    }
                }
            }
            Kind::CheckpointEnd => {
                if let Some(begin) = format::Body(body).u64() {
                    if begin >= self.checkpoint_at {
                        self.checkpoint = begin;
                        self.complete = true;
                    }
                }
            }
            Kind::Append => {
                if let Some((seq, cum, encoded)) = format::split_append(body) {
                    let c = &mut self.cursor;
                    if c.first_seq >= c.next_seq && seq >= c.first_seq {
                        // Nothing was live: this record is the front.
                        c.first_seq = seq;
                        c.position = position;
                        c.cum = cum;
                    }
                    c.next_seq = c.next_seq.max(seq + 1);
                    c.cum_next = c.cum_next.max(cum + encoded.len() as u64 + KEY_COST);
                }
            }
            Kind::Ack => {
                if let Some(ack) = Cursor::decode(body) {
                    let c = &mut self.cursor;
                    if ack.first_seq >= c.first_seq {
                        c.first_seq = ack.first_seq;
                        c.position = ack.position;
                        c.cum = ack.cum;
                    }
                    c.next_seq = c.next_seq.max(ack.next_seq);
                    c.cum_next = c.cum_next.max(ack.cum_next);
                }
            }
            Kind::Set => {
                if let Some((space, key, Some(value))) = format::split_entry(body, true) {
                    self.entries.insert(
                        (space, key.to_vec()),
                        Place {
                            position,
                            value_len: value.len() as u64,
                        },
                    );
                }
            }
            Kind::Remove => {
                if let Some((space, key, _)) = format::split_entry(body, false) {
                    self.entries.remove(&(space, key.to_vec()));
                }
            }
            Kind::Pad => {}
        }
    }
}
