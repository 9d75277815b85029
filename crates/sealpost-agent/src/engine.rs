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
use sealpost_proto::relay::{BlobPiece, MailboxId, RefusalCode, MAX_MESSAGE};
use sealpost_proto::report::{Entries, Report};
use sealpost_proto::{
    Kind, MessageId, OpenError, OpenedMessage, PublicIdentity, RejectReason, RelayPin, SealRequest,
};
use tokio::net::UnixListener;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::link::{LinkAuth, RelayLink};
use crate::outbox::{InboxEntry, PendingReport, QueuedMessage, QueuedRecipient};
use crate::spool::{Location, Spool, SpoolError};
use crate::transfer::Progress;
use crate::{Agent, AgentError, DEFAULT_LIFETIME_SECS};

/// The settings key of the home relay address.
pub const HOME_RELAY: &str = "home_relay";
/// The settings key of the download directory.
pub const DOWNLOAD_DIR: &str = "download_dir";
/// Largest message content `send` accepts: the sealed container must fit
/// the relay's message limit with room for the header and age's stanzas.
pub const MAX_CONTENT: usize = MAX_MESSAGE - 16 * 1024;
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
    /// Submissions the relays accepted.
    pub submitted: u64,
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

fn unit_random() -> f64 {
    (OsRng.next_u32() as f64) / (u32::MAX as f64 + 1.0)
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
        links.insert(relay.to_owned(), l);
    }
    links.get_mut(relay)
}

/// What became of a control message (report, repair request or offer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Accepted,
    /// Refused for good (signed refusal, or not a relay address).
    Refused,
    /// Not delivered this time (connection); try again later.
    Failed,
}

/// How an upload attempt ended.
#[derive(Debug)]
enum Upload {
    Complete,
    /// The relay holds at least what was asked for, not all yet.
    Enough,
    Retry(String),
    Refused(String, String),
    Failed(String, String),
}

/// What became of one fetched item.
enum Verdict {
    /// Store it (new content).
    Store(Box<(OpenedMessage, Vec<u8>)>),
    /// Nothing to store; acknowledge it.
    Done,
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
    read_backs: Vec<(MessageId, crate::transfer::ReadBack)>,
    /// The running hashes of uploads left for a later call (a file's
    /// manifest goes out after its first pieces, then the upload goes on),
    /// by message and recipient; at most `KEPT_UPLOAD_HASHES`.
    upload_hashes: Vec<((MessageId, [u8; 32]), crate::transfer::UploadHashes)>,
    /// What the checks caught in this pass, recorded at its end.
    found: Vec<(&'static str, String)>,
    /// Blobs of files received whole in this pass, deleted at the relay
    /// after the receipts went out (a relay may take a while to free a
    /// large file; the sender should not wait for that).
    blob_deletes: Vec<[u8; 16]>,
    _lock: File,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("home_relay", &self.home_addr.to_string())
            .finish()
    }
}

impl Agent {
    /// The home relay, if set.
    pub fn home_relay(&self) -> Result<Option<RelayAddress>, EngineError> {
        match self.db.setting(HOME_RELAY)? {
            None => Ok(None),
            Some(s) => RelayAddress::parse(&s)
                .map(Some)
                .ok_or(EngineError::BadHomeRelay(s)),
        }
    }

    /// Seals `content` to the named contacts and queues it in the outbox,
    /// durably; returns its id. Every recipient needs a home relay in its
    /// card, and this identity needs one (receipts come back there).
    pub fn send(
        &mut self,
        names: &[String],
        content: &[u8],
        lifetime_secs: u64,
        summary: &str,
    ) -> Result<MessageId, SendError> {
        let to = self.resolve(names)?;
        let m = to.seal(&self.identity, content, lifetime_secs, summary)?;
        self.queue_prepared(std::slice::from_ref(&m))?;
        Ok(m.id)
    }

    /// Queues a file: its blob is uploaded to each recipient's relay
    /// (resumably) before the sealed manifest naming it is submitted. The
    /// file is read once now to compute its hashes and again while
    /// uploading; it must not change in between (a change is detected).
    /// The receipt for it carries the BLAKE3 and size of the file itself.
    pub fn send_file(
        &mut self,
        names: &[String],
        path: &std::path::Path,
        lifetime_secs: u64,
    ) -> Result<(MessageId, u64), SendError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                SendError::BadFile(format!("{} has no usable file name", path.display()))
            })?
            .to_owned();
        self.send_file_as(names, path, &name, lifetime_secs, None)
    }

    /// Sends every regular file under `dir` (symbolic links and special
    /// files are skipped), each as its own file transfer whose name is its
    /// path relative to `dir`'s parent (`dir/sub/file`), so the recipient
    /// rebuilds the tree inside its download directory. At most 10,000
    /// files, 32 levels deep. Returns (id, path, size) per file.
    pub fn send_tree(
        &mut self,
        names: &[String],
        dir: &std::path::Path,
        lifetime_secs: u64,
    ) -> Result<Vec<(MessageId, String, u64)>, SendError> {
        let files = list_tree(dir)?;
        self.send_listed(names, &files, lifetime_secs)
    }

    /// Sends files listed by [`list_tree`], in order.
    pub fn send_listed(
        &mut self,
        names: &[String],
        files: &[TreeFile],
        lifetime_secs: u64,
    ) -> Result<Vec<(MessageId, String, u64)>, SendError> {
        let mut out = Vec::with_capacity(files.len());
        // One group for the directory: its id is drawn once, each file's
        // manifest names its place in it.
        let mut group_id = [0u8; 16];
        OsRng.fill_bytes(&mut group_id);
        let count = u32::try_from(files.len()).unwrap_or(u32::MAX);
        for (k, f) in files.iter().enumerate() {
            let group = sealpost_proto::manifest::Group::new(group_id, k as u32, count)
                .map_err(|e| SendError::BadFile(e.to_string()))?;
            let (id, size) =
                self.send_file_as(names, &f.path, &f.name, lifetime_secs, Some(group))?;
            out.push((id, f.name.clone(), size));
        }
        Ok(out)
    }

    /// Sends a file under the name (or relative path) `name`.
    pub fn send_file_as(
        &mut self,
        names: &[String],
        path: &std::path::Path,
        name: &str,
        lifetime_secs: u64,
        group: Option<sealpost_proto::manifest::Group>,
    ) -> Result<(MessageId, u64), SendError> {
        let to = self.resolve(names)?;
        let name = name.to_owned();
        sealpost_proto::manifest::validate_file_path(&name)
            .map_err(|e| SendError::BadFile(format!("{}: {e}", path.display())))?;
        let meta = std::fs::metadata(path)
            .map_err(|e| SendError::BadFile(format!("cannot read {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(SendError::BadFile(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let abs = std::fs::canonicalize(path)
            .map_err(|e| SendError::BadFile(format!("{}: {e}", path.display())))?;
        let key = sealpost_proto::blob::BlobKey::random(&mut OsRng);
        let (layout, plaintext_hash) =
            crate::transfer::summarize(&abs, sealpost_proto::blob::DEFAULT_CHUNK_SIZE)
                .map_err(|e| SendError::BadFile(format!("cannot read {}: {e}", path.display())))?;
        let blob_id = sealpost_proto::manifest::BlobId::random(&mut OsRng);
        let manifest = sealpost_proto::manifest::FileManifest::new(
            blob_id,
            key.clone(),
            layout,
            plaintext_hash,
            name.clone(),
        )
        .map_err(|e| SendError::BadFile(e.to_string()))?;
        let manifest = match group {
            Some(g) => manifest.in_group(g),
            None => manifest,
        };
        let mut m = to.seal_kind(
            &self.identity,
            Kind::FileManifest,
            &manifest.encode(),
            lifetime_secs,
            &format!("file {name}"),
        )?;
        // What the receipt must name: the file as stored, not the manifest.
        m.sent = sealpost_proto::delivery::Sent {
            content_hash: *plaintext_hash.as_bytes(),
            content_len: layout.plaintext_len,
        };
        self.queue_prepared(std::slice::from_ref(&m))?;
        self.db.add_file_out(
            &crate::outbox::FileOut {
                msg: m.id,
                path: abs.to_string_lossy().into_owned(),
                blob_id: blob_id.0,
                key,
                size: layout.plaintext_len,
                chunk_size: layout.chunk_size,
                plaintext_hash: *plaintext_hash.as_bytes(),
            },
            group.as_ref(),
        )?;
        Ok((m.id, layout.plaintext_len))
    }

    /// Where received files go: the `download_dir` setting, else
    /// `downloads/` in the home.
    pub fn download_dir(&self) -> Result<PathBuf, AgentError> {
        Ok(match self.db.setting(DOWNLOAD_DIR)? {
            Some(d) => PathBuf::from(d),
            // Absolute, so that paths shown and stored do not depend on
            // where a command ran (`--home ./h`).
            None => std::path::absolute(self.home.dir().join("downloads"))
                .unwrap_or_else(|_| self.home.dir().join("downloads")),
        })
    }

    /// Looks up recipients for sealing (see [`Recipients::seal`]).
    pub fn resolve(&self, names: &[String]) -> Result<Recipients, SendError> {
        let home = self.home_relay()?.ok_or(EngineError::NoHomeRelay)?;
        if names.is_empty() || names.len() > MAX_RECIPIENTS {
            return Err(SendError::Recipients);
        }
        let mut keys = Vec::with_capacity(names.len());
        let mut queued: Vec<QueuedRecipient> = Vec::with_capacity(names.len());
        for n in names {
            if queued.iter().any(|r| &r.name == n) {
                continue;
            }
            let c = self.db.contact(n)?;
            let relay = c
                .card
                .fields()
                .relay
                .as_ref()
                .ok_or_else(|| SendError::NoRelay(n.clone()))?;
            keys.push(*c.card.public());
            queued.push(QueuedRecipient {
                name: n.clone(),
                signing: *c.card.public().signing_bytes(),
                relay: address_of(relay).to_string(),
            });
        }
        Ok(Recipients {
            keys,
            queued,
            reply: pin_of(&home),
        })
    }

    /// Queues sealed messages in one transaction.
    pub fn queue_prepared(&mut self, batch: &[Prepared]) -> Result<(), SendError> {
        let rows: Vec<_> = batch
            .iter()
            .map(|m| {
                (
                    QueuedMessage {
                        id: m.id,
                        kind: m.kind.name(),
                        created_ms: m.created_at * 1000,
                        expires_ms: m.expires_at * 1000,
                        sent: m.sent,
                        summary: &m.summary,
                        sealed: &m.sealed,
                    },
                    &m.recipients[..],
                )
            })
            .collect();
        self.db.queue_many(&rows)?;
        Ok(())
    }
}

/// Resolved recipients, ready for sealing on any thread.
#[derive(Debug, Clone)]
pub struct Recipients {
    keys: Vec<PublicIdentity>,
    queued: Vec<QueuedRecipient>,
    reply: RelayPin,
}

/// A sealed message not yet queued.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub id: MessageId,
    pub kind: Kind,
    pub created_at: u64,
    pub expires_at: u64,
    pub sent: sealpost_proto::delivery::Sent,
    pub summary: String,
    pub sealed: Vec<u8>,
    pub recipients: Vec<QueuedRecipient>,
}

impl Recipients {
    /// (contact name, relay address) of each recipient.
    pub fn relays(&self) -> impl Iterator<Item = (&str, &str)> {
        self.queued
            .iter()
            .map(|q| (q.name.as_str(), q.relay.as_str()))
    }

    /// Seals `content` to these recipients, naming the home relay as the
    /// place for receipts.
    pub fn seal(
        &self,
        me: &sealpost_proto::Identity,
        content: &[u8],
        lifetime_secs: u64,
        summary: &str,
    ) -> Result<Prepared, SendError> {
        self.seal_kind(me, Kind::Message, content, lifetime_secs, summary)
    }

    /// Like [`Recipients::seal`], for any kind.
    pub fn seal_kind(
        &self,
        me: &sealpost_proto::Identity,
        kind: Kind,
        content: &[u8],
        lifetime_secs: u64,
        summary: &str,
    ) -> Result<Prepared, SendError> {
        if content.len() > MAX_CONTENT {
            return Err(SendError::TooLarge {
                len: content.len() as u64,
                max: MAX_CONTENT as u64,
            });
        }
        let now_s = now_ms() / 1000;
        let lifetime = lifetime_secs.clamp(1, message::MAX_LIFETIME_SECS);
        let id = MessageId::random(&mut OsRng);
        let req = SealRequest {
            kind,
            id,
            created_at: now_s,
            expires_at: now_s + lifetime,
            in_reply_to: None,
            recipients: &self.keys,
            reply_relay: Some(&self.reply),
        };
        let mut sealed = std::io::Cursor::new(Vec::with_capacity(content.len() + 1024));
        let s = message::seal_stream(me, &req, content, &mut sealed)
            .map_err(|e| SendError::Seal(e.to_string()))?;
        let sealed = sealed.into_inner();
        if sealed.len() > MAX_MESSAGE {
            return Err(SendError::TooLarge {
                len: content.len() as u64,
                max: MAX_CONTENT as u64,
            });
        }
        Ok(Prepared {
            id,
            kind,
            created_at: now_s,
            expires_at: now_s + lifetime,
            sent: sealpost_proto::delivery::Sent {
                content_hash: *s.content_hash.as_bytes(),
                content_len: s.content_len,
            },
            summary: summary.to_owned(),
            sealed,
            recipients: self.queued.clone(),
        })
    }
}

/// Why `send` could not queue a message.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Agent(#[from] AgentError),
    /// `len` is what was read, which stops just past `max`: the real
    /// size may be larger, so it is not stated as the size.
    #[error("the content is larger than a message carries ({max} bytes at most); send it as a file: `sealpost send NAME --file PATH`")]
    TooLarge { len: u64, max: u64 },
    #[error("a message needs 1 to 32 recipients")]
    Recipients,
    #[error("{0:?}'s card names no home relay, so there is nowhere to deliver; ask them for a card made after `sealpost relay use`, then `sealpost contact add` it again")]
    NoRelay(String),
    #[error("sealing failed: {0}")]
    Seal(String),
    #[error("{0}")]
    BadFile(String),
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
        self.home = RelayLink::new(self.home_addr.clone()).with_backoff(b);
        self.home.max_attempts = 3;
        self.home.timeouts = t;
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
        match self.fetch_all(&mut stats, &mut acks).await {
            Ok(()) => {}
            Err(EngineError::Relay(e)) => {
                // Said by the caller: `run` with backoff, `sync` in its
                // result.
                tracing::debug!("fetching from {}: {e}", self.home_addr);
                stats.home_errors += 1;
                stats.home_key_mismatch = matches!(e, ClientError::KeyMismatch { .. });
                stats.home_error = Some(e.to_string());
                self.home.disconnect();
            }
            Err(e) => return Err(e),
        }
        // Receipts go out before waiting for the relay to confirm the
        // acknowledgements: the sender learns sooner, and an ack that got
        // lost only means a duplicate next time (which gets its receipt
        // again and is not delivered twice).
        tracing::trace!("pass: fetched {}", stats.fetched);
        // Messages' receipts go out now: a download (a large file, or one
        // whose blob is slow to come) must not hold them up.
        self.send_reports(&mut stats).await?;
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
        let expired = self.agent.db.expire(now_ms())?;
        for row in &expired {
            tracing::warn!(
                "message {} to {}: failed, expired before a receipt arrived",
                row.msg,
                row.name
            );
        }
        stats.expired += expired.len() as u64;
        self.flush_found(&mut stats)?;
        tracing::trace!("pass: done");
        Ok(stats)
    }

    /// Records what the checks caught so far in this pass.
    fn flush_found(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        if !self.found.is_empty() {
            self.agent.db.record_detections(&self.found, now_ms())?;
            stats.detections += self.found.len() as u64;
            self.found.clear();
        }
        Ok(())
    }

    async fn fetch_all(
        &mut self,
        stats: &mut PassStats,
        acks: &mut Vec<tokio::sync::oneshot::Receiver<sealpost_proto::relay::Response>>,
    ) -> Result<(), EngineError> {
        let mut after = 0u64;
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
                    return Ok(());
                }
            }
            let (items, more) = self
                .home
                .call(&self.agent.identity, async |c| {
                    c.fetch(after, FETCH_BATCH).await
                })
                .await?;
            let Some(last) = items.last() else {
                return Ok(());
            };
            after = last.seq;
            stats.fetched += items.len() as u64;
            let seqs: Vec<u64> = items.iter().map(|i| i.seq).collect();
            let payloads: Vec<Vec<u8>> = items.into_iter().map(|i| i.payload).collect();
            let mut batch = PassStats::default();
            self.process_batch(payloads, &mut batch)?;
            stats.add(&batch);
            // Everything above is durable: now the relay may forget it.
            let rx = self
                .home
                .call(&self.agent.identity, async |c| {
                    c.send(sealpost_proto::relay::Request::Ack { seqs: seqs.clone() })
                        .await
                })
                .await?;
            acks.push(rx);
            if !more {
                return Ok(());
            }
        }
    }

    /// Opens, classifies and stores one fetched batch. Returns when every
    /// outcome is durable.
    fn process_batch(
        &mut self,
        payloads: Vec<Vec<u8>>,
        stats: &mut PassStats,
    ) -> Result<(), EngineError> {
        let opened = open_all(&self.agent.identity, &payloads);
        let now_s = now_ms() / 1000;
        let mut to_store: Vec<(OpenedMessage, Vec<u8>)> = Vec::new();
        let mut reports: Vec<PendingReport> = Vec::new();
        for (r, payload) in opened.into_iter().zip(&payloads) {
            let (verdict, caught) = match r {
                Err(e) => {
                    tracing::warn!("discarded a fetched item: {e}");
                    stats.discarded += 1;
                    (Verdict::Done, Some(e.class()))
                }
                Ok((m, content)) => {
                    let before = (stats.discarded, stats.duplicates, stats.forged_reports);
                    let v = self.classify(m, content, now_s, &to_store, &mut reports, stats)?;
                    let caught = if !matches!(v, Verdict::Done) {
                        None
                    } else if stats.duplicates > before.1 {
                        Some("duplicate")
                    } else if stats.forged_reports > before.2 {
                        Some("forged-report")
                    } else if stats.discarded > before.0 {
                        Some("discarded")
                    } else {
                        None
                    };
                    (v, caught)
                }
            };
            if let Some(class) = caught {
                // Named by the BLAKE3 of the bytes as fetched, as a
                // hostile relay's fault log names them.
                let item = blake3::hash(payload).to_hex().to_string();
                self.found.push((class, item));
            }
            if let Verdict::Store(stored) = verdict {
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
        let received_ms = now_ms();
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
                        groups.push((h.id, g));
                    }
                    downloads.push(crate::outbox::Download {
                        msg: h.id,
                        sender: *h.sender.signing_bytes(),
                        agreement: *h.sender.agreement_bytes(),
                        relay,
                        blob_id: f.blob_id.0,
                        key: f.key.clone(),
                        size: f.layout.plaintext_len,
                        chunk_size: f.layout.chunk_size,
                        plaintext_hash: *f.plaintext_hash.as_bytes(),
                        name: f.name.clone(),
                        dir: download_dir.to_string_lossy().into_owned(),
                        next_chunk: 0,
                        bad: Vec::new(),
                        attempts: 0,
                        state: "downloading".into(),
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
            if new.contains(&m.header.id) && m.header.kind == Kind::FileManifest {
                // The file itself is said when it is stored and verified.
                tracing::debug!(
                    "file announced in message {} from {}",
                    m.header.id,
                    self.agent.who(&m.header.sender)
                );
            } else if new.contains(&m.header.id) {
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
    fn reply_relay(
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

    fn classify(
        &mut self,
        m: OpenedMessage,
        content: Vec<u8>,
        now_s: u64,
        batch: &[(OpenedMessage, Vec<u8>)],
        reports: &mut Vec<PendingReport>,
        stats: &mut PassStats,
    ) -> Result<Verdict, EngineError> {
        let h = &m.header;
        let contact = self
            .agent
            .db
            .contact_by_key(h.sender.signing_bytes())?
            .filter(|c| c.card.public() == &h.sender);
        if matches!(
            h.kind,
            Kind::Receipt | Kind::Rejection | Kind::RepairRequest | Kind::Repair
        ) && contact.is_some()
        {
            // Control messages are acted on once: a relay replaying an old
            // receipt or repair request changes nothing (and cannot make
            // us upload the same chunks again and again).
            if self.agent.db.replay_seen(&h.id)? {
                stats.duplicates += 1;
                return Ok(Verdict::Done);
            }
            if let Err(e) = self.agent.policy.check(h, now_s) {
                tracing::warn!(
                    "discarded a {} from {}: {e}",
                    h.kind.name(),
                    self.agent.who(&h.sender)
                );
                stats.discarded += 1;
                return Ok(Verdict::Done);
            }
        }
        match h.kind {
            Kind::Receipt | Kind::Rejection => {
                if contact.is_none() {
                    tracing::warn!(
                        "discarded a {} from {}, who is not a contact",
                        h.kind.name(),
                        self.agent.who(&h.sender)
                    );
                    stats.discarded += 1;
                    return Ok(Verdict::Done);
                }
                self.apply_report(&m, &content, stats)?;
                self.remember_control(h, now_s)?;
                return Ok(Verdict::Done);
            }
            Kind::RepairRequest | Kind::Repair => {
                if contact.is_none() {
                    stats.discarded += 1;
                    return Ok(Verdict::Done);
                }
                self.apply_repair(&m, &content)?;
                self.remember_control(h, now_s)?;
                return Ok(Verdict::Done);
            }
            _ => {}
        }
        let reject = |reason: RejectReason, this: &Self, reports: &mut Vec<PendingReport>| {
            this.reply_relay(&h.sender, h.reply_relay.as_ref())
                .map(|relay| {
                    if let Some(relay) = relay {
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
                })
        };
        // A copy of something already stored: its receipt again, once.
        if let Some(prev) = self.agent.db.inbox_entry(&h.id)? {
            if prev.sender == *h.sender.signing_bytes() && h.kind == Kind::FileManifest {
                // A file's receipt names the file: again if it is done,
                // later (when it is) otherwise.
                stats.duplicates += 1;
                if let Some(d) = self.agent.db.download(&h.id)? {
                    if d.state == "repairing" || d.state == "failed" {
                        // The sender sent it again: its blob may be back at
                        // the relay. Try again, keeping every good chunk.
                        self.agent
                            .db
                            .download_state(&d.msg, "downloading", None, now_ms())?;
                    }
                    if d.state == "done" {
                        if let Some(relay) = self.reply_relay(&h.sender, h.reply_relay.as_ref())? {
                            reports.push(d.receipt(relay, d.changed_ms / 1000));
                        }
                    }
                }
            } else if prev.sender == *h.sender.signing_bytes() {
                stats.duplicates += 1;
                if let Some(relay) = self.reply_relay(&h.sender, h.reply_relay.as_ref())? {
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
            } else {
                tracing::warn!(
                    "discarded message {}: its id is already in the inbox from another sender",
                    h.id
                );
                stats.discarded += 1;
            }
            return Ok(Verdict::Done);
        }
        if batch.iter().any(|(b, _)| b.header.id == h.id) {
            stats.duplicates += 1;
            return Ok(Verdict::Done);
        }
        if contact.is_none() {
            tracing::warn!(
                "rejected message {} from {}: not a contact",
                h.id,
                self.agent.who(&h.sender)
            );
            stats.rejected += 1;
            self.agent
                .db
                .note_refused_sender(h.sender.signing_bytes(), now_ms())?;
            reject(RejectReason::NotAContact, self, reports)?;
            return Ok(Verdict::Done);
        }
        match self.agent.policy.check(h, now_s) {
            Ok(()) => {}
            Err(e) => {
                let reason = match e {
                    OpenError::FromFuture { .. } => RejectReason::FromTheFuture,
                    OpenError::NoExpiry => RejectReason::NoExpiry,
                    _ => RejectReason::Expired,
                };
                tracing::warn!("rejected message {}: {e}", h.id);
                stats.rejected += 1;
                reject(reason, self, reports)?;
                return Ok(Verdict::Done);
            }
        }
        if self.agent.db.replay_seen(&h.id)? {
            tracing::warn!("discarded message {}: already opened (replayed)", h.id);
            stats.duplicates += 1;
            return Ok(Verdict::Done);
        }
        if h.kind == Kind::FileManifest {
            // A file is judged by its manifest before anything is fetched:
            // one that cannot be read, or that is larger than this agent
            // takes, is refused now (the sender is told, signed), instead
            // of waiting in the inbox without a receipt until it expires.
            let refusal = match sealpost_proto::manifest::FileManifest::decode(&content) {
                Err(e) => Some((RejectReason::Malformed, e.to_string())),
                Ok(f) if f.layout.plaintext_len > self.max_file => Some((
                    RejectReason::TooLarge,
                    format!(
                        "{} is {} bytes, more than the {} this agent takes (--max-file)",
                        f.name, f.layout.plaintext_len, self.max_file
                    ),
                )),
                Ok(_) => None,
            };
            if let Some((reason, why)) = refusal {
                tracing::warn!(
                    "rejected file in message {} from {}: {why}",
                    h.id,
                    self.agent.who(&h.sender)
                );
                stats.rejected += 1;
                reject(reason, self, reports)?;
                return Ok(Verdict::Done);
            }
        }
        Ok(Verdict::Store(Box::new((m, content))))
    }

    /// Records a control message as acted on, after its effect committed
    /// (a crash in between applies it again, which changes nothing).
    fn remember_control(
        &mut self,
        h: &sealpost_proto::MessageHeader,
        now_s: u64,
    ) -> Result<(), EngineError> {
        let until = self.agent.policy.remember_until(h.expires_at);
        self.agent.db.replay_insert(&h.id, until, now_s)?;
        Ok(())
    }

    /// Verifies a receipt or rejection and applies it to the outbox.
    fn apply_report(
        &mut self,
        m: &OpenedMessage,
        content: &[u8],
        stats: &mut PassStats,
    ) -> Result<(), EngineError> {
        let report = match Report::decode(content) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    "forged or damaged {} from {}: {e}",
                    m.header.kind.name(),
                    self.agent.who(&m.header.sender)
                );
                stats.forged_reports += 1;
                return Ok(());
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
            return Ok(());
        }
        let applied =
            self.agent
                .db
                .apply_report(m.header.sender.signing_bytes(), &report, now_ms())?;
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
                Some(Outcome::Mismatch) => tracing::error!(
                    "receipt for message {} names a different hash or length than was sent; not counted as delivered",
                    a.id
                ),
                None => {
                    tracing::warn!("{} names message {}, which we never sent to its signer", report.kind_name(), a.id);
                    stats.forged_reports += 1;
                }
            }
        }
        Ok(())
    }

    async fn send_reports(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        let pending = self.agent.db.pending_reports(REPORT_BATCH)?;
        if pending.is_empty() {
            return Ok(());
        }
        let now_s = now_ms() / 1000;
        for (group, entries) in PendingReport::group(pending) {
            let done: Vec<([u8; 32], MessageId)> =
                group.ids.iter().map(|id| (group.subject, *id)).collect();
            let Ok(subject) = PublicIdentity::from_bytes(&group.subject, &group.agreement) else {
                self.agent.db.remove_pending_reports(&done)?;
                continue;
            };
            let kind = match entries {
                Entries::Receipt(_) => Kind::Receipt,
                Entries::Rejection(_) => Kind::Rejection,
            };
            let report = Report::sign(&self.agent.identity, &subject, now_s, entries)
                .map_err(AgentError::from)?;
            match self
                .send_control(&subject, &group.relay, kind, report.as_bytes())
                .await?
            {
                Control::Accepted => {
                    stats.reports_sent += 1;
                    self.agent.db.remove_pending_reports(&done)?;
                }
                // A report the relay will never take (unknown mailbox, not
                // a relay address): forget it, the sender retransmits.
                Control::Refused => self.agent.db.remove_pending_reports(&done)?,
                Control::Failed => {}
            }
        }
        Ok(())
    }

    async fn submit_due(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        // Bounded: a pass submits at most this many rounds.
        for _ in 0..64 {
            let now = now_ms();
            let due = self.agent.db.due(now, SUBMIT_BATCH)?;
            if due.is_empty() {
                return Ok(());
            }
            let mut sealed: HashMap<MessageId, Vec<u8>> = HashMap::new();
            let mut by_relay: HashMap<String, Vec<usize>> = HashMap::new();
            let mut bytes = 0usize;
            let mut take = 0usize;
            let mut updates = Vec::with_capacity(due.len());
            let mut streaming: Vec<usize> = Vec::new();
            for (i, d) in due.iter().enumerate() {
                // A file's manifest goes out only once its blob is whole at
                // the recipient's relay.
                if let Some(f) = self.agent.db.file_out(&d.msg)? {
                    let now = now_ms();
                    let mut del = d.delivery.clone();
                    // The manifest goes out once the first window is at the
                    // relay, so the recipient downloads while the rest
                    // streams in (finished after the batch, below).
                    let head = (PIECE_WINDOW * sealpost_proto::relay::MAX_BLOB_PIECE) as u64;
                    match self.upload(d, &f, stats, head).await? {
                        Upload::Complete => {}
                        Upload::Enough => streaming.push(i),
                        Upload::Retry(e) => {
                            tracing::warn!("uploading {} to {}: {e}; will retry", f.path, d.name);
                            del.transient_failure(now, &self.timing, unit_random());
                            stats.submit_errors += 1;
                            updates.push((d.msg, d.recipient, del, Some(e)));
                            take = i + 1;
                            continue;
                        }
                        Upload::Refused(code, detail) => {
                            tracing::warn!("uploading {} to {}: refused: {detail}", f.path, d.name);
                            del.refused(now, &code, &detail);
                            stats.refused += 1;
                            updates.push((d.msg, d.recipient, del, None));
                            take = i + 1;
                            continue;
                        }
                        Upload::Failed(code, detail) => {
                            tracing::warn!("sending {} to {}: {detail}", f.path, d.name);
                            del.local_failure(now, &code, &detail);
                            updates.push((d.msg, d.recipient, del, None));
                            take = i + 1;
                            continue;
                        }
                    }
                }
                if let std::collections::hash_map::Entry::Vacant(v) = sealed.entry(d.msg) {
                    let s = self.agent.db.sealed(&d.msg)?.unwrap_or_default();
                    bytes += s.len();
                    v.insert(s);
                }
                by_relay.entry(d.relay.clone()).or_default().push(i);
                take = i + 1;
                if bytes >= SUBMIT_BATCH_BYTES {
                    break;
                }
            }
            // Relays that took something in this round: what waits for
            // them after a failure is tried again now, not after its
            // backoff (a relay that came back is used at once).
            let mut reachable: Vec<String> = Vec::new();
            for (relay, idxs) in by_relay {
                let items: Vec<(MailboxId, u64, Vec<u8>)> = idxs
                    .iter()
                    .map(|&i| {
                        let d = &due[i];
                        (
                            MailboxId::of(&d.recipient),
                            d.delivery.expires_at / 1000,
                            sealed.get(&d.msg).cloned().unwrap_or_default(),
                        )
                    })
                    .collect();
                let answers =
                    match link_for(&mut self.home, &mut self.links, &self.home_addr, &relay) {
                        None => Vec::new(),
                        Some(link) => {
                            let r = link
                                .call(&self.agent.identity, async |c| {
                                    Ok(c.submit_many(items.clone()).await)
                                })
                                .await;
                            match r {
                                Ok(a) => {
                                    if a.iter().any(|x| {
                                        matches!(x, Err(ClientError::Closed | ClientError::Io(_)))
                                    }) {
                                        link.disconnect();
                                    }
                                    a
                                }
                                Err(e) => {
                                    link.disconnect();
                                    let msg = e.to_string();
                                    idxs.iter()
                                        .map(|_| {
                                            Err(ClientError::Io(std::io::Error::other(msg.clone())))
                                        })
                                        .collect()
                                }
                            }
                        }
                    };
                let now = now_ms();
                for (k, &i) in idxs.iter().enumerate() {
                    let row = &due[i];
                    let mut d = row.delivery.clone();
                    let mut last_error = None;
                    match answers.get(k) {
                        Some(Ok(Submitted::Accepted { .. })) => {
                            d.accepted(now, &self.timing, unit_random());
                            stats.submitted += 1;
                            if !reachable.contains(&relay) {
                                reachable.push(relay.clone());
                            }
                        }
                        Some(Ok(Submitted::Refused(r))) if !r.code.is_lasting() => {
                            d.transient_failure(now, &self.timing, unit_random());
                            let why = format!(
                                "relay {relay}: {} (trying again until the message expires)",
                                r.code.describe()
                            );
                            tracing::warn!("message {} to {}: {why}", row.msg, row.name);
                            last_error = Some(why);
                            stats.submit_errors += 1;
                        }
                        Some(Ok(Submitted::Refused(r))) => {
                            d.refused(now, r.code.name(), r.code.describe());
                            stats.refused += 1;
                            tracing::warn!(
                                "message {} to {}: refused by relay {}: {}",
                                row.msg,
                                row.name,
                                relay,
                                r.code.describe()
                            );
                        }
                        Some(Err(e)) => {
                            if matches!(e, ClientError::ForgedRefusal) {
                                tracing::warn!("relay {relay} sent a refusal that is not signed by its key: forged, ignored");
                                if let Some((_, _, p)) = items.get(k) {
                                    self.found.push((
                                        "forged-refusal",
                                        blake3::hash(p).to_hex().to_string(),
                                    ));
                                }
                            }
                            d.transient_failure(now, &self.timing, unit_random());
                            last_error = Some(e.to_string());
                            stats.submit_errors += 1;
                        }
                        None => {
                            d.transient_failure(now, &self.timing, unit_random());
                            last_error = Some(format!("cannot reach relay {relay}"));
                            stats.submit_errors += 1;
                        }
                    }
                    updates.push((row.msg, row.recipient, d, last_error));
                }
            }
            tracing::trace!("submit: {} answered", updates.len());
            // Files whose manifest went out with their blob still
            // streaming: if this process dies now, resume within seconds,
            // not at the retransmission time.
            let mut finish = Vec::new();
            for u in updates.iter_mut() {
                if let Some(&i) = streaming
                    .iter()
                    .find(|&&i| due[i].msg == u.0 && due[i].recipient == u.1)
                {
                    if u.2.state == sealpost_proto::delivery::State::Submitted {
                        finish.push((i, u.2.next_at));
                        u.2.next_at = now_ms() + 10_000;
                    }
                }
            }
            self.agent.db.save_deliveries(&updates)?;
            for relay in &reachable {
                let n = self.agent.db.relay_reachable(relay, now_ms())?;
                if n > 0 {
                    tracing::info!("relay {relay} takes messages again: {n} waiting for it go now");
                }
            }
            tracing::trace!("submit: saved");
            for (i, next_at) in finish {
                let d = &due[i];
                let Some(f) = self.agent.db.file_out(&d.msg)? else {
                    continue;
                };
                let mut del = self
                    .agent
                    .db
                    .outbox(Some(&d.msg), 1)?
                    .into_iter()
                    .next()
                    .and_then(|m| {
                        m.deliveries
                            .into_iter()
                            .find(|x| x.recipient == d.recipient)
                    })
                    .map(|x| x.delivery)
                    .unwrap_or_else(|| d.delivery.clone());
                let now = now_ms();
                let err = match self.upload(d, &f, stats, u64::MAX).await? {
                    Upload::Complete | Upload::Enough => {
                        del.next_at = next_at;
                        None
                    }
                    Upload::Retry(e) => {
                        tracing::warn!("uploading {} to {}: {e}; will retry", f.path, d.name);
                        del.transient_failure(now, &self.timing, unit_random());
                        Some(e)
                    }
                    Upload::Refused(code, detail) => {
                        del.refused(now, &code, &detail);
                        None
                    }
                    Upload::Failed(code, detail) => {
                        del.local_failure(now, &code, &detail);
                        None
                    }
                };
                self.agent
                    .db
                    .save_deliveries(&[(d.msg, d.recipient, del, err)])?;
            }
            if take < due.len() || due.len() == SUBMIT_BATCH {
                continue;
            }
            return Ok(());
        }
        Ok(())
    }

    /// Uploads a file's blob to the recipient's relay, from what the relay
    /// already holds, until it holds it whole.
    async fn upload(
        &mut self,
        row: &crate::outbox::DeliveryRow,
        f: &crate::outbox::FileOut,
        stats: &mut PassStats,
        until: u64,
    ) -> Result<Upload, EngineError> {
        use sealpost_proto::blob::BlobLayout;
        let layout = match BlobLayout::new(f.size, f.chunk_size) {
            Ok(l) => l,
            Err(e) => return Ok(Upload::Failed("bad-file".into(), e.to_string())),
        };
        let total = layout.blob_len();
        let cipher = f.key.cipher();
        let src = match File::open(&f.path) {
            Ok(s) => s,
            Err(e) => {
                return Ok(Upload::Failed(
                    "source-unreadable".into(),
                    format!("cannot read {}: {e}", f.path),
                ))
            }
        };
        if src.metadata().map(|m| m.len()).ok() != Some(f.size) {
            return Ok(Upload::Failed(
                "source-changed".into(),
                format!("{} changed size after it was queued; send it again", f.path),
            ));
        }
        let mailbox = MailboxId::of(&row.recipient);
        let expires = row.delivery.expires_at / 1000;
        let progress = crate::transfer::FileBytes::new(self.progress.clone(), layout);
        let Some(link) = link_for(&mut self.home, &mut self.links, &self.home_addr, &row.relay)
        else {
            return Ok(Upload::Failed(
                "bad-relay".into(),
                format!("{:?} is not a relay address", row.relay),
            ));
        };
        let me = &self.agent.identity;
        let blob_id = f.blob_id;
        let (mut stored, mut complete) =
            match link.call(me, async |c| c.blob_status(blob_id).await).await {
                Ok(v) => v,
                Err(e) => return Ok(Upload::Retry(e.to_string())),
            };
        if complete {
            return Ok(Upload::Complete);
        }
        let name = std::path::Path::new(&f.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        progress.start(&format!("upload {name} → {}", row.name), total, stored);
        let mut stalls = 0;
        let mut reconnects = 0;
        let mut noted = stored;
        // The blob's and the file's hashes over the pieces sealed so far
        // (kept from the last call for this upload, which ended where the
        // relay's length now is), and copies of them at the end of each
        // piece still unanswered, to go on from whichever length the
        // relay holds after a lost connection.
        let key = (row.msg, row.recipient);
        let mut hashes = self
            .upload_hashes
            .iter()
            .position(|(k, _)| *k == key)
            .map(|i| self.upload_hashes.remove(i).1)
            .unwrap_or_default();
        let mut marks: std::collections::VecDeque<crate::transfer::UploadHashes> =
            std::collections::VecDeque::with_capacity(PIECE_WINDOW + 1);
        let result = loop {
            if complete {
                break Upload::Complete;
            }
            if stored >= until {
                break Upload::Enough;
            }
            if hashes.at() != stored {
                match marks.iter().find(|m| m.at() == stored) {
                    Some(m) => hashes = m.clone(),
                    // A restarted sender resuming an upload: hash what the
                    // relay holds (re-encrypting it, sending nothing).
                    None => {
                        if let Err(e) = hashes.catch_up(&src, &cipher, &layout, stored) {
                            break Upload::Failed(
                                "source-changed".into(),
                                format!("{}: {e}", f.path),
                            );
                        }
                    }
                }
            }
            marks.clear();
            marks.push_back(hashes.clone());
            // A sliding window of consecutive pieces: up to PIECE_WINDOW
            // are in flight (the relay stores them in order) while the
            // next one is read and encrypted.
            let before = stored;
            let client = match link.client(me).await {
                Ok(c) => c,
                Err(e) => {
                    link.disconnect();
                    break Upload::Retry(e.to_string());
                }
            };
            let mut in_flight = std::collections::VecDeque::with_capacity(PIECE_WINDOW);
            let mut at = stored;
            let mut outcome = None;
            let mut lost = None;
            loop {
                while in_flight.len() < PIECE_WINDOW && at < total && at < until {
                    let n = crate::transfer::piece_len(&layout, at);
                    if n == 0 {
                        break;
                    }
                    let data = match hashes.seal_next(&src, &cipher, &layout, n) {
                        Ok(d) => d,
                        Err(e) => {
                            outcome = Some(Upload::Failed(
                                "source-changed".into(),
                                format!("{}: {e}", f.path),
                            ));
                            break;
                        }
                    };
                    // The last piece states the blob's hash, once the file
                    // proved to be the one that was queued.
                    let mut blob_hash = [0u8; 32];
                    if at + n as u64 == total {
                        let (file_hash, blob) = hashes.finish();
                        if file_hash.as_bytes() != &f.plaintext_hash {
                            sealpost_proto::buffers::give(data);
                            outcome = Some(Upload::Failed(
                                "source-changed".into(),
                                format!("{} changed since it was queued; send it again", f.path),
                            ));
                            break;
                        }
                        blob_hash = *blob.as_bytes();
                    }
                    if marks.len() > PIECE_WINDOW {
                        marks.pop_front();
                    }
                    marks.push_back(hashes.clone());
                    stats.upload_bytes += n as u64;
                    let p = client
                        .blob_put_send(BlobPiece {
                            blob_id,
                            mailbox,
                            total_len: total,
                            blob_hash,
                            expires_at: expires,
                            offset: at,
                            data,
                        })
                        .await;
                    in_flight.push_back((at + n as u64, p));
                    at += n as u64;
                }
                if outcome.is_some() {
                    break;
                }
                let Some((end, p)) = in_flight.pop_front() else {
                    break;
                };
                match client.blob_put_answer(p).await {
                    Ok(Ok((now_stored, done))) => {
                        if now_stored > stored {
                            progress.advance(now_stored - stored);
                        }
                        stored = now_stored;
                        complete = done;
                        if complete {
                            break;
                        }
                        if stored != end {
                            // The relay holds another length than this
                            // piece's end (another upload of the same blob,
                            // or a lost piece): resume from its length.
                            break;
                        }
                    }
                    Ok(Err(Submitted::Refused(r))) if !r.code.is_lasting() => {
                        outcome = Some(Upload::Retry(format!(
                            "{} (trying again until the message expires)",
                            r.code.describe()
                        )));
                        break;
                    }
                    Ok(Err(Submitted::Refused(r))) => {
                        let limits = if r.code == RefusalCode::TooLarge {
                            client.limits().await.ok().flatten()
                        } else {
                            None
                        };
                        outcome = Some(Upload::Refused(
                            r.code.name().to_owned(),
                            refusal_words(r.code, total, limits.map(|l| l.max_blob)),
                        ));
                        break;
                    }
                    Ok(Err(Submitted::Accepted { .. })) => {
                        outcome = Some(Upload::Retry("unexpected answer".into()));
                        break;
                    }
                    Err(ClientError::Server { message, .. }) if message.contains("BLAKE3") => {
                        // The relay says the blob does not match the hash
                        // the last piece stated. That hash was computed
                        // over exactly the bytes sent, in order, and the
                        // file's bytes matched the queued hash: the relay
                        // stored something else (or says so falsely). It
                        // discarded the blob; the next attempt starts over.
                        self.found
                            .push(("false-hash-mismatch", format!("blob:{}", hex(&blob_id))));
                        outcome = Some(Upload::Retry(format!(
                            "the relay claims the blob does not match its hash, which was computed over the bytes sent: {message}"
                        )));
                        break;
                    }
                    Err(ClientError::ForgedRefusal) => {
                        self.found
                            .push(("forged-refusal", format!("blob:{}", hex(&blob_id))));
                        outcome = Some(Upload::Retry(ClientError::ForgedRefusal.to_string()));
                        break;
                    }
                    Err(e) => {
                        lost = Some(e.to_string());
                        break;
                    }
                }
                if stored - noted >= 64 << 20 {
                    self.agent
                        .db
                        .set_uploaded(&row.msg, &row.recipient, stored)?;
                    noted = stored;
                }
            }
            if let Some(o) = outcome {
                break o;
            }
            if let Some(e) = lost {
                // The connection failed (a relay restart, a network cut):
                // reconnect (with backoff) and go on from the relay's
                // durable length, a few times, before leaving it to the
                // next pass.
                link.disconnect();
                reconnects += 1;
                if reconnects > MAX_UPLOAD_RECONNECTS {
                    break Upload::Retry(e);
                }
                match link.call(me, async |c| c.blob_status(blob_id).await).await {
                    Ok((s, c)) => {
                        if s > stored {
                            progress.advance(s - stored);
                        }
                        (stored, complete) = (s, c);
                        continue;
                    }
                    Err(e) => break Upload::Retry(e.to_string()),
                }
            }
            if stored <= before && !complete {
                stalls += 1;
                if stalls > 3 {
                    break Upload::Retry("the relay does not take the blob's pieces".into());
                }
            } else {
                stalls = 0;
            }
        };
        progress.finish();
        if matches!(result, Upload::Enough | Upload::Retry(_)) {
            // The rest of the upload (the next call, right after the
            // manifest went out, or a later attempt) goes on from here.
            if self.upload_hashes.len() >= KEPT_UPLOAD_HASHES {
                self.upload_hashes.remove(0);
            }
            self.upload_hashes.push((key, hashes));
        }
        let link_stored = if matches!(result, Upload::Complete) {
            total
        } else {
            stored
        };
        self.agent
            .db
            .set_uploaded(&row.msg, &row.recipient, link_stored)?;
        Ok(result)
    }

    /// Continues every unfinished download, and asks again for repairs
    /// that did not come.
    ///
    /// One download's failure on this machine (a name the file system
    /// refuses, a full disk) is that download's alone: it is logged and
    /// tried again after a wait that doubles each pass it fails (from 5 s
    /// up to an hour), and after [`MAX_LOCAL_ERRORS`] in a row it fails and
    /// its sender gets a signed rejection. The other downloads go on, and
    /// the pass always goes on to send its receipts.
    async fn run_downloads(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        let now = now_ms();
        for d in self.agent.db.downloads(Some("downloading"), 64)? {
            if d.local_errors > 0 && now < d.changed_ms + local_retry_ms(d.local_errors) {
                continue;
            }
            let (msg, name) = (d.msg, d.name.clone());
            let kept = d.clone();
            match self.download(d, stats).await {
                Ok(()) => {}
                Err(EngineError::Relay(e)) => {
                    tracing::warn!("receiving {name}: {e}; going on next pass");
                    self.home.disconnect();
                }
                Err(e) => {
                    self.progress.finish();
                    stats.download_errors += 1;
                    let why = e.to_string();
                    let n = self.agent.db.download_local_error(&msg, &why, now_ms())?;
                    if n >= MAX_LOCAL_ERRORS {
                        tracing::error!("receiving {name}: {why}; failed {n} times in a row, giving up and telling the sender");
                        self.give_up_download(&kept, &why, stats)?;
                    } else {
                        tracing::warn!(
                            "receiving {name}: {why}; trying again in {} s",
                            local_retry_ms(n) / 1000
                        );
                    }
                }
            }
        }
        let now = now_ms();
        for d in self.agent.db.downloads(Some("repairing"), 64)? {
            if now.saturating_sub(d.changed_ms) >= REPAIR_RETRY_MS {
                let bad = d.bad.clone();
                self.request_repair(&d, &bad).await?;
            }
        }
        Ok(())
    }

    /// Ends a download that cannot be stored here: failed, and its sender
    /// is sent a signed rejection `not-stored` (instead of retransmitting
    /// until the message expires).
    fn give_up_download(
        &mut self,
        d: &crate::outbox::Download,
        why: &str,
        stats: &mut PassStats,
    ) -> Result<(), EngineError> {
        stats.files_failed += 1;
        let rejection = d
            .relay
            .clone()
            .map(|r| d.rejection(r, RejectReason::NotStored));
        self.agent.db.download_end(
            &d.msg,
            "failed",
            None,
            Some(why),
            rejection.as_ref(),
            now_ms(),
        )?;
        Ok(())
    }

    /// Seals `content` as a message of `kind` to `to` and submits it to
    /// `relay`. For messages that are not tracked as deliveries (reports,
    /// repairs): a lost one is asked for, or answered, again.
    async fn send_control(
        &mut self,
        to: &PublicIdentity,
        relay: &str,
        kind: Kind,
        content: &[u8],
    ) -> Result<Control, EngineError> {
        let now_s = now_ms() / 1000;
        let pin = pin_of(&self.home_addr);
        let recipients = [*to];
        let req = SealRequest {
            kind,
            id: MessageId::random(&mut OsRng),
            created_at: now_s,
            expires_at: now_s + REPORT_LIFETIME_SECS,
            in_reply_to: None,
            recipients: &recipients,
            reply_relay: Some(&pin),
        };
        let mut sealed = std::io::Cursor::new(Vec::new());
        message::seal_stream(&self.agent.identity, &req, content, &mut sealed).map_err(|e| {
            AgentError::Io {
                what: "sealing a control message",
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let payload = sealed.into_inner();
        let mailbox = MailboxId::of(to.signing_bytes());
        let expires = now_s + REPORT_LIFETIME_SECS;
        let Some(link) = link_for(&mut self.home, &mut self.links, &self.home_addr, relay) else {
            tracing::warn!(
                "cannot send a {} to {relay:?}: not a relay address",
                kind.name()
            );
            return Ok(Control::Refused);
        };
        let r = link
            .call(&self.agent.identity, async |c| {
                c.submit_many(vec![(mailbox, expires, payload.clone())])
                    .await
                    .pop()
                    .unwrap_or(Err(ClientError::Closed))
            })
            .await;
        match r {
            Ok(Submitted::Accepted { .. }) => Ok(Control::Accepted),
            Ok(Submitted::Refused(rf)) => {
                tracing::warn!(
                    "relay {relay} refused a {}: {}",
                    kind.name(),
                    rf.code.describe()
                );
                if rf.code.is_lasting() {
                    Ok(Control::Refused)
                } else {
                    Ok(Control::Failed)
                }
            }
            Err(e) => {
                tracing::warn!("sending a {} to {relay}: {e}; will retry", kind.name());
                if matches!(e, ClientError::ForgedRefusal) {
                    self.found.push((
                        "forged-refusal",
                        blake3::hash(&payload).to_hex().to_string(),
                    ));
                }
                link.disconnect();
                Ok(Control::Failed)
            }
        }
    }

    /// Asks the sender of a download for its damaged chunks.
    async fn request_repair(
        &mut self,
        d: &crate::outbox::Download,
        bad: &[u64],
    ) -> Result<(), EngineError> {
        let mut chunks: Vec<u64> = bad.to_vec();
        chunks.sort_unstable();
        chunks.dedup();
        chunks.truncate(sealpost_proto::repair::MAX_CHUNKS);
        let list: Vec<String> = chunks.iter().take(20).map(|b| b.to_string()).collect();
        let why = format!(
            "{} chunk(s) failed authentication at the relay (damaged there): {}; asked the sender for them again",
            bad.len(),
            list.join(", ")
        );
        tracing::warn!("receiving {}: {why}", d.name);
        self.agent
            .db
            .download_state(&d.msg, "repairing", Some(&why), now_ms())?;
        let (Ok(req), Ok(sender), Some(relay)) = (
            sealpost_proto::repair::RepairRequest::new(d.blob_id, chunks),
            PublicIdentity::from_bytes(&d.sender, &d.agreement),
            d.relay.clone(),
        ) else {
            return Ok(());
        };
        self.send_control(&sender, &relay, Kind::RepairRequest, &req.encode())
            .await?;
        Ok(())
    }

    /// A repair request (we sent the file) or offer (we receive it).
    fn apply_repair(&mut self, m: &OpenedMessage, content: &[u8]) -> Result<(), EngineError> {
        let signer = *m.header.sender.signing_bytes();
        match m.header.kind {
            Kind::RepairRequest => {
                let Ok(req) = sealpost_proto::repair::RepairRequest::decode(content) else {
                    tracing::warn!("discarded a malformed repair request");
                    return Ok(());
                };
                let Some((f, _)) = self.agent.db.file_out_by_blob(&req.blob_id, &signer)? else {
                    tracing::warn!(
                        "discarded a repair request for a file we did not send to its signer"
                    );
                    return Ok(());
                };
                let chunks = f.size.div_ceil(f.chunk_size.max(1) as u64).max(1);
                if req.chunks.iter().any(|&c| c >= chunks) {
                    tracing::warn!(
                        "discarded a repair request naming chunks the file does not have"
                    );
                    return Ok(());
                }
                tracing::info!(
                    "{} asks for {} chunk(s) of {} again",
                    self.agent.who(&m.header.sender),
                    req.chunks.len(),
                    f.path
                );
                self.agent.db.add_repair(&crate::outbox::RepairJob {
                    msg: f.msg,
                    recipient: signer,
                    request: content.to_vec(),
                })?;
            }
            Kind::Repair => {
                let Ok(offer) = sealpost_proto::repair::RepairOffer::decode(content) else {
                    tracing::warn!("discarded a malformed repair offer");
                    return Ok(());
                };
                let Some(d) = self.agent.db.download_by_blob(&offer.blob_id, &signer)? else {
                    tracing::warn!("discarded a repair offer for no download of ours");
                    return Ok(());
                };
                if d.state != "done" {
                    self.agent.db.set_repair_offer(&d.msg, content, now_ms())?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Uploads the chunks recipients asked for again, as repair blobs, and
    /// tells them where they are.
    async fn run_repairs(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        use sealpost_proto::blob::BlobLayout;
        for job in self.agent.db.repairs()? {
            let Ok(req) = sealpost_proto::repair::RepairRequest::decode(&job.request) else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let (Some(f), Some(contact)) = (
                self.agent.db.file_out(&job.msg)?,
                self.agent.db.contact_by_key(&job.recipient)?,
            ) else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let relay = self
                .agent
                .db
                .outbox(Some(&job.msg), 1)?
                .into_iter()
                .next()
                .and_then(|m| {
                    m.deliveries
                        .into_iter()
                        .find(|x| x.recipient == job.recipient)
                })
                .map(|x| x.relay);
            let (Some(relay), Ok(layout), Ok(src)) = (
                relay,
                BlobLayout::new(f.size, f.chunk_size),
                File::open(&f.path),
            ) else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let Ok((len, hash)) =
                crate::transfer::repair_summary(&src, &f.key.cipher(), &layout, &req.chunks)
            else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let repair_id = sealpost_proto::manifest::BlobId::random(&mut OsRng).0;
            let mailbox = MailboxId::of(&job.recipient);
            let expires = now_ms() / 1000 + REPORT_LIFETIME_SECS;
            let Some(link) = link_for(&mut self.home, &mut self.links, &self.home_addr, &relay)
            else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let mut off = 0u64;
            let mut ok = true;
            let cipher = f.key.cipher();
            while off < len {
                let piece = match crate::transfer::repair_range(
                    &src,
                    &cipher,
                    &layout,
                    &req.chunks,
                    off,
                    sealpost_proto::relay::MAX_BLOB_PIECE,
                ) {
                    Ok(p) if !p.is_empty() => p,
                    _ => {
                        ok = false;
                        break;
                    }
                };
                let n = piece.len() as u64;
                let at = off;
                let r = link
                    .call(&self.agent.identity, async |c| {
                        c.blob_put(BlobPiece {
                            blob_id: repair_id,
                            mailbox,
                            total_len: len,
                            // Stated by the last piece (§6.6).
                            blob_hash: if at + n == len {
                                *hash.as_bytes()
                            } else {
                                [0; 32]
                            },
                            expires_at: expires,
                            offset: at,
                            data: piece.clone(),
                        })
                        .await
                    })
                    .await;
                match r {
                    Ok(Ok((stored, _))) if stored == at + n => {
                        stats.upload_bytes += n;
                        off = stored;
                    }
                    other => {
                        if matches!(other, Err(ClientError::ForgedRefusal)) {
                            self.found
                                .push(("forged-refusal", format!("blob:{}", hex(&repair_id))));
                        }
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                tracing::warn!("uploading a repair of {}: failed; will retry", f.path);
                continue;
            }
            let offer = sealpost_proto::repair::RepairOffer {
                blob_id: f.blob_id,
                repair_blob_id: repair_id,
                repair_len: len,
                repair_hash: *hash.as_bytes(),
                chunks: req.chunks.clone(),
            };
            if self
                .send_control(contact.card.public(), &relay, Kind::Repair, &offer.encode())
                .await?
                == Control::Accepted
            {
                tracing::info!("re-sent {} chunk(s) of {}", req.chunks.len(), f.path);
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
            }
        }
        Ok(())
    }

    async fn download(
        &mut self,
        d: crate::outbox::Download,
        stats: &mut PassStats,
    ) -> Result<(), EngineError> {
        use crate::transfer;
        use sealpost_proto::blob::BlobLayout;
        // A file that cannot be stored here fails, and its sender is told
        // so with a signed rejection (instead of retrying until expiry).
        let fail =
            |this: &mut Self, stats: &mut PassStats, why: String| -> Result<(), EngineError> {
                tracing::warn!("receiving {}: {why}", d.name);
                this.give_up_download(&d, &why, stats)
            };
        let layout = match BlobLayout::new(d.size, d.chunk_size) {
            Ok(l) => l,
            Err(e) => return fail(self, stats, e.to_string()),
        };
        let dir = PathBuf::from(&d.dir);
        if let Err(e) = crate::fsutil::ensure_private_dir(&dir) {
            return fail(self, stats, format!("cannot create {}: {e}", dir.display()));
        }
        // Room for the rest of the file, and the reserve kept free: else
        // this download waits (a local error, retried with its backoff).
        let still = d
            .size
            .saturating_sub((d.next_chunk * d.chunk_size as u64).min(d.size));
        if still > 0 {
            if let Ok(st) = rustix::fs::statvfs(&dir) {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                if free < still.saturating_add(self.keep_free) {
                    return Err(AgentError::Io {
                        what: "finding room in",
                        path: dir.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::StorageFull,
                            format!(
                                "{free} bytes free; the file needs {still} more and {} are kept free (--keep-free)",
                                self.keep_free
                            ),
                        ),
                    }
                    .into());
                }
            }
        }
        let blob_hex: String = d.blob_id.iter().map(|b| format!("{b:02x}")).collect();
        let cipher = d.key.cipher();
        let part_path = transfer::part_path(&dir, &blob_hex);
        let keep = (d.next_chunk * d.chunk_size as u64).min(d.size);
        let new_part = std::fs::symlink_metadata(&part_path).is_err();
        let part = transfer::open_part(&part_path, keep).map_err(|source| AgentError::Io {
            what: "opening",
            path: part_path.clone(),
            source,
        })?;
        if new_part {
            // The partial file's name is durable before any progress in
            // it is committed (a crash could otherwise lose the name with
            // the chunks the database says are there; the read-back would
            // catch it, at the cost of a whole download again).
            crate::fsutil::sync_dir(&dir).map_err(|source| AgentError::Io {
                what: "syncing",
                path: dir.clone(),
                source,
            })?;
        }
        let io_err = |what: &'static str, source: std::io::Error| AgentError::Io {
            what,
            path: part_path.clone(),
            source,
        };
        let writer = transfer::PartWriter::new(
            part.try_clone().map_err(|e| io_err("opening", e))?,
            &part_path,
        );
        let count = layout.chunk_count();
        let mut i = d.next_chunk;
        let mut bad = d.bad.clone();
        let bars = self.progress.clone();
        let progress = crate::transfer::FileBytes::new(bars.clone(), layout);
        progress.start(
            &format!("download {}", d.name),
            layout.blob_len(),
            layout.offset(i.min(count)),
        );
        let mut since_commit = 0u64;
        let blob_id = d.blob_id;
        let expires_at = self.agent.db.inbox_entry(&d.msg)?.map(|e| e.expires_at);
        let mut idle_since: Option<std::time::Instant> = None;
        if i >= count && !bad.is_empty() {
            // Repair: only the damaged chunks, from the repair blob the
            // sender uploaded for them.
            let Some(offer) = self
                .agent
                .db
                .repair_offer(&d.msg)?
                .and_then(|o| sealpost_proto::repair::RepairOffer::decode(&o).ok())
                .filter(|o| o.blob_id == d.blob_id)
            else {
                progress.finish();
                return self.request_repair(&d, &bad).await;
            };
            let valid_len: Option<u64> = offer
                .chunks
                .iter()
                .map(|&c| (c < count).then(|| layout.sealed_len(c)))
                .sum();
            if valid_len != Some(offer.repair_len) {
                tracing::warn!(
                    "receiving {}: a repair offer that does not fit the file; asking again",
                    d.name
                );
                progress.finish();
                return self.request_repair(&d, &bad).await;
            }
            let mut ranges = Vec::with_capacity(offer.chunks.len());
            let mut pos = 0u64;
            for &c in &offer.chunks {
                ranges.push((pos, layout.sealed_len(c) as u32));
                pos += layout.sealed_len(c);
            }
            let repair_id = offer.repair_blob_id;
            let mut still: Vec<u64> = bad
                .iter()
                .copied()
                .filter(|b| !offer.chunks.contains(b))
                .collect();
            for (window, idx) in ranges.chunks(64).zip(offer.chunks.chunks(64)) {
                let answers = self
                    .home
                    .call(&self.agent.identity, async |c| {
                        Ok(c.blob_get_many(repair_id, window).await)
                    })
                    .await;
                match answers {
                    Ok(list) => {
                        for ((a, &j), &(at, _)) in list.into_iter().zip(idx).zip(window) {
                            match a {
                                Ok(mut data) if bad.contains(&j) => {
                                    stats.download_bytes += data.len() as u64;
                                    let damaged = transfer::write_chunks(
                                        &part, &cipher, &layout, j, &mut data,
                                    )
                                    .map_err(|e| io_err("writing", e))?;
                                    sealpost_proto::buffers::give(data);
                                    if !damaged.is_empty() {
                                        self.found.push((
                                            "damaged-chunk",
                                            format!("blob:{}@{at}", hex(&repair_id)),
                                        ));
                                    }
                                    still.extend(damaged);
                                }
                                Ok(_) => {}
                                Err(_) => still.push(j),
                            }
                        }
                    }
                    Err(_) => still.extend(idx.iter().filter(|j| bad.contains(j))),
                }
            }
            still.sort_unstable();
            still.dedup();
            tracing::info!(
                "receiving {}: {} of {} damaged chunks repaired",
                d.name,
                bad.len() - still.len(),
                bad.len()
            );
            let _ = self
                .home
                .call(&self.agent.identity, async |c| {
                    c.blob_delete(repair_id).await
                })
                .await;
            bad = still;
        }
        // Read back what is durable while the rest downloads (from the
        // start: a resumed download reads back what earlier passes wrote).
        // Not after a repair: repaired chunks rewrite bytes already read.
        let kept = self
            .read_backs
            .iter()
            .position(|(m, _)| *m == d.msg)
            .map(|k| self.read_backs.remove(k).1);
        let mut verifier = if d.bad.is_empty() {
            match kept {
                Some(v) if v.continues(&part, keep) => Some(v),
                _ => transfer::ReadBack::start(&part, &part_path).ok(),
            }
        } else {
            None
        };
        // How much of the blob the relay holds, while the sender is still
        // uploading: only whole stored ranges are asked for.
        let mut stored_known = 0u64;
        let mut complete_known = false;
        let mut this_pass = 0u64;
        // Up to PIECE_WINDOW ranges in flight (`next` is the chunk after
        // the last one asked for); each answer is handed to a thread that
        // decrypts and writes it (`i` is the chunk after the last one
        // handed over) while the next answers arrive.
        let mut sink = transfer::PieceSink::start(writer, d.key.cipher(), layout)
            .map_err(|e| io_err("starting a writer for", e))?;
        let mut in_flight = std::collections::VecDeque::with_capacity(PIECE_WINDOW);
        let mut next = i;
        let chunks_in = |from: u64, n: u64| {
            let (mut k, mut consumed) = (from, 0u64);
            while consumed < n && k < count {
                consumed += layout.sealed_len(k);
                k += 1;
            }
            k
        };
        // What the writing threads did, in order: damaged chunks found,
        // and checkpoints reached (the file fsync'd up to a chunk), whose
        // progress is committed then: everything before the checkpoint is
        // durable, and every damaged chunk before it is known.
        let record = |this: &mut Self,
                      bad: &mut Vec<u64>,
                      verifier: &mut Option<transfer::ReadBack>,
                      events: Vec<transfer::SinkEvent>|
         -> Result<(), EngineError> {
            for event in events {
                match event {
                    transfer::SinkEvent::Written(off, damaged) => {
                        if !damaged.is_empty() {
                            this.found
                                .push(("damaged-chunk", format!("blob:{}@{off}", hex(&blob_id))));
                        }
                        bad.extend(damaged);
                    }
                    transfer::SinkEvent::Durable(upto) => {
                        this.agent
                            .db
                            .download_progress(&d.msg, upto, bad, now_ms())?;
                        if let Some(v) = verifier.as_mut() {
                            v.durable((upto * d.chunk_size as u64).min(d.size));
                        }
                    }
                }
            }
            Ok(())
        };
        'pieces: while i < count {
            if !complete_known
                && next < count
                && stored_known
                    < layout.offset(next) + transfer::piece_len(&layout, layout.offset(next)) as u64
            {
                match self
                    .home
                    .call(&self.agent.identity, async |c| c.blob_status(blob_id).await)
                    .await
                {
                    Ok((stored, complete)) => {
                        stored_known = stored;
                        complete_known = complete;
                    }
                    Err(e) => {
                        tracing::warn!("downloading {}: {e}; continuing next pass", d.name);
                        self.home.disconnect();
                        break;
                    }
                }
            }
            let client = match self.home.client(&self.agent.identity).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("downloading {}: {e}; continuing next pass", d.name);
                    self.home.disconnect();
                    break;
                }
            };
            while in_flight.len() < PIECE_WINDOW && next < count {
                let off = layout.offset(next);
                let n = transfer::piece_len(&layout, off);
                if !complete_known && off + n as u64 > stored_known {
                    break;
                }
                let p = client.blob_get_send(blob_id, off, n as u32).await;
                in_flight.push_back((off, n, p));
                next = chunks_in(next, n as u64);
            }
            let mut short = false;
            match in_flight.pop_front() {
                // Nothing stored to ask for yet.
                None => short = true,
                Some((off, n, p)) => match client.blob_get_answer(p).await {
                    Ok(data) if data.len() == n => {
                        idle_since = None;
                        sink.put(off, i, data).map_err(|e| io_err("writing", e))?;
                        i = chunks_in(i, n as u64);
                        progress.advance(n as u64);
                        stats.download_bytes += n as u64;
                        since_commit += n as u64;
                        this_pass += n as u64;
                    }
                    // Short although the relay said the range is stored.
                    Ok(v) if complete_known || off + n as u64 <= stored_known => {
                        self.found
                            .push(("short-blob-data", format!("blob:{}@{off}", hex(&blob_id))));
                        tracing::warn!(
                            "receiving {}: the relay sent {} of {n} bytes at {off} of a whole blob",
                            d.name,
                            v.len()
                        );
                        short = true;
                    }
                    // Not there yet: the sender streams the blob while we
                    // read it (or has not started to upload it again).
                    Ok(_)
                    | Err(ClientError::Server {
                        code: sealpost_proto::relay::ErrorCode::NotFound,
                        ..
                    }) => short = true,
                    Err(e) => {
                        tracing::warn!("downloading {}: {e}; continuing next pass", d.name);
                        self.home.disconnect();
                        break 'pieces;
                    }
                },
            }
            if short {
                // Ask again from the first piece not received.
                in_flight.clear();
                next = i;
            }
            let events = sink.events().map_err(|e| io_err("writing", e))?;
            record(self, &mut bad, &mut verifier, events)?;
            if self.download_slice.is_some_and(|max| this_pass >= max) && i < count {
                // Enough for this pass: other mail goes first, the next
                // pass (right away) continues from here.
                break 'pieces;
            }
            if short {
                if expires_at.is_some_and(|e| now_ms() / 1000 >= e) {
                    progress.finish();
                    return fail(self, stats,
                        "its data did not arrive at the relay before the message expired; ask the sender to send it again".into(),
                    );
                }
                let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                // Waiting is for a blob that is streaming in; one of which
                // nothing came in this pass is left to a later pass at once
                // (a sender that never uploads must not cost every pass
                // the wait).
                if this_pass == 0 || since.elapsed() > STREAM_WAIT {
                    if this_pass > 0 {
                        tracing::info!(
                            "receiving {}: waiting for the sender to upload the rest ({} of {count} chunks here)",
                            d.name,
                            i
                        );
                    } else {
                        tracing::debug!("receiving {}: nothing new at the relay yet", d.name);
                    }
                    break 'pieces;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if since_commit >= DOWNLOAD_COMMIT_BYTES {
                // Made durable and committed by `record` once the writing
                // thread got there; meanwhile the next pieces arrive.
                sink.checkpoint(i).map_err(|e| io_err("writing", e))?;
                since_commit = 0;
            }
        }
        let events = sink.drain().map_err(|e| io_err("writing", e))?;
        record(self, &mut bad, &mut verifier, events)?;
        drop(sink);
        progress.finish();
        part.sync_data().map_err(|e| io_err("syncing", e))?;
        self.agent.db.download_progress(&d.msg, i, &bad, now_ms())?;
        if i < count {
            if let Some(v) = verifier.filter(|_| bad.is_empty()) {
                if self.read_backs.len() >= KEPT_READ_BACKS {
                    self.read_backs.remove(0);
                }
                self.read_backs.push((d.msg, v));
            }
            return Ok(());
        }
        if !bad.is_empty() {
            // Damaged at the relay: ask the sender for exactly those
            // chunks (the good ones are on our disk).
            return self.request_repair(&d, &bad).await;
        }
        let what = format!("verify {}", d.name);
        let h = match verifier {
            // Read back while downloading: only the last range is left.
            Some(v) => v.finish(&what, d.size, bars.as_ref()),
            None => {
                bars.start(&what, d.size, 0);
                transfer::read_back(&part, &part_path, d.size, bars.as_ref())
            }
        }
        .map_err(|e| io_err("reading back", e))?;
        bars.finish();
        if h.as_bytes() != &d.plaintext_hash {
            if d.attempts >= 2 {
                return fail(
                    self,
                    stats,
                    "the stored copy does not read back as written, three times; check the disk"
                        .into(),
                );
            }
            tracing::error!(
                "receiving {}: the stored copy does not read back as written; downloading it again",
                d.name
            );
            self.agent.db.download_end(
                &d.msg,
                "restart",
                None,
                Some("read-back mismatch"),
                None,
                now_ms(),
            )?;
            return Ok(());
        }
        // A file from a directory keeps its place in the tree, created
        // inside the download directory; no existing component may be a
        // symbolic link (which could lead outside it).
        let (target_dir, leaf) = match d.name.rsplit_once('/') {
            Some((parent, leaf)) => {
                if sealpost_proto::manifest::validate_file_path(&d.name).is_err() {
                    return fail(self, stats, "its path is not a safe relative path".into());
                }
                let mut at = dir.clone();
                for part in parent.split('/') {
                    at.push(part);
                    match std::fs::symlink_metadata(&at) {
                        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => {
                            return fail(
                                self,
                                stats,
                                format!("{} exists and is not a plain directory", at.display()),
                            );
                        }
                        Ok(_) => {}
                        Err(_) => {
                            std::fs::create_dir(&at).map_err(|source| AgentError::Io {
                                what: "creating",
                                path: at.clone(),
                                source,
                            })?;
                            if let Some(p) = at.parent() {
                                crate::fsutil::sync_dir(p).map_err(|e| io_err("syncing", e))?;
                            }
                        }
                    }
                }
                (at, leaf.to_owned())
            }
            None => (dir.clone(), d.name.clone()),
        };
        let final_path = match transfer::place(&part_path, &target_dir, &leaf) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return fail(
                    self,
                    stats,
                    format!(
                        "no free name for {} in {} ({} tried)",
                        leaf,
                        target_dir.display(),
                        transfer::MAX_NAME_TRIES
                    ),
                );
            }
            Err(e) => return Err(io_err("linking", e).into()),
        };
        std::fs::remove_file(&part_path).map_err(|e| io_err("removing", e))?;
        crate::fsutil::sync_dir(&target_dir).map_err(|e| io_err("syncing", e))?;
        crate::fsutil::sync_dir(&dir).map_err(|e| io_err("syncing", e))?;
        let receipt = d
            .relay
            .clone()
            .map(|relay| d.receipt(relay, now_ms() / 1000));
        self.agent.db.download_end(
            &d.msg,
            "done",
            Some(&final_path.to_string_lossy()),
            None,
            receipt.as_ref(),
            now_ms(),
        )?;
        stats.files_received += 1;
        let from = match self.agent.db.contact_by_key(&d.sender) {
            Ok(Some(c)) => c.name,
            _ => "a stranger".to_owned(),
        };
        tracing::info!(
            "file {} from {from} ({}), verified from disk: {}",
            d.name,
            bytesize::ByteSize(d.size).display().iec(),
            final_path.display()
        );
        // The relay may forget the blob once the receipt is out.
        self.blob_deletes.push(blob_id);
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
            .map(|t| Duration::from_millis(t.saturating_sub(now_ms()))))
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn open_all(
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

/// How long a message lives unless the sender says otherwise.
pub const DEFAULT_SEND_LIFETIME_SECS: u64 = DEFAULT_LIFETIME_SECS;

/// Longest idle wait of the agent loop when subscribed.
const IDLE: Duration = Duration::from_secs(30);
/// Wait between passes while the home relay cannot be reached.
const RETRY: Duration = Duration::from_secs(1);

/// The largest file accepted by default (`--max-file`): 16 GiB.
pub const DEFAULT_MAX_FILE: u64 = 16 << 30;
/// Free space kept by default on the download directory's file system
/// (`--keep-free`): 1 GiB.
pub const DEFAULT_KEEP_FREE: u64 = 1 << 30;

/// How long to wait before trying a home relay again after `failures`
/// failures in a row: 1 s, then 2 s. A try costs one connection attempt,
/// and the relay's return is noticed within 2 s (what waits for it then
/// goes at once); it is the log that backs off (see `run`).
fn home_retry(failures: u32) -> Duration {
    if failures <= 1 {
        RETRY
    } else {
        RETRY * 2
    }
}

async fn next_push(sub: &mut Option<UnboundedReceiver<u64>>) -> Option<u64> {
    match sub {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What a client writes on the wake-up socket: one byte.
/// [`WAKE`]: the outbox changed, run a pass; the connection ends there.
pub const WAKE: u8 = 1;
/// [`WATCH`]: run a pass, and keep this connection: after every pass the
/// agent writes a byte on it, so that a command waiting for a state (as
/// `send --wait` does) re-reads the database when something may have
/// changed, instead of polling it.
pub const WATCH: u8 = 2;
/// Watching connections an agent keeps; the oldest is closed for a new one
/// (its command falls back to polling).
const MAX_WATCHERS: usize = 64;

/// Waits for a client on the wake-up socket; a watching one is returned.
async fn next_wake(wake: Option<&UnixListener>) -> Option<tokio::net::UnixStream> {
    match wake {
        Some(l) => {
            let (mut s, _) = l.accept().await.ok()?;
            // Reading the byte lets the client see its wake-up was taken.
            let mut b = [0u8; 1];
            let read = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::AsyncReadExt::read(&mut s, &mut b),
            )
            .await;
            matches!(read, Ok(Ok(1)) if b[0] == WATCH).then_some(s)
        }
        None => std::future::pending().await,
    }
}

impl Engine {
    /// Runs passes until `stop` completes or `done` says so: after each
    /// pass it waits for a push from the home relay, a wake-up on `wake`
    /// (`sealpost send` queued something), or the next retransmission or
    /// expiry, whichever comes first. Returns the summed statistics.
    pub async fn run<F>(
        &mut self,
        wake: Option<&UnixListener>,
        stop: impl std::future::Future<Output = ()>,
        mut done: F,
    ) -> Result<PassStats, EngineError>
    where
        F: FnMut(&Self) -> Result<bool, EngineError>,
    {
        let mut total = PassStats::default();
        let mut sub: Option<UnboundedReceiver<u64>> = None;
        let mut home_was_down = false;
        // Failures to reach the home relay in a row: the log says so at
        // the 1st, 2nd, 4th, 8th … failure only (it said two warnings a
        // second while a relay was down); tries are 1 then 2 s apart.
        let mut home_failures: u32 = 0;
        let mut home_down_since = std::time::Instant::now();
        tokio::pin!(stop);
        loop {
            // Subscribed before the pass, never after: whatever arrives
            // once the subscription stands is pushed, and whatever came
            // before it is fetched by the pass. (Subscribing after the
            // pass missed a receipt arriving in between until the idle
            // timer, 30 s.)
            if sub.is_none() {
                match self.subscribe().await {
                    Ok(rx) => {
                        sub = Some(rx);
                        if home_was_down {
                            // The home relay is back: what waits for it
                            // goes now, not after its backoff.
                            home_was_down = false;
                            let n = self
                                .agent
                                .db
                                .relay_reachable(&self.home_addr.to_string(), now_ms())?;
                            if n > 0 {
                                tracing::info!(
                                    "{} is back: {n} messages waiting for it go now",
                                    self.home_addr
                                );
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!("subscribing at {}: {e}", self.home_addr);
                        self.home.disconnect();
                        home_was_down = true;
                    }
                }
            }
            let s = match self.pass().await {
                Ok(s) => s,
                Err(e) => {
                    // A daemon keeps going: the database may be busy or the
                    // disk full for a while. Nothing was acknowledged that
                    // is not durable, so the next pass redoes the work.
                    tracing::error!("delivery pass failed: {e}; retrying in {RETRY:?}");
                    tokio::select! {
                        () = &mut stop => return Ok(total),
                        () = tokio::time::sleep(RETRY) => {}
                    }
                    continue;
                }
            };
            if !s.is_idle() {
                tracing::debug!("pass: {s:?}");
            }
            let home_down = sub.is_none() || s.home_errors > 0;
            if home_down {
                if home_failures == 0 {
                    home_down_since = std::time::Instant::now();
                }
                home_failures = home_failures.saturating_add(1);
                if home_failures.is_power_of_two() {
                    tracing::warn!(
                        "cannot reach the home relay {} ({}); {} in a row over {}, trying again in {}",
                        self.home_addr,
                        s.home_error.as_deref().unwrap_or("cannot subscribe"),
                        home_failures,
                        humantime::format_duration(Duration::from_secs(home_down_since.elapsed().as_secs())),
                        humantime::format_duration(home_retry(home_failures)),
                    );
                }
            } else if home_failures > 0 {
                tracing::info!(
                    "the home relay {} is reachable again (after {} failed tries)",
                    self.home_addr,
                    home_failures
                );
                home_failures = 0;
            }
            total.add(&s);
            self.tell_watchers();
            if done(self)? {
                return Ok(total);
            }
            let cap = if home_down {
                home_retry(home_failures)
            } else {
                IDLE
            };
            let mut wait = self.next_due_in()?.unwrap_or(cap).min(cap);
            if s.download_bytes > 0 && !self.agent.db.downloads(Some("downloading"), 1)?.is_empty()
            {
                // A download was cut into slices: continue at once.
                wait = Duration::ZERO;
            }
            tokio::select! {
                () = &mut stop => return Ok(total),
                pushed = next_push(&mut sub) => {
                    match pushed {
                        None => sub = None,
                        Some(_) => {
                            if let Some(rx) = sub.as_mut() {
                                while rx.try_recv().is_ok() {}
                            }
                        }
                    }
                }
                watcher = next_wake(wake) => {
                    if let Some(w) = watcher {
                        if self.watchers.len() >= MAX_WATCHERS {
                            self.watchers.remove(0);
                        }
                        self.watchers.push(w);
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Tells every watching command that a pass ended (a byte each; one
    /// that went away, or stopped reading, is dropped).
    fn tell_watchers(&mut self) {
        self.watchers.retain(|w| match w.try_write(&[1]) {
            Ok(_) => true,
            // Its buffer is full of earlier news: it has something to read.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(_) => false,
        });
    }

    /// Submits what is due, without fetching (what `send` does when no
    /// agent is running).
    pub async fn submit_only(&mut self) -> Result<PassStats, EngineError> {
        let mut stats = PassStats::default();
        self.submit_due(&mut stats).await?;
        Ok(stats)
    }
}

/// The path of the agent's wake-up socket in a home.
pub fn wake_socket(home: &std::path::Path) -> PathBuf {
    home.join("agent.sock")
}

/// Tells a running agent that the outbox changed. Returns false if no
/// agent is listening.
pub fn wake_agent(home: &std::path::Path) -> bool {
    use std::io::Write;
    match std::os::unix::net::UnixStream::connect(wake_socket(home)) {
        Ok(mut s) => s.write_all(&[WAKE]).is_ok(),
        Err(_) => false,
    }
}

/// Asks a running agent to run a pass and to tell this connection after
/// every pass ([`WATCH`]); `None` if no agent is listening. Read a byte
/// (with a timeout) to wait for the next pass; end of stream means the
/// agent stopped.
pub fn watch_agent(home: &std::path::Path) -> Option<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(wake_socket(home)).ok()?;
    s.write_all(&[WATCH]).ok()?;
    Some(s)
}

/// Binds the wake-up socket (an old one left by a killed agent is
/// replaced: the caller holds the sync lock, so no live agent owns it).
pub fn bind_wake_socket(home: &std::path::Path) -> std::io::Result<UnixListener> {
    let path = wake_socket(home);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(&path)
}

/// A regular file found under a directory being sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    pub path: std::path::PathBuf,
    /// Its path relative to the directory's parent (`dir/sub/file`): the
    /// name the recipient stores it under.
    pub name: String,
    /// Its size when listed.
    pub size: u64,
}

/// Lists every regular file under `dir` (symbolic links and special files
/// are skipped), in name order, named by its path relative to `dir`'s
/// parent. At most 10,000 files, 32 levels deep.
pub fn list_tree(dir: &std::path::Path) -> Result<Vec<TreeFile>, SendError> {
    let top = dir
        .canonicalize()
        .map_err(|e| SendError::BadFile(format!("{}: {e}", dir.display())))?;
    let base = top
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| SendError::BadFile(format!("{} has no usable name", dir.display())))?
        .to_owned();
    let mut files = Vec::new();
    let mut stack = vec![(top.clone(), base, 1usize)];
    while let Some((d, rel, depth)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(|e| SendError::BadFile(format!("{}: {e}", d.display())))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                return Err(SendError::BadFile(format!(
                    "{}: a name that is not UTF-8",
                    e.path().display()
                )));
            };
            let ft = e
                .file_type()
                .map_err(|err| SendError::BadFile(format!("{}: {err}", e.path().display())))?;
            let child = format!("{rel}/{name}");
            if ft.is_dir() {
                if depth + 1 >= sealpost_proto::manifest::MAX_PATH_DEPTH {
                    return Err(SendError::BadFile(format!(
                        "{} is nested too deep (32 levels at most)",
                        e.path().display()
                    )));
                }
                stack.push((e.path(), child, depth + 1));
            } else if ft.is_file() {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                files.push(TreeFile {
                    path: e.path(),
                    name: child,
                    size,
                });
                if files.len() > 10_000 {
                    return Err(SendError::BadFile(format!(
                        "{} holds more than 10,000 files",
                        dir.display()
                    )));
                }
            }
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// What the user reads about a relay's refusal; for a blob or message that
/// is too large, its size and the limit the relay states (asked after the
/// refusal), so the words say what would have fitted.
pub fn refusal_words(code: RefusalCode, size: u64, limit: Option<u64>) -> String {
    if code != RefusalCode::TooLarge {
        return code.describe().to_owned();
    }
    let size_text = bytesize::ByteSize(size).display().iec();
    match limit {
        Some(max) => format!(
            "{} ({size_text}, {size} bytes sealed; it accepts at most {}, {max} bytes)",
            code.describe(),
            bytesize::ByteSize(max).display().iec()
        ),
        None => format!("{} ({size_text}, {size} bytes sealed)", code.describe()),
    }
}
