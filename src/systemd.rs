//! systemd integration: the notify protocol and journald, in pure Rust (the `sd-notify` and
//! `tracing-journald` crates speak the datagram protocols themselves, so cross builds need no
//! target libsystemd).
//!
//! What the relay tells systemd (all of it only when `NOTIFY_SOCKET` is set, i.e. when started
//! as a `Type=notify` service):
//! - `READY=1`, once the MQTT listener is bound and the store is open, with a first `STATUS=`.
//! - `WATCHDOG=1` every quarter of `WatchdogSec` (from `WATCHDOG_USEC`), but only while every
//!   core loop (gate, outbox committer, uplink) has beaten within the stall limit (half of
//!   `WatchdogSec`, at least [`MIN_STALL_AFTER`]); see [`crate::liveness`]. A stalled core
//!   gets no pings, and systemd kills and restarts the relay `WatchdogSec` after the last one.
//! - `STATUS=` with the hub link and the outbox backlog, whenever it changes (checked every
//!   [`STATUS_EVERY`] at most), and which core loops are stalled when any is.
//! - `STOPPING=1` when a stop was asked for, before the bounded drain.
//!
//! Logs go to journald's native socket, with structured fields, when stderr is the journal
//! stream systemd set up (`JOURNAL_STREAM` names stderr's device and inode); to stderr
//! otherwise (also when the variable was only inherited and stderr goes elsewhere).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::liveness::{Liveness, Stalled};
use crate::store::OutboxStats;
use crate::uplink::UplinkStatus;

/// The shortest stall limit, so that a short `WatchdogSec` does not make an idle committer
/// (which beats once a second) or a busy machine look stalled.
pub const MIN_STALL_AFTER: Duration = Duration::from_secs(3);
/// How often the status line is recomputed (and sent when it changed).
pub const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Prefix of the relay's own fields in the journal (`RELAYBOX_LISTEN=…`), keeping them apart
/// from journald's well-known fields (a tracing field `message_id` must not become the
/// journal's `MESSAGE_ID`).
pub const JOURNAL_FIELD_PREFIX: &str = "RELAYBOX";

/// What the status line is made of.
#[derive(Clone)]
pub struct StatusSource {
    pub outbox: Arc<OutboxStats>,
    /// `None` when no uplink is configured.
    pub uplink: Option<Arc<UplinkStatus>>,
}

/// The watchdog timing derived from `WatchdogSec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogTiming {
    /// How often `WATCHDOG=1` is sent while the core is alive.
    pub ping_every: Duration,
    /// A core loop silent for longer than this is stalled.
    pub stall_after: Duration,
}

impl WatchdogTiming {
    pub fn for_timeout(watchdog: Duration) -> WatchdogTiming {
        WatchdogTiming {
            ping_every: (watchdog / 4).max(Duration::from_millis(10)),
            stall_after: (watchdog / 2).max(MIN_STALL_AFTER),
        }
    }
}

/// The relay's side of the service manager's protocol; inert when not started by systemd.
pub struct Service {
    notify: bool,
    supervisor: Option<Supervisor>,
}

struct Supervisor {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl Service {
    /// Says `READY=1` (with a first status) and starts the thread that sends the watchdog
    /// pings and status updates. Call once the listener is bound and the store is open.
    pub fn ready(listen: SocketAddr, liveness: Liveness, source: StatusSource) -> Service {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Service {
                notify: false,
                supervisor: None,
            };
        }
        let status = status_line(&source, &[]);
        send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        let watchdog = sd_notify::watchdog_enabled();
        let timing = watchdog.map(WatchdogTiming::for_timeout);
        tracing::info!(
            %listen,
            ?watchdog,
            core = ?liveness.names(),
            "told systemd: ready"
        );
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("systemd-watchdog".into())
                .spawn(move || supervise(&stop, &liveness, &source, timing, status))
        };
        let supervisor = match thread {
            Ok(thread) => Some(Supervisor { stop, thread }),
            Err(error) => {
                // Without the thread there are no pings: systemd restarts the relay, which is
                // the right answer to a process that cannot start a thread.
                tracing::error!(%error, "cannot start the watchdog thread");
                None
            }
        };
        Service {
            notify: true,
            supervisor,
        }
    }

    /// Says `STOPPING=1` and ends the watchdog thread. Call when a stop was asked for, before
    /// draining.
    pub fn stopping(&mut self) {
        if !self.notify {
            return;
        }
        self.end_supervisor();
        send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: draining accepted messages into the outbox"),
        ]);
        tracing::info!("told systemd: stopping");
    }

    fn end_supervisor(&mut self) {
        if let Some(s) = self.supervisor.take() {
            let (flag, wake) = &*s.stop;
            *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
            wake.notify_all();
            if s.thread.join().is_err() {
                tracing::error!("the watchdog thread panicked");
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.end_supervisor();
    }
}

/// The watchdog thread: pings while the core is alive, keeps the status current.
fn supervise(
    stop: &(Mutex<bool>, Condvar),
    liveness: &Liveness,
    source: &StatusSource,
    timing: Option<WatchdogTiming>,
    mut last_status: String,
) {
    let tick = timing.map_or(STATUS_EVERY, |t| t.ping_every.min(STATUS_EVERY));
    let mut was_stalled: Vec<&'static str> = Vec::new();
    let (flag, wake) = stop;
    let mut stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
    // Ends when `stopping()` (or the drop of the Service) sets the flag.
    while !*stopped {
        let (guard, _) = wake
            .wait_timeout(stopped, tick)
            .unwrap_or_else(|e| e.into_inner());
        stopped = guard;
        if *stopped {
            break;
        }
        let stalled = match timing {
            Some(t) => liveness.stalled(Instant::now(), t.stall_after),
            None => Vec::new(),
        };
        for s in stalled.iter().filter(|s| !was_stalled.contains(&s.name)) {
            tracing::error!(
                component = s.name,
                silent_ms = u64::try_from(s.silent_for.as_millis()).unwrap_or(u64::MAX),
                "core stalled: withholding watchdog pings, systemd will restart the relay"
            );
        }
        if stalled.is_empty() && !was_stalled.is_empty() {
            tracing::warn!(components = ?was_stalled, "core running again: watchdog pings resume");
        }
        was_stalled = stalled.iter().map(|s| s.name).collect();
        let status = status_line(source, &stalled);
        let mut states = Vec::with_capacity(2);
        if timing.is_some() && stalled.is_empty() {
            states.push(NotifyState::Watchdog);
        }
        if status != last_status {
            states.push(NotifyState::Status(&status));
        }
        if !states.is_empty() {
            send(&states);
        }
        last_status = status;
    }
}

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// The `STATUS=` text: the hub link, the backlog, and the stalled core loops if any.
pub fn status_line(source: &StatusSource, stalled: &[Stalled]) -> String {
    let records = source.outbox.records.load(Ordering::Relaxed);
    let bytes = source.outbox.bytes.load(Ordering::Relaxed);
    let link = match &source.uplink {
        None => "no uplink",
        Some(u) if u.connected.load(Ordering::Relaxed) => "hub connected",
        Some(_) => "hub disconnected",
    };
    let mut line = format!(
        "{link}, backlog {records} record{} ({})",
        if records == 1 { "" } else { "s" },
        human_bytes(bytes)
    );
    if !stalled.is_empty() {
        let silent: Vec<String> = stalled
            .iter()
            .map(|s| format!("{} silent for {:.1}s", s.name, s.silent_for.as_secs_f64()))
            .collect();
        line = format!(
            "STALLED: {}, watchdog pings withheld; {line}",
            silent.join(", ")
        );
    }
    line
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Precision loss above 2^53 bytes does not matter for one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// True when stderr is the journal stream systemd connected us to: `JOURNAL_STREAM` is
/// `<device>:<inode>` of that stream, and only counts when stderr still is it.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => journal_stream_is(&value, meta.dev(), meta.ino()),
        Err(_) => false,
    }
}

/// Whether a `JOURNAL_STREAM` value names the file with `dev` and `ino`.
fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// The journald layer: native protocol, `SYSLOG_IDENTIFIER=relaybox`, the relay's fields
/// prefixed with [`JOURNAL_FIELD_PREFIX`], syslog priorities (info is 6, debug and trace 7).
pub fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    Ok(tracing_journald::layer()?
        .with_syslog_identifier("relaybox".to_owned())
        .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.to_owned()))
        .with_priority_mappings(PriorityMappings {
            error: Priority::Error,
            warn: Priority::Warning,
            info: Priority::Informational,
            debug: Priority::Debug,
            trace: Priority::Debug,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(records: u64, bytes: u64, uplink: Option<bool>) -> StatusSource {
        let outbox = Arc::new(OutboxStats::default());
        outbox.records.store(records, Ordering::Relaxed);
        outbox.bytes.store(bytes, Ordering::Relaxed);
        let uplink = uplink.map(|connected| {
            let status = Arc::new(UplinkStatus::default());
            status.connected.store(connected, Ordering::Relaxed);
            status
        });
        StatusSource { outbox, uplink }
    }

    #[test]
    fn status_lines() {
        let committer = Stalled {
            name: "outbox committer",
            silent_for: Duration::from_millis(7_250),
        };
        let uplink = Stalled {
            name: "uplink",
            silent_for: Duration::from_millis(3_040),
        };
        let cases: Vec<(StatusSource, Vec<Stalled>, &str)> = vec![
            (
                source(0, 0, None),
                vec![],
                "no uplink, backlog 0 records (0 B)",
            ),
            (
                source(1, 120, Some(true)),
                vec![],
                "hub connected, backlog 1 record (120 B)",
            ),
            (
                source(12_000, 3 * 1024 * 1024 + 512 * 1024, Some(false)),
                vec![],
                "hub disconnected, backlog 12000 records (3.5 MiB)",
            ),
            (
                source(5, 2048, Some(true)),
                vec![committer.clone()],
                "STALLED: outbox committer silent for 7.2s, watchdog pings withheld; \
                 hub connected, backlog 5 records (2.0 KiB)",
            ),
            (
                source(5, 2048, Some(false)),
                vec![committer, uplink],
                "STALLED: outbox committer silent for 7.2s, uplink silent for 3.0s, \
                 watchdog pings withheld; hub disconnected, backlog 5 records (2.0 KiB)",
            ),
        ];
        for (src, stalled, want) in &cases {
            assert_eq!(status_line(src, stalled), *want);
        }
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(256 * 1024 * 1024), "256.0 MiB");
        assert_eq!(
            human_bytes(3 * 1024 * 1024 * 1024 * 1024 * 1024),
            "3072.0 TiB"
        );
    }

    #[test]
    fn journal_stream_values() {
        assert!(journal_stream_is("2049:123456", 2049, 123_456));
        assert!(journal_stream_is("2049:123456\n", 2049, 123_456));
        assert!(!journal_stream_is("2049:123457", 2049, 123_456));
        assert!(!journal_stream_is("2048:123456", 2049, 123_456));
        assert!(!journal_stream_is("", 2049, 123_456));
        assert!(!journal_stream_is("2049", 2049, 123_456));
        assert!(!journal_stream_is("x:y", 2049, 123_456));
    }

    #[test]
    fn watchdog_timing() {
        let t = WatchdogTiming::for_timeout(Duration::from_secs(30));
        assert_eq!(t.ping_every, Duration::from_millis(7_500));
        assert_eq!(t.stall_after, Duration::from_secs(15));
        // A short watchdog keeps the stall limit above the committer's idle beat.
        let t = WatchdogTiming::for_timeout(Duration::from_secs(2));
        assert_eq!(t.ping_every, Duration::from_millis(500));
        assert_eq!(t.stall_after, MIN_STALL_AFTER);
    }
}
