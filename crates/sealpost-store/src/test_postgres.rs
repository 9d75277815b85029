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
    let server = Server {
        port,
        dir,
        bin,
        user,
    };
    server.launch()?;
    // The watchdog: when this process is gone, a fast shutdown, then the
    // directory goes.
    let _ = Command::new("sh")
        .arg("-c")
        .arg("while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; kill -INT \"$(head -n 1 \"$1/data/postmaster.pid\")\" 2>/dev/null; sleep 1; while [ -e \"$1/data/postmaster.pid\" ]; do sleep 0.2; done; rm -rf \"$1\"")
        .arg(std::process::id().to_string())
        .arg(&server.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    server.wait_ready()?;
    Ok(server)
}

/// Sends `signal` to process `pid` and waits (at most `wait`) until it is
/// gone.
pub(crate) fn signal_and_wait(pid: &str, signal: &str, wait: Duration) {
    let _ = Command::new("kill").args([signal, pid]).status();
    let deadline = Instant::now() + wait;
    while Command::new("kill")
        .args(["-0", pid])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Server {
    /// Starts the server on its directory and port (again, after
    /// [`Server::crash`]); its process id.
    fn launch(&self) -> Result<u32, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .map_err(|e| e.to_string())?;
        let child = as_user(self.user.as_deref(), &self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
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
        Ok(child.id())
    }

    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "sealpost",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "PostgreSQL did not start within 60 s; see {}",
                    self.dir.join("server.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server as a crash would (SIGQUIT to the postmaster: an
    /// immediate shutdown, no checkpoint; it recovers from its WAL at the
    /// next start) and waits until it is gone.
    pub fn crash(&self) {
        let pidfile = self.dir.join("data").join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        {
            signal_and_wait(&pid.to_string(), "-QUIT", Duration::from_secs(30));
        }
    }

    /// Starts the server again after [`Server::crash`] and waits until it
    /// answers.
    pub fn restart(&self) -> Result<(), String> {
        self.launch()?;
        self.wait_ready()
    }

    /// Turns TLS on with this certificate (PEM) and key (PEM), then
    /// reloads the configuration (plaintext connections still work).
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.join("data");
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&cert, cert_pem).map_err(|e| format!("writing the certificate: {e}"))?;
        std::fs::write(&key, key_pem).map_err(|e| format!("writing the key: {e}"))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod: {e}"))?;
        if let Some(u) = &self.user {
            let out = Command::new("chown")
                .arg(format!("{u}:"))
                .arg(&cert)
                .arg(&key)
                .output()
                .map_err(|e| format!("chown: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .map_err(|e| format!("postgresql.conf: {e}"))?;
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )
        .map_err(|e| format!("postgresql.conf: {e}"))?;
        self.psql("SELECT pg_reload_conf()")?;
        // The reload is asynchronous: wait until a new session sees it.
        for _ in 0..100 {
            let out = Command::new(self.bin.join("psql"))
                .args(["-X", "-At", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "sealpost", "-d", "postgres", "-c", "SHOW ssl"])
                .output()
                .map_err(|e| format!("psql: {e}"))?;
            if String::from_utf8_lossy(&out.stdout).trim() == "on" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("PostgreSQL did not turn TLS on".into())
    }

    /// A fresh, empty database on this server; its URL.
    pub fn create_database(&self) -> Result<String, String> {
        let name = format!("t{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
        self.psql(&format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

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

/// A server of the caller's own (for a test that crashes it); `None`,
/// said loudly, as [`database`].
pub fn own_server(test: &str) -> Option<Server> {
    match start() {
        Ok(s) => Some(s),
        Err(e) => {
            if std::env::var_os("SEALPOST_REQUIRE_SERVERS").is_some() {
                panic!("{test}: PostgreSQL is required (SEALPOST_REQUIRE_SERVERS is set) but {e}");
            }
            eprintln!("SKIPPED {test}: needs PostgreSQL, and {e}");
            None
        }
    }
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
    match s.create_database() {
        Ok(url) => Some(url),
        Err(e) => panic!("{test}: cannot create a database: {e}"),
    }
}
