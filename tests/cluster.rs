//! The hub as a cluster: three nats-servers with JetStream on 127.0.0.1. The relay is given
//! the servers as a list (the first one dead), creates its stream with three replicas, and
//! keeps delivering every acknowledged message exactly once while the node it is connected
//! to — whichever that is — is killed with SIGKILL and started again, one node at a time.

mod common;

use std::time::Duration;

use common::{
    free_port, publish_all_v4, read_stream, wait_stream_count, NatsCluster, Relay, RelayConfig,
    PREFIX, STREAM,
};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_fails_over_between_the_nodes_of_a_replicated_hub() {
    let mut cluster = NatsCluster::start().await;
    // A server that is down first in the list: the client goes on to the others.
    let mut urls = vec![format!("nats://127.0.0.1:{}", free_port())];
    urls.extend(cluster.urls());
    let cfg = RelayConfig::new("cluster")
        .uplink_list(&urls)
        .uplink_lines("replicas = 3")
        .export("sensors/#");
    let relay = Relay::start(cfg).await;
    let port = relay.port();
    let hub = cluster.urls()[0].clone();

    let batch = |round: usize| -> Vec<Vec<u8>> {
        (0..200)
            .map(|i| format!("round-{round}-{i}").into_bytes())
            .collect()
    };
    publish_all_v4(port, "p0", "sensors/c", batch(0), WAIT).await;
    wait_stream_count(&hub, STREAM, 200, WAIT).await;
    let js = async_nats::jetstream::new(common::connect(&hub).await);
    let mut stream = js.get_stream(STREAM).await.expect("the relay's stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(
        info.config.num_replicas, 3,
        "replicas of the stream the relay made"
    );

    // Each node in turn, so that one of them is the relay's: kill it, publish (acknowledged
    // from the relay's flash while the client moves on), start it again.
    for round in 1..=3 {
        let node = round - 1;
        cluster.kill(node);
        publish_all_v4(port, &format!("p{round}"), "sensors/c", batch(round), WAIT).await;
        let url = cluster.urls()[(node + 1) % 3].clone();
        wait_stream_count(&url, STREAM, 200 * (round as u64 + 1), WAIT).await;
        cluster.nodes[node].restart().await;
        cluster.wait_jetstream().await;
    }
    let url = cluster.urls()[0].clone();
    let msgs = read_stream(&url, STREAM, WAIT).await;
    let mut payloads: Vec<String> = msgs.iter().map(|m| m.payload_str()).collect();
    assert!(msgs
        .iter()
        .all(|m| m.subject == format!("{PREFIX}.sensors.c")));
    let total = payloads.len();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), total, "a message is in the stream twice");
    assert_eq!(total, 800, "messages in the stream");
    assert!(relay.is_running());
}
