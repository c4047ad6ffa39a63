//! MQTT 3.1.1 conformance of the relay as a whole (gate + broker core), one test per behaviour.
//!
//! Each test starts the real `relaybox` binary and talks to it over real TCP sockets on
//! 127.0.0.1: rumqttc (3.1.1) where it can say what the test needs, the Mosquitto command-line
//! clients for a second client library, and raw 3.1.1 packets where exact bytes or timing
//! matter (keep-alive 0, withheld acknowledgements, DUP flags, return codes). Every wait is
//! bounded. Section numbers refer to the MQTT 3.1.1 OASIS standard.

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::{packet, Got, RawConn};
use common::{publish_all_v4, toml_str, wait_exit, Relay, RelayConfig};
use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;

/// How long one expected reply or message may take.
const REPLY: Duration = Duration::from_secs(5);
/// How long to wait to be confident that something does not arrive.
const QUIET: Duration = Duration::from_millis(700);

/// Runs blocking socket code (the raw client) without starving the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------------------------
// Raw 3.1.1 packets
// ---------------------------------------------------------------------------------------------

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = u16::try_from(s.len())
        .expect("short string")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(s);
    out
}

/// A will for a raw CONNECT: topic, payload, QoS.
struct Will<'a>(&'a str, &'a [u8], u8);

/// CONNECT (protocol level 4).
fn connect(client_id: &str, clean: bool, keep_alive: u16, will: Option<Will<'_>>) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(4);
    let mut flags = if clean { 0x02 } else { 0x00 };
    if let Some(Will(_, _, qos)) = &will {
        flags |= 0x04 | (qos << 3);
    }
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend(string(client_id.as_bytes()));
    if let Some(Will(topic, payload, _)) = will {
        body.extend(string(topic.as_bytes()));
        body.extend(string(payload));
    }
    packet(0x10, &body)
}

fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (f, qos) in filters {
        body.extend(string(f.as_bytes()));
        body.push(*qos);
    }
    packet(0x82, &body)
}

fn ack(first: u8, pkid: u16) -> Vec<u8> {
    packet(first, &pkid.to_be_bytes())
}

const PINGREQ: [u8; 2] = [0xc0, 0x00];
const DISCONNECT: [u8; 2] = [0xe0, 0x00];

/// A PUBLISH as received by a raw client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawPublish {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    dup: bool,
    retain: bool,
    pkid: u16,
}

fn parse_publish(first: u8, body: &[u8]) -> RawPublish {
    assert_eq!(first >> 4, 3, "not a PUBLISH: {first:#x}");
    let qos = (first >> 1) & 0b11;
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + len].to_vec()).expect("UTF-8 topic");
    let mut at = 2 + len;
    let pkid = if qos > 0 {
        at += 2;
        u16::from_be_bytes([body[at - 2], body[at - 1]])
    } else {
        0
    };
    RawPublish {
        topic,
        payload: body[at..].to_vec(),
        qos,
        dup: first & 0x08 != 0,
        retain: first & 0x01 != 0,
        pkid,
    }
}

/// Sends CONNECT and returns the CONNACK's (session present, return code).
fn raw_connect(conn: &mut RawConn, connect: &[u8]) -> (bool, u8) {
    conn.send(connect).expect("send CONNECT");
    match conn.read(REPLY) {
        Got::Packet(0x20, body) if body.len() == 2 => (body[0] & 1 == 1, body[1]),
        other => panic!("expected a CONNACK within {REPLY:?}, got {other:?}"),
    }
}

/// Subscribes and returns the SUBACK's return codes.
fn raw_subscribe(conn: &mut RawConn, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    conn.send(&subscribe(pkid, filters))
        .expect("send SUBSCRIBE");
    match conn.read(REPLY) {
        Got::Packet(0x90, body) => {
            assert_eq!(
                u16::from_be_bytes([body[0], body[1]]),
                pkid,
                "SUBACK for another packet id"
            );
            body[2..].to_vec()
        }
        other => panic!("expected a SUBACK within {REPLY:?}, got {other:?}"),
    }
}

/// Reads the next packet, which must be a PUBLISH.
fn raw_next_publish(conn: &mut RawConn) -> RawPublish {
    match conn.read(REPLY) {
        Got::Packet(first, body) if first >> 4 == 3 => parse_publish(first, &body),
        other => panic!("expected a PUBLISH within {REPLY:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttc 3.1.1 client
// ---------------------------------------------------------------------------------------------

/// A rumqttc client whose event loop runs in a task and hands every event over; it does not
/// reconnect (the task ends at the first connection error).
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(port: u16, id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts
}

impl Client {
    /// Connects and returns the client and its CONNACK.
    async fn connect(opts: MqttOptions) -> (Client, ConnAck) {
        let id = opts.client_id();
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        let connack = tokio::time::timeout(REPLY, async {
            loop {
                match events.recv().await {
                    Some(Event::Incoming(Packet::ConnAck(ack))) => return ack,
                    Some(_) => {}
                    None => panic!("{id}: connection failed before CONNACK"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{id}: no CONNACK within {REPLY:?}"));
        let client = Client {
            client,
            events,
            task,
        };
        (client, connack)
    }

    async fn start(port: u16, id: &str) -> Client {
        let (client, ack) = Client::connect(options(port, id)).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{id}: CONNACK");
        client
    }

    /// The next event that `pick` selects, passing over the others; `None` after `timeout`.
    async fn next<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(Event) -> Option<T>,
    ) -> Option<T> {
        tokio::time::timeout(timeout, async {
            loop {
                match self.events.recv().await {
                    Some(event) => {
                        if let Some(t) = pick(event) {
                            return Some(t);
                        }
                    }
                    None => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn next_publish(&mut self, timeout: Duration) -> Option<Publish> {
        self.next(timeout, |e| match e {
            Event::Incoming(Packet::Publish(p)) => Some(p),
            _ => None,
        })
        .await
    }

    /// Every PUBLISH that arrives within `window`.
    async fn publishes_within(&mut self, window: Duration) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + window;
        let mut out = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                out.push(p);
            }
        }
        out
    }

    /// Subscribes to `filter` and returns the SUBACK's return codes.
    async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        self.next(REPLY, |e| match e {
            Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes),
            _ => None,
        })
        .await
        .unwrap_or_else(|| panic!("no SUBACK for {filter} within {REPLY:?}"))
    }

    /// Publishes and waits until the exchange is done: PUBACK (QoS 1), PUBCOMP (QoS 2), or the
    /// packet written (QoS 0).
    async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("queue PUBLISH");
        let done = self
            .next(REPLY, |e| match (qos, e) {
                (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_)))
                | (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_)))
                | (QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_))) => Some(()),
                _ => None,
            })
            .await;
        assert!(
            done.is_some(),
            "publish to {topic} at {qos:?} not done within {REPLY:?}"
        );
    }

    /// Sends DISCONNECT and waits (bounded) for it to go out.
    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        let _ = self
            .next(REPLY, |e| {
                matches!(e, Event::Outgoing(Outgoing::Disconnect)).then_some(())
            })
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Publish / subscribe at QoS 0, 1, 2
// ---------------------------------------------------------------------------------------------

/// Reads lines of a child's stdout into a channel (on a thread of its own; it ends with the
/// child's stdout).
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A child process killed when dropped (a failed test leaves nothing running).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A second client library: mosquitto_sub receives what mosquitto_pub publishes at each QoS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_and_subscribe_at_qos_0_1_2() {
    let relay = Relay::start(RelayConfig::new("conf-mosq")).await;
    let port = relay.port().to_string();
    // Line-buffered: piped, mosquitto_sub's stdout would be block-buffered.
    let mut sub = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv311",
            "-i",
            "mosq-sub",
        ])
        .args(["-t", "mosq/#", "-q", "2", "-C", "3", "-W", "20", "-d"])
        .args(["-F", "MSG %t %p"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto_sub");
    let mut lines = lines_of(sub.stdout.take().expect("stdout"));
    let mut sub = Killed(sub);
    // With -d, mosquitto_sub reports the SUBACK: only then is the subscription in place.
    let subscribed = tokio::time::timeout(REPLY, async {
        while let Some(line) = lines.recv().await {
            if line.contains("received SUBACK") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(subscribed, Ok(true), "mosquitto_sub got no SUBACK");

    for qos in ["0", "1", "2"] {
        let mut publisher = Killed(
            Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv311"])
                .args([
                    "-i",
                    &format!("mosq-pub-{qos}"),
                    "-t",
                    &format!("mosq/q{qos}"),
                ])
                .args(["-q", qos, "-m", &format!("payload-{qos}")])
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn mosquitto_pub"),
        );
        let status = wait_exit(&mut publisher.0, REPLY)
            .await
            .expect("mosquitto_pub did not finish in time");
        assert!(status.success(), "mosquitto_pub -q {qos}: {status}");
    }

    let mut got = Vec::new();
    let _ = tokio::time::timeout(REPLY, async {
        while got.len() < 3 {
            match lines.recv().await {
                Some(line) if line.starts_with("MSG ") => got.push(line),
                Some(_) => {}
                None => return,
            }
        }
    })
    .await;
    assert_eq!(
        got,
        [
            "MSG mosq/q0 payload-0",
            "MSG mosq/q1 payload-1",
            "MSG mosq/q2 payload-2"
        ],
        "messages mosquitto_sub printed"
    );
    let status = wait_exit(&mut sub.0, REPLY)
        .await
        .expect("mosquitto_sub did not exit after 3 messages");
    assert!(status.success(), "mosquitto_sub: {status}");
}

/// [MQTT-3.8.4-6]: a message is delivered at the minimum of the QoS it was published with and
/// the maximum QoS granted to the subscription, for every pair of the two; one delivery each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_qos_is_the_minimum_of_published_and_granted_qos() {
    const LEVELS: [QoS; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    let relay = Relay::start(RelayConfig::new("conf-qosmin")).await;
    let port = relay.port();
    let mut sub = Client::start(port, "qosmin-sub").await;
    for granted in LEVELS {
        assert_eq!(
            sub.subscribe(&format!("qosmin/s{}", granted as u8), granted)
                .await,
            [SubscribeReasonCode::Success(granted)]
        );
    }
    let mut publisher = Client::start(port, "qosmin-pub").await;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for published in LEVELS {
        for granted in LEVELS {
            let payload = format!("p{}s{}", published as u8, granted as u8);
            publisher
                .publish(
                    &format!("qosmin/s{}", granted as u8),
                    published,
                    false,
                    payload.as_bytes(),
                )
                .await;
            let m = sub.next_publish(REPLY).await;
            got.push(m.map(|m| (String::from_utf8_lossy(&m.payload).into_owned(), m.qos)));
            let min = if published < granted {
                published
            } else {
                granted
            };
            want.push(Some((payload, min)));
        }
    }
    assert_eq!(
        got, want,
        "(payload, delivered QoS) for each (published, granted): the minimum [MQTT-3.8.4-6]"
    );
    let more = sub.publishes_within(QUIET).await;
    assert!(more.is_empty(), "one delivery per publish: {more:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Retained messages
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.3.1-5..-11]: a retained message is kept and replaced per topic, given to new
/// subscribers with RETAIN set, and a retained PUBLISH with an empty payload removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_set_replaced_and_cleared() {
    let relay = Relay::start(RelayConfig::new("conf-retain")).await;
    let port = relay.port();
    let mut publisher = Client::start(port, "retain-pub").await;

    // A new subscriber gets what is retained at the moment it subscribes.
    async fn retained_for_new_subscriber(port: u16, id: &str) -> Vec<Publish> {
        let mut c = Client::start(port, id).await;
        let codes = c.subscribe("retain/t", QoS::AtLeastOnce).await;
        assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        c.publishes_within(Duration::from_millis(1000)).await
    }

    publisher
        .publish("retain/t", QoS::AtLeastOnce, true, b"v1")
        .await;
    let got = retained_for_new_subscriber(port, "retain-s1").await;
    assert_eq!(got.len(), 1, "after set: {got:?}");
    assert_eq!(got[0].payload.as_ref(), b"v1");
    assert!(
        got[0].retain,
        "a retained message to a new subscriber has RETAIN set"
    );

    publisher
        .publish("retain/t", QoS::AtLeastOnce, true, b"v2")
        .await;
    let got = retained_for_new_subscriber(port, "retain-s2").await;
    assert_eq!(got.len(), 1, "after replace, only the newest: {got:?}");
    assert_eq!(got[0].payload.as_ref(), b"v2");
    assert!(got[0].retain);

    publisher
        .publish("retain/t", QoS::AtLeastOnce, true, b"")
        .await;
    let got = retained_for_new_subscriber(port, "retain-s3").await;
    assert!(got.is_empty(), "after clear, nothing retained: {got:?}");
}

/// [MQTT-3.3.1-12]: a PUBLISH with RETAIN 0 neither stores, removes nor replaces the retained
/// message — an empty one included (only an empty *retained* publish clears it,
/// [MQTT-3.3.1-10]). Current subscribers get every publish, with RETAIN 0 [MQTT-3.3.1-9].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_non_retained_publish_leaves_the_retained_message_alone() {
    let relay = Relay::start(RelayConfig::new("conf-keepretained")).await;
    let port = relay.port();
    let summary = |ps: &[Publish]| -> Vec<(Vec<u8>, bool)> {
        ps.iter().map(|p| (p.payload.to_vec(), p.retain)).collect()
    };
    let mut live = Client::start(port, "keepret-live").await;
    assert_eq!(
        live.subscribe("keepret/t", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut publisher = Client::start(port, "keepret-pub").await;
    publisher
        .publish("keepret/t", QoS::AtLeastOnce, true, b"keep")
        .await;
    publisher
        .publish("keepret/t", QoS::AtLeastOnce, false, b"")
        .await;
    publisher
        .publish("keepret/t", QoS::AtMostOnce, false, b"")
        .await;
    let mut got = Vec::new();
    while got.len() < 3 {
        match live.next_publish(REPLY).await {
            Some(p) => got.push(p),
            None => break,
        }
    }
    assert_eq!(
        summary(&got),
        [
            (b"keep".to_vec(), false),
            (Vec::new(), false),
            (Vec::new(), false)
        ],
        "(payload, RETAIN) of the live deliveries"
    );

    let mut new = Client::start(port, "keepret-new").await;
    assert_eq!(
        new.subscribe("keepret/t", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let got = new.publishes_within(Duration::from_millis(1000)).await;
    assert_eq!(
        summary(&got),
        [(b"keep".to_vec(), true)],
        "a new subscriber after the empty non-retained publishes still gets the retained \
         message [MQTT-3.3.1-12]"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Zero-length client id
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.3-6], [MQTT-3.1.3-8]: an empty client id is accepted with clean session 1 and
/// refused with CONNACK 0x02 with clean session 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_client_id_needs_clean_session() {
    let relay = Relay::start(RelayConfig::new("conf-emptyid")).await;
    let port = relay.port();
    blocking(|| {
        let mut conn = RawConn::open(port);
        let (present, code) = raw_connect(&mut conn, &connect("", true, 30, None));
        assert_eq!((present, code), (false, 0), "empty id, clean session 1");
        // The session works: a subscription and a message to itself.
        assert_eq!(raw_subscribe(&mut conn, 1, &[("emptyid/t", 0)]), [0]);
        conn.send(&packet(
            0x30,
            &[string(b"emptyid/t"), b"hi".to_vec()].concat(),
        ))
        .expect("send PUBLISH");
        let p = raw_next_publish(&mut conn);
        assert_eq!(
            (p.topic.as_str(), p.payload.as_slice()),
            ("emptyid/t", &b"hi"[..])
        );

        let mut conn = RawConn::open(port);
        let (_, code) = raw_connect(&mut conn, &connect("", false, 30, None));
        assert_eq!(code, 0x02, "empty id, clean session 0: identifier rejected");
        assert!(
            conn.closed_within(REPLY),
            "the server must close the connection after refusing it [MQTT-3.2.2-5]"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Offline queueing for a persistent session
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-4], [MQTT-3.1.2-5]: with clean session 0 the subscription outlives the
/// connection and QoS 1 messages published meanwhile are delivered on reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_gets_qos1_messages_published_while_offline() {
    let relay = Relay::start(RelayConfig::new("conf-offline")).await;
    let port = relay.port();
    let mut opts = options(port, "offline-sub");
    opts.set_clean_session(false);
    let (mut c, ack) = Client::connect(opts.clone()).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        c.subscribe("offline/t", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let payloads: Vec<Vec<u8>> = (0..3).map(|i| format!("m{i}").into_bytes()).collect();
    publish_all_v4(port, "offline-pub", "offline/t", payloads.clone(), REPLY).await;

    let (mut c, ack) = Client::connect(opts).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(
        ack.session_present,
        "CONNACK session present for a kept session [MQTT-3.2.2-2]"
    );
    let mut got = Vec::new();
    while got.len() < payloads.len() {
        match c.next_publish(REPLY).await {
            Some(p) => {
                assert_eq!(p.topic, "offline/t");
                assert_eq!(p.qos, QoS::AtLeastOnce);
                got.push(p.payload.to_vec());
            }
            None => break,
        }
    }
    assert_eq!(got, payloads, "messages queued while offline, in order");
}

// ---------------------------------------------------------------------------------------------
// 5. Overlapping subscriptions
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.3.5-1]: a message matching several of a client's subscriptions is delivered
/// respecting the maximum QoS of them (one copy, or one per subscription), and a message
/// matching one of them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_at_the_maximum_qos() {
    let relay = Relay::start(RelayConfig::new("conf-overlap")).await;
    let port = relay.port();
    let mut c = Client::start(port, "overlap-sub").await;
    assert_eq!(
        c.subscribe("ov/#", QoS::AtMostOnce).await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        c.subscribe("ov/a/+", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut publisher = Client::start(port, "overlap-pub").await;
    publisher
        .publish("ov/a/b", QoS::AtLeastOnce, false, b"both")
        .await;
    publisher
        .publish("ov/x", QoS::AtLeastOnce, false, b"one")
        .await;

    let got = c.publishes_within(Duration::from_millis(1500)).await;
    let both: Vec<&Publish> = got.iter().filter(|p| p.topic == "ov/a/b").collect();
    let one: Vec<&Publish> = got.iter().filter(|p| p.topic == "ov/x").collect();
    assert!(
        (1..=2).contains(&both.len()),
        "ov/a/b matches two subscriptions: one or two copies, got {got:?}"
    );
    assert!(both.iter().all(|p| p.payload.as_ref() == b"both"));
    assert!(
        both.iter().any(|p| p.qos == QoS::AtLeastOnce),
        "a copy at the maximum QoS of the matching subscriptions (1): {both:?}"
    );
    assert_eq!(one.len(), 1, "ov/x matches one subscription: {got:?}");
    assert_eq!(one[0].qos, QoS::AtMostOnce);
}

// ---------------------------------------------------------------------------------------------
// 6., 7. Keep-alive
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-10]: keep-alive 0 turns the mechanism off: the connection is accepted and stays
/// up through a long silence — past the internal broker's own keep-alive (15 s), so the gate's
/// keep-alive of the internal connection is exercised, and its pings' answers must not reach
/// the client — and still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted_and_never_expires() {
    let relay = Relay::start(RelayConfig::new("conf-ka0")).await;
    let port = relay.port();
    let mut conn = RawConn::open(port);
    blocking(|| {
        let (_, code) = raw_connect(&mut conn, &connect("ka0", true, 0, None));
        assert_eq!(code, 0, "CONNACK for keep-alive 0");
        assert_eq!(raw_subscribe(&mut conn, 1, &[("ka0/t", 0)]), [0]);
        // 17 s of silence from the client: nothing may arrive, and the connection stays.
        let got = conn.read(Duration::from_secs(17));
        assert_eq!(got, Got::Timeout, "during the silence");
    });
    let mut publisher = Client::start(port, "ka0-pub").await;
    publisher
        .publish("ka0/t", QoS::AtMostOnce, false, b"still here")
        .await;
    blocking(|| {
        let p = raw_next_publish(&mut conn);
        assert_eq!(p.payload, b"still here");
        // The client's own PINGREQ gets exactly one PINGRESP.
        conn.send(&PINGREQ).expect("send PINGREQ");
        assert_eq!(conn.read(REPLY), Got::Packet(0xd0, Vec::new()), "PINGRESP");
        assert_eq!(conn.read(QUIET), Got::Timeout, "nothing after the PINGRESP");
    });
}

/// [MQTT-3.1.2-24]: a client silent for 1.5 × its keep-alive is disconnected (and not
/// before its keep-alive passed); that is an abnormal end, so its will is published
/// [MQTT-3.1.2-8]. A client that sends PINGREQ within its keep-alive stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_disconnected_after_one_and_a_half_keep_alives() {
    let relay = Relay::start(RelayConfig::new("conf-ka2")).await;
    let port = relay.port();
    let mut watcher = Client::start(port, "ka2-watcher").await;
    assert_eq!(
        watcher.subscribe("ka2/will", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    const KA: Duration = Duration::from_secs(2);

    let mut silent = RawConn::open(port);
    let closed_after = blocking(|| {
        let will = Will("ka2/will", b"silent-gone", 1);
        let (_, code) = raw_connect(&mut silent, &connect("ka2-silent", true, 2, Some(will)));
        assert_eq!(code, 0);
        let start = Instant::now();
        // Not closed within the keep-alive itself.
        assert_eq!(silent.read(KA - Duration::from_millis(100)), Got::Timeout);
        // Closed by 1.5 × keep-alive (plus scheduling slack).
        let closed = silent.closed_within(KA / 2 + Duration::from_millis(1200));
        let after = start.elapsed();
        assert!(
            closed,
            "still connected {after:?} after CONNECT with keep-alive {KA:?}"
        );
        after
    });
    assert!(
        closed_after >= KA,
        "closed after {closed_after:?}, before the keep-alive {KA:?}"
    );
    let will = watcher.next_publish(REPLY).await;
    assert_eq!(
        will.map(|p| p.payload.to_vec()),
        Some(b"silent-gone".to_vec()),
        "the will of the timed-out client"
    );
    // A client that pings every second stays connected for twice 1.5 × keep-alive.
    blocking(|| {
        let mut pinger = RawConn::open(port);
        let (_, code) = raw_connect(&mut pinger, &connect("ka2-pinger", true, 2, None));
        assert_eq!(code, 0);
        for _ in 0..6 {
            std::thread::sleep(Duration::from_secs(1));
            pinger.send(&PINGREQ).expect("PINGREQ on a live connection");
            assert_eq!(
                pinger.read(REPLY),
                Got::Packet(0xd0, Vec::new()),
                "PINGRESP"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 8. Redelivery
// ---------------------------------------------------------------------------------------------

/// [MQTT-4.4.0-1], [MQTT-3.3.1-1]: unacknowledged QoS 1 and QoS 2 messages to a client with a
/// persistent session are sent again, with DUP set and the same packet ids, when it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_qos1_and_qos2_are_redelivered_with_dup_on_reconnect() {
    let relay = Relay::start(RelayConfig::new("conf-redeliver")).await;
    let port = relay.port();
    let first = blocking(|| {
        let mut conn = RawConn::open(port);
        assert_eq!(
            raw_connect(&mut conn, &connect("rd-sub", false, 30, None)).1,
            0
        );
        assert_eq!(
            raw_subscribe(&mut conn, 1, &[("rd/q1", 1), ("rd/q2", 2)]),
            [1, 2]
        );
        conn
    });
    let mut first = first;
    let mut publisher = Client::start(port, "rd-pub").await;
    publisher
        .publish("rd/q1", QoS::AtLeastOnce, false, b"one")
        .await;
    publisher
        .publish("rd/q2", QoS::ExactlyOnce, false, b"two")
        .await;
    let sent = blocking(|| {
        let a = raw_next_publish(&mut first);
        let b = raw_next_publish(&mut first);
        let mut sent = vec![a, b];
        sent.sort_by(|x, y| x.topic.cmp(&y.topic));
        assert_eq!(
            sent.iter()
                .map(|p| (p.topic.as_str(), p.qos, p.dup))
                .collect::<Vec<_>>(),
            [("rd/q1", 1, false), ("rd/q2", 2, false)],
            "first delivery"
        );
        sent
    });
    // Gone without acknowledging either.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;

    blocking(|| {
        let mut conn = RawConn::open(port);
        let (present, code) = raw_connect(&mut conn, &connect("rd-sub", false, 30, None));
        assert_eq!((present, code), (true, 0), "session present on reconnect");
        let a = raw_next_publish(&mut conn);
        let b = raw_next_publish(&mut conn);
        let mut again = vec![a, b];
        again.sort_by(|x, y| x.topic.cmp(&y.topic));
        for (old, new) in sent.iter().zip(&again) {
            assert_eq!(
                (
                    new.topic.as_str(),
                    new.payload.as_slice(),
                    new.qos,
                    new.pkid
                ),
                (
                    old.topic.as_str(),
                    old.payload.as_slice(),
                    old.qos,
                    old.pkid
                ),
                "sent again with the same packet id"
            );
            assert!(new.dup, "DUP set on redelivery: {new:?}");
        }
        // Acknowledged now: nothing more comes.
        conn.send(&ack(0x40, again[0].pkid)).expect("PUBACK");
        conn.send(&ack(0x50, again[1].pkid)).expect("PUBREC");
        assert_eq!(
            conn.read(REPLY),
            Got::Packet(0x62, again[1].pkid.to_be_bytes().to_vec()),
            "PUBREL"
        );
        conn.send(&ack(0x70, again[1].pkid)).expect("PUBCOMP");
        assert_eq!(conn.read(QUIET), Got::Timeout, "after the acknowledgements");
    });
}

// ---------------------------------------------------------------------------------------------
// 9. Subscribe failure
// ---------------------------------------------------------------------------------------------

/// Subscribes to `[bad, "open/t"]` and expects SUBACK `[0x80, 0x01]`, then that the granted
/// filter works.
fn expect_one_filter_refused(port: u16, bad: &str) {
    let mut conn = RawConn::open(port);
    assert_eq!(
        raw_connect(&mut conn, &connect("sf-sub", true, 30, None)).1,
        0
    );
    let codes = raw_subscribe(&mut conn, 7, &[(bad, 1), ("open/t", 1)]);
    assert_eq!(codes, [0x80, 0x01], "SUBACK for [{bad}, open/t]");
    conn.send(&packet(0x30, &[string(b"open/t"), b"ok".to_vec()].concat()))
        .expect("send PUBLISH");
    let p = raw_next_publish(&mut conn);
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        ("open/t", &b"ok"[..])
    );
}

/// [MQTT-3.9.3-1..2], [MQTT-4.7.1-2]: SUBACK return code 0x80 for an illegal filter ('#' not
/// last), while the other filter of the same SUBSCRIBE is granted and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_failure_for_an_illegal_filter() {
    let relay = Relay::start(RelayConfig::new("conf-badfilter")).await;
    let port = relay.port();
    blocking(|| expect_one_filter_refused(port, "a/#/b"));
}

/// [MQTT-3.9.3]: SUBACK return code 0x80 for a filter the ACL denies, while the other filter of
/// the same SUBSCRIBE is granted and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_failure_for_a_filter_the_acl_denies() {
    let acl = format!(
        "\n[[acl]]\nuser = \"*\"\npublish = [{}]\nsubscribe = [{}]\n",
        toml_str("#"),
        toml_str("open/#")
    );
    let relay = Relay::start_with_extra(RelayConfig::new("conf-aclfilter"), &acl).await;
    let port = relay.port();
    blocking(|| expect_one_filter_refused(port, "secret/x"));
}

// ---------------------------------------------------------------------------------------------
// 10. $-topics
// ---------------------------------------------------------------------------------------------

/// [MQTT-4.7.2-1]: filters starting with a wildcard ('#', '+/bar') do not match topics that
/// start with '$'. The '$' publishes go first; a later plain one shows the subscriber is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let relay = Relay::start(RelayConfig::new("conf-dollar")).await;
    let port = relay.port();
    let mut wild = Client::start(port, "dollar-wild").await;
    assert_eq!(
        wild.subscribe("#", QoS::AtMostOnce).await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        wild.subscribe("+/bar", QoS::AtMostOnce).await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    let mut publisher = Client::start(port, "dollar-pub").await;
    for topic in ["$foo/bar", "$SYS/bar"] {
        publisher
            .publish(topic, QoS::AtLeastOnce, false, b"dollar")
            .await;
    }
    publisher
        .publish("x/bar", QoS::AtLeastOnce, false, b"plain")
        .await;

    let first = wild.next_publish(REPLY).await;
    let mut got: Vec<Publish> = first.into_iter().collect();
    got.extend(wild.publishes_within(QUIET).await);
    assert!(
        got.iter().all(|p| !p.topic.starts_with('$')),
        "'#' or '+/bar' matched a $ topic: {got:?}"
    );
    assert!(
        got.iter().any(|p| p.topic == "x/bar"),
        "the wildcard subscriber got x/bar: {got:?}"
    );
}

/// §4.7.2: a topic starting with '$' is delivered to a filter that names its first level,
/// exactly (`$foo/bar`) or with wildcards after it (`$foo/+`, `$foo/#`). (Under rumqttd the
/// gate refused such filters with SUBACK 0x80; the specification grants them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_delivered_to_subscriptions_that_name_them() {
    let relay = Relay::start(RelayConfig::new("conf-dollar-named")).await;
    let port = relay.port();
    // (filter, the topics it must get)
    let cases: [(&str, &[&str]); 3] = [
        ("$foo/bar", &["$foo/bar"]),
        ("$foo/+", &["$foo/bar"]),
        ("$foo/#", &["$foo/bar", "$foo/baz/deep"]),
    ];
    let mut subs = Vec::new();
    for (i, (filter, _)) in cases.iter().enumerate() {
        let mut c = Client::start(port, &format!("dollar-named-{i}")).await;
        assert_eq!(
            c.subscribe(filter, QoS::AtLeastOnce).await,
            [SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "SUBACK for {filter}: granted [MQTT-3.8.4-1]"
        );
        subs.push(c);
    }
    let mut publisher = Client::start(port, "dollar-named-pub").await;
    for topic in ["$foo/bar", "$foo/baz/deep"] {
        publisher
            .publish(topic, QoS::AtLeastOnce, false, topic.as_bytes())
            .await;
    }
    for ((filter, want), c) in cases.iter().zip(&mut subs) {
        let mut got = Vec::new();
        while got.len() < want.len() {
            match c.next_publish(REPLY).await {
                Some(p) => got.push(p.topic),
                None => break,
            }
        }
        got.extend(c.publishes_within(QUIET).await.into_iter().map(|p| p.topic));
        assert_eq!(&got, want, "topics delivered to {filter}");
    }
}

// ---------------------------------------------------------------------------------------------
// 11. Unsubscribe
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.10.4-2]: after UNSUBACK, messages to the removed filter are no longer delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let relay = Relay::start(RelayConfig::new("conf-unsub")).await;
    let port = relay.port();
    let mut c = Client::start(port, "unsub-sub").await;
    c.subscribe("unsub/t", QoS::AtLeastOnce).await;
    c.subscribe("unsub/control", QoS::AtLeastOnce).await;
    let mut publisher = Client::start(port, "unsub-pub").await;
    publisher
        .publish("unsub/t", QoS::AtLeastOnce, false, b"before")
        .await;
    let p = c
        .next_publish(REPLY)
        .await
        .expect("message before UNSUBSCRIBE");
    assert_eq!(p.payload.as_ref(), b"before");

    c.client
        .unsubscribe("unsub/t")
        .await
        .expect("queue UNSUBSCRIBE");
    let unsuback = c
        .next(REPLY, |e| {
            matches!(e, Event::Incoming(Packet::UnsubAck(_))).then_some(())
        })
        .await;
    assert!(unsuback.is_some(), "no UNSUBACK within {REPLY:?}");

    publisher
        .publish("unsub/t", QoS::AtLeastOnce, false, b"after")
        .await;
    publisher
        .publish("unsub/control", QoS::AtLeastOnce, false, b"control")
        .await;
    let mut got = Vec::new();
    while let Some(p) = c.next_publish(REPLY).await {
        let control = p.topic == "unsub/control";
        got.push((p.topic, p.payload.to_vec()));
        if control {
            break;
        }
    }
    got.extend(
        c.publishes_within(QUIET)
            .await
            .into_iter()
            .map(|p| (p.topic, p.payload.to_vec())),
    );
    assert_eq!(
        got,
        [("unsub/control".to_owned(), b"control".to_vec())],
        "after UNSUBSCRIBE only the still-subscribed control topic"
    );
}

// ---------------------------------------------------------------------------------------------
// 12. Will
// ---------------------------------------------------------------------------------------------

/// [MQTT-3.1.2-8], [MQTT-3.1.2-10]: the will is published when the network connection breaks
/// without DISCONNECT, and discarded after a DISCONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_on_abnormal_disconnect_only() {
    let relay = Relay::start(RelayConfig::new("conf-will")).await;
    let port = relay.port();
    let mut watcher = Client::start(port, "will-watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;

    blocking(|| {
        // A clean DISCONNECT: no will.
        let mut clean = RawConn::open(port);
        let will = Will("will/clean", b"clean-gone", 1);
        assert_eq!(
            raw_connect(&mut clean, &connect("will-clean", true, 30, Some(will))).1,
            0
        );
        clean.send(&DISCONNECT).expect("send DISCONNECT");
        assert!(clean.closed_within(REPLY), "closed after DISCONNECT");
        // The socket dropped without DISCONNECT: the will.
        let mut dropped = RawConn::open(port);
        let will = Will("will/dropped", b"dropped-gone", 1);
        assert_eq!(
            raw_connect(&mut dropped, &connect("will-dropped", true, 30, Some(will))).1,
            0
        );
        drop(dropped);
    });
    let p = watcher.next_publish(REPLY).await;
    assert_eq!(
        p.map(|p| (p.topic, p.payload.to_vec())),
        Some(("will/dropped".to_owned(), b"dropped-gone".to_vec())),
        "the first will to arrive is the dropped client's (the clean one's must never come)"
    );
    let more = watcher.publishes_within(QUIET).await;
    assert!(
        more.is_empty(),
        "no will after a clean DISCONNECT: {more:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 13. $SYS statistics
// ---------------------------------------------------------------------------------------------

/// Topics among the broker's statistics that Mosquitto publishes too and tools read.
const SYS_TOPICS: [&str; 4] = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/messages/received",
];

/// Like Mosquitto, the broker publishes statistics under `$SYS/broker/` as retained messages,
/// again every round (10 s): a new `$SYS/broker/#` subscriber gets them at once with RETAIN
/// set [MQTT-3.3.1-8], then live ones; a `#` subscriber gets none of them, neither the
/// retained nor the live ones [MQTT-4.7.2-1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_broker_statistics_are_published_like_mosquitto() {
    const WITHIN: Duration = Duration::from_secs(15);
    let relay = Relay::start(RelayConfig::new("conf-sys")).await;
    let port = relay.port();
    let mut hash = Client::start(port, "sys-hash").await;
    assert_eq!(
        hash.subscribe("#", QoS::AtMostOnce).await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    let mut sys = Client::start(port, "sys-sub").await;
    assert_eq!(
        sys.subscribe("$SYS/broker/#", QoS::AtMostOnce).await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    let start = Instant::now();
    let mut retained: std::collections::BTreeMap<String, String> = Default::default();
    let mut live: std::collections::BTreeMap<String, String> = Default::default();
    // Every statistic retained, and a live round (uptime changes every round).
    while !(SYS_TOPICS.iter().all(|t| retained.contains_key(*t))
        && live.contains_key("$SYS/broker/uptime"))
    {
        let left = WITHIN.saturating_sub(start.elapsed());
        let Some(p) = sys.next_publish(left).await else {
            break;
        };
        assert!(
            p.topic.starts_with("$SYS/broker/"),
            "$SYS/broker/# got {}",
            p.topic
        );
        let value = String::from_utf8_lossy(&p.payload).into_owned();
        if p.retain {
            retained.insert(p.topic, value);
        } else {
            live.insert(p.topic, value);
        }
    }
    // The rest of a live round.
    for p in sys.publishes_within(QUIET).await {
        if !p.retain {
            live.insert(p.topic, String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    let missing: Vec<&str> = SYS_TOPICS
        .iter()
        .copied()
        .filter(|t| !retained.contains_key(*t))
        .collect();
    assert!(
        missing.is_empty(),
        "retained statistics missing within {WITHIN:?}: {missing:?}; retained: {retained:?}"
    );
    assert!(
        live.contains_key("$SYS/broker/uptime"),
        "no live round of statistics within {WITHIN:?}; live: {live:?}"
    );
    let uptime = &live["$SYS/broker/uptime"];
    assert!(
        uptime
            .strip_suffix(" seconds")
            .is_some_and(|n| n.parse::<u64>().is_ok()),
        "uptime as Mosquitto writes it (\"<n> seconds\"): {uptime:?}"
    );
    assert!(
        !retained["$SYS/broker/version"].is_empty(),
        "an empty version"
    );
    for t in [
        "$SYS/broker/clients/connected",
        "$SYS/broker/messages/received",
    ] {
        let v = live.get(t).unwrap_or(&retained[t]);
        assert!(v.parse::<u64>().is_ok(), "{t}: {v:?} is not a count");
    }
    let connected: u64 = live
        .get("$SYS/broker/clients/connected")
        .unwrap_or(&retained["$SYS/broker/clients/connected"])
        .parse()
        .unwrap_or(0);
    assert!(
        connected >= 2,
        "clients/connected {connected} with the two test clients connected"
    );

    // The '#' subscriber: served, but never a '$SYS' message.
    let mut publisher = Client::start(port, "sys-pub").await;
    publisher
        .publish("sys/marker", QoS::AtLeastOnce, false, b"marker")
        .await;
    let mut got = Vec::new();
    while let Some(p) = hash.next_publish(REPLY).await {
        let marker = p.topic == "sys/marker";
        got.push(p.topic);
        if marker {
            break;
        }
    }
    assert!(
        got.iter().all(|t| !t.starts_with('$')),
        "'#' got $SYS messages [MQTT-4.7.2-1]: {got:?}"
    );
    assert_eq!(
        got.last().map(String::as_str),
        Some("sys/marker"),
        "the '#' subscriber is served"
    );
}

/// Runs `mosquitto_sub` against the relay with `args` and returns its exit status and output
/// lines (killed after `timeout`).
async fn mosquitto_sub(
    port: u16,
    args: &[&str],
    timeout: Duration,
) -> (std::process::ExitStatus, Vec<String>) {
    let mut child = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto_sub");
    let mut lines = lines_of(child.stdout.take().expect("stdout"));
    let mut child = Killed(child);
    let status = wait_exit(&mut child.0, timeout)
        .await
        .unwrap_or_else(|| panic!("mosquitto_sub {args:?} did not exit within {timeout:?}"));
    let mut out = Vec::new();
    while let Some(line) = lines.recv().await {
        out.push(line);
    }
    (status, out)
}

/// The statistics read by a Mosquitto client: `mosquitto_sub -v -t '$SYS/broker/#' -C 4 -W 15`
/// prints four `$SYS/broker/…` messages and exits 0, and with the four topics of
/// [`SYS_TOPICS`] named it gets each of them, retained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_reads_the_sys_broker_statistics() {
    let relay = Relay::start(RelayConfig::new("conf-sys-mosq")).await;
    let port = relay.port();
    let (status, lines) = mosquitto_sub(
        port,
        &[
            "-i",
            "sys-mosq",
            "-v",
            "-t",
            "$SYS/broker/#",
            "-C",
            "4",
            "-W",
            "15",
        ],
        Duration::from_secs(20),
    )
    .await;
    assert!(
        status.success(),
        "mosquitto_sub -t '$SYS/broker/#' -C 4 -W 15: {status}, printed {lines:?}"
    );
    assert_eq!(lines.len(), 4, "four messages: {lines:?}");
    for line in &lines {
        let (topic, value) = line.split_once(' ').unwrap_or((line, ""));
        assert!(
            topic.starts_with("$SYS/broker/") && !value.is_empty(),
            "a '<$SYS/broker/… topic> <value>' line: {line:?}"
        );
    }

    let mut args = vec!["-i", "sys-mosq-4", "-F", "%r %t", "-C", "4", "-W", "15"];
    for t in SYS_TOPICS {
        args.extend(["-t", t]);
    }
    let (status, mut lines) = mosquitto_sub(port, &args, Duration::from_secs(20)).await;
    assert!(status.success(), "mosquitto_sub {args:?}: {status}");
    lines.sort();
    let mut want: Vec<String> = SYS_TOPICS.iter().map(|t| format!("1 {t}")).collect();
    want.sort();
    assert_eq!(lines, want, "(RETAIN, topic) of each statistic");
}
