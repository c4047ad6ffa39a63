//! Checks the test harness itself against a real nats-server: a hub can be stopped and started
//! again on the same port and store, and a stream reads back complete with its headers.

mod common;

use std::time::Duration;

use common::{read_stream, stop_counters, wait_stream_count, NatsHub, PREFIX, STREAM};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restart_keeps_stream_and_reads_back_headers() {
    let mut hub = NatsHub::start().await;
    hub.create_stream().await;
    let js = hub.jetstream().await;
    for i in 0..200u32 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("h-1-{i}").as_str());
        js.publish_with_headers(format!("{PREFIX}.sensors.h"), headers, i.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("puback");
    }
    hub.stop().await;
    hub.restart().await;
    assert_eq!(
        wait_stream_count(&hub.url(), STREAM, 200, Duration::from_secs(10)).await,
        200
    );
    let msgs = read_stream(&hub.url(), STREAM, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 200);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.subject, format!("{PREFIX}.sensors.h"));
        assert_eq!(m.payload_str(), i.to_string());
        assert_eq!(m.header("Nats-Msg-Id"), Some(format!("h-1-{i}").as_str()));
        assert_eq!(m.seq, i as u64 + 1);
    }
}

#[test]
fn stop_line_parses_plain_and_coloured() {
    let plain = "2025-01-01T00:00:00Z  INFO relaybox::app: relaybox stopped appended=12 \
                 dropped=3 refused=0\n";
    let want = common::StopCounters {
        appended: 12,
        dropped: 3,
        refused: 0,
    };
    assert_eq!(stop_counters(plain), Some(want));
    let coloured = "\u{1b}[32m INFO\u{1b}[0m \u{1b}[2mrelaybox\u{1b}[0m\u{1b}[2m:\u{1b}[0m \
                    relaybox stopped \u{1b}[3mappended\u{1b}[0m\u{1b}[2m=\u{1b}[0m12 \
                    \u{1b}[3mdropped\u{1b}[0m\u{1b}[2m=\u{1b}[0m3 \
                    \u{1b}[3mrefused\u{1b}[0m\u{1b}[2m=\u{1b}[0m0\n";
    assert_eq!(stop_counters(coloured), Some(want));
    assert_eq!(stop_counters("relaybox started\n"), None);
}
