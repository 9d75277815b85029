//! Received messages: the inbox index, the reports owed for them, retention and deletion, strangers refused, and what the checks caught.

use std::collections::HashSet;

use super::*;

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
pub(crate) const MAX_DETECTIONS: i64 = 200_000;

/// Something a relay (or the network through it) did that the checks
/// caught: what it was and which item (a fetched item's BLAKE3 in hex,
/// or `blob:<id>@<offset>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub at_ms: u64,
    pub class: String,
    pub item: String,
}

/// What names a received message: its sender and its id. Each sender
/// chooses its own ids (PROTOCOL 4.3), so an id alone does not: a contact
/// who learns another sender's id — as a co-recipient of the same message
/// — could otherwise send its own message under it first and have the
/// real one discarded. The inbox, the downloads, received file groups and
/// the replay cache are all keyed by both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReceivedId {
    /// The sender's Ed25519 signing key.
    pub sender: [u8; 32],
    pub id: MessageId,
}

impl ReceivedId {
    pub fn new(sender: [u8; 32], id: MessageId) -> Self {
        Self { sender, id }
    }

    /// What names the message `h` heads.
    pub fn of(h: &sealpost_proto::MessageHeader) -> Self {
        Self::new(*h.sender.signing_bytes(), h.id)
    }
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

impl InboxEntry {
    /// What names it.
    pub fn key(&self) -> ReceivedId {
        ReceivedId::new(self.sender, self.id)
    }
}

pub(crate) fn inbox_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InboxEntry> {
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

pub(crate) const INBOX_COLS: &str =
    "id, sender, kind, created_at, expires_at, received_ms, content_hash, \
     content_len, segment, offset, read_ms, archived_ms";

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

pub(crate) fn insert_pending(tx: &Transaction<'_>, p: &PendingReport) -> rusqlite::Result<()> {
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

/// The reports waiting to be sent, in the order they go out.
pub(crate) const PENDING_REPORTS_SQL: &str =
    "SELECT subject, agreement, id, relay, reason, content_hash, content_len, stored_at \
     FROM pending_reports ORDER BY subject, relay, reason";

impl Db {
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
        self.delete_selected(
            "SELECT id, sender FROM inbox WHERE received_ms < ?1 AND (id, sender) NOT IN \
             (SELECT msg, sender FROM downloads WHERE state NOT IN ('done', 'failed')) \
             ORDER BY received_ms",
            before_ms,
            max,
        )
    }

    /// Deletes received messages, oldest first, until the content of
    /// those left is at most `max_bytes` (at most `max` in one call; a
    /// file still being received is neither deleted nor counted). Returns
    /// how many.
    pub fn prune_received_over(&mut self, max_bytes: u64, max: usize) -> Result<usize, AgentError> {
        // Newest first, the bytes kept so far: every message past the
        // limit goes.
        self.delete_selected(
            "SELECT id, sender FROM (SELECT id, sender, received_ms, \
                 SUM(content_len) OVER (ORDER BY received_ms DESC, id DESC, sender DESC) AS kept \
                 FROM inbox WHERE (id, sender) NOT IN \
                 (SELECT msg, sender FROM downloads WHERE state NOT IN ('done', 'failed'))) \
             WHERE kept > ?1 ORDER BY received_ms, id, sender",
            max_bytes,
            max,
        )
    }

    /// Deletes the received messages `select` names (by id and sender; its
    /// parameter: a bound; at most `max` of them), as `delete` does.
    /// Returns how many.
    fn delete_selected(
        &mut self,
        select: &str,
        bound: u64,
        max: usize,
    ) -> Result<usize, AgentError> {
        let ids: Vec<ReceivedId> = {
            let mut stmt = self
                .conn
                .prepare_cached(&format!("{select}{}", super::limit(max)))?;
            let rows = stmt.query_map(params![to_i64(bound)], |r| {
                Ok(ReceivedId::new(
                    hash32(r.get(1)?),
                    MessageId(id16(r.get(0)?)),
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        if ids.is_empty() {
            return Ok(0);
        }
        self.delete_received(&ids)
    }

    pub fn delete_received(&mut self, ids: &[ReceivedId]) -> Result<usize, AgentError> {
        let tx = self.conn.transaction()?;
        let mut n = 0;
        for k in ids {
            let (id, sender) = (k.id.0.to_vec(), k.sender.to_vec());
            n += tx.execute(
                "DELETE FROM inbox WHERE id = ?1 AND sender = ?2",
                params![id, sender],
            )?;
            tx.execute(
                "DELETE FROM file_groups WHERE msg = ?1 AND sender = ?2",
                params![id, sender],
            )?;
            tx.execute(
                "DELETE FROM downloads WHERE msg = ?1 AND sender = ?2 AND state IN ('done', 'failed')",
                params![id, sender],
            )?;
        }
        tx.commit()?;
        Ok(n)
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

    /// The inbox entry `key` names, if delivered.
    pub fn inbox_entry(&self, key: &ReceivedId) -> Result<Option<InboxEntry>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {INBOX_COLS} FROM inbox WHERE id = ?1 AND sender = ?2"
            ))?
            .query_row(
                params![key.id.0.to_vec(), key.sender.to_vec()],
                inbox_from_row,
            )
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
        ids: &[ReceivedId],
        now_ms: Option<u64>,
    ) -> Result<usize, AgentError> {
        let tx = self.conn.transaction()?;
        let mut n = 0;
        for k in ids {
            let (id, sender) = (k.id.0.to_vec(), k.sender.to_vec());
            n += match now_ms {
                Some(t) => tx.execute(
                    "UPDATE inbox SET archived_ms = ?3 WHERE id = ?1 AND sender = ?2 \
                     AND archived_ms IS NULL",
                    params![id, sender, to_i64(t)],
                )?,
                None => tx.execute(
                    "UPDATE inbox SET archived_ms = NULL WHERE id = ?1 AND sender = ?2 \
                     AND archived_ms IS NOT NULL",
                    params![id, sender],
                )?,
            };
        }
        tx.commit()?;
        Ok(n)
    }

    pub fn mark_read(&mut self, key: &ReceivedId, now_ms: u64) -> Result<(), AgentError> {
        self.conn.execute(
            "UPDATE inbox SET read_ms = ?3 WHERE id = ?1 AND sender = ?2 AND read_ms IS NULL",
            params![key.id.0.to_vec(), key.sender.to_vec(), to_i64(now_ms)],
        )?;
        Ok(())
    }

    /// Records delivered messages (their stored copies already durable and
    /// verified), their replay-cache entries and the receipts they are
    /// owed, plus other reports (rejections, receipts again for
    /// duplicates), in one transaction. Returns the messages that were
    /// new (a set: the caller looks each message of a batch up in it): a
    /// message already in the inbox is not delivered twice.
    pub fn record_inbox(
        &mut self,
        entries: &[(InboxEntry, u64)],
        reports: &[PendingReport],
        downloads: &[Download],
        groups: &[(ReceivedId, Group)],
        now: u64,
    ) -> Result<HashSet<ReceivedId>, AgentError> {
        let tx = self.conn.transaction()?;
        crate::contacts::replay_prune(&tx, now)?;
        let mut new = HashSet::with_capacity(entries.len());
        // Cached statements: parsing the SQL again for every message cost
        // more than the insert (counted with callgrind).
        let insert = format!(
            "INSERT OR IGNORE INTO inbox ({INBOX_COLS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL, NULL)"
        );
        for (e, forget_at) in entries {
            let n = tx.prepare_cached(&insert)?.execute(params![
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
            ])?;
            let key = e.key();
            // Each was judged not seen (sender and id, or id under x'')
            // before it came here: no second look for x''.
            crate::contacts::replay_put(&tx, &key, *forget_at)?;
            if n == 1 {
                new.insert(key);
            }
        }
        for p in reports {
            insert_pending(&tx, p)?;
        }
        for d in downloads {
            if new.contains(&d.key()) {
                insert_download(&tx, d)?;
            }
        }
        for (key, g) in groups {
            if new.contains(key) {
                insert_group(&tx, &key.id, &key.sender, g)?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    /// Reports waiting to be sent, at most `limit`.
    pub fn pending_reports(&self, limit: usize) -> Result<Vec<PendingReport>, AgentError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{PENDING_REPORTS_SQL}{}", super::limit(limit)))?;
        let rows = stmt.query_map([], |r| {
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
            tx.prepare_cached("DELETE FROM pending_reports WHERE subject = ?1 AND id = ?2")?
                .execute(params![subject.to_vec(), id.0.to_vec()])?;
        }
        tx.commit()?;
        Ok(())
    }
}
