//! The benchmark run: starts the servers of every row, measures them interleaved
//! (round 1: rows 1 2 3 4 5 6, round 2: rows 1 2 3 4 5 6, …), pinned and unpinned, and writes
//! the tables.
//!
//! Rows (the same tiny upstream everywhere: nginx, one worker, `return 200 "ok"`):
//! 1. directly (the ceiling);
//! 2. through nginx `proxy_pass` with upstream keep-alive;
//! 3. through mfa-gate, warm cache;
//! 4. through nginx `auth_request` → mfa-gate's `/.mfa-gate/auth`;
//! 5. through mfa-gate, a fresh token per request, the IAM simulator answering after a fixed
//!    latency (the cold path);
//! 6. row 3 with `MFA_GATE_RUNTIME=multi-thread`: the runtime flavour, measured.

// Results are kept per row in parallel vectors, indexed by row.
#![allow(clippy::needless_range_loop)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use mfa_gate::dev::iam_sim::{Api, Fault, IamSim, SimUser};
use mfa_gate::dev::upstream::DemoUpstream;

use crate::load::{self, Outcome, Target, TokenSource};
use crate::procs::{self, loopback, Cpus, Server};

#[derive(Debug, Clone)]
pub struct RunArgs {
    pub mfa_gate: PathBuf,
    pub out: PathBuf,
    pub rounds: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    pub modes: Vec<Mode>,
    pub iam_latency: Duration,
    pub cache_sizes: Vec<u64>,
    pub token_bytes: usize,
    pub gate_log_level: String,
    pub burst: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pinned,
    Unpinned,
}

impl Mode {
    pub fn parse(text: &str) -> anyhow::Result<Mode> {
        match text {
            "pinned" => Ok(Mode::Pinned),
            "unpinned" => Ok(Mode::Unpinned),
            other => bail!("unknown mode {other:?} (pinned, unpinned)"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Pinned => "pinned",
            Mode::Unpinned => "unpinned",
        }
    }
}

/// The rows. Row 6 is row 3's gateway with `MFA_GATE_RUNTIME=multi-thread`: the runtime
/// flavour (one current-thread runtime per worker, the default, against tokio's work-stealing
/// scheduler) measured side by side.
const ROWS: [&str; 6] = [
    "1. direct (ceiling)",
    "2. nginx proxy_pass",
    "3. mfa-gate, warm cache",
    "4. nginx auth_request → mfa-gate",
    "5. mfa-gate, cold (fresh token, IAM latency)",
    "6. row 3 on tokio's multi-thread scheduler",
];

/// Row 4, nginx `auth_request` in front of mfa-gate's decision endpoint.
const AUTH_REQUEST: usize = 3;

/// Row 5, the cold path: fresh tokens from the harness's own load loop.
const COLD: usize = 4;

/// The rows whose own maximum can be below row 2's: their open loop runs at half of that
/// maximum when it is lower than half of row 2's, not at a rate they cannot sustain (a loop
/// driven past capacity measures how long its queue grew in the window, not latency).
const OWN_RATE_ROWS: [usize; 2] = [AUTH_REQUEST, COLD];

/// One closed-loop measurement of one row.
#[derive(Debug, Clone, Default)]
struct Closed {
    rate: f64,
    errors: u64,
    /// CPU seconds of the proxy processes per wall second: 1.0 = one core fully busy.
    cores_busy: Option<f64>,
    cpu_per_10k: Option<f64>,
    conns_per_1k: Option<f64>,
}

/// One open-loop measurement of one row.
#[derive(Debug, Clone, Default)]
struct Open {
    achieved: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
    cpu_per_10k: Option<f64>,
}

/// Everything measured in one mode.
#[derive(Debug, Default)]
struct ModeResult {
    workers: usize,
    closed: Vec<Vec<Closed>>, // [row][round]
    open: Vec<Vec<Open>>,     // [row][round]
    open_rate: f64,
    /// The open-loop rate of each row: `open_rate`, or less for [`OWN_RATE_ROWS`].
    row_open_rate: Vec<f64>,
    peak_rss_mib: Vec<Option<f64>>, // [row]
    burst: Option<Burst>,
    cold_latency: Option<ColdLatency>,
    /// The Nagle check.
    split_writes: Option<SplitWrites>,
}

/// Sequential requests whose body follows the head after a pause (see [`split_writes`]).
#[derive(Debug, Clone)]
struct SplitWrites {
    samples: usize,
    p50_ms: f64,
    max_ms: f64,
    over_30ms: usize,
}

#[derive(Debug, Clone)]
struct Burst {
    requests: usize,
    ok: usize,
    other: usize,
    verify: usize,
    mfa_device: usize,
    login_protect: usize,
    seconds: f64,
}

#[derive(Debug, Clone)]
struct ColdLatency {
    samples: usize,
    cold_ms: f64,
    warm_ms: f64,
    /// One IAM call (verify_token) made directly by the harness: the simulator's latency plus
    /// HTTP overhead and timer granularity.
    iam_call_ms: f64,
    round_trips: f64,
}

/// The servers of one mode.
struct Servers {
    upstream: Server,
    upstream_addr: SocketAddr,
    nginx_proxy: Server,
    nginx_proxy_addr: SocketAddr,
    gate_warm: Server,
    gate_warm_addr: SocketAddr,
    nginx_auth: Server,
    nginx_auth_addr: SocketAddr,
    gate_auth: Server,
    gate_auth_addr: SocketAddr,
    gate_cold: Server,
    gate_cold_addr: SocketAddr,
    gate_mt: Server,
    gate_mt_addr: SocketAddr,
}

impl Servers {
    /// The processes whose CPU and memory count as "the proxy" of a row.
    fn proxies(&self, row: usize) -> Vec<&Server> {
        match row {
            0 => vec![],
            1 => vec![&self.nginx_proxy],
            2 => vec![&self.gate_warm],
            3 => vec![&self.nginx_auth, &self.gate_auth],
            COLD => vec![&self.gate_cold],
            _ => vec![&self.gate_mt],
        }
    }

    fn addr(&self, row: usize) -> SocketAddr {
        match row {
            0 => self.upstream_addr,
            1 => self.nginx_proxy_addr,
            2 => self.gate_warm_addr,
            3 => self.nginx_auth_addr,
            COLD => self.gate_cold_addr,
            _ => self.gate_mt_addr,
        }
    }

    async fn stop(self) {
        for server in [
            self.nginx_auth,
            self.nginx_proxy,
            self.gate_warm,
            self.gate_auth,
            self.gate_cold,
            self.gate_mt,
            self.upstream,
        ] {
            server.stop().await;
        }
    }
}

pub(crate) fn nginx_common(prefix: &Path, workers: usize) -> String {
    let p = prefix.display();
    format!(
        "worker_processes {workers};\n\
         daemon off;\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         events {{ worker_connections 8192; }}\n"
    )
}

pub(crate) fn nginx_http_common(prefix: &Path) -> String {
    let p = prefix.display();
    format!(
        "    access_log off;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   keepalive_timeout 75s;\n\
         \x20   default_type text/plain;\n\
         \x20   client_body_temp_path {p}/client_body;\n\
         \x20   proxy_temp_path {p}/proxy;\n\
         \x20   fastcgi_temp_path {p}/fastcgi;\n\
         \x20   uwsgi_temp_path {p}/uwsgi;\n\
         \x20   scgi_temp_path {p}/scgi;\n"
    )
}

pub(crate) async fn nginx(
    name: &str,
    dir: &Path,
    conf: String,
    cpus: Cpus,
) -> anyhow::Result<Server> {
    let prefix = dir.join(name);
    std::fs::create_dir_all(&prefix)?;
    let conf_path = prefix.join("nginx.conf");
    procs::write(&conf_path, &conf)?;
    let mut cmd = procs::command(cpus, Path::new("nginx"));
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-c")
        .arg(&conf_path);
    Server::spawn(
        name,
        cmd,
        &prefix.join("stdout.log"),
        &dir.join(format!("{name}.pid")),
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn gateway(
    args: &RunArgs,
    name: &str,
    dir: &Path,
    cpus: Cpus,
    workers: usize,
    listen: SocketAddr,
    upstream: SocketAddr,
    iam: &str,
    runtime: &str,
) -> anyhow::Result<Server> {
    let admin = loopback(procs::free_port()?);
    let conf = format!(
        "# {name}: written by bench/harness\n\
         [server]\nlisten = \"{listen}\"\nshutdown_grace = \"1s\"\n\n\
         [admin]\nlisten = \"{admin}\"\n\n\
         [upstream]\nurl = \"http://{upstream}\"\n\n\
         [iam]\nprovider = \"huawei\"\nendpoint = \"{iam}\"\ntimeout = \"3s\"\nmax_concurrency = 64\n\n\
         [policy]\nrequire = \"mfa_device\"\n\n\
         [cache]\nttl = \"1h\"\nmax_entries = 1000000\n"
    );
    let conf_path = dir.join(format!("{name}.toml"));
    procs::write(&conf_path, &conf)?;
    let mut cmd = procs::command(cpus, &args.mfa_gate);
    cmd.arg("--log-level")
        .arg(&args.gate_log_level)
        .arg("run")
        .arg("--config")
        .arg(&conf_path)
        .env("TOKIO_WORKER_THREADS", workers.to_string())
        .env("MFA_GATE_RUNTIME", runtime);
    Server::spawn(
        name,
        cmd,
        &dir.join(format!("{name}.log")),
        &dir.join(format!("{name}.pid")),
    )
    .await
}

/// A token of `bytes` bytes (at least the unique part), visible ASCII.
pub(crate) fn make_token(prefix: &str, n: u64, bytes: usize) -> String {
    let mut token = format!("{prefix}-{n:012x}-");
    while token.len() < bytes {
        token.push('x');
    }
    token
}

fn bench_user(token: String) -> SimUser {
    SimUser {
        user_id: "0b9e5c1a7d3f4e2a8c6b5d4e3f2a1b0c".to_string(),
        user_name: "bench-mfa".to_string(),
        domain_id: "7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d".to_string(),
        domain_name: "bench-domain".to_string(),
        token,
        methods: vec!["password".to_string(), "totp".to_string()],
        expires_at: SystemTime::now() + Duration::from_secs(12 * 3600),
        mfa_device: Some("iam/mfa/bench".to_string()),
        login_protect: Some((true, "vmfa".to_string())),
    }
}

/// A minting function: every call registers a new token with the simulator.
fn minter(sim: &IamSim, bytes: usize) -> Arc<dyn Fn() -> String + Send + Sync> {
    let sim = sim.clone();
    let counter = Arc::new(AtomicU64::new(0));
    let prefix = format!("cold{:08x}", rand::random::<u32>());
    Arc::new(move || {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let token = make_token(&prefix, n, bytes);
        sim.add_user(bench_user(token.clone()));
        token
    })
}

/// The online CPUs as a taskset list ("0-1"); read from sysfs, since this process's own affinity
/// (what `available_parallelism` reports) changes with the mode.
fn all_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "0-1".to_string())
}

/// How many CPUs are online.
fn online_cpus() -> usize {
    all_cpus()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => 1,
        })
        .sum::<usize>()
        .max(1)
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// median, min, max.
fn stats(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    Some((median(&mut v), min, max))
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let started = Instant::now();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut results = Vec::new();
    for &mode in &args.modes {
        eprintln!("== mode {}", mode.name());
        let result = run_mode(&args, mode).await?;
        results.push((mode, result));
    }
    pin_all()?;
    eprintln!("== cache scale");
    let scale = cache_scale(&args).await?;
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = report(
        &args,
        &results,
        &scale,
        started.elapsed(),
        &load_before,
        &load_after,
    );
    let path = args.out.join("results.md");
    procs::write(&path, &report)?;
    println!("{report}");
    eprintln!("tables written to {}", path.display());
    Ok(())
}

fn pin_all() -> anyhow::Result<()> {
    procs::pin_self(&all_cpus())
}

async fn run_mode(args: &RunArgs, mode: Mode) -> anyhow::Result<ModeResult> {
    let nproc = online_cpus();
    let (proxy_cpus, load_cpus, workers): (Cpus, Cpus, usize) = match mode {
        Mode::Pinned => (Some("0"), Some("1"), 1),
        Mode::Unpinned => (None, None, nproc),
    };
    match mode {
        Mode::Pinned => procs::pin_self("1")?,
        Mode::Unpinned => pin_all()?,
    }
    let dir = args.out.join(mode.name());
    std::fs::create_dir_all(&dir)?;

    // The IAM simulator, in this process (on the load side), answering after a fixed latency.
    let warm_token = make_token(
        &format!("warm{:08x}", rand::random::<u32>()),
        0,
        args.token_bytes,
    );
    let sim = IamSim::start(loopback(0), vec![bench_user(warm_token.clone())]).await?;
    sim.set_fault(None, Some(Fault::Latency(args.iam_latency)));
    let iam = sim.url();

    let upstream_addr = loopback(procs::free_port()?);
    let nginx_proxy_addr = loopback(procs::free_port()?);
    let gate_warm_addr = loopback(procs::free_port()?);
    let nginx_auth_addr = loopback(procs::free_port()?);
    let gate_auth_addr = loopback(procs::free_port()?);
    let gate_cold_addr = loopback(procs::free_port()?);
    let gate_mt_addr = loopback(procs::free_port()?);

    let upstream_conf = format!(
        "{}http {{\n{}    server {{\n        listen {upstream_addr} backlog=4096;\n        \
         location / {{ return 200 \"ok\"; }}\n        \
         location = /__bench_stub {{ stub_status; }}\n    }}\n}}\n",
        nginx_common(&dir.join("upstream"), 1),
        nginx_http_common(&dir.join("upstream")),
    );
    let upstream = nginx("upstream", &dir, upstream_conf, load_cpus).await?;

    let proxy_prefix = dir.join("nginx-proxy");
    let proxy_conf = format!(
        "{}http {{\n{}    upstream app {{\n        server {upstream_addr};\n        keepalive 64;\n        \
         keepalive_requests 1000000;\n    }}\n    server {{\n        listen {nginx_proxy_addr} backlog=4096;\n        \
         location / {{\n            proxy_pass http://app;\n            proxy_http_version 1.1;\n            \
         proxy_set_header Connection \"\";\n        }}\n    }}\n}}\n",
        nginx_common(&proxy_prefix, workers),
        nginx_http_common(&proxy_prefix),
    );
    let nginx_proxy = nginx("nginx-proxy", &dir, proxy_conf, proxy_cpus).await?;

    let auth_prefix = dir.join("nginx-auth");
    // As config/nginx-auth-request.conf, with the keep-alive pools of row 2.
    let auth_conf = format!(
        "{}http {{\n{}    upstream app {{\n        server {upstream_addr};\n        keepalive 64;\n        \
         keepalive_requests 1000000;\n    }}\n    upstream mfa_gate {{\n        server {gate_auth_addr};\n        \
         keepalive 64;\n        keepalive_requests 1000000;\n    }}\n    server {{\n        \
         listen {nginx_auth_addr} backlog=4096;\n        location = /_mfa_gate_auth {{\n            internal;\n            \
         proxy_pass http://mfa_gate/.mfa-gate/auth;\n            proxy_http_version 1.1;\n            \
         proxy_set_header Connection \"\";\n            proxy_pass_request_body off;\n            \
         proxy_set_header Content-Length \"\";\n            proxy_set_header X-Original-Method $request_method;\n            \
         proxy_set_header X-Original-URI $request_uri;\n        }}\n        location / {{\n            \
         auth_request /_mfa_gate_auth;\n            \
         auth_request_set $mfa_user_id   $upstream_http_x_auth_user_id;\n            \
         auth_request_set $mfa_user_name $upstream_http_x_auth_user_name;\n            \
         auth_request_set $mfa_domain_id $upstream_http_x_auth_domain_id;\n            \
         auth_request_set $mfa_factors   $upstream_http_x_auth_mfa;\n            \
         proxy_set_header X-Auth-User-Id   $mfa_user_id;\n            \
         proxy_set_header X-Auth-User-Name $mfa_user_name;\n            \
         proxy_set_header X-Auth-Domain-Id $mfa_domain_id;\n            \
         proxy_set_header X-Auth-Mfa       $mfa_factors;\n            \
         proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            \
         proxy_pass http://app;\n        }}\n    }}\n}}\n",
        nginx_common(&auth_prefix, workers),
        nginx_http_common(&auth_prefix),
    );
    let nginx_auth = nginx("nginx-auth", &dir, auth_conf, proxy_cpus).await?;

    let gate_warm = gateway(
        args,
        "mfa-gate-warm",
        &dir,
        proxy_cpus,
        workers,
        gate_warm_addr,
        upstream_addr,
        &iam,
        "per-worker",
    )
    .await?;
    let gate_auth = gateway(
        args,
        "mfa-gate-auth",
        &dir,
        proxy_cpus,
        workers,
        gate_auth_addr,
        upstream_addr,
        &iam,
        "per-worker",
    )
    .await?;
    let gate_cold = gateway(
        args,
        "mfa-gate-cold",
        &dir,
        proxy_cpus,
        workers,
        gate_cold_addr,
        upstream_addr,
        &iam,
        "per-worker",
    )
    .await?;

    let gate_mt = gateway(
        args,
        "mfa-gate-multi-thread",
        &dir,
        proxy_cpus,
        workers,
        gate_mt_addr,
        upstream_addr,
        &iam,
        "multi-thread",
    )
    .await?;

    let servers = Servers {
        upstream,
        upstream_addr,
        nginx_proxy,
        nginx_proxy_addr,
        gate_warm,
        gate_warm_addr,
        nginx_auth,
        nginx_auth_addr,
        gate_auth,
        gate_auth_addr,
        gate_cold,
        gate_cold_addr,
        gate_mt,
        gate_mt_addr,
    };
    let result = measure_mode(args, mode, workers, &servers, &sim, &warm_token, load_cpus).await;
    servers.stop().await;
    let result = match result {
        Ok(mut result) => {
            let nagle = nagle_check(args, &dir, proxy_cpus, workers, &iam, &warm_token).await;
            result.split_writes = Some(nagle?);
            Ok(result)
        }
        Err(err) => Err(err),
    };
    sim.shutdown();
    result
}

/// Runs [`split_writes`] through a gateway of its own in front of the demo upstream (in this
/// process, on the load side), which answers only after the whole request body arrived; nginx's
/// `return 200` answers on the head alone, which would hide a stalled body.
async fn nagle_check(
    args: &RunArgs,
    dir: &Path,
    cpus: Cpus,
    workers: usize,
    iam: &str,
    warm_token: &str,
) -> anyhow::Result<SplitWrites> {
    let upstream = DemoUpstream::start(loopback(0)).await?;
    let addr = loopback(procs::free_port()?);
    let gate = gateway(
        args,
        "mfa-gate-nagle",
        dir,
        cpus,
        workers,
        addr,
        upstream.addr(),
        iam,
        "per-worker",
    )
    .await?;
    procs::wait_listening(addr, "mfa-gate (Nagle check)").await?;
    let result = split_writes(addr, warm_token).await;
    gate.stop().await;
    upstream.shutdown();
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure_mode(
    args: &RunArgs,
    mode: Mode,
    workers: usize,
    s: &Servers,
    sim: &IamSim,
    warm_token: &str,
    load_cpus: Cpus,
) -> anyhow::Result<ModeResult> {
    for (what, addr) in [
        ("upstream nginx", s.upstream_addr),
        ("nginx proxy", s.nginx_proxy_addr),
        ("nginx auth_request", s.nginx_auth_addr),
        ("mfa-gate (behind auth_request)", s.gate_auth_addr),
        ("mfa-gate (warm)", s.gate_warm_addr),
        ("mfa-gate (cold)", s.gate_cold_addr),
        ("mfa-gate (multi-thread)", s.gate_mt_addr),
    ] {
        procs::wait_listening(addr, what).await?;
    }
    // Every row must answer 200 before anything is measured (this also warms rows 3 and 4).
    let mint = minter(sim, args.token_bytes);
    for row in 0..ROWS.len() {
        let token = match row {
            0 | 1 => None,
            COLD => Some(mint()),
            _ => Some(warm_token.to_string()),
        };
        let headers: Vec<(&str, &str)> =
            token.iter().map(|t| ("X-Auth-Token", t.as_str())).collect();
        let (status, body) = procs::get(s.addr(row), "/", &headers)
            .await
            .with_context(|| format!("row {}", ROWS[row]))?;
        if status != 200 {
            bail!("{}: sanity request answered {status}: {body}", ROWS[row]);
        }
    }
    let (status, _) = procs::get(s.upstream_addr, "/__bench_stub", &[]).await?;
    if status != 200 {
        bail!("upstream nginx has no stub_status (status {status})");
    }

    let fixed: Arc<str> = Arc::from(warm_token);
    let target = |row: usize| Target {
        addr: s.addr(row),
        path: "/".to_string(),
        tokens: match row {
            0 | 1 => TokenSource::None,
            COLD => TokenSource::Fresh(mint.clone()),
            _ => TokenSource::Fixed(fixed.clone()),
        },
    };
    let wrk_token = |row: usize| match row {
        0 | 1 | COLD => None,
        _ => Some(warm_token),
    };

    let mut result = ModeResult {
        workers,
        closed: vec![Vec::new(); ROWS.len()],
        open: vec![Vec::new(); ROWS.len()],
        ..ModeResult::default()
    };

    eprintln!("   warm-up ({}s per row)", args.warmup.as_secs_f64());
    for row in 0..ROWS.len() {
        if row == COLD {
            load::closed(&target(row), args.connections, args.warmup, false).await;
        } else {
            procs::wrk(
                load_cpus,
                s.addr(row),
                args.connections,
                args.warmup,
                wrk_token(row),
            )
            .await?;
        }
    }

    for round in 0..args.rounds {
        for row in 0..ROWS.len() {
            let proxies = s.proxies(row);
            let cpu0: f64 = proxies.iter().map(|p| p.cpu_seconds()).sum();
            let stub0 = procs::stub_status(s.upstream_addr).await?;
            let window = Instant::now();
            let (requests, rate, errors) = if row == COLD {
                let out = load::closed(&target(row), args.connections, args.duration, false).await;
                (out.completed(), out.rate(), out.errors + out.non_2xx)
            } else {
                let w = procs::wrk(
                    load_cpus,
                    s.addr(row),
                    args.connections,
                    args.duration,
                    wrk_token(row),
                )
                .await?;
                (w.requests, w.rate, w.non_2xx + w.socket_errors)
            };
            let window = window.elapsed().as_secs_f64();
            let stub1 = procs::stub_status(s.upstream_addr).await?;
            let cpu1: f64 = proxies.iter().map(|p| p.cpu_seconds()).sum();
            let up_conns = stub1.0.saturating_sub(stub0.0).saturating_sub(1);
            let up_reqs = stub1.1.saturating_sub(stub0.1).saturating_sub(1);
            let closed = Closed {
                rate,
                errors,
                cores_busy: (!proxies.is_empty()).then(|| (cpu1 - cpu0) / window),
                cpu_per_10k: (!proxies.is_empty() && requests > 0)
                    .then(|| (cpu1 - cpu0) / requests as f64 * 10_000.0),
                conns_per_1k: (up_reqs > 0).then(|| up_conns as f64 / up_reqs as f64 * 1000.0),
            };
            eprintln!(
                "   {} closed round {}: {:<46} {:>9.0} req/s  cpu/10k {:>6}  errors {}",
                mode.name(),
                round + 1,
                ROWS[row],
                closed.rate,
                closed.cpu_per_10k.map_or("-".into(), |c| format!("{c:.3}")),
                closed.errors
            );
            result.closed[row].push(closed);
        }
    }

    let median_rate =
        |row: usize| stats(result.closed[row].iter().map(|c| c.rate)).map_or(0.0, |(m, _, _)| m);
    result.open_rate = (median_rate(1) * 0.5).max(100.0);
    result.row_open_rate = (0..ROWS.len())
        .map(|row| {
            if OWN_RATE_ROWS.contains(&row) {
                result.open_rate.min(median_rate(row) * 0.5).max(10.0)
            } else {
                result.open_rate
            }
        })
        .collect();

    for round in 0..args.rounds {
        for row in 0..ROWS.len() {
            let rate = result.row_open_rate[row];
            let proxies = s.proxies(row);
            let cpu0: f64 = proxies.iter().map(|p| p.cpu_seconds()).sum();
            let mut out: Outcome =
                load::open(&target(row), args.connections, rate, args.duration).await;
            let cpu1: f64 = proxies.iter().map(|p| p.cpu_seconds()).sum();
            let q =
                |out: &mut Outcome, q: f64| out.quantile_us(q).map_or(f64::NAN, |us| us / 1000.0);
            let open = Open {
                achieved: out.rate(),
                p50_ms: q(&mut out, 0.50),
                p99_ms: q(&mut out, 0.99),
                p999_ms: q(&mut out, 0.999),
                errors: out.failed(),
                cpu_per_10k: (!proxies.is_empty() && out.completed() > 0)
                    .then(|| (cpu1 - cpu0) / out.completed() as f64 * 10_000.0),
            };
            eprintln!(
                "   {} open round {}: {:<46} {:>7.0} req/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  errors {}",
                mode.name(),
                round + 1,
                ROWS[row],
                open.achieved,
                open.p50_ms,
                open.p99_ms,
                open.p999_ms,
                open.errors
            );
            result.open[row].push(open);
        }
    }

    result.peak_rss_mib = (0..ROWS.len())
        .map(|row| {
            let proxies = s.proxies(row);
            (!proxies.is_empty())
                .then(|| proxies.iter().map(|p| p.peak_rss_kib()).sum::<u64>() as f64 / 1024.0)
        })
        .collect();

    result.cold_latency = Some(cold_latency(s.gate_cold_addr, sim, &mint, warm_token).await?);

    result.burst = Some(burst(args, s.gate_cold_addr, sim, &mint).await?);
    Ok(result)
}

/// One fresh token, `args.burst` concurrent requests: the IAM calls made per API.
async fn burst(
    args: &RunArgs,
    addr: SocketAddr,
    sim: &IamSim,
    mint: &Arc<dyn Fn() -> String + Send + Sync>,
) -> anyhow::Result<Burst> {
    let token = mint();
    let request =
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {token}\r\n\r\n").into_bytes();
    let mut conns = Vec::with_capacity(args.burst);
    for _ in 0..args.burst {
        let mut conn = load::Conn::new(addr);
        conn.connect().await.context("burst: connect")?;
        conns.push(conn);
    }
    // Let the gateway accept them all before the burst starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sim.reset_calls();
    let started = Instant::now();
    let request = Arc::new(request);
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let request = request.clone();
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(20), conn.exchange(&request))
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    let (mut ok, mut other) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        match done.ok().flatten() {
            Some(200) => ok += 1,
            _ => other += 1,
        }
    }
    Ok(Burst {
        requests: args.burst,
        ok,
        other,
        verify: sim.calls(Api::VerifyToken),
        mfa_device: sim.calls(Api::MfaDevice),
        login_protect: sim.calls(Api::LoginProtect),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Latency of a request with a fresh token, in IAM round trips above a warm request.
async fn cold_latency(
    addr: SocketAddr,
    sim: &IamSim,
    mint: &Arc<dyn Fn() -> String + Send + Sync>,
    warm_token: &str,
) -> anyhow::Result<ColdLatency> {
    let mut conn = load::Conn::new(addr);
    let warm_req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {warm_token}\r\n\r\n")
        .into_bytes();
    conn.exchange(&warm_req).await?;
    let mut warm = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        conn.exchange(&warm_req).await?;
        warm.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let samples = 21;
    let mut cold = Vec::new();
    for _ in 0..samples {
        let token = mint();
        let req =
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {token}\r\n\r\n").into_bytes();
        let t = Instant::now();
        let status = conn.exchange(&req).await?;
        if status != 200 {
            bail!("cold request answered {status}");
        }
        cold.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // The same kind of call the gateway makes first, straight to the simulator, on a kept-alive
    // connection: what one IAM round trip costs here.
    let mut iam = load::Conn::new(sim.addr());
    let mut calls = Vec::new();
    for _ in 0..samples {
        let token = mint();
        let req = format!(
            "GET /v3/auth/tokens HTTP/1.1\r\nHost: {}\r\nX-Auth-Token: {token}\r\nX-Subject-Token: {token}\r\n\r\n",
            sim.addr()
        )
        .into_bytes();
        let t = Instant::now();
        let status = iam.exchange(&req).await?;
        if status != 200 {
            bail!("direct IAM verify call answered {status}");
        }
        calls.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let cold_ms = median(&mut cold);
    let warm_ms = median(&mut warm);
    let iam_call_ms = median(&mut calls);
    Ok(ColdLatency {
        samples,
        cold_ms,
        warm_ms,
        iam_call_ms,
        round_trips: (cold_ms - warm_ms) / iam_call_ms,
    })
}

/// The Nagle check: one connection, sequential POSTs whose 64-byte body is written 2 ms after
/// the head, so that a proxy streaming the body forwards head and body to the upstream in two
/// writes. Without `TCP_NODELAY`, Nagle's algorithm holds the second write until the first is
/// acknowledged, and the upstream's delayed ACK makes that ~40 ms per request. Latency counts
/// from the body's write to the whole answer.
async fn split_writes(addr: SocketAddr, token: &str) -> anyhow::Result<SplitWrites> {
    let samples = 100;
    let body = [b'x'; 64];
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {token}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    let mut conn = load::Conn::new(addr);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        conn.send(&head).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let t = Instant::now();
        conn.send(&body).await?;
        let status = conn.recv().await?;
        if status != 200 {
            bail!("Nagle check: split-write POST answered {status}");
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let over_30ms = times.iter().filter(|&&ms| ms > 30.0).count();
    let max_ms = times.iter().copied().fold(0.0, f64::max);
    Ok(SplitWrites {
        samples,
        p50_ms: median(&mut times),
        max_ms,
        over_30ms,
    })
}

#[derive(Debug)]
struct Scale {
    entries: u64,
    held: u64,
    rss_mib: f64,
    bytes_per_entry: f64,
    fill_seconds: f64,
    hit_ns: f64,
}

async fn cache_scale(args: &RunArgs) -> anyhow::Result<Vec<Scale>> {
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    for &entries in &args.cache_sizes {
        let output = tokio::time::timeout(
            Duration::from_secs(600),
            tokio::process::Command::new(&exe)
                .arg("cache-scale")
                .arg("--entries")
                .arg(entries.to_string())
                .output(),
        )
        .await
        .context("cache-scale timed out")??;
        if !output.status.success() {
            bail!(
                "cache-scale {entries} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let line = String::from_utf8_lossy(&output.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let scale = Scale {
            entries,
            held: v["held"].as_u64().unwrap_or(0),
            rss_mib: f("rss_kib") / 1024.0,
            bytes_per_entry: f("bytes_per_entry"),
            fill_seconds: f("fill_seconds"),
            hit_ns: f("hit_ns"),
        };
        eprintln!("   {scale:?}");
        out.push(scale);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Report

fn fmt_stats(s: Option<(f64, f64, f64)>, digits: usize) -> String {
    match s {
        Some((m, lo, hi)) => format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})"),
        None => "—".to_string(),
    }
}

fn ratio(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 && v.is_finite() => format!("{:.2}×", v / b),
        _ => "—".to_string(),
    }
}

fn report(
    args: &RunArgs,
    results: &[(Mode, ModeResult)],
    scale: &[Scale],
    elapsed: Duration,
    load_before: &str,
    load_after: &str,
) -> String {
    let mut o = String::new();
    let sh = |cmd: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let _ = writeln!(o, "## Results\n");
    let _ = writeln!(
        o,
        "Machine: {} CPUs ({}), kernel {}, {}; nginx {}, {}; mfa-gate {}.",
        online_cpus(),
        sh("lscpu | sed -n 's/^Model name: *//p' | head -1"),
        sh("uname -r"),
        sh("free -g | awk '/^Mem:/ {print $2 \" GiB RAM\"}'"),
        sh("nginx -v 2>&1 | sed 's/.*nginx\\///'"),
        sh("wrk -v 2>&1 | head -1 | awk '{print $1, $2}'"),
        std::env::var("BENCH_COMMIT").unwrap_or_else(|_| "?".to_string()),
    );
    let _ = writeln!(
        o,
        "Run: {} rounds × {} s per row and loop type, {} s warm-up per row, {} connections, IAM latency {} ms, tokens of {} bytes, mfa-gate log level `{}`, everything measured at nice {}; took {:.0} s. Load average before: `{}`, after: `{}`.\n",
        args.rounds,
        args.duration.as_secs(),
        args.warmup.as_secs(),
        args.connections,
        args.iam_latency.as_millis(),
        args.token_bytes,
        args.gate_log_level,
        std::env::var("BENCH_NICE").unwrap_or_else(|_| "0".to_string()),
        elapsed.as_secs_f64(),
        load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load_after.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    for (mode, r) in results {
        let title = match mode {
            Mode::Pinned => "Pinned: each proxy alone on CPU 0; load generator, upstream and IAM simulator on CPU 1; one worker each".to_string(),
            Mode::Unpinned => format!("Unpinned: nothing pinned; proxies with {} workers (nginx worker_processes, mfa-gate tokio workers); upstream 1 worker, wrk 1 thread", r.workers),
        };
        let _ = writeln!(o, "### {title}\n");
        let med = |row: usize, f: &dyn Fn(&Closed) -> Option<f64>| {
            stats(r.closed[row].iter().filter_map(f)).map(|s| s.0)
        };
        let _ = writeln!(
            o,
            "Closed loop (rows 1–4 and 6: `wrk -t1 -c{c}`; row 5: the harness's own closed loop, {c} connections, a fresh token per request). Row 6 is row 3's gateway with `MFA_GATE_RUNTIME=multi-thread` (tokio's work-stealing scheduler) instead of one current-thread runtime per worker: the runtime flavour, measured. Median (min–max) over {n} rounds.\n",
            c = args.connections,
            n = args.rounds
        );
        let _ = writeln!(o, "| row | req/s | ×1 | ×2 | proxy CPU s / 10k req | ×2 | proxy cores busy | peak RSS MiB | ×2 | new upstream conns / 1k req | errors |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
        let rate = |row| med(row, &|c: &Closed| Some(c.rate));
        let cpu = |row| med(row, &|c: &Closed| c.cpu_per_10k);
        for row in 0..ROWS.len() {
            let closed = &r.closed[row];
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                ROWS[row],
                fmt_stats(stats(closed.iter().map(|c| c.rate)), 0),
                ratio(rate(row), rate(0)),
                ratio(rate(row), rate(1)),
                fmt_stats(stats(closed.iter().filter_map(|c| c.cpu_per_10k)), 3),
                ratio(cpu(row), cpu(1)),
                fmt_stats(stats(closed.iter().filter_map(|c| c.cores_busy)), 2),
                r.peak_rss_mib[row].map_or("—".into(), |m| format!("{m:.1}")),
                ratio(r.peak_rss_mib[row], r.peak_rss_mib[1]),
                fmt_stats(stats(closed.iter().filter_map(|c| c.conns_per_1k)), 3),
                closed.iter().map(|c| c.errors).sum::<u64>(),
            );
        }
        let allowed = match mode {
            Mode::Pinned => 1.0,
            Mode::Unpinned => online_cpus() as f64,
        };
        let idle: Vec<String> = (1..ROWS.len())
            .filter(|&row| {
                med(row, &|c: &Closed| c.cores_busy).is_some_and(|busy| busy < 0.9 * allowed)
            })
            .map(|row| (row + 1).to_string())
            .collect();
        if !idle.is_empty() {
            let _ = writeln!(
                o,
                "\nRows {} did not keep their proxy's {} busy (proxy cores busy < 90%): their req/s is bounded by the load side, the IAM or scheduling, not by the proxy's CPU. Proxy CPU per request is the comparable number.",
                idle.join(", "),
                if allowed > 1.0 { "CPUs" } else { "CPU" }
            );
        }
        let (r1, r2, r3) = (
            rate(0).unwrap_or(0.0),
            rate(1).unwrap_or(0.0),
            rate(2).unwrap_or(0.0),
        );
        if r1 > 0.0 && (r2 >= 0.85 * r1 || r3 >= 0.85 * r1) {
            let _ = writeln!(
                o,
                "\n**Throughput void in this mode:** row 2 reaches {:.0}% and row 3 {:.0}% of the direct ceiling, so the load generator and upstream (not the proxy) set the rate. Compare proxy CPU per request and latency instead.",
                r2 / r1 * 100.0,
                r3 / r1 * 100.0
            );
        }
        let _ = writeln!(
            o,
            "\nOpen loop at {:.0} req/s (50% of row 2's median maximum; row 4 at {:.0} req/s and row 5 at {:.0} req/s: min(that, 50% of the row's own maximum)), {} connections, send times evenly spaced by a pacer thread, latency from the scheduled send time when the connection was still busy (coordinated omission corrected). Median (min–max) over {} rounds, in ms.\n",
            r.open_rate,
            r.row_open_rate[AUTH_REQUEST],
            r.row_open_rate[COLD],
            args.connections,
            args.rounds
        );
        let _ = writeln!(o, "| row | p50 | ×1 | ×2 | p99 | ×1 | ×2 | p99.9 | ×1 | ×2 | achieved req/s | proxy CPU s / 10k req | errors + not sent in time |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let omed = |row: usize, f: &dyn Fn(&Open) -> Option<f64>| {
            stats(r.open[row].iter().filter_map(f)).map(|s| s.0)
        };
        for row in 0..ROWS.len() {
            let open = &r.open[row];
            let mut cells = vec![ROWS[row].to_string()];
            for f in [
                &(|x: &Open| Some(x.p50_ms)) as &dyn Fn(&Open) -> Option<f64>,
                &|x: &Open| Some(x.p99_ms),
                &|x: &Open| Some(x.p999_ms),
            ] {
                cells.push(fmt_stats(stats(open.iter().filter_map(f)), 3));
                cells.push(ratio(omed(row, f), omed(0, f)));
                cells.push(ratio(omed(row, f), omed(1, f)));
            }
            cells.push(fmt_stats(stats(open.iter().map(|x| x.achieved)), 0));
            cells.push(fmt_stats(
                stats(open.iter().filter_map(|x| x.cpu_per_10k)),
                3,
            ));
            cells.push(open.iter().map(|x| x.errors).sum::<u64>().to_string());
            let _ = writeln!(o, "| {} |", cells.join(" | "));
        }
        if let (Some(b), Some(c)) = (&r.burst, &r.cold_latency) {
            let _ = writeln!(
                o,
                "\nCold path: {} concurrent requests with one fresh token → IAM calls verify_token **{}**, mfa_device **{}**, login_protect **{}** (policy `require = \"mfa_device\"`); {} answered 200, {} otherwise, in {:.3} s. A single cold request takes {:.2} ms vs {:.3} ms warm (medians of {}); one IAM call made directly takes {:.2} ms (simulator latency {} ms + HTTP and timer overhead), so the cold request costs **{:.2} IAM round trips** ((cold − warm) / IAM call).\n",
                b.requests, b.verify, b.mfa_device, b.login_protect, b.ok, b.other, b.seconds,
                c.cold_ms, c.warm_ms, c.samples, c.iam_call_ms, args.iam_latency.as_millis(), c.round_trips
            );
        }
        if let Some(w) = &r.split_writes {
            let _ = writeln!(
                o,
                "Nagle check: {} sequential POSTs on one connection through mfa-gate (warm token) to an upstream that answers only after the whole body (mfa-gate's demo upstream), the 64-byte body written 2 ms after the head, so that mfa-gate forwards head and body in two writes (without `TCP_NODELAY` the second would wait ~40 ms for a delayed ACK): from the body's write to the answer, p50 {:.3} ms, max {:.3} ms, **{} over 30 ms**.\n",
                w.samples, w.p50_ms, w.max_ms, w.over_30ms
            );
        }
    }
    let _ = writeln!(o, "### Cache scale (`TokenCache` in-process, fake IAM answering at once, one process per size)\n");
    let _ = writeln!(o, "| distinct cached tokens | held | RSS MiB | bytes / entry | fill s | cached lookup ns (incl. HMAC of a 1.5 KB token) |");
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for s in scale {
        let _ = writeln!(
            o,
            "| {} | {} | {:.1} | {} | {:.2} | {} |",
            s.entries,
            s.held,
            s.rss_mib,
            if s.entries > 0 {
                format!("{:.0}", s.bytes_per_entry)
            } else {
                "—".into()
            },
            s.fill_seconds,
            if s.entries > 0 {
                format!("{:.0}", s.hit_ns)
            } else {
                "—".into()
            },
        );
    }
    let _ = writeln!(o, "\n<details><summary>Every round</summary>\n");
    let _ = writeln!(o, "| mode | row | closed req/s per round | closed CPU s/10k per round | open p99 ms per round |");
    let _ = writeln!(o, "|---|---|---|---|---|");
    for (mode, r) in results {
        for row in 0..ROWS.len() {
            let join = |v: Vec<String>| v.join(", ");
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                mode.name(),
                ROWS[row],
                join(
                    r.closed[row]
                        .iter()
                        .map(|c| format!("{:.0}", c.rate))
                        .collect()
                ),
                join(
                    r.closed[row]
                        .iter()
                        .map(|c| c.cpu_per_10k.map_or("—".into(), |x| format!("{x:.3}")))
                        .collect()
                ),
                join(
                    r.open[row]
                        .iter()
                        .map(|x| format!("{:.3}", x.p99_ms))
                        .collect()
                ),
            );
        }
    }
    let _ = writeln!(o, "\n</details>");
    o
}
