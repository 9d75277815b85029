//! A throwaway PostgreSQL server for tests (built with the `conformance`
//! feature): Debian's `postgresql` binaries, `initdb` in a temporary
//! directory (as the `postgres` user when the tests run as root, since
//! PostgreSQL refuses to run as root), listening on a free port of
//! 127.0.0.1 with `fsync` on; one server per test process, one fresh
//! database per test. A watchdog stops the server and removes its
//! directory when the test process exits.
//!
//! Without PostgreSQL installed, [`database`] says so loudly and returns
//! `None` (the test is skipped and says it was), unless
//! `SEALPOST_REQUIRE_SERVERS` is set — as `.ci/run` sets it — and then the
//! test fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running server.
#[derive(Debug)]
pub struct Server {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    user: Option<String>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// Where the server binaries are: `$SEALPOST_PG_BIN`, `pg_config
/// --bindir`, or the newest `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SEALPOST_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("postgres").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().or_else(|| {
        let out = Command::new("pg_config").arg("--bindir").output().ok()?;
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        d.join("initdb").exists().then_some(d)
    })
}

fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn start() -> Result<Server, String> {
    let bin = bin_dir().ok_or("no PostgreSQL server binaries (install Debian's postgresql package, or set SEALPOST_PG_BIN)")?;
    let root = rustix::process::geteuid().is_root();
    let user = root.then(|| "postgres".to_owned());
    let dir = std::env::temp_dir().join(format!(
        "sealpost-pg-{}-{}",
        std::process::id(),
        rand_core::RngCore::next_u32(&mut rand_core::OsRng)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    if root {
        let out = Command::new("chown")
            .arg("postgres:")
            .arg(&dir)
            .output()
            .map_err(|e| format!("chown: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot give {} to the postgres user: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let data = dir.join("data");
    let out = as_user(user.as_deref(), &bin.join("initdb"))
        .args([
            "-A",
            "trust",
            "-U",
            "sealpost",
            "--no-sync",
            "-E",
            "UTF8",
            "-D",
        ])
        .arg(&data)
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
    let child = as_user(user.as_deref(), &bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
        .arg(&dir)
        .args([
            "-c",
            "fsync=on",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=64MB",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start postgres: {e}"))?;
    // The watchdog: when this process is gone, a fast shutdown, then the
    // directory goes.
    let _ = Command::new("sh")
        .arg("-c")
        .arg("while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; kill -INT \"$(head -n 1 \"$2/data/postmaster.pid\")\"; while kill -0 \"$1\" 2>/dev/null; do sleep 0.2; done; rm -rf \"$2\"")
        .arg(std::process::id().to_string())
        .arg(child.id().to_string())
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let server = Server {
        port,
        dir,
        bin,
        user,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = Command::new(server.bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "sealpost"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(server);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "PostgreSQL did not start within 60 s; see {}",
                server.dir.join("server.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Server {
    /// A URL for database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://sealpost@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` in database `postgres` with `psql`.
    pub fn psql(&self, sql: &str) -> Result<(), String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "sealpost",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The user the server runs as (`postgres` when tests run as root).
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

/// This process's server, started on first use.
pub fn server() -> Result<&'static Server, String> {
    SERVER.get_or_init(start).as_ref().map_err(Clone::clone)
}

/// A fresh, empty database's URL on this process's server; `None` (said
/// loudly) if there is no PostgreSQL here and none is required.
pub fn database(test: &str) -> Option<String> {
    let s = match server() {
        Ok(s) => s,
        Err(e) => {
            if std::env::var_os("SEALPOST_REQUIRE_SERVERS").is_some() {
                panic!("{test}: PostgreSQL is required (SEALPOST_REQUIRE_SERVERS is set) but {e}");
            }
            eprintln!("SKIPPED {test}: needs PostgreSQL, and {e}");
            return None;
        }
    };
    let name = format!("t{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    if let Err(e) = s.psql(&format!("CREATE DATABASE {name}")) {
        panic!("{test}: cannot create database {name}: {e}");
    }
    Some(s.url(&name))
}
