//! Property tests on the public APIs that decide what a request is for and who sent it, and one
//! whole-gateway property: whatever path a client makes up, an anonymous 200 means the upstream
//! saw the normalised path, inside the allowlisted subtree.

use std::borrow::Cow;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use mfa_gate::auth::token::{extract, MAX_TOKEN_BYTES};
use mfa_gate::config::PathPattern;
use mfa_gate::policy::path_matches;
use mfa_gate::proxy::path::normalize;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

use crate::hostile::exchange;
use crate::support::Harness;

/// Pieces that make dot segments, escapes, slashes and delimiters collide.
const HOSTILE: &[&str] = &[
    "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "%5C",
    "\\", ";", "..;", ".;", "%3b", "%3f", "%23", "%00", "%0a", "%25", "%252e", "%", "%z", "%41",
    "%61", "%70ublic", "public", "publicx", "admin", "status", "a", "~", "-", "_", "%7e", "%c3%a9",
    "?", "#", ":", "@", "*",
];

fn hostile_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(HOSTILE), 0..14)
        .prop_map(|pieces| format!("/{}", pieces.concat()))
}

/// Paths for the pure properties: hostile pieces, arbitrary strings, and either glued to a
/// subtree prefix so that matches are common.
fn any_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => hostile_path(),
        1 => any::<String>(),
        1 => any::<String>().prop_map(|s| format!("/{s}")),
        1 => "/[-._~a-zA-Z0-9/;%]{0,24}",
    ]
}

/// A normalised subtree prefix as the config compiles `"/prefix/**"` (empty for `"/**"`).
fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("/public".to_string()),
        Just("/a/b".to_string()),
        "(/[a-z.]{1,5}){1,3}".prop_filter_map("not normal", |p| {
            normalize(&p)
                .ok()
                .filter(|n| *n == p && !p.ends_with('/'))
                .map(Cow::into_owned)
        }),
    ]
}

fn check_normal_form(input: &str) -> Result<(), TestCaseError> {
    let Ok(out) = normalize(input) else {
        return Ok(());
    };
    prop_assert!(out.starts_with('/'), "{input:?} -> {out:?}");
    prop_assert!(!out.contains("//"), "{input:?} -> {out:?}");
    for segment in out.split('/') {
        prop_assert!(
            segment != "." && segment != "..",
            "{input:?} -> {out:?} keeps a dot segment"
        );
        let lower = segment.to_ascii_lowercase();
        prop_assert!(
            lower != "%2e" && lower != "%2e%2e" && lower != ".%2e" && lower != "%2e.",
            "{input:?} -> {out:?} keeps an encoded dot segment"
        );
    }
    let again = normalize(&out);
    prop_assert_eq!(
        again.as_deref(),
        Ok(&*out),
        "not idempotent: {:?} -> {:?}",
        input,
        out
    );
    Ok(())
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = value.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(start), Some(end)) => &value[start..=end],
        _ => &[],
    }
}

/// What `Authorization` carries as a bearer token, per RFC 6750 / RFC 9110 §11.1: the scheme
/// case-insensitively, then the credentials, trimmed.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    let space = value.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    let credentials = trim(rest);
    (scheme.eq_ignore_ascii_case(b"bearer") && !credentials.is_empty()).then_some(credentials)
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        "[ \t]{0,2}(Bearer|bearer|BEARER|Basic|Bearer\t)?[ \t]{0,3}[!-~]{0,40}[ \t]{0,2}"
            .prop_map(String::into_bytes),
        (
            0usize..3,
            prop::sample::select(vec![b'a', b' ', b'\x80', b'~'])
        )
            .prop_map(|(extra, byte)| {
                let mut value = vec![b'T'; MAX_TOKEN_BYTES - 1 + extra];
                value.push(byte);
                value
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn normalize_is_idempotent_and_leaves_no_dot_segments(input in any_path()) {
        check_normal_form(&input)?;
    }

    #[test]
    fn extract_never_panics_and_returns_only_clean_trimmed_tokens(
        x_auth_token in prop::option::of(header_value()),
        authorization in prop::option::of(header_value()),
    ) {
        let mut headers = HeaderMap::new();
        let mut sent_x = None;
        let mut sent_auth = None;
        if let Some(value) = x_auth_token {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                headers.insert(HeaderName::from_static("x-auth-token"), value.clone());
                sent_x = Some(value);
            }
        }
        if let Some(value) = authorization {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                headers.insert(http::header::AUTHORIZATION, value.clone());
                sent_auth = Some(value);
            }
        }
        let result = extract(&headers);
        let from_x = sent_x.as_ref().map(|v| trim(v.as_bytes())).filter(|v| !v.is_empty());
        let expected = from_x.or_else(|| sent_auth.as_ref().and_then(|v| bearer(v.as_bytes())));
        match (&result, expected) {
            (Ok(Some(token)), Some(expected)) => {
                let token = token.expose();
                prop_assert!(token.len() <= MAX_TOKEN_BYTES);
                prop_assert!(token.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{:?}", token);
                prop_assert_eq!(token.as_bytes(), expected);
            }
            (Ok(Some(_)), None) => prop_assert!(false, "a token out of nothing: {:?}", headers),
            (Ok(None), Some(expected)) => prop_assert!(
                false,
                "token {:?} ignored", String::from_utf8_lossy(expected)
            ),
            (Ok(None), None) => {}
            (Err(_), Some(expected)) => prop_assert!(
                expected.len() > MAX_TOKEN_BYTES
                    || !expected.iter().all(|b| (0x21..=0x7e).contains(b)),
                "clean token {:?} refused", String::from_utf8_lossy(expected)
            ),
            (Err(err), None) => prop_assert!(false, "{err} with no token sent"),
        }
    }

    #[test]
    fn subtree_rules_never_match_outside_their_subtree(
        prefix in prefix(),
        before in hostile_path(),
        after in hostile_path(),
        glue in 0u8..3,
    ) {
        let input = match glue {
            0 => format!("{prefix}{after}"),
            1 => format!("{before}{prefix}{after}"),
            _ => format!("{prefix}{}", &after[1..]),
        };
        let pattern = PathPattern::Subtree(prefix.clone());
        if let Ok(normal) = normalize(&input) {
            if path_matches(&pattern, &normal) {
                prop_assert!(
                    *normal == *prefix || normal.starts_with(&format!("{prefix}/")),
                    "Subtree({prefix:?}) matched {normal:?} (from {input:?})"
                );
            }
        }
    }
}

/// The path part of a raw request target as the gateway must judge it: hyper cuts the query at
/// the first `?` and drops a fragment at the first `#`.
fn path_of(target: &str) -> &str {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    &target[..end]
}

#[test]
fn anonymous_200s_only_ever_reach_the_public_subtree() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = runtime.block_on(Harness::with_config(
        "[[allow]]\nname = \"public\"\npaths = [\"/public/**\"]\n",
    ));
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let paths = prop_oneof![
        hostile_path(),
        hostile_path().prop_map(|p| format!("/public{p}")),
        hostile_path().prop_map(|p| format!("/public/{}", &p[1..])),
    ];
    let result = runner.run(&paths, |target| {
        runtime.block_on(async {
            h.upstream.clear();
            let request = format!("GET {target} HTTP/1.1\r\nHost: gw\r\n\r\n");
            let reply = exchange(h.addr(), request.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let seen = h.upstream.requests();
            let sent_path = path_of(&target);
            let status = reply.status;
            match normalize(sent_path) {
                Err(_) => {
                    prop_assert_eq!(status, Some(400), "{:?} is ambiguous", target);
                    prop_assert!(seen.is_empty(), "{:?} forwarded as {:?}", target, seen);
                }
                Ok(normal) => {
                    let public = path_matches(&PathPattern::Subtree("/public".into()), &normal);
                    if status == Some(200) {
                        prop_assert_eq!(seen.len(), 1, "{:?}", target);
                        let uri = &seen[0].uri;
                        let upstream_path = uri.split('?').next().unwrap_or_default();
                        prop_assert!(
                            upstream_path == "/public" || upstream_path.starts_with("/public/"),
                            "anonymous {:?} reached the upstream as {:?}",
                            target,
                            uri
                        );
                        prop_assert_eq!(
                            upstream_path,
                            &*normal,
                            "{:?}: the upstream saw another path than the one matched",
                            target
                        );
                    } else {
                        prop_assert!(
                            seen.is_empty(),
                            "{:?} answered {:?} but forwarded",
                            target,
                            status
                        );
                    }
                    let expected = if public { 200 } else { 401 };
                    prop_assert_eq!(
                        status,
                        Some(expected),
                        "{:?} (normalised {:?})",
                        target,
                        normal
                    );
                }
            }
            Ok(())
        })
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}
