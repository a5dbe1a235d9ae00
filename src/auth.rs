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

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::stack::RequestBody;
use arc_swap::ArcSwap;
use futures_util::future::{ready, Either, Ready};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use ipnet::IpNet;

use crate::cache::memo::KeyMemo;
use crate::cache::{CacheResult, TokenCache};
use crate::config::{AllowRule, Mode, OnIamError};
use crate::decision::{Decision, DecisionSlot, Reason};
use crate::error::GatewayError;
use crate::iam::{IamError, TokenStatus, UserFacts};
use crate::metrics::Metrics;
use crate::policy::{self, Policy, Subject, NO_FACTOR};
use crate::proxy::{self, path, Body, Principal, RequestInfo};
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
        let judge = Judge::new(self, &policy, subject, slot);
        match judge.before_facts(token) {
            Ok(token) => judge.with_facts(self.cache.lookup_on(token, key_memo).await),
            Err(decided) => decided,
        }
    }

    /// [`Auth::decide`] at once, when nothing has to be awaited: the request is allowlisted or
    /// has no token, or the connection remembers a fresh answer for its token (the common
    /// case: a kept-alive client sending its token again). `None`: the token's facts must be
    /// looked up; nothing is decided or counted yet.
    /// `arrived`: when the request came in, what a remembered answer must still be fresh at.
    fn decide_now(
        &self,
        subject: Subject<'_>,
        token: Option<&Token>,
        key_memo: &KeyMemo,
        slot: &DecisionSlot,
        arrived: Instant,
    ) -> Option<Result<Principal, GatewayError>> {
        let policy = self.policy.load();
        let judge = Judge::new(self, &policy, subject, slot);
        match judge.before_facts(token) {
            Ok(token) => {
                let remembered = self.cache.remembered_on(token, key_memo, arrived)?;
                Some(judge.with_facts(Ok(remembered)))
            }
            Err(decided) => Some(decided),
        }
    }

    fn count_rule(&self, name: &str) {
        self.metrics
            .allowlist_matches
            .with_label_values(&[name])
            .inc();
    }
}

/// One request's decision under one policy: what is decided before the token's facts are
/// known, and what after.
struct Judge<'a> {
    auth: &'a Auth,
    policy: &'a Policy,
    subject: Subject<'a>,
    effective: policy::Effective<'a>,
    route: Option<Arc<str>>,
    slot: &'a DecisionSlot,
}

impl<'a> Judge<'a> {
    fn new(
        auth: &'a Auth,
        policy: &'a Policy,
        subject: Subject<'a>,
        slot: &'a DecisionSlot,
    ) -> Self {
        let effective = policy.effective(subject.path);
        let route = effective
            .route
            .map(|route| Arc::<str>::from(route.name.as_str()));
        Judge {
            auth,
            policy,
            subject,
            effective,
            route,
            slot,
        }
    }

    /// Leaves the decision in the request's slot.
    fn decided(
        &self,
        allow: bool,
        reason: Reason,
        rule: Option<&AllowRule>,
        user: Option<&Arc<UserFacts>>,
    ) {
        self.slot.set(Decision {
            allow,
            reason,
            route: self.route.clone(),
            rule: rule.map(|rule| Arc::from(rule.name.as_str())),
            rule_reason: rule.and_then(|rule| rule.reason.clone()),
            user: user.cloned(),
        });
    }

    /// The token whose facts decide, or the decision made without them: an allowlisted
    /// request, or a request without a token.
    fn before_facts<'t>(
        &self,
        token: Option<&'t Token>,
    ) -> Result<&'t Token, Result<Principal, GatewayError>> {
        if let Some(rule) = self.policy.match_request(self.subject) {
            self.auth.count_rule(&rule.name);
            self.decided(true, Reason::Allowlisted, Some(rule), None);
            return Err(Ok(Principal {
                user: None,
                mfa: NO_FACTOR,
            }));
        }
        token.ok_or(Err(GatewayError::NoToken))
    }

    /// The decision on the token's facts, as the cache (or the IAM behind it) gave them.
    fn with_facts(
        &self,
        looked_up: Result<(TokenStatus, CacheResult), Arc<IamError>>,
    ) -> Result<Principal, GatewayError> {
        let facts = match looked_up {
            Ok((TokenStatus::Valid(facts), _)) => facts,
            Ok((TokenStatus::Invalid, _)) => return Err(GatewayError::InvalidToken),
            Err(err) => {
                return match self.policy.on_iam_error() {
                    OnIamError::Deny => Err(GatewayError::IamUnavailable(err)),
                    OnIamError::Allow => {
                        tracing::warn!(cause = %err, "IAM unavailable; letting the request through (policy.on_iam_error = \"allow\")");
                        self.decided(true, Reason::IamUnavailable, None, None);
                        Ok(Principal {
                            user: None,
                            mfa: NO_FACTOR,
                        })
                    }
                };
            }
        };
        if let Some(rule) = self.policy.match_identity(self.subject, &facts.identity) {
            self.auth.count_rule(&rule.name);
            self.decided(true, Reason::Allowlisted, Some(rule), Some(&facts));
            return Ok(Principal {
                user: Some(facts.clone()),
                mfa: NO_FACTOR,
            });
        }

        let evaluation = self.policy.evaluate(&facts, self.effective);
        if evaluation.satisfied {
            self.decided(true, Reason::MfaVerified, None, Some(&facts));
            return Ok(Principal {
                user: Some(facts.clone()),
                mfa: evaluation.factors,
            });
        }
        match self.effective.mode {
            Mode::ReportOnly => {
                self.decided(true, Reason::ReportOnly, None, Some(&facts));
                Ok(Principal {
                    user: Some(facts.clone()),
                    mfa: NO_FACTOR,
                })
            }
            Mode::Enforce => {
                self.decided(false, Reason::NoMfa, None, Some(&facts));
                Err(GatewayError::NoMfa {
                    help_url: self.policy.help_url().cloned(),
                })
            }
        }
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

/// What is decided about: the request itself, or for the decision endpoint the original
/// request it describes; borrowed from the request's context.
struct Asking<'r> {
    method: Cow<'r, Method>,
    path: Cow<'r, str>,
    info: &'r RequestInfo,
    slot: Cow<'r, DecisionSlot>,
    /// When the edge took the request in (now, in a stack without the edge).
    arrived: Instant,
    /// The decision endpoint: the decision is the answer, nothing is forwarded.
    endpoint: bool,
}

impl<'r> Asking<'r> {
    fn of(auth: &Auth, request: &'r Request<RequestBody>) -> Result<Self, GatewayError> {
        let context = RequestContext::of(request)?;
        let Some(info) = context.info.as_ref() else {
            return Err(GatewayError::Internal(
                "request reached auth without request info",
            ));
        };
        let slot = match &context.slot {
            Some(slot) => Cow::Borrowed(slot),
            None => Cow::Owned(DecisionSlot::default()),
        };
        let arrived = context.arrived.unwrap_or_else(Instant::now);
        if &*info.path == DECISION_PATH {
            let trusted = auth.policy.load().trusted_proxies().to_vec();
            let (method, path) = original_request(request.headers(), info.peer().ip(), &trusted)?;
            return Ok(Asking {
                method: Cow::Owned(method),
                path: Cow::Owned(path),
                info,
                slot,
                arrived,
                endpoint: true,
            });
        }
        Ok(Asking {
            method: Cow::Borrowed(request.method()),
            path: Cow::Borrowed(&info.path),
            info,
            slot,
            arrived,
            endpoint: false,
        })
    }

    fn subject(&self) -> Subject<'_> {
        Subject {
            method: &self.method,
            path: &self.path,
            peer: self.info.peer().ip(),
            now: crate::policy::JudgedAt::Now,
        }
    }

    fn decide_now(&self, auth: &Auth) -> Option<Result<Principal, GatewayError>> {
        let token = self.info.token.as_ref();
        let memo = &self.info.conn.key_memo;
        auth.decide_now(self.subject(), token, memo, &self.slot, self.arrived)
    }

    async fn decide(&self, auth: &Auth) -> Result<Principal, GatewayError> {
        let token = self.info.token.as_ref();
        auth.decide(self.subject(), token, &self.info.conn.key_memo, &self.slot)
            .await
    }
}

/// Where an allowed request goes on: the decision endpoint's answer (with the identity
/// headers), or `None` for the request to be forwarded, now with its principal.
fn pass(
    request: &mut Request<RequestBody>,
    principal: Principal,
    endpoint: bool,
) -> Result<Option<Response<Body>>, GatewayError> {
    if endpoint {
        let mut response = Response::new(proxy::full_body(""));
        *response.status_mut() = StatusCode::OK;
        proxy::write_identity(response.headers_mut(), &principal);
        return Ok(Some(response));
    }
    RequestContext::of_mut(request)?.principal = Some(principal);
    Ok(None)
}

type Later = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

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
    /// A request decided at once (see [`Auth::decide_now`]) goes on as the inner service's
    /// future itself, or is answered at once; only one whose token's facts are looked up
    /// gets a future (boxed) of its own.
    type Future = Either<S::Future, Either<Ready<Result<Response<Body>, GatewayError>>, Later>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let now = match Asking::of(&self.auth, &request) {
            Ok(asking) => asking
                .decide_now(&self.auth)
                .map(|decided| decided.map(|principal| (principal, asking.endpoint))),
            Err(err) => Some(Err(err)),
        };
        match now.map(|decided| {
            decided.and_then(|(principal, endpoint)| pass(&mut request, principal, endpoint))
        }) {
            // The inner service was polled ready just before, and is called right here.
            Some(Ok(None)) => Either::Left(self.inner.call(request)),
            Some(Ok(Some(answer))) => Either::Right(Either::Left(ready(Ok(answer)))),
            Some(Err(err)) => Either::Right(Either::Left(ready(Err(err)))),
            None => {
                let auth = self.auth.clone();
                // The service that was polled ready is the one called (tower's clone-and-swap
                // idiom).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Either::Right(Either::Right(Box::pin(async move {
                    let asking = Asking::of(&auth, &request)?;
                    let principal = asking.decide(&auth).await?;
                    let endpoint = asking.endpoint;
                    match pass(&mut request, principal, endpoint)? {
                        Some(answer) => Ok(answer),
                        None => inner.call(request).await,
                    }
                })))
            }
        }
    }
}
