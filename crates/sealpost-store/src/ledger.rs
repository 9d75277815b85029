//! The seams between a relay and its storage: the [`Ledger`] (the truth
//! about mailboxes, items and blobs' lengths), the [`BlobStore`] (blob
//! bytes) and the [`Notifier`] (news of new items). The embedded default
//! is [`SqliteLedger`](crate::SqliteLedger) with group commit,
//! [`FileBlobs`](crate::FileBlobs) with `O_DIRECT` files and
//! [`LocalNotifier`]; [`crate::memory`] holds a second, in-memory set (not
//! durable: for tests and in-memory relays). Every implementation passes
//! [`crate::conformance`].
//!
//! **What an implementation promises.** A write's future resolves `Ok`
//! only once the write is durable (the relay acknowledges on it). Nothing
//! correct may rest on one process's memory: two relay nodes on one
//! ledger decide who may append to a blob by [`Ledger::blob_advance`]'s
//! compare-and-set on the stored length, and quotas and shares are checked
//! inside the write that spends them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sealpost_proto::relay::{
    BlobId, BlobPiece, Forward, Item, MailboxId, NextHop, RefusalCode, Waiting,
};

use crate::{CommitStats, Latencies, Registered, Source, StoreError, SubmitOutcome};

/// A ledger's answer, later.
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What the ledger knows of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobState {
    pub mailbox: MailboxId,
    pub total_len: u64,
    /// Bytes stored (durable in the blob store and committed here).
    pub stored: u64,
    pub complete: bool,
    /// BLAKE3 of the whole blob once complete; zeros before.
    pub hash: [u8; 32],
    pub expires_at: u64,
}

/// A blob's stored length moved from `from` to `to` (its bytes up to `to`
/// already durable in the blob store).
#[derive(Clone, Copy, Debug)]
pub struct BlobAdvance {
    pub blob_id: BlobId,
    pub mailbox: MailboxId,
    pub total_len: u64,
    pub expires_at: u64,
    /// The length the writer saw; `None`: the blob is new (no row).
    pub from: Option<u64>,
    pub to: u64,
    /// `to == total_len` and the bytes hash to `hash`.
    pub complete: bool,
    pub hash: [u8; 32],
    pub source: Source,
}

/// What [`Ledger::blob_advance`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advanced {
    /// Committed: the blob's stored length is now `to`.
    Committed,
    /// Someone else moved the blob first (or it is gone, or complete):
    /// nothing was changed; its length now, if it exists.
    Conflict { stored: Option<u64> },
    /// A new blob the mailbox has no room for (quota or the source's
    /// share), or a mailbox that does not exist.
    Refused(RefusalCode),
}

/// Items fetched for a mailbox.
#[derive(Debug, Default)]
pub struct Fetched {
    pub items: Vec<Item>,
    /// More items follow the last one returned.
    pub more: bool,
    /// Items whose payload did not match its hash (returned as they are:
    /// the recipient detects them).
    pub damaged: u64,
}

/// A mailbox's use of the relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailboxUse {
    pub items: u64,
    pub used: u64,
    pub quota: u64,
}

/// Totals over the whole relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub mailboxes: u64,
    pub items: u64,
    pub item_bytes: u64,
    pub blobs: u64,
}

/// The space a ledger's own storage takes: its size, and how much of it
/// is free and being given back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerSpace {
    pub size: u64,
    pub free: u64,
}

/// An item to store.
#[derive(Debug)]
pub struct NewItem {
    pub mailbox: MailboxId,
    pub expires_at: u64,
    pub hash: [u8; 32],
    pub payload: Vec<u8>,
    pub source: Source,
    pub now: u64,
}

/// An item to pass on to another relay (PROTOCOL 6.8), sent by the owner
/// of `origin`, whose quota it counts in until it is handed on.
#[derive(Debug)]
pub struct NewForward {
    pub origin: MailboxId,
    /// As received (its `hops` not yet counted up). For a blob, its
    /// payload is empty and its `payload_hash` names the blob's first
    /// piece (§6.5).
    pub item: Forward,
    /// A blob to forward instead of the payload: its id and length. Its
    /// bytes are a blob of `origin`'s (counted in its quota as such);
    /// queueing a blob that is queued already for the same mailbox is no
    /// change (the same blob for other mailboxes is queued once each).
    pub blob: Option<(BlobId, u64)>,
    pub now: u64,
}

/// What [`Ledger::forward_enqueue`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    Queued { id: u64 },
    Refused(RefusalCode),
}

/// An item waiting in the forward queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    pub origin: MailboxId,
    pub item: Forward,
    /// A blob to forward (id and length), held here as a blob of
    /// `origin`'s under the same id.
    pub blob: Option<(BlobId, u64)>,
    pub received_at: u64,
    /// Attempts that failed so far.
    pub attempts: u32,
    /// Not tried again before this (unix seconds).
    pub next_at: u64,
    pub last_error: Option<String>,
}

/// An item or blob handed to an outbound gateway (it keeps no bytes):
/// what the gateway's notices about it are mapped back to its sender by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handed {
    /// The forward queue entry's id it was.
    pub id: u64,
    pub origin: MailboxId,
    /// The relay it is on its way to (the gateway hands it there).
    pub next: sealpost_proto::relay::NextHop,
    pub mailbox: MailboxId,
    /// The item's payload hash (for a blob, that of its first piece,
    /// BLAKE3(`blob_id` || 0)).
    pub payload_hash: [u8; 32],
    pub blob: Option<BlobId>,
    /// Kept until then (unix seconds).
    pub until: u64,
}

/// What [`Ledger::forward_end`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Another worker (or an earlier try) ended it already.
    Gone,
    /// Ended; the seq of the notice stored, if one was given and its
    /// mailbox exists.
    Ended { notice_seq: Option<u64> },
}

/// The forward queue toward one next relay, for `relay status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopQueue {
    pub next: NextHop,
    pub items: u64,
    pub bytes: u64,
    /// When the oldest item waiting arrived.
    pub oldest: u64,
    /// The earliest next attempt.
    pub next_at: u64,
    /// The most attempts any of its items has had.
    pub attempts: u32,
    /// The error of the item tried last, if the last try failed.
    pub last_error: Option<String>,
}

/// The truth about mailboxes, items and blobs. Writes resolve once
/// durable; reads see every write that resolved before they began.
/// Quotas and per-source shares are checked inside the write that spends
/// them (see [`crate::Limits`]).
pub trait Ledger: Send + Sync + 'static {
    /// Creates a mailbox for `key` (idempotent), within the limits'
    /// mailbox cap.
    fn register(&self, mailbox: MailboxId, key: [u8; 32], now: u64) -> Fut<'_, Registered>;
    fn mailbox_key(&self, mailbox: MailboxId) -> Fut<'_, Option<[u8; 32]>>;
    /// Stores an item, or refuses it (unknown mailbox, expired, quota,
    /// share).
    fn submit(&self, item: NewItem) -> Fut<'_, SubmitOutcome>;
    /// Deletes the listed items of `mailbox` (others' are untouched); how
    /// many were deleted.
    fn ack(&self, mailbox: MailboxId, seqs: Vec<u64>) -> Fut<'_, u32>;
    /// Items of `mailbox` after `after`, at most `max` and at most
    /// `max_bytes` of payload (at least one if any).
    fn fetch(
        &self,
        mailbox: MailboxId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Fut<'_, Fetched>;
    /// Deletes expired items and blobs: how many, and the blobs whose
    /// bytes are to be removed.
    fn sweep(&self, now: u64) -> Fut<'_, (u64, Vec<BlobId>)>;
    fn status(&self, mailbox: MailboxId) -> Fut<'_, MailboxUse>;
    /// The bytes of `mailbox` that items and blobs from `source` hold.
    fn share_used(&self, mailbox: MailboxId, source: Source) -> Fut<'_, u64>;
    fn blob(&self, blob_id: BlobId) -> Fut<'_, Option<BlobState>>;
    /// Moves a blob's stored length, if it is still what the writer saw
    /// (compare-and-set); creates the row of a new blob within the
    /// mailbox's quota and the source's share.
    fn blob_advance(&self, advance: BlobAdvance) -> Fut<'_, Advanced>;
    /// Deletes a blob of `mailbox` (true if there was one); its bytes are
    /// the caller's to remove after.
    fn blob_delete(&self, blob_id: BlobId, mailbox: MailboxId) -> Fut<'_, bool>;
    /// Sets when blob `blob_id` of `mailbox` expires (true if there is
    /// one): a forwarding relay keeps its copy a while after handing it
    /// on, for other recipients of the same file, and longer again when
    /// one is queued.
    fn blob_expire(&self, blob_id: BlobId, mailbox: MailboxId, at: u64) -> Fut<'_, bool>;
    /// Which of `ids` have a row (for orphan sweeping).
    fn blobs_known(&self, ids: Vec<BlobId>) -> Fut<'_, Vec<bool>>;
    /// Complete blobs with their hashes and lengths, for scrubbing.
    fn complete_blobs(&self) -> Fut<'_, Vec<(BlobId, [u8; 32], u64)>>;
    /// Re-reads every item and returns the seqs of those whose payload
    /// does not match its hash, with how many were read.
    fn scrub_items(&self) -> Fut<'_, (u64, Vec<u64>)>;
    fn totals(&self) -> Fut<'_, Totals>;
    /// Every mailbox with its use, the fullest first.
    fn mailboxes(&self) -> Fut<'_, Vec<(MailboxId, MailboxUse)>>;
    /// (mailbox, source) pairs holding something.
    fn share_rows(&self) -> Fut<'_, u64>;
    fn space(&self) -> Fut<'_, LedgerSpace>;
    /// Bytes of the ledger's own storage that new writes reuse before it
    /// grows (they count as free room).
    fn reusable(&self) -> u64 {
        0
    }
    /// Queues an item to forward, or refuses it (the origin mailbox does
    /// not exist, is over its quota, or the item expired). The same item
    /// from the same sender while it waits is not queued again (its id is
    /// returned). Its payload
    /// counts in the origin's quota until [`Ledger::forward_end`].
    fn forward_enqueue(&self, f: NewForward) -> Fut<'_, Enqueued>;
    /// Items whose next attempt is due at `now` (the expired ones too:
    /// they are to be ended), the longest waiting first, at most `max` and
    /// at most `max_bytes` of payload (at least one if any is due).
    fn forward_due(&self, now: u64, max: usize, max_bytes: usize) -> Fut<'_, Vec<Queued>>;
    /// Ends a queued item (handed on, refused, or given up), releasing
    /// its bytes; with a `notice`, stores that item for the origin in the
    /// same write. Nothing happens if it was gone already.
    fn forward_end(&self, id: u64, notice: Option<NewItem>) -> Fut<'_, Ended>;
    /// Puts each of `ids` off until `next_at` with `error` as its last
    /// error, counting a failed attempt if `failed` (a blob waiting for
    /// its sender's upload has not failed).
    fn forward_later(
        &self,
        ids: Vec<u64>,
        next_at: u64,
        error: String,
        failed: bool,
    ) -> Fut<'_, ()>;
    /// Claims the lane of a next relay — its items, or its blobs — for
    /// this node until `until` (or renews this node's claim), so that the
    /// nodes of a shared ledger hand each lane on from one node at a time;
    /// false if another node holds a claim still valid at `now`. While
    /// another node holds a lane, [`Ledger::forward_due`] leaves its items
    /// out. A ledger of one node needs no claims: always true.
    fn lane_claim(&self, next: NextHop, blobs: bool, now: u64, until: u64) -> Fut<'_, bool> {
        let _ = (next, blobs, now, until);
        Box::pin(async { Ok(true) })
    }
    /// Gives this node's claim on a lane up.
    fn lane_release(&self, next: NextHop, blobs: bool) -> Fut<'_, ()> {
        let _ = (next, blobs);
        Box::pin(async { Ok(()) })
    }
    /// The queue per next relay.
    fn forward_queue(&self) -> Fut<'_, Vec<HopQueue>>;
    /// Which of `items` (mailbox, payload hash) sent by the owner of
    /// `origin` still wait in the forward queue, and how they fare.
    fn forward_waiting(
        &self,
        origin: MailboxId,
        items: Vec<(MailboxId, [u8; 32])>,
    ) -> Fut<'_, Vec<Option<Waiting>>>;
    /// Whether blob `id` is still queued to forward (for any mailbox).
    fn forward_blob_queued(&self, id: BlobId) -> Fut<'_, bool>;
    /// Ends queued entry `id`, which an outbound gateway took (its bytes
    /// leave the origin's quota), and keeps it as [`Handed`] until
    /// `until`; in one write. [`Ended::Gone`] if it was gone already.
    fn forward_handed(&self, id: u64, until: u64) -> Fut<'_, Ended>;
    /// The handed entry a gateway's notice names: by blob id and mailbox
    /// for a blob, else by mailbox and payload hash.
    fn handed_find(
        &self,
        mailbox: MailboxId,
        payload_hash: [u8; 32],
        blob: Option<BlobId>,
    ) -> Fut<'_, Option<Handed>>;
    /// Ends handed entry `id`, storing `notice` for its origin in the
    /// same write (as [`Ledger::forward_end`]).
    fn handed_end(&self, id: u64, notice: Option<NewItem>) -> Fut<'_, Ended>;
    /// Forgets handed entries kept until before `now`; how many.
    fn handed_expire(&self, now: u64) -> Fut<'_, u32>;
    fn commit_stats(&self) -> CommitStats;
    fn latencies(&self) -> &Latencies;
    /// Stops taking writes and waits until every accepted one is durable
    /// (blocking).
    fn close(&self);
}

/// Blob bytes. Called on blocking threads (a write waits for the device).
/// A blob's bytes are only ever read up to the length the [`Ledger`]
/// committed: whatever lies past it (a crash mid-write) is not data.
pub trait BlobStore: Send + Sync + 'static {
    /// Writes `run` (pieces continuing one another from `offset`) to blob
    /// `id`, and makes it durable (and, for a new blob, its name) before
    /// returning. When the run completes the blob, returns the BLAKE3 of
    /// all of it.
    fn write_run(
        &self,
        id: &BlobId,
        offset: u64,
        new: bool,
        run: &[BlobPiece],
        complete: bool,
    ) -> std::io::Result<Option<[u8; 32]>>;
    /// Appends `n` bytes of blob `id` from `offset` to `out`.
    fn read(&self, id: &BlobId, offset: u64, n: usize, out: &mut Vec<u8>) -> std::io::Result<()>;
    /// Removes a blob's bytes and anything kept about it (best effort:
    /// bytes without a ledger row are never served).
    fn remove(&self, id: &BlobId);
    /// Blobs last written at least `age` ago (candidates for orphans).
    fn older_than(&self, age: std::time::Duration) -> std::io::Result<Vec<BlobId>>;
    /// Bytes free for new blobs, if the store can tell.
    fn free_bytes(&self) -> std::io::Result<Option<u64>>;
    /// BLAKE3 of a blob's first `len` bytes, reading them back.
    fn hash(&self, id: &BlobId, len: u64) -> std::io::Result<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        let mut at = 0u64;
        let mut buf = Vec::with_capacity(1 << 20);
        while at < len {
            buf.clear();
            let n = (len - at).min(1 << 20) as usize;
            self.read(id, at, n, &mut buf)?;
            h.update(&buf);
            at += n as u64;
        }
        Ok(*h.finalize().as_bytes())
    }
}

/// Told of each item committed: its mailbox and seq.
pub type Sink = Arc<dyn Fn(&MailboxId, u64) + Send + Sync>;

/// News of new items, for the connections subscribed to a mailbox —
/// those on this node and, for a shared ledger, on every node.
pub trait Notifier: Send + Sync + 'static {
    /// An item `seq` was committed to `mailbox`.
    fn published(&self, mailbox: &MailboxId, seq: u64);
    /// Calls `sink` for every item published from now on (by any node).
    fn listen(&self, sink: Sink);
}

/// The one-process notifier: what is published is heard at once by the
/// listeners of this process.
#[derive(Default)]
pub struct LocalNotifier {
    sinks: std::sync::RwLock<Vec<Sink>>,
}

impl std::fmt::Debug for LocalNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.sinks.read().map_or(0, |s| s.len());
        write!(f, "LocalNotifier({n} listeners)")
    }
}

impl Notifier for LocalNotifier {
    fn published(&self, mailbox: &MailboxId, seq: u64) {
        if let Ok(sinks) = self.sinks.read() {
            for s in sinks.iter() {
                s(mailbox, seq);
            }
        }
    }

    fn listen(&self, sink: Sink) {
        if let Ok(mut sinks) = self.sinks.write() {
            sinks.push(sink);
        }
    }
}
