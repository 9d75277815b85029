//! A short, seeded run of the hostile clients against a relay on
//! 127.0.0.1 while honest clients deliver (the full run, with the relay's
//! memory measured, is `bench/hostile-clients.sh`).

use std::time::Duration;

use sealpost_proto::Identity;
use sealpost_relay::client::RelayClient;
use sealpost_relay::{Config, Relay};
use sealpost_testkit::clients::{self, AttackConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_at_every_stage_do_not_stop_honest_clients() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = Config::new(
        "127.0.0.1:0".parse().expect("addr"),
        dir.path().join("data"),
    );
    cfg.handshake_timeout = Duration::from_secs(1);
    cfg.unauthenticated_idle_timeout = Duration::from_secs(1);
    cfg.frame_timeout = Duration::from_secs(1);
    cfg.limits.mailbox_quota = 100_000;
    let relay = Relay::bind(cfg).await.expect("bind").spawn();
    let addr = relay.address().clone();
    let victim = Identity::from_secret_bytes(&[7; 32], &[8; 32]);
    let owner = RelayClient::connect(&addr).await.expect("connect");
    let victim_mb = owner.register(&victim).await.expect("register");

    let mut attack = AttackConfig::short(addr.clone(), 21);
    attack.victim = Some(victim_mb);
    let r = clients::run(attack).await;
    let v = r.to_json();
    println!("{v:#}");

    // Honest clients were served throughout, every round.
    assert!(r.honest_rounds >= 20, "{v}");
    assert_eq!(r.honest_failures, 0, "{v}");
    // Every stalled connection was cut by the relay within the hold.
    for (kind, opened, closed) in &r.floods {
        assert!(*opened > 0, "{kind}: {v}");
        assert_eq!(
            opened, closed,
            "{kind} connections outlived their timeout: {v}"
        );
    }
    // Probes learnt nothing; stuffing stopped at the victim's quota.
    assert_eq!(r.probes_revealing, 0, "{v}");
    assert!(r.probes_not_found > 0, "{v}");
    assert!(r.stuffing_refused > 0 && r.stuffing_accepted < 100, "{v}");
    assert!(r.registered > 0, "{v}");
    assert!(r.storm_answered + r.storm_rate_limited > 0, "{v}");
    // The victim's owner still reaches its mailbox.
    assert!(owner.status().await.is_ok());
    let m = relay.metrics().clone();
    assert!(m.timeouts.load(std::sync::atomic::Ordering::Relaxed) > 0);
    relay.stop().await.expect("stop");
}
