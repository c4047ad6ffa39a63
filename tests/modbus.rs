//! Modbus RTU devices on a serial port: register values reach local subscribers (and the hub)
//! with their scale, a change is published at the next poll, commands write registers, a device
//! that stops answering goes offline and comes back, garbage, CRC errors and exceptions are
//! counted without stopping the bus, and an unplugged adapter is retried.
//!
//! The devices are pymodbus's server (pinned in tests/interop/requirements.txt; an independent
//! implementation), run by `tests/modbus/device.py` with RTU framing on a TCP port. The test joins
//! that port to a pty whose other end the relay opens through a symlink, as a USB RS-485 adapter
//! appears under `/dev/serial/by-id/`. The script also injects the faults (muted replies, bad
//! CRCs, noise before a reply).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::modbus_sim::Sim;
use common::pty::Pty;
use common::{
    admin_get, admin_status, read_stream, toml_str, wait_until, NatsHub, Relay, RelayConfig,
    Subscriber,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

/// Simulated devices on one bus, behind a link the relay opens.
struct Bus {
    sim: Sim,
    link: PathBuf,
    bridge: Option<tokio::task::JoinHandle<()>>,
}

impl Bus {
    /// Starts the simulated `units` and plugs the adapter in.
    async fn start(dir: &Path, units: &str) -> Bus {
        let mut bus = Bus {
            sim: Sim::start(units).await,
            link: dir.join("rs485"),
            bridge: None,
        };
        bus.plug().await;
        bus
    }

    /// A new pty behind the link, joined to the simulator by a new connection.
    async fn plug(&mut self) {
        assert!(self.bridge.is_none(), "the adapter is already plugged in");
        let pty = Pty::open();
        let _ = std::fs::remove_file(&self.link);
        std::os::unix::fs::symlink(&pty.slave_path, &self.link).expect("device link");
        let tcp = self.sim.connect().await;
        self.bridge = Some(tokio::spawn(async move {
            let (mut rd, mut wr) = tcp.into_split();
            let to_devices = async {
                let mut buf = [0u8; 512];
                loop {
                    match pty.read(&mut buf).await {
                        Ok(n) if n > 0 => {
                            if wr.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        // EIO while the relay has the slave closed: wait for it to open again.
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            };
            let to_relay = async {
                let mut buf = [0u8; 512];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let mut at = 0;
                    while at < n {
                        match pty.write(&buf[at..n]).await {
                            Ok(k) => at += k,
                            Err(_) => return,
                        }
                    }
                }
            };
            tokio::select! {
                () = to_devices => {}
                () = to_relay => {}
            }
        }));
    }

    /// Removes the link and closes the pty: the relay's reads fail as after a USB unplug.
    fn unplug(&mut self) {
        std::fs::remove_file(&self.link).expect("remove device link");
        if let Some(b) = self.bridge.take() {
            b.abort();
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.sim.cmd(line).await
    }

    async fn reads(&mut self, unit: u8) -> u64 {
        self.sim.reads(unit).await
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Some(b) = self.bridge.take() {
            b.abort();
        }
    }
}

/// The `[[modbus]]` sections: the meter (unit 1) and the HVAC controller (unit 2) on one bus.
fn devices(link: &Path, meter_extra: &str) -> String {
    let common = format!(
        "path = {}\nbaud = 19200\npoll = \"300ms\"\ntimeout = \"200ms\"\n\
         topic = \"sensors/{{name}}/{{register}}\"\n",
        toml_str(&link.display().to_string())
    );
    format!(
        "[[modbus]]\nname = \"meter\"\nunit = 1\n{common}\
         command_topic = \"commands/{{name}}/{{register}}\"\n\
         [[modbus.register]]\nname = \"power\"\nkind = \"holding\"\naddress = 0\nscale = 0.1\n\
         [[modbus.register]]\nname = \"setpoint\"\nkind = \"holding\"\naddress = 1\ntype = \"i16\"\nscale = 0.5\n\
         [[modbus.register]]\nname = \"energy\"\nkind = \"holding\"\naddress = 2\ntype = \"u32\"\n\
         [[modbus.register]]\nname = \"temp\"\nkind = \"input\"\naddress = 10\ntype = \"f32\"\n\
         [[modbus.register]]\nname = \"relay\"\nkind = \"coil\"\naddress = 3\n\
         [[modbus.register]]\nname = \"door\"\nkind = \"discrete\"\naddress = 4\n\
         {meter_extra}\
         [[modbus]]\nname = \"hvac\"\nunit = 2\n{common}\
         [[modbus.register]]\nname = \"mode\"\nkind = \"holding\"\naddress = 0\n"
    )
}

/// Read requests the meter answers per poll: holding 0–3, input 10–11, coil 3, discrete 4.
const METER_READS_PER_POLL: u64 = 4;

/// The initial values: power 23.4, setpoint −12.5, energy 65538, temp 21.5, relay on, door
/// closed (true); the HVAC mode 3.
async fn set_initial(bus: &mut Bus) {
    let temp = 21.5f32.to_bits();
    for line in [
        "set 1 holding 0 234".to_owned(),
        format!("set 1 holding 1 {}", 65536 - 25),
        "set 1 holding 2 1 2".to_owned(),
        format!("set 1 input 10 {} {}", temp >> 16, temp & 0xffff),
        "set 1 coil 3 1".to_owned(),
        "set 1 discrete 4 1".to_owned(),
        "set 2 holding 0 3".to_owned(),
    ] {
        bus.cmd(&line).await;
    }
}

/// The last payload received on `topic`.
fn last(sub: &Subscriber, topic: &str) -> Option<String> {
    sub.snapshot()
        .iter()
        .rev()
        .find(|(t, _)| t == topic)
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
}

async fn wait_value(sub: &Subscriber, topic: &str, want: &str, relay: &Relay) {
    let seen = wait_until(WAIT, || last(sub, topic).as_deref() == Some(want)).await;
    assert!(
        seen,
        "{topic}: wanted {want:?}, last {:?}\nrelay log:\n{}",
        last(sub, topic),
        relay.log()
    );
}

fn modbus_status(status: &serde_json::Value, device: &str) -> serde_json::Value {
    status["modbus"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["device"] == device))
        .cloned()
        .unwrap_or_else(|| panic!("no Modbus device {device} in /status: {status}"))
}

async fn wait_counter(relay: &Relay, device: &str, key: &str, at_least: u64) -> u64 {
    let port = relay.cfg.admin_port;
    let deadline = Instant::now() + WAIT;
    loop {
        let n = modbus_status(&admin_status(port).await, device)[key]
            .as_u64()
            .unwrap_or(0);
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{device}.{key} stayed at {n} (< {at_least})\nrelay log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `key` of both devices' `/status` counters, added up.
async fn bus_total(relay: &Relay, key: &str) -> u64 {
    let status = admin_status(relay.cfg.admin_port).await;
    ["meter", "hvac"]
        .iter()
        .map(|d| modbus_status(&status, d)[key].as_u64().unwrap_or(0))
        .sum()
}

/// Waits until [`bus_total`] of `key` reaches `at_least`.
async fn wait_bus_total(relay: &Relay, key: &str, at_least: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = bus_total(relay, key).await;
        if n >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key} stayed at {n} (< {at_least})\nrelay log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish(port: u16, topic: &str, payload: &str) {
    common::publish_all_v4(
        port,
        "commander",
        topic,
        vec![payload.as_bytes().to_vec()],
        WAIT,
    )
    .await;
}

/// The meter and the HVAC controller with their initial values, a relay named `name` (without
/// an uplink) polling them, and a subscriber to `sensors/#`.
async fn setup(name: &str, meter_extra: &str) -> (tempfile::TempDir, Bus, Relay, Subscriber) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bus = Bus::start(dir.path(), "1,2").await;
    set_initial(&mut bus).await;
    let relay =
        Relay::start_with_extra(RelayConfig::new(name), &devices(&bus.link, meter_extra)).await;
    let sub = Subscriber::start(relay.port(), "watcher", &["sensors/#"]).await;
    (dir, bus, relay, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_reach_subscribers_and_the_hub_and_commands_write_registers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bus = Bus::start(dir.path(), "1,2").await;
    set_initial(&mut bus).await;
    let hub = NatsHub::start().await;
    let cfg = RelayConfig::new("modbus")
        .uplink(&hub.url())
        .export("sensors/#");
    let relay = Relay::start_with_extra(cfg, &devices(&bus.link, "")).await;
    let sub = Subscriber::start(relay.port(), "watcher", &["sensors/#"]).await;
    for (topic, want) in [
        ("sensors/meter/power", "23.4"),
        ("sensors/meter/setpoint", "-12.5"),
        ("sensors/meter/energy", "65538"),
        ("sensors/meter/temp", "21.5"),
        ("sensors/meter/relay", "true"),
        ("sensors/meter/door", "true"),
        ("sensors/meter/$state", "online"),
        ("sensors/hvac/mode", "3"),
        ("sensors/hvac/$state", "online"),
    ] {
        wait_value(&sub, topic, want, &relay).await;
    }

    // A change is published at the next poll: by the time it arrives, the meter has answered
    // at most the rest of the poll under way and one whole poll more.
    let before = bus.reads(1).await;
    bus.cmd("set 1 holding 0 240").await;
    wait_value(&sub, "sensors/meter/power", "24.0", &relay).await;
    let after = bus.reads(1).await;
    assert!(
        after - before <= 2 * METER_READS_PER_POLL,
        "the change took {} reads to arrive",
        after - before
    );

    // Values are retained: a new subscriber gets them at once.
    let late = Subscriber::start(relay.port(), "late", &["sensors/meter/+"]).await;
    wait_value(&late, "sensors/meter/temp", "21.5", &relay).await;

    // Commands write the registers, in the register's type and scale.
    let port = relay.port();
    publish(port, "commands/meter/setpoint", "-7.5").await;
    publish(port, "commands/meter/relay", "off").await;
    publish(port, "commands/meter/energy", "70000").await;
    wait_value(&sub, "sensors/meter/setpoint", "-7.5", &relay).await;
    wait_value(&sub, "sensors/meter/relay", "false", &relay).await;
    wait_value(&sub, "sensors/meter/energy", "70000", &relay).await;
    assert_eq!(bus.cmd("get 1 holding 1 1").await, (65536 - 15).to_string());
    assert_eq!(bus.cmd("get 1 coil 3 1").await, "0");
    assert_eq!(bus.cmd("get 1 holding 2 2").await, "1 4464");
    wait_counter(&relay, "meter", "writes", 3).await;

    // Bad commands are refused before the bus, and nothing is written.
    publish(port, "commands/meter/temp", "1").await; // an input register
    publish(port, "commands/meter/setpoint", "warm").await; // not a number
    publish(port, "commands/meter/setpoint", "0.3").await; // not a step of 0.5
    publish(port, "commands/meter/setpoint", "99999").await; // beyond i16
    publish(port, "commands/meter/volts", "1").await; // no such register
    wait_counter(&relay, "meter", "commands_refused", 5).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(bus.cmd("get 1 holding 1 1").await, (65536 - 15).to_string());
    let meter = modbus_status(&admin_status(relay.cfg.admin_port).await, "meter");
    assert_eq!(meter["writes"], 3, "{meter}");
    assert_eq!(meter["write_failures"], 0, "{meter}");
    assert_eq!(meter["online"], true, "{meter}");
    assert!(relay.log().contains("Modbus command refused"));

    // Exported values reach the hub (they were durable before subscribers saw them).
    let found = {
        let deadline = Instant::now() + WAIT;
        loop {
            let msgs = read_stream(&hub.url(), common::STREAM, Duration::from_secs(5)).await;
            let hit = msgs
                .iter()
                .any(|m| m.subject.ends_with("sensors.meter.power") && m.payload_str() == "24.0");
            if hit || Instant::now() > deadline {
                break hit;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(
        found,
        "sensors/meter/power 24.0 never reached the hub\n{}",
        relay.log()
    );

    // /metrics carries the devices, and parses.
    let metrics = admin_get(relay.cfg.admin_port, "/metrics").await;
    let body = metrics.split("\r\n\r\n").nth(1).unwrap_or(&metrics);
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("metrics parse");
    let online = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "relaybox_modbus_device_online" && s.labels.get("device") == Some("hvac")
        })
        .expect("relaybox_modbus_device_online{device=\"hvac\"}");
    assert!(matches!(online.value, prometheus_parse::Value::Gauge(v) if v == 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_answering_goes_offline_while_the_bus_goes_on() {
    let (_dir, mut bus, relay, sub) = setup("modbus-mute", "").await;
    wait_value(&sub, "sensors/meter/$state", "online", &relay).await;
    wait_value(&sub, "sensors/hvac/$state", "online", &relay).await;

    bus.cmd("mute 1 on").await;
    wait_value(&sub, "sensors/meter/$state", "offline", &relay).await;
    assert!(relay.log().contains("Modbus device offline"));
    // The other device on the bus keeps being read, and its changes published.
    let hvac_before = bus.reads(2).await;
    bus.cmd("set 2 holding 0 4").await;
    wait_value(&sub, "sensors/hvac/mode", "4", &relay).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hvac_after = bus.reads(2).await;
    assert!(
        hvac_after >= hvac_before + 3,
        "hvac was read {} times in over a second while the meter was silent",
        hvac_after - hvac_before
    );
    assert_eq!(last(&sub, "sensors/hvac/$state").as_deref(), Some("online"));
    let status = admin_status(relay.cfg.admin_port).await;
    let meter = modbus_status(&status, "meter");
    assert_eq!(meter["online"], false, "{meter}");
    assert!(meter["timeouts"].as_u64().unwrap_or(0) >= 3, "{meter}");

    bus.cmd("mute 1 off").await;
    bus.cmd("set 1 holding 0 250").await;
    wait_value(&sub, "sensors/meter/$state", "online", &relay).await;
    wait_value(&sub, "sensors/meter/power", "25.0", &relay).await;
    assert!(relay.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bad_crcs_and_exceptions_are_counted_and_polling_goes_on() {
    // Address 500 is beyond what the simulated meter has: it answers with an exception.
    let missing = "[[modbus.register]]\nname = \"missing\"\nkind = \"holding\"\naddress = 500\n";
    let (_dir, mut bus, relay, sub) = setup("modbus-faults", missing).await;
    wait_value(&sub, "sensors/meter/power", "23.4", &relay).await;
    wait_value(&sub, "sensors/meter/$state", "online", &relay).await;
    let exceptions = wait_counter(&relay, "meter", "exceptions", 2).await;
    assert!(exceptions >= 2);
    assert_eq!(
        relay.log_count("Modbus device refused a read"),
        1,
        "a repeated exception is logged once"
    );

    // Replies with a wrong CRC, then replies after noise: counted, whichever device got them.
    bus.cmd("corrupt 2").await;
    wait_bus_total(&relay, "bad_frames", 1).await;
    let noise_before = bus_total(&relay, "garbage_bytes").await;
    bus.cmd("garbage 4").await;
    wait_bus_total(&relay, "garbage_bytes", noise_before + 5).await;

    // Nothing stopped: both devices are still read and their changes published.
    bus.cmd("set 1 holding 0 111").await;
    bus.cmd("set 2 holding 0 7").await;
    wait_value(&sub, "sensors/meter/power", "11.1", &relay).await;
    wait_value(&sub, "sensors/hvac/mode", "7", &relay).await;
    // A short burst of bad replies does not take a device offline.
    assert!(sub
        .snapshot()
        .iter()
        .all(|(t, p)| !(t.ends_with("$state") && p == b"offline")));
    assert!(last(&sub, "sensors/meter/missing").is_none());
    assert!(relay.is_running());
    assert!(!relay.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_adapter_is_retried_and_its_devices_come_back() {
    let (_dir, mut bus, relay, sub) = setup("modbus-unplug", "").await;
    wait_value(&sub, "sensors/meter/$state", "online", &relay).await;

    bus.unplug();
    wait_value(&sub, "sensors/meter/$state", "offline", &relay).await;
    wait_value(&sub, "sensors/hvac/$state", "offline", &relay).await;
    bus.cmd("set 1 holding 0 99").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bus.plug().await;
    wait_value(&sub, "sensors/meter/$state", "online", &relay).await;
    wait_value(&sub, "sensors/hvac/$state", "online", &relay).await;
    wait_value(&sub, "sensors/meter/power", "9.9", &relay).await;
    assert!(relay.log_count("Modbus port open") >= 2, "{}", relay.log());
    assert!(relay.is_running());
}
