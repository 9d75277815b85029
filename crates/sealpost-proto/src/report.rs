//! Receipts and rejections: statements a recipient signs about messages it
//! was sent, and that the sender keeps as proof.
//!
//! ```text
//! report    = "SPRP" 0x01 kind:u8 signer:[32] subject:[32] issued_at:u64
//!             n:u16 entry*n signature:[64]
//! kind      = 1 receipt | 2 rejection
//! receipt   entry = id:[16] content_blake3:[32] content_len:u64 stored_at:u64
//! rejection entry = id:[16] reason:u8
//! signature = Ed25519 by `signer` over "sealpost v1 report\0" || every byte before it
//! ```
//!
//! A report travels as the content of a sealed message of kind `Receipt` or
//! `Rejection` from the recipient to the sender, but it is signed on its
//! own, so the sender can export it and anyone holding the recipient's
//! card can check it offline, without any secret key. `signer` is the
//! recipient's Ed25519 key, `subject` the sender's: a receipt for Alice's
//! messages cannot be passed off as one for Carol's.
//!
//! A receipt entry says: "the content of message `id`, `content_len` bytes
//! whose BLAKE3 is `content_blake3`, was on my stable storage at
//! `stored_at`, and I read it back from there to compute that hash".

use std::fmt;

use ed25519_dalek::VerifyingKey;

use crate::codec::{DecodeError, Reader};
use crate::identity::{Identity, PublicIdentity};
use crate::message::MessageId;

const MAGIC: &[u8; 4] = b"SPRP";
const VERSION: u8 = 1;
/// The context string every report signature is bound to.
pub const CONTEXT: &[u8] = b"sealpost v1 report\0";
/// Most entries in one report: 4,096 receipt entries are 256 KiB, well
/// under a relay's 1 MiB message limit once sealed.
pub const MAX_ENTRIES: usize = 4096;
const FIXED_LEN: usize = 4 + 1 + 1 + 32 + 32 + 8 + 2;
const RECEIPT_ENTRY_LEN: usize = 16 + 32 + 8 + 8;
const REJECTION_ENTRY_LEN: usize = 16 + 1;
/// The largest report.
pub const MAX_REPORT_BYTES: usize = FIXED_LEN + MAX_ENTRIES * RECEIPT_ENTRY_LEN + 64;
/// Prefix of the one-line text form.
pub const TEXT_PREFIX: &str = "sealpost-report-v1:";
/// Largest text form accepted.
pub const MAX_REPORT_TEXT_BYTES: usize = TEXT_PREFIX.len() + MAX_REPORT_BYTES.div_ceil(3) * 4 + 2;

/// One stored message, as the recipient's receipt states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiptEntry {
    pub id: MessageId,
    /// BLAKE3 of the content as read back from the recipient's storage.
    pub content_hash: [u8; 32],
    pub content_len: u64,
    /// Unix seconds at which the content was durable.
    pub stored_at: u64,
}

/// Why a recipient refused a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The recipient accepts messages from its pinned contacts only.
    NotAContact,
    /// Larger than the recipient accepts.
    TooLarge,
    /// It arrived at or after its expiry time.
    Expired,
    /// Its creation time is further ahead of the recipient's clock than the
    /// allowed skew.
    FromTheFuture,
    /// The recipient took it but could not store it (its file system
    /// refused the file, again and again, or no name was free for it).
    NotStored,
    /// It never expires (`NO_EXPIRY`): a message that comes through relays
    /// must expire within 400 days, so its replay record can be forgotten.
    NoExpiry,
    /// Its content cannot be read as what its kind says (a file manifest
    /// that does not parse).
    Malformed,
}

impl RejectReason {
    pub const ALL: [Self; 7] = [
        Self::NotAContact,
        Self::TooLarge,
        Self::Expired,
        Self::FromTheFuture,
        Self::NotStored,
        Self::NoExpiry,
        Self::Malformed,
    ];

    pub fn code(self) -> u8 {
        match self {
            Self::NotAContact => 1,
            Self::TooLarge => 2,
            Self::Expired => 3,
            Self::FromTheFuture => 4,
            Self::NotStored => 5,
            Self::NoExpiry => 6,
            Self::Malformed => 7,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == c)
    }

    /// A stable short name, for `--json` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::NotAContact => "not-a-contact",
            Self::TooLarge => "too-large",
            Self::Expired => "expired",
            Self::FromTheFuture => "from-the-future",
            Self::NotStored => "not-stored",
            Self::NoExpiry => "no-expiry",
            Self::Malformed => "malformed",
        }
    }

    /// What it means, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NotAContact => {
                "the recipient accepts messages from its contacts only; send them your card first"
            }
            Self::TooLarge => "the message is larger than the recipient accepts",
            Self::Expired => "the message reached the recipient after its expiry time",
            Self::FromTheFuture => {
                "the message's creation time is ahead of the recipient's clock; check your clock"
            }
            Self::NotStored => {
                "the recipient's device could not store it (its agent logged why); ask them, then send it again"
            }
            Self::NoExpiry => {
                "the message never expires; one sent through relays must expire within 400 days"
            }
            Self::Malformed => {
                "the recipient could not read it as what it claims to be (a malformed file description)"
            }
        }
    }
}

/// One refused message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectionEntry {
    pub id: MessageId,
    pub reason: RejectReason,
}

/// What a report states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entries {
    Receipt(Vec<ReceiptEntry>),
    Rejection(Vec<RejectionEntry>),
}

impl Entries {
    pub fn len(&self) -> usize {
        match self {
            Self::Receipt(e) => e.len(),
            Self::Rejection(e) => e.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn code(&self) -> u8 {
        match self {
            Self::Receipt(_) => 1,
            Self::Rejection(_) => 2,
        }
    }
}

/// Why a report was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("malformed report: {0}")]
    Malformed(#[from] DecodeError),
    #[error("the report's signature does not verify: it was forged or altered")]
    BadSignature,
}

/// A signed report. Only [`Report::sign`] and [`Report::decode`] make one,
/// so holding one means its signature by `signer` was checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Report {
    signer: [u8; 32],
    subject: [u8; 32],
    issued_at: u64,
    entries: Entries,
    bytes: Vec<u8>,
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Report")
            .field("kind", &self.kind_name())
            .field("issued_at", &self.issued_at)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl Report {
    /// Signs a report by `signer` about messages from `subject`. Refuses an
    /// empty list or more than [`MAX_ENTRIES`] entries.
    pub fn sign(
        signer: &Identity,
        subject: &PublicIdentity,
        issued_at: u64,
        entries: Entries,
    ) -> Result<Self, DecodeError> {
        if entries.is_empty() || entries.len() > MAX_ENTRIES {
            return Err(DecodeError::Invalid {
                what: "report",
                why: "must hold 1 to 4096 entries",
            });
        }
        let mut bytes = Vec::with_capacity(FIXED_LEN + entries.len() * RECEIPT_ENTRY_LEN + 64);
        bytes.extend_from_slice(MAGIC);
        bytes.push(VERSION);
        bytes.push(entries.code());
        bytes.extend_from_slice(signer.public().signing_bytes());
        bytes.extend_from_slice(subject.signing_bytes());
        bytes.extend_from_slice(&issued_at.to_be_bytes());
        bytes.extend_from_slice(&(entries.len() as u16).to_be_bytes());
        match &entries {
            Entries::Receipt(list) => {
                for e in list {
                    bytes.extend_from_slice(&e.id.0);
                    bytes.extend_from_slice(&e.content_hash);
                    bytes.extend_from_slice(&e.content_len.to_be_bytes());
                    bytes.extend_from_slice(&e.stored_at.to_be_bytes());
                }
            }
            Entries::Rejection(list) => {
                for e in list {
                    bytes.extend_from_slice(&e.id.0);
                    bytes.push(e.reason.code());
                }
            }
        }
        let sig = signer.sign(CONTEXT, &bytes);
        bytes.extend_from_slice(&sig);
        Ok(Self {
            signer: *signer.public().signing_bytes(),
            subject: *subject.signing_bytes(),
            issued_at,
            entries,
            bytes,
        })
    }

    /// Parses a report and verifies its signature by the key it names.
    /// The caller then checks that key is the one it expects
    /// ([`Report::signed_by`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, ReportError> {
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(DecodeError::TooLarge {
                what: "report",
                max: MAX_REPORT_BYTES,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        r.magic_and_version(MAGIC, "sealpost report", VERSION)?;
        let kind = r.u8("report kind")?;
        let signer = r.array::<32>("signer key")?;
        let subject = r.array::<32>("subject key")?;
        let issued_at = r.u64("issue time")?;
        let n = r.u16("entry count")? as usize;
        if n == 0 || n > MAX_ENTRIES {
            return Err(DecodeError::Invalid {
                what: "entry count",
                why: "must be 1 to 4096",
            }
            .into());
        }
        let entries = match kind {
            1 => {
                let mut list = Vec::with_capacity(n.min(r.remaining() / RECEIPT_ENTRY_LEN));
                for _ in 0..n {
                    list.push(ReceiptEntry {
                        id: MessageId(r.array("message id")?),
                        content_hash: r.array("content hash")?,
                        content_len: r.u64("content length")?,
                        stored_at: r.u64("storage time")?,
                    });
                }
                Entries::Receipt(list)
            }
            2 => {
                let mut list = Vec::with_capacity(n.min(r.remaining() / REJECTION_ENTRY_LEN));
                for _ in 0..n {
                    let id = MessageId(r.array("message id")?);
                    let reason = RejectReason::from_code(r.u8("rejection reason")?).ok_or(
                        DecodeError::Invalid {
                            what: "rejection reason",
                            why: "unknown reason code",
                        },
                    )?;
                    list.push(RejectionEntry { id, reason });
                }
                Entries::Rejection(list)
            }
            _ => {
                return Err(DecodeError::Invalid {
                    what: "report kind",
                    why: "must be 1 (receipt) or 2 (rejection)",
                }
                .into())
            }
        };
        let signed_len = r.position();
        let signature = r.array::<64>("signature")?;
        r.finish()?;
        let key = VerifyingKey::from_bytes(&signer).map_err(|_| DecodeError::Invalid {
            what: "signer key",
            why: "not a valid Ed25519 point",
        })?;
        let mut signed = Vec::with_capacity(CONTEXT.len() + signed_len);
        signed.extend_from_slice(CONTEXT);
        signed.extend_from_slice(&bytes[..signed_len]);
        let sig = ed25519_dalek::Signature::from_bytes(&signature);
        if key.verify_strict(&signed, &sig).is_err() {
            return Err(ReportError::BadSignature);
        }
        Ok(Self {
            signer,
            subject,
            issued_at,
            entries,
            bytes: bytes.to_vec(),
        })
    }

    /// The one-line text form: `sealpost-report-v1:` and base64url.
    pub fn to_text(&self) -> String {
        format!(
            "{TEXT_PREFIX}{}",
            data_encoding::BASE64URL_NOPAD.encode(&self.bytes)
        )
    }

    /// Parses the text form (surrounding white space is ignored).
    pub fn from_text(text: &str) -> Result<Self, ReportError> {
        let text = text.trim();
        if text.len() > MAX_REPORT_TEXT_BYTES {
            return Err(DecodeError::TooLarge {
                what: "report text",
                max: MAX_REPORT_TEXT_BYTES,
            }
            .into());
        }
        let b64 = text
            .strip_prefix(TEXT_PREFIX)
            .ok_or(DecodeError::BadMagic {
                expected: "sealpost report (sealpost-report-v1:…)",
            })?;
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(b64.as_bytes())
            .map_err(|_| DecodeError::Invalid {
                what: "report text",
                why: "not base64url",
            })?;
        Self::decode(&bytes)
    }

    /// True if `who` signed this report.
    pub fn signed_by(&self, who: &PublicIdentity) -> bool {
        &self.signer == who.signing_bytes()
    }

    /// True if this report is about messages sent by `who`.
    pub fn is_about(&self, who: &PublicIdentity) -> bool {
        &self.subject == who.signing_bytes()
    }

    pub fn signer_bytes(&self) -> &[u8; 32] {
        &self.signer
    }

    pub fn subject_bytes(&self) -> &[u8; 32] {
        &self.subject
    }

    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    pub fn entries(&self) -> &Entries {
        &self.entries
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn kind_name(&self) -> &'static str {
        match self.entries {
            Entries::Receipt(_) => "receipt",
            Entries::Rejection(_) => "rejection",
        }
    }

    /// The receipt entry for `id`, if this is a receipt naming it.
    pub fn receipt_for(&self, id: &MessageId) -> Option<&ReceiptEntry> {
        match &self.entries {
            Entries::Receipt(list) => list.iter().find(|e| &e.id == id),
            Entries::Rejection(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn entries(n: usize) -> Entries {
        Entries::Receipt(
            (0..n)
                .map(|i| ReceiptEntry {
                    id: MessageId([i as u8; 16]),
                    content_hash: [7; 32],
                    content_len: i as u64,
                    stored_at: 1_750_000_000,
                })
                .collect(),
        )
    }

    #[test]
    fn round_trip_and_bounds() {
        let (a, b) = (
            Identity::generate(&mut OsRng),
            Identity::generate(&mut OsRng),
        );
        let r = Report::sign(&b, a.public(), 5, entries(3)).expect("test");
        let back = Report::decode(r.as_bytes()).expect("test");
        assert_eq!(back, r);
        assert!(back.signed_by(b.public()) && back.is_about(a.public()));
        assert!(!back.signed_by(a.public()));
        assert_eq!(Report::from_text(&r.to_text()).expect("test"), r);
        assert!(Report::sign(&b, a.public(), 5, entries(0)).is_err());
        let big = Report::sign(&b, a.public(), 5, entries(MAX_ENTRIES)).expect("test");
        assert!(big.as_bytes().len() <= MAX_REPORT_BYTES);
        assert!(big.to_text().len() <= MAX_REPORT_TEXT_BYTES);
        assert!(Report::sign(&b, a.public(), 5, entries(MAX_ENTRIES + 1)).is_err());
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let (a, b) = (
            Identity::generate(&mut OsRng),
            Identity::generate(&mut OsRng),
        );
        let rej = Entries::Rejection(vec![RejectionEntry {
            id: MessageId([1; 16]),
            reason: RejectReason::Expired,
        }]);
        for r in [
            Report::sign(&b, a.public(), 5, entries(2)).expect("test"),
            Report::sign(&b, a.public(), 5, rej).expect("test"),
        ] {
            let bytes = r.as_bytes();
            for i in 0..bytes.len() * 8 {
                let mut m = bytes.to_vec();
                m[i / 8] ^= 1 << (i % 8);
                assert!(Report::decode(&m).is_err(), "flip {i} accepted");
            }
            for cut in 0..bytes.len() {
                assert!(Report::decode(&bytes[..cut]).is_err());
            }
        }
    }
}
