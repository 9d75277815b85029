//! File transfers: a file travels as an encrypted blob (64 KiB AEAD chunks,
//! PROTOCOL.md §5) uploaded to the recipient's relay, then a sealed
//! manifest naming it. Everything here runs at constant memory (one piece
//! of at most 1 MiB at a time) and resumes where it stopped:
//!
//! - **upload** asks the relay how much of the blob it has stored and
//!   continues from there, re-encrypting from the source file (a chunk's
//!   ciphertext depends only on the key, its index and its bytes);
//! - **download** writes the decrypted chunks into a partial file in the
//!   download directory, commits its progress every few MiB (after an
//!   fsync), and continues from the last committed chunk;
//! - **completion**: the partial file is fsync'd, its pages dropped, read
//!   back and hashed; only a match with the signed manifest hash moves it
//!   under its final name (never over an existing file) and earns the
//!   sender a receipt carrying that hash.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sealpost_proto::blob::{self, BlobLayout, ChunkCipher};
use sealpost_proto::buffers;
use sealpost_proto::relay::MAX_BLOB_PIECE;

/// Progress reports for long transfers (the CLI draws bars with them).
pub trait Progress: Send + Sync {
    /// A stage starts: `what` names it, `total` is its size in bytes and
    /// `done` what was already done before (a resumed transfer).
    fn start(&self, what: &str, total: u64, done: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// A progress display fed blob bytes (sealed chunks) that shows file
/// bytes: a 6-byte file is 6 B, not its 22 sealed bytes.
pub struct FileBytes {
    inner: std::sync::Arc<dyn Progress>,
    layout: BlobLayout,
    at: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBytes")
            .field("layout", &self.layout)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

impl FileBytes {
    pub fn new(inner: std::sync::Arc<dyn Progress>, layout: BlobLayout) -> Self {
        Self {
            inner,
            layout,
            at: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Progress for FileBytes {
    fn start(&self, what: &str, _total: u64, done: u64) {
        self.at.store(done, std::sync::atomic::Ordering::Relaxed);
        self.inner.start(
            what,
            self.layout.plaintext_len,
            self.layout.plain_before(done),
        );
    }
    fn advance(&self, bytes: u64) {
        let before = self
            .at
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let shown = self.layout.plain_before(before + bytes) - self.layout.plain_before(before);
        self.inner.advance(shown);
    }
    fn finish(&self) {
        self.inner.finish();
    }
}

/// No progress display.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

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
const PARALLEL_HASH_MIN: u64 = 8 << 20;

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
fn hash_range(file: &File, from: u64, to: u64, h: &mut blake3::Hasher) -> io::Result<()> {
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
fn seal_range(
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
    // Chunks are read and encrypted in place in the piece's own (reused)
    // buffer: no copy per chunk, no allocation per piece.
    let mut out = buffers::take(max + enc as usize);
    let mut i = first;
    while i < layout.chunk_count() && out.len() < max + skip {
        let n = layout.plain_len(i) as usize;
        let at = out.len();
        out.resize(at + n + blob::TAG_LEN as usize, 0);
        src.read_exact_at(&mut out[at..at + n], i * layout.chunk_size as u64)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("the file changed or shrank since it was queued: {e}"),
                )
            })?;
        if let Some((h, next)) = plain.as_mut() {
            if i == **next {
                h.update(&out[at..at + n]);
                **next += 1;
            }
        }
        cipher.seal_in_place(i, i + 1 == layout.chunk_count(), &mut out[at..]);
        i += 1;
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
        src.read_exact_at(&mut buf, i * layout.chunk_size as u64)?;
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

/// The partial file of a download, beside where the file will land.
pub fn part_path(dir: &Path, blob_id_hex: &str) -> PathBuf {
    dir.join(format!(".sealpost-part-{blob_id_hex}"))
}

/// Opens (or creates) a partial file and cuts it to `keep` bytes: bytes
/// past the last committed chunk were not verified durable, so they are
/// written again.
pub fn open_part(path: &Path, keep: u64) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a symbolic link, never anything but a regular file.
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    f.set_len(keep)?;
    Ok(f)
}

/// Decrypts the chunks `first..` held in `data` (whole sealed chunks) and
/// writes their plaintext at their place in `part`. Returns the indexes of
/// chunks that did not authenticate (damaged at the relay or on the way);
/// their place is left as it was.
pub fn write_chunks(
    part: &File,
    cipher: &ChunkCipher,
    layout: &BlobLayout,
    first: u64,
    data: &mut [u8],
) -> io::Result<Vec<u64>> {
    PartWriter::buffered(part.try_clone()?).write_chunks(cipher, layout, first, data)
}

/// Opens `path` for direct I/O (`O_DIRECT`), `access` being `RDONLY` or
/// `WRONLY`; file systems that refuse it (tmpfs, some network file
/// systems) fail here and the callers go through the page cache.
fn open_direct(path: &Path, access: rustix::fs::OFlags) -> io::Result<File> {
    let flags = access | rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::CLOEXEC;
    Ok(File::from(rustix::fs::open(
        path,
        flags,
        rustix::fs::Mode::empty(),
    )?))
}

/// Chunks opened (decrypted and authenticated) and ready to be written:
/// the good chunks from the piece's start gathered in a 4 KiB-aligned
/// buffer (`run`), the others opened in place in the piece's own bytes
/// (`loose`), and the chunks that did not authenticate.
#[derive(Debug, Default)]
pub struct OpenedPiece {
    /// (aligned buffer, file offset, length) of the gathered run.
    run: Option<(buffers::AlignedBuf, u64, usize)>,
    /// (file offset, range in the piece's bytes) of each other good chunk.
    loose: Vec<(u64, std::ops::Range<usize>)>,
    /// Chunks that did not authenticate (damaged at the relay or on the
    /// way); their place in the file is left as it was.
    pub bad: Vec<u64>,
}

// The alignment O_DIRECT needs for offsets, lengths and memory.
use sealpost_proto::buffers::DIRECT_ALIGN;
/// Largest run of plaintext written at once (a relay piece's worth).
const DIRECT_MAX: usize = 1 << 20;
/// What a run's aligned buffer holds: a run plus the last chunk's tag,
/// wherever the aligned start falls.
const RUN_BUFFER: usize = DIRECT_MAX + 2 * DIRECT_ALIGN;

/// Opens the sealed chunks `first..` of a downloaded piece, held in
/// `data`. With `gather` (the partial file takes `O_DIRECT` writes, see
/// [`PartWriter::is_direct`]), a piece whose place in the file is 4 KiB
/// aligned (every relay piece: 15 chunks = 240 × 4 KiB of plaintext) is
/// copied once into an aligned buffer (a reused one, see
/// [`buffers::take_aligned`]) and opened there, ready for one direct
/// write; a damaged chunk ends that run, and what follows it is opened in
/// place.
pub fn open_piece(
    cipher: &ChunkCipher,
    layout: &BlobLayout,
    gather: bool,
    first: u64,
    data: &mut [u8],
) -> OpenedPiece {
    let cs = layout.chunk_size as u64;
    let base = first * cs;
    let mut out = OpenedPiece::default();
    let gather = gather && base.is_multiple_of(DIRECT_ALIGN as u64);
    let mut run_buf = None;
    let mut run = 0usize;
    let mut in_run = gather;
    let (mut at, mut i) = (0usize, first);
    while at < data.len() && i < layout.chunk_count() {
        let end = (at + layout.sealed_len(i) as usize).min(data.len());
        let plain = layout.plain_len(i) as usize;
        if in_run && run + plain <= DIRECT_MAX {
            let b = run_buf.get_or_insert_with(|| buffers::take_aligned(RUN_BUFFER));
            let sealed = &mut b.slice_mut(RUN_BUFFER)[run..run + (end - at)];
            sealed.copy_from_slice(&data[at..end]);
            match cipher.open_in_place(layout, i, sealed) {
                Ok(len) => run += len,
                Err(_) => {
                    out.bad.push(i);
                    in_run = false;
                }
            }
        } else {
            in_run = false;
            match cipher.open_in_place(layout, i, &mut data[at..end]) {
                Ok(len) => out.loose.push((i * cs, at..at + len)),
                Err(_) => out.bad.push(i),
            }
        }
        at = end;
        i += 1;
    }
    if let Some(b) = run_buf {
        out.run = Some((b, base, run));
    }
    out
}

/// Writes opened chunks into a partial file: a gathered run whose length
/// is 4 KiB aligned with one `O_DIRECT` write where the file system allows
/// it (instead of copying it into the page cache, which with three
/// processes on two cores costs the recipient more CPU than decrypting),
/// everything else through the page cache. Durability is unchanged: the
/// caller fsyncs before it commits progress.
#[derive(Debug)]
pub struct PartWriter {
    file: File,
    direct: Option<File>,
}

impl PartWriter {
    /// A writer that never uses `O_DIRECT`.
    pub fn buffered(file: File) -> Self {
        Self { file, direct: None }
    }

    /// A writer for the partial file at `path` (already open as `file`).
    pub fn new(file: File, path: &Path) -> Self {
        let direct = open_direct(path, rustix::fs::OFlags::WRONLY).ok();
        Self { file, direct }
    }

    /// Whether runs of chunks go to the device directly.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Writes `opened`, whose loose chunks are in `data`; gives back the
    /// run's buffer for the next piece.
    pub fn write(
        &mut self,
        opened: &mut OpenedPiece,
        data: &[u8],
    ) -> io::Result<Option<buffers::AlignedBuf>> {
        let mut back = None;
        if let Some((buf, base, len)) = opened.run.take() {
            let bytes = &buf.slice(len)[..len];
            let direct = match &self.direct {
                Some(d) if len.is_multiple_of(DIRECT_ALIGN) && len > 0 => {
                    d.write_all_at(bytes, base).is_ok()
                }
                _ => false,
            };
            if !direct {
                if len.is_multiple_of(DIRECT_ALIGN) && len > 0 {
                    // Refused (EINVAL on some file systems): buffered from
                    // now on.
                    self.direct = None;
                }
                self.file.write_all_at(bytes, base)?;
            }
            back = Some(buf);
        }
        for (at, range) in opened.loose.drain(..) {
            self.file.write_all_at(&data[range], at)?;
        }
        Ok(back)
    }

    /// Opens the sealed chunks `first..` held in `data` and writes their
    /// plaintext at their place; the chunks that did not authenticate.
    pub fn write_chunks(
        &mut self,
        cipher: &ChunkCipher,
        layout: &BlobLayout,
        first: u64,
        data: &mut [u8],
    ) -> io::Result<Vec<u64>> {
        let mut opened = open_piece(cipher, layout, self.is_direct(), first, data);
        if let Some(b) = self.write(&mut opened, data)? {
            buffers::give_aligned(b);
        }
        Ok(opened.bad)
    }
}

/// What a [`PieceSink`] reports, in the order its work was asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum SinkEvent {
    /// The piece at this offset of the blob is written; the chunks that
    /// did not authenticate.
    Written(u64, Vec<u64>),
    /// Everything put before the checkpoint is on stable storage (the
    /// file was fsync'd); the value given with it.
    Durable(u64),
}

enum SinkJob {
    Piece(u64, u64, Vec<u8>),
    Checkpoint(u64),
}

/// Opens and writes downloaded pieces on two threads of their own while
/// the engine goes on receiving the next pieces: one decrypts a piece
/// while the other writes the previous one (an `O_DIRECT` write blocks
/// until the device has the data; doing both on one thread left the
/// device idle while decrypting and the core idle while writing).
/// Checkpoints fsync the file after every piece put before them, on the
/// writing thread, so the engine does not wait for the device to commit
/// its progress. Pieces are written, and everything reported, in the
/// order it was put.
pub struct PieceSink {
    jobs: Option<std::sync::mpsc::SyncSender<SinkJob>>,
    done: std::sync::mpsc::Receiver<io::Result<SinkEvent>>,
    pending: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for PieceSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PieceSink({} pending)", self.pending)
    }
}

/// Pieces queued for the decrypting thread at most (about 1 MiB each).
const SINK_QUEUE: usize = 4;
/// Opened pieces waiting for the writing thread at most.
const OPENED_QUEUE: usize = 2;

impl PieceSink {
    pub fn start(
        mut writer: PartWriter,
        cipher: ChunkCipher,
        layout: BlobLayout,
    ) -> io::Result<Self> {
        type Opened = (u64, OpenedPiece, Vec<u8>);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<SinkJob>(SINK_QUEUE);
        let (to_writer, opened) =
            std::sync::mpsc::sync_channel::<Result<Opened, u64>>(OPENED_QUEUE);
        let (tx, done) = std::sync::mpsc::channel();
        let gather = writer.is_direct();
        let open = std::thread::Builder::new()
            .name("sealpost-open".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let next = match job {
                        SinkJob::Piece(offset, first, mut data) => {
                            let opened = open_piece(&cipher, &layout, gather, first, &mut data);
                            // The piece's own bytes are needed only for
                            // chunks opened in place; else reused now.
                            let data = if opened.loose.is_empty() {
                                buffers::give(data);
                                Vec::new()
                            } else {
                                data
                            };
                            Ok((offset, opened, data))
                        }
                        SinkJob::Checkpoint(v) => Err(v),
                    };
                    if to_writer.send(next).is_err() {
                        break;
                    }
                }
            })?;
        let write = std::thread::Builder::new()
            .name("sealpost-write".into())
            .spawn(move || {
                while let Ok(next) = opened.recv() {
                    let event = match next {
                        Ok((offset, mut piece, data)) => {
                            let r = writer.write(&mut piece, &data);
                            buffers::give(data);
                            r.map(|buf| {
                                if let Some(b) = buf {
                                    buffers::give_aligned(b);
                                }
                                SinkEvent::Written(offset, piece.bad)
                            })
                        }
                        Err(v) => writer.file.sync_data().map(|()| SinkEvent::Durable(v)),
                    };
                    if tx.send(event).is_err() {
                        break;
                    }
                }
            });
        let write = match write {
            Ok(t) => t,
            Err(e) => {
                drop(jobs);
                let _ = open.join();
                return Err(e);
            }
        };
        Ok(Self {
            jobs: Some(jobs),
            done,
            pending: 0,
            threads: vec![open, write],
        })
    }

    fn send(&mut self, job: SinkJob) -> io::Result<()> {
        match self.jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => {
                self.pending += 1;
                Ok(())
            }
            _ => Err(io::Error::other("the writing thread stopped")),
        }
    }

    /// Queues the sealed chunks `first..` held in `data`, the piece at
    /// `offset` of the blob (waits while the queue is full).
    pub fn put(&mut self, offset: u64, first: u64, data: Vec<u8>) -> io::Result<()> {
        self.send(SinkJob::Piece(offset, first, data))
    }

    /// Asks for everything put so far to be made durable; reported as
    /// [`SinkEvent::Durable`] with `value` once it is.
    pub fn checkpoint(&mut self, value: u64) -> io::Result<()> {
        self.send(SinkJob::Checkpoint(value))
    }

    /// What was done since the last call, without waiting.
    pub fn events(&mut self) -> io::Result<Vec<SinkEvent>> {
        let mut out = Vec::new();
        while let Ok(r) = self.done.try_recv() {
            self.pending -= 1;
            out.push(r?);
        }
        Ok(out)
    }

    /// Waits until everything asked for is done; what was not reported
    /// yet.
    pub fn drain(&mut self) -> io::Result<Vec<SinkEvent>> {
        let mut out = Vec::new();
        while self.pending > 0 {
            match self.done.recv() {
                Ok(r) => {
                    self.pending -= 1;
                    out.push(r?);
                }
                Err(_) => return Err(io::Error::other("the writing thread stopped")),
            }
        }
        Ok(out)
    }
}

impl Drop for PieceSink {
    fn drop(&mut self) {
        // Nothing may still be writing once the download is left (a next
        // pass cuts the partial file back to its committed length).
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads a partial file back from storage in order, hashing it: with
/// `O_DIRECT` where the file system allows it (the bytes come from the
/// device, not from any cache, and are not copied into the page cache on
/// the way); elsewhere (tmpfs, some network file systems) each range's
/// cached pages are dropped (`posix_fadvise(DONTNEED)`) before it is read,
/// so a buffered read comes from the device as well. Only ranges already
/// made durable are given to it.
struct Reader {
    direct: Option<File>,
    file: File,
    hasher: blake3::Hasher,
    done: u64,
    buf: buffers::AlignedBuf,
}

const READ_PIECE: usize = 1 << 20;

impl Reader {
    fn open(part: &File, path: &Path) -> io::Result<Self> {
        let direct = open_direct(path, rustix::fs::OFlags::RDONLY).ok();
        Ok(Self {
            direct,
            file: part.try_clone()?,
            hasher: blake3::Hasher::new(),
            done: 0,
            buf: buffers::AlignedBuf::new(READ_PIECE),
        })
    }

    /// Reads and hashes `[done, upto)`; `upto` must be a multiple of 4 KiB
    /// unless it is the file's end.
    fn read_to(&mut self, upto: u64, progress: &dyn Progress) -> io::Result<()> {
        if self.direct.is_none() && upto > self.done {
            let _ = rustix::fs::fadvise(
                &self.file,
                self.done,
                std::num::NonZeroU64::new(upto - self.done),
                rustix::fs::Advice::DontNeed,
            );
        }
        while self.done < upto {
            let want = ((upto - self.done) as usize).min(READ_PIECE);
            let n = match &self.direct {
                // Direct reads take whole blocks; the file's last one
                // comes back short.
                Some(d) => {
                    let whole = buffers::round_up_aligned(want as u64) as usize;
                    d.read_at(self.buf.slice_mut(whole), self.done)
                }
                None => self.file.read_at(self.buf.slice_mut(want), self.done),
            };
            let n = match n {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the partial file is shorter than the file",
                    ))
                }
                Ok(n) => n.min(want),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.hasher.update(&self.buf.slice(n)[..n]);
            self.done += n as u64;
            progress.advance(n as u64);
        }
        Ok(())
    }
}

/// Makes the partial file durable, drops its cached pages and reads it
/// back from storage, hashing it. Calls `progress` per MiB read.
pub fn read_back(
    part: &File,
    path: &Path,
    len: u64,
    progress: &dyn Progress,
) -> io::Result<blake3::Hash> {
    part.sync_all()?;
    let mut r = Reader::open(part, path)?;
    r.read_to(len, progress)?;
    Ok(r.hasher.finalize())
}

/// The read-back of a download, done while it downloads: a thread reads
/// each range back from storage as soon as it was made durable (the
/// download fsyncs every 16 MiB), so that when the last chunk is written
/// only the last range is left to read, instead of the whole file. Every
/// byte is still read back from the device after its fsync, in order,
/// into one BLAKE3; the hash is only meaningful if nothing already read
/// back is written again (no damaged chunk was repaired meanwhile), which
/// is the caller's to check.
pub struct ReadBack {
    tx: Option<std::sync::mpsc::Sender<u64>>,
    thread: Option<std::thread::JoinHandle<io::Result<Reader>>>,
    /// The partial file read (device, inode).
    file_id: (u64, u64),
    /// The largest length given to `durable`.
    durable: u64,
}

/// Which file `f` is: its device and inode.
fn file_id(f: &File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

impl std::fmt::Debug for ReadBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadBack")
    }
}

impl ReadBack {
    pub fn start(part: &File, path: &Path) -> io::Result<Self> {
        let file_id = file_id(part)?;
        let mut r = Reader::open(part, path)?;
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let thread = std::thread::Builder::new()
            .name("sealpost-read-back".into())
            .spawn(move || {
                while let Ok(mut upto) = rx.recv() {
                    // Catch up with the latest durable length at once.
                    while let Ok(later) = rx.try_recv() {
                        upto = upto.max(later);
                    }
                    r.read_to(buffers::round_down_aligned(upto), &Quiet)?;
                }
                Ok(r)
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            file_id,
            durable: 0,
        })
    }

    /// Whether this read-back can go on for a later pass of the same
    /// download: `part` is still the file it reads (not one created anew),
    /// nothing it may have read back was cut off (`committed`, the durable
    /// length the pass starts from, is not below what it was given) and its
    /// thread has not stopped on an error. Otherwise the pass starts a new
    /// read-back from the file's start.
    pub fn continues(&self, part: &File, committed: u64) -> bool {
        committed >= self.durable
            && self.thread.as_ref().is_some_and(|t| !t.is_finished())
            && file_id(part).is_ok_and(|id| id == self.file_id)
    }

    /// The file's bytes `[0, upto)` were written and fsync'd.
    pub fn durable(&mut self, upto: u64) {
        self.durable = self.durable.max(upto);
        if let Some(tx) = &self.tx {
            let _ = tx.send(upto);
        }
    }

    /// Every byte was written and fsync'd: reads what is left up to `len`
    /// (showing `progress`) and gives the hash of the whole file as read
    /// back.
    pub fn finish(
        mut self,
        what: &str,
        len: u64,
        progress: &dyn Progress,
    ) -> io::Result<blake3::Hash> {
        self.tx.take();
        let mut r = match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r?,
            _ => return Err(io::Error::other("the read-back thread failed")),
        };
        progress.start(what, len, r.done);
        r.read_to(len, progress)?;
        Ok(r.hasher.finalize())
    }
}

impl Drop for ReadBack {
    fn drop(&mut self) {
        // A download left for later: the thread ends after its current
        // range.
        self.tx.take();
    }
}

/// The longest file name (bytes) the file systems sealpost writes to take.
pub const NAME_MAX: usize = 255;
/// How many names [`place`] tries for one file: `name`, `name (1)`, …
pub const MAX_NAME_TRIES: usize = 1000;
/// The prefix of the agent's own files in a download directory (partial
/// files); a received file's name never starts with it.
pub const OWN_PREFIX: &str = ".sealpost-";

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The names to try, in order, for a received file called `name`: `name`,
/// then `name (1)` … `name (999)` (before the extension), each cut to fit
/// [`NAME_MAX`] bytes. A name starting with [`OWN_PREFIX`] (which a sender
/// could use to reach a partial file) gets a leading `_`.
pub fn candidate_names(name: &str) -> impl Iterator<Item = String> + '_ {
    let owned = name.starts_with(OWN_PREFIX);
    let (stem, ext) = match name.rfind('.') {
        // An extension is short; a long "extension" is part of the name.
        Some(i) if i > 0 && name.len() - i <= 32 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    (0..MAX_NAME_TRIES).map(move |k| {
        let prefix = if owned { "_" } else { "" };
        let suffix = if k == 0 {
            ext.to_owned()
        } else {
            format!(" ({k}){ext}")
        };
        let room = NAME_MAX - prefix.len() - suffix.len();
        format!("{prefix}{}{suffix}", cut(stem, room))
    })
}

/// Gives the verified file at `part` a name in `dir` that nothing has yet
/// (see [`candidate_names`]) by hard-linking it there: the link fails if
/// anything at all holds the name (a file, a directory, a dangling
/// symbolic link, a file created a moment ago), so a received file never
/// replaces or follows anything, and every name is tried once. `None` if
/// all are taken.
pub fn place(part: &Path, dir: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    for candidate in candidate_names(name) {
        let p = dir.join(&candidate);
        match std::fs::hard_link(part, &p) {
            Ok(()) => return Ok(Some(p)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use sealpost_proto::blob::BlobKey;

    /// Hashing a file on two threads (subtrees merged) gives BLAKE3 of the
    /// file, at sizes around the split points: one thread below 8 MiB, the
    /// root's two subtrees, the left one split when the right is small.
    #[test]
    fn files_hash_to_blake3_whatever_the_split() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        let max = 24 << 20;
        let data: Vec<u8> = (0..max + 5).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let f = File::open(&path).expect("open");
        for size in [
            0usize,
            1,
            1024,
            1025,
            (8 << 20) - 1,
            8 << 20,
            (8 << 20) + 1,
            (8 << 20) + 1024,
            (11 << 20) + 7,
            (12 << 20) + 3,
            16 << 20,
            (16 << 20) + 1,
            (20 << 20) + 4096,
            max + 5,
        ] {
            assert_eq!(
                hash_file(&f, size as u64).expect("hash"),
                blake3::hash(&data[..size]),
                "size {size}"
            );
        }
    }

    /// Pieces sealed in order give the blob's bytes and, at the end, the
    /// file's and the blob's hashes; catching up to any length (as a
    /// restarted sender does) and going on gives the same.
    #[test]
    fn upload_hashes_match_the_blob_from_any_resume_point() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("f");
        for size in [0usize, 1, 4096, 70_000, 2_500_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 13 % 241) as u8).collect();
            std::fs::write(&src, &data).expect("write");
            let key = BlobKey::random(&mut OsRng);
            let mut whole = Vec::new();
            let s = blob::seal_blob(&key, 4096, &data[..], &mut whole).expect("seal");
            let f = File::open(&src).expect("open");
            let cipher = key.cipher();
            let total = s.layout.blob_len();
            // Resume points: the start, piece ends, odd places, the end.
            let first = piece_len(&s.layout, 0) as u64;
            for resume in [0, first.min(total), 4113.min(total), total / 2, total] {
                let mut h = UploadHashes::default();
                h.catch_up(&f, &cipher, &s.layout, resume)
                    .expect("catch up");
                assert_eq!(h.at(), resume);
                let mut sent = Vec::new();
                while h.at() < total {
                    let n = piece_len(&s.layout, h.at());
                    sent.extend(h.seal_next(&f, &cipher, &s.layout, n).expect("seal"));
                }
                assert_eq!(
                    sent,
                    whole[resume as usize..],
                    "size {size} resume {resume}"
                );
                assert_eq!(
                    h.finish(),
                    (s.plaintext_hash, s.blob_hash),
                    "size {size} resume {resume}"
                );
            }
            // Hashes ahead of the relay's length start over.
            let mut h = UploadHashes::default();
            h.catch_up(&f, &cipher, &s.layout, total)
                .expect("to the end");
            h.catch_up(&f, &cipher, &s.layout, total / 3).expect("back");
            assert_eq!(h.at(), total / 3);
            while h.at() < total {
                let n = piece_len(&s.layout, h.at());
                h.seal_next(&f, &cipher, &s.layout, n).expect("seal");
            }
            assert_eq!(h.finish(), (s.plaintext_hash, s.blob_hash));
        }
    }

    /// Pieces written through `PartWriter` (O_DIRECT where the file system
    /// takes it, here ext4 or tmpfs) give back the file, and a damaged chunk
    /// anywhere in a piece is reported and does not stop the others.
    #[test]
    fn direct_piece_writes_rebuild_the_file_and_report_damage() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("tmp");
        let cs = 65_536u32;
        for size in [0usize, 1, 65_536, 983_040, 983_041, 3 * 983_040 + 70_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let key = BlobKey::random(&mut OsRng);
            let mut whole = Vec::new();
            let s = blob::seal_blob(&key, cs, &data[..], &mut whole).expect("seal");
            for damage in [None, Some(0u64), Some(7), Some(16)] {
                let path = dir.path().join(format!("p{size}-{damage:?}"));
                let part = open_part(&path, 0).expect("part");
                let mut w = PartWriter::new(part.try_clone().expect("clone"), &path);
                let mut blob_bytes = whole.clone();
                let damaged = damage.filter(|&c| c < s.layout.chunk_count());
                if let Some(c) = damaged {
                    blob_bytes[(c * s.layout.sealed_len(0)) as usize] ^= 1;
                }
                let mut off = 0u64;
                let mut bad = Vec::new();
                while off < s.layout.blob_len() {
                    let n = piece_len(&s.layout, off);
                    let first = off / s.layout.sealed_len(0);
                    bad.extend(
                        w.write_chunks(
                            &key.cipher(),
                            &s.layout,
                            first,
                            &mut blob_bytes[off as usize..off as usize + n],
                        )
                        .expect("write"),
                    );
                    off += n as u64;
                }
                part.sync_all().expect("sync");
                assert_eq!(bad, damaged.into_iter().collect::<Vec<_>>(), "size {size}");
                let got = std::fs::read(&path).expect("read");
                for c in 0..s.layout.chunk_count() {
                    let lo = (c * cs as u64) as usize;
                    let hi = (lo + cs as usize).min(data.len());
                    if Some(c) != damaged && hi <= got.len() {
                        assert_eq!(got[lo..hi], data[lo..hi], "size {size} chunk {c}");
                    }
                }
                if damaged.is_none() {
                    assert_eq!(got, data, "size {size}");
                }
            }
        }
    }

    /// The sink's two threads write every piece where it belongs and
    /// report, in the order asked: each piece with its damaged chunks, and
    /// each checkpoint after the pieces put before it.
    #[test]
    fn the_piece_sink_reports_in_order_and_rebuilds_the_file() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("tmp");
        let cs = 65_536u32;
        let size = 7 * 983_040 + 12_345;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 249) as u8).collect();
        let key = BlobKey::random(&mut OsRng);
        let mut whole = Vec::new();
        let s = blob::seal_blob(&key, cs, &data[..], &mut whole).expect("seal");
        // One damaged chunk, in the middle of the third piece.
        let damaged = 2 * 15 + 7;
        whole[(damaged * s.layout.sealed_len(0)) as usize + 100] ^= 1;
        let path = dir.path().join("part");
        let part = open_part(&path, 0).expect("part");
        let w = PartWriter::new(part.try_clone().expect("clone"), &path);
        let mut sink = PieceSink::start(w, key.cipher(), s.layout).expect("sink");
        let (mut off, mut expected, mut k) = (0u64, Vec::new(), 0u64);
        while off < s.layout.blob_len() {
            let n = piece_len(&s.layout, off);
            let first = off / s.layout.sealed_len(0);
            sink.put(off, first, whole[off as usize..off as usize + n].to_vec())
                .expect("put");
            let bad = if (first..first + 15).contains(&damaged) {
                vec![damaged]
            } else {
                vec![]
            };
            expected.push(SinkEvent::Written(off, bad));
            off += n as u64;
            k += 1;
            if k % 3 == 0 {
                sink.checkpoint(k).expect("checkpoint");
                expected.push(SinkEvent::Durable(k));
            }
        }
        let mut got = sink.events().expect("events");
        got.extend(sink.drain().expect("drain"));
        assert_eq!(got, expected);
        drop(sink);
        let file = std::fs::read(&path).expect("read");
        assert_eq!(file.len(), size);
        for c in 0..s.layout.chunk_count() {
            let lo = (c * cs as u64) as usize;
            let hi = (lo + cs as usize).min(size);
            if c != damaged {
                assert_eq!(file[lo..hi], data[lo..hi], "chunk {c}");
            }
        }
    }

    /// Read back while writing: ranges handed over as they become durable
    /// (at any offset, out of step with the writes, or not at all), then
    /// the rest at the end, hash to the whole file.
    #[test]
    fn reading_back_while_writing_hashes_the_whole_file() {
        let dir = tempfile::tempdir().expect("tmp");
        for size in [0usize, 1, 4095, 4096, 5_000_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 11 % 253) as u8).collect();
            for marks in [vec![], vec![1usize, 4096, 4097, 3_000_001], vec![size]] {
                let path = dir.path().join(format!("r{size}-{}", marks.len()));
                let part = open_part(&path, 0).expect("part");
                let mut rb = ReadBack::start(&part, &path).expect("start");
                let mut at = 0usize;
                for &m in marks.iter().filter(|&&m| m <= size) {
                    part.write_all_at(&data[at..m.max(at)], at as u64)
                        .expect("w");
                    at = m.max(at);
                    part.sync_data().expect("sync");
                    rb.durable(at as u64);
                }
                part.write_all_at(&data[at..], at as u64).expect("w");
                part.sync_data().expect("sync");
                let h = rb.finish("verify", size as u64, &Quiet).expect("finish");
                assert_eq!(h, blake3::hash(&data), "size {size} marks {marks:?}");
            }
            // A file shorter than announced is an error, not a hash.
            let path = dir.path().join(format!("short{size}"));
            let part = open_part(&path, 0).expect("part");
            part.write_all_at(&data, 0).expect("w");
            let rb = ReadBack::start(&part, &path).expect("start");
            assert!(rb.finish("verify", size as u64 + 1, &Quiet).is_err());
        }
    }

    /// A read-back carried over to the next pass of a download goes on
    /// only for the same file, with nothing it may have read cut off.
    #[test]
    fn a_read_back_continues_only_over_what_it_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("p");
        let data: Vec<u8> = (0..3 * 4096 + 7).map(|i| (i * 5 % 251) as u8).collect();
        let part = open_part(&path, 0).expect("part");
        part.write_all_at(&data[..8192], 0).expect("w");
        part.sync_data().expect("sync");
        let mut rb = ReadBack::start(&part, &path).expect("start");
        rb.durable(8192);
        // The next pass starts from the committed length.
        let again = open_part(&path, 8192).expect("reopen");
        assert!(rb.continues(&again, 8192));
        // A download reset to an earlier length, or a new file under the
        // same name, starts a new read-back.
        assert!(!rb.continues(&again, 4096));
        std::fs::remove_file(&path).expect("rm");
        let fresh = open_part(&path, 8192).expect("new file");
        assert!(!rb.continues(&fresh, 8192));
        // Carried over, it reads the rest and hashes the whole file.
        again.write_all_at(&data[8192..], 8192).expect("w");
        again.sync_data().expect("sync");
        std::fs::remove_file(&path).expect("rm");
        let h = rb
            .finish("verify", data.len() as u64, &Quiet)
            .expect("finish");
        assert_eq!(h, blake3::hash(&data));
    }

    #[test]
    fn ranges_rebuild_the_blob_exactly() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("f");
        for size in [0usize, 1, 4096, 4097, 3 * 4096 + 5] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
            std::fs::write(&src, &data).expect("write");
            let key = BlobKey::random(&mut OsRng);
            let mut whole = Vec::new();
            let s = blob::seal_blob(&key, 4096, &data[..], &mut whole).expect("seal");
            assert_eq!(
                summarize(&src, 4096).expect("sum"),
                (s.layout, s.plaintext_hash)
            );
            let f = File::open(&src).expect("open");
            // Any offset, any length: the same bytes as the whole blob.
            for off in [0u64, 1, 4111, 4112, 4113, whole.len() as u64] {
                for max in [1usize, 5000, 1 << 20] {
                    let got =
                        seal_range(&f, &key.cipher(), &s.layout, off, max, None).expect("range");
                    let lo = (off as usize).min(whole.len());
                    let hi = (lo + max).min(whole.len());
                    assert_eq!(got, whole[lo..hi], "size {size} off {off} max {max}");
                }
            }
            // Pieces cover the blob on chunk boundaries.
            let mut off = 0u64;
            let mut pieces = 0;
            while off < s.layout.blob_len() {
                let n = piece_len(&s.layout, off);
                assert!(n > 0 && n <= MAX_BLOB_PIECE);
                off += n as u64;
                pieces += 1;
            }
            assert!(pieces >= 1);
            // Writing the chunks back gives the file; a flipped byte is
            // reported by chunk index.
            let part = open_part(&dir.path().join("p"), 0).expect("part");
            let mut bad_blob = whole.clone();
            if size > 4096 {
                bad_blob[4112 + 3] ^= 1;
            }
            let bad =
                write_chunks(&part, &key.cipher(), &s.layout, 0, &mut bad_blob).expect("write");
            if size > 4096 {
                assert_eq!(bad, vec![1]);
            } else {
                assert!(bad.is_empty());
                part.set_len(size as u64).expect("len");
                let h = read_back(&part, &dir.path().join("p"), size as u64, &Quiet)
                    .expect("read back");
                assert_eq!(h, blake3::hash(&data));
            }
        }
    }

    #[test]
    fn repair_blobs_are_the_named_chunks_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("f");
        let data: Vec<u8> = (0..5 * 4096 + 9).map(|i| (i * 13) as u8).collect();
        std::fs::write(&src, &data).expect("write");
        let key = BlobKey::random(&mut OsRng);
        let mut whole = Vec::new();
        let s = blob::seal_blob(&key, 4096, &data[..], &mut whole).expect("seal");
        let f = File::open(&src).expect("open");
        let chunks = [1u64, 3, 5];
        let mut want = Vec::new();
        for &c in &chunks {
            let o = s.layout.offset(c) as usize;
            want.extend_from_slice(&whole[o..o + s.layout.sealed_len(c) as usize]);
        }
        let cipher = key.cipher();
        let (len, h) = repair_summary(&f, &cipher, &s.layout, &chunks).expect("sum");
        assert_eq!((len, h), (want.len() as u64, blake3::hash(&want)));
        for off in [0u64, 1, 4112, 4113, want.len() as u64 - 1] {
            for max in [1usize, 4000, 1 << 20] {
                let got = repair_range(&f, &cipher, &s.layout, &chunks, off, max).expect("range");
                let lo = off as usize;
                let hi = (lo + max).min(want.len());
                assert_eq!(got, want[lo..hi], "off {off} max {max}");
            }
        }
    }

    #[test]
    fn placing_never_clobbers_or_follows() {
        let dir = tempfile::tempdir().expect("tmp");
        let part = dir.path().join(".sealpost-part-x");
        std::fs::write(&part, b"new").expect("w");
        let placed = |name: &str| {
            place(&part, dir.path(), name)
                .expect("place")
                .expect("a free name")
        };
        assert_eq!(placed("a.txt"), dir.path().join("a.txt"));
        assert_eq!(placed("a.txt"), dir.path().join("a (1).txt"));
        assert_eq!(placed("noext"), dir.path().join("noext"));
        assert_eq!(placed("noext"), dir.path().join("noext (1)"));
        // A dangling symbolic link holds its name (and is not followed).
        let outside = dir.path().join("outside");
        std::os::unix::fs::symlink(&outside, dir.path().join("link.txt")).expect("symlink");
        assert_eq!(placed("link.txt"), dir.path().join("link (1).txt"));
        assert!(!outside.exists());
        // The agent's own names are out of a sender's reach.
        assert_eq!(
            placed(".sealpost-part-x"),
            dir.path().join("_.sealpost-part-x")
        );
        assert_eq!(std::fs::read(&part).expect("part"), b"new");
    }

    /// Every name tried fits 255 bytes, multi-byte characters are cut
    /// whole, and the same long name received twice gets two names.
    #[test]
    fn long_names_fit_the_file_system() {
        let dir = tempfile::tempdir().expect("tmp");
        let part = dir.path().join(".sealpost-part-y");
        std::fs::write(&part, b"x").expect("w");
        for name in [
            "n".repeat(251) + ".txt",
            "é".repeat(127),
            "n".repeat(255),
            format!(".{}", "e".repeat(254)),
            format!("{}.{}", "a".repeat(200), "b".repeat(54)),
            format!("{}{}", OWN_PREFIX, "p".repeat(245)),
        ] {
            assert!(name.len() <= NAME_MAX);
            for c in candidate_names(&name).take(20) {
                assert!(c.len() <= NAME_MAX, "{c}");
            }
            let a = place(&part, dir.path(), &name)
                .expect("first")
                .expect("name");
            let b = place(&part, dir.path(), &name)
                .expect("second")
                .expect("name");
            assert_ne!(a, b);
        }
        assert_eq!(candidate_names("x").count(), MAX_NAME_TRIES);
    }
}
