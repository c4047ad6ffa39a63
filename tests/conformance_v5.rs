//! MQTT 5 conformance of the relay as a whole (the gate in front of the broker core), one test
//! per behaviour of the OASIS MQTT 5.0 specification, each against the real `relaybox` binary
//! on 127.0.0.1.
//!
//! Most exchanges are written as raw MQTT 5 packets over a tokio `TcpStream` (a small codec
//! below), because they need what a client library hides or cannot express: subscribe
//! options, properties on every packet, topic aliases from the server, receive maximum,
//! maximum packet size, will delay, exact reason codes and packet sizes. rumqttc's MQTT 5
//! client publishes where a plain client is enough.
//!
//! Each test checks everything its behaviour requires and reports every violation it found
//! at once (see [`Checks`]). Every wait is bounded.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use common::{add_user, Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long an expected packet may take.
const WAIT: Duration = Duration::from_secs(3);
/// How long to watch for a packet that must not come.
const QUIET: Duration = Duration::from_millis(800);

// ---------------------------------------------------------------------------------------------
// Collected checks: a test reports every violation, not just the first
// ---------------------------------------------------------------------------------------------

struct Checks {
    test: &'static str,
    failures: Vec<String>,
}

impl Checks {
    fn new(test: &'static str) -> Checks {
        Checks {
            test,
            failures: Vec::new(),
        }
    }

    /// Records a violation when `ok` is false; returns `ok`.
    fn check(&mut self, ok: bool, what: impl Into<String>) -> bool {
        if !ok {
            self.failures.push(what.into());
        }
        ok
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{}: {} violation(s):\n  - {}",
            self.test,
            self.failures.len(),
            self.failures.join("\n  - ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT 5 properties
// ---------------------------------------------------------------------------------------------

mod prop {
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_ID: u8 = 0x0B;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const WILL_DELAY: u8 = 0x18;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PropVal {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(String),
    Bin(Vec<u8>),
    Pair(String, String),
}

#[derive(Debug, Clone, Copy)]
enum PropKind {
    Byte,
    U16,
    U32,
    VarInt,
    Str,
    Bin,
    Pair,
}

fn prop_kind(id: u8) -> Option<PropKind> {
    Some(match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => PropKind::Byte,
        0x13 | 0x21 | 0x22 | 0x23 => PropKind::U16,
        0x02 | 0x11 | 0x18 | 0x27 => PropKind::U32,
        0x0B => PropKind::VarInt,
        0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => PropKind::Str,
        0x09 | 0x16 => PropKind::Bin,
        0x26 => PropKind::Pair,
        _ => return None,
    })
}

/// A property list, in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Props(Vec<(u8, PropVal)>);

impl Props {
    fn new() -> Props {
        Props::default()
    }
    fn byte(mut self, id: u8, v: u8) -> Props {
        self.0.push((id, PropVal::Byte(v)));
        self
    }
    fn u16(mut self, id: u8, v: u16) -> Props {
        self.0.push((id, PropVal::U16(v)));
        self
    }
    fn u32(mut self, id: u8, v: u32) -> Props {
        self.0.push((id, PropVal::U32(v)));
        self
    }
    fn varint(mut self, id: u8, v: u32) -> Props {
        self.0.push((id, PropVal::VarInt(v)));
        self
    }
    fn str(mut self, id: u8, v: &str) -> Props {
        self.0.push((id, PropVal::Str(v.to_owned())));
        self
    }
    fn bin(mut self, id: u8, v: &[u8]) -> Props {
        self.0.push((id, PropVal::Bin(v.to_vec())));
        self
    }
    fn pair(mut self, k: &str, v: &str) -> Props {
        self.0.push((
            prop::USER_PROPERTY,
            PropVal::Pair(k.to_owned(), v.to_owned()),
        ));
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for (id, v) in &self.0 {
            body.extend(varint(*id as usize));
            match v {
                PropVal::Byte(b) => body.push(*b),
                PropVal::U16(n) => body.extend_from_slice(&n.to_be_bytes()),
                PropVal::U32(n) => body.extend_from_slice(&n.to_be_bytes()),
                PropVal::VarInt(n) => body.extend(varint(*n as usize)),
                PropVal::Str(s) => body.extend(string(s.as_bytes())),
                PropVal::Bin(b) => body.extend(string(b)),
                PropVal::Pair(k, v) => {
                    body.extend(string(k.as_bytes()));
                    body.extend(string(v.as_bytes()));
                }
            }
        }
        let mut out = varint(body.len());
        out.extend(body);
        out
    }

    /// Decodes a property list (length prefix included) at the start of `b`; returns the
    /// properties and the bytes it took.
    fn decode(b: &[u8]) -> Result<(Props, usize), String> {
        let (len, n) = read_varint(b)?;
        let end = n + len;
        let body = b.get(n..end).ok_or("property list cut short")?;
        let mut props = Props::new();
        let mut i = 0;
        while i < body.len() {
            let (id, k) = read_varint(&body[i..])?;
            i += k;
            let id = id as u8;
            let kind = prop_kind(id).ok_or(format!("unknown property 0x{id:02x}"))?;
            let take = |i: usize, n: usize| -> Result<&[u8], String> {
                body.get(i..i + n)
                    .ok_or(format!("property 0x{id:02x} cut short"))
            };
            let val = match kind {
                PropKind::Byte => {
                    let v = take(i, 1)?[0];
                    i += 1;
                    PropVal::Byte(v)
                }
                PropKind::U16 => {
                    let v = take(i, 2)?;
                    i += 2;
                    PropVal::U16(u16::from_be_bytes([v[0], v[1]]))
                }
                PropKind::U32 => {
                    let v = take(i, 4)?;
                    i += 4;
                    PropVal::U32(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
                }
                PropKind::VarInt => {
                    let (v, k) = read_varint(&body[i..])?;
                    i += k;
                    PropVal::VarInt(v as u32)
                }
                PropKind::Str | PropKind::Bin => {
                    let (s, k) = read_bin(&body[i..])?;
                    i += k;
                    match kind {
                        PropKind::Str => PropVal::Str(
                            String::from_utf8(s).map_err(|_| "property string not UTF-8")?,
                        ),
                        _ => PropVal::Bin(s),
                    }
                }
                PropKind::Pair => {
                    let (a, k) = read_bin(&body[i..])?;
                    i += k;
                    let (v, k) = read_bin(&body[i..])?;
                    i += k;
                    PropVal::Pair(
                        String::from_utf8(a).map_err(|_| "user property not UTF-8")?,
                        String::from_utf8(v).map_err(|_| "user property not UTF-8")?,
                    )
                }
            };
            props.0.push((id, val));
        }
        Ok((props, end))
    }

    fn get(&self, id: u8) -> Option<&PropVal> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }
    fn has(&self, id: u8) -> bool {
        self.get(id).is_some()
    }
    fn byte_of(&self, id: u8) -> Option<u8> {
        match self.get(id) {
            Some(PropVal::Byte(b)) => Some(*b),
            _ => None,
        }
    }
    fn u16_of(&self, id: u8) -> Option<u16> {
        match self.get(id) {
            Some(PropVal::U16(n)) => Some(*n),
            _ => None,
        }
    }
    fn u32_of(&self, id: u8) -> Option<u32> {
        match self.get(id) {
            Some(PropVal::U32(n)) => Some(*n),
            _ => None,
        }
    }
    fn str_of(&self, id: u8) -> Option<String> {
        match self.get(id) {
            Some(PropVal::Str(s)) => Some(s.clone()),
            _ => None,
        }
    }
    fn bin_of(&self, id: u8) -> Option<Vec<u8>> {
        match self.get(id) {
            Some(PropVal::Bin(b)) => Some(b.clone()),
            _ => None,
        }
    }
    fn varints(&self, id: u8) -> Vec<u32> {
        self.0
            .iter()
            .filter_map(|(i, v)| match v {
                PropVal::VarInt(n) if *i == id => Some(*n),
                _ => None,
            })
            .collect()
    }
    fn user_props(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .filter_map(|(_, v)| match v {
                PropVal::Pair(k, v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect()
    }
}

fn varint(n: usize) -> Vec<u8> {
    common::raw::remaining_length(n)
}

fn read_varint(b: &[u8]) -> Result<(usize, usize), String> {
    let mut n = 0usize;
    let mut mult = 1usize;
    for (i, byte) in b.iter().enumerate().take(4) {
        n += (*byte & 0x7f) as usize * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            return Ok((n, i + 1));
        }
    }
    Err("bad variable byte integer".into())
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

fn read_bin(b: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let len = match b {
        [a, c, ..] => u16::from_be_bytes([*a, *c]) as usize,
        _ => return Err("length cut short".into()),
    };
    let s = b.get(2..2 + len).ok_or("string cut short")?;
    Ok((s.to_vec(), 2 + len))
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------

/// Subscribe option bits (MQTT 5 §3.8.3.1); the low two bits are the maximum QoS.
mod opt {
    pub const NO_LOCAL: u8 = 0x04;
    pub const RETAIN_AS_PUBLISHED: u8 = 0x08;
    pub const RETAIN_HANDLING_1: u8 = 0x10;
    pub const RETAIN_HANDLING_2: u8 = 0x20;
}

#[derive(Debug, Clone)]
struct Will {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    props: Props,
}

impl Will {
    fn new(topic: &str, payload: &[u8]) -> Will {
        Will {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            qos: 1,
            retain: false,
            props: Props::new(),
        }
    }
}

/// What goes into a CONNECT.
#[derive(Debug, Clone)]
struct Conn {
    client_id: String,
    clean_start: bool,
    keep_alive: u16,
    props: Props,
    will: Option<Will>,
    user: Option<String>,
    pass: Option<String>,
}

impl Conn {
    fn new(client_id: &str) -> Conn {
        Conn {
            client_id: client_id.to_owned(),
            clean_start: true,
            keep_alive: 30,
            props: Props::new(),
            will: None,
            user: None,
            pass: None,
        }
    }
    fn clean(mut self, clean: bool) -> Conn {
        self.clean_start = clean;
        self
    }
    fn keep_alive(mut self, secs: u16) -> Conn {
        self.keep_alive = secs;
        self
    }
    fn props(mut self, props: Props) -> Conn {
        self.props = props;
        self
    }
    fn will(mut self, will: Will) -> Conn {
        self.will = Some(will);
        self
    }
    fn login(mut self, user: Option<&str>, pass: Option<&str>) -> Conn {
        self.user = user.map(str::to_owned);
        self.pass = pass.map(str::to_owned);
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut flags = 0u8;
        if self.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.user.is_some() {
            flags |= 0x80;
        }
        if self.pass.is_some() {
            flags |= 0x40;
        }
        let mut body = string(b"MQTT");
        body.push(5);
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        body.extend(self.props.encode());
        body.extend(string(self.client_id.as_bytes()));
        if let Some(w) = &self.will {
            body.extend(w.props.encode());
            body.extend(string(w.topic.as_bytes()));
            body.extend(string(&w.payload));
        }
        if let Some(u) = &self.user {
            body.extend(string(u.as_bytes()));
        }
        if let Some(p) = &self.pass {
            body.extend(string(p.as_bytes()));
        }
        packet(0x10, &body)
    }
}

fn encode_publish(
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
    props: &Props,
) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend(props.encode());
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &body)
}

fn encode_ack(first: u8, pkid: u16) -> Vec<u8> {
    let [a, b] = pkid.to_be_bytes();
    vec![first, 2, a, b]
}

fn encode_subscribe(pkid: u16, props: &Props, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend(props.encode());
    for (f, opts) in filters {
        body.extend(string(f.as_bytes()));
        body.push(*opts);
    }
    packet(0x82, &body)
}

#[derive(Debug, Clone)]
struct Publish {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    pkid: u16,
    props: Props,
    /// Bytes of the whole packet on the wire.
    size: usize,
}

impl Publish {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

// Some fields are only read through `Debug` in failure messages.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Pkt {
    ConnAck {
        session_present: bool,
        reason: u8,
        props: Props,
    },
    Publish(Publish),
    /// PUBACK (4), PUBREC (5), PUBREL (6), PUBCOMP (7).
    Ack {
        kind: u8,
        pkid: u16,
        reason: u8,
        props: Props,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
        props: Props,
    },
    PingResp,
    Disconnect {
        reason: u8,
        props: Props,
    },
    Other(u8, Vec<u8>),
}

fn decode(first: u8, body: &[u8]) -> Result<Pkt, String> {
    let kind = first >> 4;
    Ok(match kind {
        2 => {
            let sp = *body.first().ok_or("CONNACK cut short")?;
            let reason = *body.get(1).ok_or("CONNACK cut short")?;
            let props = if body.len() > 2 {
                Props::decode(&body[2..])?.0
            } else {
                Props::new()
            };
            Pkt::ConnAck {
                session_present: sp & 1 == 1,
                reason,
                props,
            }
        }
        3 => {
            let qos = (first >> 1) & 3;
            let (topic, mut i) = read_bin(body)?;
            let mut pkid = 0;
            if qos > 0 {
                let b = body.get(i..i + 2).ok_or("PUBLISH without packet id")?;
                pkid = u16::from_be_bytes([b[0], b[1]]);
                i += 2;
            }
            let (props, n) = Props::decode(&body[i..])?;
            i += n;
            Pkt::Publish(Publish {
                topic: String::from_utf8(topic).map_err(|_| "topic not UTF-8")?,
                payload: body[i..].to_vec(),
                qos,
                retain: first & 1 == 1,
                pkid,
                props,
                size: 1 + varint(body.len()).len() + body.len(),
            })
        }
        4..=7 => {
            let b = body.get(0..2).ok_or("ack cut short")?;
            let pkid = u16::from_be_bytes([b[0], b[1]]);
            let reason = body.get(2).copied().unwrap_or(0);
            let props = if body.len() > 3 {
                Props::decode(&body[3..])?.0
            } else {
                Props::new()
            };
            Pkt::Ack {
                kind,
                pkid,
                reason,
                props,
            }
        }
        9 => {
            let b = body.get(0..2).ok_or("SUBACK cut short")?;
            let pkid = u16::from_be_bytes([b[0], b[1]]);
            let (props, n) = Props::decode(&body[2..])?;
            Pkt::SubAck {
                pkid,
                codes: body[2 + n..].to_vec(),
                props,
            }
        }
        13 => Pkt::PingResp,
        14 => {
            let reason = body.first().copied().unwrap_or(0);
            let props = if body.len() > 1 {
                Props::decode(&body[1..])?.0
            } else {
                Props::new()
            };
            Pkt::Disconnect { reason, props }
        }
        _ => Pkt::Other(first, body.to_vec()),
    })
}

// ---------------------------------------------------------------------------------------------
// A raw MQTT 5 client
// ---------------------------------------------------------------------------------------------

struct ConnAck {
    session_present: bool,
    reason: u8,
    props: Props,
}

struct Mqtt {
    name: String,
    stream: TcpStream,
    buf: Vec<u8>,
    /// Packets read while waiting for something else.
    backlog: VecDeque<Pkt>,
    closed: bool,
    /// Acknowledge incoming QoS 1/2 publishes (and PUBRELs) as they are read.
    auto_ack: bool,
    next_pkid: u16,
}

impl Mqtt {
    async fn open(port: u16, name: &str) -> Mqtt {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap_or_else(|_| panic!("{name}: TCP connect timed out"))
            .unwrap_or_else(|e| panic!("{name}: TCP connect: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Mqtt {
            name: name.to_owned(),
            stream,
            buf: Vec::new(),
            backlog: VecDeque::new(),
            closed: false,
            auto_ack: true,
            next_pkid: 0,
        }
    }

    /// Opens a connection and sends CONNECT; the CONNACK if one came within [`WAIT`].
    async fn try_connect(port: u16, c: &Conn) -> (Mqtt, Option<ConnAck>) {
        let name = if c.client_id.is_empty() {
            "<empty id>"
        } else {
            &c.client_id
        };
        let mut m = Mqtt::open(port, name).await;
        m.send(&c.encode()).await;
        let ack = match m.wait_for(WAIT, |p| matches!(p, Pkt::ConnAck { .. })).await {
            Some(Pkt::ConnAck {
                session_present,
                reason,
                props,
            }) => Some(ConnAck {
                session_present,
                reason,
                props,
            }),
            _ => None,
        };
        (m, ack)
    }

    /// Connects and asserts a successful CONNACK.
    async fn connect(port: u16, c: &Conn) -> (Mqtt, ConnAck) {
        let (m, ack) = Mqtt::try_connect(port, c).await;
        let ack = ack.unwrap_or_else(|| {
            panic!(
                "{}: no CONNACK within {WAIT:?} (closed: {})",
                c.client_id, m.closed
            )
        });
        assert_eq!(ack.reason, 0, "{}: CONNACK refused", c.client_id);
        (m, ack)
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid % 65535 + 1;
        self.next_pkid
    }

    async fn send(&mut self, bytes: &[u8]) {
        // A write to a connection the server already closed fails; the reads that follow
        // report the close.
        if self.stream.write_all(bytes).await.is_err() {
            self.closed = true;
        }
    }

    fn parse(&mut self) -> Option<(u8, Vec<u8>)> {
        if self.buf.len() < 2 {
            return None;
        }
        let (len, n) = match read_varint(&self.buf[1..]) {
            Ok(v) => v,
            Err(_) if self.buf.len() < 5 => return None,
            Err(e) => panic!("{}: server sent a bad remaining length: {e}", self.name),
        };
        if self.buf.len() < 1 + n + len {
            return None;
        }
        let first = self.buf[0];
        let body = self.buf[1 + n..1 + n + len].to_vec();
        self.buf.drain(..1 + n + len);
        Some((first, body))
    }

    /// The next packet from the wire before `deadline`; `None` on timeout or close.
    async fn read_packet(&mut self, deadline: tokio::time::Instant) -> Option<Pkt> {
        loop {
            if let Some((first, body)) = self.parse() {
                let p = decode(first, &body).unwrap_or_else(|e| {
                    panic!("{}: cannot decode packet 0x{first:02x}: {e}", self.name)
                });
                if self.auto_ack {
                    match &p {
                        Pkt::Publish(p) if p.qos == 1 => self.send(&encode_ack(0x40, p.pkid)).await,
                        Pkt::Publish(p) if p.qos == 2 => self.send(&encode_ack(0x50, p.pkid)).await,
                        Pkt::Ack { kind: 6, pkid, .. } => {
                            let pkid = *pkid;
                            self.send(&encode_ack(0x70, pkid)).await
                        }
                        _ => {}
                    }
                }
                return Some(p);
            }
            if self.closed {
                return None;
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.closed = true;
                    // Whole packets still in the buffer are returned first.
                    if self.buf.len() < 2 {
                        return None;
                    }
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The first packet (from the backlog, then the wire) that `pred` accepts; others are kept
    /// in the backlog.
    async fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Pkt) -> bool) -> Option<Pkt> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while let Some(p) = self.read_packet(deadline).await {
            if pred(&p) {
                return Some(p);
            }
            self.backlog.push_back(p);
        }
        None
    }

    async fn next_publish(&mut self, timeout: Duration) -> Option<Publish> {
        match self
            .wait_for(timeout, |p| matches!(p, Pkt::Publish(_)))
            .await
        {
            Some(Pkt::Publish(p)) => Some(p),
            _ => None,
        }
    }

    /// Every publish that arrives within `window` (plus those already in the backlog).
    async fn publishes_for(&mut self, window: Duration) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_publish(left).await {
                Some(p) => out.push(p),
                None => return out,
            }
        }
    }

    /// Publishes until `n` arrived (or `timeout`), then watches [`QUIET`] for more.
    async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_publish(left).await {
                Some(p) => out.push(p),
                None => return out,
            }
        }
        out.extend(self.publishes_for(QUIET).await);
        out
    }

    /// Publishes and completes the exchange of its QoS; returns the reason code of the
    /// PUBACK/PUBREC (0 for QoS 0), or `None` if the connection closed or nothing came.
    async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        props: Props,
    ) -> Option<u8> {
        let pkid = if qos > 0 { self.pkid() } else { 0 };
        self.send(&encode_publish(topic, payload, qos, retain, pkid, &props))
            .await;
        match qos {
            0 => Some(0),
            1 => match self
                .wait_for(
                    WAIT,
                    |p| matches!(p, Pkt::Ack { kind: 4, pkid: id, .. } if *id == pkid),
                )
                .await?
            {
                Pkt::Ack { reason, .. } => Some(reason),
                _ => None,
            },
            _ => {
                let reason = match self
                    .wait_for(
                        WAIT,
                        |p| matches!(p, Pkt::Ack { kind: 5, pkid: id, .. } if *id == pkid),
                    )
                    .await?
                {
                    Pkt::Ack { reason, .. } => reason,
                    _ => return None,
                };
                if reason < 0x80 {
                    self.send(&packet(0x62, &pkid.to_be_bytes())).await;
                    let comp = self
                        .wait_for(
                            WAIT,
                            |p| matches!(p, Pkt::Ack { kind: 7, pkid: id, .. } if *id == pkid),
                        )
                        .await;
                    comp.as_ref()?;
                }
                Some(reason)
            }
        }
    }

    /// Publishes and asserts a successful acknowledgement (0x00, or 0x10 "no matching
    /// subscribers").
    async fn publish_ok(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) {
        self.publish_props(topic, payload, qos, retain, Props::new())
            .await;
    }

    async fn publish_props(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        props: Props,
    ) {
        let r = self.publish(topic, payload, qos, retain, props).await;
        assert!(
            matches!(r, Some(0x00 | 0x10)),
            "{}: publish to {topic} QoS {qos} not acknowledged: {r:?}",
            self.name
        );
    }

    /// Subscribes (one SUBSCRIBE) and returns the SUBACK's reason codes.
    async fn subscribe_with(&mut self, filters: &[(&str, u8)], props: Props) -> Vec<u8> {
        let pkid = self.pkid();
        self.send(&encode_subscribe(pkid, &props, filters)).await;
        match self
            .wait_for(
                WAIT,
                |p| matches!(p, Pkt::SubAck { pkid: id, .. } if *id == pkid),
            )
            .await
        {
            Some(Pkt::SubAck { codes, .. }) => codes,
            other => panic!(
                "{}: no SUBACK for {filters:?} within {WAIT:?} ({other:?}, closed {})",
                self.name, self.closed
            ),
        }
    }

    /// Subscribes and asserts every filter was granted the QoS in its options.
    async fn subscribe(&mut self, filters: &[(&str, u8)]) {
        let codes = self.subscribe_with(filters, Props::new()).await;
        let want: Vec<u8> = filters.iter().map(|(_, o)| o & 3).collect();
        assert_eq!(codes, want, "{}: SUBACK for {filters:?}", self.name);
    }

    /// Normal DISCONNECT (reason 0), then waits for the server to close.
    async fn disconnect(mut self) {
        self.send(&[0xe0, 0x00]).await;
        let _ = self.closed_within(WAIT).await;
    }

    /// Waits until the server closes the connection; returns whether it did, and the
    /// DISCONNECT reason code if one came first.
    async fn closed_within(&mut self, timeout: Duration) -> (bool, Option<u8>) {
        let mut reason = self.backlog.iter().find_map(|p| match p {
            Pkt::Disconnect { reason, .. } => Some(*reason),
            _ => None,
        });
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.read_packet(deadline).await {
                Some(Pkt::Disconnect { reason: r, .. }) => reason = reason.or(Some(r)),
                Some(p) => self.backlog.push_back(p),
                None => return (self.closed, reason),
            }
        }
    }

    async fn ping_ok(&mut self) -> bool {
        self.send(&[0xc0, 0x00]).await;
        self.wait_for(WAIT, |p| matches!(p, Pkt::PingResp))
            .await
            .is_some()
    }
}

/// A client that connected with clean start and a QoS `opts` subscription to `filters`.
async fn subscriber(port: u16, id: &str, filters: &[(&str, u8)]) -> Mqtt {
    let (mut m, _) = Mqtt::connect(port, &Conn::new(id)).await;
    m.subscribe(filters).await;
    m
}

async fn client(port: u16, id: &str) -> Mqtt {
    Mqtt::connect(port, &Conn::new(id)).await.0
}

fn texts(ps: &[Publish]) -> Vec<String> {
    ps.iter().map(Publish::text).collect()
}

async fn relay(name: &str) -> Relay {
    Relay::start(RelayConfig::new(name)).await
}

/// Publishes with rumqttc's MQTT 5 client (a plain real client) and waits for the PUBACK.
async fn rumqttc_publish(
    port: u16,
    id: &str,
    topic: &str,
    payload: &[u8],
    props: rumqttc::v5::mqttbytes::v5::PublishProperties,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), props)
        .await
        .expect("queue publish");
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    assert!(
                        matches!(
                            ack.reason,
                            rumqttc::v5::mqttbytes::v5::PubAckReason::Success
                                | rumqttc::v5::mqttbytes::v5::PubAckReason::NoMatchingSubscribers
                        ),
                        "{id}: PUBACK {:?}",
                        ack.reason
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) => panic!("{id}: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id}: no PUBACK within {WAIT:?}"));
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
}

// ---------------------------------------------------------------------------------------------
// 1. Session Expiry Interval (§3.1.2.11.2, §4.1)
// ---------------------------------------------------------------------------------------------

/// §3.1.2.11.2: a Session Expiry Interval of 0 (or none) ends the session when the network
/// connection closes, by DISCONNECT or broken off: a reconnect without clean start finds no
/// session (CONNACK session present 0 [MQTT-3.2.2-3]), no subscription and no message published
/// meanwhile. An interval of N seconds keeps the session N seconds after the close
/// [MQTT-3.1.2-23]: a reconnect within them resumes it (session present 1, the QoS 1 message
/// published meanwhile, the subscription); one after them finds nothing.
#[tokio::test]
async fn session_expiry_zero_ends_the_session_at_close_and_n_keeps_it_n_seconds() {
    let relay = relay("v5-session-expiry").await;
    let port = relay.port();
    let mut c = Checks::new("session expiry");
    let mut p = client(port, "se-pub").await;

    for (how, id, topic) in [
        ("DISCONNECT", "se0-polite", "se0/polite"),
        ("a broken connection", "se0-broken", "se0/broken"),
    ] {
        // No Session Expiry Interval property: 0.
        let (mut s, _) = Mqtt::connect(port, &Conn::new(id)).await;
        s.subscribe(&[(topic, 1)]).await;
        if how == "DISCONNECT" {
            s.disconnect().await;
        } else {
            drop(s);
        }
        // Let the relay see the close before publishing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.publish_ok(topic, b"while away", 1, false).await;
        let (mut s, ack) = Mqtt::connect(port, &Conn::new(id).clean(false)).await;
        c.check(
            !ack.session_present,
            format!(
                "expiry 0, after {how}: a reconnect without clean start got session present 1; \
                 the session must have ended with the connection [§3.1.2.11.2]"
            ),
        );
        p.publish_ok(topic, b"after", 1, false).await;
        let got = s.publishes_for(QUIET).await;
        c.check(
            got.is_empty(),
            format!(
                "expiry 0, after {how}: the ended session's queued message and subscription \
                 must be gone, got {:?}",
                texts(&got)
            ),
        );
        s.disconnect().await;
    }

    const N: u32 = 2;
    let conn = |clean: bool| {
        Conn::new("seN")
            .clean(clean)
            .props(Props::new().u32(prop::SESSION_EXPIRY, N))
    };
    let (mut s, ack) = Mqtt::connect(port, &conn(true)).await;
    c.check(
        !ack.session_present,
        "clean start: CONNACK session present must be 0 [MQTT-3.2.2-2]",
    );
    s.subscribe(&[("seN/t", 1)]).await;
    s.disconnect().await;
    p.publish_ok("seN/t", b"kept", 1, false).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (mut s, ack) = Mqtt::connect(port, &conn(false)).await;
    c.check(
        ack.session_present,
        format!("expiry {N} s, reconnect after 1.2 s: session present must be 1 [MQTT-3.1.2-23]"),
    );
    let got = s.collect(1, WAIT).await;
    c.check(
        texts(&got) == ["kept"],
        format!(
            "expiry {N} s: the QoS 1 message published while away must be delivered on resume \
             [MQTT-3.1.2-23], got {:?}",
            texts(&got)
        ),
    );
    p.publish_ok("seN/t", b"live", 1, false).await;
    let got = s.collect(1, WAIT).await;
    c.check(
        texts(&got) == ["live"],
        format!(
            "expiry {N} s: the resumed session's subscription must still deliver, got {:?}",
            texts(&got)
        ),
    );
    // Broken off this time: the interval counts from the close all the same.
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.publish_ok("seN/t", b"expires with the session", 1, false)
        .await;
    tokio::time::sleep(Duration::from_secs(u64::from(N) + 2)).await;
    let (mut s, ack) = Mqtt::connect(port, &conn(false)).await;
    c.check(
        !ack.session_present,
        format!(
            "expiry {N} s, reconnect {} s after the close: the session must have expired \
             (session present 0)",
            N + 2
        ),
    );
    p.publish_ok("seN/t", b"after expiry", 1, false).await;
    let got = s.publishes_for(QUIET).await;
    c.check(
        got.is_empty(),
        format!(
            "expired session: neither its queued message nor its subscription may remain, got \
             {:?}",
            texts(&got)
        ),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 2. User Properties (§3.3.2.3.7)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn user_properties_reach_subscribers_unaltered_and_in_order() {
    let relay = relay("v5-user-props").await;
    let port = relay.port();
    let mut c = Checks::new("user properties");
    let mut s = subscriber(port, "up-sub", &[("up/#", 1)]).await;

    let sent = Props::new()
        .pair("a", "1")
        .pair("b", "two words")
        .pair("a", "3")
        .pair("ünï", "cödé");
    let mut p = client(port, "up-pub").await;
    p.publish_props("up/raw/q1", b"x", 1, false, sent.clone())
        .await;
    p.publish_props("up/raw/q0", b"y", 0, false, sent.clone())
        .await;
    rumqttc_publish(
        port,
        "up-rumqttc",
        "up/rumqttc",
        b"z",
        rumqttc::v5::mqttbytes::v5::PublishProperties {
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            ..Default::default()
        },
    )
    .await;

    let got = s.collect(3, WAIT).await;
    let by_topic: HashMap<_, _> = got.iter().map(|p| (p.topic.as_str(), p)).collect();
    for topic in ["up/raw/q1", "up/raw/q0"] {
        match by_topic.get(topic) {
            Some(p) => {
                c.check(
                    p.props.user_props() == sent.user_props(),
                    format!(
                        "{topic}: user properties {:?}, sent {:?} [MQTT-3.3.2-17/18]",
                        p.props.user_props(),
                        sent.user_props()
                    ),
                );
            }
            None => {
                c.check(false, format!("{topic}: not delivered"));
            }
        }
    }
    match by_topic.get("up/rumqttc") {
        Some(p) => {
            c.check(
                p.props.user_props()
                    == [("k".to_owned(), "v".to_owned()), ("k".into(), "w".into())],
                format!("up/rumqttc: user properties {:?}", p.props.user_props()),
            );
        }
        None => {
            c.check(false, "up/rumqttc: not delivered");
        }
    }
    c.check(
        got.len() == 3,
        format!("expected 3 messages, got {}", got.len()),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 3. Payload Format Indicator and Content Type (§3.3.2.3.2, §3.3.2.3.9)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn payload_format_indicator_and_content_type_pass_through() {
    let relay = relay("v5-pfi-ct").await;
    let port = relay.port();
    let mut c = Checks::new("payload format / content type");
    let mut s = subscriber(port, "pf-sub", &[("pf/#", 1)]).await;
    let mut p = client(port, "pf-pub").await;
    p.publish_props(
        "pf/json",
        br#"{"t":21.5}"#,
        1,
        false,
        Props::new()
            .byte(prop::PAYLOAD_FORMAT, 1)
            .str(prop::CONTENT_TYPE, "application/json; charset=utf-8"),
    )
    .await;
    p.publish_props(
        "pf/bytes",
        &[0xff, 0x00, 0xfe],
        1,
        false,
        Props::new()
            .byte(prop::PAYLOAD_FORMAT, 0)
            .str(prop::CONTENT_TYPE, "application/octet-stream"),
    )
    .await;
    rumqttc_publish(
        port,
        "pf-rumqttc",
        "pf/rumqttc",
        b"hello",
        rumqttc::v5::mqttbytes::v5::PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("text/plain".into()),
            ..Default::default()
        },
    )
    .await;
    let got = s.collect(3, WAIT).await;
    let by_topic: HashMap<_, _> = got.iter().map(|p| (p.topic.as_str(), p)).collect();
    // (topic, expected indicator, whether an absent indicator is as good, content type, payload)
    let cases: [(&str, u8, bool, &str, &[u8]); 3] = [
        (
            "pf/json",
            1,
            false,
            "application/json; charset=utf-8",
            br#"{"t":21.5}"#,
        ),
        (
            "pf/bytes",
            0,
            true,
            "application/octet-stream",
            &[0xff, 0x00, 0xfe],
        ),
        ("pf/rumqttc", 1, false, "text/plain", b"hello"),
    ];
    for (topic, pfi, absent_ok, ct, payload) in cases {
        let Some(p) = by_topic.get(topic) else {
            c.check(false, format!("{topic}: not delivered"));
            continue;
        };
        let got_pfi = p.props.byte_of(prop::PAYLOAD_FORMAT);
        c.check(
            got_pfi == Some(pfi) || (absent_ok && got_pfi.is_none()),
            format!("{topic}: Payload Format Indicator {got_pfi:?}, sent {pfi} [MQTT-3.3.2-4]"),
        );
        c.check(
            p.props.str_of(prop::CONTENT_TYPE).as_deref() == Some(ct),
            format!(
                "{topic}: Content Type {:?}, sent {ct:?} [MQTT-3.3.2-20]",
                p.props.str_of(prop::CONTENT_TYPE)
            ),
        );
        c.check(p.payload == payload, format!("{topic}: payload changed"));
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 4. Message Expiry Interval (§3.3.2.3.3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn message_expiry_drops_expired_messages_and_forwards_the_remaining_interval() {
    let relay = relay("v5-msg-expiry").await;
    let port = relay.port();
    let mut c = Checks::new("message expiry");
    let conn = Conn::new("me-sub")
        .clean(false)
        .props(Props::new().u32(prop::SESSION_EXPIRY, 60));
    let (mut s, _) = Mqtt::connect(port, &conn).await;
    s.subscribe(&[("me/#", 1)]).await;

    // Live: the interval is forwarded (less the time it waited, here none to speak of).
    let mut p = client(port, "me-pub").await;
    p.publish_props(
        "me/live",
        b"live",
        1,
        false,
        Props::new().u32(prop::MESSAGE_EXPIRY, 30),
    )
    .await;
    match s.next_publish(WAIT).await {
        Some(m) => {
            let e = m.props.u32_of(prop::MESSAGE_EXPIRY);
            c.check(
                matches!(e, Some(29..=30)),
                format!("live message: Message Expiry Interval {e:?}, sent 30 [MQTT-3.3.2-6]"),
            );
        }
        None => {
            c.check(false, "live message not delivered");
        }
    }
    s.disconnect().await;

    // Queued for the offline session: one expires while it waits, one does not.
    p.publish_props(
        "me/q",
        b"short",
        1,
        false,
        Props::new().u32(prop::MESSAGE_EXPIRY, 1),
    )
    .await;
    p.publish_props(
        "me/q",
        b"long",
        1,
        false,
        Props::new().u32(prop::MESSAGE_EXPIRY, 30),
    )
    .await;
    p.publish_ok("me/q", b"forever", 1, false).await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (mut s, ack) = Mqtt::connect(port, &conn).await;
    c.check(ack.session_present, "the 60 s session must still be there");
    let got = s.collect(2, WAIT).await;
    c.check(
        texts(&got) == ["long", "forever"],
        format!(
            "after 2.3 s offline, expected [long, forever] (short expired after 1 s) \
             [MQTT-3.3.2-5], got {:?}",
            texts(&got)
        ),
    );
    for m in &got {
        let e = m.props.u32_of(prop::MESSAGE_EXPIRY);
        match m.text().as_str() {
            "long" => c.check(
                matches!(e, Some(1..=28)),
                format!(
                    "queued 2.3 s with 30 s expiry: forwarded interval must be 30 - 2 or less, \
                     got {e:?} [MQTT-3.3.2-6]"
                ),
            ),
            "forever" => c.check(e.is_none(), format!("no expiry was sent, got {e:?}")),
            _ => true,
        };
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 5. No Local (§3.8.3.1)
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.8.3-3]: with No Local, a client's own publishes are not sent back to it on that
/// subscription; other clients' publishes are, and other subscribers get its publishes.
#[tokio::test]
async fn no_local_keeps_a_client_s_own_publishes_from_it() {
    let relay = relay("v5-no-local").await;
    let port = relay.port();
    let mut c = Checks::new("no local");
    let mut a = client(port, "nl-a").await;
    a.subscribe(&[("nl/t", 1 | opt::NO_LOCAL)]).await;
    let mut observer = subscriber(port, "nl-observer", &[("nl/t", 1)]).await;
    let mut b = client(port, "nl-b").await;
    a.publish_ok("nl/t", b"mine", 1, false).await;
    b.publish_ok("nl/t", b"theirs", 1, false).await;
    let seen = observer.collect(2, WAIT).await;
    c.check(
        texts(&seen) == ["mine", "theirs"],
        format!(
            "a subscriber without No Local gets both publishes, got {:?}",
            texts(&seen)
        ),
    );
    let got = a.collect(1, WAIT).await;
    c.check(
        texts(&got) == ["theirs"],
        format!(
            "No Local: the subscriber must get only the other client's message, not its own \
             [MQTT-3.8.3-3], got {:?}",
            texts(&got)
        ),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 6. Retain As Published (§3.8.3.1, §3.3.1.3)
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.3.1-12/13]: on a live delivery the RETAIN flag is 0 unless the subscription has
/// Retain As Published, which keeps the flag the message was published with. A retained message
/// sent because of a new subscription has RETAIN 1 whatever the option [MQTT-3.3.1-8 §3.3.1.3].
#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_on_live_deliveries() {
    let relay = relay("v5-rap").await;
    let port = relay.port();
    let mut c = Checks::new("retain as published");
    let summary = |ps: &[Publish]| -> Vec<(String, bool)> {
        ps.iter().map(|m| (m.text(), m.retain)).collect()
    };
    let mut rap1 = subscriber(port, "rap-1", &[("rap/t", 1 | opt::RETAIN_AS_PUBLISHED)]).await;
    let mut rap0 = subscriber(port, "rap-0", &[("rap/t", 1)]).await;
    let mut p = client(port, "rap-pub").await;
    p.publish_ok("rap/t", b"r", 1, true).await;
    p.publish_ok("rap/t", b"n", 1, false).await;
    let got = rap1.collect(2, WAIT).await;
    c.check(
        summary(&got) == [("r".to_owned(), true), ("n".to_owned(), false)],
        format!(
            "Retain As Published 1: live deliveries keep their RETAIN flag [MQTT-3.3.1-13], \
             got {:?}",
            summary(&got)
        ),
    );
    let got = rap0.collect(2, WAIT).await;
    c.check(
        summary(&got) == [("r".to_owned(), false), ("n".to_owned(), false)],
        format!(
            "Retain As Published 0: live deliveries have RETAIN 0 [MQTT-3.3.1-12], got {:?}",
            summary(&got)
        ),
    );
    for (id, opts) in [
        ("rap-new-0", 1),
        ("rap-new-1", 1 | opt::RETAIN_AS_PUBLISHED),
    ] {
        let mut s = subscriber(port, id, &[("rap/t", opts)]).await;
        let got = s.collect(1, WAIT).await;
        c.check(
            summary(&got) == [("r".to_owned(), true)],
            format!(
                "{id}: the retained message sent for a new subscription has RETAIN 1, got {:?}",
                summary(&got)
            ),
        );
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 7. Retain Handling (§3.8.3.1, §3.3.1.3)
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.3.1-9/10/11]: Retain Handling 0 sends the retained messages at every subscribe,
/// 1 only when the subscription did not exist yet, 2 never; the subscriptions themselves work
/// alike.
#[tokio::test]
async fn retain_handling_0_1_2_decides_when_retained_messages_are_sent() {
    let relay = relay("v5-retain-handling").await;
    let port = relay.port();
    let mut c = Checks::new("retain handling");
    let summary = |ps: &[Publish]| -> Vec<(String, bool)> {
        ps.iter().map(|m| (m.text(), m.retain)).collect()
    };
    let retained = || vec![("R".to_owned(), true)];
    let mut p = client(port, "rh-pub").await;
    p.publish_ok("rh/t", b"R", 1, true).await;

    // (id, options, what the first subscribe brings, what the same subscribe again brings)
    let cases = [
        ("rh-0", 1, retained(), retained(), "[MQTT-3.3.1-9]"),
        (
            "rh-1",
            1 | opt::RETAIN_HANDLING_1,
            retained(),
            vec![],
            "[MQTT-3.3.1-10]",
        ),
        (
            "rh-2",
            1 | opt::RETAIN_HANDLING_2,
            vec![],
            vec![],
            "[MQTT-3.3.1-11]",
        ),
    ];
    let mut subs = Vec::new();
    for (id, opts, first, again, rule) in cases {
        let handling = opts >> 4;
        let mut s = client(port, id).await;
        s.subscribe(&[("rh/t", opts)]).await;
        let got = s.publishes_for(QUIET).await;
        c.check(
            summary(&got) == first,
            format!(
                "Retain Handling {handling}, new subscription: want {first:?}, got {:?} {rule}",
                summary(&got)
            ),
        );
        s.subscribe(&[("rh/t", opts)]).await;
        let got = s.publishes_for(QUIET).await;
        c.check(
            summary(&got) == again,
            format!(
                "Retain Handling {handling}, the same subscription again: want {again:?}, got \
                 {:?} {rule}",
                summary(&got)
            ),
        );
        subs.push((handling, s));
    }
    p.publish_ok("rh/t", b"L", 1, false).await;
    for (handling, s) in &mut subs {
        let got = s.collect(1, WAIT).await;
        c.check(
            summary(&got) == [("L".to_owned(), false)],
            format!(
                "Retain Handling {handling}: one live delivery, got {:?}",
                summary(&got)
            ),
        );
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 8. Subscription Identifiers (§3.8.2.1.2, §3.3.2.3.8)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn subscription_identifiers_come_with_matching_messages() {
    let relay = relay("v5-sub-id").await;
    let port = relay.port();
    let mut c = Checks::new("subscription identifiers");
    let mut s = client(port, "sid-sub").await;
    let codes = s
        .subscribe_with(
            &[("sid/+", 1)],
            Props::new().varint(prop::SUBSCRIPTION_ID, 7),
        )
        .await;
    assert_eq!(codes, [1]);
    let codes = s
        .subscribe_with(
            &[("sid/a", 1)],
            Props::new().varint(prop::SUBSCRIPTION_ID, 300),
        )
        .await;
    assert_eq!(codes, [1]);
    s.subscribe(&[("plain/x", 1)]).await;
    let mut other = subscriber(port, "sid-other", &[("sid/+", 1)]).await;

    let mut p = client(port, "sid-pub").await;
    p.publish_ok("sid/a", b"A", 1, false).await;
    p.publish_ok("sid/b", b"B", 1, false).await;
    p.publish_ok("plain/x", b"X", 1, false).await;

    // sid/a matches both subscriptions: one copy with both ids or one copy per subscription.
    let got = s.collect(3, WAIT).await;
    let mut ids: BTreeMap<String, Vec<Vec<u32>>> = BTreeMap::new();
    for m in &got {
        let mut v = m.props.varints(prop::SUBSCRIPTION_ID);
        v.sort_unstable();
        ids.entry(m.topic.clone()).or_default().push(v);
    }
    let a = ids.get("sid/a").cloned().unwrap_or_default();
    let a_union: BTreeSet<u32> = a.iter().flatten().copied().collect();
    c.check(
        !a.is_empty()
            && a_union == BTreeSet::from([7, 300])
            && (a.len() == 1 || a.iter().all(|v| v.len() == 1)),
        format!(
            "sid/a (matches sid/+ id 7 and sid/a id 300): ids per copy {a:?} [MQTT-3.3.4-3/4/5]"
        ),
    );
    let b = ids.get("sid/b").cloned().unwrap_or_default();
    c.check(
        b == [vec![7]],
        format!("sid/b (matches sid/+ id 7 only): ids per copy {b:?}"),
    );
    let x = ids.get("plain/x").cloned().unwrap_or_default();
    c.check(
        x == [Vec::<u32>::new()],
        format!("plain/x (subscribed without id): ids per copy {x:?}"),
    );
    let got = other.collect(2, WAIT).await;
    for m in &got {
        c.check(
            m.props.varints(prop::SUBSCRIPTION_ID).is_empty(),
            format!(
                "another client's subscription ids leaked to sid-other on {}: {:?}",
                m.topic,
                m.props.varints(prop::SUBSCRIPTION_ID)
            ),
        );
    }
    c.check(got.len() == 2, format!("sid-other got {} of 2", got.len()));
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 9. Topic aliases, client to server (§3.3.2.3.4)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn topic_aliases_from_the_client_are_resolved() {
    let relay = relay("v5-alias-in").await;
    let port = relay.port();
    let mut c = Checks::new("topic aliases client→server");
    let mut s = subscriber(port, "tai-sub", &[("tai/#", 1)]).await;
    let (mut p, ack) = Mqtt::connect(port, &Conn::new("tai-pub")).await;
    let max = ack.props.u16_of(prop::TOPIC_ALIAS_MAXIMUM).unwrap_or(0);
    assert!(
        max >= 1,
        "CONNACK Topic Alias Maximum {max}: the relay takes no aliases, nothing to test"
    );
    let alias = |n: u16| Props::new().u16(prop::TOPIC_ALIAS, n);
    for (topic, payload) in [
        ("tai/one", "1"),
        ("", "2"),
        ("tai/two", "3"), // the same alias mapped to another topic
        ("", "4"),
    ] {
        let r = p
            .publish(topic, payload.as_bytes(), 1, false, alias(1))
            .await;
        c.check(
            matches!(r, Some(0x00 | 0x10)),
            format!("publish {payload} with alias 1: PUBACK {r:?}"),
        );
    }
    let got = s.collect(4, WAIT).await;
    let seen: Vec<(String, String)> = got.iter().map(|m| (m.topic.clone(), m.text())).collect();
    let want: Vec<(String, String)> = [
        ("tai/one", "1"),
        ("tai/one", "2"),
        ("tai/two", "3"),
        ("tai/two", "4"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.to_string()))
    .collect();
    c.check(
        seen == want,
        format!("subscriber (no Topic Alias Maximum) must get full topics: {seen:?}"),
    );
    for m in &got {
        c.check(
            !m.props.has(prop::TOPIC_ALIAS),
            "a client without Topic Alias Maximum got a topic alias [MQTT-3.2.2-17]",
        );
    }

    // An alias above the server's maximum is an error [MQTT-3.3.2-9]: close (DISCONNECT 0x94).
    if max < u16::MAX {
        let mut bad = client(port, "tai-over").await;
        bad.send(&encode_publish("tai/x", b"x", 1, false, 1, &alias(max + 1)))
            .await;
        let (closed, reason) = bad.closed_within(WAIT).await;
        c.check(
            closed && matches!(reason, None | Some(0x94)),
            format!(
                "alias {} over the maximum {max}: closed {closed}, DISCONNECT {reason:?} \
                 (want closed, 0x94 if any)",
                max + 1
            ),
        );
    }
    // An alias never set up with an empty topic is a Protocol Error [MQTT-3.3.4-? §3.3.2.3.4].
    let mut bad = client(port, "tai-unknown").await;
    bad.send(&encode_publish("", b"x", 1, false, 1, &alias(5)))
        .await;
    let (closed, reason) = bad.closed_within(WAIT).await;
    c.check(
        closed && matches!(reason, None | Some(0x82)),
        format!(
            "unknown alias with empty topic: closed {closed}, DISCONNECT {reason:?} \
             (want closed, 0x82 if any)"
        ),
    );
    let late = s.publishes_for(Duration::from_millis(300)).await;
    c.check(
        late.is_empty(),
        format!("refused publishes were delivered: {:?}", texts(&late)),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 10. Topic aliases, server to client (§3.3.2.3.4)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn topic_aliases_from_the_server_respect_the_client_maximum_and_resolve_right() {
    let relay = relay("v5-alias-out").await;
    let port = relay.port();
    let mut c = Checks::new("topic aliases server→client");
    let conn = Conn::new("tao-sub").props(Props::new().u16(prop::TOPIC_ALIAS_MAXIMUM, 2));
    let (mut s, _) = Mqtt::connect(port, &conn).await;
    s.subscribe(&[("tao/#", 1)]).await;
    let mut none = subscriber(port, "tao-none", &[("tao/#", 1)]).await;
    let mut p = client(port, "tao-pub").await;

    let topics = ["tao/a", "tao/b", "tao/a", "tao/c", "tao/b", "tao/a"];
    let mut map: HashMap<u16, String> = HashMap::new();
    let mut used = 0;
    for (i, topic) in topics.iter().enumerate() {
        let payload = i.to_string();
        p.publish_ok(topic, payload.as_bytes(), 1, false).await;
        let Some(m) = s.next_publish(WAIT).await else {
            c.check(false, format!("message {i} on {topic} not delivered"));
            continue;
        };
        let alias = m.props.u16_of(prop::TOPIC_ALIAS);
        if let Some(a) = alias {
            used += 1;
            c.check(
                (1..=2).contains(&a),
                format!("alias {a} outside 1..=2 (client's maximum 2) [MQTT-3.3.2-8]"),
            );
        }
        let resolved = match (m.topic.is_empty(), alias) {
            (false, Some(a)) => {
                map.insert(a, m.topic.clone());
                Some(m.topic.clone())
            }
            (false, None) => Some(m.topic.clone()),
            (true, Some(a)) => map.get(&a).cloned(),
            (true, None) => None,
        };
        c.check(
            resolved.as_deref() == Some(*topic) && m.text() == payload,
            format!(
                "message {i} published on {topic}: wire topic {:?} alias {alias:?} resolves \
                 to {resolved:?}",
                m.topic
            ),
        );
        let plain = none.next_publish(WAIT).await;
        c.check(
            plain
                .as_ref()
                .is_some_and(|m| m.topic == *topic && !m.props.has(prop::TOPIC_ALIAS)),
            format!(
                "client without Topic Alias Maximum: got {:?} for {topic} [MQTT-3.2.2-17]",
                plain.map(|m| (m.topic, m.props))
            ),
        );
    }
    eprintln!(
        "server used a topic alias on {used} of {} messages",
        topics.len()
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 11. Maximum Packet Size (§3.1.2.11.4, §3.2.2.3.6)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn maximum_packet_size_is_respected_both_ways() {
    let relay =
        Relay::start(RelayConfig::new("v5-max-packet").mqtt("max_packet_size = 2048")).await;
    let port = relay.port();
    let mut c = Checks::new("maximum packet size");

    // The client's maximum: the server must not send a larger packet, and goes on after it.
    let conn = Conn::new("mps-small").props(Props::new().u32(prop::MAXIMUM_PACKET_SIZE, 256));
    let (mut s, ack) = Mqtt::connect(port, &conn).await;
    s.subscribe(&[("mps/#", 1)]).await;
    let mut p = client(port, "mps-pub").await;
    p.publish_ok("mps/big", &[b'x'; 1000], 1, false).await;
    p.publish_ok("mps/small", b"small", 1, false).await;
    let got = s.collect(1, WAIT).await;
    for m in &got {
        c.check(
            m.size <= 256,
            format!(
                "server sent a {}-byte PUBLISH on {} to a client whose Maximum Packet Size is \
                 256 [MQTT-3.1.2-24]",
                m.size, m.topic
            ),
        );
    }
    c.check(
        got.iter().any(|m| m.topic == "mps/small"),
        format!(
            "the small message after the discarded one must still arrive [MQTT-3.1.2-25], \
             got {:?}, closed {}",
            got.iter().map(|m| &m.topic).collect::<Vec<_>>(),
            s.closed
        ),
    );

    // The server's maximum: announced in CONNACK (absent means no limit), enforced with 0x95.
    let announced = ack.props.u32_of(prop::MAXIMUM_PACKET_SIZE);
    c.check(
        announced.is_some_and(|n| n <= 2048 + 5),
        format!(
            "the relay limits packets to 2048 bytes but CONNACK Maximum Packet Size is \
             {announced:?} (absent means no limit) [§3.2.2.3.6]"
        ),
    );
    let mut big = client(port, "mps-big").await;
    big.send(&encode_publish(
        "mps/huge",
        &[b'y'; 4000],
        1,
        false,
        1,
        &Props::new(),
    ))
    .await;
    let (closed, reason) = big.closed_within(WAIT).await;
    c.check(
        closed && reason == Some(0x95),
        format!(
            "4000-byte PUBLISH over the 2048 limit: closed {closed}, DISCONNECT {reason:?} \
             (want 0x95)"
        ),
    );
    let late = s.publishes_for(Duration::from_millis(300)).await;
    c.check(
        !late.iter().any(|m| m.topic == "mps/huge"),
        "the oversized publish was delivered",
    );
    c.finish();
}

/// The broker waits for an acknowledgement of a QoS 1/2 publish the server discarded as too
/// large for the client (rumqttd closes a subscriber's connection on acknowledgements out of
/// order): the exchange of the other publishes must go on, QoS 2 included, and no PUBREL for a
/// discarded publish may reach the client.
#[tokio::test]
async fn discarded_oversize_publishes_do_not_break_the_acknowledgement_order() {
    let relay = relay("v5-max-packet-order").await;
    let port = relay.port();
    let mut c = Checks::new("maximum packet size, acknowledgement order");

    let conn = Conn::new("mpo-sub").props(Props::new().u32(prop::MAXIMUM_PACKET_SIZE, 256));
    let (mut s, _) = Mqtt::connect(port, &conn).await;
    s.subscribe(&[("mpo/#", 2)]).await;
    s.auto_ack = false;
    let mut p = client(port, "mpo-pub").await;
    let big = [b'x'; 1000];
    for round in 0..2 {
        // small QoS 1, big QoS 2, small QoS 2, big QoS 1, small QoS 1: the client only hears of
        // the small ones, and acknowledges them only once all three came.
        p.publish_ok("mpo/a", b"a", 1, false).await;
        p.publish_ok("mpo/b", &big, 2, false).await;
        p.publish_ok("mpo/c", b"c", 2, false).await;
        p.publish_ok("mpo/d", &big, 1, false).await;
        p.publish_ok("mpo/e", b"e", 1, false).await;
        let got = s.collect(3, WAIT).await;
        let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
        c.check(
            topics == ["mpo/a", "mpo/c", "mpo/e"],
            format!("round {round}: want the three small messages in order, got {topics:?}"),
        );
        for m in &got {
            if m.qos == 2 {
                s.send(&encode_ack(0x50, m.pkid)).await;
                let rel = s
                    .wait_for(WAIT, |p| matches!(p, Pkt::Ack { kind: 6, .. }))
                    .await;
                match rel {
                    Some(Pkt::Ack { pkid, .. }) if pkid == m.pkid => {
                        s.send(&encode_ack(0x70, pkid)).await;
                    }
                    other => {
                        c.check(
                            false,
                            format!(
                                "round {round}: PUBREC {} answered with {other:?} (closed {})",
                                m.pkid, s.closed
                            ),
                        );
                    }
                }
            } else {
                s.send(&encode_ack(0x40, m.pkid)).await;
            }
        }
    }
    p.publish_ok("mpo/f", b"f", 1, false).await;
    let last = s.next_publish(WAIT).await;
    c.check(
        last.as_ref().is_some_and(|m| m.topic == "mpo/f"),
        format!(
            "after the discarded publishes the subscriber must still get messages: got {:?}, \
             closed {}",
            last.map(|m| m.topic),
            s.closed
        ),
    );
    let stray: Vec<Pkt> = s.backlog.drain(..).collect();
    c.check(
        stray.is_empty(),
        format!("packets the client should not have got: {stray:?}"),
    );
    c.check(s.ping_ok().await, "the subscriber's connection was closed");
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 12. Keep Alive and Server Keep Alive (§3.1.2.10, §3.2.2.3.14)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn keep_alive_zero_is_accepted_and_keep_alive_is_enforced() {
    let relay = relay("v5-keep-alive").await;
    let port = relay.port();
    let mut c = Checks::new("keep alive");

    // Keep Alive 0 switches the mechanism off; a server may still set Server Keep Alive.
    let (mut zero, ack) = Mqtt::try_connect(port, &Conn::new("ka-zero").keep_alive(0)).await;
    match ack {
        Some(ack) if ack.reason == 0 => {
            let server_ka = ack.props.u16_of(prop::SERVER_KEEP_ALIVE);
            eprintln!("keep-alive 0: CONNACK Server Keep Alive {server_ka:?}");
            let idle = match server_ka {
                // The server asked for pings; idle less than that.
                Some(n) if n > 0 => Duration::from_millis(u64::from(n) * 500),
                _ => Duration::from_secs(3),
            };
            tokio::time::sleep(idle).await;
            c.check(
                zero.ping_ok().await,
                format!("keep-alive 0 connection idle {idle:?} was closed"),
            );
        }
        Some(ack) => {
            c.check(
                false,
                format!("keep-alive 0 refused with CONNACK 0x{:02x}", ack.reason),
            );
        }
        None => {
            c.check(
                false,
                format!(
                    "keep-alive 0 (legal: keep-alive off) got no CONNACK (closed {})",
                    zero.closed
                ),
            );
        }
    }

    // Keep Alive 1 s (or the Server Keep Alive): an idle client is closed after 1.5 times it
    // [MQTT-3.1.2-22], not before the keep-alive itself.
    let (mut idle, ack) = Mqtt::connect(port, &Conn::new("ka-idle").keep_alive(1)).await;
    let ka = ack
        .props
        .u16_of(prop::SERVER_KEEP_ALIVE)
        .unwrap_or(1)
        .max(1);
    let ka = Duration::from_secs(u64::from(ka));
    let start = Instant::now();
    let (closed, _) = idle
        .closed_within(ka * 3 / 2 + Duration::from_secs(1))
        .await;
    let after = start.elapsed();
    c.check(
        closed && after >= ka.mul_f32(0.9),
        format!(
            "idle client with keep-alive {ka:?}: closed {closed} after {after:?} (want closed \
             between {ka:?} and 1.5 × keep-alive + 1 s slack)"
        ),
    );

    // A client that pings within its keep-alive stays.
    let (mut busy, _) = Mqtt::connect(port, &Conn::new("ka-busy").keep_alive(1)).await;
    let mut ok = true;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        ok &= busy.ping_ok().await;
    }
    c.check(
        ok,
        "a client pinging every 0.4 s with keep-alive 1 s was dropped",
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 13. Receive Maximum, both ways (§3.1.2.11.3, §3.2.2.3.3, §4.9)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn receive_maximum_is_respected_both_ways() {
    let relay = Relay::start(RelayConfig::new("v5-recv-max").mqtt("max_inflight = 5")).await;
    let port = relay.port();
    let mut c = Checks::new("receive maximum");

    // Server → client: at most the client's 3 unacknowledged QoS 1 messages [MQTT-3.3.4-9].
    let conn = Conn::new("rm-sub").props(Props::new().u16(prop::RECEIVE_MAXIMUM, 3));
    let (mut s, ack) = Mqtt::connect(port, &conn).await;
    s.subscribe(&[("rm/t", 1)]).await;
    s.auto_ack = false;
    let mut p = client(port, "rm-pub").await;
    for i in 0..10 {
        p.publish_ok("rm/t", format!("{i}").as_bytes(), 1, false)
            .await;
    }
    let mut received = Vec::new();
    let mut most_unacked = 0;
    let deadline = Instant::now() + Duration::from_secs(6);
    while received.len() < 10 && Instant::now() < deadline {
        let batch = s.publishes_for(Duration::from_millis(400)).await;
        most_unacked = most_unacked.max(batch.len());
        if batch.is_empty() && s.closed {
            break;
        }
        for m in &batch {
            s.send(&encode_ack(0x40, m.pkid)).await;
        }
        received.extend(texts(&batch));
    }
    c.check(
        most_unacked <= 3,
        format!(
            "client Receive Maximum 3: the server sent {most_unacked} QoS 1 messages without \
             waiting for acknowledgements [MQTT-3.3.4-9]"
        ),
    );
    let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    c.check(
        received == want,
        format!("all 10 messages in order once acknowledged: got {received:?}"),
    );

    // Client → server: the relay takes 5; CONNACK must say so (absent means 65535).
    let announced = ack.props.u16_of(prop::RECEIVE_MAXIMUM);
    c.check(
        announced == Some(5),
        format!(
            "max_inflight = 5 but CONNACK Receive Maximum is {announced:?} (absent means \
             65 535) [§3.2.2.3.3]"
        ),
    );
    let limit = announced.unwrap_or(5);
    let mut q = client(port, "rm-q2").await;
    for i in 0..limit {
        q.send(&encode_publish(
            "rm/q2",
            b"x",
            2,
            false,
            i + 1,
            &Props::new(),
        ))
        .await;
    }
    let mut recs = 0;
    while recs < limit {
        match q
            .wait_for(WAIT, |p| matches!(p, Pkt::Ack { kind: 5, .. }))
            .await
        {
            Some(Pkt::Ack { reason, .. }) if reason < 0x80 => recs += 1,
            _ => break,
        }
    }
    c.check(
        recs == limit,
        format!("{limit} unreleased QoS 2 publishes (at the limit): {recs} PUBRECs"),
    );
    q.send(&encode_publish(
        "rm/q2",
        b"x",
        2,
        false,
        limit + 1,
        &Props::new(),
    ))
    .await;
    let (closed, reason) = q.closed_within(WAIT).await;
    c.check(
        closed && reason == Some(0x93),
        format!(
            "publish {} over the Receive Maximum {limit}: closed {closed}, DISCONNECT \
             {reason:?} (want 0x93) [MQTT-3.3.4-8]",
            limit + 1
        ),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 14. Will Delay Interval (§3.1.3.2.2)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn will_delay_interval_delays_the_will_and_a_reconnect_cancels_it() {
    let relay = relay("v5-will-delay").await;
    let port = relay.port();
    let mut c = Checks::new("will delay");
    let mut watcher = subscriber(port, "wd-watch", &[("wd/#", 1)]).await;
    let with_will = |id: &str, topic: &str| {
        let mut will = Will::new(topic, b"gone");
        will.props = Props::new().u32(prop::WILL_DELAY, 2);
        Conn::new(id)
            .props(Props::new().u32(prop::SESSION_EXPIRY, 30))
            .will(will)
    };
    let (late, _) = Mqtt::connect(port, &with_will("wd-late", "wd/late")).await;
    let (back, _) = Mqtt::connect(port, &with_will("wd-back", "wd/back")).await;
    // Both break off without DISCONNECT.
    let start = Instant::now();
    drop(late);
    drop(back);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // wd-back resumes its session within the delay.
    let (back, _) = Mqtt::connect(
        port,
        &Conn::new("wd-back")
            .clean(false)
            .props(Props::new().u32(prop::SESSION_EXPIRY, 30)),
    )
    .await;

    let mut arrivals = Vec::new();
    while start.elapsed() < Duration::from_millis(4500) {
        let left = Duration::from_millis(4500).saturating_sub(start.elapsed());
        match watcher.next_publish(left).await {
            Some(m) => arrivals.push((m.topic.clone(), start.elapsed())),
            None => break,
        }
    }
    let late_at: Vec<Duration> = arrivals
        .iter()
        .filter(|(t, _)| t == "wd/late")
        .map(|(_, d)| *d)
        .collect();
    c.check(
        late_at.len() == 1 && late_at[0] >= Duration::from_millis(1500),
        format!(
            "will with delay 2 s: sent at {late_at:?} after the connection broke (want once, \
             not before ~2 s, by 4.5 s)"
        ),
    );
    c.check(
        !arrivals.iter().any(|(t, _)| t == "wd/back"),
        format!(
            "reconnected within the delay: its will must not be sent [§3.1.3.2.2], got \
             {arrivals:?}"
        ),
    );
    back.disconnect().await;
    let after = watcher.publishes_for(QUIET).await;
    c.check(
        after.is_empty(),
        format!(
            "after the resumed session's normal DISCONNECT: got {:?}",
            after.iter().map(|m| &m.topic).collect::<Vec<_>>()
        ),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 15. Shared subscriptions (§4.8.2)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn shared_subscription_gives_each_message_to_one_member() {
    let relay = relay("v5-shared").await;
    let port = relay.port();
    let mut c = Checks::new("shared subscriptions");
    let mut m1 = subscriber(port, "sh-m1", &[("$share/g/sh/#", 1)]).await;
    let mut m2 = subscriber(port, "sh-m2", &[("$share/g/sh/#", 1)]).await;
    let mut all = subscriber(port, "sh-all", &[("sh/#", 1)]).await;
    let mut p = client(port, "sh-pub").await;
    let n = 20;
    for i in 0..n {
        p.publish_ok(&format!("sh/{}", i % 3), i.to_string().as_bytes(), 1, false)
            .await;
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let (mut got1, mut got2) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + WAIT;
    while got1.len() + got2.len() < n && Instant::now() < deadline {
        got1.extend(m1.publishes_for(Duration::from_millis(150)).await);
        got2.extend(m2.publishes_for(Duration::from_millis(150)).await);
    }
    got1.extend(m1.publishes_for(Duration::from_millis(300)).await);
    got2.extend(m2.publishes_for(Duration::from_millis(300)).await);
    for m in got1.iter().chain(&got2) {
        *counts.entry(m.text()).or_default() += 1;
    }
    let missing: Vec<usize> = (0..n)
        .filter(|i| !counts.contains_key(&i.to_string()))
        .collect();
    let twice: Vec<&String> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(k, _)| k)
        .collect();
    c.check(
        missing.is_empty() && twice.is_empty(),
        format!(
            "each message to exactly one group member [§4.8.2]: missing {missing:?}, more than \
             once {twice:?} (m1 {}, m2 {})",
            got1.len(),
            got2.len()
        ),
    );
    eprintln!("shared group split: m1 {}, m2 {}", got1.len(), got2.len());
    let plain = all.collect(n, WAIT).await;
    c.check(
        plain.len() == n,
        format!("the non-shared subscriber got {} of {n}", plain.len()),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 16. Request / response (§4.10)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn response_topic_and_correlation_data_pass_through() {
    let relay = relay("v5-req-resp").await;
    let port = relay.port();
    let mut c = Checks::new("request/response");
    let mut responder = subscriber(port, "rr-responder", &[("rr/req/#", 1)]).await;
    let mut requester = subscriber(port, "rr-requester", &[("rr/resp/requester", 1)]).await;
    let corr: &[u8] = &[0x00, 0xff, 0x10, b'c'];
    requester
        .publish_props(
            "rr/req/time",
            b"what time is it",
            1,
            false,
            Props::new()
                .str(prop::RESPONSE_TOPIC, "rr/resp/requester")
                .bin(prop::CORRELATION_DATA, corr),
        )
        .await;
    let Some(req) = responder.next_publish(WAIT).await else {
        panic!("request not delivered");
    };
    let rt = req.props.str_of(prop::RESPONSE_TOPIC);
    let cd = req.props.bin_of(prop::CORRELATION_DATA);
    c.check(
        rt.as_deref() == Some("rr/resp/requester"),
        format!("Response Topic {rt:?} [MQTT-3.3.2-15]"),
    );
    c.check(
        cd.as_deref() == Some(corr),
        format!("Correlation Data {cd:?} [MQTT-3.3.2-16]"),
    );
    // The response, from rumqttc's MQTT 5 client, echoes the correlation data.
    rumqttc_publish(
        port,
        "rr-rumqttc",
        rt.as_deref().unwrap_or("rr/resp/requester"),
        b"noon",
        rumqttc::v5::mqttbytes::v5::PublishProperties {
            correlation_data: Some(bytes::Bytes::copy_from_slice(corr)),
            ..Default::default()
        },
    )
    .await;
    match requester.next_publish(WAIT).await {
        Some(resp) => {
            c.check(
                resp.text() == "noon"
                    && resp.props.bin_of(prop::CORRELATION_DATA).as_deref() == Some(corr),
                format!(
                    "response {:?} with Correlation Data {:?}",
                    resp.text(),
                    resp.props.bin_of(prop::CORRELATION_DATA)
                ),
            );
        }
        None => {
            c.check(false, "response not delivered");
        }
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 17. Assigned Client Identifier (§3.1.3.1, §3.2.2.3.7)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn empty_client_id_gets_an_assigned_client_identifier() {
    let relay = relay("v5-assigned-id").await;
    let port = relay.port();
    let mut c = Checks::new("assigned client identifier");
    let mut ids = Vec::new();
    for clean in [true, false] {
        let conn = Conn::new("")
            .clean(clean)
            .props(Props::new().u32(prop::SESSION_EXPIRY, 10));
        let (m, ack) = Mqtt::try_connect(port, &conn).await;
        match ack {
            Some(ack) if ack.reason == 0 => {
                let id = ack.props.str_of(prop::ASSIGNED_CLIENT_ID);
                c.check(
                    id.as_ref().is_some_and(|s| !s.is_empty()),
                    format!(
                        "empty client id, clean start {clean}: CONNACK Assigned Client \
                         Identifier {id:?} [MQTT-3.2.2-16]"
                    ),
                );
                ids.extend(id);
                m.disconnect().await;
            }
            other => {
                c.check(
                    false,
                    format!(
                        "empty client id, clean start {clean}: must be accepted with an \
                         assigned id [MQTT-3.1.3-6/7], got CONNACK {:?} (closed {})",
                        other.map(|a| a.reason),
                        m.closed
                    ),
                );
            }
        }
    }
    c.check(
        ids.len() < 2 || ids[0] != ids[1],
        format!("two clients were assigned the same id {ids:?}"),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 18. Reason codes on refusals (§3.2.2.2, §3.4.2.1, §3.5.2.1, §3.9.3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn refusals_carry_the_right_reason_codes() {
    let cfg = RelayConfig::new("v5-refusals").no_anonymous();
    let acl = "\n[[acl]]\nuser = \"alice\"\npublish = [\"ok/#\"]\nsubscribe = [\"ok/#\"]\n";
    let mut relay = Relay::create(cfg, acl);
    add_user(&relay.config_path, "alice", "alice-pw");
    relay.restart().await;
    let port = relay.port();
    let mut c = Checks::new("reason codes");
    let mut reason_strings = Vec::new();

    // Logins [MQTT-3.2.2-7: CONNACK with reason ≥ 0x80, then close].
    // (what, user, password, acceptable CONNACK codes)
    type LoginCase<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);
    let cases: [LoginCase; 3] = [
        ("wrong password", Some("alice"), Some("nope"), &[0x86]),
        ("unknown user", Some("mallory"), Some("x"), &[0x86]),
        ("no credentials", None, None, &[0x86, 0x87]),
    ];
    for (what, user, pass, want) in cases {
        let conn = Conn::new(&format!("rc-{}", what.replace(' ', "-"))).login(user, pass);
        let (mut m, ack) = Mqtt::try_connect(port, &conn).await;
        match ack {
            Some(ack) => {
                c.check(
                    want.contains(&ack.reason),
                    format!(
                        "{what}: CONNACK 0x{:02x}, want one of {want:02x?}",
                        ack.reason
                    ),
                );
                if let Some(s) = ack.props.str_of(prop::REASON_STRING) {
                    reason_strings.push(format!("CONNACK {what}: {s}"));
                }
                let (closed, _) = m.closed_within(WAIT).await;
                c.check(
                    closed,
                    format!("{what}: connection not closed after refusal"),
                );
            }
            None => {
                c.check(false, format!("{what}: no CONNACK (closed {})", m.closed));
            }
        }
    }

    let (mut a, _) = Mqtt::connect(
        port,
        &Conn::new("rc-alice").login(Some("alice"), Some("alice-pw")),
    )
    .await;
    // Denied publishes: PUBACK / PUBREC 0x87.
    for qos in [1u8, 2] {
        let pkid = a.pkid();
        a.send(&encode_publish(
            "secret/x",
            b"no",
            qos,
            false,
            pkid,
            &Props::new(),
        ))
        .await;
        let kind = if qos == 1 { 4 } else { 5 };
        match a
            .wait_for(
                WAIT,
                |p| matches!(p, Pkt::Ack { kind: k, pkid: id, .. } if *k == kind && *id == pkid),
            )
            .await
        {
            Some(Pkt::Ack { reason, props, .. }) => {
                c.check(
                    reason == 0x87,
                    format!("denied QoS {qos} publish: reason 0x{reason:02x}, want 0x87"),
                );
                if let Some(s) = props.str_of(prop::REASON_STRING) {
                    reason_strings.push(format!("QoS {qos} publish: {s}"));
                }
            }
            other => {
                c.check(
                    false,
                    format!("denied QoS {qos} publish: no acknowledgement ({other:?})"),
                );
            }
        }
    }
    let r = a.publish("ok/x", b"yes", 1, false, Props::new()).await;
    c.check(
        matches!(r, Some(0x00 | 0x10)),
        format!("allowed publish: {r:?}"),
    );
    // Denied subscriptions: 0x87 in place, the allowed one granted.
    let codes = a
        .subscribe_with(&[("ok/#", 1), ("secret/#", 1)], Props::new())
        .await;
    c.check(
        codes == [0x01, 0x87],
        format!("SUBACK for [ok/# allowed, secret/# denied]: {codes:02x?}, want [01, 87]"),
    );
    let codes = a.subscribe_with(&[("secret/#", 0)], Props::new()).await;
    c.check(
        codes == [0x87],
        format!("SUBACK for [secret/# denied]: {codes:02x?}, want [87]"),
    );
    let (closed, _) = a.closed_within(Duration::from_millis(300)).await;
    c.check(!closed, "the connection must stay up after denials");
    // The relay says why, too [MQTT-3.2.2.3.16, 3.4.2.2.2, 3.5.2.2.2]: three refused logins and
    // two refused publishes.
    c.check(
        reason_strings.len() == 5,
        format!("reason strings on every refusal, got {reason_strings:?}"),
    );
    c.finish();
}

#[tokio::test]
async fn zero_limits_in_a_connect_are_refused_as_protocol_errors() {
    let relay = relay("v5-zero-limits").await;
    let port = relay.port();
    let mut c = Checks::new("zero limits");
    // [MQTT-3.1.2.11.3] Receive Maximum 0 and [MQTT-3.1.2.11.4] Maximum Packet Size 0 are
    // protocol errors: CONNACK 0x82, then the connection is closed.
    let cases = [
        (
            "Receive Maximum 0",
            Props::new().u16(prop::RECEIVE_MAXIMUM, 0),
        ),
        (
            "Maximum Packet Size 0",
            Props::new().u32(prop::MAXIMUM_PACKET_SIZE, 0),
        ),
    ];
    for (what, props) in cases {
        let conn = Conn::new(&format!("zero-{}", what.len())).props(props);
        let (mut m, ack) = Mqtt::try_connect(port, &conn).await;
        match ack {
            Some(ack) => {
                c.check(
                    ack.reason == 0x82,
                    format!("{what}: CONNACK 0x{:02x}, want 0x82", ack.reason),
                );
                let reason = ack.props.str_of(prop::REASON_STRING).unwrap_or_default();
                c.check(
                    reason.contains(what.trim_end_matches(" 0")),
                    format!("{what}: reason string {reason:?} does not name it"),
                );
                let (closed, _) = m.closed_within(WAIT).await;
                c.check(closed, format!("{what}: connection not closed"));
            }
            None => {
                c.check(false, format!("{what}: no CONNACK (closed {})", m.closed));
            }
        }
    }
    // Limits of 1 are legal, and the relay still serves.
    let ok = Conn::new("zero-ok").props(
        Props::new()
            .u16(prop::RECEIVE_MAXIMUM, 1)
            .u32(prop::MAXIMUM_PACKET_SIZE, 1024),
    );
    let (_m, ack) = Mqtt::try_connect(port, &ok).await;
    c.check(
        ack.as_ref().is_some_and(|a| a.reason == 0x00),
        format!(
            "limits of 1 and 1024: CONNACK {:02x?}, want 0x00",
            ack.map(|a| a.reason)
        ),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 19. QoS 0/1/2 and the delivered QoS (§4.3, §3.8.4)
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.8.4-8]: a message is delivered at the minimum of the QoS it was published with and
/// the maximum QoS granted to the subscription, for every pair of the two; one delivery each.
#[tokio::test]
async fn delivered_qos_is_the_minimum_of_published_and_granted_qos() {
    let relay = relay("v5-qos-min").await;
    let port = relay.port();
    let mut c = Checks::new("delivered QoS");
    let mut s = client(port, "qm-sub").await;
    for granted in 0u8..=2 {
        s.subscribe(&[(format!("qm/s{granted}").as_str(), granted)])
            .await;
    }
    let mut p = client(port, "qm-pub").await;
    for published in 0u8..=2 {
        for granted in 0u8..=2 {
            let payload = format!("p{published}s{granted}");
            p.publish_ok(
                &format!("qm/s{granted}"),
                payload.as_bytes(),
                published,
                false,
            )
            .await;
            let want = published.min(granted);
            match s.next_publish(WAIT).await {
                Some(m) => {
                    c.check(
                        m.text() == payload && m.qos == want,
                        format!(
                            "published at QoS {published} to a QoS {granted} subscription: \
                             got {:?} at QoS {}, want QoS {want} [MQTT-3.8.4-8]",
                            m.text(),
                            m.qos
                        ),
                    );
                }
                None => {
                    c.check(false, format!("{payload}: not delivered"));
                }
            }
        }
    }
    let more = s.publishes_for(QUIET).await;
    c.check(
        more.is_empty(),
        format!("one delivery per publish, more came: {:?}", texts(&more)),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 20. Retained messages (§3.3.1.3)
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.3.1-8]: a PUBLISH with RETAIN 0 neither stores, removes nor replaces the retained
/// message — an empty one included (only an empty *retained* publish clears it). Current
/// subscribers get the empty publishes.
#[tokio::test]
async fn an_empty_non_retained_publish_leaves_the_retained_message_alone() {
    let relay = relay("v5-empty-nonretained").await;
    let port = relay.port();
    let mut c = Checks::new("empty non-retained publish");
    let mut live = subscriber(port, "ek-live", &[("ek/t", 1)]).await;
    let mut p = client(port, "ek-pub").await;
    p.publish_ok("ek/t", b"keep", 1, true).await;
    p.publish_ok("ek/t", b"", 1, false).await;
    p.publish_ok("ek/t", b"", 0, false).await;
    let got = live.collect(3, WAIT).await;
    c.check(
        texts(&got) == ["keep", "", ""],
        format!(
            "the live subscriber gets every publish, the empty ones too: {:?}",
            texts(&got)
        ),
    );
    let mut new = subscriber(port, "ek-new", &[("ek/t", 1)]).await;
    let got = new.collect(1, WAIT).await;
    let seen: Vec<(String, bool)> = got.iter().map(|m| (m.text(), m.retain)).collect();
    c.check(
        seen == [("keep".to_owned(), true)],
        format!(
            "after empty non-retained publishes a new subscriber still gets the retained \
             message [MQTT-3.3.1-8], got {seen:?}"
        ),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 21. Will message (§3.1.2.5, §3.14.2.1)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn will_is_sent_on_abnormal_disconnect_only() {
    let relay = relay("v5-will").await;
    let port = relay.port();
    let mut c = Checks::new("will");
    let mut watcher = subscriber(port, "will-watch", &[("will/#", 1)]).await;
    let mut will = Will::new("will/a", b"a died");
    will.props = Props::new().pair("why", "test");
    let (broken, _) = Mqtt::connect(port, &Conn::new("will-a").will(will)).await;
    let (polite, _) = Mqtt::connect(
        port,
        &Conn::new("will-b").will(Will::new("will/b", b"b died")),
    )
    .await;
    polite.disconnect().await;
    drop(broken);
    let got = watcher.collect(1, WAIT).await;
    let seen: Vec<(String, String)> = got.iter().map(|m| (m.topic.clone(), m.text())).collect();
    c.check(
        seen.iter().any(|(t, p)| t == "will/a" && p == "a died"),
        format!(
            "connection broken without DISCONNECT: will must be sent [MQTT-3.1.2-8], got {seen:?}"
        ),
    );
    c.check(
        !seen.iter().any(|(t, _)| t == "will/b"),
        format!("normal DISCONNECT (0x00): will must not be sent [MQTT-3.1.2-10], got {seen:?}"),
    );
    if let Some(m) = got.iter().find(|m| m.topic == "will/a") {
        c.check(
            m.props.user_props() == [("why".to_owned(), "test".to_owned())],
            format!("will properties: {:?}", m.props.user_props()),
        );
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// 22. Topics beginning with `$` (§4.7.2)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dollar_topics_are_not_matched_by_wildcards_at_the_first_level() {
    let relay = relay("v5-dollar").await;
    let port = relay.port();
    let mut c = Checks::new("$ topics");
    let mut hash = subscriber(port, "dl-hash", &[("#", 1)]).await;
    let mut plus = subscriber(port, "dl-plus", &[("+/x", 1), ("+/+/y", 1)]).await;
    let mut p = client(port, "dl-pub").await;
    p.publish_ok("$dl/x", b"dollar", 1, false).await;
    p.publish_ok("$dl/z/y", b"dollar2", 1, false).await;
    // Published after: once it arrived, the $ ones would have too.
    p.publish_ok("dl/x", b"normal", 1, false).await;
    for (name, s) in [("#", &mut hash), ("+/x, +/+/y", &mut plus)] {
        let got = s.collect(1, WAIT).await;
        let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
        c.check(
            topics == ["dl/x"],
            format!("subscription {name}: got {topics:?}, want only dl/x [MQTT-4.7.2-1]"),
        );
    }
    c.finish();
}

/// [MQTT-3.3.1-5/6/10]: a retained message is set, replaced, and cleared by an empty retained
/// publish, which current subscribers still receive. (An empty non-retained publish leaves the
/// retained message alone: `an_empty_non_retained_publish_leaves_the_retained_message_alone`.)
#[tokio::test]
async fn retained_message_set_replace_and_clear() {
    let relay = relay("v5-retained").await;
    let port = relay.port();
    let mut c = Checks::new("retained");
    let mut p = client(port, "ret-pub").await;
    let summary = |ps: &[Publish]| -> Vec<(String, bool)> {
        ps.iter().map(|m| (m.text(), m.retain)).collect()
    };

    p.publish_ok("ret/t", b"v1", 1, true).await;
    let mut live = subscriber(port, "ret-1", &[("ret/t", 1)]).await;
    let got = live.collect(1, WAIT).await;
    c.check(
        summary(&got) == [("v1".to_owned(), true)],
        format!("set: new subscriber got {:?}", summary(&got)),
    );

    p.publish_ok("ret/t", b"v2", 1, true).await;
    let mut s = subscriber(port, "ret-2", &[("ret/t", 1)]).await;
    let got = s.collect(1, WAIT).await;
    c.check(
        summary(&got) == [("v2".to_owned(), true)],
        format!("replace: new subscriber got {:?}", summary(&got)),
    );

    // An empty retained publish clears it, and is delivered to current subscribers.
    p.publish_ok("ret/t", b"", 1, true).await;
    let mut s = subscriber(port, "ret-4", &[("ret/t", 1)]).await;
    let got = s.publishes_for(QUIET).await;
    c.check(
        got.is_empty(),
        format!(
            "after an empty retained publish, nothing is retained [MQTT-3.3.1-6], got {:?}",
            summary(&got)
        ),
    );
    let got = live.collect(2, WAIT).await;
    let payloads = texts(&got);
    c.check(
        payloads == ["v2", ""],
        format!("the live subscriber gets every publish, the empty one too: {payloads:?}"),
    );
    c.finish();
}

/// §4.3: each QoS flow completes, publisher to subscriber, at the QoS both asked for. (Other
/// pairs: `delivered_qos_is_the_minimum_of_published_and_granted_qos`.)
#[tokio::test]
async fn qos_0_1_2_flows_complete() {
    let relay = relay("v5-qos").await;
    let port = relay.port();
    let mut c = Checks::new("QoS");
    for qos in 0u8..=2 {
        let topic = format!("qos/{qos}");
        let mut s = subscriber(port, &format!("qos-sub{qos}"), &[(topic.as_str(), qos)]).await;
        let mut p = client(port, &format!("qos-pub{qos}")).await;
        let r = p
            .publish(
                &topic,
                format!("p{qos}").as_bytes(),
                qos,
                false,
                Props::new(),
            )
            .await;
        c.check(
            matches!(r, Some(0x00 | 0x10)),
            format!("publish QoS {qos}: flow did not complete ({r:?})"),
        );
        let got = s.collect(1, WAIT).await;
        let seen: Vec<(String, u8)> = got.iter().map(|m| (m.text(), m.qos)).collect();
        c.check(
            seen == [(format!("p{qos}"), qos)],
            format!("QoS {qos}: (payload, delivered QoS) {seen:?}"),
        );
        for m in &got {
            c.check(
                (m.qos == 0) == (m.pkid == 0),
                format!("QoS {} delivery with packet id {}", m.qos, m.pkid),
            );
        }
    }
    c.finish();
}

/// A CONNECT naming an Authentication Method the relay does not offer (it offers no enhanced
/// authentication) gets CONNACK 0x8C "bad authentication method" with a reason string, and the
/// connection is closed [MQTT-3.1.2.11.9, 4.12]; the relay goes on serving.
#[tokio::test]
async fn an_authentication_method_the_relay_does_not_offer_is_refused_with_0x8c() {
    let relay = relay("v5-auth-method").await;
    let port = relay.port();
    let mut c = Checks::new("authentication method");
    let conn = Conn::new("auth-method").props(Props::new().str(0x15, "SCRAM-SHA-256"));
    let (mut m, ack) = Mqtt::try_connect(port, &conn).await;
    match ack {
        Some(ack) => {
            c.check(
                ack.reason == 0x8c,
                format!("CONNACK 0x{:02x}, want 0x8c", ack.reason),
            );
            c.check(
                ack.props.str_of(prop::REASON_STRING).is_some(),
                "no reason string",
            );
            let (closed, _) = m.closed_within(WAIT).await;
            c.check(closed, "connection not closed");
        }
        None => {
            c.check(false, format!("no CONNACK (closed {})", m.closed));
        }
    }
    let (_m, ack) = Mqtt::try_connect(port, &Conn::new("auth-method-after")).await;
    c.check(
        ack.is_some_and(|a| a.reason == 0),
        "a plain CONNECT afterwards is not accepted",
    );
    c.finish();
}
