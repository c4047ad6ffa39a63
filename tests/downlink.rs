//! The downlink: hub subjects brought down to local MQTT subscribers, commands sent while the
//! relay was down delivered when it is back, and no loop or echo for a topic that is both
//! imported and exported.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;

use common::{
    publish_all_v4, read_stream, stream_consumers, stream_state, wait_stream_count, NatsHub, Relay,
    RelayConfig, Subscriber, PREFIX, STREAM,
};

/// Publishes `<prefix>-<i>` on `subject` through JetStream every 250 ms until `sub` received one
/// of them on `topic` (the relay's import is live); returns how many were published.
async fn probe_until_live(
    hub: &NatsHub,
    sub: &Subscriber,
    subject: &str,
    topic: &str,
    prefix: &str,
) -> usize {
    let js = hub.jetstream().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    loop {
        let ack = js
            .publish(subject.to_owned(), format!("{prefix}-{sent}").into())
            .await
            .expect("probe publish")
            .await;
        match ack {
            Ok(_) => sent += 1,
            // The relay creates the stream once its uplink is up; until then nothing is stored
            // and nothing counts as sent.
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                assert!(
                    Instant::now() < deadline,
                    "no stream took {subject} within 20 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("probe puback: {e}"),
        }
        let seen = sub.wait_for(1, Duration::from_millis(250)).await;
        if seen > 0 {
            let got = sub.snapshot();
            assert!(
                got.iter().all(|(t, _)| t == topic),
                "probe arrived on the wrong topic: {got:?}"
            );
            return sent;
        }
        assert!(
            Instant::now() < deadline,
            "no message on {subject} reached the local subscriber on {topic} within 20 s \
             ({sent} sent)"
        );
    }
}

/// Same, through core NATS publish (for a hub without a stream).
async fn probe_until_live_core(hub: &NatsHub, sub: &Subscriber, subject: &str) -> usize {
    let nc = hub.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    loop {
        nc.publish(subject.to_owned(), format!("probe-{sent}").into())
            .await
            .expect("core publish");
        nc.flush().await.expect("flush");
        sent += 1;
        if sub.wait_for(1, Duration::from_millis(250)).await > 0 {
            return sent;
        }
        assert!(
            Instant::now() < deadline,
            "no core message on {subject} reached the local subscriber within 20 s"
        );
    }
}

fn count_of(received: &[(String, Vec<u8>)], topic: &str, payload: &str) -> usize {
    received
        .iter()
        .filter(|(t, p)| t == topic && p == payload.as_bytes())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_messages_reach_local_subscriber_once() {
    let hub = NatsHub::start().await;
    let relay = Relay::start(RelayConfig::new("dl1").uplink(&hub.url()).import("cmd/#")).await;
    let sub = Subscriber::start(relay.port(), "dl1-sub", &["cmd/#"]).await;
    probe_until_live(
        &hub,
        &sub,
        &format!("{PREFIX}.cmd.probe"),
        "cmd/probe",
        "probe",
    )
    .await;
    let before = sub.count();

    let js = hub.jetstream().await;
    js.publish(format!("{PREFIX}.cmd.x"), "js-hello".into())
        .await
        .expect("publish")
        .await
        .expect("puback");
    let nc = hub.client().await;
    nc.publish(format!("{PREFIX}.cmd.y.z"), "core-hello".into())
        .await
        .expect("core publish");
    // nats-server's MQTT mapping: `//` in a subject is `.` in the topic.
    nc.publish(format!("{PREFIX}.cmd.v1//2"), "dotted".into())
        .await
        .expect("core publish");
    nc.flush().await.expect("flush");

    sub.wait_for(before + 3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = sub.snapshot();
    assert_eq!(
        count_of(&got, "cmd/x", "js-hello"),
        1,
        "JetStream publish to {PREFIX}.cmd.x on local cmd/x: {got:?}"
    );
    assert_eq!(
        count_of(&got, "cmd/y/z", "core-hello"),
        1,
        "core publish to {PREFIX}.cmd.y.z on local cmd/y/z: {got:?}"
    );
    assert_eq!(
        count_of(&got, "cmd/v1.2", "dotted"),
        1,
        "{PREFIX}.cmd.v1//2 on local cmd/v1.2: {got:?}"
    );
    assert!(sub.errors.lock().expect("errors").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_subscription_when_no_stream_covers_the_subjects() {
    let hub = NatsHub::start().await;
    let mut cfg = RelayConfig::new("dl2").uplink(&hub.url()).import("cmd/#");
    cfg.create_stream = false;
    cfg.uplink_mode = "core";
    let relay = Relay::start(cfg).await;
    let sub = Subscriber::start(relay.port(), "dl2-sub", &["cmd/#"]).await;
    probe_until_live_core(&hub, &sub, &format!("{PREFIX}.cmd.probe")).await;
    let before = sub.count();

    let nc = hub.client().await;
    nc.publish(format!("{PREFIX}.cmd.x"), "core-only".into())
        .await
        .expect("core publish");
    nc.flush().await.expect("flush");
    sub.wait_for(before + 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sub.snapshot();
    assert_eq!(count_of(&got, "cmd/x", "core-only"), 1, "{got:?}");
    let js = hub.jetstream().await;
    assert!(
        stream_state(&js, STREAM).await.is_none(),
        "create_stream = false, yet a stream {STREAM} exists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_while_relay_was_down_arrive_after_start() {
    let mut hub = NatsHub::start().await;
    let mut relay = Relay::start(RelayConfig::new("dl3").uplink(&hub.url()).import("cmd/#")).await;
    {
        // First run: the relay creates its durable consumer; prove it is live.
        let sub = Subscriber::start(relay.port(), "dl3-sub1", &["cmd/#"]).await;
        probe_until_live(
            &hub,
            &sub,
            &format!("{PREFIX}.cmd.probe"),
            "cmd/probe",
            "probe",
        )
        .await;
        // Let every probe in flight be delivered (and acknowledged) before stopping.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    relay.sigterm().await;

    let js = hub.jetstream().await;
    const N: usize = 10;
    for i in 0..N {
        js.publish(format!("{PREFIX}.cmd.offline"), format!("off-{i}").into())
            .await
            .expect("publish")
            .await
            .expect("puback");
    }
    // Keep the hub away until the local subscriber is in place, so that nothing races it.
    hub.stop().await;
    relay.restart().await;
    let sub = Subscriber::start(relay.port(), "dl3-sub2", &["cmd/#"]).await;
    hub.restart().await;

    sub.wait_for(N, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = sub.snapshot();
    let offline: Vec<String> = got
        .iter()
        .filter(|(t, _)| t == "cmd/offline")
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
        .collect();
    let want: Vec<String> = (0..N).map(|i| format!("off-{i}")).collect();
    assert_eq!(
        offline, want,
        "messages sent while the relay was down: each once, in order"
    );
    let redelivered: Vec<_> = got.iter().filter(|(t, _)| t != "cmd/offline").collect();
    assert!(
        redelivered.is_empty(),
        "messages delivered (and acknowledged) before the graceful stop came again: \
         {redelivered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_and_exported_topic_does_not_loop_or_echo() {
    let hub = NatsHub::start().await;
    let relay = Relay::start(
        RelayConfig::new("loop1")
            .uplink(&hub.url())
            .export("chat/#")
            .import("chat/#"),
    )
    .await;
    let sub = Subscriber::start(relay.port(), "loop-sub", &["chat/#"]).await;

    // Hub → local first: proves the import is live (and these must not go back up).
    let probes = probe_until_live(
        &hub,
        &sub,
        &format!("{PREFIX}.chat.fromhub"),
        "chat/fromhub",
        "hub",
    )
    .await;

    // Local → hub: one publish.
    publish_all_v4(
        relay.port(),
        "loop-pub",
        "chat/room",
        vec![b"local-1".to_vec()],
        Duration::from_secs(10),
    )
    .await;
    wait_stream_count(
        &hub.url(),
        STREAM,
        probes as u64 + 1,
        Duration::from_secs(20),
    )
    .await;

    // Wait until the relay's import consumer has been handed the exported message (so the
    // relay did see it come back down), then give any echo or loop time to show.
    let js = hub.jetstream().await;
    let (_, last_seq) = stream_state(&js, STREAM).await.expect("stream");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let consumers = stream_consumers(&hub.url(), STREAM).await;
        if consumers
            .iter()
            .any(|(_, delivered, _)| *delivered >= last_seq)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay's import consumer never got stream seq {last_seq}: {consumers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(10)).await;
    let local_up: Vec<_> = msgs.iter().filter(|m| m.payload == b"local-1").collect();
    assert_eq!(
        local_up.len(),
        1,
        "one local publish, hub stream copies: {local_up:?}"
    );
    assert_eq!(local_up[0].subject, format!("{PREFIX}.chat.room"));
    assert_eq!(local_up[0].header("Relaybox-Origin"), Some("loop1"));
    let from_hub = msgs
        .iter()
        .filter(|m| m.payload_str().starts_with("hub-"))
        .count();
    assert_eq!(
        from_hub, probes,
        "hub messages in the stream: {probes} published on the hub; any more were sent back up"
    );
    assert_eq!(
        msgs.len(),
        probes + 1,
        "stream holds only the hub's messages and the one local publish"
    );

    let got = sub.snapshot();
    assert_eq!(
        count_of(&got, "chat/room", "local-1"),
        1,
        "local subscriber must see the local publish exactly once: {got:?}"
    );
    for i in 0..probes {
        let n = count_of(&got, "chat/fromhub", &format!("hub-{i}"));
        assert!(
            n <= 1,
            "hub message hub-{i} delivered locally {n} times: {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_stays_retained_at_the_relays_that_import_it() {
    let hub = NatsHub::start().await;
    let a = Relay::start(
        RelayConfig::new("ret-a")
            .uplink(&hub.url())
            .export("presence/#"),
    )
    .await;
    let b = Relay::start(
        RelayConfig::new("ret-b")
            .uplink(&hub.url())
            .import("presence/#"),
    )
    .await;
    let probe = Subscriber::start(b.port(), "ret-b-probe", &["presence/#"]).await;
    let probes = probe_until_live(
        &hub,
        &probe,
        &format!("{PREFIX}.presence.probe"),
        "presence/probe",
        "probe",
    )
    .await;

    // Retained at office A, and a plain message beside it.
    common::publish_one_v5(a.port(), "alice", "presence/alice", "online", true, &[]).await;
    common::publish_one_v5(a.port(), "alice", "presence/note", "plain", false, &[]).await;
    let all = wait_stream_count(
        &hub.url(),
        STREAM,
        probes as u64 + 2,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(all, probes as u64 + 2);
    let stored = read_stream(&hub.url(), STREAM, Duration::from_secs(10)).await;
    let header = |subject: &str| {
        stored
            .iter()
            .find(|m| m.subject == format!("{PREFIX}.{subject}"))
            .map(|m| m.header("Relaybox-Retain").map(str::to_owned))
    };
    assert_eq!(header("presence.alice"), Some(Some("true".to_owned())));
    assert_eq!(header("presence.note"), Some(None));

    // At office B, a subscriber that comes after it arrived gets it as the retained message; the
    // plain one is not kept.
    let came = common::wait_until(Duration::from_secs(10), || {
        let got = probe.snapshot();
        ["presence/alice", "presence/note"]
            .iter()
            .all(|t| got.iter().any(|(topic, _)| topic == t))
    })
    .await;
    assert!(came, "not at B: {:?}", probe.snapshot());
    let late = Subscriber::start(b.port(), "ret-b-late", &["presence/+"]).await;
    late.wait_for(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = late.snapshot();
    assert_eq!(
        got,
        vec![("presence/alice".to_owned(), b"online".to_vec())],
        "retained at B: {got:?}"
    );
}
