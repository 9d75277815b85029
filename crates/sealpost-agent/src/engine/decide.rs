//! What becomes of one opened message: a pure decision over what the
//! agent's own records say about it ([`Facts`]), with no database, clock
//! or network. The engine reads the facts, calls [`decide`] and carries
//! the [`Decision`] out; the tests below hold every rule.
//!
//! The match over [`Kind`] is exhaustive: a new kind of message does not
//! compile until it is decided here (it cannot land in the inbox as user
//! content by default).

use sealpost_proto::{Kind, RejectReason};

use crate::outbox::DownloadState;

/// What the checks caught, as recorded in the detections log (`status`)
/// and matched by the test kit against a hostile relay's fault log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caught {
    /// The sealed layer refused the item; the class is
    /// [`sealpost_proto::OpenError::class`] (`tampered`, `truncated`, …).
    Sealed(&'static str),
    /// A copy of something already stored or acted on.
    Duplicate,
    /// Opened, but not acted on (a control message from a stranger, or a
    /// stale one).
    Discarded,
    /// A receipt or rejection that its signer did not sign, or that names
    /// messages we never sent them.
    ForgedReport,
    /// A relay refusal not signed by the relay's key, or naming another
    /// submission than the one it answers.
    ForgedRefusal,
    /// A receipt signed by its recipient about our message, naming
    /// another hash or length than was sent.
    ReceiptMismatch,
    /// A chunk of a file that did not authenticate.
    DamagedChunk,
    /// A relay sent fewer bytes of a whole blob than asked for.
    ShortBlobData,
    /// A relay claimed an uploaded blob does not match its hash, which
    /// was computed over the bytes sent.
    FalseHashMismatch,
}

impl Caught {
    /// The class as recorded.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sealed(class) => class,
            Self::Duplicate => "duplicate",
            Self::Discarded => "discarded",
            Self::ForgedReport => "forged-report",
            Self::ForgedRefusal => "forged-refusal",
            Self::ReceiptMismatch => "receipt-mismatch",
            Self::DamagedChunk => "damaged-chunk",
            Self::ShortBlobData => "short-blob-data",
            Self::FalseHashMismatch => "false-hash-mismatch",
        }
    }
}

/// Why a message's times are not acceptable now (from the freshness
/// policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    Expired,
    FromTheFuture,
    NoExpiry,
}

/// An inbox entry from this message's sender with this message's id
/// (another sender's message under the same id is another message: each
/// sender chooses its own ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A message.
    Message,
    /// A file, and where its download stands (`None`: no download row, a
    /// manifest that could not be read).
    File(Option<DownloadState>),
}

/// Whether a file manifest can be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCheck {
    Fits,
    /// It does not decode.
    Malformed,
    /// Larger than this agent takes (`--max-file`).
    TooLarge,
}

/// What the agent knows about one opened message, read before deciding.
///
/// `stored`, `in_batch` and `file` are consulted only for content
/// ([`Kind::Message`], [`Kind::FileManifest`]); the engine need not read
/// them for control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub kind: Kind,
    /// The sender is a contact pinned with exactly this identity.
    pub contact: bool,
    /// The header's times, judged by the policy now.
    pub fresh: Result<(), Stale>,
    /// The sender's id is in the replay cache: a control message already
    /// acted on, or content already opened and since forgotten.
    pub seen: bool,
    /// This sender's message with this id, if in the inbox.
    pub stored: Option<Stored>,
    /// The same sender's same id came earlier in this fetched batch.
    pub in_batch: bool,
    /// For a file manifest.
    pub file: Option<FileCheck>,
}

/// Why a message is dropped without any answer to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// A control message already acted on (a relay replaying it).
    ControlReplayed,
    /// A control message whose times are not acceptable.
    ControlStale(Stale),
    /// A control message from someone who is not a contact.
    ControlFromStranger,
    /// The same sender's same id earlier in this batch.
    RepeatedInBatch,
    /// Content opened before and since forgotten (its sender and id are
    /// in the replay cache).
    Replayed,
}

impl Dropped {
    pub fn caught(self) -> Caught {
        match self {
            Self::ControlReplayed | Self::RepeatedInBatch | Self::Replayed => Caught::Duplicate,
            Self::ControlStale(_) | Self::ControlFromStranger => Caught::Discarded,
        }
    }
}

/// What to do with one opened message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// New content: store it durably; its receipt (or, for a file, its
    /// download) is owed.
    Store,
    /// A receipt or rejection from a contact: verify it and apply it to
    /// the outbox, then remember its id.
    ApplyReport,
    /// A repair request or repair from a contact: act on it, then
    /// remember its id.
    ApplyRepair,
    /// A message stored before, from the same sender: its receipt again.
    ReceiptAgain,
    /// A file stored before, from the same sender. `retry`: its download
    /// had stopped (repairing or failed) and starts again, keeping every
    /// good chunk, since the sender's blob may be back at the relay.
    /// `receipt`: it is done, so its receipt goes again.
    FileAgain { retry: bool, receipt: bool },
    /// Refused with a signed rejection to the sender.
    Reject(RejectReason),
    /// Acknowledged and recorded as caught; nothing sent.
    Drop(Dropped),
}

impl Decision {
    /// What this decision records as caught, if anything.
    pub fn caught(self) -> Option<Caught> {
        match self {
            Self::ReceiptAgain | Self::FileAgain { .. } => Some(Caught::Duplicate),
            Self::Drop(d) => Some(d.caught()),
            Self::Store | Self::ApplyReport | Self::ApplyRepair | Self::Reject(_) => None,
        }
    }
}

fn reject_reason(s: Stale) -> RejectReason {
    match s {
        Stale::Expired => RejectReason::Expired,
        Stale::FromTheFuture => RejectReason::FromTheFuture,
        Stale::NoExpiry => RejectReason::NoExpiry,
    }
}

/// Decides what becomes of one opened message.
pub fn decide(f: &Facts) -> Decision {
    match f.kind {
        Kind::Receipt | Kind::Rejection | Kind::RepairRequest | Kind::Repair => {
            // Control messages are acted on once: a relay replaying an old
            // receipt or repair request changes nothing (and cannot make
            // us upload the same chunks again and again).
            if !f.contact {
                return Decision::Drop(Dropped::ControlFromStranger);
            }
            if f.seen {
                return Decision::Drop(Dropped::ControlReplayed);
            }
            if let Err(s) = f.fresh {
                return Decision::Drop(Dropped::ControlStale(s));
            }
            match f.kind {
                Kind::Receipt | Kind::Rejection => Decision::ApplyReport,
                _ => Decision::ApplyRepair,
            }
        }
        Kind::Message | Kind::FileManifest => {
            // A copy of something already stored: its receipt again.
            match f.stored {
                Some(Stored::Message) => return Decision::ReceiptAgain,
                Some(Stored::File(state)) => {
                    return Decision::FileAgain {
                        retry: matches!(
                            state,
                            Some(DownloadState::Repairing | DownloadState::Failed)
                        ),
                        receipt: state == Some(DownloadState::Done),
                    }
                }
                None => {}
            }
            if f.in_batch {
                return Decision::Drop(Dropped::RepeatedInBatch);
            }
            if !f.contact {
                return Decision::Reject(RejectReason::NotAContact);
            }
            if let Err(s) = f.fresh {
                return Decision::Reject(reject_reason(s));
            }
            if f.seen {
                return Decision::Drop(Dropped::Replayed);
            }
            // A file is judged by its manifest before anything is fetched:
            // one that cannot be read, or that is larger than this agent
            // takes, is refused now (the sender is told, signed), instead
            // of waiting in the inbox without a receipt until it expires.
            match (f.kind, f.file) {
                (Kind::FileManifest, Some(FileCheck::Malformed) | None) => {
                    Decision::Reject(RejectReason::Malformed)
                }
                (Kind::FileManifest, Some(FileCheck::TooLarge)) => {
                    Decision::Reject(RejectReason::TooLarge)
                }
                _ => Decision::Store,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_message(kind: Kind) -> Facts {
        Facts {
            kind,
            contact: true,
            fresh: Ok(()),
            seen: false,
            stored: None,
            in_batch: false,
            file: (kind == Kind::FileManifest).then_some(FileCheck::Fits),
        }
    }

    const CONTENT: [Kind; 2] = [Kind::Message, Kind::FileManifest];
    const CONTROL: [Kind; 4] = [
        Kind::Receipt,
        Kind::Rejection,
        Kind::RepairRequest,
        Kind::Repair,
    ];
    const STALE: [Stale; 3] = [Stale::Expired, Stale::FromTheFuture, Stale::NoExpiry];

    #[test]
    fn new_content_from_a_contact_is_stored() {
        for k in CONTENT {
            assert_eq!(decide(&new_message(k)), Decision::Store, "{k:?}");
        }
    }

    #[test]
    fn content_from_a_stranger_is_rejected_signed() {
        for k in CONTENT {
            let f = Facts {
                contact: false,
                ..new_message(k)
            };
            assert_eq!(decide(&f), Decision::Reject(RejectReason::NotAContact));
            assert_eq!(decide(&f).caught(), None);
        }
    }

    #[test]
    fn stale_content_is_rejected_with_its_reason() {
        for k in CONTENT {
            for (s, r) in STALE.into_iter().zip([
                RejectReason::Expired,
                RejectReason::FromTheFuture,
                RejectReason::NoExpiry,
            ]) {
                let f = Facts {
                    fresh: Err(s),
                    ..new_message(k)
                };
                assert_eq!(decide(&f), Decision::Reject(r), "{k:?} {s:?}");
            }
        }
    }

    #[test]
    fn a_stranger_is_told_before_staleness() {
        // Not a contact is the first answer: a stranger's stale message
        // says "not a contact", which is what they need to know.
        let f = Facts {
            contact: false,
            fresh: Err(Stale::Expired),
            ..new_message(Kind::Message)
        };
        assert_eq!(decide(&f), Decision::Reject(RejectReason::NotAContact));
    }

    #[test]
    fn a_stored_message_gets_its_receipt_again_even_if_stale_now() {
        // The receipt may have been lost: the sender retransmits until it
        // has one, even after the message is past its expiry here.
        let f = Facts {
            stored: Some(Stored::Message),
            fresh: Err(Stale::Expired),
            seen: true,
            ..new_message(Kind::Message)
        };
        assert_eq!(decide(&f), Decision::ReceiptAgain);
        assert_eq!(decide(&f).caught(), Some(Caught::Duplicate));
    }

    #[test]
    fn a_stored_file_again_retries_a_stopped_download_or_receipts_a_done_one() {
        let again = |s| {
            decide(&Facts {
                stored: Some(Stored::File(s)),
                ..new_message(Kind::FileManifest)
            })
        };
        assert_eq!(
            again(Some(DownloadState::Downloading)),
            Decision::FileAgain {
                retry: false,
                receipt: false
            }
        );
        for s in [DownloadState::Repairing, DownloadState::Failed] {
            assert_eq!(
                again(Some(s)),
                Decision::FileAgain {
                    retry: true,
                    receipt: false
                }
            );
        }
        assert_eq!(
            again(Some(DownloadState::Done)),
            Decision::FileAgain {
                retry: false,
                receipt: true
            }
        );
        assert_eq!(
            again(None),
            Decision::FileAgain {
                retry: false,
                receipt: false
            }
        );
    }

    #[test]
    fn a_repeat_within_one_batch_is_a_duplicate() {
        let f = Facts {
            in_batch: true,
            ..new_message(Kind::Message)
        };
        assert_eq!(decide(&f), Decision::Drop(Dropped::RepeatedInBatch));
        assert_eq!(decide(&f).caught(), Some(Caught::Duplicate));
    }

    #[test]
    fn content_replayed_after_it_was_forgotten_is_dropped() {
        let f = Facts {
            seen: true,
            ..new_message(Kind::Message)
        };
        assert_eq!(decide(&f), Decision::Drop(Dropped::Replayed));
    }

    #[test]
    fn a_file_is_judged_by_its_manifest_before_it_is_fetched() {
        for (c, r) in [
            (Some(FileCheck::Malformed), RejectReason::Malformed),
            (None, RejectReason::Malformed),
            (Some(FileCheck::TooLarge), RejectReason::TooLarge),
        ] {
            let f = Facts {
                file: c,
                ..new_message(Kind::FileManifest)
            };
            assert_eq!(decide(&f), Decision::Reject(r));
        }
    }

    #[test]
    fn control_messages_are_acted_on_once_and_only_from_contacts() {
        for k in CONTROL {
            let act = if matches!(k, Kind::Receipt | Kind::Rejection) {
                Decision::ApplyReport
            } else {
                Decision::ApplyRepair
            };
            assert_eq!(decide(&new_message(k)), act, "{k:?}");
            let replayed = Facts {
                seen: true,
                ..new_message(k)
            };
            assert_eq!(decide(&replayed), Decision::Drop(Dropped::ControlReplayed));
            assert_eq!(decide(&replayed).caught(), Some(Caught::Duplicate));
            let stranger = Facts {
                contact: false,
                ..new_message(k)
            };
            // A stranger gets no signed answer to a control message (it
            // would be a reflection: answers to forged receipts).
            assert_eq!(
                decide(&stranger),
                Decision::Drop(Dropped::ControlFromStranger)
            );
            for s in STALE {
                let stale = Facts {
                    fresh: Err(s),
                    ..new_message(k)
                };
                assert_eq!(decide(&stale), Decision::Drop(Dropped::ControlStale(s)));
                assert_eq!(decide(&stale).caught(), Some(Caught::Discarded));
            }
        }
    }

    #[test]
    fn control_messages_ignore_the_inbox() {
        // A receipt's id can never make it a "duplicate" of content.
        for k in CONTROL {
            let f = Facts {
                stored: Some(Stored::Message),
                in_batch: true,
                ..new_message(k)
            };
            assert!(
                matches!(decide(&f), Decision::ApplyReport | Decision::ApplyRepair),
                "{k:?}"
            );
        }
    }
}
