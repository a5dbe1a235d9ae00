//! The last token seen on a client connection, with its cache key.
//!
//! A keep-alive client sends the same token on every request, and the cache key is an
//! HMAC-SHA256 of it: for an IAM token of several KiB that is a hundred SHA-256 blocks per
//! request, more than the rest of the cached path. Comparing the token with the previous one
//! costs a few instructions per 32 bytes, so each connection remembers its last (token, key).
//!
//! Safety of the shortcut:
//! - The comparison is of every byte, in time that depends only on the length: a connection
//!   shared by several users (a front proxy's keep-alive pool) learns nothing about another
//!   user's token from how long a mismatch took.
//! - The key is only reused with the cache that computed it (each [`TokenCache`] has an id).
//! - The token is kept as long as the connection, in the connection's own memory, as the
//!   request buffers hold it; it is never logged, counted or used as a key.
//!
//! [`TokenCache`]: super::TokenCache

use std::sync::Mutex;

use super::Key;
use crate::auth::token::Token;

/// One per client connection.
#[derive(Default)]
pub struct KeyMemo(Mutex<Option<Remembered>>);

impl std::fmt::Debug for KeyMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyMemo(<redacted>)")
    }
}

struct Remembered {
    cache: u64,
    token: Token,
    key: Key,
}

impl KeyMemo {
    /// The key remembered for exactly this token and cache, if any.
    pub(super) fn recall(&self, cache: u64, token: &Token) -> Option<Key> {
        let last = self.0.lock().ok()?;
        let last = last.as_ref()?;
        (last.cache == cache && same_bytes(last.token.expose(), token.expose())).then_some(last.key)
    }

    pub(super) fn remember(&self, cache: u64, token: &Token, key: Key) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(Remembered {
                cache,
                token: token.clone(),
                key,
            });
        }
    }
}

/// Whether `a` and `b` are equal, reading every byte whatever the first difference: a fold
/// without an early exit (which the compiler also turns into SIMD).
fn same_bytes(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recalls_only_the_same_token_for_the_same_cache() {
        let memo = KeyMemo::default();
        let token = Token::new("token-a");
        assert_eq!(memo.recall(1, &token), None);
        memo.remember(1, &token, [7; 32]);
        assert_eq!(memo.recall(1, &Token::new("token-a")), Some([7; 32]));
        assert_eq!(memo.recall(2, &token), None, "another cache's key");
        assert_eq!(memo.recall(1, &Token::new("token-b")), None);
        assert_eq!(memo.recall(1, &Token::new("token-")), None, "a prefix");
        assert_eq!(
            memo.recall(1, &Token::new("token-aa")),
            None,
            "an extension"
        );
        memo.remember(1, &Token::new("token-b"), [9; 32]);
        assert_eq!(memo.recall(1, &token), None, "only the last token is kept");
        assert_eq!(memo.recall(1, &Token::new("token-b")), Some([9; 32]));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let memo = KeyMemo::default();
        memo.remember(1, &Token::new("secret-token"), [0; 32]);
        assert!(!format!("{memo:?}").contains("secret"));
    }
}
