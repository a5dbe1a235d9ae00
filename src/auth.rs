//! Who the caller is and whether they may pass: the auth layer of the stack.
//!
//! In request order (CONTRACT §1): request allowlist → token → identity and MFA facts (cache,
//! then IAM) → identity allowlist → policy. An allowed request leaves with a [`Principal`] in its
//! context ([`RequestContext`]), which the proxy requires; a denied one with a [`GatewayError`]. Either way the
//! decision is left in the request's [`DecisionSlot`] for the edge layer to count and log.
//!
//! The decision endpoint (`/.mfa-gate/auth`) runs the same decision on the original request
//! described by `X-Forwarded-*`/`X-Original-*` headers, and answers it without forwarding.

pub mod token;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::stack::RequestBody;
use arc_swap::ArcSwap;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use ipnet::IpNet;

use crate::cache::memo::KeyMemo;
use crate::cache::TokenCache;
use crate::config::{AllowRule, Mode, OnIamError};
use crate::decision::{Decision, DecisionSlot, Reason};
use crate::error::GatewayError;
use crate::iam::{TokenStatus, UserFacts};
use crate::metrics::Metrics;
use crate::policy::{self, Policy, Subject, NO_FACTOR};
use crate::proxy::{self, path, Body, Principal};
use crate::stack::context::RequestContext;

use self::token::Token;

/// The decision endpoint for nginx `auth_request`, Traefik ForwardAuth and Envoy `ext_authz`.
pub const DECISION_PATH: &str = "/.mfa-gate/auth";

/// Everything the auth layer decides with; shared by all requests.
pub struct Auth {
    pub policy: Arc<ArcSwap<Policy>>,
    pub cache: TokenCache,
    pub metrics: Arc<Metrics>,
}

impl Auth {
    /// Decides about one request. Leaves the decision in `slot` whatever it is. `key_memo`
    /// is the client connection's (the cache key of a token seen again is not recomputed).
    async fn decide(
        &self,
        subject: Subject<'_>,
        token: Option<&Token>,
        key_memo: &KeyMemo,
        slot: &DecisionSlot,
    ) -> Result<Principal, GatewayError> {
        let policy = self.policy.load();
        let effective = policy.effective(subject.path);
        let route = effective
            .route
            .map(|route| Arc::<str>::from(route.name.as_str()));
        let decided = |allow: bool,
                       reason: Reason,
                       rule: Option<&AllowRule>,
                       user: Option<&Arc<UserFacts>>| {
            slot.set(Decision {
                allow,
                reason,
                route: route.clone(),
                rule: rule.map(|rule| Arc::from(rule.name.as_str())),
                rule_reason: rule.and_then(|rule| rule.reason.clone()),
                user: user.cloned(),
            });
        };

        if let Some(rule) = policy.match_request(subject) {
            self.count_rule(&rule.name);
            decided(true, Reason::Allowlisted, Some(rule), None);
            return Ok(Principal {
                user: None,
                mfa: NO_FACTOR,
            });
        }

        let token = token.ok_or(GatewayError::NoToken)?;
        let facts = match self.cache.lookup_on(token, key_memo).await {
            Ok((TokenStatus::Valid(facts), _)) => facts,
            Ok((TokenStatus::Invalid, _)) => return Err(GatewayError::InvalidToken),
            Err(err) => {
                return match policy.on_iam_error() {
                    OnIamError::Deny => Err(GatewayError::IamUnavailable(err)),
                    OnIamError::Allow => {
                        tracing::warn!(cause = %err, "IAM unavailable; letting the request through (policy.on_iam_error = \"allow\")");
                        decided(true, Reason::IamUnavailable, None, None);
                        Ok(Principal {
                            user: None,
                            mfa: NO_FACTOR,
                        })
                    }
                };
            }
        };
        if let Some(rule) = policy.match_identity(subject, &facts.identity) {
            self.count_rule(&rule.name);
            decided(true, Reason::Allowlisted, Some(rule), Some(&facts));
            return Ok(Principal {
                user: Some(facts.clone()),
                mfa: NO_FACTOR,
            });
        }

        let evaluation = policy.evaluate(&facts, effective);
        if evaluation.satisfied {
            decided(true, Reason::MfaVerified, None, Some(&facts));
            return Ok(Principal {
                user: Some(facts.clone()),
                mfa: evaluation.factors,
            });
        }
        match effective.mode {
            Mode::ReportOnly => {
                decided(true, Reason::ReportOnly, None, Some(&facts));
                Ok(Principal {
                    user: Some(facts.clone()),
                    mfa: NO_FACTOR,
                })
            }
            Mode::Enforce => {
                decided(false, Reason::NoMfa, None, Some(&facts));
                Err(GatewayError::NoMfa {
                    help_url: policy.help_url().cloned(),
                })
            }
        }
    }

    fn count_rule(&self, name: &str) {
        self.metrics
            .allowlist_matches
            .with_label_values(&[name])
            .inc();
    }
}

/// The original request a proxy asks the decision endpoint about (CONTRACT §4 "Decision
/// endpoint"): believed only from trusted peers, else judged as `GET /`.
fn original_request(
    headers: &HeaderMap,
    peer: IpAddr,
    trusted: &[IpNet],
) -> Result<(Method, String), GatewayError> {
    if !policy::is_trusted(peer, trusted) {
        return Ok((Method::GET, "/".to_string()));
    }
    let first = |names: [&str; 2]| names.iter().find_map(|name| headers.get(*name));
    let method = match first(["x-forwarded-method", "x-original-method"]) {
        Some(value) => Method::from_bytes(value.as_bytes())
            .map_err(|_| GatewayError::bad_request("X-Forwarded-Method is not a method"))?,
        None => Method::GET,
    };
    let uri = match first(["x-forwarded-uri", "x-original-uri"]) {
        Some(value) => value
            .to_str()
            .map_err(|_| GatewayError::bad_request("X-Forwarded-Uri is not visible ASCII"))?,
        None => "/",
    };
    let raw_path = uri.split(['?', '#']).next().unwrap_or_default();
    let path = path::normalize(raw_path)
        .map_err(|err| GatewayError::bad_request(format!("original URI: {err}")))?;
    Ok((method, path.into_owned()))
}

/// The tower layer that puts [`Auth`] in front of a service.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Auth>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Auth>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            auth: self.auth.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    auth: Arc<Auth>,
    inner: S,
}

impl<S> tower::Service<Request<RequestBody>> for AuthService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let auth = self.auth.clone();
        // The service that was polled ready is the one called (tower's clone-and-swap idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let context = RequestContext::of(&request)?;
            let slot = context.slot.clone().unwrap_or_default();
            // Borrowed, not copied: the proxy takes it out of the request later.
            let Some(info) = context.info.as_ref() else {
                return Err(GatewayError::Internal(
                    "request reached auth without request info",
                ));
            };

            if &*info.path == DECISION_PATH {
                let trusted = auth.policy.load().trusted_proxies().to_vec();
                let (method, path) = original_request(request.headers(), info.peer.ip(), &trusted)?;
                let subject = Subject {
                    method: &method,
                    path: &path,
                    peer: info.peer.ip(),
                    now: std::time::SystemTime::now(),
                };
                let principal = auth
                    .decide(subject, info.token.as_ref(), &info.key_memo, &slot)
                    .await?;
                let mut response = Response::new(proxy::full_body(""));
                *response.status_mut() = StatusCode::OK;
                proxy::write_identity(response.headers_mut(), &principal);
                return Ok(response);
            }

            let subject = Subject {
                method: request.method(),
                path: &info.path,
                peer: info.peer.ip(),
                now: std::time::SystemTime::now(),
            };
            let principal = auth
                .decide(subject, info.token.as_ref(), &info.key_memo, &slot)
                .await?;
            RequestContext::of_mut(&mut request)?.principal = Some(principal);
            inner.call(request).await
        })
    }
}
