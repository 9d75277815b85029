//! Exit codes: one table ([`Exit`]) from which `--help` is generated and
//! against which a test holds the README's table; every failure carries
//! one of them and a class name listed with it.

use std::process::ExitCode;

use sealpost_agent::{AgentError, ReceiveError};
use sealpost_proto::OpenError;
use serde_json::json;

use crate::output::Out;

/// Every exit code of `sealpost`, with the `--json` classes that come
/// with it and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success,
    Error,
    Usage,
    Identity,
    Busy,
    Unreachable,
    NotFound,
    NotForMe,
    Malformed,
    Unsupported,
    BadSignature,
    UnknownSender,
    Tampered,
    Truncated,
    Expired,
    FromFuture,
    Replayed,
    TooLarge,
    NotDelivered,
    StillPending,
    ReceiptInvalid,
    KeyMismatch,
    PairingFailed,
    Interrupted,
}

impl Exit {
    pub const ALL: [Self; 24] = [
        Self::Success,
        Self::Error,
        Self::Usage,
        Self::Identity,
        Self::Busy,
        Self::Unreachable,
        Self::NotFound,
        Self::NotForMe,
        Self::Malformed,
        Self::Unsupported,
        Self::BadSignature,
        Self::UnknownSender,
        Self::Tampered,
        Self::Truncated,
        Self::Expired,
        Self::FromFuture,
        Self::Replayed,
        Self::TooLarge,
        Self::NotDelivered,
        Self::StillPending,
        Self::ReceiptInvalid,
        Self::KeyMismatch,
        Self::PairingFailed,
        Self::Interrupted,
    ];

    /// (code, `--json` classes, meaning).
    pub fn row(self) -> (u8, &'static [&'static str], &'static str) {
        match self {
            Self::Success => (0, &["closed-pipe"], "success (also when a reader of stdout closed the pipe early)"),
            Self::Error => (1, &["error", "io", "output-exists", "damaged"], "an error not listed below (I/O, database, an output file that exists)"),
            Self::Usage => (2, &["usage"], "the command line is wrong"),
            Self::Identity => (3, &["identity", "registration-refused"], "identity or contact problem: no identity yet, a key file others can read, an unknown contact, a refused card, no home relay set, a relay that does not register your key (`registration-refused`)"),
            Self::Busy => (4, &["busy"], "busy: another `sealpost agent` or `sync` runs for this home"),
            Self::Unreachable => (5, &["relay-unreachable", "queued-not-sent"], "the relay could not be reached; for `send` with no agent running: the message is queued but was not handed to the relay (`queued-not-sent`; it says why; `sealpost agent` or `sealpost sync` sends it)"),
            Self::NotFound => (6, &["not-found"], "no such message; for `read` of a received file: the file is no longer where it was saved"),
            Self::NotForMe => (10, &["not-for-me", "forwarded"], "not for you: not encrypted to your key, or re-encrypted to you from a message sealed for others (`forwarded`)"),
            Self::Malformed => (11, &["malformed"], "malformed"),
            Self::Unsupported => (12, &["unsupported-version"], "unsupported format version"),
            Self::BadSignature => (13, &["bad-signature"], "bad signature"),
            Self::UnknownSender => (14, &["unknown-sender"], "unknown sender (not one of your contacts)"),
            Self::Tampered => (15, &["tampered", "changed-on-disk"], "tampered (names the chunk, or the header); for `read` of a received file: it changed on disk since it was verified (`changed-on-disk`)"),
            Self::Truncated => (16, &["truncated"], "truncated"),
            Self::Expired => (17, &["expired", "no-expiry"], "expired, or (`open --strict`) no expiry"),
            Self::FromFuture => (18, &["from-future"], "created in the future beyond the 5-minute clock skew"),
            Self::Replayed => (19, &["replayed"], "replayed (already opened here)"),
            Self::TooLarge => (20, &["too-large"], "larger than a limit; for `send --file`: larger than a recipient's relay accepts (checked before the file is read; nothing is queued)"),
            Self::NotDelivered => (21, &["delivery-failed"], "not delivered: refused by a relay, rejected by the recipient, or expired without a receipt (`send --wait`; for a directory, every file that failed is named)"),
            Self::StillPending => (22, &["still-pending"], "no receipt yet when `send --wait` gave up (the message is still retransmitted)"),
            Self::ReceiptInvalid => (23, &["receipt-invalid"], "the receipt does not verify against the card (`receipt verify`)"),
            Self::KeyMismatch => (24, &["relay-key-mismatch"], "the server at a relay's address presented another key than the pinned one: perhaps an interception, a relay whose key was replaced, or a typo in the address; nothing was sent"),
            Self::PairingFailed => (25, &["pairing-not-confirmed", "pairing-gone", "pairing-timeout", "pairing-not-offered"], "pairing by code failed, and nothing was pinned: the other side did not prove it knows the code (a wrong code, or someone in the middle: `pairing-not-confirmed`); no invitation under that number, or it was used, expired or its other side left (`pairing-gone`); no one came in time (`pairing-timeout`); the relay does not offer pairing (`pairing-not-offered`)"),
            Self::Interrupted => (130, &["interrupted"], "interrupted (Ctrl-C or SIGTERM) during `send` or `sync`: what was queued or stored is kept, and `sealpost sync` or a running agent goes on"),
        }
    }

    pub fn code(self) -> u8 {
        self.row().0
    }
}

/// The `EXIT CODES` section of `--help`, from [`Exit`].
pub fn help_text() -> String {
    let mut out = String::from("EXIT CODES:");
    for e in Exit::ALL {
        let (code, _, meaning) = e.row();
        let mut line = format!("{code:>5}   ");
        let mut width = line.len();
        for word in meaning.split(' ') {
            if width + word.len() + 1 > 78 && width > 8 {
                out.push('\n');
                out.push_str(line.trim_end());
                line = " ".repeat(8);
                width = 8;
            }
            line.push_str(word);
            line.push(' ');
            width += word.len() + 1;
        }
        out.push('\n');
        out.push_str(line.trim_end());
    }
    out
}

/// The README's table, from [`Exit`].
#[cfg(test)]
fn readme_table() -> String {
    let mut out = String::from("| code | `--json` class | meaning |\n|---|---|---|\n");
    for e in Exit::ALL {
        let (code, classes, meaning) = e.row();
        let classes: Vec<String> = classes.iter().map(|c| format!("`{c}`")).collect();
        out.push_str(&format!(
            "| {code} | {} | {meaning} |\n",
            classes.join(", ")
        ));
    }
    out
}

/// An error on its way out, with the exit code and class name it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: Exit,
    pub class: &'static str,
    pub error: Option<anyhow::Error>,
}

impl Failure {
    pub fn usage(error: anyhow::Error) -> Self {
        Self {
            code: Exit::Usage,
            class: "usage",
            error: Some(error),
        }
    }

    pub fn contact(error: anyhow::Error) -> Self {
        Self {
            code: Exit::Identity,
            class: "identity",
            error: Some(error),
        }
    }

    /// The reader of our output went away (`sealpost open … | head`): stop
    /// quietly, as other Unix tools do.
    pub fn closed_pipe() -> Self {
        Self {
            code: Exit::Success,
            class: "closed-pipe",
            error: None,
        }
    }

    pub fn report(self, out: &Out) -> ExitCode {
        debug_assert!(
            self.code.row().1.contains(&self.class),
            "class {} is not listed with exit code {:?}",
            self.class,
            self.code
        );
        if let Some(e) = &self.error {
            let text = once_each(e);
            if out.json() {
                let v = json!({"error": text, "class": self.class, "exit_code": self.code.code()});
                crate::output::to_stderr(&format!("{v}\n"));
            } else {
                crate::output::to_stderr(&format!("sealpost: {text}\n"));
            }
        }
        ExitCode::from(self.code.code())
    }
}

/// An error and its causes, each said once: many errors already include
/// their cause in their own words (and also return it as their source),
/// so a cause whose text is already there is not repeated.
pub fn once_each(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if c.is_empty() || text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

/// Exit code and class for each way opening can fail.
pub fn open_class(e: &OpenError) -> (Exit, &'static str) {
    let code = match e {
        OpenError::NotForMe(_) => Exit::NotForMe,
        OpenError::Malformed(_) => Exit::Malformed,
        OpenError::UnsupportedVersion { .. } => Exit::Unsupported,
        OpenError::BadSignature => Exit::BadSignature,
        OpenError::UnknownSender { .. } => Exit::UnknownSender,
        OpenError::Tampered { .. } => Exit::Tampered,
        OpenError::Truncated { .. } => Exit::Truncated,
        OpenError::Expired { .. } | OpenError::NoExpiry => Exit::Expired,
        OpenError::FromFuture { .. } => Exit::FromFuture,
        OpenError::Replayed { .. } => Exit::Replayed,
        OpenError::TooLarge { .. } => Exit::TooLarge,
        _ => Exit::Error,
    };
    (code, e.class())
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        let (code, class) = match &e {
            AgentError::Db(_) | AgentError::Io { .. } => (Exit::Error, "io"),
            AgentError::OutputExists(_) => (Exit::Error, "output-exists"),
            _ => (Exit::Identity, "identity"),
        };
        Self {
            code,
            class,
            error: Some(e.into()),
        }
    }
}

impl From<ReceiveError> for Failure {
    fn from(e: ReceiveError) -> Self {
        match e {
            ReceiveError::Agent(a) => a.into(),
            ReceiveError::Open(o) => {
                let (code, class) = open_class(&o);
                Self {
                    code,
                    class,
                    error: Some(anyhow::Error::new(o).context("refused")),
                }
            }
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self {
            code: Exit::Error,
            class: "error",
            error: Some(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_table_is_the_exit_table() {
        let readme = include_str!("../../../README.md");
        let table = readme_table();
        assert!(
            readme.contains(&table),
            "README.md's exit code table differs from exit::Exit; it should read:\n{table}"
        );
    }

    #[test]
    fn codes_are_distinct_and_every_open_class_is_listed() {
        let mut seen = std::collections::HashSet::new();
        for e in Exit::ALL {
            assert!(seen.insert(e.code()), "{e:?} repeats a code");
        }
        // The sealed layer's classes each come with their exit code.
        for class in [
            "not-for-me",
            "forwarded",
            "malformed",
            "unsupported-version",
            "bad-signature",
            "unknown-sender",
            "tampered",
            "truncated",
            "expired",
            "from-future",
            "no-expiry",
            "replayed",
            "too-large",
            "io",
        ] {
            assert!(
                Exit::ALL.iter().any(|e| e.row().1.contains(&class)),
                "{class} is in no row"
            );
        }
    }

    #[test]
    fn help_lists_every_code_within_80_columns() {
        let h = help_text();
        for e in Exit::ALL {
            assert!(
                h.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{} ", e.code()))),
                "{e:?} missing from:\n{h}"
            );
        }
        assert!(h.lines().all(|l| l.len() <= 80), "{h}");
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::other("No space left on device");
        #[derive(Debug)]
        struct Writing(std::io::Error);
        impl std::fmt::Display for Writing {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "writing /x: {}", self.0)
            }
        }
        impl std::error::Error for Writing {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Writing(io)).context("cannot save the message");
        assert_eq!(
            once_each(&e),
            "cannot save the message: writing /x: No space left on device"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(once_each(&plain), "outer: inner");
    }
}
