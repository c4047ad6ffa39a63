//! Security at the gate and on the uplink (the security issue): users and the CONNACK codes of
//! a refused login, topic ACLs (with `%u`/`%c` and SIGHUP reload), TLS and mTLS, MQTT over
//! WebSocket, the uplink to a hub that requires TLS and a password, the connection limits, and
//! secrets kept out of logs and `check-config` output.
//!
//! The real binary, real clients over real sockets (raw bytes where exact codes matter,
//! rumqttc elsewhere), a real nats-server. Certificates are made by each test (rcgen) in its own
//! temp dir; none are checked in.

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{self, Got, RawConn};
use common::{
    free_port, port_open, read_stream, tail, toml_str, wait_stream_count, wait_until, NatsHub,
    Relay, RelayConfig, Subscriber, PREFIX, RELAY_BIN, STREAM,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as V5SubCode;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet as V5Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long one expected reply may take.
const REPLY: Duration = Duration::from_secs(5);

/// Runs blocking socket code (the raw client) without starving the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A test certificate authority.
struct Pki {
    ca: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
struct Issued {
    cert: String,
    key: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&key).expect("self-sign CA");
        Pki { ca, key }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn issue(&self, common_name: &str, sans: &[&str], purpose: ExtendedKeyUsagePurpose) -> Issued {
        let key = KeyPair::generate().expect("leaf key");
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![purpose];
        let cert = params
            .signed_by(&key, &self.ca, &self.key)
            .expect("sign leaf");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    fn server(&self) -> Issued {
        self.issue(
            "relaybox test server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose common name is `cn`.
    fn client(&self, cn: &str) -> Issued {
        self.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Writes `issued` as `<name>.pem` and `<name>.key` into `dir`; returns their paths.
fn write_pair(dir: &Path, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &issued.cert).expect("write cert");
    std::fs::write(&key, &issued.key).expect("write key");
    (cert, key)
}

/// A temp dir for a test's certificates and other files.
fn certs_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("relaybox-sec-")
        .tempdir()
        .expect("temp dir")
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// `[mqtt]` lines for the TLS files.
fn tls_lines(cert: &Path, key: &Path) -> String {
    format!(
        "tls_cert = {}\ntls_key = {}",
        toml_str(&cert.display().to_string()),
        toml_str(&key.display().to_string())
    )
}

/// A rustls client config (ring) trusting `ca_pem`, with an optional client certificate.
fn tls_client(ca_pem: &str, client: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = match client {
        Some(id) => {
            let chain: Vec<_> = CertificateDer::pem_slice_iter(id.cert.as_bytes())
                .collect::<Result<_, _>>()
                .expect("client cert PEM");
            let key = PrivateKeyDer::from_pem_slice(id.key.as_bytes()).expect("client key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth cert")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------
// Raw MQTT: exact bytes for exact codes
// ---------------------------------------------------------------------------------------------

fn mqtt_string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// CONNECT (clean session, keep-alive 30 s) with optional user name and password.
fn connect_packet(v5: bool, client_id: &str, user: Option<&str>, pass: Option<&str>) -> Vec<u8> {
    connect_with_will(v5, client_id, user, pass, None)
}

/// CONNECT as [`connect_packet`], with a will message (QoS 0) on `will` when given.
fn connect_with_will(
    v5: bool,
    client_id: &str,
    user: Option<&str>,
    pass: Option<&str>,
    will: Option<&str>,
) -> Vec<u8> {
    let mut body = mqtt_string(b"MQTT");
    body.push(if v5 { 5 } else { 4 });
    let mut flags = 0x02;
    if will.is_some() {
        flags |= 0x04;
    }
    if user.is_some() {
        flags |= 0x80;
    }
    if pass.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    if v5 {
        body.push(0);
    }
    body.extend(mqtt_string(client_id.as_bytes()));
    if let Some(topic) = will {
        if v5 {
            body.push(0);
        }
        body.extend(mqtt_string(topic.as_bytes()));
        body.extend(mqtt_string(b"gone"));
    }
    if let Some(u) = user {
        body.extend(mqtt_string(u.as_bytes()));
    }
    if let Some(p) = pass {
        body.extend(mqtt_string(p.as_bytes()));
    }
    raw::packet(0x10, &body)
}

fn publish_packet(v5: bool, topic: &str, payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let mut body = mqtt_string(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    raw::packet(0x30 | (qos << 1), &body)
}

fn subscribe_packet(v5: bool, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    for (filter, qos) in filters {
        body.extend(mqtt_string(filter.as_bytes()));
        body.push(*qos);
    }
    raw::packet(0x82, &body)
}

/// Reads an MQTT variable byte integer at `at`; returns (value, bytes used).
fn varint(bytes: &[u8], at: usize) -> (usize, usize) {
    let mut value = 0;
    for i in 0..4 {
        let b = bytes[at + i];
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("bad variable byte integer in {bytes:?}");
}

/// A raw MQTT session over TCP.
struct Raw {
    conn: RawConn,
    v5: bool,
    name: String,
    /// PUBLISHes that arrived while waiting for something else: (topic, payload).
    inbox: VecDeque<(String, Vec<u8>)>,
}

impl Raw {
    /// Sends CONNECT with the given credentials; returns the session and the CONNACK code.
    fn try_login(
        port: u16,
        v5: bool,
        id: &str,
        user: Option<&str>,
        pass: Option<&str>,
    ) -> (Raw, u8) {
        let mut raw = Raw {
            conn: RawConn::open(port),
            v5,
            name: id.to_owned(),
            inbox: VecDeque::new(),
        };
        raw.conn
            .send(&connect_packet(v5, id, user, pass))
            .expect("send CONNECT");
        let (h, body) = raw.expect("CONNACK");
        assert_eq!(h, 0x20, "{id}: expected CONNACK, got {h:#04x} {body:?}");
        (raw, body[1])
    }

    /// Logs in and asserts the session was accepted.
    fn login(port: u16, v5: bool, id: &str, user: Option<&str>, pass: Option<&str>) -> Raw {
        let (raw, code) = Raw::try_login(port, v5, id, user, pass);
        assert_eq!(code, 0, "{id}: login refused with code {code:#04x}");
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.conn
            .send(bytes)
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.name));
    }

    /// The next packet, within [`REPLY`]; panics on timeout or close.
    fn expect(&mut self, what: &str) -> (u8, Vec<u8>) {
        match self.conn.read(REPLY) {
            Got::Packet(h, body) => (h, body),
            other => panic!("{}: expected {what}, got {other:?}", self.name),
        }
    }

    /// The next packet that is not a PUBLISH (those go to the inbox, QoS 1 ones acknowledged).
    fn expect_reply(&mut self, what: &str) -> (u8, Vec<u8>) {
        for _ in 0..1000 {
            let (h, body) = self.expect(what);
            if h >> 4 == 3 {
                self.take_publish(h, &body);
                continue;
            }
            return (h, body);
        }
        panic!("{}: more than 1000 PUBLISHes before {what}", self.name);
    }

    fn take_publish(&mut self, h: u8, body: &[u8]) {
        let qos = (h >> 1) & 3;
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8_lossy(&body[2..2 + topic_len]).into_owned();
        let mut at = 2 + topic_len;
        if qos > 0 {
            let pkid = [body[at], body[at + 1]];
            at += 2;
            let ack = if qos == 1 { 0x40 } else { 0x50 };
            self.send(&[ack, 0x02, pkid[0], pkid[1]]);
        }
        if self.v5 {
            let (len, used) = varint(body, at);
            at += used + len;
        }
        self.inbox.push_back((topic, body[at..].to_vec()));
    }

    /// Publishes at `qos` (0, 1, 2); returns the reason code of the PUBACK/PUBREC (0 for QoS 0
    /// after a PINGREQ round trip showed the publish was read).
    fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, pkid: u16) -> u8 {
        self.send(&publish_packet(self.v5, topic, payload, qos, pkid));
        if qos == 0 {
            self.ping();
            return 0;
        }
        let want = if qos == 1 { 0x40 } else { 0x50 };
        let (h, body) = self.expect_reply("PUBACK/PUBREC");
        assert_eq!(
            h, want,
            "{}: publish {topic}: got {h:#04x} {body:?}",
            self.name
        );
        assert_eq!(&body[..2], &pkid.to_be_bytes(), "{}: packet id", self.name);
        let reason = body.get(2).copied().unwrap_or(0);
        if !self.v5 {
            assert_eq!(body.len(), 2, "{}: MQTT 3.1.1 acknowledgement", self.name);
        }
        reason
    }

    /// PUBREL for a PUBREC'd QoS 2 publish; expects PUBCOMP.
    fn release(&mut self, pkid: u16) {
        let [hi, lo] = pkid.to_be_bytes();
        self.send(&[0x62, 0x02, hi, lo]);
        let (h, body) = self.expect_reply("PUBCOMP");
        assert_eq!(
            h, 0x70,
            "{}: expected PUBCOMP, got {h:#04x} {body:?}",
            self.name
        );
        assert_eq!(&body[..2], &pkid.to_be_bytes());
    }

    /// SUBSCRIBE; returns the SUBACK's codes, one per filter.
    fn subscribe(&mut self, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&subscribe_packet(self.v5, pkid, filters));
        let (h, body) = self.expect_reply("SUBACK");
        assert_eq!(
            h, 0x90,
            "{}: expected SUBACK, got {h:#04x} {body:?}",
            self.name
        );
        assert_eq!(&body[..2], &pkid.to_be_bytes());
        let mut at = 2;
        if self.v5 {
            let (len, used) = varint(&body, at);
            at += used + len;
        }
        body[at..].to_vec()
    }

    /// PINGREQ → PINGRESP: the connection is alive and everything sent before was read.
    fn ping(&mut self) {
        self.send(&[0xc0, 0x00]);
        let (h, body) = self.expect_reply("PINGRESP");
        assert_eq!(
            h, 0xd0,
            "{}: expected PINGRESP, got {h:#04x} {body:?}",
            self.name
        );
    }

    /// Collects PUBLISHes until one on `last` arrived; returns their topics in order.
    fn topics_until(&mut self, last: &str) -> Vec<String> {
        let mut topics = Vec::new();
        for _ in 0..1000 {
            let (topic, _) = match self.inbox.pop_front() {
                Some(m) => m,
                None => {
                    let (h, body) = self.expect(&format!("PUBLISH on {last}"));
                    assert_eq!(h >> 4, 3, "{}: expected PUBLISH, got {h:#04x}", self.name);
                    self.take_publish(h, &body);
                    continue;
                }
            };
            let done = topic == last;
            topics.push(topic);
            if done {
                return topics;
            }
        }
        panic!("{}: no PUBLISH on {last} among 1000", self.name);
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttc MQTT 5 client driven step by step (any transport)
// ---------------------------------------------------------------------------------------------

struct V5 {
    client: rumqttc::v5::AsyncClient,
    events: rumqttc::v5::EventLoop,
    name: String,
    inbox: VecDeque<(String, Vec<u8>)>,
}

type V5Refusal = rumqttc::v5::ConnectionError;

impl V5 {
    fn options(id: &str, host: &str, port: u16) -> rumqttc::v5::MqttOptions {
        let mut opts = rumqttc::v5::MqttOptions::new(id, host, port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts
    }

    /// Connects; `Err` when the relay refused (a CONNACK code) or the transport failed.
    async fn connect(opts: rumqttc::v5::MqttOptions) -> Result<V5, V5Refusal> {
        use rumqttc::v5::Event;
        let name = opts.client_id();
        let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, 64);
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(V5Packet::ConnAck(ack)))) => {
                assert_eq!(ack.code, ConnectReturnCode::Success, "{name}");
                Ok(V5 {
                    client,
                    events,
                    name,
                    inbox: VecDeque::new(),
                })
            }
            Ok(Ok(other)) => panic!("{name}: expected CONNACK, got {other:?}"),
            Ok(Err(e)) => Err(e),
            Err(_) => panic!("{name}: no CONNACK and no error within 10 s"),
        }
    }

    /// Polls until `pick` returns something, within [`REPLY`]; PUBLISHes go to the inbox.
    async fn poll_for<T>(&mut self, what: &str, mut pick: impl FnMut(&V5Packet) -> Option<T>) -> T {
        use rumqttc::v5::Event;
        let deadline = tokio::time::Instant::now() + REPLY;
        loop {
            let event = match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Ok(Ok(event)) => event,
                Ok(Err(e)) => panic!("{}: connection failed waiting for {what}: {e}", self.name),
                Err(_) => panic!("{}: no {what} within {REPLY:?}", self.name),
            };
            if let Event::Incoming(packet) = event {
                if let V5Packet::Publish(p) = &packet {
                    self.inbox.push_back((
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        p.payload.to_vec(),
                    ));
                }
                if let Some(t) = pick(&packet) {
                    return t;
                }
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> V5SubCode {
        self.client
            .subscribe(filter, V5QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        self.poll_for(&format!("SUBACK for {filter}"), |p| match p {
            V5Packet::SubAck(ack) => ack.return_codes.first().copied(),
            _ => None,
        })
        .await
    }

    async fn publish(&mut self, topic: &str, payload: &[u8]) -> PubAckReason {
        self.client
            .publish(topic, V5QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("queue publish");
        self.poll_for(&format!("PUBACK for {topic}"), |p| match p {
            V5Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await
    }

    /// Waits for a message on `topic`; returns the topics of the messages that came first.
    async fn wait_message(&mut self, topic: &str) -> Vec<String> {
        let mut before = Vec::new();
        for _ in 0..1000 {
            if let Some((t, _)) = self.inbox.pop_front() {
                if t == topic {
                    return before;
                }
                before.push(t);
                continue;
            }
            self.poll_for(&format!("message on {topic}"), |p| {
                matches!(p, V5Packet::Publish(_)).then_some(())
            })
            .await;
        }
        panic!("{}: no message on {topic} among 1000", self.name);
    }
}

// ---------------------------------------------------------------------------------------------
// The user CLI
// ---------------------------------------------------------------------------------------------

/// Runs `relaybox user <args> --config <config>` with `stdin`, bounded to 60 s.
fn user_cli(config: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(RELAY_BIN)
        .arg("user")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relaybox user");
    // A password line is short: the pipe takes it without the child reading.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relaybox user {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("user output")
}

/// Adds user `name` with `password` through the CLI; asserts it worked.
fn add_user(relay: &Relay, name: &str, password: &str) {
    let out = user_cli(
        &relay.config_path,
        &["add", name, "--password-stdin"],
        &format!("{password}\n"),
    );
    assert!(
        out.status.success(),
        "user add {name}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A relay that is prepared (users added through the CLI) before it starts.
async fn relay_with_users(cfg: RelayConfig, extra: &str, users: &[(&str, &str)]) -> Relay {
    let mut relay = Relay::create(cfg, extra);
    blocking(|| {
        for (name, password) in users {
            add_user(&relay, name, password);
        }
    });
    relay.restart().await;
    relay
}

fn acl(user: &str, publish: &[&str], subscribe: &[&str]) -> String {
    let list = |l: &[&str]| l.iter().map(|f| toml_str(f)).collect::<Vec<_>>().join(", ");
    format!(
        "\n[[acl]]\nuser = {}\npublish = [{}]\nsubscribe = [{}]\n",
        toml_str(user),
        list(publish),
        list(subscribe)
    )
}

/// rumqttc 3.1.1 options with credentials.
fn v4_options(id: &str, host: &str, port: u16, user: &str, pass: &str) -> rumqttc::MqttOptions {
    let mut opts = rumqttc::MqttOptions::new(id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_credentials(user, pass);
    opts
}

// ---------------------------------------------------------------------------------------------
// Users and login
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_checked_at_connect_with_the_right_connack_codes() {
    let cfg = RelayConfig::new("sec-login").no_anonymous();
    let mut relay = relay_with_users(cfg, "", &[("alice", "alice-pw-1")]).await;
    let port = relay.port();

    blocking(|| {
        // (version 5?, user, password, expected CONNACK code, what)
        type Case<'a> = (bool, Option<&'a str>, Option<&'a str>, u8, &'a str);
        let cases: &[Case] = &[
            (
                false,
                Some("alice"),
                Some("alice-pw-1"),
                0x00,
                "right password",
            ),
            (false, Some("alice"), Some("wrong"), 0x04, "wrong password"),
            (
                false,
                Some("mallory"),
                Some("alice-pw-1"),
                0x04,
                "unknown user",
            ),
            (false, Some("alice"), None, 0x04, "user without password"),
            (false, None, None, 0x05, "anonymous"),
            (
                true,
                Some("alice"),
                Some("alice-pw-1"),
                0x00,
                "right password",
            ),
            (true, Some("alice"), Some("wrong"), 0x86, "wrong password"),
            (
                true,
                Some("mallory"),
                Some("alice-pw-1"),
                0x86,
                "unknown user",
            ),
            (true, Some("alice"), None, 0x86, "user without password"),
            (true, None, None, 0x87, "anonymous"),
        ];
        for (i, (v5, user, pass, want, what)) in cases.iter().enumerate() {
            let id = format!("login-{i}");
            let (mut raw, code) = Raw::try_login(port, *v5, &id, *user, *pass);
            let version = if *v5 { "5" } else { "3.1.1" };
            assert_eq!(code, *want, "MQTT {version}, {what}: CONNACK code");
            if *want == 0 {
                raw.ping();
            } else {
                assert!(
                    raw.conn.closed_within(REPLY),
                    "MQTT {version}, {what}: connection not closed after the refusal"
                );
            }
        }

        // A user added while the relay runs can log in at once.
        add_user(&relay, "bob", "bob-pw-1");
        Raw::login(port, false, "bob-1", Some("bob"), Some("bob-pw-1")).ping();
        Raw::login(port, true, "bob-2", Some("bob"), Some("bob-pw-1")).ping();

        let out = user_cli(&relay.config_path, &["list"], "");
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "alice\nbob\n");

        // A changed password: the old one is refused, the new one works.
        let out = user_cli(
            &relay.config_path,
            &["passwd", "alice", "--password-stdin"],
            "alice-pw-2\n",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            Raw::try_login(port, true, "a-old", Some("alice"), Some("alice-pw-1")).1,
            0x86
        );
        Raw::login(port, true, "a-new", Some("alice"), Some("alice-pw-2")).ping();

        // A removed user is refused.
        let out = user_cli(&relay.config_path, &["del", "bob"], "");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            Raw::try_login(port, false, "bob-3", Some("bob"), Some("bob-pw-1")).1,
            0x04
        );

        // The CLI refuses what it must, with exit code 1 and a message.
        for (args, stdin) in [
            (&["add", "alice", "--password-stdin"][..], "x\n"),
            (&["add", "carol", "--password-stdin"][..], "\n"),
            (&["add", "a/b", "--password-stdin"][..], "x\n"),
            (&["passwd", "nobody", "--password-stdin"][..], "x\n"),
            (&["del", "nobody"][..], ""),
        ] {
            let out = user_cli(&relay.config_path, args, stdin);
            assert_eq!(out.status.code(), Some(1), "user {args:?}");
            assert!(!out.stderr.is_empty(), "user {args:?} says why");
        }
    });
    assert!(relay.exited().is_none(), "relay exited");
    let log = relay.log();
    for secret in ["alice-pw-1", "alice-pw-2", "bob-pw-1"] {
        assert!(!log.contains(secret), "a client password is in the log");
    }
    assert!(relay.log_count("login refused") >= 8, "{}", tail(&log, 30));
}

// ---------------------------------------------------------------------------------------------
// Topic ACLs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_denied_publishes_reach_neither_subscribers_nor_the_hub() {
    let hub = NatsHub::start().await;
    let cfg = RelayConfig::new("sec-acl-pub")
        .no_anonymous()
        .uplink(&hub.url())
        .export("#");
    let extra = acl("writer", &["sensors/#"], &[]) + &acl("reader", &[], &["#"]);
    let relay = relay_with_users(cfg, &extra, &[("writer", "w-pw"), ("reader", "r-pw")]).await;
    let port = relay.port();
    let reader = Subscriber::start_with_options(
        v4_options("reader", "127.0.0.1", port, "reader", "r-pw"),
        &["#"],
    )
    .await;

    let mut allowed = BTreeSet::new();
    blocking(|| {
        for v5 in [false, true] {
            let v = if v5 { "v5" } else { "v4" };
            let mut w = Raw::login(
                port,
                v5,
                &format!("writer-{v}"),
                Some("writer"),
                Some("w-pw"),
            );
            let denied = if v5 { 0x87 } else { 0x00 };
            // Denied, at each QoS; the QoS 1 one twice (logged once).
            assert_eq!(
                w.publish(&format!("secret/q1-{v}"), b"no", 1, 1),
                denied,
                "{v} QoS 1"
            );
            assert_eq!(
                w.publish(&format!("secret/q1-{v}"), b"no", 1, 2),
                denied,
                "{v} again"
            );
            w.publish(&format!("secret/q0-{v}"), b"no", 0, 0);
            assert_eq!(
                w.publish(&format!("secret/q2-{v}"), b"no", 2, 3),
                denied,
                "{v} QoS 2"
            );
            if !v5 {
                // 3.1.1 goes on with PUBREL, which the gate answers itself.
                w.release(3);
            }
            // Allowed, at each QoS.
            assert_eq!(w.publish(&format!("sensors/q1-{v}"), b"yes", 1, 4), 0);
            assert_eq!(w.publish(&format!("sensors/q2-{v}"), b"yes", 2, 5), 0);
            w.release(5);
            w.publish(&format!("sensors/q0-{v}"), b"yes", 0, 0);
            // A denial does not end the session.
            w.ping();
            for q in ["q0", "q1", "q2"] {
                allowed.insert(format!("sensors/{q}-{v}"));
            }
        }
    });

    // Each connection's messages arrive in order, so once the last allowed ones are there,
    // denied ones sent before them would be too.
    reader.wait_for(allowed.len(), REPLY).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<String> = reader.snapshot().into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        got.iter().cloned().collect::<BTreeSet<_>>(),
        allowed,
        "subscriber got {got:?}"
    );
    assert_eq!(got.len(), allowed.len(), "duplicates: {got:?}");
    assert!(reader.errors.lock().expect("errors").is_empty());

    let url = hub.url();
    wait_stream_count(&url, STREAM, allowed.len() as u64, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on_hub: Vec<String> = read_stream(&url, STREAM, REPLY)
        .await
        .into_iter()
        .map(|m| m.subject)
        .collect();
    let want: BTreeSet<String> = allowed
        .iter()
        .map(|t| format!("{PREFIX}.{}", t.replace('/', ".")))
        .collect();
    assert_eq!(
        on_hub.iter().cloned().collect::<BTreeSet<_>>(),
        want,
        "hub: {on_hub:?}"
    );
    assert_eq!(on_hub.len(), want.len(), "hub duplicates: {on_hub:?}");

    // Denials are logged once per client and topic.
    for v in ["v4", "v5"] {
        for q in ["q0", "q1", "q2"] {
            assert_eq!(
                relay.log_count(&format!("secret/{q}-{v}")),
                1,
                "log lines for secret/{q}-{v}:\n{}",
                tail(&relay.log(), 30)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_message_is_held_to_the_acl() {
    let cfg = RelayConfig::new("sec-acl-will").no_anonymous();
    let extra = acl("writer", &["ok/#"], &[]) + &acl("reader", &[], &["#"]);
    let relay = relay_with_users(cfg, &extra, &[("writer", "w-pw"), ("reader", "r-pw")]).await;
    let port = relay.port();
    let reader = Subscriber::start_with_options(
        v4_options("reader", "127.0.0.1", port, "reader", "r-pw"),
        &["#"],
    )
    .await;
    blocking(|| {
        for v5 in [false, true] {
            let v = if v5 { "v5" } else { "v4" };
            let login = |id: &str, will: &str| {
                let mut conn = RawConn::open(port);
                conn.send(&connect_with_will(
                    v5,
                    id,
                    Some("writer"),
                    Some("w-pw"),
                    Some(will),
                ))
                .expect("send CONNECT");
                conn
            };
            // A will on a topic the user may not publish to: the login is refused.
            let mut conn = login(&format!("will-denied-{v}"), &format!("secret/will-{v}"));
            match conn.read(REPLY) {
                Got::Packet(0x20, body) => {
                    assert_eq!(body[1], if v5 { 0x87 } else { 0x05 }, "{v}: denied will")
                }
                other => panic!("{v}: denied will: {other:?}"),
            }
            assert!(conn.closed_within(REPLY), "{v}: denied will");
            // A will topic that is no topic name (a wildcard): refused as well (3.1.1 has no
            // code for it: closed).
            for bad in ["ok/#", "ok/+/will"] {
                let mut conn = login(&format!("will-bad-{v}"), bad);
                match conn.read(REPLY) {
                    Got::Packet(0x20, body) if v5 => assert_eq!(body[1], 0x90, "{v}: {bad}"),
                    Got::Closed if !v5 => {}
                    other => panic!("{v}: will on {bad:?}: {other:?}"),
                }
                assert!(conn.closed_within(REPLY), "{v}: {bad}");
            }
            // An allowed will is published when the connection drops without DISCONNECT.
            let mut conn = login(&format!("will-ok-{v}"), &format!("ok/will-{v}"));
            match conn.read(REPLY) {
                Got::Packet(0x20, body) => assert_eq!(body[1], 0, "{v}: allowed will"),
                other => panic!("{v}: allowed will: {other:?}"),
            }
            drop(conn);
        }
    });
    reader.wait_for(2, REPLY).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let topics: BTreeSet<String> = reader.snapshot().into_iter().map(|(t, _)| t).collect();
    let want: BTreeSet<String> = ["ok/will-v4", "ok/will-v5"].map(String::from).into();
    assert_eq!(topics, want);
    assert!(
        !relay.log().contains("panicked"),
        "{}",
        tail(&relay.log(), 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_subscribe_gets_per_filter_results_and_the_allowed_filters_work() {
    let cfg = RelayConfig::new("sec-acl-sub").no_anonymous();
    let extra = acl("sub", &[], &["allowed/#", "also/+"]) + &acl("pub", &["#"], &[]);
    let relay = relay_with_users(cfg, &extra, &[("sub", "s-pw"), ("pub", "p-pw")]).await;
    let port = relay.port();
    blocking(|| {
        for v5 in [false, true] {
            let v = if v5 { "v5" } else { "v4" };
            let no = if v5 { 0x87 } else { 0x80 };
            let mut s = Raw::login(port, v5, &format!("sub-{v}"), Some("sub"), Some("s-pw"));
            let codes = s.subscribe(
                7,
                &[("allowed/#", 1), ("denied/#", 1), ("also/x", 0), ("#", 0)],
            );
            assert_eq!(codes, vec![0x01, no, 0x00, no], "{v}: per-filter SUBACK");
            let codes = s.subscribe(8, &[("denied/a", 0), ("also/#", 1)]);
            assert_eq!(codes, vec![no, no], "{v}: all-denied SUBACK");

            let mut p = Raw::login(port, v5, &format!("pub-{v}"), Some("pub"), Some("p-pw"));
            for topic in [
                "denied/t",
                "allowed/t",
                "also/y",
                "also/x",
                "denied/a",
                "allowed/end",
            ] {
                p.publish(topic, v.as_bytes(), 1, 1);
            }
            let topics = s.topics_until("allowed/end");
            assert_eq!(
                topics,
                ["allowed/t", "also/x", "allowed/end"],
                "{v}: delivered"
            );
            s.ping();
            assert!(s.inbox.is_empty(), "{v}: {:?}", s.inbox);
        }
    });
    assert_eq!(
        relay.log_count("subscription denied by ACL"),
        8,
        "{}",
        tail(&relay.log(), 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_client_id_rules_confine_each_user_to_their_own_subtree() {
    let cfg = RelayConfig::new("sec-acl-own").no_anonymous();
    let extra = acl("*", &["home/%u/#", "status/%c"], &["home/%u/#"]);
    let relay = relay_with_users(cfg, &extra, &[("alice", "a-pw"), ("bob", "b-pw")]).await;
    let port = relay.port();
    blocking(|| {
        let mut alice = Raw::login(port, true, "dev-a", Some("alice"), Some("a-pw"));
        let mut bob = Raw::login(port, false, "dev-b", Some("bob"), Some("b-pw"));
        assert_eq!(
            alice.subscribe(
                1,
                &[
                    ("home/alice/#", 1),
                    ("home/bob/#", 1),
                    ("home/+/temp", 1),
                    ("#", 1)
                ]
            ),
            vec![0x01, 0x87, 0x87, 0x87]
        );
        assert_eq!(
            bob.subscribe(1, &[("home/bob/#", 1), ("home/alice/#", 1)]),
            vec![0x01, 0x80]
        );

        assert_eq!(alice.publish("home/alice/temp", b"21", 1, 1), 0x00);
        assert_eq!(alice.publish("home/bob/temp", b"22", 1, 2), 0x87);
        assert_eq!(alice.publish("status/dev-a", b"up", 1, 3), 0x00);
        assert_eq!(alice.publish("status/dev-b", b"up", 1, 4), 0x87);
        assert_eq!(
            bob.publish("home/alice/lamp", b"on", 1, 1),
            0x00,
            "3.1.1: acked, dropped"
        );
        assert_eq!(bob.publish("home/bob/temp", b"19", 1, 2), 0x00);
        assert_eq!(bob.publish("home/bob/end", b"", 1, 3), 0x00);
        assert_eq!(alice.publish("home/alice/end", b"", 1, 5), 0x00);

        assert_eq!(
            alice.topics_until("home/alice/end"),
            ["home/alice/temp", "home/alice/end"]
        );
        assert_eq!(
            bob.topics_until("home/bob/end"),
            ["home/bob/temp", "home/bob/end"]
        );
        alice.ping();
        bob.ping();
        assert!(alice.inbox.is_empty() && bob.inbox.is_empty());
    });
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_changes_apply_on_sighup_without_dropping_connections() {
    let cfg = RelayConfig::new("sec-acl-hup").no_anonymous();
    let watch_rule = acl("watch", &[], &["#"]);
    let before = acl("app", &["a/#"], &[]) + &watch_rule;
    let relay = relay_with_users(
        cfg.clone(),
        &before,
        &[("app", "app-pw"), ("watch", "w-pw")],
    )
    .await;
    let port = relay.port();
    let rewrite = |extra: &str| {
        std::fs::write(
            &relay.config_path,
            format!("{}\n{extra}", cfg.toml(&relay.data_dir)),
        )
        .expect("rewrite config");
    };

    let (mut app, mut watch) = blocking(|| {
        let app = Raw::login(port, true, "app", Some("app"), Some("app-pw"));
        let mut watch = Raw::login(port, false, "watch", Some("watch"), Some("w-pw"));
        assert_eq!(watch.subscribe(1, &[("#", 0)]), vec![0x00]);
        (app, watch)
    });
    blocking(|| {
        assert_eq!(app.publish("a/1", b"", 1, 1), 0x00);
        assert_eq!(app.publish("b/1", b"", 1, 2), 0x87);
    });

    // Grant b/#, revoke a/#.
    rewrite(&(acl("app", &["b/#"], &[]) + &watch_rule));
    relay.signal(libc::SIGHUP);
    relay.wait_log("reloaded ACL rules", 1, REPLY).await;
    blocking(|| {
        assert_eq!(
            app.publish("b/2", b"", 1, 3),
            0x00,
            "granted on the same connection"
        );
        assert_eq!(
            app.publish("a/2", b"", 1, 4),
            0x87,
            "revoked on the same connection"
        );
    });

    // A broken file keeps the rules in use.
    rewrite("[[acl]]\nuser = \"app\"\npublish = [\"a/#\"\n");
    relay.signal(libc::SIGHUP);
    relay.wait_log("config reload failed", 1, REPLY).await;
    blocking(|| {
        assert_eq!(app.publish("b/3", b"", 1, 5), 0x00);
        assert_eq!(app.publish("a/3", b"", 1, 6), 0x87);
        assert_eq!(app.publish("b/end", b"", 1, 7), 0x00);
        assert_eq!(watch.topics_until("b/end"), ["a/1", "b/2", "b/3", "b/end"]);
        app.ping();
        watch.ping();
    });
    assert_eq!(
        relay.log_count("closed client connection"),
        0,
        "{}",
        tail(&relay.log(), 20)
    );
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// Opens a TCP connection to `port`, sends `bytes` and reads until the peer closes (bounded);
/// returns what came back, or `None` if the connection stayed open.
fn send_and_read_to_close(port: u16, bytes: &[u8], within: Duration) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _ = s.write_all(bytes);
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(got),
        }
    }
}

/// A TLS client made with tokio-rustls: the handshake, then CONNECT; `Ok(code)` with the
/// CONNACK code, `Err` with why there was none.
async fn tls_connect_raw(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    v5: bool,
    user: Option<(&str, &str)>,
) -> Result<u8, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("tcp: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (u, p) = match user {
            Some((u, p)) => (Some(u), Some(p)),
            None => (None, None),
        };
        tls.write_all(&connect_packet(v5, "tls-raw", u, p))
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut reply = [0u8; 4];
        tls.read_exact(&mut reply)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if reply[0] != 0x20 {
            return Err(format!("not a CONNACK: {reply:?}"));
        }
        Ok(reply[3])
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".to_owned()))
}

fn v5_tls(id: &str, port: u16, config: Arc<rustls::ClientConfig>) -> rumqttc::v5::MqttOptions {
    let mut opts = V5::options(id, "127.0.0.1", port);
    opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(config)));
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_that_trust_the_ca_connect_and_others_are_refused() {
    let pki = Pki::new("relaybox test CA");
    let certs = certs_dir();
    let (cert, key) = write_pair(certs.path(), "server", &pki.server());
    let tls_port = free_port();
    let cfg = RelayConfig::new("sec-tls")
        .no_anonymous()
        .mqtt(&format!("tls_listen = \"127.0.0.1:{tls_port}\""))
        .mqtt(&tls_lines(&cert, &key));
    let extra = acl("dev", &["t/#"], &["t/#"]);
    let mut relay = relay_with_users(cfg, &extra, &[("dev", "dev-pw")]).await;

    // Trusting the CA: connects, subscribes, publishes, receives; ACLs apply.
    let trusted = tls_client(&pki.ca_pem(), None);
    let mut opts = v5_tls("tls-ok", tls_port, trusted.clone());
    opts.set_credentials("dev", "dev-pw");
    let mut dev = V5::connect(opts).await.expect("TLS client trusting the CA");
    assert_eq!(
        dev.subscribe("t/#").await,
        V5SubCode::Success(V5QoS::AtLeastOnce)
    );
    assert_eq!(dev.publish("t/1", b"over tls").await, PubAckReason::Success);
    assert_eq!(
        dev.publish("x/1", b"over tls").await,
        PubAckReason::NotAuthorized
    );
    assert!(dev.wait_message("t/1").await.is_empty());
    // Credentials are still checked over TLS.
    assert_eq!(
        tls_connect_raw(tls_port, trusted.clone(), true, Some(("dev", "bad"))).await,
        Ok(0x86)
    );
    assert_eq!(
        tls_connect_raw(tls_port, trusted.clone(), false, None).await,
        Ok(0x05)
    );

    // A client that does not trust the relay's certificate gets no session.
    let rogue = Pki::new("some other CA");
    let distrusting = tls_client(&rogue.ca_pem(), None);
    let err = tls_connect_raw(tls_port, distrusting, true, Some(("dev", "dev-pw"))).await;
    assert!(
        err.as_ref().is_err_and(|e| e.starts_with("handshake")),
        "{err:?}"
    );

    // A plaintext MQTT client on the TLS port gets no CONNACK and is closed.
    let got = blocking(|| {
        send_and_read_to_close(
            tls_port,
            &connect_packet(false, "plain", Some("dev"), Some("dev-pw")),
            REPLY,
        )
    });
    let got = got.expect("plaintext connection on the TLS port not closed");
    assert!(
        got.first() != Some(&0x20),
        "plaintext client got an MQTT answer: {got:?}"
    );

    // The TLS session is unaffected.
    assert_eq!(
        dev.publish("t/2", b"still here").await,
        PubAckReason::Success
    );
    assert!(relay.exited().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_maps_the_certificate_common_name_to_the_user() {
    let pki = Pki::new("relaybox test CA");
    let rogue = Pki::new("rogue CA");
    let certs = certs_dir();
    let (cert, key) = write_pair(certs.path(), "server", &pki.server());
    let ca = write_file(certs.path(), "clients-ca.pem", &pki.ca_pem());
    let mut relays = Vec::new();
    for required in [false, true] {
        let tls_port = free_port();
        let cfg = RelayConfig::new("sec-mtls")
            .no_anonymous()
            .mqtt(&format!("tls_listen = \"127.0.0.1:{tls_port}\""))
            .mqtt(&tls_lines(&cert, &key))
            .mqtt(&format!(
                "tls_client_ca = {}",
                toml_str(&ca.display().to_string())
            ))
            .mqtt(&format!("tls_require_client_cert = {required}"));
        let relay = Relay::start_with_extra(cfg, &acl("*", &["users/%u/#"], &["users/%u/#"])).await;
        relays.push((required, tls_port, relay));
    }

    let carol = pki.client("carol");
    for (required, port, relay) in &relays {
        let port = *port;
        let what = if *required { "required" } else { "optional" };
        // carol's certificate logs her in as carol, without a password.
        let mut c = V5::connect(v5_tls(
            "carol-dev",
            port,
            tls_client(&pki.ca_pem(), Some(&carol)),
        ))
        .await
        .unwrap_or_else(|e| panic!("{what}: carol's certificate refused: {e}"));
        assert_eq!(
            c.subscribe("users/carol/#").await,
            V5SubCode::Success(V5QoS::AtLeastOnce),
            "{what}"
        );
        assert_eq!(
            c.subscribe("users/dave/#").await,
            V5SubCode::NotAuthorized,
            "{what}"
        );
        assert_eq!(
            c.publish("users/carol/x", b"mine").await,
            PubAckReason::Success,
            "{what}"
        );
        assert_eq!(
            c.publish("users/dave/x", b"his").await,
            PubAckReason::NotAuthorized,
            "{what}"
        );
        assert!(c.wait_message("users/carol/x").await.is_empty(), "{what}");

        // A certificate from a CA the relay does not trust: no session.
        let mallory = rogue.client("carol");
        let err =
            tls_connect_raw(port, tls_client(&pki.ca_pem(), Some(&mallory)), true, None).await;
        assert!(
            err.is_err(),
            "{what}: untrusted client certificate accepted: {err:?}"
        );

        // Without a certificate: anonymous, which this relay refuses (at CONNECT when the
        // certificate is optional, in the handshake when it is required).
        let no_cert = tls_connect_raw(port, tls_client(&pki.ca_pem(), None), true, None).await;
        if *required {
            assert!(
                no_cert.is_err(),
                "{what}: client without certificate: {no_cert:?}"
            );
        } else {
            assert_eq!(no_cert, Ok(0x87), "{what}: client without certificate");
        }
        assert_eq!(
            c.publish("users/carol/y", b"still here").await,
            PubAckReason::Success
        );
        assert!(
            relay.log_count("TLS handshake failed") >= 1,
            "{}",
            tail(&relay.log(), 20)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificates_reload_on_sighup_without_dropping_connections() {
    let old_ca = Pki::new("old CA");
    let new_ca = Pki::new("new CA");
    let certs = certs_dir();
    let (cert, key) = write_pair(certs.path(), "server", &old_ca.server());
    let tls_port = free_port();
    let cfg = RelayConfig::new("sec-tls-hup")
        .mqtt(&format!("tls_listen = \"127.0.0.1:{tls_port}\""))
        .mqtt(&tls_lines(&cert, &key));
    let relay = Relay::start(cfg).await;

    let mut old = V5::connect(v5_tls("old", tls_port, tls_client(&old_ca.ca_pem(), None)))
        .await
        .expect("client of the old CA");
    assert!(
        tls_connect_raw(tls_port, tls_client(&new_ca.ca_pem(), None), true, None)
            .await
            .is_err()
    );

    write_pair(certs.path(), "server", &new_ca.server());
    relay.signal(libc::SIGHUP);
    relay
        .wait_log("reloaded ACL rules and TLS certificates", 1, REPLY)
        .await;

    let mut new = V5::connect(v5_tls("new", tls_port, tls_client(&new_ca.ca_pem(), None)))
        .await
        .expect("client of the new CA after the reload");
    assert_eq!(
        new.subscribe("r/#").await,
        V5SubCode::Success(V5QoS::AtLeastOnce)
    );
    assert_eq!(
        old.publish("r/1", b"from the old session").await,
        PubAckReason::Success
    );
    new.wait_message("r/1").await;
    assert_eq!(
        tls_connect_raw(tls_port, tls_client(&old_ca.ca_pem(), None), true, None)
            .await
            .map_err(|e| e.starts_with("handshake")),
        Err(true),
        "a new client of the old CA"
    );
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_publish_and_subscribe_under_the_same_acls() {
    let pki = Pki::new("relaybox test CA");
    let certs = certs_dir();
    let (cert, key) = write_pair(certs.path(), "server", &pki.server());
    let (ws_port, wss_port) = (free_port(), free_port());
    let cfg = RelayConfig::new("sec-ws")
        .no_anonymous()
        .mqtt(&format!("ws_listen = \"127.0.0.1:{ws_port}\""))
        .mqtt(&format!("wss_listen = \"127.0.0.1:{wss_port}\""))
        .mqtt(&tls_lines(&cert, &key));
    let extra = acl("web", &["chat/#"], &["chat/#"]);
    let mut relay = relay_with_users(cfg, &extra, &[("web", "web-pw")]).await;
    let ws_url = format!("ws://127.0.0.1:{ws_port}/mqtt");
    let wss_url = format!("wss://127.0.0.1:{wss_port}/mqtt");
    let tls = tls_client(&pki.ca_pem(), None);

    // MQTT 3.1.1 over ws:// subscribes.
    let mut opts = v4_options("ws-v4", &ws_url, ws_port, "web", "web-pw");
    opts.set_transport(Transport::Ws);
    let v4_sub = Subscriber::start_with_options(opts, &["chat/#"]).await;

    // MQTT 5 over wss:// publishes and subscribes; the ACL applies.
    let mut opts = V5::options("wss-v5", &wss_url, wss_port);
    opts.set_transport(Transport::Wss(TlsConfiguration::Rustls(tls.clone())));
    opts.set_credentials("web", "web-pw");
    let mut wss = V5::connect(opts).await.expect("MQTT 5 over wss://");
    assert_eq!(
        wss.subscribe("chat/#").await,
        V5SubCode::Success(V5QoS::AtLeastOnce)
    );
    assert_eq!(wss.subscribe("admin/#").await, V5SubCode::NotAuthorized);
    assert_eq!(
        wss.publish("chat/from-wss", b"hi").await,
        PubAckReason::Success
    );
    assert_eq!(
        wss.publish("admin/x", b"no").await,
        PubAckReason::NotAuthorized
    );

    // MQTT 5 over ws:// publishes.
    let mut opts = V5::options("ws-v5", &ws_url, ws_port);
    opts.set_transport(Transport::Ws);
    opts.set_credentials("web", "web-pw");
    let mut ws = V5::connect(opts).await.expect("MQTT 5 over ws://");
    assert_eq!(
        ws.publish("admin/y", b"no").await,
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        ws.publish("chat/from-ws", b"hello").await,
        PubAckReason::Success
    );

    assert_eq!(wss.wait_message("chat/from-ws").await, ["chat/from-wss"]);
    v4_sub.wait_for(2, REPLY).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got: Vec<(String, Vec<u8>)> = v4_sub.snapshot();
    assert_eq!(
        got,
        [
            ("chat/from-wss".to_owned(), b"hi".to_vec()),
            ("chat/from-ws".to_owned(), b"hello".to_vec())
        ]
    );

    // Same authentication: a wrong password over ws:// and wss:// is refused.
    for (id, url, port, wss) in [
        ("ws-bad", &ws_url, ws_port, false),
        ("wss-bad", &wss_url, wss_port, true),
    ] {
        let mut opts = V5::options(id, url, port);
        opts.set_transport(if wss {
            Transport::Wss(TlsConfiguration::Rustls(tls.clone()))
        } else {
            Transport::Ws
        });
        opts.set_credentials("web", "wrong");
        match V5::connect(opts).await {
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, ConnectReturnCode::BadUserNamePassword, "{id}")
            }
            Err(e) => panic!("{id}: {e}"),
            Ok(_) => panic!("{id}: wrong password accepted"),
        }
    }
    // MQTT is served on /mqtt only.
    let mut opts = V5::options(
        "ws-path",
        &format!("ws://127.0.0.1:{ws_port}/other"),
        ws_port,
    );
    opts.set_transport(Transport::Ws);
    opts.set_credentials("web", "web-pw");
    assert!(
        V5::connect(opts).await.is_err(),
        "WebSocket on another path accepted"
    );
    assert!(v4_sub.errors.lock().expect("errors").is_empty());
    assert!(relay.exited().is_none());
}

// ---------------------------------------------------------------------------------------------
// Uplink security
// ---------------------------------------------------------------------------------------------

/// A nats-server with JetStream that requires TLS and a user name and password.
struct SecureHub {
    port: u16,
    dir: tempfile::TempDir,
    child: std::process::Child,
    ca: PathBuf,
}

const HUB_USER: &str = "relay-office";
const HUB_PASSWORD: &str = "hub-Pa55-word-never-logged";

impl SecureHub {
    async fn start(pki: &Pki) -> SecureHub {
        let dir = tempfile::Builder::new()
            .prefix("relaybox-sechub-")
            .tempdir()
            .expect("hub dir");
        let (cert, key) = write_pair(dir.path(), "hub", &pki.server());
        let ca = write_file(dir.path(), "ca.pem", &pki.ca_pem());
        let port = free_port();
        let conf = format!(
            "listen: \"127.0.0.1:{port}\"\n\
             jetstream {{ store_dir: {store} }}\n\
             tls {{ cert_file: {cert}, key_file: {key}, timeout: 5 }}\n\
             authorization {{ user: {user}, password: {pw} }}\n",
            store = toml_str(&dir.path().join("js").display().to_string()),
            cert = toml_str(&cert.display().to_string()),
            key = toml_str(&key.display().to_string()),
            user = toml_str(HUB_USER),
            pw = toml_str(HUB_PASSWORD),
        );
        let conf_path = write_file(dir.path(), "nats.conf", &conf);
        let log_path = dir.path().join("nats.log");
        let log = std::fs::File::create(&log_path).expect("hub log");
        let mut child = Command::new(common::nats_server())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        let ready = wait_until(common::READY_TIMEOUT, || {
            std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("Server is ready"))
                && port_open(port)
                || child.try_wait().ok().flatten().is_some()
        })
        .await;
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(
            ready && child.try_wait().ok().flatten().is_none(),
            "secure nats-server did not start:\n{}",
            tail(&log, 30)
        );
        SecureHub {
            port,
            dir,
            child,
            ca,
        }
    }

    fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    async fn connect(&self, password: &str) -> Result<async_nats::Client, String> {
        let attempt = async_nats::ConnectOptions::new()
            .add_root_certificates(self.ca.clone())
            .require_tls(true)
            .user_and_password(HUB_USER.to_owned(), password.to_owned())
            .connection_timeout(Duration::from_secs(5))
            .connect(self.url());
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        }
    }

    /// The stream's message count.
    async fn count(&self) -> u64 {
        let js = async_nats::jetstream::new(self.connect(HUB_PASSWORD).await.expect("hub client"));
        let mut s = tokio::time::timeout(REPLY, js.get_stream(STREAM))
            .await
            .expect("stream in time")
            .expect("stream");
        let info = tokio::time::timeout(REPLY, s.info())
            .await
            .expect("info in time")
            .expect("info");
        info.state.messages
    }

    /// Waits until the stream holds `n` messages; returns (subject, payload) of each.
    async fn wait_messages(&self, n: u64) -> Vec<(String, Vec<u8>)> {
        let js = async_nats::jetstream::new(self.connect(HUB_PASSWORD).await.expect("hub client"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(Ok(mut s)) = tokio::time::timeout(REPLY, js.get_stream(STREAM)).await {
                if let Ok(Ok(info)) = tokio::time::timeout(REPLY, s.info()).await {
                    if info.state.messages >= n {
                        break s;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "hub stream did not reach {n} messages"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut out = Vec::new();
        for seq in 1..=n {
            let m = tokio::time::timeout(REPLY, stream.get_raw_message(seq))
                .await
                .expect("get message in time")
                .expect("get message");
            out.push((m.subject.to_string(), m.payload.to_vec()));
        }
        out
    }
}

impl Drop for SecureHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_bridges_to_a_hub_that_requires_tls_and_a_password() {
    let pki = Pki::new("hub CA");
    let hub = SecureHub::start(&pki).await;
    // The hub really requires both.
    assert!(
        hub.connect("wrong").await.is_err(),
        "hub accepted a wrong password"
    );
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::ConnectOptions::new()
            .user_and_password(HUB_USER.to_owned(), HUB_PASSWORD.to_owned())
            .connect(format!("nats://127.0.0.1:{}", hub.port)),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "hub accepted a client without TLS"
    );

    let ca = toml_str(&hub.ca.display().to_string());
    let cfg = RelayConfig::new("sec-uplink")
        .uplink(&hub.url())
        .uplink_lines(&format!(
            "ca_file = {ca}\nuser = {}\npassword = {}",
            toml_str(HUB_USER),
            toml_str(HUB_PASSWORD)
        ))
        .export("meters/#");
    let relay = Relay::start(cfg).await;
    // Published once the hub link is up, so all five are live traffic and keep their order (a
    // record accepted while the link is down is backlog, which live records may overtake).
    relay.wait_log("hub connected", 1, REPLY).await;
    common::publish_all_v4(
        relay.port(),
        "meter",
        "meters/m1/kwh",
        (0..5).map(|i| format!("kwh {i}").into_bytes()).collect(),
        Duration::from_secs(10),
    )
    .await;
    let got = hub.wait_messages(5).await;
    let want: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                format!("{PREFIX}.meters.m1.kwh"),
                format!("kwh {i}").into_bytes(),
            )
        })
        .collect();
    assert_eq!(got, want);

    // With a wrong hub password nothing gets through, and neither password is in the log.
    let wrong = "wrong-hub-password-also-secret";
    let cfg = RelayConfig::new("sec-uplink-bad")
        .uplink(&hub.url())
        .uplink_lines(&format!(
            "ca_file = {ca}\nuser = {}\npassword = {}",
            toml_str(HUB_USER),
            toml_str(wrong)
        ))
        .export("meters/#");
    let bad = Relay::start(cfg).await;
    common::publish_all_v4(
        bad.port(),
        "meter2",
        "meters/m2/kwh",
        vec![b"x".to_vec()],
        REPLY,
    )
    .await;
    assert!(
        wait_until(REPLY, || bad.log().to_lowercase().contains("authorization")).await,
        "no authorization error in the log:\n{}",
        tail(&bad.log(), 20)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hub.wait_messages(5).await.len(), 5);
    assert_eq!(
        hub.count().await,
        5,
        "a message got through with a wrong password"
    );
    for log in [relay.log(), bad.log()] {
        assert!(
            !log.contains(HUB_PASSWORD) && !log.contains(wrong),
            "hub password in the log"
        );
    }
    assert!(!hub.log().contains(HUB_PASSWORD));
}

/// Runs the binary with `args` (bounded to 20 s); returns (exit code, stdout, stderr).
async fn run_cli(args: &[&str], config: &Path) -> (Option<i32>, String, String) {
    let mut child = Command::new(RELAY_BIN)
        .args(args)
        .arg(config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relaybox");
    let status = common::wait_exit(&mut child, Duration::from_secs(20)).await;
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        status.is_some(),
        "relaybox {args:?} still running after 20 s"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_plaintext_hub_url_off_this_machine_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let data_dir = dir.path().join("data");
    let cfg = RelayConfig::new("sec-remote")
        .uplink("nats://192.0.2.1:4222")
        .uplink_lines("user = \"relay\"\npassword = \"remote-secret-pw\"");
    let config = write_file(dir.path(), "relaybox.toml", &cfg.toml(&data_dir));

    for args in [&["run", "--config"][..], &["check-config"][..]] {
        let (code, stdout, stderr) = run_cli(args, &config).await;
        assert_eq!(code, Some(2), "{args:?}: exit code; stderr: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {stderr}");
        let line = lines[0];
        for needle in [
            "relaybox.toml:",
            "uplink.url",
            "192.0.2.1",
            "not encrypted",
            "tls://",
            "insecure = true",
        ] {
            assert!(
                line.contains(needle),
                "{args:?}: {needle:?} missing in {line}"
            );
        }
        assert!(!stdout.contains("remote-secret-pw") && !stderr.contains("remote-secret-pw"));
    }
    assert!(!data_dir.exists(), "the refused relay created its data dir");
    assert!(
        !port_open(cfg.mqtt_port),
        "the refused relay opened its MQTT port"
    );

    // Encrypted, or insecure on purpose: accepted (check-config only: nothing is contacted).
    for lines in [
        "insecure = true",
        "ca_file = \"/etc/ssl/certs/ca-certificates.crt\"",
    ] {
        let cfg = cfg.clone().uplink_lines(lines);
        let config = write_file(dir.path(), "ok.toml", &cfg.toml(&data_dir));
        let (code, _, stderr) = run_cli(&["check-config"], &config).await;
        assert_eq!(code, Some(0), "{lines}: {stderr}");
    }
    let cfg = RelayConfig::new("sec-remote").uplink("tls://192.0.2.1:4222");
    let config = write_file(dir.path(), "tls.toml", &cfg.toml(&data_dir));
    assert_eq!(run_cli(&["check-config"], &config).await.0, Some(0));
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// How long after connecting (and optionally sending `bytes`) the relay closes a socket.
fn closed_after(port: u16, bytes: &[u8]) -> Option<Duration> {
    let started = Instant::now();
    send_and_read_to_close(port, bytes, Duration::from_secs(15)).map(|_| started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_closed_after_the_connect_timeout() {
    let pki = Pki::new("relaybox test CA");
    let certs = certs_dir();
    let (cert, key) = write_pair(certs.path(), "server", &pki.server());
    let (tls_port, ws_port, wss_port) = (free_port(), free_port(), free_port());
    let cfg = RelayConfig::new("sec-timeout")
        .mqtt("connect_timeout_ms = 700")
        .mqtt(&format!("tls_listen = \"127.0.0.1:{tls_port}\""))
        .mqtt(&format!("ws_listen = \"127.0.0.1:{ws_port}\""))
        .mqtt(&format!("wss_listen = \"127.0.0.1:{wss_port}\""))
        .mqtt(&tls_lines(&cert, &key));
    let relay = Relay::start(cfg).await;
    let port = relay.port();

    let mut half_connect = raw::connect_v4("slow");
    half_connect.truncate(6);
    let cases: Vec<(&str, u16, Vec<u8>)> = vec![
        ("silent TCP socket", port, vec![]),
        ("half a CONNECT", port, half_connect),
        ("silent socket on the TLS port", tls_port, vec![]),
        ("silent socket on the WebSocket port", ws_port, vec![]),
        (
            "silent socket on the secure WebSocket port",
            wss_port,
            vec![],
        ),
    ];
    let results = blocking(|| {
        std::thread::scope(|s| {
            let handles: Vec<_> = cases
                .iter()
                .map(|(what, port, bytes)| s.spawn(move || (*what, closed_after(*port, bytes))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("probe"))
                .collect::<Vec<_>>()
        })
    });
    for (what, after) in results {
        let after = after.unwrap_or_else(|| panic!("{what}: still open after 15 s"));
        assert!(
            after >= Duration::from_millis(500) && after < Duration::from_millis(2500),
            "{what}: closed after {after:?}, connect_timeout_ms is 700"
        );
    }

    // Past the TLS handshake and past the WebSocket upgrade, a client that sends no CONNECT
    // is closed the same way.
    let tls = tls_client(&pki.ca_pem(), None);
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "TLS client without CONNECT: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "{:?}",
        started.elapsed()
    );

    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://127.0.0.1:{ws_port}/mqtt")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "mqtt".parse().expect("header value"),
    );
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
        .await
        .expect("tcp");
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("WebSocket upgrade");
    let next = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if m.is_close() => return "close frame",
                Some(Ok(_)) => continue,
                Some(Err(_)) => return "error",
                None => return "end",
            }
        }
    })
    .await;
    assert!(
        next.is_ok(),
        "WebSocket client without CONNECT still open after 10 s"
    );
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "{:?}",
        started.elapsed()
    );

    // The relay still serves.
    blocking(|| Raw::login(port, true, "after", None, None).ping());
    assert!(
        relay.log_count("no CONNECT within") >= 2,
        "{}",
        tail(&relay.log(), 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_packet_or_too_many_inflight_closes_only_that_connection() {
    let cfg = RelayConfig::new("sec-oversize")
        .mqtt("max_packet_size = 1024")
        .mqtt("max_inflight = 3");
    let relay = Relay::start(cfg).await;
    let port = relay.port();
    let sub = Subscriber::start(port, "healthy-sub", &["ok/#"]).await;
    blocking(|| {
        let mut good = Raw::login(port, true, "healthy-pub", None, None);
        good.publish("ok/1", &[b'a'; 900], 1, 1);

        // MQTT 5: DISCONNECT 0x95 (packet too large), then closed.
        let mut big5 = Raw::login(port, true, "big-v5", None, None);
        big5.send(&publish_packet(true, "ok/big", &[b'x'; 2000], 1, 1));
        let (h, body) = big5.expect("DISCONNECT");
        assert_eq!((h, body.first()), (0xe0, Some(&0x95)), "{body:?}");
        assert!(big5.conn.closed_within(REPLY));

        // MQTT 3.1.1: closed.
        let mut big4 = Raw::login(port, false, "big-v4", None, None);
        let _ = big4
            .conn
            .send(&publish_packet(false, "ok/big", &[b'x'; 2000], 0, 0));
        assert!(big4.conn.closed_within(REPLY), "3.1.1 oversized publish");

        // Only a header announcing 10 MB: closed before the bytes come.
        let mut announced = Raw::login(port, false, "announce", None, None);
        let mut header = vec![0x30];
        header.extend(raw::remaining_length(10 * 1024 * 1024));
        announced.send(&header);
        assert!(
            announced.conn.closed_within(REPLY),
            "announced oversized packet"
        );

        // More unacknowledged QoS 1 publishes than max_inflight in one go: DISCONNECT 0x93.
        let mut greedy = Raw::login(port, true, "greedy", None, None);
        let burst: Vec<u8> = (1..=8u16)
            .flat_map(|i| publish_packet(true, "greedy/t", b"x", 1, i))
            .collect();
        greedy.send(&burst);
        let mut reasons = Vec::new();
        for _ in 0..20 {
            match greedy.conn.read(REPLY) {
                Got::Packet(0xe0, body) => reasons.push(body[0]),
                Got::Packet(..) => {}
                Got::Closed | Got::Timeout => break,
            }
        }
        assert_eq!(reasons, [0x93], "greedy client");

        // The others go on.
        good.publish("ok/2", b"after", 1, 2);
        good.ping();
    });
    assert_eq!(sub.wait_for(2, REPLY).await, 2);
    let topics: Vec<String> = sub.snapshot().into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, ["ok/1", "ok/2"]);
    assert!(sub.errors.lock().expect("errors").is_empty());
    // A connection's closing line is written after its client saw it close.
    relay.wait_log("closed client connection", 4, REPLY).await;
    assert_eq!(
        relay.log_count("closed client connection"),
        4,
        "{}",
        tail(&relay.log(), 20)
    );
}

/// An anonymous 3.1.1 session, retried (for [`REPLY`]) while the relay closes new connections.
fn connect_retrying(port: u16, id: &str) -> Raw {
    let deadline = Instant::now() + REPLY;
    loop {
        let mut conn = RawConn::open(port);
        let _ = conn.send(&raw::connect_v4(id));
        match conn.read(REPLY) {
            Got::Packet(0x20, body) if body[1] == 0 => {
                return Raw {
                    conn,
                    v5: false,
                    name: id.to_owned(),
                    inbox: VecDeque::new(),
                }
            }
            other => assert!(Instant::now() < deadline, "{id}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_maximum_are_refused_while_the_others_keep_working() {
    let relay = Relay::start(RelayConfig::new("sec-maxconn").mqtt("max_connections = 3")).await;
    let port = relay.port();
    blocking(|| {
        // The readiness probe's connection may hold a slot for a moment.
        let mut clients: Vec<Raw> = (0..3)
            .map(|i| connect_retrying(port, &format!("c{i}")))
            .collect();
        assert_eq!(clients[0].subscribe(1, &[("m/#", 0)]), vec![0]);

        // Over the limit: closed at once, no CONNACK.
        for i in 0..3 {
            let got = send_and_read_to_close(port, &raw::connect_v4(&format!("extra{i}")), REPLY);
            assert_eq!(got, Some(vec![]), "connection {} over the maximum", i + 4);
        }
        // The three go on.
        clients[1].publish("m/1", b"x", 1, 1);
        clients[2].publish("m/2", b"y", 1, 1);
        assert_eq!(clients[0].topics_until("m/2"), ["m/1", "m/2"]);
        for c in &mut clients {
            c.ping();
        }
        // A freed slot is taken again.
        drop(clients.pop());
        let mut late = connect_retrying(port, "late");
        late.ping();
    });
    assert!(relay.log_count("too many connections") >= 1);
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_or_check_config_output() {
    const TOKEN: &str = "hub-token-Zq81-never-shown";
    const CLIENT_PW: &str = "client-pw-Kx22-never-shown";
    const WRONG_PW: &str = "wrong-pw-Yv03-never-shown";
    let hub = NatsHub::start().await;
    let cfg = RelayConfig::new("sec-secrets")
        .no_anonymous()
        .uplink(&hub.url())
        .uplink_lines(&format!("token = {}", toml_str(TOKEN)))
        .export("s/#");
    let relay = relay_with_users(
        cfg.clone(),
        &acl("dev", &["s/#"], &[]),
        &[("dev", CLIENT_PW)],
    )
    .await;
    let port = relay.port();
    blocking(|| {
        let mut dev = Raw::login(port, true, "dev", Some("dev"), Some(CLIENT_PW));
        assert_eq!(dev.publish("s/1", b"x", 1, 1), 0);
        assert_eq!(
            Raw::try_login(port, false, "bad", Some("dev"), Some(WRONG_PW)).1,
            4
        );
        assert_eq!(
            Raw::try_login(port, true, "bad", Some("dev"), Some(WRONG_PW)).1,
            0x86
        );
    });
    wait_stream_count(&hub.url(), STREAM, 1, Duration::from_secs(15)).await;
    relay.wait_log("login refused", 2, REPLY).await;
    let log = relay.log();
    for secret in [TOKEN, CLIENT_PW, WRONG_PW] {
        assert!(!log.contains(secret), "secret {secret} in the relay log");
    }

    // check-config, when the file is good and when it is not.
    let files = certs_dir();
    let dir = files.path();
    let good = write_file(dir, "good.toml", &cfg.toml(&relay.data_dir));
    let broken = write_file(
        dir,
        "broken.toml",
        &format!("{}\n[mqtt2]\nx = 1\n", cfg.toml(&relay.data_dir)),
    );
    let two_ways = write_file(
        dir,
        "two.toml",
        &cfg.clone()
            .uplink_lines(&format!("user = \"u\"\npassword = {}", toml_str(CLIENT_PW)))
            .toml(&relay.data_dir),
    );
    let wrong_type = write_file(
        dir,
        "type.toml",
        &RelayConfig::new("x")
            .uplink(&hub.url())
            .uplink_lines(&format!(
                "user = \"u\"\npassword = [{}]",
                toml_str(CLIENT_PW)
            ))
            .toml(&relay.data_dir),
    );
    // A password in the hub url, with a scheme the config refuses.
    let in_url = write_file(
        dir,
        "url.toml",
        &RelayConfig::new("x")
            .uplink(&format!("natss://u:{CLIENT_PW}@127.0.0.1:4222"))
            .toml(&relay.data_dir),
    );
    for (file, want) in [
        (&good, 0),
        (&broken, 2),
        (&two_ways, 2),
        (&wrong_type, 2),
        (&in_url, 2),
    ] {
        let (code, stdout, stderr) = run_cli(&["check-config"], file).await;
        assert_eq!(code, Some(want), "{}: {stderr}", file.display());
        for secret in [TOKEN, CLIENT_PW] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{}: secret in the output: {stdout}{stderr}",
                file.display()
            );
        }
    }
    // A password in a hub url the client library cannot use: the relay stops with an error
    // that does not repeat it.
    let bad_port = write_file(
        dir,
        "port.toml",
        &RelayConfig::new("x")
            .uplink(&format!("nats://u:{CLIENT_PW}@127.0.0.1:notaport"))
            .toml(&files.path().join("data")),
    );
    let (code, stdout, stderr) = run_cli(&["run", "--config"], &bad_port).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("hub url"), "{stderr}");
    assert!(
        !stdout.contains(CLIENT_PW) && !stderr.contains(CLIENT_PW),
        "{stderr}"
    );
}

/// `deny` wins over allows, for two client libraries: rumqttc (MQTT 5) and libmosquitto's
/// command-line clients (MQTT 3.1.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rules_win_over_allows_for_publishes_and_subscriptions() {
    let cfg = RelayConfig::new("sec-acl-deny").no_anonymous();
    let extra = acl("ann", &["home/#"], &["home/#", "home/+"])
        + "deny = [\"home/safe/#\"]\n"
        + &acl("watch", &[], &["#"]);
    let relay = relay_with_users(cfg, &extra, &[("ann", "a-pw"), ("watch", "w-pw")]).await;
    let port = relay.port();

    // A watcher sees what gets through.
    let mut watch_opts = V5::options("deny-watch", "127.0.0.1", port);
    watch_opts.set_credentials("watch", "w-pw");
    let mut watch = V5::connect(watch_opts).await.expect("watcher connects");
    assert!(matches!(
        watch.subscribe("home/#").await,
        V5SubCode::Success(_)
    ));

    let mut opts = V5::options("deny-ann", "127.0.0.1", port);
    opts.set_credentials("ann", "a-pw");
    let mut ann = V5::connect(opts).await.expect("ann connects");
    assert_eq!(
        ann.publish("home/safe/code", b"1234").await,
        PubAckReason::NotAuthorized,
        "publish to a denied topic"
    );
    assert_eq!(
        ann.publish("home/lights", b"on").await,
        PubAckReason::Success
    );
    // A filter that could receive a denied topic is refused whole; one that cannot is granted.
    assert_eq!(ann.subscribe("home/#").await, V5SubCode::NotAuthorized);
    assert_eq!(ann.subscribe("home/safe/+").await, V5SubCode::NotAuthorized);
    // (`home/safe/#` also matches `home/safe`, which `home/+` would receive.)
    assert_eq!(ann.subscribe("home/+").await, V5SubCode::NotAuthorized);
    assert!(matches!(
        ann.subscribe("home/lights").await,
        V5SubCode::Success(_)
    ));
    assert_eq!(
        watch.wait_message("home/lights").await,
        Vec::<String>::new()
    );

    // libmosquitto, MQTT 3.1.1: the denied subscription gets 0x80, the denied publish is
    // acknowledged and dropped (3.1.1 has no refusal code), the allowed one is delivered.
    let sub = mosquitto(
        port,
        "mosquitto_sub",
        &["-i", "deny-mosq-sub", "-t", "home/#", "-W", "5"],
    );
    let said =
        String::from_utf8_lossy(&sub.stdout).into_owned() + &String::from_utf8_lossy(&sub.stderr);
    assert!(
        said.contains("denied"),
        "mosquitto_sub on a filter overlapping a deny: {said:?}"
    );
    for (topic, payload) in [("home/safe/door", "open"), ("home/heating", "21")] {
        let args = ["-i", "deny-mosq-pub", "-t", topic, "-m", payload];
        let out = mosquitto(port, "mosquitto_pub", &args);
        assert!(out.status.success(), "mosquitto_pub {topic}: {out:?}");
    }
    let before = watch.wait_message("home/heating").await;
    assert!(
        !before.iter().any(|t| t.starts_with("home/safe")),
        "a denied publish reached a subscriber: {before:?}"
    );
    assert!(
        relay.log_count("denied by ACL") >= 4,
        "{}",
        tail(&relay.log(), 20)
    );
}

/// Runs a mosquitto command-line client (libmosquitto) as `ann`, MQTT 3.1.1, QoS 1, against
/// the relay on `port`, with `args` added.
fn mosquitto(port: u16, tool: &str, args: &[&str]) -> std::process::Output {
    let port = port.to_string();
    blocking(|| {
        std::process::Command::new(tool)
            .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv311", "-q", "1"])
            .args(["-u", "ann", "-P", "a-pw"])
            .args(args)
            .output()
    })
    .unwrap_or_else(|e| panic!("run {tool}: {e}"))
}
