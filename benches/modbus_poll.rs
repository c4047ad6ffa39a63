//! Modbus poll cycle against the wire time: D devices × R registers on one RS-485 bus, polled
//! back to back by relaybox, at each baud rate; the physical limit is the time the frames and
//! the silences between them need on the wire.
//!
//! Run with `cargo bench --bench modbus_poll` (cargo builds `target/release/relaybox` first).
//! Like the other benches this prints figures and fails only when a scenario cannot run.
//!
//! The bus is a pseudo-terminal: relaybox opens its slave through a link, the bench's simulated
//! devices own the master. A pty moves bytes at once whatever the baud rate, so the simulator
//! keeps the wire's time itself: a request that arrives at t is answered at
//! t + (request bytes + reply bytes) × character time + the 3.5-character silence, as a device
//! answering at once on a real line would be heard. The relay must then keep the line silent
//! for 3.5 characters again before its next request. The wire time of one transaction is thus
//! request + reply + 2 silences (`relaybox::modbus::wire`), and of one poll cycle D of them
//! (each device's R registers touch, so one read each).
//!
//! Every device answers function 3 (read holding registers) for any address, with values that
//! change at every read, so every poll also publishes every register (retained) into the local
//! broker: the cycle includes that work.
//!
//! Figures: the cycle is the time between two requests to unit 1, averaged over `--cycles`
//! cycles after 3 to warm up; the ratio is cycle / wire time (target ≤ 1.2); relaybox's CPU time
//! per cycle is from `/proc/PID/stat`.
//!
//! ```text
//!   --bauds LIST      baud rates             MODBUS_BENCH_BAUDS      (9600,115200)
//!   --devices N       devices on the bus     MODBUS_BENCH_DEVICES    (10)
//!   --registers N     registers per device   MODBUS_BENCH_REGISTERS  (10)
//!   --cycles N        cycles measured        MODBUS_BENCH_CYCLES     (20)
//!   --keep            keep data directories and logs
//! ```
//!
//! `BENCH_RELAYBOX`, `BENCH_TMPDIR` and `BENCH_RELAYBOX_LOG` as in the other benches.

#[allow(dead_code)]
mod common;

use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use relaybox::config::Parity;
use relaybox::modbus::wire::{self, LineTiming, Read};

use common::{load_average, machine, path_str, Proc, Programs};

const USAGE: &str = "\
modbus_poll: Modbus RTU poll cycle of relaybox against the wire time

usage: cargo bench --bench modbus_poll [-- FLAGS]

  --bauds LIST      baud rates             MODBUS_BENCH_BAUDS      (9600,115200)
  --devices N       devices on the bus     MODBUS_BENCH_DEVICES    (10)
  --registers N     registers per device   MODBUS_BENCH_REGISTERS  (10)
  --cycles N        cycles measured        MODBUS_BENCH_CYCLES     (20)
  --keep            keep data directories and logs

  BENCH_RELAYBOX     relaybox binary (default: the one cargo just built)
  BENCH_TMPDIR       where data directories go (default: target/bench-tmp)
  BENCH_RELAYBOX_LOG RUST_LOG for relaybox (default: warn)
";

/// Cycles polled before the measured ones.
const WARM_UP: usize = 3;

#[derive(Debug, Clone)]
struct Settings {
    bauds: Vec<u32>,
    devices: u8,
    registers: u16,
    cycles: usize,
    keep: bool,
    programs: Programs,
}

impl Settings {
    fn load() -> Result<Settings> {
        let raw = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut bauds = raw("MODBUS_BENCH_BAUDS");
        let mut devices = raw("MODBUS_BENCH_DEVICES");
        let mut registers = raw("MODBUS_BENCH_REGISTERS");
        let mut cycles = raw("MODBUS_BENCH_CYCLES");
        let mut keep = false;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let slot = match flag.as_str() {
                "--bench" => continue,
                "--keep" => {
                    keep = true;
                    continue;
                }
                "--help" | "-h" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                "--bauds" => &mut bauds,
                "--devices" => &mut devices,
                "--registers" => &mut registers,
                "--cycles" => &mut cycles,
                other => bail!("unknown flag {other:?}\n\n{USAGE}"),
            };
            *slot = Some(match inline {
                Some(v) => v,
                None => args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?,
            });
        }
        let number = |v: Option<String>, name: &str, default: u64, max: u64| -> Result<u64> {
            match v {
                None => Ok(default),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if (1..=max).contains(&n) => Ok(n),
                    _ => bail!("{name} {v:?} must be a number from 1 to {max}"),
                },
            }
        };
        let bauds = match bauds {
            None => vec![9_600, 115_200],
            Some(list) => list
                .split(',')
                .map(|b| {
                    b.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|b| *b >= 1200)
                        .ok_or_else(|| anyhow!("baud {b:?} must be a number of at least 1200"))
                })
                .collect::<Result<_>>()?,
        };
        Ok(Settings {
            bauds,
            devices: number(devices, "--devices", 10, 247)? as u8,
            registers: number(registers, "--registers", 10, 125)? as u16,
            cycles: number(cycles, "--cycles", 20, 10_000)? as usize,
            keep,
            programs: Programs::from_env(),
        })
    }
}

fn main() -> ExitCode {
    common::main("modbus_poll", Settings::load(), run)
}

async fn run(s: Settings) -> ExitCode {
    println!("modbus_poll: {}", machine());
    println!("load average at start: {}", load_average());
    println!(
        "{} devices × {} holding registers on one bus, 8N1, polled back to back; {} cycles after {WARM_UP} to warm up\n",
        s.devices, s.registers, s.cycles
    );
    println!("| baud | wire time per cycle ms | relaybox cycle ms | ratio (target ≤ 1.2) | relaybox CPU ms per cycle |");
    println!("|---:|---:|---:|---:|---:|");
    let mut failed = false;
    for &baud in &s.bauds {
        match measure(&s, baud).await {
            Ok(m) => println!(
                "| {baud} | {:.1} | {:.1} | {:.3} | {:.2} |",
                ms(m.wire),
                ms(m.cycle),
                m.cycle.as_secs_f64() / m.wire.as_secs_f64(),
                ms(m.cpu)
            ),
            Err(e) => {
                failed = true;
                println!("| {baud} | FAILED: {e:#} | | | |");
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Measured {
    wire: Duration,
    cycle: Duration,
    cpu: Duration,
}

async fn measure(s: &Settings, baud: u32) -> Result<Measured> {
    let line = LineTiming {
        baud,
        data_bits: 8,
        parity: Parity::None,
        stop_bits: 1,
    };
    let read = Read {
        kind: relaybox::config::RegisterKind::Holding,
        address: 0,
        count: s.registers,
        registers: Vec::new(),
    };
    let transaction =
        line.transaction_time(wire::READ_REQUEST_BYTES, wire::read_reply_bytes(&read));
    let wire = transaction * u32::from(s.devices);

    let dir = s.programs.data_dir("modbus-bench-")?;
    let (master, slave_path) = open_pty()?;
    let link = dir.path().join("rs485");
    std::os::unix::fs::symlink(&slave_path, &link).context("link the pty")?;
    let requests: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let simulator = std::thread::spawn({
        let requests = requests.clone();
        let stop = stop.clone();
        move || simulate(master, line, &requests, &stop)
    });
    let mut relay = spawn_relay(s, &line, dir.path(), &link)?;
    let want = WARM_UP + s.cycles + 1;
    // Bounded: at most 5 × the wire time of every cycle wanted, plus 30 s to start.
    let limit = wire * (5 * want as u32) + Duration::from_secs(30);
    let started = Instant::now();
    let mut cpu_at_warm: Option<(Duration, usize)> = None;
    let outcome = loop {
        let seen = requests.lock().map(|r| r.len()).unwrap_or(0);
        if cpu_at_warm.is_none() && seen > WARM_UP {
            cpu_at_warm = Some((cpu_time(relay.pid())?, seen));
        }
        if seen >= want {
            break Ok(());
        }
        if let Err(e) = relay.ensure_running() {
            break Err(e);
        }
        if started.elapsed() > limit {
            break Err(anyhow!(
                "only {seen} of {want} cycles within {limit:?}; relaybox log:\n{}",
                relay.log_tail(20)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu_end = cpu_time(relay.pid()).unwrap_or_default();
    let seen_end = requests.lock().map(|r| r.len()).unwrap_or(0);
    relay.stop();
    stop.store(true, Ordering::Relaxed);
    let _ = simulator.join();
    if s.keep {
        println!("kept {}", dir.keep().display());
    }
    outcome?;
    let times = requests
        .lock()
        .map_err(|_| anyhow!("the simulator failed"))?
        .clone();
    let first = times[WARM_UP];
    let last = times[WARM_UP + s.cycles];
    let cycle = (last - first) / s.cycles as u32;
    let cpu = match cpu_at_warm {
        Some((at, seen)) if seen_end > seen => {
            (cpu_end.saturating_sub(at)) / (seen_end - seen) as u32
        }
        _ => Duration::ZERO,
    };
    Ok(Measured { wire, cycle, cpu })
}

fn spawn_relay(s: &Settings, line: &LineTiming, dir: &Path, link: &Path) -> Result<Proc> {
    let [mqtt, admin] = common::free_ports::<2>()?;
    let mut conf = format!(
        "[relay]\nname = \"bench\"\ndata_dir = {:?}\n\n[mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\
         allow_anonymous = true\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        dir.join("relaybox-data")
    );
    for unit in 1..=s.devices {
        conf.push_str(&format!(
            "\n[[modbus]]\nname = \"d{unit}\"\npath = {:?}\nbaud = {}\nunit = {unit}\n\
             poll = \"1ms\"\ntimeout = \"1s\"\ntopic = \"bench/{{name}}/{{register}}\"\n",
            link, line.baud
        ));
        for r in 0..s.registers {
            conf.push_str(&format!(
                "[[modbus.register]]\nname = \"r{r}\"\nkind = \"holding\"\naddress = {r}\n"
            ));
        }
    }
    let path = dir.join("relaybox.toml");
    fs::write(&path, conf).with_context(|| format!("write {}", path.display()))?;
    Proc::spawn(
        "relaybox",
        &s.programs.relaybox,
        &["run", "--config", path_str(&path)?],
        &[("RUST_LOG", s.programs.relaybox_log.as_str())],
        dir.join("relaybox.log"),
    )
}

/// utime + stime of `pid`.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).context("read /proc/PID/stat")?;
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/PID/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("no field {i} in /proc/PID/stat"))
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(
        (ticks(11)? + ticks(12)?) * 1_000_000_000 / hz,
    ))
}

/// A pty pair: the master (blocking) for the simulator, and the slave's path for the relay.
fn open_pty() -> Result<(File, std::path::PathBuf)> {
    let check = |rc: libc::c_int, what: &str| -> Result<libc::c_int> {
        if rc < 0 {
            bail!("{what}: {}", std::io::Error::last_os_error());
        }
        Ok(rc)
    };
    // SAFETY: plain libc calls on a descriptor owned here; results are checked, and ptsname_r
    // NUL-terminates the buffer on success.
    unsafe {
        let m = check(
            libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC),
            "posix_openpt",
        )?;
        let master = OwnedFd::from_raw_fd(m);
        check(libc::grantpt(m), "grantpt")?;
        check(libc::unlockpt(m), "unlockpt")?;
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0 {
            bail!("ptsname_r failed");
        }
        let name = std::ffi::CStr::from_ptr(name.as_ptr());
        let path = std::path::PathBuf::from(name.to_string_lossy().into_owned());
        Ok((File::from(master), path))
    }
}

/// CRC-16/MODBUS.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for b in bytes {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Answers read-holding-registers requests for every unit, in wire time; records when each
/// request to unit 1 arrived. Runs until `stop`.
fn simulate(mut master: File, line: LineTiming, requests: &Mutex<Vec<Instant>>, stop: &AtomicBool) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 512];
    let mut counter: u16 = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut fds = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor, with a 100 ms limit.
        let ready = unsafe { libc::poll(&mut fds, 1, 100) };
        if ready <= 0 {
            continue;
        }
        let n = match master.read(&mut chunk) {
            Ok(n) => n,
            // EIO while the relay has not opened (or has closed) the slave.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let arrived = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 8 {
            let frame = &buf[..8];
            let crc = u16::from_le_bytes([frame[6], frame[7]]);
            if frame[1] != 3 || crc16(&frame[..6]) != crc {
                buf.remove(0);
                continue;
            }
            let unit = frame[0];
            let count = u16::from_be_bytes([frame[4], frame[5]]);
            buf.drain(..8);
            if unit == 1 {
                if let Ok(mut r) = requests.lock() {
                    r.push(arrived);
                }
            }
            counter = counter.wrapping_add(1);
            let mut reply = vec![unit, 3, (2 * count) as u8];
            for i in 0..count {
                reply.extend_from_slice(&counter.wrapping_add(i).to_be_bytes());
            }
            let crc = crc16(&reply);
            reply.extend_from_slice(&crc.to_le_bytes());
            // Heard in full once the request, the silence and the reply have crossed the wire.
            let heard = arrived + line.bytes_time(8 + reply.len()) + line.frame_gap();
            std::thread::sleep(heard.saturating_duration_since(Instant::now()));
            if master.write_all(&reply).is_err() {
                break;
            }
        }
    }
}
