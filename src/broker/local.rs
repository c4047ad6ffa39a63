//! In-process clients of the router: the downlink (messages from the hub) and the serial ports
//! publish through a [`LocalPublisher`]; a serial port's command subscription receives through a
//! [`LocalSubscriber`].
//!
//! A local publisher publishes at QoS 1 (the downlink) and waits until the deliveries to
//! persistent sessions are on flash, so what the downlink acknowledges to the hub is kept for
//! offline devices; serial ports publish at QoS 0, as fast as the device sends; a
//! local subscriber takes its deliveries at QoS 0 (nothing is lost between it and the router; a
//! subscriber too slow for its queue loses what does not fit, counted by the router as dropped).
//!
//! A local subscriber is a session of its own (clean start, Session Expiry 0) that ends when the
//! subscriber is dropped, or when another client takes its client id.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;

use super::message::{Message, Origin, Properties};
use super::router::{Delivery, Ending, Router, SessionHandle, Slot};
use super::topic::{self, Filter, FilterError, TopicError};
use super::tree::SubOptions;
use crate::store::StoreError;

/// How many deliveries a subscriber takes from its queue at a time.
const BATCH: usize = 64;

/// How long a new local subscriber waits for its session (a fresh session is free at once).
const ACQUIRE_WAIT: Duration = Duration::from_secs(5);

/// Why a local client cannot publish or subscribe.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot publish to topic {topic:?}: {reason}")]
    Topic { topic: String, reason: TopicError },
    #[error("cannot subscribe to topic filter {filter:?}: {reason}")]
    Filter { filter: String, reason: FilterError },
    #[error("cannot open the session of local client {client_id:?}: {reason}")]
    Session {
        client_id: String,
        reason: StoreError,
    },
    #[error("the session of local client {0:?} is held by another connection")]
    Busy(String),
    #[error("cannot keep the retained message of {topic:?}: {reason}")]
    Retain { topic: String, reason: StoreError },
}

/// Publishes into the router directly, at QoS 1, with a fixed origin ([`Origin::Hub`] for the
/// downlink, so that the export never sends a message back to the hub; [`Origin::Internal`] for
/// serial ports).
#[derive(Clone)]
pub struct LocalPublisher {
    router: Router,
    origin: Origin,
    qos: u8,
    /// Where retained messages are kept durably before they are routed (`None`: in the
    /// router's memory only).
    keep_retained: Option<(crate::store::Store, crate::proto::Origin)>,
}

impl LocalPublisher {
    /// A publisher at QoS 1 (see [`LocalPublisher::at_qos`]).
    pub fn new(router: &Router, origin: Origin) -> Self {
        LocalPublisher {
            router: router.clone(),
            origin,
            qos: 1,
            keep_retained: None,
        }
    }

    /// The same publisher keeping every retained message in `store` (as `origin`) before it is
    /// routed, as the gate does for its clients': it survives a restart. For sources whose
    /// retained messages come once (the hub), not for those that repeat them (a poll).
    pub fn keeping_retained(
        mut self,
        store: crate::store::Store,
        origin: crate::proto::Origin,
    ) -> Self {
        self.keep_retained = Some((store, origin));
        self
    }

    /// The same publisher at `qos` (0 or 1): at QoS 0, subscribers get the messages at QoS 0
    /// and nothing is kept on flash for persistent sessions — for sources that go faster than
    /// subscribers acknowledge and whose messages are kept elsewhere (serial frames: the outbox).
    pub fn at_qos(mut self, qos: u8) -> Self {
        self.qos = qos.min(1);
        self
    }

    /// Routes a message to the matching subscriptions (and keeps it as the topic's retained
    /// message if `retain`); returns once every matching session's queue has it or dropped it.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), LocalError> {
        topic::check_topic(topic).map_err(|reason| LocalError::Topic {
            topic: topic.to_owned(),
            reason,
        })?;
        if let (true, Some((store, origin))) = (retain, &self.keep_retained) {
            let record = crate::proto::OutboxRecord {
                topic: topic.to_owned(),
                payload: payload.clone(),
                qos: 1,
                retain: true,
                accepted_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                origin: *origin as i32,
                source: String::new(),
                headers: Vec::new(),
            };
            let kept = match store.retain(&record).await {
                Ok(ticket) => ticket.durable().await.map(|_| ()),
                Err(error) => Err(error),
            };
            match kept {
                Ok(()) => {}
                // Over `max_retained_bytes` it will not fit however often it is tried: it is
                // routed (and retained in memory) but not kept across a restart.
                Err(reason @ StoreError::RetainedFull { .. }) => {
                    tracing::warn!(%topic, %reason, "retained message not kept on flash");
                }
                Err(reason) => {
                    return Err(LocalError::Retain {
                        topic: topic.to_owned(),
                        reason,
                    })
                }
            }
        }
        // QoS 1, as an MQTT client publishing what it must not lose: subscribers get it at
        // their subscription's QoS (up to 1), and returning waits until the deliveries to
        // persistent sessions are on flash (the downlink acknowledges the hub only then).
        let msg = Message::new(
            Arc::from(topic),
            payload,
            self.qos,
            retain,
            Properties::default(),
            self.origin,
        );
        for ticket in self.router.publish(msg).await {
            // A delivery the store could not keep is counted by the router; the message was
            // still routed.
            let _ = ticket.durable().await;
        }
        Ok(())
    }
}

/// Receives what matches a local client's subscriptions, oldest first.
pub struct LocalSubscriber {
    handle: Arc<SessionHandle>,
    /// Deliveries taken from the queue and not yet returned, newest first (popped from the end).
    buf: Vec<Delivery>,
    router: Router,
    generation: u64,
    /// Holds the session as its (only) connection.
    _slot: Slot,
    /// Take-overs of the session when it was taken: another client took the client id once
    /// the session has had more.
    taken: u64,
}

impl std::fmt::Debug for LocalSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSubscriber")
            .field("client_id", &self.handle.client_id)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// Opens a session for `client_id` (clean start, Session Expiry 0) subscribed at QoS 0 to
/// `filters`. Retained messages matching them come first, as for any new subscription.
pub async fn local_subscriber(
    router: &Router,
    client_id: &str,
    filters: &[String],
) -> Result<LocalSubscriber, LocalError> {
    let parsed = filters
        .iter()
        .map(|f| match Filter::parse(f) {
            Ok(filter) => Ok((filter, SubOptions::default())),
            Err(reason) => Err(LocalError::Filter {
                filter: f.clone(),
                reason,
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let session_err = |reason| LocalError::Session {
        client_id: client_id.to_owned(),
        reason,
    };
    let connected = router
        .connect(client_id, true, 0)
        .await
        .map_err(session_err)?;
    let Some((slot, taken)) = connected.handle.acquire(ACQUIRE_WAIT).await else {
        router
            .disconnect(
                &connected.handle,
                connected.generation,
                Ending::Normal,
                None,
                None,
                Vec::new(),
            )
            .await;
        return Err(LocalError::Busy(client_id.to_owned()));
    };
    // Made before subscribing, so that a failure below ends the session (on drop).
    let mut sub = LocalSubscriber {
        handle: connected.handle,
        buf: Vec::new(),
        router: router.clone(),
        generation: connected.generation,
        _slot: slot,
        taken,
    };
    let subscribed = router
        .subscribe(&sub.handle, &parsed)
        .await
        .map_err(session_err)?;
    sub.buf = subscribed.retained;
    sub.buf.reverse();
    Ok(sub)
}

impl LocalSubscriber {
    /// Drops what the subscription brought from the retained messages: on a command topic, a
    /// retained message is an old command, which a device must not act on at start.
    pub fn skip_retained(&mut self) {
        for d in self.buf.drain(..) {
            self.handle.acknowledged(&d);
        }
    }

    /// The next message (topic, payload); `None` once another client took the client id (the
    /// session is gone). Cancel safe: a message is only taken off when it is returned.
    pub async fn next(&mut self) -> Option<(String, Bytes)> {
        loop {
            if let Some(d) = self.buf.pop() {
                self.handle.acknowledged(&d);
                return Some((d.msg.topic.to_string(), d.msg.payload.clone()));
            }
            if self.handle.taken_over(self.taken) {
                return None;
            }
            self.handle.take(BATCH, &mut self.buf);
            if !self.buf.is_empty() {
                self.buf.reverse();
                continue;
            }
            tokio::select! {
                _ = self.handle.notified() => {}
                _ = self.handle.until_taken_over(self.taken) => return None,
            }
        }
    }

    /// The client id of its session.
    pub fn client_id(&self) -> &str {
        &self.handle.client_id
    }
}

impl Drop for LocalSubscriber {
    /// Ends the session, so that the router stops queueing for it.
    fn drop(&mut self) {
        let done = self
            .router
            .disconnect(
                &self.handle,
                self.generation,
                Ending::Normal,
                None,
                None,
                Vec::new(),
            )
            .now_or_never();
        // The session (Session Expiry 0, no will) is ended under the router's lock at the first
        // poll; only store writes could wait, and a session that is not persistent has none.
        if done.is_none() {
            tracing::debug!(client_id = %self.handle.client_id, "local subscriber ended late");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::router::RouterSettings;

    fn router() -> Router {
        Router::new(RouterSettings::default(), None)
    }

    async fn next(sub: &mut LocalSubscriber) -> Option<(String, Bytes)> {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a message in time")
    }

    #[tokio::test]
    async fn a_publisher_reaches_a_subscriber_in_order() {
        let r = router();
        let mut sub = local_subscriber(&r, "serial-cmd", &["cmd/+".to_owned(), "all".to_owned()])
            .await
            .expect("subscriber");
        assert_eq!(sub.client_id(), "serial-cmd");
        let publisher = LocalPublisher::new(&r, Origin::Hub);
        for (topic, payload) in [("cmd/a", "1"), ("other", "x"), ("all", "2"), ("cmd/b", "3")] {
            publisher
                .publish(topic, Bytes::from(payload), false)
                .await
                .expect("publish");
        }
        for (topic, payload) in [("cmd/a", "1"), ("all", "2"), ("cmd/b", "3")] {
            let (t, p) = next(&mut sub).await.expect("message");
            assert_eq!((t.as_str(), &p[..]), (topic, payload.as_bytes()));
        }
        assert_eq!(
            r.stats()
                .queued_messages
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[tokio::test]
    async fn a_waiting_subscriber_wakes_up_for_a_message() {
        let r = router();
        let mut sub = local_subscriber(&r, "s", &["t".to_owned()])
            .await
            .expect("subscriber");
        let publisher = LocalPublisher::new(&r, Origin::Internal);
        let waiter = tokio::spawn(async move { next(&mut sub).await });
        tokio::task::yield_now().await;
        publisher
            .publish("t", Bytes::from_static(b"late"), false)
            .await
            .expect("publish");
        let (t, p) = waiter.await.expect("join").expect("message");
        assert_eq!((t.as_str(), &p[..]), ("t", &b"late"[..]));
    }

    #[tokio::test]
    async fn retained_messages_come_first_and_are_kept_by_the_router() {
        let r = router();
        let publisher = LocalPublisher::new(&r, Origin::Internal);
        publisher
            .publish("state/a", Bytes::from_static(b"on"), true)
            .await
            .expect("publish");
        let mut sub = local_subscriber(&r, "s", &["state/#".to_owned()])
            .await
            .expect("subscriber");
        publisher
            .publish("state/b", Bytes::from_static(b"off"), false)
            .await
            .expect("publish");
        assert_eq!(next(&mut sub).await.expect("retained").0, "state/a");
        assert_eq!(next(&mut sub).await.expect("live").0, "state/b");
    }

    #[tokio::test]
    async fn invalid_topics_and_filters_are_refused_by_name() {
        let r = router();
        let publisher = LocalPublisher::new(&r, Origin::Hub);
        let err = publisher
            .publish("a/+/b", Bytes::new(), false)
            .await
            .expect_err("wildcard topic");
        assert!(matches!(
            err,
            LocalError::Topic {
                reason: TopicError::Wildcard,
                ..
            }
        ));
        assert!(err.to_string().contains("\"a/+/b\""), "{err}");
        assert!(publisher.publish("", Bytes::new(), false).await.is_err());

        let err = local_subscriber(&r, "s", &["ok".to_owned(), "a/#/b".to_owned()])
            .await
            .expect_err("bad filter");
        assert!(matches!(err, LocalError::Filter { .. }));
        assert!(err.to_string().contains("\"a/#/b\""), "{err}");
        assert_eq!(r.sessions(), 0, "no session is left behind");
    }

    #[tokio::test]
    async fn dropping_a_subscriber_ends_its_session() {
        let r = router();
        let sub = local_subscriber(&r, "s", &["t".to_owned()])
            .await
            .expect("subscriber");
        assert_eq!(r.sessions(), 1);
        drop(sub);
        assert_eq!(r.sessions(), 0);
        assert_eq!(
            r.stats()
                .subscriptions
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        LocalPublisher::new(&r, Origin::Hub)
            .publish("t", Bytes::from_static(b"x"), false)
            .await
            .expect("publish");
        assert_eq!(
            r.stats()
                .queued_messages
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[tokio::test]
    async fn a_subscriber_whose_client_id_is_taken_ends() {
        let r = router();
        let mut sub = local_subscriber(&r, "s", &["t".to_owned()])
            .await
            .expect("subscriber");
        let _other = r.connect("s", true, 0).await.expect("connect");
        assert_eq!(next(&mut sub).await, None);
        drop(sub);
        assert_eq!(r.sessions(), 1, "the new session stays");
    }
}
