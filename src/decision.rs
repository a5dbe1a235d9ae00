//! What the gateway decided about a request, and why: the vocabulary shared by the policy, the
//! metrics (`decision`, `reason` labels) and the access log.

use std::sync::{Arc, OnceLock};

/// Why a request was allowed or denied (the `reason` label of CONTRACT §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    MfaVerified,
    Allowlisted,
    ReportOnly,
    IamUnavailable,
    NoToken,
    InvalidToken,
    NoMfa,
    BadRequest,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::MfaVerified => "mfa_verified",
            Reason::Allowlisted => "allowlisted",
            Reason::ReportOnly => "report_only",
            Reason::IamUnavailable => "iam_unavailable",
            Reason::NoToken => "no_token",
            Reason::InvalidToken => "invalid_token",
            Reason::NoMfa => "no_mfa",
            Reason::BadRequest => "bad_request",
        }
    }
}

/// A decision with what the log needs to explain it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allow: bool,
    pub reason: Reason,
    /// The allow rule that matched, if any.
    pub rule: Option<Arc<str>>,
    /// The `[[route]]` whose settings applied, if any.
    pub route: Option<Arc<str>>,
    /// That rule's `reason`, logged with each match.
    pub rule_reason: Option<Arc<str>>,
    /// The user, once known.
    pub user_id: Option<Arc<str>>,
}

impl Decision {
    pub fn label(&self) -> &'static str {
        if self.allow {
            "allow"
        } else {
            "deny"
        }
    }
}

/// A slot in the request's extensions where the auth layer leaves its decision, so that the
/// outermost layer can count and log it whatever happens after (the upstream may still fail).
#[derive(Debug, Clone, Default)]
pub struct DecisionSlot(Arc<OnceLock<Decision>>);

impl DecisionSlot {
    pub fn set(&self, decision: Decision) {
        // The auth layer decides once per request; a second decision would be a bug, and the
        // first one stands.
        let _ = self.0.set(decision);
    }

    pub fn get(&self) -> Option<&Decision> {
        self.0.get()
    }
}
