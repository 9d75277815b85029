//! File blobs: a file encrypted in fixed-size chunks with STREAM.
//!
//! ```text
//! blob  = chunk_0 .. chunk_{n-1}
//! chunk = AES-256-GCM(key, nonce_i, plaintext_i)           (len_i + 16 bytes)
//! nonce_i = 0x00 * 7 || i:u32 (big-endian) || last:u8 (1 for the final chunk, else 0)
//! ```
//!
//! This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár)
//! as implemented by RustCrypto's `aead::stream::StreamBE32` (and, with
//! AES-GCM segments, the shape of Tink's streaming AEAD). Putting the
//! chunk index in the nonce means a chunk moved, duplicated or swapped fails
//! to authenticate and is named by its index; the last-chunk flag means a
//! blob cut at a chunk boundary is caught. Each blob has its own random key
//! (carried in the sealed manifest), so the nonce prefix can be constant.
//! Every chunk but the last has exactly `chunk_size` bytes of plaintext, so
//! chunk `i` sits at byte `i * (chunk_size + 16)` and can be fetched, checked
//! and re-sent alone.

use std::io::{self, Read, Write};

use rand_core::CryptoRngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::codec::DecodeError;
use crate::error::{OpenError, TamperedAt};

/// GCM tag length.
pub const TAG_LEN: u64 = 16;
/// 64 KiB, as in age: large enough that the 16-byte tag costs 0.02 %, small
/// enough that one damaged chunk is cheap to fetch again.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// The nonce counter is 32 bits, so a blob has at most 2^32 chunks.
pub const MAX_CHUNKS: u64 = 1 << 32;

/// A blob's 256-bit key. Zeroized on drop; `Debug` hides it.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct BlobKey(pub [u8; 32]);

impl std::fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlobKey(hidden)")
    }
}

impl BlobKey {
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        Self(k)
    }

    /// The chunk cipher for this blob; build it once per transfer.
    pub fn cipher(&self) -> ChunkCipher {
        let key = UnboundKey::new(&AES_256_GCM, &self.0)
            .unwrap_or_else(|_| unreachable!("an AES-256-GCM key is 32 bytes"));
        ChunkCipher(LessSafeKey::new(key))
    }
}

/// AES-256-GCM under one blob's key, with the STREAM nonces of §5.2.
///
/// The AEAD is ring's (BoringSSL's assembly, constant time in every
/// backend: AES-NI/VAES and CLMUL on x86-64, the ARMv8 crypto extensions,
/// a bit-sliced vector fallback elsewhere). A blob is the one place where
/// sealpost encrypts gigabytes: on this project's machines AES-256-GCM runs
/// at 3.3× ring's ChaCha20-Poly1305 (docs/DESIGN.md). The bytes are the
/// same as RustCrypto's `StreamBE32<Aes256Gcm>`; a test checks that.
pub struct ChunkCipher(LessSafeKey);

impl std::fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkCipher(hidden)")
    }
}

/// `0x00 * 7 || index:u32 || last:u8`.
fn chunk_nonce(index: u32, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[7..11].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    Nonce::assume_unique_for_key(n)
}

impl ChunkCipher {
    /// Encrypts chunk `index` in place: `buf` is the plaintext followed by
    /// 16 bytes of room, which receive the tag.
    pub fn seal_in_place(&self, index: u64, last: bool, buf: &mut [u8]) {
        let idx =
            u32::try_from(index).unwrap_or_else(|_| unreachable!("layout bounds chunk count"));
        let split = buf.len() - TAG_LEN as usize;
        let (plain, tag_room) = buf.split_at_mut(split);
        let tag: Tag = self
            .0
            .seal_in_place_separate_tag(chunk_nonce(idx, last), Aad::empty(), plain)
            .unwrap_or_else(|_| unreachable!("AES-256-GCM encrypts any chunk up to 4 MiB"));
        tag_room.copy_from_slice(tag.as_ref());
    }

    /// Decrypts chunk `index` of a blob of `layout` in place and returns
    /// its plaintext length (the plaintext is `buf[..len]`). Fails as
    /// `Tampered` if it does not authenticate at that position.
    pub fn open_in_place(
        &self,
        layout: &BlobLayout,
        index: u64,
        buf: &mut [u8],
    ) -> Result<usize, OpenError> {
        let tampered = OpenError::Tampered {
            at: TamperedAt::Chunk(index),
        };
        if index >= layout.chunk_count() || buf.len() as u64 != layout.sealed_len(index) {
            return Err(tampered);
        }
        let last = index + 1 == layout.chunk_count();
        let idx = u32::try_from(index).map_err(|_| OpenError::Tampered {
            at: TamperedAt::Chunk(index),
        })?;
        match self
            .0
            .open_in_place(chunk_nonce(idx, last), Aad::empty(), buf)
        {
            Ok(plain) => Ok(plain.len()),
            Err(_) => Err(tampered),
        }
    }
}

/// The shape of a blob: how long its plaintext is and how it is chunked.
///
/// The plaintext is the file's `data_len` bytes followed by
/// `plaintext_len - data_len` zero bytes of padding (PROTOCOL 5.2; none
/// for a file sent without `--pad`). Chunks are cut from the whole
/// plaintext, padding included, so the padding is encrypted and
/// authenticated like the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLayout {
    /// The blob's plaintext: the file and its padding.
    pub plaintext_len: u64,
    pub chunk_size: u32,
    /// The file's own bytes, at the start of the plaintext.
    pub data_len: u64,
}

impl BlobLayout {
    /// The layout of an unpadded file of `plaintext_len` bytes.
    pub fn new(plaintext_len: u64, chunk_size: u32) -> Result<Self, DecodeError> {
        Self::padded(plaintext_len, plaintext_len, chunk_size)
    }

    /// The layout of a file of `data_len` bytes padded with zeros to
    /// `plaintext_len` (at least `data_len`).
    pub fn padded(data_len: u64, plaintext_len: u64, chunk_size: u32) -> Result<Self, DecodeError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) || !chunk_size.is_power_of_two()
        {
            return Err(DecodeError::Invalid {
                what: "chunk size",
                why: "must be a power of two from 4 KiB to 4 MiB",
            });
        }
        if data_len > plaintext_len {
            return Err(DecodeError::Invalid {
                what: "padded length",
                why: "is shorter than the file",
            });
        }
        let layout = Self {
            plaintext_len,
            chunk_size,
            data_len,
        };
        if layout.chunk_count_unchecked() > MAX_CHUNKS {
            return Err(DecodeError::Invalid {
                what: "file size",
                why: "needs more than 2^32 chunks",
            });
        }
        Ok(layout)
    }

    /// The layout of a file of `data_len` bytes padded to a Padmé length
    /// (PROTOCOL 5.2): what `send --pad` writes.
    pub fn padme(data_len: u64, chunk_size: u32) -> Result<Self, DecodeError> {
        Self::padded(data_len, crate::message::padme(data_len), chunk_size)
    }

    /// Padding bytes after the file.
    pub fn pad_len(&self) -> u64 {
        self.plaintext_len - self.data_len
    }

    /// How many of chunk `i`'s plaintext bytes are the file's (the rest
    /// are padding).
    pub fn data_in(&self, i: u64) -> u64 {
        let start = i.saturating_mul(self.chunk_size as u64);
        self.data_len.saturating_sub(start).min(self.plain_len(i))
    }

    fn chunk_count_unchecked(&self) -> u64 {
        // An empty file is one empty final chunk, so every blob has a last
        // chunk to carry the end-of-stream flag.
        self.plaintext_len.div_ceil(self.chunk_size as u64).max(1)
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunk_count_unchecked()
    }

    /// Plaintext length of chunk `i`.
    pub fn plain_len(&self, i: u64) -> u64 {
        let cs = self.chunk_size as u64;
        if i + 1 < self.chunk_count() {
            cs
        } else {
            self.plaintext_len - (self.chunk_count() - 1) * cs
        }
    }

    /// Byte offset of chunk `i` in the blob.
    pub fn offset(&self, i: u64) -> u64 {
        i * (self.chunk_size as u64 + TAG_LEN)
    }

    /// Encrypted length of chunk `i`.
    pub fn sealed_len(&self, i: u64) -> u64 {
        self.plain_len(i) + TAG_LEN
    }

    pub fn blob_len(&self) -> u64 {
        self.plaintext_len + self.chunk_count() * TAG_LEN
    }

    /// How many bytes of the file the first `blob_offset` bytes of the
    /// blob carry (tags and padding do not count): what a progress
    /// display shows.
    pub fn plain_before(&self, blob_offset: u64) -> u64 {
        let chunk = self.chunk_size as u64;
        let unit = chunk + TAG_LEN;
        let (k, rem) = (blob_offset / unit, blob_offset % unit);
        (k * chunk + rem.min(chunk)).min(self.data_len)
    }
}

/// Encrypts one chunk in place: `buf` holds the plaintext and gets the tag
/// appended.
pub fn seal_chunk(cipher: &ChunkCipher, index: u64, last: bool, buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[0u8; TAG_LEN as usize]);
    cipher.seal_in_place(index, last, buf);
}

/// Decrypts chunk `index` of a blob of `layout` in place. Fails as
/// `Tampered` if it does not authenticate at that position.
pub fn open_chunk(
    cipher: &ChunkCipher,
    layout: &BlobLayout,
    index: u64,
    buf: &mut Vec<u8>,
) -> Result<(), OpenError> {
    let n = cipher.open_in_place(layout, index, buf)?;
    buf.truncate(n);
    Ok(())
}

/// The file's bytes in chunk `i`'s opened plaintext `plain`: how many
/// there are, after checking that every byte after them (padding) is
/// zero. Padding that is not zero is *malformed* (PROTOCOL 5.2): it
/// authenticated, so the sender wrote it, and nothing may ride in it.
pub fn check_padding(layout: &BlobLayout, i: u64, plain: &[u8]) -> Result<usize, OpenError> {
    let data = (layout.data_in(i) as usize).min(plain.len());
    if plain[data..].iter().any(|&b| b != 0) {
        return Err(OpenError::Malformed(DecodeError::Invalid {
            what: "file padding",
            why: "is not all zero bytes",
        }));
    }
    Ok(data)
}

/// What encrypting a blob produced: everything the manifest needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobSummary {
    pub layout: BlobLayout,
    pub plaintext_hash: blake3::Hash,
    pub blob_hash: blake3::Hash,
}

/// Encrypts a file as a blob while hashing both sides, at constant memory
/// (one chunk). Reads `input` to its end.
pub fn seal_blob<R: Read, W: Write>(
    key: &BlobKey,
    chunk_size: u32,
    mut input: R,
    mut out: W,
) -> Result<BlobSummary, io::Error> {
    BlobLayout::new(0, chunk_size).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let cs = chunk_size as usize;
    let cipher = key.cipher();
    let mut plain_hash = blake3::Hasher::new();
    let mut blob_hash = blake3::Hasher::new();
    // Two buffers: a full chunk is only known not to be the last once the
    // next one has at least one byte.
    let mut cur = Vec::with_capacity(cs + TAG_LEN as usize);
    let mut next = Vec::with_capacity(cs + TAG_LEN as usize);
    let mut index = 0u64;
    let mut total = 0u64;
    fill(&mut input, &mut cur, cs)?;
    loop {
        let more = if cur.len() == cs {
            fill(&mut input, &mut next, cs)?;
            !next.is_empty()
        } else {
            false
        };
        plain_hash.update(&cur);
        total += cur.len() as u64;
        if index >= MAX_CHUNKS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "file needs more than 2^32 chunks",
            ));
        }
        seal_chunk(&cipher, index, !more, &mut cur);
        blob_hash.update(&cur);
        out.write_all(&cur)?;
        index += 1;
        if !more {
            break;
        }
        std::mem::swap(&mut cur, &mut next);
        next.clear();
    }
    out.flush()?;
    Ok(BlobSummary {
        layout: BlobLayout::new(total, chunk_size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        plaintext_hash: plain_hash.finalize(),
        blob_hash: blob_hash.finalize(),
    })
}

/// Encrypts a file of exactly `layout.data_len` bytes from `input` as the
/// blob of `layout`, its padding (zeros up to `layout.plaintext_len`)
/// included, at constant memory (one chunk). Fails if `input` ends early
/// or has more.
pub fn seal_padded_blob<R: Read, W: Write>(
    key: &BlobKey,
    layout: &BlobLayout,
    mut input: R,
    mut out: W,
) -> Result<BlobSummary, io::Error> {
    let cipher = key.cipher();
    let mut plain_hash = blake3::Hasher::new();
    let mut blob_hash = blake3::Hasher::new();
    let mut buf = Vec::with_capacity(layout.chunk_size as usize + TAG_LEN as usize);
    for i in 0..layout.chunk_count() {
        let data = layout.data_in(i) as usize;
        fill(&mut input, &mut buf, data)?;
        if buf.len() < data {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the input is shorter than the layout's file",
            ));
        }
        plain_hash.update(&buf);
        buf.resize(layout.plain_len(i) as usize, 0);
        seal_chunk(&cipher, i, i + 1 == layout.chunk_count(), &mut buf);
        blob_hash.update(&buf);
        out.write_all(&buf)?;
    }
    if input.read(&mut [0u8; 1])? > 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the input is longer than the layout's file",
        ));
    }
    out.flush()?;
    Ok(BlobSummary {
        layout: *layout,
        plaintext_hash: plain_hash.finalize(),
        blob_hash: blob_hash.finalize(),
    })
}

/// Reads up to `n` bytes into `buf` (cleared first), stopping early only at
/// end of input.
fn fill(r: &mut impl Read, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    buf.clear();
    let mut limited = r.take(n as u64);
    loop {
        match limited.read_to_end(buf) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Decrypts a whole blob in order, writing plaintext to `out` and checking
/// it against the manifest's length and hash. Constant memory. The first
/// bad chunk ends it with its index; a blob shorter than the layout says
/// is `Truncated`, a longer one `Malformed`.
pub fn open_blob<R: Read, W: Write>(
    key: &BlobKey,
    layout: &BlobLayout,
    expected_hash: &blake3::Hash,
    mut input: R,
    mut out: W,
) -> Result<(), OpenError> {
    let cipher = key.cipher();
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::with_capacity(layout.chunk_size as usize + TAG_LEN as usize);
    for i in 0..layout.chunk_count() {
        let want = layout.sealed_len(i);
        fill(&mut input, &mut buf, want as usize).map_err(OpenError::io("reading the blob"))?;
        if (buf.len() as u64) < want {
            return Err(OpenError::Truncated {
                detail: format!("the blob ends inside chunk {i} of {}", layout.chunk_count()),
            });
        }
        open_chunk(&cipher, layout, i, &mut buf)?;
        let data = check_padding(layout, i, &buf)?;
        hasher.update(&buf[..data]);
        out.write_all(&buf[..data])
            .map_err(OpenError::io("writing the file"))?;
    }
    let mut extra = [0u8; 1];
    loop {
        match input.read(&mut extra) {
            Ok(0) => break,
            Ok(_) => {
                return Err(OpenError::Malformed(DecodeError::TrailingBytes {
                    count: 1,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(OpenError::io("reading the blob")(e)),
        }
    }
    out.flush().map_err(OpenError::io("writing the file"))?;
    // Every chunk authenticated under a key only the sender had, so a
    // mismatch means the sender's manifest disagrees with its own blob.
    if hasher.finalize() != *expected_hash {
        return Err(OpenError::Malformed(DecodeError::Invalid {
            what: "file",
            why: "decrypted content does not match the manifest's hash",
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_arithmetic() {
        let l = BlobLayout::new(0, 4096).expect("ok");
        assert_eq!((l.chunk_count(), l.blob_len(), l.plain_len(0)), (1, 16, 0));
        let l = BlobLayout::new(4096, 4096).expect("ok");
        assert_eq!((l.chunk_count(), l.blob_len()), (1, 4112));
        let l = BlobLayout::new(4097, 4096).expect("ok");
        assert_eq!((l.chunk_count(), l.plain_len(1), l.offset(1)), (2, 1, 4112));
        // Padded: 5000 file bytes in 9000 of plaintext.
        let l = BlobLayout::padded(5000, 9000, 4096).expect("ok");
        assert_eq!(
            (l.chunk_count(), l.blob_len(), l.pad_len()),
            (3, 9048, 4000)
        );
        assert_eq!((l.data_in(0), l.data_in(1), l.data_in(2)), (4096, 904, 0));
        assert_eq!(l.plain_before(l.blob_len()), 5000);
        assert!(BlobLayout::padded(5001, 5000, 4096).is_err());
        assert!(BlobLayout::new(1, 1000).is_err());
        assert!(BlobLayout::new(u64::MAX, 4096).is_err());
    }

    #[test]
    fn a_chunk_opens_alone() {
        let key = BlobKey([1; 32]);
        let data = vec![7u8; 10_000];
        let mut blob = Vec::new();
        let s = seal_blob(&key, 4096, &data[..], &mut blob).expect("seal");
        assert_eq!(s.layout.blob_len(), blob.len() as u64);
        let off = s.layout.offset(1) as usize;
        let mut c = blob[off..off + s.layout.sealed_len(1) as usize].to_vec();
        open_chunk(&key.cipher(), &s.layout, 1, &mut c).expect("opens");
        assert_eq!(c, &data[4096..8192]);
        let mut c = blob[off..off + s.layout.sealed_len(1) as usize].to_vec();
        assert!(matches!(
            open_chunk(&key.cipher(), &s.layout, 0, &mut c),
            Err(OpenError::Tampered {
                at: TamperedAt::Chunk(0)
            })
        ));
    }

    /// The chunks are RustCrypto's `StreamBE32<Aes256Gcm>` byte for byte
    /// (the construction §5.2 names), whatever the index, flag and length.
    #[test]
    fn chunks_are_rustcrypto_stream_be32() {
        use aes_gcm::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
        use aes_gcm::{Aes256Gcm, KeyInit};
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(64), |(
            key in any::<[u8; 32]>(),
            index in prop_oneof![0u32..4, any::<u32>()],
            last in any::<bool>(),
            plain in proptest::collection::vec(any::<u8>(), 0..5000),
        )| {
            let ours = {
                let mut b = plain.clone();
                seal_chunk(&BlobKey(key).cipher(), index as u64, last, &mut b);
                b
            };
            let theirs = {
                let aead = Aes256Gcm::new((&key).into());
                let s: StreamBE32<Aes256Gcm> = StreamBE32::from_aead(aead, &Default::default());
                let mut b = plain.clone();
                s.encrypt_in_place(index, last, b"", &mut b).expect("encrypts");
                b
            };
            prop_assert_eq!(&ours, &theirs);
        });
    }
}
