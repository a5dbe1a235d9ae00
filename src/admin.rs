//! The admin listener (CONTRACT §2, §6): `/metrics`, `/healthz`, `/readyz`, and `/admin/*`
//! actions guarded by `admin.token_file`. Kept off the main listener so that it can be bound to
//! loopback or a cluster-internal port and never faces clients.

pub mod disable;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cache::TokenCache;
use crate::config::AdminToken;
use crate::metrics::Metrics;

/// What the admin endpoints read and act on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub cache: TokenCache,
    /// `admin.token_file`'s token; `None` leaves `/admin/*` open (bind the admin listener to
    /// loopback then).
    pub token: arc_swap::ArcSwap<Option<AdminToken>>,
    /// Listeners bound and config loaded.
    pub ready: AtomicBool,
    /// Shutdown has begun: `/readyz` answers 503 so that load balancers stop sending traffic.
    pub draining: AtomicBool,
    /// The assertion signer, whose public key `/.well-known/jwks.json` serves.
    pub assertion: arc_swap::ArcSwap<Option<Arc<crate::assertion::Signer>>>,
    /// The policy in force, for `/admin/explain`.
    pub policy: Arc<arc_swap::ArcSwap<crate::policy::Policy>>,
    /// The IAM v5 client for admin actions, when `[iam.v5]` is configured.
    pub v5: arc_swap::ArcSwap<Option<Arc<crate::iam::v5::V5Client>>>,
}

type AdminResponse = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: serde_json::Value) -> AdminResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> AdminResponse {
    json_response(status, json!({"error_code": code, "error_msg": message}))
}

impl AdminState {
    /// Whether the request carries the admin token. Compared as SHA-256 digests so the time
    /// taken says nothing about how much of a guess was right.
    /// Who acts, for the audit log: a short fingerprint of the admin token presented (never the
    /// token), or `open` when the admin API needs none.
    fn actor(&self, request: &Request<Incoming>) -> String {
        if self.token.load().is_none() {
            return "open".into();
        }
        request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|value| {
                let digest = Sha256::digest(value.as_bytes());
                format!("sha256:{}", hex::encode(&digest[..6]))
            })
            .unwrap_or_else(|| "none".into())
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let token = self.token.load();
        let Some(expected) = token.as_ref() else {
            return true;
        };
        let presented = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, rest) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        match presented {
            Some(presented) => {
                Sha256::digest(presented.as_bytes()) == Sha256::digest(expected.0.as_bytes())
            }
            None => false,
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> AdminResponse {
        let path = request.uri().path().to_string();
        let path = path.as_str();
        match (request.method(), path) {
            (&Method::GET, "/metrics") => {
                let entries = self.cache.entry_count().await;
                self.metrics
                    .cache_entries
                    .set(i64::try_from(entries).unwrap_or(i64::MAX));
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.render())));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            (&Method::GET, "/.well-known/jwks.json") => match self.assertion.load().as_ref() {
                Some(signer) => json_response(StatusCode::OK, signer.jwks()),
                None => error(
                    StatusCode::NOT_FOUND,
                    "MFAGATE.NOT_CONFIGURED",
                    "no [identity.assertion] in the config",
                ),
            },
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                if self.draining.load(Ordering::Acquire) {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "draining"}),
                    )
                } else if self.ready.load(Ordering::Acquire) {
                    json_response(StatusCode::OK, json!({"status": "ready"}))
                } else {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "starting"}),
                    )
                }
            }
            (_, "/metrics" | "/healthz" | "/readyz") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MFAGATE.METHOD_NOT_ALLOWED",
                "use GET",
            ),
            (method, path) if path.starts_with("/admin/") => {
                if !self.authorized(&request) {
                    let action = if path.ends_with("/mfa-devices/disable") {
                        "disable_mfa_device"
                    } else {
                        "cache_purge"
                    };
                    self.count(action, "unauthorized");
                    tracing::warn!(target: "mfa_gate::audit", action, actor = %self.actor(&request), result = "unauthorized", "admin action refused");
                    let mut response = error(
                        StatusCode::UNAUTHORIZED,
                        "MFAGATE.ADMIN_UNAUTHORIZED",
                        "the admin API needs Authorization: Bearer <admin token>",
                    );
                    response.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"mfa-gate-admin\""),
                    );
                    return response;
                }
                if let Some(user_id) = path
                    .strip_prefix("/admin/users/")
                    .and_then(|rest| rest.strip_suffix("/mfa-devices/disable"))
                {
                    if method != Method::POST {
                        return error(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "MFAGATE.METHOD_NOT_ALLOWED",
                            "use POST",
                        );
                    }
                    let Some(user_id) = percent_decode(user_id).filter(|id| !id.contains('/'))
                    else {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "MFAGATE.BAD_REQUEST",
                            "malformed user id",
                        );
                    };
                    return self.disable_mfa(request, &user_id).await;
                }
                match (method, path) {
                    (&Method::POST, "/admin/explain") => self.explain(request).await,
                    (&Method::POST, "/admin/cache/purge") => self.purge(&request).await,
                    (_, "/admin/cache/purge") => error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MFAGATE.METHOD_NOT_ALLOWED",
                        "use POST",
                    ),
                    _ => error(
                        StatusCode::NOT_FOUND,
                        "MFAGATE.NOT_FOUND",
                        "no such admin endpoint",
                    ),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "MFAGATE.NOT_FOUND",
                "no such endpoint",
            ),
        }
    }

    fn count(&self, action: &str, result: &str) {
        self.metrics
            .admin_actions
            .with_label_values(&[action, result])
            .inc();
    }

    /// `POST /admin/users/{user_id}/mfa-devices/disable`.
    async fn disable_mfa(&self, request: Request<Incoming>, user_id: &str) -> AdminResponse {
        use http_body_util::BodyExt;
        let actor = self.actor(&request);
        let body = match http_body_util::Limited::new(request.into_body(), 4096)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "MFAGATE.BAD_REQUEST",
                    "the body is unreadable or over 4 KiB",
                )
            }
        };
        let v5 = self.v5.load_full();
        let outcome = disable::disable(
            v5.as_ref().as_ref().map(|client| client.as_ref()),
            &self.cache,
            user_id,
            &body,
        )
        .await;
        self.count("disable_mfa_device", outcome.result);
        let serial = outcome.body["serial_number"]
            .as_str()
            .unwrap_or("-")
            .to_string();
        tracing::warn!(
            target: "mfa_gate::audit",
            action = "disable_mfa_device", actor = %actor, user_id, serial_number = %serial,
            result = outcome.result, status = outcome.status.as_u16(),
            "admin action"
        );
        json_response(outcome.status, outcome.body)
    }

    /// `POST /admin/explain` with `{"method", "path", "client"?, "user_id"?, "token"?}`: the
    /// explanation of `mfa-gate explain` as JSON, against the running policy and cache.
    async fn explain(&self, request: Request<Incoming>) -> AdminResponse {
        use http_body_util::BodyExt;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Ask {
            #[serde(default)]
            method: Option<String>,
            path: String,
            #[serde(default)]
            client: Option<std::net::IpAddr>,
            #[serde(default)]
            user_id: Option<String>,
            #[serde(default)]
            token: Option<String>,
        }
        let bad = |message: &str| error(StatusCode::BAD_REQUEST, "MFAGATE.BAD_REQUEST", message);
        let Ok(body) = http_body_util::Limited::new(request.into_body(), 32 * 1024)
            .collect()
            .await
        else {
            return bad("the body is unreadable or over 32 KiB");
        };
        let Ok(ask) = serde_json::from_slice::<Ask>(&body.to_bytes()) else {
            return bad("expected {\"method\", \"path\", \"client\"?, \"user_id\"?, \"token\"?}");
        };
        let Ok(method) = Method::from_bytes(ask.method.as_deref().unwrap_or("GET").as_bytes())
        else {
            return bad("method is not an HTTP method");
        };
        let status = match &ask.token {
            None => None,
            Some(token) => {
                let mut headers = http::HeaderMap::new();
                let Ok(value) = HeaderValue::from_str(token) else {
                    return bad("token is not a valid header value");
                };
                headers.insert("x-auth-token", value);
                let token = match crate::auth::token::extract(&headers) {
                    Ok(Some(token)) => token,
                    _ => return bad("token is empty or refused before any IAM call"),
                };
                match self.cache.lookup(&token).await {
                    Ok((status, _)) => Some(status),
                    Err(err) => {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "MFAGATE.IAM_UNAVAILABLE",
                            &format!("asking the IAM: {err}"),
                        )
                    }
                }
            }
        };
        // The body is at most 32 KiB, so a user id is never too long for an identity.
        let Ok(identity) = ask
            .user_id
            .as_deref()
            .map(crate::iam::Identity::user)
            .transpose()
        else {
            return bad("user_id is too long");
        };
        let explanation = crate::explain::explain(
            &self.policy.load(),
            &method,
            &ask.path,
            ask.client.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
            identity.as_ref(),
            status.as_ref(),
        );
        json_response(
            StatusCode::OK,
            serde_json::to_value(&explanation).unwrap_or_default(),
        )
    }

    /// `POST /admin/cache/purge[?user_id=…]`.
    async fn purge(&self, request: &Request<Incoming>) -> AdminResponse {
        let mut user_id = None;
        for pair in request.uri().query().unwrap_or_default().split('&') {
            match pair.split_once('=') {
                Some(("user_id", value)) => match percent_decode(value) {
                    Some(value) if !value.is_empty() => user_id = Some(value),
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "MFAGATE.BAD_REQUEST",
                            "user_id must be a non-empty, validly encoded value",
                        )
                    }
                },
                _ if pair.is_empty() => {}
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "MFAGATE.BAD_REQUEST",
                        "the only query parameter is user_id",
                    )
                }
            }
        }
        let purged = match &user_id {
            Some(user_id) => self.cache.purge_user(user_id).await,
            None => self.cache.purge_all().await,
        };
        self.count("cache_purge", "ok");
        tracing::info!(target: "mfa_gate::audit", action = "cache_purge", actor = %self.actor(request), user_id = user_id.as_deref().unwrap_or("*"), purged = purged.local, fleet = purged.fleet.label().unwrap_or("-"), result = "ok", "admin action");
        let mut body = json!({"purged": purged.local});
        if let Some(fleet) = purged.fleet.label() {
            body["fleet"] = json!(fleet);
        }
        json_response(StatusCode::OK, body)
    }
}

/// Decodes `%XX` escapes and `+` of a query value; `None` if an escape is broken or the result
/// is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Serves the admin listener until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(cause = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::server::stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.handle(request).await) }
            });
            if let Err(err) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(cause = %err, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_decode() {
        assert_eq!(percent_decode("a%2Fb+c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
    }
}
