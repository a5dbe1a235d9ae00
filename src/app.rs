//! The composition root: builds metrics, the IAM provider, the cache, the policy and the stack
//! from a validated [`Config`], binds both listeners, runs until told to stop, and applies
//! config reloads.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::auth::Auth;
use crate::cache::shared::SharedCache;
use crate::cache::TokenCache;
use crate::config::{Config, ProviderKind};
use crate::iam::alibaba::{AccessKey, CloudSsoConfig, CloudSsoProvider};
use crate::iam::huawei::{HuaweiConfig, HuaweiProvider};
use crate::iam::IamProvider;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::proxy::Upstream;
use crate::server::{self, ServeSettings};
use crate::{stack, tls};

/// A running gateway.
pub struct Gateway {
    /// The main listener's bound address (useful with port 0).
    pub addr: SocketAddr,
    /// The admin listener's bound address.
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    live: Live,
    state: Arc<AdminState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The parts of a running gateway that a reload replaces in place.
struct Live {
    policy: Arc<ArcSwap<Policy>>,
    upstream: Arc<ArcSwap<Upstream>>,
    cache: TokenCache,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    /// The config in force, to tell what a new one changes.
    current: Mutex<Config>,
}

pub(crate) fn provider(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<dyn IamProvider>> {
    match config.iam.provider {
        ProviderKind::Huawei => Ok(Arc::new(HuaweiProvider::new(
            HuaweiConfig {
                endpoint: config.iam.endpoint.clone(),
                timeout: config.iam.timeout,
                max_concurrency: config.iam.max_concurrency,
            },
            metrics.clone(),
        )?)),
        ProviderKind::AlibabaCloudsso => {
            let settings = config
                .iam
                .cloudsso
                .clone()
                .context("iam: alibaba_cloudsso settings missing")?;
            let credentials = AccessKey::from_env_or_files(
                settings.access_key_id_file.as_deref(),
                settings.access_key_secret_file.as_deref(),
            )?;
            Ok(Arc::new(CloudSsoProvider::new(
                CloudSsoConfig {
                    endpoint: config.iam.endpoint.clone(),
                    directory_id: settings.directory_id,
                    timeout: config.iam.timeout,
                    max_concurrency: config.iam.max_concurrency,
                    credentials,
                    jwt: settings.jwt,
                },
                metrics.clone(),
            )?))
        }
    }
}

/// The IAM v5 client for admin actions, when `[iam.v5]` is configured.
fn v5_client(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<crate::iam::v5::V5Client>>> {
    let Some(v5) = &config.iam.v5 else {
        return Ok(None);
    };
    let credentials =
        crate::iam::aksk::AkSk::from_env_or_files(v5.ak_file.as_deref(), v5.sk_file.as_deref())?;
    let client = crate::iam::v5::V5Client::new(
        crate::iam::v5::V5Config {
            endpoint: v5.endpoint.clone(),
            timeout: config.iam.timeout,
        },
        credentials,
        metrics.clone(),
    )?;
    Ok(Some(Arc::new(client)))
}

pub(crate) fn policy(config: &Config) -> Policy {
    let policy = Policy::new(
        config.policy.clone(),
        config.allow.clone(),
        config.server.trusted_proxies.clone(),
    )
    .with_routes(config.routes.clone());
    match config.iam.provider {
        ProviderKind::Huawei => policy,
        ProviderKind::AlibabaCloudsso => policy.with_device_factor("cloudsso_mfa"),
    }
}

fn tls_config(config: &Config) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    config
        .server
        .tls
        .as_ref()
        .map(|files| tls::server_config(&files.cert, &files.key).context("server.tls_cert"))
        .transpose()
}

/// Logs the rules of a new config that have lapsed already: they match nothing.
fn warn_expired(config: &Config) {
    for rule in config.expired_rules(std::time::SystemTime::now()) {
        tracing::warn!(rule = %rule.name, expires = %humantime::format_rfc3339_seconds(rule.expires.unwrap_or(std::time::UNIX_EPOCH)), "allow rule has expired and matches nothing");
    }
}

/// Logs the moment an allow rule lapses, once, so that the end of a break-glass exception is
/// in the logs next to the requests it stops letting through.
async fn watch_lapses(policy: Arc<ArcSwap<Policy>>, mut stop: watch::Receiver<bool>) {
    let mut last = std::time::SystemTime::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = server::stopped(&mut stop) => return,
        }
        let now = std::time::SystemTime::now();
        for rule in policy.load().rules() {
            if let Some(expires) = rule.expires {
                if last < expires && expires <= now {
                    tracing::warn!(rule = %rule.name, reason = rule.reason.as_deref().unwrap_or("-"), "allow rule lapsed: it matches nothing from now on");
                }
            }
        }
        last = now;
    }
}

impl Gateway {
    /// Builds everything and binds both listeners; serving starts in the background.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let metrics = Arc::new(Metrics::new());
        metrics.touch_allow_rules(config.allow.iter().map(|rule| rule.name.as_str()));
        metrics.set_rule_expiries(&config.allow);
        metrics.touch_routes(config.routes.iter().map(|route| route.name.as_str()));
        warn_expired(&config);
        let provider = provider(&config, &metrics)?;
        let policy = Arc::new(ArcSwap::from_pointee(policy(&config)));
        let shared = config
            .shared_cache
            .as_ref()
            .map(|shared| {
                SharedCache::new(
                    shared,
                    config.iam.timeout,
                    config.cache.ttl.max(config.cache.negative_ttl),
                    metrics.clone(),
                )
            })
            .transpose()?;
        if let Some(shared) = &shared {
            // Known up or down before the first request, at most connect_timeout later.
            shared.probe_once().await;
        }
        let cache = TokenCache::with_shared(
            provider,
            policy.clone(),
            config.cache,
            shared.clone(),
            metrics.clone(),
        );
        let auth = Arc::new(Auth {
            policy: policy.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
        });
        let upstream = Arc::new(ArcSwap::from_pointee(
            Upstream::new(
                &config.upstream,
                config.token,
                config.assertion.clone(),
                metrics.clone(),
            )
            .context("upstream")?,
        ));
        let service = stack::build(
            auth,
            upstream.clone(),
            metrics.clone(),
            config.server.max_header_bytes,
        );
        let tls = tls_config(&config)?.map(|tls| Arc::new(ArcSwap::new(tls)));
        let settings = ServeSettings {
            header_read_timeout: config.server.header_read_timeout,
            max_header_bytes: config.server.max_header_bytes,
            shutdown_grace: config.server.shutdown_grace,
            tls: tls.clone(),
            metrics: metrics.clone(),
        };

        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("server.listen: cannot bind {}", config.server.listen))?;
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin.listen: cannot bind {}", config.admin.listen))?;
        let addr = listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let state = Arc::new(AdminState {
            metrics: metrics.clone(),
            cache: cache.clone(),
            token: ArcSwap::from_pointee(config.admin.token.clone()),
            ready: false.into(),
            draining: false.into(),
            v5: ArcSwap::from_pointee(v5_client(&config, &metrics)?),
            policy: policy.clone(),
            assertion: ArcSwap::from_pointee(config.assertion.clone()),
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(watch_lapses(policy.clone(), stop_rx.clone()));
        if let Some(shared) = shared {
            let (events, fleet) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(shared.clone().probe(stop_rx.clone()));
            tokio::spawn(shared.listen(events, stop_rx.clone()));
            let cache = cache.clone();
            tokio::spawn(async move { cache.follow_fleet(fleet).await });
        }
        let (admin_stop, admin_stop_rx) = watch::channel(false);
        let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone(), admin_stop_rx));
        let task = tokio::spawn(async move {
            server::serve(listener, service, settings, stop_rx).await;
            // The admin listener outlives the drain so that /readyz can say "draining".
            let _ = admin_stop.send(true);
            let _ = admin_task.await;
        });
        state.ready.store(true, Ordering::Release);
        tracing::info!(listen = %addr, admin = %admin_addr, upstream = %config.upstream.url, iam = %config.iam.endpoint, "mfa-gate ready");
        Ok(Gateway {
            addr,
            admin_addr,
            metrics,
            live: Live {
                policy,
                upstream,
                cache,
                tls,
                current: Mutex::new(config),
            },
            state,
            stop,
            task,
        })
    }

    /// Applies a new, already validated config to the running gateway. Policy, allowlist,
    /// trusted proxies, upstream, token forwarding, IAM, admin token and TLS files take effect
    /// for the next request; the cache survives unless the IAM changed. Listener addresses and
    /// connection limits need a restart and are reported as such. On error nothing changes.
    pub async fn reload(&self, config: Config) -> anyhow::Result<()> {
        let result = self.apply(config).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        result
    }

    async fn apply(&self, config: Config) -> anyhow::Result<()> {
        let old = self
            .live
            .current
            .lock()
            .expect("config lock poisoned")
            .clone();
        // Build everything that can fail before swapping anything in.
        let upstream = Upstream::new(
            &config.upstream,
            config.token,
            config.assertion.clone(),
            self.metrics.clone(),
        )
        .context("upstream")?;
        let iam_changed = old.iam.endpoint != config.iam.endpoint
            || old.iam.provider != config.iam.provider
            || old.iam.cloudsso != config.iam.cloudsso
            || old.iam.timeout != config.iam.timeout
            || old.iam.max_concurrency != config.iam.max_concurrency;
        let provider = if iam_changed {
            Some(provider(&config, &self.metrics)?)
        } else {
            None
        };
        let v5 = v5_client(&config, &self.metrics)?;
        let tls = match (&self.live.tls, tls_config(&config)?) {
            (Some(_), Some(tls)) => Some(tls),
            (None, None) => None,
            _ => anyhow::bail!("server.tls_cert: turning TLS on or off needs a restart"),
        };

        let mut restart = Vec::new();
        if old.server.listen != config.server.listen {
            restart.push("server.listen");
        }
        if old.admin.listen != config.admin.listen {
            restart.push("admin.listen");
        }
        if old.server.header_read_timeout != config.server.header_read_timeout {
            restart.push("server.header_read_timeout");
        }
        if old.server.max_header_bytes != config.server.max_header_bytes {
            restart.push("server.max_header_bytes");
        }
        if old.server.shutdown_grace != config.server.shutdown_grace {
            restart.push("server.shutdown_grace");
        }
        if old.cache != config.cache {
            restart.push("cache");
        }
        if old.shared_cache != config.shared_cache {
            restart.push("cache.shared");
        }

        self.metrics
            .touch_allow_rules(config.allow.iter().map(|rule| rule.name.as_str()));
        self.metrics.set_rule_expiries(&config.allow);
        self.metrics
            .touch_routes(config.routes.iter().map(|route| route.name.as_str()));
        warn_expired(&config);
        self.live.policy.store(Arc::new(policy(&config)));
        self.live.upstream.store(Arc::new(upstream));
        self.state.token.store(Arc::new(config.admin.token.clone()));
        self.state.v5.store(Arc::new(v5));
        self.state
            .assertion
            .store(Arc::new(config.assertion.clone()));
        if let (Some(live), Some(tls)) = (&self.live.tls, tls) {
            live.store(tls);
        }
        if let Some(provider) = provider {
            let purged = self.live.cache.replace_provider(provider).await;
            tracing::info!(purged, "IAM settings changed: cache purged");
        }
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "config reloaded, but these changes need a restart to apply");
        }
        tracing::info!(allow_rules = config.allow.len(), "config reloaded");
        *self.live.current.lock().expect("config lock poisoned") = config;
        Ok(())
    }

    /// Re-reads the TLS certificate and key named by the config in force (certificate
    /// rotation); on error the old pair keeps serving.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        let config = self
            .live
            .current
            .lock()
            .expect("config lock poisoned")
            .clone();
        if let (Some(live), Some(tls)) = (&self.live.tls, tls_config(&config)?) {
            live.store(tls);
            tracing::info!("TLS certificate reloaded");
        }
        Ok(())
    }

    /// Files besides the config whose change means "reload the config": `admin.token_file`
    /// (a rotated Kubernetes Secret).
    pub fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let config = self.live.current.lock().expect("config lock poisoned");
        config.admin.token_file.iter().cloned().collect()
    }

    /// The files whose change should trigger a TLS reload: the pair of the config in force.
    pub fn tls_files(&self) -> Vec<std::path::PathBuf> {
        let config = self.live.current.lock().expect("config lock poisoned");
        config
            .server
            .tls
            .as_ref()
            .map(|files| vec![files.cert.clone(), files.key.clone()])
            .unwrap_or_default()
    }

    /// Begins a graceful shutdown: `/readyz` turns 503, no new connections are accepted, open
    /// ones finish their requests (up to `server.shutdown_grace`).
    pub fn shutdown(&self) {
        self.state.draining.store(true, Ordering::Release);
        let _ = self.stop.send(true);
    }

    /// Waits until the gateway has stopped (after [`Gateway::shutdown`]).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
