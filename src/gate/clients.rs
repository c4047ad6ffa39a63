//! The clients connected now, for the admin page: who, over what, from where and since when.
//!
//! A connection is listed once its CONNACK is sent and leaves the list when its state is
//! dropped, parked or not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::Transport;
use crate::broker::codec::Version;
use crate::broker::router::{Attachment, Router, SessionHandle};

/// One connected client as the admin page shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub user: Option<String>,
    /// `MQTT 3.1.1` or `MQTT 5`, and the transport: `tcp`, `tls`, `ws` or `wss`.
    pub protocol: String,
    pub address: String,
    /// When it connected, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

/// The list. Each connection's entry is kept in its session ([`SessionHandle::attach`]), so a
/// connection costs no entry of its own here.
pub struct Clients {
    next: AtomicU64,
    router: Router,
}

/// The names of protocol and transport in the list, by the code a connection is listed with.
const PROTOCOLS: [&str; 8] = [
    "MQTT 5 tcp",
    "MQTT 5 tls",
    "MQTT 5 ws",
    "MQTT 5 wss",
    "MQTT 3.1.1 tcp",
    "MQTT 3.1.1 tls",
    "MQTT 3.1.1 ws",
    "MQTT 3.1.1 wss",
];

/// The code of a protocol and transport: its index in [`PROTOCOLS`].
fn protocol(version: Version, transport: Transport) -> u8 {
    let v = match version {
        Version::V5 => 0,
        Version::V4 => 4,
    };
    let t = match transport {
        Transport::Tcp => 0,
        Transport::Tls => 1,
        Transport::Ws => 2,
        Transport::Wss => 3,
    };
    v + t
}

impl Clients {
    pub(super) fn new(router: Router) -> Clients {
        Clients {
            next: AtomicU64::new(0),
            router,
        }
    }

    /// Lists the connection now serving `handle`'s session; the number is for
    /// [`Clients::remove`].
    pub(super) fn add(
        &self,
        handle: &SessionHandle,
        user: Option<Arc<str>>,
        version: Version,
        transport: Transport,
        peer: SocketAddr,
    ) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let since_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        handle.attach(Attachment {
            key,
            user,
            since_unix_ms,
            ip: peer.ip(),
            port: peer.port(),
            protocol: protocol(version, transport),
        });
        key
    }

    /// Takes connection `key` off the list (unless a take-over has listed another one).
    pub(super) fn remove(&self, handle: &SessionHandle, key: u64) {
        handle.detach(key);
    }

    /// How many are connected, and the `max` who came last, newest first.
    pub fn newest(&self, max: usize) -> (usize, Vec<ClientInfo>) {
        let mut all = self.router.attachments();
        all.sort_unstable_by_key(|(_, a)| std::cmp::Reverse(a.since_unix_ms));
        let total = all.len();
        let list = all
            .into_iter()
            .take(max)
            .map(|(client_id, a)| ClientInfo {
                client_id: client_id.to_string(),
                user: a.user.as_deref().map(str::to_owned),
                protocol: PROTOCOLS
                    .get(usize::from(a.protocol))
                    .map_or("MQTT", |p| *p)
                    .to_owned(),
                address: a.peer().to_string(),
                since_unix_ms: a.since_unix_ms,
            })
            .collect();
        (total, list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_and_transport_is_named_by_its_code() {
        let named = |v, t| PROTOCOLS[usize::from(protocol(v, t))];
        assert_eq!(named(Version::V5, Transport::Tcp), "MQTT 5 tcp");
        assert_eq!(named(Version::V5, Transport::Wss), "MQTT 5 wss");
        assert_eq!(named(Version::V4, Transport::Tls), "MQTT 3.1.1 tls");
        assert_eq!(named(Version::V4, Transport::Ws), "MQTT 3.1.1 ws");
    }
}
