//! The inbox's content store: append-only segment files in `inbox/`.
//!
//! A batch of received messages is appended to the current segment in one
//! write, made durable with one `fsync` (and one of the directory when the
//! segment is new), its cached pages are dropped with
//! `posix_fadvise(DONTNEED)`, and every message is read back from the file
//! and hashed. Only then does the caller commit the inbox index and send
//! receipts: the receipt's hash is the hash of what came back from storage,
//! not of what was in memory.
//!
//! Bytes after the last indexed message of a segment (a crash between the
//! append and the index commit) are never referenced and are harmless.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::fsutil;

/// A segment is closed once it holds this much; the next batch starts a
/// new one.
pub const SEGMENT_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the stored copy in {path} at offset {offset} does not read back as written (BLAKE3 differs): the disk or file system is damaging data")]
    ReadBackMismatch { path: PathBuf, offset: u64 },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Where a stored message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    /// A segment is closed once it holds this much ([`SEGMENT_BYTES`]).
    segment_bytes: u64,
}

impl Spool {
    pub fn open(home: &Path) -> Result<Self, SpoolError> {
        let dir = home.join("inbox");
        fsutil::ensure_private_dir(&dir).map_err(io_err("creating", &dir))?;
        Ok(Self {
            dir,
            segment_bytes: SEGMENT_BYTES,
        })
    }

    /// Closes segments at `n` bytes instead (tests of what happens across
    /// segments, without writing 64 MiB).
    pub fn set_segment_bytes(&mut self, n: u64) {
        self.segment_bytes = n.max(1);
    }

    pub fn segment_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("seg-{segment:08}"))
    }

    fn current_segment(&self) -> Result<(u64, u64), SpoolError> {
        let mut last = None;
        for entry in fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))? {
            let entry = entry.map_err(io_err("listing", &self.dir))?;
            let name = entry.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("seg-"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                last = last.max(Some(n));
            }
        }
        let seg = last.unwrap_or(1);
        let len = match fs::metadata(self.segment_path(seg)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err("reading", &self.segment_path(seg))(e)),
        };
        if len >= self.segment_bytes {
            Ok((seg + 1, 0))
        } else {
            Ok((seg, len))
        }
    }

    /// Appends `contents` durably, drops them from the page cache, reads
    /// each back and checks its BLAKE3 against `expected`. Returns where
    /// each one is.
    pub fn append_verified(
        &self,
        contents: &[(&[u8], [u8; 32])],
    ) -> Result<Vec<Location>, SpoolError> {
        if contents.is_empty() {
            return Ok(Vec::new());
        }
        let (segment, _) = self.current_segment()?;
        let path = self.segment_path(segment);
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let start = file.metadata().map_err(io_err("reading", &path))?.len();
        let total: usize = contents.iter().map(|(c, _)| c.len()).sum();
        let mut buf = Vec::with_capacity(total);
        let mut locations = Vec::with_capacity(contents.len());
        for (c, _) in contents {
            locations.push(Location {
                segment,
                offset: start + buf.len() as u64,
            });
            buf.extend_from_slice(c);
        }
        (&file).write_all(&buf).map_err(io_err("writing", &path))?;
        file.sync_all().map_err(io_err("syncing", &path))?;
        if !existed {
            fsutil::sync_dir(&self.dir).map_err(io_err("syncing", &self.dir))?;
        }
        drop(buf);
        // The pages just written are clean after the fsync; dropping them
        // makes the read below come from the device, not from memory.
        let _ = rustix::fs::fadvise(
            &file,
            start,
            std::num::NonZeroU64::new(total as u64),
            rustix::fs::Advice::DontNeed,
        );
        for ((content, expected), loc) in contents.iter().zip(&locations) {
            let back = read_range(&file, loc.offset, content.len() as u64)
                .map_err(io_err("reading back", &path))?;
            if blake3::hash(&back).as_bytes() != expected {
                return Err(SpoolError::ReadBackMismatch {
                    path,
                    offset: loc.offset,
                });
            }
        }
        Ok(locations)
    }

    /// The segment files there are, in order.
    pub fn segments(&self) -> Result<Vec<u64>, SpoolError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))? {
            let entry = entry.map_err(io_err("listing", &self.dir))?;
            if let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("seg-"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Deletes a segment no stored message is in any more (durably: the
    /// directory is synced); returns its size. The caller checks that
    /// nothing refers to it and that it is not the last one (the one
    /// batches are appended to).
    pub fn remove_segment(&self, segment: u64) -> Result<u64, SpoolError> {
        let path = self.segment_path(segment);
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("deleting", &path)(e)),
        }
        fsutil::sync_dir(&self.dir).map_err(io_err("syncing", &self.dir))?;
        Ok(len)
    }

    /// Reads a stored message and checks its hash.
    pub fn read(
        &self,
        loc: Location,
        len: u64,
        expected: &[u8; 32],
    ) -> Result<Vec<u8>, SpoolError> {
        let path = self.segment_path(loc.segment);
        let file = File::open(&path).map_err(io_err("opening", &path))?;
        let data = read_range(&file, loc.offset, len).map_err(io_err("reading", &path))?;
        if blake3::hash(&data).as_bytes() != expected {
            return Err(SpoolError::ReadBackMismatch {
                path,
                offset: loc.offset,
            });
        }
        Ok(data)
    }
}

fn read_range(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("length out of range"))?;
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, offset)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_read_back_and_detect_damage() {
        let dir = tempfile::tempdir().expect("test");
        let s = Spool::open(dir.path()).expect("test");
        let a = b"hello".to_vec();
        let b = vec![7u8; 100_000];
        let h = |x: &[u8]| *blake3::hash(x).as_bytes();
        let locs = s
            .append_verified(&[(&a[..], h(&a)), (&b[..], h(&b))])
            .expect("test");
        assert_eq!(locs[1].offset, 5);
        let more = s.append_verified(&[(&a[..], h(&a))]).expect("test");
        assert_eq!(more[0].offset, 100_005);
        assert_eq!(s.read(locs[1], b.len() as u64, &h(&b)).expect("test"), b);
        // A wrong expectation is a read-back failure, not a silent success.
        assert!(matches!(
            s.append_verified(&[(&a[..], h(&b))]),
            Err(SpoolError::ReadBackMismatch { .. })
        ));
        // Damage at rest is caught on read.
        let f = OpenOptions::new()
            .write(true)
            .open(s.segment_path(1))
            .expect("test");
        f.write_all_at(b"X", 10).expect("test");
        assert!(s.read(locs[1], b.len() as u64, &h(&b)).is_err());
    }
}
