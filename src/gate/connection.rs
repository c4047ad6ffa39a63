//! One client connection through the gate.
//!
//! Three parts run together:
//! - the **reader** frames client packets, checks PUBLISH and SUBSCRIBE against the ACL,
//!   appends exported PUBLISHes to the outbox and queues every packet, in order, for the
//!   forwarder;
//! - the **forwarder** writes queued packets to the internal broker, waiting on an exported
//!   QoS 1/2 PUBLISH until its record is durable, and hands the gate's own replies (denials,
//!   refusals) to the writer;
//! - the **writer** copies the broker's packets (whole frames) back to the client, puts refused
//!   filters back into SUBACKs, and interleaves the gate's replies; for an MQTT 5 client it
//!   keeps the client's Receive Maximum and Maximum Packet Size (see `egress`).
//!
//! The reader stopping (client closed, shutdown, bad input) lets the forwarder drain what was
//! already read before the connection to the broker is closed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::acl::Who;
use super::auth::Auth;
use super::egress::{self, Egress};
use super::lock;
use super::tls::Tls;
use super::{GateSettings, GateStats};
use crate::broker::{self, Ack, CodecError, Refusal, TopicAliases, Verdict, Version};
use crate::proto::{Header, Origin, OutboxRecord};
use crate::store::{Store, StoreError, Ticket};

/// State shared by every connection of one gate.
pub struct Shared {
    pub(super) v4: SocketAddr,
    pub(super) v5: SocketAddr,
    pub(super) settings: GateSettings,
    pub(super) store: Store,
    pub(super) tls: Option<Tls>,
    pub(super) auth: Auth,
    pub(super) slots: Arc<Semaphore>,
    pub(super) last_busy_warning: AtomicU64,
    pub(super) started: Instant,
    /// Client id → packet ids its last connection left unacknowledged (see `ConnState`).
    pub(super) redeliveries: Mutex<HashMap<String, HashSet<u16>>>,
    pub stats: GateStats,
}

/// How long the writer may go on delivering the broker's last replies after the client side
/// is done.
const LINGER: Duration = Duration::from_secs(2);
/// Packets read ahead of the forwarder per connection.
const QUEUE: usize = 1024;
/// MQTT 5 reason codes the gate sends in DISCONNECT.
const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
const PACKET_TOO_LARGE: u8 = 0x95;
const PROTOCOL_ERROR: u8 = 0x82;
const MALFORMED_PACKET: u8 = 0x81;
const TOPIC_NAME_INVALID: u8 = 0x90;
const KEEP_ALIVE_TIMEOUT: u8 = 0x8d;
/// How long the forwarder lets the internal connection go without writing to it before it
/// sends a PINGREQ of its own: well within rumqttd's limit of 1.5 × the internal keep-alive.
const INTERNAL_PING: Duration = Duration::from_secs(broker::INTERNAL_KEEP_ALIVE as u64 / 2);
/// PINGREQ, the same in 3.1.1 and 5.
const PINGREQ: [u8; 2] = [0xc0, 0x00];

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("the connection closed in the middle of a packet")]
    Truncated,
    #[error("a client may not send packet type {0}")]
    Forbidden(u8),
    #[error("packet type {0} with reserved flags set wrongly")]
    BadFlags(u8),
    #[error("PUBLISH to {0:?}: a topic name may not hold '+' or '#'")]
    WildcardTopic(String),
    #[error("PUBLISH to {0:?}: the local broker cannot take a topic that starts with a non-ASCII character")]
    UnroutableTopic(String),
    #[error("PUBLISH with an unknown topic alias {0}")]
    UnknownAlias(u16),
    #[error("login refused ({0:?})")]
    LoginRefused(broker::ConnectRefusal),
    #[error("more than {0} QoS 1/2 publishes unacknowledged")]
    TooManyInflight(usize),
    #[error("publish to {topic:?} refused and the client speaks MQTT 3.1.1, which has no refusal code: {reason}")]
    RefusedV4 { topic: String, reason: StoreError },
    #[error("the internal broker is unreachable: {0}")]
    Upstream(std::io::Error),
    #[error("no packet from the client within {0:?} (1.5 × its keep-alive)")]
    KeepAliveTimeout(Duration),
    #[error("the relay is shutting down")]
    Closed,
}

enum Forward {
    /// Forward as it is.
    Now(Bytes),
    /// Forward once the records (outbox, retained) are durable; refuse otherwise.
    Durable {
        tickets: Vec<Ticket>,
        packet: Bytes,
        topic: String,
        qos: u8,
        pkid: u16,
    },
    /// A reply the gate makes itself, sent to the client in its turn.
    Reply(Bytes),
    /// Nothing from the client: acknowledgements of the gate's own may be due to the broker
    /// (see [`Egress::owed`]).
    Owed,
}

/// What the reader and writer of one connection share.
#[derive(Default)]
struct ConnState {
    /// SUBSCRIBEs sent on with some filters removed: packet id → which filters were allowed.
    partial_subscribes: Mutex<HashMap<u16, Vec<broker::Verdict>>>,
    /// QoS 1/2 publishes from the client not yet acknowledged to it.
    inflight: AtomicUsize,
    /// PINGREQs the gate sent to the broker itself whose PINGRESP has not come back yet (those
    /// are not passed to the client).
    own_pings: AtomicUsize,
    /// The MQTT 5 client's Receive Maximum and Maximum Packet Size on what the broker sends it.
    egress: Egress,
    /// Packet ids of QoS 1/2 PUBLISHes passed to the client that it has not acknowledged yet
    /// (PUBACK, PUBREC): what the broker sends again when the session resumes.
    delivering: Mutex<HashSet<u16>>,
    /// Packet ids the last connection of this session left unacknowledged: their next PUBLISH
    /// is a redelivery and carries DUP [MQTT-4.4.0-1], which the broker does not set.
    redeliver: Mutex<HashSet<u16>>,
}

/// Sessions whose unacknowledged deliveries are remembered at most (a client id's entry goes
/// when it connects again).
const REDELIVERIES_MAX: usize = 10_000;

pub(super) async fn serve<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    cert_user: Option<String>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    shared.stats.connected.fetch_add(1, Ordering::Relaxed);
    let result = run(&shared, stream, cert_user, &shutdown).await;
    shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(()) => tracing::debug!(%peer, "client connection closed"),
        Err(ConnError::LoginRefused(refusal)) => {
            shared.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, ?refusal, "login refused");
        }
        Err(error) => {
            shared
                .stats
                .closed_for_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, %error, "closed client connection");
        }
    }
}

async fn run<S>(
    shared: &Shared,
    stream: S,
    cert_user: Option<String>,
    shutdown: &CancellationToken,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let max = shared.settings.max_packet_size;
    let (mut client_rd, mut client_wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(4096);

    let timeout = shared.settings.connect_timeout;
    let connect = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(timeout, read_connect(&mut client_rd, &mut buf, max)) => {
            r.map_err(|_| ConnError::ConnectTimeout(timeout))??
        }
    };
    let Some((_, connect)) = connect else {
        return Ok(());
    };
    let info = match broker::decode_connect(&connect, max) {
        Ok(info) => info,
        Err(CodecError::UnsupportedLevel(level)) => {
            // CONNACK "unacceptable protocol version" (0x01 in 3.1.1; the 5 form is 0x84,
            // but a client of an unknown level is best answered in the oldest form).
            let _ = client_wr.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
            return Err(CodecError::UnsupportedLevel(level).into());
        }
        Err(CodecError::Protocol(what)) => {
            // Only MQTT 5 CONNECT properties are checked this way: the answer is a 5 CONNACK.
            let _ = client_wr
                .write_all(&broker::connack_protocol_error(what))
                .await;
            let _ = client_wr.shutdown().await;
            return Err(CodecError::Protocol(what).into());
        }
        Err(e) => return Err(e.into()),
    };
    let login = if broker::client_id_acceptable(&info.client_id) {
        match shared.auth.authenticate(&info, cert_user).await {
            Ok(user) => will_allowed(shared, &info, user.as_deref()).map(|()| user),
            Err(refusal) => Err(refusal),
        }
    } else {
        Err(broker::ConnectRefusal::BadClientId)
    };
    let user = match login {
        Ok(user) => user,
        Err(refusal) => {
            let _ = client_wr
                .write_all(&broker::connack_refusal(info.version, refusal))
                .await;
            let _ = client_wr.shutdown().await;
            return Err(ConnError::LoginRefused(refusal));
        }
    };
    // The gate enforces the client's keep-alive itself (0 is "none", which rumqttd refuses)
    // and keeps the internal connection alive with its own pings: the broker is asked for a
    // fixed keep-alive of its own, so that the two never fight.
    let mut changes = broker::ConnectChanges {
        keep_alive: broker::INTERNAL_KEEP_ALIVE,
        ..Default::default()
    };
    let mut client_id = info.client_id.clone();
    let mut connack = broker::ConnackAdditions::default();
    if info.version == Version::V5 {
        // An empty client id gets one of the gate's making, also without a clean start (the
        // broker refuses that) [MQTT-3.1.3-6].
        if client_id.is_empty() {
            client_id = format!("relaybox-{:016x}", rand::random::<u64>());
            changes.client_id = Some(client_id.clone());
            connack.assigned_client_id = Some(client_id.clone());
        }
        // The limits the gate enforces, which the broker's CONNACK does not state.
        connack.receive_maximum = u16::try_from(shared.settings.max_inflight).ok();
        connack.maximum_packet_size = u32::try_from(shared.settings.max_packet_size).ok();
        // The broker keys its topic aliases by subscription filter, not by topic, and so
        // names the wrong topic; without them it sends full topic names, which is allowed.
        changes.no_topic_aliases = true;
    }
    let state = ConnState {
        redeliver: Mutex::new(
            lock(&shared.redeliveries)
                .remove(&client_id)
                .unwrap_or_default(),
        ),
        ..ConnState::default()
    };
    let result = serve_session(
        shared,
        &info,
        &client_id,
        user.as_deref(),
        &connack,
        &changes,
        connect,
        &state,
        (client_rd, client_wr, buf),
        shutdown,
    )
    .await;
    // A session the broker keeps (no clean start) gets its unacknowledged deliveries again on
    // its next connection.
    if !info.clean_start {
        let pending = std::mem::take(&mut *lock(&state.delivering));
        let mut remembered = lock(&shared.redeliveries);
        if !pending.is_empty() && remembered.len() < REDELIVERIES_MAX {
            remembered.insert(client_id.clone(), pending);
        }
    }
    result
}

/// The connection after a successful login: the broker's side is opened and the three parts
/// run.
#[allow(clippy::too_many_arguments)]
async fn serve_session<R, W>(
    shared: &Shared,
    info: &broker::ConnectInfo,
    client_id: &str,
    user: Option<&str>,
    connack: &broker::ConnackAdditions,
    changes: &broker::ConnectChanges,
    connect: Bytes,
    state: &ConnState,
    (client_rd, mut client_wr, buf): (R, W, BytesMut),
    shutdown: &CancellationToken,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = shared.settings.max_packet_size;
    let connect = broker::rewrite_connect(info.version, &connect, max, changes)?;
    let upstream_addr = match info.version {
        Version::V4 => shared.v4,
        Version::V5 => shared.v5,
    };
    let upstream = TcpStream::connect(upstream_addr)
        .await
        .map_err(ConnError::Upstream)?;
    let _ = upstream.set_nodelay(true);
    let (upstream_rd, mut upstream_wr) = upstream.into_split();
    upstream_wr.write_all(&connect).await?;

    let (replies_tx, replies_rx) = mpsc::channel::<Bytes>(64);
    let (queue_tx, queue_rx) = mpsc::channel::<Forward>(QUEUE);
    let client = Client {
        shared,
        version: info.version,
        client_id,
        user,
        keep_alive: info.keep_alive,
        // The client's limits on what it is sent; 3.1.1 has neither. (A CONNECT with Receive
        // Maximum or Maximum Packet Size 0 was refused above as a protocol error.)
        receive_maximum: match info.version {
            Version::V5 => usize::from(info.receive_maximum),
            Version::V4 => usize::MAX,
        },
        maximum_packet_size: match info.version {
            Version::V5 => info
                .maximum_packet_size
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            Version::V4 => None,
        },
        connack,
        state,
    };

    // The reader stops at shutdown, or when the forwarder gave up on the connection.
    let stop = shutdown.child_token();
    let reader = client.read(client_rd, buf, queue_tx, &stop);
    // The write half lives until the end of this function: dropping it closes the socket.
    let forwarder = async {
        let result = client.forward(queue_rx, &mut upstream_wr, replies_tx).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let writer = client.write(upstream_rd, &mut client_wr, replies_rx);
    tokio::pin!(writer);

    let both = async {
        let (r, f) = tokio::join!(reader, forwarder);
        f.and(r)
    };
    tokio::select! {
        result = both => {
            // Let the broker's last acknowledgements and the gate's last reply (a refusal, a
            // DISCONNECT with its reason) reach the client.
            let _ = tokio::time::timeout(LINGER, &mut writer).await;
            result
        }
        result = &mut writer => result,
    }
}

/// Reads the first packet, which must be a CONNECT: anything else is refused at its first
/// byte rather than after waiting for the length it claims.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(broker::Frame, Bytes)>, ConnError> {
    while buf.is_empty() {
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
    if buf[0] != 0x10 {
        return Err(CodecError::NotConnect.into());
    }
    read_packet(rd, buf, max).await
}

/// A will message is a publish the router makes for the client when its connection breaks: its
/// topic must be a topic name the router can take, and the ACL must let the client publish there.
fn will_allowed(
    shared: &Shared,
    info: &broker::ConnectInfo,
    user: Option<&str>,
) -> Result<(), broker::ConnectRefusal> {
    let Some(topic) = &info.will_topic else {
        return Ok(());
    };
    if topic.is_empty() || topic.contains(['+', '#']) || !broker::topic_routable(topic) {
        return Err(broker::ConnectRefusal::BadWillTopic);
    }
    let who = Who {
        user,
        client_id: &info.client_id,
    };
    if !shared.auth.acl().may_publish(who, topic) {
        shared
            .stats
            .denied_publishes
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            client_id = info.client_id,
            user,
            topic,
            "will message denied by ACL"
        );
        return Err(broker::ConnectRefusal::NotAuthorized);
    }
    Ok(())
}

/// Reads one whole packet; `None` at a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(broker::Frame, Bytes)>, ConnError> {
    loop {
        if let Some(f) = broker::frame(buf, max)? {
            return Ok(Some((f, buf.split_to(f.len).freeze())));
        }
        if rd.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ConnError::Truncated)
            };
        }
    }
}

/// One authenticated client.
struct Client<'a> {
    shared: &'a Shared,
    version: Version,
    client_id: &'a str,
    user: Option<&'a str>,
    /// The client's keep-alive in seconds; 0: none.
    keep_alive: u16,
    /// QoS 1/2 publishes the client takes unfinished (MQTT 5 Receive Maximum).
    receive_maximum: usize,
    /// The largest packet the client takes (MQTT 5 Maximum Packet Size); `None`: no limit.
    maximum_packet_size: Option<usize>,
    /// What goes into the broker's CONNACK (MQTT 5).
    connack: &'a broker::ConnackAdditions,
    state: &'a ConnState,
}

impl Client<'_> {
    /// Counts a QoS 1/2 publish the store could not keep and answers it: MQTT 5 with a
    /// PUBACK/PUBREC that says why, 3.1.1 (which has no refusal code) by closing the connection.
    fn refusal(
        &self,
        qos: u8,
        pkid: u16,
        topic: String,
        reason: StoreError,
    ) -> Result<Bytes, ConnError> {
        self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        match self.version {
            Version::V5 => {
                let refusal = match reason {
                    StoreError::Full { .. }
                    | StoreError::TooLarge { .. }
                    | StoreError::RetainedFull { .. } => Refusal::QuotaExceeded,
                    _ => Refusal::UnspecifiedError,
                };
                Ok(broker::encode_refusal(
                    qos,
                    pkid,
                    refusal,
                    &reason.to_string(),
                ))
            }
            Version::V4 => Err(ConnError::RefusedV4 { topic, reason }),
        }
    }

    fn who(&self) -> Who<'_> {
        Who {
            user: self.user,
            client_id: self.client_id,
        }
    }

    async fn read<R: AsyncRead + Unpin>(
        &self,
        mut rd: R,
        mut buf: BytesMut,
        queue: mpsc::Sender<Forward>,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnError> {
        let max = self.shared.settings.max_packet_size;
        let mut aliases = TopicAliases::default();
        let mut denied_qos2: HashSet<u16> = HashSet::new();
        let mut denials_logged: HashSet<String> = HashSet::new();
        // A client with a keep-alive must send some packet within 1.5 times it [MQTT-3.1.2-24];
        // keep-alive 0 turns this off.
        let silence =
            (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500));
        let mut deadline = silence.map(|s| tokio::time::Instant::now() + s);
        loop {
            let expired = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                () = expired => {
                    // An abnormal end: the broker's connection is closed without DISCONNECT,
                    // so the client's will is published.
                    self.disconnect(&queue, KEEP_ALIVE_TIMEOUT).await;
                    return Err(ConnError::KeepAliveTimeout(silence.unwrap_or_default()));
                }
                r = read_packet(&mut rd, &mut buf, max) => r,
            };
            let next = match next {
                Ok(next) => next,
                Err(ConnError::Codec(CodecError::TooLarge(n))) => {
                    self.disconnect(&queue, PACKET_TOO_LARGE).await;
                    return Err(CodecError::TooLarge(n).into());
                }
                Err(e) => return Err(e),
            };
            let Some((frame, packet)) = next else {
                return Ok(());
            };
            deadline = silence.map(|s| tokio::time::Instant::now() + s);
            // The client finishing publishes makes room under its Receive Maximum.
            if self.version == Version::V5 && matches!(frame.kind, 4 | 5 | 7) {
                self.state.egress.client_ack(&packet);
            }
            if matches!(frame.kind, 4 | 5) {
                if let Some(pkid) = broker::packet_id(&packet) {
                    lock(&self.state.delivering).remove(&pkid);
                }
            }
            let forward = match frame.kind {
                3 => {
                    let qos = (frame.flags >> 1) & 0b11;
                    if qos > 0 {
                        let inflight = self.state.inflight.fetch_add(1, Ordering::Relaxed) + 1;
                        let limit = self.shared.settings.max_inflight;
                        if inflight > limit {
                            self.disconnect(&queue, RECEIVE_MAXIMUM_EXCEEDED).await;
                            return Err(ConnError::TooManyInflight(limit));
                        }
                    }
                    match self
                        .publish(packet, &mut aliases, &mut denied_qos2, &mut denials_logged)
                        .await
                    {
                        Ok(forward) => forward,
                        Err(e @ (ConnError::WildcardTopic(_) | ConnError::UnroutableTopic(_))) => {
                            self.disconnect(&queue, TOPIC_NAME_INVALID).await;
                            return Err(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
                // SUBSCRIBE, UNSUBSCRIBE and PUBREL must carry the flags 0010 [MQTT-3.8.1-1,
                // 3.10.1-1, 3.6.1-1].
                6 | 8 | 10 if frame.flags != 0b0010 => {
                    self.disconnect(&queue, MALFORMED_PACKET).await;
                    return Err(ConnError::BadFlags(frame.kind));
                }
                // PUBREL of a QoS 2 publish the gate denied: the broker never saw it.
                6 => match broker::packet_id(&packet) {
                    Some(pkid) if denied_qos2.remove(&pkid) => {
                        Forward::Reply(broker::ack_denied(Version::V4, Ack::PubComp, pkid))
                    }
                    _ => Forward::Now(packet),
                },
                8 => self.subscribe(packet, &mut denials_logged)?,
                // CONNECT again, and packets only a server sends (CONNACK, SUBACK, UNSUBACK,
                // PINGRESP), and AUTH, which the broker does not support. Decoding some of
                // these would reach a panic in the broker's codec; they are protocol errors.
                0 | 1 | 2 | 9 | 11 | 13 | 15 => {
                    self.disconnect(&queue, PROTOCOL_ERROR).await;
                    return Err(ConnError::Forbidden(frame.kind));
                }
                _ => Forward::Now(packet),
            };
            if queue.send(forward).await.is_err() {
                return Err(ConnError::Closed);
            }
        }
    }

    /// Queues an MQTT 5 DISCONNECT with `reason` (nothing on 3.1.1) before the connection ends.
    async fn disconnect(&self, queue: &mpsc::Sender<Forward>, reason: u8) {
        if let Some(packet) = broker::disconnect(self.version, reason) {
            let _ = queue.send(Forward::Reply(packet)).await;
        }
    }

    async fn publish(
        &self,
        packet: Bytes,
        aliases: &mut TopicAliases,
        denied_qos2: &mut HashSet<u16>,
        denials_logged: &mut HashSet<String>,
    ) -> Result<Forward, ConnError> {
        let shared = self.shared;
        let max = shared.settings.max_packet_size;
        let p = broker::decode_publish(self.version, &packet, max)?;
        shared.stats.publishes_in.fetch_add(1, Ordering::Relaxed);
        let topic = aliases
            .resolve(&p)
            .ok_or(ConnError::UnknownAlias(p.topic_alias.unwrap_or(0)))?;
        if topic.contains(['+', '#']) {
            return Err(ConnError::WildcardTopic(topic));
        }
        if !broker::topic_routable(&topic) {
            return Err(ConnError::UnroutableTopic(topic));
        }

        if !shared.auth.acl().may_publish(self.who(), &topic) {
            shared
                .stats
                .denied_publishes
                .fetch_add(1, Ordering::Relaxed);
            if denials_logged.insert(format!("p:{topic}")) {
                tracing::warn!(
                    client_id = self.client_id,
                    user = self.user,
                    topic,
                    "publish denied by ACL"
                );
            }
            return Ok(match p.qos {
                0 => Forward::Reply(Bytes::new()),
                1 => Forward::Reply(broker::ack_denied(self.version, Ack::PubAck, p.pkid)),
                _ => {
                    // 3.1.1 carries on with PUBREL/PUBCOMP, which the gate answers itself;
                    // an MQTT 5 PUBREC with a failure code ends the exchange.
                    if self.version == Version::V4 {
                        denied_qos2.insert(p.pkid);
                    }
                    Forward::Reply(broker::ack_denied(self.version, Ack::PubRec, p.pkid))
                }
            });
        }

        let mut exported = shared.settings.exports.iter().any(|f| f.matches(&topic));
        if exported {
            if let Err(error) = crate::mapping::topic_to_subject("x", &topic) {
                // A valid MQTT topic that no NATS subject can carry (a space): it still
                // reaches local subscribers, but cannot go to the hub.
                shared.stats.unexportable.fetch_add(1, Ordering::Relaxed);
                if denials_logged.insert(format!("x:{topic}")) {
                    tracing::warn!(client_id = self.client_id, %error, "message kept local: its topic cannot be sent to the hub");
                }
                exported = false;
            }
        }
        if !exported && !p.retain {
            return Ok(Forward::Now(packet));
        }
        let record = OutboxRecord {
            topic: topic.clone(),
            payload: p.payload,
            qos: u32::from(p.qos),
            retain: p.retain,
            accepted_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            origin: Origin::Mqtt as i32,
            source: self.client_id.to_owned(),
            headers: p
                .user_properties
                .into_iter()
                .map(|(name, value)| Header { name, value })
                .collect(),
        };
        // A retained message is kept in the store (the broker keeps it in memory only), with
        // the same durability as an exported one; an empty payload clears it.
        // One beyond `max_retained_bytes` is refused as a whole: it neither reaches local
        // subscribers nor goes to the hub.
        let mut tickets = Vec::with_capacity(2);
        if p.retain {
            let kept = if p.qos == 0 {
                shared.store.retain_nowait(&record).await.map(|()| None)
            } else {
                shared.store.retain(&record).await.map(Some)
            };
            match kept {
                Ok(ticket) => tickets.extend(ticket),
                Err(reason @ StoreError::RetainedFull { .. }) => {
                    if denials_logged.insert(format!("r:{topic}")) {
                        tracing::warn!(client_id = self.client_id, topic, %reason, "publish refused");
                    }
                    if p.qos == 0 {
                        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                        return Ok(Forward::Reply(Bytes::new()));
                    }
                    return self
                        .refusal(p.qos, p.pkid, topic, reason)
                        .map(Forward::Reply);
                }
                Err(error) if p.qos == 0 => {
                    tracing::warn!(%error, topic, "QoS 0 retained message not kept in the store");
                }
                Err(_) => return Err(ConnError::Closed),
            }
        }
        if exported {
            shared.stats.exported.fetch_add(1, Ordering::Relaxed);
            if p.qos == 0 {
                if let Err(error) = shared.store.append_nowait(&record).await {
                    tracing::warn!(%error, topic, "QoS 0 message not kept for the hub");
                }
            } else {
                let ticket = shared
                    .store
                    .append(&record)
                    .await
                    .map_err(|_| ConnError::Closed)?;
                tickets.push(ticket);
            }
        }
        if tickets.is_empty() {
            return Ok(Forward::Now(packet));
        }
        Ok(Forward::Durable {
            tickets,
            packet,
            topic,
            qos: p.qos,
            pkid: p.pkid,
        })
    }

    fn subscribe(
        &self,
        packet: Bytes,
        denials_logged: &mut HashSet<String>,
    ) -> Result<Forward, ConnError> {
        let max = self.shared.settings.max_packet_size;
        let sub = broker::decode_subscribe(self.version, &packet, max)?;
        let acl = self.shared.auth.acl();
        let verdicts: Vec<Verdict> = sub
            .filters
            .iter()
            .map(|f| match broker::check_filter(f) {
                Verdict::Allow if !acl.may_subscribe(self.who(), f) => Verdict::Deny,
                verdict => verdict,
            })
            .collect();
        if verdicts.iter().all(|v| *v == Verdict::Allow) {
            return Ok(Forward::Now(packet));
        }
        for (filter, verdict) in sub.filters.iter().zip(&verdicts) {
            if *verdict == Verdict::Deny {
                self.shared
                    .stats
                    .denied_subscriptions
                    .fetch_add(1, Ordering::Relaxed);
                if denials_logged.insert(format!("s:{filter}")) {
                    tracing::warn!(
                        client_id = self.client_id,
                        user = self.user,
                        filter,
                        "subscription denied by ACL"
                    );
                }
            }
        }
        if !verdicts.contains(&Verdict::Allow) {
            return Ok(Forward::Reply(broker::suback_refused(
                self.version,
                sub.pkid,
                &verdicts,
            )));
        }
        let keep: Vec<bool> = verdicts.iter().map(|v| *v == Verdict::Allow).collect();
        let subset = broker::subscribe_subset(self.version, &packet, max, &keep)?;
        lock(&self.state.partial_subscribes).insert(sub.pkid, verdicts);
        Ok(Forward::Now(subset))
    }

    async fn forward<W: AsyncWrite + Unpin>(
        &self,
        mut queue: mpsc::Receiver<Forward>,
        upstream: &mut W,
        replies: mpsc::Sender<Bytes>,
    ) -> Result<(), ConnError> {
        let mut upstream = BufWriter::new(upstream);
        let mut disconnected = false;
        let mut pings =
            tokio::time::interval_at(tokio::time::Instant::now() + INTERNAL_PING, INTERNAL_PING);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while let Some(item) = self
            .keeping_alive(
                &mut upstream,
                &mut pings,
                !disconnected,
                self.next(&mut queue),
            )
            .await?
        {
            // Acknowledgements of the gate's own that are due go before anything else (not
            // after a DISCONNECT: the broker closes the connection then).
            if !disconnected {
                self.write_owed(&mut upstream).await?;
            }
            match item {
                Forward::Now(packet) => {
                    disconnected |= packet.first().is_some_and(|b| b >> 4 == 14);
                    upstream.write_all(&packet).await?;
                    if self.maximum_packet_size.is_some() && !disconnected {
                        self.state.egress.forwarded(&packet);
                        self.write_owed(&mut upstream).await?;
                    }
                }
                Forward::Owed => {}
                Forward::Reply(packet) => {
                    if !packet.is_empty() {
                        upstream.flush().await?;
                        if replies.send(packet).await.is_err() {
                            return Err(ConnError::Closed);
                        }
                    }
                }
                Forward::Durable {
                    tickets,
                    packet,
                    topic,
                    qos,
                    pkid,
                } => {
                    // What is already forwarded must not wait in the buffer for this commit.
                    upstream.flush().await?;
                    let mut durable = Ok(0);
                    for ticket in tickets {
                        let result = self
                            .keeping_alive(&mut upstream, &mut pings, true, ticket.durable())
                            .await?;
                        if durable.is_ok() {
                            durable = result;
                        }
                    }
                    match durable {
                        Ok(_) => upstream.write_all(&packet).await?,
                        Err(reason) => {
                            upstream.flush().await?;
                            tracing::warn!(topic, %reason, "publish refused");
                            let reply = self.refusal(qos, pkid, topic, reason)?;
                            if replies.send(reply).await.is_err() {
                                return Err(ConnError::Closed);
                            }
                        }
                    }
                }
            }
            if queue.is_empty() {
                upstream.flush().await?;
            }
        }
        upstream.flush().await?;
        // After a DISCONNECT the broker closes the connection itself. Closing it from this
        // side first makes rumqttd report the disconnect twice, and the second report can
        // hit a new connection that was given the same id: so only without one.
        if !disconnected {
            upstream.shutdown().await?;
        }
        Ok(())
    }

    /// The next packet from the reader, or [`Forward::Owed`] when the writer made an
    /// acknowledgement of the gate's own due.
    async fn next(&self, queue: &mut mpsc::Receiver<Forward>) -> Option<Forward> {
        tokio::select! {
            item = queue.recv() => item,
            () = self.state.egress.owed.notified() => Some(Forward::Owed),
        }
    }

    /// Writes the acknowledgements of the gate's own that are due (publishes discarded for the
    /// client's Maximum Packet Size), in the broker's order.
    async fn write_owed<W: AsyncWrite + Unpin>(&self, upstream: &mut W) -> Result<(), ConnError> {
        if self.maximum_packet_size.is_none() {
            return Ok(());
        }
        for ack in self.state.egress.owed() {
            upstream.write_all(&ack).await?;
        }
        Ok(())
    }

    /// Waits for `fut` while keeping the connection to the broker alive: a PINGREQ of the
    /// gate's own every [`INTERNAL_PING`] (not once the client's DISCONNECT went on, after
    /// which the broker closes the connection). The broker's keep-alive for it is
    /// [`broker::INTERNAL_KEEP_ALIVE`], whatever the client's; the writer drops the answers.
    async fn keeping_alive<W: AsyncWrite + Unpin, T>(
        &self,
        upstream: &mut W,
        pings: &mut tokio::time::Interval,
        ping: bool,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, ConnError> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                _ = pings.tick(), if ping => {
                    self.state.own_pings.fetch_add(1, Ordering::Relaxed);
                    upstream.write_all(&PINGREQ).await?;
                    upstream.flush().await?;
                }
            }
        }
    }

    async fn write<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &self,
        mut upstream: R,
        client: &mut W,
        mut replies: mpsc::Receiver<Bytes>,
    ) -> Result<(), ConnError> {
        let mut buf = BytesMut::with_capacity(8192);
        let mut out = BytesMut::with_capacity(8192);
        let mut replies_open = true;
        // A PUBLISH at the front of `buf` waits for the client to finish earlier ones.
        let mut held = false;
        loop {
            tokio::select! {
                reply = replies.recv(), if replies_open => match reply {
                    Some(reply) => {
                        self.note_outgoing(&reply);
                        client.write_all(&reply).await?;
                    }
                    None => replies_open = false,
                },
                // While a PUBLISH waits for room under the client's Receive Maximum, the broker
                // is not read, so that nothing overtakes it; the gate's replies still go out.
                n = async {
                    if held {
                        self.state.egress.released.notified().await;
                        Ok(1)
                    } else {
                        upstream.read_buf(&mut buf).await
                    }
                } => {
                    held = false;
                    if n? == 0 {
                        let _ = client.shutdown().await;
                        return Ok(());
                    }
                    // Whole packets only, so that a reply of the gate never lands inside one.
                    while let Some(f) = broker::frame(&buf, usize::MAX)? {
                        if self.version == Version::V5 {
                            match self.egress(&buf[..f.len], f.kind) {
                                egress::Verdict::Send => {}
                                egress::Verdict::Discard => {
                                    let _ = buf.split_to(f.len);
                                    continue;
                                }
                                egress::Verdict::Hold => {
                                    held = true;
                                    break;
                                }
                            }
                        }
                        let mut packet = buf.split_to(f.len);
                        if f.kind == 3 {
                            self.note_delivery(&mut packet, f.flags);
                        }
                        // The answer to a PINGREQ of the gate's own is not the client's.
                        if f.kind == 13
                            && self
                                .state
                                .own_pings
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok()
                        {
                            continue;
                        }
                        self.note_outgoing(&packet);
                        // No session resumed: nothing the broker sends is a redelivery.
                        if f.kind == 2 && packet.get(f.header_len).is_some_and(|flags| flags & 1 == 0) {
                            lock(&self.state.redeliver).clear();
                        }
                        if f.kind == 2 && self.version == Version::V5 {
                            out.extend_from_slice(&broker::connack_with(&packet, self.connack)?);
                            continue;
                        }
                        if f.kind == 9 {
                            let partial = broker::packet_id(&packet)
                                .and_then(|id| lock(&self.state.partial_subscribes).remove(&id));
                            if let Some(allowed) = partial {
                                out.extend_from_slice(&broker::merge_suback(self.version, &packet, &allowed)?);
                                continue;
                            }
                        }
                        out.extend_from_slice(&packet);
                    }
                    if !out.is_empty() {
                        client.write_all(&out).await?;
                        out.clear();
                    }
                }
            }
        }
    }

    /// What the writer does with a packet from the broker (the whole frame) under the MQTT 5
    /// client's Receive Maximum and Maximum Packet Size: a PUBLISH too large for the client
    /// and the broker's PUBREL for such a one are dropped (the gate acknowledges them to the
    /// broker itself), a QoS 1/2 PUBLISH beyond the Receive Maximum waits.
    fn egress(&self, frame: &[u8], kind: u8) -> egress::Verdict {
        match kind {
            3 => {
                let verdict = self.state.egress.publish(
                    frame,
                    self.receive_maximum,
                    self.maximum_packet_size,
                );
                if verdict == egress::Verdict::Discard {
                    self.shared
                        .stats
                        .too_large_for_client
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        client_id = self.client_id,
                        size = frame.len(),
                        "publish larger than the client's Maximum Packet Size discarded"
                    );
                }
                verdict
            }
            6 if self.maximum_packet_size.is_some() && self.state.egress.broker_pubrel(frame) => {
                egress::Verdict::Discard
            }
            _ => egress::Verdict::Send,
        }
    }

    /// Notes a QoS 1/2 PUBLISH on its way to the client, and marks it DUP when it is the
    /// broker's redelivery of one the last connection left unacknowledged.
    fn note_delivery(&self, packet: &mut BytesMut, flags: u8) {
        if (flags >> 1) & 0b11 == 0 {
            return;
        }
        let Some(pkid) = broker::publish_packet_id(packet) else {
            return;
        };
        if lock(&self.state.redeliver).remove(&pkid) {
            if let Some(first) = packet.first_mut() {
                *first |= 0x08;
            }
        }
        lock(&self.state.delivering).insert(pkid);
    }

    /// Counts acknowledgements of the client's QoS 1/2 publishes on their way out.
    fn note_outgoing(&self, packet: &[u8]) {
        let Some(first) = packet.first() else { return };
        let done = match first >> 4 {
            4 | 7 => true,
            // A PUBREC with a failure code (MQTT 5) ends the QoS 2 exchange.
            5 => packet.len() > 4 && packet[4] >= 0x80,
            _ => false,
        };
        if done {
            let _ = self
                .state
                .inflight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
}
