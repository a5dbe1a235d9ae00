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
use futures_util::future::{ready, Either, Ready};
use http::header::HeaderValue;
use http::{Method, Request, Response};

use crate::decision::{DecisionSlot, Reason};
use crate::error::{Fault, GatewayError};
use crate::metrics::{Metrics, DECISIONS};
use crate::proxy::{headers, Body};
use crate::stack::context::RequestContext;

/// Where the connection came from and what its requests share; made once per connection and
/// shared by its requests (one reference count per request, not one per field).
#[derive(Debug)]
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
    pub key_memo: crate::cache::memo::KeyMemo,
    /// The identity header lines last sent upstream for the connection.
    pub identity_lines: crate::proxy::IdentityLines,
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
            unready: None,
        }
    }
}

pub struct EdgeService<S> {
    metrics: Arc<Metrics>,
    inner: S,
    /// Why the inner service could not serve, if it said so when polled; the next call answers
    /// with it.
    unready: Option<GatewayError>,
}

impl<S: Clone> Clone for EdgeService<S> {
    /// A clone is polled ready on its own before it is called (tower's rule): it starts with
    /// nothing to answer.
    fn clone(&self) -> Self {
        EdgeService {
            metrics: self.metrics.clone(),
            inner: self.inner.clone(),
            unready: None,
        }
    }
}

/// Decrements the in-flight gauge even if the request future is dropped (client gone).
struct InflightGuard(Arc<Metrics>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.hot.request_finished();
    }
}

impl<S> tower::Service<Request<RequestBody>> for EdgeService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<Body>, Error = GatewayError>,
    S::Future: Unpin,
{
    type Response = Response<Body>;
    type Error = Infallible;
    /// A future of its own, not a boxed one: the inner service's future and what the answer is
    /// finished with, kept where the server keeps this future (for the gateway's own HTTP/1.1
    /// path, in the connection's task) — no allocation, and the request is not copied into one.
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // An inner service that cannot serve is answered for, as any other error is, in `call`.
        self.inner.poll_ready(cx).map(|ready| {
            self.unready = ready.err();
            Ok(())
        })
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let started = Instant::now();
        self.metrics.hot.request_started();
        let inflight = InflightGuard(self.metrics.clone());

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
            context.arrived = Some(started);
        }
        let inner = match self.unready.take() {
            None => Either::Left(self.inner.call(request)),
            Some(err) => Either::Right(ready(Err(err))),
        };
        EdgeFuture {
            inner,
            finish: Some(Finish {
                inflight,
                started,
                request_id,
                slot,
                method,
                wants_html,
                peer,
            }),
        }
    }
}

/// The answer to one request: the inner service's, or the error it ended in turned into one;
/// counted and logged when it is ready.
pub struct EdgeFuture<F> {
    inner: Either<F, Ready<Result<Response<Body>, GatewayError>>>,
    /// Taken when the answer is ready.
    finish: Option<Finish>,
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response<Body>, GatewayError>> + Unpin,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        let finish = self
            .finish
            .take()
            .expect("an EdgeFuture is not polled after it is ready");
        Poll::Ready(Ok(finish.answer(result)))
    }
}

/// What the edge knows of a request while its answer is awaited. Dropped unanswered (the
/// client went away), it still takes the request off the in-flight gauge.
struct Finish {
    inflight: InflightGuard,
    started: Instant,
    request_id: HeaderValue,
    slot: DecisionSlot,
    method: Method,
    wants_html: bool,
    peer: Option<SocketAddr>,
}

impl Finish {
    /// The answer to give for `result`, with the request id on it; counts the decision and
    /// writes the access log line.
    fn answer(self, result: Result<Response<Body>, GatewayError>) -> Response<Body> {
        let Finish {
            inflight,
            started,
            request_id,
            slot,
            method,
            wants_html,
            peer,
        } = self;
        let metrics = &inflight.0;
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
            metrics
                .hot
                .decided(d, reason.index(), elapsed.as_secs_f64());
            if let Some(route) = decision.and_then(|d| d.route.as_deref()) {
                metrics
                    .route_decisions
                    .with_label_values(&[route, DECISIONS[d], reason.label()])
                    .inc();
            }
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
        response
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};

    use super::*;

    /// A service that says, when polled, that it cannot serve.
    #[derive(Clone)]
    struct Unready;

    impl tower::Service<Request<RequestBody>> for Unready {
        type Response = Response<Body>;
        type Error = GatewayError;
        type Future = Ready<Result<Response<Body>, GatewayError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
            Poll::Ready(Err(GatewayError::Internal("the test service is not ready")))
        }

        fn call(&mut self, _: Request<RequestBody>) -> Self::Future {
            panic!("called though it said it could not serve");
        }
    }

    #[tokio::test]
    async fn an_inner_service_that_cannot_serve_is_answered_for_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let edge = EdgeLayer::new(metrics.clone()).layer(Unready);
        let request = Request::builder()
            .uri("/app")
            .header("x-request-id", "req-unready-1")
            .body(RequestBody::Empty)
            .unwrap();

        let Ok(response) = edge.oneshot(request).await;

        assert_eq!(response.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()["x-request-id"], "req-unready-1");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error_code"], "MFAGATE.INTERNAL", "{body}");
        assert_eq!(body["request_id"], "req-unready-1", "{body}");
        let text = metrics.render();
        assert!(text.contains("\nmfa_gate_inflight_requests 0\n"), "{text}");
    }

    #[test]
    fn fresh_request_ids_are_distinct_v4_uuids() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| new_request_id().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version(), Some(uuid::Version::Random), "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert_eq!(id.len(), 36, "{id}");
            assert_eq!(*id, id.to_lowercase(), "{id}");
        }
    }
}
