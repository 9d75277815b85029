//! The sender's view of one message to one recipient, as a pure state
//! machine over events and time (unix milliseconds).
//!
//! ```text
//!            accepted by the relay            valid receipt
//!  queued ───────────────────────────▶ submitted ─────────────▶ delivered
//!    │  ▲ transient failure: retry         │ no receipt by next_at:
//!    │  └── after backoff                  │ submit again (same bytes)
//!    │                                     │
//!    └─ signed refusal, signed rejection, or expiry ─────────▶ failed
//! ```
//!
//! `delivered` is final: only a receipt signed by the recipient, whose hash
//! and length match what was sent, leads there, and nothing leads out of
//! it. `failed` is final except that a valid receipt still wins (it is
//! proof that the content was stored).

use std::time::Duration;

use crate::report::{ReceiptEntry, RejectReason};
use crate::retry::Backoff;

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Queued,
    Submitted,
    /// Handed to the sender's own relay, which forwards it to the
    /// recipient's (PROTOCOL 6.8): "at your relay".
    Forwarding,
    Delivered,
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Submitted => "submitted",
            Self::Forwarding => "forwarding",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Submitted,
            Self::Forwarding,
            Self::Delivered,
            Self::Failed,
        ]
        .into_iter()
        .find(|v| v.name() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Delivered | Self::Failed)
    }
}

/// The code of a delivery the sender cancelled (`Failure::Local`).
pub const CANCELLED: &str = "cancelled";

/// Why a delivery failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The relay refused the submission with a signed refusal (its name).
    Refused { code: String, detail: String },
    /// The recipient refused it with a signed rejection.
    Rejected(RejectReason),
    /// It expired before a receipt arrived.
    Expired,
    /// The sender could not carry it out (a file that vanished or changed
    /// while it was being sent).
    Local { code: String, detail: String },
}

impl Failure {
    /// A stable short text for storage and `--json`.
    pub fn code(&self) -> String {
        match self {
            Self::Refused { code, .. } => format!("refused:{code}"),
            Self::Rejected(r) => format!("rejected:{}", r.name()),
            Self::Expired => "expired".to_owned(),
            Self::Local { code, .. } => format!("local:{code}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Refused { detail, .. } => format!("the relay refused it: {detail}"),
            Self::Rejected(r) => format!("the recipient rejected it: {}", r.describe()),
            Self::Expired => "it expired before the recipient's receipt arrived".to_owned(),
            Self::Local { detail, .. } => detail.clone(),
        }
    }
}

/// Retry timing for one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Wait after a failed attempt to reach the relay.
    pub submit: Backoff,
    /// Wait for a receipt after the relay accepted, before submitting the
    /// same bytes again.
    pub retransmit: Backoff,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            submit: Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(600),
            },
            retransmit: Backoff {
                base: Duration::from_secs(120),
                max: Duration::from_secs(4 * 3600),
            },
        }
    }
}

/// The state of one (message, recipient) pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub state: State,
    /// Submissions the relay accepted.
    pub submissions: u32,
    /// Failed attempts to reach the relay since the last acceptance.
    pub failed_attempts: u32,
    /// When the next submission is due (unix ms); meaningless once final.
    pub next_at: u64,
    /// The message's expiry (unix ms).
    pub expires_at: u64,
    pub failure: Option<Failure>,
    /// When the state last changed (unix ms).
    pub changed_at: u64,
}

/// What an event did, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed.
    Changed,
    /// The event came too late to matter (a final state); it is ignored.
    Ignored,
    /// A receipt whose hash or length differs from what was sent: the
    /// recipient stored something else. Not delivered; retransmission goes on.
    Mismatch,
}

/// What the sender holds for comparison with a receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub content_hash: [u8; 32],
    pub content_len: u64,
}

impl Delivery {
    /// A new delivery, due at once.
    pub fn new(now_ms: u64, expires_at_ms: u64) -> Self {
        Self {
            state: State::Queued,
            submissions: 0,
            failed_attempts: 0,
            next_at: now_ms,
            expires_at: expires_at_ms,
            failure: None,
            changed_at: now_ms,
        }
    }

    /// True if a submission should be made now.
    pub fn is_due(&self, now_ms: u64) -> bool {
        !self.state.is_final() && now_ms >= self.next_at && now_ms < self.expires_at
    }

    fn set(&mut self, state: State, now_ms: u64) {
        self.state = state;
        self.changed_at = now_ms;
    }

    /// The relay accepted a submission (it is durable there).
    pub fn accepted(&mut self, now_ms: u64, timing: &Timing, unit: f64) -> Outcome {
        if self.state.is_final() {
            return Outcome::Ignored;
        }
        let wait = timing.retransmit.delay(self.submissions, unit);
        self.submissions = self.submissions.saturating_add(1);
        self.failed_attempts = 0;
        self.next_at = now_ms.saturating_add(wait.as_millis() as u64);
        self.set(State::Submitted, now_ms);
        Outcome::Changed
    }

    /// The sender's own relay took it to forward (PROTOCOL 6.8): as
    /// [`Delivery::accepted`] (retransmitted on the same timer until a
    /// receipt), in state `Forwarding`.
    pub fn forwarded(&mut self, now_ms: u64, timing: &Timing, unit: f64) -> Outcome {
        let o = self.accepted(now_ms, timing, unit);
        if o == Outcome::Changed {
            self.set(State::Forwarding, now_ms);
        }
        o
    }

    /// Whether this attempt goes through the sender's own relay, when it
    /// forwards (PROTOCOL 8): the first, and from then on every other
    /// attempt, the others directly to the recipient's relay — so a
    /// sender's relay that accepts and never forwards delays a message by
    /// one retransmission at most wherever the recipient's relay answers
    /// the sender, and one the sender cannot reach costs a failed attempt
    /// (which turns the next one back to forwarding).
    pub fn forward_turn(&self) -> bool {
        self.submissions
            .wrapping_add(self.failed_attempts)
            .is_multiple_of(2)
    }

    /// The relay could not be reached or failed; try again after a backoff.
    pub fn transient_failure(&mut self, now_ms: u64, timing: &Timing, unit: f64) -> Outcome {
        if self.state.is_final() {
            return Outcome::Ignored;
        }
        let wait = timing.submit.delay(self.failed_attempts, unit);
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        self.next_at = now_ms.saturating_add(wait.as_millis() as u64);
        Outcome::Changed
    }

    /// The relay refused the submission with a verified signature.
    pub fn refused(&mut self, now_ms: u64, code: &str, detail: &str) -> Outcome {
        self.fail(
            now_ms,
            Failure::Refused {
                code: code.to_owned(),
                detail: detail.to_owned(),
            },
        )
    }

    /// The sender itself cannot go on (the source file changed or vanished).
    pub fn local_failure(&mut self, now_ms: u64, code: &str, detail: &str) -> Outcome {
        self.fail(
            now_ms,
            Failure::Local {
                code: code.to_owned(),
                detail: detail.to_owned(),
            },
        )
    }

    /// The recipient rejected the message with a verified signature.
    pub fn rejected(&mut self, now_ms: u64, reason: RejectReason) -> Outcome {
        self.fail(now_ms, Failure::Rejected(reason))
    }

    fn fail(&mut self, now_ms: u64, failure: Failure) -> Outcome {
        if self.state.is_final() {
            return Outcome::Ignored;
        }
        self.failure = Some(failure);
        self.set(State::Failed, now_ms);
        Outcome::Changed
    }

    /// A receipt entry signed by the recipient arrived.
    pub fn receipt(&mut self, now_ms: u64, sent: &Sent, entry: &ReceiptEntry) -> Outcome {
        if self.state == State::Delivered {
            return Outcome::Ignored;
        }
        if entry.content_hash != sent.content_hash || entry.content_len != sent.content_len {
            return Outcome::Mismatch;
        }
        self.failure = None;
        self.set(State::Delivered, now_ms);
        Outcome::Changed
    }

    /// The sender gave up on it: no more submissions or retransmissions.
    /// A copy already at the relay may still be fetched, and its receipt
    /// then moves the delivery to delivered (see [`Delivery::receipt`]).
    pub fn cancel(&mut self, now_ms: u64) -> Outcome {
        self.fail(
            now_ms,
            Failure::Local {
                code: CANCELLED.to_owned(),
                detail: "cancelled by the sender".to_owned(),
            },
        )
    }

    /// Time passed: a delivery still waiting at its expiry has failed.
    pub fn tick(&mut self, now_ms: u64) -> Outcome {
        if !self.state.is_final() && now_ms >= self.expires_at {
            return self.fail(now_ms, Failure::Expired);
        }
        Outcome::Ignored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;
    use proptest::prelude::*;

    const SENT: Sent = Sent {
        content_hash: [1; 32],
        content_len: 10,
    };

    fn entry(hash: u8, len: u64) -> ReceiptEntry {
        ReceiptEntry {
            id: MessageId([0; 16]),
            content_hash: [hash; 32],
            content_len: len,
            stored_at: 0,
        }
    }

    /// With forwarding on, the first attempt goes through the sender's
    /// relay, the retransmission after its acceptance directly, and an
    /// attempt that failed turns the next back to the sender's relay.
    #[test]
    fn forwarded_and_direct_attempts_alternate() {
        let t = Timing::default();
        let mut d = Delivery::new(1000, 1_000_000_000);
        assert!(d.forward_turn(), "first through the sender's relay");
        d.forwarded(1000, &t, 0.0);
        assert!(!d.forward_turn(), "its retransmission directly");
        d.transient_failure(70_000, &t, 0.0);
        assert!(d.forward_turn(), "the recipient's relay did not answer");
        d.forwarded(72_000, &t, 0.0);
        assert!(
            d.forward_turn(),
            "two acceptances: the turn is counted anew"
        );
        d.forwarded(200_000, &t, 0.0);
        assert!(!d.forward_turn());
        d.accepted(400_000, &t, 0.0);
        assert!(d.forward_turn(), "after a direct one, forwarded again");
    }

    #[test]
    fn happy_path_and_retransmission() {
        let t = Timing::default();
        let mut d = Delivery::new(1000, 1_000_000_000);
        assert!(d.is_due(1000));
        d.transient_failure(1000, &t, 0.0);
        assert!(!d.is_due(1999) && d.is_due(2000));
        d.accepted(2000, &t, 0.0);
        assert_eq!(d.state, State::Submitted);
        assert!(!d.is_due(61_999) && d.is_due(62_000));
        d.accepted(62_000, &t, 0.0);
        assert_eq!(d.next_at, 62_000 + 120_000);
        assert_eq!(d.receipt(70_000, &SENT, &entry(2, 10)), Outcome::Mismatch);
        assert_eq!(d.receipt(70_000, &SENT, &entry(1, 11)), Outcome::Mismatch);
        assert_eq!(d.state, State::Submitted);
        assert_eq!(d.receipt(70_000, &SENT, &entry(1, 10)), Outcome::Changed);
        assert_eq!(d.state, State::Delivered);
        assert!(!d.is_due(u64::MAX - 1));
        assert_eq!(
            d.rejected(80_000, RejectReason::Expired),
            Outcome::Ignored,
            "a rejection after a receipt changes nothing"
        );
        assert_eq!(d.tick(u64::MAX), Outcome::Ignored);
        assert_eq!(d.state, State::Delivered);
    }

    #[test]
    fn expiry_refusal_and_late_receipt() {
        let t = Timing::default();
        let mut d = Delivery::new(0, 5000);
        d.accepted(0, &t, 0.5);
        assert!(!d.is_due(5000), "never submitted at or after expiry");
        assert_eq!(d.tick(4999), Outcome::Ignored);
        assert_eq!(d.tick(5000), Outcome::Changed);
        assert_eq!(d.failure, Some(Failure::Expired));
        assert_eq!(d.receipt(6000, &SENT, &entry(1, 10)), Outcome::Changed);
        assert_eq!(d.state, State::Delivered);

        let mut d = Delivery::new(0, 5000);
        d.refused(1, "over-quota", "mailbox full");
        assert_eq!(
            d.failure.as_ref().expect("test").code(),
            "refused:over-quota"
        );
        assert_eq!(d.accepted(2, &t, 0.0), Outcome::Ignored);
        assert_eq!(d.state, State::Failed);
    }

    #[derive(Clone, Debug)]
    enum Ev {
        Accepted(f64),
        Transient(f64),
        Refused,
        Rejected,
        Receipt(bool),
        Tick,
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0.0..1.0f64).prop_map(Ev::Accepted),
            (0.0..1.0f64).prop_map(Ev::Transient),
            Just(Ev::Refused),
            Just(Ev::Rejected),
            any::<bool>().prop_map(Ev::Receipt),
            Just(Ev::Tick),
        ]
    }

    proptest! {
        /// Whatever happens: delivered is only reached by a matching
        /// receipt and never left; nothing is due once final or expired;
        /// the schedule never goes backwards.
        #[test]
        fn invariants(events in proptest::collection::vec((ev(), 0u64..100_000), 0..40)) {
            let t = Timing::default();
            let mut now = 0u64;
            let mut d = Delivery::new(now, 600_000);
            for (e, step) in events {
                now += step;
                let before = d.clone();
                match e {
                    Ev::Accepted(u) => { d.accepted(now, &t, u); }
                    Ev::Transient(u) => { d.transient_failure(now, &t, u); }
                    Ev::Refused => { d.refused(now, "unknown-mailbox", "x"); }
                    Ev::Rejected => { d.rejected(now, RejectReason::NotAContact); }
                    Ev::Receipt(good) => {
                        let e = if good { entry(1, 10) } else { entry(9, 10) };
                        d.receipt(now, &SENT, &e);
                        if !good { prop_assert_eq!(&d, &before); }
                    }
                    Ev::Tick => { d.tick(now); }
                }
                if before.state == State::Delivered { prop_assert_eq!(&d, &before); }
                if d.state == State::Delivered && before.state != State::Delivered {
                    prop_assert!(matches!(e, Ev::Receipt(true)));
                }
                if d.state.is_final() || now >= d.expires_at { prop_assert!(!d.is_due(now)); }
                if !d.state.is_final() { prop_assert!(d.next_at >= before.next_at.min(now)); }
            }
        }
    }
}
