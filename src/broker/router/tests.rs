//! Tests of the router: routing rules, retained messages, sessions, wills, bounds, and
//! persistent sessions kept in a real store across a restart.

use super::*;
use crate::broker::message::Properties;
use crate::config::OutboxConfig;
use bytes::Bytes;

fn message(topic: &str, payload: &str, qos: u8, retain: bool, origin: Origin) -> Message {
    Message::new(
        Arc::from(topic),
        Bytes::copy_from_slice(payload.as_bytes()),
        qos,
        retain,
        Properties::default(),
        origin,
    )
}

fn msg(topic: &str, payload: &str, qos: u8) -> Message {
    message(topic, payload, qos, false, Origin::Internal)
}

fn retained(topic: &str, payload: &str) -> Message {
    message(topic, payload, 1, true, Origin::Internal)
}

fn opts(qos: u8) -> SubOptions {
    SubOptions {
        qos,
        ..Default::default()
    }
}

fn filter(s: &str) -> Filter {
    Filter::parse(s).expect("filter")
}

fn router() -> Router {
    Router::new(RouterSettings::default(), None)
}

async fn connect(router: &Router, client: &str, clean_start: bool, expiry: u32) -> Connected {
    router
        .connect(client, clean_start, expiry)
        .await
        .expect("connect")
}

/// Subscribes and returns the retained messages the subscription brought.
async fn subscribe(router: &Router, h: &SessionHandle, f: &str, o: SubOptions) -> Vec<Delivery> {
    let s = router
        .subscribe(h, &[(filter(f), o)])
        .await
        .expect("subscribe");
    for t in s.tickets {
        t.durable().await.expect("durable subscription");
    }
    s.retained
}

async fn publish(router: &Router, m: Message) {
    for t in router.publish(m).await {
        t.durable().await.expect("durable delivery");
    }
}

fn drain(h: &SessionHandle) -> Vec<Delivery> {
    let mut out = Vec::new();
    h.take(usize::MAX, &mut out);
    out
}

fn payloads(ds: &[Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8_lossy(&d.msg.payload).into_owned())
        .collect()
}

async fn end(router: &Router, c: &Connected, ending: Ending) {
    router
        .disconnect(&c.handle, c.generation, ending, None, None, Vec::new())
        .await;
}

#[tokio::test]
async fn a_message_fans_out_to_every_matching_session() {
    let r = router();
    let a = connect(&r, "a", true, 0).await;
    let b = connect(&r, "b", true, 0).await;
    let c = connect(&r, "c", true, 0).await;
    let d = connect(&r, "d", true, 0).await;
    subscribe(&r, &a.handle, "s/+", opts(0)).await;
    subscribe(&r, &b.handle, "s/x", opts(0)).await;
    subscribe(&r, &c.handle, "#", opts(0)).await;
    subscribe(&r, &d.handle, "other/x", opts(0)).await;
    publish(&r, msg("s/x", "hello", 0)).await;
    let mut shared: Option<Arc<Message>> = None;
    for h in [&a.handle, &b.handle, &c.handle] {
        let got = drain(h);
        assert_eq!(payloads(&got), ["hello"], "{}", h.client_id);
        let first = shared.get_or_insert_with(|| got[0].msg.clone());
        assert!(Arc::ptr_eq(first, &got[0].msg), "one message, shared");
    }
    assert!(drain(&d.handle).is_empty());
    assert_eq!(r.stats().messages_in.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn the_delivered_qos_is_the_lower_of_published_and_subscribed() {
    let r = router();
    let low = connect(&r, "low", true, 0).await;
    let high = connect(&r, "high", true, 0).await;
    subscribe(&r, &low.handle, "t", opts(1)).await;
    subscribe(&r, &high.handle, "t", opts(2)).await;
    publish(&r, msg("t", "q2", 2)).await;
    publish(&r, msg("t", "q0", 0)).await;
    let qos = |h: &SessionHandle| drain(h).iter().map(|d| d.qos).collect::<Vec<_>>();
    assert_eq!(qos(&low.handle), [1, 0]);
    assert_eq!(qos(&high.handle), [2, 0]);
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_delivery_with_the_highest_qos_and_every_id() {
    let r = router();
    let s = connect(&r, "s", true, 0).await;
    let with_id = |qos, id| SubOptions {
        qos,
        id: Some(id),
        ..Default::default()
    };
    subscribe(&r, &s.handle, "a/#", with_id(0, 7)).await;
    subscribe(&r, &s.handle, "a/+", with_id(2, 9)).await;
    subscribe(&r, &s.handle, "a/b", opts(1)).await;
    publish(&r, msg("a/b", "x", 2)).await;
    let got = drain(&s.handle);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, 2);
    let mut ids = got[0].sub_ids.clone();
    ids.sort_unstable();
    assert_eq!(ids, [7, 9]);
}

#[tokio::test]
async fn no_local_keeps_a_sessions_own_messages_from_it() {
    let r = router();
    let me = connect(&r, "me", true, 0).await;
    let plain = connect(&r, "plain", true, 0).await;
    let no_local = SubOptions {
        no_local: true,
        ..Default::default()
    };
    subscribe(&r, &me.handle, "t", no_local).await;
    subscribe(&r, &plain.handle, "t", opts(0)).await;
    publish(
        &r,
        message("t", "mine", 0, false, Origin::Client(me.handle.id)),
    )
    .await;
    publish(
        &r,
        message("t", "theirs", 0, false, Origin::Client(plain.handle.id)),
    )
    .await;
    publish(&r, message("t", "hub", 0, false, Origin::Hub)).await;
    assert_eq!(payloads(&drain(&me.handle)), ["theirs", "hub"]);
    // Without No Local, a session gets its own messages.
    assert_eq!(payloads(&drain(&plain.handle)), ["mine", "theirs", "hub"]);
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_on_live_messages() {
    let r = router();
    let rap = connect(&r, "rap", true, 0).await;
    let plain = connect(&r, "plain", true, 0).await;
    let o = SubOptions {
        retain_as_published: true,
        ..Default::default()
    };
    subscribe(&r, &rap.handle, "t", o).await;
    subscribe(&r, &plain.handle, "t", opts(0)).await;
    publish(&r, retained("t", "r")).await;
    publish(&r, msg("t", "n", 0)).await;
    let flags = |h: &SessionHandle| drain(h).iter().map(|d| d.retain).collect::<Vec<_>>();
    assert_eq!(flags(&rap.handle), [true, false]);
    assert_eq!(flags(&plain.handle), [false, false]);
}

#[tokio::test]
async fn retained_messages_follow_retain_handling_and_skip_shared_subscriptions() {
    let r = router();
    publish(&r, retained("a/b", "kept")).await;
    publish(&r, retained("a/c", "kept too")).await;
    assert_eq!(r.stats().retained.load(Ordering::Relaxed), 2);
    let s = connect(&r, "s", true, 0).await;
    let rh = |retain_handling| SubOptions {
        qos: 0,
        retain_handling,
        ..Default::default()
    };
    // 0: on every subscribe, with the retain flag and the subscription's QoS at most.
    let got = subscribe(&r, &s.handle, "a/b", rh(0)).await;
    assert_eq!(payloads(&got), ["kept"]);
    assert!(got[0].retain);
    assert_eq!(got[0].qos, 0);
    assert_eq!(subscribe(&r, &s.handle, "a/b", rh(0)).await.len(), 1);
    // 1: only for a new subscription.
    let mut got = payloads(&subscribe(&r, &s.handle, "a/+", rh(1)).await);
    got.sort();
    assert_eq!(got, ["kept", "kept too"]);
    assert!(subscribe(&r, &s.handle, "a/+", rh(1)).await.is_empty());
    // 2: never.
    assert!(subscribe(&r, &s.handle, "a/#", rh(2)).await.is_empty());
    // Never for a shared subscription.
    assert!(subscribe(&r, &s.handle, "$share/g/a/b", rh(0))
        .await
        .is_empty());
    // Retained messages are handed back by subscribe, not queued.
    assert!(drain(&s.handle).is_empty());
}

#[tokio::test]
async fn an_empty_retained_payload_clears_and_an_empty_plain_one_does_not() {
    let r = router();
    publish(&r, retained("t", "x")).await;
    publish(&r, message("t", "", 0, false, Origin::Internal)).await;
    let s = connect(&r, "s", true, 0).await;
    assert_eq!(
        payloads(&subscribe(&r, &s.handle, "t", opts(0)).await),
        ["x"]
    );
    assert_eq!(r.stats().retained.load(Ordering::Relaxed), 1);
    publish(&r, message("t", "", 0, true, Origin::Internal)).await;
    assert_eq!(r.stats().retained.load(Ordering::Relaxed), 0);
    let t = connect(&r, "t", true, 0).await;
    assert!(subscribe(&r, &t.handle, "t", opts(0)).await.is_empty());
}

#[tokio::test]
async fn a_shared_subscription_gives_each_message_to_one_member() {
    let r = router();
    let m1 = connect(&r, "m1", true, 0).await;
    let m2 = connect(&r, "m2", true, 0).await;
    let all = connect(&r, "all", true, 0).await;
    subscribe(&r, &m1.handle, "$share/g/jobs/+", opts(1)).await;
    subscribe(&r, &m2.handle, "$share/g/jobs/+", opts(1)).await;
    subscribe(&r, &all.handle, "jobs/#", opts(1)).await;
    for i in 0..10 {
        publish(&r, msg("jobs/x", &i.to_string(), 1)).await;
    }
    let (a, b) = (drain(&m1.handle), drain(&m2.handle));
    assert_eq!(a.len() + b.len(), 10);
    assert_eq!((a.len(), b.len()), (5, 5), "round-robin");
    let mut seen: Vec<String> = payloads(&a).into_iter().chain(payloads(&b)).collect();
    seen.sort_by_key(|p| p.parse::<u32>().unwrap_or(u32::MAX));
    let expected: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected);
    assert_eq!(drain(&all.handle).len(), 10);
}

#[tokio::test]
async fn a_session_with_expiry_zero_ends_at_disconnect() {
    let r = router();
    let c = connect(&r, "c", true, 0).await;
    assert!(!c.present);
    subscribe(&r, &c.handle, "t", opts(1)).await;
    end(&r, &c, Ending::Normal).await;
    assert_eq!(r.sessions(), 0);
    assert_eq!(r.stats().subscriptions.load(Ordering::Relaxed), 0);
    assert_eq!(r.stats().sessions_online.load(Ordering::Relaxed), 0);
    let again = connect(&r, "c", false, 0).await;
    assert!(!again.present);
    publish(&r, msg("t", "x", 1)).await;
    assert!(drain(&again.handle).is_empty());
}

#[tokio::test]
async fn a_persistent_session_keeps_subscriptions_and_queues_while_offline() {
    let r = router();
    let c = connect(&r, "c", true, 60).await;
    subscribe(&r, &c.handle, "t/#", opts(1)).await;
    end(&r, &c, Ending::Normal).await;
    assert_eq!(r.sessions(), 1);
    assert_eq!(r.stats().sessions_offline.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats().sessions_online.load(Ordering::Relaxed), 0);
    publish(&r, msg("t/1", "one", 1)).await;
    publish(&r, msg("t/2", "two", 2)).await;
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 2);
    let again = connect(&r, "c", false, 60).await;
    assert!(again.present);
    assert!(Arc::ptr_eq(&again.handle, &c.handle));
    assert_eq!(again.generation, c.generation + 1);
    let got = drain(&again.handle);
    assert_eq!(payloads(&got), ["one", "two"]);
    assert_eq!(got.iter().map(|d| d.qos).collect::<Vec<_>>(), [1, 1]);
    assert_eq!(r.stats().sessions_online.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats().sessions_offline.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_persistent_session_expires_on_tick() {
    let r = router();
    let c = connect(&r, "c", true, 5).await;
    subscribe(&r, &c.handle, "t", opts(1)).await;
    end(&r, &c, Ending::Normal).await;
    r.tick(Instant::now()).await;
    assert_eq!(r.sessions(), 1);
    r.tick(Instant::now() + Duration::from_secs(6)).await;
    assert_eq!(r.sessions(), 0);
    assert_eq!(r.stats().sessions_expired.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats().subscriptions.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn clean_start_drops_an_old_session() {
    let r = router();
    let c = connect(&r, "c", true, 60).await;
    subscribe(&r, &c.handle, "t", opts(1)).await;
    end(&r, &c, Ending::Normal).await;
    publish(&r, msg("t", "old", 1)).await;
    let fresh = connect(&r, "c", true, 60).await;
    assert!(!fresh.present);
    assert!(!Arc::ptr_eq(&fresh.handle, &c.handle));
    assert_eq!(r.sessions(), 1);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 0);
    assert_eq!(r.stats().subscriptions.load(Ordering::Relaxed), 0);
    publish(&r, msg("t", "new", 1)).await;
    assert!(drain(&fresh.handle).is_empty());
}

#[tokio::test]
async fn a_take_over_ends_the_old_connection_but_not_the_session() {
    let r = router();
    let first = connect(&r, "c", true, 60).await;
    subscribe(&r, &first.handle, "t", opts(1)).await;
    let (_permit, taken) = first
        .handle
        .acquire(Duration::from_secs(1))
        .await
        .expect("slot");
    assert!(!first.handle.taken_over(taken));
    let second = connect(&r, "c", false, 60).await;
    assert!(second.present);
    assert!(
        first.handle.taken_over(taken),
        "the serving connection is told to let go"
    );
    tokio::time::timeout(Duration::from_secs(1), first.handle.until_taken_over(taken))
        .await
        .expect("the wait for a take-over ends");
    // The old connection ends late, handing back what it sent without acknowledgement.
    publish(&r, msg("t", "unacked", 1)).await;
    let unacked = drain(&first.handle);
    r.disconnect(
        &first.handle,
        first.generation,
        Ending::Normal,
        None,
        None,
        unacked,
    )
    .await;
    assert_eq!(r.sessions(), 1);
    assert_eq!(r.stats().sessions_online.load(Ordering::Relaxed), 1);
    assert_eq!(payloads(&drain(&second.handle)), ["unacked"]);
    publish(&r, msg("t", "live", 1)).await;
    assert_eq!(payloads(&drain(&second.handle)), ["live"]);
}

fn will(payload: &str) -> Message {
    message("will/c", payload, 1, false, Origin::Internal)
}

#[tokio::test]
async fn the_will_is_published_when_the_connection_ends_with_it_only() {
    let r = router();
    let w = connect(&r, "watcher", true, 0).await;
    subscribe(&r, &w.handle, "will/#", opts(1)).await;
    let c = connect(&r, "c", true, 0).await;
    r.disconnect(
        &c.handle,
        c.generation,
        Ending::Normal,
        None,
        Some((will("normal"), 0)),
        Vec::new(),
    )
    .await;
    let c = connect(&r, "c", true, 0).await;
    r.disconnect(
        &c.handle,
        c.generation,
        Ending::WithWill,
        None,
        Some((will("broken"), 0)),
        Vec::new(),
    )
    .await;
    assert_eq!(payloads(&drain(&w.handle)), ["broken"]);
    assert_eq!(r.stats().wills_published.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_will_delay_holds_the_will_and_a_reconnect_cancels_it() {
    let r = router();
    let w = connect(&r, "watcher", true, 0).await;
    subscribe(&r, &w.handle, "will/#", opts(1)).await;

    let c = connect(&r, "c", true, 60).await;
    let t0 = Instant::now();
    r.disconnect(
        &c.handle,
        c.generation,
        Ending::WithWill,
        None,
        Some((will("late"), 10)),
        Vec::new(),
    )
    .await;
    r.tick(t0).await;
    r.tick(t0 + Duration::from_secs(5)).await;
    assert!(drain(&w.handle).is_empty(), "not before the delay");
    r.tick(t0 + Duration::from_secs(11)).await;
    assert_eq!(payloads(&drain(&w.handle)), ["late"]);

    let c = connect(&r, "c", false, 60).await;
    let t0 = Instant::now();
    r.disconnect(
        &c.handle,
        c.generation,
        Ending::WithWill,
        None,
        Some((will("cancelled"), 10)),
        Vec::new(),
    )
    .await;
    let back = connect(&r, "c", false, 60).await;
    assert!(back.present);
    r.tick(t0 + Duration::from_secs(11)).await;
    assert!(drain(&w.handle).is_empty(), "a reconnect cancels the will");

    // The will delay is capped by the session's expiry.
    end(&r, &back, Ending::Normal).await;
    let c = connect(&r, "c", true, 3).await;
    let t0 = Instant::now();
    r.disconnect(
        &c.handle,
        c.generation,
        Ending::WithWill,
        None,
        Some((will("capped"), 100)),
        Vec::new(),
    )
    .await;
    r.tick(t0 + Duration::from_secs(4)).await;
    assert_eq!(payloads(&drain(&w.handle)), ["capped"]);
    assert_eq!(r.sessions(), 1, "the session expired with it");
}

#[tokio::test]
async fn a_connection_taken_over_leaves_no_delayed_will_behind() {
    let r = router();
    let w = connect(&r, "watcher", true, 0).await;
    subscribe(&r, &w.handle, "will/#", opts(1)).await;
    let old = connect(&r, "c", true, 60).await;
    let new = connect(&r, "c", false, 60).await;
    // The old connection ends after the new one resumed the session.
    let t0 = Instant::now();
    r.disconnect(
        &old.handle,
        old.generation,
        Ending::WithWill,
        None,
        Some((will("stale"), 10)),
        Vec::new(),
    )
    .await;
    r.tick(t0 + Duration::from_secs(11)).await;
    assert!(drain(&w.handle).is_empty(), "the session is online again");
    assert!(new.present);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let r = Router::new(
        RouterSettings {
            max_queued_messages: 3,
            ..Default::default()
        },
        None,
    );
    let s = connect(&r, "s", true, 0).await;
    subscribe(&r, &s.handle, "t", opts(1)).await;
    for i in 0..5 {
        publish(&r, msg("t", &i.to_string(), 1)).await;
    }
    assert_eq!(s.handle.pending(), 3);
    assert_eq!(r.stats().dropped.load(Ordering::Relaxed), 2);
    assert_eq!(payloads(&drain(&s.handle)), ["0", "1", "2"]);
    // Room again once taken.
    publish(&r, msg("t", "5", 1)).await;
    assert_eq!(payloads(&drain(&s.handle)), ["5"]);

    let bytes = Router::new(
        RouterSettings {
            max_queued_bytes: 200,
            ..Default::default()
        },
        None,
    );
    let s = connect(&bytes, "s", true, 0).await;
    subscribe(&bytes, &s.handle, "t", opts(0)).await;
    publish(&bytes, msg("t", &"x".repeat(100), 0)).await;
    publish(&bytes, msg("t", &"y".repeat(100), 0)).await;
    assert_eq!(s.handle.pending(), 1);
    assert_eq!(bytes.stats().dropped.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn expired_messages_are_dropped_when_taken() {
    let r = router();
    let s = connect(&r, "s", true, 0).await;
    subscribe(&r, &s.handle, "t", opts(1)).await;
    let mut old = msg("t", "old", 1);
    old.props.expiry = Some(1);
    old.received = Instant::now()
        .checked_sub(Duration::from_secs(2))
        .unwrap_or_else(Instant::now);
    publish(&r, old).await;
    let mut fresh = msg("t", "fresh", 1);
    fresh.props.expiry = Some(60);
    publish(&r, fresh).await;
    assert_eq!(s.handle.pending(), 2);
    assert_eq!(payloads(&drain(&s.handle)), ["fresh"]);
    assert_eq!(r.stats().expired.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn take_counts_only_what_it_took() {
    let r = router();
    let s = connect(&r, "s", true, 0).await;
    subscribe(&r, &s.handle, "t", opts(1)).await;
    for i in 0..4 {
        publish(&r, msg("t", &i.to_string(), 1)).await;
    }
    let mut out = Vec::new();
    s.handle.take(2, &mut out);
    assert_eq!(payloads(&out), ["0", "1"]);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 2);
    // Into a window that already holds deliveries.
    s.handle.take(3, &mut out);
    assert_eq!(payloads(&out), ["0", "1", "2"]);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 1);
    s.handle.put_back(out);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 4);
    assert_eq!(payloads(&drain(&s.handle)), ["0", "1", "2", "3"]);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 0);
    assert_eq!(r.stats().queued_bytes.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn queued_bytes_are_counted_in_the_stats() {
    let r = router();
    let s = connect(&r, "s", true, 60).await;
    subscribe(&r, &s.handle, "t", opts(1)).await;
    publish(&r, msg("t", "abc", 1)).await;
    let one = msg("t", "abc", 1).size() as u64;
    assert_eq!(r.stats().queued_bytes.load(Ordering::Relaxed), one);
    publish(&r, msg("t", "abc", 1)).await;
    assert_eq!(r.stats().queued_bytes.load(Ordering::Relaxed), 2 * one);
    let mut out = Vec::new();
    s.handle.take(1, &mut out);
    assert_eq!(r.stats().queued_bytes.load(Ordering::Relaxed), one);
    s.handle.put_back(out);
    assert_eq!(r.stats().queued_bytes.load(Ordering::Relaxed), 2 * one);
    // A clean start ends the session with its queue.
    connect(&r, "s", true, 0).await;
    assert_eq!(r.stats().queued_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 0);
}

/// A store in `dir` with its committer on a thread.
struct Opened {
    store: Store,
    committer: std::thread::JoinHandle<()>,
}

fn open_store(dir: &std::path::Path) -> Opened {
    let (store, committer) = Store::open(dir, &OutboxConfig::default(), 1 << 20).expect("open");
    let committer = std::thread::spawn(move || committer.run());
    Opened { store, committer }
}

/// Drops the router (and with it the store) and waits until the committer has written all.
fn close(router: Router, committer: std::thread::JoinHandle<()>) {
    drop(router);
    committer.join().expect("committer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open_store(dir.path());
    let r = Router::new(RouterSettings::default(), Some(opened.store));
    let c = connect(&r, "keeper", true, 3600).await;
    let sub_id = SubOptions {
        qos: 1,
        id: Some(4),
        ..Default::default()
    };
    subscribe(&r, &c.handle, "q/#", sub_id).await;
    // A session that ends with its connection leaves nothing behind.
    let gone = connect(&r, "gone", true, 0).await;
    subscribe(&r, &gone.handle, "q/#", opts(1)).await;
    end(&r, &c, Ending::Normal).await;
    end(&r, &gone, Ending::Normal).await;
    for p in ["1", "2", "3"] {
        publish(&r, msg("q/a", p, 1)).await;
    }
    // QoS 0 deliveries are not kept.
    publish(&r, msg("q/a", "volatile", 0)).await;
    close(r, opened.committer);

    let opened = open_store(dir.path());
    let r = Router::new(RouterSettings::default(), Some(opened.store));
    assert_eq!(r.restore_sessions().await.expect("restore"), 1);
    assert_eq!(r.stats().sessions_offline.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats().subscriptions.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 3);
    let c = connect(&r, "keeper", false, 3600).await;
    assert!(c.present);
    let got = drain(&c.handle);
    assert_eq!(payloads(&got), ["1", "2", "3"]);
    for d in &got {
        assert_eq!((d.qos, d.dup, &d.sub_ids[..]), (1, false, &[4][..]));
        assert_eq!(&*d.msg.topic, "q/a");
        c.handle.acknowledged(d);
    }
    publish(&r, msg("q/b", "after", 1)).await;
    let got = drain(&c.handle);
    assert_eq!(payloads(&got), ["after"]);
    assert_eq!(got[0].sub_ids, [4]);
    c.handle.acknowledged(&got[0]);
    let fresh = connect(&r, "gone", false, 0).await;
    assert!(!fresh.present);
    close(r, opened.committer);

    // Everything was acknowledged: nothing comes back.
    let opened = open_store(dir.path());
    let r = Router::new(RouterSettings::default(), Some(opened.store));
    assert_eq!(r.restore_sessions().await.expect("restore"), 1);
    let c = connect(&r, "keeper", false, 3600).await;
    assert!(c.present);
    assert!(drain(&c.handle).is_empty());
    close(r, opened.committer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_deliveries_come_back_with_dup_and_acknowledged_ones_do_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open_store(dir.path());
    let r = Router::new(RouterSettings::default(), Some(opened.store));
    let c = connect(&r, "c", true, 60).await;
    subscribe(&r, &c.handle, "t", opts(2)).await;
    for p in ["acked", "sent", "queued", "unsent"] {
        publish(&r, msg("t", p, 2)).await;
    }
    let mut window = Vec::new();
    c.handle.take(3, &mut window);
    assert_eq!(payloads(&window), ["acked", "sent", "queued"]);
    assert!(window.iter().all(|d| d.key.is_some()));
    window[0].pid = 1;
    window[1].pid = 2;
    c.handle.sent(&window[0]);
    c.handle.sent(&window[1]);
    c.handle.acknowledged(&window[0]);
    // The connection breaks: what it took and did not see acknowledged goes back.
    let unacked = window.split_off(1);
    r.disconnect(
        &c.handle,
        c.generation,
        Ending::WithWill,
        None,
        None,
        unacked,
    )
    .await;
    close(r, opened.committer);

    let opened = open_store(dir.path());
    let r = Router::new(RouterSettings::default(), Some(opened.store));
    assert_eq!(r.restore_sessions().await.expect("restore"), 1);
    let c = connect(&r, "c", false, 60).await;
    assert!(c.present);
    let got = drain(&c.handle);
    assert_eq!(payloads(&got), ["sent", "queued", "unsent"]);
    assert_eq!(
        got.iter().map(|d| d.dup).collect::<Vec<_>>(),
        [true, false, false]
    );
    assert_eq!(got.iter().map(|d| d.pid).collect::<Vec<_>>(), [2, 0, 0]);
    assert!(got.iter().all(|d| d.qos == 2));
    // New deliveries get keys after the restored ones.
    publish(&r, msg("t", "new", 2)).await;
    let new = drain(&c.handle);
    let last = got.last().and_then(|d| d.key).expect("key");
    assert!(new[0].key.expect("key") > last);
    close(r, opened.committer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_removes_a_stored_session() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = open_store(dir.path());
    let r = Router::new(RouterSettings::default(), Some(opened.store));
    let c = connect(&r, "c", true, 60).await;
    subscribe(&r, &c.handle, "t", opts(1)).await;
    end(&r, &c, Ending::Normal).await;
    publish(&r, msg("t", "x", 1)).await;
    let c = connect(&r, "c", true, 0).await;
    end(&r, &c, Ending::Normal).await;
    close(r, opened.committer);

    let opened = open_store(dir.path());
    let r = Router::new(RouterSettings::default(), Some(opened.store));
    assert_eq!(r.restore_sessions().await.expect("restore"), 0);
    assert_eq!(r.stats().queued_messages.load(Ordering::Relaxed), 0);
    assert_eq!(r.stats().subscriptions.load(Ordering::Relaxed), 0);
    close(r, opened.committer);
}
