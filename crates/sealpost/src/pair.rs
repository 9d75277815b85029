//! `sealpost invite` and `sealpost accept`: pairing by short code through
//! a relay (PROTOCOL.md §10), and QR codes of cards and invitations.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use rand_core::OsRng;
use sealpost_agent::{AddOutcome, Agent, Home};
use sealpost_proto::pair::{self, Code, Exchange, Invitation, Keys, PairError, Side};
use sealpost_proto::relay::ErrorCode;
use sealpost_proto::ContactCard;
use sealpost_relay::client::{ClientError, RelayClient};
use sealpost_relay::RelayAddress;
use serde_json::json;

use crate::exit::{Exit, Failure};
use crate::output::{self, Out};

/// How long one `PairWait` asks the relay to hold (it holds at most 30 s).
const WAIT_STEP: Duration = Duration::from_secs(25);
/// How long an accepter waits for the inviter's answers: the inviter's
/// command is running and answers within a round trip.
const ANSWER_WAIT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct InviteArgs {
    /// Name to pin the other person's card under [default: the name in
    /// their card]
    #[arg(long)]
    name: Option<String>,
    /// Words in the code (each adds 8 bits; one guess in 65,536 at the
    /// default 2). 2 to 8
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=8))]
    words: u8,
    /// How long the invitation stays open, e.g. 2m, 10m (at most 10m)
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    timeout: Duration,
    /// Show the invitation as a QR code instead of words: it carries your
    /// relay's address and a 128-bit one-time secret (for a phone or
    /// laptop in the same room)
    #[arg(long)]
    qr: bool,
    /// Write the invitation's QR code to this PNG file (readable by you
    /// only: it holds the one-time secret); implies a QR invitation
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct AcceptArgs {
    /// The code you were given (7-clockwork-crossover), or CODE@RELAY, or
    /// a whole invitation (sealpost-invite:…)
    code: String,
    /// Name to pin the inviter's card under [default: the name in their
    /// card]
    #[arg(long)]
    name: Option<String>,
    /// The inviter's relay (host:port/KEY), when it is not your home relay
    /// and the code does not name it
    #[arg(long, value_name = "ADDRESS")]
    relay: Option<String>,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 2m, 10m)"))?;
    if d < Duration::from_secs(10) || d > Duration::from_secs(pair::DEFAULT_TIMEOUT_SECS as u64) {
        return Err("must be between 10s and 10m".into());
    }
    Ok(d)
}

/// The other side knew the code but sent a card whose key did not sign the
/// exchange: a contact passing somebody else's card off as theirs.
fn not_their_card() -> Failure {
    failed(
        "pairing-not-confirmed",
        anyhow!("the other side knew the code but sent a card that is not its own (the card's key did not sign this exchange): they may be trying to pass somebody else's key off as theirs. Nothing was pinned"),
    )
}

fn failed(class: &'static str, e: anyhow::Error) -> Failure {
    Failure {
        code: Exit::PairingFailed,
        class,
        error: Some(e),
    }
}

/// A relay's answer to a pairing request, as a failure to show.
fn relay_failure(e: ClientError, what: &str) -> Failure {
    match e {
        ClientError::Server {
            code: ErrorCode::PairGone,
            message,
        } => failed("pairing-gone", anyhow!("{what}: {message}. Nothing was pinned")),
        ClientError::Server {
            code: ErrorCode::NotOffered,
            message,
        } => failed("pairing-not-offered", anyhow!("{message}")),
        // A relay from before pairing closes on a request it does not know.
        ClientError::Closed => failed(
            "pairing-not-offered",
            anyhow!("{what}: the relay closed the connection; it may be a version without pairing. Nothing was pinned; exchange cards with `sealpost id` and `sealpost contact add` instead"),
        ),
        other => crate::deliver::engine_failure(sealpost_agent::engine::EngineError::Relay(other)),
    }
}

fn code_failure(e: PairError) -> Failure {
    Failure::usage(anyhow!("{e}; nothing was sent, the code is still good"))
}

/// The name to pin `card` under, checked before anything is sent so that
/// a name clash does not burn a code.
fn check_name(agent: &Agent, name: Option<&str>) -> Result<(), Failure> {
    if let Some(n) = name {
        sealpost_proto::codec::check_printable(n, "contact name")
            .map_err(sealpost_agent::AgentError::from)?;
        if agent.db().contact(n).is_ok() {
            return Err(Failure::contact(anyhow!(
                "a contact named {n:?} exists already; choose another --name (or remove it first)"
            )));
        }
    }
    Ok(())
}

/// Pins the card the exchange proved, as `contact add` does after a
/// fingerprint comparison: names unique, a pinned key never replaced.
fn pin(
    agent: &mut Agent,
    card: &ContactCard,
    name: Option<&str>,
) -> Result<(String, AddOutcome), Failure> {
    if card.public() == agent.identity().public() {
        return Err(Failure::contact(anyhow!(
            "the other side sent your own card; nothing was pinned"
        )));
    }
    let name = name.unwrap_or(card.name()).to_owned();
    sealpost_proto::codec::check_printable(&name, "contact name")
        .map_err(sealpost_agent::AgentError::from)?;
    let outcome = agent
        .db_mut()
        .add_contact(&name, card, false, crate::now())?;
    Ok((name, outcome))
}

/// Waits for the other side's next message until `deadline`.
async fn next_message(
    c: &RelayClient,
    slot: u32,
    deadline: tokio::time::Instant,
    what: &str,
) -> Result<Vec<u8>, Failure> {
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(failed(
                "pairing-timeout",
                anyhow!("{what}: no answer in time. Nothing was pinned; make a new invitation"),
            ));
        }
        match c.pair_wait(slot, left.min(WAIT_STEP)).await {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => continue,
            Err(e) => return Err(relay_failure(e, what)),
        }
    }
}

/// What one side of a pairing ended with, for the user: its failure, an
/// interruption (`None`: Ctrl-C or SIGTERM, and what that left), or the
/// card pinned.
fn paired_report(
    out: &Out,
    r: Option<Result<(String, ContactCard, AddOutcome), Failure>>,
    interrupted: &str,
) -> Result<(), Failure> {
    let (name, card, outcome) = match r {
        Some(r) => r?,
        None => {
            return Err(Failure {
                code: Exit::Interrupted,
                class: "interrupted",
                error: Some(anyhow!("interrupted: {interrupted}")),
            })
        }
    };
    let (name, outcome) = (name.as_str(), &outcome);
    let fp = card.public().fingerprint();
    let tag = match outcome {
        AddOutcome::Added => "added",
        AddOutcome::AlreadyPinned { refreshed: true } => "refreshed",
        AddOutcome::AlreadyPinned { refreshed: false } => "unchanged",
        AddOutcome::Replaced { .. } => "replaced",
    };
    out.report(
        json!({
            "paired": name,
            "fingerprint": fp.to_string(),
            "outcome": tag,
            "relay": card.fields().relay.as_ref().map(|r| r.address.clone()),
        }),
        || {
            let pinned = match outcome {
                AddOutcome::Added => "pinned",
                _ => "already pinned with this key",
            };
            format!("Paired with {name} (fingerprint {fp}): {pinned}. The code proved the card is theirs; no fingerprint comparison is needed.\n")
        },
    )
}

pub fn invite(home: &Home, args: InviteArgs, out: &Out) -> Result<(), Failure> {
    let mut agent = home.load()?;
    check_name(&agent, args.name.as_deref())?;
    let relay = agent
        .home_relay()
        .map_err(crate::deliver::engine_failure)?
        .ok_or_else(|| {
            Failure::contact(anyhow!(
                "no home relay: pairing runs through it. Set one with `sealpost relay use ADDRESS`, or exchange cards offline with `sealpost id` and `sealpost contact add`"
            ))
        })?;
    let rt = crate::deliver::runtime()?;
    let r = rt.block_on(crate::deliver::until_interrupted(async {
        let c = RelayClient::connect(&relay)
            .await
            .map_err(|e| relay_failure(e, "cannot open the invitation"))?;
        c.auth(agent.identity())
            .await
            .map_err(|e| relay_failure(e, "cannot open the invitation"))?;
        let ttl = args.timeout.as_secs() as u32;
        let words = (!(args.qr || args.png.is_some())).then_some(args.words as usize);
        let (code, exchange, expires_at) = open_invitation(&c, ttl, words).await?;
        let deadline = tokio::time::Instant::now() + args.timeout;
        show_invitation(out, &code, &relay, expires_at, &args)?;
        let r = invite_rest(
            &c,
            &mut agent,
            exchange,
            code.slot,
            deadline,
            args.name.as_deref(),
        )
        .await;
        // Whatever happened, the slot is left: the other side is told at
        // once, and no one may join it.
        let _ = c.pair_leave(code.slot).await;
        r
    }));
    paired_report(out, r, "the invitation is withdrawn, nothing was pinned")
}

/// Opens a slot on `c` (authenticated as its owner) for `ttl` seconds
/// and starts the inviter's exchange: a code of `words` words, or of a
/// 128-bit token for `None`; its first message is in the slot. Returns
/// the code, the exchange and when the slot ends (relay's clock).
pub(crate) async fn open_invitation(
    c: &RelayClient,
    ttl: u32,
    words: Option<usize>,
) -> Result<(Code, Exchange, u64), Failure> {
    let (slot, expires_at) = c
        .pair_open(ttl)
        .await
        .map_err(|e| relay_failure(e, "cannot open the invitation"))?;
    let code = match words {
        Some(n) => Code::words(slot, n, &mut OsRng),
        None => Code::token(slot, &mut OsRng),
    };
    let (exchange, first) = Exchange::start(Side::Inviter, &code, OsRng);
    c.pair_send(slot, first.to_vec())
        .await
        .map_err(|e| relay_failure(e, "cannot open the invitation"))?;
    Ok((code, exchange, expires_at))
}

/// The inviter's side once the invitation is open: waits for the
/// accepter, checks its card, pins it and sends this side's card.
pub(crate) async fn invite_rest(
    c: &RelayClient,
    agent: &mut Agent,
    exchange: Exchange,
    slot: u32,
    deadline: tokio::time::Instant,
    name: Option<&str>,
) -> Result<(String, ContactCard, AddOutcome), Failure> {
    let theirs = match next_message(c, slot, deadline, "nobody accepted the invitation").await {
        // The relay ends the slot at its time (whole seconds, counted from
        // before this side's deadline was): gone at the deadline is the
        // invitation timing out, and said so.
        Err(f)
            if f.class == "pairing-gone"
                && deadline.saturating_duration_since(tokio::time::Instant::now())
                    < std::time::Duration::from_secs(2) =>
        {
            return Err(failed(
                "pairing-timeout",
                anyhow!("nobody accepted the invitation: no answer in time. Nothing was pinned; make a new invitation"),
            ));
        }
        other => other?,
    };
    let burnt = |e: PairError| {
        match e {
        PairError::NotTheirCard => not_their_card(),
        e => failed(
            "pairing-not-confirmed",
            anyhow!("someone used the invitation but did not prove they know the code ({e}): a mistyped code, a guess, or someone in the middle. Nothing was pinned and the code is used up; make a new invitation"),
        ),
    }
    };
    let keys: Keys = exchange.finish(&theirs).map_err(burnt)?;
    let deadline = deadline.min(tokio::time::Instant::now() + ANSWER_WAIT);
    let sealed = next_message(
        c,
        slot,
        deadline,
        "the other side stopped before sending its card",
    )
    .await?;
    let card = keys.open_card(&sealed).map_err(burnt)?;
    // Pinned before this side's card goes: a card that cannot be pinned
    // here (a name or key clash) stops the exchange with nothing sent.
    let (name, outcome) = pin(agent, &card, name)?;
    c.pair_send(slot, keys.seal_card(agent.identity(), agent.card()))
        .await
        .map_err(|e| {
            relay_failure(
                e,
                &format!("pinned {name}, but could not send your card to them"),
            )
        })?;
    Ok((name, card, outcome))
}

fn show_invitation(
    out: &Out,
    code: &Code,
    relay: &RelayAddress,
    expires_at: u64,
    args: &InviteArgs,
) -> Result<(), Failure> {
    let text = code.to_text();
    let with_relay = format!("{}@{}", text.as_str(), relay.to_checked_text());
    let invitation = Invitation {
        code: code.clone(),
        relay: Some(relay.to_checked_text()),
    }
    .to_text();
    if let Some(path) = &args.png {
        write_png(invitation.as_str(), path, true)?;
    }
    // On stderr: stdout carries the one result (`--json`: one object).
    if out.json() {
        let v = json!({
            "invitation": text.as_str(),
            "slot": code.slot,
            "relay": relay.to_checked_text(),
            "expires_at": output::time(expires_at),
            "accept": format!("sealpost accept {with_relay}"),
            // The invitation a QR code carries (`--qr`, `--png`).
            "qr": (args.qr || args.png.is_some()).then(|| invitation.as_str().to_owned()),
        });
        output::to_stderr(&format!("{v}\n"));
    } else {
        let mut s = String::new();
        if args.qr || args.png.is_some() {
            if args.qr {
                s += &qr_text(invitation.as_str())?;
                s += "Scan it with the other device, or give them this text";
            } else {
                s += "Give them the QR code in the PNG, or this text";
            }
            s += " (they run `sealpost accept` with it):\n  ";
            s += invitation.as_str();
            s += "\n";
        } else {
            s += &format!(
                "Code: {}\n\nTell it to the other person (by phone, or in person); they run\n  sealpost accept {}\nor, if their home relay is not yours,\n  sealpost accept {}\n",
                text.as_str(),
                text.as_str(),
                with_relay
            );
        }
        if let Some(p) = &args.png {
            s += &format!("QR code written to {}\n", p.display());
        }
        s += &format!(
            "One attempt; open until {} on your relay. Waiting for them (Ctrl-C withdraws it)…\n",
            output::time(expires_at)
        );
        output::to_stderr(&s);
    }
    Ok(())
}

pub fn accept(home: &Home, args: AcceptArgs, out: &Out) -> Result<(), Failure> {
    let mut agent = home.load()?;
    let invitation = Invitation::parse(&args.code).map_err(code_failure)?;
    check_name(&agent, args.name.as_deref())?;
    let relay = match args.relay.as_deref().or(invitation.relay.as_deref()) {
        Some(r) => crate::deliver::parse_relay_address(r)?,
        None => agent
            .home_relay()
            .map_err(crate::deliver::engine_failure)?
            .ok_or_else(|| {
                Failure::contact(anyhow!(
                    "no home relay and none named: give the inviter's relay with --relay ADDRESS (or as CODE@ADDRESS)"
                ))
            })?,
    };
    let rt = crate::deliver::runtime()?;
    let r = rt.block_on(crate::deliver::until_interrupted(async {
        let c = RelayClient::connect(&relay)
            .await
            .map_err(|e| relay_failure(e, "cannot reach the inviter's relay"))?;
        accept_with(&c, &mut agent, &invitation.code, args.name.as_deref()).await
    }));
    paired_report(out, r, "nothing was pinned, and the code is used up")
}

/// The accepter's side: joins the slot of `code` on `c`, runs the
/// exchange, pins the inviter's card; leaves the slot in any case.
pub(crate) async fn accept_with(
    c: &RelayClient,
    agent: &mut Agent,
    code: &Code,
    name: Option<&str>,
) -> Result<(String, ContactCard, AddOutcome), Failure> {
    let (exchange, first) = Exchange::start(Side::Accepter, code, OsRng);
    c.pair_join(code.slot, first.to_vec())
        .await
        .map_err(|e| relay_failure(e, &format!("cannot use invitation {}", code.slot)))?;
    let r = accept_rest(c, agent, exchange, code.slot, name).await;
    let _ = c.pair_leave(code.slot).await;
    r
}

async fn accept_rest(
    c: &RelayClient,
    agent: &mut Agent,
    exchange: Exchange,
    slot: u32,
    name: Option<&str>,
) -> Result<(String, ContactCard, AddOutcome), Failure> {
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    let theirs = next_message(c, slot, deadline, "the inviter did not answer").await?;
    let not_confirmed = || {
        failed(
            "pairing-not-confirmed",
            anyhow!("the inviter did not prove it knows the code: the code was mistyped (check each word with them), or someone in the middle took part. Nothing was pinned and the code is used up; ask for a new one"),
        )
    };
    let keys = exchange.finish(&theirs).map_err(|_| not_confirmed())?;
    c.pair_send(slot, keys.seal_card(agent.identity(), agent.card()))
        .await
        .map_err(|e| relay_failure(e, "cannot send your card"))?;
    let sealed = match next_message(c, slot, deadline, "the inviter did not send its card").await {
        // The inviter leaves without a card when ours did not open: the
        // two sides did not share the code.
        Err(f) if f.class == "pairing-gone" => return Err(not_confirmed()),
        other => other?,
    };
    let card = keys.open_card(&sealed).map_err(|e| match e {
        PairError::NotTheirCard => not_their_card(),
        _ => not_confirmed(),
    })?;
    let (name, outcome) = pin(agent, &card, name)?;
    Ok((name, card, outcome))
}

/// `text` as a QR code in the terminal (two rows per character line).
pub fn qr_text(text: &str) -> Result<String, Failure> {
    let code = qrcode::QrCode::new(text.as_bytes()).context("cannot make a QR code of it")?;
    let s = code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build();
    Ok(s + "\n")
}

/// `text` as a QR code in a PNG file: 8 pixels a module, a 4-module quiet
/// zone, black on white; written to a temporary file and renamed. A
/// `private` one (an invitation's one-time secret) is readable by its
/// owner only.
pub fn write_png(text: &str, path: &Path, private: bool) -> Result<(), Failure> {
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let code = qrcode::QrCode::new(text.as_bytes()).context("cannot make a QR code of it")?;
    let w = code.width();
    let colors = code.to_colors();
    let side = (w + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for y in 0..w {
        for x in 0..w {
            if colors[y * w + x] == qrcode::Color::Dark {
                for dy in 0..SCALE {
                    let row = ((y + QUIET) * SCALE + dy) * side;
                    let from = row + (x + QUIET) * SCALE;
                    pixels[from..from + SCALE].fill(0);
                }
            }
        }
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, side as u32, side as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().context("cannot encode the PNG")?;
        wr.write_image_data(&pixels)
            .context("cannot encode the PNG")?;
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("png.tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .and_then(|mut f| f.write_all(&bytes))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
