//! The export data path end to end: MQTT publishers → relaybox → hub stream.
//!
//! What a user checks: every acknowledged message reaches the hub exactly once, in order per
//! publisher, on the mapped subject, with the de-duplication and origin headers; topics that are
//! not exported stay local.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{
    publish_all_v4, publish_all_v5, publish_one_v5, read_stream, wait_stream_count, HubMsg,
    NatsHub, Relay, RelayConfig, Subscriber, PREFIX, STREAM,
};

const CLIENTS: usize = 4;
const PER_CLIENT: usize = 2_500;

fn payloads(client: &str) -> Vec<Vec<u8>> {
    (0..PER_CLIENT)
        .map(|seq| format!("{client}:{seq}").into_bytes())
        .collect()
}

/// Checks the 10,000 messages read back from the hub: none lost, none duplicated (by payload
/// and by `Nats-Msg-Id`), in order per client, mapped subjects, headers of relay `name`.
fn check_exactly_once_in_order(msgs: &[HubMsg], name: &str) {
    assert_eq!(
        msgs.len(),
        CLIENTS * PER_CLIENT,
        "hub stream holds {} messages, expected {}",
        msgs.len(),
        CLIENTS * PER_CLIENT
    );
    let mut payloads = HashSet::new();
    let mut ids = HashSet::new();
    let mut epochs = HashSet::new();
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for m in msgs {
        let p = m.payload_str();
        assert!(payloads.insert(p.clone()), "payload {p:?} twice in the hub");
        let (client, seq) = p
            .split_once(':')
            .unwrap_or_else(|| panic!("unexpected payload {p:?}"));
        let seq: usize = seq.parse().expect("seq");
        assert_eq!(
            m.subject,
            format!("{PREFIX}.sensors.{client}"),
            "subject of {p:?}"
        );
        let expected = next.entry(client.to_owned()).or_insert(0);
        assert_eq!(
            seq, *expected,
            "client {client}: hub has seq {seq} where {expected} was next (order per client)"
        );
        *expected += 1;

        let id = m
            .header("Nats-Msg-Id")
            .unwrap_or_else(|| panic!("no Nats-Msg-Id on {p:?}: {:?}", m.headers));
        assert!(ids.insert(id.to_owned()), "Nats-Msg-Id {id} twice");
        let rest = id
            .strip_prefix(&format!("{name}-"))
            .unwrap_or_else(|| panic!("Nats-Msg-Id {id:?} does not start with {name}-"));
        let (epoch, seq) = rest
            .rsplit_once('-')
            .unwrap_or_else(|| panic!("Nats-Msg-Id {id:?} is not <relay>-<epoch>-<seq>"));
        assert!(
            seq.parse::<u64>().is_ok(),
            "Nats-Msg-Id {id:?}: seq is not a number"
        );
        epochs.insert(epoch.to_owned());
        assert_eq!(m.header("Relaybox-Origin"), Some(name), "origin of {p:?}");
    }
    assert_eq!(epochs.len(), 1, "one store, one epoch: {epochs:?}");
    for (client, n) in &next {
        assert_eq!(*n, PER_CLIENT, "client {client}");
    }
}

async fn ten_thousand(v5: bool) {
    let name = if v5 { "dp5" } else { "dp4" };
    let hub = NatsHub::start().await;
    let mut relay = Relay::start(
        RelayConfig::new(name)
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    // Published once the hub link is up, so that every message is live traffic and keeps its
    // order per client (a record accepted while the link is down is backlog, which live records
    // may overtake).
    relay
        .wait_log("hub connected", 1, Duration::from_secs(30))
        .await;

    let mut tasks = Vec::new();
    for c in 1..=CLIENTS {
        let port = relay.port();
        let client = format!("c{c}");
        tasks.push(tokio::spawn(async move {
            let topic = format!("sensors/{client}");
            let id = format!("{name}-{client}");
            let data = payloads(&client);
            if v5 {
                let reasons =
                    publish_all_v5(port, &id, &topic, data, Duration::from_secs(60)).await;
                // 0x10 "no matching subscribers" is a success too.
                let bad: Vec<_> = reasons
                    .iter()
                    .filter(|r| **r != 0x00 && **r != 0x10)
                    .collect();
                assert!(bad.is_empty(), "{id}: failed PUBACK reasons {bad:?}");
            } else {
                publish_all_v4(port, &id, &topic, data, Duration::from_secs(60)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }

    let total = (CLIENTS * PER_CLIENT) as u64;
    wait_stream_count(&hub.url(), STREAM, total, Duration::from_secs(60)).await;
    // Anything re-sent late would show up now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(30)).await;
    check_exactly_once_in_order(&msgs, name);

    let counters = relay.sigterm().await;
    assert_eq!(
        (counters.appended, counters.dropped, counters.refused),
        (total, 0, 0),
        "stop line counters (appended, dropped, refused)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt311_10k_messages_reach_hub_exactly_once_in_order() {
    ten_thousand(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_10k_messages_reach_hub_exactly_once_in_order() {
    ten_thousand(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_are_mapped_and_unexported_topics_stay_local() {
    let hub = NatsHub::start().await;
    let relay = Relay::start(
        RelayConfig::new("map1")
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    let sub = Subscriber::start(relay.port(), "map-sub", &["sensors/#", "local/#"]).await;
    // The order checked below is the live order: publish once the hub link is up.
    common::wait_hub_link(relay.cfg.admin_port, Duration::from_secs(10)).await;

    // (topic, payload, subject in the hub or None when it must not reach the hub)
    let sends: &[(&str, &str, Option<&str>)] = &[
        ("sensors/c1", "one", Some("sensors.c1")),
        ("local/x", "stays-local", None),
        ("sensors/a/b", "deep", Some("sensors.a.b")),
        ("sensors/v1.2", "dotted", Some("sensors.v1//2")),
        // No NATS subject can carry a space: it stays local, and must not hold up what follows.
        ("sensors/has space", "unmappable", None),
        ("sensors/after", "after", Some("sensors.after")),
    ];
    for (i, (topic, payload, _)) in sends.iter().enumerate() {
        publish_all_v4(
            relay.port(),
            &format!("map-pub-{i}"),
            topic,
            vec![payload.as_bytes().to_vec()],
            Duration::from_secs(10),
        )
        .await;
    }
    let expected: Vec<(String, String)> = sends
        .iter()
        .filter_map(|(_, p, s)| s.map(|s| (format!("{PREFIX}.{s}"), (*p).to_owned())))
        .collect();

    wait_stream_count(
        &hub.url(),
        STREAM,
        expected.len() as u64,
        Duration::from_secs(20),
    )
    .await;
    let got = sub.wait_for(sends.len(), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(10)).await;
    let hub_view: Vec<(String, String)> = msgs
        .iter()
        .map(|m| (m.subject.clone(), m.payload_str()))
        .collect();
    assert_eq!(
        hub_view, expected,
        "hub stream: exported topics mapped (nats-server MQTT rules), others absent"
    );

    let local: Vec<(String, String)> = sub
        .snapshot()
        .into_iter()
        .map(|(t, p)| (t, String::from_utf8_lossy(&p).into_owned()))
        .collect();
    assert_eq!(got, sends.len(), "local subscriber got {local:?}");
    for (topic, payload, _) in sends {
        let n = local
            .iter()
            .filter(|(t, p)| t == topic && p == payload)
            .count();
        assert_eq!(n, 1, "local subscriber saw {topic} {n} times: {local:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_user_properties_become_hub_headers() {
    let hub = NatsHub::start().await;
    let relay = Relay::start(
        RelayConfig::new("props1")
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    publish_one_v5(
        relay.port(),
        "props-pub",
        "sensors/t",
        "21.5",
        false,
        &[("site", "basement"), ("unit", "C")],
    )
    .await;

    wait_stream_count(&hub.url(), STREAM, 1, Duration::from_secs(20)).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.subject, format!("{PREFIX}.sensors.t"));
    assert_eq!(m.payload_str(), "21.5");
    assert_eq!(
        m.header("site"),
        Some("basement"),
        "headers {:?}",
        m.headers
    );
    assert_eq!(m.header("unit"), Some("C"), "headers {:?}", m.headers);
    assert_eq!(m.header("Relaybox-Origin"), Some("props1"));
}

/// The hub's nats-server version as (major, minor).
async fn hub_version(url: &str) -> (u64, u64) {
    let client = common::connect(url).await;
    let version = client.server_info().version;
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Publishes `n` messages to `sensors/<tag>` and checks that the hub holds each exactly once, in
/// order, that they left the outbox, and which path the uplink took.
async fn through(relay: &Relay, hub: &NatsHub, tag: &str, n: usize, batched: bool) {
    let data: Vec<Vec<u8>> = (0..n).map(|i| format!("{tag}:{i}").into_bytes()).collect();
    publish_all_v4(
        relay.port(),
        &format!("{tag}-pub"),
        &format!("sensors/{tag}"),
        data,
        Duration::from_secs(60),
    )
    .await;
    wait_stream_count(&hub.url(), STREAM, n as u64, Duration::from_secs(60)).await;
    let status = common::wait_outbox_empty(relay.cfg.admin_port, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(30)).await;
    let got: Vec<String> = msgs.iter().map(HubMsg::payload_str).collect();
    let want: Vec<String> = (0..n).map(|i| format!("{tag}:{i}")).collect();
    assert_eq!(got.len(), want.len(), "messages in the hub stream");
    assert!(
        got == want,
        "the hub stream holds other messages, or in another order"
    );
    assert_eq!(
        status["uplink"]["batched"].as_bool(),
        Some(batched),
        "uplink path (batched: {batched}); status: {status}"
    );
    let acknowledged = status["uplink"]["acknowledged"].as_u64().unwrap_or(0);
    assert!(
        acknowledged >= n as u64,
        "acknowledged {acknowledged} of {n}"
    );
    let metrics = common::admin_get(relay.cfg.admin_port, "/metrics").await;
    let gauge = format!("relaybox_uplink_batched {}", u8::from(batched));
    assert!(metrics.contains(&gauge), "no {gauge:?} in /metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_batches_where_the_hub_allows_it_and_sends_singly_where_not() {
    // A stream the relay makes allows fast-ingest batches, which hubs from nats-server 2.14
    // take; an older hub stores the first message as a plain publish and the relay goes on one
    // message at a time.
    let hub = NatsHub::start().await;
    let knows_batches = hub_version(&hub.url()).await >= (2, 14);
    let relay = Relay::start(
        RelayConfig::new("fi1")
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    common::wait_hub_link(relay.cfg.admin_port, Duration::from_secs(10)).await;
    through(&relay, &hub, "made", 3_000, knows_batches).await;
    if !knows_batches {
        assert_eq!(
            relay.log_count("does not take fast-ingest batches"),
            1,
            "said once; log:\n{}",
            relay.log()
        );
    }
    drop(relay);
    drop(hub);

    // A stream the hub's administrators made without `allow_batched`: the first message is
    // refused (and nothing stored), and the relay sends one message at a time.
    let hub = NatsHub::start().await;
    hub.create_stream().await;
    let mut cfg = RelayConfig::new("fi2")
        .uplink(&hub.url())
        .export("sensors/#");
    cfg.create_stream = false;
    let relay = Relay::start(cfg).await;
    common::wait_hub_link(relay.cfg.admin_port, Duration::from_secs(10)).await;
    through(&relay, &hub, "given", 1_000, false).await;
    let said = if knows_batches {
        "does not allow batched publishes"
    } else {
        "does not take fast-ingest batches"
    };
    assert_eq!(relay.log_count(said), 1, "said once; log:\n{}", relay.log());
}
