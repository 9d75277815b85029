//! The embedded ledger: SQLite (WAL, `synchronous=FULL`) written by one
//! group-commit thread (`writer`), read through one connection.

use super::*;
use crate::ledger::*;

/// The ledger in `relay.db`: every write goes through one writer thread
/// that gathers all requests waiting at that moment into one transaction
/// and one commit (group commit), and answers them once the commit (and
/// its fsync) returned.
pub struct SqliteLedger {
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    reader: Mutex<Connection>,
    stats: Arc<Mutex<CommitStats>>,
    latencies: Latencies,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
}

/// A mailbox's items after a sequence number, in order. `+?1`, not `?1`:
/// with `mailbox = ?1` and `ORDER BY`, SQLite's planner reads the bound
/// value and marks the statement to be compiled again whenever that
/// binding changes — which rusqlite's statement cache does on every use
/// (clearing the bindings), so every fetch was compiled again. The unary
/// plus makes the value an expression the planner does not read; the
/// index on (mailbox, seq) is used as before.
pub(crate) const FETCH_SQL: &str = "SELECT seq, received_at, expires_at, hash, payload FROM items \
     WHERE mailbox = +?1 AND seq > ?2 ORDER BY seq";

impl std::fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteLedger({})", self.path.display())
    }
}

impl SqliteLedger {
    /// Opens (creating if needed) `relay.db` in `dir` (created, and made
    /// private: mailbox keys and who receives what are in it).
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, StoreError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        crate::files::private_dir(dir)?;
        crate::migrate::refuse_if_moved(dir)?;
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
        let w_commit = (latencies.commit.clone(), latencies.commit_batch.clone());
        let handle = std::thread::Builder::new()
            .name("sealpost-store-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, limits, w_stats, w_commit))
            .map_err(io_err("starting the writer for", dir))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            reader: Mutex::new(reader),
            stats,
            latencies,
            writer: Mutex::new(Some(handle)),
            path: db,
        })
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        let guard = self.tx.lock().map_err(|_| StoreError::Closed)?;
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

    /// Runs `f` on the reading connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Closed)?;
        Ok(f(&conn)?)
    }
}

/// A ready answer, as a ledger future.
fn ready<'a, T: Send + 'a>(v: Result<T, StoreError>) -> Fut<'a, T> {
    Box::pin(std::future::ready(v))
}

impl Ledger for SqliteLedger {
    fn register(&self, mailbox: MailboxId, key: [u8; 32], now: u64) -> Fut<'_, Registered> {
        Box::pin(self.call(move |reply| Op::Register {
            mailbox,
            key,
            now,
            reply,
        }))
    }

    fn mailbox_key(&self, mailbox: MailboxId) -> Fut<'_, Option<[u8; 32]>> {
        ready(self.read(|c| {
            let key: Option<Vec<u8>> = c
                .prepare_cached("SELECT key FROM mailboxes WHERE id = ?1")?
                .query_row(params![mailbox.0.to_vec()], |r| r.get(0))
                .optional()?;
            Ok(key.and_then(|k| k.try_into().ok()))
        }))
    }

    fn submit(&self, item: NewItem) -> Fut<'_, SubmitOutcome> {
        Box::pin(self.call(move |reply| Op::Submit { item, reply }))
    }

    fn ack(&self, mailbox: MailboxId, seqs: Vec<u64>) -> Fut<'_, u32> {
        Box::pin(self.call(move |reply| Op::Ack {
            mailbox,
            seqs,
            reply,
        }))
    }

    fn fetch(
        &self,
        mailbox: MailboxId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Fut<'_, Fetched> {
        ready(self.read(|conn| {
            // No `LIMIT ?`: SQLite compiles a statement with a bound limit
            // again whenever the binding changes, which rusqlite's cache
            // does on every use. The rows come in index order, one at a
            // time, and the loop stops after `max` (and one to learn
            // whether there are more).
            let mut stmt = conn.prepare_cached(FETCH_SQL)?;
            let mut rows = stmt.query(params![mailbox.0.to_vec(), i64_of(after)])?;
            let mut out = Fetched::default();
            let mut bytes = 0usize;
            while let Some(row) = rows.next()? {
                let payload: Vec<u8> = row.get(4)?;
                if out.items.len() == max
                    || (!out.items.is_empty() && bytes + payload.len() > max_bytes)
                {
                    out.more = true;
                    break;
                }
                let hash: Vec<u8> = row.get(3)?;
                let hash: [u8; 32] = hash.try_into().unwrap_or([0; 32]);
                if blake3::hash(&payload).as_bytes() != &hash {
                    out.damaged += 1;
                }
                bytes += payload.len();
                out.items.push(Item {
                    seq: u64_of(row.get(0)?),
                    received_at: u64_of(row.get(1)?),
                    expires_at: u64_of(row.get(2)?),
                    payload_hash: hash,
                    payload,
                });
            }
            Ok(out)
        }))
    }

    fn sweep(&self, now: u64) -> Fut<'_, (u64, Vec<BlobId>)> {
        Box::pin(self.call(move |reply| Op::Sweep { now, reply }))
    }

    fn status(&self, mailbox: MailboxId) -> Fut<'_, MailboxUse> {
        ready(self.read(|conn| {
            let (used, quota) = crate::schema::mailbox_use(conn, &mailbox.0)?.unwrap_or((0, 0));
            let n: i64 = conn.query_row(
                "SELECT COUNT(*) FROM items WHERE mailbox = ?1",
                params![mailbox.0.to_vec()],
                |r| r.get(0),
            )?;
            Ok(MailboxUse {
                items: u64_of(n),
                used: u64_of(used),
                quota: u64_of(quota),
            })
        }))
    }

    fn share_used(&self, mailbox: MailboxId, source: Source) -> Fut<'_, u64> {
        ready(self.read(|c| share_used(c, &mailbox.0, source.as_bytes())))
    }

    fn blob(&self, blob_id: BlobId) -> Fut<'_, Option<BlobState>> {
        ready(self.read(|c| blob_row(c, &blob_id)))
    }

    fn blob_advance(&self, advance: BlobAdvance) -> Fut<'_, Advanced> {
        Box::pin(self.call(move |reply| Op::BlobAdvance { advance, reply }))
    }

    fn blob_delete(&self, blob_id: BlobId, mailbox: MailboxId) -> Fut<'_, bool> {
        Box::pin(self.call(move |reply| Op::BlobDelete {
            blob_id,
            mailbox,
            reply,
        }))
    }

    fn blob_expire(&self, blob_id: BlobId, mailbox: MailboxId, at: u64) -> Fut<'_, bool> {
        Box::pin(self.call(move |reply| Op::BlobExpire {
            blob_id,
            mailbox,
            at,
            reply,
        }))
    }

    fn blobs_known(&self, ids: Vec<BlobId>) -> Fut<'_, Vec<bool>> {
        ready(self.read(|c| {
            let mut known = c.prepare_cached("SELECT 1 FROM blobs WHERE id = ?1")?;
            ids.iter()
                .map(|id| known.exists(params![id.0.to_vec()]))
                .collect()
        }))
    }

    fn complete_blobs(&self) -> Fut<'_, Vec<(BlobId, [u8; 32], u64)>> {
        ready(self.read(|c| {
            let mut stmt = c.prepare("SELECT id, hash, stored FROM blobs WHERE complete = 1")?;
            let rows = stmt.query_map([], |r| {
                let id: Vec<u8> = r.get(0)?;
                let hash: Vec<u8> = r.get(1)?;
                Ok((
                    BlobId(id.try_into().unwrap_or([0; 16])),
                    hash.try_into().unwrap_or([0; 32]),
                    u64_of(r.get(2)?),
                ))
            })?;
            rows.collect()
        }))
    }

    fn scrub_items(&self) -> Fut<'_, (u64, Vec<u64>)> {
        ready(self.read(|c| {
            let mut stmt = c.prepare("SELECT seq, hash, payload FROM items ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            let (mut n, mut damaged) = (0u64, Vec::new());
            while let Some(r) = rows.next()? {
                let hash: Vec<u8> = r.get(1)?;
                let payload: Vec<u8> = r.get(2)?;
                n += 1;
                if blake3::hash(&payload).as_bytes()[..] != hash[..] {
                    damaged.push(u64_of(r.get(0)?));
                }
            }
            Ok((n, damaged))
        }))
    }

    fn totals(&self) -> Fut<'_, Totals> {
        ready(self.read(|conn| {
            let m: i64 = conn.query_row("SELECT COUNT(*) FROM mailboxes", [], |r| r.get(0))?;
            let (i, b): (i64, i64) = conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM items",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let bl: i64 = conn.query_row("SELECT COUNT(*) FROM blobs", [], |r| r.get(0))?;
            Ok(Totals {
                mailboxes: u64_of(m),
                items: u64_of(i),
                item_bytes: u64_of(b),
                blobs: u64_of(bl),
            })
        }))
    }

    fn mailboxes(&self) -> Fut<'_, Vec<(MailboxId, MailboxUse)>> {
        ready(self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT m.id, m.used, m.quota, (SELECT COUNT(*) FROM items i WHERE i.mailbox = m.id)
                 FROM mailboxes m ORDER BY m.used DESC",
            )?;
            let rows = stmt.query_map([], |r| {
                let id: Vec<u8> = r.get(0)?;
                Ok((
                    MailboxId(id.try_into().unwrap_or([0; 32])),
                    MailboxUse {
                        used: u64_of(r.get(1)?),
                        quota: u64_of(r.get(2)?),
                        items: u64_of(r.get(3)?),
                    },
                ))
            })?;
            rows.collect()
        }))
    }

    fn share_rows(&self) -> Fut<'_, u64> {
        ready(self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM shares", [], |r| r.get::<_, i64>(0))
                .map(u64_of)
        }))
    }

    fn space(&self) -> Fut<'_, LedgerSpace> {
        ready(self.read(|conn| {
            let (size, free): (i64, i64) = conn.query_row(
                "SELECT page_count * page_size, freelist_count * page_size \
                 FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(LedgerSpace {
                size: u64_of(size),
                free: u64_of(free),
            })
        }))
    }

    /// Pages SQLite freed (deleted items) are reused for new items before
    /// its file grows.
    fn reusable(&self) -> u64 {
        self.read(|c| {
            c.query_row(
                "SELECT freelist_count * page_size FROM pragma_freelist_count, pragma_page_size",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map_or(0, u64_of)
    }

    fn forward_enqueue(&self, forward: NewForward) -> Fut<'_, Enqueued> {
        Box::pin(self.call(move |reply| Op::ForwardEnqueue { forward, reply }))
    }

    fn forward_due(&self, now: u64, max: usize, max_bytes: usize) -> Fut<'_, Vec<Queued>> {
        ready(self.read(|c| {
            // The limit written in, not bound (see `fetch`); `max` is one
            // of a few constants.
            let mut stmt = c.prepare_cached(&format!(
                "SELECT id, origin, next_addr, next_pin, hops, mailbox, received_at, expires_at, \
                 hash, payload, attempts, next_at, last_error, blob, blob_len FROM forwards \
                 WHERE next_at <= ?1 OR expires_at <= ?1 ORDER BY id LIMIT {}",
                max.min(i64::MAX as usize)
            ))?;
            let rows = stmt.query_map(params![i64_of(now)], |r| {
                Ok(Queued {
                    id: u64_of(r.get(0)?),
                    origin: MailboxId(arr(r.get(1)?)),
                    item: sealpost_proto::relay::Forward {
                        hops: r.get(4)?,
                        next: sealpost_proto::relay::NextHop {
                            addr: r.get(2)?,
                            pin: arr(r.get(3)?),
                        },
                        mailbox: MailboxId(arr(r.get(5)?)),
                        expires_at: u64_of(r.get(7)?),
                        payload_hash: arr(r.get(8)?),
                        payload: r.get(9)?,
                    },
                    blob: r
                        .get::<_, Option<Vec<u8>>>(13)?
                        .map(|b| (BlobId(arr(b)), u64_of(r.get(14).unwrap_or(0)))),
                    received_at: u64_of(r.get(6)?),
                    attempts: r.get(10)?,
                    next_at: u64_of(r.get(11)?),
                    last_error: r.get(12)?,
                })
            })?;
            // Rows are read one by one: the byte bound stops the reading.
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for r in rows {
                let q = r?;
                if !out.is_empty() && bytes + q.item.payload.len() > max_bytes {
                    break;
                }
                bytes += q.item.payload.len();
                out.push(q);
            }
            Ok(out)
        }))
    }

    fn forward_end(&self, id: u64, notice: Option<NewItem>) -> Fut<'_, Ended> {
        Box::pin(self.call(move |reply| Op::ForwardEnd { id, notice, reply }))
    }

    fn forward_later(
        &self,
        ids: Vec<u64>,
        next_at: u64,
        error: String,
        failed: bool,
    ) -> Fut<'_, ()> {
        Box::pin(self.call(move |reply| Op::ForwardLater {
            ids,
            next_at,
            error,
            failed,
            reply,
        }))
    }

    fn forward_waiting(
        &self,
        origin: MailboxId,
        items: Vec<(MailboxId, [u8; 32])>,
    ) -> Fut<'_, Vec<Option<sealpost_proto::relay::Waiting>>> {
        ready(self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT attempts, next_at, last_error FROM forwards \
                 WHERE origin = ?1 AND hash = ?2 AND mailbox = ?3 AND blob IS NULL LIMIT 1",
            )?;
            items
                .iter()
                .map(|(mb, h)| {
                    stmt.query_row(params![origin.0.to_vec(), h.to_vec(), mb.0.to_vec()], |r| {
                        Ok(sealpost_proto::relay::Waiting {
                            attempts: r.get(0)?,
                            next_at: u64_of(r.get(1)?),
                            error: r.get(2)?,
                        })
                    })
                    .optional()
                })
                .collect()
        }))
    }

    fn forward_handed(&self, id: u64, until: u64) -> Fut<'_, Ended> {
        Box::pin(self.call(move |reply| Op::ForwardHanded { id, until, reply }))
    }

    fn handed_find(
        &self,
        mailbox: MailboxId,
        payload_hash: [u8; 32],
        blob: Option<BlobId>,
    ) -> Fut<'_, Option<Handed>> {
        ready(self.read(|c| {
            let row = |r: &rusqlite::Row<'_>| {
                Ok(Handed {
                    id: u64_of(r.get(0)?),
                    origin: MailboxId(arr(r.get(1)?)),
                    next: sealpost_proto::relay::NextHop {
                        addr: r.get(2)?,
                        pin: arr(r.get(3)?),
                    },
                    mailbox: MailboxId(arr(r.get(4)?)),
                    payload_hash: arr(r.get(5)?),
                    blob: r.get::<_, Option<Vec<u8>>>(6)?.map(|b| BlobId(arr(b))),
                    until: u64_of(r.get(7)?),
                })
            };
            const COLUMNS: &str =
                "SELECT id, origin, next_addr, next_pin, mailbox, hash, blob, until FROM handed";
            match blob {
                Some(b) => c
                    .prepare_cached(&format!(
                        "{COLUMNS} WHERE blob = ?1 AND mailbox = ?2 ORDER BY id LIMIT 1"
                    ))?
                    .query_row(params![b.0.to_vec(), mailbox.0.to_vec()], row)
                    .optional(),
                None => c
                    .prepare_cached(&format!(
                        "{COLUMNS} WHERE mailbox = ?1 AND hash = ?2 AND blob IS NULL \
                         ORDER BY id LIMIT 1"
                    ))?
                    .query_row(params![mailbox.0.to_vec(), payload_hash.to_vec()], row)
                    .optional(),
            }
        }))
    }

    fn handed_end(&self, id: u64, notice: Option<NewItem>) -> Fut<'_, Ended> {
        Box::pin(self.call(move |reply| Op::HandedEnd { id, notice, reply }))
    }

    fn handed_expire(&self, now: u64) -> Fut<'_, u32> {
        Box::pin(self.call(move |reply| Op::HandedExpire { now, reply }))
    }

    fn forward_blob_queued(&self, id: BlobId) -> Fut<'_, bool> {
        ready(self.read(|c| {
            c.prepare_cached("SELECT 1 FROM forwards WHERE blob = ?1 LIMIT 1")?
                .exists(params![id.0.to_vec()])
        }))
    }

    fn forward_queue(&self) -> Fut<'_, Vec<HopQueue>> {
        ready(self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT next_addr, next_pin, COUNT(*), SUM(LENGTH(payload) + blob_len), MIN(received_at), \
                 MIN(next_at), MAX(attempts), \
                 (SELECT last_error FROM forwards g WHERE g.next_addr = f.next_addr \
                  AND g.next_pin = f.next_pin ORDER BY attempts DESC, id LIMIT 1) \
                 FROM forwards f GROUP BY next_addr, next_pin ORDER BY MIN(received_at)",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(HopQueue {
                    next: sealpost_proto::relay::NextHop {
                        addr: r.get(0)?,
                        pin: arr(r.get(1)?),
                    },
                    items: u64_of(r.get(2)?),
                    bytes: u64_of(r.get(3)?),
                    oldest: u64_of(r.get(4)?),
                    next_at: u64_of(r.get(5)?),
                    attempts: r.get(6)?,
                    last_error: r.get(7)?,
                })
            })?;
            rows.collect()
        }))
    }

    fn commit_stats(&self) -> CommitStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn latencies(&self) -> &Latencies {
        &self.latencies
    }

    fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.writer.lock() {
            if let Some(h) = w.take() {
                let _ = h.join();
            }
        }
    }
}

/// A fixed-size column (ids, keys, hashes); zeros if it has another size,
/// which the store never writes.
fn arr<const N: usize>(v: Vec<u8>) -> [u8; N] {
    v.try_into().unwrap_or([0; N])
}

pub(crate) fn blob_row(c: &Connection, id: &BlobId) -> rusqlite::Result<Option<BlobState>> {
    c.prepare_cached(
        "SELECT mailbox, total_len, stored, complete, hash, expires_at FROM blobs WHERE id = ?1",
    )?
    .query_row(params![id.0.to_vec()], |r| {
        let mb: Vec<u8> = r.get(0)?;
        let hash: Vec<u8> = r.get(4)?;
        Ok(BlobState {
            mailbox: MailboxId(mb.try_into().unwrap_or([0; 32])),
            total_len: u64_of(r.get(1)?),
            stored: u64_of(r.get(2)?),
            complete: r.get::<_, i64>(3)? != 0,
            hash: hash.try_into().unwrap_or([0; 32]),
            expires_at: u64_of(r.get(5)?),
        })
    })
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetch is compiled once however its parameters change (a bound
    /// `LIMIT ?`, and `mailbox = ?1`, made SQLite compile it again on
    /// every fetch), and reads a mailbox's items through the index in
    /// order without sorting them, so stopping after `max` rows reads no
    /// more.
    #[test]
    fn a_fetch_is_compiled_once_and_not_sorted() {
        let conn = rusqlite::Connection::open_in_memory().expect("db");
        conn.execute_batch(crate::schema::SCHEMA).expect("schema");
        for i in 0..5i64 {
            let mut stmt = conn.prepare_cached(FETCH_SQL).expect("prepare");
            let mut rows = stmt.query(params![vec![i as u8; 32], i]).expect("query");
            while rows.next().expect("row").is_some() {}
        }
        let stmt = conn.prepare_cached(FETCH_SQL).expect("cached");
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {FETCH_SQL}"))
            .expect("plan")
            .query_map(params![rusqlite::types::Null, rusqlite::types::Null], |r| {
                r.get(3)
            })
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("plan rows");
        assert!(
            plan.iter()
                .any(|p| p.contains("items_mailbox (mailbox=? AND seq>?)"))
                && !plan.iter().any(|p| p.contains("TEMP B-TREE")),
            "{plan:?}"
        );
        // What the test guards against: a bound limit, or the mailbox
        // compared with the parameter itself.
        for bad in [
            format!("{FETCH_SQL} LIMIT ?3"),
            format!("{} LIMIT 100", FETCH_SQL.replace("+?1", "?1")),
        ] {
            for i in 0..3i64 {
                let mut stmt = conn.prepare_cached(&bad).expect("prepare");
                let mut rows = if stmt.parameter_count() == 3 {
                    stmt.query(params![vec![i as u8; 32], 0, 10 + i])
                } else {
                    stmt.query(params![vec![i as u8; 32], 0])
                }
                .expect("query");
                while rows.next().expect("row").is_some() {}
            }
            let stmt = conn.prepare_cached(&bad).expect("cached");
            assert!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare) > 0,
                "{bad}"
            );
        }
    }
}
