//! Retained messages are kept in the store and survive a restart of the relay, also a
//! SIGKILL right after they were acknowledged.

mod common;

use std::time::Duration;

use common::{admin_status, publish_one_v5, Relay, RelayConfig};

/// Publishes one retained message at `qos` over MQTT 3.1.1 and waits for its acknowledgement
/// (QoS 1) or for the clean disconnect (QoS 0).
async fn retain_v4(port: u16, client_id: &str, topic: &str, payload: &[u8], qos: u8) {
    if let Err(e) = try_retain_v4(port, client_id, topic, payload, qos).await {
        panic!("{client_id}: {e}");
    }
}

/// As [`retain_v4`]; an error when the relay closes the connection instead.
async fn try_retain_v4(
    port: u16,
    client_id: &str,
    topic: &str,
    payload: &[u8],
    qos: u8,
) -> Result<(), rumqttc::ConnectionError> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    let qos = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    client
        .publish(topic, qos, true, payload.to_vec())
        .await
        .expect("queue publish");
    if qos == QoS::AtMostOnce {
        client.disconnect().await.expect("queue disconnect");
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) if qos != QoS::AtMostOnce => break,
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .expect("publish acknowledged in time")?;
    if qos != QoS::AtMostOnce {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
    Ok(())
}

/// Subscribes to `filter` over MQTT 5 and collects the retained messages the broker sends at
/// once: (topic, payload, user properties), sorted by topic.
async fn retained_now(port: u16, filter: &str) -> Vec<(String, Vec<u8>, Vec<(String, String)>)> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(format!("reader-{}", rand_suffix()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    let mut out = Vec::new();
    // Retained messages follow the SUBACK at once; a quiet half second after it ends them.
    let mut subacked = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let wait = if subacked {
            Duration::from_millis(500)
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        match tokio::time::timeout(wait, eventloop.poll()).await {
            Err(_) if subacked => break,
            Err(_) => panic!("no SUBACK for {filter}"),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subacked = true,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                assert!(
                    p.retain,
                    "a message sent on subscribe carries the retain flag"
                );
                let props = p
                    .properties
                    .map(|pp| pp.user_properties)
                    .unwrap_or_default();
                out.push((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                    props,
                ));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("reader: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reader ran too long"
        );
    }
    let _ = client.disconnect().await;
    out.sort();
    out
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_sigkill_and_restart() {
    let mut relay = Relay::start(RelayConfig::new("retained")).await;
    let port = relay.port();
    retain_v4(port, "r1", "office/a", b"first", 1).await;
    retain_v4(port, "r2", "office/b", b"bee", 1).await;
    retain_v4(port, "r3", "office/a", b"replaced", 1).await;
    retain_v4(port, "r4", "office/c", b"soon gone", 1).await;
    retain_v4(port, "r5", "office/c", b"", 1).await;
    // MQTT 5 with a user property, which comes back with it.
    publish_one_v5(port, "r6", "office/v5", "412", true, &[("unit", "lux")]).await;
    let expected = vec![
        ("office/a".to_owned(), b"replaced".to_vec(), vec![]),
        ("office/b".to_owned(), b"bee".to_vec(), vec![]),
        (
            "office/v5".to_owned(),
            b"412".to_vec(),
            vec![("unit".to_owned(), "lux".to_owned())],
        ),
    ];
    assert_eq!(retained_now(port, "office/#").await, expected, "before");

    // Acknowledged means on flash: a SIGKILL right after loses none of them.
    relay.sigkill().await;
    relay.restart().await;
    assert_eq!(
        retained_now(relay.port(), "office/#").await,
        expected,
        "after SIGKILL"
    );
    assert!(
        relay.log().contains("retained messages restored"),
        "{}",
        relay.log()
    );

    // Cleared after the restart, and the clearing is kept too.
    retain_v4(relay.port(), "r7", "office/b", b"", 1).await;
    relay.sigterm().await;
    relay.restart().await;
    let after = retained_now(relay.port(), "office/#").await;
    assert_eq!(after, vec![expected[0].clone(), expected[2].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_retained_messages_are_kept_after_a_clean_stop() {
    let mut relay = Relay::start(RelayConfig::new("retained0")).await;
    retain_v4(relay.port(), "q0", "lights/hall", b"on", 0).await;
    // The router has it at once (a QoS 0 publish has no acknowledgement to wait for).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while retained_now(relay.port(), "lights/#").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retained QoS 0 message reached the broker"
        );
    }
    relay.sigterm().await;
    relay.restart().await;
    assert_eq!(
        retained_now(relay.port(), "lights/#").await,
        vec![("lights/hall".to_owned(), b"on".to_vec(), vec![])]
    );
}

/// Publishes one retained message over MQTT 5 at QoS 1 and returns the PUBACK's reason code.
async fn retain_v5(port: u16, client_id: &str, topic: &str, payload: &[u8]) -> u8 {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
        .await
        .expect("queue publish");
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    break match ack.reason {
                        PubAckReason::Success => 0x00,
                        PubAckReason::QuotaExceeded => 0x97,
                        other => panic!("{client_id}: unexpected PUBACK {other:?}"),
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("{client_id}: {e}"),
            }
        }
    })
    .await
    .expect("PUBACK in time");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_bounded_by_max_retained_bytes() {
    // 1,024 bytes: two retained messages of 400 payload bytes fit (each takes its topic and
    // its stored record, about 450 bytes), a third does not.
    let cfg = RelayConfig::new("retained-bound").mqtt("max_retained_bytes = 1024");
    let admin = cfg.admin_port;
    let mut relay = Relay::start(cfg).await;
    let port = relay.port();
    let big = [b'x'; 400];
    assert_eq!(retain_v5(port, "b1", "r/1", &big).await, 0x00, "r/1");
    assert_eq!(retain_v5(port, "b2", "r/2", &big).await, 0x00, "r/2");
    assert_eq!(
        retain_v5(port, "b3", "r/3", &big).await,
        0x97,
        "r/3 is beyond the bound: PUBACK 0x97 quota exceeded"
    );
    // A replacement needs room only for what it adds; a clear always fits and frees room.
    assert_eq!(
        retain_v5(port, "b4", "r/1", &[b'y'; 400]).await,
        0x00,
        "replace r/1"
    );
    assert_eq!(retain_v5(port, "b5", "r/2", b"").await, 0x00, "clear r/2");
    assert_eq!(
        retain_v5(port, "b6", "r/3", &big).await,
        0x00,
        "r/3 after the clear"
    );
    // QoS 0 beyond the bound is dropped (not passed on), 3.1.1 QoS 1 has its connection closed.
    retain_v4(port, "b7", "r/4", &big, 0).await;
    assert!(
        try_retain_v4(port, "b8", "r/5", &big, 1).await.is_err(),
        "3.1.1 has no refusal code: the connection is closed without PUBACK"
    );
    let expected = vec![
        ("r/1".to_owned(), vec![b'y'; 400], vec![]),
        ("r/3".to_owned(), big.to_vec(), vec![]),
    ];
    assert_eq!(retained_now(port, "r/#").await, expected);
    let status = admin_status(admin).await;
    assert_eq!(status["outbox"]["retained_messages"], 2, "{status}");
    assert_eq!(status["outbox"]["retained_refused"], 3, "{status}");
    let bytes = status["outbox"]["retained_bytes"].as_u64().expect("bytes");
    assert!((800..=1024).contains(&bytes), "retained_bytes {bytes}");

    // After a restart the bound counts what the store already holds.
    relay.sigterm().await;
    relay.restart().await;
    let port = relay.port();
    assert_eq!(retained_now(port, "r/#").await, expected, "after restart");
    assert_eq!(
        admin_status(admin).await["outbox"]["retained_bytes"],
        bytes,
        "the same bytes counted after a restart"
    );
    assert_eq!(retain_v5(port, "b9", "r/6", &big).await, 0x97, "r/6");
    assert!(
        relay.log().contains("max_retained_bytes"),
        "the refusal is logged with the setting's name: {}",
        relay.log()
    );
}
