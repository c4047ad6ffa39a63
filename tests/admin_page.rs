//! The box's web page and the admin endpoint, against the real binary:
//! - the page in Debian's Chromium (driven by playwright-core, `tests/browser/`): the relay's
//!   name, a client, the hub link going down and up, the backlog rising while the hub is away
//!   and falling after; no script error, nothing requested from outside the box; screenshots
//!   in `target/test-artefacts/admin-page/`;
//! - `/metrics` through promtool, the Prometheus reference parser and linter;
//! - beyond the box (a network namespace of the test's own, the endpoint on a non-loopback
//!   address): TLS only, no login → 401, a wrong password → 401, a user outside `admins` →
//!   403, an admin → the page; the refusals counted; SIGHUP takes a renewed certificate.
//!
//! Needs root (network namespace), node with `tests/browser/node_modules`, chromium and
//! promtool: `scripts/test` installs them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::browser::{artefacts, Browser};
use common::netns::Netns;
use common::{
    add_user, admin_get, free_port, tail, wait_stream_count, wait_until, NatsHub, Relay,
    RelayConfig, RELAY_BIN, STREAM,
};

/// How long the browser may take to reach one stage.
const STAGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_follows_the_hub_link_and_the_backlog() {
    const NAME: &str = "office-lisbon-2";
    const CLIENT: &str = "boiler-room-sensor";
    let mut hub = NatsHub::start().await;
    let relay = Relay::start(
        RelayConfig::new(NAME)
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    let admin = relay.cfg.admin_port;

    // A sensor publishing 20 messages a second, QoS 1, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sensor = tokio::spawn(sensor(relay.port(), CLIENT, stop.clone(), sent.clone()));

    let shots = artefacts("admin-page");
    let url = format!("http://127.0.0.1:{admin}/");
    let shots_arg = shots.display().to_string();
    let mut browser = Browser::start("admin_page.mjs", &[&url, NAME, CLIENT, &shots_arg], STAGE);
    browser.reached("shown").await;
    browser.reached("client").await;
    hub.kill();
    browser.reached("down").await;
    let rising = browser.reached("rising").await;
    stop.store(true, Ordering::Relaxed);
    sensor.await.expect("sensor task");
    hub.restart().await;
    browser.reached("up").await;
    browser.reached("drained").await;
    browser.reached("ok").await;
    browser.finished();

    // What the page showed was so: every message the sensor had acknowledged reached the hub.
    let sent = sent.load(Ordering::Relaxed);
    let stored = wait_stream_count(&hub.url(), STREAM, sent, Duration::from_secs(30)).await;
    assert!(
        stored >= sent,
        "{stored} of {sent} messages in the hub ({rising})"
    );
    for shot in ["hub-down.png", "page.png", "phone.png"] {
        let len = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(len > 10_000, "{shot}: {len} bytes");
    }
    assert!(
        relay.log().contains("hub disconnected"),
        "{}",
        tail(&relay.log(), 20)
    );
}

/// Publishes QoS 1 to `sensors/temp` at 20 messages a second until `stop`; counts the
/// acknowledged ones in `sent`. (rumqttc's event loop is polled by a task of its own: a poll
/// cut short while it connects loses the connection.)
async fn sensor(port: u16, id: &str, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let acks = sent.clone();
    let poller = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(error) => panic!("sensor: {error}"),
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        n += 1;
        client
            .publish(
                "sensors/temp",
                QoS::AtLeastOnce,
                false,
                format!("{{\"n\":{n}}}"),
            )
            .await
            .expect("queue publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was sent is acknowledged before the sensor goes.
    let all = wait_until(Duration::from_secs(15), || {
        sent.load(Ordering::Relaxed) >= n
    })
    .await;
    assert!(
        all,
        "sensor: {} of {n} acknowledged",
        sent.load(Ordering::Relaxed)
    );
    client.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_the_prometheus_reference_parser() {
    let hub = NatsHub::start().await;
    let relay = Relay::start(
        RelayConfig::new("office-metrics")
            .uplink(&hub.url())
            .export("sensors/#"),
    )
    .await;
    common::publish_all_v4(
        relay.port(),
        "metrics-sensor",
        "sensors/x",
        (0..20).map(|i| format!("{i}").into_bytes()).collect(),
        Duration::from_secs(10),
    )
    .await;
    // Every message acknowledged by the hub (and counted so) before the scrape.
    common::wait_outbox_empty(relay.cfg.admin_port, Duration::from_secs(10)).await;
    let text = admin_get(relay.cfg.admin_port, "/metrics").await;
    assert!(
        text.contains("relaybox_messages_total{direction=\"to_hub\"} 20.0"),
        "{text}"
    );
    let mut promtool = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = promtool.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics: {said}\n{text}"
    );
    assert_eq!(said.trim(), "", "promtool found problems");
}

/// promtool, from `scripts/promtool` (which unpacks Debian's when it is missing).
fn promtool() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/promtool");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/promtool");
    assert!(out.status.success(), "scripts/promtool failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Beyond the box
// ---------------------------------------------------------------------------------------------

/// The address the endpoint is served on inside the test's network namespace.
const OUTSIDE_IP: &str = "10.251.0.1";

/// A TLS client that trusts `cert` alone.
fn client_config(cert: &rcgen::Certificate) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("trust the cert");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// One HTTPS request inside the namespace: (status code, body), or (0, the error) when the
/// TLS handshake fails.
fn https_get(
    tls: Arc<rustls::ClientConfig>,
    port: u16,
    path: &str,
    login: Option<(&str, &str)>,
) -> (u16, String) {
    use base64::Engine as _;
    let tcp = StdTcpStream::connect((OUTSIDE_IP, port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let server = rustls::pki_types::ServerName::try_from(OUTSIDE_IP).expect("server name");
    let conn = rustls::ClientConnection::new(tls, server.to_owned()).expect("client");
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let auth = login.map_or(String::new(), |(u, p)| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    });
    let sent = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {OUTSIDE_IP}\r\n{auth}Connection: close\r\n\r\n"
    );
    // A refused handshake shows here: status 0 and the error.
    if let Err(error) = sent {
        return (0, error.to_string());
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_box_the_page_needs_tls_and_an_admin_login() {
    // A host of the test's own with a non-loopback address.
    let netns = Netns::new("rbx-admin");
    netns.ip(&["addr", "add", &format!("{OUTSIDE_IP}/32"), "dev", "lo"]);
    let cert = rcgen::generate_simple_self_signed(vec![OUTSIDE_IP.to_owned()]).expect("cert");
    let dir = tempfile::tempdir().expect("dir");
    let (cert_path, key_path) = (dir.path().join("admin.crt"), dir.path().join("admin.key"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert file");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("key file");
    let tls_port = free_port();
    let relay = Relay::create(
        RelayConfig::new("office-remote")
            .no_anonymous()
            .admin(&format!(
                "tls_listen = \"{OUTSIDE_IP}:{tls_port}\"\ntls_cert = {}\ntls_key = {}",
                common::toml_str(&cert_path.display().to_string()),
                common::toml_str(&key_path.display().to_string()),
            )),
        "[groups]\nadmins = [\"olga\"]\n",
    );
    add_user(&relay.config_path, "olga", "olga-admin-pw");
    add_user(&relay.config_path, "ivan", "ivan-pw");

    // The relay runs inside the namespace.
    let log_path = dir.path().join("relay.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &netns.name, RELAY_BIN, "run", "--config"])
        .arg(&relay.config_path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn the relay in the namespace");
    let up = netns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if StdTcpStream::connect((OUTSIDE_IP, tls_port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    let relay_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        up,
        "the TLS admin endpoint did not come up:\n{}",
        relay_log()
    );

    let tls = client_config(&cert.cert);
    let answers = netns.run(move || {
        let get = |path: &str, login| https_get(tls.clone(), tls_port, path, login);
        let plain = {
            // Plain HTTP to the TLS port gets no page.
            let mut tcp = StdTcpStream::connect((OUTSIDE_IP, tls_port)).expect("connect");
            tcp.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer);
            String::from_utf8_lossy(&answer).into_owned()
        };
        (
            plain,
            get("/", None),
            get("/", Some(("olga", "wrong"))),
            get("/", Some(("nobody", "x"))),
            get("/status", Some(("ivan", "ivan-pw"))),
            get("/", Some(("olga", "olga-admin-pw"))),
            get("/metrics", Some(("olga", "olga-admin-pw"))),
        )
    });
    let (plain, none, wrong, unknown, not_admin, page, metrics) = answers;

    // SIGHUP takes a new certificate.
    let renewed = rcgen::generate_simple_self_signed(vec![OUTSIDE_IP.to_owned()]).expect("cert");
    std::fs::write(&cert_path, renewed.cert.pem()).expect("cert file");
    std::fs::write(&key_path, renewed.key_pair.serialize_pem()).expect("key file");
    common::send_signal(&child, libc::SIGHUP);
    let tls = client_config(&renewed.cert);
    let renewed = netns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = https_get(
                tls.clone(),
                tls_port,
                "/status",
                Some(("olga", "olga-admin-pw")),
            );
            match got {
                (200, _) => return true,
                _ if Instant::now() >= deadline => return false,
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = relay_log();
    assert!(
        renewed,
        "the renewed certificate was not taken on SIGHUP:\n{log}"
    );
    assert!(
        !plain.contains("200 OK"),
        "plain HTTP got an answer: {plain}"
    );
    assert_eq!(none.0, 401, "no login: {none:?}");
    assert_eq!(wrong.0, 401, "a wrong password: {wrong:?}");
    assert_eq!(unknown.0, 401, "an unknown user: {unknown:?}");
    assert_eq!(not_admin.0, 403, "a user outside `admins`: {not_admin:?}");
    assert!(!not_admin.1.contains("outbox"), "403 leaked the status");
    assert_eq!(page.0, 200, "the admin: {page:?}\n{log}");
    assert!(page.1.contains("<title>relaybox</title>"), "{}", page.1);
    assert_eq!(metrics.0, 200);
    for line in [
        "relaybox_admin_logins_refused_total{reason=\"bad_credentials\"} 2",
        "relaybox_admin_logins_refused_total{reason=\"not_admin\"} 1",
        // The page, and this scrape.
        "relaybox_admin_logins_total 2",
    ] {
        assert!(metrics.1.contains(line), "{line} not in:\n{}", metrics.1);
    }
    assert_eq!(
        log.matches("admin login refused: wrong user name or password")
            .count(),
        2,
        "{log}"
    );
    assert!(log.contains("admin login refused: the user is not in the group `admins`"));
    assert!(
        !log.contains("olga-admin-pw") && !log.contains("ivan-pw"),
        "a password in the log"
    );
}
