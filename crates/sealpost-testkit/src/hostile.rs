//! A hostile relay: the relay's own code with [`Hostile`] installed as its
//! [`Tamper`] hook. Under a seeded RNG, each fault class strikes at its own
//! rate, and every fault committed is written to a log (one JSON object
//! per line) naming the item it touched, so a test can match each fault to
//! the endpoint's detection of it.
//!
//! What it can do is what a relay can do: it sees mailboxes, sealed bytes,
//! blob ids and hashes, and it holds the relay's signing key. What it
//! cannot do is sign as a user: forged receipts and rejections are signed
//! by its own identity ("mallory"), whatever their envelope claims.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sealpost_proto::message::testing;
use sealpost_proto::relay::{Item, MailboxId};
use sealpost_proto::report::{Entries, ReceiptEntry, RejectReason, RejectionEntry, Report};
use sealpost_proto::{
    ContactCard as Card, Identity, Kind, MessageHeader, MessageId, PublicIdentity,
};
use sealpost_relay::tamper::{ForgedRefusal, OnForward, OnHandOn, OnSubmit, Tamper};

/// Every fault class, in the order they are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// A submission answered `Accepted` and not kept.
    Drop,
    /// A fetched item sent twice in the same batch.
    Duplicate,
    /// A fetched batch shuffled.
    Reorder,
    /// A fetched item held back (served on a later fetch).
    Delay,
    /// One bit of a fetched item flipped.
    Flip,
    /// A fetched item cut short.
    Truncate,
    /// An item served to this mailbox before (acknowledged or not) sent
    /// again.
    Replay,
    /// A submission stored in another mailbox.
    Move,
    /// A fetched item replaced by another mailbox's item.
    Substitute,
    /// A submission answered with a refusal signed by another key or
    /// naming another submission.
    ForgeRefusal,
    /// A receipt or rejection made up by the relay, inserted in a batch.
    ForgeReport,
    /// One bit of blob data flipped on its way to the reader.
    BlobFlip,
    /// Blob data cut short on its way to the reader.
    BlobTruncate,
    /// A `Forward` from an owner answered `Accepted` and never handed on
    /// (claims to forward, never does).
    ForwardDrop,
    /// A queued item ended, before it expired, with a notice signed by
    /// this relay saying it gave up.
    ForwardGiveUp,
    /// A queued item ended with a notice carrying a refusal this relay
    /// made up (signed by itself, not by the next relay).
    ForwardForge,
    /// A queued item handed on, and again later (replayed to the next
    /// relay).
    ForwardReplay,
    /// A queued item handed on addressed to another mailbox it forwarded
    /// to (misrouted).
    ForwardMisroute,
}

/// How many fault classes there are.
const CLASSES: usize = 18;

impl Fault {
    pub const ALL: [Fault; CLASSES] = [
        Fault::Drop,
        Fault::Duplicate,
        Fault::Reorder,
        Fault::Delay,
        Fault::Flip,
        Fault::Truncate,
        Fault::Replay,
        Fault::Move,
        Fault::Substitute,
        Fault::ForgeRefusal,
        Fault::ForgeReport,
        Fault::BlobFlip,
        Fault::BlobTruncate,
        Fault::ForwardDrop,
        Fault::ForwardGiveUp,
        Fault::ForwardForge,
        Fault::ForwardReplay,
        Fault::ForwardMisroute,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::Duplicate => "duplicate",
            Fault::Reorder => "reorder",
            Fault::Delay => "delay",
            Fault::Flip => "flip",
            Fault::Truncate => "truncate",
            Fault::Replay => "replay",
            Fault::Move => "move",
            Fault::Substitute => "substitute",
            Fault::ForgeRefusal => "forge-refusal",
            Fault::ForgeReport => "forge-report",
            Fault::BlobFlip => "blob-flip",
            Fault::BlobTruncate => "blob-truncate",
            Fault::ForwardDrop => "forward-drop",
            Fault::ForwardGiveUp => "forward-give-up",
            Fault::ForwardForge => "forward-forge-refusal",
            Fault::ForwardReplay => "forward-replay",
            Fault::ForwardMisroute => "forward-misroute",
        }
    }

    pub fn from_name(s: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == s)
    }

    fn index(self) -> usize {
        Fault::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// A malformed `--hostile` specification.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("`{0}` is not KEY=VALUE")]
    NotAPair(String),
    #[error("unknown key `{0}`: use seed, all, heal-after or a fault class ({1})")]
    UnknownKey(String, String),
    #[error("`{key}={value}`: {why}")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
}

/// What the hostile relay does: a seed, a rate per fault class (each in
/// 0..=1, the chance per item, batch or piece it could strike), and
/// optionally the time after which it turns honest.
///
/// Text form: comma-separated `KEY=VALUE`, e.g.
/// `seed=7,all=0.02,flip=0.05,heal-after=60`. `all` sets every class;
/// later keys override earlier ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub seed: u64,
    pub rates: [f64; CLASSES],
    pub heal_after: Option<Duration>,
}

impl Spec {
    pub fn parse(s: &str) -> Result<Spec, SpecError> {
        let mut spec = Spec {
            seed: 0,
            rates: [0.0; CLASSES],
            heal_after: None,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| SpecError::NotAPair(part.to_owned()))?;
            let bad = |why| SpecError::BadValue {
                key: k.to_owned(),
                value: v.to_owned(),
                why,
            };
            let rate = || -> Result<f64, SpecError> {
                let r: f64 = v.parse().map_err(|_| bad("not a number"))?;
                if (0.0..=1.0).contains(&r) {
                    Ok(r)
                } else {
                    Err(bad("a rate is between 0 and 1"))
                }
            };
            match k {
                "seed" => spec.seed = v.parse().map_err(|_| bad("not an unsigned integer"))?,
                "all" => spec.rates = [rate()?; CLASSES],
                "heal-after" => {
                    let secs: f64 = v.parse().map_err(|_| bad("not a number of seconds"))?;
                    if !(0.0..1e9).contains(&secs) {
                        return Err(bad("out of range"));
                    }
                    spec.heal_after = Some(Duration::from_secs_f64(secs));
                }
                _ => match Fault::from_name(k) {
                    Some(f) => spec.rates[f.index()] = rate()?,
                    None => {
                        let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                        return Err(SpecError::UnknownKey(k.to_owned(), names.join(", ")));
                    }
                },
            }
        }
        Ok(spec)
    }

    pub fn rate(&self, f: Fault) -> f64 {
        self.rates[f.index()]
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={}", self.seed)?;
        for c in Fault::ALL {
            write!(f, ",{}={}", c.name(), self.rate(c))?;
        }
        if let Some(h) = self.heal_after {
            write!(f, ",heal-after={}", h.as_secs_f64())?;
        }
        Ok(())
    }
}

/// Items kept to replay and substitute, per kind of memory.
const POOL_ITEMS: usize = 512;
const HISTORY_ITEMS: usize = 64;
/// Largest item kept in the pool or a history (bounds the memory).
const KEEP_MAX: usize = 64 * 1024;

struct State {
    rng: ChaCha8Rng,
    /// Mailboxes seen as submission targets (where to move items).
    mailboxes: Vec<MailboxId>,
    /// Recent submissions, any mailbox (what to substitute).
    pool: VecDeque<(MailboxId, Vec<u8>)>,
    /// What each mailbox was served (what to replay).
    served: HashMap<MailboxId, VecDeque<Vec<u8>>>,
    /// Mailboxes items were forwarded or handed on to (where to misroute
    /// one).
    forward_dests: Vec<MailboxId>,
    log: Option<File>,
    n: u64,
}

/// The hostile relay's hooks. Install with `Config::tamper`.
pub struct Hostile {
    spec: Spec,
    started: Instant,
    healed: AtomicBool,
    counts: [AtomicU64; CLASSES],
    state: Mutex<State>,
    mallory: Identity,
    /// Public cards, by mailbox: whom forged reports can be addressed to
    /// and whom they can claim to come from. Ordered, so that which card a
    /// forgery claims depends on the seed alone.
    cards: BTreeMap<MailboxId, PublicIdentity>,
}

impl fmt::Debug for Hostile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hostile")
            .field("spec", &self.spec.to_string())
            .finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Hostile {
    /// A hostile relay following `spec`, logging to `log` (appended).
    pub fn new(spec: Spec, log: Option<&Path>) -> std::io::Result<Hostile> {
        let log = match log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mallory = Identity::generate(&mut rng);
        Ok(Hostile {
            started: Instant::now(),
            healed: AtomicBool::new(false),
            counts: Default::default(),
            state: Mutex::new(State {
                rng,
                mailboxes: Vec::new(),
                pool: VecDeque::new(),
                served: HashMap::new(),
                forward_dests: Vec::new(),
                log,
                n: 0,
            }),
            mallory,
            cards: BTreeMap::new(),
            spec,
        })
    }

    /// Learns public cards (text form, one per file in `dir`, or lines),
    /// so forged reports can be sealed to their owners.
    pub fn learn_cards(&mut self, texts: &[String]) -> usize {
        for t in texts {
            for line in t.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if let Ok(c) = Card::from_text(line) {
                    let p = *c.public();
                    self.cards.insert(MailboxId::of(p.signing_bytes()), p);
                }
            }
        }
        self.cards.len()
    }

    /// Turns honest from now on.
    pub fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }

    pub fn healed(&self) -> bool {
        self.healed.load(Ordering::SeqCst)
            || self
                .spec
                .heal_after
                .is_some_and(|h| self.started.elapsed() >= h)
    }

    /// Faults committed so far, by class.
    pub fn counts(&self) -> Vec<(Fault, u64)> {
        Fault::ALL
            .iter()
            .map(|f| (*f, self.counts[f.index()].load(Ordering::Relaxed)))
            .collect()
    }

    fn roll(&self, st: &mut State, f: Fault) -> bool {
        let r = self.spec.rate(f);
        r > 0.0 && st.rng.gen_bool(r)
    }

    fn log(&self, st: &mut State, f: Fault, mailbox: &MailboxId, item: &str, orig: Option<&str>) {
        self.counts[f.index()].fetch_add(1, Ordering::Relaxed);
        st.n += 1;
        tracing::info!(fault = f.name(), item, "hostile relay: {}", f.name());
        if let Some(file) = st.log.as_mut() {
            let mut v = serde_json::json!({
                "n": st.n,
                "class": f.name(),
                "mailbox": sealpost_proto::hex(&mailbox.0[..8]),
                "item": item,
            });
            if let Some(o) = orig {
                v["orig"] = serde_json::Value::from(o);
            }
            // One write per line: a killed relay leaves whole lines.
            let _ = file.write_all(format!("{v}\n").as_bytes());
        }
    }

    /// A receipt or rejection of a random id, signed by mallory, in an
    /// envelope that either claims another user or is mallory's own.
    fn forge_report(&self, st: &mut State, to: &PublicIdentity) -> Vec<u8> {
        let claim = self
            .cards
            .values()
            .filter(|c| *c != to)
            .nth(st.rng.gen_range(0..self.cards.len().max(1)) % self.cards.len().max(1))
            .copied();
        let impersonate = st.rng.gen_bool(0.5);
        let envelope = match (impersonate, claim) {
            (true, Some(c)) => c,
            _ => *self.mallory.public(),
        };
        let id = MessageId::random(&mut st.rng);
        let now = now_secs();
        let receipt = st.rng.gen_bool(0.5);
        let entries = if receipt {
            Entries::Receipt(vec![ReceiptEntry {
                id,
                content_hash: st.rng.gen(),
                content_len: st.rng.gen_range(0..4096),
                stored_at: now,
            }])
        } else {
            Entries::Rejection(vec![RejectionEntry {
                id,
                reason: RejectReason::NotAContact,
            }])
        };
        let Ok(report) = Report::sign(&self.mallory, to, now, entries) else {
            return vec![0; 64];
        };
        let header = MessageHeader {
            kind: if receipt {
                Kind::Receipt
            } else {
                Kind::Rejection
            },
            id: MessageId::random(&mut st.rng),
            created_at: now,
            expires_at: now + 3600,
            in_reply_to: None,
            sender: envelope,
            recipients: vec![to.into()],
            reply_relay: None,
        };
        testing::seal_plaintext(
            &[*to],
            &testing::signed_plaintext(&self.mallory, &header, report.as_bytes()),
        )
    }
}

fn remember(q: &mut VecDeque<Vec<u8>>, payload: &[u8], cap: usize) {
    if payload.len() <= KEEP_MAX {
        if q.len() == cap {
            q.pop_front();
        }
        q.push_back(payload.to_vec());
    }
}

fn item_hash(p: &[u8]) -> String {
    blake3::hash(p).to_hex().to_string()
}

impl Tamper for Hostile {
    fn submit(&self, mailbox: &MailboxId, payload_hash: &[u8; 32], payload: &[u8]) -> OnSubmit {
        if self.healed() {
            return OnSubmit::Store;
        }
        let Ok(mut st) = self.state.lock() else {
            return OnSubmit::Store;
        };
        let st = &mut *st;
        if !st.mailboxes.contains(mailbox) {
            st.mailboxes.push(*mailbox);
        }
        if payload.len() <= KEEP_MAX {
            if st.pool.len() == POOL_ITEMS {
                st.pool.pop_front();
            }
            st.pool.push_back((*mailbox, payload.to_vec()));
        }
        let item = sealpost_proto::hex(payload_hash);
        if self.roll(st, Fault::Drop) {
            self.log(st, Fault::Drop, mailbox, &item, None);
            return OnSubmit::Drop;
        }
        if self.roll(st, Fault::Move) {
            let others: Vec<MailboxId> = st
                .mailboxes
                .iter()
                .filter(|m| *m != mailbox)
                .copied()
                .collect();
            if let Some(to) = others.choose(&mut st.rng).copied() {
                self.log(st, Fault::Move, mailbox, &item, None);
                return OnSubmit::Redirect(to);
            }
        }
        if self.roll(st, Fault::ForgeRefusal) {
            self.log(st, Fault::ForgeRefusal, mailbox, &item, None);
            let how = [
                ForgedRefusal::OtherKey,
                ForgedRefusal::OtherHash,
                ForgedRefusal::OtherMailbox,
            ][st.rng.gen_range(0..3)];
            return OnSubmit::Forge(how);
        }
        OnSubmit::Store
    }

    fn fetch(&self, mailbox: &MailboxId, items: &mut Vec<Item>) -> Vec<u64> {
        let healed = self.healed();
        let Ok(mut st) = self.state.lock() else {
            return Vec::new();
        };
        let st = &mut *st;
        if healed || items.is_empty() {
            return Vec::new();
        }
        // Originals of what this fetch really serves: replayed later.
        let mut served: Vec<Vec<u8>> = Vec::new();
        let mut out: Vec<Item> = Vec::with_capacity(items.len() + 2);
        for mut item in items.drain(..) {
            let orig = item_hash(&item.payload);
            if self.roll(st, Fault::Delay) {
                self.log(st, Fault::Delay, mailbox, &orig, None);
                continue;
            }
            if self.roll(st, Fault::Substitute) {
                let others: Vec<usize> = (0..st.pool.len())
                    .filter(|&i| st.pool[i].0 != *mailbox)
                    .collect();
                if let Some(&i) = others.choose(&mut st.rng) {
                    let p = st.pool[i].1.clone();
                    let h = item_hash(&p);
                    self.log(st, Fault::Substitute, mailbox, &h, Some(&orig));
                    served.push(p.clone());
                    item.payload_hash = *blake3::hash(&p).as_bytes();
                    item.payload = p;
                    out.push(item);
                    continue;
                }
            }
            if item.payload.len() <= KEEP_MAX {
                // What the mailbox was really sent (before any damage):
                // replaying it later is a replay, not a first delivery.
                served.push(item.payload.clone());
            }
            if !item.payload.is_empty() && self.roll(st, Fault::Flip) {
                let bit = st.rng.gen_range(0..item.payload.len() * 8);
                item.payload[bit / 8] ^= 1 << (bit % 8);
                item.payload_hash = *blake3::hash(&item.payload).as_bytes();
                let h = item_hash(&item.payload);
                self.log(st, Fault::Flip, mailbox, &h, Some(&orig));
            } else if !item.payload.is_empty() && self.roll(st, Fault::Truncate) {
                let keep = st.rng.gen_range(0..item.payload.len());
                item.payload.truncate(keep);
                item.payload_hash = *blake3::hash(&item.payload).as_bytes();
                let h = item_hash(&item.payload);
                self.log(st, Fault::Truncate, mailbox, &h, Some(&orig));
            }
            if self.roll(st, Fault::Duplicate) {
                let h = item_hash(&item.payload);
                self.log(st, Fault::Duplicate, mailbox, &h, None);
                out.push(item.clone());
            }
            out.push(item);
        }
        if !out.is_empty() {
            // Invented items take the sequence number of a real one in the
            // batch: acknowledging them acknowledges that one, which the
            // client received anyway.
            if self.roll(st, Fault::Replay) {
                let len = st.served.get(mailbox).map_or(0, VecDeque::len);
                if len > 0 {
                    let k = st.rng.gen_range(0..len);
                    let p = st.served.get(mailbox).and_then(|h| h.get(k)).cloned();
                    if let Some(p) = p {
                        let at = st.rng.gen_range(0..out.len());
                        let h = item_hash(&p);
                        self.log(st, Fault::Replay, mailbox, &h, None);
                        let mut it = out[at].clone();
                        it.payload_hash = *blake3::hash(&p).as_bytes();
                        it.payload = p;
                        out.insert(at, it);
                    }
                }
            }
            if let Some(to) = self.cards.get(mailbox).copied() {
                if self.roll(st, Fault::ForgeReport) {
                    let p = self.forge_report(st, &to);
                    let at = st.rng.gen_range(0..out.len());
                    let h = item_hash(&p);
                    self.log(st, Fault::ForgeReport, mailbox, &h, None);
                    let mut it = out[at].clone();
                    it.payload_hash = *blake3::hash(&p).as_bytes();
                    it.payload = p;
                    out.insert(at, it);
                }
            }
            if out.len() >= 2 && self.roll(st, Fault::Reorder) {
                out.shuffle(&mut st.rng);
                let what = format!("batch of {}", out.len());
                self.log(st, Fault::Reorder, mailbox, &what, None);
            }
        }
        let h = st.served.entry(*mailbox).or_default();
        for p in served {
            remember(h, &p, HISTORY_ITEMS);
        }
        *items = out;
        Vec::new()
    }

    fn blob_put(
        &self,
        blob_id: &sealpost_proto::relay::BlobId,
        mailbox: &MailboxId,
        offset: u64,
    ) -> Option<ForgedRefusal> {
        if self.healed() {
            return None;
        }
        let mut st = self.state.lock().ok()?;
        let st = &mut *st;
        if !self.roll(st, Fault::ForgeRefusal) {
            return None;
        }
        // The uploader notices per blob, not per piece.
        let _ = offset;
        let item = format!("blob:{}", blob_id);
        self.log(st, Fault::ForgeRefusal, mailbox, &item, None);
        Some(
            [
                ForgedRefusal::OtherKey,
                ForgedRefusal::OtherHash,
                ForgedRefusal::OtherMailbox,
            ][st.rng.gen_range(0..3)],
        )
    }

    fn blob_data(
        &self,
        mailbox: &MailboxId,
        blob_id: &sealpost_proto::relay::BlobId,
        offset: u64,
        data: &mut Vec<u8>,
    ) {
        if self.healed() || data.is_empty() {
            return;
        }
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let st = &mut *st;
        let item = format!("blob:{}@{offset}", blob_id);
        if self.roll(st, Fault::BlobFlip) {
            let bit = st.rng.gen_range(0..data.len() * 8);
            data[bit / 8] ^= 1 << (bit % 8);
            self.log(st, Fault::BlobFlip, mailbox, &item, None);
        } else if self.roll(st, Fault::BlobTruncate) {
            let keep = st.rng.gen_range(0..data.len());
            data.truncate(keep);
            self.log(st, Fault::BlobTruncate, mailbox, &item, None);
        }
    }

    fn forward(&self, mailbox: &MailboxId, payload_hash: &[u8; 32]) -> OnForward {
        if self.healed() {
            return OnForward::Queue;
        }
        let Ok(mut st) = self.state.lock() else {
            return OnForward::Queue;
        };
        let st = &mut *st;
        // Where misrouted items can go.
        if !st.forward_dests.contains(mailbox) && st.forward_dests.len() < 64 {
            st.forward_dests.push(*mailbox);
        }
        if self.roll(st, Fault::ForwardDrop) {
            let item = sealpost_proto::hex(payload_hash);
            self.log(st, Fault::ForwardDrop, mailbox, &item, None);
            return OnForward::Drop;
        }
        OnForward::Queue
    }

    fn hand_on(&self, mailbox: &MailboxId, payload_hash: &[u8; 32]) -> OnHandOn {
        if self.healed() {
            return OnHandOn::Send;
        }
        let Ok(mut st) = self.state.lock() else {
            return OnHandOn::Send;
        };
        let st = &mut *st;
        // Where misrouted items can go: what is handed on too, not only
        // what was queued here (a relay killed and started again hands on
        // items queued by its earlier run, which it never saw queued).
        if !st.forward_dests.contains(mailbox) && st.forward_dests.len() < 64 {
            st.forward_dests.push(*mailbox);
        }
        let item = sealpost_proto::hex(payload_hash);
        if self.roll(st, Fault::ForwardGiveUp) {
            self.log(st, Fault::ForwardGiveUp, mailbox, &item, None);
            return OnHandOn::GiveUp;
        }
        if self.roll(st, Fault::ForwardForge) {
            self.log(st, Fault::ForwardForge, mailbox, &item, None);
            return OnHandOn::ForgeRefusal;
        }
        if self.roll(st, Fault::ForwardReplay) {
            self.log(st, Fault::ForwardReplay, mailbox, &item, None);
            return OnHandOn::Replay;
        }
        if self.roll(st, Fault::ForwardMisroute) {
            let others: Vec<MailboxId> = st
                .forward_dests
                .iter()
                .filter(|m| *m != mailbox)
                .copied()
                .collect();
            if let Some(to) = others.choose(&mut st.rng).copied() {
                self.log(st, Fault::ForwardMisroute, mailbox, &item, None);
                return OnHandOn::Redirect(to);
            }
        }
        OnHandOn::Send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        let s = Spec::parse("seed=7, all=0.02,flip=0.5,heal-after=1.5").expect("parse");
        assert_eq!(s.seed, 7);
        assert_eq!(s.rate(Fault::Flip), 0.5);
        assert_eq!(s.rate(Fault::Drop), 0.02);
        assert_eq!(s.heal_after, Some(Duration::from_millis(1500)));
        assert_eq!(Spec::parse(&s.to_string()).expect("again"), s);
        for bad in ["flip", "flip=2", "nonsense=0.1", "seed=-1", "all=x"] {
            assert!(Spec::parse(bad).is_err(), "{bad}");
        }
    }

    fn items(n: u64) -> Vec<Item> {
        (1..=n)
            .map(|seq| Item {
                seq,
                received_at: 0,
                expires_at: 0,
                payload_hash: *blake3::hash(&seq.to_be_bytes()).as_bytes(),
                payload: seq.to_be_bytes().to_vec(),
            })
            .collect()
    }

    #[test]
    fn the_same_seed_commits_the_same_faults() {
        let run = || {
            let h = Hostile::new(Spec::parse("seed=3,all=0.3").expect("spec"), None).expect("new");
            let mb = MailboxId([1; 32]);
            let other = MailboxId([2; 32]);
            let mut trace = Vec::new();
            for i in 0..50u64 {
                let p = i.to_be_bytes();
                let to = if i % 2 == 0 { mb } else { other };
                trace.push(format!(
                    "{:?}",
                    h.submit(&to, blake3::hash(&p).as_bytes(), &p)
                ));
                let mut it = items(5);
                h.fetch(&mb, &mut it);
                trace.push(format!(
                    "{:?}",
                    it.iter().map(|i| i.payload.clone()).collect::<Vec<_>>()
                ));
                // As a forwarding relay.
                let hash = blake3::hash(&p);
                trace.push(format!("{:?}", h.forward(&to, hash.as_bytes())));
                trace.push(format!("{:?}", h.hand_on(&to, hash.as_bytes())));
            }
            (trace, h.counts())
        };
        let (a, ca) = run();
        let (b, cb) = run();
        assert_eq!(a, b);
        assert_eq!(ca, cb);
        for (f, n) in ca {
            if !matches!(
                f,
                Fault::ForgeReport | Fault::BlobFlip | Fault::BlobTruncate
            ) {
                assert!(n > 0, "{} never struck", f.name());
            }
        }
    }

    #[test]
    fn tampered_items_carry_a_matching_hash_and_sequence_numbers_of_the_batch() {
        let h = Hostile::new(Spec::parse("seed=1,all=0.4").expect("spec"), None).expect("new");
        let mb = MailboxId([1; 32]);
        for i in 0..20u64 {
            let p = vec![i as u8; 100];
            h.submit(&MailboxId([2; 32]), blake3::hash(&p).as_bytes(), &p);
        }
        for _ in 0..200 {
            let mut it = items(6);
            h.fetch(&mb, &mut it);
            for i in &it {
                assert_eq!(&i.payload_hash, blake3::hash(&i.payload).as_bytes());
                assert!((1..=6).contains(&i.seq));
            }
        }
        h.heal();
        let mut it = items(6);
        h.fetch(&mb, &mut it);
        assert_eq!(it, items(6), "a healed relay is honest");
    }
}
