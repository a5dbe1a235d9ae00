//! The last token seen on a client connection, with its cache key and the cache's last answer.
//!
//! A keep-alive client sends the same token on every request, and the cache key is an
//! HMAC-SHA256 of it: for an IAM token of several KiB that is a hundred SHA-256 blocks per
//! request, more than the rest of the cached path. Comparing the token with the previous one
//! costs a few instructions per 32 bytes, so each connection remembers its last (token, key).
//! It remembers the cache's answer for it too: a moka `get` (hashing, the read recorded for
//! the eviction policy, the entry cloned) costs more than the rest of the lookup.
//!
//! Safety of the shortcut:
//! - The comparison is of every byte, in time that depends only on the length: a connection
//!   shared by several users (a front proxy's keep-alive pool) learns nothing about another
//!   user's token from how long a mismatch took.
//! - The key is only reused with the cache that computed it (each [`TokenCache`] has an id).
//! - The token is kept as long as the connection, in the connection's own memory, as the
//!   request buffers hold it; it is never logged, counted or used as a key.
//! - The answer is reused only while it is fresh (`fresh_until`, as a cache hit would be) and
//!   only if nothing has left the cache by invalidation since it was read: the cache counts
//!   those ([`super::Inner::forgets`]), and a purge reaches open connections at once.
//!
//! [`TokenCache`]: super::TokenCache

use std::sync::Mutex;

use super::stamp::Stamp;
use super::{Entry, Key};
use crate::auth::token::Token;
use crate::iam::TokenStatus;

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
    /// The cache's last answer for this token, and its invalidation count when it was read.
    answer: Option<(u64, Entry)>,
}

/// What a connection remembers of a token.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Recalled {
    /// Nothing: another token, or another cache.
    Nothing,
    /// Its key.
    Key(Key),
    /// A fresh answer of the cache (its key is not needed then).
    Answer(TokenStatus),
}

impl KeyMemo {
    /// What is remembered for exactly this token and cache; its answer only while it is fresh
    /// at `now` and the cache's invalidation count is still `forgets`.
    pub(super) fn recall(&self, cache: u64, token: &Token, forgets: u64, now: Stamp) -> Recalled {
        let Ok(last) = self.0.lock() else {
            return Recalled::Nothing;
        };
        match last.as_ref() {
            Some(last)
                if last.cache == cache && same_bytes(last.token.expose(), token.expose()) =>
            {
                match &last.answer {
                    Some((seen, entry)) if *seen == forgets && now < entry.fresh_until => {
                        Recalled::Answer(entry.status.clone())
                    }
                    _ => Recalled::Key(last.key),
                }
            }
            _ => Recalled::Nothing,
        }
    }

    /// Remembers `token` and its key (and no answer yet), in place of the last token.
    pub(super) fn remember(&self, cache: u64, token: &Token, key: Key) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(Remembered {
                cache,
                token: token.clone(),
                key,
                answer: None,
            });
        }
    }

    /// Remembers the cache's answer for the token of `key`, read when its invalidation count
    /// was `forgets`; nothing if the connection has moved on to another token meanwhile.
    pub(super) fn learn(&self, cache: u64, key: &Key, forgets: u64, entry: Entry) {
        if let Ok(mut last) = self.0.lock() {
            if let Some(last) = last
                .as_mut()
                .filter(|last| last.cache == cache && last.key == *key)
            {
                last.answer = Some((forgets, entry));
            }
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
    use std::time::{Duration, Instant};

    use super::*;

    fn recall(memo: &KeyMemo, cache: u64, token: &str) -> Recalled {
        memo.recall(cache, &Token::new(token), 0, Stamp::now())
    }

    fn entry(status: TokenStatus, fresh_for: Duration) -> Entry {
        let now = Instant::now();
        Entry {
            status,
            fresh_until: Stamp::at(now + fresh_for),
            stale_until: Stamp::at(now + fresh_for * 2),
            learnt: Stamp::at(now),
        }
    }

    #[test]
    fn recalls_only_the_same_token_for_the_same_cache() {
        Stamp::init();
        let memo = KeyMemo::default();
        assert_eq!(recall(&memo, 1, "token-a"), Recalled::Nothing);
        memo.remember(1, &Token::new("token-a"), [7; 32]);
        assert_eq!(recall(&memo, 1, "token-a"), Recalled::Key([7; 32]));
        assert_eq!(
            recall(&memo, 2, "token-a"),
            Recalled::Nothing,
            "another cache's key"
        );
        assert_eq!(recall(&memo, 1, "token-b"), Recalled::Nothing);
        assert_eq!(recall(&memo, 1, "token-"), Recalled::Nothing, "a prefix");
        assert_eq!(
            recall(&memo, 1, "token-aa"),
            Recalled::Nothing,
            "an extension"
        );
        memo.remember(1, &Token::new("token-b"), [9; 32]);
        assert_eq!(
            recall(&memo, 1, "token-a"),
            Recalled::Nothing,
            "only the last token is kept"
        );
        assert_eq!(recall(&memo, 1, "token-b"), Recalled::Key([9; 32]));
    }

    #[test]
    fn an_answer_is_recalled_only_while_fresh_and_nothing_was_invalidated() {
        Stamp::init();
        let memo = KeyMemo::default();
        let token = Token::new("token-a");
        memo.remember(1, &token, [7; 32]);
        memo.learn(
            1,
            &[7; 32],
            4,
            entry(TokenStatus::Invalid, Duration::from_secs(60)),
        );
        assert_eq!(
            memo.recall(1, &token, 4, Stamp::now()),
            Recalled::Answer(TokenStatus::Invalid)
        );
        assert_eq!(
            memo.recall(1, &token, 5, Stamp::now()),
            Recalled::Key([7; 32]),
            "an invalidation since the answer was read"
        );
        let later = Stamp::at(Instant::now() + Duration::from_secs(61));
        assert_eq!(
            memo.recall(1, &token, 4, later),
            Recalled::Key([7; 32]),
            "no longer fresh"
        );
        assert_eq!(
            memo.recall(2, &token, 4, Stamp::now()),
            Recalled::Nothing,
            "another cache"
        );
    }

    #[test]
    fn an_answer_for_a_token_the_connection_moved_on_from_is_not_kept() {
        Stamp::init();
        let memo = KeyMemo::default();
        memo.remember(1, &Token::new("token-a"), [7; 32]);
        memo.remember(1, &Token::new("token-b"), [9; 32]);
        // The lookup for token-a ends after token-b's request began.
        memo.learn(
            1,
            &[7; 32],
            0,
            entry(TokenStatus::Invalid, Duration::from_secs(60)),
        );
        assert_eq!(recall(&memo, 1, "token-b"), Recalled::Key([9; 32]));
        assert_eq!(recall(&memo, 1, "token-a"), Recalled::Nothing);
        // A new token starts with no answer.
        memo.learn(
            1,
            &[9; 32],
            0,
            entry(TokenStatus::Invalid, Duration::from_secs(60)),
        );
        memo.remember(1, &Token::new("token-a"), [7; 32]);
        assert_eq!(recall(&memo, 1, "token-a"), Recalled::Key([7; 32]));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let memo = KeyMemo::default();
        memo.remember(1, &Token::new("secret-token"), [0; 32]);
        assert!(!format!("{memo:?}").contains("secret"));
    }
}
