//! Bounded, hand-written encoding helpers.
//!
//! Every sealpost format is encoded by hand so that the bytes a signature
//! covers are exactly the bytes documented in `docs/PROTOCOL.md`, never a
//! re-serialisation. Integers are big-endian. The [`Reader`] never reads past
//! its slice and every failure is a [`DecodeError`], never a panic.

use std::fmt;

/// Why a byte string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before `what` was complete.
    Truncated { what: &'static str },
    /// Bytes were left over after a complete structure.
    TrailingBytes { count: usize },
    /// The leading magic bytes were not the expected ones.
    BadMagic { expected: &'static str },
    /// The structure is of a version this implementation does not know.
    UnsupportedVersion { what: &'static str, version: u8 },
    /// A field has a value the format does not allow.
    Invalid {
        what: &'static str,
        why: &'static str,
    },
    /// The input is larger than the format's bound.
    TooLarge { what: &'static str, max: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { what } => write!(f, "input ends inside the {what}"),
            Self::TrailingBytes { count } => write!(f, "{count} unexpected bytes after the end"),
            Self::BadMagic { expected } => write!(f, "not a {expected} (wrong magic bytes)"),
            Self::UnsupportedVersion { what, version } => {
                write!(
                    f,
                    "{what} version {version} is not supported by this sealpost"
                )
            }
            Self::Invalid { what, why } => write!(f, "invalid {what}: {why}"),
            Self::TooLarge { what, max } => write!(f, "{what} is larger than {max} bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn cut_text(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A cursor over a byte slice that only ever moves forward.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// How many bytes have been consumed.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { what });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A list's length (u16), refused above `max` before anything is
    /// allocated for it; `what` names the list in the error.
    pub fn count(&mut self, what: &'static str, max: usize) -> Result<usize, DecodeError> {
        let n = self.u16("count")? as usize;
        if n > max {
            return Err(DecodeError::TooLarge { what, max });
        }
        Ok(n)
    }

    /// Reads a magic string and a version byte, and checks both.
    pub fn magic_and_version(
        &mut self,
        magic: &'static [u8; 4],
        expected: &'static str,
        version: u8,
    ) -> Result<(), DecodeError> {
        self.magic_and_versions(magic, expected, &[version])
            .map(|_| ())
    }

    /// [`Reader::magic_and_version`] for a structure with several known
    /// versions; returns the one found.
    pub fn magic_and_versions(
        &mut self,
        magic: &'static [u8; 4],
        expected: &'static str,
        versions: &[u8],
    ) -> Result<u8, DecodeError> {
        let got = self.take(4, expected)?;
        if got != magic {
            return Err(DecodeError::BadMagic { expected });
        }
        let v = self.u8("version")?;
        if !versions.contains(&v) {
            return Err(DecodeError::UnsupportedVersion {
                what: expected,
                version: v,
            });
        }
        Ok(v)
    }

    /// A flag byte that must be exactly 0 or 1.
    pub fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid {
                what,
                why: "flag must be 0 or 1",
            }),
        }
    }

    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { count }),
        }
    }
}

/// A UTF-8 string with a one-byte length prefix, checked for printable
/// characters so names cannot hide terminal escapes or newlines.
pub fn read_short_text(
    r: &mut Reader<'_>,
    what: &'static str,
    max: usize,
) -> Result<String, DecodeError> {
    let len = r.u8(what)? as usize;
    read_text_of_len(r, len, what, max)
}

pub fn read_text_of_len(
    r: &mut Reader<'_>,
    len: usize,
    what: &'static str,
    max: usize,
) -> Result<String, DecodeError> {
    if len == 0 {
        return Err(DecodeError::Invalid {
            what,
            why: "must not be empty",
        });
    }
    if len > max {
        return Err(DecodeError::TooLarge { what, max });
    }
    let bytes = r.take(len, what)?;
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid {
        what,
        why: "not UTF-8",
    })?;
    check_printable(s, what)?;
    Ok(s.to_owned())
}

/// Names and addresses must not carry control characters: they are shown
/// on terminals, and a newline or escape would let a peer forge output.
pub fn check_printable(s: &str, what: &'static str) -> Result<(), DecodeError> {
    if s.chars().any(char::is_control) {
        return Err(DecodeError::Invalid {
            what,
            why: "contains control characters",
        });
    }
    if s.trim() != s {
        return Err(DecodeError::Invalid {
            what,
            why: "has leading or trailing white space",
        });
    }
    Ok(())
}

/// Appends a one-byte length and the bytes; callers validated the length.
pub fn put_short(out: &mut Vec<u8>, bytes: &[u8]) {
    debug_assert!(bytes.len() <= u8::MAX as usize);
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// Check characters for a text form that people copy by hand (a contact
/// card, a relay address): five base32 characters of
/// BLAKE3-derive-key("sealpost v1 text check", text), appended after a
/// `.`. A changed, lost or swapped character fails the check (one chance
/// in 2^24 that it does not), so a typo is told as a typo, not as a forged
/// card or an intercepted relay.
pub fn text_check(text: &str) -> String {
    let h = blake3::derive_key("sealpost v1 text check", text.as_bytes());
    data_encoding::BASE32_NOPAD.encode(&h[..3])
}

/// `text` with its check characters: `text.CHECK`.
pub fn with_check(text: &str) -> String {
    format!("{text}.{}", text_check(text))
}

/// Check characters that do not match their text: a copying mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckMismatch;

/// Splits `text.CHECK` and verifies the check; text without one is
/// returned as it is (the form before checks existed).
pub fn strip_check(text: &str) -> Result<&str, CheckMismatch> {
    match text.rsplit_once('.') {
        Some((body, check))
            if check.len() == 5 && check.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            if text_check(body) == check.to_ascii_uppercase() {
                Ok(body)
            } else {
                Err(CheckMismatch)
            }
        }
        _ => Ok(text),
    }
}
