//! sealpost's agent: the home directory that holds an identity's secret
//! keys, its card, its pinned contacts and its replay cache, and the checks
//! a received message must pass before it is handed to the user.
//!
//! Layout of a home directory (mode 0700):
//!
//! ```text
//! identity.key   secret keys, mode 0600, never overwritten
//! card           this identity's contact card (text form)
//! agent.db       SQLite (WAL, synchronous=FULL): contacts, replay cache
//! ```
#![forbid(unsafe_code)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "sealpost supports Linux only: its durability relies on Linux file APIs (fsync of directories, O_DIRECT, O_NOFOLLOW, file modes), and it is tested nowhere else"
);

pub mod contacts;
pub mod engine;
pub mod fsutil;
pub mod link;
pub mod outbox;
pub mod spool;
pub mod transfer;
pub mod views;

use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rand_core::CryptoRngCore;
use sealpost_proto::blob::{self, BlobKey};
use sealpost_proto::codec::DecodeError;
use sealpost_proto::manifest::{BlobId, FileManifest};
use sealpost_proto::message::{self, OpenLimits};
use sealpost_proto::{
    CardError, CardFields, ContactCard, Fingerprint, FreshnessPolicy, Identity, Kind, MessageId,
    OpenError, OpenedMessage, PublicIdentity, SealRequest, SealSummary,
};

pub use contacts::{AddOutcome, Contact, Db};

/// Everything that can go wrong in the agent outside of opening a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("no identity in {0}; create one with `sealpost init`")]
    NoIdentity(PathBuf),
    #[error("an identity already exists in {0}; it is never overwritten (use another --home)")]
    IdentityExists(PathBuf),
    #[error("the secret key file {path} can be read by others (mode {mode:o}); run `chmod 600 {path}` and check who may have copied it")]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    #[error("the secret key file {path} is damaged: {source}")]
    BadKeyFile {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
    #[error("{0}")]
    Card(#[from] CardError),
    #[error("invalid value: {0}")]
    Invalid(#[from] DecodeError),
    #[error(
        "{0} exists; it was not replaced (choose another name, or pass --force to replace it)"
    )]
    OutputExists(PathBuf),
    #[error("no contact named {0:?}{1}; `sealpost contact list` shows your contacts")]
    UnknownContact(String, String),
    #[error("{name:?} is pinned with fingerprint {pinned}, but this card has fingerprint {offered}. The key changed, or someone is impersonating {name:?}. Compare the new fingerprint with {name} through another channel, then run `sealpost contact add --replace`.")]
    KeyChanged {
        name: String,
        pinned: Fingerprint,
        offered: Fingerprint,
    },
    #[error("this key (fingerprint {fingerprint}) is already pinned as {existing:?}; remove that contact first to rename it")]
    KeyPinnedUnderOtherName {
        existing: String,
        fingerprint: Fingerprint,
    },
    #[error("agent database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AgentError + 'a {
    move |source| AgentError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A home directory, before its identity is loaded.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("identity.key")
    }

    pub fn card_path(&self) -> PathBuf {
        self.dir.join("card")
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("agent.db")
    }

    /// Creates a new identity here. Refuses if one exists.
    pub fn init(
        &self,
        name: &str,
        rng: &mut impl CryptoRngCore,
        now: u64,
    ) -> Result<Agent, AgentError> {
        fsutil::ensure_private_dir(&self.dir).map_err(io_err("creating", &self.dir))?;
        // A home that existed already (made by hand, or by `mkdir`) holds
        // keys and mail: nobody else may list or enter it.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting permissions on", &self.dir))?;
        let key_path = self.key_path();
        if key_path.exists() {
            return Err(AgentError::IdentityExists(self.dir.clone()));
        }
        let identity = Identity::generate(rng);
        let card = ContactCard::create(
            &identity,
            CardFields {
                name: name.to_owned(),
                created_at: now,
                relay: None,
            },
        )?;
        // The card first: if we crash before the key is written, `init`
        // simply runs again; a key without its card would be stuck.
        fsutil::replace_durable(&self.card_path(), (card.to_text() + "\n").as_bytes(), 0o644)
            .map_err(io_err("writing", &self.card_path()))?;
        match fsutil::create_new_durable(&key_path, identity.to_secret_file().as_bytes(), 0o600) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(AgentError::IdentityExists(self.dir.clone()))
            }
            Err(e) => return Err(io_err("writing", &key_path)(e)),
        }
        self.load()
    }

    /// Loads the identity, refusing a key file that others can read.
    pub fn load(&self) -> Result<Agent, AgentError> {
        let key_path = self.key_path();
        let meta = match fs::metadata(&key_path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(AgentError::NoIdentity(self.dir.clone()))
            }
            Err(e) => return Err(io_err("reading", &key_path)(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AgentError::InsecureKeyFile {
                path: key_path,
                mode,
            });
        }
        let mut text = zeroize::Zeroizing::new(Vec::new());
        fs::File::open(&key_path)
            .and_then(|f| {
                f.take(sealpost_proto::identity::MAX_SECRET_FILE_BYTES as u64 + 1)
                    .read_to_end(&mut text)
            })
            .map_err(io_err("reading", &key_path))?;
        let identity =
            Identity::from_secret_file(&text).map_err(|source| AgentError::BadKeyFile {
                path: key_path.clone(),
                source,
            })?;
        let card_path = self.card_path();
        let card_text = fs::read_to_string(&card_path).map_err(io_err("reading", &card_path))?;
        let card = ContactCard::from_text(&card_text)?;
        if card.public() != identity.public() {
            return Err(AgentError::BadKeyFile {
                path: card_path,
                source: DecodeError::Invalid {
                    what: "card",
                    why: "does not belong to the secret key in identity.key",
                },
            });
        }
        let db = Db::open(&self.db_path())?;
        Ok(Agent {
            home: self.clone(),
            identity,
            card,
            db,
            policy: FreshnessPolicy::default(),
            pad: true,
            pad_files: false,
        })
    }
}

/// A loaded identity with its contacts and replay cache.
#[derive(Debug)]
pub struct Agent {
    home: Home,
    identity: Identity,
    card: ContactCard,
    db: Db,
    policy: FreshnessPolicy,
    /// Messages sent are padded to a Padmé length (PROTOCOL.md §4.3);
    /// true unless turned off.
    pad: bool,
    /// Files sent are padded to a Padmé length (PROTOCOL.md §5.2): off
    /// unless asked for (`send --pad`), since at gigabytes its up to 12 %
    /// more to upload and download is the user's choice.
    pad_files: bool,
}

/// Why a received message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("{0}")]
    Agent(#[from] AgentError),
}

/// A message that passed every check, its content in a durable temporary
/// file next to where it will be delivered.
#[derive(Debug)]
pub struct Received {
    pub opened: OpenedMessage,
    pub sender: Contact,
    pub content: tempfile::NamedTempFile,
    /// Freshness findings that were reported instead of refused
    /// ([`Freshness::Report`]); all false under [`Freshness::Enforce`].
    pub notes: FreshnessNotes,
}

/// How [`Agent::receive_with`] treats expiry, clock skew and replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Refuse an expired, never-expiring, future-dated or replayed message:
    /// what delivery through relays needs (and `open --strict`).
    Enforce,
    /// Open it, and say what was found: a file sealed and opened by hand
    /// (an archive, an attachment) may be opened again and after its
    /// expiry, like `gpg --decrypt`.
    Report,
}

/// What [`Freshness::Report`] found instead of refusing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreshnessNotes {
    /// Its expiry time has passed.
    pub expired: bool,
    /// Its creation time is ahead of this clock beyond the allowed skew.
    pub from_future: bool,
    /// It was opened (or delivered) here before.
    pub opened_before: bool,
}

/// How long a message lives by default: a week, like a mail queue's bounce
/// time.
pub const DEFAULT_LIFETIME_SECS: u64 = 7 * 24 * 3600;

impl Agent {
    pub fn home(&self) -> &Home {
        &self.home
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn card(&self) -> &ContactCard {
        &self.card
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn db_mut(&mut self) -> &mut Db {
        &mut self.db
    }

    pub fn policy(&self) -> &FreshnessPolicy {
        &self.policy
    }

    /// Makes `pin` this identity's home relay: stored in the settings and
    /// signed into a new card (newer than the old one, so contacts who
    /// import it replace the old one). The caller registers the mailbox
    /// there first.
    pub fn set_home_relay(
        &mut self,
        addr_text: &str,
        pin: sealpost_proto::RelayPin,
        now: u64,
    ) -> Result<(), AgentError> {
        let created_at = now.max(self.card.fields().created_at.saturating_add(1));
        let card = ContactCard::create(
            &self.identity,
            CardFields {
                name: self.card.name().to_owned(),
                created_at,
                relay: Some(pin),
            },
        )?;
        self.db.set_setting(engine::HOME_RELAY, addr_text)?;
        let path = self.home.card_path();
        fsutil::replace_durable(&path, (card.to_text() + "\n").as_bytes(), 0o644)
            .map_err(io_err("writing", &path))?;
        self.card = card;
        Ok(())
    }

    /// Who a key is, for logs and messages: the contact's name, or
    /// "a stranger (FINGERPRINT)" for a key that is not pinned.
    pub fn who(&self, key: &PublicIdentity) -> String {
        match self.db.contact_by_key(key.signing_bytes()) {
            Ok(Some(c)) if c.card.public() == key => c.name,
            _ => format!("a stranger ({})", key.fingerprint()),
        }
    }

    /// Looks up the recipients' pinned keys by contact name.
    pub fn recipients(&self, names: &[String]) -> Result<Vec<PublicIdentity>, AgentError> {
        names
            .iter()
            .map(|n| self.db.contact(n).map(|c| *c.card.public()))
            .collect()
    }

    /// Whether messages sealed from now on are padded (PROTOCOL.md §4.3):
    /// on by default; off, a relay learns each message's length to within
    /// a few bytes.
    pub fn set_padding(&mut self, pad: bool) {
        self.pad = pad;
    }

    /// Whether files queued from now on are padded (PROTOCOL.md §5.2):
    /// off by default; on, a relay learns only a Padmé bucket of each
    /// file's size, for up to 12 % more bytes to move and store.
    pub fn set_file_padding(&mut self, pad: bool) {
        self.pad_files = pad;
    }

    /// Whether files queued now are padded.
    pub fn file_padding(&self) -> bool {
        self.pad_files
    }

    /// Seals `content` to `recipients` into `out`; padded when its length
    /// is known in advance (`content_len`) and padding is on.
    #[allow(clippy::too_many_arguments)]
    pub fn seal<R: Read, W: Write + Seek>(
        &self,
        recipients: &[PublicIdentity],
        kind: Kind,
        lifetime_secs: u64,
        now: u64,
        rng: &mut impl CryptoRngCore,
        content: R,
        content_len: Option<u64>,
        out: W,
    ) -> Result<SealSummary, sealpost_proto::SealError> {
        let req = SealRequest {
            kind,
            id: MessageId::random(rng),
            created_at: now,
            expires_at: now.saturating_add(lifetime_secs),
            in_reply_to: None,
            reply_relay: None,
            recipients,
            pad_for_len: content_len.filter(|_| self.pad),
        };
        message::seal_stream(&self.identity, &req, content, out)
    }

    /// Opens a sealed message into a temporary file in `spool_dir` and runs
    /// every check: decryption, format, signature, recipient binding, known
    /// sender, freshness and replay. The content is fsync'd before this
    /// returns. Call [`Agent::mark_delivered`] once the user has it.
    pub fn receive<R: Read>(
        &self,
        input: R,
        spool_dir: &Path,
        now: u64,
    ) -> Result<Received, ReceiveError> {
        self.receive_with(input, spool_dir, now, Freshness::Enforce)
    }

    /// [`Agent::receive`], with freshness and replays enforced or only
    /// reported. Every other check (decryption, format, signature,
    /// recipient binding, known sender) is always enforced.
    pub fn receive_with<R: Read>(
        &self,
        input: R,
        spool_dir: &Path,
        now: u64,
        freshness: Freshness,
    ) -> Result<Received, ReceiveError> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".sealpost-open-")
            .tempfile_in(spool_dir)
            .map_err(io_err("creating a temporary file in", spool_dir))?;
        let opened = {
            let mut w = io::BufWriter::with_capacity(256 * 1024, tmp.as_file_mut());
            let opened =
                message::open_stream(&self.identity, input, &mut w, OpenLimits::default())?;
            w.flush().map_err(io_err("writing", spool_dir))?;
            opened
        };
        let sender = self
            .db
            .contact_by_key(opened.header.sender.signing_bytes())?
            .filter(|c| c.card.public() == &opened.header.sender)
            .ok_or(OpenError::UnknownSender {
                fingerprint: opened.header.sender.fingerprint(),
            })?;
        let mut notes = FreshnessNotes::default();
        let fresh = self.policy.check(&opened.header, now);
        let seen = self
            .db
            .replay_seen(&outbox::ReceivedId::of(&opened.header))?;
        match freshness {
            Freshness::Enforce => {
                fresh?;
                if seen {
                    return Err(OpenError::Replayed {
                        id: opened.header.id,
                    }
                    .into());
                }
            }
            Freshness::Report => {
                match fresh {
                    Err(OpenError::Expired { .. }) => notes.expired = true,
                    Err(OpenError::FromFuture { .. }) => notes.from_future = true,
                    _ => {}
                }
                notes.opened_before = seen;
            }
        }
        tmp.as_file()
            .sync_all()
            .map_err(io_err("syncing", spool_dir))?;
        Ok(Received {
            opened,
            sender,
            content: tmp,
            notes,
        })
    }

    /// Records a delivered message in the replay cache, so a copy of it is
    /// refused as replayed from now on. Returns false if another process
    /// recorded it first.
    pub fn mark_delivered(&mut self, opened: &OpenedMessage, now: u64) -> Result<bool, AgentError> {
        // A message that never expires (opened by hand, which only reports
        // a second opening) is remembered as long as any message could
        // live, so the cache stays bounded.
        let forget_at = if opened.header.expires_at == sealpost_proto::message::NO_EXPIRY {
            now.saturating_add(sealpost_proto::message::MAX_LIFETIME_SECS)
        } else {
            self.policy.remember_until(opened.header.expires_at)
        };
        self.db
            .replay_insert(&outbox::ReceivedId::of(&opened.header), forget_at, now)
    }
}

/// Moves a received file to `dest` durably: fsync'd already, renamed into
/// place, then the directory fsync'd. Decrypted content stays private
/// (mode 0600). An existing `dest` is replaced only with `replace`;
/// otherwise the rename fails if anything holds the name (checked by the
/// rename itself, so nothing created meanwhile is lost either).
pub fn deliver_to(
    received: tempfile::NamedTempFile,
    dest: &Path,
    replace: bool,
) -> Result<(), AgentError> {
    received
        .as_file()
        .set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err("setting permissions on", dest))?;
    let persisted = if replace {
        received.persist(dest)
    } else {
        received.persist_noclobber(dest)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            AgentError::OutputExists(dest.to_path_buf())
        } else {
            io_err("writing", dest)(e.error)
        }
    })?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fsutil::sync_dir(dir).map_err(io_err("syncing", dir))
}

/// The largest manifest message content read into memory.
const MAX_MANIFEST_CONTENT: u64 = sealpost_proto::manifest::MAX_MANIFEST_BYTES as u64;

impl Agent {
    /// Encrypts a file as a blob into `blob_out` and seals its manifest (a
    /// message of kind file-manifest) into `manifest_out`. One pass over the
    /// file, constant memory.
    #[allow(clippy::too_many_arguments)]
    pub fn seal_file<R: Read, B: Write, M: Write + Seek>(
        &self,
        recipients: &[PublicIdentity],
        name: &str,
        content: R,
        blob_out: B,
        manifest_out: M,
        lifetime_secs: u64,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(FileManifest, SealSummary), AgentError> {
        sealpost_proto::manifest::validate_file_name(name)?;
        let key = BlobKey::random(rng);
        let summary = blob::seal_blob(&key, blob::DEFAULT_CHUNK_SIZE, content, blob_out).map_err(
            |source| AgentError::Io {
                what: "encrypting",
                path: PathBuf::from(name),
                source,
            },
        )?;
        let manifest = FileManifest::new(
            BlobId::random(rng),
            key,
            summary.layout,
            summary.plaintext_hash,
            name.to_owned(),
        )?;
        let encoded = manifest.encode();
        let sealed = self
            .seal(
                recipients,
                Kind::FileManifest,
                lifetime_secs,
                now,
                rng,
                &encoded[..],
                Some(encoded.len() as u64),
                manifest_out,
            )
            .map_err(|e| AgentError::Io {
                what: "sealing the manifest of",
                path: PathBuf::from(name),
                source: io::Error::other(e.to_string()),
            })?;
        Ok((manifest, sealed))
    }

    /// Given a received manifest message, decrypts and verifies its blob
    /// into `dest_dir` under the manifest's file name. Never overwrites an
    /// existing file and never shows a partial file under the final name:
    /// the file is written to a temporary name, fsync'd, then linked into
    /// place, and the directory fsync'd.
    pub fn receive_file<R: Read>(
        &self,
        manifest_msg: &Received,
        blob_in: R,
        dest_dir: &Path,
    ) -> Result<(FileManifest, PathBuf), ReceiveError> {
        if manifest_msg.opened.header.kind != Kind::FileManifest {
            return Err(OpenError::Malformed(DecodeError::Invalid {
                what: "message kind",
                why: "expected a file manifest",
            })
            .into());
        }
        let mut bytes = Vec::new();
        fs::File::open(manifest_msg.content.path())
            .and_then(|f| f.take(MAX_MANIFEST_CONTENT + 1).read_to_end(&mut bytes))
            .map_err(io_err("reading", manifest_msg.content.path()))?;
        let manifest = FileManifest::decode(&bytes).map_err(OpenError::from)?;
        let dest = dest_dir.join(&manifest.name);
        if dest.exists() {
            return Err(AgentError::Io {
                what: "refusing to overwrite",
                path: dest,
                source: io::ErrorKind::AlreadyExists.into(),
            }
            .into());
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".sealpost-file-")
            .tempfile_in(dest_dir)
            .map_err(io_err("creating a temporary file in", dest_dir))?;
        {
            let mut w = io::BufWriter::with_capacity(256 * 1024, tmp.as_file_mut());
            blob::open_blob(
                &manifest.key,
                &manifest.layout,
                &manifest.plaintext_hash,
                io::BufReader::with_capacity(256 * 1024, blob_in),
                &mut w,
            )?;
            w.flush().map_err(io_err("writing", dest_dir))?;
        }
        tmp.as_file()
            .sync_all()
            .map_err(io_err("syncing", dest_dir))?;
        tmp.persist_noclobber(&dest)
            .map_err(|e| io_err("writing", &dest)(e.error))?;
        fsutil::sync_dir(dest_dir).map_err(io_err("syncing", dest_dir))?;
        Ok((manifest, dest))
    }
}
