//! [`Stamp`]: an `Instant` in 8 bytes instead of 16, for the three timestamps every cache entry
//! holds.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// What every stamp counts from: the first time a cache asked (see [`Stamp::init`]).
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// A point in time as nanoseconds since [`EPOCH`]: as precise as `Instant` on Linux, and good
/// for 584 years of uptime.
///
/// Instants before the epoch all read as the epoch. That never reorders an entry's stamps:
/// entries are only made after [`Stamp::init`], and a comparison with an earlier instant
/// answers the same for all of them ("not before it").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp(u64);

impl Stamp {
    /// Fixes the epoch no later than now; called when a cache is built.
    pub(crate) fn init() {
        LazyLock::force(&EPOCH);
    }

    pub(crate) fn now() -> Stamp {
        Stamp::at(Instant::now())
    }

    pub(crate) fn at(instant: Instant) -> Stamp {
        let nanos = instant.saturating_duration_since(*EPOCH).as_nanos();
        Stamp(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// How long from `now` until this stamp; zero once it has passed.
    pub(crate) fn after(self, now: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(Stamp::at(now).0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_order_as_their_instants_do() {
        Stamp::init();
        let now = Instant::now();
        let later = now + Duration::from_nanos(1);
        assert!(Stamp::at(now) < Stamp::at(later));
        assert_eq!(Stamp::at(now), Stamp::at(now));
        assert!(Stamp::at(now + Duration::from_secs(3600)) > Stamp::now());
    }

    #[test]
    fn the_time_until_a_stamp_is_exact_and_never_negative() {
        Stamp::init();
        let now = Instant::now();
        let ttl = Duration::from_millis(1234) + Duration::from_nanos(5);
        assert_eq!(Stamp::at(now + ttl).after(now), ttl);
        assert_eq!(Stamp::at(now).after(now + ttl), Duration::ZERO);
    }

    #[test]
    fn instants_before_the_epoch_read_as_the_epoch() {
        Stamp::init();
        let before = EPOCH.checked_sub(Duration::from_secs(1));
        if let Some(before) = before {
            assert_eq!(Stamp::at(before), Stamp(0));
            assert!(Stamp::at(before) <= Stamp::now());
        }
    }

    #[test]
    fn far_futures_saturate() {
        Stamp::init();
        let far = Instant::now().checked_add(Duration::from_secs(600 * 365 * 86_400));
        if let Some(far) = far {
            assert_eq!(Stamp::at(far), Stamp(u64::MAX));
        }
    }
}
