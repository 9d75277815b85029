//! `sealpost-hostile-contact`: a pinned contact that sends its victim
//! everything the format allows and more (see `sealpost_testkit::contact`).
//! A testing tool: aim it only at your own agent, through a relay on
//! loopback that you run yourself.
//!
//!   sealpost-hostile-contact --relay ADDR --card-out mallory.card
//!   sealpost contact add mallory.card          # the victim pins it
//!   sealpost-hostile-contact --relay ADDR --victim-card bob.card

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use sealpost_proto::card::ContactCard;
use sealpost_testkit::contact::{ContactAttack, HostileContact};

/// Writes the hostile contact's card (--card-out), or attacks the owner of
/// --victim-card through the relay: malformed manifests, names that climb
/// out of the download directory, a terabyte announced, a file whose blob
/// never comes, the longest names twice, the agent's own partial-file
/// name, the deepest tree, the same file many times, replays and a flood.
/// Prints a JSON report of what the relay accepted.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The relay's address (HOST:PORT/PIN), on loopback
    #[arg(long)]
    relay: String,
    /// Write the contact's card here (for the victim to pin) and exit
    #[arg(long, value_name = "FILE")]
    card_out: Option<std::path::PathBuf>,
    /// The victim's card (text or a file holding it)
    #[arg(long, value_name = "CARD")]
    victim_card: Option<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 1000)]
    flood: usize,
    #[arg(long, default_value_t = 100)]
    replays: usize,
    #[arg(long, default_value_t = 20)]
    same_file: usize,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let (relay, rt) = match sealpost_testkit::tool::setup(&a.relay) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mallory = HostileContact::new(a.seed, relay);
    if let Some(out) = &a.card_out {
        if let Err(e) = std::fs::write(out, mallory.card(now).to_text() + "\n") {
            eprintln!("cannot write {}: {e}", out.display());
            return ExitCode::from(2);
        }
        return ExitCode::SUCCESS;
    }
    let Some(victim) = a.victim_card else {
        eprintln!("give --card-out FILE or --victim-card CARD");
        return ExitCode::from(2);
    };
    let text = std::fs::read_to_string(&victim).unwrap_or(victim);
    let card = match text
        .lines()
        .find(|l| l.trim().starts_with(sealpost_proto::card::TEXT_PREFIX))
        .map(|l| ContactCard::from_text(l.trim()))
    {
        Some(Ok(c)) => c,
        _ => {
            eprintln!("--victim-card: no valid card");
            return ExitCode::from(2);
        }
    };
    let attack = ContactAttack {
        seed: a.seed,
        flood: a.flood,
        replays: a.replays,
        same_file: a.same_file,
    };
    match rt.block_on(mallory.run(card.public(), &attack, now)) {
        Ok(r) => {
            println!("{:#}", r.to_json());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attack failed: {e}");
            ExitCode::from(1)
        }
    }
}
