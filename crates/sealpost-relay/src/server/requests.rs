//! Requests that store: submissions, blob pieces (in lanes of runs) and blob status, and the signed refusals they may earn.

use super::*;

pub(crate) fn refusal(
    s: &Shared,
    code: RefusalCode,
    mailbox: MailboxId,
    hash: [u8; 32],
) -> Response {
    s.metrics.refused.fetch_add(1, Ordering::Relaxed);
    if let Some(c) = s.metrics.refused_by_code.get(code.code() as usize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    Response::Refused(signed_refusal(&s.key, code, mailbox, hash))
}

pub(crate) fn signed_refusal(
    key: &SigningKey,
    code: RefusalCode,
    mailbox: MailboxId,
    hash: [u8; 32],
) -> Refusal {
    let at = now();
    let mut msg = context::REFUSAL.to_vec();
    msg.extend_from_slice(&Refusal::signed_bytes(code, at, &mailbox, &hash));
    Refusal {
        code,
        at,
        mailbox,
        payload_hash: hash,
        signature: key.sign(&msg).to_bytes(),
    }
}

/// A refusal a tampering relay makes up (see [`crate::tamper`]).
pub(crate) fn forged_refusal(
    s: &Shared,
    how: ForgedRefusal,
    mailbox: MailboxId,
    hash: [u8; 32],
) -> Response {
    let code = RefusalCode::OverQuota;
    let r = match how {
        ForgedRefusal::OtherKey => {
            let mut k = [0u8; 32];
            OsRng.fill_bytes(&mut k);
            signed_refusal(&SigningKey::from_bytes(&k), code, mailbox, hash)
        }
        ForgedRefusal::OtherHash => {
            let mut h = hash;
            h[0] ^= 0x80;
            signed_refusal(&s.key, code, mailbox, h)
        }
        ForgedRefusal::OtherMailbox => {
            let mut m = mailbox;
            m.0[0] ^= 0x80;
            signed_refusal(&s.key, code, m, hash)
        }
    };
    Response::Refused(r)
}

/// The answer to a `BlobStatus`: the stored length (0 for an unknown blob).
pub(crate) async fn blob_status_answer(
    out: &Out,
    id: u32,
    status: Result<Option<(u64, bool, MailboxId)>, sealpost_store::StoreError>,
) -> io::Result<()> {
    match status {
        Ok(Some((stored, complete, _))) => {
            send(out, id, Response::BlobStored { stored, complete }).await
        }
        Ok(None) => {
            send(
                out,
                id,
                Response::BlobStored {
                    stored: 0,
                    complete: false,
                },
            )
            .await
        }
        Err(e) => send(out, id, err(ErrorCode::Internal, e.to_string())).await,
    }
}

/// Starts a connection's blob lane: pieces wait in its queue (their bytes
/// are bounded by the in-flight permits they hold); the lane takes all
/// that are waiting at once, so consecutive pieces share one fdatasync and
/// one commit, and answers each in order.
pub(crate) fn start_lane(
    s: &Arc<Shared>,
    out: &Out,
    source: Source,
) -> (mpsc::Sender<BlobJob>, tokio::task::JoinHandle<()>) {
    let (blob_lane, mut lane_rx) = mpsc::channel::<BlobJob>(LANE_RUN);
    let (s, out) = (s.clone(), out.clone());
    let task = tokio::spawn(async move {
        let mut jobs = Vec::with_capacity(LANE_RUN);
        while lane_rx.recv_many(&mut jobs, LANE_RUN).await > 0 {
            let ids: Vec<u32> = jobs.iter().map(|j| j.id).collect();
            // A piece this relay forwards is stored as a blob of its
            // sender's mailbox; it streams on as it arrives.
            let forwarded = jobs.iter().any(|j| j.named != j.put.mailbox);
            let (puts, permits): (Vec<_>, Vec<_>) = jobs
                .drain(..)
                .map(|j| ((j.put, j.named), j._permits))
                .unzip();
            let answers = blob_put_many(&s, puts, source).await;
            drop(permits);
            if forwarded {
                s.forward_wake.notify_one();
            }
            let mut gone = false;
            for (id, r) in ids.into_iter().zip(answers) {
                if send(&out, id, r).await.is_err() {
                    gone = true;
                    break;
                }
            }
            if gone {
                break;
            }
        }
    });
    (blob_lane, task)
}

/// Pieces a connection's lane stores at once, at most.
pub(crate) const LANE_RUN: usize = 8;

/// Stores blob pieces in order (from the connection's lane): runs of
/// consecutive pieces with one fdatasync and one commit (the store's
/// `blob_put_many`); an answer per piece. Each piece comes with the
/// mailbox its refusal names: the request's, which for a piece this relay
/// forwards is not the mailbox it is stored in (§6.8).
pub(crate) async fn blob_put_many(
    s: &Shared,
    pieces: Vec<(BlobPiece, MailboxId)>,
    source: Source,
) -> Vec<Response> {
    let mut answers = Vec::with_capacity(pieces.len());
    let mut run: Vec<(BlobPiece, MailboxId)> = Vec::with_capacity(pieces.len());
    for (p, named) in pieces {
        let forged = s
            .config
            .tamper
            .as_ref()
            .and_then(|t| t.blob_put(&p.blob_id, &p.mailbox, p.offset));
        match forged {
            None => run.push((p, named)),
            Some(forged) => {
                // What came before is stored first, as it would have been
                // piece by piece.
                store_run(s, std::mem::take(&mut run), source, &mut answers).await;
                answers.push(forged_refusal(s, forged, named, p.refusal_hash()));
                sealpost_proto::buffers::give(p.data);
            }
        }
    }
    store_run(s, run, source, &mut answers).await;
    answers
}

/// Stores `run` (pieces no hook refused) and appends an answer per piece.
pub(crate) async fn store_run(
    s: &Shared,
    run: Vec<(BlobPiece, MailboxId)>,
    source: Source,
    answers: &mut Vec<Response>,
) {
    if run.is_empty() {
        return;
    }
    // A refusal names the piece (§6.5).
    let named: Vec<(MailboxId, [u8; 32], u64)> = run
        .iter()
        .map(|(p, named)| (*named, p.refusal_hash(), p.data.len() as u64))
        .collect();
    // Stored under the blob's key within its mailbox (§6.6): resolved once
    // per blob of the run (its pieces are consecutive).
    let mut run: Vec<BlobPiece> = run.into_iter().map(|(p, _)| p).collect();
    let mut last: Option<(relay::BlobId, MailboxId, relay::BlobId)> = None;
    for p in run.iter_mut() {
        let key = match last {
            Some((id, mb, k)) if id == p.blob_id && mb == p.mailbox => Ok(k),
            _ => s.store.blob_key(&p.blob_id, &p.mailbox).await,
        };
        match key {
            Ok(k) => {
                last = Some((p.blob_id, p.mailbox, k));
                p.blob_id = k;
            }
            Err(e) => {
                for _ in &named {
                    answers.push(storage_failed(s, &e));
                }
                for p in run {
                    sealpost_proto::buffers::give(p.data);
                }
                return;
            }
        }
    }
    let outcomes = s.store.blob_put_many(run, source, now()).await;
    for ((mailbox, refused, n), r) in named.into_iter().zip(outcomes) {
        answers.push(match r {
            Ok(BlobPutOutcome::Stored { stored, complete }) => {
                s.metrics.blob_bytes.fetch_add(n, Ordering::Relaxed);
                Response::BlobStored { stored, complete }
            }
            Ok(BlobPutOutcome::WrongOffset { stored }) => Response::BlobStored {
                stored,
                complete: false,
            },
            Ok(BlobPutOutcome::Refused(code)) => refusal(s, code, mailbox, refused),
            Ok(BlobPutOutcome::HashMismatch) => err(
                ErrorCode::BlobHashMismatch,
                "the blob does not match its stated BLAKE3; it was discarded, upload it again",
            ),
            Err(e) => storage_failed(s, &e),
        });
    }
}

/// The refusal a submission's payload earns before anything is stored
/// (above the message limit, or not matching its hash), if any: the same
/// checks for a `Submit` and a `Forward`.
pub(crate) fn payload_refused(
    s: &Shared,
    mailbox: MailboxId,
    hash: [u8; 32],
    payload: &[u8],
) -> Option<Response> {
    if payload.len() > s.config.max_message.min(relay::MAX_MESSAGE) {
        return Some(refusal(s, RefusalCode::TooLarge, mailbox, hash));
    }
    if blake3::hash(payload).as_bytes() != &hash {
        return Some(refusal(s, RefusalCode::HashMismatch, mailbox, hash));
    }
    None
}

/// `Accepted` with a fresh random item id (§6.4).
pub(crate) fn accepted() -> Response {
    let mut item_id = [0u8; 16];
    OsRng.fill_bytes(&mut item_id);
    Response::Accepted { item_id }
}

pub(crate) async fn submit(
    s: &Shared,
    source: Source,
    mailbox: MailboxId,
    expires_at: u64,
    hash: [u8; 32],
    payload: Vec<u8>,
) -> Response {
    if let Some(r) = payload_refused(s, mailbox, hash, &payload) {
        return r;
    }
    let mut mailbox = mailbox;
    if let Some(t) = &s.config.tamper {
        match t.submit(&mailbox, &hash, &payload) {
            OnSubmit::Store => {}
            OnSubmit::Drop => return accepted(),
            OnSubmit::Redirect(other) => mailbox = other,
            OnSubmit::Forge(how) => return forged_refusal(s, how, mailbox, hash),
        }
    }
    let len = payload.len() as u64;
    match s
        .store
        .submit(mailbox, expires_at, hash, payload, source, now())
        .await
    {
        // Subscribers are told by the store's notifier.
        Ok(SubmitOutcome::Stored { item_id, .. }) => {
            s.metrics.accepted.fetch_add(1, Ordering::Relaxed);
            s.metrics.accepted_bytes.fetch_add(len, Ordering::Relaxed);
            Response::Accepted { item_id }
        }
        Ok(SubmitOutcome::Refused(code)) => refusal(s, code, mailbox, hash),
        Err(e) => storage_failed(s, &e),
    }
}

/// A write the store could not make: counted, logged (at most once every
/// 10 s, with how many since), and answered in words the client can pass
/// on ("the relay's disk is full"), as a transient error (8, retry later).
pub(crate) fn storage_failed(s: &Shared, e: &sealpost_store::StoreError) -> Response {
    if e.is_storage() {
        let n = s.metrics.storage_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now();
        let last = s.metrics.storage_error_logged_at.load(Ordering::Relaxed);
        if now >= last + 10
            && s.metrics
                .storage_error_logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!("storage error (nothing acknowledged; {n} so far): {e}");
        }
    }
    err(ErrorCode::Internal, e.to_string())
}
