//! How results reach the user: human text or `--json`.

use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

use crate::exit::Failure;

#[derive(Debug)]
pub struct Out {
    json: bool,
    quiet: bool,
}

impl Out {
    pub fn new(json: bool) -> Self {
        Self { json, quiet: false }
    }

    /// An output that prints nothing (a step inside another command).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// Prints a result on stdout: JSON, or the human text.
    pub fn report(&self, json: Value, human: impl FnOnce() -> String) -> Result<(), Failure> {
        if self.quiet {
            return Ok(());
        }
        let text = if self.json {
            format!("{json}\n")
        } else {
            human()
        };
        let mut stdout = io::stdout().lock();
        stdout
            .write_all(text.as_bytes())
            .and_then(|_| stdout.flush())
            .map_err(stdout_error)
    }

    /// Like `report`, but when stdout carries content the report goes to
    /// stderr so it never mixes with the data.
    pub fn side_report(
        &self,
        stdout_has_data: bool,
        json: Value,
        human: impl FnOnce() -> String,
    ) -> Result<(), Failure> {
        if !stdout_has_data {
            return self.report(json, human);
        }
        if self.json {
            to_stderr(&format!("{json}\n"));
        } else {
            to_stderr(&human());
        }
        Ok(())
    }
}

/// Writes `text` to stderr, dropping what cannot be written: a closed
/// stderr (`sealpost sync 2>&1 | head -1`, a logger that died) must never
/// stop the work (Rust's `eprintln!` panics then).
pub fn to_stderr(text: &str) {
    let mut e = io::stderr().lock();
    let _ = e.write_all(text.as_bytes()).and_then(|_| e.flush());
}

/// stderr for logs: a write to a closed stderr counts as done, so logging
/// neither fails nor panics (see [`to_stderr`]).
#[derive(Debug, Clone, Copy)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match io::stderr().write(buf) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(buf.len()),
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match io::stderr().flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }
}

pub fn stdout_error(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure::closed_pipe()
    } else {
        anyhow::Error::new(e)
            .context("cannot write to stdout")
            .into()
    }
}

/// Unix seconds as an RFC 3339 UTC time.
pub fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}
