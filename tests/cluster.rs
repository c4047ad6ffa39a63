//! The hub as a cluster: three nats-servers with JetStream on 127.0.0.1. The relay is given
//! the servers as a list (the first one dead) and creates its stream with three replicas.
//! Under a load of four QoS 1 publishers, the node the relay is connected to is killed with
//! SIGKILL; later, separately, the node that leads the stream. Every acknowledged message lands
//! in the hub stream exactly once, and the downlink keeps bringing hub messages down.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{
    free_port, publish_all_v4, read_stream, wait_stream_count, NatsCluster, Relay, RelayConfig,
    Subscriber, PREFIX, STREAM,
};

const WAIT: Duration = Duration::from_secs(60);
const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 1_500;

/// Four publishers, `PER_PUBLISHER` QoS 1 messages each, tagged with `round`; returns once all
/// were acknowledged by the relay.
async fn load(port: u16, round: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let data: Vec<Vec<u8>> = (0..PER_PUBLISHER)
                    .map(|i| format!("r{round}-p{p}-{i}").into_bytes())
                    .collect();
                tokio::spawn(async move {
                    publish_all_v4(port, &format!("r{round}p{p}"), "sensors/c", data, WAIT).await;
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("publisher");
        }
    })
}

/// A hub message on `commands/x`, and waits until the relay's local subscriber has it.
async fn downlink_delivers(cluster: &NatsCluster, via: usize, sub: &Subscriber, text: &str) {
    let client = cluster.nodes[via].client().await;
    let deadline = Instant::now() + WAIT;
    // Published again until it is seen: a message sent while the relay's consumer moves to
    // another node may wait for the consumer's redelivery, not be lost; this only bounds it.
    loop {
        client
            .publish(
                format!("{PREFIX}.commands.x"),
                text.as_bytes().to_vec().into(),
            )
            .await
            .expect("hub publish");
        let _ = client.flush().await;
        let seen = common::wait_until(Duration::from_secs(2), || {
            sub.snapshot().iter().any(|(_, p)| p == text.as_bytes())
        })
        .await;
        if seen {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the downlink did not deliver {text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_keeps_every_message_when_hub_nodes_die_under_load() {
    let mut cluster = NatsCluster::start().await;
    // A server that is down first in the list: the client goes on to the others.
    let mut urls = vec![format!("nats://127.0.0.1:{}", free_port())];
    urls.extend(cluster.urls());
    let cfg = RelayConfig::new("cluster")
        .uplink_list(&urls)
        .uplink_lines("replicas = 3")
        .export("sensors/#")
        .import("commands/#");
    let relay = Relay::start(cfg).await;
    relay
        .wait_log("hub connected", 1, Duration::from_secs(30))
        .await;
    let port = relay.port();
    let sub = Subscriber::start(port, "device", &["commands/#"]).await;
    wait_stream_count(&cluster.urls()[0], STREAM, 0, WAIT).await;
    let js = async_nats::jetstream::new(common::connect(&cluster.urls()[0]).await);
    let mut stream = js.get_stream(STREAM).await.expect("the relay's stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(
        info.config.num_replicas, 3,
        "replicas of the stream the relay made"
    );
    downlink_delivers(&cluster, 0, &sub, "before").await;

    // Round 1: kill the node the relay is connected to, under load.
    let connected = cluster
        .node_of_client("relaybox-cluster")
        .await
        .expect("the relay's connection on one of the nodes");
    let publishing = load(port, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(connected);
    publishing.await.expect("round 1");
    let other = (connected + 1) % 3;
    let total = (PUBLISHERS * PER_PUBLISHER) as u64;
    wait_stream_count(&cluster.urls()[other], STREAM, total, WAIT).await;
    downlink_delivers(&cluster, other, &sub, "after the relay's node").await;
    cluster.nodes[connected].restart().await;
    cluster.wait_jetstream().await;

    // Round 2: kill the stream's leader, under load.
    let leader = cluster
        .stream_leader(other, STREAM)
        .await
        .expect("the stream has a leader");
    let publishing = load(port, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(leader);
    publishing.await.expect("round 2");
    let other = (leader + 1) % 3;
    wait_stream_count(&cluster.urls()[other], STREAM, 2 * total, WAIT).await;
    downlink_delivers(&cluster, other, &sub, "after the stream's leader").await;
    cluster.nodes[leader].restart().await;
    cluster.wait_jetstream().await;

    // Every acknowledged message, once.
    common::wait_stream_stable(&cluster.urls()[other], STREAM, Duration::from_secs(2), WAIT).await;
    let msgs = read_stream(&cluster.urls()[other], STREAM, WAIT).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for m in msgs
        .iter()
        .filter(|m| m.subject == format!("{PREFIX}.sensors.c"))
    {
        *counts.entry(m.payload_str()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "in the stream more than once: {twice:?}");
    for round in 1..=2 {
        for p in 0..PUBLISHERS {
            for i in 0..PER_PUBLISHER {
                let payload = format!("r{round}-p{p}-{i}");
                assert!(counts.contains_key(&payload), "{payload} is missing");
            }
        }
    }
    assert_eq!(counts.len() as u64, 2 * total);
    assert!(relay.is_running());
    println!(
        "cluster: killed node n{connected} (the relay's) and then n{leader} (the stream's leader) under \
         {PUBLISHERS} publishers; {} messages at the hub exactly once; the downlink delivered after each",
        2 * total
    );
}
