//! Forward notices (PROTOCOL 6.9): what a relay that forwards for its
//! mailbox owners puts in the sender's own mailbox when an item it queued
//! ends without being handed on — the next relay refused it (its signed
//! refusal is carried whole), or the item expired while the next relay
//! could not be reached. A notice is an item like any other in the
//! mailbox; it starts with `SPFN`, which no sealed container does (those
//! start with age's header line), and is signed by the forwarding relay.
//!
//! ```text
//! notice = "SPFN" 0x01 kind:u8 at:u64 mailbox:[32] payload_hash:[32]
//!          pin:[32] addr_len:u8 addr:[addr_len]
//!          kinds 3, 4: blob_id:[16] offset:u64
//!          kinds 1, 3: next_key:[32] binding code:u8 refused_at:u64 refusal_signature:[64]
//!          kinds 2, 4: attempts:u32 error_len:u16 error:[error_len]
//!          relay_key:[32] signature:[64]
//! signature = Ed25519(relay_key, "sealpost v1 relay notice\0" || every byte before it)
//! ```

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::codec::{self, DecodeError, Reader};
use crate::relay::{
    blob_refusal_hash, BlobId, KeyBinding, MailboxId, NextHop, Refusal, RefusalCode,
    MAX_BINDING_SIGNATURE, MAX_BINDING_SPKI, MAX_TEXT,
};

pub const MAGIC: &[u8; 4] = b"SPFN";
const VERSION: u8 = 1;
/// Signature context.
pub const CONTEXT: &[u8] = b"sealpost v1 relay notice\0";
/// The largest notice: a kind 3 with the longest address and key binding.
pub const MAX_NOTICE_BYTES: usize = 4
    + 1
    + 1
    + 8
    + 32
    + 32
    + 32
    + 1
    + 253
    + 16
    + 8
    + 32
    + 2
    + 2
    + MAX_BINDING_SPKI
    + 2
    + MAX_BINDING_SIGNATURE
    + 1
    + 8
    + 64
    + 32
    + 64;

/// Why the forwarding relay ended the item.
// A notice is handled one at a time: boxing the refusal would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The next relay refused it, with this refusal signed by `next_key`
    /// (the Ed25519 key the next relay sent in `HelloOk`), which `binding`
    /// (the next relay's certificate key's signature) ties to the pin.
    Refused {
        next_key: [u8; 32],
        binding: KeyBinding,
        refusal: Refusal,
    },
    /// It expired before the next relay took it: `attempts` failed, the
    /// last with `error`.
    GaveUp { attempts: u32, error: String },
}

/// A forward notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The forwarding relay's clock when it made the notice.
    pub at: u64,
    /// The forwarded item: its mailbox at the next relay, its payload's
    /// BLAKE3, and the relay it was for.
    pub mailbox: MailboxId,
    pub payload_hash: [u8; 32],
    pub next: NextHop,
    /// For a forwarded blob (kinds 3 and 4): the blob and the offset the
    /// next relay refused or was waiting for; `payload_hash` is then
    /// [`blob_refusal_hash`] of the two, as a refusal of that piece names.
    pub blob: Option<(BlobId, u64)>,
    pub ended: Ended,
    /// The forwarding relay's Ed25519 key, which signed the notice.
    pub relay_key: [u8; 32],
    pub signature: [u8; 64],
}

/// Whether an item's payload is a notice (and not a sealed message).
pub fn is_notice(payload: &[u8]) -> bool {
    payload.starts_with(MAGIC)
}

impl Notice {
    /// A notice signed by `key`.
    pub fn sign(
        key: &SigningKey,
        at: u64,
        mailbox: MailboxId,
        payload_hash: [u8; 32],
        next: NextHop,
        ended: Ended,
    ) -> Self {
        Self::signed(key, at, mailbox, payload_hash, next, None, ended)
    }

    /// A notice about a forwarded blob, signed by `key`: the piece at
    /// `offset` was refused, or the blob was given up while the next relay
    /// held `offset` bytes of it.
    pub fn sign_blob(
        key: &SigningKey,
        at: u64,
        mailbox: MailboxId,
        blob: (BlobId, u64),
        next: NextHop,
        ended: Ended,
    ) -> Self {
        let hash = blob_refusal_hash(&blob.0, blob.1);
        Self::signed(key, at, mailbox, hash, next, Some(blob), ended)
    }

    fn signed(
        key: &SigningKey,
        at: u64,
        mailbox: MailboxId,
        payload_hash: [u8; 32],
        next: NextHop,
        blob: Option<(BlobId, u64)>,
        ended: Ended,
    ) -> Self {
        let mut n = Self {
            at,
            mailbox,
            payload_hash,
            next,
            blob,
            ended,
            relay_key: key.verifying_key().to_bytes(),
            signature: [0; 64],
        };
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&n.signed_part());
        n.signature = key.sign(&msg).to_bytes();
        n
    }

    fn signed_part(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(MAX_NOTICE_BYTES);
        o.extend_from_slice(MAGIC);
        o.push(VERSION);
        o.push(self.kind());
        o.extend_from_slice(&self.at.to_be_bytes());
        o.extend_from_slice(&self.mailbox.0);
        o.extend_from_slice(&self.payload_hash);
        o.extend_from_slice(&self.next.pin);
        o.push(self.next.addr.len() as u8);
        o.extend_from_slice(self.next.addr.as_bytes());
        if let Some((blob_id, offset)) = &self.blob {
            o.extend_from_slice(&blob_id.0);
            o.extend_from_slice(&offset.to_be_bytes());
        }
        match &self.ended {
            Ended::Refused {
                next_key,
                binding,
                refusal,
            } => {
                o.extend_from_slice(next_key);
                binding.encode_into(&mut o);
                o.push(refusal.code.code());
                o.extend_from_slice(&refusal.at.to_be_bytes());
                o.extend_from_slice(&refusal.signature);
            }
            Ended::GaveUp { attempts, error } => {
                o.extend_from_slice(&attempts.to_be_bytes());
                let e = codec::cut_text(error, MAX_TEXT);
                o.extend_from_slice(&(e.len() as u16).to_be_bytes());
                o.extend_from_slice(e.as_bytes());
            }
        }
        o.extend_from_slice(&self.relay_key);
        o
    }

    /// 1 refused, 2 given up; 3 and 4 the same of a blob.
    pub fn kind(&self) -> u8 {
        let k = match self.ended {
            Ended::Refused { .. } => 1,
            Ended::GaveUp { .. } => 2,
        };
        if self.blob.is_some() {
            k + 2
        } else {
            k
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut o = self.signed_part();
        o.extend_from_slice(&self.signature);
        o
    }

    /// Parses a notice strictly (no trailing bytes, every field in its
    /// bounds). The signatures are checked by [`Notice::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_NOTICE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "forward notice",
                max: MAX_NOTICE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        r.magic_and_versions(MAGIC, "forward notice", &[VERSION])?;
        let kind = r.u8("notice kind")?;
        let at = r.u64("notice time")?;
        let mailbox = MailboxId(r.array("mailbox")?);
        let payload_hash = r.array("payload hash")?;
        let pin = r.array("next relay's pin")?;
        let addr_len = r.u8("address length")? as usize;
        let addr = codec::read_text_of_len(&mut r, addr_len, "next relay's address", 253)?;
        crate::card::validate_relay_address(&addr)?;
        let blob = if kind == 3 || kind == 4 {
            let blob_id = BlobId(r.array("blob id")?);
            let offset = r.u64("offset")?;
            if blob_refusal_hash(&blob_id, offset) != payload_hash {
                return Err(DecodeError::Invalid {
                    what: "notice's payload hash",
                    why: "must be BLAKE3(blob_id || offset) for a blob",
                });
            }
            Some((blob_id, offset))
        } else {
            None
        };
        let ended =
            match kind {
                1 | 3 => {
                    let next_key = r.array("next relay's key")?;
                    let binding = KeyBinding::decode_from(&mut r)?;
                    let code = RefusalCode::from_code(r.u8("refusal code")?)?;
                    let refused_at = r.u64("refusal time")?;
                    let signature = r.array("refusal signature")?;
                    Ended::Refused {
                        next_key,
                        binding,
                        refusal: Refusal {
                            code,
                            at: refused_at,
                            mailbox,
                            payload_hash,
                            signature,
                        },
                    }
                }
                2 | 4 => {
                    let attempts = r.u32("attempts")?;
                    let len = r.u16("error length")? as usize;
                    let error = codec::read_text_of_len(&mut r, len, "error", MAX_TEXT)?;
                    Ended::GaveUp { attempts, error }
                }
                _ => return Err(DecodeError::Invalid {
                    what: "notice kind",
                    why: "must be 1 (refused), 2 (given up), 3 (blob refused) or 4 (blob given up)",
                }),
            };
        let relay_key = r.array("relay key")?;
        let signature = r.array("signature")?;
        r.finish()?;
        Ok(Self {
            at,
            mailbox,
            payload_hash,
            next: NextHop { addr, pin },
            blob,
            ended,
            relay_key,
            signature,
        })
    }

    /// Whether the notice is signed by `relay_key` (the sender's own
    /// relay, as it stated in `HelloOk` on a pinned connection) and, for a
    /// refusal carried, whether that refusal is signed by the key the
    /// notice names for the next relay and names this notice's item. The
    /// key binding (that `next_key` is the key of the relay the pin names)
    /// is checked by the caller, with the pin of the recipient's card: it
    /// takes X.509 key parsing, which this crate leaves to TLS's
    /// (`sealpost_client::tls::verify_key_binding`).
    pub fn verify(&self, relay_key: &VerifyingKey) -> Result<(), NoticeError> {
        if self.relay_key != relay_key.to_bytes() {
            return Err(NoticeError::OtherRelay);
        }
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&self.signed_part());
        relay_key
            .verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&self.signature))
            .map_err(|_| NoticeError::NotSigned)?;
        if let Ended::Refused {
            next_key, refusal, ..
        } = &self.ended
        {
            let key =
                VerifyingKey::from_bytes(next_key).map_err(|_| NoticeError::RefusalNotSigned)?;
            if !refusal.verify(&key) {
                return Err(NoticeError::RefusalNotSigned);
            }
        }
        Ok(())
    }
}

/// Why a notice is not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    #[error("the notice names another relay's key than the sender's relay")]
    OtherRelay,
    #[error("the notice is not signed by the sender's relay")]
    NotSigned,
    #[error("the refusal the notice carries is not signed by the next relay's key")]
    RefusalNotSigned,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::context;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn refusal(k: &SigningKey, code: RefusalCode, mb: MailboxId, h: [u8; 32]) -> Refusal {
        let mut m = context::REFUSAL.to_vec();
        m.extend_from_slice(&Refusal::signed_bytes(code, 7, &mb, &h));
        Refusal {
            code,
            at: 7,
            mailbox: mb,
            payload_hash: h,
            signature: k.sign(&m).to_bytes(),
        }
    }

    fn binding() -> KeyBinding {
        KeyBinding {
            scheme: 0x0403,
            spki: vec![0x30; 91],
            signature: vec![0x31; 70],
        }
    }

    const MB: MailboxId = MailboxId([3; 32]);
    const HASH: [u8; 32] = [5; 32];

    fn hop() -> NextHop {
        NextHop {
            addr: "bob.example:7443".into(),
            pin: [4; 32],
        }
    }

    /// A notice by `home` that the relay of `next_key` refused item
    /// (`MB`, `HASH`) with `refusal`.
    fn refused(home: &SigningKey, next_key: &SigningKey, refusal: Refusal) -> Notice {
        Notice::sign(
            home,
            100,
            MB,
            HASH,
            hop(),
            Ended::Refused {
                next_key: next_key.verifying_key().to_bytes(),
                binding: binding(),
                refusal,
            },
        )
    }

    fn notices() -> Vec<Notice> {
        let (home, next) = (key(1), key(2));
        vec![
            refused(
                &home,
                &next,
                refusal(&next, RefusalCode::UnknownMailbox, MB, HASH),
            ),
            Notice::sign(
                &home,
                200,
                MB,
                HASH,
                hop(),
                Ended::GaveUp {
                    attempts: 12,
                    error: "connection refused".into(),
                },
            ),
            Notice::sign_blob(
                &home,
                300,
                MB,
                (BlobId([6; 16]), 3 << 20),
                hop(),
                Ended::Refused {
                    next_key: next.verifying_key().to_bytes(),
                    binding: binding(),
                    refusal: refusal(
                        &next,
                        RefusalCode::TooLarge,
                        MB,
                        blob_refusal_hash(&BlobId([6; 16]), 3 << 20),
                    ),
                },
            ),
            Notice::sign_blob(
                &home,
                400,
                MB,
                (BlobId([6; 16]), 0),
                hop(),
                Ended::GaveUp {
                    attempts: 3,
                    error: "timed out".into(),
                },
            ),
        ]
    }

    /// A blob notice's payload hash is the one its blob and offset make:
    /// one that names another piece does not parse.
    #[test]
    fn a_blob_notice_names_its_piece() {
        let n = &notices()[2];
        assert_eq!(n.kind(), 3);
        let mut bytes = n.encode();
        // The offset's last byte, after the address.
        let at = 4 + 1 + 1 + 8 + 32 + 32 + 32 + 1 + n.next.addr.len() + 16 + 7;
        bytes[at] ^= 1;
        assert!(Notice::decode(&bytes).is_err());
        assert_eq!(notices()[3].kind(), 4);
    }

    /// Notices round-trip and verify with the home relay's key; any other
    /// key, any changed byte, any cut, any extra byte fails.
    #[test]
    fn notices_round_trip_and_every_change_fails() {
        let home = key(1).verifying_key();
        for n in notices() {
            let bytes = n.encode();
            assert!(is_notice(&bytes));
            assert!(bytes.len() <= MAX_NOTICE_BYTES);
            let back = Notice::decode(&bytes).expect("decodes");
            assert_eq!(back, n);
            back.verify(&home).expect("verifies");
            assert_eq!(
                back.verify(&key(9).verifying_key()),
                Err(NoticeError::OtherRelay)
            );
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x01;
                if let Ok(m) = Notice::decode(&b) {
                    assert!(m.verify(&home).is_err(), "byte {i} changed and verified");
                }
            }
            for cut in 0..bytes.len() {
                assert!(Notice::decode(&bytes[..cut]).is_err(), "{cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Notice::decode(&longer).is_err());
        }
    }

    /// A refusal the home relay signed into a notice but the next relay
    /// did not sign (a forging home relay) is refused; so is one for
    /// another item.
    #[test]
    fn a_carried_refusal_must_be_the_next_relays() {
        let (home, next, other) = (key(1), key(2), key(3));
        let forged = refused(
            &home,
            &next,
            refusal(&other, RefusalCode::OverQuota, MB, HASH),
        );
        assert_eq!(
            forged.verify(&home.verifying_key()),
            Err(NoticeError::RefusalNotSigned)
        );
        // The refusal is rebuilt from the notice's own item: one signed
        // for another payload does not verify for this one.
        let elsewhere = refusal(&next, RefusalCode::OverQuota, MB, [6; 32]);
        let moved = refused(
            &home,
            &next,
            Refusal {
                payload_hash: HASH,
                ..elsewhere
            },
        );
        assert_eq!(
            moved.verify(&home.verifying_key()),
            Err(NoticeError::RefusalNotSigned)
        );
    }
}
