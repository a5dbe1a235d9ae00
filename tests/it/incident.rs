//! Incident response: disable a lost MFA device through IAM v5 from the admin API or the CLI,
//! and the user is blocked at once (issue "Incident response").

use bytes::Bytes;
use http::{Method, StatusCode};
use mfa_gate::dev::iam_sim::{V5_ACCESS_KEY, V5_SECRET_KEY};

use crate::support::{send, Answer, Harness};

const ADMIN_TOKEN: &str = "incident-admin-token";

struct Incident {
    h: Harness,
    dir: tempfile::TempDir,
}

async fn harness(secret_key: &str) -> Incident {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ak"), format!("{V5_ACCESS_KEY}\n")).unwrap();
    std::fs::write(dir.path().join("sk"), format!("{secret_key}\n")).unwrap();
    std::fs::write(dir.path().join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    // The simulator serves v3 and v5 on one address, known only once it runs: the harness
    // replaces "SIM" with it.
    let extra = format!(
        "[admin]\ntoken_file = \"{d}/admin-token\"\n[iam.v5]\nendpoint = \"SIM\"\nak_file = \"{d}/ak\"\nsk_file = \"{d}/sk\"\n",
        d = dir.path().display()
    );
    let h = Harness::with_v5(&extra).await;
    Incident { h, dir }
}

impl Incident {
    async fn disable(&self, user_id: &str, body: &str, token: Option<&str>) -> Answer {
        let url = self
            .h
            .admin_url(&format!("/admin/users/{user_id}/mfa-devices/disable"));
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("authorization", b)])
            .unwrap_or_default();
        send(Method::POST, &url, &headers, Bytes::from(body.to_string())).await
    }
}

#[tokio::test]
async fn disabling_a_device_blocks_the_user_at_once() {
    let t = harness(V5_SECRET_KEY).await;
    let alice = t.h.user("alice").clone();
    let serial = alice.mfa_device.clone().unwrap();
    assert_eq!(t.h.get_as("/", "alice").await.status, StatusCode::OK);

    // Without the admin token: refused, nothing disabled.
    let answer = t.disable(&alice.user_id, "", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        t.h.sim.mfa_devices(&alice.user_id),
        std::slice::from_ref(&serial)
    );

    // No serial number: the user's only device is found through the v5 list API.
    let answer = t.disable(&alice.user_id, "", Some(ADMIN_TOKEN)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["user_id"], alice.user_id.as_str());
    assert_eq!(body["serial_number"], serial.as_str());
    assert_eq!(body["purged"], 1);
    assert!(t.h.sim.mfa_devices(&alice.user_id).is_empty());

    // The very next request is judged afresh: no device any more, 403 — no waiting for a TTL.
    assert_eq!(t.h.get_as("/", "alice").await.status, StatusCode::FORBIDDEN);
    assert_eq!(
        t.h.metric("mfa_gate_admin_actions_total{action=\"disable_mfa_device\",result=\"ok\"}")
            .await,
        1.0
    );
    assert_eq!(
        t.h.metric(
            "mfa_gate_admin_actions_total{action=\"disable_mfa_device\",result=\"unauthorized\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_named_serial_is_disabled_and_v5_errors_come_back_verbatim() {
    let t = harness(V5_SECRET_KEY).await;
    let alice = t.h.user("alice").clone();
    let carol = t.h.user("carol").clone();
    // carol has no device: nothing to find.
    let answer = t.disable(&carol.user_id, "", Some(ADMIN_TOKEN)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.error_code(), "MFAGATE.NO_MFA_DEVICE");

    // An unknown serial: the IAM's 404 body passes through.
    let answer = t
        .disable(
            &alice.user_id,
            r#"{"serial_number": "iam/mfa/nope"}"#,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.text());
    assert!(answer.json()["error_code"].as_str().unwrap().len() > 3);
    assert!(answer.json().get("error_msg").is_some());

    // A denied caller: 403 with encoded_authorization_message.
    t.h.sim.set_v5_deny(true);
    let serial = alice.mfa_device.clone().unwrap();
    let body = format!(r#"{{"serial_number": "{serial}"}}"#);
    let answer = t.disable(&alice.user_id, &body, Some(ADMIN_TOKEN)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(
        answer.json()["encoded_authorization_message"].is_string(),
        "{}",
        answer.text()
    );
    t.h.sim.set_v5_deny(false);

    let answer = t.disable(&alice.user_id, &body, Some(ADMIN_TOKEN)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["serial_number"], serial.as_str());

    // A malformed body is the operator's mistake.
    let answer = t
        .disable(&alice.user_id, "{\"serial\": 1}", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_simulator_checks_every_signature() {
    let t = harness("not-the-secret-key").await;
    let alice = t.h.user("alice").clone();
    let answer = t.disable(&alice.user_id, "", Some(ADMIN_TOKEN)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text());
    assert_eq!(answer.json()["error_code"], "APIGW.0301");
    assert_eq!(t.h.sim.mfa_devices(&alice.user_id).len(), 1);
}

#[tokio::test]
async fn the_cli_drives_the_admin_api() {
    let t = harness(V5_SECRET_KEY).await;
    let alice = t.h.user("alice").clone();
    assert_eq!(t.h.get_as("/", "alice").await.status, StatusCode::OK);
    let bin = env!("CARGO_BIN_EXE_mfa-gate");
    let admin_url = format!("http://{}", t.h.gateway.admin_addr);
    let token_file = t.dir.path().join("admin-token");
    let output = tokio::process::Command::new(bin)
        .args([
            "admin",
            "purge",
            "--user-id",
            &alice.user_id,
            "--admin-url",
            &admin_url,
            "--token-file",
        ])
        .arg(&token_file)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["purged"], 1);

    let output = tokio::process::Command::new(bin)
        .args([
            "admin",
            "disable-mfa",
            "--user-id",
            &alice.user_id,
            "--admin-url",
            &admin_url,
        ])
        .env("MFA_GATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        printed["serial_number"],
        alice.mfa_device.clone().unwrap().as_str()
    );
    assert_eq!(t.h.get_as("/", "alice").await.status, StatusCode::FORBIDDEN);

    // Without the token the CLI fails and says so.
    let output = tokio::process::Command::new(bin)
        .args(["admin", "purge", "--admin-url", &admin_url])
        .env_remove("MFA_GATE_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
}
