//! Forwarding through the sender's own relay (PROTOCOL 6.8, 6.9), engine
//! to engine over memory nets: Alice's home relay and Bob's are two
//! relays in memory that reach each other over one net (the backbone);
//! Alice's agent is on a net with only her relay, Bob's on one with only
//! his, so neither agent can reach the other's relay.
//! Alice hands a message to her relay and goes quiet; her relay forwards
//! it; Bob fetches it and his receipt comes back through his relay to
//! hers; Alice learns of it when she is back. A refusal by Bob's relay
//! reaches Alice as her relay's signed notice.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{now, pin, state};
use rand_core::OsRng;
use sealpost_agent::engine::{self, Engine, PassStats};
use sealpost_agent::Home;
use sealpost_proto::delivery::State;
use sealpost_proto::retry::Backoff;
use sealpost_relay::memory::MemoryNet;
use sealpost_relay::{Config, RunningRelay};

/// A relay on the in-memory store, on the `backbone` (forwarding over it)
/// and on `users`, the net of its own users' agents.
async fn relay(
    dir: &std::path::Path,
    name: &str,
    backbone: &Arc<MemoryNet>,
    users: &Arc<MemoryNet>,
) -> RunningRelay {
    relay_forwarding(dir, name, backbone, users, true).await
}

/// [`relay`], forwarding or not (`relay serve --forward off`).
async fn relay_forwarding(
    dir: &std::path::Path,
    name: &str,
    backbone: &Arc<MemoryNet>,
    users: &Arc<MemoryNet>,
    forwards: bool,
) -> RunningRelay {
    relay_with(dir, name, backbone, users, |c| {
        c.forwarding.enabled = forwards
    })
    .await
}

/// [`relay`], its configuration then changed by `tweak` (a tamper hook,
/// lists of relays it takes items from).
async fn relay_with(
    dir: &std::path::Path,
    name: &str,
    backbone: &Arc<MemoryNet>,
    users: &Arc<MemoryNet>,
    tweak: impl FnOnce(&mut Config),
) -> RunningRelay {
    let mut cfg = Config::new("127.0.0.1:0".parse().expect("addr"), dir.join(name));
    cfg.forwarding.transport = backbone.clone();
    cfg.forwarding.poll = Duration::from_millis(20);
    cfg.forwarding.retry = Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_millis(100),
    };
    tweak(&mut cfg);
    let relay = common::spawn_in_memory(cfg).await;
    backbone.add(relay.door());
    users.add(relay.door());
    relay
}

/// Passes of `e` (a pause between them, for the relays' forwarding) until
/// `done` holds, 10 s at most; their stats summed.
async fn passes_until(e: &mut Engine, done: impl Fn(&Engine) -> bool) -> PassStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = PassStats::default();
    loop {
        let s = e.pass().await.expect("pass");
        all.add(&s);
        if done(e) {
            return all;
        }
        assert!(Instant::now() < deadline, "not done: {all:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Alice on relay A, Bob on relay B (each relay on the backbone and on
/// its own user's net, so neither agent reaches the other's relay),
/// pinned to each other, both forwarding.
struct Two {
    dir: tempfile::TempDir,
    backbone: Arc<MemoryNet>,
    a: RunningRelay,
    b: RunningRelay,
    alice: Engine,
    bob: Engine,
}

async fn two() -> Two {
    let dir = tempfile::tempdir().expect("tmp");
    let (backbone, net_a, net_b) = (MemoryNet::new(), MemoryNet::new(), MemoryNet::new());
    let a = relay(dir.path(), "relay-a", &backbone, &net_a).await;
    let b = relay(dir.path(), "relay-b", &backbone, &net_b).await;
    let mut alice = common::engine(dir.path(), "alice", a.address(), &net_a, None).await;
    let mut bob = common::engine(dir.path(), "bob", b.address(), &net_b, None).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);
    alice.forward = true;
    bob.forward = true;
    Two {
        dir,
        backbone,
        a,
        b,
        alice,
        bob,
    }
}

/// Whether `e`'s inbox holds `n` messages.
fn inbox_holds(e: &Engine, n: usize) -> bool {
    e.agent().db().inbox(false, 10).map_or(0, |v| v.len()) == n
}

/// Alice (on relay A, forwarding on) sends to Bob (on relay B, forwarding
/// on): her relay takes it ("forwarding": at your relay) and she stops;
/// Bob gets it from his relay; his receipt travels B → A; Alice's next
/// pass verifies it. Alice and Bob are never in a pass at the same time,
/// and neither talks to the other's relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_and_its_receipt_travel_through_both_relays() {
    let Two {
        dir: _dir,
        backbone,
        a,
        b,
        mut alice,
        mut bob,
    } = two().await;
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"through two relays", 3600, "hi")
        .expect("send");
    let s = alice.pass().await.expect("pass");
    assert_eq!((s.forwarded, s.submitted), (1, 0), "{s:?}");
    assert_eq!(state(&alice, &id).0, State::Forwarding, "at her relay");
    // Bob, later: the message is at his relay.
    let s = passes_until(&mut bob, |b| inbox_holds(b, 1)).await;
    assert_eq!(s.delivered, 1, "{s:?}");
    let inbox = bob.agent().db().inbox(false, 10).expect("inbox");
    assert_eq!(
        &inbox[0].sender,
        alice.agent().card().public().signing_bytes()
    );
    // Alice, later again: the receipt came back through both relays.
    passes_until(&mut alice, |a| state(a, &id).0 == State::Delivered).await;
    assert!(backbone.counts().0 >= 2, "relay to relay, both ways");
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// Carol's card names relay B, but she never registered there: B refuses
/// the forwarded message, and A's signed notice carrying B's signed
/// refusal fails Alice's delivery with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_the_next_relay_fails_the_delivery_with_its_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let (backbone, net_a, net_b) = (MemoryNet::new(), MemoryNet::new(), MemoryNet::new());
    let a = relay(dir.path(), "relay-a", &backbone, &net_a).await;
    let b = relay(dir.path(), "relay-b", &backbone, &net_b).await;
    let mut alice = common::engine(dir.path(), "alice", a.address(), &net_a, None).await;
    let carol_home = Home::new(dir.path().join("carol"));
    let mut carol = carol_home.init("carol", &mut OsRng, now()).expect("init");
    carol
        .set_home_relay(&b.address().to_string(), engine::pin_of(b.address()), now())
        .expect("relay");
    let card = carol.card().clone();
    alice
        .agent_mut()
        .db_mut()
        .add_contact("carol", &card, false, now())
        .expect("pin");
    alice.forward = true;
    let id = alice
        .agent_mut()
        .send(&["carol".into()], b"to nobody", 3600, "x")
        .expect("send");
    passes_until(&mut alice, |a| state(a, &id).0 == State::Failed).await;
    let (st, failure) = state(&alice, &id);
    assert_eq!(
        (st, failure.as_deref()),
        (State::Failed, Some("refused:unknown_mailbox"))
    );
    let m = alice.agent().db().outbox(Some(&id), 1).expect("outbox");
    let text = format!("{:?}", m[0].deliveries[0].delivery.failure);
    assert!(text.contains("passed on by your relay"), "{text}");
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// Alice's relay is hostile: it makes up a refusal by Bob's relay (signed
/// with a key of its own, with no binding by Bob's relay's certificate
/// key, or with the genuine binding of another relay). Alice's agent
/// takes none of them: the delivery stays "at your relay", and each
/// notice is recorded as a forged refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_made_up_by_the_senders_relay_is_not_taken() {
    use sealpost_proto::notice::{Ended, Notice};
    use sealpost_proto::relay::{MailboxId, NextHop, Refusal, RefusalCode};
    let dir = tempfile::tempdir().expect("tmp");
    let (backbone, net_a, net_b) = (MemoryNet::new(), MemoryNet::new(), MemoryNet::new());
    let a = relay(dir.path(), "relay-a", &backbone, &net_a).await;
    let b = relay(dir.path(), "relay-b", &backbone, &net_b).await;
    let mut alice = common::engine(dir.path(), "alice", a.address(), &net_a, None).await;
    let bob = common::engine(dir.path(), "bob", b.address(), &net_b, None).await;
    pin(&mut alice, "bob", &bob);
    alice.forward = true;
    // Bob's relay unreachable for relay A: the message waits there.
    backbone.remove(b.address());
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"hello", 3600, "x")
        .expect("send");
    alice.pass().await.expect("pass");
    assert_eq!(state(&alice, &id).0, State::Forwarding);
    // What relay A holds: its signing key (it signs its notices).
    let seed: [u8; 32] = std::fs::read(dir.path().join("relay-a/relay-signing.key"))
        .expect("key")
        .try_into()
        .expect("32 bytes");
    let relay_a_key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let sealed = alice.agent().db().sealed(&id).expect("db").expect("sealed");
    let hash = *blake3::hash(&sealed).as_bytes();
    let bob_mb = MailboxId::of(bob.agent().card().public().signing_bytes());
    let to_b = NextHop {
        addr: b.address().host_port.clone(),
        pin: b.address().pin.0,
    };
    let fake = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let refusal = |k: &ed25519_dalek::SigningKey| {
        use ed25519_dalek::Signer;
        let mut m = sealpost_proto::relay::context::REFUSAL.to_vec();
        m.extend_from_slice(&Refusal::signed_bytes(
            RefusalCode::UnknownMailbox,
            now(),
            &bob_mb,
            &hash,
        ));
        Refusal {
            code: RefusalCode::UnknownMailbox,
            at: now(),
            mailbox: bob_mb,
            payload_hash: hash,
            signature: k.sign(&m).to_bytes(),
        }
    };
    // 1: a key of its own, a binding made up. 2: the genuine binding of
    // relay A itself (its certificate key over its own key), for Bob's pin.
    let a_binding = {
        let c = common::client(&net_a, a.address()).await;
        c.key_binding(&a.address().pin.0).await.expect("binding")
    };
    let forged = [
        Ended::Refused {
            next_key: fake.verifying_key().to_bytes(),
            binding: sealpost_proto::relay::KeyBinding {
                scheme: 0x0807,
                spki: vec![0x30; 44],
                signature: vec![1; 64],
            },
            refusal: refusal(&fake),
        },
        Ended::Refused {
            next_key: relay_a_key.verifying_key().to_bytes(),
            binding: a_binding,
            refusal: refusal(&relay_a_key),
        },
    ];
    let alice_mb = MailboxId::of(alice.agent().card().public().signing_bytes());
    for ended in forged {
        let n = Notice::sign(&relay_a_key, now(), bob_mb, hash, to_b.clone(), ended).encode();
        a.store()
            .submit(
                alice_mb,
                now() + 3600,
                *blake3::hash(&n).as_bytes(),
                n,
                sealpost_store::Source::of_v4([127, 0, 0, 1]),
                now(),
            )
            .await
            .expect("stored");
    }
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.discarded, 2, "{s:?}");
    assert_eq!(state(&alice, &id).0, State::Forwarding, "not failed");
    let counts = alice.agent().db().detection_counts().expect("detections");
    assert!(
        counts.iter().any(|(c, n)| c == "forged-refusal" && *n == 2),
        "{counts:?}"
    );
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// Alice's relay does not forward (`--forward off`): it refuses her
/// `Forward`, signed, and her agent sends to Bob's relay itself in the
/// same pass (state `submitted`, not `forwarding`); Bob gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_relay_does_not_forward_sends_directly() {
    let dir = tempfile::tempdir().expect("tmp");
    let (backbone, net_a, net_b) = (MemoryNet::new(), MemoryNet::new(), MemoryNet::new());
    let a = relay_forwarding(dir.path(), "relay-a", &backbone, &net_a, false).await;
    let b = relay(dir.path(), "relay-b", &backbone, &net_b).await;
    // Alice can reach Bob's relay herself.
    net_a.add(b.door());
    let mut alice = common::engine(dir.path(), "alice", a.address(), &net_a, None).await;
    let mut bob = common::engine(dir.path(), "bob", b.address(), &net_b, None).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);
    alice.forward = true;
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"direct after all", 3600, "x")
        .expect("send");
    let s = alice.pass().await.expect("pass");
    assert_eq!((s.submitted, s.forwarded), (1, 0), "{s:?}");
    assert_eq!(state(&alice, &id).0, State::Submitted, "sent directly");
    passes_until(&mut bob, |b| inbox_holds(b, 1)).await;
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// A file through the sender's relay to two recipients on two other
/// relays (Bob on B, Carol on C): Alice uploads its blob once to her
/// relay (plus its first piece again, which queues it for the second
/// recipient) and the manifests go the same way; each recipient's relay
/// gets the blob from hers, each recipient places the file whole, the
/// receipts come back, and Alice's relay keeps no copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_goes_through_the_senders_relay_to_two_relays() {
    let dir = tempfile::tempdir().expect("tmp");
    let backbone = MemoryNet::new();
    let (net_a, net_b, net_c) = (MemoryNet::new(), MemoryNet::new(), MemoryNet::new());
    let a = relay(dir.path(), "relay-a", &backbone, &net_a).await;
    let b = relay(dir.path(), "relay-b", &backbone, &net_b).await;
    let c = relay(dir.path(), "relay-c", &backbone, &net_c).await;
    let mut alice = common::engine(dir.path(), "alice", a.address(), &net_a, None).await;
    let mut bob = common::engine(dir.path(), "bob", b.address(), &net_b, None).await;
    let mut carol = common::engine(dir.path(), "carol", c.address(), &net_c, None).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut alice, "carol", &carol);
    pin(&mut bob, "alice", &alice);
    pin(&mut carol, "alice", &alice);
    alice.forward = true;
    bob.forward = true;
    carol.forward = true;
    let size = (6 << 20) + 777;
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
    let path = dir.path().join("report.bin");
    std::fs::write(&path, &data).expect("write");
    let (id, _) = alice
        .agent_mut()
        .send_file(&["bob".into(), "carol".into()], &path, 3600)
        .expect("send");
    let s = passes_until(&mut alice, |e| {
        let m = e.agent().db().outbox(Some(&id), 1).expect("outbox");
        m[0].deliveries
            .iter()
            .all(|d| d.delivery.state == State::Forwarding)
    })
    .await;
    let blob = sealpost_proto::blob::BlobLayout::new(size as u64, 65_536)
        .expect("layout")
        .blob_len();
    assert!(
        s.upload_bytes >= blob && s.upload_bytes <= blob + (1 << 20) + 65_536,
        "uploaded once to her relay: {} of a {blob}-byte blob",
        s.upload_bytes
    );
    for (who, e) in [("bob", &mut bob), ("carol", &mut carol)] {
        passes_until(e, |e| {
            e.agent()
                .db()
                .downloads(None, 10)
                .is_ok_and(|d| d.len() == 1 && d[0].final_path.is_some())
        })
        .await;
        let got = std::fs::read(dir.path().join(who).join("downloads/report.bin")).expect("placed");
        assert!(got == data, "{who} got the file whole");
    }
    passes_until(&mut alice, |e| {
        let m = e.agent().db().outbox(Some(&id), 1).expect("outbox");
        m[0].deliveries
            .iter()
            .all(|d| d.delivery.state == State::Delivered)
    })
    .await;
    // Alice's relay let go of its copy once both relays held it: it
    // expires within ten minutes.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let store = a.store();
        let ids = store.ledger().complete_blobs().await.expect("blobs");
        assert_eq!(ids.len(), 1, "one copy for both recipients");
        let b = store
            .ledger()
            .blob(ids[0].0)
            .await
            .expect("blob")
            .expect("row");
        if b.expires_at <= now() + 600 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Alice's relay keeps the blob for good"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in [a, b, c] {
        r.stop().await.expect("stop");
    }
}

/// A hostile home relay that answers `Accepted` to every `Forward` and
/// never hands anything on: Alice's message is "at your relay" after her
/// first pass, and her first retransmission goes to Bob's relay directly
/// (which she can reach here), so Bob gets it and she gets his receipt
/// (through his relay, which forwards honestly, to hers, which stores
/// what is addressed to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_relay_that_swallows_forwards_delays_a_message_by_one_retransmission() {
    use sealpost_relay::tamper::{OnForward, Tamper};
    #[derive(Debug)]
    struct Swallow;
    impl Tamper for Swallow {
        fn forward(&self, _: &sealpost_proto::relay::MailboxId, _: &[u8; 32]) -> OnForward {
            OnForward::Drop
        }
    }
    let dir = tempfile::tempdir().expect("tmp");
    let (backbone, net_a, net_b) = (MemoryNet::new(), MemoryNet::new(), MemoryNet::new());
    let a = relay_with(dir.path(), "relay-a", &backbone, &net_a, |c| {
        c.tamper = Some(Arc::new(Swallow));
    })
    .await;
    let b = relay(dir.path(), "relay-b", &backbone, &net_b).await;
    // Alice can reach Bob's relay too.
    net_a.add(b.door());
    let mut alice = common::engine(dir.path(), "alice", a.address(), &net_a, None).await;
    let mut bob = common::engine(dir.path(), "bob", b.address(), &net_b, None).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);
    alice.forward = true;
    bob.forward = true;
    alice.timing.retransmit = Backoff {
        base: Duration::from_millis(300),
        max: Duration::from_millis(300),
    };
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"despite my relay", 3600, "x")
        .expect("send");
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.forwarded, 1, "{s:?}");
    assert_eq!(state(&alice, &id).0, State::Forwarding);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = alice.pass().await.expect("pass");
    assert_eq!((s.submitted, s.forwarded), (1, 0), "directly: {s:?}");
    passes_until(&mut bob, |b| inbox_holds(b, 1)).await;
    passes_until(&mut alice, |a| state(a, &id).0 == State::Delivered).await;
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// Where a forwarded message is, per hop: while Bob's relay is down,
/// Alice's `status` says it waits at her relay and why (her relay's last
/// error); once her relay handed it on, that it went on toward Bob's relay; then
/// delivered (the receipt). The JSON carries the same in `hop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_at_which_relay_a_forwarded_message_waits() {
    let Two {
        dir: _dir,
        backbone,
        a,
        b,
        mut alice,
        mut bob,
    } = two().await;
    alice.hops_every_ms = 0;
    let hop = |e: &Engine, id| {
        let m = e.agent().db().outbox(Some(id), 1).expect("outbox");
        let v = sealpost_agent::views::DeliveryView::of(&m[0], &m[0].deliveries[0]);
        v.hop
    };
    // Bob's relay unreachable from Alice's.
    backbone.remove(b.address());
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"where is it", 3600, "x")
        .expect("send");
    alice.pass().await.expect("pass");
    passes_until(&mut alice, |e| {
        hop(e, &id).is_some_and(|h| h.contains("could not hand it to"))
    })
    .await;
    let h = hop(&alice, &id).expect("hop");
    assert!(h.starts_with("waiting at your relay"), "{h}");
    // Back: handed on, then delivered.
    backbone.add(b.door());
    passes_until(&mut alice, |e| {
        hop(e, &id).is_some_and(|h| h.starts_with("handed on by your relay toward bob's relay"))
    })
    .await;
    passes_until(&mut bob, |b| inbox_holds(b, 1)).await;
    passes_until(&mut alice, |a| state(a, &id).0 == State::Delivered).await;
    assert_eq!(
        hop(&alice, &id),
        None,
        "a delivered message says so instead"
    );
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// Alice's relay hands her message on with an expiry of its own making,
/// in the past: Bob's relay refuses it as expired — a genuine refusal,
/// signed by Bob's relay and naming the message — and Alice's relay
/// passes it on. Alice's agent does not fail a message that has not
/// expired on that word: it records why and keeps retransmitting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_refusal_a_relay_could_induce_does_not_fail_a_live_message() {
    use sealpost_proto::notice::{Ended, Notice};
    use sealpost_proto::relay::{MailboxId, NextHop, Refusal, RefusalCode};
    let Two {
        dir,
        backbone,
        a,
        b,
        mut alice,
        bob,
    } = two().await;
    backbone.remove(b.address());
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"still alive", 3600, "x")
        .expect("send");
    alice.pass().await.expect("pass");
    assert_eq!(state(&alice, &id).0, State::Forwarding);
    let key = |relay: &str| {
        let seed: [u8; 32] = std::fs::read(dir.path().join(relay).join("relay-signing.key"))
            .expect("key")
            .try_into()
            .expect("32 bytes");
        ed25519_dalek::SigningKey::from_bytes(&seed)
    };
    let (a_key, b_key) = (key("relay-a"), key("relay-b"));
    let b_binding = {
        let net = MemoryNet::new();
        net.add(b.door());
        let c = common::client(&net, b.address()).await;
        c.key_binding(&b.address().pin.0).await.expect("binding")
    };
    let sealed = alice.agent().db().sealed(&id).expect("db").expect("sealed");
    let hash = *blake3::hash(&sealed).as_bytes();
    let bob_mb = MailboxId::of(bob.agent().card().public().signing_bytes());
    let refusal = {
        use ed25519_dalek::Signer;
        let mut m = sealpost_proto::relay::context::REFUSAL.to_vec();
        m.extend_from_slice(&Refusal::signed_bytes(
            RefusalCode::Expired,
            now(),
            &bob_mb,
            &hash,
        ));
        Refusal {
            code: RefusalCode::Expired,
            at: now(),
            mailbox: bob_mb,
            payload_hash: hash,
            signature: b_key.sign(&m).to_bytes(),
        }
    };
    let to_b = NextHop {
        addr: b.address().host_port.clone(),
        pin: b.address().pin.0,
    };
    let ended = Ended::Refused {
        next_key: b_key.verifying_key().to_bytes(),
        binding: b_binding,
        refusal,
    };
    let n = Notice::sign(&a_key, now(), bob_mb, hash, to_b, ended);
    n.verify(&a_key.verifying_key()).expect("a genuine notice");
    let n = n.encode();
    let alice_mb = MailboxId::of(alice.agent().card().public().signing_bytes());
    a.store()
        .submit(
            alice_mb,
            now() + 3600,
            *blake3::hash(&n).as_bytes(),
            n,
            sealpost_store::Source::of_v4([127, 0, 0, 1]),
            now(),
        )
        .await
        .expect("stored");
    let s = alice.pass().await.expect("pass");
    assert_eq!((s.refused, s.discarded), (0, 0), "{s:?}");
    assert_eq!(state(&alice, &id).0, State::Forwarding, "not failed");
    let m = alice.agent().db().outbox(Some(&id), 1).expect("outbox");
    let e = m[0].deliveries[0].last_error.clone().unwrap_or_default();
    assert!(e.contains("not taken"), "{e}");
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// Alice's home relay lies when it should hand her message on: first it
/// ends it at once with a notice, genuinely signed by itself, saying it
/// gave up (the message has an hour to live), then with a notice carrying
/// a refusal by Bob's relay it made up (signed with its own key, bound to
/// its own certificate). Alice's agent takes neither — the first is
/// recorded and the message goes again, the second is recorded as a
/// forged refusal — and her third attempt, handed on honestly, is
/// delivered. Without the rule for a live message, the first notice ends
/// the delivery as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_lies_about_handing_on_cannot_end_a_live_message() {
    use sealpost_relay::tamper::{OnHandOn, Tamper};
    use std::sync::atomic::{AtomicUsize, Ordering};
    #[derive(Debug, Default)]
    struct Liar(AtomicUsize);
    impl Tamper for Liar {
        fn hand_on(&self, _: &sealpost_proto::relay::MailboxId, _: &[u8; 32]) -> OnHandOn {
            match self.0.fetch_add(1, Ordering::SeqCst) {
                0 => OnHandOn::GiveUp,
                1 => OnHandOn::ForgeRefusal,
                _ => OnHandOn::Send,
            }
        }
    }
    let dir = tempfile::tempdir().expect("tmp");
    let (backbone, net_a, net_b) = (MemoryNet::new(), MemoryNet::new(), MemoryNet::new());
    let a = relay_with(dir.path(), "relay-a", &backbone, &net_a, |c| {
        c.tamper = Some(Arc::new(Liar::default()));
    })
    .await;
    let b = relay(dir.path(), "relay-b", &backbone, &net_b).await;
    let mut alice = common::engine(dir.path(), "alice", a.address(), &net_a, None).await;
    let mut bob = common::engine(dir.path(), "bob", b.address(), &net_b, None).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);
    alice.forward = true;
    bob.forward = true;
    alice.timing.retransmit = Backoff {
        base: Duration::from_millis(300),
        max: Duration::from_millis(300),
    };
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"alive for an hour", 3600, "x")
        .expect("send");
    let mut stats = PassStats::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(&alice, &id).0 != State::Delivered {
        stats.add(&alice.pass().await.expect("pass"));
        let st = state(&alice, &id);
        assert!(st.0 != State::Failed, "a lie ended the delivery: {st:?}");
        bob.pass().await.expect("bob's pass");
        assert!(Instant::now() < deadline, "not delivered: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stats.forwarded >= 3, "three hand-overs: {stats:?}");
    assert!(inbox_holds(&bob, 1));
    let found = alice.agent().db().detections(100).expect("detections");
    let classes: Vec<&str> = found.iter().map(|d| d.class.as_str()).collect();
    assert!(classes.contains(&"discarded"), "{classes:?}");
    assert!(classes.contains(&"forged-refusal"), "{classes:?}");
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// Bob's relay takes nothing forwarded by Alice's relay (its operator's
/// deny list): Alice's relay's notice carries Bob's relay's signed
/// refusal (code 6), which says nothing of the message, so her agent does
/// not fail it; its next retransmission goes to Bob's relay directly and
/// is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_takes_nothing_from_the_senders_relay_gets_it_directly() {
    let dir = tempfile::tempdir().expect("tmp");
    let (backbone, net_a, net_b) = (MemoryNet::new(), MemoryNet::new(), MemoryNet::new());
    let a = relay(dir.path(), "relay-a", &backbone, &net_a).await;
    let a_key = a.relay_key().to_bytes();
    let b = relay_with(dir.path(), "relay-b", &backbone, &net_b, |c| {
        c.peers.deny.insert(a_key);
    })
    .await;
    // Alice can reach Bob's relay too.
    net_a.add(b.door());
    let mut alice = common::engine(dir.path(), "alice", a.address(), &net_a, None).await;
    let mut bob = common::engine(dir.path(), "bob", b.address(), &net_b, None).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);
    alice.forward = true;
    // His receipt goes back through his relay (Alice's takes it).
    bob.forward = true;
    alice.timing.retransmit = Backoff {
        base: Duration::from_millis(300),
        max: Duration::from_millis(300),
    };
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"not through my relay", 3600, "x")
        .expect("send");
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.forwarded, 1, "{s:?}");
    // The refusal comes back as a notice; the delivery stays under way.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        alice.pass().await.expect("pass");
        let m = alice.agent().db().outbox(Some(&id), 1).expect("outbox");
        let d = &m[0].deliveries[0];
        assert!(d.delivery.state != State::Failed, "{:?}", d.delivery);
        if d.last_error
            .as_deref()
            .is_some_and(|e| e.contains("directly"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no notice: {:?}", d.last_error);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(&alice, &id).0 != State::Delivered {
        alice.pass().await.expect("pass");
        assert!(state(&alice, &id).0 != State::Failed);
        bob.pass().await.expect("bob's pass");
        assert!(Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(inbox_holds(&bob, 1));
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}
