//! "Why was this request denied?": the decision for a described request, step by step, without
//! forwarding anything. Behind `mfa-gate explain` and `POST /admin/explain`.
//!
//! The steps are the auth layer's, in its order (CONTRACT §1), built from the same pure
//! functions: path normalisation, the allowlist, the effective policy and its evaluation.

use std::net::IpAddr;
use std::time::SystemTime;

use http::Method;
use serde::Serialize;

use crate::config::{AllowRule, Mode, PathPattern, Require};
use crate::iam::{Identity, TokenStatus, UserFacts};
use crate::policy::{self, Policy, Subject};
use crate::proxy::path;

/// One allow rule as tried for this request.
#[derive(Debug, Serialize)]
pub struct RuleTrial {
    pub rule: String,
    pub kind: &'static str,
    pub matched: bool,
    /// Why it did not match (or "matched").
    pub why: String,
}

/// The whole explanation.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub method: String,
    pub path: String,
    /// The normalised path, or why the path is refused.
    pub normalized_path: Result<String, String>,
    pub route: Option<String>,
    pub require: &'static str,
    pub require_totp_login: bool,
    pub mode: &'static str,
    pub rules: Vec<RuleTrial>,
    /// What the IAM said (absent without a token).
    pub facts: Option<serde_json::Value>,
    /// `allow` / `deny` / `unknown` (not enough to decide) with the reason label.
    pub decision: &'static str,
    pub reason: String,
}

fn require_label(require: Require) -> &'static str {
    match require {
        Require::MfaDevice => "mfa_device",
        Require::LoginProtect => "login_protect",
        Require::Any => "any",
        Require::All => "all",
    }
}

fn pattern_text(pattern: &PathPattern) -> String {
    match pattern {
        PathPattern::Exact(path) => path.clone(),
        PathPattern::Subtree(prefix) => format!("{prefix}/**"),
    }
}

/// Why `rule` does or does not match (request matchers, expiry, identity matchers).
fn trial(rule: &AllowRule, subject: Subject<'_>, identity: Option<&Identity>) -> RuleTrial {
    let kind = if rule.is_identity_rule() {
        "identity"
    } else {
        "request"
    };
    let mut why = Vec::new();
    if subject.now.lapsed(rule) {
        why.push("expired".to_string());
    }
    if let Some(paths) = &rule.paths {
        if !paths.iter().any(|p| policy::path_matches(p, subject.path)) {
            let patterns: Vec<String> = paths.iter().map(pattern_text).collect();
            why.push(format!("path not in {patterns:?}"));
        }
    }
    if let Some(methods) = &rule.methods {
        if !methods.contains(subject.method) {
            why.push(format!(
                "method {} not in {:?}",
                subject.method,
                methods.iter().map(Method::as_str).collect::<Vec<_>>()
            ));
        }
    }
    if let Some(cidrs) = &rule.cidrs {
        if !cidrs.iter().any(|net| net.contains(&subject.peer)) {
            why.push(format!("client {} not in the rule's CIDRs", subject.peer));
        }
    }
    if rule.is_identity_rule() {
        match identity {
            None => why.push("needs a verified identity (no token or user id given)".into()),
            Some(identity) => {
                let listed = |list: &Option<Vec<String>>, value: &str| {
                    list.as_ref()
                        .is_none_or(|list| list.iter().any(|v| v == value))
                };
                if !listed(&rule.user_ids, &identity.user_id()) {
                    why.push(format!("user id {} not listed", identity.user_id()));
                }
                if !listed(&rule.user_names, &identity.user_name()) {
                    why.push(format!("user name {:?} not listed", identity.user_name()));
                }
                if !listed(&rule.domain_ids, &identity.domain_id()) {
                    why.push(format!("domain id {:?} not listed", identity.domain_id()));
                }
            }
        }
    }
    RuleTrial {
        rule: rule.name.clone(),
        kind,
        matched: why.is_empty(),
        why: if why.is_empty() {
            "matched".into()
        } else {
            why.join("; ")
        },
    }
}

/// Explains the decision for `method raw_path` from `peer`. `identity` may come from a user id
/// alone; `status` is what the IAM said about the token, when one was given.
pub fn explain(
    policy: &Policy,
    method: &Method,
    raw_path: &str,
    peer: IpAddr,
    identity: Option<&Identity>,
    status: Option<&TokenStatus>,
) -> Explanation {
    let now = SystemTime::now();
    let raw = raw_path.split('?').next().unwrap_or_default();
    let normalized = path::normalize(raw)
        .map(|p| p.into_owned())
        .map_err(|e| e.to_string());
    let facts: Option<&UserFacts> = match status {
        Some(TokenStatus::Valid(facts)) => Some(facts),
        _ => None,
    };
    let identity = facts.map(|f| &f.identity).or(identity);
    let mut out = Explanation {
        method: method.to_string(),
        path: raw_path.to_string(),
        normalized_path: normalized.clone(),
        route: None,
        require: require_label(policy.base().require),
        require_totp_login: policy.base().require_totp_login,
        mode: "enforce",
        rules: Vec::new(),
        facts: facts.map(|f| {
            serde_json::json!({
                "user_id": f.identity.user_id(),
                "user_name": f.identity.user_name(),
                "domain_id": f.identity.domain_id(),
                "mfa_device": f.mfa_device,
                "login_protect": f.login_protect.as_ref().map(|lp| lp.as_ref().map(|lp| serde_json::json!({"enabled": lp.enabled, "method": lp.method.as_str()}))),
                "totp_login": f.totp_login,
                "token_expires_at": humantime::format_rfc3339_seconds(f.expires_at).to_string(),
            })
        }),
        decision: "unknown",
        reason: String::new(),
    };
    let Ok(path) = normalized else {
        out.decision = "deny";
        out.reason = "bad_request".into();
        return out;
    };
    let effective = policy.effective(&path);
    out.route = effective.route.map(|r| r.name.clone());
    out.require = require_label(effective.require);
    out.require_totp_login = effective.require_totp_login;
    out.mode = match effective.mode {
        Mode::Enforce => "enforce",
        Mode::ReportOnly => "report_only",
    };
    let subject = Subject {
        method,
        path: &path,
        peer,
        now: policy::JudgedAt::At(now),
    };
    out.rules = policy
        .rules()
        .iter()
        .map(|rule| trial(rule, subject, identity))
        .collect();

    if let Some(rule) = policy.match_request(subject) {
        out.decision = "allow";
        out.reason = format!("allowlisted (rule {:?})", rule.name);
        return out;
    }
    match status {
        Some(TokenStatus::Invalid) => {
            out.decision = "deny";
            out.reason = "invalid_token".into();
            return out;
        }
        None if identity.is_none() => {
            out.decision = "deny";
            out.reason = "no_token (give --token-file or --user-id to go further)".into();
            return out;
        }
        _ => {}
    }
    if let Some(identity) = identity {
        if let Some(rule) = policy.match_identity(subject, identity) {
            out.decision = "allow";
            out.reason = format!("allowlisted (identity rule {:?})", rule.name);
            return out;
        }
    }
    let Some(facts) = facts else {
        out.reason = "the MFA facts need the user's token (--token-file)".into();
        return out;
    };
    let evaluation = policy.evaluate(facts, effective);
    let factors = evaluation.factors.to_str().unwrap_or("none").to_string();
    (out.decision, out.reason) = match (evaluation.satisfied, effective.mode) {
        (true, _) => ("allow", format!("mfa_verified ({factors})")),
        (false, Mode::ReportOnly) => ("allow", "report_only (would be no_mfa)".into()),
        (false, Mode::Enforce) => ("deny", "no_mfa".into()),
    };
    out
}

/// `mfa-gate explain`: the explanation for a request under `config`, asking the IAM about the
/// token if one is given (nothing else is contacted, nothing is bound).
pub async fn for_config(
    config: &crate::config::Config,
    method: &Method,
    raw_path: &str,
    peer: IpAddr,
    user_id: Option<&str>,
    token: Option<&str>,
) -> anyhow::Result<Explanation> {
    let policy = crate::app::policy(config);
    let status = match token {
        Some(token) => {
            let token = crate::auth::token::extract(&{
                let mut headers = http::HeaderMap::new();
                headers.insert(
                    "x-auth-token",
                    http::HeaderValue::from_str(token)
                        .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?,
                );
                headers
            })
            .map_err(|err| anyhow::anyhow!("the token is refused before any IAM call: {err}"))?
            .ok_or_else(|| anyhow::anyhow!("the token file is empty"))?;
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
            let provider = crate::app::provider(config, &metrics)?;
            let status = provider
                .lookup(&token, policy.needs())
                .await
                .map_err(|err| anyhow::anyhow!("asking the IAM: {err}"))?;
            Some(status)
        }
        None => None,
    };
    let identity = user_id
        .map(|id| Identity::user(id).map_err(|err| anyhow::anyhow!("--user-id: {err}")))
        .transpose()?;
    Ok(explain(
        &policy,
        method,
        raw_path,
        peer,
        identity.as_ref(),
        status.as_ref(),
    ))
}

impl Explanation {
    /// The human-readable form printed by `mfa-gate explain`.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "request         {} {}", self.method, self.path);
        match &self.normalized_path {
            Ok(path) => {
                let _ = writeln!(out, "normalised path {path}");
            }
            Err(err) => {
                let _ = writeln!(out, "normalised path refused: {err} (400)");
            }
        }
        let _ = writeln!(
            out,
            "route           {}",
            self.route.as_deref().unwrap_or("- (the [policy] settings)")
        );
        let _ = writeln!(
            out,
            "policy          require = {}, require_totp_login = {}, mode = {}",
            self.require, self.require_totp_login, self.mode
        );
        if self.rules.is_empty() {
            let _ = writeln!(out, "allow rules     (none)");
        }
        for rule in &self.rules {
            let mark = if rule.matched { "MATCH" } else { "no" };
            let _ = writeln!(
                out,
                "allow rule      {:<5} {} [{}]: {}",
                mark, rule.rule, rule.kind, rule.why
            );
        }
        if let Some(facts) = &self.facts {
            let _ = writeln!(out, "IAM facts       {facts}");
        }
        let _ = writeln!(out, "decision        {} — {}", self.decision, self.reason);
        out
    }
}
