//! `[cache.shared]`: Redis as the fleet's second cache level and invalidation bus.
//!
//! Redis is an accelerator, never a dependency of correctness. Every command is bounded by
//! `command_timeout`; any failure marks the shared cache down (logged once, `mfa_gate_shared_cache_up`
//! 0), and while it is down the gateway does not wait for Redis at all: it goes on with its local
//! cache and the IAM, and a probe every second brings it back. Whatever Redis returns is opened
//! with the fleet's key ([`super::seal`]); a value that does not open is `rejected` and ignored.
//!
//! Keys, all under `key_prefix`:
//! - `e:<hex HMAC(token)>`: a sealed entry, with a Redis TTL of the entry's fresh lifetime (so,
//!   like the local cache, never past the token's `expires_at`);
//! - `l:<hex HMAC(token)>`: the fetch lock, so that one gateway of the fleet asks the IAM while
//!   the others wait for its answer (fleet-wide coalescing; see [`SharedCache::lock`]);
//! - `u:<hex HMAC(user id)>`: the set of entry keys of one user, for a fleet-wide purge;
//! - channel `invalidate`: sealed purge messages.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures_util::StreamExt;
use rand::RngCore;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo};
use tokio::sync::{mpsc, watch};

use super::seal::{FleetEntry, FleetKeys, Invalidation};
use crate::config::SharedCacheConfig;
use crate::metrics::Metrics;

/// How often a gateway waiting for another one's IAM fetch looks for the entry.
const LOCK_POLL: Duration = Duration::from_millis(10);
/// How often a down shared cache is probed, and the invalidation channel pinged.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Deletes the lock only if it is still ours (it may have expired and been taken by another).
const UNLOCK_SCRIPT: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Whether Redis refused a read because the key holds another type than a string.
fn wrong_type(err: &redis::RedisError) -> bool {
    err.code() == Some("WRONGTYPE") || err.kind() == redis::ErrorKind::UnexpectedReturnType
}

/// What a read of the shared cache gave.
#[derive(Debug)]
pub enum Read {
    Hit(FleetEntry),
    Miss,
    /// Redis is down, slow or failed: go on without it.
    Unavailable,
    /// A value that did not open (tampered, forged, another secret): ignored.
    Rejected,
}

/// The fleet-wide fetch lock for one token.
#[derive(Debug)]
pub enum Lock {
    /// This gateway asks the IAM; the others wait. Holds the lock's random value.
    Acquired(String),
    /// Another gateway is asking the IAM right now.
    Held,
    Unavailable,
}

/// What the invalidation channel tells the local cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    /// Another gateway purged this user (`None`: everyone).
    Purge(Option<String>),
    /// The channel was lost and is back: messages may have been missed, so entries learnt
    /// before this instant cannot be trusted to be current.
    Resync(Instant),
}

/// The fleet's Redis. Shared by the token cache, the admin API and two background tasks.
pub struct SharedCache {
    client: redis::Client,
    pool: Vec<ConnectionManager>,
    next: AtomicUsize,
    keys: FleetKeys,
    prefix: String,
    channel: String,
    command_timeout: Duration,
    connect_timeout: Duration,
    /// How long a fetch lock lives: the holder's IAM calls (verify, then the MFA lookups) and a
    /// margin. A holder that dies only delays the others by this much.
    lock_ttl: Duration,
    /// Lifetime of a user's index set: at least that of any entry in it.
    index_ttl: Duration,
    /// Whether Redis answered the last command; while false nobody waits for it.
    up: AtomicBool,
    /// This gateway's id on the invalidation channel (its own messages are skipped).
    origin: String,
    metrics: Arc<Metrics>,
}

impl SharedCache {
    /// Builds the client and its connections lazily: a Redis that is down at start is a Redis
    /// that is down, not a start-up failure.
    pub fn new(
        config: &SharedCacheConfig,
        iam_timeout: Duration,
        longest_entry: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<SharedCache>> {
        let mut info = config
            .redis_url
            .as_str()
            .into_connection_info()
            .context("cache.shared.redis_url")?;
        if let Some(password) = &config.password {
            let password =
                std::str::from_utf8(&password.0).context("cache.shared.password_file")?;
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match &config.ca_file {
            None => redis::Client::open(info),
            Some(ca_file) => {
                let root_cert = std::fs::read(ca_file)
                    .with_context(|| format!("cache.shared.ca_file: {}", ca_file.display()))?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
        }
        .context("cache.shared.redis_url")?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(PROBE_EVERY);
        let pool = (0..config.pool_size)
            .map(|_| {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            })
            .collect::<Result<Vec<_>, _>>()
            .context("cache.shared")?;
        let mut origin = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut origin);
        metrics.shared_cache_up.set(0);
        Ok(Arc::new(SharedCache {
            client,
            pool,
            next: AtomicUsize::new(0),
            keys: FleetKeys::derive(&config.secret.0),
            prefix: config.key_prefix.clone(),
            channel: format!("{}invalidate", config.key_prefix),
            command_timeout: config.command_timeout,
            connect_timeout: config.connect_timeout,
            lock_ttl: iam_timeout * 2 + Duration::from_secs(1),
            index_ttl: longest_entry,
            up: AtomicBool::new(true),
            origin: hex::encode(origin),
            metrics,
        }))
    }

    /// The fleet's keys (the token cache keys its entries with the same HMAC).
    pub fn keys(&self) -> &FleetKeys {
        &self.keys
    }

    /// How long [`SharedCache::wait_for`] may wait: the lock's lifetime.
    pub fn lock_ttl(&self) -> Duration {
        self.lock_ttl
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn entry_key(&self, key: &[u8; 32]) -> String {
        format!("{}e:{}", self.prefix, hex::encode(key))
    }

    fn lock_key(&self, key: &[u8; 32]) -> String {
        format!("{}l:{}", self.prefix, hex::encode(key))
    }

    fn index_key(&self, user_id: &str) -> String {
        format!("{}u:{}", self.prefix, self.keys.user_tag(user_id))
    }

    fn connection(&self) -> ConnectionManager {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        self.pool[index].clone()
    }

    /// Runs one Redis exchange within `command_timeout`; a failure marks Redis down.
    async fn command<T>(
        &self,
        what: &'static str,
        exchange: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.command_timeout, exchange).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                self.went_down(what, &err.to_string());
                None
            }
            Err(_) => {
                self.went_down(what, "timed out");
                None
            }
        }
    }

    /// Marks Redis down, logging the change once. Starts "up" so that a Redis that is
    /// unreachable at start is logged too.
    fn went_down(&self, what: &str, cause: &str) {
        self.metrics.shared_cache_up.set(0);
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                command = what,
                cause,
                "shared cache (Redis) unavailable: going on with the local cache and the IAM"
            );
        }
    }

    fn came_up(&self) {
        self.metrics.shared_cache_up.set(1);
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!("shared cache (Redis) reachable");
        }
    }

    /// The entry another gateway stored for this token key, if any.
    pub async fn read(&self, key: &[u8; 32]) -> Read {
        if !self.is_up() {
            return Read::Unavailable;
        }
        let mut connection = self.connection();
        let entry_key = self.entry_key(key);
        let get = connection.get::<_, Option<Vec<u8>>>(&entry_key);
        // A key of another type (someone wrote a list there) is garbage in one key, not a
        // Redis outage.
        let get = async {
            match get.await {
                Err(err) if wrong_type(&err) => Ok(Err(())),
                other => other.map(Ok),
            }
        };
        match self.command("GET", get).await {
            None => Read::Unavailable,
            Some(Err(())) => {
                tracing::warn!(
                    "shared cache entry rejected: not a string value; ignored, asking the IAM"
                );
                Read::Rejected
            }
            Some(Ok(None)) => Read::Miss,
            Some(Ok(Some(sealed))) => self.open(key, &sealed),
        }
    }

    fn open(&self, key: &[u8; 32], sealed: &[u8]) -> Read {
        match self.keys.open_entry(key, sealed) {
            Ok(entry) => Read::Hit(entry),
            Err(reason) => {
                tracing::warn!(%reason, "shared cache entry rejected: ignored, asking the IAM");
                Read::Rejected
            }
        }
    }

    /// Takes the fleet-wide fetch lock for a token key (`SET NX PX`). This is a lease, not a
    /// mutex: if its holder dies, it expires after [`SharedCache::lock_ttl`], and a waiter that
    /// sees it gone without an entry asks the IAM itself. So one IAM fetch per token per fleet
    /// while Redis is healthy, and a bounded duplicate (one per waiting gateway) when the holder
    /// fails.
    pub async fn lock(&self, key: &[u8; 32]) -> Lock {
        if !self.is_up() {
            return Lock::Unavailable;
        }
        let mut value = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut value);
        let value = hex::encode(value);
        let mut connection = self.connection();
        let mut set = redis::cmd("SET");
        set.arg(self.lock_key(key))
            .arg(&value)
            .arg("NX")
            .arg("PX")
            .arg(self.lock_ttl.as_millis() as u64);
        let set = set.query_async::<Option<String>>(&mut connection);
        match self.command("SET NX", set).await {
            None => Lock::Unavailable,
            Some(Some(_)) => Lock::Acquired(value),
            Some(None) => Lock::Held,
        }
    }

    /// Waits while another gateway holds the lock: the entry it stores, or `None` once the lock
    /// is gone without one (its IAM call failed: IAM errors are never cached), Redis fails, or
    /// the lock's lifetime has passed.
    pub async fn wait_for(&self, key: &[u8; 32]) -> Option<FleetEntry> {
        let deadline = tokio::time::Instant::now() + self.lock_ttl;
        let entry_key = self.entry_key(key);
        let lock_key = self.lock_key(key);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(LOCK_POLL).await;
            let mut connection = self.connection();
            // The lock first, then the entry: the holder stores the entry before it lets go of
            // the lock, so a lock seen gone means the entry (if any) is already there. Read the
            // other way round, the holder's store and unlock could both land between the two
            // reads, and this gateway would ask the IAM a second time.
            let mut look = redis::pipe();
            look.exists(&lock_key).get(&entry_key);
            let look = look.query_async::<(bool, Option<Vec<u8>>)>(&mut connection);
            match self.command("EXISTS+GET", look).await? {
                (_, Some(sealed)) => {
                    return match self.open(key, &sealed) {
                        Read::Hit(entry) => Some(entry),
                        _ => None,
                    }
                }
                (false, None) => return None,
                (true, None) => {}
            }
        }
        None
    }

    /// Stores what this gateway learnt, for the rest of the fleet, and releases the lock if it
    /// held it. In the background: the request that learnt it does not wait for Redis.
    pub fn store(self: &Arc<Self>, key: [u8; 32], entry: FleetEntry, lock: Option<String>) {
        if !self.is_up() {
            return;
        }
        let lifetime = entry
            .fresh_until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let shared = self.clone();
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            if !lifetime.is_zero() {
                let sealed = shared.keys.seal_entry(&key, &entry);
                let entry_key = shared.entry_key(&key);
                pipe.cmd("SET")
                    .arg(&entry_key)
                    .arg(sealed)
                    .arg("PX")
                    .arg(lifetime.as_millis().max(1) as u64)
                    .ignore();
                if let crate::iam::TokenStatus::Valid(facts) = &entry.status {
                    let index_key = shared.index_key(&facts.identity.user_id());
                    pipe.sadd(&index_key, &entry_key)
                        .ignore()
                        .pexpire(&index_key, shared.index_ttl.as_millis() as i64)
                        .ignore();
                }
            }
            if let Some(value) = &lock {
                pipe.cmd("EVAL")
                    .arg(UNLOCK_SCRIPT)
                    .arg(1)
                    .arg(shared.lock_key(&key))
                    .arg(value)
                    .ignore();
            }
            let mut connection = shared.connection();
            shared
                .command("SET", pipe.query_async::<()>(&mut connection))
                .await;
        });
    }

    /// Releases the lock, if held, without storing anything, so that waiters stop waiting and
    /// ask the IAM themselves; in the background.
    pub fn store_nothing(self: &Arc<Self>, key: [u8; 32], lock: Option<String>) {
        if let Some(value) = lock {
            let shared = self.clone();
            tokio::spawn(async move { shared.unlock(&key, &value).await });
        }
    }

    /// Releases a lock without storing anything (the IAM failed), so that waiters stop waiting.
    pub async fn unlock(&self, key: &[u8; 32], value: &str) {
        let mut connection = self.connection();
        let mut unlock = redis::cmd("EVAL");
        unlock
            .arg(UNLOCK_SCRIPT)
            .arg(1)
            .arg(self.lock_key(key))
            .arg(value);
        self.command("EVAL unlock", unlock.query_async::<i64>(&mut connection))
            .await;
    }

    /// Deletes the user's entries from Redis and tells every gateway to drop theirs. Errors are
    /// answered (the caller logs them): a gateway that missed the message resynchronises when
    /// its channel comes back.
    pub async fn purge_user(&self, user_id: &str) -> anyhow::Result<()> {
        let index_key = self.index_key(user_id);
        let mut connection = self.connection();
        let members = tokio::time::timeout(
            self.command_timeout,
            connection.smembers::<_, Vec<String>>(&index_key),
        )
        .await
        .context("SMEMBERS timed out")??;
        let mut pipe = redis::pipe();
        for member in &members {
            pipe.del(member).ignore();
        }
        pipe.del(&index_key).ignore();
        tokio::time::timeout(
            self.command_timeout,
            pipe.query_async::<()>(&mut connection),
        )
        .await
        .context("DEL timed out")??;
        self.publish(Some(user_id)).await
    }

    /// Deletes every entry of the fleet from Redis and tells every gateway to drop theirs.
    pub async fn purge_all(&self) -> anyhow::Result<()> {
        let mut connection = self.connection();
        let pattern = format!("{}[eu]:*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) =
                tokio::time::timeout(self.command_timeout, scan.query_async(&mut connection))
                    .await
                    .context("SCAN timed out")??;
            if !keys.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                unlink.arg(&keys);
                tokio::time::timeout(
                    self.command_timeout,
                    unlink.query_async::<i64>(&mut connection),
                )
                .await
                .context("UNLINK timed out")??;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        self.publish(None).await
    }

    async fn publish(&self, user_id: Option<&str>) -> anyhow::Result<()> {
        let message = self.keys.seal_invalidation(&Invalidation {
            origin: self.origin.clone(),
            user_id: user_id.map(str::to_string),
        });
        let mut connection = self.connection();
        tokio::time::timeout(
            self.command_timeout,
            connection.publish::<_, _, i64>(&self.channel, message),
        )
        .await
        .context("PUBLISH timed out")??;
        self.metrics
            .shared_cache_invalidations
            .with_label_values(&["published"])
            .inc();
        Ok(())
    }

    /// Sends `PING` on every pooled connection (within `connect_timeout`), so that each one
    /// has reconnected after an outage before requests use it again; marks Redis up if all
    /// answer.
    pub async fn probe_once(&self) -> bool {
        let pings = self.pool.iter().map(|connection| {
            let mut connection = connection.clone();
            async move {
                let ping = redis::cmd("PING");
                let ping = ping.query_async::<String>(&mut connection);
                match tokio::time::timeout(self.connect_timeout, ping).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err("timed out".to_string()),
                }
            }
        });
        match futures_util::future::join_all(pings)
            .await
            .into_iter()
            .find_map(Result::err)
        {
            None => {
                self.came_up();
                true
            }
            Some(cause) => {
                self.went_down("PING", &cause);
                false
            }
        }
    }

    /// Probes a down Redis every second until it answers; runs until `stop`.
    pub async fn probe(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::server::stopped(&mut stop) => return,
            }
            if !self.is_up() {
                self.probe_once().await;
            }
        }
    }

    /// Listens on the invalidation channel and hands what it hears to `events`; reconnects by
    /// itself, and after any gap (lost connection, failed ping, no Redis at start) sends
    /// [`FleetEvent::Resync`] once the channel is back. Runs until `stop`.
    pub async fn listen(
        self: Arc<Self>,
        events: mpsc::UnboundedSender<FleetEvent>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut gap = false;
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                    _ = crate::server::stopped(&mut stop) => return,
                }
            }
            first = false;
            let subscribed = tokio::time::timeout(self.connect_timeout, async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            let pubsub = match subscribed {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(err)) => {
                    self.channel_lost(&mut gap, &err.to_string());
                    continue;
                }
                Err(_) => {
                    self.channel_lost(&mut gap, "connect timed out");
                    continue;
                }
            };
            if std::mem::take(&mut gap) {
                self.metrics
                    .shared_cache_invalidations
                    .with_label_values(&["resync"])
                    .inc();
                tracing::info!("fleet invalidation channel back: dropping local entries learnt while it was down");
                let _ = events.send(FleetEvent::Resync(Instant::now()));
            }
            let (mut sink, mut messages) = pubsub.split();
            let mut ping = tokio::time::interval(PROBE_EVERY);
            let cause = loop {
                tokio::select! {
                    message = messages.next() => match message {
                        Some(message) => self.heard(message.get_payload_bytes(), &events),
                        None => break "connection closed".to_string(),
                    },
                    _ = ping.tick() => {
                        let pong = tokio::time::timeout(self.connect_timeout, sink.ping::<redis::Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            break "ping failed".to_string();
                        }
                    }
                    _ = crate::server::stopped(&mut stop) => return,
                }
            };
            self.channel_lost(&mut gap, &cause);
        }
    }

    fn channel_lost(&self, gap: &mut bool, cause: &str) {
        if !std::mem::replace(gap, true) {
            tracing::warn!(cause, "fleet invalidation channel lost: purges by other gateways are missed until it is back");
        }
    }

    fn heard(&self, payload: &[u8], events: &mpsc::UnboundedSender<FleetEvent>) {
        match self.keys.open_invalidation(payload) {
            Ok(message) if message.origin == self.origin => {}
            Ok(message) => {
                self.metrics
                    .shared_cache_invalidations
                    .with_label_values(&["received"])
                    .inc();
                let _ = events.send(FleetEvent::Purge(message.user_id));
            }
            Err(reason) => {
                // Counted with the rejected entries: the same security signal (someone without
                // the fleet secret writes to this Redis, or two fleets share a prefix).
                self.metrics
                    .shared_cache_requests
                    .with_label_values(&["rejected"])
                    .inc();
                tracing::warn!(%reason, "invalidation message rejected: ignored");
            }
        }
    }
}
