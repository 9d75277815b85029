//! What `sealpost send` prepares: recipients resolved from contacts, messages sealed and queued, directories listed.

use super::*;

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
        let layout = if self.pad_files {
            sealpost_proto::blob::BlobLayout::padme(layout.data_len, layout.chunk_size)
                .map_err(|e| SendError::BadFile(format!("{}: {e}", path.display())))?
        } else {
            layout
        };
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
            content_len: layout.data_len,
        };
        self.queue_prepared(std::slice::from_ref(&m))?;
        self.db.add_file_out(
            &crate::outbox::FileOut {
                msg: m.id,
                path: abs.to_string_lossy().into_owned(),
                blob_id,
                key,
                size: layout.data_len,
                chunk_size: layout.chunk_size,
                padded_size: layout.plaintext_len,
                plaintext_hash: *plaintext_hash.as_bytes(),
            },
            group.as_ref(),
        )?;
        Ok((m.id, layout.data_len))
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
            pad: self.pad,
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
    /// Pad sealed messages to a Padmé length (the default; see
    /// [`Agent::set_padding`]).
    pad: bool,
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
        let now = now_ms();
        let now_s = now / 1000;
        let lifetime = lifetime_secs.clamp(1, message::MAX_LIFETIME_SECS);
        let id = MessageId::time_ordered(now, &mut OsRng);
        let req = SealRequest {
            kind,
            id,
            created_at: now_s,
            expires_at: now_s + lifetime,
            in_reply_to: None,
            recipients: &self.keys,
            reply_relay: Some(&self.reply),
            pad_for_len: self.pad.then_some(content.len() as u64),
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
