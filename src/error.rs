//! `GatewayError`: every way the gateway answers a request itself, and the one place where
//! such an answer becomes an HTTP response (CONTRACT §4 "Answers of its own").

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::decision::Reason;
use crate::iam::IamError;
use crate::proxy::Body;

/// Whose fault an error is; decides the log level (client errors are not operator errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Iam,
    Upstream,
    Internal,
}

/// An answer the gateway gives itself instead of the upstream's.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed or ambiguous (CONTRACT §4 "Requests refused"). `close` asks for
    /// the connection to be closed, for framing problems where the next request's start is
    /// uncertain.
    #[error("bad request: {detail}")]
    BadRequest { detail: String, close: bool },
    /// `CONNECT` is never tunnelled.
    #[error("method not allowed: {detail}")]
    MethodNotAllowed { detail: String },
    /// The header block exceeds `server.max_header_bytes`.
    #[error("request header block is over {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("no token: send X-Auth-Token or Authorization: Bearer")]
    NoToken,
    #[error("invalid token")]
    InvalidToken,
    #[error("user has no MFA")]
    NoMfa {
        /// `policy.help_url`: where to learn how to set MFA up.
        help_url: Option<std::sync::Arc<str>>,
    },
    #[error("IAM unavailable")]
    IamUnavailable(#[source] std::sync::Arc<IamError>),
    #[error("upstream unavailable")]
    UpstreamUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    /// A bug: the pipeline reached a state it must not.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl GatewayError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            detail: detail.into(),
            close: false,
        }
    }

    /// A framing problem (e.g. `Content-Length` with `Transfer-Encoding`): answer and close.
    pub fn bad_framing(detail: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            detail: detail.into(),
            close: true,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::NoToken | GatewayError::InvalidToken => StatusCode::UNAUTHORIZED,
            GatewayError::NoMfa { .. } => StatusCode::FORBIDDEN,
            GatewayError::IamUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::BadRequest { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::HeadersTooLarge { .. }
            | GatewayError::NoToken
            | GatewayError::InvalidToken
            | GatewayError::NoMfa { .. } => Fault::Client,
            GatewayError::IamUnavailable(_) => Fault::Iam,
            GatewayError::UpstreamUnavailable(_) | GatewayError::UpstreamTimeout(_) => {
                Fault::Upstream
            }
            GatewayError::Internal(_) => Fault::Internal,
        }
    }

    /// The decision reason this answer stands for, if it is a decision (upstream failures are
    /// counted by the upstream metrics instead, CONTRACT §4).
    pub fn reason(&self) -> Option<Reason> {
        match self {
            GatewayError::BadRequest { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::HeadersTooLarge { .. } => Some(Reason::BadRequest),
            GatewayError::NoToken => Some(Reason::NoToken),
            GatewayError::InvalidToken => Some(Reason::InvalidToken),
            GatewayError::NoMfa { .. } => Some(Reason::NoMfa),
            GatewayError::IamUnavailable(_) => Some(Reason::IamUnavailable),
            GatewayError::UpstreamUnavailable(_)
            | GatewayError::UpstreamTimeout(_)
            | GatewayError::Internal(_) => None,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::HeadersTooLarge { .. } => "MFAGATE.BAD_REQUEST",
            GatewayError::NoToken => "MFAGATE.NO_TOKEN",
            GatewayError::InvalidToken => "MFAGATE.INVALID_TOKEN",
            GatewayError::NoMfa { .. } => "MFAGATE.NO_MFA",
            GatewayError::IamUnavailable(_) => "MFAGATE.IAM_UNAVAILABLE",
            GatewayError::UpstreamUnavailable(_) => "MFAGATE.UPSTREAM_UNAVAILABLE",
            GatewayError::UpstreamTimeout(_) => "MFAGATE.UPSTREAM_TIMEOUT",
            GatewayError::Internal(_) => "MFAGATE.INTERNAL",
        }
    }

    /// What the client is told. Never carries the token, an IAM answer or an upstream address.
    fn message(&self) -> String {
        match self {
            GatewayError::BadRequest { detail, .. } => format!("bad request: {detail}"),
            GatewayError::MethodNotAllowed { detail } => format!("method not allowed: {detail}"),
            GatewayError::HeadersTooLarge { limit } => {
                format!("request header fields too large (limit {limit} bytes)")
            }
            GatewayError::NoToken => {
                "authentication required: send an IAM token in X-Auth-Token or Authorization: Bearer"
                    .into()
            }
            GatewayError::InvalidToken => "the IAM token is invalid, expired or revoked".into(),
            GatewayError::NoMfa { .. } => {
                "MFA is required: bind a virtual MFA device to your IAM user".into()
            }
            GatewayError::IamUnavailable(_) => {
                "cannot verify the token right now: the IAM service is unavailable".into()
            }
            GatewayError::UpstreamUnavailable(_) => "the upstream service is unavailable".into(),
            GatewayError::UpstreamTimeout(_) => {
                "the upstream service did not answer in time".into()
            }
            GatewayError::Internal(_) => "internal error".into(),
        }
    }

    /// The JSON answer of CONTRACT §4, with `WWW-Authenticate` on 401 (RFC 6750 §3). With
    /// `html`, a 401 or 403 is a short page in plain words instead, for people in browsers.
    pub fn into_response(self, request_id: &str, html: bool) -> Response<Body> {
        let help_url = match &self {
            GatewayError::NoMfa { help_url } => help_url.clone(),
            _ => None,
        };
        let as_html = html && matches!(self.status().as_u16(), 401 | 403);
        let (content_type, text) = if as_html {
            (
                "text/html; charset=utf-8",
                self.page(request_id, help_url.as_deref()),
            )
        } else {
            let mut body = serde_json::json!({
                "error_code": self.code(),
                "error_msg": self.message(),
                "request_id": request_id,
            });
            if let Some(url) = &help_url {
                body["help_url"] = serde_json::Value::from(url.as_ref());
            }
            ("application/json", body.to_string())
        };
        let mut response = Response::new(Body::new(Full::new(Bytes::from(text))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            GatewayError::NoToken => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"mfa-gate\""),
                );
            }
            GatewayError::InvalidToken => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"mfa-gate\", error=\"invalid_token\""),
                );
            }
            GatewayError::BadRequest { close: true, .. } | GatewayError::HeadersTooLarge { .. } => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }

    /// The browser version of a 401/403: what happened and what to do, in plain words.
    fn page(&self, request_id: &str, help_url: Option<&str>) -> String {
        let (title, advice) = match self {
            GatewayError::NoMfa { .. } => (
                "Multi-factor authentication required",
                "Your account can sign in, but this application only lets in users who protect \
                 their account with MFA. Bind a virtual MFA device to your IAM user, sign in \
                 again, and reload this page.",
            ),
            GatewayError::NoToken => (
                "Sign-in required",
                "This application needs your cloud IAM token. Sign in through your company's \
                 portal, or send the token in the X-Auth-Token header.",
            ),
            _ => (
                "Your session is not valid",
                "The IAM token sent with this request is invalid, expired or revoked. Sign in \
                 again and reload this page.",
            ),
        };
        let help = help_url
            .map(|url| {
                let url = escape_html(url);
                format!("<p><a href=\"{url}\">How to set up MFA</a></p>")
            })
            .unwrap_or_default();
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
             <body><h1>{title}</h1>\n<p>{advice}</p>\n{help}\n\
             <p><small>{code} &middot; request {id}</small></p></body></html>\n",
            code = self.code(),
            id = escape_html(request_id),
        )
    }
}

/// Escapes text for an HTML attribute or element.
fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}
