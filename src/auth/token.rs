//! The caller's token: where it is read from, what is refused before any IAM call, and a type
//! that never prints it.

use std::fmt;

use crate::proxy::headers::first;

/// A bearer token as sent by the client. `Debug` and `Display` are redacted so that no log line
/// or error can carry it by accident; [`Token::expose`] is the one door to its value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Box<str>);

impl Token {
    /// Wraps a string that already passed [`crate::auth::token`] validation.
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Token(value.into())
    }

    /// The token's value, for the IAM call and for the HMAC cache key only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `X-Auth-Token`, the first place a token is read from (a name built at compile time: a
/// lookup by `&str` parses it again on every call).
pub const X_AUTH_TOKEN: http::HeaderName = http::HeaderName::from_static("x-auth-token");

/// The longest token accepted; real IAM tokens are a few KiB, anything far larger is an attack
/// on the IAM or on memory.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a presented token was refused before any IAM call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("token contains characters outside visible ASCII")]
    BadCharacters,
}

/// Whether the request carries two different tokens (`X-Auth-Token` and a different
/// `Authorization: Bearer`): only one could be verified, and the other would still reach the
/// app, which might act on it.
pub fn conflicting(headers: &http::HeaderMap) -> bool {
    conflicting_values(
        first(headers, &X_AUTH_TOKEN),
        first(headers, &http::header::AUTHORIZATION),
    )
}

/// [`conflicting`], from the first `X-Auth-Token` and `Authorization` values (found by a
/// caller that walks the headers anyway).
pub fn conflicting_values(
    x_auth_token: Option<&http::HeaderValue>,
    authorization: Option<&http::HeaderValue>,
) -> bool {
    matches!(candidates(x_auth_token, authorization), (Some(a), Some(b)) if a != b)
}

/// The token each header offers: the trimmed `X-Auth-Token` when not empty, and the
/// credentials of a `Bearer` authorization.
fn candidates<'a>(
    x_auth_token: Option<&'a http::HeaderValue>,
    authorization: Option<&'a http::HeaderValue>,
) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
    let x_auth = x_auth_token
        .map(|value| trim(value.as_bytes()))
        .filter(|value| !value.is_empty());
    let bearer = authorization.and_then(|value| bearer(value.as_bytes()));
    (x_auth, bearer)
}

/// Reads the token from `X-Auth-Token`, else from `Authorization: Bearer …` (the scheme
/// matched case-insensitively, RFC 9110 §11.1). `Ok(None)` when neither carries one; another
/// `Authorization` scheme (Basic, …) is not a token. Repeated headers are refused earlier, by
/// the request guard.
pub fn extract(headers: &http::HeaderMap) -> Result<Option<Token>, TokenError> {
    extract_values(
        first(headers, &X_AUTH_TOKEN),
        first(headers, &http::header::AUTHORIZATION),
    )
}

/// [`extract`], from the first `X-Auth-Token` and `Authorization` values.
pub fn extract_values(
    x_auth_token: Option<&http::HeaderValue>,
    authorization: Option<&http::HeaderValue>,
) -> Result<Option<Token>, TokenError> {
    let raw = match candidates(x_auth_token, authorization) {
        (Some(raw), _) | (None, Some(raw)) => raw,
        (None, None) => return Ok(None),
    };
    validate(raw).map(Some)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = bytes.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(start), Some(end)) => &bytes[start..=end],
        _ => &[],
    }
}

/// The credentials of a `Bearer` authorization value, if that is its scheme.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = trim(rest);
    (!token.is_empty()).then_some(token)
}

fn validate(raw: &[u8]) -> Result<Token, TokenError> {
    if raw.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLong);
    }
    // A fold without an early exit: the compiler turns it into SIMD compares, which matters for
    // IAM tokens of several KiB on every request.
    let visible = raw
        .iter()
        .fold(true, |ok, &b| ok & (b.wrapping_sub(0x21) < 0x5e));
    if !visible {
        return Err(TokenError::BadCharacters);
    }
    // Visible ASCII only, checked just above.
    let text = std::str::from_utf8(raw).map_err(|_| TokenError::BadCharacters)?;
    Ok(Token::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn x_auth_token_wins_over_authorization() {
        let map = headers(&[("x-auth-token", b"aaa"), ("authorization", b"Bearer bbb")]);
        assert_eq!(extract(&map).unwrap().unwrap().expose(), "aaa");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in [&b"Bearer tok"[..], b"bearer tok", b"BEARER   tok  "] {
            let map = headers(&[("authorization", value)]);
            assert_eq!(extract(&map).unwrap().unwrap().expose(), "tok");
        }
    }

    #[test]
    fn other_schemes_and_empty_values_are_no_token() {
        for value in [
            &b"Basic dXNlcjpwYXNz"[..],
            b"Bearer",
            b"Bearer   ",
            b"Bearertok",
        ] {
            let map = headers(&[("authorization", value)]);
            assert_eq!(extract(&map).unwrap(), None);
        }
        assert_eq!(extract(&headers(&[("x-auth-token", b"  ")])).unwrap(), None);
        assert_eq!(extract(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn absurd_tokens_are_refused() {
        let long = vec![b'a'; MAX_TOKEN_BYTES + 1];
        assert_eq!(
            extract(&headers(&[("x-auth-token", &long)])),
            Err(TokenError::TooLong)
        );
        assert_eq!(
            extract(&headers(&[("x-auth-token", b"abc def")])),
            Err(TokenError::BadCharacters)
        );
        assert_eq!(
            extract(&headers(&[("x-auth-token", "caf\u{e9}".as_bytes())])),
            Err(TokenError::BadCharacters)
        );
        let max = vec![b'a'; MAX_TOKEN_BYTES];
        assert!(extract(&headers(&[("x-auth-token", &max)]))
            .unwrap()
            .is_some());
    }

    #[test]
    fn exactly_visible_ascii_is_accepted_byte_by_byte() {
        for byte in 0..=255u8 {
            let raw = [b'a', byte, b'a'];
            let expected = (0x21..=0x7e).contains(&byte);
            assert_eq!(validate(&raw).is_ok(), expected, "byte {byte:#04x}");
        }
    }

    #[test]
    fn two_different_tokens_conflict() {
        let both = headers(&[("x-auth-token", b"aaa"), ("authorization", b"Bearer bbb")]);
        assert!(conflicting(&both));
        let same = headers(&[("x-auth-token", b"aaa"), ("authorization", b"bearer aaa")]);
        assert!(!conflicting(&same));
        let basic = headers(&[("x-auth-token", b"aaa"), ("authorization", b"Basic Zm9v")]);
        assert!(!conflicting(&basic));
    }

    #[test]
    fn debug_and_display_never_show_the_token() {
        let token = Token::new("secret-value");
        assert!(!format!("{token:?} {token}").contains("secret"));
    }
}
