//! The admin endpoint: what an admin reads to see whether a box is healthy.
//!
//! An HTTP/1.1 server (axum on hyper) on a loopback address (`[admin] listen`, default
//! 127.0.0.1:9180) answers `GET /metrics` (Prometheus text format) and `GET /status` (JSON); `relaybox status`
//! prints the JSON as a summary. The same figures go to the hub as a protobuf
//! [`RelayStatus`](crate::proto::RelayStatus) at an interval (sent by the uplink).
//!
//! Everything here reads counters the components keep anyway; nothing here can slow them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::broker::router::Router;
use crate::downlink::DownlinkStatus;
use crate::gate::GateShared;
use crate::modbus::DeviceStats;
use crate::serial::PortStats;
use crate::store::OutboxStats;
use crate::uplink::UplinkStatus;

mod http;
pub mod live;
mod page;

pub use http::{serve, serve_tls};

/// How long `relaybox status` waits for the relay's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the figures come from.
pub struct Sources {
    pub relay: String,
    pub started: Instant,
    pub gate: Arc<GateShared>,
    pub outbox: Arc<OutboxStats>,
    pub uplink: Option<Arc<UplinkStatus>>,
    pub downlink: Option<Arc<DownlinkStatus>>,
    pub serial: Vec<(String, Arc<PortStats>)>,
    pub modbus: Vec<(String, Arc<DeviceStats>)>,
    pub broker: Router,
    /// The process's kernel write count when the relay started.
    pub write_bytes_at_start: u64,
    /// The store's directory (its file system's free space is shown).
    pub data_dir: std::path::PathBuf,
    /// The samples of the last 15 minutes, for the page.
    pub live: Arc<live::Live>,
    /// Logins to the admin endpoint beyond the box.
    pub logins: LoginStats,
}

/// Logins to the admin endpoint on `tls_listen`.
#[derive(Debug, Default)]
pub struct LoginStats {
    pub accepted: std::sync::atomic::AtomicU64,
    /// A wrong user name or password.
    pub bad_credentials: std::sync::atomic::AtomicU64,
    /// A right login of a user not in the group `admins`.
    pub not_admin: std::sync::atomic::AtomicU64,
}

/// The shape of `/status` (docs/STATUS.md). It grows by new fields within a version; a
/// field that changes meaning or goes makes a new version.
pub const STATUS_VERSION: u32 = 1;

/// The JSON of `/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// [`STATUS_VERSION`].
    #[serde(default)]
    pub status_version: u32,
    pub relay: String,
    pub version: String,
    pub uptime_s: u64,
    pub mqtt: MqttStatus,
    pub outbox: OutboxStatus,
    pub uplink: Option<UplinkState>,
    pub downlink: Option<DownlinkState>,
    pub flash: FlashStatus,
    pub memory: MemoryStatus,
    pub serial: Vec<SerialStatus>,
    #[serde(default)]
    pub broker: RouterStatus,
    /// Modbus devices (`[[modbus]]`).
    #[serde(default)]
    pub modbus: Vec<ModbusStatus>,
    #[serde(default)]
    pub admin: AdminStatus,
}

/// Logins to the admin endpoint beyond the box (`tls_listen`) since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AdminStatus {
    pub logins_accepted: u64,
    /// Refused: a wrong user name or password.
    pub logins_bad_credentials: u64,
    /// Refused: a user not in the group `admins`.
    pub logins_not_admin: u64,
}

/// The local broker's router (`crate::broker::router`): its sessions, subscriptions and queues
/// now, and counters since the relay started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RouterStatus {
    /// Sessions with a connection, and persistent sessions kept without one.
    pub sessions_online: u64,
    pub sessions_offline: u64,
    /// Offline sessions ended because their expiry passed.
    pub sessions_expired: u64,
    pub subscriptions: u64,
    /// Topics with a retained message in the router.
    pub retained_messages: u64,
    /// Deliveries waiting in the sessions' queues (not yet sent, or sent and unacknowledged),
    /// and their bytes.
    pub queued_messages: u64,
    pub queued_bytes: u64,
    /// Messages published into the router (by MQTT clients, the downlink and serial ports), and
    /// deliveries sent to MQTT clients.
    pub messages_in: u64,
    pub messages_out: u64,
    /// Deliveries dropped because a session's queue (or all of them) was full.
    pub dropped: u64,
    /// Deliveries dropped because their message expired before they were sent.
    pub expired: u64,
    pub wills_published: u64,
    /// Session records and deliveries the store could not keep.
    pub persist_failures: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MqttStatus {
    pub clients_connected: u64,
    /// Of those, the ones parked: quiet plain-TCP clients waiting without a task.
    #[serde(default)]
    pub clients_parked: u64,
    pub connections_total: u64,
    pub refused_busy: u64,
    pub auth_failures: u64,
    pub closed_for_errors: u64,
    pub publishes_in: u64,
    pub exported: u64,
    pub refused: u64,
    pub denied_publishes: u64,
    pub denied_subscriptions: u64,
    pub unexportable: u64,
    /// PUBLISHes not sent to MQTT 5 clients because they exceed the client's Maximum Packet
    /// Size.
    #[serde(default)]
    pub too_large_for_client: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxStatus {
    pub messages: u64,
    pub bytes: u64,
    pub oldest_age_s: u64,
    pub appended: u64,
    pub acknowledged: u64,
    pub dropped_oldest: u64,
    pub dropped_age: u64,
    pub refused: u64,
    pub corrupt: u64,
    pub commits: u64,
    pub commit_failures: u64,
    /// Bytes of the store's segment files (live and spare), and how many there are.
    pub file_bytes: u64,
    #[serde(default)]
    pub segments: u64,
    #[serde(default)]
    pub spare_segments: u64,
    /// Segments whose chunks died and were made spares; checkpoints written.
    #[serde(default)]
    pub recycled: u64,
    #[serde(default)]
    pub checkpoints: u64,
    /// Torn writes found at the tail when the store opened.
    #[serde(default)]
    pub torn: u64,
    /// How long opening the store took.
    #[serde(default)]
    pub open_ms: u64,
    /// Topics with a retained message kept in the store, and the bytes they take.
    #[serde(default)]
    pub retained_messages: u64,
    #[serde(default)]
    pub retained_bytes: u64,
    /// Retained messages refused for `max_retained_bytes`.
    #[serde(default)]
    pub retained_refused: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UplinkState {
    pub connected: bool,
    /// When the link last went up or down (ms since the Unix epoch); 0: it has not since start.
    #[serde(default)]
    pub since_unix_ms: u64,
    pub published: u64,
    pub acknowledged: u64,
    pub duplicates: u64,
    /// Whether the uplink publishes in fast-ingest batches (else one message at a time).
    #[serde(default)]
    pub batched: bool,
    pub failures: u64,
    /// Errors the hub answered with, by kind (`no_stream`, `limits`, `permissions`, `timeout`,
    /// `other`).
    #[serde(default)]
    pub hub_errors: std::collections::BTreeMap<String, u64>,
    pub ack_latency_ms_avg: f64,
    pub ack_latency_ms_last: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DownlinkState {
    pub delivered: u64,
    pub own_skipped: u64,
    pub unmappable: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlashStatus {
    /// Bytes the relay process made the kernel write to storage since it started.
    pub bytes_written: u64,
    /// `bytes_written` divided by the messages appended to the outbox.
    pub bytes_per_message: f64,
    /// What the store itself handed to the disk: bytes, write calls and flushes.
    #[serde(default)]
    pub store_bytes_written: u64,
    #[serde(default)]
    pub store_writes: u64,
    #[serde(default)]
    pub store_flushes: u64,
    #[serde(default)]
    pub floor_pages: u64,
    /// `store_bytes_written` per commit.
    #[serde(default)]
    pub bytes_per_commit: f64,
    /// The store's write rate over the last minute, as bytes per day.
    #[serde(default)]
    pub bytes_per_day: u64,
    /// The store's file system: bytes left to the relay and bytes in all (read every 10 s; 0
    /// until first read).
    #[serde(default)]
    pub free_bytes: u64,
    #[serde(default)]
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemoryStatus {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SerialStatus {
    pub port: String,
    pub frames: u64,
    pub exported: u64,
    pub garbage: u64,
    pub bad_cobs: u64,
    pub overlong: u64,
    pub partial: u64,
}

/// One Modbus device: its state and its counters since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModbusStatus {
    pub device: String,
    pub online: bool,
    pub polls: u64,
    pub replies: u64,
    pub timeouts: u64,
    pub bad_frames: u64,
    pub garbage_bytes: u64,
    pub exceptions: u64,
    pub published: u64,
    pub writes: u64,
    pub write_failures: u64,
    pub commands_refused: u64,
    pub commands_dropped: u64,
}

/// Now, in milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// The kernel's count of bytes this process caused to be written to storage
/// (`write_bytes` of /proc/self/io); 0 where it cannot be read.
pub fn process_write_bytes() -> u64 {
    proc_field("/proc/self/io", "write_bytes:")
}

/// (current, peak) resident memory of this process, in bytes.
pub fn process_rss() -> (u64, u64) {
    (
        proc_field("/proc/self/status", "VmRSS:") * 1024,
        proc_field("/proc/self/status", "VmHWM:") * 1024,
    )
}

fn proc_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl Sources {
    pub fn snapshot(&self) -> Status {
        let g = &self.gate.stats;
        let o = &self.outbox;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let oldest = load(&o.oldest_unix_ms);
        let appended = load(&o.appended);
        let written = process_write_bytes().saturating_sub(self.write_bytes_at_start);
        let (rss, peak) = process_rss();
        let (free_bytes, total_bytes) = self.live.space();
        Status {
            status_version: STATUS_VERSION,
            relay: self.relay.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            mqtt: MqttStatus {
                clients_connected: load(&g.connected),
                clients_parked: self.gate.parked(),
                connections_total: load(&g.connections),
                refused_busy: load(&g.refused_busy),
                auth_failures: load(&g.auth_failures),
                closed_for_errors: load(&g.closed_for_errors),
                publishes_in: load(&g.publishes_in),
                exported: load(&g.exported),
                refused: load(&g.refused),
                denied_publishes: load(&g.denied_publishes),
                denied_subscriptions: load(&g.denied_subscriptions),
                unexportable: load(&g.unexportable),
                too_large_for_client: load(&g.too_large_for_client),
            },
            outbox: OutboxStatus {
                messages: load(&o.records),
                bytes: load(&o.bytes),
                oldest_age_s: if oldest == 0 || load(&o.records) == 0 {
                    0
                } else {
                    now_ms.saturating_sub(oldest) / 1000
                },
                appended,
                acknowledged: load(&o.acknowledged),
                dropped_oldest: load(&o.dropped_oldest),
                dropped_age: load(&o.dropped_age),
                refused: load(&o.refused),
                corrupt: load(&o.corrupt),
                commits: load(&o.commits),
                commit_failures: load(&o.commit_failures),
                file_bytes: load(&o.file_bytes),
                segments: load(&o.segments),
                spare_segments: load(&o.spare_segments),
                recycled: load(&o.recycled),
                checkpoints: load(&o.checkpoints),
                torn: load(&o.torn),
                open_ms: load(&o.open_ms),
                retained_messages: load(&o.retained_messages),
                retained_bytes: load(&o.retained_bytes),
                retained_refused: load(&o.retained_refused),
            },
            uplink: self.uplink.as_ref().map(|u| {
                let count = load(&u.ack_latency_count);
                UplinkState {
                    connected: u.connected.load(Ordering::Relaxed),
                    since_unix_ms: load(&u.changed_unix_ms),
                    published: load(&u.published),
                    acknowledged: load(&u.acknowledged),
                    duplicates: load(&u.duplicates),
                    batched: u.batched.load(std::sync::atomic::Ordering::Relaxed),
                    failures: load(&u.failures),
                    hub_errors: crate::uplink::HubTrouble::ALL
                        .iter()
                        .map(|k| (k.label().to_owned(), load(&u.hub_errors[*k as usize])))
                        .collect(),
                    ack_latency_ms_avg: if count == 0 {
                        0.0
                    } else {
                        load(&u.ack_latency_us_sum) as f64 / count as f64 / 1000.0
                    },
                    ack_latency_ms_last: load(&u.ack_latency_us_last) as f64 / 1000.0,
                }
            }),
            downlink: self.downlink.as_ref().map(|d| DownlinkState {
                delivered: load(&d.delivered),
                own_skipped: load(&d.own_skipped),
                unmappable: load(&d.unmappable),
            }),
            flash: FlashStatus {
                bytes_written: written,
                bytes_per_message: if appended == 0 {
                    0.0
                } else {
                    written as f64 / appended as f64
                },
                store_bytes_written: load(&o.bytes_written),
                store_writes: load(&o.writes),
                store_flushes: load(&o.flushes),
                floor_pages: load(&o.floor_pages),
                bytes_per_commit: match load(&o.commits) {
                    0 => 0.0,
                    n => load(&o.bytes_written) as f64 / n as f64,
                },
                bytes_per_day: load(&o.write_rate_per_day),
                free_bytes,
                total_bytes,
            },
            memory: MemoryStatus {
                rss_bytes: rss,
                peak_rss_bytes: peak,
            },
            serial: self
                .serial
                .iter()
                .map(|(port, s)| SerialStatus {
                    port: port.clone(),
                    frames: load(&s.frames),
                    exported: load(&s.exported),
                    garbage: load(&s.garbage),
                    bad_cobs: load(&s.bad_cobs),
                    overlong: load(&s.overlong),
                    partial: load(&s.partial),
                })
                .collect(),
            modbus: self
                .modbus
                .iter()
                .map(|(device, s)| ModbusStatus {
                    device: device.clone(),
                    online: s.online.load(Ordering::Relaxed),
                    polls: load(&s.polls),
                    replies: load(&s.replies),
                    timeouts: load(&s.timeouts),
                    bad_frames: load(&s.bad_frames),
                    garbage_bytes: load(&s.garbage_bytes),
                    exceptions: load(&s.exceptions),
                    published: load(&s.published),
                    writes: load(&s.writes),
                    write_failures: load(&s.write_failures),
                    commands_refused: load(&s.commands_refused),
                    commands_dropped: load(&s.commands_dropped),
                })
                .collect(),
            broker: {
                let r = self.broker.stats();
                RouterStatus {
                    sessions_online: load(&r.sessions_online),
                    sessions_offline: load(&r.sessions_offline),
                    sessions_expired: load(&r.sessions_expired),
                    subscriptions: load(&r.subscriptions),
                    retained_messages: load(&r.retained),
                    queued_messages: load(&r.queued_messages),
                    queued_bytes: load(&r.queued_bytes),
                    messages_in: load(&r.messages_in),
                    messages_out: load(&r.messages_out),
                    dropped: load(&r.dropped),
                    expired: load(&r.expired),
                    wills_published: load(&r.wills_published),
                    persist_failures: load(&r.persist_failures),
                }
            },
            admin: AdminStatus {
                logins_accepted: load(&self.logins.accepted),
                logins_bad_credentials: load(&self.logins.bad_credentials),
                logins_not_admin: load(&self.logins.not_admin),
            },
        }
    }

    /// The status in the protobuf form sent to the hub.
    pub fn to_proto(&self) -> crate::proto::RelayStatus {
        let s = self.snapshot();
        crate::proto::RelayStatus {
            relay: s.relay,
            version: s.version,
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime_s: s.uptime_s,
            clients_connected: s.mqtt.clients_connected,
            outbox_messages: s.outbox.messages,
            outbox_bytes: s.outbox.bytes,
            outbox_oldest_age_s: s.outbox.oldest_age_s,
            dropped_total: s.outbox.dropped_oldest + s.outbox.dropped_age + s.outbox.refused,
            flash_bytes_written: s.flash.bytes_written,
            rss_bytes: s.memory.rss_bytes,
            messages_in: s.mqtt.publishes_in,
            messages_to_hub: s.uplink.as_ref().map_or(0, |u| u.acknowledged),
            messages_from_hub: s.downlink.as_ref().map_or(0, |d| d.delivered),
        }
    }
}

/// The Prometheus text of a status.
pub fn metrics(s: &Status) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("relaybox");
    registry.register_collector(Box::new(Figures(s.clone())));
    let mut out = String::with_capacity(8192);
    if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::warn!(%error, "the metrics could not be written");
    }
    out
}

/// The labels of one sample.
type Labels = Vec<(&'static str, String)>;

/// One label.
fn l(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

/// One scrape's figures, written through prometheus-client.
#[derive(Debug)]
struct Figures(Status);

impl prometheus_client::collector::Collector for Figures {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let mut written = Ok(());
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(Labels, f64)]| {
            if written.is_ok() {
                written = family(&mut encoder, name, kind, help, samples);
            }
        };
        figures(&self.0, &mut metric);
        written
    }
}

/// One metric family: `name` (a counter's ends in `_total`, which the encoder adds back),
/// `kind` `counter` or `gauge`, its help and its samples.
fn family(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    kind: &str,
    help: &str,
    samples: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    let (name, kind) = match kind {
        "counter" => (
            name.strip_suffix("_total").unwrap_or(name),
            MetricType::Counter,
        ),
        _ => (name, MetricType::Gauge),
    };
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        if labels.is_empty() {
            sample(&mut metric, kind, *value)?;
        } else {
            sample(&mut metric.encode_family(labels)?, kind, *value)?;
        }
    }
    Ok(())
}

fn sample(
    metric: &mut prometheus_client::encoding::MetricEncoder,
    kind: prometheus_client::metrics::MetricType,
    value: f64,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::encoding::NoLabelSet;
    use prometheus_client::metrics::exemplar::Exemplar;
    match kind {
        prometheus_client::metrics::MetricType::Counter => {
            metric.encode_counter(&value, None::<&Exemplar<NoLabelSet, f64>>)
        }
        _ => metric.encode_gauge(&value),
    }
}

/// Every figure of `s`, each handed to `metric` (name, kind, help, samples).
fn figures(s: &Status, metric: &mut impl FnMut(&str, &str, &str, &[(Labels, f64)])) {
    let f = |n: u64| n as f64;
    metric("up", "gauge", "1 while the relay runs.", &[(vec![], 1.0)]);
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the relay started.",
        &[(vec![], f(s.uptime_s))],
    );
    metric(
        "admin_logins_total",
        "counter",
        "Logins accepted by the admin endpoint beyond the box (tls_listen).",
        &[(vec![], f(s.admin.logins_accepted))],
    );
    metric(
        "admin_logins_refused_total",
        "counter",
        "Logins refused by the admin endpoint beyond the box, by reason.",
        &[
            (
                l("reason", "bad_credentials"),
                f(s.admin.logins_bad_credentials),
            ),
            (l("reason", "not_admin"), f(s.admin.logins_not_admin)),
        ],
    );
    metric(
        "store_free_bytes",
        "gauge",
        "Bytes left to the relay on the store's file system.",
        &[(vec![], f(s.flash.free_bytes))],
    );
    metric(
        "mqtt_clients_connected",
        "gauge",
        "MQTT clients connected now.",
        &[(vec![], f(s.mqtt.clients_connected))],
    );
    metric(
        "mqtt_clients_parked",
        "gauge",
        "MQTT clients connected now that are parked (quiet, waiting without a task of their own).",
        &[(vec![], f(s.mqtt.clients_parked))],
    );
    metric(
        "mqtt_connections_total",
        "counter",
        "MQTT connections accepted.",
        &[(vec![], f(s.mqtt.connections_total))],
    );
    metric(
        "mqtt_connections_refused_total",
        "counter",
        "Connections refused at the connection limit.",
        &[(vec![], f(s.mqtt.refused_busy))],
    );
    metric(
        "mqtt_auth_failures_total",
        "counter",
        "Logins refused.",
        &[(vec![], f(s.mqtt.auth_failures))],
    );
    metric(
        "mqtt_connections_closed_for_errors_total",
        "counter",
        "Connections closed for bad input or limits.",
        &[(vec![], f(s.mqtt.closed_for_errors))],
    );
    metric(
        "mqtt_denied_total",
        "counter",
        "Publishes and subscriptions denied by the ACL.",
        &[
            (l("kind", "publish"), f(s.mqtt.denied_publishes)),
            (l("kind", "subscribe"), f(s.mqtt.denied_subscriptions)),
        ],
    );
    let to_hub = s.uplink.as_ref().map_or(0, |u| u.acknowledged);
    let from_hub = s.downlink.as_ref().map_or(0, |d| d.delivered);
    let serial_in: u64 = s.serial.iter().map(|p| p.frames).sum();
    metric("messages_total", "counter", "Messages by direction: from local MQTT clients, from serial ports, to the hub (acknowledged), from the hub.", &[
        (l("direction", "mqtt_in"), f(s.mqtt.publishes_in)),
        (l("direction", "serial_in"), f(serial_in)),
        (l("direction", "to_hub"), f(to_hub)),
        (l("direction", "from_hub"), f(from_hub)),
    ]);
    metric(
        "outbox_messages",
        "gauge",
        "Messages waiting for the hub.",
        &[(vec![], f(s.outbox.messages))],
    );
    metric(
        "outbox_bytes",
        "gauge",
        "Bytes of messages waiting for the hub.",
        &[(vec![], f(s.outbox.bytes))],
    );
    metric(
        "outbox_oldest_age_seconds",
        "gauge",
        "Age of the oldest message waiting.",
        &[(vec![], f(s.outbox.oldest_age_s))],
    );
    metric(
        "outbox_appended_total",
        "counter",
        "Messages accepted into the outbox.",
        &[(vec![], f(s.outbox.appended))],
    );
    metric(
        "outbox_dropped_total",
        "counter",
        "Messages not kept, by reason.",
        &[
            (l("reason", "oldest"), f(s.outbox.dropped_oldest)),
            (l("reason", "age"), f(s.outbox.dropped_age)),
            (l("reason", "refused"), f(s.outbox.refused)),
            (l("reason", "corrupt"), f(s.outbox.corrupt)),
            (l("reason", "unexportable_topic"), f(s.mqtt.unexportable)),
        ],
    );
    metric(
        "outbox_commits_total",
        "counter",
        "Outbox commits (each one flush).",
        &[(vec![], f(s.outbox.commits))],
    );
    metric(
        "outbox_commit_failures_total",
        "counter",
        "Outbox commits that failed.",
        &[(vec![], f(s.outbox.commit_failures))],
    );
    metric(
        "retained_messages",
        "gauge",
        "Topics with a retained message kept in the store.",
        &[(vec![], f(s.outbox.retained_messages))],
    );
    metric(
        "retained_bytes",
        "gauge",
        "Bytes the retained messages take against max_retained_bytes.",
        &[(vec![], f(s.outbox.retained_bytes))],
    );
    metric(
        "retained_refused_total",
        "counter",
        "Retained messages refused because max_retained_bytes was reached.",
        &[(vec![], f(s.outbox.retained_refused))],
    );
    // The router's retained messages are not repeated here: `retained_messages` above counts
    // the same topics, as the store keeps them.
    metric(
        "sessions",
        "gauge",
        "Sessions of the local broker: with a connection, or persistent and kept without one.",
        &[
            (l("state", "online"), f(s.broker.sessions_online)),
            (l("state", "offline"), f(s.broker.sessions_offline)),
        ],
    );
    metric(
        "sessions_expired_total",
        "counter",
        "Offline sessions ended because their expiry passed.",
        &[(vec![], f(s.broker.sessions_expired))],
    );
    metric(
        "subscriptions",
        "gauge",
        "Subscriptions of all sessions.",
        &[(vec![], f(s.broker.subscriptions))],
    );
    metric(
        "session_queued_messages",
        "gauge",
        "Deliveries waiting in the sessions' queues (not yet sent, or sent and unacknowledged).",
        &[(vec![], f(s.broker.queued_messages))],
    );
    metric(
        "session_queued_bytes",
        "gauge",
        "Bytes of the deliveries waiting in the sessions' queues.",
        &[(vec![], f(s.broker.queued_bytes))],
    );
    metric(
        "messages_received_total",
        "counter",
        "Messages published into the local broker (by MQTT clients, the downlink and serial ports).",
        &[(vec![], f(s.broker.messages_in))],
    );
    metric(
        "messages_sent_total",
        "counter",
        "Deliveries the local broker sent to MQTT clients.",
        &[(vec![], f(s.broker.messages_out))],
    );
    metric(
        "session_dropped_total",
        "counter",
        "Deliveries dropped because a session's queue (or all of them) was full.",
        &[(vec![], f(s.broker.dropped))],
    );
    metric(
        "messages_expired_total",
        "counter",
        "Deliveries dropped because their message expired before they were sent.",
        &[(vec![], f(s.broker.expired))],
    );
    metric(
        "wills_published_total",
        "counter",
        "Will messages published.",
        &[(vec![], f(s.broker.wills_published))],
    );
    metric(
        "session_store_failures_total",
        "counter",
        "Session records and deliveries the store could not keep.",
        &[(vec![], f(s.broker.persist_failures))],
    );
    metric(
        "store_file_bytes",
        "gauge",
        "Size of the store's segment files (live and spare).",
        &[(vec![], f(s.outbox.file_bytes))],
    );
    metric(
        "store_segments",
        "gauge",
        "Segment files of the store's log.",
        &[
            (l("state", "live"), f(s.outbox.segments)),
            (l("state", "spare"), f(s.outbox.spare_segments)),
        ],
    );
    metric(
        "store_bytes_written_total",
        "counter",
        "Bytes the store handed to the disk (pwrite), segment creation included.",
        &[(vec![], f(s.flash.store_bytes_written))],
    );
    metric(
        "store_flushes_total",
        "counter",
        "fdatasync calls of the store.",
        &[(vec![], f(s.flash.store_flushes))],
    );
    metric(
        "store_bytes_per_commit",
        "gauge",
        "Bytes the store wrote per commit since the start.",
        &[(vec![], s.flash.bytes_per_commit)],
    );
    metric(
        "store_write_rate_bytes_per_day",
        "gauge",
        "The store's write rate over the last minute, as bytes per day.",
        &[(vec![], f(s.flash.bytes_per_day))],
    );
    metric(
        "store_floor_pages_total",
        "counter",
        "Pages the physical floor would write for the same commits (each commit's bytes in whole pages).",
        &[(vec![], f(s.flash.floor_pages))],
    );
    metric(
        "store_torn_total",
        "counter",
        "Torn writes found at the log's tail when the store opened.",
        &[(vec![], f(s.outbox.torn))],
    );
    metric(
        "flash_bytes_written_total",
        "counter",
        "Bytes the relay made the kernel write to storage.",
        &[(vec![], f(s.flash.bytes_written))],
    );
    metric(
        "flash_bytes_per_message",
        "gauge",
        "Bytes written to storage per message accepted.",
        &[(vec![], s.flash.bytes_per_message)],
    );
    metric(
        "memory_rss_bytes",
        "gauge",
        "Resident memory.",
        &[(vec![], f(s.memory.rss_bytes))],
    );
    if let Some(u) = &s.uplink {
        metric(
            "uplink_connected",
            "gauge",
            "1 while the hub connection is up.",
            &[(vec![], if u.connected { 1.0 } else { 0.0 })],
        );
        metric(
            "uplink_published_total",
            "counter",
            "Publishes sent to the hub (with resends).",
            &[(vec![], f(u.published))],
        );
        metric(
            "uplink_duplicates_total",
            "counter",
            "Per-message publishes the hub already had (inside fast-ingest batches the hub drops them without saying).",
            &[(vec![], f(u.duplicates))],
        );
        metric(
            "uplink_batched",
            "gauge",
            "1 while the uplink publishes in fast-ingest batches, 0 while one message at a time.",
            &[(vec![], f64::from(u8::from(u.batched)))],
        );
        metric(
            "uplink_failures_total",
            "counter",
            "Times the uplink paused on an error.",
            &[(vec![], f(u.failures))],
        );
        let hub_errors: Vec<(Labels, f64)> = u
            .hub_errors
            .iter()
            .map(|(kind, n)| (l("kind", kind.as_str()), f(*n)))
            .collect();
        metric(
            "uplink_hub_errors_total",
            "counter",
            "Errors the hub answered with, by kind: no_stream, limits, permissions, timeout, other.",
            &hub_errors,
        );
        metric(
            "uplink_puback_latency_seconds_avg",
            "gauge",
            "Average PubAck round trip.",
            &[(vec![], u.ack_latency_ms_avg / 1000.0)],
        );
        metric(
            "uplink_puback_latency_seconds_last",
            "gauge",
            "Last PubAck round trip.",
            &[(vec![], u.ack_latency_ms_last / 1000.0)],
        );
    }
    if !s.serial.is_empty() {
        let samples: Vec<(Labels, f64)> = s
            .serial
            .iter()
            .flat_map(|p| {
                [
                    ("ok", p.frames),
                    ("garbage", p.garbage),
                    ("bad_cobs", p.bad_cobs),
                    ("overlong", p.overlong),
                    ("partial", p.partial),
                ]
                .map(|(reason, n)| {
                    (
                        vec![("port", p.port.clone()), ("reason", reason.to_owned())],
                        f(n),
                    )
                })
            })
            .collect();
        metric(
            "serial_frames_total",
            "counter",
            "Serial frames by port and outcome.",
            &samples,
        );
    }
    if !s.modbus.is_empty() {
        let label = |d: &ModbusStatus, key: &'static str, value: &str| -> Labels {
            vec![("device", d.device.clone()), (key, value.to_owned())]
        };
        let transactions: Vec<(Labels, f64)> = s
            .modbus
            .iter()
            .flat_map(|d| {
                [
                    ("reply", d.replies),
                    ("exception", d.exceptions),
                    ("timeout", d.timeouts),
                    ("bad_frame", d.bad_frames),
                ]
                .map(|(outcome, n)| (label(d, "outcome", outcome), f(n)))
            })
            .collect();
        let commands: Vec<(Labels, f64)> = s
            .modbus
            .iter()
            .flat_map(|d| {
                [
                    ("written", d.writes),
                    ("failed", d.write_failures),
                    ("refused", d.commands_refused),
                    ("dropped", d.commands_dropped),
                ]
                .map(|(outcome, n)| (label(d, "outcome", outcome), f(n)))
            })
            .collect();
        let device = |d: &ModbusStatus| l("device", d.device.as_str());
        let online: Vec<(Labels, f64)> = s
            .modbus
            .iter()
            .map(|d| (device(d), if d.online { 1.0 } else { 0.0 }))
            .collect();
        let garbage: Vec<(Labels, f64)> = s
            .modbus
            .iter()
            .map(|d| (device(d), f(d.garbage_bytes)))
            .collect();
        let published: Vec<(Labels, f64)> = s
            .modbus
            .iter()
            .map(|d| (device(d), f(d.published)))
            .collect();
        metric(
            "modbus_transactions_total",
            "counter",
            "Modbus transactions by device and outcome.",
            &transactions,
        );
        metric(
            "modbus_commands_total",
            "counter",
            "Commands to Modbus devices by outcome: written, failed on the bus, refused (bad register or value), dropped (port absent, queue full).",
            &commands,
        );
        metric(
            "modbus_device_online",
            "gauge",
            "1 while the Modbus device answers, 0 once it stopped answering.",
            &online,
        );
        metric(
            "modbus_garbage_bytes_total",
            "counter",
            "Bytes on the bus that were not part of a Modbus reply.",
            &garbage,
        );
        metric(
            "modbus_values_published_total",
            "counter",
            "Register values and states published by Modbus device.",
            &published,
        );
    }
}

/// Fetches `/status` from a running relay (for `relaybox status`).
pub async fn fetch_status(addr: SocketAddr) -> Result<Status, String> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| {
            format!("cannot reach the relay's admin endpoint {addr}: {e} (is it running?)")
        })?;
        stream
            .write_all(b"GET /status HTTP/1.1\r\nHost: relaybox\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .ok_or("the admin endpoint's answer has no body")?;
        serde_json::from_str(body)
            .map_err(|e| format!("the admin endpoint's answer is not a status: {e}"))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| format!("the admin endpoint {addr} did not answer"))?
}

/// The human summary `relaybox status` prints.
pub fn summary(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "relay {} (relaybox {}), up {}s",
        s.relay, s.version, s.uptime_s
    );
    let _ = writeln!(
        out,
        "mqtt: {} clients connected, {} messages in, {} logins refused, {} denied",
        s.mqtt.clients_connected,
        s.mqtt.publishes_in,
        s.mqtt.auth_failures,
        s.mqtt.denied_publishes + s.mqtt.denied_subscriptions
    );
    match &s.uplink {
        Some(u) => {
            let _ = writeln!(
                out,
                "hub: {}, {} messages acknowledged, PubAck {:.1} ms avg",
                if u.connected {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                u.acknowledged,
                u.ack_latency_ms_avg
            );
        }
        None => {
            let _ = writeln!(out, "hub: no uplink configured");
        }
    }
    let _ = writeln!(
        out,
        "backlog: {} messages, {} bytes, oldest {}s; dropped {} (oldest) {} (age) {} (refused)",
        s.outbox.messages,
        s.outbox.bytes,
        s.outbox.oldest_age_s,
        s.outbox.dropped_oldest,
        s.outbox.dropped_age,
        s.outbox.refused
    );
    let _ = writeln!(
        out,
        "retained: {} messages, {} bytes; {} refused (max_retained_bytes)",
        s.outbox.retained_messages, s.outbox.retained_bytes, s.outbox.retained_refused
    );
    let _ = writeln!(
        out,
        "flash: {} bytes written, {:.0} bytes per message; store: {} bytes in {} commits \
         ({:.0} per commit, {} flushes), {} bytes/day at the current load",
        s.flash.bytes_written,
        s.flash.bytes_per_message,
        s.flash.store_bytes_written,
        s.outbox.commits,
        s.flash.bytes_per_commit,
        s.flash.store_flushes,
        s.flash.bytes_per_day
    );
    let _ = writeln!(
        out,
        "store files: {} segments + {} spare, {} bytes; {} recycled, {} checkpoints, {} torn at open",
        s.outbox.segments,
        s.outbox.spare_segments,
        s.outbox.file_bytes,
        s.outbox.recycled,
        s.outbox.checkpoints,
        s.outbox.torn
    );
    let _ = writeln!(
        out,
        "memory: {} KiB resident, {} KiB peak",
        s.memory.rss_bytes / 1024,
        s.memory.peak_rss_bytes / 1024
    );
    let _ = writeln!(
        out,
        "sessions: {} online, {} offline, {} queued messages",
        s.broker.sessions_online, s.broker.sessions_offline, s.broker.queued_messages
    );
    for p in &s.serial {
        let _ = writeln!(
            out,
            "serial {}: {} frames, dropped {} garbage {} bad COBS {} overlong {} partial",
            p.port, p.frames, p.garbage, p.bad_cobs, p.overlong, p.partial
        );
    }
    for d in &s.modbus {
        let _ = writeln!(
            out,
            "modbus {}: {}, {} replies, {} timeouts, {} bad frames, {} exceptions, {} writes ({} failed, {} refused)",
            d.device,
            if d.online { "online" } else { "offline" },
            d.replies,
            d.timeouts,
            d.bad_frames,
            d.exceptions,
            d.writes,
            d.write_failures,
            d.commands_refused
        );
    }
    out
}
