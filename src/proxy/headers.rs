//! Header hygiene between client and upstream (CONTRACT §4 "Sent upstream").
//!
//! Three jobs: drop hop-by-hop headers (RFC 9110 §7.6.1), drop anything a client could use to
//! impersonate the gateway (identity headers in every spelling a framework might fold into the
//! same name, e.g. `X_Auth_User_Id` becoming `HTTP_X_AUTH_USER_ID` in CGI/WSGI), and write the
//! identity and forwarding headers the upstream may trust.

use crate::auth::token::X_AUTH_TOKEN;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// The most header values a map may hold for [`first`], [`has`] and [`all`] to walk it rather
/// than hash the name: a request carries 5–15, and comparing a standard name is one byte.
const WALKED_AT_MOST: usize = 16;

/// `headers.get(name)`, found by walking a small map: hashing the name (as `get` does) cost
/// more than the walk, and the cached path looked up a dozen names per request.
pub fn first<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.len() > WALKED_AT_MOST {
        return headers.get(name);
    }
    // A name's first value comes before its others.
    headers
        .iter()
        .find_map(|(candidate, value)| (candidate == name).then_some(value))
}

/// `headers.contains_key(name)`, as [`first`] finds it.
pub fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.len() > WALKED_AT_MOST {
        return headers.contains_key(name);
    }
    headers.keys().any(|candidate| candidate == name)
}

/// `headers.get_all(name)`, in order, as [`first`] finds it.
pub fn all<'a>(
    headers: &'a HeaderMap,
    name: &'a HeaderName,
) -> impl Iterator<Item = &'a HeaderValue> + 'a {
    let walked = headers.len() <= WALKED_AT_MOST;
    let hashed = (!walked).then(|| headers.get_all(name).iter());
    let walk = walked.then(|| {
        headers
            .iter()
            .filter_map(move |(candidate, value)| (candidate == name).then_some(value))
    });
    hashed
        .into_iter()
        .flatten()
        .chain(walk.into_iter().flatten())
}

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
    all(headers, &CONNECTION)
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
    let upgrade = first(headers, &UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    upgrade && connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade"))
}

/// The headers a token travels in. Only their canonical spelling is read and forwarded: a
/// look-alike (`X_Auth_Token`) could carry a second, unverified token that a framework folding
/// `_` into `-` would hand to the app.
const TOKEN_HEADERS: &[&str] = &["x-auth-token", "authorization"];

/// Which of the client's request headers go upstream as they came (CONTRACT §4 "Sent
/// upstream"). Left out: hop-by-hop headers (RFC 9110 §7.6.1) and those `Connection` names;
/// anything only the gateway may set, in any spelling a framework might fold into the same
/// name (`X_Auth_User_Id` becoming `HTTP_X_AUTH_USER_ID` in CGI/WSGI); look-alike spellings of
/// the token headers; the token itself unless `[token] forward`; and what the gateway writes
/// itself (`Host`, the body's framing). For a WebSocket upgrade, `Upgrade` goes through (and the
/// gateway writes `Connection: upgrade`).
///
/// Most requests carry no `Connection` header: then deciding costs no allocation and, for
/// the standard names, no string compare.
pub struct Forwardable {
    connection_named: Vec<HeaderName>,
    websocket: bool,
    forward_token: bool,
}

impl Forwardable {
    pub fn new(headers: &HeaderMap, websocket: bool, forward_token: bool) -> Self {
        let connection_named = if has(headers, &CONNECTION) {
            connection_tokens(headers)
                .filter(|token| !(websocket && token.eq_ignore_ascii_case("upgrade")))
                // `from_bytes` lowercases; a token that is no header name names nothing here.
                .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
                .collect()
        } else {
            Vec::new()
        };
        Forwardable {
            connection_named,
            websocket,
            forward_token,
        }
    }

    /// Whether the client's header `name` is forwarded as it is.
    pub fn keeps(&self, name: &HeaderName) -> bool {
        if name == HOST || name == CONTENT_LENGTH || name == CONNECTION {
            return false;
        }
        if name == UPGRADE {
            return self.websocket;
        }
        if HOP_BY_HOP.contains(name) || self.connection_named.contains(name) {
            return false;
        }
        if !self.forward_token && (name == AUTHORIZATION || name == X_AUTH_TOKEN) {
            return false;
        }
        let text = name.as_str();
        let look_alike = folds_to_any(text, TOKEN_HEADERS) && !TOKEN_HEADERS.contains(&text);
        !(look_alike || folds_to_any(text, MANAGED))
    }
}

/// Writes `X-Forwarded-For` as nginx's `$proxy_add_x_forwarded_for`: the client's list, if
/// any (and plain ASCII), with the peer address (`peer_ip`, already a header value) appended.
pub fn write_forwarded_for(
    out: &mut Vec<u8>,
    previous: Option<&HeaderValue>,
    peer_ip: &HeaderValue,
) {
    out.extend_from_slice(b"x-forwarded-for: ");
    let list = previous.and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(list) = list.filter(|list| !list.is_empty()) {
        out.extend_from_slice(list.as_bytes());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
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
    use proptest::prelude::*;

    proptest! {
        /// Walked or hashed, a lookup finds what the map's own lookups find, in their order.
        #[test]
        fn walked_lookups_find_what_the_map_finds(
            appended in proptest::collection::vec((0..6usize, 0..100u8), 0..40),
        ) {
            const NAMES: [HeaderName; 6] = [
                HOST,
                CONNECTION,
                CONTENT_LENGTH,
                X_AUTH_TOKEN,
                X_REQUEST_ID,
                X_FORWARDED_FOR,
            ];
            let mut headers = HeaderMap::new();
            for (name, value) in appended {
                headers.append(NAMES[name].clone(), HeaderValue::from(u16::from(value)));
            }
            for name in &NAMES {
                prop_assert_eq!(first(&headers, name), headers.get(name));
                prop_assert_eq!(has(&headers, name), headers.contains_key(name));
                let found: Vec<_> = all(&headers, name).collect();
                let expected: Vec<_> = headers.get_all(name).iter().collect();
                prop_assert_eq!(found, expected);
            }
        }
    }

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

    /// The names of `pairs` that go upstream, in order.
    fn forwarded(pairs: &[(&str, &str)], websocket: bool, forward_token: bool) -> Vec<String> {
        let headers = map(pairs);
        let forwardable = Forwardable::new(&headers, websocket, forward_token);
        headers
            .keys()
            .filter(|name| forwardable.keeps(name))
            .map(|name| name.to_string())
            .collect()
    }

    #[test]
    fn folded_spellings_of_identity_headers_are_stripped() {
        let pairs = [
            ("x-auth-user-id", "a"),
            ("x_auth_user_id", "b"),
            ("x.auth.user.id", "c"),
            ("X_AUTH_MFA", "d"),
            ("x-http-method-override", "DELETE"),
            ("x-original-uri", "/admin"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-auth-token", "kept"),
            ("x_auth_token", "second token"),
            ("x.auth.token", "third token"),
            ("accept", "kept"),
        ];
        assert_eq!(forwarded(&pairs, false, true), ["x-auth-token", "accept"]);
        assert_eq!(forwarded(&pairs, false, false), ["accept"]);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let pairs = [
            ("connection", "keep-alive, X-Foo"),
            ("keep-alive", "timeout=5"),
            ("x-foo", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("host", "written by the gateway"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "h2c"),
            ("x-bar", "2"),
        ];
        assert_eq!(forwarded(&pairs, false, true), ["x-bar"]);
    }

    #[test]
    fn websocket_upgrade_survives_when_asked() {
        let pairs = [("connection", "Upgrade"), ("upgrade", "websocket")];
        assert!(is_websocket_upgrade(&map(&pairs)));
        // `Connection: upgrade` is written by the gateway itself.
        assert_eq!(forwarded(&pairs, true, true), ["upgrade"]);
        assert!(forwarded(&pairs, false, true).is_empty());
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
        let written = |previous: Option<&HeaderValue>| {
            let mut out = Vec::new();
            write_forwarded_for(&mut out, previous, &peer);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(written(None), "x-forwarded-for: 10.0.0.7\r\n");
        let prev = HeaderValue::from_static(" 1.2.3.4 ");
        assert_eq!(
            written(Some(&prev)),
            "x-forwarded-for: 1.2.3.4, 10.0.0.7\r\n"
        );
        let blank = HeaderValue::from_static("  ");
        assert_eq!(written(Some(&blank)), "x-forwarded-for: 10.0.0.7\r\n");
        let binary = HeaderValue::from_bytes(b"caf\xe9").unwrap();
        assert_eq!(written(Some(&binary)), "x-forwarded-for: 10.0.0.7\r\n");
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
