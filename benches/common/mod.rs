//! What the bench binaries `flash`, `mqtt_to_hub`, `hub_failover`, `local_fanout` and
//! `idle_connections` share: starting and stopping the servers (a hub nats-server with JetStream,
//! relaybox or a nats-server leaf with MQTT), reading `/proc`, the warm-up probe that proves the
//! whole path, and the machine description at the top of a report. What only the two local-broker
//! benches need (Mosquitto, relaybox without an uplink, file-descriptor limits) is in `local.rs`;
//! what only the hub benches need (the nats-server binaries, the sourced stream, a hub cluster) is
//! in `hub.rs`.
//!
//! Each bench includes it with `mod common;`; cargo does not take a subdirectory for a bench target
//! of its own. Benches that use only part of it say `#[allow(dead_code)]`.

use std::fs;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{self, stream};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tempfile::TempDir;

/// The hub stream that the measured messages end up in (`bench.>`).
pub const HUB_STREAM: &str = "BENCH";
/// The stream on the leaf that captures the MQTT messages at the edge (`bench.>`).
pub const LEAF_STREAM: &str = "EDGE";
/// The leaf's JetStream domain; the hub reaches its API as `$JS.leaf.API`.
pub const LEAF_DOMAIN: &str = "leaf";
/// The hub's JetStream domain.
const HUB_DOMAIN: &str = "hub";
/// How long a server may take to accept connections, and the leaf to reach the hub.
pub const START_LIMIT: Duration = Duration::from_secs(30);
/// How long the warm-up probe may take to be stored through the whole path.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
/// Wait after the last message was stored before reading `/proc`, so deferred writes (the outbox
/// deleting delivered records, consumer state) count for every system alike.
pub const SETTLE: Duration = Duration::from_secs(1);

/// The whole of a bench's `main`: with the `settings` loaded, runs `bench` to completion on a
/// tokio runtime with two workers, driven from this thread (the servers are spawned from here,
/// inside `block_on`: see [`Proc::spawn`]). Exit code 2, after a message that starts with `name`,
/// when the settings are wrong or the runtime cannot start. On SIGINT or SIGTERM the bench is
/// dropped, so that its guards stop the servers and undo what they set up (exit code 130).
pub fn main<S, F>(name: &str, settings: Result<S>, bench: impl FnOnce(S) -> F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        tokio::select! {
            code = bench(settings) => code,
            signal = interrupted() => {
                eprintln!("{name}: {signal}; stopping the servers and cleaning up");
                ExitCode::from(130)
            }
        }
    })
}

/// Waits for SIGINT or SIGTERM and names it; never returns if the handlers cannot be installed
/// (the default action then still ends the process).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "interrupted (SIGINT)",
            _ = term.recv() => "terminated (SIGTERM)",
        },
        _ => std::future::pending().await,
    }
}

/// The programs a bench runs and where their data goes, from the environment (an empty
/// variable counts as unset).
#[derive(Debug, Clone)]
pub struct Programs {
    /// `BENCH_RELAYBOX`, else the relaybox that cargo built for this bench.
    pub relaybox: PathBuf,
    /// `BENCH_RELAYBOX_LOG`: `RUST_LOG` for relaybox, else `warn`.
    pub relaybox_log: String,
    /// `BENCH_NATS_SERVER`, else nats-server on `PATH`, else `/usr/sbin/nats-server` (where
    /// Debian installs it).
    pub nats_server: PathBuf,
    /// `BENCH_TMPDIR`, else `target/bench-tmp`: where the data directories go.
    pub tmp_root: PathBuf,
}

impl Programs {
    /// Reads `BENCH_RELAYBOX`, `BENCH_RELAYBOX_LOG`, `BENCH_NATS_SERVER` and `BENCH_TMPDIR`.
    pub fn from_env() -> Programs {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        Programs {
            relaybox: var("BENCH_RELAYBOX")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_relaybox"))),
            relaybox_log: var("BENCH_RELAYBOX_LOG")
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_else(|| "warn".into()),
            nats_server: var("BENCH_NATS_SERVER")
                .map(PathBuf::from)
                .or_else(|| find_on_path("nats-server"))
                .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server")),
            tmp_root: var("BENCH_TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp")),
        }
    }

    /// A new data directory for one set of servers under `tmp_root` (created if needed), removed
    /// when dropped unless kept.
    pub fn data_dir(&self, prefix: &str) -> Result<TempDir> {
        let root = &self.tmp_root;
        fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(root)
            .with_context(|| format!("create a data directory in {}", root.display()))
    }
}

/// The first file called `name` in a directory of `PATH`.
/// Reads a bench's command line: each value flag (`--name V` or `--name=V`) fills its slot in
/// `values`, each switch in `switches` is set; cargo's `--bench` is passed over, and `--help`
/// prints `usage` and exits. An unknown flag or a missing value is an error.
pub fn read_flags(
    usage: &str,
    values: &mut [(&str, &mut Option<String>)],
    switches: &mut [(&str, &mut bool)],
) -> Result<()> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => continue,
            "--help" | "-h" => {
                print!("{usage}");
                std::process::exit(0);
            }
            _ => {}
        }
        if let Some((_, on)) = switches.iter_mut().find(|(name, _)| *name == flag) {
            **on = true;
            continue;
        }
        let Some((_, slot)) = values.iter_mut().find(|(name, _)| *name == flag) else {
            bail!("unknown argument {flag:?}\n\n{usage}");
        };
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?,
        };
        **slot = Some(value);
    }
    Ok(())
}

/// The number in a flag or its variable (`_` may separate digits), or `default` when unset.
pub fn num<T: std::str::FromStr>(what: &str, v: Option<String>, default: T) -> Result<T> {
    match v {
        None => Ok(default),
        Some(s) => s
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| anyhow!("{what}: {s:?} is not a number")),
    }
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `p` as `&str`, for a command-line argument; an error for a path that is not UTF-8.
pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", p.display()))
}

// ---------------------------------------------------------------------------------------------
// Child processes and what /proc says about them
// ---------------------------------------------------------------------------------------------

/// A server started by the bench. Stopped (TERM, then KILL after 5 s) when dropped, and killed by
/// the kernel if the bench itself dies, so that no run leaves servers behind.
pub struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// Stopped on purpose by [`Proc::stop`]: its exit is no failure.
    stopped: bool,
}

impl Proc {
    /// Starts `program` with stdout and stderr going to the file `log`.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Proc> {
        let out = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the closure runs between fork and exec and calls only prctl, which is
        // async-signal-safe and allocates nothing. The servers are spawned from the main thread
        // (the one running `block_on`), which lives as long as the bench, so the parent-death
        // signal fires only when the bench process is gone.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        Ok(Proc {
            name,
            child,
            log,
            stopped: false,
        })
    }

    /// The process id (for `/proc/PID/...`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the process has exited without being stopped by [`Proc::stop`].
    pub fn ensure_running(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited unexpectedly ({status})", self.name);
        }
        Ok(())
    }

    /// The last `lines` lines of the process's log, under a heading, for an error report.
    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(file) = fs::File::open(&self.log) else {
            return String::new();
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(|l| l.ok()).collect();
        let start = all.len().saturating_sub(lines);
        let mut out = format!(
            "--- last lines of {} log ({}):\n",
            self.name,
            self.log.display()
        );
        for line in &all[start..] {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Stops the process (TERM, then KILL after 5 s) and waits for it; from then on its exit is
    /// expected.
    pub fn stop(&mut self) {
        self.stopped = true;
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // The pid is our own child, not yet reaped, so it cannot have been reused.
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a valid pid and signal number has no memory-safety conditions.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not stop within 5 s of SIGTERM; killing it",
            self.name
        );
        self.kill();
    }

    /// Kills the process (SIGKILL: no chance to flush or say goodbye) and waits for it; from
    /// then on its exit is expected.
    pub fn kill(&mut self) {
        self.stopped = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The number after `key` on the first line of `path` that starts with `key` (a trailing `kB`
/// ignored), as in `/proc/PID/status` or `/proc/meminfo`.
pub fn proc_field(path: &str, key: &str) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("{path} has no {key} line"))
}

/// A process's storage write counters from `/proc/PID/io`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Io {
    /// Bytes charged when pages became dirty (or were written directly).
    pub write_bytes: u64,
    /// Bytes of dirty pages truncated before writeback.
    pub cancelled_write_bytes: u64,
}

impl Io {
    /// `write_bytes` per message since `before`.
    pub fn written_per_msg(&self, before: &Io, messages: f64) -> f64 {
        self.write_bytes.saturating_sub(before.write_bytes) as f64 / messages
    }

    /// `cancelled_write_bytes` per message since `before`.
    pub fn cancelled_per_msg(&self, before: &Io, messages: f64) -> f64 {
        self.cancelled_write_bytes
            .saturating_sub(before.cancelled_write_bytes) as f64
            / messages
    }
}

/// The write counters of process `pid`.
pub fn read_io(pid: u32) -> Result<Io> {
    let path = format!("/proc/{pid}/io");
    Ok(Io {
        write_bytes: proc_field(&path, "write_bytes:")?,
        cancelled_write_bytes: proc_field(&path, "cancelled_write_bytes:")?,
    })
}

/// Peak RSS (`VmHWM`) of process `pid` in MiB.
pub fn vm_hwm_mib(pid: u32) -> Result<f64> {
    Ok(proc_field(&format!("/proc/{pid}/status"), "VmHWM:")? as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Ports and connections
// ---------------------------------------------------------------------------------------------

/// Ports for the servers: free ones below the kernel's ephemeral range, so that no outgoing
/// connection (the bench's own, the leaf link, anything else on the machine) takes one of them
/// between now and the server binding it. All are held until all are chosen, so they differ.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let range = 10_000..ephemeral_low.max(10_001);
    let mut held = Vec::with_capacity(N);
    for _ in 0..1000 {
        if held.len() == N {
            break;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", rand::random_range(range.clone()))) {
            held.push(l);
        }
    }
    while held.len() < N {
        held.push(TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0 to choose a port")?);
    }
    let mut ports = [0u16; N];
    for (port, l) in ports.iter_mut().zip(&held) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

/// Waits up to [`START_LIMIT`] for 127.0.0.1:`port` to accept a connection; fails at once if one
/// of `procs` exits. `what` names the listener in the error.
pub async fn wait_for_port(port: u16, procs: &mut [&mut Proc], what: &str) -> Result<()> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        for p in procs.iter_mut() {
            p.ensure_running()?;
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not accept connections on 127.0.0.1:{port} within {START_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A NATS client of the nats-server on 127.0.0.1:`port`.
pub async fn connect_nats(port: u16) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .with_context(|| format!("connect to nats-server on 127.0.0.1:{port}"))
}

// ---------------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------------

/// The ports of one set of servers, all on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The hub's NATS client port.
    pub hub: u16,
    /// The hub's leaf-node port.
    pub hub_leaf: u16,
    /// relaybox's admin port (its `/metrics`); for a leaf, its NATS client port.
    pub sut: u16,
    /// Where the system under test listens for MQTT.
    pub mqtt: u16,
}

impl Ports {
    /// Four free ports: see [`free_ports`].
    pub fn free() -> Result<Ports> {
        let [hub, hub_leaf, sut, mqtt] = free_ports::<4>()?;
        Ok(Ports {
            hub,
            hub_leaf,
            sut,
            mqtt,
        })
    }
}

/// The system under test and the hub. Field order is drop order: the system under test stops
/// before the hub.
pub struct Servers {
    pub sut: Proc,
    pub hub: Proc,
}

impl Servers {
    /// The last log lines of both, for an error report.
    pub fn logs(&self) -> String {
        format!("{}{}", self.sut.log_tail(25), self.hub.log_tail(10))
    }

    /// An error if either has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.sut.ensure_running()?;
        self.hub.ensure_running()
    }
}

/// Starts the hub (nats-server with JetStream in domain `hub`, accepting leaf nodes) with its
/// config and data in `dir`, and connects to it. On failure, its last log lines are appended to
/// `logs`.
pub async fn start_hub(
    programs: &Programs,
    dir: &Path,
    ports: Ports,
    logs: &mut String,
) -> Result<(Proc, async_nats::Client)> {
    let conf = dir.join("hub.conf");
    let text = hub_config("hub", ports.hub, ports.hub_leaf, &dir.join("hub-js"), "");
    fs::write(&conf, text).with_context(|| format!("write {}", conf.display()))?;
    let mut hub = Proc::spawn(
        "hub nats-server",
        &programs.nats_server,
        &["-c", path_str(&conf)?],
        &[],
        dir.join("hub.log"),
    )?;
    let client = match wait_for_port(ports.hub, &mut [&mut hub], "the hub").await {
        Ok(()) => connect_nats(ports.hub).await,
        Err(e) => Err(e),
    };
    match client {
        Ok(c) => Ok((hub, c)),
        Err(e) => {
            logs.push_str(&hub.log_tail(20));
            Err(e)
        }
    }
}

/// The config of a hub server called `name`: NATS clients on 127.0.0.1:`client`, leaf nodes on
/// 127.0.0.1:`leaf`, JetStream in domain `hub` with its store in `store`, and then `extra` (a
/// cluster node's `cluster` and `http` settings).
pub fn hub_config(name: &str, client: u16, leaf: u16, store: &Path, extra: &str) -> String {
    format!(
        "server_name: {name}\nlisten: \"127.0.0.1:{client}\"\n\
         jetstream {{ store_dir: {store:?}, domain: {HUB_DOMAIN} }}\n\
         leafnodes {{ listen: \"127.0.0.1:{leaf}\" }}\n{extra}"
    )
}

/// Starts relaybox with its config and log in `dir` and its store in `data_dir`: MQTT on
/// `ports.mqtt`, admin on `ports.sut`, exporting `bench/#` to the hub with JetStream publish into
/// [`HUB_STREAM`], which it creates. `commit_window_us` sets the group-commit window; `None`
/// keeps relaybox's default and writes no `[outbox]` section.
pub fn spawn_relaybox(
    programs: &Programs,
    dir: &Path,
    data_dir: &Path,
    ports: Ports,
    commit_window_us: Option<u64>,
) -> Result<Proc> {
    spawn_relaybox_to(
        programs,
        dir,
        data_dir,
        ports,
        &[ports.hub],
        1,
        commit_window_us,
    )
}

/// [`spawn_relaybox`] with the hub on the NATS client ports `hubs` of 127.0.0.1 (`ports.hub` is
/// not used): one url, or the list of a cluster's servers, and the stream it creates with
/// `replicas` replicas.
pub fn spawn_relaybox_to(
    programs: &Programs,
    dir: &Path,
    data_dir: &Path,
    ports: Ports,
    hubs: &[u16],
    replicas: usize,
    commit_window_us: Option<u64>,
) -> Result<Proc> {
    let conf = dir.join("relaybox.toml");
    let outbox = commit_window_us
        .map(|us| format!("[outbox]\ncommit_window_us = {us}\n\n"))
        .unwrap_or_default();
    let urls: Vec<String> = hubs
        .iter()
        .map(|port| format!("\"nats://127.0.0.1:{port}\""))
        .collect();
    let url = match urls.as_slice() {
        [one] => one.clone(),
        all => format!("[{}]", all.join(", ")),
    };
    fs::write(
        &conf,
        format!(
            "[relay]\nname = \"bench\"\ndata_dir = {:?}\n\n\
             [mqtt]\nlisten = \"127.0.0.1:{}\"\nallow_anonymous = true\n\n\
             {outbox}\
             [uplink]\nurl = {url}\nsubject_prefix = \"bench\"\n\
             mode = \"jetstream\"\nstream = \"{HUB_STREAM}\"\ncreate_stream = true\n\
             replicas = {replicas}\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n\n\
             [[export]]\nfilter = \"bench/#\"\n",
            data_dir, ports.mqtt, ports.sut
        ),
    )
    .with_context(|| format!("write {}", conf.display()))?;
    Proc::spawn(
        "relaybox",
        &programs.relaybox,
        &["run", "--config", path_str(&conf)?],
        &[("RUST_LOG", programs.relaybox_log.as_str())],
        dir.join("relaybox.log"),
    )
}

/// Starts a nats-server leaf node of the hub with its config and log in `dir` and its JetStream
/// store in `store_dir`: NATS clients on `ports.sut`, MQTT on `ports.mqtt`, JetStream in domain
/// [`LEAF_DOMAIN`] (MQTT needs it). `sync_always` adds `sync_interval: always` (nats-server
/// 2.10 and later): every stored message is synced; otherwise nats-server's default applies (a
/// sync every 2 minutes).
pub fn spawn_leaf(
    programs: &Programs,
    dir: &Path,
    store_dir: &Path,
    ports: Ports,
    sync_always: bool,
) -> Result<Proc> {
    spawn_leaf_to(
        programs,
        dir,
        store_dir,
        ports,
        &[ports.hub_leaf],
        sync_always,
    )
}

/// [`spawn_leaf`] with the hub on the leaf-node ports `hubs` of 127.0.0.1 (`ports.hub_leaf` is
/// not used): one remote with the urls of all of them, as for a cluster's servers.
pub fn spawn_leaf_to(
    programs: &Programs,
    dir: &Path,
    store_dir: &Path,
    ports: Ports,
    hubs: &[u16],
    sync_always: bool,
) -> Result<Proc> {
    let conf = dir.join("leaf.conf");
    let sync = if sync_always {
        ", sync_interval: always"
    } else {
        ""
    };
    let urls: Vec<String> = hubs
        .iter()
        .map(|port| format!("\"nats-leaf://127.0.0.1:{port}\""))
        .collect();
    fs::write(
        &conf,
        format!(
            "server_name: leaf\nlisten: \"127.0.0.1:{}\"\n\
             jetstream {{ store_dir: {:?}, domain: {LEAF_DOMAIN}{sync} }}\n\
             leafnodes {{ remotes: [ {{ urls: [{}] }} ] }}\n\
             mqtt {{ listen: \"127.0.0.1:{}\" }}\n",
            ports.sut,
            store_dir,
            urls.join(", "),
            ports.mqtt
        ),
    )
    .with_context(|| format!("write {}", conf.display()))?;
    Proc::spawn(
        "leaf nats-server",
        &programs.nats_server,
        &["-c", path_str(&conf)?],
        &[],
        dir.join("leaf.log"),
    )
}

/// The config of a file-storage stream `name` that captures `bench.>`.
pub fn capture_stream(name: &str) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Connects to the leaf's NATS port and creates [`LEAF_STREAM`] there, which captures the MQTT
/// messages at the edge. Returns the leaf's JetStream context.
pub async fn create_leaf_stream(leaf_port: u16) -> Result<jetstream::Context> {
    let leaf_js = jetstream::new(connect_nats(leaf_port).await?);
    leaf_js
        .create_stream(capture_stream(LEAF_STREAM))
        .await
        .context("create the leaf stream")?;
    Ok(leaf_js)
}

// ---------------------------------------------------------------------------------------------
// The warm-up probe
// ---------------------------------------------------------------------------------------------

/// The message that [`warm_up`] publishes: the MQTT client id to use and the payload.
pub struct Probe<'a> {
    pub client_id: &'a str,
    pub payload: &'a [u8],
}

/// Publishes `probe` with QoS 1 until one is stored in `stream_name`: proves the whole path
/// (listener, export, uplink or leaf link, sourcing, stream) before anything is measured. Fails
/// after [`PROBE_LIMIT`], or at once if one of `procs` exits.
pub async fn warm_up(
    mqtt_port: u16,
    probe: &Probe<'_>,
    js: &jetstream::Context,
    stream_name: &str,
    procs: &mut [&mut Proc],
) -> Result<()> {
    let deadline = Instant::now() + PROBE_LIMIT;
    let mut last = String::from("no probe was sent");
    while Instant::now() < deadline {
        for p in procs.iter_mut() {
            p.ensure_running()?;
        }
        if let Err(e) = publish_probe(mqtt_port, probe).await {
            last = format!("probe publish failed: {e:#}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            match js.get_stream(stream_name).await {
                Ok(s) => match s.get_info().await {
                    Ok(info) if info.state.messages > 0 => return Ok(()),
                    Ok(_) => last = format!("stream {stream_name} exists but is empty"),
                    Err(e) => last = format!("stream {stream_name} info: {e}"),
                },
                Err(e) => last = format!("stream {stream_name}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    bail!("no warm-up probe reached stream {stream_name} within {PROBE_LIMIT:?} (last: {last})")
}

/// Publishers write without Nagle's delay (rumqttc's default keeps it), so that the client
/// adds no waiting of its own to what the servers are measured on.
pub fn nodelay() -> rumqttc::NetworkOptions {
    let mut options = rumqttc::NetworkOptions::new();
    options.set_tcp_nodelay(true);
    options
}

/// Publishes one probe with QoS 1 on `bench/warmup` and waits up to 5 s for its PUBACK.
async fn publish_probe(mqtt_port: u16, probe: &Probe<'_>) -> Result<()> {
    let mut opts = MqttOptions::new(probe.client_id, "127.0.0.1", mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 10);
    events.set_network_options(nodelay());
    client
        .publish(
            "bench/warmup",
            QoS::AtLeastOnce,
            false,
            probe.payload.to_vec(),
        )
        .await?;
    let acked = async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), acked)
        .await
        .map_err(|_| anyhow!("no PUBACK within 5 s"))??;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

/// The q-quantile (nearest rank) of sorted nanoseconds, in milliseconds; NaN when empty.
pub fn percentile_ms(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted_ns.len() as f64 * q).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1e6
}

/// The body of relaybox's admin `/metrics` on 127.0.0.1:`port` (with the HTTP head: the
/// metric lines are found by name).
pub async fn fetch_metrics(port: u16) -> Result<String> {
    http_get(port, "/metrics").await
}

/// The answer (HTTP head and body) to `GET path` on 127.0.0.1:`port`, within 5 s.
pub async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| anyhow!("GET {path} on 127.0.0.1:{port}: no answer within 5 s"))?
        .with_context(|| format!("GET {path} on 127.0.0.1:{port}"))
}

/// The value of the unlabelled metric `name` in a `/metrics` body.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

// ---------------------------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------------------------

/// `CPU, N cores, M MiB RAM; OS, Linux KERNEL`, from `/proc` and `/etc/os-release`.
pub fn machine() -> String {
    let first = |path: &str, key: &str| {
        fs::read_to_string(path).ok().and_then(|t| {
            t.lines().find_map(|l| l.strip_prefix(key)).map(|v| {
                v.trim_start_matches([' ', '\t', ':'])
                    .trim_matches('"')
                    .to_owned()
            })
        })
    };
    let cpu = first("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown CPU".into());
    let os = first("/etc/os-release", "PRETTY_NAME=").unwrap_or_else(|| "unknown OS".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = proc_field("/proc/meminfo", "MemTotal:").unwrap_or(0) / 1024;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} MiB RAM; {os}, Linux {kernel}")
}

/// The nats-server 2.15.1 that `scripts/nats-server-2.15` installs into `.venv/` if missing (and
/// prints the path of). Its install progress goes to the bench's stderr; it may take 15 minutes.
pub fn pinned_nats_server() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nats-server-2.15");
    let limit = Duration::from_secs(900);
    let mut child = Command::new(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not finish within {limit:?}", script.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let path = PathBuf::from(text.lines().last().unwrap_or_default().trim());
    if !path.is_file() {
        bail!("{} printed {text:?}, not a file", script.display());
    }
    Ok(path)
}

/// What `nats-server --version` prints, or why it could not be run.
pub fn nats_version(nats_server: &Path) -> String {
    Command::new(nats_server)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The file system the data directories live on, from /proc/mounts (longest mount-point match).
pub fn filesystem_of(path: &Path) -> String {
    let _ = fs::create_dir_all(path);
    let (Ok(path), Ok(mounts)) = (path.canonicalize(), fs::read_to_string("/proc/mounts")) else {
        return "unknown file system".into();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, at, fstype) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at)
                .then(|| (at.len(), format!("{fstype} on {dev}")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, d)| d)
        .unwrap_or_else(|| "unknown file system".into())
}
