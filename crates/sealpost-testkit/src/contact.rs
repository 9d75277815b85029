//! A hostile contact: a sender its victim has pinned, who sends everything
//! the format allows and more — file names at and past the limits, names
//! that collide, names of the agent's own partial files, trees at the
//! depth limit, paths that climb out, manifests that do not parse, files
//! of a terabyte (or of ten bytes padded to one) that never arrive, replays of its own messages and
//! floods. What the victim's agent must do is stated in the tests and in
//! `bench/hostile-contact.sh`: keep receipting everyone else, never loop,
//! never write outside its download directory, refuse what is over its
//! limits with a signed rejection.
//!
//! Seeded and bounded (counts given by the caller); aim it only at your
//! own agent through a relay on loopback.

use std::collections::BTreeMap;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sealpost_proto::blob::{self, BlobKey, BlobLayout, DEFAULT_CHUNK_SIZE};
use sealpost_proto::card::{CardFields, ContactCard, RelayPin};
use sealpost_proto::manifest::{BlobId, FileManifest};
use sealpost_proto::message::{self, Kind, MessageId, SealRequest};
use sealpost_proto::relay::{BlobPiece, MailboxId};
use sealpost_proto::{Identity, PublicIdentity};
use sealpost_relay::client::{ClientError, RelayClient, Submitted};
use sealpost_relay::RelayAddress;

/// How much of each attack to send.
#[derive(Clone, Debug)]
pub struct ContactAttack {
    pub seed: u64,
    /// Small text messages sent as fast as the relay takes them.
    pub flood: usize,
    /// Extra submissions of one message's same sealed bytes.
    pub replays: usize,
    /// Times the same file (same name) is sent.
    pub same_file: usize,
}

impl Default for ContactAttack {
    fn default() -> Self {
        Self {
            seed: 1,
            flood: 200,
            replays: 20,
            same_file: 5,
        }
    }
}

/// What was sent, by class, and what the relay answered.
#[derive(Clone, Debug, Default)]
pub struct ContactReport {
    /// Messages the relay accepted, by attack class.
    pub accepted: BTreeMap<&'static str, usize>,
    /// Submissions the relay refused (over quota, too large …).
    pub refused: usize,
    /// File names sent with a real blob (what may land on the victim's
    /// disk, each inside its download directory).
    pub stored_names: Vec<String>,
}

impl ContactReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "accepted": self.accepted,
            "refused": self.refused,
            "stored_names": self.stored_names.len(),
        })
    }
}

/// A pinned sender with bad intentions.
pub struct HostileContact {
    identity: Identity,
    relay: RelayAddress,
}

impl std::fmt::Debug for HostileContact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileContact")
            .field("fingerprint", &self.identity.fingerprint().to_string())
            .field("relay", &self.relay.to_string())
            .finish()
    }
}

impl HostileContact {
    /// A contact whose keys follow from `seed`, living on `relay`.
    pub fn new(seed: u64, relay: RelayAddress) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c0de);
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        rng.fill_bytes(&mut a);
        rng.fill_bytes(&mut b);
        Self {
            identity: Identity::from_secret_bytes(&a, &b),
            relay,
        }
    }

    fn pin(&self) -> RelayPin {
        RelayPin {
            address: self.relay.host_port.clone(),
            key_hash: self.relay.pin.0,
        }
    }

    /// The card its victim pins.
    pub fn card(&self, now: u64) -> ContactCard {
        ContactCard::create(
            &self.identity,
            CardFields {
                name: "mallory".into(),
                created_at: now,
                relay: Some(self.pin()),
            },
        )
        .unwrap_or_else(|_| unreachable!("a fixed, valid card"))
    }

    fn seal(
        &self,
        rng: &mut ChaCha8Rng,
        to: &PublicIdentity,
        kind: Kind,
        content: &[u8],
        now: u64,
    ) -> (MessageId, Vec<u8>) {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let pin = self.pin();
        let req = SealRequest {
            kind,
            id: MessageId(id),
            created_at: now,
            expires_at: now + 3600,
            in_reply_to: None,
            recipients: std::slice::from_ref(to),
            reply_relay: Some(&pin),
            pad_for_len: Some(content.len() as u64),
        };
        let sealed = message::seal_to_vec(&self.identity, &req, content)
            .unwrap_or_else(|_| unreachable!("one valid recipient"));
        (MessageId(id), sealed)
    }

    /// Sends every attack to `victim` (whose mailbox is on the same relay).
    pub async fn run(
        &self,
        victim: &PublicIdentity,
        attack: &ContactAttack,
        now: u64,
    ) -> Result<ContactReport, ClientError> {
        let mut rng = ChaCha8Rng::seed_from_u64(attack.seed);
        let client = RelayClient::connect(&self.relay).await?;
        client.register(&self.identity).await?;
        let mailbox = MailboxId::of(victim.signing_bytes());
        let mut report = ContactReport::default();
        let expires = now + 3600;

        let submit = async |report: &mut ContactReport,
                            class: &'static str,
                            sealed: Vec<u8>|
               -> Result<(), ClientError> {
            match client.submit(mailbox, expires, sealed).await? {
                Submitted::Accepted { .. } => *report.accepted.entry(class).or_default() += 1,
                Submitted::Refused(_) => report.refused += 1,
            }
            Ok(())
        };

        // Manifests that do not parse, and names that must never be used.
        for junk in [&b"not a manifest"[..], &[0u8; 80][..], b"SPMF\x02"] {
            let (_, sealed) = self.seal(&mut rng, victim, Kind::FileManifest, junk, now);
            submit(&mut report, "malformed-manifest", sealed).await?;
        }
        for bad in [
            "../escape.txt",
            "/etc/passwd-x",
            "a/../../b",
            "",
            "a//b",
            ".",
        ] {
            let m = manifest(&mut rng, 10, bad);
            let (_, sealed) = self.seal(&mut rng, victim, Kind::FileManifest, &m.encode(), now);
            submit(&mut report, "invalid-name", sealed).await?;
        }
        // A terabyte announced (over any recipient's limit), and a file
        // whose blob never comes.
        for (size, name, class) in [
            (1u64 << 40, "terabyte.bin", "oversized-file"),
            (4 << 20, "never.bin", "never-uploaded"),
        ] {
            let m = manifest(&mut rng, size, name);
            let (_, sealed) = self.seal(&mut rng, victim, Kind::FileManifest, &m.encode(), now);
            submit(&mut report, class, sealed).await?;
        }
        // Ten bytes padded to a terabyte (a version 4 manifest): the
        // padding is downloaded too, so it counts against the limit.
        let mut m = manifest(&mut rng, 10, "padded.bin");
        m.layout = BlobLayout::padded(10, 1 << 40, DEFAULT_CHUNK_SIZE)
            .unwrap_or_else(|_| unreachable!("a valid layout"));
        let (_, sealed) = self.seal(&mut rng, victim, Kind::FileManifest, &m.encode(), now);
        submit(&mut report, "oversized-padding", sealed).await?;
        // Real files under names at and past the limits.
        let long = "n".repeat(255);
        let deep = format!("{}leaf", "d/".repeat(31));
        let mut names: Vec<(String, &'static str)> = vec![
            (long.clone(), "longest-name"),
            (long, "longest-name"),
            (".sealpost-part-trap".into(), "own-partial-name"),
            (deep, "deepest-tree"),
            (format!("{}.txt", "é".repeat(120)), "multibyte-name"),
        ];
        for _ in 0..attack.same_file {
            names.push(("same.txt".into(), "same-name"));
        }
        for (name, class) in names {
            let len = rng.gen_range(1..5000);
            let mut content = vec![0u8; len];
            rng.fill_bytes(&mut content);
            let key = BlobKey::random(&mut rng);
            let mut sealed_blob = Vec::new();
            let summary = blob::seal_blob(&key, DEFAULT_CHUNK_SIZE, &content[..], &mut sealed_blob)
                .map_err(ClientError::Io)?;
            let blob_id = BlobId::random(&mut rng);
            let piece = BlobPiece {
                blob_id,
                mailbox,
                total_len: sealed_blob.len() as u64,
                blob_hash: *summary.blob_hash.as_bytes(),
                expires_at: expires,
                offset: 0,
                data: sealed_blob,
            };
            if !matches!(client.blob_put(piece).await?, Ok((_, true))) {
                report.refused += 1;
                continue;
            }
            let m = FileManifest {
                blob_id,
                key,
                layout: summary.layout,
                plaintext_hash: summary.plaintext_hash,
                name: name.clone(),
                group: None,
            };
            let (_, sealed) = self.seal(&mut rng, victim, Kind::FileManifest, &m.encode(), now);
            submit(&mut report, class, sealed).await?;
            report.stored_names.push(name);
        }
        // Replays of one message.
        let (_, sealed) = self.seal(&mut rng, victim, Kind::Message, b"say it again", now);
        for _ in 0..=attack.replays {
            submit(&mut report, "replay", sealed.clone()).await?;
        }
        // A flood.
        for i in 0..attack.flood {
            let text = format!("flood {i}");
            let (_, sealed) = self.seal(&mut rng, victim, Kind::Message, text.as_bytes(), now);
            submit(&mut report, "flood", sealed).await?;
        }
        Ok(report)
    }
}

/// A manifest for a blob that is never uploaded.
fn manifest(rng: &mut ChaCha8Rng, size: u64, name: &str) -> FileManifest {
    let mut hash = [0u8; 32];
    rng.fill_bytes(&mut hash);
    FileManifest {
        blob_id: BlobId::random(rng),
        key: BlobKey::random(rng),
        layout: BlobLayout::new(size, DEFAULT_CHUNK_SIZE)
            .unwrap_or_else(|_| unreachable!("a valid chunk size")),
        plaintext_hash: blake3::Hash::from_bytes(hash),
        name: name.to_owned(),
        group: None,
    }
}
