//! Converting a store made by an older relay (one redb file, `relaybox.redb`) into the log, at
//! the first start after an upgrade.
//!
//! The backlog keeps its sequences and the store its epoch, so records the hub already has are
//! still recognised as duplicates by their `Nats-Msg-Id`. The log is written into `log.new/`,
//! flushed, and renamed to `log/` in one step; only then is the redb file removed. A crash at
//! any point leaves either the redb file alone (converted again at the next start) or a
//! complete log (the redb file is then removed).

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{log, open, Store};
use crate::config::OutboxConfig;

const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// What an older store held.
struct Old {
    epoch: u64,
    next_seq: u64,
    outbox: Vec<(u64, Vec<u8>)>,
    retained: Vec<(String, Vec<u8>)>,
}

/// Converts `<dir>/relaybox.redb` when there is one.
pub(super) fn if_needed(dir: &Path, config: &OutboxConfig) -> Result<(), String> {
    let old_path = dir.join("relaybox.redb");
    if !old_path.exists() {
        return Ok(());
    }
    let log_dir = dir.join("log");
    if log_dir.exists() {
        // Converted before; the removal did not happen.
        std::fs::remove_file(&old_path).map_err(|e| e.to_string())?;
        return log::sync_dir(dir).map_err(|e| e.to_string());
    }
    let old = read_old(&old_path)
        .map_err(|e| format!("reading the older store {}: {e}", old_path.display()))?;
    let new_dir = dir.join("log.new");
    if new_dir.exists() {
        std::fs::remove_dir_all(&new_dir).map_err(|e| e.to_string())?;
    }
    std::fs::create_dir_all(&new_dir).map_err(|e| e.to_string())?;
    let records = old.outbox.len();
    let retained = old.retained.len();
    write_new(&new_dir, config, old).map_err(|e| format!("converting the older store: {e}"))?;
    log::sync_dir(&new_dir).map_err(|e| e.to_string())?;
    std::fs::rename(&new_dir, &log_dir).map_err(|e| e.to_string())?;
    log::sync_dir(dir).map_err(|e| e.to_string())?;
    std::fs::remove_file(&old_path).map_err(|e| e.to_string())?;
    log::sync_dir(dir).map_err(|e| e.to_string())?;
    tracing::info!(
        records,
        retained,
        "converted the older store (relaybox.redb) into the log"
    );
    Ok(())
}

fn read_old(path: &Path) -> Result<Old, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let db = redb::Database::open(path).map_err(|x| e(&x))?;
    let txn = db.begin_read().map_err(|x| e(&x))?;
    let mut old = Old {
        epoch: rand::random::<u64>() >> 16,
        next_seq: 1,
        outbox: Vec::new(),
        retained: Vec::new(),
    };
    match txn.open_table(META) {
        Ok(meta) => {
            if let Some(v) = meta.get("epoch").map_err(|x| e(&x))? {
                old.epoch = v.value();
            }
            if let Some(v) = meta.get("next_seq").map_err(|x| e(&x))? {
                old.next_seq = v.value();
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(x) => return Err(e(&x)),
    }
    match txn.open_table(OUTBOX) {
        Ok(table) => {
            for item in table.iter().map_err(|x| e(&x))? {
                let (k, v) = item.map_err(|x| e(&x))?;
                old.outbox.push((k.value(), v.value().to_vec()));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(x) => return Err(e(&x)),
    }
    match txn.open_table(RETAINED) {
        Ok(table) => {
            for item in table.iter().map_err(|x| e(&x))? {
                let (k, v) = item.map_err(|x| e(&x))?;
                old.retained
                    .push((k.value().to_owned(), v.value().to_vec()));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(x) => return Err(e(&x)),
    }
    let last = old.outbox.last().map_or(0, |(seq, _)| *seq);
    old.next_seq = old.next_seq.max(last + 1);
    Ok(old)
}

fn write_new(dir: &Path, config: &OutboxConfig, old: Old) -> Result<(), String> {
    let first = old.outbox.first().map_or(old.next_seq, |(seq, _)| *seq);
    super::create(dir, config.segment_bytes, old.epoch, first).map_err(|e| e.to_string())?;
    let rec = open::recover(dir, config.segment_bytes, true)
        .map_err(|e| e.to_string())?
        .ok_or("the new log cannot be read back")?;
    let (store, committer) = Store::from_recovered(dir.to_path_buf(), rec, config, u64::MAX)
        .map_err(|e| e.to_string())?;
    let mut inner = committer.inner;
    for (seq, encoded) in old.outbox {
        inner.import_record(seq, &encoded)?;
    }
    for (topic, encoded) in old.retained {
        inner.import_entry(super::RETAINED, topic.as_bytes(), &encoded)?;
    }
    inner.finish_import(old.next_seq)?;
    drop(store);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutboxRecord;
    use prost::Message;

    fn record(topic: &str, payload: &str) -> OutboxRecord {
        OutboxRecord {
            topic: topic.into(),
            payload: payload.as_bytes().to_vec().into(),
            qos: 1,
            accepted_unix_ms: 1,
            ..Default::default()
        }
    }

    /// Writes a store the way the older relay did: `outbox`, `meta`, `retained` in redb.
    fn write_old(dir: &Path, records: &[(u64, OutboxRecord)], retained: &[OutboxRecord]) {
        let db = redb::Database::create(dir.join("relaybox.redb")).expect("create redb");
        let txn = db.begin_write().expect("write txn");
        {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert("epoch", 4242).expect("epoch");
            meta.insert("next_seq", 90).expect("next_seq");
            let mut outbox = txn.open_table(OUTBOX).expect("outbox");
            for (seq, r) in records {
                outbox
                    .insert(*seq, r.encode_to_vec().as_slice())
                    .expect("insert");
            }
            let mut table = txn.open_table(RETAINED).expect("retained");
            for r in retained {
                table
                    .insert(r.topic.as_str(), r.encode_to_vec().as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_store_keeps_its_backlog_sequences_epoch_and_retained_messages() {
        let dir = tempfile::tempdir().expect("temp dir");
        let records: Vec<(u64, OutboxRecord)> = (40..80)
            .filter(|s| s % 7 != 0)
            .map(|s| (s, record("a/b", &format!("m{s}"))))
            .collect();
        let retained = vec![record("r/1", "one"), record("r/2", "two")];
        write_old(dir.path(), &records, &retained);

        let config = OutboxConfig {
            segment_bytes: 64 * 1024,
            ..Default::default()
        };
        let (store, committer) = Store::open(dir.path(), &config, 1 << 20).expect("open");
        let thread = std::thread::spawn(move || committer.run());
        assert!(
            !dir.path().join("relaybox.redb").exists(),
            "redb file removed"
        );
        assert_eq!(store.epoch(), 4242);
        assert_eq!(store.next_seq(), 90, "next_seq kept");
        let got = store.read_after(0, 1000).await.expect("read");
        assert_eq!(got, records);
        let kept = store.retained().await.expect("retained");
        assert_eq!(kept, retained);
        // New records continue after the old sequences.
        let seq = store
            .append(&record("a/b", "new"))
            .await
            .expect("append")
            .durable()
            .await
            .expect("durable");
        assert_eq!(seq, 90);
        drop(store);
        thread.join().expect("committer");

        // And again after a restart, from the log alone.
        let (store, committer) = Store::open(dir.path(), &config, 1 << 20).expect("reopen");
        let thread = std::thread::spawn(move || committer.run());
        let got = store.read_after(0, 1000).await.expect("read");
        assert_eq!(got.len(), records.len() + 1);
        assert_eq!(store.retained().await.expect("retained"), retained);
        drop(store);
        thread.join().expect("committer");
    }
}
