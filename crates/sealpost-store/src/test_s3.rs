//! A throwaway S3-compatible object store for tests (built with the
//! `conformance` feature): Garage 2.5 (a production object store, not a
//! mock), one node on free loopback ports in a temporary directory, with
//! `data_fsync` and `metadata_fsync` on, so that a PUT it confirmed is on
//! its disk. One server per test process, one fresh bucket per test. The
//! binary is `$SEALPOST_GARAGE`, `garage` on the `PATH`, or
//! `~/.cache/sealpost/tools/garage-2.5.0/bin/garage` (where `.ci/run`
//! builds it once with `cargo install garage --version 2.5.0 --locked`).
//!
//! Without it, [`bucket`] says so loudly and returns `None` (the test is
//! skipped and says so), unless `SEALPOST_REQUIRE_SERVERS` is set, as
//! `.ci/run` sets it: then the test fails.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::s3::S3Config;

/// The version `.ci/run` builds and the tests expect.
pub const GARAGE_VERSION: &str = "2.5.0";

/// A running Garage node.
#[derive(Debug)]
pub struct Garage {
    pub endpoint: String,
    pub key_id: String,
    secret: String,
    bin: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
}

static GARAGE: OnceLock<Result<Garage, String>> = OnceLock::new();
static NEXT_BUCKET: AtomicU32 = AtomicU32::new(0);

fn find_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SEALPOST_GARAGE") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("garage");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(format!(
        ".cache/sealpost/tools/garage-{GARAGE_VERSION}/bin/garage"
    ));
    p.is_file().then_some(p)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

impl Garage {
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .map_err(|e| format!("garage {args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "garage {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn launch(&self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start garage: {e}"))?;
        std::fs::write(self.dir.join("pid"), child.id().to_string()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cli(&["status"]).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "Garage did not start within 30 s; see {}",
                    self.dir.join("server.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops the node (SIGKILL) and waits until it is gone.
    pub fn stop(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            crate::test_postgres::signal_and_wait(pid.trim(), "-KILL", Duration::from_secs(10));
        }
    }

    /// Starts the node again after [`Garage::stop`].
    pub fn restart(&self) -> Result<(), String> {
        self.launch()
    }

    /// A fresh bucket the test key may read and write.
    pub fn bucket(&self) -> Result<S3Config, String> {
        let name = format!(
            "sealpost-test-{}",
            NEXT_BUCKET.fetch_add(1, Ordering::Relaxed)
        );
        self.cli(&["bucket", "create", &name])?;
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", &name, "--key", "sealpost",
        ])?;
        Ok(S3Config {
            bucket: name,
            endpoint: Some(self.endpoint.clone()),
            region: "garage".into(),
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret.clone(),
            prefix: String::new(),
        })
    }

    /// The test key's secret (for a relay process's environment).
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

fn start() -> Result<Garage, String> {
    start_with_key(None)
}

/// A node of the caller's own, with the same key as this process's shared
/// node, put in the environment (where every relay a test starts reads
/// it: it opens the buckets of both): for a test that stops its node, which
/// must not stop the buckets of tests running beside it. `None`, said
/// loudly, as [`bucket`].
pub fn own_garage(test: &str) -> Option<Garage> {
    let shared = match garage() {
        Ok(g) => g,
        Err(e) => {
            if std::env::var_os("SEALPOST_REQUIRE_SERVERS").is_some() {
                panic!(
                    "{test}: an S3 server is required (SEALPOST_REQUIRE_SERVERS is set) but {e}"
                );
            }
            eprintln!("SKIPPED {test}: needs an S3 server (Garage), and {e}");
            return None;
        }
    };
    std::env::set_var("AWS_ACCESS_KEY_ID", &shared.key_id);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &shared.secret);
    match start_with_key(Some((&shared.key_id, &shared.secret))) {
        Ok(g) => Some(g),
        Err(e) => panic!("{test}: cannot start a Garage node of its own: {e}"),
    }
}

fn start_with_key(key: Option<(&str, &str)>) -> Result<Garage, String> {
    let bin = find_bin().ok_or(
        "no garage binary (cargo install garage --version 2.5.0 --locked, or set SEALPOST_GARAGE)",
    )?;
    let dir = std::env::temp_dir().join(format!(
        "sealpost-garage-{}-{}",
        std::process::id(),
        rand_core::RngCore::next_u32(&mut rand_core::OsRng)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let (s3, rpc) = (free_port()?, free_port()?);
    let mut secret = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let conf = dir.join("garage.toml");
    std::fs::write(
        &conf,
        format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             metadata_fsync = true\ndata_fsync = true\ncompression_level = \"none\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"garage\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
            d = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut g = Garage {
        endpoint: format!("http://127.0.0.1:{s3}"),
        key_id: String::new(),
        secret: String::new(),
        bin,
        conf,
        dir,
    };
    g.launch()?;
    // The watchdog: when this process is gone, the node and its directory.
    let _ = Command::new("sh")
        .arg("-c")
        .arg("while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; kill -KILL \"$(cat \"$1/pid\")\" 2>/dev/null; sleep 0.5; rm -rf \"$1\"")
        .arg(std::process::id().to_string())
        .arg(&g.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let id = g.cli(&["node", "id", "-q"])?;
    let id = id.trim().split('@').next().unwrap_or("").to_owned();
    g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id])?;
    g.cli(&["layout", "apply", "--version", "1"])?;
    if let Some((id, secret)) = key {
        g.cli(&["key", "import", "--yes", "-n", "sealpost", id, secret])?;
        g.key_id = id.to_owned();
        g.secret = secret.to_owned();
        return Ok(g);
    }
    let key = g.cli(&["key", "create", "sealpost"])?;
    let field = |name: &str| {
        key.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .ok_or_else(|| format!("garage key create printed no {name:?}: {key}"))
    };
    g.key_id = field("Key ID:")?;
    g.secret = field("Secret key:")?;
    Ok(g)
}

/// This process's Garage node, started on first use.
pub fn garage() -> Result<&'static Garage, String> {
    GARAGE.get_or_init(start).as_ref().map_err(Clone::clone)
}

/// A fresh bucket on this process's node; `None` (said loudly) if there
/// is no Garage here and none is required.
pub fn bucket(test: &str) -> Option<S3Config> {
    match garage() {
        Ok(g) => match g.bucket() {
            Ok(c) => Some(c),
            Err(e) => panic!("{test}: cannot make a bucket: {e}"),
        },
        Err(e) => {
            if std::env::var_os("SEALPOST_REQUIRE_SERVERS").is_some() {
                panic!(
                    "{test}: an S3 server is required (SEALPOST_REQUIRE_SERVERS is set) but {e}"
                );
            }
            eprintln!("SKIPPED {test}: needs an S3 server (Garage), and {e}");
            None
        }
    }
}

/// A fresh bucket as the URL `relay serve --blobs` takes, with the
/// bucket's key put in this process's environment (where a relay in this
/// process, or one it starts, reads it; the same key for every bucket of
/// the node); `None` as [`bucket`].
pub fn bucket_url(test: &str) -> Option<String> {
    let b = bucket(test)?;
    let g = garage().ok()?;
    std::env::set_var("AWS_ACCESS_KEY_ID", &g.key_id);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", g.secret());
    Some(g.url_of(&b))
}

impl Garage {
    /// `bucket` as the URL `relay serve --blobs` takes.
    pub fn url_of(&self, bucket: &S3Config) -> String {
        format!(
            "s3://{}?endpoint={}&region=garage",
            bucket.bucket, self.endpoint
        )
    }
}
