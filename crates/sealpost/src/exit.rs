//! Exit codes: one per failure class, documented in `--help` and the README.

use std::process::ExitCode;

use sealpost_agent::{AgentError, ReceiveError};
use sealpost_proto::OpenError;
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
            let text = once_each(e);
            if out.json() {
                let v = json!({"error": text, "class": self.class, "exit_code": self.code});
                crate::output::to_stderr(&format!("{v}\n"));
            } else {
                crate::output::to_stderr(&format!("sealpost: {text}\n"));
            }
        }
        ExitCode::from(self.code)
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
pub fn open_class(e: &OpenError) -> (u8, &'static str) {
    let code = match e {
        OpenError::NotForMe(_) => 10,
        OpenError::Malformed(_) => 11,
        OpenError::UnsupportedVersion { .. } => 12,
        OpenError::BadSignature => 13,
        OpenError::UnknownSender { .. } => 14,
        OpenError::Tampered { .. } => 15,
        OpenError::Truncated { .. } => 16,
        OpenError::Expired { .. } | OpenError::NoExpiry => 17,
        OpenError::FromFuture { .. } => 18,
        OpenError::Replayed { .. } => 19,
        OpenError::TooLarge { .. } => 20,
        _ => 1,
    };
    (code, e.class())
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        let (code, class) = match &e {
            AgentError::Db(_) | AgentError::Io { .. } => (1, "io"),
            AgentError::OutputExists(_) => (1, "output-exists"),
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

#[cfg(test)]
mod tests {
    use super::*;

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
