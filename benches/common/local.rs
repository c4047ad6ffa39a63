//! What the local-broker benches (`local_fanout`, `idle_connections`) share beyond `mod.rs`: the
//! two brokers they compare (relaybox without an uplink, and Mosquitto), each started on
//! 127.0.0.1 with a config written for the run, the file-descriptor limit, and resident memory.
//!
//! A bench includes it with `#[path = "common/local.rs"] mod local;` next to `mod common;`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::common::{find_on_path, path_str, proc_field, Proc, Programs};

/// The brokers the local benches compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Relaybox,
    Mosquitto,
}

impl Broker {
    pub fn parse(s: &str) -> Result<Broker> {
        match s.trim() {
            "relaybox" | "r" => Ok(Broker::Relaybox),
            "mosquitto" | "m" => Ok(Broker::Mosquitto),
            other => bail!("unknown system {other:?} (relaybox, mosquitto or r, m)"),
        }
    }

    pub fn parse_list(list: &str) -> Result<Vec<Broker>> {
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Broker::parse)
            .collect()
    }

    pub fn label(self) -> &'static str {
        match self {
            Broker::Relaybox => "relaybox",
            Broker::Mosquitto => "mosquitto",
        }
    }
}

/// `BENCH_MOSQUITTO`, else mosquitto on `PATH`, else `/usr/sbin/mosquitto` (where Debian's
/// `mosquitto` package installs it).
pub fn mosquitto_program() -> PathBuf {
    std::env::var_os("BENCH_MOSQUITTO")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| find_on_path("mosquitto"))
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto"))
}

/// The first line of `mosquitto -h` (`mosquitto version 2.0.11`), or why it could not be run.
pub fn mosquitto_version(program: &Path) -> String {
    Command::new(program)
        .arg("-h")
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("unknown")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// What each broker is told besides listening on 127.0.0.1 and taking anonymous clients: lines
/// for relaybox's `[mqtt]` section and lines for the Mosquitto config file.
pub struct BrokerConfig<'a> {
    pub relaybox_mqtt: &'a str,
    pub mosquitto: &'a str,
}

/// The Mosquitto settings every run has: errors and warnings only on stderr (relaybox runs with
/// `RUST_LOG=warn`), no line per connection.
pub const MOSQUITTO_LOGGING: &str =
    "log_dest stderr\nlog_type error\nlog_type warning\nconnection_messages false\n";

/// Starts `broker` with its config, log and data in `dir`: MQTT on 127.0.0.1:`mqtt_port`,
/// anonymous clients allowed; relaybox has no uplink (a local broker with a store) and its admin
/// endpoint on `admin_port`. The child inherits the bench's resource limits.
pub fn spawn_broker(
    broker: Broker,
    programs: &Programs,
    mosquitto: &Path,
    dir: &Path,
    mqtt_port: u16,
    admin_port: u16,
    config: &BrokerConfig<'_>,
) -> Result<Proc> {
    match broker {
        Broker::Relaybox => {
            let conf = dir.join("relaybox.toml");
            fs::write(
                &conf,
                format!(
                    "[relay]\nname = \"bench\"\ndata_dir = {:?}\n\n\
                     [mqtt]\nlisten = \"127.0.0.1:{mqtt_port}\"\nallow_anonymous = true\n{}\n\
                     [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n",
                    dir.join("relaybox-data"),
                    config.relaybox_mqtt
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
        Broker::Mosquitto => {
            let conf = dir.join("mosquitto.conf");
            fs::write(
                &conf,
                format!(
                    "listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n{}{MOSQUITTO_LOGGING}",
                    config.mosquitto
                ),
            )
            .with_context(|| format!("write {}", conf.display()))?;
            Proc::spawn(
                "mosquitto",
                mosquitto,
                &["-c", path_str(&conf)?],
                &[],
                dir.join("mosquitto.log"),
            )
        }
    }
}

/// An error when the binary `broker` needs is missing.
pub fn check_broker(broker: Broker, programs: &Programs, mosquitto: &Path) -> Result<()> {
    match broker {
        Broker::Relaybox if !programs.relaybox.is_file() => bail!(
            "relaybox binary not found at {} (cargo build --release, or set BENCH_RELAYBOX)",
            programs.relaybox.display()
        ),
        Broker::Mosquitto if !mosquitto.is_file() => bail!(
            "mosquitto not found at {} (apt-get install mosquitto, or set BENCH_MOSQUITTO)",
            mosquitto.display()
        ),
        _ => Ok(()),
    }
}

/// Resident memory (`VmRSS`) of process `pid` in MiB.
pub fn vm_rss_mib(pid: u32) -> Result<f64> {
    Ok(proc_field(&format!("/proc/{pid}/status"), "VmRSS:")? as f64 / 1024.0)
}

/// Raises this process's soft `RLIMIT_NOFILE` to `want`, first raising the hard limit to `want`
/// when it is lower and the process may (root); children started afterwards inherit it. Returns
/// the soft limit in force.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_max < want {
        let higher = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: want as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct we own. Failing (no privilege) leaves the limits.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &higher) } == 0 {
            return Ok(want);
        }
    }
    let soft = want.min(lim.rlim_max);
    if lim.rlim_cur < soft {
        let raised = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
        return Ok(soft);
    }
    Ok(lim.rlim_cur)
}

/// `n` with a thousands separator: `100,000`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
