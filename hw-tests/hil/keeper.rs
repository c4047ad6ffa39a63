//! A persistent MQTT 3.1.1 session across power cuts: a subscriber that subscribes once with
//! clean session 0 and goes away, and later comes back (clean session 0 again, no SUBSCRIBE)
//! to collect what was published while it was away.
//!
//! rumqttc acknowledges every QoS 1 PUBLISH it receives (automatic PUBACKs), so the session's
//! queue on the relay drains as the messages arrive.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode,
};

fn options(port: u16, client_id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    opts
}

/// The next event; panics on a connection error or after `deadline` (waiting for `what`).
async fn next(eventloop: &mut EventLoop, client_id: &str, deadline: Instant, what: &str) -> Event {
    match tokio::time::timeout_at(deadline.into(), eventloop.poll()).await {
        Ok(Ok(event)) => event,
        Ok(Err(e)) => panic!("{client_id}: connection failed waiting for {what}: {e}"),
        Err(_) => panic!("{client_id}: no {what} in time"),
    }
}

/// Polls until the CONNACK; returns its session present flag. Panics on a refusal, an error or
/// after `deadline`.
async fn connack(eventloop: &mut EventLoop, client_id: &str, deadline: Instant) -> bool {
    loop {
        let event = next(eventloop, client_id, deadline, "the CONNACK").await;
        if let Event::Incoming(Packet::ConnAck(ack)) = event {
            assert_eq!(
                ack.code,
                rumqttc::ConnectReturnCode::Success,
                "{client_id}: CONNACK refused"
            );
            return ack.session_present;
        }
    }
}

/// Sends DISCONNECT and polls until it is out (bounded; the session stays on the relay).
async fn leave(client: &AsyncClient, eventloop: &mut EventLoop, client_id: &str) {
    client
        .disconnect()
        .await
        .unwrap_or_else(|e| panic!("{client_id}: disconnect: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline.into(), eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
    }
}

/// Connects as `client_id` with clean session 0, subscribes to `filter` at QoS 1, waits for the
/// SUBACK (granted QoS 1) and disconnects. Returns the CONNACK's session present flag.
pub async fn subscribe_and_leave(port: u16, client_id: &str, filter: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (client, mut eventloop) = AsyncClient::new(options(port, client_id), 16);
    let present = connack(&mut eventloop, client_id, deadline).await;
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .unwrap_or_else(|e| panic!("{client_id}: subscribe: {e}"));
    loop {
        let event = next(&mut eventloop, client_id, deadline, "the SUBACK").await;
        if let Event::Incoming(Packet::SubAck(ack)) = event {
            assert_eq!(
                ack.return_codes,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                "{client_id}: SUBACK for {filter}"
            );
            break;
        }
    }
    leave(&client, &mut eventloop, client_id).await;
    present
}

/// What the subscriber got when it came back.
#[derive(Debug, Default)]
pub struct Comeback {
    /// The CONNACK's session present flag.
    pub session_present: bool,
    /// PUBLISH packets received.
    pub publishes: usize,
    /// Arrivals per payload.
    pub counts: HashMap<String, usize>,
    /// Arrivals of a payload already received, with DUP set (allowed) …
    pub dup_with_flag: usize,
    /// … and without (a violation): the payloads.
    pub dup_without_flag: Vec<String>,
    /// Publishes on a topic other than the one their payload was published to, or not QoS 1.
    pub wrong: Vec<String>,
    /// Time from the CONNACK until every expected payload had arrived (None: never).
    pub all_in: Option<Duration>,
    /// Why the connection ended early, if it did.
    pub ended_by: Option<String>,
}

impl Comeback {
    /// The expected payloads that never arrived.
    pub fn missing<'a>(&self, expected: &'a HashSet<String>) -> Vec<&'a String> {
        expected
            .iter()
            .filter(|p| !self.counts.contains_key(*p))
            .collect()
    }
}

/// The head of a payload (`<tag>-<i>`, without the filler), for messages.
pub fn head(payload: &str) -> &str {
    payload.split(' ').next().unwrap_or(payload)
}

/// Connects as `client_id` with clean session 0, does not subscribe, and receives (PUBACKing
/// each) until every payload of `expected` has arrived and then nothing more for `quiet`
/// (late duplicates and unacknowledged extras show), or until `timeout`; then disconnects.
pub async fn come_back(
    port: u16,
    client_id: &str,
    expected: &HashSet<String>,
    quiet: Duration,
    timeout: Duration,
) -> Comeback {
    let started = Instant::now();
    let deadline = started + timeout;
    let (client, mut eventloop) = AsyncClient::new(options(port, client_id), 16);
    let mut got = Comeback {
        session_present: connack(&mut eventloop, client_id, deadline).await,
        ..Comeback::default()
    };
    let connected = Instant::now();
    let mut outstanding: HashSet<&String> = expected.iter().collect();
    if outstanding.is_empty() {
        got.all_in = Some(Duration::ZERO);
    }
    let mut last_arrival = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline || (got.all_in.is_some() && now >= last_arrival + quiet) {
            break;
        }
        let until = if got.all_in.is_some() {
            deadline.min(last_arrival + quiet)
        } else {
            deadline
        };
        let event = match tokio::time::timeout_at(until.into(), eventloop.poll()).await {
            Err(_) => continue,
            Ok(Err(e)) => {
                got.ended_by = Some(e.to_string());
                break;
            }
            Ok(Ok(event)) => event,
        };
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        last_arrival = Instant::now();
        got.publishes += 1;
        let payload = String::from_utf8_lossy(&p.payload).into_owned();
        let tag = head(&payload).rsplit_once('-').map_or("", |(t, _)| t);
        if p.qos != QoS::AtLeastOnce || p.topic != format!("sensors/hw/{tag}") {
            got.wrong
                .push(format!("{} on {} at {:?}", head(&payload), p.topic, p.qos));
        }
        let n = got.counts.entry(payload.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            if p.dup {
                got.dup_with_flag += 1;
            } else {
                got.dup_without_flag.push(head(&payload).to_owned());
            }
        }
        outstanding.remove(&payload);
        if outstanding.is_empty() && got.all_in.is_none() {
            got.all_in = Some(connected.elapsed());
        }
    }
    if got.ended_by.is_none() {
        leave(&client, &mut eventloop, client_id).await;
    }
    got
}
