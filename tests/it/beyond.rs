//! Beyond the peers: actionable denials (help_url, HTML for browsers) and expiring allow rules
//! with a reason.

use std::time::{Duration, SystemTime};

use http::StatusCode;

use crate::support::Harness;

#[tokio::test]
async fn denials_tell_the_user_what_to_do() {
    let h = Harness::with_config("[policy]\nhelp_url = \"https://console.example.com/iam/mfa\"\n")
        .await;
    let answer = h.get_as("/", "carol").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let body = answer.json();
    assert_eq!(body["error_code"], "MFAGATE.NO_MFA");
    assert_eq!(body["help_url"], "https://console.example.com/iam/mfa");

    // A browser gets a page in plain words, with the link.
    let carol = h.token("carol");
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let answer = h
        .get("/", &[("x-auth-token", &carol), ("accept", browser)])
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = answer.text();
    assert!(page.contains("Bind a virtual MFA device"), "{page}");
    assert!(
        page.contains("href=\"https://console.example.com/iam/mfa\""),
        "{page}"
    );
    assert!(!page.contains(&carol));

    let answer = h.get("/", &[("accept", "text/html")]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(answer.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    assert!(answer.text().contains("Sign-in required"));

    // curl and API clients keep JSON.
    let answer = h.get("/", &[("accept", "*/*")]).await;
    assert_eq!(answer.headers["content-type"], "application/json");
    // Without help_url the field is absent.
    let h = Harness::start().await;
    assert!(h
        .get_as("/", "carol")
        .await
        .json()
        .get("help_url")
        .is_none());
}

#[tokio::test]
async fn expiring_break_glass_rules_lapse_on_time() {
    let expires = SystemTime::now() + Duration::from_secs(2);
    let stamp = humantime::format_rfc3339_seconds(expires + Duration::from_secs(1)).to_string();
    let h = Harness::with_config(&format!(
        "[[allow]]\nname = \"incident-42\"\nuser_names = [\"carol\"]\nreason = \"INC-42: carol fixes prod\"\nexpires = \"{stamp}\"\n[[allow]]\nname = \"old\"\npaths = [\"/old\"]\nexpires = \"2020-01-01T00:00:00Z\"\n"
    ))
    .await;
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::OK);
    // An already expired rule matches nothing.
    assert_eq!(h.get("/old", &[]).await.status, StatusCode::UNAUTHORIZED);
    let expiry = h
        .metric("mfa_gate_allowlist_rule_expiry_timestamp_seconds{rule=\"incident-42\"}")
        .await;
    let wanted = humantime::parse_rfc3339(&stamp).unwrap();
    let wanted = wanted
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(expiry, wanted);
    assert_eq!(
        h.metric("mfa_gate_allowlist_rule_expiry_timestamp_seconds{rule=\"old\"}")
            .await,
        1_577_836_800.0
    );
    tokio::time::sleep(Duration::from_millis(3200)).await;
    // Entries for carol were cached; the rule is evaluated per request, so it lapses anyway.
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn routes_override_the_policy_for_their_subtree() {
    let h = Harness::with_config(
        "[[route]]\nname = \"new-app\"\npaths = [\"/new/**\"]\nmode = \"report_only\"\n[[route]]\nname = \"console\"\npaths = [\"/admin/**\"]\nrequire = \"all\"\nrequire_totp_login = true\n",
    )
    .await;
    // carol has no MFA: reported but let through on the new app, blocked elsewhere.
    let answer = h.get_as("/new/page", "carol").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.seen_header("x-auth-mfa").as_deref(), Some("none"));
    assert_eq!(
        h.get_as("/old/page", "carol").await.status,
        StatusCode::FORBIDDEN
    );
    // The admin console wants a device, login protection and an MFA-issued token: alice has all.
    let answer = h.get_as("/admin/users", "alice").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("mfa_device,login_protect:vmfa")
    );
    // A user with a device only passes the default policy but not the console's.
    let dora = mfa_gate::dev::iam_sim::SimUser {
        user_id: "d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0".into(),
        user_name: "dora".into(),
        domain_id: "dom".into(),
        domain_name: "dom".into(),
        token: "tok-dora-route-test".into(),
        methods: vec!["password".into(), "totp".into()],
        expires_at: SystemTime::now() + Duration::from_secs(600),
        mfa_device: Some("iam/mfa/dora".into()),
        login_protect: None,
    };
    h.sim.add_user(dora.clone());
    assert_eq!(
        h.get("/x", &[("x-auth-token", &dora.token)]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/admin/x", &[("x-auth-token", &dora.token)])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.metric("mfa_gate_route_decisions_total{decision=\"allow\",reason=\"report_only\",route=\"new-app\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric(
            "mfa_gate_route_decisions_total{decision=\"deny\",reason=\"no_mfa\",route=\"console\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        h.metric("mfa_gate_route_decisions_total{decision=\"allow\",reason=\"mfa_verified\",route=\"console\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn explain_says_why_from_the_cli_and_the_admin_api() {
    let h = Harness::with_config(
        "[[allow]]\nname = \"health\"\npaths = [\"/healthz\"]\nmethods = [\"GET\"]\n[[allow]]\nname = \"break-glass\"\nuser_names = [\"bob\"]\n",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gate.toml");
    std::fs::write(
        &config,
        crate::support::config_text(
            &h.sim.url(),
            &h.upstream.url(),
            "[[allow]]\nname = \"health\"\npaths = [\"/healthz\"]\nmethods = [\"GET\"]\n[[allow]]\nname = \"break-glass\"\nuser_names = [\"bob\"]\n",
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_mfa-gate");
    let config = &config;
    let run = |args: Vec<String>| async move {
        let output = tokio::process::Command::new(bin)
            .arg("explain")
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };

    // Allowlisted: the rule that matched and why the others did not.
    let text = run(vec!["--path".into(), "/healthz".into()]).await;
    assert!(
        text.contains("allow rule      MATCH health [request]: matched"),
        "{text}"
    );
    assert!(
        text.contains("decision        allow — allowlisted (rule \"health\")"),
        "{text}"
    );
    let text = run(vec![
        "--method".into(),
        "POST".into(),
        "--path".into(),
        "/healthz".into(),
    ])
    .await;
    assert!(text.contains("method POST not in [\"GET\"]"), "{text}");
    assert!(text.contains("decision        deny — no_token"), "{text}");
    // A refused path.
    let text = run(vec!["--path".into(), "/a/..;/b".into()]).await;
    assert!(text.contains("normalised path refused"), "{text}");

    // With a token the IAM is asked: carol has no MFA, alice has.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, h.token("carol")).unwrap();
    let args = |path: &str| {
        vec![
            "--path".to_string(),
            path.to_string(),
            "--token-file".to_string(),
            token_file.display().to_string(),
        ]
    };
    let text = run(args("/app")).await;
    assert!(text.contains("\"mfa_device\":false"), "{text}");
    assert!(text.contains("decision        deny — no_mfa"), "{text}");
    assert!(
        !text.contains(&h.token("carol")),
        "the token is never printed"
    );
    std::fs::write(&token_file, h.token("alice")).unwrap();
    let text = run(args("/app")).await;
    assert!(
        text.contains("decision        allow — mfa_verified (mfa_device)"),
        "{text}"
    );
    // A user id alone is enough for identity rules.
    let bob = h.user("bob").clone();
    let text = run(vec![
        "--path".into(),
        "/app".into(),
        "--user-id".into(),
        bob.user_id.clone(),
    ])
    .await;
    assert!(text.contains("user name \"\" not listed"), "{text}");

    // The admin API answers the same as JSON.
    let body = serde_json::json!({"method": "GET", "path": "/app", "token": h.token("bob")});
    let answer = crate::support::send(
        http::Method::POST,
        &h.admin_url("/admin/explain"),
        &[("content-type", "application/json")],
        bytes::Bytes::from(body.to_string()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let json = answer.json();
    assert_eq!(json["decision"], "allow");
    assert_eq!(
        json["reason"],
        "allowlisted (identity rule \"break-glass\")"
    );
    assert_eq!(json["normalized_path"]["Ok"], "/app");
    assert_eq!(json["rules"][1]["matched"], true);
}

/// A fresh PKCS#8 PEM key: Ed25519, or ECDSA P-256 with `p256`.
fn pem_key(p256: bool) -> String {
    use base64::Engine;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let der = if p256 {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap()
    } else {
        Ed25519KeyPair::generate_pkcs8(&rng).unwrap()
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn identity_assertions_verify_with_the_published_jwks() {
    for (p256, alg) in [
        (false, jsonwebtoken::Algorithm::EdDSA),
        (true, jsonwebtoken::Algorithm::ES256),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("assertion.pem");
        std::fs::write(&key, pem_key(p256)).unwrap();
        let h = Harness::with_config(&format!(
            "[identity.assertion]\nkey_file = \"{}\"\naudience = \"my-app\"\nttl = \"2s\"\n",
            key.display()
        ))
        .await;
        let alice = h.user("alice").clone();
        let answer = h
            .get(
                "/app",
                &[
                    ("x-auth-token", &alice.token),
                    ("x-auth-assertion", "forged"),
                ],
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let jwt = answer
            .seen_header("x-auth-assertion")
            .expect("an assertion upstream");
        assert_ne!(jwt, "forged");

        // An independent JWT library, fed the JWKS the admin listener publishes.
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(
            &crate::support::send(
                http::Method::GET,
                &h.admin_url("/.well-known/jwks.json"),
                &[],
                bytes::Bytes::new(),
            )
            .await
            .text(),
        )
        .unwrap();
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, alg);
        let jwk = jwks
            .find(header.kid.as_deref().unwrap())
            .expect("kid in the JWKS");
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(alg);
        validation.set_audience(&["my-app"]);
        validation.set_issuer(&["mfa-gate"]);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<serde_json::Value>(&jwt, &key, &validation).unwrap();
        assert_eq!(data.claims["sub"], alice.user_id.as_str());
        assert_eq!(data.claims["name"], "alice");
        assert_eq!(data.claims["mfa"], "mfa_device");
        assert_eq!(
            data.claims["jti"],
            answer.headers["x-request-id"].to_str().unwrap()
        );
        let lifetime = data.claims["exp"].as_u64().unwrap() - data.claims["iat"].as_u64().unwrap();
        assert!(lifetime <= 60);

        // Tampered: another user in the claims, same signature.
        let parts: Vec<&str> = jwt.split('.').collect();
        use base64::Engine;
        let mut claims = data.claims.clone();
        claims["sub"] = serde_json::json!("someone-else");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string()),
            parts[2]
        );
        assert!(jsonwebtoken::decode::<serde_json::Value>(&forged, &key, &validation).is_err());
        // Expired once its short lifetime is over.
        tokio::time::sleep(Duration::from_millis(3100)).await;
        let err = jsonwebtoken::decode::<serde_json::Value>(&jwt, &key, &validation).unwrap_err();
        assert_eq!(
            *err.kind(),
            jsonwebtoken::errors::ErrorKind::ExpiredSignature
        );
    }
}
