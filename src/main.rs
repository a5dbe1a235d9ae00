//! The `mfa-gate` binary: command line, logging, signals, exit codes. Everything else lives in
//! the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mfa_gate::app::Gateway;
use mfa_gate::config::Config;
use tracing_subscriber::EnvFilter;

/// Exit code for a bad config or command line (BSD `EX_USAGE`/`EX_CONFIG` family).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the gateway cannot start or fails while running.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "mfa-gate",
    version,
    about = "Authenticating reverse proxy: no MFA, no access"
)]
struct Cli {
    /// Log filter, RUST_LOG style (e.g. "info", "mfa_gate=debug,hyper=warn").
    #[arg(long, global = true, env = "MFA_GATE_LOG", default_value = "info")]
    log_level: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Talking to a running gateway's admin API.
#[derive(clap::Args)]
struct AdminTarget {
    /// The admin listener of the gateway.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    admin_url: String,
    /// A file holding the admin token (as in `admin.token_file`); or MFA_GATE_ADMIN_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Disable a user's (lost) virtual MFA device through IAM v5 and drop their cache entries.
    DisableMfa {
        #[arg(long)]
        user_id: String,
        /// Which device; without it, the user's only device.
        #[arg(long)]
        serial_number: Option<String>,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Drop cached entries: all, or one user's.
    Purge {
        #[arg(long)]
        user_id: Option<String>,
        #[command(flatten)]
        target: AdminTarget,
    },
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
enum DevProvider {
    Huawei,
    AlibabaCloudsso,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: forward requests of users with MFA to the upstream.
    Run {
        /// The config file.
        #[arg(long, env = "MFA_GATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective settings; binds and contacts nothing.
    Check {
        /// The config file.
        #[arg(long, env = "MFA_GATE_CONFIG")]
        config: PathBuf,
    },
    /// Explain the decision for a request, rule by rule, without forwarding anything.
    Explain {
        /// The config file.
        #[arg(long, env = "MFA_GATE_CONFIG")]
        config: PathBuf,
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request path as a client would send it (may include a query).
        #[arg(long)]
        path: String,
        /// The client address (for CIDR rules).
        #[arg(long, default_value = "127.0.0.1")]
        client: std::net::IpAddr,
        /// Judge as this user (identity rules only; MFA facts need a token).
        #[arg(long)]
        user_id: Option<String>,
        /// A file holding the user's token: the IAM is asked about it.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Admin actions on a running gateway (through its admin API).
    Admin {
        #[command(subcommand)]
        action: AdminCommand,
    },
    /// Probe a URL (e.g. the admin listener's /readyz): exit 0 on a 2xx answer within 2 s,
    /// else 1. For container HEALTHCHECKs in images without a shell or curl.
    Health {
        /// The URL to probe (http only).
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
    /// Everything on loopback: an IAM simulator with demo users, a demo upstream and the
    /// gateway, with ready-to-paste curl commands.
    Dev {
        /// Where the gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Where the admin listener listens.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: std::net::SocketAddr,
        /// Which IAM to simulate.
        #[arg(long, value_enum, default_value_t = DevProvider::Huawei)]
        provider: DevProvider,
    },
}

fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|err| format!("--log-level {filter:?}: {err}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    Ok(())
}

/// `TOKIO_WORKER_THREADS` workers (default: one per CPU) serve the client connections, each
/// a current-thread runtime of its own ([`mfa_gate::server::workers`]); the main thread's
/// current-thread runtime accepts connections and runs the admin listener and background
/// tasks. With one worker, the main runtime serves the connections too.
///
/// `MFA_GATE_RUNTIME=multi-thread` puts everything on tokio's work-stealing scheduler with as
/// many workers instead: it costs more CPU per request (bench/README.md), but spreads the
/// streams of a single HTTP/2 client connection over all workers, where the default keeps a
/// connection on one.
fn runtime(multi_thread: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    if multi_thread {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build();
    }
    mfa_gate::server::workers::start(workers)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// `MFA_GATE_RUNTIME`: whether tokio's multi-thread scheduler was asked for (see [`runtime`]).
fn multi_thread_asked() -> Result<bool, String> {
    match std::env::var("MFA_GATE_RUNTIME")
        .unwrap_or_default()
        .as_str()
    {
        "" | "per-worker" => Ok(false),
        "multi-thread" => Ok(true),
        other => Err(format!(
            "MFA_GATE_RUNTIME: unknown value {other:?} (per-worker or multi-thread)"
        )),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|err| {
        eprintln!("mfa-gate: config error: {err}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Check { config: path } = &cli.command {
        return match load(path) {
            Ok(config) => {
                match toml::to_string(&config.effective) {
                    Ok(text) => println!("# effective settings of {}\n{text}", path.display()),
                    Err(err) => eprintln!("mfa-gate: cannot print the effective settings: {err}"),
                }
                for rule in config.expired_rules(std::time::SystemTime::now()) {
                    eprintln!(
                        "mfa-gate: warning: allow rule {:?} expired at {} and matches nothing",
                        rule.name,
                        humantime::format_rfc3339_seconds(
                            rule.expires.unwrap_or(std::time::UNIX_EPOCH)
                        )
                    );
                }
                eprintln!("mfa-gate: config OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        };
    }
    if let Err(err) = init_logging(&cli.log_level, cli.log_format) {
        eprintln!("mfa-gate: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let multi_thread = match multi_thread_asked() {
        Ok(multi_thread) => multi_thread,
        Err(err) => {
            eprintln!("mfa-gate: config error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match runtime(multi_thread) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("mfa-gate: cannot start the runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => {
                let path = config;
                let config = match load(&path) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
                run(config, &path).await
            }
            Command::Dev {
                listen,
                admin_listen,
                provider,
            } => match mfa_gate::dev::start(listen, admin_listen, provider.into()).await {
                Ok(dev) => {
                    println!("{}", dev.banner());
                    wait_for_signal().await;
                    dev.shutdown().await;
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("mfa-gate: {err:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            },
            Command::Health { url } => health(&url).await,
            Command::Explain {
                config,
                method,
                path,
                client,
                user_id,
                token_file,
                json,
            } => {
                let config = match load(&config) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
                let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
                    eprintln!("mfa-gate: --method {method:?} is not an HTTP method");
                    return ExitCode::from(EXIT_CONFIG);
                };
                let token = match &token_file {
                    Some(file) => match std::fs::read_to_string(file) {
                        Ok(text) => Some(text.trim().to_string()),
                        Err(err) => {
                            eprintln!("mfa-gate: --token-file {}: {err}", file.display());
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    },
                    None => None,
                };
                match mfa_gate::explain::for_config(
                    &config,
                    &method,
                    &path,
                    client,
                    user_id.as_deref(),
                    token.as_deref(),
                )
                .await
                {
                    Ok(explanation) => {
                        if json {
                            println!(
                                "{}",
                                serde_json::to_string_pretty(&explanation).unwrap_or_default()
                            );
                        } else {
                            print!("{}", explanation.render());
                        }
                        ExitCode::SUCCESS
                    }
                    Err(err) => {
                        eprintln!("mfa-gate: {err:#}");
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
            }
            Command::Admin { action } => admin(action).await,
            Command::Check { .. } => unreachable!("handled before the runtime starts"),
        }
    })
}

async fn run(config: Config, path: &Path) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};

    let gateway = match Gateway::start(config).await {
        Ok(gateway) => gateway,
        Err(err) => {
            eprintln!("mfa-gate: {err:#}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let mut reloader = mfa_gate::reload::Reloader::new(path, &gateway);
    let mut hangup = signal(SignalKind::hangup()).expect("installing a SIGHUP handler");
    let mut poll = tokio::time::interval(mfa_gate::reload::POLL_INTERVAL);
    let stop = wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangup.recv() => reloader.reload(&gateway, "SIGHUP").await,
            _ = poll.tick() => reloader.poll(&gateway).await,
        }
    }
    tracing::info!("shutdown signal received; draining");
    gateway.shutdown();
    gateway.wait().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

impl From<DevProvider> for mfa_gate::config::ProviderKind {
    fn from(provider: DevProvider) -> Self {
        match provider {
            DevProvider::Huawei => mfa_gate::config::ProviderKind::Huawei,
            DevProvider::AlibabaCloudsso => mfa_gate::config::ProviderKind::AlibabaCloudsso,
        }
    }
}

/// Percent-encodes one URL path segment or query value.
fn encode_component(value: &str) -> String {
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

/// Runs an admin action against a gateway's admin API and prints its JSON answer.
async fn admin(action: AdminCommand) -> ExitCode {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let (target, path, body) = match &action {
        AdminCommand::DisableMfa {
            user_id,
            serial_number,
            target,
        } => (
            target,
            format!(
                "/admin/users/{}/mfa-devices/disable",
                encode_component(user_id)
            ),
            serial_number
                .as_ref()
                .map(|serial| serde_json::json!({ "serial_number": serial }).to_string())
                .unwrap_or_default(),
        ),
        AdminCommand::Purge { user_id, target } => (
            target,
            match user_id {
                Some(id) => format!("/admin/cache/purge?user_id={}", encode_component(id)),
                None => "/admin/cache/purge".to_string(),
            },
            String::new(),
        ),
    };
    let token = match &target.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim_end_matches(['\n', '\r']).to_string()),
            Err(err) => {
                eprintln!("mfa-gate: --token-file {}: {err}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => std::env::var("MFA_GATE_ADMIN_TOKEN").ok(),
    };
    let url = format!("{}{path}", target.admin_url.trim_end_matches('/'));
    let mut request = http::Request::post(&url).header("content-type", "application/json");
    if let Some(token) = &token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = match request.body(Full::new(bytes::Bytes::from(body))) {
        Ok(request) => request,
        Err(err) => {
            eprintln!("mfa-gate: --admin-url {:?}: {err}", target.admin_url);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response =
        match tokio::time::timeout(std::time::Duration::from_secs(30), client.request(request))
            .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                eprintln!("mfa-gate: {url}: {err}");
                return ExitCode::from(EXIT_FAILURE);
            }
            Err(_) => {
                eprintln!("mfa-gate: {url}: no answer within 30 s");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    println!("{}", String::from_utf8_lossy(&body));
    if status.is_success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("mfa-gate: the gateway answered {status}");
        ExitCode::from(EXIT_FAILURE)
    }
}

/// Exit 0 if `url` answers 2xx within two seconds.
async fn health(url: &str) -> ExitCode {
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let uri: http::Uri = match url.parse() {
        Ok(uri) => uri,
        Err(err) => {
            eprintln!("mfa-gate: --url {url:?}: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let probe = client.get(uri);
    match tokio::time::timeout(std::time::Duration::from_secs(2), probe).await {
        Ok(Ok(response)) if response.status().is_success() => ExitCode::SUCCESS,
        Ok(Ok(response)) => {
            eprintln!("mfa-gate: {url} answered {}", response.status());
            ExitCode::from(EXIT_FAILURE)
        }
        Ok(Err(err)) => {
            eprintln!("mfa-gate: {url}: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(_) => {
            eprintln!("mfa-gate: {url}: no answer within 2 s");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// mimalloc instead of the system allocator: a proxy allocates and frees small buffers on every
/// request, and glibc's malloc spent ~15% of the cached path's instructions doing it. Called
/// through `mfa_gate_allocator`, which keeps mimalloc on its fast path (see that crate).
#[global_allocator]
static ALLOCATOR: mfa_gate_allocator::MiMalloc = mfa_gate_allocator::MiMalloc;
