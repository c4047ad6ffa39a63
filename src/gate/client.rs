//! One client connection: the MQTT session's protocol state and its driver.
//!
//! The connection task reads and decodes the client's packets (a codec error costs this
//! connection only), checks them against the ACL and the limits, and keeps the session's QoS
//! state both ways: packet ids, QoS 2 flows, Receive Maximum both ways, topic aliases both ways,
//! Maximum Packet Size both ways, keep-alive.
//!
//! A PUBLISH goes through an ordered pipeline beside the reader: its records (outbox, retained)
//! are appended to the store at once; once they are durable it is routed, and once its deliveries
//! to persistent sessions are durable too it is acknowledged. So acknowledgements leave in the
//! order the publishes came [MQTT-4.6.0-2], "acknowledged" means "on flash", and the reader
//! never waits for the flash (only the pipeline's bounded queue pushes back on the client).
//!
//! Deliveries come from the session's queue in the router, as many as the client's Receive
//! Maximum lets out unacknowledged; QoS 0 ones are not held back.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::acl::Who;
use super::auth::Auth;
use super::park::{Parked, Parker, PARK_AFTER, PARK_FIRST};
use super::tls::Tls;
use super::{GateSettings, GateStats};
use crate::broker::codec::{
    self, CodecError, Connect, Inbound, Outgoing, ServerProps, SubscribeFilter, Version,
};
use crate::broker::message::{Message, Origin, Properties};
use crate::broker::router::{Delivery, Ending, Router, SessionHandle, WillKeeper};
use crate::broker::topic::{self, Filter};
use crate::broker::tree::SubOptions;
use crate::mapping::TopicFilter;
use crate::proto::{Header, Origin as RecordOrigin, OutboxRecord};
use crate::store::{Pipelining, Reading, Store, StoreError, Ticket};

/// State shared by every connection of one gate.
pub struct Shared {
    pub(super) settings: GateSettings,
    pub(super) store: Store,
    pub(super) router: Router,
    pub(super) tls: Option<Tls>,
    pub(super) auth: Auth,
    pub(super) slots: Arc<Semaphore>,
    pub(super) last_busy_warning: AtomicU64,
    pub(super) started: Instant,
    /// Where quiet plain-TCP connections wait without a task (`None`: they keep theirs).
    pub(super) parker: Option<Parker>,
    /// The clients connected now.
    pub clients: super::clients::Clients,
    pub stats: GateStats,
}

impl Shared {
    /// Whether `name` logs in with `password` (a user of the user file) and is in `group`:
    /// `None` for a wrong name or password, else `Some(in the group)`. For logins other than
    /// MQTT's (the admin endpoint).
    pub async fn login(&self, name: &str, password: &str, group: &str) -> Option<bool> {
        self.auth
            .verify(name, password)
            .await
            .then(|| self.auth.in_group(name, group))
    }

    /// Connections parked now.
    pub fn parked(&self) -> u64 {
        self.parker.as_ref().map_or(0, Parker::parked)
    }
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Wrong user name or password (3.1.1: 4, 5: 0x86).
    BadCredentials,
    /// No credentials where they are needed (3.1.1: 5, 5: 0x87).
    NotAuthorized,
    /// A client id that cannot be taken (3.1.1: 2, 5: 0x85).
    BadClientId,
    /// A will topic that is no topic name (5: 0x90; 3.1.1 has no code: closed without CONNACK).
    BadWillTopic,
    /// Extended authentication (MQTT 5 AUTH) is not supported (5: 0x8C).
    BadAuthMethod,
    /// The session is still held by a connection that does not let go (5: 0x89 server busy;
    /// 3.1.1: 3 server unavailable).
    SessionBusy,
}

impl ConnectRefusal {
    fn connack(self, version: Version) -> Bytes {
        let (v4, v5, reason) = match self {
            ConnectRefusal::BadCredentials => (4, 0x86, "bad user name or password"),
            ConnectRefusal::NotAuthorized => (5, 0x87, "a user name and password are needed"),
            ConnectRefusal::BadClientId => (2, 0x85, "client identifier not accepted"),
            ConnectRefusal::BadWillTopic => (0, 0x90, "will topic not accepted"),
            ConnectRefusal::BadAuthMethod => (5, 0x8c, "extended authentication is not supported"),
            ConnectRefusal::SessionBusy => (3, 0x89, "the session is busy; try again"),
        };
        match version {
            Version::V4 if v4 == 0 => Bytes::new(),
            Version::V4 => codec::connack(version, false, v4, &ServerProps::default()),
            Version::V5 => codec::connack(
                version,
                false,
                v5,
                &ServerProps {
                    reason: Some(reason),
                    ..Default::default()
                },
            ),
        }
    }
}

/// How long the last acknowledgements may take to reach the client once the connection is
/// ending.
const LINGER: Duration = Duration::from_secs(2);
/// Publishes read ahead of their acknowledgement, per connection.
const PIPELINE: usize = 1024;
/// A write to the client that takes longer than this ends the connection (a client that does
/// not read).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection waits for the one it takes the session from.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);
/// Topic aliases a client may use towards the relay.
pub const TOPIC_ALIAS_MAXIMUM: u16 = 64;
/// Bytes written to the socket at a time, at most, before reading again.
const WRITE_CHUNK: usize = 64 * 1024;
/// A write buffer larger than this is given back after it was written.
const WBUF_KEEP: usize = 1024;

/// MQTT 5 reason codes used here.
const WITH_WILL: u8 = 0x04;
const UNSPECIFIED: u8 = 0x80;
const PROTOCOL_ERROR: u8 = 0x82;
const NOT_AUTHORIZED: u8 = 0x87;
const SERVER_SHUTTING_DOWN: u8 = 0x8b;
const KEEP_ALIVE_TIMEOUT: u8 = 0x8d;
const SESSION_TAKEN_OVER: u8 = 0x8e;
const TOPIC_FILTER_INVALID: u8 = 0x8f;
const TOPIC_NAME_INVALID: u8 = 0x90;
const PACKET_ID_NOT_FOUND: u8 = 0x92;
const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
const TOPIC_ALIAS_INVALID: u8 = 0x94;
const QUOTA_EXCEEDED: u8 = 0x97;
const NO_SUBSCRIPTION: u8 = 0x11;

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
    #[error("PUBLISH to {0:?}: {1}")]
    BadTopic(String, topic::TopicError),
    #[error("PUBLISH with topic alias {0}, which is {1}")]
    BadAlias(u16, &'static str),
    #[error("PUBLISH with topic alias {0}, which the client never set")]
    UnknownAlias(u16),
    #[error("login refused ({0:?})")]
    LoginRefused(ConnectRefusal),
    #[error("more than {0} QoS 1/2 publishes unacknowledged")]
    TooManyInflight(usize),
    #[error("publish to {topic:?} refused and the client speaks MQTT 3.1.1, which has no refusal code: {reason}")]
    RefusedV4 { topic: String, reason: StoreError },
    #[error("no packet from the client within {0:?} (1.5 × its keep-alive)")]
    KeepAliveTimeout(Duration),
    #[error("the client did not read what was sent to it within {0:?}")]
    WriteTimeout(Duration),
    #[error("{0}")]
    Protocol(&'static str),
    #[error("the store cannot keep the session: {0}")]
    Store(StoreError),
}

/// What a connection holds from the gate for as long as it lives, parked or not: its place
/// under `max_connections`, and its place in the gate's task tracker (so that a shutdown waits
/// for it). Held only to be dropped with the connection.
#[allow(dead_code)]
pub(super) struct Held {
    pub permit: Option<OwnedSemaphorePermit>,
    pub token: Option<TaskTrackerToken>,
}

pub(super) async fn serve<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    transport: super::Transport,
    cert_user: Option<String>,
    shutdown: CancellationToken,
    held: Held,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    shared.stats.connected.fetch_add(1, Ordering::Relaxed);
    // Only a plain TCP connection can park: its whole transport state is the socket.
    let parkable =
        shared.parker.is_some() && TypeId::of::<S>() == TypeId::of::<tokio::net::TcpStream>();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::new();
    // The handshake's state is boxed: it is done with once the client is in, and a connection
    // that then waits for its client carries none of it.
    let started = Box::pin(handshake(
        &shared,
        &mut rd,
        &mut wr,
        &mut buf,
        (peer, transport, cert_user),
        &shutdown,
    ))
    .await;
    match started {
        Ok(Some(started)) => {
            let on = Going {
                started,
                shutdown,
                held,
                peer,
                parkable,
            };
            Box::pin(drive(shared, rd, wr, buf, on)).await;
        }
        Ok(None) => ended(&shared, peer, Ok(())),
        Err(e) => ended(&shared, peer, Err(e)),
    }
}

/// Counts a connection's end and logs it.
fn ended(shared: &Shared, peer: SocketAddr, result: Result<(), ConnError>) {
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

/// A connection that is in: what it needs to go on, after its handshake or after parking.
struct Going {
    started: Started,
    shutdown: CancellationToken,
    held: Held,
    peer: SocketAddr,
    parkable: bool,
}

/// A parked connection's state (`park::Parked` holds it beside the socket).
pub(super) struct Resume {
    conn: Conn,
    /// Boxed: most clients have none, and it is large.
    will: Option<Box<(Message, u32)>>,
    generation: u64,
    taken: u64,
    shutdown: CancellationToken,
    held: Held,
}

impl Resume {
    /// When the client's keep-alive runs out.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.conn.deadline.map(tokio::time::Instant::into_std)
    }

    /// Sets the key the router wakes it with; true when it must wake at once.
    pub(super) fn arm(&self, key: u64) -> bool {
        self.conn.handle.set_wake(Some(key), self.taken) || self.shutdown.is_cancelled()
    }

    pub(super) fn disarm(&self) {
        self.conn.handle.set_wake(None, self.taken);
    }
}

/// Serves a parked connection again (the parker calls it on the runtime).
pub(super) fn resume(p: Parked) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let Resume {
            mut conn,
            will,
            generation,
            taken,
            shutdown,
            held,
        } = *p.state;
        let shared = conn.shared.clone();
        // Not kept while parked: the socket knows it, and so does the list of clients.
        let peer = p.stream.peer_addr().unwrap_or_else(|_| conn.listed_peer());
        match tokio::net::TcpStream::from_std(p.stream) {
            Ok(tcp) => {
                let (rd, wr) = tokio::io::split(tcp);
                let on = Going {
                    started: Started {
                        conn,
                        will: will.map(|w| *w),
                        generation,
                        taken,
                    },
                    shutdown,
                    held,
                    peer,
                    parkable: true,
                };
                drive(shared, rd, wr, BytesMut::new(), on).await;
            }
            Err(error) => {
                Box::pin(conn.finish(will.map(|w| *w), generation)).await;
                drop(held);
                ended(&shared, peer, Err(error.into()));
            }
        }
    })
}
/// A connection's part in when the store commits (see [`Reading`]): the burst of its client's
/// packets being read, if one is under way, whether the client was pipelining when the last
/// one ended, and its publishes waiting for acknowledgement as last noted.
#[derive(Default)]
struct Burst {
    reading: Option<Reading>,
    pipelining: Option<Pipelining>,
    waiting: usize,
}

impl Burst {
    /// The socket has nothing more: the burst under way ends.
    fn end(&mut self) {
        if let Some(reading) = self.reading.take() {
            self.pipelining = reading.end(self.pipelining.take(), self.waiting);
        }
    }
}

/// Reads one whole packet; `None` at a clean end of stream. The burst under way ends when the
/// socket has nothing more to read.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
    burst: &mut Burst,
) -> Result<Option<Bytes>, ConnError> {
    loop {
        if let Some(f) = codec::frame(buf, max)? {
            return Ok(Some(buf.split_to(f.len).freeze()));
        }
        if buf.is_empty() {
            // Everything read is handed on: a connection waiting for its client keeps no
            // read buffer (packets still in use keep theirs).
            *buf = BytesMut::new();
        }
        if read_some(rd, buf, burst).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ConnError::Truncated)
            };
        }
    }
}

/// Bytes read from the socket at a time, at most.
const READ_CHUNK: usize = 16 * 1024;

/// Reads what the socket has (up to [`READ_CHUNK`]) and appends it to `buf`. The bytes pass
/// through a buffer on the stack of the poll, not in the connection's state, so a waiting
/// connection holds none. When the socket has nothing yet, the burst ends.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    burst: &mut Burst,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut chunk = tokio::io::ReadBuf::uninit(&mut space);
        match std::pin::Pin::new(&mut *rd).poll_read(cx, &mut chunk) {
            std::task::Poll::Ready(r) => r?,
            std::task::Poll::Pending => {
                burst.end();
                return std::task::Poll::Pending;
            }
        }
        buf.extend_from_slice(chunk.filled());
        std::task::Poll::Ready(Ok(chunk.filled().len()))
    })
    .await
}

/// Reads the first packet, which must be a CONNECT: anything else is refused at its first
/// byte rather than after waiting for the length it claims.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Bytes>, ConnError> {
    while buf.is_empty() {
        if read_some(rd, buf, &mut Burst::default()).await? == 0 {
            return Ok(None);
        }
    }
    if buf[0] != 0x10 {
        return Err(CodecError::NotConnect.into());
    }
    read_packet(rd, buf, max, &mut Burst::default()).await
}

/// Serves a client that is in until the connection ends, or until it parks.
async fn drive<S>(
    shared: Arc<Shared>,
    mut rd: ReadHalf<S>,
    mut wr: WriteHalf<S>,
    mut buf: BytesMut,
    on: Going,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Going {
        started,
        shutdown,
        held,
        peer,
        parkable,
    } = on;
    let Started {
        mut conn,
        will,
        generation,
        taken,
    } = started;

    // Made at the first PUBLISH: a connection that only subscribes, or waits, has none.
    let mut pipeline: Option<Pipeline> = None;
    let result = loop {
        let park = parkable && pipeline.is_none();
        let (pipe, stages) = match pipeline.as_mut() {
            Some(p) => (Some((&p.pending, &mut p.acks)), Some(p.stages.as_mut())),
            None => (None, None),
        };
        let stages = async {
            match stages {
                Some(s) => s.await,
                None => std::future::pending().await,
            }
        };
        let served = tokio::select! {
            r = conn.serve(&mut rd, &mut wr, &mut buf, pipe, Watch { taken, shutdown: &shutdown, park }) => r,
            // The pipeline never ends before the reader does (it holds the sender).
            () = stages => Served::End(Ok(())),
        };
        match served {
            Served::End(r) => break r,
            Served::Publish(first) => {
                let p = Pipeline::new(shared.router.clone());
                // The new queue has room for this one.
                let _ = p.pending.try_send(*first);
                pipeline = Some(p);
            }
            Served::Park => {
                let state = Box::new(Resume {
                    conn,
                    will: will.map(Box::new),
                    generation,
                    taken,
                    shutdown,
                    held,
                });
                park_connection(rd.unsplit(wr), state);
                return;
            }
        }
    };
    // What was read is routed and acknowledged, as far as the client still listens.
    if let Some(p) = pipeline {
        let Pipeline {
            pending,
            mut acks,
            mut stages,
        } = p;
        drop(pending);
        let drain = async {
            let write_acks = async {
                while let Some(reply) = acks.recv().await {
                    if let Reply::Write { bytes, .. } = reply {
                        if wr.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                }
            };
            tokio::join!(stages.as_mut(), write_acks);
        };
        let _ = tokio::time::timeout(LINGER, Box::pin(drain)).await;
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
    Box::pin(conn.finish(will, generation)).await;
    drop(held);
    ended(&shared, peer, result);
}

/// Hands a quiet TCP connection to the parker. A stream that is not TCP (never asked to park)
/// or that cannot leave the runtime is served on at once.
fn park_connection<S: Send + 'static>(stream: S, state: Box<Resume>) {
    let boxed: Box<dyn Any + Send> = Box::new(stream);
    let parked = match boxed.downcast::<tokio::net::TcpStream>() {
        Ok(tcp) => match tcp.into_std() {
            Ok(stream) => Parked { stream, state },
            Err(error) => {
                // The socket is unusable: end the connection as a failed one.
                let shared = state.conn.shared.clone();
                tokio::spawn(async move {
                    let Resume {
                        mut conn,
                        will,
                        generation,
                        held,
                        ..
                    } = *state;
                    let peer = conn.listed_peer();
                    Box::pin(conn.finish(will.map(|w| *w), generation)).await;
                    drop(held);
                    ended(&shared, peer, Err(error.into()));
                });
                return;
            }
        },
        Err(_) => {
            tracing::error!("a connection that is not plain TCP was asked to park");
            return;
        }
    };
    let shared = parked.state.conn.shared.clone();
    match &shared.parker {
        Some(parker) => {
            if let Err(p) = parker.park(parked) {
                tokio::spawn(resume(p));
            }
        }
        None => {
            tokio::spawn(resume(parked));
        }
    }
}

/// A client let in: its connection state, its will, its session's generation, and the
/// session's take-overs when it took it (it is taken over once there are more).
struct Started {
    conn: Conn,
    will: Option<(Message, u32)>,
    generation: u64,
    taken: u64,
}

/// CONNECT, login, the session, CONNACK. `None` when the client left (or the relay stopped)
/// before it sent CONNECT.
async fn handshake<R, W>(
    shared: &Arc<Shared>,
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    (peer, transport, cert_user): (SocketAddr, super::Transport, Option<String>),
    shutdown: &CancellationToken,
) -> Result<Option<Started>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = shared.settings.max_packet_size;
    let timeout = shared.settings.connect_timeout;
    let packet = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        r = tokio::time::timeout(timeout, read_connect(rd, buf, max)) => {
            r.map_err(|_| ConnError::ConnectTimeout(timeout))??
        }
    };
    let Some(packet) = packet else {
        return Ok(None);
    };
    let connect = match codec::decode_connect(&packet) {
        Ok(c) => c,
        Err(CodecError::UnsupportedLevel(level)) => {
            // CONNACK "unacceptable protocol version" (0x01 in 3.1.1; the 5 form is 0x84,
            // but a client of an unknown level is best answered in the oldest form).
            let _ = wr.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
            return Err(CodecError::UnsupportedLevel(level).into());
        }
        Err(CodecError::Protocol(what)) => {
            // Only MQTT 5 CONNECT properties are checked this way: the answer is a 5 CONNACK.
            let connack = codec::connack(
                Version::V5,
                false,
                PROTOCOL_ERROR,
                &ServerProps {
                    reason: Some(what),
                    ..Default::default()
                },
            );
            let _ = wr.write_all(&connack).await;
            let _ = wr.shutdown().await;
            return Err(CodecError::Protocol(what).into());
        }
        Err(CodecError::WillTopic(topic)) => {
            // 3.1.1 has no code for it: closed without CONNACK.
            if let Ok(version) = codec::connect_version(&packet) {
                let connack = ConnectRefusal::BadWillTopic.connack(version);
                if !connack.is_empty() {
                    let _ = wr.write_all(&connack).await;
                }
            }
            let _ = wr.shutdown().await;
            return Err(CodecError::WillTopic(topic).into());
        }
        Err(e) => return Err(e.into()),
    };
    let version = connect.version;
    let login = login(shared, &connect, cert_user).await;
    let (user, client_id, assigned) = match login {
        Ok(l) => l,
        Err(refusal) => {
            let connack = refusal.connack(version);
            if !connack.is_empty() {
                let _ = wr.write_all(&connack).await;
            }
            let _ = wr.shutdown().await;
            return Err(ConnError::LoginRefused(refusal));
        }
    };

    let connected = shared
        .router
        .connect(&client_id, connect.clean_start, connect.session_expiry)
        .await
        .map_err(ConnError::Store)?;
    let handle = connected.handle.clone();
    let Some((_slot, taken)) = handle.acquire(TAKEOVER_WAIT).await else {
        let _ = wr
            .write_all(&ConnectRefusal::SessionBusy.connack(version))
            .await;
        return Err(ConnError::LoginRefused(ConnectRefusal::SessionBusy));
    };
    let will = connect.will.as_ref().map(|w| {
        (
            Message::new(
                Arc::from(w.topic.as_str()),
                w.payload.clone(),
                w.qos,
                w.retain,
                w.props.clone(),
                Origin::Client(handle.id),
            ),
            w.delay,
        )
    });
    let props = ServerProps {
        receive_maximum: u16::try_from(shared.settings.max_inflight).ok(),
        maximum_packet_size: u32::try_from(shared.settings.max_packet_size).ok(),
        assigned_client_id: assigned.then_some(&*client_id),
        topic_alias_maximum: Some(TOPIC_ALIAS_MAXIMUM),
        ..Default::default()
    };
    wr.write_all(&codec::connack(version, connected.present, 0, &props))
        .await?;

    let user: Option<Arc<str>> = user.map(Arc::from);
    let listed = shared
        .clients
        .add(&handle, user.clone(), version, transport, peer);
    let conn = Conn {
        listed,
        shared: shared.clone(),
        version,
        user,
        handle: handle.clone(),
        keep_alive: connect.keep_alive,
        session_expiry: connect.session_expiry,
        inflight_in: 0,
        maps: None,
        sends: 0,
        spoke: false,
        next_pid: 0,
        receive_maximum: connect.receive_maximum,
        maximum_packet_size: connect.maximum_packet_size,
        alias_max_out: connect.topic_alias_maximum,
        ending: Ending::WithWill,
        disconnect_expiry: None,
        deadline: None,
    };
    Ok(Some(Started {
        conn,
        will,
        generation: connected.generation,
        taken,
    }))
}

/// A connection's publish pipeline: the queue into it, the replies out of it, and its two
/// stages, boxed so that a connection without one does not carry their space.
struct Pipeline {
    pending: mpsc::Sender<Pending>,
    acks: mpsc::Receiver<Reply>,
    stages: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Pipeline {
    fn new(router: Router) -> Pipeline {
        let (pending_tx, pending_rx) = mpsc::channel::<Pending>(PIPELINE);
        let (routed_tx, routed_rx) = mpsc::channel::<(Vec<Ticket>, Reply)>(PIPELINE);
        let (acks_tx, acks_rx) = mpsc::channel::<Reply>(PIPELINE);
        let stages = async move {
            tokio::join!(
                route(router, pending_rx, routed_tx),
                settle(routed_rx, acks_tx)
            );
        };
        Pipeline {
            pending: pending_tx,
            acks: acks_rx,
            stages: Box::pin(stages),
        }
    }
}

/// What to do after one client packet.
enum Step {
    Go,
    /// The client said DISCONNECT, or the pipeline is gone.
    Stop,
    /// A PUBLISH and no pipeline yet.
    Publish(Box<Pending>),
}

/// Why [`Conn::serve`] returned.
enum Served {
    /// The connection is over.
    End(Result<(), ConnError>),
    /// The first PUBLISH came and there is no pipeline yet: make one, hand it this, serve on.
    Publish(Box<Pending>),
    /// The client has been quiet for `PARK_AFTER` with nothing buffered: park it.
    Park,
}

/// How long a connection must be quiet before it parks: [`PARK_AFTER`], or [`PARK_FIRST`] while
/// the client has sent nothing since its CONNECT. A client that connects and then only waits
/// leaves its task at once, so a burst of such connections (an office's sensors after a power
/// cut) never holds a task each.
fn park_after(spoke: bool) -> Duration {
    if spoke {
        PARK_AFTER
    } else {
        PARK_FIRST
    }
}

/// What ends or parks a connection besides its client: a take-over, the relay's shutdown, and
/// whether it may park now.
#[derive(Clone, Copy)]
struct Watch<'a> {
    taken: u64,
    shutdown: &'a CancellationToken,
    park: bool,
}

/// Why [`Conn::serve_inner`] returned without an error.
enum Inner {
    End,
    Publish(Box<Pending>),
    Park,
}

/// Logs a client in: the user it is known as, its client id, and whether that id was
/// assigned by the relay.
async fn login(
    shared: &Shared,
    connect: &Connect,
    cert_user: Option<String>,
) -> Result<(Option<String>, String, bool), ConnectRefusal> {
    if connect.auth_method.is_some() {
        return Err(ConnectRefusal::BadAuthMethod);
    }
    let mut client_id = connect.client_id.clone();
    let mut assigned = false;
    if client_id.is_empty() {
        // 3.1.1: an empty id only with a clean session [MQTT-3.1.3-8]; 5: the server assigns
        // one, also without a clean start [MQTT-3.1.3-6].
        if connect.version == Version::V4 && !connect.clean_start {
            return Err(ConnectRefusal::BadClientId);
        }
        client_id = format!("relaybox-{:016x}", rand::random::<u64>());
        assigned = connect.version == Version::V5;
    }
    let user = shared.auth.authenticate(connect, cert_user).await?;
    if let Some(will) = &connect.will {
        if topic::check_topic(&will.topic).is_err() {
            return Err(ConnectRefusal::BadWillTopic);
        }
        let who = Who {
            user: user.as_deref(),
            client_id: &client_id,
        };
        if !shared.auth.acl().may_publish(who, &will.topic) {
            shared
                .stats
                .denied_publishes
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                client_id,
                user,
                topic = will.topic,
                "will message denied by ACL"
            );
            return Err(ConnectRefusal::NotAuthorized);
        }
    }
    Ok((user, client_id, assigned))
}

/// A publish on its way through the pipeline.
struct Pending {
    /// Records (outbox, retained) that must be durable first.
    tickets: Vec<Ticket>,
    /// What to route once they are (`None`: nothing, e.g. a denied publish).
    msg: Option<Message>,
    qos: u8,
    pid: u16,
    reply: Reply,
}

/// What the connection sends back for a publish.
enum Reply {
    /// Bytes to write (possibly none); `inflight`: one QoS 1 publish is done with.
    Write { bytes: Bytes, inflight: bool },
    /// The store refused a record: refuse the publish (or end a 3.1.1 connection).
    Refuse {
        qos: u8,
        pid: u16,
        topic: String,
        reason: StoreError,
    },
}

/// The pipeline's first stage: waits for each publish's records in order, then routes it.
async fn route(
    router: Router,
    mut pending: mpsc::Receiver<Pending>,
    routed: mpsc::Sender<(Vec<Ticket>, Reply)>,
) {
    while let Some(p) = pending.recv().await {
        let mut failed = None;
        for t in p.tickets {
            if let Err(e) = t.durable().await {
                failed.get_or_insert(e);
            }
        }
        let (tickets, reply) = match failed {
            Some(reason) => {
                let topic = p
                    .msg
                    .as_ref()
                    .map(|m| m.topic.to_string())
                    .unwrap_or_default();
                let refuse = Reply::Refuse {
                    qos: p.qos,
                    pid: p.pid,
                    topic,
                    reason,
                };
                (Vec::new(), refuse)
            }
            None => {
                let tickets = match p.msg {
                    Some(msg) => router.publish(msg).await,
                    None => Vec::new(),
                };
                (tickets, p.reply)
            }
        };
        if routed.send((tickets, reply)).await.is_err() {
            return;
        }
    }
}

/// The pipeline's second stage: waits for the deliveries to persistent sessions, in order, then
/// hands the reply to the connection.
async fn settle(mut routed: mpsc::Receiver<(Vec<Ticket>, Reply)>, acks: mpsc::Sender<Reply>) {
    while let Some((tickets, reply)) = routed.recv().await {
        for t in tickets {
            // A delivery the store could not keep is counted by the router; the publish is
            // still acknowledged (it was routed).
            let _ = t.durable().await;
        }
        if acks.send(reply).await.is_err() {
            return;
        }
    }
}

/// One delivery sent and not yet finished by the client.
struct Outflight {
    d: Delivery,
}

/// An authenticated client's connection.
struct Conn {
    /// Its number in the list of clients connected now (`Shared::clients`).
    listed: u64,
    shared: Arc<Shared>,
    version: Version,
    user: Option<Arc<str>>,
    handle: Arc<SessionHandle>,
    keep_alive: u16,
    session_expiry: u32,
    /// QoS 1/2 publishes received and not finished (against the relay's Receive Maximum).
    inflight_in: usize,
    /// The maps of the flows under way, made when the first one starts: a connection that
    /// only waits carries none.
    maps: Option<Box<Maps>>,
    // What the client is sent.
    sends: u64,
    /// The client has sent a packet since its CONNECT.
    spoke: bool,
    next_pid: u16,
    receive_maximum: u16,
    maximum_packet_size: Option<u32>,
    alias_max_out: u16,
    ending: Ending,
    disconnect_expiry: Option<u32>,
    /// When the client must have sent something (1.5 × its keep-alive after the last packet).
    deadline: Option<tokio::time::Instant>,
}

/// A connection's protocol flows under way (see [`Conn::maps`]): what it was sent and not yet
/// finished, what waits to be sent or written, and the maps of the flows. Made when the first
/// flow starts and dropped when the connection parks with all of it empty, so that a
/// connection that waits carries none of it.
#[derive(Default)]
struct Maps {
    /// Sent and not finished, in the order sent.
    out: BTreeMap<u64, Outflight>,
    /// Taken from the session's queue, waiting for room under the client's Receive Maximum.
    held: VecDeque<Delivery>,
    /// Written to the client at the next flush.
    wbuf: BytesMut,
    /// Topic aliases the client set.
    aliases_in: HashMap<u16, Arc<str>>,
    /// QoS 2 publishes received whose PUBREL has not come yet.
    qos2_in: HashSet<u16>,
    /// Denials already logged (each once per connection).
    denials_logged: HashSet<String>,
    /// Packet id → send number of the deliveries in `out`.
    out_pids: HashMap<u16, u64>,
    /// Topic aliases the relay set towards the client.
    aliases_out: HashMap<Arc<str>, u16>,
}

/// The maps of a connection that has none yet.
static NO_MAPS: std::sync::LazyLock<Maps> = std::sync::LazyLock::new(Maps::default);

impl Maps {
    /// Nothing under way: no flow, nothing held or buffered, no alias, no denial logged.
    fn is_empty(&self) -> bool {
        self.out.is_empty()
            && self.held.is_empty()
            && self.wbuf.is_empty()
            && self.aliases_in.is_empty()
            && self.qos2_in.is_empty()
            && self.denials_logged.is_empty()
            && self.out_pids.is_empty()
            && self.aliases_out.is_empty()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.clients.remove(&self.handle, self.listed);
    }
}

impl Conn {
    /// The client's address as the list of connected clients has it (unknown, `0.0.0.0:0`, once
    /// a take-over has listed another connection).
    fn listed_peer(&self) -> SocketAddr {
        self.handle
            .attachment()
            .filter(|a| a.key == self.listed)
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |a| a.peer())
    }

    /// The flows' maps, to read.
    fn maps(&self) -> &Maps {
        self.maps.as_deref().unwrap_or(&NO_MAPS)
    }

    /// The flows' maps, to change (made at the first change).
    fn maps_mut(&mut self) -> &mut Maps {
        self.maps.get_or_insert_with(Box::default)
    }

    fn who(&self) -> Who<'_> {
        Who {
            user: self.user.as_deref(),
            client_id: &self.handle.client_id,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.maps_mut().wbuf.extend_from_slice(bytes);
    }

    /// Drops the flows' state if nothing is under way (before parking).
    fn shed_maps(&mut self) {
        if self.maps.as_deref().is_some_and(Maps::is_empty) {
            self.maps = None;
        }
    }

    /// Queues an MQTT 5 DISCONNECT with `reason` (nothing on 3.1.1).
    fn disconnect(&mut self, reason: u8, why: Option<&str>) {
        if let Some(p) = codec::disconnect(self.version, reason, why) {
            self.write(&p);
        }
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> Result<(), ConnError> {
        let Some(maps) = self.maps.as_deref_mut().filter(|m| !m.wbuf.is_empty()) else {
            return Ok(());
        };
        let written = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&maps.wbuf)).await;
        if maps.wbuf.capacity() > WBUF_KEEP {
            // A burst's buffer is not kept for a connection that may now wait a long time.
            maps.wbuf = BytesMut::new();
        } else {
            maps.wbuf.clear();
        }
        match written {
            Ok(r) => Ok(r?),
            Err(_) => Err(ConnError::WriteTimeout(WRITE_TIMEOUT)),
        }
    }

    /// Serves the client until the connection ends, or until its first PUBLISH when it has no
    /// pipeline yet (`pipe` is `None`).
    async fn serve<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        mut pipe: Option<(&mpsc::Sender<Pending>, &mut mpsc::Receiver<Reply>)>,
        watch: Watch<'_>,
    ) -> Served
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        match self.serve_inner(rd, wr, buf, &mut pipe, watch).await {
            Ok(Inner::Publish(first)) => Served::Publish(first),
            Ok(Inner::Park) => Served::Park,
            Ok(Inner::End) => Served::End(Ok(())),
            Err(e) => Served::End(Err(e)),
        }
    }

    async fn serve_inner<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        pipe: &mut Option<(&mpsc::Sender<Pending>, &mut mpsc::Receiver<Reply>)>,
        watch: Watch<'_>,
    ) -> Result<Inner, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Watch {
            taken,
            shutdown,
            park,
        } = watch;
        let max = self.shared.settings.max_packet_size;
        // A client with a keep-alive must send some packet within 1.5 times it [MQTT-3.1.2-24];
        // keep-alive 0 turns this off.
        let silence =
            (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500));
        if self.deadline.is_none() {
            self.deadline = silence.map(|s| tokio::time::Instant::now() + s);
        }
        // One timer for the keep-alive and for parking, set again only when it fires early: a
        // packet moves the deadline and the time the client went quiet, not the timer.
        let mut quiet_since = tokio::time::Instant::now();
        let next_wake =
            |deadline: Option<tokio::time::Instant>, quiet: tokio::time::Instant, spoke: bool| {
                let park_at = park.then_some(quiet + park_after(spoke));
                match (deadline, park_at) {
                    (Some(d), Some(p)) => d.min(p),
                    (Some(t), None) | (None, Some(t)) => t,
                    (None, None) => tokio::time::Instant::now() + Duration::from_secs(86_400),
                }
            };
        let timer = tokio::time::sleep_until(next_wake(self.deadline, quiet_since, self.spoke));
        tokio::pin!(timer);
        let handle = self.handle.clone();
        let mut burst = Burst::default();
        loop {
            self.fill();
            self.flush(wr).await?;
            // Deliveries taken and not written yet (the write buffer was full) go on at once;
            // with none held, new ones are awaited.
            let flows = self.maps();
            let more = flows.held.front().is_some_and(|d| {
                d.qos == 0 || d.released || flows.out.len() < usize::from(self.receive_maximum)
            });
            let can_send = flows.held.is_empty();
            burst.waiting = self.inflight_in;
            let acks = async {
                match pipe.as_mut() {
                    Some((_, acks)) => acks.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = handle.until_taken_over(taken) => {
                    self.disconnect(SESSION_TAKEN_OVER, Some("another connection took the session"));
                    self.flush(wr).await?;
                    return Ok(Inner::End);
                }
                _ = shutdown.cancelled() => {
                    self.ending = Ending::Normal;
                    self.disconnect(SERVER_SHUTTING_DOWN, Some("the relay is shutting down"));
                    // Written now: what follows only drains the publish pipeline.
                    self.flush(wr).await?;
                    return Ok(Inner::End);
                }
                Some(reply) = acks => {
                    quiet_since = tokio::time::Instant::now();
                    self.reply(reply)?;
                    // The replies of one commit go out in one write, not one each.
                    if let Some((_, acks)) = pipe.as_mut() {
                        for _ in 1..PIPELINE {
                            let Ok(reply) = acks.try_recv() else { break };
                            self.reply(reply)?;
                        }
                    }
                }
                () = timer.as_mut(), if silence.is_some() || park => {
                    let now = tokio::time::Instant::now();
                    if self.deadline.is_some_and(|at| at <= now) {
                        self.disconnect(KEEP_ALIVE_TIMEOUT, None);
                        self.flush(wr).await?;
                        return Err(ConnError::KeepAliveTimeout(silence.unwrap_or_default()));
                    }
                    if park && quiet_since + park_after(self.spoke) <= now {
                        if buf.is_empty() && self.maps().wbuf.is_empty() && self.maps().held.is_empty() {
                            self.shed_maps();
                            return Ok(Inner::Park);
                        }
                        quiet_since = now;
                    }
                    timer.as_mut().reset(next_wake(self.deadline, quiet_since, self.spoke));
                }
                () = handle.notified(), if can_send => {
                    quiet_since = tokio::time::Instant::now();
                }
                r = read_packet(rd, buf, max, &mut burst) => {
                    let packet = match r {
                        Ok(Some(p)) => p,
                        Ok(None) => return Ok(Inner::End),
                        Err(ConnError::Codec(e)) => {
                            self.disconnect(e.reason(), None);
                            self.flush(wr).await?;
                            return Err(e.into());
                        }
                        Err(e) => return Err(e),
                    };
                    quiet_since = tokio::time::Instant::now();
                    self.spoke = true;
                    self.deadline = silence.map(|s| quiet_since + s);
                    if burst.reading.is_none() {
                        burst.reading = Some(self.shared.store.reading());
                    }
                    let pending = pipe.as_ref().map(|(p, _)| *p);
                    // Boxed: what handling a packet needs is not carried while waiting.
                    match Box::pin(self.packet(&packet, pending)).await {
                        Ok(Step::Go) => {}
                        Ok(Step::Stop) => return Ok(Inner::End),
                        Ok(Step::Publish(first)) => return Ok(Inner::Publish(first)),
                        Err(e) => {
                            let reason = match &e {
                                ConnError::Codec(c) => c.reason(),
                                ConnError::BadTopic(..) => TOPIC_NAME_INVALID,
                                ConnError::BadAlias(..) => TOPIC_ALIAS_INVALID,
                                ConnError::TooManyInflight(_) => RECEIVE_MAXIMUM_EXCEEDED,
                                ConnError::Store(_) => UNSPECIFIED,
                                _ => PROTOCOL_ERROR,
                            };
                            self.ending = Ending::WithWill;
                            self.disconnect(reason, None);
                            self.flush(wr).await?;
                            return Err(e);
                        }
                    }
                }
                // Last: a client's packets go first.
                () = std::future::ready(()), if more => {}
            }
        }
    }

    /// A reply from the pipeline.
    fn reply(&mut self, reply: Reply) -> Result<(), ConnError> {
        match reply {
            Reply::Write { bytes, inflight } => {
                if inflight {
                    self.inflight_in = self.inflight_in.saturating_sub(1);
                }
                self.write(&bytes);
                Ok(())
            }
            Reply::Refuse {
                qos,
                pid,
                topic,
                reason,
            } => {
                self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                match self.version {
                    Version::V5 => {
                        let code = match reason {
                            StoreError::Full { .. }
                            | StoreError::TooLarge { .. }
                            | StoreError::RetainedFull { .. } => QUOTA_EXCEEDED,
                            _ => UNSPECIFIED,
                        };
                        if qos == 1 {
                            self.inflight_in = self.inflight_in.saturating_sub(1);
                        }
                        if qos == 2 {
                            self.maps_mut().qos2_in.remove(&pid);
                            self.inflight_in = self.inflight_in.saturating_sub(1);
                        }
                        let why = reason.to_string();
                        if qos > 0 {
                            let kind = if qos == 1 { 4 } else { 5 };
                            let p = codec::ack(self.version, kind, pid, code, Some(&why));
                            self.write(&p);
                        }
                        Ok(())
                    }
                    // QoS 0 is dropped (counted above): there is nothing to refuse.
                    Version::V4 if qos == 0 => Ok(()),
                    Version::V4 => Err(ConnError::RefusedV4 { topic, reason }),
                }
            }
        }
    }

    /// Handles one client packet.
    async fn packet(
        &mut self,
        packet: &[u8],
        pending: Option<&mpsc::Sender<Pending>>,
    ) -> Result<Step, ConnError> {
        match codec::decode(self.version, packet)? {
            Inbound::Publish(p) => {
                let pending_publish = self.publish(p).await?;
                let Some(pending) = pending else {
                    return Ok(Step::Publish(Box::new(pending_publish)));
                };
                if pending.send(pending_publish).await.is_err() {
                    return Ok(Step::Stop);
                }
            }
            Inbound::Puback(pid, _) | Inbound::Pubcomp(pid, _) => self.finished(pid),
            Inbound::Pubrec(pid, reason) => {
                if reason >= 0x80 {
                    self.finished(pid);
                } else if let Some(seq) = self.maps().out_pids.get(&pid).copied() {
                    if let Some(o) = self.maps_mut().out.get_mut(&seq) {
                        o.d.released = true;
                    }
                    let p = codec::ack(self.version, 6, pid, 0, None);
                    self.write(&p);
                } else {
                    let p = codec::ack(self.version, 6, pid, PACKET_ID_NOT_FOUND, None);
                    self.write(&p);
                }
            }
            Inbound::Pubrel(pid, _) => {
                let reason = if self.maps_mut().qos2_in.remove(&pid) {
                    self.inflight_in = self.inflight_in.saturating_sub(1);
                    0
                } else {
                    PACKET_ID_NOT_FOUND
                };
                let p = codec::ack(self.version, 7, pid, reason, None);
                self.write(&p);
            }
            Inbound::Subscribe { pid, filters } => self.subscribe(pid, filters).await?,
            Inbound::Unsubscribe { pid, filters } => {
                let parsed: Vec<Option<Filter>> =
                    filters.iter().map(|f| Filter::parse(f).ok()).collect();
                let valid: Vec<Filter> = parsed.iter().flatten().cloned().collect();
                let existed = self.shared.router.unsubscribe(&self.handle, &valid).await;
                let mut existed = existed.into_iter();
                let codes: Vec<u8> = parsed
                    .iter()
                    .map(|f| match f {
                        Some(_) if existed.next() == Some(true) => 0,
                        Some(_) => NO_SUBSCRIPTION,
                        None => TOPIC_FILTER_INVALID,
                    })
                    .collect();
                let p = codec::unsuback(self.version, pid, &codes);
                self.write(&p);
            }
            Inbound::Pingreq => self.write(&codec::pingresp()),
            Inbound::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(e) = session_expiry {
                    // A session that ends at disconnect cannot be kept on at the last
                    // moment [MQTT-3.14.2-2].
                    if self.session_expiry == 0 && e != 0 {
                        return Err(ConnError::Protocol(
                            "DISCONNECT sets a Session Expiry Interval where CONNECT had 0",
                        ));
                    }
                    self.disconnect_expiry = Some(e);
                }
                self.ending = if reason == WITH_WILL {
                    Ending::WithWill
                } else {
                    Ending::Normal
                };
                return Ok(Step::Stop);
            }
            Inbound::Forbidden(kind) => return Err(ConnError::Forbidden(kind)),
        }
        Ok(Step::Go)
    }

    /// A PUBLISH from the client: checked, its records appended to the store, and handed to
    /// the pipeline.
    async fn publish(&mut self, p: codec::Publish) -> Result<Pending, ConnError> {
        let shared = self.shared.clone();
        shared.stats.publishes_in.fetch_add(1, Ordering::Relaxed);
        let topic: Arc<str> = match p.topic_alias {
            Some(alias) if alias > TOPIC_ALIAS_MAXIMUM => {
                return Err(ConnError::BadAlias(alias, "above the Topic Alias Maximum"))
            }
            Some(alias) if p.topic.is_empty() => match self.maps().aliases_in.get(&alias) {
                Some(t) => t.clone(),
                // An alias the client never set: a protocol error, not an invalid alias.
                None => return Err(ConnError::UnknownAlias(alias)),
            },
            Some(alias) => {
                self.maps_mut().aliases_in.insert(alias, p.topic.clone());
                p.topic.clone()
            }
            None => p.topic.clone(),
        };
        topic::check_topic(&topic).map_err(|e| ConnError::BadTopic(topic.to_string(), e))?;
        if p.qos > 0 {
            self.inflight_in += 1;
            let limit = shared.settings.max_inflight;
            if self.inflight_in > limit {
                return Err(ConnError::TooManyInflight(limit));
            }
        }
        let version = self.version;
        let ack = |reason: u8, why: Option<&str>| match p.qos {
            0 => Bytes::new(),
            1 => codec::ack(version, 4, p.pid, reason, why),
            _ => codec::ack(version, 5, p.pid, reason, why),
        };
        let done = |bytes: Bytes| Reply::Write {
            bytes,
            inflight: p.qos == 1,
        };
        if p.qos == 2 && !self.maps_mut().qos2_in.insert(p.pid) {
            // Sent again before our PUBREC reached the client: already taken.
            self.inflight_in -= 1;
            return Ok(Pending {
                tickets: Vec::new(),
                msg: None,
                qos: p.qos,
                pid: p.pid,
                reply: done(ack(0, None)),
            });
        }
        if !shared.auth.acl().may_publish(self.who(), &topic) {
            shared
                .stats
                .denied_publishes
                .fetch_add(1, Ordering::Relaxed);
            if self.maps_mut().denials_logged.insert(format!("p:{topic}")) {
                tracing::warn!(
                    client_id = %self.handle.client_id,
                    user = self.user.as_deref(),
                    %topic,
                    "publish denied by ACL"
                );
            }
            // MQTT 5 PUBREC with a failure code ends a QoS 2 exchange; 3.1.1 goes on with
            // PUBREL/PUBCOMP.
            if p.qos == 2 && self.version == Version::V5 {
                self.maps_mut().qos2_in.remove(&p.pid);
                self.inflight_in -= 1;
            }
            return Ok(Pending {
                tickets: Vec::new(),
                msg: None,
                qos: p.qos,
                pid: p.pid,
                reply: Reply::Write {
                    bytes: ack(
                        NOT_AUTHORIZED,
                        Some("not authorized to publish to this topic"),
                    ),
                    inflight: p.qos == 1,
                },
            });
        }
        let mut exported = shared.settings.exports.iter().any(|f| f.matches(&topic));
        if exported {
            if let Err(error) = crate::mapping::topic_to_subject("x", &topic) {
                // A valid MQTT topic that no NATS subject can carry (a space): it still
                // reaches local subscribers, but cannot go to the hub.
                shared.stats.unexportable.fetch_add(1, Ordering::Relaxed);
                if self.maps_mut().denials_logged.insert(format!("x:{topic}")) {
                    tracing::warn!(client_id = %self.handle.client_id, %error, "message kept local: its topic cannot be sent to the hub");
                }
                exported = false;
            }
        }
        let msg = Message::new(
            topic.clone(),
            p.payload,
            p.qos,
            p.retain,
            p.props,
            Origin::Client(self.handle.id),
        );
        let mut tickets = Vec::new();
        if exported || p.retain {
            let record = record_of(&msg, &self.handle.client_id);
            // A retained message is kept in the store with the same durability as an exported
            // one; an empty payload clears it. One beyond `max_retained_bytes` is refused as a
            // whole: it neither reaches local subscribers nor goes to the hub.
            if p.retain {
                let kept = if p.qos == 0 {
                    shared.store.retain_nowait(&record).await.map(|()| None)
                } else {
                    shared.store.retain(&record).await.map(Some)
                };
                match kept {
                    Ok(ticket) => tickets.extend(ticket),
                    Err(reason @ StoreError::RetainedFull { .. }) => {
                        if self.maps_mut().denials_logged.insert(format!("r:{topic}")) {
                            tracing::warn!(client_id = %self.handle.client_id, %topic, %reason, "publish refused");
                        }
                        if p.qos == 2 {
                            self.maps_mut().qos2_in.remove(&p.pid);
                        }
                        return Ok(Pending {
                            tickets: Vec::new(),
                            msg: None,
                            qos: p.qos,
                            pid: p.pid,
                            reply: Reply::Refuse {
                                qos: p.qos,
                                pid: p.pid,
                                topic: topic.to_string(),
                                reason,
                            },
                        });
                    }
                    Err(error) if p.qos == 0 => {
                        tracing::warn!(%error, %topic, "QoS 0 retained message not kept in the store");
                    }
                    Err(e) => return Err(ConnError::Store(e)),
                }
            }
            if exported {
                shared.stats.exported.fetch_add(1, Ordering::Relaxed);
                if p.qos == 0 {
                    if let Err(error) = shared.store.append_nowait(&record).await {
                        tracing::warn!(%error, %topic, "QoS 0 message not kept for the hub");
                    }
                } else {
                    tickets.push(
                        shared
                            .store
                            .append(&record)
                            .await
                            .map_err(ConnError::Store)?,
                    );
                }
            }
        }
        Ok(Pending {
            tickets,
            msg: Some(msg),
            qos: p.qos,
            pid: p.pid,
            reply: done(ack(0, None)),
        })
    }

    /// The client finished a delivery (PUBACK, PUBCOMP, or a PUBREC refusing it).
    fn finished(&mut self, pid: u16) {
        if let Some(seq) = self.maps_mut().out_pids.remove(&pid) {
            if let Some(o) = self.maps_mut().out.remove(&seq) {
                self.handle.acknowledged(&o.d);
            }
        }
    }

    async fn subscribe(
        &mut self,
        pid: u16,
        filters: Vec<SubscribeFilter>,
    ) -> Result<(), ConnError> {
        let acl = self.shared.auth.acl();
        let mut codes = vec![0u8; filters.len()];
        let mut allowed: Vec<(Filter, SubOptions)> = Vec::new();
        let mut places = Vec::new();
        for (i, f) in filters.iter().enumerate() {
            let parsed = if f.invalid {
                None
            } else {
                Filter::parse(&f.filter).ok()
            };
            let Some(filter) = parsed else {
                codes[i] = TOPIC_FILTER_INVALID;
                continue;
            };
            if filter.group.is_some() && f.opts.no_local {
                // No Local on a shared subscription is a protocol error [MQTT-3.8.3-4].
                return Err(ConnError::Protocol(
                    "SUBSCRIBE with No Local on a shared subscription",
                ));
            }
            if !acl.may_subscribe(self.who(), &f.filter) {
                codes[i] = NOT_AUTHORIZED;
                self.shared
                    .stats
                    .denied_subscriptions
                    .fetch_add(1, Ordering::Relaxed);
                if self
                    .maps_mut()
                    .denials_logged
                    .insert(format!("s:{}", f.filter))
                {
                    tracing::warn!(
                        client_id = %self.handle.client_id,
                        user = self.user.as_deref(),
                        filter = f.filter,
                        "subscription denied by ACL"
                    );
                }
                continue;
            }
            codes[i] = f.opts.qos;
            places.push(i);
            allowed.push((filter, f.opts));
        }
        if !allowed.is_empty() {
            let subscribed = self
                .shared
                .router
                .subscribe(&self.handle, &allowed)
                .await
                .map_err(ConnError::Store)?;
            for t in subscribed.tickets {
                if let Err(e) = t.durable().await {
                    // Not kept on flash: refuse these subscriptions (they stay in memory for
                    // this connection, which is what the client may assume from a failure
                    // code too).
                    tracing::warn!(client_id = %self.handle.client_id, error = %e, "subscription not kept in the store");
                    for &i in &places {
                        codes[i] = UNSPECIFIED;
                    }
                    break;
                }
            }
            // Retained messages follow the SUBACK.
            let suback = codec::suback(self.version, pid, &codes, None);
            self.write(&suback);
            self.maps_mut().held.extend(subscribed.retained);
            return Ok(());
        }
        let suback = codec::suback(self.version, pid, &codes, None);
        self.write(&suback);
        Ok(())
    }

    fn alloc_pid(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            self.next_pid = self.next_pid.wrapping_add(1).max(1);
            if !self.maps().out_pids.contains_key(&self.next_pid) {
                return Some(self.next_pid);
            }
        }
        None
    }

    /// Moves deliveries from the session's queue to the write buffer, as far as the client's
    /// Receive Maximum and the buffer's size allow.
    fn fill(&mut self) {
        let now = Instant::now();
        while self.maps().wbuf.len() < WRITE_CHUNK {
            if self.maps().held.is_empty() {
                let mut taken = Vec::new();
                self.handle.take(64, &mut taken);
                if taken.is_empty() {
                    return;
                }
                self.maps_mut().held.extend(taken);
            }
            while let Some(d) = self.maps().held.front() {
                if self.maps().wbuf.len() >= WRITE_CHUNK {
                    return;
                }
                if d.qos > 0 && self.maps().out.len() >= usize::from(self.receive_maximum) {
                    return;
                }
                let Some(mut d) = self.maps_mut().held.pop_front() else {
                    return;
                };
                self.send(&mut d, now);
            }
        }
    }

    /// Writes one delivery (or, for a QoS 2 one the client already received, its PUBREL).
    fn send(&mut self, d: &mut Delivery, now: Instant) {
        if d.qos > 0 && d.released && d.pid != 0 && !self.maps().out_pids.contains_key(&d.pid) {
            let p = codec::ack(self.version, 6, d.pid, 0, None);
            self.write(&p);
            self.track(d.clone());
            return;
        }
        let expiry = match d.msg.remaining_expiry(now) {
            Some(Ok(left)) => Some(left),
            Some(Err(())) => {
                self.handle.acknowledged(d);
                return;
            }
            None => None,
        };
        // Topic alias: the topic's own, a new one while there are free ones, or none.
        let alias = match self.maps().aliases_out.get(&d.msg.topic) {
            Some(&a) => Some((a, false)),
            None if (self.maps().aliases_out.len() as u16) < self.alias_max_out => {
                Some((self.maps().aliases_out.len() as u16 + 1, true))
            }
            None => None,
        };
        if d.qos > 0 && (d.pid == 0 || self.maps().out_pids.contains_key(&d.pid)) {
            match self.alloc_pid() {
                Some(pid) => {
                    // A new packet id: a resend under another id is no resend.
                    if d.pid != 0 {
                        d.dup = false;
                    }
                    d.pid = pid;
                }
                None => {
                    self.maps_mut().held.push_front(d.clone());
                    return;
                }
            }
        }
        let out = Outgoing {
            qos: d.qos,
            pid: d.pid,
            retain: d.retain,
            dup: d.dup && d.qos > 0,
            sub_ids: &d.sub_ids,
            alias,
            expiry,
        };
        let len = codec::publish_len(self.version, &d.msg, &out);
        if self
            .maximum_packet_size
            .is_some_and(|m| len > usize::try_from(m).unwrap_or(usize::MAX))
        {
            // The client cannot take it [MQTT-3.1.2-25]: dropped as if delivered.
            self.shared
                .stats
                .too_large_for_client
                .fetch_add(1, Ordering::Relaxed);
            self.handle.acknowledged(d);
            return;
        }
        if let Some((a, true)) = alias {
            self.maps_mut().aliases_out.insert(d.msg.topic.clone(), a);
        }
        let version = self.version;
        codec::encode_publish(version, &d.msg, &out, &mut self.maps_mut().wbuf);
        let stats = self.shared.router.stats();
        stats.messages_out.fetch_add(1, Ordering::Relaxed);
        stats
            .bytes_out
            .fetch_add(d.msg.payload.len() as u64, Ordering::Relaxed);
        if d.qos > 0 {
            self.handle.sent(d);
            self.track(d.clone());
        }
    }

    fn track(&mut self, d: Delivery) {
        self.sends += 1;
        let send = self.sends;
        let flows = self.maps_mut();
        flows.out_pids.insert(d.pid, send);
        flows.out.insert(send, Outflight { d });
    }

    /// The connection is over: its session learns how, and gets back what was sent and not
    /// acknowledged (with DUP) and what was not sent yet.
    async fn finish(&mut self, will: Option<(Message, u32)>, generation: u64) {
        let mut unacked: Vec<Delivery> = Vec::new();
        if let Some(flows) = self.maps.as_deref_mut() {
            unacked.extend(std::mem::take(&mut flows.out).into_values().map(|mut o| {
                o.d.dup = true;
                o.d
            }));
            unacked.extend(flows.held.drain(..).filter(|d| d.qos > 0));
        }
        self.shared
            .router
            .disconnect(
                &self.handle,
                generation,
                self.ending,
                self.disconnect_expiry,
                will,
                unacked,
            )
            .await;
    }
}

/// What a will gets before it is routed, as a PUBLISH of its client would: a retained will is
/// kept in the store (an empty one clears the topic's), and one whose topic matches an export
/// rule is appended to the outbox, so that it reaches the hub and the other offices. Both are
/// durable before the will is routed. A will the store refuses is still routed, and logged.
pub(super) fn will_keeper(store: Store, exports: Vec<TopicFilter>) -> WillKeeper {
    Arc::new(move |client_id: Arc<str>, msg: Message| {
        let store = store.clone();
        let exported = exports.iter().any(|f| f.matches(&msg.topic))
            && crate::mapping::topic_to_subject("x", &msg.topic).is_ok();
        Box::pin(async move {
            let record = record_of(&msg, &client_id);
            let mut tickets = Vec::new();
            if msg.retain {
                tickets.push(store.retain(&record).await);
            }
            if exported {
                tickets.push(store.append(&record).await);
            }
            for ticket in tickets {
                let kept = match ticket {
                    Ok(ticket) => ticket.durable().await.map(|_| ()),
                    Err(error) => Err(error),
                };
                if let Err(error) = kept {
                    tracing::warn!(%client_id, topic = %msg.topic, %error, "will not kept in the store");
                }
            }
        })
    })
}

/// The outbox record of a message (also the form a retained message is kept in).
fn record_of(msg: &Message, client_id: &str) -> OutboxRecord {
    OutboxRecord {
        topic: msg.topic.to_string(),
        payload: msg.payload.clone(),
        qos: u32::from(msg.qos),
        retain: msg.retain,
        accepted_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        origin: RecordOrigin::Mqtt as i32,
        source: client_id.to_owned(),
        headers: msg
            .props
            .user
            .iter()
            .map(|(name, value)| Header {
                name: name.to_string(),
                value: value.to_string(),
            })
            .collect(),
    }
}

/// A retained message read back from the store.
pub fn retained_message(record: OutboxRecord) -> Message {
    Message::new(
        Arc::from(record.topic.as_str()),
        record.payload,
        u8::try_from(record.qos).unwrap_or(0).min(2),
        true,
        Properties {
            user: record
                .headers
                .into_iter()
                .map(|h| (Arc::from(h.name.as_str()), Arc::from(h.value.as_str())))
                .collect(),
            ..Default::default()
        },
        Origin::Internal,
    )
}
