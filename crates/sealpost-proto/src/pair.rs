//! Pairing by short code (PROTOCOL.md §10): two people who can talk (by
//! phone, in the same room) exchange contact cards through a relay with a
//! password-authenticated key exchange, so that a code short enough to read
//! aloud replaces copying cards and comparing fingerprints.
//!
//! Pure: codes, the SPAKE2 exchange and the sealed card messages. The
//! relay's rendezvous slots and the I/O live elsewhere.
//!
//! ```text
//! inviter (A)                        relay                 accepter (B)
//!   PairOpen ───────────────────────▶ slot n
//!   PairSend(n, X)                    ──────────────────▶ PairJoin(n, Y) → X
//!   PairWait(n) → Y, then E_B(card_B) ◀────────────────── PairSend(n, E_B(card_B))
//!   PairSend(n, E_A(card_A))          ──────────────────▶ PairWait(n) → E_A(card_A)
//! ```
//!
//! `X`, `Y` are SPAKE2 messages over the code; `E_A`, `E_B` ChaCha20-Poly1305
//! under keys derived from the SPAKE2 key and the transcript. Opening `E_B`
//! is A's proof that B knew the code, opening `E_A` B's proof of A; a
//! guess that is wrong (or a relay that runs SPAKE2 with each side on its
//! own) fails to open and nothing is pinned. Inside each sealed card, the
//! card's own key signs the transcript: knowing the code is not enough to
//! hand over somebody else's card as one's own.

pub mod words;

use crate::card::{ContactCard, MAX_CARD_BYTES};
use crate::identity::{context, Identity};
use spake2::{Ed25519Group, Identity as PakeId, Password, Spake2};
use zeroize::{Zeroize, Zeroizing};

/// SPAKE2's identity of the side that opened the slot.
pub const INVITER: &[u8] = b"sealpost v1 pair inviter";
/// SPAKE2's identity of the side that joined it.
pub const ACCEPTER: &[u8] = b"sealpost v1 pair accepter";
/// Bytes of one SPAKE2 message (a side byte and an Ed25519 point).
pub const PAKE_MESSAGE: usize = 33;
/// Bytes of a sealed card: `len:u16 || card || zeros` padded to one size
/// (so the relay does not learn the card's length), the card key's 64-byte
/// signature of the transcript, and the 16-byte tag.
pub const SEALED_CARD: usize = 2 + MAX_CARD_BYTES + 64 + 16;
/// Largest message a rendezvous slot carries (PairJoin, PairSend).
pub const MAX_PAIR_MESSAGE: usize = 1024;
/// Most messages one side may put in a slot.
pub const MAX_PAIR_MESSAGES: usize = 4;
/// Largest slot number a relay hands out (codes stay at most six digits).
pub const MAX_SLOT: u32 = 999_999;
/// How long an invitation waits by default, and at most (seconds).
pub const DEFAULT_TIMEOUT_SECS: u32 = 600;
/// Fewest and most code words (each word is one byte of the secret).
pub const MIN_WORDS: usize = 2;
pub const MAX_WORDS: usize = 8;
/// Bytes of an invitation's secret (the QR form): 128 bits.
pub const INVITATION_SECRET: usize = 16;
/// What an invitation's text starts with.
pub const INVITATION_PREFIX: &str = "sealpost-invite:";

/// Why a code or an exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PairError {
    #[error("not a pairing code: {0}")]
    NotACode(&'static str),
    #[error("{word:?} (word {position}) is not in the code's word list; check the spelling")]
    UnknownWord { word: String, position: usize },
    #[error("{word:?} is a {is} word, but word {position} of a code is a {wanted} one; two words may be swapped")]
    WrongPosition {
        word: String,
        position: usize,
        is: &'static str,
        wanted: &'static str,
    },
    #[error("the other side's key-exchange message is malformed")]
    BadPakeMessage,
    /// The other side's sealed card did not open: it used another code (a
    /// wrong guess, or someone in the middle running its own exchange).
    #[error(
        "the other side did not prove it knows the code (a wrong code, or someone in the middle)"
    )]
    NotConfirmed,
    /// The card opened (the other side knew the code) but its key did not
    /// sign this exchange: the card is not the sender's own.
    #[error("the other side knew the code but sent a card that is not its own (its key did not sign this exchange)")]
    NotTheirCard,
    #[error("the other side's card is invalid: {0}")]
    BadCard(String),
}

/// What is secret in a code: words (one byte each, read aloud) or a
/// random 16-byte token (an invitation passed as a QR code or link).
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Words(Vec<u8>),
    Token([u8; INVITATION_SECRET]),
}

impl Drop for Secret {
    fn drop(&mut self) {
        match self {
            Self::Words(w) => w.zeroize(),
            Self::Token(t) => t.zeroize(),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A pairing code: the relay's slot number and the secret, written
/// `7-crossover-clockwork` (words) or `7-<26 base32 letters>` (token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Code {
    pub slot: u32,
    pub secret: Secret,
}

impl Code {
    /// A new code for `slot` with `words` random words (clamped to
    /// [`MIN_WORDS`]..=[`MAX_WORDS`]).
    pub fn words(slot: u32, words: usize, rng: &mut impl rand_core::CryptoRngCore) -> Self {
        let mut b = vec![0u8; words.clamp(MIN_WORDS, MAX_WORDS)];
        rng.fill_bytes(&mut b);
        Self {
            slot,
            secret: Secret::Words(b),
        }
    }

    /// A new code for `slot` with a 128-bit token (for invitations).
    pub fn token(slot: u32, rng: &mut impl rand_core::CryptoRngCore) -> Self {
        let mut t = [0u8; INVITATION_SECRET];
        rng.fill_bytes(&mut t);
        Self {
            slot,
            secret: Secret::Token(t),
        }
    }

    /// The text people read and type: `7-crossover-clockwork`.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(self.slot.to_string());
        match &self.secret {
            Secret::Words(w) => {
                for (i, b) in w.iter().enumerate() {
                    s.push('-');
                    s.push_str(word(i, *b));
                }
            }
            Secret::Token(t) => {
                s.push('-');
                s.push_str(&data_encoding::BASE32_NOPAD.encode(t).to_ascii_lowercase());
            }
        }
        s
    }

    /// Parses a code as typed: case and spaces around it do not matter,
    /// words may be separated by `-` or spaces. Checks every word before
    /// anything is sent, so a typo does not burn the invitation.
    pub fn parse(text: &str) -> Result<Self, PairError> {
        let text = text.trim();
        if text.len() > 256 {
            return Err(PairError::NotACode("longer than any code"));
        }
        let lower = Zeroizing::new(text.to_ascii_lowercase());
        let mut parts = lower
            .split(|c: char| c == '-' || c.is_whitespace())
            .filter(|p| !p.is_empty());
        let slot = parts.next().ok_or(PairError::NotACode("it is empty"))?;
        if slot.is_empty() || slot.len() > 6 || !slot.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PairError::NotACode(
                "it must start with the invitation's number, e.g. 7-crossover-clockwork",
            ));
        }
        let slot: u32 = slot
            .parse()
            .map_err(|_| PairError::NotACode("bad number"))?;
        if slot == 0 {
            return Err(PairError::NotACode("invitation numbers start at 1"));
        }
        let rest: Vec<&str> = parts.collect();
        if rest.len() == 1 && rest[0].len() == 26 {
            if let Ok(t) =
                data_encoding::BASE32_NOPAD.decode(rest[0].to_ascii_uppercase().as_bytes())
            {
                let token: [u8; INVITATION_SECRET] = t
                    .try_into()
                    .map_err(|_| PairError::NotACode("bad invitation secret"))?;
                return Ok(Self {
                    slot,
                    secret: Secret::Token(token),
                });
            }
        }
        if rest.len() < MIN_WORDS {
            return Err(PairError::NotACode(
                "it needs the number and at least two words, e.g. 7-crossover-clockwork",
            ));
        }
        if rest.len() > MAX_WORDS {
            return Err(PairError::NotACode("it has more words than any code"));
        }
        let mut bytes = Vec::with_capacity(rest.len());
        for (i, w) in rest.iter().enumerate() {
            bytes.push(byte_of(i, w)?);
        }
        Ok(Self {
            slot,
            secret: Secret::Words(bytes),
        })
    }

    /// What SPAKE2 takes as the password: a context string and the
    /// canonical text (slot and secret).
    fn password(&self) -> Password {
        let mut p = Zeroizing::new(b"sealpost v1 pair code\0".to_vec());
        p.extend_from_slice(self.to_text().as_bytes());
        Password::new(p.as_slice())
    }

    /// Bits an attacker must guess in one attempt.
    pub fn entropy_bits(&self) -> usize {
        match &self.secret {
            Secret::Words(w) => w.len() * 8,
            Secret::Token(t) => t.len() * 8,
        }
    }
}

/// The word for byte `b` at position `i` of a code.
pub fn word(i: usize, b: u8) -> &'static str {
    if i.is_multiple_of(2) {
        words::EVEN[b as usize]
    } else {
        words::ODD[b as usize]
    }
}

fn byte_of(i: usize, w: &str) -> Result<u8, PairError> {
    let (here, other, wanted, is) = if i.is_multiple_of(2) {
        (&words::EVEN, &words::ODD, "two-syllable", "three-syllable")
    } else {
        (&words::ODD, &words::EVEN, "three-syllable", "two-syllable")
    };
    if let Some(b) = here.iter().position(|x| *x == w) {
        return Ok(b as u8);
    }
    if other.contains(&w) {
        return Err(PairError::WrongPosition {
            word: w.to_owned(),
            position: i + 1,
            is,
            wanted,
        });
    }
    Err(PairError::UnknownWord {
        word: w.chars().take(32).collect(),
        position: i + 1,
    })
}

/// An invitation to pass whole (a QR code, a link): the relay where the
/// slot is open, with its pin, and the code (a token code, normally).
/// Written `sealpost-invite:CODE@RELAY`; a short code may be given in the
/// same `CODE@RELAY` form to name the inviter's relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invitation {
    pub code: Code,
    /// `host:port/PIN` as in a card (checked by whoever connects).
    pub relay: Option<String>,
}

impl Invitation {
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(INVITATION_PREFIX.to_owned());
        s.push_str(&self.code.to_text());
        if let Some(r) = &self.relay {
            s.push('@');
            s.push_str(r);
        }
        s
    }

    /// `CODE`, `CODE@RELAY` or `sealpost-invite:CODE@RELAY`.
    pub fn parse(text: &str) -> Result<Self, PairError> {
        let text = text.trim();
        if text.len() > 600 {
            return Err(PairError::NotACode("longer than any invitation"));
        }
        let text = text.strip_prefix(INVITATION_PREFIX).unwrap_or(text);
        let (code, relay) = match text.split_once('@') {
            Some((c, r)) => {
                let r = r.trim();
                if r.is_empty()
                    || r.len() > crate::card::MAX_RELAY_ADDR_BYTES + 80
                    || !r.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(PairError::NotACode("the relay after @ is not an address"));
                }
                (c, Some(r.to_owned()))
            }
            None => (text, None),
        };
        Ok(Self {
            code: Code::parse(code)?,
            relay,
        })
    }
}

/// Which side of the exchange this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Inviter,
    Accepter,
}

/// One side's exchange in progress: its SPAKE2 state and first message.
pub struct Exchange {
    side: Side,
    slot: u32,
    state: Spake2<Ed25519Group>,
    mine: [u8; PAKE_MESSAGE],
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Exchange({:?}, slot {})", self.side, self.slot)
    }
}

impl Exchange {
    /// Starts `side`'s half for `code`; the message goes to the other side.
    pub fn start(
        side: Side,
        code: &Code,
        rng: impl rand_core::CryptoRng + rand_core::RngCore,
    ) -> (Self, [u8; PAKE_MESSAGE]) {
        let (a, b) = (PakeId::new(INVITER), PakeId::new(ACCEPTER));
        let pw = code.password();
        let (state, msg) = match side {
            Side::Inviter => Spake2::<Ed25519Group>::start_a_with_rng(&pw, &a, &b, rng),
            Side::Accepter => Spake2::<Ed25519Group>::start_b_with_rng(&pw, &a, &b, rng),
        };
        let mut mine = [0u8; PAKE_MESSAGE];
        mine.copy_from_slice(&msg);
        (
            Self {
                side,
                slot: code.slot,
                state,
                mine,
            },
            mine,
        )
    }

    /// Finishes with the other side's message: the keys for the cards.
    pub fn finish(self, theirs: &[u8]) -> Result<Keys, PairError> {
        if theirs.len() != PAKE_MESSAGE {
            return Err(PairError::BadPakeMessage);
        }
        let key = Zeroizing::new(
            self.state
                .finish(theirs)
                .map_err(|_| PairError::BadPakeMessage)?,
        );
        let (x, y) = match self.side {
            Side::Inviter => (&self.mine[..], theirs),
            Side::Accepter => (theirs, &self.mine[..]),
        };
        let mut t = Vec::with_capacity(4 + 2 * PAKE_MESSAGE);
        t.extend_from_slice(&self.slot.to_be_bytes());
        t.extend_from_slice(x);
        t.extend_from_slice(y);
        let transcript = blake3::derive_key("sealpost v1 pair transcript", &t);
        let derive = |context: &str| {
            let mut m = Zeroizing::new(Vec::with_capacity(64));
            m.extend_from_slice(&key);
            m.extend_from_slice(&transcript);
            Zeroizing::new(blake3::derive_key(context, &m))
        };
        let a_to_b = derive("sealpost v1 pair inviter to accepter");
        let b_to_a = derive("sealpost v1 pair accepter to inviter");
        let (send, receive) = match self.side {
            Side::Inviter => (a_to_b, b_to_a),
            Side::Accepter => (b_to_a, a_to_b),
        };
        Ok(Keys {
            side: self.side,
            transcript,
            send,
            receive,
        })
    }
}

/// The keys of a finished exchange: one per direction, each used once.
pub struct Keys {
    side: Side,
    transcript: [u8; 32],
    send: Zeroizing<[u8; 32]>,
    receive: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn aead(key: &[u8; 32]) -> ring::aead::LessSafeKey {
    // 32 bytes is ChaCha20-Poly1305's key length: cannot fail.
    let k = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key)
        .unwrap_or_else(|_| unreachable!("a 32-byte key"));
    ring::aead::LessSafeKey::new(k)
}

impl Keys {
    /// The transcript hash both sides agree on (for tests and vectors).
    pub fn transcript(&self) -> &[u8; 32] {
        &self.transcript
    }

    /// The key this side seals its card with (for test vectors).
    pub fn send_key(&self) -> &[u8; 32] {
        &self.send
    }

    /// Seals this side's card for the other: `len:u16 || card` padded with
    /// zeros to `2 + MAX_CARD_BYTES`, then the card key's signature of
    /// [`proof_message`] for this side, all under ChaCha20-Poly1305 with
    /// this direction's key, nonce zero (each key seals one message), the
    /// transcript as associated data. `card` is `identity`'s own card (the
    /// other side refuses one whose key did not sign).
    pub fn seal_card(&self, identity: &Identity, card: &ContactCard) -> Vec<u8> {
        let bytes = card.as_bytes();
        let mut m = Vec::with_capacity(SEALED_CARD);
        m.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        m.extend_from_slice(bytes);
        m.resize(2 + MAX_CARD_BYTES, 0);
        m.extend_from_slice(&identity.sign(
            context::PAIR_PROOF,
            &proof_message(self.side, &self.transcript),
        ));
        aead(&self.send)
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
                ring::aead::Aad::from(self.transcript),
                &mut m,
            )
            .unwrap_or_else(|_| unreachable!("a card fits ChaCha20-Poly1305's limit"));
        m
    }

    /// Opens the other side's sealed card: the proof that it knew the code,
    /// and that the card is its own (its key signed this exchange).
    pub fn open_card(&self, sealed: &[u8]) -> Result<ContactCard, PairError> {
        if sealed.len() != SEALED_CARD {
            return Err(PairError::NotConfirmed);
        }
        let mut m = sealed.to_vec();
        let plain = aead(&self.receive)
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
                ring::aead::Aad::from(self.transcript),
                &mut m,
            )
            .map_err(|_| PairError::NotConfirmed)?;
        let (padded, signature) = plain.split_at(2 + MAX_CARD_BYTES);
        let len = u16::from_be_bytes([padded[0], padded[1]]) as usize;
        if len > MAX_CARD_BYTES || padded[2 + len..].iter().any(|b| *b != 0) {
            return Err(PairError::BadCard("bad length or padding".into()));
        }
        let card = ContactCard::decode(&padded[2..2 + len])
            .map_err(|e| PairError::BadCard(e.to_string()))?;
        let mut sig = [0u8; 64];
        sig.copy_from_slice(signature);
        let theirs = match self.side {
            Side::Inviter => Side::Accepter,
            Side::Accepter => Side::Inviter,
        };
        if !card.public().verify(
            context::PAIR_PROOF,
            &proof_message(theirs, &self.transcript),
            &sig,
        ) {
            return Err(PairError::NotTheirCard);
        }
        Ok(card)
    }
}

/// What a card's key signs in a pairing (under `sealpost v1 pair
/// proof\0`): the signer's side byte (`A` = 0x41 inviter, `B` = 0x42
/// accepter) and the transcript.
pub fn proof_message(side: Side, transcript: &[u8; 32]) -> [u8; 33] {
    let mut m = [0u8; 33];
    m[0] = match side {
        Side::Inviter => b'A',
        Side::Accepter => b'B',
    };
    m[1..].copy_from_slice(transcript);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn codes_read_back_as_written() {
        for n in MIN_WORDS..=MAX_WORDS {
            let c = Code::words(42, n, &mut OsRng);
            assert_eq!(Code::parse(&c.to_text()).expect("parses"), c);
            assert_eq!(Code::parse(&c.to_text().to_uppercase()).expect("parses"), c);
            assert_eq!(
                Code::parse(&c.to_text().replace('-', " ")).expect("parses"),
                c
            );
        }
        let t = Code::token(999_999, &mut OsRng);
        assert_eq!(Code::parse(&t.to_text()).expect("parses"), t);
        assert_eq!(t.entropy_bits(), 128);
    }

    #[test]
    fn typos_are_told_before_anything_is_sent() {
        assert!(matches!(
            Code::parse("7-crossovr-clockwork"),
            Err(PairError::UnknownWord { position: 1, .. })
        ));
        // Swapped: "clockwork" is an even word, "crossover" an odd one.
        assert!(matches!(
            Code::parse("7-crossover-clockwork"),
            Err(PairError::WrongPosition { position: 1, .. })
        ));
        assert!(Code::parse("7-clockwork-crossover").is_ok());
        for bad in [
            "",
            "clockwork-crossover",
            "0-clockwork-crossover",
            "7-clockwork",
            "1234567-aardvark-adroitness",
        ] {
            assert!(
                matches!(Code::parse(bad), Err(PairError::NotACode(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_word_lists_are_the_pgp_lists() {
        use ring::digest;
        let mut all = String::new();
        for w in words::EVEN.iter().chain(words::ODD.iter()) {
            all.push_str(w);
            all.push('\n');
        }
        let d = digest::digest(&digest::SHA256, all.as_bytes());
        assert_eq!(
            data_encoding::HEXLOWER.encode(d.as_ref()),
            "0847bcad4a09374ec628019e7c3e3eeee1dfa2f3870168eaa306310eeda40ff5"
        );
        let mut seen = std::collections::HashSet::new();
        assert!(all.lines().all(|w| seen.insert(w)), "every word once");
    }

    #[test]
    fn invitations_carry_the_relay() {
        let i = Invitation {
            code: Code::token(3, &mut OsRng),
            relay: Some("127.0.0.1:7443/abcd".into()),
        };
        assert_eq!(Invitation::parse(&i.to_text()).expect("parses"), i);
        let short =
            Invitation::parse("7-clockwork-crossover@relay.example:7443/xyz").expect("parses");
        assert_eq!(short.relay.as_deref(), Some("relay.example:7443/xyz"));
        assert_eq!(
            Invitation::parse("7-clockwork-crossover")
                .expect("parses")
                .relay,
            None
        );
    }
}
