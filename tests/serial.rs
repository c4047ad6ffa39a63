//! Serial ingest with pseudo-terminals standing in for devices: frames of every framing reach
//! local MQTT subscribers and the hub, bad input is dropped and counted, a port that goes away
//! comes back, commands reach the device framed, and accepted frames survive a SIGKILL.
//!
//! Each device is a pty pair: the test keeps the master (the device's end) and the relay opens
//! the slave through a symlink, the way `/dev/serial/by-id/` links point at `/dev/ttyUSB0`.
//! Unplugging removes the link and closes the pair; plugging in again makes a new pair behind
//! the same link.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pty::Pty;
use common::{
    read_stream, strip_ansi, toml_str, wait_stream_count, wait_stream_stable, NatsHub, Relay,
    RelayConfig, Subscriber, PREFIX, STREAM,
};

const OPEN: &str = "serial port open";
const UNAVAILABLE: &str = "serial port unavailable";
const LOST: &str = "serial port lost";
const STOPPED: &str = "serial port stopped";
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// A device on a pty
// ---------------------------------------------------------------------------------------------

struct Device {
    link: PathBuf,
    pty: Option<Pty>,
}

impl Device {
    /// A device that is not plugged in yet; the relay will find it at `link`.
    fn new(link: PathBuf) -> Device {
        Device { link, pty: None }
    }

    /// A new pty behind the link.
    fn plug(&mut self) {
        assert!(
            self.pty.is_none(),
            "{} is already plugged",
            self.link.display()
        );
        let pty = Pty::open();
        let _ = std::fs::remove_file(&self.link);
        std::os::unix::fs::symlink(&pty.slave_path, &self.link).expect("device link");
        self.pty = Some(pty);
    }

    /// Removes the link and closes the pty: the relay's reads fail as after a USB unplug.
    fn unplug(&mut self) {
        std::fs::remove_file(&self.link).expect("remove device link");
        self.pty = None;
    }

    fn pty(&self) -> &Pty {
        self.pty.as_ref().expect("device is plugged")
    }

    async fn send(&self, bytes: &[u8]) {
        let pty = self.pty();
        let sent = tokio::time::timeout(WAIT, async {
            let mut at = 0;
            while at < bytes.len() {
                at += pty.write(&bytes[at..]).await?;
            }
            std::io::Result::Ok(())
        });
        sent.await
            .expect("writing to the device timed out: the relay is not reading")
            .expect("write to the device");
    }

    /// Waits until the relay has read everything written so far. FIONREAD counts only what
    /// reached the slave's line discipline, not bytes still in the pty's flip buffer (moved on
    /// by a kernel worker), so "nothing unread" must hold for a while.
    async fn wait_drained(&self) {
        const STEADY: Duration = Duration::from_millis(250);
        let pty = self.pty();
        let deadline = Instant::now() + WAIT;
        let mut empty_since: Option<Instant> = None;
        loop {
            if pty.unread() == 0 {
                if empty_since.get_or_insert_with(Instant::now).elapsed() >= STEADY {
                    return;
                }
            } else {
                empty_since = None;
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not read {} within {WAIT:?}",
                self.link.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the relay wrote to the device, waiting at most `timeout` for something.
    async fn receive_some(&self, timeout: Duration) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(timeout, self.pty().read(&mut buf)).await {
            Ok(Ok(n)) => buf[..n].to_vec(),
            Ok(Err(e)) => panic!("reading the device: {e}"),
            Err(_) => Vec::new(),
        }
    }

    /// Reads what the relay wrote to the device until `n` bytes arrived.
    async fn receive(&self, n: usize, timeout: Duration) -> Vec<u8> {
        let mut got = Vec::with_capacity(n);
        let deadline = Instant::now() + timeout;
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {} of {n} bytes reached the device within {timeout:?}: {got:?}",
                got.len()
            );
            got.extend(self.receive_some(left).await);
        }
        got
    }
}

// ---------------------------------------------------------------------------------------------
// Framing on the device side, written independently of the relay's codec
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Framing {
    Line,
    Cobs,
    Prefixed,
}

impl Framing {
    const ALL: [Framing; 3] = [Framing::Line, Framing::Cobs, Framing::Prefixed];

    fn key(self) -> &'static str {
        match self {
            Framing::Line => "line",
            Framing::Cobs => "cobs",
            Framing::Prefixed => "length-prefixed",
        }
    }

    /// The port name the tests give a device of this framing.
    fn port(self) -> &'static str {
        match self {
            Framing::Line => "line",
            Framing::Cobs => "cobs",
            Framing::Prefixed => "lp",
        }
    }

    fn frame(self, payload: &[u8]) -> Vec<u8> {
        match self {
            Framing::Line => {
                let mut out = payload.to_vec();
                out.push(b'\n');
                out
            }
            Framing::Cobs => {
                let mut out = cobs(payload);
                out.push(0);
                out
            }
            Framing::Prefixed => {
                let len = u16::try_from(payload.len()).expect("payload fits a u16 prefix");
                let mut out = len.to_be_bytes().to_vec();
                out.extend_from_slice(payload);
                out
            }
        }
    }

    /// Payload number `i` of a stream: unique, with the bytes that matter for the framing
    /// (zeros and newlines for the binary ones) and varying lengths.
    fn payload(self, i: u32) -> Vec<u8> {
        match self {
            Framing::Line => format!(
                "reading {i:05} t={} {}",
                i * 7,
                "x".repeat((i % 60) as usize)
            )
            .into_bytes(),
            Framing::Cobs | Framing::Prefixed => {
                let mut p = i.to_be_bytes().to_vec();
                let extra = if i % 101 == 0 { 254 + (i % 3) } else { i % 300 };
                p.extend((0..extra).map(|j| if i % 101 == 0 { 0xab } else { (j * i) as u8 }));
                p.push(b'\n');
                p
            }
        }
    }
}

/// COBS encoding without the delimiter.
fn cobs(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    let mut code_at = 0;
    for &b in payload {
        if b != 0 {
            out.push(b);
        }
        let block = out.len() - code_at;
        if b == 0 || block == 0xff {
            out[code_at] = if b == 0 { block as u8 } else { 0xff };
            code_at = out.len();
            out.push(0);
        }
    }
    out[code_at] = (out.len() - code_at) as u8;
    out
}

#[test]
fn test_side_cobs_matches_the_published_examples() {
    // Examples from the COBS paper / Wikipedia.
    assert_eq!(cobs(&[0x00]), [0x01, 0x01]);
    assert_eq!(cobs(&[0x00, 0x00]), [0x01, 0x01, 0x01]);
    assert_eq!(
        cobs(&[0x11, 0x22, 0x00, 0x33]),
        [0x03, 0x11, 0x22, 0x02, 0x33]
    );
    assert_eq!(
        cobs(&[0x11, 0x00, 0x00, 0x00]),
        [0x02, 0x11, 0x01, 0x01, 0x01]
    );
    let run: Vec<u8> = (1..=254).collect();
    let mut want = vec![0xff];
    want.extend(&run);
    want.push(0x01);
    assert_eq!(cobs(&run), want);
}

// ---------------------------------------------------------------------------------------------
// Config and log helpers
// ---------------------------------------------------------------------------------------------

fn port_toml(name: &str, link: &Path, framing: Framing, topic: &str, extra: &str) -> String {
    format!(
        "\n[[serial]]\nname = {}\npath = {}\nframing = {}\ntopic = {}\n{extra}",
        toml_str(name),
        toml_str(&link.display().to_string()),
        toml_str(framing.key()),
        toml_str(topic),
    )
}

/// The counters of `port` from its last `serial port stopped` line.
fn port_counters(log: &str, port: &str) -> BTreeMap<String, u64> {
    let log = strip_ansi(log);
    let tag = format!("port={port} ");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(STOPPED) && l.contains(&tag))
        .unwrap_or_else(|| panic!("no `{STOPPED}` line for port {port} in:\n{log}"));
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

fn assert_counters(counters: &BTreeMap<String, u64>, port: &str, want: &[(&str, u64)]) {
    for (name, value) in want {
        assert_eq!(
            counters.get(*name),
            Some(value),
            "port {port}: counter {name} in {counters:?}"
        );
    }
}

/// What a subscriber received on `topic`, in order.
fn received_on(sub: &Subscriber, topic: &str) -> Vec<Vec<u8>> {
    sub.snapshot()
        .into_iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, p)| p)
        .collect()
}

/// Compares two payload sequences and says where they first differ.
fn assert_same_sequence(what: &str, got: &[Vec<u8>], want: &[Vec<u8>]) {
    if got == want {
        return;
    }
    let at = got.iter().zip(want).position(|(g, w)| g != w);
    panic!(
        "{what}: {} payloads, expected {}; first difference at {at:?}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        at.and_then(|i| got.get(i))
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        at.and_then(|i| want.get(i))
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    );
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("relaybox-serial-")
        .tempdir()
        .expect("temp dir")
}

/// Publishes each (topic, payload) at QoS 1 from one MQTT connection and waits for every
/// PUBACK. (One connection on purpose: rumqttd can take a client that connects right after
/// another one left for the one that left, and disconnect it.)
async fn publish_each(port: u16, client_id: &str, messages: Vec<(String, Vec<u8>)>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let total = messages.len();
    for (topic, payload) in messages {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue publish");
    }
    let mut acked = 0;
    let result = tokio::time::timeout(WAIT, async {
        while acked < total {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await? {
                acked += 1;
            }
        }
        Ok::<(), rumqttc::ConnectionError>(())
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{client_id}: MQTT error after {acked}/{total} PUBACKs: {e}"),
        Err(_) => panic!("{client_id}: {acked}/{total} PUBACKs within {WAIT:?}"),
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// 10,000 frames of each framing, on three ports at once, reach a local MQTT subscriber and
/// the hub: none lost, none duplicated, in order. Two ports are exported by `export = true`,
/// the third by an `[[export]]` rule matching its topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_frames_of_each_framing_reach_subscribers_and_the_hub() {
    const N: u32 = 10_000;
    let dir = temp_dir();
    let hub = NatsHub::start().await;
    let mut extra = String::new();
    let mut devices = Vec::new();
    for framing in Framing::ALL {
        let link = dir.path().join(format!("{}-tty", framing.port()));
        let export = if framing == Framing::Prefixed {
            ""
        } else {
            "export = true\n"
        };
        extra.push_str(&port_toml(
            framing.port(),
            &link,
            framing,
            "serial/{name}",
            &format!("max_frame = 1024\ngap_timeout_ms = 5000\n{export}"),
        ));
        let mut device = Device::new(link);
        device.plug();
        devices.push((framing, device));
    }
    // The devices write as fast as the pty takes it, far faster than a UART: the subscriber's
    // queue is sized for the whole burst (the default bound, 1,000, would drop what a
    // momentarily busy subscriber has not read yet, as it should for a slow client).
    let cfg = RelayConfig::new("serial-bulk")
        .uplink(&hub.url())
        .export("serial/lp")
        .mqtt("max_queued_messages = 40000\nmax_queued_bytes = 16777216");
    let mut relay = Relay::start_with_extra(cfg, &extra).await;
    relay.wait_log(OPEN, 3, WAIT).await;
    let sub = Subscriber::start(relay.port(), "serial-bulk-sub", &["serial/#"]).await;

    let expected: BTreeMap<Framing, Vec<Vec<u8>>> = Framing::ALL
        .iter()
        .map(|&f| (f, (0..N).map(|i| f.payload(i)).collect()))
        .collect();
    let started = Instant::now();
    let writers: Vec<_> = devices
        .into_iter()
        .map(|(framing, device)| {
            let payloads = expected[&framing].clone();
            tokio::spawn(async move {
                for batch in payloads.chunks(40) {
                    let mut bytes = Vec::new();
                    for (k, p) in batch.iter().enumerate() {
                        let mut framed = framing.frame(p);
                        // Some lines end in CRLF; the relay removes the CR.
                        if framing == Framing::Line && k % 2 == 1 {
                            framed.insert(framed.len() - 1, b'\r');
                        }
                        bytes.extend(framed);
                    }
                    device.send(&bytes).await;
                }
                device
            })
        })
        .collect();
    let mut devices = Vec::new();
    for w in writers {
        devices.push(w.await.expect("device writer"));
    }
    let written = started.elapsed();

    let total = 3 * N as usize;
    let got = sub.wait_for(total, Duration::from_secs(60)).await;
    let local = started.elapsed();
    assert_eq!(
        got, total,
        "local subscriber received {got} of {total} frames"
    );
    let at_hub = wait_stream_count(&hub.url(), STREAM, total as u64, Duration::from_secs(60)).await;
    let hub_time = started.elapsed();
    assert_eq!(at_hub, total as u64);
    println!(
        "serial bulk: {total} frames written in {written:?}; all at the local subscriber after \
         {local:?} ({:.0} frames/s), all at the hub after {hub_time:?} ({:.0} frames/s)",
        total as f64 / local.as_secs_f64(),
        total as f64 / hub_time.as_secs_f64(),
    );

    let stable = wait_stream_stable(&hub.url(), STREAM, Duration::from_secs(1), WAIT).await;
    assert_eq!(stable, total as u64, "the hub holds duplicates");
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    for framing in Framing::ALL {
        let topic = format!("serial/{}", framing.port());
        let want = &expected[&framing];
        assert_same_sequence(&format!("local {topic}"), &received_on(&sub, &topic), want);
        let subject = format!("{PREFIX}.serial.{}", framing.port());
        let at_hub: Vec<Vec<u8>> = msgs
            .iter()
            .filter(|m| m.subject == subject)
            .map(|m| m.payload.clone())
            .collect();
        assert_same_sequence(&format!("hub {subject}"), &at_hub, want);
    }
    assert!(sub.errors.lock().expect("errors").is_empty());

    relay.sigterm().await;
    let log = relay.log();
    for framing in Framing::ALL {
        let c = port_counters(&log, framing.port());
        assert_counters(
            &c,
            framing.port(),
            &[
                ("frames", u64::from(N)),
                ("published", u64::from(N)),
                ("exported", u64::from(N)),
                ("not_exported", 0),
                ("garbage", 0),
                ("bad_cobs", 0),
                ("overlong", 0),
                ("partial", 0),
            ],
        );
    }
    drop(devices);
}

/// One item a device sends in the bad-input test.
enum Piece {
    Good(Vec<u8>),
    /// Bytes that must be dropped, and the counter they must go to.
    Bad(Vec<u8>, &'static str),
    /// Silence, after everything before was read.
    Quiet(Duration),
}

/// Good frames with garbage, overlong and corrupt input between them, on every framing; each
/// port ends with half a frame and is unplugged. Every good frame arrives in order, every bad
/// one is counted under its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dropped_counted_and_good_frames_still_arrive() {
    const MAX: usize = 64;
    // length-prefixed: silence of this long ends an unfinished frame. Long enough for the
    // device to see that the relay read its last half frame and unplug before it.
    const GAP: Duration = Duration::from_millis(1500);
    fn good(f: Framing, i: u32) -> Piece {
        Piece::Good(f.payload(i % 40).into_iter().take(MAX).collect())
    }
    fn script(f: Framing) -> Vec<Piece> {
        let mut v = Vec::new();
        match f {
            Framing::Line => {
                v.push(good(f, 1));
                v.push(Piece::Bad(
                    b"\xff\xfe\xfd binary noise\n".to_vec(),
                    "garbage",
                ));
                v.push(good(f, 2));
                v.push(Piece::Bad(b"\x1b[31mcolour\x1b[0m\n".to_vec(), "garbage"));
                v.push(Piece::Bad(
                    vec![b'o'; MAX + 1].into_iter().chain(*b"\n").collect(),
                    "overlong",
                ));
                v.push(Piece::Bad(
                    [vec![b'y'; 500], b"\r\n".to_vec()].concat(),
                    "overlong",
                ));
                v.push(good(f, 3));
                // Blank lines carry nothing and are not counted.
                v.push(Piece::Bad(b"\r\n\n".to_vec(), ""));
                v.push(Piece::Good(vec![b'm'; MAX]));
                v.push(Piece::Bad(b"nul\x00inside\n".to_vec(), "garbage"));
                v.push(good(f, 4));
            }
            Framing::Cobs => {
                v.push(good(f, 1));
                v.push(Piece::Bad(vec![0x05, 0x41, 0x00], "bad_cobs"));
                v.push(good(f, 2));
                v.push(Piece::Bad(vec![0xff, 0x01, 0x02, 0x00], "bad_cobs"));
                v.push(Piece::Bad(f.frame(&[7u8; MAX + 1]), "overlong"));
                v.push(Piece::Bad(f.frame(&[0u8; 400]), "overlong"));
                // Delimiter runs are empty frames: skipped, not counted.
                v.push(Piece::Bad(vec![0x00, 0x00], ""));
                v.push(good(f, 3));
                v.push(Piece::Good(vec![0u8; MAX]));
                v.push(Piece::Bad(vec![0x09, 0x61, 0x62, 0x00], "bad_cobs"));
                v.push(good(f, 4));
            }
            Framing::Prefixed => {
                v.push(good(f, 1));
                // A header announcing 48 bytes, 2 of them, then silence.
                v.push(Piece::Bad(vec![0x00, 0x30, 0xde, 0xad], "garbage"));
                v.push(Piece::Quiet(GAP + Duration::from_millis(500)));
                v.push(good(f, 2));
                v.push(Piece::Bad(f.frame(&[9u8; MAX + 1]), "overlong"));
                v.push(Piece::Bad(f.frame(&[0u8; 3000]), "overlong"));
                v.push(good(f, 3));
                // A stray byte: half a header.
                v.push(Piece::Bad(vec![0x07], "garbage"));
                v.push(Piece::Quiet(GAP + Duration::from_millis(500)));
                v.push(Piece::Bad(vec![0x00, 0x00], ""));
                v.push(Piece::Good(vec![0u8; MAX]));
                v.push(good(f, 4));
            }
        }
        v
    }

    let dir = temp_dir();
    let mut extra = String::new();
    let mut devices = Vec::new();
    for framing in Framing::ALL {
        let link = dir.path().join(format!("{}-tty", framing.port()));
        extra.push_str(&port_toml(
            framing.port(),
            &link,
            framing,
            "bad/{name}",
            &format!("max_frame = {MAX}\ngap_timeout_ms = {}\n", GAP.as_millis()),
        ));
        let mut device = Device::new(link);
        device.plug();
        devices.push((framing, device));
    }
    let mut relay = Relay::start_with_extra(RelayConfig::new("serial-bad"), &extra).await;
    relay.wait_log(OPEN, 3, WAIT).await;
    let sub = Subscriber::start(relay.port(), "serial-bad-sub", &["bad/#"]).await;

    let runs: Vec<_> = devices
        .into_iter()
        .map(|(framing, mut device)| {
            tokio::spawn(async move {
                let mut good = Vec::new();
                let mut bad: BTreeMap<&'static str, u64> = BTreeMap::new();
                for piece in script(framing) {
                    match piece {
                        Piece::Good(p) => {
                            device.send(&framing.frame(&p)).await;
                            good.push(p);
                        }
                        Piece::Bad(bytes, reason) => {
                            device.send(&bytes).await;
                            if !reason.is_empty() {
                                *bad.entry(reason).or_default() += 1;
                            }
                        }
                        Piece::Quiet(d) => {
                            device.wait_drained().await;
                            tokio::time::sleep(d).await;
                        }
                    }
                }
                // Half a frame, read by the relay, then the device goes away.
                let half = framing.frame(&framing.payload(7));
                device.send(&half[..half.len() / 2]).await;
                device.wait_drained().await;
                device.unplug();
                *bad.entry("partial").or_default() += 1;
                (framing, good, bad)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for run in runs {
        outcomes.push(run.await.expect("device script"));
    }
    relay.wait_log(LOST, 3, WAIT).await;
    let total_good: usize = outcomes.iter().map(|(_, g, _)| g.len()).sum();
    assert_eq!(sub.wait_for(total_good, WAIT).await, total_good);
    // Nothing else arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sub.count(),
        total_good,
        "more frames than good ones: {:?}",
        sub.snapshot()
    );

    relay.sigterm().await;
    let log = relay.log();
    for (framing, good, bad) in &outcomes {
        let port = framing.port();
        assert_same_sequence(
            &format!("bad/{port}"),
            &received_on(&sub, &format!("bad/{port}")),
            good,
        );
        let c = port_counters(&log, port);
        let reasons = ["garbage", "bad_cobs", "overlong", "partial"];
        let want: Vec<(&str, u64)> = reasons
            .iter()
            .map(|r| (*r, bad.get(r).copied().unwrap_or(0)))
            .chain([("frames", good.len() as u64)])
            .collect();
        assert_counters(&c, port, &want);
    }
}

/// A port missing at start is picked up when it appears; unplugged mid-stream, it is picked up
/// again when it comes back. Frames accepted before are all at the hub, in order, once each;
/// the absence is logged once per change of state, not per retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_missing_or_unplugged_is_picked_up_when_it_comes_back() {
    let dir = temp_dir();
    let hub = NatsHub::start().await;
    let link = dir.path().join("meter-tty");
    let extra = port_toml(
        "meter",
        &link,
        Framing::Line,
        "meters/{name}",
        "export = true\n",
    );
    let mut relay =
        Relay::start_with_extra(RelayConfig::new("serial-plug").uplink(&hub.url()), &extra).await;
    let sub = Subscriber::start(relay.port(), "serial-plug-sub", &["meters/#"]).await;
    let payload = |i: u32| format!("meter {i:04} kwh={}", 1000 + i).into_bytes();

    // Missing at start: one log line, however many retries.
    relay.wait_log(UNAVAILABLE, 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(relay.log_count(UNAVAILABLE), 1, "absence logged per retry");
    assert_eq!(relay.log_count(OPEN), 0);

    let mut device = Device::new(link);
    device.plug();
    relay.wait_log(OPEN, 1, WAIT).await;
    let mut bytes = Vec::new();
    for i in 0..500 {
        bytes.extend(Framing::Line.frame(&payload(i)));
    }
    device.send(&bytes).await;
    assert_eq!(sub.wait_for(500, WAIT).await, 500);

    // Unplugged in the middle of a frame.
    device.send(b"meter 9999 kw").await;
    device.wait_drained().await;
    device.unplug();
    relay.wait_log(LOST, 1, WAIT).await;
    relay.wait_log(UNAVAILABLE, 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(relay.log_count(UNAVAILABLE), 2, "absence logged per retry");
    assert_eq!(relay.log_count(LOST), 1);

    device.plug();
    relay.wait_log(OPEN, 2, WAIT).await;
    let mut bytes = Vec::new();
    for i in 500..1000 {
        bytes.extend(Framing::Line.frame(&payload(i)));
    }
    device.send(&bytes).await;
    assert_eq!(sub.wait_for(1000, WAIT).await, 1000);

    let want: Vec<Vec<u8>> = (0..1000).map(payload).collect();
    assert_same_sequence(
        "local meters/meter",
        &received_on(&sub, "meters/meter"),
        &want,
    );
    wait_stream_count(&hub.url(), STREAM, 1000, WAIT).await;
    assert_eq!(
        wait_stream_stable(&hub.url(), STREAM, Duration::from_secs(1), WAIT).await,
        1000
    );
    let at_hub: Vec<Vec<u8>> = read_stream(&hub.url(), STREAM, WAIT)
        .await
        .into_iter()
        .map(|m| {
            assert_eq!(m.subject, format!("{PREFIX}.meters.meter"));
            m.payload
        })
        .collect();
    assert_same_sequence("hub", &at_hub, &want);

    relay.sigterm().await;
    let c = port_counters(&relay.log(), "meter");
    assert_counters(
        &c,
        "meter",
        &[
            ("frames", 1000),
            ("exported", 1000),
            ("partial", 1),
            ("opened", 2),
        ],
    );
}

/// Messages published on a port's `command_topic` — by a local MQTT client, or on the hub
/// through an `[[import]]` — are written to the device, framed like its input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_topic_messages_arrive_framed_at_the_device() {
    let dir = temp_dir();
    let hub = NatsHub::start().await;
    hub.create_stream().await;
    let mut extra = String::new();
    let mut devices = BTreeMap::new();
    for framing in Framing::ALL {
        let link = dir.path().join(format!("{}-tty", framing.port()));
        extra.push_str(&port_toml(
            framing.port(),
            &link,
            framing,
            "dev/{name}/data",
            "command_topic = \"dev/{name}/cmd\"\n",
        ));
        let mut device = Device::new(link);
        device.plug();
        devices.insert(framing, device);
    }
    let cfg = RelayConfig::new("serial-cmd")
        .uplink(&hub.url())
        .import("dev/+/cmd");
    let mut relay = Relay::start_with_extra(cfg, &extra).await;
    relay.wait_log(OPEN, 3, WAIT).await;

    let commands = |f: Framing| -> Vec<Vec<u8>> {
        match f {
            Framing::Line => vec![b"set interval 10".to_vec(), b"reboot".to_vec()],
            Framing::Cobs => vec![vec![0x01, 0x00, 0x02], vec![0x00; 3], (1..=254).collect()],
            Framing::Prefixed => vec![vec![0x00, b'\n', 0xff], vec![0x42; 300]],
        }
    };
    let messages: Vec<(String, Vec<u8>)> = Framing::ALL
        .iter()
        .flat_map(|f| {
            commands(*f)
                .into_iter()
                .map(|c| (format!("dev/{}/cmd", f.port()), c))
        })
        .collect();
    publish_each(relay.port(), "serial-cmd-pub", messages).await;
    for framing in Framing::ALL {
        let want: Vec<u8> = commands(framing)
            .iter()
            .flat_map(|c| framing.frame(c))
            .collect();
        let device = devices.get(&framing).expect("device");
        let got = device.receive(want.len(), WAIT).await;
        assert_eq!(got, want, "{framing:?} device received");
    }

    // From the hub: the import is live once the downlink's consumer exists; probe until a
    // command arrives, then check it is framed and whole.
    let js = hub.jetstream().await;
    let line = devices.get(&Framing::Line).expect("line device");
    let deadline = Instant::now() + WAIT;
    let mut sent = 0;
    let mut got = Vec::new();
    while !got.contains(&b'\n') {
        assert!(
            Instant::now() < deadline,
            "no hub command reached the device ({sent} sent)"
        );
        js.publish(
            format!("{PREFIX}.dev.line.cmd"),
            format!("hub-{sent}").into(),
        )
        .await
        .expect("hub publish")
        .await
        .expect("hub puback");
        sent += 1;
        got.extend(line.receive_some(Duration::from_millis(300)).await);
    }
    let text = String::from_utf8(got).expect("hub command is text");
    let first = text.lines().next().expect("one line");
    assert!(
        first.starts_with("hub-") && first[4..].parse::<u32>().is_ok_and(|k| k < sent),
        "hub command arrived as {text:?}"
    );

    relay.sigterm().await;
    let log = relay.log();
    for framing in Framing::ALL {
        let c = port_counters(&log, framing.port());
        let min = commands(framing).len() as u64;
        let written = c.get("commands").copied().unwrap_or(0);
        assert!(
            written >= min,
            "{framing:?}: {written} commands written, expected {min}: {c:?}"
        );
        assert_eq!(c.get("commands_dropped"), Some(&0), "{framing:?}: {c:?}");
    }
}

/// Frames that local subscribers saw (so the relay accepted them) while the hub was away are
/// still delivered after the relay is killed with SIGKILL and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_accepted_before_sigkill_reach_the_hub_after_restart() {
    const N: u32 = 3000;
    let dir = temp_dir();
    let hub_port = common::free_port();
    let link = dir.path().join("cobs-tty");
    let extra = port_toml(
        "crash",
        &link,
        Framing::Cobs,
        "crash/{name}",
        "export = true\n",
    );
    // A long commit window: a frame published before its commit would be seen well before it
    // is on disk, and lost to the kill. (Each commit then releases a burst of frames at once:
    // the subscriber's queue is sized for all of them.)
    let cfg = RelayConfig::new("serial-kill")
        .uplink(&format!("nats://127.0.0.1:{hub_port}"))
        .outbox_lines("commit_window_us = 100000")
        .mqtt("max_queued_messages = 10000");
    let mut relay = Relay::start_with_extra(cfg, &extra).await;
    let mut device = Device::new(link);
    device.plug();
    relay.wait_log(OPEN, 1, WAIT).await;
    let sub = Subscriber::start(relay.port(), "serial-kill-sub", &["crash/#"]).await;

    let want: Vec<Vec<u8>> = (0..N).map(|i| Framing::Cobs.payload(i)).collect();
    let bytes: Vec<u8> = want.iter().flat_map(|p| Framing::Cobs.frame(p)).collect();
    device.send(&bytes).await;
    assert_eq!(sub.wait_for(N as usize, WAIT).await, N as usize);
    relay.sigkill().await;

    let hub = NatsHub::start_on(hub_port).await;
    relay.restart().await;
    wait_stream_count(&hub.url(), STREAM, u64::from(N), Duration::from_secs(30)).await;
    assert_eq!(
        wait_stream_stable(&hub.url(), STREAM, Duration::from_secs(1), WAIT).await,
        u64::from(N)
    );
    let at_hub: Vec<Vec<u8>> = read_stream(&hub.url(), STREAM, WAIT)
        .await
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_same_sequence("hub after SIGKILL", &at_hub, &want);
    assert_same_sequence(
        "local before SIGKILL",
        &received_on(&sub, "crash/crash"),
        &want,
    );
    relay.sigterm().await;
    drop(device);
}
