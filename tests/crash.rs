//! SIGKILL under load: four MQTT publishers send QoS 1 messages without pause while the relay is
//! killed with SIGKILL again and again (at a seeded pseudo-random moment 100–700 ms into the
//! load) and restarted on the same data dir and ports. At the end the hub stream must hold every
//! message the relay acknowledged with a PUBACK exactly once, no message twice, and nothing that
//! was never published.
//!
//! A publisher never sends a message again: after a kill it connects with a clean session and
//! new packets, and a message that had no PUBACK counts as possibly lost (it may or may not be in
//! the hub, but at most once). So a duplicate in the hub can only come from the relay sending a
//! record again under a new `Nats-Msg-Id` (the hub drops one sent again with the same id within
//! the stream's duplicate window, which the test checks is longer than its run), and a loss from
//! an acknowledged record that did not survive the crash or whose id was given again to another.
//!
//! Two tests of [`KILLS`] kills each run in parallel, each with its own relay and hub. The kill
//! moments come from a seed, printed by each test; `RELAYBOX_CRASH_SEED` sets it (for a longer
//! run, run the tests again with other seeds).

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    read_stream, stream_duplicate_window, wait_outbox_empty, wait_stream_exists, wait_until,
    HubMsg, NatsHub, Relay, RelayConfig, PREFIX, STREAM,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

const PUBLISHERS: usize = 4;
/// QoS 1 publishes one publisher keeps awaiting their PUBACK.
const WINDOW: usize = 16;
/// Kills per test (two tests).
const KILLS: u64 = 25;
const DEFAULT_SEED: u64 = 0x6B11_1009;
/// When, after the load resumed following a (re)start, the relay is killed.
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 100..=700;
/// How long the load may take to resume after a (re)start: reconnect and a first PUBACK.
const RESUME_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a publisher waits between connection attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);
/// A connection silent this long (no ack, no ping answer) is given up.
const SILENCE: Duration = Duration::from_secs(10);
/// The most one test may take; every wait in it is bounded by this or less.
const BUDGET: Duration = Duration::from_secs(240);

fn seed() -> u64 {
    std::env::var("RELAYBOX_CRASH_SEED").map_or(DEFAULT_SEED, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("RELAYBOX_CRASH_SEED={v:?} is not a number"))
    })
}

fn topic(publisher: usize) -> String {
    format!("sensors/crash/p{publisher}")
}

fn payload(publisher: usize, n: u64) -> String {
    format!("p{publisher}-{n}")
}

/// (publisher, n) of a payload made by [`payload`].
fn parse_payload(p: &str) -> Option<(usize, u64)> {
    let (publisher, n) = p.strip_prefix('p')?.split_once('-')?;
    Some((publisher.parse().ok()?, n.parse().ok()?))
}

/// What one publisher did.
#[derive(Debug, Default)]
struct Tally {
    /// Messages `0..attempted` were handed to the MQTT client (sent or not).
    attempted: u64,
    /// The messages that got a PUBACK.
    acked: HashSet<u64>,
    /// Connections the relay accepted (CONNACK).
    connections: u64,
}

/// The messages of one connection between being handed to the client and their PUBACK.
#[derive(Default)]
struct Session {
    /// Handed to the client, not yet written by its event loop (in request order).
    queued: VecDeque<u64>,
    /// Written, awaiting the PUBACK, by packet id.
    in_flight: HashMap<u16, u64>,
    /// Taken by the event loop but held back: its packet id was still in flight.
    collided: Option<(u16, u64)>,
}

impl Session {
    fn unfinished(&self) -> usize {
        self.queued.len() + self.in_flight.len() + usize::from(self.collided.is_some())
    }

    fn note(&mut self, event: &Event, tally: &mut Tally, acks: &AtomicU64) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => tally.connections += 1,
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let n = match self.collided {
                    Some((held, n)) if held == *pkid => {
                        self.collided = None;
                        n
                    }
                    _ => self
                        .queued
                        .pop_front()
                        .expect("a written publish was queued"),
                };
                self.in_flight.insert(*pkid, n);
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                let n = self.queued.pop_front().expect("a held publish was queued");
                self.collided = Some((*pkid, n));
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let n = self.in_flight.remove(&ack.pkid).unwrap_or_else(|| {
                    panic!("PUBACK for packet id {} that is not in flight", ack.pkid)
                });
                tally.acked.insert(n);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// One connection of publisher `p`: keeps [`WINDOW`] messages in flight until the connection
/// fails, or, once `stop` is set, until every message it sent was acknowledged. Returns true in
/// the second case. Messages without PUBACK are never sent again (the event loop is dropped).
async fn one_connection(
    p: usize,
    port: u16,
    tally: &mut Tally,
    stop: &AtomicBool,
    acks: &AtomicU64,
    deadline: Instant,
) -> bool {
    let mut opts = MqttOptions::new(format!("crash-pub{p}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(true);
    opts.set_inflight(WINDOW as u16);
    let (client, mut eventloop) = AsyncClient::new(opts, 2 * WINDOW);
    let mut session = Session::default();
    let mut connected = false;
    let mut finished = false;
    while Instant::now() < deadline {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping && session.unfinished() == 0 {
            finished = true;
            break;
        }
        while connected && !stopping && session.unfinished() < WINDOW {
            let n = tally.attempted;
            client
                .try_publish(topic(p), QoS::AtLeastOnce, false, payload(p, n))
                .expect("the request channel has room for the window");
            tally.attempted += 1;
            session.queued.push_back(n);
        }
        match tokio::time::timeout(SILENCE, eventloop.poll()).await {
            Ok(Ok(event)) => {
                connected |= matches!(event, Event::Incoming(Packet::ConnAck(_)));
                session.note(&event, tally, acks);
            }
            // Killed relay, refused connection or silence: this connection is over.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // Packets the event loop parsed before it failed (e.g. PUBACKs read with the EOF).
    for event in std::mem::take(&mut eventloop.state.events) {
        session.note(&event, tally, acks);
    }
    if finished {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
    finished
}

/// Publisher `p`: connection after connection until `stop` (or the deadline).
async fn publisher(
    p: usize,
    port: u16,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        if one_connection(p, port, &mut tally, &stop, &acks, deadline).await
            || stop.load(Ordering::SeqCst)
        {
            break;
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
    tally
}

/// The four publishers, running.
struct Load {
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Load {
    fn start(port: u16, deadline: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let tasks = (0..PUBLISHERS)
            .map(|p| tokio::spawn(publisher(p, port, stop.clone(), acks.clone(), deadline)))
            .collect();
        Load { stop, acks, tasks }
    }

    /// PUBACKs so far, all publishers.
    fn acks(&self) -> u64 {
        self.acks.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until a PUBACK arrives after `before` were counted.
    async fn wait_resumed(&self, before: u64, what: &str) {
        assert!(
            wait_until(RESUME_TIMEOUT, || self.acks() > before).await,
            "no PUBACK within {RESUME_TIMEOUT:?} after {what}"
        );
    }

    /// Stops sending, lets the messages in flight be acknowledged and returns every tally.
    async fn stop(self) -> Vec<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        let mut tallies = Vec::new();
        for task in self.tasks {
            let tally = tokio::time::timeout(SILENCE * 2, task)
                .await
                .expect("a publisher ends in time once stopped")
                .expect("publisher task");
            tallies.push(tally);
        }
        tallies
    }
}

/// What the hub stream holds, against what the publishers did.
struct Verdict {
    acked: usize,
    in_hub: usize,
    unacked_present: usize,
}

/// Every acknowledged payload exactly once, no payload twice, nothing never published.
fn check_stream(tallies: &[Tally], msgs: &[HubMsg]) -> Verdict {
    // (publisher, n) → stream sequence and message id of its first copy.
    let mut first: HashMap<(usize, u64), (u64, Option<&str>)> = HashMap::new();
    let mut twice = Vec::new();
    let mut unexpected = Vec::new();
    for m in msgs {
        let p = m.payload_str();
        let known = parse_payload(&p).filter(|&(publisher, n)| {
            publisher < tallies.len()
                && n < tallies[publisher].attempted
                && m.subject == format!("{PREFIX}.{}", topic(publisher).replace('/', "."))
        });
        let Some(key) = known else {
            unexpected.push(format!("{p:?} on {} (seq {})", m.subject, m.seq));
            continue;
        };
        let id = m.header("Nats-Msg-Id");
        if let Some((seq, first_id)) = first.insert(key, (m.seq, id)) {
            twice.push(format!(
                "{p:?} at seq {seq} (Nats-Msg-Id {first_id:?}) and {} ({id:?})",
                m.seq
            ));
        }
    }
    let mut missing = Vec::new();
    for (publisher, tally) in tallies.iter().enumerate() {
        let mut lost: Vec<u64> = tally
            .acked
            .iter()
            .copied()
            .filter(|n| !first.contains_key(&(publisher, *n)))
            .collect();
        lost.sort_unstable();
        missing.extend(lost.into_iter().map(|n| payload(publisher, n)));
    }
    let sample = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
    assert!(
        missing.is_empty() && twice.is_empty() && unexpected.is_empty(),
        "hub stream of {} messages: {} acknowledged missing [{}]; {} twice [{}]; {} never \
         published [{}]",
        msgs.len(),
        missing.len(),
        sample(&missing),
        twice.len(),
        sample(&twice),
        unexpected.len(),
        sample(&unexpected),
    );
    let acked = tallies.iter().map(|t| t.acked.len()).sum();
    Verdict {
        acked,
        in_hub: msgs.len(),
        unacked_present: msgs.len() - acked,
    }
}

/// One relay and one hub; [`KILLS`] SIGKILLs under load, then the check.
async fn kills_under_load(test: u64) {
    let started = Instant::now();
    let deadline = started + BUDGET;
    let base_seed = seed();
    let mut rng = StdRng::seed_from_u64(base_seed.wrapping_add(test));
    let tag = format!("crash test {test} (RELAYBOX_CRASH_SEED={base_seed})");

    let hub = NatsHub::start().await;
    let cfg = RelayConfig::new(&format!("crash{test}"))
        .uplink(&hub.url())
        .export("sensors/#");
    let admin = cfg.admin_port;
    let mut relay = Relay::start(cfg).await;
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(20)).await;
    let dedup_window = stream_duplicate_window(&hub.url(), STREAM).await;

    let load = Load::start(relay.port(), deadline);
    let mut moments = Vec::new();
    let mut acks_per_run = Vec::new();
    for kill in 1..=KILLS {
        assert!(
            Instant::now() < deadline,
            "{tag}: only {} of {KILLS} kills within {BUDGET:?}",
            kill - 1
        );
        let before = load.acks();
        load.wait_resumed(before, &format!("start {kill} of the relay"))
            .await;
        let after = rng.random_range(KILL_AFTER_MS);
        tokio::time::sleep(Duration::from_millis(after)).await;
        relay.sigkill().await;
        moments.push(after);
        acks_per_run.push(load.acks() - before);
        relay.restart().await;
    }
    // The last run takes load too, then the publishers stop and the outbox drains.
    load.wait_resumed(load.acks(), "the last restart").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tallies = load.stop().await;
    let left = deadline.saturating_duration_since(Instant::now());
    let status = wait_outbox_empty(admin, left.min(Duration::from_secs(90))).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    let verdict = check_stream(&tallies, &msgs);

    let uplink_duplicates = status["uplink"]["duplicates"].clone();
    let stop = relay.sigterm().await;
    assert_eq!(
        (stop.dropped, stop.refused),
        (0, 0),
        "{tag}: the last run dropped or refused messages"
    );
    let logs = relay.all_logs();
    assert!(!logs.contains("panicked"), "{tag}: a relay run panicked");
    let wall = started.elapsed();
    assert!(
        wall < dedup_window,
        "{tag}: the run took {wall:?}, longer than the hub's duplicate window \
         {dedup_window:?}, so a resend could have been stored twice"
    );
    let attempted: u64 = tallies.iter().map(|t| t.attempted).sum();
    let connections: u64 = tallies.iter().map(|t| t.connections).sum();
    println!(
        "{tag}: kills={} at {}..={} ms into the load; PUBACKs between restart and kill {}..={}; \
         messages attempted={attempted} acked={} in_hub={} unacked_present={}; \
         publisher connections={connections}; duplicates dropped by the hub in the last run={}; \
         hub duplicate window={dedup_window:?}; wall={:.1}s",
        moments.len(),
        moments.iter().min().unwrap_or(&0),
        moments.iter().max().unwrap_or(&0),
        acks_per_run.iter().min().unwrap_or(&0),
        acks_per_run.iter().max().unwrap_or(&0),
        verdict.acked,
        verdict.in_hub,
        verdict.unacked_present,
        uplink_duplicates,
        wall.as_secs_f64(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_and_doubles_nothing_1() {
    kills_under_load(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_and_doubles_nothing_2() {
    kills_under_load(2).await;
}
