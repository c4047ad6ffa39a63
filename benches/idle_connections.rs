//! Memory for idle MQTT connections: 10,000 MQTT 3.1.1 clients connect and then say nothing,
//! relaybox against Mosquitto.
//!
//! Run with `cargo bench --bench idle_connections` (cargo builds `target/release/relaybox` first).
//! Like the other benches this prints figures and fails only when a scenario cannot run.
//!
//! Per broker, a fresh broker on a free 127.0.0.1 port with a fresh data directory:
//!
//! - `relaybox`: `relaybox run --config FILE` with no uplink, `allow_anonymous = true` and
//!   `[mqtt] max_connections = N` (the config allows at most 10,000: for more, relaybox is given
//!   10,000 and refuses the rest, which the output shows as failed connections).
//! - `mosquitto`: Mosquitto (Debian 12: 2.0.11) with `listener PORT 127.0.0.1`,
//!   `allow_anonymous true` (no connection limit by default), errors and warnings logged only.
//!
//! The bench raises its own `RLIMIT_NOFILE` (soft, and hard too when it runs as root) to
//! N + 4096 before starting a broker, which inherits it: both the bench and the broker hold one
//! descriptor per connection.
//!
//! The clients are raw TCP sockets, so that no client library's memory or timers get in the way:
//! each binds to a source address 127.0.0.2, 127.0.0.3, … (`--per-source` connections each, 250
//! by default: 10,000 connections use 127.0.0.2 to 127.0.0.41, each far below the ephemeral-port
//! limit), sends CONNECT (MQTT 3.1.1, clean session, keep-alive `--keep-alive` = 300 s, its own
//! client id) and waits for a CONNACK that accepts it; `--concurrency` handshakes run at once.
//! Then every connection stays idle.
//!
//! Figures, all of the broker process from `/proc/PID/status`:
//!
//! - RSS before: `VmRSS` after start plus `--settle` seconds, with no client;
//! - RSS after: `VmRSS` once all connections are up plus `--settle` seconds;
//! - peak RSS: `VmHWM` at that point;
//! - RSS per connection: (after − before) / connections accepted;
//! - RSS after close: `VmRSS` `--settle` seconds after the bench closed every connection (memory
//!   the broker keeps).
//!
//! Before reading "after", the bench checks that every connection is still open (a closed one
//! reads end-of-file). Every step is bounded: each handshake by 10 s, all of them by `--timeout`.
//!
//! Options (after `--`), each also an environment variable:
//!
//! ```text
//!   --connections N    idle connections per broker       IDLE_BENCH_CONNECTIONS (10000)
//!   --per-source N     connections per source address    IDLE_BENCH_PER_SOURCE  (250)
//!   --systems LIST     relaybox,mosquitto (or r,m)       IDLE_BENCH_SYSTEMS     (both)
//!   --keep-alive SECS  CONNECT keep-alive                IDLE_BENCH_KEEP_ALIVE  (300)
//!   --concurrency N    handshakes in progress at once    IDLE_BENCH_CONCURRENCY (100)
//!   --settle SECS      wait before each RSS reading      IDLE_BENCH_SETTLE      (2)
//!   --timeout SECS     limit for connecting them all     IDLE_BENCH_TIMEOUT     (120)
//!   --repeat N         runs per system, taking turns;    IDLE_BENCH_REPEAT      (1)
//!                      the comparison uses the medians
//!   --keep             keep data directories and logs    IDLE_BENCH_KEEP
//! ```
//!
//! `BENCH_RELAYBOX`, `BENCH_MOSQUITTO`, `BENCH_TMPDIR` and `BENCH_RELAYBOX_LOG` as in
//! `local_fanout`. Short run: `cargo bench --bench idle_connections -- --connections 1000`.

#[allow(dead_code)]
mod common;
#[path = "common/local.rs"]
mod local;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use common::{load_average, machine, vm_hwm_mib, wait_for_port, Proc, Programs};
use local::{thousands, vm_rss_mib, Broker, BrokerConfig};

const USAGE: &str = "\
idle_connections: RSS of N idle MQTT 3.1.1 connections, relaybox against Mosquitto

usage: cargo bench --bench idle_connections [-- FLAGS]

  --connections N    idle connections per broker       IDLE_BENCH_CONNECTIONS (10000)
  --per-source N     connections per source address    IDLE_BENCH_PER_SOURCE  (250)
                     (127.0.0.2, 127.0.0.3, ...)
  --systems LIST     relaybox,mosquitto (or r,m)       IDLE_BENCH_SYSTEMS     (both)
  --keep-alive SECS  CONNECT keep-alive                IDLE_BENCH_KEEP_ALIVE  (300)
  --concurrency N    handshakes in progress at once    IDLE_BENCH_CONCURRENCY (100)
  --settle SECS      wait before each RSS reading      IDLE_BENCH_SETTLE      (2)
  --timeout SECS     limit for connecting them all     IDLE_BENCH_TIMEOUT     (120)
  --repeat N         runs per system, taking turns;    IDLE_BENCH_REPEAT      (1)
                     the comparison uses the medians
  --keep             keep data directories and logs    IDLE_BENCH_KEEP

  BENCH_RELAYBOX     relaybox binary (default: the one cargo just built)
  BENCH_MOSQUITTO    mosquitto binary (default: mosquitto on PATH, else /usr/sbin/mosquitto)
  BENCH_TMPDIR       where data directories go (default: target/bench-tmp)
  BENCH_RELAYBOX_LOG RUST_LOG for relaybox (default: warn)
";

/// relaybox's largest `[mqtt] max_connections` (src/config.rs).
const RELAYBOX_MAX_CONNECTIONS: usize = 10_000;
/// One handshake's limit: connect, CONNECT, CONNACK.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Settings {
    connections: usize,
    per_source: usize,
    systems: Vec<Broker>,
    keep_alive: u16,
    concurrency: usize,
    settle: Duration,
    timeout: Duration,
    repeat: usize,
    keep: bool,
    programs: Programs,
    mosquitto: std::path::PathBuf,
}

impl Settings {
    fn load() -> Result<Settings> {
        let raw = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut connections = raw("IDLE_BENCH_CONNECTIONS");
        let mut per_source = raw("IDLE_BENCH_PER_SOURCE");
        let mut systems = raw("IDLE_BENCH_SYSTEMS");
        let mut keep_alive = raw("IDLE_BENCH_KEEP_ALIVE");
        let mut concurrency = raw("IDLE_BENCH_CONCURRENCY");
        let mut settle = raw("IDLE_BENCH_SETTLE");
        let mut timeout = raw("IDLE_BENCH_TIMEOUT");
        let mut repeat = raw("IDLE_BENCH_REPEAT");
        let mut keep = raw("IDLE_BENCH_KEEP").is_some_and(|v| v != "0");

        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let slot = match flag.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => continue,
                "--keep" => {
                    keep = true;
                    continue;
                }
                "--help" | "-h" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                "--connections" => &mut connections,
                "--per-source" => &mut per_source,
                "--systems" => &mut systems,
                "--keep-alive" => &mut keep_alive,
                "--concurrency" => &mut concurrency,
                "--settle" => &mut settle,
                "--timeout" => &mut timeout,
                "--repeat" => &mut repeat,
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            };
            let value = match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?,
            };
            *slot = Some(value);
        }

        use crate::common::num;

        let connections: usize = num("connections", connections, 10_000)?;
        let per_source: usize = num("per-source", per_source, 250)?;
        if connections == 0 || per_source == 0 {
            bail!("connections and per-source must be at least 1");
        }
        if connections.div_ceil(per_source) > 253 {
            bail!("{connections} connections at {per_source} per source need more than 253 source addresses (127.0.0.2 to 127.0.0.254): raise --per-source");
        }
        let systems = Broker::parse_list(systems.as_deref().unwrap_or("relaybox,mosquitto"))?;
        if systems.is_empty() {
            bail!("no system to run");
        }
        Ok(Settings {
            connections,
            per_source,
            systems,
            keep_alive: num("keep-alive", keep_alive, 300)?,
            concurrency: num("concurrency", concurrency, 100usize)?.max(1),
            settle: Duration::from_secs(num("settle", settle, 2)?),
            timeout: Duration::from_secs(num("timeout", timeout, 120)?),
            repeat: num("repeat", repeat, 1usize)?.max(1),
            keep,
            programs: Programs::from_env(),
            mosquitto: local::mosquitto_program(),
        })
    }

    /// relaybox's connection limit for this run.
    fn relaybox_max_connections(&self) -> usize {
        self.connections.min(RELAYBOX_MAX_CONNECTIONS)
    }
}

/// The source address of connection `i`: 127.0.0.2 for the first `per_source`, and so on.
fn source(i: usize, per_source: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, (2 + i / per_source) as u8)
}

/// An MQTT 3.1.1 CONNECT: clean session, no will, no credentials.
fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let id = client_id.as_bytes();
    let remaining = 10 + 2 + id.len();
    assert!(remaining < 128, "client id too long for a one-byte length");
    let mut p = Vec::with_capacity(2 + remaining);
    p.extend_from_slice(&[0x10, remaining as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02]);
    p.extend_from_slice(&keep_alive.to_be_bytes());
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    p
}

/// Opens connection `i` from its source address and completes the MQTT handshake.
async fn handshake(i: usize, port: u16, s: &Settings) -> Result<TcpStream> {
    let from = source(i, s.per_source);
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddrV4::new(from, 0).into())
            .with_context(|| format!("bind {from}"))?;
        let mut stream = socket
            .connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into())
            .await
            .context("connect")?;
        stream
            .write_all(&connect_packet(&format!("idle-{i:05}"), s.keep_alive))
            .await
            .context("send CONNECT")?;
        let mut ack = [0u8; 4];
        stream.read_exact(&mut ack).await.context("read CONNACK")?;
        if ack[0] != 0x20 || ack[1] != 2 || ack[3] != 0 {
            bail!("refused: CONNACK {ack:02x?}");
        }
        Ok(stream)
    };
    tokio::time::timeout(HANDSHAKE_LIMIT, attempt)
        .await
        .map_err(|_| anyhow!("no CONNACK within {HANDSHAKE_LIMIT:?}"))?
        .with_context(|| format!("connection {i} from {from}"))
}

/// Connections the peer has closed (a read returns end-of-file or an error). An idle connection
/// has nothing to read.
fn closed(streams: &[TcpStream]) -> usize {
    let mut buf = [0u8; 64];
    streams
        .iter()
        .filter(|st| match st.try_read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        })
        .count()
}

#[derive(Debug, Clone)]
struct Row {
    broker: Broker,
    accepted: usize,
    failed: usize,
    first_failure: Option<String>,
    closed: usize,
    connect_s: f64,
    before_mib: f64,
    after_mib: f64,
    peak_mib: f64,
    after_close_mib: f64,
}

impl Row {
    fn per_connection_kib(&self) -> f64 {
        (self.after_mib - self.before_mib) * 1024.0 / self.accepted.max(1) as f64
    }
}

/// A system's figures over its runs: the median of each, and the range per connection.
struct Medians {
    runs: usize,
    before_mib: f64,
    after_mib: f64,
    peak_mib: f64,
    per_connection_kib: f64,
    lowest_kib: f64,
    highest_kib: f64,
}

impl Medians {
    fn of(rows: &[Row], broker: Broker) -> Option<Medians> {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.broker == broker).collect();
        if mine.is_empty() {
            return None;
        }
        let median = |f: &dyn Fn(&Row) -> f64| {
            let mut v: Vec<f64> = mine.iter().map(|r| f(r)).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        };
        let per: Vec<f64> = mine.iter().map(|r| r.per_connection_kib()).collect();
        Some(Medians {
            runs: mine.len(),
            before_mib: median(&|r| r.before_mib),
            after_mib: median(&|r| r.after_mib),
            peak_mib: median(&|r| r.peak_mib),
            per_connection_kib: median(&|r| r.per_connection_kib()),
            lowest_kib: per.iter().copied().fold(f64::INFINITY, f64::min),
            highest_kib: per.iter().copied().fold(0.0, f64::max),
        })
    }
}

async fn scenario(broker: Broker, s: &Settings) -> Result<Row, (anyhow::Error, String)> {
    let dir = s
        .programs
        .data_dir("idle_connections-")
        .map_err(|e| (e, String::new()))?;
    let [mqtt_port, admin_port] = common::free_ports::<2>().map_err(|e| (e, String::new()))?;
    let relaybox_mqtt = format!("max_connections = {}\n", s.relaybox_max_connections());
    let config = BrokerConfig {
        relaybox_mqtt: &relaybox_mqtt,
        mosquitto: "",
    };
    let mut proc = local::spawn_broker(
        broker,
        &s.programs,
        &s.mosquitto,
        dir.path(),
        mqtt_port,
        admin_port,
        &config,
    )
    .map_err(|e| (e, String::new()))?;
    let outcome = measure(&mut proc, broker, mqtt_port, s)
        .await
        .map_err(|e| (e, proc.log_tail(20)));
    drop(proc);
    if s.keep {
        println!("   kept {}", dir.keep().display());
    }
    outcome
}

async fn measure(proc: &mut Proc, broker: Broker, port: u16, s: &Settings) -> Result<Row> {
    wait_for_port(port, &mut [&mut *proc], "the broker").await?;
    tokio::time::sleep(s.settle).await;
    proc.ensure_running()?;
    let pid = proc.pid();
    let before_mib = vm_rss_mib(pid)?;

    let began = Instant::now();
    let mut streams = Vec::with_capacity(s.connections);
    let mut failed = 0;
    let mut first_failure = None;
    let mut attempts = futures::stream::iter(0..s.connections)
        .map(|i| handshake(i, port, s))
        .buffer_unordered(s.concurrency);
    let deadline = tokio::time::Instant::now() + s.timeout;
    let mut next_report = 2_000;
    loop {
        let next = match tokio::time::timeout_at(deadline, attempts.next()).await {
            Ok(next) => next,
            Err(_) => bail!(
                "time limit of {:?} reached with {} connected and {failed} failed",
                s.timeout,
                streams.len()
            ),
        };
        match next {
            None => break,
            Some(Ok(stream)) => streams.push(stream),
            Some(Err(e)) => {
                failed += 1;
                first_failure.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        let done = streams.len() + failed;
        if done >= next_report {
            proc.ensure_running().context("while connecting")?;
            println!(
                "   {} connected, {failed} failed, {:.1} s, RSS {:.1} MiB",
                thousands(streams.len() as u64),
                began.elapsed().as_secs_f64(),
                vm_rss_mib(pid)?
            );
            next_report += 2_000;
        }
    }
    drop(attempts);
    let connect_s = began.elapsed().as_secs_f64();

    tokio::time::sleep(s.settle).await;
    proc.ensure_running().context("after connecting")?;
    let closed = closed(&streams);
    let after_mib = vm_rss_mib(pid)?;
    let peak_mib = vm_hwm_mib(pid)?;

    drop(streams);
    tokio::time::sleep(s.settle).await;
    proc.ensure_running()
        .context("after closing the connections")?;
    let after_close_mib = vm_rss_mib(pid)?;
    Ok(Row {
        broker,
        accepted: s.connections - failed - closed,
        failed,
        first_failure,
        closed,
        connect_s,
        before_mib,
        after_mib,
        peak_mib,
        after_close_mib,
    })
}

fn main() -> ExitCode {
    common::main("idle_connections", Settings::load(), run)
}

async fn run(s: Settings) -> ExitCode {
    for &b in &s.systems {
        if let Err(e) = local::check_broker(b, &s.programs, &s.mosquitto) {
            eprintln!("idle_connections: {e:#}");
            return ExitCode::from(2);
        }
    }
    let want = s.connections as u64 + 4096;
    let nofile = match local::raise_nofile(want) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("idle_connections: {e:#}");
            return ExitCode::from(2);
        }
    };
    if nofile < s.connections as u64 + 256 {
        eprintln!(
            "idle_connections: RLIMIT_NOFILE is {nofile}, too low for {} connections (run as root, \
             or raise the hard limit: ulimit -Hn / prlimit)",
            s.connections
        );
        return ExitCode::from(2);
    }
    let last = source(s.connections - 1, s.per_source);
    if let Err(e) = std::net::TcpListener::bind((last, 0)) {
        eprintln!("idle_connections: cannot bind source address {last}: {e}");
        return ExitCode::from(2);
    }
    println!(
        "# idle_connections\n\
         machine:   {}\n\
         load:      {} (1, 5, 15 min averages at the start)\n\
         relaybox:  {} (data in {}); [mqtt] allow_anonymous = true, max_connections = {}\n\
         mosquitto: {} ({}); listener PORT 127.0.0.1, allow_anonymous true, {}\n\
         run:       {} idle MQTT 3.1.1 connections (clean session, keep-alive {} s) from 127.0.0.2 \
         to {last}, {} per address, {} handshakes at once; RLIMIT_NOFILE {nofile} for the bench and \
         the brokers",
        machine(),
        load_average(),
        s.programs.relaybox.display(),
        s.programs.tmp_root.display(),
        s.relaybox_max_connections(),
        s.mosquitto.display(),
        local::mosquitto_version(&s.mosquitto),
        local::MOSQUITTO_LOGGING.trim().replace('\n', "; "),
        thousands(s.connections as u64),
        s.keep_alive,
        s.per_source,
        s.concurrency,
    );
    if s.connections > RELAYBOX_MAX_CONNECTIONS && s.systems.contains(&Broker::Relaybox) {
        println!(
            "note: relaybox's [mqtt] max_connections is at most {} (src/config.rs); it refuses the \
             connections beyond it",
            thousands(RELAYBOX_MAX_CONNECTIONS as u64)
        );
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let runs = (1..=s.repeat).flat_map(|run| s.systems.iter().map(move |&b| (run, b)));
    for (run, broker) in runs {
        println!(
            "\n== {} — {} idle connections{}",
            broker.label(),
            thousands(s.connections as u64),
            if s.repeat > 1 {
                format!(" (run {run} of {})", s.repeat)
            } else {
                String::new()
            }
        );
        println!("   load average before: {}", load_average());
        let limit = s.timeout + 4 * s.settle + Duration::from_secs(60);
        let outcome = match tokio::time::timeout(limit, scenario(broker, &s)).await {
            Ok(o) => o,
            Err(_) => Err((anyhow!("scenario exceeded {limit:?} in all"), String::new())),
        };
        match outcome {
            Ok(row) => {
                println!(
                    "   {} of {} connected in {:.1} s ({} failed, {} closed by the broker); RSS \
                     before {:.1} MiB, after {:.1} MiB, peak {:.1} MiB, {:.2} KiB per connection; \
                     {:.1} MiB after closing them",
                    thousands(row.accepted as u64),
                    thousands(s.connections as u64),
                    row.connect_s,
                    row.failed,
                    row.closed,
                    row.before_mib,
                    row.after_mib,
                    row.peak_mib,
                    row.per_connection_kib(),
                    row.after_close_mib
                );
                if let Some(f) = &row.first_failure {
                    println!("   first failure: {f}");
                }
                rows.push(row);
            }
            Err((e, logs)) => {
                println!("   FAILED: {e:#}");
                if !logs.is_empty() {
                    println!("{logs}");
                }
                failures.push((broker, format!("{e:#}")));
            }
        }
    }
    print!("{}", report(&rows, &failures, &s));
    if failures.is_empty() && rows.iter().all(|r| r.accepted == s.connections) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn report(rows: &[Row], failures: &[(Broker, String)], s: &Settings) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Results: {} idle MQTT 3.1.1 connections per broker\n",
        thousands(s.connections as u64)
    );
    let _ = writeln!(
        out,
        "| system | connected | failed | closed by broker | connect s | RSS before MiB | RSS after MiB | peak RSS MiB | RSS per connection KiB | RSS after close MiB |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} |",
            r.broker.label(),
            thousands(r.accepted as u64),
            r.failed,
            r.closed,
            r.connect_s,
            r.before_mib,
            r.after_mib,
            r.peak_mib,
            r.per_connection_kib(),
            r.after_close_mib
        );
    }
    for (b, why) in failures {
        let _ = writeln!(
            out,
            "| {} | FAILED: {} | | | | | | | | |",
            b.label(),
            why.replace('|', "/").lines().next().unwrap_or_default()
        );
    }
    if s.repeat > 1 {
        let _ = writeln!(
            out,
            "\nMedians of {} runs:\n\n| system | runs | RSS before MiB | RSS after MiB | peak RSS MiB | RSS per connection KiB (lowest–highest) |\n|---|---:|---:|---:|---:|---:|",
            s.repeat
        );
        for &b in &s.systems {
            let Some(m) = Medians::of(rows, b) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} ({:.2}–{:.2}) |",
                b.label(),
                m.runs,
                m.before_mib,
                m.after_mib,
                m.peak_mib,
                m.per_connection_kib,
                m.lowest_kib,
                m.highest_kib
            );
        }
    }
    let relaybox = Medians::of(rows, Broker::Relaybox);
    let mosquitto = Medians::of(rows, Broker::Mosquitto);
    if let (Some(r), Some(m)) = (relaybox, mosquitto) {
        let per = r.per_connection_kib / m.per_connection_kib;
        let _ = writeln!(
            out,
            "\nrelaybox / mosquitto (target: <= 1.00){}: RSS per connection {:.2} ({}), RSS after \
             {:.2}, peak RSS {:.2}, RSS before {:.2}",
            if s.repeat > 1 { ", medians" } else { "" },
            per,
            if per <= 1.0 { "met" } else { "missed" },
            r.after_mib / m.after_mib,
            r.peak_mib / m.peak_mib,
            r.before_mib / m.before_mib
        );
    }
    let _ = writeln!(
        out,
        "\nRSS: VmRSS of the broker process, {:?} after start (before), {:?} after the last \
         CONNACK (after) and {:?} after the bench closed them all; peak: VmHWM; per connection: \
         (after - before) / connected.",
        s.settle, s.settle, s.settle
    );
    out
}
