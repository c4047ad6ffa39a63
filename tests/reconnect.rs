//! Clients that disconnect and connect again at once keep working: a DISCONNECT must not
//! take the next connection down with it.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_sessions_are_not_kicked() {
    let hub = NatsHub::start().await;
    let relay = Relay::start(
        RelayConfig::new("again")
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(10)).await;
    for round in 0..40 {
        let payloads: Vec<Vec<u8>> = (0..10)
            .map(|i| format!("{round}:{i}").into_bytes())
            .collect();
        // Each call connects, publishes QoS 1, waits for every PUBACK and sends DISCONNECT;
        // the next one connects right away.
        publish_all_v4(
            relay.port(),
            &format!("session-{}", round % 3),
            "sensors/again",
            payloads,
            Duration::from_secs(15),
        )
        .await;
    }
    assert_eq!(
        wait_stream_count(&hub.url(), STREAM, 400, Duration::from_secs(20)).await,
        400
    );
}
