//! The agent's delivery state in its SQLite database: the outbox (sealed
//! messages and one delivery per recipient), the inbox index, the reports
//! (receipts and rejections) waiting to be sent, and settings.
//!
//! Every change is one transaction, durable (`synchronous=FULL`) before the
//! caller acts on it: a message is queued before its id is printed, an
//! inbox entry is committed before the relay copy is acknowledged and
//! before its receipt is queued, and a receipt is stored before the
//! delivery is shown as delivered.

mod files;
mod inbox;
pub use files::*;
pub use inbox::*;

use rusqlite::{params, OptionalExtension, Transaction};
use sealpost_proto::delivery::{Delivery, Failure, Outcome, Sent, State};
use sealpost_proto::manifest::Group;
use sealpost_proto::report::{Entries, ReceiptEntry, RejectReason, RejectionEntry, Report};
use sealpost_proto::MessageId;

use crate::contacts::{to_i64, to_u64};
use crate::{AgentError, Db};

/// The deliveries under way, as SQL: equalities, not `state IN (...)`.
/// SQLite evaluates an `IN` list of three or more values through a
/// temporary b-tree made afresh each time (two with `OR` do not); as the
/// predicate of the partial indexes below that was four such trees for
/// every change of a delivery's state (5 a message receipted: 20 % of the
/// sender's instructions taking receipts, counted with callgrind). A
/// query uses those indexes only if its WHERE repeats this text.
macro_rules! under_way {
    () => {
        "(state = 'queued' OR state = 'submitted' OR state = 'forwarding')"
    };
}

pub(crate) const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id BLOB PRIMARY KEY,
    kind TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    content_hash BLOB NOT NULL,
    content_len INTEGER NOT NULL,
    summary TEXT NOT NULL,
    -- empty: the sealed bytes are in sealed_copies (older databases kept
    -- them here; `migrate` moves them)
    sealed BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox(created_ms);
-- The sealed bytes of messages that may still be sent again, apart from
-- the outbox rows so that deleting them empties whole pages (which the
-- database then gives back) instead of leaving every outbox page with a
-- hole in it.
CREATE TABLE IF NOT EXISTS sealed_copies (
    id BLOB PRIMARY KEY,
    bytes BLOB NOT NULL
);
-- The recipients and relays deliveries name, each once: a delivery row
-- holds their small ids in `recipient` and `relay` (rows made before
-- these tables, with the key and the address in the row, are moved to
-- ids once by `migrate`).
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    key BLOB UNIQUE NOT NULL
);
CREATE TABLE IF NOT EXISTS relays (
    id INTEGER PRIMARY KEY,
    address TEXT UNIQUE NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    msg BLOB NOT NULL REFERENCES outbox(id),
    recipient BLOB NOT NULL,
    name TEXT NOT NULL,
    relay TEXT NOT NULL,
    state TEXT NOT NULL,
    submissions INTEGER NOT NULL,
    failed_attempts INTEGER NOT NULL,
    next_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    changed_ms INTEGER NOT NULL,
    failure TEXT,
    detail TEXT,
    last_error TEXT,
    -- the report that settled it: the id of its row in `reports` (in
    -- databases from before reports had ids, its hash; `migrate` moves
    -- them once)
    receipt INTEGER REFERENCES reports(id),
    uploaded INTEGER NOT NULL DEFAULT 0,
    -- where a forwarded delivery is, as the home relay last said (§6.8)
    hop TEXT,
    PRIMARY KEY (msg, recipient)
);
CREATE TABLE IF NOT EXISTS files_out (
    msg BLOB PRIMARY KEY REFERENCES outbox(id),
    path TEXT NOT NULL,
    blob_id BLOB NOT NULL,
    blob_key BLOB NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    -- the blob's plaintext length of a padded file (send --pad); NULL: size
    padded INTEGER
);
CREATE INDEX IF NOT EXISTS files_out_blob ON files_out(blob_id);
-- files sent or received as part of a directory (the manifest's group,
-- PROTOCOL 5.1), for either direction: `sender` is x'' for a file we
-- sent, the sender's signing key for one received (each sender chooses
-- its own message ids, so an id alone does not name a received message)
CREATE TABLE IF NOT EXISTS file_groups (
    msg BLOB NOT NULL,
    sender BLOB NOT NULL,
    group_id BLOB NOT NULL,
    idx INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (msg, sender)
);
CREATE INDEX IF NOT EXISTS file_groups_group ON file_groups(group_id, idx);
-- received files, by (message id, sender) as the inbox
CREATE TABLE IF NOT EXISTS downloads (
    msg BLOB NOT NULL,
    sender BLOB NOT NULL,
    agreement BLOB NOT NULL,
    relay TEXT,
    blob_id BLOB NOT NULL,
    blob_key BLOB NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    plaintext_hash BLOB NOT NULL,
    name TEXT NOT NULL,
    dir TEXT NOT NULL,
    next_chunk INTEGER NOT NULL,
    bad TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    final_path TEXT,
    error TEXT,
    changed_ms INTEGER NOT NULL,
    repair BLOB,
    local_errors INTEGER NOT NULL DEFAULT 0,
    -- the blob's plaintext length of a padded file; NULL: size
    padded INTEGER,
    PRIMARY KEY (msg, sender)
);
CREATE INDEX IF NOT EXISTS downloads_state ON downloads(state);
CREATE TABLE IF NOT EXISTS repairs (
    msg BLOB NOT NULL,
    recipient BLOB NOT NULL,
    chunks BLOB NOT NULL,
    PRIMARY KEY (msg, recipient)
);
-- Signed reports (receipts, rejections) kept as proof, one row per report
-- however many deliveries it settles, which name it by `id` (an integer
-- primary key, so it stays when the file is rewritten; a rowid may not).
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,
    hash BLOB UNIQUE NOT NULL,
    bytes BLOB NOT NULL
);
-- Only deliveries under way are indexed by time: finished ones (the
-- whole history) take no index space and no query reads them that way.
-- A query uses these only if its WHERE repeats the index's exactly.
-- (Homes from before kept the same indexes with `state IN (...)` under
-- other names: dropped, and these made once.)
DROP INDEX IF EXISTS deliveries_due;
DROP INDEX IF EXISTS deliveries_expiry;
DROP INDEX IF EXISTS deliveries_live_next;
DROP INDEX IF EXISTS deliveries_live_expiry;
CREATE INDEX IF NOT EXISTS deliveries_under_way_next ON deliveries(next_ms)
    WHERE ",
    under_way!(),
    ";
CREATE INDEX IF NOT EXISTS deliveries_under_way_expiry ON deliveries(expires_ms)
    WHERE ",
    under_way!(),
    ";
CREATE INDEX IF NOT EXISTS deliveries_forwarding ON deliveries(changed_ms)
    WHERE state = 'forwarding';
-- Deliveries waiting after failures, by relay: what a relay that took a
-- submission again makes due at once (`relay_reachable`, after every
-- round). Without it that question read every live delivery due later —
-- each one submitted and awaiting its receipt — so a backlog of 150,000
-- made each round read them all (a million sent in one go: 23 reads a
-- message instead of 2).
CREATE INDEX IF NOT EXISTS deliveries_retrying ON deliveries(relay, next_ms)
    WHERE state = 'queued' AND failed_attempts > 0;
-- How many deliveries are in each state, kept by the triggers below in
-- the same transaction as every change, so that `status` and `sync` tell
-- the totals without counting the whole history (at a million deliveries
-- that count took 0.2 s of CPU and a read transaction as long). Filled
-- from the rows once by `migrate` (user version 4).
CREATE TABLE IF NOT EXISTS delivery_totals (
    state TEXT PRIMARY KEY,
    n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS deliveries_total_insert AFTER INSERT ON deliveries BEGIN
    INSERT INTO delivery_totals (state, n) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS deliveries_total_delete AFTER DELETE ON deliveries BEGIN
    UPDATE delivery_totals SET n = n - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS deliveries_total_state AFTER UPDATE OF state ON deliveries
    WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE delivery_totals SET n = n - 1 WHERE state = OLD.state;
    INSERT INTO delivery_totals (state, n) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
-- received messages, by (id, sender): each sender chooses its own ids,
-- so a contact who learns another's id (as a co-recipient of the same
-- message) cannot take it; `id` first, for the CLI's look-ups by id
CREATE TABLE IF NOT EXISTS inbox (
    id BLOB NOT NULL,
    sender BLOB NOT NULL,
    kind TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    content_hash BLOB NOT NULL,
    content_len INTEGER NOT NULL,
    segment INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    read_ms INTEGER,
    -- when it was archived (out of the inbox's list, still readable)
    archived_ms INTEGER,
    PRIMARY KEY (id, sender)
);
CREATE INDEX IF NOT EXISTS inbox_received ON inbox(received_ms);
CREATE INDEX IF NOT EXISTS inbox_segment ON inbox(segment);
CREATE TABLE IF NOT EXISTS pending_reports (
    subject BLOB NOT NULL,
    agreement BLOB NOT NULL,
    id BLOB NOT NULL,
    relay TEXT NOT NULL,
    reason INTEGER NOT NULL,
    content_hash BLOB NOT NULL,
    content_len INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (subject, id)
);
CREATE TABLE IF NOT EXISTS refused_senders (
    key BLOB PRIMARY KEY,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS refused_senders_last ON refused_senders(last_ms);
CREATE TABLE IF NOT EXISTS detections (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    class TEXT NOT NULL,
    item TEXT NOT NULL
);
"
);

/// One recipient of a queued message.
#[derive(Debug, Clone)]
pub struct QueuedRecipient {
    pub name: String,
    pub signing: [u8; 32],
    pub relay: String,
}

/// A message as queued by `send`.
#[derive(Debug, Clone)]
pub struct QueuedMessage<'a> {
    pub id: MessageId,
    pub kind: &'a str,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub sent: Sent,
    pub summary: &'a str,
    pub sealed: &'a [u8],
}

/// A delivery as stored.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub msg: MessageId,
    pub recipient: [u8; 32],
    pub name: String,
    pub relay: String,
    pub delivery: Delivery,
    pub last_error: Option<String>,
    /// The recipient's signed report: the receipt of a delivered
    /// message, or the signed rejection of a rejected one.
    pub receipt: Option<Vec<u8>>,
    /// For a file: bytes of its blob the recipient's relay holds.
    pub uploaded: u64,
    /// Where a forwarded delivery is, as the home relay last said: still
    /// in its queue (and why), or handed on.
    pub hop: Option<String>,
}

/// A message in the outbox with its deliveries, for `status`.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub id: MessageId,
    pub kind: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub sent: Sent,
    pub summary: String,
    pub deliveries: Vec<DeliveryRow>,
}

fn failure_from_row(code: Option<String>, detail: Option<String>) -> Option<Failure> {
    let code = code?;
    if code == "expired" {
        return Some(Failure::Expired);
    }
    if let Some(r) = code.strip_prefix("rejected:") {
        return RejectReason::ALL
            .into_iter()
            .find(|x| x.name() == r)
            .map(Failure::Rejected);
    }
    if let Some(c) = code.strip_prefix("local:") {
        return Some(Failure::Local {
            code: c.to_owned(),
            detail: detail.unwrap_or_default(),
        });
    }
    let refused = code.strip_prefix("refused:").unwrap_or(&code);
    Some(Failure::Refused {
        code: refused.to_owned(),
        detail: detail.unwrap_or_default(),
    })
}

fn failure_detail(f: &Option<Failure>) -> Option<String> {
    f.as_ref().map(|f| f.describe())
}

/// A batched receipt is stored once in `reports` and named by its row's
/// id from every delivery it completes.
const DELIVERY_COLS: &str = "msg, \
     (SELECT key FROM recipients WHERE recipients.id = deliveries.recipient), \
     name, \
     (SELECT address FROM relays WHERE relays.id = deliveries.relay), \
     state, submissions, failed_attempts, \
     next_ms, expires_ms, changed_ms, failure, detail, last_error, \
     (SELECT bytes FROM reports WHERE reports.id = deliveries.receipt), uploaded, hop";

fn delivery_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRow> {
    let msg: Vec<u8> = r.get(0)?;
    let recipient: Vec<u8> = r.get(1)?;
    let state: String = r.get(4)?;
    let bad = |what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("damaged deliveries row: {what}").into(),
        )
    };
    Ok(DeliveryRow {
        msg: MessageId(msg.try_into().map_err(|_| bad("message id"))?),
        recipient: recipient.try_into().map_err(|_| bad("recipient"))?,
        name: r.get(2)?,
        relay: r.get(3)?,
        delivery: Delivery {
            state: State::from_name(&state).ok_or_else(|| bad("state"))?,
            submissions: r.get(5)?,
            failed_attempts: r.get(6)?,
            next_at: to_u64(r.get(7)?),
            expires_at: to_u64(r.get(8)?),
            changed_at: to_u64(r.get(9)?),
            failure: failure_from_row(r.get(10)?, r.get(11)?),
        },
        last_error: r.get(12)?,
        receipt: r.get(13)?,
        uploaded: to_u64(r.get(14)?),
        hop: r.get(15)?,
    })
}

/// A delivery's recipient as a statement names it: by key, or by the id
/// its key has in `recipients` when the caller looked it up once for many
/// statements (a report's signer): SQL that takes either form as `?2`
/// uses [`RCPT_2`].
#[derive(Clone, Copy)]
enum Rcpt<'a> {
    Key(&'a [u8; 32]),
    Id(i64),
}

impl rusqlite::ToSql for Rcpt<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(match self {
            Self::Key(k) => {
                rusqlite::types::ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Blob(&k[..]))
            }
            Self::Id(i) => rusqlite::types::ToSqlOutput::Owned(rusqlite::types::Value::Integer(*i)),
        })
    }
}

/// `recipient = ?2` for a [`Rcpt`]: an id as it is, a key through
/// `recipients` (looked up only then).
const RCPT_2: &str =
    "recipient = CASE WHEN typeof(?2) = 'integer' THEN ?2 ELSE (SELECT id FROM recipients WHERE key = ?2) END";

/// The id `key` has in `recipients`, if any.
fn recipient_id(tx: &Transaction<'_>, key: &[u8; 32]) -> rusqlite::Result<Option<i64>> {
    tx.prepare_cached("SELECT id FROM recipients WHERE key = ?1")?
        .query_row(params![key.to_vec()], |r| r.get(0))
        .optional()
}

fn save_delivery(
    tx: &Transaction<'_>,
    msg: &MessageId,
    recipient: Rcpt<'_>,
    d: &Delivery,
    last_error: Option<&str>,
) -> rusqlite::Result<()> {
    let (code, detail) = match &d.failure {
        None => (None, None),
        Some(Failure::Refused { code, detail }) => {
            (Some(format!("refused:{code}")), Some(detail.clone()))
        }
        Some(Failure::Local { code, detail }) => {
            (Some(format!("local:{code}")), Some(detail.clone()))
        }
        Some(f) => (Some(f.code()), failure_detail(&d.failure)),
    };
    // A delivery the sender cancelled (`sealpost cancel`, maybe while an
    // agent was in the middle of it) stays cancelled, unless a receipt
    // proves it was delivered after all.
    tx.prepare_cached(&format!(
        "UPDATE deliveries SET state = ?3, submissions = ?4, failed_attempts = ?5, next_ms = ?6, \
         changed_ms = ?7, failure = ?8, detail = ?9, last_error = ?10 WHERE msg = ?1 AND {RCPT_2} \
         AND NOT (state = 'failed' AND failure = 'local:cancelled' AND ?3 != 'delivered')"
    ))?
    .execute(params![
        msg.0.to_vec(),
        recipient,
        d.state.name(),
        d.submissions,
        d.failed_attempts,
        to_i64(d.next_at),
        to_i64(d.changed_at),
        code,
        detail,
        last_error,
    ])?;
    Ok(())
}

/// A message whose every delivery is final no longer needs its sealed
/// bytes for retransmission: they are dropped (the row, its hash and any
/// receipt stay).
fn release_sealed(tx: &Transaction<'_>, id: &MessageId) -> rusqlite::Result<()> {
    tx.prepare_cached(RELEASE_SEALED_SQL)?
        .execute(params![id.0.to_vec()])?;
    Ok(())
}

const RELEASE_SEALED_SQL: &str = concat!(
    "DELETE FROM sealed_copies WHERE id = ?1 AND NOT EXISTS \
     (SELECT 1 FROM deliveries WHERE msg = ?1 AND ",
    under_way!(),
    ")"
);

fn hash32(v: Vec<u8>) -> [u8; 32] {
    v.try_into().unwrap_or([0; 32])
}

/// What applying one report changed, per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub id: MessageId,
    /// None: no delivery of ours to the report's signer has this id.
    pub outcome: Option<Outcome>,
}

impl Db {
    pub fn setting(&self, key: &str) -> Result<Option<String>, AgentError> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM settings WHERE key = ?1")?
            .query_row(params![key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<(), AgentError> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Queues a sealed message and one delivery per recipient, durably.
    pub fn queue(
        &mut self,
        m: &QueuedMessage<'_>,
        recipients: &[QueuedRecipient],
    ) -> Result<(), AgentError> {
        self.queue_many(&[(m.clone(), recipients)])
    }

    /// Queues several messages in one transaction (one fsync).
    pub fn queue_many(
        &mut self,
        batch: &[(QueuedMessage<'_>, &[QueuedRecipient])],
    ) -> Result<(), AgentError> {
        let tx = self.conn.transaction()?;
        for (m, recipients) in batch {
            queue_in(&tx, m, recipients)?;
        }
        tx.commit()?;
        Ok(())
    }
}

fn queue_in(
    tx: &Transaction<'_>,
    m: &QueuedMessage<'_>,
    recipients: &[QueuedRecipient],
) -> Result<(), AgentError> {
    {
        // Cached statements: a burst queues thousands (`send --repeat`).
        tx.prepare_cached(
            "INSERT INTO outbox (id, kind, created_ms, expires_ms, content_hash, content_len, summary, sealed) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
                m.id.0.to_vec(),
                m.kind,
                to_i64(m.created_ms),
                to_i64(m.expires_ms),
                m.sent.content_hash.to_vec(),
                to_i64(m.sent.content_len),
                m.summary,
                &[] as &[u8],
            ])?;
        tx.prepare_cached("INSERT INTO sealed_copies (id, bytes) VALUES (?1, ?2)")?
            .execute(params![m.id.0.to_vec(), m.sealed])?;
        let d = Delivery::new(m.created_ms, m.expires_ms);
        for r in recipients {
            // The recipient's key and relay address once each, in their
            // tables; the row holds their ids.
            tx.prepare_cached("INSERT OR IGNORE INTO recipients (key) VALUES (?1)")?
                .execute(params![r.signing.to_vec()])?;
            tx.prepare_cached("INSERT OR IGNORE INTO relays (address) VALUES (?1)")?
                .execute(params![r.relay])?;
            tx.prepare_cached(
                "INSERT INTO deliveries (msg, recipient, name, relay, state, submissions, failed_attempts, \
                 next_ms, expires_ms, changed_ms) VALUES (?1, \
                 (SELECT id FROM recipients WHERE key = ?2), ?3, \
                 (SELECT id FROM relays WHERE address = ?4), ?5, 0, 0, ?6, ?7, ?6)",
            )?
            .execute(params![
                    m.id.0.to_vec(),
                    r.signing.to_vec(),
                    r.name,
                    r.relay,
                    d.state.name(),
                    to_i64(d.next_at),
                    to_i64(d.expires_at),
                ])?;
        }
    }
    Ok(())
}

/// What a pass asks of the deliveries, each answered from the indexes
/// of the deliveries under way (`deliveries_under_way_*`, `deliveries_forwarding`),
/// never by reading the finished ones: the cost of a pass does not grow
/// with history (the test `pass_queries_read_no_history`).
const DUE_WHERE: &str = concat!(
    "WHERE ",
    under_way!(),
    " AND next_ms <= ?1 AND expires_ms > ?1 ORDER BY next_ms"
);
const FORWARDING_WHERE: &str = "WHERE state = 'forwarding' ORDER BY changed_ms";

/// `LIMIT n` written into a statement, never bound: SQLite's planner reads
/// a bound `LIMIT ?` and so marks the statement to be compiled again when
/// that parameter's binding changes — and rusqlite's statement cache
/// clears the bindings whenever a statement goes back, so a `LIMIT ?`
/// statement was compiled again on every use (tens of microseconds each,
/// on every pass). A limit is one of a few constants, so each cached
/// statement stays one of a few.
pub(crate) fn limit(n: usize) -> String {
    format!(" LIMIT {}", n.min(i64::MAX as usize))
}

/// The deliveries due for submission now, earliest first.
fn due_sql(max: usize) -> String {
    format!(
        "SELECT {DELIVERY_COLS} FROM deliveries {DUE_WHERE}{}",
        limit(max)
    )
}

/// The deliveries handed to the home relay to forward, least recently
/// looked at first.
fn forwarding_sql(max: usize) -> String {
    format!(
        "SELECT {DELIVERY_COLS} FROM deliveries {FORWARDING_WHERE}{}",
        limit(max)
    )
}
const LIVE_WHERE: &str = concat!("WHERE ", under_way!());
/// [`under_way!`] for the modules below.
pub(crate) const UNDER_WAY: &str = under_way!();
const EXPIRED_WHERE: &str = concat!("WHERE ", under_way!(), " AND expires_ms <= ?1");
// Named: `state = 'queued'` also satisfies `deliveries_under_way_next`,
// and its range `next_ms > ?2` is every delivery awaiting a receipt (the
// planner took it once the live indexes were written with `OR`).
const REACHABLE_SQL: &str = "UPDATE deliveries INDEXED BY deliveries_retrying SET next_ms = ?2 \
     WHERE state = 'queued' AND failed_attempts > 0 \
     AND relay = (SELECT id FROM relays WHERE address = ?1) AND next_ms > ?2";
const ALL_DUE_NOW_SQL: &str = concat!(
    "UPDATE deliveries SET next_ms = ?1 WHERE ",
    under_way!(),
    " AND next_ms > ?1"
);
const NEXT_DUE_SQL: [&str; 2] = [
    concat!("SELECT MIN(next_ms) FROM deliveries WHERE ", under_way!()),
    concat!(
        "SELECT MIN(expires_ms) FROM deliveries WHERE ",
        under_way!()
    ),
];

impl Db {
    /// Deliveries due for a submission at `now_ms`, oldest first.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<DeliveryRow>, AgentError> {
        let mut stmt = self.conn.prepare_cached(&due_sql(limit))?;
        let rows = stmt.query_map(params![to_i64(now_ms)], delivery_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The earliest time anything in the outbox needs attention: a
    /// submission or an expiry.
    /// `relay` took a submission: deliveries queued for it after failures
    /// become due now instead of after their backoff. Returns how many.
    pub fn relay_reachable(&mut self, relay: &str, now_ms: u64) -> Result<usize, AgentError> {
        Ok(self
            .conn
            .prepare_cached(REACHABLE_SQL)?
            .execute(params![relay, to_i64(now_ms)])?)
    }

    /// The deliveries still in progress to the owner of `mailbox` whose
    /// sealed copy hashes to `payload_hash` (what a relay's forward notice
    /// names, PROTOCOL 6.9). Notices are rare: this reads the unfinished
    /// deliveries and hashes the copies of those to that mailbox.
    /// Deliveries handed to the home relay to forward and not finished,
    /// the least recently looked at first, at most `max`.
    pub fn forwarding(&self, max: usize) -> Result<Vec<DeliveryRow>, AgentError> {
        let mut stmt = self.conn.prepare_cached(&forwarding_sql(max))?;
        let rows = stmt
            .query_map([], delivery_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Records where a forwarded delivery is, as the home relay said.
    pub fn set_hops(&mut self, hops: &[(MessageId, [u8; 32], String)]) -> Result<(), AgentError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE deliveries SET hop = ?3 WHERE msg = ?1 AND recipient = (SELECT id FROM recipients WHERE key = ?2)",
            )?;
            for (msg, recipient, hop) in hops {
                stmt.execute(params![msg.0.to_vec(), recipient.to_vec(), hop])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn deliveries_of_item(
        &self,
        mailbox: &sealpost_proto::relay::MailboxId,
        payload_hash: &[u8; 32],
    ) -> Result<Vec<DeliveryRow>, AgentError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {DELIVERY_COLS} FROM deliveries {LIVE_WHERE}"
        ))?;
        let rows: Vec<DeliveryRow> = stmt
            .query_map([], delivery_from_row)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|r| sealpost_proto::relay::MailboxId::of(&r.recipient) == *mailbox)
            .collect();
        let mut out = Vec::new();
        for r in rows {
            let sealed = self.sealed(&r.msg)?.unwrap_or_default();
            if blake3::hash(&sealed).as_bytes() == payload_hash {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub fn next_due_ms(&self) -> Result<Option<u64>, AgentError> {
        // One indexed MIN per column, over the deliveries under way: no
        // scan of the outbox.
        let mut best: Option<i64> = None;
        for sql in NEXT_DUE_SQL {
            let v: Option<i64> = self.conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?;
            best = match (best, v) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(best.map(to_u64))
    }

    /// The sealed bytes of an outbox message.
    pub fn sealed(&self, id: &MessageId) -> Result<Option<Vec<u8>>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT COALESCE((SELECT bytes FROM sealed_copies WHERE id = ?1), x'') \
                 FROM outbox WHERE id = ?1",
            )?
            .query_row(params![id.0.to_vec()], |r| r.get(0))
            .optional()?)
    }

    /// Stores new delivery states, all in one transaction.
    pub fn save_deliveries(
        &mut self,
        rows: &[(MessageId, [u8; 32], Delivery, Option<String>)],
    ) -> Result<(), AgentError> {
        let tx = self.conn.transaction()?;
        for (msg, recipient, d, err) in rows {
            save_delivery(&tx, msg, Rcpt::Key(recipient), d, err.as_deref())?;
            if d.state.is_final() {
                release_sealed(&tx, msg)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Fails every unfinished delivery whose message has expired; returns
    /// the ones it failed.
    pub fn expire(&mut self, now_ms: u64) -> Result<Vec<DeliveryRow>, AgentError> {
        let tx = self.conn.transaction()?;
        let mut rows: Vec<DeliveryRow> = Vec::new();
        {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {DELIVERY_COLS} FROM deliveries {EXPIRED_WHERE}"
            ))?;
            let found = stmt.query_map(params![to_i64(now_ms)], delivery_from_row)?;
            for r in found {
                rows.push(r?);
            }
        }
        let mut failed = Vec::with_capacity(rows.len());
        for mut row in rows {
            if row.delivery.tick(now_ms) == Outcome::Changed {
                save_delivery(
                    &tx,
                    &row.msg,
                    Rcpt::Key(&row.recipient),
                    &row.delivery,
                    None,
                )?;
                release_sealed(&tx, &row.msg)?;
                failed.push(row);
            }
        }
        tx.commit()?;
        Ok(failed)
    }

    /// Applies a verified report signed by `signer` (already checked to be
    /// about our own messages) to our deliveries to `signer`, and stores
    /// the report with every delivery it completes, in one transaction;
    /// `remember` (the message that carried it, and until when)
    /// goes into the replay cache in the same transaction, so that one
    /// commit (one fsync) records both.
    pub fn apply_report(
        &mut self,
        signer: &[u8; 32],
        report: &Report,
        now_ms: u64,
        remember: (&ReceivedId, u64),
    ) -> Result<Vec<Applied>, AgentError> {
        let tx = self.conn.transaction()?;
        crate::contacts::replay_record(&tx, remember.0, remember.1, now_ms / 1000)?;
        // The signer's id, looked up once for every entry.
        let signer_rcpt = match recipient_id(&tx, signer)? {
            Some(id) => Rcpt::Id(id),
            None => Rcpt::Key(signer),
        };
        let report_hash = blake3::hash(report.as_bytes()).as_bytes().to_vec();
        // The report's row, once stored (one row for all it settles).
        let mut stored: Option<i64> = None;
        let mut out = Vec::with_capacity(report.entries().len());
        let ids: Vec<MessageId> = match report.entries() {
            Entries::Receipt(l) => l.iter().map(|e| e.id).collect(),
            Entries::Rejection(l) => l.iter().map(|e| e.id).collect(),
        };
        for (i, id) in ids.iter().enumerate() {
            let row = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {DELIVERY_COLS} FROM deliveries WHERE msg = ?1 AND {RCPT_2}"
                ))?;
                stmt.query_row(params![id.0.to_vec(), signer_rcpt], delivery_from_row)
                    .optional()?
            };
            let Some(mut row) = row else {
                out.push(Applied {
                    id: *id,
                    outcome: None,
                });
                continue;
            };
            let outcome = match report.entries() {
                Entries::Receipt(l) => {
                    let sent: Option<(Vec<u8>, i64)> = tx
                        .prepare_cached(
                            "SELECT content_hash, content_len FROM outbox WHERE id = ?1",
                        )?
                        .query_row(params![id.0.to_vec()], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    let Some((h, n)) = sent else {
                        out.push(Applied {
                            id: *id,
                            outcome: None,
                        });
                        continue;
                    };
                    let sent = Sent {
                        content_hash: hash32(h),
                        content_len: to_u64(n),
                    };
                    row.delivery.receipt(now_ms, &sent, &l[i])
                }
                Entries::Rejection(l) => row.delivery.rejected(now_ms, l[i].reason),
            };
            if outcome == Outcome::Changed {
                // The recipient's signed word, receipt or rejection, is kept
                // with the delivery it settled (`receipt export` hands it
                // out); one copy of the report for all it settles.
                let report_row = match stored {
                    Some(row) => row,
                    None => {
                        tx.execute(
                            "INSERT OR IGNORE INTO reports (hash, bytes) VALUES (?1, ?2)",
                            params![report_hash, report.as_bytes()],
                        )?;
                        let row: i64 = tx.query_row(
                            "SELECT id FROM reports WHERE hash = ?1",
                            params![report_hash],
                            |r| r.get(0),
                        )?;
                        *stored.insert(row)
                    }
                };
                tx.prepare_cached(&format!(
                    "UPDATE deliveries SET receipt = ?3 WHERE msg = ?1 AND {RCPT_2}"
                ))?
                .execute(params![id.0.to_vec(), signer_rcpt, report_row])?;
                save_delivery(&tx, id, signer_rcpt, &row.delivery, None)?;
                release_sealed(&tx, id)?;
            }
            out.push(Applied {
                id: *id,
                outcome: Some(outcome),
            });
        }
        tx.commit()?;
        Ok(out)
    }

    /// Cancels the deliveries of `id` that are not final (to `name` only,
    /// if given). Returns (recipient name, state before) of each cancelled.
    pub fn cancel(
        &mut self,
        id: &MessageId,
        name: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<(String, State)>, AgentError> {
        let tx = self.conn.transaction()?;
        let rows: Vec<DeliveryRow> = {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {DELIVERY_COLS} FROM deliveries WHERE msg = ?1"
            ))?;
            let rows = stmt
                .query_map(params![id.0.to_vec()], delivery_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            rows
        };
        let mut out = Vec::new();
        for mut row in rows {
            if name.is_some_and(|n| !n.eq_ignore_ascii_case(&row.name)) {
                continue;
            }
            let before = row.delivery.state;
            if row.delivery.cancel(now_ms) == Outcome::Changed {
                save_delivery(&tx, id, Rcpt::Key(&row.recipient), &row.delivery, None)?;
                out.push((row.name, before));
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Makes every delivery that waits for a backoff due now (`sync
    /// --now`). Returns how many.
    pub fn all_due_now(&mut self, now_ms: u64) -> Result<usize, AgentError> {
        Ok(self
            .conn
            .execute(ALL_DUE_NOW_SQL, params![to_i64(now_ms)])?)
    }

    /// Outbox messages with their deliveries, newest first.
    /// True once every delivery of `id` is final (or it is not in the
    /// outbox).
    pub fn is_final(&self, id: &MessageId) -> Result<bool, AgentError> {
        let e = self.outbox(Some(id), 1)?;
        Ok(e.first()
            .is_none_or(|m| m.deliveries.iter().all(|d| d.delivery.state.is_final())))
    }

    pub fn outbox(
        &self,
        id: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, AgentError> {
        let sql = if id.is_some() {
            "SELECT id, kind, created_ms, expires_ms, content_hash, content_len, summary FROM outbox \
             WHERE id = ?1"
        } else {
            "SELECT id, kind, created_ms, expires_ms, content_hash, content_len, summary FROM outbox \
             WHERE ?1 IS NULL ORDER BY created_ms DESC, id"
        };
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{sql}{}", self::limit(limit)))?;
        let rows = stmt.query_map(params![id.map(|i| i.0.to_vec())], |r| {
            let id: Vec<u8> = r.get(0)?;
            Ok(OutboxEntry {
                id: MessageId(id.try_into().unwrap_or([0; 16])),
                kind: r.get(1)?,
                created_ms: to_u64(r.get(2)?),
                expires_ms: to_u64(r.get(3)?),
                sent: Sent {
                    content_hash: hash32(r.get(4)?),
                    content_len: to_u64(r.get(5)?),
                },
                summary: r.get(6)?,
                deliveries: Vec::new(),
            })
        })?;
        let mut out: Vec<OutboxEntry> = rows.collect::<Result<_, _>>()?;
        let mut dstmt = self.conn.prepare_cached(&format!(
            "SELECT {DELIVERY_COLS} FROM deliveries WHERE msg = ?1 ORDER BY name"
        ))?;
        for e in &mut out {
            let rows = dstmt.query_map(params![e.id.0.to_vec()], delivery_from_row)?;
            e.deliveries = rows.collect::<Result<_, _>>()?;
        }
        Ok(out)
    }

    /// How many deliveries are in each state (those with any), by state:
    /// read from the totals the triggers keep, not counted.
    pub fn delivery_counts(&self) -> Result<Vec<(String, u64)>, AgentError> {
        let mut stmt = self
            .conn
            .prepare("SELECT state, n FROM delivery_totals WHERE n > 0 ORDER BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, to_u64(r.get(1)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Whether `table` has a column `column` (a database from before it was
/// added has not).
fn has_column(conn: &rusqlite::Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )
}

/// Brings a database made by an earlier version up to [`SCHEMA`]: files
/// queued before manifest version 2 recorded their blob's hash, which is
/// now learnt while uploading.
pub(crate) fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    if has_column(conn, "files_out", "blob_hash")? {
        conn.execute_batch("ALTER TABLE files_out DROP COLUMN blob_hash")?;
    }
    // Databases made before downloads counted their local failures.
    if !has_column(conn, "downloads", "local_errors")? {
        conn.execute_batch(
            "ALTER TABLE downloads ADD COLUMN local_errors INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    // Databases made before the archive.
    if !has_column(conn, "inbox", "archived_ms")? {
        conn.execute_batch("ALTER TABLE inbox ADD COLUMN archived_ms INTEGER")?;
    }
    // Databases made before deliveries said where they are.
    if !has_column(conn, "deliveries", "hop")? {
        conn.execute_batch("ALTER TABLE deliveries ADD COLUMN hop TEXT")?;
    }
    // Databases made before files could be padded.
    for table in ["files_out", "downloads"] {
        if !has_column(conn, table, "padded")? {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN padded INTEGER"))?;
        }
    }
    // Databases made before sealed copies had their own table (user
    // version 0): the copies still needed move there, once.
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < 1 {
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             INSERT OR IGNORE INTO sealed_copies (id, bytes)
                 SELECT id, sealed FROM outbox WHERE length(sealed) > 0;
             UPDATE outbox SET sealed = x'' WHERE length(sealed) > 0;
             PRAGMA user_version = 1;
             COMMIT;",
        )?;
    }
    // Databases made before deliveries named their recipient and relay by
    // id (user version 1): the keys and addresses in the rows move to
    // their tables, once (an address has a ':', an id none).
    if version < 2 {
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             INSERT OR IGNORE INTO recipients (key)
                 SELECT DISTINCT recipient FROM deliveries WHERE typeof(recipient) = 'blob';
             UPDATE deliveries SET recipient = (SELECT id FROM recipients WHERE key = deliveries.recipient)
                 WHERE typeof(recipient) = 'blob';
             INSERT OR IGNORE INTO relays (address)
                 SELECT DISTINCT relay FROM deliveries WHERE instr(relay, ':') > 0;
             UPDATE deliveries SET relay = (SELECT id FROM relays WHERE address = deliveries.relay)
                 WHERE instr(relay, ':') > 0;
             PRAGMA user_version = 2;
             COMMIT;",
        )?;
    }
    if version < 3 {
        reports_by_id(conn)?;
    }
    // Databases made before the totals were kept (user version 3, or a
    // move above that made the table again): counted once, under the
    // write lock (two processes opening one home both count; the second
    // finds the same).
    if version < 4 {
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             DELETE FROM delivery_totals;
             INSERT INTO delivery_totals (state, n)
                 SELECT state, count(*) FROM deliveries GROUP BY state;
             PRAGMA user_version = 4;
             COMMIT;",
        )?;
    }
    if version < 5 {
        keyed_by_sender(conn)?;
    }
    Ok(())
}

/// `name`'s `CREATE TABLE` statement in `schema`, creating `new_name`
/// instead.
fn table_as(schema: &str, name: &str, new_name: &str) -> String {
    let start = schema
        .find(&format!("CREATE TABLE IF NOT EXISTS {name} ("))
        .unwrap_or_else(|| unreachable!("{name} is in the schema"));
    let len = schema[start..]
        .find(");")
        .unwrap_or_else(|| unreachable!("a statement ends"));
    schema[start..start + len + 2].replacen(
        &format!("IF NOT EXISTS {name} ("),
        &format!("{new_name} ("),
        1,
    )
}

/// Databases made before received messages were keyed by their sender as
/// well as their id (user version 4): the inbox, the downloads, the file
/// groups and the replay cache were keyed by the message id alone, so a
/// contact who learnt another sender's id (a co-recipient of the same
/// message) could send its own message under it first and have the real
/// one discarded. The four tables are made again as the schema has them
/// now, in one transaction (as [`reports_by_id`] does): every row keeps
/// its sender; a replay-cache row, which did not record one, gets x'',
/// which matches every sender until its time is past (what it did
/// before); a file group's row gets the sender of the received message
/// of that id, and x'' for a message we sent (both, for one sent to
/// ourselves).
fn keyed_by_sender(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let moved = (|| -> rusqlite::Result<()> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        // Looked at inside the transaction: another process opening the
        // same home may have done it meanwhile (or the tables are new).
        if !has_column(conn, "replay", "sender")? {
            let contacts = crate::contacts::SCHEMA;
            let inbox_cols = INBOX_COLS;
            let download_cols = format!("{DOWNLOAD_COLS}, repair");
            conn.execute_batch(&format!(
                "{replay}
                 INSERT INTO replay_v5 (sender, id, forget_at) SELECT x'', id, forget_at FROM replay;
                 DROP TABLE replay;
                 ALTER TABLE replay_v5 RENAME TO replay;
                 {inbox}
                 INSERT INTO inbox_v5 ({inbox_cols}) SELECT {inbox_cols} FROM inbox;
                 {downloads}
                 INSERT INTO downloads_v5 ({download_cols}) SELECT {download_cols} FROM downloads;
                 {groups}
                 INSERT OR IGNORE INTO file_groups_v5 (msg, sender, group_id, idx, count)
                     SELECT g.msg, i.sender, g.group_id, g.idx, g.count
                     FROM file_groups g JOIN inbox i ON i.id = g.msg;
                 INSERT OR IGNORE INTO file_groups_v5 (msg, sender, group_id, idx, count)
                     SELECT msg, x'', group_id, idx, count FROM file_groups
                     WHERE msg IN (SELECT id FROM outbox);
                 DROP TABLE inbox;
                 DROP TABLE downloads;
                 DROP TABLE file_groups;
                 ALTER TABLE inbox_v5 RENAME TO inbox;
                 ALTER TABLE downloads_v5 RENAME TO downloads;
                 ALTER TABLE file_groups_v5 RENAME TO file_groups;",
                replay = table_as(contacts, "replay", "replay_v5"),
                inbox = table_as(SCHEMA, "inbox", "inbox_v5"),
                downloads = table_as(SCHEMA, "downloads", "downloads_v5"),
                groups = table_as(SCHEMA, "file_groups", "file_groups_v5"),
            ))?;
            // The indexes the old tables took with them.
            conn.execute_batch(contacts)?;
            conn.execute_batch(SCHEMA)?;
        }
        conn.execute_batch("PRAGMA user_version = 5; COMMIT;")
    })();
    if moved.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    moved
}

/// Databases made before reports had ids (user version 2): a delivery
/// named its report by the report's 32-byte hash, under a foreign key to
/// `reports(hash)`. Both tables are made again as `SCHEMA` has them now
/// (SQLite's way to change a table's constraints: a new table, the rows
/// copied, the old one dropped, the new one renamed), the deliveries
/// naming the new ids, in one transaction; then `SCHEMA` again for the
/// indexes the old table took with it. Foreign keys are off meanwhile (the
/// tables point at each other while they are swapped) and checked before
/// the commit.
fn reports_by_id(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "foreign_keys", false)?;
    let moved = (|| -> rusqlite::Result<()> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        // Looked at inside the transaction: another process opening the
        // same home may have done it meanwhile.
        let has_id: bool = has_column(conn, "reports", "id")?;
        if !has_id {
            let table = |name: &str| table_as(SCHEMA, name, &format!("{name}_by_id"));
            let cols = "msg, recipient, name, relay, state, submissions, failed_attempts, \
                        next_ms, expires_ms, changed_ms, failure, detail, last_error";
            conn.execute_batch(&format!(
                "{reports}
                 INSERT INTO reports_by_id (hash, bytes) SELECT hash, bytes FROM reports;
                 {deliveries}
                 INSERT INTO deliveries_by_id ({cols}, receipt, uploaded, hop)
                     SELECT {cols},
                         (SELECT id FROM reports_by_id WHERE hash = deliveries.receipt),
                         uploaded, hop
                     FROM deliveries;
                 DROP TABLE deliveries;
                 DROP TABLE reports;
                 ALTER TABLE reports_by_id RENAME TO reports;
                 ALTER TABLE deliveries_by_id RENAME TO deliveries;",
                reports = table("reports"),
                deliveries = table("deliveries")
            ))?;
            conn.execute_batch(SCHEMA)?;
            let broken: i64 =
                conn.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
                    r.get(0)
                })?;
            if broken > 0 {
                conn.execute_batch("ROLLBACK")?;
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
                    Some(format!(
                        "moving receipts to report ids would leave {broken} rows without their report; nothing was changed"
                    )),
                ));
            }
        }
        conn.execute_batch("PRAGMA user_version = 3; COMMIT;")
    })();
    if moved.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.pragma_update(None, "foreign_keys", true)?;
    moved
}

fn id16(v: Vec<u8>) -> [u8; 16] {
    v.try_into().unwrap_or([0; 16])
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// A statement naming one delivery by message and recipient (key or
    /// id) finds it through the primary key, both columns.
    #[test]
    fn one_delivery_is_found_by_its_key() {
        let conn = rusqlite::Connection::open_in_memory().expect("db");
        conn.execute_batch(SCHEMA).expect("schema");
        let q = format!(
            "EXPLAIN QUERY PLAN SELECT {DELIVERY_COLS} FROM deliveries WHERE msg = ?1 AND {RCPT_2}"
        );
        let mut stmt = conn.prepare(&q).expect("plan");
        let plan: Vec<String> = stmt
            .query_map(params![vec![0u8; 16], 7i64], |r| r.get::<_, String>(3))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("plan rows");
        assert!(
            plan.iter()
                .any(|p| p.contains("sqlite_autoindex_deliveries_1 (msg=? AND recipient=?)")),
            "{plan:?}"
        );
    }

    /// Looking up a file sent, once per message submitted, does not
    /// compile its statement again: a join with `f.msg = ?1` did, on every
    /// call, because the statement cache clears bindings (the test fails
    /// with the join). Messages and a file sent, looked up in turn with
    /// another cached statement between, as `submit_due` does.
    #[test]
    fn file_out_is_compiled_once() {
        let (_dir, mut db, _, _) = three_queued_to_bob();
        let f = crate::outbox::files::FileOut {
            msg: MessageId([1; 16]),
            path: "/tmp/f".into(),
            blob_id: sealpost_proto::relay::BlobId([5; 16]),
            key: sealpost_proto::blob::BlobKey([6; 32]),
            size: 10,
            chunk_size: 4096,
            padded_size: 10,
            plaintext_hash: [1; 32],
        };
        db.add_file_out(&f, None).expect("file");
        for round in 0..4 {
            for i in 0..3u8 {
                let found = db.file_out(&MessageId([i; 16])).expect("file_out");
                assert_eq!(found.is_some(), i == 1, "round {round}, message {i}");
                db.sealed(&MessageId([i; 16])).expect("sealed");
            }
        }
        assert_eq!(
            db.file_out(&MessageId([1; 16]))
                .expect("file_out")
                .map(|f| f.plaintext_hash),
            Some([1; 32])
        );
        let stmt = db
            .conn
            .prepare_cached(crate::outbox::files::FILE_OUT_SQL)
            .expect("cached");
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    /// The questions a pass asks with a limit are each compiled once:
    /// SQLite compiles a statement with a bound `LIMIT ?` again whenever
    /// its binding changes, which rusqlite's statement cache does on every
    /// use (the last part shows it for `due`).
    #[test]
    fn limited_questions_are_compiled_once() {
        let (_dir, mut db, _, _) = three_queued_to_bob();
        for round in 0..4u64 {
            db.due(1_000_000 + round, 64).expect("due");
            db.forwarding(64).expect("forwarding");
            db.outbox(None, 50).expect("outbox");
            db.outbox(Some(&MessageId([1; 16])), 1).expect("outbox one");
            db.downloads(None, 8).expect("downloads");
            db.pending_reports(256).expect("reports");
            db.prune_received(round, 100).expect("prune");
            db.prune_received_over(1 << 30, 100).expect("prune over");
        }
        let statements = [
            due_sql(64),
            forwarding_sql(64),
            format!("{}{}", inbox::PENDING_REPORTS_SQL, limit(256)),
        ];
        for q in statements {
            let stmt = db.conn.prepare_cached(&q).expect("cached");
            assert_eq!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{q}"
            );
        }
        // What this guards against: the same question with its limit bound.
        let bound = format!("SELECT {DELIVERY_COLS} FROM deliveries {DUE_WHERE} LIMIT ?2");
        for round in 0..3i64 {
            let mut stmt = db.conn.prepare_cached(&bound).expect("prepare");
            let mut rows = stmt.query(params![round, 64]).expect("query");
            while rows.next().expect("row").is_some() {}
        }
        let stmt = db.conn.prepare_cached(&bound).expect("cached");
        assert!(stmt.get_status(rusqlite::StatementStatus::RePrepare) > 0);
    }

    /// Changing a delivery, and the questions a pass asks, make no
    /// temporary b-tree (SQLite's `OpenEphemeral`, which a three-value
    /// `IN` list in a partial index's predicate made four of for every
    /// state change; the test fails with `state IN (...)`).
    #[test]
    fn delivery_changes_make_no_temporary_trees() {
        let conn = rusqlite::Connection::open_in_memory().expect("db");
        conn.execute_batch(SCHEMA).expect("schema");
        let mut statements = vec![
            "UPDATE deliveries SET state = ?3, next_ms = ?4 WHERE msg = ?1 AND recipient = ?2"
                .to_owned(),
            "INSERT INTO deliveries (msg, recipient, name, relay, state, submissions, \
             failed_attempts, next_ms, expires_ms, changed_ms) \
             VALUES (?1, ?2, 'bob', 1, ?3, 0, 0, ?4, ?4, ?4)"
                .to_owned(),
            "DELETE FROM deliveries WHERE msg = ?1".to_owned(),
            RELEASE_SEALED_SQL.to_owned(),
        ];
        // Not here: REACHABLE_SQL and ALL_DUE_NOW_SQL, which change the
        // column they find rows by (`next_ms`), so SQLite collects the
        // rows first (once per round, not per delivery).
        statements.extend(
            [LIVE_WHERE, EXPIRED_WHERE]
                .iter()
                .map(|w| format!("SELECT {DELIVERY_COLS} FROM deliveries {w}")),
        );
        statements.push(due_sql(64));
        statements.extend(NEXT_DUE_SQL.iter().map(|q| q.to_string()));
        for q in statements {
            let ops = explain(&conn, &format!("EXPLAIN {q}"), 1);
            assert!(!ops.iter().any(|o| o == "OpenEphemeral"), "{q}");
        }
    }

    /// A home from before keeps its deliveries under way indexed by
    /// `state IN (...)` under the old names: opened, those are gone and
    /// the new ones stand (made once, from the rows).
    #[test]
    fn old_live_indexes_are_replaced_at_open() {
        let (dir, db, _, _) = three_queued_to_bob();
        db.conn
            .execute_batch(
                "DROP INDEX deliveries_under_way_next;
                 DROP INDEX deliveries_under_way_expiry;
                 CREATE INDEX deliveries_live_next ON deliveries(next_ms)
                     WHERE state IN ('queued', 'submitted', 'forwarding');
                 CREATE INDEX deliveries_live_expiry ON deliveries(expires_ms)
                     WHERE state IN ('queued', 'submitted', 'forwarding');",
            )
            .expect("old indexes");
        drop(db);
        let db = Db::open(&dir.path().join("agent.db")).expect("reopen");
        let names: Vec<String> = db
            .conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'deliveries_%' ORDER BY name")
            .expect("names")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("names");
        assert!(
            !names.iter().any(|n| n.starts_with("deliveries_live_")),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n == "deliveries_under_way_next"),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n == "deliveries_under_way_expiry"),
            "{names:?}"
        );
        assert_eq!(
            db.due(u64::MAX / 4, 10).expect("due").len(),
            0,
            "expired ones are not due"
        );
        assert_eq!(db.due(5_000, 10).expect("due").len(), 3);
    }

    /// Column `column` of every row `explain` (an `EXPLAIN …` statement)
    /// gives, with every parameter NULL.
    fn explain(conn: &rusqlite::Connection, explain: &str, column: usize) -> Vec<String> {
        let mut stmt = conn.prepare(explain).expect("explain");
        let n = stmt.parameter_count();
        let nulls = rusqlite::params_from_iter(std::iter::repeat_n(rusqlite::types::Null, n));
        stmt.query_map(nulls, |r| r.get::<_, String>(column))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("explain rows")
    }

    /// Queues messages 0..n (ids of that byte) for `rcpt`.
    fn queue_some(db: &mut Db, rcpt: &QueuedRecipient, n: u8) {
        for i in 0..n {
            let m = QueuedMessage {
                id: MessageId([i; 16]),
                kind: "message",
                created_ms: 1_000,
                expires_ms: 10_000_000,
                sent: Sent {
                    content_hash: [1; 32],
                    content_len: 5,
                },
                summary: "hi",
                sealed: b"sealed",
            };
            db.queue(&m, std::slice::from_ref(rcpt)).expect("queue");
        }
    }

    /// A new database with three messages queued to bob (key `[7; 32]`)
    /// at one relay (ids `[0; 16]`, `[1; 16]`, `[2; 16]`).
    fn three_queued_to_bob() -> (tempfile::TempDir, Db, [u8; 32], String) {
        let dir = tempfile::tempdir().expect("dir");
        let mut db = Db::open(&dir.path().join("agent.db")).expect("db");
        let (bob, relay) = ([7u8; 32], "127.0.0.1:7443/ABCDEF".to_owned());
        let rcpt = QueuedRecipient {
            name: "bob".into(),
            signing: bob,
            relay: relay.clone(),
        };
        queue_some(&mut db, &rcpt, 3);
        (dir, db, bob, relay)
    }

    /// A delivery row holds the ids of its recipient and relay, each kept
    /// once; rows made before that (the key and the address in the row)
    /// move to ids when the database is opened, and read, match and
    /// update alike.
    #[test]
    fn deliveries_name_recipients_and_relays_once_and_old_rows_still_read() {
        let (dir, db, bob, relay) = three_queued_to_bob();
        // A row as an older version wrote it.
        db.conn
            .execute(
                "INSERT INTO outbox (id, kind, created_ms, expires_ms, content_hash, content_len, summary, sealed) \
                 VALUES (?1, 'message', 1000, 10000000, ?2, 5, 'old', x'')",
                params![vec![9u8; 16], vec![1u8; 32]],
            )
            .expect("old outbox row");
        db.conn
            .execute(
                "INSERT INTO deliveries (msg, recipient, name, relay, state, submissions, failed_attempts, \
                 next_ms, expires_ms, changed_ms) VALUES (?1, ?2, 'bob', ?3, 'queued', 0, 1, 5000, 10000000, 1000)",
                params![vec![9u8; 16], bob.to_vec(), relay],
            )
            .expect("old delivery row");
        db.conn
            .execute_batch("PRAGMA user_version = 1")
            .expect("an older database");
        drop(db);
        let mut db = Db::open(&dir.path().join("agent.db")).expect("db again");
        let (keys, relays): (i64, i64) = db
            .conn
            .query_row(
                "SELECT (SELECT count(*) FROM recipients), (SELECT count(*) FROM relays)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("counts");
        assert_eq!((keys, relays), (1, 1), "each kept once");
        let small: i64 = db
            .conn
            .query_row(
                "SELECT max(length(recipient) + length(relay)) FROM deliveries",
                [],
                |r| r.get(0),
            )
            .expect("len");
        assert!(
            small <= 4,
            "ids in the rows, not keys and addresses: {small}"
        );
        // Every row reads back with its key and address, old or new.
        let due = db.due(10_000, 100).expect("due");
        assert_eq!(due.len(), 4);
        assert!(due.iter().all(|d| d.recipient == bob && d.relay == relay));
        // Updates and lookups by key find both forms.
        for id in [MessageId([0; 16]), MessageId([9; 16])] {
            db.set_uploaded(&id, &bob, 42).expect("set");
            assert_eq!(db.uploaded(&id, &bob).expect("get"), 42);
        }
        // The relay answered again: the old row (one failed attempt) is due now.
        assert_eq!(db.relay_reachable(&relay, 2_000).expect("reachable"), 1);
    }

    /// A delivery names the report that settled it by the report row's
    /// integer id (a byte or two, not its 32-byte hash: issue 22's bytes per
    /// message); a database made before that, with deliveries under a
    /// foreign key to `reports(hash)`, is moved once when opened: every
    /// delivery still reads its report, the foreign key now names
    /// `reports(id)` and holds, updates of settled rows pass it, the
    /// partial indexes are back, and opening again changes nothing.
    #[test]
    fn deliveries_name_their_report_by_id_and_old_databases_move() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("agent.db");
        let mut db = Db::open(&path).expect("db");
        let bob = [7u8; 32];
        let rcpt = QueuedRecipient {
            name: "bob".into(),
            signing: bob,
            relay: "127.0.0.1:7443/ABCDEF".into(),
        };
        queue_some(&mut db, &rcpt, 2);
        // The two tables as version 2 made them, with their rows.
        let old_deliveries = SCHEMA[SCHEMA
            .find("CREATE TABLE IF NOT EXISTS deliveries (")
            .expect("t")..]
            .split_once(");")
            .expect("end")
            .0
            .replace(
                "receipt INTEGER REFERENCES reports(id)",
                "receipt BLOB REFERENCES reports(hash)",
            )
            .replace("IF NOT EXISTS deliveries (", "deliveries_old (");
        db.conn
            .execute_batch(&format!(
                "PRAGMA foreign_keys = OFF;
                 BEGIN;
                 {old_deliveries});
                 INSERT INTO deliveries_old SELECT * FROM deliveries;
                 DROP TABLE deliveries;
                 ALTER TABLE deliveries_old RENAME TO deliveries;
                 DROP TABLE reports;
                 CREATE TABLE reports (hash BLOB PRIMARY KEY, bytes BLOB NOT NULL);
                 INSERT INTO reports (hash, bytes) VALUES (zeroblob(32), x'5349474e4544');
                 UPDATE deliveries SET receipt = zeroblob(32) WHERE msg = zeroblob(16);
                 PRAGMA user_version = 2;
                 COMMIT;
                 PRAGMA foreign_keys = ON;"
            ))
            .expect("an older database");
        let fk = |db: &Db| -> String {
            db.conn
                .query_row(
                    "SELECT \"table\" || '(' || \"to\" || ')' FROM pragma_foreign_key_list('deliveries') WHERE \"from\" = 'receipt'",
                    [],
                    |r| r.get(0),
                )
                .expect("fk")
        };
        assert_eq!(fk(&db), "reports(hash)");
        drop(db);

        let mut db = Db::open(&path).expect("db again");
        assert_eq!(fk(&db), "reports(id)");
        let (kind, version, broken, indexes): (String, i64, i64, i64) = db
            .conn
            .query_row(
                "SELECT (SELECT typeof(receipt) FROM deliveries WHERE msg = zeroblob(16)), \
                 (SELECT user_version FROM pragma_user_version), \
                 (SELECT count(*) FROM pragma_foreign_key_check), \
                 (SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'deliveries' AND sql IS NOT NULL)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("row");
        assert_eq!(
            (kind.as_str(), version, broken, indexes),
            ("integer", 5, 0, 4)
        );
        let receipt = |db: &mut Db, m: u8| {
            db.due(10_000, 100)
                .expect("due")
                .into_iter()
                .find(|d| d.msg == MessageId([m; 16]))
                .map(|d| d.receipt)
                .expect("delivery")
        };
        assert_eq!(receipt(&mut db, 0).as_deref(), Some(&b"SIGNED"[..]));
        assert_eq!(receipt(&mut db, 1), None);
        // A row with its report is updated under the new foreign key.
        db.set_uploaded(&MessageId([0; 16]), &bob, 42)
            .expect("update");
        drop(db);
        let mut db = Db::open(&path).expect("third open");
        assert_eq!(receipt(&mut db, 0).as_deref(), Some(&b"SIGNED"[..]));
        assert_eq!(db.uploaded(&MessageId([0; 16]), &bob).expect("get"), 42);
    }

    /// `status` and `sync` read how many deliveries are in each state from
    /// totals the triggers keep: after any mix of new rows, state changes
    /// (one row or many at once), rows deleted and a transaction rolled
    /// back, they equal a count of the rows; a database from before the
    /// totals (user version 3) has them counted once when opened.
    #[test]
    fn delivery_totals_follow_every_change_and_old_databases_count_once() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("agent.db");
        let mut db = Db::open(&path).expect("db");
        let rcpt = QueuedRecipient {
            name: "bob".into(),
            signing: [7; 32],
            relay: "127.0.0.1:7443/ABCDEF".into(),
        };
        queue_some(&mut db, &rcpt, 40);
        let counted = |db: &Db| -> Vec<(String, u64)> {
            let mut stmt = db
                .conn
                .prepare("SELECT state, count(*) FROM deliveries GROUP BY state ORDER BY state")
                .expect("count");
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, to_u64(r.get(1)?))))
                .expect("rows");
            rows.collect::<Result<_, _>>().expect("counted")
        };
        assert_eq!(
            db.delivery_counts().expect("totals"),
            vec![("queued".to_owned(), 40)]
        );
        let states = [
            "queued",
            "submitted",
            "forwarding",
            "delivered",
            "rejected",
            "expired",
        ];
        let mut x: u64 = 7;
        for step in 0..300u32 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let (m, s) = (((x >> 33) % 40) as u8, states[((x >> 45) % 6) as usize]);
            db.conn
                .execute(
                    "UPDATE deliveries SET state = ?2 WHERE msg = ?1",
                    params![vec![m; 16], s],
                )
                .expect("one row");
            if step % 50 == 49 {
                db.conn
                    .execute(
                        "UPDATE deliveries SET state = 'submitted' WHERE state = ?1",
                        params![s],
                    )
                    .expect("many rows");
            }
            if step % 97 == 96 {
                db.conn
                    .execute(
                        "DELETE FROM deliveries WHERE msg = ?1",
                        params![vec![m; 16]],
                    )
                    .expect("delete");
            }
            assert_eq!(
                db.delivery_counts().expect("totals"),
                counted(&db),
                "step {step}"
            );
        }
        let before = counted(&db);
        {
            let tx = db.conn.transaction().expect("tx");
            tx.execute("UPDATE deliveries SET state = 'expired'", [])
                .expect("all");
            // dropped: rolled back
        }
        assert_eq!(db.delivery_counts().expect("totals"), before);
        // As a database from before the totals were kept.
        db.conn
            .execute_batch(
                "DROP TRIGGER deliveries_total_insert;
                 DROP TRIGGER deliveries_total_delete;
                 DROP TRIGGER deliveries_total_state;
                 DROP TABLE delivery_totals;
                 UPDATE deliveries SET state = 'delivered' WHERE rowid % 3 = 0;
                 PRAGMA user_version = 3;",
            )
            .expect("an older database");
        let old = counted(&db);
        assert_ne!(old, before);
        drop(db);
        let db = Db::open(&path).expect("db again");
        assert_eq!(db.delivery_counts().expect("totals"), old);
        let version: i64 = db
            .conn
            .query_row("SELECT user_version FROM pragma_user_version", [], |r| {
                r.get(0)
            })
            .expect("version");
        assert_eq!(version, 5);
    }

    /// A home's free pages go back all at once while little is in use,
    /// and in steps, down to the pages kept, while much is.
    #[test]
    fn free_pages_go_back_at_once_while_little_is_in_use() {
        let dir = tempfile::tempdir().expect("dir");
        let mut db = Db::open(&dir.path().join("agent.db")).expect("db");
        let free_pages = |db: &Db| -> i64 {
            db.conn
                .pragma_query_value(None, "freelist_count", |r| r.get(0))
                .expect("free")
        };
        let fill = |db: &Db, tag: i64, n: i64| {
            db.conn
                .execute(
                    "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?2) \
                     INSERT INTO filler SELECT ?1, randomblob(3000) FROM k",
                    params![tag, n],
                )
                .expect("fill");
        };
        db.conn
            .execute_batch("CREATE TABLE filler (tag INTEGER, b BLOB)")
            .expect("table");
        fill(&db, 1, 3000);
        db.conn
            .execute("DELETE FROM filler WHERE tag = 1", [])
            .expect("delete");
        let free = free_pages(&db);
        assert!(free > 2500, "{free}");
        let policy = sealpost_sqlite::Policy {
            keep_pages: 256,
            all_at_once_live_pages: 4096,
            max_step_pages: 1024,
            min_step_pages: 16,
            step_target: std::time::Duration::from_secs(10),
        };
        let mut pace = sealpost_sqlite::Pace::new(policy);
        assert_eq!(
            db.give_back_space(&mut pace).expect("back"),
            sealpost_sqlite::Step {
                given: free,
                more: false
            }
        );
        assert_eq!(free_pages(&db), 0);
        let mode: i64 = db
            .conn
            .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, 2, "incremental again");
        // 24 MiB stay in use: steps of at most 1,024 pages, down to the
        // 256 kept.
        fill(&db, 2, 8000);
        fill(&db, 3, 3000);
        db.conn
            .execute("DELETE FROM filler WHERE tag = 3", [])
            .expect("delete");
        let mut steps = 0;
        loop {
            let step = db.give_back_space(&mut pace).expect("step");
            assert!(step.given <= 1024, "{step:?}");
            steps += 1;
            assert!(steps < 10, "ends");
            if !step.more {
                break;
            }
        }
        assert!(steps >= 2, "{steps}");
        assert_eq!(free_pages(&db), 256);
    }

    /// A relay that takes submissions again makes what waits for it
    /// after failures due at once: finding those reads them alone, not
    /// every delivery under way. (Before, a backlog awaiting receipts —
    /// submitted, due again later — was read whole after every
    /// submitting round: a million sent in one go cost the sender's agent
    /// 23 reads a message instead of 2.)
    #[test]
    fn a_relay_back_reads_only_what_waits_for_it() {
        let (_dir, db, _, relay) = three_queued_to_bob();
        // One of the three failed once and waits for its backoff.
        db.conn
            .execute(
                "UPDATE deliveries SET failed_attempts = 1, next_ms = 60000 WHERE msg = ?1",
                params![vec![0u8; 16]],
            )
            .expect("failed once");
        // 20,000 submitted to the same relay, awaiting their receipts.
        db.conn
            .execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
                 INSERT INTO outbox (id, kind, created_ms, expires_ms, content_hash, content_len, summary, sealed)
                     SELECT CAST(printf('%016d', i) AS BLOB), 'message', 1000, 10000000, zeroblob(32), 5, 'hi', x'' FROM n;
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
                 INSERT INTO deliveries (msg, recipient, name, relay, state, submissions, failed_attempts,
                                         next_ms, expires_ms, changed_ms)
                     SELECT CAST(printf('%016d', i) AS BLOB), (SELECT id FROM recipients), 'bob',
                            (SELECT id FROM relays), 'submitted', 1, 0, 50000, 10000000, 1000 FROM n;",
            )
            .expect("a backlog");
        let mut stmt = db.conn.prepare(REACHABLE_SQL).expect("prepare");
        assert_eq!(stmt.execute(params![relay, 2_000]).expect("reachable"), 1);
        let steps = stmt.get_status(rusqlite::StatementStatus::VmStep);
        assert!(steps < 500, "{steps} steps for one delivery among 20,003");
        drop(stmt);
        let due = db.due(2_000, 100).expect("due");
        assert_eq!(due.len(), 3, "the one that waited and the two never tried");
        let later: i64 = db
            .conn
            .query_row(
                "SELECT count(*) FROM deliveries WHERE state = 'submitted' AND next_ms = 50000",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(
            later, 20_000,
            "the backlog's retransmission times are untouched"
        );
    }

    /// A pass's questions about deliveries are answered from the indexes
    /// of those under way: none reads the table's rows in order (a scan
    /// of the whole history), whatever the history holds.
    #[test]
    fn pass_queries_read_no_history() {
        let conn = rusqlite::Connection::open_in_memory().expect("db");
        conn.execute_batch(SCHEMA).expect("schema");
        let mut queries: Vec<String> = [LIVE_WHERE, EXPIRED_WHERE]
            .iter()
            .map(|w| format!("SELECT {DELIVERY_COLS} FROM deliveries {w}"))
            .collect();
        queries.push(due_sql(64));
        queries.push(forwarding_sql(64));
        queries.extend(NEXT_DUE_SQL.iter().map(|q| q.to_string()));
        queries.push(REACHABLE_SQL.into());
        queries.push(ALL_DUE_NOW_SQL.into());
        for q in queries {
            let plan = explain(&conn, &format!("EXPLAIN QUERY PLAN {q}"), 3);
            // One of the partial indexes, which hold live deliveries only.
            assert!(
                plan.iter().any(|p| [
                    "deliveries_under_way_",
                    "deliveries_forwarding",
                    "deliveries_retrying"
                ]
                .iter()
                .any(|i| p.contains(&format!("INDEX {i}")))),
                "{q}: {plan:?}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|p| p.starts_with("SCAN deliveries") && !p.contains("INDEX")),
                "{q}: {plan:?}"
            );
        }
    }

    /// What a database records of received messages is keyed by (id,
    /// sender); one made before (user version 4, keyed by the id alone) is
    /// moved once when opened: every row keeps its sender, a received
    /// file's group its sender and a sent one's x'', and the replay
    /// cache's rows, which had no sender, still match every sender. Then
    /// another sender's message under the same id is recorded beside it.
    #[test]
    fn received_records_are_keyed_by_sender_and_old_databases_move() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("agent.db");
        let mut db = Db::open(&path).expect("db");
        let rcpt = QueuedRecipient {
            name: "bob".into(),
            signing: [7; 32],
            relay: "127.0.0.1:7443/ABCDEF".into(),
        };
        // A sent message, [0; 16], and alice's received one, [5; 16].
        queue_some(&mut db, &rcpt, 1);
        let (alice, mallory) = ([1u8; 32], [2u8; 32]);
        let (sent, got) = (MessageId([0; 16]), MessageId([5; 16]));
        db.conn
            .execute_batch(
                "BEGIN;
                 DROP TABLE replay;
                 CREATE TABLE replay (id BLOB PRIMARY KEY, forget_at INTEGER NOT NULL);
                 INSERT INTO replay VALUES (x'05050505050505050505050505050505', 9000000000);
                 DROP TABLE inbox;
                 CREATE TABLE inbox (id BLOB PRIMARY KEY, sender BLOB NOT NULL,
                     kind TEXT NOT NULL, created_at INTEGER NOT NULL,
                     expires_at INTEGER NOT NULL, received_ms INTEGER NOT NULL,
                     content_hash BLOB NOT NULL, content_len INTEGER NOT NULL,
                     segment INTEGER NOT NULL, offset INTEGER NOT NULL, read_ms INTEGER,
                     archived_ms INTEGER);
                 INSERT INTO inbox VALUES (x'05050505050505050505050505050505',
                     x'0101010101010101010101010101010101010101010101010101010101010101',
                     'file-manifest', 1, 9000000000, 1000, zeroblob(32), 10, 1, 0, NULL, NULL);
                 DROP TABLE downloads;
                 CREATE TABLE downloads (msg BLOB PRIMARY KEY, sender BLOB NOT NULL,
                     agreement BLOB NOT NULL, relay TEXT, blob_id BLOB NOT NULL,
                     blob_key BLOB NOT NULL, size INTEGER NOT NULL, chunk_size INTEGER NOT NULL,
                     plaintext_hash BLOB NOT NULL, name TEXT NOT NULL, dir TEXT NOT NULL,
                     next_chunk INTEGER NOT NULL, bad TEXT NOT NULL DEFAULT '',
                     attempts INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, final_path TEXT,
                     error TEXT, changed_ms INTEGER NOT NULL, repair BLOB,
                     local_errors INTEGER NOT NULL DEFAULT 0, padded INTEGER);
                 INSERT INTO downloads (msg, sender, agreement, blob_id, blob_key, size,
                     chunk_size, plaintext_hash, name, dir, next_chunk, state, changed_ms, repair)
                     VALUES (x'05050505050505050505050505050505',
                     x'0101010101010101010101010101010101010101010101010101010101010101',
                     zeroblob(32), zeroblob(16), zeroblob(32), 10, 65536, zeroblob(32),
                     'a.txt', '/tmp', 0, 'downloading', 1000, x'aa');
                 DROP TABLE file_groups;
                 CREATE TABLE file_groups (msg BLOB PRIMARY KEY, group_id BLOB NOT NULL,
                     idx INTEGER NOT NULL, count INTEGER NOT NULL);
                 INSERT INTO file_groups VALUES
                     (x'05050505050505050505050505050505', x'11111111111111111111111111111111', 0, 2),
                     (x'00000000000000000000000000000000', x'22222222222222222222222222222222', 1, 3);
                 PRAGMA user_version = 4;
                 COMMIT;",
            )
            .expect("an older database");
        drop(db);
        let mut db = Db::open(&path).expect("moved");
        let version = |db: &Db| -> i64 {
            db.conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .expect("version")
        };
        assert_eq!(version(&db), 5);
        let alices = ReceivedId::new(alice, got);
        let e = db.inbox_entry(&alices).expect("db").expect("kept");
        assert_eq!((e.sender, e.content_len), (alice, 10));
        assert!(db
            .inbox_entry(&ReceivedId::new(mallory, got))
            .expect("db")
            .is_none());
        let d = db.download(&alices).expect("db").expect("kept");
        assert_eq!((d.name.as_str(), d.padded_size), ("a.txt", 10));
        assert_eq!(db.repair_offer(&alices).expect("db"), Some(vec![0xaa]));
        assert_eq!(
            db.group_of_received(&alices).expect("db").map(|g| g.count),
            Some(2)
        );
        assert_eq!(
            db.group_of_sent(&sent).expect("db").map(|g| g.count),
            Some(3)
        );
        assert_eq!(db.group_of_sent(&got).expect("db"), None);
        assert_eq!(
            db.received_group_members(&[0x11; 16], &alice).expect("db"),
            vec![got]
        );
        assert!(db
            .received_group_members(&[0x11; 16], &mallory)
            .expect("db")
            .is_empty());
        assert_eq!(db.sent_group_members(&[0x22; 16]).expect("db"), vec![sent]);
        // The old replay row knew no sender: it still matches any.
        assert!(db.replay_seen(&alices).expect("db"));
        assert!(db.replay_seen(&ReceivedId::new(mallory, got)).expect("db"));
        assert!(!db
            .replay_insert(&ReceivedId::new(mallory, got), 9_000_000_000, 1)
            .expect("insert"));
        // New rows are the sender's own.
        let other = MessageId([6; 16]);
        assert!(db
            .replay_insert(&ReceivedId::new(alice, other), 9_000_000_000, 1)
            .expect("insert"));
        assert!(!db
            .replay_seen(&ReceivedId::new(mallory, other))
            .expect("db"));
        // Mallory's message under alice's id is recorded beside hers.
        let mallorys = InboxEntry {
            sender: mallory,
            content_len: 99,
            ..e.clone()
        };
        let new = db
            .record_inbox(&[(mallorys, 9_000_000_000)], &[], &[], &[], 1)
            .expect("record");
        assert_eq!(
            new,
            std::collections::HashSet::from([ReceivedId::new(mallory, got)])
        );
        assert_eq!(
            db.inbox_entry(&alices).expect("db").map(|e| e.content_len),
            Some(10)
        );
        assert_eq!(
            db.inbox_entry(&ReceivedId::new(mallory, got))
                .expect("db")
                .map(|e| e.content_len),
            Some(99)
        );
        // Deleting one leaves the other, and its download and group.
        assert_eq!(
            db.delete_received(&[ReceivedId::new(mallory, got)])
                .expect("rm"),
            1
        );
        assert!(db.inbox_entry(&alices).expect("db").is_some());
        assert!(db.download(&alices).expect("db").is_some());
        assert!(db.group_of_received(&alices).expect("db").is_some());
        // Opening again changes nothing.
        drop(db);
        let db = Db::open(&path).expect("again");
        assert_eq!(version(&db), 5);
        assert!(db.inbox_entry(&alices).expect("db").is_some());
        assert!(db.replay_seen(&alices).expect("db"));
        let indexes: i64 = db
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name IN \
                 ('replay_forget', 'inbox_received', 'inbox_segment', 'downloads_state', \
                  'file_groups_group')",
                [],
                |r| r.get(0),
            )
            .expect("indexes");
        assert_eq!(indexes, 5, "the indexes are back");
    }

    /// The questions asked of every message received, by (id, sender):
    /// each finds its row by its primary key (no scan), is compiled once
    /// and builds no temporary b-tree (the replay cache's look-ups under
    /// the sender and under x'' fail this with `sender IN (?1, x'')`).
    #[test]
    fn received_look_ups_use_their_keys_and_are_compiled_once() {
        let dir = tempfile::tempdir().expect("dir");
        let mut db = Db::open(&dir.path().join("agent.db")).expect("db");
        for i in 0..4u8 {
            let k = ReceivedId::new([i; 32], MessageId([i; 16]));
            assert!(!db.replay_seen(&k).expect("seen"));
            assert!(db.replay_insert(&k, 9_000_000_000, 1).expect("insert"));
            assert!(db.replay_seen(&k).expect("seen"));
            assert!(db.inbox_entry(&k).expect("entry").is_none());
            assert!(db.download(&k).expect("download").is_none());
        }
        for q in [
            crate::contacts::REPLAY_SEEN_SQL,
            crate::contacts::REPLAY_ADD_SQL,
            crate::contacts::REPLAY_LEGACY_SQL,
        ] {
            let stmt = db.conn.prepare_cached(q).expect("cached");
            assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
            drop(stmt);
            let program = explain(&db.conn, &format!("EXPLAIN {q}"), 1);
            assert!(
                !program.iter().any(|op| op == "OpenEphemeral"),
                "{q}: {program:?}"
            );
        }
        for (q, index) in [
            (
                crate::contacts::REPLAY_SEEN_SQL.to_owned(),
                "sqlite_autoindex_replay_1 (id=? AND sender=?)",
            ),
            (
                format!("SELECT {INBOX_COLS} FROM inbox WHERE id = ?1 AND sender = ?2"),
                "sqlite_autoindex_inbox_1 (id=? AND sender=?)",
            ),
            (
                format!("SELECT {DOWNLOAD_COLS} FROM downloads WHERE msg = ?1 AND sender = ?2"),
                "sqlite_autoindex_downloads_1 (msg=? AND sender=?)",
            ),
        ] {
            let plan = explain(&db.conn, &format!("EXPLAIN QUERY PLAN {q}"), 3);
            assert!(plan.iter().any(|p| p.contains(index)), "{q}: {plan:?}");
            assert!(
                !plan
                    .iter()
                    .any(|p| p.starts_with("SCAN") && p != "SCAN CONSTANT ROW"),
                "{q}: {plan:?}"
            );
        }
    }
}
