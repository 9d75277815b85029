//! Broken networks between agents and their relay (real sockets on
//! 127.0.0.1 through `FaultyProxy`): connections cut inside the TLS
//! handshake, mid-frame and mid-record, left half-open, and a relay that
//! accepts and never answers. Every pass must end within its timeouts —
//! never hang — and once the network is back the message is delivered
//! once, with its receipt.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand_core::OsRng;
use sealpost_agent::engine::{self, Engine};
use sealpost_agent::Home;
use sealpost_proto::delivery::State;
use sealpost_proto::retry::Backoff;
use sealpost_relay::client::Timeouts;
use sealpost_relay::{Config, Relay, RelayAddress};
use sealpost_testkit::{FaultyProxy, NetFault};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_millis(800),
    request: Duration::from_millis(1500),
};

async fn engine(dir: &std::path::Path, name: &str, addr: &RelayAddress) -> Engine {
    let home = Home::new(dir.join(name));
    let mut agent = home.init(name, &mut OsRng, now()).expect("init");
    agent
        .set_home_relay(&addr.to_string(), engine::pin_of(addr), now())
        .expect("relay");
    let mut e = Engine::new(agent)
        .expect("engine")
        .with_link_backoff(Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(200),
        })
        .with_relay_timeouts(TIMEOUTS);
    e.timing.submit.base = Duration::from_millis(10);
    e.timing.submit.max = Duration::from_millis(10);
    e.pass().await.expect("first pass");
    e
}

fn pin(a: &mut Engine, name: &str, b: &Engine) {
    let card = b.agent().card().clone();
    a.agent_mut()
        .db_mut()
        .add_contact(name, &card, false, now())
        .expect("pin");
}

fn state(e: &Engine, id: &sealpost_proto::MessageId) -> State {
    let m = e.agent().db().outbox(Some(id), 1).expect("outbox");
    m[0].deliveries[0].delivery.state
}

/// A pass under a fault ends (with an error or not) well within a bound.
async fn bounded_pass(e: &mut Engine, what: &str) -> Duration {
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(40), e.pass()).await;
    assert!(r.is_ok(), "a pass hung under {what}");
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_time_out_reconnect_and_carry_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let relay = Relay::bind(Config::new(
        "127.0.0.1:0".parse().expect("addr"),
        dir.path().join("relay"),
    ))
    .await
    .expect("bind")
    .spawn();
    let target = relay.address().host_port.parse().expect("relay addr");
    let proxy = FaultyProxy::start(target, NetFault::Pass)
        .await
        .expect("proxy");
    let via = RelayAddress {
        host_port: proxy.addr().to_string(),
        pin: relay.address().pin,
    };
    let mut alice = engine(dir.path(), "alice", &via).await;
    let mut bob = engine(dir.path(), "bob", &via).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);

    // A message large enough that its submission spans many TLS records.
    let big = vec![0x5a; 300_000];
    let faults = [
        ("a cut inside the TLS handshake", NetFault::CutAfter(60)),
        (
            "a cut after the handshake, mid-frame",
            NetFault::CutAfter(6_000),
        ),
        (
            "a cut mid-record inside a 300 KB submission",
            NetFault::CutAfter(150_001),
        ),
        (
            "a half-open connection inside the handshake",
            NetFault::StallAfter(60),
        ),
        (
            "a half-open connection mid-submission",
            NetFault::StallAfter(150_001),
        ),
        (
            "a relay that accepts and never answers",
            NetFault::Blackhole,
        ),
    ];
    let mut ids = Vec::new();
    for (i, (what, fault)) in faults.iter().enumerate() {
        let id = alice
            .agent_mut()
            .send(&["bob".into()], &big, 3600, &format!("m{i}"))
            .expect("send");
        ids.push(id);
        proxy.set(*fault);
        proxy.cut_open();
        // The first pass finds its old connection gone (that alone fails
        // the submission for now); the second submits under the fault.
        bounded_pass(&mut alice, what).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let took = bounded_pass(&mut alice, what).await;
        eprintln!("{what}: {took:?}, accepted {}", proxy.accepted());
        assert_ne!(state(&alice, &id), State::Delivered, "{what}");
        eprintln!(
            "  last error: {:?}",
            alice.agent().db().outbox(Some(&id), 1).expect("o")[0].deliveries[0].last_error
        );
        // Back to a working network: the next passes deliver it.
        proxy.set(NetFault::Pass);
        proxy.cut_open();
        for _ in 0..3 {
            bounded_pass(&mut alice, "a working network").await;
            bounded_pass(&mut bob, "a working network").await;
            bounded_pass(&mut alice, "a working network").await;
            if state(&alice, &id) == State::Delivered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            state(&alice, &id),
            State::Delivered,
            "not delivered after {what} (the faulty pass took {took:?})"
        );
    }
    // Each exactly once in bob's inbox.
    let inbox = bob.agent().db().inbox(false, 1000).expect("inbox");
    assert_eq!(inbox.len(), ids.len());
    for id in &ids {
        assert_eq!(inbox.iter().filter(|e| e.id == *id).count(), 1);
    }
    assert!(proxy.accepted() > faults.len() as u64);
    relay.stop().await.expect("stop");
}
