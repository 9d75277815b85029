//! The store's blob operations: runs of pieces checked against the ledger, written to the blob store and committed by compare-and-set; reads from memory or the blob store; deletes, orphans, and the scrub of everything at rest.

use super::*;
use crate::ledger::{Advanced, BlobAdvance, BlobState};

/// Where the bytes a blob read asks for are ([`Store::blob_locate`]).
#[derive(Debug)]
pub enum BlobRead {
    /// There is no such blob (for this reader).
    Missing,
    /// Among the pieces kept in memory: shared, not copied.
    Kept(KeptBytes),
    /// In the blob store: this many bytes (0 past what is stored), for
    /// [`Store::blob_read_disk`].
    OnDisk(usize),
}

/// At most this many pieces (about 1 MiB each) share one `fdatasync` and
/// one commit.
pub(crate) const MAX_RUN: usize = 16;

/// A blob's bytes that no ledger row names are left alone until they are
/// this old (an upload's file exists a moment before its first piece's
/// row is committed).
pub(crate) const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(600);

impl Store {
    /// Blob reads served from the pieces kept in memory, and from the
    /// blob store.
    pub fn blob_read_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.reads_memory.load(Relaxed),
            self.inner.reads_disk.load(Relaxed),
        )
    }

    /// Removes blobs that no ledger row names, last written more than 10
    /// minutes ago: a relay stopped between creating a blob's file and
    /// committing its first piece, or between deleting a blob's row and
    /// its bytes, leaves one behind (never served: reads go through the
    /// row, but it holds space). Returns how many were removed.
    pub async fn remove_orphan_blobs(&self) -> Result<usize, StoreError> {
        let old = self
            .inner
            .blobs
            .older_than(ORPHAN_AGE)
            .map_err(|e| StoreError::Io {
                what: "listing the blobs of",
                path: PathBuf::from(&self.inner.name),
                source: e,
            })?;
        let known = self.inner.ledger.blobs_known(old.clone()).await?;
        let orphans: Vec<BlobId> = old
            .into_iter()
            .zip(known)
            .filter(|(_, k)| !k)
            .map(|(id, _)| id)
            .collect();
        let n = orphans.len();
        self.remove_blobs(orphans).await;
        Ok(n)
    }

    /// [`Store::blob_status`] once no pieces are being stored: a run of
    /// pieces written but not yet committed is waited for, so that an
    /// uploader asking where to resume (after a reconnect) is not told a
    /// length the relay is about to pass, and does not send again pieces
    /// it already holds.
    pub async fn blob_status_settled(
        &self,
        id: &BlobId,
    ) -> Result<Option<(u64, bool, MailboxId)>, StoreError> {
        let _no_writer = self.inner.blob_lock.lock().await;
        self.blob_status(id).await
    }

    /// How much of a blob is stored: (stored, complete), or None.
    pub async fn blob_status(
        &self,
        id: &BlobId,
    ) -> Result<Option<(u64, bool, MailboxId)>, StoreError> {
        Ok(self
            .blob_row(id)
            .await?
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
        if self
            .mailbox_key(&mailbox)
            .await
            .map_err(|e| (e, 1))?
            .is_none()
        {
            return one(BlobPutOutcome::Refused(RefusalCode::UnknownMailbox));
        }
        let existing = self.blob_row(&blob_id).await.map_err(|e| (e, 1))?;
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
            // Checked before the bytes are written (and again, where it
            // counts, inside the ledger's write that creates the blob).
            let MailboxUse { used, quota, .. } = self.status(&mailbox).await.map_err(|e| (e, 1))?;
            if used + total_len > quota {
                return one(BlobPutOutcome::Refused(RefusalCode::OverQuota));
            }
            let held = self
                .share_used(&mailbox, &source)
                .await
                .map_err(|e| (e, 1))?;
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
        let blobs = self.inner.blobs.clone();
        // The blob store's work (writes, one fdatasync) runs on the
        // blocking pool: an fsync must not stall the runtime's workers,
        // which meanwhile decrypt and parse the next pieces and serve
        // readers.
        let work = move || {
            let written = blobs.write_run(&blob_id, offset, is_new, &run, complete);
            (written, run)
        };
        let give_back = |run: Vec<BlobPiece>| {
            run.into_iter()
                .for_each(|p| sealpost_proto::buffers::give(p.data))
        };
        // Said as every write the store could not make is: nothing was
        // stored, try again later (or: the disk is full).
        let blob_err = |e: io::Error| StoreError::Storage {
            disk_full: matches!(e.raw_os_error(), Some(28 | 122)), // ENOSPC, EDQUOT
            detail: format!("writing blob {blob_id}: {e}"),
        };
        let (written, run) = tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| (blob_err(io::Error::other(e)), n))?;
        let hash_now = match written {
            Ok(h) => h,
            Err(e) => {
                give_back(run);
                return Err((blob_err(e), n));
            }
        };
        if let Some(h) = hash_now {
            if h != hash {
                give_back(run);
                // Nothing of this blob is kept: its row (if it has one)
                // first, so a row never names missing bytes.
                if !is_new {
                    self.inner
                        .ledger
                        .blob_delete(blob_id, mailbox)
                        .await
                        .map_err(|e| (e, n))?;
                }
                self.remove_blobs(vec![blob_id]).await;
                // The whole blob is gone: every piece of the run says why.
                return Ok(vec![BlobPutOutcome::HashMismatch; n]);
            }
        }
        // The hash is known (stated by the last piece, and checked above)
        // once the blob is whole; zeros until then.
        let advanced = self
            .inner
            .ledger
            .blob_advance(BlobAdvance {
                blob_id,
                mailbox,
                total_len,
                expires_at,
                from: (!is_new).then_some(offset),
                to: end,
                complete,
                hash,
                source,
            })
            .await
            .map_err(|e| (e, n))?;
        match advanced {
            Advanced::Committed => {}
            Advanced::Refused(code) => {
                give_back(run);
                if is_new {
                    self.remove_blobs(vec![blob_id]).await;
                }
                return one(BlobPutOutcome::Refused(code));
            }
            // Another writer (another node) moved the blob first: what it
            // committed stands, and this run was not stored.
            Advanced::Conflict { stored } => {
                give_back(run);
                return one(BlobPutOutcome::WrongOffset {
                    stored: stored.unwrap_or(0),
                });
            }
        }
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
    pub async fn blob_read(
        &self,
        id: &BlobId,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(row) = self.blob_row(id).await? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        match self.blob_locate(id, &row.mailbox, offset, len).await? {
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
    pub async fn blob_locate(
        &self,
        id: &BlobId,
        reader: &MailboxId,
        offset: u64,
        len: usize,
    ) -> Result<BlobRead, StoreError> {
        let Some(row) = self.blob_row(id).await?.filter(|r| r.mailbox == *reader) else {
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

    /// `n` bytes of a blob from `offset` if they are still among the
    /// pieces kept in memory since they were stored; unlike
    /// [`Store::blob_locate`] it checks no owner and follows no reader
    /// (a relay forwarding the blob reads its own copy this way, without
    /// holding the upload back).
    pub fn blob_kept(&self, id: &BlobId, offset: u64, n: usize) -> Option<KeptBytes> {
        let kept = self.inner.recent.lock().ok()?.read(id, offset, n)?;
        self.inner
            .reads_memory
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(kept)
    }

    /// Appends `n` bytes of a blob from `offset` to `out` (as
    /// [`Store::blob_locate`] said), from the blob store (blocking).
    pub fn blob_read_disk(
        &self,
        id: &BlobId,
        offset: u64,
        n: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.inner
            .blobs
            .read(id, offset, n, out)
            .map_err(|e| StoreError::Io {
                what: "reading blob",
                path: PathBuf::from(format!("{}/{}", self.inner.name, id)),
                source: e,
            })
    }

    /// Sets when a blob of `mailbox` expires ([`Ledger::blob_expire`]).
    pub async fn blob_expire(
        &self,
        blob_id: BlobId,
        mailbox: MailboxId,
        at: u64,
    ) -> Result<bool, StoreError> {
        self.inner.ledger.blob_expire(blob_id, mailbox, at).await
    }

    pub async fn blob_delete(
        &self,
        blob_id: BlobId,
        mailbox: MailboxId,
    ) -> Result<bool, StoreError> {
        let deleted = self.inner.ledger.blob_delete(blob_id, mailbox).await?;
        if deleted {
            self.remove_blobs(vec![blob_id]).await;
        }
        Ok(deleted)
    }

    /// Re-reads everything at rest and checks it against its BLAKE3.
    pub async fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let (items, damaged_items) = self.inner.ledger.scrub_items().await?;
        let mut report = ScrubReport {
            items,
            damaged_items,
            ..ScrubReport::default()
        };
        for (id, hash, len) in self.inner.ledger.complete_blobs().await? {
            report.blobs += 1;
            let blobs = self.inner.blobs.clone();
            let ok = tokio::task::spawn_blocking(move || blobs.hash(&id, len))
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|h| h == hash);
            if !ok {
                report.damaged_blobs.push(id);
            }
        }
        Ok(report)
    }

    /// Drops everything kept about blobs and removes their bytes (best
    /// effort: bytes no row names are never served). On the blocking
    /// pool: freeing a large file's blocks takes a while (about 150 ms for
    /// 1 GiB on ext4 here), which a runtime worker must not spend.
    pub(crate) async fn remove_blobs(&self, ids: Vec<BlobId>) {
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            if let Ok(mut r) = self.inner.recent.lock() {
                r.forget(id);
            }
            if let Ok(mut f) = self.inner.followers.lock() {
                f.forget(id);
            }
        }
        let blobs = self.inner.blobs.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in ids {
                blobs.remove(&id);
            }
        })
        .await;
    }

    pub(crate) async fn blob_row(&self, id: &BlobId) -> Result<Option<BlobState>, StoreError> {
        self.inner.ledger.blob(*id).await
    }

    /// The key under which blob `id` of `mailbox` is stored (PROTOCOL
    /// 6.6): a blob is named by its id within a mailbox, so that one file
    /// sent to two recipients on this relay (one manifest, one blob id) is
    /// two blobs. The first mailbox to use an id stores it under the id
    /// itself (what a relay did before); another mailbox's blob of that id
    /// goes under [`mailbox_blob_key`]. Resolved anew on every request
    /// from what the ledger holds, so it survives restarts and deletes.
    pub async fn blob_key(&self, id: &BlobId, mailbox: &MailboxId) -> Result<BlobId, StoreError> {
        match self.blob_row(id).await? {
            None => {
                // The id's own blob may be gone while another mailbox's
                // of the same id is still here.
                let other = mailbox_blob_key(id, mailbox);
                Ok(match self.blob_row(&other).await? {
                    Some(r) if r.mailbox == *mailbox => other,
                    _ => *id,
                })
            }
            Some(r) if r.mailbox == *mailbox => Ok(*id),
            Some(_) => Ok(mailbox_blob_key(id, mailbox)),
        }
    }
}

/// The key of blob `id` of `mailbox` when another mailbox's blob holds the
/// id itself ([`Store::blob_key`]): BLAKE3-derive-key("sealpost v1 blob of
/// mailbox", id || mailbox), first 16 bytes.
pub fn mailbox_blob_key(id: &BlobId, mailbox: &MailboxId) -> BlobId {
    let mut m = [0u8; 48];
    m[..16].copy_from_slice(&id.0);
    m[16..].copy_from_slice(&mailbox.0);
    let k = blake3::derive_key("sealpost v1 blob of mailbox", &m);
    let mut out = [0u8; 16];
    out.copy_from_slice(&k[..16]);
    BlobId(out)
}
