//! The store: the only module that touches the embedded database (redb).
//!
//! Its main table is the **outbox**, an append-only queue of accepted messages waiting for the
//! hub's acknowledgement.
//!
//! On-disk layout (one redb file, `<data_dir>/relaybox.redb`):
//! - `outbox`: `u64` sequence → prost-encoded [`OutboxRecord`]. Sequences only grow, also across
//!   restarts and a fully drained outbox (the next one is kept in `meta`), so that a
//!   `Nats-Msg-Id` of `<relay>-<epoch>-<seq>` is never reused.
//! - `meta`: `epoch` (random, made when the file is created) and `next_seq`.
//! - `retained`: MQTT topic → prost-encoded [`OutboxRecord`] of the topic's retained message
//!   (the broker keeps them in memory only; they are restored into it at start). Not counted
//!   against `max_bytes`: they have a bound of their own, `[mqtt] max_retained_bytes` (topic +
//!   encoded record, summed over topics), beyond which a new retained message is refused.
//!
//! Promises:
//! - An append resolves its [`Ticket`] only after the commit that holds the record returned,
//!   and that commit is durable (redb `Durability::Immediate`: fdatasync). One commit covers
//!   every append that arrived within the commit window (group commit).
//! - A record leaves the outbox only by [`Store::delete`] (the hub acknowledged it) or by the
//!   bound (`drop-oldest`), which is counted.
//! - The outbox never holds more than `max_bytes` (key + encoded record, counted per record).
//! - A failed commit (disk full, I/O error) fails the waiting appends with an error; nothing
//!   half-written is visible, and the relay goes on.
//!
//! Crash recovery is redb's: after a crash or power cut the file opens at the last durable
//! commit. Deletes may be committed without a flush; a delete lost that way only means the
//! record is sent again, and the hub drops the duplicate by its `Nats-Msg-Id`.

mod committer;
pub mod users;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, Notify};

use crate::config::OutboxConfig;
use crate::liveness::Heartbeat;
pub use crate::proto::OutboxRecord;

const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
/// Bytes a record costs against `max_bytes` besides its encoding: its key.
const KEY_COST: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("the outbox is full ({max_bytes} bytes, policy refuse-new): message refused")]
    Full { max_bytes: u64 },
    #[error("a message of {size} bytes is larger than the whole outbox ({max_bytes} bytes)")]
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

/// Counters of the outbox since the relay started (and its size now).
#[derive(Debug, Default)]
pub struct OutboxStats {
    pub appended: AtomicU64,
    pub dropped_oldest: AtomicU64,
    pub refused: AtomicU64,
    pub acknowledged: AtomicU64,
    pub corrupt: AtomicU64,
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    /// Records dropped because they were older than `max_age`.
    pub dropped_age: AtomicU64,
    /// When the oldest record was accepted (ms since the Unix epoch; 0: empty or unknown).
    pub oldest_unix_ms: AtomicU64,
    /// Size of the store file on disk, in bytes (after the last commit).
    pub file_bytes: AtomicU64,
    /// Times the file was compacted after the outbox drained.
    pub compactions: AtomicU64,
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
    /// Sets (`Some`) or clears (`None`) the retained message of `topic`.
    Retain {
        topic: String,
        encoded: Option<Vec<u8>>,
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

struct Shared {
    /// Readers and the committer share the database; compaction takes it alone.
    db: std::sync::RwLock<Database>,
    path: PathBuf,
    epoch: u64,
    /// The sequence the next appended record will get.
    next_seq: AtomicU64,
    stats: Arc<OutboxStats>,
    committed: Notify,
    retained: Mutex<RetainedBudget>,
}

impl Shared {
    fn read_db(&self) -> std::sync::RwLockReadGuard<'_, Database> {
        match self.db.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// A handle on the store; clones share one database and one committer.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    requests: flume::Sender<Request>,
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
        let path = dir.join("relaybox.redb");
        let db = Database::create(&path).map_err(|e| open_err(e.to_string()))?;

        let Init {
            epoch,
            next_seq,
            records,
            bytes,
            retained,
        } = init(&db).map_err(open_err)?;
        let stats = OutboxStats::default();
        stats.records.store(records, Ordering::Relaxed);
        stats.bytes.store(bytes, Ordering::Relaxed);
        // Retained messages kept before a lower bound was set stay; new ones wait for room.
        let budget = RetainedBudget {
            total: retained.values().sum(),
            sizes: retained,
            max: max_retained_bytes,
        };
        budget.show(&stats);
        let shared = Arc::new(Shared {
            db: std::sync::RwLock::new(db),
            path: path.clone(),
            next_seq: AtomicU64::new(next_seq),
            epoch,
            stats: Arc::new(stats),
            committed: Notify::new(),
            retained: Mutex::new(budget),
        });
        let (tx, rx) = flume::bounded(8192);
        let inner = committer::Inner::new(shared.clone(), rx, config, next_seq);
        Ok((
            Store {
                shared,
                requests: tx,
            },
            Committer { inner },
        ))
    }

    /// The store's epoch: random, made when the file was created.
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

    /// Queues a record for the next commit and returns its ticket. Waits only when the
    /// committer's queue is full.
    pub async fn append(&self, record: &OutboxRecord) -> Result<Ticket, StoreError> {
        let (tx, rx) = oneshot::channel();
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
        {
            let size = encoded
                .as_ref()
                .map(|e| (record.topic.len() + e.len()) as u64);
            let mut budget = match self.shared.retained.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let stats = &self.shared.stats;
            if let Err(error) = budget.admit(&record.topic, size) {
                stats.retained_refused.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
            budget.show(stats);
        }
        self.requests
            .send_async(Request::Retain {
                topic: record.topic.clone(),
                encoded,
                done,
            })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Every retained message kept, in topic order.
    pub async fn retained(&self) -> Result<Vec<OutboxRecord>, StoreError> {
        let shared = self.shared.clone();
        let (records, corrupt) =
            tokio::task::spawn_blocking(move || read_retained(&shared.read_db()))
                .await
                .map_err(|e| StoreError::Read(e.to_string()))??;
        for topic in corrupt {
            tracing::error!(topic, "retained message is corrupt; dropping it");
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
        let mut records = self.read_after(after, max).await?;
        records.retain(|(seq, _)| *seq < before);
        Ok(records)
    }

    /// The first sequence of the outbox's recent tail: records accepted at or after
    /// `since_unix_ms`, looking back over at most `at_most` records from the newest. Returns
    /// [`Store::next_seq`] when the newest record is older (or the outbox is empty).
    pub async fn first_recent(
        &self,
        since_unix_ms: u64,
        at_most: usize,
    ) -> Result<u64, StoreError> {
        let shared = self.shared.clone();
        let next = self.next_seq();
        tokio::task::spawn_blocking(move || {
            first_recent(&shared.read_db(), since_unix_ms, at_most, next)
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))?
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
        let shared = self.shared.clone();
        let (records, corrupt) =
            tokio::task::spawn_blocking(move || read_after(&shared.read_db(), after, max))
                .await
                .map_err(|e| StoreError::Read(e.to_string()))??;
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

type ReadResult = Result<(Vec<(u64, OutboxRecord)>, Vec<u64>), StoreError>;

fn read_after(db: &Database, after: u64, max: usize) -> ReadResult {
    let err = |e: &dyn std::fmt::Display| StoreError::Read(e.to_string());
    let txn = db.begin_read().map_err(|e| err(&e))?;
    let table = txn.open_table(OUTBOX).map_err(|e| err(&e))?;
    let mut out = Vec::new();
    let mut corrupt = Vec::new();
    let start = after.saturating_add(1);
    for item in table.range(start..).map_err(|e| err(&e))?.take(max) {
        let (k, v) = item.map_err(|e| err(&e))?;
        match OutboxRecord::decode(v.value()) {
            Ok(record) => out.push((k.value(), record)),
            Err(_) => corrupt.push(k.value()),
        }
    }
    Ok((out, corrupt))
}

fn first_recent(
    db: &Database,
    since_unix_ms: u64,
    at_most: usize,
    next: u64,
) -> Result<u64, StoreError> {
    let err = |e: &dyn std::fmt::Display| StoreError::Read(e.to_string());
    let txn = db.begin_read().map_err(|e| err(&e))?;
    let table = txn.open_table(OUTBOX).map_err(|e| err(&e))?;
    let mut first = next;
    for item in table
        .range(..next)
        .map_err(|e| err(&e))?
        .rev()
        .take(at_most)
    {
        let (k, v) = item.map_err(|e| err(&e))?;
        // A record that cannot be decoded is passed over here; reading it reports it.
        match OutboxRecord::decode(v.value()) {
            Ok(record) if record.accepted_unix_ms < since_unix_ms => break,
            _ => first = k.value(),
        }
    }
    Ok(first)
}

fn read_retained(db: &Database) -> Result<(Vec<OutboxRecord>, Vec<String>), StoreError> {
    let err = |e: &dyn std::fmt::Display| StoreError::Read(e.to_string());
    let txn = db.begin_read().map_err(|e| err(&e))?;
    let table = txn.open_table(RETAINED).map_err(|e| err(&e))?;
    let mut out = Vec::new();
    let mut corrupt = Vec::new();
    for item in table.iter().map_err(|e| err(&e))? {
        let (k, v) = item.map_err(|e| err(&e))?;
        match OutboxRecord::decode(v.value()) {
            Ok(record) if record.topic == k.value() => out.push(record),
            _ => corrupt.push(k.value().to_owned()),
        }
    }
    Ok((out, corrupt))
}

/// What the store holds when it opens.
struct Init {
    epoch: u64,
    /// The sequence the next appended record gets.
    next_seq: u64,
    /// Records in the outbox and the bytes they count against `max_bytes`.
    records: u64,
    bytes: u64,
    /// The bytes each topic's retained message takes.
    retained: HashMap<String, u64>,
}

/// Creates the tables on first open and reads what they hold.
fn init(db: &Database) -> Result<Init, String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    // Like the committer's: a power cut right after the start must not need a full repair.
    txn.set_quick_repair(true);
    let result = {
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        let outbox = txn.open_table(OUTBOX).map_err(|e| e.to_string())?;
        let retained_table = txn.open_table(RETAINED).map_err(|e| e.to_string())?;
        let mut retained = HashMap::new();
        for item in retained_table.iter().map_err(|e| e.to_string())? {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let topic = k.value().to_owned();
            let size = (topic.len() + v.value().len()) as u64;
            retained.insert(topic, size);
        }
        let existing = meta
            .get("epoch")
            .map_err(|e| e.to_string())?
            .map(|v| v.value());
        let epoch = match existing {
            Some(epoch) => epoch,
            None => {
                // 48 bits keep the id short and still make a collision between two files of
                // one relay practically impossible.
                let epoch = rand::random::<u64>() >> 16;
                meta.insert("epoch", epoch).map_err(|e| e.to_string())?;
                epoch
            }
        };
        let stored_next = meta
            .get("next_seq")
            .map_err(|e| e.to_string())?
            .map_or(1, |v| v.value());
        let last = outbox
            .last()
            .map_err(|e| e.to_string())?
            .map_or(0, |(k, _)| k.value());
        let mut records = 0;
        let mut bytes = 0;
        for item in outbox.iter().map_err(|e| e.to_string())? {
            let (_, v) = item.map_err(|e| e.to_string())?;
            records += 1;
            bytes += v.value().len() as u64 + KEY_COST;
        }
        Init {
            epoch,
            next_seq: stored_next.max(last + 1),
            records,
            bytes,
            retained,
        }
    };
    txn.commit().map_err(|e| e.to_string())?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at: u64) -> OutboxRecord {
        OutboxRecord {
            topic: "t".into(),
            payload: at.to_be_bytes().to_vec().into(),
            qos: 1,
            accepted_unix_ms: at,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_recent_tail_is_found_by_acceptance_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, committer) =
            Store::open(dir.path(), &OutboxConfig::default(), 1 << 20).expect("open");
        let thread = std::thread::spawn(move || committer.run());
        assert_eq!(store.first_recent(0, 100).await.expect("read"), 1, "empty");
        for at in [100, 200, 300, 400, 500] {
            store
                .append(&record(at))
                .await
                .expect("append")
                .durable()
                .await
                .expect("commit");
        }
        assert_eq!(store.first_recent(300, 100).await.expect("read"), 3);
        assert_eq!(store.first_recent(301, 100).await.expect("read"), 4);
        assert_eq!(store.first_recent(0, 100).await.expect("read"), 1);
        assert_eq!(
            store.first_recent(600, 100).await.expect("read"),
            6,
            "none recent"
        );
        // Looking back at most two records.
        assert_eq!(store.first_recent(0, 2).await.expect("read"), 4);
        drop(store);
        thread.join().expect("committer");
    }
}
