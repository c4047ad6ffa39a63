//! The group committer: one thread that owns every write to the log.
//!
//! It takes the first request, then gathers more until the commit window has passed or the
//! batch is full, stages the batch's records after the tail and writes them with one `pwrite`
//! and one `fdatasync`; only then are the waiting tickets resolved. Acknowledgements from the
//! hub only move the outbox front in memory; the front is written (a [`Kind::Ack`] record)
//! riding on a data commit when it fits in the page written anyway, else at most once a second.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::sync::oneshot;

use super::format::{self, Cursor, Kind, Start};
use super::front::Entry;
use super::log::{self, Chunk, Found, Writer};
use super::open::Place;
use super::{OutboxRecord, Request, Shared, StoreError, KEY_COST};
use crate::config::{OutboxConfig, OutboxPolicy};
use crate::liveness::Heartbeat;

/// How often the committer looks after age, spare segments and the lazy cursor.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
/// At most this many aged records are dropped in one round.
const AGED_PER_ROUND: usize = 10_000;
/// The outbox front is written at most this often (a power cut may undo that much of the
/// hub's acknowledgements: those records are sent again and the hub drops them by id).
const CURSOR_EVERY: Duration = Duration::from_secs(1);
/// Spare segments kept for reuse once the backlog has drained.
pub(super) const RESERVE: usize = 1;
/// A spare beyond the reserve is deleted once nothing took it, and the outbox has been empty,
/// for this long: bursts a minute apart keep the segments they need (making one again costs a
/// segment's worth of writes).
pub(super) const SPARE_IDLE: Duration = Duration::from_secs(60);
/// The window of the write rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);

type Waiter = oneshot::Sender<Result<u64, StoreError>>;
/// A keyed entry to set (with a value) or remove: space, key, value, who waits.
type EntryChange = (u8, Vec<u8>, Option<Vec<u8>>, Option<Waiter>);

/// The segment files: the live ones are in `Files`; spares wait for reuse.
pub(super) struct Segments {
    pub dir: PathBuf,
    /// Spare files, with when each became one (the newest last).
    pub spares: Vec<(PathBuf, File, Instant)>,
    pub next_id: u64,
    /// Making a segment writes all of it once: counted with the log's writes.
    pub stats: Arc<super::OutboxStats>,
}

impl Segments {
    pub fn new(
        dir: PathBuf,
        spares: Vec<Found>,
        live: &[PathBuf],
        stats: Arc<super::OutboxStats>,
    ) -> Segments {
        let id_of = |p: &PathBuf| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
        };
        let next_id = spares
            .iter()
            .map(|f| &f.path)
            .chain(live)
            .filter_map(id_of)
            .max()
            .map_or(0, |m| m + 1);
        Segments {
            dir,
            spares: spares
                .into_iter()
                .map(|f| (f.path, f.file, Instant::now()))
                .collect(),
            next_id,
            stats,
        }
    }

    /// A segment for a new chunk: a spare, or a new zero-filled file.
    pub fn take(&mut self, segment: u64) -> std::io::Result<(PathBuf, File)> {
        if let Some((path, file, _)) = self.spares.pop() {
            return Ok((path, file));
        }
        self.create(segment)
    }

    pub fn create(&mut self, segment: u64) -> std::io::Result<(PathBuf, File)> {
        let id = self.next_id;
        self.next_id += 1;
        let made = log::create_segment(&self.dir, id, segment)?;
        self.stats
            .bytes_written
            .fetch_add(segment, Ordering::Relaxed);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.flushes.fetch_add(2, Ordering::Relaxed);
        Ok(made)
    }

    /// Deletes spares beyond the reserve that nothing took for [`SPARE_IDLE`]: while records
    /// pour in, the spares a second of acknowledgements frees are reused rather than deleted
    /// and made again; once a backlog has drained, they go.
    pub fn trim(&mut self) -> std::io::Result<usize> {
        let mut removed = 0;
        while self.spares.len() > RESERVE
            && self
                .spares
                .first()
                .is_some_and(|(_, _, since)| since.elapsed() >= SPARE_IDLE)
        {
            let (path, _, _) = self.spares.remove(0);
            std::fs::remove_file(&path)?;
            removed += 1;
        }
        if removed > 0 {
            log::sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

pub(super) struct Inner {
    shared: Arc<Shared>,
    requests: flume::Receiver<Request>,
    writer: Writer,
    segments: Segments,
    window: Duration,
    /// A commit is made once no append came for this long (within the window).
    gap: Duration,
    max_records: usize,
    max_bytes: u64,
    max_record: u64,
    policy: OutboxPolicy,
    max_age: Option<Duration>,
    last_housekeeping: Instant,
    /// Where the last complete, durable checkpoint began.
    checkpoint: u64,
    /// The front as last written, and when.
    written_cursor: Cursor,
    cursor_written_at: Instant,
    /// After a failed commit the rest of that chunk is left alone.
    abandon_chunk: bool,
    /// A front staged and not yet durable.
    pending_cursor: Option<Cursor>,
    /// A checkpoint staged and not yet durable: where it begins, the entries it moved.
    pending_checkpoint: Option<Moved>,
    in_checkpoint: bool,
    /// Outbox records of the batch being written (staged, not yet durable).
    batch: Vec<Entry>,
    /// Records appended as of the last housekeeping round.
    appended_seen: u64,
    /// Since when nothing has been live in the outbox.
    empty_since: Option<Instant>,
    /// (when, bytes written) once a housekeeping round, for the write rate.
    rate: std::collections::VecDeque<(Instant, u64)>,
}

/// A staged checkpoint: where it begins, and the entries it copied with their new places.
type Moved = (u64, Vec<((u8, Vec<u8>), u64)>);

#[derive(Default)]
struct Batch {
    appends: Vec<(Vec<u8>, Option<Waiter>)>,
    deletes: Vec<u64>,
    entries: Vec<EntryChange>,
}

impl Batch {
    /// Requests whose senders wait for a durable commit.
    fn durable_len(&self) -> usize {
        self.appends.len() + self.entries.len()
    }
}

pub(super) struct Parts {
    pub writer: Writer,
    pub segments: Segments,
    pub checkpoint: u64,
    pub cursor: Cursor,
}

impl Inner {
    pub(super) fn new(
        shared: Arc<Shared>,
        requests: flume::Receiver<Request>,
        config: &OutboxConfig,
        parts: Parts,
    ) -> Inner {
        let segment = shared.files.segment_bytes;
        Inner {
            shared,
            requests,
            writer: parts.writer,
            segments: parts.segments,
            window: Duration::from_micros(config.commit_window_us),
            gap: Duration::from_micros(config.commit_gap_us.min(config.commit_window_us)),
            max_records: config.commit_max_records,
            max_bytes: config.max_bytes,
            max_record: super::max_record(segment),
            policy: config.policy,
            max_age: config.max_age,
            // The first round runs at once, to report the segments and the oldest record.
            last_housekeeping: Instant::now() - HOUSEKEEPING_EVERY,
            checkpoint: parts.checkpoint,
            written_cursor: parts.cursor,
            // The first move of the front is written at once (a short run must not leave
            // everything to be sent again).
            cursor_written_at: Instant::now()
                .checked_sub(CURSOR_EVERY)
                .unwrap_or_else(Instant::now),
            abandon_chunk: false,
            pending_cursor: None,
            pending_checkpoint: None,
            in_checkpoint: false,
            batch: Vec::new(),
            appended_seen: 0,
            empty_since: None,
            rate: std::collections::VecDeque::new(),
        }
    }

    pub(super) fn run(mut self, heartbeat: &Heartbeat) {
        precise_sleeps();
        // Only the first committer of a store runs; a second would find it set.
        let _ = self.shared.committer.set(std::thread::current());
        loop {
            heartbeat.beat();
            let first = match self.requests.recv_timeout(HOUSEKEEPING_EVERY) {
                Ok(r) => r,
                Err(flume::RecvTimeoutError::Timeout) => {
                    self.housekeeping();
                    continue;
                }
                Err(flume::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = Batch::default();
            add(&mut batch, first);
            self.gather(&mut batch);
            self.commit(batch);
            self.housekeeping();
        }
        self.write_cursor_if_moved(Duration::ZERO);
        tracing::debug!("outbox committer finished");
    }

    /// Adds to `batch` what arrives for it: everything queued now, then (once it holds an
    /// append or an entry) more, until none was queued for the gap, the window has passed or
    /// the batch is full. The thread sleeps until the gap has passed since the newest request
    /// was queued instead of waking for each one: senders then only queue, and a pipelining
    /// client's burst costs a wake or two, not one per record. A pipelining client that has
    /// sent all it will until its appends are acknowledged ends the wait early when it is the
    /// only one pipelining (see [`super::Reading`]), once no connection is still reading.
    fn gather(&mut self, batch: &mut Batch) {
        let deadline = Instant::now() + self.window;
        loop {
            let eager = self.shared.eager.load(Ordering::Acquire)
                && self.shared.reading.load(Ordering::Acquire) == 0
                && self.shared.pipelining.load(Ordering::Acquire) <= 1;
            while batch.durable_len() < self.max_records {
                match self.requests.try_recv() {
                    Ok(r) => add(batch, r),
                    Err(_) => break,
                }
            }
            // Deletes alone need not wait for company.
            if eager || batch.durable_len() == 0 || batch.durable_len() >= self.max_records {
                break;
            }
            let now = Instant::now();
            let quiet = (self.shared.last_queued() + self.gap).min(deadline);
            if quiet <= now {
                break;
            }
            std::thread::park_timeout(quiet - now);
        }
        self.shared.eager.store(false, Ordering::Release);
    }

    fn front(&self) -> std::sync::MutexGuard<'_, super::front::Front> {
        super::lock(&self.shared.front)
    }

    /// Stages a record, first moving to a new chunk when it does not fit in this one.
    fn stage(&mut self, kind: Kind, body: &[u8]) -> Result<u64, String> {
        if self.abandon_chunk || !self.writer.fits(body.len()) {
            self.next_chunk()?;
        }
        Ok(self.writer.stage(kind, body))
    }

    /// Commits what is staged, counting it.
    fn flush(&mut self) -> Result<(), String> {
        if !self.writer.has_staged() {
            return Ok(());
        }
        match self.writer.commit() {
            Ok(()) => {
                self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
                if let Some(cursor) = self.pending_cursor.take() {
                    self.written_cursor = cursor;
                    self.cursor_written_at = Instant::now();
                }
                if let Some((begin, moved)) = self.pending_checkpoint.take() {
                    let mut entries = super::lock(&self.shared.entries);
                    for (key, at) in moved {
                        if let Some(place) = entries.get_mut(&key) {
                            place.position = at;
                        }
                    }
                    drop(entries);
                    self.checkpoint = begin;
                    self.shared
                        .stats
                        .checkpoints
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(error) => {
                self.writer.discard();
                self.abandon_chunk = true;
                self.pending_cursor = None;
                self.pending_checkpoint = None;
                Err(error.to_string())
            }
        }
    }

    /// Moves the tail to a new chunk: commits what is staged in this one, takes a spare (or
    /// makes a segment), stages the chunk's start and, when due, a checkpoint.
    fn next_chunk(&mut self) -> Result<(), String> {
        self.flush()?;
        let segment = self.shared.files.segment_bytes;
        let old = self.writer.chunk();
        let (path, file) = self.segments.take(segment).map_err(|e| e.to_string())?;
        let file = Arc::new(file);
        let next = old + 1;
        let next_seq = self.cursor_now().next_seq;
        let kv_bytes = self.shared.entry_bytes();
        let base = next * segment;
        let due = !self.in_checkpoint
            && base.saturating_sub(self.checkpoint) >= (segment / 2).max(4 * kv_bytes);
        // A checkpoint that fits in this segment's first commit is the one its start names
        // (the one before stays named as the fallback, should that commit be torn).
        let own = due && self.shared.checkpoint_bytes() + 2 * format::PAGE <= segment;
        let begin = base + format::record_len(super::START_BODY);
        let start = Start {
            chunk: next,
            epoch: self.shared.epoch,
            checkpoint: if own { begin } else { self.checkpoint },
            next_seq,
            fallback: self.checkpoint,
        };
        {
            let mut chunks = super::write_lock(&self.shared.files.chunks);
            if let Some(c) = chunks.get(&old) {
                let end = self.writer.tail() - old * segment;
                c.end.store(end, Ordering::Release);
            }
            chunks.insert(next, Chunk::new(file.clone(), path, next_seq));
        }
        self.writer.start_chunk(next, file, &start);
        self.abandon_chunk = false;
        if due {
            self.in_checkpoint = true;
            let result = self.checkpoint();
            self.in_checkpoint = false;
            result?;
        }
        Ok(())
    }

    /// Stages a checkpoint: the outbox front, then every keyed entry again, then its end.
    /// The entries' places move to the copies once they are durable.
    fn checkpoint(&mut self) -> Result<(), String> {
        let cursor = self.cursor_now();
        let begin = self.writer.stage(Kind::CheckpointBegin, &cursor.encode());
        let places: Vec<((u8, Vec<u8>), Place)> = super::lock(&self.shared.entries)
            .iter()
            .map(|(k, p)| (k.clone(), *p))
            .collect();
        let mut moved = Vec::with_capacity(places.len());
        for (key, place) in places {
            let max = format::record_len(place.value_len as usize + key.1.len() + 9);
            let record = self
                .shared
                .files
                .read_record(place.position, max)
                .map_err(|e| e.to_string())?;
            match record {
                Some((Kind::Set, body)) => {
                    let at = self.stage(Kind::Set, &body)?;
                    moved.push((key, at));
                }
                _ => tracing::error!(
                    position = place.position,
                    "a keyed entry's record is unreadable; it is left out of the checkpoint"
                ),
            }
        }
        self.stage(Kind::CheckpointEnd, &begin.to_le_bytes())?;
        self.pending_checkpoint = Some((begin, moved));
        self.pending_cursor = Some(cursor);
        Ok(())
    }

    /// The front as it stands, counting the records of the batch being written, with the
    /// place the next record will go when nothing is live.
    fn cursor_now(&self) -> Cursor {
        let mut cursor = self.front().cursor;
        let nothing_live = cursor.first_seq >= cursor.next_seq;
        if let Some(last) = self.batch.last() {
            cursor.next_seq = last.seq + 1;
            cursor.cum_next = last.cum + last.size;
        }
        if nothing_live {
            match self.batch.first() {
                Some(first) => {
                    cursor.first_seq = first.seq;
                    cursor.position = first.position;
                    cursor.cum = first.cum;
                }
                None => cursor.position = self.writer.next_position(),
            }
        }
        cursor
    }

    /// Stages the front when it moved since it was last written and `every` has passed.
    ///
    /// A commit that writes data takes the front along whenever it fits in the page that commit
    /// writes anyway (it costs no page then), so a killed relay sends little again.
    fn stage_cursor_if_moved(&mut self, every: Duration) -> Result<(), String> {
        let first_seq = self.front().cursor.first_seq;
        if first_seq == self.written_cursor.first_seq {
            return Ok(());
        }
        let in_page = self.writer.next_position() % format::PAGE;
        let free = self.writer.has_staged()
            && in_page != 0
            && in_page + format::record_len(40) + format::HEADER as u64 <= format::PAGE;
        if !free && self.cursor_written_at.elapsed() < every {
            return Ok(());
        }
        let cursor = self.cursor_now();
        self.stage(Kind::Ack, &cursor.encode())?;
        self.pending_cursor = Some(cursor);
        Ok(())
    }

    fn write_cursor_if_moved(&mut self, every: Duration) {
        let result = self
            .stage_cursor_if_moved(every)
            .and_then(|()| self.flush());
        if let Err(error) = result {
            tracing::warn!(%error, "writing the outbox cursor failed");
        }
        self.recycle();
    }

    fn commit(&mut self, batch: Batch) {
        let stats = self.shared.stats.clone();
        let files = self.shared.files.clone();
        if !batch.deletes.is_empty() {
            match self.front().delete(&batch.deletes, &files) {
                Ok(n) => {
                    stats.acknowledged.fetch_add(n, Ordering::Relaxed);
                }
                Err(error) => tracing::error!(%error, "reading the outbox front failed"),
            }
        }
        let (encoded, waiters): (Vec<Vec<u8>>, Vec<Option<Waiter>>) =
            batch.appends.into_iter().unzip();
        let mut results: Vec<Result<u64, StoreError>> = Vec::with_capacity(encoded.len());
        self.batch.clear();
        // What the batch will take in the log, to start it on a fresh page when that saves one.
        let batch_bytes: u64 = encoded
            .iter()
            .map(|e| format::record_len(16 + e.len()))
            .chain(batch.entries.iter().map(|(_, k, v, _)| {
                format::record_len(9 + k.len() + v.as_ref().map_or(0, |v| v.len()))
            }))
            .sum();
        if batch_bytes > 0 && !self.abandon_chunk {
            self.writer.fresh_page_if_cheaper(batch_bytes);
        }
        let mut dropped = 0u64;
        // Records of this batch dropped again for the bound (when it is smaller than what
        // one batch brings).
        let mut staged_dropped = 0usize;
        let mut entry_waiters = Vec::with_capacity(batch.entries.len());
        let mut entry_changes = Vec::with_capacity(batch.entries.len());
        let outcome = (|| -> Result<(), String> {
            let mut pending = 0u64;
            let (mut next_seq, mut cum) = {
                let front = self.front();
                (front.cursor.next_seq, front.cursor.cum_next)
            };
            for record in &encoded {
                let size = record.len() as u64 + KEY_COST;
                if size > self.max_bytes || record.len() as u64 > self.max_record {
                    results.push(Err(StoreError::TooLarge {
                        size,
                        max_bytes: self.max_bytes.min(self.max_record),
                    }));
                    continue;
                }
                let live = self.front().bytes() + pending;
                if live + size > self.max_bytes {
                    if self.policy == OutboxPolicy::RefuseNew {
                        results.push(Err(StoreError::Full {
                            max_bytes: self.max_bytes,
                        }));
                        continue;
                    }
                    let mut live = live;
                    while live + size > self.max_bytes {
                        match self.front().drop_oldest(&files) {
                            Ok(Some(e)) => {
                                live -= e.size.min(live);
                                dropped += 1;
                            }
                            Ok(None) if staged_dropped < self.batch.len() => {
                                let size = self.batch[staged_dropped].size;
                                live -= size.min(live);
                                pending -= size.min(pending);
                                staged_dropped += 1;
                                dropped += 1;
                            }
                            Ok(None) => break,
                            Err(error) => return Err(error.to_string()),
                        }
                    }
                }
                let body = format::append_body(next_seq, cum, record);
                let position = self.stage(Kind::Append, &body)?;
                self.batch.push(Entry {
                    seq: next_seq,
                    position,
                    cum,
                    size,
                });
                results.push(Ok(next_seq));
                next_seq += 1;
                cum += size;
                pending += size;
            }
            for (space, key, value, done) in batch.entries {
                let kind = if value.is_some() {
                    Kind::Set
                } else {
                    Kind::Remove
                };
                let body = format::entry_body(space, &key, value.as_deref());
                let position = self.stage(kind, &body)?;
                let value_len = value.map(|v| v.len() as u64);
                entry_changes.push(((space, key), position, value_len));
                entry_waiters.push(done);
            }
            // The front rides along with data: when it costs no page, or once a second.
            if self.writer.has_staged() {
                self.stage_cursor_if_moved(CURSOR_EVERY)?;
            }
            self.flush()
        })();

        match outcome {
            Ok(()) => {
                {
                    let mut front = self.front();
                    for e in &self.batch {
                        front.appended(*e);
                    }
                    if staged_dropped > 0 {
                        let seqs: Vec<u64> =
                            self.batch[..staged_dropped].iter().map(|e| e.seq).collect();
                        if let Err(error) = front.delete(&seqs, &files) {
                            tracing::error!(%error, "reading the outbox front failed");
                        }
                    }
                    if let Some(last) = self.batch.last() {
                        self.shared.next_seq.store(last.seq + 1, Ordering::Release);
                    }
                }
                {
                    let mut entries = super::lock(&self.shared.entries);
                    for (key, position, value_len) in entry_changes {
                        match value_len {
                            Some(value_len) => {
                                entries.insert(
                                    key,
                                    Place {
                                        position,
                                        value_len,
                                    },
                                );
                            }
                            None => {
                                entries.remove(&key);
                            }
                        }
                    }
                }
                self.recycle();
                if dropped > 0 {
                    stats.dropped_oldest.fetch_add(dropped, Ordering::Relaxed);
                    tracing::warn!(
                        dropped,
                        max_bytes = self.max_bytes,
                        "outbox full: dropped the oldest records (policy drop-oldest)"
                    );
                }
                {
                    let mut tail = super::lock(&self.shared.tail);
                    for (record, result) in encoded.into_iter().zip(&results) {
                        if let Ok(seq) = result {
                            tail.push(*seq, record);
                        }
                    }
                }
                let mut appended = 0;
                let mut refused = 0;
                for (done, result) in waiters.into_iter().zip(results) {
                    match &result {
                        Ok(_) => appended += 1,
                        Err(_) => refused += 1,
                    }
                    if let Some(done) = done {
                        let _ = done.send(result);
                    }
                }
                stats.appended.fetch_add(appended, Ordering::Relaxed);
                if refused > 0 {
                    stats.refused.fetch_add(refused, Ordering::Relaxed);
                    tracing::warn!(
                        refused,
                        max_bytes = self.max_bytes,
                        "outbox full: refused new records (policy refuse-new)"
                    );
                }
                if appended > 0 {
                    self.shared.committed.notify_one();
                }
                for done in entry_waiters.into_iter().flatten() {
                    let _ = done.send(Ok(0));
                }
            }
            Err(error) => {
                stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                // Sequences given out are never given again (a record may have reached the
                // disk): they are noted as gone.
                let lost = std::mem::take(&mut self.batch);
                self.front().lost(&lost);
                super::lock(&self.shared.tail).clear();
                if let Some(last) = lost.last() {
                    self.shared.next_seq.store(last.seq + 1, Ordering::Release);
                }
                let n = waiters.len();
                tracing::error!(%error, records = n, "outbox commit failed; the records were not accepted");
                for done in waiters.into_iter().chain(entry_waiters).flatten() {
                    let _ = done.send(Err(StoreError::Commit(error.clone())));
                }
                stats.refused.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        self.show_front();
    }

    /// Writes an outbox record with a given sequence (converting an older store).
    pub(super) fn import_record(&mut self, seq: u64, encoded: &[u8]) -> Result<(), String> {
        let cum = self.front().cursor.cum_next;
        let body = format::append_body(seq, cum, encoded);
        let position = self.stage(Kind::Append, &body)?;
        self.front().appended(Entry {
            seq,
            position,
            cum,
            size: encoded.len() as u64 + KEY_COST,
        });
        self.flush_when_large()
    }

    /// Writes a keyed entry (converting an older store).
    pub(super) fn import_entry(
        &mut self,
        space: u8,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), String> {
        let body = format::entry_body(space, key, Some(value));
        let position = self.stage(Kind::Set, &body)?;
        super::lock(&self.shared.entries).insert(
            (space, key.to_vec()),
            Place {
                position,
                value_len: value.len() as u64,
            },
        );
        self.flush_when_large()
    }

    fn flush_when_large(&mut self) -> Result<(), String> {
        if self.writer.next_position() - self.writer.tail() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    /// Ends a conversion: the next sequence and the front are written and flushed.
    pub(super) fn finish_import(&mut self, next_seq: u64) -> Result<(), String> {
        {
            let mut front = self.front();
            front.cursor.next_seq = front.cursor.next_seq.max(next_seq);
        }
        let cursor = self.cursor_now();
        self.stage(Kind::Ack, &cursor.encode())?;
        self.flush()
    }

    fn show_front(&self) {
        let front = self.front();
        let stats = &self.shared.stats;
        stats.records.store(front.records(), Ordering::Relaxed);
        stats.bytes.store(front.bytes(), Ordering::Relaxed);
    }

    /// Chunks before both the written front and the last durable checkpoint hold nothing
    /// live: their files become spares, and spares beyond the reserve are deleted. (Opening
    /// reads from that checkpoint on: it and every keyed entry written after it must stay,
    /// however far the outbox front has moved.)
    fn recycle(&mut self) {
        let files = &self.shared.files;
        let keep_from = self
            .written_cursor
            .position
            .min(self.writer.tail())
            .min(self.checkpoint);
        let limit = files.chunk_of(keep_from);
        let dead: Vec<Chunk> = {
            let mut chunks = super::write_lock(&files.chunks);
            let keys: Vec<u64> = chunks.range(..limit).map(|(&k, _)| k).collect();
            keys.into_iter().filter_map(|k| chunks.remove(&k)).collect()
        };
        if dead.is_empty() {
            return;
        }
        for chunk in dead {
            match chunk.file.try_clone() {
                Ok(file) => self
                    .segments
                    .spares
                    .push((chunk.path, file, Instant::now())),
                Err(error) => tracing::warn!(%error, "reopening a dead segment failed"),
            }
            self.shared.stats.recycled.fetch_add(1, Ordering::Relaxed);
        }
        self.trim();
    }

    /// Spares are deleted once the backlog has drained (nothing live in the outbox for
    /// [`SPARE_IDLE`]), not while it drains.
    fn trim(&mut self) {
        if self.front().records() > 0 {
            self.empty_since = None;
        } else if self.empty_since.is_none() {
            self.empty_since = Some(Instant::now());
        }
        if self
            .empty_since
            .is_none_or(|since| since.elapsed() < SPARE_IDLE)
        {
            self.show_segments();
            return;
        }
        match self.segments.trim() {
            Ok(n) if n > 0 => tracing::debug!(removed = n, "spare segments deleted"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "deleting a spare segment failed"),
        }
        self.show_segments();
    }

    fn show_segments(&self) {
        let live = super::read_lock(&self.shared.files.chunks).len() as u64;
        let spares = self.segments.spares.len() as u64;
        let stats = &self.shared.stats;
        stats.segments.store(live, Ordering::Relaxed);
        stats.spare_segments.store(spares, Ordering::Relaxed);
        stats.file_bytes.store(
            (live + spares) * self.shared.files.segment_bytes,
            Ordering::Relaxed,
        );
    }

    /// Drops aged records, writes the front while draining, keeps a spare ready, and notes the
    /// oldest record's age. At most once per [`HOUSEKEEPING_EVERY`].
    fn housekeeping(&mut self) {
        if self.last_housekeeping.elapsed() < HOUSEKEEPING_EVERY {
            return;
        }
        self.last_housekeeping = Instant::now();
        if let Some(max_age) = self.max_age {
            self.drop_aged(max_age);
        }
        self.write_cursor_if_moved(CURSOR_EVERY);
        // A spare ready before the tail chunk fills keeps segment creation off the commit path
        // (only while records come in: a drain frees segments of its own).
        let segment = self.shared.files.segment_bytes;
        let used = self.writer.tail() % segment;
        let appended = self.shared.stats.appended.load(Ordering::Relaxed);
        let growing = std::mem::replace(&mut self.appended_seen, appended) != appended;
        if growing && self.segments.spares.is_empty() && used > segment / 2 {
            match self.segments.create(segment) {
                Ok((path, file)) => self.segments.spares.push((path, file, Instant::now())),
                Err(error) => tracing::warn!(%error, "making a spare segment failed"),
            }
        }
        self.trim();
        self.show_front();
        self.show_rate();
        let oldest = self.oldest_accepted().unwrap_or(0);
        self.shared
            .stats
            .oldest_unix_ms
            .store(oldest, Ordering::Relaxed);
    }

    /// The write rate over the last minute, as bytes per day.
    fn show_rate(&mut self) {
        let now = Instant::now();
        let written = self.shared.stats.bytes_written.load(Ordering::Relaxed);
        self.rate.push_back((now, written));
        while self
            .rate
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            self.rate.pop_front();
        }
        let per_day = match self.rate.front() {
            Some((at, before)) if now.duration_since(*at) >= Duration::from_secs(1) => {
                let secs = now.duration_since(*at).as_secs_f64();
                ((written - before) as f64 / secs * 86_400.0) as u64
            }
            _ => 0,
        };
        self.shared
            .stats
            .write_rate_per_day
            .store(per_day, Ordering::Relaxed);
    }

    /// When the oldest live record was accepted.
    fn oldest_accepted(&self) -> Option<u64> {
        let files = &self.shared.files;
        let entry = self.front().oldest(files).ok()??;
        read_accepted(files, entry)
    }

    fn drop_aged(&mut self, max_age: Duration) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let cutoff = now.saturating_sub(max_age.as_millis() as u64);
        let files = self.shared.files.clone();
        let mut dropped = 0u64;
        for _ in 0..AGED_PER_ROUND {
            let mut front = self.front();
            let Ok(Some(entry)) = front.oldest(&files) else {
                break;
            };
            // A record that cannot be read counts as old: it cannot be sent either.
            if read_accepted(&files, entry).is_some_and(|at| at >= cutoff) {
                break;
            }
            if front.drop_oldest(&files).ok().flatten().is_none() {
                break;
            }
            dropped += 1;
        }
        if dropped > 0 {
            self.shared
                .stats
                .dropped_age
                .fetch_add(dropped, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                max_age_s = max_age.as_secs(),
                "dropped outbox records older than max_age"
            );
            self.show_front();
        }
    }
}

/// When the record at `entry` was accepted (ms since the Unix epoch), if it can be read.
fn read_accepted(files: &log::Files, entry: Entry) -> Option<u64> {
    let max = format::record_len((entry.size - KEY_COST) as usize + 16);
    let (kind, body) = files.read_record(entry.position, max).ok()??;
    if kind != Kind::Append {
        return None;
    }
    let (_, _, encoded) = format::split_append(&body)?;
    OutboxRecord::decode(encoded)
        .ok()
        .map(|r| r.accepted_unix_ms)
}

/// Asks Linux to end this thread's sleeps within 10 µs of when they are due, not the 50 µs
/// it allows itself by default: the commit gap is a sleep, and each microsecond of it delays
/// every acknowledgement of the batch.
fn precise_sleeps() {
    #[cfg(target_os = "linux")]
    {
        const SLACK_NS: libc::c_ulong = 10_000;
        // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes only the calling
        // thread's timer slack.
        let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, SLACK_NS) };
        if r != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "the committer's timer slack stays the default"
            );
        }
    }
}

fn add(batch: &mut Batch, request: Request) {
    match request {
        Request::Append { encoded, done } => batch.appends.push((encoded, done)),
        Request::Delete(seqs) => batch.deletes.extend(seqs),
        Request::Entry {
            space,
            key,
            value,
            done,
        } => batch.entries.push((space, key, value, done)),
    }
}

/// The keyed entries' total size (key + value), for the checkpoint policy.
pub(super) fn entry_bytes(entries: &HashMap<(u8, Vec<u8>), Place>) -> u64 {
    entries
        .iter()
        .map(|((_, k), p)| k.len() as u64 + p.value_len)
        .sum()
}
