//! Pinned contacts and the persistent replay cache, in the agent's SQLite
//! database.
//!
//! SQLite runs in WAL mode with `synchronous=FULL`: with NORMAL a power loss
//! can undo the last commits, and a replay-cache entry that vanished would
//! let a replayed message through.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use sealpost_proto::{ContactCard, Fingerprint};

use crate::outbox::ReceivedId;
use crate::AgentError;

/// What `add` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddOutcome {
    /// A new contact was pinned.
    Added,
    /// The same key was already pinned under this name; the card was
    /// refreshed if the new one is newer.
    AlreadyPinned { refreshed: bool },
    /// The user confirmed a key change with `--replace`.
    Replaced { old: Fingerprint },
}

#[derive(Debug, Clone)]
pub struct Contact {
    pub name: String,
    pub card: ContactCard,
    pub added_at: u64,
}

#[derive(Debug)]
pub struct Db {
    pub(crate) conn: Connection,
    /// Cards this process decoded and verified, by the BLAKE3 of their
    /// bytes (see [`VerifiedCards`]).
    verified: std::sync::Mutex<VerifiedCards>,
}

/// Cards already verified by this process. A card read from the database
/// is taken from here when its bytes are the ones verified before (same
/// BLAKE3), instead of checking its signature and agreement key again:
/// that check, for every message's sender, was more than half of what a
/// recipient's agent spent per message (counted with callgrind: 2.2 M of
/// 3.9 M instructions). Every lookup still reads the database, so a
/// contact removed, renamed or replaced meanwhile (by another command)
/// is seen at once; only the verification of identical bytes is reused.
#[derive(Debug, Default)]
struct VerifiedCards {
    cards: std::collections::HashMap<[u8; 32], ContactCard>,
}

/// Cards kept verified, at most; the cache starts over when full.
const VERIFIED_CARDS: usize = 4096;

impl VerifiedCards {
    fn decode(&mut self, bytes: &[u8]) -> Result<ContactCard, sealpost_proto::CardError> {
        let key = *blake3::hash(bytes).as_bytes();
        if let Some(c) = self.cards.get(&key) {
            return Ok(c.clone());
        }
        let card = ContactCard::decode(bytes)?;
        if self.cards.len() >= VERIFIED_CARDS {
            self.cards.clear();
        }
        self.cards.insert(key, card.clone());
        Ok(card)
    }
}

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS contacts (
    name TEXT PRIMARY KEY,
    signing_key BLOB NOT NULL UNIQUE,
    card BLOB NOT NULL,
    added_at INTEGER NOT NULL
);
-- Messages acted on or opened, by sender and id: each sender chooses its
-- own ids, so one sender's id says nothing of another's. `sender` x''
-- (rows kept from before user version 5, which knew only the id) matches
-- every sender until the row's time is past.
CREATE TABLE IF NOT EXISTS replay (
    sender BLOB NOT NULL,
    id BLOB NOT NULL,
    forget_at INTEGER NOT NULL,
    -- id first: ids made by time are added at the end of the index
    PRIMARY KEY (id, sender)
);
CREATE INDEX IF NOT EXISTS replay_forget ON replay(forget_at);
";

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The database holds contacts, message summaries and file keys: it is
/// created 0600 (SQLite gives its WAL and shared-memory files the mode of
/// the database), and one made by older versions with wider modes is
/// tightened, with its WAL and shared-memory files.
fn private_db_files(path: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| AgentError::Io {
            what,
            path: p,
            source,
        }
    };
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io("creating", path))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(io("setting permissions on", &p))?;
            }
        }
    }
    Ok(())
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, AgentError> {
        private_db_files(path)?;
        let mut conn = Connection::open(path)?;
        // Several processes share this database (`send` while an agent
        // runs). A deferred transaction that read and then wants to write
        // fails at once with SQLITE_BUSY when another process wrote in
        // between; taking the write lock up front makes it wait instead.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        // The engine runs a few dozen distinct statements per pass; keep
        // them all prepared (the default cache holds 16).
        conn.set_prepared_statement_cache_capacity(128);
        // A new database gives free pages back in steps (see
        // `give_back_space`); this must precede its first table.
        if conn.pragma_query_value(None, "page_count", |r| r.get::<_, i64>(0))? == 0 {
            conn.pragma_update(None, "auto_vacuum", 2i64)?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "journal_size_limit", 16i64 << 20)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(crate::outbox::SCHEMA)?;
        crate::outbox::migrate(&conn)?;
        Ok(Self {
            conn,
            verified: Default::default(),
        })
    }

    /// Makes a database from before free space was given back do so: it
    /// is rewritten once (`VACUUM`; returns true then). Called by the
    /// engine, which runs alone on its home; a `send` at the same moment
    /// waits for it.
    pub fn incremental_vacuum_on(&mut self) -> Result<bool, AgentError> {
        let mode = sealpost_sqlite::incremental_vacuum_on(&self.conn, |pages| {
            tracing::info!(
                "rewriting the home's database once so that it gives free space back ({pages} pages)"
            );
        })?;
        Ok(mode == sealpost_sqlite::VacuumMode::Rewritten)
    }

    /// One step of giving free pages back to the file system, paced by
    /// `pace` (every free page at once while few are in use; see
    /// `sealpost_sqlite`, which the relay's store uses too).
    pub fn give_back_space(
        &mut self,
        pace: &mut sealpost_sqlite::Pace,
    ) -> Result<sealpost_sqlite::Step, AgentError> {
        Ok(sealpost_sqlite::give_back_step(&self.conn, pace)?)
    }

    /// The database's size and its free pages, in bytes.
    pub fn space(&self) -> Result<(u64, u64), AgentError> {
        let (size, free): (i64, i64) = self.conn.query_row(
            "SELECT page_count * page_size, freelist_count * page_size \
             FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((size.max(0) as u64, free.max(0) as u64))
    }

    /// Pins `card` under `name`. A different key for a pinned name, or a
    /// pinned key under a second name, is refused unless `replace` is set.
    pub fn add_contact(
        &mut self,
        name: &str,
        card: &ContactCard,
        replace: bool,
        now: u64,
    ) -> Result<AddOutcome, AgentError> {
        let tx = self.conn.transaction()?;
        let key = card.public().signing_bytes().to_vec();
        let by_key: Option<String> = tx
            .query_row(
                "SELECT name FROM contacts WHERE signing_key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(other) = &by_key {
            if other != name {
                return Err(AgentError::KeyPinnedUnderOtherName {
                    existing: other.clone(),
                    fingerprint: card.public().fingerprint(),
                });
            }
        }
        let existing: Option<Vec<u8>> = tx
            .query_row(
                "SELECT card FROM contacts WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        let outcome = match existing {
            None => {
                tx.execute(
                    "INSERT INTO contacts (name, signing_key, card, added_at) VALUES (?1, ?2, ?3, ?4)",
                    params![name, key, card.as_bytes(), to_i64(now)],
                )?;
                AddOutcome::Added
            }
            Some(old_bytes) => {
                let old = ContactCard::decode(&old_bytes)?;
                if old.public().signing_bytes() == card.public().signing_bytes() {
                    let newer = card.fields().created_at > old.fields().created_at;
                    if newer {
                        tx.execute(
                            "UPDATE contacts SET card = ?2 WHERE name = ?1",
                            params![name, card.as_bytes()],
                        )?;
                    }
                    AddOutcome::AlreadyPinned { refreshed: newer }
                } else if replace {
                    tx.execute(
                        "UPDATE contacts SET signing_key = ?2, card = ?3, added_at = ?4 WHERE name = ?1",
                        params![name, key, card.as_bytes(), to_i64(now)],
                    )?;
                    AddOutcome::Replaced {
                        old: old.public().fingerprint(),
                    }
                } else {
                    return Err(AgentError::KeyChanged {
                        name: name.to_owned(),
                        pinned: old.public().fingerprint(),
                        offered: card.public().fingerprint(),
                    });
                }
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn row_to_contact(
        &self,
        name: String,
        card: Vec<u8>,
        added_at: i64,
    ) -> Result<Contact, AgentError> {
        let card = match self.verified.lock() {
            Ok(mut v) => v.decode(&card)?,
            Err(_) => ContactCard::decode(&card)?,
        };
        Ok(Contact {
            name,
            card,
            added_at: u64::try_from(added_at).unwrap_or(0),
        })
    }

    pub fn contacts(&self) -> Result<Vec<Contact>, AgentError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, card, added_at FROM contacts ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (n, c, a) = row?;
            out.push(self.row_to_contact(n, c, a)?);
        }
        Ok(out)
    }

    /// The contact called `name`: exactly, else the one whose name differs
    /// only in case. An unknown name is an error that suggests near
    /// misses (a typo, another case, a prefix).
    pub fn contact(&self, name: &str) -> Result<Contact, AgentError> {
        let row: Option<(String, Vec<u8>, i64)> = self
            .conn
            .prepare_cached("SELECT name, card, added_at FROM contacts WHERE name = ?1")?
            .query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if let Some((n, c, a)) = row {
            return self.row_to_contact(n, c, a);
        }
        let all = self.contacts()?;
        let folded: Vec<&Contact> = all
            .iter()
            .filter(|c| c.name.to_lowercase() == name.to_lowercase())
            .collect();
        if let [one] = folded[..] {
            return Ok(one.clone());
        }
        Err(AgentError::UnknownContact(
            name.to_owned(),
            near_misses(name, all.iter().map(|c| c.name.as_str())),
        ))
    }

    /// The contact holding this signing key, if pinned.
    pub fn contact_by_key(&self, signing_key: &[u8; 32]) -> Result<Option<Contact>, AgentError> {
        let row: Option<(String, Vec<u8>, i64)> = self
            .conn
            .prepare_cached("SELECT name, card, added_at FROM contacts WHERE signing_key = ?1")?
            .query_row(params![signing_key.to_vec()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        row.map(|(n, c, a)| self.row_to_contact(n, c, a))
            .transpose()
    }

    pub fn remove_contact(&mut self, name: &str) -> Result<(), AgentError> {
        let n = self
            .conn
            .execute("DELETE FROM contacts WHERE name = ?1", params![name])?;
        if n == 0 {
            let all = self.contacts()?;
            return Err(AgentError::UnknownContact(
                name.to_owned(),
                near_misses(name, all.iter().map(|c| c.name.as_str())),
            ));
        }
        Ok(())
    }

    /// Whether `key`'s sender already sent a message with its id that was
    /// acted on or opened (and is remembered still).
    pub fn replay_seen(&self, key: &ReceivedId) -> Result<bool, AgentError> {
        Ok(self
            .conn
            .prepare_cached(REPLAY_SEEN_SQL)?
            .query_row(params![key.sender.to_vec(), key.id.0.to_vec()], |r| {
                r.get::<_, bool>(0)
            })?)
    }

    /// Records that `key` was delivered; returns false if it already was.
    /// Expired entries are pruned in the same transaction, which keeps the
    /// table bounded without a separate sweeper.
    pub fn replay_insert(
        &mut self,
        key: &ReceivedId,
        forget_at: u64,
        now: u64,
    ) -> Result<bool, AgentError> {
        let tx = self.conn.transaction()?;
        let new = replay_record(&tx, key, forget_at, now)?;
        tx.commit()?;
        Ok(new)
    }

    pub fn replay_len(&self) -> Result<u64, AgentError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM replay")?
            .query_row([], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Whether a sender's id is in the replay cache: under that sender, or
/// under x'' (a row kept from before rows named their sender, which
/// matches every sender until its time is past): two look-ups of the
/// primary key `(id, sender)`. Not `sender IN (?1, x'')`, nor an `OR` of
/// the two equalities (which SQLite makes into that `IN`): SQLite builds a
/// temporary b-tree of an `IN` list's values on every run — 25,000
/// instructions a look-up, counted with callgrind
/// (`received_look_ups_use_their_keys_and_are_compiled_once`).
pub(crate) const REPLAY_SEEN_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM replay WHERE id = ?2 AND sender = ?1) \
     OR EXISTS (SELECT 1 FROM replay WHERE id = ?2 AND sender = x'')";

/// Records `key` in the replay cache within `tx` (false if it was there),
/// pruning entries whose time is past: what [`Db::replay_insert`] does,
/// for a transaction that also commits what the message did.
pub(crate) fn replay_record(
    tx: &rusqlite::Transaction<'_>,
    key: &ReceivedId,
    forget_at: u64,
    now: u64,
) -> Result<bool, AgentError> {
    replay_prune(tx, now)?;
    replay_add(tx, key, forget_at)
}

/// Forgets the replay cache's entries whose time is past `now`: how the
/// table stays bounded without a sweeper (every writer of it prunes).
pub(crate) fn replay_prune(tx: &rusqlite::Transaction<'_>, now: u64) -> Result<(), AgentError> {
    tx.prepare_cached("DELETE FROM replay WHERE forget_at <= ?1")?
        .execute(params![to_i64(now)])?;
    Ok(())
}

pub(crate) const REPLAY_ADD_SQL: &str =
    "INSERT OR IGNORE INTO replay (sender, id, forget_at) VALUES (?1, ?2, ?3)";

/// Whether an id is in the replay cache under x'' (a row kept from before
/// rows named their sender).
pub(crate) const REPLAY_LEGACY_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM replay WHERE id = ?1 AND sender = x'')";

/// Adds `key` to the replay cache until `forget_at`; false if it was there
/// (under its sender, or under x'': see [`REPLAY_SEEN_SQL`]). Two
/// statements, not an `INSERT … SELECT … WHERE NOT EXISTS`, which SQLite
/// runs through a temporary table (it reads the table it writes).
pub(crate) fn replay_add(
    tx: &rusqlite::Transaction<'_>,
    key: &ReceivedId,
    forget_at: u64,
) -> Result<bool, AgentError> {
    let legacy: bool = tx
        .prepare_cached(REPLAY_LEGACY_SQL)?
        .query_row(params![key.id.0.to_vec()], |r| r.get(0))?;
    if legacy {
        return Ok(false);
    }
    replay_put(tx, key, forget_at)
}

/// Adds `key` to the replay cache until `forget_at` without looking for a
/// row kept under x'' (false if `key` was there): for a message just
/// judged not seen ([`REPLAY_SEEN_SQL`]) in this pass, whose caller needs
/// no answer.
pub(crate) fn replay_put(
    tx: &rusqlite::Transaction<'_>,
    key: &ReceivedId,
    forget_at: u64,
) -> Result<bool, AgentError> {
    let n = tx.prepare_cached(REPLAY_ADD_SQL)?.execute(params![
        key.sender.to_vec(),
        key.id.0.to_vec(),
        to_i64(forget_at)
    ])?;
    Ok(n == 1)
}

/// " (did you mean \"bob\"?)" for the names within two edits of `name`
/// (ignoring case) or starting with it; empty if none.
fn near_misses<'a>(name: &str, names: impl Iterator<Item = &'a str>) -> String {
    let want = name.to_lowercase();
    let close: Vec<String> = names
        .filter(|n| {
            let n = n.to_lowercase();
            n.starts_with(&want) || edit_distance(&n, &want) <= 2
        })
        .take(3)
        .map(|n| format!("{n:?}"))
        .collect();
    if close.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", close.join(" or "))
    }
}

/// Levenshtein distance over characters (names are short: at most 64).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn near_misses_are_suggested() {
        let names = ["alice", "bob", "Bobby", "carol"];
        assert_eq!(
            near_misses("bbo", names.into_iter()),
            " (did you mean \"bob\"?)"
        );
        assert_eq!(
            near_misses("bo", names.into_iter()),
            " (did you mean \"bob\" or \"Bobby\"?)"
        );
        assert_eq!(near_misses("zed", names.into_iter()), "");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use sealpost_proto::{CardFields, Identity};

    /// A card's verification is reused only for the very bytes verified:
    /// a card altered in the database fails again, and a contact removed
    /// (by another command) is gone at once.
    #[test]
    fn verified_cards_are_reused_only_for_the_same_bytes() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut db = Db::open(&dir.path().join("agent.db")).expect("db");
        let alice = Identity::from_secret_bytes(&[1; 32], &[2; 32]);
        let card = ContactCard::create(
            &alice,
            CardFields {
                name: "alice".into(),
                created_at: 1_750_000_000,
                relay: None,
            },
        )
        .expect("card");
        db.add_contact("alice", &card, false, 1_750_000_000)
            .expect("add");
        let key = *alice.public().signing_bytes();
        for _ in 0..2 {
            let c = db.contact_by_key(&key).expect("read").expect("pinned");
            assert_eq!(c.card.as_bytes(), card.as_bytes());
        }
        assert_eq!(db.verified.lock().expect("lock").cards.len(), 1);
        // The card's bytes changed under the agent: verified again, and
        // refused.
        let mut bad = card.as_bytes().to_vec();
        let n = bad.len();
        bad[n - 1] ^= 1;
        db.conn
            .execute("UPDATE contacts SET card = ?1", params![bad])
            .expect("tamper");
        assert!(db.contact_by_key(&key).is_err());
        // Removed: gone, whatever was verified before.
        db.conn
            .execute("UPDATE contacts SET card = ?1", params![card.as_bytes()])
            .expect("restore");
        assert!(db.contact_by_key(&key).expect("read").is_some());
        db.remove_contact("alice").expect("remove");
        assert!(db.contact_by_key(&key).expect("read").is_none());
    }
}
