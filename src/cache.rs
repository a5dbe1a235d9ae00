//! The per-token cache: what the IAM said about a token, kept for a while so that the common
//! request costs no IAM round trip.
//!
//! - Keys are an HMAC-SHA256 of the token under a random per-process key: a heap dump or a debug
//!   print of the cache never yields a usable token, and nobody can precompute keys.
//! - Lifetimes: `cache.ttl` for users the policy lets through, `cache.negative_ttl` for users it
//!   blocks and for invalid tokens (so a user who just bound an MFA device waits seconds, not
//!   minutes), never beyond the token's own `expires_at`.
//! - Concurrent misses for one token share one IAM fetch. The fetch runs in its own task, so a
//!   client that hangs up does not cancel the lookup others are waiting on.
//! - IAM errors are never cached. While the IAM fails, an expired entry may still answer for
//!   `cache.stale_if_error` (an allow as well as a deny), never past the token's expiry.
//! - Invalid tokens live in a separate, smaller cache: a flood of bogus tokens cannot evict the
//!   entries of real users.
//! - With `[cache.shared]` ([`shared`]) a local miss asks the fleet's Redis before the IAM, one
//!   gateway of the fleet fetches a token while the others wait for its answer, and purges reach
//!   every gateway. Keys are then the HMAC under the fleet's secret (still never the token).

pub mod memo;
pub mod seal;
pub mod shared;
mod stamp;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use hmac::{Hmac, Mac};
use moka::future::Cache;
use moka::Expiry;
use rand::RngCore;
use sha2::Sha256;

use self::memo::{KeyMemo, Recalled};
use self::seal::FleetEntry;
use self::shared::{FleetEvent, Lock, Read, SharedCache};
use self::stamp::Stamp;
use crate::auth::token::Token;
use crate::config::CacheConfig;
use crate::iam::{IamError, IamProvider, Needs, TokenStatus};
use crate::metrics::Metrics;
use crate::policy::Policy;

/// HMAC-SHA256 of a token: what the fleet's Redis is asked for, and what coalesces fetches.
type Key = [u8; 32];

/// What this gateway's moka caches are keyed by: the first half of the [`Key`] (HMAC-SHA256-128,
/// a truncation RFC 2104 allows). moka keeps every key in an `Arc` of its own: 32 bytes instead of
/// 48 per cached token. Two tokens of one gateway would share an entry only if their keys
/// collided in 128 bits under a secret key: about 2^-89 for a million cached tokens.
type LocalKey = [u8; 16];

fn local(key: &Key) -> LocalKey {
    let mut half = [0u8; 16];
    half.copy_from_slice(&key[..16]);
    half
}

/// An in-flight IAM fetch that any number of requests can await.
type Fetch = Shared<BoxFuture<'static, Result<Entry, Arc<IamError>>>>;

/// What the IAM said about a token, and until when that may be used.
///
/// moka holds it by value (it clones it on every `get`: one reference count and three
/// stamps), which saves the cached token a heap block of its own; [`Stamp`]s rather than
/// `Instant`s keep moka's block for it 24 bytes smaller.
#[derive(Debug, Clone)]
struct Entry {
    status: TokenStatus,
    /// Served as a hit until then.
    fresh_until: Stamp,
    /// Kept until then, served only while the IAM is failing.
    stale_until: Stamp,
    /// When this gateway learnt it (from the IAM or the fleet): after a gap in the fleet's
    /// invalidation channel, older entries may describe a purged user.
    learnt: Stamp,
}

impl Entry {
    /// Whether it may be served as a hit.
    fn is_fresh(&self) -> bool {
        Stamp::now() < self.fresh_until
    }
}

/// moka evicts an entry once even its stale window is over.
struct UntilStale;

impl Expiry<LocalKey, Entry> for UntilStale {
    fn expire_after_create(&self, _: &LocalKey, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.stale_until.after(now))
    }

    fn expire_after_update(
        &self,
        _: &LocalKey,
        entry: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.stale_until.after(now))
    }
}

/// What a purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Entries dropped from this gateway's cache.
    pub local: u64,
    pub fleet: FleetPurge,
}

/// Whether a purge reached the rest of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetPurge {
    /// No `[cache.shared]`: this gateway is the whole fleet.
    Off,
    /// Deleted from Redis and announced on the invalidation channel.
    Published,
    /// Redis failed (logged at ERROR): the others keep their entries until their channel
    /// resynchronises or the entries expire.
    Failed,
}

impl FleetPurge {
    /// The admin answer's `fleet` field; none without a shared cache.
    pub fn label(self) -> Option<&'static str> {
        match self {
            FleetPurge::Off => None,
            FleetPurge::Published => Some("published"),
            FleetPurge::Failed => Some("failed"),
        }
    }
}

impl From<anyhow::Result<()>> for FleetPurge {
    fn from(result: anyhow::Result<()>) -> Self {
        match result {
            Ok(()) => FleetPurge::Published,
            Err(err) => {
                tracing::error!(cause = %format!("{err:#}"), "fleet-wide purge failed: other gateways keep their entries until their invalidation channel resynchronises or the entries expire");
                FleetPurge::Failed
            }
        }
    }
}

/// How a lookup was answered, for `mfa_gate_cache_lookups_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    /// An expired entry served because the IAM failed.
    Stale,
}

impl CacheResult {
    /// Index into [`crate::metrics::CACHE_RESULTS`].
    fn index(self) -> usize {
        match self {
            CacheResult::Hit => 0,
            CacheResult::Miss => 1,
            CacheResult::Stale => 2,
        }
    }
}

/// Numbers the caches of this process, for [`KeyMemo`]: a key is reused only with its cache.
static CACHE_IDS: AtomicU64 = AtomicU64::new(0);

struct Inner {
    /// This cache among the process's (see [`CACHE_IDS`]).
    id: u64,
    /// Valid tokens (with or without MFA).
    valid: Cache<LocalKey, Entry>,
    /// Tokens the IAM called invalid.
    invalid: Cache<LocalKey, Entry>,
    inflight: Mutex<HashMap<Key, Fetch>>,
    /// Bumped by every purge. A fetch that started before a purge answers the requests
    /// waiting on it but is not cached (here or in the fleet): it may describe what the purge
    /// was meant to forget, e.g. an MFA device disabled while the IAM call was in flight.
    purges: AtomicU64,
    /// Bumped after entries left the caches by invalidation (a purge, or an answer that raced
    /// one): a connection's remembered answer ([`KeyMemo`]) read before is not used again.
    /// Unlike `purges`, bumped once the entries are gone, so that an answer read during a
    /// purge is not remembered as current.
    forgets: AtomicU64,
    /// The keyed HMAC state, cloned per token (the key schedule is computed once).
    mac: Hmac<Sha256>,
    /// Replaced when a config reload changes `[iam]` (and then the entries are purged).
    provider: ArcSwap<Arc<dyn IamProvider>>,
    policy: Arc<ArcSwap<Policy>>,
    config: CacheConfig,
    /// `[cache.shared]`: the fleet's Redis, when configured.
    shared: Option<Arc<SharedCache>>,
    metrics: Arc<Metrics>,
}

/// The token cache in front of an IAM provider. Cheap to clone.
#[derive(Clone)]
pub struct TokenCache(Arc<Inner>);

impl TokenCache {
    pub fn new(
        provider: Arc<dyn IamProvider>,
        policy: Arc<ArcSwap<Policy>>,
        config: CacheConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        TokenCache::with_shared(provider, policy, config, None, metrics)
    }

    /// A cache whose misses ask the fleet's shared cache (if any) before the IAM.
    pub fn with_shared(
        provider: Arc<dyn IamProvider>,
        policy: Arc<ArcSwap<Policy>>,
        config: CacheConfig,
        shared: Option<Arc<SharedCache>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mac = match &shared {
            Some(shared) => shared.keys().token_mac().clone(),
            None => {
                let mut secret = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut secret);
                Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC takes any key length")
            }
        };
        let invalid_capacity = (config.max_entries / 4).clamp(1, 100_000);
        // Before any entry: see `Stamp`.
        Stamp::init();
        TokenCache(Arc::new(Inner {
            id: CACHE_IDS.fetch_add(1, Ordering::Relaxed),
            valid: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(UntilStale)
                .build(),
            invalid: Cache::builder()
                .max_capacity(invalid_capacity)
                .expire_after(UntilStale)
                .build(),
            inflight: Mutex::new(HashMap::new()),
            purges: AtomicU64::new(0),
            forgets: AtomicU64::new(0),
            mac,
            provider: ArcSwap::from_pointee(provider),
            policy,
            config,
            shared,
            metrics,
        }))
    }

    /// The fleet's shared cache, when configured.
    pub fn shared(&self) -> Option<&Arc<SharedCache>> {
        self.0.shared.as_ref()
    }

    fn key(&self, token: &Token) -> Key {
        self.0
            .mac
            .clone()
            .chain_update(token.expose().as_bytes())
            .finalize()
            .into_bytes()
            .into()
    }

    /// What is known about `token`: from the cache, or fetched from the IAM.
    pub async fn lookup(&self, token: &Token) -> Result<(TokenStatus, CacheResult), Arc<IamError>> {
        self.lookup_key(self.key(token), token).await
    }

    /// The answer the client connection's `memo` remembers for `token` while it is fresh (and
    /// nothing was purged since), counted as a hit: what [`TokenCache::lookup_on`] answers
    /// without a lookup, known at once, if it is still fresh at `now` (the caller's reading of
    /// the clock). `None`: the answer must be looked up.
    pub fn remembered_on(
        &self,
        token: &Token,
        memo: &KeyMemo,
        now: Instant,
    ) -> Option<(TokenStatus, CacheResult)> {
        let forgets = self.0.forgets.load(Ordering::Acquire);
        match memo.recall(self.0.id, token, forgets, Stamp::at(now)) {
            Recalled::Answer(status) => Some(self.counted(status, CacheResult::Hit)),
            Recalled::Key(_) | Recalled::Nothing => None,
        }
    }

    /// [`TokenCache::lookup`] for a request on a client connection whose last token `memo`
    /// remembers: the same token again costs no HMAC, and while the cache's answer for it is
    /// fresh (and nothing was purged since), no cache lookup either.
    pub async fn lookup_on(
        &self,
        token: &Token,
        memo: &KeyMemo,
    ) -> Result<(TokenStatus, CacheResult), Arc<IamError>> {
        // Read before the cache is: an invalidation from here on makes the answer a memo.
        let forgets = self.0.forgets.load(Ordering::Acquire);
        let key = match memo.recall(self.0.id, token, forgets, Stamp::now()) {
            Recalled::Answer(status) => return Ok(self.counted(status, CacheResult::Hit)),
            Recalled::Key(key) => key,
            Recalled::Nothing => {
                let key = self.key(token);
                memo.remember(self.0.id, token, key);
                key
            }
        };
        // Boxed: on a kept-alive connection the answer is usually remembered (above), and
        // inline, the cache's lookup future (moka's, and the fetch's) would make every
        // request's future a kilobyte larger, copied whenever the future is.
        let (entry, result) = Box::pin(self.lookup_entry(key, token)).await?;
        // Only an answer read from the cache: a fetch's answer may have raced a purge (and be
        // taken out again right after), one read from the cache after `forgets` has not.
        if result == CacheResult::Hit {
            memo.learn(self.0.id, &key, forgets, entry.clone());
        }
        Ok((entry.status, result))
    }

    async fn lookup_key(
        &self,
        key: Key,
        token: &Token,
    ) -> Result<(TokenStatus, CacheResult), Arc<IamError>> {
        let (entry, result) = self.lookup_entry(key, token).await?;
        Ok((entry.status, result))
    }

    /// The entry for `key`: a fresh one from the cache, else fetched, else (while the IAM
    /// fails) a stale one. Counted under its result.
    async fn lookup_entry(
        &self,
        key: Key,
        token: &Token,
    ) -> Result<(Entry, CacheResult), Arc<IamError>> {
        let cached = self.0.cached(&key).await;
        if let Some(entry) = cached.as_ref().filter(|entry| entry.is_fresh()) {
            return Ok(self.counted(entry.clone(), CacheResult::Hit));
        }
        match self.fetch(key, token).await {
            Ok(entry) => Ok(self.counted(entry, CacheResult::Miss)),
            Err(err) => match cached {
                Some(entry) if Stamp::now() < entry.stale_until => {
                    tracing::warn!(cause = %err, "IAM failing; serving a stale cache entry");
                    Ok(self.counted(entry, CacheResult::Stale))
                }
                _ => {
                    self.count(CacheResult::Miss);
                    Err(err)
                }
            },
        }
    }

    fn counted<T>(&self, found: T, result: CacheResult) -> (T, CacheResult) {
        self.count(result);
        (found, result)
    }

    fn count(&self, result: CacheResult) {
        self.0.metrics.hot.cache_result(result.index());
    }

    /// Joins the fetch in flight for `key`, or starts one in its own task.
    fn fetch(&self, key: Key, token: &Token) -> Fetch {
        let mut inflight = self.0.inflight.lock().expect("inflight lock poisoned");
        if let Some(fetch) = inflight.get(&key) {
            return fetch.clone();
        }
        let inner = self.0.clone();
        let token = token.clone();
        let task = tokio::spawn(async move {
            // The fetch this lookup missed may have ended between its look at the cache and
            // its look here: then its answer is cached by now (it is inserted before the fetch
            // leaves `inflight`), and neither the fleet nor the IAM is asked again.
            let result = match inner.cached(&key).await.filter(Entry::is_fresh) {
                Some(entry) => Ok(entry),
                None => inner.resolve(key, &token).await,
            };
            inner
                .inflight
                .lock()
                .expect("inflight lock poisoned")
                .remove(&key);
            result
        });
        let fetch = async move {
            task.await.unwrap_or_else(|err| {
                Err(Arc::new(IamError::Transport {
                    api: "lookup",
                    detail: format!("lookup task failed: {err}"),
                }))
            })
        }
        .boxed()
        .shared();
        inflight.insert(key, fetch.clone());
        fetch
    }

    /// Asks a different IAM from now on. Entries learnt from the old one are dropped: they may
    /// describe tokens of another account or region.
    pub async fn replace_provider(&self, provider: Arc<dyn IamProvider>) -> u64 {
        self.0.provider.store(Arc::new(provider));
        self.purge_all_local().await
    }

    /// Drops every entry, here and (with `[cache.shared]`) in the whole fleet.
    pub async fn purge_all(&self) -> Purged {
        let local = self.purge_all_local().await;
        let fleet = match &self.0.shared {
            None => FleetPurge::Off,
            Some(shared) => FleetPurge::from(shared.purge_all().await),
        };
        Purged { local, fleet }
    }

    /// Drops every entry of one user, here and (with `[cache.shared]`) in the whole fleet.
    pub async fn purge_user(&self, user_id: &str) -> Purged {
        let local = self.purge_user_local(user_id).await;
        let fleet = match &self.0.shared {
            None => FleetPurge::Off,
            Some(shared) => FleetPurge::from(shared.purge_user(user_id).await),
        };
        Purged { local, fleet }
    }

    /// Applies what the fleet's invalidation channel says, until the channel's sender is gone.
    pub async fn follow_fleet(&self, mut events: tokio::sync::mpsc::UnboundedReceiver<FleetEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                FleetEvent::Purge(Some(user_id)) => {
                    let purged = self.purge_user_local(&user_id).await;
                    tracing::info!(user_id = %user_id, purged, "fleet purge: user's entries dropped");
                }
                FleetEvent::Purge(None) => {
                    let purged = self.purge_all_local().await;
                    tracing::info!(purged, "fleet purge: every entry dropped");
                }
                FleetEvent::Resync(since) => {
                    let purged = self.purge_learnt_before(since).await;
                    tracing::info!(
                        purged,
                        "fleet resync: entries learnt before the channel came back dropped"
                    );
                }
            }
        }
    }

    /// Drops every entry learnt before `instant`; answers how many.
    async fn purge_learnt_before(&self, instant: Instant) -> u64 {
        self.0.purges.fetch_add(1, Ordering::AcqRel);
        let instant = Stamp::at(instant);
        let mut purged = 0;
        for cache in [&self.0.valid, &self.0.invalid] {
            let keys: Vec<Arc<LocalKey>> = cache
                .iter()
                .filter(|(_, entry)| entry.learnt < instant)
                .map(|(key, _)| key)
                .collect();
            for key in &keys {
                cache.invalidate(key.as_ref()).await;
            }
            purged += keys.len() as u64;
        }
        self.0.forgets.fetch_add(1, Ordering::AcqRel);
        purged
    }

    /// Drops every entry of this gateway; answers how many there were.
    async fn purge_all_local(&self) -> u64 {
        self.0.purges.fetch_add(1, Ordering::AcqRel);
        let count = (self.0.valid.iter().count() + self.0.invalid.iter().count()) as u64;
        self.0.valid.invalidate_all();
        self.0.invalid.invalidate_all();
        self.0.valid.run_pending_tasks().await;
        self.0.invalid.run_pending_tasks().await;
        self.0.forgets.fetch_add(1, Ordering::AcqRel);
        count
    }

    /// Drops every entry of one user in this gateway; answers how many there were.
    async fn purge_user_local(&self, user_id: &str) -> u64 {
        self.0.purges.fetch_add(1, Ordering::AcqRel);
        let keys: Vec<Arc<LocalKey>> = self
            .0
            .valid
            .iter()
            .filter(|(_, entry)| match &entry.status {
                TokenStatus::Valid(facts) => facts.identity.user_id() == user_id,
                TokenStatus::Invalid => false,
            })
            .map(|(key, _)| key)
            .collect();
        for key in &keys {
            self.0.valid.invalidate(key.as_ref()).await;
        }
        self.0.forgets.fetch_add(1, Ordering::AcqRel);
        keys.len() as u64
    }

    /// Entries held right now (after pending evictions are applied).
    pub async fn entry_count(&self) -> u64 {
        self.0.valid.run_pending_tasks().await;
        self.0.invalid.run_pending_tasks().await;
        self.0.valid.entry_count() + self.0.invalid.entry_count()
    }
}

impl Inner {
    /// This gateway's entry for `key`, fresh or not.
    async fn cached(&self, key: &Key) -> Option<Entry> {
        match self.valid.get(&local(key)).await {
            Some(entry) => Some(entry),
            None => self.invalid.get(&local(key)).await,
        }
    }

    /// A miss: the fleet's entry if another gateway has one (or is fetching it right now), else
    /// the IAM's answer, which is then shared.
    async fn resolve(&self, key: Key, token: &Token) -> Result<Entry, Arc<IamError>> {
        let purges = self.purges.load(Ordering::Acquire);
        let policy = self.policy.load_full();
        let Some(shared) = &self.shared else {
            return self.ask_iam(key, token, &policy, purges).await;
        };
        let needs = policy.needs();
        let (result, lock) = match shared.read(&key).await {
            Read::Hit(found) if usable(&found, needs) => {
                self.count_shared("hit");
                return Ok(self.insert(key, self.entry_from_fleet(found), purges).await);
            }
            Read::Hit(_) | Read::Miss => ("miss", shared.lock(&key).await),
            Read::Rejected => ("rejected", shared.lock(&key).await),
            Read::Unavailable => ("error", Lock::Unavailable),
        };
        if let Lock::Acquired(value) = &lock {
            // Another gateway may have stored its answer and let go of the lock between the
            // read above and taking the lock: look once more before asking the IAM.
            if let Read::Hit(found) = shared.read(&key).await {
                if usable(&found, needs) {
                    shared.unlock(&key, value).await;
                    self.count_shared("hit");
                    return Ok(self.insert(key, self.entry_from_fleet(found), purges).await);
                }
            }
        }
        if let Lock::Held = lock {
            match shared.wait_for(&key).await {
                Some(found) if usable(&found, needs) => {
                    self.count_shared("hit");
                    return Ok(self.insert(key, self.entry_from_fleet(found), purges).await);
                }
                // The holder failed, Redis failed, or the lock lapsed: ask the IAM ourselves.
                _ => {}
            }
        }
        self.count_shared(if shared.is_up() { result } else { "error" });
        let lock = match lock {
            Lock::Acquired(value) => Some(value),
            Lock::Held | Lock::Unavailable => None,
        };
        match self.ask_iam(key, token, &policy, purges).await {
            Ok(entry) => {
                let lifetime = entry.fresh_until.after(Instant::now());
                let shared_entry = FleetEntry {
                    status: entry.status.clone(),
                    fresh_until: SystemTime::now() + lifetime,
                };
                if self.purged_since(purges) {
                    shared.store_nothing(key, lock);
                } else {
                    shared.store(key, shared_entry, lock);
                }
                Ok(entry)
            }
            Err(err) => {
                if let Some(value) = lock {
                    shared.unlock(&key, &value).await;
                }
                Err(err)
            }
        }
    }

    fn count_shared(&self, result: &'static str) {
        self.metrics
            .shared_cache_requests
            .with_label_values(&[result])
            .inc();
    }

    /// Asks the IAM and caches its answer here.
    async fn ask_iam(
        &self,
        key: Key,
        token: &Token,
        policy: &Policy,
        purges: u64,
    ) -> Result<Entry, Arc<IamError>> {
        let provider = self.provider.load_full();
        match provider.lookup(token, policy.needs()).await {
            Ok(status) => Ok(self
                .insert(key, self.entry_for(status, policy), purges)
                .await),
            Err(err) => Err(Arc::new(err)),
        }
    }

    /// Whether a purge happened since the fetch that read `purges` began.
    fn purged_since(&self, purges: u64) -> bool {
        self.purges.load(Ordering::Acquire) != purges
    }

    /// Caches `entry` unless a purge came while it was being fetched.
    async fn insert(&self, key: Key, entry: Entry, purges: u64) -> Entry {
        let (cache, other) = match entry.status {
            TokenStatus::Valid(_) => (&self.valid, &self.invalid),
            TokenStatus::Invalid => (&self.invalid, &self.valid),
        };
        cache.insert(local(&key), entry.clone()).await;
        // A token has one answer: an older one of the other kind would be found first (the
        // valid cache is read first), asked again as stale on every request, and, while the
        // IAM fails, served — a revoked token let in on its stale "valid".
        other.invalidate(&local(&key)).await;
        if self.purged_since(purges) {
            // The purge may have run before the insert: take it out again (and out of the
            // connections that read it meanwhile).
            cache.invalidate(&local(&key)).await;
            self.forgets.fetch_add(1, Ordering::AcqRel);
            tracing::debug!("a purge came during this fetch: its answer is used once, not cached");
        }
        entry
    }

    /// An entry another gateway learnt: fresh no longer than it said, stale for our own
    /// `stale_if_error` after that, never past the token's expiry.
    fn entry_from_fleet(&self, found: FleetEntry) -> Entry {
        let now = Instant::now();
        let wall = SystemTime::now();
        let until = |at: SystemTime| now + at.duration_since(wall).unwrap_or(Duration::ZERO);
        // Never fresher than this gateway's own ttl allows.
        let fresh_until = until(found.fresh_until).min(now + self.config.ttl);
        let stale_until = match &found.status {
            TokenStatus::Valid(facts) => {
                (fresh_until + self.config.stale_if_error).min(until(facts.expires_at))
            }
            TokenStatus::Invalid => fresh_until + self.config.stale_if_error,
        };
        Entry {
            status: found.status,
            fresh_until: Stamp::at(fresh_until),
            stale_until: Stamp::at(stale_until),
            learnt: Stamp::at(now),
        }
    }

    /// Lifetimes of a fresh IAM answer.
    fn entry_for(&self, status: TokenStatus, policy: &Policy) -> Entry {
        let now = Instant::now();
        let (status, ttl, limit) = match status {
            TokenStatus::Valid(facts) => {
                let remaining = facts
                    .expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                if remaining.is_zero() {
                    // Valid by the IAM's word but already expired by ours: never let it in.
                    (TokenStatus::Invalid, self.config.negative_ttl, None)
                } else {
                    let ttl = if policy.satisfied_everywhere(&facts) {
                        self.config.ttl
                    } else {
                        self.config.negative_ttl
                    };
                    (TokenStatus::Valid(facts), ttl, Some(remaining))
                }
            }
            TokenStatus::Invalid => (TokenStatus::Invalid, self.config.negative_ttl, None),
        };
        let bounded = |d: Duration| limit.map_or(d, |limit| d.min(limit));
        Entry {
            status,
            fresh_until: Stamp::at(now + bounded(ttl)),
            stale_until: Stamp::at(now + bounded(ttl + self.config.stale_if_error)),
            learnt: Stamp::at(now),
        }
    }
}

/// Whether a fleet entry answers for this gateway: still fresh by our clock, and holding every
/// fact our policy needs (a gateway with another policy may have skipped a lookup).
fn usable(found: &FleetEntry, needs: Needs) -> bool {
    if found.fresh_until <= SystemTime::now() {
        return false;
    }
    match &found.status {
        TokenStatus::Invalid => true,
        TokenStatus::Valid(facts) => {
            facts.expires_at > SystemTime::now()
                && (!needs.mfa_device || facts.mfa_device.is_some())
                && (!needs.login_protect || facts.login_protect.is_some())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// moka keeps an `Entry` in its own value block with 24 bytes of its own.
    #[test]
    fn an_entry_is_a_pointer_and_three_stamps() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    #[test]
    fn the_local_key_is_the_first_half_of_the_hmac() {
        let key: Key = std::array::from_fn(|i| i as u8);
        assert_eq!(local(&key), std::array::from_fn(|i| i as u8));
    }

    /// Calls no IAM: every token is invalid; counts the lookups it was asked for.
    #[derive(Default)]
    struct CountingIam(std::sync::atomic::AtomicUsize);

    impl IamProvider for CountingIam {
        fn lookup<'a>(
            &'a self,
            _: &'a Token,
            _: Needs,
        ) -> BoxFuture<'a, Result<TokenStatus, IamError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(TokenStatus::Invalid) })
        }
    }

    /// A minimal valid config (nothing in it is reached).
    fn test_config() -> crate::config::Config {
        crate::config::Config::from_toml(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n[iam]\nendpoint = \"http://127.0.0.1:9\"\n",
            std::path::Path::new("<test>"),
        )
        .expect("a valid config")
    }

    /// A cache in front of `iam` with these `[cache]` settings.
    fn cache_over(iam: Arc<dyn IamProvider>, cache: CacheConfig) -> TokenCache {
        let config = test_config();
        let policy = Arc::new(ArcSwap::from_pointee(Policy::new(
            config.policy.clone(),
            config.allow.clone(),
            Vec::new(),
        )));
        TokenCache::new(iam, policy, cache, Arc::new(Metrics::new()))
    }

    /// Answers what it is told to, in turn; counts the lookups.
    struct ScriptedIam(Mutex<std::collections::VecDeque<Result<TokenStatus, IamError>>>);

    impl IamProvider for ScriptedIam {
        fn lookup<'a>(
            &'a self,
            _: &'a Token,
            _: Needs,
        ) -> BoxFuture<'a, Result<TokenStatus, IamError>> {
            let next = self.0.lock().unwrap().pop_front().expect("an answer left");
            Box::pin(async move { next })
        }
    }

    /// A token the IAM called valid, then (once that answer was stale) invalid, stays invalid
    /// while the IAM fails: the stale "valid" is gone, not served.
    #[tokio::test]
    async fn a_token_revoked_after_its_answer_went_stale_is_never_let_in_on_it() {
        let facts = crate::iam::UserFacts {
            identity: crate::iam::Identity::new("u-1", "alice", "d-1", "acme").unwrap(),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            totp_login: false,
            mfa_device: Some(true),
            login_protect: None,
        };
        let failing = || IamError::Transport {
            api: "test",
            detail: "down".into(),
        };
        let iam = Arc::new(ScriptedIam(Mutex::new(
            [
                Ok(TokenStatus::Valid(Arc::new(facts))),
                Ok(TokenStatus::Invalid),
                Err(failing()),
                Err(failing()),
            ]
            .into(),
        )));
        let config = CacheConfig {
            ttl: Duration::from_millis(30),
            negative_ttl: Duration::from_secs(3600),
            max_entries: 100,
            stale_if_error: Duration::from_secs(3600),
        };
        let cache = cache_over(iam.clone(), config);
        let token = Token::new("a-token-revoked-later");
        let (status, _) = cache.lookup(&token).await.unwrap();
        assert!(matches!(status, TokenStatus::Valid(_)));

        tokio::time::sleep(Duration::from_millis(60)).await;
        let (status, result) = cache.lookup(&token).await.unwrap();
        assert!(matches!(status, TokenStatus::Invalid));
        assert_eq!(result, CacheResult::Miss);

        // The IAM is down now; the fresh "invalid" is the answer, from the cache.
        let (status, result) = cache.lookup(&token).await.unwrap();
        assert!(
            matches!(status, TokenStatus::Invalid),
            "let in on a stale answer"
        );
        assert_eq!(result, CacheResult::Hit);
        assert_eq!(iam.0.lock().unwrap().len(), 2, "the IAM was asked again");
    }

    /// A lookup that missed while another one's fetch was ending reaches `fetch` once that
    /// fetch has left `inflight`: it must take the cached answer, not ask the IAM again.
    #[tokio::test]
    async fn a_fetch_started_after_the_answer_was_cached_does_not_ask_again() {
        let iam = Arc::new(CountingIam::default());
        let cache = cache_over(iam.clone(), test_config().cache);
        let token = Token::new("a-token-nobody-has-seen");
        let (status, result) = cache.lookup(&token).await.unwrap();
        assert!(matches!(status, TokenStatus::Invalid));
        assert_eq!(result, CacheResult::Miss);
        assert_eq!(iam.0.load(Ordering::SeqCst), 1);

        let late = cache.fetch(cache.key(&token), &token).await.unwrap();
        assert!(matches!(late.status, TokenStatus::Invalid));
        assert_eq!(iam.0.load(Ordering::SeqCst), 1, "the IAM was asked again");
    }

    #[test]
    fn each_lookup_result_counts_under_its_own_label() {
        for (result, label) in [
            (CacheResult::Hit, "hit"),
            (CacheResult::Miss, "miss"),
            (CacheResult::Stale, "stale"),
        ] {
            assert_eq!(crate::metrics::CACHE_RESULTS[result.index()], label);
        }
    }
}
