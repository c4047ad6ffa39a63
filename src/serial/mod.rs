//! Serial ingest: UART and USB-serial ports whose frames become messages.
//!
//! Each `[[serial]]` port runs three parts joined by channels:
//! - the **reader** (an edge: it watches the shutdown token) opens the port, cuts its bytes into
//!   frames ([`codec`]) and, for an exported port, appends each frame to the outbox; it hands
//!   every frame, in order, to the publisher. When the port is missing or goes away (adapter
//!   unplugged) it retries with backoff (0.1 s doubling to 2 s, raced against shutdown) and
//!   logs once per change of state, not per retry.
//! - the **publisher** (an inner stage: it runs until the reader's channel closes) waits until
//!   an exported frame's record is durable, then publishes the frame to the port's topic in the
//!   local router; a frame that is not exported is published at once, behind the ones before it.
//! - the **command forwarder** (with a `command_topic`) frames every message published on that
//!   filter — locally or brought down from the hub by an `[[import]]` — the way the port frames
//!   its input, and writes it to the port. Commands that arrive while the port is absent are
//!   dropped and counted: a device plugged in later should not act on stale commands.
//!
//! Promises:
//! - An exported frame is treated like a QoS 1 PUBLISH: it is seen by local subscribers only
//!   after the outbox commit that holds it, so a frame a subscriber saw survives a crash.
//! - Frames of one port keep their order, locally and at the hub.
//! - Bad input never stops a port: it is dropped, counted per reason (`garbage`, `bad_cobs`,
//!   `overlong`, `partial`) and decoding resynchronises; the counters are logged with each
//!   port's `serial port stopped` line.
//! - A frame the outbox refuses (full under `refuse-new`, a failed commit) is still published
//!   locally — a device cannot be asked to send it again — and counted as `not_exported`.
//!
//! Frames reach the router through an in-process link that bypasses the gate, so the gate's
//! export rules do not apply to them: a port is exported when its `export = true`, or, without
//! an `export` key, when its topic matches an `[[export]]` filter.

pub mod codec;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

use crate::broker::local::{local_subscriber, LocalError, LocalPublisher, LocalSubscriber};
use crate::broker::message::Origin as MessageOrigin;
use crate::broker::router::Router;
use crate::config::{Framing, Parity, SerialConfig};
use crate::mapping::TopicFilter;
use crate::proto::{Origin, OutboxRecord};
use crate::store::{Store, Ticket};
use codec::{Decoder, DropReason, Event};

/// The first wait before opening a missing port again.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two attempts to open a missing port.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Frames read ahead of the publisher (waiting for their commit) per port.
const ACCEPT_QUEUE: usize = 1024;
/// Commands waiting to be written to a port.
const COMMAND_QUEUE: usize = 64;
/// Bytes asked of the port per read.
const READ_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial port {port}: cannot link to the local router: {source}")]
    Link { port: String, source: LocalError },
}

/// What one port's tasks need to know.
#[derive(Debug, Clone)]
pub struct PortSettings {
    pub name: String,
    pub path: PathBuf,
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub framing: Framing,
    pub max_frame: usize,
    /// length-prefixed: silence after which an unfinished frame is dropped.
    pub gap_timeout: Duration,
    pub topic: String,
    pub export: bool,
    pub command_topic: Option<String>,
}

impl PortSettings {
    /// The settings of a `[[serial]]` port; `exports` decide for a port without `export`.
    pub fn from_config(port: &SerialConfig, exports: &[TopicFilter]) -> PortSettings {
        let topic = port.resolved_topic();
        let export = port
            .export
            .unwrap_or_else(|| exports.iter().any(|f| f.matches(&topic)));
        PortSettings {
            name: port.port_name(),
            path: port.path.clone(),
            baud: port.baud,
            data_bits: port.data_bits,
            parity: port.parity,
            stop_bits: port.stop_bits,
            framing: port.framing,
            max_frame: port.max_frame,
            gap_timeout: Duration::from_millis(port.gap_timeout_ms),
            topic,
            export,
            command_topic: port.resolved_command_topic(),
        }
    }
}

/// Counters of one port since start.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Times the port was opened.
    pub opened: AtomicU64,
    /// Whole frames read.
    pub frames: AtomicU64,
    /// Frames handed to the local router.
    pub published: AtomicU64,
    /// Frames durable in the outbox.
    pub exported: AtomicU64,
    /// Frames of an exported port that the outbox refused.
    pub not_exported: AtomicU64,
    pub garbage: AtomicU64,
    pub bad_cobs: AtomicU64,
    pub overlong: AtomicU64,
    pub partial: AtomicU64,
    /// Commands written to the port.
    pub commands: AtomicU64,
    /// Commands dropped: port absent, queue full, or not frameable.
    pub commands_dropped: AtomicU64,
}

impl PortStats {
    fn count_drop(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::Garbage => &self.garbage,
            DropReason::BadCobs => &self.bad_cobs,
            DropReason::Overlong => &self.overlong,
            DropReason::Partial => &self.partial,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The configured ports, linked to the router and ready to run.
pub struct Serial {
    ports: Vec<Port>,
}

struct Port {
    settings: PortSettings,
    stats: Arc<PortStats>,
    publisher: LocalPublisher,
    commands: Option<LocalSubscriber>,
    store: Store,
}

impl Serial {
    /// Makes each port's link into the local router (subscribed to its `command_topic`).
    pub async fn start(
        ports: Vec<PortSettings>,
        router: &Router,
        store: &Store,
    ) -> Result<Serial, SerialError> {
        let mut linked = Vec::with_capacity(ports.len());
        for settings in ports {
            let client_id = format!("relaybox-serial-{}", settings.name);
            let link_err = |source| SerialError::Link {
                port: settings.name.clone(),
                source,
            };
            // QoS 0: a device sends at its own pace, which no subscriber's acknowledgements
            // may slow; exported frames are kept in the outbox, durable before they are
            // published here.
            let publisher = LocalPublisher::new(router, MessageOrigin::Internal).at_qos(0);
            let commands = match &settings.command_topic {
                Some(filter) => Some(
                    local_subscriber(router, &client_id, std::slice::from_ref(filter))
                        .await
                        .map_err(link_err)?,
                ),
                None => None,
            };
            linked.push(Port {
                settings,
                stats: Arc::default(),
                publisher,
                commands,
                store: store.clone(),
            });
        }
        Ok(Serial { ports: linked })
    }

    /// Each port's name and counters.
    pub fn stats(&self) -> Vec<(String, Arc<PortStats>)> {
        self.ports
            .iter()
            .map(|p| (p.settings.name.clone(), p.stats.clone()))
            .collect()
    }

    /// Runs every port until `shutdown` is cancelled and what was read is published; then logs
    /// each port's counters.
    pub async fn run(self, shutdown: CancellationToken) {
        let handles: Vec<_> = self
            .ports
            .into_iter()
            .map(|port| tokio::spawn(run_port(port, shutdown.clone())))
            .collect();
        for handle in handles {
            if let Err(error) = handle.await {
                tracing::error!(%error, "a serial port task failed");
            }
        }
    }
}

/// A frame on its way to the router, with its durability ticket when exported.
struct Accepted {
    payload: Bytes,
    ticket: Option<Ticket>,
}

async fn run_port(port: Port, shutdown: CancellationToken) {
    let Port {
        settings,
        stats,
        publisher,
        commands,
        store,
    } = port;
    tracing::info!(
        port = %settings.name,
        path = %settings.path.display(),
        topic = %settings.topic,
        framing = ?settings.framing,
        export = settings.export,
        "serial port configured"
    );
    let (accept_tx, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let open = AtomicBool::new(false);
    let reader = Reader {
        settings: &settings,
        stats: &stats,
        store,
        accepted: accept_tx,
        open: &open,
        shutdown: &shutdown,
    };
    let forward = async {
        if let Some(subscriber) = commands {
            forward_commands(&settings, &stats, subscriber, command_tx, &open, &shutdown).await;
        }
    };
    tokio::join!(
        reader.run(command_rx),
        publish_frames(&settings, &stats, publisher, accept_rx),
        forward,
    );
    let s = &*stats;
    tracing::info!(
        port = %settings.name,
        frames = PortStats::get(&s.frames),
        published = PortStats::get(&s.published),
        exported = PortStats::get(&s.exported),
        not_exported = PortStats::get(&s.not_exported),
        garbage = PortStats::get(&s.garbage),
        bad_cobs = PortStats::get(&s.bad_cobs),
        overlong = PortStats::get(&s.overlong),
        partial = PortStats::get(&s.partial),
        commands = PortStats::get(&s.commands),
        commands_dropped = PortStats::get(&s.commands_dropped),
        opened = PortStats::get(&s.opened),
        "serial port stopped"
    );
}

/// How a session with an open port ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

struct Reader<'a> {
    settings: &'a PortSettings,
    stats: &'a PortStats,
    store: Store,
    accepted: mpsc::Sender<Accepted>,
    open: &'a AtomicBool,
    shutdown: &'a CancellationToken,
}

impl Reader<'_> {
    /// Opens the port, reads it until it goes away, and again, until shutdown.
    async fn run(self, mut commands: mpsc::Receiver<Bytes>) {
        let s = self.settings;
        let mut decoder = Decoder::new(s.framing, s.max_frame);
        let mut backoff = RETRY_FIRST;
        // The problem last logged; a retry that meets the same one says nothing.
        let mut logged_problem: Option<String> = None;
        while !self.shutdown.is_cancelled() {
            let opened = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                opened = open_port(s) => opened,
            };
            match opened {
                Ok(stream) => {
                    self.stats.opened.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(port = %s.name, path = %s.path.display(), "serial port open");
                    logged_problem = None;
                    let since = Instant::now();
                    self.open.store(true, Ordering::Relaxed);
                    let end = self.session(stream, &mut decoder, &mut commands).await;
                    self.open.store(false, Ordering::Relaxed);
                    let mut stale = 0;
                    while commands.try_recv().is_ok() {
                        stale += 1;
                    }
                    self.stats
                        .commands_dropped
                        .fetch_add(stale, Ordering::Relaxed);
                    if let Some(reason) = decoder.reset() {
                        self.dropped(reason);
                    }
                    match end {
                        SessionEnd::Shutdown => break,
                        SessionEnd::Lost(error) => {
                            tracing::warn!(
                                port = %s.name,
                                %error,
                                "serial port lost; retrying until it is back"
                            );
                        }
                    }
                    if since.elapsed() >= RETRY_MAX {
                        backoff = RETRY_FIRST;
                    }
                }
                Err(error) => {
                    let problem = error.to_string();
                    if logged_problem.as_deref() != Some(problem.as_str()) {
                        tracing::warn!(
                            port = %s.name,
                            path = %s.path.display(),
                            error = %problem,
                            "serial port unavailable; retrying until it appears"
                        );
                        logged_problem = Some(problem);
                    } else {
                        tracing::debug!(port = %s.name, error = %problem, "serial port still unavailable");
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    /// Reads (and writes commands to) an open port until it fails or shutdown.
    async fn session(
        &self,
        stream: SerialStream,
        decoder: &mut Decoder,
        commands: &mut mpsc::Receiver<Bytes>,
    ) -> SessionEnd {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let s = self.settings;
        // Writing never ends the session: a port that fails to write fails to read too, and
        // only the reader may decide when the session ends (it may be handing on a frame).
        let writer = async {
            while let Some(command) = commands.recv().await {
                let written = async {
                    wr.write_all(&command).await?;
                    wr.flush().await
                };
                match written.await {
                    Ok(()) => {
                        self.stats.commands.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        self.stats.commands_dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(port = %s.name, %error, "writing a command to the port failed");
                        break;
                    }
                }
            }
            std::future::pending::<Infallible>().await
        };
        let reader = async {
            let mut buf = vec![0u8; READ_CHUNK];
            let mut events = Vec::new();
            // Silence ends an unfinished frame only where the framing resynchronises on it.
            let gap = (s.framing == Framing::LengthPrefixed).then_some(s.gap_timeout);
            loop {
                let waiting_in_frame = gap.filter(|_| decoder.in_frame());
                let read = async {
                    match waiting_in_frame {
                        Some(gap) => tokio::time::timeout(gap, rd.read(&mut buf)).await.ok(),
                        None => Some(rd.read(&mut buf).await),
                    }
                };
                let read = tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                    read = read => read,
                };
                let n = match read {
                    None => {
                        if let Some(reason) = decoder.idle() {
                            self.dropped(reason);
                        }
                        continue;
                    }
                    Some(Ok(0)) => return SessionEnd::Lost("the port closed (hang-up)".into()),
                    Some(Ok(n)) => n,
                    Some(Err(error)) => return SessionEnd::Lost(error.to_string()),
                };
                decoder.feed(&buf[..n], &mut events);
                for event in events.drain(..) {
                    match event {
                        Event::Frame(frame) => {
                            if !self.accept(frame).await {
                                // The publisher is gone: only when the relay is going down.
                                return SessionEnd::Shutdown;
                            }
                        }
                        Event::Dropped(reason) => self.dropped(reason),
                    }
                }
            }
        };
        tokio::select! {
            end = reader => end,
            never = writer => match never {},
        }
    }

    fn dropped(&self, reason: DropReason) {
        self.stats.count_drop(reason);
        tracing::debug!(port = %self.settings.name, reason = reason.as_str(), "serial input dropped");
    }

    /// Appends an exported frame to the outbox and hands the frame to the publisher; false
    /// when the publisher is gone.
    async fn accept(&self, payload: Bytes) -> bool {
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        let s = self.settings;
        let ticket = if s.export {
            let record = OutboxRecord {
                topic: s.topic.clone(),
                payload: payload.clone(),
                qos: 1,
                retain: false,
                accepted_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                origin: Origin::Serial as i32,
                source: s.name.clone(),
                headers: Vec::new(),
            };
            match self.store.append(&record).await {
                Ok(ticket) => Some(ticket),
                Err(error) => {
                    self.stats.not_exported.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(port = %s.name, %error, "frame not kept for the hub");
                    None
                }
            }
        } else {
            None
        };
        self.accepted
            .send(Accepted { payload, ticket })
            .await
            .is_ok()
    }
}

async fn open_port(s: &PortSettings) -> Result<SerialStream, tokio_serial::Error> {
    open_tty(&s.path, s.baud, s.data_bits, s.parity, s.stop_bits).await
}

/// Opens a serial port with the given line settings, raw, without flow control (also used by
/// the Modbus buses). It runs on a blocking thread: opening a tty talks to its driver (a USB
/// adapter may take a while) and must not hold up a runtime worker.
pub(crate) async fn open_tty(
    path: &std::path::Path,
    baud: u32,
    data_bits: u8,
    parity: Parity,
    stop_bits: u8,
) -> Result<SerialStream, tokio_serial::Error> {
    let builder = tokio_serial::new(path.to_string_lossy(), baud)
        .data_bits(match data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        })
        .parity(match parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Odd => tokio_serial::Parity::Odd,
            Parity::Even => tokio_serial::Parity::Even,
        })
        .stop_bits(match stop_bits {
            2 => tokio_serial::StopBits::Two,
            _ => tokio_serial::StopBits::One,
        })
        .flow_control(tokio_serial::FlowControl::None);
    // Blocking-pool threads are inside the runtime, so the stream registers with its reactor.
    tokio::task::spawn_blocking(move || SerialStream::open(&builder))
        .await
        .unwrap_or_else(|error| {
            Err(tokio_serial::Error::new(
                tokio_serial::ErrorKind::Unknown,
                format!("opening the port failed: {error}"),
            ))
        })
}

/// Publishes frames in order, each exported one once its record is durable.
async fn publish_frames(
    settings: &PortSettings,
    stats: &PortStats,
    publisher: LocalPublisher,
    mut accepted: mpsc::Receiver<Accepted>,
) {
    let mut refusing = false;
    let mut router_gone = false;
    while let Some(Accepted { payload, ticket }) = accepted.recv().await {
        if let Some(ticket) = ticket {
            match ticket.durable().await {
                Ok(_) => {
                    stats.exported.fetch_add(1, Ordering::Relaxed);
                    refusing = false;
                }
                Err(error) => {
                    stats.not_exported.fetch_add(1, Ordering::Relaxed);
                    if !refusing {
                        tracing::warn!(
                            port = %settings.name,
                            %error,
                            "the outbox refused serial frames; publishing them locally only"
                        );
                        refusing = true;
                    }
                }
            }
        }
        match publisher.publish(&settings.topic, payload, false).await {
            Ok(()) => {
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                if !router_gone {
                    tracing::error!(port = %settings.name, %error, "cannot publish frames to the local router");
                    router_gone = true;
                }
            }
        }
    }
}

/// Writes messages of the port's `command_topic` to the port, framed.
async fn forward_commands(
    settings: &PortSettings,
    stats: &PortStats,
    mut subscriber: LocalSubscriber,
    port: mpsc::Sender<Bytes>,
    open: &AtomicBool,
    shutdown: &CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = subscriber.next() => next,
        };
        let Some((topic, payload)) = next else {
            return;
        };
        let mut framed = BytesMut::new();
        let problem = if let Err(error) = codec::encode(settings.framing, &payload, &mut framed) {
            Some(error.to_string())
        } else if !open.load(Ordering::Relaxed) {
            Some("the port is not open".to_owned())
        } else if port.try_send(framed.freeze()).is_err() {
            Some(format!(
                "{COMMAND_QUEUE} commands are already waiting for the port"
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            stats.commands_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(port = %settings.name, topic, problem, "command dropped");
        }
    }
}
