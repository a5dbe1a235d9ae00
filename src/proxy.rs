//! Forwarding to the upstream: the upstream request's head written in one buffer (header
//! hygiene included), sent on a pooled keep-alive connection ([`pool`], [`h1`]), bodies streamed
//! both ways, WebSocket upgrades, and the upstream metrics.
//!
//! The [`ProxyService`] only forwards requests that carry a [`Principal`]: the auth layer is the
//! only place that makes one, so a request that skipped it cannot reach the upstream.

pub mod body;
pub mod h1;
pub mod headers;
pub mod lower;
pub mod path;
pub mod pool;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::stack::RequestBody;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;

use crate::auth::token::Token;
use crate::config::{TokenConfig, UpstreamConfig};
use crate::error::GatewayError;
use crate::iam::UserFacts;
use crate::metrics::Metrics;
use crate::stack::context::RequestContext;
use crate::stack::edge::ConnInfo;

/// Errors inside streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use body::Body;

/// Facts about the request established before any decision, shared by all layers.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// `X-Request-Id`: the client's if acceptable, else a fresh UUID.
    pub request_id: HeaderValue,
    /// The connection it came on: the socket peer (never a header: headers are the client's
    /// word), `http` or `https`, and what the connection's requests share.
    pub conn: Arc<ConnInfo>,
    /// The normalised path, the one that was matched and is forwarded.
    pub path: Arc<str>,
    /// The client's token, if any was sent.
    pub token: Option<Token>,
}

impl RequestInfo {
    /// The socket peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.conn.peer
    }
}

/// The identity header lines (CONTRACT §4, `X-Auth-Mfa` included) last written upstream for a
/// client connection's requests, with the principal they describe. A kept-alive client sends
/// the same token on every request, its principal is the same cached `UserFacts` each time,
/// and writing its five lines again (packed ids spelled out, each line encoded) cost more
/// than a tenth of the upstream head. They are reused only for the very same facts (the same
/// allocation, held here so that it cannot be another's) and the same `X-Auth-Mfa`: a
/// connection that carries several users' requests gets each user's own lines.
#[derive(Default)]
pub struct IdentityLines(std::sync::Mutex<Option<WrittenFor>>);

struct WrittenFor {
    user: Arc<UserFacts>,
    mfa: HeaderValue,
    lines: Vec<u8>,
}

impl std::fmt::Debug for IdentityLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityLines")
    }
}

impl IdentityLines {
    /// Appends `principal`'s identity lines to `out`.
    fn write(&self, out: &mut Vec<u8>, principal: &Principal) {
        let (Some(user), Ok(mut last)) = (&principal.user, self.0.lock()) else {
            return write_identity_lines(out, principal);
        };
        if let Some(last) = last
            .as_ref()
            .filter(|last| Arc::ptr_eq(&last.user, user) && last.mfa == principal.mfa)
        {
            return out.extend_from_slice(&last.lines);
        }
        let start = out.len();
        write_identity_lines(out, principal);
        *last = Some(WrittenFor {
            user: user.clone(),
            mfa: principal.mfa.clone(),
            lines: out[start..].to_vec(),
        });
    }
}

/// The identity header lines of `principal`, written out.
fn write_identity_lines(out: &mut Vec<u8>, principal: &Principal) {
    for (name, value) in identity_values(principal) {
        h1::header(out, name.as_str(), value.as_bytes());
    }
    h1::header(out, "x-auth-mfa", principal.mfa.as_bytes());
}

/// Permission to forward, issued by the auth layer only; carries what the upstream is told.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The verified user, when known (absent for request-allowlisted and fail-open requests).
    pub(crate) user: Option<Arc<UserFacts>>,
    /// The `X-Auth-Mfa` value.
    pub(crate) mfa: HeaderValue,
}

/// The shared upstream connection pool and where it points.
pub struct Upstream {
    pool: pool::Pool,
    /// `Host` for a request that came without one (HTTP/1.0).
    authority_host: HeaderValue,
    timeout: Duration,
    forward_token: bool,
    /// Signs `X-Auth-Assertion` when `[identity.assertion]` is configured.
    assertion: Option<Arc<crate::assertion::Signer>>,
    metrics: Arc<Metrics>,
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        token: TokenConfig,
        assertion: Option<Arc<crate::assertion::Signer>>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let authority = config
            .url
            .authority()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("upstream.url has no host"))?;
        let tls = crate::tls::client_config(config.ca_file.as_deref())?;
        let pool = pool::Pool::new(
            &config.url,
            tls,
            config.connect_timeout,
            UPSTREAM_IDLE_TIMEOUT,
        )?;
        Ok(Upstream {
            pool,
            authority_host: HeaderValue::from_str(authority.as_str())?,
            timeout: config.timeout,
            forward_token: token.forward,
            assertion,
            metrics,
        })
    }

    /// The upstream request's target for the normalised `path` and the client's query. When
    /// normalising changed nothing (the common case), the client's path-and-query is reused as
    /// it is (already validated by hyper, shared rather than copied); else one string is built.
    fn target(&self, path: &str, original: &Uri) -> Result<PathAndQuery, GatewayError> {
        let unusable = |_| GatewayError::bad_request("request target cannot be forwarded");
        let path_and_query = match original.path_and_query() {
            Some(pq) if pq.path() == path => pq.clone(),
            _ => match original.query() {
                Some(query) => {
                    let mut target = String::with_capacity(path.len() + 1 + query.len());
                    target.push_str(path);
                    target.push('?');
                    target.push_str(query);
                    PathAndQuery::try_from(target).map_err(unusable)?
                }
                None => PathAndQuery::try_from(path).map_err(unusable)?,
            },
        };
        // Origin-form (`/path?query`): what an HTTP/1.1 request to an origin server carries.
        Ok(path_and_query)
    }

    /// The upstream request's head, written in one buffer: the client's end-to-end headers
    /// as they came ([`headers::Forwardable`]), then those the gateway sets (CONTRACT §4 "Sent
    /// upstream"). Nothing is inserted into or removed from the client's header map.
    fn request_head(
        &self,
        request: &Request<RequestBody>,
        info: &RequestInfo,
        principal: &Principal,
        websocket: bool,
        framing: h1::RequestFraming,
    ) -> Result<Vec<u8>, GatewayError> {
        let target = self.target(&info.path, request.uri())?;
        let client = request.headers();
        // The client's `Host` (or absolute-form authority) is kept: the app may serve several
        // names. A request without either (HTTP/1.0) names the upstream.
        let host = headers::first(client, &HOST)
            .map(HeaderValue::as_bytes)
            .or_else(|| request.uri().authority().map(|a| a.as_str().as_bytes()))
            .unwrap_or(self.authority_host.as_bytes());
        let mut out = Vec::with_capacity(HEAD_CAPACITY);
        h1::request_line(&mut out, request.method(), target.as_str());
        let forwardable = headers::Forwardable::new(client, websocket, self.forward_token);
        for (name, value) in client {
            if forwardable.keeps(name) {
                h1::header(&mut out, name.as_str(), value.as_bytes());
            }
        }
        h1::header(&mut out, "host", host);
        h1::header(&mut out, "x-forwarded-host", host);
        headers::write_forwarded_for(
            &mut out,
            headers::first(client, &headers::X_FORWARDED_FOR),
            &info.conn.peer_ip,
        );
        h1::header(&mut out, "x-forwarded-proto", info.conn.proto.as_bytes());
        h1::header(&mut out, "x-request-id", info.request_id.as_bytes());
        info.conn.identity_lines.write(&mut out, principal);
        if let Some(signer) = &self.assertion {
            let identity = principal.user.as_ref().map(|user| &user.identity);
            let fields = identity.map(|identity| {
                [
                    identity.user_id(),
                    identity.user_name(),
                    identity.domain_id(),
                    identity.domain_name(),
                ]
            });
            let field = |i: usize| fields.as_ref().map_or("", |fields| &fields[i]);
            let claims = crate::assertion::Claims {
                user_id: field(0),
                user_name: field(1),
                domain_id: field(2),
                domain_name: field(3),
                mfa: principal.mfa.to_str().unwrap_or("none"),
                request_id: info.request_id.to_str().unwrap_or_default(),
            };
            match signer.sign(&claims) {
                Ok(jwt) if h1::is_header_value(&jwt) => {
                    h1::header(&mut out, "x-auth-assertion", jwt.as_bytes());
                }
                _ => return Err(GatewayError::Internal("cannot sign the identity assertion")),
            }
        }
        if websocket {
            h1::header(&mut out, "connection", b"upgrade");
        }
        h1::end_head(&mut out, framing);
        Ok(out)
    }

    /// The request as the upstream gets it: its head written, and of the client's request only
    /// what sending needs (the rest is dropped here, not held while the upstream answers).
    pub fn prepare(
        &self,
        mut request: Request<RequestBody>,
        info: &RequestInfo,
        principal: &Principal,
        kept_as: h1::KeptHeaders,
    ) -> Result<Prepared, GatewayError> {
        let websocket = headers::is_websocket_upgrade(request.headers());
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut request));
        let framing = h1::RequestFraming::of(
            request.method(),
            request.headers(),
            request.body().is_end_stream(),
            request.body().size_hint().exact(),
        );
        let head = self.request_head(&request, info, principal, websocket, framing)?;
        let (parts, body) = request.into_parts();
        Ok(Prepared {
            method: parts.method,
            head,
            framing,
            websocket,
            kept_as,
            body,
            client_upgrade,
        })
    }

    /// Sends a prepared request and streams the answer back.
    pub async fn forward(&self, prepared: Prepared) -> Result<Response<Body>, GatewayError> {
        let outgoing = pool::Outgoing {
            method: &prepared.method,
            head: &prepared.head,
            framing: prepared.framing,
            websocket: prepared.websocket,
            kept_as: prepared.kept_as,
        };

        let started = tokio::time::Instant::now();
        let result = self
            .pool
            .send(outgoing, prepared.body, started, started + self.timeout)
            .await;
        let ended = match &result {
            Ok(answer) => answer.at,
            Err(_) => tokio::time::Instant::now(),
        };
        self.metrics
            .hot
            .upstream_duration(ended.saturating_duration_since(started).as_secs_f64());
        let pool::Answer {
            mut response,
            relayed,
            ..
        } = match result {
            Err(pool::SendError::Timeout) => {
                self.count(CLASS_TIMEOUT);
                return Err(GatewayError::UpstreamTimeout(self.timeout));
            }
            Err(err) => {
                self.count(CLASS_ERROR);
                return Err(GatewayError::UpstreamUnavailable(Box::new(err)));
            }
            Ok(answer) => answer,
        };
        self.count(status_class(response.status()));

        // The answer's hop-by-hop headers were left out as it was parsed.
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upgraded = response.body_mut().take_upgraded();
        if let (true, Some(client_upgrade), Some(upgraded)) =
            (switching, prepared.client_upgrade, upgraded)
        {
            tokio::spawn(tunnel(client_upgrade, upgraded));
        }
        Ok(response.map(|body| Body::forwarded(body, relayed)))
    }

    /// Counts an upstream answer (or its absence) by its class index.
    fn count(&self, class: usize) {
        self.metrics.hot.upstream_class(class);
    }
}

/// A request ready for the upstream ([`Upstream::prepare`]). Small on purpose: it is what the
/// proxy's future holds while the upstream answers, and that future is copied into its box.
pub struct Prepared {
    method: http::Method,
    head: Vec<u8>,
    framing: h1::RequestFraming,
    websocket: bool,
    kept_as: h1::KeptHeaders,
    body: RequestBody,
    /// The client's side of a WebSocket upgrade.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Room for a typical upstream request head, so that writing it allocates once.
const HEAD_CAPACITY: usize = 1024;

/// How long an upstream connection may sit idle in the pool before it is closed (nginx
/// closes its side after 75 s by default; hyper-util's client used 90 s).
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// `error` and `timeout` in [`crate::metrics::UPSTREAM_CLASSES`].
const CLASS_ERROR: usize = 5;
const CLASS_TIMEOUT: usize = 6;

/// The status class of an answer (`1xx` … `5xx`), as its index in
/// [`crate::metrics::UPSTREAM_CLASSES`].
fn status_class(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection until either
/// side closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: pool::Upgraded) {
    let client = match client.await {
        Ok(client) => client,
        Err(err) => {
            tracing::debug!(cause = %err, "websocket upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let (mut upstream, read_ahead) = upstream.into_parts();
    // What the upstream sent right after its 101 belongs to the client.
    if let Err(err) = tokio::io::AsyncWriteExt::write_all(&mut client, &read_ahead).await {
        tracing::debug!(cause = %err, "websocket tunnel ended with an error");
        return;
    }
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(cause = %err, "websocket tunnel ended with an error");
    }
}

/// The innermost service: forwards a request that the auth layer allowed.
#[derive(Clone)]
pub struct ProxyService {
    /// Replaced as a whole when a config reload changes `[upstream]` or `[token]`. Read
    /// through a cache: a request whose upstream has not changed since this service's last
    /// one checks that with one plain load, not the three atomic read-modify-writes of
    /// `ArcSwap::load_full` (the server keeps one service per connection; an idle connection
    /// keeps the upstream it last used alive until its next request or its end).
    upstream: arc_swap::Cache<Arc<ArcSwap<Upstream>>, Arc<Upstream>>,
}

impl ProxyService {
    pub fn new(upstream: Arc<ArcSwap<Upstream>>) -> Self {
        ProxyService {
            upstream: arc_swap::Cache::new(upstream),
        }
    }
}

impl tower::Service<Request<RequestBody>> for ProxyService {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let upstream = Arc::clone(self.upstream.load());
        // Prepared before the future is made: the client's request is not part of it.
        let prepared = prepare(&upstream, request);
        Box::pin(async move { upstream.forward(prepared?).await })
    }
}

/// The upstream request for `request`, with the decision and facts the layers before left in
/// its context (taken out, not copied: nothing after the proxy reads them).
fn prepare(
    upstream: &Upstream,
    mut request: Request<RequestBody>,
) -> Result<Prepared, GatewayError> {
    let context = RequestContext::of_mut(&mut request)?;
    let (Some(principal), Some(info)) = (context.principal.take(), context.info.take()) else {
        return Err(GatewayError::Internal(
            "request reached the proxy without a decision or request info",
        ));
    };
    let kept_as = if context.own_writer {
        h1::KeptHeaders::AsLines
    } else {
        h1::KeptHeaders::InMap
    };
    upstream.prepare(request, &info, &principal, kept_as)
}

/// The identity headers of CONTRACT §4 a principal carries (`X-Auth-Mfa` aside). Values come
/// from the IAM; one that is empty (CloudSSO has no domain name) or not a valid header value is
/// left out rather than forwarded mangled ([`crate::iam::Identity::header_values`]).
fn identity_values(
    principal: &Principal,
) -> impl Iterator<Item = (HeaderName, crate::iam::IdentityField<'_>)> {
    const NAMES: [HeaderName; 4] = [
        headers::X_AUTH_USER_ID,
        headers::X_AUTH_USER_NAME,
        headers::X_AUTH_DOMAIN_ID,
        headers::X_AUTH_DOMAIN_NAME,
    ];
    let values = principal
        .user
        .as_ref()
        .map_or([None; 4], |user| user.identity.header_values());
    NAMES
        .into_iter()
        .zip(values)
        .filter_map(|(name, value)| Some((name, value?)))
}

/// Writes the identity headers of CONTRACT §4 for a principal into a header map (the decision
/// endpoint's answer).
pub fn write_identity(headers: &mut http::HeaderMap, principal: &Principal) {
    for (name, value) in identity_values(principal) {
        if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
            headers.insert(name, value);
        }
    }
    headers.insert(headers::X_AUTH_MFA, principal.mfa.clone());
}

/// A response of the gateway's own with a small JSON or text body.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Body::new(http_body_util::Full::new(bytes.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::UPSTREAM_CLASSES;

    fn principal(user_id: &str, mfa: &'static str) -> Principal {
        let facts = UserFacts {
            identity: crate::iam::Identity::new(user_id, "name", "d-1", "acme").unwrap(),
            expires_at: std::time::SystemTime::now(),
            totp_login: false,
            mfa_device: Some(true),
            login_protect: None,
        };
        Principal {
            user: Some(Arc::new(facts)),
            mfa: HeaderValue::from_static(mfa),
        }
    }

    fn written(memo: &IdentityLines, principal: &Principal) -> String {
        let mut out = b"GET / HTTP/1.1\r\n".to_vec();
        memo.write(&mut out, principal);
        String::from_utf8(out).unwrap()
    }

    /// A connection's identity lines are reused for the same facts and `X-Auth-Mfa` only.
    #[test]
    fn each_principal_on_a_connection_gets_its_own_identity_lines() {
        let memo = IdentityLines::default();
        let alice = principal("u-alice", "mfa_device");
        let lines = |user: &str, mfa: &str| {
            format!(
                "GET / HTTP/1.1\r\nx-auth-user-id: {user}\r\nx-auth-user-name: name\r\n\
                 x-auth-domain-id: d-1\r\nx-auth-domain-name: acme\r\nx-auth-mfa: {mfa}\r\n"
            )
        };
        assert_eq!(written(&memo, &alice), lines("u-alice", "mfa_device"));
        assert_eq!(written(&memo, &alice), lines("u-alice", "mfa_device"));
        let bob = principal("u-bob", "mfa_device");
        assert_eq!(written(&memo, &bob), lines("u-bob", "mfa_device"));
        let bob_other_factor = Principal {
            mfa: HeaderValue::from_static("login_protect"),
            ..bob.clone()
        };
        assert_eq!(
            written(&memo, &bob_other_factor),
            lines("u-bob", "login_protect")
        );
        // The same identity in other facts (a refreshed cache entry) is written again.
        assert_eq!(
            written(&memo, &principal("u-alice", "none")),
            lines("u-alice", "none")
        );
        let anonymous = Principal {
            user: None,
            mfa: HeaderValue::from_static("none"),
        };
        assert_eq!(
            written(&memo, &anonymous),
            "GET / HTTP/1.1\r\nx-auth-mfa: none\r\n"
        );
    }

    #[test]
    fn identity_headers_carry_the_identity_and_bad_values_are_left_out() {
        let facts = UserFacts {
            identity: crate::iam::Identity::new("u-1", "bad\nname", "d-9", "").unwrap(),
            expires_at: std::time::SystemTime::now(),
            totp_login: false,
            mfa_device: Some(true),
            login_protect: None,
        };
        let principal = Principal {
            user: Some(Arc::new(facts)),
            mfa: HeaderValue::from_static("mfa_device"),
        };
        let mut headers = http::HeaderMap::new();
        write_identity(&mut headers, &principal);
        assert_eq!(headers[headers::X_AUTH_USER_ID], "u-1");
        assert_eq!(headers[headers::X_AUTH_DOMAIN_ID], "d-9");
        assert_eq!(headers[headers::X_AUTH_MFA], "mfa_device");
        // A control character cannot be forwarded; an empty domain name is not sent.
        assert!(!headers.contains_key(headers::X_AUTH_USER_NAME));
        assert!(!headers.contains_key(headers::X_AUTH_DOMAIN_NAME));
        assert_eq!(headers.len(), 3);
    }

    #[test]
    fn class_indexes_name_the_metric_labels() {
        assert_eq!(UPSTREAM_CLASSES[CLASS_ERROR], "error");
        assert_eq!(UPSTREAM_CLASSES[CLASS_TIMEOUT], "timeout");
        for (code, label) in [
            (101, "1xx"),
            (204, "2xx"),
            (302, "3xx"),
            (404, "4xx"),
            (503, "5xx"),
        ] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(UPSTREAM_CLASSES[status_class(status)], label);
        }
    }
}
