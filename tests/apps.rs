//! Apps across offices: `examples/office-chat` in Debian's Chromium (driven by playwright-core,
//! `tests/browser/office_chat.mjs`), two offices each with its own relay (the real binary,
//! MQTT over WebSocket with TLS), one hub between them:
//! - a message from alice at office A reaches bob at office B and is decrypted there; its
//!   plaintext is on no disk (the relays' data directories, the hub's store);
//! - bob, away when a message was sent, gets it on coming back; and again across a kill -9 of
//!   B's relay while he is away;
//! - eve, at B without access to the room, sees nothing of it and her publish is refused;
//! - alice calls bob: the signalling goes only through the relays, a WebRTC data channel opens
//!   peer to peer and carries a message each way.
//!
//! Everything (hub, relays, browser) runs in a network namespace of the test's own, with no way
//! out: the relays and the hub on loopback, the browsers' WebRTC candidates on a veth pair
//! inside it. Needs root, node with
//! `tests/browser/node_modules` and `examples/office-chat/node_modules` (mqtt.js), chromium:
//! `scripts/test` installs them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{add_user, stream_consumers, toml_str, NatsHub, Relay, RelayConfig};

const STAGE: Duration = Duration::from_secs(120);
const HELLO: &str = "the boiler in room 4 is leaking again";
const AWAY: &str = "plumber booked for tuesday at nine";
const RESTART: &str = "the spare key is with the caretaker";

/// A network namespace of the test's own, removed on drop: its loopback, and a veth pair with
/// both ends inside (10.77.0.1 and .2, the default route on the first) so that WebRTC finds
/// an interface to gather candidates on. Nothing in it reaches outside.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("rbx-apps-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &name, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ]);
        for (dev, addr) in [("v0", "10.77.0.1/24"), ("v1", "10.77.0.2/24")] {
            ip(&["-n", &name, "addr", "add", addr, "dev", dev]);
            ip(&["-n", &name, "link", "set", dev, "up"]);
        }
        ip(&["-n", &name, "route", "add", "default", "dev", "v0"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn office_chat_across_two_relays_and_a_hub() {
    let netns = Netns::new();
    let path = format!("/var/run/netns/{}", netns.0);
    // The whole test runs on a thread inside the namespace: the runtime's threads, and every
    // process they start, are in it too.
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: a valid descriptor of a network namespace; only this thread moves.
        let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(office_chat());
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

async fn office_chat() {
    let hub = NatsHub::start().await;
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let certs = tempfile::tempdir().expect("dir");
    let (cert_path, key_path) = (
        certs.path().join("relay.crt"),
        certs.path().join("relay.key"),
    );
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("key");

    // The organisation's rules, the same at both offices: the room `ops` is for alice and bob;
    // everyone may say whether they are online and be called.
    let rules = "[groups]\nops = [\"alice\", \"bob\"]\n\n\
        [[acl]]\ngroup = \"ops\"\npublish = [\"chat/ops/%u\"]\nsubscribe = [\"chat/ops/+\"]\n\n\
        [[acl]]\nuser = \"*\"\npublish = [\"presence/%u\", \"call/+/%u\"]\n\
        subscribe = [\"presence/+\", \"call/%u/+\"]\n";
    let office = |name: &str, wss: u16| {
        let mut cfg = RelayConfig::new(name)
            .no_anonymous()
            .uplink(&hub.url())
            .mqtt(&format!(
                "wss_listen = \"127.0.0.1:{wss}\"\ntls_cert = {}\ntls_key = {}",
                toml_str(&cert_path.display().to_string()),
                toml_str(&key_path.display().to_string())
            ));
        for f in ["chat/#", "presence/#", "call/#"] {
            cfg = cfg.export(f).import(f);
        }
        Relay::create(cfg, rules)
    };
    let (wss_a, wss_b) = (common::free_port(), common::free_port());
    let mut a = office("office-a", wss_a);
    let mut b = office("office-b", wss_b);
    add_user(&a.config_path, "alice", "alice-pw");
    add_user(&b.config_path, "bob", "bob-pw");
    add_user(&b.config_path, "eve", "eve-pw");
    a.restart().await;
    b.restart().await;
    // Both relays read the three imports (each two subjects) before anyone talks.
    let ready = {
        let url = hub.url();
        let mut consumers = 0;
        for _ in 0..100 {
            consumers = stream_consumers(&url, common::STREAM).await.len();
            if consumers >= 12 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        consumers
    };
    assert!(ready >= 12, "{ready} hub consumers of 12");

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artefacts/office-chat");
    for dir in ["tests/browser", "examples/office-chat"] {
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(dir)
                .join("node_modules")
                .is_dir(),
            "{dir}/node_modules is missing: run `npm ci --prefix {dir}` (scripts/test does)"
        );
    }
    let config = serde_json::json!({
        "relayA": format!("wss://127.0.0.1:{wss_a}/mqtt"),
        "relayB": format!("wss://127.0.0.1:{wss_b}/mqtt"),
        "secret": "correct horse battery staple",
        "hello": HELLO,
        "away": AWAY,
        "restart": RESTART,
        "artefacts": shots,
    });
    let mut node = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/office_chat.mjs"))
        .arg(config.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn node");
    let mut to_node = node.stdin.take().expect("stdin");
    let (tx, mut from_node) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = node.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let mut reached = async |stage: &str| loop {
        let line = tokio::time::timeout(STAGE, from_node.recv()).await;
        match line {
            Ok(Some(line)) => {
                seen.push(line.clone());
                if line.starts_with("FAIL") {
                    // The rest of what it says (its other failures) comes at once.
                    while let Ok(Some(more)) =
                        tokio::time::timeout(Duration::from_secs(5), from_node.recv()).await
                    {
                        seen.push(more);
                    }
                    panic!("the browser failed at {stage:?}; it said: {seen:#?}");
                }
                if line == stage {
                    return;
                }
            }
            Ok(None) => panic!("the browser ended before {stage:?}; it said: {seen:#?}"),
            Err(_) => {
                panic!("the browser did not reach {stage:?} in {STAGE:?}; it said: {seen:#?}")
            }
        }
    };
    reached("delivered").await;
    reached("refused").await;
    reached("bob away").await;
    reached("caught up").await;
    reached("wait-restart").await;
    // Bob's session at B holds the message (on flash) before B's relay is killed.
    let mut held = false;
    for _ in 0..100 {
        let status = common::admin_status(b.cfg.admin_port).await;
        if status["broker"]["queued_messages"].as_u64() >= Some(1) {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        held,
        "bob's session at B did not queue the message:\n{}",
        b.log()
    );
    // Eve's refused publish and subscription were counted at B.
    let status = common::admin_status(b.cfg.admin_port).await;
    assert_eq!(status["mqtt"]["denied_publishes"], 1, "{status}");
    assert_eq!(status["mqtt"]["denied_subscriptions"], 1, "{status}");
    b.sigkill().await;
    b.restart().await;
    writeln!(to_node, "restarted").expect("tell the browser");
    reached("caught up after the restart").await;
    reached("call").await;
    reached("ok").await;
    let status = node.wait().expect("node");
    assert!(status.success(), "the browser: {seen:#?}");

    // The relays carried only ciphertext.
    for secret in [HELLO, AWAY, RESTART] {
        for dir in [a.data_dir.as_path(), b.data_dir.as_path(), hub.dir()] {
            let found = files_holding(dir, secret.as_bytes());
            assert!(found.is_empty(), "{secret:?} in clear in {found:?}");
        }
    }
    for shot in ["alice.png", "bob.png"] {
        let len = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(len > 5_000, "{shot}: {len} bytes");
    }
}
