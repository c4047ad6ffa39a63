//! The uplink: outbox → NATS hub.
//!
//! It reads the outbox in sequence order and publishes each record to
//! `<subject_prefix>.<mapped topic>`:
//! - **jetstream** mode: JetStream publish with `Nats-Msg-Id: <relay>-<epoch>-<seq>`, up to
//!   `window` publishes awaiting their PubAck. A record is deleted from the outbox only after
//!   its PubAck. On any failure (hub down, timeout, no stream) the in-flight publishes are
//!   abandoned and, after a backoff, sending starts again from the oldest record still in the
//!   outbox; the hub drops what it already has by its message id.
//! - **core** mode: plain publish, then flush, then delete: at-most-once once the bytes have
//!   left the socket (a hub that restarts at that moment loses them).
//!
//! Every message carries `Relaybox-Origin: <relay>`, which the downlink uses to skip the relay's
//! own messages when they come back down, and the MQTT 5 user properties as headers.
//!
//! *Architecture invariant:* a record leaves the outbox only after the hub acknowledged it.
//! The uplink is the only writer to the hub (with the downlink, the only users of async-nats).

use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures::stream::FuturesOrdered;
use futures::{Future, StreamExt};
use tokio_util::sync::CancellationToken;

mod batch;

use crate::config::{Secret, UplinkMode};
use crate::liveness::Heartbeat;
use crate::mapping;
use crate::store::{OutboxRecord, Store, StoreError};
use std::path::PathBuf;

/// The header naming the relay a message came from.
pub const ORIGIN_HEADER: &str = "Relaybox-Origin";
/// `true` on a message its publisher retained: a relay that imports it keeps it as the topic's
/// retained message too.
pub const RETAIN_HEADER: &str = "Relaybox-Retain";
/// How long the hub may take to acknowledge a publish.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stream created by the relay remembers message ids for de-duplication.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest pause between attempts while the hub refuses to store or denies a subject.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The longest pause between attempts for troubles that pass by themselves.
const RETRY_MAX: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_millis(250);
/// The pause before sending again when a resend met its first copy still being stored.
const IN_PROCESS_PAUSE: Duration = Duration::from_millis(10);
/// How many such quick retries in a row before the usual pauses.
const IN_PROCESS_QUICK: u32 = 5;
/// How long the uplink asks whether a stream that took no message exists.
const STREAM_CHECK: Duration = Duration::from_secs(2);
/// How often an idle hub connection is checked: two unanswered pings close it, so a link
/// that went silent without a reset is given up within half a minute even with nothing to send.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// When the pump (re)starts, records accepted this recently are live, not backlog: they were
/// published while the uplink was reconnecting or retrying, not during the outage.
const LIVE_HORIZON: Duration = Duration::from_secs(5);
/// How far back from the newest record the live boundary is looked for.
const LIVE_SCAN_MAX: usize = 4096;
/// Acknowledged records are deleted in batches of this many, or after [`DELETE_EVERY`]: every
/// delete is a store commit, and at low rates one per message would double what the store
/// writes to flash. A delete that is late only means a resend after a crash, which the hub
/// drops as a duplicate.
const DELETE_BATCH: usize = 128;
const DELETE_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("the hub url {url:?} is not valid: {reason}")]
    Url { url: String, reason: String },
    #[error("the hub did not acknowledge: {0}")]
    Publish(String),
    #[error("the hub did not acknowledge within {ACK_TIMEOUT:?}")]
    TimedOut,
    #[error("the hub refused to store a message: {reason}")]
    Rejected { reason: String },
    /// A resend met its first copy still being stored (replicated): retried almost at once.
    #[error("the hub is still storing the first copy of a message sent again")]
    InProcess,
    #[error("cannot set up stream {stream:?} on the hub: {reason}")]
    Stream { stream: String, reason: String },
    #[error("no stream on the hub captures {subject:?}: create one, or set create_stream = true")]
    NoStream { subject: String },
    #[error("cannot use hub credentials {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error("the hub connection was lost")]
    Disconnected,
    /// The hub takes one message at a time (no fast-ingest batches): not a failure. `rewind`:
    /// what the batch pump read was not stored, and is read again.
    #[error("the hub does not take fast-ingest batches")]
    NotBatched { rewind: bool },
    #[error("flushing to the hub failed: {0}")]
    Flush(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the uplink needs to know.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    pub relay: String,
    /// The hub's servers (one, or several of a cluster).
    pub urls: Vec<String>,
    /// The replica count of the stream the relay creates.
    pub replicas: usize,
    pub subject_prefix: String,
    pub mode: UplinkMode,
    pub stream: String,
    pub create_stream: bool,
    pub window: usize,
    /// Cap on the backlog drain (live records are never held back).
    pub drain_rate: Option<DrainRate>,
    pub security: HubSecurity,
}

/// How the relay proves itself to the hub and checks the hub.
#[derive(Debug, Clone, Default)]
pub struct HubSecurity {
    /// Use TLS (a `tls://` url, a CA file or a client certificate asks for it).
    pub require_tls: bool,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub credentials_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub user_password: Option<(String, Secret)>,
    pub token: Option<Secret>,
}

/// The uplink's state and counters.
#[derive(Debug, Default)]
pub struct UplinkStatus {
    pub connected: AtomicBool,
    /// When the link last went up or down, in ms since the Unix epoch (0: not since start).
    pub changed_unix_ms: AtomicU64,
    pub published: AtomicU64,
    pub acknowledged: AtomicU64,
    pub duplicates: AtomicU64,
    /// Whether the uplink publishes in fast-ingest batches (else one message at a time).
    pub batched: AtomicBool,
    /// Whether the reason for publishing one message at a time was logged (it is said once).
    told_single: AtomicBool,
    pub failures: AtomicU64,
    pub unmappable: AtomicU64,
    /// Sum and count of PubAck round trips, in microseconds, and the last one.
    pub ack_latency_us_sum: AtomicU64,
    pub ack_latency_count: AtomicU64,
    pub ack_latency_us_last: AtomicU64,
    /// Errors the hub answered with, per [`HubTrouble`], and the kind last logged.
    pub hub_errors: [AtomicU64; HubTrouble::ALL.len()],
    trouble: std::sync::Mutex<Option<HubTrouble>>,
    /// The hub link: when it was last (re)established (ms since the Unix epoch), or `None` while
    /// it is down. The pump waits for it, stops when it drops, and draws the line between
    /// backlog and live records by it.
    link: tokio::sync::watch::Sender<Option<u64>>,
}

/// What kind of trouble the hub is in, as the relay sees it. Each is counted; each is logged
/// (with what to do about it) when it starts, not again while it lasts, and its end is logged
/// when the hub stores a message again. Nothing leaves the outbox meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubTrouble {
    /// No stream captures the relay's subjects (deleted, or never made).
    NoStream,
    /// The hub refused to store: the stream's or the account's limits, or its storage, is full.
    Limits,
    /// The hub's permissions deny the relay's user (a subject, or its credentials).
    Permissions,
    /// No acknowledgement in time: a stalled hub or a link that stopped passing data.
    Timeout,
    /// Anything else the hub or the link answered.
    Other,
}

impl HubTrouble {
    pub const ALL: [HubTrouble; 5] = [
        HubTrouble::NoStream,
        HubTrouble::Limits,
        HubTrouble::Permissions,
        HubTrouble::Timeout,
        HubTrouble::Other,
    ];

    /// The label in `/status` and `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            HubTrouble::NoStream => "no_stream",
            HubTrouble::Limits => "limits",
            HubTrouble::Permissions => "permissions",
            HubTrouble::Timeout => "timeout",
            HubTrouble::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl UplinkStatus {
    /// Counts `kind`, and logs `error` with `what_to_do` if it is not the trouble already said.
    /// Timeouts while the hub denies permissions are that denial's doing: counted, not said.
    fn report(&self, kind: HubTrouble, error: &str, what_to_do: &str) {
        self.hub_errors[kind.index()].fetch_add(1, Ordering::Relaxed);
        let mut said = self
            .trouble
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *said == Some(kind)
            || (kind == HubTrouble::Timeout && *said == Some(HubTrouble::Permissions))
        {
            return;
        }
        *said = Some(kind);
        tracing::warn!(trouble = kind.label(), %error, "{what_to_do}");
    }

    /// The hub stored a message: the trouble said, if any, is over.
    fn accepted(&self) {
        let mut said = self
            .trouble
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(kind) = said.take() {
            tracing::info!(trouble = kind.label(), "the hub stores messages again");
        }
    }

    fn in_trouble(&self, kind: HubTrouble) -> bool {
        *self
            .trouble
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == Some(kind)
    }

    fn record_ack_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.ack_latency_us_sum.fetch_add(us, Ordering::Relaxed);
        self.ack_latency_count.fetch_add(1, Ordering::Relaxed);
        self.ack_latency_us_last.store(us, Ordering::Relaxed);
    }
}

/// Connects to the hub. Returns at once: the client keeps (re)connecting in the background,
/// and `status.connected` follows its state.
pub async fn connect(
    settings: &UplinkSettings,
    status: Arc<UplinkStatus>,
) -> Result<async_nats::Client, UplinkError> {
    let mut servers = Vec::with_capacity(settings.urls.len());
    for url in &settings.urls {
        let server = url
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| UplinkError::Url {
                // A password in the url is not repeated in the error.
                url: crate::config::shown_url(url),
                reason: e.to_string(),
            })?;
        servers.push(server);
    }
    let shown = settings
        .urls
        .iter()
        .map(|u| crate::config::shown_url(u))
        .collect::<Vec<_>>()
        .join(", ");
    let events = status.clone();
    let prefix = settings.subject_prefix.clone();
    let sec = &settings.security;
    let mut options = async_nats::ConnectOptions::new();
    if let Some(path) = &sec.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| UplinkError::Credentials {
                path: path.clone(),
                reason: e.kind().to_string(),
            })?;
    }
    if let Some(path) = &sec.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|e| UplinkError::Credentials {
            path: path.clone(),
            reason: e.kind().to_string(),
        })?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some((user, password)) = &sec.user_password {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &sec.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(ca) = &sec.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &sec.client_cert {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if sec.require_tls {
        options = options.require_tls(true);
    }
    options
        .name(format!("relaybox-{}", settings.relay))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .ping_interval(PING_INTERVAL)
        .event_callback(move |event| {
            let status = events.clone();
            let prefix = prefix.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        if !status.connected.swap(true, Ordering::Relaxed) {
                            status.changed_unix_ms.store(unix_ms(), Ordering::Relaxed);
                            tracing::info!("hub connected");
                        }
                        status.link.send_replace(Some(unix_ms()));
                    }
                    async_nats::Event::Disconnected => {
                        if status.connected.swap(false, Ordering::Relaxed) {
                            status.changed_unix_ms.store(unix_ms(), Ordering::Relaxed);
                            tracing::warn!("hub disconnected; keeping messages in the outbox");
                        }
                        status.link.send_replace(None);
                    }
                    async_nats::Event::ServerError(error) => {
                        server_error(&status, &prefix, &error);
                    }
                    // Said on every reconnect attempt: the disconnection itself was logged once.
                    async_nats::Event::ClientError(error) => {
                        tracing::debug!(%error, "hub connection error");
                    }
                    other => tracing::debug!(event = %other, "hub connection event"),
                }
            }
        })
        .connect(servers)
        .await
        .map_err(|e| UplinkError::Url {
            url: shown,
            reason: e.to_string(),
        })
}

/// Sorts an error the hub sent on the connection (`-ERR`) into its trouble.
fn server_error(status: &UplinkStatus, prefix: &str, error: &async_nats::ServerError) {
    let text = error.to_string();
    match error {
        async_nats::ServerError::AuthorizationViolation => status.report(
            HubTrouble::Permissions,
            &text,
            "the hub refused the relay's credentials: check [uplink] credentials, nkey_seed, \
             user/password or token against the hub's accounts; the relay keeps the messages and \
             retries",
        ),
        _ if text.to_ascii_lowercase().contains("permissions violation") => status.report(
            HubTrouble::Permissions,
            &text,
            &format!(
                "the hub denies the relay's user a subject: allow it to publish to \"{prefix}.>\" \
                 and to subscribe to \"_INBOX.>\" (the acknowledgements) in the hub's \
                 permissions; the relay keeps the messages and retries"
            ),
        ),
        _ => tracing::warn!(%error, "hub reported an error"),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long to wait before reconnect attempt `attempts` (1-based): at once, then 100 ms and
/// 200 ms, then every 250 ms (a leaf node retries its hub every second). The hub is the organisation's own,
/// and every moment of delay after it is back is backlog waiting and live latency.
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(4);
    (BACKOFF_MIN * 2u32.pow(doublings)).min(RECONNECT_MAX)
}

/// Publishes the relay's status (`make` builds the encoded message) to
/// `<subject_prefix>.$relay.status` every `interval` until `shutdown`. Best effort: a status
/// that cannot be sent is skipped, never kept.
pub async fn publish_status(
    client: async_nats::Client,
    relay: String,
    subject_prefix: String,
    interval: Duration,
    make: impl Fn() -> Vec<u8> + Send,
    shutdown: CancellationToken,
) {
    let subject = format!("{subject_prefix}.$relay.status");
    // The relay name is checked at config load to be letters, digits, '-' and '_'.
    let origin = relay;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN_HEADER, origin.as_str());
        if let Err(error) = client
            .publish_with_headers(subject.clone(), headers, make().into())
            .await
        {
            tracing::debug!(%error, "status not sent");
        }
    }
}

/// Runs until `shutdown`; what is not acknowledged by then stays in the outbox.
pub async fn run(
    settings: UplinkSettings,
    client: async_nats::Client,
    store: Store,
    status: Arc<UplinkStatus>,
    shutdown: CancellationToken,
) {
    let heartbeat = Heartbeat::unwatched("uplink");
    run_with_heartbeat(settings, client, store, status, shutdown, heartbeat).await;
}

/// As [`run`], beating `heartbeat` while it runs, also while it waits for the hub or backs
/// off (waiting for the hub is alive), so that an uplink task that died or cannot be run shows
/// as a stall.
pub async fn run_with_heartbeat(
    settings: UplinkSettings,
    client: async_nats::Client,
    store: Store,
    status: Arc<UplinkStatus>,
    shutdown: CancellationToken,
    heartbeat: Heartbeat,
) {
    let mut js = jetstream::new(client.clone());
    js.set_timeout(ACK_TIMEOUT);
    let creates_stream = settings.create_stream && settings.mode == UplinkMode::Jetstream;
    let mut stream_ready = !creates_stream;
    let mut backoff = BACKOFF_MIN;
    let mut in_process_streak = 0u32;
    // Acknowledged records not yet deleted; kept here so that a shutdown deletes them too.
    let mut acked: Vec<u64> = Vec::with_capacity(DELETE_BATCH);
    loop {
        let acked = &mut acked;
        let mut link = status.link.subscribe();
        let attempt = async {
            // Nothing is sent while the hub is away: what is accepted meanwhile is backlog.
            let connected_at = link
                .wait_for(|l| l.is_some())
                .await
                .ok()
                .and_then(|l| *l)
                .unwrap_or(0);
            if !stream_ready {
                ensure_stream(
                    &js,
                    &settings.stream,
                    &settings.subject_prefix,
                    settings.replicas,
                )
                .await?;
                tracing::info!(stream = settings.stream, "hub stream ready");
                stream_ready = true;
            }
            match settings.mode {
                UplinkMode::Jetstream => {
                    let new_cursors = || Cursors::new(&store, settings.drain_rate, connected_at);
                    let mut cursors = new_cursors().await?;
                    // Every run tries batches first (the hub may have been upgraded, or its
                    // stream made again with other settings, since the last).
                    let result =
                        batch::pump(&settings, &client, &store, &status, acked, &mut cursors).await;
                    // What the hub confirmed is deleted whatever ended the run.
                    store.delete(std::mem::take(acked))?;
                    let Err(UplinkError::NotBatched { rewind }) = result else {
                        return result;
                    };
                    // The same run goes on one message at a time, from where the batch pump
                    // stopped (or from the start, when nothing it sent was stored).
                    if rewind {
                        cursors = new_cursors().await?;
                    }
                    status.batched.store(false, Ordering::Relaxed);
                    pump_jetstream(&settings, &js, &store, &status, acked, &mut cursors).await
                }
                UplinkMode::Core => {
                    pump_core(&settings, &client, &store, &status, connected_at).await
                }
            }
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = heartbeat.beat_while(attempt) => r,
        };
        if let Err(UplinkError::Disconnected) = result {
            // Logged by the connection's event handler; the next attempt waits for the hub.
            continue;
        }
        let in_process = matches!(result, Err(UplinkError::InProcess));
        in_process_streak = if in_process { in_process_streak + 1 } else { 0 };
        if in_process && in_process_streak <= IN_PROCESS_QUICK {
            // Not a trouble: the first copy is about to be stored (after a failover, say). A
            // few quick retries, then the usual pauses.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(IN_PROCESS_PAUSE) => {}
            }
            continue;
        }
        if let Err(error) = result {
            status.failures.fetch_add(1, Ordering::Relaxed);
            match &error {
                // No server took the message: the stream is gone, or it is there without a
                // leader (a cluster electing one after losing a node), which is not said as
                // "gone" and does not make the relay create it.
                UplinkError::NoStream { subject } if stream_exists(&js, subject).await => status
                    .report(
                        HubTrouble::NoStream,
                        &error.to_string(),
                        "the hub stream exists but none of its servers took the message (a \
                         cluster electing the stream's leader after losing a node); retrying",
                    ),
                UplinkError::NoStream { .. } if creates_stream => {
                    status.report(
                        HubTrouble::NoStream,
                        &error.to_string(),
                        &format!(
                            "the hub stream {:?} is gone; creating it again (set \
                             create_stream = false if the hub's administrators make it)",
                            settings.stream
                        ),
                    );
                    stream_ready = false;
                }
                UplinkError::NoStream { .. } => status.report(
                    HubTrouble::NoStream,
                    &error.to_string(),
                    "uplink paused: the relay keeps the messages and retries until the stream exists",
                ),
                UplinkError::Rejected { .. } => status.report(
                    HubTrouble::Limits,
                    &error.to_string(),
                    "the hub refused to store: raise the stream's or the account's JetStream \
                     limits on the hub, or free its storage; the relay keeps the messages and \
                     retries",
                ),
                UplinkError::TimedOut => {
                    let denied = status.in_trouble(HubTrouble::Permissions);
                    status.report(
                        HubTrouble::Timeout,
                        &error.to_string(),
                        "the hub stopped answering (stalled, or the link passes no data); \
                         connecting again, to another of its servers if it has several",
                    );
                    // A connection that passes no answers is given up at once, not after the
                    // pings fail: the next one may be to a server that answers. A denied
                    // subject is never answered either, and reconnecting does not help it.
                    if !denied {
                        let _ = client.force_reconnect().await;
                    }
                }
                UplinkError::Stream { reason, .. } if reason.contains("timed out") => {
                    status.report(
                        HubTrouble::Timeout,
                        &error.to_string(),
                        "the hub's JetStream did not answer; connecting again, to another of \
                         its servers if it has several",
                    );
                    let _ = client.force_reconnect().await;
                }
                _ => status.report(
                    HubTrouble::Other,
                    &error.to_string(),
                    "uplink paused; will retry",
                ),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = heartbeat.beat_while(tokio::time::sleep(backoff)) => {}
            }
            // What the hub's administrators must fix is retried less often than what passes
            // by itself (an election, a restart), which is retried within half a second.
            let fix_needed = matches!(error, UplinkError::Rejected { .. })
                || status.in_trouble(HubTrouble::Permissions);
            let most = if fix_needed { BACKOFF_MAX } else { RETRY_MAX };
            backoff = (backoff * 2).min(most);
        } else {
            backoff = BACKOFF_MIN;
        }
    }
    let _ = store.delete(acked);
    tracing::debug!("uplink stopped");
}

/// Whether the hub has a stream that captures `subject` (asked of its JetStream API, which
/// answers while a stream is without a leader).
async fn stream_exists(js: &jetstream::Context, subject: &str) -> bool {
    matches!(
        tokio::time::timeout(STREAM_CHECK, js.stream_by_subject(subject)).await,
        Ok(Ok(_))
    )
}

/// Creates the hub stream `name` over `<subject_prefix>.>` unless it exists.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subject_prefix: &str,
    replicas: usize,
) -> Result<(), UplinkError> {
    let config = stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{subject_prefix}.>")],
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        // Fast-ingest batches (nats-server 2.14 and later; older servers ignore it).
        allow_batch_publish: true,
        ..Default::default()
    };
    let mut stream =
        js.get_or_create_stream(config.clone())
            .await
            .map_err(|e| UplinkError::Stream {
                stream: name.to_owned(),
                reason: e.to_string(),
            })?;
    // A stream that was already there is used as it is; what differs from what the relay
    // would have made is said once (per difference), not at every reconnect.
    if let Ok(info) = stream.info().await {
        let have = &info.config;
        let mut differs = Vec::new();
        if have.num_replicas != config.num_replicas {
            differs.push(format!(
                "{} replicas, not {}",
                have.num_replicas, config.num_replicas
            ));
        }
        if have.duplicate_window < config.duplicate_window {
            differs.push(format!(
                "a duplicate window of {:?}, shorter than {:?} (a message sent again after a \
                 reconnection may be stored twice)",
                have.duplicate_window, config.duplicate_window
            ));
        }
        if have.storage != config.storage {
            differs.push("memory storage, not file storage".to_owned());
        }
        let said = differs.join("; ");
        let mut last = STREAM_DIFFERENCES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !said.is_empty() && *last != said {
            tracing::warn!(
                stream = name,
                differences = %said,
                "the hub stream exists with other settings than relaybox would give it; using it as it is"
            );
        }
        *last = said;
    }
    tracing::debug!(stream = name, "hub stream ready");
    Ok(())
}

/// The differences of an existing hub stream last logged.
static STREAM_DIFFERENCES: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

type AckFuture = Pin<
    Box<
        dyn Future<
                Output = (
                    u64,
                    bool,
                    tokio::time::Instant,
                    Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
                ),
            > + Send,
    >,
>;

/// Which records to send next: live ones first, then the backlog in the room that is left.
///
/// Records accepted while the hub link is down are backlog; records accepted since it came up
/// are live. When the pump starts (at start-up, on reconnection, or again after a failure while
/// connected), the records accepted since the link came up, looking back at most
/// [`LIVE_HORIZON`], and every record appended from then on are live; the older ones are
/// backlog. Within the live records and within the backlog the order is the
/// outbox order; a live record may overtake older backlog records, also of the same topic.
struct Cursors {
    /// The first live sequence.
    live_from: u64,
    /// The last live record handed to the hub.
    live: u64,
    /// The last backlog record handed to the hub.
    backlog: u64,
    drain: Option<DrainLimiter>,
}

impl Cursors {
    async fn new(
        store: &Store,
        drain: Option<DrainRate>,
        connected_at: u64,
    ) -> Result<Cursors, UplinkError> {
        let horizon = unix_ms().saturating_sub(LIVE_HORIZON.as_millis() as u64);
        let since = horizon.max(connected_at);
        let live_from = store.first_recent(since, LIVE_SCAN_MAX).await?;
        Ok(Cursors {
            live_from,
            live: live_from.saturating_sub(1),
            backlog: 0,
            drain: drain.map(DrainLimiter::new),
        })
    }

    fn backlog_left(&self) -> bool {
        self.backlog + 1 < self.live_from
    }

    /// Up to `room` records: live first, then backlog records within the drain rate: at most
    /// `quiet_room` of them when there was no live record, else at most `busy_room`. Returns
    /// the records and how many of them (the last ones) are backlog.
    async fn next(
        &mut self,
        store: &Store,
        room: usize,
        quiet_room: usize,
        busy_room: usize,
    ) -> Result<(Vec<(u64, OutboxRecord)>, usize), UplinkError> {
        let mut out = store.read_after(self.live, room).await?;
        if let Some((seq, _)) = out.last() {
            self.live = *seq;
        }
        let backlog_room = if out.is_empty() {
            quiet_room
        } else {
            busy_room
        };
        let room = (room - out.len()).min(backlog_room);
        let mut from_backlog = 0;
        if room > 0 && self.backlog_left() {
            let allowed = self.drain.as_mut().map_or(room, |d| d.available(room));
            if allowed > 0 {
                let backlog = store
                    .read_between(self.backlog, self.live_from, allowed)
                    .await?;
                match backlog.last() {
                    Some((seq, _)) => self.backlog = *seq,
                    // Nothing left below the live boundary (dropped or acknowledged).
                    None => self.backlog = self.live_from.saturating_sub(1),
                }
                if let Some(d) = self.drain.as_mut() {
                    d.spend(&backlog);
                }
                from_backlog = backlog.len();
                out.extend(backlog);
            }
        }
        Ok((out, from_backlog))
    }

    /// How long to wait for more to send when nothing was ready.
    fn pause(&self) -> Duration {
        match &self.drain {
            Some(d) if self.backlog_left() => d.until_next().min(IDLE_WAIT),
            _ => IDLE_WAIT,
        }
    }
}

/// How long the pump waits for new records when it has nothing to do.
const IDLE_WAIT: Duration = Duration::from_millis(250);
/// The window is refilled once this many places are free (or new records came, or nothing is
/// in flight), so that reading the outbox is done in batches.
const REFILL_AT: usize = 32;

/// While live records flow, at most this share of the window (1/n) carries backlog: the hub
/// stores a connection's publishes in order, so a live record waits behind every backlog
/// publish in flight. With no live record in flight or waiting, the backlog may fill the window.
const BACKLOG_SHARE: usize = 4;

/// The backlog drain cap: `[uplink] drain_rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DrainRate {
    MessagesPerSecond(f64),
    BytesPerSecond(f64),
}

impl DrainRate {
    /// Parses `"200 msg/s"`, `"64 KiB/s"`, `"1 MiB/s"`, `"500 B/s"`.
    pub fn parse(text: &str) -> Result<DrainRate, String> {
        let bad = || {
            format!("drain rate {text:?} must look like \"200 msg/s\", \"500 B/s\", \"64 KiB/s\" or \"1 MiB/s\"")
        };
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (n, unit) = t.split_at(split);
        let n: f64 = n.parse().map_err(|_| bad())?;
        if n <= 0.0 || !n.is_finite() {
            return Err(bad());
        }
        Ok(match unit.trim() {
            "msg/s" => DrainRate::MessagesPerSecond(n),
            "B/s" => DrainRate::BytesPerSecond(n),
            "KiB/s" => DrainRate::BytesPerSecond(n * 1024.0),
            "MiB/s" => DrainRate::BytesPerSecond(n * 1024.0 * 1024.0),
            _ => return Err(bad()),
        })
    }
}

/// A token bucket holding at most one second of the rate.
struct DrainLimiter {
    rate: DrainRate,
    tokens: f64,
    last: tokio::time::Instant,
}

impl DrainLimiter {
    fn new(rate: DrainRate) -> DrainLimiter {
        DrainLimiter {
            rate,
            tokens: 0.0,
            last: tokio::time::Instant::now(),
        }
    }

    fn per_second(&self) -> f64 {
        match self.rate {
            DrainRate::MessagesPerSecond(n) | DrainRate::BytesPerSecond(n) => n,
        }
    }

    fn refill(&mut self) {
        let now = tokio::time::Instant::now();
        let rate = self.per_second();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
    }

    /// How many records may be read now (for a byte rate: as long as any budget is left,
    /// records are read one at a time and paid for after).
    fn available(&mut self, room: usize) -> usize {
        self.refill();
        match self.rate {
            DrainRate::MessagesPerSecond(_) => (self.tokens.floor() as usize).min(room),
            DrainRate::BytesPerSecond(_) => usize::from(self.tokens >= 1.0).min(room),
        }
    }

    fn spend(&mut self, records: &[(u64, OutboxRecord)]) {
        self.tokens -= match self.rate {
            DrainRate::MessagesPerSecond(_) => records.len() as f64,
            DrainRate::BytesPerSecond(_) => records
                .iter()
                .map(|(_, r)| (r.payload.len() + r.topic.len()) as f64)
                .sum(),
        };
    }

    fn until_next(&self) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / self.per_second()).max(Duration::from_millis(1))
    }
}

/// Publishes until an error; returns only with one (shutdown is handled by the caller).
async fn pump_jetstream(
    s: &UplinkSettings,
    js: &jetstream::Context,
    store: &Store,
    status: &UplinkStatus,
    acked: &mut Vec<u64>,
    cursors: &mut Cursors,
) -> Result<(), UplinkError> {
    let mut link = status.link.subscribe();
    let mut inflight: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    let mut inflight_backlog = 0usize;
    let mut first_acked = tokio::time::Instant::now();
    let backlog_cap = (s.window / BACKLOG_SHARE).max(1);
    let epoch = store.epoch();
    let mut fresh = true;
    loop {
        let room = s.window - inflight.len();
        if room > 0 && (fresh || room >= REFILL_AT.min(s.window) || inflight.is_empty()) {
            fresh = false;
            // With live records in flight or waiting, the backlog keeps to its share of the
            // window; with none, it may fill the window (a live record that comes meanwhile
            // waits behind at most one window).
            let live_inflight = inflight.len() - inflight_backlog;
            let busy = backlog_cap.saturating_sub(inflight_backlog);
            let quiet = if live_inflight == 0 { room } else { busy };
            let (records, from_backlog) = cursors.next(store, room, quiet, busy).await?;
            let first_backlog = records.len() - from_backlog;
            for (i, (seq, record)) in records.into_iter().enumerate() {
                let is_backlog = i >= first_backlog;
                let Some((subject, headers)) = prepare(s, store, status, seq, &record) else {
                    continue;
                };
                let mut headers = headers;
                headers.insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    format!("{}-{}-{}", s.relay, epoch, seq).as_str(),
                );
                let publish = jetstream::message::PublishMessage::build()
                    .payload(record.payload)
                    .headers(headers);
                let future = js
                    .send_publish(subject, publish)
                    .await
                    .map_err(|e| UplinkError::Publish(e.to_string()))?;
                status.published.fetch_add(1, Ordering::Relaxed);
                if is_backlog {
                    inflight_backlog += 1;
                }
                let sent = tokio::time::Instant::now();
                inflight.push_back(Box::pin(
                    async move { (seq, is_backlog, sent, future.await) },
                ));
            }
        }
        if inflight.is_empty() {
            idle(store, cursors, acked, first_acked).await?;
            fresh = true;
            continue;
        }
        let waiting_room = inflight.len() < s.window;
        tokio::select! {
            done = inflight.next() => {
                let Some((seq, was_backlog, sent, result)) = done else { continue };
                if was_backlog {
                    inflight_backlog -= 1;
                }
                match result {
                    Ok(ack) => {
                        if ack.duplicate {
                            status.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        status.acknowledged.fetch_add(1, Ordering::Relaxed);
                        status.record_ack_latency(sent.elapsed());
                        if acked.is_empty() {
                            status.accepted();
                        }
                        if acked.is_empty() {
                            first_acked = tokio::time::Instant::now();
                        }
                        acked.push(seq);
                        if acked.len() >= DELETE_BATCH || first_acked.elapsed() >= DELETE_EVERY {
                            store.delete(std::mem::take(acked))?;
                        }
                    }
                    Err(e) => {
                        store.delete(std::mem::take(acked))?;
                        return Err(publish_error(s, &e));
                    }
                }
            }
            _ = store.wait_for_records(cursors.pause()), if waiting_room => fresh = true,
            _ = link.wait_for(|l| l.is_none()) => {
                // What is in flight may or may not have reached the hub: it stays in the
                // outbox and is sent again, and the hub drops what it has by message id.
                store.delete(std::mem::take(acked))?;
                return Err(UplinkError::Disconnected);
            }
        }
    }
}

/// With nothing in flight: waits for new records (or the drain rate's next token), at most
/// until the acknowledged records (`acked`, the first at `first_acked`) are due for deletion,
/// and deletes them when they are.
async fn idle(
    store: &Store,
    cursors: &Cursors,
    acked: &mut Vec<u64>,
    first_acked: tokio::time::Instant,
) -> Result<(), UplinkError> {
    let pause = if acked.is_empty() {
        cursors.pause()
    } else {
        cursors
            .pause()
            .min(DELETE_EVERY.saturating_sub(first_acked.elapsed()))
    };
    store.wait_for_records(pause).await;
    if !acked.is_empty() && first_acked.elapsed() >= DELETE_EVERY {
        store.delete(std::mem::take(acked))?;
    }
    Ok(())
}

/// The uplink error for a publish the hub did not acknowledge.
fn publish_error(s: &UplinkSettings, e: &jetstream::context::PublishError) -> UplinkError {
    match e.kind() {
        PublishErrorKind::StreamNotFound => {
            return UplinkError::NoStream {
                subject: format!("{}.>", s.subject_prefix),
            }
        }
        PublishErrorKind::TimedOut => return UplinkError::TimedOut,
        _ => {}
    }
    match std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>()) {
        Some(hub) => match hub_code_error(s, hub.error_code(), hub.to_string()) {
            UplinkError::Publish(_) => UplinkError::Publish(e.to_string()),
            other => other,
        },
        None => UplinkError::Publish(e.to_string()),
    }
}

/// The uplink error for a JetStream error code the hub answered a publish with.
fn hub_code_error(s: &UplinkSettings, code: jetstream::ErrorCode, text: String) -> UplinkError {
    use jetstream::ErrorCode;
    match code {
        ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
        | ErrorCode::INSUFFICIENT_RESOURCES
        | ErrorCode::MEMORY_RESOURCES_EXCEEDED
        | ErrorCode::STORAGE_RESOURCES_EXCEEDED
        | ErrorCode::STREAM_STORE_FAILED
        | ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => UplinkError::Rejected { reason: text },
        ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT => UplinkError::InProcess,
        ErrorCode::STREAM_NOT_FOUND => UplinkError::NoStream {
            subject: format!("{}.>", s.subject_prefix),
        },
        _ => UplinkError::Publish(text),
    }
}

async fn pump_core(
    s: &UplinkSettings,
    client: &async_nats::Client,
    store: &Store,
    status: &UplinkStatus,
    connected_at: u64,
) -> Result<(), UplinkError> {
    let mut cursors = Cursors::new(store, s.drain_rate, connected_at).await?;
    loop {
        let (records, _) = cursors.next(store, s.window, s.window, s.window).await?;
        if records.is_empty() {
            store.wait_for_records(cursors.pause()).await;
            continue;
        }
        let mut sent = Vec::with_capacity(records.len());
        for (seq, record) in records {
            sent.push(seq);
            let Some((subject, headers)) = prepare(s, store, status, seq, &record) else {
                continue;
            };
            client
                .publish_with_headers(subject, headers, record.payload)
                .await
                .map_err(|e| UplinkError::Publish(e.to_string()))?;
            status.published.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::timeout(ACK_TIMEOUT, client.flush())
            .await
            .map_err(|_| UplinkError::Flush("timed out".into()))?
            .map_err(|e| UplinkError::Flush(e.to_string()))?;
        status
            .acknowledged
            .fetch_add(sent.len() as u64, Ordering::Relaxed);
        status.accepted();
        store.delete(sent)?;
    }
}

/// The subject and headers of a record; `None` (and the record dropped, counted) when its
/// topic has no subject.
fn prepare(
    s: &UplinkSettings,
    store: &Store,
    status: &UplinkStatus,
    seq: u64,
    record: &OutboxRecord,
) -> Option<(String, HeaderMap)> {
    let subject = match mapping::topic_to_subject(&s.subject_prefix, &record.topic) {
        Ok(subject) => subject,
        Err(error) => {
            status.unmappable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, seq, "outbox record has no NATS subject; dropping it");
            let _ = store.delete(vec![seq]);
            return None;
        }
    };
    let mut headers = HeaderMap::new();
    if let Ok(origin) = HeaderValue::from_str(&s.relay) {
        headers.insert(ORIGIN_HEADER, origin);
    }
    if record.retain {
        headers.insert(RETAIN_HEADER, "true");
    }
    for h in &record.headers {
        // User properties that cannot be NATS headers (':' or control characters in the
        // name, line breaks in the value) are left out rather than failing the message.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_str(&h.name),
            HeaderValue::from_str(&h.value),
        ) {
            headers.append(name, value);
        }
    }
    Some((subject, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_rates_parse() {
        assert_eq!(
            DrainRate::parse("200 msg/s"),
            Ok(DrainRate::MessagesPerSecond(200.0))
        );
        assert_eq!(
            DrainRate::parse("2KiB/s"),
            Ok(DrainRate::BytesPerSecond(2048.0))
        );
        assert_eq!(
            DrainRate::parse("1 MiB/s"),
            Ok(DrainRate::BytesPerSecond(1048576.0))
        );
        assert_eq!(
            DrainRate::parse("500 B/s"),
            Ok(DrainRate::BytesPerSecond(500.0))
        );
        for bad in ["", "fast", "0 msg/s", "-1 msg/s", "10 msgs", "10"] {
            assert!(DrainRate::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reconnects_are_at_most_a_quarter_second_apart() {
        let delays: Vec<u64> = (1..=7)
            .map(|n| reconnect_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [0, 100, 200, 250, 250, 250, 250]);
        assert_eq!(reconnect_delay(usize::MAX), RECONNECT_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_limiter_keeps_to_its_rate() {
        let mut d = DrainLimiter::new(DrainRate::MessagesPerSecond(100.0));
        let mut taken = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            let n = d.available(1000);
            taken += n;
            d.tokens -= n as f64;
        }
        // Ten seconds at 100 msg/s.
        assert!((990..=1000).contains(&taken), "{taken}");
    }
}
