//! More than a hundred uplink faults in one run, under a steady QoS 1 load: the hub stopped
//! (SIGSTOP/SIGCONT), killed (kill -9) and started again, connections reset, new connections
//! refused, segments lost (held up until TCP would send them again), latency, and the link
//! partitioned, healing either as it was or with a reset. After each the backlog drains; at the
//! end every acknowledged message is in the hub stream exactly once and the relay never
//! restarted.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::{
    read_stream, stream_state, wait_outbox_empty, wait_stream_exists, NatsHub, Relay, RelayConfig,
    STREAM,
};

/// Faults in the run: 13 of each of the 8 kinds.
const FAULTS: usize = 104;
const PUBLISHERS: usize = 2;
/// Messages a second per publisher.
const RATE: u64 = 150;

#[derive(Debug, Clone, Copy)]
enum Fault {
    HubStopped,
    HubKilled,
    Reset,
    Refused,
    Loss,
    Latency,
    Partition,
    PartitionThenReset,
}

const KINDS: [Fault; 8] = [
    Fault::HubStopped,
    Fault::Reset,
    Fault::Loss,
    Fault::HubKilled,
    Fault::Partition,
    Fault::Latency,
    Fault::Refused,
    Fault::PartitionThenReset,
];

/// A small deterministic generator: the same faults, in the same order, every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration between `lo` and `hi` milliseconds.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// Publishes `p<c>:<i>` QoS 1 at [`RATE`] until `stop`, then waits for every PUBACK; counts
/// the PUBACKs in `acked`. Returns how many it published.
async fn publisher(port: u16, c: usize, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) -> u64 {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(format!("p{c}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let sent = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn({
        let sent = sent.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let i = sent.load(Ordering::Relaxed);
                client
                    .publish(
                        format!("sensors/p{c}"),
                        QoS::AtLeastOnce,
                        false,
                        format!("p{c}:{i}"),
                    )
                    .await
                    .expect("queue a publish");
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut mine = 0u64;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let done = producer.is_finished() && mine == sent.load(Ordering::Relaxed);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "publisher p{c} did not finish");
        match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                mine += 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("publisher p{c}: the relay's MQTT connection failed: {e}"),
        }
    }
    producer.await.expect("producer");
    mine
}

/// Waits (bounded) until the hub stream holds at least `n` messages.
async fn wait_hub_has(js: &async_nats::jetstream::Context, n: u64, fault: usize, kind: Fault) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((count, _)) = stream_state(js, STREAM).await {
            if count >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fault {fault} ({kind:?}): the backlog did not drain within 60 s ({count} of {n})"
            );
        }
        assert!(
            Instant::now() < deadline,
            "fault {fault} ({kind:?}): no stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_uplink_faults_lose_and_duplicate_nothing() {
    let mut hub = NatsHub::start().await;
    let proxy = FaultProxy::start(hub.port).await;
    let cfg = RelayConfig::new("faults")
        .uplink(&proxy.url())
        .export("sensors/#");
    let admin = cfg.admin_port;
    let mut relay = Relay::start(cfg).await;
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(20)).await;
    // The test's own view of the hub, straight to it (it reconnects after a restart).
    let js = async_nats::jetstream::new(common::connect(&hub.url()).await);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|c| tokio::spawn(publisher(relay.port(), c, stop.clone(), acked.clone())))
        .collect();

    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut counts = [0usize; 8];
    // The longest wait, per kind, from the fault's end until the hub had everything acknowledged.
    let mut slowest = [Duration::ZERO; 8];
    let started = Instant::now();
    for i in 0..FAULTS {
        let kind = KINDS[i % KINDS.len()];
        counts[i % KINDS.len()] += 1;
        match kind {
            Fault::HubStopped => {
                hub.signal(libc::SIGSTOP);
                // Most stops are short; every fourth outlasts the relay's 5 s PubAck timeout.
                let held = if i % 32 == 0 {
                    Duration::from_secs(6)
                } else {
                    rng.ms(200, 1500)
                };
                tokio::time::sleep(held).await;
                hub.signal(libc::SIGCONT);
            }
            Fault::HubKilled => {
                hub.kill();
                tokio::time::sleep(rng.ms(0, 500)).await;
                hub.restart().await;
            }
            Fault::Reset => proxy.reset(),
            Fault::Refused => {
                proxy.refuse(true);
                proxy.reset();
                tokio::time::sleep(rng.ms(200, 1500)).await;
            }
            Fault::Loss => {
                proxy.loss(0.2);
                tokio::time::sleep(rng.ms(500, 1500)).await;
            }
            Fault::Latency => {
                proxy.delay(rng.ms(50, 250));
                tokio::time::sleep(rng.ms(500, 1500)).await;
            }
            Fault::Partition => {
                proxy.stall(true);
                tokio::time::sleep(rng.ms(300, 3000)).await;
            }
            Fault::PartitionThenReset => {
                proxy.stall(true);
                tokio::time::sleep(rng.ms(300, 2000)).await;
                proxy.reset();
            }
        }
        proxy.heal();
        // What was acknowledged until now reaches the hub before the next fault.
        let healed = Instant::now();
        let want = acked.load(Ordering::Relaxed);
        wait_hub_has(&js, want, i, kind).await;
        let k = i % KINDS.len();
        slowest[k] = slowest[k].max(healed.elapsed());
        assert!(
            relay.exited().is_none(),
            "fault {i} ({kind:?}): the relay exited; log:\n{}",
            common::tail(&relay.log(), 40)
        );
    }
    let faulted = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    let mut published = 0;
    for p in publishers {
        published += p.await.expect("publisher");
    }
    wait_outbox_empty(admin, Duration::from_secs(60)).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    let mut seen = HashSet::new();
    for m in &msgs {
        let p = m.payload_str();
        assert!(seen.insert(p.clone()), "{p:?} twice in the hub stream");
    }
    for c in 0..PUBLISHERS {
        let prefix = format!("p{c}:");
        let n = seen.iter().filter(|p| p.starts_with(&prefix)).count();
        for i in 0..n {
            assert!(
                seen.contains(&format!("p{c}:{i}")),
                "p{c}:{i} missing from the hub stream"
            );
        }
    }
    assert_eq!(
        msgs.len() as u64,
        published,
        "every acknowledged message, once"
    );
    assert!(relay.exited().is_none(), "the relay is still running");
    let log = relay.all_logs();
    assert_eq!(
        log.matches("relaybox ready").count(),
        1,
        "the relay never restarted"
    );
    assert!(!log.contains("panicked"), "no panic; log:\n{log}");
    eprintln!(
        "{FAULTS} faults ({counts:?} of {KINDS:?}) in {faulted:.1?}: {published} messages, \
         {} proxy connections, 0 lost, 0 duplicated",
        proxy.accepted()
    );
    for (kind, t) in KINDS.iter().zip(slowest) {
        eprintln!("  {kind:?}: drained within {t:.2?} of the fault's end");
    }
    relay.sigterm().await;
}
