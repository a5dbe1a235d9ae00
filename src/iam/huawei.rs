//! The Huawei Cloud IAM provider (also Open Telekom Cloud, which shares the API).
//!
//! Three calls, two round trips (CONTRACT §5, `shared/IAM.md`):
//!
//! 1. `GET /v3/auth/tokens?nocatalog=true` with the caller's token as both `X-Auth-Token` and
//!    `X-Subject-Token`: a user may verify their own token without any permission, and the answer
//!    names the user, the account (domain), `expires_at` and the login `methods`.
//! 2. Then, in parallel and only for what the policy can use:
//!    `GET /v3.0/OS-MFA/users/{user_id}/virtual-mfa-device` (seed page 000, "Querying the MFA
//!    Device Information of an IAM User": 200 = a device is bound, 404 `IAM.0004` = none) and
//!    `GET /v3.0/OS-USER/users/{user_id}/login-protect` (seed page 002, "Querying the Login
//!    Protection Configuration of an IAM User": 200 = `enabled` + `verification_method`, 404
//!    `Iam.0004` = never configured), each with the user's own token as `X-Auth-Token`.
//!
//! Security rests on one distinction: a definite answer from the IAM (valid with facts, or
//! invalid) versus no usable answer ([`IamError`]). Only 401/404 on the verify call mean "invalid";
//! only a 404 carrying `IAM.0004` (in any case) means "no device" or "no login protection". A 404
//! from a misrouted proxy, a 5xx, a 429, an HTML page or a truncated body is "IAM unavailable" and
//! is never read as either "has MFA" or "has no MFA".
//!
//! The answer parsing is pure — `(status, body bytes) -> result` — so every seed page example is
//! unit-tested without a socket; the network part is one generic `call` that bounds time,
//! concurrency and body size, and counts every call it actually sent.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures_util::future::{join, BoxFuture};
use http::header::{HeaderName, HeaderValue, ACCEPT, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

/// The longest a call waits for one of the `iam.max_concurrency` slots (a quarter of
/// `iam.timeout` if that is shorter).
const MAX_PERMIT_WAIT: std::time::Duration = std::time::Duration::from_millis(250);
use tokio::time::Instant;

use crate::auth::token::Token;
use crate::iam::{
    error_chain, IamError, IamProvider, Identity, LoginProtect, Needs, TokenStatus, UserFacts,
    VerificationMethod,
};
use crate::metrics::Metrics;

/// Largest IAM answer read. A verify answer with `nocatalog=true` is well under 2 KiB; anything
/// near this size is not an answer we can use, and reading it unbounded would let a broken or
/// hostile endpoint exhaust memory.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest error code kept from an error body. Codes look like `IAM.0004` or `APIG.0308`; the
/// cap keeps a hostile body from putting arbitrary text into logs and errors.
const MAX_CODE_CHARS: usize = 64;

/// How long an idle pooled connection to the IAM is kept: long enough to spare most TLS
/// handshakes under steady traffic, shorter than typical load-balancer idle timeouts.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// The code Huawei IAM answers with a 404 for "could not find" — here: no device bound, or login
/// protection never configured. Seed page 002 spells it `Iam.0004`, so it is compared
/// case-insensitively.
const NOT_FOUND_CODE: &str = "IAM.0004";

/// The verify path. `nocatalog=true` leaves out the service catalog, which is large and unused.
const VERIFY_PATH: &str = "/v3/auth/tokens?nocatalog=true";

const X_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-auth-token");
const X_SUBJECT_TOKEN: HeaderName = HeaderName::from_static("x-subject-token");

/// Settings of the Huawei provider, already validated by the config layer.
#[derive(Debug, Clone)]
pub struct HuaweiConfig {
    /// Base URL, e.g. `https://iam.myhuaweicloud.eu`; `http://` only for the loopback simulator
    /// (the config layer enforces that). A trailing `/` is tolerated.
    pub endpoint: String,
    /// Budget of one IAM call: waiting for a concurrency permit, connecting, sending and reading
    /// the whole answer.
    pub timeout: Duration,
    /// IAM calls in flight at once, across all tokens. Beyond it a call waits for a permit, but
    /// never past its own deadline.
    pub max_concurrency: usize,
}

/// Client of the Huawei Cloud IAM APIs of CONTRACT §5.
pub struct HuaweiProvider {
    /// One pooled client for all calls: keep-alive spares a TLS handshake per lookup.
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// Base URL without a trailing `/`; paths are appended to it.
    endpoint: String,
    timeout: Duration,
    /// Bounds IAM calls in flight, so that a burst of cold tokens cannot open thousands of
    /// connections to the IAM or get the account throttled (429 `IAM.0012`).
    permits: Arc<Semaphore>,
    max_concurrency: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for HuaweiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HuaweiProvider")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl HuaweiProvider {
    /// Builds the client. Contacts nothing: connections are opened on the first lookup.
    pub fn new(config: HuaweiConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let endpoint = validate_endpoint(&config.endpoint)?;
        if config.timeout.is_zero() {
            bail!("iam.timeout must be greater than zero");
        }
        if config.max_concurrency == 0 || config.max_concurrency > Semaphore::MAX_PERMITS {
            bail!(
                "iam.max_concurrency must be between 1 and {}",
                Semaphore::MAX_PERMITS
            );
        }

        let mut http = HttpConnector::new();
        // Lets the TLS wrapper hand `https://` URIs to this connector.
        http.enforce_http(false);
        // Requests are one small write each; Nagle would only add latency.
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        // Ring explicitly, rather than whatever process-wide provider happens to be installed.
        // HTTP/1.1 only: the IAM and the simulator both speak it, and the pool gives one
        // connection per concurrent call, which `max_concurrency` already bounds.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .context("setting up TLS for the IAM client")?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(config.max_concurrency)
            .build(https);

        Ok(HuaweiProvider {
            client,
            endpoint,
            timeout: config.timeout,
            permits: Arc::new(Semaphore::new(config.max_concurrency)),
            max_concurrency: config.max_concurrency,
            metrics,
        })
    }

    async fn lookup_token(&self, token: &Token, needs: Needs) -> Result<TokenStatus, IamError> {
        let Some(token) = token_header(token) else {
            // No IAM ever issued a token that is not a valid header value.
            tracing::debug!("token is not a valid header value; not sent to the IAM");
            return Ok(TokenStatus::Invalid);
        };

        let verified = match self
            .call(
                Api::VerifyToken,
                VERIFY_PATH.to_owned(),
                &token,
                true,
                parse_verify,
            )
            .await?
        {
            Verified::Invalid => return Ok(TokenStatus::Invalid),
            Verified::Valid(verified) => verified,
        };

        let user_id_field = verified.identity.user_id();
        let user_id: &str = &user_id_field;
        let segment = encode_segment(user_id);
        let device = async {
            if !needs.mfa_device {
                return Ok(None);
            }
            let path = format!("/v3.0/OS-MFA/users/{segment}/virtual-mfa-device");
            self.call(Api::MfaDevice, path, &token, false, |status, body| {
                parse_mfa_device(status, body, user_id)
            })
            .await
            .map(Some)
        };
        let protect = async {
            if !needs.login_protect {
                return Ok(None);
            }
            let path = format!("/v3.0/OS-USER/users/{segment}/login-protect");
            self.call(Api::LoginProtect, path, &token, false, |status, body| {
                parse_login_protect(status, body, user_id)
            })
            .await
            .map(Some)
        };
        // `join`, not `try_join`: a failure of one must not cancel the other mid-flight, so that
        // every call sent is also counted and logged with its real outcome.
        let (device, protect) = join(device, protect).await;
        let mfa_device = device?;
        let login_protect = protect?;

        Ok(TokenStatus::Valid(Arc::new(UserFacts {
            identity: verified.identity,
            expires_at: verified.expires_at,
            totp_login: verified.totp_login,
            mfa_device,
            login_protect,
        })))
    }

    /// One IAM call: waits for a permit, sends `GET {endpoint}{path}`, reads the answer (at most
    /// [`MAX_BODY_BYTES`]) and hands status and body to `parse`, all within `timeout`. Every call
    /// that was sent is counted in the metrics, whatever its fate.
    async fn call<T>(
        &self,
        api: Api,
        path: String,
        token: &HeaderValue,
        as_subject: bool,
        parse: impl FnOnce(StatusCode, &[u8]) -> Result<T, IamError>,
    ) -> Result<T, IamError> {
        let deadline = Instant::now() + self.timeout;
        // A short wait for a permit absorbs a burst of fresh tokens; past it a saturated
        // gateway answers "IAM unavailable" at once instead of growing a queue that the IAM
        // could never drain within the callers' patience.
        let permit_deadline = Instant::now() + (self.timeout / 4).min(MAX_PERMIT_WAIT);
        let _permit = match tokio::time::timeout_at(permit_deadline, self.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed; treat it like saturation if it ever were.
            Ok(Err(_)) | Err(_) => {
                let err = IamError::Saturated {
                    limit: self.max_concurrency,
                };
                tracing::warn!(api = api.as_str(), error = %err, "IAM call not sent");
                return Err(err);
            }
        };

        let request = self.request(&path, token, as_subject).map_err(|detail| {
            tracing::warn!(api = api.as_str(), %detail, "IAM call not sent");
            IamError::Transport {
                api: api.as_str(),
                detail,
            }
        })?;

        let started = Instant::now();
        let answer = tokio::time::timeout_at(deadline, self.exchange(api, request)).await;
        let elapsed = started.elapsed();

        let (status, result) = match answer {
            Err(_) => (None, Err(IamError::Timeout { api: api.as_str() })),
            Ok(Err(err)) => (None, Err(err)),
            Ok(Ok((status, body))) => (Some(status), parse(status, &body)),
        };
        let outcome = outcome(status, &result);
        self.metrics
            .observe_iam(api.as_str(), outcome.as_str(), elapsed.as_secs_f64());
        tracing::debug!(
            api = api.as_str(),
            status = status.map(|s| s.as_u16()),
            outcome = outcome.as_str(),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "IAM call"
        );
        if let Err(err) = &result {
            let code = match err {
                IamError::Status { code, .. } => code.as_str(),
                _ => "",
            };
            tracing::warn!(
                api = api.as_str(),
                status = status.map(|s| s.as_u16()),
                code,
                error = %err,
                "IAM call failed"
            );
        }
        result
    }

    /// The request of one call. Fails only if the URI does not parse, which the validated
    /// endpoint and the encoded user id rule out; it is still an error, never a panic.
    fn request(
        &self,
        path: &str,
        token: &HeaderValue,
        as_subject: bool,
    ) -> Result<Request<Empty<Bytes>>, String> {
        let uri: Uri = format!("{}{}", self.endpoint, path)
            .parse()
            .map_err(|err| format!("invalid request URI: {err}"))?;
        let mut builder = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("mfa-gate/", env!("CARGO_PKG_VERSION")))
            .header(X_AUTH_TOKEN, token.clone());
        if as_subject {
            builder = builder.header(X_SUBJECT_TOKEN, token.clone());
        }
        builder
            .body(Empty::new())
            .map_err(|err| format!("invalid request: {err}"))
    }

    /// Sends the request and reads the whole answer with the size limit.
    async fn exchange(
        &self,
        api: Api,
        request: Request<Empty<Bytes>>,
    ) -> Result<(StatusCode, Bytes), IamError> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| IamError::Transport {
                api: api.as_str(),
                detail: error_chain(&err),
            })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|err| {
                if err.downcast_ref::<LengthLimitError>().is_some() {
                    IamError::BadResponse {
                        api: api.as_str(),
                        detail: format!("body over {MAX_BODY_BYTES} bytes"),
                    }
                } else {
                    IamError::Transport {
                        api: api.as_str(),
                        detail: error_chain(err.as_ref()),
                    }
                }
            })?
            .to_bytes();
        Ok((status, body))
    }
}

impl IamProvider for HuaweiProvider {
    fn lookup<'a>(
        &'a self,
        token: &'a Token,
        needs: Needs,
    ) -> BoxFuture<'a, Result<TokenStatus, IamError>> {
        Box::pin(self.lookup_token(token, needs))
    }
}

/// The three Huawei APIs, named as the `api` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    VerifyToken,
    MfaDevice,
    LoginProtect,
}

impl Api {
    fn as_str(self) -> &'static str {
        match self {
            Api::VerifyToken => "verify_token",
            Api::MfaDevice => "mfa_device",
            Api::LoginProtect => "login_protect",
        }
    }
}

/// The `outcome` label of `mfa_gate_iam_requests_total` (CONTRACT §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    NotFound,
    Unauthorized,
    Forbidden,
    Throttled,
    ServerError,
    Timeout,
    TransportError,
    BadResponse,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::Throttled => "throttled",
            Outcome::ServerError => "server_error",
            Outcome::Timeout => "timeout",
            Outcome::TransportError => "transport_error",
            Outcome::BadResponse => "bad_response",
        }
    }
}

/// The outcome of a sent call: what went wrong on the way first, then an unusable body, then the
/// HTTP status (so a 404 counts as `not_found` whether or not it meant "no device").
fn outcome<T>(status: Option<StatusCode>, result: &Result<T, IamError>) -> Outcome {
    match result {
        Err(IamError::Timeout { .. }) => return Outcome::Timeout,
        Err(IamError::Transport { .. }) => return Outcome::TransportError,
        Err(IamError::BadResponse { .. }) => return Outcome::BadResponse,
        Err(IamError::Status { .. } | IamError::Saturated { .. }) | Ok(_) => {}
    }
    let Some(status) = status else {
        return Outcome::TransportError;
    };
    match status.as_u16() {
        200..=299 => Outcome::Ok,
        401 => Outcome::Unauthorized,
        403 => Outcome::Forbidden,
        404 => Outcome::NotFound,
        429 => Outcome::Throttled,
        500..=599 => Outcome::ServerError,
        _ => Outcome::BadResponse,
    }
}

/// What the verify call learnt about a token.
///
/// Public only for the fuzz targets and their replay in the test suite (`fuzz/`), like the
/// `parse_*` functions below; not part of the crate's API.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    Valid(VerifiedToken),
    /// 401 or 404: the IAM does not know the token (unknown, expired, revoked). Which of the two
    /// an expired token gets is undocumented; Keystone answers 404.
    Invalid,
}

#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub identity: Identity,
    pub expires_at: SystemTime,
    pub totp_login: bool,
}

/// Reads the answer of `GET /v3/auth/tokens`.
///
/// Required: `token.user.{id,name}`, the domain (`token.user.domain`, else `token.domain`, each
/// with `id` and `name`) and `token.expires_at`. `token.methods` may be absent (then the token
/// does not count as an MFA login, the fail-closed reading) but not ill-typed.
#[doc(hidden)]
pub fn parse_verify(status: StatusCode, body: &[u8]) -> Result<Verified, IamError> {
    const API: Api = Api::VerifyToken;
    match status.as_u16() {
        200..=299 => {}
        401 | 404 => return Ok(Verified::Invalid),
        _ => return Err(status_error(API, status, body)),
    }
    let root = json(API, body)?;
    let token = object(API, root.get("token"), "token")?;
    let user = object(API, token.get("user"), "token.user")?;
    let user_id = string(API, user, "id", "token.user.id")?;
    // The user id becomes a path segment of the next calls; an empty or dot segment would
    // address another resource than this user's.
    if matches!(user_id, "" | "." | "..") {
        return Err(bad(API, format!("token.user.id is unusable: {user_id:?}")));
    }
    let user_name = string(API, user, "name", "token.user.name")?;
    let domain = match user.get("domain") {
        Some(domain) => object(API, Some(domain), "token.user.domain")?,
        None => object(API, token.get("domain"), "token.domain")?,
    };
    let domain_id = string(API, domain, "id", "token.user.domain.id")?;
    let domain_name = string(API, domain, "name", "token.user.domain.name")?;
    let expires_at = string(API, token, "expires_at", "token.expires_at")?;
    // Huawei writes `2020-09-05T06:50:44.390000Z`; the weak parser also takes it without the
    // fraction or the `Z` (always UTC).
    let expires_at = humantime::parse_rfc3339_weak(expires_at)
        .map_err(|err| bad(API, format!("token.expires_at: {err}")))?;
    let totp_login = match token.get("methods") {
        None | Some(Value::Null) => false,
        Some(Value::Array(methods)) => {
            let mut totp = false;
            for method in methods {
                let method = method
                    .as_str()
                    .ok_or_else(|| bad(API, "token.methods: not a list of strings".to_owned()))?;
                totp |= method == "totp";
            }
            totp
        }
        Some(_) => return Err(bad(API, "token.methods: not a list".to_owned())),
    };
    Ok(Verified::Valid(VerifiedToken {
        identity: Identity::new(user_id, user_name, domain_id, domain_name)
            .map_err(|err| bad(API, format!("token.user: {err}")))?,
        expires_at,
        totp_login,
    }))
}

/// Reads the answer of `GET /v3.0/OS-MFA/users/{user_id}/virtual-mfa-device` (seed page 000):
/// `true` when a device is bound, `false` on 404 `IAM.0004`. The serial number is opaque and
/// unused.
#[doc(hidden)]
pub fn parse_mfa_device(status: StatusCode, body: &[u8], user_id: &str) -> Result<bool, IamError> {
    const API: Api = Api::MfaDevice;
    if !status.is_success() {
        return if is_not_found(status, body) {
            Ok(false)
        } else {
            Err(status_error(API, status, body))
        };
    }
    let root = json(API, body)?;
    let device = object(API, root.get("virtual_mfa_device"), "virtual_mfa_device")?;
    same_user(API, device, "virtual_mfa_device.user_id", user_id)?;
    Ok(true)
}

/// Reads the answer of `GET /v3.0/OS-USER/users/{user_id}/login-protect` (seed page 002):
/// the setting on 200, `None` on 404 `IAM.0004` (never configured).
///
/// `verification_method` is lowercased (the IAM writes `SMS` as well as `sms`). It may be
/// absent only when `enabled` is false (then it reads as `none`): a disabled setting grants
/// nothing, so leniency there cannot let anyone through.
#[doc(hidden)]
pub fn parse_login_protect(
    status: StatusCode,
    body: &[u8],
    user_id: &str,
) -> Result<Option<LoginProtect>, IamError> {
    const API: Api = Api::LoginProtect;
    if !status.is_success() {
        return if is_not_found(status, body) {
            Ok(None)
        } else {
            Err(status_error(API, status, body))
        };
    }
    let root = json(API, body)?;
    let protect = object(API, root.get("login_protect"), "login_protect")?;
    same_user(API, protect, "login_protect.user_id", user_id)?;
    let enabled = match protect.get("enabled") {
        Some(Value::Bool(enabled)) => *enabled,
        Some(_) => return Err(bad(API, "login_protect.enabled: not a boolean".to_owned())),
        None => return Err(bad(API, "login_protect.enabled: missing".to_owned())),
    };
    let method = match protect.get("verification_method") {
        None | Some(Value::Null) if !enabled => VerificationMethod::None,
        _ => VerificationMethod::from_iam(string(
            API,
            protect,
            "verification_method",
            "login_protect.verification_method",
        )?),
    };
    Ok(Some(LoginProtect { enabled, method }))
}

/// Whether a non-2xx answer is Huawei's "could not find": a 404 with code `IAM.0004` in any
/// case. A bare 404 (a proxy's, an HTML page) is no evidence that the user has no MFA.
///
/// The code is compared as the IAM sent it, not as [`error_code`] sanitises it for logs: the
/// sanitised form drops spaces and control characters, which would read `"I AM.0004"` or
/// `"IAM.0004\u0000"` — not the documented code, so no definite answer — as "no device".
fn is_not_found(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::NOT_FOUND
        && raw_error_code(body).is_some_and(|code| code.eq_ignore_ascii_case(NOT_FOUND_CODE))
}

/// The error for a status the caller cannot use, with the IAM's error code if the body has one.
fn status_error(api: Api, status: StatusCode, body: &[u8]) -> IamError {
    IamError::Status {
        api: api.as_str(),
        status: status.as_u16(),
        code: error_code(body),
    }
}

/// The error code of an IAM error body exactly as sent, if it has one. Both shapes are seen:
/// Huawei's `{"error_msg","error_code"}` and Keystone's `{"error":{"code","message","title"}}`,
/// whose `code` is the HTTP status as a number. Compare this, never [`error_code`]'s output.
fn raw_error_code(body: &[u8]) -> Option<String> {
    let root = serde_json::from_slice::<Value>(body).ok()?;
    match root.get("error_code") {
        Some(Value::String(code)) => Some(code.clone()),
        _ => match root.get("error").and_then(|error| error.get("code")) {
            Some(Value::String(code)) => Some(code.clone()),
            Some(Value::Number(code)) => Some(code.to_string()),
            _ => None,
        },
    }
}

/// The error code of an IAM error body for logs and error messages, or `""`: [`raw_error_code`]
/// cut to printable ASCII of bounded length, so that a hostile body cannot put arbitrary text
/// there. For display only; decisions compare the raw code.
fn error_code(body: &[u8]) -> String {
    raw_error_code(body)
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_CODE_CHARS)
        .collect()
}

/// Checks that an answer is about the user that was asked about.
fn same_user(
    api: Api,
    object: &Map<String, Value>,
    name: &'static str,
    user_id: &str,
) -> Result<(), IamError> {
    let answered = string(api, object, "user_id", name)?;
    if answered != user_id {
        return Err(bad(api, format!("{name} is not the user asked about")));
    }
    Ok(())
}

fn json(api: Api, body: &[u8]) -> Result<Value, IamError> {
    serde_json::from_slice(body).map_err(|err| bad(api, format!("not JSON: {err}")))
}

fn object<'a>(
    api: Api,
    value: Option<&'a Value>,
    name: &'static str,
) -> Result<&'a Map<String, Value>, IamError> {
    match value {
        Some(Value::Object(object)) => Ok(object),
        Some(_) => Err(bad(api, format!("{name}: not an object"))),
        None => Err(bad(api, format!("{name}: missing"))),
    }
}

fn string<'a>(
    api: Api,
    object: &'a Map<String, Value>,
    key: &str,
    name: &'static str,
) -> Result<&'a str, IamError> {
    match object.get(key) {
        Some(Value::String(value)) => Ok(value),
        Some(_) => Err(bad(api, format!("{name}: not a string"))),
        None => Err(bad(api, format!("{name}: missing"))),
    }
}

fn bad(api: Api, detail: String) -> IamError {
    IamError::BadResponse {
        api: api.as_str(),
        detail,
    }
}

/// The token as a header value, marked sensitive (kept out of `Debug` output and HPACK tables).
/// `None` for a token that cannot be a header value.
fn token_header(token: &Token) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(token.expose()).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Percent-encodes a path segment: everything but RFC 3986 unreserved characters, so that a
/// user id can never add a segment, a query or a fragment.
fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// Checks and normalises the endpoint: `http` or `https`, a host, no query; a trailing `/` is
/// dropped because paths are appended to it.
fn validate_endpoint(endpoint: &str) -> anyhow::Result<String> {
    let trimmed = endpoint.trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .with_context(|| format!("iam.endpoint {endpoint:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("https" | "http") => {}
        _ => bail!("iam.endpoint {endpoint:?} must start with https://"),
    }
    match uri.host() {
        Some(host) if !host.is_empty() => {}
        _ => bail!("iam.endpoint {endpoint:?} has no host"),
    }
    if uri.query().is_some() || trimmed.contains('#') {
        bail!("iam.endpoint {endpoint:?} must not have a query or fragment");
    }
    if uri
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        bail!("iam.endpoint {endpoint:?} must not carry credentials");
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed page 000, 200 example.
    const DEVICE_200: &str = r#"{
"virtual_mfa_device" :
{
"user_id" : "16b26081f43d4c628c4bb88cf32e9...",
"serial_number" : "iam:16b26081f43d4c628c4bb88cf32e9..."
}
}"#;
    /// Seed page 002, 200 example.
    const PROTECT_200: &str = r#"{
"login_protect" : {
"user_id" : "16b26081f43d4c628c4bb88cf32e9...",
"enabled" : true,
"verification_method" : "vmfa"
}
}"#;
    /// Seed pages 000 and 002, 403 example 1.
    const ERR_403_0002: &str = r#"{
"error_msg" : "You are not authorized to perform the requested action.",
"error_code" : "IAM.0002"
}"#;
    /// Seed pages 000 and 002, 403 example 2.
    const ERR_403_0003: &str = r#"{
"error_msg" : "Policy doesn't allow %(actions)s to be performed.",
"error_code" : "IAM.0003"
}"#;
    /// Seed page 000, 404 example.
    const ERR_404_UPPER: &str = r#"{
"error_msg" : "Could not find %(target)s: %(target_id)s.",
"error_code" : "IAM.0004"
}"#;
    /// Seed page 002, 404 example (note the spelling).
    const ERR_404_MIXED: &str = r#"{
"error_msg" : "Could not find %(target)s: %(target_id)s.",
"error_code" : "Iam.0004"
}"#;
    /// Seed pages 000 and 002, 500 example.
    const ERR_500: &str = r#"{
"error_msg" : "An unexpected error prevented the server from fulfilling your request.",
"error_code" : "IAM.0006"
}"#;
    const KEYSTONE_404: &str =
        r#"{"error":{"code":404,"message":"Could not find token.","title":"Not Found"}}"#;
    const KEYSTONE_403: &str =
        r#"{"error":{"code":"IAM.0002","message":"not authorized","title":"Forbidden"}}"#;
    const HTML: &str = "<html><body><h1>502 Bad Gateway</h1></body></html>";
    const SEED_USER: &str = "16b26081f43d4c628c4bb88cf32e9...";

    /// `shared/IAM.md`, the verify example.
    const VERIFY_200: &str = r#"{"token":{"methods":["password","totp"],
 "expires_at":"2020-09-05T06:50:44.390000Z","issued_at":"2020-09-04T06:50:44.390000Z",
 "user":{"domain":{"id":"e6505630658e49649784759cdf251...","name":"domain A"},
         "id":"092ac6365a0025b11f76c01e90100...","name":"user A","password_expires_at":""},
 "domain":{"id":"e6505630658e49649784759cdf251...","name":"domain A"},
 "roles":[{"name":"role1","id":"roleid1"}]}}"#;

    fn st(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    fn expect_bad<T: std::fmt::Debug>(result: Result<T, IamError>, needle: &str) {
        match result {
            Err(IamError::BadResponse { detail, .. }) => {
                assert!(detail.contains(needle), "{detail:?} lacks {needle:?}")
            }
            other => panic!("expected BadResponse, got {other:?}"),
        }
    }

    fn expect_status<T: std::fmt::Debug>(
        result: Result<T, IamError>,
        api: &str,
        status: u16,
        code: &str,
    ) {
        match result {
            Err(IamError::Status {
                api: a,
                status: s,
                code: c,
            }) => assert_eq!((a, s, c.as_str()), (api, status, code)),
            other => panic!("expected Status, got {other:?}"),
        }
    }

    fn valid(result: Result<Verified, IamError>) -> VerifiedToken {
        match result {
            Ok(Verified::Valid(token)) => token,
            other => panic!("expected a valid token, got {other:?}"),
        }
    }

    fn verify_body(token: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "token": token })).unwrap()
    }

    fn base_token() -> serde_json::Value {
        serde_json::json!({
            "methods": ["password"],
            "expires_at": "2020-09-05T06:50:44.390000Z",
            "user": {"id": "u1", "name": "alice", "domain": {"id": "d1", "name": "acme"}}
        })
    }

    // ---- verify -------------------------------------------------------------------------------

    #[test]
    fn verify_reads_the_documented_answer() {
        let token = valid(parse_verify(st(200), VERIFY_200.as_bytes()));
        assert_eq!(
            token.identity,
            Identity::new(
                "092ac6365a0025b11f76c01e90100...",
                "user A",
                "e6505630658e49649784759cdf251...",
                "domain A"
            )
            .unwrap()
        );
        assert!(token.totp_login);
        assert_eq!(
            token.expires_at,
            humantime::parse_rfc3339("2020-09-05T06:50:44.390Z").unwrap()
        );
    }

    #[test]
    fn verify_timestamp_with_and_without_fraction() {
        let expected = humantime::parse_rfc3339("2020-09-05T06:50:44Z").unwrap();
        for stamp in [
            "2020-09-05T06:50:44Z",
            "2020-09-05T06:50:44.000000Z",
            "2020-09-05T06:50:44",
        ] {
            let mut token = base_token();
            token["expires_at"] = stamp.into();
            let parsed = valid(parse_verify(st(200), &verify_body(token)));
            assert_eq!(parsed.expires_at, expected, "{stamp}");
        }
        let mut token = base_token();
        token["expires_at"] = "tomorrow".into();
        expect_bad(parse_verify(st(200), &verify_body(token)), "expires_at");
    }

    #[test]
    fn verify_totp_only_from_methods() {
        let token = valid(parse_verify(st(200), &verify_body(base_token())));
        assert!(!token.totp_login);
        let mut without = base_token();
        without.as_object_mut().unwrap().remove("methods");
        assert!(!valid(parse_verify(st(200), &verify_body(without))).totp_login);
        let mut wrong = base_token();
        wrong["methods"] = "totp".into();
        expect_bad(parse_verify(st(200), &verify_body(wrong)), "token.methods");
        let mut wrong = base_token();
        wrong["methods"] = serde_json::json!(["password", 7]);
        expect_bad(parse_verify(st(200), &verify_body(wrong)), "token.methods");
    }

    #[test]
    fn verify_domain_falls_back_to_the_token_scope() {
        let mut token = base_token();
        token["user"].as_object_mut().unwrap().remove("domain");
        token["domain"] = serde_json::json!({"id": "d2", "name": "scope"});
        let parsed = valid(parse_verify(st(200), &verify_body(token.clone())));
        assert_eq!(
            (
                &*parsed.identity.domain_id(),
                &*parsed.identity.domain_name()
            ),
            ("d2", "scope")
        );
        token.as_object_mut().unwrap().remove("domain");
        expect_bad(
            parse_verify(st(200), &verify_body(token)),
            "token.domain: missing",
        );
    }

    #[test]
    fn verify_rejects_missing_or_ill_typed_fields() {
        let cases: [(&str, &[&str], serde_json::Value, &str); 7] = [
            (
                "id missing",
                &["user"],
                serde_json::json!({"name": "a", "domain": {"id": "d", "name": "n"}}),
                "token.user.id: missing",
            ),
            (
                "id number",
                &["user", "id"],
                serde_json::json!(42),
                "token.user.id: not a string",
            ),
            (
                "name null",
                &["user", "name"],
                serde_json::Value::Null,
                "token.user.name: not a string",
            ),
            (
                "domain string",
                &["user", "domain"],
                serde_json::json!("d1"),
                "token.user.domain: not an object",
            ),
            (
                "domain id missing",
                &["user", "domain"],
                serde_json::json!({"name": "n"}),
                "domain.id: missing",
            ),
            (
                "expires number",
                &["expires_at"],
                serde_json::json!(1_600_000_000),
                "token.expires_at: not a string",
            ),
            (
                "user array",
                &["user"],
                serde_json::json!([]),
                "token.user: not an object",
            ),
        ];
        for (case, path, value, needle) in cases {
            let mut token = base_token();
            let mut slot = &mut token;
            for key in path {
                slot = &mut slot[*key];
            }
            *slot = value;
            let result = parse_verify(st(200), &verify_body(token));
            assert!(
                matches!(&result, Err(IamError::BadResponse { detail, .. }) if detail.contains(needle)),
                "{case}: {result:?}"
            );
        }
        expect_bad(parse_verify(st(200), b"{}"), "token: missing");
        expect_bad(parse_verify(st(200), b""), "not JSON");
        expect_bad(parse_verify(st(200), HTML.as_bytes()), "not JSON");
        let truncated = &VERIFY_200.as_bytes()[..VERIFY_200.len() / 2];
        expect_bad(parse_verify(st(200), truncated), "not JSON");
    }

    #[test]
    fn verify_rejects_user_ids_that_are_not_a_path_segment() {
        for id in ["", ".", ".."] {
            let mut token = base_token();
            token["user"]["id"] = id.into();
            expect_bad(parse_verify(st(200), &verify_body(token)), "unusable");
        }
    }

    #[test]
    fn verify_invalid_only_on_401_and_404() {
        for (status, body) in [
            (
                401,
                r#"{"error_msg":"The token is expired.","error_code":"IAM.0066"}"#,
            ),
            (404, KEYSTONE_404),
            (404, HTML),
            (401, ""),
        ] {
            assert_eq!(
                parse_verify(st(status), body.as_bytes()).unwrap(),
                Verified::Invalid
            );
        }
        expect_status(
            parse_verify(st(403), ERR_403_0002.as_bytes()),
            "verify_token",
            403,
            "IAM.0002",
        );
        expect_status(
            parse_verify(st(403), KEYSTONE_403.as_bytes()),
            "verify_token",
            403,
            "IAM.0002",
        );
        expect_status(
            parse_verify(st(500), ERR_500.as_bytes()),
            "verify_token",
            500,
            "IAM.0006",
        );
        expect_status(
            parse_verify(st(400), br#"{"error_msg":"x","error_code":"IAM.0009"}"#),
            "verify_token",
            400,
            "IAM.0009",
        );
        expect_status(
            parse_verify(
                st(429),
                br#"{"error_code":"APIG.0308","error_msg":"throttled"}"#,
            ),
            "verify_token",
            429,
            "APIG.0308",
        );
        expect_status(
            parse_verify(st(502), HTML.as_bytes()),
            "verify_token",
            502,
            "",
        );
        expect_status(parse_verify(st(302), b""), "verify_token", 302, "");
    }

    // ---- MFA device ---------------------------------------------------------------------------

    #[test]
    fn device_bound_per_seed_page() {
        assert!(parse_mfa_device(st(200), DEVICE_200.as_bytes(), SEED_USER).unwrap());
    }

    #[test]
    fn device_none_only_on_404_iam_0004_in_any_case() {
        for body in [ERR_404_UPPER, ERR_404_MIXED, r#"{"error_code":"iam.0004"}"#] {
            assert!(!parse_mfa_device(st(404), body.as_bytes(), SEED_USER).unwrap());
        }
        expect_status(
            parse_mfa_device(st(404), HTML.as_bytes(), SEED_USER),
            "mfa_device",
            404,
            "",
        );
        expect_status(
            parse_mfa_device(st(404), b"", SEED_USER),
            "mfa_device",
            404,
            "",
        );
        expect_status(
            parse_mfa_device(st(404), KEYSTONE_404.as_bytes(), SEED_USER),
            "mfa_device",
            404,
            "404",
        );
        expect_status(
            parse_mfa_device(st(404), br#"{"error_code":"IAM.0005"}"#, SEED_USER),
            "mfa_device",
            404,
            "IAM.0005",
        );
        // Only the code as sent counts: what sanitising for logs would turn into IAM.0004 is
        // not the documented code (fuzz/regressions/huawei_parse/device-404-code-with-space).
        // Each of these is logged as "IAM.0004" all the same.
        for code in [r"I AM.0004", r"IAM.0004\u0000", r"IAM.\n0004", r" IAM.0004"] {
            let body = format!(r#"{{"error_code":"{code}"}}"#);
            expect_status(
                parse_mfa_device(st(404), body.as_bytes(), SEED_USER),
                "mfa_device",
                404,
                "IAM.0004",
            );
            expect_status(
                parse_login_protect(st(404), body.as_bytes(), SEED_USER),
                "login_protect",
                404,
                "IAM.0004",
            );
        }
        // IAM.0004 on any other status is not "no device".
        expect_status(
            parse_mfa_device(st(400), ERR_404_UPPER.as_bytes(), SEED_USER),
            "mfa_device",
            400,
            "IAM.0004",
        );
    }

    #[test]
    fn device_errors_per_seed_page() {
        expect_status(
            parse_mfa_device(st(403), ERR_403_0002.as_bytes(), SEED_USER),
            "mfa_device",
            403,
            "IAM.0002",
        );
        expect_status(
            parse_mfa_device(st(403), ERR_403_0003.as_bytes(), SEED_USER),
            "mfa_device",
            403,
            "IAM.0003",
        );
        expect_status(
            parse_mfa_device(st(500), ERR_500.as_bytes(), SEED_USER),
            "mfa_device",
            500,
            "IAM.0006",
        );
        expect_status(
            parse_mfa_device(st(401), b"", SEED_USER),
            "mfa_device",
            401,
            "",
        );
        expect_status(
            parse_mfa_device(st(429), b"", SEED_USER),
            "mfa_device",
            429,
            "",
        );
    }

    #[test]
    fn device_rejects_unusable_bodies() {
        expect_bad(
            parse_mfa_device(st(200), DEVICE_200.as_bytes(), "someone-else"),
            "not the user",
        );
        expect_bad(
            parse_mfa_device(st(200), br#"{"virtual_mfa_device":null}"#, SEED_USER),
            "not an object",
        );
        expect_bad(
            parse_mfa_device(st(200), br#"{"virtual_mfa_devices":[]}"#, SEED_USER),
            "virtual_mfa_device: missing",
        );
        expect_bad(
            parse_mfa_device(
                st(200),
                br#"{"virtual_mfa_device":{"serial_number":"x"}}"#,
                SEED_USER,
            ),
            "user_id: missing",
        );
        expect_bad(
            parse_mfa_device(
                st(200),
                br#"{"virtual_mfa_device":{"user_id":1}}"#,
                SEED_USER,
            ),
            "not a string",
        );
        expect_bad(
            parse_mfa_device(st(200), HTML.as_bytes(), SEED_USER),
            "not JSON",
        );
        expect_bad(
            parse_mfa_device(st(200), &DEVICE_200.as_bytes()[..40], SEED_USER),
            "not JSON",
        );
    }

    // ---- login protect ------------------------------------------------------------------------

    #[test]
    fn login_protect_per_seed_page() {
        assert_eq!(
            parse_login_protect(st(200), PROTECT_200.as_bytes(), SEED_USER).unwrap(),
            Some(LoginProtect {
                enabled: true,
                method: VerificationMethod::Vmfa
            })
        );
        let sms =
            br#"{"login_protect":{"user_id":"u","enabled":true,"verification_method":"SMS"}}"#;
        assert_eq!(
            parse_login_protect(st(200), sms, "u").unwrap(),
            Some(LoginProtect {
                enabled: true,
                method: VerificationMethod::Sms
            })
        );
        let unknown =
            br#"{"login_protect":{"user_id":"u","enabled":true,"verification_method":"fido2"}}"#;
        assert_eq!(
            parse_login_protect(st(200), unknown, "u").unwrap(),
            Some(LoginProtect {
                enabled: true,
                method: VerificationMethod::Other
            })
        );
        let off =
            br#"{"login_protect":{"user_id":"u","enabled":false,"verification_method":"none"}}"#;
        let off_bare = br#"{"login_protect":{"user_id":"u","enabled":false}}"#;
        for body in [&off[..], &off_bare[..]] {
            assert_eq!(
                parse_login_protect(st(200), body, "u").unwrap(),
                Some(LoginProtect {
                    enabled: false,
                    method: VerificationMethod::None
                })
            );
        }
    }

    #[test]
    fn login_protect_never_configured_on_404_iam_0004() {
        for body in [ERR_404_MIXED, ERR_404_UPPER] {
            assert_eq!(
                parse_login_protect(st(404), body.as_bytes(), SEED_USER).unwrap(),
                None
            );
        }
        expect_status(
            parse_login_protect(st(404), HTML.as_bytes(), SEED_USER),
            "login_protect",
            404,
            "",
        );
        expect_status(
            parse_login_protect(st(403), ERR_403_0002.as_bytes(), SEED_USER),
            "login_protect",
            403,
            "IAM.0002",
        );
        expect_status(
            parse_login_protect(st(403), ERR_403_0003.as_bytes(), SEED_USER),
            "login_protect",
            403,
            "IAM.0003",
        );
        expect_status(
            parse_login_protect(st(500), ERR_500.as_bytes(), SEED_USER),
            "login_protect",
            500,
            "IAM.0006",
        );
    }

    #[test]
    fn login_protect_rejects_unusable_bodies() {
        expect_bad(
            parse_login_protect(st(200), PROTECT_200.as_bytes(), "other"),
            "not the user",
        );
        let cases: [(&[u8], &str); 6] = [
            (br#"{"login_protect":{"user_id":"u","enabled":"true","verification_method":"vmfa"}}"#, "enabled: not a boolean"),
            (br#"{"login_protect":{"user_id":"u","verification_method":"vmfa"}}"#, "enabled: missing"),
            (br#"{"login_protect":{"user_id":"u","enabled":true}}"#, "verification_method: missing"),
            (br#"{"login_protect":{"user_id":"u","enabled":true,"verification_method":null}}"#, "verification_method: not a string"),
            (br#"{"login_protect":{"enabled":true,"verification_method":"vmfa"}}"#, "user_id: missing"),
            (br#"{"login_protect":[]}"#, "login_protect: not an object"),
        ];
        for (body, needle) in cases {
            expect_bad(parse_login_protect(st(200), body, "u"), needle);
        }
        expect_bad(
            parse_login_protect(st(200), HTML.as_bytes(), "u"),
            "not JSON",
        );
        expect_bad(
            parse_login_protect(st(200), &PROTECT_200.as_bytes()[..30], "u"),
            "not JSON",
        );
    }

    // ---- small pieces -------------------------------------------------------------------------

    #[test]
    fn error_codes_from_both_shapes_and_sanitised() {
        assert_eq!(error_code(ERR_500.as_bytes()), "IAM.0006");
        assert_eq!(error_code(KEYSTONE_403.as_bytes()), "IAM.0002");
        assert_eq!(error_code(KEYSTONE_404.as_bytes()), "404");
        assert_eq!(error_code(HTML.as_bytes()), "");
        assert_eq!(error_code(br#"{"error_code":5}"#), "");
        assert_eq!(
            error_code(br#"{"error_code":"IAM.0004\n<script> x"}"#),
            "IAM.0004<script>x"
        );
        let long = format!(r#"{{"error_code":"{}"}}"#, "A".repeat(500));
        assert_eq!(error_code(long.as_bytes()).len(), MAX_CODE_CHARS);
    }

    #[test]
    fn outcomes_follow_the_contract() {
        let ok: Result<(), IamError> = Ok(());
        let status = |api| -> Result<(), IamError> {
            Err(IamError::Status {
                api,
                status: 0,
                code: String::new(),
            })
        };
        for (code, expected) in [
            (200, Outcome::Ok),
            (401, Outcome::Unauthorized),
            (403, Outcome::Forbidden),
            (404, Outcome::NotFound),
            (429, Outcome::Throttled),
            (500, Outcome::ServerError),
            (503, Outcome::ServerError),
            (400, Outcome::BadResponse),
            (302, Outcome::BadResponse),
        ] {
            assert_eq!(outcome(Some(st(code)), &ok), expected, "{code}");
            assert_eq!(outcome(Some(st(code)), &status("x")), expected, "{code}");
        }
        assert_eq!(
            outcome(
                Some(st(200)),
                &Err::<(), _>(bad(Api::VerifyToken, String::new()))
            ),
            Outcome::BadResponse
        );
        assert_eq!(
            outcome(None, &Err::<(), _>(IamError::Timeout { api: "x" })),
            Outcome::Timeout
        );
        let transport = IamError::Transport {
            api: "x",
            detail: String::new(),
        };
        assert_eq!(
            outcome(None, &Err::<(), _>(transport)),
            Outcome::TransportError
        );
        for o in [
            Outcome::Ok,
            Outcome::NotFound,
            Outcome::Unauthorized,
            Outcome::Forbidden,
            Outcome::Throttled,
            Outcome::ServerError,
            Outcome::Timeout,
            Outcome::TransportError,
            Outcome::BadResponse,
        ] {
            assert!(crate::metrics::IAM_OUTCOMES.contains(&o.as_str()));
        }
        for api in [Api::VerifyToken, Api::MfaDevice, Api::LoginProtect] {
            assert!(crate::metrics::IAM_APIS.contains(&api.as_str()));
        }
    }

    #[test]
    fn user_ids_are_encoded_as_one_segment() {
        assert_eq!(encode_segment("092ac6365a0025b1"), "092ac6365a0025b1");
        assert_eq!(encode_segment("a.b-c_d~e"), "a.b-c_d~e");
        assert_eq!(encode_segment("a/b c?d#e%f"), "a%2Fb%20c%3Fd%23e%25f");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(
            validate_endpoint("https://iam.myhuaweicloud.eu/").unwrap(),
            "https://iam.myhuaweicloud.eu"
        );
        assert_eq!(
            validate_endpoint("http://127.0.0.1:8081").unwrap(),
            "http://127.0.0.1:8081"
        );
        for bad in [
            "iam.myhuaweicloud.eu",
            "ftp://iam.example",
            "https://",
            "https://iam.example?x=1",
            "https://user:pw@iam.example",
            "",
        ] {
            assert!(validate_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn new_checks_limits() {
        let metrics = Arc::new(Metrics::new());
        let config = |timeout, max_concurrency| HuaweiConfig {
            endpoint: "https://iam.myhuaweicloud.eu".into(),
            timeout,
            max_concurrency,
        };
        assert!(HuaweiProvider::new(config(Duration::from_secs(3), 64), metrics.clone()).is_ok());
        assert!(HuaweiProvider::new(config(Duration::ZERO, 64), metrics.clone()).is_err());
        assert!(HuaweiProvider::new(config(Duration::from_secs(3), 0), metrics).is_err());
    }

    // ---- against a local server ---------------------------------------------------------------

    mod net {
        use super::*;

        use std::collections::HashMap;
        use std::net::SocketAddr;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;

        use futures_util::FutureExt as _;
        use http_body_util::Full;
        use hyper::body::Incoming;
        use hyper::server::conn::http1;
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;
        use tokio::net::TcpListener;

        const TOKEN: &str = "MIIDkgYJKoZIhvcNAQcCoIIDgzCCA38CAQExDTALBglghkgBZQMEAgEwgXXXX";
        const USER: &str = "092ac6365a0025b11f76c01e90100";

        /// One request as the server saw it.
        #[derive(Debug, Clone)]
        struct Seen {
            method: Method,
            /// Path and query exactly as sent (still percent-encoded).
            target: String,
            headers: http::HeaderMap,
        }

        type Reply = (u16, String);
        type Handler = Arc<dyn Fn(Seen) -> BoxFuture<'static, Reply> + Send + Sync>;

        struct Server {
            addr: SocketAddr,
            seen: Arc<Mutex<Vec<Seen>>>,
            connections: Arc<AtomicUsize>,
            max_in_flight: Arc<AtomicUsize>,
        }

        impl Server {
            fn endpoint(&self) -> String {
                format!("http://{}", self.addr)
            }

            fn seen(&self) -> Vec<Seen> {
                self.seen.lock().unwrap().clone()
            }

            fn targets(&self) -> Vec<String> {
                let mut targets: Vec<String> =
                    self.seen().into_iter().map(|seen| seen.target).collect();
                targets.sort();
                targets
            }
        }

        /// A tiny HTTP/1.1 server on `127.0.0.1:0` that records every request and answers with
        /// `handler`.
        async fn serve(handler: Handler) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let connections = Arc::new(AtomicUsize::new(0));
            let in_flight = Arc::new(AtomicUsize::new(0));
            let max_in_flight = Arc::new(AtomicUsize::new(0));
            let server = Server {
                addr,
                seen: seen.clone(),
                connections: connections.clone(),
                max_in_flight: max_in_flight.clone(),
            };
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    let seen = seen.clone();
                    let in_flight = in_flight.clone();
                    let max_in_flight = max_in_flight.clone();
                    let service = service_fn(move |request: Request<Incoming>| {
                        let handler = handler.clone();
                        let seen = seen.clone();
                        let in_flight = in_flight.clone();
                        let max_in_flight = max_in_flight.clone();
                        async move {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            max_in_flight.fetch_max(now, Ordering::SeqCst);
                            let record = Seen {
                                method: request.method().clone(),
                                target: request
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.as_str().to_owned())
                                    .unwrap_or_default(),
                                headers: request.headers().clone(),
                            };
                            seen.lock().unwrap().push(record.clone());
                            let (status, body) = handler(record).await;
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    tokio::spawn(async move {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            server
        }

        /// Answers by API, from a table of fixed replies.
        fn routes(replies: HashMap<&'static str, Reply>) -> Handler {
            Arc::new(move |seen: Seen| {
                let api = if seen.target.starts_with("/v3/auth/tokens") {
                    "verify"
                } else if seen.target.ends_with("/virtual-mfa-device") {
                    "device"
                } else if seen.target.ends_with("/login-protect") {
                    "protect"
                } else {
                    "other"
                };
                let reply = replies
                    .get(api)
                    .cloned()
                    .unwrap_or((599, "unexpected request".into()));
                async move { reply }.boxed()
            })
        }

        fn verify_ok(user_id: &str) -> Reply {
            let token = serde_json::json!({"token": {
                "methods": ["password", "totp"],
                "expires_at": "2030-09-05T06:50:44.390000Z",
                "issued_at": "2030-09-04T06:50:44.390000Z",
                "user": {"domain": {"id": "d-1", "name": "acme"}, "id": user_id, "name": "alice",
                         "password_expires_at": ""}
            }});
            (200, token.to_string())
        }

        fn device_ok(user_id: &str) -> Reply {
            let body = serde_json::json!({"virtual_mfa_device":
                {"user_id": user_id, "serial_number": format!("iam/mfa/{user_id}")}});
            (200, body.to_string())
        }

        fn protect_ok(user_id: &str) -> Reply {
            let body = serde_json::json!({"login_protect":
                {"user_id": user_id, "enabled": true, "verification_method": "VMFA"}});
            (200, body.to_string())
        }

        fn healthy(user_id: &str) -> Handler {
            routes(HashMap::from([
                ("verify", verify_ok(user_id)),
                ("device", device_ok(user_id)),
                ("protect", protect_ok(user_id)),
            ]))
        }

        fn provider(
            endpoint: String,
            timeout: Duration,
            max: usize,
        ) -> (HuaweiProvider, Arc<Metrics>) {
            let metrics = Arc::new(Metrics::new());
            let provider = HuaweiProvider::new(
                HuaweiConfig {
                    endpoint,
                    timeout,
                    max_concurrency: max,
                },
                metrics.clone(),
            )
            .unwrap();
            (provider, metrics)
        }

        fn count(metrics: &Metrics, api: &str, outcome: &str) -> u64 {
            metrics
                .iam_requests
                .with_label_values(&[api, outcome])
                .get()
        }

        const BOTH: Needs = Needs {
            mfa_device: true,
            login_protect: true,
        };

        fn facts(status: TokenStatus) -> Arc<UserFacts> {
            match status {
                TokenStatus::Valid(facts) => facts,
                TokenStatus::Invalid => panic!("expected a valid token"),
            }
        }

        #[tokio::test]
        async fn lookup_sends_the_three_documented_requests() {
            let server = serve(healthy(USER)).await;
            let (provider, metrics) = provider(server.endpoint(), Duration::from_secs(5), 8);
            let token = Token::new(TOKEN);

            let facts = facts(provider.lookup(&token, BOTH).await.unwrap());

            assert_eq!(
                facts.identity,
                Identity::new(USER, "alice", "d-1", "acme").unwrap()
            );
            assert!(facts.totp_login);
            assert_eq!(
                facts.expires_at,
                humantime::parse_rfc3339("2030-09-05T06:50:44.390Z").unwrap()
            );
            assert_eq!(facts.mfa_device, Some(true));
            assert_eq!(
                facts.login_protect,
                Some(Some(LoginProtect {
                    enabled: true,
                    method: VerificationMethod::Vmfa
                }))
            );

            let seen = server.seen();
            assert_eq!(seen.len(), 3);
            // The verify call comes first; the other two only once the user id is known.
            assert_eq!(seen[0].target, "/v3/auth/tokens?nocatalog=true");
            assert_eq!(seen[0].headers["x-auth-token"], TOKEN);
            assert_eq!(seen[0].headers["x-subject-token"], TOKEN);
            let mut rest: Vec<&Seen> = seen[1..].iter().collect();
            rest.sort_by(|a, b| a.target.cmp(&b.target));
            assert_eq!(
                rest[0].target,
                format!("/v3.0/OS-MFA/users/{USER}/virtual-mfa-device")
            );
            assert_eq!(
                rest[1].target,
                format!("/v3.0/OS-USER/users/{USER}/login-protect")
            );
            for seen in &seen {
                assert_eq!(seen.method, Method::GET);
                assert_eq!(seen.headers["host"], server.addr.to_string());
                assert_eq!(seen.headers["accept"], "application/json");
            }
            for seen in rest {
                assert_eq!(seen.headers["x-auth-token"], TOKEN);
                assert!(!seen.headers.contains_key("x-subject-token"));
            }
            for api in ["verify_token", "mfa_device", "login_protect"] {
                assert_eq!(count(&metrics, api, "ok"), 1, "{api}");
                let histogram = metrics.iam_request_duration.with_label_values(&[api]);
                assert_eq!(histogram.get_sample_count(), 1, "{api}");
            }

            // Keep-alive: a second lookup reuses the pooled connections.
            let connections = server.connections.load(Ordering::SeqCst);
            provider.lookup(&token, BOTH).await.unwrap();
            assert_eq!(server.connections.load(Ordering::SeqCst), connections);
        }

        #[tokio::test]
        async fn lookups_the_policy_cannot_use_are_skipped() {
            let cases = [
                (
                    Needs {
                        mfa_device: true,
                        login_protect: false,
                    },
                    vec!["/v3.0/OS-MFA/users/u-1/virtual-mfa-device".to_owned()],
                ),
                (
                    Needs {
                        mfa_device: false,
                        login_protect: true,
                    },
                    vec!["/v3.0/OS-USER/users/u-1/login-protect".to_owned()],
                ),
                (
                    Needs {
                        mfa_device: false,
                        login_protect: false,
                    },
                    vec![],
                ),
            ];
            for (needs, mut expected) in cases {
                let server = serve(healthy("u-1")).await;
                let (provider, _) = provider(server.endpoint(), Duration::from_secs(5), 8);
                let facts = facts(provider.lookup(&Token::new(TOKEN), needs).await.unwrap());
                assert_eq!(facts.mfa_device.is_some(), needs.mfa_device);
                assert_eq!(facts.login_protect.is_some(), needs.login_protect);
                expected.push("/v3/auth/tokens?nocatalog=true".to_owned());
                expected.sort();
                assert_eq!(server.targets(), expected, "{needs:?}");
            }
        }

        #[tokio::test]
        async fn invalid_token_stops_after_verify() {
            for (status, outcome) in [(401, "unauthorized"), (404, "not_found")] {
                let body = r#"{"error_msg":"The token is invalid.","error_code":"IAM.0067"}"#;
                let server =
                    serve(routes(HashMap::from([("verify", (status, body.into()))]))).await;
                let (provider, metrics) = provider(server.endpoint(), Duration::from_secs(5), 8);
                let answer = provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap();
                assert_eq!(answer, TokenStatus::Invalid);
                assert_eq!(server.seen().len(), 1);
                assert_eq!(count(&metrics, "verify_token", outcome), 1);
            }
        }

        #[tokio::test]
        async fn no_device_and_no_login_protect() {
            let server = serve(routes(HashMap::from([
                ("verify", verify_ok(USER)),
                ("device", (404, ERR_404_UPPER.into())),
                ("protect", (404, ERR_404_MIXED.into())),
            ])))
            .await;
            let (provider, metrics) = provider(server.endpoint(), Duration::from_secs(5), 8);
            let facts = facts(provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap());
            assert_eq!(facts.mfa_device, Some(false));
            assert_eq!(facts.login_protect, Some(None));
            assert_eq!(count(&metrics, "mfa_device", "not_found"), 1);
            assert_eq!(count(&metrics, "login_protect", "not_found"), 1);
        }

        #[tokio::test]
        async fn a_failed_lookup_fails_the_whole_lookup() {
            let server = serve(routes(HashMap::from([
                ("verify", verify_ok(USER)),
                ("device", (500, ERR_500.into())),
                ("protect", protect_ok(USER)),
            ])))
            .await;
            let (provider, metrics) = provider(server.endpoint(), Duration::from_secs(5), 8);
            let err = provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap_err();
            assert!(
                matches!(&err, IamError::Status { api: "mfa_device", status: 500, code } if code == "IAM.0006"),
                "{err:?}"
            );
            assert_eq!(count(&metrics, "mfa_device", "server_error"), 1);
            // The other call was not cancelled: it was sent, so it is counted.
            assert_eq!(count(&metrics, "login_protect", "ok"), 1);

            // The same failure on a lookup the policy does not need is never sent.
            let needs = Needs {
                mfa_device: false,
                login_protect: true,
            };
            assert!(provider.lookup(&Token::new(TOKEN), needs).await.is_ok());
        }

        #[tokio::test]
        async fn answers_about_another_user_are_refused() {
            let server = serve(routes(HashMap::from([
                ("verify", verify_ok(USER)),
                ("device", device_ok("someone-else")),
                ("protect", protect_ok(USER)),
            ])))
            .await;
            let (provider, metrics) = provider(server.endpoint(), Duration::from_secs(5), 8);
            let err = provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    IamError::BadResponse {
                        api: "mfa_device",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(count(&metrics, "mfa_device", "bad_response"), 1);
        }

        #[tokio::test]
        async fn user_id_is_percent_encoded_in_the_path() {
            let user = "a/b c?d#../x";
            let server = serve(healthy(user)).await;
            let (provider, _) = provider(server.endpoint(), Duration::from_secs(5), 8);
            let facts = facts(provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap());
            assert_eq!(facts.identity.user_id(), user);
            assert_eq!(
                server.targets(),
                vec![
                    "/v3.0/OS-MFA/users/a%2Fb%20c%3Fd%23..%2Fx/virtual-mfa-device".to_owned(),
                    "/v3.0/OS-USER/users/a%2Fb%20c%3Fd%23..%2Fx/login-protect".to_owned(),
                    "/v3/auth/tokens?nocatalog=true".to_owned(),
                ]
            );
        }

        #[tokio::test]
        async fn iam_error_statuses_are_errors_not_answers() {
            for (status, outcome) in [
                (403, "forbidden"),
                (429, "throttled"),
                (503, "server_error"),
                (400, "bad_response"),
            ] {
                let server = serve(routes(HashMap::from([(
                    "verify",
                    (status, ERR_403_0002.into()),
                )])))
                .await;
                let (provider, metrics) = provider(server.endpoint(), Duration::from_secs(5), 8);
                let err = provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap_err();
                assert!(
                    matches!(&err, IamError::Status { api: "verify_token", status: s, code } if *s == status && code == "IAM.0002"),
                    "{err:?}"
                );
                assert_eq!(count(&metrics, "verify_token", outcome), 1, "{status}");
            }
        }

        #[tokio::test]
        async fn oversized_body_is_a_bad_response() {
            let huge = format!(r#"{{"token":{{"pad":"{}"}}}}"#, "x".repeat(MAX_BODY_BYTES));
            let server = serve(routes(HashMap::from([("verify", (200, huge))]))).await;
            let (provider, metrics) = provider(server.endpoint(), Duration::from_secs(5), 8);
            let err = provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    IamError::BadResponse {
                        api: "verify_token",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(count(&metrics, "verify_token", "bad_response"), 1);
        }

        #[tokio::test]
        async fn a_slow_iam_times_out_quickly() {
            let server = serve(Arc::new(|_seen: Seen| {
                async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    (200, String::new())
                }
                .boxed()
            }))
            .await;
            let (provider, metrics) = provider(server.endpoint(), Duration::from_millis(200), 8);
            let started = std::time::Instant::now();
            let err = provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap_err();
            let elapsed = started.elapsed();
            assert!(
                matches!(
                    err,
                    IamError::Timeout {
                        api: "verify_token"
                    }
                ),
                "{err:?}"
            );
            assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
            assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
            assert_eq!(count(&metrics, "verify_token", "timeout"), 1);
        }

        #[tokio::test]
        async fn connection_refused_is_a_transport_error() {
            // A port that was just free: bind, note it, close it.
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            let (provider, metrics) = provider(format!("http://{addr}"), Duration::from_secs(5), 8);
            let started = std::time::Instant::now();
            let err = provider.lookup(&Token::new(TOKEN), BOTH).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    IamError::Transport {
                        api: "verify_token",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(!err.to_string().contains(TOKEN));
            assert_eq!(count(&metrics, "verify_token", "transport_error"), 1);
        }

        #[tokio::test]
        async fn calls_beyond_max_concurrency_wait_at_most_their_timeout() {
            // The server holds every request until released.
            let release = Arc::new(tokio::sync::Notify::new());
            let held = release.clone();
            let server = serve(Arc::new(move |_seen: Seen| {
                let held = held.clone();
                async move {
                    held.notified().await;
                    verify_ok(USER)
                }
                .boxed()
            }))
            .await;
            let metrics = Arc::new(Metrics::new());
            let first = Arc::new(
                HuaweiProvider::new(
                    HuaweiConfig {
                        endpoint: server.endpoint(),
                        timeout: Duration::from_secs(10),
                        max_concurrency: 1,
                    },
                    metrics.clone(),
                )
                .unwrap(),
            );
            let none = Needs {
                mfa_device: false,
                login_protect: false,
            };
            let holder = {
                let first = first.clone();
                tokio::spawn(async move { first.lookup(&Token::new(TOKEN), none).await })
            };
            while server.seen().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }

            // Same pool and the same permits, but a short budget: it gives up without sending,
            // after waiting a quarter of that budget for a slot.
            let short = HuaweiProvider {
                client: first.client.clone(),
                endpoint: first.endpoint.clone(),
                timeout: Duration::from_millis(200),
                permits: first.permits.clone(),
                max_concurrency: 1,
                metrics: metrics.clone(),
            };
            let started = std::time::Instant::now();
            let err = short.lookup(&Token::new(TOKEN), none).await.unwrap_err();
            let elapsed = started.elapsed();
            assert!(matches!(err, IamError::Saturated { limit: 1 }), "{err:?}");
            assert!(elapsed >= Duration::from_millis(45), "{elapsed:?}");
            assert!(elapsed < Duration::from_millis(190), "{elapsed:?}");
            assert_eq!(server.seen().len(), 1, "the saturated call was never sent");
            let sent: u64 = crate::metrics::IAM_OUTCOMES
                .iter()
                .map(|outcome| count(&metrics, "verify_token", outcome))
                .sum();
            assert_eq!(sent, 0, "a call never sent is not counted");

            release.notify_waiters();
            assert!(holder.await.unwrap().is_ok());
            assert_eq!(server.max_in_flight.load(Ordering::SeqCst), 1);
            assert_eq!(count(&metrics, "verify_token", "ok"), 1);
        }

        #[tokio::test]
        async fn in_flight_calls_never_exceed_max_concurrency() {
            let server = serve(Arc::new(|seen: Seen| {
                async move {
                    // Short enough that every queued call gets a slot within the permit wait.
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    let reply = healthy(USER);
                    reply(seen).await
                }
                .boxed()
            }))
            .await;
            let (provider, metrics) = provider(server.endpoint(), Duration::from_secs(10), 2);
            let token = Token::new(TOKEN);
            let lookups = (0..5).map(|_| provider.lookup(&token, BOTH));
            for answer in futures_util::future::join_all(lookups).await {
                facts(answer.unwrap());
            }
            assert_eq!(server.seen().len(), 15);
            assert_eq!(server.max_in_flight.load(Ordering::SeqCst), 2);
            assert_eq!(count(&metrics, "verify_token", "ok"), 5);
        }
    }
}
