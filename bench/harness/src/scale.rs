//! Cache scale: resident memory of `mfa_gate::cache::TokenCache` holding N distinct tokens.
//!
//! Runs in its own process (one per N, so that allocator state does not carry over): the cache
//! is built exactly as the gateway builds it, in front of a fake provider that answers every
//! token at once with its own, realistically sized user facts (a new `Arc<UserFacts>` per
//! token, as a real IAM answer is). It is filled through `TokenCache::lookup`, the gateway's
//! own path (HMAC key, coalescing map, moka insert).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use mfa_gate::auth::token::Token;
use mfa_gate::cache::TokenCache;
use mfa_gate::config::Config;
use mfa_gate::iam::{IamError, IamProvider, Identity, Needs, TokenStatus, UserFacts};
use mfa_gate::metrics::Metrics;
use mfa_gate::policy::Policy;

use crate::procs::status_kib;

struct FakeIam;

impl IamProvider for FakeIam {
    fn lookup<'a>(
        &'a self,
        token: &'a Token,
        _needs: Needs,
    ) -> BoxFuture<'a, Result<TokenStatus, IamError>> {
        // 32-hex ids and short names, as Huawei IAM has them.
        let n = token.expose().len();
        let facts = UserFacts {
            identity: Identity::new(
                &format!("{:032x}", n as u128 ^ rand::random::<u128>()),
                &format!("user-{:08x}", rand::random::<u32>()),
                &format!("{:032x}", rand::random::<u128>()),
                "bench-domain",
            )
            .expect("a short identity"),
            expires_at: SystemTime::now() + Duration::from_secs(12 * 3600),
            totp_login: true,
            mfa_device: Some(true),
            login_protect: None,
        };
        Box::pin(async move { Ok(TokenStatus::Valid(Arc::new(facts))) })
    }
}

/// Fills a cache with `entries` tokens; prints one JSON line.
pub async fn run(entries: u64) -> anyhow::Result<()> {
    let config = Config::from_toml(
        &format!(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n[iam]\nendpoint = \"http://127.0.0.1:9\"\n\
             [policy]\nrequire = \"mfa_device\"\n[cache]\nttl = \"1h\"\nmax_entries = {}\n",
            (entries * 2).max(1000)
        ),
        Path::new("<bench>"),
    )
    .map_err(|err| anyhow::anyhow!("{err}"))?;
    let policy = Arc::new(ArcSwap::from_pointee(Policy::new(
        config.policy.clone(),
        config.allow.clone(),
        config.server.trusted_proxies.clone(),
    )));
    let metrics = Arc::new(Metrics::new());
    let cache = TokenCache::new(Arc::new(FakeIam), policy, config.cache, metrics);
    // Warm the code paths (and moka's housekeeping) before the baseline.
    let probe = Token::new("warm-up-token");
    cache
        .lookup(&probe)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    cache.entry_count().await;
    let base = status_kib(std::process::id(), "VmRSS:");
    let started = Instant::now();
    // Realistic token length: Huawei tokens are a few KiB; only the HMAC of it is kept, but the
    // cost of hashing is part of the fill time.
    let pad = "x".repeat(1500);
    for i in 0..entries {
        let token = Token::new(format!("MII{pad}{i:016x}"));
        cache
            .lookup(&token)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let held = cache.entry_count().await.saturating_sub(1);
    let fill = started.elapsed();
    // A second pass of hits over a sample: the cached path alone, no IAM.
    let sample = entries.min(100_000);
    let hits_started = Instant::now();
    for i in 0..sample {
        let token = Token::new(format!("MII{pad}{i:016x}"));
        cache
            .lookup(&token)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let hit_ns = if sample > 0 {
        hits_started.elapsed().as_nanos() as f64 / sample as f64
    } else {
        0.0
    };
    let rss = status_kib(std::process::id(), "VmRSS:");
    let hwm = status_kib(std::process::id(), "VmHWM:");
    let per_entry = if held > 0 {
        (rss.saturating_sub(base) as f64 * 1024.0) / held as f64
    } else {
        0.0
    };
    println!(
        "{}",
        serde_json::json!({
            "entries": entries,
            "held": held,
            "rss_base_kib": base,
            "rss_kib": rss,
            "hwm_kib": hwm,
            "bytes_per_entry": per_entry,
            "fill_seconds": fill.as_secs_f64(),
            "hit_ns": hit_ns,
        })
    );
    Ok(())
}
