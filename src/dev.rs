//! `mfa-gate dev`: the whole story on loopback in one command — an IAM simulator with demo users,
//! a demo upstream that echoes what it received, and the gateway between them.

pub mod iam_sim;
pub mod upstream;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::app::Gateway;
use crate::config::Config;

use self::iam_sim::{IamSim, SimUser};
use self::upstream::DemoUpstream;

/// How long the demo tokens stay valid.
const DEMO_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The running demo.
pub struct Dev {
    gateway: Gateway,
    config_text: String,
    users: Vec<SimUser>,
    sim: IamSim,
    upstream: DemoUpstream,
}

/// The config the demo runs with: a real config file, so that it also shows the format.
fn dev_config(listen: SocketAddr, admin: SocketAddr, upstream: &str, iam: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"

[admin]
listen = "{admin}"

[upstream]
url = "{upstream}"

[iam]
provider = "huawei"
endpoint = "{iam}"

[policy]
require = "mfa_device"

[[allow]]
name = "health"
paths = ["/healthz"]
methods = ["GET", "HEAD"]

[[allow]]
name = "public"
paths = ["/public/**"]
"#
    )
}

/// Starts the simulator, the demo upstream and the gateway.
pub async fn start(listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<Dev> {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let users = iam_sim::demo_users(DEMO_TOKEN_LIFETIME);
    let sim = IamSim::start(loopback, users.clone())
        .await
        .context("starting the IAM simulator")?;
    let upstream = DemoUpstream::start(loopback)
        .await
        .context("starting the demo upstream")?;
    let config_text = dev_config(listen, admin, &upstream.url(), &sim.url());
    let config = Config::from_toml(&config_text, Path::new("<dev>"))
        .map_err(|err| anyhow::anyhow!("dev config: {err}"))?;
    let gateway = Gateway::start(config)
        .await
        .context("starting the gateway (use --listen/--admin-listen if the port is taken)")?;
    Ok(Dev {
        gateway,
        config_text,
        users,
        sim,
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
                .find(|user| user.user_name == name)
                .map(|user| user.token.clone())
                .unwrap_or_default()
        };
        let mut out = String::new();
        let _ = writeln!(out, "mfa-gate dev is running\n");
        let _ = writeln!(out, "  gateway         {gw}");
        let _ = writeln!(
            out,
            "  admin           {admin}  (/metrics, /healthz, /readyz)"
        );
        let _ = writeln!(out, "  IAM simulator   {}", self.sim.url());
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
            let mfa = match (&user.mfa_device, &user.login_protect) {
                (Some(_), _) => "virtual MFA device bound".to_string(),
                (None, Some((true, method))) => {
                    format!("no MFA device; login protection by {method}")
                }
                _ => "no MFA at all".to_string(),
            };
            let _ = writeln!(
                out,
                "  {:<6} {mfa}\n         token: {}",
                user.user_name, user.token
            );
        }
        let alice = token("alice");
        let bob = token("bob");
        let carol = token("carol");
        let _ = writeln!(out, "\nTry it:");
        let _ = writeln!(
            out,
            "  # alice has MFA: forwarded, the upstream sees X-Auth-User-* and X-Auth-Mfa"
        );
        let _ = writeln!(out, "  curl -i {gw}/hello -H 'X-Auth-Token: {alice}'");
        let _ = writeln!(
            out,
            "  # bob has login protection by SMS only, no MFA device: 403 MFAGATE.NO_MFA"
        );
        let _ = writeln!(out, "  curl -i {gw}/hello -H 'Authorization: Bearer {bob}'");
        let _ = writeln!(out, "  # carol has no MFA: 403");
        let _ = writeln!(out, "  curl -i {gw}/hello -H 'X-Auth-Token: {carol}'");
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
            "  curl -i {gw}/hello -H 'X-Auth-Token: {carol}' -H 'X-Auth-User-Id: admin'"
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
        self.sim.shutdown();
        self.upstream.shutdown();
    }
}
