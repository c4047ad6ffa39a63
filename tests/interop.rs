//! MQTT conformance as an independent client sees it: the paho-mqtt (Python) suite in
//! `tests/interop/conformance.py`, MQTT 3.1.1 and 5, run against the real relay over a real
//! socket. (The Rust suites `conformance_v4.rs` and `conformance_v5.rs` check the same rows with
//! rumqttc and hand-made packets: a behaviour counts as supported when both agree.)
//!
//! The Python with paho-mqtt (pinned in `tests/interop/requirements.txt`) comes from
//! `scripts/interop-python`, which installs it into the project-local `.venv/` when missing.

mod common;

use std::time::Duration;

use common::{interop_python, Relay, RelayConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_mqtt_suite_passes_for_3_1_1_and_5() {
    let python = tokio::task::spawn_blocking(interop_python)
        .await
        .expect("interop python");
    let relay = Relay::start(RelayConfig::new("interop")).await;
    let port = relay.port();
    let root = env!("CARGO_MANIFEST_DIR");
    let run = tokio::process::Command::new(python)
        .arg(format!("{root}/tests/interop/conformance.py"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--timeout", "240"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the paho-mqtt suite did not finish within 300 s")
        .expect("run the paho-mqtt suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "paho-mqtt suite failed ({}):\n{stdout}\n{stderr}\nrelay log:\n{}",
        out.status,
        relay.log()
    );
    assert!(
        stdout.contains(" passed, 0 failed"),
        "no summary line in:\n{stdout}"
    );
}
