//! Malformed, truncated and out-of-order MQTT input: each bad connection is closed, and only that
//! one; a well-behaved client keeps publishing and receiving during and after.

mod common;

use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::raw::{self, Got, RawConn};
use common::{
    publish_all_v4, read_stream, wait_stream_count, NatsHub, Relay, RelayConfig, Subscriber, STREAM,
};

const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Sends `bytes` (after an optional handshake) and expects the relay to close the connection
/// without accepting the session. Returns a description of what went wrong, if anything.
fn expect_closed(
    port: u16,
    handshake: Option<Vec<u8>>,
    bytes: &[u8],
    half_close: bool,
) -> Result<(), String> {
    let mut conn = RawConn::open(port);
    if let Some(connect) = handshake {
        conn.send(&connect)
            .map_err(|e| format!("valid CONNECT not sent: {e}"))?;
        match conn.read(Duration::from_secs(10)) {
            Got::Packet(0x20, body) if body.get(1) == Some(&0) => {}
            other => return Err(format!("valid CONNECT not accepted within 10 s: {other:?}")),
        }
    }
    // The relay may close while we are still writing: that is a pass too.
    if conn.send(bytes).is_err() {
        return Ok(());
    }
    if half_close {
        let _ = conn.stream.shutdown(Shutdown::Write);
    }
    let deadline = std::time::Instant::now() + CLOSE_WITHIN;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match conn.read(left) {
            Got::Closed => return Ok(()),
            Got::Timeout => return Err(format!("connection still open after {CLOSE_WITHIN:?}")),
            // A CONNACK that accepts the session is wrong; a refusing CONNACK or a DISCONNECT
            // before the close is fine.
            Got::Packet(0x20, body) if body.get(1) == Some(&0) => {
                return Err(format!("session accepted: CONNACK {body:?}"))
            }
            Got::Packet(0x20, _) | Got::Packet(0xe0, _) => {}
            Got::Packet(h, body) => {
                return Err(format!("unexpected packet {h:#04x} {body:?}"));
            }
        }
    }
}

struct Case {
    name: &'static str,
    handshake: Option<Vec<u8>>,
    bytes: Vec<u8>,
    half_close: bool,
}

fn cases() -> Vec<Case> {
    let v4 = || Some(raw::connect_v4("bad-v4"));
    let v5 = || Some(raw::connect_v5("bad-v5"));
    let case = |name, handshake, bytes: Vec<u8>| Case {
        name,
        handshake,
        bytes,
        half_close: false,
    };
    let mut truncated = raw::publish_qos1("ok/truncated", &[b'x'; 100], 7, false);
    truncated.truncate(12);
    let mut oversized = vec![0x30];
    oversized.extend(raw::remaining_length(200 * 1024 * 1024));
    oversized.extend_from_slice(&[0, 3, b'a', b'/', b'b']);
    let mut bad_utf8_topic = raw::publish_qos1("ab", b"payload", 3, false);
    bad_utf8_topic[4] = 0xff;
    bad_utf8_topic[5] = 0xfe;
    vec![
        case(
            "garbage (an HTTP request)",
            None,
            b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n".to_vec(),
        ),
        case(
            "bad remaining length (5 continuation bytes)",
            None,
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        case(
            "CONNECT with a wrong protocol name",
            None,
            raw::connect_with(b"MQTX", 4, "bad-proto"),
        ),
        case(
            "CONNECT with protocol level 9",
            None,
            raw::connect_with(b"MQTT", 9, "bad-level"),
        ),
        case(
            "PUBLISH before CONNECT",
            None,
            raw::publish_qos1("ok/early", b"early", 1, false),
        ),
        case(
            "client-sent CONNACK after a valid MQTT 5 CONNECT",
            v5(),
            vec![0x20, 0x03, 0x00, 0x00, 0x00],
        ),
        case(
            "client-sent SUBACK after a valid MQTT 5 CONNECT",
            v5(),
            vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x00],
        ),
        case(
            "second CONNECT on one connection",
            v4(),
            raw::connect_v4("bad-again"),
        ),
        case("reserved packet type 0", v4(), vec![0x00, 0x00]),
        case(
            "PUBLISH announcing 200 MB (over max_packet_size)",
            v4(),
            oversized,
        ),
        case(
            "PUBLISH with a topic that is not UTF-8",
            v4(),
            bad_utf8_topic,
        ),
        case(
            "PUBLISH to a topic with a wildcard",
            v4(),
            raw::publish_qos1("ok/#", b"wild", 4, false),
        ),
        case(
            "SUBSCRIBE with reserved flags 0000",
            v4(),
            raw::packet(
                0x80,
                &[0x00, 0x01, 0x00, 0x04, b'o', b'k', b'/', b'#', 0x01],
            ),
        ),
        Case {
            name: "truncated PUBLISH, then the client closes",
            handshake: v4(),
            bytes: truncated,
            half_close: true,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_input_closes_only_that_connection() {
    // The good traffic is exported too, so that bad input next to it shows up in the hub.
    let hub = NatsHub::start().await;
    let mut relay = Relay::start(RelayConfig::new("mal1").uplink(&hub.url()).export("ok/#")).await;
    let port = relay.port();
    let sub = Subscriber::start(port, "good-sub", &["ok/#"]).await;

    // A well-behaved publisher that keeps going while the bad connections come and go.
    let (client, mut eventloop) = {
        let mut opts = rumqttc::MqttOptions::new("good-pub", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        rumqttc::AsyncClient::new(opts, 64)
    };
    let acked = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let poller = tokio::spawn({
        let acked = acked.clone();
        let errors = errors.clone();
        async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        errors.lock().expect("errors").push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn({
        let stop = stop.clone();
        let client = client.clone();
        async move {
            let mut sent = 0usize;
            while !stop.load(Ordering::SeqCst) && sent < 5_000 {
                client
                    .publish("ok/pub", rumqttc::QoS::AtLeastOnce, false, sent.to_string())
                    .await
                    .expect("queue publish");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        }
    });

    let mut failures = Vec::new();
    for case in cases() {
        let Case {
            name,
            handshake,
            bytes,
            half_close,
        } = case;
        let outcome =
            tokio::task::spawn_blocking(move || expect_closed(port, handshake, &bytes, half_close))
                .await
                .expect("case task");
        if let Err(e) = outcome {
            failures.push(format!("{name}: {e}"));
        }
        assert!(
            common::port_open(port),
            "after {name}: the relay no longer accepts connections"
        );
    }

    stop.store(true, Ordering::SeqCst);
    let sent = publisher.await.expect("publisher");
    let all_acked = common::wait_until(Duration::from_secs(10), || {
        acked.load(Ordering::SeqCst) >= sent
    })
    .await;
    let received = sub.wait_for(sent, Duration::from_secs(10)).await;
    poller.abort();

    // After: a new client can still publish and a new subscriber can still subscribe.
    let late_sub = Subscriber::start(port, "late-sub", &["ok/after"]).await;
    publish_all_v4(
        port,
        "late-pub",
        "ok/after",
        (0..50).map(|i| format!("after-{i}").into_bytes()).collect(),
        Duration::from_secs(10),
    )
    .await;
    let late = late_sub.wait_for(50, Duration::from_secs(10)).await;

    // Everything is checked, then reported together.
    let mut problems = failures;
    let errors = errors.lock().expect("errors").clone();
    if !errors.is_empty() {
        problems.push(format!(
            "the good publisher's connection failed: {errors:?}"
        ));
    }
    if !all_acked {
        problems.push(format!(
            "good publisher: {} of {sent} PUBACKed",
            acked.load(Ordering::SeqCst)
        ));
    }
    let sub_errors = sub.errors.lock().expect("errors").clone();
    if !sub_errors.is_empty() {
        problems.push(format!(
            "the good subscriber's connection failed: {sub_errors:?}"
        ));
    }
    let snapshot = sub.snapshot();
    let strays: Vec<String> = snapshot
        .iter()
        .filter(|(t, _)| t != "ok/pub" && t != "ok/after")
        .map(|(t, p)| format!("{t:?}={:?}", String::from_utf8_lossy(p)))
        .collect();
    if !strays.is_empty() {
        problems.push(format!(
            "messages from bad connections were delivered to a subscriber: {strays:?}"
        ));
    }
    let got: Vec<String> = snapshot
        .iter()
        .filter(|(t, _)| t == "ok/pub")
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
        .collect();
    let want: Vec<String> = (0..sent).map(|i| i.to_string()).collect();
    if got != want {
        problems.push(format!(
            "good subscriber: expected 0..{sent} once each in order, got {} messages \
             ({received} in total)",
            got.len()
        ));
    }
    if late != 50 {
        problems.push(format!(
            "after the bad connections: late subscriber got {late} of 50"
        ));
    }

    // The hub holds exactly the good messages: nothing from the bad connections.
    let good = (sent + 50) as u64;
    wait_stream_count(&hub.url(), STREAM, good, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(10)).await;
    let bad_up: Vec<String> = msgs
        .iter()
        .filter(|m| m.subject != "org.office.ok.pub" && m.subject != "org.office.ok.after")
        .map(|m| format!("{}={:?}", m.subject, m.payload_str()))
        .collect();
    if !bad_up.is_empty() {
        problems.push(format!(
            "bad connections' messages reached the hub: {bad_up:?}"
        ));
    }
    if msgs.len() as u64 != good {
        problems.push(format!(
            "hub holds {} messages, expected {good}",
            msgs.len()
        ));
    }

    let c = relay.sigterm().await;
    if (c.dropped, c.refused) != (0, 0) {
        problems.push(format!("stop line: {c:?}"));
    }
    assert!(
        problems.is_empty(),
        "malformed input:\n  {}",
        problems.join("\n  ")
    );
}
