//! Local verification of the bearer JWT a CloudSSO caller presents (CONTRACT §5,
//! `alibaba_cloudsso`), and the JWKS its signature is checked against.
//!
//! A token passes only if every check holds (RFC 7515, RFC 7519, RFC 8725 "JWT Best Current
//! Practices"):
//!
//! - it is a compact JWS (three base64url parts, no padding), its header has no `crit`;
//! - its `alg` is one of the configured asymmetric algorithms. `none` and `HS*` are not even
//!   representable by [`Algorithm`], so no configuration can let them in, and a symmetric (`oct`)
//!   key in the JWKS is never loaded: the RS256/HS256 confusion (an HMAC keyed with the public
//!   key) has nothing to work with;
//! - the key is chosen by `kid` from the configured JWKS only — `jwk`, `jku` and `x5u` header
//!   parameters are ignored, a key is never taken from the token — and its `kty`/`crv` (and its
//!   `alg`, when the JWK names one) must fit the token's `alg`;
//! - `iss` equals the configured issuer, `aud` (a string or an array) contains the configured
//!   audience, `exp` is present and `nbf` (if present) is passed, both with a leeway for clock
//!   skew;
//! - the user id claim is a non-empty string.
//!
//! Claims are read before the signature is checked, but only to reject early: nothing from a
//! token is used unless its signature verified. The early read also means that a token which
//! would fail anyway never makes the gateway refetch the JWKS.
//!
//! [`JwksSource`] keeps the key set: loaded from a file or fetched over HTTPS (plain HTTP only
//! on loopback), refreshed in the background, and refreshed on demand when a token names a `kid`
//! the set does not have (key rotation) — at most once per [`JWKS_MIN_REFRESH_GAP`], so that
//! tokens with made-up `kid`s cannot make the gateway hammer the IdP. A failed refresh keeps the
//! previous keys.

use crate::iam::error_chain;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use ring::signature::{self as ring_sig, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::iam::IamError;
use crate::metrics::Metrics;

/// Clock skew tolerated on `exp` and `nbf` (CONTRACT §5).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// The algorithms accepted when the config names none (CONTRACT §3).
pub const DEFAULT_ALGORITHMS: [Algorithm; 2] = [Algorithm::Rs256, Algorithm::Es256];

/// The claim that carries the CloudSSO `UserId` when the config names none.
pub const DEFAULT_USER_ID_CLAIM: &str = "sub";

/// How often the JWKS is reloaded in the background. IdPs publish a new key well before they
/// sign with it (and the unknown-`kid` refresh covers those that do not), so minutes are enough.
pub const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(300);

/// Least time between two on-demand JWKS refreshes (unknown `kid`), and the retry delay of a
/// failed background load.
pub const JWKS_MIN_REFRESH_GAP: Duration = Duration::from_secs(10);

/// Largest JWKS document read. Real ones are a few KiB; this bounds memory against a broken or
/// hostile endpoint.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Most keys kept from one JWKS. A token without `kid` is tried against every fitting key, so
/// the set must stay small.
const MAX_KEYS: usize = 64;

/// Longest user id accepted from the user id claim. CloudSSO ids look like
/// `u-00q8wbq42wiltcrk****`; anything far longer is not one.
const MAX_USER_ID_BYTES: usize = 256;

/// `api` metric label of JWKS fetches (CONTRACT §6).
const API: &str = "jwks";

/// The HTTP(S) client the JWKS is fetched with (shared with the CloudSSO client).
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A JWS signature algorithm the gateway can verify. Asymmetric only, by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Algorithm {
    /// Every supported algorithm.
    pub const ALL: [Algorithm; 9] = [
        Algorithm::Rs256,
        Algorithm::Rs384,
        Algorithm::Rs512,
        Algorithm::Ps256,
        Algorithm::Ps384,
        Algorithm::Ps512,
        Algorithm::Es256,
        Algorithm::Es384,
        Algorithm::EdDsa,
    ];

    /// The JWA name (RFC 7518 §3.1, RFC 8037 §3.1).
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    /// The algorithm of a JWA name; names are case-sensitive (RFC 7515 §4.1.1).
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|alg| alg.as_str() == name)
    }

    /// Whether a key can verify this algorithm: RSA for RS*/PS*, the named curve for ES*,
    /// Ed25519 for EdDSA.
    fn fits(self, key: &KeyMaterial) -> bool {
        match (self, key) {
            (
                Algorithm::Rs256
                | Algorithm::Rs384
                | Algorithm::Rs512
                | Algorithm::Ps256
                | Algorithm::Ps384
                | Algorithm::Ps512,
                KeyMaterial::Rsa { .. },
            ) => true,
            (Algorithm::Es256, KeyMaterial::Ec { curve, .. }) => *curve == Curve::P256,
            (Algorithm::Es384, KeyMaterial::Ec { curve, .. }) => *curve == Curve::P384,
            (Algorithm::EdDsa, KeyMaterial::Ed25519 { .. }) => true,
            _ => false,
        }
    }

    /// Checks `signature` over `message` with `key`, which must [fit](Algorithm::fits).
    fn verify(self, key: &KeyMaterial, message: &[u8], signature: &[u8]) -> bool {
        let rsa = |params: &'static ring_sig::RsaParameters| match key {
            KeyMaterial::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(params, message, signature)
                .is_ok(),
            _ => false,
        };
        let point = |alg: &'static dyn ring_sig::VerificationAlgorithm| match key {
            KeyMaterial::Ec { point, .. } => UnparsedPublicKey::new(alg, point)
                .verify(message, signature)
                .is_ok(),
            KeyMaterial::Ed25519 { x } => UnparsedPublicKey::new(alg, x)
                .verify(message, signature)
                .is_ok(),
            KeyMaterial::Rsa { .. } => false,
        };
        if !self.fits(key) {
            return false;
        }
        match self {
            // ring refuses moduli under 2048 bits for all of these.
            Algorithm::Rs256 => rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA256),
            Algorithm::Rs384 => rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA384),
            Algorithm::Rs512 => rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA512),
            Algorithm::Ps256 => rsa(&ring_sig::RSA_PSS_2048_8192_SHA256),
            Algorithm::Ps384 => rsa(&ring_sig::RSA_PSS_2048_8192_SHA384),
            Algorithm::Ps512 => rsa(&ring_sig::RSA_PSS_2048_8192_SHA512),
            // JWS ECDSA signatures are the fixed-width `r || s` (RFC 7518 §3.4), not ASN.1.
            Algorithm::Es256 => point(&ring_sig::ECDSA_P256_SHA256_FIXED),
            Algorithm::Es384 => point(&ring_sig::ECDSA_P384_SHA384_FIXED),
            Algorithm::EdDsa => point(&ring_sig::ED25519),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a supported asymmetric JWS algorithm (`none`, `HS256`, a typo, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a supported asymmetric JWS algorithm (RS256/384/512, PS256/384/512, ES256/384, EdDSA; never \"none\" or HS*)")]
pub struct UnsupportedAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnsupportedAlgorithm;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Algorithm::from_name(name).ok_or_else(|| UnsupportedAlgorithm(name.to_owned()))
    }
}

/// Where the JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksLocation {
    /// `iam.jwt.jwks_url`: `https://`, or `http://` on a loopback host only.
    Url(String),
    /// `iam.jwt.jwks_file`, already resolved against the config file's directory.
    File(PathBuf),
}

/// How bearer JWTs are verified (`[iam.jwt]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    pub jwks: JwksLocation,
    /// Expected `iss`, compared exactly.
    pub issuer: String,
    /// Expected member of `aud`, compared exactly.
    pub audience: String,
    /// Claim that holds the CloudSSO `UserId` ([`DEFAULT_USER_ID_CLAIM`]).
    pub user_id_claim: String,
    /// Accepted `alg`s ([`DEFAULT_ALGORITHMS`]).
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`/`nbf` ([`DEFAULT_LEEWAY`]).
    pub leeway: Duration,
}

impl JwtSettings {
    fn validate(&self) -> anyhow::Result<()> {
        for (key, value) in [
            ("iam.jwt.issuer", &self.issuer),
            ("iam.jwt.audience", &self.audience),
            ("iam.jwt.user_id_claim", &self.user_id_claim),
        ] {
            if value.is_empty() {
                bail!("{key} must not be empty");
            }
        }
        if self.algorithms.is_empty() {
            bail!("iam.jwt.algorithms must name at least one algorithm");
        }
        Ok(())
    }
}

/// What a verified token says about its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    /// The user id claim: the CloudSSO `UserId`.
    pub user_id: String,
    /// `preferred_username`, else `name`, when present as a string.
    pub user_name: Option<String>,
    /// `exp`: no cache entry may outlive it.
    pub expires_at: SystemTime,
    /// `amr` (RFC 8176 authentication methods), empty when absent.
    pub amr: Vec<String>,
}

/// Why a token was refused. Never carries any part of the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a compact JWS: {0}")]
    Malformed(&'static str),
    #[error("the header names critical extensions (crit)")]
    Critical,
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("no key with the token's kid in the JWKS")]
    UnknownKey,
    #[error("no key in the JWKS fits the token's algorithm")]
    NoFittingKey,
    #[error("signature does not verify")]
    BadSignature,
    #[error("wrong or missing issuer")]
    Issuer,
    #[error("wrong or missing audience")]
    Audience,
    #[error("expired")]
    Expired,
    #[error("not valid yet (nbf)")]
    NotYetValid,
    #[error("claim {0}: {1}")]
    Claim(&'static str, &'static str),
    #[error("user id claim: {0}")]
    UserId(&'static str),
}

/// Public key material of one JWK.
#[derive(Clone, PartialEq, Eq)]
enum KeyMaterial {
    /// Big-endian modulus and exponent, leading zero bytes stripped (ring wants them minimal).
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed point `0x04 || x || y`.
    Ec {
        curve: Curve,
        point: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }
}

/// One usable signing key of a JWKS.
#[derive(Clone, PartialEq, Eq)]
struct Jwk {
    kid: Option<String>,
    /// The JWK's own `alg`: when present, the only algorithm this key verifies.
    alg: Option<Algorithm>,
    material: KeyMaterial,
}

impl Jwk {
    fn verifies(&self, alg: Algorithm) -> bool {
        alg.fits(&self.material) && self.alg.is_none_or(|own| own == alg)
    }
}

/// The usable signing keys of a JWKS document.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JwkSet {
    keys: Vec<Jwk>,
}

impl fmt::Debug for JwkSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwkSet")
            .field("kids", &self.kids().collect::<Vec<_>>())
            .finish()
    }
}

/// A JWKS document that cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWKS document: {0}")]
    NotJwks(String),
    #[error("no usable signing key ({0} keys skipped)")]
    NoUsableKey(usize),
}

/// The members of a JWK the gateway reads; others (`x5c`, `x5t`, …) are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl JwkSet {
    /// Parses a JWKS (RFC 7517 §5). Keys that cannot verify signatures — encryption keys,
    /// symmetric keys, unknown types or algorithms, malformed members, RSA under 2048 bits — are
    /// skipped (and logged), so that one odd key does not lock everyone out; a document with no
    /// usable key at all is an error.
    pub fn parse(document: &[u8]) -> Result<JwkSet, JwksError> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<Value>,
        }
        let document: Document =
            serde_json::from_slice(document).map_err(|err| JwksError::NotJwks(err.to_string()))?;
        let mut keys = Vec::new();
        let mut skipped = 0;
        for (index, raw) in document.keys.into_iter().enumerate() {
            match serde_json::from_value::<RawJwk>(raw)
                .map_err(|_| "members of the wrong type")
                .and_then(parse_jwk)
            {
                Ok(key) if keys.len() < MAX_KEYS => keys.push(key),
                Ok(_) => {
                    skipped += 1;
                    tracing::warn!(index, "JWKS key skipped: more than {MAX_KEYS} keys");
                }
                Err(reason) => {
                    skipped += 1;
                    tracing::debug!(index, reason, "JWKS key skipped");
                }
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey(skipped));
        }
        Ok(JwkSet { keys })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no usable key (never true for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `kid`s of the usable keys (`""` for keys without one).
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|key| key.kid.as_deref().unwrap_or(""))
    }
}

fn parse_jwk(raw: RawJwk) -> Result<Jwk, &'static str> {
    if raw.use_.as_deref().is_some_and(|use_| use_ != "sig") {
        return Err("not a signature key (use)");
    }
    if raw
        .key_ops
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
    {
        return Err("not a verification key (key_ops)");
    }
    let alg = match raw.alg.as_deref() {
        None => None,
        Some(name) => Some(Algorithm::from_name(name).ok_or("unsupported alg")?),
    };
    let material = match raw.kty.as_str() {
        "RSA" => {
            let n = strip_leading_zeros(b64(raw.n.as_deref().ok_or("RSA key without n")?)?);
            let e = strip_leading_zeros(b64(raw.e.as_deref().ok_or("RSA key without e")?)?);
            if n.len() < 256 {
                return Err("RSA modulus under 2048 bits");
            }
            if e.is_empty() {
                return Err("RSA exponent is zero");
            }
            KeyMaterial::Rsa { n, e }
        }
        "EC" => {
            let curve = match raw.crv.as_deref() {
                Some("P-256") => Curve::P256,
                Some("P-384") => Curve::P384,
                _ => return Err("unsupported EC curve"),
            };
            let x = b64(raw.x.as_deref().ok_or("EC key without x")?)?;
            let y = b64(raw.y.as_deref().ok_or("EC key without y")?)?;
            if x.len() != curve.coordinate_len() || y.len() != curve.coordinate_len() {
                return Err("EC coordinate of the wrong length");
            }
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            KeyMaterial::Ec { curve, point }
        }
        "OKP" => {
            if raw.crv.as_deref() != Some("Ed25519") {
                return Err("unsupported OKP curve");
            }
            let x = b64(raw.x.as_deref().ok_or("OKP key without x")?)?;
            if x.len() != ring_sig::ED25519_PUBLIC_KEY_LEN {
                return Err("Ed25519 key of the wrong length");
            }
            KeyMaterial::Ed25519 { x }
        }
        "oct" => return Err("symmetric keys are never used"),
        _ => return Err("unsupported kty"),
    };
    if alg.is_some_and(|alg| !alg.fits(&material)) {
        return Err("alg does not fit the key type");
    }
    Ok(Jwk {
        kid: raw.kid,
        alg,
        material,
    })
}

fn b64(text: &str) -> Result<Vec<u8>, &'static str> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| "member is not base64url")
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

/// The JOSE header members the gateway reads. `jwk`, `jku`, `x5u` and `x5c` are deliberately
/// not among them: keys come from the configured JWKS only.
struct Header {
    alg: String,
    kid: Option<String>,
}

/// Verifies `token` against `keys` and `settings` at time `now`. Pure: no I/O, no clock.
///
/// [`JwtError::UnknownKey`] is returned only for a token that names a `kid` absent from `keys`
/// and passes every other check that does not need the key, so that the caller may refresh
/// the JWKS for it.
pub fn verify(
    token: &str,
    keys: &JwkSet,
    settings: &JwtSettings,
    now: SystemTime,
) -> Result<VerifiedJwt, JwtError> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three parts"));
    };
    let header = parse_header(header_b64)?;
    let alg = Algorithm::from_name(&header.alg)
        .filter(|alg| settings.algorithms.contains(alg))
        .ok_or(JwtError::AlgorithmNotAllowed)?;
    let claims = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    let claims: Map<String, Value> = serde_json::from_slice(&claims)
        .map_err(|_| JwtError::Malformed("payload is not a JSON object"))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwtError::Malformed("signature is not base64url"))?;

    let verified = check_claims(&claims, settings, now)?;

    let candidates: Vec<&Jwk> = match &header.kid {
        Some(kid) => {
            let named: Vec<&Jwk> = keys
                .keys
                .iter()
                .filter(|key| key.kid.as_deref() == Some(kid.as_str()))
                .collect();
            if named.is_empty() {
                return Err(JwtError::UnknownKey);
            }
            named
        }
        None => keys.keys.iter().collect(),
    };
    let fitting: Vec<&Jwk> = candidates
        .into_iter()
        .filter(|key| key.verifies(alg))
        .collect();
    if fitting.is_empty() {
        return Err(JwtError::NoFittingKey);
    }
    // The signing input is the two first parts exactly as received (RFC 7515 §5.2).
    let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
    if fitting
        .iter()
        .any(|key| alg.verify(&key.material, signing_input.as_bytes(), &signature))
    {
        Ok(verified)
    } else {
        Err(JwtError::BadSignature)
    }
}

fn parse_header(header_b64: &str) -> Result<Header, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let header: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|_| JwtError::Malformed("header is not a JSON object"))?;
    // RFC 7515 §4.1.11: extensions marked critical must be understood; none are.
    if header.contains_key("crit") {
        return Err(JwtError::Critical);
    }
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.clone(),
        _ => return Err(JwtError::Malformed("header without alg")),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed("kid is not a string")),
    };
    Ok(Header { alg, kid })
}

fn check_claims(
    claims: &Map<String, Value>,
    settings: &JwtSettings,
    now: SystemTime,
) -> Result<VerifiedJwt, JwtError> {
    match claims.get("iss") {
        Some(Value::String(iss)) if *iss == settings.issuer => {}
        _ => return Err(JwtError::Issuer),
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => *aud == settings.audience,
        Some(Value::Array(auds)) => auds
            .iter()
            .any(|aud| aud.as_str() == Some(settings.audience.as_str())),
        _ => false,
    };
    if !audience_ok {
        return Err(JwtError::Audience);
    }
    let expires_at = match claims.get("exp") {
        Some(exp) => numeric_date(exp).ok_or(JwtError::Claim("exp", "not a NumericDate"))?,
        None => return Err(JwtError::Claim("exp", "missing")),
    };
    // RFC 7519 §4.1.4: the current time must be before `exp`.
    if expires_at
        .checked_add(settings.leeway)
        .is_some_and(|limit| now >= limit)
    {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let not_before = numeric_date(nbf).ok_or(JwtError::Claim("nbf", "not a NumericDate"))?;
        if now.checked_add(settings.leeway).unwrap_or(now) < not_before {
            return Err(JwtError::NotYetValid);
        }
    }
    let user_id = match claims.get(&settings.user_id_claim) {
        Some(Value::String(id)) if id.is_empty() => return Err(JwtError::UserId("empty")),
        Some(Value::String(id)) if id.len() > MAX_USER_ID_BYTES => {
            return Err(JwtError::UserId("too long"))
        }
        Some(Value::String(id)) if id.chars().any(char::is_control) => {
            return Err(JwtError::UserId("control characters"))
        }
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err(JwtError::UserId("not a string")),
        None => return Err(JwtError::UserId("missing")),
    };
    let user_name = ["preferred_username", "name"]
        .iter()
        .find_map(|claim| claims.get(*claim).and_then(Value::as_str))
        .filter(|name| !name.is_empty())
        .map(str::to_owned);
    let amr = match claims.get("amr") {
        Some(Value::Array(methods)) => methods
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    Ok(VerifiedJwt {
        user_id,
        user_name,
        expires_at,
        amr,
    })
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly fractional, never negative.
fn numeric_date(value: &Value) -> Option<SystemTime> {
    let seconds = value.as_f64().filter(|s| s.is_finite() && *s >= 0.0)?;
    UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(seconds).ok()?)
}

/// How the JWKS is kept fresh; [`JwksOptions::default`] is what production uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksOptions {
    /// Background reload period after a successful load.
    pub refresh_interval: Duration,
    /// Least time between on-demand refreshes; also the retry delay after a failed load.
    pub min_refresh_gap: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        JwksOptions {
            refresh_interval: JWKS_REFRESH_INTERVAL,
            min_refresh_gap: JWKS_MIN_REFRESH_GAP,
        }
    }
}

/// Why a JWKS load failed; kept so that callers waiting on a failed load get the same error.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LoadFailure {
    Timeout,
    Transport(String),
    Status(u16),
    BadDocument(String),
    File(String),
}

impl LoadFailure {
    fn to_iam_error(&self) -> IamError {
        match self {
            LoadFailure::Timeout => IamError::Timeout { api: API },
            LoadFailure::Transport(detail) => IamError::Transport {
                api: API,
                detail: detail.clone(),
            },
            LoadFailure::Status(status) => IamError::Status {
                api: API,
                status: *status,
                code: String::new(),
            },
            LoadFailure::BadDocument(detail) | LoadFailure::File(detail) => IamError::BadResponse {
                api: API,
                detail: detail.clone(),
            },
        }
    }

    /// The `outcome` metric label of a failed fetch.
    fn outcome(&self) -> &'static str {
        match self {
            LoadFailure::Timeout => "timeout",
            LoadFailure::Transport(_) => "transport_error",
            LoadFailure::Status(status) => match status {
                401 => "unauthorized",
                403 => "forbidden",
                404 => "not_found",
                429 => "throttled",
                500..=599 => "server_error",
                _ => "bad_response",
            },
            LoadFailure::BadDocument(_) | LoadFailure::File(_) => "bad_response",
        }
    }
}

/// The current keys and how they came about.
#[derive(Default)]
struct KeyState {
    /// The last good set; kept when a later load fails.
    keys: Option<Arc<JwkSet>>,
    /// Completed loads (successful or not); lets a waiter see that a load ran while it waited.
    generation: u64,
    /// The failure of the latest load, `None` when it succeeded (or none ran yet).
    last_failure: Option<LoadFailure>,
    /// When the latest load completed; `None` before the first.
    last_load: Option<Instant>,
}

/// Shared by the [`JwksSource`] handle and its background task.
struct Inner {
    location: JwksLocation,
    /// The location, checked and parsed.
    origin: Origin,
    client: HttpsClient,
    timeout: Duration,
    options: JwksOptions,
    metrics: Arc<Metrics>,
    state: RwLock<KeyState>,
    /// Serialises loads (one in flight at a time, background or on demand) and remembers when
    /// the on-demand ones ran, for their rate limit.
    gate: tokio::sync::Mutex<Gate>,
}

/// Where the keys are loaded from.
enum Origin {
    Url(Uri),
    File(PathBuf),
}

/// When on-demand loads last ran.
#[derive(Default)]
struct Gate {
    /// The last refresh for an unknown `kid`.
    unknown_kid: Option<Instant>,
    /// The last load because no key was loaded at all.
    no_keys: Option<Instant>,
}

impl Gate {
    fn recent(at: Option<Instant>, gap: Duration) -> bool {
        at.is_some_and(|at| at.elapsed() < gap)
    }
}

/// The configured JWKS, kept fresh. Dropping it stops its background task.
pub struct JwksSource {
    inner: Arc<Inner>,
    /// The background refresh task, started on the first use inside a tokio runtime.
    refresher: OnceLock<tokio::task::AbortHandle>,
}

impl fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksSource")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

impl Drop for JwksSource {
    fn drop(&mut self) {
        if let Some(task) = self.refresher.get() {
            task.abort();
        }
    }
}

impl JwksSource {
    /// A file source is read (and must parse) right away, so that a broken file is a start-up
    /// error naming it; a URL is only checked, and fetched in the background. Inside a tokio
    /// runtime the background refresh starts at once, otherwise on first use.
    pub fn new(
        location: JwksLocation,
        client: HttpsClient,
        timeout: Duration,
        options: JwksOptions,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<JwksSource> {
        let mut state = KeyState::default();
        let origin = match &location {
            JwksLocation::Url(url) => Origin::Url(validate_url(url)?),
            JwksLocation::File(path) => {
                let keys = read_file(path)
                    .map_err(|failure| anyhow::anyhow!("{}", describe(&failure)))
                    .with_context(|| format!("iam.jwt.jwks_file {}", path.display()))?;
                state.keys = Some(Arc::new(keys));
                state.last_load = Some(Instant::now());
                Origin::File(path.clone())
            }
        };
        let source = JwksSource {
            inner: Arc::new(Inner {
                location,
                origin,
                client,
                timeout,
                options,
                metrics,
                state: RwLock::new(state),
                gate: tokio::sync::Mutex::new(Gate::default()),
            }),
            refresher: OnceLock::new(),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            source.start_refresher();
        }
        Ok(source)
    }

    fn start_refresher(&self) {
        self.refresher
            .get_or_init(|| tokio::spawn(refresh_loop(Arc::downgrade(&self.inner))).abort_handle());
    }

    /// The current keys and the load generation they come from. With no key loaded yet (the
    /// first fetch has not finished, or failed), loads them now — unless such a load ran within
    /// [`JwksOptions::min_refresh_gap`] — and answers the load's failure if there still are none.
    pub async fn keys(&self) -> Result<(Arc<JwkSet>, u64), IamError> {
        self.start_refresher();
        let seen = {
            let state = self.inner.state();
            if let Some(keys) = &state.keys {
                return Ok((keys.clone(), state.generation));
            }
            state.generation
        };
        {
            let mut gate = self.inner.gate.lock().await;
            // A load that completed while this call waited for the gate is as good as its own.
            if self.inner.state().generation == seen
                && !Gate::recent(gate.no_keys, self.inner.options.min_refresh_gap)
            {
                gate.no_keys = Some(Instant::now());
                self.inner.load().await;
            }
        }
        let state = self.inner.state();
        match (&state.keys, &state.last_failure) {
            (Some(keys), _) => Ok((keys.clone(), state.generation)),
            (None, Some(failure)) => Err(failure.to_iam_error()),
            (None, None) => Err(IamError::Transport {
                api: API,
                detail: "JWKS not loaded yet".to_owned(),
            }),
        }
    }

    /// Reloads the JWKS for a token whose `kid` is unknown in generation `seen` — unless a load
    /// completed since (then its result is used), or a refresh for an unknown `kid` ran within
    /// [`JwksOptions::min_refresh_gap`] (then nothing is fetched).
    pub async fn refresh(&self, seen: u64) {
        let mut gate = self.inner.gate.lock().await;
        if self.inner.state().generation != seen {
            return;
        }
        if Gate::recent(gate.unknown_kid, self.inner.options.min_refresh_gap) {
            tracing::debug!("JWKS refresh for an unknown kid skipped: rate-limited");
            return;
        }
        gate.unknown_kid = Some(Instant::now());
        self.inner.load().await;
    }

    /// Whether the latest load succeeded.
    pub fn last_load_ok(&self) -> bool {
        self.inner.state().last_failure.is_none()
    }

    /// The failure of the latest load as an IAM error, if it failed.
    fn last_failure(&self) -> Option<IamError> {
        self.inner
            .state()
            .last_failure
            .as_ref()
            .map(LoadFailure::to_iam_error)
    }
}

impl Inner {
    fn state(&self) -> RwLockReadGuard<'_, KeyState> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads the JWKS once and records the result. The caller holds the gate.
    async fn load(&self) {
        let result = match &self.origin {
            Origin::Url(url) => self.fetch(url).await,
            Origin::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file(&path))
                    .await
                    .unwrap_or_else(|err| Err(LoadFailure::File(err.to_string())))
            }
        };
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.generation += 1;
        state.last_load = Some(Instant::now());
        match result {
            Ok(keys) => {
                if state.keys.as_deref() != Some(&keys) {
                    tracing::info!(
                        location = %self.describe_location(),
                        keys = keys.len(),
                        kids = ?keys.kids().map(printable).collect::<Vec<_>>(),
                        "JWKS loaded"
                    );
                }
                state.keys = Some(Arc::new(keys));
                state.last_failure = None;
            }
            Err(failure) => {
                tracing::warn!(
                    location = %self.describe_location(),
                    error = %describe(&failure),
                    keeping_previous = state.keys.is_some(),
                    "JWKS load failed"
                );
                state.last_failure = Some(failure);
            }
        }
    }

    /// How long until the background task should load again: at once before the first load,
    /// `refresh_interval` after a success, `min_refresh_gap` after a failure — counted from the
    /// latest load, whoever ran it.
    fn next_load_in(&self) -> Duration {
        let state = self.state();
        let Some(last) = state.last_load else {
            return Duration::ZERO;
        };
        let period = if state.last_failure.is_none() {
            self.options.refresh_interval
        } else {
            self.options.min_refresh_gap
        };
        (last + period).saturating_duration_since(Instant::now())
    }

    fn describe_location(&self) -> String {
        match &self.location {
            JwksLocation::Url(url) => url.clone(),
            JwksLocation::File(path) => path.display().to_string(),
        }
    }

    /// One GET of the JWKS URL within the timeout, counted as api `jwks`.
    async fn fetch(&self, url: &Uri) -> Result<JwkSet, LoadFailure> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(url.clone())
            .header(ACCEPT, "application/jwk-set+json, application/json")
            .header(USER_AGENT, concat!("mfa-gate/", env!("CARGO_PKG_VERSION")))
            .body(Empty::new())
            .map_err(|err| LoadFailure::Transport(err.to_string()))?;
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Err(_) => Err(LoadFailure::Timeout),
            Ok(Err(failure)) => Err(failure),
            Ok(Ok((status, _))) if !status.is_success() => {
                Err(LoadFailure::Status(status.as_u16()))
            }
            Ok(Ok((_, body))) => {
                JwkSet::parse(&body).map_err(|err| LoadFailure::BadDocument(err.to_string()))
            }
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(failure) => failure.outcome(),
        };
        self.metrics
            .observe_iam(API, outcome, started.elapsed().as_secs_f64());
        result
    }

    async fn exchange(
        &self,
        request: Request<Empty<Bytes>>,
    ) -> Result<(StatusCode, Bytes), LoadFailure> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| LoadFailure::Transport(error_chain(&err)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|err| {
                if err.downcast_ref::<LengthLimitError>().is_some() {
                    LoadFailure::BadDocument(format!("over {MAX_JWKS_BYTES} bytes"))
                } else {
                    LoadFailure::Transport(error_chain(err.as_ref()))
                }
            })?
            .to_bytes();
        Ok((status, body))
    }
}

/// Reloads in the background until the source is dropped (see [`Inner::next_load_in`]). Only
/// a weak reference is held while sleeping, so dropping the source ends the task.
async fn refresh_loop(inner: Weak<Inner>) {
    loop {
        let wait = match inner.upgrade() {
            Some(strong) => strong.next_load_in(),
            None => return,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            continue;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let _gate = strong.gate.lock().await;
        // An on-demand load may have run while this waited for the gate.
        if strong.next_load_in().is_zero() {
            strong.load().await;
        }
    }
}

fn read_file(path: &std::path::Path) -> Result<JwkSet, LoadFailure> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|err| LoadFailure::File(err.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| LoadFailure::File(err.to_string()))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(LoadFailure::File(format!("over {MAX_JWKS_BYTES} bytes")));
    }
    JwkSet::parse(&bytes).map_err(|err| LoadFailure::BadDocument(err.to_string()))
}

fn describe(failure: &LoadFailure) -> String {
    match failure {
        LoadFailure::Timeout => "timed out".to_owned(),
        LoadFailure::Transport(detail) => detail.clone(),
        LoadFailure::Status(status) => format!("HTTP status {status}"),
        LoadFailure::BadDocument(detail) | LoadFailure::File(detail) => detail.clone(),
    }
}

/// `https://…`, or `http://` to a loopback host (tests, a local IdP sidecar); no credentials.
fn validate_url(raw: &str) -> anyhow::Result<Uri> {
    let uri: Uri = raw
        .parse()
        .with_context(|| format!("iam.jwt.jwks_url {raw:?} is not a URL"))?;
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => {}
        Some("http") if is_loopback(host) => {}
        _ => bail!("iam.jwt.jwks_url {raw:?} must be https:// (http:// only on loopback)"),
    }
    if uri
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        bail!("iam.jwt.jwks_url {raw:?} must not carry credentials");
    }
    Ok(uri)
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Visible ASCII of bounded length, for logging values that came from outside.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// Why a token could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The token is not valid: a definite answer (401).
    #[error("JWT rejected: {0}")]
    Rejected(JwtError),
    /// No keys to decide with (JWKS never loaded, or a refresh for an unknown `kid` failed).
    #[error(transparent)]
    Unavailable(IamError),
}

/// Verifies bearer JWTs against the configured settings and JWKS.
#[derive(Debug)]
pub struct JwtVerifier {
    settings: JwtSettings,
    jwks: JwksSource,
}

impl JwtVerifier {
    /// Checks the settings and sets up the JWKS source (see [`JwksSource::new`]).
    pub fn new(
        settings: JwtSettings,
        client: HttpsClient,
        timeout: Duration,
        options: JwksOptions,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<JwtVerifier> {
        settings.validate()?;
        let jwks = JwksSource::new(settings.jwks.clone(), client, timeout, options, metrics)?;
        Ok(JwtVerifier { settings, jwks })
    }

    /// The JWKS source.
    pub fn jwks(&self) -> &JwksSource {
        &self.jwks
    }

    /// Verifies a token now. An unknown `kid` makes the JWKS refresh (rate-limited) and the
    /// token be tried once more; if the `kid` is still unknown the token is rejected — or, when
    /// that refresh failed, the answer is "unavailable", since the key may well exist.
    pub async fn verify(&self, token: &str) -> Result<VerifiedJwt, VerifyError> {
        let (keys, generation) = self.jwks.keys().await.map_err(VerifyError::Unavailable)?;
        match verify(token, &keys, &self.settings, SystemTime::now()) {
            Err(JwtError::UnknownKey) => {}
            other => return other.map_err(VerifyError::Rejected),
        }
        tracing::debug!("JWT names an unknown kid; refreshing the JWKS");
        self.jwks.refresh(generation).await;
        let (keys, _) = self.jwks.keys().await.map_err(VerifyError::Unavailable)?;
        match verify(token, &keys, &self.settings, SystemTime::now()) {
            Err(JwtError::UnknownKey) => match self.jwks.last_failure() {
                Some(err) => Err(VerifyError::Unavailable(err)),
                None => Err(VerifyError::Rejected(JwtError::UnknownKey)),
            },
            other => other.map_err(VerifyError::Rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::cloudsso_sim::{encode_jwt, SigningKey};
    use serde_json::json;

    const ISS: &str = "https://idp.example.com";

    /// A change to a token's claims.
    type Edit = Box<dyn Fn(&mut Value)>;
    const AUD: &str = "mfa-gate";

    fn settings(algorithms: &[Algorithm]) -> JwtSettings {
        JwtSettings {
            jwks: JwksLocation::File("/nonexistent".into()),
            issuer: ISS.into(),
            audience: AUD.into(),
            user_id_claim: "sub".into(),
            algorithms: algorithms.to_vec(),
            leeway: DEFAULT_LEEWAY,
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "u-00q8wbq42wiltcrk****",
            "preferred_username": "alice",
            "name": "Alice A.",
            "iat": 1_700_000_000 - 60,
            "nbf": 1_700_000_000 - 60,
            "exp": 1_700_000_000 + 3600,
            "amr": ["pwd", "otp"],
        })
    }

    fn set_of(keys: &[&SigningKey]) -> JwkSet {
        let doc = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
        JwkSet::parse(doc.to_string().as_bytes()).unwrap()
    }

    fn es() -> SigningKey {
        SigningKey::generate_es256("es-1")
    }

    fn rs() -> SigningKey {
        SigningKey::rsa_test_key("rs-1")
    }

    #[test]
    fn algorithm_names() {
        for alg in Algorithm::ALL {
            assert_eq!(alg.as_str().parse::<Algorithm>(), Ok(alg));
        }
        for bad in [
            "none", "None", "HS256", "HS384", "HS512", "rs256", "", "ES512",
        ] {
            assert!(bad.parse::<Algorithm>().is_err(), "{bad}");
        }
        assert!(UnsupportedAlgorithm("HS256".into())
            .to_string()
            .contains("never \"none\" or HS*"));
    }

    #[test]
    fn good_tokens_verify() {
        let (es, rs) = (es(), rs());
        let keys = set_of(&[&es, &rs]);
        let s = settings(&DEFAULT_ALGORITHMS);
        for key in [&es, &rs] {
            let verified = verify(&key.mint(&claims()), &keys, &s, now()).unwrap();
            assert_eq!(
                verified,
                VerifiedJwt {
                    user_id: "u-00q8wbq42wiltcrk****".into(),
                    user_name: Some("alice".into()),
                    expires_at: UNIX_EPOCH + Duration::from_secs(1_700_003_600),
                    amr: vec!["pwd".into(), "otp".into()],
                }
            );
        }
    }

    #[test]
    fn claims_are_checked() {
        let key = es();
        let keys = set_of(&[&key]);
        let s = settings(&DEFAULT_ALGORITHMS);
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut c = claims();
            edit(&mut c);
            verify(&key.mint(&c), &keys, &s, now())
        };
        let cases: Vec<(&str, Edit, Result<(), JwtError>)> = vec![
            (
                "expired",
                Box::new(|c| c["exp"] = json!(1_700_000_000 - 31)),
                Err(JwtError::Expired),
            ),
            (
                "exp at leeway edge",
                Box::new(|c| c["exp"] = json!(1_700_000_000 - 30)),
                Err(JwtError::Expired),
            ),
            (
                "exp within leeway",
                Box::new(|c| c["exp"] = json!(1_700_000_000 - 29)),
                Ok(()),
            ),
            (
                "fractional exp",
                Box::new(|c| c["exp"] = json!(1_700_000_100.5)),
                Ok(()),
            ),
            (
                "no exp",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                Err(JwtError::Claim("exp", "missing")),
            ),
            (
                "string exp",
                Box::new(|c| c["exp"] = json!("1800000000")),
                Err(JwtError::Claim("exp", "not a NumericDate")),
            ),
            (
                "negative exp",
                Box::new(|c| c["exp"] = json!(-1)),
                Err(JwtError::Claim("exp", "not a NumericDate")),
            ),
            (
                "nbf in future",
                Box::new(|c| c["nbf"] = json!(1_700_000_000 + 31)),
                Err(JwtError::NotYetValid),
            ),
            (
                "nbf within leeway",
                Box::new(|c| c["nbf"] = json!(1_700_000_000 + 30)),
                Ok(()),
            ),
            (
                "no nbf",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("nbf");
                }),
                Ok(()),
            ),
            (
                "wrong iss",
                Box::new(|c| c["iss"] = json!("https://evil.example.com")),
                Err(JwtError::Issuer),
            ),
            (
                "iss with slash",
                Box::new(|c| c["iss"] = json!("https://idp.example.com/")),
                Err(JwtError::Issuer),
            ),
            (
                "no iss",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("iss");
                }),
                Err(JwtError::Issuer),
            ),
            (
                "wrong aud",
                Box::new(|c| c["aud"] = json!("other")),
                Err(JwtError::Audience),
            ),
            (
                "aud array",
                Box::new(|c| c["aud"] = json!(["other", AUD])),
                Ok(()),
            ),
            (
                "aud array without",
                Box::new(|c| c["aud"] = json!(["other"])),
                Err(JwtError::Audience),
            ),
            (
                "aud empty array",
                Box::new(|c| c["aud"] = json!([])),
                Err(JwtError::Audience),
            ),
            (
                "aud number",
                Box::new(|c| c["aud"] = json!(1)),
                Err(JwtError::Audience),
            ),
            (
                "no aud",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
                Err(JwtError::Audience),
            ),
            (
                "no sub",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("sub");
                }),
                Err(JwtError::UserId("missing")),
            ),
            (
                "numeric sub",
                Box::new(|c| c["sub"] = json!(42)),
                Err(JwtError::UserId("not a string")),
            ),
            (
                "empty sub",
                Box::new(|c| c["sub"] = json!("")),
                Err(JwtError::UserId("empty")),
            ),
            (
                "control sub",
                Box::new(|c| c["sub"] = json!("u-1\n")),
                Err(JwtError::UserId("control characters")),
            ),
            (
                "long sub",
                Box::new(|c| c["sub"] = json!("u".repeat(257))),
                Err(JwtError::UserId("too long")),
            ),
        ];
        for (name, edit, expected) in cases {
            assert_eq!(with(&*edit).map(|_| ()), expected, "{name}");
        }
    }

    #[test]
    fn user_name_and_custom_user_id_claim() {
        let key = es();
        let keys = set_of(&[&key]);
        let mut s = settings(&DEFAULT_ALGORITHMS);
        let mut c = claims();
        c.as_object_mut().unwrap().remove("preferred_username");
        let v = verify(&key.mint(&c), &keys, &s, now()).unwrap();
        assert_eq!(v.user_name.as_deref(), Some("Alice A."));
        c.as_object_mut().unwrap().remove("name");
        c.as_object_mut().unwrap().remove("amr");
        let v = verify(&key.mint(&c), &keys, &s, now()).unwrap();
        assert_eq!((v.user_name, v.amr), (None, vec![]));

        s.user_id_claim = "cloudsso_user_id".into();
        c["cloudsso_user_id"] = json!("u-custom");
        let v = verify(&key.mint(&c), &keys, &s, now()).unwrap();
        assert_eq!(v.user_id, "u-custom");
    }

    #[test]
    fn malformed_tokens() {
        let key = es();
        let keys = set_of(&[&key]);
        let s = settings(&DEFAULT_ALGORITHMS);
        let good = key.mint(&claims());
        let parts: Vec<&str> = good.split('.').collect();
        for (token, expected) in [
            ("", JwtError::Malformed("not three parts")),
            ("a.b", JwtError::Malformed("not three parts")),
            (
                &format!("{good}.x") as &str,
                JwtError::Malformed("not three parts"),
            ),
            (
                &format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
                JwtError::Malformed("header is not base64url"),
            ),
            (
                &format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
                JwtError::Malformed("signature is not base64url"),
            ),
            (
                &format!("e30.{}.{}", parts[1], parts[2]),
                JwtError::Malformed("header without alg"),
            ),
            (
                &format!("W10.{}.{}", parts[1], parts[2]),
                JwtError::Malformed("header is not a JSON object"),
            ),
            (
                &format!("{}.W10.{}", parts[0], parts[2]),
                JwtError::Malformed("payload is not a JSON object"),
            ),
        ] {
            assert_eq!(verify(token, &keys, &s, now()), Err(expected), "{token}");
        }
    }

    #[test]
    fn bad_signatures_are_refused() {
        let key = es();
        let other = SigningKey::generate_es256("es-1");
        let keys = set_of(&[&key]);
        let s = settings(&DEFAULT_ALGORITHMS);
        // Same kid, another key.
        assert_eq!(
            verify(&other.mint(&claims()), &keys, &s, now()),
            Err(JwtError::BadSignature)
        );
        // A claim changed after signing.
        let good = key.mint(&claims());
        let parts: Vec<&str> = good.split('.').collect();
        let mut c = claims();
        c["sub"] = json!("u-admin");
        let forged_payload = URL_SAFE_NO_PAD.encode(c.to_string());
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(
            verify(&forged, &keys, &s, now()),
            Err(JwtError::BadSignature)
        );
        // Empty signature.
        let stripped = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(
            verify(&stripped, &keys, &s, now()),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn alg_none_and_hmac_confusion_are_refused() {
        let rsa = rs();
        let keys = set_of(&[&rsa]);
        let s = settings(&Algorithm::ALL);
        let none = encode_jwt(&json!({"alg": "none", "typ": "JWT"}), &claims(), b"");
        assert_eq!(
            verify(&none, &keys, &s, now()),
            Err(JwtError::AlgorithmNotAllowed)
        );
        let none = encode_jwt(&json!({"alg": "none", "kid": "rs-1"}), &claims(), b"sig");
        assert_eq!(
            verify(&none, &keys, &s, now()),
            Err(JwtError::AlgorithmNotAllowed)
        );

        // HS256 keyed with the RSA public key, in every form an attacker could guess.
        let jwk = rsa.jwk();
        for secret in [
            jwk.to_string().into_bytes(),
            rsa.public_modulus(),
            rsa.public_key_bytes(),
        ] {
            for alg in ["HS256", "HS384", "HS512"] {
                let header = json!({"alg": alg, "kid": "rs-1", "typ": "JWT"});
                let input = format!(
                    "{}.{}",
                    URL_SAFE_NO_PAD.encode(header.to_string()),
                    URL_SAFE_NO_PAD.encode(claims().to_string())
                );
                let tag = ring::hmac::sign(
                    &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
                    input.as_bytes(),
                );
                let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
                assert_eq!(
                    verify(&token, &keys, &s, now()),
                    Err(JwtError::AlgorithmNotAllowed)
                );
            }
        }
    }

    #[test]
    fn algorithm_allow_list_and_key_fit() {
        let (es, rs) = (es(), rs());
        let keys = set_of(&[&es, &rs]);
        // RS256 token, only ES256 allowed.
        let only_es = settings(&[Algorithm::Es256]);
        assert_eq!(
            verify(&rs.mint(&claims()), &keys, &only_es, now()),
            Err(JwtError::AlgorithmNotAllowed)
        );
        assert!(verify(&es.mint(&claims()), &keys, &only_es, now()).is_ok());

        // A token claiming ES256 but naming the RSA key's kid: the key does not fit.
        let all = settings(&Algorithm::ALL);
        let header = json!({"alg": "ES256", "kid": "rs-1"});
        let token = encode_jwt(&header, &claims(), &es.sign_input(&header, &claims()));
        assert_eq!(
            verify(&token, &keys, &all, now()),
            Err(JwtError::NoFittingKey)
        );

        // A token claiming RS384 against a key whose JWK says RS256.
        let header = json!({"alg": "RS384", "kid": "rs-1"});
        let token = encode_jwt(&header, &claims(), b"whatever");
        assert_eq!(
            verify(&token, &keys, &all, now()),
            Err(JwtError::NoFittingKey)
        );

        // `crit` is refused even with a good signature.
        let header = json!({"alg": "ES256", "kid": "es-1", "crit": ["exp"], "exp": 1});
        let token = encode_jwt(&header, &claims(), &es.sign_input(&header, &claims()));
        assert_eq!(verify(&token, &keys, &all, now()), Err(JwtError::Critical));
    }

    #[test]
    fn keys_come_from_the_jwks_only() {
        let trusted = es();
        let attacker = SigningKey::generate_es256("evil");
        let keys = set_of(&[&trusted]);
        let s = settings(&DEFAULT_ALGORITHMS);
        // An embedded jwk / jku pointing at the attacker's key is ignored.
        let header = json!({"alg": "ES256", "kid": "evil", "jwk": attacker.jwk(), "jku": "https://evil/jwks"});
        let token = encode_jwt(&header, &claims(), &attacker.sign_input(&header, &claims()));
        assert_eq!(verify(&token, &keys, &s, now()), Err(JwtError::UnknownKey));
        let header = json!({"alg": "ES256", "jwk": attacker.jwk()});
        let token = encode_jwt(&header, &claims(), &attacker.sign_input(&header, &claims()));
        assert_eq!(
            verify(&token, &keys, &s, now()),
            Err(JwtError::BadSignature)
        );
        // Without kid the fitting keys are tried.
        let header = json!({"alg": "ES256"});
        let token = encode_jwt(&header, &claims(), &trusted.sign_input(&header, &claims()));
        assert!(verify(&token, &keys, &s, now()).is_ok());
    }

    #[test]
    fn unknown_kid_is_reported_only_for_otherwise_acceptable_tokens() {
        let key = es();
        let keys = set_of(&[&key]);
        let s = settings(&DEFAULT_ALGORITHMS);
        let stranger = SigningKey::generate_es256("es-2");
        assert_eq!(
            verify(&stranger.mint(&claims()), &keys, &s, now()),
            Err(JwtError::UnknownKey)
        );
        let mut c = claims();
        c["exp"] = json!(1);
        assert_eq!(
            verify(&stranger.mint(&c), &keys, &s, now()),
            Err(JwtError::Expired)
        );
    }

    #[test]
    fn jwks_parsing_skips_unusable_keys() {
        let (es, rs) = (es(), rs());
        let mut enc = rs.jwk();
        enc["use"] = json!("enc");
        enc["kid"] = json!("enc");
        let mut wrong_alg = es.jwk();
        wrong_alg["alg"] = json!("RS256");
        wrong_alg["kid"] = json!("wrong-alg");
        let mut short_x = es.jwk();
        short_x["x"] = json!("AAAA");
        let mut padded = es.jwk();
        padded["x"] = json!(format!("{}=", padded["x"].as_str().unwrap()));
        let mut leading_zero = rs.jwk();
        let mut n = vec![0u8];
        n.extend(rs.public_modulus());
        leading_zero["n"] = json!(URL_SAFE_NO_PAD.encode(n));
        leading_zero["kid"] = json!("rs-0");
        let doc = json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
            {"kty": "RSA", "kid": "small", "n": URL_SAFE_NO_PAD.encode([0xc3u8; 128]), "e": "AQAB"},
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "OKP", "crv": "X25519", "x": URL_SAFE_NO_PAD.encode([1u8; 32])},
            {"kty": "RSA", "kid": 7},
            {"kty": "RSA", "kid": "no-ops", "n": rs.jwk()["n"], "e": "AQAB", "key_ops": ["encrypt"]},
            enc, wrong_alg, short_x, padded,
            es.jwk(), leading_zero,
        ]});
        let set = JwkSet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), ["es-1", "rs-0"]);
        // The modulus with a leading zero byte still verifies.
        let header = json!({"alg": "RS256", "kid": "rs-0"});
        let token = encode_jwt(&header, &claims(), &rs.sign_input(&header, &claims()));
        assert!(verify(&token, &set, &settings(&DEFAULT_ALGORITHMS), now()).is_ok());

        for bad in [&b"{}"[..], b"[]", b"{\"keys\":{}}", b"not json"] {
            assert!(matches!(JwkSet::parse(bad), Err(JwksError::NotJwks(_))));
        }
        assert_eq!(
            JwkSet::parse(br#"{"keys":[{"kty":"oct","k":"AA"}]}"#),
            Err(JwksError::NoUsableKey(1))
        );
    }

    #[test]
    fn other_algorithms_verify() {
        // EdDSA and ES384 keys made with ring; PS256 with the RSA test key.
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair as _;
        let doc = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed",
            "x": URL_SAFE_NO_PAD.encode(ed.public_key().as_ref())}]});
        let keys = JwkSet::parse(doc.to_string().as_bytes()).unwrap();
        let header = json!({"alg": "EdDSA", "kid": "ed"});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        let token = format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(ed.sign(input.as_bytes()))
        );
        assert!(verify(&token, &keys, &settings(&[Algorithm::EdDsa]), now()).is_ok());
        assert_eq!(
            verify(&token, &keys, &settings(&DEFAULT_ALGORITHMS), now()),
            Err(JwtError::AlgorithmNotAllowed)
        );

        let rs = rs();
        let mut jwk = rs.jwk();
        jwk.as_object_mut().unwrap().remove("alg");
        let keys = JwkSet::parse(json!({"keys": [jwk]}).to_string().as_bytes()).unwrap();
        let header = json!({"alg": "PS256", "kid": "rs-1"});
        let token = encode_jwt(
            &header,
            &claims(),
            &rs.sign_pss(&header, &claims()).unwrap(),
        );
        assert!(verify(&token, &keys, &settings(&[Algorithm::Ps256]), now()).is_ok());
        // The same PSS signature presented as PKCS#1 v1.5 does not verify.
        let header2 = json!({"alg": "RS256", "kid": "rs-1"});
        let parts: Vec<&str> = token.split('.').collect();
        let token = encode_jwt(
            &header2,
            &claims(),
            &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        );
        assert_eq!(
            verify(&token, &keys, &settings(&DEFAULT_ALGORITHMS), now()),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn settings_are_validated() {
        let mut s = settings(&DEFAULT_ALGORITHMS);
        assert!(s.validate().is_ok());
        s.algorithms.clear();
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("iam.jwt.algorithms"));
        let mut s = settings(&DEFAULT_ALGORITHMS);
        s.issuer.clear();
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("iam.jwt.issuer"));
    }

    #[test]
    fn jwks_urls_are_checked() {
        for good in [
            "https://idp.example.com/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://[::1]/k",
            "http://localhost/k",
        ] {
            assert!(validate_url(good).is_ok(), "{good}");
        }
        for bad in [
            "http://idp.example.com/jwks",
            "ftp://x/y",
            "https://user:pw@idp/jwks",
            "not a url",
            "/jwks.json",
        ] {
            assert!(validate_url(bad).is_err(), "{bad}");
        }
    }
}
