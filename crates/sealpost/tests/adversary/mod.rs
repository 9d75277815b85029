//! The adversary soak, shortened and seeded (the full run is
//! `bench/adversary.sh`): real agents and a real relay, the relay hostile
//! with every fault class on, then a crash campaign with SIGKILLs; the
//! guarantees are checked from what the endpoints hold.

use std::time::Duration;

use sealpost_testkit::soak::{self, SoakConfig};

fn config(dir: &std::path::Path, seed: u64, kills: usize) -> SoakConfig {
    SoakConfig {
        sealpost: assert_cmd::cargo::cargo_bin("sealpost"),
        dir: dir.to_path_buf(),
        seed,
        identities: 3,
        messages: 240,
        files: 5,
        max_file: 1_500_000,
        faults: "all=0.05".into(),
        hostile_for: Duration::from_secs(12),
        kills,
        retransmit_after: Duration::from_secs(2),
        settle_timeout: Duration::from_secs(120),
        batch: 40,
    }
}

/// Runs the soak; on a violation keeps its scratch directory (homes, relay
/// data, fault log, every process's log) for a look, and says where.
fn run(seed: u64, kills: usize) -> soak::SoakReport {
    let dir = tempfile::tempdir().expect("tmp");
    let r = soak::run(config(dir.path(), seed, kills)).expect("soak ran");
    if !r.ok() {
        eprintln!("soak scratch kept at {}", dir.keep().display());
    }
    r
}

fn assert_held(r: &soak::SoakReport) {
    assert!(r.ok(), "{}", r.to_text());
    assert_eq!(
        r.delivered,
        r.sent_messages + r.sent_files,
        "{}",
        r.to_text()
    );
    // Every class struck at least once (blob faults need a file piece to
    // be read while they roll, so they are not required here).
    for class in [
        "drop",
        "duplicate",
        "delay",
        "flip",
        "truncate",
        "replay",
        "move",
        "substitute",
        "forge-refusal",
        "forge-report",
    ] {
        assert!(
            r.faults.get(class).copied().unwrap_or(0) > 0,
            "{class} never struck:\n{}",
            r.to_text()
        );
    }
}

#[test]
fn a_hostile_relay_loses_forges_or_alters_nothing_that_is_accepted() {
    let r = run(11, 0);
    assert_held(&r);
    // Without crashes every altered, misdirected, forged or replayed item
    // was caught by an endpoint.
    for class in [
        "flip",
        "truncate",
        "substitute",
        "forge-report",
        "duplicate",
    ] {
        if let Some((m, n)) = r.matched.get(class) {
            assert_eq!(m, n, "{class}: not every fault was caught\n{}", r.to_text());
        }
    }
}

#[test]
fn a_hostile_relay_and_sigkills_lose_nothing() {
    let r = run(12, 8);
    assert_held(&r);
    assert_eq!(r.kills, 8);
}
