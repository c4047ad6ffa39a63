//! Fuzzing the gate's packet handling with seeded random input (a property test: whatever the
//! bytes, nothing panics, nothing hangs, and the relay keeps serving).
//!
//! - `codec_survives_arbitrary_bytes` feeds inputs to the codec functions the gate uses
//!   (`broker::frame`, `decode_connect`, `decode_publish`, `decode_subscribe`,
//!   `subscribe_subset`, `merge_suback`, `packet_id`, topic aliases) and checks what they
//!   return against the input; a watchdog fails the test if one input takes more than 10 s.
//! - `live_relay_survives_arbitrary_streams` opens many connections to a real relay (ACL rules,
//!   an export with its outbox, small limits) and sends random and mutated byte streams, with
//!   and without a valid CONNECT first; between batches and at the end a normal client must
//!   still subscribe, publish and receive, the process must be running and its log must hold
//!   no panic.
//!
//! Inputs are a mix of well-formed MQTT 3.1.1/5 packets with random fields (every packet type,
//! every MQTT 5 property), mutations of those (bit flips, interesting bytes, cuts, splices,
//! wrong lengths) and plain random bytes. The generator is seeded: a failure prints the seed
//! and the case, and `RELAYBOX_FUZZ_SEED` replays it.
//!
//! How many: `RELAYBOX_FUZZ_CASES` (codec inputs, default 200,000) and
//! `RELAYBOX_FUZZ_CONNECTIONS` (live connections, default 2,000); the defaults keep both under
//! a minute together. Set them high for a long run. `RELAYBOX_FUZZ_REPLAY=1` runs the live
//! connections one at a time and names the first one after which the relay logged a panic.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, publish_all_v4, tail, Relay, RelayConfig, Subscriber};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relaybox::broker::{self, TopicAliases, Verdict, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEFAULT_SEED: u64 = 0x5EC0_0003;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn seed() -> u64 {
    env_u64("RELAYBOX_FUZZ_SEED", DEFAULT_SEED)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------------------------

struct Gen {
    rng: StdRng,
    /// Only valid topics, filters and QoS (for sessions that should last).
    sane: bool,
}

/// Text that tends to matter in topics, filters and ids.
const PIECES: &[&[u8]] = &[
    b"a",
    b"b",
    b"fuzz",
    b"/",
    b"#",
    b"+",
    b"$SYS",
    b"$share",
    b"%u",
    b"%c",
    b"",
    b" ",
    b"\0",
    b"\xff",
    b"\xc3\xa9",
    b"\xed\xa0\x80",
    b"\xef\xbf\xbf",
    b"//",
    b"a/#",
    b"+/+",
    b"sensors",
    b"\x7f",
    b"\xf0\x9f\x98\x80",
];

/// Bytes that tend to sit on boundaries.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x7f, 0x80, 0x81, 0xfe, 0xff, 0x10, 0x20, 0x40,
];

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen {
            rng: StdRng::seed_from_u64(seed),
            sane: false,
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    fn byte(&mut self) -> u8 {
        self.rng.random()
    }

    fn u16(&mut self) -> u16 {
        if self.sane {
            return self.rng.random_range(1..=u16::MAX);
        }
        match self.below(4) {
            0 => 0,
            1 => u16::MAX,
            2 => self.rng.random_range(1..10),
            _ => self.rng.random(),
        }
    }

    fn random_bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.byte()).collect()
    }

    fn text(&mut self) -> Vec<u8> {
        if self.sane {
            const SAFE: &[&str] = &["a", "b", "fuzz", "sensors", "x1"];
            let levels: Vec<&str> = (0..1 + self.below(3))
                .map(|_| SAFE[self.below(SAFE.len())])
                .collect();
            return levels.join("/").into_bytes();
        }
        match self.below(10) {
            0 => self.random_bytes(12),
            1 => vec![b'x'; self.below(300)],
            _ => {
                let n = self.below(5);
                let mut out = Vec::new();
                for i in 0..n {
                    if i > 0 && self.chance(0.7) {
                        out.push(b'/');
                    }
                    out.extend_from_slice(PIECES[self.below(PIECES.len())]);
                }
                out
            }
        }
    }

    /// A length-prefixed string; sometimes with a lying length.
    fn string(&mut self) -> Vec<u8> {
        let s = self.text();
        let mut len = s.len() as u16;
        if !self.sane && self.chance(0.05) {
            len = self.u16();
        }
        let mut out = len.to_be_bytes().to_vec();
        out.extend(s);
        out
    }

    fn varint(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 || out.len() == 4 {
                return out;
            }
        }
    }

    /// An MQTT 5 property block (length + properties).
    fn properties(&mut self) -> Vec<u8> {
        const BYTE: &[u8] = &[0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2a];
        const U16: &[u8] = &[0x13, 0x21, 0x22, 0x23];
        const U32: &[u8] = &[0x02, 0x11, 0x18, 0x27];
        const STRING: &[u8] = &[0x03, 0x08, 0x12, 0x15, 0x1a, 0x1c, 0x1f];
        const BINARY: &[u8] = &[0x09, 0x16];
        let mut props = Vec::new();
        if self.sane {
            if self.chance(0.3) {
                props.push(0x26);
                props.extend(self.string());
                props.extend(self.string());
            }
            let mut out = Gen::varint(props.len());
            out.extend(props);
            return out;
        }
        let count = match self.below(4) {
            0 => 0,
            1 | 2 => self.below(3),
            _ => self.below(8),
        };
        for _ in 0..count {
            match self.below(8) {
                0 => {
                    props.push(BYTE[self.below(BYTE.len())]);
                    props.push(INTERESTING[self.below(INTERESTING.len())]);
                }
                1 => {
                    props.push(U16[self.below(U16.len())]);
                    props.extend(self.u16().to_be_bytes());
                }
                2 => {
                    props.push(U32[self.below(U32.len())]);
                    let v: u32 = if self.chance(0.5) {
                        self.rng.random()
                    } else {
                        self.below(5) as u32
                    };
                    props.extend(v.to_be_bytes());
                }
                3 => {
                    props.push(0x0b);
                    props.extend(Gen::varint(self.below(300_000_000)));
                }
                4 => {
                    props.push(STRING[self.below(STRING.len())]);
                    props.extend(self.string());
                }
                5 => {
                    props.push(BINARY[self.below(BINARY.len())]);
                    props.extend(self.string());
                }
                6 => {
                    props.push(0x26);
                    props.extend(self.string());
                    props.extend(self.string());
                }
                _ => {
                    // Any id, any bytes.
                    props.push(self.byte());
                    props.extend(self.random_bytes(4));
                }
            }
        }
        let mut len = props.len();
        if self.chance(0.05) {
            len = self.below(len + 8);
        }
        let mut out = Gen::varint(len);
        out.extend(props);
        out
    }

    fn with_header(&mut self, first: u8, body: Vec<u8>) -> Vec<u8> {
        let mut out = vec![first];
        out.extend(Gen::varint(body.len()));
        out.extend(body);
        out
    }

    fn connect(&mut self, v5: bool) -> Vec<u8> {
        let mut body = Vec::new();
        let (name, level): (&[u8], u8) = match self.below(12) {
            0 => (b"MQIsdp", 3),
            1 => (b"MQTT", self.byte()),
            2 => (b"MQTX", 4),
            _ => (b"MQTT", if v5 { 5 } else { 4 }),
        };
        body.extend((name.len() as u16).to_be_bytes());
        body.extend_from_slice(name);
        body.push(level);
        let will = self.chance(0.3);
        let user = self.chance(0.3);
        let pass = user && self.chance(0.8) || self.chance(0.05);
        let mut flags = if self.chance(0.8) { 0x02 } else { 0x00 };
        if will {
            flags |= 0x04 | ((self.below(4) as u8) << 3);
            if self.chance(0.3) {
                flags |= 0x20;
            }
        }
        if user {
            flags |= 0x80;
        }
        if pass {
            flags |= 0x40;
        }
        if self.chance(0.05) {
            flags = self.byte();
        }
        body.push(flags);
        body.extend(self.u16().to_be_bytes());
        let v5 = level == 5;
        if v5 {
            body.extend(self.properties());
        }
        body.extend(self.string());
        if will {
            if v5 {
                body.extend(self.properties());
            }
            body.extend(self.string());
            body.extend(self.string());
        }
        if user {
            body.extend(self.string());
        }
        if pass {
            body.extend(self.string());
        }
        self.with_header(0x10, body)
    }

    /// A CONNECT the relay accepts (anonymous, clean session).
    fn valid_connect(&mut self, v5: bool, id: &str) -> Vec<u8> {
        let mut body = 4u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"MQTT");
        body.push(if v5 { 5 } else { 4 });
        body.push(0x02);
        body.extend(60u16.to_be_bytes());
        if v5 {
            body.push(0);
        }
        body.extend((id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        self.with_header(0x10, body)
    }

    fn publish(&mut self, v5: bool) -> Vec<u8> {
        let qos = match self.below(10) {
            0 if !self.sane => 3,
            n => (n % 3) as u8,
        };
        let mut first = 0x30 | (qos << 1);
        if self.chance(0.2) {
            first |= 0x01;
        }
        if self.chance(0.1) {
            first |= 0x08;
        }
        let mut body = self.string();
        if qos > 0 {
            body.extend(self.u16().to_be_bytes());
        }
        if v5 {
            body.extend(self.properties());
        }
        let max = if self.chance(0.05) { 6000 } else { 64 };
        let payload = self.random_bytes(max);
        body.extend(payload);
        self.with_header(first, body)
    }

    fn ack(&mut self, v5: bool, first: u8) -> Vec<u8> {
        let mut body = self.u16().to_be_bytes().to_vec();
        if v5 && self.chance(0.6) {
            body.push(INTERESTING[self.below(INTERESTING.len())]);
            if self.chance(0.6) {
                body.extend(self.properties());
            }
        }
        self.with_header(first, body)
    }

    fn subscribe(&mut self, v5: bool) -> Vec<u8> {
        let mut body = self.u16().to_be_bytes().to_vec();
        if v5 {
            body.extend(self.properties());
        }
        let n = match self.below(10) {
            0 if !self.sane => 0,
            9 => self.below(40),
            _ => 1 + self.below(4),
        };
        for _ in 0..n {
            body.extend(self.string());
            let options = if self.sane || self.chance(0.7) {
                self.below(3) as u8
            } else {
                self.byte()
            };
            body.push(options);
        }
        let first = if self.sane || self.chance(0.9) {
            0x82
        } else {
            0x80 | (self.byte() & 0x0f)
        };
        self.with_header(first, body)
    }

    fn unsubscribe(&mut self, v5: bool) -> Vec<u8> {
        let mut body = self.u16().to_be_bytes().to_vec();
        if v5 {
            body.extend(self.properties());
        }
        for _ in 0..self.below(4) {
            body.extend(self.string());
        }
        self.with_header(0xa2, body)
    }

    fn suback(&mut self, v5: bool) -> Vec<u8> {
        let mut body = self.u16().to_be_bytes().to_vec();
        if v5 {
            body.extend(self.properties());
        }
        for _ in 0..self.below(6) {
            body.push(match self.below(4) {
                0 => 0x80,
                1 => 0x87,
                2 => self.byte(),
                _ => self.below(3) as u8,
            });
        }
        self.with_header(0x90, body)
    }

    fn disconnect_or_auth(&mut self, v5: bool, first: u8) -> Vec<u8> {
        let mut body = Vec::new();
        if v5 && self.chance(0.7) {
            body.push(INTERESTING[self.below(INTERESTING.len())]);
            if self.chance(0.6) {
                body.extend(self.properties());
            }
        }
        self.with_header(first, body)
    }

    /// One well-formed-looking packet of any type.
    fn packet(&mut self, v5: bool) -> Vec<u8> {
        match self.below(20) {
            0 => self.connect(v5),
            1..=6 => self.publish(v5),
            7 => self.ack(v5, 0x40),
            8 => self.ack(v5, 0x50),
            9 => self.ack(v5, 0x62),
            10 => self.ack(v5, 0x70),
            11 | 12 => self.subscribe(v5),
            13 => self.unsubscribe(v5),
            14 => vec![0xc0, 0x00],
            15 => self.disconnect_or_auth(v5, 0xe0),
            16 => self.disconnect_or_auth(v5, 0xf0),
            17 => self.suback(v5),
            18 => {
                let first = self.byte();
                let body = self.random_bytes(16);
                self.with_header(first, body)
            }
            _ => {
                let first = [0x20, 0xb0, 0xd0, 0x00][self.below(4)];
                self.ack(v5, first)
            }
        }
    }

    fn mutate(&mut self, mut p: Vec<u8>) -> Vec<u8> {
        for _ in 0..1 + self.below(4) {
            if p.is_empty() {
                p.push(self.byte());
                continue;
            }
            let at = self.below(p.len());
            match self.below(9) {
                0 => p[at] ^= 1 << self.below(8),
                1 => p[at] = INTERESTING[self.below(INTERESTING.len())],
                2 => p[at] = self.byte(),
                3 => p.truncate(at),
                4 => {
                    let extra = self.random_bytes(8);
                    p.splice(at..at, extra);
                }
                5 => {
                    let end = (at + 1 + self.below(8)).min(p.len());
                    p.drain(at..end);
                }
                6 => {
                    // A wrong remaining length.
                    let len = match self.below(3) {
                        0 => self.below(p.len() + 4),
                        1 => self.below(300_000_000),
                        _ => p.len().saturating_sub(2) + self.below(3),
                    };
                    let body = p.get(2..).map(<[u8]>::to_vec).unwrap_or_default();
                    let mut out = vec![p[0]];
                    out.extend(Gen::varint(len));
                    out.extend(body);
                    p = out;
                }
                7 => {
                    // Continuation bits in the length.
                    if p.len() > 1 {
                        p[1] |= 0x80;
                    }
                }
                _ => {
                    let end = (at + 1 + self.below(16)).min(p.len());
                    let copy = p[at..end].to_vec();
                    p.extend(copy);
                }
            }
        }
        p
    }

    /// A packet a client may send in a session (no CONNECT, no server packets), well-formed
    /// but for its random fields.
    fn client_packet(&mut self, v5: bool) -> Vec<u8> {
        // A sane session acknowledges nothing it was not sent (the broker closes it for that).
        let pick = if self.sane {
            [0, 1, 2, 9, 10, 11][self.below(6)]
        } else {
            self.below(12)
        };
        match pick {
            0..=4 => self.publish(v5),
            5 => self.ack(v5, 0x40),
            6 => self.ack(v5, 0x50),
            7 => self.ack(v5, 0x62),
            8 => self.ack(v5, 0x70),
            9 => self.subscribe(v5),
            10 => self.unsubscribe(v5),
            _ => vec![0xc0, 0x00],
        }
    }

    /// One input: a packet, a mutated packet, several packets, or noise.
    fn input(&mut self, v5: bool) -> Vec<u8> {
        match self.below(10) {
            0..=2 => self.packet(v5),
            3..=6 => {
                let p = self.packet(v5);
                self.mutate(p)
            }
            7 => {
                let mut out = Vec::new();
                for _ in 0..2 + self.below(4) {
                    let p = self.packet(v5);
                    out.extend(if self.chance(0.5) { self.mutate(p) } else { p });
                }
                out
            }
            _ => {
                let max = if self.chance(0.1) { 4096 } else { 64 };
                self.random_bytes(max)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The codec
// ---------------------------------------------------------------------------------------------

/// Runs every codec function the gate uses on `data` and checks the answers.
fn check_codec(g: &mut Gen, data: &[u8]) {
    let max = [64, 1024, 1 << 20, usize::MAX][g.below(4)];
    for version in [Version::V4, Version::V5] {
        let _ = broker::decode_publish(version, data, max);
        let _ = broker::decode_subscribe(version, data, max);
        let _ = broker::merge_suback(version, data, &[Verdict::Allow, Verdict::Deny]);
    }
    let _ = broker::decode_connect(data, max);
    let _ = broker::packet_id(data);

    let frame = match broker::frame(data, max) {
        Ok(Some(f)) => f,
        Ok(None) | Err(_) => return,
    };
    assert!(
        frame.len <= data.len(),
        "frame longer than the input: {frame:?}"
    );
    assert!((2..=5).contains(&frame.header_len), "{frame:?}");
    assert!(frame.header_len <= frame.len, "{frame:?}");
    assert!(
        frame.len - frame.header_len <= max,
        "frame over the limit: {frame:?}"
    );
    assert_eq!((frame.kind, frame.flags), (data[0] >> 4, data[0] & 0x0f));
    let packet = &data[..frame.len];
    if let Some(id) = broker::packet_id(packet) {
        assert_eq!(
            id.to_be_bytes(),
            packet[frame.header_len..frame.header_len + 2]
        );
    }
    if let Ok(info) = broker::decode_connect(packet, max) {
        assert_eq!(frame.kind, 1);
        assert!(info.username.as_ref().is_none_or(|u| !u.is_empty()));
        assert!(info.password.as_ref().is_none_or(|p| !p.is_empty()));
    }
    for version in [Version::V4, Version::V5] {
        if let Ok(p) = broker::decode_publish(version, packet, max) {
            assert_eq!(frame.kind, 3);
            assert!(p.qos <= 2);
            assert!(p.payload.len() <= frame.len);
            let mut aliases = TopicAliases::default();
            let _ = aliases.resolve(&p);
            let _ = aliases.resolve(&p);
        }
        if let Ok(sub) = broker::decode_subscribe(version, packet, max) {
            assert_eq!(frame.kind, 8);
            let keep: Vec<bool> = sub.filters.iter().map(|_| g.chance(0.5)).collect();
            if keep.iter().any(|k| *k) {
                let subset = broker::subscribe_subset(version, packet, max, &keep)
                    .unwrap_or_else(|e| panic!("subset of a decoded SUBSCRIBE: {e}"));
                let again = broker::decode_subscribe(version, &subset, usize::MAX)
                    .unwrap_or_else(|e| panic!("subset does not decode: {e}; {}", hex(&subset)));
                let kept: Vec<&String> = sub
                    .filters
                    .iter()
                    .zip(&keep)
                    .filter_map(|(f, k)| k.then_some(f))
                    .collect();
                assert_eq!(again.filters.iter().collect::<Vec<_>>(), kept);
                assert_eq!(again.pkid, sub.pkid);
            }
            let verdicts: Vec<Verdict> = sub
                .filters
                .iter()
                .map(|f| broker::check_filter(f))
                .collect();
            let denied = broker::suback_refused(version, sub.pkid, &verdicts);
            assert_eq!(broker::packet_id(&denied), Some(sub.pkid));
        }
        if frame.kind == 9 {
            let allowed: Vec<Verdict> = (0..g.below(6))
                .map(|_| match g.below(3) {
                    0 => Verdict::Allow,
                    1 => Verdict::Deny,
                    _ => Verdict::Invalid,
                })
                .collect();
            if let Ok(merged) = broker::merge_suback(version, packet, &allowed) {
                let f = broker::frame(&merged, usize::MAX)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| panic!("merged SUBACK is not a frame: {}", hex(&merged)));
                assert_eq!((f.kind, f.len), (9, merged.len()));
                assert_eq!(broker::packet_id(&merged), broker::packet_id(packet));
            }
        }
    }
}

#[test]
fn codec_survives_arbitrary_bytes() {
    let cases = env_u64("RELAYBOX_FUZZ_CASES", 200_000);
    let seed = seed();
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Vec<u8>>> = Arc::default();
    let started = Instant::now();
    let worker = std::thread::spawn({
        let (done, finished, current) = (done.clone(), finished.clone(), current.clone());
        move || {
            let mut g = Gen::new(seed);
            for case in 0..cases {
                let v5 = g.chance(0.5);
                let data = g.input(v5);
                *current.lock().expect("current") = data.clone();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check_codec(&mut g, &data)
                }));
                if let Err(panic) = result {
                    eprintln!(
                        "codec fuzz failed at case {case} (RELAYBOX_FUZZ_SEED={seed}), input {}",
                        hex(&data)
                    );
                    std::panic::resume_unwind(panic);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            finished.store(true, Ordering::Relaxed);
        }
    });
    // Watchdog: progress at least every 10 s.
    let mut last = (0, Instant::now());
    while !finished.load(Ordering::Relaxed) && !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let now = done.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            panic!(
                "codec stuck for 10 s at case {now} (RELAYBOX_FUZZ_SEED={seed}), input {}",
                hex(&current.lock().expect("current"))
            );
        }
    }
    worker
        .join()
        .expect("codec fuzz found a panic (input above)");
    eprintln!(
        "codec fuzz: {} inputs in {:.1?} (seed {seed})",
        done.load(Ordering::Relaxed),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// The live relay
// ---------------------------------------------------------------------------------------------

/// Sends `chunks` on a fresh connection and reads until the relay closes it or goes quiet;
/// every step bounded. Returns how the connection ended.
async fn fuzz_connection(port: u16, chunks: Vec<Vec<u8>>) -> &'static str {
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return "connect failed";
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.split();
    let reading = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut answered = false;
        loop {
            match tokio::time::timeout(Duration::from_millis(150), rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) if answered => return "answered, then closed by the relay",
                Ok(Ok(0)) | Ok(Err(_)) => return "closed by the relay without an answer",
                Ok(Ok(_)) => answered = true,
                Err(_) if answered => return "answered, then quiet",
                Err(_) => return "quiet without an answer",
            }
        }
    };
    let writing = async {
        for chunk in chunks {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let both = async {
        let (_, end) = tokio::join!(writing, reading);
        end
    };
    tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .unwrap_or("still busy after 5 s")
}

/// The byte stream of connection `case`: with or without a valid CONNECT first, then inputs,
/// cut into chunks.
fn connection_bytes(g: &mut Gen, case: u64) -> Vec<Vec<u8>> {
    let v5 = g.chance(0.5);
    let mut stream = Vec::new();
    match case % 5 {
        // No CONNECT: noise or packets.
        0 => stream.extend(g.input(v5)),
        // A mutated or random CONNECT, then packets.
        1 => {
            let c = g.connect(v5);
            stream.extend(if g.chance(0.7) { g.mutate(c) } else { c });
            for _ in 0..g.below(5) {
                stream.extend(g.input(v5));
            }
        }
        // A valid CONNECT, then a longer session of client packets, a few of them mutated.
        4 => {
            stream.extend(g.valid_connect(v5, &format!("fuzz-{case}")));
            g.sane = g.chance(0.8);
            for _ in 0..5 + g.below(40) {
                let p = g.client_packet(v5);
                stream.extend(if g.chance(0.03) { g.mutate(p) } else { p });
            }
        }
        // A valid CONNECT, then inputs.
        _ => {
            stream.extend(g.valid_connect(v5, &format!("fuzz-{case}")));
            for _ in 0..1 + g.below(12) {
                stream.extend(g.input(v5));
            }
        }
    }
    let mut chunks = Vec::new();
    while !stream.is_empty() {
        let n = 1 + g.below(stream.len().min(2048));
        chunks.push(stream.drain(..n).collect());
    }
    chunks
}

/// The generator seed of live connection `case`.
fn case_seed(seed: u64, case: u64) -> u64 {
    seed ^ case.wrapping_mul(0x9e37_79b9)
}

/// A normal client still subscribes, publishes and receives.
async fn assert_serves(relay: &mut Relay, round: u64) {
    // A panic first: it says more than a health check that fails because of it.
    assert_no_panic(relay);
    let topic = format!("fuzz/health/{round}");
    let sub = Subscriber::start(relay.port(), &format!("health-sub-{round}"), &[&topic]).await;
    publish_all_v4(
        relay.port(),
        &format!("health-pub-{round}"),
        &topic,
        vec![b"ok".to_vec()],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        sub.wait_for(1, Duration::from_secs(10)).await,
        1,
        "round {round}"
    );
    assert!(
        relay.exited().is_none(),
        "relay exited:\n{}",
        tail(&relay.log(), 40)
    );
    assert_no_panic(relay);
}

/// Fails with the relay's panic message (and what follows) if its log holds one.
fn assert_no_panic(relay: &Relay) {
    let log = relay.log();
    if let Some(at) = log.find("panicked") {
        let from = log[..at].rfind('\n').map_or(0, |i| i + 1);
        let panic: Vec<&str> = log[from..]
            .lines()
            .filter(|l| !l.trim_start().starts_with("at "))
            .take(40)
            .collect();
        panic!(
            "the relay panicked (RELAYBOX_FUZZ_SEED={}):\n{}",
            seed(),
            panic.join("\n")
        );
    }
}

/// The reasons in the relay's "closed client connection" lines, counted (for the report);
/// numbers are blanked so that like reasons count together.
fn close_reasons(log: &str) -> Vec<(String, u64)> {
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for line in log
        .lines()
        .filter(|l| l.contains("closed client connection"))
    {
        let reason = line
            .split_once(" error=")
            .or_else(|| line.split_once(" reason="))
            .map_or("?", |(_, r)| r);
        let reason: String = reason
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(90)
            .collect();
        *counts.entry(reason).or_default() += 1;
    }
    let mut list: Vec<_> = counts.into_iter().collect();
    list.sort_by_key(|r| std::cmp::Reverse(r.1));
    list.truncate(15);
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_relay_survives_arbitrary_streams() {
    let connections = env_u64("RELAYBOX_FUZZ_CONNECTIONS", 2_000);
    let seed = seed();
    // An uplink to a port nothing listens on: exported messages go to the outbox and stay.
    let cfg = RelayConfig::new("fuzz")
        .uplink(&format!("nats://127.0.0.1:{}", free_port()))
        .export("fuzz/#")
        .outbox(4 * 1024 * 1024, "drop-oldest")
        .mqtt("max_packet_size = 4096")
        .mqtt("max_inflight = 16")
        .mqtt("connect_timeout_ms = 1000");
    let acl = "[[acl]]\nuser = \"*\"\npublish = [\"fuzz/#\", \"a/#\", \"%c/#\"]\n\
               subscribe = [\"fuzz/#\", \"a/+\", \"$share/g/a/#\"]\n";
    let mut relay = Relay::start_with_extra(cfg, acl).await;
    let port = relay.port();
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let ends: Arc<Mutex<std::collections::BTreeMap<&'static str, u64>>> = Arc::default();
    const WORKERS: u64 = 8;
    // A health check after every batch: about 40 in a run, at least every 100 connections.
    let batch = (connections / 40).max(100);
    let mut round = 0;
    if std::env::var_os("RELAYBOX_FUZZ_REPLAY").is_some() {
        // One connection at a time, the log checked after each: names the case that did it.
        for case in 0..connections {
            let chunks = connection_bytes(&mut Gen::new(case_seed(seed, case)), case);
            let bytes: Vec<u8> = chunks.concat();
            let end = fuzz_connection(port, chunks).await;
            *ends.lock().expect("ends").entry(end).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if relay.log().contains("panicked") {
                eprintln!(
                    "case {case} (seed {seed}) was followed by a panic; its bytes: {}",
                    hex(&bytes)
                );
                assert_no_panic(&relay);
            }
        }
        next.store(connections, Ordering::Relaxed);
    }
    while next.load(Ordering::Relaxed) < connections {
        let batch_end = (next.load(Ordering::Relaxed) + batch).min(connections);
        let tasks: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (next, ends) = (next.clone(), ends.clone());
                tokio::spawn(async move {
                    loop {
                        let case = next.fetch_add(1, Ordering::Relaxed);
                        if case >= batch_end {
                            next.fetch_min(batch_end, Ordering::Relaxed);
                            return;
                        }
                        let chunks = connection_bytes(&mut Gen::new(case_seed(seed, case)), case);
                        let end = fuzz_connection(port, chunks).await;
                        // A relay that stops accepting would make every later case wait for
                        // its connect timeout: fail at once instead.
                        assert_ne!(
                            end, "connect failed",
                            "the relay stopped accepting connections (case {case})"
                        );
                        *ends.lock().expect("ends").entry(end).or_default() += 1;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("fuzz worker");
        }
        round += 1;
        assert_serves(&mut relay, round).await;
    }
    let ends = ends.lock().expect("ends").clone();
    eprintln!(
        "live fuzz: {connections} connections in {:.1?} (seed {seed}); endings {ends:?}",
        started.elapsed()
    );
    eprintln!("live fuzz: why the relay closed connections:");
    for (reason, n) in close_reasons(&relay.log()) {
        eprintln!("{n:>8}  {reason}");
    }
    assert_eq!(ends.values().sum::<u64>(), connections);
    assert!(!ends.contains_key("connect failed"), "{ends:?}");
}

/// Found by the live fuzz: a message an MQTT 5 client published with properties (a user
/// property, a message expiry) reached `unreachable!()` in rumqttd's 3.1.1 encoder, which killed
/// the link of every MQTT 3.1.1 subscriber of the topic: they silently received nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_properties_do_not_break_mqtt311_subscribers() {
    let relay = Relay::start(RelayConfig::new("fuzz-props")).await;
    let port = relay.port();
    let v4 = Subscriber::start(port, "v4-sub", &["p/#"]).await;
    let mut publisher = common::raw::RawConn::open(port);
    publisher.handshake(&common::raw::connect_v5("v5-pub"));
    let publish = |topic: &str, properties: &[u8], pkid: u16| {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend(pkid.to_be_bytes());
        body.push(properties.len() as u8);
        body.extend_from_slice(properties);
        body.extend_from_slice(b"payload");
        common::raw::packet(0x32, &body)
    };
    let user_property = [0x26, 0, 1, b'k', 0, 1, b'v'];
    let expiry = [0x02, 0, 0, 0, 60];
    for (i, (topic, props)) in [
        ("p/user-property", &user_property[..]),
        ("p/expiry", &expiry[..]),
        ("p/none", &[][..]),
    ]
    .into_iter()
    .enumerate()
    {
        publisher
            .send(&publish(topic, props, i as u16 + 1))
            .expect("publish");
        let ack = tokio::task::block_in_place(|| publisher.read(Duration::from_secs(5)));
        assert!(
            matches!(ack, common::raw::Got::Packet(0x40, _)),
            "{topic}: {ack:?}"
        );
    }
    assert_eq!(v4.wait_for(3, Duration::from_secs(5)).await, 3);
    let topics: Vec<String> = v4.snapshot().into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, ["p/user-property", "p/expiry", "p/none"]);
    assert!(
        !relay.log().contains("panicked"),
        "{}",
        tail(&relay.log(), 30)
    );
}

/// Found by the live fuzz: rumqttd's router drops a CONNECT whose client id holds `+ $ # /`
/// and leaves a stale entry; a second CONNECT with that id panicked in rumqttd's server while
/// it held a lock, and from then on no MQTT 3.1.1 (or 5) client could connect at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_the_router_cannot_take_are_refused_and_harm_no_one() {
    use common::raw::{self, Got, RawConn};
    let relay = Relay::start(RelayConfig::new("fuzz-ids")).await;
    let port = relay.port();
    tokio::task::block_in_place(|| {
        for (level, id, code) in [
            (4, "bad/id", 0x02),
            (4, "bad/id", 0x02),
            (4, "$SYS", 0x02),
            (5, "a+b", 0x85),
            (5, "a+b", 0x85),
            (5, "#", 0x85),
        ] {
            let mut conn = RawConn::open(port);
            conn.send(&raw::connect_with(b"MQTT", level, id))
                .expect("send CONNECT");
            match conn.read(Duration::from_secs(5)) {
                Got::Packet(0x20, body) => assert_eq!(body[1], code, "client id {id:?}"),
                other => panic!("client id {id:?}: {other:?}"),
            }
            assert!(conn.closed_within(Duration::from_secs(5)), "{id:?}");
        }
        RawConn::open(port).handshake(&raw::connect_v4("fine-v4"));
        RawConn::open(port).handshake(&raw::connect_v5("fine-v5"));
    });
    assert!(
        !relay.log().contains("panicked"),
        "{}",
        tail(&relay.log(), 30)
    );
}

/// Found by the live fuzz: rumqttd's topic matching slices the first byte of a topic as a
/// string; a PUBLISH to a topic starting with a non-ASCII character panicked in the router
/// thread, after which nothing was routed and the relay soon accepted no connection at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_starting_with_a_non_ascii_character_cannot_stop_the_router() {
    use common::raw::{self, Got, RawConn};
    let relay = Relay::start(RelayConfig::new("fuzz-utf8")).await;
    let port = relay.port();
    let sub = Subscriber::start(port, "utf8-sub", &["#"]).await;
    tokio::task::block_in_place(|| {
        for (v5, topic) in [(true, "é/x"), (false, "温度"), (true, "😀")] {
            let mut conn = RawConn::open(port);
            conn.handshake(&if v5 {
                raw::connect_v5("utf8-pub")
            } else {
                raw::connect_v4("utf8-pub")
            });
            conn.send(&raw::publish_qos1(topic, b"x", 1, v5))
                .expect("publish");
            if v5 {
                match conn.read(Duration::from_secs(5)) {
                    Got::Packet(0xe0, body) => assert_eq!(body[0], 0x90, "{topic}"),
                    other => panic!("{topic}: expected DISCONNECT 0x90, got {other:?}"),
                }
            }
            assert!(conn.closed_within(Duration::from_secs(5)), "{topic}");
        }
    });
    // Non-ASCII further on is fine, and the router still routes.
    publish_all_v4(
        port,
        "utf8-ok",
        "x/é",
        vec![b"fine".to_vec()],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(sub.wait_for(1, Duration::from_secs(5)).await, 1);
    assert_eq!(sub.snapshot()[0].0, "x/é");
    assert_no_panic(&relay);
}
