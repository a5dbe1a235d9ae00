//! The operator's view (issue "Observability that operators trust"): the Grafana dashboard and the
//! Prometheus rules in `dashboards/`, proven against a real Prometheus scraping a real gateway.
//!
//! Without any tool: the dashboard's shape (datasource variable, `job`/`instance` filters,
//! `$__rate_interval`, a description on every panel, every metric family of `src/metrics.rs`
//! shown) and the alerts' documentation. With Debian's package `prometheus` (`prometheus` and
//! `promtool` on `PATH`): `promtool check rules` / `test rules` / `check metrics`, and a
//! Prometheus that scrapes a small fleet (two gateways sharing a real `redis-server`, Debian's
//! package `redis-server`, and one without a shared cache) driven through every decision, loads
//! `alerts.yml`, answers every dashboard, variable and rule query, fires the alerts that need no
//! `for:` window (a refused reload, a forged shared-cache value, an unauthorized admin request, a
//! break-glass rule about to lapse), and raises `MfaGateSharedCacheDown` for the gateways whose
//! Redis goes away but never for the one that has none. Without the packages those tests print a
//! line and pass, unless `MFA_GATE_REQUIRE_PROMETHEUS=1` (as in CI) makes a missing binary a
//! failure.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::Mac;
use http::{Method, StatusCode};
use mfa_gate::app::Gateway;
use mfa_gate::cache::seal::FleetKeys;
use mfa_gate::config::Config;
use mfa_gate::dev::iam_sim::{self, Api, Fault, SimUser};
use mfa_gate::reload::Reloader;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::support::{config_text, send, Answer, Harness};

/// Every metric family the gateway exports (CONTRACT §6 and `src/metrics.rs`, which
/// `families_are_those_of_src_metrics` compares with): each must be on the dashboard.
const FAMILIES: [&str; 18] = [
    "mfa_gate_decisions_total",
    "mfa_gate_allowlist_matches_total",
    "mfa_gate_allowlist_rule_expiry_timestamp_seconds",
    "mfa_gate_request_duration_seconds",
    "mfa_gate_iam_requests_total",
    "mfa_gate_iam_request_duration_seconds",
    "mfa_gate_cache_lookups_total",
    "mfa_gate_cache_entries",
    "mfa_gate_upstream_responses_total",
    "mfa_gate_upstream_duration_seconds",
    "mfa_gate_inflight_requests",
    "mfa_gate_config_reloads_total",
    "mfa_gate_admin_actions_total",
    "mfa_gate_route_decisions_total",
    "mfa_gate_shared_cache_requests_total",
    "mfa_gate_shared_cache_up",
    "mfa_gate_shared_cache_invalidations_total",
    "mfa_gate_build_info",
];

/// The dashboard's rows, in order.
const ROWS: [&str; 7] = [
    "Overview",
    "Decisions",
    "IAM",
    "Token cache",
    "Shared cache (fleet)",
    "Upstream",
    "Gateway",
];

/// Every alert of `alerts.yml` with its `severity` and `category` (security signals only).
const ALERTS: [(&str, &str, Option<&str>); 14] = [
    ("MfaGateIamUnavailable", "critical", None),
    ("MfaGateFailingOpen", "warning", None),
    ("MfaGateIamErrors", "warning", None),
    ("MfaGateIamThrottled", "warning", None),
    ("MfaGateNoMfaDenialsHigh", "warning", None),
    ("MfaGateUpstreamErrors", "warning", None),
    ("MfaGateDown", "critical", None),
    ("MfaGateAbsent", "critical", None),
    ("MfaGateConfigReloadFailed", "warning", None),
    ("MfaGateCacheHitRatioCollapse", "warning", None),
    ("MfaGateSharedCacheDown", "warning", None),
    ("MfaGateSharedCacheRejected", "critical", Some("security")),
    ("MfaGateBreakGlassRuleExpiresSoon", "warning", None),
    ("MfaGateAdminUnauthorized", "warning", Some("security")),
];

/// The filter every selector of the dashboard starts with, so that the job and instance
/// variables narrow every panel.
const FILTER: &str = r#"job=~"$job", instance=~"$instance""#;

/// The only uid the dashboard may name: the datasource variable (a hard-coded datasource uid
/// breaks the dashboard on every Grafana but the one it was exported from).
const DATASOURCE_UID: &str = "${datasource}";

/// A gateway with two request rules, two routes and short cache lifetimes, so that every scrape
/// interval sees IAM calls, cache hits and misses, allowlist matches and route decisions.
const TRAFFIC_CONFIG: &str = r#"
[cache]
ttl = "2s"
negative_ttl = "2s"
[[allow]]
name = "probes"
paths = ["/probe/**"]
[[allow]]
name = "static"
paths = ["/static/**"]
methods = ["GET"]
[[route]]
name = "new-app"
paths = ["/new/**"]
mode = "report_only"
[[route]]
name = "console"
paths = ["/console/**"]
require_totp_login = true
"#;

/// The name of the break-glass rule of [`break_glass_rule`].
const BREAK_GLASS: &str = "break-glass";

/// A break-glass identity rule that lapses in 12 hours: it has an expiry series, and
/// `MfaGateBreakGlassRuleExpiresSoon` (within 24 h) fires for it.
fn break_glass_rule() -> String {
    let expires = std::time::SystemTime::now() + Duration::from_secs(12 * 3600);
    format!(
        "[[allow]]\nname = \"{BREAK_GLASS}\"\nuser_names = [\"dave\"]\nreason = \"INC-7: dave \
         repairs the MFA sync\"\nexpires = \"{}\"\n",
        humantime::format_rfc3339_seconds(expires)
    )
}

/// The fleet's shared-cache secret and key prefix, and the admin token of the Prometheus test.
const FLEET_SECRET: &[u8] = b"dashboards-test-fleet-secret-0123456789abcdef";
const FLEET_PREFIX: &str = "mfa-gate-dashboards:";
const ADMIN_TOKEN: &str = "dashboards-admin-token";

/// The decisions `drive` produces, as `(decision, reason)`. `allow`/`iam_unavailable` needs a
/// gateway that fails open, which does not coexist with this fail-closed one; it is initialised
/// at 0 (§6), so every query still has its series.
const DRIVEN: [(&str, &str); 8] = [
    ("allow", "mfa_verified"),
    ("allow", "allowlisted"),
    ("allow", "report_only"),
    ("deny", "iam_unavailable"),
    ("deny", "no_token"),
    ("deny", "invalid_token"),
    ("deny", "no_mfa"),
    ("deny", "bad_request"),
];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|err| panic!("{path}: {err}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("dashboards/mfa-gate.json"))
        .unwrap_or_else(|err| panic!("dashboards/mfa-gate.json is not JSON: {err}"))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `(panel title, expr)` of every panel target.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_string();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |target| Some((title.clone(), target["expr"].as_str()?.into())))
        })
        .collect()
}

/// `(annotation name, expr)` of the dashboard's Prometheus annotations.
fn annotation_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["name"].as_str()?.into(), a["expr"].as_str()?.into())))
        .collect()
}

/// A dashboard query as Grafana would send it with "All" selected: `$__rate_interval` is at
/// least four scrape intervals, and 1m is that for the 1s scrapes of the test.
fn promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("${job}", ".*")
        .replace("$job", ".*")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

/// The `expr:` values of a Prometheus rule file: plain (`expr: up == 0`), quoted, or block
/// scalars (`expr: |` and the more-indented lines after it). Just enough YAML for the rule files
/// of this repository; `promtool check rules` is the real parser.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let body = line.trim_start();
        let indent = line.len() - body.len();
        let Some(value) = body.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let start = i;
            while i < lines.len() {
                let text = lines[i].trim_start();
                if !text.is_empty() && lines[i].len() - text.len() <= indent {
                    break;
                }
                i += 1;
            }
            let block: Vec<&str> = lines[start..i].iter().map(|l| l.trim()).collect();
            exprs.push(block.join("\n").trim().to_string());
        } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            exprs.push(inner.replace("''", "'"));
        } else if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            exprs.push(inner.replace("\\\"", "\"").replace("\\\\", "\\"));
        } else {
            exprs.push(value.to_string());
        }
    }
    exprs
}

/// The rule names of a rule file (`alert:` and `record:` values), in order.
fn rule_names(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|line| {
            let body = line.trim_start().strip_prefix("- ")?;
            let name = body
                .strip_prefix("alert:")
                .or_else(|| body.strip_prefix("record:"))?;
            Some(name.trim().to_string())
        })
        .collect()
}

/// The path of `name` (from Debian's package `package`) on `PATH`. Missing: `None` (the caller
/// skips) with a line saying so, or a failure when `MFA_GATE_REQUIRE_PROMETHEUS=1`.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        if std::env::var("MFA_GATE_REQUIRE_PROMETHEUS").as_deref() == Ok("1") {
            panic!(
                "`{name}` is not on PATH, and MFA_GATE_REQUIRE_PROMETHEUS=1 requires it: install \
                 Debian's package `{package}` (apt-get install {package})"
            );
        }
        println!(
            "skipped: `{name}` is not on PATH (install Debian's package `{package}` to run this \
             test; MFA_GATE_REQUIRE_PROMETHEUS=1 makes its absence a failure)"
        );
    }
    found
}

/// Runs a tool to completion: `(success, stdout + stderr)`.
async fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("{}: {err}", program.display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
    }
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} hung", program.display()))
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// `application/x-www-form-urlencoded` escaping of a query parameter value.
fn url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether a sample value of the Prometheus API (`[time, "value"]`) is a number, not NaN/±Inf.
fn finite(sample: &Value) -> bool {
    sample[1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(f64::is_finite)
}

/// A Prometheus server of its own, in a temporary directory, scraping gateways every second
/// and evaluating `dashboards/alerts.yml` every second. Killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: TempDir,
}

impl Prometheus {
    async fn start(binary: &Path, gateway_admins: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = gateway_admins.iter().map(|a| format!("'{a}'")).collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: mfa-gate\n    static_configs:\n      \
                 - targets: [{targets}]\n",
                rules = repo_file("dashboards/alerts.yml").display(),
                targets = targets.join(", "),
            ),
        )
        .unwrap();
        // A port that was free a moment ago; Prometheus cannot be told to pick one itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", binary.display()));
        let mut prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        prometheus.wait_ready(port).await;
        prometheus
    }

    async fn wait_ready(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", self.log_text());
            }
            let listening = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
            if listening && self.get("/-/ready").await.status == StatusCode::OK {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 60s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn get(&self, path_and_query: &str) -> Answer {
        send(
            Method::GET,
            &format!("{}{path_and_query}", self.url),
            &[],
            Bytes::new(),
        )
        .await
    }

    /// An instant query: `data` of the answer, or Prometheus' error (parse or execution).
    async fn query(&self, expr: &str) -> Result<Value, String> {
        let answer = self
            .get(&format!("/api/v1/query?query={}", url_encode(expr)))
            .await;
        let body: Value = serde_json::from_slice(&answer.body).map_err(|err| {
            format!(
                "HTTP {}, not JSON ({err}): {}",
                answer.status,
                answer.text()
            )
        })?;
        match body["status"].as_str() {
            Some("success") => Ok(body["data"].clone()),
            _ => Err(format!(
                "{}: {}",
                body["errorType"].as_str().unwrap_or("error"),
                body["error"].as_str().unwrap_or(&answer.text())
            )),
        }
    }

    /// The samples of an instant query that must succeed.
    async fn samples(&self, expr: &str) -> Vec<Value> {
        let data = self
            .query(expr)
            .await
            .unwrap_or_else(|err| panic!("{expr}: {err}"));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The first value of an instant query, 0 when it has no series.
    async fn value(&self, expr: &str) -> f64 {
        self.samples(expr)
            .await
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The alerts Prometheus has pending or firing right now, as the API gives them.
    async fn alerts(&self) -> Vec<Value> {
        let body = self.get("/api/v1/alerts").await.json();
        body["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The alerts firing right now: `(alertname, job)`.
    async fn firing(&self) -> Vec<(String, String)> {
        self.alerts()
            .await
            .iter()
            .filter(|alert| alert["state"] == "firing")
            .map(|alert| (label(alert, "alertname"), label(alert, "job")))
            .collect()
    }

    /// Waits up to 30 s for an alert named `name` in `state` whose labels include `labels`.
    async fn wait_alert(
        &self,
        name: &str,
        state: &str,
        labels: &[(&str, &str)],
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let alerts = self.alerts().await;
            if alerts.iter().any(|alert| {
                alert["state"] == state
                    && label(alert, "alertname") == name
                    && labels.iter().all(|(k, v)| label(alert, k) == *v)
            }) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = alerts
                    .iter()
                    .map(|a| format!("{} {}", a["state"], a["labels"]))
                    .collect();
                return Err(format!(
                    "{name} {labels:?} not {state} after 30s; active: {seen:#?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every rule of the loaded rule files: `(name, health, last error)`.
    async fn rules(&self) -> Vec<(String, String, String)> {
        let body = self.get("/api/v1/rules").await.json();
        body["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .map(|rule| {
                let field = |name: &str| rule[name].as_str().unwrap_or_default().to_string();
                (field("name"), field("health"), field("lastError"))
            })
            .collect()
    }

    /// Prometheus' own errors (a rule file it refused, a failing scrape), else the end of its log.
    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("level=error") || line.contains("level=warn"))
            .collect();
        if !errors.is_empty() {
            return errors.join("\n");
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A label of an alert (or of a series: `metric` in place of `labels`), "" when absent.
fn label(alert: &Value, name: &str) -> String {
    alert["labels"][name]
        .as_str()
        .or_else(|| alert["metric"][name].as_str())
        .unwrap_or_default()
        .to_string()
}

/// A `redis-server` of the test's own on a free loopback port, without persistence; killed
/// when dropped (or by [`Redis::kill`], to take the fleet's shared cache away).
struct Redis {
    child: std::process::Child,
    port: u16,
    _dir: TempDir,
}

impl Redis {
    fn start(binary: &Path) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", binary.display()));
        let redis = Redis {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis
            .connection()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection()
    }

    /// Puts a value that no gateway can open (not sealed with the fleet key) where the fleet
    /// looks for `token`'s entry, as someone without the secret would.
    fn forge_entry(&self, token: &str) {
        let key: [u8; 32] = FleetKeys::derive(FLEET_SECRET)
            .token_mac()
            .clone()
            .chain_update(token.as_bytes())
            .finalize()
            .into_bytes()
            .into();
        let mut connection = self.connection().unwrap();
        redis::cmd("SET")
            .arg(format!("{FLEET_PREFIX}e:{}", hex::encode(key)))
            .arg(&b"forged by someone without the fleet secret"[..])
            .arg("EX")
            .arg(60)
            .query::<()>(&mut connection)
            .unwrap();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One round of traffic with every decision of `DRIVEN`, an upstream 5xx, and IAM failures
/// (a 503, or throttling on odd rounds).
async fn drive(h: &Harness, round: usize) {
    let alice = h.token("alice");
    let unknown = || format!("tok-unknown-{}", uuid::Uuid::new_v4().simple());
    let expect = |answer: Answer, status: u16, what: &str| {
        assert_eq!(answer.status.as_u16(), status, "{what}: {}", answer.text());
    };
    expect(h.get_as("/app", "alice").await, 200, "mfa_verified");
    expect(
        h.get("/probe/ready", &[]).await,
        200,
        "allowlisted (probes)",
    );
    expect(
        h.get("/static/app.js", &[]).await,
        200,
        "allowlisted (static)",
    );
    expect(h.get_as("/app", "carol").await, 403, "no_mfa");
    expect(
        h.get_as("/new/page", "carol").await,
        200,
        "report_only (route new-app)",
    );
    expect(
        h.get_as("/console/home", "alice").await,
        200,
        "mfa_verified (route console)",
    );
    expect(
        h.get_as("/console/home", "carol").await,
        403,
        "no_mfa (route console)",
    );
    expect(h.get("/app", &[]).await, 401, "no_token");
    expect(
        h.get("/app", &[("x-auth-token", &unknown())]).await,
        401,
        "invalid_token",
    );
    expect(
        h.get(
            "/app",
            &[("x-auth-token", &alice), ("connection", "X-Auth-User-Id")],
        )
        .await,
        400,
        "bad_request",
    );
    expect(
        h.get(
            "/app",
            &[("x-auth-token", &alice), ("x-echo-status", "502")],
        )
        .await,
        502,
        "upstream 5xx",
    );
    let fault = [Fault::Status(503), Fault::Throttle][round % 2].clone();
    h.sim.set_fault(Some(Api::VerifyToken), Some(fault));
    let answer = h.get("/app", &[("x-auth-token", &unknown())]).await;
    h.sim.set_fault(Some(Api::VerifyToken), None);
    expect(answer, 503, "iam_unavailable");
}

/// A new IAM user with a virtual MFA device, known to no cache yet.
fn fresh_user(h: &Harness) -> SimUser {
    let mut user = iam_sim::demo_users(Duration::from_secs(3600)).remove(0);
    user.user_name = format!("fresh-{}", &user.user_id[..8]);
    h.sim.add_user(user.clone());
    user
}

/// One round of fleet traffic for the shared cache between the harness' gateway (`h`) and a
/// second one (`peer`) on the same Redis: a token fetched by `h` and then used on `peer` (a
/// shared `miss`, then a `hit`), a token whose Redis entry was forged (`rejected`), a purge of
/// the first user with the admin token (`published` on `h`, `received` on `peer`) and one
/// without (`unauthorized`).
async fn drive_fleet(h: &Harness, peer: &Gateway, redis: &Redis) {
    let expect = |answer: Answer, status: u16, what: &str| {
        assert_eq!(answer.status.as_u16(), status, "{what}: {}", answer.text());
    };
    let shared = fresh_user(h);
    expect(
        h.get("/app", &[("x-auth-token", &shared.token)]).await,
        200,
        "shared cache miss",
    );
    let on_peer = format!("http://{}/app", peer.addr);
    expect(
        send(
            Method::GET,
            &on_peer,
            &[("x-auth-token", &shared.token)],
            Bytes::new(),
        )
        .await,
        200,
        "shared cache hit on the peer",
    );
    let forged = fresh_user(h);
    redis.forge_entry(&forged.token);
    expect(
        h.get("/app", &[("x-auth-token", &forged.token)]).await,
        200,
        "forged shared entry rejected, the IAM asked",
    );
    let purge = h.admin_url(&format!("/admin/cache/purge?user_id={}", shared.user_id));
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    expect(
        send(
            Method::POST,
            &purge,
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await,
        200,
        "purge with the admin token",
    );
    expect(
        send(Method::POST, &purge, &[], Bytes::new()).await,
        401,
        "purge without the admin token",
    );
}

/// A refused and an accepted config reload, through the same path as a file change: the
/// config file gets a syntax error, then its old text back.
async fn reload_bad_then_good(h: &Harness, path: &Path, reloader: &mut Reloader) {
    let good = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, "[policy\n").unwrap();
    reloader.reload(&h.gateway, "test").await;
    std::fs::write(path, good).unwrap();
    reloader.reload(&h.gateway, "test").await;
}

#[test]
fn dashboard_is_importable_and_every_panel_is_filtered_and_explained() {
    let dashboard = dashboard();
    let schema = dashboard["schemaVersion"].as_u64().unwrap_or(0);
    assert!(schema >= 39, "schemaVersion {schema} < 39");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));

    // Variables: the datasource, then job and instance from the gateway's own build info.
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    for (name, query) in [
        ("job", "label_values(mfa_gate_build_info, job)"),
        (
            "instance",
            r#"label_values(mfa_gate_build_info{job=~"$job"}, instance)"#,
        ),
    ] {
        let v = variable(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["definition"], query, "{name}");
        assert_eq!(v["datasource"]["uid"], DATASOURCE_UID, "{name}");
        assert_eq!(
            v["allValue"], ".*",
            "{name}: \"All\" must match every value"
        );
    }

    // No uid but the dashboard's own, the variable and Grafana's built-in annotation source.
    fn uids<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("uid", Value::String(uid)) => out.push(uid),
                        _ => uids(value, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| uids(item, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    uids(&dashboard, &mut found);
    let own = dashboard["uid"].as_str().unwrap();
    for uid in found {
        assert!(
            [DATASOURCE_UID, own, "-- Grafana --"].contains(&uid),
            "hard-coded uid {uid:?}: use {DATASOURCE_UID}"
        );
    }

    let mut ids = HashSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        assert!(ids.insert(panel["id"].as_u64()), "{title}: duplicate id");
        assert!(panel["gridPos"]["w"].is_u64(), "{title}: no gridPos");
        assert_eq!(panel["datasource"]["uid"], DATASOURCE_UID, "{title}");
        if panel["type"] == "row" {
            continue;
        }
        let description = panel["description"].as_str().unwrap_or_default();
        assert!(
            description.len() >= 80,
            "{title}: the description must tell an operator what to do: {description:?}"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], DATASOURCE_UID, "{title}");
        }
    }

    let queries: Vec<(String, String)> = panel_queries(&dashboard)
        .into_iter()
        .chain(annotation_queries(&dashboard))
        .collect();
    for (title, expr) in &queries {
        assert!(expr.contains('{'), "{title}: unfiltered query {expr}");
        for (at, _) in expr.match_indices('{') {
            assert!(
                expr[at + 1..].starts_with(FILTER),
                "{title}: every selector must start with {{{FILTER}: {expr}"
            );
        }
        for (at, _) in expr.match_indices('[') {
            assert!(
                expr[at + 1..].starts_with("$__rate_interval]"),
                "{title}: ranges must be [$__rate_interval]: {expr}"
            );
        }
    }
    for family in FAMILIES {
        assert!(
            queries.iter().any(|(_, expr)| expr.contains(family)),
            "no panel shows {family}"
        );
    }

    // The rows, in order, and the families each row is about shown under it.
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        if panel["type"] == "row" {
            rows.push((title, Vec::new()));
        } else if let Some((_, exprs)) = rows.last_mut() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    let titles: Vec<&str> = rows.iter().map(|(title, _)| title.as_str()).collect();
    assert_eq!(titles, ROWS, "rows");
    for (row, family) in [
        ("Decisions", "mfa_gate_route_decisions_total"),
        (
            "Decisions",
            "mfa_gate_allowlist_rule_expiry_timestamp_seconds",
        ),
        (
            "Shared cache (fleet)",
            "mfa_gate_shared_cache_requests_total",
        ),
        ("Shared cache (fleet)", "mfa_gate_shared_cache_up"),
        (
            "Shared cache (fleet)",
            "mfa_gate_shared_cache_invalidations_total",
        ),
        ("Gateway", "mfa_gate_admin_actions_total"),
    ] {
        let (_, exprs) = rows.iter().find(|(title, _)| title == row).unwrap();
        assert!(
            exprs.iter().any(|expr| expr.contains(family)),
            "row {row:?} does not show {family}"
        );
    }
    // The shared cache's up gauge is 0 on gateways without [cache.shared] too: its panel must
    // leave those out by their read counter (the Prometheus test checks that it does).
    let up_panel = shared_up_query(&dashboard);
    assert!(
        up_panel.contains("mfa_gate_shared_cache_requests_total"),
        "the Redis up panel shows gateways without a shared cache: {up_panel}"
    );
}

/// The query of the dashboard's "Redis up" panel.
fn shared_up_query(dashboard: &Value) -> String {
    panel_queries(dashboard)
        .into_iter()
        .find(|(title, _)| title.contains("(Redis) up"))
        .map(|(_, expr)| expr)
        .expect("a panel \"Shared cache (Redis) up per instance\"")
}

#[test]
fn families_are_those_of_src_metrics() {
    // Every metric name registered in src/metrics.rs is a string literal there.
    let source = read("src/metrics.rs");
    let declared: BTreeSet<&str> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|literal| {
            literal.starts_with("mfa_gate_")
                && literal.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
        .collect();
    let listed: BTreeSet<&str> = FAMILIES.into_iter().collect();
    assert_eq!(
        declared, listed,
        "src/metrics.rs and FAMILIES disagree: add the new family to FAMILIES and to the dashboard"
    );
}

#[test]
fn every_alert_has_a_window_a_severity_and_a_runbook() {
    let rules = read("dashboards/alerts.yml");
    let readme = read("dashboards/README.md");
    let names = rule_names(&rules);
    let exprs = rule_exprs(&rules);
    assert_eq!(
        names.len(),
        exprs.len(),
        "every rule has exactly one expr: {names:?}"
    );
    // One block of lines per rule, from its `- alert:`/`- record:` line to the next.
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in rules.lines() {
        let body = line.trim_start();
        if let Some(name) = body.strip_prefix("- alert:") {
            blocks.push((name.trim().to_string(), String::new()));
        } else if body.starts_with("- record:") || body.starts_with("- name:") {
            blocks.push((String::new(), String::new()));
        } else if let Some((_, block)) = blocks.last_mut() {
            block.push_str(body);
            block.push('\n');
        }
    }
    let alerts: Vec<&(String, String)> = blocks.iter().filter(|(n, _)| !n.is_empty()).collect();
    let alert_names: Vec<&str> = alerts.iter().map(|(name, _)| name.as_str()).collect();
    let expected: Vec<&str> = ALERTS.iter().map(|(name, _, _)| *name).collect();
    assert_eq!(alert_names, expected, "alerts of alerts.yml");
    for ((name, block), (_, severity, category)) in alerts.iter().zip(ALERTS) {
        assert!(
            block.lines().any(|l| l == format!("severity: {severity}")),
            "{name}: severity must be {severity}"
        );
        let categories: Vec<&str> = block
            .lines()
            .filter_map(|l| l.strip_prefix("category: "))
            .collect();
        assert_eq!(categories, Vec::from_iter(category), "{name}: category");
    }
    for (name, block) in alerts {
        for key in ["for:", "severity:", "summary:", "description:", "runbook:"] {
            assert!(
                block.lines().any(|l| l.starts_with(key)),
                "{name}: no {key}"
            );
        }
        assert!(
            readme.contains(name.as_str()),
            "dashboards/README.md does not explain {name}"
        );
    }
    for must in [
        r#"reason="iam_unavailable""#,
        r#"outcome="throttled""#,
        r#"reason="no_mfa""#,
        r#"class=~"5xx|error|timeout""#,
        "up == 0",
        "absent(mfa_gate_build_info)",
        r#"mfa_gate_config_reloads_total{result="error"}"#,
        r#"mfa_gate_cache_lookups_total{result="hit"}"#,
        "mfa_gate_shared_cache_up == 0",
        r#"mfa_gate_shared_cache_requests_total{result="rejected"}"#,
        "mfa_gate_allowlist_rule_expiry_timestamp_seconds",
        r#"mfa_gate_admin_actions_total{result="unauthorized"}"#,
    ] {
        assert!(exprs.iter().any(|e| e.contains(must)), "no rule on {must}");
    }
    // A gateway without [cache.shared] exports mfa_gate_shared_cache_up 0 as well: the down
    // alert must also ask for reads of the shared cache.
    let down = exprs
        .iter()
        .find(|e| e.contains("mfa_gate_shared_cache_up == 0"))
        .unwrap();
    assert!(
        down.contains("mfa_gate_shared_cache_requests_total"),
        "MfaGateSharedCacheDown would fire on every gateway without a shared cache: {down}"
    );
}

#[tokio::test]
async fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let rules = repo_file("dashboards/alerts.yml");
    let (ok, output) = run(
        &promtool,
        &["check", "rules", rules.to_str().unwrap()],
        None,
    )
    .await;
    assert!(ok, "promtool check rules:\n{output}");
    let tests = repo_file("dashboards/alerts_test.yml");
    let (ok, output) = run(&promtool, &["test", "rules", tests.to_str().unwrap()], None).await;
    assert!(ok, "promtool test rules:\n{output}");
}

#[tokio::test]
async fn gateway_metrics_pass_promtool_check_metrics() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let h = Harness::with_config(&format!("{TRAFFIC_CONFIG}{}", break_glass_rule())).await;
    drive(&h, 0).await;
    drive(&h, 1).await;
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("mfa_gate_allowlist_rule_expiry_timestamp_seconds{")
            && metrics.contains("mfa_gate_route_decisions_total{"),
        "every family has a series to check:\n{metrics}"
    );
    let (ok, output) = run(&promtool, &["check", "metrics"], Some(&metrics)).await;
    assert!(
        ok && output.trim().is_empty(),
        "promtool check metrics on /metrics:\n{output}"
    );
}

#[tokio::test]
async fn every_dashboard_and_alert_query_answers_from_a_real_prometheus() {
    let Some(binary) = tool("prometheus", "prometheus") else {
        return;
    };
    let Some(redis_server) = tool("redis-server", "redis-server") else {
        return;
    };
    let mut redis = Redis::start(&redis_server);
    // The fleet: the harness' gateway (`h`, the one driven through every decision) and `peer`
    // share the Redis; `solo` has no [cache.shared] (and exports mfa_gate_shared_cache_up 0).
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("secret"), FLEET_SECRET).unwrap();
    std::fs::write(files.path().join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    let base = format!("{TRAFFIC_CONFIG}{}", break_glass_rule());
    let fleet = format!(
        "{base}[admin]\ntoken_file = \"{d}/admin-token\"\n\
         [cache.shared]\nredis_url = \"{url}\"\nkey_prefix = \"{FLEET_PREFIX}\"\n\
         secret_file = \"{d}/secret\"\n",
        d = files.path().display(),
        url = redis.url(),
    );
    let h = Harness::with_config(&fleet).await;
    let start = |extra: &str, name: &str| {
        let text = config_text(&h.sim.url(), &h.upstream.url(), extra);
        let config = Config::from_toml(&text, Path::new(name))
            .unwrap_or_else(|err| panic!("{name} refused: {err}\n{text}"));
        Gateway::start(config)
    };
    let peer = start(&fleet, "peer.toml").await.unwrap();
    let solo = start(&base, "solo.toml").await.unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config_path = config_dir.path().join("mfa-gate.toml");
    std::fs::write(
        &config_path,
        config_text(&h.sim.url(), &h.upstream.url(), &fleet),
    )
    .unwrap();
    let mut reloader = Reloader::new(&config_path, &h.gateway);
    let (h_instance, peer_instance, solo_instance) = (
        h.gateway.admin_addr.to_string(),
        peer.admin_addr.to_string(),
        solo.admin_addr.to_string(),
    );
    let prometheus = Prometheus::start(
        &binary,
        &[h.gateway.admin_addr, peer.admin_addr, solo.admin_addr],
    )
    .await;

    // Traffic (and config reloads) between scrapes until Prometheus has at least three scrapes
    // of every gateway and has seen every driven decision, both reload results, the shared
    // cache's hit, miss and rejected reads, both ends of a fleet purge, an unauthorized admin
    // request and every route's decisions increase, so that every rate over 1m is above zero.
    let expected: BTreeSet<(String, String)> = DRIVEN
        .iter()
        .map(|(d, r)| (d.to_string(), r.to_string()))
        .collect();
    let increased = |selector: &str| {
        format!("sum by (instance, result, event, route, decision, reason) (increase({selector}[1m])) > 0")
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut round = 0;
    loop {
        drive(&h, round).await;
        drive_fleet(&h, &peer, &redis).await;
        reload_bad_then_good(&h, &config_path, &mut reloader).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let scrapes = prometheus
            .value(r#"min(count_over_time(up{job="mfa-gate"}[1m]))"#)
            .await;
        let up = prometheus.value(r#"sum(up{job="mfa-gate"})"#).await;
        let shared: BTreeSet<String> = prometheus
            .samples(&increased("mfa_gate_shared_cache_requests_total"))
            .await
            .iter()
            .map(|s| format!("{} {}", label(s, "instance"), label(s, "result")))
            .collect();
        let shared_expected = BTreeSet::from([
            format!("{h_instance} miss"),
            format!("{h_instance} rejected"),
            format!("{peer_instance} hit"),
        ]);
        let invalidations: BTreeSet<String> = prometheus
            .samples(&increased("mfa_gate_shared_cache_invalidations_total"))
            .await
            .iter()
            .map(|s| format!("{} {}", label(s, "instance"), label(s, "event")))
            .collect();
        let invalidations_expected = BTreeSet::from([
            format!("{h_instance} published"),
            format!("{peer_instance} received"),
        ]);
        let admin = prometheus
            .samples(&increased(
                r#"mfa_gate_admin_actions_total{action="cache_purge"}"#,
            ))
            .await
            .len();
        let routes = prometheus
            .samples(&increased("mfa_gate_route_decisions_total"))
            .await
            .len();
        let seen: BTreeSet<(String, String)> = prometheus
            .samples("sum by (decision, reason) (increase(mfa_gate_decisions_total[1m])) > 0")
            .await
            .iter()
            .map(|s| {
                let label = |name: &str| s["metric"][name].as_str().unwrap_or_default().into();
                (label("decision"), label("reason"))
            })
            .collect();
        let reloads = prometheus
            .samples("increase(mfa_gate_config_reloads_total[1m]) > 0")
            .await
            .len();
        if scrapes >= 3.0
            && up == 3.0
            && expected.is_subset(&seen)
            && reloads == 2
            && shared_expected.is_subset(&shared)
            && invalidations_expected.is_subset(&invalidations)
            && admin == 2
            && routes == 3
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 90s: {scrapes} scrapes, {up} of 3 gateways up, decisions seen {seen:?}, \
             expected {expected:?}, reload results seen {reloads} of 2, shared cache reads \
             {shared:?} (expected {shared_expected:?}), invalidations {invalidations:?} \
             (expected {invalidations_expected:?}), admin purge results {admin} of 2 (ok, \
             unauthorized), route decisions {routes} of 3\n{}",
            prometheus.log_text()
        );
    }
    // One more round, scraped, for the latest samples.
    drive(&h, round).await;
    drive_fleet(&h, &peer, &redis).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut failures = Vec::new();

    // The rule file as Prometheus itself loaded and evaluated it.
    let names = rule_names(&read("dashboards/alerts.yml"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let rules = prometheus.rules().await;
        if rules.len() == names.len() && rules.iter().all(|(_, health, _)| health != "unknown") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated after 30s: {rules:?} (expected {names:?})\n{}",
            prometheus.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (name, health, error) in rules {
        if health != "ok" {
            failures.push(format!("rule {name}: health {health}: {error}"));
        }
    }
    for expr in rule_exprs(&read("dashboards/alerts.yml")) {
        if let Err(err) = prometheus.query(&expr).await {
            failures.push(format!("alerts.yml expr fails: {err}\n  {expr}"));
        }
    }
    // End to end, one alert without a `for:` window: the refused reloads above make
    // MfaGateConfigReloadFailed fire, with the job label the scrape gave it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let firing = prometheus.firing().await;
        if firing.contains(&("MfaGateConfigReloadFailed".into(), "mfa-gate".into())) {
            break;
        }
        if Instant::now() > deadline {
            failures.push(format!(
                "MfaGateConfigReloadFailed not firing after a refused reload; firing: {firing:?}"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The other alerts without a `for:` window, on the gateway (or rule) that caused them: the
    // forged Redis entries, the purges without the admin token, the rule that lapses in 12 h.
    for (name, labels) in [
        (
            "MfaGateSharedCacheRejected",
            vec![("instance", h_instance.as_str()), ("category", "security")],
        ),
        (
            "MfaGateAdminUnauthorized",
            vec![("instance", h_instance.as_str()), ("action", "cache_purge")],
        ),
        (
            "MfaGateBreakGlassRuleExpiresSoon",
            vec![("job", "mfa-gate"), ("rule", BREAK_GLASS)],
        ),
    ] {
        if let Err(err) = prometheus.wait_alert(name, "firing", &labels).await {
            failures.push(err);
        }
    }
    // Redis is up for the fleet and `solo` has none: its up gauge is 0 like a down Redis's,
    // yet MfaGateSharedCacheDown is not even pending for it.
    let naive: Vec<String> = prometheus
        .samples(r#"mfa_gate_shared_cache_up{job="mfa-gate"} == 0"#)
        .await
        .iter()
        .map(|s| label(s, "instance"))
        .collect();
    if naive != [solo_instance.clone()] {
        failures.push(format!(
            "mfa_gate_shared_cache_up == 0 should be {solo_instance} (no shared cache) alone: {naive:?}"
        ));
    }
    let shared_down: Vec<Value> = prometheus
        .alerts()
        .await
        .into_iter()
        .filter(|a| label(a, "alertname") == "MfaGateSharedCacheDown")
        .collect();
    if !shared_down.is_empty() {
        failures.push(format!(
            "MfaGateSharedCacheDown active while Redis is up: {shared_down:?}"
        ));
    }

    // Every dashboard query: no error, at least one series, and a number in at least one of
    // them (a panel of NaN is as useless to an operator as an empty one).
    let dashboard = dashboard();
    for (title, expr) in panel_queries(&dashboard) {
        let query = promql(&expr);
        match prometheus.query(&query).await {
            Err(err) => failures.push(format!("panel {title:?}: {err}\n  {query}")),
            Ok(data) => {
                let result = data["result"].as_array().cloned().unwrap_or_default();
                if result.is_empty() {
                    failures.push(format!("panel {title:?}: no series\n  {query}"));
                } else if !result.iter().any(|s| finite(&s["value"])) {
                    failures.push(format!(
                        "panel {title:?}: only NaN/Inf: {result:?}\n  {query}"
                    ));
                }
            }
        }
    }
    for (name, expr) in annotation_queries(&dashboard) {
        let query = promql(&expr);
        match prometheus.query(&query).await {
            Err(err) => failures.push(format!("annotation {name:?}: {err}\n  {query}")),
            Ok(data) if data["result"].as_array().is_none_or(Vec::is_empty) => {
                failures.push(format!("annotation {name:?}: no reload marked\n  {query}"));
            }
            Ok(_) => {}
        }
    }
    // The job and instance variables: `label_values(SELECTOR, LABEL)` as `group by (LABEL)`.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(definition) = variable["definition"].as_str() else {
            continue;
        };
        let (selector, label) = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .and_then(|d| d.rsplit_once(','))
            .unwrap_or_else(|| panic!("unexpected variable query {definition}"));
        let label = label.trim();
        let query = format!("group by ({label}) ({})", promql(selector));
        match prometheus.query(&query).await {
            Err(err) => failures.push(format!("variable {definition}: {err}")),
            Ok(data) => {
                let values: Vec<&str> = data["result"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["metric"][label].as_str())
                    .collect();
                if values.is_empty() {
                    failures.push(format!("variable {definition}: no values"));
                }
            }
        }
    }

    // The Redis up panel shows the two gateways of the shared cache, both up, and not `solo`.
    let up_panel: BTreeSet<(String, String)> = prometheus
        .samples(&promql(&shared_up_query(&dashboard)))
        .await
        .iter()
        .map(|s| {
            let value = s["value"][1].as_str().unwrap_or_default().to_string();
            (label(s, "instance"), value)
        })
        .collect();
    let up_expected = BTreeSet::from([
        (h_instance.clone(), "1".to_string()),
        (peer_instance.clone(), "1".to_string()),
    ]);
    if up_panel != up_expected {
        failures.push(format!(
            "panel \"Shared cache (Redis) up per instance\": {up_panel:?}, expected {up_expected:?}"
        ));
    }

    // Redis goes away: the next local miss on each fleet gateway finds it down and counts
    // `error`, and MfaGateSharedCacheDown goes pending (its `for:` is 5m) for those two, still
    // not for `solo`.
    redis.kill();
    for gateway in [&h.gateway, &peer] {
        let user = fresh_user(&h);
        let answer = send(
            Method::GET,
            &format!("http://{}/app", gateway.addr),
            &[("x-auth-token", &user.token)],
            Bytes::new(),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "without Redis: {}",
            answer.text()
        );
    }
    for instance in [&h_instance, &peer_instance] {
        if let Err(err) = prometheus
            .wait_alert(
                "MfaGateSharedCacheDown",
                "pending",
                &[("instance", instance)],
            )
            .await
        {
            failures.push(err);
        }
    }
    if let Some(alert) = prometheus.alerts().await.iter().find(|a| {
        label(a, "alertname") == "MfaGateSharedCacheDown" && label(a, "instance") == solo_instance
    }) {
        failures.push(format!(
            "MfaGateSharedCacheDown for a gateway without a shared cache: {alert}"
        ));
    }

    let log = prometheus.log_text();
    prometheus.stop().await;
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\n--- prometheus log ---\n{log}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn rule_exprs_reads_plain_quoted_and_block_scalars() {
    let yaml = r#"
groups:
  - name: g
    rules:
      - alert: A
        expr: up == 0
        for: 1m
      - alert: B
        expr: 'a{x=''y''}'
      - record: r
        expr: |
          sum(a)
            /
          sum(b)
        labels: {}
      - alert: C
        expr: >-
          absent(x)
"#;
    assert_eq!(
        rule_exprs(yaml),
        ["up == 0", "a{x='y'}", "sum(a)\n/\nsum(b)", "absent(x)"]
    );
    assert_eq!(rule_names(yaml), ["A", "B", "r", "C"]);
}
