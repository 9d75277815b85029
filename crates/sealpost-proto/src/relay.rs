//! The relay protocol: frames exchanged over TLS 1.3 between an agent and a
//! relay. Pure encode/decode; the relay and the agent do the I/O.
//!
//! ```text
//! frame = len:u32 type:u8 request_id:u32 body      (len counts type..body)
//! ```
//!
//! Requests carry an id the response repeats, so a client can pipeline
//! many requests on one connection. Pushes from the relay (a new item in a
//! subscribed mailbox) use request id 0. See `docs/PROTOCOL.md` §6.

use crate::buffers;
use crate::codec::{DecodeError, Reader};
pub use crate::manifest::BlobId;

/// Protocol version spoken in `Hello`.
pub const VERSION: u8 = 1;
/// The ALPN protocol id on the TLS connection.
pub const ALPN: &[u8] = b"sealpost/1";
/// Largest frame body (type + id + body): a 1 MiB payload plus headers.
pub const MAX_FRAME: usize = (1 << 20) + 1024;
/// Largest sealed message a relay takes in one `Submit` by default (a relay
/// may be configured lower, never higher: it must fit a frame). Larger
/// content travels as a file: a small sealed manifest plus a blob uploaded
/// in pieces.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest piece of a blob in one `BlobPut` or `BlobData`.
pub const MAX_BLOB_PIECE: usize = 1 << 20;
/// Most items returned by one `Fetch` and most ids in one `Ack`.
pub const MAX_BATCH: usize = 4096;
/// Longest error or refusal text.
pub const MAX_TEXT: usize = 1024;

/// A mailbox is named by the hash of its owner's Ed25519 key, so the
/// relay's database never needs the key to route and a sender can compute
/// it from a contact card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxId(pub [u8; 32]);

impl MailboxId {
    pub fn of(signing_key: &[u8; 32]) -> Self {
        Self(blake3::derive_key("sealpost v1 mailbox", signing_key))
    }
}

impl std::fmt::Display for MailboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0[..8]))
    }
}

/// Context strings for what an agent or a relay signs on the wire.
pub mod context {
    pub const REGISTER: &[u8] = b"sealpost v1 relay register\0";
    pub const AUTH: &[u8] = b"sealpost v1 relay auth\0";
    pub const REFUSAL: &[u8] = b"sealpost v1 relay refusal\0";
    /// A relay proving its own key to the next relay (§6.8).
    pub const PEER: &[u8] = b"sealpost v1 relay peer\0";
    /// A relay's certificate key vouching for its Ed25519 key (§6.1).
    pub const KEY_BINDING: &[u8] = b"sealpost v1 relay key binding\0";
}

/// A `Forward` frame's body before its payload: type, request id, hops,
/// pin, mailbox, expiry, payload hash, address length.
pub const FORWARD_HEAD: usize = 1 + 4 + 1 + 32 + 32 + 8 + 32 + 1;

/// A `BlobForward` frame's body before its piece's data: type, request
/// id, hops, pin, blob id, mailbox, blob length, blob hash, expiry,
/// offset, address length.
pub const BLOB_FORWARD_HEAD: usize = 1 + 4 + 1 + 32 + 16 + 32 + 8 + 32 + 8 + 8 + 1;

/// Items a `ForwardStatus` asks about, at most (its body stays under the
/// small-request bound of §6.2).
pub const MAX_FORWARD_STATUS: usize = 512;

/// The longest error a `ForwardStatus` answer carries per item.
pub const MAX_WAITING_ERROR: usize = 256;

/// An item still waiting in a relay's forward queue (§6.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Attempts to hand it on that failed.
    pub attempts: u32,
    /// When the relay tries again (its clock, unix seconds).
    pub next_at: u64,
    /// The last attempt's error (at most 256 bytes), if one failed.
    pub error: Option<String>,
}

/// The most relays an item may pass through before the one that holds
/// its mailbox (§6.8): a `Forward` whose `hops` is this or more is refused
/// as [`RefusalCode::NotForwarded`].
pub const MAX_HOPS: u8 = 8;

/// TLS exporter label for the session binding of `Register` and `Auth`
/// (RFC 8446 §7.5); the exporter context is empty and the length 32.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-sealpost-v1-auth";

/// What an agent signs to prove it holds a mailbox key on this TLS session:
/// the exporter value is unique to the session, the challenge to the
/// connection, so a captured signature is useless anywhere else.
pub fn auth_transcript(exporter: &[u8; 32], challenge: &[u8; 32]) -> [u8; 64] {
    let mut t = [0u8; 64];
    t[..32].copy_from_slice(exporter);
    t[32..].copy_from_slice(challenge);
    t
}

/// Why the relay refused a submission. Signed, so a sender can show it and
/// a forged one (from anyone but the relay) is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalCode {
    UnknownMailbox,
    OverQuota,
    TooLarge,
    Expired,
    HashMismatch,
    /// This relay does not pass the item on: its hop count reached
    /// [`MAX_HOPS`], or whoever sent it may not forward through this relay
    /// (§6.8).
    NotForwarded,
}

impl RefusalCode {
    pub fn code(self) -> u8 {
        match self {
            Self::UnknownMailbox => 1,
            Self::OverQuota => 2,
            Self::TooLarge => 3,
            Self::Expired => 4,
            Self::HashMismatch => 5,
            Self::NotForwarded => 6,
        }
    }

    pub(crate) fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            1 => Self::UnknownMailbox,
            2 => Self::OverQuota,
            3 => Self::TooLarge,
            4 => Self::Expired,
            5 => Self::HashMismatch,
            6 => Self::NotForwarded,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "refusal code",
                    why: "unknown code",
                })
            }
        })
    }

    /// A short machine name: `unknown_mailbox`, `over_quota`, …
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownMailbox => "unknown_mailbox",
            Self::OverQuota => "over_quota",
            Self::TooLarge => "too_large",
            Self::Expired => "expired",
            Self::HashMismatch => "hash_mismatch",
            Self::NotForwarded => "not_forwarded",
        }
    }

    /// Whether the refusal ends the delivery. A full mailbox is not a
    /// lasting state (its owner fetches, items expire) and anyone may fill
    /// a mailbox: a sender tries again, with its backoff, until the
    /// message expires. Every other refusal is final.
    pub fn is_lasting(self) -> bool {
        !matches!(self, Self::OverQuota)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::UnknownMailbox => "no such mailbox on this relay",
            Self::OverQuota => "the mailbox is over its quota",
            Self::TooLarge => "larger than this relay accepts",
            Self::Expired => "already expired",
            Self::HashMismatch => "the payload does not match its stated BLAKE3",
            Self::NotForwarded => {
                "this relay does not take it to pass on (not from one of its mailbox owners, too many hops, or forwarded by a relay it takes nothing from)"
            }
        }
    }
}

/// A relay's signed refusal of one submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefusalCode,
    pub at: u64,
    pub mailbox: MailboxId,
    pub payload_hash: [u8; 32],
    pub signature: [u8; 64],
}

impl Refusal {
    /// The bytes the relay signs (after the REFUSAL context).
    pub fn signed_bytes(
        code: RefusalCode,
        at: u64,
        mailbox: &MailboxId,
        hash: &[u8; 32],
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(73);
        v.push(code.code());
        v.extend_from_slice(&at.to_be_bytes());
        v.extend_from_slice(&mailbox.0);
        v.extend_from_slice(hash);
        v
    }

    /// Checks the signature against the relay's key.
    pub fn verify(&self, relay_key: &ed25519_dalek::VerifyingKey) -> bool {
        let mut m = context::REFUSAL.to_vec();
        m.extend_from_slice(&Self::signed_bytes(
            self.code,
            self.at,
            &self.mailbox,
            &self.payload_hash,
        ));
        relay_key
            .verify_strict(&m, &ed25519_dalek::Signature::from_bytes(&self.signature))
            .is_ok()
    }
}

/// One stored item as a fetch returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Position in the mailbox, strictly increasing; the fetch cursor.
    pub seq: u64,
    pub received_at: u64,
    pub expires_at: u64,
    pub payload_hash: [u8; 32],
    pub payload: Vec<u8>,
}

/// Error codes in `Error` responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame could not be parsed.
    BadRequest,
    /// The request needs an authenticated mailbox.
    NotAuthenticated,
    /// A signature did not verify.
    BadSignature,
    /// The mailbox exists already (Register) or does not (Auth).
    MailboxState,
    /// A blob piece does not continue the stored blob; the text says the
    /// stored offset, which the client resumes from.
    WrongOffset,
    NotFound,
    RateLimited,
    /// The relay failed internally (storage); retry later.
    Internal,
    /// The protocol version is not spoken here.
    UnsupportedVersion,
    /// `Register` of a new mailbox refused by the relay's policy (closed,
    /// not on its allow-list, or as many mailboxes as it takes).
    RegistrationRefused,
    /// The completed blob does not match the BLAKE3 its last piece stated;
    /// the relay discarded it (`BlobPut`, §6.6). The uploader computed the
    /// hash over the bytes it sent, so this is the relay's fault or a
    /// false claim; it uploads again from offset 0.
    BlobHashMismatch,
    /// This relay does not offer the requested service (pairing turned
    /// off by its operator, §10).
    NotOffered,
    /// The pairing slot is gone: used by another, expired, or its other
    /// side left (§10). The text says which.
    PairGone,
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            Self::BadRequest => 1,
            Self::NotAuthenticated => 2,
            Self::BadSignature => 3,
            Self::MailboxState => 4,
            Self::WrongOffset => 5,
            Self::NotFound => 6,
            Self::RateLimited => 7,
            Self::Internal => 8,
            Self::UnsupportedVersion => 9,
            Self::RegistrationRefused => 10,
            Self::BlobHashMismatch => 11,
            Self::NotOffered => 12,
            Self::PairGone => 13,
        }
    }

    fn from_code(c: u16) -> Result<Self, DecodeError> {
        Ok(match c {
            1 => Self::BadRequest,
            2 => Self::NotAuthenticated,
            3 => Self::BadSignature,
            4 => Self::MailboxState,
            5 => Self::WrongOffset,
            6 => Self::NotFound,
            7 => Self::RateLimited,
            8 => Self::Internal,
            9 => Self::UnsupportedVersion,
            10 => Self::RegistrationRefused,
            11 => Self::BlobHashMismatch,
            12 => Self::NotOffered,
            13 => Self::PairGone,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "error code",
                    why: "unknown code",
                })
            }
        })
    }
}

/// One piece of a blob being uploaded (`BlobPut`, §6.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobPiece {
    pub blob_id: BlobId,
    pub mailbox: MailboxId,
    pub total_len: u64,
    /// On the piece that completes the blob (`offset + data.len() ==
    /// total_len`), BLAKE3 of the whole blob: the relay checks it then and
    /// when scrubbing. All zeros on every other piece (the sender learns
    /// the hash while it uploads; a relay ignores the field there).
    pub blob_hash: [u8; 32],
    pub expires_at: u64,
    pub offset: u64,
    pub data: Vec<u8>,
}

impl BlobPiece {
    /// Whether this piece completes its blob (and so states its hash).
    pub fn is_last(&self) -> bool {
        self.offset.checked_add(self.data.len() as u64) == Some(self.total_len)
    }

    /// What a relay's refusal of this piece names as its `payload_hash`
    /// (§6.5): BLAKE3 of `blob_id || offset:u64`, so a refusal answers
    /// exactly this piece of this blob.
    pub fn refusal_hash(&self) -> [u8; 32] {
        blob_refusal_hash(&self.blob_id, self.offset)
    }
}

/// The relay a forwarded item goes to next: its address and the BLAKE3 of
/// its certificate's key (§6.1), as a contact card names a home relay.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// `host:port`, 1 to 253 printable ASCII bytes.
    pub addr: String,
    pub pin: [u8; 32],
}

/// A `Forward` request's item: what a `Submit` carries, with where it
/// goes and how many relays it passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// Relays the item passed before this request (0 from the sender).
    pub hops: u8,
    pub next: NextHop,
    pub mailbox: MailboxId,
    pub expires_at: u64,
    pub payload_hash: [u8; 32],
    pub payload: Vec<u8>,
}

/// A `BlobForward` request: a piece of a blob to pass on toward the relay
/// that holds its mailbox (§6.8), as a `Forward` passes on an item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobForward {
    /// Relays the blob passed before this request (0 from the sender).
    pub hops: u8,
    pub next: NextHop,
    /// The piece, exactly as a `BlobPut` to the relay holding `mailbox`.
    pub piece: BlobPiece,
}

/// [`BlobPiece::refusal_hash`] from the piece's blob id and offset.
pub fn blob_refusal_hash(blob_id: &BlobId, offset: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&blob_id.0);
    h.update(&offset.to_be_bytes());
    *h.finalize().as_bytes()
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    Hello {
        version: u8,
    },
    Register {
        key: [u8; 32],
        signature: [u8; 64],
    },
    Auth {
        key: [u8; 32],
        signature: [u8; 64],
    },
    Submit {
        mailbox: MailboxId,
        expires_at: u64,
        payload_hash: [u8; 32],
        payload: Vec<u8>,
    },
    Fetch {
        after: u64,
        max: u32,
    },
    Subscribe,
    Ack {
        seqs: Vec<u64>,
    },
    BlobPut(BlobPiece),
    /// How much of a blob the relay holds: the blob `blob_id` of `mailbox`
    /// (an uploader names the mailbox it uploads for), or of the
    /// connection's own mailbox when `None` (§6.6).
    BlobStatus {
        blob_id: BlobId,
        mailbox: Option<MailboxId>,
    },
    BlobGet {
        blob_id: BlobId,
        offset: u64,
        len: u32,
    },
    BlobDelete {
        blob_id: BlobId,
    },
    Status,
    /// Authenticates the connection as relay `key` (§6.8): a relay
    /// forwarding to the next one proves its identity on this TLS session.
    PeerAuth {
        key: [u8; 32],
        signature: [u8; 64],
    },
    /// A sealed message to pass on toward the relay that holds its
    /// mailbox (§6.8).
    Forward(Forward),
    /// A blob piece to pass on toward the relay that holds its mailbox
    /// (§6.8).
    BlobForward(BlobForward),
    /// Which of the connection's own forwarded items (mailbox, payload
    /// hash) still wait in this relay's forward queue (§6.8).
    ForwardStatus {
        items: Vec<(MailboxId, [u8; 32])>,
    },
    /// The relay's certificate key's signature over its Ed25519 key
    /// (§6.1), so that anyone holding its pin can check that key offline.
    KeyBinding,
    /// What this relay accepts: asked before a large file is hashed, and
    /// after a refusal, so the sender can state the limit.
    Limits,
    /// Opens a pairing slot for `ttl` seconds (§10); the connection's
    /// mailbox owner only.
    PairOpen {
        ttl: u32,
    },
    /// Joins slot `slot` (once per slot, ever), putting the first message
    /// for the side that opened it.
    PairJoin {
        slot: u32,
        data: Vec<u8>,
    },
    /// Puts a message in a slot this connection opened or joined, for the
    /// other side.
    PairSend {
        slot: u32,
        data: Vec<u8>,
    },
    /// Takes the other side's next message from the slot, waiting up to
    /// `wait_ms` (the relay may wait less) for one.
    PairWait {
        slot: u32,
        wait_ms: u32,
    },
    /// Leaves a slot: the other side is told, and no one may join.
    PairLeave {
        slot: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    Ok,
    HelloOk {
        version: u8,
        relay_key: [u8; 32],
        challenge: [u8; 32],
    },
    Accepted {
        item_id: [u8; 16],
    },
    Refused(Refusal),
    Items {
        items: Vec<Item>,
        more: bool,
    },
    Notify {
        seq: u64,
    },
    Acked {
        count: u32,
    },
    BlobStored {
        stored: u64,
        complete: bool,
    },
    BlobData {
        offset: u64,
        data: Vec<u8>,
    },
    Status {
        items: u64,
        bytes: u64,
        quota: u64,
    },
    /// The relay's limits on what one sender may submit. Advisory: the
    /// signed refusal stays the proof; a relay that states lower limits
    /// than it enforces only refuses earlier (relays are trusted for
    /// availability only).
    Limits {
        /// Largest `Submit` payload, bytes.
        max_message: u32,
        /// Largest blob (`BlobPut`'s `total_len`), bytes.
        max_blob: u64,
        /// Bytes one mailbox may hold.
        mailbox_quota: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    KeyBinding(KeyBinding),
    /// Per item asked about: still waiting here, or not (handed on, or
    /// ended with a notice, or never queued).
    ForwardStatus {
        items: Vec<Option<Waiting>>,
    },
    /// The slot a `PairOpen` opened, and when it ends (relay's clock).
    PairOpened {
        slot: u32,
        expires_at: u64,
    },
    /// The other side's next message; empty when none came in the wait.
    PairMessage {
        data: Vec<u8>,
    },
}

/// The largest SubjectPublicKeyInfo a key binding carries (an RSA key of
/// 8192 bits takes about 1,100 bytes).
pub const MAX_BINDING_SPKI: usize = 2048;
/// The largest signature a key binding carries (RSA 8192: 1,024 bytes).
pub const MAX_BINDING_SIGNATURE: usize = 1024;

/// A relay's certificate key vouching for its Ed25519 key (§6.1): `scheme`
/// (a TLS 1.3 `SignatureScheme` code) signature by the key of `spki` over
/// `"sealpost v1 relay key binding\0" || ed25519_key`. Whoever holds the
/// relay's pin (BLAKE3 of `spki`) can check it without a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyBinding {
    pub scheme: u16,
    pub spki: Vec<u8>,
    pub signature: Vec<u8>,
}

impl KeyBinding {
    /// What the certificate key signs for `ed25519_key`.
    pub fn message(ed25519_key: &[u8; 32]) -> Vec<u8> {
        let mut m = context::KEY_BINDING.to_vec();
        m.extend_from_slice(ed25519_key);
        m
    }

    pub fn encode_into(&self, o: &mut Vec<u8>) {
        o.extend_from_slice(&self.scheme.to_be_bytes());
        o.extend_from_slice(&(self.spki.len() as u16).to_be_bytes());
        o.extend_from_slice(&self.spki);
        o.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        o.extend_from_slice(&self.signature);
    }

    pub fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let scheme = r.u16("signature scheme")?;
        let n = r.u16("key length")? as usize;
        if n == 0 || n > MAX_BINDING_SPKI {
            return Err(DecodeError::Invalid {
                what: "key binding",
                why: "the key must be 1 to 2048 bytes",
            });
        }
        let spki = r.take(n, "key")?.to_vec();
        let n = r.u16("signature length")? as usize;
        if n == 0 || n > MAX_BINDING_SIGNATURE {
            return Err(DecodeError::Invalid {
                what: "key binding",
                why: "the signature must be 1 to 1024 bytes",
            });
        }
        let signature = r.take(n, "signature")?.to_vec();
        Ok(Self {
            scheme,
            spki,
            signature,
        })
    }
}

/// A decoded frame: its request id and content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<T> {
    pub id: u32,
    pub body: T,
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_TEXT)];
    // Cut on a character boundary.
    let b = match std::str::from_utf8(b) {
        Ok(_) => b,
        Err(e) => &b[..e.valid_up_to()],
    };
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn read_text(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let len = r.u16("text length")? as usize;
    if len > MAX_TEXT {
        return Err(DecodeError::TooLarge {
            what: "text",
            max: MAX_TEXT,
        });
    }
    let b = r.take(len, "text")?;
    let s = std::str::from_utf8(b).map_err(|_| DecodeError::Invalid {
        what: "text",
        why: "not UTF-8",
    })?;
    // Shown to people: no terminal control characters.
    Ok(s.chars().filter(|c| !c.is_control()).collect())
}

fn header(out: &mut Vec<u8>, ty: u8, id: u32) {
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.push(ty);
    out.extend_from_slice(&id.to_be_bytes());
}

/// Sets an encoded frame's length prefix from its length: for a frame whose
/// last field ("rest": a payload, a piece, blob data) was appended after
/// it was encoded.
pub fn finish_frame(out: &mut [u8]) {
    finish_frame_before(out, 0);
}

/// [`finish_frame`] for a frame whose last `more` bytes are sent after
/// `out` without being copied into it (blob data shared from memory).
pub fn finish_frame_before(out: &mut [u8], more: usize) {
    let len = (out.len() - 4 + more) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
}

/// Reads the length prefix: how many more bytes the frame has. Fails on a
/// frame longer than `MAX_FRAME`, before any of it is read.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::TooLarge {
            what: "frame",
            max: MAX_FRAME,
        });
    }
    if len < 5 {
        return Err(DecodeError::Truncated {
            what: "frame header",
        });
    }
    Ok(len)
}

/// Checks a body read in two parts (see [`Request::head_len`]): `head` is
/// exactly the head its type has (`head_len`), the whole fits a frame and
/// the rest is at most `rest_max` bytes. On an error the rest's buffer goes
/// back to the pool.
fn split_parts(
    head_len: Option<usize>,
    head: &[u8],
    rest: Vec<u8>,
    rest_max: usize,
) -> Result<Vec<u8>, DecodeError> {
    let err = if head_len != Some(head.len()) || head.len() + rest.len() > MAX_FRAME {
        DecodeError::Invalid {
            what: "frame",
            why: "not split at the start of its last field",
        }
    } else if rest.len() > rest_max {
        DecodeError::TooLarge {
            what: "blob piece",
            max: MAX_BLOB_PIECE,
        }
    } else {
        return Ok(rest);
    };
    buffers::give(rest);
    Err(err)
}

/// The bytes of `body` from `at` on, in `body`'s own buffer.
fn into_rest(mut body: Vec<u8>, at: usize) -> Vec<u8> {
    body.copy_within(at.., 0);
    body.truncate(body.len() - at);
    body
}

/// A `Forward`'s or `BlobForward`'s tail: `addr_len:u8`, then data of at
/// most `max_data` bytes, then the address. Returns the address and where
/// the data starts (the reader is left at the end).
fn trailing_address(r: &mut Reader<'_>, max_data: usize) -> Result<(String, usize), DecodeError> {
    let addr_len = r.u8("address length")? as usize;
    let n = r.remaining();
    if addr_len == 0 || addr_len > n {
        return Err(DecodeError::Invalid {
            what: "next relay's address",
            why: "must be 1 to 253 bytes, after the data",
        });
    }
    if n - addr_len > max_data {
        return Err(DecodeError::TooLarge {
            what: "forwarded data",
            max: max_data,
        });
    }
    let at = r.position();
    r.take(n - addr_len, "data")?;
    let addr = r.take(addr_len, "next relay's address")?;
    let addr = std::str::from_utf8(addr)
        .map_err(|_| DecodeError::Invalid {
            what: "next relay's address",
            why: "must be printable ASCII without spaces",
        })?
        .to_owned();
    crate::card::validate_relay_address(&addr)?;
    Ok((addr, at))
}

/// A `BlobPut`'s (and `BlobForward`'s) fields before the data, in order:
/// blob id, mailbox, blob length, blob hash, expiry, offset.
fn put_piece_head(o: &mut Vec<u8>, p: &BlobPiece) {
    o.extend_from_slice(&p.blob_id.0);
    o.extend_from_slice(&p.mailbox.0);
    o.extend_from_slice(&p.total_len.to_be_bytes());
    o.extend_from_slice(&p.blob_hash);
    o.extend_from_slice(&p.expires_at.to_be_bytes());
    o.extend_from_slice(&p.offset.to_be_bytes());
}

/// [`put_piece_head`] read back; the data is left empty.
fn piece_head(r: &mut Reader<'_>) -> Result<BlobPiece, DecodeError> {
    Ok(BlobPiece {
        blob_id: blob_id(r)?,
        mailbox: MailboxId(r.array("mailbox")?),
        total_len: r.u64("blob length")?,
        blob_hash: r.array("blob hash")?,
        expires_at: r.u64("expiry")?,
        offset: r.u64("offset")?,
        data: Vec::new(),
    })
}

/// A pairing message: the rest of the frame, at most
/// [`crate::pair::MAX_PAIR_MESSAGE`] bytes.
fn pair_data(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
    let n = r.remaining();
    if n > crate::pair::MAX_PAIR_MESSAGE {
        return Err(DecodeError::TooLarge {
            what: "pairing message",
            max: crate::pair::MAX_PAIR_MESSAGE,
        });
    }
    Ok(r.take(n, "pairing message")?.to_vec())
}

fn blob_id(r: &mut Reader<'_>) -> Result<BlobId, DecodeError> {
    r.array("blob id").map(BlobId)
}

impl Request {
    /// Encodes a whole frame, length prefix included.
    pub fn encode(&self, id: u32) -> Vec<u8> {
        let mut o = Vec::with_capacity(64);
        self.encode_into(id, &mut o);
        o
    }

    /// A frame carrying a blob piece (`BlobPut`, `BlobForward`) in three
    /// parts, so the piece's data is written from its own buffer instead
    /// of being copied into the frame: `o` (cleared first) gets the frame
    /// up to the data, its length prefix counting all three parts, and the
    /// return is the data and what follows it (a `BlobForward`'s address;
    /// empty for a `BlobPut`). The three written in order are exactly
    /// [`Request::encode_into`]'s bytes. Any other request is encoded
    /// whole into `o` and `None` returned.
    pub fn encode_split<'a>(&'a self, id: u32, o: &mut Vec<u8>) -> Option<(&'a [u8], &'a [u8])> {
        o.clear();
        match self {
            Self::BlobPut(p) => {
                header(o, 0x08, id);
                put_piece_head(o, p);
                finish_frame_before(o, p.data.len());
                Some((&p.data, &[]))
            }
            Self::BlobForward(f) => {
                let p = &f.piece;
                header(o, 0x11, id);
                o.push(f.hops);
                o.extend_from_slice(&f.next.pin);
                put_piece_head(o, p);
                o.push(f.next.addr.len() as u8);
                let after = f.next.addr.as_bytes();
                finish_frame_before(o, p.data.len() + after.len());
                Some((&p.data, after))
            }
            _ => {
                self.encode_into(id, o);
                None
            }
        }
    }

    /// [`Request::encode`] into `o` (cleared first), so a buffer can be
    /// reused.
    pub fn encode_into(&self, id: u32, o: &mut Vec<u8>) {
        o.clear();
        match self {
            Self::Hello { version } => {
                header(o, 0x01, id);
                o.push(*version);
            }
            Self::Register { key, signature } => {
                header(o, 0x02, id);
                o.extend_from_slice(key);
                o.extend_from_slice(signature);
            }
            Self::Auth { key, signature } => {
                header(o, 0x03, id);
                o.extend_from_slice(key);
                o.extend_from_slice(signature);
            }
            Self::Submit {
                mailbox,
                expires_at,
                payload_hash,
                payload,
            } => {
                o.reserve(payload.len() + 80);
                header(o, 0x04, id);
                o.extend_from_slice(&mailbox.0);
                o.extend_from_slice(&expires_at.to_be_bytes());
                o.extend_from_slice(payload_hash);
                o.extend_from_slice(payload);
            }
            Self::Fetch { after, max } => {
                header(o, 0x05, id);
                o.extend_from_slice(&after.to_be_bytes());
                o.extend_from_slice(&max.to_be_bytes());
            }
            Self::Subscribe => header(o, 0x06, id),
            Self::Ack { seqs } => {
                header(o, 0x07, id);
                o.extend_from_slice(&(seqs.len() as u16).to_be_bytes());
                for s in seqs {
                    o.extend_from_slice(&s.to_be_bytes());
                }
            }
            Self::BlobPut(_) | Self::BlobForward(_) => {
                if let Some((data, after)) = self.encode_split(id, o) {
                    o.reserve(data.len() + after.len());
                    o.extend_from_slice(data);
                    o.extend_from_slice(after);
                }
            }
            Self::BlobStatus { blob_id, mailbox } => {
                header(o, 0x09, id);
                o.extend_from_slice(&blob_id.0);
                if let Some(m) = mailbox {
                    o.extend_from_slice(&m.0);
                }
            }
            Self::BlobGet {
                blob_id,
                offset,
                len,
            } => {
                header(o, 0x0a, id);
                o.extend_from_slice(&blob_id.0);
                o.extend_from_slice(&offset.to_be_bytes());
                o.extend_from_slice(&len.to_be_bytes());
            }
            Self::BlobDelete { blob_id } => {
                header(o, 0x0b, id);
                o.extend_from_slice(&blob_id.0);
            }
            Self::Status => header(o, 0x0c, id),
            Self::Limits => header(o, 0x0d, id),
            Self::PeerAuth { key, signature } => {
                header(o, 0x0e, id);
                o.extend_from_slice(key);
                o.extend_from_slice(signature);
            }
            Self::KeyBinding => header(o, 0x10, id),
            Self::Forward(f) => {
                o.reserve(f.payload.len() + f.next.addr.len() + 112);
                header(o, 0x0f, id);
                o.push(f.hops);
                o.extend_from_slice(&f.next.pin);
                o.extend_from_slice(&f.mailbox.0);
                o.extend_from_slice(&f.expires_at.to_be_bytes());
                o.extend_from_slice(&f.payload_hash);
                o.push(f.next.addr.len() as u8);
                // The address after the payload: the head before the
                // payload keeps a fixed length (`head_len`).
                o.extend_from_slice(&f.payload);
                o.extend_from_slice(f.next.addr.as_bytes());
            }
            Self::ForwardStatus { items } => {
                header(o, 0x12, id);
                o.extend_from_slice(&(items.len() as u16).to_be_bytes());
                for (mb, h) in items {
                    o.extend_from_slice(&mb.0);
                    o.extend_from_slice(h);
                }
            }
            Self::PairOpen { ttl } => {
                header(o, 0x13, id);
                o.extend_from_slice(&ttl.to_be_bytes());
            }
            Self::PairJoin { slot, data } | Self::PairSend { slot, data } => {
                let ty = if matches!(self, Self::PairJoin { .. }) {
                    0x14
                } else {
                    0x15
                };
                header(o, ty, id);
                o.extend_from_slice(&slot.to_be_bytes());
                o.extend_from_slice(data);
            }
            Self::PairWait { slot, wait_ms } => {
                header(o, 0x16, id);
                o.extend_from_slice(&slot.to_be_bytes());
                o.extend_from_slice(&wait_ms.to_be_bytes());
            }
            Self::PairLeave { slot } => {
                header(o, 0x17, id);
                o.extend_from_slice(&slot.to_be_bytes());
            }
        }
        finish_frame(o);
    }

    /// Decodes a frame body (after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Frame<Self>, DecodeError> {
        let (mut frame, rest) = Self::parse(body)?;
        if let Some(at) = rest {
            frame.body.put_rest(body[at..].to_vec());
        }
        Ok(frame)
    }

    /// [`Request::decode`] of a body it owns: a submission's payload or a
    /// blob piece keeps the body's buffer (its head moved off) instead of
    /// being copied out; any other body goes back to [`buffers`].
    pub fn decode_owned(body: Vec<u8>) -> Result<Frame<Self>, DecodeError> {
        let parsed = Self::parse(&body);
        let (mut frame, rest) = match parsed {
            Ok(p) => p,
            Err(e) => {
                buffers::give(body);
                return Err(e);
            }
        };
        match rest {
            Some(at) => frame.body.put_rest(into_rest(body, at)),
            None => buffers::give(body),
        }
        Ok(frame)
    }

    /// For request types whose last field runs to the end of the frame (a
    /// submission's payload, a blob piece): the length of the body before
    /// it. A reader may read that head first and the rest straight into a
    /// buffer of its own, then [`Request::decode_split`] (no copy).
    pub fn head_len(frame_type: u8) -> Option<usize> {
        match frame_type {
            0x04 => Some(1 + 4 + 32 + 8 + 32),
            0x08 => Some(1 + 4 + 16 + 32 + 8 + 32 + 8 + 8),
            0x0f => Some(FORWARD_HEAD),
            0x11 => Some(BLOB_FORWARD_HEAD),
            _ => None,
        }
    }

    /// [`Request::decode`] of a body read in two parts: `head` (exactly
    /// [`Request::head_len`] bytes) and the `rest` of the frame.
    pub fn decode_split(head: &[u8], rest: Vec<u8>) -> Result<Frame<Self>, DecodeError> {
        let ty = head.first().copied().unwrap_or(0);
        let rest_max = match ty {
            0x08 => MAX_BLOB_PIECE,
            0x11 => MAX_BLOB_PIECE + 253,
            _ => MAX_FRAME,
        };
        let rest = split_parts(Self::head_len(ty), head, rest, rest_max)?;
        let parsed = if ty == 0x0f || ty == 0x11 {
            // The address ends the rest: parsed with the head, so that the
            // payload stays in the rest's own buffer.
            let addr_len = head.last().copied().unwrap_or(0) as usize;
            let mut h = head.to_vec();
            h.extend_from_slice(&rest[rest.len().saturating_sub(addr_len)..]);
            Self::parse(&h)
        } else {
            Self::parse(head)
        };
        let (mut frame, _) = match parsed {
            Ok(p) => p,
            Err(e) => {
                buffers::give(rest);
                return Err(e);
            }
        };
        frame.body.put_rest(rest);
        Ok(frame)
    }

    /// Puts the frame's rest in place. For a `Forward` the rest is the
    /// payload followed by the address; its address was checked and taken
    /// while parsing, so the rest is cut to the payload here.
    fn put_rest(&mut self, mut rest: Vec<u8>) {
        match self {
            Self::Submit { payload, .. } => *payload = rest,
            Self::BlobPut(p) => p.data = rest,
            Self::Forward(f) => {
                rest.truncate(rest.len().saturating_sub(f.next.addr.len()));
                f.payload = rest;
            }
            Self::BlobForward(f) => {
                rest.truncate(rest.len().saturating_sub(f.next.addr.len()));
                f.piece.data = rest;
            }
            _ => {}
        }
    }

    /// Parses a frame body; a payload or piece ("rest" of the frame) is
    /// left empty and its start returned.
    fn parse(body: &[u8]) -> Result<(Frame<Self>, Option<usize>), DecodeError> {
        let mut rest = None;
        if body.len() > MAX_FRAME {
            return Err(DecodeError::TooLarge {
                what: "frame",
                max: MAX_FRAME,
            });
        }
        let mut r = Reader::new(body);
        let ty = r.u8("frame type")?;
        let id = r.u32("request id")?;
        let req = match ty {
            0x01 => Self::Hello {
                version: r.u8("version")?,
            },
            0x02 => Self::Register {
                key: r.array("key")?,
                signature: r.array("signature")?,
            },
            0x03 => Self::Auth {
                key: r.array("key")?,
                signature: r.array("signature")?,
            },
            0x04 => {
                let mailbox = MailboxId(r.array("mailbox")?);
                let expires_at = r.u64("expiry")?;
                let payload_hash = r.array("payload hash")?;
                // Bounded by the frame; a relay refuses a payload above its
                // own message limit with a signed TooLarge, not a parse error.
                rest = Some(r.position());
                r.take(r.remaining(), "payload")?;
                Self::Submit {
                    mailbox,
                    expires_at,
                    payload_hash,
                    payload: Vec::new(),
                }
            }
            0x05 => Self::Fetch {
                after: r.u64("cursor")?,
                max: r.u32("max")?,
            },
            0x06 => Self::Subscribe,
            0x07 => {
                let n = r.count("ack list", MAX_BATCH)?;
                let mut seqs = Vec::with_capacity(n);
                for _ in 0..n {
                    seqs.push(r.u64("seq")?);
                }
                Self::Ack { seqs }
            }
            0x08 => {
                let piece = piece_head(&mut r)?;
                let n = r.remaining();
                if n > MAX_BLOB_PIECE {
                    return Err(DecodeError::TooLarge {
                        what: "blob piece",
                        max: MAX_BLOB_PIECE,
                    });
                }
                rest = Some(r.position());
                r.take(n, "blob piece")?;
                Self::BlobPut(piece)
            }
            0x09 => Self::BlobStatus {
                blob_id: blob_id(&mut r)?,
                mailbox: if r.remaining() > 0 {
                    Some(MailboxId(r.array("mailbox")?))
                } else {
                    None
                },
            },
            0x0a => Self::BlobGet {
                blob_id: blob_id(&mut r)?,
                offset: r.u64("offset")?,
                len: r.u32("length")?,
            },
            0x0b => Self::BlobDelete {
                blob_id: blob_id(&mut r)?,
            },
            0x0c => Self::Status,
            0x0d => Self::Limits,
            0x0e => Self::PeerAuth {
                key: r.array("key")?,
                signature: r.array("signature")?,
            },
            0x10 => Self::KeyBinding,
            0x12 => {
                let n = r.count("forward status", MAX_FORWARD_STATUS)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push((MailboxId(r.array("mailbox")?), r.array("payload hash")?));
                }
                Self::ForwardStatus { items }
            }
            0x0f => {
                let hops = r.u8("hop count")?;
                let pin = r.array("next relay's pin")?;
                let mailbox = MailboxId(r.array("mailbox")?);
                let expires_at = r.u64("expiry")?;
                let payload_hash = r.array("payload hash")?;
                let (addr, at) = trailing_address(&mut r, MAX_FRAME)?;
                rest = Some(at);
                Self::Forward(Forward {
                    hops,
                    next: NextHop { addr, pin },
                    mailbox,
                    expires_at,
                    payload_hash,
                    payload: Vec::new(),
                })
            }
            0x11 => {
                let hops = r.u8("hop count")?;
                let pin = r.array("next relay's pin")?;
                let piece = piece_head(&mut r)?;
                let (addr, at) = trailing_address(&mut r, MAX_BLOB_PIECE)?;
                rest = Some(at);
                Self::BlobForward(BlobForward {
                    hops,
                    next: NextHop { addr, pin },
                    piece,
                })
            }
            0x13 => Self::PairOpen {
                ttl: r.u32("lifetime")?,
            },
            0x14 | 0x15 => {
                let slot = r.u32("slot")?;
                let data = pair_data(&mut r)?;
                if ty == 0x14 {
                    Self::PairJoin { slot, data }
                } else {
                    Self::PairSend { slot, data }
                }
            }
            0x16 => Self::PairWait {
                slot: r.u32("slot")?,
                wait_ms: r.u32("wait")?,
            },
            0x17 => Self::PairLeave {
                slot: r.u32("slot")?,
            },
            _ => {
                return Err(DecodeError::Invalid {
                    what: "request type",
                    why: "unknown type",
                })
            }
        };
        r.finish()?;
        Ok((Frame { id, body: req }, rest))
    }
}

impl Response {
    pub fn encode(&self, id: u32) -> Vec<u8> {
        let mut o = Vec::with_capacity(64);
        self.encode_into(id, &mut o);
        o
    }

    /// [`Response::encode`] into `o` (cleared first), so a buffer can be
    /// reused.
    pub fn encode_into(&self, id: u32, o: &mut Vec<u8>) {
        o.clear();
        match self {
            Self::Ok => header(o, 0x80, id),
            Self::HelloOk {
                version,
                relay_key,
                challenge,
            } => {
                header(o, 0x81, id);
                o.push(*version);
                o.extend_from_slice(relay_key);
                o.extend_from_slice(challenge);
            }
            Self::Accepted { item_id } => {
                header(o, 0x82, id);
                o.extend_from_slice(item_id);
            }
            Self::Refused(f) => {
                header(o, 0x83, id);
                o.push(f.code.code());
                o.extend_from_slice(&f.at.to_be_bytes());
                o.extend_from_slice(&f.mailbox.0);
                o.extend_from_slice(&f.payload_hash);
                o.extend_from_slice(&f.signature);
            }
            Self::Items { items, more } => {
                o.reserve(items.iter().map(|i| i.payload.len() + 60).sum());
                header(o, 0x84, id);
                o.push(*more as u8);
                o.extend_from_slice(&(items.len() as u16).to_be_bytes());
                for i in items {
                    o.extend_from_slice(&i.seq.to_be_bytes());
                    o.extend_from_slice(&i.received_at.to_be_bytes());
                    o.extend_from_slice(&i.expires_at.to_be_bytes());
                    o.extend_from_slice(&i.payload_hash);
                    o.extend_from_slice(&(i.payload.len() as u32).to_be_bytes());
                    o.extend_from_slice(&i.payload);
                }
            }
            Self::Notify { seq } => {
                header(o, 0x85, id);
                o.extend_from_slice(&seq.to_be_bytes());
            }
            Self::Acked { count } => {
                header(o, 0x86, id);
                o.extend_from_slice(&count.to_be_bytes());
            }
            Self::BlobStored { stored, complete } => {
                header(o, 0x87, id);
                o.extend_from_slice(&stored.to_be_bytes());
                o.push(*complete as u8);
            }
            Self::BlobData { offset, data } => {
                o.reserve(data.len() + 20);
                header(o, 0x88, id);
                o.extend_from_slice(&offset.to_be_bytes());
                o.extend_from_slice(data);
            }
            Self::Status {
                items,
                bytes,
                quota,
            } => {
                header(o, 0x89, id);
                o.extend_from_slice(&items.to_be_bytes());
                o.extend_from_slice(&bytes.to_be_bytes());
                o.extend_from_slice(&quota.to_be_bytes());
            }
            Self::Limits {
                max_message,
                max_blob,
                mailbox_quota,
            } => {
                header(o, 0x8a, id);
                o.extend_from_slice(&max_message.to_be_bytes());
                o.extend_from_slice(&max_blob.to_be_bytes());
                o.extend_from_slice(&mailbox_quota.to_be_bytes());
            }
            Self::Error { code, message } => {
                header(o, 0x8f, id);
                o.extend_from_slice(&code.code().to_be_bytes());
                put_text(o, message);
            }
            Self::KeyBinding(b) => {
                header(o, 0x8b, id);
                b.encode_into(o);
            }
            Self::ForwardStatus { items } => {
                header(o, 0x8c, id);
                o.extend_from_slice(&(items.len() as u16).to_be_bytes());
                for w in items {
                    match w {
                        None => o.push(0),
                        Some(w) => {
                            o.push(1);
                            o.extend_from_slice(&w.attempts.to_be_bytes());
                            o.extend_from_slice(&w.next_at.to_be_bytes());
                            // Printable, as the reader requires (§0).
                            let e: String = w
                                .error
                                .as_deref()
                                .unwrap_or("")
                                .chars()
                                .map(|c| if c.is_control() { ' ' } else { c })
                                .collect();
                            let e = crate::codec::cut_text(&e, MAX_WAITING_ERROR);
                            o.extend_from_slice(&(e.len() as u16).to_be_bytes());
                            o.extend_from_slice(e.as_bytes());
                        }
                    }
                }
            }
            Self::PairOpened { slot, expires_at } => {
                header(o, 0x8d, id);
                o.extend_from_slice(&slot.to_be_bytes());
                o.extend_from_slice(&expires_at.to_be_bytes());
            }
            Self::PairMessage { data } => {
                header(o, 0x8e, id);
                o.extend_from_slice(data);
            }
        }
        finish_frame(o);
    }

    pub fn decode(body: &[u8]) -> Result<Frame<Self>, DecodeError> {
        let (mut frame, rest) = Self::parse(body)?;
        if let (Some(at), Self::BlobData { data, .. }) = (rest, &mut frame.body) {
            *data = body[at..].to_vec();
        }
        Ok(frame)
    }

    /// [`Response::decode`] of a body it owns: blob data keeps the body's
    /// buffer (its head moved off) instead of being copied out; any other
    /// body goes back to [`buffers`].
    pub fn decode_owned(body: Vec<u8>) -> Result<Frame<Self>, DecodeError> {
        let (mut frame, rest) = match Self::parse(&body) {
            Ok(p) => p,
            Err(e) => {
                buffers::give(body);
                return Err(e);
            }
        };
        match (rest, &mut frame.body) {
            (Some(at), Self::BlobData { data, .. }) => *data = into_rest(body, at),
            _ => buffers::give(body),
        }
        Ok(frame)
    }

    /// For response types whose last field runs to the end of the frame
    /// (blob data): the length of the body before it (see
    /// [`Request::head_len`]).
    pub fn head_len(frame_type: u8) -> Option<usize> {
        match frame_type {
            0x88 => Some(1 + 4 + 8),
            _ => None,
        }
    }

    /// [`Response::decode`] of a body read in two parts: `head` (exactly
    /// [`Response::head_len`] bytes) and the `rest` of the frame.
    pub fn decode_split(head: &[u8], rest: Vec<u8>) -> Result<Frame<Self>, DecodeError> {
        let ty = head.first().copied().unwrap_or(0);
        let rest = split_parts(Self::head_len(ty), head, rest, MAX_BLOB_PIECE)?;
        let (mut frame, _) = Self::parse(head)?;
        if let Self::BlobData { data, .. } = &mut frame.body {
            *data = rest;
        }
        Ok(frame)
    }

    /// Parses a frame body; blob data is left empty and its start returned.
    fn parse(body: &[u8]) -> Result<(Frame<Self>, Option<usize>), DecodeError> {
        let mut rest = None;
        if body.len() > MAX_FRAME {
            return Err(DecodeError::TooLarge {
                what: "frame",
                max: MAX_FRAME,
            });
        }
        let mut r = Reader::new(body);
        let ty = r.u8("frame type")?;
        let id = r.u32("request id")?;
        let resp = match ty {
            0x80 => Self::Ok,
            0x81 => Self::HelloOk {
                version: r.u8("version")?,
                relay_key: r.array("relay key")?,
                challenge: r.array("challenge")?,
            },
            0x82 => Self::Accepted {
                item_id: r.array("item id")?,
            },
            0x83 => Self::Refused(Refusal {
                code: RefusalCode::from_code(r.u8("refusal code")?)?,
                at: r.u64("time")?,
                mailbox: MailboxId(r.array("mailbox")?),
                payload_hash: r.array("payload hash")?,
                signature: r.array("signature")?,
            }),
            0x84 => {
                let more = r.flag("more flag")?;
                let n = r.count("item list", MAX_BATCH)?;
                let mut items = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    let seq = r.u64("seq")?;
                    let received_at = r.u64("time")?;
                    let expires_at = r.u64("expiry")?;
                    let payload_hash = r.array("payload hash")?;
                    let len = r.u32("payload length")? as usize;
                    if len > MAX_MESSAGE {
                        return Err(DecodeError::TooLarge {
                            what: "message",
                            max: MAX_MESSAGE,
                        });
                    }
                    items.push(Item {
                        seq,
                        received_at,
                        expires_at,
                        payload_hash,
                        payload: r.take(len, "payload")?.to_vec(),
                    });
                }
                Self::Items { items, more }
            }
            0x85 => Self::Notify { seq: r.u64("seq")? },
            0x86 => Self::Acked {
                count: r.u32("count")?,
            },
            0x87 => Self::BlobStored {
                stored: r.u64("stored")?,
                complete: r.flag("complete flag")?,
            },
            0x88 => {
                let offset = r.u64("offset")?;
                let n = r.remaining();
                if n > MAX_BLOB_PIECE {
                    return Err(DecodeError::TooLarge {
                        what: "blob piece",
                        max: MAX_BLOB_PIECE,
                    });
                }
                rest = Some(r.position());
                r.take(n, "blob data")?;
                Self::BlobData {
                    offset,
                    data: Vec::new(),
                }
            }
            0x89 => Self::Status {
                items: r.u64("items")?,
                bytes: r.u64("bytes")?,
                quota: r.u64("quota")?,
            },
            0x8a => Self::Limits {
                max_message: r.u32("largest message")?,
                max_blob: r.u64("largest blob")?,
                mailbox_quota: r.u64("mailbox quota")?,
            },
            0x8f => Self::Error {
                code: ErrorCode::from_code(r.u16("error code")?)?,
                message: read_text(&mut r)?,
            },
            0x8b => Self::KeyBinding(KeyBinding::decode_from(&mut r)?),
            0x8c => {
                let n = r.count("forward status", MAX_FORWARD_STATUS)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(match r.u8("waiting")? {
                        0 => None,
                        1 => {
                            let attempts = r.u32("attempts")?;
                            let next_at = r.u64("next attempt")?;
                            let len = r.u16("error length")? as usize;
                            let error = match len {
                                0 => None,
                                _ => Some(crate::codec::read_text_of_len(
                                    &mut r,
                                    len,
                                    "error",
                                    MAX_WAITING_ERROR,
                                )?),
                            };
                            Some(Waiting {
                                attempts,
                                next_at,
                                error,
                            })
                        }
                        _ => {
                            return Err(DecodeError::Invalid {
                                what: "forward status",
                                why: "waiting must be 0 or 1",
                            })
                        }
                    });
                }
                Self::ForwardStatus { items }
            }
            0x8d => Self::PairOpened {
                slot: r.u32("slot")?,
                expires_at: r.u64("expiry")?,
            },
            0x8e => Self::PairMessage {
                data: pair_data(&mut r)?,
            },
            _ => {
                return Err(DecodeError::Invalid {
                    what: "response type",
                    why: "unknown type",
                })
            }
        };
        r.finish()?;
        Ok((Frame { id, body: resp }, rest))
    }
}

/// Splits complete frames off the front of a byte buffer: the sans-IO half
/// of a connection's reader. Feed it what the socket gave; take frames out.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame body, if one has fully arrived. An oversized
    /// length prefix is an error at once, before its body is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = frame_len([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests() -> Vec<Request> {
        vec![
            Request::Hello { version: 1 },
            Request::Register {
                key: [1; 32],
                signature: [2; 64],
            },
            Request::Auth {
                key: [3; 32],
                signature: [4; 64],
            },
            Request::Submit {
                mailbox: MailboxId([5; 32]),
                expires_at: 99,
                payload_hash: [6; 32],
                payload: vec![7; 300],
            },
            Request::Fetch { after: 5, max: 10 },
            Request::Subscribe,
            Request::Ack {
                seqs: vec![1, 2, 3],
            },
            Request::BlobPut(BlobPiece {
                blob_id: BlobId([8; 16]),
                mailbox: MailboxId([9; 32]),
                total_len: 1000,
                blob_hash: [3; 32],
                expires_at: 77,
                offset: 10,
                data: vec![1; 20],
            }),
            Request::BlobStatus {
                blob_id: BlobId([1; 16]),
                mailbox: None,
            },
            Request::BlobStatus {
                blob_id: BlobId([1; 16]),
                mailbox: Some(MailboxId([4; 32])),
            },
            Request::BlobGet {
                blob_id: BlobId([1; 16]),
                offset: 3,
                len: 4,
            },
            Request::BlobDelete {
                blob_id: BlobId([2; 16]),
            },
            Request::Status,
            Request::Limits,
            Request::PeerAuth {
                key: [5; 32],
                signature: [6; 64],
            },
            Request::KeyBinding,
            Request::Forward(forward(1, "relay.example:7443", 300)),
            Request::Forward(forward(0, "h:1", 0)),
            Request::BlobForward(blob_forward(2, "relay.example:7443", 40)),
            Request::ForwardStatus {
                items: vec![(MailboxId([1; 32]), [2; 32]), (MailboxId([3; 32]), [4; 32])],
            },
            Request::ForwardStatus {
                items: vec![(MailboxId([1; 32]), [2; 32]); MAX_FORWARD_STATUS],
            },
            Request::BlobForward(blob_forward(0, "h:1", MAX_BLOB_PIECE)),
        ]
    }

    /// A request encoded in parts (a piece's data written from its own
    /// buffer) is the same bytes as encoded whole; only piece frames are
    /// split, and their length prefix counts all the parts.
    #[test]
    fn a_frame_in_parts_is_the_frame_whole() {
        let mut head = Vec::new();
        for (k, r) in requests().iter().enumerate() {
            let whole = r.encode(k as u32 + 1);
            match r.encode_split(k as u32 + 1, &mut head) {
                Some((data, after)) => {
                    assert!(matches!(r, Request::BlobPut(_) | Request::BlobForward(_)));
                    assert_eq!([&head[..], data, after].concat(), whole, "{k}");
                    assert!(!data.is_empty() || whole.len() == head.len() + after.len());
                }
                None => {
                    assert!(!matches!(r, Request::BlobPut(_) | Request::BlobForward(_)));
                    assert_eq!(head, whole, "{k}");
                }
            }
        }
    }

    /// A `BlobForward` toward `addr` with a piece of `n` bytes.
    fn blob_forward(hops: u8, addr: &str, n: usize) -> BlobForward {
        BlobForward {
            hops,
            next: NextHop {
                addr: addr.into(),
                pin: [7; 32],
            },
            piece: BlobPiece {
                blob_id: BlobId([8; 16]),
                mailbox: MailboxId([9; 32]),
                total_len: 1 << 30,
                blob_hash: [3; 32],
                expires_at: 77,
                offset: 1 << 20,
                data: vec![1; n],
            },
        }
    }

    /// A `BlobForward`'s piece is at most 1 MiB and its address is
    /// checked as a `Forward`'s.
    #[test]
    fn a_blob_forwards_piece_and_address_are_checked() {
        let good = Request::BlobForward(blob_forward(0, "relay.example:7443", 5)).encode(1);
        address_lengths_are_checked(&good, BLOB_FORWARD_HEAD);
        let big = Request::BlobForward(blob_forward(0, "h:1", MAX_BLOB_PIECE + 1)).encode(1);
        assert!(matches!(
            Request::decode(&big[4..]),
            Err(DecodeError::TooLarge { .. })
        ));
        // Read in two parts, as a relay does.
        let body = &good[4..];
        let (head, rest) = body.split_at(Request::head_len(0x11).expect("a head"));
        let split = Request::decode_split(head, rest.to_vec()).expect("split");
        assert_eq!(split.body, Request::decode(body).expect("whole").body);
    }

    /// A `Forward` toward `addr` with `n` payload bytes.
    fn forward(hops: u8, addr: &str, n: usize) -> Forward {
        Forward {
            hops,
            next: NextHop {
                addr: addr.into(),
                pin: [7; 32],
            },
            mailbox: MailboxId([8; 32]),
            expires_at: 1234,
            payload_hash: [9; 32],
            payload: vec![10; n],
        }
    }

    /// `good` (a frame whose head of `head` bytes ends in the address
    /// length) parses, and with an address length of 0, one longer than
    /// what follows, or 255, does not.
    fn address_lengths_are_checked(good: &[u8], head: usize) {
        assert!(Request::decode(&good[4..]).is_ok());
        for bad_len in [0u8, 24, 255] {
            let mut f = good.to_vec();
            f[4 + head - 1] = bad_len;
            assert!(Request::decode(&f[4..]).is_err(), "{bad_len}");
        }
    }

    /// A `Forward` whose address is empty, longer than what follows the
    /// head, longer than 253 bytes or not printable is refused.
    #[test]
    fn a_forwards_address_is_checked() {
        let good = Request::Forward(forward(0, "relay.example:7443", 5)).encode(1);
        address_lengths_are_checked(&good, FORWARD_HEAD);
        let mut f = good.clone();
        let last = f.len() - 1;
        f[last] = b' ';
        assert!(Request::decode(&f[4..]).is_err(), "a space");
        let long = Request::Forward(forward(0, &"a".repeat(254), 5)).encode(1);
        assert!(Request::decode(&long[4..]).is_err(), "254 bytes");
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::Ok,
            Response::ForwardStatus {
                items: vec![
                    None,
                    Some(Waiting {
                        attempts: 3,
                        next_at: 99,
                        error: Some("connection refused".into()),
                    }),
                    Some(Waiting {
                        attempts: 0,
                        next_at: 5,
                        error: None,
                    }),
                ],
            },
            Response::KeyBinding(KeyBinding {
                scheme: 0x0403,
                spki: vec![0x30; 91],
                signature: vec![0x31; 71],
            }),
            Response::HelloOk {
                version: 1,
                relay_key: [1; 32],
                challenge: [2; 32],
            },
            Response::Accepted { item_id: [3; 16] },
            Response::Refused(Refusal {
                code: RefusalCode::OverQuota,
                at: 5,
                mailbox: MailboxId([4; 32]),
                payload_hash: [5; 32],
                signature: [6; 64],
            }),
            Response::Items {
                items: vec![Item {
                    seq: 1,
                    received_at: 2,
                    expires_at: 3,
                    payload_hash: [4; 32],
                    payload: vec![5; 10],
                }],
                more: true,
            },
            Response::Notify { seq: 9 },
            Response::Acked { count: 2 },
            Response::BlobStored {
                stored: 10,
                complete: false,
            },
            Response::BlobData {
                offset: 1,
                data: vec![2; 5],
            },
            Response::Status {
                items: 1,
                bytes: 2,
                quota: 3,
            },
            Response::Limits {
                max_message: 1 << 20,
                max_blob: 2 << 30,
                mailbox_quota: 1 << 34,
            },
            Response::Error {
                code: ErrorCode::WrongOffset,
                message: "stored 10".into(),
            },
            Response::Error {
                code: ErrorCode::BlobHashMismatch,
                message: "discarded".into(),
            },
        ]
    }

    #[test]
    fn frames_round_trip_and_every_truncation_fails() {
        for (i, req) in requests().into_iter().enumerate() {
            let f = req.encode(i as u32);
            let len = frame_len(f[..4].try_into().expect("4")).expect("len");
            assert_eq!(len, f.len() - 4);
            let back = Request::decode(&f[4..]).expect("decodes");
            assert_eq!(
                back,
                Frame {
                    id: i as u32,
                    body: req
                }
            );
            // Decoding a body it owns gives the same frame, and encoding
            // into a used buffer the same bytes.
            assert_eq!(Request::decode_owned(f[4..].to_vec()), Ok(back.clone()));
            if let Some(h) = Request::head_len(f[4]) {
                let (head, rest) = f[4..].split_at(h);
                assert_eq!(Request::decode_split(head, rest.to_vec()), Ok(back.clone()));
                assert!(Request::decode_split(&head[..h - 1], rest.to_vec()).is_err());
            }
            let mut reused = vec![9u8; 3];
            back.body.encode_into(i as u32, &mut reused);
            assert_eq!(reused, f);
            // A cut frame never decodes to the original: fixed fields fail
            // to parse, and a payload that runs to the end of the frame
            // comes out shorter (the frame length is what delimits it).
            for n in 0..f.len() - 4 {
                let cut = Request::decode(&f[4..4 + n]);
                assert!(cut.as_ref().map(|c| c.body != back.body).unwrap_or(true));
            }
        }
        for (i, resp) in responses().into_iter().enumerate() {
            let f = resp.encode(i as u32);
            let back = Response::decode(&f[4..]).expect("decodes");
            assert_eq!(
                back,
                Frame {
                    id: i as u32,
                    body: resp
                }
            );
            assert_eq!(Response::decode_owned(f[4..].to_vec()), Ok(back.clone()));
            if let Some(h) = Response::head_len(f[4]) {
                let (head, rest) = f[4..].split_at(h);
                assert_eq!(
                    Response::decode_split(head, rest.to_vec()),
                    Ok(back.clone())
                );
                assert!(Response::decode_split(&head[..h - 1], rest.to_vec()).is_err());
            }
            let mut reused = vec![9u8; 3];
            back.body.encode_into(i as u32, &mut reused);
            assert_eq!(reused, f);
            for n in 0..f.len() - 4 {
                let cut = Response::decode_owned(f[4..4 + n].to_vec());
                assert!(cut.as_ref().map(|c| c.body != back.body).unwrap_or(true));
            }
        }
    }

    #[test]
    fn frame_buffer_splits_and_bounds() {
        let mut fb = FrameBuffer::new();
        let a = Request::Status.encode(1);
        let b = Request::Fetch { after: 1, max: 2 }.encode(2);
        let mut all = a.clone();
        all.extend_from_slice(&b);
        for byte in &all[..all.len() - 1] {
            fb.extend(std::slice::from_ref(byte));
        }
        assert_eq!(fb.next_frame().expect("ok").as_deref(), Some(&a[4..]));
        assert_eq!(fb.next_frame().expect("ok"), None);
        fb.extend(&all[all.len() - 1..]);
        assert_eq!(fb.next_frame().expect("ok").as_deref(), Some(&b[4..]));
        let mut fb = FrameBuffer::new();
        fb.extend(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(fb.next_frame().is_err());
    }

    #[test]
    fn refusals_verify_only_with_the_relay_key() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let mb = MailboxId::of(&[1; 32]);
        let bytes = Refusal::signed_bytes(RefusalCode::TooLarge, 10, &mb, &[2; 32]);
        let mut m = context::REFUSAL.to_vec();
        m.extend_from_slice(&bytes);
        use ed25519_dalek::Signer;
        let sig = sk.sign(&m).to_bytes();
        let r = Refusal {
            code: RefusalCode::TooLarge,
            at: 10,
            mailbox: mb,
            payload_hash: [2; 32],
            signature: sig,
        };
        assert!(r.verify(&sk.verifying_key()));
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        assert!(!r.verify(&other.verifying_key()));
        let mut forged = r.clone();
        forged.code = RefusalCode::UnknownMailbox;
        assert!(!forged.verify(&sk.verifying_key()));
    }
}
