//! `sealpost relay …`: run and inspect a relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use sealpost_relay::{Config, Relay};
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
    /// Print the address agents pin (host:port/KEY-FINGERPRINT)
    Address(DataArgs),
    /// Show mailboxes, queued items and blobs
    Status(DataArgs),
    /// Re-read everything stored and check it against its BLAKE3; exit 1
    /// if anything is damaged
    Scrub(DataArgs),
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
    /// The address the relay listens on (for `address`)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Data directory (store, certificate, keys) [default: $XDG_DATA_HOME/sealpost-relay]
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// TOML configuration file; flags override it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (keep it on loopback)
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// A real certificate chain (PEM) instead of the self-signed one
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Host name(s) for the self-signed certificate made on first start
    #[arg(long = "name", value_name = "HOST")]
    names: Vec<String>,
    /// Most simultaneous connections
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Most simultaneous connections from one source address [default: 256]
    #[arg(long, value_name = "N")]
    max_connections_per_address: Option<usize>,
    /// Bytes one mailbox may hold
    #[arg(long, value_name = "BYTES")]
    mailbox_quota: Option<u64>,
    /// Largest blob in bytes
    #[arg(long, value_name = "BYTES")]
    max_blob: Option<u64>,
    /// Free bytes kept on the data directory's file system for deletes:
    /// below it, new items and blobs are refused ("the relay's disk is
    /// full") [default: 67108864]
    #[arg(long, value_name = "BYTES")]
    min_free_space: Option<u64>,
    /// Largest message in bytes (at most 1 MiB; larger content goes as a file)
    #[arg(long, value_name = "BYTES")]
    max_message: Option<usize>,
    /// Seconds a connection may stay silent
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Seconds a connection not authenticated to a mailbox (a sender) may
    /// stay silent [default: 30]
    #[arg(long, value_name = "SECS")]
    unauthenticated_idle_timeout: Option<u64>,
    /// Seconds a client has to finish the TLS handshake
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<u64>,
    /// Seconds a client has to finish a frame it started (slow clients are cut off)
    #[arg(long, value_name = "SECS")]
    frame_timeout: Option<u64>,
    /// Seconds between sweeps of expired items and blobs
    #[arg(long, value_name = "SECS")]
    sweep_interval: Option<u64>,
    /// Requests per second one connection may make
    #[arg(long, value_name = "N")]
    rate_per_connection: Option<f64>,
    /// New connections per second one address may open
    #[arg(long, value_name = "N")]
    rate_per_address: Option<f64>,
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

/// The configuration file: every option of `relay serve`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    names: Option<Vec<String>>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    mailbox_quota: Option<u64>,
    max_blob: Option<u64>,
    min_free_space: Option<u64>,
    max_message: Option<usize>,
    idle_timeout: Option<u64>,
    unauthenticated_idle_timeout: Option<u64>,
    handshake_timeout: Option<u64>,
    frame_timeout: Option<u64>,
    sweep_interval: Option<u64>,
    rate_per_connection: Option<f64>,
    rate_per_address: Option<f64>,
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
        RelayCmd::Address(a) => address(&a, out),
        RelayCmd::Status(a) => status(&a, out),
        RelayCmd::Scrub(a) => scrub(&a, out),
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
    return a.testing.hostile.clone();
    #[cfg(not(feature = "test-tools"))]
    {
        let _ = a;
        None
    }
}

#[cfg(feature = "test-tools")]
fn hostile(a: &TestingArgs) -> anyhow::Result<Option<std::sync::Arc<sealpost_testkit::Hostile>>> {
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

fn build_config(a: ServeArgs) -> anyhow::Result<Config> {
    #[cfg(feature = "test-tools")]
    let tamper = hostile(&a.testing)?;
    let file: FileConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("invalid configuration in {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let listen = a
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7443)));
    let data = match a.data.or(file.data) {
        Some(d) => d,
        None => default_data()?,
    };
    let mut c = Config::new(listen, data);
    c.metrics = a.metrics.or(file.metrics);
    c.cert_files = match (a.cert.or(file.cert), a.key.or(file.key)) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(anyhow!(
                "a certificate needs its key: set both cert and key"
            ))
        }
    };
    c.cert_names = if a.names.is_empty() {
        file.names.unwrap_or_default()
    } else {
        a.names
    };
    if let Some(n) = a.max_connections.or(file.max_connections) {
        c.max_connections = n.max(1);
    }
    if let Some(n) = a
        .max_connections_per_address
        .or(file.max_connections_per_address)
    {
        c.max_connections_per_address = n.max(1);
    }
    if let Some(s) = a
        .unauthenticated_idle_timeout
        .or(file.unauthenticated_idle_timeout)
    {
        c.unauthenticated_idle_timeout = Duration::from_secs(s.max(1));
    }
    let mut limits = Limits::default();
    if let Some(q) = a.mailbox_quota.or(file.mailbox_quota) {
        limits.mailbox_quota = q;
    }
    if let Some(m) = a.max_blob.or(file.max_blob) {
        limits.max_blob = m;
    }
    if let Some(m) = a.min_free_space.or(file.min_free_space) {
        limits.min_free_space = m;
    }
    c.limits = limits;
    if let Some(m) = a.max_message.or(file.max_message) {
        c.max_message = m.clamp(1, sealpost_proto::relay::MAX_MESSAGE);
    }
    if let Some(s) = a.idle_timeout.or(file.idle_timeout) {
        c.idle_timeout = Duration::from_secs(s.max(1));
    }
    if let Some(s) = a.handshake_timeout.or(file.handshake_timeout) {
        c.handshake_timeout = Duration::from_secs(s.max(1));
    }
    if let Some(s) = a.frame_timeout.or(file.frame_timeout) {
        c.frame_timeout = Duration::from_secs(s.max(1));
    }
    if let Some(s) = a.sweep_interval.or(file.sweep_interval) {
        c.sweep_interval = Duration::from_secs(s.max(1));
    }
    if let Some(r) = a.rate_per_connection.or(file.rate_per_connection) {
        c.rate_per_connection = (r.max(1.0), r.max(1.0));
    }
    if let Some(r) = a.rate_per_address.or(file.rate_per_address) {
        c.rate_per_address = (r.max(1.0), (r * 4.0).max(1.0));
    }
    #[cfg(feature = "test-tools")]
    {
        c.tamper = tamper.map(|h| h as std::sync::Arc<dyn sealpost_relay::tamper::Tamper>);
    }
    Ok(c)
}

fn serve(a: ServeArgs, out: &Out) -> Result<(), Failure> {
    let config_hostile = hostile_spec(&a);
    let config = build_config(a)?;
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
        out.report(
            json!({
                "hostile": hostile,
                "listening": addr.host_port,
                "address": addr.to_string(),
                "fingerprint": addr.pin.to_text(),
                "new_certificate": relay.created_cert(),
                "data": data,
                "metrics": metrics,
            }),
            || {
                format!(
                    "{}sealpost relay listening on {} (TLS 1.3){}\nKey fingerprint: {}\nRelay address for agents: {addr}\n",
                    if hostile.is_some() { "WARNING: HOSTILE TESTING RELAY — it tampers with what it carries on purpose\n" } else { "" },
                    addr.host_port,
                    if relay.created_cert() { ", new self-signed certificate" } else { "" },
                    addr.pin.to_text(),
                )
            },
        )?;
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
            }
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
    let addr = sealpost_relay::RelayAddress {
        host_port: a.listen.to_string(),
        pin: c.pin,
    };
    out.report(
        json!({"address": addr.to_string(), "fingerprint": c.pin.to_text()}),
        || format!("{addr}\n"),
    )
}

fn open_store(dir: &Path) -> anyhow::Result<Store> {
    let store_dir = dir.join("store");
    if !store_dir.join("relay.db").exists() {
        return Err(anyhow!("no relay store in {}", dir.display()));
    }
    Store::open(&store_dir, Limits::default()).context("cannot open the relay store")
}

fn status(a: &DataArgs, out: &Out) -> Result<(), Failure> {
    let store = open_store(&data_dir(&a.data)?)?;
    let (mailboxes, items, bytes, blobs) = store.totals().context("cannot read the store")?;
    store.close();
    out.report(
        json!({"mailboxes": mailboxes, "items": items, "item_bytes": bytes, "blobs": blobs}),
        || {
            format!(
                "Mailboxes: {mailboxes}\nQueued items: {items} ({bytes} bytes)\nBlobs: {blobs}\n"
            )
        },
    )
}

fn scrub(a: &DataArgs, out: &Out) -> Result<(), Failure> {
    let store = open_store(&data_dir(&a.data)?)?;
    let r = store
        .scrub()
        .context("the scrub could not read the store")?;
    store.close();
    let damaged = r.damaged_items.len() + r.damaged_blobs.len();
    out.report(
        json!({
            "items": r.items,
            "damaged_items": r.damaged_items,
            "blobs": r.blobs,
            "damaged_blobs": r.damaged_blobs.iter().map(|b| data_encoding::HEXLOWER.encode(b)).collect::<Vec<_>>(),
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
                s += &format!("  blob {}: content does not match its BLAKE3\n", data_encoding::HEXLOWER.encode(b));
            }
            s
        },
    )?;
    if damaged > 0 {
        return Err(Failure {
            code: 1,
            class: "damaged",
            error: Some(anyhow!("{damaged} stored objects are damaged; their senders will retransmit if their recipients have not fetched them")),
        });
    }
    Ok(())
}
