//! Where a received file lands: a name in the download directory that takes nothing over, its tree rebuilt inside it.

use super::*;

/// The longest file name (bytes) the file systems sealpost writes to take.
pub const NAME_MAX: usize = 255;

/// How many names [`place`] tries for one file: `name`, `name (1)`, …
pub const MAX_NAME_TRIES: usize = 1000;

/// The prefix of the agent's own files in a download directory (partial
/// files); a received file's name never starts with it.
pub const OWN_PREFIX: &str = ".sealpost-";

/// `s` cut to at most `max` bytes, on a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The names to try, in order, for a received file called `name`: `name`,
/// then `name (1)` … `name (999)` (before the extension), each cut to fit
/// [`NAME_MAX`] bytes. A name starting with [`OWN_PREFIX`] (which a sender
/// could use to reach a partial file) gets a leading `_`.
pub fn candidate_names(name: &str) -> impl Iterator<Item = String> + '_ {
    let owned = name.starts_with(OWN_PREFIX);
    let (stem, ext) = match name.rfind('.') {
        // An extension is short; a long "extension" is part of the name.
        Some(i) if i > 0 && name.len() - i <= 32 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    (0..MAX_NAME_TRIES).map(move |k| {
        let prefix = if owned { "_" } else { "" };
        let suffix = if k == 0 {
            ext.to_owned()
        } else {
            format!(" ({k}){ext}")
        };
        let room = NAME_MAX - prefix.len() - suffix.len();
        format!("{prefix}{}{suffix}", cut(stem, room))
    })
}

/// Gives the verified file at `part` a name in `dir` that nothing has yet
/// (see [`candidate_names`]) by hard-linking it there: the link fails if
/// anything at all holds the name (a file, a directory, a dangling
/// symbolic link, a file created a moment ago), so a received file never
/// replaces or follows anything, and every name is tried once. `None` if
/// all are taken.
pub fn place(part: &Path, dir: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    for candidate in candidate_names(name) {
        let p = dir.join(&candidate);
        match std::fs::hard_link(part, &p) {
            Ok(()) => return Ok(Some(p)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
