//! A message as the router carries it: published once, shared by every subscriber it reaches.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::tree::SessionId;

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client connection, by its session (for No Local).
    Client(SessionId),
    /// The hub, through the downlink: never exported again.
    Hub,
    /// The relay itself: serial ports, `$SYS` statistics, restored state.
    Internal,
}

/// MQTT 5 publish properties that travel with a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_is_utf8: Option<bool>,
    /// Message Expiry Interval, seconds, as published.
    pub expiry: Option<u32>,
    pub content_type: Option<Arc<str>>,
    pub response_topic: Option<Arc<str>>,
    pub correlation_data: Option<Bytes>,
    pub user: Vec<(Arc<str>, Arc<str>)>,
}

/// One published message.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: u8,
    /// The retain flag it was published with.
    pub retain: bool,
    pub props: Properties,
    pub origin: Origin,
    /// When the broker took it (message expiry counts from here).
    pub received: Instant,
}

impl Message {
    pub fn new(
        topic: Arc<str>,
        payload: Bytes,
        qos: u8,
        retain: bool,
        props: Properties,
        origin: Origin,
    ) -> Message {
        Message {
            topic,
            payload,
            qos,
            retain,
            props,
            origin,
            received: Instant::now(),
        }
    }

    /// The expiry interval left at `now`: `None` when the message does not expire,
    /// `Some(Err(()))` once it has.
    pub fn remaining_expiry(&self, now: Instant) -> Option<Result<u32, ()>> {
        let interval = self.props.expiry?;
        let elapsed = now.saturating_duration_since(self.received).as_secs();
        Some(match u64::from(interval).checked_sub(elapsed) {
            Some(left) if left > 0 => Ok(left as u32),
            _ => Err(()),
        })
    }

    /// Whether it has expired at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        matches!(self.remaining_expiry(now), Some(Err(())))
    }

    /// Bytes it takes, roughly, in a queue.
    pub fn size(&self) -> usize {
        let p = &self.props;
        self.topic.len()
            + self.payload.len()
            + p.content_type.as_ref().map_or(0, |c| c.len())
            + p.response_topic.as_ref().map_or(0, |c| c.len())
            + p.correlation_data.as_ref().map_or(0, |c| c.len())
            + p.user.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn expiry_counts_down_in_whole_seconds() {
        let mut m = Message::new(
            Arc::from("t"),
            Bytes::new(),
            0,
            false,
            Properties {
                expiry: Some(3),
                ..Default::default()
            },
            Origin::Internal,
        );
        let t0 = m.received;
        assert_eq!(m.remaining_expiry(t0), Some(Ok(3)));
        assert_eq!(
            m.remaining_expiry(t0 + Duration::from_millis(1500)),
            Some(Ok(2))
        );
        assert!(m.expired(t0 + Duration::from_secs(3)));
        m.props.expiry = None;
        assert_eq!(m.remaining_expiry(t0 + Duration::from_secs(99)), None);
    }
}
