//! A ledger and a blob store in memory: the second implementation of the
//! seams, for tests and in-memory relays. **Not durable**: what they hold
//! is gone with the process, so a relay on them must not be used for mail
//! anyone cares about. They pass [`crate::conformance`] like the embedded
//! ones, which is what keeps the suite honest about what it relies on.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};
use sealpost_proto::relay::{BlobId, BlobPiece, Item, MailboxId, RefusalCode};

use crate::ledger::*;
use crate::{CommitStats, Latencies, Limits, Registered, Source, StoreError, SubmitOutcome};

struct ItemRow {
    mailbox: MailboxId,
    received_at: u64,
    expires_at: u64,
    hash: [u8; 32],
    payload: Vec<u8>,
    source: Source,
}

struct BlobRow {
    state: BlobState,
    source: Source,
}

#[derive(Default)]
struct State {
    /// key, used, quota
    mailboxes: HashMap<MailboxId, ([u8; 32], u64, u64)>,
    items: BTreeMap<u64, ItemRow>,
    next_seq: u64,
    blobs: HashMap<BlobId, BlobRow>,
    shares: HashMap<(MailboxId, Source), u64>,
    forwards: BTreeMap<u64, Queued>,
    next_forward: u64,
    handed: BTreeMap<u64, Handed>,
    stats: CommitStats,
    closed: bool,
}

impl State {
    fn charge(&mut self, mailbox: MailboxId, source: Source, bytes: u64) {
        if let Some(m) = self.mailboxes.get_mut(&mailbox) {
            m.1 += bytes;
        }
        *self.shares.entry((mailbox, source)).or_default() += bytes;
    }

    fn release(&mut self, mailbox: MailboxId, source: Source, bytes: u64) {
        if let Some(m) = self.mailboxes.get_mut(&mailbox) {
            m.1 = m.1.saturating_sub(bytes);
        }
        if let Some(s) = self.shares.get_mut(&(mailbox, source)) {
            *s = s.saturating_sub(bytes);
            if *s == 0 {
                self.shares.remove(&(mailbox, source));
            }
        }
    }

    /// Stores `item` under the next seq (its bytes are the caller's to
    /// count).
    fn push_item(&mut self, item: NewItem) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.items.insert(
            seq,
            ItemRow {
                mailbox: item.mailbox,
                received_at: item.now,
                expires_at: item.expires_at,
                hash: item.hash,
                payload: item.payload,
                source: item.source,
            },
        );
        seq
    }

    fn share(&self, mailbox: MailboxId, source: Source) -> u64 {
        self.shares.get(&(mailbox, source)).copied().unwrap_or(0)
    }
}

/// The ledger in memory, enforcing the same [`Limits`] as the embedded one.
pub struct MemLedger {
    state: Mutex<State>,
    limits: Limits,
    latencies: Latencies,
}

impl std::fmt::Debug for MemLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemLedger")
    }
}

impl MemLedger {
    pub fn new(limits: Limits) -> Self {
        Self {
            state: Mutex::new(State {
                next_seq: 1,
                next_forward: 1,
                handed: BTreeMap::new(),
                ..State::default()
            }),
            limits,
            latencies: Latencies::default(),
        }
    }

    fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut State) -> T) -> Fut<'_, T> {
        let r = match self.state.lock() {
            Ok(mut s) if !s.closed => Ok(f(&mut s)),
            _ => Err(StoreError::Closed),
        };
        Box::pin(std::future::ready(r))
    }

    /// A write: counted as one commit.
    fn write<T: Send + 'static>(&self, f: impl FnOnce(&mut State) -> T) -> Fut<'_, T> {
        self.with(|s| {
            s.stats.commits += 1;
            s.stats.writes += 1;
            f(s)
        })
    }
}

impl Ledger for MemLedger {
    fn register(&self, mailbox: MailboxId, key: [u8; 32], _now: u64) -> Fut<'_, Registered> {
        let (quota, cap) = (
            self.limits.mailbox_quota,
            self.limits.max_mailboxes.unwrap_or(u64::MAX),
        );
        self.write(move |s| {
            if s.mailboxes.contains_key(&mailbox) {
                Registered::Existing
            } else if s.mailboxes.len() as u64 >= cap {
                Registered::Full
            } else {
                s.mailboxes.insert(mailbox, (key, 0, quota));
                Registered::Created
            }
        })
    }

    fn mailbox_key(&self, mailbox: MailboxId) -> Fut<'_, Option<[u8; 32]>> {
        self.with(move |s| s.mailboxes.get(&mailbox).map(|m| m.0))
    }

    fn submit(&self, item: NewItem) -> Fut<'_, SubmitOutcome> {
        let limits = self.limits;
        self.write(move |s| {
            let len = item.payload.len() as u64;
            let Some(&(_, used, quota)) = s.mailboxes.get(&item.mailbox) else {
                return SubmitOutcome::Refused(RefusalCode::UnknownMailbox);
            };
            if item.expires_at <= item.now {
                return SubmitOutcome::Refused(RefusalCode::Expired);
            }
            if used + len > quota
                || s.share(item.mailbox, item.source) + len > limits.source_share(quota)
            {
                return SubmitOutcome::Refused(RefusalCode::OverQuota);
            }
            let mut item_id = [0u8; 16];
            OsRng.fill_bytes(&mut item_id);
            s.charge(item.mailbox, item.source, len);
            let seq = s.push_item(item);
            SubmitOutcome::Stored { seq, item_id }
        })
    }

    fn ack(&self, mailbox: MailboxId, seqs: Vec<u64>) -> Fut<'_, u32> {
        self.write(move |s| {
            let mut n = 0;
            for seq in seqs {
                if s.items.get(&seq).is_some_and(|i| i.mailbox == mailbox) {
                    if let Some(i) = s.items.remove(&seq) {
                        s.release(i.mailbox, i.source, i.payload.len() as u64);
                        n += 1;
                    }
                }
            }
            n
        })
    }

    fn fetch(
        &self,
        mailbox: MailboxId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Fut<'_, Fetched> {
        self.with(move |s| {
            let mut out = Fetched::default();
            let mut bytes = 0usize;
            for (&seq, i) in s.items.range(after.saturating_add(1)..) {
                if i.mailbox != mailbox {
                    continue;
                }
                if out.items.len() == max
                    || (!out.items.is_empty() && bytes + i.payload.len() > max_bytes)
                {
                    out.more = true;
                    break;
                }
                if blake3::hash(&i.payload).as_bytes() != &i.hash {
                    out.damaged += 1;
                }
                bytes += i.payload.len();
                out.items.push(Item {
                    seq,
                    received_at: i.received_at,
                    expires_at: i.expires_at,
                    payload_hash: i.hash,
                    payload: i.payload.clone(),
                });
            }
            out
        })
    }

    fn sweep(&self, now: u64) -> Fut<'_, (u64, Vec<BlobId>)> {
        self.write(move |s| {
            let gone: Vec<u64> = s
                .items
                .iter()
                .filter(|(_, i)| i.expires_at <= now)
                .map(|(&k, _)| k)
                .collect();
            let mut n = 0u64;
            for seq in gone {
                if let Some(i) = s.items.remove(&seq) {
                    s.release(i.mailbox, i.source, i.payload.len() as u64);
                    n += 1;
                }
            }
            let blobs: Vec<BlobId> = s
                .blobs
                .iter()
                .filter(|(_, b)| b.state.expires_at <= now)
                .map(|(&k, _)| k)
                .collect();
            for id in &blobs {
                if let Some(b) = s.blobs.remove(id) {
                    s.release(b.state.mailbox, b.source, b.state.total_len);
                    n += 1;
                }
            }
            (n, blobs)
        })
    }

    fn status(&self, mailbox: MailboxId) -> Fut<'_, MailboxUse> {
        self.with(move |s| {
            let (used, quota) = s.mailboxes.get(&mailbox).map_or((0, 0), |m| (m.1, m.2));
            MailboxUse {
                items: s.items.values().filter(|i| i.mailbox == mailbox).count() as u64,
                used,
                quota,
            }
        })
    }

    fn share_used(&self, mailbox: MailboxId, source: Source) -> Fut<'_, u64> {
        self.with(move |s| s.share(mailbox, source))
    }

    fn blob(&self, blob_id: BlobId) -> Fut<'_, Option<BlobState>> {
        self.with(move |s| s.blobs.get(&blob_id).map(|b| b.state))
    }

    fn blob_advance(&self, a: BlobAdvance) -> Fut<'_, Advanced> {
        let limits = self.limits;
        self.write(move |s| match (a.from, s.blobs.get_mut(&a.blob_id)) {
            (None, Some(b)) => Advanced::Conflict {
                stored: Some(b.state.stored),
            },
            (Some(_), None) => Advanced::Conflict { stored: None },
            (Some(from), Some(b)) => {
                if b.state.stored != from
                    || b.state.complete
                    || b.state.mailbox != a.mailbox
                    || b.state.total_len != a.total_len
                {
                    return Advanced::Conflict {
                        stored: Some(b.state.stored),
                    };
                }
                b.state.stored = a.to;
                b.state.complete = a.complete;
                b.state.hash = a.hash;
                Advanced::Committed
            }
            (None, None) => {
                let Some(&(_, used, quota)) = s.mailboxes.get(&a.mailbox) else {
                    return Advanced::Refused(RefusalCode::UnknownMailbox);
                };
                if used + a.total_len > quota
                    || s.share(a.mailbox, a.source) + a.total_len > limits.source_share(quota)
                {
                    return Advanced::Refused(RefusalCode::OverQuota);
                }
                s.charge(a.mailbox, a.source, a.total_len);
                s.blobs.insert(
                    a.blob_id,
                    BlobRow {
                        state: BlobState {
                            mailbox: a.mailbox,
                            total_len: a.total_len,
                            stored: a.to,
                            complete: a.complete,
                            hash: a.hash,
                            expires_at: a.expires_at,
                        },
                        source: a.source,
                    },
                );
                Advanced::Committed
            }
        })
    }

    fn blob_delete(&self, blob_id: BlobId, mailbox: MailboxId) -> Fut<'_, bool> {
        self.write(move |s| {
            if s.blobs
                .get(&blob_id)
                .is_some_and(|b| b.state.mailbox == mailbox)
            {
                if let Some(b) = s.blobs.remove(&blob_id) {
                    s.release(mailbox, b.source, b.state.total_len);
                    return true;
                }
            }
            false
        })
    }

    fn blob_expire(&self, blob_id: BlobId, mailbox: MailboxId, at: u64) -> Fut<'_, bool> {
        self.write(move |s| match s.blobs.get_mut(&blob_id) {
            Some(b) if b.state.mailbox == mailbox => {
                b.state.expires_at = at;
                true
            }
            _ => false,
        })
    }

    fn blobs_known(&self, ids: Vec<BlobId>) -> Fut<'_, Vec<bool>> {
        self.with(move |s| ids.iter().map(|id| s.blobs.contains_key(id)).collect())
    }

    fn complete_blobs(&self) -> Fut<'_, Vec<(BlobId, [u8; 32], u64)>> {
        self.with(|s| {
            s.blobs
                .iter()
                .filter(|(_, b)| b.state.complete)
                .map(|(&id, b)| (id, b.state.hash, b.state.stored))
                .collect()
        })
    }

    fn scrub_items(&self) -> Fut<'_, (u64, Vec<u64>)> {
        self.with(|s| {
            let damaged = s
                .items
                .iter()
                .filter(|(_, i)| blake3::hash(&i.payload).as_bytes() != &i.hash)
                .map(|(&k, _)| k)
                .collect();
            (s.items.len() as u64, damaged)
        })
    }

    fn totals(&self) -> Fut<'_, Totals> {
        self.with(|s| Totals {
            mailboxes: s.mailboxes.len() as u64,
            items: s.items.len() as u64,
            item_bytes: s.items.values().map(|i| i.payload.len() as u64).sum(),
            blobs: s.blobs.len() as u64,
        })
    }

    fn mailboxes(&self) -> Fut<'_, Vec<(MailboxId, MailboxUse)>> {
        self.with(|s| {
            let mut v: Vec<(MailboxId, MailboxUse)> = s
                .mailboxes
                .iter()
                .map(|(&id, &(_, used, quota))| {
                    let items = s.items.values().filter(|i| i.mailbox == id).count() as u64;
                    (id, MailboxUse { items, used, quota })
                })
                .collect();
            v.sort_by_key(|m| std::cmp::Reverse(m.1.used));
            v
        })
    }

    fn share_rows(&self) -> Fut<'_, u64> {
        self.with(|s| s.shares.len() as u64)
    }

    fn space(&self) -> Fut<'_, LedgerSpace> {
        self.with(|s| LedgerSpace {
            size: s.items.values().map(|i| i.payload.len() as u64).sum(),
            free: 0,
        })
    }

    fn forward_enqueue(&self, f: NewForward) -> Fut<'_, Enqueued> {
        self.write(move |s| {
            let len = f.item.payload.len() as u64;
            if f.blob.is_none() {
                if let Some(q) = s.forwards.values().find(|q| {
                    q.blob.is_none()
                        && q.origin == f.origin
                        && q.item.mailbox == f.item.mailbox
                        && q.item.payload_hash == f.item.payload_hash
                }) {
                    return Enqueued::Queued { id: q.id };
                }
            }
            if let Some(b) = f.blob {
                if let Some(q) = s
                    .forwards
                    .values()
                    .find(|q| q.blob.map(|x| x.0) == Some(b.0) && q.item.mailbox == f.item.mailbox)
                {
                    return Enqueued::Queued { id: q.id };
                }
            }
            let Some(&(_, used, quota)) = s.mailboxes.get(&f.origin) else {
                return Enqueued::Refused(RefusalCode::UnknownMailbox);
            };
            if f.item.expires_at <= f.now {
                return Enqueued::Refused(RefusalCode::Expired);
            }
            if used + len > quota {
                return Enqueued::Refused(RefusalCode::OverQuota);
            }
            if let Some(m) = s.mailboxes.get_mut(&f.origin) {
                m.1 += len;
            }
            let id = s.next_forward;
            s.next_forward += 1;
            s.forwards.insert(
                id,
                Queued {
                    id,
                    origin: f.origin,
                    item: f.item,
                    blob: f.blob,
                    received_at: f.now,
                    attempts: 0,
                    next_at: f.now,
                    last_error: None,
                },
            );
            Enqueued::Queued { id }
        })
    }

    fn forward_due(&self, now: u64, max: usize, max_bytes: usize) -> Fut<'_, Vec<Queued>> {
        self.with(move |s| {
            let mut out: Vec<Queued> = Vec::new();
            let mut bytes = 0usize;
            for q in s
                .forwards
                .values()
                .filter(|q| q.next_at <= now || q.item.expires_at <= now)
                .take(max)
            {
                if !out.is_empty() && bytes + q.item.payload.len() > max_bytes {
                    break;
                }
                bytes += q.item.payload.len();
                out.push(q.clone());
            }
            out
        })
    }

    fn forward_end(&self, id: u64, notice: Option<NewItem>) -> Fut<'_, Ended> {
        self.write(move |s| {
            let Some(q) = s.forwards.remove(&id) else {
                return Ended::Gone;
            };
            if let Some(m) = s.mailboxes.get_mut(&q.origin) {
                m.1 = m.1.saturating_sub(q.item.payload.len() as u64);
            }
            let notice_seq = match notice {
                Some(n) if n.mailbox == q.origin => {
                    // In the mailbox's use, in no source's share.
                    if let Some(m) = s.mailboxes.get_mut(&q.origin) {
                        m.1 += n.payload.len() as u64;
                    }
                    Some(s.push_item(n))
                }
                _ => None,
            };
            Ended::Ended { notice_seq }
        })
    }

    fn forward_later(
        &self,
        ids: Vec<u64>,
        next_at: u64,
        error: String,
        failed: bool,
    ) -> Fut<'_, ()> {
        self.write(move |s| {
            for id in ids {
                if let Some(q) = s.forwards.get_mut(&id) {
                    q.attempts += u32::from(failed);
                    q.next_at = next_at;
                    q.last_error = Some(error.clone());
                }
            }
        })
    }

    fn forward_waiting(
        &self,
        origin: MailboxId,
        items: Vec<(MailboxId, [u8; 32])>,
    ) -> Fut<'_, Vec<Option<sealpost_proto::relay::Waiting>>> {
        self.with(move |s| {
            items
                .iter()
                .map(|(mb, h)| {
                    s.forwards
                        .values()
                        .find(|q| {
                            q.blob.is_none()
                                && q.origin == origin
                                && q.item.mailbox == *mb
                                && q.item.payload_hash == *h
                        })
                        .map(|q| sealpost_proto::relay::Waiting {
                            attempts: q.attempts,
                            next_at: q.next_at,
                            error: q.last_error.clone(),
                        })
                })
                .collect()
        })
    }

    fn forward_handed(&self, id: u64, until: u64) -> Fut<'_, Ended> {
        self.write(move |s| {
            let Some(q) = s.forwards.remove(&id) else {
                return Ended::Gone;
            };
            if let Some(m) = s.mailboxes.get_mut(&q.origin) {
                m.1 = m.1.saturating_sub(q.item.payload.len() as u64);
            }
            s.handed.insert(
                id,
                Handed {
                    id,
                    origin: q.origin,
                    next: q.item.next,
                    mailbox: q.item.mailbox,
                    payload_hash: q.item.payload_hash,
                    blob: q.blob.map(|b| b.0),
                    until,
                },
            );
            Ended::Ended { notice_seq: None }
        })
    }

    fn handed_find(
        &self,
        mailbox: MailboxId,
        payload_hash: [u8; 32],
        blob: Option<BlobId>,
    ) -> Fut<'_, Option<Handed>> {
        self.with(move |s| {
            s.handed
                .values()
                .find(|h| {
                    h.mailbox == mailbox
                        && match blob {
                            Some(b) => h.blob == Some(b),
                            None => h.blob.is_none() && h.payload_hash == payload_hash,
                        }
                })
                .cloned()
        })
    }

    fn handed_end(&self, id: u64, notice: Option<NewItem>) -> Fut<'_, Ended> {
        self.write(move |s| {
            let Some(h) = s.handed.remove(&id) else {
                return Ended::Gone;
            };
            let notice_seq = match notice {
                Some(n) if n.mailbox == h.origin => {
                    if let Some(m) = s.mailboxes.get_mut(&h.origin) {
                        m.1 += n.payload.len() as u64;
                    }
                    Some(s.push_item(n))
                }
                _ => None,
            };
            Ended::Ended { notice_seq }
        })
    }

    fn handed_expire(&self, now: u64) -> Fut<'_, u32> {
        self.write(move |s| {
            let before = s.handed.len();
            s.handed.retain(|_, h| h.until >= now);
            u32::try_from(before - s.handed.len()).unwrap_or(u32::MAX)
        })
    }

    fn forward_blob_queued(&self, id: BlobId) -> Fut<'_, bool> {
        self.with(move |s| s.forwards.values().any(|q| q.blob.map(|b| b.0) == Some(id)))
    }

    fn forward_queue(&self) -> Fut<'_, Vec<HopQueue>> {
        self.with(|s| {
            let mut out: Vec<HopQueue> = Vec::new();
            // The error shown is that of the item tried most (the first
            // such, by id), as the embedded ledger shows it.
            let mut worst: Vec<(u32, Option<String>)> = Vec::new();
            for q in s.forwards.values() {
                let len = q.item.payload.len() as u64 + q.blob.map_or(0, |b| b.1);
                match out.iter().position(|h| h.next == q.item.next) {
                    Some(i) => {
                        let h = &mut out[i];
                        h.items += 1;
                        h.bytes += len;
                        h.oldest = h.oldest.min(q.received_at);
                        h.next_at = h.next_at.min(q.next_at);
                        h.attempts = h.attempts.max(q.attempts);
                        if q.attempts > worst[i].0 {
                            worst[i] = (q.attempts, q.last_error.clone());
                        }
                    }
                    None => {
                        out.push(HopQueue {
                            next: q.item.next.clone(),
                            items: 1,
                            bytes: len,
                            oldest: q.received_at,
                            next_at: q.next_at,
                            attempts: q.attempts,
                            last_error: None,
                        });
                        worst.push((q.attempts, q.last_error.clone()));
                    }
                }
            }
            for (h, (_, e)) in out.iter_mut().zip(worst) {
                h.last_error = e;
            }
            out.sort_by_key(|h| h.oldest);
            out
        })
    }

    fn commit_stats(&self) -> CommitStats {
        self.state.lock().map(|s| s.stats).unwrap_or_default()
    }

    fn latencies(&self) -> &Latencies {
        &self.latencies
    }

    fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
    }
}

/// A blob's bytes, and when they were last written.
type MemBlob = (Vec<u8>, Instant);

/// Blob bytes in memory.
#[derive(Default)]
pub struct MemBlobs {
    blobs: Mutex<HashMap<BlobId, MemBlob>>,
}

impl std::fmt::Debug for MemBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemBlobs")
    }
}

impl MemBlobs {
    /// Damages a blob's byte at `at` (for tests of scrubbing and repair).
    pub fn flip(&self, id: &BlobId, at: usize) {
        if let Ok(mut m) = self.blobs.lock() {
            if let Some(b) = m.get_mut(id).and_then(|(v, _)| v.get_mut(at)) {
                *b ^= 1;
            }
        }
    }

    /// Makes every blob look written `age` ago (for tests of orphans).
    pub fn age_all(&self, age: Duration) {
        if let Ok(mut m) = self.blobs.lock() {
            for (_, t) in m.values_mut() {
                *t = t.checked_sub(age).unwrap_or(*t);
            }
        }
    }
}

impl BlobStore for MemBlobs {
    fn write_run(
        &self,
        id: &BlobId,
        offset: u64,
        _new: bool,
        run: &[BlobPiece],
        complete: bool,
    ) -> io::Result<Option<[u8; 32]>> {
        let mut m = self
            .blobs
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        let (bytes, at) = m.entry(*id).or_insert_with(|| (Vec::new(), Instant::now()));
        // What lies past the committed length was never acknowledged.
        bytes.truncate(offset as usize);
        if bytes.len() as u64 != offset {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a run that does not continue the blob's bytes",
            ));
        }
        for p in run {
            bytes.extend_from_slice(&p.data);
        }
        *at = Instant::now();
        Ok(complete.then(|| *blake3::hash(bytes).as_bytes()))
    }

    fn read(&self, id: &BlobId, offset: u64, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let m = self
            .blobs
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        let (bytes, _) = m.get(id).ok_or(io::ErrorKind::NotFound)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let part = bytes
            .get(start..start.saturating_add(n))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        out.extend_from_slice(part);
        Ok(())
    }

    fn remove(&self, id: &BlobId) {
        if let Ok(mut m) = self.blobs.lock() {
            m.remove(id);
        }
    }

    fn older_than(&self, age: Duration) -> io::Result<Vec<BlobId>> {
        let m = self
            .blobs
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        Ok(m.iter()
            .filter(|(_, (_, t))| t.elapsed() >= age)
            .map(|(&id, _)| id)
            .collect())
    }

    fn free_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
}
