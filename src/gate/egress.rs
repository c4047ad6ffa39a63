//! The MQTT 5 limits a client sets on what the server sends it, which rumqttd ignores: its
//! Receive Maximum [MQTT-3.3.4-9] and its Maximum Packet Size [MQTT-3.1.2-24/25].
//!
//! Shared by the three parts of one connection (see `connection.rs`):
//! - the **writer** asks [`Egress::publish`] before it passes a QoS 1/2 PUBLISH on: while the
//!   client has its Receive Maximum of them unfinished the PUBLISH is held (and the broker is
//!   not read, so nothing overtakes it) until [`Egress::released`] wakes it. A PUBLISH larger
//!   than the client's Maximum Packet Size is discarded ([`Egress::discard`]): the gate then
//!   acknowledges it to the broker itself, as the client would have.
//! - the **reader** reports the client's PUBACK / PUBREC / PUBCOMP ([`Egress::client_ack`]),
//!   which finish publishes and so make room.
//! - the **forwarder** writes the gate's own acknowledgements ([`Egress::owed`]) to the
//!   broker. rumqttd disconnects on an acknowledgement out of order (`router/iobufs.rs`,
//!   `register_ack` and `register_pubcomp`), so the forwarder keeps the broker's order: its
//!   PUBLISHes waiting for PUBACK/PUBREC, and its PUBRELs waiting for PUBCOMP, each in a queue
//!   popped as the client's acknowledgements are written ([`Egress::forwarded`]); an
//!   acknowledgement of the gate's own goes out when its entry reaches the front.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use super::lock;
use crate::broker;

/// Packet types.
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;

/// What the writer does with a PUBLISH from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Pass it on to the client.
    Send,
    /// Too large for the client: discarded.
    Discard,
    /// Wait: the client has its Receive Maximum of publishes unfinished.
    Hold,
}

/// One connection's state of the two limits.
#[derive(Default)]
pub(super) struct Egress {
    inner: Mutex<Inner>,
    /// Wakes the writer: a publish to the client finished.
    pub(super) released: Notify,
    /// Wakes the forwarder: an acknowledgement of the gate's own may be due.
    pub(super) owed: Notify,
}

#[derive(Default)]
struct Inner {
    /// QoS 1/2 publishes passed to the client and not finished by it: packet id → QoS.
    unfinished: HashMap<u16, u8>,
    /// The broker's QoS 1/2 publishes waiting for PUBACK/PUBREC, in the broker's order (kept
    /// only while the client has a Maximum Packet Size, the only way the gate owes any).
    acks: VecDeque<Sent>,
    /// PUBRECs written to the broker waiting for PUBCOMP, in order.
    comps: VecDeque<Rec>,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    pkid: u16,
    qos: u8,
    /// Discarded by the gate: it acknowledges it itself.
    discarded: bool,
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    pkid: u16,
    /// The PUBREC was the gate's: it answers the broker's PUBREL with PUBCOMP itself.
    discarded: bool,
    /// The broker's PUBREL for it came.
    released: bool,
}

impl Egress {
    /// Decides on a PUBLISH from the broker (the whole frame) for a client with at most
    /// `receive_maximum` unfinished QoS 1/2 publishes and packets of at most `max_size` bytes.
    /// The broker's acknowledgement order is kept only with a `max_size` (without one the
    /// gate never discards, so it never owes an acknowledgement).
    pub(super) fn publish(
        &self,
        packet: &[u8],
        receive_maximum: usize,
        max_size: Option<usize>,
    ) -> Verdict {
        let Some((qos, pkid)) = publish_fields(packet) else {
            return Verdict::Send;
        };
        let track = max_size.is_some();
        if max_size.is_some_and(|max| packet.len() > max) {
            if qos > 0 {
                self.discard(pkid, qos);
            }
            return Verdict::Discard;
        }
        if qos == 0 {
            return Verdict::Send;
        }
        let mut inner = lock(&self.inner);
        // A retransmission of a publish already out takes no new room.
        if !inner.unfinished.contains_key(&pkid) && inner.unfinished.len() >= receive_maximum {
            return Verdict::Hold;
        }
        inner.unfinished.insert(pkid, qos);
        if track {
            inner.acks.push_back(Sent {
                pkid,
                qos,
                discarded: false,
            });
        }
        Verdict::Send
    }

    /// A QoS 1/2 publish the gate discarded: acknowledged to the broker in its turn.
    fn discard(&self, pkid: u16, qos: u8) {
        lock(&self.inner).acks.push_back(Sent {
            pkid,
            qos,
            discarded: true,
        });
        self.owed.notify_one();
    }

    /// A PUBREL from the broker (the whole frame): `true` when it releases a publish the gate
    /// discarded, which the gate answers itself (the client never heard of it).
    pub(super) fn broker_pubrel(&self, packet: &[u8]) -> bool {
        let Some(pkid) = broker::packet_id(packet) else {
            return false;
        };
        let mut inner = lock(&self.inner);
        let Some(rec) = inner
            .comps
            .iter_mut()
            .find(|r| r.pkid == pkid && r.discarded && !r.released)
        else {
            return false;
        };
        rec.released = true;
        drop(inner);
        self.owed.notify_one();
        true
    }

    /// A PUBACK, PUBREC or PUBCOMP from the client (the whole frame), as the reader reads it:
    /// a QoS 1 publish is finished at its PUBACK, a QoS 2 one at its PUBCOMP or at a PUBREC
    /// with a failure code.
    pub(super) fn client_ack(&self, packet: &[u8]) {
        let Some((kind, pkid, reason)) = ack_fields(packet) else {
            return;
        };
        let mut inner = lock(&self.inner);
        let finished = match (kind, inner.unfinished.get(&pkid)) {
            (PUBACK, Some(1)) | (PUBCOMP, Some(2)) => true,
            (PUBREC, Some(2)) => reason >= 0x80,
            _ => false,
        };
        if finished {
            inner.unfinished.remove(&pkid);
            drop(inner);
            self.released.notify_one();
        }
    }

    /// A packet of the client's the forwarder just wrote to the broker: its PUBACK, PUBREC and
    /// PUBCOMP take their entries out of the broker's order.
    pub(super) fn forwarded(&self, packet: &[u8]) {
        let Some((kind, pkid, _)) = ack_fields(packet) else {
            return;
        };
        let mut inner = lock(&self.inner);
        if inner.acks.is_empty() && inner.comps.is_empty() {
            return;
        }
        match kind {
            PUBACK | PUBREC => {
                if let Some(i) = inner
                    .acks
                    .iter()
                    .position(|s| s.pkid == pkid && !s.discarded)
                {
                    inner.acks.remove(i);
                }
                if kind == PUBREC {
                    inner.comps.push_back(Rec {
                        pkid,
                        discarded: false,
                        released: false,
                    });
                }
            }
            PUBCOMP => {
                if let Some(i) = inner
                    .comps
                    .iter()
                    .position(|r| r.pkid == pkid && !r.discarded)
                {
                    inner.comps.remove(i);
                }
            }
            _ => {}
        }
    }

    /// The acknowledgements of the gate's own that are due now, in order: those of discarded
    /// publishes at the front of the broker's order. The forwarder writes them before anything
    /// else.
    pub(super) fn owed(&self) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut inner = lock(&self.inner);
        loop {
            if inner.acks.front().is_some_and(|s| s.discarded) {
                let Some(sent) = inner.acks.pop_front() else {
                    break;
                };
                if sent.qos == 1 {
                    out.push(ack(PUBACK, sent.pkid));
                } else {
                    out.push(ack(PUBREC, sent.pkid));
                    inner.comps.push_back(Rec {
                        pkid: sent.pkid,
                        discarded: true,
                        released: false,
                    });
                }
            } else if inner
                .comps
                .front()
                .is_some_and(|r| r.discarded && r.released)
            {
                let Some(rec) = inner.comps.pop_front() else {
                    break;
                };
                out.push(ack(PUBCOMP, rec.pkid));
            } else {
                break;
            }
        }
        out
    }
}

/// QoS and packet id of a PUBLISH frame; `None` for anything else (or QoS 0: packet id 0).
fn publish_fields(packet: &[u8]) -> Option<(u8, u16)> {
    let f = broker::frame(packet, usize::MAX).ok()??;
    if f.kind != PUBLISH {
        return None;
    }
    match (f.flags >> 1) & 0b11 {
        0 => Some((0, 0)),
        qos => Some((qos, broker::publish_packet_id(packet)?)),
    }
}

/// Type, packet id and reason code (0 when absent) of a PUBACK, PUBREC, PUBREL or PUBCOMP.
fn ack_fields(packet: &[u8]) -> Option<(u8, u16, u8)> {
    let f = broker::frame(packet, usize::MAX).ok()??;
    if !matches!(f.kind, PUBACK | PUBREC | PUBREL | PUBCOMP) {
        return None;
    }
    let pkid = broker::packet_id(packet)?;
    let reason = packet.get(f.header_len + 2).copied().unwrap_or(0);
    Some((f.kind, pkid, reason))
}

/// A successful PUBACK / PUBREC / PUBCOMP (the reason code left out: success, in 3.1.1 and 5).
fn ack(kind: u8, pkid: u16) -> Bytes {
    let [hi, lo] = pkid.to_be_bytes();
    let first = if kind == PUBREL { 0x62 } else { kind << 4 };
    Bytes::from(vec![first, 0x02, hi, lo])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: u8, pkid: u16, payload: usize) -> Vec<u8> {
        let mut body = vec![0x00, 0x01, b't'];
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.push(0x00); // no properties
        body.extend(std::iter::repeat_n(b'x', payload));
        assert!(body.len() < 128);
        let mut p = vec![0x30 | (qos << 1), body.len() as u8];
        p.extend(body);
        p
    }

    #[test]
    fn holds_beyond_the_receive_maximum_and_releases_on_acks() {
        let e = Egress::default();
        assert_eq!(e.publish(&publish(1, 1, 1), 2, None), Verdict::Send);
        assert_eq!(e.publish(&publish(2, 2, 1), 2, None), Verdict::Send);
        assert_eq!(e.publish(&publish(0, 0, 1), 2, None), Verdict::Send);
        assert_eq!(e.publish(&publish(1, 3, 1), 2, None), Verdict::Hold);
        // A PUBREC with success does not finish QoS 2; a PUBACK finishes QoS 1.
        e.client_ack(&ack(PUBREC, 2));
        assert_eq!(e.publish(&publish(1, 3, 1), 2, None), Verdict::Hold);
        e.client_ack(&ack(PUBACK, 1));
        assert_eq!(e.publish(&publish(1, 3, 1), 2, None), Verdict::Send);
        assert_eq!(e.publish(&publish(1, 4, 1), 2, None), Verdict::Hold);
        e.client_ack(&ack(PUBCOMP, 2));
        assert_eq!(e.publish(&publish(1, 4, 1), 2, None), Verdict::Send);
        // A PUBREC with a failure code finishes QoS 2.
        let e = Egress::default();
        assert_eq!(e.publish(&publish(2, 7, 1), 1, None), Verdict::Send);
        assert_eq!(e.publish(&publish(1, 8, 1), 1, None), Verdict::Hold);
        e.client_ack(&[0x50, 0x03, 0x00, 0x07, 0x80]);
        assert_eq!(e.publish(&publish(1, 8, 1), 1, None), Verdict::Send);
    }

    #[test]
    fn acks_for_discarded_publishes_keep_the_broker_order() {
        let e = Egress::default();
        let max = Some(20);
        assert_eq!(e.publish(&publish(1, 1, 1), 10, max), Verdict::Send);
        assert_eq!(e.publish(&publish(1, 2, 30), 10, max), Verdict::Discard);
        assert_eq!(e.publish(&publish(2, 3, 30), 10, max), Verdict::Discard);
        assert_eq!(e.publish(&publish(0, 0, 30), 10, max), Verdict::Discard);
        // Publish 1 is still waiting for the client: nothing owed yet.
        assert!(e.owed().is_empty());
        e.forwarded(&ack(PUBACK, 1));
        assert_eq!(e.owed(), vec![ack(PUBACK, 2), ack(PUBREC, 3)]);
        // The PUBREL for 3 is the gate's to answer, once it came.
        assert!(!e.broker_pubrel(&ack(PUBREL, 9)));
        assert!(e.broker_pubrel(&ack(PUBREL, 3)));
        assert_eq!(e.owed(), vec![ack(PUBCOMP, 3)]);
        assert!(e.owed().is_empty());
    }

    #[test]
    fn a_discarded_pubcomp_waits_for_earlier_client_pubcomps() {
        let e = Egress::default();
        let max = Some(20);
        assert_eq!(e.publish(&publish(2, 1, 1), 10, max), Verdict::Send);
        assert_eq!(e.publish(&publish(2, 2, 30), 10, max), Verdict::Discard);
        e.forwarded(&ack(PUBREC, 1));
        assert_eq!(e.owed(), vec![ack(PUBREC, 2)]);
        assert!(e.broker_pubrel(&ack(PUBREL, 2)));
        // The client has not completed 1 yet.
        assert!(e.owed().is_empty());
        e.forwarded(&ack(PUBCOMP, 1));
        assert_eq!(e.owed(), vec![ack(PUBCOMP, 2)]);
    }
}
