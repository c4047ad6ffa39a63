//! The group committer: one thread that owns every write to the database.
//!
//! It takes the first request, then gathers more until the commit window has passed or the
//! batch is full, and writes the whole batch in one redb transaction. A batch with appends is
//! committed with `Durability::Immediate` (one fdatasync for all of them) and only then are the
//! appenders told; a batch of deletes alone is committed without a flush unless the last
//! flushed commit is older than [`DELETE_FLUSH_AFTER`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;

use redb::{Durability, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::{OutboxRecord, Request, Shared, StoreError, KEY_COST, META, OUTBOX, RETAINED};
use crate::config::{OutboxConfig, OutboxPolicy};
use crate::liveness::Heartbeat;

/// How often the committer looks after age, file size and compaction.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
/// A drained outbox whose file is larger than this is compacted.
const COMPACT_ABOVE: u64 = 1024 * 1024;
/// At most this many aged records are dropped in one round.
const AGED_PER_ROUND: usize = 10_000;

/// A delete-only commit is flushed when no commit was flushed for this long.
const DELETE_FLUSH_AFTER: Duration = Duration::from_secs(1);

type Waiter = oneshot::Sender<Result<u64, StoreError>>;

pub(super) struct Inner {
    shared: Arc<Shared>,
    requests: flume::Receiver<Request>,
    window: Duration,
    max_records: usize,
    max_bytes: u64,
    policy: OutboxPolicy,
    next_seq: u64,
    last_flush: Instant,
    unflushed: bool,
    max_age: Option<Duration>,
    last_housekeeping: Instant,
    /// Records were appended since the last compaction.
    grown: bool,
}

#[derive(Default)]
struct Batch {
    appends: Vec<(Vec<u8>, Option<Waiter>)>,
    deletes: Vec<u64>,
    /// Retained messages set (`Some`) or cleared, in the order they came.
    retains: Vec<(String, Option<Vec<u8>>, Option<Waiter>)>,
}

impl Batch {
    /// Requests whose senders wait for a durable commit.
    fn durable_len(&self) -> usize {
        self.appends.len() + self.retains.len()
    }
}

impl Inner {
    pub(super) fn new(
        shared: Arc<Shared>,
        requests: flume::Receiver<Request>,
        config: &OutboxConfig,
        next_seq: u64,
    ) -> Inner {
        Inner {
            shared,
            requests,
            window: Duration::from_micros(config.commit_window_us),
            max_records: config.commit_max_records,
            max_bytes: config.max_bytes,
            policy: config.policy,
            next_seq,
            last_flush: Instant::now(),
            unflushed: false,
            max_age: config.max_age,
            // The first round runs at once, to report the file and the oldest record.
            last_housekeeping: Instant::now() - HOUSEKEEPING_EVERY,
            grown: true,
        }
    }

    pub(super) fn run(mut self, heartbeat: &Heartbeat) {
        loop {
            heartbeat.beat();
            let first = match self.requests.recv_timeout(DELETE_FLUSH_AFTER) {
                Ok(r) => r,
                Err(flume::RecvTimeoutError::Timeout) => {
                    if self.unflushed {
                        self.commit(Batch::default());
                    }
                    self.housekeeping();
                    continue;
                }
                Err(flume::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = Batch::default();
            add(&mut batch, first);
            let deadline = Instant::now() + self.window;
            while batch.durable_len() < self.max_records {
                // Deletes alone need not wait for company; appends wait out the window.
                let next = if batch.durable_len() == 0 {
                    self.requests.try_recv().ok()
                } else {
                    self.requests.recv_deadline(deadline).ok()
                };
                match next {
                    Some(r) => add(&mut batch, r),
                    None => break,
                }
            }
            if !batch.appends.is_empty() {
                self.grown = true;
            }
            self.commit(batch);
            self.housekeeping();
        }
        if self.unflushed {
            self.commit(Batch::default());
        }
        tracing::debug!("outbox committer finished");
    }

    fn commit(&mut self, batch: Batch) {
        let flush = batch.durable_len() > 0
            || (self.unflushed && self.last_flush.elapsed() >= DELETE_FLUSH_AFTER)
            || (batch.deletes.is_empty() && self.unflushed);
        let stats = &self.shared.stats;
        let mut records = stats.records.load(Ordering::Relaxed);
        let mut bytes = stats.bytes.load(Ordering::Relaxed);
        let mut next_seq = self.next_seq;
        let mut acknowledged = 0u64;
        let mut dropped = 0u64;
        let (encoded, waiters): (Vec<Vec<u8>>, Vec<Option<Waiter>>) =
            batch.appends.into_iter().unzip();
        let mut results: Vec<Result<u64, StoreError>> = Vec::with_capacity(encoded.len());
        let (retains, mut retain_waiters): (Vec<_>, Vec<_>) = batch
            .retains
            .into_iter()
            .map(|(topic, encoded, done)| ((topic, encoded), done))
            .unzip();

        let outcome = (|| -> Result<(), String> {
            let e = |e: &dyn std::fmt::Display| e.to_string();
            let db = self.shared.read_db();
            let mut txn = db.begin_write().map_err(|x| e(&x))?;
            let durability = if flush {
                Durability::Immediate
            } else {
                Durability::None
            };
            txn.set_durability(durability).map_err(|x| e(&x))?;
            // Each durable commit also saves redb's allocator state (two-phase commit), so the
            // file opens after a power cut without a full repair (a scan of the whole file,
            // slow on an SD card). Proven by the power-cut test in hw-tests/.
            txn.set_quick_repair(true);
            {
                let mut table = txn.open_table(OUTBOX).map_err(|x| e(&x))?;
                for seq in &batch.deletes {
                    if let Some(old) = table.remove(*seq).map_err(|x| e(&x))? {
                        records -= 1;
                        bytes -= old.value().len() as u64 + KEY_COST;
                        acknowledged += 1;
                    }
                }
                for record in &encoded {
                    let size = record.len() as u64 + KEY_COST;
                    if size > self.max_bytes {
                        results.push(Err(StoreError::TooLarge {
                            size,
                            max_bytes: self.max_bytes,
                        }));
                        continue;
                    }
                    if bytes + size > self.max_bytes && self.policy == OutboxPolicy::RefuseNew {
                        results.push(Err(StoreError::Full {
                            max_bytes: self.max_bytes,
                        }));
                        continue;
                    }
                    while bytes + size > self.max_bytes {
                        match table.pop_first().map_err(|x| e(&x))? {
                            Some((_, old)) => {
                                records -= 1;
                                bytes -= old.value().len() as u64 + KEY_COST;
                                dropped += 1;
                            }
                            None => break,
                        }
                    }
                    table
                        .insert(next_seq, record.as_slice())
                        .map_err(|x| e(&x))?;
                    results.push(Ok(next_seq));
                    next_seq += 1;
                    records += 1;
                    bytes += size;
                }
                let mut meta = txn.open_table(META).map_err(|x| e(&x))?;
                meta.insert("next_seq", next_seq).map_err(|x| e(&x))?;
                if !retains.is_empty() {
                    let mut retained = txn.open_table(RETAINED).map_err(|x| e(&x))?;
                    for (topic, encoded) in &retains {
                        match encoded {
                            Some(record) => {
                                retained
                                    .insert(topic.as_str(), record.as_slice())
                                    .map_err(|x| e(&x))?;
                            }
                            None => {
                                retained.remove(topic.as_str()).map_err(|x| e(&x))?;
                            }
                        }
                    }
                }
            }
            txn.commit().map_err(|x| e(&x))?;
            Ok(())
        })();

        match outcome {
            Ok(()) => {
                self.next_seq = next_seq;
                self.shared.next_seq.store(next_seq, Ordering::Release);
                stats.records.store(records, Ordering::Relaxed);
                stats.bytes.store(bytes, Ordering::Relaxed);
                stats
                    .acknowledged
                    .fetch_add(acknowledged, Ordering::Relaxed);
                stats.commits.fetch_add(1, Ordering::Relaxed);
                if dropped > 0 {
                    stats.dropped_oldest.fetch_add(dropped, Ordering::Relaxed);
                    tracing::warn!(
                        dropped,
                        max_bytes = self.max_bytes,
                        "outbox full: dropped the oldest records (policy drop-oldest)"
                    );
                }
                if flush {
                    self.last_flush = Instant::now();
                    self.unflushed = false;
                } else {
                    self.unflushed = true;
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
                for done in retain_waiters.drain(..).flatten() {
                    let _ = done.send(Ok(0));
                }
            }
            Err(error) => {
                stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                let n = waiters.len();
                tracing::error!(%error, records = n, "outbox commit failed; the records were not accepted");
                for done in waiters.into_iter().chain(retain_waiters).flatten() {
                    let _ = done.send(Err(StoreError::Commit(error.clone())));
                }
                stats.refused.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

impl Inner {
    /// Drops aged records, notes the oldest record's age and the file size, and compacts the
    /// file once the outbox has drained. At most once per [`HOUSEKEEPING_EVERY`].
    fn housekeeping(&mut self) {
        if self.last_housekeeping.elapsed() < HOUSEKEEPING_EVERY {
            return;
        }
        self.last_housekeeping = Instant::now();
        if let Some(max_age) = self.max_age {
            if let Err(error) = self.drop_aged(max_age) {
                tracing::warn!(%error, "dropping aged outbox records failed");
            }
        }
        let stats = &self.shared.stats;
        let oldest = self.oldest().unwrap_or(0);
        stats.oldest_unix_ms.store(oldest, Ordering::Relaxed);
        let size = std::fs::metadata(&self.shared.path).map_or(0, |m| m.len());
        stats.file_bytes.store(size, Ordering::Relaxed);
        if self.grown && size > COMPACT_ABOVE && stats.records.load(Ordering::Relaxed) == 0 {
            self.compact(size);
        }
    }

    fn oldest(&self) -> Option<u64> {
        let db = self.shared.read_db();
        let txn = db.begin_read().ok()?;
        let table = txn.open_table(OUTBOX).ok()?;
        let (_, v) = table.first().ok()??;
        OutboxRecord::decode(v.value())
            .ok()
            .map(|r| r.accepted_unix_ms)
    }

    fn drop_aged(&mut self, max_age: Duration) -> Result<(), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let cutoff = now.saturating_sub(max_age.as_millis() as u64);
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let db = self.shared.read_db();
        let mut txn = db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(Durability::None).map_err(|x| e(&x))?;
        let mut dropped = 0u64;
        let mut freed = 0u64;
        {
            let mut table = txn.open_table(OUTBOX).map_err(|x| e(&x))?;
            for _ in 0..AGED_PER_ROUND {
                let old = match table.first().map_err(|x| e(&x))? {
                    Some((k, v)) => {
                        let accepted =
                            OutboxRecord::decode(v.value()).map_or(0, |r| r.accepted_unix_ms);
                        (accepted < cutoff).then(|| (k.value(), v.value().len() as u64))
                    }
                    None => None,
                };
                let Some((seq, len)) = old else { break };
                table.remove(seq).map_err(|x| e(&x))?;
                dropped += 1;
                freed += len + KEY_COST;
            }
        }
        txn.commit().map_err(|x| e(&x))?;
        if dropped > 0 {
            self.unflushed = true;
            let stats = &self.shared.stats;
            stats.records.fetch_sub(dropped, Ordering::Relaxed);
            stats.bytes.fetch_sub(freed, Ordering::Relaxed);
            stats.dropped_age.fetch_add(dropped, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                max_age_s = max_age.as_secs(),
                "dropped outbox records older than max_age"
            );
        }
        Ok(())
    }

    /// Gives the space of a drained outbox back to the file system.
    fn compact(&mut self, before: u64) {
        if self.unflushed {
            self.commit(Batch::default());
        }
        let mut db = match self.shared.db.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match db.compact() {
            Ok(_) => {
                drop(db);
                // redb's compaction commits without quick-repair: one more (empty) durable
                // commit with it records the allocator state, so that a power cut while the
                // drained box idles needs no full repair either (hw-tests' idle cut).
                if let Err(error) = quick_repair_checkpoint(&self.shared.read_db()) {
                    tracing::warn!(%error, "recording the store's allocator state failed");
                }
                self.grown = false;
                let after = std::fs::metadata(&self.shared.path).map_or(0, |m| m.len());
                self.shared.stats.file_bytes.store(after, Ordering::Relaxed);
                self.shared
                    .stats
                    .compactions
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(before, after, "outbox drained; store file compacted");
            }
            Err(error) => tracing::warn!(%error, "compacting the store file failed"),
        }
    }
}

fn add(batch: &mut Batch, request: Request) {
    match request {
        Request::Append { encoded, done } => batch.appends.push((encoded, done)),
        Request::Delete(seqs) => batch.deletes.extend(seqs),
        Request::Retain {
            topic,
            encoded,
            done,
        } => batch.retains.push((topic, encoded, done)),
    }
}

/// An empty durable commit with redb's quick-repair: the file opens after a crash without a
/// full repair scan.
fn quick_repair_checkpoint(db: &redb::Database) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_quick_repair(true);
    txn.commit().map_err(|e| e.to_string())
}
