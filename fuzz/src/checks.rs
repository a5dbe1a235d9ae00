//! The invariants every fuzz target checks, one function per target taking the raw fuzz input.
//!
//! This file is compiled twice: as a module of the fuzz crate (`fuzz/src/lib.rs`), where the
//! libFuzzer targets in `fuzz/fuzz_targets/` call it, and by `#[path]` from the gateway's own
//! test suite (`tests/it/fuzz_regressions.rs`), which replays the committed corpora and crash
//! inputs through it on every `cargo test`. So it may only use crates the gateway itself
//! depends on (`http`, `serde_json`, `base64`, `ring`), and a violated invariant panics with a
//! message that says which one.
//!
//! Input formats are text where possible, so that seed files can be written and read by hand:
//! see each function.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use mfa_gate::auth::token::{self, MAX_TOKEN_BYTES};
use mfa_gate::iam::jwt::{self, Algorithm, JwkSet, JwksLocation, JwtError, JwtSettings};
use mfa_gate::proxy::h1::{self, ChunkedDecoder, Decoded, KeptHeaders, ResponseFraming};
use mfa_gate::proxy::path;
use mfa_gate::server::framing::{FramingObserver, FramingVerdicts};
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde_json::{Map, Value};

/// A fuzz target's check of one input: panics when an invariant does not hold.
pub type Check = fn(&[u8]);

/// The fuzz targets, by the name of their corpus and regression directories, with the check
/// each input of that directory goes through.
pub const TARGETS: &[(&str, Check)] = &[
    ("path_normalize", path_normalize),
    ("token_extract", token_extract),
    ("framing_observer", framing_observer),
    ("jwks_parse", jwks_parse),
    ("jwt_verify", jwt_verify),
    ("upstream_answer", upstream_answer),
];

// ---------------------------------------------------------------------------------------------
// path_normalize

/// Input: the path, as bytes (not UTF-8 → read lossily, as `normalize` only takes `&str`).
///
/// - `normalize` never panics;
/// - an accepted path comes out starting with `/`, without `//`, without a `.`/`..` segment or a
///   dot segment with parameters, in ASCII with every escape upper-case and not of an
///   unreserved character, never longer than the input;
/// - the output is its own normal form, handed back borrowed, and borrowed means unchanged;
/// - accepted or refused, and the output, are what an independent model of CONTRACT §4 says.
pub fn path_normalize(data: &[u8]) {
    let input = String::from_utf8_lossy(data);
    let result = path::normalize(&input);
    let expected = path_model(&input);
    match (&result, &expected) {
        (Ok(out), Ok(model)) => assert_eq!(
            out.as_ref(),
            model.as_str(),
            "normalize and the model disagree on {input:?}"
        ),
        (Err(_), Err(_)) => {}
        (Ok(out), Err(why)) => {
            panic!("{input:?} accepted as {out:?}, but the model refuses it: {why}")
        }
        (Err(err), Ok(model)) => {
            panic!("{input:?} refused ({err}), but the model accepts it as {model:?}")
        }
    }
    let Ok(out) = result else { return };
    if let Cow::Borrowed(borrowed) = &out {
        assert_eq!(*borrowed, &*input, "borrowed output differs from the input");
    } else {
        assert_ne!(&*out, &*input, "unchanged path was reallocated");
    }
    assert!(out.starts_with('/'), "{input:?} -> {out:?}: no leading '/'");
    assert!(!out.contains("//"), "{input:?} -> {out:?}: contains '//'");
    assert!(out.len() <= input.len(), "{input:?} -> {out:?}: got longer");
    for segment in out.split('/').skip(1) {
        assert!(
            !matches!(segment, "." | ".."),
            "{input:?} -> {out:?}: dot segment left"
        );
        assert!(
            !segment.starts_with(".;") && !segment.starts_with("..;"),
            "{input:?} -> {out:?}: dot segment with parameters left"
        );
    }
    let bytes = out.as_bytes();
    for (i, &byte) in bytes.iter().enumerate() {
        assert!(
            byte.is_ascii_graphic(),
            "{input:?} -> {out:?}: byte {byte:#04x}"
        );
        assert!(
            !matches!(byte, b'\\' | b'#' | b'?'),
            "{input:?} -> {out:?}: raw {:?}",
            char::from(byte)
        );
        if byte == b'%' {
            let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
            assert!(
                hex.len() == 2 && hex.iter().all(|d| matches!(d, b'0'..=b'9' | b'A'..=b'F')),
                "{input:?} -> {out:?}: escape not in upper-case hex"
            );
            let value = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16)
                .unwrap_or_default();
            assert!(
                !is_unreserved(value) && !refused_escape(value),
                "{input:?} -> {out:?}: escape %{value:02X} should be decoded or refused"
            );
        }
    }
    match path::normalize(&out) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, &*out, "normal form is not stable"),
        other => panic!("{input:?} -> {out:?} -> {other:?}: output is not its own normal form"),
    }
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Escapes CONTRACT §4 refuses: `/`, `\`, `;`, `?`, `#`, NUL and the other control bytes.
fn refused_escape(byte: u8) -> bool {
    matches!(byte, b'/' | b'\\' | b';' | b'?' | b'#' | 0x00..=0x1F | 0x7F)
}

/// A second, deliberately naive reading of CONTRACT §4, written from the text and not from
/// `src/proxy/path.rs`: check every byte and escape, decode, split, drop empty segments (merging
/// `/`), then resolve `.` and `..` on a stack.
fn path_model(input: &str) -> Result<String, String> {
    let rest = input.strip_prefix('/').ok_or("no leading '/'")?;
    let bytes = rest.as_bytes();
    let mut decoded = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or("truncated escape")?;
            let text = std::str::from_utf8(hex).map_err(|_| "non-ASCII escape")?;
            if !text.bytes().all(|d| d.is_ascii_hexdigit()) {
                return Err("invalid escape".into());
            }
            let value = u8::from_str_radix(text, 16).map_err(|_| "invalid escape")?;
            if refused_escape(value) {
                return Err(format!("refused escape %{value:02X}"));
            }
            if is_unreserved(value) {
                decoded.push(char::from(value));
            } else {
                decoded.push_str(&format!("%{value:02X}"));
            }
            i += 3;
            continue;
        }
        if !byte.is_ascii_graphic() || matches!(byte, b'\\' | b'#' | b'?') {
            return Err(format!("raw byte {byte:#04x}"));
        }
        decoded.push(char::from(byte));
        i += 1;
    }
    let segments: Vec<&str> = decoded.split('/').collect();
    let mut stack: Vec<&str> = Vec::new();
    let mut directory = false;
    for segment in &segments {
        directory = true;
        match *segment {
            "" | "." => {}
            ".." => {
                stack.pop().ok_or("'..' above the root")?;
            }
            s if s.starts_with(".;") || s.starts_with("..;") => {
                return Err("dot segment with parameters".into())
            }
            s => {
                stack.push(s);
                directory = false;
            }
        }
    }
    let mut out = String::from("/");
    out.push_str(&stack.join("/"));
    if directory && !stack.is_empty() {
        out.push('/');
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// token_extract

/// Input: header lines as on the wire, `Name: value`, one per `\n` (a `\r` before it is kept as
/// part of the value, and refused by `HeaderValue` like every control byte but tab). Lines
/// whose name or value `http` would not accept are skipped; a repeated name is appended.
///
/// - `extract` and `conflicting` never panic;
/// - a token is 1..=16 KiB of visible ASCII, and is what the headers say: the trimmed
///   `X-Auth-Token` when non-empty, else the credentials of a `Bearer` `Authorization`;
/// - no token, an error or `conflicting` exactly when the model of the headers says so.
pub fn token_extract(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let result = token::extract(&headers);
    let conflict = token::conflicting(&headers);

    let x_auth = headers
        .get("x-auth-token")
        .map(|v| trim_ows(v.as_bytes()))
        .filter(|v| !v.is_empty());
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer_model(v.as_bytes()));
    let expected = x_auth.or(bearer);
    assert_eq!(
        conflict,
        matches!((x_auth, bearer), (Some(a), Some(b)) if a != b),
        "conflicting() wrong for {headers:?}"
    );
    match (result, expected) {
        (Ok(None), None) => {}
        (Ok(Some(token)), Some(raw)) => {
            let value = token.expose();
            assert!(!value.is_empty(), "empty token");
            assert!(
                value.len() <= MAX_TOKEN_BYTES,
                "token of {} bytes",
                value.len()
            );
            assert!(
                value.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "token with bytes outside visible ASCII"
            );
            assert_eq!(
                value.as_bytes(),
                raw,
                "token is not the header's credentials"
            );
        }
        (Err(err), Some(raw)) => assert!(
            raw.len() > MAX_TOKEN_BYTES || !raw.iter().all(|b| (0x21..=0x7e).contains(b)),
            "acceptable token refused: {err}"
        ),
        (result, expected) => panic!(
            "extract gave {result:?}, the headers carry {:?}",
            expected.map(String::from_utf8_lossy)
        ),
    }
}

fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| matches!(b, b' ' | b'\t');
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}

/// `Authorization: Bearer <credentials>` (RFC 6750 §2.1; the scheme case-insensitive,
/// RFC 9110 §11.1): the scheme ends at the first space.
fn bearer_model(value: &[u8]) -> Option<&[u8]> {
    let value = trim_ows(value);
    let space = value.iter().position(|&b| b == b' ')?;
    if !value[..space].eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some(trim_ows(&value[space..])).filter(|c| !c.is_empty())
}

// ---------------------------------------------------------------------------------------------
// framing_observer

/// Input: one byte that picks the head limit and seeds the read splits, then the bytes a client
/// sends on one connection.
///
/// - `observe` never panics, however the stream is cut into reads;
/// - the verdicts (one per request head, in order) are the same for one read of everything,
///   one read per byte, reads of a few fixed sizes and reads of pseudo-random sizes.
pub fn framing_observer(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    // Small limits reach the "stop observing" paths with small inputs; the largest is what the
    // server uses at least (`MIN_BUF_SIZE`).
    let max_head = [64, 256, 1024, 8192][usize::from(control & 3)];
    let whole = framing_verdicts(stream, max_head, |_| stream.len());
    for size in [1, 2, 3, 7, 64, 1000] {
        let split = framing_verdicts(stream, max_head, |_| size);
        assert_eq!(
            whole, split,
            "verdicts differ between one read and reads of {size} bytes (max_head {max_head})"
        );
    }
    let mut state = u32::from(control) | 0x9e37_0000;
    let random = framing_verdicts(stream, max_head, move |_| {
        // xorshift32: any read sizes, the same ones for the same input.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        1 + (state % 97) as usize
    });
    assert_eq!(
        whole, random,
        "verdicts differ between one read and reads of random sizes (max_head {max_head})"
    );
}

fn framing_verdicts(
    stream: &[u8],
    max_head: usize,
    mut next_read: impl FnMut(usize) -> usize,
) -> Vec<bool> {
    let verdicts = FramingVerdicts::default();
    let mut observer = FramingObserver::new(verdicts.clone(), max_head);
    let mut at = 0;
    while at < stream.len() {
        let end = at.saturating_add(next_read(at).max(1)).min(stream.len());
        observer.observe(&stream[at..end]);
        at = end;
    }
    std::iter::from_fn(|| verdicts.next_conflict()).collect()
}

// ---------------------------------------------------------------------------------------------
// jwks_parse

/// Input: a JWKS document.
///
/// - `JwkSet::parse` never panics;
/// - a parsed set has 1..=64 keys, each with a kid iff the document's key had one (so the kids
///   listed are the document's), and parsing is deterministic.
pub fn jwks_parse(data: &[u8]) {
    let Ok(set) = JwkSet::parse(data) else {
        return;
    };
    assert!(!set.is_empty(), "a parsed JWKS without keys");
    assert!(set.len() <= 64, "a parsed JWKS with {} keys", set.len());
    assert_eq!(set.kids().count(), set.len(), "kids() and len() disagree");
    let document: Value = serde_json::from_slice(data).expect("parsed JWKS is not JSON");
    let document_kids: Vec<&str> = document["keys"]
        .as_array()
        .expect("parsed JWKS without a keys array")
        .iter()
        .map(|key| key.get("kid").and_then(Value::as_str).unwrap_or(""))
        .collect();
    for kid in set.kids() {
        assert!(
            document_kids.contains(&kid),
            "kid {kid:?} is not in the document"
        );
    }
    assert_eq!(
        JwkSet::parse(data).map(|again| again == set),
        Ok(true),
        "parsing is not deterministic"
    );
}

// ---------------------------------------------------------------------------------------------
// jwt_verify

/// Issuer, audience and clock of the JWT checks.
const ISSUER: &str = "https://idp.example.com";
const AUDIENCE: &str = "mfa-gate";
const NOW_SECS: u64 = 1_750_000_000;
const LEEWAY: Duration = Duration::from_secs(30);

/// The Ed25519 key the `signed` mode signs with (kid `ed`); its public half is in the JWKS
/// beside an EC P-256 (kid `ec`) and an RSA-2048 (kid `rsa`) key whose private halves nobody
/// has.
const ED25519_SEED: [u8; 32] = *b"mfa-gate fuzz key, never secret!";
const EC_X: &str = "YqEliugIAX7XJpLkxmoRsmtmefShj6fjdaJffRX7p8g";
const EC_Y: &str = "ncld1z5GCNxr4zLo_pBFsBpUv7-gZntnbAhDoQqg48o";
const RSA_N: &str = "obYsHKxh7e65sxh3WZzrgN2Jac5j58Ll3VemXR_lD5kUxdDqf8dsueP6GBOwx8i13KHTBZQy94aqlpZLLqmis1s8Ng_pdb3SIv2jQuaDfdxISnFaxdGuPVGvOidvpdyEoQPMwGyLbLfYMkqVOGvO0GRMG-NNz3f447Lkeny4HHrYZMs7UGH77InnrmL4BX5qkGh-7yJZGb8U13PQGan1E08gFvN6EcCjlE1y-StlizxgKDcRwRdwdAdAUTYTTFf9UVL-10NjKpDGrWKLAS07wpH37PAXwQ9mNAhG6ZXMXtzKdstQwKsUMwAXeR8dDviphUm4xK8YZB9ormYFFaoAyQ";

struct JwtFixture {
    signer: Ed25519KeyPair,
    keys: JwkSet,
    settings: JwtSettings,
    now: SystemTime,
}

fn jwt_fixture() -> &'static JwtFixture {
    static FIXTURE: std::sync::OnceLock<JwtFixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let signer =
            Ed25519KeyPair::from_seed_unchecked(&ED25519_SEED).expect("a 32-byte Ed25519 seed");
        let jwks = serde_json::json!({ "keys": [
            { "kty": "OKP", "crv": "Ed25519", "kid": "ed", "use": "sig",
              "x": URL_SAFE_NO_PAD.encode(signer.public_key().as_ref()) },
            { "kty": "EC", "crv": "P-256", "kid": "ec", "x": EC_X, "y": EC_Y },
            { "kty": "RSA", "kid": "rsa", "alg": "RS256", "n": RSA_N, "e": "AQAB" },
        ]});
        let keys = JwkSet::parse(jwks.to_string().as_bytes()).expect("the fixture JWKS parses");
        assert_eq!(keys.len(), 3, "every fixture key is usable");
        JwtFixture {
            signer,
            keys,
            settings: JwtSettings {
                jwks: JwksLocation::File("/dev/null".into()),
                issuer: ISSUER.to_owned(),
                audience: AUDIENCE.to_owned(),
                user_id_claim: "sub".to_owned(),
                algorithms: Algorithm::ALL.to_vec(),
                leeway: LEEWAY,
            },
            now: UNIX_EPOCH + Duration::from_secs(NOW_SECS),
        }
    })
}

/// Input, `signed` mode (starts with `{`): a JOSE header, `\n`, a claims set. Both are
/// base64url-encoded as they are and signed with the fixture's Ed25519 key, so the fuzzer
/// reaches the claim checks with a valid signature. Otherwise `raw` mode: the input is the
/// token.
///
/// - `verify` never panics and is deterministic;
/// - an accepted token has a signature ring verifies with the Ed25519 key, `alg` `EdDSA`, no
///   `crit`, the right `iss` and `aud`, an `exp` not passed (with the leeway), and its user id
///   is its `sub`;
/// - a signed token with one signature bit flipped, or re-labelled with another `alg`, is
///   refused;
/// - `UnknownKey` only for a kid absent from the JWKS, and only for a token that the same
///   header naming the right kid would not have made fail on anything but the key.
pub fn jwt_verify(data: &[u8]) {
    let fixture = jwt_fixture();
    if data.first() == Some(&b'{') {
        let (header, claims) = match data.iter().position(|&b| b == b'\n') {
            Some(at) => (&data[..at], &data[at + 1..]),
            None => (data, &b""[..]),
        };
        let token = sign(fixture, header, claims);
        let result = check_token(fixture, &token);
        if result.is_ok() {
            // Any flipped bit in the signature must break it.
            let (input, signature) = token.rsplit_once('.').expect("three parts");
            let mut signature = URL_SAFE_NO_PAD.decode(signature).expect("own base64");
            let bit = usize::from(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
            let index = bit % (signature.len() * 8);
            signature[index / 8] ^= 1 << (index % 8);
            let forged = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signature));
            assert!(
                check_token(fixture, &forged).is_err(),
                "a token with a flipped signature bit verified"
            );
        }
        if let Ok(mut header) = serde_json::from_slice::<Map<String, Value>>(header) {
            // The same signature under another algorithm must never verify.
            for alg in ["ES256", "RS256", "PS256", "HS256", "none"] {
                header.insert("alg".into(), Value::from(alg));
                let relabelled = sign(fixture, header_bytes(&header).as_bytes(), claims);
                assert!(
                    check_token(fixture, &relabelled).is_err(),
                    "an EdDSA signature verified as {alg}"
                );
            }
        }
    } else {
        let token = String::from_utf8_lossy(data);
        let _ = check_token(fixture, &token);
    }
}

fn header_bytes(header: &Map<String, Value>) -> String {
    Value::Object(header.clone()).to_string()
}

fn sign(fixture: &JwtFixture, header: &[u8], claims: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = fixture.signer.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

/// Verifies `token` and checks the outcome against an independent reading of it.
fn check_token(fixture: &JwtFixture, token: &str) -> Result<jwt::VerifiedJwt, JwtError> {
    let result = jwt::verify(token, &fixture.keys, &fixture.settings, fixture.now);
    assert_eq!(
        result,
        jwt::verify(token, &fixture.keys, &fixture.settings, fixture.now),
        "verify is not deterministic"
    );
    let parts: Vec<&str> = token.split('.').collect();
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).ok();
    let object = |bytes: Option<Vec<u8>>| {
        bytes.and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok())
    };
    match &result {
        Ok(verified) => {
            assert_eq!(parts.len(), 3, "accepted a token of {} parts", parts.len());
            let header = object(decode(parts[0])).expect("accepted header is an object");
            let claims = object(decode(parts[1])).expect("accepted claims are an object");
            let signature = decode(parts[2]).expect("accepted signature is base64url");
            assert_eq!(header.get("alg"), Some(&Value::from("EdDSA")), "alg");
            assert!(!header.contains_key("crit"), "accepted a crit header");
            assert!(
                matches!(header.get("kid"), None | Some(Value::String(_))),
                "accepted a non-string kid"
            );
            let public = UnparsedPublicKey::new(&ED25519, fixture.signer.public_key().as_ref());
            let input = &token[..parts[0].len() + 1 + parts[1].len()];
            assert!(
                public.verify(input.as_bytes(), &signature).is_ok(),
                "accepted a signature the Ed25519 key did not make"
            );
            assert_eq!(claims.get("iss"), Some(&Value::from(ISSUER)), "iss");
            let aud_ok = match claims.get("aud") {
                Some(Value::String(aud)) => aud == AUDIENCE,
                Some(Value::Array(auds)) => auds.iter().any(|a| a == AUDIENCE),
                _ => false,
            };
            assert!(aud_ok, "accepted a token for another audience");
            let exp = claims.get("exp").and_then(Value::as_f64).expect("exp");
            assert!(
                exp + LEEWAY.as_secs_f64() > NOW_SECS as f64 - 1.0,
                "accepted a token that expired at {exp}"
            );
            assert_eq!(
                claims.get("sub").and_then(Value::as_str),
                Some(verified.user_id.as_str()),
                "user id is not the sub claim"
            );
            assert!(!verified.user_id.is_empty(), "empty user id");
            assert!(
                !verified.user_id.chars().any(char::is_control),
                "user id with control characters"
            );
        }
        Err(JwtError::UnknownKey) => {
            let header = object(decode(parts[0])).expect("UnknownKey for an unreadable header");
            let kid = header.get("kid").and_then(Value::as_str);
            assert!(
                kid.is_some_and(|kid| !["ed", "ec", "rsa"].contains(&kid)),
                "UnknownKey for kid {kid:?}, which the JWKS has"
            );
            // Naming a key that exists must not turn up a check that does not need the key.
            let mut renamed = header;
            renamed.insert("kid".into(), Value::from("ed"));
            let token = sign(
                fixture,
                header_bytes(&renamed).as_bytes(),
                &decode(parts[1]).expect("UnknownKey for unreadable claims"),
            );
            let again = jwt::verify(&token, &fixture.keys, &fixture.settings, fixture.now);
            assert!(
                matches!(
                    again,
                    Ok(_) | Err(JwtError::NoFittingKey | JwtError::BadSignature)
                ),
                "UnknownKey, but with a known kid the token fails with {again:?}"
            );
        }
        Err(_) => {}
    }
    result
}

// ---------------------------------------------------------------------------------------------
// upstream_answer

/// Parses an answer head fed `step` bytes at a time (all at once for 0): the head, or why not,
/// and what is left in the buffer after it.
fn parse_in_steps(
    wire: &[u8],
    step: usize,
    method: &http::Method,
    kept_as: h1::KeptHeaders,
) -> (Result<Option<h1::ResponseHead>, h1::ParseError>, Vec<u8>) {
    let step = if step == 0 { wire.len().max(1) } else { step };
    let mut buffer = bytes::BytesMut::new();
    let mut fed = 0;
    loop {
        let end = (fed + step).min(wire.len());
        buffer.extend_from_slice(&wire[fed..end]);
        fed = end;
        match h1::parse_response_head(&mut buffer, method, false, kept_as) {
            Ok(None) if fed < wire.len() => continue,
            result => {
                buffer.extend_from_slice(&wire[fed..]);
                return (result, buffer.to_vec());
            }
        }
    }
}

/// Decodes a chunked body fed `step` bytes at a time: the data, and the end (`Ok(true)`), an
/// incomplete body (`Ok(false)`) or the error; and the bytes left after a complete body.
fn decode_in_steps(wire: &[u8], step: usize) -> (Vec<u8>, Result<bool, h1::ParseError>, Vec<u8>) {
    let step = if step == 0 { wire.len().max(1) } else { step };
    let mut decoder = ChunkedDecoder::default();
    let mut buffer = bytes::BytesMut::new();
    let mut data = Vec::new();
    let mut fed = 0;
    loop {
        match decoder.decode(&mut buffer) {
            Ok(Decoded::Data(bytes)) => data.extend_from_slice(&bytes),
            Ok(Decoded::End) => {
                buffer.extend_from_slice(&wire[fed..]);
                return (data, Ok(true), buffer.to_vec());
            }
            Ok(Decoded::More) if fed < wire.len() => {
                let end = (fed + step).min(wire.len());
                buffer.extend_from_slice(&wire[fed..end]);
                fed = end;
            }
            Ok(Decoded::More) => return (data, Ok(false), Vec::new()),
            Err(err) => return (data, Err(err), Vec::new()),
        }
    }
}

/// The lines of a head kept as lines hold what the same head's map holds, `Content-Length`
/// (the writer frames the body itself) and the headers the gateway sets aside: the same
/// values per name, in the same order.
fn assert_relayed_as_in_map(map: &h1::ResponseHead, lines: &h1::ResponseHead) {
    let relayed = lines.relayed.as_ref().expect("kept as lines, but no lines");
    assert!(lines.headers.is_empty(), "kept as lines, but a map too");
    let mut from_lines = HeaderMap::new();
    for line in relayed.lines() {
        let text = line
            .strip_suffix(b"\r\n")
            .expect("a relayed line ends in CRLF");
        let colon = text
            .iter()
            .position(|&b| b == b':')
            .expect("a relayed line has a colon");
        let name = &text[..colon];
        let value = text[colon..]
            .strip_prefix(b": ")
            .expect("a relayed line is `name: value`");
        from_lines.append(
            HeaderName::from_bytes(name).expect("a relayed name the map refuses"),
            HeaderValue::from_bytes(value).expect("a relayed value the map refuses"),
        );
    }
    let mut expected = map.headers.clone();
    expected.remove(http::header::CONTENT_LENGTH);
    for name in h1::SET_BY_GATEWAY {
        expected.remove(name);
    }
    assert_eq!(from_lines, expected, "the lines are not the map's headers");
    assert_eq!(
        relayed.dated,
        expected.contains_key(http::header::DATE),
        "dated"
    );
}

/// Input: one byte choosing the request method (`H`: HEAD, else GET), one byte the size of the
/// pieces the answer arrives in (0: all at once), then the upstream's bytes.
///
/// - parsing never panics, and gives the same head (or the same refusal) however the bytes
///   arrive, leaving exactly the bytes after the head;
/// - a parsed head carries no hop-by-hop header, and an answer with no body has framing `None`;
/// - kept as lines for the gateway's own writer, the head is the same (or refused the same),
///   its lines are the map's headers but `Content-Length` and those the gateway sets, value for
///   value, and `dated` says whether one is `Date`;
/// - a chunked body decodes to the same data and verdict however it arrives, and to no more
///   bytes than were sent.
pub fn upstream_answer(data: &[u8]) {
    let [method, step, wire @ ..] = data else {
        return;
    };
    let method = if *method == b'H' {
        http::Method::HEAD
    } else {
        http::Method::GET
    };
    let (whole, rest) = parse_in_steps(wire, 0, &method, KeptHeaders::InMap);
    let (pieces, rest_pieces) =
        parse_in_steps(wire, usize::from(*step), &method, KeptHeaders::InMap);
    let (as_lines, rest_lines) = parse_in_steps(wire, 0, &method, KeptHeaders::AsLines);
    match (&whole, &as_lines) {
        (Ok(Some(map)), Ok(Some(lines))) => {
            assert_eq!(
                (map.status, map.version, map.framing, map.keep_alive),
                (lines.status, lines.version, lines.framing, lines.keep_alive),
                "the head depends on how its headers are kept"
            );
            assert_eq!(rest, rest_lines, "different bytes left after the head");
            assert_relayed_as_in_map(map, lines);
        }
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        _ => panic!("in a map: {whole:?}, as lines: {as_lines:?}"),
    }
    match (&whole, &pieces) {
        (Ok(Some(a)), Ok(Some(b))) => {
            assert_eq!(
                (a.status, a.version, a.framing, a.keep_alive, &a.headers),
                (b.status, b.version, b.framing, b.keep_alive, &b.headers),
                "the head depends on how it arrived"
            );
            assert_eq!(rest, rest_pieces, "different bytes left after the head");
        }
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        _ => panic!("whole: {whole:?}, in pieces: {pieces:?}"),
    }
    let Ok(Some(head)) = whole else {
        return;
    };
    for name in head.headers.keys() {
        assert!(
            !matches!(
                name.as_str(),
                "connection"
                    | "keep-alive"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
                    | "upgrade"
                    | "proxy-connection"
                    | "proxy-authenticate"
                    | "proxy-authorization"
            ),
            "hop-by-hop header {name} kept"
        );
    }
    let bodiless = method == http::Method::HEAD
        || head.status.is_informational()
        || matches!(head.status.as_u16(), 204 | 304);
    if bodiless {
        assert_eq!(
            head.framing,
            ResponseFraming::None,
            "a body where none may be"
        );
    }
    if head.framing == ResponseFraming::Chunked {
        let whole = decode_in_steps(&rest, 0);
        let pieces = decode_in_steps(&rest, usize::from(*step));
        assert_eq!(whole, pieces, "the chunked body depends on how it arrived");
        assert!(whole.0.len() <= rest.len(), "more data out than in");
    }
}
