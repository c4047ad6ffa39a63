//! A TCP proxy on 127.0.0.1 that injects link faults between a relay and its hub: connections
//! reset, new connections refused, bytes held back (a partition: nothing passes until it heals,
//! as TCP retransmits), delayed (latency), or now and then held up (a lost segment that TCP
//! sends again after its retransmission timeout, with everything behind it waiting).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the link does now.
#[derive(Debug, Clone, Default)]
struct Faults {
    /// Nothing passes either way (bytes are kept and pass when it heals).
    stalled: bool,
    /// Every chunk waits this long (both ways).
    delay: Duration,
    /// The share of chunks held up 200–400 ms, with everything behind them.
    loss: f64,
    /// New connections are reset at once.
    refusing: bool,
    /// Bumped to reset every open connection.
    generation: u64,
}

pub struct FaultProxy {
    pub port: u16,
    faults: watch::Sender<Faults>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a fresh port forwarding to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (faults, rx) = watch::channel(Faults::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                tokio::spawn(relay_connection(client, upstream, rx.clone(), seed));
            }
        });
        FaultProxy {
            port,
            faults,
            accepted,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Resets (RST) every open connection.
    pub fn reset(&self) {
        self.faults.send_modify(|f| f.generation += 1);
    }

    /// A partition: nothing passes while `on`.
    pub fn stall(&self, on: bool) {
        self.faults.send_modify(|f| f.stalled = on);
    }

    pub fn delay(&self, delay: Duration) {
        self.faults.send_modify(|f| f.delay = delay);
    }

    pub fn loss(&self, share: f64) {
        self.faults.send_modify(|f| f.loss = share);
    }

    /// New connections are reset at once while `on`.
    pub fn refuse(&self, on: bool) {
        self.faults.send_modify(|f| f.refusing = on);
    }

    /// Back to a clean link (open connections stay).
    pub fn heal(&self) {
        self.faults.send_modify(|f| {
            let generation = f.generation;
            *f = Faults {
                generation,
                ..Faults::default()
            };
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}

async fn relay_connection(
    client: TcpStream,
    upstream: u16,
    faults: watch::Receiver<Faults>,
    seed: u64,
) {
    // Every close is a reset: the peers see a broken link, not an orderly end. (A zero linger
    // never blocks the thread that drops the socket; only a lingering one would.)
    #[allow(deprecated)]
    let _ = client.set_linger(Some(Duration::ZERO));
    if faults.borrow().refusing {
        return;
    }
    let generation = faults.borrow().generation;
    let Ok(Ok(server)) = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", upstream)),
    )
    .await
    else {
        return;
    };
    #[allow(deprecated)]
    let _ = server.set_linger(Some(Duration::ZERO));
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let mut reset = faults.clone();
    tokio::select! {
        _ = pipe(client_r, server_w, faults.clone(), seed) => {}
        _ = pipe(server_r, client_w, faults, seed ^ 0xA5A5_A5A5) => {}
        _ = reset.wait_for(|f| f.generation != generation) => {}
    }
}

/// Copies `from` to `to` through the faults, until either side ends.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    faults: watch::Receiver<Faults>,
    mut seed: u64,
) {
    let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let delays = faults.clone();
    let reader = async move {
        loop {
            let mut buf = vec![0u8; 16 * 1024];
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    let due = Instant::now() + delays.borrow().delay;
                    if queue.send((due, buf)).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut faults = faults;
        while let Some((due, buf)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if faults.wait_for(|f| !f.stalled).await.is_err() {
                break;
            }
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let loss = faults.borrow().loss;
            if loss > 0.0 && (seed % 1000) as f64 / 1000.0 < loss {
                tokio::time::sleep(Duration::from_millis(200 + seed % 200)).await;
            }
            if to.write_all(&buf).await.is_err() {
                break;
            }
        }
    };
    // Whichever ends first ends the copy (a reader at its end, or a writer whose peer is gone).
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}
