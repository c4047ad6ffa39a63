//! The router: sessions, subscriptions, retained messages and wills, and the fan-out of every
//! published message to the sessions whose subscriptions match it.
//!
//! One lock guards the routing state; what is done under it is matching and bookkeeping only
//! (no decoding, no I/O, no waiting). Each session has a bounded queue of deliveries of its own,
//! which its connection (or, while it is offline, nobody) drains; a full queue drops what does
//! not fit and counts it, so a slow or stuck subscriber never slows a publisher or another
//! subscriber.
//!
//! Persistent sessions (MQTT 3.1.1 clean session 0, MQTT 5 Session Expiry > 0) are kept in the
//! store's log: the session itself, its subscriptions (durable before the SUBACK), and every
//! QoS 1/2 delivery to it until the client acknowledged it (durable before the publisher's
//! PUBACK). At start they are read back, and deliveries that were sent before go out again with
//! DUP.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::message::{Message, Origin};
use super::persist;
use super::retained::Retained;
use super::topic::Filter;
use super::tree::{Match, SessionId, SubOptions, Tree};
use crate::store::{Store, StoreError, Ticket, INFLIGHT, QUEUED, SESSION, SUBSCRIPTION};

mod sessions;
use sessions::Sessions;

/// Limits of the router.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// Deliveries a session may have queued (not yet sent, or sent and unacknowledged).
    pub max_queued_messages: usize,
    /// Bytes a session's queue may hold.
    pub max_queued_bytes: usize,
    /// Bytes all queues together may hold.
    pub max_total_queued_bytes: usize,
}

impl Default for RouterSettings {
    fn default() -> RouterSettings {
        RouterSettings {
            max_queued_messages: 1000,
            max_queued_bytes: 1 << 20,
            max_total_queued_bytes: 64 << 20,
        }
    }
}

/// Counters of the router since start.
#[derive(Debug, Default)]
pub struct RouterStats {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Deliveries dropped because a session's queue (or all of them) was full.
    pub dropped: AtomicU64,
    /// Deliveries dropped because their message expired before they were sent.
    pub expired: AtomicU64,
    /// Session records and deliveries the store could not keep.
    pub persist_failures: AtomicU64,
    pub sessions_online: AtomicU64,
    pub sessions_offline: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub subscriptions: AtomicU64,
    pub retained: AtomicU64,
    pub queued_messages: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub wills_published: AtomicU64,
    pub connected_max: AtomicU64,
}

/// A message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// The QoS it is delivered with: min(published, subscription).
    pub qos: u8,
    /// The retain flag it is delivered with.
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Its key in the store while it is kept for a persistent session.
    pub key: Option<u64>,
    /// It was sent before (DUP).
    pub dup: bool,
    /// The packet id it was sent with (0: not sent yet); a resend uses it again.
    pub pid: u16,
    /// QoS 2: the client's PUBREC came and PUBREL was sent; what goes again is the PUBREL.
    pub released: bool,
}

impl Delivery {
    fn size(&self) -> usize {
        self.msg.size()
    }
}

/// A session's queue of deliveries.
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
}

/// Wakes a parked connection (`gate::park`): called with the key it was parked under when a
/// delivery or a take-over comes for its session. One hook serves every parked connection.
pub trait Wake: Send + Sync {
    fn wake(&self, key: u64);
}

/// Who is attached to a session as its connection now, for the list of connected clients.
/// Every session carries one, so it is kept small: the peer's address as its parts, the
/// protocol as the attaching side's code.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The connection's number, so that only its own end detaches it.
    pub key: u64,
    /// When it connected, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    pub user: Option<Arc<str>>,
    pub ip: std::net::IpAddr,
    pub port: u16,
    /// Protocol and transport, as a code of the side that attached it (the gate's list names
    /// it, e.g. `MQTT 5 tls`).
    pub protocol: u8,
}

impl Attachment {
    pub fn peer(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, self.port)
    }
}

/// The part of a session its connection works with. What a session costs while its client
/// waits is here, inline, beside its client id: a waiting connection holds this, its parked
/// state and its session's slot in the router (docs/BENCHMARKS.md: idle connections).
pub struct SessionHandle {
    pub id: SessionId,
    pub client_id: Arc<str>,
    inner: Mutex<Inner>,
    /// Held by the connection serving the session while it takes the session over; a new
    /// connection waits for it.
    slot: AtomicBool,
    /// Take-overs so far: a connection that took the session when it was `n` is taken over
    /// once it is no longer `n`.
    kicks: AtomicU64,
    /// Told when deliveries are queued, when `kicks` grows and when the slot is let go. One
    /// `Notify` for all three (32 bytes a session): every waiter checks what it waits for
    /// after enabling its wait, so none misses its change and a wake for another is harmless.
    changed: Notify,
    persistent: AtomicBool,
    router: std::sync::Weak<RouterShared>,
}

/// What a session's lock guards.
#[derive(Default)]
struct Inner {
    queue: Queue,
    /// Set while the session's connection is parked (`gate::park`): the key the router's wake
    /// hook ([`Router::set_wake_hook`]) is called with when a delivery or a take-over comes.
    wake: Option<u64>,
    /// The connection serving it now, as the list of connected clients shows it.
    attached: Option<Attachment>,
}

/// A connection's hold on its session's slot ([`SessionHandle::acquire`]); released on drop.
pub struct Slot(Arc<SessionHandle>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.slot.store(false, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl SessionHandle {
    /// Makes the connection serving the session let go (a take-over).
    fn kick(&self) {
        self.kicks.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        self.wake_parked();
    }

    /// Whether the connection that took the session at `taken` was taken over since.
    pub fn taken_over(&self, taken: u64) -> bool {
        self.kicks.load(Ordering::SeqCst) != taken
    }

    /// Resolves once the connection that took the session at `taken` is taken over.
    pub async fn until_taken_over(&self, taken: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.taken_over(taken) {
                return;
            }
            notified.await;
        }
    }

    /// Lists the connection serving the session now (replacing one that was taken over).
    pub fn attach(&self, attachment: Attachment) {
        lock(&self.inner).attached = Some(attachment);
    }

    /// Takes connection `key` off the list, unless another one has taken its place.
    pub fn detach(&self, key: u64) {
        let mut inner = lock(&self.inner);
        if inner.attached.as_ref().is_some_and(|a| a.key == key) {
            inner.attached = None;
        }
    }

    /// The connection serving the session now, if it is listed.
    pub fn attachment(&self) -> Option<Attachment> {
        lock(&self.inner).attached.clone()
    }

    /// Sets (`Some`) or clears the key that wakes the session's parked connection. Returns
    /// whether it must wake at once: deliveries are waiting, or it was taken over (`kicked`).
    pub fn set_wake(&self, wake: Option<u64>, taken: u64) -> bool {
        let arming = wake.is_some();
        let mut inner = lock(&self.inner);
        inner.wake = wake;
        arming && (!inner.queue.items.is_empty() || self.taken_over(taken))
    }

    fn wake_parked(&self) {
        let wake = lock(&self.inner).wake;
        if let (Some(key), Some(router)) = (wake, self.router.upgrade()) {
            router.wake(key);
        }
    }

    /// Waits until deliveries may be waiting: at once if some are queued, else until the
    /// session changes (a delivery, or a take-over; the caller looks again either way).
    pub async fn notified(&self) {
        let changed = self.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !lock(&self.inner).queue.items.is_empty() {
            return;
        }
        changed.await;
    }

    /// Takes up to `max` deliveries, oldest first, leaving out expired ones.
    pub fn take(&self, max: usize, out: &mut Vec<Delivery>) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let q = &mut inner.queue;
        let before = out.len();
        let mut taken_bytes = 0;
        let mut expired = Vec::new();
        while out.len() < max {
            let Some(d) = q.items.pop_front() else { break };
            taken_bytes += d.size();
            if d.msg.expired(now) {
                expired.push(d);
                continue;
            }
            out.push(d);
        }
        q.bytes -= taken_bytes.min(q.bytes);
        drop(inner);
        if let Some(router) = self.router.upgrade() {
            router.queued_sub(taken_bytes);
            router.stats.queued_messages.fetch_sub(
                (out.len() - before + expired.len()) as u64,
                Ordering::Relaxed,
            );
            router
                .stats
                .expired
                .fetch_add(expired.len() as u64, Ordering::Relaxed);
            for d in expired {
                router.forget(&self.client_id, &d);
            }
        }
    }

    /// Puts deliveries back at the front (in order), e.g. those a closing connection sent but
    /// had not seen acknowledged: they go out again, with DUP.
    pub fn put_back(&self, deliveries: Vec<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        let mut bytes = 0;
        let n = deliveries.len();
        {
            let mut inner = lock(&self.inner);
            let q = &mut inner.queue;
            for d in deliveries.into_iter().rev() {
                bytes += d.size();
                q.items.push_front(d);
            }
            q.bytes += bytes;
        }
        if let Some(router) = self.router.upgrade() {
            router.queued_add(bytes);
            router
                .stats
                .queued_messages
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
        self.wake_parked();
    }

    /// Whether deliveries are waiting.
    pub fn pending(&self) -> usize {
        lock(&self.inner).queue.items.len()
    }

    /// A delivery was sent to the client for the first time: after a restart, it goes out
    /// again with DUP.
    pub fn sent(&self, d: &Delivery) {
        if let (Some(key), Some(router)) = (d.key, self.router.upgrade()) {
            if !d.dup {
                if let Some(store) = &router.store {
                    let k = persist::queued_key(&self.client_id, key);
                    if !store.try_entry(INFLIGHT, k, Some(d.pid.to_be_bytes().to_vec())) {
                        router
                            .stats
                            .persist_failures
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// The client acknowledged a delivery (PUBACK, PUBCOMP): it is no longer kept.
    pub fn acknowledged(&self, d: &Delivery) {
        if let Some(router) = self.router.upgrade() {
            router.forget(&self.client_id, d);
        }
    }

    /// Waits until no other connection serves this session and takes it; `None` if that takes
    /// longer than `wait`.
    ///
    /// With the slot comes the number of take-overs so far, for [`SessionHandle::taken_over`].
    pub async fn acquire(self: &Arc<Self>, wait: Duration) -> Option<(Slot, u64)> {
        let take = async {
            loop {
                let released = self.changed.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                if self
                    .slot
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return;
                }
                released.await;
            }
        };
        tokio::time::timeout(wait, take).await.ok()?;
        let slot = Slot(self.clone());
        Some((slot, self.kicks.load(Ordering::SeqCst)))
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Relaxed)
    }

    fn new(
        id: SessionId,
        client_id: &str,
        persistent: bool,
        router: &Arc<RouterShared>,
    ) -> Arc<SessionHandle> {
        Arc::new(SessionHandle {
            id,
            client_id: Arc::from(client_id),
            inner: Mutex::new(Inner::default()),
            slot: AtomicBool::new(false),
            kicks: AtomicU64::new(0),
            changed: Notify::new(),
            persistent: persistent.into(),
            router: Arc::downgrade(router),
        })
    }
}

struct SessionEntry {
    handle: Arc<SessionHandle>,
    subscriptions: Subscriptions,
    /// Since when it has had no connection; `None` while it has one (online).
    offline_since: Option<Instant>,
    /// Session Expiry Interval, seconds (`u32::MAX`: never).
    expiry: u32,
    /// Counts the connections that served it: a connection that was taken over finds another
    /// number here when it ends.
    generation: u32,
}

impl SessionEntry {
    fn online(&self) -> bool {
        self.offline_since.is_none()
    }
}

/// A session's subscriptions by their full filter; a session without any keeps no map. The map
/// is boxed so that a session without subscriptions holds one pointer, not an empty map
/// (docs/BENCHMARKS.md: idle connections).
#[allow(clippy::box_collection)]
#[derive(Default)]
struct Subscriptions(Option<Box<HashMap<String, (Filter, SubOptions)>>>);

impl Subscriptions {
    fn insert(&mut self, full: String, sub: (Filter, SubOptions)) -> Option<(Filter, SubOptions)> {
        self.0.get_or_insert_with(Box::default).insert(full, sub)
    }

    fn remove(&mut self, full: &str) -> Option<(Filter, SubOptions)> {
        let map = self.0.as_mut()?;
        let removed = map.remove(full);
        if map.is_empty() {
            self.0 = None;
        }
        removed
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &(Filter, SubOptions))> {
        self.0.iter().flat_map(|m| m.iter())
    }
}

struct DelayedWill {
    at: Instant,
    session: SessionId,
    client_id: Arc<str>,
    msg: Message,
}

/// What happens to a will before it is routed: `(client id, will)`. The gate keeps a retained
/// will in the store and appends an exported one to the outbox, as for a PUBLISH.
pub type WillKeeper = Arc<
    dyn Fn(Arc<str>, Message) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

struct State {
    tree: Tree,
    retained: Retained<Arc<Message>>,
    sessions: Sessions,
    next_key: u64,
    wills: Vec<DelayedWill>,
    /// Scratch space for matches.
    matches: Vec<Match>,
}

pub(super) struct RouterShared {
    state: Mutex<State>,
    settings: RouterSettings,
    store: Option<Store>,
    queued_bytes: AtomicUsize,
    pub stats: RouterStats,
    started: Instant,
    will_keeper: std::sync::OnceLock<WillKeeper>,
    /// Wakes parked connections ([`Router::set_wake_hook`]).
    wake_hook: std::sync::OnceLock<Arc<dyn Wake>>,
}

impl RouterShared {
    /// Queued bytes grew by `n` (kept for the bound of all queues and in the stats).
    fn queued_add(&self, n: usize) {
        self.queued_bytes.fetch_add(n, Ordering::Relaxed);
        self.stats
            .queued_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Queued bytes shrank by `n`.
    fn queued_sub(&self, n: usize) {
        let _ = self
            .queued_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
        let _ = self
            .stats
            .queued_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n as u64))
            });
    }

    /// Calls the wake hook with a parked connection's key.
    fn wake(&self, key: u64) {
        if let Some(hook) = self.wake_hook.get() {
            hook.wake(key);
        }
    }

    /// A delivery is done with (acknowledged, dropped, expired): its store entries go.
    fn forget(&self, client_id: &str, d: &Delivery) {
        if let (Some(key), Some(store)) = (d.key, &self.store) {
            let k = persist::queued_key(client_id, key);
            let ok = store.try_entry(QUEUED, k.clone(), None) && store.try_entry(INFLIGHT, k, None);
            if !ok {
                self.stats.persist_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The router, shared by every connection and local client.
#[derive(Clone)]
pub struct Router(Arc<RouterShared>);

/// What connecting found.
pub struct Connected {
    pub handle: Arc<SessionHandle>,
    /// This connection's number within the session (for [`Router::disconnect`]).
    pub generation: u64,
    /// The session existed before (CONNACK Session Present).
    pub present: bool,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// DISCONNECT with reason 0: the will is dropped.
    Normal,
    /// DISCONNECT 0x04 "with will message", or the connection broke: the will is published.
    WithWill,
}

/// What a SUBSCRIBE did, filter by filter.
pub struct Subscribed {
    /// Retained messages to send for the new subscriptions.
    pub retained: Vec<Delivery>,
    /// Resolves once the subscriptions of a persistent session are durable.
    pub tickets: Vec<Ticket>,
}

impl Router {
    pub fn new(settings: RouterSettings, store: Option<Store>) -> Router {
        Router(Arc::new(RouterShared {
            state: Mutex::new(State {
                tree: Tree::new(),
                retained: Retained::new(),
                sessions: Sessions::default(),
                next_key: 1,
                wills: Vec::new(),
                matches: Vec::new(),
            }),
            settings,
            store,
            queued_bytes: AtomicUsize::new(0),
            stats: RouterStats::default(),
            started: Instant::now(),
            will_keeper: std::sync::OnceLock::new(),
            wake_hook: std::sync::OnceLock::new(),
        }))
    }

    pub fn stats(&self) -> &RouterStats {
        &self.0.stats
    }

    /// Sets what happens to every will before it is routed (once; later calls are ignored).
    pub fn keep_wills_with(&self, keeper: WillKeeper) {
        let _ = self.0.will_keeper.set(keeper);
    }

    /// Sets the hook that wakes parked connections (`gate::park`): a session whose connection
    /// is parked holds only the key it is called with (once; later calls are ignored, as one
    /// gate serves a router's connections).
    pub fn set_wake_hook(&self, hook: Arc<dyn Wake>) {
        let _ = self.0.wake_hook.set(hook);
    }

    /// Publishes a will: kept first (see [`WillKeeper`]), then routed.
    async fn publish_will(&self, client_id: Arc<str>, msg: Message) {
        self.0.stats.wills_published.fetch_add(1, Ordering::Relaxed);
        if let Some(keep) = self.0.will_keeper.get() {
            keep(client_id, msg.clone()).await;
        }
        let _ = self.publish(msg).await;
    }

    pub fn started(&self) -> Instant {
        self.0.started
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.0.state)
    }

    /// Opens (or resumes) the session of `client_id` for a new connection. A connection still
    /// serving it is told to let go (it ends, and its will is handled, before the new one may
    /// take the session: [`SessionHandle::acquire`]).
    pub async fn connect(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry: u32,
    ) -> Result<Connected, StoreError> {
        let mut tickets = Vec::new();
        let mut removals = Vec::new();
        let (handle, present, write_session, generation) = {
            let mut guard = self.state();
            let st = &mut *guard;
            let mut existing = st.sessions.id_of(client_id);
            // A session whose expiry passed is gone, also in the moment before the timer
            // removes it.
            let now = Instant::now();
            if let Some(id) = existing {
                let over = st.sessions.get(id).is_some_and(|e| {
                    !e.online()
                        && e.expiry != u32::MAX
                        && e.offline_since.is_some_and(|since| {
                            now.saturating_duration_since(since)
                                >= Duration::from_secs(u64::from(e.expiry))
                        })
                });
                if over {
                    self.0
                        .stats
                        .sessions_expired
                        .fetch_add(1, Ordering::Relaxed);
                    removals.extend(self.end_session(st, id));
                    existing = None;
                }
            }
            let was_persistent = existing
                .and_then(|id| st.sessions.get(id))
                .is_some_and(|e| e.handle.is_persistent());
            // A pending will of the session is cancelled by a new connection [MQTT-3.1.3-9].
            if let Some(id) = existing {
                st.wills.retain(|w| w.session != id);
            }
            let mut present = false;
            let handle = match existing {
                Some(id) if !clean_start => {
                    present = true;
                    let Some(entry) = st.sessions.get_mut(id) else {
                        return Err(StoreError::Closed);
                    };
                    if entry.online() {
                        entry.handle.kick();
                    } else {
                        self.0
                            .stats
                            .sessions_offline
                            .fetch_sub(1, Ordering::Relaxed);
                        self.0.stats.sessions_online.fetch_add(1, Ordering::Relaxed);
                    }
                    entry.offline_since = None;
                    entry.expiry = expiry;
                    entry.generation = entry.generation.wrapping_add(1);
                    entry.handle.clone()
                }
                _ => {
                    if let Some(id) = existing {
                        if let Some(old) = st.sessions.get(id) {
                            old.handle.kick();
                        }
                        removals.extend(self.end_session(st, id));
                    }
                    // A slab of 2^32 sessions has room: `None` cannot come from connections.
                    let handle = st
                        .sessions
                        .insert(|id| SessionEntry {
                            handle: SessionHandle::new(id, client_id, expiry > 0, &self.0),
                            subscriptions: Subscriptions::default(),
                            expiry,
                            offline_since: None,
                            generation: 0,
                        })
                        .and_then(|id| st.sessions.get(id))
                        .map(|e| e.handle.clone())
                        .ok_or(StoreError::Closed)?;
                    self.0.stats.sessions_online.fetch_add(1, Ordering::Relaxed);
                    handle
                }
            };
            handle.persistent.store(expiry > 0, Ordering::Relaxed);
            let online = self.0.stats.sessions_online.load(Ordering::Relaxed);
            self.0
                .stats
                .connected_max
                .fetch_max(online, Ordering::Relaxed);
            let generation = st
                .sessions
                .get(handle.id)
                .map_or(0, |e| u64::from(e.generation));
            (handle, present, expiry > 0 || was_persistent, generation)
        };
        if let Some(store) = &self.0.store {
            for (space, key) in removals {
                store.entry_nowait(space, key, None).await?;
            }
            if write_session {
                let key = client_id.as_bytes().to_vec();
                let value = (expiry > 0).then(|| persist::session_value(expiry));
                tickets.push(store.entry(SESSION, key, value).await?);
            }
        }
        for t in tickets {
            t.durable().await?;
        }
        Ok(Connected {
            handle,
            present,
            generation,
        })
    }

    /// Removes session `id` and everything of it; returns the store entries to remove.
    fn end_session(&self, st: &mut State, id: SessionId) -> Vec<(u8, Vec<u8>)> {
        let mut removals = Vec::new();
        let Some(entry) = st.sessions.remove(id) else {
            return removals;
        };
        st.wills.retain(|w| w.session != id);
        let client = &entry.handle.client_id;
        let kept = entry.handle.is_persistent();
        for (full, (filter, _)) in entry.subscriptions.iter() {
            st.tree.remove(filter, id);
            if kept {
                removals.push((SUBSCRIPTION, persist::subscription_key(client, full)));
            }
        }
        self.0
            .stats
            .subscriptions
            .fetch_sub(entry.subscriptions.len() as u64, Ordering::Relaxed);
        let mut inner = lock(&entry.handle.inner);
        let q = &mut inner.queue;
        self.0.queued_sub(q.bytes);
        self.0
            .stats
            .queued_messages
            .fetch_sub(q.items.len() as u64, Ordering::Relaxed);
        for d in q.items.drain(..) {
            if let Some(key) = d.key {
                let k = persist::queued_key(client, key);
                removals.push((QUEUED, k.clone()));
                removals.push((INFLIGHT, k));
            }
        }
        q.bytes = 0;
        drop(inner);
        if entry.online() {
            self.0.stats.sessions_online.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.0
                .stats
                .sessions_offline
                .fetch_sub(1, Ordering::Relaxed);
        }
        if kept {
            removals.push((SESSION, client.as_bytes().to_vec()));
        }
        removals
    }

    /// The connection serving `handle` (as connection `generation`) ended. `will`: its will
    /// message and delay, published now or later with [`Ending::WithWill`]. `unacked`:
    /// deliveries it sent that the client did not acknowledge (they go back to the queue of a
    /// session that lives on, with DUP). `expiry`: the Session Expiry Interval its DISCONNECT
    /// set, if any.
    pub async fn disconnect(
        &self,
        handle: &Arc<SessionHandle>,
        generation: u64,
        ending: Ending,
        expiry: Option<u32>,
        will: Option<(Message, u32)>,
        mut unacked: Vec<Delivery>,
    ) {
        let mut publish_will = None;
        let mut removals = Vec::new();
        let mut session_update = None;
        {
            let mut guard = self.state();
            let st = &mut *guard;
            let current = st
                .sessions
                .get_mut(handle.id)
                .filter(|e| Arc::ptr_eq(&e.handle, handle));
            // The session lives on after this connection if nobody took it over or ended it.
            let session_expiry = current.as_ref().map_or(0, |e| e.expiry);
            // Taken over by a connection that resumed the session: a delayed will is not sent
            // [MQTT-3.1.3-9] (and the new connection's connect already cancelled pending ones).
            let resumed = current
                .as_ref()
                .is_some_and(|e| u64::from(e.generation) != generation);
            if let Some((msg, delay)) = will.filter(|_| ending == Ending::WithWill) {
                let delay = delay.min(session_expiry);
                if delay == 0 {
                    publish_will = Some(msg);
                } else if !resumed {
                    st.wills.push(DelayedWill {
                        at: Instant::now() + Duration::from_secs(u64::from(delay)),
                        session: handle.id,
                        client_id: handle.client_id.clone(),
                        msg,
                    });
                }
            }
            let current = st
                .sessions
                .get_mut(handle.id)
                .filter(|e| Arc::ptr_eq(&e.handle, handle));
            match current {
                Some(entry) if u64::from(entry.generation) == generation => {
                    if let Some(e) = expiry.filter(|e| *e != entry.expiry) {
                        entry.expiry = e;
                        session_update = Some(e);
                    }
                    if entry.expiry == 0 {
                        removals = self.end_session(st, handle.id);
                        unacked.clear();
                    } else {
                        entry.offline_since = Some(Instant::now());
                        self.0.stats.sessions_online.fetch_sub(1, Ordering::Relaxed);
                        self.0
                            .stats
                            .sessions_offline
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Taken over: the session goes on with the next connection.
                Some(_) => {}
                // Ended (a clean start took its client id): nothing to keep.
                None => unacked.clear(),
            }
        }
        handle.put_back(unacked);
        if let Some(store) = &self.0.store {
            for (space, key) in removals {
                if store.entry_nowait(space, key, None).await.is_err() {
                    self.0
                        .stats
                        .persist_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(e) = session_update {
                let key = handle.client_id.as_bytes().to_vec();
                let value = (e > 0).then(|| persist::session_value(e));
                if store.entry_nowait(SESSION, key, value).await.is_err() {
                    self.0
                        .stats
                        .persist_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(msg) = publish_will {
            self.publish_will(handle.client_id.clone(), msg).await;
        }
    }

    /// Subscribes `handle`'s session to `filters` (already checked and allowed).
    pub async fn subscribe(
        &self,
        handle: &SessionHandle,
        filters: &[(Filter, SubOptions)],
    ) -> Result<Subscribed, StoreError> {
        let mut retained = Vec::new();
        let mut writes = Vec::new();
        {
            let mut guard = self.state();
            let st = &mut *guard;
            let Some(entry) = st.sessions.get_mut(handle.id) else {
                return Err(StoreError::Closed);
            };
            let persistent = entry.expiry > 0;
            for (filter, opts) in filters {
                let full = filter.full();
                let existed = entry
                    .subscriptions
                    .insert(full.clone(), (filter.clone(), *opts))
                    .is_some();
                st.tree.insert(filter, handle.id, *opts);
                if !existed {
                    self.0.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                }
                if persistent {
                    writes.push((
                        persist::subscription_key(&handle.client_id, &full),
                        persist::subscription_value(opts),
                    ));
                }
                // Retained messages: never for a shared subscription [MQTT-3.3.1-?]; Retain
                // Handling 0 always, 1 only for a new subscription, 2 never.
                let send = filter.group.is_none()
                    && match opts.retain_handling {
                        0 => true,
                        1 => !existed,
                        _ => false,
                    };
                if send {
                    let mut found = Vec::new();
                    st.retained.matching(&filter.filter, &mut found);
                    for (_, msg) in found {
                        retained.push(Delivery {
                            msg: msg.clone(),
                            qos: msg.qos.min(opts.qos),
                            // A retained message sent because of a new subscription carries the
                            // retain flag [MQTT-3.3.1-8 (5), 3.3.1-8 (3.1.1)].
                            retain: true,
                            sub_ids: opts.id.into_iter().collect(),
                            key: None,
                            dup: false,
                            pid: 0,
                            released: false,
                        });
                    }
                }
            }
        }
        let mut tickets = Vec::new();
        if let Some(store) = &self.0.store {
            for (key, value) in writes {
                tickets.push(store.entry(SUBSCRIPTION, key, Some(value)).await?);
            }
        }
        Ok(Subscribed { retained, tickets })
    }

    /// Unsubscribes; for each filter, whether a subscription existed.
    pub async fn unsubscribe(&self, handle: &SessionHandle, filters: &[Filter]) -> Vec<bool> {
        let mut out = Vec::with_capacity(filters.len());
        let mut removals = Vec::new();
        {
            let mut guard = self.state();
            let st = &mut *guard;
            let Some(entry) = st.sessions.get_mut(handle.id) else {
                return vec![false; filters.len()];
            };
            for filter in filters {
                let full = filter.full();
                let existed = entry.subscriptions.remove(&full).is_some();
                if existed {
                    st.tree.remove(filter, handle.id);
                    self.0.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
                    if entry.expiry > 0 {
                        removals.push(persist::subscription_key(&handle.client_id, &full));
                    }
                }
                out.push(existed);
            }
        }
        if let Some(store) = &self.0.store {
            for key in removals {
                let _ = store.entry_nowait(SUBSCRIPTION, key, None).await;
            }
        }
        out
    }

    /// Routes a message to every matching subscription (and keeps it as the topic's retained
    /// message when it has the retain flag). The tickets resolve once the deliveries to
    /// persistent sessions are durable.
    pub async fn publish(&self, msg: Message) -> Vec<Ticket> {
        let msg = Arc::new(msg);
        self.0.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        self.0
            .stats
            .bytes_in
            .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
        let mut routed: Vec<(Arc<SessionHandle>, Delivery)> = Vec::new();
        let mut writes = Vec::new();
        {
            let mut guard = self.state();
            let st = &mut *guard;
            if msg.retain {
                if msg.payload.is_empty() {
                    st.retained.remove(&msg.topic);
                } else {
                    st.retained.set(&msg.topic, msg.clone());
                }
                self.0
                    .stats
                    .retained
                    .store(st.retained.len() as u64, Ordering::Relaxed);
            }
            let mut matches = std::mem::take(&mut st.matches);
            let sessions = &st.sessions;
            st.tree.matches(
                &msg.topic,
                |id| sessions.get(id).is_some_and(|s| s.online()),
                &mut matches,
            );
            // Overlapping subscriptions of one session: one delivery, with the highest QoS and
            // every subscription identifier.
            matches.sort_by_key(|m| m.session);
            let mut i = 0;
            while i < matches.len() {
                let session = matches[i].session;
                let mut qos = None;
                let mut retain = false;
                let mut sub_ids = Vec::new();
                while i < matches.len() && matches[i].session == session {
                    let m = &matches[i];
                    i += 1;
                    if m.opts.no_local && !m.shared && msg.origin == Origin::Client(session) {
                        continue;
                    }
                    let q = msg.qos.min(m.opts.qos);
                    qos = Some(qos.map_or(q, |old: u8| old.max(q)));
                    retain |= m.opts.retain_as_published && msg.retain;
                    if let Some(id) = m.opts.id {
                        sub_ids.push(id);
                    }
                }
                let (Some(qos), Some(entry)) = (qos, st.sessions.get(session)) else {
                    continue;
                };
                let key = if qos > 0 && entry.expiry > 0 && self.0.store.is_some() {
                    let k = st.next_key;
                    st.next_key += 1;
                    Some(k)
                } else {
                    None
                };
                let d = Delivery {
                    msg: msg.clone(),
                    qos,
                    retain,
                    sub_ids,
                    key,
                    dup: false,
                    pid: 0,
                    released: false,
                };
                if let Some(k) = key {
                    writes.push((
                        persist::queued_key(&entry.handle.client_id, k),
                        persist::queued_value(&d),
                    ));
                }
                routed.push((entry.handle.clone(), d));
            }
            matches.clear();
            st.matches = matches;
        }
        let mut tickets = Vec::new();
        if let Some(store) = &self.0.store {
            for (key, value) in writes {
                match store.entry(QUEUED, key, Some(value)).await {
                    Ok(t) => tickets.push(t),
                    Err(_) => {
                        self.0
                            .stats
                            .persist_failures
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        for (handle, d) in routed {
            self.enqueue(&handle, d);
        }
        tickets
    }

    /// Puts a delivery on a session's queue, or drops it when the queue is full.
    fn enqueue(&self, handle: &SessionHandle, d: Delivery) {
        let size = d.size();
        let s = &self.0.settings;
        let total = self.0.queued_bytes.load(Ordering::Relaxed);
        // The wake key is read under the same lock as the push: a parked connection's is
        // given to the router's wake hook below, a served connection has none.
        let accepted = {
            let mut inner = lock(&handle.inner);
            let q = &mut inner.queue;
            if q.items.len() >= s.max_queued_messages
                || q.bytes + size > s.max_queued_bytes
                || total + size > s.max_total_queued_bytes
            {
                None
            } else {
                q.items.push_back(d.clone());
                q.bytes += size;
                Some(inner.wake)
            }
        };
        if let Some(wake) = accepted {
            self.0.queued_add(size);
            self.0.stats.queued_messages.fetch_add(1, Ordering::Relaxed);
            handle.changed.notify_waiters();
            if let Some(key) = wake {
                self.0.wake(key);
            }
        } else {
            let n = self.0.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    client_id = %handle.client_id,
                    dropped = n + 1,
                    "a session's queue is full: message dropped"
                );
            }
            self.0.forget(&handle.client_id, &d);
        }
    }

    /// Publishes the wills whose delay is over and ends sessions whose expiry is over.
    pub async fn tick(&self, now: Instant) {
        let mut wills = Vec::new();
        let mut removals = Vec::new();
        {
            let mut guard = self.state();
            let st = &mut *guard;
            let mut i = 0;
            while i < st.wills.len() {
                if st.wills[i].at <= now {
                    let will = st.wills.swap_remove(i);
                    wills.push((will.client_id, will.msg));
                } else {
                    i += 1;
                }
            }
            let expired: Vec<SessionId> = st
                .sessions
                .values()
                .filter(|e| {
                    !e.online()
                        && e.expiry != u32::MAX
                        && e.offline_since.is_some_and(|since| {
                            now.saturating_duration_since(since)
                                >= Duration::from_secs(u64::from(e.expiry))
                        })
                })
                .map(|e| e.handle.id)
                .collect();
            for id in expired {
                self.0
                    .stats
                    .sessions_expired
                    .fetch_add(1, Ordering::Relaxed);
                removals.extend(self.end_session(st, id));
            }
        }
        if let Some(store) = &self.0.store {
            for (space, key) in removals {
                let _ = store.entry_nowait(space, key, None).await;
            }
        }
        for (client_id, msg) in wills {
            self.publish_will(client_id, msg).await;
        }
    }

    /// Retained messages at start (from the store), in place before anyone connects.
    pub fn restore_retained(&self, messages: Vec<Message>) -> usize {
        let mut st = self.state();
        let n = messages.len();
        for m in messages {
            let topic = m.topic.clone();
            st.retained.set(&topic, Arc::new(m));
        }
        self.0
            .stats
            .retained
            .store(st.retained.len() as u64, Ordering::Relaxed);
        n
    }

    /// Persistent sessions at start (from the store): their subscriptions and queued
    /// deliveries. Returns how many sessions were restored.
    pub async fn restore_sessions(&self) -> Result<usize, StoreError> {
        let Some(store) = &self.0.store else {
            return Ok(0);
        };
        let sessions = store.entries(SESSION).await?;
        let subscriptions = store.entries(SUBSCRIPTION).await?;
        let queued = store.entries(QUEUED).await?;
        let inflight = store.entries(INFLIGHT).await?;
        // A delivery sent before: the packet id it was sent with.
        let inflight: HashMap<Vec<u8>, u16> = inflight
            .into_iter()
            .map(|(k, v)| (k, v.try_into().map_or(0, u16::from_be_bytes)))
            .collect();
        let mut stale = Vec::new();
        let n;
        {
            let mut guard = self.state();
            let st = &mut *guard;
            let now = Instant::now();
            for (key, value) in &sessions {
                let (Ok(client), Some(expiry)) =
                    (std::str::from_utf8(key), persist::parse_session(value))
                else {
                    stale.push((SESSION, key.clone()));
                    continue;
                };
                if st.sessions.id_of(client).is_some() {
                    stale.push((SESSION, key.clone()));
                    continue;
                }
                let made = st.sessions.insert(|id| SessionEntry {
                    handle: SessionHandle::new(id, client, true, &self.0),
                    subscriptions: Subscriptions::default(),
                    expiry,
                    // The time it was down counts from now: the relay cannot know how long it
                    // was off.
                    offline_since: Some(now),
                    generation: 0,
                });
                if made.is_none() {
                    stale.push((SESSION, key.clone()));
                    continue;
                }
                self.0
                    .stats
                    .sessions_offline
                    .fetch_add(1, Ordering::Relaxed);
            }
            for (key, value) in &subscriptions {
                let parsed = persist::split_key(key).and_then(|(client, filter)| {
                    let id = st.sessions.id_of(client)?;
                    let f = Filter::parse(std::str::from_utf8(filter).ok()?).ok()?;
                    let opts = persist::parse_subscription(value)?;
                    Some((id, f, opts))
                });
                let Some((id, filter, opts)) = parsed else {
                    stale.push((SUBSCRIPTION, key.clone()));
                    continue;
                };
                st.tree.insert(&filter, id, opts);
                if let Some(entry) = st.sessions.get_mut(id) {
                    entry.subscriptions.insert(filter.full(), (filter, opts));
                    self.0.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                }
            }
            let mut restored: Vec<(u64, SessionId, Delivery)> = Vec::new();
            for (key, value) in &queued {
                let parsed = persist::split_key(key).and_then(|(client, k)| {
                    let id = st.sessions.id_of(client)?;
                    let seq = u64::from_be_bytes(k.try_into().ok()?);
                    let (msg, qos, retain, sub_ids) = persist::parse_queued(value)?;
                    Some((id, seq, msg, qos, retain, sub_ids))
                });
                let Some((id, seq, msg, qos, retain, sub_ids)) = parsed else {
                    stale.push((QUEUED, key.clone()));
                    stale.push((INFLIGHT, key.clone()));
                    continue;
                };
                st.next_key = st.next_key.max(seq + 1);
                restored.push((
                    seq,
                    id,
                    Delivery {
                        msg: Arc::new(msg),
                        qos,
                        retain,
                        sub_ids,
                        key: Some(seq),
                        dup: inflight.contains_key(key),
                        pid: inflight.get(key).copied().unwrap_or(0),
                        released: false,
                    },
                ));
            }
            restored.sort_by_key(|(seq, _, _)| *seq);
            for (_, id, d) in restored {
                if let Some(entry) = st.sessions.get(id) {
                    let size = d.size();
                    let mut inner = lock(&entry.handle.inner);
                    let q = &mut inner.queue;
                    q.items.push_back(d);
                    q.bytes += size;
                    self.0.queued_add(size);
                    self.0.stats.queued_messages.fetch_add(1, Ordering::Relaxed);
                }
            }
            n = st.sessions.len();
        }
        for (space, key) in stale {
            store.entry_nowait(space, key, None).await?;
        }
        Ok(n)
    }

    /// The connections attached to sessions now ([`SessionHandle::attach`]), by client id.
    pub fn attachments(&self) -> Vec<(Arc<str>, Attachment)> {
        let st = self.state();
        st.sessions
            .values()
            .filter_map(|e| Some((e.handle.client_id.clone(), e.handle.attachment()?)))
            .collect()
    }

    /// Sessions known (online and offline).
    pub fn sessions(&self) -> usize {
        self.state().sessions.len()
    }
}

#[cfg(test)]
mod tests;
