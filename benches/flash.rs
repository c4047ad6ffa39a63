//! Flash accounting: bytes written to storage per QoS 1 message, and peak RSS, for relaybox and
//! for a stock nats-server leaf that stores the MQTT messages in a JetStream file stream.
//!
//! Run with `cargo bench --bench flash` (cargo builds `target/release/relaybox` first). This is
//! a command that prints figures, not a test: it fails only when a system cannot run (a server
//! does not start, PUBACKs or stored messages stop coming), and then it says why and shows the
//! last log lines of the servers involved.
//!
//! The systems (columns):
//!
//! - `relaybox 2ms`: relaybox with the default group-commit window (`commit_window_us` 2000),
//!   exporting `bench/#` to a hub nats-server with JetStream publish (as in `benches/mqtt_to_hub`).
//!   A record is appended to the redb outbox and PUBACKed after the commit's fdatasync, then
//!   deleted once the hub acknowledged it: both the append and the delete are counted.
//! - `relaybox 50ms`: the same with `commit_window_us = 50000`: fewer, larger commits (fewer
//!   bytes per message), for a longer PUBACK.
//! - `nats leaf`: a stock nats-server leaf node (MQTT needs JetStream, so the leaf has its own
//!   JetStream domain) linked to the same kind of hub, with a file-storage stream `EDGE` on the
//!   leaf over `bench.>` that captures the MQTT messages. The hub holds no stream for it: what is
//!   measured is the leaf's own process, and the leaf link carries messages only to interested
//!   subscribers, so it writes nothing on the leaf (a hub stream sourcing `EDGE` would add the
//!   source consumer's state; that setup is `sourced` in `benches/mqtt_to_hub`).
//!
//! For each system, on one fresh set of servers: peak RSS (VmHWM) idle (after start and one
//! warm-up message), then a 4-publisher flat-out QoS 1 load (peak RSS under load), then the paced
//! points: offered 100, 1,000 and 10,000 msg/s with 64- and 1024-byte payloads. A point publishes
//! for `FLASH_BENCH_SECONDS` (or until it has sent rate x seconds messages), waits for every
//! PUBACK and for every message to be stored (hub stream for relaybox — the outbox has then
//! deleted it — leaf stream for the leaf), waits one more second, and reads `/proc/PID/io`
//! `write_bytes` of the system's process. Bytes per message = write_bytes delta / messages.
//! `write_bytes` is charged when a page becomes dirty, so a page re-dirtied after each fdatasync
//! counts each time, and a page written again while still dirty counts once.
//!
//! Settings (environment):
//!   FLASH_BENCH_SECONDS  seconds of publishing per point (default 5; 2 for a quick run)
//!   FLASH_BENCH_STALL    abort when nothing is PUBACKed or stored for this long (default 20 s)
//!   FLASH_BENCH_SYSTEMS  comma list of relaybox,relaybox50,leaf (default all three)
//!   FLASH_BENCH_LOAD_MESSAGES  cap of the 4-publisher load (default 50000)
//!   BENCH_RELAYBOX, BENCH_NATS_SERVER, BENCH_TMPDIR, BENCH_RELAYBOX_LOG as in mqtt_to_hub.

mod common;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tempfile::TempDir;
use tokio::task::JoinHandle;

use common::{
    fetch_metrics, filesystem_of, load_average, machine, metric, nats_version, nodelay,
    percentile_ms, read_io, vm_hwm_mib, wait_for_port, Ports, Probe, Programs, Servers, HUB_STREAM,
    LEAF_STREAM, SETTLE,
};

/// The offered rates and payload sizes of the paced points.
const RATES: [u64; 3] = [100, 1_000, 10_000];
const PAYLOADS: [usize; 2] = [64, 1024];
/// Per-connection QoS 1 window: relaybox's default `[mqtt] max_inflight`.
const INFLIGHT: u16 = 100;
/// A paced point uses one publisher per started 1,000 msg/s (so 1, 1 and 10): with a 50 ms
/// commit window one connection's 100-message window carries 2,000 msg/s at most.
const RATE_PER_PUBLISHER: u64 = 1_000;
const LOAD_PUBLISHERS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Relaybox,
    Relaybox50,
    Leaf,
}

impl System {
    fn parse(s: &str) -> Result<System> {
        match s.trim() {
            "relaybox" => Ok(System::Relaybox),
            "relaybox50" => Ok(System::Relaybox50),
            "leaf" => Ok(System::Leaf),
            other => bail!("unknown system {other:?} (relaybox, relaybox50, leaf)"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            System::Relaybox => "relaybox (commit window 2 ms)",
            System::Relaybox50 => "relaybox (commit window 50 ms)",
            System::Leaf => "nats-server leaf, MQTT -> JetStream file stream",
        }
    }

    fn short(self) -> &'static str {
        match self {
            System::Relaybox => "relaybox 2ms",
            System::Relaybox50 => "relaybox 50ms",
            System::Leaf => "nats leaf",
        }
    }

    fn is_relaybox(self) -> bool {
        self != System::Leaf
    }
}

struct Settings {
    seconds: f64,
    stall: Duration,
    systems: Vec<System>,
    load_messages: usize,
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
                        "flash: bytes written per message and peak RSS, relaybox vs nats-server leaf\n\
                         usage: [FLASH_BENCH_SECONDS=5] cargo bench --bench flash\n\
                         see the top of benches/flash.rs for all settings"
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (settings are environment variables)"),
            }
        }
        let systems = var("FLASH_BENCH_SYSTEMS")
            .unwrap_or_else(|| "relaybox,relaybox50,leaf".into())
            .split(',')
            .map(System::parse)
            .collect::<Result<Vec<_>>>()?;
        Ok(Settings {
            seconds: num("FLASH_BENCH_SECONDS", 5.0)?,
            stall: Duration::from_secs_f64(num("FLASH_BENCH_STALL", 20.0)?),
            systems,
            load_messages: num("FLASH_BENCH_LOAD_MESSAGES", 50_000.0)? as usize,
            programs: Programs::from_env(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The systems
// ---------------------------------------------------------------------------------------------

/// One system's servers. Field order is drop order: the servers stop before their data directory
/// goes.
struct Rig {
    servers: Servers,
    system: System,
    /// Where the messages end up: the hub stream (relaybox) or the leaf stream (leaf).
    store_js: jetstream::Context,
    store_stream: &'static str,
    mqtt_port: u16,
    admin_port: u16,
    _dir: TempDir,
}

impl Rig {
    async fn stored(&self) -> Result<u64> {
        let mut s = self
            .store_js
            .get_stream(self.store_stream)
            .await
            .with_context(|| format!("stream {}", self.store_stream))?;
        Ok(s.info().await?.state.messages)
    }
}

async fn start_rig(system: System, s: &Settings, logs: &mut String) -> Result<Rig> {
    let dir = s.programs.data_dir("flash-")?;
    let ports = Ports::free()?;
    let (hub, hub_client) = common::start_hub(&s.programs, dir.path(), ports, logs).await?;
    let sut = if system.is_relaybox() {
        let window_us = if system == System::Relaybox50 {
            50_000
        } else {
            2_000
        };
        common::spawn_relaybox(&s.programs, dir.path(), ports, Some(window_us))?
    } else {
        common::spawn_leaf(&s.programs, dir.path(), ports)?
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
            system,
            store_js,
            store_stream,
            mqtt_port: ports.mqtt,
            admin_port: ports.sut,
            _dir: dir,
        }),
        Err(e) => {
            logs.push_str(&servers.logs());
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One measured point
// ---------------------------------------------------------------------------------------------

struct Point {
    publishers: usize,
    /// Total offered rate in msg/s; 0 = flat out.
    rate: u64,
    payload: usize,
    /// Upper bound of messages over all publishers.
    max_messages: usize,
}

#[derive(Debug, Clone, Default)]
struct Outcome {
    messages: usize,
    achieved_per_s: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    bytes_per_msg: f64,
    cancelled_per_msg: f64,
    /// relaybox only: records per commit and its own flash counter per message in this point.
    records_per_commit: Option<f64>,
    own_flash_per_msg: Option<f64>,
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

async fn measure(rig: &mut Rig, tag: &str, point: &Point, s: &Settings) -> Result<Outcome> {
    let base = Instant::now();
    let per_pub = point.max_messages.div_ceil(point.publishers);
    let mut pubs = Vec::new();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut clients = Vec::new();
    let mut connacks = Vec::new();
    for p in 0..point.publishers {
        let mut opts = MqttOptions::new(format!("flash-{tag}-p{p}"), "127.0.0.1", rig.mqtt_port);
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
        tasks.push(tokio::spawn(drive(
            events,
            me.clone(),
            base,
            connack.clone(),
        )));
        pubs.push(me);
        clients.push(client);
        connacks.push(connack);
    }
    let result = run_point(rig, point, s, base, &pubs, clients, &connacks, &mut tasks).await;
    for t in &tasks {
        t.abort();
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_point(
    rig: &mut Rig,
    point: &Point,
    s: &Settings,
    base: Instant,
    pubs: &[Arc<Pub>],
    clients: Vec<AsyncClient>,
    connacks: &[Arc<AtomicBool>],
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Outcome> {
    // Connect first (the leaf stores MQTT session state in JetStream): connecting is not counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !connacks.iter().all(|c| c.load(Ordering::Acquire)) {
        if Instant::now() > deadline {
            bail!("a publisher got no CONNACK within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = rig.servers.sut.pid();
    let stored_before = rig.stored().await?;
    let metrics_before = if rig.system.is_relaybox() {
        relaybox_counters(rig.admin_port).await.ok()
    } else {
        None
    };
    let io_before = read_io(pid)?;

    let started_ns = ns_since(base);
    let publish_end = Instant::now() + Duration::from_secs_f64(s.seconds);
    let per_rate = point.rate as f64 / point.publishers as f64;
    for (p, (client, me)) in clients.iter().zip(pubs).enumerate() {
        tasks.push(tokio::spawn(publish(
            client.clone(),
            format!("bench/p{p}"),
            me.clone(),
            point.payload,
            per_rate,
            base,
            publish_end,
        )));
    }

    // Wait for every PUBACK, then for every message to be stored.
    let mut last_change = Instant::now();
    let mut last_seen = (0, 0);
    let mut all_acked = false;
    let total_sent = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rig.servers.ensure_running()?;
        for (p, me) in pubs.iter().enumerate() {
            if let Some(f) = me.failure.lock().ok().and_then(|mut f| f.take()) {
                bail!("publisher {p}: {f}");
            }
        }
        let sent: usize = pubs.iter().map(|m| m.sent.load(Ordering::Acquire)).sum();
        let acked: usize = pubs.iter().map(|m| m.acked.load(Ordering::Acquire)).sum();
        let done = pubs.iter().all(|m| m.done.load(Ordering::Acquire));
        let stored = if all_acked {
            rig.stored().await?.saturating_sub(stored_before) as usize
        } else {
            0
        };
        if done && acked >= sent {
            all_acked = true;
            if stored >= sent {
                break sent;
            }
        }
        if (acked, stored) != last_seen {
            last_seen = (acked, stored);
            last_change = Instant::now();
        } else if last_change.elapsed() > s.stall {
            bail!(
                "stalled: nothing PUBACKed or stored for {:?} ({sent} sent, {acked} PUBACKed, \
                 {stored} stored in {})",
                s.stall,
                rig.store_stream
            );
        }
    };
    if total_sent == 0 {
        bail!("no message was sent");
    }
    tokio::time::sleep(SETTLE).await;
    rig.servers.ensure_running()?;
    let io_after = read_io(pid)?;
    let metrics_after = if metrics_before.is_some() {
        relaybox_counters(rig.admin_port).await.ok()
    } else {
        None
    };
    for c in &clients {
        let _ = c.try_disconnect();
    }

    let last_ack = pubs
        .iter()
        .map(|m| m.last_ack_ns.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let mut lat: Vec<u64> = pubs
        .iter()
        .flat_map(|m| m.latencies_ns.lock().map(|l| l.clone()).unwrap_or_default())
        .collect();
    lat.sort_unstable();
    let n = total_sent as f64;
    let (records_per_commit, own_flash_per_msg) = match (metrics_before, metrics_after) {
        (Some(b), Some(a)) => (
            Some((a.appended - b.appended) / (a.commits - b.commits).max(1.0)),
            Some((a.flash_bytes - b.flash_bytes) / n),
        ),
        _ => (None, None),
    };
    Ok(Outcome {
        messages: total_sent,
        achieved_per_s: n / (last_ack.saturating_sub(started_ns) as f64 / 1e9),
        ack_p50_ms: percentile_ms(&lat, 0.50),
        ack_p99_ms: percentile_ms(&lat, 0.99),
        bytes_per_msg: io_after.written_per_msg(&io_before, n),
        cancelled_per_msg: io_after.cancelled_per_msg(&io_before, n),
        records_per_commit,
        own_flash_per_msg,
    })
}

struct Counters {
    appended: f64,
    commits: f64,
    flash_bytes: f64,
}

/// relaybox's own counters from its admin `/metrics`.
async fn relaybox_counters(port: u16) -> Result<Counters> {
    let body = fetch_metrics(port).await?;
    let value = |name: &str| metric(&body, name).ok_or_else(|| anyhow!("/metrics has no {name}"));
    Ok(Counters {
        appended: value("relaybox_outbox_appended_total")?,
        commits: value("relaybox_outbox_commits_total")?,
        flash_bytes: value("relaybox_flash_bytes_written_total")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Running and reporting
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct SystemResult {
    idle_rss_mib: f64,
    load_rss_mib: f64,
    load: Outcome,
    /// (rate, payload, outcome) in the order of RATES x PAYLOADS.
    points: Vec<(u64, usize, Outcome)>,
}

async fn run_system(system: System, s: &Settings) -> Result<SystemResult, String> {
    let mut logs = String::new();
    let mut rig = match start_rig(system, s, &mut logs).await {
        Ok(r) => r,
        Err(e) => return Err(format!("starting the servers: {e:#}\n{logs}")),
    };
    let outcome = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut r = SystemResult {
            idle_rss_mib: vm_hwm_mib(rig.servers.sut.pid())?,
            ..Default::default()
        };
        println!("   idle peak RSS {:.1} MiB", r.idle_rss_mib);
        let load = Point {
            publishers: LOAD_PUBLISHERS,
            rate: 0,
            payload: 64,
            max_messages: s.load_messages,
        };
        r.load = measure(&mut rig, "load", &load, s)
            .await
            .context("4-publisher load")?;
        r.load_rss_mib = vm_hwm_mib(rig.servers.sut.pid())?;
        println!(
            "   4 publishers flat out: {} msgs, {:.0} msg/s, PUBACK p50 {:.2} ms, peak RSS {:.1} MiB, {:.0} B/msg",
            r.load.messages, r.load.achieved_per_s, r.load.ack_p50_ms, r.load_rss_mib, r.load.bytes_per_msg
        );
        for &payload in &PAYLOADS {
            for &rate in &RATES {
                let point = Point {
                    publishers: rate.div_ceil(RATE_PER_PUBLISHER) as usize,
                    rate,
                    payload,
                    max_messages: (rate as f64 * s.seconds).ceil() as usize,
                };
                let o = measure(&mut rig, &format!("{rate}-{payload}"), &point, s)
                    .await
                    .with_context(|| format!("{rate} msg/s of {payload} B"))?;
                println!(
                    "   {rate:>6} msg/s x {payload:>4} B: {} msgs, achieved {:.0} msg/s, PUBACK p50 {:.2} ms p99 {:.2} ms, \
                     {:.0} B written/msg{}",
                    o.messages,
                    o.achieved_per_s,
                    o.ack_p50_ms,
                    o.ack_p99_ms,
                    o.bytes_per_msg,
                    match (o.records_per_commit, o.own_flash_per_msg) {
                        (Some(c), Some(f)) =>
                            format!(" ({c:.1} appended/commit; relaybox counts {f:.0} B/msg itself)"),
                        _ => String::new(),
                    }
                );
                r.points.push((rate, payload, o));
            }
        }
        Ok::<_, anyhow::Error>(r)
    }
    .await;
    match outcome {
        Ok(r) => Ok(r),
        Err(e) => Err(format!("{e:#}\n{}", rig.servers.logs())),
    }
}

fn main() -> ExitCode {
    common::main("flash", Settings::load(), run)
}

async fn run(s: Settings) -> ExitCode {
    if !s.programs.nats_server.is_file() {
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
        // Bounded as a whole: start (< 2 min), the load and six points (each at most its
        // publishing time plus the stall limit, twice), margins.
        let limit = Duration::from_secs(180)
            + 7 * (Duration::from_secs_f64(s.seconds * 2.0) + 2 * s.stall + SETTLE);
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

fn report(results: &[(System, SystemResult)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if results.is_empty() {
        return out;
    }
    let header = |out: &mut String, first: &str| {
        let _ = write!(out, "| {first} |");
        for (sys, _) in results {
            let _ = write!(out, " {} |", sys.short());
        }
        let _ = write!(out, "\n|---|");
        for _ in results {
            let _ = write!(out, "---:|");
        }
        out.push('\n');
    };
    let _ = writeln!(
        out,
        "\n## Bytes written per message (write_bytes / messages), achieved msg/s, PUBACK p50 ms\n"
    );
    header(&mut out, "offered msg/s x payload");
    let n_points = results[0].1.points.len();
    for i in 0..n_points {
        let (rate, payload, _) = results[0].1.points[i];
        let _ = write!(out, "| {rate} x {payload} B |");
        for (_, r) in results {
            match r.points.get(i) {
                Some((_, _, o)) => {
                    let _ = write!(
                        out,
                        " **{:.0} B** ({:.0} msg/s, {:.2} ms) |",
                        o.bytes_per_msg, o.achieved_per_s, o.ack_p50_ms
                    );
                }
                None => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    let _ = writeln!(out, "\n## Peak RSS (VmHWM), MiB\n");
    header(&mut out, "");
    let _ = write!(out, "| idle (after start) |");
    for (_, r) in results {
        let _ = write!(out, " {:.1} |", r.idle_rss_mib);
    }
    let _ = write!(out, "\n| 4 publishers QoS 1, flat out, 64 B |");
    for (_, r) in results {
        let _ = write!(out, " {:.1} |", r.load_rss_mib);
    }
    let _ = write!(out, "\n| (that load: messages, msg/s, B written/msg) |");
    for (_, r) in results {
        let _ = write!(
            out,
            " {}, {:.0}, {:.0} |",
            r.load.messages, r.load.achieved_per_s, r.load.bytes_per_msg
        );
    }
    out.push('\n');

    let mut notes = String::new();
    for (sys, r) in results {
        for (rate, payload, o) in &r.points {
            if o.cancelled_per_msg >= 1.0 {
                let _ = writeln!(
                    notes,
                    "- {} {rate} x {payload} B: cancelled_write_bytes {:.0} B/msg (dirty pages \
                     truncated before writeback; not subtracted)",
                    sys.short(),
                    o.cancelled_per_msg
                );
            }
            if let Some(c) = o.records_per_commit {
                let _ = writeln!(
                    notes,
                    "- {} {rate} x {payload} B: {c:.1} records appended per commit (append and delete commits counted)",
                    sys.short()
                );
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n{notes}");
    }
    out
}

fn describe_machine(s: &Settings) -> String {
    format!(
        "# flash\n\
         machine:   {}\n\
         data dirs: {} ({})\n\
         nats:      {} ({})\n\
         relaybox:  {}\n\
         load:      {} (1, 5, 15 min averages at the start)\n\
         run:       {} s of publishing per point, QoS 1, inflight {INFLIGHT}, one publisher per \
         started {RATE_PER_PUBLISHER} msg/s\n",
        machine(),
        s.programs.tmp_root.display(),
        filesystem_of(&s.programs.tmp_root),
        s.programs.nats_server.display(),
        nats_version(&s.programs.nats_server),
        s.programs.relaybox.display(),
        load_average(),
        s.seconds,
    )
}
