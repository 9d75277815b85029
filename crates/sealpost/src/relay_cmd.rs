//! `sealpost relay …`: run and inspect a relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use sealpost_relay::{Config, Registration, Relay};
use sealpost_store::{Limits, Store};
use serde::Deserialize;
use serde_json::json;

use crate::exit::Failure;
use crate::output::Out;

#[derive(Subcommand, Debug)]
pub enum RelayCmd {
    /// Run a relay: a TLS 1.3 listener that stores sealed messages and
    /// blobs durably until their recipients fetch them
    Serve(Box<ServeArgs>),
    /// Print the address agents pin (host:port/KEY-FINGERPRINT): the public
    /// address the relay last started with, unless --listen is given
    Address(DataArgs),
    /// Print the settings `relay serve` would run with (the same flags and
    /// --config), every default filled in, as a configuration file
    Config(Box<ServeArgs>),
    /// Show mailboxes, queued items and blobs
    Status(DataArgs),
    /// Re-read everything stored and check it against its BLAKE3; exit 1
    /// if anything is damaged
    Scrub(DataArgs),
    /// Move a relay's data (the SQLite store and blob files in DATA/store)
    /// into a cluster's PostgreSQL database and, with --blobs, the blob
    /// bytes into an S3 bucket; then check every row and byte against the
    /// source. Stop the relay first; run again to finish an interrupted
    /// migration
    Migrate(MigrateArgs),
    /// Make ADDRESS your home relay: register your mailbox there and put it
    /// in your contact card (re-share the card afterwards)
    Use {
        /// host:port/KEY, as `sealpost relay address` prints it
        address: String,
    },
    /// Load generator for benchmarks: durable submissions to a relay
    /// (built with the `test-tools` feature only)
    #[cfg(feature = "test-tools")]
    #[command(hide = true)]
    Load(crate::load::LoadArgs),
}

#[derive(Args, Debug)]
pub struct DataArgs {
    /// Relay data directory [default: $XDG_DATA_HOME/sealpost-relay]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The host:port to print in the address (for `address`) [default: the
    /// public address the relay last started with, else 127.0.0.1:7443]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
    /// For `status` and `scrub` of a cluster node: the PostgreSQL database
    /// the nodes share (as `serve --database`; also $SEALPOST_DATABASE),
    /// instead of the SQLite store in DATA/store
    #[arg(
        long,
        value_name = "URL",
        env = "SEALPOST_DATABASE",
        hide_env_values = true
    )]
    pub database: Option<String>,
    /// For `status` and `scrub` of a node whose blob bytes are in an S3
    /// bucket (as `serve --blobs`; also $SEALPOST_BLOBS)
    #[arg(long, value_name = "URL", env = "SEALPOST_BLOBS")]
    pub blobs: Option<String>,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Relay data directory [default: $XDG_DATA_HOME/sealpost-relay]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The cluster's PostgreSQL database (postgres://USER@HOST:PORT/DB;
    /// also $SEALPOST_DATABASE): empty, or holding what an interrupted run
    /// of this migration copied
    #[arg(
        long,
        value_name = "URL",
        env = "SEALPOST_DATABASE",
        hide_env_values = true
    )]
    pub to: String,
    /// The S3 bucket for blob bytes (as `serve --blobs`; also
    /// $SEALPOST_BLOBS). Without it they stay in DATA/store/blobs, where
    /// only a node serving this data directory can read them
    #[arg(long, value_name = "URL", env = "SEALPOST_BLOBS")]
    pub blobs: Option<String>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML configuration file: the same settings as the flags, by the
    /// same names with underscores (`max_blob = "1GiB"`); flags win
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    /// Testing tools (built with the `test-tools` feature only)
    #[cfg(feature = "test-tools")]
    #[command(flatten)]
    testing: TestingArgs,
}

/// `relay serve` flags of the testing tools: compiled in only with the
/// `test-tools` feature (`cargo build --features test-tools`; the test
/// suite turns it on), so the binary people install cannot misbehave.
#[cfg(feature = "test-tools")]
#[derive(Args, Debug)]
pub struct TestingArgs {
    /// TESTING TOOL: misbehave on purpose, to demonstrate that agents catch
    /// a malicious relay. SPEC is `seed=N,all=RATE,CLASS=RATE,…,heal-after=SECS`
    /// with classes drop, duplicate, reorder, delay, flip, truncate, replay,
    /// move, substitute, forge-refusal, forge-report, blob-flip,
    /// blob-truncate. Never use on a relay that carries real mail.
    #[arg(long, value_name = "SPEC", help_heading = "Testing")]
    hostile: Option<String>,
    /// TESTING TOOL: attack pairing by code: `mitm` runs the key exchange
    /// itself with each side on a guessed code, `swap-cards` replaces the
    /// sealed cards. Both sides must fail with nothing pinned
    #[arg(
        long,
        value_name = "ATTACK",
        conflicts_with = "hostile",
        help_heading = "Testing"
    )]
    hostile_pairing: Option<String>,
    /// Append every fault committed under --hostile to FILE (JSON lines)
    #[arg(
        long,
        value_name = "FILE",
        requires = "hostile",
        help_heading = "Testing"
    )]
    hostile_log: Option<PathBuf>,
    /// Public contact cards (files of `sealpost-card-v1:` lines) the hostile
    /// relay may forge receipts and rejections to
    #[arg(
        long,
        value_name = "FILE",
        requires = "hostile",
        help_heading = "Testing"
    )]
    hostile_cards: Vec<PathBuf>,
}

/// Every setting of a relay, declared once: each is a `relay serve` flag
/// and the same key in the `--config` file (flags win). A setting not
/// given anywhere takes the default shown (`relay config` prints the
/// values in effect).
#[derive(Args, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on [default: 127.0.0.1:7443]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Data directory: store, certificate, keys [default:
    /// $XDG_DATA_HOME/sealpost-relay]
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The host:port agents reach this relay at, printed in its address and
    /// kept for `relay address` [default: the first --name with the listen
    /// port, else the listen address; needed when listening on 0.0.0.0]
    #[arg(long, value_name = "HOST:PORT")]
    public_address: Option<String>,
    /// Serve Prometheus metrics (GET /metrics) on this address; keep it on
    /// loopback [default: none]
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// A real certificate chain (PEM) instead of the self-signed one
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// The relay's signing key (for signed refusals) from this file instead
    /// of DATA/relay-signing.key, for several relay nodes to share: copy
    /// one node's DATA/relay-signing.key (32 bytes, mode 0600) [default:
    /// DATA/relay-signing.key, made on first start]
    #[arg(long, value_name = "FILE")]
    signing_key: Option<PathBuf>,
    /// Keep the relay's ledger (mailboxes, items, queues) in PostgreSQL,
    /// postgres://USER[:PASSWORD]@HOST:PORT/DATABASE, shared by every
    /// relay node given the same database (each with its own --data, the
    /// same --signing-key and certificate); the schema is made on first
    /// start. Blob bytes stay in DATA/store/blobs unless --blobs. Also
    /// from $SEALPOST_DATABASE (keeps a password out of the process list)
    /// [default: SQLite in DATA/store]
    #[arg(
        long,
        value_name = "URL",
        env = "SEALPOST_DATABASE",
        hide_env_values = true
    )]
    database: Option<String>,
    /// Keep blob bytes (files) in an S3-compatible bucket,
    /// s3://BUCKET[/PREFIX]?endpoint=http(s)://HOST:PORT[&region=R], shared
    /// by the cluster's nodes, instead of DATA/store/blobs; the key is read
    /// from $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY. Also from
    /// $SEALPOST_BLOBS [default: files in DATA/store/blobs]
    #[arg(long, value_name = "URL", env = "SEALPOST_BLOBS")]
    blobs: Option<String>,
    /// Host name for the self-signed certificate made on first start, and
    /// (the first) for the public address; repeat for several
    #[arg(long = "name", value_name = "HOST")]
    #[serde(default, alias = "names")]
    name: Vec<String>,
    /// Who may register a new mailbox: open (any key), allow-list (the
    /// keys of the cards in --allow), closed (no new mailboxes; existing
    /// ones keep working) [default: open]
    #[arg(long, value_name = "POLICY")]
    registration: Option<RegistrationPolicy>,
    /// File of contact cards (`sealpost id` output, one per line) whose
    /// keys may register under --registration allow-list, or relay keys
    /// (64 hex digits) of relays that use this one as their gateway; read
    /// at start
    #[arg(long, value_name = "FILE")]
    allow: Option<PathBuf>,
    /// The most mailboxes this relay registers [default: no cap]
    #[arg(long, value_name = "N")]
    max_mailboxes: Option<u64>,
    /// Most simultaneous connections [default: what the file-descriptor
    /// limit holds, raised to its hard limit at start, less 256; at most
    /// 65536]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Most simultaneous connections from one source address [default: 256]
    #[arg(long, value_name = "N")]
    max_connections_per_address: Option<usize>,
    /// Bytes one mailbox may hold, e.g. 4GiB or 500MB [default: 4GiB]
    #[arg(long, value_name = "SIZE")]
    mailbox_quota: Option<Size>,
    /// Share of each mailbox's quota, in percent, that what arrives from
    /// one source address (an IPv4 address, an IPv6 /64) may hold: a
    /// stranger flooding a mailbox from one address fills this much and
    /// leaves the rest to others; 100 turns it off [default: 50]
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    source_share: Option<u8>,
    /// Largest blob (a sealed file: its size plus 16 bytes per 1 MiB)
    /// [default: 2GiB]
    #[arg(long, value_name = "SIZE")]
    max_blob: Option<Size>,
    /// Free space kept on the data directory's file system for deletes:
    /// below it, new items and blobs are refused ("the relay's disk is
    /// full") [default: 64MiB]
    #[arg(long, value_name = "SIZE")]
    min_free_space: Option<Size>,
    /// Largest message, at most 1MiB (larger content goes as a file)
    /// [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    max_message: Option<Size>,
    /// How long a connection authenticated to a mailbox may stay silent,
    /// e.g. 300s or 5m [default: 5m]
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<Secs>,
    /// How long a connection not authenticated to a mailbox (a sender) may
    /// stay silent [default: 30s]
    #[arg(long, value_name = "DURATION")]
    unauthenticated_idle_timeout: Option<Secs>,
    /// Time a client has to finish the TLS handshake [default: 10s]
    #[arg(long, value_name = "DURATION")]
    handshake_timeout: Option<Secs>,
    /// Time a client has to finish a frame it started, and to take the
    /// answers the relay writes (slow clients, and clients that do not
    /// read, are cut off) [default: 30s]
    #[arg(long, value_name = "DURATION")]
    frame_timeout: Option<Secs>,
    /// Time between sweeps of expired items and blobs [default: 1m]
    #[arg(long, value_name = "DURATION")]
    sweep_interval: Option<Secs>,
    /// Requests per second one connection may make [default: 50000]
    #[arg(long, value_name = "N")]
    rate_per_connection: Option<f64>,
    /// New connections per second one address may open (bursts of four
    /// times as many) [default: 500]
    #[arg(long, value_name = "N")]
    rate_per_address: Option<f64>,
    /// on: pass messages on to other relays for this relay's own mailbox
    /// owners (from a queue on disk, retrying until taken or expired;
    /// never for anyone else); off: refuse that, signed, and their agents
    /// submit to other relays themselves [default: on]
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    forward: Option<String>,
    /// An outbound gateway, by its address (what `relay address` prints
    /// on it, HOST:PORT/FINGERPRINT): hand
    /// everything this relay forwards to that relay, which passes it on,
    /// instead of to each recipient's relay. This relay is a mailbox owner
    /// there with its relay key (the gateway must let it register: open,
    /// or its relay key in the gateway's --allow file); the gateway's
    /// notices come back from that mailbox to the senders here
    /// [default: none, hand on directly]
    #[arg(long, value_name = "ADDRESS")]
    forward_via: Option<String>,
    /// A relay whose forwarded items this relay refuses (signed, so their
    /// senders learn it), by its relay key (64 hex digits: `sealpost relay
    /// address --json` on that relay prints it as relay_key); repeat for
    /// several. Its users can still submit here directly, as anyone can
    #[arg(long = "peer-deny", value_name = "KEY")]
    #[serde(default)]
    peer_deny: Vec<String>,
    /// Take forwarded items only from these relays (by relay key, as
    /// --peer-deny); repeat for several [default: from any relay]
    #[arg(long = "peer-allow", value_name = "KEY")]
    #[serde(default)]
    peer_allow: Vec<String>,
    /// Forwarded items (and blob pieces) per second one relay may hand in,
    /// over all its connections (bursts of four times as many); past it,
    /// that relay is told to try again later [default: 5000]
    #[arg(long, value_name = "N")]
    peer_rate: Option<f64>,
    /// Pairing invitations (`sealpost invite`) open at once on this relay,
    /// each at most 10 minutes and a few KiB; 0 turns pairing off (its
    /// clients are told so) [default: 1024]
    #[arg(long, value_name = "N")]
    pair_slots: Option<usize>,
}

impl Settings {
    /// These settings, with `file`'s where none is given here.
    fn or(self, file: Settings) -> Settings {
        Settings {
            listen: self.listen.or(file.listen),
            data: self.data.or(file.data),
            public_address: self.public_address.or(file.public_address),
            metrics: self.metrics.or(file.metrics),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            signing_key: self.signing_key.or(file.signing_key),
            database: self.database.or(file.database),
            blobs: self.blobs.or(file.blobs),
            name: if self.name.is_empty() {
                file.name
            } else {
                self.name
            },
            registration: self.registration.or(file.registration),
            allow: self.allow.or(file.allow),
            max_mailboxes: self.max_mailboxes.or(file.max_mailboxes),
            max_connections: self.max_connections.or(file.max_connections),
            max_connections_per_address: self
                .max_connections_per_address
                .or(file.max_connections_per_address),
            mailbox_quota: self.mailbox_quota.or(file.mailbox_quota),
            source_share: self.source_share.or(file.source_share),
            max_blob: self.max_blob.or(file.max_blob),
            min_free_space: self.min_free_space.or(file.min_free_space),
            max_message: self.max_message.or(file.max_message),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            unauthenticated_idle_timeout: self
                .unauthenticated_idle_timeout
                .or(file.unauthenticated_idle_timeout),
            handshake_timeout: self.handshake_timeout.or(file.handshake_timeout),
            frame_timeout: self.frame_timeout.or(file.frame_timeout),
            sweep_interval: self.sweep_interval.or(file.sweep_interval),
            rate_per_connection: self.rate_per_connection.or(file.rate_per_connection),
            rate_per_address: self.rate_per_address.or(file.rate_per_address),
            forward: self.forward.or(file.forward),
            forward_via: self.forward_via.or(file.forward_via),
            peer_deny: if self.peer_deny.is_empty() {
                file.peer_deny
            } else {
                self.peer_deny
            },
            peer_allow: if self.peer_allow.is_empty() {
                file.peer_allow
            } else {
                self.peer_allow
            },
            peer_rate: self.peer_rate.or(file.peer_rate),
            pair_slots: self.pair_slots.or(file.pair_slots),
        }
    }
}

/// Who may register (the `--registration` setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegistrationPolicy {
    Open,
    AllowList,
    Closed,
}

/// A size in bytes: a number, or with a unit (`64MiB`, `2GiB`; k, M, G
/// are powers of 1000, KiB, MiB, GiB of 1024), in a flag or the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(u64);

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|_| format!("{s:?} is not a size (examples: 1048576, 500MB, 64MiB, 2GiB)"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration: `30s`, `5m`, `1h`, or a number of seconds, in a flag or the
/// file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secs(Duration);

impl std::str::FromStr for Secs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let d = match s.parse::<u64>() {
            Ok(n) => Duration::from_secs(n),
            Err(_) => humantime::parse_duration(s)
                .map_err(|e| format!("{s:?} is not a duration: {e} (examples: 30s, 5m, 1h)"))?,
        };
        Ok(Secs(d.max(Duration::from_secs(1))))
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(n) => Ok(Secs(Duration::from_secs(n.max(1)))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn default_data() -> anyhow::Result<PathBuf> {
    directories::ProjectDirs::from("", "", "sealpost-relay")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or_else(|| anyhow!("cannot find a data directory; pass --data DIR"))
}

fn data_dir(d: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match d {
        Some(d) => Ok(d.clone()),
        None => default_data(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run(cmd: RelayCmd, out: &Out) -> Result<(), Failure> {
    match cmd {
        RelayCmd::Serve(a) => serve(*a, out),
        RelayCmd::Config(a) => print_config(*a, out),
        RelayCmd::Address(a) => address(&a, out),
        RelayCmd::Status(a) => status(&a, out),
        RelayCmd::Scrub(a) => scrub(&a, out),
        RelayCmd::Migrate(a) => migrate(&a, out),
        #[cfg(feature = "test-tools")]
        RelayCmd::Load(a) => crate::load::run(a, out),
        RelayCmd::Use { .. } => Err(Failure::usage(anyhow::anyhow!(
            "`relay use` needs a home directory"
        ))),
    }
}

/// The `--hostile` spec asked for, if any.
fn hostile_spec(a: &ServeArgs) -> Option<String> {
    #[cfg(feature = "test-tools")]
    return a.testing.hostile.clone().or_else(|| {
        a.testing
            .hostile_pairing
            .as_ref()
            .map(|p| format!("pairing={p}"))
    });
    #[cfg(not(feature = "test-tools"))]
    {
        let _ = a;
        None
    }
}

#[cfg(feature = "test-tools")]
fn hostile(
    a: &TestingArgs,
) -> anyhow::Result<Option<std::sync::Arc<dyn sealpost_relay::tamper::Tamper>>> {
    if let Some(p) = &a.hostile_pairing {
        let attack = sealpost_testkit::pairing::PairAttack::parse(p)
            .ok_or_else(|| anyhow!("--hostile-pairing is mitm or swap-cards, not {p:?}"))?;
        tracing::warn!("HOSTILE RELAY (testing tool): attacks pairing ({p})");
        return Ok(Some(std::sync::Arc::new(
            sealpost_testkit::pairing::PairMitm::new(attack),
        )));
    }
    let Some(spec) = &a.hostile else {
        return Ok(None);
    };
    let spec = sealpost_testkit::Spec::parse(spec).context("invalid --hostile")?;
    let mut h = sealpost_testkit::Hostile::new(spec.clone(), a.hostile_log.as_deref())
        .context("cannot open the --hostile-log file")?;
    let mut texts = Vec::new();
    for p in &a.hostile_cards {
        texts.push(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        );
    }
    let n = h.learn_cards(&texts);
    tracing::warn!("HOSTILE RELAY (testing tool): {spec}; {n} cards known for forged reports");
    Ok(Some(std::sync::Arc::new(h)))
}

/// The settings from the flags and the `--config` file (flags win).
fn settings(a: &mut ServeArgs) -> anyhow::Result<Settings> {
    let file: Settings = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("invalid configuration in {}", p.display()))?
        }
        None => Settings::default(),
    };
    Ok(std::mem::take(&mut a.settings).or(file))
}

/// The relay's configuration and the public address agents reach it at
/// (None: listening on every interface with no name to give).
fn build_config(mut a: ServeArgs) -> anyhow::Result<(Config, Option<String>)> {
    #[cfg(feature = "test-tools")]
    let tamper = hostile(&a.testing)?;
    let s = settings(&mut a)?;
    let listen = s
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7443)));
    let data = match s.data {
        Some(d) => d,
        None => default_data()?,
    };
    let public = match (&s.public_address, s.name.first()) {
        (Some(p), _) => {
            // What a card can carry (1 to 253 printable ASCII bytes,
            // PROTOCOL §3), ending in a port.
            let fits = (1..=253).contains(&p.len())
                && p.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'/');
            let port = p.rsplit_once(':').map(|(h, port)| (h, port.parse::<u16>()));
            if !fits || !matches!(port, Some((h, Ok(_))) if !h.is_empty()) {
                return Err(anyhow!(
                    "public_address {p:?} is not host:port (e.g. relay.example.org:7443)"
                ));
            }
            Some(p.clone())
        }
        (None, Some(n)) => Some(format!("{n}:{}", listen.port())),
        (None, None) if listen.ip().is_unspecified() => None,
        (None, None) => Some(listen.to_string()),
    };
    let mut c = Config::new(listen, data);
    c.metrics = s.metrics;
    c.cert_files = match (s.cert, s.key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(anyhow!(
                "a certificate needs its key: set both cert and key"
            ))
        }
    };
    c.cert_names = s.name;
    c.signing_key_file = s.signing_key;
    if let Some(url) = &s.database {
        // Checked now, so that a typo is told before anything starts.
        sealpost_store::postgres::check_url(url)?;
    }
    c.database = s.database;
    if let Some(url) = &s.blobs {
        // Checked now (the URL, and that the key is set), so that a typo
        // is told before anything starts.
        sealpost_store::s3::S3Config::parse(url).map_err(|e| anyhow!(e))?;
    }
    c.blobs = s.blobs;
    // Connections need file descriptors: the soft limit is raised to the
    // hard one, and the cap follows what that holds.
    let fds = sealpost_relay::limits::raise_fd_limit();
    let fit = fds.map(|(_, now)| sealpost_relay::limits::connections_for_fds(now));
    c.max_connections = match (s.max_connections, fit) {
        (Some(n), Some(fit)) if n > fit => {
            tracing::warn!(
                "max_connections {n} is more than the file-descriptor limit holds; using {fit} (raise LimitNOFILE / ulimit -n)"
            );
            fit
        }
        (Some(n), _) => n.max(1),
        (None, Some(fit)) => fit.min(sealpost_relay::limits::MAX_DEFAULT_CONNECTIONS),
        (None, None) => c.max_connections,
    };
    if let Some((before, now)) = fds {
        tracing::info!(
            "can hold {} connections: file-descriptor limit {now}{}, {} kept for the store, blob files and metrics{}",
            c.max_connections,
            if now > before { format!(" (raised from {before})") } else { String::new() },
            sealpost_relay::limits::FD_RESERVE,
            if s.max_connections.is_some() { "; max_connections set" } else { "" }
        );
    }
    if let Some(n) = s.max_connections_per_address {
        c.max_connections_per_address = n.max(1);
    }
    let mut limits = Limits::default();
    if let Some(Size(q)) = s.mailbox_quota {
        limits.mailbox_quota = q;
    }
    if let Some(Size(m)) = s.max_blob {
        limits.max_blob = m;
    }
    if let Some(p) = s.source_share {
        if !(1..=100).contains(&p) {
            return Err(anyhow!(
                "source_share is a percentage from 1 to 100, not {p}"
            ));
        }
        limits.source_share_percent = p;
    }
    if let Some(Size(m)) = s.min_free_space {
        limits.min_free_space = m;
    }
    limits.max_mailboxes = s.max_mailboxes;
    c.limits = limits;
    c.registration = match (s.registration.unwrap_or(RegistrationPolicy::Open), &s.allow) {
        (RegistrationPolicy::Open, None) => Registration::Open,
        (RegistrationPolicy::Closed, None) => Registration::Closed,
        (RegistrationPolicy::AllowList, Some(p)) => Registration::AllowList(allowed_keys(p)?),
        (RegistrationPolicy::AllowList, None) => {
            return Err(anyhow!(
                "registration = allow-list needs allow = FILE (contact cards of the keys it allows)"
            ))
        }
        (_, Some(_)) => {
            return Err(anyhow!(
                "allow = FILE is for registration = allow-list; set that too, or drop allow"
            ))
        }
    };
    match s.forward.as_deref() {
        None | Some("on") => c.forwarding.enabled = true,
        Some("off") => c.forwarding.enabled = false,
        Some(other) => return Err(anyhow!("forward is \"on\" or \"off\", not {other:?}")),
    }
    if let Some(Size(m)) = s.max_message {
        if m > sealpost_proto::relay::MAX_MESSAGE as u64 {
            return Err(anyhow!(
                "max_message is at most 1MiB (1048576 bytes); larger content travels as a file"
            ));
        }
        c.max_message = (m as usize).max(1);
    }
    if let Some(Secs(d)) = s.idle_timeout {
        c.idle_timeout = d;
    }
    if let Some(Secs(d)) = s.unauthenticated_idle_timeout {
        c.unauthenticated_idle_timeout = d;
    }
    if let Some(Secs(d)) = s.handshake_timeout {
        c.handshake_timeout = d;
    }
    if let Some(Secs(d)) = s.frame_timeout {
        c.frame_timeout = d;
    }
    if let Some(Secs(d)) = s.sweep_interval {
        c.sweep_interval = d;
    }
    if let Some(r) = s.rate_per_connection {
        c.rate_per_connection = (r.max(1.0), r.max(1.0));
    }
    if let Some(r) = s.rate_per_address {
        c.rate_per_address = (r.max(1.0), (r * 4.0).max(1.0));
    }
    if let Some(v) = &s.forward_via {
        let via = sealpost_relay::RelayAddress::parse(v.trim()).ok_or_else(|| {
            anyhow!("forward_via: {v:?} is not a relay address (HOST:PORT/FINGERPRINT, as `sealpost relay address` prints it on the gateway)")
        })?;
        c.forwarding.via = Some(via);
    }
    c.peers.deny = relay_keys("peer_deny", &s.peer_deny)?;
    if !s.peer_allow.is_empty() {
        c.peers.allow = Some(relay_keys("peer_allow", &s.peer_allow)?);
    }
    if let Some(r) = s.peer_rate {
        if !(r.is_finite() && r > 0.0) {
            return Err(anyhow!("peer_rate is a positive number, not {r}"));
        }
        c.peers.rate = (r, r * 4.0);
    }
    if let Some(n) = s.pair_slots {
        c.pairing.max_slots = n;
    }
    #[cfg(feature = "test-tools")]
    {
        c.tamper = tamper;
    }
    Ok((c, public))
}

/// Relay keys given as 64 hex digits (the `setting` named in errors).
fn relay_keys(
    setting: &str,
    texts: &[String],
) -> anyhow::Result<std::collections::HashSet<[u8; 32]>> {
    texts
        .iter()
        .map(|t| {
            let t = t.trim();
            let bytes = (t.len() == 64 && t.is_ascii())
                .then(|| {
                    (0..32)
                        .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok())
                        .collect::<Option<Vec<u8>>>()
                })
                .flatten();
            bytes
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    anyhow!(
                        "{setting}: {t:?} is not a relay key (64 hex digits; `sealpost relay address --json` on that relay prints its relay_key)"
                    )
                })
        })
        .collect()
}

/// The signing keys of the contact cards in `path` (one per line; blank
/// lines and `#` comments skipped).
fn allowed_keys(path: &Path) -> anyhow::Result<std::collections::HashSet<[u8; 32]>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the allow-list {}", path.display()))?;
    let mut keys = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // A relay key (64 hex digits: a relay that forwards through this
        // one as its outbound gateway, `relay address --json`).
        if let Ok(k) = relay_keys("allow", &[line.to_owned()]) {
            keys.extend(k);
            continue;
        }
        let card = sealpost_proto::ContactCard::from_text(line).map_err(|e| {
            anyhow!(
                "{} line {}: not a contact card ({e}); put one `sealpost id` card per line",
                path.display(),
                n + 1
            )
        })?;
        keys.insert(*card.public().signing_bytes());
    }
    Ok(keys)
}

/// The settings in effect, as a `--config` file would set them.
fn effective_toml(c: &Config, public: &Option<String>) -> String {
    let secs = |d: Duration| format!("\"{}\"", humantime::format_duration(d));
    let size = |n: u64| match size_text(n) {
        t if t.ends_with('B') => format!("\"{t}\""),
        t => t,
    };
    let opt = |o: Option<String>| o.map(|v| format!("{v:?}"));
    let mut lines: Vec<(&str, Option<String>)> = vec![
        ("listen", Some(format!("\"{}\"", c.listen))),
        ("data", Some(format!("{:?}", c.data.display().to_string()))),
        ("public_address", opt(public.clone())),
        ("metrics", opt(c.metrics.map(|m| m.to_string()))),
        (
            "cert",
            opt(c.cert_files.as_ref().map(|f| f.0.display().to_string())),
        ),
        (
            "key",
            opt(c.cert_files.as_ref().map(|f| f.1.display().to_string())),
        ),
        (
            "signing_key",
            opt(c.signing_key_file.as_ref().map(|f| f.display().to_string())),
        ),
        ("name", Some(format!("{:?}", c.cert_names))),
        (
            "database",
            opt(c
                .database
                .as_deref()
                .map(sealpost_store::postgres::redacted)),
        ),
        ("blobs", opt(c.blobs.clone())),
    ];
    lines.push((
        "registration",
        Some(
            match &c.registration {
                Registration::Open => "\"open\"",
                Registration::AllowList(_) => "\"allow-list\"",
                Registration::Closed => "\"closed\"",
            }
            .to_owned(),
        ),
    ));
    lines.extend([
        (
            "max_mailboxes",
            c.limits.max_mailboxes.map(|n| n.to_string()),
        ),
        ("max_connections", Some(c.max_connections.to_string())),
        (
            "max_connections_per_address",
            Some(c.max_connections_per_address.to_string()),
        ),
        ("mailbox_quota", Some(size(c.limits.mailbox_quota))),
        (
            "source_share",
            Some(c.limits.source_share_percent.to_string()),
        ),
        ("max_blob", Some(size(c.limits.max_blob))),
        ("min_free_space", Some(size(c.limits.min_free_space))),
        ("max_message", Some(size(c.max_message as u64))),
        ("idle_timeout", Some(secs(c.idle_timeout))),
        (
            "unauthenticated_idle_timeout",
            Some(secs(c.unauthenticated_idle_timeout)),
        ),
        ("handshake_timeout", Some(secs(c.handshake_timeout))),
        ("frame_timeout", Some(secs(c.frame_timeout))),
        ("sweep_interval", Some(secs(c.sweep_interval))),
        (
            "rate_per_connection",
            Some(c.rate_per_connection.0.to_string()),
        ),
        ("rate_per_address", Some(c.rate_per_address.0.to_string())),
        (
            "forward_via",
            opt(c.forwarding.via.as_ref().map(|v| v.to_checked_text())),
        ),
        ("peer_rate", Some(c.peers.rate.0.to_string())),
        ("pair_slots", Some(c.pairing.max_slots.to_string())),
        ("peer_deny", Some(keys_toml(c.peers.deny.iter()))),
        (
            "peer_allow",
            c.peers.allow.as_ref().map(|a| keys_toml(a.iter())),
        ),
        (
            "forward",
            Some(
                if c.forwarding.enabled {
                    "\"on\""
                } else {
                    "\"off\""
                }
                .to_owned(),
            ),
        ),
    ]);
    let mut out = String::new();
    for (k, v) in lines {
        match v {
            Some(v) => out.push_str(&format!("{k} = {v}\n")),
            None => out.push_str(&format!("# {k} (not set)\n")),
        }
    }
    out
}

/// Relay keys as a TOML array of hex strings, sorted.
fn keys_toml<'a>(keys: impl Iterator<Item = &'a [u8; 32]>) -> String {
    let mut v: Vec<String> = keys
        .map(|k| format!("\"{}\"", sealpost_proto::hex(k)))
        .collect();
    v.sort();
    format!("[{}]", v.join(", "))
}

/// A size as a setting is written: the largest binary unit that divides it
/// exactly (`64MiB`), else bytes.
fn size_text(n: u64) -> String {
    for (unit, name) in [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ] {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{}{name}", n / unit);
        }
    }
    n.to_string()
}

/// `relay config`: the settings a `relay serve` with the same flags would
/// run with, as a configuration file.
fn print_config(a: ServeArgs, out: &Out) -> Result<(), Failure> {
    let (c, public) = build_config(a)?;
    let text = effective_toml(&c, &public);
    let table: toml::Table = toml::from_str(&text).context("the effective settings")?;
    out.report(serde_json::to_value(table).unwrap_or_default(), || text)
}

fn serve(a: ServeArgs, out: &Out) -> Result<(), Failure> {
    let config_hostile = hostile_spec(&a);
    let (mut config, public) = build_config(a)?;
    config.public_address = public.clone();
    let rt = runtime()?;
    rt.block_on(async {
        let listen = config.listen;
        let data = config.data.clone();
        let metrics = config.metrics;
        let relay = Relay::bind(config)
            .await
            .with_context(|| format!("cannot start the relay on {listen} with data in {}", data.display()))?;
        let addr = relay.address().clone();
        let hostile = config_hostile;
        // What agents pin: the public address with this key, kept in the
        // data directory so `relay address` needs no flags.
        let for_agents = public.map(|host_port| sealpost_relay::RelayAddress {
            host_port,
            pin: addr.pin,
        });
        if for_agents.is_none() {
            tracing::warn!(
                "listening on every interface ({}) with no public address: agents cannot be told where to connect; set --public-address HOST:PORT (or --name HOST)",
                addr.host_port
            );
        }
        out.report(
            json!({
                "hostile": hostile,
                "listening": addr.host_port,
                "address": for_agents.as_ref().map(|a| a.to_checked_text()),
                "fingerprint": addr.pin.to_text(),
                "relay_key": sealpost_proto::hex(relay.relay_key().as_bytes()),
                "new_certificate": relay.created_cert(),
                "data": data,
                "metrics": metrics,
            }),
            || {
                format!(
                    "{}sealpost relay listening on {} (TLS 1.3){}\nKey fingerprint: {}\nRelay key (for other relays' --peer-allow/--peer-deny): {}\nRelay address for agents: {}\n",
                    if hostile.is_some() { "WARNING: HOSTILE TESTING RELAY — it tampers with what it carries on purpose\n" } else { "" },
                    addr.host_port,
                    if relay.created_cert() { ", new self-signed certificate" } else { "" },
                    addr.pin.to_text(),
                    sealpost_proto::hex(relay.relay_key().as_bytes()),
                    match &for_agents {
                        Some(a) => a.to_checked_text(),
                        None => format!("unknown — set --public-address HOST:PORT (HOST:{}/{})", listen.port(), addr.pin.to_text()),
                    },
                )
            },
        )?;
        // Under systemd (Type=notify): ready now, stopping on the signal.
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!("cannot tell systemd the relay is ready: {e}");
        }
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            tracing::info!("shutting down: no new connections; finishing commits");
        };
        relay.serve(shutdown).await.context("the relay failed")?;
        Ok::<(), Failure>(())
    })
}

fn address(a: &DataArgs, out: &Out) -> Result<(), Failure> {
    let dir = data_dir(&a.data)?;
    let cert = dir.join("cert.pem");
    if !cert.exists() {
        return Err(anyhow!(
            "no relay certificate in {}; start the relay once with `sealpost relay serve`",
            dir.display()
        )
        .into());
    }
    let c = sealpost_relay::tls::load(&cert, &dir.join("key.pem"))
        .context("cannot read the relay certificate")?;
    // The public address the relay last started with, unless --listen
    // names another; a relay that never said one is on the default.
    let kept = std::fs::read_to_string(dir.join("address"))
        .ok()
        .and_then(|t| sealpost_relay::RelayAddress::parse(t.trim()));
    let host_port = match (a.listen, kept) {
        (Some(l), _) => l.to_string(),
        (None, Some(k)) => k.host_port,
        (None, None) => "127.0.0.1:7443".to_owned(),
    };
    let addr = sealpost_relay::RelayAddress {
        host_port,
        pin: c.pin,
    };
    // The relay key other relays' operators list (--peer-allow/-deny),
    // from the signing key file it made on first start (absent when it
    // runs with --signing-key elsewhere: then null).
    let relay_key = sealpost_relay::relay_key_in(&dir.join("relay-signing.key"))
        .map(|k| sealpost_proto::hex(&k));
    out.report(
        json!({"address": addr.to_checked_text(), "fingerprint": c.pin.to_text(), "relay_key": relay_key}),
        || format!("{}\n", addr.to_checked_text()),
    )
}

fn open_store(a: &DataArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<Store> {
    let dir = data_dir(&a.data)?;
    let store_dir = dir.join("store");
    if a.database.is_some() || a.blobs.is_some() {
        return rt
            .block_on(sealpost_relay::open_store(
                a.database.as_deref(),
                a.blobs.as_deref(),
                &store_dir,
                Limits::default(),
            ))
            .context("cannot open the relay's store");
    }
    if !store_dir.join("relay.db").exists() {
        return Err(anyhow!("no relay store in {}", dir.display()));
    }
    Store::open(&store_dir, Limits::default()).context("cannot open the relay store")
}

fn status(a: &DataArgs, out: &Out) -> Result<(), Failure> {
    let rt = runtime()?;
    let store = open_store(a, &rt)?;
    let (t, space, queue) = rt.block_on(async {
        (
            store.totals().await,
            store.db_space().await,
            store.forward_queue().await,
        )
    });
    store.close();
    let queue = queue.context("cannot read the forward queue")?;
    let sealpost_store::Totals {
        mailboxes,
        items,
        item_bytes: bytes,
        blobs,
    } = t.context("cannot read the store")?;
    let sealpost_store::LedgerSpace {
        size: db_bytes,
        free: db_free,
    } = space.context("cannot read the store")?;
    let forward: Vec<serde_json::Value> = queue
        .iter()
        .map(|q| {
            json!({
                "next_relay": q.next.addr,
                "next_pin": sealpost_proto::hex(&q.next.pin),
                "items": q.items,
                "bytes": q.bytes,
                "oldest": q.oldest,
                "next_attempt": q.next_at,
                "attempts": q.attempts,
                "last_error": q.last_error,
            })
        })
        .collect();
    // PostgreSQL reuses freed space by its own autovacuum and does not
    // say how much is free: null, not a made-up 0.
    let free_json = if a.database.is_some() {
        serde_json::Value::Null
    } else {
        json!(db_free)
    };
    out.report(
        json!({"mailboxes": mailboxes, "items": items, "item_bytes": bytes, "blobs": blobs,
               "db_bytes": db_bytes, "db_free_bytes": free_json, "forward_queue": forward}),
        || {
            let mut s = format!(
                "Mailboxes: {mailboxes}\nQueued items: {items} ({bytes} bytes)\nBlobs: {blobs}\n"
            );
            if a.database.is_some() {
                s += &format!(
                    "Database (PostgreSQL, shared by the cluster's nodes): {db_bytes} bytes; its own autovacuum reuses freed space\n"
                );
            } else {
                s += &format!(
                    "Database: {db_bytes} bytes, {db_free} of them free (beyond {} bytes kept for new items, given back while the relay is idle)\n",
                    sealpost_store::VACUUM_KEEP_PAGES * 4096
                );
            }
            if queue.is_empty() {
                s += "Forward queue: empty\n";
            }
            for q in &queue {
                s += &format!(
                    "Forward queue to {}: {} items ({} bytes), oldest since {}, next attempt {}{}\n",
                    q.next.addr,
                    q.items,
                    q.bytes,
                    sealpost_agent::views::time_ms(q.oldest * 1000),
                    sealpost_agent::views::time_ms(q.next_at * 1000),
                    match &q.last_error {
                        Some(e) => format!(", {} attempts failed, last: {e}", q.attempts),
                        None => String::new(),
                    }
                );
            }
            s
        },
    )
}

fn migrate(a: &MigrateArgs, out: &Out) -> Result<(), Failure> {
    let dir = data_dir(&a.data)?;
    let store_dir = dir.join("store");
    if !store_dir.join("relay.db").exists() {
        return Err(anyhow!(
            "no relay store in {} (nothing to migrate); --data names the directory `relay serve --data` ran on",
            dir.display()
        )
        .into());
    }
    // No relay may serve the directory while it is copied.
    let _lock = sealpost_relay::lock_data_dir(&dir).context("cannot migrate")?;
    let rt = runtime()?;
    let json = out.json();
    let mut progress = move |s: &str| {
        if !json {
            crate::output::to_stderr(&format!("{s}\n"));
        }
    };
    let r = rt
        .block_on(sealpost_store::migrate::migrate(
            &store_dir,
            &a.to,
            a.blobs.as_deref(),
            &mut progress,
        ))
        .context("the migration has not finished (run the same command again to go on)")?;
    let to = sealpost_store::postgres::redacted(&a.to);
    let blobs_at = match &a.blobs {
        Some(b) => b.split('?').next().unwrap_or(b).to_owned(),
        None => store_dir.join("blobs").display().to_string(),
    };
    out.report(
        json!({
            "database": to,
            "blobs": blobs_at,
            "resumed": r.resumed,
            "already_done": r.already_done,
            "mailboxes": r.mailboxes,
            "items": r.items,
            "item_bytes": r.item_bytes,
            "blobs_moved": r.blobs,
            "blob_bytes": r.blob_bytes,
            "blob_bytes_copied": r.blob_bytes_copied,
            "shares": r.shares,
            "forwards": r.forwards,
            "handed": r.handed,
            "damaged_in_source": r.damaged_in_source,
        }),
        || {
            let mut s = format!(
                "{} {} mailboxes, {} items ({} bytes), {} blobs ({} bytes), {} forwards and {} handed items to {to}; every row compared with the source and every byte read back and hashed.\n",
                if r.already_done { "Already migrated and checked again:" } else { "Migrated" },
                r.mailboxes,
                r.items,
                r.item_bytes,
                r.blobs,
                r.blob_bytes,
                r.forwards,
                r.handed
            );
            s += &format!("Blob bytes: {blobs_at}.\n");
            if r.damaged_in_source > 0 {
                s += &format!(
                    "{} items were already damaged in the source (they do not match their BLAKE3); they were copied as they are and `relay scrub` reports them.\n",
                    r.damaged_in_source
                );
            }
            s += &format!(
                "Serve with: sealpost relay serve --data {} --database URL{}\nThe old store in {} now refuses to open; it can be removed once the cluster runs.\n",
                dir.display(),
                if a.blobs.is_some() { " --blobs URL" } else { "" },
                store_dir.display()
            );
            s
        },
    )
}

fn scrub(a: &DataArgs, out: &Out) -> Result<(), Failure> {
    let rt = runtime()?;
    let store = open_store(a, &rt)?;
    let r = rt.block_on(store.scrub());
    store.close();
    let r = r.context("the scrub could not read the store")?;
    let damaged = r.damaged_items.len() + r.damaged_blobs.len();
    out.report(
        json!({
            "items": r.items,
            "damaged_items": r.damaged_items,
            "blobs": r.blobs,
            "damaged_blobs": r.damaged_blobs.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        }),
        || {
            let mut s = format!(
                "Checked {} items and {} blobs: {damaged} damaged.\n",
                r.items, r.blobs
            );
            for seq in &r.damaged_items {
                s += &format!("  item {seq}: payload does not match its BLAKE3\n");
            }
            for b in &r.damaged_blobs {
                s += &format!("  blob {}: content does not match its BLAKE3\n", b);
            }
            s
        },
    )?;
    if damaged > 0 {
        return Err(Failure {
            code: crate::exit::Exit::Error,
            class: "damaged",
            error: Some(anyhow!("{damaged} stored objects are damaged; their senders will retransmit if their recipients have not fetched them")),
        });
    }
    Ok(())
}
