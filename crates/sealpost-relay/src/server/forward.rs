//! Forwarding (PROTOCOL 6.8): `Forward` requests taken into the durable
//! forward queue for this relay's own mailbox owners (or stored here when
//! they name this relay), and the worker that hands queued items on to
//! the next relay, retrying with backoff until it takes them or they
//! expire, and that tells the sender, in a signed notice in its mailbox,
//! when an item ended otherwise.

use super::*;
use sealpost_client::client::{ClientError, RelayClient, Submitted, Timeouts};
use sealpost_client::transport::{Tcp, Transport};
use sealpost_proto::notice::{self, Notice};
use sealpost_proto::relay::{BlobForward, BlobPiece, Forward, NextHop, MAX_HOPS};
use sealpost_proto::retry::Backoff;
use sealpost_store::{Ended, Enqueued, NewItem, Queued};

/// How a relay hands items on to other relays.
#[derive(Clone, Debug)]
pub struct Forwarding {
    /// Whether this relay forwards for its mailbox owners at all (a relay
    /// MAY, PROTOCOL 12); off, a `Forward` to another relay is refused
    /// with code 6 and the owners' agents submit there themselves.
    pub enabled: bool,
    /// How the next relay is reached (TCP; a net in memory in tests).
    pub transport: Arc<dyn Transport>,
    /// Waits between attempts of one item: `base * 2^attempts`, capped,
    /// with jitter.
    pub retry: Backoff,
    /// Connecting to the next relay, and each of its answers.
    pub timeouts: Timeouts,
    /// How often the queue is looked at when nothing woke the worker
    /// (items put off become due; another node may have queued some).
    pub poll: Duration,
    /// Items handed on per pass, at most…
    pub batch: usize,
    /// …and payload bytes per pass, at most (what the worker holds in
    /// memory at once; at least one item).
    pub batch_bytes: usize,
    /// How long a notice waits in the sender's mailbox.
    pub notice_lifetime: Duration,
    /// An outbound gateway: a relay this one hands everything it
    /// forwards to, as that relay's mailbox owner (with its relay key),
    /// instead of to each next relay; the gateway hands it on. Its notices
    /// (in this relay's mailbox there) come back to the senders here.
    pub via: Option<RelayAddress>,
}

impl Default for Forwarding {
    fn default() -> Self {
        Self {
            enabled: true,
            transport: Arc::new(Tcp),
            retry: Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(600),
            },
            timeouts: Timeouts {
                connect: Duration::from_secs(10),
                request: Duration::from_secs(60),
            },
            poll: Duration::from_secs(1),
            batch: 512,
            batch_bytes: 16 << 20,
            notice_lifetime: Duration::from_secs(30 * 86_400),
            via: None,
        }
    }
}

/// The answer to a `Forward`: stored here if it names this relay (as a
/// `Submit`), queued for the next relay if this connection is one of this
/// relay's mailbox owners, refused otherwise (this is not an open relay).
pub(crate) async fn forward_request(
    s: &Arc<Shared>,
    source: Source,
    origin: Option<MailboxId>,
    f: Forward,
) -> Response {
    if f.next.pin == s.pin.0 {
        // The last hop: delivered like any submission.
        return submit(
            s,
            source,
            f.mailbox,
            f.expires_at,
            f.payload_hash,
            f.payload,
        )
        .await;
    }
    let Some(origin) = forwards_for(s, f.hops, origin) else {
        return refusal(s, RefusalCode::NotForwarded, f.mailbox, f.payload_hash);
    };
    if let Some(r) = payload_refused(s, f.mailbox, f.payload_hash, &f.payload) {
        return r;
    }
    let (mailbox, hash) = (f.mailbox, f.payload_hash);
    let dropped = s
        .config
        .tamper
        .as_ref()
        .is_some_and(|t| t.forward(&mailbox, &hash) == crate::tamper::OnForward::Drop);
    if dropped {
        return accepted();
    }
    match s.store.forward_enqueue(origin, f, None, now()).await {
        Ok(Enqueued::Queued { .. }) => {
            s.metrics.forward_queued.fetch_add(1, Ordering::Relaxed);
            s.forward_wake.notify_one();
            accepted()
        }
        Ok(Enqueued::Refused(code)) => refusal(s, code, mailbox, hash),
        Err(e) => storage_failed(s, &e),
    }
}

/// The mailbox this relay forwards a `Forward` or `BlobForward` for: the
/// connection's own, if it is one of this relay's owners, forwarding is
/// on and the hop count is below the limit (§6.8); else none (code 6).
fn forwards_for(s: &Shared, hops: u8, origin: Option<MailboxId>) -> Option<MailboxId> {
    (hops < MAX_HOPS && s.config.forwarding.enabled)
        .then_some(origin)
        .flatten()
}

/// The checks of a `BlobForward` to another relay (§6.8): refused with
/// code 6 as a `Forward` is (hops, forwarding off, not a mailbox owner);
/// else its blob is queued to forward with its first piece (before that
/// piece is stored, once however often it comes) and the piece is stored
/// as a blob of the sender's mailbox: the mailbox returned.
pub(crate) async fn forward_blob_request(
    s: &Arc<Shared>,
    source: Source,
    origin: Option<MailboxId>,
    f: &BlobForward,
) -> Result<MailboxId, Response> {
    let p = &f.piece;
    let refused = |code| refusal(s, code, p.mailbox, p.refusal_hash());
    let Some(origin) = forwards_for(s, f.hops, origin) else {
        return Err(refused(RefusalCode::NotForwarded));
    };
    if p.offset != 0 {
        return Ok(origin);
    }
    // What storing the first piece would refuse is refused before the
    // blob is queued, so that an owner cannot fill the queue with blobs
    // that never come (a new blob counts whole in its mailbox's quota).
    let now = now();
    if p.total_len > s.store.limits().max_blob {
        return Err(refused(RefusalCode::TooLarge));
    }
    if p.expires_at <= now {
        return Err(refused(RefusalCode::Expired));
    }
    let local = s
        .store
        .blob_key(&p.blob_id, &origin)
        .await
        .map_err(|e| storage_failed(s, &e))?;
    let exists = s
        .store
        .ledger()
        .blob(local)
        .await
        .map_err(|e| storage_failed(s, &e))?
        .is_some();
    if !exists {
        // The quota and this source's share of it, as the store checks
        // them when the piece comes.
        let fail = |e: sealpost_store::StoreError| storage_failed(s, &e);
        let use_ = s.store.status(&origin).await.map_err(fail)?;
        let share = s.store.share_used(&origin, &source).await.map_err(fail)?;
        let limit = s.store.limits().source_share(use_.quota);
        if use_.used.saturating_add(p.total_len) > use_.quota
            || share.saturating_add(p.total_len) > limit
        {
            return Err(refused(RefusalCode::OverQuota));
        }
    }
    let entry = Forward {
        hops: f.hops,
        next: f.next.clone(),
        mailbox: p.mailbox,
        expires_at: p.expires_at,
        payload_hash: p.refusal_hash(),
        payload: Vec::new(),
    };
    match s
        .store
        .forward_enqueue(origin, entry, Some((p.blob_id, p.total_len)), now)
        .await
    {
        Ok(Enqueued::Queued { .. }) => {
            // A copy kept after handing it on to another recipient's
            // relay lives as long as this one needs it.
            if exists {
                if let Err(e) = s.store.blob_expire(local, origin, p.expires_at).await {
                    return Err(storage_failed(s, &e));
                }
            }
            Ok(origin)
        }
        Ok(Enqueued::Refused(code)) => Err(refused(code)),
        Err(e) => Err(storage_failed(s, &e)),
    }
}

/// Hands queued items on, forever: each pass takes what is due, ends the
/// expired with a notice, and sends the rest to their next relays, one
/// connection per next relay. Between passes it waits for a new item or
/// the poll interval.
pub(crate) async fn forward_loop(s: Arc<Shared>) {
    let cfg = s.config.forwarding.clone();
    // The tasks handing items on: dropped (so aborted) with this loop
    // when the relay stops.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let now = now();
        let due = match s.store.forward_due(now, cfg.batch, cfg.batch_bytes).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("reading the forward queue failed: {e}");
                tokio::time::sleep(cfg.poll.max(Duration::from_secs(1))).await;
                continue;
            }
        };
        if due.is_empty() {
            tokio::select! {
                _ = s.forward_wake.notified() => {}
                _ = tokio::time::sleep(cfg.poll) => {}
            }
            continue;
        }
        let mut hops: Vec<(Lane, Vec<Queued>)> = Vec::new();
        let mut ended = 0usize;
        for q in due {
            if q.item.expires_at <= now {
                give_up(&s, q, now).await;
                ended += 1;
                continue;
            }
            // A next relay already being handed items (or blobs) keeps
            // its own: they are taken by the next pass after it is done.
            let lane = (q.item.next.clone(), q.blob.is_some());
            if busy_with(&s, &lane) {
                continue;
            }
            match hops.iter_mut().find(|(h, _)| *h == lane) {
                Some((_, v)) => v.push(q),
                None => hops.push((lane, vec![q])),
            }
        }
        // Next relays in parallel, each on a task of its own (and its
        // blobs on another, so that a long blob does not hold up the
        // items, a file's manifest among them): one that does not answer
        // holds up only its own items, for at most the connect and
        // request timeouts.
        let mut started = 0usize;
        for (hop, items) in hops {
            // On a shared ledger, one node hands a lane on at a time.
            match s
                .store
                .lane_claim(hop.0.clone(), hop.1, now, now + LANE_LEASE.as_secs())
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!("claiming a forward lane failed: {e}");
                    continue;
                }
            }
            started += 1;
            if let Ok(mut b) = s.forward_busy.lock() {
                b.insert(hop.clone());
            }
            let s = s.clone();
            tasks.spawn(async move {
                {
                    let work = hand_on(&s, hop.clone(), items);
                    tokio::pin!(work);
                    let mut renew = tokio::time::interval(LANE_LEASE / 3);
                    renew.tick().await;
                    loop {
                        tokio::select! {
                            _ = &mut work => break,
                            _ = renew.tick() => {
                                let t = super::now();
                                match s.store.lane_claim(hop.0.clone(), hop.1, t, t + LANE_LEASE.as_secs()).await {
                                    Ok(true) => {}
                                    Ok(false) => tracing::warn!("another relay node took over forwarding to {} (this one held it past its lease)", hop.0.addr),
                                    Err(e) => tracing::warn!("renewing a forward lane failed: {e}"),
                                }
                            }
                        }
                    }
                }
                if let Err(e) = s.store.lane_release(hop.0.clone(), hop.1).await {
                    tracing::debug!("releasing a forward lane failed: {e}");
                }
                if let Ok(mut b) = s.forward_busy.lock() {
                    b.remove(&hop);
                }
                s.forward_wake.notify_one();
            });
        }
        if started == 0 && ended == 0 {
            // Everything due waits for a busy next relay.
            tokio::select! {
                _ = s.forward_wake.notified() => {}
                _ = tokio::time::sleep(cfg.poll) => {}
            }
        }
    }
}

/// How long a node's claim on a lane lasts unless renewed (it renews a
/// third of the way in while it works): a node that dies holding lanes
/// leaves them to the others this long after.
const LANE_LEASE: Duration = Duration::from_secs(60);

/// What is handed to one next relay on one task and connection: its
/// items (`false`) or its blobs (`true`).
pub(crate) type Lane = (NextHop, bool);

/// Whether `lane` is being handed on now.
fn busy_with(s: &Shared, lane: &Lane) -> bool {
    s.forward_busy
        .lock()
        .map(|b| b.contains(lane))
        .unwrap_or(false)
}

/// Sends the items of one lane to their next relay on one connection,
/// proving this relay's key first; ends each one the next relay answered
/// for. Items go pipelined; blobs one after the other.
async fn hand_on(s: &Arc<Shared>, lane: Lane, items: Vec<Queued>) {
    if lane.1 {
        for q in items {
            hand_on_blob(s, &lane, q).await;
        }
    } else {
        hand_on_items(s, &lane, items).await;
    }
}

/// Pieces of a blob in flight to the next relay, at most (each up to
/// 1 MiB: what a relay holds per blob it forwards; more did not go faster
/// here and took 8 MiB more).
const BLOB_WINDOW: usize = 4;

/// How long a blob whose sender is still uploading is followed on one
/// attempt after everything held was sent (then it waits its turn again).
const STREAM_FOLLOW: Duration = Duration::from_secs(2);

/// Hands a blob on from where the next relay stands to what this relay
/// holds (its sender may still be uploading: then it follows the upload
/// for up to [`STREAM_FOLLOW`] and looks again a second later), reading it
/// from the store a piece at a time; ends it once the next relay holds it
/// whole, and lets this relay's copy go after.
async fn hand_on_blob(s: &Arc<Shared>, lane: &Lane, q: Queued) {
    let hop = &lane.0;
    let Some((blob_id, total)) = q.blob else {
        return;
    };
    // This relay's copy: a blob of the sender's mailbox (§6.6).
    let local = match s.store.blob_key(&blob_id, &q.origin).await {
        Ok(k) => k,
        Err(e) => return later(s, std::slice::from_ref(&q), &e.to_string()).await,
    };
    let here = match s.store.ledger().blob(local).await {
        Ok(b) => b.filter(|b| b.mailbox == q.origin),
        Err(e) => return later(s, std::slice::from_ref(&q), &e.to_string()).await,
    };
    let Some(here) = here else {
        // Queued with a first piece that was then not stored (a crash
        // between the two, or a refusal the checks before queueing did
        // not foresee): waited for a while, then given up.
        if now().saturating_sub(q.received_at) > KEEP_COPY {
            let ended = notice::Ended::GaveUp {
                attempts: q.attempts,
                error: "the sender's upload of the blob never began here".into(),
            };
            s.metrics.forward_given_up.fetch_add(1, Ordering::Relaxed);
            return end_with_notice(s, &q, None, ended, now()).await;
        }
        return wait(s, &q, "waiting for the sender to upload the blob".into()).await;
    };
    // Nothing new since the last attempt, which the next relay took:
    // nothing to ask it.
    let known = s
        .forward_blobs
        .lock()
        .ok()
        .and_then(|m| m.get(&(blob_id, q.item.mailbox)).copied());
    if !here.complete && known.is_some_and(|k| k >= here.stored) {
        return wait(s, &q, waiting_words(here.stored, total)).await;
    }
    let mut peer = match take_peer(s, lane) {
        Some(p) => p,
        None => match connect_peer(s, hop).await {
            Ok(p) => p,
            Err(e) => return later(s, std::slice::from_ref(&q), &e).await,
        },
    };
    // At a gateway the blob is one of this relay's mailbox there (§6.8).
    let named = s.config.forwarding.via.is_none().then_some(q.item.mailbox);
    let status = match peer.client.blob_status_of(blob_id, named).await {
        Ok(v) => v,
        // A kept connection the next relay closed meanwhile.
        Err(ClientError::Closed | ClientError::Io(_)) => {
            peer = match connect_peer(s, hop).await {
                Ok(p) => p,
                Err(e) => return later(s, std::slice::from_ref(&q), &e).await,
            };
            match peer.client.blob_status_of(blob_id, named).await {
                Ok(v) => v,
                Err(e) => return later(s, std::slice::from_ref(&q), &e.to_string()).await,
            }
        }
        Err(e) => return later(s, std::slice::from_ref(&q), &e.to_string()).await,
    };
    let (mut there, mut complete) = status;
    let mut in_flight = std::collections::VecDeque::with_capacity(BLOB_WINDOW);
    let mut at = there;
    let mut failure: Option<String> = None;
    let mut lost = false;
    let mut here = here;
    // Since when nothing new arrived from the sender while everything
    // held here was sent.
    let mut idle: Option<std::time::Instant> = None;
    while !complete {
        while in_flight.len() < BLOB_WINDOW && at < here.stored {
            let n = (here.stored - at).min(relay::MAX_BLOB_PIECE as u64) as usize;
            let data = match read_piece(s, local, at, n).await {
                Ok(d) => d,
                Err(e) => {
                    failure = Some(format!("reading the blob: {e}"));
                    break;
                }
            };
            let end = at + n as u64;
            let piece = BlobPiece {
                blob_id,
                mailbox: q.item.mailbox,
                total_len: total,
                blob_hash: if end == total { here.hash } else { [0; 32] },
                expires_at: q.item.expires_at,
                offset: at,
                data,
            };
            let hops = q.item.hops.saturating_add(1);
            let p = peer
                .client
                .blob_forward_send(hops, hop.clone(), piece)
                .await;
            in_flight.push_back((at, end, p));
            at = end;
        }
        if failure.is_some() {
            break;
        }
        let Some((offset, end, p)) = in_flight.pop_front() else {
            // Everything held here was sent: the sender is still
            // uploading. Follow it closely for a while (the next relay,
            // and the recipient reading there, get the blob as it
            // streams in), then leave it to a later attempt.
            if here.complete {
                failure = Some(format!(
                    "the next relay holds {there} of {total} bytes after the last piece"
                ));
                break;
            }
            let since = *idle.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > STREAM_FOLLOW {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            match s.store.ledger().blob(local).await {
                Ok(Some(b)) if b.mailbox == q.origin => {
                    if b.stored > here.stored {
                        idle = None;
                    }
                    here = b;
                }
                Ok(_) => {
                    failure = Some("the blob is gone here".into());
                    break;
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
            continue;
        };
        match peer.client.blob_put_answer(p).await {
            Ok(Ok((stored, done))) => {
                s.metrics
                    .forward_blob_bytes
                    .fetch_add(stored.saturating_sub(there), Ordering::Relaxed);
                (there, complete) = (stored.max(there), done);
                if !done && stored != end {
                    // The next relay holds another length: start again
                    // from there next time.
                    failure = Some(format!("the next relay holds {stored} bytes"));
                    break;
                }
            }
            Ok(Err(Submitted::Refused(r))) if !r.code.is_lasting() => {
                failure = Some(format!("the next relay refused: {}", r.code.describe()));
                break;
            }
            Ok(Err(Submitted::Refused(r))) if s.config.forwarding.via.is_some() => {
                failure = Some(format!("the gateway refused: {}", r.code.describe()));
                break;
            }
            Ok(Err(Submitted::Refused(refusal))) => {
                let ended = refused_by_next(s, hop, "blob", peer.next_key, &peer.binding, refusal);
                keep_peer(s, lane, peer);
                end_with_notice(s, &q, Some(offset), ended, now()).await;
                return drop_copy(s, &q).await;
            }
            Ok(Err(Submitted::Accepted { .. })) => {
                failure = Some("the next relay answered a piece as an item".into());
                break;
            }
            Err(e) => {
                lost = matches!(e, ClientError::Closed | ClientError::Io(_));
                failure = Some(e.to_string());
                break;
            }
        }
    }
    // Pieces still in flight after a failure are not waited for; their
    // answers go to requests no one waits for.
    if !lost {
        keep_peer(s, lane, peer);
    }
    if let Ok(mut m) = s.forward_blobs.lock() {
        if complete {
            m.remove(&(blob_id, q.item.mailbox));
        } else {
            m.insert((blob_id, q.item.mailbox), there);
        }
    }
    if complete {
        s.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
        let ended = if s.config.forwarding.via.is_some() {
            let until = q.item.expires_at.saturating_add(HANDED_GRACE);
            s.store.forward_handed(q.id, until).await
        } else {
            s.store.forward_end(q.id, None).await
        };
        match ended {
            Ok(_) => drop_copy(s, &q).await,
            Err(e) => tracing::warn!("ending a forwarded blob failed: {e}"),
        }
        return;
    }
    match failure {
        Some(e) => later(s, std::slice::from_ref(&q), &e).await,
        None => wait(s, &q, waiting_words(here.stored, total)).await,
    }
}

/// `n` bytes of a blob this relay forwards, from `at`: from the pieces
/// still in memory since they were stored when they are (a blob streamed
/// on as it arrives), else from the blob store on a blocking thread.
async fn read_piece(
    s: &Shared,
    blob_id: relay::BlobId,
    at: u64,
    n: usize,
) -> Result<Vec<u8>, String> {
    let mut data = sealpost_proto::buffers::take(n);
    if let Some((piece, range)) = s.store.blob_kept(&blob_id, at, n) {
        if range.len() == n {
            data.extend_from_slice(&piece[range]);
            return Ok(data);
        }
    }
    let store = s.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        store
            .blob_read_disk(&blob_id, at, n, &mut data)
            .map(|()| data)
    })
    .await;
    match read {
        Ok(Ok(d)) if d.len() == n => Ok(d),
        Ok(Ok(_)) => Err("short read".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn waiting_words(here: u64, total: u64) -> String {
    format!("waiting for the sender's upload ({here} of {total} bytes here)")
}

/// Puts a blob off for a second without counting a failed attempt: its
/// sender is still uploading it (or has not begun).
async fn wait(s: &Shared, q: &Queued, why: String) {
    if let Err(e) = s
        .store
        .forward_later(vec![q.id], now() + 1, why, false)
        .await
    {
        tracing::warn!("putting a forwarded blob off failed: {e}");
    }
}

/// How long a forwarding relay keeps its copy of a blob after its last
/// entry ended: a file for several recipients is queued for each with its
/// first piece, which the sender's agent may send for the next recipient
/// after the first one's relay already holds the blob.
pub(crate) const KEEP_COPY: u64 = 600;

/// Lets this relay's copy of a forwarded blob go once its last entry
/// ended (after, never before): it expires [`KEEP_COPY`] seconds later,
/// unless another recipient's entry is queued meanwhile. A blob sent to
/// several mailboxes is queued once for each.
async fn drop_copy(s: &Shared, q: &Queued) {
    if let Some((blob_id, _)) = q.blob {
        if !matches!(s.store.forward_blob_queued(blob_id).await, Ok(false)) {
            return;
        }
        let local = match s.store.blob_key(&blob_id, &q.origin).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("letting a forwarded blob's copy go failed (it expires): {e}");
                return;
            }
        };
        let until = (now() + KEEP_COPY).min(q.item.expires_at);
        if let Err(e) = s.store.blob_expire(local, q.origin, until).await {
            tracing::warn!("shortening a forwarded blob's copy's life failed (it expires): {e}");
        }
        // Another recipient's entry queued meanwhile keeps it.
        if matches!(s.store.forward_blob_queued(blob_id).await, Ok(true)) {
            let _ = s
                .store
                .blob_expire(local, q.origin, q.item.expires_at)
                .await;
        }
        if let Ok(mut m) = s.forward_blobs.lock() {
            m.remove(&(blob_id, q.item.mailbox));
        }
    }
}

/// Sends queued messages to `hop` on one connection, pipelined.
async fn hand_on_items(s: &Arc<Shared>, lane: &Lane, items: Vec<Queued>) {
    let (items, replay) = tampered(s, items).await;
    if items.is_empty() {
        return;
    }
    let hop = lane.0.clone();
    let mut outgoing: Vec<Forward> = items
        .iter()
        .map(|q| Forward {
            hops: q.item.hops.saturating_add(1),
            ..q.item.clone()
        })
        .collect();
    // A connection kept from an earlier pass, if it is recent; one the
    // next relay closed meanwhile (it closes idle ones) fails every
    // request at once, and the items go again on a new connection.
    let kept = take_peer(s, lane);
    let reused = kept.is_some();
    let peer = match kept {
        Some(p) => p,
        None => match connect_peer(s, &hop).await {
            Ok(p) => p,
            Err(e) => return later(s, &items, &e).await,
        },
    };
    // The items are copied only when they may have to go again.
    let first = if reused {
        outgoing.clone()
    } else {
        std::mem::take(&mut outgoing)
    };
    let mut answers = peer.client.forward_many(first).await;
    let mut peer = peer;
    if reused
        && answers
            .iter()
            .all(|a| matches!(a, Err(ClientError::Closed | ClientError::Io(_))))
    {
        peer = match connect_peer(s, &hop).await {
            Ok(p) => p,
            Err(e) => return later(s, &items, &e).await,
        };
        answers = peer.client.forward_many(outgoing).await;
    }
    let healthy = !answers
        .iter()
        .any(|a| matches!(a, Err(ClientError::Closed | ClientError::Io(_))));
    let (next_key, binding) = (peer.next_key, peer.binding.clone());
    if healthy {
        keep_peer(s, lane, peer);
    }
    // Items handed on end together: their writes share commits.
    let mut ends = tokio::task::JoinSet::new();
    let mut retry: Vec<(Queued, String)> = Vec::new();
    for (q, answer) in items.iter().zip(answers) {
        match answer {
            // A hostile relay (tests only) keeps what it will replay.
            Ok(Submitted::Accepted { .. }) if replay.contains(&q.id) => {
                let _ = s
                    .store
                    .forward_later(vec![q.id], now() + 1, String::new(), false)
                    .await;
            }
            Ok(Submitted::Accepted { .. }) => {
                s.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
                let (store, id) = (s.store.clone(), q.id);
                let handed = s.config.forwarding.via.is_some();
                let until = q.item.expires_at.saturating_add(HANDED_GRACE);
                ends.spawn(async move {
                    let ended = if handed {
                        store.forward_handed(id, until).await
                    } else {
                        store.forward_end(id, None).await
                    };
                    if let Err(e) = ended {
                        // Still queued: handed on again later, which the
                        // next relay and the recipient's replay cache
                        // absorb.
                        tracing::warn!("ending a forwarded item failed: {e}");
                    }
                });
            }
            // A full mailbox empties: tried again until the item expires,
            // as a sender does.
            Ok(Submitted::Refused(r)) if !r.code.is_lasting() => {
                retry.push((
                    q.clone(),
                    format!("the next relay refused: {}", r.code.describe()),
                ));
            }
            // The gateway's own refusal: the sender could not check it
            // against its recipient's card, so it is this relay's failed
            // attempt (given up, in its own words, at expiry).
            Ok(Submitted::Refused(r)) if s.config.forwarding.via.is_some() => {
                retry.push((
                    q.clone(),
                    format!("the gateway refused: {}", r.code.describe()),
                ));
            }
            Ok(Submitted::Refused(refusal)) => {
                let ended = refused_by_next(s, &hop, "item", next_key, &binding, refusal);
                end_with_notice(s, q, None, ended, now()).await;
            }
            Err(e) => retry.push((q.clone(), e.to_string())),
        }
    }
    // Put off in one write per distinct error (a connection lost midway
    // fails every item after it the same way).
    while let Some((_, error)) = retry.first().cloned() {
        let (same, rest): (Vec<_>, Vec<_>) = retry.into_iter().partition(|(_, e)| *e == error);
        retry = rest;
        let items: Vec<Queued> = same.into_iter().map(|(q, _)| q).collect();
        later(s, &items, &error).await;
    }
    while ends.join_next().await.is_some() {}
}

/// What a hostile relay (tests only, [`crate::tamper`]) does instead of
/// handing items on: those it ends at once with a lying notice are not
/// among the items returned, those it misroutes are addressed to another
/// mailbox, and the ids of those it will hand on again are returned too.
async fn tampered(s: &Shared, items: Vec<Queued>) -> (Vec<Queued>, std::collections::HashSet<u64>) {
    use crate::tamper::OnHandOn;
    let mut replay = std::collections::HashSet::new();
    let Some(t) = s.config.tamper.as_ref() else {
        return (items, replay);
    };
    let mut kept = Vec::with_capacity(items.len());
    for mut q in items {
        let at = now();
        let ended = match t.hand_on(&q.item.mailbox, &q.item.payload_hash) {
            OnHandOn::Send => {
                kept.push(q);
                continue;
            }
            OnHandOn::Replay => {
                replay.insert(q.id);
                kept.push(q);
                continue;
            }
            OnHandOn::Redirect(to) => {
                q.item.mailbox = to;
                kept.push(q);
                continue;
            }
            OnHandOn::GiveUp => notice::Ended::GaveUp {
                attempts: q.attempts.max(1),
                error: "connection refused".into(),
            },
            // Its own key, its own binding: the sender finds that the
            // binding does not verify with the next relay's pin.
            OnHandOn::ForgeRefusal => notice::Ended::Refused {
                next_key: s.key.verifying_key().to_bytes(),
                binding: s.binding.clone(),
                refusal: signed_refusal(
                    &s.key,
                    RefusalCode::UnknownMailbox,
                    q.item.mailbox,
                    q.item.payload_hash,
                ),
            },
        };
        end_with_notice(s, &q, None, ended, at).await;
    }
    (kept, replay)
}

/// The next relay's signed refusal of a forwarded `what` (item or blob),
/// counted and logged, as its sender's notice will carry it.
fn refused_by_next(
    s: &Shared,
    hop: &NextHop,
    what: &str,
    next_key: [u8; 32],
    binding: &sealpost_proto::relay::KeyBinding,
    refusal: sealpost_proto::relay::Refusal,
) -> notice::Ended {
    s.metrics.forward_refused.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        next = %hop.addr,
        "the next relay refused a forwarded {what} ({}); telling its sender",
        refusal.code.name()
    );
    notice::Ended::Refused {
        next_key,
        binding: binding.clone(),
        refusal,
    }
}

/// A connection to a next relay that proved this relay's key, with what
/// the next relay stated: its key and that key's binding to its pin.
pub(crate) struct Peer {
    client: RelayClient,
    next_key: [u8; 32],
    binding: sealpost_proto::relay::KeyBinding,
}

/// How long a connection to a next relay is kept unused: below the 30 s a
/// relay gives a connection that is not a mailbox owner's (PROTOCOL 6.7).
const KEEP_IDLE: Duration = Duration::from_secs(20);

/// The kept connection to `hop`, if one is recent enough.
fn take_peer(s: &Shared, lane: &Lane) -> Option<Peer> {
    let mut links = s.forward_links.lock().ok()?;
    let (peer, at) = links.remove(lane)?;
    (at.elapsed() < KEEP_IDLE).then_some(peer)
}

fn keep_peer(s: &Shared, lane: &Lane, peer: Peer) {
    if let Ok(mut links) = s.forward_links.lock() {
        links.retain(|_, (_, at)| at.elapsed() < KEEP_IDLE);
        links.insert(lane.clone(), (peer, std::time::Instant::now()));
    }
}

/// Connects to `hop` (pinned TLS), proves this relay's key, and gets the
/// next relay's key binding, checked against its pin.
async fn connect_peer(s: &Shared, hop: &NextHop) -> Result<Peer, String> {
    let cfg = &s.config.forwarding;
    if let Some(via) = &cfg.via {
        let client = connect_gateway(s, via).await?;
        let next_key = client.relay_key().to_bytes();
        let binding = client
            .key_binding(&via.pin.0)
            .await
            .map_err(|e| format!("the gateway's key binding: {e}"))?;
        return Ok(Peer {
            client,
            next_key,
            binding,
        });
    }
    let addr = RelayAddress {
        host_port: hop.addr.clone(),
        pin: Pin(hop.pin),
    };
    let client = RelayClient::connect_via(&*cfg.transport, &addr, None, cfg.timeouts)
        .await
        .map_err(|e| e.to_string())?;
    client
        .peer_auth(&s.key)
        .await
        .map_err(|e| format!("the next relay refused this relay's key: {e}"))?;
    let next_key = client.relay_key().to_bytes();
    // What lets the sender check a refusal passed on to it offline.
    let binding = client
        .key_binding(&hop.pin)
        .await
        .map_err(|e| format!("the next relay's key binding: {e}"))?;
    Ok(Peer {
        client,
        next_key,
        binding,
    })
}

/// Counts a failed attempt for each of `items` and puts it off.
async fn later(s: &Shared, items: &[Queued], error: &str) {
    let cfg = &s.config.forwarding;
    s.metrics
        .forward_failures
        .fetch_add(items.len() as u64, Ordering::Relaxed);
    let attempts = items.iter().map(|q| q.attempts).max().unwrap_or(0);
    let wait = cfg.retry.delay(attempts, unit());
    let next_at = now() + wait.as_secs().max(1);
    tracing::debug!(
        "forwarding {} items failed ({error}); next attempt in {} s",
        items.len(),
        wait.as_secs()
    );
    let ids = items.iter().map(|q| q.id).collect();
    if let Err(e) = s
        .store
        .forward_later(ids, next_at, error.to_owned(), true)
        .await
    {
        tracing::warn!("putting forwarded items off failed: {e}");
    }
}

/// An item that expired in the queue: its sender is told, signed.
async fn give_up(s: &Shared, q: Queued, now: u64) {
    s.metrics.forward_given_up.fetch_add(1, Ordering::Relaxed);
    let ended = notice::Ended::GaveUp {
        attempts: q.attempts,
        error: q
            .last_error
            .clone()
            .unwrap_or_else(|| "not tried before it expired".into()),
    };
    end_with_notice(s, &q, None, ended, now).await;
    drop_copy(s, &q).await;
}

/// Ends `q` with a notice for its sender; for a blob, naming the piece
/// at `offset` (refused), or else where the next relay stood.
async fn end_with_notice(
    s: &Shared,
    q: &Queued,
    offset: Option<u64>,
    ended: notice::Ended,
    now: u64,
) {
    let n = match q.blob {
        Some((blob_id, _)) => {
            let there = s
                .forward_blobs
                .lock()
                .ok()
                .and_then(|m| m.get(&(blob_id, q.item.mailbox)).copied())
                .unwrap_or(0);
            let offset = offset.unwrap_or(there);
            Notice::sign_blob(
                &s.key,
                now,
                q.item.mailbox,
                (blob_id, offset),
                q.item.next.clone(),
                ended,
            )
        }
        None => Notice::sign(
            &s.key,
            now,
            q.item.mailbox,
            q.item.payload_hash,
            q.item.next.clone(),
            ended,
        ),
    };
    let payload = n.encode();
    let item = NewItem {
        mailbox: q.origin,
        expires_at: now + s.config.forwarding.notice_lifetime.as_secs(),
        hash: *blake3::hash(&payload).as_bytes(),
        payload,
        source: Source::of_v4([0, 0, 0, 0]),
        now,
    };
    match s.store.forward_end(q.id, Some(item)).await {
        Ok(Ended::Ended { .. } | Ended::Gone) => {}
        Err(e) => tracing::warn!("storing a forward notice failed (tried again later): {e}"),
    }
}

/// A uniform draw in [0, 1) for the backoff's jitter.
fn unit() -> f64 {
    (OsRng.next_u32() as f64) / (u32::MAX as f64 + 1.0)
}

/// How long an entry handed to a gateway is kept past its expiry for the
/// gateway's word on it (a gateway gives up at the expiry, by its own
/// clock, and its notice then has to come back).
pub(crate) const HANDED_GRACE: u64 = 3600;

/// How often a relay with a gateway looks in its mailbox there.
const GATEWAY_POLL: Duration = Duration::from_secs(2);

/// A connection to the outbound gateway `via` (pinned TLS), authenticated
/// to this relay's mailbox there (registered on first use) with its
/// relay key.
async fn connect_gateway(s: &Shared, via: &RelayAddress) -> Result<RelayClient, String> {
    let cfg = &s.config.forwarding;
    let client = RelayClient::connect_via(&*cfg.transport, via, None, cfg.timeouts)
        .await
        .map_err(|e| format!("the gateway {}: {e}", via.host_port))?;
    client.owner_with_key(&s.key).await.map_err(|e| {
        format!(
            "the gateway {} does not take this relay as a mailbox owner: {e}",
            via.host_port
        )
    })?;
    Ok(client)
}

/// Passes the gateway's notices back, forever: every [`GATEWAY_POLL`] it
/// fetches this relay's mailbox at the gateway, turns each notice about
/// an entry it handed there into a notice of its own for that entry's
/// sender (stored durably) and only then acknowledges it; and it forgets
/// handed entries whose time is up.
pub(crate) async fn gateway_loop(s: Arc<Shared>, via: RelayAddress) {
    let mut link: Option<RelayClient> = None;
    let mut swept = 0u64;
    loop {
        tokio::time::sleep(GATEWAY_POLL).await;
        let t = now();
        if t >= swept + 60 {
            swept = t;
            if let Err(e) = s.store.handed_expire(t).await {
                tracing::warn!("forgetting entries handed to the gateway failed: {e}");
            }
        }
        let client = match link.take() {
            Some(c) => c,
            None => match connect_gateway(&s, &via).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("{e}");
                    continue;
                }
            },
        };
        match gateway_notices(&s, &via, &client).await {
            Ok(()) => link = Some(client),
            Err(e) => tracing::debug!("reading notices at the gateway {}: {e}", via.host_port),
        }
    }
}

/// Fetches and passes back what waits in this relay's mailbox at the
/// gateway; acknowledges each item once its outcome here is durable.
async fn gateway_notices(s: &Shared, via: &RelayAddress, c: &RelayClient) -> Result<(), String> {
    let gateway_key = *c.relay_key();
    loop {
        let (items, more) = c.fetch(0, 100).await.map_err(|e| e.to_string())?;
        if items.is_empty() {
            return Ok(());
        }
        let mut seqs = Vec::with_capacity(items.len());
        for item in items {
            pass_back(s, via, &gateway_key, &item.payload).await?;
            seqs.push(item.seq);
        }
        c.ack(seqs).await.map_err(|e| e.to_string())?;
        if !more {
            return Ok(());
        }
    }
}

/// Turns the gateway's notice `bytes` into this relay's notice for the
/// sender of the entry it names (PROTOCOL 6.8, 6.9). What does not hold
/// up — not a notice, not signed by the gateway, about nothing handed
/// there, about another relay, a carried refusal that does not verify —
/// is logged and dropped. An error means: not passed back, do not
/// acknowledge it.
async fn pass_back(
    s: &Shared,
    via: &RelayAddress,
    gateway_key: &ed25519_dalek::VerifyingKey,
    bytes: &[u8],
) -> Result<(), String> {
    let n = match Notice::decode(bytes) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(
                "dropped an item in this relay's mailbox at its gateway: not a notice ({e})"
            );
            return Ok(());
        }
    };
    if let Err(e) = n.verify(gateway_key) {
        tracing::warn!("dropped a notice at the gateway not signed by it: {e}");
        return Ok(());
    }
    let found = s
        .store
        .handed_find(n.mailbox, n.payload_hash, n.blob.map(|b| b.0))
        .await
        .map_err(|e| e.to_string())?;
    let Some(h) = found else {
        tracing::debug!("a notice of the gateway about nothing handed to it (ended already)");
        return Ok(());
    };
    if h.next.pin != n.next.pin {
        tracing::warn!(
            "dropped a notice of the gateway about {}: the item went to {}",
            n.next.addr,
            h.next.addr
        );
        return Ok(());
    }
    let ended = match n.ended {
        notice::Ended::Refused {
            next_key,
            binding,
            refusal,
        } => {
            // Checked as the sender will check it.
            let vouched =
                sealpost_client::tls::verify_key_binding(&h.next.pin, &next_key, &binding);
            let signed = VerifyingKey::from_bytes(&next_key).is_ok_and(|k| refusal.verify(&k));
            let names = (refusal.mailbox, refusal.payload_hash) == (n.mailbox, n.payload_hash);
            if !(vouched && signed && names) {
                tracing::warn!("dropped a refusal the gateway passed on: it does not verify");
                return Ok(());
            }
            s.metrics.forward_refused.fetch_add(1, Ordering::Relaxed);
            notice::Ended::Refused {
                next_key,
                binding,
                refusal,
            }
        }
        notice::Ended::GaveUp { attempts, error } => {
            s.metrics.forward_given_up.fetch_add(1, Ordering::Relaxed);
            // The notice cuts it to its limit (§6.9).
            let error = format!("the gateway {} gave up: {error}", via.host_port);
            notice::Ended::GaveUp { attempts, error }
        }
    };
    let t = now();
    let notice = match (h.blob, n.blob) {
        (Some(b), Some((_, offset))) => {
            Notice::sign_blob(&s.key, t, h.mailbox, (b, offset), h.next.clone(), ended)
        }
        _ => Notice::sign(&s.key, t, h.mailbox, n.payload_hash, h.next.clone(), ended),
    };
    let payload = notice.encode();
    let item = NewItem {
        mailbox: h.origin,
        expires_at: t + s.config.forwarding.notice_lifetime.as_secs(),
        hash: *blake3::hash(&payload).as_bytes(),
        payload,
        source: Source::of_v4([0, 0, 0, 0]),
        now: t,
    };
    s.store
        .handed_end(h.id, Some(item))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
