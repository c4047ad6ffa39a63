//! A QoS 1 publisher that records every PUBACK: which payloads the relay acknowledged.
//!
//! rumqttc sends publish requests in the order they were queued and reports each one as
//! `Outgoing::Publish(pkid)` when it goes out; a `PubAck(pkid)` then names the payload that was
//! sent with that packet id. The publisher stops at the first connection error (the power cut)
//! and never retransmits, so every payload is sent once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// At most this many payloads per run (a bound; a cut comes long before).
const MAX_MESSAGES: usize = 1_000_000;
/// Bytes of filler after each payload's unique `<tag>-<i> ` head: sensor-sized messages, and a
/// store file that grows past the size at which the store compacts it once drained.
const FILLER: usize = 1_000;

/// The `i`-th payload of a run tagged `tag`: `<tag>-<i> ` and the filler.
pub fn payload(tag: &str, i: usize) -> String {
    format!("{tag}-{i} {}", "x".repeat(FILLER))
}

/// Which payload of a run tagged `tag` `text` is: the `i` of [`payload`]`(tag, i)`.
pub fn payload_index(tag: &str, text: &str) -> Option<usize> {
    let i = text
        .strip_prefix(tag)?
        .strip_prefix('-')?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    (payload(tag, i) == text).then_some(i)
}

/// What one run sent and which of it was acknowledged.
#[derive(Debug, Default)]
pub struct AckLog {
    /// PUBLISH packets that went out.
    pub sent: usize,
    /// Payloads whose PUBACK arrived, in order.
    pub acked: Vec<String>,
    /// Why the run ended.
    pub ended_by: Option<String>,
}

#[derive(Default)]
struct Shared {
    /// Payloads queued to rumqttc, not yet sent (in queue order).
    queued: VecDeque<String>,
    /// pkid → payload for sent, unacknowledged publishes.
    in_flight: HashMap<u16, String>,
    log: AckLog,
}

/// A running publisher: `<tag>-0 xxx…`, `<tag>-1 xxx…`, … to `sensors/hw/<tag>`, QoS 1, 3.1.1.
pub struct Recording {
    shared: Arc<Mutex<Shared>>,
    events: JoinHandle<()>,
    feeder: JoinHandle<()>,
}

impl Recording {
    /// Publishes until the connection fails (the power cut).
    pub fn start(port: u16, client_id: &str, tag: &str) -> Recording {
        Recording::start_paced(port, client_id, tag, MAX_MESSAGES, None)
    }

    /// Publishes `<tag>-0` … `<tag>-(limit-1)`, each once it has a permit from `pace` (when
    /// given: the test releases messages in rounds), then waits for their PUBACKs.
    pub fn start_paced(
        port: u16,
        client_id: &str,
        tag: &str,
        limit: usize,
        pace: Option<Arc<Semaphore>>,
    ) -> Recording {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(64);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let shared: Arc<Mutex<Shared>> = Arc::default();

        let feeder = tokio::spawn({
            let shared = shared.clone();
            let topic = format!("sensors/hw/{tag}");
            let tag = tag.to_owned();
            async move {
                for i in 0..limit.min(MAX_MESSAGES) {
                    if let Some(pace) = &pace {
                        match pace.acquire().await {
                            Ok(permit) => permit.forget(),
                            Err(_) => return,
                        }
                    }
                    let payload = payload(&tag, i);
                    // Queued here before the request exists, so the event loop always finds it.
                    shared
                        .lock()
                        .expect("publisher state")
                        .queued
                        .push_back(payload.clone());
                    if client
                        .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        return; // the event loop has ended
                    }
                }
            }
        });

        let events = tokio::spawn({
            let shared = shared.clone();
            async move {
                loop {
                    let event = eventloop.poll().await;
                    let mut s = shared.lock().expect("publisher state");
                    match event {
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            let payload = s.queued.pop_front().expect("a queued payload");
                            s.log.sent += 1;
                            s.in_flight.insert(pkid, payload);
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            let payload = s
                                .in_flight
                                .remove(&ack.pkid)
                                .unwrap_or_else(|| panic!("PUBACK for unknown pkid {}", ack.pkid));
                            s.log.acked.push(payload);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            s.log.ended_by = Some(e.to_string());
                            return;
                        }
                    }
                }
            }
        });
        Recording {
            shared,
            events,
            feeder,
        }
    }

    pub fn acked(&self) -> usize {
        self.shared.lock().expect("publisher state").log.acked.len()
    }

    /// Waits until at least `n` PUBACKs arrived; panics after `timeout` or if the run ended.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) {
        let ok =
            crate::common::wait_until(timeout, || self.acked() >= n || self.events.is_finished())
                .await;
        let s = self.shared.lock().expect("publisher state");
        assert!(
            ok && s.log.acked.len() >= n,
            "publisher: {} PUBACKs (wanted {n}) within {timeout:?}; ended by {:?}",
            s.log.acked.len(),
            s.log.ended_by
        );
    }

    /// Ends the run now (the connection is dropped, no DISCONNECT); returns the log.
    pub async fn stop(self) -> AckLog {
        self.events.abort();
        self.feeder.abort();
        let _ = self.events.await;
        let _ = self.feeder.await;
        let mut s = self.shared.lock().expect("publisher state");
        std::mem::take(&mut s.log)
    }

    /// Waits (bounded) for the run to end by its connection failing; returns the log.
    pub async fn finish(self, timeout: Duration) -> AckLog {
        let Recording {
            shared,
            events,
            feeder,
        } = self;
        match tokio::time::timeout(timeout, events).await {
            Ok(joined) => joined.expect("publisher event loop panicked"),
            Err(_) => panic!("publisher connection did not end within {timeout:?} of the cut"),
        }
        feeder.abort();
        let _ = feeder.await;
        let mut s = shared.lock().expect("publisher state");
        std::mem::take(&mut s.log)
    }
}
