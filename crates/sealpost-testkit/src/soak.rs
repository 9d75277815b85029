//! The adversary soak: real `sealpost` processes (a relay and one agent per
//! identity) exchange messages and files through a hostile relay, with
//! optional SIGKILLs of every process at seeded random moments; then the
//! relay heals (restarts honest on the same data) and delivery finishes.
//! With two relays (each identity's home alternates between them, on
//! 127.0.0.2 and 127.0.0.3) every agent forwards through its own relay,
//! both relays are hostile (forwarding faults included) and both are
//! killed and healed. As a relay cluster (`cluster_nodes`), one relay runs
//! as several nodes on a throwaway PostgreSQL and Garage bucket, homes
//! alternate between the nodes, half the kills take a node, and
//! PostgreSQL is crashed and the object store stopped while the load runs.
//! Every outcome is read back from the endpoints and checked against the
//! guarantees: nothing lost, nothing delivered twice, no tampered content
//! and no forged refusal or rejection accepted, nothing left pending.
//!
//! Used by `bench/adversary.sh` (release, full size) and by a shortened
//! seeded run in `cargo test`. Everything listens on 127.0.0.1 only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// The `sealpost` binary.
    pub sealpost: PathBuf,
    /// Scratch directory (homes, relay data, logs, source files).
    pub dir: PathBuf,
    pub seed: u64,
    pub identities: usize,
    pub messages: usize,
    pub files: usize,
    /// Largest file, bytes (sizes are mixed: edge sizes and random ones).
    pub max_file: u64,
    /// Fault rates, `Spec` text without the seed (e.g. `all=0.03`).
    pub faults: String,
    /// How long the relay stays hostile.
    pub hostile_for: Duration,
    /// SIGKILLs of the relay and the agents while hostile (0: none).
    pub kills: usize,
    /// Base retransmission interval given to the agents.
    pub retransmit_after: Duration,
    /// How long delivery may take to finish after the relay healed.
    pub settle_timeout: Duration,
    /// Messages per `send --repeat` batch.
    pub batch: usize,
    /// Relays: 1 (everyone on one relay, submitting directly) or 2 (homes
    /// alternate, agents forward through their own relay).
    pub relays: usize,
    /// A relay cluster instead: this many nodes of one relay (the same
    /// keys and certificate) on one PostgreSQL database and one S3 bucket
    /// (a throwaway PostgreSQL and Garage node, started here); homes
    /// alternate between the nodes. PostgreSQL is crashed and restarted
    /// once and the object store stopped for [`SoakConfig::store_down`]
    /// while the load runs. 0: no cluster.
    pub cluster_nodes: usize,
    /// How long the object store stays stopped in a cluster run.
    pub store_down: Duration,
}

/// What happened, and whether the guarantees held.
#[derive(Debug, Default, Clone)]
pub struct SoakReport {
    /// Relays in the topology (2: every identity forwards through its own).
    pub relays: u64,
    pub sent_messages: u64,
    pub sent_files: u64,
    pub faults: BTreeMap<String, u64>,
    /// Faults whose item the endpoints recorded as caught, by class.
    pub matched: BTreeMap<String, (u64, u64)>,
    pub detections: BTreeMap<String, u64>,
    pub kills: u64,
    /// Kills by victim: the relay's name ("relay", "relay-0", …) or the
    /// identity's.
    pub killed: BTreeMap<String, u64>,
    pub delivered: u64,
    pub failed: BTreeMap<String, u64>,
    pub pending: u64,
    pub lost: u64,
    pub delivered_twice: u64,
    pub tampered_accepted: u64,
    pub forged_accepted: u64,
    pub send_errors: u64,
    /// `send`s that queued their message but could not hand it over
    /// themselves (exit 5, `queued-not-sent`: no agent ran and the relay
    /// could not take it, say its object store was down). Not an error:
    /// the message must still be delivered, which the counts above check.
    pub sends_kept: u64,
    pub settle_secs: f64,
    pub hostile_secs: f64,
    /// Cluster runs: nodes of the one relay.
    pub nodes: u64,
    /// Cluster runs: what was taken down, when and for how long.
    pub outages: Vec<String>,
    pub violations: Vec<String>,
}

impl SoakReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "relays": self.relays,
            "sent": {"messages": self.sent_messages, "files": self.sent_files},
            "faults_injected": self.faults,
            "faults_matched_to_a_detection": self.matched.iter().map(|(k, (m, n))| (k.clone(), serde_json::json!({"matched": m, "of": n}))).collect::<BTreeMap<_, _>>(),
            "detections": self.detections,
            "kills": self.kills,
            "killed": self.killed,
            "delivered_with_valid_receipt": self.delivered,
            "failed": self.failed,
            "pending_after_heal": self.pending,
            "lost": self.lost,
            "delivered_twice": self.delivered_twice,
            "tampered_content_accepted": self.tampered_accepted,
            "forged_refusal_or_rejection_accepted": self.forged_accepted,
            "send_errors": self.send_errors,
            "sends_queued_not_sent": self.sends_kept,
            "hostile_secs": self.hostile_secs,
            "settle_secs": self.settle_secs,
            "cluster_nodes": self.nodes,
            "outages": self.outages,
            "violations": self.violations,
        })
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let total = self.sent_messages + self.sent_files;
        if self.nodes > 0 {
            s.push_str(&format!(
                "relay cluster                {} nodes on one PostgreSQL and one S3 bucket (homes alternate)\n",
                self.nodes
            ));
            for o in &self.outages {
                s.push_str(&format!("  {o}\n"));
            }
        } else if self.relays > 1 {
            s.push_str(&format!(
                "relays                       {} (homes alternate; every agent forwards through its own)\n",
                self.relays
            ));
        }
        s.push_str(&format!(
            "sent                         {} ({} messages, {} files)\n",
            total, self.sent_messages, self.sent_files
        ));
        let injected: u64 = self.faults.values().sum();
        s.push_str(&format!("faults injected              {injected}\n"));
        for (k, n) in &self.faults {
            let m = self
                .matched
                .get(k)
                .map(|(m, of)| format!("  (matched to a detection: {m} of {of})"))
                .unwrap_or_default();
            s.push_str(&format!("  {k:<26} {n}{m}\n"));
        }
        let by: Vec<String> = self
            .killed
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        s.push_str(&format!(
            "kills (SIGKILL)              {}{}\n",
            self.kills,
            if by.is_empty() {
                String::new()
            } else {
                format!(" ({})", by.join(", "))
            }
        ));
        s.push_str(&format!(
            "delivered, valid receipt     {}\n",
            self.delivered
        ));
        let failed: u64 = self.failed.values().sum();
        s.push_str(&format!("failed with a reason         {failed}\n"));
        for (k, n) in &self.failed {
            s.push_str(&format!("  {k:<26} {n}\n"));
        }
        s.push_str(&format!(
            "pending after heal           {} (must be 0)\n",
            self.pending
        ));
        s.push_str(&format!(
            "lost                         {} (must be 0)\n",
            self.lost
        ));
        s.push_str(&format!(
            "delivered twice              {} (must be 0)\n",
            self.delivered_twice
        ));
        s.push_str(&format!(
            "tampered content accepted    {} (must be 0)\n",
            self.tampered_accepted
        ));
        s.push_str(&format!(
            "forged refusal/rejection ok  {} (must be 0)\n",
            self.forged_accepted
        ));
        if self.sends_kept > 0 {
            s.push_str(&format!(
                "sends queued, not yet sent   {} (exit 5; delivered later)\n",
                self.sends_kept
            ));
        }
        s.push_str(&format!(
            "time hostile / to settle     {:.1} s / {:.1} s\n",
            self.hostile_secs, self.settle_secs
        ));
        if self.violations.is_empty() {
            s.push_str("RESULT: every guarantee held\n");
        } else {
            s.push_str("RESULT: VIOLATIONS\n");
            for v in &self.violations {
                s.push_str(&format!("  {v}\n"));
            }
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Setup(String),
}

fn io<T>(what: impl Into<String>, r: std::io::Result<T>) -> Result<T, SoakError> {
    r.map_err(|e| SoakError::Io(what.into(), e))
}

/// One relay process and where it listens.
struct Relay {
    ip: String,
    port: u16,
    child: Option<Child>,
    /// Its address (`HOST:PORT/FINGERPRINT`), once it started.
    address: String,
}

/// The shared store of a cluster run: its servers and where they are.
struct Shared {
    pg: sealpost_store::test_postgres::Server,
    garage: sealpost_store::test_s3::Garage,
    database: String,
    blobs: String,
}

struct Soak {
    cfg: SoakConfig,
    shared: Option<Shared>,
    relays: Vec<Relay>,
    agents: Vec<Option<Child>>,
    homes: Vec<PathBuf>,
    names: Vec<String>,
}

fn free_port(ip: &str) -> Result<u16, SoakError> {
    let l = io("binding a probe port", TcpListener::bind((ip, 0)))?;
    Ok(io("reading its port", l.local_addr())?.port())
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Soak {
    fn log_file(&self, name: &str) -> Result<fs::File, SoakError> {
        io(
            format!("opening log {name}"),
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.cfg.dir.join("logs").join(name)),
        )
    }

    /// Runs `sealpost ARGS --json` and parses its output.
    fn cli(&self, home: Option<&Path>, args: &[&str]) -> Result<Value, SoakError> {
        let mut c = Command::new(&self.cfg.sealpost);
        c.args(args).arg("--json").env("RUST_LOG", "error");
        if let Some(h) = home {
            c.arg("--home").arg(h);
        }
        let out = io(format!("running sealpost {args:?}"), c.output())?;
        if !out.status.success() {
            return Err(SoakError::Setup(format!(
                "sealpost {args:?} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| SoakError::Setup(format!("sealpost {args:?} printed no JSON ({e})")))
    }

    /// Relay `k`'s name: its data directory, its log and its fault log
    /// are named after it (one relay: `relay`, as before two).
    fn relay_name(&self, k: usize) -> String {
        if self.shared.is_some() {
            format!("node-{k}")
        } else if self.relays.len() == 1 {
            "relay".into()
        } else {
            format!("relay-{k}")
        }
    }

    /// Identity `i`'s home relay.
    fn home_of(&self, i: usize) -> usize {
        i % self.relays.len()
    }

    fn start_relay(&mut self, k: usize, hostile: bool) -> Result<(), SoakError> {
        let name = self.relay_name(k);
        let mut c = Command::new(&self.cfg.sealpost);
        c.args(["relay", "serve", "--json", "--listen"])
            .arg(format!("{}:{}", self.relays[k].ip, self.relays[k].port))
            .arg("--data")
            .arg(self.cfg.dir.join(&name))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(self.log_file(&format!("{name}.log"))?);
        if let Some(sh) = &self.shared {
            c.args(["--database", &sh.database, "--blobs", &sh.blobs])
                .env("AWS_ACCESS_KEY_ID", &sh.garage.key_id)
                .env("AWS_SECRET_ACCESS_KEY", sh.garage.secret());
            if k > 0 {
                // Every node is the same relay: node 0's keys and
                // certificate (made on its first start).
                let first = self.cfg.dir.join(self.relay_name(0));
                let own = self.cfg.dir.join(&name);
                io("making a node's directory", fs::create_dir_all(&own))?;
                for f in ["cert.pem", "key.pem"] {
                    if !own.join(f).exists() {
                        io(
                            "copying node 0's certificate",
                            fs::copy(first.join(f), own.join(f)),
                        )?;
                    }
                }
                c.arg("--signing-key").arg(first.join("relay-signing.key"));
            }
        }
        if hostile {
            // Each relay its own seed, so they do not strike in step.
            let seed = self.cfg.seed.wrapping_add(k as u64);
            c.arg("--hostile")
                .arg(format!("seed={seed},{}", self.cfg.faults))
                .arg("--hostile-log")
                .arg(self.cfg.dir.join(format!("faults-{name}.jsonl")))
                .arg("--hostile-cards")
                .arg(self.cfg.dir.join("cards.txt"));
        }
        let mut child = io("starting the relay", c.spawn())?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| SoakError::Setup("relay has no stdout".into()))?;
        let mut line = String::new();
        io(
            "reading the relay's address",
            BufReader::new(stdout).read_line(&mut line),
        )?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| SoakError::Setup(format!("{name} did not start: {e}: {line:?}")))?;
        self.relays[k].address = v["address"].as_str().unwrap_or_default().to_owned();
        self.relays[k].child = Some(child);
        Ok(())
    }

    fn start_agent(&mut self, i: usize) -> Result<(), SoakError> {
        let child = io(
            "starting an agent",
            Command::new(&self.cfg.sealpost)
                .arg("agent")
                .arg("--home")
                .arg(&self.homes[i])
                .env(
                    "SEALPOST_RETRANSMIT_AFTER",
                    format!("{}ms", self.cfg.retransmit_after.as_millis()),
                )
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(self.log_file(&format!("agent-{}.log", self.names[i]))?)
                .spawn(),
        )?;
        self.agents[i] = Some(child);
        Ok(())
    }

    /// A send that failed after queueing leaves its message in the outbox,
    /// so a send is never retried (it would send a second message).
    /// Runs `sealpost send`: `Ok(true)` if it handed the message over,
    /// `Ok(false)` if it says it queued it without handing it over (exit
    /// 5, `queued-not-sent`: true during an outage with the sender's agent
    /// down; the message is then sent by the agent, and the soak checks it
    /// is delivered like any other). On any other failure, how it ended and
    /// what it said last (so a violation names its cause).
    fn send(&self, from: usize, args: &[String]) -> Result<bool, String> {
        let mut c = Command::new(&self.cfg.sealpost);
        c.arg("send")
            .args(args)
            .arg("--home")
            .arg(&self.homes[from])
            .arg("--json")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match c.output() {
            Ok(o) if o.status.success() => Ok(true),
            Ok(o)
                if o.status.code() == Some(5)
                    && String::from_utf8_lossy(&o.stderr)
                        .contains("\"class\":\"queued-not-sent\"") =>
            {
                Ok(false)
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let last = err.lines().rev().find(|l| !l.trim().is_empty());
                Err(format!(
                    "{}: {}",
                    o.status,
                    last.unwrap_or("(nothing on stderr)")
                ))
            }
            Err(e) => Err(format!("could not run: {e}")),
        }
    }
}

/// Sizes for the files: the edges first, then random ones.
fn file_sizes(rng: &mut ChaCha8Rng, n: usize, max: u64) -> Vec<u64> {
    let edges = [0u64, 1, 65_535, 65_536, 65_537, 983_041, 3 << 20];
    let mut out: Vec<u64> = edges
        .iter()
        .copied()
        .filter(|&s| s <= max)
        .take(n)
        .collect();
    while out.len() < n {
        // Mostly small, some large.
        let s = if rng.gen_bool(0.7) {
            rng.gen_range(0..=max.min(256 * 1024))
        } else {
            rng.gen_range(0..=max)
        };
        out.push(s);
    }
    out
}

/// Runs the soak and checks the guarantees.
pub fn run(cfg: SoakConfig) -> Result<SoakReport, SoakError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    for d in ["logs", "src", "homes"] {
        io(
            "creating the scratch directory",
            fs::create_dir_all(cfg.dir.join(d)),
        )?;
    }
    let n = cfg.identities.max(2);
    let names: Vec<String> = (0..n).map(|i| format!("id{i}")).collect();
    let homes: Vec<PathBuf> = names
        .iter()
        .map(|x| cfg.dir.join("homes").join(x))
        .collect();
    // One relay on 127.0.0.1; two on 127.0.0.2 and .3, each its own
    // address (a relay sees the other's, not an agent's).
    let ips: Vec<String> = match (cfg.cluster_nodes, cfg.relays) {
        (0, 0 | 1) => vec!["127.0.0.1".into()],
        (0, k) => (0..k).map(|i| format!("127.0.0.{}", i + 2)).collect(),
        // One relay's nodes, each on its own loopback address (as behind
        // a load balancer, each on its own machine).
        (k, _) => (0..k).map(|i| format!("127.0.0.{}", i + 2)).collect(),
    };
    let shared = if cfg.cluster_nodes > 0 {
        let pg =
            sealpost_store::test_postgres::own_server("the cluster soak").ok_or_else(|| {
                SoakError::Setup(
                    "a cluster soak needs PostgreSQL's binaries (apt-get install postgresql)"
                        .into(),
                )
            })?;
        let database = pg.create_database().map_err(SoakError::Setup)?;
        // A node of its own: the soak stops it.
        let garage = sealpost_store::test_s3::own_garage("the cluster soak")
            .ok_or_else(|| SoakError::Setup("a cluster soak needs Garage".into()))?;
        let bucket = garage.bucket().map_err(SoakError::Setup)?;
        let blobs = garage.url_of(&bucket);
        Some(Shared {
            pg,
            garage,
            database,
            blobs,
        })
    } else {
        None
    };
    let mut relays = Vec::new();
    for ip in ips {
        relays.push(Relay {
            port: free_port(&ip)?,
            ip,
            child: None,
            address: String::new(),
        });
    }
    let mut s = Soak {
        shared,
        relays,
        agents: (0..n).map(|_| None).collect(),
        homes,
        names,
        cfg,
    };
    let result = drive(&mut s, &mut rng);
    for r in &mut s.relays {
        kill(&mut r.child);
    }
    for a in &mut s.agents {
        kill(a);
    }
    result
}

fn drive(s: &mut Soak, rng: &mut ChaCha8Rng) -> Result<SoakReport, SoakError> {
    let n = s.homes.len();
    let mut report = SoakReport::default();
    // Set up honestly: identities registered, cards exchanged.
    let m = s.relays.len();
    let cluster = s.shared.is_some();
    report.relays = if cluster { 1 } else { m as u64 };
    report.nodes = if cluster { m as u64 } else { 0 };
    for k in 0..m {
        s.start_relay(k, false)?;
    }
    let mut cards = Vec::new();
    for i in 0..n {
        let home = s.relays[s.home_of(i)].address.clone();
        let v = s.cli(
            Some(&s.homes[i]),
            &["init", "--name", &s.names[i], "--relay", &home],
        )?;
        cards.push(v["card"].as_str().unwrap_or_default().to_owned());
    }
    io(
        "writing cards",
        fs::write(s.cfg.dir.join("cards.txt"), cards.join("\n") + "\n"),
    )?;
    for i in 0..n {
        for (j, card) in cards.iter().enumerate() {
            if i != j {
                s.cli(Some(&s.homes[i]), &["contact", "add", card])?;
            }
        }
    }
    if m > 1 && !cluster {
        // Through their own relays (remembered by the agents).
        for h in &s.homes {
            s.cli(Some(h), &["sync", "--forward", "on"])?;
        }
    }
    for k in 0..m {
        kill(&mut s.relays[k].child);
        s.start_relay(k, true)?;
    }
    for i in 0..n {
        s.start_agent(i)?;
    }

    // The load, spread over the first half of the hostile period, with
    // kills at random moments over the whole of it.
    let started = Instant::now();
    let mut sends: Vec<(usize, Vec<String>)> = Vec::new();
    let mut left = s.cfg.messages;
    let mut b = 0usize;
    while left > 0 {
        let k = left.min(s.cfg.batch.max(1));
        left -= k;
        let from = b % n;
        let to = (from + 1 + (b / n) % (n - 1)) % n;
        sends.push((
            from,
            vec![
                s.names[to].clone(),
                format!("soak batch {b} from {} to {}", s.names[from], s.names[to]),
                "--repeat".into(),
                k.to_string(),
                "--expires".into(),
                "1d".into(),
            ],
        ));
        report.sent_messages += k as u64;
        b += 1;
    }
    let mut sources: HashMap<String, PathBuf> = HashMap::new();
    for (f, size) in file_sizes(rng, s.cfg.files, s.cfg.max_file)
        .into_iter()
        .enumerate()
    {
        let from = f % n;
        let to = (from + 1 + f % (n - 1)) % n;
        let name = format!("f{f}-from-{}.bin", s.names[from]);
        let path = s.cfg.dir.join("src").join(&name);
        let mut data = vec![0u8; size as usize];
        rng.fill(&mut data[..]);
        io("writing a source file", fs::write(&path, &data))?;
        sources.insert(name, path.clone());
        sends.push((
            from,
            vec![
                s.names[to].clone(),
                "--file".into(),
                path.to_string_lossy().into_owned(),
                "--expires".into(),
                "1d".into(),
            ],
        ));
        report.sent_files += 1;
    }
    // Interleave files among the message batches.
    for i in (1..sends.len()).rev() {
        let j = rng.gen_range(0..=i);
        sends.swap(i, j);
    }
    let hostile_for = s.cfg.hostile_for;
    let send_span = hostile_for / 2;
    let mut kill_times: Vec<Duration> = (0..s.cfg.kills)
        .map(|_| hostile_for.mul_f64(rng.gen_range(0.0..1.0)))
        .collect();
    kill_times.sort();
    let mut next_kill = 0usize;
    let per_send = send_span.div_f64(sends.len().max(1) as f64);
    let mut next_send = 0usize;
    // Cluster runs: PostgreSQL crashed at 30 % of the hostile period and
    // back 3 s later; the object store stopped at 40 % for store_down.
    // A node cannot start while either is down (it checks both), so kills
    // that fall in an outage wait for its end.
    let pg_down = (hostile_for.mul_f64(0.3), Duration::from_secs(3));
    let s3_down = (hostile_for.mul_f64(0.4), s.cfg.store_down);
    let mut pg_state = 0u8; // 0 up, 1 down, 2 back
    let mut s3_state = 0u8;
    let mut s3_stopped = Duration::ZERO;
    while started.elapsed() < hostile_for
        || next_send < sends.len()
        || (cluster && (pg_state == 1 || s3_state == 1 || next_kill < kill_times.len()))
    {
        let now = started.elapsed();
        if let Some(sh) = &s.shared {
            if pg_state == 0 && now >= pg_down.0 {
                sh.pg.crash();
                pg_state = 1;
                report.outages.push(format!(
                    "PostgreSQL crashed (immediate shutdown) at {:.1} s",
                    now.as_secs_f64()
                ));
                continue;
            }
            if pg_state == 1 && now >= pg_down.0 + pg_down.1 {
                sh.pg.restart().map_err(SoakError::Setup)?;
                pg_state = 2;
                report.outages.push(format!(
                    "PostgreSQL back (recovered from its WAL) at {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
                continue;
            }
            if s3_state == 0 && pg_state == 2 && now >= s3_down.0 {
                sh.garage.stop();
                s3_state = 1;
                s3_stopped = started.elapsed();
                report.outages.push(format!(
                    "object store (Garage) stopped at {:.1} s",
                    now.as_secs_f64()
                ));
                continue;
            }
            if s3_state == 1 && now >= s3_stopped + s3_down.1 {
                sh.garage.restart().map_err(SoakError::Setup)?;
                s3_state = 2;
                report.outages.push(format!(
                    "object store back at {:.1} s ({:.1} s down)",
                    started.elapsed().as_secs_f64(),
                    (started.elapsed() - s3_stopped).as_secs_f64()
                ));
                continue;
            }
        }
        let outage = pg_state == 1 || s3_state == 1;
        if next_send < sends.len() && now >= per_send.mul_f64(next_send as f64) {
            let (from, args) = &sends[next_send];
            match s.send(*from, args) {
                Ok(true) => {}
                Ok(false) => report.sends_kept += 1,
                Err(why) => {
                    report.send_errors += 1;
                    report
                        .violations
                        .push(format!("`sealpost send {}` failed ({why})", args.join(" ")));
                }
            }
            next_send += 1;
            continue;
        }
        if next_kill < kill_times.len() && now >= kill_times[next_kill] {
            // One relay: the victim is it or an agent, as before two.
            let victim = if m == 1 {
                rng.gen_range(0..=n)
            } else if cluster {
                // Half the kills take a node, half an agent.
                if rng.gen_bool(0.5) {
                    n + rng.gen_range(0..m)
                } else {
                    rng.gen_range(0..n)
                }
            } else {
                rng.gen_range(0..n + m)
            };
            if outage && victim >= n {
                // A node would not start now; drawn again after the outage.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            next_kill += 1;
            let who = if victim >= n {
                s.relay_name(victim - n)
            } else {
                s.names[victim].clone()
            };
            *report.killed.entry(who).or_default() += 1;
            if victim >= n {
                let k = victim - n;
                kill(&mut s.relays[k].child);
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
                s.start_relay(k, true)?;
            } else {
                kill(&mut s.agents[victim]);
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
                s.start_agent(victim)?;
            }
            report.kills += 1;
            continue;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    report.hostile_secs = started.elapsed().as_secs_f64();

    // Heal: the same relay data, served honestly.
    for k in 0..m {
        kill(&mut s.relays[k].child);
        s.start_relay(k, false)?;
    }
    let healed = Instant::now();
    loop {
        let mut busy = false;
        for h in &s.homes {
            let v = s.cli(Some(h), &["status", "--limit", "0"])?;
            let t = &v["totals"];
            if t["queued"].as_u64().unwrap_or(0)
                + t["submitted"].as_u64().unwrap_or(0)
                + t["forwarding"].as_u64().unwrap_or(0)
                > 0
            {
                busy = true;
            }
            let inbox = s.cli(Some(h), &["inbox", "--limit", "1000000"])?;
            for m in inbox["messages"].as_array().into_iter().flatten() {
                let st = m["file"]["state"].as_str();
                if st.is_some_and(|x| x != "done" && x != "failed") {
                    busy = true;
                }
            }
        }
        if !busy || healed.elapsed() > s.cfg.settle_timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    report.settle_secs = healed.elapsed().as_secs_f64();
    check(s, &sources, &mut report)?;
    Ok(report)
}

fn blake3_file(p: &Path) -> Option<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(p).ok()?).ok()?;
    Some(h.finalize().to_hex().to_string())
}

/// Reads every endpoint's view and checks the guarantees.
fn check(
    s: &Soak,
    sources: &HashMap<String, PathBuf>,
    r: &mut SoakReport,
) -> Result<(), SoakError> {
    struct Received {
        from: String,
        hash: String,
        file: Option<Value>,
    }
    // Inboxes: id -> what each recipient stored (a Vec: more than one is a
    // double delivery).
    let mut inboxes: Vec<HashMap<String, Vec<Received>>> = Vec::new();
    let mut caught: HashSet<String> = HashSet::new();
    for h in &s.homes {
        let inbox = s.cli(Some(h), &["inbox", "--limit", "100000000"])?;
        let mut map: HashMap<String, Vec<Received>> = HashMap::new();
        for m in inbox["messages"].as_array().into_iter().flatten() {
            map.entry(m["id"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(Received {
                    from: m["from"].as_str().unwrap_or_default().to_owned(),
                    hash: m["content_blake3"].as_str().unwrap_or_default().to_owned(),
                    file: m["file"].as_object().map(|o| Value::Object(o.clone())),
                });
        }
        inboxes.push(map);
        let d = s.cli(Some(h), &["status", "--detections", "--limit", "100000000"])?;
        for x in d["detections"].as_array().into_iter().flatten() {
            caught.insert(x["item"].as_str().unwrap_or_default().to_owned());
            *r.detections
                .entry(x["class"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    let index: HashMap<&str, usize> = s
        .names
        .iter()
        .enumerate()
        .map(|(i, x)| (x.as_str(), i))
        .collect();
    for (i, h) in s.homes.iter().enumerate() {
        let out = s.cli(Some(h), &["status", "--limit", "100000000"])?;
        for m in out["messages"].as_array().into_iter().flatten() {
            let id = m["id"].as_str().unwrap_or_default();
            let hash = m["content_blake3"].as_str().unwrap_or_default();
            for d in m["deliveries"].as_array().into_iter().flatten() {
                let to = d["to"].as_str().unwrap_or_default();
                let Some(&j) = index.get(to) else {
                    r.violations.push(format!("{id}: delivery to unknown {to}"));
                    continue;
                };
                let got = inboxes[j].get(id);
                let state = d["state"].as_str().unwrap_or_default();
                match state {
                    "delivered" => {
                        let Some(copies) = got else {
                            r.lost += 1;
                            r.violations.push(format!(
                                "{id} from {} to {to}: receipt accepted but not in the inbox (forged receipt or lost)",
                                s.names[i]
                            ));
                            continue;
                        };
                        r.delivered += 1;
                        if copies.len() > 1 {
                            r.delivered_twice += 1;
                            r.violations
                                .push(format!("{id}: {} copies in {to}'s inbox", copies.len()));
                        }
                        let c = &copies[0];
                        // (A file's outbox hash is the file's, its inbox
                        // hash the manifest's: files are compared below.)
                        if (c.file.is_none() && c.hash != hash) || c.from != s.names[i] {
                            r.tampered_accepted += 1;
                            r.violations.push(format!(
                                "{id}: {to} holds content {} from {}, {} sent {hash}",
                                c.hash, c.from, s.names[i]
                            ));
                        }
                        if let Some(f) = &c.file {
                            let path = f["path"].as_str().map(PathBuf::from);
                            let name = f["name"].as_str().unwrap_or_default();
                            let want = sources.get(name).and_then(|p| blake3_file(p));
                            let have = path.as_deref().and_then(blake3_file);
                            if f["state"].as_str() != Some("done") || want.is_none() || want != have
                            {
                                r.tampered_accepted += 1;
                                r.violations.push(format!(
                                    "{id}: file {name} at {to} is {:?} ({:?}), the source is {want:?}",
                                    have, f["state"]
                                ));
                            }
                        }
                    }
                    "failed" => {
                        let code = d["failure"].as_str().unwrap_or("?").to_owned();
                        if code.starts_with("refused") || code.starts_with("rejected") {
                            // No refusal or rejection is genuine here: every
                            // identity is a contact, nothing expires, nothing
                            // exceeds the relay's limits.
                            r.forged_accepted += 1;
                            r.violations.push(format!(
                                "{id} to {to}: failed with {code}, which nobody genuine issued"
                            ));
                        }
                        if got.is_some() {
                            r.violations.push(format!(
                                "{id} to {to}: marked failed ({code}) yet delivered"
                            ));
                        }
                        *r.failed.entry(code).or_default() += 1;
                    }
                    _ => {
                        r.pending += 1;
                        if got.is_none() {
                            r.lost += 1;
                        }
                        if r.pending <= 20 {
                            r.violations.push(format!(
                                "{id} from {} to {to}: still {state} after the relay healed",
                                s.names[i]
                            ));
                        }
                    }
                }
            }
        }
    }
    if r.pending > 20 {
        r.violations
            .push(format!("… {} deliveries pending in all", r.pending));
    }
    // Each download directory holds each received file once.
    for (j, h) in s.homes.iter().enumerate() {
        let dir = h.join("downloads");
        let mut count = 0u64;
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".sealpost-part-") {
                    continue;
                }
                count += 1;
                if name.contains(" (") {
                    r.delivered_twice += 1;
                    r.violations
                        .push(format!("{}: a second copy {name} was saved", s.names[j]));
                }
            }
        }
        let expected = inboxes[j]
            .values()
            .filter(|v| {
                v.iter()
                    .any(|c| c.file.as_ref().is_some_and(|f| f["state"] == "done"))
            })
            .count() as u64;
        if count != expected {
            r.violations.push(format!(
                "{}: {count} files in the download directory, {expected} received",
                s.names[j]
            ));
        }
    }
    // Faults, and which of them an endpoint recorded catching: an item
    // the relay went on to alter again (a moved item flipped on its way
    // out, say) counts as caught if what it became was caught.
    let mut faults: Vec<Value> = Vec::new();
    for k in 0..s.relays.len() {
        let log = s.cfg.dir.join(format!("faults-{}.jsonl", s.relay_name(k)));
        if let Ok(f) = fs::File::open(log) {
            faults.extend(
                BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| serde_json::from_str::<Value>(&l).ok()),
            );
        }
    }
    let mut became: HashMap<String, Vec<String>> = HashMap::new();
    for v in &faults {
        if let (Some(o), Some(i)) = (v["orig"].as_str(), v["item"].as_str()) {
            became.entry(o.to_owned()).or_default().push(i.to_owned());
        }
    }
    for v in &faults {
        let class = v["class"].as_str().unwrap_or("?").to_owned();
        *r.faults.entry(class.clone()).or_default() += 1;
        let item = v["item"].as_str().unwrap_or_default();
        let matchable = matches!(
            class.as_str(),
            "flip"
                | "truncate"
                | "substitute"
                | "move"
                | "forge-report"
                | "forge-refusal"
                | "duplicate"
                | "replay"
                | "blob-flip"
                | "blob-truncate"
                | "forward-give-up"
                | "forward-forge-refusal"
                | "forward-replay"
                | "forward-misroute"
        );
        if matchable {
            let e = r.matched.entry(class).or_default();
            e.1 += 1;
            let later = became.get(item).into_iter().flatten();
            if caught.contains(item) || later.into_iter().any(|x| caught.contains(x)) {
                e.0 += 1;
            }
        }
    }
    if r.faults.is_empty() {
        r.violations
            .push("no hostile relay committed a fault: nothing was tested".into());
    }
    Ok(())
}

/// Writes the report where a script can pick it up.
pub fn write_report(r: &SoakReport, path: &Path) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(serde_json::to_string_pretty(&r.to_json())?.as_bytes())?;
    f.write_all(b"\n")
}
