//! The agent's delivery state in its SQLite database: the outbox (sealed
//! messages and one delivery per recipient), the inbox index, the reports
//! (receipts and rejections) waiting to be sent, and settings.
//!
//! Every change is one transaction, durable (`synchronous=FULL`) before the
//! caller acts on it: a message is queued before its id is printed, an
//! inbox entry is committed before the relay copy is acknowledged and
//! before its receipt is queued, and a receipt is stored before the
//! delivery is shown as delivered.

use rusqlite::{params, OptionalExtension, Transaction};
use sealpost_proto::delivery::{Delivery, Failure, Outcome, Sent, State};
use sealpost_proto::manifest::Group;
use sealpost_proto::report::{Entries, ReceiptEntry, RejectReason, RejectionEntry, Report};
use sealpost_proto::MessageId;

use crate::contacts::{to_i64, to_u64};
use crate::{AgentError, Db};

pub(crate) const SCHEMA: &str = "
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
    sealed BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox(created_ms);
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
    receipt BLOB REFERENCES reports(hash),
    uploaded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (msg, recipient)
);
CREATE TABLE IF NOT EXISTS files_out (
    msg BLOB PRIMARY KEY REFERENCES outbox(id),
    path TEXT NOT NULL,
    blob_id BLOB NOT NULL,
    blob_key BLOB NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_out_blob ON files_out(blob_id);
-- files sent or received as part of a directory (the manifest's group,
-- PROTOCOL 5.1), for either direction: a message id names one message
CREATE TABLE IF NOT EXISTS file_groups (
    msg BLOB PRIMARY KEY,
    group_id BLOB NOT NULL,
    idx INTEGER NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS file_groups_group ON file_groups(group_id, idx);
CREATE TABLE IF NOT EXISTS downloads (
    msg BLOB PRIMARY KEY,
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
    local_errors INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS downloads_state ON downloads(state);
CREATE TABLE IF NOT EXISTS repairs (
    msg BLOB NOT NULL,
    recipient BLOB NOT NULL,
    chunks BLOB NOT NULL,
    PRIMARY KEY (msg, recipient)
);
CREATE TABLE IF NOT EXISTS reports (
    hash BLOB PRIMARY KEY,
    bytes BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_ms);
CREATE INDEX IF NOT EXISTS deliveries_expiry ON deliveries(state, expires_ms);
CREATE TABLE IF NOT EXISTS inbox (
    id BLOB PRIMARY KEY,
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
    archived_ms INTEGER
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
";

/// A stranger whose messages were refused (`inbox --refused`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedSender {
    /// Their Ed25519 signing key.
    pub key: [u8; 32],
    pub first_ms: u64,
    pub last_ms: u64,
    pub messages: u64,
}

/// Strangers whose refusals are remembered for `inbox --refused`.
pub const MAX_REFUSED_SENDERS: i64 = 1000;

/// Detections kept; older ones are pruned as new ones arrive.
const MAX_DETECTIONS: i64 = 200_000;

/// Something a relay (or the network through it) did that the checks
/// caught: what it was and which item (a fetched item's BLAKE3 in hex,
/// or `blob:<id>@<offset>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub at_ms: u64,
    pub class: String,
    pub item: String,
}

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

/// A message in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub id: MessageId,
    pub sender: [u8; 32],
    pub kind: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub received_ms: u64,
    pub content_hash: [u8; 32],
    pub content_len: u64,
    pub segment: u64,
    pub offset: u64,
    pub read_ms: Option<u64>,
    /// When it was archived: out of `inbox`'s list, still readable.
    pub archived_ms: Option<u64>,
}

/// Where received messages are listed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shelf {
    /// The inbox: not archived.
    Inbox,
    /// Archived: out of the inbox's list, still readable.
    Archive,
    /// Both.
    Both,
}

/// A report entry waiting to be signed and sent back to a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReport {
    pub subject: [u8; 32],
    pub agreement: [u8; 32],
    pub id: MessageId,
    pub relay: String,
    /// None: a receipt entry; Some: a rejection with this reason.
    pub reason: Option<RejectReason>,
    pub content_hash: [u8; 32],
    pub content_len: u64,
    pub stored_at: u64,
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

/// A batched receipt is stored once in `reports` and named by its BLAKE3
/// from every delivery it completes.
const DELIVERY_COLS: &str = "msg, recipient, name, relay, state, submissions, failed_attempts, \
     next_ms, expires_ms, changed_ms, failure, detail, last_error, \
     (SELECT bytes FROM reports WHERE reports.hash = deliveries.receipt), uploaded";

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
    })
}

fn save_delivery(
    tx: &Transaction<'_>,
    msg: &MessageId,
    recipient: &[u8; 32],
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
    tx.prepare_cached(
        "UPDATE deliveries SET state = ?3, submissions = ?4, failed_attempts = ?5, next_ms = ?6, \
         changed_ms = ?7, failure = ?8, detail = ?9, last_error = ?10 WHERE msg = ?1 AND recipient = ?2 \
         AND NOT (state = 'failed' AND failure = 'local:cancelled' AND ?3 != 'delivered')",
    )?
    .execute(params![
            msg.0.to_vec(),
            recipient.to_vec(),
            d.state.name(),
            d.submissions,
            d.failed_attempts,
            to_i64(d.next_at),
            to_i64(d.changed_at),
            code,
            detail,
            last_error,
        ],
    )?;
    Ok(())
}

/// A message whose every delivery is final no longer needs its sealed
/// bytes for retransmission: they are dropped (the row, its hash and any
/// receipt stay).
fn release_sealed(tx: &Transaction<'_>, id: &MessageId) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE outbox SET sealed = x'' WHERE id = ?1 AND NOT EXISTS \
         (SELECT 1 FROM deliveries WHERE msg = ?1 AND state IN ('queued', 'submitted'))",
    )?
    .execute(params![id.0.to_vec()])?;
    Ok(())
}

fn hash32(v: Vec<u8>) -> [u8; 32] {
    v.try_into().unwrap_or([0; 32])
}

fn inbox_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InboxEntry> {
    let id: Vec<u8> = r.get(0)?;
    Ok(InboxEntry {
        id: MessageId(id.try_into().unwrap_or([0; 16])),
        sender: hash32(r.get(1)?),
        kind: r.get(2)?,
        created_at: to_u64(r.get(3)?),
        expires_at: to_u64(r.get(4)?),
        received_ms: to_u64(r.get(5)?),
        content_hash: hash32(r.get(6)?),
        content_len: to_u64(r.get(7)?),
        segment: to_u64(r.get(8)?),
        offset: to_u64(r.get(9)?),
        read_ms: r.get::<_, Option<i64>>(10)?.map(to_u64),
        archived_ms: r.get::<_, Option<i64>>(11)?.map(to_u64),
    })
}

const INBOX_COLS: &str = "id, sender, kind, created_at, expires_at, received_ms, content_hash, \
     content_len, segment, offset, read_ms, archived_ms";

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
        tx.execute(
            "INSERT INTO outbox (id, kind, created_ms, expires_ms, content_hash, content_len, summary, sealed) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                m.id.0.to_vec(),
                m.kind,
                to_i64(m.created_ms),
                to_i64(m.expires_ms),
                m.sent.content_hash.to_vec(),
                to_i64(m.sent.content_len),
                m.summary,
                m.sealed,
            ],
        )?;
        let d = Delivery::new(m.created_ms, m.expires_ms);
        for r in recipients {
            tx.execute(
                "INSERT INTO deliveries (msg, recipient, name, relay, state, submissions, failed_attempts, \
                 next_ms, expires_ms, changed_ms) VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, ?6, ?7, ?6)",
                params![
                    m.id.0.to_vec(),
                    r.signing.to_vec(),
                    r.name,
                    r.relay,
                    d.state.name(),
                    to_i64(d.next_at),
                    to_i64(d.expires_at),
                ],
            )?;
        }
    }
    Ok(())
}

impl Db {
    /// Deliveries due for a submission at `now_ms`, oldest first.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<DeliveryRow>, AgentError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {DELIVERY_COLS} FROM deliveries \
             WHERE state IN ('queued', 'submitted') AND next_ms <= ?1 AND expires_ms > ?1 \
             ORDER BY next_ms LIMIT ?2"
        ))?;
        let rows = stmt.query_map(
            params![to_i64(now_ms), to_i64(limit as u64)],
            delivery_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The earliest time anything in the outbox needs attention: a
    /// submission or an expiry.
    /// `relay` took a submission: deliveries queued for it after failures
    /// become due now instead of after their backoff. Returns how many.
    pub fn relay_reachable(&mut self, relay: &str, now_ms: u64) -> Result<usize, AgentError> {
        Ok(self
            .conn
            .prepare_cached(
                "UPDATE deliveries SET next_ms = ?2 \
                 WHERE relay = ?1 AND state = 'queued' AND failed_attempts > 0 AND next_ms > ?2",
            )?
            .execute(params![relay, to_i64(now_ms)])?)
    }

    pub fn next_due_ms(&self) -> Result<Option<u64>, AgentError> {
        // One indexed MIN per (state, column): no scan of the outbox.
        let mut best: Option<i64> = None;
        for sql in [
            "SELECT MIN(next_ms) FROM deliveries WHERE state = 'queued'",
            "SELECT MIN(next_ms) FROM deliveries WHERE state = 'submitted'",
            "SELECT MIN(expires_ms) FROM deliveries WHERE state = 'queued'",
            "SELECT MIN(expires_ms) FROM deliveries WHERE state = 'submitted'",
        ] {
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
            .prepare_cached("SELECT sealed FROM outbox WHERE id = ?1")?
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
            save_delivery(&tx, msg, recipient, d, err.as_deref())?;
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
        for state in ["queued", "submitted"] {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {DELIVERY_COLS} FROM deliveries WHERE state = ?1 AND expires_ms <= ?2"
            ))?;
            let found = stmt.query_map(params![state, to_i64(now_ms)], delivery_from_row)?;
            for r in found {
                rows.push(r?);
            }
        }
        let mut failed = Vec::with_capacity(rows.len());
        for mut row in rows {
            if row.delivery.tick(now_ms) == Outcome::Changed {
                save_delivery(&tx, &row.msg, &row.recipient, &row.delivery, None)?;
                release_sealed(&tx, &row.msg)?;
                failed.push(row);
            }
        }
        tx.commit()?;
        Ok(failed)
    }

    /// Applies a verified report signed by `signer` (already checked to be
    /// about our own messages) to our deliveries to `signer`, and stores
    /// the report with every delivery it completes, in one transaction.
    pub fn apply_report(
        &mut self,
        signer: &[u8; 32],
        report: &Report,
        now_ms: u64,
    ) -> Result<Vec<Applied>, AgentError> {
        let tx = self.conn.transaction()?;
        let report_hash = blake3::hash(report.as_bytes()).as_bytes().to_vec();
        let mut stored = false;
        let mut out = Vec::with_capacity(report.entries().len());
        let ids: Vec<MessageId> = match report.entries() {
            Entries::Receipt(l) => l.iter().map(|e| e.id).collect(),
            Entries::Rejection(l) => l.iter().map(|e| e.id).collect(),
        };
        for (i, id) in ids.iter().enumerate() {
            let row = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {DELIVERY_COLS} FROM deliveries WHERE msg = ?1 AND recipient = ?2"
                ))?;
                stmt.query_row(params![id.0.to_vec(), signer.to_vec()], delivery_from_row)
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
                if !stored {
                    tx.execute(
                        "INSERT OR IGNORE INTO reports (hash, bytes) VALUES (?1, ?2)",
                        params![report_hash, report.as_bytes()],
                    )?;
                    stored = true;
                }
                tx.prepare_cached(
                    "UPDATE deliveries SET receipt = ?3 WHERE msg = ?1 AND recipient = ?2",
                )?
                .execute(params![id.0.to_vec(), signer.to_vec(), report_hash])?;
                save_delivery(&tx, id, signer, &row.delivery, None)?;
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
                save_delivery(&tx, id, &row.recipient, &row.delivery, None)?;
                out.push((row.name, before));
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Makes every delivery that waits for a backoff due now (`sync
    /// --now`). Returns how many.
    pub fn all_due_now(&mut self, now_ms: u64) -> Result<usize, AgentError> {
        Ok(self.conn.execute(
            "UPDATE deliveries SET next_ms = ?1 WHERE state IN ('queued', 'submitted') AND next_ms > ?1",
            params![to_i64(now_ms)],
        )?)
    }

    /// Deletes received messages' records (and a received file's record;
    /// never the file). Returns how many were deleted.
    /// Whether any stored message is in inbox segment `segment`.
    pub fn segment_in_use(&self, segment: u64) -> Result<bool, AgentError> {
        Ok(self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM inbox WHERE segment = ?1)")?
            .query_row(params![to_i64(segment)], |r| r.get(0))?)
    }

    /// Deletes at most `max` received messages that arrived before
    /// `before_ms`, oldest first, as `delete` does (a file still being
    /// received is kept). Returns how many.
    pub fn prune_received(&mut self, before_ms: u64, max: usize) -> Result<usize, AgentError> {
        let ids: Vec<MessageId> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id FROM inbox WHERE received_ms < ?1 AND id NOT IN \
                 (SELECT msg FROM downloads WHERE state NOT IN ('done', 'failed')) \
                 ORDER BY received_ms LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![to_i64(before_ms), to_i64(max as u64)], |r| {
                Ok(MessageId(id16(r.get(0)?)))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        if ids.is_empty() {
            return Ok(0);
        }
        self.delete_received(&ids)
    }

    pub fn delete_received(&mut self, ids: &[MessageId]) -> Result<usize, AgentError> {
        let tx = self.conn.transaction()?;
        let mut n = 0;
        for id in ids {
            n += tx.execute("DELETE FROM inbox WHERE id = ?1", params![id.0.to_vec()])?;
            tx.execute(
                "DELETE FROM file_groups WHERE msg = ?1 AND msg NOT IN (SELECT id FROM outbox)",
                params![id.0.to_vec()],
            )?;
            tx.execute(
                "DELETE FROM downloads WHERE msg = ?1 AND state IN ('done', 'failed')",
                params![id.0.to_vec()],
            )?;
        }
        tx.commit()?;
        Ok(n)
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
             WHERE id = ?1 LIMIT ?2"
        } else {
            "SELECT id, kind, created_ms, expires_ms, content_hash, content_len, summary FROM outbox \
             WHERE ?1 IS NULL ORDER BY created_ms DESC, id LIMIT ?2"
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(
            params![id.map(|i| i.0.to_vec()), to_i64(limit as u64)],
            |r| {
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
            },
        )?;
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

    /// Counts of deliveries per state.
    /// Records what the checks caught (diagnostics: a crash may lose the
    /// last few, never a delivery decision).
    pub fn record_detections(
        &mut self,
        found: &[(&'static str, String)],
        now_ms: u64,
    ) -> Result<(), AgentError> {
        if found.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO detections (at_ms, class, item) VALUES (?1, ?2, ?3)",
            )?;
            for (class, item) in found {
                ins.execute(params![to_i64(now_ms), class, item])?;
            }
            tx.execute(
                "DELETE FROM detections WHERE n <= (SELECT MAX(n) FROM detections) - ?1",
                params![MAX_DETECTIONS],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Detections by class.
    pub fn detection_counts(&self) -> Result<Vec<(String, u64)>, AgentError> {
        let mut stmt = self
            .conn
            .prepare("SELECT class, COUNT(*) FROM detections GROUP BY class ORDER BY class")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, to_u64(r.get(1)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Notes a message refused because its sender is not a contact. At
    /// most [`MAX_REFUSED_SENDERS`] senders are kept (the least recent go
    /// first), so strangers cannot grow the database without bound.
    pub fn note_refused_sender(&mut self, key: &[u8; 32], now_ms: u64) -> Result<(), AgentError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO refused_senders (key, first_ms, last_ms, count) VALUES (?1, ?2, ?2, 1) \
             ON CONFLICT(key) DO UPDATE SET last_ms = ?2, count = count + 1",
            params![key.to_vec(), to_i64(now_ms)],
        )?;
        tx.execute(
            "DELETE FROM refused_senders WHERE key IN (SELECT key FROM refused_senders \
             ORDER BY last_ms DESC LIMIT -1 OFFSET ?1)",
            params![MAX_REFUSED_SENDERS],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Senders refused as strangers, most recent first.
    pub fn refused_senders(&self, limit: usize) -> Result<Vec<RefusedSender>, AgentError> {
        let mut stmt = self.conn.prepare(
            "SELECT key, first_ms, last_ms, count FROM refused_senders ORDER BY last_ms DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![to_i64(limit as u64)], |r| {
            Ok(RefusedSender {
                key: hash32(r.get(0)?),
                first_ms: to_u64(r.get(1)?),
                last_ms: to_u64(r.get(2)?),
                messages: to_u64(r.get(3)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The latest detections, newest first.
    pub fn detections(&self, limit: usize) -> Result<Vec<Detection>, AgentError> {
        let mut stmt = self
            .conn
            .prepare("SELECT at_ms, class, item FROM detections ORDER BY n DESC LIMIT ?1")?;
        let rows = stmt.query_map(params![to_i64(limit as u64)], |r| {
            Ok(Detection {
                at_ms: to_u64(r.get(0)?),
                class: r.get(1)?,
                item: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delivery_counts(&self) -> Result<Vec<(String, u64)>, AgentError> {
        let mut stmt = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM deliveries GROUP BY state ORDER BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, to_u64(r.get(1)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The inbox entry with this id, if delivered.
    pub fn inbox_entry(&self, id: &MessageId) -> Result<Option<InboxEntry>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {INBOX_COLS} FROM inbox WHERE id = ?1"))?
            .query_row(params![id.0.to_vec()], inbox_from_row)
            .optional()?)
    }

    /// Inbox entries (not archived), newest first.
    pub fn inbox(&self, unread_only: bool, limit: usize) -> Result<Vec<InboxEntry>, AgentError> {
        self.received(Shelf::Inbox, unread_only, limit)
    }

    /// Received messages on `shelf`, newest first.
    pub fn received(
        &self,
        shelf: Shelf,
        unread_only: bool,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, AgentError> {
        let which = match shelf {
            Shelf::Inbox => "archived_ms IS NULL",
            Shelf::Archive => "archived_ms IS NOT NULL",
            Shelf::Both => "1",
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {INBOX_COLS} FROM inbox WHERE ({which}) AND (NOT ?1 OR read_ms IS NULL) \
             ORDER BY received_ms DESC, id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![unread_only, to_i64(limit as u64)], inbox_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Moves received messages to the archive (`now_ms`), or back to the
    /// inbox (`None`). Returns how many changed shelf.
    pub fn archive_received(
        &mut self,
        ids: &[MessageId],
        now_ms: Option<u64>,
    ) -> Result<usize, AgentError> {
        let tx = self.conn.transaction()?;
        let mut n = 0;
        for id in ids {
            n += match now_ms {
                Some(t) => tx.execute(
                    "UPDATE inbox SET archived_ms = ?2 WHERE id = ?1 AND archived_ms IS NULL",
                    params![id.0.to_vec(), to_i64(t)],
                )?,
                None => tx.execute(
                    "UPDATE inbox SET archived_ms = NULL WHERE id = ?1 AND archived_ms IS NOT NULL",
                    params![id.0.to_vec()],
                )?,
            };
        }
        tx.commit()?;
        Ok(n)
    }

    pub fn mark_read(&mut self, id: &MessageId, now_ms: u64) -> Result<(), AgentError> {
        self.conn.execute(
            "UPDATE inbox SET read_ms = ?2 WHERE id = ?1 AND read_ms IS NULL",
            params![id.0.to_vec(), to_i64(now_ms)],
        )?;
        Ok(())
    }

    /// Records delivered messages (their stored copies already durable and
    /// verified), their replay-cache entries and the receipts they are
    /// owed, plus other reports (rejections, receipts again for
    /// duplicates), in one transaction. Returns the ids that were new: a
    /// message already in the inbox is not delivered twice.
    pub fn record_inbox(
        &mut self,
        entries: &[(InboxEntry, u64)],
        reports: &[PendingReport],
        downloads: &[Download],
        groups: &[(MessageId, Group)],
        now: u64,
    ) -> Result<Vec<MessageId>, AgentError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM replay WHERE forget_at <= ?1",
            params![to_i64(now)],
        )?;
        let mut new = Vec::with_capacity(entries.len());
        for (e, forget_at) in entries {
            let n = tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO inbox ({INBOX_COLS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL, NULL)"
                ),
                params![
                    e.id.0.to_vec(),
                    e.sender.to_vec(),
                    e.kind,
                    to_i64(e.created_at),
                    to_i64(e.expires_at),
                    to_i64(e.received_ms),
                    e.content_hash.to_vec(),
                    to_i64(e.content_len),
                    to_i64(e.segment),
                    to_i64(e.offset),
                ],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO replay (id, forget_at) VALUES (?1, ?2)",
                params![e.id.0.to_vec(), to_i64(*forget_at)],
            )?;
            if n == 1 {
                new.push(e.id);
            }
        }
        for p in reports {
            insert_pending(&tx, p)?;
        }
        for d in downloads {
            if new.contains(&d.msg) {
                insert_download(&tx, d)?;
            }
        }
        for (msg, g) in groups {
            if new.contains(msg) {
                insert_group(&tx, msg, g)?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    /// Reports waiting to be sent, at most `limit`.
    pub fn pending_reports(&self, limit: usize) -> Result<Vec<PendingReport>, AgentError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT subject, agreement, id, relay, reason, content_hash, content_len, stored_at \
             FROM pending_reports ORDER BY subject, relay, reason LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![to_i64(limit as u64)], |r| {
            let id: Vec<u8> = r.get(2)?;
            let reason: u8 = r.get(4)?;
            Ok(PendingReport {
                subject: hash32(r.get(0)?),
                agreement: hash32(r.get(1)?),
                id: MessageId(id.try_into().unwrap_or([0; 16])),
                relay: r.get(3)?,
                reason: RejectReason::from_code(reason),
                content_hash: hash32(r.get(5)?),
                content_len: to_u64(r.get(6)?),
                stored_at: to_u64(r.get(7)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets reports that were sent (or can never be).
    pub fn remove_pending_reports(
        &mut self,
        done: &[([u8; 32], MessageId)],
    ) -> Result<(), AgentError> {
        let tx = self.conn.transaction()?;
        for (subject, id) in done {
            tx.execute(
                "DELETE FROM pending_reports WHERE subject = ?1 AND id = ?2",
                params![subject.to_vec(), id.0.to_vec()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl PendingReport {
    /// Groups pending entries into reports: one per (subject, relay, kind),
    /// at most [`sealpost_proto::report::MAX_ENTRIES`] entries each.
    pub fn group(pending: Vec<PendingReport>) -> Vec<(PendingGroup, Entries)> {
        let mut out: Vec<(PendingGroup, Entries)> = Vec::new();
        for p in pending {
            let key = PendingGroup {
                subject: p.subject,
                agreement: p.agreement,
                relay: p.relay.clone(),
                ids: Vec::new(),
            };
            let fits = |g: &(PendingGroup, Entries)| {
                g.0.subject == key.subject
                    && g.0.relay == key.relay
                    && g.1.len() < sealpost_proto::report::MAX_ENTRIES
                    && matches!(
                        (&g.1, p.reason),
                        (Entries::Receipt(_), None) | (Entries::Rejection(_), Some(_))
                    )
            };
            let idx = match out.iter().position(fits) {
                Some(i) => i,
                None => {
                    let entries = match p.reason {
                        None => Entries::Receipt(Vec::new()),
                        Some(_) => Entries::Rejection(Vec::new()),
                    };
                    out.push((key, entries));
                    out.len() - 1
                }
            };
            let g = &mut out[idx];
            g.0.ids.push(p.id);
            match (&mut g.1, p.reason) {
                (Entries::Receipt(l), None) => l.push(ReceiptEntry {
                    id: p.id,
                    content_hash: p.content_hash,
                    content_len: p.content_len,
                    stored_at: p.stored_at,
                }),
                (Entries::Rejection(l), Some(reason)) => {
                    l.push(RejectionEntry { id: p.id, reason })
                }
                _ => {}
            }
        }
        out
    }
}

/// Where one grouped report goes.
#[derive(Debug, Clone)]
pub struct PendingGroup {
    pub subject: [u8; 32],
    pub agreement: [u8; 32],
    pub relay: String,
    pub ids: Vec<MessageId>,
}

/// Brings a database made by an earlier version up to [`SCHEMA`]: files
/// queued before manifest version 2 recorded their blob's hash, which is
/// now learnt while uploading.
pub(crate) fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let old: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('files_out') WHERE name = 'blob_hash'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if old {
        conn.execute_batch("ALTER TABLE files_out DROP COLUMN blob_hash")?;
    }
    // Databases made before downloads counted their local failures.
    let counted: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('downloads') WHERE name = 'local_errors'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !counted {
        conn.execute_batch(
            "ALTER TABLE downloads ADD COLUMN local_errors INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    // Databases made before the archive.
    let shelved: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('inbox') WHERE name = 'archived_ms'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !shelved {
        conn.execute_batch("ALTER TABLE inbox ADD COLUMN archived_ms INTEGER")?;
    }
    Ok(())
}

/// A file being sent: where its bytes come from and how they are encrypted.
#[derive(Debug, Clone)]
pub struct FileOut {
    pub msg: MessageId,
    pub path: String,
    pub blob_id: [u8; 16],
    pub key: sealpost_proto::blob::BlobKey,
    pub size: u64,
    pub chunk_size: u32,
    /// BLAKE3 of the file as queued (its manifest's and its delivery's
    /// content hash): the upload checks the bytes it sends against it.
    pub plaintext_hash: [u8; 32],
}

/// A file being received.
#[derive(Debug, Clone)]
pub struct Download {
    pub msg: MessageId,
    pub sender: [u8; 32],
    pub agreement: [u8; 32],
    /// Where the receipt goes.
    pub relay: Option<String>,
    pub blob_id: [u8; 16],
    pub key: sealpost_proto::blob::BlobKey,
    pub size: u64,
    pub chunk_size: u32,
    pub plaintext_hash: [u8; 32],
    pub name: String,
    pub dir: String,
    /// Chunks before this one are written and durable (except `bad`).
    pub next_chunk: u64,
    /// Chunks that did not authenticate.
    pub bad: Vec<u64>,
    pub attempts: u32,
    pub state: DownloadState,
    pub final_path: Option<String>,
    pub error: Option<String>,
    pub changed_ms: u64,
    /// Passes in a row in which this download failed on this machine (its
    /// disk or file system): it waits longer after each.
    pub local_errors: u32,
}

/// Where a received file's download stands (the `state` column of
/// `downloads`, by these names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DownloadState {
    /// Fetching and verifying chunks from the relay (or waiting to).
    Downloading,
    /// Chunks were damaged or the blob is gone: a repair is asked of the
    /// sender, and the download goes on when the repair arrives.
    Repairing,
    /// Given up; the sender was sent a signed rejection.
    Failed,
    /// Stored, read back and verified; its receipt is owed or sent.
    Done,
}

impl DownloadState {
    pub const ALL: [Self; 4] = [Self::Downloading, Self::Repairing, Self::Failed, Self::Done];

    pub fn name(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Repairing => "repairing",
            Self::Failed => "failed",
            Self::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Nothing more will happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Failed | Self::Done)
    }
}

impl std::fmt::Display for DownloadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl rusqlite::types::ToSql for DownloadState {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.name().into())
    }
}

impl rusqlite::types::FromSql for DownloadState {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let s = v.as_str()?;
        Self::parse(s).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(format!("unknown download state {s:?}").into())
        })
    }
}

/// How a download ends (see [`crate::outbox::Db::download_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadEnd {
    /// Stored and verified at its final path.
    Done,
    /// Given up.
    Failed,
    /// Back to the first chunk (a read-back did not match); the download
    /// stays `downloading`.
    Restart,
}

impl Download {
    /// The rejection a download that cannot be stored earns.
    pub fn rejection(&self, relay: String, reason: RejectReason) -> PendingReport {
        PendingReport {
            subject: self.sender,
            agreement: self.agreement,
            id: self.msg,
            relay,
            reason: Some(reason),
            content_hash: [0; 32],
            content_len: 0,
            stored_at: 0,
        }
    }

    /// The receipt entry a finished download earns: the file's hash and
    /// size, as read back from disk.
    pub fn receipt(&self, relay: String, stored_at: u64) -> PendingReport {
        PendingReport {
            subject: self.sender,
            agreement: self.agreement,
            id: self.msg,
            relay,
            reason: None,
            content_hash: self.plaintext_hash,
            content_len: self.size,
            stored_at,
        }
    }
}

const DOWNLOAD_COLS: &str = "msg, sender, agreement, relay, blob_id, blob_key, size, chunk_size, \
     plaintext_hash, name, dir, next_chunk, bad, attempts, state, final_path, error, changed_ms, \
     local_errors";

fn id16(v: Vec<u8>) -> [u8; 16] {
    v.try_into().unwrap_or([0; 16])
}

fn download_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Download> {
    let bad: String = r.get(12)?;
    Ok(Download {
        msg: MessageId(id16(r.get(0)?)),
        sender: hash32(r.get(1)?),
        agreement: hash32(r.get(2)?),
        relay: r.get(3)?,
        blob_id: id16(r.get(4)?),
        key: sealpost_proto::blob::BlobKey(hash32(r.get(5)?)),
        size: to_u64(r.get(6)?),
        chunk_size: r.get(7)?,
        plaintext_hash: hash32(r.get(8)?),
        name: r.get(9)?,
        dir: r.get(10)?,
        next_chunk: to_u64(r.get(11)?),
        bad: bad.split(',').filter_map(|x| x.parse().ok()).collect(),
        attempts: r.get(13)?,
        state: r.get(14)?,
        final_path: r.get(15)?,
        error: r.get(16)?,
        changed_ms: to_u64(r.get(17)?),
        local_errors: r.get(18)?,
    })
}

fn insert_group(
    tx: &rusqlite::Transaction<'_>,
    msg: &MessageId,
    g: &Group,
) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT OR IGNORE INTO file_groups (msg, group_id, idx, count) VALUES (?1, ?2, ?3, ?4)",
        params![msg.0.to_vec(), g.id.to_vec(), g.index, g.count],
    )?;
    Ok(())
}

fn bad_text(bad: &[u64]) -> String {
    bad.iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl Db {
    /// Records the file behind a queued file-manifest message (and its
    /// group, for a file of a directory).
    pub fn add_file_out(&mut self, f: &FileOut, group: Option<&Group>) -> Result<(), AgentError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO files_out (msg, path, blob_id, blob_key, size, chunk_size) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                f.msg.0.to_vec(),
                f.path,
                f.blob_id.to_vec(),
                f.key.0.to_vec(),
                to_i64(f.size),
                f.chunk_size,
            ],
        )?;
        if let Some(g) = group {
            insert_group(&tx, &f.msg, g)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The group a file message (sent or received) belongs to, if any.
    pub fn group_of(&self, msg: &MessageId) -> Result<Option<Group>, AgentError> {
        Ok(self
            .conn
            .prepare_cached("SELECT group_id, idx, count FROM file_groups WHERE msg = ?1")?
            .query_row(params![msg.0.to_vec()], |r| {
                Ok(Group {
                    id: id16(r.get(0)?),
                    index: r.get(1)?,
                    count: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// The messages of a group, in their order. (Group ids are random, so
    /// a sender's group and a received one never share an id by chance;
    /// callers scope received groups to their sender.)
    pub fn group_members(&self, group_id: &[u8; 16]) -> Result<Vec<MessageId>, AgentError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT msg FROM file_groups WHERE group_id = ?1 ORDER BY idx, msg")?;
        let rows = stmt.query_map(params![group_id.to_vec()], |r| {
            Ok(MessageId(id16(r.get(0)?)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn file_out(&self, msg: &MessageId) -> Result<Option<FileOut>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT f.msg, f.path, f.blob_id, f.blob_key, f.size, f.chunk_size, o.content_hash \
                 FROM files_out f JOIN outbox o ON o.id = f.msg WHERE f.msg = ?1",
            )?
            .query_row(params![msg.0.to_vec()], |r| {
                Ok(FileOut {
                    msg: MessageId(id16(r.get(0)?)),
                    path: r.get(1)?,
                    blob_id: id16(r.get(2)?),
                    key: sealpost_proto::blob::BlobKey(hash32(r.get(3)?)),
                    size: to_u64(r.get(4)?),
                    chunk_size: r.get(5)?,
                    plaintext_hash: hash32(r.get(6)?),
                })
            })
            .optional()?)
    }

    /// Notes how much of a file the recipient's relay holds (for status).
    pub fn set_uploaded(
        &mut self,
        msg: &MessageId,
        recipient: &[u8; 32],
        bytes: u64,
    ) -> Result<(), AgentError> {
        self.conn
            .prepare_cached(
                "UPDATE deliveries SET uploaded = ?3 WHERE msg = ?1 AND recipient = ?2",
            )?
            .execute(params![msg.0.to_vec(), recipient.to_vec(), to_i64(bytes)])?;
        Ok(())
    }

    /// Bytes of the file the recipient's relay holds, per delivery.
    pub fn uploaded(&self, msg: &MessageId, recipient: &[u8; 32]) -> Result<u64, AgentError> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT uploaded FROM deliveries WHERE msg = ?1 AND recipient = ?2")?
            .query_row(params![msg.0.to_vec(), recipient.to_vec()], |r| r.get(0))
            .optional()?;
        Ok(v.map(to_u64).unwrap_or(0))
    }

    pub fn download(&self, msg: &MessageId) -> Result<Option<Download>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {DOWNLOAD_COLS} FROM downloads WHERE msg = ?1"
            ))?
            .query_row(params![msg.0.to_vec()], download_from_row)
            .optional()?)
    }

    /// Downloads in a state, oldest first.
    pub fn downloads(
        &self,
        state: Option<DownloadState>,
        limit: usize,
    ) -> Result<Vec<Download>, AgentError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {DOWNLOAD_COLS} FROM downloads WHERE ?1 IS NULL OR state = ?1 \
             ORDER BY changed_ms LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![state, to_i64(limit as u64)], download_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Counts a local failure of a download (its disk or file system, not
    /// the relay) and returns how many in a row it has had.
    pub fn download_local_error(
        &mut self,
        msg: &MessageId,
        error: &str,
        now_ms: u64,
    ) -> Result<u32, AgentError> {
        Ok(self
            .conn
            .prepare_cached(
                "UPDATE downloads SET local_errors = local_errors + 1, error = ?2, \
                 changed_ms = ?3 WHERE msg = ?1 RETURNING local_errors",
            )?
            .query_row(params![msg.0.to_vec(), error, to_i64(now_ms)], |r| r.get(0))?)
    }

    /// Sets a download's state (and error text).
    pub fn download_state(
        &mut self,
        msg: &MessageId,
        state: DownloadState,
        error: Option<&str>,
        now_ms: u64,
    ) -> Result<(), AgentError> {
        self.conn
            .prepare_cached(
                "UPDATE downloads SET state = ?2, error = ?3, changed_ms = ?4 WHERE msg = ?1",
            )?
            .execute(params![msg.0.to_vec(), state, error, to_i64(now_ms)])?;
        Ok(())
    }

    /// Stores a download's progress (after its partial file was fsync'd).
    pub fn download_progress(
        &mut self,
        msg: &MessageId,
        next_chunk: u64,
        bad: &[u64],
        now_ms: u64,
    ) -> Result<(), AgentError> {
        self.conn
            .prepare_cached(
                "UPDATE downloads SET next_chunk = ?2, bad = ?3, changed_ms = ?4, local_errors = 0 \
                 WHERE msg = ?1",
            )?
            .execute(params![
                msg.0.to_vec(),
                to_i64(next_chunk),
                bad_text(bad),
                to_i64(now_ms)
            ])?;
        Ok(())
    }

    /// Ends a download: `done` with its final path and the receipt it
    /// earns, or `failed` with an error; or back to the start (`restart`)
    /// after a read-back mismatch.
    pub fn download_end(
        &mut self,
        msg: &MessageId,
        end: DownloadEnd,
        final_path: Option<&str>,
        error: Option<&str>,
        receipt: Option<&PendingReport>,
        now_ms: u64,
    ) -> Result<(), AgentError> {
        let tx = self.conn.transaction()?;
        let state = match end {
            DownloadEnd::Done => DownloadState::Done,
            DownloadEnd::Failed => DownloadState::Failed,
            DownloadEnd::Restart => DownloadState::Downloading,
        };
        if end == DownloadEnd::Restart {
            tx.execute(
                "UPDATE downloads SET next_chunk = 0, bad = '', attempts = attempts + 1, \
                 error = ?2, changed_ms = ?3 WHERE msg = ?1",
                params![msg.0.to_vec(), error, to_i64(now_ms)],
            )?;
        } else {
            tx.execute(
                "UPDATE downloads SET state = ?2, final_path = ?3, error = ?4, changed_ms = ?5 \
                 WHERE msg = ?1",
                params![msg.0.to_vec(), state, final_path, error, to_i64(now_ms)],
            )?;
        }
        if let Some(p) = receipt {
            insert_pending(&tx, p)?;
        }
        tx.commit()?;
        Ok(())
    }
}

fn insert_pending(tx: &Transaction<'_>, p: &PendingReport) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO pending_reports \
         (subject, agreement, id, relay, reason, content_hash, content_len, stored_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        p.subject.to_vec(),
        p.agreement.to_vec(),
        p.id.0.to_vec(),
        p.relay,
        p.reason.map_or(0, |r| r.code()),
        p.content_hash.to_vec(),
        to_i64(p.content_len),
        to_i64(p.stored_at),
    ])?;
    Ok(())
}

fn insert_download(tx: &Transaction<'_>, d: &Download) -> rusqlite::Result<()> {
    tx.prepare_cached(&format!(
        "INSERT OR IGNORE INTO downloads ({DOWNLOAD_COLS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
    ))?
    .execute(params![
        d.msg.0.to_vec(),
        d.sender.to_vec(),
        d.agreement.to_vec(),
        d.relay,
        d.blob_id.to_vec(),
        d.key.0.to_vec(),
        to_i64(d.size),
        d.chunk_size,
        d.plaintext_hash.to_vec(),
        d.name,
        d.dir,
        to_i64(d.next_chunk),
        bad_text(&d.bad),
        d.attempts,
        d.state,
        d.final_path,
        d.error,
        to_i64(d.changed_ms),
        d.local_errors,
    ])?;
    Ok(())
}

/// A repair a recipient asked for: chunks of a file we sent, to upload again.
#[derive(Debug, Clone)]
pub struct RepairJob {
    pub msg: MessageId,
    pub recipient: [u8; 32],
    pub request: Vec<u8>,
}

impl Db {
    /// The file we sent with this blob id to `recipient`, if any.
    pub fn file_out_by_blob(
        &self,
        blob_id: &[u8; 16],
        recipient: &[u8; 32],
    ) -> Result<Option<(FileOut, DeliveryRow)>, AgentError> {
        let msg: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT msg FROM files_out WHERE blob_id = ?1")?
            .query_row(params![blob_id.to_vec()], |r| r.get(0))
            .optional()?;
        let Some(msg) = msg else { return Ok(None) };
        let msg = MessageId(id16(msg));
        let Some(f) = self.file_out(&msg)? else {
            return Ok(None);
        };
        let d = self
            .conn
            .prepare_cached(&format!(
                "SELECT {DELIVERY_COLS} FROM deliveries WHERE msg = ?1 AND recipient = ?2"
            ))?
            .query_row(
                params![msg.0.to_vec(), recipient.to_vec()],
                delivery_from_row,
            )
            .optional()?;
        Ok(d.map(|d| (f, d)))
    }

    pub fn add_repair(&mut self, job: &RepairJob) -> Result<(), AgentError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO repairs (msg, recipient, chunks) VALUES (?1, ?2, ?3)",
            params![job.msg.0.to_vec(), job.recipient.to_vec(), job.request],
        )?;
        Ok(())
    }

    pub fn repairs(&self) -> Result<Vec<RepairJob>, AgentError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT msg, recipient, chunks FROM repairs LIMIT 64")?;
        let rows = stmt.query_map([], |r| {
            Ok(RepairJob {
                msg: MessageId(id16(r.get(0)?)),
                recipient: hash32(r.get(1)?),
                request: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn remove_repair(
        &mut self,
        msg: &MessageId,
        recipient: &[u8; 32],
    ) -> Result<(), AgentError> {
        self.conn.execute(
            "DELETE FROM repairs WHERE msg = ?1 AND recipient = ?2",
            params![msg.0.to_vec(), recipient.to_vec()],
        )?;
        Ok(())
    }

    /// The download of a file with this blob id from `sender`.
    pub fn download_by_blob(
        &self,
        blob_id: &[u8; 16],
        sender: &[u8; 32],
    ) -> Result<Option<Download>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {DOWNLOAD_COLS} FROM downloads WHERE blob_id = ?1 AND sender = ?2"
            ))?
            .query_row(
                params![blob_id.to_vec(), sender.to_vec()],
                download_from_row,
            )
            .optional()?)
    }

    /// Stores a repair offer for a download and makes it run again.
    pub fn set_repair_offer(
        &mut self,
        msg: &MessageId,
        offer: &[u8],
        now_ms: u64,
    ) -> Result<(), AgentError> {
        self.conn.execute(
            "UPDATE downloads SET repair = ?2, state = 'downloading', changed_ms = ?3 WHERE msg = ?1",
            params![msg.0.to_vec(), offer, to_i64(now_ms)],
        )?;
        Ok(())
    }

    /// The repair offer stored for a download.
    pub fn repair_offer(&self, msg: &MessageId) -> Result<Option<Vec<u8>>, AgentError> {
        Ok(self
            .conn
            .prepare_cached("SELECT repair FROM downloads WHERE msg = ?1")?
            .query_row(params![msg.0.to_vec()], |r| r.get(0))
            .optional()?
            .flatten())
    }
}
