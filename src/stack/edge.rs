//! The outermost layer: the request's id and clock, errors turned into answers, the decision
//! counted and the access log line written — once per request, whatever happened inside.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::stack::RequestBody;
use http::header::HeaderValue;
use http::{Request, Response};

use crate::decision::{DecisionSlot, Reason};
use crate::error::{Fault, GatewayError};
use crate::metrics::{Metrics, DECISIONS};
use crate::proxy::{headers, Body};
use crate::stack::context::RequestContext;

/// Where the connection came from; put into every request by the server.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP address as a header value (`X-Forwarded-For`), formatted once per
    /// connection rather than once per request.
    pub peer_ip: HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
    /// What the framing observer saw of each HTTP/1 request head on this connection.
    pub framing: crate::server::framing::FramingVerdicts,
    /// The connection's last token and its cache key.
    pub key_memo: Arc<crate::cache::memo::KeyMemo>,
    /// The identity header lines last sent upstream for the connection.
    pub identity_lines: Arc<crate::proxy::IdentityLines>,
}

/// The client address for the access log, formatted lazily.
struct PeerIp(Option<SocketAddr>);

impl std::fmt::Display for PeerIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(peer) => write!(f, "{}", peer.ip()),
            None => Ok(()),
        }
    }
}

/// The user id for the access log, `-` before one is known; spelled out (a packed id) only if
/// the event is logged.
struct UserIdOf<'a>(Option<&'a crate::decision::Decision>);

impl std::fmt::Display for UserIdOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.and_then(|decision| decision.user_id()) {
            Some(user_id) => f.write_str(&user_id),
            None => f.write_str("-"),
        }
    }
}

/// A fresh `X-Request-Id`: a random (v4) UUID, hyphenated, formatted on the stack.
fn new_request_id() -> HeaderValue {
    let mut buffer = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// Whether the client is a browser asking for a page (`Accept` names `text/html`); API clients
/// and curl (`*/*`) get JSON.
fn prefers_html(request_headers: &http::HeaderMap) -> bool {
    headers::all(request_headers, &http::header::ACCEPT)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.split(';').next().unwrap_or_default().trim() == "text/html")
}

#[derive(Clone)]
pub struct EdgeLayer {
    metrics: Arc<Metrics>,
}

impl EdgeLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        EdgeLayer { metrics }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService {
            metrics: self.metrics.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct EdgeService<S> {
    metrics: Arc<Metrics>,
    inner: S,
}

/// Decrements the in-flight gauge even if the request future is dropped (client gone).
struct InflightGuard(Arc<Metrics>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight_requests.dec();
    }
}

impl<S> tower::Service<Request<RequestBody>> for EdgeService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner services are always ready; readiness is checked per call below.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let metrics = self.metrics.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let started = Instant::now();
            metrics.inflight_requests.inc();
            let _inflight = InflightGuard(metrics.clone());

            let request_id = headers::first(request.headers(), &headers::X_REQUEST_ID)
                .filter(|value| headers::acceptable_request_id(value))
                .cloned()
                .unwrap_or_else(new_request_id);
            let slot = DecisionSlot::default();
            let method = request.method().clone();
            let wants_html = prefers_html(request.headers());
            // The id is chosen here so that even a refused request's answer carries one.
            let mut peer = None;
            if let Ok(context) = RequestContext::of_mut(&mut request) {
                peer = context.conn.as_ref().map(|conn| conn.peer);
                context.request_id = Some(request_id.clone());
                context.slot = Some(slot.clone());
            }

            let result = match std::future::poll_fn(|cx| inner.poll_ready(cx)).await {
                Ok(()) => inner.call(request).await,
                Err(err) => Err(err),
            };

            let request_id_text = request_id.to_str().unwrap_or_default();
            let (mut response, error) = match result {
                Ok(response) => (response, None),
                Err(err) => {
                    let text = match std::error::Error::source(&err) {
                        Some(source) => format!("{err}: {source}"),
                        None => err.to_string(),
                    };
                    let fault = err.fault();
                    let reason = err.reason();
                    (
                        err.into_response(request_id_text, wants_html),
                        Some((text, fault, reason)),
                    )
                }
            };
            response
                .headers_mut()
                .insert(headers::X_REQUEST_ID, request_id.clone());

            let decision = slot.get();
            // (allow, reason) of what is counted: the auth layer's decision, else the refusal.
            let counted: Option<(bool, Reason)> = match (decision, &error) {
                (Some(decision), _) => Some((decision.allow, decision.reason)),
                (None, Some((_, _, Some(reason)))) => Some((false, *reason)),
                _ => None,
            };
            let elapsed = started.elapsed();
            if let Some((allow, reason)) = counted {
                let d = usize::from(!allow);
                metrics.decision_counters[d][reason.index()].inc();
                if let Some(route) = decision.and_then(|d| d.route.as_deref()) {
                    metrics
                        .route_decisions
                        .with_label_values(&[route, DECISIONS[d], reason.label()])
                        .inc();
                }
                metrics.request_duration_by_decision[d].observe(elapsed.as_secs_f64());
            }
            let decision_label = counted.map(|(allow, _)| DECISIONS[usize::from(!allow)]);
            let reason_label = counted.map(|(_, reason)| reason.label());

            let path = slot.path().unwrap_or("-");
            let user_id = UserIdOf(decision);
            let rule = decision.and_then(|d| d.rule.as_deref()).unwrap_or("-");
            let rule_reason = decision
                .and_then(|d| d.rule_reason.as_deref())
                .unwrap_or("-");
            let status = response.status().as_u16();
            let latency_ms = elapsed.as_secs_f64() * 1000.0;
            // Formatted by tracing only if the event is enabled.
            let peer = PeerIp(peer);
            let decision_label = decision_label.unwrap_or("-");
            let reason_label = reason_label.unwrap_or("-");
            match &error {
                Some((cause, Fault::Iam | Fault::Upstream | Fault::Internal, _)) => {
                    tracing::error!(
                        target: "mfa_gate::access",
                        request_id = request_id_text, method = %method, path, status,
                        decision = decision_label, reason = reason_label, user_id = %user_id, rule,
                        rule_reason, client = %peer, latency_ms, error = %cause,
                        "request"
                    );
                }
                _ => {
                    tracing::info!(
                        target: "mfa_gate::access",
                        request_id = request_id_text, method = %method, path, status,
                        decision = decision_label, reason = reason_label, user_id = %user_id, rule,
                        rule_reason, client = %peer, latency_ms,
                        "request"
                    );
                }
            }
            Ok(response)
        })
    }
}
