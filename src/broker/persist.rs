//! How persistent sessions are written into the store's keyed spaces.
//!
//! - `SESSION`: key = client id; value = format 1, Session Expiry Interval (u32).
//! - `SUBSCRIPTION`: key = client id (u16 length + bytes) + filter as subscribed (with any
//!   `$share/<group>/`); value = format 1, QoS, flags (No Local, Retain As Published), Retain
//!   Handling, Subscription Identifier (u32, 0 = none).
//! - `QUEUED`: key = client id (u16 length + bytes) + delivery sequence (u64, big-endian);
//!   value = the delivery (see [`queued_value`]).
//! - `INFLIGHT`: the `QUEUED` key of a delivery that was sent at least once; value = the packet
//!   id it was sent with (u16). After a restart it goes out again with DUP and that packet id.
//!
//! All integers are big-endian. A value of another format, or one cut short, reads as `None`
//! and its entry is dropped at start (counted as corrupt by the store).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::message::{Message, Origin, Properties};
use super::router::Delivery;
use super::tree::SubOptions;

const FORMAT: u8 = 1;

fn prefixed(client: &str) -> Vec<u8> {
    let c = client.as_bytes();
    let n = c.len().min(usize::from(u16::MAX));
    let mut k = Vec::with_capacity(2 + n + 16);
    k.extend_from_slice(&(n as u16).to_be_bytes());
    k.extend_from_slice(&c[..n]);
    k
}

/// Splits a `SUBSCRIPTION` or `QUEUED` key into the client id and the rest.
pub fn split_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let n = usize::from(u16::from_be_bytes(key.get(..2)?.try_into().ok()?));
    let client = std::str::from_utf8(key.get(2..2 + n)?).ok()?;
    Some((client, key.get(2 + n..)?))
}

pub fn session_value(expiry: u32) -> Vec<u8> {
    let mut v = vec![FORMAT];
    v.extend_from_slice(&expiry.to_be_bytes());
    v
}

pub fn parse_session(v: &[u8]) -> Option<u32> {
    match v {
        [FORMAT, a, b, c, d] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

pub fn subscription_key(client: &str, filter: &str) -> Vec<u8> {
    let mut k = prefixed(client);
    k.extend_from_slice(filter.as_bytes());
    k
}

pub fn subscription_value(o: &SubOptions) -> Vec<u8> {
    let mut v = vec![
        FORMAT,
        o.qos,
        u8::from(o.no_local) | (u8::from(o.retain_as_published) << 1),
        o.retain_handling,
    ];
    v.extend_from_slice(&o.id.unwrap_or(0).to_be_bytes());
    v
}

pub fn parse_subscription(v: &[u8]) -> Option<SubOptions> {
    match v {
        [FORMAT, qos @ 0..=2, flags, rh @ 0..=2, a, b, c, d] => {
            let id = u32::from_be_bytes([*a, *b, *c, *d]);
            Some(SubOptions {
                qos: *qos,
                no_local: flags & 1 != 0,
                retain_as_published: flags & 2 != 0,
                retain_handling: *rh,
                id: (id != 0).then_some(id),
            })
        }
        _ => None,
    }
}

pub fn queued_key(client: &str, seq: u64) -> Vec<u8> {
    let mut k = prefixed(client);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.0.extend_from_slice(b);
    }
    fn opt(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                self.0.push(1);
                self.bytes(b);
            }
            None => self.0.push(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Option<Arc<str>> {
        std::str::from_utf8(self.bytes()?).ok().map(Arc::from)
    }
    fn opt_bytes(&mut self) -> Option<Option<&'a [u8]>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.bytes()?)),
            _ => None,
        }
    }
    fn opt_str(&mut self) -> Option<Option<Arc<str>>> {
        match self.opt_bytes()? {
            None => Some(None),
            Some(b) => Some(Some(Arc::from(std::str::from_utf8(b).ok()?))),
        }
    }
}

/// A delivery kept for a persistent session: format 1, delivered QoS, delivered retain flag,
/// published QoS and retain flag, when it was received (Unix ms), subscription identifiers
/// (count u8 + u32 each), payload format (0 none, 1 bytes, 2 UTF-8), expiry (0 none, 1 + u32),
/// content type, response topic, correlation data (each 0 none, 1 + u32 length + bytes), user
/// properties (u32 count, then name and value as u32 length + bytes), topic, payload.
pub fn queued_value(d: &Delivery) -> Vec<u8> {
    let m = &d.msg;
    let p = &m.props;
    let mut w = Writer(Vec::with_capacity(m.size() + 32));
    let received = SystemTime::now()
        .checked_sub(m.received.elapsed())
        .unwrap_or(SystemTime::now())
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    w.0.extend_from_slice(&[FORMAT, d.qos, u8::from(d.retain), m.qos, u8::from(m.retain)]);
    w.0.extend_from_slice(&received.to_be_bytes());
    let ids = &d.sub_ids[..d.sub_ids.len().min(255)];
    w.0.push(ids.len() as u8);
    for id in ids {
        w.0.extend_from_slice(&id.to_be_bytes());
    }
    w.0.push(match p.payload_is_utf8 {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
    match p.expiry {
        Some(e) => {
            w.0.push(1);
            w.0.extend_from_slice(&e.to_be_bytes());
        }
        None => w.0.push(0),
    }
    w.opt(p.content_type.as_deref().map(str::as_bytes));
    w.opt(p.response_topic.as_deref().map(str::as_bytes));
    w.opt(p.correlation_data.as_deref());
    w.0.extend_from_slice(&(p.user.len() as u32).to_be_bytes());
    for (k, v) in &p.user {
        w.bytes(k.as_bytes());
        w.bytes(v.as_bytes());
    }
    w.bytes(m.topic.as_bytes());
    w.bytes(&m.payload);
    w.0
}

/// Reads back what [`queued_value`] wrote: the message, delivered QoS, retain flag and
/// subscription identifiers.
pub fn parse_queued(v: &[u8]) -> Option<(Message, u8, bool, Vec<u32>)> {
    let mut r = Reader(v);
    if r.u8()? != FORMAT {
        return None;
    }
    let qos = r.u8()?;
    let retain = r.u8()? != 0;
    let msg_qos = r.u8()?;
    let msg_retain = r.u8()? != 0;
    let received_ms = r.u64()?;
    let n = r.u8()?;
    let mut ids = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        ids.push(r.u32()?);
    }
    let payload_is_utf8 = match r.u8()? {
        0 => None,
        1 => Some(false),
        2 => Some(true),
        _ => return None,
    };
    let expiry = match r.u8()? {
        0 => None,
        1 => Some(r.u32()?),
        _ => return None,
    };
    let content_type = r.opt_str()?;
    let response_topic = r.opt_str()?;
    let correlation_data = r.opt_bytes()?.map(Bytes::copy_from_slice);
    let users = r.u32()?;
    let mut user = Vec::new();
    for _ in 0..users {
        user.push((r.str()?, r.str()?));
    }
    let topic = r.str()?;
    let payload = Bytes::copy_from_slice(r.bytes()?);
    if qos > 2 || msg_qos > 2 || !r.0.is_empty() {
        return None;
    }
    // Its age carries over the restart, so that message expiry still counts from its arrival.
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let age = Duration::from_millis(now_ms.saturating_sub(received_ms));
    let received = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    let msg = Message {
        topic,
        payload,
        qos: msg_qos,
        retain: msg_retain,
        props: Properties {
            payload_is_utf8,
            expiry,
            content_type,
            response_topic,
            correlation_data,
            user,
        },
        origin: Origin::Internal,
        received,
    };
    Some((msg, qos, retain, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back_whatever_the_client_id_holds() {
        for client in ["", "a", "a\0b", "ü/+#$"] {
            let k = queued_key(client, 42);
            let (c, rest) = split_key(&k).expect("split");
            assert_eq!(c, client);
            assert_eq!(rest, 42u64.to_be_bytes());
            let k = subscription_key(client, "$share/g/a/#");
            assert_eq!(split_key(&k), Some((client, &b"$share/g/a/#"[..])));
        }
        assert_eq!(split_key(&[0, 5, b'a']), None);
    }

    #[test]
    fn values_read_back() {
        assert_eq!(parse_session(&session_value(u32::MAX)), Some(u32::MAX));
        let o = SubOptions {
            qos: 2,
            no_local: true,
            retain_as_published: false,
            retain_handling: 1,
            id: Some(77),
        };
        assert_eq!(parse_subscription(&subscription_value(&o)), Some(o));
        let msg = Message::new(
            Arc::from("a/ü"),
            Bytes::from_static(b"payload"),
            2,
            true,
            Properties {
                payload_is_utf8: Some(true),
                expiry: Some(30),
                content_type: Some(Arc::from("c")),
                response_topic: None,
                correlation_data: Some(Bytes::from_static(b"\x01")),
                user: vec![(Arc::from("k"), Arc::from("v"))],
            },
            Origin::Hub,
        );
        let d = Delivery {
            msg: Arc::new(msg),
            qos: 1,
            retain: false,
            sub_ids: vec![3, 9],
            key: Some(5),
            dup: false,
            pid: 0,
            released: false,
        };
        let v = queued_value(&d);
        let (m, qos, retain, ids) = parse_queued(&v).expect("parse");
        assert_eq!((qos, retain, ids), (1, false, vec![3, 9]));
        assert_eq!(&*m.topic, "a/ü");
        assert_eq!(m.props, d.msg.props);
        assert_eq!(m.payload, d.msg.payload);
        assert!((m.qos, m.retain) == (2, true));
        for cut in 0..v.len() {
            assert!(parse_queued(&v[..cut]).is_none(), "cut at {cut}");
        }
    }
}
