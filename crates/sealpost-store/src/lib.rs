//! The relay's store: mailboxes, items (sealed messages) and blobs.
//!
//! Metadata and items live in SQLite (WAL, `synchronous=FULL`); blobs are
//! files. **Nothing is acknowledged before it is durable**: every write goes
//! through one writer thread that gathers all requests waiting at that
//! moment into one transaction and one commit (group commit), and only
//! answers them once the commit (and its fsync) returned. Blob pieces are
//! written and fsync'd (file, and directory when the file is new) before
//! their metadata is committed.
//!
//! Where things are: `ledger` the seams (the [`Ledger`], [`BlobStore`]
//! and [`Notifier`] traits, what each promises); this file the [`Store`]
//! the relay holds, which puts the three together with its mailbox and
//! item operations; `blobs` its blob operations (runs of pieces, reads,
//! deletes, orphans, scrub); `cache` the node-local layers (pieces kept
//! in memory, pacing for streaming recipients) that nothing correct
//! depends on. The embedded implementations: `sqlite` (with `schema` and
//! `writer`, the group-commit thread and every write it applies) and
//! `files` (with `upload`, an upload's running hash); `memory` the
//! in-memory ones; `conformance` the behaviour every implementation must
//! show.
#![forbid(unsafe_code)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "sealpost supports Linux only: its durability relies on Linux file APIs (fsync of directories, O_DIRECT, O_NOFOLLOW, file modes), and it is tested nowhere else"
);

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod blobs;
mod cache;
#[cfg(feature = "conformance")]
pub mod conformance;
mod files;
mod ledger;
pub mod memory;
pub mod migrate;
pub mod postgres;
pub mod s3;
mod schema;
mod sqlite;
#[cfg(feature = "conformance")]
pub mod test_postgres;
#[cfg(feature = "conformance")]
pub mod test_s3;
mod upload;
mod writer;

pub use blobs::{mailbox_blob_key, BlobRead};
use cache::*;
pub use cache::{release, KeptBytes, PACE_HOLD, PACE_MAX_WAIT};
pub use files::FileBlobs;
pub use ledger::{
    Advanced, BlobAdvance, BlobState, BlobStore, Ended, Enqueued, Fetched, Fut, Handed, HopQueue,
    Ledger, LedgerSpace, LocalNotifier, MailboxUse, NewForward, NewItem, Notifier, Queued, Sink,
    Totals,
};
use schema::*;
pub use sqlite::SqliteLedger;
use writer::*;

use std::collections::HashMap;

use rand_core::{OsRng, RngCore};
use sealpost_proto::buffers::AlignedBuf;
use sealpost_proto::relay::{BlobPiece, MAX_BLOB_PIECE};

use crate::upload::Upload;
use rusqlite::{params, Connection, OptionalExtension};
use sealpost_proto::relay::{BlobId, Item, MailboxId, NextHop, RefusalCode};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the store did not commit this write (shutting down, or a storage error); nothing was acknowledged")]
    Closed,
    /// A commit failed: nothing in it was stored.
    #[error("{}", if *.disk_full { "the relay's disk is full; nothing was stored, try again later".to_owned() } else { format!("the relay could not store this ({detail}); nothing was stored, try again later") })]
    Storage { disk_full: bool, detail: String },
}

impl StoreError {
    /// A failure of the storage under the store (a full disk, an I/O
    /// error), as opposed to a request the store refused or a shutdown.
    pub fn is_storage(&self) -> bool {
        !matches!(self, Self::Closed)
    }

    /// Whether the cause is a full disk (or file system quota).
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Storage { disk_full, .. } => *disk_full,
            Self::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(28 | 122)) // ENOSPC, EDQUOT
            }
            Self::Db(e) => db_disk_full(e),
            _ => false,
        }
    }
}

fn db_disk_full(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull))
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What a registration did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// A new mailbox.
    Created,
    /// The mailbox existed already (registering is idempotent).
    Existing,
    /// Refused: the relay holds `Limits::max_mailboxes` mailboxes.
    Full,
}

/// Limits the store enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of items and blobs one mailbox may hold.
    pub mailbox_quota: u64,
    /// The largest blob.
    pub max_blob: u64,
    /// Free space on the store's file system below which new items and
    /// blob pieces are refused ("the relay's disk is full"): what is left
    /// is for deletes (an owner's acks, expiry), which SQLite's log needs
    /// room for too, so that a relay whose disk filled up recovers as its
    /// mail is delivered.
    pub min_free_space: u64,
    /// The most mailboxes the relay registers (None: no cap). Existing
    /// mailboxes are never affected.
    pub max_mailboxes: Option<u64>,
    /// The share of a mailbox's quota (in percent, 1..=100) that items and
    /// blobs from one [`Source`] may hold: a stranger flooding a mailbox
    /// from one address fills this share and no more, leaving the rest for
    /// everyone else. 100 turns it off.
    pub source_share_percent: u8,
}

impl Limits {
    /// The bytes of one mailbox that one source may hold.
    pub fn source_share(&self, quota: u64) -> u64 {
        let pct = u64::from(self.source_share_percent.clamp(1, 100));
        if pct == 100 {
            quota
        } else {
            quota / 100 * pct + quota % 100 * pct / 100
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            mailbox_quota: 4 << 30,
            max_blob: 2 << 30,
            min_free_space: 64 << 20,
            max_mailboxes: None,
            source_share_percent: 50,
        }
    }
}

/// Where a submission came from, for the per-source share of a mailbox's
/// quota ([`Limits::source_share_percent`]): an IPv4 address, or an IPv6
/// address's /64 (one host's usual allocation), so that one machine counts
/// once. Users behind one NAT share a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source([u8; 9]);

impl Source {
    /// The source of a connection from an IPv4 address.
    pub const fn of_v4(octets: [u8; 4]) -> Self {
        Self([4, octets[0], octets[1], octets[2], octets[3], 0, 0, 0, 0])
    }

    /// The source of a connection from `ip`.
    pub fn of_ip(ip: std::net::IpAddr) -> Self {
        match ip.to_canonical() {
            std::net::IpAddr::V4(v4) => Self::of_v4(v4.octets()),
            std::net::IpAddr::V6(v6) => {
                let o = v6.octets();
                Self([6, o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        }
    }

    /// The bytes the store keeps.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// How long a reading of the file system's free space is trusted (writes
/// admitted meanwhile are subtracted from it).
const FREE_SPACE_FRESH: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    Stored { seq: u64, item_id: [u8; 16] },
    Refused(RefusalCode),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobPutOutcome {
    Stored {
        stored: u64,
        complete: bool,
    },
    /// The piece does not start at the stored length; resume from `stored`.
    WrongOffset {
        stored: u64,
    },
    Refused(RefusalCode),
    /// The completed blob's BLAKE3 differs from the one stated; the blob
    /// was discarded and must be uploaded again.
    HashMismatch,
}

/// How long the store's durable steps take, for metrics: every SQLite
/// commit (its fsync included) and every `fdatasync` of blob pieces.
/// Prometheus histograms (shared handles; cloning one shares it).
#[derive(Debug, Clone)]
pub struct Latencies {
    pub commit: prometheus_client::metrics::histogram::Histogram,
    pub blob_sync: prometheus_client::metrics::histogram::Histogram,
    /// Writes per commit of the embedded store's group commit (1 to 4,096,
    /// doubling): the batch a commit carries grows with what queued while
    /// the previous one was being made durable.
    pub commit_batch: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        // 100 µs to about 6.5 s, doubling: a fast NVMe fsync to a stalled disk.
        let buckets =
            || prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 17);
        Self {
            commit: prometheus_client::metrics::histogram::Histogram::new(buckets()),
            blob_sync: prometheus_client::metrics::histogram::Histogram::new(buckets()),
            commit_batch: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 13),
            ),
        }
    }
}

/// Statistics of the last commits, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    pub commits: u64,
    pub writes: u64,
    pub last_commit_micros: u64,
    /// Transactions that failed and were rolled back (each caller in them
    /// was told; nothing was acknowledged).
    pub failures: u64,
    /// Steps that gave free database pages back to the file system, and
    /// the pages given back (see [`VACUUM_STEP_PAGES`]).
    pub vacuum_steps: u64,
    pub pages_given_back: u64,
}

/// Free pages the database keeps for new items instead of giving them
/// back (4 MiB at 4 KiB pages): a relay that empties and fills again does
/// not shrink and regrow its file for every burst.
pub const VACUUM_KEEP_PAGES: i64 = 1024;
/// The most pages given back in one step (2 MiB): one step is one short
/// write transaction, taken only when the writer has been idle for
/// [`VACUUM_IDLE`]; its size shrinks (to [`VACUUM_STEP_MIN_PAGES`]) while
/// steps take longer than [`VACUUM_STEP_TARGET`], which is what a commit
/// that arrives meanwhile may wait.
pub const VACUUM_STEP_PAGES: i64 = 512;
/// The fewest pages a step gives back.
pub const VACUUM_STEP_MIN_PAGES: i64 = 16;
/// How long one step should hold the writer at most.
pub const VACUUM_STEP_TARGET: Duration = Duration::from_millis(20);
/// While the pages in use are at most these (16 MiB at 4 KiB pages), every
/// free page is given back at once, in time that grows with the pages in
/// use, not with the free ones (see `writer::vacuum_step`).
pub const VACUUM_ALL_AT_ONCE_LIVE_PAGES: i64 = 4096;
/// How long the writer waits for work before it takes a step: long enough
/// that the pauses within a burst (between a recipient's fetch and its
/// acknowledgement, say) do not count as idle, since pages given back then
/// are pages the burst soon needs again.
pub const VACUUM_IDLE: Duration = Duration::from_millis(250);

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The relay's storage as the relay sees it: a [`Ledger`], a
/// [`BlobStore`] and a [`Notifier`], with the node-local layers that make
/// one node faster and that nothing correct depends on (the last pieces
/// kept in memory, pacing for streaming recipients, a node's own order of
/// blob writes). Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: Arc<dyn Ledger>,
    blobs: Arc<dyn BlobStore>,
    notifier: Arc<dyn Notifier>,
    limits: Limits,
    name: String,
    /// This node stores one run of pieces at a time, so that its blob
    /// writes do not interleave and an uploader asking where to resume is
    /// told a settled length ([`Store::blob_status_settled`]). Between
    /// nodes, the ledger's compare-and-set decides.
    blob_lock: tokio::sync::Mutex<()>,
    /// The last pieces stored, kept in memory (see [`Recent`]).
    recent: Mutex<Recent>,
    /// Blob reads served from [`Recent`], and from the blob store.
    reads_memory: std::sync::atomic::AtomicU64,
    reads_disk: std::sync::atomic::AtomicU64,
    /// Recipients reading blobs still being uploaded (see [`Followers`]).
    followers: Mutex<Followers>,
    /// The last reading of free space: when, bytes free then, bytes
    /// admitted since.
    free_space: Mutex<Option<(Instant, u64, u64)>>,
    /// Woken whenever a follower reads, for uploads held back for one.
    follower_read: tokio::sync::Notify,
    /// Runs of pieces held back for a follower, and for how long in all.
    paced_runs: std::sync::atomic::AtomicU64,
    paced_micros: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner.name)
    }
}

impl Store {
    /// Opens (creating if needed) the embedded store in `dir`: the ledger
    /// in `relay.db`, blob files in `blobs/`, pushes within this process.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, StoreError> {
        // Mailbox keys, who receives how much and when, and the stored
        // items: nobody but the relay's user reads them.
        files::private_dir(dir)?;
        let ledger = SqliteLedger::open(dir, limits)?;
        let blobs = FileBlobs::open(&dir.join("blobs"), ledger.latencies().blob_sync.clone())?;
        Ok(Self::new(
            Arc::new(ledger),
            Arc::new(blobs),
            Arc::new(LocalNotifier::default()),
            limits,
            dir.display().to_string(),
        ))
    }

    /// A store on the given ledger, blob store and notifier; `limits`
    /// must be those the ledger enforces.
    pub fn new(
        ledger: Arc<dyn Ledger>,
        blobs: Arc<dyn BlobStore>,
        notifier: Arc<dyn Notifier>,
        limits: Limits,
        name: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                ledger,
                blobs,
                notifier,
                limits,
                name,
                blob_lock: tokio::sync::Mutex::new(()),
                recent: Mutex::new(Recent::default()),
                reads_memory: Default::default(),
                reads_disk: Default::default(),
                followers: Mutex::new(Followers::default()),
                free_space: Mutex::new(None),
                follower_read: tokio::sync::Notify::new(),
                paced_runs: Default::default(),
                paced_micros: Default::default(),
            }),
        }
    }

    /// The ledger under this store.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.inner.ledger
    }

    /// The blob store under this store.
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.inner.blobs
    }

    /// Calls `sink` for every item committed from now on (on any node
    /// sharing the ledger, as far as the notifier reaches).
    pub fn listen(&self, sink: Sink) {
        self.inner.notifier.listen(sink);
    }

    /// Stops taking writes and waits until every accepted write is
    /// durable (blocking).
    pub fn close(&self) {
        self.inner.ledger.close();
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// The latency histograms of commits and blob syncs.
    pub fn latencies(&self) -> &Latencies {
        self.inner.ledger.latencies()
    }

    pub fn commit_stats(&self) -> CommitStats {
        self.inner.ledger.commit_stats()
    }

    /// Creates a mailbox for `key` (idempotent).
    pub async fn register(
        &self,
        mailbox: MailboxId,
        key: [u8; 32],
        now: u64,
    ) -> Result<Registered, StoreError> {
        self.inner.ledger.register(mailbox, key, now).await
    }

    /// Whether a mailbox exists.
    pub async fn has_mailbox(&self, mailbox: &MailboxId) -> Result<bool, StoreError> {
        Ok(self.mailbox_key(mailbox).await?.is_some())
    }

    pub async fn mailbox_key(&self, mailbox: &MailboxId) -> Result<Option<[u8; 32]>, StoreError> {
        self.inner.ledger.mailbox_key(*mailbox).await
    }

    /// Admits `bytes` of new data if the file system keeps at least
    /// [`Limits::min_free_space`] free after it; else the relay's disk is
    /// full (for new data: deletes go on).
    pub fn room_for(&self, bytes: u64) -> Result<(), StoreError> {
        let full = |free: u64| StoreError::Storage {
            disk_full: true,
            detail: format!(
                "{free} bytes free, {} kept for deletes",
                self.inner.limits.min_free_space
            ),
        };
        let mut slot = self
            .inner
            .free_space
            .lock()
            .map_err(|_| StoreError::Closed)?;
        let fresh = slot.filter(|(at, _, _)| at.elapsed() < FREE_SPACE_FRESH);
        let (at, free, admitted) = match fresh {
            Some(s) => s,
            None => {
                let Some(free) = self.inner.blobs.free_bytes().map_err(|e| StoreError::Io {
                    what: "measuring the free space of",
                    path: PathBuf::from(&self.inner.name),
                    source: e,
                })?
                else {
                    return Ok(());
                };
                // Space the ledger freed (deleted items) is reused for new
                // items before its storage grows: it counts as room.
                (
                    Instant::now(),
                    free.saturating_add(self.inner.ledger.reusable()),
                    0,
                )
            }
        };
        let left = free.saturating_sub(admitted);
        if left < self.inner.limits.min_free_space.saturating_add(bytes) {
            // Measured again next time: deletes may free space any moment.
            *slot = None;
            return Err(full(left));
        }
        *slot = Some((at, free, admitted.saturating_add(bytes)));
        Ok(())
    }

    /// Stores an item durably, or refuses it with a reason, and tells the
    /// notifier. The caller has checked the payload against its hash.
    pub async fn submit(
        &self,
        mailbox: MailboxId,
        expires_at: u64,
        hash: [u8; 32],
        payload: Vec<u8>,
        source: Source,
        now: u64,
    ) -> Result<SubmitOutcome, StoreError> {
        // An item costs its payload and about as much again in SQLite's
        // log until a checkpoint.
        self.room_for(2 * payload.len() as u64 + 4096)?;
        let outcome = self
            .inner
            .ledger
            .submit(NewItem {
                mailbox,
                expires_at,
                hash,
                payload,
                source,
                now,
            })
            .await?;
        if let SubmitOutcome::Stored { seq, .. } = outcome {
            self.inner.notifier.published(&mailbox, seq);
        }
        Ok(outcome)
    }

    /// Queues an item to forward for the owner of `origin` (PROTOCOL
    /// 6.8), durably, or refuses it (quota, expiry).
    pub async fn forward_enqueue(
        &self,
        origin: MailboxId,
        item: sealpost_proto::relay::Forward,
        blob: Option<(BlobId, u64)>,
        now: u64,
    ) -> Result<Enqueued, StoreError> {
        self.room_for(2 * item.payload.len() as u64 + 4096)?;
        self.inner
            .ledger
            .forward_enqueue(NewForward {
                origin,
                item,
                blob,
                now,
            })
            .await
    }

    /// Queued items due at `now` (and the expired ones), at most `max`
    /// and `max_bytes` of payload (at least one).
    pub async fn forward_due(
        &self,
        now: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        self.inner.ledger.forward_due(now, max, max_bytes).await
    }

    /// Claims (or renews this node's claim on) the lane of a next relay
    /// until `until`: see [`Ledger::lane_claim`].
    pub async fn lane_claim(
        &self,
        next: NextHop,
        blobs: bool,
        now: u64,
        until: u64,
    ) -> Result<bool, StoreError> {
        self.inner.ledger.lane_claim(next, blobs, now, until).await
    }

    /// Gives this node's claim on a lane up.
    pub async fn lane_release(&self, next: NextHop, blobs: bool) -> Result<(), StoreError> {
        self.inner.ledger.lane_release(next, blobs).await
    }

    /// Ends a queued item, storing `notice` for its origin in the same
    /// write (and telling the notifier of it).
    pub async fn forward_end(&self, id: u64, notice: Option<NewItem>) -> Result<Ended, StoreError> {
        let origin = notice.as_ref().map(|n| n.mailbox);
        let ended = self.inner.ledger.forward_end(id, notice).await?;
        self.notice_published(ended, origin);
        Ok(ended)
    }

    /// Tells the notifier of the notice an ended entry stored, if any.
    fn notice_published(&self, ended: Ended, origin: Option<MailboxId>) {
        if let (
            Ended::Ended {
                notice_seq: Some(seq),
            },
            Some(mb),
        ) = (ended, origin)
        {
            self.inner.notifier.published(&mb, seq);
        }
    }

    /// Puts queued items off until `next_at`, after a failed attempt if
    /// `failed`.
    pub async fn forward_later(
        &self,
        ids: Vec<u64>,
        next_at: u64,
        error: String,
        failed: bool,
    ) -> Result<(), StoreError> {
        self.inner
            .ledger
            .forward_later(ids, next_at, error, failed)
            .await
    }

    /// Which of `items` sent by the owner of `origin` still wait in the
    /// forward queue.
    pub async fn forward_waiting(
        &self,
        origin: MailboxId,
        items: Vec<(MailboxId, [u8; 32])>,
    ) -> Result<Vec<Option<sealpost_proto::relay::Waiting>>, StoreError> {
        self.inner.ledger.forward_waiting(origin, items).await
    }

    /// Ends queued entry `id`, which an outbound gateway took, keeping
    /// it (without its bytes) until `until` for the gateway's notices.
    pub async fn forward_handed(&self, id: u64, until: u64) -> Result<Ended, StoreError> {
        self.inner.ledger.forward_handed(id, until).await
    }

    /// The handed entry a gateway's notice names (see [`Handed`]).
    pub async fn handed_find(
        &self,
        mailbox: MailboxId,
        payload_hash: [u8; 32],
        blob: Option<BlobId>,
    ) -> Result<Option<Handed>, StoreError> {
        self.inner
            .ledger
            .handed_find(mailbox, payload_hash, blob)
            .await
    }

    /// Ends handed entry `id`, storing `notice` for its origin in the same
    /// write (and telling the notifier of it).
    pub async fn handed_end(&self, id: u64, notice: Option<NewItem>) -> Result<Ended, StoreError> {
        let origin = notice.as_ref().map(|n| n.mailbox);
        let ended = self.inner.ledger.handed_end(id, notice).await?;
        self.notice_published(ended, origin);
        Ok(ended)
    }

    /// Forgets handed entries kept until before `now`.
    pub async fn handed_expire(&self, now: u64) -> Result<u32, StoreError> {
        self.inner.ledger.handed_expire(now).await
    }

    /// Whether blob `id` is still queued to forward.
    pub async fn forward_blob_queued(&self, id: BlobId) -> Result<bool, StoreError> {
        self.inner.ledger.forward_blob_queued(id).await
    }

    /// The forward queue per next relay.
    pub async fn forward_queue(&self) -> Result<Vec<HopQueue>, StoreError> {
        self.inner.ledger.forward_queue().await
    }

    /// Deletes the listed items of `mailbox` (others' items are untouched).
    pub async fn ack(&self, mailbox: MailboxId, seqs: Vec<u64>) -> Result<u32, StoreError> {
        self.inner.ledger.ack(mailbox, seqs).await
    }

    /// Deletes expired items and blobs; returns how many.
    pub async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        let (n, blobs) = self.inner.ledger.sweep(now).await?;
        self.remove_blobs(blobs).await;
        Ok(n)
    }

    /// Items of `mailbox` after `after`, at most `max` and at most
    /// `max_bytes` of payload (at least one item if any). Each payload is
    /// checked against its hash on the way out; a damaged one is returned
    /// as it is (the recipient detects it) and counted in `damaged`.
    pub async fn fetch(
        &self,
        mailbox: &MailboxId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Fetched, StoreError> {
        self.inner
            .ledger
            .fetch(*mailbox, after, max, max_bytes)
            .await
    }

    /// The bytes of `mailbox` that items and blobs from `source` hold.
    pub async fn share_used(
        &self,
        mailbox: &MailboxId,
        source: &Source,
    ) -> Result<u64, StoreError> {
        self.inner.ledger.share_used(*mailbox, *source).await
    }

    /// How many (mailbox, source) pairs hold something (the share table's
    /// rows: it does not grow with history).
    pub async fn share_rows(&self) -> Result<u64, StoreError> {
        self.inner.ledger.share_rows().await
    }

    /// Items, bytes used and quota of a mailbox.
    pub async fn status(&self, mailbox: &MailboxId) -> Result<MailboxUse, StoreError> {
        self.inner.ledger.status(*mailbox).await
    }

    /// The ledger's own size, and how much of it is free (given back in
    /// steps while the writer is idle, down to [`VACUUM_KEEP_PAGES`]).
    pub async fn db_space(&self) -> Result<LedgerSpace, StoreError> {
        self.inner.ledger.space().await
    }

    /// Totals over the whole relay.
    pub async fn totals(&self) -> Result<Totals, StoreError> {
        self.inner.ledger.totals().await
    }

    /// Every mailbox with its queued items and bytes used, the fullest
    /// first.
    pub async fn mailboxes(&self) -> Result<Vec<(MailboxId, MailboxUse)>, StoreError> {
        self.inner.ledger.mailboxes().await
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub items: u64,
    pub damaged_items: Vec<u64>,
    pub blobs: u64,
    pub damaged_blobs: Vec<BlobId>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{blob_id_of_name, blob_path};

    /// Only names a blob file can have map back to a blob id.
    #[test]
    fn blob_file_names_map_back_to_ids() {
        let id = BlobId([0xab; 16]);
        let path = blob_path(Path::new("/x"), &id);
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(blob_id_of_name(name), Some(id));
        for bad in [
            "",
            "ab",
            &"AB".repeat(16),
            &"zz".repeat(16),
            &"ab".repeat(17),
            "relay.db",
        ] {
            assert_eq!(blob_id_of_name(bad), None, "{bad}");
        }
    }

    /// A follower counts while it reads (fresh) and is within reach; its
    /// position only moves forward; at most MAX_FOLLOWERS are tracked,
    /// stale ones making room.
    #[test]
    fn followers_are_bounded_in_time_reach_and_number() {
        let t0 = Instant::now();
        let mut f = Followers::default();
        let id = BlobId([1u8; 16]);
        assert_eq!(f.behind(&id, 100, t0), None);
        f.read(&id, 10 << 20, t0);
        assert_eq!(f.behind(&id, 30 << 20, t0), Some(20 << 20));
        assert_eq!(f.behind(&id, 5, t0), Some(0));
        // An earlier range read again does not move it back.
        f.read(&id, 1 << 20, t0);
        assert_eq!(f.behind(&id, 30 << 20, t0), Some(20 << 20));
        // Out of reach, then stale.
        assert_eq!(f.behind(&id, (10 << 20) + FOLLOW_REACH + 1, t0), None);
        assert_eq!(f.behind(&id, 30 << 20, t0 + FOLLOW_FRESH), None);
        // Bounded: a new follower past the bound is not tracked while all
        // are fresh, and is once the others went stale.
        for k in 0..MAX_FOLLOWERS {
            let mut id = [0u8; 16];
            id[0] = (k % 256) as u8;
            id[1] = (k / 256) as u8 + 2;
            f.read(&BlobId(id), 1, t0);
        }
        assert!(f.reads.len() <= MAX_FOLLOWERS);
        let late = BlobId([9u8; 16]);
        f.read(&late, 1, t0);
        assert_eq!(f.behind(&late, 2, t0), None);
        let later = t0 + FOLLOW_FRESH;
        f.read(&late, 1, later);
        assert_eq!(f.behind(&late, 2, later), Some(1));
        assert_eq!(f.reads.len(), 1);
        f.forget(&late);
        assert!(f.reads.is_empty());
    }
}
