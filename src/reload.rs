//! Config and certificate reloads while serving: on SIGHUP, and when the config file or the
//! TLS files change on disk (Kubernetes updates ConfigMaps and Secrets by swapping a symlink,
//! so contents are compared, not inotify events).
//!
//! A new config is validated first (exactly what `mfa-gate check` does); a bad one is logged,
//! counted in `mfa_gate_config_reloads_total{result="error"}`, and the old one keeps serving.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::app::Gateway;
use crate::config::Config;

/// How often the files are compared with what was last loaded.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A file's contents, reduced to a hash; `None` when it cannot be read right now.
fn fingerprint(path: &Path) -> Option<[u8; 32]> {
    std::fs::read(path)
        .ok()
        .map(|bytes| Sha256::digest(bytes).into())
}

/// Remembers what was loaded, to notice changes.
pub struct Reloader {
    config_path: PathBuf,
    /// The config file and the files it names (admin token) as last loaded.
    config_seen: Vec<Option<[u8; 32]>>,
    tls_seen: Vec<(PathBuf, Option<[u8; 32]>)>,
}

impl Reloader {
    pub fn new(config_path: &Path, gateway: &Gateway) -> Self {
        Reloader {
            config_path: config_path.to_path_buf(),
            config_seen: config_fingerprints(config_path, gateway),
            tls_seen: tls_fingerprints(gateway),
        }
    }

    /// Reloads the config file now (SIGHUP).
    pub async fn reload(&mut self, gateway: &Gateway, why: &str) {
        match Config::load(&self.config_path) {
            Ok(config) => match gateway.reload(config).await {
                Ok(()) => tracing::info!(trigger = why, "new config in force"),
                Err(err) => {
                    tracing::error!(trigger = why, error = %format!("{err:#}"), "config reload refused; the old config keeps serving")
                }
            },
            Err(err) => {
                gateway
                    .metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(trigger = why, error = %err, "config reload refused; the old config keeps serving");
            }
        }
        self.config_seen = config_fingerprints(&self.config_path, gateway);
        self.tls_seen = tls_fingerprints(gateway);
    }

    /// Compares the files with what was loaded; reloads what changed.
    pub async fn poll(&mut self, gateway: &Gateway) {
        let config_now = config_fingerprints(&self.config_path, gateway);
        if config_now.iter().all(Option::is_some) && config_now != self.config_seen {
            self.reload(gateway, "file changed").await;
            return;
        }
        let tls_now = tls_fingerprints(gateway);
        if tls_now != self.tls_seen && tls_now.iter().all(|(_, hash)| hash.is_some()) {
            self.tls_seen = tls_now;
            if let Err(err) = gateway.reload_tls() {
                tracing::error!(error = %format!("{err:#}"), "new TLS certificate refused; the old one keeps serving");
            }
        }
    }
}

fn config_fingerprints(config_path: &Path, gateway: &Gateway) -> Vec<Option<[u8; 32]>> {
    std::iter::once(fingerprint(config_path))
        .chain(gateway.watched_files().iter().map(|path| fingerprint(path)))
        .collect()
}

fn tls_fingerprints(gateway: &Gateway) -> Vec<(PathBuf, Option<[u8; 32]>)> {
    gateway
        .tls_files()
        .into_iter()
        .map(|path| {
            let hash = fingerprint(&path);
            (path, hash)
        })
        .collect()
}
