//! Moving a single relay's embedded store (SQLite and blob files) into a
//! cluster's PostgreSQL database and, optionally, an S3 bucket
//! (`sealpost relay migrate`).
//!
//! Every row is copied as it is — mailbox seqs, forward ids and all — so
//! agents and senders see the same relay afterwards. The copy is
//! idempotent (rows already there are left alone; a blob whose row is not
//! in the target yet is copied again from its first byte), so an
//! interrupted migration is finished by running it again. Then every row
//! is compared with its source and every byte read back and hashed; only
//! then is the migration recorded as finished, and only then will relay
//! nodes open the database.
//!
//! Two marks keep the two copies from both being served: before the
//! first row is copied, the source directory gets [`MARK`] (the embedded
//! store refuses to open while it is there), and the database a row in
//! `sealpost_migrations` that stays unfinished (nodes refuse to start on
//! the database) until the check passed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use sealpost_proto::relay::{BlobId, BlobPiece, MailboxId, MAX_BLOB_PIECE};

use crate::postgres::{self, pg_err, pool_err};
use crate::{BlobStore, FileBlobs, Latencies, StoreError};

/// The file in the source store directory that says it was moved.
pub const MARK: &str = "migrated-to-postgresql";

/// Rows read or written per round, and the most payload bytes one round
/// holds in memory (items and forwards are up to 1 MiB each).
const PAGE_ROWS: i64 = 512;
const PAGE_BYTES: usize = 16 << 20;
/// Bytes of a blob copied per stored run (one object in a bucket).
const RUN_PIECES: usize = 8;

/// What a migration found, copied and checked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// This run finished a migration an earlier run had started.
    pub resumed: bool,
    /// The migration had already finished: this run only checked it.
    pub already_done: bool,
    pub mailboxes: u64,
    pub items: u64,
    pub item_bytes: u64,
    pub blobs: u64,
    /// Blob bytes checked in the target (copied into the bucket, or left
    /// in the data directory's blob files without `--blobs`).
    pub blob_bytes: u64,
    /// Blob bytes copied by this run (0 when they stay in files).
    pub blob_bytes_copied: u64,
    pub shares: u64,
    pub forwards: u64,
    pub handed: u64,
    /// Source items whose payload did not match their recorded hash
    /// (damaged before the migration; copied as they are, and `relay
    /// scrub` reports them).
    pub damaged_in_source: u64,
}

/// A migration's steps, for progress lines.
pub type Progress<'a> = &'a mut (dyn FnMut(&str) + Send);

fn err(detail: impl Into<String>) -> StoreError {
    StoreError::Storage {
        disk_full: false,
        detail: detail.into(),
    }
}

fn mismatch(what: &str, key: impl std::fmt::Display) -> StoreError {
    err(format!(
        "the check after copying found {what} {key} different in the database from the source; the migration is not finished and nodes will not start on this database. Run `sealpost relay migrate` again; if it says so again, the database holds data that did not come from this relay: migrate into an empty database"
    ))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Moves the embedded store in `dir` (the relay's `DATA/store`) into the
/// PostgreSQL database at `url` and, with `blobs`, its blob bytes into
/// that S3 bucket. The caller holds the relay's lock on the data
/// directory (no relay may serve it meanwhile).
pub async fn migrate(
    dir: &Path,
    url: &str,
    blobs: Option<&str>,
    progress: Progress<'_>,
) -> Result<Report, StoreError> {
    let db_path = dir.join("relay.db");
    if !db_path.exists() {
        return Err(err(format!(
            "{} does not exist: there is no embedded store to move (is --data the relay's data directory?)",
            db_path.display()
        )));
    }
    let src = crate::writer::open_conn(&db_path)?;
    src.execute_batch(crate::schema::SCHEMA)?;
    crate::schema::migrate(&src)?;

    let pool = postgres::pool_named(url, 2, "sealpost-migrate")?;
    let mut pg = pool.get().await.map_err(pool_err)?;
    // No node may use the database meanwhile (a node started after this
    // is refused by the unfinished migration).
    let nodes: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'sealpost-relay'",
            &[],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    if nodes > 0 {
        return Err(err(format!(
            "relay nodes are connected to the database at {} ({nodes} connections named sealpost-relay); stop them before migrating into it",
            postgres::redacted(url)
        )));
    }
    postgres::setup_for_migration(url).await?;

    // Which migration this is: the mark's id, or a new one.
    let mark_path = dir.join(MARK);
    let id = match read_mark(&mark_path)? {
        Some(id) => id,
        None => {
            let mut id = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
            id
        }
    };
    // Where the blob bytes go, as one migration keeps it (a second run
    // with another --blobs would check, or fill, the wrong place).
    let blobs_at = match blobs {
        Some(b) => format!("{:?}", crate::s3::S3Config::parse(b).map_err(err)?),
        None => "files in the data directory".to_owned(),
    };
    let row = pg
        .query_opt(
            "SELECT finished_at IS NOT NULL, blobs FROM sealpost_migrations WHERE id = $1",
            &[&&id[..]],
        )
        .await
        .map_err(pg_err)?;
    let mut report = Report::default();
    match row {
        Some(r) => {
            report.already_done = r.get::<_, bool>(0);
            report.resumed = !report.already_done;
            let first: Option<String> = r.get(1);
            if first.as_deref().is_some_and(|f| f != blobs_at) {
                return Err(err(format!(
                    "this migration put blob bytes in {}, and this run names {blobs_at}: give the same --blobs as the first run",
                    first.unwrap_or_default()
                )));
            }
        }
        None => {
            let held: i64 = pg
                .query_one(
                    "SELECT (SELECT count(*) FROM mailboxes) + (SELECT count(*) FROM blobs) \
                     + (SELECT count(*) FROM forwards) + (SELECT count(*) FROM handed) \
                     + (SELECT count(*) FROM sealpost_migrations)",
                    &[],
                )
                .await
                .map_err(pg_err)?
                .get(0);
            if held > 0 {
                return Err(err(format!(
                    "the database at {} already holds a relay's data (or another migration); migrate into an empty database",
                    postgres::redacted(url)
                )));
            }
            write_mark(&mark_path, &id, url, blobs)?;
            pg.execute(
                "INSERT INTO sealpost_migrations (id, started_at, blobs) VALUES ($1, $2, $3)",
                &[&&id[..], &i64_of(unix_now()), &blobs_at],
            )
            .await
            .map_err(pg_err)?;
        }
    }
    if read_mark(&mark_path)?.is_none() {
        // Resumed from a database whose mark was removed: put it back.
        write_mark(&mark_path, &id, url, blobs)?;
    }

    let target_blobs: Option<Arc<dyn BlobStore>> = match blobs {
        Some(b) => {
            let config = crate::s3::S3Config::parse(b).map_err(err)?;
            let opened = tokio::task::spawn_blocking(move || crate::s3::S3Blobs::open(&config))
                .await
                .map_err(|_| StoreError::Closed)?
                .map_err(|e| err(e.to_string()))?;
            Some(Arc::new(opened))
        }
        None => None,
    };
    let source_blobs = Arc::new(FileBlobs::open(
        &dir.join("blobs"),
        Latencies::default().blob_sync,
    )?);

    if !report.already_done {
        progress("copying mailboxes");
        copy_mailboxes(&src, &mut pg).await?;
        progress("copying items");
        copy_items(&src, &mut pg).await?;
        progress("copying shares, forwards and handed items");
        copy_small_tables(&src, &mut pg).await?;
        progress("copying blobs");
        report.blob_bytes_copied = copy_blobs(
            &src,
            &mut pg,
            &source_blobs,
            target_blobs.as_ref(),
            progress,
        )
        .await?;
    }

    progress("checking every row and every byte against the source");
    check(
        &src,
        &mut pg,
        &source_blobs,
        target_blobs.as_ref(),
        &mut report,
    )
    .await?;
    if !report.already_done {
        pg.execute(
            "UPDATE sealpost_migrations SET finished_at = $2 WHERE id = $1",
            &[&&id[..], &i64_of(unix_now())],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(report)
}

/// The migration id in the source's mark, if it has one.
fn read_mark(path: &Path) -> Result<Option<[u8; 16]>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(format!("cannot read {}: {e}", path.display()))),
    };
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("id = "))
        .and_then(|h| {
            let h = h.trim().trim_matches('"');
            (h.len() == 32)
                .then(|| {
                    (0..16)
                        .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
                        .collect::<Option<Vec<u8>>>()
                })
                .flatten()
        })
        .and_then(|v| <[u8; 16]>::try_from(v).ok())
        .ok_or_else(|| {
            err(format!(
                "{} is not a migration mark sealpost wrote; move it away and run again",
                path.display()
            ))
        })?;
    Ok(Some(id))
}

/// Writes the mark durably (file and directory) before anything is
/// copied.
fn write_mark(
    path: &Path,
    id: &[u8; 16],
    url: &str,
    blobs: Option<&str>,
) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!("{MARK}.tmp"));
    let text = format!(
        "# This relay's store was moved by `sealpost relay migrate`: the embedded\n\
         # store here is no longer the relay's; serve with --database (and --blobs).\n\
         # Delete this file only to serve this old copy again, knowingly.\n\
         id = \"{}\"\ndatabase = \"{}\"\nblobs = \"{}\"\nstarted_at = {}\n",
        hex(id),
        postgres::redacted(url),
        blobs
            .map(|b| b.split('?').next().unwrap_or(b).to_owned())
            .unwrap_or_else(|| "files in this directory".into()),
        unix_now()
    );
    let io = |e: std::io::Error| err(format!("cannot write {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Refuses to open an embedded store that was moved to PostgreSQL.
pub(crate) fn refuse_if_moved(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(MARK);
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let to = text
        .lines()
        .find_map(|l| l.strip_prefix("database = "))
        .map(|s| s.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| "PostgreSQL".into());
    Err(err(format!(
        "this relay's store was moved to {to} by `sealpost relay migrate` ({} says so): serve it with --database (and --blobs if it was given), or run the migration again to finish it; delete that file only to serve this old copy again",
        path.display()
    )))
}

type Pg = deadpool_postgres::Object;

async fn copy_mailboxes(src: &Connection, pg: &mut Pg) -> Result<(), StoreError> {
    // Seqs were one sequence over all mailboxes: each mailbox continues
    // after the highest ever given, so no seq is given twice.
    let last_seq: i64 = src
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'items'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0)
        .max(src.query_row("SELECT coalesce(max(seq), 0) FROM items", [], |r| r.get(0))?);
    let mut after: Vec<u8> = Vec::new();
    loop {
        let rows = read_mailboxes(src, &after)?;
        let Some(last) = rows.last() else { break };
        after = last.id.clone();
        let tx = pg.transaction().await.map_err(pg_err)?;
        let st = tx
            .prepare(
                "INSERT INTO mailboxes (id, key, quota, used, created_at, last_seq) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
            )
            .await
            .map_err(pg_err)?;
        for m in &rows {
            tx.execute(
                &st,
                &[&m.id, &m.key, &m.quota, &m.used, &m.created_at, &last_seq],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
    }
    // The mailbox cap's count, once (not a count of the whole table per
    // page); a run killed before this sets it on its next run.
    pg.execute(
        "UPDATE sealpost_meta SET value = (SELECT count(*) FROM mailboxes) WHERE name = 'mailboxes'",
        &[],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
struct MailboxRow {
    id: Vec<u8>,
    key: Vec<u8>,
    quota: i64,
    used: i64,
    created_at: i64,
}

fn read_mailboxes(src: &Connection, after: &[u8]) -> Result<Vec<MailboxRow>, StoreError> {
    let mut st = src.prepare_cached(
        "SELECT id, key, quota, used, created_at FROM mailboxes WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = st
        .query_map(params![after, PAGE_ROWS], |r| {
            Ok(MailboxRow {
                id: r.get(0)?,
                key: r.get(1)?,
                quota: r.get(2)?,
                used: r.get(3)?,
                created_at: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

async fn pg_mailboxes(pg: &Pg, after: &[u8]) -> Result<Vec<MailboxRow>, StoreError> {
    Ok(pg
        .query(
            "SELECT id, key, quota, used, created_at FROM mailboxes WHERE id > $1 ORDER BY id LIMIT $2",
            &[&after, &PAGE_ROWS],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| MailboxRow {
            id: r.get(0),
            key: r.get(1),
            quota: r.get(2),
            used: r.get(3),
            created_at: r.get(4),
        })
        .collect())
}

#[derive(Debug, PartialEq, Eq)]
struct ItemRow {
    seq: i64,
    item_id: Vec<u8>,
    received_at: i64,
    expires_at: i64,
    hash: Vec<u8>,
    payload: Vec<u8>,
    source: Option<Vec<u8>>,
}

/// A mailbox's items after `after`, up to [`PAGE_ROWS`] and about
/// [`PAGE_BYTES`].
fn read_items(src: &Connection, mailbox: &[u8], after: i64) -> Result<Vec<ItemRow>, StoreError> {
    let mut st = src.prepare_cached(
        "SELECT seq, item_id, received_at, expires_at, hash, payload, source FROM items \
         WHERE mailbox = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let mut rows = st.query(params![mailbox, after, PAGE_ROWS])?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let item = ItemRow {
            seq: r.get(0)?,
            item_id: r.get(1)?,
            received_at: r.get(2)?,
            expires_at: r.get(3)?,
            hash: r.get(4)?,
            payload: r.get(5)?,
            source: r.get(6)?,
        };
        bytes += item.payload.len();
        out.push(item);
        if bytes >= PAGE_BYTES {
            break;
        }
    }
    Ok(out)
}

async fn pg_items(
    pg: &Pg,
    mailbox: &[u8],
    after: i64,
    limit: i64,
) -> Result<Vec<ItemRow>, StoreError> {
    Ok(pg
        .query(
            "SELECT seq, item_id, received_at, expires_at, hash, payload, source FROM items \
             WHERE mailbox = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &[&mailbox, &after, &limit],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| ItemRow {
            seq: r.get(0),
            item_id: r.get(1),
            received_at: r.get(2),
            expires_at: r.get(3),
            hash: r.get(4),
            payload: r.get(5),
            source: r.get(6),
        })
        .collect())
}

/// Every mailbox id of the source, in order, a page at a time.
fn each_mailbox(src: &Connection) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut st = src.prepare_cached("SELECT id FROM mailboxes ORDER BY id")?;
    let ids = st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

async fn copy_items(src: &Connection, pg: &mut Pg) -> Result<(), StoreError> {
    for mb in each_mailbox(src)? {
        let mut after = 0i64;
        loop {
            let rows = read_items(src, &mb, after)?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            let tx = pg.transaction().await.map_err(pg_err)?;
            let st = tx
                .prepare(
                    "INSERT INTO items (mailbox, seq, item_id, received_at, expires_at, hash, payload, source) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (mailbox, seq) DO NOTHING",
                )
                .await
                .map_err(pg_err)?;
            // Pipelined: every insert of the page is sent before the
            // first answer is awaited (one round trip per row made the
            // copy of 100,000 items take most of a migration's time).
            let (tx_ref, st_ref, mb_ref) = (&tx, &st, &mb);
            futures_util::future::try_join_all(rows.iter().map(|i| async move {
                tx_ref
                    .execute(
                        st_ref,
                        &[
                            mb_ref,
                            &i.seq,
                            &i.item_id,
                            &i.received_at,
                            &i.expires_at,
                            &i.hash,
                            &i.payload,
                            &i.source,
                        ],
                    )
                    .await
            }))
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
        }
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
struct ShareRow {
    mailbox: Vec<u8>,
    source: Vec<u8>,
    used: i64,
}

#[derive(Debug, PartialEq, Eq)]
struct ForwardRow {
    id: i64,
    origin: Vec<u8>,
    next_addr: String,
    next_pin: Vec<u8>,
    hops: i64,
    mailbox: Vec<u8>,
    received_at: i64,
    expires_at: i64,
    hash: Vec<u8>,
    payload: Vec<u8>,
    attempts: i64,
    next_at: i64,
    last_error: Option<String>,
    blob: Option<Vec<u8>>,
    blob_len: i64,
}

#[derive(Debug, PartialEq, Eq)]
struct HandedRow {
    id: i64,
    origin: Vec<u8>,
    next_addr: String,
    next_pin: Vec<u8>,
    mailbox: Vec<u8>,
    hash: Vec<u8>,
    blob: Option<Vec<u8>>,
    until: i64,
}

fn read_shares(src: &Connection, after: &(Vec<u8>, Vec<u8>)) -> Result<Vec<ShareRow>, StoreError> {
    let mut st = src.prepare_cached(
        "SELECT mailbox, source, used FROM shares WHERE (mailbox, source) > (?1, ?2) \
         ORDER BY mailbox, source LIMIT ?3",
    )?;
    let rows = st
        .query_map(params![after.0, after.1, PAGE_ROWS], |r| {
            Ok(ShareRow {
                mailbox: r.get(0)?,
                source: r.get(1)?,
                used: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

async fn pg_shares(pg: &Pg, after: &(Vec<u8>, Vec<u8>)) -> Result<Vec<ShareRow>, StoreError> {
    Ok(pg
        .query(
            "SELECT mailbox, source, used FROM shares WHERE (mailbox, source) > ($1, $2) \
             ORDER BY mailbox, source LIMIT $3",
            &[&after.0, &after.1, &PAGE_ROWS],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| ShareRow {
            mailbox: r.get(0),
            source: r.get(1),
            used: r.get(2),
        })
        .collect())
}

const FORWARD_COLUMNS: &str = "id, origin, next_addr, next_pin, hops, mailbox, received_at, \
    expires_at, hash, payload, attempts, next_at, last_error, blob, blob_len";

fn read_forwards(src: &Connection, after: i64) -> Result<Vec<ForwardRow>, StoreError> {
    let mut st = src.prepare_cached(&format!(
        "SELECT {FORWARD_COLUMNS} FROM forwards WHERE id > ?1 ORDER BY id LIMIT ?2"
    ))?;
    let mut rows = st.query(params![after, PAGE_ROWS])?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let f = ForwardRow {
            id: r.get(0)?,
            origin: r.get(1)?,
            next_addr: r.get(2)?,
            next_pin: r.get(3)?,
            hops: r.get(4)?,
            mailbox: r.get(5)?,
            received_at: r.get(6)?,
            expires_at: r.get(7)?,
            hash: r.get(8)?,
            payload: r.get(9)?,
            attempts: r.get(10)?,
            next_at: r.get(11)?,
            last_error: r.get(12)?,
            blob: r.get(13)?,
            blob_len: r.get(14)?,
        };
        bytes += f.payload.len();
        out.push(f);
        if bytes >= PAGE_BYTES {
            break;
        }
    }
    Ok(out)
}

async fn pg_forwards(pg: &Pg, after: i64, limit: i64) -> Result<Vec<ForwardRow>, StoreError> {
    Ok(pg
        .query(
            &format!("SELECT {FORWARD_COLUMNS} FROM forwards WHERE id > $1 ORDER BY id LIMIT $2"),
            &[&after, &limit],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| ForwardRow {
            id: r.get(0),
            origin: r.get(1),
            next_addr: r.get(2),
            next_pin: r.get(3),
            hops: i64::from(r.get::<_, i32>(4)),
            mailbox: r.get(5),
            received_at: r.get(6),
            expires_at: r.get(7),
            hash: r.get(8),
            payload: r.get(9),
            attempts: i64::from(r.get::<_, i32>(10)),
            next_at: r.get(11),
            last_error: r.get(12),
            blob: r.get(13),
            blob_len: r.get(14),
        })
        .collect())
}

const HANDED_COLUMNS: &str = "id, origin, next_addr, next_pin, mailbox, hash, blob, until";

fn read_handed(src: &Connection, after: i64) -> Result<Vec<HandedRow>, StoreError> {
    let mut st = src.prepare_cached(&format!(
        "SELECT {HANDED_COLUMNS} FROM handed WHERE id > ?1 ORDER BY id LIMIT ?2"
    ))?;
    let rows = st
        .query_map(params![after, PAGE_ROWS], |r| {
            Ok(HandedRow {
                id: r.get(0)?,
                origin: r.get(1)?,
                next_addr: r.get(2)?,
                next_pin: r.get(3)?,
                mailbox: r.get(4)?,
                hash: r.get(5)?,
                blob: r.get(6)?,
                until: r.get(7)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

async fn pg_handed(pg: &Pg, after: i64) -> Result<Vec<HandedRow>, StoreError> {
    Ok(pg
        .query(
            &format!("SELECT {HANDED_COLUMNS} FROM handed WHERE id > $1 ORDER BY id LIMIT $2"),
            &[&after, &PAGE_ROWS],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| HandedRow {
            id: r.get(0),
            origin: r.get(1),
            next_addr: r.get(2),
            next_pin: r.get(3),
            mailbox: r.get(4),
            hash: r.get(5),
            blob: r.get(6),
            until: r.get(7),
        })
        .collect())
}

async fn copy_small_tables(src: &Connection, pg: &mut Pg) -> Result<(), StoreError> {
    let mut after = (Vec::new(), Vec::new());
    loop {
        let rows = read_shares(src, &after)?;
        let Some(last) = rows.last() else { break };
        after = (last.mailbox.clone(), last.source.clone());
        let tx = pg.transaction().await.map_err(pg_err)?;
        for s in &rows {
            tx.execute(
                "INSERT INTO shares (mailbox, source, used) VALUES ($1, $2, $3) \
                 ON CONFLICT (mailbox, source) DO NOTHING",
                &[&s.mailbox, &s.source, &s.used],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
    }
    let mut after = 0i64;
    loop {
        let rows = read_forwards(src, after)?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let tx = pg.transaction().await.map_err(pg_err)?;
        let st = tx
            .prepare(&format!(
                "INSERT INTO forwards ({FORWARD_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                 ON CONFLICT DO NOTHING"
            ))
            .await
            .map_err(pg_err)?;
        for f in &rows {
            let hops = i32::try_from(f.hops).map_err(|_| err("a forward's hop count"))?;
            let attempts = i32::try_from(f.attempts).unwrap_or(i32::MAX);
            tx.execute(
                &st,
                &[
                    &f.id,
                    &f.origin,
                    &f.next_addr,
                    &f.next_pin,
                    &hops,
                    &f.mailbox,
                    &f.received_at,
                    &f.expires_at,
                    &f.hash,
                    &f.payload,
                    &attempts,
                    &f.next_at,
                    &f.last_error,
                    &f.blob,
                    &f.blob_len,
                ],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
    }
    let mut after = 0i64;
    loop {
        let rows = read_handed(src, after)?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let tx = pg.transaction().await.map_err(pg_err)?;
        for h in &rows {
            tx.execute(
                &format!(
                    "INSERT INTO handed ({HANDED_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (id) DO NOTHING"
                ),
                &[
                    &h.id,
                    &h.origin,
                    &h.next_addr,
                    &h.next_pin,
                    &h.mailbox,
                    &h.hash,
                    &h.blob,
                    &h.until,
                ],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
    }
    // Forward ids continue after every id given so far (handed rows keep
    // the id of the forward they were).
    let src_last: i64 = src
        .query_row(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'forwards'), 0), \
                        coalesce((SELECT max(id) FROM forwards), 0), \
                        coalesce((SELECT max(id) FROM handed), 0))",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    if src_last > 0 {
        pg.execute(
            "SELECT setval(pg_get_serial_sequence('forwards', 'id'), \
             GREATEST($1, (SELECT coalesce(max(id), 0) FROM forwards), \
                      (SELECT coalesce(max(id), 0) FROM handed)))",
            &[&src_last],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq, Clone)]
struct BlobRow {
    id: Vec<u8>,
    mailbox: Vec<u8>,
    total_len: i64,
    hash: Vec<u8>,
    expires_at: i64,
    stored: i64,
    complete: bool,
    source: Option<Vec<u8>>,
}

const BLOB_COLUMNS: &str = "id, mailbox, total_len, hash, expires_at, stored, complete, source";

fn read_blobs(src: &Connection, after: &[u8]) -> Result<Vec<BlobRow>, StoreError> {
    let mut st = src.prepare_cached(&format!(
        "SELECT {BLOB_COLUMNS} FROM blobs WHERE id > ?1 ORDER BY id LIMIT ?2"
    ))?;
    let rows = st
        .query_map(params![after, PAGE_ROWS], |r| {
            Ok(BlobRow {
                id: r.get(0)?,
                mailbox: r.get(1)?,
                total_len: r.get(2)?,
                hash: r.get(3)?,
                expires_at: r.get(4)?,
                stored: r.get(5)?,
                complete: r.get::<_, i64>(6)? != 0,
                source: r.get(7)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

async fn pg_blobs(pg: &Pg, after: &[u8]) -> Result<Vec<BlobRow>, StoreError> {
    Ok(pg
        .query(
            &format!("SELECT {BLOB_COLUMNS} FROM blobs WHERE id > $1 ORDER BY id LIMIT $2"),
            &[&after, &PAGE_ROWS],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| BlobRow {
            id: r.get(0),
            mailbox: r.get(1),
            total_len: r.get(2),
            hash: r.get(3),
            expires_at: r.get(4),
            stored: r.get(5),
            complete: r.get(6),
            source: r.get(7),
        })
        .collect())
}

fn blob_id(b: &[u8]) -> Result<BlobId, StoreError> {
    <[u8; 16]>::try_from(b)
        .map(BlobId)
        .map_err(|_| err(format!("a blob id of {} bytes in the source", b.len())))
}

/// Copies each blob whose row is not in the target yet: its bytes first
/// (when they go to a bucket), then its row. Returns the bytes copied.
async fn copy_blobs(
    src: &Connection,
    pg: &mut Pg,
    from: &Arc<FileBlobs>,
    to: Option<&Arc<dyn BlobStore>>,
    progress: Progress<'_>,
) -> Result<u64, StoreError> {
    let mut copied = 0u64;
    let mut after = Vec::new();
    loop {
        let rows = read_blobs(src, &after)?;
        let Some(last) = rows.last() else { break };
        after = last.id.clone();
        for b in rows {
            let there = pg
                .query_opt("SELECT 1 FROM blobs WHERE id = $1", &[&b.id])
                .await
                .map_err(pg_err)?
                .is_some();
            if there {
                continue;
            }
            if let Some(to) = to {
                let (from, to, row) = (from.clone(), to.clone(), b.clone());
                copied += tokio::task::spawn_blocking(move || copy_blob_bytes(&from, &*to, &row))
                    .await
                    .map_err(|_| StoreError::Closed)??;
                progress(&format!(
                    "copied blob {} ({} bytes)",
                    hex(&b.id),
                    u64_of(b.stored)
                ));
            }
            pg.execute(
                &format!(
                    "INSERT INTO blobs ({BLOB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (id) DO NOTHING"
                ),
                &[
                    &b.id,
                    &b.mailbox,
                    &b.total_len,
                    &b.hash,
                    &b.expires_at,
                    &b.stored,
                    &b.complete,
                    &b.source,
                ],
            )
            .await
            .map_err(pg_err)?;
        }
    }
    Ok(copied)
}

/// Writes a blob's stored bytes to `to` in runs of [`RUN_PIECES`]
/// pieces, from its first byte (whatever an interrupted copy left is
/// removed first); for a complete blob, checks the hash the store
/// computed against the recorded one.
fn copy_blob_bytes(from: &FileBlobs, to: &dyn BlobStore, b: &BlobRow) -> Result<u64, StoreError> {
    let id = blob_id(&b.id)?;
    let mailbox = MailboxId(
        <[u8; 32]>::try_from(b.mailbox.as_slice())
            .map_err(|_| err("a mailbox id in the source's blobs"))?,
    );
    let stored = u64_of(b.stored);
    let total = u64_of(b.total_len);
    let io = |what: &str, e: std::io::Error| err(format!("{what} blob {}: {e}", hex(&b.id)));
    to.remove(&id);
    let mut at = 0u64;
    let mut first = true;
    while at < stored {
        let mut run = Vec::with_capacity(RUN_PIECES);
        let start = at;
        while run.len() < RUN_PIECES && at < stored {
            let n = (stored - at).min(MAX_BLOB_PIECE as u64) as usize;
            let mut data = Vec::with_capacity(n);
            BlobStore::read(from, &id, at, n, &mut data).map_err(|e| io("reading", e))?;
            let last = b.complete && at + n as u64 == total;
            run.push(BlobPiece {
                blob_id: id,
                mailbox,
                total_len: total,
                blob_hash: if last {
                    <[u8; 32]>::try_from(b.hash.as_slice()).unwrap_or([0; 32])
                } else {
                    [0; 32]
                },
                expires_at: u64_of(b.expires_at),
                offset: at,
                data,
            });
            at += n as u64;
        }
        let complete = b.complete && at == total;
        let hash = to
            .write_run(&id, start, first, &run, complete)
            .map_err(|e| io("writing", e))?;
        first = false;
        if complete && hash.as_ref().map(|h| &h[..]) != Some(b.hash.as_slice()) {
            return Err(mismatch("the bytes of blob", hex(&b.id)));
        }
    }
    Ok(stored)
}

/// Compares every row of the target with the source and reads every
/// byte back; fills the report's counts.
async fn check(
    src: &Connection,
    pg: &mut Pg,
    from: &Arc<FileBlobs>,
    to: Option<&Arc<dyn BlobStore>>,
    report: &mut Report,
) -> Result<(), StoreError> {
    // Mailboxes.
    let mut after = Vec::new();
    loop {
        let a = read_mailboxes(src, &after)?;
        let b = pg_mailboxes(pg, &after).await?;
        if a != b {
            let at = a
                .iter()
                .zip(&b)
                .find(|(x, y)| x != y)
                .map(|(x, _)| hex(&x.id))
                .unwrap_or_else(|| "(one side has more)".into());
            return Err(mismatch("mailbox", at));
        }
        let Some(last) = a.last() else { break };
        report.mailboxes += a.len() as u64;
        after = last.id.clone();
    }
    // Items, a mailbox at a time; the database's read back and hashed.
    for mb in each_mailbox(src)? {
        let mut after = 0i64;
        loop {
            let a = read_items(src, &mb, after)?;
            let b = pg_items(pg, &mb, after, a.len().max(1) as i64).await?;
            for (x, y) in a.iter().zip(&b) {
                if x != y || blake3::hash(&y.payload).as_bytes()[..] != x.hash[..] {
                    if x == y {
                        report.damaged_in_source += 1;
                    } else {
                        return Err(mismatch(
                            "item",
                            format!("{} of mailbox {}", x.seq, hex(&mb)),
                        ));
                    }
                }
                report.item_bytes += y.payload.len() as u64;
            }
            if a.len() != b.len() {
                return Err(mismatch("the items of mailbox", hex(&mb)));
            }
            let Some(last) = a.last() else { break };
            report.items += a.len() as u64;
            after = last.seq;
        }
    }
    let pg_items: i64 = pg
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    if u64_of(pg_items) != report.items {
        return Err(mismatch("the number of items:", pg_items));
    }
    // Shares.
    let mut after = (Vec::new(), Vec::new());
    loop {
        let a = read_shares(src, &after)?;
        let b = pg_shares(pg, &after).await?;
        if a != b {
            return Err(mismatch(
                "the shares of mailbox",
                hex(&a.first().map(|s| s.mailbox.clone()).unwrap_or_default()),
            ));
        }
        let Some(last) = a.last() else { break };
        report.shares += a.len() as u64;
        after = (last.mailbox.clone(), last.source.clone());
    }
    // Forwards and handed items.
    let mut after = 0i64;
    loop {
        let a = read_forwards(src, after)?;
        let b = pg_forwards(pg, after, a.len().max(1) as i64).await?;
        if a != b {
            return Err(mismatch("forward", a.first().map_or(after, |f| f.id)));
        }
        let Some(last) = a.last() else { break };
        report.forwards += a.len() as u64;
        after = last.id;
    }
    let mut after = 0i64;
    loop {
        let a = read_handed(src, after)?;
        let b = pg_handed(pg, after).await?;
        if a != b {
            return Err(mismatch("handed item", a.first().map_or(after, |h| h.id)));
        }
        let Some(last) = a.last() else { break };
        report.handed += a.len() as u64;
        after = last.id;
    }
    // Blobs: rows, then bytes read back from where nodes will read them.
    let mut after = Vec::new();
    loop {
        let a = read_blobs(src, &after)?;
        let b = pg_blobs(pg, &after).await?;
        if a != b {
            return Err(mismatch(
                "blob",
                a.first().map(|x| hex(&x.id)).unwrap_or_default(),
            ));
        }
        let Some(last) = a.last() else { break };
        after = last.id.clone();
        for row in a {
            report.blobs += 1;
            let stored = u64_of(row.stored);
            report.blob_bytes += stored;
            let id = blob_id(&row.id)?;
            let (from, to) = (from.clone(), to.cloned());
            let (source_hash, target_hash) = tokio::task::spawn_blocking(move || {
                let s = from.hash(&id, stored)?;
                let t = match to {
                    Some(to) => to.hash(&id, stored)?,
                    None => s,
                };
                Ok::<_, std::io::Error>((s, t))
            })
            .await
            .map_err(|_| StoreError::Closed)?
            .map_err(|e| err(format!("reading blob {}: {e}", hex(&row.id))))?;
            if source_hash != target_hash || (row.complete && source_hash[..] != row.hash[..]) {
                return Err(mismatch("the bytes of blob", hex(&row.id)));
            }
        }
    }
    Ok(())
}

/// Refuses a database a migration into is under way (nodes must not
/// serve half of a relay's data).
pub(crate) async fn refuse_if_migrating(client: &tokio_postgres::Client) -> Result<(), StoreError> {
    let row = client
        .query_opt(
            "SELECT started_at FROM sealpost_migrations WHERE finished_at IS NULL LIMIT 1",
            &[],
        )
        .await
        .map_err(pg_err)?;
    match row {
        None => Ok(()),
        Some(r) => Err(err(format!(
            "a migration into this database (`sealpost relay migrate`, started at unix time {}) has not finished: a node would serve part of a relay's data. Run the migration again to finish it",
            r.get::<_, i64>(0)
        ))),
    }
}
