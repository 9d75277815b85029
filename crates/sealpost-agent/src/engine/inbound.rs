//! Fetching the home mailbox: opening every item, deciding what it is, storing new messages durably and applying reports.

use super::*;
use crate::outbox::ReceivedId;

/// What became of one fetched item.
pub(super) enum Verdict {
    /// Store it (new content).
    Store(Box<(OpenedMessage, Vec<u8>)>),
    /// Nothing to store; acknowledge it.
    Done,
}

/// Opens every fetched payload with all the checks of the sealed layer:
/// on up to 8 threads for batches of 4 or more (opening is most of a
/// recipient's CPU), in order; a worker that panics fails its share as
/// malformed instead of taking the engine down.
pub(super) fn open_all(
    me: &sealpost_proto::Identity,
    payloads: &[Vec<u8>],
) -> Vec<Result<(OpenedMessage, Vec<u8>), OpenError>> {
    if payloads.len() < 4 {
        return payloads
            .iter()
            .map(|p| message::open_slice(me, p, MAX_MESSAGE))
            .collect();
    }
    // Asked once: the answer reads cgroup files (half a millisecond).
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8)
    });
    if threads < 2 {
        return payloads
            .iter()
            .map(|p| message::open_slice(me, p, MAX_MESSAGE))
            .collect();
    }
    let per = payloads.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = payloads
            .chunks(per)
            .map(|chunk| {
                let n = chunk.len();
                let h = s.spawn(move || {
                    chunk
                        .iter()
                        .map(|p| message::open_slice(me, p, MAX_MESSAGE))
                        .collect::<Vec<_>>()
                });
                (n, h)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(n, h)| {
                h.join().unwrap_or_else(|_| {
                    (0..n)
                        .map(|_| {
                            Err(OpenError::Malformed(
                                sealpost_proto::codec::DecodeError::Invalid {
                                    what: "message",
                                    why: "opening it crashed a worker thread",
                                },
                            ))
                        })
                        .collect()
                })
            })
            .collect()
    })
}

impl Engine {
    /// Tells the home relay it may forget the items `seqs` (their
    /// outcomes are durable here); the relay's confirmation is awaited at
    /// the end of the pass, through `acks`.
    pub(super) async fn ack(
        &mut self,
        seqs: Vec<u64>,
        acks: &mut Vec<tokio::sync::oneshot::Receiver<sealpost_proto::relay::Response>>,
    ) -> Result<(), EngineError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let rx = self
            .home
            .call(&self.agent.identity, async |c| {
                c.send(sealpost_proto::relay::Request::Ack { seqs: seqs.clone() })
                    .await
            })
            .await?;
        acks.push(rx);
        Ok(())
    }

    /// Fetches, opens and stores everything waiting at the home relay,
    /// batch by batch, acknowledging each batch once its outcomes are
    /// durable, but the last: its sequence numbers are returned, for the
    /// caller to acknowledge after the receipts (none if nothing came).
    pub(super) async fn fetch_all(
        &mut self,
        stats: &mut PassStats,
        acks: &mut Vec<tokio::sync::oneshot::Receiver<sealpost_proto::relay::Response>>,
    ) -> Result<Vec<u64>, EngineError> {
        let mut after = 0u64;
        let mut reported = std::time::Instant::now();
        loop {
            // A fetch stores up to about a megabyte (the relay's answer)
            // in the spool and the database: with less room than that
            // above the reserve, what waits stays at the relay (it is not
            // acknowledged, so nothing is lost) until there is room.
            let home = self.agent.home().dir().to_path_buf();
            if let Ok(st) = rustix::fs::statvfs(&home) {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                if free < self.keep_free.saturating_add(FETCH_ROOM) {
                    tracing::warn!(
                        "messages wait at the relay: {free} bytes free where {} is, and {} are kept free (--keep-free)",
                        home.display(),
                        self.keep_free
                    );
                    return Ok(Vec::new());
                }
            }
            let (items, more) = self
                .home
                .call(&self.agent.identity, async |c| {
                    c.fetch(after, FETCH_BATCH).await
                })
                .await?;
            let Some(last) = items.last() else {
                return Ok(Vec::new());
            };
            after = last.seq;
            stats.fetched += items.len() as u64;
            let seqs: Vec<u64> = items.iter().map(|i| i.seq).collect();
            // Notices from the home relay about items it forwarded
            // (PROTOCOL 6.9) are not sealed messages: handled apart.
            let (notices, payloads): (Vec<Vec<u8>>, Vec<Vec<u8>>) = items
                .into_iter()
                .map(|i| i.payload)
                .partition(|p| sealpost_proto::notice::is_notice(p));
            let mut batch = PassStats::default();
            if !notices.is_empty() {
                self.apply_notices(notices, &mut batch).await?;
            }
            self.process_batch(payloads, &mut batch)?;
            stats.add(&batch);
            // Everything above is durable: now the relay may forget it.
            // The last batch's acknowledgement waits for the caller to send
            // the receipts first: a relay commits in order, and a commit
            // of deletions ahead of a receipt delays the receipt by an
            // fsync on its way to the sender (measured on a lone message).
            if !more {
                return Ok(seqs);
            }
            self.ack(seqs, acks).await?;
            // A long backlog must not hold receipts back until it is all
            // fetched: a sender whose receipts are late retransmits, the
            // copies lengthen the backlog, and receipts never go out (a
            // 100,000-message backlog on a slow day collapsed this way).
            if reported.elapsed() >= REPORT_EVERY {
                self.send_reports(stats).await?;
                reported = std::time::Instant::now();
            }
        }
    }

    /// Applies the home relay's forward notices (PROTOCOL 6.9) to the
    /// deliveries they name: a refusal by the next relay fails the
    /// delivery (its reason recorded as your relay reported it, with the
    /// next relay's signature checked against the key your relay named);
    /// an item your relay gave up on at expiry records why, and the
    /// delivery ends as expired. A notice not signed by the home relay's
    /// key (as it stated on this pinned connection) is recorded as forged
    /// and changes nothing.
    pub(super) async fn apply_notices(
        &mut self,
        notices: Vec<Vec<u8>>,
        stats: &mut PassStats,
    ) -> Result<(), EngineError> {
        use sealpost_proto::notice::{Ended, Notice};
        let key = self
            .home
            .call(&self.agent.identity, async |c| Ok(*c.relay_key()))
            .await?;
        let now = self.clock.now_ms();
        let mut updates = Vec::new();
        for bytes in notices {
            let name = blake3::hash(&bytes).to_hex().to_string();
            let n = match Notice::decode(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|n| {
                    n.verify(&key).map_err(|e| e.to_string())?;
                    Ok(n)
                }) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("discarded a forward notice: {e}");
                    stats.discarded += 1;
                    self.found.push((Caught::ForgedRefusal, name));
                    continue;
                }
            };
            // A carried refusal counts only if the next relay's
            // certificate key vouches for the key that signed it.
            if let Ended::Refused {
                next_key, binding, ..
            } = &n.ended
            {
                if !sealpost_client::tls::verify_key_binding(&n.next.pin, next_key, binding) {
                    tracing::warn!(
                        "discarded a forward notice: the refusal's key is not {}'s",
                        n.next.addr
                    );
                    stats.discarded += 1;
                    // Named by the item it would have failed.
                    let item = sealpost_proto::hex(&n.payload_hash);
                    self.found.push((Caught::ForgedRefusal, item));
                    continue;
                }
            }
            // About an item (its sealed bytes' hash), or a file's blob.
            let rows = match &n.blob {
                None => self
                    .agent
                    .db
                    .deliveries_of_item(&n.mailbox, &n.payload_hash)?,
                Some((blob_id, _)) => self.agent.db.deliveries_of_blob(&n.mailbox, blob_id)?,
            };
            let what = if n.blob.is_some() {
                "its file's data"
            } else {
                "it"
            };
            for row in rows {
                // The notice must be about the relay the recipient's card
                // names (its pin), not another.
                if RelayAddress::parse(&row.relay).map(|a| a.pin.0) != Some(n.next.pin) {
                    tracing::warn!(
                        "discarded a forward notice for message {}: it names another relay than {}'s",
                        row.msg,
                        row.name
                    );
                    self.found.push((Caught::ForgedRefusal, name.clone()));
                    continue;
                }
                let mut d = row.delivery.clone();
                let mut last_error = row.last_error.clone();
                match &n.ended {
                    Ended::Refused { refusal, .. } => {
                        let detail = format!(
                            "{} refused {what} (its signed refusal, passed on by your relay): {}",
                            n.next.addr,
                            refusal.code.describe()
                        );
                        // "Expired" names the item, not the expiry it was
                        // handed on with: a forwarding relay that changed
                        // that expiry gets a genuine refusal. Taken only
                        // once the message has expired here too.
                        let induced = refusal.code == sealpost_proto::relay::RefusalCode::Expired
                            && d.expires_at > now;
                        if induced {
                            tracing::warn!(
                                "message {} to {}: {detail}, though it has not expired: not taken (your relay may have changed its expiry)",
                                row.msg,
                                row.name
                            );
                            last_error = Some(format!(
                                "{detail}, though it has not expired: not taken, trying again"
                            ));
                        } else if refusal.code == sealpost_proto::relay::RefusalCode::NotForwarded {
                            // The next relay takes nothing forwarded by
                            // your relay (its operator's list): that says
                            // nothing of the message, which goes on being
                            // retransmitted, every other time directly.
                            last_error = Some(format!(
                                "{detail}; its next retransmissions go to {} directly",
                                n.next.addr
                            ));
                        } else if refusal.code.is_lasting() {
                            d.refused(now, refusal.code.name(), &detail);
                            stats.refused += 1;
                        } else {
                            last_error = Some(detail);
                        }
                    }
                    Ended::GaveUp { attempts, error } => {
                        let detail = format!(
                            "your relay could not hand {what} to {} before it expired ({attempts} attempts; last: {error})",
                            n.next.addr
                        );
                        // Your relay's word only: one that gives up on a
                        // message that has not expired here would end a
                        // live delivery. Taken only once it has expired
                        // on this clock; until then it is retransmitted.
                        if d.expires_at > now {
                            tracing::warn!(
                                "message {} to {}: {detail}, though it has not expired: not taken",
                                row.msg,
                                row.name
                            );
                            last_error = Some(format!(
                                "{detail}, though it has not expired: not taken, trying again"
                            ));
                            let item = sealpost_proto::hex(&n.payload_hash);
                            self.found.push((Caught::Discarded, item));
                        } else {
                            last_error = Some(detail);
                            d.tick(now.max(d.expires_at));
                        }
                    }
                }
                tracing::info!(
                    "message {} to {}: {}",
                    row.msg,
                    row.name,
                    last_error.as_deref().unwrap_or("refused by the next relay")
                );
                updates.push((row.msg, row.recipient, d, last_error));
            }
        }
        self.agent.db.save_deliveries(&updates)?;
        Ok(())
    }

    /// Opens, classifies and stores one fetched batch. Returns when every
    /// outcome is durable.
    pub(super) fn process_batch(
        &mut self,
        payloads: Vec<Vec<u8>>,
        stats: &mut PassStats,
    ) -> Result<(), EngineError> {
        let opened = open_all(&self.agent.identity, &payloads);
        let now_s = self.clock.now_ms() / 1000;
        let mut to_store: Vec<(OpenedMessage, Vec<u8>)> = Vec::new();
        // What `to_store` holds, by sender and id: each item is looked up
        // in it (a scan of `to_store` made a batch's cost grow with the
        // square of its length; batches hold up to 4,096).
        let mut in_batch: std::collections::HashSet<ReceivedId> = std::collections::HashSet::new();
        let mut reports: Vec<PendingReport> = Vec::new();
        for (r, payload) in opened.into_iter().zip(&payloads) {
            let (verdict, caught) = match r {
                Err(e) => {
                    tracing::warn!("discarded a fetched item: {e}");
                    stats.discarded += 1;
                    (Verdict::Done, Some(Caught::Sealed(e.class())))
                }
                Ok((m, content)) => {
                    self.classify(m, content, now_s, &in_batch, &mut reports, stats)?
                }
            };
            if let Some(class) = caught {
                // Named by the BLAKE3 of the bytes as fetched, as a
                // hostile relay's fault log names them.
                let item = blake3::hash(payload).to_hex().to_string();
                self.found.push((class, item));
            }
            if let Verdict::Store(stored) = verdict {
                in_batch.insert(ReceivedId::of(&stored.0.header));
                to_store.push(*stored);
            }
        }
        drop(payloads);
        let contents: Vec<(&[u8], [u8; 32])> = to_store
            .iter()
            .map(|(m, c)| (&c[..], *m.content_hash.as_bytes()))
            .collect();
        tracing::trace!("batch: opened {}", contents.len());
        let locations: Vec<Location> = self.spool.append_verified(&contents)?;
        tracing::trace!("batch: stored and read back");
        let received_ms = self.clock.now_ms();
        let stored_at = received_ms / 1000;
        let mut entries = Vec::with_capacity(to_store.len());
        let mut downloads = Vec::new();
        let mut groups = Vec::new();
        let download_dir = self.agent.download_dir()?;
        for ((m, content), loc) in to_store.iter().zip(&locations) {
            let h = &m.header;
            entries.push((
                InboxEntry {
                    id: h.id,
                    sender: *h.sender.signing_bytes(),
                    kind: h.kind.name().to_owned(),
                    created_at: h.created_at,
                    expires_at: h.expires_at,
                    received_ms,
                    content_hash: *m.content_hash.as_bytes(),
                    content_len: m.content_len,
                    segment: loc.segment,
                    offset: loc.offset,
                    read_ms: None,
                    archived_ms: None,
                },
                self.agent.policy.remember_until(h.expires_at),
            ));
            let relay = self.reply_relay(&h.sender, h.reply_relay.as_ref())?;
            if h.kind == Kind::FileManifest {
                // Its receipt waits until the file itself is stored and
                // verified (see `run_downloads`).
                if let Ok(f) = sealpost_proto::manifest::FileManifest::decode(content) {
                    if let Some(g) = f.group {
                        groups.push((ReceivedId::of(h), g));
                    }
                    downloads.push(crate::outbox::Download {
                        msg: h.id,
                        sender: *h.sender.signing_bytes(),
                        agreement: *h.sender.agreement_bytes(),
                        relay,
                        blob_id: f.blob_id,
                        key: f.key.clone(),
                        size: f.layout.data_len,
                        chunk_size: f.layout.chunk_size,
                        padded_size: f.layout.plaintext_len,
                        plaintext_hash: *f.plaintext_hash.as_bytes(),
                        name: f.name.clone(),
                        dir: download_dir.to_string_lossy().into_owned(),
                        next_chunk: 0,
                        bad: Vec::new(),
                        attempts: 0,
                        state: DownloadState::Downloading,
                        final_path: None,
                        error: None,
                        changed_ms: received_ms,
                        local_errors: 0,
                    });
                }
                continue;
            }
            if let Some(relay) = relay {
                reports.push(PendingReport {
                    subject: *h.sender.signing_bytes(),
                    agreement: *h.sender.agreement_bytes(),
                    id: h.id,
                    relay,
                    reason: None,
                    content_hash: *m.content_hash.as_bytes(),
                    content_len: m.content_len,
                    stored_at,
                });
            }
        }
        let new = self
            .agent
            .db
            .record_inbox(&entries, &reports, &downloads, &groups, now_s)?;
        stats.delivered += new.len() as u64;
        stats.duplicates += (entries.len() - new.len()) as u64;
        self.flush_found(stats)?;
        for (m, _) in &to_store {
            let stored = new.contains(&ReceivedId::of(&m.header));
            if stored && m.header.kind == Kind::FileManifest {
                // The file itself is said when it is stored and verified.
                tracing::debug!(
                    "file announced in message {} from {}",
                    m.header.id,
                    self.agent.who(&m.header.sender)
                );
            } else if stored {
                tracing::info!(
                    "message {} ({} bytes) from {} stored in the inbox",
                    m.header.id,
                    m.content_len,
                    self.agent.who(&m.header.sender)
                );
            }
        }
        Ok(())
    }

    /// Where reports about a message from `sender` go: the relay it named
    /// in its signed header, or else the one in its pinned card.
    pub(super) fn reply_relay(
        &self,
        sender: &PublicIdentity,
        named: Option<&RelayPin>,
    ) -> Result<Option<String>, EngineError> {
        if let Some(pin) = named {
            return Ok(Some(address_of(pin).to_string()));
        }
        let contact = self.agent.db.contact_by_key(sender.signing_bytes())?;
        Ok(contact
            .and_then(|c| c.card.fields().relay.clone())
            .map(|p| address_of(&p).to_string()))
    }

    /// Reads what the agent knows about one opened message, decides
    /// ([`decide`]) and carries the decision out (`batch`: what this fetched
    /// batch stores already, by sender and id). Returns what to store and
    /// what the checks caught.
    pub(super) fn classify(
        &mut self,
        m: OpenedMessage,
        content: Vec<u8>,
        now_s: u64,
        batch: &std::collections::HashSet<ReceivedId>,
        reports: &mut Vec<PendingReport>,
        stats: &mut PassStats,
    ) -> Result<(Verdict, Option<Caught>), EngineError> {
        let h = &m.header;
        let key = ReceivedId::of(h);
        let contact = self
            .agent
            .db
            .contact_by_key(h.sender.signing_bytes())?
            .is_some_and(|c| c.card.public() == &h.sender);
        let stale = self.agent.policy.check(h, now_s).err();
        let content_kind = matches!(h.kind, Kind::Message | Kind::FileManifest);
        let (prev, download) = if content_kind {
            let prev = self.agent.db.inbox_entry(&key)?;
            let download = match &prev {
                Some(_) if h.kind == Kind::FileManifest => self.agent.db.download(&key)?,
                _ => None,
            };
            (prev, download)
        } else {
            (None, None)
        };
        let manifest = (h.kind == Kind::FileManifest).then(|| {
            match sealpost_proto::manifest::FileManifest::decode(&content) {
                Err(e) => (FileCheck::Malformed, e.to_string()),
                // Padding counts: it is downloaded like the file.
                Ok(f) if f.layout.plaintext_len > self.max_file => (
                    FileCheck::TooLarge,
                    format!(
                        "{} is {} bytes{}, more than the {} this agent takes (--max-file)",
                        f.name,
                        f.layout.data_len,
                        if f.layout.pad_len() > 0 {
                            format!(" (padded to {})", f.layout.plaintext_len)
                        } else {
                            String::new()
                        },
                        self.max_file
                    ),
                ),
                Ok(_) => (FileCheck::Fits, String::new()),
            }
        });
        let facts = Facts {
            kind: h.kind,
            contact,
            fresh: match &stale {
                None => Ok(()),
                Some(OpenError::FromFuture { .. }) => Err(Stale::FromTheFuture),
                Some(OpenError::NoExpiry) => Err(Stale::NoExpiry),
                Some(_) => Err(Stale::Expired),
            },
            seen: self.agent.db.replay_seen(&key)?,
            // Only this sender's: another sender's message under the same
            // id is another message (each sender chooses its own ids).
            stored: prev.as_ref().map(|_| {
                if h.kind == Kind::FileManifest {
                    Stored::File(download.as_ref().map(|d| d.state))
                } else {
                    Stored::Message
                }
            }),
            in_batch: content_kind && batch.contains(&key),
            file: manifest.as_ref().map(|(c, _)| *c),
        };
        let decision = decide(&facts);
        let who = self.agent.who(&h.sender);
        match decision {
            Decision::Store => return Ok((Verdict::Store(Box::new((m, content))), None)),
            Decision::ApplyReport => {
                // Remembered as acted on in the same commit as its effect.
                let caught = self.apply_report(&m, &content, now_s, stats)?;
                return Ok((Verdict::Done, caught));
            }
            Decision::ApplyRepair => {
                self.apply_repair(&m, &content)?;
                self.remember_control(&m.header, now_s)?;
            }
            Decision::ReceiptAgain => {
                stats.duplicates += 1;
                if let (Some(prev), Some(relay)) =
                    (prev, self.reply_relay(&h.sender, h.reply_relay.as_ref())?)
                {
                    reports.push(PendingReport {
                        subject: prev.sender,
                        agreement: *h.sender.agreement_bytes(),
                        id: prev.id,
                        relay,
                        reason: None,
                        content_hash: prev.content_hash,
                        content_len: prev.content_len,
                        stored_at: prev.received_ms / 1000,
                    });
                }
            }
            Decision::FileAgain { retry, receipt } => {
                // A file's receipt names the file: again if it is done,
                // later (when it is) otherwise.
                stats.duplicates += 1;
                if let Some(d) = download {
                    if retry {
                        self.agent.db.download_state(
                            &d.key(),
                            DownloadState::Downloading,
                            None,
                            self.clock.now_ms(),
                        )?;
                    }
                    if receipt {
                        if let Some(relay) = self.reply_relay(&h.sender, h.reply_relay.as_ref())? {
                            reports.push(d.receipt(relay, d.changed_ms / 1000));
                        }
                    }
                }
            }
            Decision::Reject(reason) => {
                stats.rejected += 1;
                match (reason, &stale, &manifest) {
                    (RejectReason::NotAContact, _, _) => {
                        tracing::warn!("rejected message {} from {who}: not a contact", h.id);
                        self.agent
                            .db
                            .note_refused_sender(h.sender.signing_bytes(), self.clock.now_ms())?;
                    }
                    (RejectReason::Malformed | RejectReason::TooLarge, _, Some((_, why))) => {
                        tracing::warn!("rejected file in message {} from {who}: {why}", h.id)
                    }
                    (_, Some(e), _) => tracing::warn!("rejected message {}: {e}", h.id),
                    _ => tracing::warn!("rejected message {}: {}", h.id, reason.name()),
                }
                if let Some(relay) = self.reply_relay(&h.sender, h.reply_relay.as_ref())? {
                    reports.push(PendingReport {
                        subject: *h.sender.signing_bytes(),
                        agreement: *h.sender.agreement_bytes(),
                        id: h.id,
                        relay,
                        reason: Some(reason),
                        content_hash: [0; 32],
                        content_len: 0,
                        stored_at: 0,
                    });
                }
            }
            Decision::Drop(d) => {
                match d {
                    Dropped::ControlReplayed | Dropped::RepeatedInBatch => {}
                    Dropped::ControlStale(_) => tracing::warn!(
                        "discarded a {} from {who}: {}",
                        h.kind.name(),
                        stale.as_ref().map_or_else(String::new, |e| e.to_string())
                    ),
                    Dropped::ControlFromStranger => tracing::warn!(
                        "discarded a {} from {who}, who is not a contact",
                        h.kind.name()
                    ),
                    Dropped::Replayed => {
                        tracing::warn!("discarded message {}: already opened (replayed)", h.id)
                    }
                }
                match d.caught() {
                    Caught::Duplicate => stats.duplicates += 1,
                    _ => stats.discarded += 1,
                }
            }
        }
        Ok((Verdict::Done, decision.caught()))
    }

    /// Records a control message as acted on, after its effect committed
    /// (a crash in between applies it again, which changes nothing).
    pub(super) fn remember_control(
        &mut self,
        h: &sealpost_proto::MessageHeader,
        now_s: u64,
    ) -> Result<(), EngineError> {
        let until = self.agent.policy.remember_until(h.expires_at);
        self.agent
            .db
            .replay_insert(&ReceivedId::of(h), until, now_s)?;
        Ok(())
    }

    /// Verifies a receipt or rejection and applies it to the outbox; the
    /// message that carried it is remembered as acted on (replay cache) in
    /// the same transaction, or alone if it changes nothing.
    pub(super) fn apply_report(
        &mut self,
        m: &OpenedMessage,
        content: &[u8],
        now_s: u64,
        stats: &mut PassStats,
    ) -> Result<Option<Caught>, EngineError> {
        let report = match Report::decode(content) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    "forged or damaged {} from {}: {e}",
                    m.header.kind.name(),
                    self.agent.who(&m.header.sender)
                );
                stats.forged_reports += 1;
                self.remember_control(&m.header, now_s)?;
                return Ok(Some(Caught::ForgedReport));
            }
        };
        let kind_matches = matches!(
            (m.header.kind, report.entries()),
            (Kind::Receipt, Entries::Receipt(_)) | (Kind::Rejection, Entries::Rejection(_))
        );
        if !kind_matches
            || !report.signed_by(&m.header.sender)
            || !report.is_about(self.agent.identity.public())
        {
            tracing::warn!(
                "forged {}: not signed by its sender {} about our messages",
                m.header.kind.name(),
                self.agent.who(&m.header.sender)
            );
            stats.forged_reports += 1;
            self.remember_control(&m.header, now_s)?;
            return Ok(Some(Caught::ForgedReport));
        }
        let applied = self.agent.db.apply_report(
            m.header.sender.signing_bytes(),
            &report,
            self.clock.now_ms(),
            (
                &ReceivedId::of(&m.header),
                self.agent.policy.remember_until(m.header.expires_at),
            ),
        )?;
        let mut caught = None;
        for a in applied {
            match a.outcome {
                Some(Outcome::Changed) => match report.entries() {
                    Entries::Receipt(_) => stats.confirmed += 1,
                    Entries::Rejection(_) => {
                        stats.bounced += 1;
                        tracing::warn!("message {} was rejected by its recipient", a.id);
                    }
                },
                Some(Outcome::Ignored) => {}
                Some(Outcome::Mismatch) => {
                    // Signed by the recipient, about our message, but not
                    // about what we sent: it stored something else (or
                    // claims to). Not delivered; recorded as caught.
                    tracing::error!(
                        "receipt for message {} names a different hash or length than was sent; not counted as delivered",
                        a.id
                    );
                    caught = Some(Caught::ReceiptMismatch);
                }
                None => {
                    tracing::warn!(
                        "{} names message {}, which we never sent to its signer",
                        report.kind_name(),
                        a.id
                    );
                    stats.forged_reports += 1;
                    caught = Some(Caught::ForgedReport);
                }
            }
        }
        Ok(caught)
    }
}
