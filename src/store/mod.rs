//! The store: the only module that touches the disk. A segment log on flash that holds the
//! **outbox** (accepted messages waiting for the hub's acknowledgement) and **keyed entries**
//! (retained messages today; the broker's persistent sessions use the same records).
//!
//! Why a log of its own: a store that is durable per acknowledgement must write at least one
//! page and one flush per commit. Measured at the block device (docs/BENCHMARKS.md), redb wrote
//! about 11× that per commit, and the libraries built for the job 1.03–3× with other costs
//! (no cursor, sparse files, two flushes per add); this log writes the tail page(s) once and
//! flushes once.
//!
//! # On flash
//! `<data_dir>/log/NNNNNNNN.seg`: segment files of one fixed size (`[outbox] segment_bytes`,
//! 4 MiB by default), zero-filled once when made (never sparse or fallocate'd, so overwriting
//! them changes no file-system metadata and `fdatasync` writes data only), and reused. The log
//! is cut into chunks of that size; the first record of a file says which chunk it holds.
//! Records (`format.rs`): a 16-byte header with its own CRC32C, a body with a CRC32C, both
//! seeded with the record's position in the log, so bytes from an older chunk never pass for
//! a record of a newer one. Kinds:
//! - `Start` (first in every segment): chunk, store epoch, where the last complete checkpoint
//!   began, the next outbox sequence.
//! - `Append`: an outbox record: sequence, cumulative outbox bytes before it, prost
//!   [`OutboxRecord`]. Sequences only grow (also across a drained outbox and restarts), so
//!   `Nats-Msg-Id: <relay>-<epoch>-<seq>` never names two messages.
//! - `Ack`: the outbox front (every record before it is acknowledged or dropped), written
//!   lazily: riding on a data commit when it fits in the page that commit writes anyway (or
//!   once a second when it does not), alone once a second while draining. After a power cut
//!   the hub may get up to a second of acknowledged records again; it drops them by
//!   `Nats-Msg-Id`.
//! - `Set` / `Remove`: a keyed entry `(space, key) → value`. Spaces: [`RETAINED`] (topic →
//!   prost `OutboxRecord`); [`SESSION`], [`SUBSCRIPTION`], [`QUEUED`] and [`INFLIGHT`] are the
//!   broker's persistent sessions (client → session state; client + filter → options; client +
//!   number → a queued message; client + packet id → an unacknowledged delivery).
//! - `CheckpointBegin` (the outbox front) … `Set` for every live entry … `CheckpointEnd`: the
//!   whole keyed state again, written at a chunk change when the log has grown by
//!   max(½ segment, 4 × the keyed state) since the last one.
//! - `Pad`: a commit never ends on a page boundary, so after the tail there are always zeros
//!   this store wrote, and anything else there is a torn write.
//!
//! # Promises
//! - A commit is one `pwrite` of the tail page(s) and one `fdatasync`; a [`Ticket`] resolves
//!   only after it returned. One commit takes everything that arrived within the commit window
//!   (group commit). A batch that would spill past the tail page starts on the next page when
//!   that writes fewer pages (the rest of the old page holds zeros the last commit wrote;
//!   readers take zeros to a page's end followed by a record at the next page as a skip). A
//!   commit that reaches the end of a chunk is cut in two there.
//! - A record leaves the outbox only by [`Store::delete`] (the hub acknowledged it), by the
//!   bound (`drop-oldest`), or by age (`max_age`), each counted.
//! - The outbox never holds more than `max_bytes` (each record counts its encoding + 8 bytes).
//!   Keyed entries have their own bound (`max_retained_bytes` for retained messages).
//! - Space: a chunk before both the written outbox front and the last durable checkpoint holds
//!   nothing live; its file becomes a spare, reused by the next chunk. Spares beyond
//!   [`committer::RESERVE`] are deleted once the backlog has drained (the outbox empty and the
//!   spare untaken for a minute), so the files shrink to the live chunk and one spare. No
//!   compaction, no rewrite of live outbox data.
//! - A failed commit (I/O error) fails the waiting tickets; the rest of that chunk is left
//!   alone and the log goes on in the next one. Segments are made ahead of need, so a full
//!   file system stops growth, not commits into existing segments.
//!
//! # Opening (`open.rs`)
//! Every segment's first record is read; the newest chunk's `Start` names a checkpoint, and
//! the state is rebuilt by reading from there to the tail — at most a couple of segments plus
//! the keyed state, whatever the backlog. Damage is passed over and counted (`corrupt`); a
//! damaged last record is a torn write (`torn`). Opening never panics and never refuses to
//! start over what the files hold.
//!
//! A store made by an older relay (`relaybox.redb`) is converted at first start (`migrate.rs`):
//! backlog with its sequences and epoch, and the retained messages.

mod committer;
mod format;
mod front;
mod log;
mod migrate;
mod open;
mod tail;
pub mod users;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{oneshot, Notify};

use crate::config::OutboxConfig;
use crate::liveness::Heartbeat;
pub use crate::proto::OutboxRecord;

use format::{Cursor, Kind, Start};
use front::Front;
use log::{Files, Flow, Writer};
use open::{Entries, Place};

/// Bytes a record costs against `max_bytes` besides its encoding.
const KEY_COST: u64 = 8;

/// Keyed-entry spaces.
pub const RETAINED: u8 = 1;
pub const SESSION: u8 = 2;
pub const SUBSCRIPTION: u8 = 3;
pub const QUEUED: u8 = 4;
pub const INFLIGHT: u8 = 5;

/// The length of a `Start` record's body.
const START_BODY: usize = 40;

/// The default segment size.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// The largest encoded record a segment of `segment` bytes takes.
pub fn max_record(segment: u64) -> u64 {
    segment.saturating_sub(format::PAGE + 256)
}

/// The space of the file system that holds `data_dir`: (available to the relay, total), in
/// bytes. `None` where it cannot be read. A disk that stops answering blocks the caller: call
/// it off the async threads.
pub fn space(data_dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(data_dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call; `stat` is a plain
    // struct the call fills in, read only when it succeeds.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    let block = stat.f_frsize as u64;
    Some((
        (stat.f_bavail as u64).saturating_mul(block),
        (stat.f_blocks as u64).saturating_mul(block),
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("the outbox is full ({max_bytes} bytes, policy refuse-new): message refused")]
    Full { max_bytes: u64 },
    #[error("a message of {size} bytes is larger than the store takes ({max_bytes} bytes)")]
    TooLarge { size: u64, max_bytes: u64 },
    #[error(
        "retained messages would take more than max_retained_bytes ({max_bytes} bytes): \
         retained message refused"
    )]
    RetainedFull { max_bytes: u64 },
    #[error("the outbox commit failed: {0}")]
    Commit(String),
    #[error("reading the outbox failed: {0}")]
    Read(String),
    #[error("the store is shut down")]
    Closed,
}

/// Counters of the store since the relay started (and its size now).
#[derive(Debug, Default)]
pub struct OutboxStats {
    pub appended: AtomicU64,
    pub dropped_oldest: AtomicU64,
    pub refused: AtomicU64,
    pub acknowledged: AtomicU64,
    /// Damaged records passed over (at open and by readers).
    pub corrupt: AtomicU64,
    /// Torn writes found at the tail when the store opened.
    pub torn: AtomicU64,
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    /// Records dropped because they were older than `max_age`.
    pub dropped_age: AtomicU64,
    /// When the oldest record was accepted (ms since the Unix epoch; 0: empty or unknown).
    pub oldest_unix_ms: AtomicU64,
    /// Bytes of the segment files (live and spare).
    pub file_bytes: AtomicU64,
    pub segments: AtomicU64,
    pub spare_segments: AtomicU64,
    /// Segments whose chunks died and were made spares.
    pub recycled: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Bytes handed to the disk (`pwrite`), write calls and flushes (`fdatasync`), segment
    /// creation included.
    pub bytes_written: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    /// The pages the physical floor would write for the same commits: each commit's new bytes
    /// rounded up to whole pages (what any store durable per commit writes at least).
    pub floor_pages: AtomicU64,
    /// The store's write rate over the last minute, as bytes per day.
    pub write_rate_per_day: AtomicU64,
    /// How long the last open took, and how many bytes of log it read.
    pub open_ms: AtomicU64,
    pub open_scanned_bytes: AtomicU64,
    /// Topics with a retained message, and the bytes they take (topic + encoded record).
    pub retained_messages: AtomicU64,
    pub retained_bytes: AtomicU64,
    /// Retained messages refused for `max_retained_bytes`.
    pub retained_refused: AtomicU64,
}

/// Resolves once the appended record is durable, with its sequence.
pub struct Ticket(oneshot::Receiver<Result<u64, StoreError>>);

impl Ticket {
    pub async fn durable(self) -> Result<u64, StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Closed))
    }
}

pub(crate) enum Request {
    Append {
        encoded: Vec<u8>,
        done: Option<oneshot::Sender<Result<u64, StoreError>>>,
    },
    Delete(Vec<u64>),
    /// Sets (`Some`) or removes (`None`) a keyed entry.
    Entry {
        space: u8,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        done: Option<oneshot::Sender<Result<u64, StoreError>>>,
    },
}

/// What the retained messages take, topic by topic, against their bound.
struct RetainedBudget {
    sizes: HashMap<String, u64>,
    total: u64,
    max: u64,
}

impl RetainedBudget {
    /// Takes room for a retained message of `size` bytes on `topic` (`None`: the topic's is
    /// cleared), or refuses it when the total would pass the bound. A replacement needs room
    /// only for what it adds; a clear always fits.
    fn admit(&mut self, topic: &str, size: Option<u64>) -> Result<(), StoreError> {
        let old = self.sizes.get(topic).copied().unwrap_or(0);
        match size {
            None => {
                self.sizes.remove(topic);
                self.total -= old;
            }
            Some(size) => {
                let total = self.total - old + size;
                if total > self.max {
                    return Err(StoreError::RetainedFull {
                        max_bytes: self.max,
                    });
                }
                self.sizes.insert(topic.to_owned(), size);
                self.total = total;
            }
        }
        Ok(())
    }

    /// Shows the budget in the stats.
    fn show(&self, stats: &OutboxStats) {
        let count = self.sizes.len() as u64;
        stats.retained_messages.store(count, Ordering::Relaxed);
        stats.retained_bytes.store(self.total, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn read_lock<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match m.read() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn write_lock<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match m.write() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Positions readers found for sequences they will ask for next.
const HINTS: usize = 4;

struct Shared {
    files: Arc<Files>,
    epoch: u64,
    /// The sequence the next appended record will get.
    next_seq: AtomicU64,
    stats: Arc<OutboxStats>,
    committed: Notify,
    retained: Mutex<RetainedBudget>,
    front: Mutex<Front>,
    entries: Mutex<Entries>,
    hints: Mutex<Vec<(u64, u64)>>,
    tail: Mutex<tail::Tail>,
    /// When the newest request that is committed together with others (an append or an
    /// entry) was queued: microseconds since `opened`. The committer sleeps until the commit
    /// gap has passed since then.
    queued_at: AtomicU64,
    opened: Instant,
    /// Connections reading what their clients sent now (see [`Reading`]).
    reading: AtomicUsize,
    /// A pipelining client's burst has ended: it has sent all it will until its publishes are
    /// acknowledged, so the commit need not wait out the gap once no connection is reading and
    /// no other client is pipelining.
    eager: AtomicBool,
    /// Connections whose client was pipelining when its last burst ended (see [`Pipelining`]).
    pipelining: AtomicUsize,
    /// The committer's thread, woken when `eager` is set.
    committer: OnceLock<std::thread::Thread>,
}

impl Shared {
    /// Notes that an append or an entry is being queued now.
    fn queued(&self) {
        let us = u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.queued_at.store(us, Ordering::Relaxed);
    }

    /// When the newest append or entry was queued.
    fn last_queued(&self) -> Instant {
        self.opened + Duration::from_micros(self.queued_at.load(Ordering::Relaxed))
    }

    fn entry_bytes(&self) -> u64 {
        committer::entry_bytes(&lock(&self.entries))
    }

    /// What a checkpoint of the keyed entries takes in the log.
    fn checkpoint_bytes(&self) -> u64 {
        let entries = lock(&self.entries);
        let sets: u64 = entries
            .iter()
            .map(|((_, k), p)| format::record_len(9 + k.len() + p.value_len as usize))
            .sum();
        sets + format::record_len(40) + format::record_len(8)
    }

    /// Where to start reading for the record with sequence `seq`.
    fn start_for(&self, seq: u64) -> u64 {
        {
            let front = lock(&self.front);
            if seq <= front.cursor.first_seq {
                return front.cursor.position;
            }
            if let Some(p) = front.position_of(seq) {
                return p;
            }
        }
        if let Some(&(_, p)) = lock(&self.hints).iter().find(|(s, _)| *s == seq) {
            return p;
        }
        self.files.chunk_for_seq(seq).unwrap_or(0)
    }

    fn hint(&self, seq: u64, position: u64) {
        let mut hints = lock(&self.hints);
        hints.retain(|(s, _)| *s != seq);
        if hints.len() >= HINTS {
            hints.remove(0);
        }
        hints.push((seq, position));
    }

    /// Up to `max` live outbox records with sequences in `from..before`, with the sequences
    /// whose records cannot be decoded.
    fn read(&self, from: u64, before: u64, max: usize) -> Result<ReadBatch, StoreError> {
        let mut out = Vec::new();
        let mut corrupt = Vec::new();
        if max == 0 || from >= before {
            return Ok((out, corrupt));
        }
        let start = self.start_for(from);
        // Where a later read for the next sequence may start: a hint is a position at or
        // before the record it names.
        let mut resume = (from, start);
        let report = self
            .files
            .scan(start, u64::MAX, |position, kind, body| {
                let end = position + format::record_len(body.len());
                let append = match kind {
                    Kind::Append => format::split_append(body),
                    _ => None,
                };
                let Some((seq, _, encoded)) = append else {
                    resume.1 = end;
                    return Flow::Continue;
                };
                if seq >= before {
                    resume = (seq, position);
                    return Flow::Stop;
                }
                resume = ((seq + 1).max(from), end);
                // Deleted records are passed over before `max` is counted (see `Store::read`).
                if seq < from || lock(&self.front).is_deleted(seq) {
                    return Flow::Continue;
                }
                match OutboxRecord::decode(encoded) {
                    Ok(record) => out.push((seq, record)),
                    Err(_) => corrupt.push(seq),
                }
                if out.len() >= max {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            })
            .map_err(|e| StoreError::Read(e.to_string()))?;
        if report.corrupt > 0 {
            self.stats
                .corrupt
                .fetch_add(report.corrupt, Ordering::Relaxed);
        }
        self.hint(resume.0, resume.1);
        Ok((out, corrupt))
    }
}

type ReadBatch = (Vec<(u64, OutboxRecord)>, Vec<u64>);

/// A handle on the store; clones share one log and one committer.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    requests: flume::Sender<Request>,
}

/// QoS 1/2 publishes a client has waiting for acknowledgement, at or above which it is taken
/// to be pipelining: it sent a window's worth and waits for them before sending more.
pub const PIPELINED: usize = 8;

/// A connection that is reading a burst of its client's packets, from the first packet read
/// after a pause until the socket has nothing more. While any connection is reading, a commit
/// waits out the gap (its appends may belong in the batch). A burst that ends with
/// [`PIPELINED`] or more of the client's publishes waiting leaves the client waiting for the
/// commit: when it is the only client pipelining, the commit then goes as soon as no
/// connection is reading. With several pipelining clients the gap gathers their bursts into one
/// commit (fewer commits for the same records, and the cores left to the rest of the path).
pub struct Reading {
    shared: Arc<Shared>,
    eager: bool,
}

/// A connection whose client was pipelining when its last burst ended (see [`Reading`]);
/// counted while it lives.
pub struct Pipelining {
    shared: Arc<Shared>,
}

impl Drop for Pipelining {
    fn drop(&mut self) {
        self.shared.pipelining.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Reading {
    /// Ends the burst with `waiting` of the client's publishes waiting for acknowledgement.
    /// `was` is the connection's standing after its last burst; the new one is returned.
    pub fn end(mut self, was: Option<Pipelining>, waiting: usize) -> Option<Pipelining> {
        if waiting < PIPELINED {
            return None;
        }
        self.eager = true;
        // Counted before the flag is set (as `self` drops), so the committer never sees the
        // flag without the count.
        was.or_else(|| {
            self.shared.pipelining.fetch_add(1, Ordering::AcqRel);
            Some(Pipelining {
                shared: self.shared.clone(),
            })
        })
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        // The burst's appends were queued before this: whoever sees the count fall sees them.
        if self.eager {
            self.shared.eager.store(true, Ordering::Release);
        }
        let left = self.shared.reading.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && self.shared.eager.load(Ordering::Acquire) {
            if let Some(committer) = self.shared.committer.get() {
                committer.unpark();
            }
        }
    }
}

/// The group committer, to be run on a thread of its own by [`Committer::run`].
pub struct Committer {
    inner: committer::Inner,
}

impl Committer {
    /// Runs until every [`Store`] handle is dropped, then commits what is left and returns.
    pub fn run(self) {
        self.run_with_heartbeat(&Heartbeat::unwatched("outbox committer"));
    }

    /// As [`Committer::run`], beating `heartbeat` every round (at least once a second while
    /// idle), so that a commit stuck in a write or an fdatasync shows as a stall.
    pub fn run_with_heartbeat(self, heartbeat: &Heartbeat) {
        self.inner.run(heartbeat);
    }
}

/// What a store directory holds, read without writing: for checks from outside the relay
/// (the hardware tests open a disk image as a power cut left it).
#[derive(Debug, Default)]
pub struct Inspection {
    /// Live outbox records, in sequence order.
    pub outbox: Vec<(u64, OutboxRecord)>,
    /// Retained messages, in topic order.
    pub retained: Vec<OutboxRecord>,
    /// A torn write at the tail (0 or 1).
    pub torn: u64,
    /// Damaged records passed over.
    pub corrupt: u64,
    pub next_seq: u64,
    pub epoch: u64,
    /// Live segments, and the bytes of log read to rebuild the state.
    pub segments: u64,
    pub scanned_bytes: u64,
}

/// Reads the store in `data_dir` without changing anything.
pub fn inspect(data_dir: &Path) -> Result<Inspection, StoreError> {
    let dir = data_dir.join("log");
    if !dir.is_dir() {
        return Ok(Inspection::default());
    }
    let err = |e: std::io::Error| StoreError::Open {
        path: dir.clone(),
        reason: e.to_string(),
    };
    let Some(rec) = open::recover(&dir, SEGMENT_BYTES, false).map_err(err)? else {
        return Ok(Inspection::default());
    };
    rec.files.durable_tail.store(rec.tail, Ordering::Release);
    let mut outbox = Vec::new();
    let first = rec.cursor.first_seq;
    let from = rec.cursor.position.min(rec.checkpoint);
    let report = rec
        .files
        .scan(from, rec.tail, |_, kind, body| {
            if kind == Kind::Append {
                if let Some((seq, _, encoded)) = format::split_append(body) {
                    if seq >= first {
                        if let Ok(record) = OutboxRecord::decode(encoded) {
                            outbox.push((seq, record));
                        }
                    }
                }
            }
            Flow::Continue
        })
        .map_err(err)?;
    let segments = read_lock(&rec.files.chunks).len() as u64;
    let retained = read_entries(&rec.files, &rec.entries, RETAINED)
        .map_err(err)?
        .0;
    Ok(Inspection {
        outbox,
        retained,
        torn: report.torn.max(rec.report.torn),
        corrupt: report.corrupt.max(rec.report.corrupt),
        next_seq: rec.cursor.next_seq,
        epoch: rec.epoch,
        segments,
        scanned_bytes: rec.scanned,
    })
}

/// The retained records of `space`, in topic order, and the topics whose record is damaged.
fn read_entries(
    files: &Files,
    entries: &Entries,
    space: u8,
) -> std::io::Result<(Vec<OutboxRecord>, Vec<String>)> {
    let (found, mut damaged) = read_space(files, entries, space)?;
    let mut out = Vec::with_capacity(found.len());
    for (key, value) in found {
        match OutboxRecord::decode(value.as_slice()) {
            Ok(r) if r.topic.as_bytes() == key.as_slice() => out.push(r),
            _ => damaged.push(key),
        }
    }
    let damaged = damaged
        .into_iter()
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .collect();
    Ok((out, damaged))
}

/// Every entry of `space`, read back from the log, and the keys of those that could not be.
#[allow(clippy::type_complexity)]
fn read_space(
    files: &Files,
    entries: &Entries,
    space: u8,
) -> std::io::Result<(Vec<(Vec<u8>, Vec<u8>)>, Vec<Vec<u8>>)> {
    let mut places: Vec<(&Vec<u8>, Place)> = entries
        .iter()
        .filter(|((s, _), _)| *s == space)
        .map(|((_, k), p)| (k, *p))
        .collect();
    places.sort();
    let mut out = Vec::with_capacity(places.len());
    let mut damaged = Vec::new();
    for (key, place) in places {
        let max = format::record_len(place.value_len as usize + key.len() + 9);
        let value = match files.read_record(place.position, max)? {
            Some((Kind::Set, body)) => format::split_entry(&body, true)
                .filter(|(s, k, _)| *s == space && *k == key.as_slice())
                .and_then(|(_, _, v)| v.map(<[u8]>::to_vec)),
            _ => None,
        };
        match value {
            Some(v) => out.push((key.clone(), v)),
            None => damaged.push(key.clone()),
        }
    }
    Ok((out, damaged))
}

impl Store {
    /// Opens (or creates) the store in `dir`. Retained messages may take `max_retained_bytes`.
    pub fn open(
        dir: &Path,
        config: &OutboxConfig,
        max_retained_bytes: u64,
    ) -> Result<(Store, Committer), StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        migrate::if_needed(dir, config).map_err(&open_err)?;
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir).map_err(|e| open_err(e.to_string()))?;
        let segment = config.segment_bytes;
        let rec =
            match open::recover(&log_dir, segment, true).map_err(|e| open_err(e.to_string()))? {
                Some(rec) => rec,
                None => {
                    // 48 bits keep the id short and still make a collision between two stores of
                    // one relay practically impossible.
                    let epoch = rand::random::<u64>() >> 16;
                    create(&log_dir, segment, epoch, 1).map_err(|e| open_err(e.to_string()))?;
                    open::recover(&log_dir, segment, true)
                        .map_err(|e| open_err(e.to_string()))?
                        .ok_or_else(|| open_err("the new log cannot be read back".to_owned()))?
                }
            };
        Self::from_recovered(log_dir, rec, config, max_retained_bytes)
            .map_err(|e| open_err(e.to_string()))
    }

    fn from_recovered(
        log_dir: PathBuf,
        rec: open::Recovered,
        config: &OutboxConfig,
        max_retained_bytes: u64,
    ) -> std::io::Result<(Store, Committer)> {
        let stats = Arc::new(OutboxStats::default());
        stats.torn.store(rec.report.torn, Ordering::Relaxed);
        stats.corrupt.store(rec.report.corrupt, Ordering::Relaxed);
        stats.open_ms.store(rec.elapsed_ms, Ordering::Relaxed);
        stats
            .open_scanned_bytes
            .store(rec.scanned, Ordering::Relaxed);
        let sizes: HashMap<String, u64> = rec
            .entries
            .iter()
            .filter(|((s, _), _)| *s == RETAINED)
            .map(|((_, k), p)| {
                let topic = String::from_utf8_lossy(k).into_owned();
                let size = topic.len() as u64 + p.value_len;
                (topic, size)
            })
            .collect();
        // Retained messages kept before a lower bound was set stay; new ones wait for room.
        let budget = RetainedBudget {
            total: sizes.values().sum(),
            sizes,
            max: max_retained_bytes,
        };
        budget.show(&stats);
        let tail_file = read_lock(&rec.files.chunks)
            .get(&rec.tail_chunk)
            .map(|c| (c.file.clone(), c.path.clone()));
        let Some((tail_file, _)) = tail_file else {
            return Err(std::io::Error::other("the newest segment vanished"));
        };
        let writer = Writer::resume(
            rec.files.clone(),
            stats.clone(),
            rec.tail_chunk,
            tail_file,
            rec.tail,
        )?;
        let live_paths: Vec<PathBuf> = read_lock(&rec.files.chunks)
            .values()
            .map(|c| c.path.clone())
            .collect();
        let segments = committer::Segments::new(log_dir, rec.spares, &live_paths, stats.clone());
        let front = Front::new(rec.cursor);
        stats.records.store(front.records(), Ordering::Relaxed);
        stats.bytes.store(front.bytes(), Ordering::Relaxed);
        let shared = Arc::new(Shared {
            files: rec.files.clone(),
            epoch: rec.epoch,
            next_seq: AtomicU64::new(rec.cursor.next_seq),
            stats,
            committed: Notify::new(),
            retained: Mutex::new(budget),
            front: Mutex::new(front),
            entries: Mutex::new(rec.entries),
            hints: Mutex::new(Vec::new()),
            tail: Mutex::new(tail::Tail::default()),
            queued_at: AtomicU64::new(0),
            opened: Instant::now(),
            reading: AtomicUsize::new(0),
            eager: AtomicBool::new(false),
            pipelining: AtomicUsize::new(0),
            committer: OnceLock::new(),
        });
        tracing::info!(
            records = shared.stats.records.load(Ordering::Relaxed),
            segments = live_paths.len(),
            open_ms = rec.elapsed_ms,
            scanned_bytes = rec.scanned,
            torn = rec.report.torn,
            corrupt = rec.report.corrupt,
            "store opened"
        );
        let (tx, rx) = flume::bounded(8192);
        let inner = committer::Inner::new(
            shared.clone(),
            rx,
            config,
            committer::Parts {
                writer,
                segments,
                checkpoint: rec.checkpoint,
                cursor: rec.cursor,
            },
        );
        Ok((
            Store {
                shared,
                requests: tx,
            },
            Committer { inner },
        ))
    }

    /// The store's epoch: random, made when the store was created.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    pub fn stats(&self) -> &OutboxStats {
        &self.shared.stats
    }

    /// The counters, readable after the store is closed.
    pub fn stats_handle(&self) -> Arc<OutboxStats> {
        self.shared.stats.clone()
    }

    /// Notes that a connection begins reading a burst of its client's packets (see
    /// [`Reading`]).
    pub fn reading(&self) -> Reading {
        self.shared.reading.fetch_add(1, Ordering::AcqRel);
        Reading {
            shared: self.shared.clone(),
            eager: false,
        }
    }

    /// Queues a record for the next commit and returns its ticket. Waits only when the
    /// committer's queue is full.
    pub async fn append(&self, record: &OutboxRecord) -> Result<Ticket, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.shared.queued();
        self.requests
            .send_async(Request::Append {
                encoded: record.encode_to_vec(),
                done: Some(tx),
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(Ticket(rx))
    }

    /// Queues a record for the next commit without waiting for it (QoS 0).
    pub async fn append_nowait(&self, record: &OutboxRecord) -> Result<(), StoreError> {
        self.shared.queued();
        self.requests
            .send_async(Request::Append {
                encoded: record.encode_to_vec(),
                done: None,
            })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Keeps `record` as the retained message of its topic (or, with an empty payload, clears
    /// the topic's retained message) in the next commit, which is durable; the ticket resolves
    /// (with 0) once it is.
    pub async fn retain(&self, record: &OutboxRecord) -> Result<Ticket, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send_retain(record, Some(tx)).await?;
        Ok(Ticket(rx))
    }

    /// As [`Store::retain`] without waiting for the commit (QoS 0).
    pub async fn retain_nowait(&self, record: &OutboxRecord) -> Result<(), StoreError> {
        self.send_retain(record, None).await
    }

    async fn send_retain(
        &self,
        record: &OutboxRecord,
        done: Option<oneshot::Sender<Result<u64, StoreError>>>,
    ) -> Result<(), StoreError> {
        let encoded = (!record.payload.is_empty()).then(|| record.encode_to_vec());
        if let Some(e) = &encoded {
            let max = max_record(self.shared.files.segment_bytes);
            if e.len() as u64 > max {
                return Err(StoreError::TooLarge {
                    size: e.len() as u64,
                    max_bytes: max,
                });
            }
        }
        {
            let size = encoded
                .as_ref()
                .map(|e| (record.topic.len() + e.len()) as u64);
            let mut budget = lock(&self.shared.retained);
            let stats = &self.shared.stats;
            if let Err(error) = budget.admit(&record.topic, size) {
                stats.retained_refused.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
            budget.show(stats);
        }
        self.shared.queued();
        self.requests
            .send_async(Request::Entry {
                space: RETAINED,
                key: record.topic.as_bytes().to_vec(),
                value: encoded,
                done,
            })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Sets (`Some`) or removes (`None`) the keyed entry `key` of `space` ([`SESSION`],
    /// [`SUBSCRIPTION`], [`QUEUED`], [`INFLIGHT`]) in the next commit; the ticket resolves
    /// once that commit is durable.
    pub async fn entry(
        &self,
        space: u8,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<Ticket, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send_entry(space, key, value, Some(tx)).await?;
        Ok(Ticket(rx))
    }

    /// As [`Store::entry`] without waiting for the commit.
    pub async fn entry_nowait(
        &self,
        space: u8,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        self.send_entry(space, key, value, None).await
    }

    /// As [`Store::entry_nowait`], from code that cannot wait: `false` when the committer's
    /// queue is full or closed (the entry is not written).
    pub fn try_entry(&self, space: u8, key: Vec<u8>, value: Option<Vec<u8>>) -> bool {
        self.shared.queued();
        self.requests
            .try_send(Request::Entry {
                space,
                key,
                value,
                done: None,
            })
            .is_ok()
    }

    async fn send_entry(
        &self,
        space: u8,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        done: Option<oneshot::Sender<Result<u64, StoreError>>>,
    ) -> Result<(), StoreError> {
        if let Some(v) = &value {
            let max = max_record(self.shared.files.segment_bytes);
            let size = (v.len() + key.len()) as u64;
            if size > max {
                return Err(StoreError::TooLarge {
                    size,
                    max_bytes: max,
                });
            }
        }
        self.shared.queued();
        self.requests
            .send_async(Request::Entry {
                space,
                key,
                value,
                done,
            })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Every entry of `space` (key, value), in key order. Entries that cannot be read back are
    /// counted as corrupt, logged and left out.
    pub async fn entries(&self, space: u8) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let shared = self.shared.clone();
        let (found, damaged) = tokio::task::spawn_blocking(move || {
            let entries = lock(&shared.entries).clone();
            read_space(&shared.files, &entries, space)
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
        .map_err(|e| StoreError::Read(e.to_string()))?;
        for key in damaged {
            tracing::error!(space, key = %String::from_utf8_lossy(&key), "keyed entry is corrupt; dropping it");
            self.shared.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            self.entry_nowait(space, key, None).await?;
        }
        Ok(found)
    }

    /// Every retained message kept, in topic order.
    pub async fn retained(&self) -> Result<Vec<OutboxRecord>, StoreError> {
        let shared = self.shared.clone();
        let (records, corrupt) = tokio::task::spawn_blocking(move || {
            let entries = lock(&shared.entries).clone();
            read_entries(&shared.files, &entries, RETAINED)
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
        .map_err(|e| StoreError::Read(e.to_string()))?;
        for topic in corrupt {
            tracing::error!(topic, "retained message is corrupt; dropping it");
            self.shared.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            let record = OutboxRecord {
                topic,
                ..Default::default()
            };
            self.retain_nowait(&record).await?;
        }
        Ok(records)
    }

    /// Removes records the hub has acknowledged. Batched into the next commit.
    pub fn delete(&self, seqs: Vec<u64>) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.requests
            .send(Request::Delete(seqs))
            .map_err(|_| StoreError::Closed)
    }

    /// The sequence the next appended record will get: every record already in the outbox
    /// has a smaller one.
    pub fn next_seq(&self) -> u64 {
        self.shared.next_seq.load(Ordering::Acquire)
    }

    /// Up to `max` records with sequences after `after` and before `before`, in order.
    pub async fn read_between(
        &self,
        after: u64,
        before: u64,
        max: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        self.read(after.saturating_add(1), before, max).await
    }

    /// The first sequence of the outbox's recent tail: records accepted at or after
    /// `since_unix_ms`, looking back over at most `at_most` records from the newest. Returns
    /// [`Store::next_seq`] when the newest record is older (or the outbox is empty).
    pub async fn first_recent(
        &self,
        since_unix_ms: u64,
        at_most: usize,
    ) -> Result<u64, StoreError> {
        let next = self.next_seq();
        let from = next.saturating_sub(at_most as u64);
        let records = self.read(from, next, at_most).await?;
        let mut first = None;
        for (seq, record) in records {
            if record.accepted_unix_ms < since_unix_ms {
                first = None;
            } else if first.is_none() {
                first = Some(seq);
            }
        }
        Ok(first.unwrap_or(next))
    }

    /// Waits until a commit adds records (or a short while passes).
    pub async fn wait_for_records(&self, at_most: std::time::Duration) {
        let _ = tokio::time::timeout(at_most, self.shared.committed.notified()).await;
    }

    /// Up to `max` records with a sequence greater than `after`, in order. Records that cannot
    /// be decoded are logged, counted and queued for deletion, so that one bad record cannot
    /// stop the queue.
    pub async fn read_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        self.read(after.saturating_add(1), u64::MAX, max).await
    }

    async fn read(
        &self,
        from: u64,
        before: u64,
        max: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        // Live traffic is read from the records of the last commits, without the disk. Those
        // before the front are gone: the read starts at the front, as one from the log does.
        // Deleted records are passed over before `max` is counted: a run of `max` deleted ones
        // (live records acknowledged ahead of older backlog) must not read as the end.
        let in_tail = {
            // The tail, then the front: the one order in which both are ever held.
            let tail = lock(&self.shared.tail);
            let front = lock(&self.shared.front);
            tail.read(from.max(front.cursor.first_seq), before, max, |seq| {
                front.is_deleted(seq)
            })
        };
        let (records, corrupt) = match in_tail {
            Some(found) => found,
            None => {
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || shared.read(from, before, max))
                    .await
                    .map_err(|e| StoreError::Read(e.to_string()))??
            }
        };
        if !corrupt.is_empty() {
            for seq in &corrupt {
                tracing::error!(seq, "outbox record is corrupt; dropping it");
            }
            self.shared
                .stats
                .corrupt
                .fetch_add(corrupt.len() as u64, Ordering::Relaxed);
            self.delete(corrupt)?;
        }
        Ok(records)
    }
}

/// Makes a new log in `dir`: chunk 0 with its start and an empty checkpoint, in one commit.
fn create(dir: &Path, segment: u64, epoch: u64, next_seq: u64) -> std::io::Result<()> {
    let (path, file) = log::create_segment(dir, 0, segment)?;
    let file = Arc::new(file);
    let files = Arc::new(Files {
        segment_bytes: segment,
        chunks: Default::default(),
        durable_tail: Default::default(),
    });
    write_lock(&files.chunks).insert(0, log::Chunk::new(file.clone(), path, next_seq));
    let mut writer = Writer::resume(files, Arc::default(), 0, file, 0)?;
    let begin = format::record_len(START_BODY);
    let start = Start {
        chunk: 0,
        epoch,
        checkpoint: begin,
        next_seq,
        fallback: begin,
    };
    writer.start_chunk(0, writer.file(), &start);
    let cursor = Cursor {
        first_seq: next_seq,
        position: begin,
        cum: 0,
        next_seq,
        cum_next: 0,
    };
    let at = writer.stage(Kind::CheckpointBegin, &cursor.encode());
    debug_assert_eq!(at, begin);
    writer.stage(Kind::CheckpointEnd, &begin.to_le_bytes());
    writer.commit()
}

#[cfg(test)]
mod tests;
