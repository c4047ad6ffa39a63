//! Modbus RTU devices on the serial ports: the relay is the bus master, reads each device's
//! registers and publishes their values; commands write registers.
//!
//! Each port (a bus: one or more `[[modbus]]` devices with the same `path`) runs:
//! - the **poller** (an edge: it watches the shutdown token) opens the port and owns it. It reads
//!   the devices in turn, the one due first first, one transaction at a time with the RTU silence
//!   (3.5 characters, 1.75 ms above 19,200 baud) before each request, and performs the writes the
//!   command forwarders queue between two transactions. A port that is missing or goes away
//!   (adapter unplugged) is retried with backoff, as serial ports are.
//! - the **publisher** (an inner stage) publishes values in order, retained, each exported one
//!   once its outbox record is durable.
//! - a **command forwarder** per device with a `command_topic`: a message on it names the
//!   register in its topic and the value as text; it is checked against the register (writable,
//!   the type's range, whole raw units after the scale) and queued for the poller, or refused,
//!   logged and counted. Retained messages on the command topic are not acted on: they are old.
//!
//! Promises:
//! - A register's value is published (retained) when it changes and at least every `republish`;
//!   an exported value is durable in the outbox before local subscribers see it.
//! - A device that does not answer (no reply, or replies that cannot be used) for 3 transactions
//!   in a row goes `offline`; its first good reply brings it back `online`. The state is
//!   published retained on the device's topic with `$state` as the register. An offline device
//!   is asked again every `max(poll, 5 s)`, so that it costs the bus little while it is away.
//! - Bad input never stops a bus: a reply that is garbled (bad CRC, garbage, another unit's), late
//!   or an exception is counted per device, and the next device is polled.

pub mod value;
pub mod wire;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_modbus::client::{rtu, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

use crate::broker::local::{local_subscriber, LocalError, LocalPublisher, LocalSubscriber};
use crate::broker::message::Origin as MessageOrigin;
use crate::broker::router::Router;
use crate::config::{ModbusConfig, RegisterConfig, RegisterKind};
use crate::mapping::TopicFilter;
use crate::proto::{Origin, OutboxRecord};
use crate::store::{Store, Ticket};
use value::Write;
use wire::{LineTiming, Read};

/// The first wait before opening a missing port again.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two attempts to open a missing port.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Failed transactions in a row after which a device is offline.
const OFFLINE_AFTER: u32 = 3;
/// How often an offline device is asked again, at most.
const OFFLINE_RETRY: Duration = Duration::from_secs(5);
/// Writes waiting for the bus, per bus.
const COMMAND_QUEUE: usize = 64;
/// Values waiting for the publisher, per bus.
const PUBLISH_QUEUE: usize = 1024;
/// Below this, the silence between frames is kept by a thread's sleep (the runtime's timer
/// counts whole milliseconds).
const FINE_WAIT: Duration = Duration::from_millis(4);
/// The register name that stands for the device's state in its topic.
pub const STATE: &str = "$state";

#[derive(Debug, thiserror::Error)]
pub enum ModbusError {
    #[error("Modbus device {device}: cannot link to the local router: {source}")]
    Link { device: String, source: LocalError },
}

/// What one device's tasks need to know.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    pub name: String,
    pub path: PathBuf,
    pub line: LineTiming,
    pub unit: u8,
    pub poll: Duration,
    pub republish: Duration,
    pub timeout: Duration,
    pub registers: Vec<RegisterConfig>,
    /// Each register's topic, and whether it is exported.
    pub topics: Vec<(String, bool)>,
    /// The `$state` topic, and whether it is exported.
    pub state_topic: (String, bool),
    /// The command filter and the level of its topics that names the register.
    pub commands: Option<(String, usize)>,
}

impl DeviceSettings {
    /// The settings of a `[[modbus]]` device; `exports` decide for a device without `export`.
    pub fn from_config(d: &ModbusConfig, exports: &[TopicFilter]) -> DeviceSettings {
        let exported = |topic: &str| {
            d.export
                .unwrap_or_else(|| exports.iter().any(|f| f.matches(topic)))
        };
        let with_export = |topic: String| {
            let e = exported(&topic);
            (topic, e)
        };
        DeviceSettings {
            name: d.device_name(),
            path: d.path.clone(),
            line: LineTiming {
                baud: d.baud,
                data_bits: d.data_bits,
                parity: d.parity,
                stop_bits: d.stop_bits,
            },
            unit: d.unit,
            poll: d.poll,
            republish: d.republish,
            timeout: d.timeout,
            registers: d.register.clone(),
            topics: d
                .register
                .iter()
                .map(|r| with_export(d.topic_of(&r.name)))
                .collect(),
            state_topic: with_export(d.topic_of(STATE)),
            commands: d.command_filter().zip(d.command_register_level()),
        }
    }
}

/// Counters of one device since start, and its state.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Poll cycles begun (every register read once).
    pub polls: AtomicU64,
    /// Transactions the device answered with a usable reply.
    pub replies: AtomicU64,
    /// Requests with no reply in time.
    pub timeouts: AtomicU64,
    /// Replies that could not be used: bad CRC, garbage, cut short, another unit's.
    pub bad_frames: AtomicU64,
    /// Bytes received that were not part of a reply (noise before or after it).
    pub garbage_bytes: AtomicU64,
    /// Exception replies (the device refused the request).
    pub exceptions: AtomicU64,
    /// Values published.
    pub published: AtomicU64,
    /// Values durable in the outbox.
    pub exported: AtomicU64,
    /// Values of an exported register that the outbox refused.
    pub not_exported: AtomicU64,
    /// Commands written to the device.
    pub writes: AtomicU64,
    /// Writes the device refused or did not answer.
    pub write_failures: AtomicU64,
    /// Commands refused before the bus: unknown or read-only register, a bad value.
    pub commands_refused: AtomicU64,
    /// Commands dropped: the port absent, or the queue full.
    pub commands_dropped: AtomicU64,
    /// The device answers.
    pub online: AtomicBool,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The configured buses, linked to the router and ready to run.
pub struct Modbus {
    buses: Vec<Bus>,
    publisher: LocalPublisher,
    store: Store,
}

struct Bus {
    path: PathBuf,
    line: LineTiming,
    devices: Vec<Device>,
}

struct Device {
    settings: DeviceSettings,
    stats: Arc<DeviceStats>,
    commands: Option<LocalSubscriber>,
}

impl Modbus {
    /// Groups the devices into buses by port and links each command topic to the router.
    pub async fn start(
        devices: Vec<DeviceSettings>,
        router: &Router,
        store: &Store,
    ) -> Result<Modbus, ModbusError> {
        let mut buses: Vec<Bus> = Vec::new();
        for settings in devices {
            let commands = match &settings.commands {
                Some((filter, _)) => {
                    let client_id = format!("relaybox-modbus-{}", settings.name);
                    let mut sub =
                        local_subscriber(router, &client_id, std::slice::from_ref(filter))
                            .await
                            .map_err(|source| ModbusError::Link {
                                device: settings.name.clone(),
                                source,
                            })?;
                    sub.skip_retained();
                    Some(sub)
                }
                None => None,
            };
            let device = Device {
                stats: Arc::default(),
                commands,
                settings,
            };
            match buses.iter_mut().find(|b| b.path == device.settings.path) {
                Some(bus) => bus.devices.push(device),
                None => buses.push(Bus {
                    path: device.settings.path.clone(),
                    line: device.settings.line,
                    devices: vec![device],
                }),
            }
        }
        Ok(Modbus {
            buses,
            // QoS 0, as serial frames: values come at the bus's pace; exported ones are kept in
            // the outbox, durable before they are published here.
            publisher: LocalPublisher::new(router, MessageOrigin::Internal).at_qos(0),
            store: store.clone(),
        })
    }

    /// Each device's name and counters.
    pub fn stats(&self) -> Vec<(String, Arc<DeviceStats>)> {
        self.buses
            .iter()
            .flat_map(|b| &b.devices)
            .map(|d| (d.settings.name.clone(), d.stats.clone()))
            .collect()
    }

    /// Runs every bus until `shutdown` is cancelled and what was read is published; then logs
    /// each device's counters.
    pub async fn run(self, shutdown: CancellationToken) {
        let handles: Vec<_> = self
            .buses
            .into_iter()
            .map(|bus| {
                tokio::spawn(run_bus(
                    bus,
                    self.publisher.clone(),
                    self.store.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        for handle in handles {
            if let Err(error) = handle.await {
                tracing::error!(%error, "a Modbus bus task failed");
            }
        }
    }
}

/// A checked write, waiting for the bus.
struct Command {
    device: usize,
    register: usize,
    write: Write,
}

/// A value (or state) on its way to the router, with its durability ticket when exported.
struct Publication {
    topic: String,
    payload: Bytes,
    ticket: Option<Ticket>,
    stats: Arc<DeviceStats>,
}

async fn run_bus(bus: Bus, publisher: LocalPublisher, store: Store, shutdown: CancellationToken) {
    let Bus {
        path,
        line,
        devices,
    } = bus;
    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
    let open = Arc::new(AtomicBool::new(false));
    let mut forwarders = Vec::new();
    let mut polled = Vec::new();
    for (index, d) in devices.into_iter().enumerate() {
        tracing::info!(
            device = %d.settings.name,
            path = %path.display(),
            unit = d.settings.unit,
            registers = d.settings.registers.len(),
            "Modbus device configured"
        );
        if let Some(sub) = d.commands {
            forwarders.push(forward_commands(
                index,
                d.settings.clone(),
                d.stats.clone(),
                sub,
                command_tx.clone(),
                open.clone(),
                shutdown.clone(),
            ));
        }
        polled.push(Polled::new(d.settings, d.stats));
    }
    drop(command_tx);
    let poller = Poller {
        path: &path,
        line,
        devices: polled,
        store,
        publications: publish_tx,
        open: &open,
        shutdown: &shutdown,
        port: None,
        context: None,
        last_frame: Instant::now(),
    };
    let (devices, (), _) = tokio::join!(
        poller.run(command_rx),
        publish_values(publisher, publish_rx),
        futures::future::join_all(forwarders),
    );
    for d in devices {
        let s = &*d.stats;
        tracing::info!(
            device = %d.settings.name,
            polls = get(&s.polls),
            replies = get(&s.replies),
            timeouts = get(&s.timeouts),
            bad_frames = get(&s.bad_frames),
            garbage_bytes = get(&s.garbage_bytes),
            exceptions = get(&s.exceptions),
            published = get(&s.published),
            writes = get(&s.writes),
            write_failures = get(&s.write_failures),
            commands_refused = get(&s.commands_refused),
            commands_dropped = get(&s.commands_dropped),
            "Modbus device stopped"
        );
    }
}

/// A device as the poller keeps it.
struct Polled {
    settings: DeviceSettings,
    stats: Arc<DeviceStats>,
    reads: Vec<Read>,
    /// Each register's last published text, and when.
    last: Vec<Option<(String, Instant)>>,
    /// The exception each read last got, so that a repeated one is logged once.
    exceptions: Vec<Option<ExceptionCode>>,
    due: Instant,
    failures: u32,
    /// The state last published (`None`: not yet).
    state: Option<bool>,
}

impl Polled {
    fn new(settings: DeviceSettings, stats: Arc<DeviceStats>) -> Polled {
        let reads = wire::plan(&settings.registers);
        Polled {
            last: vec![None; settings.registers.len()],
            exceptions: vec![None; reads.len()],
            reads,
            settings,
            stats,
            due: Instant::now(),
            failures: 0,
            state: None,
        }
    }
}

/// A request on the bus.
enum Request {
    Read(RegisterKind, u16, u16),
    WriteRegister(u16, u16),
    WriteRegisters(u16, Vec<u16>),
    WriteCoil(u16, bool),
}

impl Request {
    /// The bytes of the request and of its reply.
    fn sizes(&self) -> (usize, usize) {
        match self {
            Request::Read(kind, address, count) => (
                wire::READ_REQUEST_BYTES,
                wire::read_reply_bytes(&Read {
                    kind: *kind,
                    address: *address,
                    count: *count,
                    registers: Vec::new(),
                }),
            ),
            Request::WriteRegister(..) => wire::write_bytes(Some(1)),
            Request::WriteRegisters(_, words) => wire::write_bytes(Some(words.len())),
            Request::WriteCoil(..) => wire::write_bytes(None),
        }
    }
}

/// What a transaction came to.
enum Outcome {
    /// Registers as words; coils and inputs as 0 or 1 each; empty for a write.
    Reply(Vec<u16>),
    Exception(ExceptionCode),
    Timeout,
    BadFrame(String),
    /// The port failed: the session ends and the port is opened again.
    Lost(String),
}

/// Sends `request` and checks the reply's shape: the entries asked for, a write's echo. The
/// client's own helpers assert these instead (a panic in debug builds on a device's bad reply).
async fn call(
    ctx: &mut Context,
    request: &Request,
) -> tokio_modbus::Result<Result<Vec<u16>, String>> {
    use tokio_modbus::{Request as Q, Response as A};
    let q = match request {
        Request::Read(RegisterKind::Holding, a, n) => Q::ReadHoldingRegisters(*a, *n),
        Request::Read(RegisterKind::Input, a, n) => Q::ReadInputRegisters(*a, *n),
        Request::Read(RegisterKind::Coil, a, n) => Q::ReadCoils(*a, *n),
        Request::Read(RegisterKind::Discrete, a, n) => Q::ReadDiscreteInputs(*a, *n),
        Request::WriteRegister(a, w) => Q::WriteSingleRegister(*a, *w),
        Request::WriteRegisters(a, ws) => Q::WriteMultipleRegisters(*a, ws.as_slice().into()),
        Request::WriteCoil(a, b) => Q::WriteSingleCoil(*a, *b),
    };
    let answer = tokio_modbus::client::Client::call(ctx, q).await?;
    Ok(answer.map(|reply| {
        let wanted = match request {
            Request::Read(_, _, n) => usize::from(*n),
            _ => 0,
        };
        match (request, reply) {
            (_, A::ReadHoldingRegisters(words) | A::ReadInputRegisters(words)) => {
                if words.len() == wanted {
                    Ok(words)
                } else {
                    Err(format!(
                        "{} registers in a reply to a read of {wanted}",
                        words.len()
                    ))
                }
            }
            (_, A::ReadCoils(mut bits) | A::ReadDiscreteInputs(mut bits)) => {
                // Bits come in whole bytes: the padding is dropped.
                if bits.len() < wanted {
                    return Err(format!(
                        "{} bits in a reply to a read of {wanted}",
                        bits.len()
                    ));
                }
                bits.truncate(wanted);
                Ok(bits.into_iter().map(u16::from).collect())
            }
            (Request::WriteRegister(a, w), A::WriteSingleRegister(ra, rw))
                if (*a, *w) == (ra, rw) =>
            {
                Ok(Vec::new())
            }
            (Request::WriteRegisters(a, ws), A::WriteMultipleRegisters(ra, rn))
                if (*a, ws.len()) == (ra, usize::from(rn)) =>
            {
                Ok(Vec::new())
            }
            (Request::WriteCoil(a, b), A::WriteSingleCoil(ra, rb)) if (*a, *b) == (ra, rb) => {
                Ok(Vec::new())
            }
            (_, other) => Err(format!(
                "a reply that does not answer the request: {other:?}"
            )),
        }
    }))
}

/// How a session with an open port ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

struct Poller<'a> {
    path: &'a PathBuf,
    line: LineTiming,
    devices: Vec<Polled>,
    store: Store,
    publications: mpsc::Sender<Publication>,
    open: &'a AtomicBool,
    shutdown: &'a CancellationToken,
    port: Option<Port>,
    /// The client on the port; made again after a failed transaction, which may leave its
    /// framing in any state.
    context: Option<Context>,
    /// When the last frame on the bus ended.
    last_frame: Instant,
}

impl Poller<'_> {
    /// Opens the port, polls its devices until it goes away, and again, until shutdown.
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) -> Vec<Polled> {
        let mut backoff = RETRY_FIRST;
        let mut logged_problem: Option<String> = None;
        let l = self.line;
        while !self.shutdown.is_cancelled() {
            let opened = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                opened = crate::serial::open_tty(self.path, l.baud, l.data_bits, l.parity, l.stop_bits) => opened,
            };
            match opened {
                Ok(stream) => {
                    tracing::info!(path = %self.path.display(), "Modbus port open");
                    logged_problem = None;
                    let since = Instant::now();
                    self.port = Some(Port::new(stream));
                    self.open.store(true, Ordering::Relaxed);
                    let end = self.session(&mut commands).await;
                    self.open.store(false, Ordering::Relaxed);
                    self.context = None;
                    self.port = None;
                    let mut stale = 0;
                    while let Ok(c) = commands.try_recv() {
                        bump(&self.devices[c.device].stats.commands_dropped);
                        stale += 1;
                    }
                    if stale > 0 {
                        tracing::warn!(path = %self.path.display(), stale, "commands dropped with the port");
                    }
                    match end {
                        SessionEnd::Shutdown => break,
                        SessionEnd::Lost(error) => {
                            tracing::warn!(
                                path = %self.path.display(),
                                %error,
                                "Modbus port lost; retrying until it is back"
                            );
                            self.all_offline(&error).await;
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
                            path = %self.path.display(),
                            error = %problem,
                            "Modbus port unavailable; retrying until it appears"
                        );
                        self.all_offline(&problem).await;
                        logged_problem = Some(problem);
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
        self.devices
    }

    async fn all_offline(&mut self, why: &str) {
        for i in 0..self.devices.len() {
            self.devices[i].failures = OFFLINE_AFTER;
            self.set_state(i, false, why).await;
        }
    }

    /// Polls and writes until the port fails or shutdown.
    async fn session(&mut self, commands: &mut mpsc::Receiver<Command>) -> SessionEnd {
        let now = Instant::now();
        for d in &mut self.devices {
            d.due = d.due.max(now);
        }
        loop {
            let Some(next) = (0..self.devices.len()).min_by_key(|&i| self.devices[i].due) else {
                return SessionEnd::Shutdown;
            };
            let due = tokio::time::Instant::from_std(self.devices[next].due);
            let step = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                Some(command) = commands.recv() => self.write(command).await,
                () = tokio::time::sleep_until(due) => self.poll(next).await,
            };
            if let Err(lost) = step {
                return SessionEnd::Lost(lost);
            }
        }
    }

    /// One request and its reply, after the silence that must end the last frame.
    async fn transaction(&mut self, device: usize, request: &Request) -> Outcome {
        let Some(port) = self.port.clone() else {
            return Outcome::Lost("the port is not open".to_owned());
        };
        quiet_until(self.last_frame + self.line.frame_gap()).await;
        let d = &self.devices[device].settings;
        let (request_bytes, reply_bytes) = request.sizes();
        let limit = d.timeout + self.line.bytes_time(request_bytes + reply_bytes);
        let ctx = self
            .context
            .get_or_insert_with(|| rtu::attach_slave(port.clone(), Slave(d.unit)));
        ctx.set_slave(Slave(d.unit));
        port.received.store(0, Ordering::Relaxed);
        let result = tokio::time::timeout(limit, call(ctx, request)).await;
        self.last_frame = Instant::now();
        let received = port.received.load(Ordering::Relaxed);
        let stats = &self.devices[device].stats;
        let outcome = match result {
            Ok(Ok(Ok(Ok(words)))) => {
                let extra = received.saturating_sub(reply_bytes) as u64;
                stats.garbage_bytes.fetch_add(extra, Ordering::Relaxed);
                return Outcome::Reply(words);
            }
            Ok(Ok(Ok(Err(mismatch)))) => Outcome::BadFrame(mismatch),
            Ok(Ok(Err(code))) => return Outcome::Exception(code),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Outcome::BadFrame(e.to_string()),
            Ok(Err(tokio_modbus::Error::Transport(e)))
                if e.kind() == std::io::ErrorKind::InvalidData =>
            {
                Outcome::BadFrame(e.to_string())
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => Outcome::Lost(e.to_string()),
            Err(_) if received > 0 => Outcome::BadFrame(format!(
                "{received} bytes but no whole reply within {limit:?}"
            )),
            Err(_) => Outcome::Timeout,
        };
        if received > 0 && !matches!(outcome, Outcome::Lost(_)) {
            stats
                .garbage_bytes
                .fetch_add(received as u64, Ordering::Relaxed);
        }
        // Whatever the client had half read is forgotten with it.
        self.context = None;
        outcome
    }

    /// Reads every register of device `i` and publishes what changed.
    async fn poll(&mut self, i: usize) -> Result<(), String> {
        bump(&self.devices[i].stats.polls);
        let mut failed: Option<String> = None;
        for r in 0..self.devices[i].reads.len() {
            let read = &self.devices[i].reads[r];
            let request = Request::Read(read.kind, read.address, read.count);
            match self.transaction(i, &request).await {
                Outcome::Reply(words) => {
                    bump(&self.devices[i].stats.replies);
                    self.devices[i].exceptions[r] = None;
                    self.values(i, r, &words).await;
                }
                Outcome::Exception(code) => {
                    let d = &mut self.devices[i];
                    bump(&d.stats.exceptions);
                    if d.exceptions[r] != Some(code) {
                        let read = &d.reads[r];
                        tracing::warn!(
                            device = %d.settings.name,
                            kind = read.kind.as_str(),
                            address = read.address,
                            count = read.count,
                            exception = %code,
                            "Modbus device refused a read; check the register's kind and address"
                        );
                        d.exceptions[r] = Some(code);
                    }
                }
                Outcome::Timeout => {
                    bump(&self.devices[i].stats.timeouts);
                    failed = Some("no reply".to_owned());
                    break;
                }
                Outcome::BadFrame(why) => {
                    bump(&self.devices[i].stats.bad_frames);
                    failed = Some(format!("unusable reply: {why}"));
                    break;
                }
                Outcome::Lost(why) => return Err(why),
            }
        }
        let now = Instant::now();
        match failed {
            None => {
                self.devices[i].failures = 0;
                self.set_state(i, true, "").await;
                let d = &mut self.devices[i];
                d.due = (d.due + d.settings.poll).max(now);
            }
            Some(why) => {
                let d = &mut self.devices[i];
                d.failures = d.failures.saturating_add(1);
                if d.failures >= OFFLINE_AFTER {
                    d.due = now + d.settings.poll.max(OFFLINE_RETRY);
                    self.set_state(i, false, &why).await;
                } else {
                    d.due = (d.due + d.settings.poll).max(now);
                }
            }
        }
        Ok(())
    }

    /// Publishes the registers of read `r` of device `i` whose text changed or is due again.
    async fn values(&mut self, i: usize, r: usize, words: &[u16]) {
        let now = Instant::now();
        let d = &self.devices[i];
        let read = &d.reads[r];
        let mut out = Vec::new();
        for &k in &read.registers {
            let reg = &d.settings.registers[k];
            let start = usize::from(reg.address - read.address);
            let Some(raw) = words.get(start..start + usize::from(reg.value_type().width())) else {
                continue;
            };
            let text = value::format(reg.value_type(), reg.scale, raw);
            let due = match &d.last[k] {
                Some((last, at)) => {
                    *last != text || now.duration_since(*at) >= d.settings.republish
                }
                None => true,
            };
            if due {
                out.push((k, text));
            }
        }
        for (k, text) in out {
            let (topic, export) = self.devices[i].settings.topics[k].clone();
            self.publish(i, topic, export, Bytes::from(text.clone().into_bytes()))
                .await;
            self.devices[i].last[k] = Some((text, now));
        }
    }

    /// Publishes the device's state if it changed, and logs the change.
    async fn set_state(&mut self, i: usize, online: bool, why: &str) {
        let d = &mut self.devices[i];
        d.stats.online.store(online, Ordering::Relaxed);
        if d.state == Some(online) {
            return;
        }
        d.state = Some(online);
        if online {
            tracing::info!(device = %d.settings.name, "Modbus device online");
        } else {
            tracing::warn!(device = %d.settings.name, reason = why, "Modbus device offline");
        }
        let (topic, export) = d.settings.state_topic.clone();
        let text = if online { "online" } else { "offline" };
        self.publish(i, topic, export, Bytes::from_static(text.as_bytes()))
            .await;
    }

    async fn publish(&mut self, i: usize, topic: String, export: bool, payload: Bytes) {
        let d = &self.devices[i];
        let ticket = if export {
            let record = OutboxRecord {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: 1,
                retain: true,
                accepted_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                origin: Origin::Modbus as i32,
                source: d.settings.name.clone(),
                headers: Vec::new(),
            };
            match self.store.append(&record).await {
                Ok(ticket) => Some(ticket),
                Err(error) => {
                    bump(&d.stats.not_exported);
                    tracing::warn!(device = %d.settings.name, %error, "value not kept for the hub");
                    None
                }
            }
        } else {
            None
        };
        let _ = self
            .publications
            .send(Publication {
                topic,
                payload,
                ticket,
                stats: d.stats.clone(),
            })
            .await;
    }

    /// Performs a queued write.
    async fn write(&mut self, c: Command) -> Result<(), String> {
        let reg = &self.devices[c.device].settings.registers[c.register];
        let request = match c.write {
            Write::Coil(on) => Request::WriteCoil(reg.address, on),
            Write::Words(words) if words.len() == 1 => {
                Request::WriteRegister(reg.address, words[0])
            }
            Write::Words(words) => Request::WriteRegisters(reg.address, words),
        };
        let name = reg.name.clone();
        let outcome = self.transaction(c.device, &request).await;
        let d = &mut self.devices[c.device];
        let problem = match outcome {
            Outcome::Reply(_) => {
                bump(&d.stats.writes);
                // Read back soon: the new value is published from the device, as it took it.
                d.due = Instant::now();
                tracing::debug!(device = %d.settings.name, register = %name, "Modbus register written");
                return Ok(());
            }
            Outcome::Exception(code) => {
                bump(&d.stats.exceptions);
                format!("the device refused it: {code}")
            }
            Outcome::Timeout => {
                bump(&d.stats.timeouts);
                "no reply".to_owned()
            }
            Outcome::BadFrame(why) => {
                bump(&d.stats.bad_frames);
                format!("unusable reply: {why}")
            }
            Outcome::Lost(why) => {
                bump(&d.stats.write_failures);
                return Err(why);
            }
        };
        bump(&d.stats.write_failures);
        tracing::warn!(device = %d.settings.name, register = %name, %problem, "Modbus write failed");
        Ok(())
    }
}

/// Waits until `at`, to within a fraction of a millisecond.
async fn quiet_until(at: Instant) {
    let left = at.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    if left >= FINE_WAIT {
        tokio::time::sleep(left).await;
    } else {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(left)).await;
    }
}

/// Publishes values in order, each exported one once its record is durable.
async fn publish_values(publisher: LocalPublisher, mut values: mpsc::Receiver<Publication>) {
    let mut refusing = false;
    let mut router_gone = false;
    while let Some(p) = values.recv().await {
        if let Some(ticket) = p.ticket {
            match ticket.durable().await {
                Ok(_) => {
                    bump(&p.stats.exported);
                    refusing = false;
                }
                Err(error) => {
                    bump(&p.stats.not_exported);
                    if !refusing {
                        tracing::warn!(%error, "the outbox refused Modbus values; publishing them locally only");
                        refusing = true;
                    }
                }
            }
        }
        match publisher.publish(&p.topic, p.payload, true).await {
            Ok(()) => bump(&p.stats.published),
            Err(error) => {
                if !router_gone {
                    tracing::error!(%error, "cannot publish Modbus values to the local router");
                    router_gone = true;
                }
            }
        }
    }
}

/// Checks the commands of one device and queues them for its bus.
async fn forward_commands(
    device: usize,
    settings: DeviceSettings,
    stats: Arc<DeviceStats>,
    mut subscriber: LocalSubscriber,
    bus: mpsc::Sender<Command>,
    open: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let Some((_, level)) = settings.commands else {
        return;
    };
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = subscriber.next() => next,
        };
        let Some((topic, payload)) = next else {
            return;
        };
        let checked = check_command(&settings, level, &topic, &payload);
        let problem = match checked {
            Err(problem) => {
                bump(&stats.commands_refused);
                tracing::warn!(device = %settings.name, topic, %problem, "Modbus command refused");
                continue;
            }
            Ok(_) if !open.load(Ordering::Relaxed) => "the port is not open".to_owned(),
            Ok((register, write)) => match bus.try_send(Command {
                device,
                register,
                write,
            }) {
                Ok(()) => continue,
                Err(_) => format!("{COMMAND_QUEUE} commands are already waiting for the bus"),
            },
        };
        bump(&stats.commands_dropped);
        tracing::warn!(device = %settings.name, topic, %problem, "Modbus command dropped");
    }
}

/// The register a command names and what to write to it, or why it cannot be written.
fn check_command(
    settings: &DeviceSettings,
    level: usize,
    topic: &str,
    payload: &[u8],
) -> Result<(usize, Write), String> {
    let name = topic.split('/').nth(level).unwrap_or("");
    let Some(index) = settings.registers.iter().position(|r| r.name == name) else {
        return Err(format!("the device has no register named {name:?}"));
    };
    let reg = &settings.registers[index];
    if !reg.kind.writable() {
        return Err(format!(
            "register {name:?} is a {} register, which cannot be written",
            reg.kind.as_str()
        ));
    }
    let text =
        std::str::from_utf8(payload).map_err(|_| "the value is not UTF-8 text".to_owned())?;
    let write = value::parse(reg.value_type(), reg.scale, text).map_err(|e| e.to_string())?;
    Ok((index, write))
}

/// The open port, shared by the successive clients made on it, counting the bytes read.
#[derive(Clone)]
struct Port {
    stream: Arc<Mutex<SerialStream>>,
    received: Arc<AtomicUsize>,
}

impl Port {
    fn new(stream: SerialStream) -> Port {
        Port {
            stream: Arc::new(Mutex::new(stream)),
            received: Arc::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(Pin<&mut SerialStream>) -> T) -> T {
        let mut stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        f(Pin::new(&mut *stream))
    }
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.with(|s| s.poll_read(cx, buf));
        self.received
            .fetch_add(buf.filled().len() - before, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.with(|s| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        self.with(|s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        self.with(|s| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn device(extra: &str) -> DeviceSettings {
        let text = format!(
            "[relay]\nname = \"r\"\ndata_dir = \"d\"\n[[modbus]]\nname = \"meter\"\npath = \"/dev/null\"\nunit = 1\n\
             topic = \"sensors/{{name}}/{{register}}\"\ncommand_topic = \"commands/{{name}}/{{register}}\"\n{extra}\
             [[modbus.register]]\nname = \"power\"\nkind = \"holding\"\naddress = 0\nscale = 0.1\n\
             [[modbus.register]]\nname = \"temp\"\nkind = \"input\"\naddress = 0\ntype = \"f32\"\n\
             [[modbus.register]]\nname = \"relay\"\nkind = \"coil\"\naddress = 3\n"
        );
        let config = Config::parse(&text, "m.toml").expect("config");
        DeviceSettings::from_config(&config.modbus[0], &[])
    }

    #[test]
    fn commands_are_checked_against_the_register() {
        let d = device("");
        let (_, level) = d.commands.clone().expect("commands");
        assert_eq!(
            d.commands.as_ref().map(|c| c.0.as_str()),
            Some("commands/meter/+")
        );
        assert_eq!(
            check_command(&d, level, "commands/meter/power", b"23.4"),
            Ok((0, Write::Words(vec![234])))
        );
        assert_eq!(
            check_command(&d, level, "commands/meter/relay", b"on"),
            Ok((2, Write::Coil(true)))
        );
        let refused =
            |topic: &str, payload: &[u8]| check_command(&d, level, topic, payload).unwrap_err();
        assert_eq!(
            refused("commands/meter/temp", b"1"),
            "register \"temp\" is a input register, which cannot be written"
        );
        assert_eq!(
            refused("commands/meter/volts", b"1"),
            "the device has no register named \"volts\""
        );
        assert_eq!(
            refused("commands/meter/power", b"lots"),
            "\"lots\" is not a u16 value"
        );
        assert_eq!(
            refused("commands/meter/power", &[0xff]),
            "the value is not UTF-8 text"
        );
    }

    #[test]
    fn topics_and_exports_follow_the_config() {
        let d = device("");
        assert_eq!(d.topics[0], ("sensors/meter/power".to_owned(), false));
        assert_eq!(d.state_topic, ("sensors/meter/$state".to_owned(), false));
        let exports = vec![TopicFilter::new("sensors/#").expect("filter")];
        let text = "[relay]\nname = \"r\"\ndata_dir = \"d\"\n[uplink]\nurl = \"nats://127.0.0.1:4222\"\n\
                    subject_prefix = \"x\"\n[[modbus]]\npath = \"/dev/ttyUSB0\"\nunit = 2\n\
                    topic = \"sensors/{name}/{register}\"\n[[modbus.register]]\nname = \"a\"\nkind = \"holding\"\naddress = 0\n";
        let config = Config::parse(text, "m.toml").expect("config");
        let d = DeviceSettings::from_config(&config.modbus[0], &exports);
        assert_eq!(d.name, "ttyUSB0");
        assert_eq!(d.topics[0], ("sensors/ttyUSB0/a".to_owned(), true));
        assert!(d.commands.is_none());
    }
}
