//! A private Redis Cluster per test: `redis-server` processes in cluster mode
//! on free ports, joined with `redis-cli --cluster create`, that a test can
//! fail over (SIGKILL a master, wait for its replica's promotion) and
//! reshard (move a slot with its keys to another master) while it runs.

use crate::launch::{Launch, Owner};
use crate::process::ChildGuard;
use crate::redis::{launch, server_path};
use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Cluster bus ports are the client port + 10000, so client ports stay below
/// this (the kernel may hand out ephemeral ports above it).
pub const MAX_CLIENT_PORT: u16 = 55535;
/// The slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// How long a fresh cluster may take until every node reports `ok`.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica may take to be promoted after its master was killed
/// (node timeout 1 s: a few seconds on a loaded machine).
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys moved per `MIGRATE` while resharding.
const MIGRATE_BATCH: usize = 100;
/// `MIGRATE`'s timeout, in ms.
const MIGRATE_TIMEOUT_MS: u64 = 5000;
/// How long one command to a node may take in the test bed's own checks.
const NODE_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// `n` distinct ports of 127.0.0.1 below [`MAX_CLIENT_PORT`] whose cluster
/// bus port (+10000) was free a moment ago too. Like [`crate::free_port`],
/// another process may take one before the server binds it; starting the
/// cluster retries with new ports then.
pub fn free_cluster_ports(n: usize) -> std::io::Result<Vec<u16>> {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut ports: Vec<u16> = Vec::with_capacity(n);
    let mut held = Vec::new();
    for _ in 0..10_000 {
        if ports.len() == n {
            return Ok(ports);
        }
        let port: u16 = rng.random_range(20_000..=MAX_CLIENT_PORT);
        if ports.contains(&port) || ports.contains(&(port + 10_000)) {
            continue;
        }
        // Both held until all are chosen, so no two picks collide.
        let (Ok(client), Ok(bus)) = (
            TcpListener::bind(("127.0.0.1", port)),
            TcpListener::bind(("127.0.0.1", port + 10_000)),
        ) else {
            continue;
        };
        held.push((client, bus));
        ports.push(port);
    }
    Err(std::io::Error::other(format!(
        "found only {} of {n} free port pairs below {MAX_CLIENT_PORT}",
        ports.len()
    )))
}

/// The slot of `key`, computed as Redis does (CRC16/XMODEM of the key, or of
/// its hash tag: the part between the first `{` and the next `}`, if not
/// empty), mod 16384. Checked against `CLUSTER KEYSLOT` in the tests below.
pub fn key_slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    crc16_xmodem(hashed) % SLOTS
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in data {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// `redis-cli`: beside `$REDIS_SERVER` if there is one, else from `PATH`.
pub fn cli_path() -> PathBuf {
    let server = server_path();
    let beside = server.with_file_name("redis-cli");
    if server.is_absolute() && beside.is_file() {
        beside
    } else {
        PathBuf::from("redis-cli")
    }
}

/// One node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges it serves (inclusive), for a master.
    pub slots: Vec<(u16, u16)>,
}

impl NodeInfo {
    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Flagged failing (`fail` or `fail?`) or without an address.
    pub fn is_failing(&self) -> bool {
        self.flags
            .iter()
            .any(|f| f == "fail" || f == "fail?" || f == "noaddr")
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// Parses the output of `CLUSTER NODES`.
pub fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let address = fields[1].split(['@', ',']).next()?;
            let port = address.rsplit_once(':')?.1.parse().ok()?;
            let slots = fields[8..]
                .iter()
                // `[slot->-id]` / `[slot-<-id]`: a slot being migrated.
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => {
                        let slot = s.parse().ok()?;
                        Some((slot, slot))
                    }
                })
                .collect();
            Some(NodeInfo {
                id: fields[0].to_owned(),
                port,
                flags: fields[2].split(',').map(str::to_owned).collect(),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            })
        })
        .collect()
}

/// A Redis Cluster of the test's own: `masters` masters with
/// `replicas_per_master` replicas each, on 127.0.0.1, without persistence.
/// Every node is killed when it drops, and its directory (node configs and
/// logs) removed, unless a test is failing.
///
/// Shared by reference: a test kills a master while its workload goes on.
pub struct TestRedisCluster {
    /// Node processes by client port; a killed node's entry is gone.
    nodes: Mutex<BTreeMap<u16, ChildGuard>>,
    /// Every port the cluster was created with (killed nodes too).
    ports: Vec<u16>,
    /// Per killed master, the replica that was to take over.
    successors: Mutex<HashMap<u16, u16>>,
    dir: PathBuf,
}

impl TestRedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node says
    /// `cluster_state:ok` with all slots assigned and every replica is in
    /// sync with its master. Retries on new ports if a port was taken in the
    /// meantime. Panics if no cluster forms.
    pub async fn start(masters: usize, replicas_per_master: usize) -> Self {
        assert!(masters >= 3, "Redis Cluster needs at least 3 masters");
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(masters, replicas_per_master).await {
                Ok(cluster) => return cluster,
                Err(err) => last = err,
            }
        }
        panic!("could not start a Redis Cluster: {last}");
    }

    async fn try_start(masters: usize, replicas_per_master: usize) -> Result<Self, String> {
        let count = masters * (1 + replicas_per_master);
        let ports = free_cluster_ports(count).map_err(|err| err.to_string())?;
        let dir =
            std::env::temp_dir().join(format!("redis-cluster-{}-{}", std::process::id(), ports[0]));
        let cluster = Self {
            nodes: Mutex::default(),
            ports: ports.clone(),
            successors: Mutex::default(),
            dir,
        };
        let server = server_path();
        let mut starting = Vec::new();
        for &port in &ports {
            let node = node_launch(&server, port, &cluster.dir).map_err(|e| e.to_string())?;
            starting.push((port, node.spawn(Owner::Attached)?));
        }
        for (port, node) in starting {
            let child = node.ready().await?.into_child();
            if let Some(child) = child {
                cluster.nodes().insert(port, child);
            }
        }
        cluster.create(replicas_per_master).await?;
        cluster.wait_formed(FORM_TIMEOUT).await?;
        Ok(cluster)
    }

    /// `redis-cli --cluster create`.
    async fn create(&self, replicas_per_master: usize) -> Result<(), String> {
        let mut command = tokio::process::Command::new(cli_path());
        command.args(["--cluster", "create"]);
        command.args(self.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        command.args([
            "--cluster-replicas",
            &replicas_per_master.to_string(),
            "--cluster-yes",
        ]);
        command.stdin(std::process::Stdio::null());
        let output = tokio::time::timeout(FORM_TIMEOUT, command.output())
            .await
            .map_err(|_| format!("redis-cli --cluster create took over {FORM_TIMEOUT:?}"))?
            .map_err(|err| format!("cannot run {}: {err}", cli_path().display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "redis-cli --cluster create failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Until every live node reports `cluster_state:ok`, all slots assigned
    /// and ok, every node known, and each replica's link to its master up.
    async fn wait_formed(&self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let problem = self.formation_problem().await;
            match problem {
                None => return Ok(()),
                Some(problem) if started.elapsed() >= timeout => {
                    return Err(format!("cluster not ready after {timeout:?}: {problem}"));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// What keeps the cluster from being ready, `None` when it is.
    async fn formation_problem(&self) -> Option<String> {
        for port in self.live_ports() {
            let info = match node_command::<String>(port, redis::cmd("CLUSTER").arg("INFO")).await {
                Ok(info) => info,
                Err(err) => return Some(format!("node {port}: {err}")),
            };
            for (field, want) in [
                ("cluster_state", "ok".to_owned()),
                ("cluster_slots_assigned", SLOTS.to_string()),
                ("cluster_slots_ok", SLOTS.to_string()),
            ] {
                let have = info_field(&info, field);
                if have != Some(want.as_str()) {
                    return Some(format!("node {port}: {field} is {have:?}"));
                }
            }
            let known: usize = info_field(&info, "cluster_known_nodes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if known < self.ports.len() {
                return Some(format!("node {port} knows {known} nodes"));
            }
            let replication =
                match node_command::<String>(port, redis::cmd("INFO").arg("replication")).await {
                    Ok(info) => info,
                    Err(err) => return Some(format!("node {port}: {err}")),
                };
            if info_field(&replication, "role") == Some("slave")
                && info_field(&replication, "master_link_status") != Some("up")
            {
                return Some(format!("replica {port}: link to its master is not up"));
            }
        }
        None
    }

    /// `127.0.0.1:p1,127.0.0.1:p2,…`: every node the cluster was created
    /// with (the `REDIS_CLUSTER_NODES` value).
    pub fn seeds(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client ports of every node the cluster was created with.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Client ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes().keys().copied().collect()
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, ChildGuard>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The topology as a live node sees it.
    pub async fn topology(&self) -> Vec<NodeInfo> {
        let mut last = String::new();
        for port in self.live_ports() {
            match node_command::<String>(port, redis::cmd("CLUSTER").arg("NODES")).await {
                Ok(text) => return parse_nodes(&text),
                Err(err) => last = format!("node {port}: {err}"),
            }
        }
        panic!("no node answers CLUSTER NODES: {last}");
    }

    /// Ports of the masters (not failing), ascending.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .topology()
            .await
            .iter()
            .filter(|n| n.is_master() && !n.is_failing() && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The port of a (live) replica of `master`.
    pub async fn replica_of(&self, master: u16) -> Option<u16> {
        let topology = self.topology().await;
        let id = &topology.iter().find(|n| n.port == master)?.id;
        topology
            .iter()
            .filter(|n| n.master_id.as_ref() == Some(id) && !n.is_failing())
            .map(|n| n.port)
            .min()
    }

    /// The port of the master serving `slot`.
    pub async fn master_of_slot(&self, slot: u16) -> u16 {
        self.topology()
            .await
            .iter()
            .find(|n| n.is_master() && !n.is_failing() && n.serves(slot))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// `CLUSTER KEYSLOT key`.
    pub async fn key_slot(&self, key: &str) -> u16 {
        let port = *self.live_ports().first().expect("a live node");
        node_command(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
            .unwrap_or_else(|err| panic!("CLUSTER KEYSLOT {key}: {err}"))
    }

    /// The port of the master serving `key`.
    pub async fn master_of_key(&self, key: &str) -> u16 {
        self.master_of_slot(self.key_slot(key).await).await
    }

    /// Kills master `port` (SIGKILL), after noting which replica is to take
    /// over ([`TestRedisCluster::wait_promoted`]). Panics if it is not a
    /// master with a replica.
    pub async fn kill_master(&self, port: u16) {
        let replica = self
            .replica_of(port)
            .await
            .unwrap_or_else(|| panic!("{port} is not a master with a live replica"));
        self.successors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(port, replica);
        let child = self.nodes().remove(&port);
        child
            .unwrap_or_else(|| panic!("node {port} is not running"))
            .kill9();
    }

    /// Waits until the replica of killed master `old_master` is a master
    /// serving slots and every live node reports `cluster_state:ok`; returns
    /// the new master's port.
    pub async fn wait_promoted(&self, old_master: u16) -> u16 {
        let successor = self
            .successors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&old_master)
            .copied()
            .unwrap_or_else(|| panic!("{old_master} was not killed with kill_master"));
        let started = Instant::now();
        loop {
            let problem = self.promotion_problem(successor).await;
            match problem {
                None => return successor,
                Some(problem) => assert!(
                    started.elapsed() < PROMOTE_TIMEOUT,
                    "{successor} not promoted in place of {old_master} after {PROMOTE_TIMEOUT:?}: {problem}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn promotion_problem(&self, successor: u16) -> Option<String> {
        for port in self.live_ports() {
            let text = match node_command::<String>(port, redis::cmd("CLUSTER").arg("NODES")).await
            {
                Ok(text) => text,
                Err(err) => return Some(format!("node {port}: {err}")),
            };
            let promoted = parse_nodes(&text)
                .iter()
                .any(|n| n.port == successor && n.is_master() && !n.slots.is_empty());
            if !promoted {
                return Some(format!("node {port} does not see {successor} as a master"));
            }
            let info = match node_command::<String>(port, redis::cmd("CLUSTER").arg("INFO")).await {
                Ok(info) => info,
                Err(err) => return Some(format!("node {port}: {err}")),
            };
            let state = info_field(&info, "cluster_state");
            if state != Some("ok") {
                return Some(format!("node {port}: cluster_state {state:?}"));
            }
        }
        None
    }

    /// Moves `slot` with its keys to master `to` while clients go on (they
    /// get ASK during the move, MOVED after): `CLUSTER SETSLOT … IMPORTING`
    /// / `MIGRATING`, `MIGRATE … KEYS` in batches, then `SETSLOT … NODE` on
    /// the target, the source and every other master. Returns how many keys
    /// moved. A no-op when `to` already serves it.
    pub async fn migrate_slot(&self, slot: u16, to: u16) -> usize {
        let from = self.master_of_slot(slot).await;
        if from == to {
            return 0;
        }
        let from_id = self.node_id(from).await;
        let to_id = self.node_id(to).await;
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        node_command::<()>(to, &setslot("IMPORTING", &from_id))
            .await
            .unwrap_or_else(|err| panic!("SETSLOT {slot} IMPORTING on {to}: {err}"));
        node_command::<()>(from, &setslot("MIGRATING", &to_id))
            .await
            .unwrap_or_else(|err| panic!("SETSLOT {slot} MIGRATING on {from}: {err}"));
        let mut moved = 0;
        loop {
            let keys: Vec<String> = node_command(
                from,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(MIGRATE_BATCH),
            )
            .await
            .unwrap_or_else(|err| panic!("GETKEYSINSLOT {slot} on {from}: {err}"));
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(MIGRATE_TIMEOUT_MS)
                .arg("KEYS")
                .arg(&keys);
            node_command::<redis::Value>(from, &migrate)
                .await
                .unwrap_or_else(|err| panic!("MIGRATE of slot {slot} from {from} to {to}: {err}"));
            moved += keys.len();
        }
        // The target first: once the source lets go, the target must already
        // own the slot, or clients bounce between the two.
        let mut order = vec![to, from];
        order.extend(
            self.masters()
                .await
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for port in order {
            node_command::<()>(port, &setslot("NODE", &to_id))
                .await
                .unwrap_or_else(|err| panic!("SETSLOT {slot} NODE on {port}: {err}"));
        }
        self.wait_slot_owner(slot, to).await;
        moved
    }

    /// Until every live node says `to` serves `slot`.
    async fn wait_slot_owner(&self, slot: u16, to: u16) {
        let started = Instant::now();
        'poll: loop {
            assert!(
                started.elapsed() < FORM_TIMEOUT,
                "nodes still disagree on slot {slot}'s owner after {FORM_TIMEOUT:?}"
            );
            for port in self.live_ports() {
                let agrees = node_command::<String>(port, redis::cmd("CLUSTER").arg("NODES"))
                    .await
                    .is_ok_and(|text| {
                        parse_nodes(&text)
                            .iter()
                            .any(|n| n.port == to && n.serves(slot))
                    });
                if !agrees {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'poll;
                }
            }
            return;
        }
    }

    /// `CLUSTER MYID` of node `port`.
    pub async fn node_id(&self, port: u16) -> String {
        node_command(port, redis::cmd("CLUSTER").arg("MYID"))
            .await
            .unwrap_or_else(|err| panic!("CLUSTER MYID on {port}: {err}"))
    }

    /// A cluster connection (follows MOVED / ASK, refreshes its slot map).
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        let seeds: Vec<String> = self
            .live_ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        redis::cluster::ClusterClient::builder(seeds)
            .retries(10)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .build()
            .expect("cluster client")
            .get_async_connection()
            .await
            .unwrap_or_else(|err| panic!("cannot connect to the cluster {}: {err}", self.seeds()))
    }

    /// A plain connection to node `port` (no redirections followed).
    pub async fn node_client(&self, port: u16) -> redis::aio::MultiplexedConnection {
        node_connection(port)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to node {port}: {err}"))
    }
}

impl Drop for TestRedisCluster {
    fn drop(&mut self) {
        // Guards kill their nodes as they drop.
        self.nodes().clear();
        if std::thread::panicking() {
            eprintln!(
                "Redis Cluster {}: node logs kept in {}",
                self.seeds(),
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `redis-server` in cluster mode on `port`, its node config in `dir`.
fn node_launch(server: &Path, port: u16, dir: &Path) -> std::io::Result<Launch> {
    let config = dir.join(format!("nodes-{port}.conf"));
    Ok(launch(server, port, dir)?
        .named(&format!("redis-cluster-{port}"))
        .log(dir.join(format!("node-{port}.log")))
        .args(["--cluster-enabled", "yes"])
        .arg("--cluster-config-file")
        .arg(config)
        .args(["--cluster-node-timeout", "1000"])
        // A replica takes over whatever its last contact with the master.
        .args(["--cluster-replica-validity-factor", "0"])
        // While slots are uncovered, nodes refuse reads too.
        .args(["--cluster-allow-reads-when-down", "no"])
        // A replica's first sync starts at once, not after the default 5 s
        // wait for more replicas to join the same transfer.
        .args(["--repl-diskless-sync-delay", "0"]))
}

async fn node_connection(port: u16) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0"))
        .map_err(|err| err.to_string())?;
    tokio::time::timeout(
        NODE_COMMAND_TIMEOUT,
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|err| err.to_string())
}

/// One command to node `port` on a fresh connection, with a timeout.
async fn node_command<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let mut conn = node_connection(port).await?;
    tokio::time::timeout(NODE_COMMAND_TIMEOUT, cmd.query_async(&mut conn))
        .await
        .map_err(|_| "command timed out".to_owned())?
        .map_err(|err| err.to_string())
}

/// `field:value` of an `INFO` / `CLUSTER INFO` text.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460 [5461->-b2]
b2 127.0.0.1:30002@40002,host master - 0 0 2 connected 5461-10922 16000
c3 127.0.0.1:30003@40003 master,fail - 0 0 3 connected
d4 127.0.0.1:30004@40004 slave a1 0 0 1 connected
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].port, 30001);
        assert_eq!(nodes[0].slots, vec![(0, 5460)]);
        assert!(nodes[1].serves(16000) && nodes[1].serves(5461) && !nodes[1].serves(0));
        assert!(nodes[2].is_failing());
        assert_eq!(nodes[3].master_id.as_deref(), Some("a1"));
        assert!(!nodes[3].is_master());
    }

    #[test]
    fn key_slots_as_redis_computes_them() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot_of("foo"), 12182);
        assert_eq!(key_slot_of("{user1000}.following"), key_slot_of("user1000"));
        assert_eq!(key_slot_of("foo{}{bar}"), key_slot_of("foo{}{bar}"));
        assert_ne!(key_slot_of("foo{}{bar}"), key_slot_of("bar"));
        assert_eq!(key_slot_of("foo{{bar}}zap"), key_slot_of("{bar"));
    }

    #[test]
    fn cluster_ports_leave_room_for_the_bus() {
        let ports = free_cluster_ports(6).unwrap();
        assert_eq!(ports.len(), 6);
        for port in ports {
            assert!(port <= MAX_CLIENT_PORT);
        }
    }

    async fn set(conn: &mut redis::cluster_async::ClusterConnection, key: &str, value: &str) {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(conn)
            .await
            .unwrap();
    }

    async fn get(conn: &mut redis::cluster_async::ClusterConnection, key: &str) -> Option<String> {
        redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
    }

    /// Forms, serves keys on every master, moves a slot with its keys, and
    /// promotes a replica when its master is killed: keys written (and
    /// replicated) before the kill are still there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_forms_reshards_and_fails_over() {
        let started = Instant::now();
        let cluster = TestRedisCluster::start(3, 1).await;
        println!("3+3 cluster formed in {:?}", started.elapsed());
        assert_eq!(cluster.seeds().split(',').count(), 6);
        let masters = cluster.masters().await;
        assert_eq!(masters.len(), 3);
        for &master in &masters {
            // The node asked may learn of a replica by gossip a moment later.
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            let replica = loop {
                match cluster.replica_of(master).await {
                    Some(replica) => break replica,
                    None if Instant::now() < deadline => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    None => panic!("no replica of {master} after 10 s"),
                }
            };
            assert!(!masters.contains(&replica));
        }

        let mut conn = cluster.connection().await;
        let keys: Vec<String> = (0..60).map(|i| format!("features:{{k{i}}}")).collect();
        for key in &keys {
            set(&mut conn, key, key).await;
        }
        let samples = keys[..5].iter().map(String::as_str);
        for key in samples.chain(["features:x-1", "a{b}c", "{p3}"]) {
            assert_eq!(cluster.key_slot(key).await, key_slot_of(key), "{key}");
        }
        let mut owners: Vec<u16> = Vec::new();
        for key in &keys {
            owners.push(cluster.master_of_key(key).await);
        }
        for master in &masters {
            assert!(owners.contains(master), "no key of 60 on {master}");
        }

        // Move the first key's slot to another master.
        let key = &keys[0];
        let slot = cluster.key_slot(key).await;
        let from = cluster.master_of_slot(slot).await;
        let to = *masters.iter().find(|m| **m != from).unwrap();
        let moved = cluster.migrate_slot(slot, to).await;
        assert!(moved >= 1);
        assert_eq!(cluster.master_of_slot(slot).await, to);
        assert_eq!(get(&mut conn, key).await.as_deref(), Some(key.as_str()));

        // Kill the master of another key once its writes reached the replica.
        let victim_key = keys
            .iter()
            .find(|k| owners[keys.iter().position(|x| x == *k).unwrap()] != to)
            .unwrap()
            .clone();
        let victim = cluster.master_of_key(&victim_key).await;
        let mut direct = cluster.node_client(victim).await;
        // Replication is in order: once this write reached the replica, so
        // did every earlier one (WAIT counts this connection's writes).
        let _: () = redis::cmd("SET")
            .arg(&victim_key)
            .arg(&victim_key)
            .query_async(&mut direct)
            .await
            .unwrap();
        let _: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(2000)
            .query_async(&mut direct)
            .await
            .unwrap();
        let killed = Instant::now();
        cluster.kill_master(victim).await;
        let promoted = cluster.wait_promoted(victim).await;
        println!(
            "replica {promoted} promoted {:?} after the kill of {victim}",
            killed.elapsed()
        );
        assert!(cluster.masters().await.contains(&promoted));
        assert_eq!(cluster.master_of_key(&victim_key).await, promoted);
        for key in &keys {
            assert_eq!(get(&mut conn, key).await.as_deref(), Some(key.as_str()));
        }
    }
}
