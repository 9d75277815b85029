//! Contact cards: the public half of an identity, self-signed.
//!
//! A card is what two people exchange to start talking. It is signed by its
//! own signing key, which proves the holder of that key made it, but not who
//! that holder is: that is what comparing fingerprints is for. The signature
//! covers the exact encoded bytes, so a card is stored and passed on as the
//! bytes received, never re-encoded.

use crate::codec::{self, put_short, DecodeError, Reader};
use crate::identity::{context, Identity, PublicIdentity};

const MAGIC: &[u8; 4] = b"SPCD";
const VERSION: u8 = 1;
/// Display names are for people; 64 bytes of UTF-8 is plenty and keeps
/// cards short enough to paste as one line.
pub const MAX_NAME_BYTES: usize = 64;
/// A relay address is `host:port`; DNS names are at most 253 characters.
pub const MAX_RELAY_ADDR_BYTES: usize = 253;
/// Upper bound on an encoded card (the largest valid card is 493 bytes).
pub const MAX_CARD_BYTES: usize = 512;
/// Prefix of the one-line text form.
pub const TEXT_PREFIX: &str = "sealpost-card-v1:";
/// Upper bound on the text form (prefix plus base64url of `MAX_CARD_BYTES`).
pub const MAX_CARD_TEXT_BYTES: usize = 1024;

/// Where an identity's mailbox lives: the relay's address and the hash of
/// its TLS public key, so a sender can pin the relay from the card alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayPin {
    pub address: String,
    /// BLAKE3 of the relay certificate's SubjectPublicKeyInfo (DER).
    pub key_hash: [u8; 32],
}

impl RelayPin {
    /// Appends `flag:u8 [len:u8 address key_hash:[32]]` for an optional pin,
    /// the encoding shared by cards and message headers.
    pub fn encode_optional(pin: Option<&Self>, out: &mut Vec<u8>) {
        match pin {
            None => out.push(0),
            Some(relay) => {
                out.push(1);
                put_short(out, relay.address.as_bytes());
                out.extend_from_slice(&relay.key_hash);
            }
        }
    }

    /// Reads what [`RelayPin::encode_optional`] wrote.
    pub fn read_optional(r: &mut Reader<'_>) -> Result<Option<Self>, DecodeError> {
        if !r.flag("relay flag")? {
            return Ok(None);
        }
        let len = r.u8("relay address")? as usize;
        let address = codec::read_text_of_len(r, len, "relay address", MAX_RELAY_ADDR_BYTES)?;
        validate_relay_address(&address)?;
        let key_hash = r.array::<32>("relay key hash")?;
        Ok(Some(RelayPin { address, key_hash }))
    }

    /// Checks an address before it is signed into a card or header.
    pub fn validate(&self) -> Result<(), DecodeError> {
        validate_relay_address(&self.address)
    }
}

/// The fields of a card, before signing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardFields {
    pub name: String,
    pub created_at: u64,
    pub relay: Option<RelayPin>,
}

/// A verified contact card. Only [`ContactCard::decode`] and
/// [`ContactCard::create`] make one, so holding one means its signature
/// was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactCard {
    public: PublicIdentity,
    fields: CardFields,
    bytes: Vec<u8>,
}

/// Why a card was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CardError {
    #[error("not a valid contact card ({0}); it may have been cut or mangled when copied: ask its owner to send the card again (`sealpost id` prints it)")]
    Malformed(#[from] DecodeError),
    #[error("the contact card's signature does not match its key: it was altered after its owner made it, or forged; ask its owner for the card again through another channel")]
    BadSignature,
}

fn validate_name(name: &str) -> Result<(), DecodeError> {
    if name.is_empty() {
        return Err(DecodeError::Invalid {
            what: "name",
            why: "must not be empty",
        });
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(DecodeError::TooLarge {
            what: "name",
            max: MAX_NAME_BYTES,
        });
    }
    codec::check_printable(name, "name")
}

pub(crate) fn validate_relay_address(addr: &str) -> Result<(), DecodeError> {
    if addr.is_empty() || addr.len() > MAX_RELAY_ADDR_BYTES {
        return Err(DecodeError::Invalid {
            what: "relay address",
            why: "must be 1 to 253 bytes",
        });
    }
    if !addr.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(DecodeError::Invalid {
            what: "relay address",
            why: "must be printable ASCII without spaces",
        });
    }
    Ok(())
}

impl ContactCard {
    /// Makes and signs a card for `identity`.
    pub fn create(identity: &Identity, fields: CardFields) -> Result<Self, DecodeError> {
        validate_name(&fields.name)?;
        if let Some(relay) = &fields.relay {
            validate_relay_address(&relay.address)?;
        }
        let public = *identity.public();
        let mut bytes = Vec::with_capacity(MAX_CARD_BYTES);
        bytes.extend_from_slice(MAGIC);
        bytes.push(VERSION);
        bytes.extend_from_slice(&fields.created_at.to_be_bytes());
        bytes.extend_from_slice(public.signing_bytes());
        bytes.extend_from_slice(public.agreement_bytes());
        put_short(&mut bytes, fields.name.as_bytes());
        RelayPin::encode_optional(fields.relay.as_ref(), &mut bytes);
        let sig = identity.sign(context::CARD, &bytes);
        bytes.extend_from_slice(&sig);
        Ok(Self {
            public,
            fields,
            bytes,
        })
    }

    /// Parses and verifies a card in its binary form.
    pub fn decode(bytes: &[u8]) -> Result<Self, CardError> {
        if bytes.len() > MAX_CARD_BYTES {
            return Err(DecodeError::TooLarge {
                what: "contact card",
                max: MAX_CARD_BYTES,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        r.magic_and_version(MAGIC, "contact card", VERSION)?;
        let created_at = r.u64("creation time")?;
        let signing = r.array::<32>("signing key")?;
        let agreement = r.array::<32>("agreement key")?;
        let name = codec::read_short_text(&mut r, "name", MAX_NAME_BYTES)?;
        let relay = RelayPin::read_optional(&mut r)?;
        let signed_len = r.position();
        let signature = r.array::<64>("signature")?;
        r.finish()?;
        let public = PublicIdentity::from_bytes(&signing, &agreement)?;
        public.check_agreement_key()?;
        if !public.verify(context::CARD, &bytes[..signed_len], &signature) {
            return Err(CardError::BadSignature);
        }
        Ok(Self {
            public,
            fields: CardFields {
                name,
                created_at,
                relay,
            },
            bytes: bytes.to_vec(),
        })
    }

    /// Parses the one-line text form `sealpost-card-v1:<base64url>`.
    /// Surrounding white space is ignored so a pasted line works.
    pub fn from_text(text: &str) -> Result<Self, CardError> {
        let text = text.trim();
        if text.len() > MAX_CARD_TEXT_BYTES {
            return Err(DecodeError::TooLarge {
                what: "contact card text",
                max: MAX_CARD_TEXT_BYTES,
            }
            .into());
        }
        if !text.starts_with(TEXT_PREFIX) {
            return Err(DecodeError::BadMagic {
                expected: "contact card (text starting with sealpost-card-v1:)",
            }
            .into());
        }
        let checked = crate::codec::strip_check(text).map_err(|_| DecodeError::Invalid {
            what: "contact card text",
            why: "its check characters (after the last '.') do not match: a character was changed or lost in copying; copy the card again",
        })?;
        let body = checked.strip_prefix(TEXT_PREFIX).unwrap_or(checked);
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| DecodeError::Invalid {
                what: "contact card text",
                why: "not base64url",
            })?;
        Self::decode(&bytes)
    }

    /// `sealpost-card-v1:` + base64url of the card + `.` + five check
    /// characters ([`crate::codec::text_check`]).
    pub fn to_text(&self) -> String {
        crate::codec::with_check(&format!(
            "{TEXT_PREFIX}{}",
            data_encoding::BASE64URL_NOPAD.encode(&self.bytes)
        ))
    }

    /// The exact signed bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    pub fn name(&self) -> &str {
        &self.fields.name
    }

    pub fn fields(&self) -> &CardFields {
        &self.fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> (Identity, ContactCard) {
        let id = Identity::from_secret_bytes(&[5; 32], &[6; 32]);
        let card = ContactCard::create(
            &id,
            CardFields {
                name: "Alice".into(),
                created_at: 1_700_000_000,
                relay: Some(RelayPin {
                    address: "relay.example:7443".into(),
                    key_hash: [0xab; 32],
                }),
            },
        )
        .expect("valid");
        (id, card)
    }

    #[test]
    fn round_trips_binary_and_text() {
        let (_, card) = card();
        assert_eq!(ContactCard::decode(card.as_bytes()).expect("ok"), card);
        assert_eq!(ContactCard::from_text(&card.to_text()).expect("ok"), card);
        assert_eq!(
            ContactCard::from_text(&format!("  {}\n", card.to_text())).expect("ok"),
            card
        );
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let (_, card) = card();
        for i in 0..card.as_bytes().len() * 8 {
            let mut b = card.as_bytes().to_vec();
            b[i / 8] ^= 1 << (i % 8);
            assert!(ContactCard::decode(&b).is_err(), "flip of bit {i} accepted");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let (_, card) = card();
        for n in 0..card.as_bytes().len() {
            assert!(ContactCard::decode(&card.as_bytes()[..n]).is_err());
        }
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        let id = Identity::from_secret_bytes(&[5; 32], &[6; 32]);
        for bad in ["", "a\nb", "\u{1b}[31mred", " padded", &"x".repeat(65)] {
            let fields = CardFields {
                name: bad.into(),
                created_at: 0,
                relay: None,
            };
            assert!(
                ContactCard::create(&id, fields).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
