//! `sealpost-hostile-clients`: strangers attack a relay at every stage of
//! a connection while honest clients deliver (see
//! `sealpost_testkit::clients`). A testing tool: aim it only at a relay on
//! loopback that you run yourself.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sealpost_proto::Identity;
use sealpost_relay::client::RelayClient;
use sealpost_testkit::clients::{self, AttackConfig};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Opens CONNECTIONS hostile connections (split over five kinds: TCP only,
/// half a TLS handshake, Hello then idle, a head announcing 1 MiB with no
/// body, a body one byte per 200 ms) from SOURCES loopback addresses
/// (127.0.0.2 onwards), storms, stuffs a victim's mailbox, registers and
/// probes, for HOLD; meanwhile HONEST clients do submit → fetch → ack
/// rounds. Prints a JSON report; exits 1 if an honest round failed or a
/// probe learnt something.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The relay's address (HOST:PORT/PIN), on loopback
    #[arg(long)]
    relay: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 4096)]
    connections: usize,
    #[arg(long, default_value_t = 16)]
    sources: u8,
    #[arg(long, default_value = "20s", value_parser = duration)]
    hold: Duration,
    #[arg(long, default_value_t = 4)]
    honest: usize,
    #[arg(long, default_value_t = 100_000)]
    storm: usize,
    #[arg(long, default_value_t = 2000)]
    stuffing: usize,
    #[arg(long, default_value_t = 1000)]
    registrations: usize,
    #[arg(long, default_value_t = 2000)]
    probes: usize,
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
    let each = a.connections / 5;
    let r = rt.block_on(async {
        let victim = Identity::from_secret_bytes(&[7; 32], &[8; 32]);
        let owner = RelayClient::connect(&relay).await.ok()?;
        let victim_mb = owner.register(&victim).await.ok()?;
        let cfg = AttackConfig {
            relay: relay.clone(),
            seed: a.seed,
            sources: (0..a.sources.max(1))
                .map(|i| IpAddr::from([127, 0, 0, 2 + i]))
                .collect(),
            tcp_only: each,
            half_handshakes: each,
            hello_idle: each,
            big_heads: each,
            slow_bodies: a.connections - 4 * each,
            storm: a.storm,
            stuffing: a.stuffing,
            victim: Some(victim_mb),
            registrations: a.registrations,
            probes: a.probes,
            hold: a.hold,
            honest: a.honest,
        };
        let r = clients::run(cfg).await;
        let owner_ok = owner.status().await.is_ok();
        Some((r, owner_ok))
    });
    let Some((r, owner_ok)) = r else {
        eprintln!("could not reach the relay to start");
        return ExitCode::from(2);
    };
    let mut v = r.to_json();
    v["victim_owner_still_served"] = owner_ok.into();
    println!("{v:#}");
    if r.honest_failures > 0 || r.probes_revealing > 0 || r.honest_rounds == 0 || !owner_ok {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
