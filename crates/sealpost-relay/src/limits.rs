//! Rate limits: token buckets with the clock passed in, so their behaviour
//! is tested without sleeping.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Instant;

/// `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// New connections per source address.
pub type PerAddress = PerKey<IpAddr>;

/// A token bucket per key (a source address; a relay's key). Buckets of
/// keys that have been quiet long enough to be full again are dropped, so
/// the map stays small; with a cap on keys (keys anyone can make, such
/// as relay keys), a new key while the map is full is refused until
/// quiet ones can be dropped.
#[derive(Debug)]
pub struct PerKey<K> {
    rate: f64,
    burst: f64,
    buckets: HashMap<K, TokenBucket>,
    last_prune: Instant,
    max_keys: usize,
}

impl<K: Hash + Eq> PerKey<K> {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self::with_max_keys(rate, burst, now, usize::MAX)
    }

    /// [`PerKey::new`] holding at most `max_keys` buckets.
    pub fn with_max_keys(rate: f64, burst: f64, now: Instant, max_keys: usize) -> Self {
        Self {
            rate,
            burst,
            buckets: HashMap::new(),
            last_prune: now,
            max_keys,
        }
    }

    /// Drops the buckets that are full again (their keys are as if new).
    fn prune(&mut self, now: Instant) {
        let full_after = self.burst / self.rate.max(1e-9);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last).as_secs_f64() < full_after);
        self.last_prune = now;
    }

    pub fn try_take(&mut self, key: K, now: Instant) -> bool {
        let since = now.saturating_duration_since(self.last_prune).as_secs_f64();
        if since > 60.0 {
            self.prune(now);
        }
        if self.buckets.len() >= self.max_keys && !self.buckets.contains_key(&key) {
            // Full: pruned at most once a second, so a flood of new keys
            // cannot make every request walk the map.
            if since >= 1.0 {
                self.prune(now);
            }
            if self.buckets.len() >= self.max_keys {
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::new(rate, burst, now))
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_refill_at_their_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        assert!(b.try_take(t0 + Duration::from_millis(150)));
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
    }

    #[test]
    fn a_full_map_of_keys_refuses_new_ones_until_old_ones_are_quiet() {
        let t0 = Instant::now();
        let mut p: PerKey<u8> = PerKey::with_max_keys(1.0, 2.0, t0, 2);
        assert!(p.try_take(1, t0));
        assert!(p.try_take(2, t0));
        assert!(!p.try_take(3, t0), "a third key while two are held");
        assert!(p.try_take(1, t0), "a known key goes on");
        // Once the first two are full again (2 s), the third takes a slot.
        let later = t0 + Duration::from_secs(3);
        assert!(p.try_take(3, later));
        assert!(p.buckets.len() <= 2);
    }

    #[test]
    fn addresses_are_limited_separately() {
        let t0 = Instant::now();
        let mut p = PerAddress::new(1.0, 2.0, t0);
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "::1".parse().expect("ip");
        assert!(p.try_take(a, t0) && p.try_take(a, t0));
        assert!(!p.try_take(a, t0));
        assert!(p.try_take(b, t0));
    }
}

/// File descriptors kept for what is not a connection: the store's
/// database and log, blob files being written (up to 64) and read, the
/// listener, metrics.
pub const FD_RESERVE: u64 = 256;
/// The default connection cap never goes above this, whatever the
/// file-descriptor limit allows (memory: an idle connection costs about
/// 15 KiB).
pub const MAX_DEFAULT_CONNECTIONS: usize = 65_536;

/// The process's file-descriptor limit: (soft limit before, soft limit
/// now), after raising the soft limit to the hard one. `None` if it cannot
/// be read.
pub fn raise_fd_limit() -> Option<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current?;
    if let Some(max) = lim.maximum {
        if max > before {
            let raised = rustix::process::Rlimit {
                current: Some(max),
                maximum: lim.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                return Some((before, max));
            }
        }
    }
    Some((before, before))
}

/// The connections `soft` file descriptors can hold, after
/// [`FD_RESERVE`]; at least 16.
pub fn connections_for_fds(soft: u64) -> usize {
    usize::try_from(soft.saturating_sub(FD_RESERVE))
        .unwrap_or(usize::MAX)
        .max(16)
}

#[cfg(test)]
mod fd_tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve() {
        assert_eq!(connections_for_fds(1024), 768);
        assert_eq!(connections_for_fds(100), 16);
        assert_eq!(connections_for_fds(1 << 20), (1 << 20) - 256);
        let (before, now) = raise_fd_limit().expect("readable");
        assert!(now >= before);
    }
}
