//! The delivery engine: what `sealpost sync` does once and `sealpost agent`
//! does continuously.
//!
//! One pass:
//! 1. **fetch** the home mailbox; open every item (all checks of the sealed
//!    layer); store new messages durably and verify them by reading back
//!    ([`crate::spool`]); commit the inbox index with the receipts they are
//!    owed; only then acknowledge the items at the relay. Duplicates get
//!    their receipt again; stale messages and messages from non-contacts
//!    get a signed rejection; receipts and rejections for our own messages
//!    are verified and applied to the outbox; anything else that fails a
//!    check is logged and discarded (the sender will retransmit).
//! 2. **report**: sign one receipt (or rejection) per sender listing every
//!    entry owed, seal it to the sender and submit it to the sender's relay.
//! 3. **submit** every due outbox delivery to its recipient's relay,
//!    pipelined; record acceptance (and the retransmission time), signed
//!    refusals, and transient failures (with backoff).
//! 4. **expire** deliveries whose message expired without a receipt.
//!
//! Only one engine runs per home: it holds an exclusive lock on
//! `sync.lock` while it exists.
//!
//! Where things are: [`compose`] prepares what `send` queues; `inbound`
//! fetches, decides ([`decide`]) and stores; `reports` sends receipts and
//! rejections; `submit` and `upload` carry the outbox to recipients'
//! relays; `download` and `repair` receive files; `wake` is the agent's
//! loop. This module holds the engine itself and one pass over them.

mod compose;
mod decide;
mod download;
mod inbound;
mod repair;
mod reports;
mod submit;
mod upload;
mod wake;

pub use compose::*;
pub use decide::{decide, Caught, Decision, Dropped, Facts, FileCheck, Stale, Stored};
use reports::Control;
use upload::Upload;
pub use wake::*;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand_core::{OsRng, RngCore};
use sealpost_client::client::{ClientError, Submitted};
use sealpost_client::tls::Pin;
use sealpost_client::RelayAddress;
use sealpost_proto::delivery::{Outcome, Timing};
use sealpost_proto::message::{self, MAX_RECIPIENTS};
use sealpost_proto::relay::{BlobPiece, ErrorCode, MailboxId, RefusalCode, MAX_MESSAGE};
use sealpost_proto::report::{Entries, Report};
use sealpost_proto::{
    Kind, MessageId, OpenError, OpenedMessage, PublicIdentity, RejectReason, RelayPin, SealRequest,
};
use tokio::net::UnixListener;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::link::{LinkAuth, RelayLink};
use crate::outbox::{
    DownloadEnd, DownloadState, InboxEntry, PendingReport, QueuedMessage, QueuedRecipient,
};
use crate::spool::{Location, Spool, SpoolError};
use crate::transfer::Progress;
use crate::{Agent, AgentError, DEFAULT_LIFETIME_SECS};

/// The settings key of the home relay address.
pub const HOME_RELAY: &str = "home_relay";
/// The settings key of how long received messages are kept (a duration
/// in seconds; none: for ever).
pub const KEEP_RECEIVED: &str = "keep_received_secs";
/// The settings key of how much received content is kept (bytes of
/// message content in the inbox; none: no limit).
pub const KEEP_RECEIVED_BYTES: &str = "keep_received_bytes";
/// Received messages deleted by the retention setting in one pass, at most.
const PRUNE_BATCH: usize = 10_000;
/// The settings key of forwarding (PROTOCOL 6.8): "on" hands messages for
/// another relay's mailboxes to the home relay, which forwards them.
pub const FORWARD: &str = "forward";
/// Whether a `Forward`'s answer says the home relay does not forward: a
/// signed `not_forwarded`, or a relay that predates forwarding (error 1,
/// unknown request; PROTOCOL 12).
pub(crate) fn refuses_forwarding(
    r: &Result<sealpost_client::client::Submitted, ClientError>,
) -> bool {
    match r {
        Ok(Submitted::Refused(rf)) => rf.code == sealpost_proto::relay::RefusalCode::NotForwarded,
        Err(ClientError::Server { code, .. }) => {
            *code == sealpost_proto::relay::ErrorCode::BadRequest
        }
        _ => false,
    }
}

/// The next relay a relay address (from a card) names, for a `Forward`.
pub(crate) fn next_hop(relay: &str) -> Option<sealpost_proto::relay::NextHop> {
    RelayAddress::parse(relay).map(|a| sealpost_proto::relay::NextHop {
        addr: a.host_port,
        pin: a.pin.0,
    })
}

impl Engine {
    /// Whether what goes to `relay` is handed to the home relay, which
    /// forwards it (forwarding on, the home relay forwards, and `relay`
    /// is another).
    pub(crate) fn forwards_to(&self, relay: &str) -> bool {
        self.forward && self.home_forwards && relay != self.home_addr.to_string()
    }

    /// Notes that the home relay does not forward (logged once).
    pub(crate) fn home_does_not_forward(&mut self) {
        if self.home_forwards {
            tracing::warn!(
                "your relay does not forward messages to other relays; sending to each recipient's relay directly"
            );
        }
        self.home_forwards = false;
    }
}

/// The settings key of the download directory.
pub const DOWNLOAD_DIR: &str = "download_dir";
/// Largest message content `send` accepts: the sealed container must fit
/// the relay's message limit with room for the header and age's stanzas
/// (16 KiB) and for the padding (a Padmé length near 1 MiB is a multiple
/// of 32 KiB, so at most 32 KiB - 1 is added).
pub const MAX_CONTENT: usize = MAX_MESSAGE - 48 * 1024;
/// How the home's database gives free pages back (`sealpost_sqlite`): it
/// keeps 1 MiB for reuse; while at most 16 MiB are in use every free page
/// goes back at once; otherwise in steps of at most 4 MiB, halved (down to
/// 64 KiB) while a step takes over 10 ms — what a `send` arriving
/// meanwhile waits for.
const AGENT_SPACE: sealpost_sqlite::Policy = sealpost_sqlite::Policy {
    keep_pages: 256,
    all_at_once_live_pages: 4096,
    max_step_pages: 1024,
    min_step_pages: 16,
    step_target: Duration::from_millis(10),
};
/// While free pages remain to be given back, an idle agent takes a step
/// this often (without a pass: no round trip to the relay).
const GIVE_BACK_EVERY: Duration = Duration::from_millis(100);
/// While a backlog is being fetched, the receipts owed so far go out at
/// least this often.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How long receipts and rejections live at the sender's relay.
const REPORT_LIFETIME_SECS: u64 = 7 * 24 * 3600;
/// Deliveries submitted in one pipelined round.
const SUBMIT_BATCH: usize = 1024;
/// Payload bytes submitted in one pipelined round.
const SUBMIT_BATCH_BYTES: usize = 32 << 20;
/// Items asked for in one fetch (the relay also bounds a fetch by bytes).
const FETCH_BATCH: u32 = 4096;
/// Room one fetch may take in the home beyond `keep_free`: its payloads
/// (about 1 MiB, the relay's bound on an answer), twice over for the spool
/// and the database's log.
const FETCH_ROOM: u64 = 4 << 20;
/// A repair request without an answer is sent again after this long.
const REPAIR_RETRY_MS: u64 = 60_000;
/// How long a download waits within one pass for a blob that is still
/// being uploaded, without any new byte, before leaving it to a later pass.
const STREAM_WAIT: Duration = Duration::from_secs(15);
/// A download's progress is made durable (fsync + commit) this often.
const DOWNLOAD_COMMIT_BYTES: u64 = 16 << 20;
/// Blob pieces (1 MiB each) in flight on one connection.
const PIECE_WINDOW: usize = 16;
/// Read-backs of unfinished downloads kept from one pass to the next
/// (each a thread, two descriptors and a 1 MiB buffer).
const KEPT_READ_BACKS: usize = 4;
/// Running hashes of unfinished uploads kept from one call to the next
/// (about 4 KiB each); an upload whose hashes were dropped hashes again
/// what the relay holds.
const KEPT_UPLOAD_HASHES: usize = 64;
/// Times an upload reconnects after losing its connection before it is
/// left to the next pass.
const MAX_UPLOAD_RECONNECTS: u32 = 3;
/// Report entries signed per pass.
const REPORT_BATCH: usize = 16 * sealpost_proto::report::MAX_ENTRIES;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("another sealpost agent or sync is running for {0}; it already does this work (stop it, or wait for it to finish)")]
    Busy(PathBuf),
    #[error("no home relay is set; run `sealpost relay use ADDRESS` (or `sealpost init --relay ADDRESS`)")]
    NoHomeRelay,
    #[error(
        "the stored home relay address {0:?} is not valid; set it again with `sealpost relay use`"
    )]
    BadHomeRelay(String),
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("home relay: {0}")]
    Relay(#[from] ClientError),
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Items fetched from the home relay.
    pub fetched: u64,
    /// New messages stored in the inbox.
    pub delivered: u64,
    /// Copies of messages already in the inbox (their receipt is re-sent).
    pub duplicates: u64,
    /// Messages refused with a signed rejection.
    pub rejected: u64,
    /// Items that failed a check and were discarded.
    pub discarded: u64,
    /// Our deliveries that a receipt completed in this pass.
    pub confirmed: u64,
    /// Our deliveries that a signed rejection failed in this pass.
    pub bounced: u64,
    /// Receipts or rejections that did not verify (forged) or matched
    /// nothing of ours.
    pub forged_reports: u64,
    /// Reports (receipts and rejections) sent.
    pub reports_sent: u64,
    /// Submissions the recipients' relays accepted.
    pub submitted: u64,
    /// Messages (and reports) the home relay accepted to forward: at your
    /// relay, not yet at the recipient's.
    pub forwarded: u64,
    /// Submissions refused by a relay with a signed refusal.
    pub refused: u64,
    /// Submissions that failed for now (retried after a backoff).
    pub submit_errors: u64,
    /// Deliveries that expired without a receipt.
    pub expired: u64,
    /// Times the home relay could not be reached (fetching).
    pub home_errors: u64,
    /// Why, the last time (for the user; not added up).
    pub home_error: Option<String>,
    /// The home relay presented another key than its pin (a possible
    /// interception), the last time it was tried.
    pub home_key_mismatch: bool,
    /// Files received whole and verified from disk.
    pub files_received: u64,
    /// Downloads that failed on this machine in this pass (tried again
    /// later; see `run_downloads`).
    pub download_errors: u64,
    /// Files given up on (their senders are sent a signed rejection).
    pub files_failed: u64,
    /// Blob bytes sent to relays (file uploads).
    pub upload_bytes: u64,
    /// Blob bytes fetched from the home relay (file downloads).
    pub download_bytes: u64,
    /// Misbehaviour of a relay caught by the checks (recorded; see
    /// `Database::detections`).
    pub detections: u64,
    /// Received messages deleted by the retention setting.
    pub pruned: u64,
    /// Bytes of inbox segments deleted because no message is in them any
    /// more.
    pub segments_freed_bytes: u64,
}

impl PassStats {
    pub fn add(&mut self, o: &PassStats) {
        self.fetched += o.fetched;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.rejected += o.rejected;
        self.discarded += o.discarded;
        self.confirmed += o.confirmed;
        self.bounced += o.bounced;
        self.forged_reports += o.forged_reports;
        self.reports_sent += o.reports_sent;
        self.submitted += o.submitted;
        self.forwarded += o.forwarded;
        self.refused += o.refused;
        self.submit_errors += o.submit_errors;
        self.expired += o.expired;
        self.home_errors += o.home_errors;
        if o.home_error.is_some() {
            self.home_error.clone_from(&o.home_error);
            self.home_key_mismatch = o.home_key_mismatch;
        }
        self.files_received += o.files_received;
        self.download_errors += o.download_errors;
        self.files_failed += o.files_failed;
        self.upload_bytes += o.upload_bytes;
        self.download_bytes += o.download_bytes;
        self.detections += o.detections;
        self.pruned += o.pruned;
        self.segments_freed_bytes += o.segments_freed_bytes;
    }

    /// True if nothing happened.
    pub fn is_idle(&self) -> bool {
        *self == Self::default()
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The engine's time and its retry jitter: the system's in use, a
/// [`FakeClock`] in tests, so that every decision that depends on time
/// (retransmission, backoff, expiry, freshness) can be driven without
/// sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// A number in [0, 1) that spreads retries apart.
    fn unit_random(&self) -> f64;
}

/// The system's clock and the OS's random numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn unit_random(&self) -> f64 {
        (OsRng.next_u32() as f64) / (u32::MAX as f64 + 1.0)
    }
}

/// A clock that moves only when told, with fixed jitter (the middle of
/// the range): for deterministic tests.
#[derive(Debug)]
pub struct FakeClock {
    now: std::sync::atomic::AtomicU64,
}

impl FakeClock {
    pub fn new(now_ms: u64) -> Self {
        Self {
            now: std::sync::atomic::AtomicU64::new(now_ms),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.now
            .fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn unit_random(&self) -> f64 {
        0.5
    }
}

/// The relay address a pin in a card or header names.
pub fn address_of(pin: &RelayPin) -> RelayAddress {
    RelayAddress {
        host_port: pin.address.clone(),
        pin: Pin(pin.key_hash),
    }
}

/// The pin a relay address carries, for cards and headers.
pub fn pin_of(addr: &RelayAddress) -> RelayPin {
    RelayPin {
        address: addr.host_port.clone(),
        key_hash: addr.pin.0,
    }
}

/// The link to `relay`: the home link if it is the home relay (submitting
/// needs no account, and one connection is cheaper than two), else an
/// anonymous one, made on first use.
fn link_for<'a>(
    home: &'a mut RelayLink,
    links: &'a mut HashMap<String, RelayLink>,
    home_addr: &RelayAddress,
    relay: &str,
) -> Option<&'a mut RelayLink> {
    if relay == home_addr.to_string() {
        return Some(home);
    }
    if !links.contains_key(relay) {
        let addr = RelayAddress::parse(relay)?;
        let mut l = RelayLink::anonymous(addr);
        l.max_attempts = 2;
        l.timeouts = home.timeouts;
        l.transport = home.transport.clone();
        links.insert(relay.to_owned(), l);
    }
    links.get_mut(relay)
}

/// The sync engine of one home.
pub struct Engine {
    /// Commands waiting on this agent (`send --wait`): told after every
    /// pass, at most [`MAX_WATCHERS`].
    watchers: Vec<tokio::net::UnixStream>,
    agent: Agent,
    spool: Spool,
    home_addr: RelayAddress,
    home: RelayLink,
    links: HashMap<String, RelayLink>,
    pub timing: Timing,
    /// Where transfer progress is reported (bars in the CLI).
    pub progress: std::sync::Arc<dyn crate::transfer::Progress>,
    /// At most this many bytes of one download per pass (then the pass
    /// goes on to other mail and the next pass continues the download);
    /// `None`: download to the end (what `sync` does).
    pub download_slice: Option<u64>,
    /// Files larger than this are refused with a signed rejection
    /// (`too-large`) as soon as their manifest arrives.
    pub max_file: u64,
    /// Free space kept on the download directory's file system: a file
    /// that would leave less waits (a local error, retried with backoff,
    /// in the end rejected as `not-stored`).
    pub keep_free: u64,
    /// The read-backs of downloads left for a later pass (sliced), so the
    /// next pass goes on reading back where this one stopped instead of
    /// reading the file back from its start again; at most
    /// `KEPT_READ_BACKS`.
    read_backs: Vec<(crate::outbox::ReceivedId, crate::transfer::ReadBack)>,
    /// The running hashes of uploads left for a later call (a file's
    /// manifest goes out after its first pieces, then the upload goes on),
    /// by message and recipient; at most `KEPT_UPLOAD_HASHES`.
    upload_hashes: Vec<((MessageId, [u8; 32]), crate::transfer::UploadHashes)>,
    /// What the checks caught in this pass, recorded at its end.
    found: Vec<(Caught, String)>,
    /// Received messages older than this are deleted (their content and
    /// records; a received file stays where it was saved); `None`: kept
    /// for ever. From the home's setting [`KEEP_RECEIVED`].
    pub keep_received: Option<Duration>,
    /// Received content beyond this many bytes is deleted, oldest message
    /// first; `None`: no limit. From the home's setting
    /// [`KEEP_RECEIVED_BYTES`].
    pub keep_received_bytes: Option<u64>,
    /// Messages, receipts and files for mailboxes on other relays go to
    /// the home relay, which forwards them (PROTOCOL 6.8: the default);
    /// otherwise the agent submits to each recipient's relay itself. From
    /// the home's setting [`FORWARD`] (on unless it says "off").
    pub forward: bool,
    /// False once the home relay said it does not forward (a signed
    /// `not_forwarded`, or it does not know the request): this engine
    /// submits to other relays itself from then on.
    home_forwards: bool,
    /// When the home relay was last asked where forwarded deliveries are
    /// (clock ms).
    hops_at: u64,
    /// How often a pass asks it, at most (ms; 5 s by default).
    pub hops_every_ms: u64,
    /// Whether the inbox was held to [`Engine::keep_received_bytes`]
    /// since this engine started (after that, only passes that delivered
    /// something look again).
    sizes_checked: bool,
    /// How many free pages the next step gives back, and whether some may
    /// remain (a step left more, or a pass finished something since).
    space_pace: sealpost_sqlite::Pace,
    giving_back: bool,
    /// Time and jitter ([`SystemClock`] unless a test says otherwise).
    clock: std::sync::Arc<dyn Clock>,
    /// Blobs of files received whole in this pass, deleted at the relay
    /// after the receipts went out (a relay may take a while to free a
    /// large file; the sender should not wait for that).
    blob_deletes: Vec<sealpost_proto::manifest::BlobId>,
    _lock: File,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("home_relay", &self.home_addr.to_string())
            .finish()
    }
}

impl Engine {
    /// Takes the home's sync lock and prepares links. Fails with
    /// [`EngineError::Busy`] if another engine holds the lock.
    pub fn new(agent: Agent) -> Result<Self, EngineError> {
        let lock_path = agent.home().dir().join("sync.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| AgentError::Io {
                what: "opening",
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(EngineError::Busy(agent.home().dir().to_owned()))
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(AgentError::Io {
                    what: "locking",
                    path: lock_path,
                    source,
                }
                .into())
            }
        }
        let home_addr = agent.home_relay()?.ok_or(EngineError::NoHomeRelay)?;
        let mut agent = agent;
        if agent.db_mut().incremental_vacuum_on()? {
            tracing::info!("rewrote the home's database once so that it gives free space back");
        }
        let keep_received = agent
            .db
            .setting(KEEP_RECEIVED)?
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs);
        let keep_received_bytes = agent
            .db
            .setting(KEEP_RECEIVED_BYTES)?
            .and_then(|s| s.parse::<u64>().ok());
        let forward = agent.db.setting(FORWARD)?.as_deref() != Some("off");
        let spool = Spool::open(agent.home().dir())?;
        let mut home = RelayLink::new(home_addr.clone());
        home.auth = LinkAuth::Register;
        home.max_attempts = 3;
        Ok(Self {
            agent,
            spool,
            home_addr,
            home,
            links: HashMap::new(),
            timing: Timing::default(),
            progress: std::sync::Arc::new(crate::transfer::Quiet),
            download_slice: None,
            max_file: DEFAULT_MAX_FILE,
            keep_free: DEFAULT_KEEP_FREE,
            read_backs: Vec::new(),
            upload_hashes: Vec::new(),
            blob_deletes: Vec::new(),
            found: Vec::new(),
            clock: std::sync::Arc::new(SystemClock),
            keep_received,
            keep_received_bytes,
            forward,
            home_forwards: true,
            hops_at: 0,
            hops_every_ms: 5_000,
            sizes_checked: false,
            space_pace: sealpost_sqlite::Pace::new(AGENT_SPACE),
            giving_back: false,
            watchers: Vec::new(),
            _lock: lock,
        })
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    pub fn agent_mut(&mut self) -> &mut Agent {
        &mut self.agent
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn spool_mut(&mut self) -> &mut Spool {
        &mut self.spool
    }

    /// Waits on relays for at most these (tests of broken networks).
    pub fn with_relay_timeouts(mut self, t: sealpost_client::client::Timeouts) -> Self {
        self.home.timeouts = t;
        for l in self.links.values_mut() {
            l.timeouts = t;
        }
        self
    }

    /// Uses a short reconnect backoff (tests, demos on loopback).
    pub fn with_link_backoff(mut self, b: sealpost_proto::retry::Backoff) -> Self {
        let t = self.home.timeouts;
        let transport = self.home.transport.clone();
        self.home = RelayLink::new(self.home_addr.clone()).with_backoff(b);
        self.home.max_attempts = 3;
        self.home.timeouts = t;
        self.home.transport = transport;
        self
    }

    /// Reaches relays over `transport` instead of TCP (tests: relays in
    /// memory, faults on demand).
    pub fn with_transport(
        mut self,
        transport: std::sync::Arc<dyn sealpost_client::Transport>,
    ) -> Self {
        self.home.transport = transport.clone();
        for l in self.links.values_mut() {
            l.transport = transport.clone();
        }
        self
    }

    /// Runs on this clock instead of the system's (tests).
    pub fn with_clock(mut self, clock: std::sync::Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// One full pass: fetch and process, send reports, submit, expire.
    /// A relay that cannot be reached is logged and retried next pass;
    /// only local failures (database, disk) are returned as errors.
    pub async fn pass(&mut self) -> Result<PassStats, EngineError> {
        let mut stats = PassStats::default();
        tracing::trace!("pass: start");
        // Submitting first: a pass started by `send` hands the message to
        // the relay before spending a round trip on fetching.
        self.submit_due(&mut stats).await?;
        let mut acks = Vec::new();
        let last_acks = match self.fetch_all(&mut stats, &mut acks).await {
            Ok(seqs) => {
                if stats.fetched > 0 {
                    // What was fetched is committed (a receipt that
                    // completes a delivery, say): a command waiting for it
                    // reads it now, not after the rest of the pass.
                    self.tell_watchers();
                }
                seqs
            }
            Err(EngineError::Relay(e)) => {
                self.home_failed(&mut stats, "fetching from", e);
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        // Receipts go out before waiting for the relay to confirm the
        // acknowledgements: the sender learns sooner, and an ack that got
        // lost only means a duplicate next time (which gets its receipt
        // again and is not delivered twice).
        tracing::trace!("pass: fetched {}", stats.fetched);
        // Messages' receipts go out now: a download (a large file, or one
        // whose blob is slow to come) must not hold them up.
        self.send_reports(&mut stats).await?;
        // Then the relay may forget the last batch (see `fetch_all`); an
        // acknowledgement that fails only means the items come again.
        match self.ack(last_acks, &mut acks).await {
            Ok(()) => {}
            Err(EngineError::Relay(e)) => self.home_failed(&mut stats, "acknowledging at", e),
            Err(e) => return Err(e),
        }
        self.run_downloads(&mut stats).await?;
        self.run_repairs(&mut stats).await?;
        self.send_reports(&mut stats).await?;
        tracing::trace!("pass: reports sent {}", stats.reports_sent);
        // Best effort: a blob left at the relay expires anyway.
        for blob_id in std::mem::take(&mut self.blob_deletes) {
            let _ = self
                .home
                .call(&self.agent.identity, async |c| c.blob_delete(blob_id).await)
                .await;
        }
        for rx in acks {
            match tokio::time::timeout(Duration::from_secs(30), rx).await {
                Ok(Ok(sealpost_proto::relay::Response::Acked { .. })) => {}
                other => {
                    tracing::warn!("the relay did not confirm an acknowledgement ({other:?}); those items will be fetched again");
                    self.home.disconnect();
                    break;
                }
            }
        }
        let expired = self.agent.db.expire(self.clock.now_ms())?;
        for row in &expired {
            tracing::warn!(
                "message {} to {}: failed, expired before a receipt arrived",
                row.msg,
                row.name
            );
        }
        stats.expired += expired.len() as u64;
        if let Some(keep) = self.keep_received {
            let before = self.clock.now_ms().saturating_sub(keep.as_millis() as u64);
            let n = self.agent.db.prune_received(before, PRUNE_BATCH)?;
            if n > 0 {
                tracing::info!("deleted {n} received messages older than the retention setting");
            }
            stats.pruned += n as u64;
        }
        if let Some(limit) = self.keep_received_bytes {
            if stats.delivered > 0 || !self.sizes_checked {
                let n = self.agent.db.prune_received_over(limit, PRUNE_BATCH)?;
                if n > 0 {
                    tracing::info!(
                        "deleted {n} received messages beyond the retention size ({limit} bytes)"
                    );
                }
                stats.pruned += n as u64;
                self.sizes_checked = true;
            }
        }
        if let Err(e) = self.refresh_hops().await {
            tracing::debug!("asking your relay where forwarded messages are: {e}");
        }
        stats.segments_freed_bytes += self.free_segments()?;
        // Space freed by what was delivered or expired (sealed copies,
        // reports sent) goes back to the file system only when quiet — a
        // step after a quiet pass, more while the loop waits (`run`):
        // giving pages back moves the pages at the end of the file,
        // and doing that while a burst is being delivered rewrote
        // megabytes per pass for pages the burst was about to reuse (a
        // 100,000-message burst slowed to a crawl).
        let quiet = stats.fetched == 0
            && stats.submitted == 0
            && stats.forwarded == 0
            && stats.confirmed == 0
            && stats.reports_sent == 0;
        if quiet {
            self.give_back_step();
        } else {
            // What this pass finished may have freed pages: the loop
            // looks (and gives back) once it has been idle a while.
            self.giving_back = true;
        }
        self.flush_found(&mut stats)?;
        tracing::trace!("pass: done");
        Ok(stats)
    }

    /// The home relay failed a request (`doing`, e.g. "fetching from"):
    /// counted and kept for the caller to say (`run` with backoff, `sync`
    /// in its result); the connection is dropped.
    fn home_failed(&mut self, stats: &mut PassStats, doing: &str, e: ClientError) {
        tracing::debug!("{doing} {}: {e}", self.home_addr);
        stats.home_errors += 1;
        stats.home_key_mismatch = matches!(e, ClientError::KeyMismatch { .. });
        stats.home_error = Some(e.to_string());
        self.home.disconnect();
    }

    /// One step of giving the database's free pages back (the run loop
    /// takes further steps while idle, every [`GIVE_BACK_EVERY`]).
    fn give_back_step(&mut self) {
        match self.agent.db.give_back_space(&mut self.space_pace) {
            Ok(step) => self.giving_back = step.more,
            Err(e) => {
                tracing::warn!("could not give free database pages back: {e}");
                self.giving_back = false;
            }
        }
    }

    /// Deletes the inbox segments (but the last, which batches go to) that
    /// no stored message is in any more; returns the bytes freed. A
    /// segment is freed whole, so deleted messages give their space back
    /// once every message stored beside them is deleted too (retention
    /// deletes oldest first, which frees segments in order).
    fn free_segments(&mut self) -> Result<u64, EngineError> {
        let segments = self.spool.segments()?;
        let mut freed = 0;
        if let Some((_, older)) = segments.split_last() {
            for &seg in older {
                if !self.agent.db.segment_in_use(seg)? {
                    freed += self.spool.remove_segment(seg)?;
                }
            }
        }
        Ok(freed)
    }

    /// Records what the checks caught so far in this pass.
    fn flush_found(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        if !self.found.is_empty() {
            let found: Vec<(&'static str, String)> = self
                .found
                .drain(..)
                .map(|(c, item)| (c.name(), item))
                .collect();
            self.agent
                .db
                .record_detections(&found, self.clock.now_ms())?;
            stats.detections += found.len() as u64;
        }
        Ok(())
    }

    /// Subscribes to the home mailbox's pushes (a fresh subscription after
    /// every reconnect).
    pub async fn subscribe(
        &mut self,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<u64>, EngineError> {
        Ok(self
            .home
            .call(&self.agent.identity, async |c| c.subscribe().await)
            .await?)
    }

    /// The time until the outbox next needs attention, if ever.
    pub fn next_due_in(&self) -> Result<Option<Duration>, EngineError> {
        Ok(self
            .agent
            .db
            .next_due_ms()?
            .map(|t| Duration::from_millis(t.saturating_sub(self.clock.now_ms()))))
    }

    /// True once every delivery of `id` is final.
    pub fn is_final(&self, id: &MessageId) -> Result<bool, EngineError> {
        Ok(self.agent.db.is_final(id)?)
    }
}

/// Opens every payload, on all cores: opening is the expensive step (one
/// X25519 agreement and one signature verification each).
/// Local failures in a row after which a download fails (and its sender
/// is told): with [`local_retry_ms`], about two and a half hours of
/// trying, long enough for someone to free a full disk.
pub const MAX_LOCAL_ERRORS: u32 = 12;

/// The wait before trying a download again after its `n`th local failure
/// in a row: 5 s, 10 s, 20 s, … at most an hour.
pub fn local_retry_ms(n: u32) -> u64 {
    (5_000u64 << n.saturating_sub(1).min(20)).min(3_600_000)
}

/// How long a message lives unless the sender says otherwise.
pub const DEFAULT_SEND_LIFETIME_SECS: u64 = DEFAULT_LIFETIME_SECS;

/// The largest file accepted by default (`--max-file`): 16 GiB.
pub const DEFAULT_MAX_FILE: u64 = 16 << 30;
/// Free space kept by default on the download directory's file system
/// (`--keep-free`): 1 GiB.
pub const DEFAULT_KEEP_FREE: u64 = 1 << 30;
