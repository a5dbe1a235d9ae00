//! The Alibaba Cloud CloudSSO provider (`iam.provider = "alibaba_cloudsso"`, CONTRACT §5).
//!
//! Two steps per token:
//!
//! 1. **Who** — the caller's bearer JWT, issued by the organisation's IdP, is verified locally
//!    ([`super::jwt`]): signature against the configured JWKS, `iss`, `aud`, `exp`/`nbf`. The
//!    user id claim (default `sub`) is the CloudSSO `UserId`; the token's `exp` bounds the cache
//!    entry. Nothing about an invalid token is sent anywhere.
//! 2. **MFA** — `GetUserMFAAuthenticationSettings` (seed page 003; RPC style: `POST /` with
//!    `DirectoryId` and `UserId` in the query, `x-acs-action`/`x-acs-version: 2021-05-15`),
//!    signed with the gateway's AccessKey (`ACS3-HMAC-SHA256`, [`super::acs3`]). `Enabled`
//!    counts as MFA (`mfa_device = Some(true)`), `Disabled` does not.
//!
//! Answers and what they mean (`shared/IAM.md`, "Errors"):
//!
//! | answer | result | `outcome` |
//! |---|---|---|
//! | 200 `Enabled` / `Disabled` | valid, with / without MFA | `ok` |
//! | 4xx `EntityNotExists.User` | token invalid (401): the IdP's user is not in the directory | `not_found` |
//! | 400 `Throttling*` | IAM unavailable | `throttled` |
//! | `SignatureDoesNotMatch`, `InvalidAccessKeyId*`, `InvalidSecurityToken*`, `IncompleteSignature` | IAM unavailable, logged at ERROR: the gateway's credentials are wrong, not the caller's | `unauthorized` |
//! | 5xx | IAM unavailable | `server_error` |
//! | anything else, an unparsable body | IAM unavailable | by status / `bad_response` |
//!
//! A credential problem is never read as "token invalid": that would lock every user out with
//! 401s that look like their fault, and get cached as such.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::auth::token::Token;
use crate::iam::acs3::{self, Acs3Request};
use crate::iam::jwt::{HttpsClient, JwksOptions, JwtVerifier, VerifiedJwt, VerifyError};
use crate::iam::{error_chain, IamError, IamProvider, Identity, Needs, TokenStatus, UserFacts};
use crate::metrics::Metrics;

pub use crate::iam::jwt::{
    Algorithm, JwksLocation, JwtSettings, DEFAULT_ALGORITHMS, DEFAULT_LEEWAY, DEFAULT_USER_ID_CLAIM,
};

/// Environment variable with the AccessKey id (the Alibaba Cloud SDKs' name).
pub const ENV_ACCESS_KEY_ID: &str = "ALIBABA_CLOUD_ACCESS_KEY_ID";
/// Environment variable with the AccessKey secret.
pub const ENV_ACCESS_KEY_SECRET: &str = "ALIBABA_CLOUD_ACCESS_KEY_SECRET";
/// Environment variable with an STS security token, for temporary credentials.
pub const ENV_SECURITY_TOKEN: &str = "ALIBABA_CLOUD_SECURITY_TOKEN";

/// The CloudSSO API version of seed page 003.
pub const API_VERSION: &str = "2021-05-15";
/// The action that answers a user's MFA setting (seed page 003).
pub const ACTION: &str = "GetUserMFAAuthenticationSettings";

/// `api` metric label of the MFA settings call (CONTRACT §6).
const API: &str = "cloudsso_mfa_settings";

/// Largest answer read; the real one is under 100 bytes.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest error `Code` kept (they look like `EntityNotExists.User`); bounds what a hostile
/// body can put into logs.
const MAX_CODE_CHARS: usize = 64;

/// How long an idle pooled connection is kept (as for the Huawei client).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// The answer's field and the code for "no such user" (seed page 003, `shared/IAM.md`).
const SETTINGS_FIELD: &str = "UserMFAAuthenticationSettings";
const USER_NOT_FOUND: &str = "EntityNotExists.User";

const X_ACS_ACTION: HeaderName = HeaderName::from_static("x-acs-action");
const X_ACS_VERSION: HeaderName = HeaderName::from_static("x-acs-version");
const X_ACS_DATE: HeaderName = HeaderName::from_static("x-acs-date");
const X_ACS_NONCE: HeaderName = HeaderName::from_static("x-acs-signature-nonce");
const X_ACS_CONTENT_SHA256: HeaderName = HeaderName::from_static("x-acs-content-sha256");
const X_ACS_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-acs-security-token");

/// An Alibaba Cloud AccessKey. `Debug` shows the first characters of the id only; the secret
/// and the security token are never printed.
#[derive(Clone)]
pub struct AccessKey {
    id: String,
    secret: String,
    security_token: Option<String>,
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessKey")
            .field("id", &self.id_hint())
            .field("secret", &"<redacted>")
            .field(
                "security_token",
                &self.security_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl AccessKey {
    /// Checks and wraps the parts: all non-empty; the id and the token must fit in a header
    /// (visible ASCII, and no `,`/`=` in the id, which would break the `Authorization` syntax).
    pub fn new(
        id: impl Into<String>,
        secret: impl Into<String>,
        security_token: Option<String>,
    ) -> anyhow::Result<AccessKey> {
        let (id, secret) = (id.into(), secret.into());
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
        {
            bail!("the AccessKey id is empty or has characters an AccessKey id cannot have");
        }
        if secret.is_empty() {
            bail!("the AccessKey secret is empty");
        }
        if let Some(token) = &security_token {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("the security token is empty or not visible ASCII");
            }
        }
        Ok(AccessKey {
            id,
            secret,
            security_token,
        })
    }

    /// Reads the AccessKey from the two files when configured (both or neither; a trailing
    /// newline or surrounding whitespace is not part of the value), else from
    /// `ALIBABA_CLOUD_ACCESS_KEY_ID` / `ALIBABA_CLOUD_ACCESS_KEY_SECRET`, with
    /// `ALIBABA_CLOUD_SECURITY_TOKEN` (temporary STS credentials) when set. Errors name the
    /// file or variable, never a value.
    pub fn from_env_or_files(
        id_file: Option<&Path>,
        secret_file: Option<&Path>,
    ) -> anyhow::Result<AccessKey> {
        AccessKey::from_sources(id_file, secret_file, |name| std::env::var(name).ok())
    }

    fn from_sources(
        id_file: Option<&Path>,
        secret_file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<AccessKey> {
        match (id_file, secret_file) {
            (Some(id_file), Some(secret_file)) => {
                let id = read_secret_file(id_file, "iam.access_key_id_file")?;
                let secret = read_secret_file(secret_file, "iam.access_key_secret_file")?;
                AccessKey::new(id, secret, None)
                    .context("iam.access_key_id_file / iam.access_key_secret_file")
            }
            (None, None) => {
                let var = |name: &str| {
                    env(name)
                        .map(|value| value.trim().to_owned())
                        .filter(|value| !value.is_empty())
                };
                let id = var(ENV_ACCESS_KEY_ID).with_context(|| {
                    format!(
                        "no AccessKey: set {ENV_ACCESS_KEY_ID} and {ENV_ACCESS_KEY_SECRET}, or \
                         iam.access_key_id_file and iam.access_key_secret_file"
                    )
                })?;
                let secret = var(ENV_ACCESS_KEY_SECRET).with_context(|| {
                    format!("{ENV_ACCESS_KEY_ID} is set but {ENV_ACCESS_KEY_SECRET} is not")
                })?;
                AccessKey::new(id, secret, var(ENV_SECURITY_TOKEN)).with_context(|| {
                    format!("{ENV_ACCESS_KEY_ID} / {ENV_ACCESS_KEY_SECRET} / {ENV_SECURITY_TOKEN}")
                })
            }
            (Some(_), None) => {
                bail!("iam.access_key_id_file is set without iam.access_key_secret_file")
            }
            (None, Some(_)) => {
                bail!("iam.access_key_secret_file is set without iam.access_key_id_file")
            }
        }
    }

    /// The AccessKey id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The start of the id, enough for an operator to tell which key is configured.
    fn id_hint(&self) -> String {
        let prefix: String = self.id.chars().take(4).collect();
        format!("{prefix}****")
    }
}

fn read_secret_file(path: &Path, key: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    let value = text.trim();
    if value.is_empty() {
        bail!("{key}: {} is empty", path.display());
    }
    Ok(value.to_owned())
}

/// Settings of the CloudSSO provider, already validated by the config layer.
#[derive(Debug, Clone)]
pub struct CloudSsoConfig {
    /// `iam.endpoint`, e.g. `https://cloudsso.ap-southeast-1.aliyuncs.com` (no path);
    /// `http://` only on loopback (the simulator).
    pub endpoint: String,
    /// `iam.directory_id`, e.g. `d-00fc2p61****`; also the `X-Auth-Domain-Id`.
    pub directory_id: String,
    /// Budget of one CloudSSO call (permit wait included), and of one JWKS fetch.
    pub timeout: Duration,
    /// CloudSSO calls in flight at once, across all tokens.
    pub max_concurrency: usize,
    pub credentials: AccessKey,
    /// `[iam.jwt]`.
    pub jwt: JwtSettings,
}

/// Builds the pooled HTTP(S) client (rustls with the webpki roots, HTTP/1.1): one per provider,
/// shared by the CloudSSO calls and the JWKS fetches.
pub(crate) fn https_client(timeout: Duration, max_idle: usize) -> anyhow::Result<HttpsClient> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .context("setting up TLS for the CloudSSO client")?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(max_idle)
        .build(https))
}

/// Client of CloudSSO and verifier of the callers' JWTs.
pub struct CloudSsoProvider {
    client: HttpsClient,
    /// Base URL without a trailing `/`.
    endpoint: String,
    /// The `Host` header sent and signed: the endpoint's authority as configured.
    host: String,
    directory_id: String,
    timeout: Duration,
    /// Bounds CloudSSO calls in flight, so a burst of cold tokens cannot get the AccessKey
    /// throttled (`Throttling.User`).
    permits: Arc<Semaphore>,
    max_concurrency: usize,
    credentials: AccessKey,
    verifier: JwtVerifier,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for CloudSsoProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudSsoProvider")
            .field("endpoint", &self.endpoint)
            .field("directory_id", &self.directory_id)
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .field("credentials", &self.credentials)
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl CloudSsoProvider {
    /// Builds the provider. Contacts nothing but a `jwks_file` (read now, so that a broken file
    /// fails start-up); a `jwks_url` is fetched in the background once a tokio runtime runs.
    pub fn new(config: CloudSsoConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        CloudSsoProvider::with_jwks_options(config, JwksOptions::default(), metrics)
    }

    /// [`CloudSsoProvider::new`] with other JWKS refresh timings (tests).
    pub fn with_jwks_options(
        config: CloudSsoConfig,
        jwks: JwksOptions,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let (endpoint, host) = validate_endpoint(&config.endpoint)?;
        if config.directory_id.is_empty() {
            bail!("iam.directory_id must not be empty");
        }
        if config.timeout.is_zero() {
            bail!("iam.timeout must be greater than zero");
        }
        if config.max_concurrency == 0 || config.max_concurrency > Semaphore::MAX_PERMITS {
            bail!(
                "iam.max_concurrency must be between 1 and {}",
                Semaphore::MAX_PERMITS
            );
        }
        let client = https_client(config.timeout, config.max_concurrency)?;
        let verifier = JwtVerifier::new(
            config.jwt,
            client.clone(),
            config.timeout,
            jwks,
            metrics.clone(),
        )?;
        Ok(CloudSsoProvider {
            client,
            endpoint,
            host,
            directory_id: config.directory_id,
            timeout: config.timeout,
            permits: Arc::new(Semaphore::new(config.max_concurrency)),
            max_concurrency: config.max_concurrency,
            credentials: config.credentials,
            verifier,
            metrics,
        })
    }

    /// The JWT verifier (and through it the JWKS source).
    pub fn verifier(&self) -> &JwtVerifier {
        &self.verifier
    }

    async fn lookup_token(&self, token: &Token, needs: Needs) -> Result<TokenStatus, IamError> {
        let jwt = match self.verifier.verify(token.expose()).await {
            Ok(jwt) => jwt,
            Err(VerifyError::Rejected(reason)) => {
                tracing::debug!(%reason, "bearer JWT rejected");
                return Ok(TokenStatus::Invalid);
            }
            Err(VerifyError::Unavailable(err)) => return Err(err),
        };
        // The MFA setting is the only fact CloudSSO has; it answers the policy's `mfa_device`.
        let mfa_device = if needs.mfa_device {
            match self.mfa_settings(&jwt.user_id).await? {
                MfaSettings::Enabled => Some(true),
                MfaSettings::Disabled => Some(false),
                MfaSettings::UnknownUser => {
                    tracing::debug!(
                        user_id = %jwt.user_id,
                        "JWT subject is not a user of the CloudSSO directory"
                    );
                    return Ok(TokenStatus::Invalid);
                }
            }
        } else {
            None
        };
        Ok(TokenStatus::Valid(Arc::new(self.facts(jwt, mfa_device)?)))
    }

    fn facts(&self, jwt: VerifiedJwt, mfa_device: Option<bool>) -> Result<UserFacts, IamError> {
        // Unreachable in practice: a token is at most 16 KiB.
        let identity = Identity::new(
            &jwt.user_id,
            jwt.user_name.as_deref().unwrap_or_default(),
            &self.directory_id,
            "",
        )
        .map_err(|err| bad(format!("JWT subject: {err}")))?;
        Ok(UserFacts {
            // RFC 8176 `otp`: the IdP says this login used a one-time password.
            totp_login: jwt.amr.iter().any(|method| method == "otp"),
            identity,
            expires_at: jwt.expires_at,
            mfa_device,
            login_protect: None,
        })
    }

    /// `GetUserMFAAuthenticationSettings` for one user: waits for a permit, signs, sends, reads
    /// the answer (at most [`MAX_BODY_BYTES`]), all within `timeout`; every call sent is
    /// counted.
    async fn mfa_settings(&self, user_id: &str) -> Result<MfaSettings, IamError> {
        let deadline = Instant::now() + self.timeout;
        let _permit = match tokio::time::timeout_at(deadline, self.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => {
                let err = IamError::Saturated {
                    limit: self.max_concurrency,
                };
                tracing::warn!(api = API, error = %err, "IAM call not sent");
                return Err(err);
            }
        };
        let request = self.request(user_id, SystemTime::now()).map_err(|detail| {
            tracing::warn!(api = API, %detail, "IAM call not sent");
            IamError::Transport { api: API, detail }
        })?;

        let started = Instant::now();
        let answer = tokio::time::timeout_at(deadline, self.exchange(request)).await;
        let elapsed = started.elapsed();
        let (status, result) = match answer {
            Err(_) => (None, Err(IamError::Timeout { api: API })),
            Ok(Err(err)) => (None, Err(err)),
            Ok(Ok((status, body))) => (Some(status), parse_settings(status, &body)),
        };
        let outcome = outcome(&result);
        self.metrics
            .observe_iam(API, outcome, elapsed.as_secs_f64());
        tracing::debug!(
            api = API,
            status = status.map(|s| s.as_u16()),
            outcome,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "IAM call"
        );
        if let Err(err) = &result {
            self.log_failure(status, err);
        }
        result
    }

    fn log_failure(&self, status: Option<StatusCode>, err: &IamError) {
        let status = status.map(|s| s.as_u16());
        let code = match err {
            IamError::Status { code, .. } => code.as_str(),
            _ => "",
        };
        if is_credential_error(code) {
            tracing::error!(
                api = API,
                status,
                code,
                access_key_id = %self.credentials.id_hint(),
                "CloudSSO refused the gateway's AccessKey: the configured credentials (or the \
                 host clock, for the x-acs-date) are wrong; every lookup fails until fixed"
            );
        } else if code.eq_ignore_ascii_case("EntityNotExists.Directory") {
            tracing::error!(
                api = API,
                status,
                code,
                directory_id = %self.directory_id,
                "CloudSSO does not know iam.directory_id"
            );
        } else if status == Some(403) {
            tracing::error!(
                api = API,
                status,
                code,
                "CloudSSO denied the call: grant the AccessKey's RAM identity \
                 cloudsso:GetUserMFAAuthenticationSettings"
            );
        } else {
            tracing::warn!(api = API, status, code, error = %err, "IAM call failed");
        }
    }

    /// The signed request (`shared/IAM.md`, "ACS3-HMAC-SHA256"). `x-acs-content-sha256` is
    /// the hash of the empty body; no `content-type` since no body is sent.
    fn request(&self, user_id: &str, now: SystemTime) -> Result<Request<Empty<Bytes>>, String> {
        let query = [
            ("DirectoryId", self.directory_id.as_str()),
            ("UserId", user_id),
        ];
        let date = humantime::format_rfc3339_seconds(now).to_string();
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let payload_hash = acs3::hex_sha256(b"");
        let mut signed: Vec<(&str, &str)> = vec![
            ("host", &self.host),
            ("x-acs-action", ACTION),
            ("x-acs-version", API_VERSION),
            ("x-acs-date", &date),
            ("x-acs-signature-nonce", &nonce),
            ("x-acs-content-sha256", &payload_hash),
        ];
        if let Some(token) = &self.credentials.security_token {
            signed.push(("x-acs-security-token", token));
        }
        let signature = acs3::sign(
            &Acs3Request {
                method: "POST",
                path: "/",
                query: &query,
                headers: &signed,
                hashed_payload: &payload_hash,
            },
            self.credentials.secret.as_bytes(),
        );
        let uri: Uri = format!("{}/?{}", self.endpoint, acs3::canonical_query(&query))
            .parse()
            .map_err(|err| format!("invalid request URI: {err}"))?;
        let header = |value: &str| {
            HeaderValue::from_str(value).map_err(|_| "header value not representable".to_owned())
        };
        let mut authorization = header(&signature.authorization(&self.credentials.id))?;
        authorization.set_sensitive(true);
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(HOST, header(&self.host)?)
            .header(X_ACS_ACTION, ACTION)
            .header(X_ACS_VERSION, API_VERSION)
            .header(X_ACS_DATE, header(&date)?)
            .header(X_ACS_NONCE, header(&nonce)?)
            .header(X_ACS_CONTENT_SHA256, header(&payload_hash)?)
            .header(AUTHORIZATION, authorization)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("mfa-gate/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &self.credentials.security_token {
            let mut value = header(token)?;
            value.set_sensitive(true);
            builder = builder.header(X_ACS_SECURITY_TOKEN, value);
        }
        builder
            .body(Empty::new())
            .map_err(|err| format!("invalid request: {err}"))
    }

    async fn exchange(
        &self,
        request: Request<Empty<Bytes>>,
    ) -> Result<(StatusCode, Bytes), IamError> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| IamError::Transport {
                api: API,
                detail: error_chain(&err),
            })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|err| {
                if err.downcast_ref::<LengthLimitError>().is_some() {
                    IamError::BadResponse {
                        api: API,
                        detail: format!("body over {MAX_BODY_BYTES} bytes"),
                    }
                } else {
                    IamError::Transport {
                        api: API,
                        detail: error_chain(err.as_ref()),
                    }
                }
            })?
            .to_bytes();
        Ok((status, body))
    }
}

impl IamProvider for CloudSsoProvider {
    fn lookup<'a>(
        &'a self,
        token: &'a Token,
        needs: Needs,
    ) -> BoxFuture<'a, Result<TokenStatus, IamError>> {
        Box::pin(self.lookup_token(token, needs))
    }
}

/// What `GetUserMFAAuthenticationSettings` said.
///
/// Public only for the fuzz targets and their replay in the test suite (`fuzz/`), like
/// [`parse_settings`]; not part of the crate's API.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MfaSettings {
    Enabled,
    Disabled,
    /// `EntityNotExists.User`.
    UnknownUser,
}

/// Reads an answer (seed page 003): `{"RequestId","UserMFAAuthenticationSettings"}` on 200,
/// `{"RequestId","HostId","Code","Message","Recommend"}` otherwise.
///
/// "No such user" is the `Code` exactly as sent, compared case-insensitively: sanitising it for
/// logs first would read `"EntityNotExists.\u0000User"` or `"Entity NotExists.User"` as the
/// documented code.
#[doc(hidden)]
pub fn parse_settings(status: StatusCode, body: &[u8]) -> Result<MfaSettings, IamError> {
    if !status.is_success() {
        let raw = raw_error_code(body);
        if status.is_client_error()
            && raw
                .as_deref()
                .is_some_and(|code| code.eq_ignore_ascii_case(USER_NOT_FOUND))
        {
            return Ok(MfaSettings::UnknownUser);
        }
        return Err(IamError::Status {
            api: API,
            status: status.as_u16(),
            code: sanitise_code(raw.as_deref().unwrap_or_default()),
        });
    }
    let root: Value =
        serde_json::from_slice(body).map_err(|err| bad(format!("not JSON: {err}")))?;
    match root.get(SETTINGS_FIELD) {
        Some(Value::String(value)) if value.eq_ignore_ascii_case("Enabled") => {
            Ok(MfaSettings::Enabled)
        }
        Some(Value::String(value)) if value.eq_ignore_ascii_case("Disabled") => {
            Ok(MfaSettings::Disabled)
        }
        Some(Value::String(_)) => Err(bad(format!("{SETTINGS_FIELD}: unknown value"))),
        Some(_) => Err(bad(format!("{SETTINGS_FIELD}: not a string"))),
        None => Err(bad(format!("{SETTINGS_FIELD}: missing"))),
    }
}

/// The `Code` of an error body exactly as sent, if it has one. Compare this, never
/// [`sanitise_code`]'s output.
fn raw_error_code(body: &[u8]) -> Option<String> {
    let root = serde_json::from_slice::<Value>(body).ok()?;
    root.get("Code").and_then(Value::as_str).map(str::to_owned)
}

/// A code for logs and error messages: cut to printable ASCII of bounded length, so that a
/// hostile body cannot put arbitrary text there.
fn sanitise_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_CODE_CHARS)
        .collect()
}

/// Codes that mean "the gateway's own credentials or signature are wrong".
fn is_credential_error(code: &str) -> bool {
    let lower = code.to_ascii_lowercase();
    lower == "signaturedoesnotmatch"
        || lower == "incompletesignature"
        || lower.starts_with("invalidaccesskeyid")
        || lower.starts_with("invalidsecuritytoken")
}

/// The `outcome` label of a sent call (CONTRACT §6).
fn outcome(result: &Result<MfaSettings, IamError>) -> &'static str {
    match result {
        Ok(MfaSettings::Enabled | MfaSettings::Disabled) => "ok",
        Ok(MfaSettings::UnknownUser) => "not_found",
        Err(IamError::Timeout { .. }) => "timeout",
        Err(IamError::Transport { .. } | IamError::Saturated { .. }) => "transport_error",
        Err(IamError::BadResponse { .. }) => "bad_response",
        Err(IamError::Status { status, code, .. }) => {
            if code.to_ascii_lowercase().starts_with("throttling") {
                "throttled"
            } else if is_credential_error(code) {
                "unauthorized"
            } else {
                match status {
                    401 => "unauthorized",
                    403 => "forbidden",
                    404 => "not_found",
                    429 => "throttled",
                    500..=599 => "server_error",
                    _ => "bad_response",
                }
            }
        }
    }
}

fn bad(detail: String) -> IamError {
    IamError::BadResponse { api: API, detail }
}

/// Checks the endpoint: `https` (or `http` on loopback), a host, no path, query or credentials.
/// Returns the base URL without a trailing `/` and the authority to send as `Host`.
fn validate_endpoint(endpoint: &str) -> anyhow::Result<(String, String)> {
    let trimmed = endpoint.trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .with_context(|| format!("iam.endpoint {endpoint:?} is not a URL"))?;
    let host = uri.host().unwrap_or_default();
    let loopback = {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.eq_ignore_ascii_case("localhost")
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => {}
        Some("http") if loopback => {}
        _ => bail!("iam.endpoint {endpoint:?} must be https:// (http:// only on loopback)"),
    }
    let Some(authority) = uri.authority() else {
        bail!("iam.endpoint {endpoint:?} has no host");
    };
    if authority.as_str().contains('@') {
        bail!("iam.endpoint {endpoint:?} must not carry credentials");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() || trimmed.contains('#') {
        bail!("iam.endpoint {endpoint:?} must be a bare host: CloudSSO calls are POST /");
    }
    Ok((trimmed.to_owned(), authority.as_str().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    /// Seed page 003, the sample success response.
    const SEED_200: &str = r#"{
  "RequestId": "5B598B62-85E6-5792-9DF1-246D251B07DA",
  "UserMFAAuthenticationSettings": "Enabled"
}"#;

    fn err_body(code: &str) -> String {
        serde_json::json!({
            "RequestId": "5B598B62-85E6-5792-9DF1-246D251B07DA",
            "HostId": "cloudsso.ap-southeast-1.aliyuncs.com",
            "Code": code,
            "Message": "…",
            "Recommend": "https://api.aliyun.com/troubleshoot?q=…",
        })
        .to_string()
    }

    #[test]
    fn settings_answers() {
        assert_eq!(
            parse_settings(st(200), SEED_200.as_bytes()).unwrap(),
            MfaSettings::Enabled
        );
        let disabled = r#"{"RequestId":"x","UserMFAAuthenticationSettings":"Disabled"}"#;
        assert_eq!(
            parse_settings(st(200), disabled.as_bytes()).unwrap(),
            MfaSettings::Disabled
        );
        for (body, needle) in [
            (r#"{"RequestId":"x"}"#, "missing"),
            (r#"{"UserMFAAuthenticationSettings":true}"#, "not a string"),
            (
                r#"{"UserMFAAuthenticationSettings":"Maybe"}"#,
                "unknown value",
            ),
            ("<html>", "not JSON"),
        ] {
            match parse_settings(st(200), body.as_bytes()) {
                Err(IamError::BadResponse { detail, .. }) => {
                    assert!(detail.contains(needle), "{detail}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn error_answers_map_to_outcomes() {
        let cases = [
            (
                404,
                "EntityNotExists.User",
                Ok(MfaSettings::UnknownUser),
                "not_found",
            ),
            (
                400,
                "EntityNotExists.User",
                Ok(MfaSettings::UnknownUser),
                "not_found",
            ),
            (404, "EntityNotExists.Directory", Err(()), "not_found"),
            (400, "Throttling.User", Err(()), "throttled"),
            (400, "Throttling", Err(()), "throttled"),
            (400, "Throttling.Api", Err(()), "throttled"),
            (403, "SignatureDoesNotMatch", Err(()), "unauthorized"),
            (404, "InvalidAccessKeyId.NotFound", Err(()), "unauthorized"),
            (400, "InvalidAccessKeyId.Inactive", Err(()), "unauthorized"),
            (400, "InvalidSecurityToken.Expired", Err(()), "unauthorized"),
            (403, "NoPermission", Err(()), "forbidden"),
            (500, "InternalError", Err(()), "server_error"),
            (503, "ServiceUnavailable", Err(()), "server_error"),
            (500, "EntityNotExists.User", Err(()), "server_error"),
            (400, "MissingUserId", Err(()), "bad_response"),
            (429, "", Err(()), "throttled"),
        ];
        for (status, code, expected, label) in cases {
            let result = parse_settings(st(status), err_body(code).as_bytes());
            match (&result, expected) {
                (Ok(got), Ok(want)) => assert_eq!(*got, want),
                (
                    Err(IamError::Status {
                        status: s, code: c, ..
                    }),
                    Err(()),
                ) => {
                    assert_eq!((*s, c.as_str()), (status, code));
                }
                (got, want) => panic!("{status} {code}: {got:?} vs {want:?}"),
            }
            assert_eq!(outcome(&result), label, "{status} {code}");
        }
        // Only the code as sent counts, never what sanitising it for logs leaves
        // (fuzz/regressions/cloudsso_parse/404-code-with-nul).
        for code in [
            "Entity\u{0}NotExists.User",
            "Entity NotExists.User",
            "EntityNotExists.User\n",
            " EntityNotExists.User",
        ] {
            match parse_settings(st(404), err_body(code).as_bytes()) {
                Err(IamError::Status {
                    status: 404, code, ..
                }) => {
                    assert_eq!(code, "EntityNotExists.User")
                }
                other => panic!("{code:?}: {other:?}"),
            }
        }
        assert_eq!(
            parse_settings(st(404), err_body("entitynotexists.user").as_bytes()).unwrap(),
            MfaSettings::UnknownUser
        );
        // A 5xx or an HTML page is never "no such user".
        let result = parse_settings(st(502), b"<html>bad gateway</html>");
        assert!(
            matches!(result, Err(IamError::Status { status: 502, ref code, .. }) if code.is_empty())
        );
        assert_eq!(outcome(&result), "server_error");
        let long = err_body(&format!("Throttling{}", "x\u{1}".repeat(100)));
        match parse_settings(st(400), long.as_bytes()) {
            Err(IamError::Status { code, .. }) => {
                assert_eq!(code.len(), MAX_CODE_CHARS);
                assert!(code.chars().all(|c| c.is_ascii_graphic()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endpoints() {
        for (input, base, host) in [
            (
                "https://cloudsso.ap-southeast-1.aliyuncs.com",
                "https://cloudsso.ap-southeast-1.aliyuncs.com",
                "cloudsso.ap-southeast-1.aliyuncs.com",
            ),
            (
                "https://cloudsso.cn-shanghai.aliyuncs.com/",
                "https://cloudsso.cn-shanghai.aliyuncs.com",
                "cloudsso.cn-shanghai.aliyuncs.com",
            ),
            (
                "http://127.0.0.1:4000",
                "http://127.0.0.1:4000",
                "127.0.0.1:4000",
            ),
            (
                "https://cloudsso.example:8443",
                "https://cloudsso.example:8443",
                "cloudsso.example:8443",
            ),
        ] {
            assert_eq!(
                validate_endpoint(input).unwrap(),
                (base.to_owned(), host.to_owned())
            );
        }
        for bad in [
            "http://cloudsso.ap-southeast-1.aliyuncs.com",
            "https://cloudsso.example/v1",
            "https://cloudsso.example/?a=b",
            "https://ak:sk@cloudsso.example",
            "cloudsso.example",
            "",
        ] {
            assert!(validate_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn access_key_sources() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("id");
        let secret = dir.path().join("secret");
        std::fs::write(&id, "LTAI5tFileKeyId\n").unwrap();
        std::fs::write(&secret, "  file-secret-value\r\n").unwrap();
        let env = |name: &str| match name {
            ENV_ACCESS_KEY_ID => Some("LTAI5tEnvKeyId".to_owned()),
            ENV_ACCESS_KEY_SECRET => Some("env-secret-value".to_owned()),
            ENV_SECURITY_TOKEN => Some("sts-token-value".to_owned()),
            _ => None,
        };
        // Files win, and bring no security token.
        let key = AccessKey::from_sources(Some(&id), Some(&secret), env).unwrap();
        assert_eq!(
            (key.id(), key.secret.as_str(), key.security_token.as_deref()),
            ("LTAI5tFileKeyId", "file-secret-value", None)
        );
        let key = AccessKey::from_sources(None, None, env).unwrap();
        assert_eq!(
            (key.id(), key.secret.as_str(), key.security_token.as_deref()),
            (
                "LTAI5tEnvKeyId",
                "env-secret-value",
                Some("sts-token-value")
            )
        );
        // Debug never shows the secret or the token.
        let shown = format!("{key:?}");
        assert!(
            !shown.contains("secret-value")
                && !shown.contains("sts-token")
                && !shown.contains("EnvKeyId"),
            "{shown}"
        );
        assert!(shown.contains("LTAI****"), "{shown}");

        let err = |result: anyhow::Result<AccessKey>| format!("{:#}", result.unwrap_err());
        let nothing = |_: &str| None;
        assert!(err(AccessKey::from_sources(None, None, nothing)).contains(ENV_ACCESS_KEY_ID));
        let id_only = |name: &str| (name == ENV_ACCESS_KEY_ID).then(|| "LTAI5t".to_owned());
        assert!(err(AccessKey::from_sources(None, None, id_only)).contains(ENV_ACCESS_KEY_SECRET));
        assert!(err(AccessKey::from_sources(Some(&id), None, env))
            .contains("without iam.access_key_secret_file"));
        assert!(err(AccessKey::from_sources(None, Some(&secret), env))
            .contains("without iam.access_key_id_file"));
        let missing = dir.path().join("missing");
        let msg = err(AccessKey::from_sources(Some(&missing), Some(&secret), env));
        assert!(
            msg.contains("iam.access_key_id_file") && msg.contains("missing"),
            "{msg}"
        );
        std::fs::write(&secret, "\n").unwrap();
        assert!(err(AccessKey::from_sources(Some(&id), Some(&secret), env)).contains("is empty"));
        std::fs::write(&secret, "s3cr3t-do-not-print").unwrap();
        std::fs::write(&id, "bad,id").unwrap();
        let msg = err(AccessKey::from_sources(Some(&id), Some(&secret), env));
        assert!(!msg.contains("s3cr3t") && !msg.contains("bad,id"), "{msg}");
        assert!(AccessKey::new("LTAI", "s", Some("tok en".into())).is_err());
    }

    /// Against the CloudSSO simulator and its demo IdP, through real sockets.
    mod with_simulator {
        use super::super::*;
        use crate::dev::cloudsso_sim::{
            Api, CloudSsoSim, Fault, MfaSetting, SigningKey, SimConfig, SimUser,
        };
        use crate::iam::jwt::JwksOptions;
        use serde_json::json;
        use std::net::SocketAddr;

        const ALICE: &str = "u-00q8wbq42wiltcrk0001";
        const BOB: &str = "u-00q8wbq42wiltcrk0002";
        const HOUR: Duration = Duration::from_secs(3600);
        const MFA: Needs = Needs {
            mfa_device: true,
            login_protect: false,
        };

        fn users() -> Vec<SimUser> {
            vec![
                SimUser::new(ALICE, "alice", MfaSetting::Enabled),
                SimUser::new(BOB, "bob", MfaSetting::Disabled),
            ]
        }

        async fn sim() -> CloudSsoSim {
            sim_with(SimConfig::demo()).await
        }

        async fn sim_with(config: SimConfig) -> CloudSsoSim {
            let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
            CloudSsoSim::start(loopback, config, users()).await.unwrap()
        }

        fn config(sim: &CloudSsoSim, timeout: Duration, max_concurrency: usize) -> CloudSsoConfig {
            CloudSsoConfig {
                endpoint: sim.url(),
                directory_id: sim.directory_id().to_owned(),
                timeout,
                max_concurrency,
                credentials: sim.access_key(),
                jwt: sim.jwt_settings(),
            }
        }

        fn provider_with(config: CloudSsoConfig) -> (CloudSsoProvider, Arc<Metrics>) {
            let metrics = Arc::new(Metrics::new());
            let provider = CloudSsoProvider::new(config, metrics.clone()).unwrap();
            (provider, metrics)
        }

        async fn provider(sim: &CloudSsoSim) -> (CloudSsoProvider, Arc<Metrics>) {
            let (provider, metrics) = provider_with(config(sim, Duration::from_secs(5), 8));
            // Wait for the first JWKS load, so that call counts below are exact.
            provider.verifier().jwks().keys().await.unwrap();
            sim.reset_calls();
            (provider, metrics)
        }

        fn count(metrics: &Metrics, api: &str, outcome: &str) -> u64 {
            metrics
                .iam_requests
                .with_label_values(&[api, outcome])
                .get()
        }

        fn facts(status: TokenStatus) -> Arc<UserFacts> {
            match status {
                TokenStatus::Valid(facts) => facts,
                TokenStatus::Invalid => panic!("expected a valid token"),
            }
        }

        async fn lookup(provider: &CloudSsoProvider, token: &str) -> Result<TokenStatus, IamError> {
            provider.lookup(&Token::new(token), MFA).await
        }

        #[tokio::test]
        async fn enabled_and_disabled() {
            let sim = sim().await;
            let (provider, metrics) = provider(&sim).await;
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            let alice = facts(lookup(&provider, &token).await.unwrap());
            assert_eq!(alice.mfa_device, Some(true));
            assert_eq!(alice.login_protect, None);
            assert_eq!(alice.identity.user_id(), ALICE);
            assert_eq!(alice.identity.user_name(), "alice");
            assert_eq!(alice.identity.domain_id(), sim.directory_id());
            let exp = sim.claims_for(ALICE, "alice", HOUR)["exp"]
                .as_u64()
                .unwrap();
            let expires = alice
                .expires_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(expires.abs_diff(exp) <= 2, "{expires} vs {exp}");

            let token = sim.mint(&sim.claims_for(BOB, "bob", HOUR));
            let bob = facts(lookup(&provider, &token).await.unwrap());
            assert_eq!(bob.mfa_device, Some(false));
            assert_eq!(count(&metrics, "cloudsso_mfa_settings", "ok"), 2);
            assert_eq!(sim.calls(Api::MfaSettings), 2);
            assert_eq!(sim.seen_user_ids(), [ALICE, BOB]);
            assert_eq!(sim.calls(Api::Jwks), 0, "the JWKS is cached");

            // The setting changes on the next lookup (the gateway's cache is not in play here).
            sim.set_user(BOB, "bob", Some(MfaSetting::Enabled));
            assert_eq!(
                facts(lookup(&provider, &token).await.unwrap()).mfa_device,
                Some(true)
            );
        }

        #[tokio::test]
        async fn rs256_tokens_and_security_tokens() {
            let mut sim_config = SimConfig::demo();
            sim_config.security_token = Some("CAIS-sts-token-value".to_owned());
            let sim = sim_with(sim_config).await;
            let kid = sim.add_rsa_test_key();
            let (provider, _) = provider(&sim).await;
            let token = sim.mint_with(&kid, &sim.claims_for(ALICE, "alice", HOUR));
            // base64url of `{"alg":"RS256",`
            assert!(token.starts_with("eyJhbGciOiJSUzI1NiIs"), "{token}");
            assert_eq!(
                facts(lookup(&provider, &token).await.unwrap()).mfa_device,
                Some(true)
            );

            // Without the token the simulator refuses the AccessKey.
            let mut config = config(&sim, Duration::from_secs(5), 8);
            config.credentials = AccessKey::new(
                sim.access_key().id(),
                sim.config().access_key_secret.clone(),
                None,
            )
            .unwrap();
            let (bare, metrics) = provider_with(config);
            let err = lookup(&bare, &token).await.unwrap_err();
            assert!(
                matches!(&err, IamError::Status { code, .. } if code.starts_with("InvalidSecurityToken")),
                "{err:?}"
            );
            assert_eq!(count(&metrics, "cloudsso_mfa_settings", "unauthorized"), 1);
        }

        #[tokio::test]
        async fn unknown_users_are_invalid_tokens() {
            let sim = sim().await;
            let (provider, metrics) = provider(&sim).await;
            let token = sim.mint(&sim.claims_for("u-nobody", "nobody", HOUR));
            assert_eq!(
                lookup(&provider, &token).await.unwrap(),
                TokenStatus::Invalid
            );
            assert_eq!(count(&metrics, "cloudsso_mfa_settings", "not_found"), 1);
        }

        #[tokio::test]
        async fn invalid_jwts_never_reach_cloudsso() {
            let sim = sim().await;
            let (provider, metrics) = provider(&sim).await;
            let good = sim.claims_for(ALICE, "alice", HOUR);
            let mut expired = good.clone();
            expired["exp"] = json!(expired["iat"].as_u64().unwrap() - 3600);
            let mut early = good.clone();
            early["nbf"] = json!(good["iat"].as_u64().unwrap() + 600);
            let mut issuer = good.clone();
            issuer["iss"] = json!("https://evil.example.com");
            let mut audience = good.clone();
            audience["aud"] = json!(["someone-else"]);
            let outsider = SigningKey::generate_es256(&sim.current_kid());
            let tokens = [
                sim.mint(&expired),
                sim.mint(&early),
                sim.mint(&issuer),
                sim.mint(&audience),
                outsider.mint(&good),
                crate::dev::cloudsso_sim::encode_jwt(&json!({"alg": "none"}), &good, b""),
                "not-a-jwt".to_owned(),
            ];
            for token in tokens {
                assert_eq!(
                    lookup(&provider, &token).await.unwrap(),
                    TokenStatus::Invalid
                );
            }
            assert_eq!(sim.calls(Api::MfaSettings), 0);
            assert_eq!(sim.calls(Api::Jwks), 0);
            let sent: u64 = crate::metrics::IAM_OUTCOMES
                .iter()
                .map(|outcome| count(&metrics, "cloudsso_mfa_settings", outcome))
                .sum();
            assert_eq!(sent, 0);
        }

        #[tokio::test]
        async fn unknown_kid_refreshes_the_jwks_once_then_rejects() {
            let sim = sim().await;
            let (provider, metrics) = provider(&sim).await;
            let claims = sim.claims_for(ALICE, "alice", HOUR);
            let stranger = SigningKey::generate_es256("kid-nobody-knows");
            assert_eq!(
                lookup(&provider, &stranger.mint(&claims)).await.unwrap(),
                TokenStatus::Invalid
            );
            assert_eq!(sim.calls(Api::Jwks), 1);
            // The first load and the refresh.
            assert_eq!(count(&metrics, "jwks", "ok"), 2);
            // Rate-limited: another unknown kid right after fetches nothing.
            let other = SigningKey::generate_es256("another-unknown-kid");
            assert_eq!(
                lookup(&provider, &other.mint(&claims)).await.unwrap(),
                TokenStatus::Invalid
            );
            assert_eq!(sim.calls(Api::Jwks), 1);
            // Known keys keep working.
            assert!(matches!(
                lookup(&provider, &sim.mint(&claims)).await.unwrap(),
                TokenStatus::Valid(_)
            ));
            assert_eq!(sim.calls(Api::MfaSettings), 1);
        }

        #[tokio::test]
        async fn rotated_keys_are_picked_up() {
            let sim = sim().await;
            let (provider, _) = provider(&sim).await;
            let claims = sim.claims_for(ALICE, "alice", HOUR);
            let before = sim.mint(&claims);
            let old_kid = sim.current_kid();
            let new_kid = sim.rotate_key(true);
            assert_ne!(old_kid, new_kid);
            let after = sim.mint(&claims);
            assert!(matches!(
                lookup(&provider, &after).await.unwrap(),
                TokenStatus::Valid(_)
            ));
            assert_eq!(sim.calls(Api::Jwks), 1);
            // The old key was retired: its tokens now fail (known kid gone → one more refresh
            // would be rate-limited, so the answer is a plain rejection).
            assert_eq!(
                lookup(&provider, &before).await.unwrap(),
                TokenStatus::Invalid
            );
            assert_eq!(sim.calls(Api::Jwks), 1);
        }

        #[tokio::test]
        async fn jwks_outages() {
            let sim = sim().await;
            sim.set_fault(Some(Api::Jwks), Some(Fault::Status(503)));
            let (cold, metrics) = provider_with(config(&sim, Duration::from_secs(5), 8));
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            // No keys at all: IAM unavailable, never "invalid".
            let err = lookup(&cold, &token).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    IamError::Status {
                        api: "jwks",
                        status: 503,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(count(&metrics, "jwks", "server_error") >= 1);
            assert_eq!(sim.calls(Api::MfaSettings), 0);

            // Once loaded, a JWKS outage keeps the known keys, but an unknown kid cannot be
            // decided: unavailable.
            sim.set_fault(Some(Api::Jwks), None);
            let (provider, _) = provider(&sim).await;
            sim.set_fault(Some(Api::Jwks), Some(Fault::Garbage));
            let stranger = SigningKey::generate_es256("rotated-meanwhile");
            let err = lookup(
                &provider,
                &stranger.mint(&sim.claims_for(ALICE, "alice", HOUR)),
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err, IamError::BadResponse { api: "jwks", .. }),
                "{err:?}"
            );
            assert!(matches!(
                lookup(&provider, &token).await.unwrap(),
                TokenStatus::Valid(_)
            ));
        }

        #[tokio::test]
        async fn background_refresh_and_drop() {
            let sim = sim().await;
            let options = JwksOptions {
                refresh_interval: Duration::from_millis(100),
                min_refresh_gap: Duration::from_secs(3600),
            };
            let metrics = Arc::new(Metrics::new());
            let provider = CloudSsoProvider::with_jwks_options(
                config(&sim, Duration::from_secs(5), 8),
                options,
                metrics,
            )
            .unwrap();
            provider.verifier().jwks().keys().await.unwrap();
            sim.rotate_key(true);
            let calls = sim.calls(Api::Jwks);
            while sim.calls(Api::Jwks) < calls + 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            let before = sim.calls(Api::Jwks);
            assert!(matches!(
                lookup(&provider, &token).await.unwrap(),
                TokenStatus::Valid(_)
            ));
            assert_eq!(
                sim.calls(Api::Jwks),
                before,
                "known from the background refresh"
            );

            drop(provider);
            tokio::time::sleep(Duration::from_millis(50)).await;
            let after_drop = sim.calls(Api::Jwks);
            tokio::time::sleep(Duration::from_millis(350)).await;
            assert_eq!(sim.calls(Api::Jwks), after_drop, "the refresh task stopped");
        }

        #[tokio::test]
        async fn jwks_from_a_file() {
            let sim = sim().await;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("jwks.json");
            std::fs::write(&path, sim.jwks().to_string()).unwrap();
            let mut config = config(&sim, Duration::from_secs(5), 8);
            config.jwt.jwks = JwksLocation::File(path.clone());
            let (provider, _) = provider_with(config.clone());
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            assert!(matches!(
                lookup(&provider, &token).await.unwrap(),
                TokenStatus::Valid(_)
            ));
            // Rotation: the file is rewritten; the unknown kid makes it be read again.
            sim.rotate_key(true);
            std::fs::write(&path, sim.jwks().to_string()).unwrap();
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            assert!(matches!(
                lookup(&provider, &token).await.unwrap(),
                TokenStatus::Valid(_)
            ));
            assert_eq!(sim.calls(Api::Jwks), 0);

            // A broken file is a start-up error naming it.
            std::fs::write(&path, "{\"keys\": [{\"kty\": \"oct\", \"k\": \"AA\"}]}").unwrap();
            let err = CloudSsoProvider::new(config.clone(), Arc::new(Metrics::new())).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains("iam.jwt.jwks_file") && msg.contains("no usable signing key"),
                "{msg}"
            );
            config.jwt.jwks = JwksLocation::File(dir.path().join("missing.json"));
            assert!(CloudSsoProvider::new(config, Arc::new(Metrics::new())).is_err());
        }

        #[tokio::test]
        async fn throttling_is_an_iam_error() {
            let sim = sim().await;
            let (provider, metrics) = provider(&sim).await;
            sim.set_fault(Some(Api::MfaSettings), Some(Fault::Throttle));
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            let err = lookup(&provider, &token).await.unwrap_err();
            assert!(
                matches!(&err, IamError::Status { api: "cloudsso_mfa_settings", status: 400, code } if code == "Throttling.User"),
                "{err:?}"
            );
            assert_eq!(count(&metrics, "cloudsso_mfa_settings", "throttled"), 1);

            for (fault, outcome) in [
                (Fault::Status(500), "server_error"),
                (Fault::Status(503), "server_error"),
                (Fault::Garbage, "bad_response"),
                (Fault::MissingFields, "bad_response"),
            ] {
                sim.set_fault(Some(Api::MfaSettings), Some(fault.clone()));
                assert!(lookup(&provider, &token).await.is_err(), "{fault:?}");
                assert!(
                    count(&metrics, "cloudsso_mfa_settings", outcome) >= 1,
                    "{fault:?}"
                );
            }
            sim.set_fault(Some(Api::MfaSettings), Some(Fault::Drop));
            assert!(matches!(
                lookup(&provider, &token).await.unwrap_err(),
                IamError::Transport { .. }
            ));
        }

        #[tokio::test]
        async fn wrong_credentials_are_iam_errors_not_invalid_tokens() {
            let sim = sim().await;
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            let cases = [
                (
                    AccessKey::new(sim.access_key().id(), "not-the-secret", None).unwrap(),
                    403,
                    "SignatureDoesNotMatch",
                ),
                (
                    AccessKey::new("LTAI5tUnknownKeyId", "whatever", None).unwrap(),
                    404,
                    "InvalidAccessKeyId.NotFound",
                ),
            ];
            for (credentials, status, code) in cases {
                let mut config = config(&sim, Duration::from_secs(5), 8);
                config.credentials = credentials;
                let (provider, metrics) = provider_with(config);
                let err = lookup(&provider, &token).await.unwrap_err();
                assert!(
                    matches!(&err, IamError::Status { status: s, code: c, .. } if *s == status && c == code),
                    "{err:?}"
                );
                assert_eq!(count(&metrics, "cloudsso_mfa_settings", "unauthorized"), 1);
                assert!(!err.to_string().contains("not-the-secret"));
            }
        }

        #[tokio::test]
        async fn skipped_when_the_policy_cannot_use_it() {
            let sim = sim().await;
            let (provider, _) = provider(&sim).await;
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            let none = Needs {
                mfa_device: false,
                login_protect: false,
            };
            let facts = facts(provider.lookup(&Token::new(token), none).await.unwrap());
            assert_eq!(facts.mfa_device, None);
            assert_eq!(sim.calls(Api::MfaSettings), 0);
        }

        #[tokio::test]
        async fn a_slow_cloudsso_times_out() {
            let sim = sim().await;
            let (provider, metrics) = provider_with(config(&sim, Duration::from_millis(300), 8));
            provider.verifier().jwks().keys().await.unwrap();
            sim.set_fault(
                Some(Api::MfaSettings),
                Some(Fault::Latency(Duration::from_secs(10))),
            );
            let token = sim.mint(&sim.claims_for(ALICE, "alice", HOUR));
            let started = std::time::Instant::now();
            let err = lookup(&provider, &token).await.unwrap_err();
            let elapsed = started.elapsed();
            assert!(
                matches!(
                    err,
                    IamError::Timeout {
                        api: "cloudsso_mfa_settings"
                    }
                ),
                "{err:?}"
            );
            assert!(
                elapsed >= Duration::from_millis(290) && elapsed < Duration::from_secs(2),
                "{elapsed:?}"
            );
            assert_eq!(count(&metrics, "cloudsso_mfa_settings", "timeout"), 1);
        }

        #[tokio::test]
        async fn in_flight_calls_never_exceed_max_concurrency() {
            let sim = sim().await;
            let (provider, metrics) = provider_with(config(&sim, Duration::from_secs(10), 2));
            provider.verifier().jwks().keys().await.unwrap();
            sim.set_fault(
                Some(Api::MfaSettings),
                Some(Fault::Latency(Duration::from_millis(100))),
            );
            let token = Token::new(sim.mint(&sim.claims_for(ALICE, "alice", HOUR)));
            let lookups = (0..6).map(|_| provider.lookup(&token, MFA));
            for answer in futures_util::future::join_all(lookups).await {
                assert_eq!(facts(answer.unwrap()).mfa_device, Some(true));
            }
            assert_eq!(sim.calls(Api::MfaSettings), 6);
            assert_eq!(sim.max_in_flight(), 2);
            assert_eq!(count(&metrics, "cloudsso_mfa_settings", "ok"), 6);
        }

        #[tokio::test]
        async fn saturation_gives_up_within_the_timeout_without_sending() {
            let sim = sim().await;
            let (holder, metrics) = provider_with(config(&sim, Duration::from_secs(10), 1));
            holder.verifier().jwks().keys().await.unwrap();
            // Same pool and permits, but a short budget.
            let short = CloudSsoProvider {
                client: holder.client.clone(),
                endpoint: holder.endpoint.clone(),
                host: holder.host.clone(),
                directory_id: holder.directory_id.clone(),
                timeout: Duration::from_millis(200),
                permits: holder.permits.clone(),
                max_concurrency: 1,
                credentials: holder.credentials.clone(),
                verifier: JwtVerifier::new(
                    sim.jwt_settings(),
                    holder.client.clone(),
                    Duration::from_secs(5),
                    JwksOptions::default(),
                    metrics.clone(),
                )
                .unwrap(),
                metrics: metrics.clone(),
            };
            short.verifier().jwks().keys().await.unwrap();
            sim.set_fault(
                Some(Api::MfaSettings),
                Some(Fault::Latency(Duration::from_millis(800))),
            );
            let token = Token::new(sim.mint(&sim.claims_for(ALICE, "alice", HOUR)));
            let (first, (second, elapsed, sent)) =
                tokio::join!(holder.lookup(&token, MFA), async {
                    while sim.calls(Api::MfaSettings) == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let started = std::time::Instant::now();
                    let answer = short.lookup(&token, MFA).await;
                    (answer, started.elapsed(), sim.calls(Api::MfaSettings))
                });
            assert_eq!(facts(first.unwrap()).mfa_device, Some(true));
            assert!(matches!(
                second.unwrap_err(),
                IamError::Saturated { limit: 1 }
            ));
            assert!(
                elapsed >= Duration::from_millis(190) && elapsed < Duration::from_secs(2),
                "{elapsed:?}"
            );
            assert_eq!(sent, 1, "the saturated call was never sent");
            assert_eq!(count(&metrics, "cloudsso_mfa_settings", "ok"), 1);
            assert_eq!(sim.max_in_flight(), 1);
        }

        #[tokio::test]
        async fn requests_are_signed_as_documented() {
            let sim = sim().await;
            let (provider, _) = provider(&sim).await;
            let token = sim.mint(&sim.claims_for("u-with*special chars/+", "x", HOUR));
            sim.set_user("u-with*special chars/+", "x", Some(MfaSetting::Enabled));
            assert!(matches!(
                lookup(&provider, &token).await.unwrap(),
                TokenStatus::Valid(_)
            ));
            let seen = sim.last_request().unwrap();
            assert_eq!(seen.method, "POST");
            assert_eq!(seen.path, "/");
            assert_eq!(
                seen.query,
                format!(
                    "DirectoryId={}&UserId=u-with%2Aspecial%20chars%2F%2B",
                    acs3::encode(sim.directory_id())
                )
            );
            assert_eq!(seen.header("x-acs-action"), Some(ACTION));
            assert_eq!(seen.header("x-acs-version"), Some("2021-05-15"));
            assert_eq!(
                seen.header("x-acs-content-sha256"),
                Some(acs3::hex_sha256(b"").as_str())
            );
            assert_eq!(seen.header("host"), Some(sim.addr().to_string().as_str()));
            let date = seen.header("x-acs-date").unwrap();
            assert!(
                humantime::parse_rfc3339(date).is_ok() && date.ends_with('Z') && date.len() == 20,
                "{date}"
            );
            let auth = seen.header("authorization").unwrap();
            assert!(auth.starts_with(&format!("ACS3-HMAC-SHA256 Credential={},SignedHeaders=host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,Signature=", sim.access_key().id())), "{auth}");
            // A second call uses a fresh nonce.
            lookup(&provider, &token).await.unwrap();
            let again = sim.last_request().unwrap();
            assert_ne!(
                again.header("x-acs-signature-nonce"),
                seen.header("x-acs-signature-nonce")
            );
        }
    }
}
