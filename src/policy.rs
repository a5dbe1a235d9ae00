//! Whether a caller may pass: the compiled allowlist and the MFA requirement, as pure functions
//! of what is already known (no I/O here).

use std::net::IpAddr;

use http::{HeaderValue, Method};

use crate::config::{AllowRule, Mode, OnIamError, PathPattern, PolicyConfig, Require, Route};
use crate::iam::{Identity, Needs, UserFacts};

/// The request as the allowlist sees it: the normalised path (never the query), the method and
/// the socket peer.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub peer: IpAddr,
    /// When the request is judged (rules with `expires` lapse at that instant).
    pub now: JudgedAt,
}

/// When a request is judged against rules that lapse.
#[derive(Debug, Clone, Copy)]
pub enum JudgedAt {
    /// As each rule with `expires` is checked: the wall clock is read only for such rules
    /// (a reading costs ~16 ns, and most requests meet none).
    Now,
    /// At this instant (`explain`, tests).
    At(std::time::SystemTime),
}

impl JudgedAt {
    /// Whether `rule` has lapsed at this moment.
    pub fn lapsed(self, rule: &AllowRule) -> bool {
        match (rule.expires, self) {
            (None, _) => false,
            (Some(_), JudgedAt::Now) => rule.expired_at(std::time::SystemTime::now()),
            (Some(_), JudgedAt::At(at)) => rule.expired_at(at),
        }
    }
}

/// The outcome of checking a user's MFA facts against `policy.require`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub satisfied: bool,
    /// The factors found that the policy counts: the `X-Auth-Mfa` value (`none` if none).
    pub factors: HeaderValue,
}

/// `X-Auth-Mfa` of a request no factor let through (checked at compile time: a `const`).
pub const NO_FACTOR: HeaderValue = HeaderValue::from_static("none");

/// The compiled policy of one config generation.
#[derive(Debug, Clone)]
pub struct Policy {
    config: PolicyConfig,
    rules: Vec<AllowRule>,
    /// Peers whose `X-Forwarded-*` the decision endpoint believes.
    trusted_proxies: Vec<ipnet::IpNet>,
    /// How the provider's MFA-device fact is named in `X-Auth-Mfa` (`mfa_device` for Huawei,
    /// `cloudsso_mfa` for CloudSSO).
    device_factor: &'static str,
    /// `device_factor` as the `X-Auth-Mfa` value, checked once rather than per request.
    device_factor_value: HeaderValue,
    /// `[[route]]` overrides, first match wins.
    routes: Vec<Route>,
}

/// The policy settings in force for one request: `[policy]`'s, or a route's overrides.
#[derive(Debug, Clone, Copy)]
pub struct Effective<'a> {
    pub require: Require,
    pub require_totp_login: bool,
    pub mode: Mode,
    /// The route whose overrides apply, if any.
    pub route: Option<&'a Route>,
}

impl Policy {
    pub fn new(
        config: PolicyConfig,
        rules: Vec<AllowRule>,
        trusted_proxies: Vec<ipnet::IpNet>,
    ) -> Self {
        Policy {
            config,
            rules,
            trusted_proxies,
            device_factor: "mfa_device",
            device_factor_value: HeaderValue::from_static("mfa_device"),
            routes: Vec::new(),
        }
    }

    /// Adds `[[route]]` overrides.
    pub fn with_routes(mut self, routes: Vec<Route>) -> Self {
        self.routes = routes;
        self
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The settings for a request to `path`: the first route that matches it, else `[policy]`.
    pub fn effective(&self, path: &str) -> Effective<'_> {
        let route = self
            .routes
            .iter()
            .find(|route| route.paths.iter().any(|p| path_matches(p, path)));
        Effective {
            require: route.and_then(|r| r.require).unwrap_or(self.config.require),
            require_totp_login: route
                .and_then(|r| r.require_totp_login)
                .unwrap_or(self.config.require_totp_login),
            mode: route.and_then(|r| r.mode).unwrap_or(self.config.mode),
            route,
        }
    }

    /// The settings of `[policy]` itself.
    pub fn base(&self) -> Effective<'_> {
        Effective {
            require: self.config.require,
            require_totp_login: self.config.require_totp_login,
            mode: self.config.mode,
            route: None,
        }
    }

    /// Whether the user passes `[policy]` and every route: only then is the answer cached
    /// for `cache.ttl` rather than `cache.negative_ttl`.
    pub fn satisfied_everywhere(&self, facts: &UserFacts) -> bool {
        self.evaluate(facts, self.base()).satisfied
            && self.routes.iter().all(|route| {
                let effective = Effective {
                    require: route.require.unwrap_or(self.config.require),
                    require_totp_login: route
                        .require_totp_login
                        .unwrap_or(self.config.require_totp_login),
                    mode: route.mode.unwrap_or(self.config.mode),
                    route: Some(route),
                };
                self.evaluate(facts, effective).satisfied
            })
    }

    /// Names the device factor in `X-Auth-Mfa` differently (per provider).
    pub fn with_device_factor(mut self, name: &'static str) -> Self {
        self.device_factor = name;
        self.device_factor_value = HeaderValue::from_static(name);
        self
    }

    pub fn trusted_proxies(&self) -> &[ipnet::IpNet] {
        &self.trusted_proxies
    }

    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    pub fn help_url(&self) -> Option<&std::sync::Arc<str>> {
        self.config.help_url.as_ref()
    }

    pub fn on_iam_error(&self) -> OnIamError {
        self.config.on_iam_error
    }

    pub fn rules(&self) -> &[AllowRule] {
        &self.rules
    }

    /// Which IAM lookups `policy.require` (and any route's) can use. One lookup serves every
    /// route, so it asks for everything any of them counts.
    pub fn needs(&self) -> Needs {
        let requires = std::iter::once(self.config.require)
            .chain(self.routes.iter().filter_map(|route| route.require));
        let mut needs = Needs {
            mfa_device: false,
            login_protect: false,
        };
        for require in requires {
            needs.mfa_device |= matches!(require, Require::MfaDevice | Require::Any | Require::All);
            needs.login_protect |=
                matches!(require, Require::LoginProtect | Require::Any | Require::All);
        }
        needs
    }

    /// The first request rule (no identity matcher) that matches, in config order.
    pub fn match_request(&self, subject: Subject<'_>) -> Option<&AllowRule> {
        self.rules
            .iter()
            .filter(|rule| !rule.is_identity_rule() && !subject.now.lapsed(rule))
            .find(|rule| request_matchers_match(rule, subject))
    }

    /// The first identity rule whose matchers all match this request and identity.
    pub fn match_identity(&self, subject: Subject<'_>, identity: &Identity) -> Option<&AllowRule> {
        self.rules
            .iter()
            .filter(|rule| rule.is_identity_rule() && !subject.now.lapsed(rule))
            .find(|rule| {
                request_matchers_match(rule, subject) && identity_matchers_match(rule, identity)
            })
    }

    /// Checks the user's MFA facts against the effective `require` (and `require_totp_login`).
    pub fn evaluate(&self, facts: &UserFacts, effective: Effective<'_>) -> Evaluation {
        let device = facts.mfa_device == Some(true);
        let login_protect = match &facts.login_protect {
            Some(Some(lp))
                if lp.enabled
                    && self
                        .config
                        .login_protect_methods
                        .iter()
                        .any(|method| method == lp.method.as_str()) =>
            {
                Some(lp.method.as_str())
            }
            _ => None,
        };
        let (count_device, count_login_protect) = match effective.require {
            Require::MfaDevice => (true, false),
            Require::LoginProtect => (false, true),
            Require::Any | Require::All => (true, true),
        };
        let counted_method = login_protect.filter(|_| count_login_protect);
        let factors = match (count_device && device, counted_method) {
            (false, None) => NO_FACTOR,
            // The common case costs no allocation: the factor name is static.
            (true, None) => self.device_factor_value.clone(),
            (with_device, Some(method)) => {
                let mut text = String::with_capacity(40);
                if with_device {
                    text.push_str(self.device_factor);
                    text.push(',');
                }
                text.push_str("login_protect:");
                text.push_str(method);
                // Factor names and lowercased IAM methods checked against the config's list.
                HeaderValue::from_str(&text).unwrap_or(NO_FACTOR)
            }
        };
        let factor_ok = match effective.require {
            Require::MfaDevice => device,
            Require::LoginProtect => login_protect.is_some(),
            Require::Any => device || login_protect.is_some(),
            Require::All => device && login_protect.is_some(),
        };
        let satisfied = factor_ok && (!effective.require_totp_login || facts.totp_login);
        Evaluation { satisfied, factors }
    }
}

fn request_matchers_match(rule: &AllowRule, subject: Subject<'_>) -> bool {
    let path_ok = rule
        .paths
        .as_ref()
        .is_none_or(|paths| paths.iter().any(|p| path_matches(p, subject.path)));
    let method_ok = rule
        .methods
        .as_ref()
        .is_none_or(|methods| methods.contains(subject.method));
    let cidr_ok = rule.cidrs.as_ref().is_none_or(|cidrs| {
        cidrs
            .iter()
            .any(|net| net.contains(&canonical_ip(subject.peer)))
    });
    path_ok && method_ok && cidr_ok
}

fn identity_matchers_match(rule: &AllowRule, identity: &Identity) -> bool {
    let in_list = |list: &Option<Vec<String>>, value: &str| {
        list.as_ref()
            .is_none_or(|list| list.iter().any(|v| v == value))
    };
    in_list(&rule.user_ids, &identity.user_id())
        && in_list(&rule.user_names, &identity.user_name())
        && in_list(&rule.domain_ids, &identity.domain_id())
}

/// An IPv4 peer on a dual-stack socket arrives as `::ffff:a.b.c.d`; IPv4 CIDRs must still match.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// `Exact` matches that path only; `Subtree(prefix)` matches `prefix` itself and everything
/// below `prefix/`, never `prefixed` (CONTRACT §4).
pub fn path_matches(pattern: &PathPattern, path: &str) -> bool {
    match pattern {
        PathPattern::Exact(exact) => path == exact,
        PathPattern::Subtree(prefix) => {
            prefix.is_empty()
                || (path.starts_with(prefix.as_str())
                    && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
        }
    }
}

/// Whether a peer is one of `server.trusted_proxies`.
pub fn is_trusted(peer: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    let peer = canonical_ip(peer);
    trusted.iter().any(|net| net.contains(&peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ProviderKind};
    use crate::iam::{LoginProtect, VerificationMethod};
    use std::path::Path;
    use std::time::SystemTime;

    fn policy(extra: &str) -> Policy {
        let text = format!(
            "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[iam]\nendpoint = \"https://iam.example.com\"\n{extra}"
        );
        let config = Config::from_toml(&text, Path::new("test.toml")).unwrap();
        assert_eq!(config.iam.provider, ProviderKind::Huawei);
        Policy::new(config.policy, config.allow, config.server.trusted_proxies)
    }

    fn facts(device: bool, lp: Option<(bool, &str)>, totp: bool) -> UserFacts {
        UserFacts {
            identity: Identity::new("u1", "alice", "d1", "dom").unwrap(),
            expires_at: SystemTime::now(),
            totp_login: totp,
            mfa_device: Some(device),
            login_protect: Some(lp.map(|(enabled, method)| LoginProtect {
                enabled,
                method: VerificationMethod::from_iam(method),
            })),
        }
    }

    fn subject<'a>(method: &'a Method, path: &'a str) -> Subject<'a> {
        Subject {
            method,
            path,
            peer: "10.20.1.2".parse().unwrap(),
            now: JudgedAt::Now,
        }
    }

    #[test]
    fn rules_lapse_at_their_expiry_instant() {
        let p = policy(
            "[[allow]]\nname = \"bg\"\npaths = [\"/x\"]\nexpires = \"2030-01-01T00:00:00Z\"\nreason = \"INC-42\"\n",
        );
        let get = Method::GET;
        let expiry = humantime::parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
        let mut before = subject(&get, "/x");
        before.now = JudgedAt::At(expiry - std::time::Duration::from_secs(1));
        let rule = p.match_request(before).unwrap();
        assert_eq!(rule.reason.as_deref(), Some("INC-42"));
        let mut at = subject(&get, "/x");
        at.now = JudgedAt::At(expiry);
        assert!(p.match_request(at).is_none());
    }

    #[test]
    fn subtree_patterns_match_the_prefix_and_below_only() {
        let pattern = PathPattern::Subtree("/static".into());
        assert!(path_matches(&pattern, "/static"));
        assert!(path_matches(&pattern, "/static/"));
        assert!(path_matches(&pattern, "/static/a/b"));
        assert!(!path_matches(&pattern, "/staticx"));
        assert!(!path_matches(&pattern, "/Static/a"));
        assert!(path_matches(
            &PathPattern::Subtree(String::new()),
            "/anything"
        ));
        let exact = PathPattern::Exact("/status".into());
        assert!(path_matches(&exact, "/status"));
        assert!(!path_matches(&exact, "/status/"));
    }

    #[test]
    fn request_rules_need_every_matcher() {
        let p = policy(
            "[[allow]]\nname = \"probes\"\ncidrs = [\"10.20.0.0/16\"]\npaths = [\"/status\"]\nmethods = [\"GET\"]\n",
        );
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(
            p.match_request(subject(&get, "/status")).unwrap().name,
            "probes"
        );
        assert!(p.match_request(subject(&post, "/status")).is_none());
        assert!(p.match_request(subject(&get, "/status/")).is_none());
        let mut outside = subject(&get, "/status");
        outside.peer = "10.21.0.1".parse().unwrap();
        assert!(p.match_request(outside).is_none());
        let mut mapped = subject(&get, "/status");
        mapped.peer = "::ffff:10.20.3.4".parse().unwrap();
        assert!(p.match_request(mapped).is_some());
    }

    #[test]
    fn identity_rules_are_not_request_rules() {
        let p = policy("[[allow]]\nname = \"bg\"\nuser_ids = [\"u1\"]\n");
        let get = Method::GET;
        assert!(p.match_request(subject(&get, "/")).is_none());
        let who = facts(false, None, false).identity;
        assert_eq!(
            p.match_identity(subject(&get, "/"), &who).unwrap().name,
            "bg"
        );
        let other =
            Identity::new("u2", &who.user_name(), &who.domain_id(), &who.domain_name()).unwrap();
        assert!(p.match_identity(subject(&get, "/"), &other).is_none());
    }

    #[test]
    fn each_require_value_counts_its_factors() {
        let device_only = facts(true, None, false);
        let vmfa_only = facts(false, Some((true, "vmfa")), false);
        let sms_only = facts(false, Some((true, "sms")), false);
        let both = facts(true, Some((true, "vmfa")), false);
        let disabled = facts(false, Some((false, "vmfa")), false);

        let p = policy("");
        assert!(p.evaluate(&device_only, p.base()).satisfied);
        assert_eq!(p.evaluate(&device_only, p.base()).factors, "mfa_device");
        assert!(!p.evaluate(&vmfa_only, p.base()).satisfied);
        assert_eq!(p.evaluate(&vmfa_only, p.base()).factors, "none");

        let p = policy("[policy]\nrequire = \"login_protect\"\n");
        assert!(p.evaluate(&vmfa_only, p.base()).satisfied);
        assert_eq!(
            p.evaluate(&vmfa_only, p.base()).factors,
            "login_protect:vmfa"
        );
        assert!(!p.evaluate(&sms_only, p.base()).satisfied);
        assert!(!p.evaluate(&disabled, p.base()).satisfied);
        assert!(!p.evaluate(&device_only, p.base()).satisfied);

        let p = policy(
            "[policy]\nrequire = \"login_protect\"\nlogin_protect_methods = [\"vmfa\", \"SMS\"]\n",
        );
        assert_eq!(p.evaluate(&sms_only, p.base()).factors, "login_protect:sms");

        let p = policy("[policy]\nrequire = \"any\"\n");
        assert!(p.evaluate(&device_only, p.base()).satisfied);
        assert!(p.evaluate(&vmfa_only, p.base()).satisfied);
        assert!(!p.evaluate(&sms_only, p.base()).satisfied);
        assert_eq!(
            p.evaluate(&both, p.base()).factors,
            "mfa_device,login_protect:vmfa"
        );

        let p = policy("[policy]\nrequire = \"all\"\n");
        assert!(p.evaluate(&both, p.base()).satisfied);
        assert!(!p.evaluate(&device_only, p.base()).satisfied);
        assert!(!p.evaluate(&vmfa_only, p.base()).satisfied);
    }

    #[test]
    fn totp_login_is_required_on_top_when_configured() {
        let p = policy("[policy]\nrequire_totp_login = true\n");
        assert!(!p.evaluate(&facts(true, None, false), p.base()).satisfied);
        assert!(p.evaluate(&facts(true, None, true), p.base()).satisfied);
    }

    #[test]
    fn needs_follow_require() {
        let needs = policy("").needs();
        assert!(needs.mfa_device && !needs.login_protect);
        let needs = policy("[policy]\nrequire = \"login_protect\"\n").needs();
        assert!(!needs.mfa_device && needs.login_protect);
        let needs = policy("[policy]\nrequire = \"all\"\n").needs();
        assert!(needs.mfa_device && needs.login_protect);
    }
}
