//! Parked connections. A plain-TCP client that has been quiet for [`PARK_AFTER`], with nothing
//! buffered either way and no publish pipeline, leaves its task: its socket and protocol state
//! wait in the parker, one thread polling all of them with epoll (mio), until
//! - the client sends something (or closes),
//! - a delivery or a take-over comes for its session (the router calls the session's wake hook),
//! - its keep-alive runs out, or
//! - the relay stops.
//!
//! Then the parker hands the connection back to the runtime, where a task goes on serving it
//! exactly where it left off. A waiting connection thus costs its protocol state and a socket,
//! not a task with its futures, timers and reactor registration (docs/BENCHMARKS.md: idle
//! connections).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::client::Resume;
use crate::broker::router::Wake;
use crate::slots::Slots;

/// How long a connection must be quiet before it parks.
pub const PARK_AFTER: Duration = Duration::from_secs(1);
/// The same for a client that has sent nothing since its CONNECT: about a round trip on the
/// office network, so that a client that subscribes as soon as it has its CONNACK is served
/// without parking, and one that only waits leaves its task almost at once. How many connections
/// hold a task at a time in a burst of CONNECTs follows from it, and with them how much freed
/// memory the burst leaves between the ones that stay: 10,000 idle connections cost 1.03 KiB each
/// at 50 ms, 0.86 at 10 ms, 0.82 at 2 ms and 0.80 at 0 (docs/BENCHMARKS.md: idle connections).
pub const PARK_FIRST: Duration = Duration::from_millis(2);

/// The parker's own token (its command channel).
const COMMANDS: Token = Token(usize::MAX);

/// After a burst of parking (this many connections), once no connection has parked for
/// [`TRIM_QUIET`], the allocator gives its free pages back to the system — at most every
/// [`TRIM_EVERY`]. The tasks the connections left are freed, but an allocator keeps what it
/// freed: without this the RSS would stay at the height of the burst. A trim walks the heap's
/// free chunks under the allocator's lock (well under a millisecond for tens of MiB); once a
/// second bounds that cost, and is soon enough that a trim during a burst does not leave the
/// end of the burst untrimmed for long (at 10 s, the idle bench read 1.48–2.02 KiB per
/// connection two seconds after the burst, against 1.27–1.31 twelve seconds after).
const TRIM_AFTER_PARKS: u64 = 64;
const TRIM_QUIET: Duration = Duration::from_millis(200);
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// A connection handed to the parker.
pub(super) struct Parked {
    pub stream: std::net::TcpStream,
    pub state: Box<Resume>,
}

enum Command {
    Park(Parked),
    Wake(u64),
    Shutdown,
}

/// The handle connections park through; the thread ends when the last handle is dropped.
pub(super) struct Parker {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    parked: Arc<AtomicU64>,
    hook: Arc<Hook>,
}

impl Parker {
    /// Starts the parker thread; parked connections are resumed on `runtime` by `resume`.
    pub fn start(
        runtime: tokio::runtime::Handle,
        resume: fn(Parked) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) -> std::io::Result<Parker> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), COMMANDS)?);
        let (tx, rx) = mpsc::channel();
        let parked = Arc::new(AtomicU64::new(0));
        let thread = Thread {
            poll,
            commands: rx,
            slots: Slots::default(),
            deadlines: BinaryHeap::new(),
            stopping: false,
            parks_since_trim: 0,
            last_park: Instant::now(),
            last_trim: None,
            runtime,
            resume,
            parked: parked.clone(),
        };
        std::thread::Builder::new()
            .name("relaybox-parker".into())
            .spawn(move || thread.run())?;
        Ok(Parker {
            hook: Arc::new(Hook {
                commands: tx.clone(),
                waker: waker.clone(),
            }),
            commands: tx,
            waker,
            parked,
        })
    }

    /// Parks a connection. If the parker is gone, the connection is resumed at once.
    pub fn park(&self, p: Parked) -> Result<(), Parked> {
        match self.commands.send(Command::Park(p)) {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(mpsc::SendError(Command::Park(p))) => Err(p),
            Err(_) => Ok(()),
        }
    }

    /// Resumes every parked connection and bounces any that parks from now on.
    pub fn shutdown(&self) {
        if self.commands.send(Command::Shutdown).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// The hook that wakes a parked connection by its key, for the router
    /// ([`crate::broker::router::Router::set_wake_hook`]).
    pub fn wake_hook(&self) -> Arc<dyn Wake> {
        self.hook.clone()
    }

    /// Connections parked now.
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }
}

impl Drop for Parker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The wake hook of parked connections: the router holds it, one for all of them, and a
/// session whose connection is parked holds the connection's key.
struct Hook {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

impl Wake for Hook {
    fn wake(&self, key: u64) {
        if self.commands.send(Command::Wake(key)).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// A parked connection as its slot holds it.
struct Waiting {
    stream: std::net::TcpStream,
    state: Resume,
}

struct Thread {
    poll: Poll,
    commands: mpsc::Receiver<Command>,
    /// The parked connections: a connection's key is its slot's key (and the slot's index its
    /// poll token), so that a wake meant for a connection that has left finds nobody, not the
    /// connection that took its slot. Its state lives in the slot by value: a parked
    /// connection costs its slot and no allocation of its own.
    slots: Slots<Waiting>,
    /// Keep-alive deadlines, soonest first. An entry whose connection has left stays until it
    /// comes up (or the heap is compacted): it then finds no connection under its key.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    stopping: bool,
    parks_since_trim: u64,
    last_park: Instant,
    last_trim: Option<Instant>,
    runtime: tokio::runtime::Handle,
    resume: fn(Parked) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    parked: Arc<AtomicU64>,
}

impl Thread {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let now = Instant::now();
            self.drop_stale_deadlines();
            let mut timeout = self
                .deadlines
                .peek()
                .map(|Reverse((at, _))| at.saturating_duration_since(now));
            if let Some(at) = self.trim_at() {
                let wait = at.saturating_duration_since(now);
                timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
            }
            if let Err(error) = self.poll.poll(&mut events, timeout) {
                if error.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(%error, "the connection parker cannot poll; resuming every parked connection");
                    self.stopping = true;
                    self.resume_all();
                    return;
                }
            }
            let mut ready = Vec::new();
            for event in events.iter() {
                if event.token() != COMMANDS {
                    if let Some(key) = self.slots.key_at(event.token().0) {
                        ready.push(key);
                    }
                }
            }
            for id in ready {
                self.unpark(id);
            }
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Park(p)) => self.park(p),
                    Ok(Command::Wake(id)) => self.unpark(id),
                    Ok(Command::Shutdown) => {
                        self.stopping = true;
                        self.resume_all();
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    // Every handle is gone (the gate was dropped): nothing can park any more.
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.slots.len() == 0 {
                            return;
                        }
                        break;
                    }
                }
            }
            let now = Instant::now();
            while let Some(&Reverse((at, key))) = self.deadlines.peek() {
                if at > now {
                    break;
                }
                self.deadlines.pop();
                self.unpark(key);
            }
            if self.trim_at().is_some_and(|at| at <= now) {
                give_back_free_memory();
                self.parks_since_trim = 0;
                self.last_trim = Some(now);
            }
        }
    }

    /// When the allocator should give back what the parked connections' tasks left, if a
    /// burst of parking calls for it.
    fn trim_at(&self) -> Option<Instant> {
        if self.parks_since_trim < TRIM_AFTER_PARKS {
            return None;
        }
        let quiet = self.last_park + TRIM_QUIET;
        Some(match self.last_trim {
            Some(t) => quiet.max(t + TRIM_EVERY),
            None => quiet,
        })
    }

    /// Drops deadlines of connections that have left from the top of the heap, and compacts
    /// the heap when most of it is such.
    fn drop_stale_deadlines(&mut self) {
        while let Some(&Reverse((at, key))) = self.deadlines.peek() {
            if self.is_due(at, key) {
                break;
            }
            self.deadlines.pop();
        }
        if self.deadlines.len() > 2 * self.slots.len() + 1024 {
            let mut deadlines = std::mem::take(&mut self.deadlines);
            deadlines.retain(|Reverse((at, key))| self.is_due(*at, *key));
            self.deadlines = deadlines;
        }
    }

    /// Whether `key` is parked with deadline `at`.
    fn is_due(&self, at: Instant, key: u64) -> bool {
        self.slots
            .get(key)
            .is_some_and(|w| w.state.deadline() == Some(at))
    }

    fn park(&mut self, p: Parked) {
        if self.stopping {
            self.spawn(p);
            return;
        }
        let Some((index, key)) = self.slots.vacant() else {
            tracing::warn!("the connection parker is full; the connection keeps its task");
            self.spawn(p);
            return;
        };
        let fd = p.stream.as_raw_fd();
        if let Err(error) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(index as usize),
            Interest::READABLE,
        ) {
            tracing::warn!(%error, "a connection cannot be parked; it keeps its task");
            self.spawn(p);
            return;
        }
        if let Some(at) = p.state.deadline() {
            self.deadlines.push(Reverse((at, key)));
        }
        // The hook is armed after the connection is in its slot; a delivery or take-over that
        // came before it is seen by `arm`, which then says to wake at once.
        self.slots.fill(
            index,
            Waiting {
                stream: p.stream,
                state: *p.state,
            },
        );
        let wake_now = self.slots.get(key).is_some_and(|w| w.state.arm(key));
        self.parked.fetch_add(1, Ordering::Relaxed);
        self.parks_since_trim += 1;
        self.last_park = Instant::now();
        if wake_now {
            self.unpark(key);
        }
    }

    fn unpark(&mut self, key: u64) {
        let Some(Waiting { stream, state }) = self.slots.take(key) else {
            return;
        };
        let parked = Parked {
            stream,
            state: Box::new(state),
        };
        self.parked.fetch_sub(1, Ordering::Relaxed);
        let fd = parked.stream.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        parked.state.disarm();
        self.spawn(parked);
    }

    fn resume_all(&mut self) {
        for key in self.slots.keys() {
            self.unpark(key);
        }
        self.deadlines.clear();
    }

    fn spawn(&self, p: Parked) {
        self.runtime.spawn((self.resume)(p));
    }
}

/// Asks glibc's allocator to return its free pages to the system (`malloc_trim`); nothing
/// elsewhere.
fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks and only releases pages that hold no
    // allocation; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_connection_is_small() {
        // The protocol state and the socket: what a quiet connection costs (plus the heap its
        // state points to: client id, user name, session handle; nothing for an idle one).
        let size = std::mem::size_of::<Option<Waiting>>() + std::mem::size_of::<u32>();
        println!("a parked connection: {size} bytes");
        assert!(size <= 400, "{size} bytes");
    }
}
