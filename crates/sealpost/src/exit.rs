//! Exit codes: one per failure class, documented in `--help` and the README.

use std::process::ExitCode;

use sealpost_agent::{AgentError, ReceiveError};
use sealpost_proto::{NotForMeReason, OpenError};
use serde_json::json;

use crate::output::Out;

/// An error on its way out, with the exit code and class name it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub class: &'static str,
    pub error: Option<anyhow::Error>,
}

impl Failure {
    pub fn usage(error: anyhow::Error) -> Self {
        Self {
            code: 2,
            class: "usage",
            error: Some(error),
        }
    }

    pub fn contact(error: anyhow::Error) -> Self {
        Self {
            code: 3,
            class: "identity",
            error: Some(error),
        }
    }

    /// The reader of our output went away (`sealpost open … | head`): stop
    /// quietly, as other Unix tools do.
    pub fn closed_pipe() -> Self {
        Self {
            code: 0,
            class: "closed-pipe",
            error: None,
        }
    }

    pub fn report(self, out: &Out) -> ExitCode {
        if let Some(e) = &self.error {
            if out.json() {
                let v =
                    json!({"error": format!("{e:#}"), "class": self.class, "exit_code": self.code});
                eprintln!("{v}");
            } else {
                eprintln!("sealpost: {e:#}");
            }
        }
        ExitCode::from(self.code)
    }
}

/// Exit code and class for each way opening can fail.
pub fn open_class(e: &OpenError) -> (u8, &'static str) {
    match e {
        OpenError::NotForMe(NotForMeReason::NoMatchingKey) => (10, "not-for-me"),
        OpenError::NotForMe(NotForMeReason::NotInSignedRecipients) => (10, "forwarded"),
        OpenError::Malformed(_) => (11, "malformed"),
        OpenError::UnsupportedVersion { .. } => (12, "unsupported-version"),
        OpenError::BadSignature => (13, "bad-signature"),
        OpenError::UnknownSender { .. } => (14, "unknown-sender"),
        OpenError::Tampered { .. } => (15, "tampered"),
        OpenError::Truncated { .. } => (16, "truncated"),
        OpenError::Expired { .. } => (17, "expired"),
        OpenError::FromFuture { .. } => (18, "from-future"),
        OpenError::Replayed { .. } => (19, "replayed"),
        OpenError::TooLarge { .. } => (20, "too-large"),
        _ => (1, "io"),
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        let (code, class) = match &e {
            AgentError::Db(_) | AgentError::Io { .. } => (1, "io"),
            _ => (3, "identity"),
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
            code: 1,
            class: "error",
            error: Some(e),
        }
    }
}
