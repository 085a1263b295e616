//! The billing clock: where billing reads the time (snapshot storage
//! figures and their accrual, the meter, ledger rows, credit exhaustion
//! and the grace stops), behind a narrow trait so that tests drive it.
//! [`SystemClock`] is the real one; [`FakeClock`] follows the system
//! clock until a test sets it, then stays where it is put.

use std::sync::atomic::{AtomicI64, Ordering};

/// A source of the current time, Unix milliseconds.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::db::now_ms()
    }
}

/// A clock tests set: the system time until [`FakeClock::set`], then the
/// time set (moved only by `set` and [`FakeClock::advance`]).
#[derive(Debug)]
pub struct FakeClock {
    /// The time set; `FOLLOW` while it follows the system clock.
    ms: AtomicI64,
}

const FOLLOW: i64 = i64::MIN;

impl Default for FakeClock {
    fn default() -> Self {
        Self {
            ms: AtomicI64::new(FOLLOW),
        }
    }
}

impl FakeClock {
    /// Stops the clock at `ms`.
    pub fn set(&self, ms: i64) {
        self.ms.store(ms, Ordering::SeqCst);
    }

    /// Moves a stopped clock on by `ms` (stops it at now + `ms` first if
    /// it still follows the system clock); returns the new time.
    pub fn advance(&self, ms: i64) -> i64 {
        let now = self.now_ms();
        self.set(now + ms);
        now + ms
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> i64 {
        match self.ms.load(Ordering::SeqCst) {
            FOLLOW => crate::db::now_ms(),
            ms => ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_follows_until_set() {
        let c = FakeClock::default();
        let real = SystemClock.now_ms();
        assert!((c.now_ms() - real).abs() < 60_000);
        c.set(1_000);
        assert_eq!(c.now_ms(), 1_000);
        assert_eq!(c.advance(500), 1_500);
        assert_eq!(c.now_ms(), 1_500);
    }
}
