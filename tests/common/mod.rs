//! Test harness shared by the behaviour tests: the real `relaybox` binary, a real nats-server
//! hub, real MQTT clients (rumqttc) and a tiny raw MQTT codec for the byte-level tests.
//!
//! Everything listens on 127.0.0.1 only. Every wait is bounded: a helper that cannot reach its
//! goal in time panics with what it observed, so a test fails instead of hanging.

// Each test binary uses a different subset of the helpers.
#![allow(dead_code)]

pub mod browser;
pub mod modbus_sim;
pub mod netns;
pub mod proxy;
pub mod pty;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tempfile::TempDir;

/// The binary under test, built by cargo for this test run.
pub const RELAY_BIN: &str = env!("CARGO_BIN_EXE_relaybox");
/// The nats-server used as the hub: `RELAYBOX_TEST_NATS_SERVER` (scripts/test runs the hub
/// tests again with nats-server 2.15 from `scripts/nats-server-2.15`), else Debian's 2.9.10.
pub fn nats_server() -> String {
    std::env::var("RELAYBOX_TEST_NATS_SERVER")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "/usr/sbin/nats-server".to_owned())
}
/// The subject prefix every test config uses.
pub const PREFIX: &str = "org.office";
/// The stream every test config names.
pub const STREAM: &str = "RELAYBOX";

/// How long a process may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// A TCP port on 127.0.0.1 that was free a moment ago and that no other test process and no
/// other test of this one has been given: `scripts/test` runs many test processes side by side
/// (cargo-nextest), and tests in one process run in parallel. Each port handed out is reserved
/// by an exclusive lock on a file named after it (see [`reserve_port`]), held until the process
/// ends; the kernel lets the lock go when the process dies, however it dies.
///
/// The port comes from below the kernel's ephemeral range. Ports the kernel picks by itself —
/// for a listener on port 0 (a relay's internal broker servers) or as the source port of an
/// outgoing connection — come from that range, so none of them can take a port a test chose
/// for a relay or a hub between the choice and the bind.
pub fn free_port() -> u16 {
    const LOWEST: u32 = 10_000;
    static NEXT: OnceLock<Mutex<u32>> = OnceLock::new();
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_low > LOWEST + 1_000,
        "the ephemeral port range starts at {ephemeral_low}: too low to leave room for test ports"
    );
    let span = ephemeral_low - LOWEST;
    let next = NEXT.get_or_init(|| Mutex::new(std::process::id() * 7_919 % span));
    let mut next = next.lock().expect("port cursor");
    for _ in 0..4_000 {
        let port = LOWEST + *next % span;
        *next = (*next + 1) % span;
        let port = u16::try_from(port).expect("ports below the ephemeral range fit in u16");
        if reserve_port(port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral_low} found in 4000 attempts");
}

/// Reserves `port` for this process: false when another process (or this one, earlier) holds
/// it. The lock files live in the system's temporary directory and are never removed: an
/// empty file per port ever used, and a lock only while its process lives.
fn reserve_port(port: u16) -> bool {
    static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("relaybox-test-ports");
    if let Err(e) = fs::create_dir_all(&dir) {
        panic!(
            "cannot make the port reservations' folder {}: {e}",
            dir.display()
        );
    }
    let path = dir.join(port.to_string());
    let file = match File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) => panic!("cannot open the port reservation {}: {e}", path.display()),
    };
    // flock(2): the lock belongs to this open file, so the same process opening the file again
    // is refused too, and it ends with the process.
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        HELD.lock().expect("held port reservations").push(file);
        return true;
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return false;
    }
    panic!("cannot lock the port reservation {}: {e}", path.display())
}

/// The path of the project's Python with the pinned test packages (paho-mqtt, pymodbus),
/// installed by `scripts/interop-python` into `.venv/` when missing.
pub fn interop_python() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(format!("{root}/scripts/interop-python"))
        .output()
        .expect("run scripts/interop-python");
    assert!(
        out.status.success(),
        "scripts/interop-python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// GETs `path` from the relay's admin endpoint.
pub async fn admin_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .expect("admin connect in time")
    .expect("admin endpoint reachable");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send request");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("admin answers in time")
        .expect("read answer");
    let text = String::from_utf8(out).expect("utf-8 answer");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The relay's `/status` JSON.
pub async fn admin_status(port: u16) -> serde_json::Value {
    serde_json::from_str(&admin_get(port, "/status").await).expect("status is JSON")
}

/// Waits until the relay's hub link is up (what it accepts from then on is live, sent in the
/// order it came; what it accepted before is backlog); panics after `timeout`.
pub async fn wait_hub_link(admin_port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while admin_status(admin_port).await["uplink"]["connected"] != true {
        assert!(
            Instant::now() < deadline,
            "the relay's hub link is not up within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the relay's outbox is empty (the hub acknowledged everything it accepted) and
/// returns that `/status`; panics with the last status after `timeout`.
pub async fn wait_outbox_empty(admin_port: u16, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = admin_status(admin_port).await;
        if status["outbox"]["messages"] == 0 {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox is not empty after {timeout:?}: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().expect("socket addr"),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Polls `cond` every 50 ms until it is true or `timeout` passed; returns whether it became true.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Waits (bounded) for `child` to exit; `None` if it is still running after `timeout`.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_to_string_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The last `n` lines of a log, for failure messages.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The hub: a real nats-server with JetStream
// ---------------------------------------------------------------------------------------------

/// A nats-server with JetStream on 127.0.0.1, its store in a temp dir. It can be stopped and
/// started again on the same port with the same store; it is killed when dropped.
pub struct NatsHub {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    starts: usize,
    /// A config file given to the server (a cluster node's `server_name` and `cluster` block).
    conf: Option<String>,
}

impl NatsHub {
    /// Where the server keeps its JetStream store (and its log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a hub on a fresh port.
    pub async fn start() -> NatsHub {
        NatsHub::start_on(free_port()).await
    }

    /// Starts a hub on `port` (e.g. one a relay was already configured with).
    pub async fn start_on(port: u16) -> NatsHub {
        NatsHub::start_with(port, None).await
    }

    /// Starts a hub on a fresh port with `conf` as its config file (accounts, permissions).
    pub async fn start_conf(conf: &str) -> NatsHub {
        NatsHub::start_with(free_port(), Some(conf.to_owned())).await
    }

    /// Starts a hub on `port` with `conf` as its config file (a cluster node's).
    async fn start_with(port: u16, conf: Option<String>) -> NatsHub {
        let mut hub = NatsHub {
            port,
            dir: tempfile::Builder::new()
                .prefix("relaybox-hub-")
                .tempdir()
                .expect("hub temp dir"),
            child: None,
            starts: 0,
            conf,
        };
        hub.restart().await;
        hub
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("nats-{}.log", self.starts))
    }

    /// The current (or last) run's log.
    pub fn log(&self) -> String {
        read_to_string_lossy(&self.log_path())
    }

    /// Starts the server again on the same port and store dir (it must be stopped).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "hub is already running");
        self.starts += 1;
        let store = self.dir.path().join("js");
        fs::create_dir_all(&store).expect("hub store dir");
        let log = File::create(self.log_path()).expect("hub log file");
        let mut cmd = Command::new(nats_server());
        if let Some(conf) = &self.conf {
            let path = self.dir.path().join("nats.conf");
            fs::write(&path, conf).expect("write the server's config");
            cmd.arg("-c").arg(path);
        }
        let child = cmd
            .args(["-js", "-sd"])
            .arg(&store)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        // A port freed a moment ago may still be taken by a lingering socket: the server then
        // exits, and one retry after a pause is enough in practice.
        let port = self.port;
        let ready = {
            let log_path = self.log_path();
            let child = self.child.as_mut().expect("child");
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if read_to_string_lossy(&log_path).contains("Server is ready") && port_open(port) {
                    break true;
                }
                if child.try_wait().expect("try_wait").is_some() || Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if !ready {
            let log = self.log();
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            panic!(
                "nats-server on port {} not ready within {:?}; log:\n{}",
                self.port,
                READY_TIMEOUT,
                tail(&log, 30)
            );
        }
    }

    /// Stops the server and starts it again with `conf` as its config, as a hub administrator
    /// changes permissions or limits (a reload, SIGHUP, leaves nats-server 2.9's JetStream
    /// deaf to the account whose users changed).
    pub async fn restart_with(&mut self, conf: &str) {
        self.stop().await;
        self.conf = Some(conf.to_owned());
        self.restart().await;
    }

    /// Sends `signal` to the running server (SIGSTOP, SIGCONT).
    pub fn signal(&self, signal: libc::c_int) {
        send_signal(self.child.as_ref().expect("hub is not running"), signal);
    }

    /// kill -9 of the server; [`NatsHub::restart`] starts it again on its port and store.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (JetStream flushes its store).
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("hub is not running");
        send_signal(&child, libc::SIGTERM);
        if wait_exit(&mut child, STOP_TIMEOUT).await.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server did not exit within {STOP_TIMEOUT:?} of SIGTERM");
        }
        // The port must be connectable again only by the next start.
        assert!(
            wait_until(Duration::from_secs(5), || !port_open(self.port)).await,
            "hub port {} still open after stop",
            self.port
        );
    }

    /// A plain client connection to the hub.
    pub async fn client(&self) -> async_nats::Client {
        connect(&self.url()).await
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.client().await)
    }

    /// Creates the test stream (`RELAYBOX`, subjects `org.office.>`), as a hub admin would.
    pub async fn create_stream(&self) {
        self.jetstream()
            .await
            .get_or_create_stream(jetstream::stream::Config {
                name: STREAM.to_owned(),
                subjects: vec![format!("{PREFIX}.>")],
                ..Default::default()
            })
            .await
            .expect("create stream");
    }
}

/// A hub of three nats-servers clustered on 127.0.0.1, each with JetStream; kill or stop any
/// node and start it again on its port and store.
pub struct NatsCluster {
    pub nodes: Vec<NatsHub>,
    /// Each node's monitoring port (`/connz`).
    pub monitor: Vec<u16>,
}

impl NatsCluster {
    pub async fn start() -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let monitor: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = ports
            .iter()
            .map(|(_, route)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let conf = format!(
                "server_name: n{i}\nhttp: 127.0.0.1:{}\ncluster {{\n  name: hub\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n",
                monitor[i]
            );
            nodes.push(NatsHub::start_with(*port, Some(conf)).await);
        }
        let cluster = NatsCluster { nodes, monitor };
        cluster.wait_jetstream().await;
        cluster
    }

    /// The node a client named `name` is connected to (from each node's `/connz`).
    pub async fn node_of_client(&self, name: &str) -> Option<usize> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (i, port) in self.monitor.iter().enumerate() {
            if !self.nodes[i].is_running() {
                continue;
            }
            let Ok(Ok(mut s)) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(("127.0.0.1", *port)),
            )
            .await
            else {
                continue;
            };
            let request = "GET /connz?limit=1024 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
            if s.write_all(request.as_bytes()).await.is_err() {
                continue;
            }
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            let text = String::from_utf8_lossy(&out);
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let found = json["connections"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["name"] == name));
            if found {
                return Some(i);
            }
        }
        None
    }

    /// The node that leads `stream`, asked through node `via`.
    pub async fn stream_leader(&self, via: usize, stream: &str) -> Option<usize> {
        let js = self.nodes[via].jetstream().await;
        let mut s = js.get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        leader.strip_prefix('n')?.parse().ok()
    }

    /// Every node's url.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsHub::url).collect()
    }

    /// Waits (bounded) until every running node knows the cluster's JetStream metadata leader
    /// (its log says so since its last start).
    pub async fn wait_jetstream(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            while !node.log().contains("metadata leader") {
                assert!(
                    Instant::now() < deadline,
                    "the cluster's JetStream has no leader within 60 s; node log:\n{}",
                    tail(&node.log(), 30)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// kill -9 of node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }
}

impl Drop for NatsHub {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn connect(url: &str) -> async_nats::Client {
    tokio::time::timeout(
        Duration::from_secs(10),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url),
    )
    .await
    .unwrap_or_else(|_| panic!("connect to {url} timed out"))
    .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// One message read back from a hub stream.
#[derive(Debug, Clone)]
pub struct HubMsg {
    pub seq: u64,
    pub subject: String,
    pub payload: Vec<u8>,
    /// Header name → values.
    pub headers: BTreeMap<String, Vec<String>>,
}

impl HubMsg {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.first())
            .map(String::as_str)
    }

    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// The stream's message count and last sequence, or `None` when it does not exist (yet).
pub async fn stream_state(js: &jetstream::Context, stream: &str) -> Option<(u64, u64)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), js.get_stream(stream))
        .await
        .ok()?
        .ok()?;
    let info = tokio::time::timeout(Duration::from_secs(5), s.info())
        .await
        .ok()?
        .ok()?;
    Some((info.state.messages, info.state.last_sequence))
}

/// Waits until `stream` exists on the hub at `url`.
pub async fn wait_stream_exists(url: &str, stream: &str, timeout: Duration) {
    let js = jetstream::new(connect(url).await);
    let deadline = Instant::now() + timeout;
    while stream_state(&js, stream).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "stream {stream} did not appear on {url} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `stream` holds at least `n` messages; returns the count seen.
pub async fn wait_stream_count(url: &str, stream: &str, n: u64, timeout: Duration) -> u64 {
    let js = jetstream::new(connect(url).await);
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        last = stream_state(&js, stream).await.map(|s| s.0).or(last);
        if last.is_some_and(|c| c >= n) {
            return last.unwrap_or(0);
        }
        assert!(
            Instant::now() < deadline,
            "stream {stream} has {last:?} messages after {timeout:?}, expected at least {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the stream's message count has not changed for `quiet` (and is above zero);
/// returns that count.
pub async fn wait_stream_stable(
    url: &str,
    stream: &str,
    quiet: Duration,
    timeout: Duration,
) -> u64 {
    let js = jetstream::new(connect(url).await);
    let deadline = Instant::now() + timeout;
    let mut last: Option<u64> = None;
    let mut since = Instant::now();
    loop {
        let now = stream_state(&js, stream).await.map(|s| s.0);
        if now != last {
            last = now;
            since = Instant::now();
        } else if last.is_some_and(|c| c > 0) && since.elapsed() >= quiet {
            return last.unwrap_or(0);
        }
        assert!(
            Instant::now() < deadline,
            "stream {stream} count did not settle within {timeout:?} (last {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every message of `stream` (as it is when called) with an ephemeral pull consumer,
/// bounded by `timeout`.
pub async fn read_stream(url: &str, stream: &str, timeout: Duration) -> Vec<HubMsg> {
    let js = jetstream::new(connect(url).await);
    let (count, _) = stream_state(&js, stream)
        .await
        .unwrap_or_else(|| panic!("stream {stream} does not exist on {url}"));
    let mut out = Vec::with_capacity(count as usize);
    if count == 0 {
        return out;
    }
    let s = js.get_stream(stream).await.expect("get stream");
    let consumer = s
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("create reader consumer");
    let mut messages = consumer.messages().await.expect("consumer messages");
    let deadline = tokio::time::Instant::now() + timeout;
    while (out.len() as u64) < count {
        let next = tokio::time::timeout_at(deadline, messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => panic!("reading stream {stream}: {e}"),
            Ok(None) => break,
            Err(_) => panic!(
                "read only {} of {count} messages of {stream} within {timeout:?}",
                out.len()
            ),
        };
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let mut headers = BTreeMap::new();
        if let Some(h) = &msg.headers {
            for (k, vs) in h.iter() {
                headers.insert(
                    k.to_string(),
                    vs.iter().map(|v| v.as_str().to_owned()).collect(),
                );
            }
        }
        out.push(HubMsg {
            seq,
            subject: msg.subject.to_string(),
            payload: msg.payload.to_vec(),
            headers,
        });
    }
    out
}

/// How long `stream` remembers a `Nats-Msg-Id` to drop a message sent again with it.
pub async fn stream_duplicate_window(url: &str, stream: &str) -> Duration {
    let js = jetstream::new(connect(url).await);
    let mut s = tokio::time::timeout(Duration::from_secs(5), js.get_stream(stream))
        .await
        .expect("stream lookup in time")
        .unwrap_or_else(|e| panic!("stream {stream} on {url}: {e}"));
    let info = tokio::time::timeout(Duration::from_secs(5), s.info())
        .await
        .expect("stream info in time")
        .unwrap_or_else(|e| panic!("info of stream {stream}: {e}"));
    info.config.duplicate_window
}

/// Info on every consumer of `stream`: (name, delivered stream seq, ack floor stream seq).
pub async fn stream_consumers(url: &str, stream: &str) -> Vec<(String, u64, u64)> {
    let js = jetstream::new(connect(url).await);
    let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), js.get_stream(stream)).await
    else {
        return Vec::new();
    };
    let mut list = s.consumers();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(Ok(info))) = tokio::time::timeout_at(deadline, list.next()).await {
        out.push((
            info.name.clone(),
            info.delivered.stream_sequence,
            info.ack_floor.stream_sequence,
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The relay: the real binary
// ---------------------------------------------------------------------------------------------

/// What goes into a test relay's config file.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub name: String,
    pub mqtt_port: u16,
    /// `Some(url)`: an `[uplink]` section pointing at this hub.
    pub uplink_url: Option<String>,
    pub uplink_mode: &'static str,
    pub create_stream: bool,
    pub max_bytes: u64,
    pub policy: &'static str,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
    /// Whether clients may connect without credentials.
    pub allow_anonymous: bool,
    /// More lines for the `[mqtt]` section (TLS, limits, …).
    pub mqtt_extra: String,
    /// More lines for the `[uplink]` section (credentials, TLS, …).
    pub uplink_extra: String,
    /// More lines for the `[outbox]` section (max_age, …).
    pub outbox_extra: String,
    /// The admin endpoint's port (`/metrics`, `/status`).
    pub admin_port: u16,
    /// More lines for the `[admin]` section.
    pub admin_extra: String,
}

impl RelayConfig {
    /// A relay named `name` on a fresh MQTT port, no uplink.
    pub fn new(name: &str) -> RelayConfig {
        RelayConfig {
            name: name.to_owned(),
            mqtt_port: free_port(),
            uplink_url: None,
            uplink_mode: "jetstream",
            create_stream: true,
            max_bytes: 256 * 1024 * 1024,
            policy: "drop-oldest",
            exports: Vec::new(),
            imports: Vec::new(),
            allow_anonymous: true,
            mqtt_extra: String::new(),
            uplink_extra: String::new(),
            outbox_extra: String::new(),
            admin_port: free_port(),
            admin_extra: String::new(),
        }
    }

    /// Appends `lines` to the `[admin]` section.
    pub fn admin(mut self, lines: &str) -> Self {
        self.admin_extra.push_str(lines);
        self.admin_extra.push('\n');
        self
    }

    /// Clients must log in.
    pub fn no_anonymous(mut self) -> Self {
        self.allow_anonymous = false;
        self
    }

    /// Appends `lines` to the `[mqtt]` section.
    pub fn mqtt(mut self, lines: &str) -> Self {
        self.mqtt_extra.push_str(lines);
        self.mqtt_extra.push('\n');
        self
    }

    /// Appends `lines` to the `[outbox]` section.
    pub fn outbox_lines(mut self, lines: &str) -> Self {
        self.outbox_extra.push_str(lines);
        self.outbox_extra.push('\n');
        self
    }

    /// Appends `lines` to the `[uplink]` section.
    pub fn uplink_lines(mut self, lines: &str) -> Self {
        self.uplink_extra.push_str(lines);
        self.uplink_extra.push('\n');
        self
    }

    pub fn uplink(mut self, url: &str) -> Self {
        self.uplink_url = Some(url.to_owned());
        self
    }

    /// An `[uplink]` whose `url` is the list `urls` (a cluster's servers).
    pub fn uplink_list(mut self, urls: &[String]) -> Self {
        let list = urls
            .iter()
            .map(|u| toml_str(u))
            .collect::<Vec<_>>()
            .join(", ");
        self.uplink_url = Some(format!("[{list}]"));
        self
    }

    pub fn export(mut self, filter: &str) -> Self {
        self.exports.push(filter.to_owned());
        self
    }

    pub fn import(mut self, filter: &str) -> Self {
        self.imports.push(filter.to_owned());
        self
    }

    pub fn outbox(mut self, max_bytes: u64, policy: &'static str) -> Self {
        self.max_bytes = max_bytes;
        self.policy = policy;
        self
    }

    /// The TOML text for a relay whose data lives in `data_dir`.
    pub fn toml(&self, data_dir: &Path) -> String {
        let mut t = format!(
            "[relay]\nname = {}\ndata_dir = {}\n\n[mqtt]\nlisten = \"127.0.0.1:{}\"\nallow_anonymous = {}\n{}\n\
             [outbox]\nmax_bytes = {}\npolicy = {}\n{}",
            toml_str(&self.name),
            toml_str(&data_dir.display().to_string()),
            self.mqtt_port,
            self.allow_anonymous,
            self.mqtt_extra,
            self.max_bytes,
            toml_str(self.policy),
            self.outbox_extra,
        );
        t.push_str(&format!(
            "\n[admin]\nlisten = \"127.0.0.1:{}\"\n{}",
            self.admin_port, self.admin_extra
        ));
        if let Some(url) = &self.uplink_url {
            t.push_str(&format!(
                "\n[uplink]\nurl = {}\nsubject_prefix = {}\nmode = {}\nstream = {}\n\
                 create_stream = {}\n",
                // A list (`uplink_list`) is written as it is.
                if url.starts_with('[') {
                    url.clone()
                } else {
                    toml_str(url)
                },
                toml_str(PREFIX),
                toml_str(self.uplink_mode),
                toml_str(STREAM),
                self.create_stream
            ));
            // The periodic status message would land in the stream the tests count.
            if !self.uplink_extra.contains("status_interval") {
                t.push_str("status_interval = \"1h\"\n");
            }
            t.push_str(&self.uplink_extra);
        }
        for f in &self.exports {
            t.push_str(&format!("\n[[export]]\nfilter = {}\n", toml_str(f)));
        }
        for f in &self.imports {
            t.push_str(&format!("\n[[import]]\nfilter = {}\n", toml_str(f)));
        }
        t
    }
}

/// Adds `name` with `password` to the users of the relay configured by `config_path`
/// (`relaybox user add --password-stdin`).
pub fn add_user(config_path: &Path, name: &str, password: &str) {
    let mut child = Command::new(RELAY_BIN)
        .args(["user", "add", name, "--password-stdin", "--config"])
        .arg(config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relaybox user add");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(format!("{password}\n").as_bytes())
            .expect("write password");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relaybox user add did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("user add output");
    assert!(
        out.status.success(),
        "user add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The outbox counters from the `relaybox stopped` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopCounters {
    pub appended: u64,
    pub dropped: u64,
    pub refused: u64,
}

/// Removes ANSI colour sequences, in case the log is coloured.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses the `relaybox stopped ... appended=N dropped=N refused=N` line of a log.
pub fn stop_counters(log: &str) -> Option<StopCounters> {
    let log = strip_ansi(log);
    let line = log.lines().rev().find(|l| l.contains("relaybox stopped"))?;
    let field = |name: &str| -> Option<u64> {
        let key = format!("{name}=");
        let start = line
            .match_indices(&key)
            .find(|(i, _)| *i == 0 || !line.as_bytes()[i - 1].is_ascii_alphanumeric())?
            .0
            + key.len();
        let digits: String = line[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    Some(StopCounters {
        appended: field("appended")?,
        dropped: field("dropped")?,
        refused: field("refused")?,
    })
}

/// A running (or stopped) relaybox process with its own temp dir holding the config, the data
/// dir and one log file per run. Killed when dropped.
pub struct Relay {
    pub cfg: RelayConfig,
    dir: TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    child: Option<Child>,
    runs: usize,
}

impl Relay {
    /// Writes the config and starts the relay; returns once its MQTT port accepts connections.
    pub async fn start(cfg: RelayConfig) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("relaybox-test-")
            .tempdir()
            .expect("relay temp dir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("relaybox.toml");
        fs::write(&config_path, cfg.toml(&data_dir)).expect("write config");
        let mut relay = Relay {
            cfg,
            dir,
            config_path,
            data_dir,
            child: None,
            runs: 0,
        };
        relay.restart().await;
        relay
    }

    /// Like [`Relay::start`], with `extra` TOML (e.g. `[[serial]]` sections) appended to the
    /// config file.
    pub async fn start_with_extra(cfg: RelayConfig, extra: &str) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("relaybox-test-")
            .tempdir()
            .expect("relay temp dir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("relaybox.toml");
        fs::write(&config_path, format!("{}\n{extra}", cfg.toml(&data_dir))).expect("write config");
        let mut relay = Relay {
            cfg,
            dir,
            config_path,
            data_dir,
            child: None,
            runs: 0,
        };
        relay.restart().await;
        relay
    }

    /// Writes the config (with `extra` appended, as [`Relay::start_with_extra`]) without
    /// starting the relay, so that the test can prepare its data dir first (e.g. add users
    /// with the CLI); [`Relay::restart`] starts it.
    pub fn create(cfg: RelayConfig, extra: &str) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("relaybox-test-")
            .tempdir()
            .expect("relay temp dir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("relaybox.toml");
        fs::write(&config_path, format!("{}\n{extra}", cfg.toml(&data_dir))).expect("write config");
        Relay {
            cfg,
            dir,
            config_path,
            data_dir,
            child: None,
            runs: 0,
        }
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the running relay.
    pub fn signal(&self, signal: libc::c_int) {
        send_signal(self.child.as_ref().expect("relay is not running"), signal);
    }

    /// The exit status if the relay process has exited (e.g. crashed) while the test thought
    /// it running; `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// How many lines of the current run's log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        strip_ansi(&self.log())
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until at least `n` lines of the current run's log contain `needle`; panics with
    /// the log's tail after `timeout`.
    pub async fn wait_log(&self, needle: &str, n: usize, timeout: Duration) {
        if !wait_until(timeout, || self.log_count(needle) >= n).await {
            panic!(
                "{} lines with {needle:?} after {timeout:?}, expected {n}; log:\n{}",
                self.log_count(needle),
                tail(&self.log(), 40)
            );
        }
    }

    pub fn port(&self) -> u16 {
        self.cfg.mqtt_port
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn log_path_of(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("relay-{run}.log"))
    }

    /// The current (or last) run's log (stderr and stdout).
    pub fn log(&self) -> String {
        read_to_string_lossy(&self.log_path_of(self.runs))
    }

    /// Every run's log, oldest first.
    pub fn all_logs(&self) -> String {
        (1..=self.runs)
            .map(|r| {
                format!(
                    "--- run {r} ---\n{}",
                    read_to_string_lossy(&self.log_path_of(r))
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts the relay again with the same config and data dir (it must be stopped).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "relay is already running");
        self.runs += 1;
        let log = File::create(self.log_path_of(self.runs)).expect("relay log file");
        let child = Command::new(RELAY_BIN)
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn relaybox");
        self.child = Some(child);
        let port = self.port();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if port_open(port) {
                // The admin endpoint is bound a moment after the MQTT listener: tests read
                // it right away. (A relay whose admin listener cannot be had still serves.)
                let admin = self.cfg.admin_port;
                wait_until(Duration::from_secs(5), || port_open(admin)).await;
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"));
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "relaybox exited ({status}) before serving MQTT on {port}; log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            if Instant::now() >= deadline {
                let log = self.log();
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                panic!(
                    "relaybox did not serve MQTT on {port} within {READY_TIMEOUT:?}; log:\n{}",
                    tail(&log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, wait for the drain, assert exit code 0; returns the run's counters.
    pub async fn sigterm(&mut self) -> StopCounters {
        let mut child = self.child.take().expect("relay is not running");
        send_signal(&child, libc::SIGTERM);
        let status = match wait_exit(&mut child, STOP_TIMEOUT).await {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "relaybox did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    tail(&self.log(), 40)
                );
            }
        };
        let log = self.log();
        assert!(
            status.success(),
            "relaybox exited with {status} after SIGTERM, expected 0; log:\n{}",
            tail(&log, 40)
        );
        stop_counters(&log).unwrap_or_else(|| {
            panic!(
                "no `relaybox stopped appended=N dropped=N refused=N` line in log:\n{}",
                tail(&log, 40)
            )
        })
    }

    /// SIGKILL: no drain, no stop line.
    pub async fn sigkill(&mut self) {
        let mut child = self.child.take().expect("relay is not running");
        send_signal(&child, libc::SIGKILL);
        assert!(
            wait_exit(&mut child, STOP_TIMEOUT).await.is_some(),
            "relaybox survived SIGKILL"
        );
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() && self.runs > 0 {
            eprintln!(
                "relaybox logs of the failed test:\n{}",
                tail(&self.all_logs(), 60)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT clients (rumqttc)
// ---------------------------------------------------------------------------------------------

/// Publishes every payload to `topic` at QoS 1 over MQTT 3.1.1 and waits until all were
/// acknowledged; panics on a connection error or after `timeout`.
pub async fn publish_all_v4(
    port: u16,
    client_id: &str,
    topic: &str,
    payloads: Vec<Vec<u8>>,
    timeout: Duration,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let total = payloads.len();
    let topic = topic.to_owned();
    let publisher = tokio::spawn({
        let client = client.clone();
        async move {
            for p in payloads {
                client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, p)
                    .await
                    .expect("queue publish");
            }
        }
    });
    let mut acked = 0usize;
    let result = tokio::time::timeout(timeout, async {
        while acked < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{client_id}: MQTT connection error after {acked}/{total} acks: {e}"),
        Err(_) => panic!("{client_id}: only {acked}/{total} PUBACKs within {timeout:?}"),
    }
    publisher.await.expect("publisher task");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// Publishes one QoS 1 message with MQTT 5 user properties and waits for its PUBACK.
pub async fn publish_one_v5(
    port: u16,
    client_id: &str,
    topic: &str,
    payload: &str,
    retain: bool,
    user_properties: &[(&str, &str)],
) {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    let props = PublishProperties {
        user_properties: user_properties
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    client
        .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload.to_owned(), props)
        .await
        .expect("queue publish");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("{client_id}: MQTT 5 publish: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{client_id}: no PUBACK within 10 s"));
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// Like [`publish_all_v4`] over MQTT 5; returns each PUBACK's reason code in arrival order.
pub async fn publish_all_v5(
    port: u16,
    client_id: &str,
    topic: &str,
    payloads: Vec<Vec<u8>>,
    timeout: Duration,
) -> Vec<u8> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_outgoing_inflight_upper_limit(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let total = payloads.len();
    let topic = topic.to_owned();
    let publisher = tokio::spawn({
        let client = client.clone();
        async move {
            for p in payloads {
                client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, p)
                    .await
                    .expect("queue publish");
            }
        }
    });
    let mut reasons = Vec::with_capacity(total);
    let result = tokio::time::timeout(timeout, async {
        while reasons.len() < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => reasons.push(ack.reason as u8),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!(
            "{client_id}: MQTT 5 connection error after {}/{total} acks: {e}",
            reasons.len()
        ),
        Err(_) => panic!(
            "{client_id}: only {}/{total} PUBACKs within {timeout:?}",
            reasons.len()
        ),
    }
    publisher.await.expect("publisher task");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    reasons
}

/// What a [`Subscriber`] received: (topic, payload) in arrival order.
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT 3.1.1 subscriber whose event loop runs in a task, collecting what it receives.
pub struct Subscriber {
    pub client: rumqttc::AsyncClient,
    pub received: Received,
    /// Connection errors seen by the event loop (a healthy subscriber has none).
    pub errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects, subscribes to `filters` at QoS 1 and returns once the SUBACK arrived.
    pub async fn start(port: u16, client_id: &str, filters: &[&str]) -> Subscriber {
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        Subscriber::start_with_options(opts, filters).await
    }

    /// Like [`Subscriber::start`] with the caller's options (credentials, TLS, WebSocket…).
    pub async fn start_with_options(opts: rumqttc::MqttOptions, filters: &[&str]) -> Subscriber {
        use rumqttc::{AsyncClient, Event, Packet, QoS};
        let client_id = opts.client_id();
        let client_id = client_id.as_str();
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        for f in filters {
            client
                .subscribe(*f, QoS::AtLeastOnce)
                .await
                .expect("queue subscribe");
        }
        let mut subacks = 0;
        tokio::time::timeout(Duration::from_secs(10), async {
            while subacks < filters.len() {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        for rc in &ack.return_codes {
                            assert!(
                                !matches!(rc, rumqttc::SubscribeReasonCode::Failure),
                                "{client_id}: subscription refused"
                            );
                        }
                        subacks += 1;
                    }
                    Ok(_) => {}
                    Err(e) => panic!("{client_id}: subscribe failed: {e}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{client_id}: no SUBACK within 10 s"));
        let received: Received = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let task = tokio::spawn({
            let received = received.clone();
            let errors = errors.clone();
            async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => received
                            .lock()
                            .expect("received")
                            .push((p.topic.clone(), p.payload.to_vec())),
                        Ok(_) => {}
                        Err(e) => {
                            errors.lock().expect("errors").push(e.to_string());
                            // Do not spin on a dead connection; rumqttc reconnects on poll.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        });
        Subscriber {
            client,
            received,
            errors,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.received.lock().expect("received").len()
    }

    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().expect("received").clone()
    }

    /// Waits until at least `n` messages arrived; returns the count.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        wait_until(timeout, || self.count() >= n).await;
        self.count()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw MQTT bytes, for precise and malformed exchanges
// ---------------------------------------------------------------------------------------------

pub mod raw {
    use super::*;

    pub fn remaining_length(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                return out;
            }
        }
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    pub fn packet(header: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![header];
        out.extend(remaining_length(body.len()));
        out.extend_from_slice(body);
        out
    }

    /// CONNECT with protocol `name` and `level` (4 = 3.1.1, 5 = MQTT 5), clean session.
    pub fn connect_with(name: &[u8], level: u8, client_id: &str) -> Vec<u8> {
        let mut body = string(name);
        body.push(level);
        body.push(0x02); // clean session / clean start
        body.extend_from_slice(&30u16.to_be_bytes()); // keep-alive
        if level == 5 {
            body.push(0); // no properties
        }
        body.extend(string(client_id.as_bytes()));
        packet(0x10, &body)
    }

    pub fn connect_v4(client_id: &str) -> Vec<u8> {
        connect_with(b"MQTT", 4, client_id)
    }

    pub fn connect_v5(client_id: &str) -> Vec<u8> {
        connect_with(b"MQTT", 5, client_id)
    }

    /// PUBLISH QoS 1 with packet id `pkid`.
    pub fn publish_qos1(topic: &str, payload: &[u8], pkid: u16, v5: bool) -> Vec<u8> {
        let mut body = string(topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        packet(0x32, &body)
    }

    /// A connected raw client with blocking reads bounded by a timeout.
    pub struct RawConn {
        pub stream: TcpStream,
        buf: Vec<u8>,
    }

    /// Outcome of waiting for a packet.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Got {
        /// First byte and body.
        Packet(u8, Vec<u8>),
        /// The peer closed the connection (EOF or reset).
        Closed,
        /// Nothing within the timeout.
        Timeout,
    }

    impl RawConn {
        pub fn open(port: u16) -> RawConn {
            let stream = TcpStream::connect(("127.0.0.1", port)).expect("raw connect");
            stream.set_nodelay(true).expect("nodelay");
            RawConn {
                stream,
                buf: Vec::new(),
            }
        }

        pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.stream.write_all(bytes)?;
            self.stream.flush()
        }

        fn parse(&mut self) -> Option<(u8, Vec<u8>)> {
            if self.buf.len() < 2 {
                return None;
            }
            let mut len = 0usize;
            let mut mult = 1usize;
            let mut i = 1;
            loop {
                let b = *self.buf.get(i)?;
                len += (b & 0x7f) as usize * mult;
                mult *= 128;
                i += 1;
                if b & 0x80 == 0 {
                    break;
                }
                if i > 4 {
                    panic!("server sent a malformed remaining length");
                }
            }
            if self.buf.len() < i + len {
                return None;
            }
            let header = self.buf[0];
            let body = self.buf[i..i + len].to_vec();
            self.buf.drain(..i + len);
            Some((header, body))
        }

        /// Reads the next packet, bounded by `timeout`. Blocking: call from
        /// `spawn_blocking` or accept blocking a runtime thread for at most `timeout`.
        pub fn read(&mut self, timeout: Duration) -> Got {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some((h, b)) = self.parse() {
                    return Got::Packet(h, b);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Got::Timeout;
                }
                self.stream
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .expect("read timeout");
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk) {
                    Ok(0) => return Got::Closed,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Got::Timeout
                    }
                    Err(_) => return Got::Closed,
                }
            }
        }

        /// Waits until the server closes the connection, reading past packets it still sends.
        /// True if it closed within `timeout`.
        pub fn closed_within(&mut self, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                match self.read(left) {
                    Got::Closed => return true,
                    Got::Timeout => return false,
                    Got::Packet(..) => {}
                }
            }
        }

        /// Sends CONNECT and expects a CONNACK with return/reason code 0.
        pub fn handshake(&mut self, connect: &[u8]) {
            self.send(connect).expect("send CONNECT");
            match self.read(Duration::from_secs(10)) {
                Got::Packet(0x20, body) => {
                    assert!(body.len() >= 2 && body[1] == 0, "CONNACK refused: {body:?}")
                }
                other => panic!("expected CONNACK within 10 s, got {other:?}"),
            }
        }
    }
}
