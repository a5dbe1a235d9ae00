//! Header hygiene between client and upstream (CONTRACT §4 "Sent upstream").
//!
//! Three jobs: drop hop-by-hop headers (RFC 9110 §7.6.1), drop anything a client could use to
//! impersonate the gateway (identity headers in every spelling a framework might fold into the
//! same name, e.g. `X_Auth_User_Id` becoming `HTTP_X_AUTH_USER_ID` in CGI/WSGI), and write the
//! identity and forwarding headers the upstream may trust.

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};

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

/// Hop-by-hop headers of RFC 9110 §7.6.1 plus the legacy ones proxies still meet, as
/// [`HeaderName`]s: comparing two of them is an integer compare for the standard names, where a
/// lookup by `&str` parses and hashes the name on every call.
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

/// `Keep-Alive` (RFC 2068 §19.7.1), which RFC 9110 §7.6.1 names among those to remove.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection`: pre-standard, still sent by some clients.
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

// The names the gateway reads or writes on every request, built at compile time: a lookup by
// `&str` would parse and validate the name again on each call.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_AUTH_USER_ID: HeaderName = HeaderName::from_static("x-auth-user-id");
pub const X_AUTH_USER_NAME: HeaderName = HeaderName::from_static("x-auth-user-name");
pub const X_AUTH_DOMAIN_ID: HeaderName = HeaderName::from_static("x-auth-domain-id");
pub const X_AUTH_DOMAIN_NAME: HeaderName = HeaderName::from_static("x-auth-domain-name");
pub const X_AUTH_MFA: HeaderName = HeaderName::from_static("x-auth-mfa");
pub const X_AUTH_ASSERTION: HeaderName = HeaderName::from_static("x-auth-assertion");

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

/// The header names listed in `Connection` headers, trimmed, in the case they were sent
/// (compare them case-insensitively).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// `Some(name)` (lowercased) if a `Connection` header names an identity header (in any folded
/// spelling).
pub fn connection_names_identity(headers: &HeaderMap) -> Option<String> {
    connection_tokens(headers)
        .find(|token| folds_to_any(token, IDENTITY))
        .map(str::to_ascii_lowercase)
}

/// Whether this is a WebSocket upgrade request (RFC 6455 §4.1), the one upgrade passed through.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    upgrade && connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers and the headers `Connection` names. With `keep_upgrade`, a
/// WebSocket upgrade's `Connection: upgrade` and `Upgrade` survive.
///
/// One pass over the names present decides what goes; most requests carry none of these and
/// leave without an allocation or a hash lookup.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if keep_upgrade && (name == UPGRADE || name == CONNECTION) {
            continue;
        }
        if HOP_BY_HOP.contains(name) {
            doomed.push(name.clone());
        }
    }
    for token in connection_tokens(headers) {
        if keep_upgrade && token.eq_ignore_ascii_case("upgrade") {
            continue;
        }
        // `from_bytes` lowercases; a token that is no header name names nothing here.
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            doomed.push(name);
        }
    }
    for name in doomed {
        headers.remove(name);
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
/// the peer address (`peer_ip`, already a header value) appended.
pub fn forwarded_for(previous: Option<&HeaderValue>, peer_ip: &HeaderValue) -> HeaderValue {
    let list = previous.and_then(|v| v.to_str().ok()).map(str::trim);
    match (list, peer_ip.to_str()) {
        (Some(list), Ok(peer)) if !list.is_empty() => {
            // From the `String` itself: its buffer becomes the value's, without a second copy.
            HeaderValue::try_from(format!("{list}, {peer}")).unwrap_or_else(|_| peer_ip.clone())
        }
        _ => peer_ip.clone(),
    }
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
        let peer = HeaderValue::from_static("10.0.0.7");
        assert_eq!(forwarded_for(None, &peer), "10.0.0.7");
        let prev = HeaderValue::from_static("1.2.3.4");
        assert_eq!(forwarded_for(Some(&prev), &peer), "1.2.3.4, 10.0.0.7");
        let blank = HeaderValue::from_static("  ");
        assert_eq!(forwarded_for(Some(&blank), &peer), "10.0.0.7");
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
