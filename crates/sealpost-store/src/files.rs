//! The embedded blob store: one file per blob, pieces written around the
//! page cache (`O_DIRECT`, see `upload`) and made durable with one
//! `fdatasync` per run, reads direct too, removal in steps.

use super::*;
use crate::ledger::BlobStore;

/// Blob files are cut down this much at a time before they are removed.
pub(crate) const REMOVE_STEP: u64 = 16 << 20;

/// Removes a file by cutting it down [`REMOVE_STEP`] at a time first.
/// Freeing a large file's blocks in one go holds the file system's
/// journal: measured here, a 1 GiB blob's `unlink` made a concurrent
/// `fsync` (the database's commits, everyone's acknowledgements) wait up
/// to 30 ms; in 16 MiB steps at most 4 ms, for the same total time.
pub(crate) fn remove_gradually(path: &Path) {
    if let Ok(f) = fs::OpenOptions::new().write(true).open(path) {
        let mut len = f.metadata().map(|m| m.len()).unwrap_or(0);
        while len > 0 {
            len = len.saturating_sub(REMOVE_STEP);
            if f.set_len(len).is_err() {
                break;
            }
        }
    }
    let _ = fs::remove_file(path);
}

/// Uploads whose state is kept between pieces.
pub(crate) const MAX_OPEN_UPLOADS: usize = 64;

/// The blob id a file name in the blob directory stands for, if it is one.
pub(crate) fn blob_id_of_name(name: &str) -> Option<BlobId> {
    if name.len() != 32
        || !name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&name[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(BlobId(id))
}

pub(crate) fn blob_path(dir: &Path, id: &BlobId) -> PathBuf {
    let hex: String = id.0.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(hex)
}

/// Blob files in one directory. What it keeps in memory (open uploads
/// with their running hashes, aligned buffers) is a cache: an upload
/// evicted or lost in a restart is rebuilt from its file and the length
/// the ledger committed.
pub struct FileBlobs {
    dir: PathBuf,
    /// Uploads in progress, at most [`MAX_OPEN_UPLOADS`].
    uploads: Mutex<HashMap<BlobId, Upload>>,
    /// Aligned buffers for direct writes and reads, reused (at most 4).
    bufs: Mutex<Vec<AlignedBuf>>,
    sync_latency: prometheus_client::metrics::histogram::Histogram,
}

impl std::fmt::Debug for FileBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileBlobs({})", self.dir.display())
    }
}

impl FileBlobs {
    /// Blob files in `dir` (created, private); `sync_latency` observes
    /// every `fdatasync` of a run.
    pub fn open(
        dir: &Path,
        sync_latency: prometheus_client::metrics::histogram::Histogram,
    ) -> Result<Self, StoreError> {
        private_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            uploads: Mutex::new(HashMap::new()),
            bufs: Mutex::new(Vec::new()),
            sync_latency,
        })
    }

    pub fn path(&self, id: &BlobId) -> PathBuf {
        blob_path(&self.dir, id)
    }

    fn buf(&self, at_least: usize) -> AlignedBuf {
        self.bufs
            .lock()
            .ok()
            .and_then(|mut b| b.pop())
            .filter(|b| b.capacity() >= at_least)
            .unwrap_or_else(|| {
                AlignedBuf::new(
                    at_least.max(MAX_BLOB_PIECE + 2 * sealpost_proto::buffers::DIRECT_ALIGN),
                )
            })
    }

    fn give_buf(&self, buf: AlignedBuf) {
        if let Ok(mut b) = self.bufs.lock() {
            if b.len() < 4 {
                b.push(buf);
            }
        }
    }

    /// Reads `n` bytes from `offset` of a blob file with `O_DIRECT` into
    /// `out`: the device's bytes land in a reused aligned buffer without
    /// passing through the page cache (pieces were written around it, so
    /// a buffered read would fill the cache and copy out of it: on this
    /// project's machines the copy out of freshly filled cache pages cost
    /// more CPU than anything else the relay did).
    fn read_direct(&self, path: &Path, offset: u64, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        use sealpost_proto::buffers::{round_down_aligned, round_up_aligned};
        use std::os::unix::fs::FileExt;
        let f = upload::open_direct(path, rustix::fs::OFlags::RDONLY)?;
        let start = round_down_aligned(offset);
        let skip = (offset - start) as usize;
        let whole = round_up_aligned(offset + n as u64 - start) as usize;
        let mut buf = self.buf(whole);
        let mut got = 0usize;
        let result = loop {
            if got >= skip + n {
                break Ok(());
            }
            match f.read_at(&mut buf.slice_mut(whole)[got..], start + got as u64) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                // Direct reads come back in whole blocks (or short at the
                // end of the file).
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if result.is_ok() {
            out.extend_from_slice(&buf.slice(skip + n)[skip..]);
        }
        self.give_buf(buf);
        result
    }
}

/// Creates `d` if needed, readable by the relay's user only.
pub(crate) fn private_dir(d: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(d).map_err(io_err("creating", d))?;
    fs::set_permissions(d, fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting permissions on", d))
}

impl BlobStore for FileBlobs {
    fn write_run(
        &self,
        id: &BlobId,
        offset: u64,
        new: bool,
        run: &[BlobPiece],
        complete: bool,
    ) -> io::Result<Option<[u8; 32]>> {
        let path = self.path(id);
        let kept = self.uploads.lock().ok().and_then(|mut m| m.remove(id));
        let mut up = match kept {
            Some(u) if u.stored() == offset => u,
            _ => Upload::open(&path, offset)?,
        };
        let mut buf = self.buf(0);
        let written = (|| {
            for p in run {
                up.write(&p.data, &mut buf)?;
            }
            let t = Instant::now();
            up.sync()?;
            self.sync_latency.observe(t.elapsed().as_secs_f64());
            if new {
                File::open(&self.dir)?.sync_all()?;
            }
            Ok::<_, io::Error>(())
        })();
        self.give_buf(buf);
        written?;
        if complete {
            return Ok(Some(*up.finish()?.as_bytes()));
        }
        if let Ok(mut map) = self.uploads.lock() {
            if map.len() >= MAX_OPEN_UPLOADS {
                if let Some(k) = map.keys().next().copied() {
                    map.remove(&k);
                }
            }
            map.insert(*id, up);
        }
        Ok(None)
    }

    /// With `O_DIRECT` where the file system takes it.
    fn read(&self, id: &BlobId, offset: u64, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let path = self.path(id);
        self.read_direct(&path, offset, n, out).or_else(|_| {
            // The file system refuses direct reads: through the page cache.
            let start = out.len();
            out.resize(start + n, 0);
            let r = File::open(&path).and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.read_exact_at(&mut out[start..], offset)
            });
            if r.is_err() {
                out.truncate(start);
            }
            r
        })
    }

    fn remove(&self, id: &BlobId) {
        if let Ok(mut m) = self.uploads.lock() {
            m.remove(id);
        }
        remove_gradually(&self.path(id));
    }

    /// Only names a blob file can have (32 hex digits) are listed.
    fn older_than(&self, age: Duration) -> io::Result<Vec<BlobId>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(blob_id_of_name) else {
                continue;
            };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a >= age);
            if old {
                out.push(id);
            }
        }
        Ok(out)
    }

    fn free_bytes(&self) -> io::Result<Option<u64>> {
        let st = rustix::fs::statvfs(&self.dir)?;
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }
}
