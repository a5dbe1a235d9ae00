//! Huawei Cloud IAM v5 client for the incident-response admin action (CONTRACT §5 "Admin
//! action"): find a user's virtual MFA devices and disable the lost one.
//!
//! Two calls, both signed with the gateway's own AK/SK ([`crate::iam::aksk`]); IAM v5 takes no
//! token:
//!
//! - `GET /v5/mfa-devices?user_id=…&limit=100[&marker=…]` ("Listing All Virtual MFA Devices",
//!   `ListMfaDevicesV5`): `{"mfa_devices":[{"serial_number","user_id","enabled"}],
//!   "page_info":{"next_marker"?,"current_count"}}`, paged until `next_marker` is absent;
//! - `POST /v5/mfa-devices/disable` with `{"user_id","serial_number"}` (seed page 004,
//!   "Disabling a Virtual MFA Device", `DisableMfaDeviceV5`): 200 with no body.
//!
//! An error answer of the IAM (or of the API gateway in front of it, `APIGW.0301` for a bad
//! signature) is kept whole in [`V5Error::Iam`] — status, `error_code`, `error_msg`,
//! `request_id` and, on 403, `encoded_authorization_message` — because the operator who runs
//! the action needs exactly that to fix a permission or open a ticket. Everything else that can
//! go wrong (timeout, connection, an answer that is not the IAM's) is its own variant.
//!
//! Every call sent is counted in `mfa_gate_iam_requests_total` with `api` =
//! `v5_list_mfa_devices` or `v5_disable_mfa_device`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::iam::aksk::{self, AkSk};
use crate::iam::error_chain;
use crate::metrics::Metrics;

/// `GET`: list virtual MFA devices.
const LIST_PATH: &str = "/v5/mfa-devices";
/// `POST`: disable one.
const DISABLE_PATH: &str = "/v5/mfa-devices/disable";

/// Devices asked for per page: the API's default; it allows 1–200.
const PAGE_LIMIT: &str = "100";

/// Pages followed before giving up. A user has a handful of devices at most; an IAM that keeps
/// answering `next_marker` past 50 × 100 devices is broken, and the action must end.
const MAX_PAGES: usize = 50;

/// Largest answer read. A page of 100 devices is about 15 KiB; a 403 with its
/// `encoded_authorization_message` a few KiB.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// Idle pooled connections are kept this long: admin actions come in bursts (list, then
/// disable), rarely more.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Huawei answers carry their request id in this header as well as (for errors) in the body.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Settings of the v5 client (`[iam.v5]`), validated by the config layer.
#[derive(Debug, Clone)]
pub struct V5Config {
    /// Regional v5 endpoint, e.g. `https://iam.eu-west-101.myhuaweicloud.eu`; `http://` only
    /// for the loopback simulator. No path (the signature covers the path); a trailing `/` is
    /// tolerated.
    pub endpoint: String,
    /// Budget of one call (one page, or the disable): connecting, sending, reading the answer.
    pub timeout: Duration,
}

/// A virtual MFA device as IAM v5 lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MfaDevice {
    /// Opaque (`iam::<account>:mfa:<name>`, `iam/mfa/<id>`, …), at most 150 characters.
    pub serial_number: String,
    /// The IAM user it belongs to — always the user asked about (checked).
    pub user_id: String,
    /// Whether the device is enabled (bound and in use).
    pub enabled: bool,
}

/// An error answer of the IAM, kept as the IAM wrote it so that it can be passed back to the
/// operator verbatim. Serialises to the IAM's own body shape (`status` is left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct V5ErrorBody {
    /// The HTTP status of the answer.
    #[serde(skip)]
    pub status: u16,
    /// `IAM.0004`, `PAP5.0001`, `APIGW.0301`, …
    pub error_code: String,
    /// The IAM's message; empty if it sent none.
    pub error_msg: String,
    /// From the body, else from the `X-Request-Id` header; what Huawei support asks for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// On 403: the encrypted reason of the denial, to be decoded with the STS5
    /// `decode-authorization-message` API by someone allowed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoded_authorization_message: Option<String>,
}

/// Why a v5 call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum V5Error {
    /// The IAM answered with an error body: relay it with its status.
    #[error("IAM v5 {api} answered {} {}: {}", .body.status, .body.error_code, .body.error_msg)]
    Iam {
        api: &'static str,
        body: V5ErrorBody,
    },
    /// A non-2xx status without an IAM error body (a proxy's page, an empty 502).
    #[error("IAM v5 {api} answered {status} without an IAM error body")]
    Status { api: &'static str, status: u16 },
    #[error("IAM v5 {api} call timed out")]
    Timeout { api: &'static str },
    #[error("IAM v5 {api} call failed: {detail}")]
    Transport { api: &'static str, detail: String },
    /// A success status with an answer that cannot be used (not JSON, wrong shape, about
    /// another user, pagination that never ends).
    #[error("IAM v5 {api} answered an unusable body: {detail}")]
    BadResponse { api: &'static str, detail: String },
    /// Not sent: the arguments cannot make a valid call (an empty user id would list every
    /// device of the account).
    #[error("IAM v5 {api} call not sent: {detail}")]
    InvalidInput { api: &'static str, detail: String },
}

/// Client of the two IAM v5 calls of the admin action.
pub struct V5Client {
    /// Pooled: the list and the disable of one action share a connection.
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Scheme and authority, without a trailing `/`.
    endpoint: String,
    timeout: Duration,
    credentials: AkSk,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for V5Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V5Client")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl V5Client {
    /// Builds the client. Contacts nothing.
    ///
    /// # Errors
    ///
    /// When the endpoint is not an `http(s)://host[:port]` URL or the timeout is zero.
    pub fn new(config: V5Config, credentials: AkSk, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let endpoint = validate_endpoint(&config.endpoint)?;
        if config.timeout.is_zero() {
            bail!("iam.v5 timeout must be greater than zero");
        }
        let mut http = HttpConnector::new();
        // Lets the TLS wrapper hand `https://` URIs to this connector.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .context("setting up TLS for the IAM v5 client")?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(4)
            .build(https);
        Ok(V5Client {
            client,
            endpoint,
            timeout: config.timeout,
            credentials,
            metrics,
        })
    }

    /// Every virtual MFA device of `user_id`, following `page_info.next_marker` until it is
    /// absent (at most 50 pages).
    ///
    /// # Errors
    ///
    /// The first call that fails ends the listing; devices of earlier pages are not returned.
    pub async fn list_mfa_devices(&self, user_id: &str) -> Result<Vec<MfaDevice>, V5Error> {
        const API: Api = Api::ListMfaDevices;
        if user_id.is_empty() {
            return Err(V5Error::InvalidInput {
                api: API.as_str(),
                detail: "empty user id".to_owned(),
            });
        }
        let mut devices = Vec::new();
        let mut marker: Option<String> = None;
        let mut markers_seen = HashSet::new();
        for _ in 0..MAX_PAGES {
            let mut params = vec![("limit", PAGE_LIMIT), ("user_id", user_id)];
            if let Some(marker) = &marker {
                params.push(("marker", marker.as_str()));
            }
            let path = format!("{LIST_PATH}?{}", aksk::query_string(&params));
            let page = self
                .call(API, Method::GET, path, None, |body| {
                    parse_page(body, user_id)
                })
                .await?;
            devices.extend(page.devices);
            match page.next_marker {
                None => return Ok(devices),
                Some(next) => {
                    // A marker seen before would page forever.
                    if !markers_seen.insert(next.clone()) {
                        return Err(bad(API, "page_info.next_marker repeats".to_owned()));
                    }
                    marker = Some(next);
                }
            }
        }
        Err(bad(API, format!("more than {MAX_PAGES} pages of devices")))
    }

    /// Disables `serial_number` and unbinds it from `user_id`.
    ///
    /// # Errors
    ///
    /// [`V5Error::Iam`] with 404 when the IAM knows no such user or device, 403 (with
    /// `encoded_authorization_message`) when the gateway's credentials may not do it.
    pub async fn disable_mfa_device(
        &self,
        user_id: &str,
        serial_number: &str,
    ) -> Result<(), V5Error> {
        const API: Api = Api::DisableMfaDevice;
        if user_id.is_empty() || serial_number.is_empty() {
            return Err(V5Error::InvalidInput {
                api: API.as_str(),
                detail: "empty user id or serial number".to_owned(),
            });
        }
        let body = serde_json::json!({ "user_id": user_id, "serial_number": serial_number });
        let body = Bytes::from(body.to_string());
        self.call(
            API,
            Method::POST,
            DISABLE_PATH.to_owned(),
            Some(body),
            parse_disable,
        )
        .await
    }

    /// One signed call: builds and signs the request, sends it, reads the answer (at most
    /// [`MAX_BODY_BYTES`]) within the timeout, turns an error status into [`V5Error::Iam`] or
    /// [`V5Error::Status`] and hands a success body to `parse`. Every call sent is counted.
    async fn call<T>(
        &self,
        api: Api,
        method: Method,
        path_and_query: String,
        body: Option<Bytes>,
        parse: impl FnOnce(&[u8]) -> Result<T, V5Error>,
    ) -> Result<T, V5Error> {
        let request = self
            .request(method, &path_and_query, body)
            .map_err(|detail| {
                tracing::warn!(api = api.as_str(), %detail, "IAM v5 call not sent");
                V5Error::InvalidInput {
                    api: api.as_str(),
                    detail,
                }
            })?;

        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, self.exchange(api, request)).await;
        let elapsed = started.elapsed();

        let (status, result) = match answer {
            Err(_) => (None, Err(V5Error::Timeout { api: api.as_str() })),
            Ok(Err(err)) => (None, Err(err)),
            Ok(Ok((status, headers, body))) => {
                let result = if status.is_success() {
                    parse(&body)
                } else {
                    Err(error_answer(api, status, &headers, &body))
                };
                (Some(status), result)
            }
        };
        let outcome = outcome(status, &result);
        self.metrics
            .observe_iam(api.as_str(), outcome, elapsed.as_secs_f64());
        tracing::debug!(
            api = api.as_str(),
            status = status.map(|s| s.as_u16()),
            outcome,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "IAM v5 call"
        );
        if let Err(err) = &result {
            let (code, request_id) = match err {
                V5Error::Iam { body, .. } => (body.error_code.as_str(), body.request_id.as_deref()),
                _ => ("", None),
            };
            tracing::warn!(
                api = api.as_str(),
                status = status.map(|s| s.as_u16()),
                code,
                request_id,
                error = %err,
                "IAM v5 call failed"
            );
        }
        result
    }

    /// The signed request.
    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>, String> {
        let uri: Uri = format!("{}{}", self.endpoint, path_and_query)
            .parse()
            .map_err(|err| format!("invalid request URI: {err}"))?;
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("mfa-gate/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json;charset=UTF-8");
        }
        let body = body.unwrap_or_default();
        let mut request = builder
            .body(Full::new(body.clone()))
            .map_err(|err| format!("invalid request: {err}"))?;
        self.credentials
            .sign(&mut request, &body, SystemTime::now())
            .map_err(|err| format!("cannot sign the request: {err}"))?;
        Ok(request)
    }

    /// Sends the request and reads the whole answer with the size limit.
    async fn exchange(
        &self,
        api: Api,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), V5Error> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| V5Error::Transport {
                api: api.as_str(),
                detail: error_chain(&err),
            })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|err| {
                if err.downcast_ref::<LengthLimitError>().is_some() {
                    bad(api, format!("body over {MAX_BODY_BYTES} bytes"))
                } else {
                    V5Error::Transport {
                        api: api.as_str(),
                        detail: error_chain(err.as_ref()),
                    }
                }
            })?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    }
}

/// The two v5 APIs, named as the `api` metric label (CONTRACT §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    ListMfaDevices,
    DisableMfaDevice,
}

impl Api {
    fn as_str(self) -> &'static str {
        match self {
            Api::ListMfaDevices => "v5_list_mfa_devices",
            Api::DisableMfaDevice => "v5_disable_mfa_device",
        }
    }
}

/// The `outcome` label: what went wrong on the way first, then an unusable body, then the HTTP
/// status.
fn outcome<T>(status: Option<StatusCode>, result: &Result<T, V5Error>) -> &'static str {
    match result {
        Err(V5Error::Timeout { .. }) => return "timeout",
        Err(V5Error::Transport { .. } | V5Error::InvalidInput { .. }) => return "transport_error",
        Err(V5Error::BadResponse { .. }) => return "bad_response",
        Err(V5Error::Iam { .. } | V5Error::Status { .. }) | Ok(_) => {}
    }
    match status.map(|s| s.as_u16()) {
        None => "transport_error",
        Some(200..=299) => "ok",
        Some(401) => "unauthorized",
        Some(403) => "forbidden",
        Some(404) => "not_found",
        Some(429) => "throttled",
        Some(500..=599) => "server_error",
        Some(_) => "bad_response",
    }
}

/// One page of `GET /v5/mfa-devices`.
#[derive(Debug, PartialEq, Eq)]
struct Page {
    devices: Vec<MfaDevice>,
    /// `None` on the last page (absent, `null` or empty).
    next_marker: Option<String>,
}

/// Reads a 2xx answer of `GET /v5/mfa-devices`. Every device must belong to `user_id`: the
/// list decides which serial number gets disabled, so an answer about anyone else is unusable.
fn parse_page(body: &[u8], user_id: &str) -> Result<Page, V5Error> {
    const API: Api = Api::ListMfaDevices;
    let root: Value =
        serde_json::from_slice(body).map_err(|err| bad(API, format!("not JSON: {err}")))?;
    let root = root
        .as_object()
        .ok_or_else(|| bad(API, "not a JSON object".to_owned()))?;
    let list = match root.get("mfa_devices") {
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad(API, "mfa_devices: not a list".to_owned())),
        None => return Err(bad(API, "mfa_devices: missing".to_owned())),
    };
    let mut devices = Vec::with_capacity(list.len());
    for device in list {
        let device = device
            .as_object()
            .ok_or_else(|| bad(API, "mfa_devices: not a list of objects".to_owned()))?;
        let serial_number = string(device, "serial_number")?;
        if serial_number.is_empty() {
            return Err(bad(API, "mfa_devices[].serial_number: empty".to_owned()));
        }
        let owner = string(device, "user_id")?;
        if owner != user_id {
            return Err(bad(
                API,
                "mfa_devices[].user_id is not the user asked about".to_owned(),
            ));
        }
        let enabled = match device.get("enabled") {
            Some(Value::Bool(enabled)) => *enabled,
            _ => {
                return Err(bad(
                    API,
                    "mfa_devices[].enabled: missing or not a boolean".to_owned(),
                ))
            }
        };
        devices.push(MfaDevice {
            serial_number: serial_number.to_owned(),
            user_id: owner.to_owned(),
            enabled,
        });
    }
    let next_marker = match root.get("page_info") {
        None | Some(Value::Null) => None,
        Some(Value::Object(info)) => match info.get("next_marker") {
            None | Some(Value::Null) => None,
            Some(Value::String(marker)) if marker.is_empty() => None,
            Some(Value::String(marker)) => Some(marker.clone()),
            Some(_) => return Err(bad(API, "page_info.next_marker: not a string".to_owned())),
        },
        Some(_) => return Err(bad(API, "page_info: not an object".to_owned())),
    };
    Ok(Page {
        devices,
        next_marker,
    })
}

fn string<'a>(object: &'a Map<String, Value>, key: &'static str) -> Result<&'a str, V5Error> {
    match object.get(key) {
        Some(Value::String(value)) => Ok(value),
        _ => Err(bad(
            Api::ListMfaDevices,
            format!("mfa_devices[].{key}: missing or not a string"),
        )),
    }
}

/// Reads a 2xx answer of `POST /v5/mfa-devices/disable`: documented as empty; any JSON is
/// accepted too. Anything else (an HTML page from something in between) leaves it unknown
/// whether the device was disabled, so it is not a success.
fn parse_disable(body: &[u8]) -> Result<(), V5Error> {
    if body.iter().all(u8::is_ascii_whitespace) || serde_json::from_slice::<Value>(body).is_ok() {
        Ok(())
    } else {
        Err(bad(
            Api::DisableMfaDevice,
            "a success status with a body that is not JSON".to_owned(),
        ))
    }
}

/// The error of a non-2xx answer: [`V5Error::Iam`] when the body is an IAM error body
/// (`error_code` a string), else [`V5Error::Status`].
fn error_answer(api: Api, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> V5Error {
    let root = serde_json::from_slice::<Value>(body).ok();
    let object = root.as_ref().and_then(Value::as_object);
    let Some((object, error_code)) = object.and_then(|object| match object.get("error_code") {
        Some(Value::String(code)) if !code.is_empty() => Some((object, code.clone())),
        _ => None,
    }) else {
        return V5Error::Status {
            api: api.as_str(),
            status: status.as_u16(),
        };
    };
    let text = |key: &str| match object.get(key) {
        Some(Value::String(value)) if !value.is_empty() => Some(value.clone()),
        _ => None,
    };
    let request_id = text("request_id").or_else(|| {
        headers
            .get(X_REQUEST_ID)
            .and_then(|value: &HeaderValue| value.to_str().ok())
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    });
    V5Error::Iam {
        api: api.as_str(),
        body: V5ErrorBody {
            status: status.as_u16(),
            error_code,
            error_msg: text("error_msg").unwrap_or_default(),
            request_id,
            encoded_authorization_message: text("encoded_authorization_message"),
        },
    }
}

fn bad(api: Api, detail: String) -> V5Error {
    V5Error::BadResponse {
        api: api.as_str(),
        detail,
    }
}

/// Checks and normalises the endpoint: `http` or `https`, a host, nothing after the authority
/// (the signature covers the path, so a base path would have to be signed too; v5 endpoints
/// have none).
fn validate_endpoint(endpoint: &str) -> anyhow::Result<String> {
    let trimmed = endpoint.trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .with_context(|| format!("iam.v5.endpoint {endpoint:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("https" | "http") => {}
        _ => bail!("iam.v5.endpoint {endpoint:?} must start with https://"),
    }
    match uri.host() {
        Some(host) if !host.is_empty() => {}
        _ => bail!("iam.v5.endpoint {endpoint:?} has no host"),
    }
    if uri
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        bail!("iam.v5.endpoint {endpoint:?} must not carry credentials");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() || trimmed.contains('#') {
        bail!("iam.v5.endpoint {endpoint:?} must be scheme and host only, without a path or query");
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for (endpoint, normalised) in [
            (
                "https://iam.eu-west-101.myhuaweicloud.eu",
                "https://iam.eu-west-101.myhuaweicloud.eu",
            ),
            (
                "https://iam.eu-west-101.myhuaweicloud.eu/",
                "https://iam.eu-west-101.myhuaweicloud.eu",
            ),
            ("http://127.0.0.1:4000", "http://127.0.0.1:4000"),
        ] {
            assert_eq!(validate_endpoint(endpoint).expect(endpoint), normalised);
        }
        for bad in [
            "iam.example.com",
            "ftp://iam.example.com",
            "https://iam.example.com/v5",
            "https://iam.example.com?x=1",
            "https://user:pw@iam.example.com",
            "not a url",
        ] {
            assert!(validate_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pages_are_read() {
        let body = br#"{"mfa_devices":[{"serial_number":"iam::acc:mfa:phone","user_id":"u1","enabled":true},
            {"serial_number":"iam/mfa/u1","user_id":"u1","enabled":false}],
            "page_info":{"next_marker":"YWJjZA==","current_count":2}}"#;
        assert_eq!(
            parse_page(body, "u1").expect("page"),
            Page {
                devices: vec![
                    MfaDevice {
                        serial_number: "iam::acc:mfa:phone".to_owned(),
                        user_id: "u1".to_owned(),
                        enabled: true,
                    },
                    MfaDevice {
                        serial_number: "iam/mfa/u1".to_owned(),
                        user_id: "u1".to_owned(),
                        enabled: false,
                    },
                ],
                next_marker: Some("YWJjZA==".to_owned()),
            }
        );
        for last in [
            r#"{"mfa_devices":[],"page_info":{"current_count":0}}"#,
            r#"{"mfa_devices":[],"page_info":{"next_marker":null}}"#,
            r#"{"mfa_devices":[],"page_info":{"next_marker":""}}"#,
            r#"{"mfa_devices":[]}"#,
        ] {
            let page = parse_page(last.as_bytes(), "u1").expect(last);
            assert_eq!(page.next_marker, None, "{last}");
            assert!(page.devices.is_empty());
        }
    }

    #[test]
    fn unusable_pages_are_refused() {
        for body in [
            "",
            "<html>",
            "[]",
            r#"{"page_info":{}}"#,
            r#"{"mfa_devices":{}}"#,
            r#"{"mfa_devices":[{}]}"#,
            r#"{"mfa_devices":[1]}"#,
            r#"{"mfa_devices":[{"serial_number":"s","user_id":"u1"}]}"#,
            r#"{"mfa_devices":[{"serial_number":"s","user_id":"u1","enabled":"yes"}]}"#,
            r#"{"mfa_devices":[{"serial_number":"","user_id":"u1","enabled":true}]}"#,
            r#"{"mfa_devices":[{"serial_number":42,"user_id":"u1","enabled":true}]}"#,
            r#"{"mfa_devices":[{"serial_number":"s","user_id":"other","enabled":true}]}"#,
            r#"{"mfa_devices":[],"page_info":{"next_marker":7}}"#,
            r#"{"mfa_devices":[],"page_info":[]}"#,
        ] {
            let err = parse_page(body.as_bytes(), "u1").expect_err(body);
            assert!(
                matches!(
                    err,
                    V5Error::BadResponse {
                        api: "v5_list_mfa_devices",
                        ..
                    }
                ),
                "{body}: {err:?}"
            );
        }
    }

    #[test]
    fn disable_answers() {
        for ok in ["", " \n", "{}", r#"{"request_id":"x"}"#] {
            assert!(parse_disable(ok.as_bytes()).is_ok(), "{ok:?}");
        }
        for bad in ["<html></html>", "{", "\u{0}"] {
            assert!(parse_disable(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn error_answers_are_kept_verbatim() {
        let body = br#"{"error_msg":"access denied: not allowed","error_code":"PAP5.0001",
            "request_id":"0123abcd","encoded_authorization_message":"ZW5jb2RlZA=="}"#;
        let err = error_answer(
            Api::DisableMfaDevice,
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            body,
        );
        let V5Error::Iam { api, body } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*api, "v5_disable_mfa_device");
        assert_eq!(
            *body,
            V5ErrorBody {
                status: 403,
                error_code: "PAP5.0001".to_owned(),
                error_msg: "access denied: not allowed".to_owned(),
                request_id: Some("0123abcd".to_owned()),
                encoded_authorization_message: Some("ZW5jb2RlZA==".to_owned()),
            }
        );
        assert_eq!(
            serde_json::to_value(body).expect("json"),
            serde_json::json!({"error_code":"PAP5.0001","error_msg":"access denied: not allowed",
                "request_id":"0123abcd","encoded_authorization_message":"ZW5jb2RlZA=="})
        );
        assert_eq!(
            err.to_string(),
            "IAM v5 v5_disable_mfa_device answered 403 PAP5.0001: access denied: not allowed"
        );

        // A 400 body without request_id: the header's is used.
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("from-header"));
        let err = error_answer(
            Api::ListMfaDevices,
            StatusCode::BAD_REQUEST,
            &headers,
            br#"{"error_code":"PAP5.0010","error_msg":"invalid marker"}"#,
        );
        let V5Error::Iam { body, .. } = err else {
            panic!("{err:?}");
        };
        assert_eq!(body.request_id.as_deref(), Some("from-header"));
        assert_eq!(body.encoded_authorization_message, None);
        assert_eq!(
            serde_json::to_value(&body).expect("json"),
            serde_json::json!({"error_code":"PAP5.0010","error_msg":"invalid marker",
                "request_id":"from-header"})
        );

        for body in [
            "",
            "<html>502</html>",
            "{}",
            r#"{"error_code":""}"#,
            r#"{"error_code":5}"#,
        ] {
            let err = error_answer(
                Api::ListMfaDevices,
                StatusCode::BAD_GATEWAY,
                &HeaderMap::new(),
                body.as_bytes(),
            );
            assert!(
                matches!(
                    err,
                    V5Error::Status {
                        api: "v5_list_mfa_devices",
                        status: 502
                    }
                ),
                "{body}: {err:?}"
            );
        }
    }

    #[test]
    fn outcomes() {
        let iam = |status: u16| V5Error::Iam {
            api: "a",
            body: V5ErrorBody {
                status,
                error_code: "X".to_owned(),
                error_msg: String::new(),
                request_id: None,
                encoded_authorization_message: None,
            },
        };
        let code = |s: u16| Some(StatusCode::from_u16(s).expect("status"));
        assert_eq!(outcome::<()>(code(200), &Ok(())), "ok");
        for (status, expected) in [
            (400, "bad_response"),
            (401, "unauthorized"),
            (403, "forbidden"),
            (404, "not_found"),
            (429, "throttled"),
            (503, "server_error"),
        ] {
            assert_eq!(outcome::<()>(code(status), &Err(iam(status))), expected);
        }
        assert_eq!(
            outcome::<()>(
                code(502),
                &Err(V5Error::Status {
                    api: "a",
                    status: 502
                })
            ),
            "server_error"
        );
        assert_eq!(
            outcome::<()>(code(200), &Err(bad(Api::ListMfaDevices, String::new()))),
            "bad_response"
        );
        assert_eq!(
            outcome::<()>(None, &Err(V5Error::Timeout { api: "a" })),
            "timeout"
        );
        assert_eq!(
            outcome::<()>(
                None,
                &Err(V5Error::Transport {
                    api: "a",
                    detail: String::new()
                })
            ),
            "transport_error"
        );
    }

    /// Against the IAM simulator: real sockets, real signatures.
    mod sim {
        use super::*;
        use crate::auth::token::Token;
        use crate::dev::iam_sim::{
            Api as SimApi, Fault, IamSim, SimUser, V5_ACCESS_KEY, V5_SECRET_KEY,
        };
        use crate::iam::huawei::{HuaweiConfig, HuaweiProvider};
        use crate::iam::{IamProvider, Needs, TokenStatus};

        const USER: &str = "0123456789abcdef0123456789abcdef";
        const TOKEN: &str = "tok-alice";
        /// What the simulator sends as `encoded_authorization_message` when denying a disable.
        const DENIED_DISABLE: &str =
            "eyJhY3Rpb24iOiJpYW06bWZhOmRpc2FibGVWNSIsImVmZmVjdCI6ImRlbnkifQ==";

        fn alice(serial: &str) -> SimUser {
            SimUser {
                user_id: USER.to_owned(),
                user_name: "alice".to_owned(),
                domain_id: "d".repeat(32),
                domain_name: "demo".to_owned(),
                token: TOKEN.to_owned(),
                methods: vec!["password".to_owned()],
                expires_at: SystemTime::now() + Duration::from_secs(3600),
                mfa_device: Some(serial.to_owned()),
                login_protect: None,
            }
        }

        async fn sim_with(serial: &str) -> IamSim {
            IamSim::start(([127, 0, 0, 1], 0).into(), vec![alice(serial)])
                .await
                .expect("simulator")
        }

        fn client_with(
            sim: &IamSim,
            credentials: AkSk,
            timeout: Duration,
        ) -> (V5Client, Arc<Metrics>) {
            let metrics = Arc::new(Metrics::new());
            let client = V5Client::new(
                V5Config {
                    endpoint: format!("{}/", sim.url()),
                    timeout,
                },
                credentials,
                metrics.clone(),
            )
            .expect("client");
            (client, metrics)
        }

        fn client(sim: &IamSim) -> (V5Client, Arc<Metrics>) {
            let credentials = AkSk::new(V5_ACCESS_KEY, V5_SECRET_KEY).expect("credentials");
            client_with(sim, credentials, Duration::from_secs(5))
        }

        fn count(metrics: &Metrics, api: &str, outcome: &str) -> u64 {
            metrics
                .iam_requests
                .with_label_values(&[api, outcome])
                .get()
        }

        fn iam_error(err: V5Error) -> V5ErrorBody {
            match err {
                V5Error::Iam { body, .. } => body,
                other => panic!("expected an IAM error answer, got {other:?}"),
            }
        }

        fn is_request_id(id: Option<&str>) -> bool {
            id.is_some_and(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()))
        }

        #[tokio::test]
        async fn listing_follows_next_marker_across_pages() {
            // Serial numbers of every shape, so that markers carry `+`, `/` and `=`.
            let serials = [
                "iam/mfa/0123456789abcdef0123456789abcdef",
                "iam::0a1b2c:mfa:phone",
                "iam::0a1b2c:mfa:tablet ~+?",
                "iam:0123456789abcdef",
                "iam::0a1b2c:mfa:yubi/spare",
            ];
            let sim = sim_with(serials[0]).await;
            for serial in &serials[1..] {
                sim.add_mfa_device(USER, serial);
            }
            sim.set_v5_page_size(Some(2));
            let (client, metrics) = client(&sim);

            let devices = client.list_mfa_devices(USER).await.expect("list");
            let mut listed: Vec<&str> = devices.iter().map(|d| d.serial_number.as_str()).collect();
            listed.sort_unstable();
            let mut expected = serials.to_vec();
            expected.sort_unstable();
            assert_eq!(listed, expected);
            assert!(devices.iter().all(|d| d.user_id == USER && d.enabled));
            assert_eq!(sim.calls(SimApi::V5ListMfaDevices), 3);
            assert_eq!(count(&metrics, "v5_list_mfa_devices", "ok"), 3);
            let histogram = metrics
                .iam_request_duration
                .with_label_values(&["v5_list_mfa_devices"]);
            assert_eq!(histogram.get_sample_count(), 3);

            // One page when it fits.
            sim.set_v5_page_size(None);
            sim.reset_calls();
            assert_eq!(client.list_mfa_devices(USER).await.expect("list").len(), 5);
            assert_eq!(sim.calls(SimApi::V5ListMfaDevices), 1);
        }

        #[tokio::test]
        async fn pagination_is_capped() {
            let sim = sim_with("iam/mfa/0").await;
            for i in 1..=MAX_PAGES {
                sim.add_mfa_device(USER, &format!("iam/mfa/{i}"));
            }
            sim.set_v5_page_size(Some(1));
            let (client, _) = client(&sim);
            let err = client
                .list_mfa_devices(USER)
                .await
                .expect_err("too many pages");
            assert!(
                matches!(err, V5Error::BadResponse { api: "v5_list_mfa_devices", ref detail } if detail.contains("pages")),
                "{err:?}"
            );
            assert_eq!(sim.calls(SimApi::V5ListMfaDevices), MAX_PAGES);
        }

        #[tokio::test]
        async fn disable_then_the_v3_lookup_finds_no_device() {
            let serial = "iam::0a1b2c:mfa:lost-phone";
            let sim = sim_with(serial).await;
            let (client, metrics) = client(&sim);

            let devices = client.list_mfa_devices(USER).await.expect("list");
            assert_eq!(
                devices,
                vec![MfaDevice {
                    serial_number: serial.to_owned(),
                    user_id: USER.to_owned(),
                    enabled: true,
                }]
            );
            client
                .disable_mfa_device(USER, serial)
                .await
                .expect("disable");
            assert_eq!(sim.calls(SimApi::V5DisableMfaDevice), 1);
            assert_eq!(count(&metrics, "v5_disable_mfa_device", "ok"), 1);
            assert!(client
                .list_mfa_devices(USER)
                .await
                .expect("list")
                .is_empty());

            // What the gateway's own MFA check now sees: no device (404 IAM.0004).
            let provider = HuaweiProvider::new(
                HuaweiConfig {
                    endpoint: sim.url(),
                    timeout: Duration::from_secs(5),
                    max_concurrency: 4,
                },
                metrics.clone(),
            )
            .expect("provider");
            let needs = Needs {
                mfa_device: true,
                login_protect: false,
            };
            let status = provider
                .lookup(&Token::new(TOKEN), needs)
                .await
                .expect("lookup");
            let TokenStatus::Valid(facts) = status else {
                panic!("token should be valid: {status:?}");
            };
            assert_eq!(facts.mfa_device, Some(false));
            assert_eq!(count(&metrics, "mfa_device", "not_found"), 1);

            // Disabling it again: the IAM no longer knows it.
            let body = iam_error(
                client
                    .disable_mfa_device(USER, serial)
                    .await
                    .expect_err("gone"),
            );
            assert_eq!((body.status, body.error_code.as_str()), (404, "IAM.0004"));
        }

        #[tokio::test]
        async fn not_found_answers_are_passed_through() {
            let sim = sim_with("iam/mfa/a").await;
            let (client, metrics) = client(&sim);

            let body = iam_error(
                client
                    .disable_mfa_device(USER, "iam/mfa/unknown")
                    .await
                    .expect_err("unknown serial"),
            );
            assert_eq!(body.status, 404);
            assert_eq!(body.error_code, "IAM.0004");
            assert!(
                body.error_msg.contains("iam/mfa/unknown"),
                "{}",
                body.error_msg
            );
            assert!(is_request_id(body.request_id.as_deref()), "{body:?}");
            assert_eq!(body.encoded_authorization_message, None);

            let other = "fedcba9876543210fedcba9876543210";
            let body = iam_error(
                client
                    .disable_mfa_device(other, "iam/mfa/a")
                    .await
                    .expect_err("unknown user"),
            );
            assert_eq!((body.status, body.error_code.as_str()), (404, "IAM.0004"));
            let body = iam_error(
                client
                    .list_mfa_devices(other)
                    .await
                    .expect_err("unknown user"),
            );
            assert_eq!((body.status, body.error_code.as_str()), (404, "IAM.0004"));
            assert_eq!(count(&metrics, "v5_disable_mfa_device", "not_found"), 2);
            assert_eq!(count(&metrics, "v5_list_mfa_devices", "not_found"), 1);
            // Nothing was disabled on the way.
            assert_eq!(client.list_mfa_devices(USER).await.expect("list").len(), 1);
        }

        #[tokio::test]
        async fn denied_answers_carry_the_encoded_authorization_message() {
            let sim = sim_with("iam/mfa/a").await;
            let (client, metrics) = client(&sim);
            sim.set_v5_deny(true);

            let body = iam_error(
                client
                    .disable_mfa_device(USER, "iam/mfa/a")
                    .await
                    .expect_err("denied"),
            );
            assert_eq!(body.status, 403);
            assert_eq!(body.error_code, "PAP5.0001");
            assert!(body.error_msg.starts_with("access denied"), "{body:?}");
            assert!(is_request_id(body.request_id.as_deref()), "{body:?}");
            assert_eq!(
                body.encoded_authorization_message.as_deref(),
                Some(DENIED_DISABLE)
            );
            let body = iam_error(client.list_mfa_devices(USER).await.expect_err("denied"));
            assert_eq!((body.status, body.error_code.as_str()), (403, "PAP5.0001"));
            assert!(body.encoded_authorization_message.is_some());
            assert_eq!(count(&metrics, "v5_disable_mfa_device", "forbidden"), 1);
            assert_eq!(count(&metrics, "v5_list_mfa_devices", "forbidden"), 1);

            sim.set_v5_deny(false);
            client
                .disable_mfa_device(USER, "iam/mfa/a")
                .await
                .expect("allowed again");
        }

        #[tokio::test]
        async fn bad_requests_are_passed_through() {
            let sim = sim_with("iam/mfa/a").await;
            let (client, metrics) = client(&sim);
            // The seed page caps serial numbers at 150 characters.
            let long = "s".repeat(151);
            let body = iam_error(
                client
                    .disable_mfa_device(USER, &long)
                    .await
                    .expect_err("too long"),
            );
            assert_eq!(body.status, 400);
            assert_eq!(body.error_code, "IAM.0007");
            assert!(body.error_msg.contains("serial_number"), "{body:?}");
            assert!(body.request_id.is_some());
            assert_eq!(count(&metrics, "v5_disable_mfa_device", "bad_response"), 1);

            // Never sent: an empty user id would list the whole account.
            for err in [
                client.list_mfa_devices("").await.expect_err("empty"),
                client.disable_mfa_device("", "x").await.expect_err("empty"),
                client
                    .disable_mfa_device(USER, "")
                    .await
                    .expect_err("empty"),
            ] {
                assert!(matches!(err, V5Error::InvalidInput { .. }), "{err:?}");
            }
            assert_eq!(sim.calls(SimApi::V5ListMfaDevices), 0);
            assert_eq!(sim.calls(SimApi::V5DisableMfaDevice), 1);
        }

        #[tokio::test]
        async fn the_simulator_checks_every_signature() {
            let sim = sim_with("iam/mfa/a").await;

            let wrong_sk = AkSk::new(V5_ACCESS_KEY, "not-the-secret-key").expect("credentials");
            let (forger, metrics) = client_with(&sim, wrong_sk, Duration::from_secs(5));
            for err in [
                forger.list_mfa_devices(USER).await.expect_err("wrong SK"),
                forger
                    .disable_mfa_device(USER, "iam/mfa/a")
                    .await
                    .expect_err("wrong SK"),
            ] {
                let body = iam_error(err);
                assert_eq!(body.status, 401);
                assert_eq!(body.error_code, "APIGW.0301");
                assert!(
                    body.error_msg.contains("verify aksk signature fail"),
                    "{body:?}"
                );
            }
            assert_eq!(count(&metrics, "v5_list_mfa_devices", "unauthorized"), 1);
            assert_eq!(count(&metrics, "v5_disable_mfa_device", "unauthorized"), 1);

            let unknown_ak = AkSk::new("NOSUCHACCESSKEY00000", V5_SECRET_KEY).expect("credentials");
            let (stranger, _) = client_with(&sim, unknown_ak, Duration::from_secs(5));
            let body = iam_error(
                stranger
                    .list_mfa_devices(USER)
                    .await
                    .expect_err("unknown AK"),
            );
            assert_eq!((body.status, body.error_code.as_str()), (401, "APIGW.0301"));
            assert!(body.error_msg.contains("ak not exist"), "{body:?}");

            // The device is still there.
            let (honest, _) = client(&sim);
            assert_eq!(honest.list_mfa_devices(USER).await.expect("list").len(), 1);
        }

        #[tokio::test]
        async fn temporary_credentials_send_their_security_token() {
            let sim = sim_with("iam/mfa/a").await;
            sim.set_v5_security_token(Some("session-token-1"));
            let (permanent, _) = client(&sim);
            let body = iam_error(
                permanent
                    .list_mfa_devices(USER)
                    .await
                    .expect_err("token required"),
            );
            assert_eq!((body.status, body.error_code.as_str()), (401, "APIGW.0301"));

            let temporary = AkSk::new(V5_ACCESS_KEY, V5_SECRET_KEY)
                .expect("credentials")
                .with_security_token(Some("session-token-1"))
                .expect("token");
            let (client, _) = client_with(&sim, temporary, Duration::from_secs(5));
            assert_eq!(client.list_mfa_devices(USER).await.expect("list").len(), 1);
            client
                .disable_mfa_device(USER, "iam/mfa/a")
                .await
                .expect("disable");
        }

        #[tokio::test]
        async fn a_slow_iam_times_out() {
            let sim = sim_with("iam/mfa/a").await;
            sim.set_fault(
                Some(SimApi::V5DisableMfaDevice),
                Some(Fault::Latency(Duration::from_secs(10))),
            );
            let credentials = AkSk::new(V5_ACCESS_KEY, V5_SECRET_KEY).expect("credentials");
            let (client, metrics) = client_with(&sim, credentials, Duration::from_millis(200));
            let started = std::time::Instant::now();
            let err = client
                .disable_mfa_device(USER, "iam/mfa/a")
                .await
                .expect_err("timeout");
            let elapsed = started.elapsed();
            assert!(
                matches!(
                    err,
                    V5Error::Timeout {
                        api: "v5_disable_mfa_device"
                    }
                ),
                "{err:?}"
            );
            assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
            assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
            assert_eq!(count(&metrics, "v5_disable_mfa_device", "timeout"), 1);
        }

        #[tokio::test]
        async fn iam_failures_are_not_answers() {
            let sim = sim_with("iam/mfa/a").await;
            let (client, metrics) = client(&sim);

            sim.set_fault(Some(SimApi::V5ListMfaDevices), Some(Fault::Status(503)));
            let body = iam_error(client.list_mfa_devices(USER).await.expect_err("503"));
            assert_eq!((body.status, body.error_code.as_str()), (503, "IAM.0503"));
            assert_eq!(count(&metrics, "v5_list_mfa_devices", "server_error"), 1);

            for (fault, outcome) in [
                (Fault::Html, "bad_response"),
                (Fault::Garbage, "bad_response"),
                (Fault::MissingFields, "bad_response"),
                (Fault::WrongTypes, "bad_response"),
                (Fault::OtherUser, "bad_response"),
                (Fault::Huge, "bad_response"),
                (Fault::Truncated, "transport_error"),
                (Fault::Drop, "transport_error"),
            ] {
                sim.set_fault(Some(SimApi::V5ListMfaDevices), Some(fault.clone()));
                let before = count(&metrics, "v5_list_mfa_devices", outcome);
                let err = client.list_mfa_devices(USER).await.expect_err("fault");
                assert!(
                    matches!(err, V5Error::BadResponse { .. } | V5Error::Transport { .. }),
                    "{fault:?}: {err:?}"
                );
                assert_eq!(
                    count(&metrics, "v5_list_mfa_devices", outcome),
                    before + 1,
                    "{fault:?}"
                );
            }

            // A disable answered with an HTML page is not a success.
            sim.set_fault(Some(SimApi::V5DisableMfaDevice), Some(Fault::Html));
            let err = client
                .disable_mfa_device(USER, "iam/mfa/a")
                .await
                .expect_err("html");
            assert!(matches!(err, V5Error::BadResponse { .. }), "{err:?}");
        }

        #[tokio::test]
        async fn connection_refused_is_a_transport_error() {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            drop(listener);
            let metrics = Arc::new(Metrics::new());
            let client = V5Client::new(
                V5Config {
                    endpoint: format!("http://{addr}"),
                    timeout: Duration::from_secs(5),
                },
                AkSk::new(V5_ACCESS_KEY, V5_SECRET_KEY).expect("credentials"),
                metrics.clone(),
            )
            .expect("client");
            let err = client.list_mfa_devices(USER).await.expect_err("refused");
            assert!(matches!(err, V5Error::Transport { .. }), "{err:?}");
            assert_eq!(count(&metrics, "v5_list_mfa_devices", "transport_error"), 1);
        }

        #[test]
        fn debug_shows_no_secret() {
            let credentials = AkSk::new(V5_ACCESS_KEY, V5_SECRET_KEY).expect("credentials");
            let client = V5Client::new(
                V5Config {
                    endpoint: "https://iam.eu-west-101.myhuaweicloud.eu".to_owned(),
                    timeout: Duration::from_secs(3),
                },
                credentials,
                Arc::new(Metrics::new()),
            )
            .expect("client");
            let shown = format!("{client:?}");
            assert!(!shown.contains(V5_SECRET_KEY), "{shown}");
            assert!(shown.contains("iam.eu-west-101"), "{shown}");
        }
    }
}
