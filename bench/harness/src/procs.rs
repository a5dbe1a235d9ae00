//! Child processes (nginx, mfa-gate, wrk), CPU pinning and /proc accounting.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Which CPUs a process may run on; `None` = unpinned.
pub type Cpus = Option<&'static str>;

/// A command, prefixed with `taskset -c CPUS` when pinned.
pub fn command(cpus: Cpus, program: &Path) -> Command {
    match cpus {
        Some(cpus) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(cpus).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Pins every thread of this process (the load generator and the in-process IAM simulator).
pub fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?;
    if !status.success() {
        bail!("taskset -a -p -c {cpus} failed");
    }
    Ok(())
}

/// A free loopback port (bound and released; good enough on a quiet loopback), never one this
/// process was given before: a port handed out but not yet bound by its server is free again,
/// and the kernel may offer it twice (a gateway once got the same port for its listener and
/// its admin listener, and refused to start).
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().expect("port list lock");
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no loopback port that was not handed out already")
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A started server process, killed when dropped.
pub struct Server {
    pub name: String,
    pub child: Child,
    pub pid: u32,
    stopped: bool,
}

/// SIGTERM: nginx's master then stops its workers; mfa-gate drains (grace 1 s in the bench
/// config) and exits.
fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            terminate(self.pid);
        }
    }
}

impl Server {
    /// Starts `cmd`, logging to `log`, and records its pid in `pid_file` (so that `run.sh`
    /// can stop it even if the harness itself is killed).
    pub async fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        pid_file: &Path,
    ) -> anyhow::Result<Server> {
        let log_file = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("child pid")?;
        std::fs::write(pid_file, format!("{pid}\n"))?;
        Ok(Server {
            name: name.to_string(),
            child,
            pid,
            stopped: false,
        })
    }

    /// The process and its children (nginx workers), as pids. `taskset` execs, so the pid is
    /// the server's own.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        pids.extend(children(self.pid));
        pids
    }

    /// utime + stime of the process and its children, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// Sum of VmHWM (peak RSS) of the process and its children, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.pids()
            .into_iter()
            .map(|pid| status_kib(pid, "VmHWM:"))
            .sum()
    }

    pub async fn stop(mut self) {
        terminate(self.pid);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("   {} did not stop on SIGTERM; killing it", self.name);
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        self.stopped = true;
    }
}

/// Direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(fields) = stat_fields(child) {
            if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

/// Fields of /proc/PID/stat after the command name: [state, ppid, ...] (index 0 = field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn clock_ticks() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux this runs on; `getconf` confirms it.
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime (fields 14 and 15) in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Some(fields) = stat_fields(pid) else {
        return 0.0;
    };
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / clock_ticks()
}

/// A `Vm*:` line of /proc/PID/status, in KiB.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with(key))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not start listening on {addr} within 20 s (see its log)")
}

/// A one-shot HTTP/1.1 GET on a new connection; answers status and body.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let io = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .context("GET timed out")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `accepts` and `requests` of an nginx stub_status page.
pub async fn stub_status(addr: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let (_, body) = get(addr, "/__bench_stub", &[]).await?;
    // "Active connections: 1 \nserver accepts handled requests\n 10 10 20 \n..."
    let line = body
        .lines()
        .nth(2)
        .context("stub_status: no counters line")?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    if nums.len() < 3 {
        bail!("stub_status: bad counters line {line:?}");
    }
    Ok((nums[0], nums[2]))
}

/// The result of one wrk run.
#[derive(Debug, Clone, Default)]
pub struct Wrk {
    pub requests: u64,
    pub seconds: f64,
    pub rate: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

/// Runs wrk (closed loop) and parses its summary.
pub async fn wrk(
    cpus: Cpus,
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    token: Option<&str>,
) -> anyhow::Result<Wrk> {
    let mut cmd = command(cpus, Path::new("wrk"));
    cmd.arg("-t1")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("5s");
    if let Some(token) = token {
        cmd.arg("-H").arg(format!("X-Auth-Token: {token}"));
    }
    cmd.arg(format!("http://{addr}/"));
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let limit = duration + Duration::from_secs(30);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .context("wrk did not finish in time")?
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed: {}\n{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
    let mut w = Wrk::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some((n, rest)) = line.split_once(" requests in ") {
            w.requests = n.trim().parse()?;
            let secs = rest.split(',').next().unwrap_or_default();
            w.seconds = parse_duration(secs)?;
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            w.rate = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            w.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        }
    }
    if w.requests == 0 && w.rate == 0.0 {
        bail!("no summary");
    }
    Ok(w)
}

fn parse_duration(text: &str) -> anyhow::Result<f64> {
    let text = text.trim();
    for (suffix, scale) in [("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0)] {
        if let Some(v) = text.strip_suffix(suffix) {
            return Ok(v.parse::<f64>()? * scale);
        }
    }
    bail!("bad duration {text:?}")
}

pub fn write(path: &PathBuf, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_summary() {
        let text = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.00ms  0.50ms  10.00ms   90.00%\n  40000 requests in 2.00s, 5.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 7\nRequests/sec:  19999.50\nTransfer/sec:      2.50MB\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!((w.requests, w.non_2xx, w.socket_errors), (40000, 7, 3));
        assert!((w.seconds - 2.0).abs() < 1e-9 && (w.rate - 19999.5).abs() < 1e-9);
    }
}
