//! The configuration tree: one TOML file parsed into typed sections.
//!
//! Every section rejects unknown keys. Every error, whether TOML syntax, a wrong type or a value
//! that does not make sense (a bad address, an illegal topic filter), is reported as one line that
//! names the file, the line and the key. With no file at all, [`Config::embedded_default`] serves:
//! MQTT on 127.0.0.1:1883, data under `./relaybox-data`, no uplink.
//!
//! Each component receives only its own section.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::mapping::{self, TopicFilter};

pub mod modbus;
pub use modbus::{ModbusConfig, RegisterConfig, RegisterKind, ValueType};

/// The configuration used by `relaybox run` when no file is given.
pub const EMBEDDED_DEFAULT: &str = r#"
[relay]
name = "relaybox"
data_dir = "./relaybox-data"

[mqtt]
listen = "127.0.0.1:1883"
allow_anonymous = true
"#;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file this config was read from (for reloading on SIGHUP); not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    pub relay: RelayConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// Absent: no uplink, the relay is a local broker with a store.
    pub uplink: Option<UplinkConfig>,
    #[serde(default)]
    pub export: Vec<BridgeRule>,
    #[serde(default)]
    pub import: Vec<BridgeRule>,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Named groups of users, for ACL rules: `name = ["user", …]`.
    #[serde(default)]
    pub groups: std::collections::HashMap<String, Vec<String>>,
    /// Topic access rules (`[[acl]]`).
    #[serde(default)]
    pub acl: Vec<AclRule>,
    /// Serial ports whose frames become messages (`[[serial]]`).
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
    /// Modbus RTU devices whose registers become messages (`[[modbus]]`).
    #[serde(default)]
    pub modbus: Vec<ModbusConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The relay's name: part of every `Nats-Msg-Id` and of the origin header.
    #[serde(deserialize_with = "relay_name")]
    pub name: String,
    pub data_dir: PathBuf,
    /// How long a shutdown may take to drain what was accepted, in milliseconds.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Plain MQTT (TCP).
    pub listen: SocketAddr,
    /// MQTT over TLS (needs `tls_cert` and `tls_key`).
    pub tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket, path `/mqtt`, subprotocol `mqtt`.
    pub ws_listen: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS.
    pub wss_listen: Option<SocketAddr>,
    /// The server certificate chain (PEM) for the TLS listeners.
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM) for the TLS listeners.
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) for client certificates. With it, TLS clients may present a
    /// certificate, whose common name becomes their user name.
    pub tls_client_ca: Option<PathBuf>,
    /// With it, TLS clients must present a certificate signed by `tls_client_ca`.
    #[serde(default)]
    pub tls_require_client_cert: bool,
    /// Let clients connect without a user name and password.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// The largest MQTT packet a client may send, in bytes.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: usize,
    /// Client connections open at one time, over all listeners.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// QoS 1/2 messages a client may have unacknowledged in each direction.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// A client must send CONNECT within this many milliseconds of opening its socket.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Bytes the retained messages (topics and stored records) may take in the store, over
    /// all topics; a retained message beyond it is refused.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: u64,
    /// Messages a session may have queued (waiting for its client, or sent and not yet
    /// acknowledged); one more is dropped and counted.
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Bytes a session's queue may hold.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// Bytes all sessions' queues together may hold.
    #[serde(default = "default_max_queued_total_bytes")]
    pub max_queued_total_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tls_listen: None,
            ws_listen: None,
            wss_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_require_client_cert: false,
            allow_anonymous: false,
            max_packet_size: default_max_packet_size(),
            max_connections: default_max_connections(),
            max_inflight: default_max_inflight(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_retained_bytes: default_max_retained_bytes(),
            max_queued_messages: default_max_queued_messages(),
            max_queued_bytes: default_max_queued_bytes(),
            max_queued_total_bytes: default_max_queued_total_bytes(),
        }
    }
}

/// `[admin]`: the web page, `/status` and `/metrics`.
///
/// `listen` is a loopback address: there they are served in plain HTTP to anyone on the box
/// (and `relaybox status` reads them). Beyond the box they are served only on `tls_listen`,
/// over TLS (`tls_cert`, `tls_key`), and only to a relay user of the group `admins` who logs in
/// (HTTP Basic).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain and private key for `tls_listen`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// The group whose users may log in to the admin endpoint.
pub const ADMIN_GROUP: &str = "admins";

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9180))
}

/// One `[[acl]]` rule: for `user` (a name, or `*` for every client) or `group`, the topic
/// filters it may publish to and subscribe to, and those it may not (`deny`, which wins over
/// any rule's allows); `%u` is the user name, `%c` the client id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub user: Option<String>,
    pub group: Option<String>,
    #[serde(default, deserialize_with = "acl_filters")]
    pub publish: Vec<String>,
    #[serde(default, deserialize_with = "acl_filters")]
    pub subscribe: Vec<String>,
    #[serde(default, deserialize_with = "acl_filters")]
    pub deny: Vec<String>,
}

/// A secret from the config (password, token): never shown in logs, errors or output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboxPolicy {
    /// When full, the oldest records are dropped to make room (counted).
    DropOldest,
    /// When full, new records are refused (counted); QoS 1/2 publishers are told.
    RefuseNew,
}

impl fmt::Display for OutboxPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutboxPolicy::DropOldest => "drop-oldest",
            OutboxPolicy::RefuseNew => "refuse-new",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Upper bound of the outbox, counted as the bytes of its encoded records.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_policy")]
    pub policy: OutboxPolicy,
    /// The group-commit window: appends arriving within it share one commit...
    #[serde(default = "default_commit_window_us")]
    pub commit_window_us: u64,
    /// ...unless no append comes for this long first: the commit is made then (a client's burst
    /// of pipelined publishes has arrived; waiting longer would only delay its PUBACKs).
    /// Set it to `commit_window_us` to always wait out the window (fewer commits at moderate
    /// rates, so less flash written, for slower acknowledgements).
    #[serde(default = "default_commit_gap_us")]
    pub commit_gap_us: u64,
    /// At most this many records go into one commit.
    #[serde(default = "default_commit_max_records")]
    pub commit_max_records: usize,
    /// Records older than this are dropped (counted): `"90s"`, `"30m"`, `"12h"`, `"7d"`.
    #[serde(default, deserialize_with = "duration_opt")]
    pub max_age: Option<std::time::Duration>,
    /// The size of each segment file of the store's log (a multiple of 4096). A store keeps
    /// the size its segments were made with.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: default_max_bytes(),
            policy: default_policy(),
            commit_window_us: default_commit_window_us(),
            commit_gap_us: default_commit_gap_us(),
            commit_max_records: default_commit_max_records(),
            max_age: None,
            segment_bytes: default_segment_bytes(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UplinkMode {
    /// JetStream publish with PubAck: at-least-once, de-duplicated by the hub.
    Jetstream,
    /// Core NATS publish and flush: at-most-once once the bytes left the socket.
    Core,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// The hub: one url (`nats://hub.example.org:4222`) or a list of a cluster's servers. The
    /// client also learns the cluster's other servers from them and fails over among all.
    #[serde(deserialize_with = "hub_urls")]
    pub url: Vec<String>,
    /// The replica count of a stream relaybox creates (1 to 5; a stream that exists is used as
    /// it is).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Subjects are `<subject_prefix>.<mapped topic>`.
    #[serde(deserialize_with = "subject_prefix")]
    pub subject_prefix: String,
    #[serde(default = "default_mode")]
    pub mode: UplinkMode,
    /// The hub stream that captures `<subject_prefix>.>`.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Create the stream on the hub when it is missing.
    #[serde(default)]
    pub create_stream: bool,
    /// JetStream publishes in flight before waiting for PubAcks. In fast-ingest batches: the
    /// messages per flow acknowledgement (at most 500), with four of those in flight.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Cap on the backlog drain after an outage: `"200 msg/s"`, `"64 KiB/s"`, `"1 MiB/s"`.
    /// Live messages are never held back by it. Absent: the backlog drains at link speed.
    #[serde(default, deserialize_with = "drain_rate_opt")]
    pub drain_rate: Option<crate::uplink::DrainRate>,
    /// How often the relay publishes its status to `<subject_prefix>.$relay.status`.
    #[serde(default = "default_status_interval", deserialize_with = "duration")]
    pub status_interval: std::time::Duration,
    /// CA certificates (PEM) that the hub's certificate must chain to (turns TLS on).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for hubs that verify clients.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// A NATS credentials file (JWT + nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// User and password for the hub.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A token for the hub.
    pub token: Option<Secret>,
    /// Allow a hub that is not on loopback without TLS (its traffic then crosses the network
    /// in the clear).
    #[serde(default)]
    pub insecure: bool,
}

/// One `[[export]]` or `[[import]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeRule {
    pub filter: TopicFilter,
}

/// How a serial port's byte stream is cut into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    /// Text lines ended by `\n` (a `\r` before it is removed).
    Line,
    /// COBS-encoded frames, each ended by a zero byte.
    Cobs,
    /// A big-endian `u16` length, then that many bytes.
    LengthPrefixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

/// One `[[serial]]` port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// The port's name: `{name}` in topics, and the source of its outbox records. Default: the
    /// file name of `path`.
    #[serde(default, deserialize_with = "serial_name")]
    pub name: Option<String>,
    /// The device, e.g. `/dev/ttyAMA0`, `/dev/ttyUSB0` or a `/dev/serial/by-id/` link.
    pub path: PathBuf,
    #[serde(default = "default_baud", deserialize_with = "baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits", deserialize_with = "data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits", deserialize_with = "stop_bits")]
    pub stop_bits: u8,
    pub framing: Framing,
    /// The largest frame payload, in bytes (at most 65535).
    #[serde(default = "default_max_frame", deserialize_with = "max_frame")]
    pub max_frame: usize,
    /// Where frames are published; `{name}` stands for the port's name.
    #[serde(deserialize_with = "serial_topic")]
    pub topic: String,
    /// `true`: every frame also goes to the hub; `false`: never; absent: when `topic` matches
    /// an `[[export]]` filter.
    pub export: Option<bool>,
    /// Messages on this topic filter (`{name}` allowed) are framed and written to the port.
    #[serde(default, deserialize_with = "serial_command_topic")]
    pub command_topic: Option<String>,
    /// length-prefixed: an unfinished frame followed by this much silence is dropped as
    /// garbage, and the next byte starts a new frame.
    #[serde(
        default = "default_gap_timeout_ms",
        deserialize_with = "gap_timeout_ms"
    )]
    pub gap_timeout_ms: u64,
}

impl SerialConfig {
    /// The port's name: `name`, or the file name of `path`.
    pub fn port_name(&self) -> String {
        name_or_file_name(self.name.as_deref(), &self.path)
    }

    /// `topic` with the port's name in place of `{name}`.
    pub fn resolved_topic(&self) -> String {
        self.topic.replace("{name}", &self.port_name())
    }

    /// `command_topic` with the port's name in place of `{name}`.
    pub fn resolved_command_topic(&self) -> Option<String> {
        self.command_topic
            .as_ref()
            .map(|t| t.replace("{name}", &self.port_name()))
    }
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_max_frame() -> usize {
    1024
}
fn default_gap_timeout_ms() -> u64 {
    200
}

/// `name`, or else the file name of `path` (`/dev/ttyUSB0` → `ttyUSB0`).
fn name_or_file_name(name: Option<&str>, path: &Path) -> String {
    match name {
        Some(name) => name.to_owned(),
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn serial_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(d)?;
    if valid_port_name(&name) {
        Ok(Some(name))
    } else {
        Err(serde::de::Error::custom(format!(
            "port name {name:?} must be non-empty and use only letters, digits, '-', '_' and '.'"
        )))
    }
}

fn baud<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let baud = u32::deserialize(d)?;
    if baud == 0 {
        return Err(serde::de::Error::custom("baud must be at least 1"));
    }
    Ok(baud)
}

fn data_bits<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let bits = u8::deserialize(d)?;
    if !(5..=8).contains(&bits) {
        return Err(serde::de::Error::custom(format!(
            "data_bits {bits} must be 5, 6, 7 or 8"
        )));
    }
    Ok(bits)
}

fn stop_bits<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let bits = u8::deserialize(d)?;
    if !(1..=2).contains(&bits) {
        return Err(serde::de::Error::custom(format!(
            "stop_bits {bits} must be 1 or 2"
        )));
    }
    Ok(bits)
}

fn max_frame<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let max = usize::deserialize(d)?;
    if !(1..=65_535).contains(&max) {
        return Err(serde::de::Error::custom(format!(
            "max_frame {max} must be between 1 and 65535 bytes"
        )));
    }
    Ok(max)
}

fn gap_timeout_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let ms = u64::deserialize(d)?;
    if ms == 0 {
        return Err(serde::de::Error::custom(
            "gap_timeout_ms must be at least 1",
        ));
    }
    Ok(ms)
}

/// Checks `{name}` is the only placeholder of a topic template; returns it with a sample name.
fn fill_template(template: &str) -> Result<String, String> {
    let filled = template.replace("{name}", "port");
    if filled.contains('{') || filled.contains('}') {
        return Err(format!(
            "{template:?}: the only placeholder a topic may hold is {{name}}"
        ));
    }
    Ok(filled)
}

fn serial_topic<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let topic = String::deserialize(d)?;
    let filled = fill_template(&topic).map_err(serde::de::Error::custom)?;
    mapping::topic_to_subject("x", &filled).map_err(serde::de::Error::custom)?;
    Ok(topic)
}

fn serial_command_topic<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let topic = String::deserialize(d)?;
    let filled = fill_template(&topic).map_err(serde::de::Error::custom)?;
    TopicFilter::new(&filled).map_err(serde::de::Error::custom)?;
    Ok(Some(topic))
}

fn default_shutdown_grace_ms() -> u64 {
    5_000
}
fn default_max_packet_size() -> usize {
    1024 * 1024
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_inflight() -> usize {
    100
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_max_retained_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_max_queued_messages() -> usize {
    1000
}
fn default_max_queued_bytes() -> usize {
    1024 * 1024
}
fn default_max_queued_total_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_policy() -> OutboxPolicy {
    OutboxPolicy::DropOldest
}
fn default_segment_bytes() -> u64 {
    crate::store::SEGMENT_BYTES
}
fn default_commit_window_us() -> u64 {
    2_000
}
fn default_commit_gap_us() -> u64 {
    200
}
fn default_commit_max_records() -> usize {
    4_096
}
fn default_mode() -> UplinkMode {
    UplinkMode::Jetstream
}
fn default_stream() -> String {
    "RELAYBOX".to_owned()
}
fn default_replicas() -> usize {
    1
}
fn default_window() -> usize {
    256
}

fn relay_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(name)
    } else {
        Err(serde::de::Error::custom(format!(
            "relay name {name:?} must be non-empty and use only letters, digits, '-' and '_'"
        )))
    }
}

/// A duration written as a number and a unit (`ms`, `s`, `m`, `h`, `d`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        format!("duration {text:?} must be a number and a unit, like \"30s\" or \"7d\"")
    })?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("duration {text:?} needs a unit: ms, s, m, h or d")),
    };
    let total = n
        .checked_mul(ms)
        .ok_or_else(|| format!("duration {text:?} is too long"))?;
    if total == 0 {
        return Err(format!("duration {text:?} must be more than zero"));
    }
    Ok(std::time::Duration::from_millis(total))
}

fn default_status_interval() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn drain_rate_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<crate::uplink::DrainRate>, D::Error> {
    let text = String::deserialize(d)?;
    crate::uplink::DrainRate::parse(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<std::time::Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn acl_filters<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let filters = Vec::<String>::deserialize(d)?;
    for f in &filters {
        // `%u` and `%c` stand for one level's text; check the filter with them filled in.
        let probe = f.replace("%u", "u").replace("%c", "c");
        TopicFilter::new(&probe).map_err(serde::de::Error::custom)?;
    }
    Ok(filters)
}

fn subject_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let prefix = String::deserialize(d)?;
    mapping::check_subject_prefix(&prefix).map_err(serde::de::Error::custom)?;
    Ok(prefix)
}

/// A configuration that could not be used, as one line naming file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {key}{message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

impl Config {
    /// The configuration `relaybox run` uses when it is given no file.
    pub fn embedded_default() -> Config {
        // The embedded text is part of the binary and covered by a test, so parsing it cannot
        // fail at run time; the fallback keeps this path free of a panic all the same.
        Config::parse(EMBEDDED_DEFAULT, "<embedded default>").unwrap_or_else(|_| Config {
            source: None,
            relay: RelayConfig {
                name: "relaybox".to_owned(),
                data_dir: PathBuf::from("./relaybox-data"),
                shutdown_grace_ms: default_shutdown_grace_ms(),
            },
            mqtt: MqttConfig {
                allow_anonymous: true,
                ..MqttConfig::default()
            },
            outbox: OutboxConfig::default(),
            uplink: None,
            export: Vec::new(),
            import: Vec::new(),
            groups: Default::default(),
            acl: Vec::new(),
            admin: AdminConfig::default(),
            serial: Vec::new(),
            modbus: Vec::new(),
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut config = Config::parse(&text, &shown)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses a config text; `path` is only used to name the source in errors.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, key) = match e.span() {
                // An empty span is the whole document; a span starting on a table header is
                // that table (a missing key), not the one before it.
                Some(span) => locate(text, span.start, span.end > span.start),
                None => (1, String::new()),
            };
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                key: if key.is_empty() {
                    String::new()
                } else {
                    format!("key `{key}`: ")
                },
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        config.validate(text, path)?;
        Ok(config)
    }

    /// Checks of the listeners, ACL rules and uplink credentials.
    fn validate_security(
        &self,
        invalid: &dyn Fn(&str, &str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let tls_wanted = m.tls_listen.is_some() || m.wss_listen.is_some();
        if tls_wanted && (m.tls_cert.is_none() || m.tls_key.is_none()) {
            return Err(invalid(
                "[mqtt]",
                "mqtt.tls_cert",
                "tls_listen and wss_listen need both tls_cert and tls_key".to_owned(),
            ));
        }
        let a = &self.admin;
        if !a.listen.ip().is_loopback() {
            return Err(invalid(
                "[admin]",
                "admin.listen",
                format!(
                    "{} is not a loopback address; to serve the admin page beyond the box use \
                     tls_listen with tls_cert and tls_key (HTTPS, for users of the group `{ADMIN_GROUP}`)",
                    a.listen
                ),
            ));
        }
        if a.tls_listen.is_some() && (a.tls_cert.is_none() || a.tls_key.is_none()) {
            return Err(invalid(
                "[admin]",
                "admin.tls_listen",
                "tls_listen needs both tls_cert and tls_key".to_owned(),
            ));
        }
        if m.tls_require_client_cert && m.tls_client_ca.is_none() {
            return Err(invalid(
                "tls_require_client_cert",
                "mqtt.tls_require_client_cert",
                "requiring client certificates needs tls_client_ca".to_owned(),
            ));
        }
        for (key, value, min) in [
            ("max_connections", m.max_connections as u64, 1),
            ("max_inflight", m.max_inflight as u64, 1),
            ("max_packet_size", m.max_packet_size as u64, 64),
            ("connect_timeout_ms", m.connect_timeout_ms, 100),
            ("max_retained_bytes", m.max_retained_bytes, 1024),
            ("max_queued_messages", m.max_queued_messages as u64, 1),
            ("max_queued_bytes", m.max_queued_bytes as u64, 1024),
            (
                "max_queued_total_bytes",
                m.max_queued_total_bytes as u64,
                1024,
            ),
        ] {
            if value < min {
                return Err(invalid(
                    key,
                    &format!("mqtt.{key}"),
                    format!("must be at least {min}"),
                ));
            }
        }
        // 10,000 idle connections is what the memory budget was measured for
        // (docs/BENCHMARKS.md); each needs a file descriptor too.
        if m.max_connections > 10_000 {
            return Err(invalid(
                "max_connections",
                "mqtt.max_connections",
                "must be at most 10000".to_owned(),
            ));
        }
        if m.max_inflight > u16::MAX as usize {
            return Err(invalid(
                "max_inflight",
                "mqtt.max_inflight",
                "must be at most 65535".to_owned(),
            ));
        }
        for rule in &self.acl {
            match (&rule.user, &rule.group) {
                (Some(_), None) => {}
                (None, Some(g)) if self.groups.contains_key(g) => {}
                (None, Some(g)) => {
                    return Err(invalid(
                        "group",
                        "acl.group",
                        format!("group {g:?} is not defined in [groups]"),
                    ))
                }
                _ => {
                    return Err(invalid(
                        "[[acl]]",
                        "acl",
                        "each [[acl]] rule needs exactly one of `user` or `group`".to_owned(),
                    ))
                }
            }
        }
        if let Some(u) = &self.uplink {
            let auth = [
                u.credentials_file.is_some(),
                u.nkey_seed_file.is_some(),
                u.user.is_some() || u.password.is_some(),
                u.token.is_some(),
            ];
            if auth.iter().filter(|a| **a).count() > 1 {
                return Err(invalid(
                    "[uplink]",
                    "uplink",
                    "use one way to authenticate to the hub: credentials_file, nkey_seed_file, user and password, or token".to_owned(),
                ));
            }
            if u.user.is_some() != u.password.is_some() {
                return Err(invalid(
                    "user",
                    "uplink.user",
                    "user and password go together".to_owned(),
                ));
            }
            if u.client_cert.is_some() != u.client_key.is_some() {
                return Err(invalid(
                    "client_cert",
                    "uplink.client_cert",
                    "client_cert and client_key go together".to_owned(),
                ));
            }
            let tls = u.wants_tls();
            if let Some(far) = u.url.iter().find(|url| !url_is_loopback(url)) {
                if !tls && !u.insecure {
                    return Err(invalid(
                        "url",
                        "uplink.url",
                        format!(
                            "hub {} is not on this machine and the link is not encrypted: use a tls:// url or ca_file, or set insecure = true to send in the clear",
                            url_host(far)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that need more than one key at a time.
    fn validate(&self, text: &str, path: &str) -> Result<(), ConfigError> {
        let invalid = |needle: &str, key: &str, message: String| {
            let line = text
                .lines()
                .position(|l| l.trim_start().starts_with(needle))
                .map_or(1, |i| i + 1);
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                key: format!("key `{key}`: "),
                message,
            }
        };
        self.validate_security(&invalid)?;
        if self.uplink.is_none() && !self.export.is_empty() {
            return Err(invalid(
                "[[export]]",
                "export",
                "export rules need an [uplink] section to send to".to_owned(),
            ));
        }
        if self.uplink.is_none() && !self.import.is_empty() {
            return Err(invalid(
                "[[import]]",
                "import",
                "import rules need an [uplink] section to receive from".to_owned(),
            ));
        }
        if let Some(uplink) = &self.uplink {
            if uplink.window == 0 {
                return Err(invalid(
                    "window",
                    "uplink.window",
                    "must be at least 1".to_owned(),
                ));
            }
            if uplink.stream.is_empty()
                || uplink
                    .stream
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
            {
                return Err(invalid(
                    "stream",
                    "uplink.stream",
                    format!(
                        "stream name {:?} must be non-empty without spaces, '.', '*', '>', '/' or '\\'",
                        uplink.stream
                    ),
                ));
            }
            for url in &uplink.url {
                if !(url.starts_with("nats://")
                    || url.starts_with("tls://")
                    || url.starts_with("ws://")
                    || url.starts_with("wss://"))
                {
                    return Err(invalid(
                        "url",
                        "uplink.url",
                        format!(
                            "hub url {:?} must start with nats://, tls://, ws:// or wss://",
                            shown_url(url)
                        ),
                    ));
                }
            }
            if !(1..=5).contains(&uplink.replicas) {
                return Err(invalid(
                    "replicas",
                    "uplink.replicas",
                    format!("{} must be from 1 to 5", uplink.replicas),
                ));
            }
        }
        if self.outbox.max_bytes < 4096 {
            return Err(invalid(
                "max_bytes",
                "outbox.max_bytes",
                "must be at least 4096 bytes".to_owned(),
            ));
        }
        let segment = self.outbox.segment_bytes;
        if segment % 4096 != 0 || !(64 * 1024..=1 << 30).contains(&segment) {
            return Err(invalid(
                "segment_bytes",
                "outbox.segment_bytes",
                "must be a multiple of 4096 from 65536 to 1073741824".to_owned(),
            ));
        }
        let largest = crate::store::max_record(segment);
        if (self.mqtt.max_packet_size as u64) > largest {
            return Err(invalid(
                "segment_bytes",
                "outbox.segment_bytes",
                format!(
                    "segments of {segment} bytes hold messages of at most {largest} bytes, \
                     less than mqtt.max_packet_size ({})",
                    self.mqtt.max_packet_size
                ),
            ));
        }
        if self.outbox.commit_max_records == 0 {
            return Err(invalid(
                "commit_max_records",
                "outbox.commit_max_records",
                "must be at least 1".to_owned(),
            ));
        }
        self.validate_serial(text, path)?;
        self.validate_modbus(text, path)
    }

    /// Checks between `[[modbus]]` devices, their registers and the rest of the config.
    fn validate_modbus(&self, text: &str, path: &str) -> Result<(), ConfigError> {
        let serial_paths: Vec<PathBuf> = self.serial.iter().map(|p| p.path.clone()).collect();
        let mut registers_before = 0;
        for i in 0..self.modbus.len() {
            if let Err(p) = modbus::check(&self.modbus, i, self.uplink.is_some(), &serial_paths) {
                let (line, key) = match p.register {
                    None => (
                        table_key_line(text, "modbus", i, p.key),
                        format!("modbus.{}", p.key),
                    ),
                    Some(j) => (
                        table_key_line(text, "modbus.register", registers_before + j, p.key),
                        format!("modbus.register.{}", p.key),
                    ),
                };
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    line,
                    key: format!("key `{key}`: "),
                    message: p.message,
                });
            }
            registers_before += self.modbus[i].register.len();
        }
        Ok(())
    }

    /// Checks between `[[serial]]` ports and against the rest of the config.
    fn validate_serial(&self, text: &str, path: &str) -> Result<(), ConfigError> {
        let invalid = |index: usize, key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: table_key_line(text, "serial", index, key),
            key: format!("key `serial.{key}`: "),
            message,
        };
        for (i, port) in self.serial.iter().enumerate() {
            let name = port.port_name();
            if port.name.is_none() && !valid_port_name(&name) {
                return Err(invalid(
                    i,
                    "path",
                    format!(
                        "the port name taken from the path, {name:?}, is not usable \
                         (letters, digits, '-', '_', '.'); set `name`"
                    ),
                ));
            }
            let earlier = &self.serial[..i];
            if earlier.iter().any(|p| p.port_name() == name) {
                let key = if port.name.is_some() { "name" } else { "path" };
                return Err(invalid(
                    i,
                    key,
                    format!("a serial port named {name:?} is already configured; set `name`"),
                ));
            }
            if earlier.iter().any(|p| p.path == port.path) {
                return Err(invalid(
                    i,
                    "path",
                    format!("{} is already configured", port.path.display()),
                ));
            }
            if port.export == Some(true) && self.uplink.is_none() {
                return Err(invalid(
                    i,
                    "export",
                    "exporting serial frames needs an [uplink] section to send to".to_owned(),
                ));
            }
            if let Some(command) = port.resolved_command_topic() {
                let topic = port.resolved_topic();
                if TopicFilter::new(&command).is_ok_and(|f| f.matches(&topic)) {
                    return Err(invalid(
                        i,
                        "command_topic",
                        format!(
                            "{command:?} matches the port's own topic {topic:?}: its frames \
                             would be written back to it"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The 1-based line that sets `key` in the `index`-th `[[table]]`; the table's own header line
/// when the key is not written there (a default), and 1 when the table is not found.
fn table_key_line(text: &str, table: &str, index: usize, key: &str) -> usize {
    let header = format!("[[{table}]]");
    let mut seen = 0;
    let mut header_line = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if header_line.is_some() {
                break;
            }
            if t.split('#').next().map(str::trim) == Some(header.as_str()) {
                if seen == index {
                    header_line = Some(n + 1);
                }
                seen += 1;
            }
            continue;
        }
        if header_line.is_some() && t.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
            return n + 1;
        }
    }
    header_line.unwrap_or(1)
}

impl UplinkConfig {
    /// Whether the link to the hub must be TLS: a `tls://` or `wss://` url, a CA file or a
    /// client certificate asks for it.
    pub fn wants_tls(&self) -> bool {
        self.url
            .iter()
            .any(|u| u.starts_with("tls://") || u.starts_with("wss://"))
            || self.ca_file.is_some()
            || self.client_cert.is_some()
    }
}

/// `url = "nats://…"` or `url = ["nats://…", …]` (at least one).
fn hub_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let urls = match OneOrMany::deserialize(d)
        .map_err(|_| serde::de::Error::custom("a hub url, or a list of them"))?
    {
        OneOrMany::One(u) => vec![u],
        OneOrMany::Many(v) => v,
    };
    if urls.is_empty() {
        return Err(serde::de::Error::custom("the list of hub urls is empty"));
    }
    Ok(urls)
}

/// A hub url as it may be shown in an error: credentials in it (`nats://user:pass@host`) are
/// replaced, as they are a secret.
pub fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((_, host)) => {
            let prefix = if scheme.is_empty() {
                String::new()
            } else {
                format!("{scheme}://")
            };
            format!("{prefix}<credentials>@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// The host part of a hub url (`nats://user:pass@host:4222` → `host`).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    rest.split(':').next().unwrap_or(rest)
}

fn url_is_loopback(url: &str) -> bool {
    let host = url_host(url);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The 1-based line of `offset` in `text` and the dotted key defined on that line, if any.
fn locate(text: &str, offset: usize, header_counts: bool) -> (usize, String) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let mut table = String::new();
    let through = if header_counts { line_no } else { line_no - 1 };
    for line in text.lines().take(through) {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            table = name.trim().to_owned();
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_owned();
        }
    }
    let this_line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = match this_line.split_once('=') {
        Some((k, _)) if !this_line.trim_start().starts_with('[') => k.trim().to_owned(),
        _ => String::new(),
    };
    let full = match (table.is_empty(), key.is_empty()) {
        (_, true) => table,
        (true, false) => key,
        (false, false) => format!("{table}.{key}"),
    };
    (line_no, full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = Config::parse(EMBEDDED_DEFAULT, "default").expect("embedded default");
        assert_eq!(c.mqtt.listen, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(c.relay.data_dir, PathBuf::from("./relaybox-data"));
        assert!(c.uplink.is_none());
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../config/relaybox.toml");
        let c = Config::parse(text, "config/relaybox.toml").expect("example config");
        assert!(c.uplink.is_some());
        assert!(!c.export.is_empty());
        assert!(!c.serial.is_empty());
        assert!(!c.modbus.is_empty());
    }

    fn err(text: &str) -> String {
        Config::parse(text, "r.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let cases: &[(&str, &str)] = &[
            (
                "[relay]\nname = \"a\"\ndata_dir = \"d\"\ncolour = 1\n",
                "r.toml:4: key `relay.colour`: unknown field `colour`",
            ),
            (
                "[relay]\nname = \"a\"\ndata_dir = \"d\"\n[mqtt]\nlisten = 5\n",
                "r.toml:5: key `mqtt.listen`: invalid type",
            ),
            (
                "[relay]\nname = \"a\"\ndata_dir = \"d\"\n[mqtt]\nlisten = \"nowhere\"\n",
                "r.toml:5: key `mqtt.listen`: invalid socket address",
            ),
            (
                "[relay]\nname = \"a\"\ndata_dir = \"d\"\n[outbox]\npolicy = \"drop-all\"\n",
                "r.toml:5: key `outbox.policy`: unknown variant `drop-all`",
            ),
            (
                "[relay]\nname = \"a b\"\ndata_dir = \"d\"\n",
                "r.toml:2: key `relay.name`: relay name",
            ),
            (
                "[relay]\nname = \"a\"\ndata_dir = \"d\"\n[uplink]\nurl = \"nats://127.0.0.1:4222\"\nsubject_prefix = \"x\"\n[[export]]\nfilter = \"a/#/b\"\n",
                "r.toml:8: key `export.filter`:",
            ),
            (
                "[relay]\nname = \"a\"\ndata_dir = \"d\"\n[[export]]\nfilter = \"a/#\"\n",
                "r.toml:4: key `export`: export rules need an [uplink]",
            ),
            (
                "[relay]\nname = \"a\"\ndata_dir = \"d\"\n[admin]\nlisten = \"0.0.0.0:9180\"\n",
                "r.toml:4: key `admin.listen`: 0.0.0.0:9180 is not a loopback address; to serve \
                 the admin page beyond the box use tls_listen",
            ),
            (
                "[relay]\nname = \"a\"\ndata_dir = \"d\"\n[admin]\ntls_listen = \"0.0.0.0:9443\"\n",
                "r.toml:4: key `admin.tls_listen`: tls_listen needs both tls_cert and tls_key",
            ),
            ("[relay\n", "r.toml:1:"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(
                got.starts_with(want),
                "for {text:?}\n got: {got}\nwant: {want}…"
            );
            assert!(!got.contains('\n'), "error is one line: {got}");
        }
    }

    #[test]
    fn security_settings_are_checked() {
        let head = "[relay]\nname = \"a\"\ndata_dir = \"d\"\n";
        let cases: &[(&str, &str)] = &[
            (
                "[mqtt]\nlisten = \"127.0.0.1:1\"\ntls_listen = \"127.0.0.1:2\"\n",
                "key `mqtt.tls_cert`: tls_listen and wss_listen need both",
            ),
            (
                "[[acl]]\npublish = [\"a\"]\n",
                "key `acl`: each [[acl]] rule needs exactly one",
            ),
            (
                "[[acl]]\ngroup = \"g\"\n",
                "key `acl.group`: group \"g\" is not defined",
            ),
            (
                "[[acl]]\nuser = \"u\"\npublish = [\"a/#/b\"]\n",
                "key `acl.publish`:",
            ),
            (
                "[uplink]\nurl = \"nats://192.0.2.1:4222\"\nsubject_prefix = \"p\"\n",
                "key `uplink.url`: hub 192.0.2.1 is not on this machine and the link is not encrypted",
            ),
            (
                "[uplink]\nurl = \"nats://127.0.0.1:4222\"\nsubject_prefix = \"p\"\nuser = \"u\"\n",
                "key `uplink.user`: user and password go together",
            ),
            (
                "[uplink]\nurl = \"nats://127.0.0.1:4222\"\nsubject_prefix = \"p\"\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"\n",
                "key `uplink`: use one way to authenticate",
            ),
        ];
        for (body, want) in cases {
            let got = err(&format!("{head}{body}"));
            assert!(
                got.contains(want),
                "for {body:?}\n got: {got}\nwant: …{want}…"
            );
        }
        for ok in [
            "[uplink]\nurl = \"tls://hub.example.org:4222\"\nsubject_prefix = \"p\"\n",
            "[uplink]\nurl = \"nats://hub.example.org:4222\"\nsubject_prefix = \"p\"\nca_file = \"ca.pem\"\n",
            "[uplink]\nurl = \"nats://192.0.2.1:4222\"\nsubject_prefix = \"p\"\ninsecure = true\n",
            "[uplink]\nurl = \"nats://[::1]:4222\"\nsubject_prefix = \"p\"\n",
            "[uplink]\nurl = \"nats://u:p@localhost:4222\"\nsubject_prefix = \"p\"\n",
        ] {
            Config::parse(&format!("{head}{ok}"), "r.toml").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let c = Config::parse(
            "[relay]\nname = \"a\"\ndata_dir = \"d\"\n[uplink]\nurl = \"nats://127.0.0.1:4222\"\nsubject_prefix = \"p\"\nuser = \"u\"\npassword = \"hunter2\"\n",
            "r.toml",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn missing_relay_section_is_an_error() {
        let got = err("[mqtt]\nlisten = \"127.0.0.1:1\"\n");
        assert!(got.contains("missing field `relay`"), "{got}");
    }

    const RELAY: &str = "[relay]\nname = \"a\"\ndata_dir = \"d\"\n";
    const UPLINK: &str = "[uplink]\nurl = \"nats://127.0.0.1:4222\"\nsubject_prefix = \"x\"\n";

    #[test]
    fn serial_ports_parse_with_defaults() {
        let text = format!(
            "{RELAY}{UPLINK}[[export]]\nfilter = \"meters/#\"\n\
             [[serial]]\npath = \"/dev/ttyUSB0\"\nframing = \"line\"\ntopic = \"meters/{{name}}\"\n\
             [[serial]]\nname = \"door\"\npath = \"/dev/ttyAMA0\"\nbaud = 9600\ndata_bits = 7\n\
             parity = \"even\"\nstop_bits = 2\nframing = \"length-prefixed\"\nmax_frame = 65535\n\
             topic = \"doors/{{name}}/events\"\nexport = false\ncommand_topic = \"doors/{{name}}/cmd\"\n\
             gap_timeout_ms = 50\n"
        );
        let c = Config::parse(&text, "r.toml").expect("serial config");
        let [usb, door] = &c.serial[..] else {
            panic!("two ports expected: {:?}", c.serial)
        };
        assert_eq!(usb.port_name(), "ttyUSB0");
        assert_eq!(usb.resolved_topic(), "meters/ttyUSB0");
        assert_eq!(
            (usb.baud, usb.data_bits, usb.parity, usb.stop_bits),
            (115_200, 8, Parity::None, 1)
        );
        assert_eq!(
            (usb.framing, usb.max_frame, usb.export),
            (Framing::Line, 1024, None)
        );
        assert_eq!(
            (usb.command_topic.as_deref(), usb.gap_timeout_ms),
            (None, 200)
        );
        assert_eq!(door.port_name(), "door");
        assert_eq!(
            (door.baud, door.data_bits, door.parity, door.stop_bits),
            (9600, 7, Parity::Even, 2)
        );
        assert_eq!(door.framing, Framing::LengthPrefixed);
        assert_eq!(door.resolved_topic(), "doors/door/events");
        assert_eq!(
            door.resolved_command_topic().as_deref(),
            Some("doors/door/cmd")
        );
        assert_eq!((door.export, door.gap_timeout_ms), (Some(false), 50));
    }

    #[test]
    fn serial_errors_name_file_line_and_key() {
        let port = |body: &str| format!("{RELAY}[[serial]]\npath = \"/dev/ttyS0\"\n{body}");
        let base = "framing = \"cobs\"\ntopic = \"s/{name}\"\n";
        let cases: Vec<(String, &str)> = vec![
            (port("framing = \"slip\"\ntopic = \"t\"\n"), "r.toml:6: key `serial.framing`: unknown variant `slip`"),
            (port(&format!("{base}baud = 0\n")), "r.toml:8: key `serial.baud`: baud must be at least 1"),
            (port(&format!("{base}data_bits = 9\n")), "r.toml:8: key `serial.data_bits`: data_bits 9"),
            (port(&format!("{base}stop_bits = 3\n")), "r.toml:8: key `serial.stop_bits`: stop_bits 3"),
            (port(&format!("{base}parity = \"mark\"\n")), "r.toml:8: key `serial.parity`: unknown variant `mark`"),
            (port(&format!("{base}max_frame = 70000\n")), "r.toml:8: key `serial.max_frame`: max_frame 70000"),
            (port(&format!("{base}max_frame = 0\n")), "r.toml:8: key `serial.max_frame`: max_frame 0"),
            (port(&format!("{base}gap_timeout_ms = 0\n")), "r.toml:8: key `serial.gap_timeout_ms`: gap_timeout_ms must"),
            (port(&format!("{base}speed = 1\n")), "r.toml:8: key `serial.speed`: unknown field `speed`"),
            (port(&format!("{base}name = \"a b\"\n")), "r.toml:8: key `serial.name`: port name \"a b\""),
            (port("framing = \"line\"\ntopic = \"s/+\"\n"), "r.toml:7: key `serial.topic`:"),
            (port("framing = \"line\"\ntopic = \"s/{port}\"\n"), "r.toml:7: key `serial.topic`: \"s/{port}\": the only placeholder"),
            (port("framing = \"line\"\ntopic = \"s t\"\n"), "r.toml:7: key `serial.topic`:"),
            (port(&format!("{base}command_topic = \"c/#/x\"\n")), "r.toml:8: key `serial.command_topic`:"),
            (port("framing = \"line\"\n"), "r.toml:4: key `serial`: missing field `topic`"),
            (
                port(&format!("{base}export = true\n")),
                "r.toml:8: key `serial.export`: exporting serial frames needs an [uplink]",
            ),
            (
                port(&format!("{base}command_topic = \"s/#\"\n")),
                "r.toml:8: key `serial.command_topic`: \"s/#\" matches the port's own topic \"s/ttyS0\"",
            ),
            (
                format!(
                    "{}\n[[serial]]\npath = \"/dev/usb/ttyS0\"\n{base}",
                    port(base)
                ),
                "r.toml:10: key `serial.path`: a serial port named \"ttyS0\" is already configured",
            ),
            (
                format!(
                    "{}\n[[serial]]\nname = \"b\"\npath = \"/dev/ttyS0\"\n{base}",
                    port(base)
                ),
                "r.toml:11: key `serial.path`: /dev/ttyS0 is already configured",
            ),
            (
                format!("{RELAY}[[serial]]\npath = \"/dev/tty:S0\"\n{base}"),
                "r.toml:5: key `serial.path`: the port name taken from the path, \"tty:S0\"",
            ),
        ];
        for (text, want) in &cases {
            let got = err(text);
            assert!(
                got.starts_with(want),
                "for {text:?}\n got: {got}\nwant: {want}…"
            );
            assert!(!got.contains('\n'), "error is one line: {got}");
        }
    }

    #[test]
    fn modbus_errors_name_file_line_and_key() {
        // RELAY is 3 lines; the device starts at line 4.
        let dev = |body: &str, regs: &str| {
            format!(
                "{RELAY}[[modbus]]\npath = \"/dev/ttyUSB0\"\ntopic = \"s/{{name}}/{{register}}\"\n{body}{regs}"
            )
        };
        let reg = "[[modbus.register]]\nname = \"p\"\nkind = \"holding\"\naddress = 0\n";
        let cases: Vec<(String, &str)> = vec![
            (dev("unit = 0\n", reg), "r.toml:7: key `modbus.unit`: unit 0 must be a device address from 1 to 247"),
            (dev("unit = 248\n", reg), "r.toml:7: key `modbus.unit`: unit 248"),
            (dev("", reg), "r.toml:4: key `modbus`: missing field `unit`"),
            (dev("unit = 1\npoll = \"fast\"\n", reg), "r.toml:8: key `modbus.poll`: duration \"fast\""),
            (dev("unit = 1\n", ""), "r.toml:4: key `modbus.register`: a device needs at least one [[modbus.register]]"),
            (
                format!("{RELAY}[[modbus]]\npath = \"/dev/ttyUSB0\"\nunit = 1\ntopic = \"s/{{name}}\"\n{reg}"),
                "r.toml:7: key `modbus.topic`: \"s/{name}\" needs {register} as a level of its own",
            ),
            (dev("unit = 1\ncommand_topic = \"c/+/{register}\"\n", reg), "r.toml:8: key `modbus.command_topic`: \"c/+/{register}\" must not hold wildcards"),
            (
                dev("unit = 1\ncommand_topic = \"s/{name}/{register}\"\n", reg),
                "r.toml:8: key `modbus.command_topic`: \"s/ttyUSB0/+\" matches the value topic of register \"p\"",
            ),
            (dev("unit = 1\nexport = true\n", reg), "r.toml:8: key `modbus.export`: exporting Modbus values needs an [uplink]"),
            (
                dev("unit = 1\n", "[[modbus.register]]\nname = \"c\"\nkind = \"coil\"\naddress = 0\ntype = \"u16\"\n"),
                "r.toml:12: key `modbus.register.type`: a coil register holds bool, not u16",
            ),
            (
                dev("unit = 1\n", "[[modbus.register]]\nname = \"h\"\nkind = \"holding\"\naddress = 0\ntype = \"bool\"\n"),
                "r.toml:12: key `modbus.register.type`: a holding register holds u16, i16, u32, i32 or f32, not bool",
            ),
            (
                dev("unit = 1\n", "[[modbus.register]]\nname = \"h\"\nkind = \"holding\"\naddress = 65535\ntype = \"f32\"\n"),
                "r.toml:11: key `modbus.register.address`: f32 at 65535 runs past address 65535",
            ),
            (
                dev("unit = 1\n", "[[modbus.register]]\nname = \"h\"\nkind = \"holding\"\naddress = 0\nscale = 0\n"),
                "r.toml:12: key `modbus.register.scale`: scale 0 must be a finite number other than 0",
            ),
            (
                dev("unit = 1\n", "[[modbus.register]]\nname = \"a/b\"\nkind = \"holding\"\naddress = 0\n"),
                "r.toml:9: key `modbus.register.name`: register name \"a/b\"",
            ),
            (
                dev("unit = 1\n", &format!("{reg}{reg}")),
                "r.toml:13: key `modbus.register.name`: register \"p\" is already named in this device",
            ),
            (
                format!("{}[[modbus]]\nname = \"b\"\npath = \"/dev/ttyUSB0\"\nunit = 1\ntopic = \"t/{{register}}\"\n{reg}", dev("unit = 1\n", reg)),
                "r.toml:15: key `modbus.unit`: unit 1 on /dev/ttyUSB0 is already configured (device \"ttyUSB0\")",
            ),
            (
                format!("{}[[modbus]]\nname = \"b\"\npath = \"/dev/ttyUSB0\"\nunit = 2\nbaud = 19200\ntopic = \"t/{{register}}\"\n{reg}", dev("unit = 1\n", reg)),
                "r.toml:16: key `modbus.baud`: devices on one bus (/dev/ttyUSB0) need the same baud",
            ),
            (
                format!("{}[[modbus]]\npath = \"/dev/x/ttyUSB0\"\nunit = 2\ntopic = \"t/{{register}}\"\n{reg}", dev("unit = 1\n", reg)),
                "r.toml:13: key `modbus.path`: a Modbus device named \"ttyUSB0\" is already configured",
            ),
            (
                format!("{RELAY}[[serial]]\npath = \"/dev/ttyUSB0\"\nframing = \"line\"\ntopic = \"x\"\n[[modbus]]\npath = \"/dev/ttyUSB0\"\nunit = 1\ntopic = \"s/{{register}}\"\n{reg}"),
                "r.toml:9: key `modbus.path`: /dev/ttyUSB0 is a [[serial]] port",
            ),
        ];
        for (text, want) in &cases {
            let got = err(text);
            assert!(
                got.starts_with(want),
                "for {text:?}\n got: {got}\nwant: {want}…"
            );
            assert!(!got.contains('\n'), "error is one line: {got}");
        }
    }

    #[test]
    fn modbus_devices_parse_with_defaults() {
        let text = format!(
            "{RELAY}[[modbus]]\npath = \"/dev/ttyUSB0\"\nunit = 7\ntopic = \"s/{{name}}/{{register}}\"\n\
             [[modbus.register]]\nname = \"c\"\nkind = \"coil\"\naddress = 1\n"
        );
        let c = Config::parse(&text, "r.toml").expect("config");
        let d = &c.modbus[0];
        assert_eq!(
            (d.baud, d.data_bits, d.parity, d.stop_bits),
            (9600, 8, Parity::None, 1)
        );
        assert_eq!(d.poll, std::time::Duration::from_secs(1));
        assert_eq!(d.republish, std::time::Duration::from_secs(60));
        assert_eq!(d.timeout, std::time::Duration::from_secs(1));
        assert_eq!(d.device_name(), "ttyUSB0");
        assert_eq!(d.register[0].value_type(), ValueType::Bool);
        assert_eq!(d.topic_of("$state"), "s/ttyUSB0/$state");
    }

    #[test]
    fn the_hub_is_one_url_or_a_list() {
        let up = |url: &str, extra: &str| {
            format!("{RELAY}[uplink]\nurl = {url}\nsubject_prefix = \"x\"\n{extra}")
        };
        let one = Config::parse(&up("\"nats://127.0.0.1:4222\"", ""), "r.toml").expect("one");
        let u = one.uplink.expect("uplink");
        assert_eq!(u.url, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(u.replicas, 1);
        let list = Config::parse(
            &up(
                "[\"nats://127.0.0.1:4222\", \"nats://127.0.0.1:4223\"]",
                "replicas = 3\n",
            ),
            "r.toml",
        )
        .expect("list");
        let u = list.uplink.expect("uplink");
        assert_eq!(u.url.len(), 2);
        assert_eq!(u.replicas, 3);
        for (text, want) in [
            (
                up("[]", ""),
                "r.toml:5: key `uplink.url`: the list of hub urls is empty",
            ),
            (
                up("7", ""),
                "r.toml:5: key `uplink.url`: a hub url, or a list of them",
            ),
            (
                up("[\"nats://127.0.0.1:1\", \"http://127.0.0.1:2\"]", ""),
                "r.toml:5: key `uplink.url`: hub url \"http://127.0.0.1:2\" must start with",
            ),
            (
                up(
                    "[\"nats://127.0.0.1:1\", \"nats://hub.example.org:4222\"]",
                    "",
                ),
                "r.toml:5: key `uplink.url`: hub hub.example.org is not on this machine",
            ),
            (
                up("\"nats://127.0.0.1:1\"", "replicas = 0\n"),
                "r.toml:7: key `uplink.replicas`: 0 must be from 1 to 5",
            ),
            (
                up("\"nats://127.0.0.1:1\"", "replicas = 6\n"),
                "r.toml:7: key `uplink.replicas`: 6 must be from 1 to 5",
            ),
        ] {
            let got = err(&text);
            assert!(
                got.starts_with(want),
                "for {text:?}\n got: {got}\nwant: {want}…"
            );
        }
    }

    #[test]
    fn a_missing_key_names_its_own_table() {
        let got = err(&format!("{RELAY}[uplink]\nurl = \"nats://h:4222\"\n"));
        assert!(
            got.starts_with("r.toml:4: key `uplink`: missing field `subject_prefix`"),
            "{got}"
        );
        let got = err("[mqtt]\nlisten = \"127.0.0.1:1\"\n");
        assert!(got.starts_with("r.toml:1: missing field `relay`"), "{got}");
    }

    #[test]
    fn table_key_line_finds_the_key_of_the_nth_table() {
        let text = "[relay]\nname = \"r\"\n[[serial]]\nname = \"a\"\n\n[[serial]] # two\npath = \"p\"\nname = \"b\"\n[mqtt]\nname = 1\n";
        assert_eq!(table_key_line(text, "serial", 0, "name"), 4);
        assert_eq!(table_key_line(text, "serial", 1, "name"), 8);
        assert_eq!(table_key_line(text, "serial", 1, "topic"), 6);
        assert_eq!(table_key_line(text, "serial", 2, "name"), 1);
    }

    #[test]
    fn credentials_in_a_hub_url_are_never_shown() {
        for (url, shown) in [
            ("nats://u:pw@hub:4222", "nats://<credentials>@hub:4222"),
            ("natss://pw@hub/x@y", "natss://<credentials>@hub/x@y"),
            ("u:pw@hub:4222", "<credentials>@hub:4222"),
            ("nats://hub:4222", "nats://hub:4222"),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
        }
        let got = err(&format!(
            "{RELAY}[uplink]\nurl = \"natss://u:s3cret@127.0.0.1:1\"\nsubject_prefix = \"x\"\n"
        ));
        assert!(
            got.contains("natss://<credentials>@127.0.0.1:1") && !got.contains("s3cret"),
            "{got}"
        );
    }
}
