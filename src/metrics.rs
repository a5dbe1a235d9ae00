//! The Prometheus registry of CONTRACT §6, owned (no global macros) and shared by every module.
//!
//! Every family is registered at start-up and every known label value is touched once, so that a
//! dashboard shows `0` rather than "no data" before the first event of a kind.

mod hot;

use std::sync::Arc;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use hot::HotCounts;
use hot::{FoldTargets, HistogramOf, HotHistogram};

/// Decision label values.
pub const DECISIONS: [&str; 2] = ["allow", "deny"];

/// Reason label values of `mfa_gate_decisions_total`.
pub const REASONS: [&str; 8] = [
    "mfa_verified",
    "allowlisted",
    "report_only",
    "iam_unavailable",
    "no_token",
    "invalid_token",
    "no_mfa",
    "bad_request",
];

/// `api` label values of the IAM metrics.
pub const IAM_APIS: [&str; 7] = [
    "verify_token",
    "mfa_device",
    "login_protect",
    "cloudsso_mfa_settings",
    "jwks",
    "v5_list_mfa_devices",
    "v5_disable_mfa_device",
];

/// `outcome` label values of `mfa_gate_iam_requests_total`.
pub const IAM_OUTCOMES: [&str; 9] = [
    "ok",
    "not_found",
    "unauthorized",
    "forbidden",
    "throttled",
    "server_error",
    "timeout",
    "transport_error",
    "bad_response",
];

/// `result` label values of `mfa_gate_cache_lookups_total`.
pub const CACHE_RESULTS: [&str; 3] = ["hit", "miss", "stale"];

/// `result` label values of `mfa_gate_shared_cache_requests_total`.
pub const SHARED_CACHE_RESULTS: [&str; 4] = ["hit", "miss", "error", "rejected"];

/// `event` label values of `mfa_gate_shared_cache_invalidations_total`.
pub const SHARED_CACHE_INVALIDATIONS: [&str; 3] = ["published", "received", "resync"];

/// `class` label values of `mfa_gate_upstream_responses_total`.
pub const UPSTREAM_CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error", "timeout"];

/// Buckets for the whole request as the gateway sees it: the cached check path is tens of
/// microseconds, a cold IAM lookup tens to hundreds of milliseconds, an upstream up to seconds.
pub(crate) const REQUEST_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Buckets for one IAM call: a round trip to a cloud endpoint is milliseconds to seconds, and
/// `iam.timeout` (default 3 s) caps it.
const IAM_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for the upstream's time to response headers: sub-millisecond on a sidecar's loopback
/// up to `upstream.timeout` (default 60 s).
pub(crate) const UPSTREAM_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
];

/// All metric families of the gateway.
pub struct Metrics {
    registry: Registry,
    pub decisions: IntCounterVec,
    pub allowlist_matches: IntCounterVec,
    /// When each expiring allow rule lapses (Unix seconds), for "break-glass rule expires
    /// soon / has expired" alerts.
    pub allowlist_rule_expiry: GaugeVec,
    pub iam_requests: IntCounterVec,
    pub iam_request_duration: HistogramVec,
    pub cache_lookups: IntCounterVec,
    pub cache_entries: IntGauge,
    pub upstream_responses: IntCounterVec,
    /// Set from [`HotCounts`] when the registry is read.
    pub inflight_requests: IntGauge,
    pub config_reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub admin_actions: IntCounterVec,
    /// Decisions on requests covered by a `[[route]]`, by route name.
    pub route_decisions: IntCounterVec,
    /// `[cache.shared]` reads by result (`hit`, `miss`, `error`, `rejected`).
    pub shared_cache_requests: IntCounterVec,
    /// 1 while the shared cache (Redis) answers, 0 while it is down or not configured.
    pub shared_cache_up: IntGauge,
    /// Fleet-wide invalidations this gateway published, received, or resynchronised after an
    /// outage of the invalidation channel.
    pub shared_cache_invalidations: IntCounterVec,
    /// What every request counts (decisions, the request and upstream durations, upstream
    /// answer classes, cache lookups, requests in flight): per thread, without atomic
    /// read-modify-writes; folded into the families below when the registry is read.
    pub hot: Arc<HotCounts>,
    // Label handles resolved once at start-up for the families counted on every request:
    // `with_label_values` hashes the label values and takes a read lock each time. They are
    // the same children the families export.
    /// `decisions` by `[decision][reason]`, in the order of [`DECISIONS`] and [`REASONS`].
    pub decision_counters: [[IntCounter; REASONS.len()]; DECISIONS.len()],
    /// `upstream_responses` by class, in the order of [`UPSTREAM_CLASSES`].
    pub upstream_responses_by_class: [IntCounter; UPSTREAM_CLASSES.len()],
    /// `cache_lookups` by result, in the order of [`CACHE_RESULTS`] (counted on every request
    /// that carries a token).
    pub cache_lookups_by_result: [IntCounter; CACHE_RESULTS.len()],
}

impl Metrics {
    /// Builds and registers every family, with known label values initialised at 0.
    pub fn new() -> Self {
        let registry = Registry::new();
        let decisions = IntCounterVec::new(
            Opts::new(
                "mfa_gate_decisions_total",
                "Gateway decisions by outcome and reason.",
            ),
            &["decision", "reason"],
        )
        .expect("valid metric");
        let allowlist_matches = IntCounterVec::new(
            Opts::new(
                "mfa_gate_allowlist_matches_total",
                "Requests let through by an [[allow]] rule, by rule name.",
            ),
            &["rule"],
        )
        .expect("valid metric");
        let allowlist_rule_expiry = GaugeVec::new(
            Opts::new(
                "mfa_gate_allowlist_rule_expiry_timestamp_seconds",
                "When an [[allow]] rule with `expires` stops matching, as a Unix timestamp.",
            ),
            &["rule"],
        )
        .expect("valid metric");
        let hot = Arc::new(HotCounts::new());
        let request_duration = HotHistogram::new(
            Arc::clone(&hot),
            HistogramOf::RequestDuration,
            "mfa_gate_request_duration_seconds",
            "Time from request head received to response head sent, by decision.",
        );
        let iam_requests = IntCounterVec::new(
            Opts::new(
                "mfa_gate_iam_requests_total",
                "Calls to the IAM provider by api and outcome.",
            ),
            &["api", "outcome"],
        )
        .expect("valid metric");
        let iam_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "mfa_gate_iam_request_duration_seconds",
                "Duration of one IAM call, by api.",
            )
            .buckets(IAM_BUCKETS.to_vec()),
            &["api"],
        )
        .expect("valid metric");
        let cache_lookups = IntCounterVec::new(
            Opts::new(
                "mfa_gate_cache_lookups_total",
                "Token cache lookups by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let cache_entries =
            IntGauge::new("mfa_gate_cache_entries", "Entries in the token cache.").expect("valid");
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "mfa_gate_upstream_responses_total",
                "Upstream answers by status class, or error/timeout when none came.",
            ),
            &["class"],
        )
        .expect("valid metric");
        let upstream_duration = HotHistogram::new(
            Arc::clone(&hot),
            HistogramOf::UpstreamDuration,
            "mfa_gate_upstream_duration_seconds",
            "Time from forwarding a request to the upstream's response head.",
        );
        let inflight_requests = IntGauge::new(
            "mfa_gate_inflight_requests",
            "Requests being handled right now.",
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new("mfa_gate_config_reloads_total", "Config reloads by result."),
            &["result"],
        )
        .expect("valid metric");
        let admin_actions = IntCounterVec::new(
            Opts::new(
                "mfa_gate_admin_actions_total",
                "Admin API actions by action and result.",
            ),
            &["action", "result"],
        )
        .expect("valid metric");
        let route_decisions = IntCounterVec::new(
            Opts::new(
                "mfa_gate_route_decisions_total",
                "Decisions on requests covered by a [[route]], by route, decision and reason.",
            ),
            &["route", "decision", "reason"],
        )
        .expect("valid metric");
        let shared_cache_requests = IntCounterVec::new(
            Opts::new(
                "mfa_gate_shared_cache_requests_total",
                "Reads of the shared cache ([cache.shared], Redis) by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let shared_cache_up = IntGauge::new(
            "mfa_gate_shared_cache_up",
            "1 while the shared cache (Redis) answers; 0 while it is down or not configured.",
        )
        .expect("valid metric");
        let shared_cache_invalidations = IntCounterVec::new(
            Opts::new(
                "mfa_gate_shared_cache_invalidations_total",
                "Fleet-wide cache invalidations published, received, or resynchronised after an outage.",
            ),
            &["event"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "mfa_gate_build_info",
                "Always 1; the version is in the label.",
            ),
            &["version"],
        )
        .expect("valid metric");

        for collector in [
            Box::new(decisions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(allowlist_matches.clone()),
            Box::new(allowlist_rule_expiry.clone()),
            Box::new(request_duration),
            Box::new(iam_requests.clone()),
            Box::new(iam_request_duration.clone()),
            Box::new(cache_lookups.clone()),
            Box::new(cache_entries.clone()),
            Box::new(upstream_responses.clone()),
            Box::new(upstream_duration),
            Box::new(inflight_requests.clone()),
            Box::new(config_reloads.clone()),
            Box::new(build_info.clone()),
            Box::new(admin_actions.clone()),
            Box::new(route_decisions.clone()),
            Box::new(shared_cache_requests.clone()),
            Box::new(shared_cache_up.clone()),
            Box::new(shared_cache_invalidations.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }

        for decision in DECISIONS {
            for reason in REASONS {
                decisions.with_label_values(&[decision, reason]);
            }
        }
        for api in IAM_APIS {
            iam_request_duration.with_label_values(&[api]);
            for outcome in IAM_OUTCOMES {
                iam_requests.with_label_values(&[api, outcome]);
            }
        }
        for result in CACHE_RESULTS {
            cache_lookups.with_label_values(&[result]);
        }
        for result in SHARED_CACHE_RESULTS {
            shared_cache_requests.with_label_values(&[result]);
        }
        for event in SHARED_CACHE_INVALIDATIONS {
            shared_cache_invalidations.with_label_values(&[event]);
        }
        for class in UPSTREAM_CLASSES {
            upstream_responses.with_label_values(&[class]);
        }
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        for (action, result) in [
            ("cache_purge", "ok"),
            ("cache_purge", "unauthorized"),
            ("disable_mfa_device", "ok"),
            ("disable_mfa_device", "iam_error"),
            ("disable_mfa_device", "iam_unavailable"),
            ("disable_mfa_device", "unauthorized"),
        ] {
            admin_actions.with_label_values(&[action, result]);
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let decision_counters = std::array::from_fn(|d| {
            std::array::from_fn(|r| decisions.with_label_values(&[DECISIONS[d], REASONS[r]]))
        });
        let cache_lookups_by_result =
            std::array::from_fn(|r| cache_lookups.with_label_values(&[CACHE_RESULTS[r]]));
        let upstream_responses_by_class =
            std::array::from_fn(|c| upstream_responses.with_label_values(&[UPSTREAM_CLASSES[c]]));

        Metrics {
            registry,
            decisions,
            allowlist_matches,
            allowlist_rule_expiry,
            iam_requests,
            iam_request_duration,
            cache_lookups,
            cache_entries,
            upstream_responses,
            inflight_requests,
            config_reloads,
            build_info,
            admin_actions,
            route_decisions,
            shared_cache_requests,
            shared_cache_up,
            shared_cache_invalidations,
            decision_counters,
            hot,
            upstream_responses_by_class,
            cache_lookups_by_result,
        }
    }

    /// Counts one IAM call and its duration.
    pub fn observe_iam(&self, api: &str, outcome: &str, seconds: f64) {
        self.iam_requests.with_label_values(&[api, outcome]).inc();
        self.iam_request_duration
            .with_label_values(&[api])
            .observe(seconds);
    }

    /// Initialises the match counter of each allow rule at 0, so a rule that never matched is
    /// visible as such.
    pub fn touch_allow_rules<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            self.allowlist_matches.with_label_values(&[name]);
        }
    }

    /// Initialises the route decision counters of each `[[route]]` at 0.
    pub fn touch_routes<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            for decision in DECISIONS {
                for reason in REASONS {
                    self.route_decisions
                        .with_label_values(&[name, decision, reason]);
                }
            }
        }
    }

    /// Publishes the expiry of every expiring rule of the config in force (and forgets rules
    /// that are gone).
    pub fn set_rule_expiries(&self, rules: &[crate::config::AllowRule]) {
        self.allowlist_rule_expiry.reset();
        for rule in rules {
            if let Some(expires) = rule.expires {
                let seconds = expires
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.allowlist_rule_expiry
                    .with_label_values(&[&rule.name])
                    .set(seconds);
            }
        }
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.hot.fold_into(FoldTargets {
            decisions: &self.decision_counters,
            upstream_classes: &self.upstream_responses_by_class,
            cache_results: &self.cache_lookups_by_result,
            inflight: &self.inflight_requests,
        });
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
