//! Fuzzing the gate's packet handling with seeded random input (a property test: whatever the
//! bytes, nothing panics, nothing hangs, and the relay keeps serving).
//!
//! - `packet_path_survives_mutated_input` runs inputs through the broker core's packet path in
//!   process, as the client connection driver does: `codec::frame` over the input as a byte
//!   stream, `decode_connect` for a CONNECT, `decode` (3.1.1 and 5) for every other frame; a
//!   PUBLISH goes through topic-alias resolution and `topic::check_topic`, and one that would be
//!   routed is re-encoded with `encode_publish` for a 3.1.1 and an MQTT 5 subscriber and must
//!   frame and decode back equal; every SUBSCRIBE / UNSUBSCRIBE filter goes through
//!   `Filter::parse` (and `topic::matches` against the topics seen); the answers the gate sends
//!   (CONNACK, PUBACK…PUBCOMP, SUBACK, UNSUBACK, PINGRESP, DISCONNECT) are encoded and must frame
//!   and decode. No input may panic (each runs under `catch_unwind`; a failure prints its hex),
//!   framing never claims more than the buffer and agrees with a reference reading of the fixed
//!   header, and every refusal is a `CodecError` of the kind that step may give. A watchdog
//!   fails the test if one input takes more than 10 s.
//! - `fuzz_seeds_are_valid_packets` checks the generator's valid encodings of every packet type
//!   for 3.1.1 and 5 (the seeds the fuzz mutates) against the codec and against mqtt-proto.
//! - `live_relay_survives_arbitrary_streams` opens many connections to a real relay (ACL rules,
//!   an export with its outbox, small limits) and sends random and mutated byte streams, with
//!   and without a valid CONNECT first; between batches and at the end a normal client must
//!   still subscribe, publish and receive, the process must be running and its log must hold
//!   no panic.
//! - The last tests are regressions of crashes the live fuzz found in the former broker
//!   (rumqttd), kept as what a user wants of the relay: client ids and topics with any UTF-8,
//!   MQTT 5 properties delivered to 3.1.1 and 5 subscribers.
//!
//! Inputs are a mix of valid encodings of every packet type (hand-built, and the broker's own
//! encoders for the packets a server sends), well-formed-looking MQTT 3.1.1/5 packets with
//! random fields (every packet type, every MQTT 5 property), mutations of both (bit flips,
//! interesting bytes, cuts, splices, wrong lengths) and plain random bytes. The generator is
//! seeded: a failure prints the seed and the case, and `RELAYBOX_FUZZ_SEED` (with
//! `RELAYBOX_FUZZ_CASE` for the in-process fuzz) replays it.
//!
//! How many: `RELAYBOX_FUZZ_INPUTS` (in-process inputs, default 150,000: 4 to 7 s in a debug
//! build on 2 cores, under 20 s beside the live tests) and `RELAYBOX_FUZZ_CONNECTIONS` (live
//! connections, default 2,000). For a long run, in release (about 500,000 inputs/s on 2 cores):
//! `RELAYBOX_FUZZ_INPUTS=10000000 cargo test --release --test fuzz_gate -- packet_path
//! --nocapture`. It prints its progress, goes on after a failure and at the end fails with the
//! first input (case and hex) of each kind of failure. `RELAYBOX_FUZZ_REPLAY=1` runs the live
//! connections one at a time and names the first one after which the relay logged a panic.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::raw::{Got, RawConn};
use common::{free_port, publish_all_v4, tail, Relay, RelayConfig, Subscriber};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relaybox::broker::codec::{self, CodecError, Frame, Inbound, Outgoing, ServerProps, Version};
use relaybox::broker::message::{Message, Origin, Properties};
use relaybox::broker::topic::{self, Filter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEFAULT_SEED: u64 = 0x5EC0_0003;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
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
// Valid encodings of every packet type (the seeds the fuzz mutates)
// ---------------------------------------------------------------------------------------------

/// Levels of valid topic names: any UTF-8 but U+0000, `+` and `#`; non-ASCII first characters
/// and `$` among them.
const LEVELS: &[&str] = &[
    "a", "b", "fuzz", "sensors", "x1", "", "é", "温度", "😀", "$SYS", " ", "ü", "$share", "k",
];

/// Text for client ids, user names, property strings: any UTF-8 but U+0000.
const TEXT: &[&str] = &[
    "a", "fuzz", "+", "#", "/", "$", "é", "温度", "😀", " ", "id", "\u{7f}", "\u{ffff}", "",
];

/// MQTT 5 reason codes a client may send, per packet.
const PUBACK_REASONS: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_REASONS: &[u8] = &[0x00, 0x92];
const DISCONNECT_REASONS: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
];
const AUTH_REASONS: &[u8] = &[0x00, 0x18, 0x19];
/// MQTT 5 reason codes the gate puts in a server DISCONNECT.
const SERVER_DISCONNECT_REASONS: &[u8] = &[
    0x80, 0x81, 0x82, 0x87, 0x8b, 0x8d, 0x8e, 0x90, 0x93, 0x94, 0x95, 0x97,
];

/// What a seed is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeedKind {
    /// The packet type.
    kind: u8,
    /// Written by the broker's own encoders (a packet a server sends).
    server: bool,
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

impl Gen {
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }

    fn pick_byte(&mut self, from: &[u8]) -> u8 {
        from[self.below(from.len())]
    }

    fn nonzero_u16(&mut self) -> u16 {
        self.rng.random_range(1..=u16::MAX)
    }

    fn valid_text(&mut self) -> String {
        if self.chance(0.02) {
            // Long, with multibyte characters across every boundary.
            return format!(
                "{}{}",
                "a".repeat(self.below(3)),
                "é温".repeat(self.below(120))
            );
        }
        (0..self.below(4)).map(|_| self.pick(TEXT)).collect()
    }

    /// A topic name: not empty, no wildcard.
    fn valid_topic(&mut self) -> String {
        let n = 1 + self.below(4);
        let t = (0..n)
            .map(|_| self.pick(LEVELS))
            .collect::<Vec<_>>()
            .join("/");
        if t.is_empty() {
            "/".to_owned()
        } else {
            t
        }
    }

    /// A topic filter: wildcards where they may be, sometimes shared.
    fn valid_filter(&mut self) -> String {
        let n = 1 + self.below(4);
        let mut levels: Vec<&str> = (0..n)
            .map(|_| {
                if self.chance(0.25) {
                    "+"
                } else {
                    self.pick(LEVELS)
                }
            })
            .collect();
        if self.chance(0.3) {
            levels.push("#");
        }
        // A first level `$share` makes a shared subscription: only with a group and a filter.
        if levels[0] == "$share" {
            levels[0] = "$shared";
        }
        let f = levels.join("/");
        let f = if f.is_empty() { "#".to_owned() } else { f };
        if self.chance(0.1) {
            format!("$share/{}/{f}", ["g", "grüppe", "$"][self.below(3)])
        } else {
            f
        }
    }

    /// A valid MQTT 5 property block with some of `ids` (each once, user properties up to
    /// three times) and all of `always`; also whether it says the payload is UTF-8.
    fn valid_props(&mut self, ids: &[u8], always: &[u8]) -> (Vec<u8>, bool) {
        let mut props = Vec::new();
        let mut utf8 = false;
        let mut method = false;
        for &id in ids {
            if !always.contains(&id) && !self.chance(0.35) {
                continue;
            }
            let times = if id == 0x26 { 1 + self.below(3) } else { 1 };
            for _ in 0..times {
                match id {
                    0x01 => {
                        let v = self.below(2) as u8;
                        utf8 = v == 1;
                        props.extend([id, v]);
                    }
                    0x17 | 0x19 => props.extend([id, self.below(2) as u8]),
                    0x02 | 0x11 | 0x18 => {
                        props.push(id);
                        let v: u32 = match self.below(3) {
                            0 => self.below(120) as u32,
                            1 => u32::MAX,
                            _ => self.rng.random(),
                        };
                        props.extend(v.to_be_bytes());
                    }
                    0x27 => {
                        props.push(id);
                        props.extend(self.rng.random_range(1..=u32::MAX).to_be_bytes());
                    }
                    0x21 => {
                        props.push(id);
                        props.extend(self.nonzero_u16().to_be_bytes());
                    }
                    0x22 => {
                        props.push(id);
                        props.extend(self.rng.random::<u16>().to_be_bytes());
                    }
                    0x23 => {
                        // Mostly within the gate's Topic Alias Maximum (64).
                        let alias = if self.chance(0.9) {
                            1 + self.below(70) as u16
                        } else {
                            self.nonzero_u16()
                        };
                        props.push(id);
                        props.extend(alias.to_be_bytes());
                    }
                    0x0b => {
                        props.push(id);
                        props.extend(Gen::varint(self.rng.random_range(1..=268_435_455)));
                    }
                    0x15 => {
                        method = true;
                        props.push(id);
                        let m = self.valid_text();
                        put_str(&mut props, m.as_bytes());
                    }
                    0x16 => {
                        // Authentication Data only with a method (listed after it).
                        if method {
                            props.push(id);
                            let d = self.random_bytes(16);
                            put_str(&mut props, &d);
                        }
                    }
                    0x08 => {
                        props.push(id);
                        let t = self.valid_topic();
                        put_str(&mut props, t.as_bytes());
                    }
                    0x09 => {
                        props.push(id);
                        let d = self.random_bytes(16);
                        put_str(&mut props, &d);
                    }
                    0x26 => {
                        props.push(id);
                        let (k, v) = (self.valid_text(), self.valid_text());
                        put_str(&mut props, k.as_bytes());
                        put_str(&mut props, v.as_bytes());
                    }
                    // Strings: content type, reason string, server reference.
                    _ => {
                        props.push(id);
                        let s = self.valid_text();
                        put_str(&mut props, s.as_bytes());
                    }
                }
            }
        }
        let mut out = Gen::varint(props.len());
        out.extend(props);
        (out, utf8)
    }

    fn valid_payload(&mut self, utf8: bool) -> Vec<u8> {
        if utf8 {
            return self.valid_text().into_bytes();
        }
        let max = if self.chance(0.05) { 3000 } else { 48 };
        self.random_bytes(max)
    }

    /// A CONNECT the codec accepts (with a will, credentials and properties, or not).
    fn valid_connect_packet(&mut self, v5: bool) -> Vec<u8> {
        let mut body = Vec::new();
        let (name, level): (&[u8], u8) = if v5 {
            (b"MQTT", 5)
        } else if self.chance(0.1) {
            (b"MQIsdp", 3)
        } else {
            (b"MQTT", 4)
        };
        put_str(&mut body, name);
        body.push(level);
        let clean = self.chance(0.7);
        let will = self.chance(0.4);
        let user = self.chance(0.4);
        // 3.1.1: a password only with a user name [MQTT-3.1.2-22].
        let pass = if v5 {
            self.chance(0.3)
        } else {
            user && self.chance(0.7)
        };
        let mut flags = u8::from(clean) << 1;
        if will {
            flags |= 0x04 | ((self.below(3) as u8) << 3);
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
        body.push(flags);
        body.extend(self.rng.random::<u16>().to_be_bytes());
        if v5 {
            let ids = [0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16];
            body.extend(self.valid_props(&ids, &[]).0);
        }
        let mut id = self.valid_text();
        if id.is_empty() && !clean {
            // 3.1.1: an empty client id only with a clean session [MQTT-3.1.3-7].
            id.push('c');
        }
        put_str(&mut body, id.as_bytes());
        if will {
            let mut utf8 = false;
            if v5 {
                let (p, u) = self.valid_props(&[0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26], &[]);
                body.extend(p);
                utf8 = u;
            }
            let topic = self.valid_topic();
            put_str(&mut body, topic.as_bytes());
            let payload = self.valid_payload(utf8);
            put_str(&mut body, &payload);
        }
        if user {
            let u = self.valid_text();
            put_str(&mut body, u.as_bytes());
        }
        if pass {
            // The codec takes UTF-8 passwords only.
            let p = self.valid_text();
            put_str(&mut body, p.as_bytes());
        }
        self.with_header(0x10, body)
    }

    fn valid_publish_packet(&mut self, v5: bool) -> Vec<u8> {
        let qos = self.below(3) as u8;
        let mut first = 0x30 | (qos << 1);
        if self.chance(0.3) {
            first |= 0x01;
        }
        if qos > 0 && self.chance(0.2) {
            first |= 0x08;
        }
        // MQTT 5: sometimes the topic by alias alone (an empty topic name and an alias).
        let by_alias = v5 && self.chance(0.15);
        let mut body = Vec::new();
        let topic = if by_alias {
            String::new()
        } else {
            self.valid_topic()
        };
        put_str(&mut body, topic.as_bytes());
        if qos > 0 {
            body.extend(self.nonzero_u16().to_be_bytes());
        }
        let mut utf8 = false;
        if v5 {
            let always: &[u8] = if by_alias { &[0x23] } else { &[] };
            let (p, u) = self.valid_props(&[0x01, 0x02, 0x23, 0x08, 0x09, 0x26, 0x03], always);
            body.extend(p);
            utf8 = u;
        }
        body.extend(self.valid_payload(utf8));
        self.with_header(first, body)
    }

    /// PUBACK (4), PUBREC (5), PUBREL (6) or PUBCOMP (7).
    fn valid_ack_packet(&mut self, v5: bool, kind: u8) -> Vec<u8> {
        let mut body = self.nonzero_u16().to_be_bytes().to_vec();
        if v5 && self.chance(0.6) {
            let reasons = if kind <= 5 {
                PUBACK_REASONS
            } else {
                PUBREL_REASONS
            };
            body.push(self.pick_byte(reasons));
            if self.chance(0.6) {
                body.extend(self.valid_props(&[0x1f, 0x26], &[]).0);
            }
        }
        let first = (kind << 4) | if kind == 6 { 0x02 } else { 0 };
        self.with_header(first, body)
    }

    fn valid_subscribe_packet(&mut self, v5: bool) -> Vec<u8> {
        let mut body = self.nonzero_u16().to_be_bytes().to_vec();
        if v5 {
            body.extend(self.valid_props(&[0x0b, 0x26], &[]).0);
        }
        for _ in 0..1 + self.below(4) {
            let f = self.valid_filter();
            put_str(&mut body, f.as_bytes());
            let mut options = self.below(3) as u8;
            if v5 {
                // No Local, Retain As Published, Retain Handling 0..=2.
                options |= (self.below(4) as u8) << 2 | (self.below(3) as u8) << 4;
            }
            body.push(options);
        }
        self.with_header(0x82, body)
    }

    fn valid_unsubscribe_packet(&mut self, v5: bool) -> Vec<u8> {
        let mut body = self.nonzero_u16().to_be_bytes().to_vec();
        if v5 {
            body.extend(self.valid_props(&[0x26], &[]).0);
        }
        for _ in 0..1 + self.below(4) {
            let f = self.valid_filter();
            put_str(&mut body, f.as_bytes());
        }
        self.with_header(0xa2, body)
    }

    fn valid_disconnect_packet(&mut self, v5: bool) -> Vec<u8> {
        let mut body = Vec::new();
        if v5 && self.chance(0.7) {
            body.push(self.pick_byte(DISCONNECT_REASONS));
            if self.chance(0.6) {
                body.extend(self.valid_props(&[0x11, 0x1f, 0x26, 0x1c], &[]).0);
            }
        }
        self.with_header(0xe0, body)
    }

    fn valid_auth_packet(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        if self.chance(0.8) {
            body.push(self.pick_byte(AUTH_REASONS));
            body.extend(self.valid_props(&[0x15, 0x16, 0x1f, 0x26], &[]).0);
        }
        self.with_header(0xf0, body)
    }

    /// A message as the router carries it, with random MQTT 5 properties.
    fn message(&mut self) -> Message {
        let mut props = Properties::default();
        if self.chance(0.5) {
            if self.chance(0.3) {
                props.expiry = Some(1 + self.below(1000) as u32);
            }
            if self.chance(0.3) {
                props.content_type = Some(Arc::from(self.valid_text()));
            }
            if self.chance(0.3) {
                props.response_topic = Some(Arc::from(self.valid_topic()));
            }
            if self.chance(0.3) {
                props.correlation_data = Some(Bytes::from(self.random_bytes(8)));
            }
            for _ in 0..self.below(3) {
                props
                    .user
                    .push((Arc::from(self.valid_text()), Arc::from(self.valid_text())));
            }
        }
        let utf8 = self.chance(0.2);
        if utf8 || self.chance(0.1) {
            props.payload_is_utf8 = Some(utf8);
        }
        let payload = self.valid_payload(utf8);
        Message::new(
            Arc::from(self.valid_topic()),
            Bytes::from(payload),
            self.below(3) as u8,
            self.chance(0.3),
            props,
            Origin::Internal,
        )
    }

    /// A packet a server sends, written by the broker's own encoders.
    fn server_packet(&mut self, version: Version) -> (u8, Vec<u8>) {
        let kinds: &[u8] = match version {
            Version::V4 => &[2, 3, 4, 5, 6, 7, 9, 11, 13],
            Version::V5 => &[2, 3, 4, 5, 6, 7, 9, 11, 13, 14],
        };
        let kind = self.pick_byte(kinds);
        let bytes = match kind {
            2 => {
                let id = self.valid_text();
                let props = self.server_props(&id);
                let code = match version {
                    Version::V4 => self.below(6) as u8,
                    Version::V5 => self.pick_byte(&[0x00, 0x80, 0x82, 0x84, 0x85, 0x86, 0x87]),
                };
                codec::connack(version, self.chance(0.5), code, &props).to_vec()
            }
            3 => {
                let msg = self.message();
                let qos = msg.qos;
                let out = Outgoing {
                    qos,
                    pid: if qos > 0 { self.nonzero_u16() } else { 0 },
                    retain: msg.retain,
                    dup: qos > 0 && self.chance(0.2),
                    sub_ids: &[],
                    alias: None,
                    expiry: msg.props.expiry,
                };
                let mut b = BytesMut::new();
                codec::encode_publish(version, &msg, &out, &mut b);
                b.to_vec()
            }
            4..=7 => {
                let reasons = if kind <= 5 {
                    PUBACK_REASONS
                } else {
                    PUBREL_REASONS
                };
                let reason = self.pick_byte(reasons);
                let why = self.chance(0.3).then(|| self.valid_text());
                let pid = self.nonzero_u16();
                codec::ack(version, kind, pid, reason, why.as_deref()).to_vec()
            }
            9 => {
                let codes: Vec<u8> = (0..1 + self.below(5))
                    .map(|_| self.pick_byte(&[0, 1, 2, 0x80, 0x87, 0x8f]))
                    .collect();
                let why = self.chance(0.3).then(|| self.valid_text());
                codec::suback(version, self.nonzero_u16(), &codes, why.as_deref()).to_vec()
            }
            11 => {
                let codes: Vec<u8> = (0..1 + self.below(5))
                    .map(|_| self.pick_byte(&[0, 0x11, 0x8f]))
                    .collect();
                codec::unsuback(version, self.nonzero_u16(), &codes).to_vec()
            }
            13 => codec::pingresp().to_vec(),
            _ => {
                let reason = self.pick_byte(SERVER_DISCONNECT_REASONS);
                let why = self.chance(0.5).then(|| self.valid_text());
                codec::disconnect(version, reason, why.as_deref())
                    .expect("an MQTT 5 DISCONNECT")
                    .to_vec()
            }
        };
        (kind, bytes)
    }

    fn server_props<'a>(&mut self, id: &'a str) -> ServerProps<'a> {
        let mut p = ServerProps::default();
        if self.chance(0.5) {
            p.receive_maximum = Some(self.nonzero_u16());
            p.maximum_packet_size = Some(self.rng.random_range(1..=u32::MAX));
            p.topic_alias_maximum = Some(self.rng.random());
        }
        if self.chance(0.3) {
            p.assigned_client_id = Some(id);
        }
        if self.chance(0.3) {
            p.session_expiry = Some(self.rng.random());
            p.server_keep_alive = Some(self.rng.random());
            p.maximum_qos = Some(self.below(2) as u8);
            p.retain_available = Some(self.chance(0.5));
            p.wildcards = Some(self.chance(0.5));
            p.subscription_ids = Some(self.chance(0.5));
            p.shared = Some(self.chance(0.5));
        }
        if self.chance(0.3) {
            p.reason = Some("a reason: é温😀");
        }
        p
    }

    /// A valid packet a client sends (no CONNECT).
    fn valid_client_packet(&mut self, v5: bool) -> (u8, Vec<u8>) {
        let kinds: &[u8] = if v5 {
            &[3, 3, 3, 4, 5, 6, 7, 8, 8, 10, 12, 14, 15]
        } else {
            &[3, 3, 3, 4, 5, 6, 7, 8, 8, 10, 12, 14]
        };
        let kind = self.pick_byte(kinds);
        let bytes = match kind {
            3 => self.valid_publish_packet(v5),
            4..=7 => self.valid_ack_packet(v5, kind),
            8 => self.valid_subscribe_packet(v5),
            10 => self.valid_unsubscribe_packet(v5),
            12 => vec![0xc0, 0x00],
            14 => self.valid_disconnect_packet(v5),
            _ => self.valid_auth_packet(),
        };
        (kind, bytes)
    }

    /// A valid encoding of any packet type of 3.1.1 (`v5` false) or 5.
    fn seed_packet(&mut self, v5: bool) -> (SeedKind, Vec<u8>) {
        match self.below(10) {
            0 | 1 => (
                SeedKind {
                    kind: 1,
                    server: false,
                },
                self.valid_connect_packet(v5),
            ),
            2 | 3 => {
                let version = if v5 { Version::V5 } else { Version::V4 };
                let (kind, bytes) = self.server_packet(version);
                (seed_kind(kind, true), bytes)
            }
            _ => {
                let (kind, bytes) = self.valid_client_packet(v5);
                (seed_kind(kind, false), bytes)
            }
        }
    }

    /// One input for the in-process fuzz.
    fn fuzz_input(&mut self) -> Vec<u8> {
        let v5 = self.chance(0.5);
        match self.below(20) {
            // A valid encoding, mutated.
            0..=6 => {
                let (_, p) = self.seed_packet(v5);
                self.mutate(p)
            }
            // A valid session: CONNECT, then valid packets, a few of them mutated.
            7 | 8 => {
                let mut out = self.valid_connect_packet(v5);
                for _ in 0..1 + self.below(8) {
                    let (_, p) = self.valid_client_packet(v5);
                    out.extend(if self.chance(0.1) { self.mutate(p) } else { p });
                }
                out
            }
            // Valid encodings as they are.
            9 | 10 => {
                let mut out = Vec::new();
                for _ in 0..1 + self.below(3) {
                    out.extend(self.seed_packet(v5).1);
                }
                out
            }
            // Random fields, mutations, splices, noise.
            _ => self.input(v5),
        }
    }
}

fn seed_kind(kind: u8, server: bool) -> SeedKind {
    SeedKind { kind, server }
}

// ---------------------------------------------------------------------------------------------
// The packet path, in process
// ---------------------------------------------------------------------------------------------

/// What the fuzz saw (for the report, and to check that it reached every part of the path).
#[derive(Default)]
struct Stats {
    inputs: u64,
    frames: u64,
    connects: [u64; 2],
    /// Decoded client packets by version and packet type.
    decoded: [[u64; 16]; 2],
    /// Refusals by where they came from and their kind.
    errors: BTreeMap<String, u64>,
    /// PUBLISHes that would be routed, re-encoded and decoded back (3.1.1, 5).
    round_trips: [u64; 2],
    bad_topics: u64,
    bad_aliases: u64,
    filters_valid: u64,
    filters_invalid: u64,
    /// Filters the codec let through that `Filter::parse` refuses (the gate answers 0x8F).
    filters_refused_by_topic: u64,
    matches: u64,
    answers: u64,
}

impl Stats {
    fn error(&mut self, step: &str, e: &CodecError) {
        let kind = match e {
            CodecError::TooLarge(_) => "TooLarge",
            CodecError::Malformed(_) => "Malformed",
            CodecError::NotConnect => "NotConnect",
            CodecError::UnsupportedLevel(_) => "UnsupportedLevel",
            CodecError::Protocol(_) => "Protocol",
            CodecError::WillTopic(_) => "WillTopic",
        };
        *self.errors.entry(format!("{step}: {kind}")).or_default() += 1;
    }

    fn add(&mut self, o: &Stats) {
        self.inputs += o.inputs;
        self.frames += o.frames;
        for v in 0..2 {
            self.connects[v] += o.connects[v];
            self.round_trips[v] += o.round_trips[v];
            for k in 0..16 {
                self.decoded[v][k] += o.decoded[v][k];
            }
        }
        for (k, n) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += n;
        }
        self.bad_topics += o.bad_topics;
        self.bad_aliases += o.bad_aliases;
        self.filters_valid += o.filters_valid;
        self.filters_invalid += o.filters_invalid;
        self.filters_refused_by_topic += o.filters_refused_by_topic;
        self.matches += o.matches;
        self.answers += o.answers;
    }
}

fn vi(version: Version) -> usize {
    match version {
        Version::V4 => 0,
        Version::V5 => 1,
    }
}

/// The fixed header read the plain way (MQTT 2.1 and 2.2.3): what `codec::frame` must say.
fn reference_frame(buf: &[u8], max: usize) -> Result<Option<Frame>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    let mut multiplier = 1usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        remaining += usize::from(b & 0x7f) * multiplier;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i == 5 {
            return Err(CodecError::Malformed("long".into()));
        }
        multiplier *= 128;
    }
    let len = i + remaining;
    if len > max {
        return Err(CodecError::TooLarge(len));
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame {
        kind: first >> 4,
        flags: first & 0x0f,
        len,
    }))
}

/// Filter matching read the plain way (MQTT 4.7), for `topic::matches`.
fn reference_matches(filter: &str, topic: &str) -> bool {
    fn go(f: &[&str], t: &[&str]) -> bool {
        match (f.first(), t.first()) {
            (Some(&"#"), _) => true,
            (Some(&"+"), Some(_)) => go(&f[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && go(&f[1..], &t[1..]),
            (None, None) => true,
            _ => false,
        }
    }
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    go(&f, &t)
}

/// A refusal is a `CodecError` that says what was wrong and has a DISCONNECT reason.
fn check_error(e: &CodecError, max: usize) {
    assert!(!e.to_string().is_empty(), "{e:?}");
    match e {
        CodecError::TooLarge(n) => assert!(*n > max, "TooLarge({n}) within the limit {max}"),
        CodecError::Malformed(what) => assert!(!what.is_empty()),
        CodecError::Protocol(what) => assert!(!what.is_empty()),
        CodecError::WillTopic(topic) => assert!(topic.contains(['+', '#']) || topic.contains('\0')),
        CodecError::NotConnect | CodecError::UnsupportedLevel(_) => {}
    }
    assert!(
        matches!(e.reason(), 0x81 | 0x82 | 0x84 | 0x90 | 0x95),
        "{e:?} has reason {:#04x}",
        e.reason()
    );
}

/// `bytes` is one whole packet of `kind` with `flags`.
fn assert_whole_frame(bytes: &[u8], kind: u8, flags: u8) {
    assert_eq!(
        codec::frame(bytes, usize::MAX),
        Ok(Some(Frame {
            kind,
            flags,
            len: bytes.len()
        })),
        "not one whole packet: {}",
        hex(bytes)
    );
    // The limit is the whole packet's size: exactly that is in, one less is out.
    assert!(matches!(codec::frame(bytes, bytes.len()), Ok(Some(_))));
    assert_eq!(
        codec::frame(bytes, bytes.len() - 1),
        Err(CodecError::TooLarge(bytes.len()))
    );
}

/// A packet the broker sends that no client may: whole, refused by `decode` as forbidden, and
/// read by mqtt-proto (the codec's decoder) as a packet of its type.
fn check_server_packet(version: Version, bytes: &[u8], kind: u8) {
    assert_whole_frame(bytes, kind, 0);
    assert!(
        matches!(codec::decode(version, bytes), Ok(Inbound::Forbidden(k)) if k == kind),
        "{version:?} packet type {kind}: {}",
        hex(bytes)
    );
    let read = match version {
        Version::V4 => match mqtt_proto::v3::Packet::decode(bytes) {
            Ok(Some(p)) => Ok(format!("{:?}", p.get_type())),
            other => Err(format!("{other:?}")),
        },
        Version::V5 => match mqtt_proto::v5::Packet::decode(bytes) {
            Ok(Some(p)) => Ok(format!("{:?}", p.get_type())),
            other => Err(format!("{other:?}")),
        },
    };
    assert!(
        read.is_ok(),
        "{version:?} packet type {kind} does not decode: {read:?}; {}",
        hex(bytes)
    );
}

/// The acknowledgement the gate writes (PUBACK 4 … PUBCOMP 7) decodes back to what was put in.
fn check_ack(g: &mut Gen, version: Version, kind: u8, pid: u16, reason: u8, st: &mut Stats) {
    let why = if g.chance(0.2) {
        Some(g.valid_text())
    } else {
        None
    };
    let bytes = codec::ack(version, kind, pid, reason, why.as_deref());
    assert_whole_frame(&bytes, kind, if kind == 6 { 2 } else { 0 });
    let want = match version {
        Version::V4 => 0,
        Version::V5 => reason,
    };
    let got = codec::decode(version, &bytes);
    let ok = match (&got, kind) {
        (Ok(Inbound::Puback(p, r)), 4)
        | (Ok(Inbound::Pubrec(p, r)), 5)
        | (Ok(Inbound::Pubrel(p, r)), 6)
        | (Ok(Inbound::Pubcomp(p, r)), 7) => *p == pid && *r == want,
        _ => false,
    };
    assert!(
        ok,
        "{version:?} ack type {kind} pid {pid} reason {reason:#04x} reason string {why:?} \
         decodes as {got:?}: {}",
        hex(&bytes)
    );
    st.answers += 1;
}

/// A PUBLISH the router would deliver: written for a 3.1.1 and an MQTT 5 subscriber as the
/// gate writes it, it must frame and decode back equal.
fn round_trip(g: &mut Gen, msg: &Message, st: &mut Stats) {
    let expiry = match msg.remaining_expiry(Instant::now()) {
        // Expired: the gate drops it.
        Some(Err(())) => return,
        Some(Ok(left)) => Some(left),
        None => None,
    };
    for to in [Version::V4, Version::V5] {
        let qos = msg.qos.min(g.below(3) as u8);
        let pid = if qos > 0 { g.nonzero_u16() } else { 0 };
        let alias = (to == Version::V5 && g.chance(0.3)).then(|| (g.nonzero_u16(), g.chance(0.5)));
        let out = Outgoing {
            qos,
            pid,
            retain: msg.retain && g.chance(0.7),
            dup: qos > 0 && g.chance(0.2),
            sub_ids: &[],
            alias,
            expiry,
        };
        // Written after what the buffer already holds.
        let before = g.below(3);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0xee; 2][..before]);
        codec::encode_publish(to, msg, &out, &mut buf);
        let bytes = &buf[before..];
        let what = || {
            format!(
                "{msg:?} written for {to:?} with {out:?} ({} bytes): {}",
                bytes.len(),
                hex(bytes)
            )
        };
        assert_eq!(
            bytes.len(),
            codec::publish_len(to, msg, &out),
            "publish_len: {}",
            what()
        );
        let flags = (u8::from(out.dup) << 3) | (qos << 1) | u8::from(out.retain);
        assert_whole_frame(bytes, 3, flags);
        let p = match codec::decode(to, bytes) {
            Ok(Inbound::Publish(p)) => p,
            other => panic!("does not decode back: {other:?}; {}", what()),
        };
        let topic: &str = match alias {
            Some((_, false)) => "",
            _ => &msg.topic,
        };
        assert_eq!(&*p.topic, topic, "{}", what());
        assert_eq!(p.payload, msg.payload, "{}", what());
        assert_eq!((p.qos, p.pid), (qos, pid), "{}", what());
        assert_eq!((p.retain, p.dup), (out.retain, out.dup), "{}", what());
        match to {
            Version::V4 => {
                assert_eq!(p.topic_alias, None, "{}", what());
                assert_eq!(p.props, Properties::default(), "{}", what());
            }
            Version::V5 => {
                assert_eq!(p.topic_alias, alias.map(|a| a.0), "{}", what());
                let want = Properties {
                    expiry,
                    ..msg.props.clone()
                };
                assert_eq!(p.props, want, "{}", what());
            }
        }
        st.round_trips[vi(to)] += 1;
    }
    // Subscription identifiers are the server's to send: a client's are refused.
    if g.chance(0.05) {
        let ids: Vec<u32> = (0..1 + g.below(3))
            .map(|_| g.rng.random_range(1..=268_435_455))
            .collect();
        let out = Outgoing {
            qos: 0,
            pid: 0,
            retain: false,
            dup: false,
            sub_ids: &ids,
            alias: None,
            expiry,
        };
        let mut buf = BytesMut::new();
        codec::encode_publish(Version::V5, msg, &out, &mut buf);
        assert_eq!(buf.len(), codec::publish_len(Version::V5, msg, &out));
        assert_whole_frame(&buf, 3, u8::from(out.retain));
        let got = codec::decode(Version::V5, &buf);
        assert!(
            got.is_err(),
            "a PUBLISH with subscription ids {ids:?} from a client: {got:?}"
        );
    }
}

/// One version's view of a client's session: what the gate keeps between packets.
struct Session {
    version: Version,
    aliases: HashMap<u16, Arc<str>>,
    topics: Vec<Arc<str>>,
    filters: Vec<Arc<str>>,
}

/// The gate's Topic Alias Maximum.
const TOPIC_ALIAS_MAXIMUM: u16 = 64;

fn check_connect(g: &mut Gen, packet: &[u8], max: usize, st: &mut Stats) {
    let c = match codec::decode_connect(packet) {
        Ok(c) => c,
        Err(e) => {
            check_error(&e, max);
            assert!(!matches!(e, CodecError::TooLarge(_)), "{e:?}");
            st.error("decode_connect", &e);
            return;
        }
    };
    st.connects[vi(c.version)] += 1;
    assert_eq!(codec::connect_version(packet), Ok(c.version));
    assert!(c.username.as_ref().is_none_or(|u| !u.is_empty()));
    assert!(c.password.as_ref().is_none_or(|p| !p.is_empty()));
    assert!(c.receive_maximum > 0 && c.maximum_packet_size != Some(0));
    if c.version == Version::V4 {
        assert_eq!(c.receive_maximum, u16::MAX);
        assert_eq!(c.maximum_packet_size, None);
        assert_eq!(c.topic_alias_maximum, 0);
        assert!(c.auth_method.is_none());
        assert_eq!(c.session_expiry, if c.clean_start { 0 } else { u32::MAX });
    }
    if let Some(w) = &c.will {
        assert!(w.qos <= 2, "{w:?}");
        if c.version == Version::V4 {
            assert_eq!((w.delay, &w.props), (0, &Properties::default()));
        }
        // The gate refuses a will topic that is no topic name; it publishes one that is.
        if topic::check_topic(&w.topic).is_ok() {
            let will = Message::new(
                Arc::from(w.topic.as_str()),
                w.payload.clone(),
                w.qos,
                w.retain,
                w.props.clone(),
                Origin::Internal,
            );
            round_trip(g, &will, st);
        } else {
            st.bad_topics += 1;
        }
    }
    let code = match c.version {
        Version::V4 => g.below(6) as u8,
        Version::V5 => g.pick_byte(&[0x00, 0x82, 0x85, 0x86, 0x87, 0x89, 0x8c, 0x90]),
    };
    let props = g.server_props(&c.client_id);
    let connack = codec::connack(c.version, g.chance(0.5), code, &props);
    check_server_packet(c.version, &connack, 2);
    assert_eq!(
        codec::decode_connect(&connack).err(),
        Some(CodecError::NotConnect)
    );
    st.answers += 1;
}

/// One frame through one version's decoder, and on as the gate takes it.
fn check_packet(g: &mut Gen, s: &mut Session, packet: &[u8], f: Frame, st: &mut Stats) {
    let version = s.version;
    let inbound = match codec::decode(version, packet) {
        Ok(i) => i,
        Err(e) => {
            check_error(&e, usize::MAX);
            // After framing, only the packet's content can be wrong.
            assert!(
                matches!(e, CodecError::Malformed(_) | CodecError::Protocol(_)),
                "{e:?}"
            );
            st.error(
                if version == Version::V4 {
                    "decode 3.1.1"
                } else {
                    "decode 5"
                },
                &e,
            );
            return;
        }
    };
    let kind = match &inbound {
        Inbound::Publish(_) => 3,
        Inbound::Puback(..) => 4,
        Inbound::Pubrec(..) => 5,
        Inbound::Pubrel(..) => 6,
        Inbound::Pubcomp(..) => 7,
        Inbound::Subscribe { .. } => 8,
        Inbound::Unsubscribe { .. } => 10,
        Inbound::Pingreq => 12,
        Inbound::Disconnect { .. } => 14,
        Inbound::Forbidden(k) => {
            assert!(matches!(k, 0 | 1 | 2 | 9 | 11 | 13 | 15), "Forbidden({k})");
            *k
        }
    };
    assert_eq!(kind, f.kind, "{version:?} decoded {inbound:?}");
    st.decoded[vi(version)][usize::from(kind)] += 1;
    match inbound {
        Inbound::Publish(p) => {
            assert!(p.qos <= 2);
            assert_eq!(p.qos, (f.flags >> 1) & 3);
            assert_eq!((p.retain, p.dup), (f.flags & 1 == 1, f.flags & 8 == 8));
            assert_eq!(
                p.pid == 0,
                p.qos == 0,
                "QoS {} with packet id {}",
                p.qos,
                p.pid
            );
            assert!(2 + p.topic.len() + p.payload.len() < packet.len());
            if version == Version::V4 {
                assert_eq!(p.topic_alias, None);
                assert_eq!(p.props, Properties::default());
            }
            if p.qos > 0 {
                let reason = g.pick_byte(&[0x00, 0x87, 0x97, 0x80]);
                check_ack(
                    g,
                    version,
                    if p.qos == 1 { 4 } else { 5 },
                    p.pid,
                    reason,
                    st,
                );
            }
            // Topic aliases, as the gate resolves them.
            let topic = match p.topic_alias {
                Some(a) if a > TOPIC_ALIAS_MAXIMUM => None,
                Some(a) if p.topic.is_empty() => s.aliases.get(&a).cloned(),
                Some(a) => {
                    s.aliases.insert(a, p.topic.clone());
                    Some(p.topic.clone())
                }
                None => Some(p.topic.clone()),
            };
            let Some(topic) = topic else {
                st.bad_aliases += 1;
                return;
            };
            if topic::check_topic(&topic).is_err() {
                st.bad_topics += 1;
                return;
            }
            for filter in &s.filters {
                let m = topic::matches(filter, &topic);
                assert_eq!(
                    m,
                    reference_matches(filter, &topic),
                    "{filter:?} ~ {topic:?}"
                );
                st.matches += u64::from(m);
            }
            if s.topics.len() < 8 {
                s.topics.push(topic.clone());
            }
            let msg = Message::new(topic, p.payload, p.qos, p.retain, p.props, Origin::Internal);
            round_trip(g, &msg, st);
        }
        Inbound::Puback(pid, reason)
        | Inbound::Pubrec(pid, reason)
        | Inbound::Pubrel(pid, reason)
        | Inbound::Pubcomp(pid, reason) => {
            assert_ne!(pid, 0);
            if version == Version::V4 {
                assert_eq!(reason, 0);
            }
            // PUBREC is answered with PUBREL, PUBREL with PUBCOMP.
            if kind == 5 || kind == 6 {
                let reason = g.pick_byte(PUBREL_REASONS);
                check_ack(g, version, kind + 1, pid, reason, st);
            }
        }
        Inbound::Subscribe { pid, filters } => {
            assert_ne!(pid, 0);
            assert!(!filters.is_empty(), "SUBSCRIBE without filters accepted");
            let mut codes = Vec::with_capacity(filters.len());
            for sf in &filters {
                let o = &sf.opts;
                assert!(
                    o.qos <= 2 && o.retain_handling <= 2,
                    "{version:?} SUBSCRIBE with an option out of range accepted (QoS 3 or Retain \
                     Handling 3 is malformed [MQTT-3.8.3-5]): {sf:?}"
                );
                if version == Version::V4 {
                    assert!(
                        !o.no_local && !o.retain_as_published && o.id.is_none(),
                        "{sf:?}"
                    );
                    assert_eq!(o.retain_handling, 0);
                }
                assert_ne!(o.id, Some(0));
                let parsed = Filter::parse(&sf.filter);
                if sf.invalid {
                    assert!(
                        parsed.is_err(),
                        "{sf:?} marked invalid, parses as {parsed:?}"
                    );
                }
                match parsed {
                    Ok(filter) => {
                        st.filters_valid += 1;
                        assert_eq!(filter.full(), sf.filter);
                        if !filter.has_wildcard() {
                            // A filter without wildcards is a topic name, and matches itself.
                            assert_eq!(topic::check_topic(&filter.filter), Ok(()));
                            assert!(topic::matches(&filter.filter, &filter.filter));
                        }
                        for t in &s.topics {
                            let m = topic::matches(&filter.filter, t);
                            assert_eq!(
                                m,
                                reference_matches(&filter.filter, t),
                                "{filter:?} ~ {t:?}"
                            );
                            st.matches += u64::from(m);
                        }
                        if s.filters.len() < 8 {
                            s.filters.push(filter.filter.clone());
                        }
                        codes.push(g.pick_byte(&[o.qos, o.qos, 0x87, 0x80]));
                    }
                    Err(_) => {
                        st.filters_invalid += 1;
                        if !sf.invalid {
                            st.filters_refused_by_topic += 1;
                        }
                        codes.push(0x8f);
                    }
                }
            }
            let suback = codec::suback(version, pid, &codes, None);
            check_server_packet(version, &suback, 9);
            st.answers += 1;
        }
        Inbound::Unsubscribe { pid, filters } => {
            assert_ne!(pid, 0);
            assert!(!filters.is_empty(), "UNSUBSCRIBE without filters accepted");
            let codes: Vec<u8> = filters
                .iter()
                .map(|f| match Filter::parse(f) {
                    Ok(_) => g.pick_byte(&[0x00, 0x11]),
                    Err(_) => 0x8f,
                })
                .collect();
            let unsuback = codec::unsuback(version, pid, &codes);
            check_server_packet(version, &unsuback, 11);
            st.answers += 1;
        }
        Inbound::Pingreq => check_server_packet(version, &codec::pingresp(), 13),
        Inbound::Disconnect {
            reason,
            session_expiry,
        } => {
            if version == Version::V4 {
                assert_eq!((reason, session_expiry), (0, None));
            }
        }
        Inbound::Forbidden(_) => {
            // The gate ends the connection: MQTT 5 with a DISCONNECT, which decodes back.
            let reason = g.pick_byte(SERVER_DISCONNECT_REASONS);
            let why = g.chance(0.3).then(|| g.valid_text());
            match codec::disconnect(version, reason, why.as_deref()) {
                None => assert_eq!(version, Version::V4),
                Some(bytes) => {
                    assert_whole_frame(&bytes, 14, 0);
                    let got = codec::decode(Version::V5, &bytes);
                    assert!(
                        matches!(
                            got,
                            Ok(Inbound::Disconnect {
                                reason: r,
                                session_expiry: None
                            }) if r == reason
                        ),
                        "DISCONNECT {reason:#04x} {why:?} decodes as {got:?}: {}",
                        hex(&bytes)
                    );
                    st.answers += 1;
                }
            }
        }
    }
}

/// One input through the whole path.
fn check_input(g: &mut Gen, data: &[u8], st: &mut Stats) {
    st.inputs += 1;
    let max = [64, 1024, 4096, 1 << 20, usize::MAX][g.below(5)];
    // Whatever slice the codec is handed, not only whole frames: no panic, and refusals are
    // `CodecError`s.
    if let Err(e) = codec::connect_version(data) {
        check_error(&e, usize::MAX);
    }
    if let Err(e) = codec::decode_connect(data) {
        check_error(&e, usize::MAX);
    }
    for version in [Version::V4, Version::V5] {
        if let Err(e) = codec::decode(version, data) {
            check_error(&e, usize::MAX);
        }
    }
    // The input as a client's byte stream, frame by frame.
    let mut sessions = [Version::V4, Version::V5].map(|version| Session {
        version,
        aliases: HashMap::new(),
        topics: Vec::new(),
        filters: Vec::new(),
    });
    let mut rest = data;
    loop {
        let got = codec::frame(rest, max);
        let want = reference_frame(rest, max);
        let same = match (&got, &want) {
            (Err(CodecError::Malformed(_)), Err(CodecError::Malformed(_))) => true,
            (a, b) => a == b,
        };
        assert!(same, "frame says {got:?}, the fixed header {want:?}");
        let f = match got {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                check_error(&e, max);
                st.error("frame", &e);
                break;
            }
        };
        assert!(f.len >= 2 && f.len <= rest.len() && f.len <= max, "{f:?}");
        // The same packet read in two parts: the first part is not a packet yet.
        let cut = g.below(f.len);
        assert_eq!(codec::frame(&rest[..cut], max), Ok(None), "cut at {cut}");
        let (packet, after) = rest.split_at(f.len);
        rest = after;
        st.frames += 1;
        if f.kind == 1 {
            check_connect(g, packet, max, st);
        }
        for s in &mut sessions {
            check_packet(g, s, packet, f, st);
        }
    }
}

/// The generator seed of case `case` (an in-process input or a live connection).
fn case_seed(seed: u64, case: u64) -> u64 {
    seed ^ case.wrapping_mul(0x9e37_79b9)
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(no message)".to_owned())
}

thread_local! {
    /// This thread runs fuzz inputs: its panics are recorded, not printed.
    static FUZZ_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where this thread's last panic was.
    static PANIC_AT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Whether fuzz workers' panics are printed (when one case is replayed).
static LOUD: AtomicBool = AtomicBool::new(false);

/// Records where fuzz workers panic, and lets them panic quietly (a frequent failure in a long
/// run would print thousands of backtraces); every other thread's panics are printed as before.
fn record_fuzz_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !FUZZ_WORKER.with(|w| w.get()) {
                return previous(info);
            }
            let at = info
                .location()
                .map_or_else(String::new, |l| format!("{}:{}", l.file(), l.line()));
            PANIC_AT.with(|p| *p.borrow_mut() = at);
            if LOUD.load(Ordering::Relaxed) {
                previous(info);
            }
        }));
    });
}

/// The first failing input of one kind (one place in the checks), and how many failed there.
struct Failure {
    count: u64,
    case: u64,
    text: String,
}

#[test]
fn packet_path_survives_mutated_input() {
    let seed = seed();
    let only = std::env::var_os("RELAYBOX_FUZZ_CASE").map(|_| env_u64("RELAYBOX_FUZZ_CASE", 0));
    let (first, inputs) = match only {
        Some(case) => (case, 1),
        None => (0, env_u64("RELAYBOX_FUZZ_INPUTS", 150_000)),
    };
    let end = first + inputs;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(16));
    eprintln!(
        "packet path fuzz: {inputs} inputs from case {first}, {threads} threads, \
         RELAYBOX_FUZZ_SEED={seed}"
    );
    LOUD.store(only.is_some(), Ordering::Relaxed);
    record_fuzz_panics();
    let next = Arc::new(AtomicU64::new(first));
    let done = Arc::new(AtomicU64::new(0));
    // Failures by where they were found: a long run goes on and reports each kind once.
    let failures: Arc<Mutex<BTreeMap<String, Failure>>> = Arc::default();
    // The case each worker is on (to name it if it hangs).
    let current: Arc<Vec<AtomicU64>> =
        Arc::new((0..threads).map(|_| AtomicU64::new(u64::MAX)).collect());
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|w| {
            let (next, done, failures, current) = (
                next.clone(),
                done.clone(),
                failures.clone(),
                current.clone(),
            );
            std::thread::spawn(move || {
                FUZZ_WORKER.with(|f| f.set(true));
                let mut st = Stats::default();
                loop {
                    let case = next.fetch_add(1, Ordering::Relaxed);
                    if case >= end {
                        break;
                    }
                    current[w].store(case, Ordering::Relaxed);
                    let mut g = Gen::new(case_seed(seed, case));
                    let data = g.fuzz_input();
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        check_input(&mut g, &data, &mut st)
                    }));
                    done.fetch_add(1, Ordering::Relaxed);
                    let Err(panic) = result else {
                        continue;
                    };
                    let at = PANIC_AT.with(|p| std::mem::take(&mut *p.borrow_mut()));
                    let mut failures = failures.lock().expect("failures");
                    let f = failures.entry(at.clone()).or_insert_with(|| {
                        let text = format!(
                            "case {case} (RELAYBOX_FUZZ_SEED={seed} RELAYBOX_FUZZ_CASE={case}) \
                             failed at {at}: {}\ninput ({} bytes): {}",
                            panic_text(&*panic),
                            data.len(),
                            hex(&data)
                        );
                        eprintln!("packet path fuzz: {text}");
                        Failure {
                            count: 0,
                            case,
                            text,
                        }
                    });
                    f.count += 1;
                    if case < f.case {
                        // The lowest case of a kind, whichever thread found it first.
                        f.case = case;
                    }
                }
                current[w].store(u64::MAX, Ordering::Relaxed);
                st
            })
        })
        .collect();
    // Watchdog: progress at least every 10 s; a progress line every 30 s.
    let mut last = (0, Instant::now());
    let mut reported = Instant::now();
    while !workers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let now = done.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            let stuck: Vec<String> = current
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .filter(|&c| c != u64::MAX)
                .map(|case| {
                    let data = Gen::new(case_seed(seed, case)).fuzz_input();
                    format!("case {case}: {}", hex(&data))
                })
                .collect();
            panic!(
                "the packet path is stuck for 10 s (RELAYBOX_FUZZ_SEED={seed}):\n{}",
                stuck.join("\n")
            );
        }
        if reported.elapsed() > Duration::from_secs(30) {
            reported = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "packet path fuzz: {now}/{inputs} inputs in {secs:.0} s ({:.0}/s), {} kinds of \
                 failure",
                now as f64 / secs,
                failures.lock().expect("failures").len()
            );
        }
    }
    let mut st = Stats::default();
    for w in workers {
        st.add(&w.join().expect("fuzz worker"));
    }
    let elapsed = started.elapsed();
    let names = [
        "?",
        "CONNECT",
        "CONNACK",
        "PUBLISH",
        "PUBACK",
        "PUBREC",
        "PUBREL",
        "PUBCOMP",
        "SUBSCRIBE",
        "SUBACK",
        "UNSUBSCRIBE",
        "UNSUBACK",
        "PINGREQ",
        "PINGRESP",
        "DISCONNECT",
        "AUTH",
    ];
    eprintln!(
        "packet path fuzz: {} inputs in {elapsed:.1?} ({:.0} inputs/s, {threads} threads, \
         RELAYBOX_FUZZ_SEED={seed}); {} frames; CONNECTs decoded 3.1.1 {} / 5 {}; PUBLISHes \
         re-encoded and decoded back for 3.1.1 {} / 5 {}; topics refused {}, aliases refused {}; \
         filters valid {}, refused {} ({} of them let through by the codec); {} matches; {} \
         answers encoded",
        st.inputs,
        st.inputs as f64 / elapsed.as_secs_f64(),
        st.frames,
        st.connects[0],
        st.connects[1],
        st.round_trips[0],
        st.round_trips[1],
        st.bad_topics,
        st.bad_aliases,
        st.filters_valid,
        st.filters_invalid,
        st.filters_refused_by_topic,
        st.matches,
        st.answers,
    );
    for (v, name) in ["3.1.1", "5"].iter().enumerate() {
        let decoded: Vec<String> = (0..16)
            .filter(|&k| st.decoded[v][k] > 0)
            .map(|k| format!("{} {}", names[k], st.decoded[v][k]))
            .collect();
        eprintln!("  decoded as {name}: {}", decoded.join(", "));
    }
    for (what, n) in &st.errors {
        eprintln!("  refused by {what}: {n}");
    }
    let failures = std::mem::take(&mut *failures.lock().expect("failures"));
    if !failures.is_empty() {
        let total: u64 = failures.values().map(|f| f.count).sum();
        let list: Vec<String> = failures
            .values()
            .map(|f| {
                format!(
                    "{} failing inputs (lowest case {}); the first: {}",
                    f.count, f.case, f.text
                )
            })
            .collect();
        panic!(
            "{total} of {inputs} inputs failed, {} kinds of failure:\n\n{}",
            failures.len(),
            list.join("\n\n")
        );
    }
    assert_eq!(st.inputs, inputs);
    // The generator reaches every part of the path (checked on runs big enough to).
    if inputs >= 20_000 {
        for v in 0..2 {
            for k in [3, 4, 5, 6, 7, 8, 10, 12, 14] {
                assert!(st.decoded[v][k] > 0, "no {} decoded ({v})", names[k]);
            }
            assert!(st.connects[v] > 0 && st.round_trips[v] > 0);
        }
        assert!(st.filters_valid > 0 && st.filters_invalid > 0 && st.matches > 0);
        assert!(st.bad_topics > 0 && st.bad_aliases > 0);
        for what in ["frame: TooLarge", "frame: Malformed", "decode 5: Protocol"] {
            assert!(st.errors.contains_key(what), "never refused: {what}");
        }
    }
}

/// The seeds the fuzz mutates are valid encodings of every packet type, for 3.1.1 and 5: the
/// codec takes the client packets as what they are (and the server packets as forbidden from
/// a client), and mqtt-proto reads every one of them.
#[test]
fn fuzz_seeds_are_valid_packets() {
    let seed = seed();
    let mut seen: BTreeMap<(bool, u8, bool), u64> = BTreeMap::new();
    for case in 0..20_000 {
        let mut g = Gen::new(case_seed(seed, case));
        let v5 = case % 2 == 1;
        let version = if v5 { Version::V5 } else { Version::V4 };
        let (k, bytes) = g.seed_packet(v5);
        *seen.entry((v5, k.kind, k.server)).or_default() += 1;
        let what = format!("case {case}, {version:?} {k:?}: {}", hex(&bytes));
        assert_eq!(
            codec::frame(&bytes, usize::MAX),
            Ok(Some(Frame {
                kind: k.kind,
                flags: bytes[0] & 0x0f,
                len: bytes.len()
            })),
            "{what}"
        );
        let proto = if v5 {
            mqtt_proto::v5::Packet::decode(&bytes)
                .map(|p| p.is_some())
                .map_err(|e| e.to_string())
        } else {
            mqtt_proto::v3::Packet::decode(&bytes)
                .map(|p| p.is_some())
                .map_err(|e| e.to_string())
        };
        assert_eq!(proto, Ok(true), "mqtt-proto: {what}");
        if k.kind == 1 {
            let c = codec::decode_connect(&bytes).unwrap_or_else(|e| panic!("{e}: {what}"));
            assert_eq!(c.version, version, "{what}");
            continue;
        }
        let got = codec::decode(version, &bytes).unwrap_or_else(|e| panic!("{e}: {what}"));
        match got {
            Inbound::Forbidden(kind) => {
                assert_eq!(kind, k.kind, "{what}");
                // Packets a client may not send: the server's, and AUTH (not supported).
                assert!(matches!(kind, 2 | 9 | 11 | 13 | 15), "{what}");
            }
            Inbound::Publish(ref p) if !k.server => {
                assert!(!p.topic.is_empty() || p.topic_alias.is_some(), "{what}")
            }
            _ => {}
        }
    }
    for v5 in [false, true] {
        let client: &[u8] = if v5 {
            &[1, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15]
        } else {
            &[1, 3, 4, 5, 6, 7, 8, 10, 12, 14]
        };
        for &kind in client {
            assert!(
                seen.contains_key(&(v5, kind, false)),
                "v5 {v5}: no seed of type {kind}"
            );
        }
        for kind in [2, 3, 4, 5, 6, 7, 9, 11, 13] {
            assert!(
                seen.contains_key(&(v5, kind, true)),
                "v5 {v5}: no server packet {kind}"
            );
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Regressions: what the live fuzz once broke, as a user wants it now
// ---------------------------------------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(5);

fn string_bytes(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, s);
    out
}

/// SUBSCRIBE to one filter.
fn subscribe_packet(pid: u16, filter: &str, qos: u8, v5: bool) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    body.extend(string_bytes(filter.as_bytes()));
    body.push(qos);
    common::raw::packet(0x82, &body)
}

/// PUBLISH QoS 1 with `props` (MQTT 5, as (id, value bytes)).
fn publish_packet(
    topic: &str,
    payload: &[u8],
    pid: u16,
    props: &[(u8, Vec<u8>)],
    v5: bool,
) -> Vec<u8> {
    let mut body = string_bytes(topic.as_bytes());
    body.extend(pid.to_be_bytes());
    if v5 {
        let block: Vec<u8> = props
            .iter()
            .flat_map(|(id, value)| std::iter::once(*id).chain(value.iter().copied()))
            .collect();
        body.extend(Gen::varint(block.len()));
        body.extend(block);
    }
    body.extend_from_slice(payload);
    common::raw::packet(0x32, &body)
}

fn read_varint(b: &[u8]) -> (usize, usize) {
    let mut value = 0;
    for (i, byte) in b.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("bad variable byte integer: {}", hex(b));
}

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// MQTT 5 properties as (id, value bytes), in the order sent.
type Props = Vec<(u8, Vec<u8>)>;

fn parse_props(mut b: &[u8]) -> Props {
    let mut out = Vec::new();
    while let Some((&id, rest)) = b.split_first() {
        let n = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0b => read_varint(rest).1,
            0x26 => {
                let k = 2 + u16_at(rest, 0);
                k + 2 + u16_at(rest, k)
            }
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => 2 + u16_at(rest, 0),
            _ => panic!("unknown property {id:#04x}"),
        };
        out.push((id, rest[..n].to_vec()));
        b = &rest[n..];
    }
    out
}

/// A PUBLISH as a client receives it.
#[derive(Debug, Clone)]
struct Delivered {
    topic: String,
    qos: u8,
    pid: u16,
    props: Props,
    payload: Vec<u8>,
}

fn parse_publish(first: u8, body: &[u8], v5: bool) -> Delivered {
    let qos = (first >> 1) & 3;
    let len = u16_at(body, 0);
    let topic = String::from_utf8(body[2..2 + len].to_vec()).expect("topic is UTF-8");
    let mut at = 2 + len;
    let mut pid = 0;
    if qos > 0 {
        pid = u16_at(body, at) as u16;
        at += 2;
    }
    let mut props = Vec::new();
    if v5 {
        let (len, n) = read_varint(&body[at..]);
        props = parse_props(&body[at + n..at + n + len]);
        at += n + len;
    }
    Delivered {
        topic,
        qos,
        pid,
        props,
        payload: body[at..].to_vec(),
    }
}

/// Reads `n` PUBLISHes (acknowledging them); other packets are a failure.
fn receive(conn: &mut RawConn, n: usize, v5: bool, who: &str) -> Vec<Delivered> {
    let mut got = Vec::new();
    while got.len() < n {
        match conn.read(WAIT) {
            Got::Packet(first, body) if first >> 4 == 3 => {
                let p = parse_publish(first, &body, v5);
                if p.qos == 1 {
                    conn.send(&common::raw::packet(0x40, &p.pid.to_be_bytes()))
                        .expect("PUBACK");
                }
                got.push(p);
            }
            other => panic!("{who}: {} of {n} messages, then {other:?}", got.len()),
        }
    }
    got
}

/// Expects the PUBACK of `pid` with success (MQTT 5: no reason code, or 0).
fn expect_puback(conn: &mut RawConn, pid: u16, what: &str) {
    match conn.read(WAIT) {
        Got::Packet(0x40, body) => {
            assert_eq!(u16_at(&body, 0) as u16, pid, "{what}");
            assert!(body.len() == 2 || body[2] == 0, "{what}: PUBACK {body:?}");
        }
        other => panic!("{what}: expected PUBACK, got {other:?}"),
    }
}

/// Connects (CONNACK 0 expected) and subscribes to `filter` at QoS 1 (granted expected).
fn raw_subscriber(port: u16, id: &str, filter: &str, v5: bool) -> RawConn {
    let mut c = RawConn::open(port);
    c.handshake(&common::raw::connect_with(
        b"MQTT",
        if v5 { 5 } else { 4 },
        id,
    ));
    c.send(&subscribe_packet(1, filter, 1, v5))
        .expect("SUBSCRIBE");
    match c.read(WAIT) {
        Got::Packet(0x90, body) => assert_eq!(body.last(), Some(&1), "{id}: SUBACK {body:?}"),
        other => panic!("{id}: expected SUBACK, got {other:?}"),
    }
    c
}

fn prop_str(id: u8, s: &[u8]) -> (u8, Vec<u8>) {
    (id, string_bytes(s))
}

fn user_property(k: &str, v: &str) -> (u8, Vec<u8>) {
    let mut value = string_bytes(k.as_bytes());
    value.extend(string_bytes(v.as_bytes()));
    (0x26, value)
}

/// Found by the live fuzz: a message an MQTT 5 client published with properties (a user
/// property, a message expiry) reached `unreachable!()` in rumqttd's 3.1.1 encoder, which
/// killed the link of every MQTT 3.1.1 subscriber of the topic. Now: a 3.1.1 subscriber receives
/// such messages, with nothing of the properties in them, and an MQTT 5 subscriber receives
/// them with their properties (the expiry counted down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_properties_reach_mqtt311_subscribers_without_them_and_mqtt5_ones_with_them() {
    let relay = Relay::start(RelayConfig::new("fuzz-props")).await;
    let port = relay.port();
    // A real 3.1.1 client, and raw subscribers of both versions that show the bytes.
    let rumqttc_v4 = Subscriber::start(port, "v4-sub", &["p/#"]).await;
    let cases: Vec<(&str, Props)> = vec![
        ("p/user-property", vec![user_property("k", "v")]),
        ("p/expiry", vec![(0x02, 60u32.to_be_bytes().to_vec())]),
        (
            "p/content",
            vec![
                (0x01, vec![1]),
                prop_str(0x03, b"text/plain; charset=utf-8"),
            ],
        ),
        (
            "p/request",
            vec![
                prop_str(0x08, "reply/é".as_bytes()),
                prop_str(0x09, b"\x00\x01\xff"),
            ],
        ),
        (
            "p/all",
            vec![
                (0x01, vec![0]),
                (0x02, 3600u32.to_be_bytes().to_vec()),
                prop_str(0x03, b"application/octet-stream"),
                prop_str(0x08, b"reply/all"),
                prop_str(0x09, b"id-1"),
                user_property("k", "v"),
                user_property("ünï", "cödé"),
                user_property("k", "w"),
            ],
        ),
        ("p/none", vec![]),
    ];
    tokio::task::block_in_place(|| {
        let mut v4 = raw_subscriber(port, "raw-v4-sub", "p/#", false);
        let mut v5 = raw_subscriber(port, "raw-v5-sub", "p/#", true);
        let mut publisher = RawConn::open(port);
        publisher.handshake(&common::raw::connect_v5("v5-pub"));
        for (i, (topic, props)) in cases.iter().enumerate() {
            let pid = i as u16 + 1;
            publisher
                .send(&publish_packet(topic, b"payload", pid, props, true))
                .expect("publish");
            expect_puback(&mut publisher, pid, topic);
        }
        for (v5, conn) in [(false, &mut v4), (true, &mut v5)] {
            let who = if v5 {
                "MQTT 5 subscriber"
            } else {
                "3.1.1 subscriber"
            };
            let got = receive(conn, cases.len(), v5, who);
            for ((topic, sent), p) in cases.iter().zip(&got) {
                assert_eq!(p.topic, *topic, "{who}");
                // 3.1.1: the payload exactly, no property bytes before it.
                assert_eq!(p.payload, b"payload", "{who}: {topic}");
                if !v5 {
                    continue;
                }
                // MQTT 5: every property sent, user properties in their order; the expiry as
                // what is left of it.
                let mut want = sent.clone();
                let mut got = p.props.clone();
                let expiry = |props: &mut Props| {
                    let at = props.iter().position(|(id, _)| *id == 0x02)?;
                    let (_, v) = props.remove(at);
                    Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
                };
                match (expiry(&mut want), expiry(&mut got)) {
                    (Some(w), Some(g)) => {
                        assert!(g <= w && g + 5 >= w, "{topic}: expiry {g} of {w}")
                    }
                    (w, g) => assert_eq!(g, w, "{topic}: expiry"),
                }
                want.sort_by_key(|(id, _)| *id);
                got.sort_by_key(|(id, _)| *id);
                assert_eq!(got, want, "{who}: {topic}: properties");
            }
        }
    });
    assert_eq!(rumqttc_v4.wait_for(cases.len(), WAIT).await, cases.len());
    let got = rumqttc_v4.snapshot();
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    let want: Vec<&str> = cases.iter().map(|(t, _)| *t).collect();
    assert_eq!(topics, want);
    assert!(got.iter().all(|(_, p)| p == b"payload"), "{got:?}");
    assert!(rumqttc_v4.errors.lock().expect("errors").is_empty());
    assert_no_panic(&relay);
}

/// Found by the live fuzz: rumqttd's router dropped a CONNECT whose client id held `+ $ # /`
/// and left a stale entry; a second CONNECT with that id panicked in rumqttd's server while it
/// held a lock, and from then on no client could connect at all. Now: any UTF-8 client id is
/// accepted (CONNACK 0), over 3.1.1 and 5; its client subscribes, publishes and receives; the
/// same id again takes the session over; and everyone else is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_with_wildcards_slashes_and_non_ascii_characters_are_accepted() {
    const IDS: &[&str] = &[
        "bad/id",
        "$SYS",
        "a+b",
        "#",
        "+",
        "/",
        "$share/g/x",
        "温度/é",
        "😀+#/$",
        "é",
    ];
    let relay = Relay::start(RelayConfig::new("fuzz-ids")).await;
    let port = relay.port();
    let watcher = Subscriber::start(port, "ids-watcher", &["ids/#"]).await;
    tokio::task::block_in_place(|| {
        for v5 in [false, true] {
            let level = if v5 { 5 } else { 4 };
            for (i, id) in IDS.iter().enumerate() {
                let what = format!("client id {id:?} (MQTT level {level})");
                let topic = format!("ids/{level}/{i}");
                let mut first = raw_subscriber(port, id, &topic, v5);
                first
                    .send(&publish_packet(&topic, id.as_bytes(), 2, &[], v5))
                    .expect("publish");
                // Its PUBACK and its own message back, in either order.
                let mut acked = false;
                let mut own = None;
                while !acked || own.is_none() {
                    match first.read(WAIT) {
                        Got::Packet(0x40, body) => {
                            assert_eq!(u16_at(&body, 0), 2, "{what}");
                            acked = true;
                        }
                        Got::Packet(h, body) if h >> 4 == 3 => {
                            let p = parse_publish(h, &body, v5);
                            first
                                .send(&common::raw::packet(0x40, &p.pid.to_be_bytes()))
                                .expect("PUBACK");
                            own = Some(p);
                        }
                        other => panic!("{what}: {other:?}"),
                    }
                }
                let own = own.expect("own message");
                assert_eq!(
                    (own.topic.as_str(), own.payload.as_slice()),
                    (topic.as_str(), id.as_bytes()),
                    "{what}"
                );
                // The same id again: the new connection takes the session over.
                let mut second = RawConn::open(port);
                second.handshake(&common::raw::connect_with(b"MQTT", level, id));
                if v5 {
                    match first.read(WAIT) {
                        Got::Packet(0xe0, body) => assert_eq!(body[0], 0x8e, "{what}"),
                        other => panic!("{what}: expected DISCONNECT 0x8E, got {other:?}"),
                    }
                }
                assert!(
                    first.closed_within(WAIT),
                    "{what}: the first connection stays"
                );
                second.send(&[0xc0, 0x00]).expect("PINGREQ");
                assert_eq!(second.read(WAIT), Got::Packet(0xd0, vec![]), "{what}");
            }
        }
        RawConn::open(port).handshake(&common::raw::connect_v4("fine-v4"));
        RawConn::open(port).handshake(&common::raw::connect_v5("fine-v5"));
    });
    let n = 2 * IDS.len();
    assert_eq!(watcher.wait_for(n, WAIT).await, n);
    let mut payloads: Vec<Vec<u8>> = watcher.snapshot().into_iter().map(|(_, p)| p).collect();
    let mut want: Vec<Vec<u8>> = IDS
        .iter()
        .chain(IDS)
        .map(|id| id.as_bytes().to_vec())
        .collect();
    payloads.sort();
    want.sort();
    assert_eq!(payloads, want);
    assert_no_panic(&relay);
}

/// Found by the live fuzz: rumqttd's topic matching sliced the first byte of a topic as a
/// string; a PUBLISH to a topic starting with a non-ASCII character panicked in its router
/// thread, after which nothing was routed. Now: such topics are published (PUBACK 0) over 3.1.1
/// and 5 and routed to subscribers of both versions, through `#`, through filters with
/// non-ASCII levels and wildcards, and exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_starting_with_non_ascii_characters_are_routed() {
    const TOPICS: &[&str] = &["é/x", "温度", "😀", "ü/温度/😀"];
    let relay = Relay::start(RelayConfig::new("fuzz-utf8")).await;
    let port = relay.port();
    let all_v4 = Subscriber::start(port, "utf8-all", &["#"]).await;
    // Each of these matches one of the topics: "é/x", "温度", "ü/温度/😀".
    let some_v4 = Subscriber::start(port, "utf8-some", &["é/+", "温度", "+/温度/#"]).await;
    let mut want_all = Vec::new();
    let mut want_some = Vec::new();
    let got_v5 = tokio::task::block_in_place(|| {
        let mut sub_v5 = raw_subscriber(port, "utf8-v5-sub", "#", true);
        for v5 in [false, true] {
            let mut publisher = RawConn::open(port);
            publisher.handshake(&common::raw::connect_with(
                b"MQTT",
                if v5 { 5 } else { 4 },
                "utf8-pub",
            ));
            for (i, topic) in TOPICS.iter().enumerate() {
                let payload = format!("{}:{topic}", if v5 { 5 } else { 4 });
                let pid = i as u16 + 1;
                publisher
                    .send(&publish_packet(topic, payload.as_bytes(), pid, &[], v5))
                    .expect("publish");
                expect_puback(&mut publisher, pid, &payload);
                want_all.push((topic.to_string(), payload.clone().into_bytes()));
                if *topic != "😀" {
                    want_some.push((topic.to_string(), payload.into_bytes()));
                }
            }
        }
        receive(&mut sub_v5, want_all.len(), true, "MQTT 5 subscriber")
    });
    let mut got_v5: Vec<(String, Vec<u8>)> =
        got_v5.into_iter().map(|p| (p.topic, p.payload)).collect();
    assert_eq!(all_v4.wait_for(want_all.len(), WAIT).await, want_all.len());
    assert_eq!(
        some_v4.wait_for(want_some.len(), WAIT).await,
        want_some.len()
    );
    // Nothing more arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    want_all.sort();
    want_some.sort();
    got_v5.sort();
    let mut got_all = all_v4.snapshot();
    let mut got_some = some_v4.snapshot();
    got_all.sort();
    got_some.sort();
    assert_eq!(got_all, want_all, "3.1.1 subscriber of #");
    assert_eq!(
        got_some, want_some,
        "3.1.1 subscriber of é/+, 温度, +/温度/#"
    );
    assert_eq!(got_v5, want_all, "MQTT 5 subscriber of #");
    assert_no_panic(&relay);
}
