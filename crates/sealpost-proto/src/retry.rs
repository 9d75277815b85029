//! Retry timing: exponential backoff with jitter, as a pure function.

use std::time::Duration;

/// How retries are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (0 for the first retry):
    /// `base * 2^attempt`, capped at `max`, of which a random half is kept
    /// ("equal jitter"), so that many clients cut off at the same moment do
    /// not all come back at the same moment. `unit` is uniform in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self
            .base
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(0, 0.999_999).as_millis(), 99);
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay(30, 0.0), Duration::from_secs(30));
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(60));
    }
}
