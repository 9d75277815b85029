//! The relay server: a TLS listener whose connections speak the relay
//! protocol (`sealpost_proto::relay`) against the durable store.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore};
use sealpost_proto::buffers;
use sealpost_proto::codec::DecodeError;
use sealpost_proto::relay::{
    self, auth_transcript, context, BlobPiece, ErrorCode, Frame, MailboxId, Refusal, RefusalCode,
    Request, Response,
};
use sealpost_store::{BlobPutOutcome, BlobRead, Limits, Registered, Source, Store, SubmitOutcome};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use zeroize::Zeroizing;

use crate::limits::{PerAddress, TokenBucket};
use crate::tamper::{ForgedRefusal, OnSubmit, Tamper};
use crate::tls::{self, Pin, RelayAddress};

/// Everything a relay is configured with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub limits: Limits,
    pub max_connections: usize,
    /// Connections one source address may hold open at once: one address
    /// cannot take every slot.
    pub max_connections_per_address: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a connection that has not authenticated to a mailbox may
    /// stay silent between requests (a sender submits and goes; an owner's
    /// agent authenticates and may then idle for `idle_timeout`).
    pub unauthenticated_idle_timeout: Duration,
    /// Time allowed to receive the rest of a frame once it started: a
    /// client trickling bytes (slow loris) is cut off after this.
    pub frame_timeout: Duration,
    pub sweep_interval: Duration,
    /// A configured certificate and key (PEM) instead of the self-signed one.
    pub cert_files: Option<(PathBuf, PathBuf)>,
    /// Names for the self-signed certificate.
    pub cert_names: Vec<String>,
    /// Submissions one connection may have waiting for their commit.
    pub max_in_flight: usize,
    /// Payload bytes one connection may have waiting for their commit.
    pub max_in_flight_bytes: usize,
    /// Payload bytes all connections together may have waiting: with the
    /// per-connection bound and the response queue bound this caps the
    /// memory a flood of large submissions can take.
    pub max_total_in_flight_bytes: usize,
    /// Requests per second one connection may make (and its burst).
    pub rate_per_connection: (f64, f64),
    /// New connections per second from one address (and its burst).
    pub rate_per_address: (f64, f64),
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Who may register a new mailbox (the cap is `limits.max_mailboxes`).
    pub registration: Registration,
    /// Largest message (sealed container) taken by `Submit`; at most
    /// `relay::MAX_MESSAGE`.
    pub max_message: usize,
    /// A misbehaving relay for tests and demonstrations (never set in
    /// normal operation); see [`crate::tamper`].
    pub tamper: Option<Arc<dyn Tamper>>,
    /// The `HOST:PORT` agents connect to, if known: kept with the key's pin
    /// in `DATA/address` (for `relay address`), written before the
    /// listener is bound so no client can reach a relay whose kept address
    /// is still a previous run's. `None` removes the file.
    pub public_address: Option<String>,
}

/// Who may register a new mailbox on a relay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Registration {
    /// Any key: a relay anyone may get a mailbox on (the default).
    #[default]
    Open,
    /// Only these Ed25519 signing keys (from contact cards).
    AllowList(std::collections::HashSet<[u8; 32]>),
    /// No new mailboxes; existing ones go on working.
    Closed,
}

impl Registration {
    /// Why a new mailbox for `key` is refused, if it is.
    pub fn refuses(&self, key: &[u8; 32]) -> Option<&'static str> {
        match self {
            Self::Open => None,
            Self::AllowList(keys) if keys.contains(key) => None,
            Self::AllowList(_) => Some(
                "this relay registers only the keys its operator allowed; send them your card (`sealpost id`)",
            ),
            Self::Closed => Some("this relay registers no new mailboxes"),
        }
    }
}

impl Config {
    pub fn new(listen: SocketAddr, data: PathBuf) -> Self {
        Self {
            listen,
            data,
            limits: Limits::default(),
            max_connections: 4096,
            max_connections_per_address: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            unauthenticated_idle_timeout: Duration::from_secs(30),
            frame_timeout: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(60),
            cert_files: None,
            cert_names: Vec::new(),
            max_in_flight: 1024,
            max_in_flight_bytes: 16 << 20,
            max_total_in_flight_bytes: 128 << 20,
            rate_per_connection: (50_000.0, 10_000.0),
            rate_per_address: (500.0, 2_000.0),
            metrics: None,
            registration: Registration::Open,
            max_message: relay::MAX_MESSAGE,
            tamper: None,
            public_address: None,
        }
    }
}

/// Counters for `relay status` and metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_refused: AtomicU64,
    pub accepted: AtomicU64,
    pub accepted_bytes: AtomicU64,
    pub refused: AtomicU64,
    pub fetched: AtomicU64,
    pub acked: AtomicU64,
    pub blob_bytes: AtomicU64,
    pub bad_frames: AtomicU64,
    pub auth_failures: AtomicU64,
    pub timeouts: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Connections refused because their address held its share of slots.
    pub refused_per_address: AtomicU64,
    /// Unauthenticated idle connections closed to make room for new ones.
    pub evicted: AtomicU64,
    /// Store writes that failed (disk full, I/O errors).
    pub storage_errors: AtomicU64,
    /// When a storage error was last logged (unix seconds).
    pub storage_error_logged_at: AtomicU64,
    /// Registrations of new mailboxes the policy or the cap refused.
    pub registrations_refused: AtomicU64,
    /// Refusals by `RefusalCode::code()` (index 0 unused).
    pub refused_by_code: [AtomicU64; 6],
}

struct Shared {
    store: Store,
    key: SigningKey,
    tls: TlsAcceptor,
    /// Connections subscribed to each mailbox: a new item is pushed to
    /// those only (a broadcast woke every subscribed connection's task for
    /// every item).
    subscribers: std::sync::Mutex<HashMap<MailboxId, Vec<Subscriber>>>,
    metrics: Arc<Metrics>,
    config: Config,
    conns: Arc<Semaphore>,
    /// Payload bytes waiting for commits, over all connections.
    total_bytes: Arc<Semaphore>,
    per_address: std::sync::Mutex<PerAddress>,
    /// Open connections per source address.
    open_per_address: std::sync::Mutex<HashMap<IpAddr, usize>>,
    /// Connections not (yet) authenticated to a mailbox, oldest first: the
    /// first to be closed when every slot is taken.
    unauthenticated: std::sync::Mutex<BTreeMap<u64, Arc<Evictable>>>,
    next_connection: AtomicU64,
    /// New connections waiting for an evicted one's slot (bounded).
    admissions: Arc<Semaphore>,
    /// True once the relay stops: every connection closes.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The data directory's lock, held until the relay has stopped (its
    /// connections closed and its store closed).
    lock: std::sync::Mutex<Option<std::fs::File>>,
}

/// A subscribed connection: its id, its answer queue, and whether a push
/// is owed to it (its queue was full when an item came).
type Subscriber = (u64, Out, Arc<std::sync::atomic::AtomicBool>);

/// A connection's subscription to its mailbox, in
/// [`Shared::subscribers`] for as long as this lives (dropped with the
/// connection, however it ends).
struct Subscription {
    shared: Arc<Shared>,
    mailbox: MailboxId,
    id: u64,
}

impl Subscription {
    fn new(s: &Arc<Shared>, mailbox: MailboxId, out: Out) -> Self {
        let id = s.next_connection.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut subs) = s.subscribers.lock() {
            subs.entry(mailbox)
                .or_default()
                .push((id, out, Arc::default()));
        }
        Self {
            shared: s.clone(),
            mailbox,
            id,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut subs) = self.shared.subscribers.lock() {
            if let Some(list) = subs.get_mut(&self.mailbox) {
                list.retain(|(id, _, _)| *id != self.id);
                if list.is_empty() {
                    subs.remove(&self.mailbox);
                }
            }
        }
    }
}

/// Pushes `Notify { seq }` to the connections subscribed to `mailbox`. A
/// connection whose queue is full (it does not read its answers) is owed
/// one `Notify { seq: 0 }` ("fetch from your cursor"), sent by one task
/// when there is room: however many items arrive meanwhile, a connection
/// has at most one push waiting.
fn push(s: &Shared, mailbox: &MailboxId, seq: u64) {
    let subs: Vec<(Out, Arc<std::sync::atomic::AtomicBool>)> = match s.subscribers.lock() {
        Ok(subs) => match subs.get(mailbox) {
            Some(list) => list
                .iter()
                .map(|(_, o, owed)| (o.clone(), owed.clone()))
                .collect(),
            None => return,
        },
        Err(_) => return,
    };
    for (out, owed) in subs {
        let frame = Outgoing::Frame(Response::Notify { seq }.encode(0));
        let full = matches!(out.try_send(frame), Err(mpsc::error::TrySendError::Full(_)));
        if full && !owed.swap(true, Ordering::AcqRel) {
            tokio::spawn(async move {
                if let Ok(room) = out.reserve().await {
                    // Cleared before the push is queued: an item that
                    // comes after this is pushed (or owed) anew, one that
                    // came before is covered by this push.
                    owed.store(false, Ordering::Release);
                    room.send(Outgoing::Frame(Response::Notify { seq: 0 }.encode(0)));
                }
            });
        }
    }
}

/// A bound relay, ready to serve.
pub struct Relay {
    shared: Arc<Shared>,
    listener: TcpListener,
    address: RelayAddress,
    created_cert: bool,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Relay({})", self.address)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The relay's signing key (for refusals), created on first start
/// (written whole or not at all; an empty file, left by versions that
/// created it before writing it, never signed anything and is replaced).
fn load_or_create_key(path: &Path) -> io::Result<SigningKey> {
    match std::fs::read(path) {
        Ok(bytes) if !bytes.is_empty() => {
            let bytes = Zeroizing::new(bytes);
            let seed: Zeroizing<[u8; 32]> =
                Zeroizing::new(bytes.as_slice().try_into().map_err(|_| {
                    io::Error::other(format!(
                        "{} is not a 32-byte key ({} bytes); restore it from a backup",
                        path.display(),
                        bytes.len()
                    ))
                })?);
            return Ok(SigningKey::from_bytes(&seed));
        }
        Ok(_) => tracing::warn!(
            "{} is empty (a first start was interrupted); making a new key",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(seed.as_mut());
    tls::write_private(path, seed.as_ref())?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Takes the data directory's lock (`relay.lock`, held while the relay
/// runs), so a second relay on the same directory is refused instead of
/// sharing its store and blob files.
fn lock_data_dir(data: &Path) -> io::Result<std::fs::File> {
    let path = data.join("relay.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another relay is running on {} (it holds {}); stop it first or use another --data",
                data.display(),
                path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

impl Relay {
    /// Opens the store, loads or creates the certificate and keys, and
    /// binds the listener.
    pub async fn bind(config: Config) -> io::Result<Self> {
        std::fs::create_dir_all(&config.data)?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Keys, certificate and store: the relay's user's alone.
            std::fs::set_permissions(&config.data, std::fs::Permissions::from_mode(0o700))?;
        }
        let lock = lock_data_dir(&config.data)?;
        let (cert, created_cert) = match &config.cert_files {
            Some((c, k)) => (tls::load(c, k)?, false),
            None => tls::load_or_create(&config.data, &config.cert_names)?,
        };
        let key = load_or_create_key(&config.data.join("relay-signing.key"))?;
        let store =
            Store::open(&config.data.join("store"), config.limits).map_err(io::Error::other)?;
        let kept = config.data.join("address");
        match &config.public_address {
            Some(host_port) => {
                let a = RelayAddress {
                    host_port: host_port.clone(),
                    pin: cert.pin,
                };
                tls::write_private(&kept, format!("{}\n", a.to_checked_text()).as_bytes())?;
            }
            None => match std::fs::remove_file(&kept) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
        }
        let listener = TcpListener::bind(config.listen).await?;
        // Before serving: no upload of ours is in progress.
        let orphans = store.remove_orphan_blobs().map_err(io::Error::other)?;
        if orphans > 0 {
            tracing::info!("removed {orphans} blob files no blob row named");
        }
        let local = listener.local_addr()?;
        let tls = TlsAcceptor::from(Arc::new(tls::server_config(&cert)?));
        let address = RelayAddress {
            host_port: local.to_string(),
            pin: cert.pin,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                key,
                tls,
                subscribers: std::sync::Mutex::new(HashMap::new()),
                metrics: Arc::new(Metrics::default()),
                conns: Arc::new(Semaphore::new(config.max_connections)),
                total_bytes: Arc::new(Semaphore::new(
                    config.max_total_in_flight_bytes.max(relay::MAX_FRAME),
                )),
                per_address: std::sync::Mutex::new(PerAddress::new(
                    config.rate_per_address.0,
                    config.rate_per_address.1,
                    std::time::Instant::now(),
                )),
                open_per_address: std::sync::Mutex::new(HashMap::new()),
                unauthenticated: std::sync::Mutex::new(BTreeMap::new()),
                next_connection: AtomicU64::new(0),
                admissions: Arc::new(Semaphore::new(64)),
                stopping: tokio::sync::watch::channel(false).0,
                lock: std::sync::Mutex::new(Some(lock)),
                config,
            }),
            listener,
            address,
            created_cert,
        })
    }

    pub fn address(&self) -> &RelayAddress {
        &self.address
    }

    pub fn pin(&self) -> Pin {
        self.address.pin
    }

    pub fn created_cert(&self) -> bool {
        self.created_cert
    }

    pub fn relay_key(&self) -> VerifyingKey {
        self.shared.key.verifying_key()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    pub fn store(&self) -> Store {
        self.shared.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and waits
    /// for every write already accepted by the store to commit.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let shared = self.shared.clone();
        let sweeper = tokio::spawn(sweep_loop(shared.clone()));
        let metrics_task = match shared.config.metrics {
            Some(addr) => {
                let l = TcpListener::bind(addr).await?;
                Some(tokio::spawn(crate::metrics::serve(
                    l,
                    shared.metrics.clone(),
                    shared.store.clone(),
                )))
            }
            None => None,
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let allowed = shared
                        .per_address
                        .lock()
                        .map(|mut p| p.try_take(peer.ip(), std::time::Instant::now()))
                        .unwrap_or(true);
                    if !allowed {
                        shared.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                        shared.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                        drop(tcp);
                        continue;
                    }
                    let Some(slot) = AddressSlot::take(&shared, peer.ip()) else {
                        shared.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                        shared.metrics.refused_per_address.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "refused: the address holds its share of connections");
                        drop(tcp);
                        continue;
                    };
                    match shared.conns.clone().try_acquire_owned() {
                        Ok(permit) => start_connection(shared.clone(), tcp, peer, permit, slot),
                        // Every slot is taken: close the oldest connection
                        // that has not authenticated, and give its slot to
                        // this one (waiting a little, off the accept loop).
                        Err(_) => match shared.admissions.clone().try_acquire_owned() {
                            Ok(admission) if shared.evict_oldest_unauthenticated() => {
                                let s = shared.clone();
                                tokio::spawn(async move {
                                    let got = timeout(Duration::from_secs(1), s.conns.clone().acquire_owned()).await;
                                    drop(admission);
                                    match got {
                                        Ok(Ok(permit)) => start_connection(s, tcp, peer, permit, slot),
                                        _ => {
                                            s.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                });
                            }
                            _ => {
                                shared.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                                drop(tcp);
                            }
                        },
                    }
                }
            }
        }
        sweeper.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        // Close every connection and wait (a bounded time) until all of
        // them have given their slots back.
        let _ = shared.stopping.send(true);
        let all = u32::try_from(shared.config.max_connections).unwrap_or(u32::MAX);
        if timeout(Duration::from_secs(10), shared.conns.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("connections still closing after 10 s; stopping anyway");
        }
        let store = shared.store.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(io::Error::other)?;
        // Another relay may use the data directory from now on.
        if let Ok(mut l) = shared.lock.lock() {
            l.take();
        }
        Ok(())
    }
}

/// One open connection counted against its source address; given back
/// when dropped.
struct AddressSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl AddressSlot {
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let mut open = shared.open_per_address.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= shared.config.max_connections_per_address {
            return None;
        }
        *n += 1;
        Some(Self {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.shared.open_per_address.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

/// A connection that may be closed to make room: one not authenticated to
/// a mailbox, while it waits idle (in its TLS handshake, or between
/// requests). A connection busy with a request — a sender in the middle
/// of an upload — is never chosen.
struct Evictable {
    shared: Arc<Shared>,
    /// Connection number: the oldest (smallest) idle one goes first.
    id: u64,
    evict: Notify,
}

impl Evictable {
    fn new(shared: &Arc<Shared>) -> Self {
        Self {
            shared: shared.clone(),
            id: shared.next_connection.fetch_add(1, Ordering::Relaxed),
            evict: Notify::new(),
        }
    }

    /// Waits for `fut` while listed as evictable; an eviction ends the
    /// wait with `ConnectionAborted`.
    async fn idle<T>(self: &Arc<Self>, fut: impl Future<Output = T>) -> io::Result<T> {
        if let Ok(mut m) = self.shared.unauthenticated.lock() {
            m.insert(self.id, self.clone());
        }
        // Off the list however the wait ends (even if it is dropped).
        let _listed = Listed(self);
        tokio::select! {
            v = fut => Ok(v),
            _ = self.evict.notified() => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room (relay full)",
            )),
        }
    }
}

/// Removes a connection from the evictable ones when dropped.
struct Listed<'a>(&'a Evictable);

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.shared.unauthenticated.lock() {
            m.remove(&self.0.id);
        }
    }
}

impl Shared {
    /// Tells the oldest connection listed as evictable (unauthenticated
    /// and waiting idle, see [`Evictable`]) to close; it does at once.
    /// False if there is none.
    fn evict_oldest_unauthenticated(&self) -> bool {
        let oldest = self
            .unauthenticated
            .lock()
            .ok()
            .and_then(|mut m| m.pop_first());
        match oldest {
            Some((_, conn)) => {
                conn.evict.notify_one();
                self.metrics.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

fn start_connection(
    s: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    slot: AddressSlot,
) {
    tokio::spawn(async move {
        s.metrics.connections.fetch_add(1, Ordering::Relaxed);
        s.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        let mut stopping = s.stopping.subscribe();
        tokio::select! {
            r = connection(s.clone(), tcp, peer) => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            }
            // The relay stops: the connection closes where it is (an
            // answer not sent was not an acknowledgement).
            _ = stopping.wait_for(|stop| *stop) => {}
        }
        s.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
        drop(slot);
    });
}

async fn sweep_loop(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.config.sweep_interval);
    loop {
        tick.tick().await;
        match s.store.sweep(now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("expired {n} items and blobs"),
            Err(e) => tracing::warn!("expiry sweep failed: {e}"),
        }
    }
}

type Out = mpsc::Sender<Outgoing>;

/// What the writer sends: a whole frame, or a frame's head followed by
/// blob bytes shared from the pieces kept in memory (not copied).
enum Outgoing {
    Frame(Vec<u8>),
    Shared(Vec<u8>, sealpost_store::KeptBytes),
}

async fn send(out: &Out, id: u32, r: Response) -> io::Result<()> {
    send_frame(out, r.encode(id)).await
}

async fn send_frame(out: &Out, frame: Vec<u8>) -> io::Result<()> {
    send_out(out, Outgoing::Frame(frame)).await
}

async fn send_out(out: &Out, o: Outgoing) -> io::Result<()> {
    out.send(o)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))
}

fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

/// The largest frame of a request type read whole (not in two parts): an
/// `Ack` of `MAX_BATCH` seqs. A larger frame of such a type cannot be
/// valid and is refused before its body is read.
const MAX_SMALL_REQUEST: usize = 1 + 4 + 2 + relay::MAX_BATCH * 8;
/// The largest frame taken before `Hello` (which is 6 bytes).
const MAX_BEFORE_HELLO: usize = 16;

/// Where a connection is: what it may send next, and how long it may wait.
#[derive(Clone, Copy)]
struct Stage {
    hello: bool,
    idle: Duration,
    frame: Duration,
}

/// A request read off the wire, with the relay's byte budget its body
/// took (a submission or blob piece), if any.
struct Read {
    frame: Result<Frame<Request>, DecodeError>,
    budget: Option<OwnedSemaphorePermit>,
}

/// Reads one frame body and decodes it; `None` on a clean end of stream
/// between frames.
///
/// Memory is bounded before the peer has proven anything: before `Hello`
/// only a Hello-sized frame is read; a request type read whole is refused
/// above the largest valid one and its buffer grows only as its bytes
/// arrive; a submission's or blob piece's data (up to 1 MiB) is taken from
/// the relay-wide budget of bytes in flight 64 KiB at a time, before each
/// step is read (see [`read_budgeted`]). That data is read straight into a
/// buffer of its own (reused: fresh megabyte buffers cost page faults on
/// every frame), so it is not copied out of the frame afterwards.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    stage: Stage,
    budget: &Arc<Semaphore>,
    evictable: Option<&Arc<Evictable>>,
) -> io::Result<Option<Read>> {
    let mut prefix = [0u8; 4];
    let wait = timeout(stage.idle, rd.read(&mut prefix[..1]));
    let first = match evictable {
        Some(e) => e.idle(wait).await?,
        None => wait.await,
    }
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle timeout"))??;
    if first == 0 {
        return Ok(None);
    }
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    timeout(stage.frame, async {
        rd.read_exact(&mut prefix[1..]).await?;
        let len = relay::frame_len(prefix).map_err(|e| invalid(e.to_string()))?;
        let mut ty = [0u8; 1];
        rd.read_exact(&mut ty).await?;
        if !stage.hello && (ty[0] != 0x01 || len > MAX_BEFORE_HELLO) {
            return Err(invalid("the first request must be Hello".into()));
        }
        Ok::<_, io::Error>(match Request::head_len(ty[0]) {
            Some(h) if len > h => {
                let mut head = [0u8; 128];
                head[0] = ty[0];
                rd.read_exact(&mut head[1..h]).await?;
                let (rest, taken) = read_budgeted(rd, len - h, budget).await?;
                Read {
                    frame: Request::decode_split(&head[..h], rest),
                    budget: Some(taken),
                }
            }
            Some(_) => read_whole(rd, ty[0], len).await?,
            None if len > MAX_SMALL_REQUEST => {
                return Err(invalid(format!(
                    "a request of type {:#04x} is at most {MAX_SMALL_REQUEST} bytes; this one says {len}",
                    ty[0]
                )));
            }
            None => read_whole(rd, ty[0], len).await?,
        })
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "frame timeout (too slow)"))?
    .map(Some)
}

/// The step in which a request's data is read and budgeted.
const BUDGET_STEP: usize = 64 * 1024;

/// Reads `n` bytes of a request's data, taking the relay-wide budget for
/// each step of 64 KiB before reading it: what a client holds is what it
/// sent, never what it announced, so a crowd announcing megabytes and
/// sending nothing holds nothing, and honest small requests are not kept
/// waiting behind it. The bytes land in a reused buffer's spare capacity
/// (no zeroing; pages are touched only as data arrives).
async fn read_budgeted<R: AsyncRead + Unpin>(
    rd: &mut R,
    n: usize,
    budget: &Arc<Semaphore>,
) -> io::Result<(Vec<u8>, OwnedSemaphorePermit)> {
    let closing = || io::Error::other("relay shutting down");
    // Starts empty; each step's permits are merged into it.
    let mut taken = budget
        .clone()
        .acquire_many_owned(0)
        .await
        .map_err(|_| closing())?;
    let mut buf = buffers::take(n);
    let read = async {
        while buf.len() < n {
            let step = (n - buf.len()).min(BUDGET_STEP);
            let more = budget
                .clone()
                .acquire_many_owned(step as u32)
                .await
                .map_err(|_| closing())?;
            taken.merge(more);
            if rd.take(step as u64).read_to_end(&mut buf).await? < step {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
    .await;
    match read {
        Ok(()) => Ok((buf, taken)),
        Err(e) => {
            buffers::give(buf);
            Err(e)
        }
    }
}

/// Reads the rest of a small frame whose type byte was `ty`, into a buffer
/// that grows as the bytes arrive (never sized by the announced length).
async fn read_whole<R: AsyncRead + Unpin>(rd: &mut R, ty: u8, len: usize) -> io::Result<Read> {
    let mut body = Vec::with_capacity(len.min(256));
    body.push(ty);
    let rest = (len - 1) as u64;
    let got = rd.take(rest).read_to_end(&mut body).await?;
    if got as u64 != rest {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Read {
        frame: Request::decode_owned(body),
        budget: None,
    })
}

async fn writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> io::Result<()> {
    while let Some(first) = rx.recv().await {
        // Gather what is ready into one write: whole frames, few syscalls;
        // shared blob bytes follow their head without a copy.
        let (mut buf, mut shared) = match first {
            Outgoing::Frame(f) => (f, None),
            Outgoing::Shared(head, kept) => (head, Some(kept)),
        };
        while shared.is_none() && buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(Outgoing::Frame(more)) => {
                    buf.extend_from_slice(&more);
                    buffers::give(more);
                }
                Ok(Outgoing::Shared(head, kept)) => {
                    buf.extend_from_slice(&head);
                    shared = Some(kept);
                }
                Err(_) => break,
            }
        }
        match shared {
            Some((piece, range)) => {
                write_both(&mut wr, &buf, &piece[range]).await?;
                sealpost_store::release(piece);
            }
            None => wr.write_all(&buf).await?,
        }
        wr.flush().await?;
        buffers::give(buf);
    }
    wr.shutdown().await
}

/// Writes `a` then `b` as one stream of bytes (vectored: TLS records span
/// both, no small record for `a` alone, no copy of `b`).
async fn write_both<W: AsyncWrite + Unpin>(wr: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = wr
            .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// The bounds on one connection's submissions waiting for their commit.
#[derive(Clone, Copy)]
struct InFlight<'a> {
    count: &'a Arc<Semaphore>,
    bytes: &'a Arc<Semaphore>,
}

struct Session {
    challenge: [u8; 32],
    exporter: [u8; 32],
    mailbox: Option<MailboxId>,
    subscription: Option<Subscription>,
    /// Where the connection comes from (for the per-source share).
    source: Source,
    /// Blob pieces of this connection, stored in order by one task while
    /// the connection goes on reading (and decrypting) the next frames.
    /// Started with the connection's first piece (an idle connection
    /// holds no task or queue for it).
    blob_lane: Option<(mpsc::Sender<BlobJob>, tokio::task::JoinHandle<()>)>,
}

/// A blob piece waiting for its turn, with the permits its bytes hold.
struct BlobJob {
    id: u32,
    put: BlobPiece,
    _permits: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    ),
}

async fn connection(s: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) -> io::Result<()> {
    // Whole frames are written at once; without NODELAY small responses
    // wait on Nagle and delayed ACKs.
    tcp.set_nodelay(true)?;
    // What this connection stores counts in its address's share of each
    // mailbox (`Limits::source_share_percent`).
    let source = Source::of_ip(peer.ip());
    // rustls reads its records 4 KiB at a time; a read buffer under it
    // turns a 1 MiB blob piece into a few syscalls instead of 256. It is
    // held only while it has bytes (an idle connection holds none).
    let tcp = crate::pooled::PooledReader::new(tcp);
    let evictable = Arc::new(Evictable::new(&s));
    let stream = evictable
        .idle(Box::pin(timeout(
            s.config.handshake_timeout,
            s.tls.accept(tcp),
        )))
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
    let (mut rd, wr) = tokio::io::split(stream);
    // Responses wait here for the socket. A client that sends requests but
    // does not read the answers stalls on this bound (the reader below
    // waits for room), so its queue holds at most 64 frames.
    let (out, rx) = mpsc::channel::<Outgoing>(64);
    let writer_task = tokio::spawn(writer(wr, rx));
    let mut challenge = [0u8; 32];
    OsRng.fill_bytes(&mut challenge);
    let mut session = Session {
        challenge,
        exporter,
        mailbox: None,
        subscription: None,
        source,
        blob_lane: None,
    };
    let in_flight = Arc::new(Semaphore::new(s.config.max_in_flight));
    let in_flight_bytes = Arc::new(Semaphore::new(
        s.config.max_in_flight_bytes.max(relay::MAX_FRAME),
    ));
    let (rate, burst) = s.config.rate_per_connection;
    let mut bucket = TokenBucket::new(rate, burst, std::time::Instant::now());
    let mut hello = false;
    let result: io::Result<()> = async {
        loop {
            let stage = Stage {
                hello,
                idle: if session.mailbox.is_some() {
                    s.config.idle_timeout
                } else {
                    s.config.unauthenticated_idle_timeout
                },
                frame: s.config.frame_timeout,
            };
            // Owners are never evicted.
            let evict = session.mailbox.is_none().then_some(&evictable);
            let read = match read_frame(&mut rd, stage, &s.total_bytes, evict).await {
                Ok(Some(d)) => d,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if e.kind() == io::ErrorKind::TimedOut {
                        s.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    if e.kind() == io::ErrorKind::InvalidData {
                        s.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                        let _ = send(&out, 0, err(ErrorCode::BadRequest, e.to_string())).await;
                    }
                    return Err(e);
                }
            };
            let budget = read.budget;
            let frame = match read.frame {
                Ok(f) => f,
                Err(e) => {
                    s.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                    send(&out, 0, err(ErrorCode::BadRequest, format!("malformed request: {e}"))).await?;
                    return Ok(());
                }
            };
            if frame.id == 0 {
                // Id 0 is the relay's pushes: an answer under it could not
                // be told from a Notify (PROTOCOL 6.2).
                s.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                send(&out, 0, err(ErrorCode::BadRequest, "request id 0 is reserved for the relay's pushes; number requests from 1")).await?;
                return Ok(());
            }
            if !hello {
                match frame.body {
                    Request::Hello { version } if version == relay::VERSION => {
                        hello = true;
                        send(
                            &out,
                            frame.id,
                            Response::HelloOk {
                                version: relay::VERSION,
                                relay_key: s.key.verifying_key().to_bytes(),
                                challenge: session.challenge,
                            },
                        )
                        .await?;
                        continue;
                    }
                    Request::Hello { version } => {
                        send(
                            &out,
                            frame.id,
                            err(
                                ErrorCode::UnsupportedVersion,
                                format!("protocol version {version} is not spoken here; this relay speaks {}", relay::VERSION),
                            ),
                        )
                        .await?;
                        return Ok(());
                    }
                    _ => {
                        send(&out, frame.id, err(ErrorCode::BadRequest, "the first request must be Hello")).await?;
                        return Ok(());
                    }
                }
            }
            if !bucket.try_take(std::time::Instant::now()) {
                s.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                send(&out, frame.id, err(ErrorCode::RateLimited, "too many requests; slow down and retry")).await?;
                continue;
            }
            let bounds = InFlight {
                count: &in_flight,
                bytes: &in_flight_bytes,
            };
            // Boxed: the state of a request in progress is not part of
            // what an idle connection's task holds.
            Box::pin(handle(&s, &mut session, &out, bounds, budget, frame.id, frame.body)).await?;
        }
    }
    .await;
    let lane = session.blob_lane.take().map(|(_, task)| task);
    drop(session);
    if let Some(lane) = lane {
        let _ = lane.await;
    }
    drop(out);
    let _ = writer_task.await;
    result
}

async fn handle(
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
            let mut msg = ctx.to_vec();
            msg.extend_from_slice(&auth_transcript(&session.exporter, &session.challenge));
            let ok = VerifyingKey::from_bytes(&key)
                .map(|vk| {
                    vk.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&signature))
                        .is_ok()
                })
                .unwrap_or(false);
            if !ok {
                s.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                return send(
                    out,
                    id,
                    err(
                        ErrorCode::BadSignature,
                        "the signature does not prove possession of this key on this connection",
                    ),
                )
                .await;
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
                let existing = match s.store.has_mailbox(&mailbox) {
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
                match s.store.mailbox_key(&mailbox) {
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
            let weight = u32::try_from(payload.len().max(1)).unwrap_or(u32::MAX);
            let permits = (
                in_flight.count.clone().acquire_owned().await,
                in_flight.bytes.clone().acquire_many_owned(weight).await,
                take_budget(s, budget, weight).await,
            );
            let (Ok(p1), Ok(p2), Ok(p3)) = permits else {
                return Err(io::Error::other("relay shutting down"));
            };
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
            match s.store.fetch(&mb, after, max, budget) {
                Ok((mut items, more, damaged)) => {
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
        Request::BlobPut(put) => {
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
        Request::BlobStatus { blob_id } => {
            // The blob's owner (a recipient following an upload) is
            // answered at once; anyone else (an uploader about to resume)
            // after any run of pieces being stored, so that it is not told
            // a length the relay is about to pass.
            let now = s.store.blob_status(&blob_id);
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
            let located = match s.store.blob_locate(&blob_id, &mb, offset, len) {
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
            match s.store.status(&mb) {
                Ok((items, bytes, quota)) => {
                    send(
                        out,
                        id,
                        Response::Status {
                            items,
                            bytes,
                            quota,
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
        _ => send(out, id, err(ErrorCode::BadRequest, "unsupported request")).await,
    }
}

/// The relay-wide byte budget for a request's data: what reading its frame
/// took, or (a frame read whole, without data) `weight` now.
async fn take_budget(
    s: &Shared,
    taken: Option<OwnedSemaphorePermit>,
    weight: u32,
) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
    match taken {
        Some(p) => Ok(p),
        None => s.total_bytes.clone().acquire_many_owned(weight).await,
    }
}

fn refusal(s: &Shared, code: RefusalCode, mailbox: MailboxId, hash: [u8; 32]) -> Response {
    s.metrics.refused.fetch_add(1, Ordering::Relaxed);
    if let Some(c) = s.metrics.refused_by_code.get(code.code() as usize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    Response::Refused(signed_refusal(&s.key, code, mailbox, hash))
}

fn signed_refusal(
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
fn forged_refusal(s: &Shared, how: ForgedRefusal, mailbox: MailboxId, hash: [u8; 32]) -> Response {
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
async fn blob_status_answer(
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
fn start_lane(
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
            let (puts, permits): (Vec<_>, Vec<_>) =
                jobs.drain(..).map(|j| (j.put, j._permits)).unzip();
            let answers = blob_put_many(&s, puts, source).await;
            drop(permits);
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
const LANE_RUN: usize = 8;

/// Stores blob pieces in order (from the connection's lane): runs of
/// consecutive pieces with one fdatasync and one commit (the store's
/// `blob_put_many`); an answer per piece.
async fn blob_put_many(s: &Shared, pieces: Vec<BlobPiece>, source: Source) -> Vec<Response> {
    let mut answers = Vec::with_capacity(pieces.len());
    let mut run: Vec<BlobPiece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        let forged = s
            .config
            .tamper
            .as_ref()
            .and_then(|t| t.blob_put(&p.blob_id, &p.mailbox, p.offset));
        match forged {
            None => run.push(p),
            Some(forged) => {
                // What came before is stored first, as it would have been
                // piece by piece.
                store_run(s, std::mem::take(&mut run), source, &mut answers).await;
                answers.push(forged_refusal(s, forged, p.mailbox, p.refusal_hash()));
                sealpost_proto::buffers::give(p.data);
            }
        }
    }
    store_run(s, run, source, &mut answers).await;
    answers
}

/// Stores `run` (pieces no hook refused) and appends an answer per piece.
async fn store_run(s: &Shared, run: Vec<BlobPiece>, source: Source, answers: &mut Vec<Response>) {
    if run.is_empty() {
        return;
    }
    // A refusal names the piece (§6.5).
    let named: Vec<(MailboxId, [u8; 32], u64)> = run
        .iter()
        .map(|p| (p.mailbox, p.refusal_hash(), p.data.len() as u64))
        .collect();
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

async fn submit(
    s: &Shared,
    source: Source,
    mailbox: MailboxId,
    expires_at: u64,
    hash: [u8; 32],
    payload: Vec<u8>,
) -> Response {
    if payload.len() > s.config.max_message.min(relay::MAX_MESSAGE) {
        return refusal(s, RefusalCode::TooLarge, mailbox, hash);
    }
    if blake3::hash(&payload).as_bytes() != &hash {
        return refusal(s, RefusalCode::HashMismatch, mailbox, hash);
    }
    let mut mailbox = mailbox;
    if let Some(t) = &s.config.tamper {
        match t.submit(&mailbox, &hash, &payload) {
            OnSubmit::Store => {}
            OnSubmit::Drop => {
                let mut item_id = [0u8; 16];
                OsRng.fill_bytes(&mut item_id);
                return Response::Accepted { item_id };
            }
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
        Ok(SubmitOutcome::Stored { seq, item_id }) => {
            s.metrics.accepted.fetch_add(1, Ordering::Relaxed);
            s.metrics.accepted_bytes.fetch_add(len, Ordering::Relaxed);
            push(s, &mailbox, seq);
            Response::Accepted { item_id }
        }
        Ok(SubmitOutcome::Refused(code)) => refusal(s, code, mailbox, hash),
        Err(e) => storage_failed(s, &e),
    }
}

/// A write the store could not make: counted, logged (at most once every
/// 10 s, with how many since), and answered in words the client can pass
/// on ("the relay's disk is full"), as a transient error (8, retry later).
fn storage_failed(s: &Shared, e: &sealpost_store::StoreError) -> Response {
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

/// A relay serving on a background task of the current runtime.
#[derive(Debug)]
pub struct RunningRelay {
    address: RelayAddress,
    metrics: Arc<Metrics>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl RunningRelay {
    pub fn address(&self) -> &RelayAddress {
        &self.address
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, waits for accepted writes to commit, and returns
    /// how serving ended.
    pub async fn stop(self) -> io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.map_err(io::Error::other)?
    }
}

impl Relay {
    /// Serves on a spawned task until [`RunningRelay::stop`]. Must be
    /// called within a Tokio runtime.
    pub fn spawn(self) -> RunningRelay {
        let address = self.address.clone();
        let metrics = self.metrics();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(async move {
            let _ = rx.await;
        }));
        RunningRelay {
            address,
            metrics,
            stop,
            task,
        }
    }
}
