//! Wires the components together and owns their lifetime.
//!
//! Start order: store (and its committer thread) → local broker → gate listener bound →
//! uplink and downlink (on the hub link thread, [`HubLink`]) → serial ports and Modbus buses.
//! Shutdown: the edges (gate listener and
//! connections, uplink, downlink, serial readers, Modbus pollers) are cancelled; each connection,
//! serial port and bus hands on what it had already read, so everything accepted reaches the outbox; then the last store handle is dropped and the committer makes its final
//! commit. The whole drain is bounded by `shutdown_grace_ms`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::broker::local::LocalPublisher;
use crate::broker::message::Origin;
use crate::broker::router::{Router, RouterSettings};
use crate::broker::sys;
use crate::config::Config;
use crate::downlink::{self, DownlinkSettings, DownlinkStatus};
use crate::gate::{Gate, GateReload, GateSettings, TlsFiles};
use crate::liveness::Liveness;
use crate::modbus::{DeviceSettings, Modbus};
use crate::serial::{PortSettings, Serial};
use crate::store::users::Users;
use crate::store::Store;
use crate::systemd::{self, StatusSource};
use crate::uplink::{self, UplinkSettings, UplinkStatus};

/// How often the broker's `$SYS` statistics are published (as Mosquitto's default).
const SYS_INTERVAL: Duration = Duration::from_secs(10);

/// The thread the hub's NATS connection, the uplink and the downlink run on: a runtime of their
/// own, so that a commit's acknowledgements to MQTT clients never wait behind the uplink's
/// work on the connections' workers (with one pipelining publisher, the wake from a commit to
/// its PUBACKs took 0.4 ms when they shared them; see docs/BENCHMARKS.md).
struct HubLink {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl HubLink {
    fn start() -> anyhow::Result<HubLink> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the hub link's runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hub-link".into())
            .spawn(move || {
                // Runs the tasks spawned on it until told to stop.
                let _ = runtime.block_on(stopped);
            })
            .context("cannot start the hub link thread")?;
        Ok(HubLink {
            handle,
            stop,
            thread,
        })
    }

    /// Ends the thread (its tasks have ended or had their grace period) and waits for it.
    async fn stop(self) {
        let _ = self.stop.send(());
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Runs the relay until `stop` resolves, then drains and returns.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(config, stop, |_| {}).await
}

/// As [`run`], telling `ready` the MQTT address once the listener is bound and the store open.
pub async fn run_with(
    config: Config,
    stop: impl Future<Output = ()>,
    ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let write_bytes_at_start = admin::process_write_bytes();
    let (store, committer) = Store::open(
        &config.relay.data_dir,
        &config.outbox,
        config.mqtt.max_retained_bytes,
    )?;
    // The core loops' heartbeats, watched by the systemd watchdog.
    let liveness = Liveness::new();
    let committer_heartbeat = liveness.heartbeat("outbox committer");
    let committer = std::thread::Builder::new()
        .name("outbox-commit".into())
        .spawn(move || committer.run_with_heartbeat(&committer_heartbeat))
        .context("cannot start the outbox committer thread")?;
    let stats = store.stats_handle();

    let router = Router::new(
        RouterSettings {
            max_queued_messages: config.mqtt.max_queued_messages,
            max_queued_bytes: config.mqtt.max_queued_bytes,
            max_total_queued_bytes: config.mqtt.max_queued_total_bytes,
        },
        Some(store.clone()),
    );
    let retained: Vec<_> = store
        .retained()
        .await?
        .into_iter()
        .map(crate::gate::retained_message)
        .collect();
    if !retained.is_empty() {
        let n = router.restore_retained(retained);
        tracing::info!(messages = n, "retained messages restored");
    }
    let sessions = router.restore_sessions().await?;
    if sessions > 0 {
        tracing::info!(sessions, "persistent sessions restored");
    }

    let gate = Gate::bind(
        gate_settings(&config),
        &router,
        store.clone(),
        Users::at(&config.relay.data_dir),
    )
    .await?;
    let reloader = gate.reloader();
    let gate_stats = gate.stats();
    let listen = gate.local_addr().unwrap_or(config.mqtt.listen);

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Some(path) = config.source.clone() {
        tracker.spawn(reload_on_hangup(reloader, path, shutdown.clone()));
    } else {
        drop(reloader);
    }
    tracker.spawn(gate.serve_with_heartbeat(shutdown.clone(), liveness.heartbeat("gate")));

    let mut uplink_status = None;
    let mut downlink_status = None;
    let mut hub_client = None;
    let hub_link = config.uplink.is_some().then(HubLink::start).transpose()?;
    if let (Some(u), Some(link)) = (&config.uplink, &hub_link) {
        let hub = &link.handle;
        let settings = UplinkSettings {
            relay: config.relay.name.clone(),
            urls: u.url.clone(),
            replicas: u.replicas,
            subject_prefix: u.subject_prefix.clone(),
            mode: u.mode,
            stream: u.stream.clone(),
            create_stream: u.create_stream,
            window: u.window,
            drain_rate: u.drain_rate,
            security: uplink::HubSecurity {
                require_tls: u.wants_tls(),
                ca_file: u.ca_file.clone(),
                client_cert: u.client_cert.clone().zip(u.client_key.clone()),
                credentials_file: u.credentials_file.clone(),
                nkey_seed_file: u.nkey_seed_file.clone(),
                user_password: u.user.clone().zip(u.password.clone()),
                token: u.token.clone(),
            },
        };
        if u.mode == crate::config::UplinkMode::Core {
            tracing::warn!(
                "uplink mode is core: messages are at-most-once once they leave the socket"
            );
        }
        let status = Arc::new(UplinkStatus::default());
        uplink_status = Some(status.clone());
        let client = {
            let settings = settings.clone();
            let status = status.clone();
            hub.spawn(async move { uplink::connect(&settings, status).await })
                .await
                .context("the hub link thread failed")??
        };
        if !config.import.is_empty() {
            // Retained messages from the hub are kept on flash, as a client's are.
            let publisher = LocalPublisher::new(&router, Origin::Hub)
                .keeping_retained(store.clone(), crate::proto::Origin::Hub);
            let down = DownlinkSettings {
                relay: config.relay.name.clone(),
                subject_prefix: u.subject_prefix.clone(),
                mode: u.mode,
                imports: config.import.iter().map(|r| r.filter.clone()).collect(),
                create_stream: u.create_stream.then(|| (u.stream.clone(), u.replicas)),
            };
            let status = Arc::new(DownlinkStatus::default());
            downlink_status = Some(status.clone());
            hub.spawn(tracker.track_future(downlink::run(
                down,
                client.clone(),
                publisher,
                status,
                shutdown.clone(),
            )));
        }
        hub_client = Some((client.clone(), u.subject_prefix.clone(), u.status_interval));
        hub.spawn(tracker.track_future(uplink::run_with_heartbeat(
            settings,
            client,
            store.clone(),
            status,
            shutdown.clone(),
            liveness.heartbeat("uplink"),
        )));
    }
    let mut serial_stats = Vec::new();
    if !config.serial.is_empty() {
        let exports: Vec<_> = config.export.iter().map(|r| r.filter.clone()).collect();
        let ports = config
            .serial
            .iter()
            .map(|p| PortSettings::from_config(p, &exports))
            .collect();
        let serial = Serial::start(ports, &router, &store).await?;
        serial_stats = serial.stats();
        tracker.spawn(serial.run(shutdown.clone()));
    }
    let mut modbus_stats = Vec::new();
    if !config.modbus.is_empty() {
        let exports: Vec<_> = config.export.iter().map(|r| r.filter.clone()).collect();
        let devices = config
            .modbus
            .iter()
            .map(|d| DeviceSettings::from_config(d, &exports))
            .collect();
        let modbus = Modbus::start(devices, &router, &store).await?;
        modbus_stats = modbus.stats();
        tracker.spawn(modbus.run(shutdown.clone()));
    }
    // The router's timers (wills, session expiry) and its `$SYS` statistics; its loop is one of
    // the core loops the watchdog watches.
    tracker.spawn(sys::run(
        router.clone(),
        SYS_INTERVAL,
        liveness.heartbeat("router"),
        shutdown.clone(),
    ));
    let sources = Arc::new(admin::Sources {
        relay: config.relay.name.clone(),
        started,
        gate: gate_stats,
        outbox: stats.clone(),
        uplink: uplink_status.clone(),
        downlink: downlink_status,
        serial: serial_stats,
        modbus: modbus_stats,
        broker: router.clone(),
        write_bytes_at_start,
        data_dir: config.relay.data_dir.clone(),
        live: Default::default(),
        logins: Default::default(),
    });
    tracker.spawn(admin::live::run(sources.clone(), shutdown.clone()));
    serve_admin(&config.admin, &sources, &tracker, &shutdown).await;
    if let (Some((client, prefix, interval)), Some(link)) = (hub_client, &hub_link) {
        let make = {
            let sources = sources.clone();
            move || prost::Message::encode_to_vec(&sources.to_proto())
        };
        link.handle
            .spawn(tracker.track_future(uplink::publish_status(
                client,
                config.relay.name.clone(),
                prefix,
                interval,
                make,
                shutdown.clone(),
            )));
    }
    drop(sources);
    // The router holds a store handle too: the committer's last commit comes once every
    // holder (the tasks, at shutdown) has let go.
    drop(router);
    drop(store);

    tracing::info!(%listen, data_dir = %config.relay.data_dir.display(), "relaybox ready");
    ready(listen);
    let outbox = stats.clone();
    let source = StatusSource {
        outbox,
        uplink: uplink_status,
    };
    let mut service = systemd::Service::ready(listen, liveness, source);

    stop.await;
    service.stopping();
    tracing::info!("stopping: draining accepted messages into the outbox");
    shutdown.cancel();
    tracker.close();
    let grace = Duration::from_millis(config.relay.shutdown_grace_ms);
    let drained = tokio::time::timeout(grace, tracker.wait()).await.is_ok();
    if !drained {
        tracing::warn!(
            ?grace,
            "shutdown grace period over; stopping with tasks still running"
        );
    }
    // Tasks of the hub link still running after the grace period are dropped with its runtime,
    // and with them their store handles.
    if let Some(link) = hub_link {
        link.stop().await;
    }
    // The committer ends when the last store handle is gone, after its final commit.
    let joined = tokio::time::timeout(grace, tokio::task::spawn_blocking(move || committer.join()))
        .await
        .is_ok();
    let s = &stats;
    tracing::info!(
        appended = s.appended.load(Ordering::Relaxed),
        dropped = s.dropped_oldest.load(Ordering::Relaxed),
        refused = s.refused.load(Ordering::Relaxed),
        acknowledged = s.acknowledged.load(Ordering::Relaxed),
        backlog = s.records.load(Ordering::Relaxed),
        clean = drained && joined,
        "relaybox stopped"
    );
    Ok(())
}

fn gate_settings(config: &Config) -> GateSettings {
    let m = &config.mqtt;
    GateSettings {
        listen: m.listen,
        tls_listen: m.tls_listen,
        ws_listen: m.ws_listen,
        wss_listen: m.wss_listen,
        tls: m
            .tls_cert
            .clone()
            .zip(m.tls_key.clone())
            .map(|(cert, key)| TlsFiles {
                cert,
                key,
                client_ca: m.tls_client_ca.clone(),
                require_client_cert: m.tls_require_client_cert,
            }),
        allow_anonymous: m.allow_anonymous,
        max_packet_size: m.max_packet_size,
        max_connections: m.max_connections,
        max_inflight: m.max_inflight,
        connect_timeout: Duration::from_millis(m.connect_timeout_ms),
        exports: config.export.iter().map(|r| r.filter.clone()).collect(),
        acl: config.acl.clone(),
        groups: config.groups.clone(),
    }
}

/// Applies what can change without a restart: ACL rules and groups, TLS certificates.
/// Anything else in the file needs a restart (said in the log).
/// Serves the admin endpoint on its listeners. The endpoint is for people: the relay serves
/// its devices without it, so a listener that cannot be had is logged, not fatal.
async fn serve_admin(
    config: &crate::config::AdminConfig,
    sources: &Arc<admin::Sources>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => {
            tracker.spawn(admin::serve(listener, sources.clone(), shutdown.clone()));
        }
        Err(error) => tracing::warn!(
            %error,
            listen = %config.listen,
            "cannot serve the admin page, /metrics and /status"
        ),
    }
    let (Some(addr), Some(cert), Some(key)) =
        (config.tls_listen, &config.tls_cert, &config.tls_key)
    else {
        return;
    };
    let tls = crate::gate::tls::Tls::load(TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
        require_client_cert: false,
    });
    let tls = match tls {
        Ok(tls) => Arc::new(tls),
        Err(error) => {
            tracing::error!(%error, tls_listen = %addr, "the admin endpoint is not served beyond the box");
            return;
        }
    };
    tracker.spawn(reload_admin_tls(tls.clone(), shutdown.clone()));
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tracker.spawn(admin::serve_tls(
                listener,
                tls,
                sources.clone(),
                shutdown.clone(),
            ));
        }
        Err(error) => tracing::error!(
            %error,
            tls_listen = %addr,
            "the admin endpoint is not served beyond the box"
        ),
    }
}

pub fn apply_reload(gate: &GateReload, path: &std::path::Path) {
    match Config::load(path) {
        Ok(new) => {
            gate.acl(new.acl, new.groups);
            match gate.tls() {
                Ok(()) => {
                    tracing::info!(config = %path.display(), "reloaded ACL rules and TLS certificates")
                }
                Err(error) => {
                    tracing::error!(%error, "TLS reload failed; keeping the certificates in use")
                }
            }
        }
        Err(error) => tracing::error!(%error, "config reload failed; keeping the rules in use"),
    }
}

/// Re-reads the admin endpoint's certificate and key at every SIGHUP, until shutdown; on a
/// failure the ones in use stay.
async fn reload_admin_tls(tls: Arc<crate::gate::tls::Tls>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            hup = hangups.recv() => match hup {
                Some(()) => match tls.reload() {
                    Ok(()) => tracing::info!("reloaded the admin endpoint's TLS certificate"),
                    Err(error) => tracing::error!(
                        %error,
                        "admin TLS reload failed; keeping the certificate in use"
                    ),
                },
                None => return,
            },
        }
    }
}

/// Re-reads the config file at every SIGHUP, until shutdown.
async fn reload_on_hangup(gate: GateReload, path: std::path::PathBuf, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; config changes need a restart");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            hup = hangups.recv() => match hup {
                Some(()) => apply_reload(&gate, &path),
                None => return,
            },
        }
    }
}
