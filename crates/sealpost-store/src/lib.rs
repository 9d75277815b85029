//! The relay's store: mailboxes, items (sealed messages) and blobs.
//!
//! Metadata and items live in SQLite (WAL, `synchronous=FULL`); blobs are
//! files. **Nothing is acknowledged before it is durable**: every write goes
//! through one writer thread that gathers all requests waiting at that
//! moment into one transaction and one commit (group commit), and only
//! answers them once the commit (and its fsync) returned. Blob pieces are
//! written and fsync'd (file, and directory when the file is new) before
//! their metadata is committed.
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

mod upload;

use std::collections::HashMap;

use rand_core::{OsRng, RngCore};
use sealpost_proto::buffers::AlignedBuf;
use sealpost_proto::relay::{BlobPiece, MAX_BLOB_PIECE};

use crate::upload::Upload;
use rusqlite::{params, Connection, OptionalExtension};
use sealpost_proto::relay::{Item, MailboxId, RefusalCode};
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
}

impl Default for Latencies {
    fn default() -> Self {
        // 100 µs to about 6.5 s, doubling: a fast NVMe fsync to a stalled disk.
        let buckets =
            || prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 17);
        Self {
            commit: prometheus_client::metrics::histogram::Histogram::new(buckets()),
            blob_sync: prometheus_client::metrics::histogram::Histogram::new(buckets()),
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
/// Pages given back in one step (2 MiB): one step is one short write
/// transaction, taken only when the writer has been idle for
/// [`VACUUM_IDLE`], so it never holds a commit back for longer.
pub const VACUUM_STEP_PAGES: i64 = 512;
/// How long the writer waits for work before it takes a step.
pub const VACUUM_IDLE: Duration = Duration::from_millis(20);

/// Items and blobs removed by a sweep; the blob files are deleted after
/// the commit.
type SweepReply = oneshot::Sender<Result<(u64, Vec<[u8; 16]>), StoreError>>;

enum Op {
    Register {
        mailbox: MailboxId,
        key: [u8; 32],
        now: u64,
        reply: oneshot::Sender<Result<Registered, StoreError>>,
    },
    Submit {
        mailbox: MailboxId,
        expires_at: u64,
        hash: [u8; 32],
        payload: Vec<u8>,
        source: Source,
        now: u64,
        reply: oneshot::Sender<Result<SubmitOutcome, StoreError>>,
    },
    Ack {
        mailbox: MailboxId,
        seqs: Vec<u64>,
        reply: oneshot::Sender<Result<u32, StoreError>>,
    },
    BlobMeta {
        blob_id: [u8; 16],
        mailbox: MailboxId,
        total_len: u64,
        hash: [u8; 32],
        expires_at: u64,
        stored: u64,
        complete: bool,
        added: u64,
        source: Source,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    BlobDelete {
        blob_id: [u8; 16],
        mailbox: MailboxId,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Sweep {
        now: u64,
        reply: SweepReply,
    },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mailboxes (
    id BLOB PRIMARY KEY,
    key BLOB NOT NULL,
    quota INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox BLOB NOT NULL,
    item_id BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    hash BLOB NOT NULL,
    payload BLOB NOT NULL,
    -- the Source it came from (NULL for items stored before sources
    -- were kept: those count in no share)
    source BLOB
);
CREATE INDEX IF NOT EXISTS items_mailbox ON items(mailbox, seq);
CREATE INDEX IF NOT EXISTS items_expiry ON items(expires_at);
CREATE TABLE IF NOT EXISTS blobs (
    id BLOB PRIMARY KEY,
    mailbox BLOB NOT NULL,
    total_len INTEGER NOT NULL,
    -- BLAKE3 of the whole blob once complete (stated by the last piece and
    -- checked); zeros while it is being uploaded
    hash BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    source BLOB
);
-- bytes each source holds in each mailbox (rows at 0 are deleted, so the
-- table holds only sources with something stored)
CREATE TABLE IF NOT EXISTS shares (
    mailbox BLOB NOT NULL,
    source BLOB NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (mailbox, source)
) WITHOUT ROWID;
";

/// A blob expiry deleted: (id, mailbox, total_len, source).
type GoneBlob = (Vec<u8>, Vec<u8>, i64, Option<Vec<u8>>);

/// Columns added after a store was first made: (table, column, type).
const ADDED_COLUMNS: &[(&str, &str, &str)] =
    &[("items", "source", "BLOB"), ("blobs", "source", "BLOB")];

/// Adds the columns of [`ADDED_COLUMNS`] an older store lacks.
fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    for (table, column, ty) in ADDED_COLUMNS {
        let has: bool = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists(params![column])?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
        }
    }
    Ok(())
}

/// Takes `delta` bytes off `source`'s share of `mailbox` (a row that
/// reaches 0 goes away).
fn release_share(
    tx: &rusqlite::Transaction<'_>,
    mailbox: &[u8],
    source: Option<&[u8]>,
    delta: i64,
) -> Result<(), rusqlite::Error> {
    let Some(source) = source else { return Ok(()) };
    tx.prepare_cached("UPDATE shares SET used = used - ?3 WHERE mailbox = ?1 AND source = ?2")?
        .execute(params![mailbox, source, delta])?;
    tx.prepare_cached("DELETE FROM shares WHERE mailbox = ?1 AND source = ?2 AND used <= 0")?
        .execute(params![mailbox, source])?;
    Ok(())
}

/// Adds `delta` bytes to `source`'s share of `mailbox`.
fn charge_share(
    tx: &rusqlite::Transaction<'_>,
    mailbox: &[u8],
    source: &[u8],
    delta: i64,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT INTO shares (mailbox, source, used) VALUES (?1, ?2, ?3)
         ON CONFLICT(mailbox, source) DO UPDATE SET used = used + excluded.used",
    )?
    .execute(params![mailbox, source, delta])?;
    Ok(())
}

/// The bytes `source` holds in `mailbox`.
fn share_used(conn: &Connection, mailbox: &[u8], source: &[u8]) -> Result<u64, rusqlite::Error> {
    Ok(conn
        .prepare_cached("SELECT used FROM shares WHERE mailbox = ?1 AND source = ?2")?
        .query_row(params![mailbox, source], |r| r.get::<_, i64>(0))
        .optional()?
        .map(u64_of)
        .unwrap_or(0))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // FULL: with NORMAL, WAL mode may lose the last commits on power loss,
    // and those were acknowledged.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The log is cut back to this after each checkpoint (by default it
    // keeps the largest size it ever reached).
    conn.pragma_update(None, "journal_size_limit", 16i64 << 20)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(conn)
}

/// Makes the database give free pages back in steps (`auto_vacuum =
/// INCREMENTAL`). A new database is made so before its first table; one
/// made by an older version is rewritten once (`VACUUM`), at this open.
fn incremental_vacuum_on(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if mode == 2 {
        return Ok(());
    }
    conn.pragma_update(None, "auto_vacuum", 2i64)?;
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    if pages > 0 {
        tracing::info!(
            "rewriting {} once so that it gives free space back ({} pages)",
            path.display(),
            pages
        );
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

/// One step of giving free pages back, if more than
/// [`VACUUM_KEEP_PAGES`] are free. Returns whether more may remain.
fn vacuum_step(conn: &Connection, stats: &Mutex<CommitStats>) -> bool {
    let step = || -> rusqlite::Result<(i64, bool)> {
        let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let n = (free - VACUUM_KEEP_PAGES).min(VACUUM_STEP_PAGES);
        if n <= 0 {
            return Ok((0, false));
        }
        // Each step of the statement gives back one page: run it to its end.
        let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({n})"))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        let more = free - n > VACUUM_KEEP_PAGES;
        if !more {
            // In WAL mode the file shrinks when the log is copied back.
            conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)")?;
        }
        Ok((n, more))
    };
    match step() {
        Ok((n, more)) => {
            if n > 0 {
                if let Ok(mut s) = stats.lock() {
                    s.vacuum_steps += 1;
                    s.pages_given_back += n as u64;
                }
            }
            more
        }
        Err(e) => {
            tracing::warn!("could not give free database pages back: {e}");
            false
        }
    }
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    reader: Mutex<Connection>,
    blob_dir: PathBuf,
    limits: Limits,
    stats: Arc<Mutex<CommitStats>>,
    latencies: Latencies,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Blob pieces are written one at a time: two uploads racing on the
    /// same blob must not interleave their file writes and length commits.
    blob_lock: tokio::sync::Mutex<()>,
    /// Uploads in progress (open files, running hashes), at most
    /// [`MAX_OPEN_UPLOADS`]; one evicted or lost in a restart is rebuilt
    /// from its file.
    uploads: Mutex<HashMap<[u8; 16], Upload>>,
    /// The aligned buffer direct writes go through (one: pieces are
    /// written one at a time).
    direct_buf: Mutex<Option<AlignedBuf>>,
    /// The last pieces stored, kept in memory (see [`Recent`]).
    recent: Mutex<Recent>,
    /// Aligned buffers for direct reads, reused (at most 4 kept).
    read_bufs: Mutex<Vec<AlignedBuf>>,
    /// Blob reads served from [`Recent`], and from the files.
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

/// The last blob pieces stored, at most [`RECENT_BYTES`] of them. A
/// recipient downloading a file while it is uploaded asks for each piece
/// soon after it was stored; since pieces are written around the page
/// cache (`O_DIRECT`), serving those reads from here instead of the device
/// saves a disk read and a kernel copy per piece. Only committed pieces
/// are here, and reads never go past the committed length.
#[derive(Default)]
struct Recent {
    pieces: std::collections::VecDeque<([u8; 16], u64, Arc<Vec<u8>>)>,
    bytes: usize,
}

const RECENT_BYTES: usize = 16 << 20;

impl Recent {
    fn push(&mut self, id: [u8; 16], offset: u64, data: Vec<u8>) {
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
    fn read(&self, id: &[u8; 16], offset: u64, n: usize) -> Option<KeptBytes> {
        let (_, at, data) = self.pieces.iter().rev().find(|(pid, at, data)| {
            pid == id && *at <= offset && offset + n as u64 <= at + data.len() as u64
        })?;
        let start = (offset - at) as usize;
        Some((data.clone(), start..start + n))
    }

    fn forget(&mut self, id: &[u8; 16]) {
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
const REMOVE_STEP: u64 = 16 << 20;

/// Removes a file by cutting it down [`REMOVE_STEP`] at a time first.
/// Freeing a large file's blocks in one go holds the file system's
/// journal: measured here, a 1 GiB blob's `unlink` made a concurrent
/// `fsync` (the database's commits, everyone's acknowledgements) wait up
/// to 30 ms; in 16 MiB steps at most 4 ms, for the same total time.
fn remove_gradually(path: &Path) {
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
struct Followers {
    reads: HashMap<[u8; 16], (u64, Instant)>,
}

/// A follower this far behind the upload still finds what it reads next
/// in [`Recent`] (which holds [`RECENT_BYTES`]) after a run of pieces (up
/// to 8 MiB) was stored meanwhile. With several uploads streaming at once
/// they share that memory, and a reader may find a piece gone and read
/// it from the device instead (measured with two: 16–84 MiB of 1 GiB).
pub const PACE_HOLD: u64 = 8 << 20;
/// Further behind than this, a recipient is not streaming.
const FOLLOW_REACH: u64 = 64 << 20;
/// A recipient that has not read for this long is not streaming.
const FOLLOW_FRESH: std::time::Duration = std::time::Duration::from_millis(300);
/// The longest a run of pieces is held back.
pub const PACE_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
const MAX_FOLLOWERS: usize = 256;

impl Followers {
    /// A read of `blob_id` up to `end`, at `now`.
    fn read(&mut self, blob_id: &[u8; 16], end: u64, now: Instant) {
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
    fn behind(&self, blob_id: &[u8; 16], stored: u64, now: Instant) -> Option<u64> {
        let (end, at) = self.reads.get(blob_id)?;
        let behind = stored.saturating_sub(*end);
        (now.duration_since(*at) < FOLLOW_FRESH && behind <= FOLLOW_REACH).then_some(behind)
    }

    fn forget(&mut self, blob_id: &[u8; 16]) {
        self.reads.remove(blob_id);
    }
}

/// Uploads whose state is kept between pieces.
const MAX_OPEN_UPLOADS: usize = 64;

/// What writing a piece gives back: the upload's state (unless it is
/// complete), the blob's hash (if it is), the aligned buffer and the
/// piece.
type Written = (
    Option<Upload>,
    Option<blake3::Hash>,
    AlignedBuf,
    Vec<BlobPiece>,
);

/// At most this many pieces (about 1 MiB each) share one `fdatasync` and
/// one commit.
const MAX_RUN: usize = 16;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner.blob_dir.display())
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, StoreError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // Mailbox keys, who receives how much and when, and the stored
        // items: nobody but the relay's user reads them.
        let private_dir = |d: &Path| -> Result<(), StoreError> {
            fs::create_dir_all(d).map_err(io_err("creating", d))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))
                .map_err(io_err("setting permissions on", d))
        };
        private_dir(dir)?;
        let blob_dir = dir.join("blobs");
        private_dir(&blob_dir)?;
        let db = dir.join("relay.db");
        // Created 0600 (SQLite gives its WAL and shm the same mode); one
        // made wider by an older version is tightened.
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&db)
            .map_err(io_err("creating", &db))?;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            let p = PathBuf::from(p);
            if fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                    .map_err(io_err("setting permissions on", &p))?;
            }
        }
        let writer_conn = open_conn(&db)?;
        incremental_vacuum_on(&writer_conn, &db)?;
        writer_conn.execute_batch(SCHEMA)?;
        migrate(&writer_conn)?;
        let reader = open_conn(&db)?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(CommitStats::default()));
        let w_stats = stats.clone();
        let latencies = Latencies::default();
        let w_commit = latencies.commit.clone();
        let handle = std::thread::Builder::new()
            .name("sealpost-store-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, limits, w_stats, w_commit))
            .map_err(io_err("starting the writer for", dir))?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                reader: Mutex::new(reader),
                blob_dir,
                limits,
                stats,
                latencies,
                writer: Mutex::new(Some(handle)),
                blob_lock: tokio::sync::Mutex::new(()),
                uploads: Mutex::new(HashMap::new()),
                direct_buf: Mutex::new(None),
                recent: Mutex::new(Recent::default()),
                read_bufs: Mutex::new(Vec::new()),
                reads_memory: Default::default(),
                reads_disk: Default::default(),
                followers: Mutex::new(Followers::default()),
                free_space: Mutex::new(None),
                follower_read: tokio::sync::Notify::new(),
                paced_runs: Default::default(),
                paced_micros: Default::default(),
            }),
        })
    }

    /// Stops taking writes and waits until every accepted write committed.
    pub fn close(&self) {
        if let Ok(mut tx) = self.inner.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.inner.writer.lock() {
            if let Some(h) = w.take() {
                let _ = h.join();
            }
        }
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// The latency histograms of commits and blob syncs.
    pub fn latencies(&self) -> &Latencies {
        &self.inner.latencies
    }

    pub fn commit_stats(&self) -> CommitStats {
        self.inner.stats.lock().map(|s| *s).unwrap_or_default()
    }

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
    async fn pace(&self, blob_id: &[u8; 16], offset: u64) {
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

    fn send(&self, op: Op) -> Result<(), StoreError> {
        let guard = self.inner.tx.lock().map_err(|_| StoreError::Closed)?;
        guard
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(op)
            .map_err(|_| StoreError::Closed)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Creates a mailbox for `key`. False if it existed already.
    pub async fn register(
        &self,
        mailbox: MailboxId,
        key: [u8; 32],
        now: u64,
    ) -> Result<Registered, StoreError> {
        self.call(|reply| Op::Register {
            mailbox,
            key,
            now,
            reply,
        })
        .await
    }

    /// Whether a mailbox exists.
    pub fn has_mailbox(&self, mailbox: &MailboxId) -> Result<bool, StoreError> {
        Ok(self.mailbox_key(mailbox)?.is_some())
    }

    /// Stores an item durably, or refuses it with a reason. The caller has
    /// checked the payload against its hash.
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
                let st = rustix::fs::statvfs(&self.inner.blob_dir).map_err(|e| StoreError::Io {
                    what: "measuring the free space of",
                    path: self.inner.blob_dir.clone(),
                    source: e.into(),
                })?;
                // Pages SQLite freed (deleted items) are reused for new
                // items before its file grows: they count as room.
                let reusable = self
                    .inner
                    .reader
                    .lock()
                    .ok()
                    .and_then(|c| {
                        c.query_row(
                            "SELECT freelist_count * page_size FROM pragma_freelist_count, pragma_page_size",
                            [],
                            |r| r.get::<_, i64>(0),
                        )
                        .ok()
                    })
                    .map_or(0, u64_of);
                (
                    Instant::now(),
                    st.f_bavail
                        .saturating_mul(st.f_frsize)
                        .saturating_add(reusable),
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
        self.call(|reply| Op::Submit {
            mailbox,
            expires_at,
            hash,
            payload,
            source,
            now,
            reply,
        })
        .await
    }

    /// Deletes the listed items of `mailbox` (others' items are untouched).
    pub async fn ack(&self, mailbox: MailboxId, seqs: Vec<u64>) -> Result<u32, StoreError> {
        self.call(|reply| Op::Ack {
            mailbox,
            seqs,
            reply,
        })
        .await
    }

    /// Reads `n` bytes from `offset` of a blob file with `O_DIRECT` into
    /// `out`: the device's bytes land in a reused aligned buffer without
    /// passing through the page cache (pieces were written around it, so
    /// a buffered read would fill the cache and copy out of it: on this
    /// project's machines the copy out of freshly filled cache pages cost
    /// more CPU than anything else the relay did).
    fn read_direct(&self, path: &Path, offset: u64, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
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
    fn take_upload(&self, blob_id: &[u8; 16]) -> Option<Upload> {
        self.inner.uploads.lock().ok()?.remove(blob_id)
    }

    /// Drops everything kept about a blob: its upload state and its
    /// pieces in memory (it was deleted, expired or discarded).
    fn forget_upload(&self, blob_id: &[u8; 16]) {
        if let Ok(mut r) = self.inner.recent.lock() {
            r.forget(blob_id);
        }
        if let Ok(mut f) = self.inner.followers.lock() {
            f.forget(blob_id);
        }
        self.take_upload(blob_id);
    }

    /// Deletes expired items and blobs; returns how many.
    pub async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        let (n, blobs) = self.call(|reply| Op::Sweep { now, reply }).await?;
        let mut paths = Vec::with_capacity(blobs.len());
        for id in blobs {
            self.forget_upload(&id);
            paths.push(self.blob_path(&id));
        }
        self.remove_blob_files(paths).await;
        Ok(n)
    }

    /// Removes blob files whose rows are gone (best effort: a file left
    /// behind has no row, so it is never served). On the blocking pool:
    /// freeing a large file's blocks takes a while (about 150 ms for
    /// 1 GiB on ext4 here), which a runtime worker must not spend.
    async fn remove_blob_files(&self, paths: Vec<PathBuf>) {
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

    pub fn mailbox_key(&self, mailbox: &MailboxId) -> Result<Option<[u8; 32]>, StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        let key: Option<Vec<u8>> = conn
            .query_row(
                "SELECT key FROM mailboxes WHERE id = ?1",
                params![mailbox.0.to_vec()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(key.and_then(|k| k.try_into().ok()))
    }

    /// Items of `mailbox` after `after`, at most `max` and at most
    /// `max_bytes` of payload (at least one item if any). Each payload is
    /// checked against its hash on the way out; a damaged one is returned
    /// as it is (the recipient detects it) and reported in `damaged`.
    pub fn fetch(
        &self,
        mailbox: &MailboxId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Item>, bool, u64), StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        let mut stmt = conn.prepare_cached(
            "SELECT seq, received_at, expires_at, hash, payload FROM items
             WHERE mailbox = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let mut rows = stmt.query(params![mailbox.0.to_vec(), i64_of(after), (max + 1) as i64])?;
        let mut items = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        let mut damaged = 0u64;
        while let Some(row) = rows.next()? {
            let payload: Vec<u8> = row.get(4)?;
            if items.len() == max || (!items.is_empty() && bytes + payload.len() > max_bytes) {
                more = true;
                break;
            }
            let hash: Vec<u8> = row.get(3)?;
            let hash: [u8; 32] = hash.try_into().unwrap_or([0; 32]);
            if blake3::hash(&payload).as_bytes() != &hash {
                damaged += 1;
            }
            bytes += payload.len();
            items.push(Item {
                seq: u64_of(row.get(0)?),
                received_at: u64_of(row.get(1)?),
                expires_at: u64_of(row.get(2)?),
                payload_hash: hash,
                payload,
            });
        }
        Ok((items, more, damaged))
    }

    /// The bytes of `mailbox` that items and blobs from `source` hold.
    pub fn share_used(&self, mailbox: &MailboxId, source: &Source) -> Result<u64, StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        Ok(share_used(&conn, &mailbox.0, source.as_bytes())?)
    }

    /// How many (mailbox, source) pairs hold something (the share table's
    /// rows: it does not grow with history).
    pub fn share_rows(&self) -> Result<u64, StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM shares", [], |r| r.get(0))?;
        Ok(u64_of(n))
    }

    /// (items, bytes used, quota) of a mailbox.
    pub fn status(&self, mailbox: &MailboxId) -> Result<(u64, u64, u64), StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        let (used, quota): (i64, i64) = conn
            .query_row(
                "SELECT used, quota FROM mailboxes WHERE id = ?1",
                params![mailbox.0.to_vec()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, 0));
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM items WHERE mailbox = ?1",
            params![mailbox.0.to_vec()],
            |r| r.get(0),
        )?;
        Ok((u64_of(n), u64_of(used), u64_of(quota)))
    }

    /// Totals over the whole relay: (mailboxes, items, item bytes, blobs).
    /// The database file's size in pages' bytes, and how much of it is
    /// free pages (given back in steps while the writer is idle, down to
    /// [`VACUUM_KEEP_PAGES`]).
    pub fn db_space(&self) -> Result<(u64, u64), StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        let (size, free): (i64, i64) = conn.query_row(
            "SELECT page_count * page_size, freelist_count * page_size \
             FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((u64_of(size), u64_of(free)))
    }

    pub fn totals(&self) -> Result<(u64, u64, u64, u64), StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        let m: i64 = conn.query_row("SELECT COUNT(*) FROM mailboxes", [], |r| r.get(0))?;
        let (i, b): (i64, i64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM items",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let bl: i64 = conn.query_row("SELECT COUNT(*) FROM blobs", [], |r| r.get(0))?;
        Ok((u64_of(m), u64_of(i), u64_of(b), u64_of(bl)))
    }

    /// Every mailbox with its queued items and bytes used.
    pub fn mailboxes(&self) -> Result<Vec<MailboxRow>, StoreError> {
        let conn = self.inner.reader.lock().map_err(|_| StoreError::Closed)?;
        let mut stmt = conn.prepare(
            "SELECT m.id, m.used, m.quota, (SELECT COUNT(*) FROM items i WHERE i.mailbox = m.id)
             FROM mailboxes m ORDER BY m.used DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            let id: Vec<u8> = r.get(0)?;
            Ok(MailboxRow {
                id: MailboxId(id.try_into().unwrap_or([0; 32])),
                used: u64_of(r.get(1)?),
                quota: u64_of(r.get(2)?),
                items: u64_of(r.get(3)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn blob_path(&self, id: &[u8; 16]) -> PathBuf {
        blob_path(&self.inner.blob_dir, id)
    }

    fn blob_row(&self, id: &[u8; 16]) -> Result<Option<BlobRow>, StoreError> {
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
    async fn blob_put_run(
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxRow {
    pub id: MailboxId,
    pub items: u64,
    pub used: u64,
    pub quota: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub items: u64,
    pub damaged_items: Vec<u64>,
    pub blobs: u64,
    pub damaged_blobs: Vec<[u8; 16]>,
}

struct BlobRow {
    mailbox: MailboxId,
    total_len: u64,
    stored: u64,
    complete: bool,
}

/// A blob file no row names is left alone until it is this old (an upload's
/// file exists a moment before its first piece's row is committed).
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// The blob id a file name in the blob directory stands for, if it is one.
fn blob_id_of_name(name: &str) -> Option<[u8; 16]> {
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

fn blob_path(dir: &Path, id: &[u8; 16]) -> PathBuf {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(hex)
}

/// At most this many writes share one transaction; bounds a commit's
/// latency under a flood.
const MAX_GROUP: usize = 4096;

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    limits: Limits,
    stats: Arc<Mutex<CommitStats>>,
    commit_latency: prometheus_client::metrics::histogram::Histogram,
) {
    // Each op's reply is held until the transaction holding it committed.
    let mut group: Vec<Op> = Vec::with_capacity(MAX_GROUP);
    // Whether pages may have been freed since the last look: after any
    // commit, the writer gives free pages back in steps while idle.
    let mut maybe_free = true;
    loop {
        let first = if maybe_free {
            match rx.recv_timeout(VACUUM_IDLE) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    maybe_free = vacuum_step(&conn, &stats);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(op) => op,
                Err(_) => break,
            }
        };
        maybe_free = true;
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let n = group.len() as u64;
        let mut replies = Vec::with_capacity(group.len());
        let result = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction()?;
            for op in group.drain(..) {
                replies.push(apply(&tx, op, &limits)?);
            }
            tx.commit()
        })();
        // Counted before anyone is answered, so a caller that reads the
        // statistics after its answer sees its own commit.
        if let Ok(mut s) = stats.lock() {
            s.commits += 1;
            s.writes += n;
            s.last_commit_micros = started.elapsed().as_micros() as u64;
            commit_latency.observe(started.elapsed().as_secs_f64());
            if result.is_err() {
                s.failures += 1;
            }
        }
        match result {
            Ok(()) => {
                for r in replies {
                    r.send();
                }
            }
            // The transaction rolled back: nothing in it was stored. Every
            // caller whose write was in it is told why (the op that failed
            // and those not reached yet were dropped: their callers see
            // the store closed); nothing was acknowledged.
            Err(e) => {
                let detail = e.to_string();
                let disk_full = db_disk_full(&e);
                for r in replies {
                    r.fail(disk_full, &detail);
                }
            }
        }
        group.clear();
    }
}

enum Reply {
    Bool(oneshot::Sender<Result<bool, StoreError>>, bool),
    Register(oneshot::Sender<Result<Registered, StoreError>>, Registered),
    Submit(
        oneshot::Sender<Result<SubmitOutcome, StoreError>>,
        SubmitOutcome,
    ),
    Count(oneshot::Sender<Result<u32, StoreError>>, u32),
    Unit(oneshot::Sender<Result<(), StoreError>>),
    Sweep(SweepReply, u64, Vec<[u8; 16]>),
}

impl Reply {
    /// Tells the caller its write was not stored, and why.
    fn fail(self, disk_full: bool, detail: &str) {
        let e = || StoreError::Storage {
            disk_full,
            detail: detail.to_owned(),
        };
        match self {
            Self::Bool(s, _) => drop(s.send(Err(e()))),
            Self::Register(s, _) => drop(s.send(Err(e()))),
            Self::Submit(s, _) => drop(s.send(Err(e()))),
            Self::Count(s, _) => drop(s.send(Err(e()))),
            Self::Unit(s) => drop(s.send(Err(e()))),
            Self::Sweep(s, _, _) => drop(s.send(Err(e()))),
        }
    }

    fn send(self) {
        // A caller that went away (its connection dropped) is fine: the
        // write is durable either way.
        match self {
            Self::Bool(s, v) => drop(s.send(Ok(v))),
            Self::Register(s, v) => drop(s.send(Ok(v))),
            Self::Submit(s, v) => drop(s.send(Ok(v))),
            Self::Count(s, v) => drop(s.send(Ok(v))),
            Self::Unit(s) => drop(s.send(Ok(()))),
            Self::Sweep(s, n, b) => drop(s.send(Ok((n, b)))),
        }
    }
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    op: Op,
    limits: &Limits,
) -> Result<Reply, rusqlite::Error> {
    Ok(match op {
        Op::Register {
            mailbox,
            key,
            now,
            reply,
        } => {
            // The cap is checked in the same transaction as the insert, so
            // concurrent registrations cannot pass it together.
            let n = tx.execute(
                "INSERT OR IGNORE INTO mailboxes (id, key, quota, used, created_at) \
                 SELECT ?1, ?2, ?3, 0, ?4 WHERE (SELECT COUNT(*) FROM mailboxes) < ?5",
                params![
                    mailbox.0.to_vec(),
                    key.to_vec(),
                    i64_of(limits.mailbox_quota),
                    i64_of(now),
                    i64_of(limits.max_mailboxes.unwrap_or(u64::MAX))
                ],
            )?;
            let outcome = if n == 1 {
                Registered::Created
            } else {
                let exists = tx
                    .query_row(
                        "SELECT 1 FROM mailboxes WHERE id = ?1",
                        params![mailbox.0.to_vec()],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                if exists {
                    Registered::Existing
                } else {
                    Registered::Full
                }
            };
            Reply::Register(reply, outcome)
        }
        Op::Submit {
            mailbox,
            expires_at,
            hash,
            payload,
            source,
            now,
            reply,
        } => {
            let quota: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT used, quota FROM mailboxes WHERE id = ?1",
                    params![mailbox.0.to_vec()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let outcome = match quota {
                None => SubmitOutcome::Refused(RefusalCode::UnknownMailbox),
                Some(_) if expires_at <= now => SubmitOutcome::Refused(RefusalCode::Expired),
                Some((used, q)) if u64_of(used) + payload.len() as u64 > u64_of(q) => {
                    SubmitOutcome::Refused(RefusalCode::OverQuota)
                }
                Some((_, q))
                    if share_used(tx, &mailbox.0, source.as_bytes())? + payload.len() as u64
                        > limits.source_share(u64_of(q)) =>
                {
                    SubmitOutcome::Refused(RefusalCode::OverQuota)
                }
                Some(_) => {
                    let mut item_id = [0u8; 16];
                    OsRng.fill_bytes(&mut item_id);
                    tx.prepare_cached(
                        "INSERT INTO items (mailbox, item_id, received_at, expires_at, hash, payload, source)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )?
                    .execute(params![
                        mailbox.0.to_vec(),
                        item_id.to_vec(),
                        i64_of(now),
                        i64_of(expires_at),
                        hash.to_vec(),
                        payload,
                        source.as_bytes()
                    ])?;
                    let seq = u64_of(tx.last_insert_rowid());
                    tx.prepare_cached("UPDATE mailboxes SET used = used + ?2 WHERE id = ?1")?
                        .execute(params![mailbox.0.to_vec(), payload.len() as i64])?;
                    charge_share(tx, &mailbox.0, source.as_bytes(), payload.len() as i64)?;
                    SubmitOutcome::Stored { seq, item_id }
                }
            };
            Reply::Submit(reply, outcome)
        }
        Op::Ack {
            mailbox,
            seqs,
            reply,
        } => {
            let mut count = 0u32;
            let mut freed = 0i64;
            for seq in seqs {
                let gone: Option<(i64, Option<Vec<u8>>)> = tx
                    .prepare_cached(
                        "DELETE FROM items WHERE seq = ?1 AND mailbox = ?2 RETURNING LENGTH(payload), source",
                    )?
                    .query_row(params![i64_of(seq), mailbox.0.to_vec()], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                if let Some((l, source)) = gone {
                    count += 1;
                    freed += l;
                    release_share(tx, &mailbox.0, source.as_deref(), l)?;
                }
            }
            tx.execute(
                "UPDATE mailboxes SET used = MAX(0, used - ?2) WHERE id = ?1",
                params![mailbox.0.to_vec(), freed],
            )?;
            Reply::Count(reply, count)
        }
        Op::BlobMeta {
            blob_id,
            mailbox,
            total_len,
            hash,
            expires_at,
            stored,
            complete,
            added,
            source,
            reply,
        } => {
            tx.execute(
                "INSERT INTO blobs (id, mailbox, total_len, hash, expires_at, stored, complete, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(id) DO UPDATE SET stored = excluded.stored, complete = excluded.complete,
                     hash = excluded.hash",
                params![
                    blob_id.to_vec(),
                    mailbox.0.to_vec(),
                    i64_of(total_len),
                    hash.to_vec(),
                    i64_of(expires_at),
                    i64_of(stored),
                    complete as i64,
                    source.as_bytes()
                ],
            )?;
            if added > 0 {
                tx.execute(
                    "UPDATE mailboxes SET used = used + ?2 WHERE id = ?1",
                    params![mailbox.0.to_vec(), i64_of(added)],
                )?;
                charge_share(tx, &mailbox.0, source.as_bytes(), i64_of(added))?;
            }
            Reply::Unit(reply)
        }
        Op::BlobDelete {
            blob_id,
            mailbox,
            reply,
        } => {
            let gone: Option<(i64, Option<Vec<u8>>)> = tx
                .query_row(
                    "DELETE FROM blobs WHERE id = ?1 AND mailbox = ?2 RETURNING total_len, source",
                    params![blob_id.to_vec(), mailbox.0.to_vec()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((l, source)) = &gone {
                tx.execute(
                    "UPDATE mailboxes SET used = MAX(0, used - ?2) WHERE id = ?1",
                    params![mailbox.0.to_vec(), l],
                )?;
                release_share(tx, &mailbox.0, source.as_deref(), *l)?;
            }
            Reply::Bool(reply, gone.is_some())
        }
        Op::Sweep { now, reply } => {
            let mut n = 0u64;
            {
                let mut stmt = tx.prepare(
                    "DELETE FROM items WHERE expires_at <= ?1 RETURNING mailbox, LENGTH(payload), source",
                )?;
                let freed: Vec<(Vec<u8>, i64, Option<Vec<u8>>)> = stmt
                    .query_map(params![i64_of(now)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect::<Result<_, _>>()?;
                for (mb, len, source) in freed {
                    n += 1;
                    tx.execute(
                        "UPDATE mailboxes SET used = MAX(0, used - ?2) WHERE id = ?1",
                        params![mb, len],
                    )?;
                    release_share(tx, &mb, source.as_deref(), len)?;
                }
            }
            let mut stmt = tx.prepare(
                "DELETE FROM blobs WHERE expires_at <= ?1 RETURNING id, mailbox, total_len, source",
            )?;
            let gone: Vec<GoneBlob> = stmt
                .query_map(params![i64_of(now)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut ids = Vec::new();
            for (id, mb, len, source) in gone {
                n += 1;
                tx.execute(
                    "UPDATE mailboxes SET used = MAX(0, used - ?2) WHERE id = ?1",
                    params![mb, len],
                )?;
                release_share(tx, &mb, source.as_deref(), len)?;
                ids.push(id.try_into().unwrap_or([0; 16]));
            }
            Reply::Sweep(reply, n, ids)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only names a blob file can have map back to a blob id.
    #[test]
    fn blob_file_names_map_back_to_ids() {
        let id = [0xab; 16];
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
        let id = [1u8; 16];
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
            f.read(
                &[
                    (k % 256) as u8,
                    (k / 256) as u8 + 2,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
                1,
                t0,
            );
        }
        assert!(f.reads.len() <= MAX_FOLLOWERS);
        let late = [9u8; 16];
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
