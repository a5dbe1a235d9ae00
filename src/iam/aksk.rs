//! AK/SK request signing, `SDK-HMAC-SHA256`: how Huawei Cloud APIs that take no token (IAM v5
//! among them) authenticate a caller (`shared/IAM.md`, "AK/SK signing"; Huawei Cloud "API
//! Request Signing Guide").
//!
//! The signature is an HMAC-SHA256, under the secret key (SK), of a string naming the algorithm,
//! the `X-Sdk-Date` and the SHA-256 of a *canonical request*:
//!
//! ```text
//! METHOD \n CANONICAL_URI \n CANONICAL_QUERY \n CANONICAL_HEADERS \n SIGNED_HEADERS \n hex(sha256(body))
//! ```
//!
//! - canonical URI: the path, each segment percent-encoded (RFC 3986: all but `A-Za-z0-9-_.~`),
//!   always ending in `/`;
//! - canonical query: the parameters sorted by name (then value), each `name=value` encoded the
//!   same way, joined by `&`;
//! - canonical headers: `name:trimmed-value\n` for each signed header, names lowercased and sorted;
//! - signed headers: those names joined by `;`.
//!
//! The request carries `X-Sdk-Date: YYYYMMDDTHHMMSSZ` (the gateway allows 15 minutes of clock
//! skew) and `Authorization: SDK-HMAC-SHA256 Access=<AK>, SignedHeaders=<…>, Signature=<hex>`.
//! Temporary credentials add `X-Security-Token`, which is signed too.
//!
//! Everything here is pure — no clock, no I/O except [`AkSk::from_env_or_files`] — so that the
//! official test vector is checked byte for byte, and so that the IAM simulator verifies
//! signatures with the same canonicalisation the client signs with.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, Uri};
use sha2::{Digest, Sha256};

/// The algorithm name, first word of `Authorization` and first line of the string to sign.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";

/// `X-Sdk-Date`: when the request was signed, `YYYYMMDDTHHMMSSZ` (UTC).
pub const X_SDK_DATE: HeaderName = HeaderName::from_static("x-sdk-date");

/// `X-Security-Token`: the session token of temporary credentials.
pub const X_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-security-token");

/// How far `X-Sdk-Date` may be from the verifier's clock, either way.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// Environment variable of the access key id, as the Huawei Cloud SDKs name it.
pub const ENV_AK: &str = "HUAWEICLOUD_SDK_AK";
/// Environment variable of the secret access key.
pub const ENV_SK: &str = "HUAWEICLOUD_SDK_SK";
/// Environment variable of the session token of temporary credentials (optional).
pub const ENV_SECURITY_TOKEN: &str = "HUAWEICLOUD_SDK_SECURITY_TOKEN";

/// Longest credential read from a file: an AK is 20 characters, an SK 40, a security token a
/// few KiB. A larger file is not a credential file.
const MAX_CREDENTIAL_FILE_BYTES: u64 = 64 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// An access key pair, optionally with the security token of temporary credentials.
///
/// `Debug` shows only the first characters of the AK; the SK and the security token never
/// appear in a log line or an error. They leave this type only inside a signature (the SK) or
/// as the `X-Security-Token` header.
#[derive(Clone, PartialEq, Eq)]
pub struct AkSk {
    ak: String,
    sk: String,
    security_token: Option<String>,
}

impl fmt::Debug for AkSk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.ak.chars().take(4).collect();
        f.debug_struct("AkSk")
            .field("ak", &format_args!("{shown}…"))
            .field("sk", &format_args!("<redacted>"))
            .field(
                "security_token",
                &self.security_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why a request could not be signed or canonicalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("invalid percent-encoding in the request {0}")]
    PercentEncoding(&'static str),
    #[error("signed header {0} is missing from the request")]
    MissingHeader(String),
    #[error("signed header {0} is not visible ASCII")]
    HeaderNotText(String),
    #[error("the request URI has no host")]
    NoHost,
    #[error("{0} is not a valid header value")]
    InvalidHeaderValue(&'static str),
}

impl AkSk {
    /// Permanent credentials. Surrounding whitespace is dropped (a pasted key often carries some).
    ///
    /// # Errors
    ///
    /// When the AK or the SK is empty, or either cannot be sent in a header.
    pub fn new(ak: &str, sk: &str) -> anyhow::Result<Self> {
        let ak = ak.trim();
        let sk = sk.trim();
        if ak.is_empty() {
            bail!("the IAM v5 access key (AK) is empty");
        }
        if sk.is_empty() {
            bail!("the IAM v5 secret key (SK) is empty");
        }
        // The AK is written into `Authorization` between `Access=` and `,`.
        if !ak.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            bail!("the IAM v5 access key (AK) must be visible ASCII without commas");
        }
        Ok(AkSk {
            ak: ak.to_owned(),
            sk: sk.to_owned(),
            security_token: None,
        })
    }

    /// Adds the security token of temporary credentials (`None` or empty: none).
    ///
    /// # Errors
    ///
    /// When the token cannot be sent as a header value.
    pub fn with_security_token(mut self, token: Option<&str>) -> anyhow::Result<Self> {
        let token = token.map(str::trim).filter(|token| !token.is_empty());
        if let Some(token) = token {
            if HeaderValue::from_str(token).is_err() {
                bail!("the IAM v5 security token is not a valid header value");
            }
        }
        self.security_token = token.map(str::to_owned);
        Ok(self)
    }

    /// Reads the credentials: the AK from `ak_file` if given, else from `HUAWEICLOUD_SDK_AK`;
    /// the SK from `sk_file` if given, else from `HUAWEICLOUD_SDK_SK`; the optional security
    /// token from `HUAWEICLOUD_SDK_SECURITY_TOKEN`. A file's trailing newline (any surrounding
    /// whitespace) is not part of the key.
    ///
    /// # Errors
    ///
    /// Naming what is missing or which file cannot be read — never a credential's value.
    pub fn from_env_or_files(
        ak_file: Option<&Path>,
        sk_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::from_sources(ak_file, sk_file, |name| std::env::var(name).ok())
    }

    /// [`AkSk::from_env_or_files`] with the environment as a function, for tests.
    fn from_sources(
        ak_file: Option<&Path>,
        sk_file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let ak = credential(ak_file, ENV_AK, "ak_file", "access key (AK)", &env)?;
        let sk = credential(sk_file, ENV_SK, "sk_file", "secret key (SK)", &env)?;
        let token = env(ENV_SECURITY_TOKEN);
        AkSk::new(&ak, &sk)?
            .with_security_token(token.as_deref())
            .with_context(|| format!("reading {ENV_SECURITY_TOKEN}"))
    }

    /// The access key id (not secret: it is sent in clear in `Authorization`).
    pub fn ak(&self) -> &str {
        &self.ak
    }

    /// Whether these are temporary credentials (with a security token).
    pub fn is_temporary(&self) -> bool {
        self.security_token.is_some()
    }

    /// Signs `request`, whose body is `body`, as of `now`: sets `X-Sdk-Date`, `Host` (from the
    /// URI, unless already set), `X-Security-Token` for temporary credentials, and
    /// `Authorization`.
    ///
    /// The signed headers are `host`, `x-sdk-date`, and `content-type` and `x-security-token`
    /// when present: what identifies the request and what the API gateway must not let a proxy
    /// change. Headers added after signing are not covered.
    ///
    /// # Errors
    ///
    /// When the URI has no host, or the path or query is not valid percent-encoding.
    pub fn sign<B>(
        &self,
        request: &mut Request<B>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), SignError> {
        let date = format_sdk_date(now);
        let method = request.method().clone();
        let uri = request.uri().clone();
        let headers = request.headers_mut();
        headers.insert(
            X_SDK_DATE,
            HeaderValue::from_str(&date)
                .map_err(|_| SignError::InvalidHeaderValue("x-sdk-date"))?,
        );
        if !headers.contains_key(HOST) {
            let host = host_of(&uri)?;
            headers.insert(
                HOST,
                HeaderValue::from_str(&host).map_err(|_| SignError::InvalidHeaderValue("host"))?,
            );
        }
        if let Some(token) = &self.security_token {
            let mut value = HeaderValue::from_str(token)
                .map_err(|_| SignError::InvalidHeaderValue("x-security-token"))?;
            value.set_sensitive(true);
            headers.insert(X_SECURITY_TOKEN, value);
        }
        let mut signed = vec!["host", "x-sdk-date"];
        if headers.contains_key(CONTENT_TYPE) {
            signed.push("content-type");
        }
        if self.security_token.is_some() {
            signed.push("x-security-token");
        }
        let canonical = canonical_request(&method, &uri, headers, &signed, body)?;
        let signature = signature(&self.sk, &string_to_sign(&date, &canonical));
        let authorization = Authorization {
            access: self.ak.clone(),
            signed_headers: signed_headers(&signed),
            signature,
        };
        let mut value = HeaderValue::from_str(&authorization.to_string())
            .map_err(|_| SignError::InvalidHeaderValue("authorization"))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
        Ok(())
    }
}

/// One credential, from its file if configured, else from the environment.
fn credential(
    file: Option<&Path>,
    env_name: &str,
    file_key: &str,
    what: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    let value = match file {
        Some(path) => {
            let len = std::fs::metadata(path)
                .with_context(|| format!("reading iam.v5.{file_key} {}", path.display()))?
                .len();
            if len > MAX_CREDENTIAL_FILE_BYTES {
                bail!(
                    "iam.v5.{file_key} {} is {len} bytes, not a key file",
                    path.display()
                );
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading iam.v5.{file_key} {}", path.display()))?;
            let text = text.trim().to_owned();
            if text.is_empty() {
                bail!(
                    "the IAM v5 {what} file iam.v5.{file_key} {} is empty",
                    path.display()
                );
            }
            text
        }
        None => match env(env_name).map(|value| value.trim().to_owned()) {
            Some(value) if !value.is_empty() => value,
            _ => bail!("the IAM v5 {what} is missing: set {env_name} or iam.v5.{file_key}"),
        },
    };
    Ok(value)
}

/// The parsed `Authorization` header of a signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// The access key id.
    pub access: String,
    /// The signed header names, lowercase, `;`-separated, as sent.
    pub signed_headers: String,
    /// Hex HMAC-SHA256.
    pub signature: String,
}

impl Authorization {
    /// Parses `SDK-HMAC-SHA256 Access=<AK>, SignedHeaders=<a;b>, Signature=<hex>` (spaces
    /// after the commas optional, parameters in any order, each exactly once). `None` for
    /// anything else.
    pub fn parse(value: &str) -> Option<Authorization> {
        let rest = value.strip_prefix(ALGORITHM)?.strip_prefix(' ')?;
        let (mut access, mut signed_headers, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let (name, value) = part.trim().split_once('=')?;
            let slot = match name {
                "Access" => &mut access,
                "SignedHeaders" => &mut signed_headers,
                "Signature" => &mut signature,
                _ => return None,
            };
            if slot.replace(value.to_owned()).is_some() || value.is_empty() {
                return None;
            }
        }
        Some(Authorization {
            access: access?,
            signed_headers: signed_headers?,
            signature: signature?,
        })
    }

    /// The signed header names.
    pub fn signed_header_names(&self) -> Vec<&str> {
        self.signed_headers.split(';').collect()
    }
}

impl fmt::Display for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{ALGORITHM} Access={}, SignedHeaders={}, Signature={}",
            self.access, self.signed_headers, self.signature
        )
    }
}

/// The canonical request of `method uri` with `body`, signing the headers named in `signed`
/// (any case, any order) as found in `headers`.
///
/// # Errors
///
/// When a signed header is missing or not text, or the path or query is not valid
/// percent-encoding.
pub fn canonical_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    signed: &[&str],
    body: &[u8],
) -> Result<String, SignError> {
    let mut names: Vec<String> = signed
        .iter()
        .map(|name| name.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    let mut canonical_headers = String::new();
    for name in &names {
        let mut values = Vec::new();
        for value in headers.get_all(name.as_str()) {
            let text = value
                .to_str()
                .map_err(|_| SignError::HeaderNotText(name.clone()))?;
            values.push(text.trim());
        }
        if values.is_empty() {
            return Err(SignError::MissingHeader(name.clone()));
        }
        values.sort_unstable();
        for value in values {
            canonical_headers.push_str(name);
            canonical_headers.push(':');
            canonical_headers.push_str(value);
            canonical_headers.push('\n');
        }
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        method.as_str(),
        canonical_uri(uri.path())?,
        canonical_query(uri.query().unwrap_or(""))?,
        canonical_headers,
        signed_headers(&names),
        hex::encode(Sha256::digest(body)),
    ))
}

/// The canonical URI of a request path as sent: percent-decoded, each `/`-separated segment
/// encoded again (RFC 3986 unreserved characters kept), ending in `/`.
///
/// # Errors
///
/// On an invalid percent escape.
pub fn canonical_uri(path: &str) -> Result<String, SignError> {
    let decoded = decode(path, false).ok_or(SignError::PercentEncoding("path"))?;
    let mut uri = String::with_capacity(decoded.len() + 1);
    for (i, segment) in decoded.split(|&b| b == b'/').enumerate() {
        if i > 0 {
            uri.push('/');
        }
        uri.push_str(&encode(segment));
    }
    if !uri.ends_with('/') {
        uri.push('/');
    }
    Ok(uri)
}

/// The canonical query string of a raw query as sent (without `?`): parameters decoded (`+` as
/// a space, as form encoding and the reference signers read it), sorted by name then value,
/// encoded again, `name=` for a parameter without a value.
///
/// # Errors
///
/// On an invalid percent escape.
pub fn canonical_query(query: &str) -> Result<String, SignError> {
    let mut pairs = Vec::new();
    for piece in query.split('&').filter(|piece| !piece.is_empty()) {
        let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
        let name = decode(name, true).ok_or(SignError::PercentEncoding("query"))?;
        let value = decode(value, true).ok_or(SignError::PercentEncoding("query"))?;
        pairs.push((name, value));
    }
    pairs.sort();
    Ok(join_query(
        pairs.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
    ))
}

/// A query string in canonical form from unencoded `(name, value)` pairs: what a client should
/// send, so that the query it sends is exactly the one it signed.
pub fn query_string(pairs: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(&[u8], &[u8])> = pairs
        .iter()
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()))
        .collect();
    pairs.sort();
    join_query(pairs.into_iter())
}

/// The decoded `(name, value)` pairs of a raw query, in order; `None` on an invalid escape or
/// text that is not UTF-8.
pub fn query_pairs(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            let name = String::from_utf8(decode(name, true)?).ok()?;
            let value = String::from_utf8(decode(value, true)?).ok()?;
            Some((name, value))
        })
        .collect()
}

fn join_query<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> String {
    let mut query = String::new();
    for (name, value) in pairs {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(&encode(name));
        query.push('=');
        query.push_str(&encode(value));
    }
    query
}

/// `SDK-HMAC-SHA256\n<X-Sdk-Date>\n<hex(sha256(canonical request))>`.
pub fn string_to_sign(sdk_date: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{sdk_date}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    )
}

/// `hex(HMAC-SHA256(SK, string to sign))`.
pub fn signature(sk: &str, string_to_sign: &str) -> String {
    hex::encode(mac(sk, string_to_sign).finalize().into_bytes())
}

/// Whether `signature` (hex, any case) is the signature of `string_to_sign` under `sk`,
/// compared in constant time.
pub fn verify_signature(sk: &str, string_to_sign: &str, signature: &str) -> bool {
    match hex::decode(signature) {
        Ok(expected) => mac(sk, string_to_sign).verify_slice(&expected).is_ok(),
        Err(_) => false,
    }
}

fn mac(sk: &str, message: &str) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(sk.as_bytes()).expect("HMAC accepts any key length");
    mac.update(message.as_bytes());
    mac
}

/// `X-Sdk-Date` of a time: `20191115T033655Z`. Times RFC 3339 cannot write are clamped.
pub fn format_sdk_date(time: SystemTime) -> String {
    /// 9999-12-31T23:59:59Z, the last second RFC 3339 can write.
    const MAX_SECS: u64 = 253_402_300_799;
    let clamped = match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) if since.as_secs() <= MAX_SECS => time,
        Ok(_) => SystemTime::UNIX_EPOCH + Duration::from_secs(MAX_SECS),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    humantime::format_rfc3339_seconds(clamped)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect()
}

/// Reads an `X-Sdk-Date` (`YYYYMMDDTHHMMSSZ`, UTC); `None` if it is not one.
pub fn parse_sdk_date(value: &str) -> Option<SystemTime> {
    let bytes = value.as_bytes();
    let shape_ok = bytes.len() == 16
        && bytes[8] == b'T'
        && bytes[15] == b'Z'
        && bytes[..8]
            .iter()
            .chain(&bytes[9..15])
            .all(u8::is_ascii_digit);
    if !shape_ok {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &value[0..4],
        &value[4..6],
        &value[6..8],
        &value[9..11],
        &value[11..13],
        &value[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

/// `Host` for a URI: the host, with the port only when it is not the scheme's default (as
/// HTTP clients write it).
fn host_of(uri: &Uri) -> Result<String, SignError> {
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or(SignError::NoHost)?;
    let default_port = match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    };
    Ok(match uri.port_u16() {
        Some(port) if Some(port) != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    })
}

fn signed_headers(names: &[&str]) -> String {
    let mut names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    names.sort();
    names.dedup();
    names.join(";")
}

/// RFC 3986 percent-encoding of everything but the unreserved characters, `%XX` upper-case.
pub fn encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut encoded = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push('%');
            encoded.push(char::from(HEX[usize::from(byte >> 4)]));
            encoded.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    encoded
}

/// Percent-decoding; `+` reads as a space when `plus_is_space`. `None` on a `%` not followed by
/// two hex digits.
fn decode(text: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                decoded.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                decoded.push(b' ');
                i += 1;
            }
            byte => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    Some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write as _;

    /// The official test vector (`shared/IAM.md`, "AK/SK signing").
    const VECTOR_AK: &str = "QTWAOYTTINDUT2QVKYUC";
    const VECTOR_SK: &str = "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc";
    const VECTOR_URI: &str = "https://service.region.example.com/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs?limit=2&marker=13551d6b-755d-4757-b956-536f674975c0";
    const VECTOR_DATE: &str = "20191115T033655Z";
    const VECTOR_HASHED_CANONICAL: &str =
        "b25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a";
    const VECTOR_SIGNATURE: &str =
        "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe";

    fn vector_request() -> Request<()> {
        Request::get(VECTOR_URI)
            .header("content-type", "application/json")
            .body(())
            .expect("request")
    }

    fn vector_time() -> SystemTime {
        parse_sdk_date(VECTOR_DATE).expect("date")
    }

    #[test]
    fn official_vector_canonical_request_and_signature() {
        let mut request = vector_request();
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("service.region.example.com"));
        request
            .headers_mut()
            .insert(X_SDK_DATE, HeaderValue::from_static(VECTOR_DATE));
        let canonical = canonical_request(
            request.method(),
            request.uri(),
            request.headers(),
            &["content-type", "host", "x-sdk-date"],
            b"",
        )
        .expect("canonical");
        assert_eq!(
            canonical,
            "GET\n/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs/\n\
             limit=2&marker=13551d6b-755d-4757-b956-536f674975c0\n\
             content-type:application/json\nhost:service.region.example.com\n\
             x-sdk-date:20191115T033655Z\n\n\
             content-type;host;x-sdk-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(Sha256::digest(canonical.as_bytes())),
            VECTOR_HASHED_CANONICAL
        );
        let to_sign = string_to_sign(VECTOR_DATE, &canonical);
        assert_eq!(
            to_sign,
            format!("SDK-HMAC-SHA256\n20191115T033655Z\n{VECTOR_HASHED_CANONICAL}")
        );
        assert_eq!(signature(VECTOR_SK, &to_sign), VECTOR_SIGNATURE);
        assert!(verify_signature(VECTOR_SK, &to_sign, VECTOR_SIGNATURE));
        assert!(verify_signature(
            VECTOR_SK,
            &to_sign,
            &VECTOR_SIGNATURE.to_ascii_uppercase()
        ));
        assert!(!verify_signature("wrong", &to_sign, VECTOR_SIGNATURE));
        assert!(!verify_signature(VECTOR_SK, &to_sign, "not hex"));
    }

    #[test]
    fn sign_reproduces_the_official_vector() {
        let credentials = AkSk::new(VECTOR_AK, VECTOR_SK).expect("credentials");
        let mut request = vector_request();
        credentials
            .sign(&mut request, b"", vector_time())
            .expect("sign");
        let headers = request.headers();
        assert_eq!(headers[HOST], "service.region.example.com");
        assert_eq!(headers[X_SDK_DATE], VECTOR_DATE);
        assert!(!headers.contains_key(X_SECURITY_TOKEN));
        assert_eq!(
            headers[AUTHORIZATION],
            format!(
                "SDK-HMAC-SHA256 Access={VECTOR_AK}, SignedHeaders=content-type;host;x-sdk-date, \
                 Signature={VECTOR_SIGNATURE}"
            )
            .as_str()
        );
        assert!(headers[AUTHORIZATION].is_sensitive());
        // The query was sent as signed: no re-encoding on the way.
        assert_eq!(
            request.uri().query(),
            Some("limit=2&marker=13551d6b-755d-4757-b956-536f674975c0")
        );
    }

    #[test]
    fn sdk_dates_round_trip() {
        assert_eq!(format_sdk_date(vector_time()), VECTOR_DATE);
        assert_eq!(format_sdk_date(SystemTime::UNIX_EPOCH), "19700101T000000Z");
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(format_sdk_date(far), "99991231T235959Z");
        for bad in [
            "",
            "2019-11-15T03:36:55Z",
            "20191115T033655",
            "20191115 033655Z",
            "2019111aT033655Z",
            "20191315T033655Z",
            "20191115T033655Z ",
        ] {
            assert_eq!(parse_sdk_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn canonical_uri_always_ends_with_a_slash() {
        for (path, expected) in [
            ("", "/"),
            ("/", "/"),
            ("/v5/mfa-devices", "/v5/mfa-devices/"),
            ("/v5/mfa-devices/", "/v5/mfa-devices/"),
            ("/v5/mfa-devices/disable", "/v5/mfa-devices/disable/"),
            ("/a b/c~d.e_f-g", "/a%20b/c~d.e_f-g/"),
            ("/a%20b/%7e", "/a%20b/~/"),
            ("/iam::acc:mfa:x/", "/iam%3A%3Aacc%3Amfa%3Ax/"),
            ("/caf%C3%A9", "/caf%C3%A9/"),
            ("/a+b", "/a%2Bb/"),
        ] {
            assert_eq!(canonical_uri(path).expect(path), expected, "{path:?}");
        }
        assert_eq!(
            canonical_uri("/bad%zz"),
            Err(SignError::PercentEncoding("path"))
        );
        assert_eq!(
            canonical_uri("/bad%2"),
            Err(SignError::PercentEncoding("path"))
        );
    }

    #[test]
    fn canonical_query_sorts_and_encodes() {
        for (query, expected) in [
            ("", ""),
            ("b=2&a=1", "a=1&b=2"),
            (
                "user_id=u1&limit=100&marker=ab%2Bc%2F%3D",
                "limit=100&marker=ab%2Bc%2F%3D&user_id=u1",
            ),
            // Repeated names sort by value; a name alone gets `=`.
            ("k=b&k=a&flag", "flag=&k=a&k=b"),
            // `+` is a space; spaces and reserved characters come out percent-encoded.
            ("q=a+b&r=x y", "q=a%20b&r=x%20y"),
            ("p=%7e%2d&s=*'()!", "p=~-&s=%2A%27%28%29%21"),
            ("&&a=1&", "a=1"),
        ] {
            assert_eq!(canonical_query(query).expect(query), expected, "{query:?}");
        }
        assert_eq!(
            canonical_query("a=%g0"),
            Err(SignError::PercentEncoding("query"))
        );
    }

    #[test]
    fn query_string_is_canonical() {
        let query = query_string(&[("user_id", "u 1"), ("marker", "YWJj+/=="), ("limit", "100")]);
        assert_eq!(query, "limit=100&marker=YWJj%2B%2F%3D%3D&user_id=u%201");
        assert_eq!(canonical_query(&query).expect("canonical"), query);
        assert_eq!(
            query_pairs(&query).expect("pairs"),
            vec![
                ("limit".to_owned(), "100".to_owned()),
                ("marker".to_owned(), "YWJj+/==".to_owned()),
                ("user_id".to_owned(), "u 1".to_owned()),
            ]
        );
        assert_eq!(query_pairs("a=%ff"), None);
        assert_eq!(query_pairs("a=%"), None);
    }

    #[test]
    fn canonical_headers_trim_lowercase_and_sort() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("h.example:8443"));
        headers.insert(
            "x-sdk-date",
            HeaderValue::from_static("  20191115T033655Z "),
        );
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        let uri: Uri = "/p".parse().expect("uri");
        let canonical = canonical_request(
            &Method::POST,
            &uri,
            &headers,
            &["X-Sdk-Date", "x-multi", "Host"],
            b"{}",
        )
        .expect("canonical");
        assert_eq!(
            canonical,
            format!(
                "POST\n/p/\n\nhost:h.example:8443\nx-multi:a\nx-multi:b\n\
                 x-sdk-date:20191115T033655Z\n\nhost;x-multi;x-sdk-date\n{}",
                hex::encode(Sha256::digest(b"{}"))
            )
        );
        assert_eq!(
            canonical_request(&Method::GET, &uri, &headers, &["x-absent"], b""),
            Err(SignError::MissingHeader("x-absent".to_owned()))
        );
        headers.insert("x-bin", HeaderValue::from_bytes(b"\xff").expect("value"));
        assert_eq!(
            canonical_request(&Method::GET, &uri, &headers, &["x-bin"], b""),
            Err(SignError::HeaderNotText("x-bin".to_owned()))
        );
    }

    #[test]
    fn security_token_is_sent_and_signed() {
        let credentials = AkSk::new(VECTOR_AK, VECTOR_SK)
            .expect("credentials")
            .with_security_token(Some("session-token-value"))
            .expect("token");
        assert!(credentials.is_temporary());
        let mut request = Request::post("https://iam.example.com:8443/v5/mfa-devices/disable")
            .header("content-type", "application/json")
            .body(())
            .expect("request");
        let body = br#"{"user_id":"u","serial_number":"s"}"#;
        credentials
            .sign(&mut request, body, vector_time())
            .expect("sign");
        let headers = request.headers();
        assert_eq!(headers[X_SECURITY_TOKEN], "session-token-value");
        assert!(headers[X_SECURITY_TOKEN].is_sensitive());
        assert_eq!(headers[HOST], "iam.example.com:8443");
        let authorization =
            Authorization::parse(headers[AUTHORIZATION].to_str().expect("ascii")).expect("parse");
        assert_eq!(authorization.access, VECTOR_AK);
        assert_eq!(
            authorization.signed_headers,
            "content-type;host;x-sdk-date;x-security-token"
        );
        // The verifier's view: the same canonical request, the same signature.
        let canonical = canonical_request(
            request.method(),
            request.uri(),
            headers,
            &authorization.signed_header_names(),
            body,
        )
        .expect("canonical");
        assert!(canonical.contains("\nx-security-token:session-token-value\n"));
        let to_sign = string_to_sign(VECTOR_DATE, &canonical);
        assert!(verify_signature(
            VECTOR_SK,
            &to_sign,
            &authorization.signature
        ));
        // Another token, another signature.
        let mut other = headers.clone();
        other.insert(X_SECURITY_TOKEN, HeaderValue::from_static("forged"));
        let forged = canonical_request(
            request.method(),
            request.uri(),
            &other,
            &authorization.signed_header_names(),
            body,
        )
        .expect("canonical");
        assert!(!verify_signature(
            VECTOR_SK,
            &string_to_sign(VECTOR_DATE, &forged),
            &authorization.signature
        ));
    }

    #[test]
    fn host_is_kept_and_default_ports_are_left_out() {
        let credentials = AkSk::new(VECTOR_AK, VECTOR_SK).expect("credentials");
        for (uri, host) in [
            ("https://iam.example.com:443/v5", "iam.example.com"),
            ("http://127.0.0.1:80/v5", "127.0.0.1"),
            ("http://127.0.0.1:8080/v5", "127.0.0.1:8080"),
            ("http://[::1]:9/v5", "[::1]:9"),
        ] {
            let mut request = Request::get(uri).body(()).expect("request");
            credentials
                .sign(&mut request, b"", vector_time())
                .expect("sign");
            assert_eq!(request.headers()[HOST], host, "{uri}");
        }
        let mut request = Request::get("https://a.example/v5")
            .header(HOST, "b.example")
            .body(())
            .expect("request");
        credentials
            .sign(&mut request, b"", vector_time())
            .expect("sign");
        assert_eq!(request.headers()[HOST], "b.example");
        let mut request = Request::get("/v5").body(()).expect("request");
        assert_eq!(
            credentials.sign(&mut request, b"", vector_time()),
            Err(SignError::NoHost)
        );
    }

    #[test]
    fn authorization_parsing() {
        let parsed = Authorization::parse(
            "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host;x-sdk-date, Signature=abc",
        )
        .expect("parse");
        assert_eq!(
            parsed,
            Authorization {
                access: "AK1".to_owned(),
                signed_headers: "host;x-sdk-date".to_owned(),
                signature: "abc".to_owned(),
            }
        );
        assert_eq!(parsed.signed_header_names(), ["host", "x-sdk-date"]);
        assert_eq!(
            parsed.to_string(),
            "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host;x-sdk-date, Signature=abc"
        );
        assert!(Authorization::parse(
            "SDK-HMAC-SHA256 Signature=abc,Access=AK1,SignedHeaders=host"
        )
        .is_some());
        for bad in [
            "",
            "Bearer x",
            "SDK-HMAC-SHA256",
            "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host",
            "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host, Signature=",
            "SDK-HMAC-SHA256 Access=AK1, Access=AK2, SignedHeaders=host, Signature=a",
            "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host, Signature=a, Extra=1",
            "SDK-HMAC-SHA1 Access=AK1, SignedHeaders=host, Signature=a",
        ] {
            assert_eq!(Authorization::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let credentials = AkSk::new(VECTOR_AK, VECTOR_SK)
            .expect("credentials")
            .with_security_token(Some("the-session-token"))
            .expect("token");
        let shown = format!("{credentials:?}");
        assert!(!shown.contains(VECTOR_SK), "{shown}");
        assert!(!shown.contains(VECTOR_AK), "{shown}");
        assert!(!shown.contains("the-session-token"), "{shown}");
        assert!(shown.contains("QTWA"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn credentials_are_validated() {
        assert!(AkSk::new("", "sk").is_err());
        assert!(AkSk::new("ak", " \n").is_err());
        assert!(AkSk::new("a,k", "sk").is_err());
        assert!(AkSk::new("a k", "sk").is_err());
        let trimmed = AkSk::new(" AK\n", "SK\r\n").expect("credentials");
        assert_eq!(trimmed.ak(), "AK");
        assert_eq!(trimmed, AkSk::new("AK", "SK").expect("credentials"));
        let permanent = trimmed
            .clone()
            .with_security_token(Some(""))
            .expect("empty token");
        assert!(!permanent.is_temporary());
        assert!(trimmed.with_security_token(Some("bad\nvalue")).is_err());
    }

    fn temp_file(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(contents.as_bytes()).expect("write");
        file
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn credentials_from_the_environment() {
        let loaded = AkSk::from_sources(None, None, env(&[(ENV_AK, "ENVAK"), (ENV_SK, "ENVSK")]))
            .expect("loaded");
        assert_eq!(loaded, AkSk::new("ENVAK", "ENVSK").expect("credentials"));
        assert!(!loaded.is_temporary());

        let loaded = AkSk::from_sources(
            None,
            None,
            env(&[
                (ENV_AK, "ENVAK"),
                (ENV_SK, "ENVSK"),
                (ENV_SECURITY_TOKEN, "TOKEN"),
            ]),
        )
        .expect("loaded");
        assert!(loaded.is_temporary());
    }

    #[test]
    fn files_win_over_the_environment_and_lose_their_newline() {
        let ak = temp_file("FILEAK\n");
        let sk = temp_file("FILESK\r\n");
        let both = env(&[(ENV_AK, "ENVAK"), (ENV_SK, "ENVSK")]);
        let loaded = AkSk::from_sources(Some(ak.path()), Some(sk.path()), &both).expect("loaded");
        assert_eq!(loaded, AkSk::new("FILEAK", "FILESK").expect("credentials"));
        // One from a file, the other from the environment.
        let loaded = AkSk::from_sources(None, Some(sk.path()), &both).expect("loaded");
        assert_eq!(loaded, AkSk::new("ENVAK", "FILESK").expect("credentials"));
    }

    #[test]
    fn missing_credentials_are_named_without_values() {
        let err =
            AkSk::from_sources(None, None, env(&[(ENV_SK, "SECRETVALUE")])).expect_err("no AK");
        let text = format!("{err:#}");
        assert!(text.contains(ENV_AK), "{text}");
        assert!(text.contains("ak_file"), "{text}");
        assert!(!text.contains("SECRETVALUE"), "{text}");

        let err = AkSk::from_sources(None, None, env(&[(ENV_AK, "AK"), (ENV_SK, "  ")]))
            .expect_err("no SK");
        let text = format!("{err:#}");
        assert!(text.contains(ENV_SK), "{text}");
        assert!(text.contains("secret key"), "{text}");

        let empty = temp_file("\n");
        let err = AkSk::from_sources(Some(empty.path()), None, env(&[(ENV_SK, "SK")]))
            .expect_err("empty file");
        let text = format!("{err:#}");
        assert!(text.contains("empty"), "{text}");
        assert!(text.contains(&empty.path().display().to_string()), "{text}");

        let missing = Path::new("/nonexistent/mfa-gate/sk");
        let err = AkSk::from_sources(None, Some(missing), env(&[(ENV_AK, "AK")]))
            .expect_err("missing file");
        let text = format!("{err:#}");
        assert!(text.contains("iam.v5.sk_file"), "{text}");
        assert!(text.contains("/nonexistent/mfa-gate/sk"), "{text}");
    }
}
