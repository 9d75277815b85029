//! `sealpost-idle-agents`: many agents online at once against one relay
//! (see `sealpost_testkit::idle`). Opens AGENTS connections that each
//! register a mailbox, subscribe and stay idle; when all are up it prints
//! `ready` on stderr and waits HOLD (measure the relay meanwhile), then
//! times PUSHES pushes through them and prints a JSON report. A testing
//! tool: aim it only at a relay on loopback that you run yourself.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sealpost_relay::client::RelayClient;
use sealpost_testkit::idle::{self, IdleConfig, IdleReport};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The relay's address (HOST:PORT/PIN), on loopback
    #[arg(long)]
    relay: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Loopback addresses to connect from (127.0.0.2 onwards)
    #[arg(long, default_value_t = 64)]
    sources: u8,
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// How long to hold the agents idle before the pushes
    #[arg(long, default_value = "10s", value_parser = duration)]
    hold: Duration,
    #[arg(long, default_value_t = 200)]
    pushes: usize,
    /// Time allowed to set every agent up
    #[arg(long, default_value = "5m", value_parser = duration)]
    setup_limit: Duration,
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
    let cfg = IdleConfig {
        relay: relay.clone(),
        seed: a.seed,
        agents: a.agents,
        sources: (0..a.sources.max(1))
            .map(|i| IpAddr::from([127, 0, 0, 2 + i]))
            .collect(),
        parallel: a.parallel,
        pushes: a.pushes,
        setup_limit: a.setup_limit,
        push_limit: Duration::from_secs(5),
    };
    let report = rt.block_on(async {
        let mut report = IdleReport::default();
        let mut agents = idle::connect_all(&cfg, &mut report).await;
        eprintln!(
            "ready: {} subscribed, {} failed",
            report.subscribed, report.failed
        );
        tokio::time::sleep(a.hold).await;
        match RelayClient::connect(&relay).await {
            Ok(sender) => idle::measure_pushes(&cfg, &mut agents, &sender, &mut report).await,
            Err(e) => {
                report.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        eprintln!("measured");
        drop(agents);
        report
    });
    println!("{}", report.to_json());
    if report.subscribed < a.agents || report.push_lost > 0 {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
