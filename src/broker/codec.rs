//! MQTT on the wire: framing, decoding of what clients send, encoding of what the broker sends.
//!
//! Decoding is mqtt-proto's (a strict codec for 3.1.1 and 5; docs/ARCHITECTURE.md says why
//! that crate): each whole frame is handed to it and the result turned into [`Inbound`], the
//! broker's own view of a client packet. Two things are done here rather than there: framing
//! (so that the limit on packet size is checked from the fixed header, before a byte of the body
//! is buffered), and a SUBSCRIBE that holds an invalid filter, which the crate refuses as a
//! whole while the specifications want a failure code for that filter alone.
//!
//! Encoding is written out here: the broker's packets are few and fixed in layout, and a
//! PUBLISH to a subscriber may carry several Subscription Identifiers, which the crate's
//! encoder cannot.
//!
//! Nothing here panics on input; every refusal names what was wrong.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use mqtt_proto::{v3, v5, Error as ProtoError, QosPid};

use super::message::{Message, Properties};
use super::tree::SubOptions;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (and 3.1).
    V4,
    /// MQTT 5.0.
    V5,
}

/// Why a client's packet is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("packet of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("the first packet is not a CONNECT")]
    NotConnect,
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedLevel(u8),
    /// A well-formed packet that breaks a rule of the protocol (MQTT 5 reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A CONNECT whose will topic is no topic name (a wildcard).
    #[error("will topic {0:?} is no topic name")]
    WillTopic(String),
}

impl CodecError {
    /// The MQTT 5 reason code of a DISCONNECT for this error.
    pub fn reason(&self) -> u8 {
        match self {
            CodecError::TooLarge(_) => 0x95,
            CodecError::Protocol(_) | CodecError::NotConnect => 0x82,
            CodecError::WillTopic(_) => 0x90,
            CodecError::UnsupportedLevel(_) => 0x84,
            CodecError::Malformed(_) => 0x81,
        }
    }
}

fn malformed(e: impl std::fmt::Display) -> CodecError {
    CodecError::Malformed(e.to_string())
}

/// What a fixed header says about the next packet in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The packet type (1 = CONNECT … 15 = AUTH).
    pub kind: u8,
    /// The low nibble of the first byte.
    pub flags: u8,
    /// Length of the whole packet.
    pub len: usize,
}

/// Frames the next packet in `buf`: `Ok(None)` when more bytes are needed.
pub fn frame(buf: &[u8], max_packet_size: usize) -> Result<Option<Frame>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let len = 2 + i + remaining;
            if len > max_packet_size {
                return Err(CodecError::TooLarge(len));
            }
            if buf.len() < len {
                return Ok(None);
            }
            return Ok(Some(Frame {
                kind: first >> 4,
                flags: first & 0x0f,
                len,
            }));
        }
    }
    Err(malformed("remaining length longer than four bytes"))
}

/// A client's CONNECT, whatever its version.
#[derive(Debug, Clone)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean_start: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// MQTT 5 Session Expiry Interval (3.1.1: 0 with clean session, "never" without).
    pub session_expiry: u32,
    /// QoS 1/2 publishes the client takes unacknowledged (absent: 65,535).
    pub receive_maximum: u16,
    /// The largest packet the client takes (absent: no limit).
    pub maximum_packet_size: Option<u32>,
    /// Topic aliases the client takes from the server.
    pub topic_alias_maximum: u16,
    pub request_problem_info: bool,
    /// MQTT 5 AUTH exchange asked for (not supported: refused).
    pub auth_method: Option<String>,
}

/// A will message, as a CONNECT carries it.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub delay: u32,
    pub props: Properties,
}

/// A client's PUBLISH.
#[derive(Debug, Clone)]
pub struct Publish {
    /// As sent: empty when an MQTT 5 client names the topic by alias alone.
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: u8,
    pub pid: u16,
    pub retain: bool,
    pub dup: bool,
    pub topic_alias: Option<u16>,
    pub props: Properties,
}

/// One filter of a SUBSCRIBE, as sent (not checked yet).
#[derive(Debug, Clone)]
pub struct SubscribeFilter {
    pub filter: String,
    pub opts: SubOptions,
    /// The filter was refused by the codec (syntax).
    pub invalid: bool,
}

/// A client packet, decoded.
#[derive(Debug, Clone)]
pub enum Inbound {
    Publish(Publish),
    /// PUBACK, PUBREC, PUBREL, PUBCOMP: packet id and reason code (0 when absent).
    Puback(u16, u8),
    Pubrec(u16, u8),
    Pubrel(u16, u8),
    Pubcomp(u16, u8),
    Subscribe {
        pid: u16,
        filters: Vec<SubscribeFilter>,
    },
    Unsubscribe {
        pid: u16,
        filters: Vec<String>,
    },
    Pingreq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    /// A packet a client may not send here (CONNECT again, server packets, AUTH).
    Forbidden(u8),
}

/// Reads the protocol level of a CONNECT (the whole frame): which codec decodes it.
pub fn connect_version(packet: &[u8]) -> Result<Version, CodecError> {
    let f = frame(packet, usize::MAX)?.ok_or_else(|| malformed("truncated CONNECT"))?;
    if f.kind != 1 {
        return Err(CodecError::NotConnect);
    }
    // The fixed header is the type byte and 1 to 4 length bytes.
    let header_len = (2..=5)
        .find(|n| packet.get(n - 1).is_some_and(|b| b & 0x80 == 0))
        .unwrap_or(2);
    let body = packet.get(header_len..f.len).unwrap_or_default();
    let name_len = match body {
        [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
        _ => return Err(malformed("CONNECT without protocol name")),
    };
    let name = body
        .get(2..2 + name_len)
        .ok_or_else(|| malformed("CONNECT protocol name cut short"))?;
    let level = *body
        .get(2 + name_len)
        .ok_or_else(|| malformed("CONNECT without protocol level"))?;
    match (name, level) {
        (b"MQTT", 4) | (b"MQIsdp", 3) => Ok(Version::V4),
        (b"MQTT", 5) => Ok(Version::V5),
        (b"MQTT", l) | (b"MQIsdp", l) => Err(CodecError::UnsupportedLevel(l)),
        _ => Err(malformed("CONNECT protocol name is not MQTT")),
    }
}

fn string_of(b: &[u8]) -> Result<String, CodecError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| malformed("password is not UTF-8"))
}

/// A CONNECT's user name; an empty one counts as none.
fn user_name(name: Option<&str>) -> Option<String> {
    name.filter(|u| !u.is_empty()).map(str::to_owned)
}

/// A CONNECT's password, which relaybox checks as UTF-8 text; an empty one counts as none.
fn password(password: Option<&[u8]>) -> Result<Option<String>, CodecError> {
    Ok(password
        .map(string_of)
        .transpose()?
        .filter(|p| !p.is_empty()))
}

/// Decodes a client's CONNECT (the whole frame).
pub fn decode_connect(packet: &[u8]) -> Result<Connect, CodecError> {
    let version = connect_version(packet)?;
    match version {
        Version::V4 => match v3::Packet::decode(packet) {
            Ok(Some(v3::Packet::Connect(c))) => Ok(Connect {
                version,
                client_id: c.client_id.to_string(),
                keep_alive: c.keep_alive,
                clean_start: c.clean_session,
                username: user_name(c.username.as_deref()),
                password: password(c.password.as_deref())?,
                will: c.last_will.map(|w| Will {
                    topic: w.topic_name.to_string(),
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                    delay: 0,
                    props: Properties::default(),
                }),
                session_expiry: if c.clean_session { 0 } else { u32::MAX },
                receive_maximum: u16::MAX,
                maximum_packet_size: None,
                topic_alias_maximum: 0,
                request_problem_info: true,
                auth_method: None,
            }),
            Ok(_) => Err(CodecError::NotConnect),
            Err(ProtoError::InvalidTopicName(t)) => Err(CodecError::WillTopic(t.to_string())),
            Err(e) => Err(malformed(e)),
        },
        Version::V5 => match v5::Packet::decode(packet) {
            Ok(Some(v5::Packet::Connect(c))) => {
                let p = c.properties;
                if p.receive_max == Some(0) {
                    return Err(CodecError::Protocol("CONNECT with a Receive Maximum of 0"));
                }
                if p.max_packet_size == Some(0) {
                    return Err(CodecError::Protocol(
                        "CONNECT with a Maximum Packet Size of 0",
                    ));
                }
                Ok(Connect {
                    version,
                    client_id: c.client_id.to_string(),
                    keep_alive: c.keep_alive,
                    clean_start: c.clean_start,
                    username: user_name(c.username.as_deref()),
                    password: password(c.password.as_deref())?,
                    will: c.last_will.map(|w| Will {
                        topic: w.topic_name.to_string(),
                        payload: w.payload,
                        qos: w.qos as u8,
                        retain: w.retain,
                        delay: w.properties.delay_interval.unwrap_or(0),
                        props: Properties {
                            payload_is_utf8: w.properties.payload_is_utf8,
                            expiry: w.properties.message_expiry_interval,
                            content_type: w.properties.content_type,
                            response_topic: w.properties.response_topic.map(|t| Arc::from(&*t)),
                            correlation_data: w.properties.correlation_data,
                            user: w
                                .properties
                                .user_properties
                                .into_iter()
                                .map(|u| (u.name, u.value))
                                .collect(),
                        },
                    }),
                    session_expiry: p.session_expiry_interval.unwrap_or(0),
                    receive_maximum: p.receive_max.unwrap_or(u16::MAX),
                    maximum_packet_size: p.max_packet_size,
                    topic_alias_maximum: p.topic_alias_max.unwrap_or(0),
                    request_problem_info: p.request_problem_info.unwrap_or(true),
                    auth_method: p.auth_method.map(|m| m.to_string()),
                })
            }
            Ok(_) => Err(CodecError::NotConnect),
            Err(v5::ErrorV5::Common(ProtoError::InvalidTopicName(t))) => {
                Err(CodecError::WillTopic(t.to_string()))
            }
            Err(e) => Err(malformed(e)),
        },
    }
}

/// Decodes a client packet after CONNECT (the whole frame, as [`frame`] found it).
pub fn decode(version: Version, packet: &[u8]) -> Result<Inbound, CodecError> {
    let kind = packet.first().map_or(0, |b| b >> 4);
    let flags = packet.first().map_or(0, |b| b & 0x0f);
    match kind {
        // CONNECT again, and packets only a server sends, and AUTH (no extended
        // authentication here): protocol errors.
        0 | 1 | 2 | 9 | 11 | 13 | 15 => return Ok(Inbound::Forbidden(kind)),
        // SUBSCRIBE, UNSUBSCRIBE and PUBREL must carry the flags 0010 [MQTT-3.8.1-1,
        // 3.10.1-1, 3.6.1-1].
        6 | 8 | 10 if flags != 0b0010 => {
            return Err(malformed(format!(
                "packet type {kind} with reserved flags {flags:#06b}"
            )))
        }
        // PINGREQ has no body; nor has a 3.1.1 DISCONNECT.
        12 if packet.len() != 2 => return Err(malformed("PINGREQ with a body")),
        14 if version == Version::V4 && packet.len() != 2 => {
            return Err(malformed("DISCONNECT with a body"))
        }
        // A QoS 0 PUBLISH has DUP 0 [MQTT-3.3.1-2].
        3 if flags & 0b0110 == 0 && flags & 0b1000 != 0 => {
            return Err(malformed("QoS 0 PUBLISH with DUP set"))
        }
        _ => {}
    }
    match version {
        Version::V4 => decode_v4(packet),
        Version::V5 => decode_v5(packet),
    }
}

fn qos_pid(q: QosPid) -> (u8, u16) {
    match q {
        QosPid::Level0 => (0, 0),
        QosPid::Level1(p) => (1, p.value()),
        QosPid::Level2(p) => (2, p.value()),
    }
}

fn decode_v4(packet: &[u8]) -> Result<Inbound, CodecError> {
    let decoded = match v3::Packet::decode(packet) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(malformed("packet cut short")),
        Err(ProtoError::InvalidTopicFilter(_)) if packet.first() == Some(&0x82) => {
            return lenient_subscribe(Version::V4, packet)
        }
        Err(e) => return Err(malformed(e)),
    };
    Ok(match decoded {
        v3::Packet::Publish(p) => {
            let (qos, pid) = qos_pid(p.qos_pid);
            Inbound::Publish(Publish {
                topic: Arc::from(&*p.topic_name),
                payload: p.payload,
                qos,
                pid,
                retain: p.retain,
                dup: p.dup,
                topic_alias: None,
                props: Properties::default(),
            })
        }
        v3::Packet::Puback(p) => Inbound::Puback(p.value(), 0),
        v3::Packet::Pubrec(p) => Inbound::Pubrec(p.value(), 0),
        v3::Packet::Pubrel(p) => Inbound::Pubrel(p.value(), 0),
        v3::Packet::Pubcomp(p) => Inbound::Pubcomp(p.value(), 0),
        v3::Packet::Subscribe(s) => Inbound::Subscribe {
            pid: s.pid.value(),
            filters: s
                .topics
                .into_iter()
                .map(|(f, q)| SubscribeFilter {
                    filter: f.to_string(),
                    opts: SubOptions {
                        qos: q as u8,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: 0,
                        id: None,
                    },
                    invalid: false,
                })
                .collect(),
        },
        v3::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pid: u.pid.value(),
            filters: u.topics.into_iter().map(|f| f.to_string()).collect(),
        },
        v3::Packet::Pingreq => Inbound::Pingreq,
        v3::Packet::Disconnect => Inbound::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        other => Inbound::Forbidden(packet_kind_v3(&other)),
    })
}

fn packet_kind_v3(p: &v3::Packet) -> u8 {
    match p {
        v3::Packet::Connect(_) => 1,
        v3::Packet::Connack(_) => 2,
        v3::Packet::Suback(_) => 9,
        v3::Packet::Unsuback(_) => 11,
        v3::Packet::Pingresp => 13,
        _ => 0,
    }
}

fn decode_v5(packet: &[u8]) -> Result<Inbound, CodecError> {
    let decoded = match v5::Packet::decode(packet) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(malformed("packet cut short")),
        Err(v5::ErrorV5::Common(ProtoError::InvalidTopicFilter(_)))
            if packet.first() == Some(&0x82) =>
        {
            return lenient_subscribe(Version::V5, packet)
        }
        Err(e) => return Err(malformed(e)),
    };
    Ok(match decoded {
        v5::Packet::Publish(p) => {
            let (qos, pid) = qos_pid(p.qos_pid);
            let props = p.properties;
            if props.subscription_id.is_some() {
                return Err(CodecError::Protocol(
                    "PUBLISH from a client with a Subscription Identifier",
                ));
            }
            if props.topic_alias == Some(0) {
                return Err(CodecError::Protocol("PUBLISH with topic alias 0"));
            }
            Inbound::Publish(Publish {
                topic: Arc::from(&*p.topic_name),
                payload: p.payload,
                qos,
                pid,
                retain: p.retain,
                dup: p.dup,
                topic_alias: props.topic_alias,
                props: Properties {
                    payload_is_utf8: props.payload_is_utf8,
                    expiry: props.message_expiry_interval,
                    content_type: props.content_type,
                    response_topic: props.response_topic.map(|t| Arc::from(&*t)),
                    correlation_data: props.correlation_data,
                    user: props
                        .user_properties
                        .into_iter()
                        .map(|u| (u.name, u.value))
                        .collect(),
                },
            })
        }
        v5::Packet::Puback(p) => Inbound::Puback(p.pid.value(), p.reason_code as u8),
        v5::Packet::Pubrec(p) => Inbound::Pubrec(p.pid.value(), p.reason_code as u8),
        v5::Packet::Pubrel(p) => Inbound::Pubrel(p.pid.value(), p.reason_code as u8),
        v5::Packet::Pubcomp(p) => Inbound::Pubcomp(p.pid.value(), p.reason_code as u8),
        v5::Packet::Subscribe(s) => {
            let id = s.properties.subscription_id.map(|v| v.value());
            if id == Some(0) {
                return Err(CodecError::Protocol(
                    "SUBSCRIBE with Subscription Identifier 0",
                ));
            }
            Inbound::Subscribe {
                pid: s.pid.value(),
                filters: s
                    .topics
                    .into_iter()
                    .map(|(f, o)| SubscribeFilter {
                        filter: f.to_string(),
                        opts: SubOptions {
                            qos: o.max_qos as u8,
                            no_local: o.no_local,
                            retain_as_published: o.retain_as_published,
                            retain_handling: o.retain_handling as u8,
                            id,
                        },
                        invalid: false,
                    })
                    .collect(),
            }
        }
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pid: u.pid.value(),
            filters: u.topics.into_iter().map(|f| f.to_string()).collect(),
        },
        v5::Packet::Pingreq => Inbound::Pingreq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.session_expiry_interval,
        },
        v5::Packet::Connect(_) => Inbound::Forbidden(1),
        v5::Packet::Connack(_) => Inbound::Forbidden(2),
        v5::Packet::Suback(_) => Inbound::Forbidden(9),
        v5::Packet::Unsuback(_) => Inbound::Forbidden(11),
        v5::Packet::Pingresp => Inbound::Forbidden(13),
        v5::Packet::Auth(_) => Inbound::Forbidden(15),
    })
}

/// Reads a SUBSCRIBE that the codec refused for one of its filters: each filter with its
/// options, the refused ones marked, so that the SUBACK can refuse them one by one. Anything
/// else wrong with the packet is still an error.
fn lenient_subscribe(version: Version, packet: &[u8]) -> Result<Inbound, CodecError> {
    let header_len = (2..=5)
        .find(|n| packet.get(n - 1).is_some_and(|b| b & 0x80 == 0))
        .ok_or_else(|| malformed("SUBSCRIBE header"))?;
    let mut body = packet.get(header_len..).unwrap_or_default();
    let take = |body: &mut &[u8], n: usize| -> Result<Vec<u8>, CodecError> {
        if body.len() < n {
            return Err(malformed("SUBSCRIBE cut short"));
        }
        let (a, b) = body.split_at(n);
        *body = b;
        Ok(a.to_vec())
    };
    let pid_bytes = take(&mut body, 2)?;
    let pid = u16::from_be_bytes([pid_bytes[0], pid_bytes[1]]);
    let mut id = None;
    if version == Version::V5 {
        let (len, n) = read_varint(body).ok_or_else(|| malformed("SUBSCRIBE properties"))?;
        let props = take(&mut body, n + len)?;
        let mut props = &props[n..];
        while let Some((&key, rest)) = props.split_first() {
            props = rest;
            match key {
                0x0b => {
                    let (v, n) =
                        read_varint(props).ok_or_else(|| malformed("Subscription Identifier"))?;
                    id = Some(v as u32);
                    props = &props[n..];
                }
                0x26 => {
                    for _ in 0..2 {
                        let l = props
                            .get(..2)
                            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                            .ok_or_else(|| malformed("user property"))?;
                        props = props
                            .get(2 + l..)
                            .ok_or_else(|| malformed("user property"))?;
                    }
                }
                _ => return Err(malformed("SUBSCRIBE property")),
            }
        }
    }
    let mut filters = Vec::new();
    while !body.is_empty() {
        let len = take(&mut body, 2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let raw = take(&mut body, len)?;
        let filter = String::from_utf8(raw).map_err(|_| malformed("filter is not UTF-8"))?;
        let opts = take(&mut body, 1)?[0];
        let qos = opts & 0b11;
        // QoS 3, Retain Handling 3 and the reserved bits are malformed [MQTT-3.8.3-5].
        if qos == 3
            || (version == Version::V4 && opts & 0xfc != 0)
            || opts & 0xc0 != 0
            || (opts >> 4) & 0b11 == 3
        {
            return Err(malformed("SUBSCRIBE options"));
        }
        let invalid = super::topic::Filter::parse(&filter).is_err();
        filters.push(SubscribeFilter {
            filter,
            opts: SubOptions {
                qos,
                no_local: version == Version::V5 && opts & 0x04 != 0,
                retain_as_published: version == Version::V5 && opts & 0x08 != 0,
                retain_handling: if version == Version::V5 {
                    (opts >> 4) & 0b11
                } else {
                    0
                },
                id,
            },
            invalid,
        });
    }
    if filters.is_empty() {
        return Err(malformed("SUBSCRIBE without filters"));
    }
    Ok(Inbound::Subscribe { pid, filters })
}

fn read_varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in buf.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    // Strings here come from decoded packets or the broker's own, all ≤ 65,535 bytes.
    let n = s.len().min(usize::from(u16::MAX));
    out.put_u16(n as u16);
    out.put_slice(&s[..n]);
}

/// A packet of `kind` with `body` behind its fixed header.
fn packet(first: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(first);
    put_varint(&mut out, body.len());
    out.put_slice(body);
    out.freeze()
}

/// MQTT 5 properties the broker sends in its own packets.
#[derive(Debug, Default, Clone)]
pub struct ServerProps<'a> {
    pub reason: Option<&'a str>,
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_id: Option<&'a str>,
    pub topic_alias_maximum: Option<u16>,
    pub wildcards: Option<bool>,
    pub subscription_ids: Option<bool>,
    pub shared: Option<bool>,
    pub server_keep_alive: Option<u16>,
}

impl ServerProps<'_> {
    fn encode(&self, out: &mut BytesMut) {
        let mut p = BytesMut::new();
        if let Some(v) = self.session_expiry {
            p.put_u8(0x11);
            p.put_u32(v);
        }
        if let Some(v) = self.assigned_client_id {
            p.put_u8(0x12);
            put_str(&mut p, v.as_bytes());
        }
        if let Some(v) = self.server_keep_alive {
            p.put_u8(0x13);
            p.put_u16(v);
        }
        if let Some(v) = self.receive_maximum {
            p.put_u8(0x21);
            p.put_u16(v);
        }
        if let Some(v) = self.topic_alias_maximum {
            p.put_u8(0x22);
            p.put_u16(v);
        }
        if let Some(v) = self.maximum_qos {
            p.put_u8(0x24);
            p.put_u8(v);
        }
        if let Some(v) = self.retain_available {
            p.put_u8(0x25);
            p.put_u8(u8::from(v));
        }
        if let Some(v) = self.maximum_packet_size {
            p.put_u8(0x27);
            p.put_u32(v);
        }
        if let Some(v) = self.wildcards {
            p.put_u8(0x28);
            p.put_u8(u8::from(v));
        }
        if let Some(v) = self.subscription_ids {
            p.put_u8(0x29);
            p.put_u8(u8::from(v));
        }
        if let Some(v) = self.shared {
            p.put_u8(0x2a);
            p.put_u8(u8::from(v));
        }
        if let Some(v) = self.reason {
            // At most 200 bytes, cut at a character boundary: a reason string is UTF-8.
            let mut end = v.len().min(200);
            while !v.is_char_boundary(end) {
                end -= 1;
            }
            p.put_u8(0x1f);
            put_str(&mut p, &v.as_bytes()[..end]);
        }
        put_varint(out, p.len());
        out.put_slice(&p);
    }
}

/// CONNACK. For 3.1.1, `code` is the 3.1.1 return code.
pub fn connack(version: Version, session_present: bool, code: u8, props: &ServerProps) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u8(u8::from(session_present));
    body.put_u8(code);
    if version == Version::V5 {
        props.encode(&mut body);
    }
    packet(0x20, &body)
}

/// PUBACK (4), PUBREC (5), PUBREL (6) or PUBCOMP (7).
pub fn ack(version: Version, kind: u8, pid: u16, reason: u8, reason_string: Option<&str>) -> Bytes {
    let first = (kind << 4) | if kind == 6 { 0b0010 } else { 0 };
    let mut body = BytesMut::with_capacity(4);
    body.put_u16(pid);
    if version == Version::V5 && (reason != 0 || reason_string.is_some()) {
        body.put_u8(reason);
        match reason_string {
            Some(r) => ServerProps {
                reason: Some(r),
                ..Default::default()
            }
            .encode(&mut body),
            None => body.put_u8(0),
        }
    }
    packet(first, &body)
}

/// SUBACK with one code per filter (3.1.1: 0, 1, 2 or 0x80).
pub fn suback(version: Version, pid: u16, codes: &[u8], reason: Option<&str>) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u16(pid);
    if version == Version::V5 {
        ServerProps {
            reason,
            ..Default::default()
        }
        .encode(&mut body);
    }
    for &c in codes {
        body.put_u8(if version == Version::V4 && c >= 0x80 {
            0x80
        } else {
            c
        });
    }
    packet(0x90, &body)
}

/// UNSUBACK (MQTT 5: one code per filter, 0 or 0x11 "no subscription existed").
pub fn unsuback(version: Version, pid: u16, codes: &[u8]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u16(pid);
    if version == Version::V5 {
        body.put_u8(0);
        body.put_slice(codes);
    }
    packet(0xb0, &body)
}

pub fn pingresp() -> Bytes {
    Bytes::from_static(&[0xd0, 0x00])
}

/// An MQTT 5 DISCONNECT from the server with `reason` (3.1.1 has none: `None`).
pub fn disconnect(version: Version, reason: u8, reason_string: Option<&str>) -> Option<Bytes> {
    match version {
        Version::V4 => None,
        Version::V5 => {
            let mut body = BytesMut::new();
            body.put_u8(reason);
            ServerProps {
                reason: reason_string,
                ..Default::default()
            }
            .encode(&mut body);
            Some(packet(0xe0, &body))
        }
    }
}

/// How a PUBLISH to a subscriber is to be written.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub qos: u8,
    pub pid: u16,
    pub retain: bool,
    pub dup: bool,
    pub sub_ids: &'a [u32],
    /// Topic alias: (alias, whether the topic is sent along, the first time).
    pub alias: Option<(u16, bool)>,
    /// Remaining message expiry, seconds.
    pub expiry: Option<u32>,
}

/// The size of the PUBLISH [`encode_publish`] would write.
pub fn publish_len(version: Version, msg: &Message, out: &Outgoing) -> usize {
    let body = publish_body_len(version, msg, out);
    1 + varint_len(body) + body
}

fn props_len(msg: &Message, out: &Outgoing) -> usize {
    let p = &msg.props;
    let mut n = 0;
    if p.payload_is_utf8.is_some() {
        n += 2;
    }
    if out.expiry.is_some() {
        n += 5;
    }
    if let Some(c) = &p.content_type {
        n += 3 + c.len();
    }
    if let Some(t) = &p.response_topic {
        n += 3 + t.len();
    }
    if let Some(c) = &p.correlation_data {
        n += 3 + c.len();
    }
    for &id in out.sub_ids {
        n += 1 + varint_len(id as usize);
    }
    if out.alias.is_some() {
        n += 3;
    }
    for (k, v) in &p.user {
        n += 5 + k.len() + v.len();
    }
    n
}

fn publish_body_len(version: Version, msg: &Message, out: &Outgoing) -> usize {
    let topic = match out.alias {
        Some((_, false)) => 0,
        _ => msg.topic.len(),
    };
    let mut n = 2 + topic + msg.payload.len();
    if out.qos > 0 {
        n += 2;
    }
    if version == Version::V5 {
        let p = props_len(msg, out);
        n += varint_len(p) + p;
    }
    n
}

/// Writes a PUBLISH of `msg` to a subscriber.
pub fn encode_publish(version: Version, msg: &Message, o: &Outgoing, out: &mut BytesMut) {
    let first = 0x30 | (u8::from(o.dup) << 3) | (o.qos << 1) | u8::from(o.retain);
    let body = publish_body_len(version, msg, o);
    out.reserve(body + 5);
    out.put_u8(first);
    put_varint(out, body);
    match o.alias {
        Some((_, false)) => out.put_u16(0),
        _ => put_str(out, msg.topic.as_bytes()),
    }
    if o.qos > 0 {
        out.put_u16(o.pid);
    }
    if version == Version::V5 {
        let p = &msg.props;
        put_varint(out, props_len(msg, o));
        if let Some(v) = p.payload_is_utf8 {
            out.put_u8(0x01);
            out.put_u8(u8::from(v));
        }
        if let Some(v) = o.expiry {
            out.put_u8(0x02);
            out.put_u32(v);
        }
        if let Some(v) = &p.content_type {
            out.put_u8(0x03);
            put_str(out, v.as_bytes());
        }
        if let Some(v) = &p.response_topic {
            out.put_u8(0x08);
            put_str(out, v.as_bytes());
        }
        if let Some(v) = &p.correlation_data {
            out.put_u8(0x09);
            put_str(out, v);
        }
        for &id in o.sub_ids {
            out.put_u8(0x0b);
            put_varint(out, id as usize);
        }
        if let Some((alias, _)) = o.alias {
            out.put_u8(0x23);
            out.put_u16(alias);
        }
        for (k, v) in &p.user {
            out.put_u8(0x26);
            put_str(out, k.as_bytes());
            put_str(out, v.as_bytes());
        }
    }
    out.put_slice(&msg.payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::Origin;

    fn msg(topic: &str, payload: &[u8], props: Properties) -> Message {
        Message::new(
            Arc::from(topic),
            Bytes::copy_from_slice(payload),
            1,
            false,
            props,
            Origin::Internal,
        )
    }

    #[test]
    fn framing_waits_for_whole_packets_and_checks_the_limit_first() {
        assert_eq!(frame(&[], 100), Ok(None));
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x80], 100), Ok(None));
        assert_eq!(frame(&[0x30, 3, 0, 1], 100), Ok(None));
        assert_eq!(
            frame(&[0x30, 2, 0, 0], 100),
            Ok(Some(Frame {
                kind: 3,
                flags: 0,
                len: 4
            }))
        );
        // 200 bytes claimed: refused before the body arrives.
        assert_eq!(
            frame(&[0x30, 0xc8, 0x01], 100),
            Err(CodecError::TooLarge(203))
        );
        assert!(matches!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn published_packets_decode_back_with_every_property() {
        let props = Properties {
            payload_is_utf8: Some(true),
            expiry: Some(60),
            content_type: Some(Arc::from("text/plain")),
            response_topic: Some(Arc::from("reply/ü")),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user: vec![
                (Arc::from("k"), Arc::from("v")),
                (Arc::from("k"), Arc::from("w")),
            ],
        };
        let m = msg("ü/a/b", b"hello", props.clone());
        let o = Outgoing {
            qos: 1,
            pid: 7,
            retain: true,
            dup: true,
            sub_ids: &[],
            alias: Some((3, true)),
            expiry: Some(59),
        };
        let mut out = BytesMut::new();
        encode_publish(Version::V5, &m, &o, &mut out);
        assert_eq!(out.len(), publish_len(Version::V5, &m, &o));
        match v5::Packet::decode(&out) {
            Ok(Some(v5::Packet::Publish(p))) => {
                assert_eq!(&*p.topic_name, "ü/a/b");
                assert_eq!(&p.payload[..], b"hello");
                assert!(p.dup && p.retain);
                assert_eq!(qos_pid(p.qos_pid), (1, 7));
                assert_eq!(p.properties.topic_alias, Some(3));
                assert_eq!(p.properties.message_expiry_interval, Some(59));
                assert_eq!(p.properties.user_properties.len(), 2);
                assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
                assert_eq!(
                    p.properties.correlation_data.as_deref(),
                    Some(&b"\x00\x01"[..])
                );
            }
            other => panic!("{other:?}"),
        }
        // Several subscription identifiers (the crate decodes one at a time: check bytes).
        let o = Outgoing {
            qos: 0,
            pid: 0,
            retain: false,
            dup: false,
            sub_ids: &[2, 300],
            alias: None,
            expiry: None,
        };
        let m = msg("t", b"", Properties::default());
        let mut out = BytesMut::new();
        encode_publish(Version::V5, &m, &o, &mut out);
        assert_eq!(
            &out[..],
            &[0x30, 9, 0, 1, b't', 5, 0x0b, 2, 0x0b, 0xac, 0x02]
        );
        // 3.1.1: no properties at all.
        let mut out = BytesMut::new();
        encode_publish(Version::V4, &m, &o, &mut out);
        assert_eq!(&out[..], &[0x30, 3, 0, 1, b't']);
    }

    #[test]
    fn an_invalid_filter_is_refused_alone() {
        // SUBSCRIBE pid 1: "a/#/b" QoS 1, "ok" QoS 0 (3.1.1).
        let mut body = vec![0, 1, 0, 5];
        body.extend_from_slice(b"a/#/b");
        body.push(1);
        body.extend_from_slice(&[0, 2, b'o', b'k', 0]);
        let p = packet(0x82, &body);
        match decode(Version::V4, &p) {
            Ok(Inbound::Subscribe { pid: 1, filters }) => {
                assert_eq!(filters.len(), 2);
                assert!(filters[0].invalid);
                assert!(!filters[1].invalid);
                assert_eq!(filters[0].opts.qos, 1);
            }
            other => panic!("{other:?}"),
        }
        // Wrong reserved flags: malformed.
        let p = packet(0x80, &body);
        assert!(matches!(
            decode(Version::V4, &p),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn connect_rules_of_version_5() {
        // CONNECT v5, clean start, keep-alive 10, properties: Receive Maximum 0.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 10];
        body.extend_from_slice(&[3, 0x21, 0, 0]);
        body.extend_from_slice(&[0, 1, b'c']);
        let p = packet(0x10, &body);
        assert_eq!(
            decode_connect(&p).err(),
            Some(CodecError::Protocol("CONNECT with a Receive Maximum of 0"))
        );
        // Topic Alias Maximum 0 is fine.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 0];
        body.extend_from_slice(&[3, 0x22, 0, 0]);
        body.extend_from_slice(&[0, 2, b'c', b'/']);
        let c = decode_connect(&packet(0x10, &body)).expect("connect");
        assert_eq!(c.topic_alias_maximum, 0);
        assert_eq!(c.client_id, "c/");
        assert_eq!(c.keep_alive, 0);
        // Level 6: unsupported.
        let body = vec![0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 0, 0, 0, 0];
        assert_eq!(
            decode_connect(&packet(0x10, &body)).err(),
            Some(CodecError::UnsupportedLevel(6))
        );
    }

    #[test]
    fn a_3_1_1_connect_takes_any_utf8_client_id() {
        let id = "a+b/$#ü";
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let c = decode_connect(&packet(0x10, &body)).expect("connect");
        assert_eq!(c.client_id, id);
        assert_eq!(c.version, Version::V4);
        assert_eq!(c.session_expiry, 0);
    }
}
