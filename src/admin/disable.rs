//! `POST /admin/users/{user_id}/mfa-devices/disable`: the incident-response action of CONTRACT §5.
//! When a user loses the phone holding their virtual MFA device, the security team disables the
//! device through IAM v5 and, in the same step, this gateway forgets every cached "has MFA" of
//! that user, so the next request is judged afresh.

use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::cache::TokenCache;
use crate::iam::v5::{V5Client, V5Error};

/// The optional request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisableBody {
    serial_number: String,
}

/// The outcome of the action: an HTTP status and a JSON body for the operator.
#[derive(Debug)]
pub struct Outcome {
    pub status: StatusCode,
    pub body: serde_json::Value,
    /// For the audit log and the metric: `ok` or what went wrong.
    pub result: &'static str,
}

fn failure(status: StatusCode, code: &str, message: String, result: &'static str) -> Outcome {
    Outcome {
        status,
        body: json!({"error_code": code, "error_msg": message}),
        result,
    }
}

/// A v5 failure as the operator should see it: the IAM's own answer when there is one.
fn v5_failure(err: V5Error) -> Outcome {
    match err {
        V5Error::Iam { body, .. } => Outcome {
            status: StatusCode::from_u16(body.status).unwrap_or(StatusCode::BAD_GATEWAY),
            body: serde_json::to_value(&body).unwrap_or_else(|_| json!({})),
            result: "iam_error",
        },
        V5Error::Timeout { .. } => failure(
            StatusCode::GATEWAY_TIMEOUT,
            "MFAGATE.IAM_UNAVAILABLE",
            err.to_string(),
            "iam_unavailable",
        ),
        V5Error::InvalidInput { .. } => failure(
            StatusCode::BAD_REQUEST,
            "MFAGATE.BAD_REQUEST",
            err.to_string(),
            "bad_request",
        ),
        V5Error::Status { .. } | V5Error::Transport { .. } | V5Error::BadResponse { .. } => {
            failure(
                StatusCode::BAD_GATEWAY,
                "MFAGATE.IAM_UNAVAILABLE",
                err.to_string(),
                "iam_unavailable",
            )
        }
    }
}

/// Disables the device (the one named, or the user's only one) and purges the user's cache
/// entries. `body` is the raw request body (empty allowed).
pub async fn disable(
    client: Option<&V5Client>,
    cache: &TokenCache,
    user_id: &str,
    body: &[u8],
) -> Outcome {
    let Some(client) = client else {
        return failure(
            StatusCode::NOT_IMPLEMENTED,
            "MFAGATE.NOT_CONFIGURED",
            "disabling MFA devices needs [iam.v5] in the config (endpoint and AK/SK)".into(),
            "not_configured",
        );
    };
    if user_id.is_empty() || user_id.len() > 128 || user_id.chars().any(|c| c.is_control()) {
        return failure(
            StatusCode::BAD_REQUEST,
            "MFAGATE.BAD_REQUEST",
            "the user id in the path is empty or malformed".into(),
            "bad_request",
        );
    }
    let named = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<DisableBody>(body) {
            Ok(body) if !body.serial_number.trim().is_empty() => Some(body.serial_number),
            _ => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "MFAGATE.BAD_REQUEST",
                    "the body must be empty or {\"serial_number\": \"…\"}".into(),
                    "bad_request",
                )
            }
        }
    };
    let serial_number = match named {
        Some(serial) => serial,
        None => {
            let devices = match client.list_mfa_devices(user_id).await {
                Ok(devices) => devices,
                Err(err) => return v5_failure(err),
            };
            let mut serials: Vec<String> = devices
                .into_iter()
                .map(|device| device.serial_number)
                .collect();
            match serials.len() {
                0 => {
                    return failure(
                        StatusCode::NOT_FOUND,
                        "MFAGATE.NO_MFA_DEVICE",
                        format!("user {user_id} has no MFA device"),
                        "no_device",
                    )
                }
                1 => serials.remove(0),
                _ => {
                    return Outcome {
                        status: StatusCode::CONFLICT,
                        body: json!({
                            "error_code": "MFAGATE.AMBIGUOUS_DEVICE",
                            "error_msg": "the user has several MFA devices: name one with {\"serial_number\": \"…\"}",
                            "serial_numbers": serials,
                        }),
                        result: "ambiguous",
                    }
                }
            }
        }
    };
    if let Err(err) = client.disable_mfa_device(user_id, &serial_number).await {
        return v5_failure(err);
    }
    let purged = cache.purge_user(user_id).await;
    let mut body =
        json!({"user_id": user_id, "serial_number": serial_number, "purged": purged.local});
    if let Some(fleet) = purged.fleet.label() {
        body["fleet"] = json!(fleet);
    }
    Outcome {
        status: StatusCode::OK,
        body,
        result: "ok",
    }
}
