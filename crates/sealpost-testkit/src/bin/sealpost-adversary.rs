//! `sealpost-adversary`: the adversary soak and crash campaign (see
//! `sealpost_testkit::soak`). A testing tool; it runs everything on
//! 127.0.0.1 in a scratch directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sealpost_testkit::soak::{self, SoakConfig};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Sends messages and files between identities through a hostile relay
/// (optionally killing processes at random), heals the relay, and checks
/// that nothing was lost, delivered twice, tampered with or forged.
/// Exits 1 if any guarantee was violated, 2 if the run itself failed.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The sealpost binary to test
    #[arg(long, default_value = "target/release/sealpost")]
    sealpost: PathBuf,
    /// Scratch directory (created; must not hold anything you need)
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 4)]
    identities: usize,
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    #[arg(long, default_value_t = 50)]
    files: usize,
    /// Largest file in bytes
    #[arg(long, default_value_t = 8 << 20)]
    max_file: u64,
    /// Fault rates (`--hostile` SPEC without the seed)
    #[arg(long, default_value = "all=0.02")]
    faults: String,
    /// How long the relay stays hostile
    #[arg(long, default_value = "60s", value_parser = duration)]
    hostile_for: Duration,
    /// SIGKILLs of the relay and agents at random moments while hostile
    #[arg(long, default_value_t = 0)]
    kills: usize,
    #[arg(long, default_value = "3s", value_parser = duration)]
    retransmit_after: Duration,
    #[arg(long, default_value = "5m", value_parser = duration)]
    settle_timeout: Duration,
    /// Messages per `send --repeat`
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Relays: 1 (everyone on it) or 2 (homes alternate between relays
    /// on 127.0.0.2 and 127.0.0.3, every agent forwards through its own,
    /// both hostile, both killed)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    relays: u8,
    /// A relay cluster instead: this many nodes of one relay on a
    /// throwaway PostgreSQL and Garage (S3) started here, homes
    /// alternating between nodes; PostgreSQL is crashed once and the
    /// object store stopped for --store-down while the load runs
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=8))]
    cluster_nodes: u8,
    /// How long the object store stays stopped in a cluster run
    #[arg(long, default_value = "30s", value_parser = duration)]
    store_down: Duration,
    /// Also write the report as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let cfg = SoakConfig {
        sealpost: a.sealpost,
        dir: a.dir,
        seed: a.seed,
        identities: a.identities,
        messages: a.messages,
        files: a.files,
        max_file: a.max_file,
        faults: a.faults,
        hostile_for: a.hostile_for,
        kills: a.kills,
        retransmit_after: a.retransmit_after,
        settle_timeout: a.settle_timeout,
        batch: a.batch,
        relays: usize::from(a.relays),
        cluster_nodes: usize::from(a.cluster_nodes),
        store_down: a.store_down,
    };
    match soak::run(cfg) {
        Ok(r) => {
            print!("{}", r.to_text());
            if let Some(p) = a.json {
                if let Err(e) = soak::write_report(&r, &p) {
                    eprintln!("cannot write {}: {e}", p.display());
                    return ExitCode::from(2);
                }
            }
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("the soak could not run: {e}");
            ExitCode::from(2)
        }
    }
}
