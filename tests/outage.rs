//! Hub outages and relay crashes: what was acknowledged to an MQTT publisher reaches the hub
//! exactly once, even when the hub was down and the relay was killed with SIGKILL meanwhile.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{
    publish_all_v4, read_stream, wait_stream_count, wait_stream_exists, HubMsg, NatsHub, Relay,
    RelayConfig, STREAM,
};

const CLIENTS: usize = 2;
const PER_CLIENT: usize = 2_500;

async fn publish_from_clients(port: u16, tag: &str) {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = format!("{tag}{c}");
            let data = (0..PER_CLIENT)
                .map(|i| format!("{client}:{i}").into_bytes())
                .collect();
            publish_all_v4(
                port,
                &client,
                &format!("sensors/{client}"),
                data,
                Duration::from_secs(60),
            )
            .await;
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
}

/// Every client's messages exactly once and in order.
fn check_exactly_once(msgs: &[HubMsg]) {
    let mut seen = HashSet::new();
    let mut ids = HashSet::new();
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for m in msgs {
        let p = m.payload_str();
        assert!(seen.insert(p.clone()), "payload {p:?} twice in the hub");
        if let Some(id) = m.header("Nats-Msg-Id") {
            assert!(ids.insert(id.to_owned()), "Nats-Msg-Id {id} twice");
        }
        let (client, seq) = p.split_once(':').expect("payload client:seq");
        let seq: usize = seq.parse().expect("seq");
        let want = next.entry(client.to_owned()).or_insert(0);
        assert_eq!(seq, *want, "client {client}: order in the hub stream");
        *want += 1;
    }
    assert_eq!(
        msgs.len(),
        CLIENTS * PER_CLIENT,
        "messages in the hub (per client: {next:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_while_hub_down_survive_sigkill_and_arrive_once() {
    let mut hub = NatsHub::start().await;
    let mut relay = Relay::start(
        RelayConfig::new("out1")
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    // The relay creates the stream once it reaches the hub.
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(20)).await;
    hub.stop().await;

    publish_from_clients(relay.port(), "o").await;

    relay.sigkill().await;
    relay.restart().await;
    hub.restart().await;

    let total = (CLIENTS * PER_CLIENT) as u64;
    wait_stream_count(&hub.url(), STREAM, total, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(30)).await;
    check_exactly_once(&msgs);

    let c = relay.sigterm().await;
    assert_eq!(
        (c.dropped, c.refused),
        (0, 0),
        "stop line after recovery: {c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_upload_resends_without_duplicates() {
    let hub = NatsHub::start().await;
    let mut relay = Relay::start(
        RelayConfig::new("out2")
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(20)).await;

    publish_from_clients(relay.port(), "k").await;
    // Kill while the uplink is (likely) still sending: records sent but not yet deleted are
    // sent again after the restart, and the hub must de-duplicate them.
    relay.sigkill().await;
    relay.restart().await;

    let total = (CLIENTS * PER_CLIENT) as u64;
    wait_stream_count(&hub.url(), STREAM, total, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(30)).await;
    check_exactly_once(&msgs);
    relay.sigterm().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_publishing_keeps_everything_acknowledged() {
    use common::raw::{self, Got, RawConn};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let hub = NatsHub::start().await;
    let mut relay = Relay::start(
        RelayConfig::new("out3")
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(20)).await;

    // One message at a time, each waiting for its PUBACK, until the relay goes away: the
    // acknowledged ones are exactly known.
    let port = relay.port();
    let started = Arc::new(AtomicBool::new(false));
    let publisher = tokio::task::spawn_blocking({
        let started = started.clone();
        move || {
            let mut conn = RawConn::open(port);
            conn.handshake(&raw::connect_v4("term-pub"));
            let mut acked = 0usize;
            for i in 0..100_000usize {
                let pkid = (i % 60_000 + 1) as u16;
                let msg =
                    raw::publish_qos1("sensors/term", format!("t:{i}").as_bytes(), pkid, false);
                if conn.send(&msg).is_err() {
                    break;
                }
                match conn.read(Duration::from_secs(10)) {
                    Got::Packet(0x40, body) if body[..2] == pkid.to_be_bytes() => acked += 1,
                    Got::Closed => break,
                    other => panic!("publish {i}: expected PUBACK, got {other:?}"),
                }
                if acked == 100 {
                    started.store(true, Ordering::SeqCst);
                }
            }
            acked
        }
    });
    assert!(
        common::wait_until(Duration::from_secs(10), || started.load(Ordering::SeqCst)).await,
        "the publisher did not get 100 PUBACKs within 10 s"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = relay.sigterm().await;
    let acked = tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("publisher ends once the relay is gone")
        .expect("publisher");
    assert!(
        c.appended >= acked as u64,
        "stop line appended={} but {acked} PUBACKs were sent",
        c.appended
    );

    // Whatever was acknowledged reaches the hub, once; after a restart if need be.
    relay.restart().await;
    wait_stream_count(&hub.url(), STREAM, acked as u64, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(30)).await;
    let got: Vec<String> = msgs.iter().map(|m| m.payload_str()).collect();
    let want: Vec<String> = (0..acked).map(|i| format!("t:{i}")).collect();
    assert!(
        got.len() == acked || got.len() == acked + 1,
        "{acked} acknowledged (+ at most the one in flight), {} in the hub",
        got.len()
    );
    assert_eq!(
        got[..acked],
        want[..],
        "hub: every acknowledged message once, in order"
    );
    if got.len() == acked + 1 {
        assert_eq!(got[acked], format!("t:{acked}"), "the one in flight");
    }
    relay.sigterm().await;
}
