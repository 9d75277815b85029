//! Hooks through which a deliberately misbehaving relay is built, for
//! testing that the endpoints catch everything a relay can do (the
//! adversary itself lives in `sealpost-testkit`). An honest relay has no
//! hook installed and never calls into this module.
//!
//! Each hook sees what the relay is about to do and may change it the way
//! a compromised or broken relay could: lose, redirect, duplicate, reorder,
//! hold back, alter or invent items, and answer submissions with refusals
//! that are not what they claim to be.

use sealpost_proto::relay::{BlobId, Item, MailboxId};

/// What the relay does with a submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnSubmit {
    /// Store it as asked.
    Store,
    /// Answer `Accepted` and keep nothing.
    Drop,
    /// Store it in another mailbox and answer `Accepted`.
    Redirect(MailboxId),
    /// Answer with a refusal that does not hold up.
    Forge(ForgedRefusal),
}

/// What the relay does with a `Forward` it would queue for the next relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnForward {
    /// Queue it and hand it on.
    Queue,
    /// Answer `Accepted` and keep nothing (claims to forward, never does).
    Drop,
}

/// What the relay does with a queued item when it is about to hand it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnHandOn {
    /// Hand it on.
    Send,
    /// End it at once with a notice, signed by this relay, that says it
    /// gave up (the item has not expired: a lie the sender must not take).
    GiveUp,
    /// End it at once with a notice carrying a refusal this relay made up
    /// and signed itself, as if the next relay had refused.
    ForgeRefusal,
    /// Hand it on, and keep it to hand on again (a replay of an item the
    /// next relay already took).
    Replay,
    /// Hand it on addressed to this other mailbox (misrouted).
    Redirect(MailboxId),
}

/// The ways a relay can answer with a refusal that the client must not
/// take for its own: signed by another key, or naming another submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForgedRefusal {
    /// Signed with a key that is not the relay's.
    OtherKey,
    /// Correctly signed, but over another payload hash (a refusal of some
    /// other submission, replayed).
    OtherHash,
    /// Correctly signed, but naming another mailbox.
    OtherMailbox,
}

/// The hooks. Every method is called on the relay's request path, so it
/// must be quick and must not block on I/O for long.
/// Every hook defaults to what an honest relay does, so a misbehaving
/// relay implements only the hooks it misbehaves in.
pub trait Tamper: Send + Sync + std::fmt::Debug + 'static {
    /// A well-formed submission whose hash matched, before it is stored.
    fn submit(&self, _mailbox: &MailboxId, _payload_hash: &[u8; 32], _payload: &[u8]) -> OnSubmit {
        OnSubmit::Store
    }

    /// Items about to be sent to `mailbox`'s owner; the hook may rewrite
    /// the list in place. Returns sequence numbers the relay should delete
    /// without telling anyone (items it "loses").
    fn fetch(&self, _mailbox: &MailboxId, _items: &mut Vec<Item>) -> Vec<u64> {
        Vec::new()
    }

    /// A blob piece arriving, before it is stored.
    fn blob_put(
        &self,
        _blob_id: &BlobId,
        _mailbox: &MailboxId,
        _offset: u64,
    ) -> Option<ForgedRefusal> {
        None
    }

    /// Blob data about to be sent to its reader; may be altered in place.
    fn blob_data(
        &self,
        _mailbox: &MailboxId,
        _blob_id: &BlobId,
        _offset: u64,
        _data: &mut Vec<u8>,
    ) {
    }

    /// A `Forward` from one of the relay's owners that passed its checks,
    /// before it is queued.
    fn forward(&self, _mailbox: &MailboxId, _payload_hash: &[u8; 32]) -> OnForward {
        OnForward::Queue
    }

    /// A queued item (not a blob) about to be handed to the next relay.
    fn hand_on(&self, _mailbox: &MailboxId, _payload_hash: &[u8; 32]) -> OnHandOn {
        OnHandOn::Send
    }

    /// A pairing message (PROTOCOL §10) from the slot's opener or joiner,
    /// before it is put in the slot; may be replaced in place.
    fn pair(&self, _slot: u32, _from_opener: bool, _data: &mut Vec<u8>) {}
}
