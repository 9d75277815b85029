//! Rendezvous slots for pairing by code (PROTOCOL.md §10): where two
//! clients that share a short code meet to run their key exchange. Small,
//! bounded and in memory only: a slot lives at most ten minutes, holds a
//! few messages of at most 1 KiB each way, and is gone with a restart
//! (both sides are told and make a new code). Pure: the time is passed in
//! and the connection's I/O is the server's.

use std::collections::{HashMap, VecDeque};

use rand_core::RngCore;
use sealpost_proto::pair::{DEFAULT_TIMEOUT_SECS, MAX_PAIR_MESSAGE, MAX_PAIR_MESSAGES, MAX_SLOT};
use sealpost_proto::relay::MailboxId;

/// The bounds of a relay's rendezvous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairLimits {
    /// Slots open at once over the relay; 0 turns pairing off.
    pub max_slots: usize,
    /// Slots one mailbox owner may have open at once.
    pub per_owner: usize,
    /// Longest a slot lives (seconds).
    pub max_ttl_secs: u32,
}

impl Default for PairLimits {
    fn default() -> Self {
        Self {
            max_slots: 1024,
            per_owner: 4,
            max_ttl_secs: DEFAULT_TIMEOUT_SECS,
        }
    }
}

/// Why a rendezvous request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairFail {
    /// Every slot of the relay is taken.
    Full,
    /// The owner has as many slots open as it may.
    OwnerLimit,
    /// No open slot under this number: expired, or never opened.
    NoSuchSlot,
    /// Joined already (one attempt per code).
    Used,
    /// The other side left (after a failed exchange, or when done).
    OtherLeft,
    /// This connection is not a side of the slot.
    NotYours,
    /// This side put as many messages as a slot takes.
    TooMany,
    /// An empty or oversized message.
    BadMessage,
}

impl PairFail {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Full => "this relay has as many pairing invitations open as it allows; try again in a few minutes",
            Self::OwnerLimit => "this mailbox has as many pairing invitations open as it may; finish or cancel one first",
            Self::NoSuchSlot => "no pairing invitation is open under this number (it expired, was used, or never existed); ask for a new code",
            Self::Used => "this invitation was already used: a code allows one attempt; ask for a new code",
            Self::OtherLeft => "the other side left the pairing",
            Self::NotYours => "this connection did not open or join that pairing slot",
            Self::TooMany => "too many messages in one pairing slot",
            Self::BadMessage => "a pairing message must be 1 to 1024 bytes",
        }
    }
}

#[derive(Debug)]
struct Slot {
    owner: MailboxId,
    opener: u64,
    joiner: Option<u64>,
    expires_at_ms: u64,
    to_opener: VecDeque<Vec<u8>>,
    to_joiner: VecDeque<Vec<u8>>,
    sent_by_opener: usize,
    sent_by_joiner: usize,
    opener_left: bool,
    joiner_left: bool,
}

impl Slot {
    /// Connection `conn`'s side of the slot while it has not left it:
    /// `Some(true)` the opener, `Some(false)` the joiner.
    fn side(&self, conn: u64) -> Option<bool> {
        if self.opener == conn && !self.opener_left {
            Some(true)
        } else if self.joiner == Some(conn) && !self.joiner_left {
            Some(false)
        } else {
            None
        }
    }

    fn gone(&self) -> bool {
        self.opener_left && (self.joiner.is_none() || self.joiner_left)
    }
}

/// Every open slot of one relay.
#[derive(Debug)]
pub struct Rendezvous {
    limits: PairLimits,
    slots: HashMap<u32, Slot>,
}

impl Rendezvous {
    pub fn new(limits: PairLimits) -> Self {
        Self {
            limits,
            slots: HashMap::new(),
        }
    }

    pub fn offered(&self) -> bool {
        self.limits.max_slots > 0
    }

    /// Slots open now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Drops the slots whose time is up.
    pub fn expire(&mut self, now_ms: u64) {
        self.slots.retain(|_, s| s.expires_at_ms > now_ms);
    }

    /// Opens a slot for `owner` on connection `conn` for `ttl_secs`
    /// (clamped to 10 s..=the limit): its number, and when it ends (ms).
    /// Numbers are random among the few-digit ones, so a code stays short
    /// while few are open.
    pub fn open(
        &mut self,
        owner: MailboxId,
        conn: u64,
        ttl_secs: u32,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Result<(u32, u64), PairFail> {
        self.expire(now_ms);
        if self.slots.len() >= self.limits.max_slots {
            return Err(PairFail::Full);
        }
        if self.slots.values().filter(|s| s.owner == owner).count() >= self.limits.per_owner {
            return Err(PairFail::OwnerLimit);
        }
        // Numbers below 100 while fewer than 50 are open, below 1,000
        // while fewer than 500, …: at most half of them are taken.
        let mut bound: u64 = 100;
        while 2 * self.slots.len() as u64 + 1 >= bound && bound <= MAX_SLOT as u64 {
            bound *= 10;
        }
        let bound = bound.min(MAX_SLOT as u64 + 1);
        let mut slot = 0;
        for _ in 0..64 {
            let n = 1 + (rng.next_u64() % (bound - 1)) as u32;
            if !self.slots.contains_key(&n) {
                slot = n;
                break;
            }
        }
        if slot == 0 {
            slot = (1..=MAX_SLOT)
                .find(|n| !self.slots.contains_key(n))
                .ok_or(PairFail::Full)?;
        }
        let ttl = ttl_secs.clamp(10, self.limits.max_ttl_secs.max(10));
        let expires_at_ms = now_ms + ttl as u64 * 1000;
        self.slots.insert(
            slot,
            Slot {
                owner,
                opener: conn,
                joiner: None,
                expires_at_ms,
                to_opener: VecDeque::new(),
                to_joiner: VecDeque::new(),
                sent_by_opener: 0,
                sent_by_joiner: 0,
                opener_left: false,
                joiner_left: false,
            },
        );
        Ok((slot, expires_at_ms))
    }

    /// The open slot `slot`, for a message `data` to put in it.
    fn slot_for(&mut self, slot: u32, data: &[u8], now_ms: u64) -> Result<&mut Slot, PairFail> {
        check_message(data)?;
        self.expire(now_ms);
        self.slots.get_mut(&slot).ok_or(PairFail::NoSuchSlot)
    }

    /// Joins `slot` from connection `conn` with the first message for the
    /// opener. Once per slot: a second join, whoever makes it, is refused.
    pub fn join(
        &mut self,
        slot: u32,
        conn: u64,
        data: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), PairFail> {
        let s = self.slot_for(slot, &data, now_ms)?;
        if s.joiner.is_some() {
            return Err(PairFail::Used);
        }
        if s.opener_left {
            return Err(PairFail::NoSuchSlot);
        }
        if s.opener == conn {
            return Err(PairFail::NotYours);
        }
        s.joiner = Some(conn);
        s.sent_by_joiner = 1;
        s.to_opener.push_back(data);
        Ok(())
    }

    /// Puts a message from connection `conn`'s side for the other side.
    pub fn send(
        &mut self,
        slot: u32,
        conn: u64,
        data: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), PairFail> {
        let s = self.slot_for(slot, &data, now_ms)?;
        let (sent, queue, left) = match s.side(conn) {
            Some(true) => (&mut s.sent_by_opener, &mut s.to_joiner, s.joiner_left),
            Some(false) => (&mut s.sent_by_joiner, &mut s.to_opener, s.opener_left),
            None => return Err(PairFail::NotYours),
        };
        if left {
            return Err(PairFail::OtherLeft);
        }
        if *sent >= MAX_PAIR_MESSAGES {
            return Err(PairFail::TooMany);
        }
        *sent += 1;
        queue.push_back(data);
        Ok(())
    }

    /// Takes the other side's next message for connection `conn`: `None`
    /// while there is none yet (wait and ask again).
    pub fn take(&mut self, slot: u32, conn: u64, now_ms: u64) -> Result<Option<Vec<u8>>, PairFail> {
        self.expire(now_ms);
        let s = self.slots.get_mut(&slot).ok_or(PairFail::NoSuchSlot)?;
        let (queue, left) = match s.side(conn) {
            Some(true) => (&mut s.to_opener, s.joiner_left),
            Some(false) => (&mut s.to_joiner, s.opener_left),
            None => return Err(PairFail::NotYours),
        };
        match queue.pop_front() {
            Some(m) => Ok(Some(m)),
            None if left => Err(PairFail::OtherLeft),
            None => Ok(None),
        }
    }

    /// Connection `conn` leaves `slot` (or every slot, for `None`: the
    /// connection closed). A slot both sides left is dropped; one whose
    /// opener left before anyone joined can no longer be joined.
    pub fn leave(&mut self, slot: Option<u32>, conn: u64) {
        for (n, s) in self.slots.iter_mut() {
            if slot.is_some_and(|x| x != *n) {
                continue;
            }
            if s.opener == conn {
                s.opener_left = true;
            }
            if s.joiner == Some(conn) {
                s.joiner_left = true;
            }
        }
        self.slots.retain(|_, s| !s.gone());
    }

    /// Whether connection `conn` opened `slot` (`Some(false)`: joined it),
    /// while it has not left it.
    pub fn is_opener(&self, slot: u32, conn: u64) -> Option<bool> {
        self.slots.get(&slot)?.side(conn)
    }

    /// Whether connection `conn` is a side of any slot (so that a closing
    /// connection need not take the lock when it is not).
    pub fn holds(&self, conn: u64) -> bool {
        self.slots
            .values()
            .any(|s| s.opener == conn || s.joiner == Some(conn))
    }
}

fn check_message(data: &[u8]) -> Result<(), PairFail> {
    if data.is_empty() || data.len() > MAX_PAIR_MESSAGE {
        return Err(PairFail::BadMessage);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    const ALICE: MailboxId = MailboxId([1; 32]);

    fn r() -> Rendezvous {
        Rendezvous::new(PairLimits::default())
    }

    #[test]
    fn an_exchange_runs_through_a_slot() {
        let mut z = r();
        let (n, exp) = z.open(ALICE, 1, 600, 0, &mut OsRng).expect("parses");
        assert!((1..100).contains(&n), "short numbers while few are open");
        assert_eq!(exp, 600_000);
        z.send(n, 1, b"X".to_vec(), 1).expect("parses");
        assert_eq!(z.take(n, 1, 1), Ok(None));
        z.join(n, 2, b"Y".to_vec(), 2).expect("parses");
        assert_eq!(z.take(n, 2, 3), Ok(Some(b"X".to_vec())));
        assert_eq!(z.take(n, 1, 3), Ok(Some(b"Y".to_vec())));
        z.send(n, 2, b"card B".to_vec(), 4).expect("parses");
        assert_eq!(z.take(n, 1, 5), Ok(Some(b"card B".to_vec())));
        z.send(n, 1, b"card A".to_vec(), 6).expect("parses");
        // The opener leaves at once; its last message still reaches B.
        z.leave(Some(n), 1);
        assert_eq!(z.take(n, 2, 7), Ok(Some(b"card A".to_vec())));
        assert_eq!(z.take(n, 2, 7), Err(PairFail::OtherLeft));
        z.leave(None, 2);
        assert!(z.is_empty());
    }

    #[test]
    fn one_join_per_slot_and_sides_are_checked() {
        let mut z = r();
        let (n, _) = z.open(ALICE, 1, 600, 0, &mut OsRng).expect("parses");
        assert_eq!(z.join(n, 1, b"Y".to_vec(), 0), Err(PairFail::NotYours));
        z.join(n, 2, b"Y".to_vec(), 0).expect("parses");
        assert_eq!(z.join(n, 3, b"Y".to_vec(), 0), Err(PairFail::Used));
        assert_eq!(z.send(n, 3, b"Z".to_vec(), 0), Err(PairFail::NotYours));
        assert_eq!(z.take(n, 3, 0), Err(PairFail::NotYours));
        assert_eq!(
            z.join(n + 1, 3, b"Y".to_vec(), 0),
            Err(PairFail::NoSuchSlot)
        );
        assert_eq!(z.send(n, 2, vec![], 0), Err(PairFail::BadMessage));
        assert_eq!(
            z.send(n, 2, vec![0; MAX_PAIR_MESSAGE + 1], 0),
            Err(PairFail::BadMessage)
        );
        for _ in 1..MAX_PAIR_MESSAGES {
            z.send(n, 2, b"m".to_vec(), 0).expect("parses");
        }
        assert_eq!(z.send(n, 2, b"m".to_vec(), 0), Err(PairFail::TooMany));
    }

    #[test]
    fn slots_expire_and_a_left_invitation_cannot_be_joined() {
        let mut z = r();
        let (n, exp) = z.open(ALICE, 1, 30, 1_000, &mut OsRng).expect("parses");
        assert_eq!(exp, 31_000);
        assert_eq!(z.take(n, 1, 31_000), Err(PairFail::NoSuchSlot));
        assert!(z.is_empty());
        let (n, _) = z.open(ALICE, 1, 30, 0, &mut OsRng).expect("parses");
        z.leave(Some(n), 1);
        assert_eq!(z.join(n, 2, b"Y".to_vec(), 0), Err(PairFail::NoSuchSlot));
        // A ttl beyond the limit is cut to it.
        let (_, exp) = z.open(ALICE, 1, u32::MAX, 0, &mut OsRng).expect("parses");
        assert_eq!(exp, DEFAULT_TIMEOUT_SECS as u64 * 1000);
    }

    #[test]
    fn slots_are_bounded_per_owner_and_per_relay() {
        let mut z = Rendezvous::new(PairLimits {
            max_slots: 6,
            per_owner: 4,
            max_ttl_secs: 600,
        });
        for _ in 0..4 {
            z.open(ALICE, 1, 60, 0, &mut OsRng).expect("parses");
        }
        assert_eq!(
            z.open(ALICE, 1, 60, 0, &mut OsRng),
            Err(PairFail::OwnerLimit)
        );
        let bob = MailboxId([2; 32]);
        z.open(bob, 2, 60, 0, &mut OsRng).expect("parses");
        z.open(bob, 2, 60, 0, &mut OsRng).expect("parses");
        assert_eq!(z.open(bob, 2, 60, 0, &mut OsRng), Err(PairFail::Full));
        assert!(!Rendezvous::new(PairLimits {
            max_slots: 0,
            ..PairLimits::default()
        })
        .offered());
    }

    #[test]
    fn numbers_stay_below_100_while_fewer_than_50_are_open() {
        let mut z = Rendezvous::new(PairLimits {
            max_slots: 2000,
            per_owner: 2000,
            max_ttl_secs: 600,
        });
        for i in 0..50u64 {
            let (n, _) = z.open(ALICE, i, 60, 0, &mut OsRng).expect("opens");
            assert!(n < 100, "{n} with {i} open");
        }
    }

    #[test]
    fn numbers_grow_only_with_the_slots_open() {
        let mut z = Rendezvous::new(PairLimits {
            max_slots: 2000,
            per_owner: 2000,
            max_ttl_secs: 600,
        });
        let mut max = 0;
        for i in 0..1500u64 {
            let (n, _) = z.open(ALICE, i, 60, 0, &mut OsRng).expect("parses");
            max = max.max(n);
        }
        assert_eq!(z.len(), 1500);
        assert!(max < 10_000, "{max}");
    }

    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Open { owner: u8, conn: u64, ttl: u32 },
        Join { slot: usize, conn: u64, len: usize },
        Send { slot: usize, conn: u64, len: usize },
        Take { slot: usize, conn: u64 },
        Leave { slot: Option<usize>, conn: u64 },
        Wait { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 0u64..6, 0u32..700).prop_map(|(owner, conn, ttl)| Op::Open {
                owner,
                conn,
                ttl
            }),
            (0usize..8, 0u64..6, 0usize..1100).prop_map(|(slot, conn, len)| Op::Join {
                slot,
                conn,
                len
            }),
            (0usize..8, 0u64..6, 0usize..1100).prop_map(|(slot, conn, len)| Op::Send {
                slot,
                conn,
                len
            }),
            (0usize..8, 0u64..6).prop_map(|(slot, conn)| Op::Take { slot, conn }),
            (proptest::option::of(0usize..8), 0u64..6)
                .prop_map(|(slot, conn)| Op::Leave { slot, conn }),
            (0u64..200_000).prop_map(|ms| Op::Wait { ms }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever clients do, in any order: the bounds hold, a slot is
        /// joined once, each side takes exactly what the other put, in
        /// order, and nothing outlives its slot's time.
        #[test]
        fn prop_slots_keep_their_bounds_and_order(ops in proptest::collection::vec(op(), 1..120)) {
            let limits = PairLimits { max_slots: 5, per_owner: 2, max_ttl_secs: 600 };
            let mut z = Rendezvous::new(limits);
            let mut now = 0u64;
            let mut opened: Vec<u32> = Vec::new();
            // What each direction of each slot still owes: (slot, to_opener) → messages.
            let mut owed: HashMap<(u32, bool), VecDeque<Vec<u8>>> = HashMap::new();
            let mut n = 0u8;
            for op in ops {
                match op {
                    Op::Open { owner, conn, ttl } => {
                        if let Ok((slot, exp)) = z.open(MailboxId([owner; 32]), conn, ttl, now, &mut OsRng) {
                            prop_assert!(exp > now && exp <= now + 600_000);
                            prop_assert!((1..=MAX_SLOT).contains(&slot));
                            opened.push(slot);
                            owed.remove(&(slot, true));
                            owed.remove(&(slot, false));
                        }
                    }
                    Op::Join { slot, conn, len } | Op::Send { slot, conn, len } => {
                        let Some(&s) = opened.get(slot) else { continue };
                        n = n.wrapping_add(1);
                        let msg = vec![n; len];
                        let joining = matches!(op, Op::Join { .. });
                        let side = z.is_opener(s, conn);
                        let r = if joining { z.join(s, conn, msg.clone(), now) } else { z.send(s, conn, msg.clone(), now) };
                        if r.is_ok() {
                            prop_assert!(!msg.is_empty() && msg.len() <= MAX_PAIR_MESSAGE);
                            let to_opener = if joining { true } else { side == Some(false) };
                            owed.entry((s, to_opener)).or_default().push_back(msg);
                            prop_assert!(owed[&(s, to_opener)].len() <= MAX_PAIR_MESSAGES);
                        }
                        if joining && r.is_ok() {
                            prop_assert_eq!(z.join(s, 99, vec![1], now), Err(PairFail::Used));
                        }
                    }
                    Op::Take { slot, conn } => {
                        let Some(&s) = opened.get(slot) else { continue };
                        let side = z.is_opener(s, conn);
                        match z.take(s, conn, now) {
                            Ok(Some(m)) => {
                                let to_opener = side == Some(true);
                                let want = owed.get_mut(&(s, to_opener)).and_then(|q| q.pop_front());
                                prop_assert_eq!(Some(m), want, "in order, to the other side only");
                            }
                            Ok(None) => {
                                let to_opener = side == Some(true);
                                prop_assert!(owed.get(&(s, to_opener)).is_none_or(|q| q.is_empty()));
                            }
                            Err(_) => {}
                        }
                    }
                    Op::Leave { slot, conn } => {
                        let s = slot.and_then(|i| opened.get(i).copied());
                        if slot.is_some() && s.is_none() {
                            continue;
                        }
                        z.leave(s, conn);
                    }
                    Op::Wait { ms } => now += ms,
                }
                z.expire(now);
                prop_assert!(z.len() <= limits.max_slots);
                for owner in 0..3u8 {
                    let held = z.slots.values().filter(|s| s.owner == MailboxId([owner; 32])).count();
                    prop_assert!(held <= limits.per_owner);
                }
                for (num, s) in &z.slots {
                    prop_assert!(s.expires_at_ms > now, "slot {num} outlived its time");
                    prop_assert!(s.to_opener.len() <= MAX_PAIR_MESSAGES && s.to_joiner.len() <= MAX_PAIR_MESSAGES);
                    prop_assert!(!s.gone());
                }
                // Slots that are gone owe nothing any more.
                owed.retain(|(num, _), _| z.slots.contains_key(num));
            }
        }
    }
}
