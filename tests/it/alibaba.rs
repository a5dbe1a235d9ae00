//! The `alibaba_cloudsso` provider end to end: bearer JWTs verified against the simulator's
//! JWKS, MFA settings from the CloudSSO simulator (which checks every ACS3 signature), through
//! the same cache, policy, metrics and decision endpoint as Huawei.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use mfa_gate::app::Gateway;
use mfa_gate::config::Config;
use mfa_gate::dev::cloudsso_sim::{self, Api, CloudSsoSim, Fault, SimConfig, SimUser};
use mfa_gate::dev::upstream::DemoUpstream;

use crate::support::{metric_value, send, Answer, LOOPBACK};

struct AliHarness {
    gateway: Gateway,
    sim: CloudSsoSim,
    upstream: DemoUpstream,
    users: Vec<SimUser>,
    _secrets: tempfile::TempDir,
}

impl AliHarness {
    async fn start(extra: &str, credentials: Option<(&str, &str)>) -> AliHarness {
        let users = cloudsso_sim::demo_users();
        let config = SimConfig::demo();
        let sim = CloudSsoSim::start(LOOPBACK.into(), config.clone(), users.clone())
            .await
            .unwrap();
        let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
        let secrets = tempfile::tempdir().unwrap();
        let (id, secret) = credentials.unwrap_or((
            config.access_key_id.as_str(),
            config.access_key_secret.as_str(),
        ));
        std::fs::write(secrets.path().join("id"), id).unwrap();
        std::fs::write(secrets.path().join("secret"), secret).unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n[iam]\nprovider = \"alibaba_cloudsso\"\nendpoint = \"{}\"\ntimeout = \"1s\"\ndirectory_id = \"{}\"\naccess_key_id_file = \"id\"\naccess_key_secret_file = \"secret\"\n[iam.jwt]\njwks_url = \"{}\"\nissuer = \"{}\"\naudience = \"{}\"\n{extra}",
            upstream.url(),
            sim.url(),
            sim.directory_id(),
            sim.jwks_url(),
            sim.issuer(),
            sim.audience(),
        );
        let config = Config::from_toml(&text, &secrets.path().join("gate.toml"))
            .unwrap_or_else(|err| panic!("{err}\n{text}"));
        let gateway = Gateway::start(config).await.unwrap();
        AliHarness {
            gateway,
            sim,
            upstream,
            users,
            _secrets: secrets,
        }
    }

    fn jwt(&self, name: &str) -> String {
        let user = self.users.iter().find(|u| u.user_name == name).unwrap();
        self.sim.mint(&self.sim.claims_for(
            &user.user_id,
            &user.user_name,
            Duration::from_secs(600),
        ))
    }

    async fn get(&self, path: &str, jwt: &str) -> Answer {
        let bearer = format!("Bearer {jwt}");
        send(
            Method::GET,
            &format!("http://{}{path}", self.gateway.addr),
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await
    }

    async fn metric(&self, sample: &str) -> f64 {
        let text = send(
            Method::GET,
            &format!("http://{}/metrics", self.gateway.admin_addr),
            &[],
            Bytes::new(),
        )
        .await
        .text();
        metric_value(&text, sample)
    }
}

#[tokio::test]
async fn enabled_mfa_is_forwarded_with_the_jwt_identity() {
    let h = AliHarness::start("", None).await;
    let alice = h
        .users
        .iter()
        .find(|u| u.user_name == "alice")
        .unwrap()
        .clone();
    let answer = h.get("/app", &h.jwt("alice")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.seen_header("x-auth-user-id"),
        Some(alice.user_id.clone())
    );
    assert_eq!(
        answer.seen_header("x-auth-user-name").as_deref(),
        Some("alice")
    );
    assert_eq!(
        answer.seen_header("x-auth-domain-id").as_deref(),
        Some(h.sim.directory_id())
    );
    assert_eq!(
        answer.seen_header("x-auth-mfa").as_deref(),
        Some("cloudsso_mfa")
    );
    assert_eq!(h.sim.calls(Api::MfaSettings), 1);
    assert_eq!(h.sim.seen_user_ids(), [alice.user_id]);
    // Cached: the same JWT again costs no CloudSSO call.
    assert_eq!(h.get("/app", &h.jwt("alice")).await.status, StatusCode::OK);
    assert_eq!(
        h.sim.calls(Api::MfaSettings),
        2,
        "a fresh JWT is a fresh token"
    );
    let jwt = h.jwt("alice");
    h.get("/app", &jwt).await;
    h.get("/app", &jwt).await;
    assert_eq!(h.sim.calls(Api::MfaSettings), 3);
    assert_eq!(
        h.metric("mfa_gate_iam_requests_total{api=\"cloudsso_mfa_settings\",outcome=\"ok\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn disabled_mfa_unknown_users_and_bad_jwts_are_refused() {
    let h = AliHarness::start("", None).await;
    let answer = h.get("/app", &h.jwt("bob")).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(answer.error_code(), "MFAGATE.NO_MFA");

    let stranger = h.sim.mint(&h.sim.claims_for(
        "u-not-in-directory",
        "eve",
        Duration::from_secs(600),
    ));
    let answer = h.get("/app", &stranger).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "MFAGATE.INVALID_TOKEN");

    let calls = h.sim.calls(Api::MfaSettings);
    // Expired, tampered and alg=none tokens never reach CloudSSO.
    let user = &h.users[0];
    let mut expired = h
        .sim
        .claims_for(&user.user_id, &user.user_name, Duration::from_secs(600));
    expired["exp"] = serde_json::json!(1_000_000);
    expired["nbf"] = serde_json::json!(999_000);
    expired["iat"] = serde_json::json!(999_000);
    assert_eq!(
        h.get("/app", &h.sim.mint(&expired)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let good = h.jwt("alice");
    let mut tampered = good.clone();
    tampered.pop();
    tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        h.get("/app", &tampered).await.status,
        StatusCode::UNAUTHORIZED
    );
    let parts: Vec<&str> = good.split('.').collect();
    let none_header = base64_url(br#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{}.", parts[1]);
    assert_eq!(
        h.get("/app", &unsigned).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(h.sim.calls(Api::MfaSettings), calls);
    assert_eq!(h.upstream.request_count(), 0);
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn throttling_and_bad_credentials_are_iam_unavailable_not_401() {
    let h = AliHarness::start("", None).await;
    h.sim
        .set_fault(Some(Api::MfaSettings), Some(Fault::Throttle));
    let answer = h.get("/app", &h.jwt("alice")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.error_code(), "MFAGATE.IAM_UNAVAILABLE");
    assert_eq!(
        h.metric(
            "mfa_gate_iam_requests_total{api=\"cloudsso_mfa_settings\",outcome=\"throttled\"}"
        )
        .await,
        1.0
    );
    h.sim.set_fault(None, None);
    assert_eq!(h.get("/app", &h.jwt("alice")).await.status, StatusCode::OK);

    let config = SimConfig::demo();
    let wrong = AliHarness::start("", Some((&config.access_key_id, "not-the-secret"))).await;
    let answer = wrong.get("/app", &wrong.jwt("alice")).await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "our credentials are wrong: never a 401"
    );
    assert_eq!(wrong.upstream.request_count(), 0);
}

#[tokio::test]
async fn concurrent_requests_with_one_fresh_jwt_make_one_call() {
    let h = AliHarness::start("", None).await;
    h.sim.set_fault(
        Some(Api::MfaSettings),
        Some(Fault::Latency(Duration::from_millis(200))),
    );
    let jwt = h.jwt("alice");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = format!("http://{}/app", h.gateway.addr);
        let bearer = format!("Bearer {jwt}");
        tasks.push(tokio::spawn(async move {
            send(
                Method::GET,
                &url,
                &[("authorization", &bearer)],
                Bytes::new(),
            )
            .await
            .status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(h.sim.calls(Api::MfaSettings), 1);
}

#[tokio::test]
async fn policy_require_login_protect_is_a_config_error_for_cloudsso() {
    let users = cloudsso_sim::demo_users();
    let sim = CloudSsoSim::start(LOOPBACK.into(), SimConfig::demo(), users)
        .await
        .unwrap();
    let text = format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[iam]\nprovider = \"alibaba_cloudsso\"\nendpoint = \"{}\"\ndirectory_id = \"d-1\"\n[iam.jwt]\njwks_url = \"{}\"\nissuer = \"i\"\naudience = \"a\"\n[policy]\nrequire = \"login_protect\"\n",
        sim.url(),
        sim.jwks_url()
    );
    let err = Config::from_toml(&text, std::path::Path::new("t.toml")).unwrap_err();
    assert_eq!(err.key_path(), "policy.require");
}
