//! The binary as operators run it: `check`, config errors, `run` with JSON logs, SIGTERM.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use mfa_gate::dev::iam_sim::{self, Api, Fault, IamSim};
use mfa_gate::dev::upstream::DemoUpstream;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::hostile::RawConn;
use crate::support::{config_text, send, LOOPBACK};

const BIN: &str = env!("CARGO_BIN_EXE_mfa-gate");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("mfa-gate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_example_and_prints_effective_settings() {
    let output = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/mfa-gate.toml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("[cache]"), "{stdout}");
    assert!(stdout.contains("negative_ttl = \"10s\""), "{stdout}");
    assert!(stdout.contains("name = \"health\""), "{stdout}");
}

#[test]
fn config_errors_exit_64_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[upstream]\nurl = \"http://127.0.0.1:1\"\n[iam]\nendpoint = \"https://iam.example.com\"\n[polcy]\n", "unknown field `polcy`"),
        ("[iam]\nendpoint = \"https://iam.example.com\"\n", "upstream.url: missing"),
        ("[upstream]\nurl = \"http://127.0.0.1:1\"\n[iam]\nendpoint = \"http://iam.example.com\"\n", "iam.endpoint"),
        ("[upstream]\nurl = \"http://127.0.0.1:1\"\n[iam]\nendpoint = \"https://iam.example.com\"\n[cache]\nttl = \"soon\"\n", "cache.ttl"),
        ("[upstream]\nurl = \"http://127.0.0.1:1\"\n[iam]\nendpoint = \"https://iam.example.com\"\n[[allow]]\nname = \"x\"\n", "allow[0]"),
    ];
    for (text, needle) in cases {
        let path = write_config(&dir, text);
        for command in ["check", "run"] {
            let output = std::process::Command::new(BIN)
                .args([command, "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert_eq!(
                output.status.code(),
                Some(64),
                "{command} {text:?}: {output:?}"
            );
            let stderr = String::from_utf8(output.stderr).unwrap();
            assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
            assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
            assert!(stderr.starts_with("mfa-gate: config error: "), "{stderr}");
        }
    }
    let output = std::process::Command::new(BIN)
        .args(["check", "--config", "/nonexistent/mfa-gate.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/mfa-gate.toml"));
}

#[test]
fn config_path_may_come_from_the_environment_and_flags_go_anywhere() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/mfa-gate.toml");
    let output = std::process::Command::new(BIN)
        .args(["--log-format", "json", "check", "--log-level", "warn"])
        .env("MFA_GATE_CONFIG", path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

/// A gateway process with its stderr collected line by line.
pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    pub async fn start(config: &std::path::Path) -> (Process, String, String) {
        Process::start_with_env(config, &[]).await
    }

    pub async fn start_with_env(
        config: &std::path::Path,
        env: &[(&str, &str)],
    ) -> (Process, String, String) {
        let mut child = Command::new(BIN)
            .args([
                "--log-format",
                "json",
                "--log-level",
                "debug",
                "run",
                "--config",
            ])
            .arg(config)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if line.contains("mfa-gate ready") {
                    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send((
                            event["listen"].as_str().unwrap().to_string(),
                            event["admin"].as_str().unwrap().to_string(),
                        ));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (listen, admin) = tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("gateway did not become ready")
            .expect("gateway exited");
        (Process { child, lines }, listen, admin)
    }

    /// Sends a signal by name, e.g. "-HUP".
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn terminate(mut self) -> (Option<i32>, Vec<String>) {
        self.signal("-TERM");
        let exit = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("no exit after SIGTERM")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lines = self.lines.lock().unwrap().clone();
        (exit.code(), lines)
    }
}

#[tokio::test]
async fn run_logs_one_decision_event_per_request_and_never_a_token() {
    let users = iam_sim::demo_users(Duration::from_secs(3600));
    let sim = IamSim::start(LOOPBACK.into(), users.clone()).await.unwrap();
    let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &config_text(
            &sim.url(),
            &upstream.url(),
            "[cache]\nttl = \"200ms\"\nstale_if_error = \"0s\"\n",
        ),
    );
    let (process, listen, admin) = Process::start(&config).await;

    let token = |name: &str| {
        users
            .iter()
            .find(|u| u.user_name == name)
            .unwrap()
            .token
            .clone()
    };
    let url = format!("http://{listen}/app/page");
    let mut tokens = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let t = token(name);
        send(Method::GET, &url, &[("x-auth-token", &t)], Bytes::new()).await;
        let bearer = format!("Bearer {t}");
        send(
            Method::GET,
            &url,
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
        tokens.push(t);
    }
    let bogus = "bogus-token-0123456789abcdef".to_string();
    let answer = send(Method::GET, &url, &[("x-auth-token", &bogus)], Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(!answer.text().contains(&bogus));
    tokens.push(bogus);
    // IAM failures log their cause: still no token in it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.set_fault(Some(Api::VerifyToken), Some(Fault::Status(500)));
    let answer = send(
        Method::GET,
        &url,
        &[("x-auth-token", &tokens[0])],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!answer.text().contains(&tokens[0]));
    sim.set_fault(None, None);

    let metrics = send(
        Method::GET,
        &format!("http://{admin}/metrics"),
        &[],
        Bytes::new(),
    )
    .await
    .text();
    let (code, lines) = process.terminate().await;
    assert_eq!(code, Some(0), "SIGTERM exits 0");

    for token in &tokens {
        assert!(!metrics.contains(token.as_str()), "token in /metrics");
        // Not even a part of it.
        let part = &token[token.len() - 12..];
        for line in &lines {
            assert!(!line.contains(part), "token fragment in log line: {line}");
        }
    }
    let decisions: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "mfa_gate::access")
        .collect();
    assert_eq!(decisions.len(), 8, "one event per request");
    let alice_id = &users
        .iter()
        .find(|u| u.user_name == "alice")
        .unwrap()
        .user_id;
    let first = &decisions[0];
    assert_eq!(first["decision"], "allow");
    assert_eq!(first["reason"], "mfa_verified");
    assert_eq!(first["user_id"], alice_id.as_str());
    assert_eq!(first["path"], "/app/page");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["status"], 200);
    assert!(first["request_id"].as_str().unwrap().len() == 36);
    assert!(first["latency_ms"].as_f64().is_some());
    assert_eq!(decisions[2]["reason"], "no_mfa");
    assert_eq!(decisions[6]["reason"], "invalid_token");
    assert_eq!(decisions[7]["reason"], "iam_unavailable");
    assert_eq!(decisions[7]["status"], 503);
}

#[tokio::test]
async fn sigterm_drains_requests_in_flight() {
    let users = iam_sim::demo_users(Duration::from_secs(3600));
    let sim = IamSim::start(LOOPBACK.into(), users.clone()).await.unwrap();
    let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &config_text(&sim.url(), &upstream.url(), ""));
    let (process, listen, _) = Process::start(&config).await;
    let token = users[0].token.clone();
    let url = format!("http://{listen}/slow");
    let mut requests = Vec::new();
    for _ in 0..4 {
        let (url, token) = (url.clone(), token.clone());
        requests.push(tokio::spawn(async move {
            send(
                Method::GET,
                &url,
                &[("x-auth-token", &token), ("x-echo-delay-ms", "800")],
                Bytes::new(),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, _) = process.terminate().await;
    assert_eq!(code, Some(0));
    for request in requests {
        assert_eq!(request.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(upstream.request_count(), 4);
}

#[test]
fn an_unknown_runtime_flavour_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config_text("http://127.0.0.1:9", "http://127.0.0.1:9", ""),
    );
    let output = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env("MFA_GATE_RUNTIME", "green-threads")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("MFA_GATE_RUNTIME") && stderr.contains("green-threads"),
        "{stderr}"
    );
}

/// The gateway process with `workers` worker threads, in front of a demo upstream and the IAM
/// simulator, and a warm user's token. Bind every field: what a `..` leaves out is dropped at
/// once (the simulator, the upstream and the config's directory with it).
struct WithWorkers {
    process: Process,
    listen: String,
    token: String,
    upstream: DemoUpstream,
    _sim: IamSim,
    _dir: tempfile::TempDir,
}

async fn start_with_workers(workers: &str) -> WithWorkers {
    let users = iam_sim::demo_users(Duration::from_secs(3600));
    let sim = IamSim::start(LOOPBACK.into(), users.clone()).await.unwrap();
    let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &config_text(&sim.url(), &upstream.url(), ""));
    let (process, listen, _) =
        Process::start_with_env(&config, &[("TOKIO_WORKER_THREADS", workers)]).await;
    WithWorkers {
        process,
        listen,
        token: users[0].token.clone(),
        upstream,
        _sim: sim,
        _dir: dir,
    }
}

#[tokio::test]
async fn connections_are_dealt_to_the_workers_and_each_keeps_its_upstream_connections() {
    let WithWorkers {
        process,
        listen,
        token,
        upstream,
        _sim,
        _dir,
    } = start_with_workers("3").await;

    let pid = process.child.id().unwrap();
    let mut workers: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("mfa-worker-"))
        .collect();
    workers.sort();
    assert_eq!(workers, ["mfa-worker-0", "mfa-worker-1", "mfa-worker-2"]);

    // Six keep-alive client connections, used one request at a time: dealt in turn, two per
    // worker; each worker opens one upstream connection and reuses it.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(RawConn::open(listen.parse().unwrap()).await);
    }
    for round in 0..4 {
        for (n, client) in clients.iter_mut().enumerate() {
            let request =
                format!("GET /w/{round}/{n} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n\r\n");
            client.send(request.as_bytes());
            let reply = client.reply(false, Duration::from_secs(5)).await;
            assert_eq!(reply.status, Some(200), "{}", reply.text());
        }
    }
    assert_eq!(upstream.request_count(), 24);
    assert_eq!(
        upstream.connections_accepted(),
        3,
        "one upstream connection per worker"
    );
    let (code, _) = process.terminate().await;
    assert_eq!(code, Some(0));
}

/// Voluntary context switches of the main thread of process `pid` (Linux's procfs: its thread
/// id is the process's).
fn main_thread_switches(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .map(|n| n.trim().parse().unwrap())
        .unwrap()
}

#[tokio::test]
async fn a_worker_serves_its_connections_without_waking_the_thread_that_accepted_them() {
    // The accepting thread's I/O driver would otherwise deliver every readiness event of the
    // connection and wake the worker for it: one wake-up of the main thread per request.
    let WithWorkers {
        process,
        listen,
        token,
        upstream: _upstream,
        _sim,
        _dir,
    } = start_with_workers("2").await;
    let pid = process.child.id().unwrap();

    let mut client = RawConn::open(listen.parse().unwrap()).await;
    let request = format!("GET /r HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n\r\n");
    client.send(request.as_bytes());
    assert_eq!(
        client.reply(false, Duration::from_secs(5)).await.status,
        Some(200)
    );

    const REQUESTS: u64 = 400;
    let before = main_thread_switches(pid);
    for _ in 0..REQUESTS {
        client.send(request.as_bytes());
        let reply = client.reply(false, Duration::from_secs(5)).await;
        assert_eq!(reply.status, Some(200), "{}", reply.text());
    }
    let woken = main_thread_switches(pid) - before;
    // Its own work (the config file looked at once a second, the rules' lapses) wakes it a
    // few times; one request after another would wake it about once each.
    assert!(
        woken < REQUESTS / 10,
        "the main thread was woken {woken} times for {REQUESTS} requests served by a worker"
    );
    let (code, _) = process.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn dev_mode_tells_the_whole_story() {
    let mut child = Command::new(BIN)
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("Ctrl-C stops everything");
            banner.push(line);
            if done {
                break;
            }
        }
    })
    .await
    .expect("banner printed");
    let text = banner.join("\n");
    let gateway = banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("gateway"))
        .unwrap()
        .trim()
        .to_string();
    let token_of = |name: &str| {
        let at = banner
            .iter()
            .position(|l| l.trim_start().starts_with(name))
            .unwrap();
        banner[at + 1]
            .trim()
            .strip_prefix("token: ")
            .unwrap()
            .to_string()
    };
    // The printed curl lines work as printed: check the first one's shape, then replay them.
    assert!(text.contains(&format!(
        "curl -i {gateway}/hello -H 'X-Auth-Token: {}'",
        token_of("alice")
    )));
    let get = |token: Option<String>, path: &str| {
        let url = format!("{gateway}{path}");
        async move {
            let headers: Vec<(&str, String)> =
                token.map(|t| vec![("x-auth-token", t)]).unwrap_or_default();
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            send(Method::GET, &url, &headers, Bytes::new()).await
        }
    };
    let alice = get(Some(token_of("alice")), "/hello").await;
    assert_eq!(alice.status, StatusCode::OK);
    assert_eq!(
        alice.seen_header("x-auth-user-name").as_deref(),
        Some("alice")
    );
    assert_eq!(
        get(Some(token_of("bob")), "/hello").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(Some(token_of("carol")), "/hello").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(get(None, "/hello").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(None, "/public/readme.txt").await.status, StatusCode::OK);
    let _ = child.kill().await;
}

#[test]
fn check_warns_about_rules_that_already_expired() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[iam]\nendpoint = \"https://iam.example.com\"\n[[allow]]\nname = \"old-incident\"\npaths = [\"/x\"]\nexpires = \"2021-06-01T00:00:00Z\"\nreason = \"INC-1\"\n",
    );
    let output = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("warning: allow rule \"old-incident\" expired at 2021-06-01T00:00:00Z"),
        "{stderr}"
    );
}
