//! The router's clock and its `$SYS` statistics.
//!
//! [`run`] calls [`Router::tick`] every second (delayed wills, session expiry) and beats its
//! heartbeat, and every `interval` publishes broker statistics as retained QoS 0 messages under
//! `$SYS/broker/`, named as Mosquitto 2.0 names them, so that tools made for Mosquitto read
//! them. A value is published when it changed since it was last published (the first round
//! publishes all of them). `$SYS` topics start with `$`, so a `#` or `+/...` subscription never
//! receives them [MQTT-4.7.2-1]; a client subscribes to `$SYS/#` for them.
//!
//! The counters come from [`RouterStats`](super::router::RouterStats); the messages and bytes
//! this task publishes itself are left out of `messages/received` and `bytes/received`. The
//! `load/.../1min`, `5min` and `15min` values are per-minute rates averaged exponentially over
//! those spans, as Mosquitto computes them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::message::{Message, Origin, Properties};
use super::router::Router;
use crate::liveness::Heartbeat;

/// How often the router's timers are looked at.
const TICK_EVERY: Duration = Duration::from_secs(1);

const PREFIX: &str = "$SYS/broker/";

/// Spans of the load averages, in seconds, with their topic suffix.
const LOAD_SPANS: [(f64, &str); 3] = [(60.0, "1min"), (300.0, "5min"), (900.0, "15min")];

/// Runs the router's timers and publishes statistics every `interval` (zero: never) until
/// `shutdown` is cancelled.
pub async fn run(
    router: Router,
    interval: Duration,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(TICK_EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut rounds = (!interval.is_zero()).then(|| {
        let mut i = tokio::time::interval(interval);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    });
    let mut sys = Sys::default();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {
                heartbeat.beat();
                router.tick(Instant::now()).await;
            }
            _ = next_round(&mut rounds) => {
                heartbeat.beat();
                sys.publish(&router, Instant::now()).await;
            }
        }
    }
}

async fn next_round(rounds: &mut Option<Interval>) {
    match rounds {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One counter's load averages.
#[derive(Debug, Default)]
struct Load {
    previous: u64,
    averages: [f64; 3],
}

impl Load {
    /// Takes the counter's value `now_value`, `elapsed` seconds after the last one.
    fn update(&mut self, now_value: u64, elapsed: f64) {
        let per_minute = now_value.saturating_sub(self.previous) as f64 * 60.0 / elapsed;
        self.previous = now_value;
        for (avg, (span, _)) in self.averages.iter_mut().zip(LOAD_SPANS) {
            let decay = (-elapsed / span).exp();
            *avg = per_minute + decay * (*avg - per_minute);
        }
    }
}

/// What the statistics task remembers between rounds.
#[derive(Debug, Default)]
struct Sys {
    /// The value last published on each topic.
    published: HashMap<String, String>,
    /// Messages and payload bytes this task published (left out of the received counts).
    own_messages: u64,
    own_bytes: u64,
    last_round: Option<Instant>,
    loads: HashMap<&'static str, Load>,
}

impl Sys {
    /// The statistics at `now`: (topic below `$SYS/broker/`, value).
    fn values(&mut self, router: &Router, now: Instant) -> Vec<(String, String)> {
        let s = router.stats();
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let online = get(&s.sessions_online);
        let offline = get(&s.sessions_offline);
        let received = get(&s.messages_in).saturating_sub(self.own_messages);
        let bytes_received = get(&s.bytes_in).saturating_sub(self.own_bytes);
        let sent = get(&s.messages_out);
        let bytes_sent = get(&s.bytes_out);
        let dropped = get(&s.dropped);
        let mut out: Vec<(String, String)> = [
            ("version", format!("relaybox {}", env!("CARGO_PKG_VERSION"))),
            (
                "uptime",
                format!(
                    "{} seconds",
                    now.saturating_duration_since(router.started()).as_secs()
                ),
            ),
            ("clients/connected", online.to_string()),
            ("clients/disconnected", offline.to_string()),
            ("clients/total", (online + offline).to_string()),
            ("clients/maximum", get(&s.connected_max).to_string()),
            ("clients/expired", get(&s.sessions_expired).to_string()),
            ("messages/received", received.to_string()),
            ("messages/sent", sent.to_string()),
            ("publish/messages/dropped", dropped.to_string()),
            ("subscriptions/count", get(&s.subscriptions).to_string()),
            ("retained messages/count", get(&s.retained).to_string()),
            ("store/messages/count", get(&s.queued_messages).to_string()),
            ("store/messages/bytes", get(&s.queued_bytes).to_string()),
            ("bytes/received", bytes_received.to_string()),
            ("bytes/sent", bytes_sent.to_string()),
        ]
        .into_iter()
        .map(|(t, v)| (t.to_owned(), v))
        .collect();
        // Rates since the last round (the first one: since the router started).
        let since = self.last_round.unwrap_or_else(|| router.started());
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        if elapsed >= 0.001 {
            self.last_round = Some(now);
            for (name, value) in [
                ("messages/received", received),
                ("messages/sent", sent),
                ("bytes/received", bytes_received),
                ("bytes/sent", bytes_sent),
                ("publish/dropped", dropped),
            ] {
                let load = self.loads.entry(name).or_default();
                load.update(value, elapsed);
                for (avg, (_, span)) in load.averages.iter().zip(LOAD_SPANS) {
                    out.push((format!("load/{name}/{span}"), format!("{avg:.2}")));
                }
            }
        }
        out
    }

    /// Publishes the values that changed.
    async fn publish(&mut self, router: &Router, now: Instant) {
        for (name, value) in self.values(router, now) {
            let topic = format!("{PREFIX}{name}");
            if self.published.get(&topic) == Some(&value) {
                continue;
            }
            self.own_messages += 1;
            self.own_bytes += value.len() as u64;
            let msg = Message::new(
                Arc::from(topic.as_str()),
                Bytes::from(value.clone()),
                0,
                true,
                Properties::default(),
                Origin::Internal,
            );
            // QoS 0: nothing is kept in the store for it.
            drop(router.publish(msg).await);
            self.published.insert(topic, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::router::{Connected, Ending, RouterSettings};
    use crate::broker::topic::Filter;
    use crate::broker::tree::SubOptions;

    async fn session(router: &Router, client: &str, filter: &str) -> Connected {
        let c = router.connect(client, true, 0).await.expect("connect");
        router
            .subscribe(
                &c.handle,
                &[(
                    Filter::parse(filter).expect("filter"),
                    SubOptions::default(),
                )],
            )
            .await
            .expect("subscribe");
        c
    }

    /// Takes deliveries until `want` is true of what arrived so far: topic → last payload.
    async fn collect(
        c: &Connected,
        mut want: impl FnMut(&HashMap<String, String>) -> bool,
    ) -> HashMap<String, String> {
        let mut seen = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut out = Vec::new();
            c.handle.take(usize::MAX, &mut out);
            for d in out {
                let payload = String::from_utf8_lossy(&d.msg.payload).into_owned();
                seen.insert(d.msg.topic.to_string(), payload);
            }
            if want(&seen) {
                return seen;
            }
            tokio::time::timeout_at(deadline, c.handle.notified())
                .await
                .expect("statistics in time");
        }
    }

    #[tokio::test]
    async fn statistics_reach_sys_subscribers_only() {
        let router = Router::new(RouterSettings::default(), None);
        let watcher = session(&router, "watcher", "$SYS/#").await;
        let all = session(&router, "all", "#").await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            router.clone(),
            Duration::from_millis(50),
            Heartbeat::unwatched("router"),
            shutdown.clone(),
        ));
        let seen = collect(&watcher, |s| {
            s.contains_key("$SYS/broker/version") && s.contains_key("$SYS/broker/clients/connected")
        })
        .await;
        assert_eq!(
            seen["$SYS/broker/version"],
            format!("relaybox {}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(seen["$SYS/broker/clients/connected"], "2");
        assert_eq!(seen["$SYS/broker/subscriptions/count"], "2");
        assert_eq!(
            seen["$SYS/broker/messages/received"], "0",
            "its own are left out"
        );
        assert!(seen["$SYS/broker/uptime"].ends_with(" seconds"));
        assert!(seen.contains_key("$SYS/broker/load/messages/received/1min"));
        assert_eq!(all.handle.pending(), 0, "'#' does not match $SYS topics");

        // A message of someone else's counts, and '#' receives it.
        router
            .publish(Message::new(
                Arc::from("plain"),
                Bytes::from_static(b"x"),
                0,
                false,
                Properties::default(),
                Origin::Internal,
            ))
            .await;
        collect(&watcher, |s| {
            s.get("$SYS/broker/messages/received").map(String::as_str) == Some("1")
        })
        .await;
        let mut out = Vec::new();
        all.handle.take(usize::MAX, &mut out);
        assert_eq!(
            out.iter().map(|d| &*d.msg.topic).collect::<Vec<_>>(),
            ["plain"]
        );

        // They are retained: a later subscriber gets them at once.
        let late = router.connect("late", true, 0).await.expect("connect");
        let got = router
            .subscribe(
                &late.handle,
                &[(
                    Filter::parse("$SYS/broker/version").expect("filter"),
                    SubOptions::default(),
                )],
            )
            .await
            .expect("subscribe");
        assert_eq!(got.retained.len(), 1);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends on shutdown")
            .expect("join");
    }

    #[tokio::test]
    async fn the_clock_expires_sessions_and_beats() {
        let router = Router::new(RouterSettings::default(), None);
        let c = router.connect("c", true, 1).await.expect("connect");
        router
            .disconnect(
                &c.handle,
                c.generation,
                Ending::Normal,
                None,
                None,
                Vec::new(),
            )
            .await;
        assert_eq!(router.sessions(), 1);
        let liveness = crate::liveness::Liveness::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            router.clone(),
            Duration::ZERO,
            liveness.heartbeat("router"),
            shutdown.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while router.sessions() > 0 {
            assert!(Instant::now() < deadline, "the session did not expire");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(liveness
            .stalled(Instant::now(), Duration::from_secs(2))
            .is_empty());
        assert_eq!(
            router.stats().retained.load(Ordering::Relaxed),
            0,
            "no statistics"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends on shutdown")
            .expect("join");
    }

    #[test]
    fn a_steady_rate_shows_as_its_per_minute_load() {
        let mut load = Load::default();
        for i in 1..=20_000u64 {
            load.update(i * 10, 1.0);
        }
        for avg in load.averages {
            assert!((avg - 600.0).abs() < 0.5, "{avg}");
        }
    }
}
