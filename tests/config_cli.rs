//! The command line: `check-config`, `run --config` with a bad file, `--version`, and `run` with
//! no file at all (the embedded default: MQTT on 127.0.0.1:1883, data in ./relaybox-data).

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    free_port, port_open, publish_all_v4, send_signal, stop_counters, tail, toml_str, wait_exit,
    Subscriber, RELAY_BIN,
};

/// Runs the binary to completion, bounded by 20 s.
async fn run_bin(args: &[&str], cwd: &Path) -> Output {
    let mut cmd = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let cwd = cwd.to_owned();
        move || {
            Command::new(RELAY_BIN)
                .args(&args)
                .current_dir(cwd)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn relaybox")
        }
    })
    .await
    .expect("spawn");
    let status = wait_exit(&mut cmd, Duration::from_secs(20)).await;
    if status.is_none() {
        let _ = cmd.kill();
    }
    let out = cmd.wait_with_output().expect("output");
    assert!(
        status.is_some(),
        "relaybox {args:?} did not exit within 20 s; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn check_config_accepts_the_example_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run_bin(&["check-config", "config/relaybox.toml"], root).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "config/relaybox.toml: ok");
}

const GOOD_HEAD: &str = "[relay]\nname = \"a\"\ndata_dir = \"d\"\n";

#[tokio::test]
async fn check_config_reports_one_line_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (file text, expected start of the error after "<path>:")
    let cases: Vec<(String, &str)> = vec![
        (format!("{GOOD_HEAD}colour = 1\n"), "4: key `relay.colour`:"),
        (
            format!("{GOOD_HEAD}[mqtt]\nlisten = 5\n"),
            "5: key `mqtt.listen`:",
        ),
        (
            format!("{GOOD_HEAD}[mqtt]\nlisten = \"nowhere\"\n"),
            "5: key `mqtt.listen`:",
        ),
        (
            format!("{GOOD_HEAD}\n[mqtt]\nlisten = \"127.0.0.1:99999\"\n"),
            "6: key `mqtt.listen`:",
        ),
        (
            format!("{GOOD_HEAD}[outbox]\nmax_bytes = 100\n"),
            "5: key `outbox.max_bytes`:",
        ),
        (
            format!("{GOOD_HEAD}[outbox]\npolicy = \"drop-all\"\n"),
            "5: key `outbox.policy`:",
        ),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        fs::write(&path, body).expect("write");
        let shown = path.display().to_string();
        let out = run_bin(&["check-config", &shown], dir.path()).await;
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "check-config on {body:?}: exit code; stderr {err}"
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "check-config on {body:?}: stderr must be one line, got {err:?}"
        );
        let want = format!("{shown}:{want}");
        assert!(
            err.starts_with(&want),
            "check-config on {body:?}:\n got: {err}want: {want}…"
        );
    }

    let missing = dir.path().join("missing.toml").display().to_string();
    let out = run_bin(&["check-config", &missing], dir.path()).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "missing file: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(
        err.starts_with(&format!("{missing}:")),
        "names the file: {err}"
    );
}

#[tokio::test]
async fn run_with_a_bad_config_exits_without_listening_or_creating_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let data = dir.path().join("data");
    let path = dir.path().join("bad.toml");
    fs::write(
        &path,
        format!(
            "[relay]\nname = \"bad\"\ndata_dir = {}\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n\
             [outbox]\npolicy = \"sometimes\"\n",
            toml_str(&data.display().to_string())
        ),
    )
    .expect("write");

    let mut child = Command::new(RELAY_BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut listened = false;
    while child.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
        listened |= port_open(port);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exited = child.try_wait().expect("try_wait");
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    let err = text(&out.stderr);
    assert!(
        exited.is_some(),
        "run with a bad config kept running: {err}"
    );
    assert!(
        !out.status.success(),
        "run with a bad config exited 0: {err}"
    );
    assert!(!listened, "run with a bad config opened the MQTT port");
    assert!(!data.exists(), "run with a bad config created the data dir");
    assert!(
        err.contains(&format!("{}:7: key `outbox.policy`", path.display())),
        "the error names file, line and key: {err}"
    );

    let missing = dir.path().join("nope.toml").display().to_string();
    let out = run_bin(&["run", "--config", &missing], dir.path()).await;
    assert!(!out.status.success(), "run with a missing config exited 0");
}

#[tokio::test]
async fn version_prints_the_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_bin(&["--version"], dir.path()).await;
    assert!(out.status.success());
    let v = text(&out.stdout);
    assert!(
        v.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_config_serves_the_embedded_default() {
    // The embedded default listens on 127.0.0.1:1883; this test needs that port.
    match TcpListener::bind("127.0.0.1:1883") {
        Ok(l) => drop(l),
        Err(e) => panic!("127.0.0.1:1883 must be free for this test: {e}"),
    }
    let cwd = tempfile::tempdir().expect("tempdir");
    let log_path = cwd.path().join("relay.log");
    let log = fs::File::create(&log_path).expect("log");
    let mut child = Command::new(RELAY_BIN)
        .arg("run")
        .current_dir(cwd.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    let read_log = || fs::read_to_string(&log_path).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(10);
    while !port_open(1883) {
        if child.try_wait().expect("try_wait").is_some() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`relaybox run` did not serve 127.0.0.1:1883:\n{}",
                tail(&read_log(), 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let data_dir = cwd.path().join("relaybox-data");
    let result = async move {
        assert!(
            data_dir.is_dir(),
            "./relaybox-data was not created in the working directory"
        );
        let sub = Subscriber::start(1883, "default-sub", &["t/#"]).await;
        publish_all_v4(
            1883,
            "default-pub",
            "t/1",
            vec![b"hello".to_vec()],
            Duration::from_secs(10),
        )
        .await;
        sub.wait_for(1, Duration::from_secs(10)).await;
        assert_eq!(sub.snapshot(), vec![("t/1".to_owned(), b"hello".to_vec())]);
    };
    // Make sure the process is stopped even if an assertion above fails.
    let outcome = tokio::spawn(result).await;
    send_signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    let status = status.expect("relaybox did not exit within 20 s of SIGTERM");
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        tail(&read_log(), 30)
    );
    assert!(
        stop_counters(&read_log()).is_some(),
        "no stop line:\n{}",
        tail(&read_log(), 30)
    );
}
