//! The config file (CONTRACT §3): a serde schema that rejects unknown keys, and its conversion
//! into the validated [`Config`] the rest of the gateway is built from.
//!
//! Two layers on purpose: [`FileConfig`] mirrors the TOML exactly (with every default filled in,
//! which is also what `mfa-gate check` prints), and [`Config`] holds values that were checked
//! (addresses parsed, URLs split, durations positive, rules compiled). Every error names the key,
//! and for syntax errors the file and line, in one line.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::proxy::path;

/// A config error: which key (or file position) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `file:line` for syntax and type errors, else empty.
    location: String,
    /// The dotted key, e.g. `allow[1].cidrs[0]`.
    key: String,
    message: String,
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            location: String::new(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// The key the error is about (for tests and tooling).
    pub fn key_path(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.location.is_empty() {
            write!(f, "{}: ", self.location)?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        // One line, whatever the underlying parser wrote.
        let message = self.message.replace('\n', " ");
        f.write_str(message.trim())
    }
}

impl std::error::Error for ConfigError {}

// ----- defaults, each documented in config/mfa-gate.toml -----

const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_HEADER_BYTES: usize = 65_536;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_IAM_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_IAM_MAX_CONCURRENCY: usize = 64;
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(10);
const DEFAULT_MAX_ENTRIES: u64 = 100_000;
const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(300);
const DEFAULT_SHARED_KEY_PREFIX: &str = "mfa-gate:";
const DEFAULT_SHARED_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_SHARED_COMMAND_TIMEOUT: Duration = Duration::from_millis(100);
const DEFAULT_SHARED_POOL_SIZE: usize = 4;

/// Shortest `cache.shared.secret_file` content: 256 bits, as the HMAC and AEAD keys it derives.
const MIN_SHARED_SECRET_BYTES: usize = 32;

/// Smallest header block limit that still lets ordinary browsers through.
const MIN_HEADER_BYTES: usize = 1024;
/// Largest accepted `max_header_bytes`: beyond this a header block is a memory attack.
const MAX_HEADER_BYTES: usize = 1024 * 1024;

// ----- the file schema -----

/// The TOML file as written, with defaults filled in.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub upstream: UpstreamFile,
    #[serde(default)]
    pub iam: IamFile,
    #[serde(default)]
    pub token: TokenFile,
    #[serde(default)]
    pub policy: PolicyFile,
    #[serde(default)]
    pub cache: CacheFile,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AllowFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityFile>,
}

/// `[identity]`: what the gateway tells the upstream about the caller beyond headers.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion: Option<AssertionFile>,
}

/// `[identity.assertion]`: sign an `X-Auth-Assertion` JWT onto every forwarded request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionFile {
    /// PKCS#8 PEM, Ed25519 or ECDSA P-256.
    pub key_file: PathBuf,
    /// `aud` of the assertions; default: the upstream URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default = "default_assertion_issuer")]
    pub issuer: String,
    #[serde(default = "default_assertion_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

fn default_assertion_issuer() -> String {
    "mfa-gate".into()
}

fn default_assertion_ttl() -> Duration {
    Duration::from_secs(30)
}

/// One `[[route]]`: a subtree whose requests are judged with other policy settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require: Option<Require>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_totp_login: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub trusted_proxies: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            listen: DEFAULT_LISTEN.into(),
            tls_cert: None,
            tls_key: None,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            trusted_proxies: vec!["127.0.0.1/32".into(), "::1/128".into()],
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile {
            listen: DEFAULT_ADMIN_LISTEN.into(),
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        UpstreamFile {
            url: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Huawei,
    AlibabaCloudsso,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IamFile {
    pub provider: ProviderKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub max_concurrency: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_secret_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub v5: Option<V5File>,
}

impl Default for IamFile {
    fn default() -> Self {
        IamFile {
            provider: ProviderKind::Huawei,
            endpoint: None,
            timeout: DEFAULT_IAM_TIMEOUT,
            max_concurrency: DEFAULT_IAM_MAX_CONCURRENCY,
            directory_id: None,
            access_key_id_file: None,
            access_key_secret_file: None,
            jwt: None,
            v5: None,
        }
    }
}

/// `[iam.jwt]`: how a CloudSSO caller's bearer JWT is verified.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    pub issuer: String,
    pub audience: String,
    #[serde(default = "default_user_id_claim")]
    pub user_id_claim: String,
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_user_id_claim() -> String {
    "sub".into()
}

fn default_jwt_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

/// `[iam.v5]`: the Huawei IAM v5 endpoint for admin actions, AK/SK signed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct V5File {
    pub endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ak_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sk_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenFile {
    pub forward: bool,
}

impl Default for TokenFile {
    fn default() -> Self {
        TokenFile { forward: true }
    }
}

/// `policy.require`: which MFA factor a user must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Require {
    MfaDevice,
    LoginProtect,
    Any,
    All,
}

/// `policy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Enforce,
    ReportOnly,
}

/// `policy.on_iam_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnIamError {
    Deny,
    Allow,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFile {
    pub require: Require,
    pub login_protect_methods: Vec<String>,
    pub require_totp_login: bool,
    pub mode: Mode,
    pub on_iam_error: OnIamError,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help_url: Option<String>,
}

impl Default for PolicyFile {
    fn default() -> Self {
        PolicyFile {
            require: Require::MfaDevice,
            login_protect_methods: vec!["vmfa".into()],
            require_totp_login: false,
            mode: Mode::Enforce,
            on_iam_error: OnIamError::Deny,
            help_url: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheFile {
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    pub max_entries: u64,
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// `[cache.shared]`: a second cache level and invalidation bus in Redis, for fleets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedCacheFile>,
}

impl Default for CacheFile {
    fn default() -> Self {
        CacheFile {
            ttl: DEFAULT_CACHE_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            max_entries: DEFAULT_MAX_ENTRIES,
            stale_if_error: DEFAULT_STALE_IF_ERROR,
            shared: None,
        }
    }
}

/// `[cache.shared]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedCacheFile {
    /// `redis://host:port[/db]` or `rediss://…` (TLS with rustls). Required.
    pub redis_url: Option<String>,
    /// Prepended to every key and to the invalidation channel, so that several fleets can share
    /// one Redis.
    pub key_prefix: String,
    /// At least 32 bytes shared by the fleet: keys the token HMAC and seals the entries. Required.
    pub secret_file: Option<PathBuf>,
    /// The Redis password (ACL user from the URL), kept out of the URL and the printed config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// `rediss://`: verify the server against this CA instead of the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for one Redis command before the gateway goes on without Redis.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Multiplexed Redis connections used round-robin.
    pub pool_size: usize,
}

impl Default for SharedCacheFile {
    fn default() -> Self {
        SharedCacheFile {
            redis_url: None,
            key_prefix: DEFAULT_SHARED_KEY_PREFIX.into(),
            secret_file: None,
            password_file: None,
            ca_file: None,
            connect_timeout: DEFAULT_SHARED_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_SHARED_COMMAND_TIMEOUT,
            pool_size: DEFAULT_SHARED_POOL_SIZE,
        }
    }
}

/// One `[[allow]]` rule as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AllowFile {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidrs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_ids: Option<Vec<String>>,
    /// Why the rule exists (logged with each match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339 instant at which the rule stops matching (break-glass with an end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

// ----- the validated config -----

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub iam: IamConfig,
    pub token: TokenConfig,
    pub policy: PolicyConfig,
    pub cache: CacheConfig,
    /// `[cache.shared]`, when the fleet shares a Redis.
    pub shared_cache: Option<SharedCacheConfig>,
    pub allow: Vec<AllowRule>,
    /// Per-route policy overrides, first match wins.
    pub routes: Vec<Route>,
    /// `[identity.assertion]`: the signer of `X-Auth-Assertion`, key already loaded.
    pub assertion: Option<std::sync::Arc<crate::assertion::Signer>>,
    /// The file schema with defaults filled in, as `check` prints it.
    pub effective: FileConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Where the token was read from, watched for rotation.
    pub token_file: Option<PathBuf>,
    /// The admin bearer token, read from `admin.token_file` (trailing newline removed).
    pub token: Option<AdminToken>,
}

/// The admin API's bearer token; redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: http::Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct IamConfig {
    pub provider: ProviderKind,
    /// Scheme and authority, no trailing slash.
    pub endpoint: String,
    pub timeout: Duration,
    pub max_concurrency: usize,
    /// Present exactly when `provider = "alibaba_cloudsso"`.
    pub cloudsso: Option<CloudSsoSettings>,
    /// `[iam.v5]`: Huawei IAM v5 for admin actions (disable a lost MFA device).
    pub v5: Option<V5Settings>,
}

/// `[iam.v5]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V5Settings {
    /// Scheme and authority, no trailing slash.
    pub endpoint: String,
    /// AK/SK files (else `HUAWEICLOUD_SDK_AK` / `HUAWEICLOUD_SDK_SK`), read at start.
    pub ak_file: Option<PathBuf>,
    pub sk_file: Option<PathBuf>,
}

/// The `alibaba_cloudsso` keys of `[iam]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSsoSettings {
    pub directory_id: String,
    /// AccessKey files (else the `ALIBABA_CLOUD_*` environment variables), resolved against
    /// the config file's directory. Read at start, never logged.
    pub access_key_id_file: Option<PathBuf>,
    pub access_key_secret_file: Option<PathBuf>,
    pub jwt: crate::iam::jwt::JwtSettings,
}

#[derive(Debug, Clone, Copy)]
pub struct TokenConfig {
    pub forward: bool,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub require: Require,
    /// Lowercased verification methods that count as login protection.
    pub login_protect_methods: Vec<String>,
    pub require_totp_login: bool,
    pub mode: Mode,
    pub on_iam_error: OnIamError,
    /// Where a user denied for missing MFA learns how to set it up (in the 403 answer).
    pub help_url: Option<std::sync::Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub max_entries: u64,
    /// Zero disables serving stale entries.
    pub stale_if_error: Duration,
}

/// `[cache.shared]`, validated; secrets already read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCacheConfig {
    /// Scheme, host, port and database; never a password.
    pub redis_url: String,
    pub key_prefix: String,
    pub secret: Secret,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub pool_size: usize,
}

/// Bytes read from a secret file (trailing newline removed); redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A path pattern of an allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Matches this normalised path only.
    Exact(String),
    /// `"/prefix/**"`: matches `/prefix` and everything below `/prefix/`. Stored without the
    /// `/**`; for `"/**"` the prefix is empty and everything matches.
    Subtree(String),
}

/// A compiled `[[route]]`: requests whose normalised path matches are judged with these
/// settings instead of `[policy]`'s.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub paths: Vec<PathPattern>,
    pub require: Option<Require>,
    pub require_totp_login: Option<bool>,
    pub mode: Option<Mode>,
}

/// A compiled `[[allow]]` rule: every matcher given must match.
#[derive(Debug, Clone)]
pub struct AllowRule {
    pub name: String,
    pub paths: Option<Vec<PathPattern>>,
    pub methods: Option<Vec<http::Method>>,
    pub cidrs: Option<Vec<IpNet>>,
    pub user_ids: Option<Vec<String>>,
    pub user_names: Option<Vec<String>>,
    pub domain_ids: Option<Vec<String>>,
    pub reason: Option<std::sync::Arc<str>>,
    /// The rule matches nothing from this instant on.
    pub expires: Option<std::time::SystemTime>,
}

impl AllowRule {
    /// Whether the rule has lapsed at `now`.
    pub fn expired_at(&self, now: std::time::SystemTime) -> bool {
        self.expires.is_some_and(|expires| now >= expires)
    }

    /// A rule with any identity matcher needs a verified identity (CONTRACT §3).
    pub fn is_identity_rule(&self) -> bool {
        self.user_ids.is_some() || self.user_names.is_some() || self.domain_ids.is_some()
    }
}

impl Config {
    /// Allow rules that have already lapsed at `now` (worth a warning: they match nothing).
    pub fn expired_rules(&self, now: std::time::SystemTime) -> Vec<&AllowRule> {
        self.allow
            .iter()
            .filter(|rule| rule.expired_at(now))
            .collect()
    }

    /// Reads, parses and validates a config file. Reading key files (`admin.token_file`) is
    /// the only other I/O: nothing is bound or contacted.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            location: path.display().to_string(),
            key: String::new(),
            message: format!("cannot read config file: {err}"),
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates config text; `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let file = parse_file(text, origin)?;
        let base_dir = origin.parent().unwrap_or(Path::new("."));
        validate(file, base_dir)
    }
}

fn parse_file(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        let inner = err.into_inner();
        let line = inner
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let location = match line {
            Some(line) => format!("{}:{line}", origin.display()),
            None => origin.display().to_string(),
        };
        ConfigError {
            location,
            key: if key == "." { String::new() } else { key },
            message: inner.message().to_string(),
        }
    })
}

fn validate(file: FileConfig, base_dir: &Path) -> Result<Config, ConfigError> {
    let server = validate_server(&file.server, base_dir)?;
    let admin = validate_admin(&file.admin, base_dir)?;
    let upstream = validate_upstream(&file.upstream, base_dir)?;
    let iam = validate_iam(&file.iam, base_dir)?;
    let policy = validate_policy(&file.policy)?;
    let cache = validate_cache(&file.cache)?;
    let shared_cache = file
        .cache
        .shared
        .as_ref()
        .map(|shared| validate_shared_cache(shared, base_dir))
        .transpose()?;
    let allow = file
        .allow
        .iter()
        .enumerate()
        .map(|(index, rule)| validate_allow(index, rule))
        .collect::<Result<Vec<_>, _>>()?;
    let assertion = match file.identity.as_ref().and_then(|i| i.assertion.as_ref()) {
        None => None,
        Some(assertion) => {
            let key_file =
                existing_file("identity.assertion.key_file", &assertion.key_file, base_dir)?;
            if assertion.ttl.is_zero() || assertion.ttl > crate::assertion::MAX_TTL {
                return Err(ConfigError::key(
                    "identity.assertion.ttl",
                    "must be between 1s and 60s: an assertion proves one request",
                ));
            }
            let audience = assertion
                .audience
                .clone()
                .unwrap_or_else(|| upstream.url.to_string().trim_end_matches('/').to_string());
            let signer = crate::assertion::Signer::from_pem_file(
                &key_file,
                &assertion.issuer,
                &audience,
                assertion.ttl,
            )
            .map_err(|err| ConfigError::key("identity.assertion.key_file", format!("{err:#}")))?;
            Some(std::sync::Arc::new(signer))
        }
    };
    let routes = file
        .route
        .iter()
        .enumerate()
        .map(|(index, route)| validate_route(index, route, &policy))
        .collect::<Result<Vec<_>, _>>()?;
    for (index, route) in routes.iter().enumerate() {
        if routes[..index]
            .iter()
            .any(|earlier| earlier.name == route.name)
        {
            return Err(ConfigError::key(
                format!("route[{index}].name"),
                format!(
                    "duplicate route name {:?}: names label metrics and must be unique",
                    route.name
                ),
            ));
        }
    }
    for (index, rule) in allow.iter().enumerate() {
        if allow[..index]
            .iter()
            .any(|earlier| earlier.name == rule.name)
        {
            return Err(ConfigError::key(
                format!("allow[{index}].name"),
                format!(
                    "duplicate rule name {:?}: names label metrics and must be unique",
                    rule.name
                ),
            ));
        }
    }
    if iam.provider == ProviderKind::AlibabaCloudsso
        && std::iter::once(Some(policy.require))
            .chain(routes.iter().map(|route| route.require))
            .any(|require| matches!(require, Some(Require::LoginProtect | Require::All)))
    {
        return Err(ConfigError::key(
            "policy.require",
            "alibaba_cloudsso knows no login protection: use \"mfa_device\" (CloudSSO MFA enabled) or \"any\"",
        ));
    }
    if server.listen == admin.listen && server.listen.port() != 0 {
        return Err(ConfigError::key(
            "admin.listen",
            format!("same address as server.listen ({})", server.listen),
        ));
    }
    Ok(Config {
        server,
        admin,
        upstream,
        iam,
        token: TokenConfig {
            forward: file.token.forward,
        },
        policy,
        cache,
        shared_cache,
        allow,
        routes,
        assertion,
        effective: file,
    })
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::key(
            key,
            format!(
                "{value:?} is not an address with a port, like \"0.0.0.0:8080\" or \"[::1]:8080\""
            ),
        )
    })
}

fn positive(key: &str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        Err(ConfigError::key(key, "must be greater than zero"))
    } else {
        Ok(value)
    }
}

fn existing_file(key: &str, path: &Path, base_dir: &Path) -> Result<PathBuf, ConfigError> {
    let full = if path.is_relative() {
        base_dir.join(path)
    } else {
        path.to_path_buf()
    };
    if full.is_file() {
        Ok(full)
    } else {
        Err(ConfigError::key(
            key,
            format!("file {} does not exist or is not a file", full.display()),
        ))
    }
}

fn validate_server(file: &ServerFile, base_dir: &Path) -> Result<ServerConfig, ConfigError> {
    let listen = socket_addr("server.listen", &file.listen)?;
    let tls = match (&file.tls_cert, &file.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: existing_file("server.tls_cert", cert, base_dir)?,
            key: existing_file("server.tls_key", key, base_dir)?,
        }),
        (Some(_), None) => {
            return Err(ConfigError::key(
                "server.tls_key",
                "missing: tls_cert and tls_key must be set together",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::key(
                "server.tls_cert",
                "missing: tls_cert and tls_key must be set together",
            ))
        }
    };
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&file.max_header_bytes) {
        return Err(ConfigError::key(
            "server.max_header_bytes",
            format!(
                "{} is out of range {MIN_HEADER_BYTES}..={MAX_HEADER_BYTES}",
                file.max_header_bytes
            ),
        ));
    }
    let trusted_proxies = file
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(i, cidr)| parse_cidr(&format!("server.trusted_proxies[{i}]"), cidr))
        .collect::<Result<_, _>>()?;
    Ok(ServerConfig {
        listen,
        tls,
        header_read_timeout: positive("server.header_read_timeout", file.header_read_timeout)?,
        max_header_bytes: file.max_header_bytes,
        trusted_proxies,
        shutdown_grace: file.shutdown_grace,
    })
}

/// A CIDR, or a bare address meaning that single host.
fn parse_cidr(key: &str, value: &str) -> Result<IpNet, ConfigError> {
    if let Ok(net) = value.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(ConfigError::key(
                key,
                format!(
                    "{value:?} has host bits set; did you mean {:?}?",
                    net.trunc().to_string()
                ),
            ));
        }
        return Ok(net);
    }
    value
        .parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| ConfigError::key(key, format!("{value:?} is not a CIDR like \"10.0.0.0/8\"")))
}

fn validate_admin(file: &AdminFile, base_dir: &Path) -> Result<AdminConfig, ConfigError> {
    let listen = socket_addr("admin.listen", &file.listen)?;
    let token_file = file
        .token_file
        .as_ref()
        .map(|path| existing_file("admin.token_file", path, base_dir))
        .transpose()?;
    let token = match &token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                ConfigError::key(
                    "admin.token_file",
                    format!("cannot read {}: {err}", path.display()),
                )
            })?;
            let token = text.strip_suffix('\n').unwrap_or(&text);
            let token = token.strip_suffix('\r').unwrap_or(token);
            if token.is_empty() || token.chars().any(|c| c.is_control() || c == ' ') {
                return Err(ConfigError::key(
                    "admin.token_file",
                    format!(
                        "{} must hold one non-empty token without spaces",
                        path.display()
                    ),
                ));
            }
            Some(AdminToken(token.to_string()))
        }
    };
    Ok(AdminConfig {
        listen,
        token_file,
        token,
    })
}

fn validate_upstream(file: &UpstreamFile, base_dir: &Path) -> Result<UpstreamConfig, ConfigError> {
    let raw = file.url.as_deref().ok_or_else(|| {
        ConfigError::key(
            "upstream.url",
            "missing: the app to forward to, like \"http://127.0.0.1:3000\"",
        )
    })?;
    let url: http::Uri = raw
        .parse()
        .map_err(|err| ConfigError::key("upstream.url", format!("{raw:?} is not a URL: {err}")))?;
    match url.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(ConfigError::key(
                "upstream.url",
                format!("{raw:?}: scheme must be http or https"),
            ))
        }
    }
    if url.host().is_none_or(str::is_empty) {
        return Err(ConfigError::key(
            "upstream.url",
            format!("{raw:?} has no host"),
        ));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(ConfigError::key(
            "upstream.url",
            format!("{raw:?}: only scheme, host and port are allowed (the client's path is forwarded as is)"),
        ));
    }
    let ca_file = file
        .ca_file
        .as_ref()
        .map(|path| existing_file("upstream.ca_file", path, base_dir))
        .transpose()?;
    Ok(UpstreamConfig {
        url,
        connect_timeout: positive("upstream.connect_timeout", file.connect_timeout)?,
        timeout: positive("upstream.timeout", file.timeout)?,
        ca_file,
    })
}

/// Whether a URL host is on this machine, where plain HTTP cannot be intercepted on the way.
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An IAM endpoint: `https://host[:port]`, or `http://` to loopback only (the simulator). Plain
/// HTTP elsewhere would hand every user's token to anyone on the path.
fn iam_endpoint(key: &str, raw: &str) -> Result<String, ConfigError> {
    let url: http::Uri = raw
        .parse()
        .map_err(|err| ConfigError::key(key, format!("{raw:?} is not a URL: {err}")))?;
    let host = url
        .host()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| ConfigError::key(key, format!("{raw:?} has no host")))?;
    match url.scheme_str() {
        Some("https") => {}
        Some("http") if is_loopback_host(host) => {}
        Some("http") => {
            return Err(ConfigError::key(
                key,
                format!("{raw:?}: the IAM must be reached over https (plain http is allowed to loopback only)"),
            ))
        }
        _ => return Err(ConfigError::key(key, format!("{raw:?}: scheme must be https"))),
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(ConfigError::key(
            key,
            format!("{raw:?}: only scheme, host and port are allowed"),
        ));
    }
    Ok(raw.trim_end_matches('/').to_string())
}

fn validate_iam(file: &IamFile, base_dir: &Path) -> Result<IamConfig, ConfigError> {
    let raw = file.endpoint.as_deref().ok_or_else(|| {
        ConfigError::key(
            "iam.endpoint",
            "missing: the IAM to ask, like \"https://iam.myhuaweicloud.eu\"",
        )
    })?;
    let endpoint = iam_endpoint("iam.endpoint", raw)?;
    if !(1..=4096).contains(&file.max_concurrency) {
        return Err(ConfigError::key(
            "iam.max_concurrency",
            format!("{} is out of range 1..=4096", file.max_concurrency),
        ));
    }
    for (key, path) in [
        ("iam.access_key_id_file", &file.access_key_id_file),
        ("iam.access_key_secret_file", &file.access_key_secret_file),
    ] {
        if let Some(path) = path {
            existing_file(key, path, base_dir)?;
        }
    }
    let mut cloudsso = None;
    match file.provider {
        ProviderKind::Huawei => {
            for (key, set) in [
                ("iam.directory_id", file.directory_id.is_some()),
                ("iam.jwt", file.jwt.is_some()),
                ("iam.access_key_id_file", file.access_key_id_file.is_some()),
                (
                    "iam.access_key_secret_file",
                    file.access_key_secret_file.is_some(),
                ),
            ] {
                if set {
                    return Err(ConfigError::key(
                        key,
                        "only used with iam.provider = \"alibaba_cloudsso\"",
                    ));
                }
            }
        }
        ProviderKind::AlibabaCloudsso => {
            if file.directory_id.as_deref().is_none_or(str::is_empty) {
                return Err(ConfigError::key(
                    "iam.directory_id",
                    "missing: the CloudSSO directory, like \"d-00fc2p61****\"",
                ));
            }
            let jwt = file.jwt.as_ref().ok_or_else(|| {
                ConfigError::key("iam.jwt", "missing: alibaba_cloudsso verifies a bearer JWT")
            })?;
            let jwt = validate_jwt(jwt, base_dir)?;
            let resolve = |key: &str, path: &Option<PathBuf>| {
                path.as_ref()
                    .map(|path| existing_file(key, path, base_dir))
                    .transpose()
            };
            if file.access_key_id_file.is_some() != file.access_key_secret_file.is_some() {
                return Err(ConfigError::key(
                    "iam.access_key_secret_file",
                    "set access_key_id_file and access_key_secret_file together (or neither, to use ALIBABA_CLOUD_ACCESS_KEY_ID / _SECRET)",
                ));
            }
            cloudsso = Some(CloudSsoSettings {
                directory_id: file.directory_id.clone().unwrap_or_default(),
                access_key_id_file: resolve("iam.access_key_id_file", &file.access_key_id_file)?,
                access_key_secret_file: resolve(
                    "iam.access_key_secret_file",
                    &file.access_key_secret_file,
                )?,
                jwt,
            });
            if file.v5.is_some() {
                return Err(ConfigError::key(
                    "iam.v5",
                    "only used with iam.provider = \"huawei\"",
                ));
            }
        }
    }
    let v5 = match &file.v5 {
        None => None,
        Some(v5) => {
            let endpoint = iam_endpoint("iam.v5.endpoint", &v5.endpoint)?;
            if v5.ak_file.is_some() != v5.sk_file.is_some() {
                return Err(ConfigError::key(
                    "iam.v5.sk_file",
                    "set ak_file and sk_file together (or neither, to use HUAWEICLOUD_SDK_AK / _SK)",
                ));
            }
            let resolve = |key: &str, path: &Option<PathBuf>| {
                path.as_ref()
                    .map(|path| existing_file(key, path, base_dir))
                    .transpose()
            };
            Some(V5Settings {
                endpoint,
                ak_file: resolve("iam.v5.ak_file", &v5.ak_file)?,
                sk_file: resolve("iam.v5.sk_file", &v5.sk_file)?,
            })
        }
    };
    Ok(IamConfig {
        provider: file.provider,
        endpoint,
        timeout: positive("iam.timeout", file.timeout)?,
        max_concurrency: file.max_concurrency,
        cloudsso,
        v5,
    })
}

fn validate_jwt(
    jwt: &JwtFile,
    base_dir: &Path,
) -> Result<crate::iam::jwt::JwtSettings, ConfigError> {
    use crate::iam::jwt::{Algorithm, JwksLocation, JwtSettings, DEFAULT_LEEWAY};
    let jwks = match (&jwt.jwks_url, &jwt.jwks_file) {
        (Some(url), None) => {
            iam_endpoint_with_path("iam.jwt.jwks_url", url)?;
            JwksLocation::Url(url.clone())
        }
        (None, Some(path)) => {
            JwksLocation::File(existing_file("iam.jwt.jwks_file", path, base_dir)?)
        }
        _ => {
            return Err(ConfigError::key(
                "iam.jwt.jwks_url",
                "set exactly one of jwks_url and jwks_file",
            ))
        }
    };
    for (key, value) in [
        ("iam.jwt.issuer", &jwt.issuer),
        ("iam.jwt.audience", &jwt.audience),
        ("iam.jwt.user_id_claim", &jwt.user_id_claim),
    ] {
        if value.is_empty() {
            return Err(ConfigError::key(key, "must not be empty"));
        }
    }
    if jwt.algorithms.is_empty() {
        return Err(ConfigError::key(
            "iam.jwt.algorithms",
            "must name at least one algorithm",
        ));
    }
    for (i, alg) in jwt.algorithms.iter().enumerate() {
        if ![
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
        ]
        .contains(&alg.as_str())
        {
            return Err(ConfigError::key(
                format!("iam.jwt.algorithms[{i}]"),
                format!("{alg:?} is not an accepted asymmetric algorithm (never \"none\" or HS*)"),
            ));
        }
    }
    let algorithms = jwt
        .algorithms
        .iter()
        .enumerate()
        .map(|(i, alg)| {
            alg.parse::<Algorithm>().map_err(|_| {
                ConfigError::key(
                    format!("iam.jwt.algorithms[{i}]"),
                    format!("{alg:?} is not supported"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(JwtSettings {
        jwks,
        issuer: jwt.issuer.clone(),
        audience: jwt.audience.clone(),
        user_id_claim: jwt.user_id_claim.clone(),
        algorithms,
        leeway: DEFAULT_LEEWAY,
    })
}

/// Like [`iam_endpoint`], for URLs that carry a path (a JWKS document).
fn iam_endpoint_with_path(key: &str, raw: &str) -> Result<(), ConfigError> {
    let url: http::Uri = raw
        .parse()
        .map_err(|err| ConfigError::key(key, format!("{raw:?} is not a URL: {err}")))?;
    let host = url.host().unwrap_or_default();
    match url.scheme_str() {
        Some("https") if !host.is_empty() => Ok(()),
        Some("http") if is_loopback_host(host) => Ok(()),
        _ => Err(ConfigError::key(
            key,
            format!("{raw:?}: must be an https URL (plain http is allowed to loopback only)"),
        )),
    }
}

fn validate_policy(file: &PolicyFile) -> Result<PolicyConfig, ConfigError> {
    let mut methods = Vec::new();
    for (i, method) in file.login_protect_methods.iter().enumerate() {
        let method = method.to_ascii_lowercase();
        if !["vmfa", "sms", "email"].contains(&method.as_str()) {
            return Err(ConfigError::key(
                format!("policy.login_protect_methods[{i}]"),
                format!("{method:?} is not one of \"vmfa\", \"sms\", \"email\""),
            ));
        }
        methods.push(method);
    }
    if methods.is_empty() && matches!(file.require, Require::LoginProtect | Require::All) {
        return Err(ConfigError::key(
            "policy.login_protect_methods",
            "is empty, so no user could ever satisfy policy.require",
        ));
    }
    let help_url = match &file.help_url {
        None => None,
        Some(url) => {
            let parsed: http::Uri = url.parse().map_err(|_| {
                ConfigError::key("policy.help_url", format!("{url:?} is not a URL"))
            })?;
            if !matches!(parsed.scheme_str(), Some("https" | "http")) || parsed.host().is_none() {
                return Err(ConfigError::key(
                    "policy.help_url",
                    format!("{url:?} must be an absolute http(s) URL"),
                ));
            }
            Some(std::sync::Arc::from(url.as_str()))
        }
    };
    Ok(PolicyConfig {
        help_url,
        require: file.require,
        login_protect_methods: methods,
        require_totp_login: file.require_totp_login,
        mode: file.mode,
        on_iam_error: file.on_iam_error,
    })
}

fn validate_cache(file: &CacheFile) -> Result<CacheConfig, ConfigError> {
    if file.max_entries == 0 {
        return Err(ConfigError::key(
            "cache.max_entries",
            "must be greater than zero",
        ));
    }
    Ok(CacheConfig {
        ttl: positive("cache.ttl", file.ttl)?,
        negative_ttl: positive("cache.negative_ttl", file.negative_ttl)?,
        max_entries: file.max_entries,
        stale_if_error: file.stale_if_error,
    })
}

fn validate_shared_cache(
    file: &SharedCacheFile,
    base_dir: &Path,
) -> Result<SharedCacheConfig, ConfigError> {
    const KEY: &str = "cache.shared";
    let key = |field: &str| format!("{KEY}.{field}");
    let raw = file.redis_url.as_deref().ok_or_else(|| {
        ConfigError::key(
            key("redis_url"),
            "missing: the Redis to share, like \"redis://redis.mfa-gate.svc:6379\"",
        )
    })?;
    // A URL echoed in an error never shows its userinfo (it may hold a password).
    let shown = match raw.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => raw.to_string(),
        },
        None => raw.to_string(),
    };
    let scheme = raw.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return Err(ConfigError::key(
            key("redis_url"),
            format!("{shown:?}: scheme must be redis or rediss"),
        ));
    }
    let info = redis::IntoConnectionInfo::into_connection_info(raw)
        .map_err(|err| ConfigError::key(key("redis_url"), format!("{shown:?}: {err}")))?;
    if info.redis_settings().password().is_some() {
        return Err(ConfigError::key(
            key("redis_url"),
            "carries a password: put it in cache.shared.password_file (the URL is printed by `mfa-gate check`)",
        ));
    }
    let prefix = &file.key_prefix;
    if prefix.is_empty()
        || prefix.len() > 64
        || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ConfigError::key(
            key("key_prefix"),
            format!("{prefix:?} must be 1 to 64 characters without spaces or control characters"),
        ));
    }
    let secret_path = file.secret_file.as_ref().ok_or_else(|| {
        ConfigError::key(
            key("secret_file"),
            "missing: a file with at least 32 random bytes shared by the fleet (e.g. `head -c 32 /dev/urandom | base64`)",
        )
    })?;
    let secret = read_secret(&key("secret_file"), secret_path, base_dir)?;
    if secret.0.len() < MIN_SHARED_SECRET_BYTES {
        return Err(ConfigError::key(
            key("secret_file"),
            format!(
                "holds {} bytes; at least {MIN_SHARED_SECRET_BYTES} are needed",
                secret.0.len()
            ),
        ));
    }
    let password = file
        .password_file
        .as_ref()
        .map(|path| read_secret(&key("password_file"), path, base_dir))
        .transpose()?;
    if let Some(password) = &password {
        if password.0.is_empty() || std::str::from_utf8(&password.0).is_err() {
            return Err(ConfigError::key(
                key("password_file"),
                "must hold one non-empty UTF-8 password",
            ));
        }
    }
    let ca_file = file
        .ca_file
        .as_ref()
        .map(|path| existing_file(&key("ca_file"), path, base_dir))
        .transpose()?;
    if ca_file.is_some() && scheme != Some("rediss") {
        return Err(ConfigError::key(
            key("ca_file"),
            "is only used with rediss:// (TLS)",
        ));
    }
    if file.pool_size == 0 || file.pool_size > 64 {
        return Err(ConfigError::key(
            key("pool_size"),
            "must be between 1 and 64",
        ));
    }
    Ok(SharedCacheConfig {
        redis_url: raw.to_string(),
        key_prefix: prefix.clone(),
        secret,
        password,
        ca_file,
        connect_timeout: positive(&key("connect_timeout"), file.connect_timeout)?,
        command_timeout: positive(&key("command_timeout"), file.command_timeout)?,
        pool_size: file.pool_size,
    })
}

/// The content of a secret file, without one trailing newline.
fn read_secret(key: &str, path: &Path, base_dir: &Path) -> Result<Secret, ConfigError> {
    let path = existing_file(key, path, base_dir)?;
    let mut bytes = std::fs::read(&path)
        .map_err(|err| ConfigError::key(key, format!("cannot read {}: {err}", path.display())))?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    Ok(Secret(bytes))
}

fn non_empty_list<'a>(
    key: &str,
    list: &'a Option<Vec<String>>,
) -> Result<Option<&'a [String]>, ConfigError> {
    match list {
        None => Ok(None),
        Some(list) if list.is_empty() => Err(ConfigError::key(
            key,
            "is empty: leave the key out to match anything",
        )),
        Some(list) => Ok(Some(list)),
    }
}

fn validate_allow(index: usize, file: &AllowFile) -> Result<AllowRule, ConfigError> {
    let key = |field: &str| format!("allow[{index}].{field}");
    let name = file.name.trim();
    if name.is_empty() {
        return Err(ConfigError::key(
            key("name"),
            "missing: every rule needs a name (it labels metrics)",
        ));
    }
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(ConfigError::key(
            key("name"),
            format!("{name:?}: use up to 64 letters, digits, '-', '_', '.', ':'"),
        ));
    }
    let paths = non_empty_list(&key("paths"), &file.paths)?
        .map(|paths| {
            paths
                .iter()
                .enumerate()
                .map(|(i, pattern)| parse_path_pattern(&key(&format!("paths[{i}]")), pattern))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let methods = non_empty_list(&key("methods"), &file.methods)?
        .map(|methods| {
            methods
                .iter()
                .enumerate()
                .map(|(i, method)| {
                    let upper = method.to_ascii_uppercase();
                    http::Method::from_bytes(upper.as_bytes()).map_err(|_| {
                        ConfigError::key(
                            key(&format!("methods[{i}]")),
                            format!("{method:?} is not an HTTP method"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let cidrs = non_empty_list(&key("cidrs"), &file.cidrs)?
        .map(|cidrs| {
            cidrs
                .iter()
                .enumerate()
                .map(|(i, cidr)| parse_cidr(&key(&format!("cidrs[{i}]")), cidr))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let identity =
        |field: &str, list: &Option<Vec<String>>| -> Result<Option<Vec<String>>, ConfigError> {
            let list = non_empty_list(&key(field), list)?;
            if let Some(list) = list {
                if let Some(i) = list.iter().position(|v| v.trim().is_empty()) {
                    return Err(ConfigError::key(
                        key(&format!("{field}[{i}]")),
                        "must not be empty",
                    ));
                }
            }
            Ok(list.map(<[String]>::to_vec))
        };
    let expires = match &file.expires {
        None => None,
        Some(text) => Some(humantime::parse_rfc3339_weak(text).map_err(|_| {
            ConfigError::key(
                key("expires"),
                format!("{text:?} is not an RFC 3339 time like \"2026-12-31T23:59:59Z\""),
            )
        })?),
    };
    let reason = match file.reason.as_deref().map(str::trim) {
        Some("") => return Err(ConfigError::key(key("reason"), "must not be empty")),
        Some(reason) if reason.chars().any(char::is_control) => {
            return Err(ConfigError::key(key("reason"), "must be one line of text"))
        }
        other => other.map(std::sync::Arc::from),
    };
    let rule = AllowRule {
        reason,
        expires,
        name: name.to_string(),
        paths,
        methods,
        cidrs,
        user_ids: identity("user_ids", &file.user_ids)?,
        user_names: identity("user_names", &file.user_names)?,
        domain_ids: identity("domain_ids", &file.domain_ids)?,
    };
    if rule.paths.is_none()
        && rule.methods.is_none()
        && rule.cidrs.is_none()
        && !rule.is_identity_rule()
    {
        return Err(ConfigError::key(
            format!("allow[{index}]"),
            format!("rule {name:?} has no matcher (paths, methods, cidrs, user_ids, user_names or domain_ids): it would let everything through"),
        ));
    }
    Ok(rule)
}

fn validate_route(
    index: usize,
    file: &RouteFile,
    policy: &PolicyConfig,
) -> Result<Route, ConfigError> {
    let key = |field: &str| format!("route[{index}].{field}");
    let name = file.name.trim();
    if name.is_empty() {
        return Err(ConfigError::key(
            key("name"),
            "missing: every route needs a name (it labels metrics)",
        ));
    }
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(ConfigError::key(
            key("name"),
            format!("{name:?}: use up to 64 letters, digits, '-', '_', '.', ':'"),
        ));
    }
    if file.paths.is_empty() {
        return Err(ConfigError::key(
            key("paths"),
            "missing: a route needs at least one path pattern",
        ));
    }
    let paths = file
        .paths
        .iter()
        .enumerate()
        .map(|(i, pattern)| parse_path_pattern(&key(&format!("paths[{i}]")), pattern))
        .collect::<Result<Vec<_>, _>>()?;
    if matches!(file.require, Some(Require::LoginProtect | Require::All))
        && policy.login_protect_methods.is_empty()
    {
        return Err(ConfigError::key(
            key("require"),
            "needs policy.login_protect_methods, which is empty",
        ));
    }
    Ok(Route {
        name: name.to_string(),
        paths,
        require: file.require,
        require_totp_login: file.require_totp_login,
        mode: file.mode,
    })
}

/// `"/exact"` or `"/prefix/**"`; the pattern must itself be a normalised path so that it can
/// match what the normaliser produces.
fn parse_path_pattern(key: &str, pattern: &str) -> Result<PathPattern, ConfigError> {
    let (base, subtree) = match pattern.strip_suffix("/**") {
        Some(base) => (if base.is_empty() { "/" } else { base }, true),
        None => (pattern, false),
    };
    if base.contains('*') {
        return Err(ConfigError::key(
            key,
            format!("{pattern:?}: '*' is only allowed as a final \"/**\""),
        ));
    }
    match path::normalize(base) {
        Ok(normal) if normal == base => {}
        Ok(normal) => {
            return Err(ConfigError::key(
                key,
                format!("{pattern:?} is not a normalised path (did you mean {normal:?}?)"),
            ))
        }
        Err(err) => return Err(ConfigError::key(key, format!("{pattern:?}: {err}"))),
    }
    Ok(if subtree {
        PathPattern::Subtree(base.trim_end_matches('/').to_string())
    } else {
        PathPattern::Exact(base.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[iam]\nendpoint = \"https://iam.myhuaweicloud.eu\"\n";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/mfa-gate/test.toml"))
    }

    fn error(text: &str) -> String {
        load(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = load(MINIMAL).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(config.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.server.max_header_bytes, 65536);
        assert_eq!(config.server.trusted_proxies.len(), 2);
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.upstream.timeout, Duration::from_secs(60));
        assert_eq!(config.iam.provider, ProviderKind::Huawei);
        assert_eq!(config.iam.endpoint, "https://iam.myhuaweicloud.eu");
        assert_eq!(config.iam.timeout, Duration::from_secs(3));
        assert_eq!(config.iam.max_concurrency, 64);
        assert!(config.token.forward);
        assert_eq!(config.policy.require, Require::MfaDevice);
        assert_eq!(config.policy.login_protect_methods, ["vmfa"]);
        assert!(!config.policy.require_totp_login);
        assert_eq!(config.policy.mode, Mode::Enforce);
        assert_eq!(config.policy.on_iam_error, OnIamError::Deny);
        assert_eq!(config.cache.ttl, Duration::from_secs(300));
        assert_eq!(config.cache.negative_ttl, Duration::from_secs(10));
        assert_eq!(config.cache.max_entries, 100_000);
        assert_eq!(config.cache.stale_if_error, Duration::from_secs(300));
        assert!(config.allow.is_empty());
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../config/mfa-gate.toml");
        let config = load(text).unwrap();
        assert_eq!(config.allow[0].name, "health");
        assert_eq!(
            config.allow[0].paths.as_deref().unwrap(),
            [
                PathPattern::Exact("/healthz".into()),
                PathPattern::Subtree("/static".into())
            ]
        );
    }

    #[test]
    fn effective_settings_round_trip_through_toml() {
        let config = load(MINIMAL).unwrap();
        let printed = toml::to_string(&config.effective).unwrap();
        assert!(printed.contains("ttl = \"5m\""), "{printed}");
        let again = load(&printed).unwrap();
        assert_eq!(again.cache.ttl, config.cache.ttl);
    }

    #[test]
    fn unknown_keys_are_refused_with_key_and_line() {
        let message = error(&format!(
            "{MINIMAL}[policy]\nrequire = \"mfa_device\"\nrequre_totp = true\n"
        ));
        assert!(
            message.starts_with("/etc/mfa-gate/test.toml:7: policy"),
            "{message}"
        );
        assert!(message.contains("unknown field `requre_totp`"), "{message}");
        assert!(!message.contains('\n'));
        let message = error(&format!("{MINIMAL}[sever]\nlisten = \"x\"\n"));
        assert!(message.contains("unknown field `sever`"), "{message}");
    }

    #[test]
    fn type_errors_name_the_key() {
        let message = error(&format!("{MINIMAL}[cache]\nttl = \"five minutes\"\n"));
        assert!(message.contains("cache.ttl"), "{message}");
        let message = error(&format!("{MINIMAL}[policy]\nrequire = \"sms\"\n"));
        assert!(message.contains("policy.require"), "{message}");
        assert!(message.contains("unknown variant"), "{message}");
        let message = error(&format!("{MINIMAL}[policy]\nmode = \"audit\"\n"));
        assert!(message.contains("policy.mode"), "{message}");
        let message = error(&format!("{MINIMAL}[policy]\non_iam_error = \"open\"\n"));
        assert!(message.contains("policy.on_iam_error"), "{message}");
        let message = error(&format!("{MINIMAL}[server]\nmax_header_bytes = \"big\"\n"));
        assert!(message.contains("server.max_header_bytes"), "{message}");
        let message = error("[upstream\nurl = 1");
        assert!(
            message.starts_with("/etc/mfa-gate/test.toml:1"),
            "{message}"
        );
    }

    #[test]
    fn required_keys() {
        let message = error("[iam]\nendpoint = \"https://iam.example.com\"\n");
        assert!(message.starts_with("upstream.url: missing"), "{message}");
        let message = error("[upstream]\nurl = \"http://127.0.0.1:3000\"\n");
        assert!(message.starts_with("iam.endpoint: missing"), "{message}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases = [
            ("[server]\nlisten = \"8080\"\n", "server.listen"),
            ("[admin]\nlisten = \"localhost\"\n", "admin.listen"),
            (
                "[server]\nheader_read_timeout = \"0s\"\n",
                "server.header_read_timeout",
            ),
            (
                "[server]\nmax_header_bytes = 10\n",
                "server.max_header_bytes",
            ),
            (
                "[server]\ntrusted_proxies = [\"10.0.0.1/8\"]\n",
                "server.trusted_proxies[0]",
            ),
            (
                "[server]\ntrusted_proxies = [\"nope\"]\n",
                "server.trusted_proxies[0]",
            ),
            (
                "[server]\ntls_cert = \"/nonexistent.crt\"\n",
                "server.tls_key",
            ),
            (
                "[server]\ntls_cert = \"/nonexistent.crt\"\ntls_key = \"/nonexistent.key\"\n",
                "server.tls_cert",
            ),
            (
                "[admin]\ntoken_file = \"/nonexistent/token\"\n",
                "admin.token_file",
            ),
            (
                "[upstream]\nconnect_timeout = \"0s\"\n",
                "upstream.connect_timeout",
            ),
            ("[upstream]\ntimeout = \"0ms\"\n", "upstream.timeout"),
            (
                "[upstream]\nca_file = \"/nonexistent.pem\"\n",
                "upstream.ca_file",
            ),
            ("[iam]\ntimeout = \"0s\"\n", "iam.timeout"),
            ("[iam]\nmax_concurrency = 0\n", "iam.max_concurrency"),
            ("[iam]\ndirectory_id = \"d-1\"\n", "iam.directory_id"),
            (
                "[iam.v5]\nendpoint = \"http://iam.example.com\"\n",
                "iam.v5.endpoint",
            ),
            (
                "[policy]\nlogin_protect_methods = [\"carrier-pigeon\"]\n",
                "policy.login_protect_methods[0]",
            ),
            (
                "[policy]\nrequire = \"login_protect\"\nlogin_protect_methods = []\n",
                "policy.login_protect_methods",
            ),
            ("[cache]\nttl = \"0s\"\n", "cache.ttl"),
            ("[cache]\nnegative_ttl = \"0s\"\n", "cache.negative_ttl"),
            ("[cache]\nmax_entries = 0\n", "cache.max_entries"),
        ];
        for (extra, key) in cases {
            // Later tables of the same name override the minimal ones: build each case fresh.
            let text = merge(extra);
            let err = load(&text).expect_err(extra);
            assert!(
                err.to_string().contains(key),
                "{extra:?}: expected key {key}, got: {err}"
            );
        }
    }

    /// The minimal config with `extra`'s tables merged in (TOML forbids repeating a table or
    /// a key, so the defaults of `[upstream]` and `[iam]` give way to `extra`'s).
    fn merge(extra: &str) -> String {
        let mut upstream = vec![("url", "url = \"http://127.0.0.1:3000\"".to_string())];
        let mut iam = vec![(
            "endpoint",
            "endpoint = \"https://iam.myhuaweicloud.eu\"".to_string(),
        )];
        let mut rest = String::new();
        let mut current = String::new();
        for line in extra.lines() {
            if line.starts_with('[') {
                current = line.to_string();
                if current != "[upstream]" && current != "[iam]" {
                    rest.push_str(line);
                    rest.push('\n');
                }
                continue;
            }
            let key = line.split('=').next().unwrap_or_default().trim();
            let target = match current.as_str() {
                "[upstream]" => &mut upstream,
                "[iam]" => &mut iam,
                _ => {
                    rest.push_str(line);
                    rest.push('\n');
                    continue;
                }
            };
            target.retain(|(k, _)| *k != key);
            target.push(("", line.to_string()));
        }
        let join = |lines: Vec<(&str, String)>| {
            lines.into_iter().map(|(_, l)| l + "\n").collect::<String>()
        };
        format!("[upstream]\n{}[iam]\n{}{rest}", join(upstream), join(iam))
    }

    #[test]
    fn urls_are_checked() {
        for (extra, needle) in [
            (
                "[upstream]\nurl = \"ftp://x\"\n",
                "scheme must be http or https",
            ),
            (
                "[upstream]\nurl = \"http://127.0.0.1:3000/app\"\n",
                "only scheme, host and port",
            ),
            ("[upstream]\nurl = \"not a url\"\n", "upstream.url"),
            (
                "[iam]\nendpoint = \"http://iam.myhuaweicloud.eu\"\n",
                "over https",
            ),
            (
                "[iam]\nendpoint = \"ftp://iam.myhuaweicloud.eu\"\n",
                "iam.endpoint",
            ),
        ] {
            let message = load(&merge(extra)).expect_err(extra).to_string();
            assert!(message.contains(needle), "{extra:?}: {message}");
        }
        for endpoint in [
            "http://127.0.0.1:5000",
            "http://localhost:5000",
            "http://[::1]:5000",
        ] {
            let text = merge(&format!("[iam]\nendpoint = \"{endpoint}\"\n"));
            assert!(load(&text).is_ok(), "{endpoint} is loopback");
        }
    }

    #[test]
    fn allow_rules_are_validated() {
        for (rule, key, needle) in [
            ("paths = [\"/x\"]\n", "allow[0].name", "missing"),
            (
                "name = \"a b\"\npaths = [\"/x\"]\n",
                "allow[0].name",
                "letters",
            ),
            ("name = \"empty\"\n", "allow[0]", "no matcher"),
            ("name = \"p\"\npaths = []\n", "allow[0].paths", "is empty"),
            (
                "name = \"p\"\npaths = [\"x\"]\n",
                "allow[0].paths[0]",
                "start with '/'",
            ),
            (
                "name = \"p\"\npaths = [\"/a/../b\"]\n",
                "allow[0].paths[0]",
                "not a normalised path",
            ),
            (
                "name = \"p\"\npaths = [\"/a/*\"]\n",
                "allow[0].paths[0]",
                "only allowed as a final",
            ),
            (
                "name = \"p\"\npaths = [\"/a%2fb\"]\n",
                "allow[0].paths[0]",
                "encoded",
            ),
            (
                "name = \"m\"\nmethods = [\"G ET\"]\n",
                "allow[0].methods[0]",
                "not an HTTP method",
            ),
            (
                "name = \"c\"\ncidrs = [\"10.0.0.0/33\"]\n",
                "allow[0].cidrs[0]",
                "not a CIDR",
            ),
            (
                "name = \"u\"\nuser_ids = [\"\"]\n",
                "allow[0].user_ids[0]",
                "must not be empty",
            ),
            (
                "name = \"u\"\nuser_names = []\n",
                "allow[0].user_names",
                "is empty",
            ),
            (
                "name = \"u\"\nreasn = \"x\"\npaths = [\"/x\"]\n",
                "allow[0]",
                "unknown field `reasn`",
            ),
            (
                "name = \"u\"\nexpires = \"tomorrow\"\npaths = [\"/x\"]\n",
                "allow[0].expires",
                "RFC 3339",
            ),
            (
                "name = \"u\"\nreason = \"\"\npaths = [\"/x\"]\n",
                "allow[0].reason",
                "must not be empty",
            ),
        ] {
            let message = error(&format!("{MINIMAL}[[allow]]\n{rule}"));
            assert!(message.contains(key), "{rule:?}: {message}");
            assert!(message.contains(needle), "{rule:?}: {message}");
        }
        let message = error(&format!(
            "{MINIMAL}[[allow]]\nname = \"a\"\npaths = [\"/x\"]\n[[allow]]\nname = \"a\"\npaths = [\"/y\"]\n"
        ));
        assert!(message.contains("allow[1].name: duplicate"), "{message}");
    }

    #[test]
    fn assertion_keys_and_lifetimes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("not-a-key.pem"), "hello\n").unwrap();
        let origin = dir.path().join("gate.toml");
        let err = Config::from_toml(
            &format!("{MINIMAL}[identity.assertion]\nkey_file = \"not-a-key.pem\"\n"),
            &origin,
        )
        .unwrap_err();
        assert_eq!(err.key_path(), "identity.assertion.key_file");
        let err = Config::from_toml(
            &format!("{MINIMAL}[identity.assertion]\nkey_file = \"not-a-key.pem\"\nttl = \"5m\"\n"),
            &origin,
        )
        .unwrap_err();
        assert_eq!(err.key_path(), "identity.assertion.ttl");
    }

    #[test]
    fn routes_are_validated() {
        for (route, key, needle) in [
            ("paths = [\"/x/**\"]\n", "route[0].name", "missing"),
            ("name = \"r\"\n", "route[0].paths", "missing"),
            (
                "name = \"r\"\npaths = [\"/x/../y\"]\n",
                "route[0].paths[0]",
                "not a normalised path",
            ),
            (
                "name = \"r\"\npaths = [\"/x\"]\nrequire = \"sms\"\n",
                "route[0].require",
                "unknown variant",
            ),
            (
                "name = \"r\"\npaths = [\"/x\"]\nmod = \"report_only\"\n",
                "route[0]",
                "unknown field `mod`",
            ),
        ] {
            let message = error(&format!("{MINIMAL}[[route]]\n{route}"));
            assert!(message.contains(key), "{route:?}: {message}");
            assert!(message.contains(needle), "{route:?}: {message}");
        }
        let config = load(&format!(
            "{MINIMAL}[[route]]\nname = \"console\"\npaths = [\"/admin/**\"]\nrequire = \"all\"\nmode = \"enforce\"\n"
        ))
        .unwrap();
        assert_eq!(config.routes[0].require, Some(Require::All));
        assert_eq!(config.routes[0].require_totp_login, None);
    }

    #[test]
    fn allow_rules_compile() {
        let config = load(&format!(
            "{MINIMAL}[[allow]]\nname = \"r\"\npaths = [\"/\", \"/**\", \"/a/**\"]\nmethods = [\"get\"]\ncidrs = [\"10.1.2.3\", \"fd00::/8\"]\n[[allow]]\nname = \"bg\"\nuser_ids = [\"u1\"]\n"
        ))
        .unwrap();
        let rule = &config.allow[0];
        assert_eq!(
            rule.paths.as_deref().unwrap(),
            [
                PathPattern::Exact("/".into()),
                PathPattern::Subtree(String::new()),
                PathPattern::Subtree("/a".into())
            ]
        );
        assert_eq!(rule.methods.as_deref().unwrap(), [http::Method::GET]);
        assert_eq!(rule.cidrs.as_ref().unwrap()[0].to_string(), "10.1.2.3/32");
        assert!(!rule.is_identity_rule());
        assert!(config.allow[1].is_identity_rule());
    }

    #[test]
    fn admin_token_file_drops_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin-token"), "s3cret-token\n").unwrap();
        let config = Config::from_toml(
            &format!("{MINIMAL}[admin]\ntoken_file = \"admin-token\"\n"),
            &dir.path().join("gate.toml"),
        )
        .unwrap();
        assert_eq!(config.admin.token.unwrap().0, "s3cret-token");
        assert!(!format!("{:?}", AdminToken("s3cret".into())).contains("s3cret"));
        std::fs::write(dir.path().join("admin-token"), "\n").unwrap();
        let err = Config::from_toml(
            &format!("{MINIMAL}[admin]\ntoken_file = \"admin-token\"\n"),
            &dir.path().join("gate.toml"),
        )
        .unwrap_err();
        assert_eq!(err.key_path(), "admin.token_file");
    }

    #[test]
    fn same_listen_addresses_are_refused_but_port_zero_is_fine() {
        let message = error(&merge("[server]\nlisten = \"127.0.0.1:9090\"\n"));
        assert!(message.contains("admin.listen"), "{message}");
        let text = merge("[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        assert!(load(&text).is_ok());
    }

    #[test]
    fn shared_cache_is_off_by_default_and_reads_its_secrets() {
        assert!(load(MINIMAL).unwrap().shared_cache.is_none());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), format!("{}\n", "k".repeat(32))).unwrap();
        std::fs::write(dir.path().join("password"), "redis-pass\n").unwrap();
        let config = Config::from_toml(
            &format!(
                "{MINIMAL}[cache.shared]\nredis_url = \"rediss://mfa@redis.internal:6380/2\"\nsecret_file = \"secret\"\npassword_file = \"password\"\n"
            ),
            &dir.path().join("gate.toml"),
        )
        .unwrap();
        let shared = config.shared_cache.unwrap();
        assert_eq!(shared.redis_url, "rediss://mfa@redis.internal:6380/2");
        assert_eq!(shared.secret.0, "k".repeat(32).into_bytes());
        assert_eq!(shared.password.unwrap().0, b"redis-pass");
        assert_eq!(shared.key_prefix, "mfa-gate:");
        assert_eq!(shared.command_timeout, Duration::from_millis(100));
        assert_eq!(shared.connect_timeout, Duration::from_secs(1));
        assert_eq!(shared.pool_size, 4);
        assert!(!format!("{:?}", Secret(b"k".to_vec())).contains('k'));
    }

    #[test]
    fn shared_cache_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "k".repeat(32)).unwrap();
        std::fs::write(dir.path().join("short"), "too short\n").unwrap();
        std::fs::write(dir.path().join("ca.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let ok = "redis_url = \"redis://127.0.0.1:6379\"\nsecret_file = \"secret\"\n";
        let cases = [
            (
                "secret_file = \"secret\"\n",
                "cache.shared.redis_url: missing",
            ),
            (
                "redis_url = \"http://127.0.0.1:6379\"\nsecret_file = \"secret\"\n",
                "cache.shared.redis_url: \"http://127.0.0.1:6379\": scheme must be redis or rediss",
            ),
            (
                "redis_url = \"redis://:hunter2@127.0.0.1:6379\"\nsecret_file = \"secret\"\n",
                "cache.shared.redis_url: carries a password",
            ),
            (
                "redis_url = \"redis://127.0.0.1:6379\"\n",
                "cache.shared.secret_file: missing",
            ),
            (
                "redis_url = \"http://u:hunter2@127.0.0.1:6379\"\nsecret_file = \"secret\"\n",
                "cache.shared.redis_url: \"http://***@127.0.0.1:6379\": scheme must be redis or rediss",
            ),
            (
                "redis_url = \"redis://127.0.0.1:6379\"\nsecret_file = \"short\"\n",
                "cache.shared.secret_file: holds 9 bytes; at least 32 are needed",
            ),
            (
                "redis_url = \"redis://127.0.0.1:6379\"\nsecret_file = \"absent\"\n",
                "cache.shared.secret_file: file",
            ),
            (
                &format!("{ok}key_prefix = \"a b\"\n"),
                "cache.shared.key_prefix",
            ),
            (&format!("{ok}pool_size = 0\n"), "cache.shared.pool_size"),
            (
                &format!("{ok}command_timeout = \"0s\"\n"),
                "cache.shared.command_timeout: must be greater than zero",
            ),
            (
                &format!("{ok}ca_file = \"ca.pem\"\n"),
                "cache.shared.ca_file: is only used with rediss://",
            ),
            (&format!("{ok}colour = \"red\"\n"), "unknown field `colour`"),
        ];
        for (shared, needle) in cases {
            let text = format!("{MINIMAL}[cache.shared]\n{shared}");
            let err = Config::from_toml(&text, &dir.path().join("gate.toml"))
                .expect_err(shared)
                .to_string();
            assert!(
                err.contains(needle),
                "{shared:?}: expected {needle:?}, got: {err}"
            );
            assert!(!err.contains("hunter2"), "password echoed: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
