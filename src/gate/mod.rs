//! The gate: every client connection to the relay's MQTT listeners ends here.
//!
//! Listeners: plain TCP (`listen`), TLS (`tls_listen`), WebSocket (`ws_listen`, path `/mqtt`)
//! and WebSocket over TLS (`wss_listen`). Whatever the transport, a connection goes through the
//! same code: the gate reads its CONNECT (with a deadline), authenticates it, opens (or
//! resumes) the client's session in the router (`crate::broker::router`, in this process) and
//! then serves its packets. A PUBLISH whose topic matches an export rule is first appended to
//! the outbox, and a QoS 1/2 one is acknowledged and routed only after its record is durable.
//! PUBLISH and SUBSCRIBE are checked against the topic ACL on the way. The clients connected
//! now are listed (`clients`) for the admin page.
//!
//! *Architecture invariant:* a QoS ≥ 1 PUBACK/PUBREC for an exported topic reaches the client
//! only after the outbox commit that holds the message.
//!
//! Malformed input, a packet a client must never send, or an oversized packet closes that one
//! connection with a logged reason; the listeners and other connections go on.

pub mod acl;
mod auth;
mod client;
pub mod clients;
mod park;
pub mod tls;
pub mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::router::Router;
use crate::config::AclRule;
use crate::liveness::Heartbeat;
use crate::mapping::TopicFilter;
use crate::store::users::Users;
use crate::store::Store;

pub use client::{retained_message, Shared as GateShared};
pub use tls::{TlsError, TlsFiles};

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("a TLS listener is configured without TLS certificate and key")]
    NoTls,
}

/// What the gate needs to know.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    pub ws_listen: Option<SocketAddr>,
    pub wss_listen: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    pub allow_anonymous: bool,
    pub max_packet_size: usize,
    pub max_connections: usize,
    pub max_inflight: usize,
    pub connect_timeout: Duration,
    pub exports: Vec<TopicFilter>,
    pub acl: Vec<AclRule>,
    pub groups: HashMap<String, Vec<String>>,
}

/// Counters of the gate since start.
#[derive(Debug, Default)]
pub struct GateStats {
    pub connections: AtomicU64,
    pub connected: AtomicU64,
    pub refused_busy: AtomicU64,
    pub auth_failures: AtomicU64,
    pub closed_for_errors: AtomicU64,
    pub publishes_in: AtomicU64,
    pub exported: AtomicU64,
    pub refused: AtomicU64,
    pub denied_publishes: AtomicU64,
    pub denied_subscriptions: AtomicU64,
    /// Publishes matching an export rule whose topic no NATS subject can carry.
    pub unexportable: AtomicU64,
    /// PUBLISHes not sent to an MQTT 5 client because they exceed its Maximum Packet Size.
    pub too_large_for_client: AtomicU64,
}

/// The transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// The bound listeners, ready to serve.
pub struct Gate {
    listeners: Vec<(Transport, TcpListener)>,
    shared: Arc<client::Shared>,
}

/// Applies configuration changes to a running gate (SIGHUP).
#[derive(Clone)]
pub struct GateReload(Arc<client::Shared>);

impl GateReload {
    /// New ACL rules and groups; connections keep running and use them from their next packet.
    pub fn acl(&self, rules: Vec<AclRule>, groups: HashMap<String, Vec<String>>) {
        self.0.auth.set_rules(rules, groups);
    }

    /// Reads the TLS certificate, key and client CA again.
    pub fn tls(&self) -> Result<(), TlsError> {
        match &self.0.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }
}

impl Gate {
    /// Binds every configured listener.
    pub async fn bind(
        settings: GateSettings,
        router: &Router,
        store: Store,
        users: Users,
    ) -> Result<Gate, GateError> {
        let tls = match &settings.tls {
            Some(files) => Some(tls::Tls::load(files.clone())?),
            None => None,
        };
        let mut listeners = Vec::new();
        for (transport, addr) in [
            (Transport::Tcp, Some(settings.listen)),
            (Transport::Tls, settings.tls_listen),
            (Transport::Ws, settings.ws_listen),
            (Transport::Wss, settings.wss_listen),
        ] {
            let Some(addr) = addr else { continue };
            if matches!(transport, Transport::Tls | Transport::Wss) && tls.is_none() {
                return Err(GateError::NoTls);
            }
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| GateError::Bind { addr, source })?;
            listeners.push((transport, listener));
        }
        // Wills are kept (retained, exported) like the PUBLISHes of their clients.
        router.keep_wills_with(client::will_keeper(store.clone(), settings.exports.clone()));
        let auth = auth::Auth::new(
            users,
            settings.allow_anonymous,
            settings.acl.clone(),
            settings.groups.clone(),
        );
        let shared = Arc::new(client::Shared {
            router: router.clone(),
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            store,
            tls,
            auth,
            clients: clients::Clients::new(router.clone()),
            stats: GateStats::default(),
            last_busy_warning: AtomicU64::new(0),
            started: Instant::now(),
            parker: match park::Parker::start(tokio::runtime::Handle::current(), client::resume) {
                Ok(p) => {
                    router.set_wake_hook(p.wake_hook());
                    Some(p)
                }
                Err(error) => {
                    tracing::warn!(%error, "no connection parker: quiet connections keep their tasks");
                    None
                }
            },
        });
        Ok(Gate { listeners, shared })
    }

    /// The plain MQTT listener's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr(Transport::Tcp)
    }

    /// The address of the listener of `transport`, if there is one.
    pub fn addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(t, _)| *t == transport)
            .and_then(|(_, l)| l.local_addr().ok())
    }

    pub fn stats(&self) -> Arc<client::Shared> {
        self.shared.clone()
    }

    pub fn reloader(&self) -> GateReload {
        GateReload(self.shared.clone())
    }

    /// Accepts connections until `shutdown` is cancelled; then waits for the connections to
    /// drain what they read (each stops reading at once).
    pub async fn serve(self, shutdown: CancellationToken) {
        self.serve_with_heartbeat(shutdown, Heartbeat::unwatched("gate"))
            .await;
    }

    /// As [`Gate::serve`], beating `heartbeat` while the accept loop runs (also while it waits
    /// for a client), so that a gate task that died or cannot be run shows as a stall.
    pub async fn serve_with_heartbeat(self, shutdown: CancellationToken, heartbeat: Heartbeat) {
        let tracker = TaskTracker::new();
        loop {
            let accepts = self.listeners.iter().map(|(transport, listener)| {
                Box::pin(async move { (*transport, listener.accept().await) })
            });
            let ((transport, accepted), _, _) = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = heartbeat.beat_while(futures::future::select_all(accepts)) => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    self.shared
                        .stats
                        .connections
                        .fetch_add(1, Ordering::Relaxed);
                    let Ok(permit) = self.shared.slots.clone().try_acquire_owned() else {
                        self.refuse_busy(peer);
                        continue;
                    };
                    let shared = self.shared.clone();
                    let shutdown = shutdown.clone();
                    let held = client::Held {
                        permit: Some(permit),
                        token: Some(tracker.token()),
                    };
                    tracker.spawn(open(shared, transport, stream, peer, shutdown, held));
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(%error, "accepting an MQTT connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(self.listeners);
        // Parked connections are served again, and see the shutdown.
        if let Some(parker) = &self.shared.parker {
            parker.shutdown();
        }
        tracker.close();
        tracker.wait().await;
    }

    /// A connection over `max_connections` is closed at once (counted; logged at most every
    /// ten seconds).
    fn refuse_busy(&self, peer: SocketAddr) {
        let stats = &self.shared.stats;
        let refused = stats.refused_busy.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.shared.started.elapsed().as_secs() + 1;
        let last = self.shared.last_busy_warning.load(Ordering::Relaxed);
        // `last` is 0 until the first warning: that one is logged whenever it comes.
        if (last == 0 || now >= last + 10)
            && self
                .shared
                .last_busy_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %peer,
                refused,
                max_connections = self.shared.settings.max_connections,
                "connection refused: too many connections"
            );
        }
    }
}

/// Completes the transport's handshake and hands the byte stream to the MQTT connection.
async fn open(
    shared: Arc<client::Shared>,
    transport: Transport,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    held: client::Held,
) {
    let _ = stream.set_nodelay(true);
    // Each transport's state is boxed on its own, so that a plain TCP connection does not
    // carry the size of a TLS or WebSocket one.
    if transport == Transport::Tcp {
        Box::pin(client::serve(
            shared,
            stream,
            peer,
            Transport::Tcp,
            None,
            shutdown,
            held,
        ))
        .await;
        return;
    }
    Box::pin(open_wrapped(
        shared, transport, stream, peer, shutdown, held,
    ))
    .await;
}

/// [`open`] for TLS and WebSocket connections.
async fn open_wrapped(
    shared: Arc<client::Shared>,
    transport: Transport,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    held: client::Held,
) {
    let deadline = shared.settings.connect_timeout;
    let max = shared.settings.max_packet_size;
    let result: Result<(), String> = async {
        match transport {
            Transport::Tcp => {
                client::serve(shared, stream, peer, Transport::Tcp, None, shutdown, held).await;
            }
            Transport::Ws => {
                let ws = ws::accept(stream, max, deadline)
                    .await
                    .map_err(|e| e.to_string())?;
                client::serve(shared, ws, peer, Transport::Ws, None, shutdown, held).await;
            }
            Transport::Tls | Transport::Wss => {
                let acceptor = match &shared.tls {
                    Some(tls) => tls.acceptor(),
                    None => return Err("no TLS configuration".to_owned()),
                };
                let tls = tokio::time::timeout(deadline, acceptor.accept(stream))
                    .await
                    .map_err(|_| "TLS handshake timed out".to_owned())?
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                let cert_user = tls::client_common_name(tls.get_ref().1);
                if transport == Transport::Tls {
                    client::serve(shared, tls, peer, Transport::Tls, cert_user, shutdown, held)
                        .await;
                } else {
                    let ws = ws::accept(tls, max, deadline)
                        .await
                        .map_err(|e| e.to_string())?;
                    client::serve(shared, ws, peer, Transport::Wss, cert_user, shutdown, held)
                        .await;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(reason) = result {
        tracing::warn!(%peer, ?transport, reason, "closed client connection before MQTT");
    }
}
