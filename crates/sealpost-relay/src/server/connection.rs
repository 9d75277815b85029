//! One connection: TLS accepted, Hello, then each request handled in order of arrival, with submissions and blob pieces pipelined.

use super::*;

/// The bounds on one connection's submissions waiting for their commit.
#[derive(Clone, Copy)]
pub(crate) struct InFlight<'a> {
    pub(crate) count: &'a Arc<Semaphore>,
    pub(crate) bytes: &'a Arc<Semaphore>,
}

pub(crate) struct Session {
    /// This connection's number (a side of a pairing slot is a connection).
    pub(crate) conn: u64,
    pub(crate) challenge: [u8; 32],
    pub(crate) exporter: [u8; 32],
    pub(crate) mailbox: Option<MailboxId>,
    /// The relay key this connection proved (`PeerAuth`): another relay
    /// forwarding here.
    pub(crate) peer: Option<[u8; 32]>,
    pub(crate) subscription: Option<Subscription>,
    /// Where the connection comes from (for the per-source share).
    pub(crate) source: Source,
    /// Blob pieces of this connection, stored in order by one task while
    /// the connection goes on reading (and decrypting) the next frames.
    /// Started with the connection's first piece (an idle connection
    /// holds no task or queue for it).
    pub(crate) blob_lane: Option<(mpsc::Sender<BlobJob>, tokio::task::JoinHandle<()>)>,
}

/// A blob piece waiting for its turn, with the permits its bytes hold.
pub(crate) struct BlobJob {
    pub(crate) id: u32,
    pub(crate) put: BlobPiece,
    /// The mailbox its refusal names: the request's (for a piece of a
    /// blob this relay forwards, not the sender's mailbox it is stored in).
    pub(crate) named: MailboxId,
    pub(crate) _permits: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    ),
}

/// Serves one connection on `tcp` (a TCP stream, or one in memory) from
/// `peer`.
///
/// What an idle connection holds is this future's state, so the state of
/// each step that is not waiting for the next frame (the handshake, a
/// frame's handling, a write) lives in a box of its own while that step
/// runs (issue 23: an agent stays subscribed for hours).
pub(crate) async fn connection<S>(s: Arc<Shared>, tcp: S, peer: SocketAddr) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let evictable = Arc::new(Evictable::new(&s));
    let (mut rd, wr, exporter) = Box::pin(handshake(&s, tcp, &evictable)).await?;
    // Responses wait here for the socket. A client that sends requests but
    // does not read the answers stalls on this bound (the reader below
    // waits for room), so its queue holds at most 64 frames; one that
    // takes no bytes for a frame timeout is closed (`writer`).
    let (out, rx) = super::outq::channel(64);
    let mut challenge = [0u8; 32];
    OsRng.fill_bytes(&mut challenge);
    let conn = s.next_connection.fetch_add(1, Ordering::Relaxed);
    let mut c = Conn {
        session: Session {
            conn,
            challenge,
            exporter,
            mailbox: None,
            peer: None,
            subscription: None,
            // What this connection stores counts in its address's share
            // of each mailbox (`Limits::source_share_percent`).
            source: Source::of_ip(peer.ip()),
            blob_lane: None,
        },
        in_flight: Arc::new(Semaphore::new(s.config.max_in_flight)),
        in_flight_bytes: Arc::new(Semaphore::new(
            s.config.max_in_flight_bytes.max(relay::MAX_FRAME),
        )),
        bucket: {
            let (rate, burst) = s.config.rate_per_connection;
            TokenBucket::new(rate, burst, std::time::Instant::now())
        },
        hello: false,
    };
    // Reading and handling requests, and writing the answers, run in this
    // one task (joined, not spawned).
    let reading = async {
        let result: io::Result<()> = async {
            loop {
                let stage = Stage {
                    hello: c.hello,
                    idle: if c.session.mailbox.is_some() {
                        s.config.idle_timeout
                    } else {
                        s.config.unauthenticated_idle_timeout
                    },
                    frame: s.config.frame_timeout,
                };
                // Owners are never evicted.
                let evict = c.session.mailbox.is_none().then_some(&evictable);
                let read = read_frame(&mut rd, stage, &s.total_bytes, evict).await;
                if Box::pin(c.step(&s, &out, read)).await? {
                    return Ok(());
                }
            }
        }
        .await;
        let lane = c.session.blob_lane.take().map(|(_, task)| task);
        super::pair::connection_closed(&s, conn);
        drop(c);
        if let Some(lane) = lane {
            let _ = lane.await;
        }
        drop(out);
        result
    };
    let writing = writer(wr, rx, s.config.frame_timeout);
    tokio::pin!(reading, writing);
    tokio::select! {
        biased;
        r = &mut reading => {
            // The answers still queued (and those of submissions in
            // flight) are written before the connection closes.
            let _ = writing.await;
            r
        }
        // The writer ends first only if writing failed or stalled: the
        // client is gone or takes no bytes, and no answer can reach it.
        w = &mut writing => {
            super::pair::connection_closed(&s, conn);
            if matches!(&w, Err(e) if e.kind() == io::ErrorKind::TimedOut) {
                s.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            w.and(Err(io::Error::new(io::ErrorKind::BrokenPipe, "connection closed")))
        }
    }
}

type Halves<S> = (
    tokio::io::ReadHalf<tokio_rustls::server::TlsStream<crate::pooled::PooledReader<S>>>,
    tokio::io::WriteHalf<tokio_rustls::server::TlsStream<crate::pooled::PooledReader<S>>>,
    [u8; 32],
);

/// The TLS handshake (evictable, within the handshake timeout), then the
/// stream's two halves and its exporter value (PROTOCOL 6.3).
async fn handshake<S>(s: &Shared, tcp: S, evictable: &Arc<Evictable>) -> io::Result<Halves<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // rustls reads its records 4 KiB at a time; a read buffer under it
    // turns a 1 MiB blob piece into a few syscalls instead of 256. It is
    // held only while it has bytes (an idle connection holds none).
    let tcp = crate::pooled::PooledReader::new(tcp);
    let stream = evictable
        .idle(timeout(s.config.handshake_timeout, s.tls.accept(tcp)))
        .await?
        .map_err(|_| {
            s.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
            io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout")
        })??;
    let exporter = stream
        .get_ref()
        .1
        .export_keying_material([0u8; 32], relay::EXPORTER_LABEL, None)
        .map_err(io::Error::other)?;
    let (rd, wr) = tokio::io::split(stream);
    Ok((rd, wr, exporter))
}

/// A connection's state between frames.
struct Conn {
    session: Session,
    in_flight: Arc<Semaphore>,
    in_flight_bytes: Arc<Semaphore>,
    bucket: TokenBucket,
    hello: bool,
}

impl Conn {
    /// Handles what reading the next frame gave: `Ok(true)` when the
    /// connection is to close (cleanly).
    async fn step(
        &mut self,
        s: &Arc<Shared>,
        out: &Out,
        read: io::Result<Option<Read>>,
    ) -> io::Result<bool> {
        let read = match read {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(true),
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    s.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                if e.kind() == io::ErrorKind::InvalidData {
                    s.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                    let _ = send(out, 0, err(ErrorCode::BadRequest, e.to_string())).await;
                }
                return Err(e);
            }
        };
        let budget = read.budget;
        let frame = match read.frame {
            Ok(f) => f,
            Err(e) => {
                s.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                send(
                    out,
                    0,
                    err(ErrorCode::BadRequest, format!("malformed request: {e}")),
                )
                .await?;
                return Ok(true);
            }
        };
        if frame.id == 0 {
            // Id 0 is the relay's pushes: an answer under it could not
            // be told from a Notify (PROTOCOL 6.2).
            s.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
            send(
                out,
                0,
                err(
                    ErrorCode::BadRequest,
                    "request id 0 is reserved for the relay's pushes; number requests from 1",
                ),
            )
            .await?;
            return Ok(true);
        }
        if !self.hello {
            return match frame.body {
                Request::Hello { version } if version == relay::VERSION => {
                    self.hello = true;
                    send(
                        out,
                        frame.id,
                        Response::HelloOk {
                            version: relay::VERSION,
                            relay_key: s.key.verifying_key().to_bytes(),
                            challenge: self.session.challenge,
                        },
                    )
                    .await?;
                    Ok(false)
                }
                Request::Hello { version } => {
                    send(
                        out,
                        frame.id,
                        err(
                            ErrorCode::UnsupportedVersion,
                            format!("protocol version {version} is not spoken here; this relay speaks {}", relay::VERSION),
                        ),
                    )
                    .await?;
                    Ok(true)
                }
                _ => {
                    send(
                        out,
                        frame.id,
                        err(ErrorCode::BadRequest, "the first request must be Hello"),
                    )
                    .await?;
                    Ok(true)
                }
            };
        }
        if !self.bucket.try_take(std::time::Instant::now()) {
            s.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            send(
                out,
                frame.id,
                err(
                    ErrorCode::RateLimited,
                    "too many requests; slow down and retry",
                ),
            )
            .await?;
            return Ok(false);
        }
        let bounds = InFlight {
            count: &self.in_flight,
            bytes: &self.in_flight_bytes,
        };
        handle(
            s,
            &mut self.session,
            out,
            bounds,
            budget,
            frame.id,
            frame.body,
        )
        .await?;
        Ok(false)
    }
}

pub(crate) async fn handle(
    s: &Arc<Shared>,
    session: &mut Session,
    out: &Out,
    in_flight: InFlight<'_>,
    budget: Option<OwnedSemaphorePermit>,
    id: u32,
    req: Request,
) -> io::Result<()> {
    let authed = session.mailbox;
    let need_auth = || {
        err(
            ErrorCode::NotAuthenticated,
            "authenticate to a mailbox first",
        )
    };
    match req {
        Request::Hello { .. } => {
            send(
                out,
                id,
                err(ErrorCode::BadRequest, "Hello was already sent"),
            )
            .await
        }
        Request::Register { key, signature } | Request::Auth { key, signature } => {
            let registering = matches!(req, Request::Register { .. });
            let ctx = if registering {
                context::REGISTER
            } else {
                context::AUTH
            };
            if let Some(e) = unproven(s, session, ctx, &key, &signature, "key") {
                return send(out, id, e).await;
            }
            let mailbox = MailboxId::of(&key);
            if registering {
                let refused = |why: &str| {
                    s.metrics
                        .registrations_refused
                        .fetch_add(1, Ordering::Relaxed);
                    err(ErrorCode::RegistrationRefused, why)
                };
                // An existing mailbox's owner may always register again
                // (it is idempotent); the policy decides about new ones.
                let existing = match s.store.has_mailbox(&mailbox).await {
                    Ok(e) => e,
                    Err(e) => return send(out, id, storage_failed(s, &e)).await,
                };
                if !existing {
                    if let Some(why) = s.config.registration.refuses(&key) {
                        return send(out, id, refused(why)).await;
                    }
                }
                match s.store.register(mailbox, key, now()).await {
                    Ok(Registered::Full) => {
                        return send(
                            out,
                            id,
                            refused("this relay holds as many mailboxes as its operator allows; ask the operator"),
                        )
                        .await
                    }
                    Ok(_) => {}
                    Err(e) => return send(out, id, storage_failed(s, &e)).await,
                }
            } else {
                match s.store.mailbox_key(&mailbox).await {
                    Ok(Some(k)) if k == key => {}
                    Ok(_) => {
                        s.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                        return send(
                            out,
                            id,
                            err(
                                ErrorCode::MailboxState,
                                "no mailbox for this key here; register first",
                            ),
                        )
                        .await;
                    }
                    Err(e) => return send(out, id, err(ErrorCode::Internal, e.to_string())).await,
                }
            }
            session.mailbox = Some(mailbox);
            send(out, id, Response::Ok).await
        }
        Request::Submit {
            mailbox,
            expires_at,
            payload_hash,
            payload,
        } => {
            // Submissions run concurrently so that their commits can share
            // one fsync (group commit); the in-flight bound keeps a client
            // from queueing without limit.
            // The relay-wide budget was taken when the frame was read.
            let (p1, p2, p3) = submission_permits(s, in_flight, budget, payload.len()).await?;
            let s = s.clone();
            let out = out.clone();
            let source = session.source;
            tokio::spawn(async move {
                let r = submit(&s, source, mailbox, expires_at, payload_hash, payload).await;
                drop((p2, p3));
                let _ = send(&out, id, r).await;
                drop(p1);
            });
            Ok(())
        }
        Request::Fetch { after, max } => {
            let Some(mb) = authed else {
                return send(out, id, need_auth()).await;
            };
            let max = (max as usize).clamp(1, relay::MAX_BATCH);
            let budget = relay::MAX_FRAME - 64 * 1024;
            match s.store.fetch(&mb, after, max, budget).await {
                Ok(sealpost_store::Fetched {
                    mut items,
                    more,
                    damaged,
                }) => {
                    if let Some(t) = &s.config.tamper {
                        let lost = t.fetch(&mb, &mut items);
                        if !lost.is_empty() {
                            let _ = s.store.ack(mb, lost).await;
                        }
                    }
                    if damaged > 0 {
                        tracing::error!(mailbox = %mb, "{damaged} stored items failed their BLAKE3 check; run `sealpost relay scrub`");
                    }
                    s.metrics
                        .fetched
                        .fetch_add(items.len() as u64, Ordering::Relaxed);
                    send(out, id, Response::Items { items, more }).await
                }
                Err(e) => send(out, id, err(ErrorCode::Internal, e.to_string())).await,
            }
        }
        Request::Subscribe => {
            let Some(mb) = authed else {
                return send(out, id, need_auth()).await;
            };
            if session.subscription.is_none() {
                session.subscription = Some(Subscription::new(s, mb, out.clone()));
            }
            send(out, id, Response::Ok).await
        }
        Request::Ack { seqs } => {
            let Some(mb) = authed else {
                return send(out, id, need_auth()).await;
            };
            match s.store.ack(mb, seqs).await {
                Ok(count) => {
                    s.metrics.acked.fetch_add(count as u64, Ordering::Relaxed);
                    send(out, id, Response::Acked { count }).await
                }
                Err(e) => send(out, id, storage_failed(s, &e)).await,
            }
        }
        // The last hop: stored like any piece.
        Request::BlobForward(f) if f.next.pin == s.pin.0 => {
            let named = f.piece.mailbox;
            let hash = relay::blob_refusal_hash(&f.piece.blob_id, f.piece.offset);
            if let Some(no) = from_peer(s, session, named, hash) {
                sealpost_proto::buffers::give(f.piece.data);
                return send(out, id, no).await;
            }
            queue_piece(s, session, out, id, f.piece, named, in_flight, budget).await
        }
        Request::BlobForward(f) => {
            let mailbox = f.piece.mailbox;
            let origin = match forward_blob_request(s, session.source, session.mailbox, &f).await {
                Ok(origin) => origin,
                Err(answer) => {
                    sealpost_proto::buffers::give(f.piece.data);
                    return send(out, id, answer).await;
                }
            };
            let mut put = f.piece;
            put.mailbox = origin;
            queue_piece(s, session, out, id, put, mailbox, in_flight, budget).await
        }
        Request::BlobPut(put) => {
            let named = put.mailbox;
            queue_piece(s, session, out, id, put, named, in_flight, budget).await
        }
        Request::BlobStatus { blob_id, mailbox } => {
            // The blob of that id in the mailbox named (an uploader), or
            // in the connection's own (an owner); without either, the
            // id's first blob.
            let blob_id = match mailbox.or(authed) {
                Some(mb) => match blob_key(s, &blob_id, &mb).await {
                    Ok(k) => k,
                    Err(e) => return send(out, id, e).await,
                },
                None => blob_id,
            };
            // The blob's owner (a recipient following an upload) is
            // answered at once; anyone else (an uploader about to resume)
            // after any run of pieces being stored, so that it is not told
            // a length the relay is about to pass.
            let now = s.store.blob_status(&blob_id).await;
            let owner_asks = matches!(&now, Ok(Some((_, _, owner))) if Some(*owner) == authed);
            let status = if owner_asks {
                now
            } else {
                s.store.blob_status_settled(&blob_id).await
            };
            blob_status_answer(out, id, status).await
        }
        Request::BlobGet {
            blob_id,
            offset,
            len,
        } => {
            let Some(mb) = authed else {
                return send(out, id, need_auth()).await;
            };
            let len = (len as usize).min(relay::MAX_BLOB_PIECE);
            let blob_id = match blob_key(s, &blob_id, &mb).await {
                Ok(k) => k,
                Err(e) => return send(out, id, e).await,
            };
            let head = |more: usize| {
                let mut frame = buffers::take(more + 64);
                Response::BlobData {
                    offset,
                    data: Vec::new(),
                }
                .encode_into(id, &mut frame);
                frame
            };
            // Only the owner of the blob's mailbox may read it; anyone
            // else is told it does not exist.
            let located = match s.store.blob_locate(&blob_id, &mb, offset, len).await {
                Ok(l) => l,
                Err(e) => return send(out, id, err(ErrorCode::Internal, e.to_string())).await,
            };
            let (mut frame, at) = match located {
                BlobRead::Missing => {
                    return send(out, id, err(ErrorCode::NotFound, "no such blob")).await
                }
                // Still in memory (a recipient streaming the blob
                // as it is uploaded): sent from there, not copied.
                BlobRead::Kept((piece, range)) if s.config.tamper.is_none() => {
                    let mut frame = head(0);
                    relay::finish_frame_before(&mut frame, range.len());
                    return send_out(out, Outgoing::Shared(frame, (piece, range))).await;
                }
                BlobRead::Kept((piece, range)) => {
                    let mut frame = head(range.len());
                    let at = frame.len();
                    frame.extend_from_slice(&piece[range]);
                    (frame, at)
                }
                // From the device (`O_DIRECT`, about 1 ms per MiB
                // here) straight into the frame: on the blocking
                // pool, so a runtime worker never waits on the disk
                // (measured: relay peak RSS 45-55 -> 34-38 MiB in
                // the 1 GiB transfer, the same speed).
                BlobRead::OnDisk(n) => {
                    let mut frame = head(n);
                    let at = frame.len();
                    let store = s.store.clone();
                    let (read, frame) = tokio::task::spawn_blocking(move || {
                        let r = store.blob_read_disk(&blob_id, offset, n, &mut frame);
                        (r, frame)
                    })
                    .await
                    .map_err(io::Error::other)?;
                    if let Err(e) = read {
                        buffers::give(frame);
                        return send(out, id, err(ErrorCode::Internal, e.to_string())).await;
                    }
                    (frame, at)
                }
            };
            if let Some(t) = &s.config.tamper {
                let mut data = frame.split_off(at);
                t.blob_data(&mb, &blob_id, offset, &mut data);
                frame.extend_from_slice(&data);
            }
            relay::finish_frame(&mut frame);
            send_frame(out, frame).await
        }
        Request::BlobDelete { blob_id } => {
            let Some(mb) = authed else {
                return send(out, id, need_auth()).await;
            };
            let blob_id = match blob_key(s, &blob_id, &mb).await {
                Ok(k) => k,
                Err(e) => return send(out, id, e).await,
            };
            match s.store.blob_delete(blob_id, mb).await {
                Ok(true) => send(out, id, Response::Ok).await,
                Ok(false) => send(out, id, err(ErrorCode::NotFound, "no such blob")).await,
                Err(e) => send(out, id, err(ErrorCode::Internal, e.to_string())).await,
            }
        }
        Request::Status => {
            let Some(mb) = authed else {
                return send(out, id, need_auth()).await;
            };
            match s.store.status(&mb).await {
                Ok(u) => {
                    send(
                        out,
                        id,
                        Response::Status {
                            items: u.items,
                            bytes: u.used,
                            quota: u.quota,
                        },
                    )
                    .await
                }
                Err(e) => send(out, id, err(ErrorCode::Internal, e.to_string())).await,
            }
        }
        Request::Limits => {
            let l = s.store.limits();
            let max_message = s.config.max_message.min(relay::MAX_MESSAGE);
            let answer = Response::Limits {
                max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
                max_blob: l.max_blob,
                mailbox_quota: l.mailbox_quota,
            };
            send(out, id, answer).await
        }
        Request::KeyBinding => send(out, id, Response::KeyBinding(s.binding.clone())).await,
        Request::ForwardStatus { items } => {
            let Some(mb) = authed else {
                return send(out, id, need_auth()).await;
            };
            match s.store.forward_waiting(mb, items).await {
                Ok(items) => send(out, id, Response::ForwardStatus { items }).await,
                Err(e) => send(out, id, err(ErrorCode::Internal, e.to_string())).await,
            }
        }
        Request::PeerAuth { key, signature } => {
            if let Some(e) = unproven(s, session, context::PEER, &key, &signature, "relay key") {
                return send(out, id, e).await;
            }
            tracing::info!(
                relay_key = %sealpost_proto::hex(&key),
                source = ?session.source,
                "a relay proved its key"
            );
            session.peer = Some(key);
            send(out, id, Response::Ok).await
        }
        Request::Forward(f) => {
            if f.next.pin == s.pin.0 {
                if let Some(no) = from_peer(s, session, f.mailbox, f.payload_hash) {
                    return send(out, id, no).await;
                }
            }
            // Bounded like a submission: in flight per connection and
            // relay-wide (the budget was taken when the frame was read).
            let (p1, p2, p3) = submission_permits(s, in_flight, budget, f.payload.len()).await?;
            let s = s.clone();
            let out = out.clone();
            let (source, origin) = (session.source, session.mailbox);
            tokio::spawn(async move {
                let r = forward_request(&s, source, origin, f).await;
                drop((p2, p3));
                let _ = send(&out, id, r).await;
                drop(p1);
            });
            Ok(())
        }
        Request::PairOpen { .. }
        | Request::PairJoin { .. }
        | Request::PairSend { .. }
        | Request::PairWait { .. }
        | Request::PairLeave { .. } => super::pair::handle(s, session, out, id, req).await,
        _ => send(out, id, err(ErrorCode::BadRequest, "unsupported request")).await,
    }
}

/// What this relay answers an item (or piece, named by `hash`) forwarded
/// to its `mailbox` by the relay this connection proved to be, if not
/// the usual: a signed refusal (code 6) when its operator does not take
/// items from that relay, `RateLimited` past that relay's rate (PROTOCOL
/// 6.8). A connection that proved no relay key is a sender like any.
fn from_peer(
    s: &Shared,
    session: &Session,
    mailbox: MailboxId,
    hash: [u8; 32],
) -> Option<Response> {
    let key = session.peer?;
    if s.config.peers.refuses(&key) {
        return Some(refusal(s, RefusalCode::NotForwarded, mailbox, hash));
    }
    let allowed = s
        .per_peer
        .lock()
        .map(|mut p| p.try_take(key, std::time::Instant::now()))
        .unwrap_or(true);
    if !allowed {
        s.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return Some(err(
            ErrorCode::RateLimited,
            "this relay takes no more forwarded items from your relay just now; try again later",
        ));
    }
    None
}

/// The key blob `id` of `mailbox` is stored under (§6.6), or the error to
/// answer.
async fn blob_key(
    s: &Shared,
    id: &relay::BlobId,
    mailbox: &MailboxId,
) -> Result<relay::BlobId, Response> {
    s.store
        .blob_key(id, mailbox)
        .await
        .map_err(|e| err(ErrorCode::Internal, e.to_string()))
}

/// Queues a blob piece on the connection's lane, which stores the pieces
/// of the connection in order (`named`: the mailbox a refusal names).
#[allow(clippy::too_many_arguments)]
async fn queue_piece(
    s: &Arc<Shared>,
    session: &mut Session,
    out: &Out,
    id: u32,
    put: BlobPiece,
    named: MailboxId,
    in_flight: InFlight<'_>,
    budget: Option<OwnedSemaphorePermit>,
) -> io::Result<()> {
    // Bounded like submissions: the bytes waiting here count against
    // the connection's and the relay's in-flight limits.
    let weight = u32::try_from(put.data.len().max(1)).unwrap_or(u32::MAX);
    let permits = (
        in_flight.bytes.clone().acquire_many_owned(weight).await,
        take_budget(s, budget, weight).await,
    );
    let (Ok(p1), Ok(p2)) = permits else {
        return Err(io::Error::other("relay shutting down"));
    };
    let job = BlobJob {
        id,
        put,
        named,
        _permits: (p1, p2),
    };
    let lane = session
        .blob_lane
        .get_or_insert_with(|| start_lane(s, out, session.source));
    lane.0
        .send(job)
        .await
        .map_err(|_| io::Error::other("the connection's blob writer stopped"))
}

/// `None` if `signature` proves, on this connection, possession of `key`
/// under `ctx` (`Register`, `Auth`, `PeerAuth`: PROTOCOL 6.3, 6.8); else
/// the error to answer (counted as a failed authentication), naming
/// `what` the key is.
fn unproven(
    s: &Shared,
    session: &Session,
    ctx: &[u8],
    key: &[u8; 32],
    signature: &[u8; 64],
    what: &str,
) -> Option<Response> {
    let mut msg = ctx.to_vec();
    msg.extend_from_slice(&auth_transcript(&session.exporter, &session.challenge));
    let ok = VerifyingKey::from_bytes(key)
        .map(|vk| {
            vk.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(signature))
                .is_ok()
        })
        .unwrap_or(false);
    if ok {
        return None;
    }
    s.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
    Some(err(
        ErrorCode::BadSignature,
        format!("the signature does not prove possession of this {what} on this connection"),
    ))
}

/// The permits a `Submit` or `Forward` of `len` payload bytes holds until
/// it is answered: one of the connection's submissions in flight, its
/// bytes of the connection's bound, and of the relay-wide budget.
async fn submission_permits(
    s: &Shared,
    in_flight: InFlight<'_>,
    budget: Option<OwnedSemaphorePermit>,
    len: usize,
) -> io::Result<(
    OwnedSemaphorePermit,
    OwnedSemaphorePermit,
    OwnedSemaphorePermit,
)> {
    let weight = u32::try_from(len.max(1)).unwrap_or(u32::MAX);
    let permits = (
        in_flight.count.clone().acquire_owned().await,
        in_flight.bytes.clone().acquire_many_owned(weight).await,
        take_budget(s, budget, weight).await,
    );
    let (Ok(p1), Ok(p2), Ok(p3)) = permits else {
        return Err(io::Error::other("relay shutting down"));
    };
    Ok((p1, p2, p3))
}

/// The relay-wide byte budget for a request's data: what reading its frame
/// took, or (a frame read whole, without data) `weight` now.
pub(crate) async fn take_budget(
    s: &Shared,
    taken: Option<OwnedSemaphorePermit>,
    weight: u32,
) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
    match taken {
        Some(p) => Ok(p),
        None => s.total_bytes.clone().acquire_many_owned(weight).await,
    }
}
