//! The composition root: builds metrics, the IAM provider, the cache, the policy and the stack
//! from a validated [`Config`], binds both listeners, and runs until told to stop.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::auth::Auth;
use crate::cache::TokenCache;
use crate::config::{Config, ProviderKind};
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
    state: Arc<AdminState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn provider(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<dyn IamProvider>> {
    match config.iam.provider {
        ProviderKind::Huawei => Ok(Arc::new(HuaweiProvider::new(
            HuaweiConfig {
                endpoint: config.iam.endpoint.clone(),
                timeout: config.iam.timeout,
                max_concurrency: config.iam.max_concurrency,
            },
            metrics.clone(),
        )?)),
        ProviderKind::AlibabaCloudsso => anyhow::bail!(
            "iam.provider: \"alibaba_cloudsso\" is accepted by the config schema but not implemented in this version; use \"huawei\""
        ),
    }
}

impl Gateway {
    /// Builds everything and binds both listeners; serving starts in the background.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let metrics = Arc::new(Metrics::new());
        metrics.touch_allow_rules(config.allow.iter().map(|rule| rule.name.as_str()));
        let provider = provider(&config, &metrics)?;
        let policy = Arc::new(ArcSwap::from_pointee(Policy::new(
            config.policy.clone(),
            config.allow.clone(),
        )));
        let cache = TokenCache::new(provider, policy.clone(), config.cache, metrics.clone());
        let auth = Arc::new(Auth {
            policy,
            cache: cache.clone(),
            metrics: metrics.clone(),
            trusted_proxies: config.server.trusted_proxies.clone(),
        });
        let upstream = Arc::new(
            Upstream::new(&config.upstream, config.token, metrics.clone()).context("upstream")?,
        );
        let service = stack::build(
            auth,
            upstream,
            metrics.clone(),
            config.server.max_header_bytes,
        );
        let tls = match &config.server.tls {
            Some(files) => Some(Arc::new(ArcSwap::new(
                tls::server_config(&files.cert, &files.key).context("server.tls_cert")?,
            ))),
            None => None,
        };
        let settings = ServeSettings {
            header_read_timeout: config.server.header_read_timeout,
            max_header_bytes: config.server.max_header_bytes,
            shutdown_grace: config.server.shutdown_grace,
            tls,
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
            cache,
            token: config.admin.token.clone(),
            ready: false.into(),
            draining: false.into(),
        });
        let (stop, stop_rx) = watch::channel(false);
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
            state,
            stop,
            task,
        })
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
