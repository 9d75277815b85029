//! Many subscribed agents on one relay: each push reaches the connection
//! subscribed to its mailbox, and no other (issue 23).

use std::net::IpAddr;
use std::time::Duration;

use sealpost_relay::client::RelayClient;
use sealpost_relay::{Config, Relay};
use sealpost_testkit::idle::{self, IdleConfig, IdleReport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_their_subscriber_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = Config::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("d"));
    let relay = Relay::bind(cfg).await.expect("bind").spawn();
    let addr = relay.address().clone();
    let cfg = IdleConfig {
        relay: addr.clone(),
        seed: 3,
        agents: 200,
        sources: (2..6).map(|i| IpAddr::from([127, 0, 0, i])).collect(),
        parallel: 32,
        pushes: 60,
        setup_limit: Duration::from_secs(60),
        push_limit: Duration::from_secs(5),
    };
    let mut report = IdleReport::default();
    let mut agents = idle::connect_all(&cfg, &mut report).await;
    assert_eq!(report.subscribed, 200, "{:?}", report.first_error);
    let sender = RelayClient::connect(&addr).await.expect("sender");
    idle::measure_pushes(&cfg, &mut agents, &sender, &mut report).await;
    assert_eq!(report.push_ms.len(), 60, "{report:?}");
    assert_eq!((report.push_lost, report.push_stray), (0, 0), "{report:?}");
    // Half of them go away; pushes to the others still arrive, and a
    // submission for a mailbox whose subscriber left is simply stored.
    let gone: Vec<_> = agents.drain(..100).collect();
    let orphan = gone[0].mailbox;
    drop(gone);
    let mut report = IdleReport::default();
    idle::measure_pushes(&cfg, &mut agents, &sender, &mut report).await;
    assert_eq!((report.push_lost, report.push_stray), (0, 0), "{report:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(matches!(
        sender
            .submit(orphan, now + 60, vec![1; 8])
            .await
            .expect("answer"),
        sealpost_relay::client::Submitted::Accepted { .. }
    ));
    relay.stop().await.expect("stop");
}
