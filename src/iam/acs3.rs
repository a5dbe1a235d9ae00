//! The Alibaba Cloud V3 request signature, `ACS3-HMAC-SHA256` (`shared/IAM.md`, "ACS3-HMAC-SHA256
//! (V3 signature)"), as a pure function of the request: no clock, no randomness, no I/O, so that
//! it is tested byte for byte against the official test vector and shared by the CloudSSO client
//! and the simulator that checks its signatures.
//!
//! ```text
//! canonical request = METHOD \n CANONICAL_URI \n CANONICAL_QUERY \n CANONICAL_HEADERS \n
//!                     SIGNED_HEADERS \n HASHED_PAYLOAD
//! string to sign    = "ACS3-HMAC-SHA256" \n hex(sha256(canonical request))
//! signature         = hex(HMAC-SHA256(AccessKeySecret, string to sign))
//! Authorization     = ACS3-HMAC-SHA256 Credential=<AKID>,SignedHeaders=<…>,Signature=<hex>
//! ```
//!
//! Query keys and values are encoded per RFC 3986 §2.3 (everything but `A-Za-z0-9-_.~` as `%XX`,
//! so a space is `%20`, `*` is `%2A` and `~` stays) and sorted; header names are lowercased and
//! sorted, each line `name:trimmed-value`.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The algorithm name, first word of the `Authorization` header and first line of the string to
/// sign.
pub const ALGORITHM: &str = "ACS3-HMAC-SHA256";

/// A request as it will be sent, reduced to what the signature covers.
#[derive(Debug, Clone, Copy)]
pub struct Acs3Request<'a> {
    /// `GET`, `POST`, …, as sent.
    pub method: &'a str,
    /// The path, not yet encoded; `/` for the RPC-style APIs.
    pub path: &'a str,
    /// Query parameters, not yet encoded, in any order.
    pub query: &'a [(&'a str, &'a str)],
    /// The headers to sign, names in any case, values as sent; each name once. The caller
    /// chooses them: `host`, every `x-acs-*` header, `content-type` when a body is sent.
    pub headers: &'a [(&'a str, &'a str)],
    /// `hex(sha256(body))`, the value of `x-acs-content-sha256`.
    pub hashed_payload: &'a str,
}

/// Everything derived while signing; the intermediate values are kept for tests and for the
/// simulator's diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub canonical_request: String,
    /// `hex(sha256(canonical_request))`.
    pub hashed_canonical_request: String,
    /// Lowercased header names joined by `;`.
    pub signed_headers: String,
    /// `hex(HMAC-SHA256(secret, string to sign))`.
    pub signature: String,
}

impl Signed {
    /// The `Authorization` header value (no spaces after the commas, as the API expects).
    pub fn authorization(&self, access_key_id: &str) -> String {
        format!(
            "{ALGORITHM} Credential={access_key_id},SignedHeaders={},Signature={}",
            self.signed_headers, self.signature
        )
    }
}

/// Signs `request` with the AccessKey secret.
pub fn sign(request: &Acs3Request<'_>, secret: &[u8]) -> Signed {
    let canonical_request = canonical_request(request);
    let hashed_canonical_request = hex_sha256(canonical_request.as_bytes());
    let signature = hex::encode(
        string_to_sign_mac(secret, &hashed_canonical_request)
            .finalize()
            .into_bytes(),
    );
    Signed {
        signed_headers: signed_headers(request.headers),
        canonical_request,
        hashed_canonical_request,
        signature,
    }
}

/// Whether `claimed` (hex, any case) is the signature of a request whose canonical request
/// hashes to `hashed_canonical_request`. Compared in constant time.
pub fn signature_matches(secret: &[u8], hashed_canonical_request: &str, claimed: &str) -> bool {
    let Ok(claimed) = hex::decode(claimed) else {
        return false;
    };
    string_to_sign_mac(secret, hashed_canonical_request)
        .verify_slice(&claimed)
        .is_ok()
}

/// HMAC-SHA256 keyed with the secret, fed with the string to sign.
fn string_to_sign_mac(secret: &[u8], hashed_canonical_request: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(ALGORITHM.as_bytes());
    mac.update(b"\n");
    mac.update(hashed_canonical_request.as_bytes());
    mac
}

/// The canonical request of `request`.
pub fn canonical_request(request: &Acs3Request<'_>) -> String {
    let mut headers: Vec<(String, &str)> = request
        .headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim()))
        .collect();
    headers.sort();
    let mut out = String::new();
    out.push_str(request.method);
    out.push('\n');
    out.push_str(&canonical_uri(request.path));
    out.push('\n');
    out.push_str(&canonical_query(request.query));
    out.push('\n');
    for (name, value) in &headers {
        out.push_str(name);
        out.push(':');
        out.push_str(value);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers(request.headers));
    out.push('\n');
    out.push_str(request.hashed_payload);
    out
}

/// The canonical URI: each segment encoded, the `/`s kept; an empty path is `/`.
pub fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// The canonical query string: `key=value` pairs, both encoded, sorted by key then value and
/// joined by `&`; an empty value gives `key=`.
pub fn canonical_query(params: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .map(|(key, value)| (encode(key), encode(value)))
        .collect();
    pairs.sort();
    let mut out = String::new();
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// The signed-headers list: lowercased names, sorted, joined by `;`.
pub fn signed_headers(headers: &[(&str, &str)]) -> String {
    let mut names: Vec<String> = headers
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    names.sort();
    names.join(";")
}

/// RFC 3986 §2.3 percent-encoding of UTF-8: unreserved characters (`A-Za-z0-9-_.~`) as they are,
/// every other byte as `%XX` with upper-case hex.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `hex(sha256(bytes))`, lower-case: the hashed payload and the hashed canonical request.
pub fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The parts of an `Authorization: ACS3-HMAC-SHA256 …` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization<'a> {
    pub access_key_id: &'a str,
    /// The `SignedHeaders` names in the order given.
    pub signed_headers: Vec<&'a str>,
    pub signature: &'a str,
}

/// Parses an `Authorization` header value; `None` unless it is `ACS3-HMAC-SHA256` with
/// exactly the three parameters, each once (spaces after the commas tolerated).
pub fn parse_authorization(value: &str) -> Option<Authorization<'_>> {
    let rest = value.strip_prefix(ALGORITHM)?.strip_prefix(' ')?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=')?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return None,
        };
        if slot.replace(value).is_some() {
            return None;
        }
    }
    let signed: &str = signed?;
    Some(Authorization {
        access_key_id: credential.filter(|id: &&str| !id.is_empty())?,
        signed_headers: signed.split(';').filter(|name| !name.is_empty()).collect(),
        signature: signature.filter(|sig: &&str| !sig.is_empty())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// The official test vector (`shared/IAM.md`): `RunInstances` on ECS, empty body.
    fn vector_headers() -> Vec<(&'static str, &'static str)> {
        vec![
            ("host", "ecs.cn-shanghai.aliyuncs.com"),
            ("x-acs-action", "RunInstances"),
            ("x-acs-version", "2014-05-26"),
            ("x-acs-date", "2023-10-26T10:22:32Z"),
            ("x-acs-signature-nonce", "3156853299f313e23d1673dc12e1703d"),
            ("x-acs-content-sha256", EMPTY_SHA256),
        ]
    }

    const VECTOR_QUERY: [(&str, &str); 2] = [
        ("RegionId", "cn-shanghai"),
        (
            "ImageId",
            "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
        ),
    ];

    #[test]
    fn official_test_vector() {
        let headers = vector_headers();
        let request = Acs3Request {
            method: "POST",
            path: "/",
            query: &VECTOR_QUERY,
            headers: &headers,
            hashed_payload: &hex_sha256(b""),
        };
        let signed = sign(&request, b"YourAccessKeySecret");
        assert_eq!(
            signed.canonical_request,
            "POST\n/\n\
             ImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai\n\
             host:ecs.cn-shanghai.aliyuncs.com\n\
             x-acs-action:RunInstances\n\
             x-acs-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-acs-date:2023-10-26T10:22:32Z\n\
             x-acs-signature-nonce:3156853299f313e23d1673dc12e1703d\n\
             x-acs-version:2014-05-26\n\
             \n\
             host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            signed.hashed_canonical_request,
            "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
        );
        assert_eq!(
            signed.signature,
            "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        );
        assert_eq!(
            signed.authorization("YourAccessKeyId"),
            "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,\
             SignedHeaders=host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,\
             Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        );
        assert!(signature_matches(
            b"YourAccessKeySecret",
            &signed.hashed_canonical_request,
            &signed.signature.to_ascii_uppercase()
        ));
        assert!(!signature_matches(
            b"AnotherSecret",
            &signed.hashed_canonical_request,
            &signed.signature
        ));
        assert!(!signature_matches(
            b"YourAccessKeySecret",
            &signed.hashed_canonical_request,
            "zz"
        ));
    }

    #[test]
    fn header_case_order_and_whitespace_do_not_matter() {
        let mut headers = vector_headers();
        headers.reverse();
        let upper: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_ascii_uppercase(), format!("  {v} ")))
            .collect();
        let upper: Vec<(&str, &str)> = upper
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let request = Acs3Request {
            method: "POST",
            path: "",
            query: &VECTOR_QUERY,
            headers: &upper,
            hashed_payload: EMPTY_SHA256,
        };
        assert_eq!(
            sign(&request, b"YourAccessKeySecret").signature,
            "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        );
    }

    #[test]
    fn rfc3986_encoding() {
        assert_eq!(encode("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(encode("a b*c+d/e=f&g%h"), "a%20b%2Ac%2Bd%2Fe%3Df%26g%25h");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(
            encode("u-00q8wbq42wiltcrk****"),
            "u-00q8wbq42wiltcrk%2A%2A%2A%2A"
        );
    }

    #[test]
    fn query_is_sorted_after_encoding_and_keeps_empty_values() {
        assert_eq!(
            canonical_query(&[("b", "2"), ("a b", ""), ("a", "z"), ("a", "y")]),
            "a=y&a=z&a%20b=&b=2"
        );
        assert_eq!(canonical_query(&[]), "");
        assert_eq!(
            canonical_query(&[("UserId", "u-1*"), ("DirectoryId", "d-00fc2p61****")]),
            "DirectoryId=d-00fc2p61%2A%2A%2A%2A&UserId=u-1%2A"
        );
    }

    #[test]
    fn canonical_uri_encodes_segments() {
        assert_eq!(canonical_uri("/"), "/");
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/a b/c*"), "/a%20b/c%2A");
    }

    #[test]
    fn authorization_round_trip() {
        let value = "ACS3-HMAC-SHA256 Credential=AK,SignedHeaders=host;x-acs-date,Signature=abc";
        assert_eq!(
            parse_authorization(value),
            Some(Authorization {
                access_key_id: "AK",
                signed_headers: vec!["host", "x-acs-date"],
                signature: "abc",
            })
        );
        let spaced = "ACS3-HMAC-SHA256 Credential=AK, SignedHeaders=host, Signature=abc";
        assert!(parse_authorization(spaced).is_some());
        for bad in [
            "ACS3-HMAC-SHA1 Credential=AK,SignedHeaders=host,Signature=abc",
            "ACS3-HMAC-SHA256 Credential=AK,SignedHeaders=host",
            "ACS3-HMAC-SHA256 Credential=,SignedHeaders=host,Signature=abc",
            "ACS3-HMAC-SHA256 Credential=AK,Credential=BK,SignedHeaders=host,Signature=abc",
            "ACS3-HMAC-SHA256 Credential=AK,SignedHeaders=host,Signature=abc,Extra=1",
            "ACS3-HMAC-SHA256Credential=AK,SignedHeaders=host,Signature=abc",
            "",
        ] {
            assert_eq!(parse_authorization(bad), None, "{bad}");
        }
    }
}
