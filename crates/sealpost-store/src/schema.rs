//! The store's SQLite schema, the columns added since, and the per-source shares charged and released inside the writer's transactions.

use super::*;

pub(crate) const SCHEMA: &str = "
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
-- items to pass on to another relay (PROTOCOL 6.8), sent by the owner of
-- origin, whose quota they count in until they are handed on
CREATE TABLE IF NOT EXISTS forwards (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    origin BLOB NOT NULL,
    next_addr TEXT NOT NULL,
    next_pin BLOB NOT NULL,
    hops INTEGER NOT NULL,
    mailbox BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    hash BLOB NOT NULL,
    payload BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS forwards_due ON forwards(next_at);
-- forwarded items and blobs handed to an outbound gateway relay (PROTOCOL
-- 6.8), kept (without their bytes) until the gateway's word on them or
-- until `until`: what its notices are mapped back to their sender by
CREATE TABLE IF NOT EXISTS handed (
    id INTEGER PRIMARY KEY,
    origin BLOB NOT NULL,
    next_addr TEXT NOT NULL,
    next_pin BLOB NOT NULL,
    mailbox BLOB NOT NULL,
    hash BLOB NOT NULL,
    blob BLOB,
    until INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS handed_item ON handed(mailbox, hash);
CREATE INDEX IF NOT EXISTS handed_until ON handed(until);
";

/// A blob expiry deleted: (id, mailbox, total_len, source).
pub(crate) type GoneBlob = (Vec<u8>, Vec<u8>, i64, Option<Vec<u8>>);

/// Columns added after a store was first made: (table, column, type).
pub(crate) const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("items", "source", "BLOB"),
    ("blobs", "source", "BLOB"),
    // A forwarded blob (its id; NULL for an item) and its length.
    ("forwards", "blob", "BLOB"),
    ("forwards", "blob_len", "INTEGER NOT NULL DEFAULT 0"),
];

/// Adds the columns of [`ADDED_COLUMNS`] an older store lacks.
pub(crate) fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
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
    // An item waiting is found by its sender and hash (queued once).
    conn.execute_batch("CREATE INDEX IF NOT EXISTS forwards_item ON forwards(origin, hash)")?;
    // A blob is queued to forward once per mailbox.
    conn.execute_batch(
        "CREATE UNIQUE INDEX IF NOT EXISTS forwards_blob ON forwards(blob, mailbox) \
         WHERE blob IS NOT NULL",
    )?;
    Ok(())
}

/// Takes `delta` bytes off `source`'s share of `mailbox` (a row that
/// reaches 0 goes away).
pub(crate) fn release_share(
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

/// What `mailbox` holds and may hold, in bytes (`used`, `quota`); none if
/// no such mailbox.
pub(crate) fn mailbox_use(
    conn: &Connection,
    mailbox: &[u8],
) -> Result<Option<(i64, i64)>, rusqlite::Error> {
    conn.prepare_cached("SELECT used, quota FROM mailboxes WHERE id = ?1")?
        .query_row(params![mailbox], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

/// Adds `len` bytes to what `mailbox` holds.
pub(crate) fn charge_mailbox(
    tx: &rusqlite::Transaction<'_>,
    mailbox: &[u8],
    len: i64,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached("UPDATE mailboxes SET used = used + ?2 WHERE id = ?1")?
        .execute(params![mailbox, len])?;
    Ok(())
}

/// Takes `len` bytes off what `mailbox` holds (never below zero).
pub(crate) fn release_mailbox(
    tx: &rusqlite::Transaction<'_>,
    mailbox: &[u8],
    len: i64,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached("UPDATE mailboxes SET used = MAX(0, used - ?2) WHERE id = ?1")?
        .execute(params![mailbox, len])?;
    Ok(())
}

/// Adds `delta` bytes to `source`'s share of `mailbox`.
pub(crate) fn charge_share(
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
pub(crate) fn share_used(
    conn: &Connection,
    mailbox: &[u8],
    source: &[u8],
) -> Result<u64, rusqlite::Error> {
    Ok(conn
        .prepare_cached("SELECT used FROM shares WHERE mailbox = ?1 AND source = ?2")?
        .query_row(params![mailbox, source], |r| r.get::<_, i64>(0))
        .optional()?
        .map(u64_of)
        .unwrap_or(0))
}
