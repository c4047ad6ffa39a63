//! Watches the local broker from the outside, the way a client meets it: every few seconds an
//! MQTT CONNECT with a fresh client id goes to each internal server (3.1.1 and 5), must get a
//! successful CONNACK, and is closed.
//!
//! The broker's tasks can fail in ways no loop of relaybox's own notices: rumqttd's router is a
//! thread that stops routing when it panics, and its server can stop accepting anybody for good
//! (see docs/ARCHITECTURE.md, Known limits). The probe covers both, since a CONNACK comes from
//! the router through the server. Its result is a heartbeat: it beats while probes pass (and
//! while one is under way, up to its timeout), and goes silent after [`ProbeTiming::failures`]
//! failures in a row, so that the systemd watchdog restarts the relay.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Version};
use crate::liveness::Heartbeat;

/// A probe that did not get in.
#[derive(Debug, thiserror::Error)]
#[error("the internal MQTT {version} server on {addr} did not let a probe in: {reason}")]
pub struct ProbeError {
    version: &'static str,
    addr: SocketAddr,
    reason: String,
}

/// How often and how patiently the broker is probed.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTiming {
    /// Between two probes that passed.
    pub every: Duration,
    /// Between a failed probe and the next.
    pub retry_after: Duration,
    /// How long one server may take to answer.
    pub timeout: Duration,
    /// Failed probes in a row after which the heartbeat goes silent.
    pub failures: u32,
}

impl Default for ProbeTiming {
    fn default() -> ProbeTiming {
        ProbeTiming {
            every: Duration::from_secs(5),
            retry_after: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            failures: 3,
        }
    }
}

/// What the probes found, for `/metrics` and `/status`.
#[derive(Debug)]
pub struct ProbeStats {
    /// Probes that failed since the relay started.
    pub failures: AtomicU64,
    /// Whether the last probe passed (true until the first one says otherwise).
    pub answering: AtomicBool,
}

impl Default for ProbeStats {
    fn default() -> ProbeStats {
        ProbeStats {
            failures: AtomicU64::new(0),
            answering: AtomicBool::new(true),
        }
    }
}

/// The addresses of the internal servers, to probe them.
#[derive(Debug, Clone, Copy)]
pub struct Prober {
    servers: [(Version, SocketAddr); 2],
}

impl Prober {
    pub fn new(broker: &Broker) -> Prober {
        Prober {
            servers: [
                (Version::V4, broker.server_for(Version::V4)),
                (Version::V5, broker.server_for(Version::V5)),
            ],
        }
    }

    /// Lets one probe into each internal server, each allowed `timeout`.
    pub async fn probe(&self, timeout: Duration) -> Result<(), ProbeError> {
        for (version, addr) in self.servers {
            let error = |reason: String| ProbeError {
                version: match version {
                    Version::V4 => "3.1.1",
                    Version::V5 => "5",
                },
                addr,
                reason,
            };
            match tokio::time::timeout(timeout, exchange(version, addr)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(error(e.to_string())),
                Err(_) => return Err(error(format!("no answer within {timeout:?}"))),
            }
        }
        Ok(())
    }
}

/// CONNECT, CONNACK, close.
async fn exchange(version: Version, addr: SocketAddr) -> std::io::Result<()> {
    let id = format!("relaybox-probe-{:016x}", rand::random::<u64>());
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&connect(version, &id)).await?;
    // CONNACK: type 2, a one-byte remaining length (MQTT 5 properties of a CONNACK without a
    // reason string stay well under 128 bytes), session present, then the return / reason code.
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let mut body = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut body).await?;
    match (head[0], body.get(1)) {
        (0x20, Some(0)) if head[1] < 0x80 => {}
        _ => {
            return Err(std::io::Error::other(format!(
                "answered {:02x?} instead of a successful CONNACK",
                [&head[..], &body[..]].concat()
            )))
        }
    }
    // Closed without DISCONNECT: rumqttd reports a client's DISCONNECT to its router and then
    // the closed connection once more, and that second report can end a new connection that
    // was given the same connection slot in between (an in-process link made at start-up, say).
    // A bare close is reported once; the probe has no will and a clean session, so nothing
    // else follows from it.
    drop(stream);
    Ok(())
}

/// A CONNECT with clean session / clean start, keep-alive 60 s and client id `id` (short
/// ASCII).
pub(crate) fn connect(version: Version, id: &str) -> Vec<u8> {
    let level = match version {
        Version::V4 => 4,
        Version::V5 => 5,
    };
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x3c];
    if version == Version::V5 {
        body.push(0x00); // no properties
    }
    // The id is short ASCII: its length fits in the low byte, and the packet in one length byte.
    body.extend_from_slice(&[0x00, id.len() as u8]);
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// Probes the broker until `shutdown`, beating `heartbeat` while it answers and counting in
/// `stats`.
pub async fn watch(
    prober: Prober,
    timing: ProbeTiming,
    heartbeat: Heartbeat,
    stats: Arc<ProbeStats>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    let mut pause = timing.every;
    loop {
        let beating = failures < timing.failures;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = beating_if(&heartbeat, beating, tokio::time::sleep(pause)) => {}
        }
        // Once silent, the heartbeat stays silent until a probe passes.
        let silent = !beating;
        let probe = beating_if(&heartbeat, !silent, prober.probe(timing.timeout));
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = probe => r,
        };
        stats.answering.store(result.is_ok(), Ordering::Relaxed);
        pause = match result {
            Ok(()) => {
                if silent {
                    tracing::info!("the local broker answers again");
                }
                heartbeat.beat();
                failures = 0;
                timing.every
            }
            Err(error) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                failures = failures.saturating_add(1);
                if failures < timing.failures {
                    tracing::warn!(%error, failures, "local broker probe failed");
                } else if failures == timing.failures {
                    tracing::error!(
                        %error,
                        failures,
                        "the local broker does not let clients in; its heartbeat stops"
                    );
                }
                timing.retry_after
            }
        };
    }
}

/// Runs `work`, with `heartbeat` beating while it runs if `beating`.
async fn beating_if<F: Future>(heartbeat: &Heartbeat, beating: bool, work: F) -> F::Output {
    if beating {
        heartbeat.beat_while(work).await
    } else {
        work.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerSettings;
    use crate::liveness::Liveness;
    use std::time::Instant;

    fn fast() -> ProbeTiming {
        ProbeTiming {
            every: Duration::from_millis(50),
            retry_after: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            failures: 2,
        }
    }

    async fn broker() -> Broker {
        Broker::start(&BrokerSettings {
            max_packet_size: 4096,
            max_inflight: 10,
        })
        .await
        .expect("broker starts")
    }

    #[tokio::test]
    async fn a_running_broker_lets_probes_in_again_and_again() {
        let broker = broker().await;
        let prober = Prober::new(&broker);
        for _ in 0..20 {
            prober
                .probe(Duration::from_secs(5))
                .await
                .expect("probe passes");
        }
    }

    #[tokio::test]
    async fn a_server_that_closes_or_stays_silent_fails_the_probe() {
        let broker = broker().await;
        let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (closing_addr, silent_addr) =
            (closing.local_addr().unwrap(), silent.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((stream, _)) = closing.accept().await {
                drop(stream);
            }
        });
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        });
        let v4 = broker.server_for(Version::V4);
        let mut prober = Prober::new(&broker);
        let timeout = Duration::from_millis(300);
        prober.servers = [(Version::V4, v4), (Version::V5, closing_addr)];
        let error = prober.probe(timeout).await.unwrap_err().to_string();
        assert!(error.contains("MQTT 5 server"), "{error}");
        prober.servers = [(Version::V4, silent_addr), (Version::V5, closing_addr)];
        let started = Instant::now();
        let error = prober.probe(timeout).await.unwrap_err().to_string();
        assert!(
            error.contains("3.1.1") && error.contains("no answer"),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn the_heartbeat_goes_silent_only_while_the_broker_fails() {
        let broker = broker().await;
        let liveness = Liveness::new();
        let heartbeat = liveness.heartbeat("local broker");
        let shutdown = CancellationToken::new();
        let mut prober = Prober::new(&broker);
        let good = prober.servers;
        let stats = Arc::new(ProbeStats::default());
        let run = |prober, heartbeat| {
            tokio::spawn(watch(
                prober,
                fast(),
                heartbeat,
                stats.clone(),
                shutdown.clone(),
            ))
        };
        let task = run(prober, heartbeat.clone());
        let limit = Duration::from_millis(400);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(liveness.stalled(Instant::now(), limit).is_empty());
        assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
        task.abort();

        // Both servers gone: a port nothing listens on.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        prober.servers = [(Version::V4, dead), (Version::V5, dead)];
        let task = run(prober, heartbeat.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!stats.answering.load(Ordering::Relaxed));
        assert!(stats.failures.load(Ordering::Relaxed) >= 2);
        let stalled = liveness.stalled(Instant::now(), limit);
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].name, "local broker");
        task.abort();

        // Back: it beats again.
        prober.servers = good;
        let task = run(prober, heartbeat);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(liveness.stalled(Instant::now(), limit).is_empty());
        assert!(stats.answering.load(Ordering::Relaxed));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the watch ends at shutdown")
            .expect("no panic");
    }
}
