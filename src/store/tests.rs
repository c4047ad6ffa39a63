//! The store's own tests: durability rules, torn tails, damage, reuse, bounds.

use super::*;
use crate::config::OutboxPolicy;

fn record(at: u64) -> OutboxRecord {
    OutboxRecord {
        topic: "t".into(),
        payload: at.to_be_bytes().to_vec().into(),
        qos: 1,
        accepted_unix_ms: at,
        ..Default::default()
    }
}

fn small(segment: u64) -> OutboxConfig {
    OutboxConfig {
        segment_bytes: segment,
        commit_window_us: 0,
        ..Default::default()
    }
}

struct Open {
    store: Store,
    thread: std::thread::JoinHandle<()>,
}

impl Open {
    fn new(dir: &Path, config: &OutboxConfig) -> Open {
        let (store, committer) = Store::open(dir, config, 1 << 20).expect("open");
        let thread = std::thread::spawn(move || committer.run());
        Open { store, thread }
    }

    fn close(self) -> Arc<OutboxStats> {
        let stats = self.store.stats_handle();
        drop(self.store);
        self.thread.join().expect("committer");
        stats
    }
}

async fn append(store: &Store, r: &OutboxRecord) -> u64 {
    store
        .append(r)
        .await
        .expect("append")
        .durable()
        .await
        .expect("commit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recent_tail_is_found_by_acceptance_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Open::new(dir.path(), &OutboxConfig::default());
    assert_eq!(
        s.store.first_recent(0, 100).await.expect("read"),
        1,
        "empty"
    );
    for at in [100, 200, 300, 400, 500] {
        append(&s.store, &record(at)).await;
    }
    assert_eq!(s.store.first_recent(300, 100).await.expect("read"), 3);
    assert_eq!(s.store.first_recent(301, 100).await.expect("read"), 4);
    assert_eq!(s.store.first_recent(0, 100).await.expect("read"), 1);
    assert_eq!(
        s.store.first_recent(600, 100).await.expect("read"),
        6,
        "none recent"
    );
    // Looking back at most two records.
    assert_eq!(s.store.first_recent(0, 2).await.expect("read"), 4);
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_reopening_and_deletes_move_the_front() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = small(64 * 1024);
    let s = Open::new(dir.path(), &config);
    let epoch = s.store.epoch();
    for at in 1..=2000 {
        assert_eq!(append(&s.store, &record(at)).await, at);
    }
    s.store.delete((1..=1500).collect()).expect("delete");
    s.close();

    let s = Open::new(dir.path(), &config);
    assert_eq!(s.store.epoch(), epoch);
    assert_eq!(s.store.next_seq(), 2001);
    let got = s.store.read_after(0, 10_000).await.expect("read");
    assert_eq!(got.first().map(|(seq, _)| *seq), Some(1501));
    assert_eq!(got.len(), 500);
    assert_eq!(s.store.stats().records.load(Ordering::Relaxed), 500);
    // Reads from the middle, in pieces, see every record once.
    let mut after = 1600;
    let mut seen = Vec::new();
    loop {
        let part = s.store.read_after(after, 37).await.expect("read");
        let Some((last, _)) = part.last() else { break };
        after = *last;
        seen.extend(part.into_iter().map(|(seq, _)| seq));
    }
    assert_eq!(seen, (1601..=2000).collect::<Vec<_>>());
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backlog_gives_its_segments_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = small(64 * 1024);
    let s = Open::new(dir.path(), &config);
    let payload = vec![7u8; 1000];
    let mut tickets = Vec::new();
    for at in 0..2000u64 {
        let mut r = record(at);
        r.payload = payload.clone().into();
        tickets.push(s.store.append(&r).await.expect("append"));
    }
    for t in tickets {
        t.durable().await.expect("durable");
    }
    let segs = |dir: &Path| {
        std::fs::read_dir(dir.join("log"))
            .expect("log dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
            })
            .count()
    };
    let full = segs(dir.path());
    let readable = s.store.read_after(0, 5000).await.expect("read").len();
    assert_eq!(readable, 2000);
    assert!(full >= 30, "2 MB of records in 64 KiB segments: {full}");
    s.store.delete((1..=2000).collect()).expect("delete");
    // The front is written within a second or so; then the dead segments go.
    let deadline =
        std::time::Instant::now() + committer::SPARE_IDLE + std::time::Duration::from_secs(30);
    while segs(dir.path()) > 1 + committer::RESERVE && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(segs(dir.path()), 1 + committer::RESERVE);
    let stats = s.close();
    assert_eq!(stats.records.load(Ordering::Relaxed), 0);

    // New records after reopening the drained store.
    let s = Open::new(dir.path(), &config);
    assert_eq!(s.store.next_seq(), 2001);
    assert!(s.store.read_after(0, 10).await.expect("read").is_empty());
    assert_eq!(append(&s.store, &record(5)).await, 2001);
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_drops_the_oldest_or_refuses() {
    let dir = tempfile::tempdir().expect("temp dir");
    let size = record(1).encoded_len() as u64 + KEY_COST;
    let config = OutboxConfig {
        max_bytes: size * 10,
        ..small(64 * 1024)
    };
    let s = Open::new(dir.path(), &config);
    for at in 1..=25 {
        append(&s.store, &record(at)).await;
    }
    let got = s.store.read_after(0, 100).await.expect("read");
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (16..=25).collect::<Vec<_>>()
    );
    let stats = s.close();
    assert_eq!(stats.dropped_oldest.load(Ordering::Relaxed), 15);

    let dir = tempfile::tempdir().expect("temp dir");
    let config = OutboxConfig {
        policy: OutboxPolicy::RefuseNew,
        ..config
    };
    let s = Open::new(dir.path(), &config);
    for at in 1..=10 {
        append(&s.store, &record(at)).await;
    }
    let refused = s
        .store
        .append(&record(11))
        .await
        .expect("append")
        .durable()
        .await;
    assert!(
        matches!(refused, Err(StoreError::Full { .. })),
        "{refused:?}"
    );
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_kept_replaced_and_cleared_across_checkpoints() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = small(64 * 1024);
    let s = Open::new(dir.path(), &config);
    let retained = |topic: &str, payload: &[u8]| OutboxRecord {
        topic: topic.into(),
        payload: payload.to_vec().into(),
        retain: true,
        ..Default::default()
    };
    for i in 0..20 {
        let t = s
            .store
            .retain(&retained(&format!("r/{i}"), b"first"))
            .await
            .expect("retain");
        t.durable().await.expect("durable");
    }
    s.store
        .retain(&retained("r/3", b"second"))
        .await
        .expect("retain")
        .durable()
        .await
        .expect("durable");
    s.store
        .retain(&retained("r/4", b""))
        .await
        .expect("retain")
        .durable()
        .await
        .expect("durable");
    // Enough outbox traffic, acknowledged, to pass many chunks: old chunks are recycled and
    // the retained messages live on in checkpoints.
    for round in 0..20u64 {
        let mut last = 0;
        for at in 0..100 {
            let mut r = record(at);
            r.payload = vec![1u8; 500].into();
            last = append(&s.store, &r).await;
        }
        s.store
            .delete((round * 100 + 1..=last).collect())
            .expect("delete");
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    append(&s.store, &record(1)).await;
    let stats = s.close();
    assert!(stats.checkpoints.load(Ordering::Relaxed) > 3);
    assert!(stats.recycled.load(Ordering::Relaxed) > 3);

    let s = Open::new(dir.path(), &config);
    let kept = s.store.retained().await.expect("retained");
    let topics: Vec<String> = kept.iter().map(|r| r.topic.clone()).collect();
    let mut want: Vec<String> = (0..20)
        .filter(|i| *i != 4)
        .map(|i| format!("r/{i}"))
        .collect();
    want.sort();
    assert_eq!(topics, want);
    let r3 = kept.iter().find(|r| r.topic == "r/3").expect("r/3");
    assert_eq!(&r3.payload[..], b"second");
    s.close();
}

/// The bytes of the log directory's files, by name.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir.join("log"))
        .expect("log dir")
        .map(|e| {
            let p = e.expect("entry").path();
            let b = std::fs::read(&p).expect("read");
            (p, b)
        })
        .collect();
    files.sort();
    files
}

fn restore(files: &[(PathBuf, Vec<u8>)]) {
    for (p, b) in files {
        std::fs::write(p, b).expect("write");
    }
}

/// The last commit, cut at every byte: every earlier record is intact, a cut that left
/// anything of the new commit counts one torn write, and the store goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_commit_is_counted_and_every_earlier_record_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = small(64 * 1024);
    let s = Open::new(dir.path(), &config);
    for at in 1..=30 {
        append(&s.store, &record(at)).await;
    }
    s.close();
    let before = snapshot(dir.path());
    let s = Open::new(dir.path(), &config);
    // The last commit: three records in one batch.
    let mut tickets = Vec::new();
    for at in 31..=33 {
        tickets.push(s.store.append(&record(at)).await.expect("append"));
    }
    for t in tickets {
        t.durable().await.expect("durable");
    }
    s.close();
    let after = snapshot(dir.path());
    // Where the last commit wrote: the bytes that differ.
    let (path, old, new) = before
        .iter()
        .zip(&after)
        .find(|(a, b)| a.1 != b.1)
        .map(|(a, b)| (a.0.clone(), a.1.clone(), b.1.clone()))
        .expect("a segment changed");
    // The commit's records start where the earlier data ended (8-byte aligned).
    let start = (old.iter().rposition(|&b| b != 0).expect("earlier data") + 1).div_ceil(8) * 8;
    // Each record's aligned end, and where its body ends (it is whole from there on).
    let mut ends = Vec::new();
    let mut whole_at = Vec::new();
    let mut at = start;
    for seq in 31..=33 {
        let body = 16 + record(seq).encoded_len();
        whole_at.push(at + format::HEADER + body);
        at += format::record_len(body) as usize;
        ends.push(at);
    }
    let last = (0..new.len())
        .rev()
        .find(|&i| old[i] != new[i])
        .expect("a change");
    assert!(
        last < ends[2],
        "the commit wrote no further than its records"
    );
    for cut in start..=ends[2] {
        let mut torn = old.clone();
        torn[start..cut].copy_from_slice(&new[start..cut]);
        restore(&before);
        std::fs::write(&path, &torn).expect("write torn");
        let seen = inspect(dir.path()).expect("inspect");
        let seqs: Vec<u64> = seen.outbox.iter().map(|(s, _)| *s).collect();
        let whole = whole_at.iter().filter(|&&e| e <= cut).count() as u64;
        assert_eq!(
            seqs,
            (1..=30 + whole).collect::<Vec<_>>(),
            "cut at {cut} of {start}..{}",
            ends[2]
        );
        // What was written of the first record the cut left incomplete.
        let cut_record_start = ends[..whole as usize]
            .last()
            .copied()
            .unwrap_or(start)
            .min(cut);
        let partial = torn[cut_record_start..cut].iter().any(|&b| b != 0);
        assert_eq!(seen.torn, u64::from(partial), "cut at {cut}: torn count");
        assert_eq!(seen.corrupt, 0, "cut at {cut}");
        for (seq, r) in &seen.outbox {
            assert_eq!(r.accepted_unix_ms, *seq, "record {seq} intact");
        }
    }
    // A store opened on a torn tail goes on: new records after the kept ones.
    restore(&before);
    let mut torn = old.clone();
    let mid = (ends[0] + ends[1]) / 2;
    torn[start..mid].copy_from_slice(&new[start..mid]);
    std::fs::write(&path, &torn).expect("write torn");
    let s = Open::new(dir.path(), &config);
    assert_eq!(s.store.stats().torn.load(Ordering::Relaxed), 1);
    let seq = append(&s.store, &record(99)).await;
    s.close();
    let seen = inspect(dir.path()).expect("inspect");
    assert_eq!(seen.torn, 0);
    assert_eq!(seen.outbox.last().map(|(s, _)| *s), Some(seq));
}

/// A bit flipped anywhere in the log: the open never panics, the damage is counted, and
/// every record that is not damaged is still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_anywhere_is_caught_and_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = small(64 * 1024);
    let s = Open::new(dir.path(), &config);
    for at in 1..=40 {
        append(&s.store, &record(at)).await;
    }
    s.close();
    let clean = snapshot(dir.path());
    let (path, bytes) = clean
        .iter()
        .find(|(_, b)| b.iter().any(|&x| x != 0))
        .cloned()
        .expect("a written segment");
    let used = bytes.iter().rposition(|&b| b != 0).expect("data") + 1;
    for bit in 0..used * 8 {
        let mut damaged = bytes.clone();
        damaged[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&path, &damaged).expect("write");
        let seen = inspect(dir.path()).expect("inspect never fails on damage");
        let seqs: Vec<u64> = seen.outbox.iter().map(|(s, _)| *s).collect();
        for (seq, r) in &seen.outbox {
            assert_eq!(r.accepted_unix_ms, *seq, "bit {bit}: record {seq} intact");
        }
        if seqs.len() < 40 {
            assert!(
                seen.corrupt + seen.torn > 0 || seqs.is_empty(),
                "bit {bit}: {} records lost silently",
                40 - seqs.len()
            );
            // At most the damaged record, or what a damaged segment start hides.
            assert!(
                seqs.len() >= 39 || bit / 8 < 64,
                "bit {bit}: only {} of 40 records kept",
                seqs.len()
            );
        }
    }
    restore(&clean);
}

/// Segments are reused: a reused segment's old records never come back, neither to readers
/// nor after reopening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_segments_old_records_never_come_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = small(64 * 1024);
    let s = Open::new(dir.path(), &config);
    let mut next = 1u64;
    // Many rounds of: fill more than a segment, acknowledge everything.
    for _ in 0..12 {
        let mut last = 0;
        for _ in 0..150 {
            let mut r = record(next);
            r.payload = vec![(next % 251) as u8; 400].into();
            last = append(&s.store, &r).await;
            next += 1;
        }
        s.store.delete((1..=last).collect()).expect("delete");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        // Commit something so that the front is written.
        append(&s.store, &record(0)).await;
        next += 1;
        s.store.delete(vec![next - 1]).expect("delete");
    }
    let stats = s.close();
    assert!(
        stats.recycled.load(Ordering::Relaxed) >= 5,
        "segments were reused"
    );
    let seen = inspect(dir.path()).expect("inspect");
    assert!(
        seen.outbox.len() <= 1,
        "acknowledged records came back: {:?}",
        seen.outbox.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );
    let s = Open::new(dir.path(), &config);
    let got = s.store.read_after(0, 10_000).await.expect("read");
    assert!(got.len() <= 1, "{} old records came back", got.len());
    assert_eq!(s.store.next_seq(), next);
    s.close();
}

/// A backlog of a million records: opening it reads a bounded stretch of the log (not the
/// backlog), and once it has drained the files shrink to the live segment and the reserve,
/// without any compaction step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_record_backlog_opens_in_bounded_time_and_drains_to_the_reserve() {
    const N: u64 = 1_000_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = OutboxConfig {
        commit_window_us: 2000,
        ..OutboxConfig::default()
    };
    let s = Open::new(dir.path(), &config);
    let payload = vec![0x5au8; 64];
    let mut last = None;
    for at in 1..=N {
        let mut r = record(at);
        r.payload = payload.clone().into();
        if at % 10_000 == 0 {
            last = Some(s.store.append(&r).await.expect("append"));
        } else {
            s.store.append_nowait(&r).await.expect("append");
        }
    }
    assert_eq!(last.expect("ticket").durable().await.expect("durable"), N);
    let stats = s.close();
    let commits = stats.commits.load(Ordering::Relaxed);
    let written = stats.bytes_written.load(Ordering::Relaxed);
    let segments = stats.segments.load(Ordering::Relaxed);
    println!(
        "backlog: {N} records, {commits} commits, {written} bytes written ({:.1} B/record), \
         {segments} segments",
        written as f64 / N as f64
    );

    let opened = std::time::Instant::now();
    let s = Open::new(dir.path(), &config);
    let open_ms = opened.elapsed().as_millis();
    let stats = s.store.stats_handle();
    let scanned = stats.open_scanned_bytes.load(Ordering::Relaxed);
    println!("open with the backlog: {open_ms} ms, {scanned} bytes of log read");
    assert_eq!(stats.records.load(Ordering::Relaxed), N);
    // The state is rebuilt from the newest checkpoint: at most two segments are read.
    assert!(
        scanned <= 2 * SEGMENT_BYTES,
        "opening read {scanned} bytes of a {N}-record backlog"
    );
    // Drained in order, as the uplink acknowledges.
    let before = stats.bytes_written.load(Ordering::Relaxed);
    let mut after = 0;
    while after < N {
        let part = s.store.read_after(after, 5_000).await.expect("read");
        let Some((seq, _)) = part.last() else { break };
        assert_eq!(part.first().map(|(s, _)| *s), Some(after + 1), "in order");
        after = *seq;
        s.store
            .delete(part.into_iter().map(|(s, _)| s).collect())
            .expect("delete");
    }
    assert_eq!(after, N, "every record read back");
    let deadline =
        std::time::Instant::now() + committer::SPARE_IDLE + std::time::Duration::from_secs(30);
    while (stats.records.load(Ordering::Relaxed) > 0
        || stats.segments.load(Ordering::Relaxed) + stats.spare_segments.load(Ordering::Relaxed)
            > 1 + committer::RESERVE as u64)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let drained_written = stats.bytes_written.load(Ordering::Relaxed) - before;
    println!(
        "drain: {drained_written} bytes written for {N} records ({:.3} B/record)",
        drained_written as f64 / N as f64
    );
    assert_eq!(stats.records.load(Ordering::Relaxed), 0);
    let files = std::fs::read_dir(dir.path().join("log"))
        .expect("log dir")
        .count() as u64;
    assert_eq!(
        files,
        1 + committer::RESERVE as u64,
        "the live segment and the reserve"
    );
    assert!(
        drained_written <= N,
        "draining wrote {drained_written} bytes for {N} records"
    );
    s.close();
}

/// What a kill leaves (the files as they are while the store runs): the acknowledged front is
/// on disk within about a second, so a restart sends again only that second's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_reaches_the_disk_within_a_second() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Open::new(dir.path(), &small(64 * 1024));
    // Over several segments (checkpoints, recycled segments), acknowledged as it goes.
    for at in 1..=5000 {
        append(&s.store, &record(at)).await;
        if at % 100 == 0 {
            s.store.delete((at - 99..=at).collect()).expect("delete");
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // The front rides on the next commit.
    append(&s.store, &record(5001)).await;
    let seen = inspect(dir.path()).expect("inspect");
    assert_eq!(
        seen.outbox.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![5001],
        "the front was written with the next commit"
    );
    s.store.delete(vec![5001]).expect("delete");
    // With no commit to ride on, housekeeping writes it within about a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut left = usize::MAX;
    while left > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        left = inspect(dir.path()).expect("inspect").outbox.len();
    }
    assert_eq!(left, 0, "the drained front was written");
    s.close();
}

/// The physical floor: every commit is one write of whole pages and one flush, and a batch
/// that fits in a page costs one page, also when the tail page has little room left (the batch
/// then starts on the next page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_writes_one_page_and_flushes_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = OutboxConfig {
        commit_window_us: 2000,
        ..OutboxConfig::default()
    };
    let s = Open::new(dir.path(), &config);
    let stats = s.store.stats_handle();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (b0, c0, w0, f0) = (
        load(&stats.bytes_written),
        load(&stats.commits),
        load(&stats.writes),
        load(&stats.flushes),
    );
    for round in 0..100u64 {
        // About 3.5 KB of records a commit: from most tail positions it would spill.
        let mut last = None;
        for i in 0..29u64 {
            let mut r = record(round * 100 + i);
            r.payload = vec![1u8; 64].into();
            r.source = "bench-pub-1".into();
            last = Some(s.store.append(&r).await.expect("append"));
        }
        last.expect("ticket").durable().await.expect("durable");
    }
    let commits = load(&stats.commits) - c0;
    let bytes = load(&stats.bytes_written) - b0;
    assert_eq!(load(&stats.writes) - w0, commits, "one write per commit");
    assert_eq!(load(&stats.flushes) - f0, commits, "one flush per commit");
    assert_eq!(
        bytes,
        commits * 4096,
        "one page per commit ({commits} commits)"
    );
    let got = s.store.read_after(0, 10_000).await.expect("read");
    assert_eq!(
        got.len(),
        2900,
        "every record reads back across the skipped page ends"
    );
    let stats = s.close();
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), 0);
    let seen = inspect(dir.path()).expect("inspect");
    assert_eq!((seen.outbox.len(), seen.corrupt, seen.torn), (2900, 0, 0));
}

/// Keyed entries (persistent sessions' queued deliveries here) that make checkpoints rare —
/// one is due only after the log grew by 4 × the keyed state — survive an outbox that drained
/// past the chunk of the last checkpoint: that chunk and everything after it stay until a newer
/// checkpoint is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_entries_outlive_an_outbox_drained_past_their_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = small(64 * 1024);
    let s = Open::new(dir.path(), &config);
    // 100 entries of 600 B: 60 KB of keyed state, so a checkpoint is due only every 240 KB.
    let value = vec![9u8; 600];
    for i in 0..100u32 {
        let key = format!("keeper-{i:03}").into_bytes();
        s.store
            .entry(QUEUED, key, Some(value.clone()))
            .await
            .expect("entry")
            .durable()
            .await
            .expect("durable");
    }
    // Then an outbox backlog of several segments, acknowledged as it goes.
    let payload = vec![7u8; 1000];
    for round in 0..6u64 {
        let mut tickets = Vec::new();
        for at in 0..60u64 {
            let mut r = record(round * 100 + at);
            r.payload = payload.clone().into();
            tickets.push(s.store.append(&r).await.expect("append"));
        }
        let mut seqs = Vec::new();
        for t in tickets {
            seqs.push(t.durable().await.expect("durable"));
        }
        s.store.delete(seqs).expect("delete");
        // Let the front reach the disk, and dead chunks be recycled.
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    }
    s.close();
    let s = Open::new(dir.path(), &config);
    let entries = s.store.entries(QUEUED).await.expect("entries");
    assert_eq!(entries.len(), 100, "queued entries after reopening");
    assert!(entries.iter().all(|(_, v)| *v == value));
    assert_eq!(s.store.stats().corrupt.load(Ordering::Relaxed), 0);
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_start_at_the_front_from_the_tail_as_from_the_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Open::new(dir.path(), &OutboxConfig::default());
    for at in 1..=10 {
        append(&s.store, &record(at)).await;
    }
    s.store.delete((1..=6).collect()).expect("delete");
    // The deletes ride on the next commit.
    append(&s.store, &record(11)).await;
    // Served from the tail (the last commits' records): the first live records, not the first
    // `max` sequences with the deleted ones left out.
    assert_eq!(
        reads_past_the_front(&s.store).await,
        (vec![7, 8], vec![9, 10, 11])
    );
    s.close();
    // From the log after reopening (the tail is empty): the same answers.
    let s = Open::new(dir.path(), &OutboxConfig::default());
    assert_eq!(
        reads_past_the_front(&s.store).await,
        (vec![7, 8], vec![9, 10, 11])
    );
    s.close();
}

/// The sequences of two reads: two records from the start, then the rest after sequence 8.
async fn reads_past_the_front(store: &Store) -> (Vec<u64>, Vec<u64>) {
    let seqs = |found: Vec<(u64, OutboxRecord)>| found.into_iter().map(|(q, _)| q).collect();
    (
        seqs(store.read_between(0, 100, 2).await.expect("read")),
        seqs(store.read_after(8, 10).await.expect("read")),
    )
}

/// Records deleted behind an older one that is still queued (live records acknowledged ahead of
/// the backlog) are passed over before a read's `max` is counted: a run of them longer than
/// `max` does not read as the end of the outbox. Read from the tail, and from the log once the
/// tail has moved past them.
#[tokio::test]
async fn a_run_of_deleted_records_is_passed_over_within_max() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Open::new(dir.path(), &OutboxConfig::default());
    for at in 1..=10 {
        append(&s.store, &record(at)).await;
    }
    s.store.delete((2..=7).collect()).expect("delete");
    append(&s.store, &record(11)).await;
    let reads = |store: Store| async move {
        let seqs = |found: Vec<(u64, OutboxRecord)>| -> Vec<u64> {
            found.into_iter().map(|(q, _)| q).collect()
        };
        (
            seqs(store.read_between(0, 100, 2).await.expect("read")),
            seqs(store.read_after(1, 2).await.expect("read")),
            seqs(store.read_between(1, 9, 2).await.expect("read")),
        )
    };
    let want = (vec![1, 8], vec![8, 9], vec![8]);
    assert_eq!(reads(s.store.clone()).await, want, "from the tail");
    // Enough later records that the tail no longer holds the first ones.
    for at in 12..12 + super::tail::TAIL_RECORDS as u64 {
        append(&s.store, &record(at)).await;
    }
    assert_eq!(reads(s.store.clone()).await, want, "from the log");
    s.close();
}

/// A commit waits out the gap for company unless a pipelining client has sent all it will:
/// once a burst that ends with [`PIPELINED`] of its client's publishes waiting is over and no
/// other connection is reading, the commit goes at once. A burst with fewer waiting, one while
/// another connection is still reading, or one while another client is pipelining too leaves
/// the batch to the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_clients_burst_is_committed_without_waiting_out_the_gap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let long = Duration::from_secs(30);
    let config = OutboxConfig {
        commit_window_us: long.as_micros() as u64,
        commit_gap_us: long.as_micros() as u64,
        ..OutboxConfig::default()
    };
    let s = Open::new(dir.path(), &config);
    let pending = |t: &mut Ticket| {
        matches!(
            t.0.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        )
    };
    let burst = async |n: usize, from: u64| {
        let reading = s.store.reading();
        let mut tickets = Vec::new();
        for i in 0..n as u64 {
            tickets.push(s.store.append(&record(from + i)).await.expect("append"));
        }
        (reading, tickets)
    };
    let settle = || tokio::time::sleep(Duration::from_millis(300));

    // Short of pipelining: the batch waits for the gap.
    let (reading, mut short) = burst(PIPELINED - 1, 0).await;
    assert!(reading.end(None, PIPELINED - 1).is_none());
    settle().await;
    assert!(
        short.iter_mut().all(pending),
        "a short burst waits for the gap"
    );

    // Pipelining while another connection reads: still the gap.
    let other = s.store.reading();
    let (reading, mut piped) = burst(PIPELINED, 100).await;
    let standing = reading.end(None, PIPELINED);
    assert!(standing.is_some(), "the client is pipelining");
    settle().await;
    assert!(
        piped.iter_mut().all(pending),
        "a connection still reading holds the commit"
    );

    // ... and while another client is pipelining too, once the other burst ended.
    let also = other.end(None, PIPELINED);
    settle().await;
    assert!(
        piped.iter_mut().all(pending),
        "two pipelining clients leave the batch to the gap"
    );

    // The other client stops pipelining: the next burst's end commits everything queued, well
    // within the gap.
    drop(also);
    let (reading, more) = burst(PIPELINED, 200).await;
    let _standing = reading.end(standing, PIPELINED);
    let started = Instant::now();
    for t in short.into_iter().chain(piped).chain(more) {
        tokio::time::timeout(Duration::from_secs(10), t.durable())
            .await
            .expect("committed before the gap")
            .expect("durable");
    }
    assert!(started.elapsed() < long / 2);
    s.close();
}
