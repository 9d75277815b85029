//! Delivery commands: `send`, `sync`, `agent`, `inbox`, `read`, `status`,
//! `receipt`, and `relay use`.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use sealpost_agent::engine::{self, Engine, EngineError, PassStats, SendError};
use sealpost_agent::outbox::{DeliveryRow, InboxEntry, OutboxEntry, ReceivedId, Shelf};
use sealpost_agent::spool::{Location, Spool};
use sealpost_agent::{views, Agent, Home};
use sealpost_proto::delivery::{State, Timing};
use sealpost_proto::manifest::Group;
use sealpost_proto::report::{Entries, Report, MAX_REPORT_TEXT_BYTES};
use sealpost_proto::retry::Backoff;
use sealpost_proto::MessageId;
use sealpost_relay::client::RelayClient;
use sealpost_relay::RelayAddress;
use serde_json::{json, Value};

use crate::exit::Failure;
use crate::output::{self, Out};

/// Progress bars on stderr for uploads, downloads and read-back checks;
/// only when stderr is a terminal and `--json` is off.
struct Bars {
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl sealpost_agent::transfer::Progress for Bars {
    fn start(&self, what: &str, total: u64, done: u64) {
        let bar = indicatif::ProgressBar::new(total);
        // As wide as the terminal: the name is cut, never the figures.
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:24!} {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        bar.set_position(done);
        // What was done before (a resumed transfer, a read-back that ran
        // during the download) is not this run's speed.
        bar.reset_eta();
        bar.reset_elapsed();
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }
    fn advance(&self, bytes: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(b) = b.as_ref() {
                b.inc(bytes);
            }
        }
    }
    fn finish(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(b) = b.take() {
                if b.length().is_some_and(|l| b.position() < l) {
                    // A pass that stopped part way (the next one goes on):
                    // left where it is, not drawn as done.
                    b.abandon();
                } else {
                    b.finish();
                }
            }
        }
    }
}

/// The progress display for this run: bars, or nothing.
fn progress(out: &Out) -> std::sync::Arc<dyn sealpost_agent::transfer::Progress> {
    if out.json() || !io::stderr().is_terminal() {
        std::sync::Arc::new(sealpost_agent::transfer::Quiet)
    } else {
        std::sync::Arc::new(Bars {
            bar: std::sync::Mutex::new(None),
        })
    }
}

/// Options every command that talks to relays shares.
#[derive(Args, Debug, Clone)]
pub struct TimingArgs {
    /// Wait this long for a receipt before submitting a message again; it
    /// doubles (with jitter) after each retransmission, up to 4 h
    #[arg(long, value_name = "DURATION", default_value = "2m", env = "SEALPOST_RETRANSMIT_AFTER", value_parser = crate::parse_duration)]
    pub retransmit_after: Duration,
}

impl TimingArgs {
    pub fn timing(&self) -> Timing {
        let base = self.retransmit_after;
        let d = Timing::default();
        Timing {
            retransmit: Backoff {
                base,
                max: base.max(Duration::from_secs(4 * 3600)),
            },
            submit: Backoff {
                base: d.submit.base.min(base),
                max: d.submit.max,
            },
        }
    }
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// The contact to send to
    #[arg(value_name = "NAME")]
    to: String,
    /// The message text; - reads it from stdin [default: stdin]
    #[arg(value_name = "TEXT", conflicts_with = "file")]
    text: Option<String>,
    /// Send a file (up to the recipient relay's largest blob, 2 GiB on a
    /// default relay), or a directory (each file under it, keeping
    /// its relative path): uploaded to the recipient's relay in encrypted
    /// chunks (resuming where it stopped); each file's receipt names its
    /// hash as read back from the recipient's disk
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// More recipients (repeat); each is tracked separately
    #[arg(long = "also", value_name = "NAME")]
    also: Vec<String>,
    /// How long the message stays valid, e.g. 30m, 12h, 7d; without a
    /// receipt by then it ends as failed
    #[arg(long, default_value = "7d", value_parser = crate::parse_lifetime)]
    expires: Duration,
    /// Wait until every recipient's receipt arrived (exit 0), or the
    /// message failed (exit 21), or --timeout passed (exit 22)
    #[arg(long)]
    wait: bool,
    /// How long --wait waits
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::parse_duration, requires = "wait")]
    timeout: Duration,
    #[command(flatten)]
    timing: TimingArgs,
    /// Do not pad the sealed message: by default its length is rounded up
    /// (Padmé, at most 12 %) so that a relay learns only a coarse size; with
    /// this, it learns the content's length to within a few bytes
    #[arg(long)]
    no_pad: bool,
    /// Pad each file sent (with --file): its encrypted length is rounded up
    /// (Padmé, at most 12 % more to upload, store and download) so that a
    /// relay learns only a coarse size; without it, a file's length shows
    #[arg(long)]
    pad: bool,
    /// Benchmarks: queue this many messages with this content (distinct
    /// ids), waking a running agent every 1,000; prints the last id
    #[arg(long, hide = true, default_value_t = 1, conflicts_with = "file", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    repeat: u64,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    timing: TimingArgs,
    /// Put received files here (remembered) [default: downloads/ in the home]
    #[arg(long, value_name = "DIR", env = "SEALPOST_DOWNLOADS")]
    downloads: Option<PathBuf>,
    /// Try every queued and waiting message now, not after its backoff
    /// (like `postqueue -f`)
    #[arg(long)]
    now: bool,
    /// Refuse files larger than this (the sender gets a signed `too-large`
    /// rejection as soon as the file is announced), e.g. 4GiB
    #[arg(long, value_name = "SIZE", default_value = "16GiB", value_parser = parse_size)]
    max_file: u64,
    /// Free space to keep: a file that would leave less on the download
    /// directory's file system waits, and is in the end refused as not
    /// stored; with less on the home's, messages wait at the relay
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    keep_free: u64,
    /// Delete received messages (content and records; received files stay
    /// where they were saved) once they are this old, e.g. 90d, or once
    /// the messages kept hold more than this much content, e.g. 10GiB
    /// (oldest first); `forever` keeps them. Given twice, one age and one
    /// size, both hold. Remembered (kept for ever until set); the space of
    /// their inbox segments goes back to the file system
    #[arg(long, value_name = "DURATION|SIZE|forever", value_parser = parse_keep)]
    keep_received: Vec<Keep>,
    /// on (the default): messages for contacts on other relays go to your
    /// relay, which forwards them (you may go offline once it has them;
    /// `status` says "at your relay" until the receipt); off: this agent
    /// submits to each recipient's relay itself (direct). Files go the same way:
    /// on, a file's data is uploaded once, to your relay, which hands it
    /// on to each recipient's relay. Remembered
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    forward: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub enum Keep {
    Forever,
    For(Duration),
    Size(u64),
}

fn parse_keep(s: &str) -> Result<Keep, String> {
    let s = s.trim();
    if s == "forever" {
        return Ok(Keep::Forever);
    }
    if let Ok(d) = humantime::parse_duration(s) {
        if d < Duration::from_secs(3600) {
            return Err(
                "at least 1h: a shorter time would delete messages before they are read".into(),
            );
        }
        return Ok(Keep::For(d));
    }
    match s.parse::<bytesize::ByteSize>() {
        Ok(b) if b.as_u64() < 1 << 20 => {
            Err("at least 1MiB: less would delete messages before they are read".into())
        }
        Ok(b) => Ok(Keep::Size(b.as_u64())),
        Err(_) => Err(format!(
            "{s:?} is neither a duration nor a size (examples: 30d, 1y, 10GiB, forever)"
        )),
    }
}

fn set_keep_received(agent: &mut Agent, keep: &[Keep]) -> Result<(), Failure> {
    if keep.is_empty() {
        return Ok(());
    }
    let db = agent.db_mut();
    // What is given replaces what was set: an age alone lifts a size
    // limit set before, and the other way round.
    db.set_setting(engine::KEEP_RECEIVED, "")?;
    db.set_setting(engine::KEEP_RECEIVED_BYTES, "")?;
    for k in keep {
        match k {
            Keep::Forever => {}
            Keep::For(d) => db.set_setting(engine::KEEP_RECEIVED, &d.as_secs().to_string())?,
            Keep::Size(n) => db.set_setting(engine::KEEP_RECEIVED_BYTES, &n.to_string())?,
        }
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| format!("{s:?} is not a size (examples: 500MB, 4GiB)"))
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// Message id (as `sealpost status` shows it; a unique prefix is enough)
    id: String,
    /// Only the delivery to this contact
    #[arg(long, value_name = "NAME")]
    to: Option<String>,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Ids of received messages (as `sealpost inbox` shows them; unique
    /// prefixes are enough)
    #[arg(required = true)]
    ids: Vec<String>,
    /// Only messages from this contact: each sender chooses its own
    /// message ids, so messages from two senders may share one
    #[arg(long, value_name = "CONTACT")]
    from: Option<String>,
}

fn set_downloads(agent: &mut Agent, dir: &Option<PathBuf>) -> Result<(), Failure> {
    if let Some(d) = dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        let abs =
            std::fs::canonicalize(d).with_context(|| format!("cannot use {}", d.display()))?;
        agent
            .db_mut()
            .set_setting(engine::DOWNLOAD_DIR, &abs.to_string_lossy())?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct InboxArgs {
    /// Only messages not read yet
    #[arg(long)]
    unread: bool,
    /// At most this many, newest first
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Instead: the strangers (senders not among your contacts) whose
    /// messages were refused, by fingerprint, with how many and when
    #[arg(long, conflicts_with = "archived")]
    refused: bool,
    /// Instead: the archived messages (`sealpost archive`)
    #[arg(long)]
    archived: bool,
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    /// Message id (as `inbox` shows it; a unique prefix is enough)
    id: String,
    /// Only messages from this contact: each sender chooses its own
    /// message ids, so messages from two senders may share one
    #[arg(long, value_name = "CONTACT")]
    from: Option<String>,
    /// Write the content to this file instead of stdout (never overwrites)
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One message (a unique prefix of its id is enough) [default: the latest]
    id: Option<String>,
    /// At most this many messages, newest first
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// List what the checks caught from relays (tampered, misdirected,
    /// replayed or forged items, damaged blob data), newest first, instead
    /// of the outbox
    #[arg(long, conflicts_with = "id")]
    detections: bool,
}

#[derive(Subcommand, Debug)]
pub enum ReceiptCmd {
    /// Write the receipt(s) of a delivered message: proof, signed by the
    /// recipient, that they stored exactly this content
    Export {
        /// Message id (a unique prefix is enough)
        id: String,
        /// Only the receipt of this recipient
        #[arg(long, value_name = "NAME")]
        to: Option<String>,
        /// Write here instead of stdout
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Check a receipt offline against the recipient's card; exit 0 if it
    /// verifies, 23 if not
    Verify {
        /// The receipt (`sealpost-report-v1:…` text or binary), or - for stdin
        file: String,
        /// The card of whoever should have signed it (text, file, or - )
        #[arg(long, value_name = "CARD")]
        card: String,
        /// Also require that it names this message id
        #[arg(long, value_name = "ID")]
        id: Option<String>,
    },
}

pub(crate) fn engine_failure(e: EngineError) -> Failure {
    match e {
        EngineError::Busy(_) => Failure {
            code: crate::exit::Exit::Busy,
            class: "busy",
            error: Some(e.into()),
        },
        EngineError::NoHomeRelay | EngineError::BadHomeRelay(_) => Failure::contact(e.into()),
        EngineError::Agent(a) => a.into(),
        EngineError::Relay(sealpost_relay::client::ClientError::KeyMismatch { .. }) => Failure {
            code: crate::exit::Exit::KeyMismatch,
            class: "relay-key-mismatch",
            error: Some(e.into()),
        },
        EngineError::Relay(sealpost_relay::client::ClientError::Server {
            code: sealpost_proto::relay::ErrorCode::RegistrationRefused,
            ..
        }) => Failure {
            code: crate::exit::Exit::Identity,
            class: "registration-refused",
            error: Some(e.into()),
        },
        EngineError::Relay(_) => Failure {
            code: crate::exit::Exit::Unreachable,
            class: "relay-unreachable",
            error: Some(e.into()),
        },
        EngineError::Spool(_) => anyhow::Error::new(e).into(),
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        engine_failure(e)
    }
}

impl From<SendError> for Failure {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Engine(e) => e.into(),
            SendError::Agent(a) => a.into(),
            SendError::TooLarge { .. } => Failure {
                code: crate::exit::Exit::TooLarge,
                class: "too-large",
                error: Some(e.into()),
            },
            SendError::Recipients | SendError::NoRelay(_) => Failure::contact(e.into()),
            SendError::Seal(_) => anyhow::Error::new(e).into(),
            SendError::BadFile(_) => anyhow::Error::new(e).into(),
        }
    }
}

/// The runtime of `send`, `sync` and `agent`: the engine runs on the
/// calling thread (`block_on`) and the relay connections' reader and writer
/// tasks on one worker thread, so that receiving (TLS decryption and the
/// copies out of rustls, the recipient's busiest work in a download)
/// overlaps the engine's own work. With everything on one thread a 1 GiB
/// download lagged the upload it follows (the recipient's main thread was
/// the bottleneck); with one worker the transfer measured 300–392 against
/// 246–334 MiB/s (docs/BENCHMARKS.md).
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::from)
}

/// A relay address as a person typed it, with words for each way it can
/// be wrong (a typo is caught by its check characters).
pub fn parse_relay_address(address: &str) -> Result<RelayAddress, Failure> {
    RelayAddress::parse_checked(address).map_err(|e| match e {
        sealpost_relay::tls::AddressError::Mistyped => Failure::usage(anyhow!(
            "{address:?} has a typo: its check characters (after the last '.') do not match the rest; copy the address again (`sealpost relay address` on the relay prints it)"
        )),
        sealpost_relay::tls::AddressError::NotAnAddress => Failure::usage(anyhow!(
            "{address:?} is not a relay address; it looks like 127.0.0.1:7443/KEYFINGERPRINT.CHECK (`sealpost relay address` prints it)"
        )),
    })
}

/// Registers this identity's mailbox at `address` and makes it the home
/// relay (in the settings and in a newly signed card).
pub fn use_relay(agent: &mut Agent, address: &str, out: &Out) -> Result<(), Failure> {
    let addr = parse_relay_address(address)?;
    runtime()?.block_on(async {
        let c = RelayClient::connect(&addr)
            .await
            .map_err(|e| engine_failure(EngineError::Relay(e)))?;
        c.register(agent.identity())
            .await
            .map_err(|e| engine_failure(EngineError::Relay(e)))?;
        Ok::<(), Failure>(())
    })?;
    agent.set_home_relay(&addr.to_string(), engine::pin_of(&addr), crate::now())?;
    out.report(
        json!({"relay": addr.to_checked_text(), "card": agent.card().to_text()}),
        || {
            format!(
                "Home relay set to {}; your mailbox is registered there.\nYour new contact card (give it to people who will write to you):\n{}\n",
                addr.to_checked_text(),
                agent.card().to_text()
            )
        },
    )
}

fn read_content(args: &SendArgs) -> Result<(Vec<u8>, String), Failure> {
    let limit = engine::MAX_CONTENT as u64 + 1;
    let mut content = Vec::new();
    let summary;
    match args.text.as_deref() {
        Some(text) if text != "-" => {
            content = text.as_bytes().to_vec();
            summary = text.lines().next().unwrap_or("").to_owned();
        }
        _ => {
            if io::stdin().is_terminal() && args.text.is_none() {
                return Err(Failure::usage(anyhow!(
                    "no content: give the text as an argument, --file PATH, or pipe it in with -"
                )));
            }
            io::stdin()
                .take(limit)
                .read_to_end(&mut content)
                .context("cannot read stdin")?;
            summary = String::from_utf8_lossy(&content[..content.len().min(200)])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
        }
    }
    let summary: String = summary
        .chars()
        .filter(|c| !c.is_control())
        .take(60)
        .collect();
    Ok((content, summary))
}

/// How long `send --wait` trusts a running agent to tell it of a pass
/// before it reads the outbox anyway.
const WATCH_FALLBACK: Duration = Duration::from_secs(10);

pub fn send(home: &Home, args: SendArgs, out: &Out) -> Result<(), Failure> {
    // Checked here: clap's `requires = "file"` on `--pad` let
    // `send bob --pad hi` through (tried with clap 4.6).
    if args.pad && args.file.is_none() {
        return Err(Failure::usage(anyhow!(
            "--pad pads files: use it with --file (messages are padded unless --no-pad)"
        )));
    }
    let mut agent = home.load()?;
    agent.set_padding(!args.no_pad);
    agent.set_file_padding(args.pad);
    let mut names = vec![args.to.clone()];
    names.extend(args.also.iter().cloned());
    let mut tree = Vec::new();
    let id = if let Some(path) = args.file.as_ref().filter(|p| p.is_dir()) {
        let files = engine::list_tree(path)?;
        let sizes: Vec<(String, u64)> = files.iter().map(|f| (f.name.clone(), f.size)).collect();
        check_file_sizes(&agent, &names, &sizes)?;
        tree = agent.send_listed(&names, &files, args.expires.as_secs())?;
        tree.last()
            .map(|t| t.0)
            .ok_or_else(|| anyhow!("{} holds no files", path.display()))?
    } else if let Some(path) = &args.file {
        if let Ok(m) = std::fs::metadata(path) {
            check_file_sizes(&agent, &names, &[(path.display().to_string(), m.len())])?;
        }
        agent.send_file(&names, path, args.expires.as_secs())?.0
    } else {
        let (content, summary) = read_content(&args)?;
        if args.repeat == 1 {
            agent.send(&names, &content, args.expires.as_secs(), &summary)?
        } else {
            queue_repeated(&mut agent, home, &names, &content, &args, &summary)?
        }
    };
    // Every message this command queued: one, or one per file of a tree.
    let ids: Vec<MessageId> = if tree.is_empty() {
        vec![id]
    } else {
        tree.iter().map(|t| t.0).collect()
    };
    let queued_at = Instant::now();
    let woke = engine::wake_agent(home.dir());
    if !woke && !out.json() && io::stderr().is_terminal() {
        // Said before any upload starts, so the id is known even if the
        // upload is interrupted.
        output::to_stderr(&format!(
            "queued {}; handing it to the relay (Ctrl-C stops; `sealpost sync` resumes)\n",
            if ids.len() == 1 {
                format!("message {id}")
            } else {
                format!("{} messages, one per file", ids.len())
            }
        ));
    }
    let mut engine_used = false;
    let mut agent_opt = Some(agent);
    if !woke {
        // No agent running: hand the messages to the relay now.
        let agent = agent_opt.take().ok_or_else(|| anyhow!("agent moved"))?;
        match Engine::new(agent) {
            Ok(mut eng) => {
                eng.timing = args.timing.timing();
                eng.progress = progress(out);
                let rt = runtime()?;
                if args.wait {
                    let deadline = args.timeout;
                    let all_final = |e: &Engine| -> Result<bool, EngineError> {
                        for i in &ids {
                            if !e.is_final(i)? {
                                return Ok(false);
                            }
                        }
                        Ok(true)
                    };
                    let stopped = rt.block_on(until_interrupted(async {
                        let r = tokio::time::timeout(
                            deadline,
                            eng.run(None, std::future::pending(), all_final),
                        )
                        .await;
                        match r {
                            Ok(r) => r.map(|_| ()),
                            Err(_) => Ok(()),
                        }
                    }));
                    stopped.ok_or_else(|| interrupted(ids.len()))??;
                } else {
                    rt.block_on(until_interrupted(eng.submit_only()))
                        .ok_or_else(|| interrupted(ids.len()))??;
                }
                engine_used = true;
                agent_opt = Some(home.load()?);
            }
            Err(EngineError::Busy(_)) => agent_opt = Some(home.load()?),
            Err(e) => return Err(e.into()),
        }
    }
    let agent = agent_opt.ok_or_else(|| anyhow!("agent moved"))?;
    let entries = |agent: &Agent| -> Result<Vec<OutboxEntry>, Failure> {
        let mut v = Vec::with_capacity(ids.len());
        for i in &ids {
            v.push(
                agent
                    .db()
                    .outbox(Some(i), 1)?
                    .into_iter()
                    .next()
                    .ok_or_else(|| anyhow!("message {i} vanished from the outbox"))?,
            );
        }
        Ok(v)
    };
    if args.wait && !engine_used {
        // A running agent does the work. It tells a watching command after
        // every pass, so the outbox is read again only then (and every
        // 10 s in any case); an agent that stops (end of stream) leaves
        // this to read it every 250 ms.
        let deadline = Instant::now() + args.timeout;
        let mut watch = engine::watch_agent(home.dir());
        let mut pending = ids.clone();
        loop {
            let mut still = Vec::with_capacity(pending.len());
            for i in &pending {
                if !agent.db().is_final(i)? {
                    still.push(*i);
                }
            }
            pending = still;
            let now = Instant::now();
            if pending.is_empty() || now >= deadline {
                break;
            }
            let left = deadline - now;
            match watch.as_mut() {
                Some(w) => {
                    let _ = w.set_read_timeout(Some(left.min(WATCH_FALLBACK)));
                    let mut news = [0u8; 64];
                    match io::Read::read(w, &mut news) {
                        Ok(0) => watch = None,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock
                                    | io::ErrorKind::TimedOut
                                    | io::ErrorKind::Interrupted
                            ) => {}
                        Err(_) => watch = None,
                    }
                }
                None => std::thread::sleep(Duration::from_millis(250).min(left)),
            }
        }
    }
    let elapsed = queued_at.elapsed();
    let all = entries(&agent)?;
    let entry = all
        .iter()
        .find(|e| e.id == id)
        .ok_or_else(|| anyhow!("message {id} vanished from the outbox"))?;
    let mut v = entry_json(entry);
    if args.wait {
        v["waited_ms"] = json!(elapsed.as_secs_f64() * 1000.0);
    }
    let group = match tree.first() {
        Some(t) => agent.db().group_of_sent(&t.0)?,
        None => None,
    };
    v["group"] = group_json(group.as_ref());
    if !tree.is_empty() {
        v["files"] = json!(tree
            .iter()
            .zip(&all)
            .map(|((i, p, n), e)| {
                let mut f = json!({"id": i.to_string(), "path": p, "size": n});
                f["deliveries"] = entry_json(e)["deliveries"].clone();
                f
            })
            .collect::<Vec<_>>());
    }
    let failed: Vec<(&OutboxEntry, &DeliveryRow)> = all
        .iter()
        .flat_map(|e| e.deliveries.iter().map(move |d| (e, d)))
        .filter(|(_, d)| d.delivery.state == State::Failed)
        .collect();
    let path_of = |e: &OutboxEntry| -> String {
        tree.iter()
            .find(|t| t.0 == e.id)
            .map(|t| t.1.clone())
            .unwrap_or_else(|| e.id.to_string())
    };
    out.report(v, || {
        let mut s = String::new();
        if tree.is_empty() {
            s.push_str(&format!("{id}\n"));
        }
        if let Some(g) = &group {
            let names: Vec<&str> = tree.iter().map(|t| t.1.as_str()).collect();
            s.push_str(&format!(
                "{}  {} ({} files, one group: `sealpost status {}`)\n",
                sealpost_proto::hex(&g.id),
                group_dir(&names),
                g.count,
                sealpost_proto::hex(&g.id)
            ));
        }
        for (k, e) in all.iter().enumerate() {
            if let Some((i, p, n)) = tree.get(k) {
                s.push_str(&format!("{i}  {p} ({n} bytes)\n"));
            }
            let failed_now = e
                .deliveries
                .iter()
                .any(|d| d.delivery.state == State::Failed);
            if args.wait || out.json() || failed_now {
                s.push_str(&entry_text(e));
            }
        }
        s
    })?;
    // Refused at once (a file larger than the relay takes, an unknown
    // mailbox), or failed while waiting: say so now, naming each.
    if !failed.is_empty() {
        let names: Vec<String> = failed
            .iter()
            .map(|(e, d)| {
                format!(
                    "{} to {}: {}",
                    path_of(e),
                    d.name,
                    d.delivery
                        .failure
                        .as_ref()
                        .map(|f| f.describe())
                        .unwrap_or_default()
                )
            })
            .collect();
        return Err(Failure {
            code: crate::exit::Exit::NotDelivered,
            class: "delivery-failed",
            error: Some(anyhow!(
                "{} of {} not delivered: {}",
                failed.len(),
                all.iter().map(|e| e.deliveries.len()).sum::<usize>(),
                names.join("; ")
            )),
        });
    }
    let waiting: Vec<String> = all
        .iter()
        .filter(|e| {
            e.deliveries
                .iter()
                .any(|d| d.delivery.state != State::Delivered)
        })
        .map(path_of)
        .collect();
    if args.wait && !waiting.is_empty() {
        return Err(Failure {
            code: crate::exit::Exit::StillPending,
            class: "still-pending",
            error: Some(anyhow!(
                "no receipt within {} for {}; {} queued and retransmitted until {} (`sealpost status`)",
                humantime::format_duration(args.timeout),
                waiting.join(", "),
                if waiting.len() == 1 { "it stays" } else { "they stay" },
                if waiting.len() == 1 { "it expires" } else { "they expire" },
            )),
        });
    }
    // No agent runs and this command could not hand everything to the
    // relays: nothing will move it until one runs. Say so, with the cause.
    if engine_used && !args.wait {
        let stuck: Vec<String> = all
            .iter()
            .flat_map(|e| e.deliveries.iter().map(move |d| (e, d)))
            .filter(|(_, d)| d.delivery.state == State::Queued)
            .map(|(e, d)| {
                format!(
                    "{} to {}{}",
                    path_of(e),
                    d.name,
                    d.last_error
                        .as_ref()
                        .map(|x| format!(" ({x})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        if !stuck.is_empty() {
            return Err(Failure {
                code: crate::exit::Exit::Unreachable,
                class: "queued-not-sent",
                error: Some(anyhow!(
                    "queued, but not yet handed to the relay: {}. It is kept; no agent is running for this home, so run `sealpost agent` (or `sealpost sync`, e.g. from cron) to send it",
                    stuck.join("; ")
                )),
            });
        }
    }
    Ok(())
}

/// Runs `work` unless Ctrl-C (or SIGTERM) comes first: then `None`. The
/// work is dropped at an await point; everything it made durable stays
/// (the outbox, what a relay acknowledged), so the next pass resumes.
pub(crate) async fn until_interrupted<T>(work: impl std::future::Future<Output = T>) -> Option<T> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        r = work => Some(r),
        _ = tokio::signal::ctrl_c() => None,
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => None,
    }
}

/// What `send` says when interrupted: nothing is lost.
fn interrupted(queued: usize) -> Failure {
    Failure {
        code: crate::exit::Exit::Interrupted,
        class: "interrupted",
        error: Some(anyhow!(
            "interrupted — {} queued and kept; a running `sealpost agent`, or `sealpost sync`, goes on from where this stopped (an upload resumes from what the relay holds)",
            if queued == 1 { "the message is".to_owned() } else { format!("the {queued} messages are") }
        )),
    }
}

/// Before a file is read to be hashed or anything is queued: asks each
/// recipient's relay what it accepts and refuses the files that cannot fit
/// there, naming each with its size and the limit. A relay that does not
/// answer within a few seconds is not waited for: the upload meets its
/// refusal later, and that refusal states the limit too. The relay's
/// answer is advisory (only its signed refusal is proof); a relay that
/// states a lower limit than it enforces can only refuse earlier, which it
/// could do anyway.
fn check_file_sizes(
    agent: &Agent,
    names: &[String],
    files: &[(String, u64)],
) -> Result<(), Failure> {
    let to = agent.resolve(names)?;
    let mut relays: Vec<(String, String)> = Vec::new();
    for (name, relay) in to.relays() {
        match relays.iter_mut().find(|(r, _)| r == relay) {
            Some((_, who)) => {
                who.push_str(", ");
                who.push_str(name);
            }
            None => relays.push((relay.to_owned(), name.to_owned())),
        }
    }
    let timeouts = sealpost_relay::client::Timeouts {
        connect: Duration::from_secs(3),
        request: Duration::from_secs(3),
    };
    let rt = runtime()?;
    let mut over = Vec::new();
    for (relay, who) in &relays {
        let Some(addr) = RelayAddress::parse(relay) else {
            continue;
        };
        let limits = rt.block_on(async {
            let c = RelayClient::connect_with(&addr, timeouts).await.ok()?;
            c.limits().await.ok().flatten()
        });
        let Some(limits) = limits else {
            tracing::debug!("relay {relay} did not state its limits; not checked before sending");
            continue;
        };
        for (file, size) in files {
            let cs = sealpost_proto::blob::DEFAULT_CHUNK_SIZE;
            let layout = if agent.file_padding() {
                sealpost_proto::blob::BlobLayout::padme(*size, cs)
            } else {
                sealpost_proto::blob::BlobLayout::new(*size, cs)
            };
            let sealed = layout.map(|l| l.blob_len()).unwrap_or(u64::MAX);
            if sealed > limits.max_blob {
                over.push(format!(
                    "{file} is {} ({size} bytes; {sealed} sealed) and the relay of {who} ({relay}) accepts files up to {} ({} bytes sealed)",
                    bytesize::ByteSize(*size).display().iec(),
                    bytesize::ByteSize(limits.max_blob).display().iec(),
                    limits.max_blob
                ));
            }
        }
    }
    if over.is_empty() {
        return Ok(());
    }
    Err(Failure {
        code: crate::exit::Exit::TooLarge,
        class: "too-large",
        error: Some(anyhow!(
            "too large, nothing was sent or queued: {}. Send a smaller file (split it), or ask that relay's operator to raise its --max-blob",
            over.join("; ")
        )),
    })
}

/// The benchmark path of `send --repeat`: seals on every core, queues 1,000
/// per transaction and wakes a running agent after each batch.
fn queue_repeated(
    agent: &mut Agent,
    home: &Home,
    names: &[String],
    content: &[u8],
    args: &SendArgs,
    summary: &str,
) -> Result<MessageId, Failure> {
    let to = agent.resolve(names)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut left = args.repeat;
    let mut last = None;
    while left > 0 {
        let n = left.min(1000) as usize;
        left -= n as u64;
        let per = n.div_ceil(threads);
        let me = agent.identity();
        let sealed: Vec<Result<engine::Prepared, SendError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .step_by(per)
                .map(|start| {
                    let k = per.min(n - start);
                    let to = &to;
                    s.spawn(move || {
                        (0..k)
                            .map(|_| to.seal(me, content, args.expires.as_secs(), summary))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let batch = sealed.into_iter().collect::<Result<Vec<_>, _>>()?;
        if batch.len() != n {
            return Err(anyhow!("a sealing thread failed").into());
        }
        agent.queue_prepared(&batch)?;
        last = batch.last().map(|m| m.id);
        engine::wake_agent(home.dir());
    }
    last.ok_or_else(|| anyhow!("nothing queued").into())
}

fn stats_json(s: &PassStats) -> Value {
    json!({
        "fetched": s.fetched,
        "delivered": s.delivered,
        "duplicates": s.duplicates,
        "rejected": s.rejected,
        "discarded": s.discarded,
        "confirmed": s.confirmed,
        "bounced": s.bounced,
        "forged_reports": s.forged_reports,
        "reports_sent": s.reports_sent,
        "submitted": s.submitted,
        "forwarded": s.forwarded,
        "refused": s.refused,
        "submit_errors": s.submit_errors,
        "expired": s.expired,
        "home_relay_errors": s.home_errors,
        "files_received": s.files_received,
        "download_errors": s.download_errors,
        "files_failed": s.files_failed,
        "upload_bytes": s.upload_bytes,
        "download_bytes": s.download_bytes,
        "detections": s.detections,
        "pruned": s.pruned,
        "inbox_bytes_freed": s.segments_freed_bytes,
    })
}

pub fn sync(home: &Home, args: SyncArgs, out: &Out) -> Result<(), Failure> {
    let mut agent = home.load()?;
    set_downloads(&mut agent, &args.downloads)?;
    set_keep_received(&mut agent, &args.keep_received)?;
    if let Some(f) = &args.forward {
        agent.db_mut().set_setting(engine::FORWARD, f)?;
    }
    if args.now {
        agent.db_mut().all_due_now(crate::now() * 1000)?;
    }
    let mut eng = Engine::new(agent)?;
    eng.timing = args.timing.timing();
    eng.progress = progress(out);
    eng.max_file = args.max_file;
    eng.keep_free = args.keep_free;
    let stats = runtime()?
        .block_on(until_interrupted(eng.pass()))
        .ok_or_else(|| Failure {
            code: crate::exit::Exit::Interrupted,
            class: "interrupted",
            error: Some(anyhow!(
                "interrupted — what this pass stored and acknowledged is kept; run `sealpost sync` again to go on"
            )),
        })??;
    let counts = eng.agent().db().delivery_counts()?;
    let mut v = stats_json(&stats);
    v["outbox"] = json!(counts
        .iter()
        .cloned()
        .collect::<std::collections::BTreeMap<_, _>>());
    out.report(v, || {
        let mut s = format!(
            "fetched {}: {} new in the inbox, {} duplicates, {} rejected, {} discarded\n\
             receipts: {} of our messages confirmed, {} bounced; {} reports sent\n\
             submitted {} to recipients' relays, {} to your relay to forward ({} refused, {} to retry), {} expired\n",
            stats.fetched,
            stats.delivered,
            stats.duplicates,
            stats.rejected,
            stats.discarded,
            stats.confirmed,
            stats.bounced,
            stats.reports_sent,
            stats.submitted,
            stats.forwarded,
            stats.refused,
            stats.submit_errors,
            stats.expired
        );
        if stats.download_errors + stats.files_failed > 0 {
            s.push_str(&format!(
                "files: {} received, {} could not be stored here (tried again later), {} given up on (their senders are told)\n",
                stats.files_received, stats.download_errors, stats.files_failed
            ));
        }
        if !counts.is_empty() {
            let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
            s.push_str(&format!("outbox: {}\n", parts.join(", ")));
        }
        s
    })?;
    if stats.home_key_mismatch {
        return Err(Failure {
            code: crate::exit::Exit::KeyMismatch,
            class: "relay-key-mismatch",
            error: Some(anyhow!(
                "home relay: {}",
                stats.home_error.clone().unwrap_or_default()
            )),
        });
    }
    if stats.home_errors > 0 {
        return Err(Failure {
            code: crate::exit::Exit::Unreachable,
            class: "relay-unreachable",
            error: Some(anyhow!(
                "the home relay could not be reached ({}); nothing was fetched (the outbox is kept and retried)",
                stats.home_error.as_deref().unwrap_or("no answer")
            )),
        });
    }
    Ok(())
}

pub fn agent(home: &Home, args: SyncArgs, out: &Out) -> Result<(), Failure> {
    let mut agent = home.load()?;
    set_downloads(&mut agent, &args.downloads)?;
    set_keep_received(&mut agent, &args.keep_received)?;
    if let Some(f) = &args.forward {
        agent.db_mut().set_setting(engine::FORWARD, f)?;
    }
    if args.now {
        agent.db_mut().all_due_now(crate::now() * 1000)?;
    }
    tracing::info!(
        "received files go to {} (--downloads DIR to change)",
        agent.download_dir()?.display()
    );
    let mut eng = Engine::new(agent)?;
    eng.timing = args.timing.timing();
    eng.max_file = args.max_file;
    eng.keep_free = args.keep_free;
    // A long download must not hold up other mail: 256 MiB per pass.
    eng.download_slice = Some(256 << 20);
    let rt = runtime()?;
    let total = rt.block_on(async {
        let wake = match engine::bind_wake_socket(home.dir()) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(
                    "cannot listen on {}: {e}; `send` will be picked up within a second",
                    engine::wake_socket(home.dir()).display()
                );
                None
            }
        };
        tracing::info!(
            "agent running for {} in {} (home relay {}); stop with Ctrl-C",
            eng.agent().card().name(),
            home.dir().display(),
            eng.agent()
                .home_relay()
                .ok()
                .flatten()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        let stop = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        let r = eng.run(wake.as_ref(), stop, |_| Ok(false)).await;
        let _ = std::fs::remove_file(engine::wake_socket(home.dir()));
        r
    })?;
    out.report(stats_json(&total), || {
        format!(
            "agent stopped: {} delivered to the inbox, {} of our messages confirmed\n",
            total.delivered, total.confirmed
        )
    })
}

/// Finds a message id from a full id or a unique prefix.
/// A group of files as a command names it: whose (the sender of received
/// files, zeros for our own: a group is scoped to its sender) and its id.
type GroupKey = ([u8; 32], [u8; 16]);

/// Finds what `prefix` names: one message (by a unique prefix of its id),
/// or every message of one group of files (a directory sent at once, by a
/// unique prefix of the group's id, which is returned too), in the order
/// of `candidates`.
fn resolve_some<T>(
    prefix: &str,
    candidates: Vec<T>,
    id_of: impl Fn(&T) -> MessageId,
    group_of: impl Fn(&T) -> Option<GroupKey>,
) -> Result<(Vec<T>, Option<GroupKey>), Failure> {
    let p = prefix.trim().to_ascii_lowercase();
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Failure::usage(anyhow!(
            "{prefix:?} is not a message id (hex, as `sealpost status` or `sealpost inbox` show it)"
        )));
    }
    let keys: Vec<Option<GroupKey>> = candidates.iter().map(&group_of).collect();
    let messages = candidates
        .iter()
        .filter(|c| id_of(c).to_string().starts_with(&p))
        .count();
    let mut groups: Vec<GroupKey> = keys
        .iter()
        .flatten()
        .filter(|k| sealpost_proto::hex(&k.1).starts_with(&p))
        .copied()
        .collect();
    groups.sort_unstable();
    groups.dedup();
    match (messages, groups.len()) {
        (0, 0) => Err(Failure {
            code: crate::exit::Exit::NotFound,
            class: "not-found",
            error: Some(anyhow!("no message or group of files with id {prefix}")),
        }),
        (1, 0) => Ok((
            candidates
                .into_iter()
                .filter(|c| id_of(c).to_string().starts_with(&p))
                .collect(),
            None,
        )),
        (0, 1) => Ok((
            candidates
                .into_iter()
                .zip(keys)
                .filter(|(_, k)| *k == Some(groups[0]))
                .map(|(c, _)| c)
                .collect(),
            Some(groups[0]),
        )),
        (m, g) if one_id(&candidates, &id_of, &groups, &p) => Err(Failure::usage(anyhow!(
            "{} received messages or groups have the id {prefix}, each from another sender \
             (each sender chooses its own ids); say whose with --from CONTACT",
            m + g
        ))),
        (m, g) => Err(Failure::usage(anyhow!(
            "{} ids start with {prefix}; give more digits",
            m + g
        ))),
    }
}

/// Whether the messages and groups whose ids start with `p` all have one
/// and the same id (received from several senders: more digits cannot
/// tell them apart).
fn one_id<T>(
    candidates: &[T],
    id_of: impl Fn(&T) -> MessageId,
    groups: &[GroupKey],
    p: &str,
) -> bool {
    let mut ids: Vec<String> = candidates
        .iter()
        .map(|c| id_of(c).to_string())
        .filter(|id| id.starts_with(p))
        .chain(groups.iter().map(|k| sealpost_proto::hex(&k.1)))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len() == 1
}

/// The common directory of a group's file names (`photos/a.jpg` → `photos/`).
fn group_dir(names: &[&str]) -> String {
    match names.first().and_then(|n| n.split_once('/')) {
        Some((top, _)) if names.iter().all(|n| n.starts_with(&format!("{top}/"))) => {
            format!("{top}/")
        }
        _ => "(files)".to_owned(),
    }
}

fn group_json(g: Option<&Group>) -> Value {
    serde_json::to_value(views::GroupView::of(g)).unwrap_or(Value::Null)
}

/// Counts of states, as "3 delivered, 2 submitted".
fn tally<'a>(states: impl Iterator<Item = &'a str>) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for st in states {
        match counts.iter_mut().find(|(k, _)| *k == st) {
            Some((_, n)) => *n += 1,
            None => counts.push((st, 1)),
        }
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn resolve_id<T>(
    prefix: &str,
    candidates: impl Iterator<Item = T>,
    id_of: impl Fn(&T) -> MessageId,
) -> Result<T, Failure> {
    let p = prefix.trim().to_ascii_lowercase();
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Failure::usage(anyhow!(
            "{prefix:?} is not a message id (hex, as `sealpost status` or `sealpost inbox` show it)"
        )));
    }
    let mut found: Vec<T> = candidates
        .filter(|c| id_of(c).to_string().starts_with(&p))
        .collect();
    match found.len() {
        0 => Err(Failure {
            code: crate::exit::Exit::NotFound,
            class: "not-found",
            error: Some(anyhow!("no message with id {prefix}")),
        }),
        1 => Ok(found.remove(0)),
        n => Err(Failure::usage(anyhow!(
            "{n} messages have ids starting with {prefix}; give more digits"
        ))),
    }
}

/// `sealpost cancel`: no more submissions or retransmissions of a sent
/// message (to one recipient, or all).
pub fn cancel(home: &Home, args: CancelArgs, out: &Out) -> Result<(), Failure> {
    let mut agent = home.load()?;
    let all = agent.db().outbox(None, usize::MAX >> 1)?;
    let group_of = |id: &MessageId| agent.db().group_of_sent(id).ok().flatten();
    let (chosen, _) = resolve_some(
        &args.id,
        all,
        |e| e.id,
        |e| group_of(&e.id).map(|g| ([0; 32], g.id)),
    )?;
    // One message, or every file of a directory sent at once.
    let mut done = Vec::new();
    for e in &chosen {
        for (n, st) in agent
            .db_mut()
            .cancel(&e.id, args.to.as_deref(), crate::now() * 1000)?
        {
            done.push((e, n, st));
        }
    }
    if done.is_empty() {
        return Err(Failure {
            code: crate::exit::Exit::NotFound,
            class: "not-found",
            error: Some(anyhow!(
                "nothing to cancel: every delivery of {}{} is already final (`sealpost status {}`)",
                if chosen.len() == 1 {
                    format!("message {}", chosen[0].id)
                } else {
                    format!("the {} files of {}", chosen.len(), args.id)
                },
                args.to
                    .as_deref()
                    .map(|n| format!(" to {n}"))
                    .unwrap_or_default(),
                args.id
            )),
        });
    }
    // A running agent looks again now.
    engine::wake_agent(home.dir());
    let first = chosen[0].id;
    out.report(
        json!({
            "id": first.to_string(),
            "cancelled": done.iter().map(|(e, n, st)| json!({"id": e.id.to_string(), "to": n, "was": st.name()})).collect::<Vec<_>>(),
        }),
        || {
            let mut s = String::new();
            for (e, n, st) in &done {
                s.push_str(&match st {
                    State::Queued => format!(
                        "cancelled message {} to {n}: it had not reached the relay{}\n",
                        e.id,
                        if e.kind == "file-manifest" {
                            " (pieces of the file already uploaded expire there)"
                        } else {
                            ""
                        }
                    ),
                    _ => format!(
                        "cancelled message {} to {n}: no more retransmissions; the copy at the relay may still be fetched, and its receipt would then be recorded\n",
                        e.id
                    ),
                });
            }
            s
        },
    )
}

/// `inbox --refused`: who wrote without being a contact.
fn refused(agent: &Agent, limit: usize, out: &Out) -> Result<(), Failure> {
    let list = agent.db().refused_senders(limit)?;
    let fp = |k: &[u8; 32]| {
        sealpost_proto::Fingerprint::of_bytes(k)
            .map(|f| f.to_string())
            .unwrap_or_else(|| sealpost_proto::hex(k))
    };
    out.report(
        json!({"refused": list.iter().map(|r| json!({
            "fingerprint": fp(&r.key),
            "messages": r.messages,
            "first": ms_time(r.first_ms),
            "last": ms_time(r.last_ms),
        })).collect::<Vec<_>>()}),
        || {
            if list.is_empty() {
                return "No messages from strangers were refused.\n".to_owned();
            }
            let mut s = String::from(
                "Refused because the sender is not a contact (each was told so, signed):\n",
            );
            for r in &list {
                s.push_str(&format!(
                    "  {}  {} message(s), {} to {}\n",
                    fp(&r.key),
                    r.messages,
                    ms_time(r.first_ms),
                    ms_time(r.last_ms)
                ));
            }
            s.push_str("To accept someone, get their card and compare its fingerprint: `sealpost contact add CARD`.\n");
            s
        },
    )
}

/// `sealpost delete`: removes received messages from the inbox (for a
/// received file, its record; never the file). Their ids stay in the
/// replay cache, so a replayed copy is still refused.
pub fn delete(home: &Home, args: DeleteArgs, out: &Out) -> Result<(), Failure> {
    let mut agent = home.load()?;
    let ids = received_ids(&agent, &args.ids, args.from.as_deref())?;
    for k in &ids {
        if let Some(d) = agent.db().download(k)? {
            if !d.state.is_final() {
                return Err(Failure::usage(anyhow!(
                    "message {} is a file still being received ({}); delete it once it is done",
                    k.id,
                    d.state
                )));
            }
        }
    }
    let n = agent.db_mut().delete_received(&ids)?;
    out.report(
        json!({"deleted": ids.iter().map(|k| k.id.to_string()).collect::<Vec<_>>()}),
        || format!("deleted {n} message(s) from the inbox (received files stay where they were saved; the space of their content goes back at the next `sync` or agent pass, once no message stored beside it remains)\n"),
    )
}

#[derive(Args, Debug)]
pub struct ArchiveArgs {
    /// Ids of received messages (as `sealpost inbox` shows them; unique
    /// prefixes are enough)
    #[arg(required = true)]
    ids: Vec<String>,
    /// Bring archived messages back to the inbox instead
    #[arg(long)]
    undo: bool,
    /// Only messages from this contact: each sender chooses its own
    /// message ids, so messages from two senders may share one
    #[arg(long, value_name = "CONTACT")]
    from: Option<String>,
}

/// The received messages `prefixes` name: each a message, or every file
/// of a directory received at once (archived or not); only `from`'s, if
/// given.
fn received_ids(
    agent: &Agent,
    prefixes: &[String],
    from: Option<&str>,
) -> Result<Vec<ReceivedId>, Failure> {
    let all = received_from(agent, from)?;
    let mut ids = Vec::with_capacity(prefixes.len());
    for p in prefixes {
        let (chosen, _) = resolve_some(
            p,
            all.iter().collect(),
            |e| e.id,
            |e| received_group(agent, e).map(|(k, _)| k),
        )?;
        ids.extend(chosen.iter().map(|e| e.key()));
    }
    Ok(ids)
}

/// Every received message (archived or not), or only those from the
/// contact `from`.
fn received_from(agent: &Agent, from: Option<&str>) -> Result<Vec<InboxEntry>, Failure> {
    let mut all = agent.db().received(Shelf::Both, false, usize::MAX >> 1)?;
    if let Some(name) = from {
        let key = *agent.db().contact(name)?.card.public().signing_bytes();
        all.retain(|e| e.sender == key);
    }
    Ok(all)
}

/// Moves received messages out of the inbox's list (kept, readable with
/// `read`, listed by `inbox --archived`), or back.
pub fn archive(home: &Home, args: ArchiveArgs, out: &Out) -> Result<(), Failure> {
    let mut agent = home.load()?;
    let ids = received_ids(&agent, &args.ids, args.from.as_deref())?;
    let when = (!args.undo).then(engine::now_ms);
    let n = agent.db_mut().archive_received(&ids, when)?;
    let key = if args.undo { "unarchived" } else { "archived" };
    out.report(
        json!({key: ids.iter().map(|k| k.id.to_string()).collect::<Vec<_>>(), "changed": n}),
        || {
            if args.undo {
                format!(
                    "{n} message(s) back in the inbox ({} already were)\n",
                    ids.len().saturating_sub(n)
                )
            } else {
                format!(
                    "archived {n} message(s) ({} already were); `sealpost inbox --archived` lists them, `read` still opens them\n",
                    ids.len().saturating_sub(n)
                )
            }
        },
    )
}

fn ms_time(ms: u64) -> String {
    views::time_ms(ms)
}

/// A sent message as `--json` shows it (its group, if any, set by the
/// caller).
fn entry_json(e: &OutboxEntry) -> Value {
    serde_json::to_value(views::OutboxView::of(e, None)).unwrap_or(Value::Null)
}

fn entry_text(e: &OutboxEntry) -> String {
    let mut s = String::new();
    for d in e.deliveries.iter().map(|d| views::DeliveryView::of(e, d)) {
        let detail = match d.state_kind {
            State::Delivered => "receipt verified".to_owned(),
            State::Failed => d.reason.clone().unwrap_or_default(),
            State::Submitted => format!(
                "at the relay, no receipt yet; next retransmission {}",
                ms_time(d.next_at_ms)
            ),
            State::Forwarding => match &d.hop {
                Some(hop) => format!(
                    "{hop}; no receipt yet; next retransmission {}",
                    ms_time(d.next_at_ms)
                ),
                None => format!(
                    "at your relay, which forwards it to {}; no receipt yet; next retransmission {}",
                    d.relay,
                    ms_time(d.next_at_ms)
                ),
            },
            State::Queued if d.uploaded > 0 => format!(
                "uploading: {}{}",
                d.upload
                    .map(|(done, total)| format!(
                        "{} % ({} of {}) at the relay",
                        views::percent(done, total),
                        bytesize::ByteSize(done).display().iec(),
                        bytesize::ByteSize(total).display().iec()
                    ))
                    .unwrap_or_else(|| format!("{} bytes at the relay", d.uploaded)),
                d.last_error
                    .as_ref()
                    .map(|e| format!("; retry {}: {e}", ms_time(d.next_at_ms)))
                    .unwrap_or_default()
            ),
            State::Queued => match &d.last_error {
                Some(err) => format!("retry {}: {err}", ms_time(d.next_at_ms)),
                None => "waiting to be submitted".to_owned(),
            },
        };
        s.push_str(&format!(
            "  to {:<16} {:<10} since {}  {}\n",
            d.to, d.state, d.since, detail
        ));
    }
    s
}

fn detections(agent: &Agent, limit: usize, out: &Out) -> Result<(), Failure> {
    let list = agent.db().detections(limit)?;
    let counts = agent.db().detection_counts()?;
    out.report(
        json!({
            "detections": list.iter().map(views::DetectionView::of).collect::<Vec<_>>(),
            "totals": counts.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        }),
        || {
            if list.is_empty() {
                return "Nothing caught: every item from the relays passed its checks.\n"
                    .to_owned();
            }
            let mut s = String::new();
            for d in &list {
                s.push_str(&format!(
                    "{}  {:<20} {}\n",
                    ms_time(d.at_ms),
                    d.class,
                    d.item
                ));
            }
            s
        },
    )
}

pub fn status(home: &Home, args: StatusArgs, out: &Out) -> Result<(), Failure> {
    let agent = home.load()?;
    if args.detections {
        return detections(&agent, args.limit, out);
    }
    let caught = agent.db().detection_counts()?;
    let group_of = |id: &MessageId| agent.db().group_of_sent(id).ok().flatten();
    let entries = match &args.id {
        Some(p) => {
            let all = agent.db().outbox(None, usize::MAX >> 1)?;
            resolve_some(
                p,
                all,
                |e| e.id,
                |e| group_of(&e.id).map(|g| ([0; 32], g.id)),
            )?
            .0
        }
        None => agent.db().outbox(None, args.limit)?,
    };
    let groups: Vec<Option<Group>> = entries.iter().map(|e| group_of(&e.id)).collect();
    let totals = agent.db().delivery_counts()?;
    out.report(
        json!({
            "messages": entries.iter().zip(&groups).map(|(e, g)| {
                let mut v = entry_json(e);
                v["group"] = group_json(g.as_ref());
                v
            }).collect::<Vec<_>>(),
            "totals": totals.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "detections": caught.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        }),
        || {
            let mut s = String::new();
            if !caught.is_empty() && args.id.is_none() {
                let parts: Vec<String> = caught.iter().map(|(k, n)| format!("{n} {k}")).collect();
                s.push_str(&format!(
                    "Caught and not accepted: {}; see `sealpost status --detections` (a duplicate is a copy delivered again: a relay's doing, or a sender's retransmission or replay)\n",
                    parts.join(", ")
                ));
            }
            if entries.is_empty() {
                s.push_str("The outbox is empty.\n");
                return s;
            }
            if args.id.is_none() {
                let parts: Vec<String> = totals.iter().map(|(k, n)| format!("{n} {k}")).collect();
                s.push_str(&format!("Deliveries: {}\n", parts.join(", ")));
            }
            let mut shown = std::collections::HashSet::new();
            for (e, g) in entries.iter().zip(&groups) {
                if let Some(g) = g {
                    if !shown.insert(g.id) {
                        continue;
                    }
                    // A directory sent at once: one entry, all its files.
                    let members: Vec<OutboxEntry> = agent
                        .db()
                        .sent_group_members(&g.id)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|m| agent.db().outbox(Some(m), 1).ok()?.into_iter().next())
                        .collect();
                    let names: Vec<&str> = members
                        .iter()
                        .map(|m| m.summary.strip_prefix("file ").unwrap_or(&m.summary))
                        .collect();
                    s.push_str(&format!(
                        "{}  {}  {} ({} of {} files, {} bytes, expires {})\n",
                        sealpost_proto::hex(&g.id),
                        ms_time(e.created_ms),
                        group_dir(&names),
                        members.len(),
                        g.count,
                        members.iter().map(|m| m.sent.content_len).sum::<u64>(),
                        ms_time(e.expires_ms)
                    ));
                    let mut to: Vec<&str> = Vec::new();
                    for d in members.iter().flat_map(|m| &m.deliveries) {
                        if !to.contains(&d.name.as_str()) {
                            to.push(&d.name);
                        }
                    }
                    for name in to {
                        let states = members
                            .iter()
                            .flat_map(|m| &m.deliveries)
                            .filter(|d| d.name == name)
                            .map(|d| d.delivery.state.name());
                        s.push_str(&format!("  to {name}: {}\n", tally(states)));
                    }
                    if args.id.is_none() {
                        s.push_str(&format!(
                            "  (`sealpost status {}` for each file)\n",
                            sealpost_proto::hex(&g.id)
                        ));
                        continue;
                    }
                    for m in &members {
                        s.push_str(&format!(
                            "{}  {:?}  ({} bytes)\n",
                            m.id, m.summary, m.sent.content_len
                        ));
                        s.push_str(&entry_text(m));
                    }
                    continue;
                }
                s.push_str(&format!(
                    "{}  {}  {:?}  ({} bytes, expires {})\n",
                    e.id,
                    ms_time(e.created_ms),
                    e.summary,
                    e.sent.content_len,
                    ms_time(e.expires_ms)
                ));
                s.push_str(&entry_text(e));
            }
            s
        },
    )
}

fn file_json(agent: &Agent, e: &InboxEntry) -> Option<Value> {
    let d = agent.db().download(&e.key()).ok().flatten()?;
    serde_json::to_value(views::FileView::of(&d)).ok()
}

fn inbox_json(agent: &Agent, e: &InboxEntry) -> Value {
    serde_json::to_value(views::InboxView::of(agent, e)).unwrap_or(Value::Null)
}

/// `read` of a group: its files, where each was saved (reading one by its
/// id checks it against the disk again).
fn read_group(
    agent: &Agent,
    key: &GroupKey,
    members: &[InboxEntry],
    out: &Out,
) -> Result<(), Failure> {
    let files: Vec<Value> = members
        .iter()
        .map(|m| {
            let mut f = file_json(agent, m).unwrap_or(Value::Null);
            f["id"] = json!(m.id.to_string());
            f
        })
        .collect();
    out.report(
        json!({"group": sealpost_proto::hex(&key.1), "from": views::sender_name(agent, &key.0), "files": files}),
        || {
            let mut s = String::new();
            for f in &files {
                s.push_str(&format!(
                    "{}  {}: {}\n",
                    f["id"].as_str().unwrap_or(""),
                    f["name"].as_str().unwrap_or(""),
                    match (f["state"].as_str(), f["path"].as_str()) {
                        (Some("done"), Some(p)) => format!("saved as {p}"),
                        (Some(st), _) => format!("{st} {} %", f["percent"]),
                        _ => "?".to_owned(),
                    }
                ));
            }
            s.push_str("(`sealpost read ID` checks one file against the disk again)\n");
            s
        },
    )
}

/// The group a received message belongs to, scoped to its sender.
fn received_group(agent: &Agent, e: &InboxEntry) -> Option<(GroupKey, Group)> {
    let g = agent.db().group_of_received(&e.key()).ok().flatten()?;
    Some(((e.sender, g.id), g))
}

/// The received files of a group (from its sender only), in their order.
fn received_members(agent: &Agent, key: &GroupKey) -> Vec<InboxEntry> {
    agent
        .db()
        .received_group_members(&key.1, &key.0)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            agent
                .db()
                .inbox_entry(&ReceivedId::new(key.0, m))
                .ok()
                .flatten()
        })
        .collect()
}

/// One line for a directory received at once: how many of its files are
/// here and what became of them.
fn group_line(agent: &Agent, key: &GroupKey, g: &Group, first: &InboxEntry) -> String {
    let members = received_members(agent, key);
    let files: Vec<Value> = members.iter().filter_map(|m| file_json(agent, m)).collect();
    let names: Vec<&str> = files.iter().filter_map(|f| f["name"].as_str()).collect();
    let states = files.iter().map(|f| match f["state"].as_str() {
        Some("done") => "saved",
        Some(other) => other,
        None => "?",
    });
    format!(
        "{} {}  {}  from {:<16} {} {} of {} files ({} bytes): {}\n",
        if members.iter().all(|m| m.read_ms.is_some()) {
            " "
        } else {
            "*"
        },
        sealpost_proto::hex(&key.1),
        ms_time(first.received_ms),
        views::sender_name(agent, &key.0),
        group_dir(&names),
        members.len(),
        g.count,
        files.iter().filter_map(|f| f["size"].as_u64()).sum::<u64>(),
        tally(states)
    )
}

pub fn inbox(home: &Home, args: InboxArgs, out: &Out) -> Result<(), Failure> {
    let agent = home.load()?;
    if args.refused {
        return refused(&agent, args.limit, out);
    }
    let shelf = if args.archived {
        Shelf::Archive
    } else {
        Shelf::Inbox
    };
    let list = agent.db().received(shelf, args.unread, args.limit)?;
    let spool = Spool::open(home.dir()).map_err(anyhow::Error::new)?;
    out.report(
        json!({"messages": list.iter().map(|e| inbox_json(&agent, e)).collect::<Vec<_>>()}),
        || {
            if list.is_empty() {
                return if args.archived {
                    "No archived messages.\n".to_owned()
                } else {
                    "No messages.\n".to_owned()
                };
            }
            let mut s = String::new();
            let mut shown = std::collections::HashSet::new();
            for e in &list {
                if let Some((key, g)) = received_group(&agent, e) {
                    if shown.insert(key) {
                        s.push_str(&group_line(&agent, &key, &g, e));
                    }
                    continue;
                }
                if let Some(f) = file_json(&agent, e) {
                    let state = f["state"].as_str().unwrap_or("");
                    let where_ = match (state, f["path"].as_str()) {
                        ("done", Some(p)) => format!("saved as {p}"),
                        _ => format!(
                            "{state} {} % ({} of {} chunks){}",
                            f["percent"],
                            f["chunks_done"],
                            f["chunks"],
                            f["error"]
                                .as_str()
                                .map(|x| format!(" ({x})"))
                                .unwrap_or_default()
                        ),
                    };
                    s.push_str(&format!(
                        "{} {}  {}  from {:<16} file {} ({} bytes): {where_}\n",
                        if e.read_ms.is_some() { " " } else { "*" },
                        e.id,
                        ms_time(e.received_ms),
                        views::sender_name(&agent, &e.sender),
                        f["name"].as_str().unwrap_or(""),
                        f["size"]
                    ));
                    continue;
                }
                let preview = match spool.read(
                    Location {
                        segment: e.segment,
                        offset: e.offset,
                    },
                    e.content_len,
                    &e.content_hash,
                ) {
                    Ok(c) => String::from_utf8_lossy(&c[..c.len().min(200)])
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(40)
                        .collect::<String>(),
                    Err(_) => "(stored copy damaged)".to_owned(),
                };
                s.push_str(&format!(
                    "{} {}  {}  from {:<16} {:>8} bytes  {preview}\n",
                    if e.read_ms.is_some() { " " } else { "*" },
                    e.id,
                    ms_time(e.received_ms),
                    views::sender_name(&agent, &e.sender),
                    e.content_len
                ));
            }
            s
        },
    )
}

pub fn read(home: &Home, args: ReadArgs, out: &Out) -> Result<(), Failure> {
    let mut agent = home.load()?;
    let all = received_from(&agent, args.from.as_deref())?;
    let (mut chosen, group) = resolve_some(
        &args.id,
        all,
        |e| e.id,
        |e| received_group(&agent, e).map(|(k, _)| k),
    )?;
    if let Some(key) = group {
        return read_group(&agent, &key, &chosen, out);
    }
    let e = chosen.remove(0);
    if let Some(mut f) = file_json(&agent, &e) {
        agent.db_mut().mark_read(&e.key(), engine::now_ms())?;
        let d = agent
            .db()
            .download(&e.key())?
            .ok_or_else(|| anyhow!("the download of {} vanished", e.id))?;
        let verified = ms_time(d.changed_ms);
        // What was verified on arrival says nothing of the file now: read
        // it again and compare, so that "verified" is true today.
        let now = match (d.state.name(), &d.final_path) {
            ("done", Some(p)) => {
                Some((p.clone(), recheck(Path::new(p), d.size, &d.plaintext_hash)))
            }
            _ => None,
        };
        if let Some((_, c)) = &now {
            f["verified_on_receipt"] = json!(verified);
            f["on_disk_now"] = json!(c.name());
        }
        let name = d.name.clone();
        out.report(json!({"id": e.id.to_string(), "file": f}), || match &now {
            Some((p, OnDisk::Matches)) => format!(
                "File {name} ({} bytes), saved as {p}: read again now, it matches the hash verified on receipt ({verified})\n",
                d.size
            ),
            Some((p, OnDisk::Changed)) => format!(
                "File {name} at {p} has CHANGED since it was received and verified ({verified}): its content no longer matches\n"
            ),
            Some((p, OnDisk::Missing)) => format!(
                "File {name} is no longer at {p} (moved or deleted since it was received and verified, {verified})\n"
            ),
            None => format!(
                "File {name} ({} bytes) is {}: {} of {} chunks\n",
                d.size, d.state, f["chunks_done"], f["chunks"]
            ),
        })?;
        return match now {
            Some((p, OnDisk::Changed)) => Err(Failure {
                code: crate::exit::Exit::Tampered,
                class: "changed-on-disk",
                error: Some(anyhow!(
                    "{p} no longer matches the file received as message {} (verified on receipt, {verified})",
                    e.id
                )),
            }),
            Some((p, OnDisk::Missing)) => Err(Failure {
                code: crate::exit::Exit::NotFound,
                class: "not-found",
                error: Some(anyhow!("{p} is gone (message {})", e.id)),
            }),
            _ => Ok(()),
        };
    }
    let spool = Spool::open(home.dir()).map_err(anyhow::Error::new)?;
    let content = spool
        .read(
            Location {
                segment: e.segment,
                offset: e.offset,
            },
            e.content_len,
            &e.content_hash,
        )
        .map_err(|err| Failure {
            code: crate::exit::Exit::Tampered,
            class: "tampered",
            error: Some(anyhow::Error::new(err).context(format!(
                "the stored copy of message {} is damaged; it was verified when it arrived, so the disk changed it",
                e.id
            ))),
        })?;
    match &args.output {
        Some(path) => write_new_file(path, &content)?,
        None => {
            let mut stdout = io::stdout().lock();
            stdout
                .write_all(&content)
                .and_then(|_| stdout.flush())
                .map_err(output::stdout_error)?;
        }
    }
    agent.db_mut().mark_read(&e.key(), engine::now_ms())?;
    let v = inbox_json(&agent, &e);
    out.side_report(args.output.is_none(), v, || {
        format!(
            "From {} ({}), sent {}; received {}; content hash verified from storage; message {}\n",
            views::sender_name(&agent, &e.sender),
            agent
                .db()
                .contact_by_key(&e.sender)
                .ok()
                .flatten()
                .map(|c| c.card.public().fingerprint().to_string())
                .unwrap_or_default(),
            output::time(e.created_at),
            ms_time(e.received_ms),
            e.id
        )
    })
}

/// A received file as it is on disk now, against what was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDisk {
    Matches,
    Changed,
    Missing,
}

impl OnDisk {
    fn name(self) -> &'static str {
        match self {
            Self::Matches => "matches",
            Self::Changed => "changed",
            Self::Missing => "missing",
        }
    }
}

/// Reads `path` again and compares its length and BLAKE3 with the file's.
fn recheck(path: &Path, size: u64, hash: &[u8; 32]) -> OnDisk {
    let Ok(f) = std::fs::File::open(path) else {
        return OnDisk::Missing;
    };
    match f.metadata() {
        Ok(m) if m.is_file() && m.len() == size => {}
        Ok(_) => return OnDisk::Changed,
        Err(_) => return OnDisk::Missing,
    }
    match sealpost_agent::transfer::hash_file(&f, size) {
        Ok(h) if h.as_bytes() == hash => OnDisk::Matches,
        _ => OnDisk::Changed,
    }
}

fn write_new_file(path: &Path, content: &[u8]) -> Result<(), Failure> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".sealpost-read-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(content)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist_noclobber(path)
        .map_err(|e| anyhow::Error::new(e.error))
        .with_context(|| format!("cannot write {} (it is never overwritten)", path.display()))?;
    sealpost_agent::fsutil::sync_dir(dir).context("cannot sync the directory")?;
    Ok(())
}

pub fn receipt(home: &Home, cmd: ReceiptCmd, out: &Out) -> Result<(), Failure> {
    match cmd {
        ReceiptCmd::Export { id, to, output } => {
            let agent = home.load()?;
            let all = agent.db().outbox(None, usize::MAX >> 1)?;
            let e = resolve_id(&id, all.into_iter(), |e| e.id)?;
            let receipts: Vec<(&DeliveryRow, Report)> = e
                .deliveries
                .iter()
                .filter(|d| to.as_deref().is_none_or(|n| n == d.name))
                .filter_map(|d| {
                    d.receipt
                        .as_ref()
                        .and_then(|r| Report::decode(r).ok())
                        .map(|r| (d, r))
                })
                .collect();
            if receipts.is_empty() {
                return Err(Failure {
                    code: crate::exit::Exit::NotFound,
                    class: "not-found",
                    error: Some(anyhow!(
                        "no receipt or signed rejection for message {} yet{} (`sealpost status {}` shows where it stands)",
                        e.id,
                        to.map(|n| format!(" from {n}")).unwrap_or_default(),
                        e.id
                    )),
                });
            }
            let text: String = receipts.iter().map(|(_, r)| r.to_text() + "\n").collect();
            match &output {
                Some(p) => write_new_file(p, text.as_bytes())?,
                None => {
                    let mut stdout = io::stdout().lock();
                    stdout
                        .write_all(text.as_bytes())
                        .and_then(|_| stdout.flush())
                        .map_err(output::stdout_error)?;
                }
            }
            let v = json!({
                "id": e.id.to_string(),
                "receipts": receipts.iter().map(|(d, r)| json!({
                    "to": d.name,
                    "kind": match r.entries() { Entries::Receipt(_) => "receipt", Entries::Rejection(_) => "rejection" },
                    "issued": output::time(r.issued_at()),
                    "entries": r.entries().len(),
                })).collect::<Vec<_>>(),
                "output": output,
            });
            out.side_report(output.is_none(), v, || {
                let rejections = receipts
                    .iter()
                    .filter(|(_, r)| matches!(r.entries(), Entries::Rejection(_)))
                    .count();
                format!(
                    "{} receipt(s) and {rejections} signed rejection(s) for message {}; check with `sealpost receipt verify FILE --card CARD`\n",
                    receipts.len() - rejections,
                    e.id
                )
            })
        }
        ReceiptCmd::Verify { file, card, id } => {
            let card = crate::read_card(&card)?;
            let mut bytes = Vec::new();
            let limit = MAX_REPORT_TEXT_BYTES as u64 + 1;
            if file == "-" {
                io::stdin().take(limit).read_to_end(&mut bytes)
            } else {
                File::open(&file).and_then(|f| f.take(limit).read_to_end(&mut bytes))
            }
            .with_context(|| format!("cannot read {file}"))?;
            let bad = |e: anyhow::Error| Failure {
                code: crate::exit::Exit::ReceiptInvalid,
                class: "receipt-invalid",
                error: Some(e),
            };
            let want = match &id {
                Some(s) => Some(MessageId::parse_hex(s).ok_or_else(|| {
                    Failure::usage(anyhow!("{s:?} is not a full message id (32 hex digits)"))
                })?),
                None => None,
            };
            let entries = views::verify_receipts(&bytes, card.public(), card.name(), want)
                .map_err(|e| bad(anyhow::Error::new(e)))?;
            out.report(
                json!({"valid": true, "signer": card.name(), "fingerprint": card.public().fingerprint().to_string(), "entries": entries}),
                || {
                    let mut s = format!(
                        "Valid: signed by {} ({}).\n",
                        card.name(),
                        card.public().fingerprint()
                    );
                    for e in &entries {
                        match e {
                            views::VerifiedEntry::Receipt {
                                id,
                                content_blake3,
                                content_len,
                                stored,
                                ..
                            } => s.push_str(&format!(
                                "  stored {stored}  message {id}  {content_len} bytes  BLAKE3 {content_blake3}\n"
                            )),
                            views::VerifiedEntry::Rejection { id, reason, .. } => {
                                s.push_str(&format!("  rejected message {id}: {reason}\n"))
                            }
                        }
                    }
                    s
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_an_hour_or_more_a_mebibyte_or_more_or_forever() {
        assert!(matches!(parse_keep("forever"), Ok(Keep::Forever)));
        assert!(
            matches!(parse_keep("90d"), Ok(Keep::For(d)) if d == Duration::from_secs(90 * 86_400))
        );
        assert!(parse_keep("10m")
            .expect_err("short")
            .contains("at least 1h"));
        assert!(parse_keep("soon")
            .expect_err("not a duration")
            .contains("examples"));
        assert!(matches!(parse_keep("10GiB"), Ok(Keep::Size(n)) if n == 10 << 30));
        assert!(parse_keep("10KiB")
            .expect_err("small")
            .contains("at least 1MiB"));
    }

    /// Two received messages (or groups) may share an id, each from its
    /// own sender: the full id then names neither, and the error says how
    /// to choose, not to "give more digits"; a prefix shared by two ids
    /// still asks for more digits.
    #[test]
    fn one_id_from_two_senders_asks_whose() {
        let a = MessageId([0xab; 16]);
        let b = MessageId([0xac; 16]);
        let pick = |p: &str, ids: Vec<(u8, MessageId)>| {
            resolve_some(p, ids, |c| c.1, |_| None).map(|(c, _)| c)
        };
        let full = a.to_string();
        let err = pick(&full, vec![(1, a), (2, a)]).expect_err("ambiguous");
        assert!(
            format!("{:#}", err.error.expect("text")).contains("--from CONTACT"),
            "says how to choose"
        );
        let err = pick("a", vec![(1, a), (2, b)]).expect_err("ambiguous");
        assert!(format!("{:#}", err.error.expect("text")).contains("give more digits"));
        // With one sender's only (what --from leaves), one message.
        assert_eq!(
            pick(&full[..6], vec![(1, a), (2, b)]).expect("one"),
            vec![(1, a)]
        );
        // Two senders' groups under one group id.
        let err = resolve_some(
            "cd",
            vec![([1u8; 32], a), ([2u8; 32], b)],
            |c| c.1,
            |c| Some((c.0, [0xcd; 16])),
        )
        .expect_err("ambiguous");
        assert!(format!("{:#}", err.error.expect("text")).contains("--from CONTACT"));
    }
}
