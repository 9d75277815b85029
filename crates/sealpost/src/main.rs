//! The `sealpost` command: a thin layer over the agent and the sealed core.
#![forbid(unsafe_code)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "sealpost supports Linux only: its durability relies on Linux file APIs (fsync of directories, O_DIRECT, O_NOFOLLOW, file modes), and it is tested nowhere else"
);

mod deliver;
mod demo;
mod exit;
#[cfg(feature = "test-tools")]
mod load;
mod output;
mod pair;
mod relay_cmd;

use std::fs::File;
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use rand_core::OsRng;
use sealpost_agent::{deliver_to, AddOutcome, Agent, Home};
use sealpost_proto::card::MAX_CARD_TEXT_BYTES;
use sealpost_proto::{ContactCard, Kind};
use serde_json::json;

use crate::exit::Failure;
use crate::output::Out;

const ABOUT: &str = "Seal, sign and deliver messages and files end to end.

sealpost encrypts content to its recipients and signs it inside the
encryption, so only they can read it and they know who sent it, whatever
stores or carries it on the way. Identities are key pairs; you exchange
contact cards once (`invite` and `accept` with a short code read aloud,
or cards and fingerprints compared by hand), then sealpost pins the keys.";

#[derive(Parser, Debug)]
#[command(name = "sealpost", version = env!("SEALPOST_LONG_VERSION"), about = ABOUT, after_help = exit::help_text())]
struct Cli {
    /// Home directory with your identity, contacts and replay cache
    /// [default: $XDG_DATA_HOME/sealpost]
    #[arg(long, global = true, env = "SEALPOST_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    /// Print machine-readable JSON (on stdout, or on stderr when stdout
    /// carries content); errors become {"error", "class", "exit_code"}
    #[arg(long, global = true)]
    json: bool,

    /// Log less: errors only (SEALPOST_LOG overrides)
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,

    /// Log more: -v what happens (info), -vv debug, -vvv trace. By default
    /// warnings only; `agent` and `relay serve` log info. SEALPOST_LOG
    /// (e.g. `SEALPOST_LOG=sealpost_agent=debug`) overrides both flags
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create your identity (signing and encryption keys) in the home directory
    Init {
        /// Your display name, shown to people who import your card
        #[arg(long)]
        name: Option<String>,
        /// Your home relay (host:port/KEY, from `sealpost relay address`):
        /// registers your mailbox there and puts it in your card
        #[arg(long, value_name = "ADDRESS")]
        relay: Option<String>,
    },
    /// Show your contact card (one line to give to others) and fingerprint
    Id {
        /// Also show the card as a QR code in the terminal
        #[arg(long)]
        qr: bool,
        /// Write the card's QR code to this PNG file
        #[arg(long, value_name = "FILE")]
        png: Option<PathBuf>,
    },
    /// Invite someone to pair: prints a short code (7-clockwork-crossover)
    /// to tell them by phone or in person, and waits until they run
    /// `sealpost accept` with it; both cards are then pinned, proven by the
    /// code (a wrong code or someone in the middle fails, nothing pinned)
    Invite(pair::InviteArgs),
    /// Accept an invitation: the code someone gave you (or their QR
    /// invitation's text); pins their card and gives them yours
    Accept(pair::AcceptArgs),
    /// Manage the contacts whose keys you have pinned
    #[command(subcommand)]
    Contact(ContactCmd),
    /// Encrypt and sign content for contacts (offline; like gpg --sign --encrypt)
    Seal(SealArgs),
    /// Decrypt and verify a sealed message; prints who sent it and when
    Open(OpenArgs),
    /// Seal a message to a contact and queue it for delivery; prints its id.
    /// A running `sealpost agent` delivers it at once; otherwise it is
    /// handed to the relay now and `sealpost sync` finishes the job
    Send(deliver::SendArgs),
    /// One delivery pass: fetch and store new messages (sending their
    /// receipts), process receipts and rejections, submit and retransmit
    /// the outbox, expire what is too old
    Sync(deliver::SyncArgs),
    /// Run the delivery loop until stopped (Ctrl-C or SIGTERM): like `sync`,
    /// continuously, woken by the relay's pushes and by `send`
    Agent(deliver::SyncArgs),
    /// List received messages (* = unread)
    Inbox(deliver::InboxArgs),
    /// Print a received message, verified again from storage
    Read(deliver::ReadArgs),
    /// Where sent messages stand: queued, submitted, delivered (receipt
    /// verified) or failed (with the reason), per recipient
    Status(deliver::StatusArgs),
    /// Stop sending a message: no more submissions or retransmissions (a
    /// copy already at the relay may still be delivered, and then its
    /// receipt is recorded)
    Cancel(deliver::CancelArgs),
    /// Delete received messages from the inbox (a received file's record
    /// only; the file stays where it was saved)
    Delete(deliver::DeleteArgs),
    /// Archive received messages: out of `inbox`'s list, kept and still
    /// readable (`inbox --archived` lists them; `--undo` brings them back)
    Archive(deliver::ArchiveArgs),
    /// Export or verify receipts: signed proof that a recipient stored a message
    #[command(subcommand)]
    Receipt(deliver::ReceiptCmd),
    /// Run or inspect a relay (store-and-forward server), or choose your home relay
    #[command(subcommand)]
    Relay(relay_cmd::RelayCmd),
    /// Show every guarantee at work: identities, a message, a 64 MiB file,
    /// and tampered, misaddressed, forwarded, replayed and stale copies refused
    Demo {
        /// Size of the demo file in MiB
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=4096))]
        size_mib: u64,
    },
    /// Print a shell completion script, e.g.
    /// `sealpost completions bash > ~/.local/share/bash-completion/completions/sealpost`
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `sealpost man | man -l -`; with
    /// --dir, write sealpost.1 and one page per subcommand there
    Man {
        /// Directory to write every page to
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ContactCmd {
    /// Pin a contact from a card: the one-line text, a file holding it, or - for stdin
    Add {
        /// `sealpost-card-v1:…`, a path to a card file, or -
        card: String,
        /// Name to file the contact under [default: the card's name]
        #[arg(long)]
        name: Option<String>,
        /// Accept a different key for an already pinned name (only after
        /// comparing the new fingerprint with its owner)
        #[arg(long)]
        replace: bool,
    },
    /// List pinned contacts with their fingerprints
    List,
    /// Show one contact's card and fingerprint
    Show { name: String },
    /// Forget a contact
    Remove { name: String },
}

#[derive(Args, Debug)]
struct SealArgs {
    /// Contact to seal for (repeat for several recipients)
    #[arg(long = "to", value_name = "NAME", required = true)]
    to: Vec<String>,
    /// Write the sealed message here [default: stdout]
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// How long the sealed message may be opened, e.g. 30m, 12h, 7d (at
    /// most 400 days), or `never`. A message with an expiry is refused by
    /// `open` after it only with --strict (plain `open` reports it)
    #[arg(long, default_value = "never", value_parser = parse_seal_lifetime)]
    expires: Lifetime,
    /// Content to seal, or - for stdin. A file is padded so its sealed size
    /// tells only a coarse bucket; stdin, whose length is not known in
    /// advance, is not
    #[arg(default_value = "-")]
    input: String,
}

#[derive(Args, Debug)]
struct OpenArgs {
    /// Write the content here, only once every check passed [default: stdout]
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Replace the --output file if it exists (it is never replaced otherwise)
    #[arg(long, requires = "output")]
    force: bool,
    /// Refuse, as delivery through relays does, a message that expired, is
    /// dated in the future, never expires, or was opened here before
    /// (without it these are reported, and the message is opened)
    #[arg(long)]
    strict: bool,
    /// Sealed message to open, or - for stdin
    #[arg(default_value = "-")]
    input: String,
}

/// How long a sealed message may be opened.
#[derive(Clone, Copy, Debug)]
enum Lifetime {
    Never,
    For(Duration),
}

impl Lifetime {
    /// The `expires_at` of a message created at `now`.
    fn expires_at(self, now: u64) -> u64 {
        match self {
            Self::Never => sealpost_proto::message::NO_EXPIRY,
            Self::For(d) => now.saturating_add(d.as_secs()),
        }
    }
}

fn parse_seal_lifetime(s: &str) -> Result<Lifetime, String> {
    if s.eq_ignore_ascii_case("never") {
        return Ok(Lifetime::Never);
    }
    parse_lifetime(s)
        .map(Lifetime::For)
        .map_err(|e| format!("{e}, or never"))
}

/// An expiry time for people and `--json`: None when it never expires.
fn expiry(expires_at: u64) -> Option<u64> {
    (expires_at != sealpost_proto::message::NO_EXPIRY).then_some(expires_at)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m, 1h)"))
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30m, 12h, 7d)"))?;
    if d.as_secs() == 0 {
        return Err("must be at least one second".into());
    }
    if d.as_secs() > sealpost_proto::message::MAX_LIFETIME_SECS {
        return Err("must be at most 400 days".into());
    }
    Ok(d)
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn default_home() -> anyhow::Result<PathBuf> {
    directories::ProjectDirs::from("", "", "sealpost")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or_else(|| anyhow!("cannot find a home directory; pass --home DIR"))
}

fn main() -> ExitCode {
    let matches = match <Cli as clap::CommandFactory>::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    // Whether --home was typed (not only set in the environment): the
    // relay's own commands refuse it rather than ignore it.
    let home_typed = matches.value_source("home") == Some(clap::parser::ValueSource::CommandLine);
    let cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Logs go to stderr; SEALPOST_LOG (or RUST_LOG) sets the level, else
    // -q/-v, else: warnings for commands that finish (a `sync` from cron
    // says nothing when all is well), info for the long-running ones. The
    // demo provokes failures on purpose and reports them itself.
    let daemon = matches!(
        cli.command,
        Command::Agent(_) | Command::Relay(relay_cmd::RelayCmd::Serve(_))
    );
    let default_level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (_, 1) => "info",
        (_, 2) => "debug",
        (_, 3..) => "trace",
        _ if matches!(cli.command, Command::Demo { .. }) => "error",
        _ if daemon => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEALPOST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Module paths help whoever debugs, not a person reading a warning.
    let targets = cli.verbose >= 2 || std::env::var_os("SEALPOST_LOG").is_some();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| output::LogWriter)
        .log_internal_errors(false)
        .with_target(targets)
        .with_ansi(
            io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .try_init();
    let out = Out::new(cli.json);
    match run(cli, home_typed, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(&out),
    }
}

/// A command line clap refused: with --json anywhere in it, the error is
/// the same JSON object as every other error (help and --version are
/// printed as usual).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
    let shown = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !json || shown {
        e.exit();
    }
    let text = e.kind().as_str().map(str::to_owned).unwrap_or_default();
    let detail = e.render().to_string();
    // clap's rendering starts with "error: " and ends with a usage hint.
    let first = detail
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned();
    let v = serde_json::json!({
        "error": if first.is_empty() { text } else { first },
        "class": "usage",
        "exit_code": 2,
    });
    output::to_stderr(&format!("{v}\n"));
    ExitCode::from(2)
}

/// `sealpost completions` and `sealpost man`: generated from the same
/// definitions as the parser, so they cannot drift from it.
fn generated_docs(command: &Command) -> Option<Result<(), Failure>> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    match command {
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "sealpost", &mut buf);
            Some(write_stdout(&buf))
        }
        Command::Man { dir: None } => {
            let mut buf = Vec::new();
            Some(
                clap_mangen::Man::new(cmd)
                    .render(&mut buf)
                    .map_err(|e| anyhow!("cannot render the manual page: {e}").into())
                    .and_then(|()| write_stdout(&buf)),
            )
        }
        Command::Man { dir: Some(dir) } => Some(
            std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(cmd, dir))
                .map_err(|e| {
                    anyhow!("cannot write the manual pages to {}: {e}", dir.display()).into()
                }),
        ),
        _ => None,
    }
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(output::stdout_error)
}

fn run(cli: Cli, home_typed: bool, out: &Out) -> Result<(), Failure> {
    if let Some(r) = generated_docs(&cli.command) {
        return r;
    }
    let home_dir = cli.home;
    let home = || -> Result<Home, Failure> {
        Ok(Home::new(match &home_dir {
            Some(h) => h.clone(),
            None => default_home()?,
        }))
    };
    let command = match cli.command {
        Command::Relay(relay_cmd::RelayCmd::Use { address }) => {
            return deliver::use_relay(&mut home()?.load()?, &address, out)
        }
        Command::Relay(_) if home_typed => {
            return Err(Failure::usage(anyhow!(
                "--home is an identity's home; a relay keeps its data in --data DIR (`sealpost relay serve --data DIR`)"
            )))
        }
        Command::Relay(cmd) => return relay_cmd::run(cmd, out),
        other => other,
    };
    let home = home()?;
    match command {
        Command::Init { name, relay } => init(&home, name, relay, out),
        Command::Send(args) => deliver::send(&home, args, out),
        Command::Sync(args) => deliver::sync(&home, args, out),
        Command::Agent(args) => deliver::agent(&home, args, out),
        Command::Inbox(args) => deliver::inbox(&home, args, out),
        Command::Read(args) => deliver::read(&home, args, out),
        Command::Status(args) => deliver::status(&home, args, out),
        Command::Receipt(cmd) => deliver::receipt(&home, cmd, out),
        Command::Cancel(args) => deliver::cancel(&home, args, out),
        Command::Delete(args) => deliver::delete(&home, args, out),
        Command::Archive(args) => deliver::archive(&home, args, out),
        Command::Id { qr, png } => id(&home.load()?, qr, png.as_deref(), out),
        Command::Invite(args) => pair::invite(&home, args, out),
        Command::Accept(args) => pair::accept(&home, args, out),
        Command::Contact(cmd) => contact(&mut home.load()?, cmd, out),
        Command::Seal(args) => seal(&home.load()?, args, out),
        Command::Open(args) => open(&mut home.load()?, args, out),
        Command::Demo { size_mib } => demo::run(size_mib, out),
        Command::Relay(cmd) => relay_cmd::run(cmd, out),
        Command::Completions { .. } | Command::Man { .. } => {
            generated_docs(&command).unwrap_or(Ok(()))
        }
    }
}

fn init(
    home: &Home,
    name: Option<String>,
    relay: Option<String>,
    out: &Out,
) -> Result<(), Failure> {
    let name = name
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "me".into());
    if let Some(r) = &relay {
        deliver::parse_relay_address(r)?;
    }
    let mut agent = match home.init(&name, &mut OsRng, now()) {
        Err(sealpost_agent::AgentError::IdentityExists(dir)) if relay.is_some() => {
            return Err(Failure::contact(anyhow!(
                "an identity already exists in {} (it is never overwritten); to set its home relay, run `sealpost relay use {}`",
                dir.display(),
                relay.as_deref().unwrap_or_default()
            )));
        }
        other => other?,
    };
    if let Some(r) = &relay {
        // The identity is made and kept; only the relay step failed. Say
        // so, and how to finish, rather than leave a home that looks
        // half-made.
        if let Err(mut f) = deliver::use_relay(&mut agent, r, &Out::new(true).quiet()) {
            let cause = f
                .error
                .take()
                .map(|e| exit::once_each(&e))
                .unwrap_or_default();
            f.error = Some(anyhow!(
                "created identity {name:?} (fingerprint {}) in {}, but could not register at the relay: {cause}. Once it can be reached, run `sealpost relay use {r}`",
                agent.identity().fingerprint(),
                home.dir().display()
            ));
            return Err(f);
        }
    }
    let fp = agent.identity().fingerprint();
    out.report(
        json!({
            "home": home.dir(),
            "name": name,
            "fingerprint": fp.to_string(),
            "card": agent.card().to_text(),
            "relay": relay,
        }),
        || {
            format!(
                "Created identity {name:?} in {}\nFingerprint: {fp}\n\nYour contact card (give it to people who will write to you):\n{}\n",
                home.dir().display(),
                agent.card().to_text()
            )
        },
    )
}

fn id(agent: &Agent, qr: bool, png: Option<&Path>, out: &Out) -> Result<(), Failure> {
    let card = agent.card();
    if let Some(p) = png {
        pair::write_png(&card.to_text(), p, false)?;
    }
    if qr {
        output::to_stderr(&pair::qr_text(&card.to_text())?);
    }
    out.report(
        json!({
            "name": card.name(),
            "fingerprint": card.public().fingerprint().to_string(),
            "card": card.to_text(),
            "age_recipient": card.public().age_recipient_string(),
        }),
        || {
            // stdout carries the card alone, so that `sealpost id > me.card`
            // and `sealpost id | sealpost contact add -` work; the rest is
            // for the person at the terminal.
            output::to_stderr(&format!(
                "Name:        {}\nFingerprint: {}\n",
                card.name(),
                card.public().fingerprint()
            ));
            format!("{}\n", card.to_text())
        },
    )
}

/// The card in what `sealpost id` printed (or a file or message holding
/// it): the first line that is a card, or the `card` of its `--json`.
fn card_in_text(text: &str) -> Option<String> {
    let prefix = sealpost_proto::card::TEXT_PREFIX;
    if let Some(line) = text.lines().map(str::trim).find(|l| l.starts_with(prefix)) {
        return Some(line.to_owned());
    }
    let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    v["card"].as_str().map(str::to_owned)
}

/// Reads a card given as text, as a file (text or binary form), or on stdin.
pub(crate) fn read_card(arg: &str) -> Result<ContactCard, Failure> {
    if arg
        .trim_start()
        .starts_with(sealpost_proto::card::TEXT_PREFIX)
    {
        return Ok(ContactCard::from_text(arg).map_err(sealpost_agent::AgentError::from)?);
    }
    let mut bytes = Vec::new();
    // Room for what `id --json` prints around a card.
    let limit = 4 * MAX_CARD_TEXT_BYTES as u64;
    if arg == "-" {
        io::stdin().take(limit).read_to_end(&mut bytes)
    } else {
        File::open(arg).and_then(|f| f.take(limit).read_to_end(&mut bytes))
    }
    .with_context(|| format!("cannot read the card from {arg}"))?;
    let card = match std::str::from_utf8(&bytes).ok().and_then(card_in_text) {
        Some(text) => ContactCard::from_text(&text),
        None => ContactCard::decode(&bytes),
    };
    Ok(card.map_err(sealpost_agent::AgentError::from)?)
}

fn contact(agent: &mut Agent, cmd: ContactCmd, out: &Out) -> Result<(), Failure> {
    match cmd {
        ContactCmd::Add {
            card,
            name,
            replace,
        } => {
            let card = read_card(&card)?;
            if card.public() == agent.identity().public() {
                return Err(Failure::contact(anyhow!(
                    "this is your own card; give it to others instead"
                )));
            }
            let name = name.unwrap_or_else(|| card.name().to_owned());
            sealpost_proto::codec::check_printable(&name, "contact name")
                .map_err(sealpost_agent::AgentError::from)?;
            let outcome = agent.db_mut().add_contact(&name, &card, replace, now())?;
            let fp = card.public().fingerprint();
            let (tag, text) = match &outcome {
                AddOutcome::Added => (
                    "added",
                    format!("Pinned {name:?} with fingerprint\n  {fp}\nCompare it with {name} in person or by phone before trusting it.\n"),
                ),
                AddOutcome::AlreadyPinned { refreshed: true } => {
                    ("refreshed", format!("{name:?} was already pinned with this key; updated to the newer card.\n"))
                }
                AddOutcome::AlreadyPinned { refreshed: false } => {
                    ("unchanged", format!("{name:?} is already pinned with this key.\n"))
                }
                AddOutcome::Replaced { old } => (
                    "replaced",
                    format!("Replaced the key of {name:?}:\n  old {old}\n  new {fp}\n"),
                ),
            };
            out.report(
                json!({"name": name, "fingerprint": fp.to_string(), "outcome": tag}),
                || text,
            )
        }
        ContactCmd::List => {
            let contacts = agent.db().contacts()?;
            let rows: Vec<_> = contacts
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "card_name": c.card.name(),
                        "fingerprint": c.card.public().fingerprint().to_string(),
                        "relay": c.card.fields().relay.as_ref().map(|r| r.address.clone()),
                        "added": output::time(c.added_at),
                    })
                })
                .collect();
            out.report(json!({ "contacts": rows }), || {
                if contacts.is_empty() {
                    return "No contacts yet. Add one with `sealpost contact add CARD`.\n".into();
                }
                let mut s = String::new();
                for c in &contacts {
                    s += &format!("{:<20} {}\n", c.name, c.card.public().fingerprint());
                }
                s
            })
        }
        ContactCmd::Show { name } => {
            let c = agent.db().contact(&name)?;
            let f = c.card.fields();
            out.report(
                json!({
                    "name": c.name,
                    "card_name": c.card.name(),
                    "fingerprint": c.card.public().fingerprint().to_string(),
                    "card": c.card.to_text(),
                    "card_created": output::time(f.created_at),
                    "added": output::time(c.added_at),
                    "relay": f.relay.as_ref().map(|r| r.address.clone()),
                }),
                || {
                    format!(
                        "Name:        {}\nCard name:   {}\nFingerprint: {}\nCard made:   {}\nRelay:       {}\nCard:        {}\n",
                        c.name,
                        c.card.name(),
                        c.card.public().fingerprint(),
                        output::time(f.created_at),
                        f.relay.as_ref().map(|r| r.address.as_str()).unwrap_or("(none)"),
                        c.card.to_text()
                    )
                },
            )
        }
        ContactCmd::Remove { name } => {
            agent.db_mut().remove_contact(&name)?;
            out.report(json!({"removed": name}), || format!("Removed {name:?}.\n"))
        }
    }
}

fn open_input(input: &str) -> Result<Box<dyn Read>, Failure> {
    if input == "-" {
        Ok(Box::new(io::stdin().lock()))
    } else {
        let f = File::open(input).with_context(|| format!("cannot open {input}"))?;
        Ok(Box::new(f))
    }
}

/// The directory a temporary file for `output` goes in: next to it, so the
/// final rename stays on one file system.
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn seal(agent: &Agent, args: SealArgs, out: &Out) -> Result<(), Failure> {
    let recipients = agent.recipients(&args.to)?;
    if args.output.is_none() && io::stdout().is_terminal() {
        return Err(Failure::usage(anyhow!(
            "refusing to write a sealed (binary) message to the terminal; use -o FILE or a pipe"
        )));
    }
    let input = BufReader::with_capacity(256 * 1024, open_input(&args.input)?);
    // A regular file's length is known before it is read, so it is padded;
    // a pipe's is not (PROTOCOL.md §4.3).
    let content_len = (args.input != "-")
        .then(|| std::fs::metadata(&args.input).ok())
        .flatten()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    let spool_dir = match &args.output {
        Some(p) => dir_of(p).to_path_buf(),
        None => std::env::temp_dir(),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".sealpost-seal-")
        .tempfile_in(&spool_dir)
        .with_context(|| format!("cannot create a temporary file in {}", spool_dir.display()))?;
    let when = now();
    let expires_at = args.expires.expires_at(when);
    let summary = {
        let w = BufWriter::with_capacity(256 * 1024, tmp.as_file_mut());
        agent
            .seal(
                &recipients,
                Kind::Message,
                expires_at - when,
                when,
                &mut OsRng,
                input,
                content_len,
                w,
            )
            .context("sealing failed")?
    };
    match &args.output {
        Some(path) => {
            tmp.as_file()
                .sync_all()
                .context("cannot sync the sealed file")?;
            tmp.persist(path)
                .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error))?;
            sealpost_agent::fsutil::sync_dir(dir_of(path)).context("cannot sync the directory")?;
        }
        None => {
            let mut f = File::open(tmp.path()).context("cannot reread the sealed message")?;
            let mut stdout = io::stdout().lock();
            io::copy(&mut f, &mut stdout)
                .and_then(|_| stdout.flush())
                .map_err(output::stdout_error)?;
        }
    }
    let report = json!({
        "id": summary.id.to_string(),
        "to": args.to,
        "content_len": summary.content_len,
        "content_blake3": summary.content_hash.to_hex().to_string(),
        "sealed_len": summary.sealed_len,
        "created": output::time(when),
        "expires": expiry(expires_at).map(output::time),
        "output": args.output,
    });
    out.side_report(args.output.is_none(), report, || {
        format!(
            "Sealed {} bytes for {} as message {} ({})\n",
            summary.content_len,
            args.to.join(", "),
            summary.id,
            match expiry(expires_at) {
                Some(t) => format!("expires {}", output::time(t)),
                None => "no expiry".to_owned(),
            }
        )
    })
}

fn open(agent: &mut Agent, args: OpenArgs, out: &Out) -> Result<(), Failure> {
    if let Some(p) = &args.output {
        // Said before anything is decrypted; the final rename checks again.
        if !args.force && std::fs::symlink_metadata(p).is_ok() {
            return Err(sealpost_agent::AgentError::OutputExists(p.clone()).into());
        }
    }
    let input = BufReader::with_capacity(256 * 1024, open_input(&args.input)?);
    let spool_dir = match &args.output {
        Some(p) => dir_of(p).to_path_buf(),
        None => agent.home().dir().to_path_buf(),
    };
    let when = now();
    let freshness = if args.strict {
        sealpost_agent::Freshness::Enforce
    } else {
        sealpost_agent::Freshness::Report
    };
    let received = agent.receive_with(input, &spool_dir, when, freshness)?;
    match &args.output {
        Some(path) => {
            let content = received.content;
            deliver_to(content, path, args.force)?;
        }
        None => {
            let mut f = File::open(received.content.path()).context("cannot reread the content")?;
            let mut stdout = io::stdout().lock();
            io::copy(&mut f, &mut stdout)
                .and_then(|_| stdout.flush())
                .map_err(output::stdout_error)?;
        }
    }
    agent.mark_delivered(&received.opened, when)?;
    let notes = received.notes;
    let h = &received.opened.header;
    let report = json!({
        "from": received.sender.name,
        "fingerprint": h.sender.fingerprint().to_string(),
        "id": h.id.to_string(),
        "kind": h.kind.name(),
        "created": output::time(h.created_at),
        "expires": expiry(h.expires_at).map(output::time),
        "expired": notes.expired,
        "from_future": notes.from_future,
        "opened_before": notes.opened_before,
        "in_reply_to": h.in_reply_to.map(|i| i.to_string()),
        "recipients": h.recipients.len(),
        "content_len": received.opened.content_len,
        "content_blake3": received.opened.content_hash.to_hex().to_string(),
        "output": args.output,
    });
    out.side_report(args.output.is_none(), report, || {
        let mut s = format!(
            "From {} ({}), sent {}; signature and content hash verified; message {}\n",
            received.sender.name,
            h.sender.fingerprint(),
            output::time(h.created_at),
            h.id
        );
        if notes.expired {
            s.push_str(&format!(
                "note: it expired {}; opened anyway (--strict refuses it)\n",
                output::time(h.expires_at)
            ));
        }
        if notes.from_future {
            s.push_str("note: it is dated more than 5 minutes ahead of this clock; opened anyway (--strict refuses it)\n");
        }
        if notes.opened_before {
            s.push_str("note: a copy of this message was opened here before; opened again (--strict refuses it)\n");
        }
        s
    })
}
