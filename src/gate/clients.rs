//! The clients connected now, for the admin page: who, over what, from where and since when.
//!
//! A connection is listed once its CONNACK is sent and leaves the list when its state is
//! dropped, parked or not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::Transport;
use crate::broker::codec::Version;

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

struct Entry {
    client_id: std::sync::Arc<str>,
    user: Option<String>,
    version: Version,
    transport: Transport,
    peer: SocketAddr,
    since_unix_ms: u64,
}

/// The list, keyed by a number each connection is given.
#[derive(Default)]
pub struct Clients {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

impl Clients {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lists a connection; the number is for [`Clients::remove`].
    pub(super) fn add(
        &self,
        client_id: std::sync::Arc<str>,
        user: Option<String>,
        version: Version,
        transport: Transport,
        peer: SocketAddr,
    ) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let since_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.map().insert(
            key,
            Entry {
                client_id,
                user,
                version,
                transport,
                peer,
                since_unix_ms,
            },
        );
        key
    }

    pub(super) fn remove(&self, key: u64) {
        self.map().remove(&key);
    }

    /// How many are connected, and the `max` who came last, newest first.
    pub fn newest(&self, max: usize) -> (usize, Vec<ClientInfo>) {
        let map = self.map();
        let mut entries: Vec<&Entry> = map.values().collect();
        entries.sort_unstable_by_key(|e| std::cmp::Reverse(e.since_unix_ms));
        let list = entries
            .into_iter()
            .take(max)
            .map(|e| ClientInfo {
                client_id: e.client_id.to_string(),
                user: e.user.clone(),
                protocol: format!(
                    "{} {}",
                    match e.version {
                        Version::V5 => "MQTT 5",
                        Version::V4 => "MQTT 3.1.1",
                    },
                    match e.transport {
                        Transport::Tcp => "tcp",
                        Transport::Tls => "tls",
                        Transport::Ws => "ws",
                        Transport::Wss => "wss",
                    }
                ),
                address: e.peer.to_string(),
                since_unix_ms: e.since_unix_ms,
            })
            .collect();
        (map.len(), list)
    }
}
