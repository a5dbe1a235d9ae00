//! `mfa-gate dev`: the whole story on loopback in one command — an IAM simulator with demo users,
//! a demo upstream that echoes what it received, and the gateway between them.
//!
//! `--provider huawei` (the default) simulates Huawei Cloud IAM; `--provider alibaba_cloudsso`
//! simulates CloudSSO plus an identity provider that publishes a JWKS and mints demo JWTs.

pub mod cloudsso_sim;
pub mod iam_sim;
pub mod upstream;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::app::Gateway;
use crate::config::{Config, ProviderKind};

use self::cloudsso_sim::{CloudSsoSim, MfaSetting, SimConfig};
use self::iam_sim::IamSim;
use self::upstream::DemoUpstream;

/// How long the demo tokens stay valid.
const DEMO_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// A demo user as the banner shows it.
struct DemoUser {
    name: String,
    mfa: String,
    token: String,
}

/// The simulator behind the demo.
enum Simulator {
    Huawei(IamSim),
    CloudSso {
        sim: CloudSsoSim,
        /// Holds the AccessKey files the gateway reads; removed on shutdown.
        secrets: PathBuf,
    },
}

/// The running demo.
pub struct Dev {
    gateway: Gateway,
    config_text: String,
    users: Vec<DemoUser>,
    simulator: Simulator,
    upstream: DemoUpstream,
}

const COMMON: &str = r#"
[policy]
require = "mfa_device"

[[allow]]
name = "health"
paths = ["/healthz"]
methods = ["GET", "HEAD"]

[[allow]]
name = "public"
paths = ["/public/**"]
"#;

fn listeners(listen: SocketAddr, admin: SocketAddr, upstream: &str) -> String {
    format!("[server]\nlisten = \"{listen}\"\n\n[admin]\nlisten = \"{admin}\"\n\n[upstream]\nurl = \"{upstream}\"\n")
}

/// A private directory for the demo's AccessKey files.
fn secrets_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("mfa-gate-dev-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Starts the simulator, the demo upstream and the gateway.
pub async fn start(
    listen: SocketAddr,
    admin: SocketAddr,
    provider: ProviderKind,
) -> anyhow::Result<Dev> {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let upstream = DemoUpstream::start(loopback)
        .await
        .context("starting the demo upstream")?;
    let head = listeners(listen, admin, &upstream.url());
    let (simulator, config_text, users) = match provider {
        ProviderKind::Huawei => {
            let users = iam_sim::demo_users(DEMO_TOKEN_LIFETIME);
            let sim = IamSim::start(loopback, users.clone())
                .await
                .context("starting the IAM simulator")?;
            let text = format!(
                "{head}\n[iam]\nprovider = \"huawei\"\nendpoint = \"{}\"\n{COMMON}",
                sim.url()
            );
            let users = users
                .into_iter()
                .map(|user| DemoUser {
                    mfa: match (&user.mfa_device, &user.login_protect) {
                        (Some(_), _) => "virtual MFA device bound".to_string(),
                        (None, Some((true, method))) => {
                            format!("no MFA device; login protection by {method}")
                        }
                        _ => "no MFA at all".to_string(),
                    },
                    name: user.user_name,
                    token: user.token,
                })
                .collect();
            (Simulator::Huawei(sim), text, users)
        }
        ProviderKind::AlibabaCloudsso => {
            let directory = cloudsso_sim::demo_users();
            let config = SimConfig::demo();
            let sim = CloudSsoSim::start(loopback, config.clone(), directory.clone())
                .await
                .context("starting the CloudSSO simulator")?;
            let secrets = secrets_dir()?;
            let id_file = secrets.join("access-key-id");
            let secret_file = secrets.join("access-key-secret");
            std::fs::write(&id_file, &config.access_key_id)?;
            std::fs::write(&secret_file, &config.access_key_secret)?;
            let text = format!(
                "{head}\n[iam]\nprovider = \"alibaba_cloudsso\"\nendpoint = \"{}\"\ndirectory_id = \"{}\"\naccess_key_id_file = \"{}\"\naccess_key_secret_file = \"{}\"\n\n[iam.jwt]\njwks_url = \"{}\"\nissuer = \"{}\"\naudience = \"{}\"\n{COMMON}",
                sim.url(),
                sim.directory_id(),
                id_file.display(),
                secret_file.display(),
                sim.jwks_url(),
                sim.issuer(),
                sim.audience(),
            );
            let users = directory
                .iter()
                .map(|user| DemoUser {
                    name: user.user_name.clone(),
                    mfa: match user.mfa {
                        MfaSetting::Enabled => "CloudSSO MFA enabled".to_string(),
                        MfaSetting::Disabled => "CloudSSO MFA disabled".to_string(),
                    },
                    token: sim.mint(&sim.claims_for(
                        &user.user_id,
                        &user.user_name,
                        DEMO_TOKEN_LIFETIME,
                    )),
                })
                .collect();
            (Simulator::CloudSso { sim, secrets }, text, users)
        }
    };
    let config = Config::from_toml(&config_text, Path::new("<dev>"))
        .map_err(|err| anyhow::anyhow!("dev config: {err}"))?;
    let gateway = Gateway::start(config)
        .await
        .context("starting the gateway (use --listen/--admin-listen if the port is taken)")?;
    Ok(Dev {
        gateway,
        config_text,
        users,
        simulator,
        upstream,
    })
}

impl Dev {
    /// What a newcomer needs to see: who the demo users are and what to paste.
    pub fn banner(&self) -> String {
        let gw = format!("http://{}", self.gateway.addr);
        let admin = format!("http://{}", self.gateway.admin_addr);
        let token = |name: &str| {
            self.users
                .iter()
                .find(|user| user.name == name)
                .map(|user| user.token.clone())
                .unwrap_or_default()
        };
        let simulator = match &self.simulator {
            Simulator::Huawei(sim) => format!("IAM simulator   {}", sim.url()),
            Simulator::CloudSso { sim, .. } => {
                format!("CloudSSO sim    {}  (JWKS {})", sim.url(), sim.jwks_url())
            }
        };
        let mut out = String::new();
        let _ = writeln!(out, "mfa-gate dev is running\n");
        let _ = writeln!(out, "  gateway         {gw}");
        let _ = writeln!(
            out,
            "  admin           {admin}  (/metrics, /healthz, /readyz)"
        );
        let _ = writeln!(out, "  {simulator}");
        let _ = writeln!(
            out,
            "  demo upstream   {}  (echoes what it receives)\n",
            self.upstream.url()
        );
        let _ = writeln!(
            out,
            "Demo users (tokens valid {}h):",
            DEMO_TOKEN_LIFETIME.as_secs() / 3600
        );
        for user in &self.users {
            let _ = writeln!(
                out,
                "  {:<6} {}\n         token: {}",
                user.name, user.mfa, user.token
            );
        }
        let alice = token("alice");
        let bob = token("bob");
        let _ = writeln!(out, "\nTry it:");
        let _ = writeln!(
            out,
            "  # alice has MFA: forwarded, the upstream sees X-Auth-User-* and X-Auth-Mfa"
        );
        let _ = writeln!(out, "  curl -i {gw}/hello -H 'X-Auth-Token: {alice}'");
        let _ = writeln!(
            out,
            "  # bob has no MFA (the kind the policy counts): 403 MFAGATE.NO_MFA"
        );
        let _ = writeln!(out, "  curl -i {gw}/hello -H 'Authorization: Bearer {bob}'");
        if let Simulator::Huawei(_) = self.simulator {
            let carol = token("carol");
            let _ = writeln!(out, "  # carol has no MFA: 403");
            let _ = writeln!(out, "  curl -i {gw}/hello -H 'X-Auth-Token: {carol}'");
        }
        let _ = writeln!(
            out,
            "  # no token: 401 MFAGATE.NO_TOKEN; a made-up token: 401 MFAGATE.INVALID_TOKEN"
        );
        let _ = writeln!(out, "  curl -i {gw}/hello");
        let _ = writeln!(
            out,
            "  curl -i {gw}/hello -H 'X-Auth-Token: not-a-real-token'"
        );
        let _ = writeln!(
            out,
            "  # allowlisted paths need no token (rules \"health\" and \"public\")"
        );
        let _ = writeln!(out, "  curl -i {gw}/public/readme.txt");
        let _ = writeln!(
            out,
            "  # spoofed identity headers are stripped, path tricks refused"
        );
        let _ = writeln!(
            out,
            "  curl -i {gw}/hello -H 'X-Auth-Token: {bob}' -H 'X-Auth-User-Id: admin'"
        );
        let _ = writeln!(out, "  curl -i --path-as-is '{gw}/public/../admin'");
        let _ = writeln!(
            out,
            "  # the decision endpoint (for nginx auth_request and friends)"
        );
        let _ = writeln!(
            out,
            "  curl -i {gw}/.mfa-gate/auth -H 'X-Auth-Token: {alice}'"
        );
        let _ = writeln!(
            out,
            "  # what the gateway decided so far, and a cache purge"
        );
        let _ = writeln!(
            out,
            "  curl -s {admin}/metrics | grep '^mfa_gate_decisions_total'"
        );
        let _ = writeln!(out, "  curl -i -X POST {admin}/admin/cache/purge");
        let _ = writeln!(out, "\nThe config in use:\n");
        for line in self.config_text.lines() {
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(out, "\nCtrl-C stops everything.");
        out
    }

    /// Stops the gateway, then the simulator and the demo upstream.
    pub async fn shutdown(self) {
        self.gateway.shutdown();
        self.gateway.wait().await;
        match self.simulator {
            Simulator::Huawei(sim) => sim.shutdown(),
            Simulator::CloudSso { sim, secrets } => {
                sim.shutdown();
                let _ = std::fs::remove_dir_all(secrets);
            }
        }
        self.upstream.shutdown();
    }
}
