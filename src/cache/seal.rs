//! The fleet's cryptography for `[cache.shared]`: keys derived from the shared secret, and the
//! sealed form of what goes into Redis.
//!
//! Redis is trusted with nothing. Whoever can read it learns no token (keys are an HMAC of the
//! token), no identity (entries and invalidation messages are encrypted, per-user index keys are
//! an HMAC of the user id) and whoever can write it cannot forge a "has MFA" entry: every value is
//! sealed with AES-256-GCM, and the associated data binds an entry to the Redis key it is stored
//! under, so that a valid entry copied under another token's key fails to open.
//!
//! The keys are derived with HKDF-SHA256 (RFC 5869) from `cache.shared.secret_file`, one per
//! purpose, so that no key is used for two jobs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{KeyType, Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::iam::{Identity, LoginProtect, TokenStatus, UserFacts, VerificationMethod};

/// First byte of every sealed value: the format, so that a later one can be told apart.
const FORMAT_V1: u8 = 1;
/// HKDF salt: fixed and public, as RFC 5869 §3.1 allows; the secret carries the entropy.
const HKDF_SALT: &[u8] = b"mfa-gate shared cache";
const INFO_TOKEN_KEY: &[u8] = b"mfa-gate/v1/token-key";
const INFO_USER_KEY: &[u8] = b"mfa-gate/v1/user-key";
const INFO_SEAL: &[u8] = b"mfa-gate/v1/seal";
const AAD_ENTRY: &[u8] = b"mfa-gate/v1/entry:";
const AAD_INVALIDATION: &[u8] = b"mfa-gate/v1/invalidation";

/// Why a value read from Redis was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not a sealed value of this format")]
    Format,
    #[error("does not open under the fleet's key (tampered, moved or another secret)")]
    Seal,
    #[error("opens, but the content is not understood")]
    Content,
}

/// What one gateway learnt about a token, as the fleet shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEntry {
    pub status: TokenStatus,
    /// Until when the learning gateway would serve it as fresh (already bounded by the token's
    /// own expiry); the reader never serves it longer.
    pub fresh_until: SystemTime,
}

/// "Drop what you know about this user (or about everyone)", as published on the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidation {
    /// The publishing gateway's random id, so that it can skip its own message.
    pub origin: String,
    /// `None`: every entry.
    pub user_id: Option<String>,
}

/// The keys derived from the fleet secret.
pub struct FleetKeys {
    token_mac: Hmac<Sha256>,
    user_mac: Hmac<Sha256>,
    seal: LessSafeKey,
    random: SystemRandom,
}

/// An HKDF output length (ring wants it as a type).
struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(prk: &ring::hkdf::Prk, info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    prk.expand(&[info], Len(out.len()))
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

impl FleetKeys {
    pub fn derive(secret: &[u8]) -> FleetKeys {
        let prk = Salt::new(HKDF_SHA256, HKDF_SALT).extract(secret);
        let mac = |info| {
            Hmac::<Sha256>::new_from_slice(&derive(&prk, info)).expect("HMAC takes any key length")
        };
        let seal = UnboundKey::new(&AES_256_GCM, &derive(&prk, INFO_SEAL))
            .expect("32 bytes is an AES-256 key");
        FleetKeys {
            token_mac: mac(INFO_TOKEN_KEY),
            user_mac: mac(INFO_USER_KEY),
            seal: LessSafeKey::new(seal),
            random: SystemRandom::new(),
        }
    }

    /// The keyed HMAC state for token keys (the same key on every gateway of the fleet).
    pub fn token_mac(&self) -> &Hmac<Sha256> {
        &self.token_mac
    }

    /// HMAC of a user id, hex: names the user's index in Redis without naming the user.
    pub fn user_tag(&self, user_id: &str) -> String {
        hex::encode(
            self.user_mac
                .clone()
                .chain_update(user_id.as_bytes())
                .finalize()
                .into_bytes(),
        )
    }

    /// Seals `entry` for storage under the token key `key`.
    pub fn seal_entry(&self, key: &[u8; 32], entry: &FleetEntry) -> Vec<u8> {
        let wire = WireEntry::from(entry);
        let plain = serde_json::to_vec(&wire).expect("a wire entry always serialises");
        self.seal(&entry_aad(key), plain)
    }

    /// Opens a value read from under the token key `key`.
    pub fn open_entry(&self, key: &[u8; 32], sealed: &[u8]) -> Result<FleetEntry, Rejected> {
        let plain = self.open(&entry_aad(key), sealed)?;
        let wire: WireEntry = serde_json::from_slice(&plain).map_err(|_| Rejected::Content)?;
        wire.try_into()
    }

    pub fn seal_invalidation(&self, message: &Invalidation) -> Vec<u8> {
        let plain = serde_json::to_vec(message).expect("an invalidation always serialises");
        self.seal(AAD_INVALIDATION, plain)
    }

    pub fn open_invalidation(&self, sealed: &[u8]) -> Result<Invalidation, Rejected> {
        let plain = self.open(AAD_INVALIDATION, sealed)?;
        serde_json::from_slice(&plain).map_err(|_| Rejected::Content)
    }

    /// `FORMAT_V1 ‖ nonce ‖ ciphertext ‖ tag`, with a random 96-bit nonce (NIST SP 800-38D
    /// §8.2.2: safe for far more than the 2^32 seals a fleet makes under one secret).
    fn seal(&self, aad: &[u8], mut plain: Vec<u8>) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system random generator works");
        self.seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut plain,
            )
            .expect("AES-GCM seals any length a cache entry has");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&plain);
        out
    }

    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Rejected> {
        let Some((&FORMAT_V1, rest)) = sealed.split_first() else {
            return Err(Rejected::Format);
        };
        if rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(Rejected::Format);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Rejected::Format)?;
        let mut buffer = ciphertext.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, Aad::from(aad), &mut buffer)
            .map_err(|_| Rejected::Seal)?;
        Ok(plain.to_vec())
    }
}

fn entry_aad(key: &[u8; 32]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_ENTRY.len() + key.len());
    aad.extend_from_slice(AAD_ENTRY);
    aad.extend_from_slice(key);
    aad
}

// ----- the plaintext, versioned independently of the in-memory types -----

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEntry {
    /// Unix milliseconds.
    fresh_until_ms: u64,
    /// `None`: the IAM called the token invalid.
    facts: Option<WireFacts>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireFacts {
    user_id: String,
    user_name: String,
    domain_id: String,
    domain_name: String,
    expires_at_ms: u64,
    totp_login: bool,
    mfa_device: Option<bool>,
    login_protect: WireLoginProtect,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum WireLoginProtect {
    NotLookedUp,
    NotConfigured,
    Configured { enabled: bool, method: String },
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl From<&FleetEntry> for WireEntry {
    fn from(entry: &FleetEntry) -> Self {
        let facts = match &entry.status {
            TokenStatus::Invalid => None,
            TokenStatus::Valid(facts) => Some(WireFacts {
                user_id: facts.identity.user_id().to_string(),
                user_name: facts.identity.user_name().to_string(),
                domain_id: facts.identity.domain_id().to_string(),
                domain_name: facts.identity.domain_name().to_string(),
                expires_at_ms: unix_ms(facts.expires_at),
                totp_login: facts.totp_login,
                mfa_device: facts.mfa_device,
                login_protect: match &facts.login_protect {
                    None => WireLoginProtect::NotLookedUp,
                    Some(None) => WireLoginProtect::NotConfigured,
                    Some(Some(protect)) => WireLoginProtect::Configured {
                        enabled: protect.enabled,
                        method: protect.method.as_str().to_owned(),
                    },
                },
            }),
        };
        WireEntry {
            fresh_until_ms: unix_ms(entry.fresh_until),
            facts,
        }
    }
}

impl TryFrom<WireEntry> for FleetEntry {
    type Error = Rejected;

    fn try_from(wire: WireEntry) -> Result<Self, Rejected> {
        let status = match wire.facts {
            None => TokenStatus::Invalid,
            Some(facts) => {
                if facts.user_id.is_empty() {
                    return Err(Rejected::Content);
                }
                let identity = Identity::new(
                    &facts.user_id,
                    &facts.user_name,
                    &facts.domain_id,
                    &facts.domain_name,
                )
                .map_err(|_| Rejected::Content)?;
                TokenStatus::Valid(std::sync::Arc::new(UserFacts {
                    identity,
                    expires_at: from_unix_ms(facts.expires_at_ms),
                    totp_login: facts.totp_login,
                    mfa_device: facts.mfa_device,
                    login_protect: match facts.login_protect {
                        WireLoginProtect::NotLookedUp => None,
                        WireLoginProtect::NotConfigured => Some(None),
                        WireLoginProtect::Configured { enabled, method } => {
                            Some(Some(LoginProtect {
                                enabled,
                                method: VerificationMethod::from_iam(&method),
                            }))
                        }
                    },
                }))
            }
        };
        Ok(FleetEntry {
            status,
            fresh_until: from_unix_ms(wire.fresh_until_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> FleetKeys {
        FleetKeys::derive(&[7u8; 32])
    }

    fn alice() -> FleetEntry {
        FleetEntry {
            status: TokenStatus::Valid(std::sync::Arc::new(UserFacts {
                identity: Identity::new("u-alice", "alice", "d-1", "acme").unwrap(),
                expires_at: from_unix_ms(1_900_000_000_000),
                totp_login: true,
                mfa_device: Some(true),
                login_protect: Some(Some(LoginProtect {
                    enabled: true,
                    method: VerificationMethod::Vmfa,
                })),
            })),
            fresh_until: from_unix_ms(1_800_000_000_000),
        }
    }

    #[test]
    fn an_entry_opens_under_its_own_key_with_every_fact() {
        let keys = keys();
        let key = [1u8; 32];
        let sealed = keys.seal_entry(&key, &alice());
        assert_eq!(keys.open_entry(&key, &sealed), Ok(alice()));

        for login_protect in [None, Some(None)] {
            let mut entry = alice();
            if let TokenStatus::Valid(facts) = &mut entry.status {
                std::sync::Arc::make_mut(facts).login_protect = login_protect;
                std::sync::Arc::make_mut(facts).mfa_device = None;
            }
            let sealed = keys.seal_entry(&key, &entry);
            assert_eq!(keys.open_entry(&key, &sealed), Ok(entry));
        }
        let invalid = FleetEntry {
            status: TokenStatus::Invalid,
            fresh_until: from_unix_ms(5),
        };
        let sealed = keys.seal_entry(&key, &invalid);
        assert_eq!(keys.open_entry(&key, &sealed), Ok(invalid));
    }

    #[test]
    fn nothing_readable_is_stored() {
        let sealed = keys().seal_entry(&[1u8; 32], &alice());
        let text = String::from_utf8_lossy(&sealed);
        for secret in ["u-alice", "alice", "acme", "vmfa", "mfa_device"] {
            assert!(!text.contains(secret), "{secret} readable in {text:?}");
        }
    }

    #[test]
    fn an_entry_moved_to_another_token_key_is_rejected() {
        let keys = keys();
        let sealed = keys.seal_entry(&[1u8; 32], &alice());
        assert_eq!(keys.open_entry(&[2u8; 32], &sealed), Err(Rejected::Seal));
    }

    #[test]
    fn tampered_truncated_foreign_or_garbage_values_are_rejected() {
        let keys = keys();
        let key = [1u8; 32];
        let sealed = keys.seal_entry(&key, &alice());
        for index in [0, 1, 13, sealed.len() / 2, sealed.len() - 1] {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x01;
            assert!(keys.open_entry(&key, &tampered).is_err(), "byte {index}");
        }
        assert_eq!(keys.open_entry(&key, &sealed[..20]), Err(Rejected::Format));
        assert_eq!(keys.open_entry(&key, b""), Err(Rejected::Format));
        assert_eq!(
            keys.open_entry(&key, br#"{"fresh_until_ms":1,"facts":null}"#),
            Err(Rejected::Format)
        );
        let other = FleetKeys::derive(&[8u8; 32]);
        assert_eq!(
            other.open_entry(&key, &sealed),
            Err(Rejected::Seal),
            "a gateway with another secret"
        );
        // Sealed under the right key, but not an entry.
        let not_an_entry = keys.seal(&entry_aad(&key), b"{\"mfa\":true}".to_vec());
        assert_eq!(keys.open_entry(&key, &not_an_entry), Err(Rejected::Content));
    }

    #[test]
    fn invalidations_round_trip_and_cannot_pass_for_entries() {
        let keys = keys();
        let message = Invalidation {
            origin: "abc".into(),
            user_id: Some("u-alice".into()),
        };
        let sealed = keys.seal_invalidation(&message);
        assert_eq!(keys.open_invalidation(&sealed), Ok(message));
        assert!(!String::from_utf8_lossy(&sealed).contains("u-alice"));
        assert_eq!(
            keys.open_entry(&[1u8; 32], &sealed),
            Err(Rejected::Seal),
            "different associated data"
        );
    }

    #[test]
    fn keys_differ_by_purpose_and_by_secret() {
        let a = FleetKeys::derive(&[7u8; 32]);
        let b = FleetKeys::derive(&[9u8; 32]);
        assert_ne!(a.user_tag("u-1"), b.user_tag("u-1"));
        assert_eq!(a.user_tag("u-1"), keys().user_tag("u-1"));
        let token = a
            .token_mac()
            .clone()
            .chain_update(b"u-1")
            .finalize()
            .into_bytes();
        assert_ne!(hex::encode(token), a.user_tag("u-1"));
    }
}
