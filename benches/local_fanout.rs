//! Local fan-out, no hub: one MQTT publisher, ten subscribers on one topic, relaybox against
//! Mosquitto.
//!
//! Run with `cargo bench --bench local_fanout` (cargo builds `target/release/relaybox` first, with
//! the release settings; fat LTO takes minutes). Like the other benches this prints figures and
//! fails only when a scenario cannot run.
//!
//! Per broker and QoS, a fresh broker on a free 127.0.0.1 port with a fresh data directory, so
//! that its peak RSS (VmHWM) belongs to that scenario alone:
//!
//! - `relaybox`: `relaybox run --config FILE` with no uplink (a local broker with a store),
//!   `allow_anonymous = true`, `[mqtt] max_queued_messages = Q`, and the byte bounds of a session's
//!   queue raised so that they never bind first: `max_queued_bytes` = messages × (payload + topic +
//!   64 B, relaybox's per-message accounting) + 1 MiB, and `max_queued_total_bytes` = subscribers ×
//!   that.
//! - `mosquitto`: Mosquitto (Debian 12: 2.0.11) with `listener PORT 127.0.0.1`,
//!   `allow_anonymous true`, `max_queued_messages Q` (its `max_queued_bytes` is unlimited by
//!   default), errors and warnings logged only.
//!
//! Q is `--max-queued` (100,000 by default), so that neither broker drops a message while a
//! subscriber lags. The in-flight window towards each subscriber is each broker's default
//! (relaybox `max_inflight` 100, Mosquitto `max_inflight_messages` 20) unless `--inflight N` sets
//! both to N. The output states every setting.
//!
//! Clients are rumqttc 0.25 (MQTT 3.1.1, clean session, TCP_NODELAY). The subscribers connect and
//! subscribe to `bench/fanout` with QoS q first; then the publisher sends `--messages` payloads at
//! QoS q flat out (QoS 1: up to `--pub-inflight` unacknowledged). Each payload carries a sequence
//! number and its send time. Figures:
//!
//! - delivered msg/s: all deliveries to all subscribers / (last delivery − first publish);
//! - per-subscriber counts: every subscriber must get every message; losses and duplicates are
//!   reported (not a failure: QoS 0 may lose);
//! - delivery latency p50 / p99: send time in the payload to the subscriber's receipt, over all
//!   deliveries;
//! - peak RSS: the broker's VmHWM after the run.
//!
//! When relaybox misses deliveries, the note under the table gives its own counters
//! (`messages_sent_total`, `session_dropped_total`, `session_queued_messages`, …) read from its
//! admin `/metrics` while every client is still connected: dropped, or still queued. A scenario
//! with losses does not meet the target whatever its rate.
//!
//! A run ends when every subscriber has every message, or when the publisher is done and nothing
//! was delivered for `--drain` seconds (then the losses are counted). It fails when nothing moves
//! for `--stall` seconds, after `--timeout`, or when the broker exits. Every child process is
//! stopped at the end (and killed if the bench dies).
//!
//! Options (after `--`), each also an environment variable:
//!
//! ```text
//!   --messages N       messages published per scenario     FANOUT_BENCH_MESSAGES    (100000)
//!   --payload BYTES    payload size, at least 16           FANOUT_BENCH_PAYLOAD     (64)
//!   --subscribers N    subscribers on the topic            FANOUT_BENCH_SUBSCRIBERS (10)
//!   --qos LIST         QoS levels, comma separated (0,1)   FANOUT_BENCH_QOS         (0,1)
//!   --systems LIST     relaybox,mosquitto (or r,m)         FANOUT_BENCH_SYSTEMS     (both)
//!   --max-queued N     both brokers' max_queued_messages   FANOUT_BENCH_MAX_QUEUED  (100000)
//!   --inflight N       both brokers' window per subscriber FANOUT_BENCH_INFLIGHT    (defaults)
//!   --pub-inflight N   publisher's QoS 1 window            FANOUT_BENCH_PUB_INFLIGHT (100)
//!   --drain SECS       end after the publisher is done and FANOUT_BENCH_DRAIN       (5)
//!                      nothing arrived for this long
//!   --stall SECS       fail when nothing moves this long   FANOUT_BENCH_STALL       (30)
//!   --timeout SECS     limit for one measurement           FANOUT_BENCH_TIMEOUT     (300)
//!   --keep             keep data directories and logs      FANOUT_BENCH_KEEP
//! ```
//!
//! `BENCH_RELAYBOX`, `BENCH_MOSQUITTO`, `BENCH_TMPDIR` and `BENCH_RELAYBOX_LOG` choose the
//! binaries, the data directory (default `target/bench-tmp`) and relaybox's `RUST_LOG`.
//! Short run: `cargo bench --bench local_fanout -- --messages 5000`.

#[allow(dead_code)]
mod common;
// `idle_connections` uses the rest of it (file-descriptor limit, VmRSS).
#[allow(dead_code)]
#[path = "common/local.rs"]
mod local;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use common::{load_average, machine, nodelay, percentile_ms, vm_hwm_mib, wait_for_port, Programs};
use local::{thousands, Broker, BrokerConfig};

const USAGE: &str = "\
local_fanout: 1 publisher -> N subscribers on one topic, relaybox against Mosquitto

usage: cargo bench --bench local_fanout [-- FLAGS]

  --messages N       messages published per scenario     FANOUT_BENCH_MESSAGES    (100000)
  --payload BYTES    payload size, at least 16           FANOUT_BENCH_PAYLOAD     (64)
  --subscribers N    subscribers on the topic            FANOUT_BENCH_SUBSCRIBERS (10)
  --qos LIST         QoS levels, comma separated (0,1)   FANOUT_BENCH_QOS         (0,1)
  --systems LIST     relaybox,mosquitto (or r,m)         FANOUT_BENCH_SYSTEMS     (both)
  --max-queued N     both brokers' max_queued_messages   FANOUT_BENCH_MAX_QUEUED  (100000)
  --inflight N       both brokers' window per subscriber FANOUT_BENCH_INFLIGHT    (each default)
  --pub-inflight N   publisher's QoS 1 window            FANOUT_BENCH_PUB_INFLIGHT (100)
  --drain SECS       end after the publisher is done and FANOUT_BENCH_DRAIN       (5)
                     nothing arrived for this long
  --stall SECS       fail when nothing moves this long   FANOUT_BENCH_STALL       (30)
  --timeout SECS     limit for one measurement           FANOUT_BENCH_TIMEOUT     (300)
  --keep             keep data directories and logs      FANOUT_BENCH_KEEP

  BENCH_RELAYBOX     relaybox binary (default: the one cargo just built)
  BENCH_MOSQUITTO    mosquitto binary (default: mosquitto on PATH, else /usr/sbin/mosquitto)
  BENCH_TMPDIR       where data directories go (default: target/bench-tmp)
  BENCH_RELAYBOX_LOG RUST_LOG for relaybox (default: warn)
";

const TOPIC: &str = "bench/fanout";
const MAGIC: &[u8; 4] = b"RBF1";
/// magic (4) + sequence (4) + send time in ns since the bench started (8).
const HEADER_LEN: usize = 16;

#[derive(Debug, Clone)]
struct Settings {
    messages: usize,
    payload: usize,
    subscribers: usize,
    qos: Vec<QoS>,
    systems: Vec<Broker>,
    max_queued: usize,
    inflight: Option<u16>,
    pub_inflight: u16,
    drain: Duration,
    stall: Duration,
    timeout: Duration,
    keep: bool,
    programs: Programs,
    mosquitto: std::path::PathBuf,
}

impl Settings {
    fn load() -> Result<Settings> {
        let raw = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut messages = raw("FANOUT_BENCH_MESSAGES");
        let mut payload = raw("FANOUT_BENCH_PAYLOAD");
        let mut subscribers = raw("FANOUT_BENCH_SUBSCRIBERS");
        let mut qos = raw("FANOUT_BENCH_QOS");
        let mut systems = raw("FANOUT_BENCH_SYSTEMS");
        let mut max_queued = raw("FANOUT_BENCH_MAX_QUEUED");
        let mut inflight = raw("FANOUT_BENCH_INFLIGHT");
        let mut pub_inflight = raw("FANOUT_BENCH_PUB_INFLIGHT");
        let mut drain = raw("FANOUT_BENCH_DRAIN");
        let mut stall = raw("FANOUT_BENCH_STALL");
        let mut timeout = raw("FANOUT_BENCH_TIMEOUT");
        let mut keep = raw("FANOUT_BENCH_KEEP").is_some_and(|v| v != "0");

        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let slot = match flag.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => continue,
                "--keep" => {
                    keep = true;
                    continue;
                }
                "--help" | "-h" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                "--messages" => &mut messages,
                "--payload" => &mut payload,
                "--subscribers" => &mut subscribers,
                "--qos" => &mut qos,
                "--systems" => &mut systems,
                "--max-queued" => &mut max_queued,
                "--inflight" => &mut inflight,
                "--pub-inflight" => &mut pub_inflight,
                "--drain" => &mut drain,
                "--stall" => &mut stall,
                "--timeout" => &mut timeout,
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            };
            let value = match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?,
            };
            *slot = Some(value);
        }

        use crate::common::num;

        let messages: usize = num("messages", messages, 100_000)?;
        let payload: usize = num("payload", payload, 64)?;
        let subscribers: usize = num("subscribers", subscribers, 10)?;
        let qos = qos
            .unwrap_or_else(|| "0,1".to_owned())
            .split(',')
            .map(|q| match q.trim() {
                "0" => Ok(QoS::AtMostOnce),
                "1" => Ok(QoS::AtLeastOnce),
                other => bail!("qos: {other:?} is not 0 or 1"),
            })
            .collect::<Result<Vec<_>>>()?;
        let systems = Broker::parse_list(systems.as_deref().unwrap_or("relaybox,mosquitto"))?;
        if payload < HEADER_LEN {
            bail!("payload must be at least {HEADER_LEN} bytes: it carries sequence and send time");
        }
        if messages == 0 || messages > u32::MAX as usize {
            bail!("messages must be between 1 and {}", u32::MAX);
        }
        if subscribers == 0 || subscribers > 1000 {
            bail!("subscribers must be between 1 and 1000");
        }
        if qos.is_empty() || systems.is_empty() {
            bail!("no QoS level or no system to run");
        }
        Ok(Settings {
            messages,
            payload,
            subscribers,
            qos,
            systems,
            max_queued: num("max-queued", max_queued, 100_000)?,
            inflight: inflight
                .map(|v| num("inflight", Some(v), 0u16))
                .transpose()?,
            pub_inflight: num("pub-inflight", pub_inflight, 100)?,
            drain: Duration::from_secs(num("drain", drain, 5)?),
            stall: Duration::from_secs(num("stall", stall, 30)?),
            timeout: Duration::from_secs(num("timeout", timeout, 300)?),
            keep,
            programs: Programs::from_env(),
            mosquitto: local::mosquitto_program(),
        })
    }

    /// relaybox's `[mqtt]` queue bounds for this run: messages, bytes per session, bytes in all.
    fn relaybox_queue(&self) -> (usize, usize, usize) {
        let per_message = self.payload + TOPIC.len() + 64;
        let session = self.messages.max(self.max_queued) * per_message + (1 << 20);
        (self.max_queued, session, session * self.subscribers)
    }

    fn broker_config(&self) -> (String, String) {
        let (messages, bytes, total) = self.relaybox_queue();
        let mut relaybox = format!(
            "max_queued_messages = {messages}\nmax_queued_bytes = {bytes}\n\
             max_queued_total_bytes = {total}\n"
        );
        let mut mosquitto = format!("max_queued_messages {}\n", self.max_queued);
        if let Some(n) = self.inflight {
            relaybox.push_str(&format!("max_inflight = {n}\n"));
            mosquitto.push_str(&format!("max_inflight_messages {n}\n"));
        }
        (relaybox, mosquitto)
    }
}

fn qos_number(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn now_ns(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------------
// Subscribers and the publisher
// ---------------------------------------------------------------------------------------------

/// What one subscriber saw.
struct Received {
    count: usize,
    duplicates: usize,
    foreign: usize,
    first_ns: u64,
    last_ns: u64,
    latencies_ns: Vec<u64>,
    error: Option<String>,
}

/// Drives one subscriber: subscribes, reports the SUBACK, then records every delivery until it
/// has all `expected` messages or `stop` fires.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    mut events: EventLoop,
    client: AsyncClient,
    qos: QoS,
    expected: usize,
    subscribed: oneshot::Sender<()>,
    progress: Arc<AtomicUsize>,
    base: Instant,
    stop: CancellationToken,
) -> Received {
    let mut out = Received {
        count: 0,
        duplicates: 0,
        foreign: 0,
        first_ns: 0,
        last_ns: 0,
        latencies_ns: Vec::with_capacity(expected),
        error: None,
    };
    if let Err(e) = client.subscribe(TOPIC, qos).await {
        out.error = Some(format!("subscribe request failed: {e}"));
        return out;
    }
    let mut subscribed = Some(subscribed);
    let mut seen = vec![false; expected];
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(tx) = subscribed.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let now = now_ns(base);
                let b = &p.payload;
                if b.len() < HEADER_LEN || &b[..4] != MAGIC {
                    out.foreign += 1;
                    continue;
                }
                let seq = u32::from_be_bytes(b[4..8].try_into().unwrap_or_default()) as usize;
                let sent = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
                if seq >= expected {
                    out.foreign += 1;
                    continue;
                }
                if seen[seq] {
                    out.duplicates += 1;
                    continue;
                }
                seen[seq] = true;
                if out.count == 0 {
                    out.first_ns = now;
                }
                out.count += 1;
                out.last_ns = now;
                out.latencies_ns.push(now.saturating_sub(sent));
                progress.fetch_add(1, Ordering::Relaxed);
                if out.count == expected {
                    // Flush the last PUBACK (QoS 1) before leaving the connection alone.
                    let _ = tokio::time::timeout(Duration::from_millis(100), events.poll()).await;
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                out.error = Some(format!(
                    "connection failed after {} messages: {e}",
                    out.count
                ));
                break;
            }
        }
    }
    let _ = client.try_disconnect();
    out
}

/// The publisher's connection: reports the CONNACK, counts PUBACKs (QoS 1) or publishes written
/// to the socket (QoS 0), and keeps polling until `stop` so that the connection stays up.
#[allow(clippy::too_many_arguments)]
async fn publisher_events(
    mut events: EventLoop,
    qos: QoS,
    expected: usize,
    connected: oneshot::Sender<()>,
    done: Arc<AtomicBool>,
    done_ns: Arc<AtomicU64>,
    base: Instant,
    stop: CancellationToken,
) -> Result<()> {
    let mut connected = Some(connected);
    let mut count = 0;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            event = events.poll() => event,
        };
        let counted = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
                false
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => qos == QoS::AtLeastOnce,
            Ok(Event::Outgoing(Outgoing::Publish(_))) => qos == QoS::AtMostOnce,
            Ok(_) => false,
            Err(e) => {
                bail!("publisher: connection failed after {count} of {expected} messages: {e}")
            }
        };
        if counted {
            count += 1;
            if count == expected {
                done_ns.store(now_ns(base), Ordering::Release);
                done.store(true, Ordering::Release);
            }
        }
    }
}

async fn publish_all(
    client: AsyncClient,
    qos: QoS,
    messages: usize,
    payload_len: usize,
    base: Instant,
) -> Result<()> {
    for seq in 0..messages {
        let mut payload = Vec::with_capacity(payload_len);
        payload.extend_from_slice(MAGIC);
        payload.extend_from_slice(&(seq as u32).to_be_bytes());
        payload.extend_from_slice(&now_ns(base).to_be_bytes());
        payload.resize(payload_len, b'x');
        client
            .publish(TOPIC, qos, false, payload)
            .await
            .map_err(|e| anyhow!("publisher: publish {seq} failed: {e}"))?;
    }
    Ok(())
}

fn options(client_id: String, port: u16, inflight: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(inflight);
    opts
}

// ---------------------------------------------------------------------------------------------
// One scenario
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Row {
    broker: Broker,
    qos: u8,
    delivered: usize,
    expected: usize,
    counts: Vec<usize>,
    duplicates: usize,
    foreign: usize,
    per_s: f64,
    publish_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
    ended: String,
}

async fn scenario(broker: Broker, qos: QoS, s: &Settings) -> Result<Row, (anyhow::Error, String)> {
    let dir = s
        .programs
        .data_dir("local_fanout-")
        .map_err(|e| (e, String::new()))?;
    let [mqtt_port, admin_port] = common::free_ports::<2>().map_err(|e| (e, String::new()))?;
    let (relaybox_mqtt, mosquitto) = s.broker_config();
    let config = BrokerConfig {
        relaybox_mqtt: &relaybox_mqtt,
        mosquitto: &mosquitto,
    };
    let mut proc = local::spawn_broker(
        broker,
        &s.programs,
        &s.mosquitto,
        dir.path(),
        mqtt_port,
        admin_port,
        &config,
    )
    .map_err(|e| (e, String::new()))?;
    let outcome = async {
        wait_for_port(mqtt_port, &mut [&mut proc], "the broker").await?;
        measure(&mut proc, broker, qos, mqtt_port, admin_port, s).await
    }
    .await
    .map_err(|e| (e, proc.log_tail(20)));
    drop(proc);
    if s.keep {
        println!("   kept {}", dir.keep().display());
    }
    outcome
}

async fn measure(
    proc: &mut common::Proc,
    broker: Broker,
    qos: QoS,
    port: u16,
    admin_port: u16,
    s: &Settings,
) -> Result<Row> {
    let base = Instant::now();
    let stop = CancellationToken::new();
    let mut subs: Vec<(JoinHandle<Received>, Arc<AtomicUsize>)> = Vec::new();
    let mut acks = Vec::new();
    for i in 0..s.subscribers {
        let (client, mut events) = AsyncClient::new(options(format!("fanout-s{i}"), port, 100), 16);
        events.set_network_options(nodelay());
        let (tx, rx) = oneshot::channel();
        let progress = Arc::new(AtomicUsize::new(0));
        subs.push((
            tokio::spawn(subscriber(
                events,
                client,
                qos,
                s.messages,
                tx,
                progress.clone(),
                base,
                stop.clone(),
            )),
            progress,
        ));
        acks.push(rx);
    }
    let (client, mut events) =
        AsyncClient::new(options("fanout-pub".into(), port, s.pub_inflight), 64);
    events.set_network_options(nodelay());
    let (ctx, crx) = oneshot::channel();
    let done = Arc::new(AtomicBool::new(false));
    let done_ns = Arc::new(AtomicU64::new(0));
    let driver = tokio::spawn(publisher_events(
        events,
        qos,
        s.messages,
        ctx,
        done.clone(),
        done_ns.clone(),
        base,
        stop.clone(),
    ));
    let mut sender: Option<JoinHandle<Result<()>>> = None;

    let result = async {
        for (i, rx) in acks.into_iter().enumerate() {
            match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(())) => {}
                _ => bail!("subscriber {i} got no SUBACK within 10 s"),
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), crx).await {
            Ok(Ok(())) => {}
            _ => bail!("the publisher got no CONNACK within 10 s"),
        }
        let started = now_ns(base);
        sender = Some(tokio::spawn(publish_all(
            client, qos, s.messages, s.payload, base,
        )));
        // Watch until every subscriber has every message, or the publisher is done and nothing
        // more arrives for `drain`.
        let total = s.messages * s.subscribers;
        let begin = Instant::now();
        let mut last_seen = (0, false);
        let mut last_progress = Instant::now();
        let ended = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            proc.ensure_running().context("during the run")?;
            let delivered: usize = subs.iter().map(|(_, p)| p.load(Ordering::Relaxed)).sum();
            let published = done.load(Ordering::Acquire);
            if delivered >= total {
                // The last PUBACKs (QoS 1) may still be on their way: wait for them, briefly.
                let until = Instant::now() + Duration::from_secs(10);
                while !done.load(Ordering::Acquire) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                break "all delivered".to_owned();
            }
            let state = format!(
                "{delivered} of {total} delivered, publisher {}",
                if published { "done" } else { "not done" }
            );
            if let Some(d) = sender.take_if(|d| d.is_finished()) {
                match d.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.context(state)),
                    Err(e) => bail!("the publishing task failed: {e} ({state})"),
                }
            }
            if driver.is_finished() {
                bail!("the publisher's connection ended ({state})");
            }
            if (delivered, published) != last_seen {
                last_seen = (delivered, published);
                last_progress = Instant::now();
            } else if published && last_progress.elapsed() > s.drain {
                break format!(
                    "nothing more arrived for {:?} after the publisher was done",
                    s.drain
                );
            } else if last_progress.elapsed() > s.stall {
                bail!("stalled: nothing moved for {:?} ({state})", s.stall);
            }
            if begin.elapsed() > s.timeout {
                bail!("time limit of {:?} reached ({state})", s.timeout);
            }
        };
        Ok((started, ended))
    }
    .await;

    // Where missing deliveries went, in relaybox's own counters, read while every client is
    // still connected.
    let mut broker_notes = Vec::new();
    let delivered_now: usize = subs.iter().map(|(_, p)| p.load(Ordering::Relaxed)).sum();
    if broker == Broker::Relaybox && result.is_ok() && delivered_now < s.messages * s.subscribers {
        match common::fetch_metrics(admin_port).await {
            Ok(body) => {
                let m = |name: &str| common::metric(&body, name).unwrap_or(f64::NAN);
                broker_notes.push(format!(
                    "relaybox /metrics before the clients left: messages_received_total {}, \
                     messages_sent_total {}, session_dropped_total {}, session_queued_messages {}, \
                     mqtt_clients_connected {}",
                    m("relaybox_messages_received_total"),
                    m("relaybox_messages_sent_total"),
                    m("relaybox_session_dropped_total"),
                    m("relaybox_session_queued_messages"),
                    m("relaybox_mqtt_clients_connected")
                ));
            }
            Err(e) => broker_notes.push(format!("relaybox /metrics unavailable: {e:#}")),
        }
    }
    stop.cancel();
    if let Some(d) = sender.take() {
        d.abort();
    }
    let driver_result = tokio::time::timeout(Duration::from_secs(5), driver).await;
    let mut received = Vec::new();
    for (i, (h, _)) in subs.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(r)) => received.push(r),
            Ok(Err(e)) => bail!("subscriber {i} task failed: {e}"),
            Err(_) => bail!("subscriber {i} did not stop within 5 s"),
        }
    }
    let (started, ended) = result?;
    if let Ok(Ok(Err(e))) = driver_result {
        bail!(e);
    }
    proc.ensure_running()?;
    let rss_mib = vm_hwm_mib(proc.pid())?;

    let delivered: usize = received.iter().map(|r| r.count).sum();
    let last = received.iter().map(|r| r.last_ns).max().unwrap_or(0);
    let mut lat: Vec<u64> = Vec::with_capacity(delivered);
    let mut notes = Vec::new();
    for (i, r) in received.iter_mut().enumerate() {
        lat.append(&mut r.latencies_ns);
        if let Some(e) = &r.error {
            notes.push(format!("subscriber {i}: {e}"));
        }
    }
    lat.sort_unstable();
    let published_ns = done_ns.load(Ordering::Acquire);
    let publish_per_s = if published_ns > started {
        s.messages as f64 / ((published_ns - started) as f64 / 1e9)
    } else {
        f64::NAN
    };
    let mut ended = ended;
    notes.extend(broker_notes);
    if !notes.is_empty() {
        ended.push_str("; ");
        ended.push_str(&notes.join("; "));
    }
    Ok(Row {
        broker,
        qos: qos_number(qos),
        delivered,
        expected: s.messages * s.subscribers,
        counts: received.iter().map(|r| r.count).collect(),
        duplicates: received.iter().map(|r| r.duplicates).sum(),
        foreign: received.iter().map(|r| r.foreign).sum(),
        per_s: delivered as f64 / (last.saturating_sub(started) as f64 / 1e9),
        publish_per_s,
        p50_ms: percentile_ms(&lat, 0.50),
        p99_ms: percentile_ms(&lat, 0.99),
        rss_mib,
        ended,
    })
}

// ---------------------------------------------------------------------------------------------
// Running and printing
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    common::main("local_fanout", Settings::load(), run)
}

async fn run(s: Settings) -> ExitCode {
    for &b in &s.systems {
        if let Err(e) = local::check_broker(b, &s.programs, &s.mosquitto) {
            eprintln!("local_fanout: {e:#}");
            return ExitCode::from(2);
        }
    }
    let (relaybox_mqtt, mosquitto) = s.broker_config();
    println!(
        "# local_fanout\n\
         machine:   {}\n\
         load:      {} (1, 5, 15 min averages at the start)\n\
         relaybox:  {} (data in {})\n\
         mosquitto: {} ({})\n\
         run:       1 publisher -> {} subscribers on {TOPIC:?}, {} messages x {} bytes, QoS {:?} \
         (publish QoS = subscription QoS), publisher window {} (QoS 1)\n\
         relaybox [mqtt]: {} (max_inflight {})\n\
         mosquitto.conf:  listener PORT 127.0.0.1; allow_anonymous true; {} (max_queued_bytes \
         unlimited, max_inflight_messages {}); {}",
        machine(),
        load_average(),
        s.programs.relaybox.display(),
        s.programs.tmp_root.display(),
        s.mosquitto.display(),
        local::mosquitto_version(&s.mosquitto),
        s.subscribers,
        thousands(s.messages as u64),
        s.payload,
        s.qos.iter().map(|q| qos_number(*q)).collect::<Vec<_>>(),
        s.pub_inflight,
        relaybox_mqtt.trim().replace('\n', "; "),
        s.inflight
            .map_or("100, its default".to_owned(), |n| n.to_string()),
        mosquitto.trim().replace('\n', "; "),
        s.inflight
            .map_or("20, its default".to_owned(), |n| n.to_string()),
        local::MOSQUITTO_LOGGING.trim().replace('\n', "; "),
    );
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &qos in &s.qos {
        for &broker in &s.systems {
            println!(
                "\n== {} — QoS {}, 1 -> {} subscribers, {} messages",
                broker.label(),
                qos_number(qos),
                s.subscribers,
                thousands(s.messages as u64)
            );
            println!("   load average before: {}", load_average());
            let limit = s.timeout + Duration::from_secs(120);
            let outcome = match tokio::time::timeout(limit, scenario(broker, qos, &s)).await {
                Ok(o) => o,
                Err(_) => Err((anyhow!("scenario exceeded {limit:?} in all"), String::new())),
            };
            match outcome {
                Ok(row) => {
                    println!(
                        "   {:.0} deliveries/s, {} of {} delivered ({}), latency p50 {:.2} ms, \
                         p99 {:.2} ms, peak RSS {:.1} MiB; {}",
                        row.per_s,
                        thousands(row.delivered as u64),
                        thousands(row.expected as u64),
                        counts(&row.counts, s.messages),
                        row.p50_ms,
                        row.p99_ms,
                        row.rss_mib,
                        row.ended
                    );
                    rows.push(row);
                }
                Err((e, logs)) => {
                    println!("   FAILED: {e:#}");
                    if !logs.is_empty() {
                        println!("{logs}");
                    }
                    failures.push((broker, qos_number(qos), format!("{e:#}")));
                }
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

/// `all 10 got 100,000`, or each subscriber's count when they differ.
fn counts(counts: &[usize], expected: usize) -> String {
    if counts.iter().all(|&c| c == expected) {
        format!("all {} got {}", counts.len(), thousands(expected as u64))
    } else {
        let list: Vec<String> = counts.iter().map(|&c| thousands(c as u64)).collect();
        format!("per subscriber: {}", list.join(" "))
    }
}

fn report(rows: &[Row], failures: &[(Broker, u8, String)], s: &Settings) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Results: 1 publisher -> {} subscribers, {} messages of {} bytes per scenario\n",
        s.subscribers,
        thousands(s.messages as u64),
        s.payload
    );
    let _ = writeln!(
        out,
        "| system | QoS | delivered msg/s | published msg/s | delivered | lost | duplicates | min / max per subscriber | latency p50 ms | latency p99 ms | peak RSS MiB |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let min = r.counts.iter().min().copied().unwrap_or(0);
        let max = r.counts.iter().max().copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} / {} | {:.2} | {:.2} | {:.1} |",
            r.broker.label(),
            r.qos,
            r.per_s,
            r.publish_per_s,
            thousands(r.delivered as u64),
            thousands(r.expected.saturating_sub(r.delivered) as u64),
            r.duplicates,
            thousands(min as u64),
            thousands(max as u64),
            r.p50_ms,
            r.p99_ms,
            r.rss_mib
        );
    }
    for (b, q, why) in failures {
        let _ = writeln!(
            out,
            "| {} | {q} | FAILED: {} | | | | | | | | |",
            b.label(),
            why.replace('|', "/").lines().next().unwrap_or_default()
        );
    }
    let mut ratios = String::new();
    for r in rows.iter().filter(|r| r.broker == Broker::Relaybox) {
        if let Some(m) = rows
            .iter()
            .find(|m| m.broker == Broker::Mosquitto && m.qos == r.qos)
        {
            let ratio = r.per_s / m.per_s;
            let lost = |x: &Row| x.expected.saturating_sub(x.delivered);
            let verdict = if lost(r) > 0 {
                format!("missed: relaybox lost {}", thousands(lost(r) as u64))
            } else if lost(m) > 0 {
                format!("mosquitto lost {}", thousands(lost(m) as u64))
            } else if ratio >= 1.0 {
                "met".to_owned()
            } else {
                "missed".to_owned()
            };
            let _ = writeln!(
                ratios,
                "| {} | {:.2} | {verdict} | {:.2} | {:.2} | {:.2} |",
                r.qos,
                ratio,
                r.p50_ms / m.p50_ms,
                r.p99_ms / m.p99_ms,
                r.rss_mib / m.rss_mib
            );
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "\nrelaybox / mosquitto (target: delivered msg/s >= 1.00; for latency and RSS less is \
             better):\n\n| QoS | delivered msg/s | target | latency p50 | latency p99 | peak RSS |\n\
             |---:|---:|:-:|---:|---:|---:|"
        );
        out.push_str(&ratios);
    }
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| r.foreign > 0 || r.ended != "all delivered")
        .map(|r| {
            format!(
                "- {}, QoS {}: {}{}",
                r.broker.label(),
                r.qos,
                r.ended,
                if r.foreign > 0 {
                    format!("; {} unexpected messages", r.foreign)
                } else {
                    String::new()
                }
            )
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n{}", notes.join("\n"));
    }
    let _ = writeln!(
        out,
        "\ndelivered msg/s: deliveries to all subscribers / (last delivery - first publish). \
         published msg/s: messages / (last PUBACK (QoS 1) or last publish written (QoS 0) - first \
         publish). latency: send time in the payload to receipt, over all deliveries. lost: \
         messages x subscribers - distinct deliveries. peak RSS: VmHWM of the broker."
    );
    out
}
