//! Parked connections (src/gate/park.rs): a plain-TCP client that has been quiet for a second
//! waits without a task of its own, and is served again, exactly where it left off, when it
//! sends (a PINGREQ, a PUBLISH), when a delivery or a take-over comes for its session, when its
//! keep-alive runs out, when it goes away and when the relay stops. Raw MQTT clients, so that
//! nothing is sent behind the test's back (no client-library pings).

mod common;

use std::time::{Duration, Instant};

use common::raw::{connect_with, packet, Got, RawConn};
use common::{admin_status, port_open, publish_all_v4, wait_until, Relay, RelayConfig};

const WAIT: Duration = Duration::from_secs(10);

/// CONNECT with keep-alive `keep_alive` seconds, clean session, protocol level 4 or 5.
fn connect(level: u8, client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut p = connect_with(b"MQTT", level, client_id);
    // The keep-alive sits after the fixed header (2), "MQTT" (6), level (1) and flags (1).
    p[10..12].copy_from_slice(&keep_alive.to_be_bytes());
    p
}

/// SUBSCRIBE (packet id 1) to `filter` at QoS 1 (3.1.1).
fn subscribe_v4(filter: &str) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(1);
    packet(0x82, &body)
}

async fn status_mqtt(relay: &Relay, key: &str) -> u64 {
    admin_status(relay.cfg.admin_port).await["mqtt"][key]
        .as_u64()
        .unwrap_or(0)
}

/// Waits until `/status` says `n` clients are parked.
async fn wait_parked(relay: &Relay, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let parked = status_mqtt(relay, "clients_parked").await;
        if parked == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{parked} clients parked, not {n}, after {WAIT:?}\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay whose admin endpoint answers (it is bound just after the MQTT listener).
async fn start(name: &str) -> Relay {
    let relay = Relay::start(RelayConfig::new(name)).await;
    let admin = relay.cfg.admin_port;
    assert!(
        wait_until(WAIT, || port_open(admin)).await,
        "the admin endpoint never listened"
    );
    relay
}

/// Runs a blocking raw-client step off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("raw client step")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_client_parks_and_wakes_for_a_delivery_a_ping_and_its_own_publish() {
    let relay = start("parking").await;
    let port = relay.port();
    let mut a = blocking(move || {
        let mut a = RawConn::open(port);
        a.handshake(&connect(4, "quiet", 60));
        a.send(&subscribe_v4("park/t")).expect("SUBSCRIBE");
        match a.read(WAIT) {
            Got::Packet(0x90, _) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
        a
    })
    .await;
    wait_parked(&relay, 1).await;

    // A delivery for its session wakes it.
    publish_all_v4(port, "sender", "park/t", vec![b"hello".to_vec()], WAIT).await;
    a = blocking(move || {
        match a.read(WAIT) {
            Got::Packet(h, body) if h & 0xf0 == 0x30 => {
                assert!(body.ends_with(b"hello"), "{body:?}");
                let pkid = [body[8], body[9]];
                a.send(&packet(0x40, &pkid)).expect("PUBACK");
            }
            other => panic!("expected the PUBLISH, got {other:?}"),
        }
        a
    })
    .await;
    wait_parked(&relay, 1).await;

    // So does a PINGREQ, answered as ever.
    a = blocking(move || {
        a.send(&[0xc0, 0x00]).expect("PINGREQ");
        assert_eq!(a.read(WAIT), Got::Packet(0xd0, Vec::new()));
        a
    })
    .await;
    wait_parked(&relay, 1).await;

    // And its own PUBLISH: acknowledged, and delivered to itself (it subscribed).
    blocking(move || {
        let mut body = 6u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"park/t");
        body.extend_from_slice(&7u16.to_be_bytes());
        body.extend_from_slice(b"again");
        a.send(&packet(0x32, &body)).expect("PUBLISH");
        let mut puback = false;
        let mut delivered = false;
        while !(puback && delivered) {
            match a.read(WAIT) {
                Got::Packet(0x40, body) => {
                    assert_eq!(body, vec![0, 7]);
                    puback = true;
                }
                Got::Packet(h, body) if h & 0xf0 == 0x30 => {
                    assert!(body.ends_with(b"again"));
                    delivered = true;
                }
                other => panic!("expected PUBACK and PUBLISH, got {other:?}"),
            }
        }
        // Gone while parked: the relay sees it and ends the connection.
        drop(a);
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while status_mqtt(&relay, "clients_connected").await != 0 {
        assert!(Instant::now() < deadline, "the client is still counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_mqtt(&relay, "clients_parked").await, 0);
    assert!(relay.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_that_goes_silent_is_closed_at_its_keep_alive() {
    let relay = start("parking-keepalive").await;
    let port = relay.port();
    let (mut a, connected) = blocking(move || {
        let mut a = RawConn::open(port);
        a.handshake(&connect(5, "silent", 2));
        (a, Instant::now())
    })
    .await;
    wait_parked(&relay, 1).await;
    // 1.5 × the keep-alive after its last packet, and not before [MQTT-3.1.2-24].
    let (closed, at) = blocking(move || {
        let reason = match a.read(Duration::from_secs(10)) {
            Got::Packet(0xe0, body) => body.first().copied(),
            _ => None,
        };
        (reason, connected.elapsed())
    })
    .await;
    assert_eq!(closed, Some(0x8d), "DISCONNECT keep-alive timeout");
    assert!(
        at >= Duration::from_millis(2900) && at < Duration::from_secs(8),
        "closed after {at:?}"
    );
    assert_eq!(status_mqtt(&relay, "clients_parked").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_is_taken_over() {
    let relay = start("parking-takeover").await;
    let port = relay.port();
    let mut a = blocking(move || {
        let mut a = RawConn::open(port);
        a.handshake(&connect(5, "same", 60));
        a
    })
    .await;
    wait_parked(&relay, 1).await;
    let (reason, b) = blocking(move || {
        let mut b = RawConn::open(port);
        b.handshake(&connect(5, "same", 60));
        let reason = match a.read(WAIT) {
            Got::Packet(0xe0, body) => body.first().copied(),
            _ => None,
        };
        (reason, b)
    })
    .await;
    assert_eq!(reason, Some(0x8e), "DISCONNECT session taken over");
    // The new connection parks in its turn.
    wait_parked(&relay, 1).await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_clients_are_told_when_the_relay_stops() {
    let mut relay = start("parking-stop").await;
    let port = relay.port();
    let clients = blocking(move || {
        (0..3)
            .map(|i| {
                let mut c = RawConn::open(port);
                c.handshake(&connect(5, &format!("stop-{i}"), 60));
                c
            })
            .collect::<Vec<_>>()
    })
    .await;
    wait_parked(&relay, 3).await;
    let reasons = tokio::spawn(blocking(move || {
        clients
            .into_iter()
            .map(|mut c| match c.read(Duration::from_secs(15)) {
                Got::Packet(0xe0, body) => body.first().copied(),
                _ => None,
            })
            .collect::<Vec<_>>()
    }));
    relay.sigterm().await;
    let reasons = reasons.await.expect("readers");
    assert_eq!(
        reasons,
        vec![Some(0x8b); 3],
        "DISCONNECT server shutting down"
    );
}
