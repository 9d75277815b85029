//! The ways opening a sealed message or a file blob can fail.
//!
//! Each variant is one failure class with its own exit code in the CLI, so a
//! script can tell "this was not for me" from "someone tampered with it".

use std::fmt;
use std::io;

use crate::codec::DecodeError;
use crate::identity::Fingerprint;
use crate::message::MessageId;

/// Where tampering was detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TamperedAt {
    /// The age header (its MAC or a stanza) was altered.
    Header,
    /// The AEAD chunk with this index (counted from 0) failed to authenticate.
    Chunk(u64),
}

impl fmt::Display for TamperedAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header => f.write_str("the encryption header"),
            Self::Chunk(i) => write!(f, "chunk {i}"),
        }
    }
}

/// Why a message is not for this identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotForMeReason {
    /// None of the age stanzas opens with this identity's key.
    NoMatchingKey,
    /// It decrypts, but the sender's signed recipient list does not name this
    /// identity: someone re-encrypted a message that was sent to others.
    NotInSignedRecipients,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("{}", match .0 {
        NotForMeReason::NoMatchingKey => "this message is not encrypted to your key",
        NotForMeReason::NotInSignedRecipients =>
            "this message was sealed for other recipients and re-encrypted to you (surreptitious forwarding)",
    })]
    NotForMe(NotForMeReason),
    #[error("malformed: {0}")]
    Malformed(DecodeError),
    #[error(
        "{what} version {version} is not supported by this version of sealpost; upgrade sealpost"
    )]
    UnsupportedVersion { what: &'static str, version: u8 },
    #[error("the sender's signature does not verify: the message was forged or altered by its sender's software")]
    BadSignature,
    #[error("the sender (fingerprint {fingerprint}) is not one of your contacts; add their card after comparing fingerprints")]
    UnknownSender { fingerprint: Fingerprint },
    #[error("tampered: {at} failed authentication; the data was changed after sealing")]
    Tampered { at: TamperedAt },
    #[error("truncated: the data ends early ({detail})")]
    Truncated { detail: String },
    #[error("expired at {} (it is now {}); ask the sender to send it again", rfc3339(*.expires_at), rfc3339(*.now))]
    Expired { expires_at: u64, now: u64 },
    #[error("created at {}, more than {max_skew} s after now ({}); check the sender's and your clock", rfc3339(*.created_at), rfc3339(*.now))]
    FromFuture {
        created_at: u64,
        now: u64,
        max_skew: u64,
    },
    #[error("it never expires, and a message delivered through relays (or opened with --strict) must expire within 400 days so that a replayed copy is always recognised")]
    NoExpiry,
    #[error("replayed: message {id} was already opened here")]
    Replayed { id: MessageId },
    #[error("larger than the limit of {max} bytes")]
    TooLarge { max: u64 },
    #[error("I/O error while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { context, source }
    }

    /// A short stable name for the class of failure (the CLI's `class`
    /// in `--json` errors, an agent's detection records).
    pub fn class(&self) -> &'static str {
        match self {
            Self::NotForMe(NotForMeReason::NoMatchingKey) => "not-for-me",
            Self::NotForMe(NotForMeReason::NotInSignedRecipients) => "forwarded",
            Self::Malformed(_) => "malformed",
            Self::UnsupportedVersion { .. } => "unsupported-version",
            Self::BadSignature => "bad-signature",
            Self::UnknownSender { .. } => "unknown-sender",
            Self::Tampered { .. } => "tampered",
            Self::Truncated { .. } => "truncated",
            Self::Expired { .. } => "expired",
            Self::FromFuture { .. } => "from-future",
            Self::NoExpiry => "no-expiry",
            Self::Replayed { .. } => "replayed",
            Self::TooLarge { .. } => "too-large",
            _ => "io",
        }
    }
}

impl From<DecodeError> for OpenError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::UnsupportedVersion { what, version } => {
                Self::UnsupportedVersion { what, version }
            }
            other => Self::Malformed(other),
        }
    }
}

/// Why sealing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    #[error("cannot seal: {0}")]
    InvalidRequest(&'static str),
    #[error("I/O error while sealing: {0}")]
    Io(#[from] io::Error),
}

/// Unix seconds as an RFC 3339 UTC time, for messages people read.
pub fn rfc3339(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.min(253_402_300_799));
    humantime::format_rfc3339_seconds(t).to_string()
}
