//! Files both ways: files sent (their blob uploads and groups), downloads of files received, and repairs of damaged chunks.

use super::*;
use sealpost_proto::blob::BlobLayout;
use sealpost_proto::manifest::BlobId;

/// A file being sent: where its bytes come from and how they are encrypted.
#[derive(Debug, Clone)]
pub struct FileOut {
    pub msg: MessageId,
    pub path: String,
    pub blob_id: BlobId,
    pub key: sealpost_proto::blob::BlobKey,
    pub size: u64,
    pub chunk_size: u32,
    /// The blob's plaintext length: `size`, or more for a padded file
    /// (`send --pad`, PROTOCOL 5.2).
    pub padded_size: u64,
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
    pub blob_id: BlobId,
    pub key: sealpost_proto::blob::BlobKey,
    pub size: u64,
    pub chunk_size: u32,
    /// The blob's plaintext length: `size`, or more for a padded file.
    pub padded_size: u64,
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
    /// What names it (and its message in the inbox).
    pub fn key(&self) -> ReceivedId {
        ReceivedId::new(self.sender, self.msg)
    }

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

pub(crate) const DOWNLOAD_COLS: &str =
    "msg, sender, agreement, relay, blob_id, blob_key, size, chunk_size, \
     plaintext_hash, name, dir, next_chunk, bad, attempts, state, final_path, error, changed_ms, \
     local_errors, padded";

pub(crate) fn download_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Download> {
    let bad: String = r.get(12)?;
    Ok(Download {
        msg: MessageId(id16(r.get(0)?)),
        sender: hash32(r.get(1)?),
        agreement: hash32(r.get(2)?),
        relay: r.get(3)?,
        blob_id: BlobId(id16(r.get(4)?)),
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
        padded_size: match r.get::<_, Option<i64>>(19)? {
            Some(p) => to_u64(p),
            None => to_u64(r.get(6)?),
        },
    })
}

/// `sender` in `file_groups` of a file we sent.
pub(crate) const SENT: &[u8] = &[];

/// Records a file's group: `sender` is the sender's signing key for a file
/// received, [`SENT`] for one we sent.
pub(crate) fn insert_group(
    tx: &rusqlite::Transaction<'_>,
    msg: &MessageId,
    sender: &[u8],
    g: &Group,
) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT OR IGNORE INTO file_groups (msg, sender, group_id, idx, count) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![msg.0.to_vec(), sender, g.id.to_vec(), g.index, g.count],
    )?;
    Ok(())
}

pub(crate) fn bad_text(bad: &[u64]) -> String {
    bad.iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn insert_download(tx: &Transaction<'_>, d: &Download) -> rusqlite::Result<()> {
    tx.prepare_cached(&format!(
        "INSERT OR IGNORE INTO downloads ({DOWNLOAD_COLS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
    ))?
    .execute(params![
        d.msg.0.to_vec(),
        d.sender.to_vec(),
        d.agreement.to_vec(),
        d.relay,
        d.blob_id.0.to_vec(),
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
        (d.padded_size != d.size).then(|| to_i64(d.padded_size)),
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

impl FileOut {
    /// The blob's layout.
    pub fn layout(&self) -> Result<BlobLayout, sealpost_proto::codec::DecodeError> {
        BlobLayout::padded(self.size, self.padded_size, self.chunk_size)
    }
}

impl Download {
    /// The blob's layout.
    pub fn layout(&self) -> Result<BlobLayout, sealpost_proto::codec::DecodeError> {
        BlobLayout::padded(self.size, self.padded_size, self.chunk_size)
    }
}

/// A file sent, by its message id. The outbox's content hash comes by a
/// subquery, not a join: SQLite's constant propagation through a join
/// marks `?1` as able to change the plan, and a statement so marked is
/// compiled again every time rusqlite's statement cache clears its
/// bindings, that is on every call (111,000 instructions a message
/// submitted, counted with callgrind; `file_out_is_compiled_once`).
pub(crate) const FILE_OUT_SQL: &str = "SELECT f.msg, f.path, f.blob_id, f.blob_key, f.size, \
     f.chunk_size, (SELECT o.content_hash FROM outbox o WHERE o.id = f.msg), f.padded \
     FROM files_out f WHERE f.msg = ?1";

impl Db {
    /// Records the file behind a queued file-manifest message (and its
    /// group, for a file of a directory).
    pub fn add_file_out(&mut self, f: &FileOut, group: Option<&Group>) -> Result<(), AgentError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO files_out (msg, path, blob_id, blob_key, size, chunk_size, padded) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                f.msg.0.to_vec(),
                f.path,
                f.blob_id.0.to_vec(),
                f.key.0.to_vec(),
                to_i64(f.size),
                f.chunk_size,
                (f.padded_size != f.size).then(|| to_i64(f.padded_size)),
            ],
        )?;
        if let Some(g) = group {
            insert_group(&tx, &f.msg, SENT, g)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The group a file we sent belongs to, if any.
    pub fn group_of_sent(&self, msg: &MessageId) -> Result<Option<Group>, AgentError> {
        self.group_of(msg, SENT)
    }

    /// The group a file received belongs to, if any: its sender's.
    pub fn group_of_received(&self, key: &ReceivedId) -> Result<Option<Group>, AgentError> {
        self.group_of(&key.id, &key.sender)
    }

    fn group_of(&self, msg: &MessageId, sender: &[u8]) -> Result<Option<Group>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT group_id, idx, count FROM file_groups WHERE msg = ?1 AND sender = ?2",
            )?
            .query_row(params![msg.0.to_vec(), sender], |r| {
                Ok(Group {
                    id: id16(r.get(0)?),
                    index: r.get(1)?,
                    count: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// The files of a group we sent, in their order.
    pub fn sent_group_members(&self, group_id: &[u8; 16]) -> Result<Vec<MessageId>, AgentError> {
        self.group_members(group_id, SENT)
    }

    /// The files of a group `sender` sent us, in their order: only theirs
    /// (a co-recipient who learns the group's id cannot add files to it).
    pub fn received_group_members(
        &self,
        group_id: &[u8; 16],
        sender: &[u8; 32],
    ) -> Result<Vec<MessageId>, AgentError> {
        self.group_members(group_id, sender)
    }

    fn group_members(
        &self,
        group_id: &[u8; 16],
        sender: &[u8],
    ) -> Result<Vec<MessageId>, AgentError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT msg FROM file_groups WHERE group_id = ?1 AND sender = ?2 ORDER BY idx, msg",
        )?;
        let rows = stmt.query_map(params![group_id.to_vec(), sender], |r| {
            Ok(MessageId(id16(r.get(0)?)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn file_out(&self, msg: &MessageId) -> Result<Option<FileOut>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(FILE_OUT_SQL)?
            .query_row(params![msg.0.to_vec()], |r| {
                // No outbox row (the join's "no row"): none.
                let Some(plaintext_hash) = r.get::<_, Option<Vec<u8>>>(6)? else {
                    return Ok(None);
                };
                Ok(Some(FileOut {
                    msg: MessageId(id16(r.get(0)?)),
                    path: r.get(1)?,
                    blob_id: BlobId(id16(r.get(2)?)),
                    key: sealpost_proto::blob::BlobKey(hash32(r.get(3)?)),
                    size: to_u64(r.get(4)?),
                    chunk_size: r.get(5)?,
                    plaintext_hash: hash32(plaintext_hash),
                    padded_size: match r.get::<_, Option<i64>>(7)? {
                        Some(p) => to_u64(p),
                        None => to_u64(r.get(4)?),
                    },
                }))
            })
            .optional()?
            .flatten())
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
                "UPDATE deliveries SET uploaded = ?3 WHERE msg = ?1 AND recipient = (SELECT id FROM recipients WHERE key = ?2)",
            )?
            .execute(params![msg.0.to_vec(), recipient.to_vec(), to_i64(bytes)])?;
        Ok(())
    }

    /// Bytes of the file the recipient's relay holds, per delivery.
    pub fn uploaded(&self, msg: &MessageId, recipient: &[u8; 32]) -> Result<u64, AgentError> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT uploaded FROM deliveries WHERE msg = ?1 AND recipient = (SELECT id FROM recipients WHERE key = ?2)")?
            .query_row(params![msg.0.to_vec(), recipient.to_vec()], |r| r.get(0))
            .optional()?;
        Ok(v.map(to_u64).unwrap_or(0))
    }

    pub fn download(&self, key: &ReceivedId) -> Result<Option<Download>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {DOWNLOAD_COLS} FROM downloads WHERE msg = ?1 AND sender = ?2"
            ))?
            .query_row(
                params![key.id.0.to_vec(), key.sender.to_vec()],
                download_from_row,
            )
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
             ORDER BY changed_ms{}",
            super::limit(limit)
        ))?;
        let rows = stmt.query_map(params![state], download_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Counts a local failure of a download (its disk or file system, not
    /// the relay) and returns how many in a row it has had.
    pub fn download_local_error(
        &mut self,
        key: &ReceivedId,
        error: &str,
        now_ms: u64,
    ) -> Result<u32, AgentError> {
        Ok(self
            .conn
            .prepare_cached(
                "UPDATE downloads SET local_errors = local_errors + 1, error = ?2, \
                 changed_ms = ?3 WHERE msg = ?1 AND sender = ?4 RETURNING local_errors",
            )?
            .query_row(
                params![
                    key.id.0.to_vec(),
                    error,
                    to_i64(now_ms),
                    key.sender.to_vec()
                ],
                |r| r.get(0),
            )?)
    }

    /// Sets a download's state (and error text).
    pub fn download_state(
        &mut self,
        key: &ReceivedId,
        state: DownloadState,
        error: Option<&str>,
        now_ms: u64,
    ) -> Result<(), AgentError> {
        self.conn
            .prepare_cached(
                "UPDATE downloads SET state = ?2, error = ?3, changed_ms = ?4 \
                 WHERE msg = ?1 AND sender = ?5",
            )?
            .execute(params![
                key.id.0.to_vec(),
                state,
                error,
                to_i64(now_ms),
                key.sender.to_vec()
            ])?;
        Ok(())
    }

    /// Stores a download's progress (after its partial file was fsync'd).
    pub fn download_progress(
        &mut self,
        key: &ReceivedId,
        next_chunk: u64,
        bad: &[u64],
        now_ms: u64,
    ) -> Result<(), AgentError> {
        self.conn
            .prepare_cached(
                "UPDATE downloads SET next_chunk = ?2, bad = ?3, changed_ms = ?4, local_errors = 0 \
                 WHERE msg = ?1 AND sender = ?5",
            )?
            .execute(params![
                key.id.0.to_vec(),
                to_i64(next_chunk),
                bad_text(bad),
                to_i64(now_ms),
                key.sender.to_vec()
            ])?;
        Ok(())
    }

    /// Ends a download: `done` with its final path and the receipt it
    /// earns, or `failed` with an error; or back to the start (`restart`)
    /// after a read-back mismatch.
    pub fn download_end(
        &mut self,
        key: &ReceivedId,
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
                 error = ?2, changed_ms = ?3 WHERE msg = ?1 AND sender = ?4",
                params![
                    key.id.0.to_vec(),
                    error,
                    to_i64(now_ms),
                    key.sender.to_vec()
                ],
            )?;
        } else {
            tx.execute(
                "UPDATE downloads SET state = ?2, final_path = ?3, error = ?4, changed_ms = ?5 \
                 WHERE msg = ?1 AND sender = ?6",
                params![
                    key.id.0.to_vec(),
                    state,
                    final_path,
                    error,
                    to_i64(now_ms),
                    key.sender.to_vec()
                ],
            )?;
        }
        if let Some(p) = receipt {
            insert_pending(&tx, p)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The file we sent with this blob id to `recipient`, if any.
    /// Unfinished deliveries of the file whose blob is `blob_id` to the
    /// owner of `mailbox` (a forward notice about that blob names them).
    pub fn deliveries_of_blob(
        &self,
        mailbox: &sealpost_proto::relay::MailboxId,
        blob_id: &BlobId,
    ) -> Result<Vec<DeliveryRow>, AgentError> {
        let msg: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT msg FROM files_out WHERE blob_id = ?1")?
            .query_row(params![blob_id.0.to_vec()], |r| r.get(0))
            .optional()?;
        let Some(msg) = msg else {
            return Ok(Vec::new());
        };
        let rows = self
            .conn
            .prepare_cached(&format!(
                "SELECT {DELIVERY_COLS} FROM deliveries WHERE msg = ?1 AND {UNDER_WAY}"
            ))?
            .query_map(params![msg], delivery_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter(|r| sealpost_proto::relay::MailboxId::of(&r.recipient) == *mailbox)
            .collect())
    }

    pub fn file_out_by_blob(
        &self,
        blob_id: &BlobId,
        recipient: &[u8; 32],
    ) -> Result<Option<(FileOut, DeliveryRow)>, AgentError> {
        let msg: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT msg FROM files_out WHERE blob_id = ?1")?
            .query_row(params![blob_id.0.to_vec()], |r| r.get(0))
            .optional()?;
        let Some(msg) = msg else { return Ok(None) };
        let msg = MessageId(id16(msg));
        let Some(f) = self.file_out(&msg)? else {
            return Ok(None);
        };
        let d = self
            .conn
            .prepare_cached(&format!(
                "SELECT {DELIVERY_COLS} FROM deliveries WHERE msg = ?1 AND recipient = (SELECT id FROM recipients WHERE key = ?2)"
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
        blob_id: &BlobId,
        sender: &[u8; 32],
    ) -> Result<Option<Download>, AgentError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {DOWNLOAD_COLS} FROM downloads WHERE blob_id = ?1 AND sender = ?2"
            ))?
            .query_row(
                params![blob_id.0.to_vec(), sender.to_vec()],
                download_from_row,
            )
            .optional()?)
    }

    /// Stores a repair offer for a download and makes it run again.
    pub fn set_repair_offer(
        &mut self,
        key: &ReceivedId,
        offer: &[u8],
        now_ms: u64,
    ) -> Result<(), AgentError> {
        self.conn.execute(
            "UPDATE downloads SET repair = ?2, state = 'downloading', changed_ms = ?3 \
             WHERE msg = ?1 AND sender = ?4",
            params![
                key.id.0.to_vec(),
                offer,
                to_i64(now_ms),
                key.sender.to_vec()
            ],
        )?;
        Ok(())
    }

    /// The repair offer stored for a download.
    pub fn repair_offer(&self, key: &ReceivedId) -> Result<Option<Vec<u8>>, AgentError> {
        Ok(self
            .conn
            .prepare_cached("SELECT repair FROM downloads WHERE msg = ?1 AND sender = ?2")?
            .query_row(params![key.id.0.to_vec(), key.sender.to_vec()], |r| {
                r.get(0)
            })
            .optional()?
            .flatten())
    }
}
