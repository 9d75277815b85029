//! The agent's side of the relay protocol: one pinned TLS connection with
//! pipelined requests (responses are matched by request id) and pushed
//! notifications.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use rustls::pki_types::ServerName;
use sealpost_proto::buffers;
use sealpost_proto::relay::{
    self, auth_transcript, context, BlobId, BlobPiece, ErrorCode, Item, MailboxId, Refusal,
    Request, Response,
};
use sealpost_proto::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::tls::{self, RelayAddress};
use crate::transport::{Stream, Tcp, Transport};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the relay at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The server at the address presented another key than the pinned
    /// one: a typo in the address, a relay whose key was replaced, or
    /// someone intercepting the connection. Nothing was sent.
    #[error(
        "the server at {addr} presented key {found}, not the pinned {pinned}: it may be an interception, or the relay's key was replaced, or the address has a typo. Nothing was sent; check the address with the relay's operator"
    )]
    KeyMismatch {
        addr: String,
        pinned: String,
        found: String,
    },
    #[error("the connection to the relay failed: {0}")]
    Io(#[from] io::Error),
    #[error("the relay answered with something unexpected: {0}")]
    Protocol(String),
    #[error("the relay refused: {message} ({code:?})")]
    Server { code: ErrorCode, message: String },
    #[error("{0}; treated as forged")]
    ForgedRefusal(Forged),
    #[error("the connection to the relay was closed")]
    Closed,
}

/// Why a refusal was not taken as the relay's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Forged {
    /// Its signature does not verify with the relay's pinned key.
    #[error("the relay's refusal is not signed by the relay's key")]
    NotSigned,
    /// It names another mailbox or payload than the submission it
    /// answers (a refusal replayed from elsewhere), whoever signed it.
    #[error(
        "the relay's refusal names another submission (mailbox or payload) than the one it answers"
    )]
    OtherSubmission,
}

/// What happened to a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Accepted {
        item_id: [u8; 16],
    },
    /// Refused, with the relay's verified signature.
    Refused(Refusal),
}

/// Requests waiting for their response; `None` once the connection is
/// gone, so a request sent after that fails at once instead of waiting.
type Waiters = Arc<Mutex<Option<HashMap<u32, oneshot::Sender<Response>>>>>;

/// A submission or forward sent: what its refusal must name, and where
/// its answer comes.
type Sent = (
    MailboxId,
    [u8; 32],
    Result<oneshot::Receiver<Response>, ClientError>,
);

/// A blob piece sent and not answered yet.
#[derive(Debug)]
pub struct PendingPiece {
    sent: Result<oneshot::Receiver<Response>, ClientError>,
    mailbox: MailboxId,
    /// What a refusal of it must name (§6.5).
    refusal_hash: [u8; 32],
}

/// A blob range asked for and not answered yet.
#[derive(Debug)]
pub struct PendingRange {
    sent: Result<oneshot::Receiver<Response>, ClientError>,
    offset: u64,
}

/// A connection to one relay.
pub struct RelayClient {
    writer: tokio::sync::Mutex<WriteHalf<TlsStream<Box<dyn Stream>>>>,
    waiters: Waiters,
    next_id: AtomicU32,
    relay_key: VerifyingKey,
    challenge: [u8; 32],
    exporter: [u8; 32],
    notify: Mutex<Option<mpsc::UnboundedReceiver<u64>>>,
    reader: tokio::task::JoinHandle<()>,
    request_timeout: Duration,
}

impl std::fmt::Debug for RelayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayClient")
    }
}

impl Drop for RelayClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// How long a client waits on a relay before it gives up on the
/// connection: a relay that accepts and then goes silent, or a connection
/// left half-open, fails after these instead of hanging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, and separately the TLS handshake with Hello.
    pub connect: Duration,
    /// One request's answer.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(60),
        }
    }
}

impl RelayClient {
    /// Connects, checks the relay's key against the pin, and says Hello.
    pub async fn connect(addr: &RelayAddress) -> Result<Self, ClientError> {
        Self::connect_with(addr, Timeouts::default()).await
    }

    /// [`RelayClient::connect`] with other timeouts.
    pub async fn connect_with(addr: &RelayAddress, t: Timeouts) -> Result<Self, ClientError> {
        Self::connect_from(addr, None, t).await
    }

    /// [`RelayClient::connect_with`] from a chosen local address (a
    /// multi-homed host, or tests that play several machines on
    /// 127.0.0.x); `None` lets the system choose.
    pub async fn connect_from(
        addr: &RelayAddress,
        local: Option<std::net::IpAddr>,
        t: Timeouts,
    ) -> Result<Self, ClientError> {
        Self::connect_via(&Tcp, addr, local, t).await
    }

    /// Connects over `transport` (TCP, or a stream in memory for tests),
    /// checks the relay's key against the pin, and says Hello.
    pub async fn connect_via(
        transport: &dyn Transport,
        addr: &RelayAddress,
        local: Option<std::net::IpAddr>,
        t: Timeouts,
    ) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: addr.host_port.clone(),
            source,
        };
        let tcp = timeout(t.connect, transport.connect(addr, local))
            .await
            .map_err(|_| connect_err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout")))?
            .map_err(connect_err)?;
        let (cfg, mismatch) = tls::watched_client_config(addr.pin).map_err(connect_err)?;
        let name = ServerName::try_from(addr.host().to_owned()).unwrap_or_else(|_| {
            ServerName::try_from("relay.invalid").unwrap_or_else(|_| unreachable!())
        });
        let stream = timeout(
            t.connect,
            TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
        )
        .await
        .map_err(|_| {
            connect_err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timeout",
            ))
        })?
        .map_err(|e| match mismatch.lock().ok().and_then(|m| *m) {
            Some(found) => ClientError::KeyMismatch {
                addr: addr.host_port.clone(),
                pinned: addr.pin.to_text(),
                found: found.to_text(),
            },
            None => connect_err(e),
        })?;
        let exporter = stream
            .get_ref()
            .1
            .export_keying_material([0u8; 32], relay::EXPORTER_LABEL, None)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (mut rd, wr) = tokio::io::split(stream);
        let waiters: Waiters = Arc::new(Mutex::new(Some(HashMap::new())));
        let (ntx, nrx) = mpsc::unbounded_channel();
        let w2 = waiters.clone();
        let reader = tokio::spawn(async move {
            loop {
                let mut prefix = [0u8; 4];
                if rd.read_exact(&mut prefix).await.is_err() {
                    break;
                }
                let Ok(len) = relay::frame_len(prefix) else {
                    break;
                };
                // Blob data is read after its head straight into a reused
                // buffer of its own (fresh megabyte buffers cost page
                // faults on every piece, and no copy out of the frame is
                // needed); the caller may hand it back with
                // `buffers::give`.
                let mut ty = [0u8; 1];
                if rd.read_exact(&mut ty).await.is_err() {
                    break;
                }
                let decoded = match Response::head_len(ty[0]) {
                    Some(h) if len > h => {
                        let mut head = [0u8; 16];
                        head[0] = ty[0];
                        if rd.read_exact(&mut head[1..h]).await.is_err() {
                            break;
                        }
                        let Ok(rest) = crate::read_pooled(&mut rd, len - h).await else {
                            break;
                        };
                        Response::decode_split(&head[..h], rest)
                    }
                    _ => {
                        let mut body = buffers::take(len);
                        body.resize(len, 0);
                        body[0] = ty[0];
                        if rd.read_exact(&mut body[1..]).await.is_err() {
                            break;
                        }
                        Response::decode_owned(body)
                    }
                };
                let Ok(frame) = decoded else {
                    break;
                };
                if frame.id == 0 {
                    if let Response::Notify { seq } = frame.body {
                        let _ = ntx.send(seq);
                        continue;
                    }
                }
                let waiter = w2
                    .lock()
                    .ok()
                    .and_then(|mut w| w.as_mut().and_then(|m| m.remove(&frame.id)));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(frame.body);
                    }
                    // An error for request 0 is the relay closing on us.
                    None => break,
                }
            }
            // Wake every waiter: their requests will not be answered.
            if let Ok(mut w) = w2.lock() {
                w.take();
            }
        });
        let mut client = Self {
            writer: tokio::sync::Mutex::new(wr),
            waiters,
            next_id: AtomicU32::new(1),
            relay_key: VerifyingKey::from_bytes(&[0u8; 32]).map_err(|_| ClientError::Closed)?,
            challenge: [0; 32],
            exporter,
            notify: Mutex::new(Some(nrx)),
            reader,
            request_timeout: t.connect,
        };
        let hello = client
            .request(Request::Hello {
                version: relay::VERSION,
            })
            .await;
        client.request_timeout = t.request;
        match hello? {
            Response::HelloOk {
                relay_key,
                challenge,
                ..
            } => {
                client.relay_key = VerifyingKey::from_bytes(&relay_key)
                    .map_err(|_| ClientError::Protocol("invalid relay key".into()))?;
                client.challenge = challenge;
                Ok(client)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The relay's Ed25519 key, which signs its refusals.
    pub fn relay_key(&self) -> &VerifyingKey {
        &self.relay_key
    }

    /// Sends a request and waits for its response.
    pub async fn request(&self, req: Request) -> Result<Response, ClientError> {
        let sent = self.send(req).await;
        self.answer(sent).await
    }

    /// Sends a request without waiting: pipelining. Await the receiver for
    /// the response.
    pub async fn send(&self, req: Request) -> Result<oneshot::Receiver<Response>, ClientError> {
        // Never 0 (the relay's pushes), also after wrapping.
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                break id;
            }
        };
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .map_err(|_| ClientError::Closed)?
            .as_mut()
            .ok_or(ClientError::Closed)?
            .insert(id, tx);
        // Room for a submission or forward whole; otherwise for a piece's
        // head (its data is not copied in; a `BlobForward`'s head is the
        // longer) or a small request. Acks and status lists grow it.
        let mut frame = buffers::take(match &req {
            Request::Submit { payload, .. } => payload.len() + 128,
            Request::Forward(f) => f.payload.len() + f.next.addr.len() + 128,
            _ => relay::BLOB_FORWARD_HEAD + 4,
        });
        // A piece's data is written from its own buffer, not copied into
        // the frame (rustls copies it once more into its records).
        let split = req.encode_split(id, &mut frame);
        let mut w = self.writer.lock().await;
        let written = match split {
            Some((data, after)) => write_all_parts(&mut *w, [&frame, data, after]).await,
            None => w.write_all(&frame).await,
        };
        buffers::give(frame);
        // A piece's buffer goes back to the pool it came from.
        match req {
            Request::BlobPut(p) => buffers::give(p.data),
            Request::BlobForward(f) => buffers::give(f.piece.data),
            _ => {}
        }
        written?;
        w.flush().await?;
        Ok(rx)
    }

    /// The Register or Auth request proving `identity` on this connection
    /// (signed over this session's exporter value and challenge).
    pub fn proof(&self, identity: &Identity, register: bool) -> Request {
        let ctx = if register {
            context::REGISTER
        } else {
            context::AUTH
        };
        let signature = identity.sign(ctx, &auth_transcript(&self.exporter, &self.challenge));
        let key = *identity.public().signing_bytes();
        if register {
            Request::Register { key, signature }
        } else {
            Request::Auth { key, signature }
        }
    }

    async fn prove(&self, identity: &Identity, register: bool) -> Result<(), ClientError> {
        match self.request(self.proof(identity, register)).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Authenticates to the mailbox of the bare signing key `key`,
    /// registering it first if the relay has none (PROTOCOL 6.3): what a
    /// relay does at its outbound gateway, where it is a mailbox owner
    /// with its relay key (PROTOCOL 6.8).
    pub async fn owner_with_key(
        &self,
        key: &ed25519_dalek::SigningKey,
    ) -> Result<relay::MailboxId, ClientError> {
        use ed25519_dalek::Signer;
        let public = key.verifying_key().to_bytes();
        let sign = |ctx: &[u8]| {
            let mut msg = ctx.to_vec();
            msg.extend_from_slice(&auth_transcript(&self.exporter, &self.challenge));
            key.sign(&msg).to_bytes()
        };
        let auth = Request::Auth {
            key: public,
            signature: sign(context::AUTH),
        };
        match self.request(auth).await {
            Ok(Response::Ok) => return Ok(relay::MailboxId::of(&public)),
            // No mailbox yet: register one.
            Err(ClientError::Server {
                code: relay::ErrorCode::MailboxState,
                ..
            }) => {}
            Ok(other) => return Err(unexpected(other)),
            Err(e) => return Err(e),
        }
        let register = Request::Register {
            key: public,
            signature: sign(context::REGISTER),
        };
        match self.request(register).await? {
            Response::Ok => Ok(relay::MailboxId::of(&public)),
            other => Err(unexpected(other)),
        }
    }

    /// Proves, on this connection, that it speaks for the relay whose
    /// signing key is `key` (PROTOCOL 6.8): what a forwarding relay does
    /// before it passes items on.
    pub async fn peer_auth(&self, key: &ed25519_dalek::SigningKey) -> Result<(), ClientError> {
        use ed25519_dalek::Signer;
        let mut msg = context::PEER.to_vec();
        msg.extend_from_slice(&auth_transcript(&self.exporter, &self.challenge));
        let req = Request::PeerAuth {
            key: key.verifying_key().to_bytes(),
            signature: key.sign(&msg).to_bytes(),
        };
        match self.request(req).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The relay's key binding (PROTOCOL 6.1), checked against this
    /// connection's pin and the key from its `HelloOk`: what lets a
    /// forwarding relay pass the next relay's refusals on so that the
    /// sender can check them offline.
    pub async fn key_binding(&self, pin: &[u8; 32]) -> Result<relay::KeyBinding, ClientError> {
        match self.request(Request::KeyBinding).await? {
            Response::KeyBinding(b) => {
                if crate::tls::verify_key_binding(pin, &self.relay_key.to_bytes(), &b) {
                    Ok(b)
                } else {
                    Err(ClientError::Protocol(
                        "the relay's key binding does not verify with its pin".into(),
                    ))
                }
            }
            other => Err(unexpected(other)),
        }
    }

    /// Forwards items pipelined (PROTOCOL 6.8): every request is written
    /// before the first answer is awaited; answers come back in the input
    /// order. A refusal must be signed by this relay and name the item,
    /// or it is reported as forged.
    pub async fn forward_many(
        &self,
        items: Vec<relay::Forward>,
    ) -> Vec<Result<Submitted, ClientError>> {
        let mut pending = Vec::with_capacity(items.len());
        for f in items {
            let (mailbox, payload_hash) = (f.mailbox, f.payload_hash);
            let sent = self.send(Request::Forward(f)).await;
            pending.push((mailbox, payload_hash, sent));
        }
        self.answers(pending).await
    }

    /// The answers to pipelined `Submit`s or `Forward`s, in order. Each
    /// waits at most the request timeout; once one did not come in time
    /// the relay is taken as gone and the rest fail at once (a relay that
    /// went silent costs one timeout, not one per request).
    async fn answers(&self, pending: Vec<Sent>) -> Vec<Result<Submitted, ClientError>> {
        let mut out = Vec::with_capacity(pending.len());
        let mut silent = false;
        for (mailbox, payload_hash, sent) in pending {
            if silent {
                out.push(Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the relay did not answer in time",
                ))));
                continue;
            }
            let r = self.submitted(sent, mailbox, payload_hash).await;
            silent = matches!(&r, Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::TimedOut);
            out.push(r);
        }
        out
    }

    /// The answer to a `Submit` or a `Forward` sent.
    async fn submitted(
        &self,
        sent: Result<oneshot::Receiver<Response>, ClientError>,
        mailbox: MailboxId,
        payload_hash: [u8; 32],
    ) -> Result<Submitted, ClientError> {
        match sent {
            Err(e) => Err(e),
            Ok(rx) => match timeout(self.request_timeout, rx).await {
                Err(_) => Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the relay did not answer in time",
                ))),
                Ok(Err(_)) => Err(ClientError::Closed),
                Ok(Ok(Response::Accepted { item_id })) => Ok(Submitted::Accepted { item_id }),
                Ok(Ok(Response::Refused(r))) => self.check_refusal(r, mailbox, payload_hash),
                Ok(Ok(Response::Error { code, message })) => {
                    Err(ClientError::Server { code, message })
                }
                Ok(Ok(other)) => Err(unexpected(other)),
            },
        }
    }

    /// Creates this identity's mailbox (idempotent) and authenticates to it.
    pub async fn register(&self, identity: &Identity) -> Result<MailboxId, ClientError> {
        self.prove(identity, true).await?;
        Ok(MailboxId::of(identity.public().signing_bytes()))
    }

    /// Authenticates to this identity's existing mailbox.
    pub async fn auth(&self, identity: &Identity) -> Result<MailboxId, ClientError> {
        self.prove(identity, false).await?;
        Ok(MailboxId::of(identity.public().signing_bytes()))
    }

    /// A refusal is the relay's answer to a submission only if it names
    /// that submission (`mailbox`, `hash`) and the relay's key signed it.
    fn check_refusal(
        &self,
        r: Refusal,
        mailbox: MailboxId,
        hash: [u8; 32],
    ) -> Result<Submitted, ClientError> {
        if r.mailbox != mailbox || r.payload_hash != hash {
            Err(ClientError::ForgedRefusal(Forged::OtherSubmission))
        } else if r.verify(&self.relay_key) {
            Ok(Submitted::Refused(r))
        } else {
            Err(ClientError::ForgedRefusal(Forged::NotSigned))
        }
    }

    pub async fn submit(
        &self,
        mailbox: MailboxId,
        expires_at: u64,
        payload: Vec<u8>,
    ) -> Result<Submitted, ClientError> {
        let payload_hash = *blake3::hash(&payload).as_bytes();
        match self
            .request(Request::Submit {
                mailbox,
                expires_at,
                payload_hash,
                payload,
            })
            .await?
        {
            Response::Accepted { item_id } => Ok(Submitted::Accepted { item_id }),
            Response::Refused(r) => self.check_refusal(r, mailbox, payload_hash),
            other => Err(unexpected(other)),
        }
    }

    /// Submits many messages pipelined: every request is written before
    /// the first answer is awaited. Answers come back in the input order.
    /// A refusal must be signed by the relay and name this submission's
    /// mailbox and payload hash, or it is reported as forged.
    pub async fn submit_many(
        &self,
        items: Vec<(MailboxId, u64, Vec<u8>)>,
    ) -> Vec<Result<Submitted, ClientError>> {
        let mut pending = Vec::with_capacity(items.len());
        for (mailbox, expires_at, payload) in items {
            let payload_hash = *blake3::hash(&payload).as_bytes();
            let sent = self
                .send(Request::Submit {
                    mailbox,
                    expires_at,
                    payload_hash,
                    payload,
                })
                .await;
            pending.push((mailbox, payload_hash, sent));
        }
        self.answers(pending).await
    }

    pub async fn fetch(&self, after: u64, max: u32) -> Result<(Vec<Item>, bool), ClientError> {
        match self.request(Request::Fetch { after, max }).await? {
            Response::Items { items, more } => Ok((items, more)),
            other => Err(unexpected(other)),
        }
    }

    /// Asks for pushes of new items; returns the receiver of their seqs (a
    /// seq of 0 means "some were missed, fetch from your cursor").
    pub async fn subscribe(&self) -> Result<mpsc::UnboundedReceiver<u64>, ClientError> {
        match self.request(Request::Subscribe).await? {
            Response::Ok => {}
            other => return Err(unexpected(other)),
        }
        self.notify
            .lock()
            .map_err(|_| ClientError::Closed)?
            .take()
            .ok_or_else(|| ClientError::Protocol("already subscribed".into()))
    }

    pub async fn ack(&self, seqs: Vec<u64>) -> Result<u32, ClientError> {
        match self.request(Request::Ack { seqs }).await? {
            Response::Acked { count } => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    /// Uploads one piece of a blob; returns (stored length, complete). A
    /// stored length other than `offset + data.len()` means: resume there.
    pub async fn blob_put(
        &self,
        piece: BlobPiece,
    ) -> Result<Result<(u64, bool), Submitted>, ClientError> {
        let p = self.blob_put_send(piece).await;
        self.blob_put_answer(p).await
    }

    /// How much of this connection's own mailbox's blob `blob_id` the
    /// relay holds (a recipient following an upload; a sender at its own
    /// relay, which forwards).
    pub async fn blob_status(&self, blob_id: BlobId) -> Result<(u64, bool), ClientError> {
        self.blob_status_of(blob_id, None).await
    }

    /// How much of blob `blob_id` the relay holds for `mailbox` (an
    /// uploader resuming: a blob is named by its id within a mailbox).
    pub async fn blob_status_for(
        &self,
        blob_id: BlobId,
        mailbox: relay::MailboxId,
    ) -> Result<(u64, bool), ClientError> {
        self.blob_status_of(blob_id, Some(mailbox)).await
    }

    /// [`RelayClient::blob_status_for`] `mailbox`, or [`RelayClient::blob_status`] with `None`.
    pub async fn blob_status_of(
        &self,
        blob_id: BlobId,
        mailbox: Option<relay::MailboxId>,
    ) -> Result<(u64, bool), ClientError> {
        match self
            .request(Request::BlobStatus { blob_id, mailbox })
            .await?
        {
            Response::BlobStored { stored, complete } => Ok((stored, complete)),
            other => Err(unexpected(other)),
        }
    }

    /// Waits for a pipelined answer: a timeout, a closed connection and an
    /// `Error` response become errors.
    async fn answer(
        &self,
        sent: Result<oneshot::Receiver<Response>, ClientError>,
    ) -> Result<Response, ClientError> {
        match timeout(self.request_timeout, sent?).await {
            Err(_) => Err(ClientError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "the relay did not answer in time",
            ))),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(Response::Error { code, message })) => Err(ClientError::Server { code, message }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Sends one blob piece without waiting for its answer, so that the
    /// next pieces can be encrypted and sent meanwhile (the relay stores a
    /// connection's pieces in order). Await the answer with
    /// [`RelayClient::blob_put_answer`].
    pub async fn blob_put_send(&self, piece: BlobPiece) -> PendingPiece {
        let (mailbox, refusal_hash) = (piece.mailbox, piece.refusal_hash());
        PendingPiece {
            sent: self.send(Request::BlobPut(piece)).await,
            mailbox,
            refusal_hash,
        }
    }

    /// Sends a piece as its sender does: a `BlobPut` to the relay that
    /// holds its mailbox, or with `via` a `BlobForward` (hops 0) for this
    /// relay to pass on toward that one. Answered as a `BlobPut`.
    pub async fn blob_piece_send(
        &self,
        via: Option<&relay::NextHop>,
        piece: BlobPiece,
    ) -> PendingPiece {
        match via {
            Some(next) => self.blob_forward_send(0, next.clone(), piece).await,
            None => self.blob_put_send(piece).await,
        }
    }

    /// Which of this mailbox's forwarded items (mailbox, payload hash)
    /// still wait in the relay's forward queue (§6.8): `None` for one it
    /// handed on (or ended with a notice). At most 512.
    pub async fn forward_status(
        &self,
        items: Vec<(relay::MailboxId, [u8; 32])>,
    ) -> Result<Vec<Option<relay::Waiting>>, ClientError> {
        let n = items.len();
        match self.request(Request::ForwardStatus { items }).await? {
            Response::ForwardStatus { items } if items.len() == n => Ok(items),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a piece for a relay to pass on toward `next` (`BlobForward`,
    /// §6.8), pipelined; its answer is read with
    /// [`RelayClient::blob_put_answer`], as a `BlobPut`'s (the relay that
    /// holds the mailbox answers it as one; a forwarding relay answers for
    /// its own copy).
    pub async fn blob_forward_send(
        &self,
        hops: u8,
        next: relay::NextHop,
        piece: BlobPiece,
    ) -> PendingPiece {
        let (mailbox, refusal_hash) = (piece.mailbox, piece.refusal_hash());
        PendingPiece {
            sent: self
                .send(Request::BlobForward(relay::BlobForward {
                    hops,
                    next,
                    piece,
                }))
                .await,
            mailbox,
            refusal_hash,
        }
    }

    /// The answer to a piece: how much of the blob the relay holds and
    /// whether it is whole, or its refusal. A refusal must be signed by the
    /// relay and name this piece's mailbox and refusal hash (its blob id
    /// and offset, §6.5), or it is reported as forged.
    pub async fn blob_put_answer(
        &self,
        p: PendingPiece,
    ) -> Result<Result<(u64, bool), Submitted>, ClientError> {
        match self.answer(p.sent).await? {
            Response::BlobStored { stored, complete } => Ok(Ok((stored, complete))),
            Response::Refused(r) => self.check_refusal(r, p.mailbox, p.refusal_hash).map(Err),
            other => Err(unexpected(other)),
        }
    }

    /// Reads several ranges of a blob pipelined; answers in order.
    pub async fn blob_get_many(
        &self,
        blob_id: BlobId,
        ranges: &[(u64, u32)],
    ) -> Vec<Result<Vec<u8>, ClientError>> {
        let mut sent = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            sent.push(self.blob_get_send(blob_id, offset, len).await);
        }
        let mut out = Vec::with_capacity(sent.len());
        for p in sent {
            out.push(self.blob_get_answer(p).await);
        }
        out
    }

    pub async fn blob_get(
        &self,
        blob_id: BlobId,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let p = self.blob_get_send(blob_id, offset, len).await;
        self.blob_get_answer(p).await
    }

    /// Asks for a range of a blob without waiting for it (see
    /// [`RelayClient::blob_get_answer`]), so that several are in flight.
    pub async fn blob_get_send(&self, blob_id: BlobId, offset: u64, len: u32) -> PendingRange {
        PendingRange {
            sent: self
                .send(Request::BlobGet {
                    blob_id,
                    offset,
                    len,
                })
                .await,
            offset,
        }
    }

    /// The bytes of a range asked for (fewer at the end of what is stored;
    /// in a reused buffer, which the caller may hand back with
    /// `buffers::give`).
    pub async fn blob_get_answer(&self, p: PendingRange) -> Result<Vec<u8>, ClientError> {
        match self.answer(p.sent).await? {
            Response::BlobData { offset, data } if offset == p.offset => Ok(data),
            other => Err(unexpected(other)),
        }
    }

    pub async fn blob_delete(&self, blob_id: BlobId) -> Result<(), ClientError> {
        match self.request(Request::BlobDelete { blob_id }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Opens a pairing slot for `ttl` seconds (PROTOCOL §10): its number
    /// and when it ends (the relay's clock, unix seconds).
    pub async fn pair_open(&self, ttl: u32) -> Result<(u32, u64), ClientError> {
        match self.request(Request::PairOpen { ttl }).await? {
            Response::PairOpened { slot, expires_at } => Ok((slot, expires_at)),
            other => Err(unexpected(other)),
        }
    }

    /// Joins pairing slot `slot` with the first message for its opener.
    pub async fn pair_join(&self, slot: u32, data: Vec<u8>) -> Result<(), ClientError> {
        match self.request(Request::PairJoin { slot, data }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Puts a message in pairing slot `slot` for the other side.
    pub async fn pair_send(&self, slot: u32, data: Vec<u8>) -> Result<(), ClientError> {
        match self.request(Request::PairSend { slot, data }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The other side's next message in `slot`, waiting up to `wait` for
    /// it (the relay may answer sooner, with nothing: `None`).
    pub async fn pair_wait(
        &self,
        slot: u32,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let wait_ms = wait.as_millis().min(u32::MAX as u128) as u32;
        match self.request(Request::PairWait { slot, wait_ms }).await? {
            Response::PairMessage { data } if data.is_empty() => Ok(None),
            Response::PairMessage { data } => Ok(Some(data)),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves pairing slot `slot`: the other side is told, no one may join.
    pub async fn pair_leave(&self, slot: u32) -> Result<(), ClientError> {
        match self.request(Request::PairLeave { slot }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// (items, bytes used, quota) of the authenticated mailbox.
    pub async fn status(&self) -> Result<(u64, u64, u64), ClientError> {
        match self.request(Request::Status).await? {
            Response::Status {
                items,
                bytes,
                quota,
            } => Ok((items, bytes, quota)),
            other => Err(unexpected(other)),
        }
    }

    /// What the relay accepts from a sender (advisory: see
    /// [`RelayLimits`]). `None` from a relay that predates the request.
    pub async fn limits(&self) -> Result<Option<RelayLimits>, ClientError> {
        match self.request(Request::Limits).await {
            Ok(Response::Limits {
                max_message,
                max_blob,
                mailbox_quota,
            }) => Ok(Some(RelayLimits {
                max_message: u64::from(max_message),
                max_blob,
                mailbox_quota,
            })),
            Err(ClientError::Server {
                code: ErrorCode::BadRequest,
                ..
            }) => Ok(None),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(e),
        }
    }
}

/// A relay's stated limits on what one sender may submit. Advisory: the
/// relay's signed refusal stays the proof that something was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Largest sealed message, bytes.
    pub max_message: u64,
    /// Largest file blob (sealed file), bytes.
    pub max_blob: u64,
    /// Bytes one mailbox may hold.
    pub mailbox_quota: u64,
}

/// Writes `parts` whole and in order, vectored: rustls builds its records
/// across them, so a frame in parts goes out as the same records as if it
/// were one buffer.
async fn write_all_parts<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    mut parts: [&[u8]; 3],
) -> io::Result<()> {
    let mut i = 0;
    loop {
        while i < parts.len() && parts[i].is_empty() {
            i += 1;
        }
        if i == parts.len() {
            return Ok(());
        }
        let slices: [io::IoSlice<'_>; 3] =
            std::array::from_fn(|k| io::IoSlice::new(parts.get(i + k).copied().unwrap_or(&[])));
        let mut n = w.write_vectored(&slices[..parts.len() - i]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < parts.len() {
            let take = n.min(parts[i].len());
            parts[i] = &parts[i][take..];
            n -= take;
            if parts[i].is_empty() {
                i += 1;
            }
        }
    }
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that takes at most `max` bytes a call, vectored or not.
    struct Trickle {
        got: Vec<u8>,
        max: usize,
        calls: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            let n = buf.len().min(this.max);
            this.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(this.max - n);
                this.got.extend_from_slice(&b[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The parts arrive whole and in order however little each call takes,
    /// with empty parts anywhere; a large call takes them in one.
    #[tokio::test]
    async fn parts_are_written_whole_and_in_order() {
        let a: Vec<u8> = (0..100u8).collect();
        let b: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let c = b"127.0.0.1:9".to_vec();
        for max in [1, 3, 99, 100, 101, 4096, 5100, 1 << 20] {
            for parts in [
                [&a[..], &b[..], &c[..]],
                [&a[..], &b[..], &[][..]],
                [&[][..], &b[..], &c[..]],
                [&a[..], &[][..], &c[..]],
            ] {
                let mut w = Trickle {
                    got: Vec::new(),
                    max,
                    calls: 0,
                };
                write_all_parts(&mut w, parts).await.expect("written");
                assert_eq!(w.got, parts.concat(), "max {max}");
                if max >= parts.concat().len() {
                    assert_eq!(w.calls, 1);
                }
            }
        }
    }
}
