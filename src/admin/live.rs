//! What the admin page shows live: a sample of the rates and the backlog each second (the
//! last 15 minutes are kept, so a page opened now draws them at once), the space left on the
//! store's file system, and the frames sent to each open page.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Sources, Status};
use crate::gate::clients::ClientInfo;
use crate::warnings::Warning;

/// One sample a second, 15 minutes of them.
pub const EVERY: Duration = Duration::from_secs(1);
pub const KEPT: usize = 900;
/// How often the free space is read.
const SPACE_EVERY: u64 = 10;
/// The clients and warnings a frame lists at most (the totals are always there).
const CLIENTS_LISTED: usize = 100;
const WARNINGS_LISTED: usize = 20;
/// The window over which the drain rate is taken.
const DRAIN_WINDOW: usize = 10;

/// One second of the relay.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Messages a second: in from local MQTT clients, serial ports and Modbus devices; stored by
    /// the hub; in from the hub; delivered to local subscribers.
    pub in_per_s: f64,
    pub to_hub_per_s: f64,
    pub from_hub_per_s: f64,
    pub delivered_per_s: f64,
    /// Messages and bytes waiting for the hub.
    pub backlog: u64,
    pub backlog_bytes: u64,
}

/// The counters a sample is the difference of.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    at: Option<Instant>,
    input: u64,
    to_hub: u64,
    from_hub: u64,
    delivered: u64,
}

impl Counts {
    fn of(s: &Status, at: Instant) -> Counts {
        Counts {
            at: Some(at),
            input: s.mqtt.publishes_in
                + s.serial.iter().map(|p| p.frames).sum::<u64>()
                + s.modbus.iter().map(|d| d.published).sum::<u64>(),
            to_hub: s.uplink.as_ref().map_or(0, |u| u.acknowledged),
            from_hub: s.downlink.as_ref().map_or(0, |d| d.delivered),
            delivered: s.broker.messages_out,
        }
    }
}

/// The samples and the store's free space.
#[derive(Default)]
pub struct Live {
    samples: Mutex<VecDeque<Sample>>,
    free_bytes: AtomicU64,
    total_bytes: AtomicU64,
    space_reading: Arc<AtomicBool>,
}

impl Live {
    fn samples(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The store's file system: (bytes available, bytes in all), as last read.
    pub fn space(&self) -> (u64, u64) {
        (
            self.free_bytes.load(Ordering::Relaxed),
            self.total_bytes.load(Ordering::Relaxed),
        )
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.samples().iter().copied().collect()
    }

    /// The backlog's drain: messages a second stored by the hub over the last seconds, and how
    /// long the backlog takes to empty at the rate it shrinks now (`None`: it does not shrink).
    pub fn drain(&self) -> (f64, Option<f64>) {
        let samples = self.samples();
        let n = samples.len().min(DRAIN_WINDOW);
        if n < 2 {
            return (0.0, None);
        }
        let window: Vec<&Sample> = samples.iter().rev().take(n).collect();
        let rate = window.iter().map(|s| s.to_hub_per_s).sum::<f64>() / n as f64;
        let (newest, oldest) = (window[0], window[n - 1]);
        let seconds = newest.unix_ms.saturating_sub(oldest.unix_ms) as f64 / 1000.0;
        let shrink = (oldest.backlog as f64 - newest.backlog as f64) / seconds.max(1e-3);
        let time = (shrink > 0.0 && newest.backlog > 0).then(|| newest.backlog as f64 / shrink);
        (rate, time)
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples();
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Reads the free space of `dir` on the blocking pool, unless a read is still under way (a
    /// disk that stops answering holds one thread, not the sampler).
    fn read_space(self: &Arc<Self>, dir: PathBuf) {
        if self.space_reading.swap(true, Ordering::Relaxed) {
            return;
        }
        let live = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Some((free, total)) = crate::store::space(&dir) {
                live.free_bytes.store(free, Ordering::Relaxed);
                live.total_bytes.store(total, Ordering::Relaxed);
            }
            live.space_reading.store(false, Ordering::Relaxed);
        });
    }
}

/// Takes a sample each second until `shutdown`.
pub async fn run(sources: Arc<Sources>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Counts::default();
    for n in 0u64.. {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if n % SPACE_EVERY == 0 {
            sources.live.read_space(sources.data_dir.clone());
        }
        let status = sources.snapshot();
        let now = Counts::of(&status, Instant::now());
        if let (Some(then), Some(at)) = (last.at, now.at) {
            let secs = at.duration_since(then).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            sources.live.push(Sample {
                unix_ms: super::unix_ms(),
                in_per_s: rate(now.input, last.input),
                to_hub_per_s: rate(now.to_hub, last.to_hub),
                from_hub_per_s: rate(now.from_hub, last.from_hub),
                delivered_per_s: rate(now.delivered, last.delivered),
                backlog: status.outbox.messages,
                backlog_bytes: status.outbox.bytes,
            });
        }
        last = now;
    }
}

/// What one frame of the page's event stream holds.
#[derive(Debug, Serialize)]
pub struct Frame {
    pub status: Status,
    /// The last sample (`None` in the first second).
    pub sample: Option<Sample>,
    /// Every sample kept: in the first frame of a stream only.
    pub history: Option<Vec<Sample>>,
    pub drain_per_s: f64,
    pub time_to_drain_s: Option<f64>,
    pub clients_total: usize,
    pub clients: Vec<ClientInfo>,
    pub warnings_total: u64,
    pub warnings: Vec<Warning>,
}

impl Frame {
    pub fn now(sources: &Sources, with_history: bool) -> Frame {
        let history = sources.live.history();
        let (drain_per_s, time_to_drain_s) = sources.live.drain();
        let (clients_total, clients) = sources.gate.clients.newest(CLIENTS_LISTED);
        let (warnings_total, warnings) = crate::warnings::recent(WARNINGS_LISTED);
        Frame {
            status: sources.snapshot(),
            sample: history.last().copied(),
            history: with_history.then_some(history),
            drain_per_s,
            time_to_drain_s,
            clients_total,
            clients,
            warnings_total,
            warnings,
        }
    }
}

/// The page's event stream: a frame at once (with the history), then one each second, until
/// `shutdown` (a shutdown must not wait for open pages).
pub fn stream(
    sources: Arc<Sources>,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl futures::Stream<Item = Result<axum::response::sse::Event, Infallible>> {
    use futures::StreamExt;
    let tick = tokio::time::interval(EVERY);
    futures::stream::unfold(
        (sources, tick, true, permit),
        |(sources, mut tick, first, permit)| async move {
            tick.tick().await;
            let frame = Frame::now(&sources, first);
            let data = serde_json::to_string(&frame).unwrap_or_default();
            let event = axum::response::sse::Event::default()
                .event("frame")
                .data(data);
            Some((Ok(event), (sources, tick, false, permit)))
        },
    )
    .take_until(shutdown.cancelled_owned())
}
