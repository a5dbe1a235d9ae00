//! Header names compared with constant lowercase names eight bytes at a time.
//!
//! Every header of every request and answer is compared with a few known names (hop-by-hop
//! ones, `Content-Length`, the names the parsers turn straight into a `HeaderName`).
//! `eq_ignore_ascii_case` lowercases byte by byte; a [`Lower`] name is prepared at compile time
//! as words and a mask of its letters, so that a comparison is one OR and one compare per
//! eight bytes — and the same answer as `eq_ignore_ascii_case` for any bytes compared.

/// Whether `name` is the lowercase name `lower` (a byte string literal) in any case; the name
/// is prepared at compile time.
macro_rules! is_lower {
    ($name:expr, $lower:literal) => {
        const { $crate::proxy::lower::Lower::new($lower) }.matches($name)
    };
}
pub(crate) use is_lower;

/// The longest name a [`Lower`] holds.
const MAX: usize = 32;

/// A lowercase name prepared for [`Lower::matches`]; made in a `const` (`const { Lower::new(…) }`).
pub struct Lower {
    len: usize,
    /// The name's bytes, eight to a word (little-endian), zero past its end.
    words: [u64; MAX / 8],
    /// `0x20` where the name has a letter (the one bit case changes), zero elsewhere: a
    /// non-letter must be matched exactly.
    letters: [u64; MAX / 8],
}

impl Lower {
    /// Panics (at compile time, in a `const`) on a name that is long or not lowercase.
    pub const fn new(name: &[u8]) -> Self {
        assert!(name.len() <= MAX, "a Lower name is at most 32 bytes");
        let mut words = [0u64; MAX / 8];
        let mut letters = [0u64; MAX / 8];
        let mut at = 0;
        while at < name.len() {
            let byte = name[at];
            assert!(!byte.is_ascii_uppercase(), "a Lower name is lowercase");
            let shift = (at % 8) * 8;
            words[at / 8] |= (byte as u64) << shift;
            if byte.is_ascii_lowercase() {
                letters[at / 8] |= 0x20 << shift;
            }
            at += 1;
        }
        Lower {
            len: name.len(),
            words,
            letters,
        }
    }

    /// Whether `name` is this name in any case (`name.eq_ignore_ascii_case(this)`). Inlined
    /// always: with the name a constant, the words and the length fold into the code.
    #[inline(always)]
    pub fn matches(&self, name: &[u8]) -> bool {
        if name.len() != self.len {
            return false;
        }
        let mut word = 0;
        let mut chunks = name.chunks_exact(8);
        for chunk in &mut chunks {
            let bytes: [u8; 8] = chunk.try_into().expect("chunks of eight");
            if u64::from_le_bytes(bytes) | self.letters[word] != self.words[word] {
                return false;
            }
            word += 1;
        }
        let rest = chunks.remainder();
        if rest.is_empty() {
            return true;
        }
        let mut bytes = [0u8; 8];
        bytes[..rest.len()].copy_from_slice(rest);
        u64::from_le_bytes(bytes) | self.letters[word] == self.words[word]
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NAMES: [&[u8]; 6] = [
        b"te",
        b"content-length",
        b"x-request-id",
        b"proxy-authorization",
        b"accept-encoding-2",
        b"sec-websocket-extensions-and-mor",
    ];

    #[test]
    fn a_name_matches_itself_in_any_case_and_not_its_neighbours() {
        let lower = const { Lower::new(b"content-length") };
        assert!(lower.matches(b"content-length"));
        assert!(lower.matches(b"Content-Length"));
        assert!(lower.matches(b"CONTENT-LENGTH"));
        assert!(!lower.matches(b"content-lengt"));
        assert!(!lower.matches(b"content-lengthx"));
        assert!(!lower.matches(b"content_length"));
        // `\r` is `-` without the case bit: a non-letter is matched exactly.
        assert!(!lower.matches(b"content\rlength"));
        assert!(!lower.matches(b"content-lengtH\0"));
        assert!(!lower.matches(b""));
        assert!(const { Lower::new(b"") }.matches(b""));
    }

    proptest! {
        /// The same answer as `eq_ignore_ascii_case` for any bytes, and for case variants of
        /// the name with a byte changed anywhere.
        #[test]
        fn matches_is_eq_ignore_ascii_case(
            which in 0..NAMES.len(),
            flips in proptest::collection::vec(any::<bool>(), 32),
            change in proptest::option::of((0usize..32, any::<u8>())),
            other in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let name = NAMES[which];
            let lower = Lower::new(name);
            let mut candidate: Vec<u8> = name
                .iter()
                .zip(&flips)
                .map(|(&b, &flip)| if flip { b.to_ascii_uppercase() } else { b })
                .collect();
            if let Some((at, byte)) = change {
                if let Some(slot) = candidate.get_mut(at) {
                    *slot = byte;
                }
            }
            prop_assert_eq!(lower.matches(&candidate), candidate.eq_ignore_ascii_case(name));
            prop_assert_eq!(lower.matches(&other), other.eq_ignore_ascii_case(name));
        }
    }
}
