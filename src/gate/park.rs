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

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::client::Resume;

/// How long a connection must be quiet before it parks.
pub const PARK_AFTER: Duration = Duration::from_secs(1);
/// The same for a client that has sent nothing since its CONNECT.
pub const PARK_FIRST: Duration = Duration::from_millis(50);

/// The parker's own token (its command channel).
const COMMANDS: Token = Token(usize::MAX);

/// After a burst of parking (this many connections), once no connection has parked for
/// [`TRIM_QUIET`], the allocator gives its free pages back to the system — at most every
/// [`TRIM_EVERY`]. The tasks the connections left are freed, but an allocator keeps what it
/// freed: without this the RSS would stay at the height of the burst.
const TRIM_AFTER_PARKS: u64 = 64;
const TRIM_QUIET: Duration = Duration::from_millis(200);
const TRIM_EVERY: Duration = Duration::from_secs(10);

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
            own: tx.clone(),
            waker: waker.clone(),
            entries: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_id: 0,
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

struct Entry {
    parked: Parked,
    deadline: Option<Instant>,
}

struct Thread {
    poll: Poll,
    commands: mpsc::Receiver<Command>,
    /// For the wake hooks given to the sessions.
    own: mpsc::Sender<Command>,
    waker: Arc<Waker>,
    entries: HashMap<u64, Entry>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_id: u64,
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
            let mut timeout = self
                .deadlines
                .first()
                .map(|(at, _)| at.saturating_duration_since(now));
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
                    ready.push(event.token().0 as u64);
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
                        if self.entries.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            let now = Instant::now();
            while let Some(&(at, id)) = self.deadlines.first() {
                if at > now {
                    break;
                }
                self.unpark(id);
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

    fn park(&mut self, p: Parked) {
        if self.stopping {
            self.spawn(p);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let fd = p.stream.as_raw_fd();
        if let Err(error) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(id as usize),
            Interest::READABLE,
        ) {
            tracing::warn!(%error, "a connection cannot be parked; it keeps its task");
            self.spawn(p);
            return;
        }
        let deadline = p.state.deadline();
        if let Some(at) = deadline {
            self.deadlines.insert((at, id));
        }
        // The hook is armed after the entry is in place; a delivery or take-over that came
        // before it is seen by `arm`, which then says to wake at once.
        let own = self.own.clone();
        let waker = self.waker.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if own.send(Command::Wake(id)).is_ok() {
                let _ = waker.wake();
            }
        });
        let wake_now = p.state.arm(wake);
        self.entries.insert(
            id,
            Entry {
                parked: p,
                deadline,
            },
        );
        self.parked.fetch_add(1, Ordering::Relaxed);
        self.parks_since_trim += 1;
        self.last_park = Instant::now();
        if wake_now {
            self.unpark(id);
        }
    }

    fn unpark(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        self.parked.fetch_sub(1, Ordering::Relaxed);
        if let Some(at) = entry.deadline {
            self.deadlines.remove(&(at, id));
        }
        let fd = entry.parked.stream.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        entry.parked.state.disarm();
        self.spawn(entry.parked);
    }

    fn resume_all(&mut self) {
        let ids: Vec<u64> = self.entries.keys().copied().collect();
        for id in ids {
            self.unpark(id);
        }
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
        let size = std::mem::size_of::<Resume>() + std::mem::size_of::<Entry>();
        println!("a parked connection: {size} bytes");
        assert!(size <= 400, "{size} bytes");
    }
}
