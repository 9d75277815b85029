//! Blob files: pieces written around the page cache (O_DIRECT) and committed in runs, reads from memory or disk, step-wise deletion, orphans, and the scrub of everything at rest.

use super::*;

/// Where the bytes a blob read asks for are ([`Store::blob_locate`]).
#[derive(Debug)]
pub enum BlobRead {
    /// There is no such blob (for this reader).
    Missing,
    /// Among the pieces kept in memory: shared, not copied.
    Kept(KeptBytes),
    /// In the blob's file: this many bytes (0 past what is stored), for
    /// [`Store::blob_read_disk`].
    OnDisk(usize),
}

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

/// What writing a piece gives back: the upload's state (unless it is
/// complete), the blob's hash (if it is), the aligned buffer and the
/// piece.
pub(crate) type Written = (
    Option<Upload>,
    Option<blake3::Hash>,
    AlignedBuf,
    Vec<BlobPiece>,
);

/// At most this many pieces (about 1 MiB each) share one `fdatasync` and
/// one commit.
pub(crate) const MAX_RUN: usize = 16;

pub(crate) struct BlobRow {
    mailbox: MailboxId,
    total_len: u64,
    stored: u64,
    complete: bool,
}

/// A blob file no row names is left alone until it is this old (an upload's
/// file exists a moment before its first piece's row is committed).
pub(crate) const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// The blob id a file name in the blob directory stands for, if it is one.
pub(crate) fn blob_id_of_name(name: &str) -> Option<[u8; 16]> {
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
    Some(id)
}

pub(crate) fn blob_path(dir: &Path, id: &[u8; 16]) -> PathBuf {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(hex)
}

impl Store {
    /// Blob reads served from the pieces kept in memory, and from files.
    pub fn blob_read_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.reads_memory.load(Relaxed),
            self.inner.reads_disk.load(Relaxed),
        )
    }

    /// Removes blob files that no row names, last written more than 10
    /// minutes ago: a relay stopped between creating a blob's file and
    /// committing its first piece, or between deleting a blob's row and
    /// its file, leaves one behind (never served: reads go through the
    /// row, but it holds disk space). Only names a blob file can have (32
    /// hex digits) are touched. For a relay about to serve (no upload in
    /// progress); returns how many were removed.
    pub fn remove_orphan_blobs(&self) -> Result<usize, StoreError> {
        let dir = &self.inner.blob_dir;
        let mut orphans = Vec::new();
        {
            let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
            let mut known = conn.prepare("SELECT 1 FROM blobs WHERE id = ?1")?;
            for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
                let entry = entry.map_err(io_err("listing", dir))?;
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(blob_id_of_name) else {
                    continue;
                };
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= ORPHAN_AGE);
                if old && !known.exists(params![id.to_vec()])? {
                    orphans.push(entry.path());
                }
            }
        }
        for p in &orphans {
            remove_gradually(p);
        }
        Ok(orphans.len())
    }

    /// Reads `n` bytes from `offset` of a blob file with `O_DIRECT` into
    /// `out`: the device's bytes land in a reused aligned buffer without
    /// passing through the page cache (pieces were written around it, so
    /// a buffered read would fill the cache and copy out of it: on this
    /// project's machines the copy out of freshly filled cache pages cost
    /// more CPU than anything else the relay did).
    pub(crate) fn read_direct(
        &self,
        path: &Path,
        offset: u64,
        n: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        use sealpost_proto::buffers::{round_down_aligned, round_up_aligned, DIRECT_ALIGN};
        use std::os::unix::fs::FileExt;
        let f = upload::open_direct(path, rustix::fs::OFlags::RDONLY)?;
        let start = round_down_aligned(offset);
        let skip = (offset - start) as usize;
        let whole = round_up_aligned(offset + n as u64 - start) as usize;
        let mut buf = self
            .inner
            .read_bufs
            .lock()
            .ok()
            .and_then(|mut b| b.pop())
            .filter(|b| b.capacity() >= whole)
            .unwrap_or_else(|| AlignedBuf::new(whole.max(MAX_BLOB_PIECE + 2 * DIRECT_ALIGN)));
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
        if let Ok(mut b) = self.inner.read_bufs.lock() {
            if b.len() < 4 {
                b.push(buf);
            }
        }
        result
    }

    /// Takes an upload's kept state (its open files and running hash).
    pub(crate) fn take_upload(&self, blob_id: &[u8; 16]) -> Option<Upload> {
        self.inner.uploads.lock().ok()?.remove(blob_id)
    }

    /// Drops everything kept about a blob: its upload state and its
    /// pieces in memory (it was deleted, expired or discarded).
    pub(crate) fn forget_upload(&self, blob_id: &[u8; 16]) {
        if let Ok(mut r) = self.inner.recent.lock() {
            r.forget(blob_id);
        }
        if let Ok(mut f) = self.inner.followers.lock() {
            f.forget(blob_id);
        }
        self.take_upload(blob_id);
    }

    /// Removes blob files whose rows are gone (best effort: a file left
    /// behind has no row, so it is never served). On the blocking pool:
    /// freeing a large file's blocks takes a while (about 150 ms for
    /// 1 GiB on ext4 here), which a runtime worker must not spend.
    pub(crate) async fn remove_blob_files(&self, paths: Vec<PathBuf>) {
        if paths.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for p in paths {
                remove_gradually(&p);
            }
        })
        .await;
    }

    pub(crate) fn blob_path(&self, id: &[u8; 16]) -> PathBuf {
        blob_path(&self.inner.blob_dir, id)
    }

    pub(crate) fn blob_row(&self, id: &[u8; 16]) -> Result<Option<BlobRow>, StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        Ok(conn
            .query_row(
                "SELECT mailbox, total_len, stored, complete FROM blobs WHERE id = ?1",
                params![id.to_vec()],
                |r| {
                    let mb: Vec<u8> = r.get(0)?;
                    Ok(BlobRow {
                        mailbox: MailboxId(mb.try_into().unwrap_or([0; 32])),
                        total_len: u64_of(r.get(1)?),
                        stored: u64_of(r.get(2)?),
                        complete: r.get::<_, i64>(3)? != 0,
                    })
                },
            )
            .optional()?)
    }

    /// [`Store::blob_status`] once no pieces are being stored: a run of
    /// pieces written but not yet committed is waited for, so that an
    /// uploader asking where to resume (after a reconnect) is not told a
    /// length the relay is about to pass, and does not send again pieces
    /// it already holds.
    pub async fn blob_status_settled(
        &self,
        id: &[u8; 16],
    ) -> Result<Option<(u64, bool, MailboxId)>, StoreError> {
        let _no_writer = self.inner.blob_lock.lock().await;
        self.blob_status(id)
    }

    /// How much of a blob is stored: (stored, complete), or None.
    pub fn blob_status(&self, id: &[u8; 16]) -> Result<Option<(u64, bool, MailboxId)>, StoreError> {
        Ok(self
            .blob_row(id)?
            .map(|b| (b.stored, b.complete, b.mailbox)))
    }

    /// Appends a piece to a blob. The piece must start where the stored
    /// part ends; the data is on disk (fsync'd) before the new length is
    /// committed, and the length is committed before this returns.
    pub async fn blob_put(
        &self,
        piece: BlobPiece,
        source: Source,
        now: u64,
    ) -> Result<BlobPutOutcome, StoreError> {
        let mut out = self.blob_put_many(vec![piece], source, now).await;
        out.pop().unwrap_or(Err(StoreError::Closed))
    }

    /// Stores pieces in order, with the outcome of each, as
    /// [`Store::blob_put`] one after the other would; but a run of pieces
    /// that continue one another (the same blob, each starting where the
    /// previous one ends) is written, made durable with one `fdatasync`
    /// and committed with one transaction (group commit: a piece costs the
    /// device's flush and the database's commit once per run, not once per
    /// piece). Nothing of a run is committed before all of it is durable.
    pub async fn blob_put_many(
        &self,
        pieces: Vec<BlobPiece>,
        source: Source,
        now: u64,
    ) -> Vec<Result<BlobPutOutcome, StoreError>> {
        let mut out = Vec::with_capacity(pieces.len());
        let bytes: u64 = pieces.iter().map(|p| p.data.len() as u64 + 4096).sum();
        if let Err(e) = self.room_for(bytes) {
            let detail = e.to_string();
            out.push(Err(e));
            out.extend((1..pieces.len()).map(|_| {
                Err(StoreError::Storage {
                    disk_full: true,
                    detail: detail.clone(),
                })
            }));
            return out;
        }
        let mut pieces = pieces.into_iter().peekable();
        while let Some(first) = pieces.next() {
            match self.blob_put_run(first, &mut pieces, source, now).await {
                Ok(outcomes) => out.extend(outcomes.into_iter().map(Ok)),
                Err((e, n)) => {
                    // None of the failed run was committed: its first
                    // piece gets the error, the others that they were not
                    // stored.
                    out.push(Err(e));
                    out.extend((1..n).map(|_| Err(StoreError::Closed)));
                }
            }
        }
        out
    }

    /// Checks `first` and stores it with the pieces from `more` that
    /// continue it; the outcome of each (or the error, with how many
    /// pieces the failed run took).
    pub(crate) async fn blob_put_run(
        &self,
        first: BlobPiece,
        more: &mut std::iter::Peekable<std::vec::IntoIter<BlobPiece>>,
        source: Source,
        now: u64,
    ) -> Result<Vec<BlobPutOutcome>, (StoreError, usize)> {
        let one = |o: BlobPutOutcome| Ok(vec![o]);
        let (blob_id, mailbox, total_len, expires_at, offset) = (
            first.blob_id,
            first.mailbox,
            first.total_len,
            first.expires_at,
            first.offset,
        );
        if expires_at <= now {
            return one(BlobPutOutcome::Refused(RefusalCode::Expired));
        }
        // Before taking the writer lock: other uploads go on meanwhile.
        self.pace(&blob_id, offset).await;
        let _one_writer = self.inner.blob_lock.lock().await;
        if total_len > self.inner.limits.max_blob {
            return one(BlobPutOutcome::Refused(RefusalCode::TooLarge));
        }
        if self.mailbox_key(&mailbox).map_err(|e| (e, 1))?.is_none() {
            return one(BlobPutOutcome::Refused(RefusalCode::UnknownMailbox));
        }
        let existing = self.blob_row(&blob_id).map_err(|e| (e, 1))?;
        let (stored, is_new) = match &existing {
            Some(b) if b.mailbox != mailbox || b.total_len != total_len => {
                // Same id, different blob: only the first one counts.
                return one(BlobPutOutcome::WrongOffset { stored: b.stored });
            }
            Some(b) if b.complete => {
                return one(BlobPutOutcome::Stored {
                    stored: b.stored,
                    complete: true,
                })
            }
            Some(b) => (b.stored, false),
            None => (0, true),
        };
        if offset != stored {
            return one(BlobPutOutcome::WrongOffset { stored });
        }
        if offset + first.data.len() as u64 > total_len {
            return one(BlobPutOutcome::Refused(RefusalCode::TooLarge));
        }
        if is_new {
            let (_, used, quota) = self.status(&mailbox).map_err(|e| (e, 1))?;
            if used + total_len > quota {
                return one(BlobPutOutcome::Refused(RefusalCode::OverQuota));
            }
            let held = self.share_used(&mailbox, &source).map_err(|e| (e, 1))?;
            if held + total_len > self.inner.limits.source_share(quota) {
                return one(BlobPutOutcome::Refused(RefusalCode::OverQuota));
            }
        }
        // The run: `first`, then the pieces that continue it, up to the
        // blob's end (the last one states the hash to check).
        let mut end = offset + first.data.len() as u64;
        let mut run = vec![first];
        while let Some(p) = more.peek() {
            let continues = p.blob_id == blob_id
                && p.mailbox == mailbox
                && p.total_len == total_len
                && p.offset == end
                && end < total_len
                && p.expires_at > now
                && end + p.data.len() as u64 <= total_len;
            if !continues || run.len() >= MAX_RUN {
                break;
            }
            end += p.data.len() as u64;
            run.extend(more.next());
        }
        let n = run.len();
        let complete = end == total_len;
        let hash = if complete {
            run.last().map(|p| p.blob_hash).unwrap_or([0; 32])
        } else {
            [0; 32]
        };
        let path = self.blob_path(&blob_id);
        let blob_dir = self.inner.blob_dir.clone();
        let file = path.clone();
        let upload = self.take_upload(&blob_id);
        let buf = self.inner.direct_buf.lock().ok().and_then(|mut b| b.take());
        let sync_latency = self.inner.latencies.blob_sync.clone();
        // The file work (writes, one fdatasync) runs on the blocking pool:
        // an fsync must not stall the runtime's workers, which meanwhile
        // decrypt and parse the next pieces and serve readers.
        let work = move || -> Result<Written, (StoreError, Vec<BlobPiece>)> {
            let path = file;
            let mut buf = buf.unwrap_or_else(|| {
                AlignedBuf::new(MAX_BLOB_PIECE + 2 * sealpost_proto::buffers::DIRECT_ALIGN)
            });
            let written = match upload {
                Some(u) if u.stored() == offset => Ok(u),
                _ => Upload::open(&path, offset),
            }
            .and_then(|mut up| {
                for p in &run {
                    up.write(&p.data, &mut buf)?;
                }
                let t = Instant::now();
                up.sync()?;
                sync_latency.observe(t.elapsed().as_secs_f64());
                if is_new {
                    File::open(&blob_dir)?.sync_all()?;
                }
                Ok(up)
            });
            let up = match written {
                Ok(up) => up,
                Err(e) => return Err((io_err("writing blob", &path)(e), run)),
            };
            if !complete {
                return Ok((Some(up), None, buf, run));
            }
            match up.finish() {
                Ok(h) => Ok((None, Some(h), buf, run)),
                Err(e) => Err((io_err("writing blob", &path)(e), run)),
            }
        };
        let written = tokio::task::spawn_blocking(work).await.map_err(|e| {
            let e = StoreError::Io {
                what: "writing blob",
                path: path.clone(),
                source: io::Error::other(e),
            };
            (e, n)
        })?;
        let (upload, hash_now, buf, run) = match written {
            Ok(w) => w,
            Err((e, run)) => {
                run.into_iter()
                    .for_each(|p| sealpost_proto::buffers::give(p.data));
                return Err((e, n));
            }
        };
        if let Ok(mut b) = self.inner.direct_buf.lock() {
            *b = Some(buf);
        }
        if let Some(up) = upload {
            if let Ok(mut map) = self.inner.uploads.lock() {
                if map.len() >= MAX_OPEN_UPLOADS {
                    if let Some(k) = map.keys().next().copied() {
                        map.remove(&k);
                    }
                }
                map.insert(blob_id, up);
            }
        }
        if let Some(h) = hash_now {
            if h.as_bytes() != &hash {
                run.into_iter()
                    .for_each(|p| sealpost_proto::buffers::give(p.data));
                self.forget_upload(&blob_id);
                // The row first: a row never names a missing file.
                self.call(|reply| Op::BlobDelete {
                    blob_id,
                    mailbox,
                    reply,
                })
                .await
                .map_err(|e| (e, n))?;
                self.remove_blob_files(vec![path.clone()]).await;
                // The whole blob is gone: every piece of the run says why.
                return Ok(vec![BlobPutOutcome::HashMismatch; n]);
            }
        }
        let added = if is_new { total_len } else { 0 };
        // The hash is known (stated by the last piece, and checked above)
        // once the blob is whole; zeros until then.
        self.call(|reply| Op::BlobMeta {
            blob_id,
            mailbox,
            total_len,
            hash,
            expires_at,
            stored: end,
            complete,
            added,
            source,
            reply,
        })
        .await
        .map_err(|e| (e, n))?;
        let mut outcomes = Vec::with_capacity(n);
        let mut at = offset;
        let mut recent = self.inner.recent.lock().ok();
        for p in run {
            at += p.data.len() as u64;
            outcomes.push(BlobPutOutcome::Stored {
                stored: at,
                complete: complete && at == end,
            });
            match recent.as_mut() {
                Some(r) => r.push(blob_id, p.offset, p.data),
                None => sealpost_proto::buffers::give(p.data),
            }
        }
        Ok(outcomes)
    }

    /// Reads `len` bytes of a blob from `offset` (fewer at its end), as
    /// its mailbox would. Only the stored part can be read.
    pub fn blob_read(
        &self,
        id: &[u8; 16],
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(row) = self.blob_row(id)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        match self.blob_locate(id, &row.mailbox, offset, len)? {
            BlobRead::Missing => return Ok(None),
            BlobRead::Kept((piece, range)) => out.extend_from_slice(&piece[range]),
            BlobRead::OnDisk(n) => self.blob_read_disk(id, offset, n, &mut out)?,
        }
        Ok(Some(out))
    }

    /// Where `len` bytes of a blob from `offset` (fewer at its end) are,
    /// for `reader`: a piece kept in memory answers at once, without a
    /// copy; anything else is read with [`Store::blob_read_disk`] (on a
    /// blocking thread: it waits for the device). Only the stored part can
    /// be read, and only by the blob's mailbox: to any other the blob is
    /// [`BlobRead::Missing`] (and its reads are not followed).
    pub fn blob_locate(
        &self,
        id: &[u8; 16],
        reader: &MailboxId,
        offset: u64,
        len: usize,
    ) -> Result<BlobRead, StoreError> {
        let Some(row) = self.blob_row(id)?.filter(|r| r.mailbox == *reader) else {
            return Ok(BlobRead::Missing);
        };
        if offset >= row.stored {
            return Ok(BlobRead::OnDisk(0));
        }
        let n = (row.stored - offset).min(len as u64) as usize;
        if !row.complete {
            if let Ok(mut f) = self.inner.followers.lock() {
                f.read(id, offset + n as u64, Instant::now());
            }
            self.inner.follower_read.notify_waiters();
        }
        let kept = self
            .inner
            .recent
            .lock()
            .ok()
            .and_then(|r| r.read(id, offset, n));
        use std::sync::atomic::Ordering::Relaxed;
        Ok(match kept {
            Some(k) => {
                self.inner.reads_memory.fetch_add(1, Relaxed);
                BlobRead::Kept(k)
            }
            None => {
                self.inner.reads_disk.fetch_add(1, Relaxed);
                BlobRead::OnDisk(n)
            }
        })
    }

    /// Appends `n` bytes of a blob's file from `offset` to `out` (as
    /// [`Store::blob_locate`] said), with `O_DIRECT` where the file system
    /// takes it.
    pub fn blob_read_disk(
        &self,
        id: &[u8; 16],
        offset: u64,
        n: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        let path = self.blob_path(id);
        let read = self.read_direct(&path, offset, n, out).or_else(|_| {
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
        });
        read.map_err(io_err("reading blob", &path))
    }

    pub async fn blob_delete(
        &self,
        blob_id: [u8; 16],
        mailbox: MailboxId,
    ) -> Result<bool, StoreError> {
        let deleted = self
            .call(|reply| Op::BlobDelete {
                blob_id,
                mailbox,
                reply,
            })
            .await?;
        if deleted {
            self.forget_upload(&blob_id);
            self.remove_blob_files(vec![self.blob_path(&blob_id)]).await;
        }
        Ok(deleted)
    }

    /// Re-reads everything at rest and checks it against its BLAKE3:
    /// (items checked, items damaged, blobs checked, blobs damaged).
    pub fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let mut report = ScrubReport::default();
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        let mut stmt = conn.prepare("SELECT seq, hash, payload FROM items ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let hash: Vec<u8> = r.get(1)?;
            let payload: Vec<u8> = r.get(2)?;
            report.items += 1;
            if blake3::hash(&payload).as_bytes()[..] != hash[..] {
                report.damaged_items.push(u64_of(r.get(0)?));
            }
        }
        let mut stmt = conn.prepare("SELECT id, hash FROM blobs WHERE complete = 1")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let id: Vec<u8> = r.get(0)?;
            let hash: Vec<u8> = r.get(1)?;
            let id: [u8; 16] = id.try_into().unwrap_or([0; 16]);
            report.blobs += 1;
            let mut h = blake3::Hasher::new();
            let ok = File::open(blob_path(&self.inner.blob_dir, &id))
                .and_then(|f| h.update_reader(f).map(|_| ()))
                .is_ok()
                && h.finalize().as_bytes()[..] == hash[..];
            if !ok {
                report.damaged_blobs.push(id);
            }
        }
        Ok(report)
    }
}
