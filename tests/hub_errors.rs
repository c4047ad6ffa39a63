//! A hub that answers with errors: its stream deleted under the relay, its account's JetStream
//! limits reached, the relay's user denied the subjects it publishes to. Each is counted and
//! logged once with what to do, nothing leaves the outbox, and everything arrives exactly once
//! when the hub is fixed.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    admin_status, publish_all_v4, read_stream, wait_outbox_empty, wait_stream_count,
    wait_stream_exists, HubMsg, NatsHub, Relay, RelayConfig, STREAM,
};

const WAIT: Duration = Duration::from_secs(60);

fn payloads(tag: &str, n: usize, size: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut p = format!("{tag}:{i}:").into_bytes();
            p.resize(size.max(p.len()), b'.');
            p
        })
        .collect()
}

/// Every payload of `tag` (0..n) in `msgs` exactly once, and nothing else.
fn exactly_once(msgs: &[HubMsg], tag: &str, n: usize) {
    let mut seen = HashSet::new();
    for m in msgs {
        let p = m.payload_str();
        let mut parts = p.splitn(3, ':');
        assert_eq!(parts.next(), Some(tag), "unexpected message {p:?}");
        let i: usize = parts.next().and_then(|i| i.parse().ok()).expect("index");
        assert!(i < n, "index {i} out of range");
        assert!(seen.insert(i), "{tag}:{i} twice in the hub");
    }
    assert_eq!(seen.len(), n, "{tag}: messages in the hub");
}

/// Once the hub is fixed: all `n` messages of `tag` reach the stream exactly once and leave the
/// outbox, and the relay said the trouble (`said`) once and its end once.
async fn all_arrive_and_said_once(
    relay: &Relay,
    admin: u16,
    url: &str,
    tag: &str,
    n: usize,
    said: &str,
) {
    wait_stream_count(url, STREAM, n as u64, WAIT).await;
    wait_outbox_empty(admin, WAIT).await;
    let msgs = read_stream(url, STREAM, WAIT).await;
    exactly_once(&msgs, tag, n);
    assert_eq!(relay.log_count(said), 1, "said once; log:\n{}", relay.log());
    assert_eq!(relay.log_count("the hub stores messages again"), 1);
}

/// The relay's count of hub errors of `kind`.
async fn hub_errors(admin: u16, kind: &str) -> u64 {
    admin_status(admin).await["uplink"]["hub_errors"][kind]
        .as_u64()
        .unwrap_or(0)
}

/// Waits (bounded) until the relay counted a hub error of `kind`.
async fn wait_hub_error(relay: &Relay, admin: u16, kind: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while hub_errors(admin, kind).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no {kind} hub error counted within {WAIT:?}; relay log:\n{}",
            common::tail(&relay.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn outbox_messages(admin: u16) -> u64 {
    admin_status(admin).await["outbox"]["messages"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_under_the_relay_is_made_again() {
    let hub = NatsHub::start().await;
    let cfg = RelayConfig::new("err1")
        .uplink(&hub.url())
        .export("sensors/#");
    let admin = cfg.admin_port;
    let relay = Relay::start(cfg).await;
    wait_stream_exists(&hub.url(), STREAM, WAIT).await;
    publish_all_v4(relay.port(), "a", "sensors/a", payloads("a", 200, 32), WAIT).await;
    wait_stream_count(&hub.url(), STREAM, 200, WAIT).await;
    // The hub has told the relay it stored them (they left the outbox): only what it was not
    // told about yet could be sent again into the new stream.
    wait_outbox_empty(admin, WAIT).await;

    hub.jetstream()
        .await
        .delete_stream(STREAM)
        .await
        .expect("delete the stream");
    publish_all_v4(relay.port(), "b", "sensors/b", payloads("b", 300, 32), WAIT).await;
    wait_stream_count(&hub.url(), STREAM, 300, WAIT).await;
    wait_outbox_empty(admin, WAIT).await;
    let msgs = read_stream(&hub.url(), STREAM, WAIT).await;
    exactly_once(&msgs, "b", 300);

    assert!(hub_errors(admin, "no_stream").await >= 1);
    assert_eq!(
        relay.log_count("is gone; creating it again"),
        1,
        "said once; log:\n{}",
        relay.log()
    );
    assert_eq!(relay.log_count("the hub stores messages again"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_the_relay_may_not_make_keeps_messages_until_it_is_made() {
    let hub = NatsHub::start().await;
    hub.create_stream().await;
    let mut cfg = RelayConfig::new("err2")
        .uplink(&hub.url())
        .export("sensors/#");
    cfg.create_stream = false;
    let admin = cfg.admin_port;
    let relay = Relay::start(cfg).await;
    publish_all_v4(relay.port(), "a", "sensors/a", payloads("a", 100, 32), WAIT).await;
    wait_stream_count(&hub.url(), STREAM, 100, WAIT).await;

    hub.jetstream()
        .await
        .delete_stream(STREAM)
        .await
        .expect("delete the stream");
    publish_all_v4(relay.port(), "b", "sensors/b", payloads("b", 300, 32), WAIT).await;
    wait_hub_error(&relay, admin, "no_stream").await;
    // Nothing is dropped while the stream is missing, however long it stays so.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(outbox_messages(admin).await, 300, "kept in the outbox");

    hub.create_stream().await;
    all_arrive_and_said_once(
        &relay,
        admin,
        &hub.url(),
        "b",
        300,
        "until the stream exists",
    )
    .await;
}

/// An account `OFFICE` with the relay's user (`relay`, with `relay_permissions`) and the
/// test's own (`admin`, used by clients without credentials), and `limits` for its JetStream.
fn account_conf(limits: &str, relay_permissions: &str) -> String {
    format!(
        "accounts {{\n  OFFICE {{\n    jetstream {{ {limits} }}\n    users [\n      \
         {{ user: relay, password: pw{relay_permissions} }}\n      \
         {{ user: admin, password: pw }}\n    ]\n  }}\n}}\nno_auth_user: admin\n"
    )
}

fn relay_user(cfg: RelayConfig) -> RelayConfig {
    cfg.uplink_lines("user = \"relay\"\npassword = \"pw\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_limits_reached_keep_messages_until_there_is_room() {
    // Room for a few hundred of the messages below, not for all 1,000.
    let conf = account_conf(
        "max_file: 131072, max_mem: 1048576, max_streams: 4, max_consumers: 16",
        "",
    );
    let hub = NatsHub::start_conf(&conf).await;
    let cfg = relay_user(
        RelayConfig::new("err3")
            .uplink(&hub.url())
            .export("sensors/#"),
    );
    let admin = cfg.admin_port;
    let relay = Relay::start(cfg).await;
    wait_stream_exists(&hub.url(), STREAM, WAIT).await;
    publish_all_v4(
        relay.port(),
        "a",
        "sensors/a",
        payloads("a", 1000, 400),
        WAIT,
    )
    .await;
    wait_hub_error(&relay, admin, "limits").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = read_stream(&hub.url(), STREAM, WAIT).await;
    let waiting = outbox_messages(admin).await;
    assert!(
        !first.is_empty() && first.len() < 1000,
        "the limit stopped the stream at {}",
        first.len()
    );
    assert!(
        waiting as usize >= 1000 - first.len(),
        "the outbox keeps what the hub refused: {waiting} waiting, {} stored",
        first.len()
    );

    // The hub's consumers took what was stored: the administrator purges what was read, which
    // makes room; as often as the stream fills again.
    let js = hub.jetstream().await;
    let stream = js.get_stream(STREAM).await.expect("the stream");
    let mut all = first;
    let mut purges = 0;
    loop {
        let Some(last) = all.iter().map(|m| m.seq).max() else {
            panic!("nothing read")
        };
        stream
            .purge()
            .sequence(last + 1)
            .await
            .expect("purge what was read");
        purges += 1;
        assert!(purges <= 20, "{} of 1000 after {purges} purges", all.len());
        // Until the relay has sent all it could, or the stream is full again.
        let deadline = std::time::Instant::now() + WAIT;
        let before = hub_errors(admin, "limits").await;
        loop {
            if outbox_messages(admin).await == 0 || hub_errors(admin, "limits").await > before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no progress after a purge"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        all.extend(read_stream(&hub.url(), STREAM, WAIT).await);
        if outbox_messages(admin).await == 0 {
            break;
        }
    }
    wait_outbox_empty(admin, WAIT).await;
    exactly_once(&all, "a", 1000);
    // Said once each time the stream filled, and its end once each time it had room again.
    let refused = relay.log_count("the hub refused to store");
    assert!(
        (1..=purges).contains(&refused)
            && refused == relay.log_count("the hub stores messages again"),
        "said once per change ({purges} purges); log:\n{}",
        relay.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_subject_keeps_messages_until_the_hub_allows_it() {
    let denied = ", permissions: { publish: { deny: [\"org.office.sensors.>\"] } }";
    let mut hub = NatsHub::start_conf(&account_conf("max_file: 1073741824", denied)).await;
    let cfg = relay_user(
        RelayConfig::new("err4")
            .uplink(&hub.url())
            .export("sensors/#"),
    );
    let admin = cfg.admin_port;
    let relay = Relay::start(cfg).await;
    wait_stream_exists(&hub.url(), STREAM, WAIT).await;
    publish_all_v4(relay.port(), "a", "sensors/a", payloads("a", 300, 32), WAIT).await;
    wait_hub_error(&relay, admin, "permissions").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(outbox_messages(admin).await, 300, "kept in the outbox");

    hub.restart_with(&account_conf("max_file: 1073741824", ""))
        .await;
    all_arrive_and_said_once(
        &relay,
        admin,
        &hub.url(),
        "a",
        300,
        "denies the relay's user a subject",
    )
    .await;
}
