//! The hardware-in-the-loop suite: the cross-built aarch64 relaybox on a real Debian arm64
//! kernel under `qemu-system-aarch64 -M virt`, a real nats-server hub on the host, real MQTT
//! clients on the host reaching the guest through a forwarded port, a host socket wired to the
//! guest's sensor UART, power cuts (SIGKILL of QEMU), the stricter power cut of a replayed
//! block log (`log_writes`: dm-log-writes); and the armv7 binary under `qemu-arm-static`. What
//! each test proves: docs/HARDWARE-TESTS.md.
//!
//! Run by `hw-tests/run` (called by `scripts/test`), which installs QEMU and the cross
//! toolchains, cross-builds both binaries and builds the image first. The target is not part of
//! a plain `cargo test` (it boots virtual machines for minutes); `cargo test --test hil` runs it
//! once `hw-tests/run` has built the image. `RELAYBOX_HW_CUTS` sets the number of power cuts
//! (default 5; `hw-tests/soak --cuts N` runs more).
//! The power-cut test also keeps a persistent MQTT session (`hw-keeper`) across its last
//! [`KEEPER_CUTS`] cuts.
//!
//! Guests run one at a time (a 2-core machine emulating a 2-core board); each test keeps its
//! console logs and disk under `target/hw-artefacts/<test>/`.

#[path = "../../tests/common/mod.rs"]
mod common;
mod guest;
mod keeper;
mod log_writes;
mod publisher;
mod store_check;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::modbus_sim::Sim;
use common::{
    publish_all_v4, raw, read_stream, send_signal, wait_exit, wait_stream_count,
    wait_stream_exists, HubMsg, NatsHub, RelayConfig, PREFIX, STREAM,
};
use guest::{artefacts, target_dir, Guest, Image, SensorPort};
use tokio::io::AsyncWriteExt;

/// One guest at a time: the tests of this binary may be run in parallel by cargo.
static ONE_GUEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The subject an exported topic `sensors/hw/<leaf>` becomes on the hub.
fn subject(leaf: &str) -> String {
    format!("{PREFIX}.sensors.hw.{leaf}")
}

/// Payloads `<tag>-0` … `<tag>-(n-1)`.
fn payloads(tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("{tag}-{i}").into_bytes()).collect()
}

/// How often each payload is in the hub stream.
fn payload_counts(msgs: &[HubMsg]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in msgs {
        *counts.entry(m.payload_str()).or_insert(0) += 1;
    }
    counts
}

/// Asserts that the hub holds exactly the `expected` payloads, each once, on `subject`.
fn assert_exactly_once(msgs: &[HubMsg], expected: &HashSet<String>, subject: &str) {
    let counts = payload_counts(msgs);
    let missing: Vec<&String> = expected
        .iter()
        .filter(|p| !counts.contains_key(*p))
        .collect();
    let dups: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<&String> = counts.keys().filter(|p| !expected.contains(*p)).collect();
    assert!(
        missing.is_empty() && dups.is_empty() && unexpected.is_empty(),
        "hub holds {} messages for {} expected: {} missing (e.g. {:?}), {} duplicated (e.g. {:?}), \
         {} unexpected (e.g. {:?})",
        msgs.len(),
        expected.len(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        dups.len(),
        dups.iter().take(5).collect::<Vec<_>>(),
        unexpected.len(),
        unexpected.iter().take(5).collect::<Vec<_>>()
    );
    for m in msgs {
        assert_eq!(m.subject, subject, "message {:?}", m.payload_str());
        assert!(
            m.header("Nats-Msg-Id")
                .is_some_and(|id| id.starts_with("hw-guest-")),
            "message {:?} has no Nats-Msg-Id of the guest relay: {:?}",
            m.payload_str(),
            m.headers
        );
    }
}

/// Seconds with two decimals.
fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_to_ready_is_measured() {
    let _one = ONE_GUEST.lock().await;
    let dir = artefacts("boot_to_ready");
    let hub = NatsHub::start().await;
    let mut guest = Guest::new(&dir, hub.port);
    let ready = guest.boot_ready().await;

    // The guest is the pinned ARM kernel, not the host.
    let console = guest.console();
    let expect = format!(
        "relaybox-hw: kernel {} aarch64",
        Image::get().kernel_release
    );
    assert!(
        console.contains(&expect),
        "guest console lacks {expect:?}:\n{console}"
    );

    // "Ready" means accepting MQTT: a CONNACK through the forwarded port.
    let port = guest.mqtt_port;
    tokio::task::spawn_blocking(move || {
        let mut conn = raw::RawConn::open(port);
        conn.handshake(&raw::connect_v4("hw-boot-probe"));
    })
    .await
    .expect("MQTT probe");
    let connack = guest.since_boot();

    // And the uplink reached the host's hub through slirp (10.0.2.2): it created the stream.
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(30)).await;
    guest.assert_alive();
    println!(
        "HIL boot to ready: {} s to `relaybox ready` on the console, {} s to the first CONNACK \
         (qemu-system-aarch64 -M virt, cortex-a72 x2, TCG)",
        secs(ready),
        secs(connack)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_qos1_messages_reach_the_hub_exactly_once() {
    let _one = ONE_GUEST.lock().await;
    const N: usize = 5_000;
    let dir = artefacts("qos1_5000");
    let hub = NatsHub::start().await;
    let mut guest = Guest::new(&dir, hub.port);
    guest.boot_ready().await;

    let started = Instant::now();
    publish_all_v4(
        guest.mqtt_port,
        "hw-burst",
        "sensors/hw/burst",
        payloads("burst", N),
        Duration::from_secs(240),
    )
    .await;
    let acked = started.elapsed();
    wait_stream_count(&hub.url(), STREAM, N as u64, Duration::from_secs(180)).await;
    let at_hub = started.elapsed();
    // A duplicate would arrive after the last original: give it time to show.
    common::wait_stream_stable(
        &hub.url(),
        STREAM,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    let expected: HashSet<String> = payloads("burst", N)
        .into_iter()
        .map(|p| String::from_utf8(p).expect("utf8"))
        .collect();
    assert_exactly_once(&msgs, &expected, &subject("burst"));
    guest.assert_alive();
    println!(
        "HIL 5000 QoS1: all acknowledged in {} s, all at the hub in {} s ({:.0} msg/s end to end), \
         none lost, none duplicated",
        secs(acked),
        secs(at_hub),
        N as f64 / at_hub.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_outage_loses_and_duplicates_nothing() {
    let _one = ONE_GUEST.lock().await;
    const BEFORE: usize = 200;
    const DURING: usize = 1_000;
    let dir = artefacts("uplink_outage");
    let mut hub = NatsHub::start().await;
    let mut guest = Guest::new(&dir, hub.port);
    guest.boot_ready().await;

    publish_all_v4(
        guest.mqtt_port,
        "hw-before",
        "sensors/hw/outage",
        payloads("before", BEFORE),
        Duration::from_secs(60),
    )
    .await;
    wait_stream_count(&hub.url(), STREAM, BEFORE as u64, Duration::from_secs(60)).await;

    hub.stop().await;
    // The relay acknowledges from its flash store while the hub is away.
    publish_all_v4(
        guest.mqtt_port,
        "hw-during",
        "sensors/hw/outage",
        payloads("during", DURING),
        Duration::from_secs(120),
    )
    .await;
    guest.assert_alive();
    assert!(
        guest.console().contains("relaybox ready"),
        "guest relay restarted?"
    );

    let restarted = Instant::now();
    hub.restart().await;
    let total = (BEFORE + DURING) as u64;
    wait_stream_count(&hub.url(), STREAM, total, Duration::from_secs(120)).await;
    let drained = restarted.elapsed();
    common::wait_stream_stable(
        &hub.url(),
        STREAM,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    let expected: HashSet<String> = payloads("before", BEFORE)
        .into_iter()
        .chain(payloads("during", DURING))
        .map(|p| String::from_utf8(p).expect("utf8"))
        .collect();
    assert_exactly_once(&msgs, &expected, &subject("outage"));
    println!(
        "HIL uplink outage: {DURING} messages acknowledged while the hub was down, all at the hub \
         {} s after it came back, none lost, none duplicated",
        secs(drained)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uart_frames_reach_the_hub() {
    let _one = ONE_GUEST.lock().await;
    const N: usize = 300;
    let dir = artefacts("uart");
    let hub = NatsHub::start().await;
    let mut guest = Guest::new(&dir, hub.port);
    // A socket path well under the 108-byte limit of sun_path, whatever the target dir is.
    let socket_dir = tempfile::Builder::new()
        .prefix("rbx-uart-")
        .tempdir()
        .expect("socket dir");
    let socket = socket_dir.path().join("ttyAMA0.sock");
    guest.sensor = SensorPort::Socket(socket.clone());
    guest.boot_ready().await;
    // Bytes that reach a tty nobody has open are discarded: write once relaybox holds it.
    let opened = common::wait_until(Duration::from_secs(30), || {
        guest.console().contains("serial port open")
    })
    .await;
    assert!(
        opened,
        "relaybox in the guest never opened /dev/ttyAMA0; console:\n{}",
        common::tail(&guest.console(), 30)
    );

    // Frames the relay accepts before its hub link is up are backlog, and live ones may go
    // ahead of them: write once the link is up (the relay has made its stream by then).
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(30)).await;

    // The sensor: line frames written into QEMU's socket end of the guest's PL011.
    let mut uart = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect to the guest's UART socket");
    let mut frames = Vec::new();
    for i in 0..N {
        frames.extend_from_slice(format!("uart-{i} t=21.{}\n", i % 10).as_bytes());
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), uart.write_all(&frames))
        .await
        .expect("writing frames to the UART timed out")
        .expect("write to the UART socket");
    wait_stream_count(&hub.url(), STREAM, N as u64, Duration::from_secs(120)).await;
    let at_hub = started.elapsed();
    common::wait_stream_stable(
        &hub.url(),
        STREAM,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    let expected: Vec<String> = (0..N)
        .map(|i| format!("uart-{i} t=21.{}", i % 10))
        .collect();
    let got: Vec<String> = msgs.iter().map(HubMsg::payload_str).collect();
    assert_eq!(
        got.len(),
        N,
        "hub holds {} frames, {N} were written; first: {:?}",
        got.len(),
        got.iter().take(5).collect::<Vec<_>>()
    );
    // A port's frames keep their order, up to the hub.
    assert_eq!(got, expected, "frames at the hub differ from those written");
    for m in &msgs {
        assert_eq!(m.subject, subject("uart0"));
    }
    guest.assert_alive();
    println!(
        "HIL UART: {N} line frames written to the guest's PL011 (ttyAMA0) from a host socket, \
         all at the hub in order, exactly once, in {} s",
        secs(at_hub)
    );
}

/// The newest payload the hub stream holds for `subject`.
async fn hub_last(url: &str, subject: &str) -> Option<String> {
    read_stream(url, STREAM, Duration::from_secs(10))
        .await
        .iter()
        .rev()
        .find(|m| m.subject == subject)
        .map(HubMsg::payload_str)
}

/// Waits (bounded) until the newest payload of `subject` at the hub is `want`.
async fn wait_hub_value(url: &str, subject: &str, want: &str, guest: &Guest) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = hub_last(url, subject).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{subject}: wanted {want:?} at the hub, newest {got:?}; console:\n{}",
            common::tail(&guest.console(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_device_on_the_uart() {
    let _one = ONE_GUEST.lock().await;
    let dir = artefacts("modbus");
    // pymodbus serving unit 1 (tests/modbus/device.py), with power 23.4, temp 21.5, relay on.
    let mut sim = Sim::start("1").await;
    let temp = 21.5f32.to_bits();
    sim.cmd("set 1 holding 0 234").await;
    sim.cmd(&format!("set 1 input 10 {} {}", temp >> 16, temp & 0xffff))
        .await;
    sim.cmd("set 1 coil 3 1").await;
    let hub = NatsHub::start().await;
    let mut guest = Guest::new(&dir, hub.port);
    let socket_dir = tempfile::Builder::new()
        .prefix("rbx-modbus-")
        .tempdir()
        .expect("socket dir");
    let socket = socket_dir.path().join("ttyAMA0.sock");
    guest.sensor = SensorPort::Modbus(socket.clone());
    guest.boot_ready().await;
    // The guest's PL011 (hw-tests/image/uart-modbus.toml) joined to the simulated meter.
    let uart = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect to the guest's UART socket");
    let device = sim.connect().await;
    let wire = tokio::spawn(async move {
        let (mut uart, mut device) = (uart, device);
        let _ = tokio::io::copy_bidirectional(&mut uart, &mut device).await;
    });
    let url = hub.url();
    let started = Instant::now();
    wait_stream_exists(&url, STREAM, Duration::from_secs(30)).await;
    for (leaf, want) in [
        ("meter.power", "23.4"),
        ("meter.temp", "21.5"),
        ("meter.relay", "true"),
        ("meter.$state", "online"),
    ] {
        wait_hub_value(&url, &subject(leaf), want, &guest).await;
    }
    let first = started.elapsed();

    // A change, a command through the guest's MQTT port, a device that stops answering.
    sim.cmd("set 1 holding 0 250").await;
    wait_hub_value(&url, &subject("meter.power"), "25.0", &guest).await;
    publish_all_v4(
        guest.mqtt_port,
        "hw-commander",
        "commands/hw/meter/power",
        vec![b"30.5".to_vec()],
        Duration::from_secs(30),
    )
    .await;
    wait_hub_value(&url, &subject("meter.power"), "30.5", &guest).await;
    assert_eq!(sim.cmd("get 1 holding 0 1").await, "305");
    sim.cmd("mute 1 on").await;
    wait_hub_value(&url, &subject("meter.$state"), "offline", &guest).await;
    sim.cmd("mute 1 off").await;
    wait_hub_value(&url, &subject("meter.$state"), "online", &guest).await;
    guest.assert_alive();
    wire.abort();
    println!(
        "HIL Modbus: pymodbus on the guest's PL011 (ttyAMA0): the first values at the hub {} s \
         after the device was joined to the UART, scaled; a change, a command written to the \
         holding register, offline and back",
        secs(first)
    );
}

/// Number of power cuts of the default run (`RELAYBOX_HW_CUTS` overrides).
fn cuts_wanted() -> usize {
    match std::env::var("RELAYBOX_HW_CUTS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or_else(|| panic!("RELAYBOX_HW_CUTS={v:?} is not a count >= 1")),
        Err(_) => 5,
    }
}

/// The persistent session of the power-cut test: its client id and its subscription, the
/// filter of every publisher's topic (`sensors/hw/cut<N>`).
const KEEPER: &str = "hw-keeper";
const KEEPER_FILTER: &str = "sensors/hw/#";
/// The persistent session spans the last this many cuts (all of them in the default run). It
/// holds every message published while it is away, and the store keeps each one twice (in the
/// outbox and in the session's queue) and, while the queue only grows, no new checkpoint falls
/// due, so all that log stays live: about 2.2 KB per message, so the guest's 64 MiB store disk takes the ~2,000 messages
/// a cut acknowledges for a handful of cuts, not for a soak's hundreds.
const KEEPER_CUTS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_nothing_acknowledged() {
    let _one = ONE_GUEST.lock().await;
    let cuts = cuts_wanted();
    let dir = artefacts("power_cut");
    let hub = NatsHub::start().await;
    let mut guest = Guest::new(&dir, hub.port);
    // The first cut the persistent session is away for.
    let keeper_from = cuts.saturating_sub(KEEPER_CUTS) + 1;

    let mut acked_all: Vec<String> = Vec::new();
    // What was acknowledged to a publisher while the persistent session was away.
    let mut acked_kept: HashSet<String> = HashSet::new();
    let mut sent_all = 0usize;
    let mut corrupt_at = Vec::new();
    let mut torn_cuts = 0usize;
    let mut boot_times = Vec::new();
    for cut in 1..=cuts {
        boot_times.push(guest.boot_ready().await);
        if cut == keeper_from {
            // A subscriber with a persistent session (MQTT 3.1.1 clean session 0) subscribes,
            // has its SUBACK (the subscription is durable by then) and goes away before the
            // publisher starts: every message published from here on is queued for it.
            let present = keeper::subscribe_and_leave(guest.mqtt_port, KEEPER, KEEPER_FILTER).await;
            assert!(
                !present,
                "{KEEPER}: a session was present at its first connection"
            );
        }
        let tag = format!("cut{cut}");
        let run = publisher::Recording::start(guest.mqtt_port, &format!("hw-{tag}"), &tag);
        // Cut while messages are in flight: after the first acknowledgements, at a random moment.
        run.wait_acked(20, Duration::from_secs(60)).await;
        let delay = Duration::from_millis(rand::random_range(0..2_000));
        tokio::time::sleep(delay).await;
        guest.power_cut().await;
        let log = run.finish(Duration::from_secs(30)).await;
        let after = store_check::inspect(&guest.disk, &dir, &format!("cut-{cut}"));
        println!(
            "HIL power cut {cut}/{cuts}: {} ms into publishing, {} sent, {} acknowledged, \
             {} records in the outbox, {} live segments, {} corrupt, torn tail {}",
            delay.as_millis(),
            log.sent,
            log.acked.len(),
            after.outbox_records,
            after.segments,
            after.corrupt,
            after.torn
        );
        if after.corrupt > 0 {
            corrupt_at.push(cut.to_string());
        }
        torn_cuts += usize::from(after.torn > 0);
        sent_all += log.sent;
        if cut >= keeper_from {
            acked_kept.extend(log.acked.iter().cloned());
        }
        acked_all.extend(log.acked);
    }

    // The last boot drains what the cuts left in the outbox.
    boot_times.push(guest.boot_ready().await);
    let acked: HashSet<String> = acked_all.iter().cloned().collect();
    assert_eq!(
        acked.len(),
        acked_all.len(),
        "a payload was acknowledged twice"
    );
    // Bounded by the backlog: the guest sends a few hundred messages a second under TCG.
    let drain = Duration::from_secs(120 + acked.len() as u64 / 100);
    let deadline = Instant::now() + drain;
    let js = async_nats::jetstream::new(hub.client().await);
    loop {
        // Counting is cheap; the whole stream is read only once it can hold them all. A loss
        // shows after the deadline, in the summary below.
        let count = common::stream_state(&js, STREAM).await.map_or(0, |s| s.0);
        let timed_out = Instant::now() >= deadline;
        if count >= acked.len() as u64 || timed_out {
            let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
            let present: HashSet<String> = msgs.iter().map(HubMsg::payload_str).collect();
            if acked.is_subset(&present) || timed_out {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    guest.assert_alive();

    // One more cut with nothing in flight: the outbox drained, its front written (at most a
    // second after the last acknowledgement) and dead segments recycled, and the relay idle,
    // as a quiet box losing power.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    guest.power_cut().await;
    let idle = store_check::inspect(&guest.disk, &dir, "cut-idle");
    println!(
        "HIL idle power cut after the drain: {} records in the outbox, {} live segments, \
         {} corrupt, torn tail {}",
        idle.outbox_records, idle.segments, idle.corrupt, idle.torn
    );
    if idle.corrupt > 0 {
        corrupt_at.push("idle".to_owned());
    }
    torn_cuts += usize::from(idle.torn > 0);
    boot_times.push(guest.boot_ready().await);
    // Whatever the idle cut left in the outbox is sent again now: the hub must drop it.
    common::wait_stream_stable(
        &hub.url(),
        STREAM,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    guest.assert_alive();

    // The persistent session comes back after the last boot, clean session 0 and no SUBSCRIBE:
    // its subscription and every message acknowledged to a publisher while it was away must
    // have survived the cuts. Bounded by the queue (TCG: a few thousand messages a second).
    let kept_cuts = cuts + 1 - keeper_from;
    let back = keeper::come_back(
        guest.mqtt_port,
        KEEPER,
        &acked_kept,
        Duration::from_secs(2),
        Duration::from_secs(60 + acked_kept.len() as u64 / 100),
    )
    .await;
    guest.assert_alive();
    let kept_missing = back.missing(&acked_kept);
    let kept_received = acked_kept.len() - kept_missing.len();
    let kept_extra = back
        .counts
        .keys()
        .filter(|p| !acked_kept.contains(*p))
        .count();
    let kept_extra_acked = back
        .counts
        .keys()
        .filter(|p| !acked_kept.contains(*p) && acked.contains(*p))
        .count();
    println!(
        "HIL persistent session: {} acknowledged messages published while it was away across {} \
         power cuts (and the idle cut), {kept_received} received after the last boot{}, {} \
         duplicates (with DUP), {} without DUP; session present {}, {} publishes received, {} \
         more sent but never acknowledged to the publisher{}{}",
        acked_kept.len(),
        kept_cuts,
        back.all_in
            .map(|d| format!(" (all in {} s)", secs(d)))
            .unwrap_or_default(),
        back.dup_with_flag,
        back.dup_without_flag.len(),
        u8::from(back.session_present),
        back.publishes,
        kept_extra - kept_extra_acked,
        if kept_extra_acked > 0 {
            format!(", {kept_extra_acked} acknowledged before it subscribed")
        } else {
            String::new()
        },
        back.ended_by
            .as_ref()
            .map(|e| format!("; connection ended by {e}"))
            .unwrap_or_default()
    );

    let counts = payload_counts(&msgs);
    let lost: Vec<&String> = acked_all
        .iter()
        .filter(|p| !counts.contains_key(*p))
        .collect();
    let duplicated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unacked_delivered = counts.keys().filter(|p| !acked.contains(*p)).count();
    let survived = if lost.is_empty() && duplicated.is_empty() {
        cuts
    } else {
        0
    };
    println!(
        "HIL power cuts: cuts survived {survived}/{cuts}, messages acknowledged {}, lost {}, \
         duplicated {}, sent {sent_all} (delivered without an acknowledgement {unacked_delivered}), \
         corrupt records after {} cuts, a torn tail after {torn_cuts}, boot to ready {} s",
        acked_all.len(),
        lost.len(),
        duplicated.len(),
        corrupt_at.len(),
        boot_times
            .iter()
            .map(|d| secs(*d))
            .collect::<Vec<_>>()
            .join("/")
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages never reached the hub, e.g. {:?}",
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        duplicated.is_empty(),
        "{} messages reached the hub more than once, e.g. {:?}",
        duplicated.len(),
        duplicated.iter().take(10).collect::<Vec<_>>()
    );
    for m in &msgs {
        assert!(
            m.subject.starts_with(&format!("{PREFIX}.sensors.hw.cut")),
            "unexpected subject {}",
            m.subject
        );
    }
    assert!(
        corrupt_at.is_empty(),
        "the store found corrupt records after cuts {corrupt_at:?}"
    );
    assert!(
        back.session_present,
        "{KEEPER}: CONNACK after the last boot says no session present"
    );
    assert!(
        kept_missing.is_empty(),
        "{KEEPER}: {} of {} messages acknowledged while it was away never arrived, e.g. {:?}",
        kept_missing.len(),
        acked_kept.len(),
        kept_missing
            .iter()
            .take(10)
            .map(|p| keeper::head(p))
            .collect::<Vec<_>>()
    );
    assert!(
        back.dup_without_flag.is_empty(),
        "{KEEPER}: {} payloads arrived again without DUP, e.g. {:?}",
        back.dup_without_flag.len(),
        back.dup_without_flag.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        back.wrong.is_empty(),
        "{KEEPER}: {} publishes on the wrong topic or QoS, e.g. {:?}",
        back.wrong.len(),
        back.wrong.iter().take(10).collect::<Vec<_>>()
    );
}

/// The armv7 binary (32-bit Raspberry Pi OS) built by `scripts/cross-build`.
fn armv7_binary() -> PathBuf {
    let bin = std::env::var_os("RELAYBOX_ARMV7_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("armv7-unknown-linux-gnueabihf/release/relaybox"));
    assert!(
        bin.is_file(),
        "{} is missing: run hw-tests/run (or scripts/cross-build armv7-unknown-linux-gnueabihf)",
        bin.display()
    );
    // ELF32 (class 1), little-endian, e_machine 40 (ARM): really the 32-bit ARM build.
    let head = fs::read(&bin).expect("read armv7 binary");
    assert!(
        head.len() > 20 && &head[..4] == b"\x7fELF" && head[4] == 1 && head[5] == 1,
        "{} is not a 32-bit little-endian ELF",
        bin.display()
    );
    assert_eq!(
        u16::from_le_bytes([head[18], head[19]]),
        40,
        "{} is not an ARM binary",
        bin.display()
    );
    bin
}

/// `qemu-arm-static` with the armhf glibc of the cross toolchain as the root for libraries.
fn qemu_arm(bin: &PathBuf) -> Command {
    let mut cmd = Command::new("qemu-arm-static");
    cmd.args(["-L", "/usr/arm-linux-gnueabihf"]).arg(bin);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_binary_runs_under_qemu_user() {
    let _one = ONE_GUEST.lock().await;
    const N: usize = 500;
    let bin = armv7_binary();
    let dir = artefacts("armv7_user");

    let out = qemu_arm(&bin)
        .arg("--version")
        .output()
        .expect("run qemu-arm-static");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && version == format!("relaybox {}", env!("CARGO_PKG_VERSION")),
        "armv7 --version: {} {version:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let hub = NatsHub::start().await;
    let cfg = RelayConfig::new("armv7")
        .uplink(&hub.url())
        .export("sensors/#");
    let config = dir.join("relaybox.toml");
    fs::write(&config, cfg.toml(&dir.join("data"))).expect("write config");
    let log_path = dir.join("relaybox.log");
    let log = fs::File::create(&log_path).expect("log file");
    let mut child = qemu_arm(&bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn armv7 relaybox");
    let started = Instant::now();
    let read_log = || fs::read_to_string(&log_path).unwrap_or_default();
    let ready = common::wait_until(Duration::from_secs(60), || {
        read_log().contains(guest::READY_LINE)
    })
    .await;
    if !ready {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "armv7 relaybox not ready within 60 s; log:\n{}",
            common::tail(&read_log(), 30)
        );
    }
    let ready_after = started.elapsed();

    publish_all_v4(
        cfg.mqtt_port,
        "armv7-pub",
        "sensors/armv7",
        payloads("armv7", N),
        Duration::from_secs(120),
    )
    .await;
    wait_stream_count(&hub.url(), STREAM, N as u64, Duration::from_secs(120)).await;
    common::wait_stream_stable(
        &hub.url(),
        STREAM,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    let counts = payload_counts(&msgs);
    assert_eq!(msgs.len(), N, "hub holds {} messages, sent {N}", msgs.len());
    for p in payloads("armv7", N) {
        let p = String::from_utf8(p).expect("utf8");
        assert_eq!(counts.get(&p), Some(&1), "payload {p} at the hub");
    }
    assert!(msgs
        .iter()
        .all(|m| m.subject == format!("{PREFIX}.sensors.armv7")));

    send_signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    let log = read_log();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "armv7 relaybox did not stop within 30 s of SIGTERM; log:\n{}",
            common::tail(&log, 30)
        );
    };
    assert!(
        status.success() && log.contains("relaybox stopped"),
        "armv7 relaybox stop: {status}; log:\n{}",
        common::tail(&log, 30)
    );
    println!(
        "HIL armv7 (qemu-arm-static): `{version}`, ready in {} s, {N} QoS1 messages at the hub \
         exactly once, clean stop",
        secs(ready_after)
    );
}
