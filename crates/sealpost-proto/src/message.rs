//! Sealed messages: a signed header and content, encrypted with age.
//!
//! ```text
//! container = "SPSL" 0x01 payload_len:u64 payload
//! payload   = age v1 file (X25519 recipients) of the plaintext below
//! plaintext = header content trailer
//! header    = "SPMS" 0x01 kind:u8 id:[16] created_at:u64 expires_at:u64
//!             reply_flag:u8 [in_reply_to:[16]] sender:[64] n:u8 recipients:[64]*n
//!             relay_flag:u8 [len:u8 reply_relay:[len] relay_key_hash:[32]]
//! trailer   = content_len:u64 content_blake3:[32] signature:[64]
//! ```
//!
//! The signature sits in a trailer so that sealing is one pass over content
//! of unknown length (stdin, a pipe) at constant memory; it covers the exact
//! header bytes, the content length and its BLAKE3. The container's length
//! lets a reader tell a cut-short copy from a tampered one.

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::rc::Rc;

use rand_core::CryptoRngCore;

use crate::card::RelayPin;
use crate::codec::{DecodeError, Reader};
use crate::error::{NotForMeReason, OpenError, SealError, TamperedAt};
use crate::hashing::StreamHasher;
use crate::identity::{context, Identity, PublicIdentity};

const CONTAINER_MAGIC: &[u8; 4] = b"SPSL";
const CONTAINER_VERSION: u8 = 1;
/// Bytes before the age payload: magic, version, payload length.
pub const CONTAINER_HEADER_LEN: usize = 13;
const HEADER_MAGIC: &[u8; 4] = b"SPMS";
/// Version 1: no padding. Version 2: the header ends with `pad_len`, and
/// that many zero bytes follow it before the content (§4.3).
const HEADER_VERSION: u8 = 1;
const HEADER_VERSION_PADDED: u8 = 2;
/// A message may name at most this many recipients; it bounds the header
/// (and the age header) to a few KiB.
pub const MAX_RECIPIENTS: usize = 32;
/// No message may live longer than this, so a replay cache that keeps ids
/// until expiry stays bounded.
pub const MAX_LIFETIME_SECS: u64 = 400 * 24 * 3600;
/// `expires_at` of a message that never expires: for files sealed and
/// opened by hand (`seal`/`open`). An agent refuses it from a relay, and
/// `open --strict` refuses it, because a replay cache could never forget
/// its id.
pub const NO_EXPIRY: u64 = u64::MAX;
/// content_len (8) + BLAKE3 (32) + Ed25519 signature (64).
pub const TRAILER_LEN: usize = 104;
/// age encrypts its payload in 64 KiB chunks; the chunk index reported for
/// tampering counts these.
pub const AGE_CHUNK_SIZE: u64 = 64 * 1024;
/// First read size; short messages never touch more memory than this.
const SMALL_BUF: usize = 16 * 1024;
/// The longest possible header: fixed fields plus 32 recipients.
pub const MAX_HEADER_LEN: usize =
    5 + 1 + 16 + 8 + 8 + 1 + 16 + 64 + 1 + 64 * MAX_RECIPIENTS + 1 + 1 + 253 + 32 + 4;

/// The Padmé length for `len` bytes (Nikitin et al., "Reducing Metadata
/// Leakage from Encrypted Files and Communication with PURBs", PETS 2019):
/// `len` rounded up so that only its top ⌊log2 ⌊log2 len⌋⌋ + 1 bits may be
/// non-zero. At most 12 % larger; it leaks O(log log len) bits of `len`.
pub fn padme(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let e = 63 - u64::from(len.leading_zeros()); // ⌊log2 len⌋
    let s = 64 - u64::from(e.leading_zeros()); // ⌊log2 e⌋ + 1
    let last_bits = e - s;
    let mask = (1u64 << last_bits) - 1;
    len.saturating_add(mask) & !mask
}

/// The padding a plaintext of `header_len` (a padded header, with its
/// `pad_len` field) and `content_len` bytes takes, so that the whole
/// plaintext is a Padmé length.
pub fn padding_for(header_len: usize, content_len: u64) -> u32 {
    let len = (header_len as u64)
        .saturating_add(content_len)
        .saturating_add(TRAILER_LEN as u64);
    u32::try_from(padme(len) - len).unwrap_or(u32::MAX)
}

/// A 128-bit message id: unique per message, opaque to a recipient (who
/// must not rely on how it was made, PROTOCOL 4.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// 128 random bits.
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        Self(b)
    }

    /// An id that sorts by the time it was made: the unix time in
    /// milliseconds, 48 bits big-endian, then 80 random bits (the layout of
    /// a UUIDv7 without its version bits). Stores keyed by message id then
    /// add new ids at the end of their B-trees instead of at random places
    /// all over them, so what a message costs does not grow with how many
    /// came before it; 80 random bits keep ids unique and unguessable (a
    /// recipient keys what it records by sender and id, so another
    /// sender's id, guessed or learnt, takes nothing; PROTOCOL 4.3).
    pub fn time_ordered(now_ms: u64, rng: &mut impl CryptoRngCore) -> Self {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&(now_ms & 0xffff_ffff_ffff).to_be_bytes()[2..]);
        rng.fill_bytes(&mut b[6..]);
        Self(b)
    }

    /// Parses the 32-character lowercase hex form.
    pub fn parse_hex(s: &str) -> Option<Self> {
        let v = data_encoding::HEXLOWER_PERMISSIVE
            .decode(s.as_bytes())
            .ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// What a sealed message carries. Receipts and rejections join in the
/// delivery layer; an unknown kind is refused, never guessed at. Not
/// `non_exhaustive`: a new kind must be decided wherever kinds are matched
/// (the agent's `engine::decide`), so adding one does not compile until it
/// is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Application content: text or bytes for the user.
    Message,
    /// A file manifest (see [`crate::manifest`]); the content is the
    /// manifest's encoding and the file travels as a separate blob.
    FileManifest,
    /// A signed receipt (see [`crate::report`]): the recipient stored these
    /// messages and read back these hashes.
    Receipt,
    /// A signed rejection (see [`crate::report`]): the recipient refused
    /// these messages, with a reason.
    Rejection,
    /// A recipient asks for damaged chunks of a file again
    /// (see [`crate::repair`]).
    RepairRequest,
    /// A sender names the repair blob holding those chunks.
    Repair,
}

impl Kind {
    pub fn code(self) -> u8 {
        match self {
            Self::Message => 1,
            Self::FileManifest => 2,
            Self::Receipt => 3,
            Self::Rejection => 4,
            Self::RepairRequest => 5,
            Self::Repair => 6,
        }
    }

    fn from_code(c: u8) -> Result<Self, DecodeError> {
        match c {
            1 => Ok(Self::Message),
            2 => Ok(Self::FileManifest),
            3 => Ok(Self::Receipt),
            4 => Ok(Self::Rejection),
            5 => Ok(Self::RepairRequest),
            6 => Ok(Self::Repair),
            _ => Err(DecodeError::Invalid {
                what: "message kind",
                why: "unknown kind",
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::FileManifest => "file-manifest",
            Self::Receipt => "receipt",
            Self::Rejection => "rejection",
            Self::RepairRequest => "repair-request",
            Self::Repair => "repair",
        }
    }
}

/// A recipient as the signed header names it: both public keys, as bytes.
/// They are only compared with the opener's own keys, never used to verify
/// anything, so they are not decoded (that would cost a field inversion
/// per recipient per message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecipientKeys {
    pub signing: [u8; 32],
    pub agreement: [u8; 32],
}

impl RecipientKeys {
    pub fn is(&self, who: &PublicIdentity) -> bool {
        self.signing == *who.signing_bytes() && self.agreement == *who.agreement_bytes()
    }
}

impl From<&PublicIdentity> for RecipientKeys {
    fn from(p: &PublicIdentity) -> Self {
        Self {
            signing: *p.signing_bytes(),
            agreement: *p.agreement_bytes(),
        }
    }
}

/// The signed header, as the recipient sees it after verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageHeader {
    pub kind: Kind,
    pub id: MessageId,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; the message is refused at or after this time.
    pub expires_at: u64,
    pub in_reply_to: Option<MessageId>,
    pub sender: PublicIdentity,
    pub recipients: Vec<RecipientKeys>,
    /// Where the sender fetches its mail: receipts and rejections for this
    /// message go there. Signed, so a relay cannot redirect them.
    pub reply_relay: Option<RelayPin>,
}

impl MessageHeader {
    fn validate(&self) -> Result<(), &'static str> {
        if self.recipients.is_empty() {
            return Err("a message needs at least one recipient");
        }
        if self.recipients.len() > MAX_RECIPIENTS {
            return Err("a message can have at most 32 recipients");
        }
        for (i, r) in self.recipients.iter().enumerate() {
            if self.recipients[..i].contains(r) {
                return Err("the same recipient is named twice");
            }
        }
        if self.expires_at <= self.created_at {
            return Err("the expiry must be after the creation time");
        }
        if self.expires_at != NO_EXPIRY && self.expires_at - self.created_at > MAX_LIFETIME_SECS {
            return Err("the lifetime is longer than 400 days");
        }
        if let Some(relay) = &self.reply_relay {
            if relay.validate().is_err() {
                return Err("the reply relay address is not 1 to 253 printable ASCII bytes");
            }
        }
        Ok(())
    }

    /// The header's bytes, version 1 (no padding).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_padded(None)
    }

    /// The header's bytes: version 2 ending in `pad_len` if `pad` is set,
    /// else version 1.
    pub fn encode_padded(&self, pad: Option<u32>) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_HEADER_LEN);
        out.extend_from_slice(HEADER_MAGIC);
        out.push(if pad.is_some() {
            HEADER_VERSION_PADDED
        } else {
            HEADER_VERSION
        });
        out.push(self.kind.code());
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.created_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        match self.in_reply_to {
            None => out.push(0),
            Some(id) => {
                out.push(1);
                out.extend_from_slice(&id.0);
            }
        }
        out.extend_from_slice(self.sender.signing_bytes());
        out.extend_from_slice(self.sender.agreement_bytes());
        out.push(self.recipients.len() as u8);
        for r in &self.recipients {
            out.extend_from_slice(&r.signing);
            out.extend_from_slice(&r.agreement);
        }
        RelayPin::encode_optional(self.reply_relay.as_ref(), &mut out);
        if let Some(p) = pad {
            out.extend_from_slice(&p.to_be_bytes());
        }
        out
    }

    /// Reads a header from the start of a plaintext stream, returning it,
    /// its exact bytes (which the signature covers) and the padding that
    /// follows it (0 for version 1).
    fn read_from(r: &mut impl Read) -> Result<(Self, Vec<u8>, u32), ReadFailure> {
        // The header is parsed in pieces because its length depends on two
        // fields inside it.
        let mut raw = Vec::with_capacity(128);
        read_more(r, &mut raw, 5 + 1 + 16 + 8 + 8 + 1)?;
        let mut rd = Reader::new(&raw);
        let version = rd.magic_and_versions(
            HEADER_MAGIC,
            "sealed message header",
            &[HEADER_VERSION, HEADER_VERSION_PADDED],
        )?;
        let kind = Kind::from_code(rd.u8("kind")?)?;
        let id = MessageId(rd.array("message id")?);
        let created_at = rd.u64("creation time")?;
        let expires_at = rd.u64("expiry time")?;
        let has_reply = rd.flag("in-reply-to flag")?;
        if has_reply {
            read_more(r, &mut raw, 16)?;
        }
        read_more(r, &mut raw, 64 + 1)?;
        let mut rd = Reader::new(&raw[5 + 1 + 16 + 8 + 8 + 1..]);
        let in_reply_to = if has_reply {
            Some(MessageId(rd.array("in-reply-to id")?))
        } else {
            None
        };
        let sender = read_public(&mut rd)?;
        let n = rd.u8("recipient count")? as usize;
        if n == 0 || n > MAX_RECIPIENTS {
            return Err(DecodeError::Invalid {
                what: "recipient count",
                why: "must be 1 to 32",
            }
            .into());
        }
        let fixed = raw.len();
        read_more(r, &mut raw, 64 * n)?;
        let mut rd = Reader::new(&raw[fixed..]);
        let mut recipients = Vec::with_capacity(n);
        for _ in 0..n {
            recipients.push(RecipientKeys {
                signing: rd.array("recipient signing key")?,
                agreement: rd.array("recipient agreement key")?,
            });
        }
        // The reply relay: a flag, then a length, then the address and key.
        let at = raw.len();
        read_more(r, &mut raw, 1)?;
        if raw[at] == 1 {
            read_more(r, &mut raw, 1)?;
            let len = raw[at + 1] as usize;
            read_more(r, &mut raw, len + 32)?;
        }
        let mut rd = Reader::new(&raw[at..]);
        let reply_relay = RelayPin::read_optional(&mut rd)?;
        let pad = if version == HEADER_VERSION_PADDED {
            let at = raw.len();
            read_more(r, &mut raw, 4)?;
            Reader::new(&raw[at..]).u32("padding length")?
        } else {
            0
        };
        let header = Self {
            kind,
            id,
            created_at,
            expires_at,
            in_reply_to,
            sender,
            recipients,
            reply_relay,
        };
        header.validate().map_err(|why| DecodeError::Invalid {
            what: "sealed message header",
            why,
        })?;
        Ok((header, raw, pad))
    }
}

fn read_public(rd: &mut Reader<'_>) -> Result<PublicIdentity, DecodeError> {
    let s = rd.array::<32>("signing key")?;
    let a = rd.array::<32>("agreement key")?;
    PublicIdentity::from_bytes(&s, &a)
}

/// What the sender decides for one message.
#[derive(Clone, Debug)]
pub struct SealRequest<'a> {
    pub kind: Kind,
    pub id: MessageId,
    pub created_at: u64,
    pub expires_at: u64,
    pub in_reply_to: Option<MessageId>,
    pub recipients: &'a [PublicIdentity],
    /// Where receipts and rejections should be sent (the sender's relay).
    pub reply_relay: Option<&'a RelayPin>,
    /// Pad the plaintext to a Padmé length (§4.3) so its size tells a
    /// relay only a coarse bucket. Needs the content's length in advance:
    /// `Some(n)` pads, and sealing fails unless the content is exactly `n`
    /// bytes; `None` writes an unpadded (version 1) header, as for content
    /// of unknown length (a pipe).
    pub pad_for_len: Option<u64>,
}

/// What sealing produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealSummary {
    pub id: MessageId,
    pub content_len: u64,
    pub content_hash: blake3::Hash,
    /// Length of the whole container in bytes.
    pub sealed_len: u64,
}

fn signed_bytes(header: &[u8], content_len: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(header.len() + 40);
    v.extend_from_slice(header);
    v.extend_from_slice(&content_len.to_be_bytes());
    v.extend_from_slice(hash);
    v
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Seals `content` (read to its end) from `sender` to the request's
/// recipients, writing the container to `out`. Memory use is constant;
/// `out` must be seekable because the payload length is patched in at the
/// end (seal to a temporary file to produce a stream).
pub fn seal_stream<R: Read, W: Write + Seek>(
    sender: &Identity,
    req: &SealRequest<'_>,
    mut content: R,
    mut out: W,
) -> Result<SealSummary, SealError> {
    let header = MessageHeader {
        kind: req.kind,
        id: req.id,
        created_at: req.created_at,
        expires_at: req.expires_at,
        in_reply_to: req.in_reply_to,
        sender: *sender.public(),
        recipients: req.recipients.iter().map(RecipientKeys::from).collect(),
        reply_relay: req.reply_relay.cloned(),
    };
    header.validate().map_err(SealError::InvalidRequest)?;
    // A padded header ends in pad_len, which depends on the header's own
    // length: encode it once with 0 there, then fill it in.
    let mut header_bytes = header.encode_padded(req.pad_for_len.map(|_| 0));
    let pad = req.pad_for_len.map(|n| {
        let p = padding_for(header_bytes.len(), n);
        let at = header_bytes.len() - 4;
        header_bytes[at..].copy_from_slice(&p.to_be_bytes());
        p
    });

    let start = out.stream_position()?;
    out.write_all(CONTAINER_MAGIC)?;
    out.write_all(&[CONTAINER_VERSION])?;
    out.write_all(&0u64.to_be_bytes())?;

    let age_recipients: Vec<crate::identity::AgeRecipient> =
        req.recipients.iter().map(|r| r.age_recipient()).collect();
    let encryptor =
        age::Encryptor::with_recipients(age_recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|_| SealError::InvalidRequest("age refused the recipient set"))?;
    let counting = CountingWriter {
        inner: &mut out,
        count: 0,
    };
    let mut w = encryptor.wrap_output(counting)?;
    w.write_all(&header_bytes)?;
    if let Some(p) = pad {
        let zeros = [0u8; 4096];
        let mut left = p as usize;
        while left > 0 {
            let n = left.min(zeros.len());
            w.write_all(&zeros[..n])?;
            left -= n;
        }
    }

    let mut hasher = StreamHasher::new();
    let mut content_len = 0u64;
    let mut buf = vec![0u8; SMALL_BUF];
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        w.write_all(&buf[..n])?;
        content_len += n as u64;
        buf = hasher.update(buf, n);
    }
    let hash = hasher.finalize();
    if req.pad_for_len.is_some_and(|n| n != content_len) {
        return Err(SealError::InvalidRequest(
            "the content is not the length stated for padding",
        ));
    }
    let signature = sender.sign(
        context::MESSAGE,
        &signed_bytes(&header_bytes, content_len, hash.as_bytes()),
    );
    w.write_all(&content_len.to_be_bytes())?;
    w.write_all(hash.as_bytes())?;
    w.write_all(&signature)?;
    let counting = w.finish()?;
    let payload_len = counting.count;

    out.seek(SeekFrom::Start(start + 5))?;
    out.write_all(&payload_len.to_be_bytes())?;
    out.seek(SeekFrom::Start(
        start + CONTAINER_HEADER_LEN as u64 + payload_len,
    ))?;
    out.flush()?;
    Ok(SealSummary {
        id: req.id,
        content_len,
        content_hash: hash,
        sealed_len: CONTAINER_HEADER_LEN as u64 + payload_len,
    })
}

/// Seals content held in memory.
pub fn seal_to_vec(
    sender: &Identity,
    req: &SealRequest<'_>,
    content: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut cur = io::Cursor::new(Vec::with_capacity(content.len() + 512));
    seal_stream(sender, req, content, &mut cur)?;
    Ok(cur.into_inner())
}

/// Bounds for opening.
#[derive(Clone, Copy, Debug)]
pub struct OpenLimits {
    /// The largest container accepted.
    pub max_sealed_len: u64,
}

impl Default for OpenLimits {
    fn default() -> Self {
        Self {
            max_sealed_len: u64::MAX,
        }
    }
}

/// A message whose encryption, format, signature and recipient binding
/// checked out. Freshness, replay and whether the sender is a known contact
/// are the caller's next checks (see [`crate::freshness`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedMessage {
    pub header: MessageHeader,
    pub content_len: u64,
    pub content_hash: blake3::Hash,
    pub sealed_len: u64,
}

/// Marks an early end of the container's payload, as opposed to age's own
/// view of truncation, which cannot tell a cut-short file from a tampered
/// last chunk.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
    cut_short: Rc<Cell<bool>>,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.cut_short.set(true);
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sealed payload ends before its stated length",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

enum ReadFailure {
    Decode(DecodeError),
    Io(io::Error),
    /// The plaintext ended before the structure did.
    Eof(&'static str),
}

impl From<DecodeError> for ReadFailure {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

fn read_more(r: &mut impl Read, buf: &mut Vec<u8>, n: usize) -> Result<(), ReadFailure> {
    let start = buf.len();
    buf.resize(start + n, 0);
    let mut got = 0;
    while got < n {
        match r.read(&mut buf[start + got..]) {
            Ok(0) => return Err(ReadFailure::Eof("sealed message header")),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFailure::Io(e)),
        }
    }
    Ok(())
}

/// Tracks the plaintext position so a failing age chunk can be named.
struct Plain<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for Plain<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Turns an error from the age stream into the failure class it means.
fn classify_stream_error(e: io::Error, cut_short: bool, plain_pos: u64) -> OpenError {
    if cut_short {
        return OpenError::Truncated {
            detail: "the sealed file is shorter than its stated length".into(),
        };
    }
    match e.kind() {
        io::ErrorKind::InvalidData => OpenError::Tampered {
            at: TamperedAt::Chunk(plain_pos / AGE_CHUNK_SIZE),
        },
        // age saw the stream end on a chunk boundary without a final chunk,
        // while the container length matched: the length was rewritten too.
        io::ErrorKind::UnexpectedEof => OpenError::Tampered {
            at: TamperedAt::Chunk(plain_pos / AGE_CHUNK_SIZE),
        },
        _ => OpenError::Io {
            context: "reading the sealed message",
            source: e,
        },
    }
}

/// Opens a sealed message: decrypts it with `me`, parses and verifies it,
/// and streams the content to `out`. The content is written before the
/// signature at its end is checked, so `out` must be somewhere the caller
/// can discard (a temporary file) until this returns `Ok`.
pub fn open_stream<R: Read, W: Write>(
    me: &Identity,
    mut input: R,
    mut out: W,
    limits: OpenLimits,
) -> Result<OpenedMessage, OpenError> {
    let mut head = [0u8; CONTAINER_HEADER_LEN];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(OpenError::io("reading the sealed message")(e)),
        }
    }
    if got < 4 || &head[..4] != CONTAINER_MAGIC {
        return Err(DecodeError::BadMagic {
            expected: "sealed message",
        }
        .into());
    }
    if got < 5 {
        return Err(OpenError::Truncated {
            detail: "inside the container header".into(),
        });
    }
    if head[4] != CONTAINER_VERSION {
        return Err(OpenError::UnsupportedVersion {
            what: "sealed message container",
            version: head[4],
        });
    }
    if got < CONTAINER_HEADER_LEN {
        return Err(OpenError::Truncated {
            detail: "inside the container header".into(),
        });
    }
    let payload_len = u64::from_be_bytes(head[5..13].try_into().unwrap_or([0; 8]));
    let sealed_len = payload_len.saturating_add(CONTAINER_HEADER_LEN as u64);
    if sealed_len > limits.max_sealed_len {
        return Err(OpenError::TooLarge {
            max: limits.max_sealed_len,
        });
    }

    let cut_short = Rc::new(Cell::new(false));
    let mut exact = ExactReader {
        inner: input,
        remaining: payload_len,
        cut_short: cut_short.clone(),
    };
    let read_buf = payload_len.clamp(64, AGE_CHUNK_SIZE + 16) as usize;
    let decryptor =
        match age::Decryptor::new_buffered(BufReader::with_capacity(read_buf, &mut exact)) {
            Ok(d) => d,
            Err(e) => return Err(classify_age_error(e, cut_short.get())),
        };
    let stream = decryptor
        .decrypt(std::iter::once(me.age_identity() as &dyn age::Identity))
        .map_err(|e| classify_age_error(e, cut_short.get()))?;
    let mut plain = Plain {
        inner: stream,
        pos: 0,
    };

    let classify = |e: io::Error, pos: u64| classify_stream_error(e, cut_short.get(), pos);
    let (header, content_len, hash) = verify_plaintext(me, &mut plain, &mut out, classify)?;

    // age stopped at its final chunk; anything after it in the container is
    // not part of the message.
    drop(plain);
    let mut extra = [0u8; 1];
    match exact.inner.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => {
            return Err(OpenError::Malformed(DecodeError::TrailingBytes {
                count: 1,
            }))
        }
        Err(e) => return Err(OpenError::io("reading the sealed message")(e)),
    }
    if exact.remaining != 0 {
        return Err(OpenError::Malformed(DecodeError::TrailingBytes {
            count: exact.remaining.min(usize::MAX as u64) as usize,
        }));
    }
    Ok(OpenedMessage {
        header,
        content_len,
        content_hash: hash,
        sealed_len,
    })
}

/// Reads and verifies a decrypted plaintext (header, content, trailer),
/// streaming the content to `out`. `classify` turns a read error at a
/// plaintext position into the failure it means.
fn verify_plaintext<R: Read, W: Write>(
    me: &Identity,
    plain: &mut Plain<R>,
    out: &mut W,
    classify: impl Fn(io::Error, u64) -> OpenError,
) -> Result<(MessageHeader, u64, blake3::Hash), OpenError> {
    let (header, header_bytes, pad) = match MessageHeader::read_from(plain) {
        Ok(h) => h,
        Err(ReadFailure::Decode(e)) => return Err(e.into()),
        Err(ReadFailure::Eof(what)) => {
            return Err(OpenError::Malformed(DecodeError::Truncated { what }))
        }
        Err(ReadFailure::Io(e)) => return Err(classify(e, plain.pos)),
    };
    // The padding: exactly `pad` zero bytes, read at constant memory. Its
    // length is signed (in the header); its bytes are authenticated by
    // age; zeros are required so that nothing can ride in it.
    let mut left = pad as usize;
    let mut zeros = [0u8; 4096];
    while left > 0 {
        let want = left.min(zeros.len());
        let n = match plain.read(&mut zeros[..want]) {
            Ok(0) => {
                return Err(OpenError::Malformed(DecodeError::Truncated {
                    what: "padding",
                }))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(classify(e, plain.pos)),
        };
        if zeros[..n].iter().any(|&b| b != 0) {
            return Err(OpenError::Malformed(DecodeError::Invalid {
                what: "padding",
                why: "is not all zero bytes",
            }));
        }
        left -= n;
    }

    // Stream the content, holding back the last TRAILER_LEN bytes: the end
    // of the plaintext is only known when age reports it.
    let mut hasher = StreamHasher::new();
    let mut content_len = 0u64;
    let mut buf = vec![0u8; SMALL_BUF + TRAILER_LEN];
    let mut filled = 0usize;
    loop {
        let n = match plain.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(classify(e, plain.pos)),
        };
        filled += n;
        if filled == buf.len() {
            let emit = filled - TRAILER_LEN;
            out.write_all(&buf[..emit])
                .map_err(OpenError::io("writing the opened content"))?;
            content_len += emit as u64;
            let mut tail = [0u8; TRAILER_LEN];
            tail.copy_from_slice(&buf[emit..filled]);
            buf = hasher.update(buf, emit);
            buf[..TRAILER_LEN].copy_from_slice(&tail);
            filled = TRAILER_LEN;
        }
    }
    if filled < TRAILER_LEN {
        return Err(OpenError::Malformed(DecodeError::Truncated {
            what: "signature trailer",
        }));
    }
    let emit = filled - TRAILER_LEN;
    out.write_all(&buf[..emit])
        .map_err(OpenError::io("writing the opened content"))?;
    out.flush()
        .map_err(OpenError::io("writing the opened content"))?;
    content_len += emit as u64;
    let mut trailer = [0u8; TRAILER_LEN];
    trailer.copy_from_slice(&buf[emit..filled]);
    let buf = hasher.update(buf, emit);
    drop(buf);
    let hash = hasher.finalize();

    let mut tr = Reader::new(&trailer);
    let stated_len = tr.u64("content length")?;
    let stated_hash: [u8; 32] = tr.array("content hash")?;
    let signature: [u8; 64] = tr.array("signature")?;
    if !header.sender.verify(
        context::MESSAGE,
        &signed_bytes(&header_bytes, stated_len, &stated_hash),
        &signature,
    ) {
        return Err(OpenError::BadSignature);
    }
    // Signed by the sender but not matching: the sender's software is broken.
    if stated_len != content_len || hash != blake3::Hash::from_bytes(stated_hash) {
        return Err(OpenError::Malformed(DecodeError::Invalid {
            what: "content",
            why: "does not match the signed length and hash",
        }));
    }
    if !header.recipients.iter().any(|r| r.is(me.public())) {
        return Err(OpenError::NotForMe(NotForMeReason::NotInSignedRecipients));
    }
    Ok((header, content_len, hash))
}

fn classify_age_error(e: age::DecryptError, cut_short: bool) -> OpenError {
    if cut_short {
        return OpenError::Truncated {
            detail: "the sealed file is shorter than its stated length".into(),
        };
    }
    match e {
        age::DecryptError::NoMatchingKeys => OpenError::NotForMe(NotForMeReason::NoMatchingKey),
        age::DecryptError::InvalidMac
        | age::DecryptError::DecryptionFailed
        | age::DecryptError::KeyDecryptionFailed => OpenError::Tampered {
            at: TamperedAt::Header,
        },
        // The container's version (checked before) fixes the inner layer
        // as age v1: an age header that is not v1 was damaged or altered,
        // and saying "upgrade sealpost" would send the user the wrong way.
        age::DecryptError::UnknownFormat => OpenError::Tampered {
            at: TamperedAt::Header,
        },
        // The payload ended inside the age header although the container
        // length was honoured: the length field itself is wrong.
        age::DecryptError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            OpenError::Malformed(DecodeError::Truncated { what: "age header" })
        }
        age::DecryptError::Io(e) => OpenError::Io {
            context: "reading the sealed message",
            source: e,
        },
        _ => OpenError::Malformed(DecodeError::Invalid {
            what: "age header",
            why: "not a valid age v1 header",
        }),
    }
}

/// Opens a message held in memory, refusing content larger than
/// `max_content` bytes (the bound keeps memory use predictable).
pub fn open_slice(
    me: &Identity,
    sealed: &[u8],
    max_content: usize,
) -> Result<(OpenedMessage, Vec<u8>), OpenError> {
    struct Bounded {
        buf: Vec<u8>,
        max: usize,
    }
    impl Write for Bounded {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.buf.len() + b.len() > self.max {
                return Err(io::Error::other("content exceeds the in-memory bound"));
            }
            self.buf.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut sink = Bounded {
        buf: Vec::new(),
        max: max_content,
    };
    let limits = OpenLimits {
        max_sealed_len: (max_content as u64)
            .saturating_add((max_content as u64 / AGE_CHUNK_SIZE + 1) * 16)
            .saturating_add(64 * 1024),
    };
    match open_stream(me, sealed, &mut sink, limits) {
        Ok(m) => Ok((m, sink.buf)),
        Err(OpenError::Io { source, .. }) if source.kind() == io::ErrorKind::Other => {
            Err(OpenError::TooLarge {
                max: max_content as u64,
            })
        }
        Err(e) => Err(e),
    }
}

/// Building blocks for test vectors, fuzzing and adversarial tests: they
/// let a test craft plaintexts and containers that honest sealing never
/// produces (a re-encrypted message, a bad signature).
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// The plaintext an honest sender encrypts: header, content, trailer.
    /// Deterministic (Ed25519 signatures are), so it is a test vector.
    pub fn signed_plaintext(sender: &Identity, header: &MessageHeader, content: &[u8]) -> Vec<u8> {
        let hb = header.encode();
        let hash = blake3::hash(content);
        let sig = sender.sign(
            context::MESSAGE,
            &signed_bytes(&hb, content.len() as u64, hash.as_bytes()),
        );
        let mut out = hb;
        out.extend_from_slice(content);
        out.extend_from_slice(&(content.len() as u64).to_be_bytes());
        out.extend_from_slice(hash.as_bytes());
        out.extend_from_slice(&sig);
        out
    }

    /// A padded (version 2) plaintext with `pad` padding bytes, each
    /// `fill` (an honest sender writes zeros).
    pub fn signed_plaintext_padded(
        sender: &Identity,
        header: &MessageHeader,
        content: &[u8],
        pad: u32,
        fill: u8,
    ) -> Vec<u8> {
        let hb = header.encode_padded(Some(pad));
        let hash = blake3::hash(content);
        let sig = sender.sign(
            context::MESSAGE,
            &signed_bytes(&hb, content.len() as u64, hash.as_bytes()),
        );
        let mut out = hb;
        out.resize(out.len() + pad as usize, fill);
        out.extend_from_slice(content);
        out.extend_from_slice(&(content.len() as u64).to_be_bytes());
        out.extend_from_slice(hash.as_bytes());
        out.extend_from_slice(&sig);
        out
    }

    /// Runs the plaintext checks (format, signature, recipient binding) on
    /// a decrypted plaintext held in memory: the fuzz target for everything
    /// behind the age layer, which random input could never reach.
    pub fn open_plaintext(
        me: &Identity,
        plaintext: &[u8],
    ) -> Result<(MessageHeader, Vec<u8>), OpenError> {
        let mut plain = Plain {
            inner: plaintext,
            pos: 0,
        };
        let mut out = Vec::new();
        let (header, _, _) = verify_plaintext(me, &mut plain, &mut out, |e, _| {
            OpenError::io("reading the plaintext")(e)
        })?;
        Ok((header, out))
    }

    /// Encrypts any plaintext to the recipients with age and wraps it in a
    /// container.
    pub fn seal_plaintext(recipients: &[PublicIdentity], plaintext: &[u8]) -> Vec<u8> {
        let rs: Vec<crate::identity::AgeRecipient> =
            recipients.iter().map(|r| r.age_recipient()).collect();
        let enc = age::Encryptor::with_recipients(rs.iter().map(|r| r as &dyn age::Recipient))
            .unwrap_or_else(|e| unreachable!("x25519 recipients: {e}"));
        let mut payload = Vec::new();
        let mut w = enc
            .wrap_output(&mut payload)
            .unwrap_or_else(|e| unreachable!("writing to memory: {e}"));
        w.write_all(plaintext)
            .and_then(|_| w.finish().map(|_| ()))
            .unwrap_or_else(|e| unreachable!("writing to memory: {e}"));
        wrap_container(&payload)
    }

    /// Puts an age payload in a container.
    pub fn wrap_container(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + CONTAINER_HEADER_LEN);
        out.extend_from_slice(CONTAINER_MAGIC);
        out.push(CONTAINER_VERSION);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Decrypts a container's age layer without any sealpost checks.
    pub fn decrypt_plaintext(me: &Identity, sealed: &[u8]) -> Option<Vec<u8>> {
        let d = age::Decryptor::new_buffered(sealed.get(CONTAINER_HEADER_LEN..)?).ok()?;
        let mut r = d
            .decrypt(std::iter::once(me.age_identity() as &dyn age::Identity))
            .ok()?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).ok()?;
        Some(out)
    }

    /// Where age's payload (after the header and its 16-byte nonce) starts
    /// in a container: chunk `i` is at `start + i * (65536 + 16)`.
    pub fn age_payload_start(sealed: &[u8]) -> Option<usize> {
        let body = sealed.get(CONTAINER_HEADER_LEN..)?;
        let mac_line = body.windows(5).position(|w| w == b"\n--- ")?;
        let end = mac_line + 1 + body[mac_line + 1..].iter().position(|&b| b == b'\n')?;
        Some(CONTAINER_HEADER_LEN + end + 1 + 16)
    }
}
