//! The IAM provider abstraction: from a caller's token to who they are and which MFA factors
//! their account has.
//!
//! A provider answers one of three things, and the difference matters for security: the token is
//! valid (with facts), the token is not valid (a definite "no" from the IAM, cacheable), or the IAM
//! could not answer (an [`IamError`], never cached, never read as "has MFA").

pub mod acs3;
pub mod aksk;
pub mod alibaba;
pub mod huawei;
pub mod jwt;
pub mod v5;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use crate::auth::token::Token;

/// Who the caller is, as the IAM says.
///
/// Every cached token holds one, so the four fields share one heap block, exactly as long as
/// they are, instead of four `String`s (each with its own block, header and spare capacity).
/// A field of 32 lowercase hex digits (Huawei's user and domain ids) is kept as the 16 bytes it
/// spells: that takes the block of a typical Huawei identity from 89 to 57 bytes, one allocator
/// size class down (96 to 64), which is most of what a cached token costs beyond its key.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// User id, user name, domain id and domain name, one after the other: UTF-8 text, or the
    /// 16 raw bytes of a packed hex field.
    text: Box<[u8]>,
    /// Where the user id, the user name and the domain id end in `text` (the domain name ends
    /// with it). `u16` rather than `usize` keeps `UserFacts` in a smaller allocator size class.
    ends: [u16; 3],
    /// Bit `i` set: field `i` is not empty and can be sent as a header value as it is. Checked
    /// once per token here rather than on every request (it fits in the struct's padding).
    sendable: u8,
    /// Bit `i` set: field `i` is kept packed, as 16 bytes for its 32 hex digits.
    packed: u8,
}

/// The fields of an [`Identity`] are longer than [`Identity::MAX_LEN`] in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "identity over {} bytes (user id, user name, domain id and domain name together)",
    Identity::MAX_LEN
)]
pub struct IdentityTooLong;

impl Identity {
    /// The four fields together may take this many bytes. IAM answers are far smaller (names of
    /// at most 64 characters, 32-hex ids; the IAM clients read at most 64–256 KiB of body).
    pub const MAX_LEN: usize = u16::MAX as usize;

    pub fn new(
        user_id: &str,
        user_name: &str,
        domain_id: &str,
        domain_name: &str,
    ) -> Result<Self, IdentityTooLong> {
        let fields = [user_id, user_name, domain_id, domain_name];
        let len: usize = fields.iter().map(|field| field.len()).sum();
        if len > Self::MAX_LEN {
            return Err(IdentityTooLong);
        }
        let packs = fields.map(hex_id::pack);
        let stored: usize = std::iter::zip(fields, &packs)
            .map(|(field, pack)| pack.map_or(field.len(), |raw| raw.len()))
            .sum();
        let mut text = Vec::with_capacity(stored);
        let mut ends = [0u16; 3];
        let mut sendable = 0u8;
        let mut packed = 0u8;
        for (i, (field, pack)) in std::iter::zip(fields, packs).enumerate() {
            if !field.is_empty() && http::HeaderValue::from_str(field).is_ok() {
                sendable |= 1 << i;
            }
            match pack {
                Some(raw) => {
                    packed |= 1 << i;
                    text.extend_from_slice(&raw);
                }
                None => text.extend_from_slice(field.as_bytes()),
            }
            if let Some(end) = ends.get_mut(i) {
                // At most MAX_LEN, checked above.
                *end = text.len() as u16;
            }
        }
        Ok(Identity {
            text: text.into_boxed_slice(),
            ends,
            sendable,
            packed,
        })
    }

    /// An identity that is only a user id, as an operator names one (`explain --user-id`).
    pub fn user(user_id: &str) -> Result<Self, IdentityTooLong> {
        Identity::new(user_id, "", "", "")
    }

    pub fn user_id(&self) -> IdentityField<'_> {
        self.field(0)
    }

    pub fn user_name(&self) -> IdentityField<'_> {
        self.field(1)
    }

    pub fn domain_id(&self) -> IdentityField<'_> {
        self.field(2)
    }

    /// Empty when the IAM has none (CloudSSO).
    pub fn domain_name(&self) -> IdentityField<'_> {
        self.field(3)
    }

    /// The four fields in order, each `None` when it is empty or not a valid header value
    /// (a control character): what the identity headers carry, and what they leave out.
    pub fn header_values(&self) -> [Option<IdentityField<'_>>; 4] {
        std::array::from_fn(|i| (self.sendable & (1 << i) != 0).then(|| self.field(i)))
    }

    /// Field `i` (0 to 3), spelled out again if it is packed.
    fn field(&self, i: usize) -> IdentityField<'_> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self
            .ends
            .get(i)
            .map_or(self.text.len(), |&end| end as usize);
        let stored = &self.text[start..end];
        IdentityField(if self.packed & (1 << i) != 0 {
            FieldText::Hex(hex_id::unpack(stored))
        } else {
            FieldText::Stored(stored)
        })
    }
}

/// As the derived `Debug` of four fields would print it.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id())
            .field("user_name", &self.user_name())
            .field("domain_id", &self.domain_id())
            .field("domain_name", &self.domain_name())
            .finish()
    }
}

/// One field of an [`Identity`] as text (it derefs to `str`): borrowed from the identity, or a
/// packed hex id spelled out on the stack.
#[derive(Clone, Copy)]
pub struct IdentityField<'a>(FieldText<'a>);

#[derive(Clone, Copy)]
enum FieldText<'a> {
    Stored(&'a [u8]),
    Hex([u8; hex_id::DIGITS]),
}

impl IdentityField<'_> {
    /// The field's UTF-8 bytes, without the check that `str` needs: what the forwarded identity
    /// headers are written from, on every request.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            FieldText::Stored(bytes) => bytes,
            FieldText::Hex(digits) => digits,
        }
    }
}

impl std::ops::Deref for IdentityField<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        // Copied from a `&str` in `Identity::new`, or lowercase hex digits (`hex_id::unpack`):
        // always UTF-8. Checked rather than assumed, as `#![forbid(unsafe_code)]` asks.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Display for IdentityField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for IdentityField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl AsRef<str> for IdentityField<'_> {
    fn as_ref(&self) -> &str {
        self
    }
}

impl<T: AsRef<str> + ?Sized> PartialEq<T> for IdentityField<'_> {
    fn eq(&self, other: &T) -> bool {
        **self == *other.as_ref()
    }
}

impl serde::Serialize for IdentityField<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self)
    }
}

/// Packing a 32-hex id into the 16 bytes it spells, and back. Only lowercase digits pack, so
/// that unpacking gives back exactly the text the IAM sent.
mod hex_id {
    /// Digits in a packed id.
    pub const DIGITS: usize = 32;

    /// The 16 bytes `field` spells, if it is exactly 32 lowercase hex digits.
    pub fn pack(field: &str) -> Option<[u8; DIGITS / 2]> {
        if field.len() != DIGITS {
            return None;
        }
        let mut raw = [0u8; DIGITS / 2];
        for (byte, pair) in raw.iter_mut().zip(field.as_bytes().chunks_exact(2)) {
            *byte = (value(pair[0])? << 4) | value(pair[1])?;
        }
        Some(raw)
    }

    /// The 32 lowercase hex digits of a packed id (`raw` is the 16 bytes `pack` made). Read on
    /// every request (the identity headers), so a byte is one look-up of both its digits (a
    /// shift-and-add spelling of eight bytes at a time measured ~100 instructions per request
    /// more under callgrind: it kept `Identity::field` from being inlined).
    pub fn unpack(raw: &[u8]) -> [u8; DIGITS] {
        let mut digits = [b'0'; DIGITS];
        for (pair, &byte) in digits.chunks_exact_mut(2).zip(raw) {
            pair.copy_from_slice(&PAIRS[usize::from(byte)]);
        }
        digits
    }

    /// The two lowercase hex digits of every byte value.
    static PAIRS: [[u8; 2]; 256] = {
        const ALPHABET: &[u8; 16] = b"0123456789abcdef";
        let mut pairs = [[0u8; 2]; 256];
        let mut byte = 0;
        while byte < 256 {
            pairs[byte] = [ALPHABET[byte >> 4], ALPHABET[byte & 0xf]];
            byte += 1;
        }
        pairs
    };

    fn value(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            _ => None,
        }
    }
}

/// Login protection as configured on the user (Huawei `login-protect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginProtect {
    pub enabled: bool,
    pub method: VerificationMethod,
}

/// Huawei's `verification_method` of login protection. One byte, not a `String`: every cached
/// token of a user with login protection looked up holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationMethod {
    Vmfa,
    Sms,
    Email,
    /// Login protection is off (and the IAM named no method).
    None,
    /// A value Huawei does not document. It never counts as login protection (the config
    /// accepts only `vmfa`, `sms` and `email`); the value itself is not kept.
    Other,
}

impl VerificationMethod {
    /// Reads the IAM's value, in any case.
    pub fn from_iam(value: &str) -> Self {
        [
            VerificationMethod::Vmfa,
            VerificationMethod::Sms,
            VerificationMethod::Email,
            VerificationMethod::None,
        ]
        .into_iter()
        .find(|method| value.eq_ignore_ascii_case(method.as_str()))
        .unwrap_or(VerificationMethod::Other)
    }

    /// Lowercased, as the config's `policy.login_protect_methods` names them.
    pub fn as_str(self) -> &'static str {
        match self {
            VerificationMethod::Vmfa => "vmfa",
            VerificationMethod::Sms => "sms",
            VerificationMethod::Email => "email",
            VerificationMethod::None => "none",
            VerificationMethod::Other => "other",
        }
    }
}

/// Everything the policy may need to know about a valid token's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFacts {
    pub identity: Identity,
    /// When the token itself stops being valid; no cache entry outlives it.
    pub expires_at: SystemTime,
    /// The token was issued through an MFA login (`totp` in the token's `methods`).
    pub totp_login: bool,
    /// Whether a virtual MFA device is bound; `None` when it was not looked up.
    pub mfa_device: Option<bool>,
    /// The login protection setting; `None` when not looked up; `Some(None)` when the IAM says
    /// it was never configured (404).
    pub login_protect: Option<Option<LoginProtect>>,
}

/// What a provider learnt about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenStatus {
    /// The token is valid; these are its user's facts.
    Valid(Arc<UserFacts>),
    /// The IAM said the token is unknown, expired or revoked.
    Invalid,
}

/// Which lookups the policy can use, so a provider may skip the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub mfa_device: bool,
    pub login_protect: bool,
}

/// The IAM could not give a usable answer. Each variant maps to a metric outcome; all of them
/// mean "IAM unavailable" to the policy.
#[derive(Debug, thiserror::Error)]
pub enum IamError {
    #[error("IAM {api} call timed out")]
    Timeout { api: &'static str },
    #[error("IAM {api} call failed: {detail}")]
    Transport { api: &'static str, detail: String },
    #[error("IAM {api} answered {status} {code}")]
    Status {
        api: &'static str,
        status: u16,
        code: String,
    },
    #[error("IAM {api} answered an unusable body: {detail}")]
    BadResponse { api: &'static str, detail: String },
    #[error("IAM concurrency limit reached ({limit} calls in flight)")]
    Saturated { limit: usize },
}

/// A source of identity and MFA facts for tokens.
pub trait IamProvider: Send + Sync + 'static {
    /// Looks the token up. Must not be called with a token that failed local validation.
    fn lookup<'a>(
        &'a self,
        token: &'a Token,
        needs: Needs,
    ) -> BoxFuture<'a, Result<TokenStatus, IamError>>;
}

/// An error with its sources, for transport details in logs and `IamError`s ("client error
/// (Connect): tcp connect error: Connection refused"). Shared by every IAM client.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_fields_come_back_as_given() {
        let identity = Identity::new("u-1", "alice", "d-1", "acme").unwrap();
        assert_eq!(identity.user_id(), "u-1");
        assert_eq!(identity.user_name(), "alice");
        assert_eq!(identity.domain_id(), "d-1");
        assert_eq!(identity.domain_name(), "acme");
        assert_eq!(
            format!("{identity:?}"),
            r#"Identity { user_id: "u-1", user_name: "alice", domain_id: "d-1", domain_name: "acme" }"#
        );
    }

    #[test]
    fn header_values_leave_out_empty_fields_and_control_characters() {
        let identity = Identity::new("u-1", "bad\nname", "", "caf\u{e9}\tbar").unwrap();
        assert_eq!(
            identity
                .header_values()
                .each_ref()
                .map(|value| value.as_deref()),
            [Some("u-1"), None, None, Some("caf\u{e9}\tbar")]
        );
        assert_eq!(Identity::default().header_values(), [None; 4]);
    }

    #[test]
    fn empty_fields_anywhere_stay_empty() {
        for fields in [
            ["", "", "", ""],
            ["", "alice", "", "acme"],
            ["u-1", "", "d-1", ""],
            ["", "", "", "acme"],
            ["u-1", "", "", ""],
        ] {
            let identity = Identity::new(fields[0], fields[1], fields[2], fields[3]).unwrap();
            let read = [
                identity.user_id(),
                identity.user_name(),
                identity.domain_id(),
                identity.domain_name(),
            ];
            assert_eq!(read, fields);
        }
        assert_eq!(Identity::default(), Identity::new("", "", "", "").unwrap());
        assert_eq!(Identity::user("u-1").unwrap().user_id(), "u-1");
        assert_eq!(Identity::user("u-1").unwrap().domain_name(), "");
    }

    #[test]
    fn hex_ids_are_packed_and_come_back_exactly() {
        let user = "0b9e5c1a7d3f4e2a8c6b5d4e3f2a1b0c";
        let domain = "7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d";
        let identity = Identity::new(user, "alice", domain, "acme").unwrap();
        assert_eq!(identity.packed, 0b0101);
        assert_eq!(identity.text.len(), 16 + "alice".len() + 16 + "acme".len());
        assert_eq!(identity.user_id(), user);
        assert_eq!(identity.user_name(), "alice");
        assert_eq!(identity.domain_id(), domain);
        assert_eq!(identity.domain_name(), "acme");
        assert_eq!(
            identity
                .header_values()
                .each_ref()
                .map(|value| value.as_deref()),
            [Some(user), Some("alice"), Some(domain), Some("acme")]
        );
        assert_eq!(identity.user_id().to_string(), user);
        assert_eq!(format!("{:?}", identity.domain_id()), format!("{domain:?}"));
        // A name that happens to be 32 hex digits packs too, and still reads back as sent.
        let hex_name = Identity::new("u", "ffffffffffffffffffffffffffffffff", "", "").unwrap();
        assert_eq!(hex_name.packed, 0b0010);
        assert_eq!(hex_name.user_name(), "ffffffffffffffffffffffffffffffff");
        assert_eq!(hex_name.user_id(), "u");
    }

    #[test]
    fn every_byte_value_packs_and_unpacks() {
        for byte in 0..=255u8 {
            let text = format!("{byte:02x}").repeat(16);
            let raw = hex_id::pack(&text).unwrap();
            assert_eq!(raw, [byte; 16]);
            assert_eq!(hex_id::unpack(&raw), text.as_bytes());
        }
    }

    #[test]
    fn only_exactly_32_lowercase_hex_digits_pack() {
        for not_packed in [
            "0B9E5C1A7D3F4E2A8C6B5D4E3F2A1B0C", // uppercase would come back lowercased
            "0b9e5c1a7d3f4e2a8c6b5d4e3f2a1b0",  // 31 digits
            "0b9e5c1a7d3f4e2a8c6b5d4e3f2a1b0c0",
            "0b9e5c1a7d3f4e2a8c6b5d4e3f2a1b0g",
            "0b9e5c1a-d3f4e2a8c6b5d4e3f2a1b0c",
            "u-00q8wbq42wiltcrk0000000000000", // CloudSSO's user ids are not hex
        ] {
            let identity = Identity::new(not_packed, "", not_packed, "").unwrap();
            assert_eq!(identity.packed, 0, "{not_packed}");
            assert_eq!(identity.user_id(), not_packed);
            assert_eq!(identity.domain_id(), not_packed);
        }
    }

    #[test]
    fn multibyte_text_splits_on_field_boundaries() {
        let identity = Identity::new("ü", "名前", "", "ドメイン").unwrap();
        assert_eq!(identity.user_name(), "名前");
        assert_eq!(identity.domain_name(), "ドメイン");
    }

    #[test]
    fn an_identity_of_up_to_max_len_bytes_in_all_is_kept() {
        // Long fields in every position, including one longer than a u16 offset alone allows
        // together with the others.
        let long = "a".repeat(Identity::MAX_LEN - 3);
        let identity = Identity::new("b", &long, "c", "d").unwrap();
        assert_eq!(identity.user_name(), long);
        assert_eq!(identity.domain_id(), "c");
        assert_eq!(identity.domain_name(), "d");
        let last = Identity::new("", "", "", &"z".repeat(Identity::MAX_LEN)).unwrap();
        assert_eq!(last.domain_name().len(), Identity::MAX_LEN);
        assert_eq!(last.user_id(), "");
    }

    #[test]
    fn a_longer_identity_is_refused() {
        let half = "a".repeat(Identity::MAX_LEN / 2 + 1);
        assert_eq!(Identity::new(&half, &half, "", ""), Err(IdentityTooLong));
        assert_eq!(
            Identity::new("", "", "", &"z".repeat(Identity::MAX_LEN + 1)),
            Err(IdentityTooLong)
        );
        assert_eq!(
            Identity::user(&"u".repeat(Identity::MAX_LEN + 1)),
            Err(IdentityTooLong)
        );
    }

    #[test]
    fn verification_methods_read_in_any_case() {
        for (text, method) in [
            ("vmfa", VerificationMethod::Vmfa),
            ("VMFA", VerificationMethod::Vmfa),
            ("SMS", VerificationMethod::Sms),
            ("Email", VerificationMethod::Email),
            ("none", VerificationMethod::None),
            ("fido2", VerificationMethod::Other),
            ("", VerificationMethod::Other),
        ] {
            assert_eq!(VerificationMethod::from_iam(text), method, "{text:?}");
        }
        for method in [
            VerificationMethod::Vmfa,
            VerificationMethod::Sms,
            VerificationMethod::Email,
            VerificationMethod::None,
        ] {
            assert_eq!(VerificationMethod::from_iam(method.as_str()), method);
        }
    }

    /// What a cached token costs depends on these: `UserFacts` sits in one 64-byte block with
    /// the `Arc`'s counts.
    #[test]
    fn user_facts_stay_small() {
        assert_eq!(std::mem::size_of::<Identity>(), 24);
        assert_eq!(std::mem::size_of::<Option<Option<LoginProtect>>>(), 2);
        assert!(std::mem::size_of::<UserFacts>() <= 48);
    }
}
