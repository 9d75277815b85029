//! Puts the git commit the binary was built from into `--version`
//! (`0.1.0 (commit 1a2b3c4d5e6f, 2026-12-02)`; `+dirty` when the tree had
//! uncommitted changes; "commit unknown" outside a git checkout, e.g. from
//! a source tarball).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
}

fn main() {
    // Rebuild when HEAD moves (a commit, a checkout) or the index changes.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{r}");
        }
    }
    println!("cargo:rerun-if-env-changed=SEALPOST_BUILD_COMMIT");
    let version = env!("CARGO_PKG_VERSION");
    let commit = std::env::var("SEALPOST_BUILD_COMMIT").ok().or_else(|| {
        let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
        let date = git(&["show", "-s", "--format=%cs", "HEAD"]).unwrap_or_default();
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
            .map(|s| !s.is_empty())
            .unwrap_or(false);
        Some(format!(
            "commit {hash}{}{}{date}",
            if dirty { "+dirty" } else { "" },
            if date.is_empty() { "" } else { ", " }
        ))
    });
    let long = format!(
        "{version} ({})",
        commit.unwrap_or_else(|| "commit unknown".to_owned())
    );
    println!("cargo:rustc-env=SEALPOST_LONG_VERSION={long}");
}
