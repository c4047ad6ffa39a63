//! The outbox bound while the hub is unreachable: `drop-oldest` keeps the newest records and
//! counts the dropped ones; `refuse-new` keeps the oldest and tells QoS 1 publishers (MQTT 5:
//! PUBACK reason 0x97; MQTT 3.1.1: the connection is closed without a PUBACK).

mod common;

use std::time::Duration;

use common::raw::{self, Got, RawConn};
use common::{
    free_port, publish_all_v4, read_stream, wait_stream_count, wait_stream_stable, NatsHub, Relay,
    RelayConfig, STREAM,
};

const MAX_BYTES: u64 = 8192;
const SENT: usize = 500;
const QUOTA_EXCEEDED: u8 = 0x97;

/// A 100-byte payload that starts with its index.
fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("{i:05}:").into_bytes();
    p.resize(100, b'x');
    p
}

fn index_of(p: &[u8]) -> usize {
    std::str::from_utf8(&p[..5])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload {:?}", String::from_utf8_lossy(p)))
}

fn bounded_relay(name: &str, hub_port: u16, policy: &'static str) -> RelayConfig {
    RelayConfig::new(name)
        .uplink(&format!("nats://127.0.0.1:{hub_port}"))
        .export("sensors/#")
        .outbox(MAX_BYTES, policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_the_newest_and_counts_the_dropped() {
    let hub_port = free_port();
    let mut relay = Relay::start(bounded_relay("bound1", hub_port, "drop-oldest")).await;

    let all: Vec<Vec<u8>> = (0..SENT).map(payload).collect();
    publish_all_v4(
        relay.port(),
        "bound1-pub",
        "sensors/d",
        all,
        Duration::from_secs(60),
    )
    .await;
    assert!(relay.is_running());

    let hub = NatsHub::start_on(hub_port).await;
    let n = wait_stream_stable(
        &hub.url(),
        STREAM,
        Duration::from_secs(2),
        Duration::from_secs(40),
    )
    .await as usize;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(10)).await;
    let got: Vec<usize> = msgs.iter().map(|m| index_of(&m.payload)).collect();
    eprintln!("drop-oldest: {n} of {SENT} kept in {MAX_BYTES} bytes");
    assert_eq!(got.len(), n);
    assert!(
        n > 0 && n < SENT,
        "{n} of {SENT} reached the hub; an {MAX_BYTES}-byte outbox holds far fewer than {SENT} \
         100-byte records"
    );
    assert!(
        (n as u64) * 100 <= MAX_BYTES,
        "{n} records of 100+ bytes cannot fit in max_bytes = {MAX_BYTES}"
    );
    let want: Vec<usize> = (SENT - n..SENT).collect();
    assert_eq!(
        got, want,
        "drop-oldest: the hub must hold exactly the newest {n} messages, in order"
    );

    let c = relay.sigterm().await;
    assert_eq!(
        (c.appended, c.dropped, c.refused),
        (SENT as u64, (SENT - n) as u64, 0),
        "stop line (appended, dropped, refused): dropped must equal the {} missing",
        SENT - n
    );
}

/// Publishes at QoS 1 over a raw MQTT 5 connection, one at a time; returns each PUBACK reason.
fn publish_v5_each(port: u16, client_id: &str, from: usize, to: usize) -> Vec<u8> {
    let mut conn = RawConn::open(port);
    conn.handshake(&raw::connect_v5(client_id));
    let mut reasons = Vec::new();
    for i in from..to {
        let pkid = (i % 60_000 + 1) as u16;
        conn.send(&raw::publish_qos1("sensors/r", &payload(i), pkid, true))
            .unwrap_or_else(|e| panic!("send publish {i}: {e}"));
        match conn.read(Duration::from_secs(10)) {
            Got::Packet(0x40, body) => {
                assert!(body.len() >= 2, "short PUBACK {body:?}");
                assert_eq!(u16::from_be_bytes([body[0], body[1]]), pkid, "PUBACK pkid");
                // No reason byte means success (MQTT 5 §3.4.2.1).
                reasons.push(body.get(2).copied().unwrap_or(0));
            }
            other => panic!("publish {i}: expected PUBACK, got {other:?}"),
        }
    }
    reasons
}

fn is_success(reason: u8) -> bool {
    reason == 0x00 || reason == 0x10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_new_tells_publishers_and_keeps_the_oldest() {
    let hub_port = free_port();
    let mut relay = Relay::start(bounded_relay("bound2", hub_port, "refuse-new")).await;
    let port = relay.port();

    let reasons = tokio::task::spawn_blocking(move || publish_v5_each(port, "bound2-v5", 0, SENT))
        .await
        .expect("publisher");
    let accepted = reasons.iter().take_while(|r| is_success(**r)).count();
    assert!(
        accepted > 0 && accepted < SENT,
        "refuse-new: {accepted} of {SENT} accepted; reasons {reasons:?}"
    );
    eprintln!("refuse-new: {accepted} of {SENT} accepted in {MAX_BYTES} bytes");
    let after: Vec<u8> = reasons[accepted..].to_vec();
    assert!(
        after.iter().all(|r| *r == QUOTA_EXCEEDED),
        "after the first refusal every publish must get 0x97 (QuotaExceeded) while the hub is \
         down; got {after:?}"
    );

    // MQTT 3.1.1 has no reason codes: the publisher's connection is closed without a PUBACK.
    let closed = tokio::task::spawn_blocking(move || {
        let mut conn = RawConn::open(port);
        conn.handshake(&raw::connect_v4("bound2-v4"));
        conn.send(&raw::publish_qos1("sensors/r", &payload(SENT), 1, false))
            .expect("send");
        match conn.read(Duration::from_secs(10)) {
            Got::Closed => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .expect("v4 publisher");
    if let Err(got) = closed {
        panic!("refuse-new, MQTT 3.1.1 QoS 1: expected the connection closed, got {got}");
    }

    let hub = NatsHub::start_on(hub_port).await;
    let n = wait_stream_stable(
        &hub.url(),
        STREAM,
        Duration::from_secs(2),
        Duration::from_secs(40),
    )
    .await as usize;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(10)).await;
    let got: Vec<usize> = msgs.iter().map(|m| index_of(&m.payload)).collect();
    let want: Vec<usize> = (0..accepted).collect();
    assert_eq!(
        got, want,
        "refuse-new: the hub must hold exactly the {accepted} oldest (accepted) messages ({n} \
         arrived)"
    );

    // Drained: there is room again.
    let reasons = tokio::task::spawn_blocking(move || {
        publish_v5_each(port, "bound2-v5b", SENT + 1, SENT + 2)
    })
    .await
    .expect("publisher");
    assert!(
        is_success(reasons[0]),
        "after the outbox drained, a publish must be accepted; reason {:#04x}",
        reasons[0]
    );
    wait_stream_count(
        &hub.url(),
        STREAM,
        accepted as u64 + 1,
        Duration::from_secs(20),
    )
    .await;

    let c = relay.sigterm().await;
    assert_eq!(
        (c.appended, c.dropped, c.refused),
        (accepted as u64 + 1, 0, (SENT - accepted) as u64 + 1),
        "stop line (appended, dropped, refused)"
    );
}
