//! Operating the box: live before backlog, drain cap, max_age, metrics and status, the status
//! message on the hub, store space after a drained backlog. Real binary, real nats-server.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures::StreamExt;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every message of the hub stream with the time the hub stored it (ms since the epoch):
/// (stream sequence, payload, stored at).
async fn stored_times(url: &str) -> Vec<(u64, Vec<u8>, u64)> {
    use async_nats::jetstream::consumer;
    let js = async_nats::jetstream::new(connect(url).await);
    let (count, _) = stream_state(&js, STREAM).await.expect("stream exists");
    let stream = js.get_stream(STREAM).await.expect("get stream");
    let reader = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("reader consumer");
    let mut messages = reader.messages().await.expect("messages");
    let mut out = Vec::with_capacity(count as usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (out.len() as u64) < count {
        let m = tokio::time::timeout_at(deadline, messages.next())
            .await
            .expect("stream read in time")
            .expect("stream open")
            .expect("stream message");
        let info = m.info().expect("JetStream message info");
        let stored = (info.published.unix_timestamp_nanos() / 1_000_000) as u64;
        out.push((info.stream_sequence, m.payload.to_vec(), stored));
    }
    out
}

/// Latencies (ms) of the live messages of run `tag`: stored at the hub minus the send time in
/// the payload (`live:<tag>:<i>:<sent ms>`).
fn live_latencies(stored: &[(u64, Vec<u8>, u64)], tag: &str) -> Vec<u64> {
    let prefix = format!("live:{tag}:");
    let mut out: Vec<u64> = stored
        .iter()
        .filter_map(|(_, p, at)| {
            let text = String::from_utf8_lossy(p);
            let sent: u64 = text
                .strip_prefix(prefix.as_str())?
                .split(':')
                .nth(1)?
                .parse()
                .ok()?;
            Some(at.saturating_sub(sent))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Publishes `n` live messages at `rate` per second on `topic`, each carrying its send time;
/// returns when all are acknowledged.
async fn live_traffic(port: u16, tag: &str, topic: &str, n: usize, rate: u64) {
    let client_id = format!("live-{tag}");
    let client_id = client_id.as_str();
    let tag = tag.to_owned();
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let topic = topic.to_owned();
    let sender = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(1000 / rate));
        for i in 0..n {
            ticks.tick().await;
            let payload = format!("live:{tag}:{i}:{}", now_ms());
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue live publish");
        }
        client
    });
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while acked < n {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("live publisher: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {acked}/{n} live messages acknowledged"));
    let client = sender.await.expect("live sender");
    let _ = client.disconnect().await;
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Fills the outbox with `per_client * clients` messages on `sensors/backlog/<c>` while the hub
/// is away.
async fn make_backlog(port: u16, clients: usize, per_client: usize) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let payloads: Vec<Vec<u8>> = (0..per_client)
            .map(|i| format!("backlog:{c}:{i}").into_bytes())
            .collect();
        tasks.push(tokio::spawn(async move {
            publish_all_v4(
                port,
                &format!("backlog-{c}"),
                &format!("sensors/backlog/{c}"),
                payloads,
                Duration::from_secs(120),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.expect("backlog publisher");
    }
}

/// The backlog scenario: `total` records wait while the hub is away; when it is back, live
/// traffic runs while the backlog drains. Returns (live latencies ms, backlog arrival rate,
/// all hub messages).
async fn backlog_scenario(name: &str, drain_rate: Option<&str>) -> (Vec<u64>, Vec<u64>, f64) {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 12_500;
    const LIVE: usize = 100;
    let mut hub = NatsHub::start().await;
    let mut cfg = RelayConfig::new(name)
        .uplink(&hub.url())
        .export("sensors/#");
    if let Some(rate) = drain_rate {
        cfg = cfg.uplink_lines(&format!("drain_rate = {}", toml_str(rate)));
    }
    let admin = cfg.admin_port;
    let relay = Relay::start(cfg).await;
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(10)).await;

    // Live latency without a backlog, for comparison.
    live_traffic(relay.port(), "idle", "sensors/live", 40, 20).await;
    wait_stream_count(&hub.url(), STREAM, 40, Duration::from_secs(10)).await;
    let idle = live_latencies(&stored_times(&hub.url()).await, "idle");

    hub.stop().await;
    make_backlog(relay.port(), CLIENTS, PER_CLIENT).await;
    hub.restart().await;
    // Live traffic is what is published while the link is up: what the relay accepts before
    // it has reconnected is backlog.
    common::wait_hub_link(admin, Duration::from_secs(10)).await;
    live_traffic(relay.port(), "busy", "sensors/live", LIVE, 20).await;

    let total = (40 + CLIENTS * PER_CLIENT + LIVE) as u64;
    let got = wait_stream_count(&hub.url(), STREAM, total, Duration::from_secs(120)).await;
    assert_eq!(got, total, "every message reaches the hub");

    // Exactly once, and live messages were not stuck behind the backlog.
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(60)).await;
    let ids: HashSet<_> = msgs
        .iter()
        .map(|m| m.header("Nats-Msg-Id").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len() as u64, total, "no duplicate message ids");
    let payloads: HashSet<_> = msgs.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(payloads.len() as u64, total, "no duplicate payloads");
    // The backlog's arrival rate at the hub over the drain, by the hub's store times.
    let stored = stored_times(&hub.url()).await;
    let drained_at = stored
        .iter()
        .filter(|(_, p, _)| p.starts_with(b"backlog:"))
        .map(|(seq, _, at)| (*at, *seq))
        .max()
        .expect("backlog in the stream");
    // Live messages published while the backlog was still draining (sent at least 100 ms
    // before its last message was stored), and how many of them the hub stored only after
    // that last message: those waited behind the backlog.
    let sent_during_drain: Vec<(u64, u64)> = stored
        .iter()
        .filter_map(|(seq, p, _)| {
            let text = String::from_utf8_lossy(p);
            let sent: u64 = text
                .strip_prefix("live:busy:")?
                .split(':')
                .nth(1)?
                .parse()
                .ok()?;
            (sent + 100 < drained_at.0).then_some((*seq, sent))
        })
        .collect();
    let waited = sent_during_drain
        .iter()
        .filter(|(seq, _)| *seq > drained_at.1)
        .count();
    println!(
        "{name}: live messages sent while the backlog drained: {}, stored after its last message: {waited}",
        sent_during_drain.len()
    );

    let backlog_times: Vec<u64> = stored
        .iter()
        .filter(|(_, p, _)| p.starts_with(b"backlog:"))
        .map(|(_, _, at)| *at)
        .collect();
    // Messages per second over the drain, not counting the one second of rate the limiter
    // may have saved up (its bucket) before the drain began.
    let burst = if drain_rate.is_some() { 2000.0 } else { 0.0 };
    let rate = match (backlog_times.iter().min(), backlog_times.iter().max()) {
        (Some(a), Some(b)) if b > a => {
            ((backlog_times.len() - 1) as f64 - burst).max(0.0) / ((b - a) as f64 / 1000.0)
        }
        _ => f64::INFINITY,
    };
    let busy = live_latencies(&stored, "busy");
    println!(
        "{name}: live latency ms without backlog p50 {} p99 {}; while draining p50 {} p99 {}; backlog drained at {rate:.0} msg/s",
        percentile(&idle, 0.5),
        percentile(&idle, 0.99),
        percentile(&busy, 0.5),
        percentile(&busy, 0.99),
    );
    assert!(
        !sent_during_drain.is_empty(),
        "live traffic ran while the backlog drained"
    );
    assert!(
        waited * 10 <= sent_during_drain.len(),
        "live messages waited behind the backlog: {waited} of {}",
        sent_during_drain.len()
    );
    drop(relay);
    (idle, busy, rate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_messages_go_ahead_of_a_50k_backlog() {
    let (idle, busy, _) = backlog_scenario("live-first", None).await;
    assert!(!busy.is_empty(), "live messages observed at the hub");
    // Close to the no-backlog case: the median within half a second of it (a starved live
    // message would wait for the whole backlog, many seconds).
    assert!(
        percentile(&busy, 0.5) <= percentile(&idle, 0.5) + 500,
        "live median {} ms vs {} ms without backlog",
        percentile(&busy, 0.5),
        percentile(&idle, 0.5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_backlog_drains_under_drain_rate() {
    let (_, busy, rate) = backlog_scenario("capped", Some("2000 msg/s")).await;
    assert!(!busy.is_empty(), "live messages observed at the hub");
    assert!(
        rate <= 2000.0 * 1.05,
        "backlog drained at {rate:.0} msg/s, over the 2000 msg/s cap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_drops_exactly_the_old_records() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let cfg = RelayConfig::new("aged")
        .uplink(&url)
        .export("sensors/#")
        .outbox_lines("max_age = \"2s\"");
    let admin = cfg.admin_port;
    let relay = Relay::start(cfg).await;
    let old: Vec<Vec<u8>> = (0..100).map(|i| format!("old:{i}").into_bytes()).collect();
    publish_all_v4(
        relay.port(),
        "old",
        "sensors/a",
        old,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let new: Vec<Vec<u8>> = (0..50).map(|i| format!("new:{i}").into_bytes()).collect();
    publish_all_v4(
        relay.port(),
        "new",
        "sensors/a",
        new,
        Duration::from_secs(30),
    )
    .await;
    let s = admin_status(admin).await;
    assert_eq!(s["outbox"]["dropped_age"], 100, "{s:#}");
    assert_eq!(s["outbox"]["messages"], 50, "{s:#}");

    let _hub = NatsHub::start_on(port).await;
    wait_stream_exists(&url, STREAM, Duration::from_secs(15)).await;
    let got = wait_stream_count(&url, STREAM, 50, Duration::from_secs(30)).await;
    assert_eq!(got, 50);
    let msgs = read_stream(&url, STREAM, Duration::from_secs(10)).await;
    assert!(
        msgs.iter().all(|m| m.payload.starts_with(b"new:")),
        "only the young records reach the hub"
    );
    let metrics = admin_get(admin, "/metrics").await;
    assert!(
        metrics.contains("relaybox_outbox_dropped_total{reason=\"age\"} 100"),
        "{metrics}"
    );
}

fn sample(metrics: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    metrics
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_match_what_was_sent() {
    let hub = NatsHub::start().await;
    let cfg = RelayConfig::new("metered")
        .uplink(&hub.url())
        .export("sensors/#");
    let admin = cfg.admin_port;
    let relay = Relay::start(cfg).await;
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(10)).await;
    // One client stays connected (clean session, one subscription) through the scrape.
    let subscriber = Subscriber::start(relay.port(), "m-sub", &["local/#"]).await;
    let exported: Vec<Vec<u8>> = (0..300).map(|i| format!("e{i}").into_bytes()).collect();
    let local: Vec<Vec<u8>> = (0..200).map(|i| format!("l{i}").into_bytes()).collect();
    publish_all_v4(
        relay.port(),
        "m1",
        "sensors/x",
        exported,
        Duration::from_secs(30),
    )
    .await;
    publish_all_v4(
        relay.port(),
        "m2",
        "local/x",
        local,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        wait_stream_count(&hub.url(), STREAM, 300, Duration::from_secs(20)).await,
        300
    );
    // Acknowledged records are deleted in batches (at least every half second).
    for _ in 0..50 {
        if admin_status(admin).await["outbox"]["messages"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(subscriber.wait_for(200, Duration::from_secs(10)).await, 200);
    // The subscriber's last PUBACKs may still be on their way.
    for _ in 0..50 {
        if admin_status(admin).await["broker"]["queued_messages"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = admin_get(admin, "/metrics").await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    // The router: the subscriber's session is the only one (the publishers' clean sessions
    // ended with their connections), it got every local message, and nothing was lost.
    assert_eq!(
        sample(&scrape, "relaybox_sessions", Some(("state", "online"))),
        1.0
    );
    assert_eq!(
        sample(&scrape, "relaybox_sessions", Some(("state", "offline"))),
        0.0
    );
    assert_eq!(sample(&scrape, "relaybox_subscriptions", None), 1.0);
    assert_eq!(
        sample(&scrape, "relaybox_session_queued_messages", None),
        0.0
    );
    // At least the 500 publishes (the router's own `$SYS` messages count as well).
    assert!(sample(&scrape, "relaybox_messages_received_total", None) >= 500.0);
    assert_eq!(sample(&scrape, "relaybox_messages_sent_total", None), 200.0);
    for name in [
        "relaybox_sessions_expired_total",
        "relaybox_session_dropped_total",
        "relaybox_messages_expired_total",
        "relaybox_wills_published_total",
        "relaybox_session_store_failures_total",
    ] {
        assert_eq!(sample(&scrape, name, None), 0.0, "{name}");
    }
    assert_eq!(
        sample(
            &scrape,
            "relaybox_messages_total",
            Some(("direction", "mqtt_in"))
        ),
        500.0
    );
    assert_eq!(
        sample(
            &scrape,
            "relaybox_messages_total",
            Some(("direction", "to_hub"))
        ),
        300.0
    );
    assert_eq!(
        sample(&scrape, "relaybox_outbox_appended_total", None),
        300.0
    );
    assert_eq!(sample(&scrape, "relaybox_outbox_messages", None), 0.0);
    assert_eq!(sample(&scrape, "relaybox_uplink_connected", None), 1.0);
    // Two publishers (and the harness's readiness probe, which connects without MQTT).
    assert!(sample(&scrape, "relaybox_mqtt_connections_total", None) >= 2.0);
    assert!(sample(&scrape, "relaybox_flash_bytes_written_total", None) > 0.0);
    // The store's own figures: what it wrote, per commit, and one flush per commit.
    let commits = sample(&scrape, "relaybox_outbox_commits_total", None);
    let store_written = sample(&scrape, "relaybox_store_bytes_written_total", None);
    let flushes = sample(&scrape, "relaybox_store_flushes_total", None);
    assert!(commits >= 1.0 && store_written >= 4096.0 * commits);
    assert!(
        flushes >= commits,
        "a flush per commit: {flushes} flushes, {commits} commits"
    );
    assert!(sample(&scrape, "relaybox_store_bytes_per_commit", None) >= 4096.0);
    assert!(sample(&scrape, "relaybox_store_segments", Some(("state", "live"))) >= 1.0);
    assert!(sample(&scrape, "relaybox_uplink_puback_latency_seconds_avg", None) > 0.0);

    let json = admin_status(admin).await;
    let out = std::process::Command::new(RELAY_BIN)
        .args(["status", "--json", "--config"])
        .arg(&relay.config_path)
        .output()
        .expect("run relaybox status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    for key in ["mqtt", "outbox", "downlink"] {
        assert_eq!(
            json[key], cli[key],
            "{key} differs between /status and relaybox status"
        );
    }
    assert_eq!(
        json["uplink"]["acknowledged"],
        cli["uplink"]["acknowledged"]
    );
    assert_eq!(json["mqtt"]["publishes_in"], 500);
    assert_eq!(json["broker"]["sessions_online"], 1, "{json:#}");
    assert_eq!(json["broker"]["subscriptions"], 1, "{json:#}");
    assert_eq!(json["broker"]["messages_out"], 200, "{json:#}");
    let human = std::process::Command::new(RELAY_BIN)
        .args(["status", "--config"])
        .arg(&relay.config_path)
        .output()
        .expect("run relaybox status");
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("500 messages in"), "{human}");
    assert!(human.contains("per commit"), "{human}");
    assert!(human.contains("bytes/day at the current load"), "{human}");
    assert!(
        human.contains("hub: connected, 300 messages acknowledged"),
        "{human}"
    );
    assert!(
        human.contains("sessions: 1 online, 0 offline, 0 queued messages"),
        "{human}"
    );
    drop(subscriber);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_message_decodes_with_the_published_proto() {
    let hub = NatsHub::start().await;
    let cfg = RelayConfig::new("reporter")
        .uplink(&hub.url())
        .export("sensors/#")
        .uplink_lines("status_interval = \"1s\"");
    let client = connect(&hub.url()).await;
    let mut sub = client
        .subscribe("org.office.$relay.status")
        .await
        .expect("subscribe to status");
    client.flush().await.expect("flush");
    let relay = Relay::start(cfg).await;
    let payloads: Vec<Vec<u8>> = (0..10).map(|i| format!("p{i}").into_bytes()).collect();
    publish_all_v4(
        relay.port(),
        "s",
        "sensors/a",
        payloads,
        Duration::from_secs(20),
    )
    .await;

    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/src/proto/relaybox.proto");
    let files = protox::compile([proto], [concat!(env!("CARGO_MANIFEST_DIR"), "/src/proto")])
        .expect("the published .proto compiles");
    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(files).expect("descriptors");
    let desc = pool
        .get_message_by_name("relaybox.v1.RelayStatus")
        .expect("RelayStatus in the .proto");
    // The first reports may come before the publishes; wait for one that counts them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .expect("a status message with the publishes counted within 15 s")
            .expect("subscription open");
        let status = prost_reflect::DynamicMessage::decode(desc.clone(), msg.payload.as_ref())
            .expect("status decodes with the published .proto");
        let field = |n: &str| status.get_field_by_name(n).expect(n).into_owned();
        assert_eq!(field("relay").as_str(), Some("reporter"));
        assert!(field("uptime_s").as_u64().is_some());
        if field("messages_in").as_u64() == Some(10) {
            assert_eq!(field("messages_to_hub").as_u64(), Some(10));
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_files_shrink_to_the_reserve_after_a_drained_backlog() {
    let mut hub = NatsHub::start().await;
    let cfg = RelayConfig::new("shrinking")
        .uplink(&hub.url())
        .export("sensors/#")
        .outbox_lines("segment_bytes = 262144")
        .mqtt("max_packet_size = 65536");
    let admin = cfg.admin_port;
    let relay = Relay::start(cfg).await;
    wait_stream_exists(&hub.url(), STREAM, Duration::from_secs(10)).await;
    hub.stop().await;
    let payloads: Vec<Vec<u8>> = (0..5_000)
        .map(|i| format!("{i:01024}").into_bytes())
        .collect();
    publish_all_v4(
        relay.port(),
        "big",
        "sensors/big",
        payloads,
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let peak = admin_status(admin).await["outbox"]["file_bytes"]
        .as_u64()
        .unwrap();
    assert!(peak > 5_000_000, "the backlog takes room: {peak} bytes");
    hub.restart().await;
    assert_eq!(
        wait_stream_count(&hub.url(), STREAM, 5_000, Duration::from_secs(60)).await,
        5_000
    );
    let mut after = peak;
    // Spares beyond the reserve go once the outbox has been empty, and nothing took them, for
    // a minute.
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = admin_status(admin).await;
        after = s["outbox"]["file_bytes"].as_u64().unwrap();
        if after <= 2 * 262_144 {
            break;
        }
    }
    let s = admin_status(admin).await;
    println!(
        "store files: {peak} bytes with the backlog, {after} bytes after it drained \
         ({} segments recycled)",
        s["outbox"]["recycled"]
    );
    // The live segment and one spare: no compaction, the dead segments were let go.
    assert_eq!(
        after,
        2 * 262_144,
        "files stayed at {after} of their peak {peak} bytes"
    );
    assert!(s["outbox"]["recycled"].as_u64().unwrap() >= 15);
}

/// The admin endpoint is plain HTTP/1.1 for any client: several requests on one kept-alive
/// connection, 404 for an unknown path, 405 for another method, and a client that sends
/// nothing does not hold up the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_speaks_http_1_1() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = RelayConfig::new("adm");
    let admin = cfg.admin_port;
    let _relay = Relay::start(cfg).await;
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", admin))
        .await
        .expect("connect");

    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", admin))
        .await
        .expect("connect");
    // Reads one response (its head, then a body of its Content-Length).
    async fn response(conn: &mut tokio::net::TcpStream) -> (String, String) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..at]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .expect("a Content-Length");
                if got.len() >= at + 4 + len {
                    let body = String::from_utf8_lossy(&got[at + 4..at + 4 + len]).into_owned();
                    return (head, body);
                }
            }
            let n = tokio::time::timeout_at(deadline, conn.read(&mut buf))
                .await
                .expect("an answer in time")
                .expect("read");
            assert!(n > 0, "the connection closed early");
            got.extend_from_slice(&buf[..n]);
        }
    }
    for (request, status, needle) in [
        ("GET /status", "200", "\"relay\": \"adm\""),
        ("GET /metrics", "200", "relaybox_outbox"),
        (
            "GET /nothing",
            "404",
            "not here: try /, /status or /metrics",
        ),
        ("POST /metrics", "405", ""),
    ] {
        conn.write_all(
            format!("{request} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
        let (head, body) = response(&mut conn).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{request}: {head}"
        );
        assert!(body.contains(needle), "{request}: {body}");
    }
}
