//! A relay that attacks pairing by code (PROTOCOL §10), for tests that
//! show the two sides catch it: it cannot learn the code, so whatever it
//! does ends with both sides failing and nothing pinned.

use std::collections::HashMap;
use std::sync::Mutex;

use rand_core::OsRng;
use sealpost_proto::pair::{Code, Exchange, Keys, Side, SEALED_CARD};
use sealpost_proto::{CardFields, ContactCard, Identity};
use sealpost_relay::tamper::Tamper;

/// How the relay attacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairAttack {
    /// Runs SPAKE2 itself with each side, on a code it guesses, and hands
    /// each side its own card (Mallory's) sealed under its key with that
    /// side: a man in the middle.
    Mitm,
    /// Passes the key exchange through and swaps each sealed card for
    /// bytes of the same length.
    SwapCards,
}

impl PairAttack {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mitm" => Some(Self::Mitm),
            "swap-cards" => Some(Self::SwapCards),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Slot {
    /// Its exchange with the joiner, waiting for the joiner's message.
    as_inviter: Option<Exchange>,
    /// Its message for the opener, sent in place of the joiner's.
    for_opener: Option<Vec<u8>>,
    with_opener: Option<Keys>,
    with_joiner: Option<Keys>,
}

/// The hooks (install with `Config::tamper`).
pub struct PairMitm {
    attack: PairAttack,
    mallory_id: Identity,
    mallory: ContactCard,
    slots: Mutex<HashMap<u32, Slot>>,
}

impl std::fmt::Debug for PairMitm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PairMitm({:?})", self.attack)
    }
}

impl PairMitm {
    pub fn new(attack: PairAttack) -> Self {
        let id = Identity::generate(&mut OsRng);
        let mallory = ContactCard::create(
            &id,
            CardFields {
                name: "mallory".into(),
                created_at: 1,
                relay: None,
            },
        )
        .unwrap_or_else(|_| unreachable!("a valid name"));
        Self {
            attack,
            mallory_id: id,
            mallory,
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl Tamper for PairMitm {
    fn pair(&self, slot: u32, from_opener: bool, data: &mut Vec<u8>) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        let s = slots.entry(slot).or_default();
        match self.attack {
            PairAttack::SwapCards => {
                if data.len() == SEALED_CARD {
                    let mut fake = vec![0u8; SEALED_CARD];
                    rand_core::RngCore::fill_bytes(&mut OsRng, &mut fake);
                    *data = fake;
                }
            }
            PairAttack::Mitm => {
                if from_opener && s.with_opener.is_none() && s.as_inviter.is_none() {
                    // The opener's SPAKE2 message: answer it as an
                    // accepter, and start an exchange of its own with
                    // whoever joins, on a guessed code.
                    let guess = Code::words(slot, 2, &mut OsRng);
                    let (b, y) = Exchange::start(Side::Accepter, &guess, OsRng);
                    s.with_opener = b.finish(data).ok();
                    s.for_opener = Some(y.to_vec());
                    let (a, x) = Exchange::start(Side::Inviter, &guess, OsRng);
                    s.as_inviter = Some(a);
                    *data = x.to_vec();
                } else if !from_opener && s.with_joiner.is_none() {
                    // The joiner's SPAKE2 message.
                    if let Some(a) = s.as_inviter.take() {
                        s.with_joiner = a.finish(data).ok();
                    }
                    if let Some(y) = s.for_opener.take() {
                        *data = y;
                    }
                } else {
                    // A sealed card: Mallory's instead, sealed for the
                    // side it goes to.
                    let keys = if from_opener {
                        &s.with_joiner
                    } else {
                        &s.with_opener
                    };
                    if let Some(k) = keys {
                        *data = k.seal_card(&self.mallory_id, &self.mallory);
                    }
                }
            }
        }
    }
}
