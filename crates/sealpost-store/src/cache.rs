//! Node-local layers that make one relay faster and that nothing correct depends on: the last pieces stored kept in memory (`Recent`), and uploads paced for recipients streaming them (`Followers`).

use super::*;

/// The last blob pieces stored, at most [`RECENT_BYTES`] of them. A
/// recipient downloading a file while it is uploaded asks for each piece
/// soon after it was stored; since pieces are written around the page
/// cache (`O_DIRECT`), serving those reads from here instead of the device
/// saves a disk read and a kernel copy per piece. Only committed pieces
/// are here, and reads never go past the committed length.
#[derive(Default)]
pub(crate) struct Recent {
    pieces: std::collections::VecDeque<(BlobId, u64, Arc<Vec<u8>>)>,
    bytes: usize,
}

pub(crate) const RECENT_BYTES: usize = 16 << 20;

impl Recent {
    pub(crate) fn push(&mut self, id: BlobId, offset: u64, data: Vec<u8>) {
        self.bytes += data.len();
        self.pieces.push_back((id, offset, Arc::new(data)));
        while self.bytes > RECENT_BYTES {
            match self.pieces.pop_front() {
                Some((_, _, old)) => {
                    self.bytes -= old.len();
                    release(old);
                }
                None => break,
            }
        }
    }

    /// The kept piece holding `n` bytes of blob `id` from `offset`, and
    /// where in it they are.
    pub(crate) fn read(&self, id: &BlobId, offset: u64, n: usize) -> Option<KeptBytes> {
        let (_, at, data) = self.pieces.iter().rev().find(|(pid, at, data)| {
            pid == id && *at <= offset && offset + n as u64 <= at + data.len() as u64
        })?;
        let start = (offset - at) as usize;
        Some((data.clone(), start..start + n))
    }

    pub(crate) fn forget(&mut self, id: &BlobId) {
        let bytes = &mut self.bytes;
        self.pieces.retain(|(pid, _, data)| {
            let keep = pid != id;
            if !keep {
                *bytes -= data.len();
            }
            keep
        });
    }
}

/// Bytes of a piece kept in memory, shared with whoever sends them.
pub type KeptBytes = (Arc<Vec<u8>>, std::ops::Range<usize>);

/// A kept piece is let go (it left memory, or a response holding it was
/// sent): the last holder hands its buffer back for reuse.
pub fn release(piece: Arc<Vec<u8>>) {
    if let Ok(v) = Arc::try_unwrap(piece) {
        sealpost_proto::buffers::give(v);
    }
}

/// Recipients reading blobs that are still being uploaded: where each
/// one's last read ended, and when. A recipient downloading while the
/// sender uploads ("streaming") reads pieces a little after they were
/// stored; served from [`Recent`] they cost no disk read. But an upload
/// is faster than a download (which writes and reads back on the
/// recipient's side), so unchecked it runs ahead, its pieces leave memory
/// before the recipient asks for them, and every piece is then read back
/// from the device: for 1 GiB, 0.85 GiB of extra reads on a disk the two
/// writes and the recipient's read-back already share (measured: the
/// disk's bandwidth is shared by all of them, about 1.5 GB/s in all
/// here). So an upload whose recipient is more than [`PACE_HOLD`] behind
/// waits for it, a little ([`Store::pace`]): the relay streams from
/// memory and the disk does only what it must.
///
/// Bounded every way, so a recipient can slow an upload only a little:
/// only a reader of the blob's own mailbox counts, only while it reads
/// (one not heard from in [`FOLLOW_FRESH`] is no longer followed), only
/// while it is at most [`FOLLOW_REACH`] behind (further behind, it reads
/// from the device whatever the upload does), and a run waits at most
/// [`PACE_MAX_WAIT`] (so an upload goes on at 8 MiB per 50 ms or more).
/// At most [`MAX_FOLLOWERS`] are tracked.
#[derive(Default)]
pub(crate) struct Followers {
    pub(crate) reads: HashMap<BlobId, (u64, Instant)>,
}

/// A follower this far behind the upload still finds what it reads next
/// in [`Recent`] (which holds [`RECENT_BYTES`]) after a run of pieces (up
/// to 8 MiB) was stored meanwhile. With several uploads streaming at once
/// they share that memory, and a reader may find a piece gone and read
/// it from the device instead (measured with two: 16–84 MiB of 1 GiB).
pub const PACE_HOLD: u64 = 8 << 20;

/// Further behind than this, a recipient is not streaming.
pub(crate) const FOLLOW_REACH: u64 = 64 << 20;

/// A recipient that has not read for this long is not streaming.
pub(crate) const FOLLOW_FRESH: std::time::Duration = std::time::Duration::from_millis(300);

/// The longest a run of pieces is held back. Long enough for a recipient
/// that started late to come within [`PACE_HOLD`] once (with blobs in a
/// bucket that took one hold of up to ~75 ms; at 50 ms it fell behind for
/// good and read everything from the bucket, at a quarter of the speed).
pub const PACE_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

pub(crate) const MAX_FOLLOWERS: usize = 256;

impl Followers {
    /// A read of `blob_id` up to `end`, at `now`.
    pub(crate) fn read(&mut self, blob_id: &BlobId, end: u64, now: Instant) {
        if self.reads.len() >= MAX_FOLLOWERS && !self.reads.contains_key(blob_id) {
            self.reads
                .retain(|_, (_, at)| now.duration_since(*at) < FOLLOW_FRESH);
            if self.reads.len() >= MAX_FOLLOWERS {
                return;
            }
        }
        let e = self.reads.entry(*blob_id).or_insert((end, now));
        *e = (end.max(e.0), now);
    }

    /// How far behind `stored` a recipient streaming `blob_id` is, if one
    /// is (within [`FOLLOW_FRESH`] and [`FOLLOW_REACH`]).
    pub(crate) fn behind(&self, blob_id: &BlobId, stored: u64, now: Instant) -> Option<u64> {
        let (end, at) = self.reads.get(blob_id)?;
        let behind = stored.saturating_sub(*end);
        (now.duration_since(*at) < FOLLOW_FRESH && behind <= FOLLOW_REACH).then_some(behind)
    }

    pub(crate) fn forget(&mut self, blob_id: &BlobId) {
        self.reads.remove(blob_id);
    }
}

impl Store {
    /// Runs of pieces held back for a recipient streaming their blob, and
    /// the time they waited in all (microseconds).
    pub fn pacing_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.paced_runs.load(Relaxed),
            self.inner.paced_micros.load(Relaxed),
        )
    }

    /// Holds back a run of pieces of `blob_id` starting at `offset` while
    /// a recipient streaming that blob is more than [`PACE_HOLD`] behind
    /// (see [`Followers`]): until it has read closer, it stops reading,
    /// or [`PACE_MAX_WAIT`] passed.
    pub(crate) async fn pace(&self, blob_id: &BlobId, offset: u64) {
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + PACE_MAX_WAIT);
        let mut held = false;
        loop {
            let mut read = std::pin::pin!(self.inner.follower_read.notified());
            // Registered before the check, so a read in between still
            // wakes this.
            read.as_mut().enable();
            let behind = self
                .inner
                .followers
                .lock()
                .ok()
                .and_then(|f| f.behind(blob_id, offset, Instant::now()));
            if behind.is_none_or(|b| b <= PACE_HOLD) {
                break;
            }
            held = true;
            if tokio::time::timeout_at(deadline, read).await.is_err() {
                break;
            }
        }
        if held {
            use std::sync::atomic::Ordering::Relaxed;
            self.inner.paced_runs.fetch_add(1, Relaxed);
            let waited = start.elapsed().as_micros().min(u64::MAX as u128) as u64;
            self.inner.paced_micros.fetch_add(waited, Relaxed);
        }
    }
}
