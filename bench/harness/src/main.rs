//! `mfa-gate-bench`: the harness behind `bench/run.sh`.
//!
//! * `run` — every row, pinned and unpinned, interleaved; writes the tables.
//! * `cache-scale --entries N` — RSS of a `TokenCache` holding N distinct tokens (one JSON line).
//! * `soak` — ten minutes of mixed traffic across 100,000 tokens, one row per minute (RSS, open
//!   fds, latency), and whether the tail is flat (`bash bench/run.sh --soak`; not in CI).

mod load;
mod procs;
mod run;
mod scale;
mod soak;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mfa-gate-bench",
    about = "mfa-gate benchmark harness (see bench/README.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the benchmark rows and prints the tables (markdown).
    Run {
        /// The release binary under test.
        #[arg(long)]
        mfa_gate: PathBuf,
        /// Where configs, logs and results.md go.
        #[arg(long, default_value = "bench/out")]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per row, per round, per loop type (closed and open).
        #[arg(long, default_value_t = 8)]
        duration: u64,
        /// Warm-up seconds per row (per mode).
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Comma-separated: pinned, unpinned.
        #[arg(long, default_value = "pinned,unpinned")]
        modes: String,
        /// Latency of every IAM simulator answer, in ms.
        #[arg(long, default_value_t = 10)]
        iam_latency_ms: u64,
        /// Comma-separated cache sizes for the cache-scale table.
        #[arg(long, default_value = "0,100000,1000000")]
        cache_sizes: String,
        /// Length of the tokens sent (real IAM tokens are a few KiB).
        #[arg(long, default_value_t = 256)]
        token_bytes: usize,
        /// mfa-gate's --log-level (warn: no access log line, like nginx's `access_log off`).
        #[arg(long, default_value = "warn")]
        gate_log_level: String,
        /// Concurrent requests with one fresh token (cold-path coalescing).
        #[arg(long, default_value_t = 1000)]
        burst: usize,
    },
    /// One open-loop measurement against a running server (bench/ab.sh --latency): prints
    /// `achieved_req/s p50_ms p99_ms p99.9_ms errors`, tab-separated, on one line.
    Open {
        /// Loopback address to load, e.g. 127.0.0.1:8080.
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value = "/x")]
        path: String,
        /// X-Auth-Token sent with every request.
        #[arg(long)]
        token: Option<String>,
        /// Requests per second in total.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
    },
    /// RSS of the token cache with N distinct tokens (one JSON line on stdout).
    CacheScale {
        #[arg(long)]
        entries: u64,
    },
    /// Soak: mixed traffic at a fixed rate, one row per minute, then a verdict on the tail.
    Soak {
        /// The release binary under test.
        #[arg(long)]
        mfa_gate: PathBuf,
        /// Where the config, the logs and soak.md go.
        #[arg(long, default_value = "bench/out/soak")]
        out: PathBuf,
        /// Minutes measured (at least 7: the verdict compares the last 3 with N-6..N-4).
        #[arg(long, default_value_t = 10)]
        minutes: usize,
        /// Seconds per "minute" (60; shorter only to try the harness out).
        #[arg(long, default_value_t = 60)]
        minute_seconds: u64,
        /// Requests per second in total (open loop).
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Distinct tokens in the pool (60% MFA users, 20% users without MFA, 20% unknown).
        #[arg(long, default_value_t = 100_000)]
        tokens: usize,
        #[arg(long, default_value_t = 256)]
        token_bytes: usize,
        /// Latency of every IAM simulator answer, in ms.
        #[arg(long, default_value_t = 10)]
        iam_latency_ms: u64,
        #[arg(long, default_value = "warn")]
        gate_log_level: String,
    },
}

/// The gateway's own allocator (src/main.rs): what `cache-scale` and the in-process parts measure
/// is then what the gateway would spend, not what glibc's malloc would.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: mfa_gate_allocator::MiMalloc = mfa_gate_allocator::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One worker: the load generator and the IAM simulator share one core in pinned mode.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run {
            mfa_gate,
            out,
            rounds,
            duration,
            warmup,
            connections,
            modes,
            iam_latency_ms,
            cache_sizes,
            token_bytes,
            gate_log_level,
            burst,
        } => {
            let modes = modes
                .split(',')
                .filter(|m| !m.is_empty())
                .map(run::Mode::parse)
                .collect::<anyhow::Result<Vec<_>>>()?;
            let cache_sizes = cache_sizes
                .split(',')
                .filter(|m| !m.is_empty())
                .map(|n| n.trim().parse::<u64>())
                .collect::<Result<Vec<_>, _>>()?;
            let args = run::RunArgs {
                mfa_gate,
                out,
                rounds: rounds.max(1),
                duration: Duration::from_secs(duration.max(1)),
                warmup: Duration::from_secs(warmup.max(1)),
                connections: connections.max(1),
                modes,
                iam_latency: Duration::from_millis(iam_latency_ms.max(1)),
                cache_sizes,
                token_bytes: token_bytes.max(40),
                gate_log_level,
                burst: burst.max(1),
            };
            runtime.block_on(run::run(args))
        }
        Command::Open {
            addr,
            path,
            token,
            rate,
            seconds,
            connections,
        } => {
            anyhow::ensure!(addr.ip().is_loopback(), "--addr {addr}: loopback only");
            let target = load::Target {
                addr,
                path,
                tokens: token.map_or(load::TokenSource::None, |t| {
                    load::TokenSource::Fixed(t.into())
                }),
            };
            let duration = Duration::from_secs(seconds.max(1));
            let mut out = runtime.block_on(load::open(&target, connections.max(1), rate, duration));
            let mut ms = |q| out.quantile_us(q).unwrap_or(f64::NAN) / 1000.0;
            let (p50, p99, p999) = (ms(0.5), ms(0.99), ms(0.999));
            println!(
                "{:.0}\t{p50:.3}\t{p99:.3}\t{p999:.3}\t{}",
                out.rate(),
                out.failed()
            );
            Ok(())
        }
        Command::CacheScale { entries } => runtime.block_on(scale::run(entries)),
        Command::Soak {
            mfa_gate,
            out,
            minutes,
            minute_seconds,
            rate,
            connections,
            tokens,
            token_bytes,
            iam_latency_ms,
            gate_log_level,
        } => runtime.block_on(soak::run(soak::SoakArgs {
            mfa_gate,
            out,
            minutes,
            minute: Duration::from_secs(minute_seconds.max(1)),
            rate: rate.max(1.0),
            connections: connections.max(1),
            tokens: tokens.max(10),
            token_bytes: token_bytes.max(40),
            iam_latency: Duration::from_millis(iam_latency_ms.max(1)),
            gate_log_level,
        })),
    }
}
