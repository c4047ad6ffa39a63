//! Liveness of the core loops: heartbeats that the gate, the outbox committer, the uplink and the
//! local broker's router loop (its timers and `$SYS` statistics, heartbeat "router") bump as they
//! go round, and the registry that tells whether all of them still do.
//!
//! What "alive" means here: the loop is being run. The committer thread beats at the top of
//! every round (at least once a second when idle: its queue wait times out), so a commit stuck
//! in a write or an fdatasync stops its beats. The gate's accept loop and the uplink are tokio
//! tasks; they beat every [`BEAT_EVERY`] while they wait ([`Heartbeat::beat_while`]), so
//! waiting for a client or for the hub is alive, while a task that ended or panicked, a worker
//! thread blocked by a system call, or a loop that never yields is not.
//!
//! The systemd watchdog ([`crate::systemd`]) withholds `WATCHDOG=1` while any heartbeat is older
//! than its limit, and systemd then restarts the relay. This module knows nothing of systemd.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;

/// How often a waiting task beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// One core loop's proof of life. Clones share the same beat.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    name: &'static str,
    origin: Instant,
    /// Milliseconds after `origin` of the last beat.
    last_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    /// A heartbeat nobody watches (for a component started outside [`Liveness`]).
    pub fn unwatched(name: &'static str) -> Heartbeat {
        Heartbeat::starting_at(name, Instant::now())
    }

    fn starting_at(name: &'static str, origin: Instant) -> Heartbeat {
        let heartbeat = Heartbeat {
            name,
            origin,
            last_ms: Arc::new(AtomicU64::new(0)),
        };
        heartbeat.beat();
        heartbeat
    }

    /// The name the watchdog reports when this heartbeat goes silent.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Records that the loop is running now.
    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long ago the last beat was, seen at `now`.
    fn silent_for(&self, now: Instant) -> Duration {
        let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Beats, then runs `work` to its end, beating every [`BEAT_EVERY`] while it is pending: a
    /// task that waits (for a client, for the hub) is alive as long as it is being polled, and
    /// a loop whose `work` is always ready at once (a flood of connections) beats every round.
    pub async fn beat_while<F: Future>(&self, work: F) -> F::Output {
        self.beat();
        let mut work = std::pin::pin!(work);
        let start = tokio::time::Instant::now() + BEAT_EVERY;
        let mut ticks = tokio::time::interval_at(start, BEAT_EVERY);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Ends when `work` does; callers race it against their shutdown token.
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = ticks.tick() => self.beat(),
            }
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat::unwatched("unwatched")
    }
}

/// A core loop that has not beaten for too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub name: &'static str,
    pub silent_for: Duration,
}

/// The heartbeats of the core loops.
#[derive(Clone, Debug)]
pub struct Liveness {
    origin: Instant,
    watched: Arc<Mutex<Vec<Heartbeat>>>,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness::new()
    }
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness {
            origin: Instant::now(),
            watched: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// A new heartbeat, watched from now on. It counts as having beaten at creation.
    pub fn heartbeat(&self, name: &'static str) -> Heartbeat {
        let heartbeat = Heartbeat::starting_at(name, self.origin);
        self.lock().push(heartbeat.clone());
        heartbeat
    }

    /// The names of the watched heartbeats.
    pub fn names(&self) -> Vec<&'static str> {
        self.lock().iter().map(Heartbeat::name).collect()
    }

    /// The heartbeats whose last beat is more than `limit` before `now`, silent-longest first.
    pub fn stalled(&self, now: Instant, limit: Duration) -> Vec<Stalled> {
        let mut stalled: Vec<Stalled> = self
            .lock()
            .iter()
            .map(|h| Stalled {
                name: h.name,
                silent_for: h.silent_for(now),
            })
            .filter(|s| s.silent_for > limit)
            .collect();
        stalled.sort_by_key(|s| std::cmp::Reverse(s.silent_for));
        stalled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Heartbeat>> {
        // The list is only pushed to and read; a panic while holding the lock cannot leave it
        // half-changed, so a poisoned lock is still good to use.
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry whose clock origin the test knows, so beats can be placed in time.
    fn at_origin() -> (Liveness, Instant) {
        let origin = Instant::now();
        let liveness = Liveness {
            origin,
            watched: Arc::new(Mutex::new(Vec::new())),
        };
        (liveness, origin)
    }

    #[test]
    fn every_silent_heartbeat_is_reported_silent_longest_first() {
        let (liveness, origin) = at_origin();
        let gate = liveness.heartbeat("gate");
        let committer = liveness.heartbeat("outbox committer");
        let uplink = liveness.heartbeat("uplink");
        let limit = Duration::from_secs(3);
        assert_eq!(liveness.names(), ["gate", "outbox committer", "uplink"]);
        assert_eq!(
            liveness.stalled(Instant::now(), limit),
            [],
            "all beat at creation"
        );

        // Last beats at 9 s, 2 s and 5 s; seen at 10 s with a 3 s limit.
        gate.last_ms.store(9_000, Ordering::Relaxed);
        committer.last_ms.store(2_000, Ordering::Relaxed);
        uplink.last_ms.store(5_000, Ordering::Relaxed);
        let now = origin + Duration::from_secs(10);
        let want = [
            Stalled {
                name: "outbox committer",
                silent_for: Duration::from_secs(8),
            },
            Stalled {
                name: "uplink",
                silent_for: Duration::from_secs(5),
            },
        ];
        assert_eq!(liveness.stalled(now, limit), want);
        // Exactly at the limit is still alive.
        assert_eq!(liveness.stalled(now, Duration::from_secs(5)), want[..1]);
        // A beat brings a loop back.
        committer.beat();
        uplink.beat();
        assert_eq!(liveness.stalled(Instant::now(), limit), []);
    }

    #[test]
    fn a_beat_never_moves_the_last_beat_backwards() {
        let (liveness, origin) = at_origin();
        let committer = liveness.heartbeat("outbox committer");
        // A beat recorded later than "now" (another thread got there first) stays.
        committer.last_ms.store(60_000, Ordering::Relaxed);
        committer.beat();
        let now = origin + Duration::from_secs(61);
        assert_eq!(committer.silent_for(now), Duration::from_secs(1));
    }

    #[test]
    fn an_unwatched_heartbeat_is_not_in_the_registry() {
        let (liveness, origin) = at_origin();
        let _watched = liveness.heartbeat("gate");
        let unwatched = Heartbeat::unwatched("elsewhere");
        unwatched.last_ms.store(0, Ordering::Relaxed);
        let later = origin + Duration::from_secs(100);
        let names: Vec<_> = liveness
            .stalled(later, Duration::from_secs(1))
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["gate"]);
    }

    #[tokio::test]
    async fn beat_while_beats_even_when_the_work_is_ready_at_once() {
        // A registry that started 10 s ago, and a gate that last beat then.
        let origin = Instant::now()
            .checked_sub(Duration::from_secs(10))
            .expect("the clock is past 10 s");
        let liveness = Liveness {
            origin,
            watched: Arc::new(Mutex::new(Vec::new())),
        };
        let gate = liveness.heartbeat("gate");
        gate.last_ms.store(0, Ordering::Relaxed);
        assert!(gate.silent_for(Instant::now()) >= Duration::from_secs(10));
        assert_eq!(gate.beat_while(std::future::ready(7)).await, 7);
        let after = gate.silent_for(Instant::now());
        assert!(
            after < Duration::from_secs(1),
            "silent for {after:?} after a ready round"
        );
    }

    #[tokio::test]
    async fn beat_while_keeps_a_waiting_task_alive_and_returns_its_output() {
        let liveness = Liveness::new();
        let waiting = liveness.heartbeat("uplink");
        // The control: registered, never beaten again; it must go stale meanwhile.
        let silent = liveness.heartbeat("silent control");
        let watched = waiting.clone();
        let probe = tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                worst = worst.max(watched.silent_for(Instant::now()));
            }
            worst
        });
        let out = waiting
            .beat_while(async {
                tokio::time::sleep(Duration::from_millis(3_200)).await;
                42
            })
            .await;
        assert_eq!(out, 42);
        let worst = probe.await.expect("probe");
        assert!(
            worst < BEAT_EVERY + Duration::from_millis(500),
            "the waiting task went silent for {worst:?}"
        );
        let stalled = liveness.stalled(Instant::now(), Duration::from_secs(2));
        let names: Vec<_> = stalled.iter().map(|s| s.name).collect();
        assert_eq!(names, [silent.name()]);
    }
}
