//! Header hygiene between client and upstream (CONTRACT §4 "Sent upstream").
//!
//! Three jobs: drop hop-by-hop headers (RFC 9110 §7.6.1), drop anything a client could use to
//! impersonate the gateway (identity headers in every spelling a framework might fold into the
//! same name, e.g. `X_Auth_User_Id` becoming `HTTP_X_AUTH_USER_ID` in CGI/WSGI), and write the
//! identity and forwarding headers the upstream may trust.

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};

/// Headers only the gateway may set. A client-supplied header whose name folds to one of these
/// (lowercase, `_` and `.` read as `-`) is removed before forwarding.
pub const MANAGED: &[&str] = &[
    "x-auth-user-id",
    "x-auth-user-name",
    "x-auth-domain-id",
    "x-auth-domain-name",
    "x-auth-mfa",
    "x-auth-assertion",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "x-http-method-override",
    "x-forwarded-uri",
    "x-original-uri",
    "x-forwarded-method",
    "x-original-method",
];

/// The identity headers: naming one in `Connection` is an attack (ask the next hop to strip
/// what the gateway added), answered with 400.
const IDENTITY: &[&str] = &[
    "x-auth-user-id",
    "x-auth-user-name",
    "x-auth-domain-id",
    "x-auth-domain-name",
    "x-auth-mfa",
];

/// Hop-by-hop headers of RFC 9110 §7.6.1 plus the legacy ones proxies still meet.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Compares a header name with a canonical lowercase one the way frameworks fold names.
fn folds_to(name: &str, canonical: &str) -> bool {
    name.len() == canonical.len()
        && name.bytes().zip(canonical.bytes()).all(|(a, b)| {
            let a = match a.to_ascii_lowercase() {
                b'_' | b'.' => b'-',
                other => other,
            };
            a == b
        })
}

/// Whether `name` is, or folds to, one of `set`.
fn folds_to_any(name: &str, set: &[&str]) -> bool {
    set.iter().any(|canonical| folds_to(name, canonical))
}

/// The header names listed in `Connection` headers, lowercased.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
}

/// `Some(name)` if a `Connection` header names an identity header (in any folded spelling).
pub fn connection_names_identity(headers: &HeaderMap) -> Option<String> {
    connection_tokens(headers).find(|token| folds_to_any(token, IDENTITY))
}

/// Whether this is a WebSocket upgrade request (RFC 6455 §4.1), the one upgrade passed through.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    upgrade && connection_tokens(headers).any(|token| token == "upgrade")
}

/// Removes hop-by-hop headers and the headers `Connection` names. With `keep_upgrade`, a
/// WebSocket upgrade's `Connection: upgrade` and `Upgrade` survive.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = connection_tokens(headers).collect();
    for name in named {
        if keep_upgrade && name == "upgrade" {
            continue;
        }
        headers.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (*name == "upgrade" || *name == "connection") {
            continue;
        }
        headers.remove(*name);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The headers a token travels in. Only their canonical spelling is read and forwarded: a
/// look-alike (`X_Auth_Token`) could carry a second, unverified token that a framework folding
/// `_` into `-` would hand to the app.
const TOKEN_HEADERS: &[&str] = &["x-auth-token", "authorization"];

/// Removes every client-supplied header that only the gateway may set, in any spelling, and
/// look-alike spellings of the token headers.
pub fn strip_managed(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            folds_to_any(name, MANAGED)
                || (folds_to_any(name, TOKEN_HEADERS) && !TOKEN_HEADERS.contains(&name))
        })
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// `X-Forwarded-For` as nginx's `$proxy_add_x_forwarded_for`: the client's list, if any, with
/// the peer address appended.
pub fn forwarded_for(previous: Option<&HeaderValue>, peer: std::net::IpAddr) -> HeaderValue {
    let value = match previous.and_then(|v| v.to_str().ok()).map(str::trim) {
        Some(list) if !list.is_empty() => format!("{list}, {peer}"),
        _ => peer.to_string(),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| {
        HeaderValue::from_str(&peer.to_string()).expect("an IP address is a valid header value")
    })
}

/// A client's `X-Request-Id` is kept only if it is short and plain, so it cannot inject into
/// logs or be used to smuggle data.
pub fn acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn folded_spellings_of_identity_headers_are_stripped() {
        let mut headers = map(&[
            ("x-auth-user-id", "a"),
            ("x_auth_user_id", "b"),
            ("x.auth.user.id", "c"),
            ("X_AUTH_MFA", "d"),
            ("x-http-method-override", "DELETE"),
            ("x-original-uri", "/admin"),
            ("x-auth-token", "kept"),
            ("x_auth_token", "second token"),
            ("x.auth.token", "third token"),
            ("accept", "kept"),
        ]);
        strip_managed(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "x-auth-token"]);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Foo"),
            ("keep-alive", "timeout=5"),
            ("x-foo", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "h2c"),
            ("x-bar", "2"),
        ]);
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-bar"]);
    }

    #[test]
    fn websocket_upgrade_survives_when_asked() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_websocket_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["connection"], "upgrade");
    }

    #[test]
    fn connection_naming_identity_is_detected_in_any_spelling() {
        assert_eq!(
            connection_names_identity(&map(&[("connection", "close, X_Auth_User_Id")])),
            Some("x_auth_user_id".into())
        );
        assert_eq!(
            connection_names_identity(&map(&[("connection", "X-Foo")])),
            None
        );
    }

    #[test]
    fn forwarded_for_appends_like_nginx() {
        let peer = "10.0.0.7".parse().unwrap();
        assert_eq!(forwarded_for(None, peer), "10.0.0.7");
        let prev = HeaderValue::from_static("1.2.3.4");
        assert_eq!(forwarded_for(Some(&prev), peer), "1.2.3.4, 10.0.0.7");
    }

    #[test]
    fn request_ids_are_kept_only_when_plain() {
        assert!(acceptable_request_id(&HeaderValue::from_static(
            "abc-123_x.y"
        )));
        assert!(!acceptable_request_id(&HeaderValue::from_static("a b")));
        assert!(!acceptable_request_id(&HeaderValue::from_static("")));
        let long = HeaderValue::from_str(&"a".repeat(129)).unwrap();
        assert!(!acceptable_request_id(&long));
    }
}
