//! The downlink: NATS hub → local MQTT subscribers.
//!
//! Every `[[import]]` filter becomes one or two NATS subjects under `<subject_prefix>`. For each,
//! when a hub stream captures the subject (and the uplink mode is `jetstream`), the downlink
//! reads it through a durable pull consumer of its own (`relaybox-<relay>-<hash>`), so that what
//! was sent while the box was away arrives when it is back; a new consumer starts with new
//! messages. Without such a stream it subscribes with core NATS (what was sent while away is
//! lost).
//!
//! Each message is published into the local router through the broker's in-process link, which
//! bypasses the gate: *architecture invariant:* nothing that came down is ever exported again.
//! A message whose `Relaybox-Origin` is this relay (its own export coming back through an
//! overlapping import) is skipped. One with `Relaybox-Retain: true` (retained by its publisher
//! at another relay) is kept as the topic's retained message here too. A JetStream message is acknowledged after the router took it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, context::GetStreamByNameErrorKind};
use futures::StreamExt;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::local::LocalPublisher;
use crate::config::UplinkMode;
use crate::mapping::{self, TopicFilter};
use crate::uplink::{self, ORIGIN_HEADER, RETAIN_HEADER};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum DownlinkError {
    #[error("hub request failed: {0}")]
    Hub(String),
    #[error("the local broker refused the message: {0}")]
    Local(String),
}

/// What the downlink needs to know.
#[derive(Debug, Clone)]
pub struct DownlinkSettings {
    pub relay: String,
    pub subject_prefix: String,
    pub mode: UplinkMode,
    pub imports: Vec<TopicFilter>,
    /// The hub stream to create first when it is missing (`create_stream = true`), and its
    /// replica count, so that imports under the prefix are read durably from the start.
    pub create_stream: Option<(String, usize)>,
}

/// The downlink's counters.
#[derive(Debug, Default)]
pub struct DownlinkStatus {
    pub delivered: AtomicU64,
    pub own_skipped: AtomicU64,
    pub unmappable: AtomicU64,
}

/// Runs one reader per import subject until `shutdown`.
pub async fn run(
    settings: DownlinkSettings,
    client: async_nats::Client,
    publisher: LocalPublisher,
    status: Arc<DownlinkStatus>,
    shutdown: CancellationToken,
) {
    let publisher = Arc::new(Mutex::new(publisher));
    let tracker = TaskTracker::new();
    let subjects: Vec<String> = settings
        .imports
        .iter()
        .flat_map(|f| f.to_subjects(&settings.subject_prefix))
        .collect();
    for subject in subjects {
        let reader = Reader {
            settings: settings.clone(),
            client: client.clone(),
            publisher: publisher.clone(),
            status: status.clone(),
            subject,
        };
        let shutdown = shutdown.clone();
        tracker.spawn(async move { reader.run(shutdown).await });
    }
    tracker.close();
    tracker.wait().await;
    tracing::debug!("downlink stopped");
}

struct Reader {
    settings: DownlinkSettings,
    client: async_nats::Client,
    publisher: Arc<Mutex<LocalPublisher>>,
    status: Arc<DownlinkStatus>,
    subject: String,
}

impl Reader {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut last_error = String::new();
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.read() => r,
            };
            if let Err(error) = result {
                let text = error.to_string();
                if text != last_error {
                    tracing::warn!(%error, subject = self.subject, "import paused; will retry");
                    last_error = text;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Reads until an error.
    async fn read(&self) -> Result<(), DownlinkError> {
        if self.settings.mode == UplinkMode::Jetstream {
            let js = jetstream::new(self.client.clone());
            if let Some((stream, replicas)) = &self.settings.create_stream {
                uplink::ensure_stream(&js, stream, &self.settings.subject_prefix, *replicas)
                    .await
                    .map_err(|e| DownlinkError::Hub(e.to_string()))?;
            }
            match js.stream_by_subject(self.subject.clone()).await {
                Ok(stream) => return self.read_durable(&js, &stream).await,
                Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                    tracing::info!(
                        subject = self.subject,
                        "no hub stream captures this import; subscribing without persistence"
                    );
                }
                Err(e) => return Err(DownlinkError::Hub(e.to_string())),
            }
        }
        self.read_core().await
    }

    async fn read_durable(
        &self,
        js: &jetstream::Context,
        stream: &str,
    ) -> Result<(), DownlinkError> {
        let hub = |e: &dyn std::fmt::Display| DownlinkError::Hub(e.to_string());
        let stream = js.get_stream(stream).await.map_err(|e| hub(&e))?;
        let name = consumer_name(&self.settings.relay, &self.subject);
        let consumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.subject.clone(),
                    deliver_policy: jetstream::consumer::DeliverPolicy::New,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| hub(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| hub(&e))?;
        tracing::info!(
            subject = self.subject,
            consumer = name,
            "import reading from hub stream"
        );
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| hub(&e))?;
            self.deliver(
                &message.subject,
                message.headers.as_ref(),
                message.payload.clone(),
            )
            .await?;
            message.ack().await.map_err(|e| hub(&e))?;
        }
        Err(DownlinkError::Hub("the hub ended the consumer".into()))
    }

    async fn read_core(&self) -> Result<(), DownlinkError> {
        let mut subscription = self
            .client
            .subscribe(self.subject.clone())
            .await
            .map_err(|e| DownlinkError::Hub(e.to_string()))?;
        while let Some(message) = subscription.next().await {
            self.deliver(&message.subject, message.headers.as_ref(), message.payload)
                .await?;
        }
        Err(DownlinkError::Hub("the subscription ended".into()))
    }

    async fn deliver(
        &self,
        subject: &str,
        headers: Option<&async_nats::HeaderMap>,
        payload: bytes::Bytes,
    ) -> Result<(), DownlinkError> {
        let own = headers
            .and_then(|h| h.get(ORIGIN_HEADER))
            .is_some_and(|v| v.as_str() == self.settings.relay);
        if own {
            self.status.own_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let topic = match mapping::subject_to_topic(&self.settings.subject_prefix, subject) {
            Ok(topic) => topic,
            Err(error) => {
                self.status.unmappable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "hub message has no MQTT topic; skipped");
                return Ok(());
            }
        };
        // Retained where it was published (`Relaybox-Retain`), retained here too.
        let retain = headers
            .and_then(|h| h.get(RETAIN_HEADER))
            .is_some_and(|v| v.as_str() == "true");
        self.publisher
            .lock()
            .await
            .publish(&topic, payload, retain)
            .await
            .map_err(|e| DownlinkError::Local(e.to_string()))?;
        self.status.delivered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A durable consumer name for one relay and subject: NATS names may not hold `.`, `*` or `>`,
/// so the subject is represented by a hash (FNV-1a, stable across builds).
fn consumer_name(relay: &str, subject: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subject.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("relaybox-{relay}-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::consumer_name;

    #[test]
    fn consumer_names_are_stable_and_valid() {
        let a = consumer_name("office-1", "org.cmd.>");
        assert_eq!(a, consumer_name("office-1", "org.cmd.>"));
        assert_ne!(a, consumer_name("office-1", "org.cmd"));
        assert!(!a.contains(['.', '*', '>', ' ']));
    }
}
