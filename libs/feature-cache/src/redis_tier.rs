use crate::connection::RedisConnection;
use crate::entry::Entry;
use crate::fence::Fence;
use crate::keyspace::{DOCUMENT_PREFIX, TtlPolicy, document_key};
use crate::tier::CacheTier;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::{
    AsyncCommands, ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Script,
    TlsCertificates,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TierError {
    #[error("Redis failed")]
    Redis(#[from] redis::RedisError),
}

/// Why a client for Redis could not be made (at start, never per request).
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The URL or the TLS material was refused (the URL is never shown: it
    /// may hold a password).
    #[error("invalid Redis client configuration")]
    Client(#[from] redis::RedisError),
    /// A certificate or key file named in the TLS settings cannot be read.
    #[error("cannot read {setting} {path}")]
    TlsFile {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a fenced write did not land.
#[derive(Debug, Error)]
pub enum FencedWriteError {
    /// The fence moved: another writer holds it now.
    #[error("fenced: this writer no longer holds the fence")]
    Fenced,
    #[error("Redis failed")]
    Redis(#[source] redis::RedisError),
}

impl From<redis::RedisError> for FencedWriteError {
    fn from(err: redis::RedisError) -> Self {
        if Fence::refused(&err) {
            Self::Fenced
        } else {
            Self::Redis(err)
        }
    }
}

/// Where Redis is and how long entries live there.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` (TLS) or `redis+unix://`; an ACL user and
    /// password go in the user info, percent-encoded. Never logged as is
    /// (see [`RedisConfig::redacted_url`]).
    pub url: String,
    /// Certificates for `rediss://` beyond the system's trust store.
    pub tls: RedisTls,
    /// Redis Cluster seeds (`host:port`); when given they win over the
    /// URL's host, and the URL gives only the scheme (TLS or not), the ACL
    /// user and the password.
    pub cluster_nodes: Vec<String>,
    /// Each command's deadline (and the connect timeout).
    pub timeout: Duration,
    pub ttl: TtlPolicy,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("tls", &self.tls)
            .field("cluster_nodes", &self.cluster_nodes)
            .field("timeout", &self.timeout)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// PEM files for `rediss://`: a private CA to trust instead of the system's
/// roots, and a client certificate and key when the server asks for one
/// (`tls-auth-clients yes`).
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
        std::fs::read(path).map_err(|source| ConnectError::TlsFile {
            setting,
            path: path.to_owned(),
            source,
        })
    }

    /// The certificates, or `None` when nothing beyond the defaults is set.
    fn certificates(&self) -> Result<Option<TlsCertificates>, ConnectError> {
        let root_cert = self
            .ca_file
            .as_deref()
            .map(|path| Self::read("REDIS_TLS_CA_FILE", path))
            .transpose()?;
        let client_tls = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: Self::read("REDIS_TLS_CERT_FILE", cert)?,
                client_key: Self::read("REDIS_TLS_KEY_FILE", key)?,
            }),
            // Settings refuse one without the other.
            _ => None,
        };
        Ok(
            (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
                client_tls,
                root_cert,
            }),
        )
    }
}

impl RedisConfig {
    /// The URL with its password replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        telemetry::redact::url(&self.url)
    }

    /// A client for this Redis: TLS with the configured certificates for
    /// `rediss://` (rustls; the system's roots unless a CA file is given),
    /// the URL's ACL user and password sent with `AUTH`.
    /// On a cluster, a client of its first seed (a node of the cluster:
    /// classic pub/sub reaches every node from any of them).
    pub fn client(&self) -> Result<redis::Client, ConnectError> {
        let info = match self.seeds()?.into_iter().next() {
            Some(seed) => seed,
            None => self.connection_info()?,
        };
        match self.tls.certificates()? {
            Some(certificates) => Ok(redis::Client::build_with_tls(info, certificates)?),
            None => Ok(redis::Client::open(info)?),
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    fn connection_info(&self) -> Result<ConnectionInfo, ConnectError> {
        let info = self.url.as_str().into_connection_info()?;
        // No `CLIENT SETINFO` after connecting: it is cosmetic, and leaving it
        // out keeps the services' ACL users free of any CLIENT subcommand.
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        // TCP_NODELAY: commands are small and pipelined on one connection;
        // with Nagle's algorithm a write behind an unacknowledged one waits
        // for the peer's delayed ACK (~40 ms stalls, seen in the benchmark).
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        Ok(info.set_redis_settings(settings).set_tcp_settings(tcp))
    }

    /// Each cluster seed with the URL's scheme, user and password.
    fn seeds(&self) -> Result<Vec<ConnectionInfo>, ConnectError> {
        let base = self.connection_info()?;
        let tls = matches!(base.addr(), ConnectionAddr::TcpTls { .. });
        self.cluster_nodes
            .iter()
            .map(|seed| {
                let (host, port) = crate::connection::host_port(seed)?;
                let addr = if tls {
                    ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host, port)
                };
                Ok(base.clone().set_addr(addr))
            })
            .collect()
    }

    /// A cluster client of the seeds (TLS certificates, user and password
    /// as for a single Redis); `pushes` receives what subscriptions bring
    /// (RESP3 then).
    pub fn cluster_client(
        &self,
        pushes: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<redis::cluster::ClusterClient, ConnectError> {
        let mut builder = ClusterClientBuilder::new(self.seeds()?)
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(3)
            .min_retry_wait(20)
            .max_retry_wait(500);
        if let Some(certificates) = self.tls.certificates()? {
            builder = builder.certs(certificates);
        }
        if let Some(pushes) = pushes {
            builder = builder
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes);
        }
        Ok(builder.build()?)
    }

    /// A connection that reconnects by itself and connects lazily (a
    /// service starts while Redis is down): a [`ConnectionManager`] for a
    /// single Redis, the cluster client's connection for a cluster.
    pub fn connection(&self) -> Result<RedisConnection, ConnectError> {
        if self.is_cluster() {
            let client = self.cluster_client(None)?;
            return Ok(RedisConnection::Cluster(
                client.get_pending_async_connection_with_config(ClusterConfig::new()),
            ));
        }
        let options = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        Ok(RedisConnection::Single(
            ConnectionManager::new_lazy_with_config(self.client()?, options)?,
        ))
    }
}

/// How an entry's order is read and compared; the scripts below build on it.
const ORDER: &str = include_str!("lua/order.lua");
/// The version guard in Lua: `KEYS[1]` the customer key; `ARGV[1..6]` the
/// entry's version, rank, value, TTL in ms, who writes ([`Writer`]) and the
/// horizon.
const GUARD_SCRIPT: &str = include_str!("lua/guarded_set.lua");
/// Reserves a key for a fill: `KEYS[1]`; `ARGV[1..3]` token, TTL in ms and
/// the horizon.
const RESERVE_SCRIPT: &str = include_str!("lua/reserve.lua");
/// The most keys of one MGET or commands of one pipeline. Commands on the
/// shared multiplexed connection are answered in order, so one batch of a
/// thousand keys sent at once would hold every single-key read behind it;
/// sent in chunks, other requests' commands go out between them.
pub const PIPELINE_CHUNK: usize = 100;

/// How far ahead of now a version may be before it is taken for forged: no
/// version MongoDB gives (its clock × 1000) can be further ahead than clock
/// skew, and a forged entry can pin a document no longer than this.
const VERSION_HORIZON: chrono::Duration = chrono::Duration::minutes(10);

/// The highest version a tier believes: now plus [`VERSION_HORIZON`], in
/// version units.
fn horizon() -> i64 {
    (chrono::Utc::now() + VERSION_HORIZON)
        .timestamp_millis()
        .saturating_mul(feature_store::version::UNITS_PER_MS)
}

/// `entry`, unless its version is beyond the horizon (then it counts as
/// absent, and the next fill replaces it).
fn believable(entry: Option<Entry>) -> Option<Entry> {
    match entry {
        Some(entry) if entry.version() > horizon() => {
            metrics::counter!("redis_implausible_versions_total").increment(1);
            tracing::warn!(
                customer_id = entry.customer_id(),
                version = entry.version(),
                "Redis holds a version further ahead than MongoDB could give; ignored and replaced"
            );
            None
        }
        other => other,
    }
}

fn with_order(body: &str) -> String {
    format!("{ORDER}\n{body}")
}
/// Gives a reservation up: `KEYS[1]`; `ARGV[1]` its token.
const RELEASE_SCRIPT: &str = include_str!("lua/release.lua");
/// Deletes a key (behind a fence).
const REMOVE_SCRIPT: &str = "return redis.call('DEL', KEYS[1])";

/// What the guard did with an offered entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    Stored,
    /// The tier already holds this very version: nothing to do, and the
    /// entry is as current as what the tier holds.
    AlreadyCurrent,
    /// The tier holds something newer, at this version.
    Refused {
        holds: Option<i64>,
    },
    /// The fill's reservation is gone: the key changed (or was flushed or
    /// evicted) after the fill began, so what it read may be stale.
    ReservationLost,
}

impl Offer {
    /// Whether the tier now holds this entry (or its very version).
    pub fn accepted(&self) -> bool {
        matches!(self, Self::Stored | Self::AlreadyCurrent)
    }

    fn of_reply(reply: &[redis::Value]) -> Self {
        let code = reply
            .first()
            .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok());
        match code {
            Some(1) => Self::Stored,
            Some(2) => Self::AlreadyCurrent,
            Some(3) => {
                metrics::counter!("cache_fills_refused_total", "reason" => "reservation_lost")
                    .increment(1);
                Self::ReservationLost
            }
            _ => {
                metrics::counter!("version_guard_rejections_total", "tier" => "redis").increment(1);
                let holds = reply
                    .get(1)
                    .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                    .and_then(|v| v.parse().ok());
                Self::Refused { holds }
            }
        }
    }
}

/// Who writes an entry, and so what the guard asks of the key first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// A writer that applies changes in their order (the invalidator, a
    /// delete): the version guard alone.
    Ordered,
    /// A fill that began when the key held a document: the guard, and an
    /// absent key or a reservation refuses (the key changed since).
    Held,
    /// A fill that reserved the key when it began: its reservation is
    /// replaced; an absent key or another reservation refuses.
    Reserved(String),
    /// A refresh ahead of expiry of a document the key held: as
    /// [`Writer::Held`], and the very version the key holds gets a new TTL.
    Refresh,
}

impl Writer {
    fn as_arg(&self) -> &str {
        match self {
            Self::Ordered => "",
            Self::Held => "*",
            Self::Refresh => "+",
            Self::Reserved(token) => token,
        }
    }
}

/// What [`RedisTier::reserve_many`] found for a key.
#[derive(Debug, Clone)]
pub enum Reservation {
    /// The key holds a document: serve it (no fill needed).
    Document(Entry),
    /// The key holds a cached absence, or (serving absences) a tombstone:
    /// serve "not found" (reads only).
    Absent(Entry),
    /// A fill is accepted as this writer.
    Reserved(Writer),
    /// The key holds a reservation: `placed` when this call made it (its
    /// caller leads the read of MongoDB), otherwise another filler's, now
    /// shared. `kept` is the version of the marker it replaced (`-1` for
    /// none): the order an absence found by this read takes.
    Lease {
        writer: Writer,
        kept: i64,
        placed: bool,
    },
}

impl Reservation {
    /// Reads `reserve.lua`'s reply for `customer_id`.
    fn of_reply(customer_id: &str, reply: Vec<String>) -> Self {
        let mut parts = reply.into_iter();
        let kind = parts.next().unwrap_or_default();
        let payload = parts.next().unwrap_or_default();
        match kind.as_str() {
            "document" | "absent" => {
                match believable(Entry::from_redis_value(customer_id, payload)) {
                    Some(entry @ Entry::Document(_)) => Self::Document(entry),
                    Some(entry @ (Entry::Absent { .. } | Entry::Tombstone { .. })) => {
                        Self::Absent(entry)
                    }
                    // Not an entry we can read: fill as if it held a document.
                    _ => Self::Reserved(Writer::Held),
                }
            }
            _ => Self::Lease {
                writer: Writer::Reserved(payload),
                kept: parts.next().and_then(|v| v.parse().ok()).unwrap_or(-1),
                placed: parts.next().is_some_and(|placed| placed == "1"),
            },
        }
    }
}

/// Who reserves a key, and so what the reservation answers instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveFor {
    /// A write: only a document is answered; any marker, a cached absence
    /// included, is replaced (the write's fill must land whatever its order).
    Write,
    /// A read: a document or a cached absence is answered; `serve_absence`
    /// (negative caching on) answers a tombstone as an absence too.
    Read { serve_absence: bool },
}

impl ReserveFor {
    fn as_arg(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Read {
                serve_absence: false,
            } => "read",
            Self::Read {
                serve_absence: true,
            } => "negative",
        }
    }
}

/// What a waiting filler sees when it looks at a key again.
#[derive(Debug, Clone)]
pub enum Peek {
    /// An entry (a document, an absence, a marker).
    Entry(Entry),
    /// A reservation, with its token.
    Reserved(String),
    /// Nothing (or nothing we wrote).
    Nothing,
}

/// Health figures for `/api/health/`.
#[derive(Debug, Clone)]
pub struct RedisHealth {
    pub latency: Duration,
    pub total_keys: u64,
    pub used_memory: String,
}

/// The shared Redis tier. Commands time out after the configured timeout,
/// and the connection reconnects by itself, so a dead Redis costs a request
/// at most one short wait before it falls through to MongoDB.
#[derive(Clone)]
pub struct RedisTier {
    config: RedisConfig,
    conn: RedisConnection,
    guard: Script,
    reserve: Script,
    release: Script,
    ttl: TtlPolicy,
}

impl RedisTier {
    /// Connects lazily: the service starts even while Redis is down.
    pub fn connect(config: &RedisConfig) -> Result<Self, ConnectError> {
        let conn = config.connection()?;
        Ok(Self {
            config: config.clone(),
            conn,
            guard: Script::new(&with_order(GUARD_SCRIPT)),
            reserve: Script::new(&with_order(RESERVE_SCRIPT)),
            release: Script::new(RELEASE_SCRIPT),
            ttl: config.ttl,
        })
    }

    /// Where the tier connects (TLS and credentials included), for
    /// components that need connections of their own (subscriptions).
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// A client of one node (on a cluster, its first seed), for classic
    /// pub/sub.
    pub fn client(&self) -> Result<redis::Client, ConnectError> {
        self.config.client()
    }

    /// A handle on the same multiplexed connection, for other components
    /// (health, the invalidation subscriber's catch-up reads, announcements).
    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    #[tracing::instrument(skip(self), fields(db.system = "redis", db.operation = "GET"))]
    pub async fn get(&self, customer_id: &str) -> Result<Option<Entry>, TierError> {
        let raw = self.get_raw(customer_id).await?;
        Ok(believable(
            raw.and_then(|raw| Entry::from_redis_value(customer_id, raw)),
        ))
    }

    /// The key's value as stored.
    async fn get_raw(&self, customer_id: &str) -> Result<Option<String>, TierError> {
        Ok(self
            .conn
            .clone()
            .get(document_key(customer_id))
            .await
            .inspect_err(|_| count_error("GET"))?)
    }

    /// The key's entry and its remaining TTL, in one round trip (GET and
    /// PTTL pipelined): what a refresh ahead of expiry needs to know.
    #[tracing::instrument(skip(self), fields(db.system = "redis", db.operation = "GET+PTTL"))]
    pub async fn get_with_ttl(
        &self,
        customer_id: &str,
    ) -> Result<(Option<Entry>, Option<Duration>), TierError> {
        let key = document_key(customer_id);
        let (raw, pttl): (Option<String>, i64) = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut self.conn.clone())
            .await
            .inspect_err(|_| count_error("GET"))?;
        let entry = believable(raw.and_then(|raw| Entry::from_redis_value(customer_id, raw)));
        // -1: no TTL, -2: no key; neither is "about to expire".
        let left = u64::try_from(pttl).ok().map(Duration::from_millis);
        Ok((entry, left))
    }

    /// What the key holds now, reservations included: what a filler
    /// waiting on another's reservation polls.
    #[tracing::instrument(skip(self), fields(db.system = "redis", db.operation = "GET"))]
    pub async fn peek(&self, customer_id: &str) -> Result<Peek, TierError> {
        let Some(raw) = self.get_raw(customer_id).await? else {
            return Ok(Peek::Nothing);
        };
        if let Some(token) = reservation_token(&raw) {
            return Ok(Peek::Reserved(token));
        }
        Ok(
            match believable(Entry::from_redis_value(customer_id, raw)) {
                Some(entry) => Peek::Entry(entry),
                None => Peek::Nothing,
            },
        )
    }

    /// Refreshes a document ahead of its expiry: stored if newer than what
    /// the key holds, its TTL renewed if it is what the key holds; refused
    /// if the key holds something newer, nothing, or a reservation (then
    /// something happened since, and the next read fills it).
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", customer_id = entry.customer_id()))]
    pub async fn refresh(&self, entry: Entry) -> Result<Offer, TierError> {
        let mut outcomes = self.fill_many(&[(entry, Writer::Refresh)]).await?;
        Ok(outcomes.pop().unwrap_or(Offer::Refused { holds: None }))
    }

    /// How long entries live here.
    pub fn ttl(&self) -> TtlPolicy {
        self.ttl
    }

    /// One MGET per [`PIPELINE_CHUNK`] customers.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "MGET", count = customer_ids.len()))]
    pub async fn get_many(&self, customer_ids: &[&str]) -> Result<Vec<Option<Entry>>, TierError> {
        let mut entries = Vec::with_capacity(customer_ids.len());
        for chunk in customer_ids.chunks(PIPELINE_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|id| document_key(id)).collect();
            let raw: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut self.conn.clone())
                .await
                .inspect_err(|_| count_error("MGET"))?;
            entries.extend(
                chunk.iter().zip(raw).map(|(id, raw)| {
                    believable(raw.and_then(|raw| Entry::from_redis_value(id, raw)))
                }),
            );
        }
        Ok(entries)
    }

    /// Offers many entries through the guard in one pipeline, as an ordered
    /// writer.
    pub async fn offer_many(&self, entries: &[Entry]) -> Result<Vec<Offer>, TierError> {
        let writes: Vec<(Entry, Writer)> = entries
            .iter()
            .map(|entry| (entry.clone(), Writer::Ordered))
            .collect();
        self.fill_many(&writes).await
    }

    /// Reserves each key for a fill that is about to read MongoDB (one
    /// pipeline); a key that holds a document answers with it instead, and
    /// for a read one that holds a cached absence (or, serving absences, a
    /// tombstone) with that.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", count = customer_ids.len()))]
    pub async fn reserve_many(
        &self,
        customer_ids: &[&str],
        purpose: ReserveFor,
    ) -> Result<Vec<Reservation>, TierError> {
        if customer_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ttl_ms = millis(self.ttl.marker_ttl);
        let mut reservations = Vec::with_capacity(customer_ids.len());
        for chunk in customer_ids.chunks(PIPELINE_CHUNK) {
            let mut pipe = redis::pipe();
            for id in chunk {
                let mut invocation = self.reserve.prepare_invoke();
                invocation
                    .key(document_key(id))
                    .arg(new_token())
                    .arg(ttl_ms)
                    .arg(horizon())
                    .arg(purpose.as_arg());
                pipe.invoke_script(&invocation);
            }
            let replies: Vec<Vec<String>> = self.query_scripts(&pipe, &self.reserve).await?;
            reservations.extend(
                chunk
                    .iter()
                    .zip(replies)
                    .map(|(id, reply)| Reservation::of_reply(id, reply)),
            );
        }
        Ok(reservations)
    }

    /// Gives up reservations whose reads found nothing to fill (one
    /// pipeline); keys that changed since are left alone.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", count = reservations.len()))]
    pub async fn release_many(&self, reservations: &[(&str, &Writer)]) -> Result<(), TierError> {
        let tokens: Vec<(&str, &String)> = reservations
            .iter()
            .filter_map(|(id, writer)| match writer {
                Writer::Reserved(token) => Some((*id, token)),
                _ => None,
            })
            .collect();
        for chunk in tokens.chunks(PIPELINE_CHUNK) {
            let mut pipe = redis::pipe();
            for (id, token) in chunk {
                let mut invocation = self.release.prepare_invoke();
                invocation.key(document_key(id)).arg(*token);
                pipe.invoke_script(&invocation);
            }
            let _: Vec<i64> = self.query_scripts(&pipe, &self.release).await?;
        }
        Ok(())
    }

    /// Offers many entries through the guard in one pipeline, each as its
    /// writer. An expired document is not offered (it counts as refused).
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", count = writes.len()))]
    pub async fn fill_many(&self, writes: &[(Entry, Writer)]) -> Result<Vec<Offer>, TierError> {
        Ok(guarded_fills(&self.conn, &self.guard, &self.ttl, writes, None).await?)
    }

    /// [`query_scripts`] on the tier's connection.
    async fn query_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        script: &Script,
    ) -> Result<T, TierError> {
        Ok(query_scripts(&self.conn, pipe, script).await?)
    }

    /// A writer whose every write lands only while `fence` holds; made once
    /// per term of whoever holds the fence.
    pub fn fenced(&self, fence: Fence) -> FencedWriter {
        FencedWriter {
            conn: self.conn.clone(),
            guard: Fence::script(&with_order(GUARD_SCRIPT)),
            remove: Fence::script(REMOVE_SCRIPT),
            fence,
            ttl: self.ttl,
            replication_skip_until_ms: Arc::default(),
            began: Instant::now(),
        }
    }

    /// Deletes every cached customer entry (`features:*` strings; other
    /// types under the prefix are not ours) with SCAN and UNLINK, never KEYS,
    /// on every master of a cluster. Returns how many keys were removed.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "SCAN+UNLINK"))]
    pub async fn flush_documents(&self) -> Result<u64, TierError> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys) = self.scan_documents(cursor, 1000).await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// One page of the cached customers' keys (`features:*` strings; other
    /// types under the prefix are not ours): `SCAN cursor … COUNT count`.
    /// Returns the next cursor (0 at the end) and the page's keys. On a
    /// cluster the masters are walked one after the other (the cursor's
    /// low 8 bits say which, in address order); a master that fails during
    /// the walk is a page of keys missed, as SCAN misses keys a resharding
    /// moves under it.
    pub async fn scan_documents(
        &self,
        cursor: u64,
        count: u64,
    ) -> Result<(u64, Vec<String>), TierError> {
        let mut masters = self.conn.masters().await?;
        masters.sort();
        let mut index = usize::try_from(cursor & 0xff).unwrap_or(usize::MAX);
        let mut node_cursor = cursor >> 8;
        while let Some(master) = masters.get(index) {
            let scan = redis::cmd("SCAN")
                .arg(node_cursor)
                .arg("MATCH")
                .arg(format!("{DOCUMENT_PREFIX}*"))
                .arg("TYPE")
                .arg("string")
                .arg("COUNT")
                .arg(count)
                .clone();
            let (next, keys): (u64, Vec<String>) = self.conn.on_master(master, &scan).await?;
            if next != 0 {
                return Ok(((next << 8) | index as u64, keys));
            }
            index += 1;
            node_cursor = 0;
            if !keys.is_empty() && index < masters.len() {
                return Ok((index as u64, keys));
            }
            if !keys.is_empty() {
                return Ok((0, keys));
            }
        }
        Ok((0, Vec::new()))
    }

    /// `INFO memory` of a master (on a cluster the first one: a cluster's
    /// masters are configured alike).
    pub async fn info_memory(&self) -> Result<String, TierError> {
        let masters = self.conn.masters().await?;
        let master = masters.first().map_or("", String::as_str);
        Ok(self
            .conn
            .on_master(master, redis::cmd("INFO").arg("memory"))
            .await?)
    }

    /// Round-trip time of a `PING`.
    pub async fn ping(&self) -> Result<Duration, TierError> {
        let started = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(started.elapsed())
    }

    pub async fn health(&self) -> Result<RedisHealth, TierError> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        let latency = started.elapsed();
        let total_keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
        let info = self.info_memory().await?;
        let used_memory = info
            .lines()
            .find_map(|line| line.strip_prefix("used_memory_human:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        Ok(RedisHealth {
            latency,
            total_keys,
            used_memory,
        })
    }
}

/// The writes of one ordered writer behind a [`Fence`].
#[derive(Clone)]
pub struct FencedWriter {
    conn: RedisConnection,
    guard: Script,
    remove: Script,
    fence: Fence,
    ttl: TtlPolicy,
    /// Until when (ms since the writer began) replication is not waited
    /// for: a master without a live replica would make every wait time out.
    replication_skip_until_ms: Arc<AtomicU64>,
    began: Instant,
}

/// How long a cluster write waits for a replica's acknowledgement. WAIT
/// blocks the connection to that master, which every command to it shares:
/// short, so a replica that is slow to answer delays the rest only a little.
pub(crate) const REPLICATION_WAIT_MS: u64 = 20;
/// After a wait timed out, how long writes go on without waiting.
const REPLICATION_BACKOFF_MS: u64 = 5000;

impl FencedWriter {
    /// Offers `entry` through the version guard while the fence holds.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", customer_id = entry.customer_id()))]
    pub async fn offer(&self, entry: &Entry) -> Result<Offer, FencedWriteError> {
        let Some(ttl_ms) = self.ttl.ttl_ms_of(entry) else {
            return Ok(Offer::Refused { holds: None });
        };
        let mut invocation = self.guard.prepare_invoke();
        guard_args(&mut invocation, entry, ttl_ms, &Writer::Ordered);
        self.fence
            .append(&mut invocation, &document_key(entry.customer_id()));
        let reply: Vec<redis::Value> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .inspect_err(|_| count_error("EVALSHA"))?;
        Ok(Offer::of_reply(&reply))
    }

    /// Offers many entries through the guard in one pipeline while the
    /// fence holds, each as its writer (a fill onto its reservation: see
    /// [`RedisTier::reserve_many`]). An expired document is not offered.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", count = writes.len()))]
    pub async fn fill_many(
        &self,
        writes: &[(Entry, Writer)],
    ) -> Result<Vec<Offer>, FencedWriteError> {
        Ok(guarded_fills(
            &self.conn,
            &self.guard,
            &self.ttl,
            writes,
            Some(&self.fence),
        )
        .await?)
    }

    /// Removes the customer's entry while the fence holds: whatever the
    /// key held, and any fill's reservation with it. Absence is always
    /// safe: a fill needs its reservation, and a reader then reads MongoDB.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA+DEL", customer_id = customer_id))]
    pub async fn remove(&self, customer_id: &str) -> Result<bool, FencedWriteError> {
        let mut invocation = self.remove.prepare_invoke();
        let key = document_key(customer_id);
        invocation.key(&key);
        self.fence.append(&mut invocation, &key);
        let removed: i64 = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .inspect_err(|_| count_error("EVALSHA"))?;
        Ok(removed > 0)
    }

    /// Removes many customers' entries while the fence holds, in
    /// pipelines of [`PIPELINE_CHUNK`].
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA+DEL", count = customer_ids.len()))]
    pub async fn remove_many(&self, customer_ids: &[&str]) -> Result<(), FencedWriteError> {
        for chunk in customer_ids.chunks(PIPELINE_CHUNK) {
            let mut pipe = redis::pipe();
            for customer_id in chunk {
                let key = document_key(customer_id);
                let mut invocation = self.remove.prepare_invoke();
                invocation.key(&key);
                self.fence.append(&mut invocation, &key);
                pipe.invoke_script(&invocation);
            }
            let _: Vec<i64> = query_scripts(&self.conn, &pipe, &self.remove).await?;
        }
        Ok(())
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// On a cluster, waits (briefly) until each master's replica holds the
    /// writes made so far (`WAIT 1`), so a failover promoting the replica
    /// does not bring back what they replaced before the change is
    /// announced as done. Nothing to do on a single Redis. When a replica
    /// does not answer in time (a master that lost its replica), the
    /// writer stops waiting for a while instead of slowing every change.
    pub async fn await_replicas(&self) {
        if !self.conn.is_cluster() {
            return;
        }
        let now_ms = u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX);
        if now_ms < self.replication_skip_until_ms.load(Ordering::Relaxed) {
            metrics::counter!("redis_replication_waits_total", "result" => "skipped").increment(1);
            return;
        }
        let acked: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(1)
            .arg(REPLICATION_WAIT_MS)
            .query_async(&mut self.conn.clone())
            .await;
        let result = match acked {
            Ok(n) if n >= 1 => "acknowledged",
            _ => {
                self.replication_skip_until_ms
                    .store(now_ms + REPLICATION_BACKOFF_MS, Ordering::Relaxed);
                "timed_out"
            }
        };
        metrics::counter!("redis_replication_waits_total", "result" => result).increment(1);
    }
}

/// Offers entries through the guard in pipelines of [`PIPELINE_CHUNK`],
/// each as its writer, behind `fence` when given. An expired document is
/// not offered (it counts as refused).
async fn guarded_fills(
    conn: &RedisConnection,
    guard: &Script,
    ttl: &TtlPolicy,
    writes: &[(Entry, Writer)],
    fence: Option<&Fence>,
) -> redis::RedisResult<Vec<Offer>> {
    let offered: Vec<(usize, u64)> = writes
        .iter()
        .enumerate()
        .filter_map(|(index, (entry, _))| Some((index, ttl.ttl_ms_of(entry)?)))
        .collect();
    let mut outcomes = vec![Offer::Refused { holds: None }; writes.len()];
    for chunk in offered.chunks(PIPELINE_CHUNK) {
        let mut pipe = redis::pipe();
        for (index, ttl_ms) in chunk {
            let (entry, writer) = &writes[*index];
            let mut invocation = guard.prepare_invoke();
            guard_args(&mut invocation, entry, *ttl_ms, writer);
            if let Some(fence) = fence {
                fence.append(&mut invocation, &document_key(entry.customer_id()));
            }
            pipe.invoke_script(&invocation);
        }
        let replies: Vec<Vec<redis::Value>> = query_scripts(conn, &pipe, guard).await?;
        for ((index, _), reply) in chunk.iter().zip(replies) {
            outcomes[*index] = Offer::of_reply(&reply);
        }
    }
    Ok(outcomes)
}

/// Runs a pipeline of one script's invocations, loading the script once if
/// the server does not know it (a restarted Redis).
async fn query_scripts<T: redis::FromRedisValue>(
    conn: &RedisConnection,
    pipe: &redis::Pipeline,
    script: &Script,
) -> redis::RedisResult<T> {
    let mut conn = conn.clone();
    match pipe.query_async(&mut conn).await {
        Ok(replies) => Ok(replies),
        Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(&mut conn).await?;
            pipe.query_async(&mut conn)
                .await
                .inspect_err(|_| count_error("EVALSHA"))
        }
        Err(err) => {
            count_error("EVALSHA");
            Err(err)
        }
    }
}

/// The guard script's keys and arguments for `entry` written by `writer`.
fn guard_args(
    invocation: &mut redis::ScriptInvocation<'_>,
    entry: &Entry,
    ttl_ms: u64,
    writer: &Writer,
) {
    invocation
        .key(document_key(entry.customer_id()))
        .arg(entry.version())
        .arg(entry.rank())
        .arg(entry.to_redis_value())
        .arg(ttl_ms)
        .arg(writer.as_arg())
        .arg(horizon());
}

/// The token of a reservation value (`{"version":…,"rank":…,"reserved":"…"}`).
fn reservation_token(raw: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        reserved: Option<String>,
    }
    serde_json::from_str::<Head>(raw).ok()?.reserved
}

/// A reservation's token: random, so no two fills share one by accident.
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl CacheTier for RedisTier {
    async fn lookup(&self, customer_id: &str) -> Result<Option<Entry>, TierError> {
        self.get(customer_id).await
    }

    async fn offer(&self, entry: Entry) -> Result<bool, TierError> {
        Ok(self
            .offer_many(std::slice::from_ref(&entry))
            .await?
            .first()
            .is_some_and(|outcome| *outcome == Offer::Stored))
    }
}

fn count_error(operation: &'static str) {
    metrics::counter!("redis_errors_total", "operation" => operation).increment(1);
}
