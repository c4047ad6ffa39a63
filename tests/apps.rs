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

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::browser::{artefacts, Browser};
use common::netns::Netns;
use common::{add_user, stream_consumers, toml_str, NatsHub, Relay, RelayConfig};

const STAGE: Duration = Duration::from_secs(120);
const HELLO: &str = "the boiler in room 4 is leaking again";
const AWAY: &str = "plumber booked for tuesday at nine";
const RESTART: &str = "the spare key is with the caretaker";

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
    // Both ends of a veth pair inside (10.77.0.1 and .2, the default route on the first), so
    // that WebRTC finds an interface to gather candidates on.
    let netns = Netns::new("rbx-apps");
    netns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    for (dev, addr) in [("v0", "10.77.0.1/24"), ("v1", "10.77.0.2/24")] {
        netns.ip(&["addr", "add", addr, "dev", dev]);
        netns.ip(&["link", "set", dev, "up"]);
    }
    netns.ip(&["route", "add", "default", "dev", "v0"]);
    // The whole test runs inside: the runtime's threads, and every process they start.
    netns.run(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(office_chat());
    });
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

    let shots = artefacts("office-chat");
    let config = serde_json::json!({
        "relayA": format!("wss://127.0.0.1:{wss_a}/mqtt"),
        "relayB": format!("wss://127.0.0.1:{wss_b}/mqtt"),
        "secret": "correct horse battery staple",
        "hello": HELLO,
        "away": AWAY,
        "restart": RESTART,
        "artefacts": shots,
    });
    let mut browser = Browser::start("office_chat.mjs", &[&config.to_string()], STAGE);
    browser.reached("delivered").await;
    browser.reached("refused").await;
    browser.reached("bob away").await;
    browser.reached("caught up").await;
    browser.reached("wait-restart").await;
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
    browser.tell("restarted");
    browser.reached("caught up after the restart").await;
    browser.reached("call").await;
    browser.reached("ok").await;
    browser.finished();

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
