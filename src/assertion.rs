//! The signed identity assertion: a short-lived JWT the gateway adds to every forwarded request
//! (`X-Auth-Assertion`), so that an app can verify that the identity headers really came from
//! this gateway and were not injected by something that reached the app another way.
//!
//! Signed with the operator's Ed25519 (`EdDSA`) or P-256 (`ES256`) key; the public key is served
//! as a JWKS on the admin listener (`/.well-known/jwks.json`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use sha2::{Digest, Sha256};

/// The longest an assertion may live: it proves one request, not a session.
pub const MAX_TTL: Duration = Duration::from_secs(60);

enum Key {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

/// Signs assertions with one key.
pub struct Signer {
    key: Key,
    rng: SystemRandom,
    kid: String,
    issuer: String,
    audience: String,
    ttl: Duration,
    /// The base64url JWT header, the same for every assertion.
    header: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// What an assertion states about a request.
pub struct Claims<'a> {
    pub user_id: &'a str,
    pub user_name: &'a str,
    pub domain_id: &'a str,
    pub domain_name: &'a str,
    /// The `X-Auth-Mfa` value.
    pub mfa: &'a str,
    pub request_id: &'a str,
}

impl Signer {
    /// Loads a PKCS#8 PEM private key (Ed25519 or ECDSA P-256).
    pub fn from_pem_file(
        path: &Path,
        issuer: &str,
        audience: &str,
        ttl: Duration,
    ) -> anyhow::Result<Signer> {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let der = match rustls_pemfile::private_key(&mut pem.as_slice()) {
            Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(der))) => der,
            Ok(Some(_)) => anyhow::bail!(
                "{}: the key must be PKCS#8 (\"BEGIN PRIVATE KEY\")",
                path.display()
            ),
            _ => anyhow::bail!("{}: no private key found", path.display()),
        };
        let der = der.secret_pkcs8_der();
        let rng = SystemRandom::new();
        let key = if let Ok(key) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            Key::Ed25519(key)
        } else if let Ok(key) =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        {
            Key::P256(key)
        } else {
            anyhow::bail!("{}: not an Ed25519 or ECDSA P-256 key", path.display());
        };
        let public = match &key {
            Key::Ed25519(key) => key.public_key().as_ref().to_vec(),
            Key::P256(key) => key.public_key().as_ref().to_vec(),
        };
        let kid = hex::encode(&Sha256::digest(&public)[..8]);
        let alg = match key {
            Key::Ed25519(_) => "EdDSA",
            Key::P256(_) => "ES256",
        };
        let header = URL_SAFE_NO_PAD
            .encode(serde_json::json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string());
        Ok(Signer {
            key,
            rng,
            kid,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            ttl,
            header,
        })
    }

    /// A signed assertion for one request.
    pub fn sign(&self, claims: &Claims<'_>) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let payload = serde_json::json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": claims.user_id,
            "name": claims.user_name,
            "domain_id": claims.domain_id,
            "domain_name": claims.domain_name,
            "mfa": claims.mfa,
            "jti": claims.request_id,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl.as_secs(),
        });
        let input = format!(
            "{}.{}",
            self.header,
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let signature = match &self.key {
            Key::Ed25519(key) => key.sign(input.as_bytes()).as_ref().to_vec(),
            Key::P256(key) => key
                .sign(&self.rng, input.as_bytes())
                .map_err(|_| anyhow::anyhow!("ECDSA signing failed"))?
                .as_ref()
                .to_vec(),
        };
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// The public key as a JWKS document (RFC 7517; OKP keys per RFC 8037).
    pub fn jwks(&self) -> serde_json::Value {
        let jwk = match &self.key {
            Key::Ed25519(key) => serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref()),
            }),
            Key::P256(key) => {
                // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
                let point = key.public_key().as_ref();
                serde_json::json!({
                    "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                })
            }
        };
        serde_json::json!({ "keys": [jwk] })
    }
}
