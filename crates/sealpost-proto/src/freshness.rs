//! Freshness: expiry, clock skew and replay decisions.
//!
//! Pure decisions over times passed in; the agent stores the replay cache.
//! A message id is remembered until its message has expired (plus the skew
//! allowance): after that the expiry check refuses it anyway, so the cache
//! forgets it and stays bounded by the message rate times the lifetime.

use std::collections::HashMap;

use crate::error::OpenError;
use crate::message::{MessageHeader, MessageId};

/// Default allowance for clocks that disagree: five minutes, as Kerberos.
pub const DEFAULT_MAX_SKEW_SECS: u64 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreshnessPolicy {
    /// How far in the future a creation time may be.
    pub max_skew_secs: u64,
}

impl Default for FreshnessPolicy {
    fn default() -> Self {
        Self {
            max_skew_secs: DEFAULT_MAX_SKEW_SECS,
        }
    }
}

impl FreshnessPolicy {
    /// Refuses a message that has expired, never expires (see
    /// [`crate::message::NO_EXPIRY`]) or claims to be from the future.
    pub fn check(&self, header: &MessageHeader, now: u64) -> Result<(), OpenError> {
        if header.expires_at == crate::message::NO_EXPIRY {
            return Err(OpenError::NoExpiry);
        }
        if now >= header.expires_at {
            return Err(OpenError::Expired {
                expires_at: header.expires_at,
                now,
            });
        }
        if header.created_at > now.saturating_add(self.max_skew_secs) {
            return Err(OpenError::FromFuture {
                created_at: header.created_at,
                now,
                max_skew: self.max_skew_secs,
            });
        }
        Ok(())
    }

    /// Until when a replay cache must remember a message id.
    pub fn remember_until(&self, expires_at: u64) -> u64 {
        expires_at.saturating_add(self.max_skew_secs)
    }
}

/// An in-memory replay cache with the same rules as the agent's persistent
/// one: the reference for its behaviour and for tests.
#[derive(Debug, Default, Clone)]
pub struct ReplayCache {
    seen: HashMap<MessageId, u64>,
}

impl ReplayCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuses an id already seen, else remembers it until `forget_at`.
    pub fn check_and_insert(&mut self, id: MessageId, forget_at: u64) -> Result<(), OpenError> {
        if self.seen.contains_key(&id) {
            return Err(OpenError::Replayed { id });
        }
        self.seen.insert(id, forget_at);
        Ok(())
    }

    pub fn contains(&self, id: &MessageId) -> bool {
        self.seen.contains_key(id)
    }

    /// Forgets every id whose retention time has passed.
    pub fn prune(&mut self, now: u64) -> usize {
        let before = self.seen.len();
        self.seen.retain(|_, until| *until > now);
        before - self.seen.len()
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}
