//! The IAM provider abstraction: from a caller's token to who they are and which MFA factors
//! their account has.
//!
//! A provider answers one of three things, and the difference matters for security: the token is
//! valid (with facts), the token is not valid (a definite "no" from the IAM, cacheable), or the IAM
//! could not answer (an [`IamError`], never cached, never read as "has MFA").

pub mod acs3;
pub mod aksk;
pub mod alibaba;
pub mod huawei;
pub mod jwt;
pub mod v5;

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use crate::auth::token::Token;

/// Who the caller is, as the IAM says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub user_id: String,
    pub user_name: String,
    pub domain_id: String,
    pub domain_name: String,
}

/// Login protection as configured on the user (Huawei `login-protect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginProtect {
    pub enabled: bool,
    /// `verification_method`, lowercased (`vmfa`, `sms`, `email`, `none`).
    pub method: String,
}

/// Everything the policy may need to know about a valid token's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFacts {
    pub identity: Identity,
    /// When the token itself stops being valid; no cache entry outlives it.
    pub expires_at: SystemTime,
    /// The token was issued through an MFA login (`totp` in the token's `methods`).
    pub totp_login: bool,
    /// Whether a virtual MFA device is bound; `None` when it was not looked up.
    pub mfa_device: Option<bool>,
    /// The login protection setting; `None` when not looked up; `Some(None)` when the IAM says
    /// it was never configured (404).
    pub login_protect: Option<Option<LoginProtect>>,
}

/// What a provider learnt about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenStatus {
    /// The token is valid; these are its user's facts.
    Valid(Arc<UserFacts>),
    /// The IAM said the token is unknown, expired or revoked.
    Invalid,
}

/// Which lookups the policy can use, so a provider may skip the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub mfa_device: bool,
    pub login_protect: bool,
}

/// The IAM could not give a usable answer. Each variant maps to a metric outcome; all of them
/// mean "IAM unavailable" to the policy.
#[derive(Debug, thiserror::Error)]
pub enum IamError {
    #[error("IAM {api} call timed out")]
    Timeout { api: &'static str },
    #[error("IAM {api} call failed: {detail}")]
    Transport { api: &'static str, detail: String },
    #[error("IAM {api} answered {status} {code}")]
    Status {
        api: &'static str,
        status: u16,
        code: String,
    },
    #[error("IAM {api} answered an unusable body: {detail}")]
    BadResponse { api: &'static str, detail: String },
    #[error("IAM concurrency limit reached ({limit} calls in flight)")]
    Saturated { limit: usize },
}

/// A source of identity and MFA facts for tokens.
pub trait IamProvider: Send + Sync + 'static {
    /// Looks the token up. Must not be called with a token that failed local validation.
    fn lookup<'a>(
        &'a self,
        token: &'a Token,
        needs: Needs,
    ) -> BoxFuture<'a, Result<TokenStatus, IamError>>;
}

/// An error with its sources, for transport details in logs and `IamError`s ("client error
/// (Connect): tcp connect error: Connection refused"). Shared by every IAM client.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
