//! Invariants of the IAM answer parsers (Huawei IAM and Alibaba CloudSSO), for the
//! `huawei_parse` and `cloudsso_parse` targets.
//!
//! Separate from `checks.rs` because the parsers are not the gateway's API: `src/iam/huawei.rs`
//! and `src/iam/alibaba.rs` export them `#[doc(hidden)]` for this module only. The fuzz crate
//! builds it with `--features iam-parsers`; `tests/it/fuzz_regressions.rs` always includes it.
//!
//! Input: a first line `<api> <status>` (Huawei: `verify`, `device` or `protect`; CloudSSO: just
//! `<status>`), then the body as the IAM sent it. An unreadable first line means `200` (and
//! `verify`), so that any bytes are an input.
//!
//! The security property behind every check: only a definite answer may become a fact.
//! A non-2xx status never yields a valid token, a bound device, enabled login protection or an
//! MFA setting; "none"/"unknown user" only from the documented 404/4xx with the documented code;
//! the facts returned are the body's facts about the user that was asked about; error codes
//! that end up in logs are short printable ASCII.

use http::StatusCode;
use mfa_gate::iam::alibaba::{self, MfaSettings};
use mfa_gate::iam::huawei::{self, Verified};
use mfa_gate::iam::{IamError, VerificationMethod};
use serde_json::Value;

/// The user the device and login-protect answers are checked against (seed pages 000/002).
const USER_ID: &str = "16b26081f43d4c628c4bb88cf32e9...";

fn split_input(data: &[u8]) -> (&str, StatusCode, &[u8]) {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b""[..]),
    };
    let line = std::str::from_utf8(line).unwrap_or("").trim();
    let (api, status) = match line.rsplit_once(' ') {
        Some((api, status)) => (api.trim(), status),
        None => ("", line),
    };
    let status = status
        .parse::<u16>()
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    (api, status, body)
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

/// Huawei's error code, from either error shape (`error_code`, or Keystone's `error.code`).
fn huawei_code(body: &Value) -> Option<String> {
    match body.get("error_code") {
        Some(Value::String(code)) => Some(code.clone()),
        _ => match body.get("error").and_then(|error| error.get("code")) {
            Some(Value::String(code)) => Some(code.clone()),
            Some(Value::Number(code)) => Some(code.to_string()),
            _ => None,
        },
    }
}

fn is_huawei_not_found(status: StatusCode, body: &Value) -> bool {
    status == StatusCode::NOT_FOUND
        && huawei_code(body).is_some_and(|code| code.eq_ignore_ascii_case("IAM.0004"))
}

fn check_error(error: &IamError, status: StatusCode) {
    if let IamError::Status {
        status: reported,
        code,
        ..
    } = error
    {
        assert_eq!(
            *reported,
            status.as_u16(),
            "status error with another status"
        );
        assert!(!status.is_success(), "status error for {status}");
        assert!(
            code.chars().count() <= 64,
            "error code of {} chars",
            code.len()
        );
        assert!(
            code.chars().all(|c| c.is_ascii_graphic()),
            "error code {code:?} with characters that are not printable ASCII"
        );
    }
}

pub fn huawei_parse(data: &[u8]) {
    let (api, status, body) = split_input(data);
    let value = json(body);
    match api {
        "device" => match huawei::parse_mfa_device(status, body, USER_ID) {
            Ok(true) => {
                assert!(status.is_success(), "device bound on {status}");
                assert_eq!(
                    value["virtual_mfa_device"]["user_id"].as_str(),
                    Some(USER_ID),
                    "device bound according to an answer about another user"
                );
            }
            Ok(false) => assert!(
                is_huawei_not_found(status, &value),
                "no device on {status} without IAM.0004"
            ),
            Err(error) => check_error(&error, status),
        },
        "protect" => match huawei::parse_login_protect(status, body, USER_ID) {
            Ok(Some(protect)) => {
                assert!(status.is_success(), "login protection on {status}");
                let answer = &value["login_protect"];
                assert_eq!(
                    answer["user_id"].as_str(),
                    Some(USER_ID),
                    "login protection of another user"
                );
                assert_eq!(
                    answer["enabled"].as_bool(),
                    Some(protect.enabled),
                    "enabled is not the body's"
                );
                let expected = match answer["verification_method"].as_str() {
                    Some(method) => VerificationMethod::from_iam(method),
                    None => {
                        assert!(!protect.enabled, "enabled without a verification method");
                        VerificationMethod::None
                    }
                };
                assert_eq!(protect.method, expected, "verification method");
            }
            Ok(None) => assert!(
                is_huawei_not_found(status, &value),
                "login protection never configured on {status} without IAM.0004"
            ),
            Err(error) => check_error(&error, status),
        },
        _ => match huawei::parse_verify(status, body) {
            Ok(Verified::Valid(token)) => {
                assert!(status.is_success(), "valid token on {status}");
                let answer = &value["token"];
                let user = &answer["user"];
                let identity = &token.identity;
                assert_eq!(user["id"].as_str(), Some(&*identity.user_id()), "id");
                assert!(
                    !matches!(&*identity.user_id(), "" | "." | ".."),
                    "user id {:?} is not a path segment",
                    identity.user_id()
                );
                assert_eq!(user["name"].as_str(), Some(&*identity.user_name()));
                let domain = user.get("domain").unwrap_or(&answer["domain"]);
                assert_eq!(domain["id"].as_str(), Some(&*identity.domain_id()));
                assert_eq!(domain["name"].as_str(), Some(&*identity.domain_name()));
                let totp = answer["methods"]
                    .as_array()
                    .is_some_and(|methods| methods.iter().any(|m| m == "totp"));
                assert_eq!(
                    token.totp_login, totp,
                    "totp_login is not the body's methods"
                );
            }
            Ok(Verified::Invalid) => assert!(
                matches!(status.as_u16(), 401 | 404),
                "token invalid on {status}"
            ),
            Err(error) => {
                assert!(
                    !matches!(status.as_u16(), 401 | 404),
                    "{status} is a definite 'invalid', not {error}"
                );
                check_error(&error, status);
            }
        },
    }
}

pub fn cloudsso_parse(data: &[u8]) {
    let (_, status, body) = split_input(data);
    let value = json(body);
    let setting = value["UserMFAAuthenticationSettings"].as_str();
    match alibaba::parse_settings(status, body) {
        Ok(MfaSettings::Enabled) => {
            assert!(status.is_success(), "MFA enabled on {status}");
            assert!(setting.is_some_and(|s| s.eq_ignore_ascii_case("Enabled")));
        }
        Ok(MfaSettings::Disabled) => {
            assert!(status.is_success(), "MFA disabled on {status}");
            assert!(setting.is_some_and(|s| s.eq_ignore_ascii_case("Disabled")));
        }
        Ok(MfaSettings::UnknownUser) => {
            assert!(status.is_client_error(), "unknown user on {status}");
            assert!(
                value["Code"]
                    .as_str()
                    .is_some_and(|code| code.eq_ignore_ascii_case("EntityNotExists.User")),
                "unknown user without EntityNotExists.User"
            );
        }
        Err(error) => check_error(&error, status),
    }
}
