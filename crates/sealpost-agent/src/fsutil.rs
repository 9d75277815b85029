//! Durable file writes. Nothing is reported as saved until the data and the
//! directory entry naming it are on stable storage: fsync the file, then
//! its directory (a rename or create is only durable once the directory is).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// fsyncs a directory so that entries created or renamed in it persist.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates `path` with `mode`, failing if it exists, writes `bytes` and
/// makes it durable. The mode is set at creation, so a secret never sits in
/// a file others can read, not even for a moment.
pub fn create_new_durable(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have removed bits but never adds them; set exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    sync_dir(parent_of(path))
}

/// Replaces `path` atomically with `bytes`: a reader sees the old or the
/// new content, never a mix, and after a crash one of the two survives.
pub fn replace_durable(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_of(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".sealpost-tmp-")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Creates a directory (and parents) with mode 0700 if missing.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        sync_dir(parent_of(dir))?;
    }
    Ok(())
}
