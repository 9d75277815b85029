//! The receiving side: pieces opened and written around the page cache into the partial file by a sink thread, the read-back that verifies the whole file from the device, and the chunks that failed.

use super::*;

/// The partial file of a download, beside where the file will land: named
/// by its sender and blob id (each sender chooses its own blob ids, so two
/// senders' downloads never share a partial file).
pub fn part_path(dir: &Path, sender: &[u8; 32], blob_id: &[u8; 16]) -> PathBuf {
    dir.join(format!(
        ".sealpost-part-{}-{}",
        sealpost_proto::hex(sender),
        sealpost_proto::hex(blob_id)
    ))
}

/// Where a download's partial file was kept before its name had the
/// sender's key (a download under way across the upgrade is moved from
/// there).
pub fn legacy_part_path(dir: &Path, blob_id: &[u8; 16]) -> PathBuf {
    dir.join(format!(".sealpost-part-{}", sealpost_proto::hex(blob_id)))
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
pub(crate) fn open_direct(path: &Path, access: rustix::fs::OFlags) -> io::Result<File> {
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

/// Largest run of plaintext written at once (a relay piece's worth).
pub(crate) const DIRECT_MAX: usize = 1 << 20;

/// What a run's aligned buffer holds: a run plus the last chunk's tag,
/// wherever the aligned start falls.
pub(crate) const RUN_BUFFER: usize = DIRECT_MAX + 2 * DIRECT_ALIGN;

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
            let opened = cipher
                .open_in_place(layout, i, sealed)
                .and_then(|len| blob::check_padding(layout, i, &sealed[..len]));
            match opened {
                Ok(len) => run += len,
                Err(_) => {
                    out.bad.push(i);
                    in_run = false;
                }
            }
        } else {
            in_run = false;
            let opened = cipher
                .open_in_place(layout, i, &mut data[at..end])
                .and_then(|len| blob::check_padding(layout, i, &data[at..at + len]));
            match opened {
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

pub(crate) enum SinkJob {
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
pub(crate) const SINK_QUEUE: usize = 4;

/// Opened pieces waiting for the writing thread at most.
pub(crate) const OPENED_QUEUE: usize = 2;

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
pub(crate) struct Reader {
    direct: Option<File>,
    file: File,
    hasher: blake3::Hasher,
    done: u64,
    buf: buffers::AlignedBuf,
}

pub(crate) const READ_PIECE: usize = 1 << 20;

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
pub(crate) fn file_id(f: &File) -> io::Result<(u64, u64)> {
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
