//! What the gateway decided about a request, and why: the vocabulary shared by the policy, the
//! metrics (`decision`, `reason` labels) and the access log.

use std::sync::{Arc, OnceLock};

use crate::iam::UserFacts;

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
    /// Every reason, in the order of [`crate::metrics::REASONS`].
    pub const ALL: [Reason; 8] = [
        Reason::MfaVerified,
        Reason::Allowlisted,
        Reason::ReportOnly,
        Reason::IamUnavailable,
        Reason::NoToken,
        Reason::InvalidToken,
        Reason::NoMfa,
        Reason::BadRequest,
    ];

    /// The position of this reason in [`Reason::ALL`] and [`crate::metrics::REASONS`], for the
    /// metric handles resolved at start-up.
    pub fn index(self) -> usize {
        self as usize
    }

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
    /// The user, once known: the cached facts themselves, shared rather than copied.
    pub user: Option<Arc<UserFacts>>,
}

impl Decision {
    /// The user's IAM id, once known.
    pub fn user_id(&self) -> Option<crate::iam::IdentityField<'_>> {
        self.user.as_deref().map(|user| user.identity.user_id())
    }

    /// The position of the decision in [`crate::metrics::DECISIONS`].
    pub fn index(&self) -> usize {
        if self.allow {
            0
        } else {
            1
        }
    }

    pub fn label(&self) -> &'static str {
        if self.allow {
            "allow"
        } else {
            "deny"
        }
    }
}

/// A slot in the request's context ([`crate::stack::context::RequestContext`]) where the auth
/// layer leaves its decision, so that the outermost layer can count and log it whatever happens
/// after (the upstream may still fail); the guard leaves the normalised path there too, for the
/// same log line (a raw path that failed normalisation is never logged: it is
/// attacker-controlled bytes). One shared allocation per request holds both.
#[derive(Debug, Clone, Default)]
pub struct DecisionSlot(Arc<Slots>);

#[derive(Debug, Default)]
struct Slots {
    decision: OnceLock<Decision>,
    path: OnceLock<Arc<str>>,
}

impl DecisionSlot {
    pub fn set(&self, decision: Decision) {
        // The auth layer decides once per request; a second decision would be a bug, and the
        // first one stands.
        let _ = self.0.decision.set(decision);
    }

    pub fn get(&self) -> Option<&Decision> {
        self.0.decision.get()
    }

    /// Records the normalised path (once; the first one stands).
    pub fn set_path(&self, path: Arc<str>) {
        let _ = self.0.path.set(path);
    }

    /// The normalised path, if the request got that far.
    pub fn path(&self) -> Option<&str> {
        self.0.path.get().map(|path| &**path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_decisions_index_the_metric_label_order() {
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i);
            assert_eq!(crate::metrics::REASONS[reason.index()], reason.label());
        }
        for allow in [true, false] {
            let decision = Decision {
                allow,
                reason: Reason::NoMfa,
                rule: None,
                route: None,
                rule_reason: None,
                user: None,
            };
            assert_eq!(
                crate::metrics::DECISIONS[decision.index()],
                decision.label()
            );
        }
    }
}
