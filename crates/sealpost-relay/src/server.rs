//! The relay server: a TLS listener whose connections speak the relay
//! protocol (`sealpost_proto::relay`) against the durable store.
//!
//! This file holds the relay itself (binding, keys, the accept loop, the
//! sweeper); `config` what it is configured with; `admission` who may
//! connect; `connection` one connection's life and its requests;
//! `frames` reading and writing frames within budgets; `requests` the
//! requests that store; `subscriptions` pushes to connected owners.

mod admission;
mod config;
mod connection;
mod forward;
mod frames;
mod outq;
mod pair;
mod requests;
mod subscriptions;

use admission::*;
pub use config::*;
use connection::*;
pub use forward::Forwarding;
use forward::*;
use frames::*;
use requests::*;
use subscriptions::*;

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
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use zeroize::Zeroizing;

use crate::limits::TokenBucket;
use crate::tamper::{ForgedRefusal, OnSubmit, Tamper};
use crate::tls::{self, Pin, RelayAddress};

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
    /// Pairing slots opened, and joined (PROTOCOL 10).
    pub pair_opened: AtomicU64,
    pub pair_joined: AtomicU64,
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
    pub refused_by_code: [AtomicU64; 7],
    /// Items taken into the forward queue (PROTOCOL 6.8).
    pub forward_queued: AtomicU64,
    /// Items handed on to the next relay.
    pub forwarded: AtomicU64,
    /// Items the next relay refused (its refusal sent back in a notice).
    pub forward_refused: AtomicU64,
    /// Items that expired before the next relay took them.
    pub forward_given_up: AtomicU64,
    /// Attempts to hand items on that failed (and will be tried again).
    pub forward_failures: AtomicU64,
    pub forward_blob_bytes: AtomicU64,
}

struct Shared {
    store: Store,
    key: SigningKey,
    /// BLAKE3 of the certificate's key: a `Forward` naming it is for a
    /// mailbox here.
    pin: Pin,
    /// Told when an item joins the forward queue, or a next relay is no
    /// longer busy.
    forward_wake: Notify,
    /// Next relays items are being handed to now (one task each).
    forward_busy: std::sync::Mutex<std::collections::HashSet<forward::Lane>>,
    /// Connections to next relays kept between passes (at most
    /// `forward::KEEP_IDLE` unused).
    forward_links: std::sync::Mutex<HashMap<forward::Lane, (Peer, std::time::Instant)>>,
    /// What the next relay held of each blob being forwarded (to each
    /// mailbox), at the last attempt (so that a blob whose sender is still uploading costs the
    /// next relay nothing until there is more to send). Only a hint: the
    /// next relay's `BlobStatus` is asked before sending.
    forward_blobs: std::sync::Mutex<HashMap<(relay::BlobId, MailboxId), u64>>,
    /// The certificate key's signature over `key` (PROTOCOL 6.1).
    binding: relay::KeyBinding,
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
    /// New connections per source (an IPv4 address, an IPv6 /64), for at
    /// most `MAX_RATE_SOURCES` sources at once: addresses cost an IPv6
    /// attacker nothing, so the map must not grow with them.
    per_address: std::sync::Mutex<crate::limits::PerKey<Source>>,
    /// Forwarded items per relay key that proved itself (`Config::peers`).
    per_peer: std::sync::Mutex<crate::limits::PerKey<[u8; 32]>>,
    /// Open connections per source address.
    open_per_address: std::sync::Mutex<HashMap<IpAddr, usize>>,
    /// Connections not (yet) authenticated to a mailbox, oldest first: the
    /// first to be closed when every slot is taken.
    unauthenticated: std::sync::Mutex<BTreeMap<u64, Arc<Evictable>>>,
    next_connection: AtomicU64,
    /// Pairing slots (PROTOCOL §10), and who waits for them to change.
    pairing: std::sync::Mutex<crate::pairing::Rendezvous>,
    pairing_changed: Notify,
    /// Pairing opens and joins per source address (each join is one
    /// guess at a code).
    pairing_rate: std::sync::Mutex<crate::limits::PerKey<Source>>,
    /// New connections waiting for an evicted one's slot (bounded).
    admissions: Arc<Semaphore>,
    /// True once the relay stops: every connection closes.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The data directory's lock, held until the relay has stopped (its
    /// connections closed and its store closed).
    lock: std::sync::Mutex<Option<std::fs::File>>,
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

/// The relay key (public, Ed25519) of the signing key file at `path`, if
/// it can be read: what other relays' operators list to allow or deny
/// this relay's forwarded items.
pub fn relay_key_in(path: &Path) -> Option<[u8; 32]> {
    load_key(path).ok().map(|k| k.verifying_key().to_bytes())
}

/// Relay keys whose forwarding rate a relay tracks at once (about 1.5 MiB
/// of buckets); past it, an item from a relay key not tracked is told to
/// try again later until quiet keys are dropped.
const MAX_PEER_KEYS: usize = 16_384;
/// Sources the connection-rate map holds at most (about 5 MiB); past it,
/// a connection from a new source is refused until quiet ones are dropped
/// (at most once a second).
const MAX_RATE_SOURCES: usize = 65_536;
/// Pairing opens and joins per source address: 10 a minute, bursts of 10
/// (each join is one guess at someone's code, and burns it).
const PAIR_RATE: (f64, f64) = (10.0 / 60.0, 10.0);
/// Source addresses the pairing rate map holds at most.
const MAX_PAIR_ADDRESSES: usize = 16_384;
/// Longest a `PairWait` is held before it is answered empty.
const MAX_PAIR_WAIT: Duration = Duration::from_secs(30);

/// A signing key the operator names in the configuration, for several
/// relay nodes to share (a copy of one node's `relay-signing.key`).
fn load_key(path: &Path) -> io::Result<SigningKey> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read the signing key {}: {e}", path.display()),
        )
    })?);
    let seed: Zeroizing<[u8; 32]> = Zeroizing::new(bytes.as_slice().try_into().map_err(|_| {
        io::Error::other(format!(
            "{} is not a 32-byte key ({} bytes)",
            path.display(),
            bytes.len()
        ))
    })?);
    Ok(SigningKey::from_bytes(&seed))
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
pub fn lock_data_dir(data: &Path) -> io::Result<std::fs::File> {
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

/// The relay's store: the ledger on PostgreSQL at `database` (with news
/// between nodes by `NOTIFY`) or SQLite in `dir`; blob bytes in the S3
/// bucket `blobs` names or in `dir/blobs`.
pub async fn open_store(
    database: Option<&str>,
    blobs: Option<&str>,
    dir: &std::path::Path,
    limits: sealpost_store::Limits,
) -> Result<Store, sealpost_store::StoreError> {
    use sealpost_store::postgres::{self, PgLedger, PgNotifier};
    use sealpost_store::{BlobStore, Ledger, Notifier, StoreError};
    use std::sync::Arc;
    if database.is_none() && blobs.is_none() {
        return Store::open(dir, limits);
    }
    let storage = |detail: String| StoreError::Storage {
        disk_full: false,
        detail,
    };
    let (ledger, notifier, ledger_name): (Arc<dyn Ledger>, Arc<dyn Notifier>, String) =
        match database {
            Some(url) => (
                Arc::new(PgLedger::connect(url, limits).await?),
                Arc::new(PgNotifier::start(url, postgres::pool(url, 2)?)?),
                format!("PostgreSQL at {}", postgres::redacted(url)),
            ),
            None => (
                Arc::new(sealpost_store::SqliteLedger::open(dir, limits)?),
                Arc::new(sealpost_store::LocalNotifier::default()),
                format!("SQLite in {}", dir.display()),
            ),
        };
    let (blob_store, blobs_name): (Arc<dyn BlobStore>, String) = match blobs {
        Some(url) => {
            let config = sealpost_store::s3::S3Config::parse(url).map_err(storage)?;
            let name = format!("{config:?}");
            let opened =
                tokio::task::spawn_blocking(move || sealpost_store::s3::S3Blobs::open(&config))
                    .await
                    .map_err(|_| StoreError::Closed)?
                    .map_err(|e| storage(e.to_string()))?
                    .with_put_latency(ledger.latencies().blob_sync.clone());
            (Arc::new(opened), name)
        }
        None => (
            Arc::new(sealpost_store::FileBlobs::open(
                &dir.join("blobs"),
                ledger.latencies().blob_sync.clone(),
            )?),
            format!("files in {}", dir.join("blobs").display()),
        ),
    };
    tracing::info!("ledger: {ledger_name}; blob bytes: {blobs_name}");
    Ok(Store::new(
        ledger,
        blob_store,
        notifier,
        limits,
        format!("{ledger_name}, {blobs_name}"),
    ))
}

impl Relay {
    /// Opens the embedded store (SQLite and blob files in
    /// `DATA/store`), loads or creates the certificate and keys, and
    /// binds the listener.
    pub async fn bind(config: Config) -> io::Result<Self> {
        std::fs::create_dir_all(&config.data)?;
        let store = open_store(
            config.database.as_deref(),
            config.blobs.as_deref(),
            &config.data.join("store"),
            config.limits,
        )
        .await
        .map_err(io::Error::other)?;
        Self::bind_with(config, store).await
    }

    /// As [`Relay::bind`], on `store` (any ledger, blob store and
    /// notifier; its limits should be `config.limits`). The data
    /// directory still holds the relay's lock, certificate and keys
    /// unless the configuration names them.
    pub async fn bind_with(config: Config, store: Store) -> io::Result<Self> {
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
        let key = match &config.signing_key_file {
            // Shared by several nodes: made once by the operator, never here.
            Some(path) => load_key(path)?,
            None => load_or_create_key(&config.data.join("relay-signing.key"))?,
        };
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
        let binding = {
            let first = cert
                .chain
                .first()
                .ok_or_else(|| io::Error::other("the certificate chain is empty"))?;
            sealpost_client::tls::sign_key_binding(
                first,
                &cert.key,
                &key.verifying_key().to_bytes(),
            )?
        };
        let listener = TcpListener::bind(config.listen).await?;
        // Before serving: no upload of ours is in progress.
        let orphans = store
            .remove_orphan_blobs()
            .await
            .map_err(io::Error::other)?;
        if orphans > 0 {
            tracing::info!("removed {orphans} blob files no blob row named");
        }
        let local = listener.local_addr()?;
        let tls = TlsAcceptor::from(Arc::new(tls::server_config(&cert)?));
        let address = RelayAddress {
            host_port: local.to_string(),
            pin: cert.pin,
        };
        let shared = Arc::new(Shared {
            store,
            key,
            pin: cert.pin,
            forward_wake: Notify::new(),
            forward_busy: std::sync::Mutex::new(std::collections::HashSet::new()),
            forward_links: std::sync::Mutex::new(HashMap::new()),
            forward_blobs: std::sync::Mutex::new(HashMap::new()),
            binding,
            tls,
            subscribers: std::sync::Mutex::new(HashMap::new()),
            metrics: Arc::new(Metrics::default()),
            conns: Arc::new(Semaphore::new(config.max_connections)),
            total_bytes: Arc::new(Semaphore::new(
                config.max_total_in_flight_bytes.max(relay::MAX_FRAME),
            )),
            per_address: std::sync::Mutex::new(crate::limits::PerKey::with_max_keys(
                config.rate_per_address.0,
                config.rate_per_address.1,
                std::time::Instant::now(),
                MAX_RATE_SOURCES,
            )),
            open_per_address: std::sync::Mutex::new(HashMap::new()),
            // Relay keys cost nothing to make: a stranger proving
            // key after key cannot grow the map past this.
            per_peer: std::sync::Mutex::new(crate::limits::PerKey::with_max_keys(
                config.peers.rate.0,
                config.peers.rate.1,
                std::time::Instant::now(),
                MAX_PEER_KEYS,
            )),
            unauthenticated: std::sync::Mutex::new(BTreeMap::new()),
            next_connection: AtomicU64::new(0),
            pairing: std::sync::Mutex::new(crate::pairing::Rendezvous::new(config.pairing)),
            pairing_changed: Notify::new(),
            pairing_rate: std::sync::Mutex::new(crate::limits::PerKey::with_max_keys(
                PAIR_RATE.0,
                PAIR_RATE.1,
                std::time::Instant::now(),
                MAX_PAIR_ADDRESSES,
            )),
            admissions: Arc::new(Semaphore::new(64)),
            stopping: tokio::sync::watch::channel(false).0,
            lock: std::sync::Mutex::new(Some(lock)),
            config,
        });
        // New items reach subscribed connections through the store's
        // notifier (items committed by this node, or by any node sharing
        // the ledger when its notifier reaches them).
        let weak = Arc::downgrade(&shared);
        shared.store.listen(Arc::new(move |mailbox, seq| {
            if let Some(s) = weak.upgrade() {
                push(&s, mailbox, seq);
            }
        }));
        Ok(Self {
            shared,
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
        let forwarder = tokio::spawn(forward_loop(shared.clone()));
        // Notices from an outbound gateway, passed back to their senders.
        let gateway = shared
            .config
            .forwarding
            .via
            .clone()
            .map(|via| tokio::spawn(forward::gateway_loop(shared.clone(), via)));
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
                        // Whole frames are written at once; without NODELAY
                        // small responses wait on Nagle and delayed ACKs.
                        Ok(x) if x.0.set_nodelay(true).is_ok() => x,
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = admit(&shared, peer) else {
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
        // Nothing of the forward queue lives in this task: what it was
        // handing on is tried again by the next start (at worst twice;
        // the recipient's replay cache keeps delivery exactly-once).
        forwarder.abort();
        if let Some(t) = gateway {
            t.abort();
        }
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

/// A relay serving on a background task of the current runtime.
pub struct RunningRelay {
    address: RelayAddress,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl std::fmt::Debug for RunningRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RunningRelay({})", self.address)
    }
}

impl RunningRelay {
    pub fn address(&self) -> &RelayAddress {
        &self.address
    }

    /// The relay's Ed25519 key (what it signs refusals and notices with,
    /// and proves to other relays).
    pub fn relay_key(&self) -> VerifyingKey {
        self.shared.key.verifying_key()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The relay's store (for tests and tools that look at its state).
    pub fn store(&self) -> Store {
        self.shared.store.clone()
    }

    /// A way into this relay without a socket (see [`Door`]).
    pub fn door(&self) -> Door {
        Door {
            shared: self.shared.clone(),
            address: self.address.clone(),
        }
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
        let shared = self.shared.clone();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(async move {
            let _ = rx.await;
        }));
        RunningRelay {
            address,
            metrics,
            shared,
            stop,
            task,
        }
    }
}

/// Connections to a running relay without a socket (tests, and relays in
/// one process): each is a stream in memory served by the same code as a
/// TCP connection — TLS, framing, admission per source address, limits —
/// from the source address the caller names. Refused once the relay stops.
#[derive(Clone)]
pub struct Door {
    shared: Arc<Shared>,
    address: RelayAddress,
}

impl std::fmt::Debug for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Door({})", self.address)
    }
}

impl Door {
    /// The relay's address (its pin is the one the client checks).
    pub fn address(&self) -> &RelayAddress {
        &self.address
    }

    /// A connection from `peer`: the client's end of a stream in memory.
    pub fn connect(&self, peer: SocketAddr) -> io::Result<tokio::io::DuplexStream> {
        let s = &self.shared;
        let refused = |why: &str| io::Error::new(io::ErrorKind::ConnectionRefused, why.to_owned());
        if *s.stopping.borrow() {
            return Err(refused("the relay is stopping"));
        }
        let slot = admit(s, peer).map_err(refused)?;
        let Ok(permit) = s.conns.clone().try_acquire_owned() else {
            s.metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(refused("every connection slot is taken"));
        };
        let (client, server) = tokio::io::duplex(64 * 1024);
        start_connection(s.clone(), server, peer, permit, slot);
        Ok(client)
    }
}
