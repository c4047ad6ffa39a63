//! Looks at the store exactly as a power cut left it, from the host, without booting the guest.
//!
//! The disk image is copied, the copy's ext4 journal is replayed (`e2fsck -E journal_only`: what
//! the guest kernel does when it mounts the disk, no file-system repair), the redb file is taken
//! out with `debugfs`, and opened with redb the way relaybox opens it, with a repair callback.
//! This is a test's outside view of the file; relaybox itself stays the only code that writes
//! it. The schema it reads (`outbox`: u64 → bytes) is the one `src/store/mod.rs` documents.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Where the guest keeps the store on its disk (data_dir = /data/relaybox, disk on /data).
const STORE_FILE_ON_DISK: &str = "/relaybox/relaybox.redb";

/// What the store looked like after a cut.
#[derive(Debug, Clone, Copy)]
pub struct StoreAfterCut {
    /// redb had to run its repair (rebuild allocator state) to open the file.
    pub repaired: bool,
    /// Records in the outbox (acknowledged to a client, not yet acknowledged by the hub).
    pub outbox_records: u64,
}

fn e2fs_tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} (e2fsprogs) not found; hw-tests/run installs it");
}

/// Opens the store on `disk` (a guest's store image, QEMU not running) via a copy in `work`.
/// Panics when the file system or the store cannot be read or opened at all.
pub fn inspect(disk: &Path, work: &Path, label: &str) -> StoreAfterCut {
    let copy = work.join(format!("{label}.img"));
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(&copy)
        .status()
        .expect("run cp");
    assert!(status.success(), "copying {} failed", disk.display());

    // Replays the journal only; exit 0 (nothing to do) or 1 (journal replayed) are fine.
    let out = Command::new(e2fs_tool("e2fsck"))
        .args(["-y", "-E", "journal_only"])
        .arg(&copy)
        .output()
        .expect("run e2fsck");
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "e2fsck -E journal_only on the cut disk failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let redb_file = work.join(format!("{label}.redb"));
    let out = Command::new(e2fs_tool("debugfs"))
        .arg("-R")
        .arg(format!("dump {STORE_FILE_ON_DISK} {}", redb_file.display()))
        .arg(&copy)
        .output()
        .expect("run debugfs");
    assert!(
        out.status.success() && redb_file.is_file(),
        "debugfs could not take {STORE_FILE_ON_DISK} out of the cut disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&copy);

    let repaired = Arc::new(AtomicBool::new(false));
    let db = redb::Database::builder()
        .set_repair_callback({
            let repaired = repaired.clone();
            move |_| repaired.store(true, Ordering::SeqCst)
        })
        .open(&redb_file)
        .unwrap_or_else(|e| panic!("the store after {label} does not open: {e}"));
    let txn = db.begin_read().expect("read transaction on the cut store");
    let outbox_records = match txn.open_table(OUTBOX) {
        Ok(table) => table.len().expect("outbox length"),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => panic!("the outbox of the store after {label} cannot be read: {e}"),
    };
    drop(txn);
    drop(db);
    let _ = std::fs::remove_file(&redb_file);
    StoreAfterCut {
        repaired: repaired.load(Ordering::SeqCst),
        outbox_records,
    }
}
