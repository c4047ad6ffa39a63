//! Looks at the store exactly as a power cut (or a replayed block log) left a disk, from the
//! host, without booting the guest.
//!
//! The disk image is copied, the copy's ext4 journal is replayed (`e2fsck -E journal_only`: what
//! the guest kernel does when it mounts the disk, no file-system repair), the store's directory
//! is taken out with `debugfs -R rdump`, and opened with relaybox's own read-only view of it,
//! `relaybox::store::inspect`: the records it would recover, and what it had to pass over (a
//! torn tail, corrupt records). relaybox itself stays the only code that writes the store.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the guest keeps the store on its disk (data_dir = /data/relaybox, disk on /data).
const STORE_DIR_ON_DISK: &str = "/relaybox";

/// What the store looked like after a cut.
#[derive(Debug, Clone, Copy)]
pub struct StoreAfterCut {
    /// Records the store found damaged (a checksum that does not match, not at the tail).
    pub corrupt: u64,
    /// A tail the store passed over as not written completely (a commit the cut interrupted).
    pub torn: u64,
    /// Records in the outbox (acknowledged to a client, not yet acknowledged by the hub).
    pub outbox_records: u64,
    /// Live segment files (each `segment_bytes`, 4 MiB): how much of the disk the log takes.
    pub segments: u64,
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
    let found = open_store(disk, work, label)
        .unwrap_or_else(|e| panic!("the store after {label}: {e}"))
        .unwrap_or_else(|| panic!("the disk after {label} holds no {STORE_DIR_ON_DISK}"));
    StoreAfterCut {
        corrupt: found.corrupt,
        torn: found.torn,
        outbox_records: found.outbox.len() as u64,
        segments: found.segments,
    }
}

/// The store on `disk` as relaybox would find it at its next start: `Ok(None)` when the disk
/// holds no store directory yet, `Err` when the file system or the store cannot be read (the
/// store's inspection failing or panicking included). Works on copies in `work`, removed after.
pub fn open_store(
    disk: &Path,
    work: &Path,
    label: &str,
) -> Result<Option<relaybox::store::Inspection>, String> {
    let copy = work.join(format!("{label}.img"));
    let out_dir = work.join(format!("{label}.store"));
    let found = (|| {
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(disk)
            .arg(&copy)
            .status()
            .map_err(|e| format!("cp: {e}"))?;
        if !status.success() {
            return Err(format!("copying {} failed", disk.display()));
        }
        // Replays the journal only; exit 0 (nothing to do) or 1 (journal replayed) are fine.
        let out = Command::new(e2fs_tool("e2fsck"))
            .args(["-y", "-E", "journal_only"])
            .arg(&copy)
            .output()
            .map_err(|e| format!("e2fsck: {e}"))?;
        if !matches!(out.status.code(), Some(0) | Some(1)) {
            return Err(format!(
                "e2fsck -E journal_only failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
        let out = Command::new(e2fs_tool("debugfs"))
            .arg("-R")
            .arg(format!("rdump {STORE_DIR_ON_DISK} {}", out_dir.display()))
            .arg(&copy)
            .output()
            .map_err(|e| format!("debugfs: {e}"))?;
        let data_dir = out_dir.join(STORE_DIR_ON_DISK.trim_start_matches('/'));
        if !out.status.success() {
            return Err(format!(
                "debugfs could not take {STORE_DIR_ON_DISK} out: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if !data_dir.is_dir() {
            // debugfs says "File not found" on stderr and exits 0.
            return Ok(None);
        }
        let opened = std::panic::catch_unwind(|| relaybox::store::inspect(&data_dir));
        match opened {
            Ok(Ok(found)) => Ok(Some(found)),
            Ok(Err(e)) => Err(format!("the store does not open: {e}")),
            Err(panic) => Err(format!(
                "the store's inspection panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
        }
    })();
    let _ = std::fs::remove_file(&copy);
    let _ = std::fs::remove_dir_all(&out_dir);
    found
}
