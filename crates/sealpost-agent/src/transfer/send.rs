//! The sending side: a file's hashes (in parallel for large files), its chunks sealed piece by piece from the source file, the running hashes of uploads left for later, and repair blobs.

use super::*;

/// Whole chunks per piece: as many as fit in a relay piece.
pub fn chunks_per_piece(layout: &BlobLayout) -> u64 {
    (MAX_BLOB_PIECE as u64 / (layout.chunk_size as u64 + blob::TAG_LEN)).max(1)
}

/// Learns a file's blob layout and the BLAKE3 of its bytes (what its
/// manifest and its receipt name), reading it once at constant memory.
/// Exactly the file's length at the start is summarized (the upload reads
/// that much again, checks the same hash and fails if the file changed).
/// Nothing is encrypted here: the blob's own hash is computed while it is
/// uploaded ([`UploadHashes`]).
pub fn summarize(path: &Path, chunk_size: u32) -> io::Result<(BlobLayout, blake3::Hash)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let layout = BlobLayout::new(size, chunk_size)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok((layout, hash_file(&file, size)?))
}

/// Below this a file is hashed on one thread.
pub(crate) const PARALLEL_HASH_MIN: u64 = 8 << 20;

/// BLAKE3 of `file`'s first `size` bytes. A large file is hashed on two
/// threads: BLAKE3 is a tree, and blake3's `hazmat` API hashes subtrees
/// apart (each at its place in the input) and merges their chaining
/// values into the same root hash, so each thread reads and hashes its
/// own part. The root's left subtree `[0, L)` and right subtree `[L, size)`
/// go to one thread each; when the right one is under half the left (say
/// a file a little over a power of two), the left is split into its two
/// halves and the second thread takes its right half and the root's right
/// subtree. No thread gets more than two thirds of the file.
pub fn hash_file(file: &File, size: u64) -> io::Result<blake3::Hash> {
    use blake3::hazmat::{
        left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt,
        Mode,
    };
    if size < PARALLEL_HASH_MIN {
        let mut h = blake3::Hasher::new();
        hash_range(file, 0, size, &mut h)?;
        return Ok(h.finalize());
    }
    // The chaining value of the subtree `[from, to)`.
    let subtree = |from: u64, to: u64| -> io::Result<ChainingValue> {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(from);
        hash_range(file, from, to, &mut h)?;
        Ok(h.finalize_non_root())
    };
    let left = left_subtree_len(size);
    let split_left = size - left < left / 2;
    std::thread::scope(|scope| -> io::Result<blake3::Hash> {
        let second = scope.spawn(|| -> io::Result<(Option<ChainingValue>, ChainingValue)> {
            if split_left {
                Ok((Some(subtree(left / 2, left)?), subtree(left, size)?))
            } else {
                Ok((None, subtree(left, size)?))
            }
        });
        let first = subtree(0, if split_left { left / 2 } else { left })?;
        let (left_half, right) = second
            .join()
            .map_err(|_| io::Error::other("the hashing thread failed"))??;
        let left_cv = match left_half {
            Some(half) => merge_subtrees_non_root(&first, &half, Mode::Hash),
            None => first,
        };
        Ok(merge_subtrees_root(&left_cv, &right, Mode::Hash))
    })
}

/// Feeds `[from, to)` of `file` to `h`, a MiB at a time.
pub(crate) fn hash_range(
    file: &File,
    from: u64,
    to: u64,
    h: &mut blake3::Hasher,
) -> io::Result<()> {
    let mut buf = buffers::take(1 << 20);
    buf.resize(1 << 20, 0);
    let mut at = from;
    let r = (|| {
        while at < to {
            let n = ((to - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    })();
    buffers::give(buf);
    r
}

/// Builds the blob bytes from `offset` for at most `max` bytes, by reading
/// and encrypting the chunks that cover them from the source file, and
/// feeds to `plain` (if given) the plaintext of every chunk from `plain.1`
/// on (moving `plain.1` past them). Fails if the file is shorter than the
/// layout says (it changed since it was summarized).
pub(crate) fn seal_range(
    src: &File,
    cipher: &ChunkCipher,
    layout: &BlobLayout,
    offset: u64,
    max: usize,
    mut plain: Option<(&mut blake3::Hasher, &mut u64)>,
) -> io::Result<Vec<u8>> {
    let enc = layout.chunk_size as u64 + blob::TAG_LEN;
    let first = offset / enc;
    let skip = (offset - first * enc) as usize;
    // The chunks that cover [offset, offset + max), and their sealed length.
    let end_chunk = (offset + max as u64)
        .div_ceil(enc)
        .min(layout.chunk_count());
    let total: u64 = (first..end_chunk).map(|i| layout.sealed_len(i)).sum();
    // Chunks are read and encrypted in place in the piece's own (reused)
    // buffer: no copy per chunk, no allocation per piece. Each of its bytes
    // is written below (the file's bytes, the padding's zeros, the
    // ciphertext and tag), so it is not cleared first.
    let mut out = buffers::take_len(total as usize);
    let mut at = 0usize;
    for i in first..end_chunk {
        let n = layout.plain_len(i) as usize;
        let sealed = n + blob::TAG_LEN as usize;
        // The file's bytes, then padding (PROTOCOL 5.2) as zeros.
        let data = layout.data_in(i) as usize;
        src.read_exact_at(&mut out[at..at + data], i * layout.chunk_size as u64)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("the file changed or shrank since it was queued: {e}"),
                )
            })?;
        out[at + data..at + n].fill(0);
        if let Some((h, next)) = plain.as_mut() {
            if i == **next {
                h.update(&out[at..at + data]);
                **next += 1;
            }
        }
        cipher.seal_in_place(i, i + 1 == layout.chunk_count(), &mut out[at..at + sealed]);
        at += sealed;
    }
    let end = (skip + max).min(out.len());
    out.truncate(end);
    if skip > 0 {
        out.drain(..skip.min(end));
    }
    Ok(out)
}

/// The two hashes an upload needs, computed over the pieces as they are
/// sealed, in order (the file is encrypted once, while uploading): BLAKE3
/// of the blob, which the last piece states and the relay checks (§6.6),
/// and BLAKE3 of the file's bytes, which must still be the hash the file
/// was queued with (its manifest's) before the last piece may leave — so a
/// file changed since it was queued is caught by the sender, not by the
/// recipient after a whole download.
#[derive(Clone)]
pub struct UploadHashes {
    /// The blob's bytes `[0, at)` are hashed…
    at: u64,
    /// …and the plaintext of its chunks `[0, next_chunk)`.
    next_chunk: u64,
    plain: blake3::Hasher,
    sealed: blake3::Hasher,
}

impl Default for UploadHashes {
    fn default() -> Self {
        Self {
            at: 0,
            next_chunk: 0,
            plain: blake3::Hasher::new(),
            sealed: blake3::Hasher::new(),
        }
    }
}

impl std::fmt::Debug for UploadHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UploadHashes(at {})", self.at)
    }
}

impl UploadHashes {
    /// How much of the blob is hashed: the offset of the next piece.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// Seals the next piece (at most `max` bytes from [`Self::at`]) and
    /// hashes it.
    pub fn seal_next(
        &mut self,
        src: &File,
        cipher: &ChunkCipher,
        layout: &BlobLayout,
        max: usize,
    ) -> io::Result<Vec<u8>> {
        let out = seal_range(
            src,
            cipher,
            layout,
            self.at,
            max,
            Some((&mut self.plain, &mut self.next_chunk)),
        )?;
        self.sealed.update(&out);
        self.at += out.len() as u64;
        Ok(out)
    }

    /// Hashes the blob up to `to` without sending it: an upload resumed at
    /// `to` by a process that did not send what the relay holds (after a
    /// restart) re-encrypts that part once.
    pub fn catch_up(
        &mut self,
        src: &File,
        cipher: &ChunkCipher,
        layout: &BlobLayout,
        to: u64,
    ) -> io::Result<()> {
        if self.at > to {
            *self = Self::default();
        }
        while self.at < to {
            let n = piece_len(layout, self.at).min((to - self.at) as usize);
            if n == 0 {
                break;
            }
            let piece = self.seal_next(src, cipher, layout, n)?;
            buffers::give(piece);
        }
        Ok(())
    }

    /// Once the whole blob is hashed: (BLAKE3 of the file, of the blob).
    pub fn finish(&self) -> (blake3::Hash, blake3::Hash) {
        (self.plain.finalize(), self.sealed.finalize())
    }
}

/// The bytes `[offset, offset + max)` of a repair blob: the sealed chunks
/// `chunks` (in that order) of the file's blob, re-encrypted from `src`.
pub fn repair_range(
    src: &File,
    cipher: &ChunkCipher,
    layout: &BlobLayout,
    chunks: &[u64],
    offset: u64,
    max: usize,
) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(max.min(MAX_BLOB_PIECE));
    let mut pos = 0u64;
    let mut buf = Vec::with_capacity(layout.chunk_size as usize + blob::TAG_LEN as usize);
    for &i in chunks {
        let len = layout.sealed_len(i);
        if pos + len <= offset {
            pos += len;
            continue;
        }
        if out.len() >= max {
            break;
        }
        let n = layout.plain_len(i) as usize;
        buf.clear();
        buf.resize(n, 0);
        let data = layout.data_in(i) as usize;
        src.read_exact_at(&mut buf[..data], i * layout.chunk_size as u64)?;
        blob::seal_chunk(cipher, i, i + 1 == layout.chunk_count(), &mut buf);
        let skip = offset.saturating_sub(pos) as usize;
        let take = (buf.len() - skip).min(max - out.len());
        out.extend_from_slice(&buf[skip..skip + take]);
        pos += len;
    }
    Ok(out)
}

/// Length and BLAKE3 of a repair blob, computed one chunk at a time.
pub fn repair_summary(
    src: &File,
    cipher: &ChunkCipher,
    layout: &BlobLayout,
    chunks: &[u64],
) -> io::Result<(u64, blake3::Hash)> {
    let mut h = blake3::Hasher::new();
    let mut len = 0u64;
    for (k, _) in chunks.iter().enumerate() {
        let piece = repair_range(src, cipher, layout, &chunks[k..=k], 0, usize::MAX >> 1)?;
        len += piece.len() as u64;
        h.update(&piece);
    }
    Ok((len, h.finalize()))
}

/// The largest whole number of chunks from `offset` that fits a piece:
/// pieces end on chunk boundaries so a resumed upload re-encrypts at most
/// one chunk it had already sent.
pub fn piece_len(layout: &BlobLayout, offset: u64) -> usize {
    let enc = layout.chunk_size as u64 + blob::TAG_LEN;
    let total = layout.blob_len();
    let first = offset / enc;
    let chunk_end = ((first + chunks_per_piece(layout)) * enc).min(total);
    (chunk_end.saturating_sub(offset) as usize).min(MAX_BLOB_PIECE)
}
