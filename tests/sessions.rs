//! Sessions of the local broker, end to end against the real binary: persistent sessions
//! (MQTT 3.1.1 clean session 0, MQTT 5 Session Expiry > 0) survive a SIGKILL of the relay —
//! the session, its subscriptions and every QoS 1 delivery the publisher was acknowledged for
//! come back from the store log, and a delivery that was sent but not acknowledged goes out
//! again with DUP and its packet id — while a session with expiry 0 does not, and an expired
//! one is gone. And the per-session queues are bounded: a stuck subscriber loses deliveries of
//! its own (counted in `/status`) but slows neither the publisher, nor another subscriber, nor
//! the outbox to the hub; a slow MQTT 5 subscriber with Receive Maximum 1 still gets everything.
//!
//! Every test uses a real client (rumqttc) and a raw MQTT client of this file (precise flags:
//! Session Present, DUP, packet ids, Receive Maximum). Every wait is bounded.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    admin_status, publish_all_v4, publish_all_v5, read_stream, wait_stream_count, wait_until,
    NatsHub, Relay, RelayConfig, Subscriber, STREAM,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one expected packet may take.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched.
const QUIET: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// A raw MQTT client (3.1.1 and 5), enough for sessions: CONNECT with clean flag, Session Expiry
// and Receive Maximum; SUBSCRIBE; PUBLISH in (with DUP and packet id); PUBACK; DISCONNECT.
// ---------------------------------------------------------------------------------------------

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// (value, bytes used), or `None` when incomplete.
fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut n = 0usize;
    let mut mult = 1usize;
    for (i, &byte) in b.iter().enumerate().take(4) {
        n += (byte & 0x7f) as usize * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    assert!(b.len() < 4, "the relay sent a malformed remaining length");
    None
}

fn mqtt_str(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// What a raw CONNECT says.
#[derive(Debug, Clone)]
struct Hello {
    client_id: String,
    v5: bool,
    clean: bool,
    /// MQTT 5 Session Expiry Interval property.
    expiry: Option<u32>,
    /// MQTT 5 Receive Maximum property.
    receive_maximum: Option<u16>,
}

impl Hello {
    fn v4(client_id: &str, clean: bool) -> Hello {
        Hello {
            client_id: client_id.to_owned(),
            v5: false,
            clean,
            expiry: None,
            receive_maximum: None,
        }
    }

    fn v5(client_id: &str, clean: bool, expiry: u32) -> Hello {
        Hello {
            client_id: client_id.to_owned(),
            v5: true,
            clean,
            expiry: Some(expiry),
            receive_maximum: None,
        }
    }

    fn receive_maximum(mut self, n: u16) -> Hello {
        self.receive_maximum = Some(n);
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = mqtt_str(b"MQTT");
        body.push(if self.v5 { 5 } else { 4 });
        body.push(if self.clean { 0x02 } else { 0x00 });
        body.extend_from_slice(&60u16.to_be_bytes()); // keep-alive
        if self.v5 {
            let mut props = Vec::new();
            if let Some(e) = self.expiry {
                props.push(0x11);
                props.extend_from_slice(&e.to_be_bytes());
            }
            if let Some(r) = self.receive_maximum {
                props.push(0x21);
                props.extend_from_slice(&r.to_be_bytes());
            }
            body.extend(varint(props.len()));
            body.extend(props);
        }
        body.extend(mqtt_str(self.client_id.as_bytes()));
        packet(0x10, &body)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Publish {
    dup: bool,
    qos: u8,
    retain: bool,
    pid: u16,
    topic: String,
    payload: Vec<u8>,
}

impl Publish {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

#[derive(Debug)]
enum Pkt {
    ConnAck {
        present: bool,
        code: u8,
    },
    SubAck {
        pid: u16,
        codes: Vec<u8>,
    },
    Publish(Publish),
    /// Any other packet: its first byte (shown in failure messages).
    Other(#[allow(dead_code)] u8),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Skips an MQTT 5 property block at `at`; returns the offset after it.
fn skip_props(b: &[u8], at: usize) -> usize {
    let (len, n) = read_varint(&b[at..]).expect("complete property length");
    at + n + len
}

fn decode(first: u8, body: &[u8], v5: bool) -> Pkt {
    match first >> 4 {
        2 => Pkt::ConnAck {
            present: body[0] & 1 == 1,
            code: body[1],
        },
        3 => {
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(u16_at(body, 0));
            let topic = String::from_utf8(body[2..2 + topic_len].to_vec()).expect("UTF-8 topic");
            let mut at = 2 + topic_len;
            let mut pid = 0;
            if qos > 0 {
                pid = u16_at(body, at);
                at += 2;
            }
            if v5 {
                at = skip_props(body, at);
            }
            Pkt::Publish(Publish {
                dup: first & 0x08 != 0,
                qos,
                retain: first & 1 != 0,
                pid,
                topic,
                payload: body[at..].to_vec(),
            })
        }
        9 => {
            let pid = u16_at(body, 0);
            let at = if v5 { skip_props(body, 2) } else { 2 };
            Pkt::SubAck {
                pid,
                codes: body[at..].to_vec(),
            }
        }
        _ => Pkt::Other(first),
    }
}

struct RawClient {
    name: String,
    v5: bool,
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl RawClient {
    /// Connects and expects a CONNACK accepting the connection; returns Session Present.
    async fn connect(port: u16, hello: Hello) -> (RawClient, bool) {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("TCP connect in time")
            .expect("TCP connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut c = RawClient {
            name: hello.client_id.clone(),
            v5: hello.v5,
            stream,
            buf: Vec::new(),
            closed: false,
        };
        c.send(&hello.encode()).await;
        match c.read(WAIT).await {
            Some(Pkt::ConnAck { present, code }) => {
                assert_eq!(code, 0, "{}: CONNACK refused the connection", c.name);
                (c, present)
            }
            other => panic!(
                "{}: expected a CONNACK within {WAIT:?}, got {other:?}",
                c.name
            ),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).await.is_err() {
            self.closed = true;
        }
    }

    fn parse(&mut self) -> Option<Pkt> {
        if self.buf.len() < 2 {
            return None;
        }
        let (len, n) = read_varint(&self.buf[1..])?;
        if self.buf.len() < 1 + n + len {
            return None;
        }
        let first = self.buf[0];
        let body: Vec<u8> = self.buf[1 + n..1 + n + len].to_vec();
        self.buf.drain(..1 + n + len);
        Some(decode(first, &body, self.v5))
    }

    /// The next packet within `timeout`; `None` on timeout or when the relay closed.
    async fn read(&mut self, timeout: Duration) -> Option<Pkt> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.parse() {
                return Some(p);
            }
            if self.closed {
                return None;
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next PUBLISH within `timeout` (other packets are not expected here).
    async fn next_publish(&mut self, timeout: Duration) -> Option<Publish> {
        match self.read(timeout).await {
            Some(Pkt::Publish(p)) => Some(p),
            None => None,
            Some(other) => panic!("{}: expected a PUBLISH, got {other:?}", self.name),
        }
    }

    /// Asserts that no PUBLISH arrives within `window`.
    async fn expect_no_publish(&mut self, window: Duration, why: &str) {
        if let Some(p) = self.read(window).await {
            panic!("{}: {why}, but got {p:?}", self.name);
        }
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK granting it.
    async fn subscribe(&mut self, pid: u16, filter: &str) {
        let mut body = pid.to_be_bytes().to_vec();
        if self.v5 {
            body.push(0); // no properties
        }
        body.extend(mqtt_str(filter.as_bytes()));
        body.push(1); // QoS 1
        self.send(&packet(0x82, &body)).await;
        match self.read(WAIT).await {
            Some(Pkt::SubAck { pid: p, codes }) => {
                assert_eq!(p, pid, "{}: SUBACK packet id", self.name);
                assert_eq!(codes, vec![1], "{}: SUBACK grants QoS 1", self.name);
            }
            other => panic!(
                "{}: expected a SUBACK within {WAIT:?}, got {other:?}",
                self.name
            ),
        }
    }

    async fn puback(&mut self, pid: u16) {
        let p = packet(0x40, &pid.to_be_bytes());
        self.send(&p).await;
    }

    /// DISCONNECT (normal) and wait until the relay closed the connection.
    async fn disconnect(mut self) {
        self.send(&[0xe0, 0x00]).await;
        let deadline = Instant::now() + WAIT;
        while !self.closed && Instant::now() < deadline {
            let _ = self.read(Duration::from_millis(200)).await;
        }
        assert!(
            self.closed,
            "{}: the relay did not close after DISCONNECT",
            self.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttc helpers
// ---------------------------------------------------------------------------------------------

fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i}").into_bytes())
        .collect()
}

/// An MQTT 3.1.1 client with clean session 0 (rumqttc) subscribes `filter` at QoS 1 and
/// disconnects normally; returns the CONNACK's Session Present.
async fn v4_persistent_subscribe(port: u16, client_id: &str, filter: &str) -> bool {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    let mut present = None;
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => present = Some(ack.session_present),
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    assert_eq!(
                        ack.return_codes,
                        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                        "{client_id}: SUBACK"
                    );
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("{client_id}: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{client_id}: no SUBACK within {WAIT:?}"));
    client.disconnect().await.expect("queue disconnect");
    // The DISCONNECT is written, then the relay closes the connection.
    let closed =
        tokio::time::timeout(WAIT, async { while eventloop.poll().await.is_ok() {} }).await;
    assert!(
        closed.is_ok(),
        "{client_id}: connection still open after DISCONNECT"
    );
    present.expect("CONNACK seen")
}

/// The MQTT 5 form of [`v4_persistent_subscribe`]: clean start 0, Session Expiry `expiry`.
async fn v5_persistent_subscribe(port: u16, client_id: &str, filter: &str, expiry: u32) -> bool {
    use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(expiry));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    let mut present = None;
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => present = Some(ack.session_present),
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    assert_eq!(
                        ack.return_codes,
                        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                        "{client_id}: SUBACK"
                    );
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("{client_id}: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{client_id}: no SUBACK within {WAIT:?}"));
    client.disconnect().await.expect("queue disconnect");
    let closed =
        tokio::time::timeout(WAIT, async { while eventloop.poll().await.is_ok() {} }).await;
    assert!(
        closed.is_ok(),
        "{client_id}: connection still open after DISCONNECT"
    );
    present.expect("CONNACK seen")
}

/// Reads `n` PUBLISHes (acknowledging each) and checks they are `expected`, in order, on
/// `topic`, QoS 1, without DUP (they were never sent before).
async fn expect_fresh_deliveries(c: &mut RawClient, topic: &str, expected: &[Vec<u8>]) {
    let mut got = Vec::new();
    for i in 0..expected.len() {
        let p = c.next_publish(WAIT).await.unwrap_or_else(|| {
            panic!(
                "{}: only {i} of {} deliveries within {WAIT:?} each",
                c.name,
                expected.len()
            )
        });
        assert_eq!(p.topic, topic, "{}: delivery {i}", c.name);
        assert_eq!(p.qos, 1, "{}: delivery {i} QoS", c.name);
        assert!(
            !p.dup,
            "{}: delivery {i} was never sent, yet has DUP",
            c.name
        );
        c.puback(p.pid).await;
        got.push(p.payload);
    }
    assert_eq!(got, expected, "{}: the deliveries, in order", c.name);
}

/// Publishes every payload at QoS 1 over MQTT 3.1.1 with at most `inflight` unacknowledged;
/// returns how long it took until the last PUBACK.
async fn publish_paced(
    port: u16,
    client_id: &str,
    topic: &str,
    payloads: Vec<Vec<u8>>,
    inflight: u16,
    timeout: Duration,
) -> Duration {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let started = Instant::now();
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(inflight);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let total = payloads.len();
    let publisher = tokio::spawn({
        let client = client.clone();
        let topic = topic.to_owned();
        async move {
            for p in payloads {
                if client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, p)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let mut acked = 0usize;
    let result = tokio::time::timeout(timeout, async {
        while acked < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{client_id}: connection error after {acked}/{total} PUBACKs: {e}"),
        Err(_) => panic!("{client_id}: only {acked}/{total} PUBACKs within {timeout:?}"),
    }
    let took = started.elapsed();
    let _ = publisher.await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    took
}

// ---------------------------------------------------------------------------------------------
// 1–4: persistent sessions and SIGKILL
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_3_1_1_session_survives_kill_9() {
    let mut relay = Relay::start(RelayConfig::new("sessions-v4")).await;
    let port = relay.port();

    // rumqttc: clean session 0, subscribe, go away.
    assert!(
        !v4_persistent_subscribe(port, "keeper", "s/#").await,
        "a new session is not present"
    );
    let sent = payloads("v4", 50);
    publish_all_v4(port, "pub-v4", "s/x", sent.clone(), WAIT * 3).await;

    relay.sigkill().await;
    relay.restart().await;

    let status = admin_status(relay.cfg.admin_port).await;
    assert_eq!(
        status["broker"]["sessions_offline"], 1,
        "the persistent session is restored: {:#}",
        status["broker"]
    );
    assert_eq!(
        status["broker"]["queued_messages"], 50,
        "with its 50 deliveries: {:#}",
        status["broker"]
    );

    // Raw: clean session 0 again, no SUBSCRIBE.
    let (mut keeper, present) = RawClient::connect(port, Hello::v4("keeper", false)).await;
    assert!(present, "CONNACK Session Present after SIGKILL and restart");
    expect_fresh_deliveries(&mut keeper, "s/x", &sent).await;
    keeper
        .expect_no_publish(QUIET, "all 50 deliveries came, nothing more is due")
        .await;

    // The subscription itself survived: a new message reaches the session.
    publish_all_v4(port, "pub-v4-2", "s/y", vec![b"after".to_vec()], WAIT).await;
    let p = keeper
        .next_publish(WAIT)
        .await
        .expect("a publish to s/y after the restart reaches the restored subscription");
    assert_eq!((p.topic.as_str(), p.text().as_str()), ("s/y", "after"));
    keeper.puback(p.pid).await;
    keeper.expect_no_publish(QUIET, "no duplicates").await;
    keeper.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_with_expiry_survives_kill_9_and_expiry_0_does_not() {
    let mut relay = Relay::start(RelayConfig::new("sessions-v5")).await;
    let port = relay.port();

    // rumqttc v5: Session Expiry 3600, subscribe, go away.
    assert!(!v5_persistent_subscribe(port, "keeper5", "s/#", 3600).await);
    // Raw v5, expiry 0: subscribed and still connected when the relay is killed.
    let (mut fleeting, present) = RawClient::connect(port, Hello::v5("fleeting", false, 0)).await;
    assert!(!present);
    fleeting.subscribe(1, "s/#").await;

    let sent = payloads("v5", 50);
    let reasons = publish_all_v5(port, "pub-v5", "s/x", sent.clone(), WAIT * 3).await;
    assert!(
        reasons.iter().all(|&r| r == 0),
        "every PUBACK is a success: {reasons:?}"
    );
    // The expiry-0 session got them too while it was connected (and acknowledged none).
    for (i, expected) in sent.iter().enumerate() {
        let p = fleeting
            .next_publish(WAIT)
            .await
            .unwrap_or_else(|| panic!("fleeting: only {i} of 50 deliveries"));
        assert_eq!(&p.payload, expected);
    }

    relay.sigkill().await;
    drop(fleeting);
    relay.restart().await;

    let (mut fleeting, present) = RawClient::connect(port, Hello::v5("fleeting", false, 0)).await;
    assert!(
        !present,
        "a session with expiry 0 is not kept over a restart (Session Present 0)"
    );
    fleeting
        .expect_no_publish(QUIET, "a session with expiry 0 has nothing after a restart")
        .await;

    let (mut keeper, present) = RawClient::connect(port, Hello::v5("keeper5", false, 3600)).await;
    assert!(present, "CONNACK Session Present after SIGKILL and restart");
    expect_fresh_deliveries(&mut keeper, "s/x", &sent).await;
    keeper
        .expect_no_publish(QUIET, "all 50 deliveries came, nothing more is due")
        .await;

    publish_all_v5(port, "pub-v5-2", "s/y", vec![b"after".to_vec()], WAIT).await;
    let p = keeper
        .next_publish(WAIT)
        .await
        .expect("a publish to s/y after the restart reaches the restored subscription");
    assert_eq!((p.topic.as_str(), p.text().as_str()), ("s/y", "after"));
    keeper.puback(p.pid).await;
    fleeting
        .expect_no_publish(QUIET, "the expiry-0 session's subscription is gone")
        .await;
    keeper.expect_no_publish(QUIET, "no duplicates").await;
    keeper.disconnect().await;
    fleeting.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_delivery_is_resent_with_dup_after_kill_9() {
    let mut relay = Relay::start(RelayConfig::new("sessions-dup")).await;
    let port = relay.port();

    let (mut holder, present) = RawClient::connect(port, Hello::v4("holder", false)).await;
    assert!(!present);
    holder.subscribe(1, "t/#").await;
    let sent = payloads("unacked", 3);
    publish_all_v4(port, "pub-dup", "t/x", sent.clone(), WAIT).await;
    let mut first = Vec::new();
    for (i, expected) in sent.iter().enumerate() {
        let p = holder
            .next_publish(WAIT)
            .await
            .unwrap_or_else(|| panic!("holder: only {i} of 3 deliveries"));
        assert!(!p.dup, "first sending has no DUP: {p:?}");
        assert_eq!(p.qos, 1);
        assert_eq!(&p.payload, expected);
        first.push(p);
    }
    // No PUBACK. The "sent" marks are committed lazily: give the store time.
    tokio::time::sleep(Duration::from_secs(2)).await;

    relay.sigkill().await;
    drop(holder);
    relay.restart().await;

    let (mut holder, present) = RawClient::connect(port, Hello::v4("holder", false)).await;
    assert!(present, "CONNACK Session Present after SIGKILL and restart");
    for (i, before) in first.iter().enumerate() {
        let p = holder
            .next_publish(WAIT)
            .await
            .unwrap_or_else(|| panic!("holder: only {i} of 3 resends within {WAIT:?} each"));
        assert_eq!(
            p,
            Publish {
                dup: true,
                ..before.clone()
            },
            "resend {i}: the same message, packet id {}, now with DUP",
            before.pid
        );
        holder.puback(p.pid).await;
    }
    holder.expect_no_publish(QUIET, "nothing more is due").await;
    holder.disconnect().await;

    // Acknowledged: not sent again on the next connection.
    let (mut holder, present) = RawClient::connect(port, Hello::v4("holder", false)).await;
    assert!(present);
    holder
        .expect_no_publish(QUIET, "acknowledged deliveries are not sent again")
        .await;
    holder.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_session_is_gone_after_restart() {
    // After a restart the relay counts expiry from the restart (it cannot know how long it was
    // off), so the expiry is checked on a running relay.
    let relay = Relay::start(RelayConfig::new("sessions-expiry")).await;
    let port = relay.port();

    // rumqttc: expiry 2 s; raw: expiry 60 s, as the control.
    assert!(!v5_persistent_subscribe(port, "brief", "e/#", 2).await);
    let (mut lasting, _) = RawClient::connect(port, Hello::v5("lasting", false, 60)).await;
    lasting.subscribe(1, "e/#").await;
    lasting.disconnect().await;
    let offline_from = Instant::now();

    // 3 s offline (the relay ends expired sessions on a 1 s tick: half a second more).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    publish_all_v5(port, "pub-exp", "e/x", vec![b"late".to_vec()], WAIT).await;

    let (mut brief, present) = RawClient::connect(port, Hello::v5("brief", false, 2)).await;
    assert!(
        !present,
        "session with expiry 2 s offline for {:?} is gone (Session Present 0)",
        offline_from.elapsed()
    );
    brief
        .expect_no_publish(QUIET, "an expired session has no subscription and no queue")
        .await;

    let (mut lasting, present) = RawClient::connect(port, Hello::v5("lasting", false, 60)).await;
    assert!(present, "the session with expiry 60 s is still there");
    let p = lasting
        .next_publish(WAIT)
        .await
        .expect("the unexpired session got the message published while it was offline");
    assert_eq!(p.text(), "late");
    lasting.puback(p.pid).await;

    let status = admin_status(relay.cfg.admin_port).await;
    assert_eq!(
        status["broker"]["sessions_expired"], 1,
        "{:#}",
        status["broker"]
    );
    brief.disconnect().await;
    lasting.disconnect().await;
}

// ---------------------------------------------------------------------------------------------
// 5–6: bounded queues, slow and stuck subscribers
// ---------------------------------------------------------------------------------------------

/// Message `i` of [`a_stuck_subscriber_slows_nobody`]: its index, padded to 4 KiB, so that
/// the stuck subscriber's socket buffers (a few MiB) fill long before the run ends.
fn big_payload(i: usize) -> Vec<u8> {
    let mut p = format!("{i:05}:").into_bytes();
    p.resize(4096, b'.');
    p
}

fn index_of(payload: &[u8]) -> usize {
    std::str::from_utf8(&payload[..5])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_slows_nobody() {
    const N: usize = 5_000;
    let hub = NatsHub::start().await;
    let relay = Relay::start(
        RelayConfig::new("sessions-stuck")
            .uplink(&hub.url())
            .export("f/#")
            .mqtt("max_queued_messages = 100"),
    )
    .await;
    let port = relay.port();

    // Raw: subscribes, then never reads its socket and never acknowledges.
    let (mut stuck, _) = RawClient::connect(port, Hello::v4("stuck", true)).await;
    stuck.subscribe(1, "f/#").await;
    // rumqttc: a healthy subscriber.
    let healthy = Subscriber::start(port, "healthy", &["f/#"]).await;

    let took = publish_paced(
        port,
        "pub-stuck",
        "f/x",
        (0..N).map(big_payload).collect(),
        10,
        Duration::from_secs(60),
    )
    .await;
    eprintln!("{N} QoS 1 publishes acknowledged in {took:?}");

    let got = healthy.wait_for(N, Duration::from_secs(30)).await;
    let received = healthy.snapshot();
    let order: Vec<usize> = received.iter().map(|(_, p)| index_of(p)).collect();
    assert_eq!(
        got,
        N,
        "the healthy subscriber got {got} of {N}; errors {:?}",
        healthy.errors.lock().expect("errors")
    );
    assert!(
        order.iter().copied().eq(0..N),
        "the healthy subscriber got every message once, in order"
    );

    let in_hub = wait_stream_count(&hub.url(), STREAM, N as u64, Duration::from_secs(60)).await;
    assert_eq!(in_hub, N as u64, "the hub stream holds every message once");
    let stream = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    assert!(
        stream.iter().map(|m| index_of(&m.payload)).eq(0..N),
        "the hub stream holds every message in order"
    );

    let status = admin_status(relay.cfg.admin_port).await;
    let dropped = status["broker"]["dropped"].as_u64().unwrap_or(0);
    eprintln!("router: {:#}", status["broker"]);
    assert!(
        dropped > 0,
        "the stuck session's full queue dropped deliveries: {:#}",
        status["broker"]
    );
    assert!(
        dropped < N as u64,
        "only the stuck session dropped: {:#}",
        status["broker"]
    );
    // Still never read; closing it now.
    stuck.send(&[0xe0, 0x00]).await;
    drop(stuck);
}

/// An MQTT 5 subscriber (rumqttc) collecting payloads; `done` is set when `n` arrived.
struct V5Collector {
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    done: Arc<Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl V5Collector {
    async fn start(port: u16, client_id: &str, filter: &str, n: usize) -> V5Collector {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        tokio::time::timeout(WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => break,
                    Ok(_) => {}
                    Err(e) => panic!("subscribe: {e}"),
                }
            }
        })
        .await
        .expect("SUBACK in time");
        let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let done: Arc<Mutex<Option<Instant>>> = Arc::default();
        let task = tokio::spawn({
            let received = received.clone();
            let done = done.clone();
            async move {
                let _client = client;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let mut r = received.lock().expect("received");
                            r.push(p.payload.to_vec());
                            if r.len() == n {
                                *done.lock().expect("done") = Some(Instant::now());
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        });
        V5Collector {
            received,
            done,
            task,
        }
    }
}

impl Drop for V5Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_with_small_receive_maximum_gets_everything_it_has_room_for() {
    const N: usize = 200;
    let relay = Relay::start(RelayConfig::new("sessions-slow")).await;
    let port = relay.port();

    // Raw MQTT 5, Receive Maximum 1: acknowledges each message 10 ms after it came.
    let (mut slow, _) =
        RawClient::connect(port, Hello::v5("slow", true, 0).receive_maximum(1)).await;
    slow.subscribe(1, "r/#").await;
    // rumqttc MQTT 5: acknowledges at once.
    let fast = V5Collector::start(port, "fast", "r/#", N).await;

    let sent = payloads("slow", N);
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(N);
        for i in 0..N {
            let p = slow
                .next_publish(WAIT)
                .await
                .unwrap_or_else(|| panic!("slow: only {i} of {N} within {WAIT:?} each"));
            assert_eq!(p.qos, 1);
            // Receive Maximum 1: nothing else comes before this one is acknowledged (the
            // 10 ms watch is the slow acknowledgement).
            if let Some(more) = slow.read(Duration::from_millis(10)).await {
                panic!("slow: got {more:?} while message {i} was unacknowledged");
            }
            slow.puback(p.pid).await;
            got.push(p.payload);
        }
        let done = Instant::now();
        slow.expect_no_publish(QUIET, "nothing more").await;
        slow.disconnect().await;
        (got, done)
    });
    publish_all_v5(
        port,
        "pub-slow",
        "r/x",
        sent.clone(),
        Duration::from_secs(30),
    )
    .await;

    let (slow_got, slow_done) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the slow subscriber finished in time")
        .expect("slow reader task");
    assert_eq!(
        slow_got, sent,
        "the slow subscriber got everything, in order"
    );

    assert!(
        wait_until(WAIT, || fast.done.lock().expect("done").is_some()).await,
        "the fast subscriber got {} of {N}",
        fast.received.lock().expect("received").len()
    );
    assert_eq!(
        *fast.received.lock().expect("received"),
        sent,
        "the fast subscriber got everything, in order"
    );
    let fast_done = fast.done.lock().expect("done").expect("done");
    eprintln!(
        "fast subscriber done {:?} before the slow one",
        slow_done.saturating_duration_since(fast_done)
    );
    assert!(
        fast_done < slow_done,
        "the fast subscriber is not held back by the slow one"
    );

    let status = admin_status(relay.cfg.admin_port).await;
    assert_eq!(
        status["broker"]["dropped"], 0,
        "nothing dropped: {:#}",
        status["broker"]
    );
}

/// A burst of QoS 0 messages larger than what the relay writes to a client in one go (64 KiB)
/// reaches every subscriber whole: deliveries taken from a session's queue and not yet written
/// go out without waiting for another event on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_burst_reaches_every_subscriber_whole() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    const N: usize = 5_000;
    let relay = Relay::start(
        RelayConfig::new("burst0")
            .mqtt("max_queued_messages = 100000\nmax_queued_bytes = 67108864"),
    )
    .await;
    let port = relay.port();
    let mut subs = Vec::new();
    for i in 0..4 {
        let mut opts = MqttOptions::new(format!("burst-sub-{i}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        client
            .subscribe("burst/#", QoS::AtMostOnce)
            .await
            .expect("subscribe");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("subscriber {i}: no SUBACK: {other:?}"),
            }
        }
        subs.push(tokio::spawn(async move {
            let mut got = 0usize;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while got < N {
                match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::Publish(_)))) => got += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("subscriber {i}: {e}"),
                    Err(_) => break,
                }
            }
            drop(client);
            got
        }));
    }
    let mut opts = MqttOptions::new("burst-pub", "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            let mut payload = format!("{i:06}").into_bytes();
            payload.resize(1000, b'.');
            client
                .publish("burst/x", QoS::AtMostOnce, false, payload)
                .await
                .expect("publish");
        }
        client
    });
    let driver = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
    });
    let client = publisher.await.expect("publisher");
    for (i, s) in subs.into_iter().enumerate() {
        let got = s.await.expect("subscriber");
        assert_eq!(
            got, N,
            "subscriber {i} received {got} of {N} QoS 0 messages"
        );
    }
    drop(client);
    driver.abort();
}
