//! The power-cut test with the file-system world's stricter method: xfstests' log-writes.
//!
//! Killing QEMU loses the guest's page cache but not what already reached the virtual disk, so a
//! write that was never flushed usually survives it, and a missing flush passes. Here the guest
//! uses the store's disk through device-mapper's `log-writes` target (drivers/md/dm-log-writes.c),
//! which records on a second disk every write *once a flush has covered it* (or at once for a
//! FUA write), every flush, and marks. Replaying that log onto the blank disk up to an entry gives
//! the disk exactly as a power cut at that moment leaves it when the disk loses every write it
//! had not been told to flush. The host places a mark `ack-K` after it has seen the K-th PUBACK
//! (a line on the guest's virtio-serial port, which `dmlw` in the guest turns into the mark), so
//! the replay up to that mark must hold the first K acknowledged records, intact.
//!
//! The log's format (the kernel's, version 1): sector 0 holds the super block
//! (`magic`, `version`, `nr_entries`: le64; `sectorsize`: le32); then, per entry, one sector
//! with its header (`sector`, `nr_sectors`, `flags`, `data_len`: le64; a mark's text follows in
//! that sector, the rest is zero) and, for a write, `nr_sectors` sectors of the data written.
//! Sectors are the data device's logical sectors (`sectorsize` bytes).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::common::{free_port, tail};
use crate::guest::{artefacts, Guest, Image, LogWrites};
use crate::{publisher, secs, store_check};

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
pub const METADATA: u64 = 1 << 4;
const KNOWN_FLAGS: u64 = FLUSH | FUA | DISCARD | MARK | METADATA;
/// `struct log_write_entry`: four le64.
const ENTRY_HEADER: usize = 32;

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where on the data device, in sectors.
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    /// A mark's text.
    pub mark: Option<String>,
    /// Where a write's data starts in the log, in bytes.
    pub data_at: u64,
}

impl Entry {
    /// A write or a discard: replaying it changes the disk.
    pub fn changes_disk(&self) -> bool {
        self.nr_sectors > 0 && self.flags & MARK == 0
    }
}

/// A parsed log: its entries, and the file that holds their data.
pub struct Log {
    pub sectorsize: u64,
    pub entries: Vec<Entry>,
    file: File,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Log {
    /// Reads the log's super block and every entry header it counts; checks each entry the way
    /// xfstests' replay-log does (no all-zero entry, zero padding after a header) and more (no
    /// unknown flag, data inside the file).
    pub fn open(path: &Path) -> Result<Log, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut sup = [0u8; 28];
        file.read_exact_at(&mut sup, 0)
            .map_err(|e| format!("log super block: {e}"))?;
        if le64(&sup, 0) != MAGIC {
            return Err(format!("log super block: magic {:#x}", le64(&sup, 0)));
        }
        if le64(&sup, 8) != VERSION {
            return Err(format!("log super block: version {}", le64(&sup, 8)));
        }
        let nr_entries = le64(&sup, 16);
        let sectorsize = u64::from(u32::from_le_bytes(sup[24..28].try_into().expect("4")));
        if !(512..=4096).contains(&sectorsize) || !sectorsize.is_power_of_two() {
            return Err(format!("log super block: sector size {sectorsize}"));
        }
        let mut entries = Vec::with_capacity(nr_entries.min(1 << 20) as usize);
        let mut header = vec![0u8; sectorsize as usize];
        let mut pos = sectorsize;
        for i in 0..nr_entries {
            let at = pos;
            let bad = move |what: String| format!("log entry {i} at byte {at}: {what}");
            if pos + sectorsize > len {
                return Err(bad("past the end of the log".into()));
            }
            file.read_exact_at(&mut header, pos)
                .map_err(|e| bad(e.to_string()))?;
            let (sector, nr_sectors) = (le64(&header, 0), le64(&header, 8));
            let (flags, data_len) = (le64(&header, 16), le64(&header, 24));
            if flags & !KNOWN_FLAGS != 0 {
                return Err(bad(format!("unknown flags {flags:#x}")));
            }
            if flags == 0 && nr_sectors == 0 {
                return Err(bad("all zero".into()));
            }
            let mut mark = None;
            if flags & MARK != 0 {
                let end = ENTRY_HEADER + data_len as usize;
                if nr_sectors != 0 || end >= header.len() {
                    return Err(bad(format!(
                        "mark of {data_len} bytes, {nr_sectors} sectors"
                    )));
                }
                let text = std::str::from_utf8(&header[ENTRY_HEADER..end])
                    .map_err(|_| bad("mark text is not UTF-8".into()))?;
                mark = Some(text.to_owned());
            } else if data_len != 0 || header[ENTRY_HEADER..].iter().any(|b| *b != 0) {
                // The kernel writes inline data only for marks.
                return Err(bad("not zero after the header".into()));
            }
            pos += sectorsize;
            let data_at = pos;
            if flags & (MARK | DISCARD) == 0 {
                pos += nr_sectors * sectorsize;
                if pos > len {
                    return Err(bad(format!("{nr_sectors} sectors of data past the end")));
                }
            }
            entries.push(Entry {
                sector,
                nr_sectors,
                flags,
                mark,
                data_at,
            });
        }
        Ok(Log {
            sectorsize,
            entries,
            file,
        })
    }

    fn count(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        self.entries.iter().filter(|e| pred(e)).count()
    }

    /// The bytes the entries take in the log, the super block included.
    pub fn bytes(&self) -> u64 {
        self.entries.last().map_or(self.sectorsize, |e| {
            e.data_at
                + if e.flags & (MARK | DISCARD) == 0 {
                    e.nr_sectors * self.sectorsize
                } else {
                    0
                }
        })
    }
}

/// A disk image being brought forward entry by entry.
pub struct Replay<'a> {
    log: &'a Log,
    image: File,
    image_len: u64,
    /// The first entry not yet applied.
    next: usize,
}

impl<'a> Replay<'a> {
    /// Starts from a copy of `base` (the data disk as it was when logging began) at `image`.
    pub fn new(log: &'a Log, base: &Path, image: &Path) -> Result<Replay<'a>, String> {
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(base)
            .arg(image)
            .status()
            .map_err(|e| format!("cp: {e}"))?;
        if !status.success() {
            return Err(format!("copying {} failed", base.display()));
        }
        let image_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        let image_len = image_file.metadata().map_err(|e| e.to_string())?.len();
        Ok(Replay {
            log,
            image: image_file,
            image_len,
            next: 0,
        })
    }

    /// Applies the entries up to and including `last`. A discard reads back as zeros.
    pub fn through(&mut self, last: usize) -> Result<(), String> {
        let ss = self.log.sectorsize;
        let mut buf = Vec::new();
        while self.next <= last {
            let i = self.next;
            let e = &self.log.entries[i];
            self.next += 1;
            if !e.changes_disk() {
                continue;
            }
            let (at, len) = (e.sector * ss, e.nr_sectors * ss);
            if at + len > self.image_len {
                return Err(format!(
                    "log entry {i} writes bytes {at}..{} of a {}-byte disk",
                    at + len,
                    self.image_len
                ));
            }
            buf.clear();
            buf.resize(len as usize, 0);
            if e.flags & DISCARD == 0 {
                self.log
                    .file
                    .read_exact_at(&mut buf, e.data_at)
                    .map_err(|err| format!("log entry {i} data: {err}"))?;
            }
            self.image
                .write_all_at(&buf, at)
                .map_err(|err| format!("replaying log entry {i}: {err}"))?;
        }
        Ok(())
    }
}

/// A point of the log where a power cut is checked: a flush or FUA write has completed, or a
/// mark was placed.
#[derive(Debug, Clone)]
pub struct Point {
    pub entry: usize,
    /// The disk's state: how many disk-changing entries come up to and including this one.
    pub state: usize,
    /// For a mark `ack-K`: K, the PUBACKs the host had seen before it.
    pub acked: Option<usize>,
}

pub fn points(log: &Log) -> Vec<Point> {
    let mut state = 0;
    let mut out = Vec::new();
    for (entry, e) in log.entries.iter().enumerate() {
        state += usize::from(e.changes_disk());
        if e.flags & (FLUSH | FUA | MARK) != 0 {
            let acked = e
                .mark
                .as_deref()
                .and_then(|m| m.strip_prefix("ack-"))
                .and_then(|k| k.parse().ok());
            out.push(Point {
                entry,
                state,
                acked,
            });
        }
    }
    out
}

/// `n` of `items` spread evenly, the last one always among them.
fn spread(items: &[usize], n: usize) -> Vec<usize> {
    if n >= items.len() {
        return items.to_vec();
    }
    if n == 0 {
        return Vec::new();
    }
    (1..=n).map(|j| items[j * items.len() / n - 1]).collect()
}

/// The disk states to check, at most `budget` (and at least the last): every one when they
/// fit; otherwise the states at `ack-K` marks first (spread evenly if even they do not fit),
/// then the states at flushes only, spread evenly over the run.
pub fn select_states(points: &[Point], budget: usize) -> BTreeSet<usize> {
    let mut at_marks = BTreeSet::new();
    let mut all = BTreeSet::new();
    for p in points {
        all.insert(p.state);
        if p.acked.is_some() {
            at_marks.insert(p.state);
        }
    }
    let budget = budget.max(1);
    if all.len() <= budget {
        return all;
    }
    let marks: Vec<usize> = at_marks.iter().copied().collect();
    let others: Vec<usize> = all.difference(&at_marks).copied().collect();
    let mut chosen: BTreeSet<usize> = spread(&marks, budget - 1).into_iter().collect();
    chosen.extend(spread(&others, budget - 1 - chosen.len()));
    chosen.insert(*all.last().expect("a state"));
    chosen
}

/// What the store held on a replayed disk.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Outbox records: sequence, topic, payload.
    pub records: Vec<(u64, String, Vec<u8>)>,
    pub retained: usize,
    pub torn: u64,
    pub corrupt: u64,
    pub next_seq: u64,
}

/// What the run published: every payload sent (with its index) and the acknowledged ones, by
/// index, in the order their PUBACKs came.
pub struct Expect {
    pub topic: String,
    pub sent: HashMap<Vec<u8>, usize>,
    pub acked: Vec<usize>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub points: usize,
    pub states: usize,
    pub states_checked: usize,
    pub marks: usize,
    pub marks_checked: usize,
    /// Checked marks some of whose messages the state checked before theirs lacked: with every
    /// state checked, marks that a relay leaving out its last flush would fail.
    pub tight_marks: usize,
    /// Checked states at which the store reported a torn tail, and the most it passed over.
    pub torn_states: usize,
    pub max_torn: u64,
    /// Records in the outbox at the last checked state.
    pub final_records: usize,
    pub violations: Vec<String>,
}

/// How a payload shows in a message: its head, up to the filler.
fn head(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    text.split(' ')
        .next()
        .unwrap_or_default()
        .chars()
        .take(40)
        .collect()
}

/// Checks one state's store against what was sent and against the state read `before`;
/// returns what it holds (message index by sequence).
fn look_at(
    seen: &Seen,
    expect: &Expect,
    before: Option<&(usize, HashMap<u64, usize>, u64)>,
    at: &str,
    report: &mut Report,
) -> HashMap<u64, usize> {
    report.torn_states += usize::from(seen.torn > 0);
    report.max_torn = report.max_torn.max(seen.torn);
    report.final_records = seen.records.len();
    let v = &mut report.violations;
    if seen.corrupt > 0 {
        v.push(format!(
            "{at}: the store found {} corrupt records",
            seen.corrupt
        ));
    }
    if seen.retained > 0 {
        v.push(format!(
            "{at}: {} retained messages, none were sent",
            seen.retained
        ));
    }
    let mut held: HashMap<u64, usize> = HashMap::new();
    let mut payloads_seen = HashSet::new();
    for (seq, topic, payload) in &seen.records {
        match expect.sent.get(payload) {
            Some(i) if *topic == expect.topic => {
                if !payloads_seen.insert(*i) {
                    v.push(format!("{at}: `{}` is in the store twice", head(payload)));
                }
                held.insert(*seq, *i);
            }
            _ => v.push(format!(
                "{at}: record {seq} (topic {topic:?}, `{}`, {} bytes) is not one the host sent",
                head(payload),
                payload.len()
            )),
        }
    }
    if let Some((state, held_before, next_seq)) = before {
        let lost: Vec<_> = held_before
            .iter()
            .filter(|(seq, i)| held.get(seq) != Some(i))
            .collect();
        if let Some((seq, i)) = lost.first() {
            v.push(format!(
                "{at}: {} records present at disk state {state} are gone (e.g. record {seq}, \
                 message {i})",
                lost.len()
            ));
        }
        if seen.next_seq < *next_seq {
            v.push(format!(
                "{at}: next sequence went back from {next_seq} to {}",
                seen.next_seq
            ));
        }
    }
    held
}

/// Replays `log` onto a copy of `base` in `work`, opens the store (`open`: `Ok(None)` when the
/// disk has no store yet) at each selected state, and checks, at every state checked: the store
/// opens, nothing in it is corrupt, every record is one the host sent, once, and everything
/// present at the state checked before is still there (records only accumulate: the hub is
/// away); and at every `ack-K` mark whose state is checked: the first K acknowledged records
/// are present. Errors of the replay itself (a log that does not fit the disk) are `Err`.
pub fn check(
    log: &Log,
    base: &Path,
    work: &Path,
    expect: &Expect,
    budget: usize,
    mut open: impl FnMut(&Path, &str) -> Result<Option<Seen>, String>,
) -> Result<Report, String> {
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let image = work.join("replay.img");
    let mut replay = Replay::new(log, base, &image)?;
    let pts = points(log);
    let selected = select_states(&pts, budget);
    let mut report = Report {
        points: pts.len(),
        states: pts.iter().map(|p| p.state).collect::<BTreeSet<_>>().len(),
        marks: pts.iter().filter(|p| p.acked.is_some()).count(),
        ..Report::default()
    };
    // The disk state being looked at, and what its store holds (message index by sequence;
    // `None`: it could not be read, which is reported already).
    let mut current: Option<(usize, Option<HashMap<u64, usize>>)> = None;
    // The last state whose store could be read: state, holdings, next sequence.
    let mut before: Option<(usize, HashMap<u64, usize>, u64)> = None;
    // What the state read before that one held: the disk just before the current state's
    // flush, when every state is checked.
    let mut prior: Option<HashSet<usize>> = None;
    for p in &pts {
        if !selected.contains(&p.state) {
            continue;
        }
        if current.as_ref().is_none_or(|c| c.0 != p.state) {
            replay.through(p.entry)?;
            report.states_checked += 1;
            let at = format!("entry {} (disk state {})", p.entry, p.state);
            let seen = match open(&image, &format!("state-{}", p.state)) {
                Ok(seen) => seen.unwrap_or_default(),
                Err(e) => {
                    report.violations.push(format!("{at}: {e}"));
                    current = Some((p.state, None));
                    continue;
                }
            };
            let held = look_at(&seen, expect, before.as_ref(), &at, &mut report);
            prior = before.map(|b| b.1.into_values().collect());
            before = Some((p.state, held.clone(), seen.next_seq));
            current = Some((p.state, Some(held)));
        }
        let (Some(k), Some((_, Some(held)))) = (p.acked, &current) else {
            continue;
        };
        report.marks_checked += 1;
        let Some(acked) = expect.acked.get(..k) else {
            report.violations.push(format!(
                "entry {}: mark ack-{k}, but only {} PUBACKs came",
                p.entry,
                expect.acked.len()
            ));
            continue;
        };
        let present: HashSet<usize> = held.values().copied().collect();
        let missing: Vec<usize> = acked
            .iter()
            .copied()
            .filter(|i| !present.contains(i))
            .collect();
        if let Some(first) = missing.first() {
            report.violations.push(format!(
                "entry {} (mark ack-{k}): {} of the {k} messages acknowledged before it are not \
                 in the store, e.g. message {first}",
                p.entry,
                missing.len()
            ));
        }
        // Without the flush (or FUA write) that made this state, the mark would fail.
        if prior
            .as_ref()
            .is_some_and(|before| acked.iter().any(|i| !before.contains(i)))
        {
            report.tight_marks += 1;
        }
    }
    let _ = std::fs::remove_file(&image);
    Ok(report)
}

/// Messages of the run, sensor-sized (the publisher's 1 KB of filler).
const MESSAGES: usize = 1_500;
/// The run publishes in rounds of these sizes, over and over: single records and group
/// commits. Each round's last mark is placed before the next round publishes, so no flush of
/// the relay's next commit can come between a PUBACK and its mark and hide a missing flush.
const ROUNDS: [usize; 5] = [1, 2, 5, 13, 29];
/// The log disk (sparse): the run logs some tens of MiB.
const LOG_DISK_BYTES: u64 = 512 << 20;
/// Disk states replayed and checked at most (each one: a copy, e2fsck, debugfs, the store's
/// inspection).
const STATE_BUDGET: usize = 1_000;
const TAG: &str = "lw";

/// The host's end of the guest's marks port: sends `ack-K`, reads back `placed ack-K`.
struct Marks {
    stream: tokio::io::BufReader<tokio::net::UnixStream>,
    sent: Vec<usize>,
}

impl Marks {
    /// Asks for the mark `ack-K` (K: the PUBACKs come so far) unless K has one already.
    async fn ack(&mut self, k: usize) {
        if k > self.sent.last().copied().unwrap_or(0) {
            self.send(&format!("ack-{k}")).await;
            self.sent.push(k);
        }
    }

    async fn send(&mut self, line: &str) {
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the marks port");
    }

    /// Waits (bounded) until the guest reports the latest mark placed.
    async fn wait_placed(&mut self) {
        let want = format!("placed ack-{}", self.sent.last().copied().unwrap_or(0));
        let mut line = String::new();
        while line.trim_end() != want {
            line.clear();
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_line(&mut line))
                    .await
                    .unwrap_or_else(|_| panic!("no `{want}` from the guest within 10 s"))
                    .expect("read the marks port");
            assert!(read > 0, "the marks port closed before `{want}`");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_writes_replay_keeps_every_acknowledged_record() {
    let _one = crate::ONE_GUEST.lock().await;
    let dir = artefacts("log_writes");
    // No hub: nothing listens on this port, so the uplink never connects, nothing leaves the
    // outbox, and records only accumulate.
    let mut guest = Guest::new(&dir, free_port());
    let log_disk = dir.join("log.img");
    File::create(&log_disk)
        .and_then(|f| f.set_len(LOG_DISK_BYTES))
        .expect("log disk");
    // A socket path well under the 108-byte limit of sun_path, whatever the target dir is.
    let socket_dir = tempfile::Builder::new()
        .prefix("rbx-marks-")
        .tempdir()
        .expect("socket dir");
    let marks_socket = socket_dir.path().join("marks.sock");
    guest.logwrites = Some(LogWrites {
        log_disk: log_disk.clone(),
        marks: marks_socket.clone(),
    });
    let ready = guest.boot_ready().await;
    let console = guest.console();
    assert!(
        console.contains("log-writes: /dev/mapper/rbx-lw") && console.contains("write back"),
        "the guest did not set up log-writes over a disk with a write cache:\n{}",
        tail(&console, 30)
    );

    let mut marks = Marks {
        stream: tokio::io::BufReader::new(
            tokio::net::UnixStream::connect(&marks_socket)
                .await
                .expect("connect to the guest's marks port"),
        ),
        sent: Vec::new(),
    };
    let started = Instant::now();
    let pace = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let run = publisher::Recording::start_paced(
        guest.mqtt_port,
        "hw-lw",
        TAG,
        MESSAGES,
        Some(pace.clone()),
    );
    let deadline = started + Duration::from_secs(120);
    let (mut released, mut rounds) = (0, 0);
    while released < MESSAGES {
        let size = ROUNDS[rounds % ROUNDS.len()].min(MESSAGES - released);
        pace.add_permits(size);
        released += size;
        rounds += 1;
        // A mark each time more PUBACKs have come, until the round's last.
        loop {
            let k = run.acked();
            marks.ack(k).await;
            if k >= released {
                break;
            }
            if Instant::now() > deadline {
                guest.assert_alive();
                panic!(
                    "{k} of {released} PUBACKs within 120 s; console:\n{}",
                    tail(&guest.console(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        marks.wait_placed().await;
    }
    let acked_in = started.elapsed();
    let acks = run.stop().await;
    marks.send("end").await;
    guest.wait_poweroff(Duration::from_secs(60)).await;
    let console = guest.console();
    assert!(
        console.contains("log-writes: log complete") && !console.contains("logging_disabled"),
        "the guest did not complete the log:\n{}",
        tail(&console, 30)
    );

    let expect = Expect {
        topic: format!("sensors/hw/{TAG}"),
        sent: (0..MESSAGES)
            .map(|i| (publisher::payload(TAG, i).into_bytes(), i))
            .collect(),
        acked: acks
            .acked
            .iter()
            .map(|p| publisher::payload_index(TAG, p).expect("an acknowledged payload of the run"))
            .collect(),
    };
    assert_eq!(expect.acked.len(), MESSAGES, "PUBACKs of the run");
    let replayed = Instant::now();
    let work = dir.join("replay");
    let base = Image::get().store_template.clone();
    let (log, report) = tokio::task::spawn_blocking(move || {
        let log = Log::open(&log_disk).unwrap_or_else(|e| panic!("the log: {e}"));
        let report = check(&log, &base, &work, &expect, STATE_BUDGET, |image, label| {
            store_check::open_store(image, &work, label).map(|found| found.map(seen))
        })
        .unwrap_or_else(|e| panic!("replay: {e}"));
        (log, report)
    })
    .await
    .expect("replay task");
    let checked_in = replayed.elapsed();

    // The marks in the log are the ones sent, in order: none lost on the way.
    let logged_marks: Vec<usize> = points(&log).iter().filter_map(|p| p.acked).collect();
    let flushes = log.count(|e| e.flags & FLUSH != 0);
    let fua = log.count(|e| e.flags & FUA != 0);
    println!(
        "HIL log-writes: boot to ready {} s, {MESSAGES} messages acknowledged in {} s; log: {} \
         entries ({} writes, {flushes} flushes, {fua} FUA writes, {} marks), {:.1} MiB; \
         replayed and checked {} of {} disk states at {} flush/FUA/mark points, {} of {} ack \
         marks ({} right after the flush that made their messages durable), in {} s; torn \
         tail at {} states (at most {}); {} records at the last state; {} violations",
        secs(ready),
        secs(acked_in),
        log.entries.len(),
        log.count(|e| e.changes_disk() && e.flags & DISCARD == 0),
        log.count(|e| e.flags & MARK != 0),
        log.bytes() as f64 / f64::from(1u32 << 20),
        report.states_checked,
        report.states,
        report.points,
        report.marks_checked,
        report.marks,
        report.tight_marks,
        secs(checked_in),
        report.torn_states,
        report.max_torn,
        report.final_records,
        report.violations.len()
    );
    assert_eq!(logged_marks, marks.sent, "ack marks in the log vs sent");
    assert!(
        flushes > 0,
        "no flush in the log: the guest's disk had no write cache"
    );
    assert_eq!(
        log.entries.last().and_then(|e| e.mark.as_deref()),
        Some("dm-log-writes-end"),
        "the log does not end with the target's own end mark"
    );
    assert!(
        report.violations.is_empty(),
        "{} violations; the first ones:\n{}",
        report.violations.len(),
        report
            .violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        report.marks_checked, report.marks,
        "every ack mark checked (the state budget must cover them)"
    );
    // The test's own power: most marks must come right after the flush that made their
    // messages durable, or a relay leaving out that flush could pass.
    assert!(
        report.tight_marks * 2 >= report.marks,
        "only {} of {} marks come right after the flush of their messages",
        report.tight_marks,
        report.marks
    );
    assert!(
        report.final_records >= MESSAGES,
        "{} records at the end of the log, {MESSAGES} acknowledged",
        report.final_records
    );
}

/// The test's view of an inspection.
fn seen(found: relaybox::store::Inspection) -> Seen {
    Seen {
        records: found
            .outbox
            .into_iter()
            .map(|(seq, r)| (seq, r.topic, r.payload.to_vec()))
            .collect(),
        retained: found.retained.len(),
        torn: found.torn,
        corrupt: found.corrupt,
        next_seq: found.next_seq,
    }
}

#[cfg(test)]
mod tests {
    //! The checker against logs made here in the kernel's format, on a toy store: a disk of 16
    //! sectors, a record per non-zero sector (its payload up to the first zero byte, its sequence
    //! the sector). Among them the negative control: a mark that the flush of its record's data
    //! follows, the order a relay that acknowledges before it flushes leaves in the log.
    use super::*;

    const SS: u64 = 512;
    const TOPIC: &str = "sensors/hw/t";

    #[derive(Default)]
    struct Builder {
        entries: Vec<u8>,
        n: u64,
    }

    impl Builder {
        fn entry(
            &mut self,
            sector: u64,
            nr: u64,
            flags: u64,
            data: &[u8],
            mark: &str,
        ) -> &mut Self {
            let mut head = vec![0u8; SS as usize];
            for (at, v) in [(0, sector), (8, nr), (16, flags), (24, mark.len() as u64)] {
                head[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            head[32..32 + mark.len()].copy_from_slice(mark.as_bytes());
            self.entries.extend_from_slice(&head);
            self.entries.extend_from_slice(data);
            self.n += 1;
            self
        }
        /// A write of `payload` as the record in `sector`, with `flags`.
        fn write_with(&mut self, sector: u64, payload: &str, flags: u64) -> &mut Self {
            let mut data = vec![0u8; SS as usize];
            data[..payload.len()].copy_from_slice(payload.as_bytes());
            self.entry(sector, 1, flags, &data, "")
        }
        fn write(&mut self, sector: u64, payload: &str) -> &mut Self {
            self.write_with(sector, payload, 0)
        }
        fn flush(&mut self) -> &mut Self {
            self.entry(0, 0, FLUSH, &[], "")
        }
        fn mark(&mut self, text: &str) -> &mut Self {
            self.entry(0, 0, MARK, &[], text)
        }
        /// A discard has sectors but no data in the log.
        fn discard(&mut self, sector: u64) -> &mut Self {
            self.entry(sector, 1, DISCARD, &[], "")
        }
        fn save(&self, path: &Path) {
            let mut sup = vec![0u8; SS as usize];
            sup[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            sup[8..16].copy_from_slice(&VERSION.to_le_bytes());
            sup[16..24].copy_from_slice(&self.n.to_le_bytes());
            sup[24..28].copy_from_slice(&(SS as u32).to_le_bytes());
            sup.extend_from_slice(&self.entries);
            std::fs::write(path, sup).expect("write log");
        }
    }

    fn toy_store(image: &Path) -> Result<Option<Seen>, String> {
        let bytes = std::fs::read(image).map_err(|e| e.to_string())?;
        let mut seen = Seen::default();
        for (i, sector) in bytes.chunks(SS as usize).enumerate() {
            let len = sector.iter().position(|b| *b == 0).unwrap_or(sector.len());
            if len > 0 {
                seen.records
                    .push((i as u64, TOPIC.to_owned(), sector[..len].to_vec()));
                seen.next_seq = i as u64 + 1;
            }
        }
        Ok(Some(seen))
    }

    /// Runs the checker on the log `build` makes; the run sent `t-0` … `t-3`, and the relay
    /// acknowledged them in order.
    fn run(build: impl FnOnce(&mut Builder)) -> Report {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Builder::default();
        build(&mut b);
        b.save(&dir.path().join("log"));
        let base = dir.path().join("base");
        std::fs::write(&base, vec![0u8; 16 * SS as usize]).expect("base");
        let expect = Expect {
            topic: TOPIC.to_owned(),
            sent: (0..4).map(|i| (format!("t-{i}").into_bytes(), i)).collect(),
            acked: (0..4).collect(),
        };
        let log = Log::open(&dir.path().join("log")).expect("parse log");
        check(
            &log,
            &base,
            &dir.path().join("work"),
            &expect,
            100,
            |image, _| toy_store(image),
        )
        .expect("replay")
    }

    /// Asserts that one of the violations says every one of `parts`.
    fn assert_found(report: &Report, parts: &[&str]) {
        assert!(
            report
                .violations
                .iter()
                .any(|v| parts.iter().all(|p| v.contains(p))),
            "no violation says {parts:?}: {:#?}",
            report.violations
        );
    }

    #[test]
    fn log_writes_checker_passes_marks_that_follow_their_flush() {
        let report = run(|b| {
            b.write(0, "t-0").flush().mark("ack-1");
            b.write(1, "t-1")
                .write(2, "t-2")
                .flush()
                .mark("ack-2")
                .mark("ack-3");
        });
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!((report.marks, report.marks_checked), (3, 3));
        // ack-2 and ack-3 come right after the flush of their records (ack-1's state is the
        // first checked: nothing before it to compare with).
        assert_eq!(report.tight_marks, 2);
        assert_eq!(report.states_checked, 2);
        assert_eq!(report.final_records, 3);
    }

    #[test]
    fn log_writes_checker_finds_a_mark_before_the_flush_of_its_record() {
        // The negative control. t-1 was written and acknowledged, but not flushed: the target
        // logs its write only with the next flush, after the mark.
        let report = run(|b| {
            b.write(0, "t-0").flush().mark("ack-1");
            b.mark("ack-2").write(1, "t-1").flush();
        });
        assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
        assert_found(
            &report,
            &["mark ack-2", "1 of the 2 messages", "e.g. message 1"],
        );
    }

    #[test]
    fn log_writes_checker_finds_records_that_vanish_or_were_never_sent() {
        let report = run(|b| {
            b.write(0, "t-0").write(1, "t-1").flush();
            b.discard(1).flush();
            b.write(3, "bogus").flush();
        });
        assert_found(&report, &["records present at disk state", "are gone"]);
        assert_found(&report, &["`bogus`", "is not one the host sent"]);
    }

    #[test]
    fn log_writes_checker_counts_fua_writes_and_skips_plain_writes() {
        let report = run(|b| {
            b.write(0, "t-0").write_with(1, "t-1", FUA).mark("ack-2");
        });
        // A plain write is no point of its own; the FUA write and the mark are.
        assert_eq!(report.points, 2);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
    }

    #[test]
    fn log_writes_parser_rejects_what_the_kernel_does_not_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let mut b = Builder::default();
        b.write(0, "t-0").flush();
        b.save(&path);
        let log = Log::open(&path).expect("a good log");
        assert_eq!(log.entries.len(), 2);
        assert_eq!(log.bytes(), 4 * SS);

        let good = std::fs::read(&path).expect("read");
        let bad = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            edit(&mut bytes);
            std::fs::write(&path, &bytes).expect("write");
            Log::open(&path).err().unwrap_or_default()
        };
        assert!(bad(&|b| b[0] ^= 1).contains("magic"));
        assert!(bad(&|b| b.truncate(3 * SS as usize)).contains("past the end"));
        assert!(bad(&|b| b[SS as usize + 16] = 0x40).contains("unknown flags"));
        assert!(bad(&|b| b[SS as usize + 100] = 1).contains("not zero"));
        assert!(bad(&|b| b[16] = 3).contains("past the end"));
    }

    #[test]
    fn log_writes_states_budget_keeps_marks_and_the_last_state() {
        let pts: Vec<Point> = (1..=100)
            .map(|s| Point {
                entry: s,
                state: s,
                acked: (s % 10 == 0).then_some(s),
            })
            .collect();
        let chosen = select_states(&pts, 30);
        assert!(chosen.len() <= 30, "{}", chosen.len());
        assert!((10..=100).step_by(10).all(|s| chosen.contains(&s)));
        assert!(chosen.contains(&100));
        assert_eq!(select_states(&pts, 1000).len(), 100);
    }
}
