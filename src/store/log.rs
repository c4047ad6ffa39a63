//! The segment log: segment files, reading records, the tail writer and recovery at open.
//!
//! The log is an endless sequence of bytes cut into *chunks* of one segment's size; chunk `c`
//! covers log positions `c × S .. (c + 1) × S`. Each chunk lives in one segment file while it
//! matters; the file's first record ([`Kind::Start`]) says which chunk it holds. Files are
//! reused: when every chunk in a file is dead (see `mod.rs`), the file becomes a spare and the
//! next chunk overwrites it from offset 0. A record is valid only at the position it was
//! written for (the CRCs cover it), so what is left of an older chunk in a reused file is never
//! read as a record of the new one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::format::{self, Kind, Look, Start, HEADER, PAGE};
use super::OutboxStats;

/// How much a reader reads at first, and at most, at a time: reads that want a few records
/// (the uplink's, mostly) stay small; long scans grow to large reads.
const FIRST_BLOCK: u64 = 16 * 1024;
const MAX_BLOCK: u64 = 128 * 1024;
/// Bytes read at a time when looking for the next record after damage or padding.
const FIND_BLOCK: u64 = 64 * 1024;

/// A chunk of the log held by a segment file.
#[derive(Clone)]
pub(super) struct Chunk {
    pub file: Arc<File>,
    pub path: PathBuf,
    /// The outbox sequence the chunk's writer would have given next when it started.
    pub first_seq: u64,
    /// Where the chunk's data ends, once known (`u64::MAX` until then): readers stop there
    /// instead of searching the rest of the segment.
    pub end: Arc<AtomicU64>,
}

impl Chunk {
    pub fn new(file: Arc<File>, path: PathBuf, first_seq: u64) -> Chunk {
        Chunk {
            file,
            path,
            first_seq,
            end: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

/// What readers and the writer share: the live chunks and how far the log is durable.
pub(super) struct Files {
    pub segment_bytes: u64,
    pub chunks: RwLock<BTreeMap<u64, Chunk>>,
    /// Everything before this position is on flash; readers never read past it.
    pub durable_tail: AtomicU64,
}

/// What a scan found besides records.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ScanReport {
    /// Damaged places passed over (a bad CRC with readable records after it).
    pub corrupt: u64,
    /// The last chunk ended in a damaged record (a write cut short: a crash or power cut).
    pub torn: u64,
    /// Where valid data ended in the last chunk scanned.
    pub end: u64,
}

/// Whether a scan goes on after a record.
pub(super) enum Flow {
    Continue,
    Stop,
}

impl Files {
    pub fn chunk_of(&self, position: u64) -> u64 {
        position / self.segment_bytes
    }

    fn chunk_list(&self) -> BTreeMap<u64, Chunk> {
        match self.chunks.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The live chunk with the greatest `first_seq` at or before `seq`, and its start position.
    pub fn chunk_for_seq(&self, seq: u64) -> Option<u64> {
        let chunks = self.chunk_list();
        chunks
            .iter()
            .rev()
            .find(|(_, c)| c.first_seq <= seq)
            .or_else(|| chunks.iter().next())
            .map(|(&n, _)| n * self.segment_bytes)
    }

    /// Reads the record at `position` (of at most `max` bytes), if it is intact.
    pub fn read_record(&self, position: u64, max: u64) -> io::Result<Option<(Kind, Vec<u8>)>> {
        let chunk = self.chunk_of(position);
        let Some(file) = self.chunk_list().get(&chunk).map(|c| c.file.clone()) else {
            return Ok(None);
        };
        let offset = position % self.segment_bytes;
        let len = max.min(self.segment_bytes - offset);
        let mut buf = vec![0u8; len as usize];
        read_full(&file, &mut buf, offset)?;
        Ok(
            match format::look(&buf, position, self.segment_bytes - offset) {
                Look::Record { kind, body, .. } => Some((kind, body.to_vec())),
                _ => None,
            },
        )
    }

    /// Calls `f` with every intact record from `from` on, in log order, up to `until` (a
    /// position; the durable tail at most), across chunks. Stops early when `f` says so.
    pub fn scan(
        &self,
        from: u64,
        until: u64,
        mut f: impl FnMut(u64, Kind, &[u8]) -> Flow,
    ) -> io::Result<ScanReport> {
        let until = until.min(self.durable_tail.load(Ordering::Acquire));
        let mut report = ScanReport::default();
        let chunks = self.chunk_list();
        let first = self.chunk_of(from);
        let newest = chunks.keys().next_back().copied().unwrap_or(0);
        for (&n, chunk) in chunks.range(first..) {
            let base = n * self.segment_bytes;
            if base >= until {
                break;
            }
            let start = if n == first { from - base } else { 0 };
            let known = chunk.end.load(Ordering::Acquire);
            let end = (until - base).min(self.segment_bytes).min(known);
            let mut stop = false;
            let r = scan_chunk(
                &chunk.file,
                base,
                start,
                end,
                self.segment_bytes,
                |p, k, b| {
                    let flow = f(p, k, b);
                    if matches!(flow, Flow::Stop) {
                        stop = true;
                    }
                    flow
                },
            )?;
            report.corrupt += r.corrupt;
            report.torn = r.torn;
            report.end = r.end;
            if !stop && end == self.segment_bytes && n < newest {
                // The whole chunk was read and a later one holds the tail: its end is final.
                chunk.end.store(r.end, Ordering::Release);
            }
            if stop {
                break;
            }
        }
        Ok(report)
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                // Past the end of the file: the rest reads as zeros (no record).
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Scans one chunk from `start` to `end` (offsets in the segment). Damage is passed over by the
/// record's length (a bad body) or by looking for the next position where a header written for
/// that position stands; damage with nothing valid after it ends the chunk's data.
fn scan_chunk(
    file: &File,
    base: u64,
    start: u64,
    end: u64,
    segment: u64,
    mut f: impl FnMut(u64, Kind, &[u8]) -> Flow,
) -> io::Result<ScanReport> {
    let mut report = ScanReport::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_at = start;
    let mut off = start;
    let mut block = FIRST_BLOCK;
    let mut fill = |buf: &mut Vec<u8>, buf_at: &mut u64, at: u64, want: u64| -> io::Result<()> {
        let len = want.max(block).min(end - at);
        block = (block * 2).min(MAX_BLOCK);
        buf.resize(len as usize, 0);
        read_full(file, buf, at)?;
        *buf_at = at;
        Ok(())
    };
    while off + HEADER as u64 <= end {
        if off < buf_at || off + HEADER as u64 > buf_at + buf.len() as u64 {
            fill(&mut buf, &mut buf_at, off, 0)?;
        }
        let here = &buf[(off - buf_at) as usize..];
        let buffered_to_end = buf_at + buf.len() as u64 >= end;
        match format::look(here, base + off, segment - off) {
            Look::Record { kind, body, len } => {
                if matches!(f(base + off, kind, body), Flow::Stop) {
                    report.end = off + len;
                    return Ok(report);
                }
                off += len;
            }
            Look::BadBody { len } if !buffered_to_end && off + len > buf_at + buf.len() as u64 => {
                // The record goes on past what was read: read it whole and look again.
                fill(&mut buf, &mut buf_at, off, len)?;
            }
            Look::BadBody { len } => match find_next(file, base, off + len, end, segment)? {
                Some(p) => {
                    report.corrupt += 1;
                    off = p;
                }
                None => {
                    report.torn = 1;
                    report.end = off;
                    return Ok(report);
                }
            },
            Look::Nothing => match find_next(file, base, off + format::ALIGN, end, segment)? {
                Some(p) => {
                    // Zeros to the end of the page and a record at the next one: a commit that
                    // started on a fresh page. Anything else passed over is damage.
                    let next_page = (off / PAGE + 1) * PAGE;
                    if p != next_page || !tail_is_clean(file, off, end)? {
                        report.corrupt += 1;
                    }
                    off = p;
                }
                None => {
                    report.torn = u64::from(!tail_is_clean(file, off, end)?);
                    report.end = off;
                    return Ok(report);
                }
            },
        }
    }
    report.end = off.min(end);
    Ok(report)
}

/// The first position at or after `from` (offset) where a header written for that position
/// stands.
fn find_next(file: &File, base: u64, from: u64, end: u64, segment: u64) -> io::Result<Option<u64>> {
    // Read a block at a time: the next record is most often at the next page (a commit that
    // started on a fresh page), and the rest of the chunk may be megabytes.
    let mut buf = Vec::new();
    let mut at = from;
    while at + HEADER as u64 <= end {
        buf.resize(FIND_BLOCK.min(end - at) as usize, 0);
        read_full(file, &mut buf, at)?;
        let mut i = 0usize;
        while i + HEADER <= buf.len() {
            let off = at + i as u64;
            if buf[i..i + HEADER].iter().any(|&b| b != 0)
                && !matches!(
                    format::look(&buf[i..], base + off, segment - off),
                    Look::Nothing
                )
            {
                return Ok(Some(off));
            }
            i += format::ALIGN as usize;
        }
        // The first position not looked at yet.
        at += i as u64;
    }
    Ok(None)
}

/// Whether the bytes from `off` to the end of its page are zeros (what a commit leaves after its
/// last record). Anything else there is a write that was cut short.
fn tail_is_clean(file: &File, off: u64, end: u64) -> io::Result<bool> {
    let page_end = ((off / PAGE) + 1) * PAGE;
    let to = page_end.min(end);
    if to <= off {
        return Ok(true);
    }
    let mut buf = vec![0u8; (to - off) as usize];
    read_full(file, &mut buf, off)?;
    Ok(buf.iter().all(|&b| b == 0))
}

/// A segment file found in the log directory.
pub(super) struct Found {
    pub path: PathBuf,
    pub file: File,
    /// What its first record says, when it is intact.
    pub start: Option<Start>,
}

/// The segment files in `dir` (`*.seg`), with what their first record says. Files of another
/// length than `segment_bytes` (when one is given; otherwise the first file's) are left aside
/// with a warning; unfinished creations (`*.tmp`) are removed.
pub(super) fn list_segments(
    dir: &Path,
    segment_bytes: u64,
    clean_up: bool,
) -> io::Result<(u64, Vec<Found>)> {
    let mut found = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let mut size = None;
    for path in entries {
        match path.extension().and_then(|e| e.to_str()) {
            Some("tmp") => {
                if clean_up {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            Some("seg") => {}
            _ => continue,
        }
        let file = OpenOptions::new().read(true).write(clean_up).open(&path)?;
        let len = file.metadata()?.len();
        let want = *size.get_or_insert(len);
        if len != want || len < 2 * PAGE || len % PAGE != 0 {
            tracing::warn!(path = %path.display(), len, "segment file of an unexpected size; left aside");
            continue;
        }
        found.push(Found {
            path,
            file,
            start: None,
        });
    }
    let segment = size.unwrap_or(segment_bytes);
    for f in &mut found {
        f.start = read_start(&f.file, segment)?;
    }
    Ok((segment, found))
}

/// Reads a segment's first record: the chunk it holds, when intact.
fn read_start(file: &File, segment: u64) -> io::Result<Option<Start>> {
    let mut buf = vec![0u8; PAGE as usize];
    read_full(file, &mut buf, 0)?;
    // The chunk number is the body's first field; the CRCs then prove it for that position.
    let Some(chunk) = buf
        .get(HEADER..HEADER + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
    else {
        return Ok(None);
    };
    let Some(position) = chunk.checked_mul(segment) else {
        return Ok(None);
    };
    Ok(match format::look(&buf, position, segment) {
        Look::Record {
            kind: Kind::Start,
            body,
            ..
        } => Start::decode(body).filter(|s| s.chunk == chunk),
        _ => None,
    })
}

/// Creates a segment file of `segment` bytes, filled with zeros and flushed, under a new name.
/// Written under a temporary name and renamed, so a crash never leaves a short `.seg` file.
pub(super) fn create_segment(dir: &Path, id: u64, segment: u64) -> io::Result<(PathBuf, File)> {
    let tmp = dir.join(format!("{id:08}.tmp"));
    let path = dir.join(format!("{id:08}.seg"));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let zeros = vec![0u8; (1 << 20).min(segment) as usize];
    let mut left = segment;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    sync_dir(dir)?;
    Ok((path, file))
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The tail of the log: stages records after the durable tail and writes them with one
/// `pwrite` of the tail page(s) and one `fdatasync`.
pub(super) struct Writer {
    pub files: Arc<Files>,
    pub stats: Arc<OutboxStats>,
    chunk: u64,
    file: Arc<File>,
    /// The durable end of the log.
    tail: u64,
    /// The bytes of the tail's page before the tail (so a commit rewrites them unchanged).
    page: Vec<u8>,
    /// Records staged after the tail.
    staged: Vec<u8>,
}

impl Writer {
    /// A writer whose durable data ends at `tail`, in chunk `chunk` held by `file`.
    pub fn resume(
        files: Arc<Files>,
        stats: Arc<OutboxStats>,
        chunk: u64,
        file: Arc<File>,
        tail: u64,
    ) -> io::Result<Writer> {
        let in_page = tail % PAGE;
        let mut page = vec![0u8; in_page as usize];
        read_full(&file, &mut page, tail % files.segment_bytes - in_page)?;
        files.durable_tail.store(tail, Ordering::Release);
        Ok(Writer {
            files,
            stats,
            chunk,
            file,
            tail,
            page,
            staged: Vec::new(),
        })
    }

    /// The position the next staged record gets.
    pub fn next_position(&self) -> u64 {
        self.tail + self.staged.len() as u64
    }

    pub fn tail(&self) -> u64 {
        self.tail
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Before staging about `batch` bytes: when they would not fit in what is left of the tail
    /// page and starting on the next page writes fewer pages, the tail moves to the next page
    /// without writing anything. The rest of the old tail page holds the zeros the last commit
    /// wrote there; readers take zeros up to a page's end followed by a record at the next page
    /// as a skip.
    pub fn fresh_page_if_cheaper(&mut self, batch: u64) {
        let position = self.next_position();
        let in_page = position % PAGE;
        if in_page == 0 || !self.staged.is_empty() || batch + HEADER as u64 <= PAGE - in_page {
            return;
        }
        let from_tail = (in_page + batch).div_ceil(PAGE);
        let fresh = batch.div_ceil(PAGE);
        let next_page = position - in_page + PAGE;
        let chunk_end = (self.chunk + 1) * self.files.segment_bytes;
        if fresh < from_tail && next_page + batch + HEADER as u64 <= chunk_end {
            self.tail = next_page;
            self.page.clear();
        }
    }

    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Whether a record with a body of `body_len` bytes fits in the current chunk (leaving room
    /// for the pad a commit may need).
    pub fn fits(&self, body_len: usize) -> bool {
        let end = (self.chunk + 1) * self.files.segment_bytes;
        self.next_position() + format::record_len(body_len) + HEADER as u64 <= end
    }

    /// Stages a record; returns its position.
    pub fn stage(&mut self, kind: Kind, body: &[u8]) -> u64 {
        let position = self.next_position();
        format::encode(&mut self.staged, position, kind, body);
        position
    }

    /// Writes what is staged: the tail page(s) in one `pwrite`, then one `fdatasync`. On
    /// success the staged records are durable; on failure nothing staged counts and the
    /// caller moves to a new chunk (what reached the disk of this one is unknown).
    pub fn commit(&mut self) -> io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        // The least any store writes for these bytes: whole pages from where they start.
        let least = (self.next_position() - self.tail).div_ceil(PAGE);
        self.stats.floor_pages.fetch_add(least, Ordering::Relaxed);
        // A commit never ends on a page boundary: the bytes after the last record are then
        // always zeros this commit wrote, and anything else there is a torn write.
        let chunk_end = (self.chunk + 1) * self.files.segment_bytes;
        let end = self.next_position();
        if end % PAGE == 0 && end < chunk_end {
            self.stage(Kind::Pad, &[]);
        }
        let end = self.next_position();
        let page_start = self.tail - self.tail % PAGE;
        let write_end = end.div_ceil(PAGE) * PAGE;
        let mut buf = Vec::with_capacity((write_end - page_start) as usize);
        buf.extend_from_slice(&self.page);
        buf.extend_from_slice(&self.staged);
        buf.resize((write_end - page_start) as usize, 0);
        let offset = page_start % self.files.segment_bytes;
        let result = self
            .file
            .write_all_at(&buf, offset)
            .and_then(|()| self.file.sync_data());
        self.stats
            .bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        result?;
        let new_page_start = end - end % PAGE;
        self.page =
            buf[(new_page_start - page_start) as usize..(end - page_start) as usize].to_vec();
        self.tail = end;
        self.staged.clear();
        self.files.durable_tail.store(end, Ordering::Release);
        Ok(())
    }

    /// Drops what is staged (after a failed commit).
    pub fn discard(&mut self) {
        self.staged.clear();
    }

    /// Moves the tail to the start of chunk `chunk`, held by `file` (zero-filled or a spare),
    /// and stages its [`Kind::Start`] record. What was staged must have been committed.
    pub fn start_chunk(&mut self, chunk: u64, file: Arc<File>, start: &Start) -> u64 {
        debug_assert!(self.staged.is_empty());
        self.chunk = chunk;
        self.file = file;
        self.tail = chunk * self.files.segment_bytes;
        self.page.clear();
        self.stage(Kind::Start, &start.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A file of `len` zeros with a record written for `position` at `position` (base 0).
    fn file_with_record_at(position: u64, len: u64) -> File {
        let file = tempfile::tempfile().expect("temp file");
        file.set_len(len).expect("size");
        let mut record = Vec::new();
        format::encode(&mut record, position, Kind::Pad, &[7u8; 40]);
        file.write_all_at(&record, position).expect("write");
        file
    }

    #[test]
    fn find_next_reads_on_past_its_first_block() {
        let len = 1 << 20;
        // Far beyond the first block, and across the boundary of two blocks.
        for position in [3 * FIND_BLOCK + 4096, 2 * FIND_BLOCK - 8] {
            let file = file_with_record_at(position, len);
            assert_eq!(
                find_next(&file, 0, 64, len, len).expect("read"),
                Some(position),
                "record at {position}"
            );
        }
        let empty = file_with_record_at(len - 64, len);
        assert_eq!(
            find_next(&empty, 0, 64, len - 64, len).expect("read"),
            None,
            "nothing before the end"
        );
    }
}
