//! sealpost's sans-IO core.
//!
//! Formats, identities, sealing and opening, and freshness decisions. No
//! sockets, no file system, no clock: time is passed in as unix seconds and
//! randomness as a `CryptoRngCore` (one exception: age draws its ephemeral
//! X25519 key and file key from the OS itself). Everything here is tested
//! without I/O.
#![forbid(unsafe_code)]

pub mod blob;
pub mod buffers;
pub mod card;
pub mod codec;
pub mod delivery;
pub mod error;
pub mod freshness;
mod hashing;
pub mod identity;
pub mod manifest;
pub mod message;
pub mod notice;
pub mod pair;
pub mod relay;
pub mod repair;
pub mod report;
pub mod retry;

pub use card::{CardError, CardFields, ContactCard, RelayPin};

/// Bytes as lower-case hex, the form ids, hashes and keys take in
/// messages, logs and `--json`.
pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}
pub use error::{NotForMeReason, OpenError, SealError, TamperedAt};
pub use freshness::{FreshnessPolicy, ReplayCache};
pub use identity::{Fingerprint, Identity, PublicIdentity};
pub use message::{Kind, MessageHeader, MessageId, OpenedMessage, SealRequest, SealSummary};
pub use report::{Entries, ReceiptEntry, RejectReason, RejectionEntry, Report, ReportError};
