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

/// The link between two relays breaks the ways networks do (PROTOCOL
/// 6.8): Alice's relay (127.0.0.2) reaches Bob's (127.0.0.3) only through
/// the proxy, which cuts each connection mid-stream, then leaves them
/// half-open, then swallows them (accepts, never answers). Under each,
/// Alice's relay keeps her item queued with the attempt's error (no
/// hang: each attempt ends within its timeouts); once the link heals it
/// hands it on and Bob fetches it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_between_two_relays_breaks_and_heals() {
    use sealpost_proto::relay::{Forward, NextHop};
    use sealpost_relay::client::{RelayClient, Submitted};
    let dir = tempfile::tempdir().expect("tmp");
    let start = |ip: &str, name: &str| {
        let mut cfg = Config::new(
            format!("{ip}:0").parse().expect("addr"),
            dir.path().join(name),
        );
        cfg.forwarding.retry = Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_millis(400),
        };
        cfg.forwarding.poll = Duration::from_millis(100);
        cfg.forwarding.timeouts = TIMEOUTS;
        cfg
    };
    let b = Relay::bind(start("127.0.0.3", "b"))
        .await
        .expect("b")
        .spawn();
    let a = Relay::bind(start("127.0.0.2", "a"))
        .await
        .expect("a")
        .spawn();
    let b_port = b
        .address()
        .host_port
        .rsplit(':')
        .next()
        .expect("port")
        .parse()
        .expect("port");
    let proxy = FaultyProxy::start(([127, 0, 0, 3], b_port).into(), NetFault::Pass)
        .await
        .expect("proxy");
    // Bob's relay as Alice's relay reaches it: through the proxy.
    let to_b = NextHop {
        addr: proxy.addr().to_string(),
        pin: b.address().pin.0,
    };
    let (alice, bob) = (
        sealpost_proto::Identity::generate(&mut OsRng),
        sealpost_proto::Identity::generate(&mut OsRng),
    );
    let bob_c = RelayClient::connect(b.address()).await.expect("connect");
    let bob_mb = bob_c.register(&bob).await.expect("bob");
    let alice_c = RelayClient::connect(a.address()).await.expect("connect");
    alice_c.register(&alice).await.expect("alice");
    for (n, fault) in [
        NetFault::CutAfter(700),
        NetFault::StallAfter(700),
        NetFault::Blackhole,
    ]
    .into_iter()
    .enumerate()
    {
        proxy.set(fault);
        proxy.cut_open();
        let payload = format!("item {n} under {fault:?}").into_bytes();
        let r = alice_c
            .forward_many(vec![Forward {
                hops: 0,
                next: to_b.clone(),
                mailbox: bob_mb,
                expires_at: now() + 600,
                payload_hash: *blake3::hash(&payload).as_bytes(),
                payload: payload.clone(),
            }])
            .await;
        assert!(matches!(r[0], Ok(Submitted::Accepted { .. })), "{r:?}");
        // Attempts fail and end (timeouts), the item waits with why.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let q = a.store().forward_queue().await.expect("queue");
            let failed = q
                .first()
                .is_some_and(|h| h.items == 1 && h.last_error.is_some());
            if failed && proxy.accepted() > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{fault:?}: no failed attempt seen: {q:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (items, _) = bob_c.fetch(0, 10).await.expect("fetch");
        assert!(items.is_empty(), "{fault:?}: nothing reached Bob's relay");
        // The link heals.
        proxy.set(NetFault::Pass);
        proxy.cut_open();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (items, _) = bob_c.fetch(0, 10).await.expect("fetch");
            if !items.is_empty() {
                assert_eq!(items.len(), 1, "{fault:?}: once");
                assert_eq!(items[0].payload, payload);
                bob_c.ack(vec![items[0].seq]).await.expect("ack");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{fault:?}: not handed on after the heal"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !a.store().forward_queue().await.expect("queue").is_empty() {
            assert!(Instant::now() < deadline, "{fault:?}: still queued");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}
