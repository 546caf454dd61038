//! One connection type for a single Redis and a Redis Cluster, so every
//! component runs the same commands, scripts and pipelines on either.
//!
//! A single Redis is reached through a [`ConnectionManager`] (reconnects by
//! itself); a cluster through the `redis` crate's async cluster client,
//! which routes each command to its slot's master and follows `MOVED`/`ASK`
//! while slots migrate or a replica is promoted. The cluster refuses a
//! pipeline whose commands touch several slots, so a pipeline here is split
//! by slot, its parts sent at once and the replies put back in order: the
//! callers' pipelines (batches of guarded writes, reservations) are
//! independent commands, never transactions.

use crate::slots::slot_of;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to a single Redis or to a Redis Cluster. Cheap to clone:
/// clones share the multiplexed connections.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Whether this is a cluster (slots, sharded pub/sub, per-slot fences).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The addresses (`host:port`) of the masters, for commands that walk
    /// every master's keys (`SCAN`); a single Redis is its own master.
    pub async fn masters(&self) -> redis::RedisResult<Vec<String>> {
        Ok(self
            .slot_owners()
            .await?
            .into_iter()
            .map(|(address, _)| address)
            .collect())
    }

    /// Each master (`host:port`) with the slots it serves, from `CLUSTER
    /// NODES` (a single Redis: itself, every slot).
    pub async fn slot_owners(&self) -> redis::RedisResult<Vec<(String, Vec<(u16, u16)>)>> {
        match self {
            Self::Single(_) => Ok(vec![(String::new(), vec![(0, crate::slots::SLOTS - 1)])]),
            Self::Cluster(conn) => {
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn.clone())
                    .await?;
                Ok(slot_owners_of(&nodes))
            }
        }
    }

    /// Runs a pipeline on the master at `address` as it is (its commands
    /// may touch any slots that master serves): for writing many slots at
    /// once. A command whose slot moved meanwhile fails (`MOVED`).
    pub async fn pipeline_on_master(
        &self,
        address: &str,
        pipeline: &Pipeline,
    ) -> redis::RedisResult<Vec<Value>> {
        match self {
            Self::Single(conn) => {
                conn.clone()
                    .req_packed_commands(pipeline, 0, pipeline.len())
                    .await
            }
            Self::Cluster(conn) => {
                let (host, port) = host_port(address)?;
                conn.clone()
                    .route_pipeline(
                        pipeline.clone(),
                        0,
                        pipeline.len(),
                        redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port },
                    )
                    .await
            }
        }
    }

    /// Runs `cmd` on the master at `address` (from [`Self::masters`]); on a
    /// single Redis, on the server.
    pub async fn on_master<T: redis::FromRedisValue>(
        &self,
        address: &str,
        cmd: &Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Self::Single(conn) => cmd.query_async(&mut conn.clone()).await,
            Self::Cluster(conn) => {
                let (host, port) = host_port(address)?;
                let route = redis::cluster_routing::RoutingInfo::SingleNode(
                    redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port },
                );
                let value = conn.clone().route_command(cmd.clone(), route).await?;
                redis::from_redis_value(value).map_err(Into::into)
            }
        }
    }
}

/// `host:port` split (an IPv6 host keeps its colons).
pub(crate) fn host_port(address: &str) -> redis::RedisResult<(String, u16)> {
    address
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
        .ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "not a host:port address",
                address.to_owned(),
            ))
        })
}

/// The serving masters of a `CLUSTER NODES` reply with their slot ranges.
fn slot_owners_of(nodes: &str) -> Vec<(String, Vec<(u16, u16)>)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = *fields.get(2)?;
            let is_master = flags.split(',').any(|f| f == "master");
            let failing = flags.split(',').any(|f| f == "fail" || f == "fail?");
            if !is_master || failing {
                return None;
            }
            let address = fields.get(1)?.split('@').next()?.to_owned();
            // Ranges `a-b` or single slots; `[…]` entries are migrations.
            let ranges: Vec<(u16, u16)> = fields
                .iter()
                .skip(8)
                .filter(|field| !field.starts_with('['))
                .filter_map(|field| match field.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => field.parse().ok().map(|slot| (slot, slot)),
                })
                .collect();
            (!ranges.is_empty()).then_some((address, ranges))
        })
        .collect()
}

/// The key a command is routed by: the first key of a script call, the
/// first argument of anything else (every command the services pipeline
/// takes its key first).
fn routing_key(cmd: &Cmd) -> Option<String> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|arg| match arg {
            redis::Arg::Simple(bytes) => Some(bytes),
            _ => None,
        })
        .collect();
    let name = String::from_utf8_lossy(args.first()?).to_ascii_uppercase();
    let key = match name.as_str() {
        "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" => {
            let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            (keys > 0).then(|| args.get(3)).flatten()?
        }
        "PING" | "INFO" | "DBSIZE" | "TIME" | "SCRIPT" | "CLUSTER" => return None,
        _ => args.get(1)?,
    };
    Some(String::from_utf8_lossy(key).into_owned())
}

/// Sends a non-transactional pipeline as one pipeline per slot, at once,
/// and answers in the pipeline's order.
async fn split_by_slot(
    conn: &mut ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> redis::RedisResult<Vec<Value>> {
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let slots: Vec<Option<u16>> = commands
        .iter()
        .map(|cmd| routing_key(cmd).map(|key| slot_of(&key)))
        .collect();
    let first = slots.iter().flatten().next().copied();
    if pipeline.is_transaction() || slots.iter().flatten().all(|slot| Some(*slot) == first) {
        return conn.req_packed_commands(pipeline, offset, count).await;
    }
    // Commands without a key go with the first slot's part.
    let mut parts: Vec<(u16, Pipeline, Vec<usize>)> = Vec::new();
    for (index, (cmd, slot)) in commands.iter().zip(&slots).enumerate() {
        let slot = slot.or(first).unwrap_or(0);
        let part = match parts.iter_mut().position(|(s, _, _)| *s == slot) {
            Some(at) => &mut parts[at],
            None => {
                parts.push((slot, redis::pipe(), Vec::new()));
                let last = parts.len() - 1;
                &mut parts[last]
            }
        };
        part.1.add_command((*cmd).clone());
        part.2.push(index);
    }
    let replies = futures::future::try_join_all(parts.iter().map(|(_, part, _)| {
        let mut conn = conn.clone();
        async move { conn.req_packed_commands(part, 0, part.len()).await }
    }))
    .await?;
    let mut ordered = vec![Value::Nil; commands.len()];
    for ((_, _, indexes), values) in parts.iter().zip(replies) {
        for (index, value) in indexes.iter().zip(values) {
            ordered[*index] = value;
        }
    }
    Ok(ordered.into_iter().skip(offset).take(count).collect())
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => Box::pin(split_by_slot(conn, pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_routed_by_their_first_key() {
        let script = redis::cmd("EVALSHA")
            .arg("abc")
            .arg(2)
            .arg("features:C1")
            .arg("lease")
            .arg("x")
            .clone();
        assert_eq!(routing_key(&script).as_deref(), Some("features:C1"));
        let no_keys = redis::cmd("EVALSHA").arg("abc").arg(0).arg("x").clone();
        assert_eq!(routing_key(&no_keys), None);
        let get = redis::cmd("GET").arg("features:C2").clone();
        assert_eq!(routing_key(&get).as_deref(), Some("features:C2"));
        assert_eq!(routing_key(&redis::cmd("PING")), None);
    }

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:30002@40002 master - 0 0 2 connected 5461-10922
a3 127.0.0.1:30003@40003 master,fail - 0 0 3 connected
a4 127.0.0.1:30004@40004 slave a1 0 0 1 connected
a5 127.0.0.1:30005@40005 master - 0 0 5 connected 10923-16383
";
        let owners = slot_owners_of(nodes);
        let masters: Vec<&str> = owners.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(
            masters,
            vec!["127.0.0.1:30001", "127.0.0.1:30002", "127.0.0.1:30005"]
        );
        assert_eq!(owners[0], ("127.0.0.1:30001".to_owned(), vec![(0, 5460)]));
        assert_eq!(owners.len(), 3);
    }
}
