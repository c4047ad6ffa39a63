//! The local broker: the only module that imports rumqttd.
//!
//! rumqttd's router does the local pub/sub work (fan-out, sessions, retained messages, wills).
//! Its MQTT 3.1.1 and MQTT 5 servers run as tasks on relaybox's own tokio runtime and listen on
//! ephemeral loopback ports only; clients never reach them directly but through the gate, which
//! picks the server by the protocol level of the client's CONNECT.
//!
//! This module also lends the gate rumqttd's MQTT codecs (behind relaybox's own types) and gives
//! the downlink an in-process link into the router that bypasses the gate, so that what comes
//! down from the hub is never taken for something to export.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{
    self, v5::V5, Protocol, PubAck, PubAckProperties, PubAckReason, PubRec, PubRecProperties,
    PubRecReason, Publish, SubAck, SubAckProperties, SubscribeReasonCode,
};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reserve a loopback port for the internal broker: {0}")]
    Port(std::io::Error),
    #[error("the internal MQTT {version} server found no free loopback port in {attempts} tries: {last_error}")]
    Bind {
        version: &'static str,
        attempts: usize,
        last_error: String,
    },
    #[error("the internal MQTT {version} server did not come up on {addr}")]
    NotListening {
        version: &'static str,
        addr: SocketAddr,
    },
    #[error("cannot link to the local router: {0}")]
    Link(String),
    #[error("the local router cannot take topic {0:?}: it starts with a non-ASCII character")]
    UnroutableTopic(String),
}

/// Whether rumqttd's router can take a message on `topic`. Its topic matching slices the
/// topic's first byte as a string, which panics when the first character is not ASCII — in the
/// router thread, after which no message is routed at all. Such topics are refused before they
/// reach it (by the gate, and here for in-process publishers).
pub fn topic_routable(topic: &str) -> bool {
    topic.chars().next().is_none_or(|c| c.is_ascii())
}

/// The MQTT protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 and 3.1.1 (protocol levels 3 and 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// Limits the internal servers apply to every connection.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub max_packet_size: usize,
    pub max_inflight: usize,
}

/// Makes in-process links into the router (the router's channel type is private to rumqttd,
/// so the sender is kept inside this closure).
type LinkFactory = Box<dyn Fn(&str) -> Result<(LinkTx, LinkRx), BrokerError> + Send + Sync>;

/// The running local broker.
pub struct Broker {
    v4: SocketAddr,
    v5: SocketAddr,
    links: LinkFactory,
}

impl Broker {
    /// Starts the router (on its own thread, as rumqttd's router is a blocking loop) and the
    /// MQTT 3.1.1 and 5 servers on loopback, and waits until both accept connections.
    pub async fn start(settings: &BrokerSettings) -> Result<Broker, BrokerError> {
        let router_config = RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, router_config).spawn();

        let v4 = start_server("3.1.1", |addr| {
            Server::new(
                server_settings("internal-v4", addr, settings),
                router_tx.clone(),
                V4Egress,
            )
        })
        .await?;
        let v5 = start_server("5", |addr| {
            Server::new(
                server_settings("internal-v5", addr, settings),
                router_tx.clone(),
                V5,
            )
        })
        .await?;

        // rumqttd reports a client's DISCONNECT to the router and then the closed connection
        // once more; the second report ends whatever connection took the slot in between. A
        // link being set up at that moment sees its channel closed before its CONNACK: it is
        // made again (the next slot is a fresh one).
        let links: LinkFactory = Box::new(move |client_id: &str| {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match LinkBuilder::new(client_id, router_tx.clone())
                    .dynamic_filters(true)
                    .build()
                {
                    Ok((tx, rx, _connack)) => return Ok((tx, rx)),
                    Err(error) if attempt < LINK_ATTEMPTS => {
                        tracing::warn!(client_id, %error, attempt, "local link lost while made; again");
                    }
                    Err(error) => return Err(BrokerError::Link(error.to_string())),
                }
            }
        });
        Ok(Broker { v4, v5, links })
    }

    /// The internal server for clients of `version`.
    pub fn server_for(&self, version: Version) -> SocketAddr {
        match version {
            Version::V4 => self.v4,
            Version::V5 => self.v5,
        }
    }

    /// Hands `messages` to the router as retained messages (after a restart: the router keeps
    /// them in memory only) and returns once the router has taken every one of them, so that a
    /// client let in afterwards finds them.
    pub async fn restore_retained(&self, messages: Vec<Retained>) -> Result<usize, BrokerError> {
        // A link's events are handled in order: once a marker published after the retained
        // messages comes back, the router has stored them all. (No client is connected yet, so
        // none sees the marker; the router refuses `$` filters, so it cannot be one.)
        let marker = format!("relaybox-internal/restored/{:016x}", rand::random::<u64>());
        let (mut tx, rx) = (self.links)("relaybox-retained")?;
        let link = |e: rumqttd::local::LinkError| BrokerError::Link(e.to_string());
        tx.subscribe(marker.clone()).map_err(link)?;
        let mut restored = 0;
        for m in messages {
            if !topic_routable(&m.topic) {
                tracing::warn!(
                    topic = m.topic,
                    "retained message not restored: the router cannot take its topic"
                );
                continue;
            }
            let publish = Publish::new(Bytes::from(m.topic.into_bytes()), m.payload, true);
            let properties = (!m.user_properties.is_empty()).then(|| protocol::PublishProperties {
                user_properties: m.user_properties,
                ..Default::default()
            });
            tx.send(protocol::Packet::Publish(publish, properties))
                .await
                .map_err(link)?;
            restored += 1;
        }
        let publish = Publish::new(
            Bytes::from(marker.clone().into_bytes()),
            Bytes::new(),
            false,
        );
        tx.send(protocol::Packet::Publish(publish, None))
            .await
            .map_err(link)?;
        let mut rx = rx;
        let marker_back = async {
            loop {
                match rx.next().await.map_err(link)? {
                    Some(rumqttd::Notification::Forward(f)) if f.publish.topic == marker => {
                        return Ok(());
                    }
                    Some(rumqttd::Notification::Unschedule) => rx.wake().await.map_err(link)?,
                    _ => {}
                }
            }
        };
        tokio::time::timeout(RESTORE_TIMEOUT, marker_back)
            .await
            .map_err(|_| {
                BrokerError::Link(format!(
                    "the router did not take the {restored} retained messages within {RESTORE_TIMEOUT:?}"
                ))
            })??;
        // Leave the router: the link's session and its marker subscription go with it.
        let disconnect = protocol::Disconnect {
            reason_code: protocol::DisconnectReasonCode::NormalDisconnection,
        };
        tx.send(protocol::Packet::Disconnect(disconnect, None))
            .await
            .map_err(link)?;
        Ok(restored)
    }

    /// An in-process publisher into the router that bypasses the gate. Building the link
    /// waits on the router for a moment, so call this at start, not per message.
    pub fn local_publisher(&self, client_id: &str) -> Result<LocalPublisher, BrokerError> {
        let (tx, mut rx) = (self.links)(client_id)?;
        // The router sends this link notifications it never needs (it subscribes to nothing);
        // drain them so they do not pile up.
        tokio::spawn(async move { while rx.next().await.is_ok() {} });
        Ok(LocalPublisher { tx })
    }

    /// An in-process client that publishes and receives what matches `filters`.
    pub fn local_client(
        &self,
        client_id: &str,
        filters: &[String],
    ) -> Result<(LocalPublisher, LocalSubscriber), BrokerError> {
        let (mut tx, rx) = (self.links)(client_id)?;
        for filter in filters {
            tx.subscribe(filter.clone())
                .map_err(|e| BrokerError::Link(e.to_string()))?;
        }
        Ok((LocalPublisher { tx }, LocalSubscriber { rx }))
    }
}

/// Publishes into the local router directly, bypassing the gate.
pub struct LocalPublisher {
    tx: LinkTx,
}

impl LocalPublisher {
    /// Hands a message to the router; returns once the router's queue has taken it.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), BrokerError> {
        if !topic_routable(topic) {
            return Err(BrokerError::UnroutableTopic(topic.to_owned()));
        }
        let publish = Publish::new(Bytes::copy_from_slice(topic.as_bytes()), payload, retain);
        self.tx
            .send(protocol::Packet::Publish(publish, None))
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::Link(e.to_string()))
    }
}

/// A retained message to give back to the router at start.
#[derive(Debug, Clone)]
pub struct Retained {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
}

/// How long restoring retained messages may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

/// Receives the messages of a local client's subscriptions.
pub struct LocalSubscriber {
    rx: LinkRx,
}

impl LocalSubscriber {
    /// The next message (topic, payload); `None` once the router is gone.
    pub async fn next(&mut self) -> Option<(String, Bytes)> {
        loop {
            match self.rx.next().await {
                Ok(Some(rumqttd::Notification::Forward(forward))) => {
                    let topic = String::from_utf8_lossy(&forward.publish.topic).into_owned();
                    return Some((topic, forward.publish.payload));
                }
                // The router paused this link's delivery; ask to be scheduled again.
                Ok(Some(rumqttd::Notification::Unschedule)) => {
                    if self.rx.wake().await.is_err() {
                        return None;
                    }
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

/// rumqttd's MQTT 3.1.1 codec for the internal 3.1.1 server, except that MQTT 5 properties are
/// dropped from what it sends. The router keeps the properties of a message an MQTT 5 client
/// published (user properties, message expiry, …) and hands them to every subscriber's link;
/// rumqttd's 3.1.1 encoder reaches `unreachable!()` on them, which killed the link of each
/// 3.1.1 subscriber of that topic.
#[derive(Debug, Clone, Copy)]
struct V4Egress;

impl Protocol for V4Egress {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<protocol::Packet, protocol::Error> {
        protocol::v4::V4.read_mut(stream, max_size)
    }

    fn write(
        &self,
        packet: protocol::Packet,
        buffer: &mut BytesMut,
    ) -> Result<usize, protocol::Error> {
        use protocol::Packet as P;
        let packet = match packet {
            P::Connect(c, _, will, _, login) => P::Connect(c, None, will, None, login),
            P::ConnAck(a, _) => P::ConnAck(a, None),
            P::Publish(p, _) => P::Publish(p, None),
            P::PubAck(a, _) => P::PubAck(a, None),
            P::Subscribe(s, _) => P::Subscribe(s, None),
            P::SubAck(a, _) => P::SubAck(a, None),
            P::PubRec(a, _) => P::PubRec(a, None),
            P::PubRel(a, _) => P::PubRel(a, None),
            P::PubComp(a, _) => P::PubComp(a, None),
            P::Unsubscribe(u, _) => P::Unsubscribe(u, None),
            P::UnsubAck(a, _) => P::UnsubAck(a, None),
            P::Disconnect(d, _) => P::Disconnect(d, None),
            other @ (P::PingReq(_) | P::PingResp(_)) => other,
        };
        protocol::v4::V4.write(packet, buffer)
    }
}

fn server_settings(name: &str, listen: SocketAddr, s: &BrokerSettings) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: s.max_packet_size,
            max_inflight_count: s.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// How many times an in-process link is made before the broker gives up.
const LINK_ATTEMPTS: u32 = 3;

/// How many fresh ports an internal server tries before the broker gives up.
const BIND_ATTEMPTS: usize = 20;

/// Starts an internal server on a free loopback port and returns the port once the server
/// listens on it. rumqttd binds its own listener from an address, so a free port is found by
/// binding port 0 and letting it go — and another process may take it in between. The server
/// binds on its first poll, before its accept loop waits; that poll is made here, so a lost race
/// is seen at once and retried on a fresh port, and a foreign listener on the port is never
/// taken for the server.
async fn start_server<P>(
    version: &'static str,
    make: impl FnMut(SocketAddr) -> Server<P>,
) -> Result<SocketAddr, BrokerError>
where
    P: Protocol + Clone + Send + Sync + 'static,
{
    start_server_from(version, reserve_port, make).await
}

/// [`start_server`] with the candidate ports from `next_addr`.
async fn start_server_from<P>(
    version: &'static str,
    mut next_addr: impl FnMut() -> Result<SocketAddr, BrokerError>,
    mut make: impl FnMut(SocketAddr) -> Server<P>,
) -> Result<SocketAddr, BrokerError>
where
    P: Protocol + Clone + Send + Sync + 'static,
{
    let mut last_error = String::new();
    for _ in 0..BIND_ATTEMPTS {
        let addr = next_addr()?;
        let mut server = make(addr);
        let mut run = Box::pin(async move { server.start(LinkType::Remote).await });
        match std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await {
            Poll::Pending => {}
            Poll::Ready(Err(error)) => {
                tracing::debug!(%addr, ?error, version, "internal server could not bind; retrying");
                last_error = error.to_string();
                continue;
            }
            Poll::Ready(Ok(())) => {
                last_error = "the server stopped at once".to_owned();
                continue;
            }
        }
        tokio::spawn(async move {
            if let Err(error) = run.await {
                tracing::error!(?error, version, "internal MQTT server stopped");
            }
        });
        wait_listening(addr, version).await?;
        return Ok(addr);
    }
    Err(BrokerError::Bind {
        version,
        attempts: BIND_ATTEMPTS,
        last_error,
    })
}

fn reserve_port() -> Result<SocketAddr, BrokerError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(BrokerError::Port)?;
    l.local_addr().map_err(BrokerError::Port)
}

async fn wait_listening(addr: SocketAddr, version: &'static str) -> Result<(), BrokerError> {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BrokerError::NotListening { version, addr })
}

// ---------------------------------------------------------------------------------------------
// Codecs for the gate.

/// A packet that cannot be accepted from a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("packet of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("the first packet is not a CONNECT")]
    NotConnect,
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedLevel(u8),
    /// A well-formed packet that breaks a rule of the protocol (MQTT 5 reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// What a fixed header says about the next packet in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The packet type (1 = CONNECT … 15 = AUTH).
    pub kind: u8,
    /// The low nibble of the first byte.
    pub flags: u8,
    /// Length of the fixed header.
    pub header_len: usize,
    /// Length of the whole packet.
    pub len: usize,
}

/// Frames the next packet in `buf`: `Ok(None)` when more bytes are needed.
pub fn frame(buf: &[u8], max_packet_size: usize) -> Result<Option<Frame>, CodecError> {
    match protocol::v5::check(buf.iter(), max_packet_size) {
        Ok(h) => {
            let len = h.frame_length();
            let first = buf.first().copied().unwrap_or(0);
            // The fixed header is one type byte plus 1 to 4 length bytes.
            let header_len = (2..=5)
                .find(|n| buf.get(n - 1).is_some_and(|b| b & 0x80 == 0))
                .unwrap_or(2);
            Ok(Some(Frame {
                kind: first >> 4,
                flags: first & 0x0f,
                header_len,
                len,
            }))
        }
        Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(protocol::Error::PayloadSizeLimitExceeded(n)) => Err(CodecError::TooLarge(n)),
        Err(e) => Err(CodecError::Malformed(e.to_string())),
    }
}

/// What the gate needs to know of a CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub version: Version,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean_start: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The topic of the will message, if the client set one (the router publishes it for the
    /// client when the connection ends without DISCONNECT).
    pub will_topic: Option<String>,
    /// MQTT 5 Receive Maximum: QoS 1/2 publishes the client takes unacknowledged (absent:
    /// 65,535).
    pub receive_maximum: u16,
    /// MQTT 5 Maximum Packet Size the client accepts (absent: no limit).
    pub maximum_packet_size: Option<u32>,
}

/// Decodes a client's CONNECT packet (the whole frame).
pub fn decode_connect(packet: &[u8], max_packet_size: usize) -> Result<ConnectInfo, CodecError> {
    let f = frame(packet, max_packet_size)?
        .ok_or_else(|| CodecError::Malformed("truncated CONNECT".into()))?;
    if f.kind != 1 {
        return Err(CodecError::NotConnect);
    }
    // Variable header: protocol name (u16 length + bytes), then the protocol level.
    let body = &packet[f.header_len..f.len];
    let name_len = match body {
        [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
        _ => {
            return Err(CodecError::Malformed(
                "CONNECT without protocol name".into(),
            ))
        }
    };
    let name = body
        .get(2..2 + name_len)
        .ok_or_else(|| CodecError::Malformed("CONNECT protocol name cut short".into()))?;
    let level = *body
        .get(2 + name_len)
        .ok_or_else(|| CodecError::Malformed("CONNECT without protocol level".into()))?;
    let version = match (name, level) {
        (b"MQTT", 4) | (b"MQIsdp", 3) => Version::V4,
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(CodecError::UnsupportedLevel(l)),
        _ => {
            return Err(CodecError::Malformed(
                "CONNECT protocol name is not MQTT".into(),
            ))
        }
    };
    let mut buf = BytesMut::from(packet);
    let decoded = match version {
        Version::V4 => protocol::v4::V4.read_mut(&mut buf, max_packet_size),
        Version::V5 => V5.read_mut(&mut buf, max_packet_size),
    };
    match decoded {
        Ok(protocol::Packet::Connect(_, Some(props), ..)) if props.receive_maximum == Some(0) => {
            Err(CodecError::Protocol("CONNECT with a Receive Maximum of 0"))
        }
        Ok(protocol::Packet::Connect(_, Some(props), ..)) if props.max_packet_size == Some(0) => {
            Err(CodecError::Protocol(
                "CONNECT with a Maximum Packet Size of 0",
            ))
        }
        Ok(protocol::Packet::Connect(connect, props, will, _, login)) => Ok(ConnectInfo {
            version,
            client_id: connect.client_id,
            keep_alive: connect.keep_alive,
            clean_start: connect.clean_session,
            username: login
                .as_ref()
                .map(|l| l.username.clone())
                .filter(|u| !u.is_empty()),
            password: login.map(|l| l.password).filter(|p| !p.is_empty()),
            will_topic: will.map(|w| String::from_utf8_lossy(&w.topic).into_owned()),
            receive_maximum: props
                .as_ref()
                .and_then(|p| p.receive_maximum)
                .unwrap_or(u16::MAX),
            maximum_packet_size: props.as_ref().and_then(|p| p.max_packet_size),
        }),
        Ok(_) => Err(CodecError::NotConnect),
        Err(e) => Err(CodecError::Malformed(e.to_string())),
    }
}

/// The keep-alive the gate asks of the internal servers, whatever the client's. rumqttd refuses
/// keep-alive 0 (`ZeroKeepAlive` in its `link/remote.rs`) and closes a link that reads nothing
/// for 1.5 × its keep-alive; the gate enforces the client's own keep-alive itself and pings the
/// internal server well within this one.
pub const INTERNAL_KEEP_ALIVE: u16 = 10;

/// What the gate changes in a CONNECT before it goes to the broker.
#[derive(Debug, Clone, Default)]
pub struct ConnectChanges {
    pub keep_alive: u16,
    /// A client id in place of the client's (an assigned one).
    pub client_id: Option<String>,
    /// Remove the MQTT 5 Topic Alias Maximum, so that the broker sends no topic aliases.
    pub no_topic_aliases: bool,
}

/// The same CONNECT (the whole frame, as [`decode_connect`] took it) with `changes` applied:
/// decoded and encoded again with the codec of `version`.
pub fn rewrite_connect(
    version: Version,
    packet: &[u8],
    max_packet_size: usize,
    changes: &ConnectChanges,
) -> Result<Bytes, CodecError> {
    let packet = match read(version, packet, max_packet_size, 1)? {
        protocol::Packet::Connect(mut connect, mut props, will, will_props, login) => {
            connect.keep_alive = changes.keep_alive;
            if let Some(id) = &changes.client_id {
                connect.client_id = id.clone();
            }
            if changes.no_topic_aliases {
                if let Some(p) = props.as_mut() {
                    p.topic_alias_max = None;
                }
            }
            protocol::Packet::Connect(connect, props, will, will_props, login)
        }
        _ => return Err(CodecError::NotConnect),
    };
    let mut out = BytesMut::new();
    let written = match version {
        Version::V4 => protocol::v4::V4.write(packet, &mut out),
        Version::V5 => V5.write(packet, &mut out),
    };
    written.map_err(|e| CodecError::Malformed(format!("cannot encode CONNECT again: {e}")))?;
    Ok(out.freeze())
}

/// What the gate needs to know of a PUBLISH.
#[derive(Debug, Clone)]
pub struct PublishInfo {
    /// The topic as sent; empty when an MQTT 5 client uses a topic alias alone.
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub pkid: u16,
    pub topic_alias: Option<u16>,
    pub user_properties: Vec<(String, String)>,
}

/// Decodes a client's PUBLISH packet (the whole frame).
pub fn decode_publish(
    version: Version,
    packet: &[u8],
    max_packet_size: usize,
) -> Result<PublishInfo, CodecError> {
    let f = frame(packet, max_packet_size)?
        .ok_or_else(|| CodecError::Malformed("truncated PUBLISH".into()))?;
    if f.kind != 3 {
        return Err(CodecError::Malformed("not a PUBLISH".into()));
    }
    let qos = (f.flags >> 1) & 0b11;
    if qos == 3 {
        return Err(CodecError::Malformed("PUBLISH with QoS 3".into()));
    }
    let mut buf = BytesMut::from(packet);
    let decoded = match version {
        Version::V4 => protocol::v4::V4.read_mut(&mut buf, max_packet_size),
        Version::V5 => V5.read_mut(&mut buf, max_packet_size),
    };
    let (publish, properties) = match decoded {
        Ok(protocol::Packet::Publish(p, props)) => (p, props),
        Ok(_) => return Err(CodecError::Malformed("not a PUBLISH".into())),
        Err(e) => return Err(CodecError::Malformed(e.to_string())),
    };
    let topic = std::str::from_utf8(&publish.topic)
        .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?
        .to_owned();
    // The packet id follows the topic in the variable header (QoS 1 and 2 only).
    let pkid = if qos > 0 {
        let at = f.header_len + 2 + publish.topic.len();
        match packet.get(at..at + 2) {
            Some([a, b]) => u16::from_be_bytes([*a, *b]),
            _ => return Err(CodecError::Malformed("PUBLISH without packet id".into())),
        }
    } else {
        0
    };
    let (topic_alias, user_properties) = match properties {
        Some(p) => (p.topic_alias, p.user_properties),
        None => (None, Vec::new()),
    };
    Ok(PublishInfo {
        topic,
        payload: publish.payload,
        qos,
        retain: publish.retain,
        pkid,
        topic_alias,
        user_properties,
    })
}

/// Why the gate refuses a publish it cannot make durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 0x97: the outbox is full.
    QuotaExceeded,
    /// 0x80: the store failed.
    UnspecifiedError,
}

/// Encodes an MQTT 5 PUBACK (QoS 1) or PUBREC (QoS 2) that refuses a publish, with a reason
/// string for the client's logs.
pub fn encode_refusal(qos: u8, pkid: u16, refusal: Refusal, reason: &str) -> Bytes {
    let mut out = BytesMut::new();
    let reason_string = Some(reason.to_owned());
    let packet = if qos == 2 {
        protocol::Packet::PubRec(
            PubRec {
                pkid,
                reason: match refusal {
                    Refusal::QuotaExceeded => PubRecReason::QuotaExceeded,
                    Refusal::UnspecifiedError => PubRecReason::UnspecifiedError,
                },
            },
            Some(PubRecProperties {
                reason_string,
                user_properties: Vec::new(),
            }),
        )
    } else {
        protocol::Packet::PubAck(
            PubAck {
                pkid,
                reason: match refusal {
                    Refusal::QuotaExceeded => PubAckReason::QuotaExceeded,
                    Refusal::UnspecifiedError => PubAckReason::UnspecifiedError,
                },
            },
            Some(PubAckProperties {
                reason_string,
                user_properties: Vec::new(),
            }),
        )
    };
    // Encoding an acknowledgement with a short reason string into a growable buffer has no
    // failure case; an error here would be a codec bug, and an empty reply is the safe answer.
    match V5.write(packet, &mut out) {
        Ok(_) => out.freeze(),
        Err(_) => Bytes::new(),
    }
}

/// Per-connection MQTT 5 topic aliases a client set up (client → server direction).
#[derive(Debug, Default)]
pub struct TopicAliases(HashMap<u16, String>);

impl TopicAliases {
    /// The full topic of a publish, recording or resolving its alias.
    pub fn resolve(&mut self, publish: &PublishInfo) -> Option<String> {
        match (publish.topic.is_empty(), publish.topic_alias) {
            (false, Some(alias)) => {
                self.0.insert(alias, publish.topic.clone());
                Some(publish.topic.clone())
            }
            (false, None) => Some(publish.topic.clone()),
            (true, Some(alias)) => self.0.get(&alias).cloned(),
            (true, None) => None,
        }
    }
}

/// Decodes a packet of type `kind` with rumqttd's codec. The type is checked first: that codec
/// reaches `unreachable!()` for some types (CONNACK, UNSUBACK and AUTH in MQTT 5, AUTH in 3.1.1).
fn read(
    version: Version,
    packet: &[u8],
    max: usize,
    kind: u8,
) -> Result<protocol::Packet, CodecError> {
    match frame(packet, max)? {
        Some(f) if f.kind == kind => {}
        Some(f) => {
            return Err(CodecError::Malformed(format!(
                "packet type {} where {kind} was expected",
                f.kind
            )))
        }
        None => return Err(CodecError::Malformed("truncated packet".into())),
    }
    let mut buf = BytesMut::from(packet);
    match version {
        Version::V4 => protocol::v4::V4.read_mut(&mut buf, max),
        Version::V5 => V5.read_mut(&mut buf, max),
    }
    .map_err(|e| CodecError::Malformed(e.to_string()))
}

fn write(version: Version, packet: protocol::Packet) -> Bytes {
    let mut out = BytesMut::new();
    // Encoding a packet this module built into a growable buffer has no failure case but a
    // codec bug; an empty reply is the safe answer then.
    let written = match version {
        Version::V4 => protocol::v4::V4.write(packet, &mut out),
        Version::V5 => V5.write(packet, &mut out),
    };
    match written {
        Ok(_) => out.freeze(),
        Err(_) => Bytes::new(),
    }
}

/// The filters of a client's SUBSCRIBE.
#[derive(Debug, Clone)]
pub struct SubscribeInfo {
    pub pkid: u16,
    pub filters: Vec<String>,
}

pub fn decode_subscribe(
    version: Version,
    packet: &[u8],
    max: usize,
) -> Result<SubscribeInfo, CodecError> {
    match read(version, packet, max, 8)? {
        protocol::Packet::Subscribe(s, _) => Ok(SubscribeInfo {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| f.path).collect(),
        }),
        _ => Err(CodecError::Malformed("not a SUBSCRIBE".into())),
    }
}

/// The same SUBSCRIBE with only the filters whose `keep` is true.
pub fn subscribe_subset(
    version: Version,
    packet: &[u8],
    max: usize,
    keep: &[bool],
) -> Result<Bytes, CodecError> {
    match read(version, packet, max, 8)? {
        protocol::Packet::Subscribe(mut s, props) => {
            let mut i = 0;
            s.filters.retain(|_| {
                let k = keep.get(i).copied().unwrap_or(false);
                i += 1;
                k
            });
            Ok(write(version, protocol::Packet::Subscribe(s, props)))
        }
        _ => Err(CodecError::Malformed("not a SUBSCRIBE".into())),
    }
}

/// What becomes of one filter of a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Sent on to the broker.
    Allow,
    /// Refused by the ACL.
    Deny,
    /// Not a valid topic filter.
    Invalid,
    /// A valid filter the broker does not serve (`$` filters other than `$share/`).
    Unsupported,
}

impl Verdict {
    fn code(self, version: Version) -> SubscribeReasonCode {
        match (version, self) {
            // 3.1.1 has one failure code.
            (Version::V4, _) => SubscribeReasonCode::Failure,
            (Version::V5, Verdict::Deny) => SubscribeReasonCode::NotAuthorized,
            (Version::V5, Verdict::Invalid) => SubscribeReasonCode::TopicFilterInvalid,
            (Version::V5, _) => SubscribeReasonCode::ImplementationSpecific,
        }
    }
}

/// Whether the broker can take `filter`: a valid MQTT topic filter (`#` only as the whole last
/// level, `+` only as a whole level; a shared subscription as `$share/<group>/<filter>`), and
/// not one of the `$` filters the broker refuses — it drops the whole connection for those.
pub fn check_filter(filter: &str) -> Verdict {
    fn valid(filter: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        !filter.is_empty()
            && levels.iter().enumerate().all(|(i, level)| {
                let wild = level.contains(['+', '#']);
                !wild || *level == "+" || (*level == "#" && i + 1 == levels.len())
            })
    }
    if let Some(rest) = filter.strip_prefix("$share/") {
        return match rest.split_once('/') {
            Some((group, inner))
                if !group.is_empty() && !group.contains(['+', '#']) && valid(inner) =>
            {
                Verdict::Allow
            }
            _ => Verdict::Invalid,
        };
    }
    if !valid(filter) {
        Verdict::Invalid
    } else if filter.starts_with('$') {
        Verdict::Unsupported
    } else {
        Verdict::Allow
    }
}

/// A SUBACK refusing every filter of SUBSCRIBE `pkid`, each for its verdict.
pub fn suback_refused(version: Version, pkid: u16, verdicts: &[Verdict]) -> Bytes {
    let suback = SubAck {
        pkid,
        return_codes: verdicts.iter().map(|v| v.code(version)).collect(),
    };
    let props = (version == Version::V5).then(|| SubAckProperties {
        reason_string: Some(SUBSCRIBE_REFUSED.to_owned()),
        user_properties: Vec::new(),
    });
    write(version, protocol::Packet::SubAck(suback, props))
}

/// The broker's SUBACK for the allowed filters, with the refused ones put back in place:
/// `verdicts[i]` says what became of the client's i-th filter.
pub fn merge_suback(
    version: Version,
    suback: &[u8],
    verdicts: &[Verdict],
) -> Result<Bytes, CodecError> {
    match read(version, suback, usize::MAX, 9)? {
        protocol::Packet::SubAck(mut ack, props) => {
            let mut granted = ack.return_codes.into_iter();
            ack.return_codes = verdicts
                .iter()
                .map(|v| match v {
                    Verdict::Allow => granted.next().unwrap_or(Verdict::Unsupported.code(version)),
                    refused => refused.code(version),
                })
                .collect();
            let props = match props {
                None if version == Version::V5 => Some(SubAckProperties {
                    reason_string: Some(SUBSCRIBE_REFUSED.to_owned()),
                    user_properties: Vec::new(),
                }),
                props => props,
            };
            Ok(write(version, protocol::Packet::SubAck(ack, props)))
        }
        _ => Err(CodecError::Malformed("not a SUBACK".into())),
    }
}

/// The packet id of a QoS 1/2 PUBLISH frame (after its topic); `None` for QoS 0 or a frame
/// too short.
pub fn publish_packet_id(packet: &[u8]) -> Option<u16> {
    let f = frame(packet, usize::MAX).ok()??;
    if f.kind != 3 || (f.flags >> 1) & 0b11 == 0 {
        return None;
    }
    let at = f.header_len;
    let topic_len = usize::from(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]));
    let id = at + 2 + topic_len;
    Some(u16::from_be_bytes([*packet.get(id)?, *packet.get(id + 1)?]))
}

/// The packet id of a SUBACK, PUBACK, PUBREC, PUBREL or PUBCOMP frame.
pub fn packet_id(frame: &[u8]) -> Option<u16> {
    let f = self::frame(frame, usize::MAX).ok()??;
    match frame.get(f.header_len..f.header_len + 2)? {
        [a, b] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

/// Acknowledgements the gate sends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    PubAck,
    PubRec,
    PubComp,
}

/// An acknowledgement with reason "not authorized" on MQTT 5, or a plain one on 3.1.1 (which
/// has no refusal codes: the message is acknowledged and dropped, as Mosquitto does).
/// The reason string of a PUBLISH the ACL refused (MQTT 5).
const PUBLISH_DENIED: &str = "not authorized to publish to this topic";
/// The reason string of a SUBACK with refused filters (MQTT 5).
const SUBSCRIBE_REFUSED: &str =
    "some topic filters were refused: 0x87 not authorized, 0x8F not a valid filter, 0x83 not served";

pub fn ack_denied(version: Version, ack: Ack, pkid: u16) -> Bytes {
    match (version, ack) {
        (Version::V5, Ack::PubAck) => write(
            version,
            protocol::Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::NotAuthorized,
                },
                Some(PubAckProperties {
                    reason_string: Some(PUBLISH_DENIED.to_owned()),
                    user_properties: Vec::new(),
                }),
            ),
        ),
        (Version::V5, Ack::PubRec) => write(
            version,
            protocol::Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::NotAuthorized,
                },
                Some(PubRecProperties {
                    reason_string: Some(PUBLISH_DENIED.to_owned()),
                    user_properties: Vec::new(),
                }),
            ),
        ),
        (_, kind) => {
            let first = match kind {
                Ack::PubAck => 0x40,
                Ack::PubRec => 0x50,
                Ack::PubComp => 0x70,
            };
            let [hi, lo] = pkid.to_be_bytes();
            Bytes::from(vec![first, 0x02, hi, lo])
        }
    }
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Wrong user name or password (3.1.1: 4, 5: 0x86).
    BadCredentials,
    /// No credentials where they are needed (3.1.1: 5, 5: 0x87).
    NotAuthorized,
    /// Too many connections (3.1.1: 3 "server unavailable", 5: 0x9F "connection rate" is
    /// not it; 0x97 "quota exceeded").
    Busy,
    /// A client id the router cannot take (3.1.1: 2 "identifier rejected", 5: 0x85).
    BadClientId,
    /// A will topic that is no topic name, or that the router cannot take (5: 0x90; 3.1.1 has
    /// no code for it: the connection is closed without CONNACK).
    BadWillTopic,
}

/// Whether rumqttd's router takes this client id. It drops a connection whose id holds `+`,
/// `$`, `#` or `/` without an answer, and leaves a stale entry behind: a second CONNECT with
/// that id then panics in rumqttd's server while it holds a lock, and from then on that
/// server (3.1.1 or 5) accepts no connection at all. The gate refuses such ids itself.
pub fn client_id_acceptable(client_id: &str) -> bool {
    !client_id.contains(['+', '$', '#', '/'])
}

/// A CONNACK that refuses the connection.
pub fn connack_refusal(version: Version, refusal: ConnectRefusal) -> Bytes {
    let code = match (version, refusal) {
        (Version::V4, ConnectRefusal::BadCredentials) => 4,
        (Version::V4, ConnectRefusal::NotAuthorized) => 5,
        (Version::V4, ConnectRefusal::Busy) => 3,
        (Version::V4, ConnectRefusal::BadClientId) => 2,
        (Version::V4, ConnectRefusal::BadWillTopic) => return Bytes::new(),
        (Version::V5, ConnectRefusal::BadCredentials) => 0x86,
        (Version::V5, ConnectRefusal::NotAuthorized) => 0x87,
        (Version::V5, ConnectRefusal::Busy) => 0x97,
        (Version::V5, ConnectRefusal::BadClientId) => 0x85,
        (Version::V5, ConnectRefusal::BadWillTopic) => 0x90,
    };
    match version {
        Version::V4 => Bytes::from(vec![0x20, 0x02, 0x00, code]),
        Version::V5 => connack_v5_refusal(
            code,
            match refusal {
                ConnectRefusal::BadCredentials => "bad user name or password",
                ConnectRefusal::NotAuthorized => "a user name and password are needed",
                ConnectRefusal::Busy => "too many connections",
                ConnectRefusal::BadClientId => "client identifier not accepted",
                ConnectRefusal::BadWillTopic => "will topic not accepted",
            },
        ),
    }
}

/// An MQTT 5 CONNACK "protocol error" (0x82) that says what was wrong.
pub fn connack_protocol_error(what: &str) -> Bytes {
    connack_v5_refusal(0x82, what)
}

/// An MQTT 5 CONNACK: session present 0, `code`, and `reason` as its Reason String (cut to
/// fit a one-byte remaining length).
fn connack_v5_refusal(code: u8, reason: &str) -> Bytes {
    let reason = &reason.as_bytes()[..reason.len().min(100)];
    let mut props = vec![0x1f];
    props.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    props.extend_from_slice(reason);
    let mut out = vec![0x20, (3 + props.len()) as u8, 0x00, code, props.len() as u8];
    out.extend(props);
    Bytes::from(out)
}

/// What the gate adds to an MQTT 5 CONNACK from the broker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnackAdditions {
    /// Assigned Client Identifier (0x12): the id the gate made for an empty one.
    pub assigned_client_id: Option<String>,
    /// Receive Maximum (0x21): the gate's limit of unacknowledged QoS 1/2 publishes.
    pub receive_maximum: Option<u16>,
    /// Maximum Packet Size (0x27): the gate's limit.
    pub maximum_packet_size: Option<u32>,
}

/// The broker's MQTT 5 CONNACK (a whole frame) with `add`'s properties in it, each unless the
/// broker already set it. The broker's CONNACK is not decoded with rumqttd's codec, which
/// cannot read server-only packets; its property block is walked here.
pub fn connack_with(packet: &[u8], add: &ConnackAdditions) -> Result<Bytes, CodecError> {
    let bad = |what: &str| CodecError::Malformed(format!("CONNACK from the broker: {what}"));
    let f = frame(packet, usize::MAX)?.ok_or_else(|| bad("truncated"))?;
    if f.kind != 2 {
        return Err(bad("not a CONNACK"));
    }
    let body = &packet[f.header_len..f.len];
    let (flags_reason, rest) = body.split_at_checked(2).ok_or_else(|| bad("too short"))?;
    let (props_len, len_bytes) = read_varint(rest).ok_or_else(|| bad("property length"))?;
    let props = rest
        .get(len_bytes..len_bytes + props_len)
        .ok_or_else(|| bad("properties beyond the packet"))?;
    let present = property_ids(props).ok_or_else(|| bad("unknown property"))?;

    let mut new_props = props.to_vec();
    if let Some(id) = add.assigned_client_id.as_deref() {
        if !present.contains(&0x12) {
            new_props.push(0x12);
            let n = u16::try_from(id.len()).map_err(|_| bad("client id too long"))?;
            new_props.extend_from_slice(&n.to_be_bytes());
            new_props.extend_from_slice(id.as_bytes());
        }
    }
    if let Some(max) = add.receive_maximum {
        if !present.contains(&0x21) {
            new_props.push(0x21);
            new_props.extend_from_slice(&max.to_be_bytes());
        }
    }
    if let Some(max) = add.maximum_packet_size {
        if !present.contains(&0x27) {
            new_props.push(0x27);
            new_props.extend_from_slice(&max.to_be_bytes());
        }
    }
    let mut new_body = flags_reason.to_vec();
    write_varint(&mut new_body, new_props.len());
    new_body.extend_from_slice(&new_props);
    let mut out = vec![packet[0]];
    write_varint(&mut out, new_body.len());
    out.extend_from_slice(&new_body);
    Ok(Bytes::from(out))
}

fn read_varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in buf.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// The ids of the properties in an MQTT 5 CONNACK property block; `None` if one is unknown or
/// runs past the end.
fn property_ids(mut props: &[u8]) -> Option<Vec<u8>> {
    let mut ids = Vec::new();
    while let Some((&id, rest)) = props.split_first() {
        let len = match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            // Two-byte integer.
            0x13 | 0x21 | 0x22 => 2,
            // Four-byte integer.
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            // UTF-8 string or binary data.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => {
                let n = rest.get(..2)?;
                2 + usize::from(u16::from_be_bytes([n[0], n[1]]))
            }
            // User property: two strings.
            0x26 => {
                let a = rest.get(..2)?;
                let a = 2 + usize::from(u16::from_be_bytes([a[0], a[1]]));
                let b = rest.get(a..a + 2)?;
                a + 2 + usize::from(u16::from_be_bytes([b[0], b[1]]))
            }
            _ => return None,
        };
        ids.push(id);
        props = rest.get(len..)?;
    }
    Some(ids)
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    #[test]
    fn filters_are_checked_as_the_specification_says() {
        for ok in [
            "a",
            "a/b",
            "+",
            "#",
            "a/+/c",
            "a/#",
            "+/+",
            "/",
            "a//b",
            "$share/g/a/#",
        ] {
            assert_eq!(check_filter(ok), Verdict::Allow, "{ok}");
        }
        for bad in [
            "",
            "a/#/b",
            "a#",
            "a/b#",
            "a+",
            "a/+b/c",
            "##",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/a/#/b",
        ] {
            assert_eq!(check_filter(bad), Verdict::Invalid, "{bad:?}");
        }
        for unsupported in ["$SYS/#", "$foo/bar"] {
            assert_eq!(
                check_filter(unsupported),
                Verdict::Unsupported,
                "{unsupported}"
            );
        }
    }
}

#[cfg(test)]
mod start_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn router() -> impl Fn(SocketAddr) -> Server<V5> {
        let config = RouterConfig {
            max_connections: 10,
            max_outgoing_packet_count: 10,
            max_segment_size: 1024 * 1024,
            max_segment_count: 1,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, config).spawn();
        let settings = BrokerSettings {
            max_packet_size: 1024,
            max_inflight: 10,
        };
        move |addr| {
            Server::new(
                server_settings("test", addr, &settings),
                router_tx.clone(),
                V5,
            )
        }
    }

    #[tokio::test]
    async fn a_port_taken_before_the_server_binds_is_not_mistaken_for_the_server() {
        // Something else listens on the first candidate port, as when another process takes
        // the port between its choice and the server's bind.
        let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = foreign.local_addr().unwrap();
        let mut candidates = vec![Ok(taken)]
            .into_iter()
            .chain(std::iter::repeat_with(reserve_port));
        let addr = start_server_from("5", || candidates.next().unwrap(), router())
            .await
            .unwrap();
        assert_ne!(addr, taken);

        // What listens there is the MQTT 5 server: a CONNECT gets a successful CONNACK.
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connect = [
            0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00,
            0x03, b'a', b'b', b'c',
        ];
        stream.write_all(&connect).await.unwrap();
        let mut connack = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut connack))
            .await
            .expect("CONNACK within 5 s")
            .unwrap();
        assert_eq!(connack[0], 0x20, "{connack:?}");
        assert_eq!(connack[3], 0x00, "reason code {connack:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn links_made_while_clients_disconnect_all_succeed() {
        // Clients that send DISCONNECT and close make rumqttd report their end twice; the second
        // report can hit a link that took the slot in between. Without remaking such a link,
        // 25 to 27 of the 3,000 failed here.
        let broker = std::sync::Arc::new(
            Broker::start(&BrokerSettings {
                max_packet_size: 4096,
                max_inflight: 10,
            })
            .await
            .unwrap(),
        );
        let addr = broker.server_for(Version::V5);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = tokio::spawn({
            let done = done.clone();
            async move {
                let mut n = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) && n < 100_000 {
                    n += 1;
                    let id = format!("churn-{n}");
                    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                        continue;
                    };
                    let packet = crate::broker_watch::connect(Version::V5, &id);
                    let mut connack = [0u8; 5];
                    if stream.write_all(&packet).await.is_err()
                        || stream.read_exact(&mut connack).await.is_err()
                    {
                        continue;
                    }
                    // DISCONNECT and close at once, as many client libraries do.
                    let _ = stream.write_all(&[0xe0, 0x00]).await;
                    let _ = stream.shutdown().await;
                    let mut rest = [0u8; 16];
                    while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                }
                n
            }
        });
        let mut failed = Vec::new();
        for i in 0..3_000 {
            let b = broker.clone();
            let made = tokio::task::spawn_blocking(move || b.local_publisher(&format!("link-{i}")))
                .await
                .unwrap();
            if let Err(error) = made {
                failed.push(error.to_string());
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let churned = clients.await.unwrap();
        assert!(
            churned > 100,
            "only {churned} client connections ran alongside"
        );
        assert!(
            failed.is_empty(),
            "{} links failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
    }

    #[tokio::test]
    async fn no_free_port_is_a_clear_error() {
        let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = foreign.local_addr().unwrap();
        let error = start_server_from("5", || Ok(taken), router())
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(
            matches!(
                error,
                BrokerError::Bind {
                    attempts: BIND_ATTEMPTS,
                    ..
                }
            ),
            "{text}"
        );
        assert!(text.contains("no free loopback port in 20 tries"), "{text}");
    }
}

#[cfg(test)]
mod connack_tests {
    use super::*;

    #[test]
    fn properties_are_added_once() {
        // Session present 1, success, one property: Topic Alias Maximum 10.
        let connack = [0x20, 0x06, 0x01, 0x00, 0x03, 0x22, 0x00, 0x0a];
        let add = ConnackAdditions {
            assigned_client_id: Some("ab".into()),
            receive_maximum: Some(5),
            maximum_packet_size: Some(2048),
        };
        let out = connack_with(&connack, &add).expect("rewrite");
        assert_eq!(
            out.as_ref(),
            &[
                0x20, 0x13, 0x01, 0x00, 0x10, 0x22, 0x00, 0x0a, 0x12, 0x00, 0x02, b'a', b'b', 0x21,
                0x00, 0x05, 0x27, 0x00, 0x00, 0x08, 0x00
            ]
        );
        // What the broker set already stays as it is.
        let connack = [0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x09];
        let out = connack_with(
            &connack,
            &ConnackAdditions {
                receive_maximum: Some(5),
                ..Default::default()
            },
        )
        .expect("rewrite");
        assert_eq!(out.as_ref(), &connack);
    }

    #[test]
    fn a_broken_connack_is_an_error() {
        assert!(connack_with(&[0x20, 0x03, 0x00, 0x00, 0x05], &Default::default()).is_err());
        assert!(connack_with(&[0x30, 0x02, 0x00, 0x00], &Default::default()).is_err());
        assert!(connack_with(&[0x20, 0x04, 0x00, 0x00, 0x01, 0x7f], &Default::default()).is_err());
    }
}

/// An MQTT 5 DISCONNECT with a reason code (0x93 receive maximum exceeded, 0x95 packet too
/// large, …); nothing for 3.1.1, where only the server closing the socket says it.
pub fn disconnect(version: Version, reason: u8) -> Option<Bytes> {
    match version {
        Version::V4 => None,
        Version::V5 => Some(Bytes::from(vec![0xe0, 0x02, reason, 0x00])),
    }
}

#[cfg(test)]
mod keep_alive_tests {
    use super::*;

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    /// A CONNECT with a will and a login; `props` is the MQTT 5 property block (empty for 3.1.1).
    fn connect(level: u8, keep_alive: u16, props: &[u8]) -> Vec<u8> {
        let mut body = string(b"MQTT");
        body.push(level);
        body.push(0x80 | 0x40 | 0x08 | 0x04 | 0x02); // login, will QoS 1, clean
        body.extend_from_slice(&keep_alive.to_be_bytes());
        body.extend_from_slice(props);
        body.extend(string(b"dev-1"));
        body.extend_from_slice(props); // will properties
        body.extend(string(b"dev/1/state"));
        body.extend(string(b"offline"));
        body.extend(string(b"user"));
        body.extend(string(b"secret"));
        let mut out = vec![0x10, body.len() as u8];
        out.extend(body);
        out
    }

    #[test]
    fn only_the_keep_alive_changes() {
        for (version, level, props) in [(Version::V4, 4, &[][..]), (Version::V5, 5, &[0][..])] {
            let original = connect(level, 0, props);
            let rewritten = rewrite_connect(
                version,
                &original,
                1 << 20,
                &keep_alive(INTERNAL_KEEP_ALIVE),
            )
            .expect("rewrite");
            assert_eq!(
                rewritten.as_ref(),
                connect(level, INTERNAL_KEEP_ALIVE, props).as_slice(),
                "{version:?}"
            );
            let info = decode_connect(&rewritten, 1 << 20).expect("decode");
            assert_eq!(info.keep_alive, INTERNAL_KEEP_ALIVE);
            assert_eq!(info.client_id, "dev-1");
            assert_eq!(info.will_topic.as_deref(), Some("dev/1/state"));
        }
    }

    #[test]
    fn a_packet_that_is_no_connect_is_refused() {
        assert!(rewrite_connect(Version::V4, &[0xc0, 0x00], 1 << 20, &keep_alive(10)).is_err());
        assert!(
            rewrite_connect(Version::V4, &[0x10, 0x02, 0x00], 1 << 20, &keep_alive(10)).is_err()
        );
    }

    fn keep_alive(keep_alive: u16) -> ConnectChanges {
        ConnectChanges {
            keep_alive,
            ..Default::default()
        }
    }
}
