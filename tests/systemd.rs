//! systemd integration, with the test playing systemd's side against the real binary:
//! - the notify protocol on a `NOTIFY_SOCKET` datagram socket with `WATCHDOG_USEC` set: READY
//!   only once MQTT is served and the store exists, watchdog pings, STATUS with the hub link and
//!   the backlog, pings that go on while the hub is away, STOPPING on SIGTERM and exit 0;
//! - a real stall: the store lives on a FUSE mount (bindfs) whose daemon the test freezes with
//!   SIGSTOP, the way a dying SD card stops answering; the outbox committer hangs in its write,
//!   the pings stop, and come back when the "disk" does;
//! - journald: stderr is a socket whose device:inode is in `JOURNAL_STREAM`, and in a private
//!   mount namespace the test's own datagram socket is `/run/systemd/journal/socket`, so the
//!   native-protocol entries (with their fields) arrive at the test.
//!
//! Needs root (FUSE mount, mount namespace) and bindfs; `scripts/test` installs bindfs.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    free_port, port_open, publish_all_v4, send_signal, tail, wait_exit, NatsHub, RelayConfig,
    RELAY_BIN, STOP_TIMEOUT,
};
use tempfile::TempDir;

/// `WATCHDOG_USEC` the tests hand the relay: pings every 500 ms, a core loop silent for more
/// than 3 s (the relay's floor) is stalled.
const WATCHDOG_USEC: u64 = 2_000_000;
const PING_EVERY: Duration = Duration::from_millis(500);
const STALL_AFTER: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// systemd's side of the notify protocol
// ---------------------------------------------------------------------------------------------

/// One datagram from the relay.
#[derive(Debug, Clone)]
struct Notice {
    at: Instant,
    fields: Vec<(String, String)>,
}

impl Notice {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn is_ping(&self) -> bool {
        self.get("WATCHDOG") == Some("1")
    }
}

/// A `NOTIFY_SOCKET` that records every datagram with its arrival time.
struct NotifySocket {
    path: PathBuf,
    received: Arc<Mutex<Vec<Notice>>>,
    done: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let received = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let reader = std::thread::spawn({
            let received = received.clone();
            let done = done.clone();
            move || {
                let mut buf = vec![0u8; 64 * 1024];
                // Ends when the test drops the socket (sets `done`).
                while !done.load(Ordering::Relaxed) {
                    let Ok(n) = socket.recv(&mut buf) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let fields = text
                        .lines()
                        .filter_map(|l| l.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect();
                    received.lock().expect("notices").push(Notice {
                        at: Instant::now(),
                        fields,
                    });
                }
            }
        });
        NotifySocket {
            path,
            received,
            done,
            reader: Some(reader),
        }
    }

    fn all(&self) -> Vec<Notice> {
        self.received.lock().expect("notices").clone()
    }

    /// Waits (bounded) for the first notice that satisfies `pred`, returns it.
    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Notice) -> bool,
    ) -> Notice {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(n) = self.all().into_iter().find(&pred) {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; got: {:#?}",
                self.summary()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) for a notice after `after` that satisfies `pred`.
    async fn wait_for_after(
        &self,
        what: &str,
        after: Instant,
        timeout: Duration,
        pred: impl Fn(&Notice) -> bool,
    ) -> Notice {
        self.wait_for(what, timeout, |n| n.at > after && pred(n))
            .await
    }

    fn pings_between(&self, from: Instant, to: Instant) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|n| n.is_ping() && n.at > from && n.at <= to)
            .map(|n| n.at)
            .collect()
    }

    /// Waits `quiet`, then asserts that no ping came after `since`.
    async fn assert_no_pings_after(&self, since: Instant, quiet: Duration, while_what: &str) {
        tokio::time::sleep(quiet).await;
        let during = self.pings_between(since, Instant::now());
        assert!(
            during.is_empty(),
            "{} pings while {while_what}: {:#?}",
            during.len(),
            self.summary()
        );
    }

    fn summary(&self) -> Vec<String> {
        let all = self.all();
        let t0 = all.first().map(|n| n.at);
        all.iter()
            .map(|n| {
                let t = t0.map_or(0.0, |t0| n.at.duration_since(t0).as_secs_f64());
                let f: Vec<String> = n.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("+{t:.2}s {}", f.join(" | "))
            })
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The real binary started the way systemd starts it: config file, notify socket and
/// watchdog in the environment, stderr to a log file.
struct Service {
    child: Option<Child>,
    log: PathBuf,
}

impl Service {
    fn start(config: &Path, dir: &Path, notify: &NotifySocket) -> Service {
        let log = dir.join("relay.log");
        let out = File::create(&log).expect("log file");
        let child = Command::new(RELAY_BIN)
            .args(["run", "--config"])
            .arg(config)
            .current_dir(dir)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn relaybox");
        Service {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; returns the exit status (panics if the process does not exit in time).
    async fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        send_signal(&child, libc::SIGTERM);
        match wait_exit(&mut child, STOP_TIMEOUT).await {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
                    tail(&self.log(), 40)
                );
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "relaybox log of the failed test:\n{}",
                tail(&self.log(), 60)
            );
        }
    }
}

/// Writes a config for a relay exporting `sensors/#` to `hub_url`, data in `data_dir`.
/// Returns the config's path, the MQTT port and the admin port.
fn write_config(dir: &Path, data_dir: &Path, hub_url: &str) -> (PathBuf, u16, u16) {
    let cfg = RelayConfig::new("sd-test")
        .uplink(hub_url)
        .export("sensors/#");
    let path = dir.join("relaybox.toml");
    fs::write(&path, cfg.toml(data_dir)).expect("write config");
    (path, cfg.mqtt_port, cfg.admin_port)
}

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

// ---------------------------------------------------------------------------------------------
// The notify protocol
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_pings_status_and_stopping() {
    let mut hub = NatsHub::start().await;
    let dir = temp_dir("relaybox-sd-");
    let data_dir = dir.path().join("data");
    let (config, port, _) = write_config(dir.path(), &data_dir, &hub.url());
    let notify = NotifySocket::bind(dir.path());
    let mut relay = Service::start(&config, dir.path(), &notify);

    // READY=1 comes once MQTT is served and the store is open: check both the moment it lands.
    let ready = notify
        .wait_for("READY=1", Duration::from_secs(15), |n| {
            n.get("READY") == Some("1")
        })
        .await;
    assert!(
        port_open(port),
        "READY=1 before port {port} accepted connections"
    );
    let segments = std::fs::read_dir(data_dir.join("log"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
            })
            .count()
        })
        .unwrap_or(0);
    assert!(segments > 0, "READY=1 before the store's log existed");
    publish_all_v4(
        port,
        "sd-ready",
        "local/x",
        vec![b"x".to_vec()],
        Duration::from_secs(10),
    )
    .await;
    let status = ready.get("STATUS").expect("READY carries a STATUS");
    assert!(status.contains("backlog 0 records"), "{status}");
    let before_ready: Vec<_> = notify
        .all()
        .into_iter()
        .filter(|n| n.at < ready.at)
        .collect();
    assert!(
        before_ready.is_empty(),
        "notices before READY: {before_ready:?}"
    );

    // Pings: every quarter of the watchdog interval.
    let window_start = Instant::now();
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    let pings = notify.pings_between(window_start, Instant::now());
    assert!(
        pings.len() >= 4,
        "{} pings in 2.6 s: {:#?}",
        pings.len(),
        notify.summary()
    );
    let gaps_ok = pings.windows(2).all(|w| w[1] - w[0] < PING_EVERY * 2);
    assert!(gaps_ok, "ping gaps too long: {:#?}", notify.summary());
    notify
        .wait_for("STATUS: hub connected", Duration::from_secs(10), |n| {
            n.get("STATUS") == Some("hub connected, backlog 0 records (0 B)")
        })
        .await;

    // The hub goes away: messages wait in the outbox and the status says so; waiting for the
    // hub is not a stall, the pings go on.
    hub.stop().await;
    let outage = Instant::now();
    let payloads = (0..5).map(|i| format!("m{i}").into_bytes()).collect();
    publish_all_v4(
        port,
        "sd-outage",
        "sensors/t",
        payloads,
        Duration::from_secs(10),
    )
    .await;
    let disconnected = notify
        .wait_for_after(
            "STATUS: disconnected with backlog 5",
            outage,
            Duration::from_secs(15),
            |n| {
                n.get("STATUS")
                    .is_some_and(|s| s.starts_with("hub disconnected, backlog 5 records ("))
            },
        )
        .await;
    let hold = STALL_AFTER + Duration::from_secs(2);
    tokio::time::sleep(hold.saturating_sub(disconnected.at.elapsed())).await;
    let outage_pings = notify.pings_between(outage, Instant::now());
    let span = outage.elapsed();
    assert!(
        outage_pings.len() as f64 >= span.as_secs_f64() / PING_EVERY.as_secs_f64() * 0.6,
        "{} pings in {span:?} of hub outage: {:#?}",
        outage_pings.len(),
        notify.summary()
    );
    assert!(!notify
        .all()
        .iter()
        .any(|n| n.get("STATUS").is_some_and(|s| s.contains("STALLED"))));

    // The hub is back: the backlog drains and the status says so.
    hub.restart().await;
    let back = Instant::now();
    notify
        .wait_for_after("STATUS: drained", back, Duration::from_secs(30), |n| {
            n.get("STATUS") == Some("hub connected, backlog 0 records (0 B)")
        })
        .await;

    // SIGTERM: STOPPING=1, no more pings, exit 0.
    let term = Instant::now();
    let exit = relay.sigterm().await;
    assert!(
        exit.success(),
        "exit after SIGTERM: {exit}\n{}",
        tail(&relay.log(), 30)
    );
    let stopping = notify
        .wait_for_after("STOPPING=1", term, Duration::from_secs(2), |n| {
            n.get("STOPPING") == Some("1")
        })
        .await;
    let late = notify.pings_between(stopping.at, Instant::now());
    assert!(
        late.is_empty(),
        "pings after STOPPING: {:#?}",
        notify.summary()
    );
    assert!(
        relay.log().contains("relaybox stopped"),
        "{}",
        tail(&relay.log(), 20)
    );
}

// ---------------------------------------------------------------------------------------------
// A real stall: the store's disk stops answering
// ---------------------------------------------------------------------------------------------

/// A bindfs (FUSE) view of `src` at `mnt`; its daemon runs in the foreground as our child, so
/// SIGSTOP freezes every file operation on the mount.
struct FrozenDisk {
    mnt: PathBuf,
    daemon: Option<Child>,
}

impl FrozenDisk {
    async fn mount(src: &Path, mnt: &Path) -> FrozenDisk {
        fs::create_dir_all(src).expect("src dir");
        fs::create_dir_all(mnt).expect("mnt dir");
        let daemon = Command::new("bindfs")
            .arg("-f")
            .arg(src)
            .arg(mnt)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run bindfs ({e}): scripts/test installs it"));
        let disk = FrozenDisk {
            mnt: mnt.to_path_buf(),
            daemon: Some(daemon),
        };
        let shown = mnt.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(shown.as_str()))
        {
            assert!(Instant::now() < deadline, "bindfs did not mount {shown}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        disk
    }

    fn signal(&self, signal: libc::c_int) {
        send_signal(self.daemon.as_ref().expect("daemon"), signal);
    }

    /// A guard that thaws the disk when dropped. Declared after the relay, it is dropped
    /// before it: a relay that exits while its disk is frozen hangs in the kernel until the
    /// disk answers, and so would the test that waits for it.
    fn thaw_on_drop(&self) -> Thaw {
        let pid = self.daemon.as_ref().expect("daemon").id();
        Thaw(libc::pid_t::try_from(pid).expect("pid fits pid_t"))
    }
}

struct Thaw(libc::pid_t);

impl Drop for Thaw {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the bindfs daemon this test spawned; it is reaped only later,
        // by FrozenDisk's drop.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// An MQTT 3.1.1 client that is connected (CONNACK received) when this returns.
async fn connected_client(port: u16, id: &str) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("{id}: cannot connect: {e}"),
            }
        }
    })
    .await;
    assert!(connected.is_ok(), "{id}: no CONNACK within 10 s");
    (client, events)
}

impl Drop for FrozenDisk {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // Thaw first, or the unmount and everything touching the mount would hang.
            send_signal(&d, libc::SIGCONT);
            let _ = Command::new("umount").arg("--lazy").arg(&self.mnt).status();
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_stops_the_pings_until_it_answers_again() {
    let hub = NatsHub::start().await;
    let dir = temp_dir("relaybox-sd-stall-");
    let disk = FrozenDisk::mount(&dir.path().join("disk"), &dir.path().join("mnt")).await;
    let data_dir = dir.path().join("mnt").join("data");
    let (config, port, _) = write_config(dir.path(), &data_dir, &hub.url());
    let notify = NotifySocket::bind(dir.path());
    let mut relay = Service::start(&config, dir.path(), &notify);
    let _thaw = disk.thaw_on_drop();
    notify
        .wait_for("READY=1", Duration::from_secs(15), |n| {
            n.get("READY") == Some("1")
        })
        .await;
    publish_all_v4(
        port,
        "sd-before",
        "sensors/a",
        vec![b"a".to_vec()],
        Duration::from_secs(10),
    )
    .await;
    // Connected before the freeze, so that the publish below reaches the outbox at once.
    let (client, mut events) = connected_client(port, "sd-stuck").await;
    let healthy = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let healthy_pings = notify.pings_between(healthy, Instant::now());
    assert!(
        healthy_pings.len() >= 2,
        "no pings while healthy: {:#?}",
        notify.summary()
    );

    // The disk stops answering; an exported QoS 1 publish makes the committer write to it.
    disk.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    client
        .publish("sensors/b", rumqttc::QoS::AtLeastOnce, false, b"b".to_vec())
        .await
        .expect("queue publish");
    let acked = tokio::spawn(async move {
        // Bounded by the timeout below; ends at the PUBACK or a connection error.
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return Ok(events),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    let stalled = notify
        .wait_for_after("STATUS: committer STALLED", frozen, STALL_AFTER * 3, |n| {
            n.get("STATUS").is_some_and(|s| {
                s.starts_with("STALLED: ") && s.contains("outbox committer silent for")
            })
        })
        .await;
    let last_ping = notify
        .pings_between(healthy, Instant::now())
        .last()
        .copied();
    notify
        .assert_no_pings_after(
            stalled.at,
            Duration::from_secs(2),
            "the committer was stalled",
        )
        .await;
    if let Some(last) = last_ping {
        assert!(
            last.saturating_duration_since(frozen) <= STALL_AFTER + PING_EVERY * 3,
            "pings went on {:?} into the stall",
            last.saturating_duration_since(frozen)
        );
    }
    assert!(
        !acked.is_finished(),
        "the publish was acknowledged while the disk was frozen"
    );

    // The disk answers again: the commit completes, the publish is acknowledged, pings resume.
    disk.signal(libc::SIGCONT);
    let thawed = Instant::now();
    notify
        .wait_for_after(
            "pings after the thaw",
            thawed,
            Duration::from_secs(10),
            Notice::is_ping,
        )
        .await;
    let events = tokio::time::timeout(Duration::from_secs(30), acked)
        .await
        .expect("the publish is acknowledged after the thaw")
        .expect("publisher task")
        .expect("connection");
    drop((client, events));
    let log = relay.log();
    assert!(
        log.contains("core stalled") && log.contains("outbox committer"),
        "no stall in the log:\n{}",
        tail(&log, 30)
    );
    assert!(log.contains("core running again"), "{}", tail(&log, 30));

    let exit = relay.sigterm().await;
    assert!(
        exit.success(),
        "exit after SIGTERM: {exit}\n{}",
        tail(&relay.log(), 30)
    );
}

// ---------------------------------------------------------------------------------------------
// journald
// ---------------------------------------------------------------------------------------------

/// Parses one journald native-protocol datagram (`NAME=value\n`, or `NAME\n` + 64-bit LE length
/// + bytes + `\n` for values that may hold anything).
fn parse_journal_entry(mut b: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while !b.is_empty() {
        let end = b
            .iter()
            .position(|&c| c == b'\n' || c == b'=')
            .expect("field name ends");
        let name = String::from_utf8_lossy(&b[..end]).into_owned();
        if b[end] == b'=' {
            let rest = &b[end + 1..];
            let nl = rest.iter().position(|&c| c == b'\n').expect("value ends");
            fields.insert(name, String::from_utf8_lossy(&rest[..nl]).into_owned());
            b = &rest[nl + 1..];
        } else {
            let rest = &b[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("length")) as usize;
            let value = &rest[8..8 + len];
            assert_eq!(rest[8 + len], b'\n', "value of {name} ends with a newline");
            fields.insert(name, String::from_utf8_lossy(value).into_owned());
            b = &rest[8 + len + 1..];
        }
    }
    fields
}

fn dev_ino(fd: &impl AsRawFd) -> (u64, u64) {
    // SAFETY: fstat on a descriptor we own, into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    assert_eq!(rc, 0, "fstat");
    (st.st_dev, st.st_ino)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_go_to_journald_with_fields_when_stderr_is_the_journal_stream() {
    let dir = temp_dir("relaybox-sd-journal-");
    let journal_dir = dir.path().join("journal");
    fs::create_dir_all(&journal_dir).expect("journal dir");
    let journal = UnixDatagram::bind(journal_dir.join("socket")).expect("bind journal socket");
    journal
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    // An uplink in core mode to a hub that is not there: a warning at start.
    let mut cfg =
        RelayConfig::new("sd-journal").uplink(&format!("nats://127.0.0.1:{}", free_port()));
    cfg.uplink_mode = "core";
    let data_dir = dir.path().join("data");
    let config = dir.path().join("relaybox.toml");
    fs::write(&config, cfg.toml(&data_dir)).expect("config");

    // stderr is a stream socket, as systemd's journal stream is; JOURNAL_STREAM names it.
    let (stream_ours, stream_theirs) = UnixStream::pair().expect("socketpair");
    let (dev, ino) = dev_ino(&stream_theirs);
    // In a private mount namespace, /run/systemd/journal is the test's directory, so the
    // relay's native-protocol datagrams reach the test socket.
    let script = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
                  && mount --bind \"$0\" /run/systemd/journal && exec \"$@\"";
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ])
        .arg(&journal_dir)
        .arg(RELAY_BIN)
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("JOURNAL_STREAM", format!("{dev}:{ino}"))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(OwnedFd::from(stream_theirs)))
        .spawn()
        .expect("spawn unshare");

    let mut entries: Vec<BTreeMap<String, String>> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(15);
    while !entries
        .iter()
        .any(|e| e.get("MESSAGE").map(String::as_str) == Some("relaybox ready"))
    {
        if Instant::now() >= deadline || child.try_wait().expect("try_wait").is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no `relaybox ready` entry; got {entries:#?}");
        }
        if let Ok(n) = journal.recv(&mut buf) {
            if n > 0 {
                entries.push(parse_journal_entry(&buf[..n]));
            }
        }
    }
    assert!(port_open(cfg.mqtt_port), "not serving MQTT");
    send_signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, STOP_TIMEOUT).await;
    // Whatever was sent before the exit is queued on the socket.
    while let Ok(n) = journal.recv(&mut buf) {
        entries.push(parse_journal_entry(&buf[..n]));
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?}; entries {entries:#?}"
    );

    let find = |msg: &str| {
        entries
            .iter()
            .find(|e| e.get("MESSAGE").is_some_and(|m| m.starts_with(msg)))
            .unwrap_or_else(|| panic!("no `{msg}` entry in {entries:#?}"))
    };
    let ready = find("relaybox ready");
    let want = [
        ("PRIORITY", "6".to_owned()),
        ("SYSLOG_IDENTIFIER", "relaybox".to_owned()),
        ("TARGET", "relaybox::app".to_owned()),
        ("CODE_FILE", "src/app.rs".to_owned()),
        ("RELAYBOX_LISTEN", format!("127.0.0.1:{}", cfg.mqtt_port)),
        ("RELAYBOX_DATA_DIR", data_dir.display().to_string()),
    ];
    for (k, v) in &want {
        assert_eq!(ready.get(*k), Some(v), "{k} of {ready:#?}");
    }
    assert!(
        ready
            .get("CODE_LINE")
            .is_some_and(|l| l.parse::<u32>().is_ok()),
        "{ready:#?}"
    );
    let warning = find("uplink mode is core");
    assert_eq!(
        warning.get("PRIORITY").map(String::as_str),
        Some("4"),
        "{warning:#?}"
    );
    let stopped = find("relaybox stopped");
    assert_eq!(
        stopped.get("RELAYBOX_APPENDED").map(String::as_str),
        Some("0"),
        "{stopped:#?}"
    );
    assert_eq!(
        stopped.get("RELAYBOX_CLEAN").map(String::as_str),
        Some("true"),
        "{stopped:#?}"
    );

    // Nothing was written to the stream: the journal got each line once, with its fields.
    let mut ours = stream_ours;
    ours.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut text = String::new();
    let _ = ours.read_to_string(&mut text);
    assert_eq!(text, "", "the relay also wrote to the journal stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inherited_journal_stream_that_is_not_stderr_means_stderr() {
    let dir = temp_dir("relaybox-sd-nojournal-");
    let cfg = RelayConfig::new("sd-nojournal");
    let config = dir.path().join("relaybox.toml");
    fs::write(&config, cfg.toml(&dir.path().join("data"))).expect("config");
    let log = dir.path().join("stderr.log");
    // stderr is a file; JOURNAL_STREAM names the device and inode of some other file.
    let other = File::create(dir.path().join("other")).expect("other file");
    let (dev, ino) = dev_ino(&other);
    let mut child = Command::new(RELAY_BIN)
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("JOURNAL_STREAM", format!("{dev}:{ino}"))
        .env("NO_COLOR", "1")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log"))
        .spawn()
        .expect("spawn relaybox");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("relaybox ready")
    {
        if Instant::now() >= deadline || child.try_wait().expect("try_wait").is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "no `relaybox ready` on stderr:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, STOP_TIMEOUT).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    let text = fs::read_to_string(&log).expect("log");
    assert!(text.contains("relaybox stopped"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// The packaged default config
// ---------------------------------------------------------------------------------------------

#[test]
fn the_packaged_default_config_is_a_safe_start() {
    let text = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/relaybox.toml"
    ))
    .expect("packaging/relaybox.toml");
    let c = relaybox::config::Config::parse(&text, "packaging/relaybox.toml").expect("parses");
    // Until clients must authenticate, the packaged broker answers only on the box itself.
    assert!(c.mqtt.listen.ip().is_loopback(), "listen {}", c.mqtt.listen);
    assert_eq!(c.mqtt.listen.port(), 1883);
    // The unit's StateDirectory=relaybox.
    assert_eq!(c.relay.data_dir, PathBuf::from("/var/lib/relaybox"));
    assert!(
        c.uplink.is_none(),
        "a hub url cannot be known before the admin sets it"
    );
}
