//! The group-commit writer: one thread owns the write connection, applies every write op of a group in one transaction, answers after the commit, and gives free pages back while idle.

use super::*;
use crate::ledger::{Advanced, BlobAdvance, Ended, Enqueued, NewForward, NewItem};
use crate::sqlite::blob_row;

/// Items and blobs removed by a sweep; the blob files are deleted after
/// the commit.
pub(crate) type SweepReply = oneshot::Sender<Result<(u64, Vec<BlobId>), StoreError>>;

pub(crate) enum Op {
    Register {
        mailbox: MailboxId,
        key: [u8; 32],
        now: u64,
        reply: oneshot::Sender<Result<Registered, StoreError>>,
    },
    Submit {
        item: NewItem,
        reply: oneshot::Sender<Result<SubmitOutcome, StoreError>>,
    },
    Ack {
        mailbox: MailboxId,
        seqs: Vec<u64>,
        reply: oneshot::Sender<Result<u32, StoreError>>,
    },
    BlobAdvance {
        advance: BlobAdvance,
        reply: oneshot::Sender<Result<Advanced, StoreError>>,
    },
    BlobDelete {
        blob_id: BlobId,
        mailbox: MailboxId,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    BlobExpire {
        blob_id: BlobId,
        mailbox: MailboxId,
        at: u64,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Sweep {
        now: u64,
        reply: SweepReply,
    },
    ForwardEnqueue {
        forward: NewForward,
        reply: oneshot::Sender<Result<Enqueued, StoreError>>,
    },
    ForwardEnd {
        id: u64,
        notice: Option<NewItem>,
        reply: oneshot::Sender<Result<Ended, StoreError>>,
    },
    ForwardLater {
        ids: Vec<u64>,
        next_at: u64,
        error: String,
        failed: bool,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    ForwardHanded {
        id: u64,
        until: u64,
        reply: oneshot::Sender<Result<Ended, StoreError>>,
    },
    HandedEnd {
        id: u64,
        notice: Option<NewItem>,
        reply: oneshot::Sender<Result<Ended, StoreError>>,
    },
    HandedExpire {
        now: u64,
        reply: oneshot::Sender<Result<u32, StoreError>>,
    },
}

/// Deletes forward entry `id` and gives its bytes back to its origin's
/// quota; the origin, or `None` if the entry was gone.
fn release_forward(
    tx: &rusqlite::Transaction<'_>,
    id: u64,
) -> Result<Option<Vec<u8>>, rusqlite::Error> {
    let gone: Option<(Vec<u8>, i64)> = tx
        .prepare_cached("DELETE FROM forwards WHERE id = ?1 RETURNING origin, LENGTH(payload)")?
        .query_row(params![i64_of(id)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((origin, len)) = &gone {
        release_mailbox(tx, origin, *len)?;
    }
    Ok(gone.map(|(origin, _)| origin))
}

/// Stores the `notice` of an ended forward entry in its `origin` mailbox
/// (a notice for another mailbox is not stored); its seq. Stored whatever
/// the quota — it takes the place of an item of the origin's that the
/// quota held — and in no source's share: the relay made it.
fn store_notice(
    tx: &rusqlite::Transaction<'_>,
    origin: &[u8],
    notice: Option<NewItem>,
) -> Result<Option<u64>, rusqlite::Error> {
    match notice {
        Some(n) if n.mailbox.0.as_slice() == origin => {
            let (seq, _) = store_item(
                tx,
                &n.mailbox,
                n.now,
                n.expires_at,
                &n.hash,
                n.payload,
                None,
            )?;
            Ok(Some(seq))
        }
        _ => Ok(None),
    }
}

pub(crate) fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // FULL: with NORMAL, WAL mode may lose the last commits on power loss,
    // and those were acknowledged.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The log is cut back to this after each checkpoint (by default it
    // keeps the largest size it ever reached).
    conn.pragma_update(None, "journal_size_limit", 16i64 << 20)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // Every statement of the writer's and the reader's hot paths stays
    // compiled (rusqlite keeps 16 by default; the writer alone runs more,
    // and one compiled again costs more than the insert it does).
    conn.set_prepared_statement_cache_capacity(128);
    Ok(conn)
}

/// Makes the database give free pages back in steps (`auto_vacuum =
/// INCREMENTAL`). A new database is made so before its first table; one
/// made by an older version is rewritten once (`VACUUM`), at this open.
pub(crate) fn incremental_vacuum_on(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    sealpost_sqlite::incremental_vacuum_on(conn, |pages| {
        tracing::info!(
            "rewriting {} once so that it gives free space back ({} pages)",
            path.display(),
            pages
        );
    })?;
    Ok(())
}

/// How the relay's database gives free pages back (see `sealpost_sqlite`).
pub(crate) const VACUUM_POLICY: sealpost_sqlite::Policy = sealpost_sqlite::Policy {
    keep_pages: VACUUM_KEEP_PAGES,
    all_at_once_live_pages: VACUUM_ALL_AT_ONCE_LIVE_PAGES,
    max_step_pages: VACUUM_STEP_PAGES,
    min_step_pages: VACUUM_STEP_MIN_PAGES,
    step_target: VACUUM_STEP_TARGET,
};

/// One step of giving free pages back, if more than
/// [`VACUUM_KEEP_PAGES`] are free (all at once while little is in use,
/// else in steps paced to [`VACUUM_STEP_TARGET`]: `sealpost_sqlite`).
/// Returns whether more may remain.
pub(crate) fn vacuum_step(
    conn: &Connection,
    stats: &Mutex<CommitStats>,
    pace: &mut sealpost_sqlite::Pace,
) -> bool {
    match sealpost_sqlite::give_back_step(conn, pace) {
        Ok(step) => {
            if step.given > 0 {
                if let Ok(mut s) = stats.lock() {
                    s.vacuum_steps += 1;
                    s.pages_given_back += step.given as u64;
                }
            }
            step.more
        }
        Err(e) => {
            tracing::warn!("could not give free database pages back: {e}");
            false
        }
    }
}

/// At most this many writes share one transaction; bounds a commit's
/// latency under a flood.
pub(crate) const MAX_GROUP: usize = 4096;

pub(crate) fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    limits: Limits,
    stats: Arc<Mutex<CommitStats>>,
    (commit_latency, commit_batch): (
        prometheus_client::metrics::histogram::Histogram,
        prometheus_client::metrics::histogram::Histogram,
    ),
) {
    // Each op's reply is held until the transaction holding it committed.
    let mut group: Vec<Op> = Vec::with_capacity(MAX_GROUP);
    // Whether pages may have been freed since the last look: after any
    // commit, the writer gives free pages back in steps while idle.
    let mut maybe_free = true;
    let mut pace = sealpost_sqlite::Pace::new(VACUUM_POLICY);
    loop {
        let first = if maybe_free {
            match rx.recv_timeout(VACUUM_IDLE) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    maybe_free = vacuum_step(&conn, &stats, &mut pace);
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
            commit_batch.observe(n as f64);
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

pub(crate) enum Reply {
    Bool(oneshot::Sender<Result<bool, StoreError>>, bool),
    Register(oneshot::Sender<Result<Registered, StoreError>>, Registered),
    Submit(
        oneshot::Sender<Result<SubmitOutcome, StoreError>>,
        SubmitOutcome,
    ),
    Count(oneshot::Sender<Result<u32, StoreError>>, u32),
    Advanced(oneshot::Sender<Result<Advanced, StoreError>>, Advanced),
    Sweep(SweepReply, u64, Vec<BlobId>),
    Enqueued(oneshot::Sender<Result<Enqueued, StoreError>>, Enqueued),
    Ended(oneshot::Sender<Result<Ended, StoreError>>, Ended),
    Unit(oneshot::Sender<Result<(), StoreError>>),
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
            Self::Advanced(s, _) => drop(s.send(Err(e()))),
            Self::Sweep(s, _, _) => drop(s.send(Err(e()))),
            Self::Enqueued(s, _) => drop(s.send(Err(e()))),
            Self::Ended(s, _) => drop(s.send(Err(e()))),
            Self::Unit(s) => drop(s.send(Err(e()))),
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
            Self::Advanced(s, v) => drop(s.send(Ok(v))),
            Self::Sweep(s, n, b) => drop(s.send(Ok((n, b)))),
            Self::Enqueued(s, v) => drop(s.send(Ok(v))),
            Self::Ended(s, v) => drop(s.send(Ok(v))),
            Self::Unit(s) => drop(s.send(Ok(()))),
        }
    }
}

/// Stores an item in `mailbox` and counts its bytes in the mailbox's use:
/// its seq and item id. `source` is what share it is in (charged by the
/// caller), `None` for none.
fn store_item(
    tx: &rusqlite::Transaction<'_>,
    mailbox: &MailboxId,
    now: u64,
    expires_at: u64,
    hash: &[u8; 32],
    payload: Vec<u8>,
    source: Option<&[u8]>,
) -> Result<(u64, [u8; 16]), rusqlite::Error> {
    let mut item_id = [0u8; 16];
    OsRng.fill_bytes(&mut item_id);
    let len = payload.len() as i64;
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
        source
    ])?;
    let seq = u64_of(tx.last_insert_rowid());
    charge_mailbox(tx, &mailbox.0, len)?;
    Ok((seq, item_id))
}

pub(crate) fn apply(
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
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO mailboxes (id, key, quota, used, created_at) \
                     SELECT ?1, ?2, ?3, 0, ?4 WHERE (SELECT COUNT(*) FROM mailboxes) < ?5",
                )?
                .execute(params![
                    mailbox.0.to_vec(),
                    key.to_vec(),
                    i64_of(limits.mailbox_quota),
                    i64_of(now),
                    i64_of(limits.max_mailboxes.unwrap_or(u64::MAX))
                ])?;
            let outcome = if n == 1 {
                Registered::Created
            } else {
                let exists = tx
                    .prepare_cached("SELECT 1 FROM mailboxes WHERE id = ?1")?
                    .query_row(params![mailbox.0.to_vec()], |_| Ok(()))
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
        Op::Submit { item, reply } => {
            let NewItem {
                mailbox,
                expires_at,
                hash,
                payload,
                source,
                now,
            } = item;
            let quota = mailbox_use(tx, &mailbox.0)?;
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
                    let len = payload.len() as i64;
                    let (seq, item_id) = store_item(
                        tx,
                        &mailbox,
                        now,
                        expires_at,
                        &hash,
                        payload,
                        Some(source.as_bytes()),
                    )?;
                    charge_share(tx, &mailbox.0, source.as_bytes(), len)?;
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
            release_mailbox(tx, &mailbox.0, freed)?;
            Reply::Count(reply, count)
        }
        Op::BlobAdvance { advance: a, reply } => {
            let outcome = match (a.from, blob_row(tx, &a.blob_id)?) {
                (None, Some(b)) => Advanced::Conflict {
                    stored: Some(b.stored),
                },
                (Some(_), None) => Advanced::Conflict { stored: None },
                (Some(from), Some(b))
                    if b.stored != from
                        || b.complete
                        || b.mailbox != a.mailbox
                        || b.total_len != a.total_len =>
                {
                    Advanced::Conflict {
                        stored: Some(b.stored),
                    }
                }
                (Some(_), Some(_)) => {
                    tx.prepare_cached(
                        "UPDATE blobs SET stored = ?2, complete = ?3, hash = ?4 WHERE id = ?1",
                    )?
                    .execute(params![
                        a.blob_id.0.to_vec(),
                        i64_of(a.to),
                        a.complete as i64,
                        a.hash.to_vec()
                    ])?;
                    Advanced::Committed
                }
                (None, None) => {
                    // A new blob: its whole length is charged to the
                    // mailbox and the source now, inside this transaction,
                    // so that writers racing (on any node) cannot pass the
                    // quota together.
                    let quota = mailbox_use(tx, &a.mailbox.0)?;
                    match quota {
                        None => Advanced::Refused(RefusalCode::UnknownMailbox),
                        Some((used, q)) if u64_of(used) + a.total_len > u64_of(q) => {
                            Advanced::Refused(RefusalCode::OverQuota)
                        }
                        Some((_, q))
                            if share_used(tx, &a.mailbox.0, a.source.as_bytes())? + a.total_len
                                > limits.source_share(u64_of(q)) =>
                        {
                            Advanced::Refused(RefusalCode::OverQuota)
                        }
                        Some(_) => {
                            tx.prepare_cached(
                                "INSERT INTO blobs (id, mailbox, total_len, hash, expires_at, \
                                 stored, complete, source) \
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                            )?
                            .execute(params![
                                a.blob_id.0.to_vec(),
                                a.mailbox.0.to_vec(),
                                i64_of(a.total_len),
                                a.hash.to_vec(),
                                i64_of(a.expires_at),
                                i64_of(a.to),
                                a.complete as i64,
                                a.source.as_bytes()
                            ])?;
                            charge_mailbox(tx, &a.mailbox.0, i64_of(a.total_len))?;
                            charge_share(
                                tx,
                                &a.mailbox.0,
                                a.source.as_bytes(),
                                i64_of(a.total_len),
                            )?;
                            Advanced::Committed
                        }
                    }
                }
            };
            Reply::Advanced(reply, outcome)
        }
        Op::BlobDelete {
            blob_id,
            mailbox,
            reply,
        } => {
            let gone: Option<(i64, Option<Vec<u8>>)> = tx
                .prepare_cached(
                    "DELETE FROM blobs WHERE id = ?1 AND mailbox = ?2 RETURNING total_len, source",
                )?
                .query_row(params![blob_id.0.to_vec(), mailbox.0.to_vec()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            if let Some((l, source)) = &gone {
                release_mailbox(tx, &mailbox.0, *l)?;
                release_share(tx, &mailbox.0, source.as_deref(), *l)?;
            }
            Reply::Bool(reply, gone.is_some())
        }
        Op::BlobExpire {
            blob_id,
            mailbox,
            at,
            reply,
        } => {
            let n = tx
                .prepare_cached("UPDATE blobs SET expires_at = ?3 WHERE id = ?1 AND mailbox = ?2")?
                .execute(params![blob_id.0.to_vec(), mailbox.0.to_vec(), i64_of(at)])?;
            Reply::Bool(reply, n > 0)
        }
        Op::Sweep { now, reply } => {
            let mut n = 0u64;
            {
                let mut stmt = tx.prepare_cached(
                    "DELETE FROM items WHERE expires_at <= ?1 RETURNING mailbox, LENGTH(payload), source",
                )?;
                let freed: Vec<(Vec<u8>, i64, Option<Vec<u8>>)> = stmt
                    .query_map(params![i64_of(now)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect::<Result<_, _>>()?;
                for (mb, len, source) in freed {
                    n += 1;
                    release_mailbox(tx, &mb, len)?;
                    release_share(tx, &mb, source.as_deref(), len)?;
                }
            }
            let mut stmt = tx.prepare_cached(
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
                release_mailbox(tx, &mb, len)?;
                release_share(tx, &mb, source.as_deref(), len)?;
                ids.push(BlobId(id.try_into().unwrap_or([0; 16])));
            }
            Reply::Sweep(reply, n, ids)
        }
        Op::ForwardEnqueue { forward, reply } => {
            let NewForward {
                origin,
                item,
                blob,
                now,
            } = forward;
            // A blob is queued once per mailbox; an item once while it
            // waits (a sender's retransmission of what is still queued
            // adds nothing).
            let existing: Option<i64> = match &blob {
                Some((b, _)) => tx
                    .prepare_cached("SELECT id FROM forwards WHERE blob = ?1 AND mailbox = ?2")?
                    .query_row(params![b.0.to_vec(), item.mailbox.0.to_vec()], |r| r.get(0))
                    .optional()?,
                None => tx
                    .prepare_cached(
                        "SELECT id FROM forwards WHERE origin = ?1 AND hash = ?2 \
                         AND mailbox = ?3 AND blob IS NULL",
                    )?
                    .query_row(
                        params![
                            origin.0.to_vec(),
                            item.payload_hash.to_vec(),
                            item.mailbox.0.to_vec()
                        ],
                        |r| r.get(0),
                    )
                    .optional()?,
            };
            let quota = mailbox_use(tx, &origin.0)?;
            let len = item.payload.len() as u64;
            let outcome = match quota {
                _ if existing.is_some() => Enqueued::Queued {
                    id: existing.map_or(0, u64_of),
                },
                None => Enqueued::Refused(RefusalCode::UnknownMailbox),
                Some(_) if item.expires_at <= now => Enqueued::Refused(RefusalCode::Expired),
                Some((used, q)) if u64_of(used) + len > u64_of(q) => {
                    Enqueued::Refused(RefusalCode::OverQuota)
                }
                Some(_) => {
                    tx.prepare_cached(
                        "INSERT INTO forwards (origin, next_addr, next_pin, hops, mailbox, \
                         received_at, expires_at, hash, payload, next_at, blob, blob_len) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?6, ?10, ?11)",
                    )?
                    .execute(params![
                        origin.0.to_vec(),
                        item.next.addr,
                        item.next.pin.to_vec(),
                        item.hops,
                        item.mailbox.0.to_vec(),
                        i64_of(now),
                        i64_of(item.expires_at),
                        item.payload_hash.to_vec(),
                        item.payload,
                        blob.map(|b| b.0 .0.to_vec()),
                        i64_of(blob.map_or(0, |b| b.1)),
                    ])?;
                    let id = u64_of(tx.last_insert_rowid());
                    charge_mailbox(tx, &origin.0, i64_of(len))?;
                    Enqueued::Queued { id }
                }
            };
            Reply::Enqueued(reply, outcome)
        }
        Op::ForwardEnd { id, notice, reply } => {
            let outcome = match release_forward(tx, id)? {
                None => Ended::Gone,
                Some(origin) => Ended::Ended {
                    notice_seq: store_notice(tx, &origin, notice)?,
                },
            };
            Reply::Ended(reply, outcome)
        }
        Op::ForwardLater {
            ids,
            next_at,
            error,
            failed,
            reply,
        } => {
            let mut stmt = tx.prepare_cached(
                "UPDATE forwards SET attempts = attempts + ?4, next_at = ?2, last_error = ?3 \
                 WHERE id = ?1",
            )?;
            for id in ids {
                stmt.execute(params![
                    i64_of(id),
                    i64_of(next_at),
                    error,
                    i64::from(failed)
                ])?;
            }
            Reply::Unit(reply)
        }
        Op::ForwardHanded { id, until, reply } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO handed \
                 (id, origin, next_addr, next_pin, mailbox, hash, blob, until) \
                 SELECT id, origin, next_addr, next_pin, mailbox, hash, blob, ?2 \
                 FROM forwards WHERE id = ?1",
            )?
            .execute(params![i64_of(id), i64_of(until)])?;
            let outcome = match release_forward(tx, id)? {
                None => Ended::Gone,
                Some(_) => Ended::Ended { notice_seq: None },
            };
            Reply::Ended(reply, outcome)
        }
        Op::HandedEnd { id, notice, reply } => {
            let gone: Option<Vec<u8>> = tx
                .prepare_cached("DELETE FROM handed WHERE id = ?1 RETURNING origin")?
                .query_row(params![i64_of(id)], |r| r.get(0))
                .optional()?;
            let outcome = match gone {
                None => Ended::Gone,
                Some(origin) => Ended::Ended {
                    notice_seq: store_notice(tx, &origin, notice)?,
                },
            };
            Reply::Ended(reply, outcome)
        }
        Op::HandedExpire { now, reply } => {
            let n = tx
                .prepare_cached("DELETE FROM handed WHERE until < ?1")?
                .execute(params![i64_of(now)])?;
            Reply::Count(reply, u32::try_from(n).unwrap_or(u32::MAX))
        }
    })
}
