//! Typed views of a home's state, for whoever shows it: the CLI renders
//! them as text and (serialized as they are) as `--json`; the test kit and
//! a future status page read the same. Times are RFC 3339 (UTC, seconds),
//! hashes lower-case hex, sizes bytes. Receipt checking lives here too:
//! a receipt file verified against a card is a view of what it proves.

use serde::Serialize;

use sealpost_proto::delivery::State;
use sealpost_proto::manifest::Group;
use sealpost_proto::report::{Entries, Report, ReportError};
use sealpost_proto::{MessageId, PublicIdentity};

use crate::outbox::{DeliveryRow, Detection, Download, DownloadState, InboxEntry, OutboxEntry};
use crate::Agent;

/// A unix time in seconds, as RFC 3339.
pub fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// A unix time in milliseconds, as RFC 3339 (to the second).
pub fn time_ms(ms: u64) -> String {
    time(ms / 1000)
}

pub use sealpost_proto::hex;

/// A whole percentage that says 100 only when it is all there.
pub fn percent(done: u64, total: u64) -> u64 {
    if total == 0 || done >= total {
        return 100;
    }
    // In 128 bits: `done * 100` overflows 64 for sizes past 184 PB.
    ((u128::from(done) * 100 / u128::from(total)) as u64).min(99)
}

/// A file's place in a directory sent at once.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupView {
    pub id: String,
    pub index: u32,
    pub count: u32,
}

impl GroupView {
    pub fn of(g: Option<&Group>) -> Option<Self> {
        g.map(|g| Self {
            id: hex(&g.id),
            index: g.index,
            count: g.count,
        })
    }
}

/// One recipient's delivery of a sent message.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    pub to: String,
    pub relay: String,
    /// `queued`, `submitted`, `delivered` or `failed`.
    pub state: &'static str,
    #[serde(skip)]
    pub state_kind: State,
    /// When the state last changed.
    pub since: String,
    pub submissions: u32,
    /// When the next attempt is due (not for a final state).
    pub next_attempt: Option<String>,
    /// Why it failed, as a class (`expired`, `rejected:not-a-contact`, …).
    pub failure: Option<String>,
    /// Why it failed, in words.
    pub reason: Option<String>,
    /// The last error met on the way (the relay unreachable, …).
    pub last_error: Option<String>,
    /// For a delivery at your relay (`forwarding`): where it is, as your
    /// relay last said (still in its queue and why, or handed on); null
    /// otherwise.
    pub hop: Option<String>,
    /// Holds the recipient's verified receipt.
    pub receipt: bool,
    /// Holds the recipient's verified signed rejection.
    pub signed_rejection: bool,
    /// For a file: bytes of its blob at the recipient's relay.
    pub uploaded: u64,
    /// For a file: how much of it is at the recipient's relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded_percent: Option<u64>,
    /// For a file: (bytes of the file at the relay, the file's size).
    #[serde(skip)]
    pub upload: Option<(u64, u64)>,
    #[serde(skip)]
    pub next_at_ms: u64,
}

impl DeliveryView {
    pub fn of(e: &OutboxEntry, d: &DeliveryRow) -> Self {
        let upload = upload_share(e, d);
        let state = d.delivery.state;
        Self {
            to: d.name.clone(),
            relay: d.relay.clone(),
            state: state.name(),
            state_kind: state,
            since: time_ms(d.delivery.changed_at),
            submissions: d.delivery.submissions,
            next_attempt: (!state.is_final()).then(|| time_ms(d.delivery.next_at)),
            failure: d.delivery.failure.as_ref().map(|f| f.code()),
            reason: d.delivery.failure.as_ref().map(|f| f.describe()),
            last_error: d.last_error.clone(),
            hop: (state == State::Forwarding)
                .then(|| d.hop.clone())
                .flatten(),
            receipt: d.receipt.is_some() && state == State::Delivered,
            signed_rejection: d.receipt.is_some() && state == State::Failed,
            uploaded: d.uploaded,
            uploaded_percent: upload.map(|(done, total)| percent(done, total)),
            upload,
            next_at_ms: d.delivery.next_at,
        }
    }
}

/// For a file: (bytes of the file at the relay, the file's size).
fn upload_share(e: &OutboxEntry, d: &DeliveryRow) -> Option<(u64, u64)> {
    if e.kind != "file-manifest" {
        return None;
    }
    let total = e.sent.content_len;
    let layout =
        sealpost_proto::blob::BlobLayout::new(total, sealpost_proto::blob::DEFAULT_CHUNK_SIZE)
            .ok()?;
    Some((layout.plain_before(d.uploaded), total))
}

/// A sent message and where each of its deliveries stands.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxView {
    pub id: String,
    pub kind: String,
    pub summary: String,
    pub created: String,
    pub expires: String,
    pub content_len: u64,
    pub content_blake3: String,
    pub deliveries: Vec<DeliveryView>,
    pub group: Option<GroupView>,
}

impl OutboxView {
    pub fn of(e: &OutboxEntry, group: Option<&Group>) -> Self {
        Self {
            id: e.id.to_string(),
            kind: e.kind.clone(),
            summary: e.summary.clone(),
            created: time_ms(e.created_ms),
            expires: time_ms(e.expires_ms),
            content_len: e.sent.content_len,
            content_blake3: hex(&e.sent.content_hash),
            deliveries: e
                .deliveries
                .iter()
                .map(|d| DeliveryView::of(e, d))
                .collect(),
            group: GroupView::of(group),
        }
    }
}

/// A received file's download.
#[derive(Debug, Clone, Serialize)]
pub struct FileView {
    pub name: String,
    pub size: u64,
    pub blake3: String,
    /// `downloading`, `repairing`, `failed` or `done`.
    pub state: &'static str,
    /// Where it was saved (once done).
    pub path: Option<String>,
    pub chunks_done: u64,
    pub chunks: u64,
    pub percent: u64,
    pub damaged_chunks: usize,
    pub error: Option<String>,
}

impl FileView {
    pub fn of(d: &Download) -> Self {
        let chunks = d.size.div_ceil(d.chunk_size.max(1) as u64).max(1);
        let done = d.next_chunk.min(chunks);
        Self {
            name: d.name.clone(),
            size: d.size,
            blake3: hex(&d.plaintext_hash),
            state: d.state.name(),
            path: d.final_path.clone(),
            chunks_done: done,
            chunks,
            percent: if d.state == DownloadState::Done {
                100
            } else {
                percent(done, chunks)
            },
            damaged_chunks: d.bad.len(),
            error: d.error.clone(),
        }
    }
}

/// A received message.
#[derive(Debug, Clone, Serialize)]
pub struct InboxView {
    pub id: String,
    /// The sender's contact name, or `(not a contact)`.
    pub from: String,
    pub kind: String,
    pub created: String,
    pub received: String,
    pub expires: String,
    pub content_len: u64,
    pub content_blake3: String,
    pub read: bool,
    /// When it was archived (out of the list, still readable).
    pub archived: Option<String>,
    pub group: Option<GroupView>,
    /// For a file: its download.
    pub file: Option<FileView>,
}

impl InboxView {
    pub fn of(agent: &Agent, e: &InboxEntry) -> Self {
        Self {
            id: e.id.to_string(),
            from: sender_name(agent, &e.sender),
            kind: e.kind.clone(),
            created: time(e.created_at),
            received: time_ms(e.received_ms),
            expires: time(e.expires_at),
            content_len: e.content_len,
            content_blake3: hex(&e.content_hash),
            read: e.read_ms.is_some(),
            archived: e.archived_ms.map(time_ms),
            group: GroupView::of(
                agent
                    .db()
                    .group_of_received(&e.key())
                    .ok()
                    .flatten()
                    .as_ref(),
            ),
            file: agent
                .db()
                .download(&e.key())
                .ok()
                .flatten()
                .map(|d| FileView::of(&d)),
        }
    }
}

/// The contact name of a signing key, or `(not a contact)`.
pub fn sender_name(agent: &Agent, key: &[u8; 32]) -> String {
    match agent.db().contact_by_key(key) {
        Ok(Some(c)) => c.name,
        _ => "(not a contact)".to_owned(),
    }
}

/// Something a check caught and did not accept.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionView {
    pub at: String,
    /// `tampered`, `duplicate`, `receipt-mismatch`, … (see PROTOCOL.md).
    pub class: String,
    pub item: String,
}

impl DetectionView {
    pub fn of(d: &Detection) -> Self {
        Self {
            at: time_ms(d.at_ms),
            class: d.class.clone(),
            item: d.item.clone(),
        }
    }
}

/// What a verified receipt or signed rejection says of one message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VerifiedEntry {
    /// The signer stored the message, read it back and hashed it.
    Receipt {
        id: String,
        content_blake3: String,
        content_len: u64,
        stored: String,
        /// Whom the report was issued to (their signing key).
        subject: String,
    },
    /// The signer refused the message, for `reason`.
    Rejection {
        id: String,
        reason: &'static str,
        subject: String,
    },
}

/// Why a receipt file proves nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptCheckError {
    #[error(transparent)]
    Unreadable(#[from] ReportError),
    #[error("no receipt here is signed by {name} ({fingerprint})")]
    NotSignedBy { name: String, fingerprint: String },
    #[error("the receipt is genuine but does not name message {0}")]
    DoesNotName(MessageId),
}

/// Checks the receipts and signed rejections in `bytes` (their text
/// form, one per line, or one in binary) against `signer`: the entries of
/// every report `signer` signed. With `want`, one of them must name that
/// message. Reports signed by others are passed over.
pub fn verify_receipts(
    bytes: &[u8],
    signer: &PublicIdentity,
    signer_name: &str,
    want: Option<MessageId>,
) -> Result<Vec<VerifiedEntry>, ReceiptCheckError> {
    let text = std::str::from_utf8(bytes).ok();
    let reports: Vec<Result<Report, ReportError>> = match text {
        Some(t)
            if t.trim_start()
                .starts_with(sealpost_proto::report::TEXT_PREFIX) =>
        {
            t.lines()
                .filter(|l| !l.trim().is_empty())
                .map(Report::from_text)
                .collect()
        }
        _ => vec![Report::decode(bytes)],
    };
    let mut verified = Vec::new();
    for r in reports {
        let r = r?;
        if r.signed_by(signer) {
            verified.push(r);
        }
    }
    if verified.is_empty() {
        return Err(ReceiptCheckError::NotSignedBy {
            name: signer_name.to_owned(),
            fingerprint: signer.fingerprint().to_string(),
        });
    }
    if let Some(w) = want {
        let names = |r: &Report| match r.entries() {
            Entries::Receipt(l) => l.iter().any(|e| e.id == w),
            Entries::Rejection(l) => l.iter().any(|e| e.id == w),
        };
        if !verified.iter().any(names) {
            return Err(ReceiptCheckError::DoesNotName(w));
        }
    }
    let mut entries = Vec::new();
    for r in &verified {
        let subject = hex(r.subject_bytes());
        match r.entries() {
            Entries::Receipt(list) => entries.extend(list.iter().map(|e| VerifiedEntry::Receipt {
                id: e.id.to_string(),
                content_blake3: hex(&e.content_hash),
                content_len: e.content_len,
                stored: time(e.stored_at),
                subject: subject.clone(),
            })),
            Entries::Rejection(list) => {
                entries.extend(list.iter().map(|e| VerifiedEntry::Rejection {
                    id: e.id.to_string(),
                    reason: e.reason.name(),
                    subject: subject.clone(),
                }))
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealpost_proto::report::{ReceiptEntry, RejectReason, RejectionEntry};
    use sealpost_proto::Identity;

    fn id(n: u8) -> Identity {
        Identity::from_secret_bytes(&[n; 32], &[n ^ 0x55; 32])
    }

    /// A receipt file is checked against the signer's card: its entries
    /// when genuine, typed errors when it is not signed by them, does not
    /// name the message asked about, or does not parse; reports by others
    /// in the same file are passed over.
    #[test]
    fn receipts_are_verified_against_the_signers_card() {
        let (alice, bob, carol) = (id(1), id(2), id(3));
        let m = MessageId([7; 16]);
        let receipt = Report::sign(
            &bob,
            alice.public(),
            1_750_000_000,
            Entries::Receipt(vec![ReceiptEntry {
                id: m,
                content_hash: [9; 32],
                content_len: 42,
                stored_at: 1_750_000_000,
            }]),
        )
        .expect("sign");
        let rejection = Report::sign(
            &carol,
            alice.public(),
            1_750_000_000,
            Entries::Rejection(vec![RejectionEntry {
                id: MessageId([8; 16]),
                reason: RejectReason::NotAContact,
            }]),
        )
        .expect("sign");
        let file = format!("{}\n\n{}\n", rejection.to_text(), receipt.to_text());
        let got = verify_receipts(file.as_bytes(), bob.public(), "bob", Some(m)).expect("valid");
        assert_eq!(
            got,
            vec![VerifiedEntry::Receipt {
                id: m.to_string(),
                content_blake3: hex(&[9; 32]),
                content_len: 42,
                stored: "2025-06-15T15:06:40Z".into(),
                subject: hex(alice.public().signing_bytes()),
            }]
        );
        let json = serde_json::to_value(&got[0]).expect("json");
        assert_eq!(json["kind"], "receipt");
        // The binary form reads too.
        assert_eq!(
            verify_receipts(receipt.as_bytes(), bob.public(), "bob", None).expect("valid"),
            got
        );
        let carols = verify_receipts(file.as_bytes(), carol.public(), "carol", None).expect("ok");
        assert!(matches!(
            &carols[..],
            [VerifiedEntry::Rejection {
                reason: "not-a-contact",
                ..
            }]
        ));
        assert!(matches!(
            verify_receipts(file.as_bytes(), alice.public(), "alice", None),
            Err(ReceiptCheckError::NotSignedBy { .. })
        ));
        assert!(matches!(
            verify_receipts(
                file.as_bytes(),
                bob.public(),
                "bob",
                Some(MessageId([1; 16]))
            ),
            Err(ReceiptCheckError::DoesNotName(_))
        ));
        assert!(matches!(
            verify_receipts(b"not a receipt", bob.public(), "bob", None),
            Err(ReceiptCheckError::Unreadable(_))
        ));
    }

    #[test]
    fn percentages_say_100_only_when_all_is_there() {
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(999, 1000), 99);
        assert_eq!(percent(1000, 1000), 100);
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(u64::MAX - 1, u64::MAX), 99);
    }
}
