//! MFA enforcement end to end: the Huawei provider against the IAM simulator, the cache, the
//! policy, the allowlist and the decision endpoint (issue "Enforce MFA").

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, StatusCode};
use mfa_gate::dev::iam_sim::{Api, Fault, SimUser};

use crate::support::{raw, raw_status, send, Harness};

const ALLOW_MFA: &str = "mfa_gate_decisions_total{decision=\"allow\",reason=\"mfa_verified\"}";
const DENY_NO_MFA: &str = "mfa_gate_decisions_total{decision=\"deny\",reason=\"no_mfa\"}";

fn user(
    name: &str,
    device: bool,
    login_protect: Option<(bool, &str)>,
    methods: &[&str],
) -> SimUser {
    SimUser {
        user_id: format!("{name}-0123456789abcdef0123456789ab"),
        user_name: name.into(),
        domain_id: "d0000000000000000000000000000001".into(),
        domain_name: "test-domain".into(),
        token: format!("tok-{name}-{}", uuid::Uuid::new_v4().simple()),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        expires_at: SystemTime::now() + Duration::from_secs(3600),
        mfa_device: device.then(|| format!("iam/mfa/{name}")),
        login_protect: login_protect.map(|(enabled, method)| (enabled, method.to_string())),
    }
}

#[tokio::test]
async fn user_with_mfa_device_is_forwarded_with_identity() {
    let h = Harness::start().await;
    let alice = h.user("alice").clone();
    let answer = h.get_as("/app", "alice").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.seen_header("x-auth-user-id"),
        Some(alice.user_id.clone())
    );
    assert_eq!(
        answer.seen_header("x-auth-user-name"),
        Some(alice.user_name.clone())
    );
    assert_eq!(
        answer.seen_header("x-auth-domain-id"),
        Some(alice.domain_id.clone())
    );
    assert_eq!(
        answer.seen_header("x-auth-domain-name"),
        Some(alice.domain_name.clone())
    );
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("mfa_device")
    );
    // require = "mfa_device" needs no login-protect lookup.
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    assert_eq!(h.sim.calls(Api::MfaDevice), 1);
    assert_eq!(h.sim.calls(Api::LoginProtect), 0);
    // The IAM saw the user's own token on every call.
    assert!(h.sim.seen_tokens().iter().all(|t| *t == alice.token));

    // Cached: no further IAM calls.
    let answer = h.get_as("/app", "alice").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    assert_eq!(
        h.metric("mfa_gate_cache_lookups_total{result=\"hit\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("mfa_gate_cache_lookups_total{result=\"miss\"}")
            .await,
        1.0
    );
    assert_eq!(h.metric(ALLOW_MFA).await, 2.0);
}

#[tokio::test]
async fn users_without_mfa_get_403_and_nothing_reaches_the_upstream() {
    let h = Harness::start().await;
    for name in ["bob", "carol"] {
        let answer = h.get_as("/app", name).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{name}");
        let body = answer.json();
        assert_eq!(body["error_code"], "MFAGATE.NO_MFA");
        assert_eq!(
            body["error_msg"],
            "MFA is required: bind a virtual MFA device to your IAM user"
        );
        assert_eq!(
            body["request_id"],
            answer.headers["x-request-id"].to_str().unwrap()
        );
    }
    assert_eq!(h.upstream.request_count(), 0);
    assert_eq!(h.metric(DENY_NO_MFA).await, 2.0);
}

#[tokio::test]
async fn missing_and_invalid_tokens_get_401_with_www_authenticate() {
    let h = Harness::start().await;
    let answer = h.get("/app", &[]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "MFAGATE.NO_TOKEN");
    assert!(answer.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));

    let answer = h.get("/app", &[("x-auth-token", "no-such-token")]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "MFAGATE.INVALID_TOKEN");
    assert!(answer.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);

    // A basic-auth header is no token; an absurd token is refused before any IAM call.
    let answer = h
        .get("/app", &[("authorization", "Basic dXNlcjpwdw==")])
        .await;
    assert_eq!(answer.error_code(), "MFAGATE.NO_TOKEN");
    let long = "x".repeat(17 * 1024);
    let answer = h.get("/app", &[("x-auth-token", &long)]).await;
    assert_eq!(answer.error_code(), "MFAGATE.INVALID_TOKEN");
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);

    // Invalid tokens are cached for negative_ttl: asking again costs no IAM call.
    let answer = h.get("/app", &[("x-auth-token", "no-such-token")]).await;
    assert_eq!(answer.error_code(), "MFAGATE.INVALID_TOKEN");
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    assert_eq!(h.upstream.request_count(), 0);
    assert_eq!(
        h.metric("mfa_gate_decisions_total{decision=\"deny\",reason=\"invalid_token\"}")
            .await,
        3.0
    );
    assert_eq!(
        h.metric("mfa_gate_decisions_total{decision=\"deny\",reason=\"no_token\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn bearer_authorization_is_accepted_case_insensitively() {
    let h = Harness::start().await;
    let token = h.token("alice");
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let value = format!("{scheme} {token}");
        let answer = h.get("/", &[("authorization", &value)]).await;
        assert_eq!(answer.status, StatusCode::OK, "{scheme}");
    }
}

#[tokio::test]
async fn require_login_protect_counts_only_the_configured_methods() {
    let h = Harness::with_config("[policy]\nrequire = \"login_protect\"\n").await;
    let answer = h.get_as("/", "alice").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("login_protect:vmfa")
    );
    // bob protects his login with SMS only, which does not count by default.
    assert_eq!(h.get_as("/", "bob").await.status, StatusCode::FORBIDDEN);
    // carol never configured login protection: the IAM answers 404 "Iam.0004" (seed page
    // spelling), which means "off", not "IAM unavailable".
    let answer = h.get_as("/", "carol").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text());
    assert_eq!(h.sim.calls(Api::MfaDevice), 0);
    assert_eq!(
        h.metric("mfa_gate_iam_requests_total{api=\"login_protect\",outcome=\"not_found\"}")
            .await,
        1.0
    );

    let h = Harness::with_config(
        "[policy]\nrequire = \"login_protect\"\nlogin_protect_methods = [\"vmfa\", \"sms\"]\n",
    )
    .await;
    let answer = h.get_as("/", "bob").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("login_protect:sms")
    );
}

#[tokio::test]
async fn require_any_and_all() {
    let h = Harness::with_config("[policy]\nrequire = \"any\"\n").await;
    let device_only = user("dora", true, None, &["password"]);
    let vmfa_only = user("vic", false, Some((true, "VMFA")), &["password"]);
    h.sim.add_user(device_only.clone());
    h.sim.add_user(vmfa_only.clone());
    let get = |token: String| {
        let url = h.url("/");
        async move { send(Method::GET, &url, &[("x-auth-token", &token)], Bytes::new()).await }
    };
    let answer = get(h.token("alice")).await;
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("mfa_device,login_protect:vmfa")
    );
    assert_eq!(get(device_only.token.clone()).await.status, StatusCode::OK);
    let answer = get(vmfa_only.token.clone()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("login_protect:vmfa")
    );
    assert_eq!(get(h.token("carol")).await.status, StatusCode::FORBIDDEN);

    let h2 = Harness::with_config("[policy]\nrequire = \"all\"\n").await;
    h2.sim.add_user(device_only.clone());
    h2.sim.add_user(vmfa_only.clone());
    assert_eq!(h2.get_as("/", "alice").await.status, StatusCode::OK);
    let url = h2.url("/");
    for token in [&device_only.token, &vmfa_only.token] {
        let answer = send(Method::GET, &url, &[("x-auth-token", token)], Bytes::new()).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
    }
}

#[tokio::test]
async fn require_totp_login_needs_an_mfa_issued_token() {
    let h = Harness::with_config("[policy]\nrequire_totp_login = true\n").await;
    // alice's token came from a password + TOTP login.
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    let password_only = user("pat", true, None, &["password"]);
    h.sim.add_user(password_only.clone());
    let answer = h.get("/", &[("x-auth-token", &password_only.token)]).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn report_only_forwards_but_counts_the_denial() {
    let h = Harness::with_config("[policy]\nmode = \"report_only\"\n").await;
    let carol = h.user("carol").clone();
    let answer = h.get_as("/", "carol").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.seen_header("x-auth-user-id"), Some(carol.user_id));
    assert_eq!(answer.seen_header("x-auth-mfa").as_deref(), Some("none"));
    assert_eq!(
        h.metric("mfa_gate_decisions_total{decision=\"allow\",reason=\"report_only\"}")
            .await,
        1.0
    );
    // Users with MFA are still reported as verified.
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    assert_eq!(h.metric(ALLOW_MFA).await, 1.0);
    // An invalid token is still refused in report-only mode.
    let answer = h.get("/", &[("x-auth-token", "nope")]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let h = Harness::with_config("[[allow]]\nname = \"public\"\npaths = [\"/public/**\"]\n").await;
    let carol = h.user("carol").clone();
    let spoof = [
        ("x-auth-user-id", "admin"),
        ("x_auth_user_name", "root"),
        ("x.auth.domain.id", "other"),
        ("X-Auth-Domain-Name", "other"),
        ("x-auth-mfa", "mfa_device"),
        ("x_auth_mfa", "mfa_device"),
        ("x-http-method-override", "DELETE"),
        ("x-original-uri", "/admin"),
        ("x-forwarded-uri", "/admin"),
        ("x-original-method", "DELETE"),
    ];
    // An allowlisted request: no identity at all upstream.
    let answer = h.get("/public/page", &spoof).await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = answer.json();
    let names: Vec<&String> = seen["headers"].as_object().unwrap().keys().collect();
    for (name, _) in spoof {
        let folded = name.to_ascii_lowercase().replace(['_', '.'], "-");
        if folded == "x-auth-mfa" {
            assert_eq!(answer.seen_header("x-auth-mfa").as_deref(), Some("none"));
        } else {
            assert!(
                !names.iter().any(|n| n.replace(['_', '.'], "-") == folded),
                "{name} reached the upstream: {names:?}"
            );
        }
    }

    // An identified request: the real identity replaces anything the client sent.
    let alice = h.user("alice").clone();
    let mut headers = spoof.to_vec();
    headers.push(("x-auth-token", &alice.token));
    let answer = h.get("/app", &headers).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.seen_header("x-auth-user-id"),
        Some(alice.user_id.clone())
    );
    assert_eq!(
        answer.seen_header("x-auth-domain-id"),
        Some(alice.domain_id.clone())
    );
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("mfa_device")
    );
    assert_eq!(answer.seen_header("x-http-method-override"), None);

    // And a user without MFA cannot dress up as one with it.
    let carol_token = carol.token.clone();
    let mut headers = spoof.to_vec();
    headers.push(("x-auth-token", &carol_token));
    assert_eq!(h.get("/app", &headers).await.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn connection_header_cannot_strip_identity_headers() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let answer = h
        .get(
            "/",
            &[("x-auth-token", &token), ("connection", "X-Auth-User-Id")],
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(h.upstream.request_count(), 0);
}

#[tokio::test]
async fn path_tricks_never_bypass_the_allowlist() {
    let h = Harness::with_config(
        "[[allow]]\nname = \"public\"\npaths = [\"/public/**\"]\n[[allow]]\nname = \"status\"\npaths = [\"/status\"]\nmethods = [\"GET\"]\n",
    )
    .await;
    // (raw request target, expected status); 401 = judged as the non-public path it really is.
    let cases = [
        ("/public/../admin", 401),
        ("/public/%2e%2e/admin", 401),
        ("/public/%2E%2e/admin", 401),
        ("/public/.%2e/admin", 401),
        ("/public/..;/admin", 400),
        ("/public/%2e%2e;/admin", 400),
        ("/public%2f..%2fadmin", 400),
        ("/public%2F..%2Fadmin", 400),
        ("/public/..%5cadmin", 400),
        ("/public\\..\\admin", 400),
        ("/public/%00/x", 400),
        ("/public/x%23", 400),
        ("/publicity", 401),
        ("/Public/x", 401),
        ("/status/", 401),
        ("/status;x", 401),
        ("/admin?/public/x", 401),
        // hyper drops a fragment while parsing the request target: judged as /admin.
        ("/admin#/public/x", 401),
        ("//public/x", 200),
        ("/x/../public/y", 200),
        ("/public/%41", 200),
        ("/status?x=/admin", 200),
    ];
    for (target, status) in cases {
        let request = format!("GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
        let answer = raw(h.addr(), request.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(raw_status(&answer), status, "{target} → {answer:.300}");
    }
    // What was forwarded is the normalised path.
    let uris: Vec<String> = h.upstream.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(
        uris,
        ["/public/x", "/public/y", "/public/A", "/status?x=/admin"],
        "forwarded"
    );
}

#[tokio::test]
async fn allowlisted_requests_carry_no_identity() {
    let h = Harness::with_config(
        "[[allow]]\nname = \"health\"\npaths = [\"/healthz\"]\nmethods = [\"GET\", \"HEAD\"]\n[[allow]]\nname = \"office\"\ncidrs = [\"127.0.0.0/8\"]\npaths = [\"/status\"]\n",
    )
    .await;
    let answer = h.get("/healthz", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.seen_header("x-auth-mfa").as_deref(), Some("none"));
    assert_eq!(answer.seen_header("x-auth-user-id"), None);
    // Even with a valid token, an allowlisted request is not looked up.
    let answer = h.get_as("/status", "alice").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.seen_header("x-auth-user-id"), None);
    assert_eq!(h.sim.calls(Api::VerifyToken), 0);
    // Method matters.
    let answer = send(Method::POST, &h.url("/healthz"), &[], Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.metric("mfa_gate_allowlist_matches_total{rule=\"health\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("mfa_gate_allowlist_matches_total{rule=\"office\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("mfa_gate_decisions_total{decision=\"allow\",reason=\"allowlisted\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn identity_rules_exempt_break_glass_users_from_mfa() {
    let h =
        Harness::with_config("[[allow]]\nname = \"break-glass\"\nuser_names = [\"carol\"]\n").await;
    let carol = h.user("carol").clone();
    let answer = h.get_as("/", "carol").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.seen_header("x-auth-user-id"), Some(carol.user_id));
    assert_eq!(answer.seen_header("x-auth-mfa").as_deref(), Some("none"));
    // Still needs a valid token.
    assert_eq!(h.get("/", &[]).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.get_as("/", "bob").await.status, StatusCode::FORBIDDEN);
    assert_eq!(
        h.metric("mfa_gate_allowlist_matches_total{rule=\"break-glass\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn concurrent_misses_for_one_token_make_one_fetch() {
    let h = Harness::with_config("[policy]\nrequire = \"any\"\n").await;
    h.sim
        .set_fault(None, Some(Fault::Latency(Duration::from_millis(200))));
    let token = h.token("alice");
    let url = h.url("/");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (url, token) = (url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            send(Method::GET, &url, &[("x-auth-token", &token)], Bytes::new())
                .await
                .status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    assert_eq!(h.sim.calls(Api::MfaDevice), 1);
    assert!(h.sim.calls(Api::LoginProtect) <= 1);
    assert_eq!(h.upstream.request_count(), 50);
    assert_eq!(h.metric(ALLOW_MFA).await, 50.0);
}

#[tokio::test]
async fn a_client_hanging_up_does_not_abort_the_shared_lookup() {
    let h = Harness::start().await;
    h.sim
        .set_fault(None, Some(Fault::Latency(Duration::from_millis(300))));
    let token = h.token("alice");
    // The first client gives up before the IAM answers.
    let impatient = {
        let url = h.url("/");
        let token = token.clone();
        tokio::spawn(async move {
            send(Method::GET, &url, &[("x-auth-token", &token)], Bytes::new()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let patient = {
        let url = h.url("/");
        let token = token.clone();
        tokio::spawn(async move {
            send(Method::GET, &url, &[("x-auth-token", &token)], Bytes::new()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    impatient.abort();
    assert_eq!(patient.await.unwrap().status, StatusCode::OK);
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
}

#[tokio::test]
async fn cache_entries_never_outlive_the_token() {
    let h = Harness::with_config("[cache]\nttl = \"5m\"\n").await;
    let mut short = user("sam", true, None, &["password"]);
    short.expires_at = SystemTime::now() + Duration::from_millis(1500);
    h.sim.add_user(short.clone());
    let answer = h.get("/", &[("x-auth-token", &short.token)]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    // The entry expired with the token; the IAM now calls it invalid.
    let answer = h.get("/", &[("x-auth-token", &short.token)]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.sim.calls(Api::VerifyToken), 2);
}

#[tokio::test]
async fn users_without_mfa_are_cached_only_for_negative_ttl() {
    let h = Harness::with_config("[cache]\nttl = \"5m\"\nnegative_ttl = \"500ms\"\n").await;
    let carol = h.user("carol").clone();
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::FORBIDDEN);
    // carol binds a device; within negative_ttl the old answer stands...
    h.sim
        .set_mfa_device(&carol.user_id, Some("iam/mfa/carol".into()));
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::FORBIDDEN);
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    // ...and right after it she is let in.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::OK);
    assert_eq!(h.sim.calls(Api::VerifyToken), 2);
}

#[tokio::test]
async fn iam_failures_fail_closed_with_503() {
    for (fault, outcome) in [
        (Fault::Status(500), "server_error"),
        (Fault::Status(503), "server_error"),
        (Fault::Throttle, "throttled"),
        (Fault::Garbage, "bad_response"),
        (Fault::Html, "bad_response"),
        (Fault::Truncated, ""),
        (Fault::Huge, "bad_response"),
        (Fault::MissingFields, "bad_response"),
        (Fault::WrongTypes, "bad_response"),
        (Fault::Drop, "transport_error"),
        (Fault::Latency(Duration::from_secs(3)), "timeout"),
        (Fault::Status(403), "forbidden"),
    ] {
        let h = Harness::with_config("[iam]\ntimeout = \"500ms\"\n").await;
        h.sim.set_fault(Some(Api::VerifyToken), Some(fault.clone()));
        let answer = h.get_as("/", "alice").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{fault:?}");
        assert_eq!(answer.error_code(), "MFAGATE.IAM_UNAVAILABLE", "{fault:?}");
        assert_eq!(h.upstream.request_count(), 0, "{fault:?}");
        if !outcome.is_empty() {
            let sample = format!(
                "mfa_gate_iam_requests_total{{api=\"verify_token\",outcome=\"{outcome}\"}}"
            );
            assert_eq!(h.metric(&sample).await, 1.0, "{fault:?}");
        }
        assert_eq!(
            h.metric("mfa_gate_decisions_total{decision=\"deny\",reason=\"iam_unavailable\"}")
                .await,
            1.0
        );
        // Never cached: once the IAM recovers, the next request goes through.
        h.sim.set_fault(None, None);
        assert_eq!(
            h.get_as("/", "alice").await.status,
            StatusCode::OK,
            "{fault:?}"
        );
    }
}

#[tokio::test]
async fn a_failing_mfa_lookup_is_not_read_as_no_mfa_or_mfa() {
    let h = Harness::start().await;
    h.sim
        .set_fault(Some(Api::MfaDevice), Some(Fault::Status(500)));
    let answer = h.get_as("/", "alice").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    h.sim
        .set_fault(Some(Api::MfaDevice), Some(Fault::OtherUser));
    let answer = h.get_as("/", "carol").await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.text()
    );
    assert_eq!(h.upstream.request_count(), 0);
}

#[tokio::test]
async fn verify_answers_about_another_user_are_not_trusted_blindly() {
    let h = Harness::start().await;
    h.sim
        .set_fault(Some(Api::VerifyToken), Some(Fault::OtherUser));
    let answer = h.get_as("/", "carol").await;
    // Either refused outright or judged as the user the IAM named; never carol with MFA.
    assert_ne!(
        answer.status,
        StatusCode::OK,
        "carol passed with another user's answer: {}",
        answer.text()
    );
}

#[tokio::test]
async fn stale_entries_serve_while_the_iam_fails_within_stale_if_error() {
    let h = Harness::with_config(
        "[cache]\nttl = \"300ms\"\nnegative_ttl = \"300ms\"\nstale_if_error = \"30s\"\n",
    )
    .await;
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.sim.set_fault(None, Some(Fault::Status(500)));
    let answer = h.get_as("/", "alice").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("mfa_device")
    );
    // A stale deny stays a deny.
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::FORBIDDEN);
    assert_eq!(
        h.metric("mfa_gate_cache_lookups_total{result=\"stale\"}")
            .await,
        2.0
    );
    // A token never seen before has nothing stale to fall back on.
    assert_eq!(
        h.get_as("/", "bob").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let h = Harness::with_config("[cache]\nttl = \"300ms\"\nstale_if_error = \"0s\"\n").await;
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.sim.set_fault(None, Some(Fault::Status(500)));
    assert_eq!(
        h.get_as("/", "alice").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// A token revoked once its "allowed" was stale is refused, and stays refused while the IAM
/// fails: an outage falls back on the IAM's last word, the revocation, not on what came before.
#[tokio::test]
async fn a_revoked_token_is_not_let_in_on_its_earlier_answer_while_the_iam_fails() {
    let h = Harness::with_config("[cache]\nttl = \"300ms\"\nstale_if_error = \"30s\"\n").await;
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.sim.remove_token(&h.token("alice"));
    assert_eq!(
        h.get_as("/", "alice").await.status,
        StatusCode::UNAUTHORIZED
    );
    let verified = h.sim.calls(Api::VerifyToken);
    h.sim.set_fault(None, Some(Fault::Status(500)));
    for _ in 0..3 {
        assert_eq!(
            h.get_as("/", "alice").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // Answered from the cache: the revocation is fresh, nothing is asked again.
    assert_eq!(h.sim.calls(Api::VerifyToken), verified);
}

#[tokio::test]
async fn on_iam_error_allow_fails_open_without_identity() {
    let h = Harness::with_config("[policy]\non_iam_error = \"allow\"\n").await;
    h.sim.set_fault(None, Some(Fault::Status(500)));
    let answer = h.get_as("/", "carol").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.seen_header("x-auth-mfa").as_deref(), Some("none"));
    assert_eq!(answer.seen_header("x-auth-user-id"), None);
    assert_eq!(
        h.metric("mfa_gate_decisions_total{decision=\"allow\",reason=\"iam_unavailable\"}")
            .await,
        1.0
    );
    // Fail-open is for IAM failures only: no token is still 401.
    assert_eq!(h.get("/", &[]).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_answer_fetched_across_a_purge_is_used_once_but_not_cached() {
    let h = Harness::start().await;
    let alice = h.user("alice").clone();
    // The MFA lookup is in flight when the purge comes (say, right after the device was
    // disabled): what it answers may be what the purge meant to forget.
    h.sim.set_fault(
        Some(Api::MfaDevice),
        Some(Fault::Latency(Duration::from_millis(600))),
    );
    let url = h.url("/");
    let token = alice.token.clone();
    let in_flight = tokio::spawn(async move {
        send(Method::GET, &url, &[("x-auth-token", &token)], Bytes::new()).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let purge = h.admin_url(&format!("/admin/cache/purge?user_id={}", alice.user_id));
    let answer = send(Method::POST, &purge, &[], Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    h.sim.set_fault(None, None);
    h.sim.reset_calls();
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    assert_eq!(
        h.sim.calls(Api::VerifyToken),
        1,
        "the answer fetched across the purge was cached"
    );
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    assert_eq!(h.sim.calls(Api::VerifyToken), 1, "a later answer is cached");
}

#[tokio::test]
async fn purge_drops_cached_entries() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "admin-secret\n").unwrap();
    let h = Harness::with_config(&format!(
        "[admin]\ntoken_file = \"{}\"\n",
        token_file.display()
    ))
    .await;
    let alice = h.user("alice").clone();
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    assert_eq!(h.get_as("/", "bob").await.status, StatusCode::FORBIDDEN);
    let purge = h.admin_url(&format!("/admin/cache/purge?user_id={}", alice.user_id));

    let answer = send(Method::POST, &purge, &[], Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = send(
        Method::POST,
        &purge,
        &[("authorization", "Bearer wrong")],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);

    let auth = [("authorization", "Bearer admin-secret")];
    let answer = send(Method::POST, &purge, &auth, Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["purged"], 1);
    assert_eq!(h.get_as("/", "alice").await.status, StatusCode::OK);
    assert_eq!(
        h.sim.calls(Api::VerifyToken),
        3,
        "alice fetched again after the purge"
    );
    assert_eq!(h.get_as("/", "bob").await.status, StatusCode::FORBIDDEN);
    assert_eq!(h.sim.calls(Api::VerifyToken), 3, "bob still cached");

    let answer = send(
        Method::POST,
        &h.admin_url("/admin/cache/purge"),
        &auth,
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.json()["purged"], 2);
    // A single gateway (no [cache.shared]) has no fleet to tell.
    assert_eq!(answer.json().get("fleet"), None);
    assert_eq!(h.get_as("/", "bob").await.status, StatusCode::FORBIDDEN);
    assert_eq!(h.sim.calls(Api::VerifyToken), 4);
}

#[tokio::test]
async fn decision_endpoint_answers_without_forwarding() {
    let h = Harness::with_config("[[allow]]\nname = \"public\"\npaths = [\"/public/**\"]\n").await;
    let alice = h.user("alice").clone();
    let answer = h.get_as("/.mfa-gate/auth", "alice").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["x-auth-user-id"], alice.user_id.as_str());
    assert_eq!(answer.headers["x-auth-mfa"], "mfa_device");
    assert_eq!(
        h.get_as("/.mfa-gate/auth", "carol").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get("/.mfa-gate/auth", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    // The original request from a trusted proxy (127.0.0.1 by default) goes through the
    // allowlist, after normalisation.
    let answer = h
        .get(
            "/.mfa-gate/auth",
            &[
                ("x-forwarded-uri", "/public/x?y=1"),
                ("x-forwarded-method", "GET"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["x-auth-mfa"], "none");
    assert!(answer.headers.get("x-auth-user-id").is_none());
    let answer = h
        .get("/.mfa-gate/auth", &[("x-original-uri", "/public/../admin")])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = h
        .get(
            "/.mfa-gate/auth",
            &[("x-original-uri", "/public/..;/admin")],
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(h.upstream.request_count(), 0);

    // From an untrusted peer the headers are ignored: judged as GET /.
    let h = Harness::with_config(
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n[[allow]]\nname = \"public\"\npaths = [\"/public/**\"]\n",
    )
    .await;
    let answer = h
        .get("/.mfa-gate/auth", &[("x-forwarded-uri", "/public/x")])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn metrics_count_every_decision_and_iam_call() {
    let h = Harness::with_config("[[allow]]\nname = \"health\"\npaths = [\"/healthz\"]\n").await;
    let text = h.metrics().await;
    // Every family is there from the start, label values at 0.
    for family in [
        "mfa_gate_decisions_total",
        "mfa_gate_allowlist_matches_total",
        "mfa_gate_request_duration_seconds",
        "mfa_gate_iam_requests_total",
        "mfa_gate_iam_request_duration_seconds",
        "mfa_gate_cache_lookups_total",
        "mfa_gate_cache_entries",
        "mfa_gate_upstream_responses_total",
        "mfa_gate_upstream_duration_seconds",
        "mfa_gate_inflight_requests",
        "mfa_gate_config_reloads_total",
        "mfa_gate_build_info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    assert!(text.contains("mfa_gate_allowlist_matches_total{rule=\"health\"} 0"));

    for _ in 0..3 {
        h.get_as("/", "alice").await;
    }
    for _ in 0..2 {
        h.get_as("/", "carol").await;
    }
    h.get("/", &[]).await;
    h.get("/healthz", &[]).await;
    let text = h.metrics().await;
    let value = |s: &str| crate::support::metric_value(&text, s);
    assert_eq!(value(ALLOW_MFA), 3.0);
    assert_eq!(value(DENY_NO_MFA), 2.0);
    assert_eq!(
        value("mfa_gate_decisions_total{decision=\"deny\",reason=\"no_token\"}"),
        1.0
    );
    assert_eq!(
        value("mfa_gate_decisions_total{decision=\"allow\",reason=\"allowlisted\"}"),
        1.0
    );
    assert_eq!(
        value("mfa_gate_request_duration_seconds_count{decision=\"allow\"}"),
        4.0
    );
    assert_eq!(
        value("mfa_gate_request_duration_seconds_count{decision=\"deny\"}"),
        3.0
    );
    assert_eq!(
        value("mfa_gate_iam_requests_total{api=\"verify_token\",outcome=\"ok\"}"),
        2.0
    );
    assert_eq!(
        value("mfa_gate_iam_requests_total{api=\"mfa_device\",outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value("mfa_gate_iam_requests_total{api=\"mfa_device\",outcome=\"not_found\"}"),
        1.0
    );
    assert_eq!(
        value("mfa_gate_iam_request_duration_seconds_count{api=\"verify_token\"}"),
        2.0
    );
    assert_eq!(value("mfa_gate_cache_lookups_total{result=\"miss\"}"), 2.0);
    assert_eq!(value("mfa_gate_cache_lookups_total{result=\"hit\"}"), 3.0);
    assert_eq!(value("mfa_gate_cache_entries"), 2.0);
    assert_eq!(
        value("mfa_gate_upstream_responses_total{class=\"2xx\"}"),
        4.0
    );
    assert_eq!(value("mfa_gate_upstream_duration_seconds_count"), 4.0);
    assert_eq!(value("mfa_gate_inflight_requests"), 0.0);
    assert_eq!(value("mfa_gate_build_info{version=\"0.1.0\"}"), 1.0);
}

#[tokio::test]
async fn a_second_unverified_token_never_rides_along() {
    let h = Harness::start().await;
    let alice = h.token("alice");
    let carol = h.token("carol");
    let bearer = format!("Bearer {carol}");
    let answer = h
        .get("/", &[("x-auth-token", &alice), ("authorization", &bearer)])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(h.upstream.request_count(), 0);
    // The same token twice is fine.
    let same = format!("Bearer {alice}");
    let answer = h
        .get("/", &[("x-auth-token", &alice), ("authorization", &same)])
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    // Look-alike spellings of the token headers are not forwarded.
    let answer = h
        .get(
            "/",
            &[
                ("x-auth-token", &alice),
                ("x_auth_token", &carol),
                ("x.auth.token", &carol),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = answer.json();
    let text = seen["headers"].to_string();
    assert!(
        !text.contains(&carol),
        "carol's token reached the upstream: {text}"
    );
    assert_eq!(answer.seen_header("x-auth-token"), Some(alice));
}

/// One client connection kept open across requests, as a keep-alive client (or a front
/// proxy's pool) keeps it: what the gateway remembers per connection must not outlive what its
/// cache would answer.
struct KeptAlive {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    token: String,
}

impl KeptAlive {
    async fn open(h: &Harness, user: &str) -> KeptAlive {
        let stream = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        KeptAlive {
            sender,
            token: h.token(user),
        }
    }

    async fn status(&mut self) -> StatusCode {
        let request = http::Request::get("/")
            .header("host", "localhost")
            .header("x-auth-token", &self.token)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let answer =
            tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(request))
                .await
                .expect("request timed out")
                .expect("request failed on the kept-alive connection");
        answer.status()
    }
}

#[tokio::test]
async fn a_purge_reaches_a_connection_kept_open() {
    let h = Harness::start().await;
    let alice = h.user("alice").clone();
    let mut conn = KeptAlive::open(&h, "alice").await;
    assert_eq!(conn.status().await, StatusCode::OK);
    assert_eq!(conn.status().await, StatusCode::OK);
    assert_eq!(
        h.sim.calls(Api::VerifyToken),
        1,
        "the second request was a hit"
    );
    // Her device is disabled and her entries purged, as `/admin/mfa/disable` does.
    h.sim.set_mfa_device(&alice.user_id, None);
    let purge = h.admin_url(&format!("/admin/cache/purge?user_id={}", alice.user_id));
    assert_eq!(
        send(Method::POST, &purge, &[], Bytes::new()).await.status,
        StatusCode::OK
    );
    assert_eq!(
        conn.status().await,
        StatusCode::FORBIDDEN,
        "the connection still used what it knew before the purge"
    );
    assert_eq!(h.sim.calls(Api::VerifyToken), 2);
    let purge_all = h.admin_url("/admin/cache/purge");
    assert_eq!(
        send(Method::POST, &purge_all, &[], Bytes::new())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(conn.status().await, StatusCode::FORBIDDEN);
    assert_eq!(
        h.sim.calls(Api::VerifyToken),
        3,
        "a purge of everything too"
    );
}

#[tokio::test]
async fn a_connection_kept_open_asks_again_once_the_answer_is_no_longer_fresh() {
    let h = Harness::with_config("[cache]\nttl = \"5m\"\nnegative_ttl = \"500ms\"\n").await;
    let carol = h.user("carol").clone();
    let mut conn = KeptAlive::open(&h, "carol").await;
    assert_eq!(conn.status().await, StatusCode::FORBIDDEN);
    assert_eq!(conn.status().await, StatusCode::FORBIDDEN);
    h.sim
        .set_mfa_device(&carol.user_id, Some("iam/mfa/carol".into()));
    assert_eq!(
        conn.status().await,
        StatusCode::FORBIDDEN,
        "within negative_ttl"
    );
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(conn.status().await, StatusCode::OK);
    assert_eq!(h.sim.calls(Api::VerifyToken), 2);
    assert_eq!(
        h.metric("mfa_gate_cache_lookups_total{result=\"hit\"}")
            .await,
        2.0,
        "answers from the connection's memory count as cache hits"
    );
}
