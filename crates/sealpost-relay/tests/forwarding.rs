//! Relays forwarding to relays (PROTOCOL 6.8 and 6.9): real relays, each
//! on its own loopback address (127.0.0.2, 127.0.0.3), driven by the real
//! client. Alice's relay takes items for Bob's relay from Alice (its
//! mailbox owner) and hands them on, retrying while Bob's relay is down;
//! Bob's relay's refusals and items that expire come back to Alice as
//! signed notices; nobody else may forward through Alice's relay.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sealpost_proto::notice::{self, Notice};
use sealpost_proto::relay::{Forward, MailboxId, NextHop, RefusalCode, MAX_HOPS};
use sealpost_proto::retry::Backoff;
use sealpost_proto::Identity;
use sealpost_relay::client::{RelayClient, Submitted};
use sealpost_relay::{Config, Relay, RelayAddress, RunningRelay};

#[path = "common/backend.rs"]
mod backend;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A relay on `ip` (port `port`, 0 for any) over `data`, retrying
/// forwards quickly.
async fn relay_on(ip: &str, port: u16, data: &std::path::Path) -> RunningRelay {
    relay_with(ip, port, data, |_| {}).await
}

/// [`relay_on`], its configuration then changed by `tweak`.
async fn relay_with(
    ip: &str,
    port: u16,
    data: &std::path::Path,
    tweak: impl FnOnce(&mut Config),
) -> RunningRelay {
    let mut cfg = Config::new(format!("{ip}:{port}").parse().expect("addr"), data.into());
    cfg.forwarding.retry = Backoff {
        base: Duration::from_millis(200),
        max: Duration::from_millis(400),
    };
    cfg.forwarding.poll = Duration::from_millis(100);
    cfg.forwarding.timeouts.connect = Duration::from_secs(2);
    backend::on_backend(&mut cfg);
    tweak(&mut cfg);
    Relay::bind(cfg).await.expect("bind").spawn()
}

/// Alice and her relay on 127.0.0.2 (configured by `tweak` after
/// [`relay_on`]'s settings), Bob and his on 127.0.0.3, Bob's mailbox
/// registered there.
struct Two {
    dir: tempfile::TempDir,
    alice: Identity,
    bob: Identity,
    a_relay: RunningRelay,
    b_relay: RunningRelay,
    a: RelayAddress,
    b: RelayAddress,
    bob_mb: MailboxId,
}

async fn two(tweak: impl FnOnce(&mut Config)) -> Two {
    let dir = tempfile::tempdir().expect("tmp");
    let alice = Identity::generate(&mut rand_core::OsRng);
    let bob = Identity::generate(&mut rand_core::OsRng);
    let a_relay = relay_with("127.0.0.2", 0, &dir.path().join("a"), tweak).await;
    let b_relay = relay_on("127.0.0.3", 0, &dir.path().join("b")).await;
    let (a, b) = (a_relay.address().clone(), b_relay.address().clone());
    let bob_mb = owner(&b, &bob).await.register(&bob).await.expect("bob");
    Two {
        dir,
        alice,
        bob,
        a_relay,
        b_relay,
        a,
        b,
        bob_mb,
    }
}

/// The port of a relay's address (to start it again there).
fn port_of(addr: &RelayAddress) -> u16 {
    addr.host_port
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

fn next_of(addr: &RelayAddress) -> NextHop {
    NextHop {
        addr: addr.host_port.clone(),
        pin: addr.pin.0,
    }
}

fn item(next: &NextHop, mailbox: MailboxId, payload: &[u8], expires_at: u64) -> Forward {
    Forward {
        hops: 0,
        next: next.clone(),
        mailbox,
        expires_at,
        payload_hash: *blake3::hash(payload).as_bytes(),
        payload: payload.to_vec(),
    }
}

async fn owner(addr: &RelayAddress, who: &Identity) -> RelayClient {
    let c = RelayClient::connect(addr).await.expect("connect");
    c.register(who).await.expect("register");
    c
}

/// Fetches `who`'s items at `addr` until there are `n` (10 s at most).
async fn fetch_n(addr: &RelayAddress, who: &Identity, n: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = owner(addr, who).await;
        let (items, _) = c.fetch(0, 100).await.expect("fetch");
        if items.len() >= n || Instant::now() > deadline {
            assert_eq!(items.len(), n, "items at {}", addr.host_port);
            return items.into_iter().map(|i| i.payload).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn accepted(r: &Result<Submitted, sealpost_relay::client::ClientError>) -> bool {
    matches!(r, Ok(Submitted::Accepted { .. }))
}

fn refused(r: &Result<Submitted, sealpost_relay::client::ClientError>) -> Option<RefusalCode> {
    match r {
        Ok(Submitted::Refused(r)) => Some(r.code),
        _ => None,
    }
}

/// Alice hands items to her relay, which hands them to Bob's: at once
/// while Bob's relay is up, later when it was down (kept durably meanwhile,
/// counted in Alice's quota), and Bob fetches each from his relay. A
/// refusal by Bob's relay (no such mailbox) comes back to Alice as a
/// notice her relay signed, carrying Bob's relay's own signed refusal.
#[tokio::test]
async fn items_go_on_to_the_next_relay_and_refusals_come_back() {
    let Two {
        dir,
        alice,
        bob,
        a_relay,
        b_relay,
        a,
        b,
        bob_mb,
    } = two(|_| {}).await;
    let to_b = next_of(&b);
    let c = owner(&a, &alice).await;
    let r = c
        .forward_many(vec![item(&to_b, bob_mb, b"first", now() + 600)])
        .await;
    assert!(accepted(&r[0]), "{r:?}");
    assert_eq!(fetch_n(&b, &bob, 1).await, vec![b"first".to_vec()]);

    // Bob's relay down: Alice's relay keeps the item and tries again.
    let b_port = port_of(&b);
    b_relay.stop().await.expect("stop b");
    let r = c
        .forward_many(vec![item(&to_b, bob_mb, b"second", now() + 600)])
        .await;
    assert!(accepted(&r[0]), "{r:?}");
    assert_eq!(c.status().await.expect("status").1, 6, "in Alice's quota");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let q = a_relay_queue(&a_relay).await;
    assert_eq!(q.len(), 1);
    assert!(q[0].attempts >= 1, "{q:?}");
    assert!(q[0].last_error.is_some(), "{q:?}");
    let b_relay = relay_on("127.0.0.3", b_port, &dir.path().join("b")).await;
    assert_eq!(
        b_relay.address(),
        &b,
        "same address and key after the restart"
    );
    let got = fetch_n(&b, &bob, 2).await;
    assert_eq!(got[1], b"second");
    // Handed on: no longer in Alice's quota.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.status().await.expect("status").1 != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.status().await.expect("status").1, 0);

    // A mailbox Bob's relay does not have: refused there, told to Alice.
    let nobody = MailboxId::of(&[7; 32]);
    let r = c
        .forward_many(vec![item(&to_b, nobody, b"lost", now() + 600)])
        .await;
    assert!(accepted(&r[0]), "{r:?}");
    let (n, code) = refusal_notice(&a, &alice, &b).await;
    assert_eq!(code, RefusalCode::UnknownMailbox);
    assert_eq!(
        (n.mailbox, n.payload_hash, &n.next),
        (nobody, *blake3::hash(b"lost").as_bytes(), &to_b)
    );
    // Bob's relay's certificate key vouches for it, checkable with the
    // pin alone; not for any other key.
    if let notice::Ended::Refused {
        next_key, binding, ..
    } = &n.ended
    {
        assert!(!sealpost_client::tls::verify_key_binding(
            &a.pin.0, next_key, binding
        ));
        assert!(!sealpost_client::tls::verify_key_binding(
            &b.pin.0, &[7; 32], binding
        ));
    }
    b_relay.stop().await.expect("stop b");
    a_relay.stop().await.expect("stop a");
}

/// The one notice waiting for `who` at relay `a`: signed by `a`, ending an
/// item with a refusal that relay `b` signed, with `b`'s key binding
/// checkable against `b`'s pin. Returns it and that refusal's code.
async fn refusal_notice(
    a: &RelayAddress,
    who: &Identity,
    b: &RelayAddress,
) -> (Notice, RefusalCode) {
    let notices = fetch_n(a, who, 1).await;
    assert!(notice::is_notice(&notices[0]));
    let n = Notice::decode(&notices[0]).expect("notice");
    n.verify(&c_key(a).await)
        .expect("signed by the sender's relay");
    let code = match &n.ended {
        notice::Ended::Refused {
            next_key,
            binding,
            refusal,
        } => {
            let b_key = c_key(b).await;
            assert_eq!(next_key, &b_key.to_bytes(), "the next relay's key");
            assert!(refusal.verify(&b_key));
            assert!(sealpost_client::tls::verify_key_binding(
                &b.pin.0, next_key, binding
            ));
            refusal.code
        }
        other => panic!("{other:?}"),
    };
    (n, code)
}

/// The key a relay states in `HelloOk`.
async fn c_key(addr: &RelayAddress) -> ed25519_dalek::VerifyingKey {
    *RelayClient::connect(addr)
        .await
        .expect("connect")
        .relay_key()
}

async fn a_relay_queue(r: &RunningRelay) -> Vec<sealpost_store::HopQueue> {
    r.store().forward_queue().await.expect("queue")
}

/// Not an open relay: a connection that is not one of its mailbox owners
/// (a stranger, or another relay that proved its key) is refused, signed;
/// so is an item past the hop limit. An item for a mailbox on this relay
/// is stored whoever forwards it (the last hop).
#[tokio::test]
async fn only_owners_forward_and_hops_are_bounded() {
    let Two {
        dir: _dir,
        alice,
        bob,
        a_relay,
        b_relay,
        a,
        b,
        bob_mb,
    } = two(|_| {}).await;
    let alice_mb = owner(&a, &alice)
        .await
        .register(&alice)
        .await
        .expect("alice");
    let to_b = next_of(&b);
    let stranger = RelayClient::connect(&a).await.expect("connect");
    let r = stranger
        .forward_many(vec![item(&to_b, bob_mb, b"spam", now() + 600)])
        .await;
    assert_eq!(refused(&r[0]), Some(RefusalCode::NotForwarded), "{r:?}");
    let peer = RelayClient::connect(&a).await.expect("connect");
    let other_relay = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    peer.peer_auth(&other_relay).await.expect("peer auth");
    let r = peer
        .forward_many(vec![item(&to_b, bob_mb, b"relayed spam", now() + 600)])
        .await;
    assert_eq!(refused(&r[0]), Some(RefusalCode::NotForwarded), "{r:?}");
    let c = owner(&a, &alice).await;
    let mut far = item(&to_b, bob_mb, b"looping", now() + 600);
    far.hops = MAX_HOPS;
    let r = c.forward_many(vec![far]).await;
    assert_eq!(refused(&r[0]), Some(RefusalCode::NotForwarded), "{r:?}");
    // A bad hash or an expired item is refused at once, as a Submit is.
    let mut bad = item(&to_b, bob_mb, b"x", now() + 600);
    bad.payload_hash = [0; 32];
    assert_eq!(
        refused(&c.forward_many(vec![bad]).await[0]),
        Some(RefusalCode::HashMismatch)
    );
    assert_eq!(
        refused(
            &c.forward_many(vec![item(&to_b, bob_mb, b"x", now() - 1)])
                .await[0]
        ),
        Some(RefusalCode::Expired)
    );
    // For a mailbox here: stored, from anyone, like a Submit.
    let here = next_of(&a);
    let r = stranger
        .forward_many(vec![item(&here, alice_mb, b"local", now() + 600)])
        .await;
    assert!(accepted(&r[0]), "{r:?}");
    assert_eq!(fetch_n(&a, &alice, 1).await, vec![b"local".to_vec()]);
    assert!(fetch_n(&b, &bob, 0).await.is_empty());
    b_relay.stop().await.expect("stop b");
    a_relay.stop().await.expect("stop a");
}

/// An item whose next relay never answers is given up when it expires:
/// Alice's relay tells her, signed, how many attempts failed and why.
#[tokio::test]
async fn an_item_the_next_relay_never_takes_is_given_up_at_expiry() {
    let dir = tempfile::tempdir().expect("tmp");
    let alice = Identity::generate(&mut rand_core::OsRng);
    let a_relay = relay_on("127.0.0.2", 0, &dir.path().join("a")).await;
    let a = a_relay.address().clone();
    // Nothing listens there.
    let nowhere = NextHop {
        addr: "127.0.0.4:9".into(),
        pin: [9; 32],
    };
    let c = owner(&a, &alice).await;
    let r = c
        .forward_many(vec![item(&nowhere, MailboxId([1; 32]), b"void", now() + 2)])
        .await;
    assert!(accepted(&r[0]), "{r:?}");
    let notices = fetch_n(&a, &alice, 1).await;
    let n = Notice::decode(&notices[0]).expect("notice");
    n.verify(&c_key(&a).await).expect("signed");
    match n.ended {
        notice::Ended::GaveUp { attempts, error } => {
            assert!(attempts >= 1, "{attempts}");
            assert!(error.contains("127.0.0.4:9"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert!(a_relay_queue(&a_relay).await.is_empty());
    a_relay.stop().await.expect("stop a");
}

/// A next relay that takes the TCP connection and never answers holds up
/// only its own items: an item for another relay, queued while the
/// silent one's attempt hangs, is handed on at once.
#[tokio::test]
async fn a_silent_next_relay_holds_up_only_its_own_items() {
    let Two {
        dir: _dir,
        alice,
        bob,
        a_relay,
        b_relay,
        a,
        b,
        bob_mb,
    } = two(|cfg| {
        cfg.forwarding.poll = Duration::from_millis(50);
        cfg.forwarding.timeouts.connect = Duration::from_secs(8);
    })
    .await;
    // Accepts connections and holds them, saying nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.4:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            kept.push(c);
        }
    });
    let c = owner(&a, &alice).await;
    let to_silent = NextHop {
        addr: silent_addr.to_string(),
        pin: [3; 32],
    };
    let r = c
        .forward_many(vec![item(&to_silent, bob_mb, b"stuck", now() + 600)])
        .await;
    assert!(accepted(&r[0]), "{r:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let r = c
        .forward_many(vec![item(&next_of(&b), bob_mb, b"not stuck", now() + 600)])
        .await;
    assert!(accepted(&r[0]), "{r:?}");
    assert_eq!(fetch_n(&b, &bob, 1).await, vec![b"not stuck".to_vec()]);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited {:?} for the silent relay's attempt",
        started.elapsed()
    );
    held.abort();
    b_relay.stop().await.expect("stop b");
    a_relay.stop().await.expect("stop a");
}

/// Passes close together share one connection to the next relay: three
/// items queued one after another, each handed on before the next is
/// queued, reach Bob's relay over a single connection.
#[tokio::test]
async fn a_connection_to_the_next_relay_is_kept_between_passes() {
    let Two {
        dir: _dir,
        alice,
        bob: _,
        a_relay,
        b_relay,
        a,
        b,
        bob_mb,
    } = two(|_| {}).await;
    let c = owner(&a, &alice).await;
    let before = b_relay
        .metrics()
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    let store_b = b_relay.store();
    for (n, text) in [b"one".as_slice(), b"two", b"three"]
        .into_iter()
        .enumerate()
    {
        let r = c
            .forward_many(vec![item(&next_of(&b), bob_mb, text, now() + 600)])
            .await;
        assert!(accepted(&r[0]), "{r:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while store_b
            .fetch(&bob_mb, 0, 10, 1 << 20)
            .await
            .expect("fetch")
            .items
            .len()
            <= n
        {
            assert!(Instant::now() < deadline, "item {n} not handed on");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let after = b_relay
        .metrics()
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after - before, 1, "one connection for three passes");
    b_relay.stop().await.expect("stop b");
    a_relay.stop().await.expect("stop a");
}

/// Alice hands a blob to her relay in pieces (`BlobForward`), some while
/// Bob's relay is down: her relay keeps them (in her quota), streams what
/// it holds to Bob's relay once it is back, while she is still uploading,
/// and deletes its copy once Bob's relay holds the blob whole — which Bob
/// reads there, byte for byte. A blob for a mailbox Bob's relay does not
/// have comes back to Alice as a notice naming the refused piece.
#[tokio::test]
async fn a_blob_goes_on_in_pieces_and_its_refusal_comes_back() {
    use sealpost_proto::relay::{BlobId, BlobPiece};
    let Two {
        dir,
        alice,
        bob,
        a_relay,
        b_relay,
        a,
        b,
        bob_mb,
    } = two(|_| {}).await;
    let to_b = next_of(&b);
    let b_port = port_of(&b);
    let blob: Vec<u8> = (0..5 * (1 << 20) + 123)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let hash = *blake3::hash(&blob).as_bytes();
    let id = BlobId([0x42; 16]);
    let piece = |mailbox: MailboxId, offset: usize| {
        let end = (offset + (1 << 20)).min(blob.len());
        BlobPiece {
            blob_id: id,
            mailbox,
            total_len: blob.len() as u64,
            blob_hash: if end == blob.len() { hash } else { [0; 32] },
            expires_at: now() + 600,
            offset: offset as u64,
            data: blob[offset..end].to_vec(),
        }
    };
    let c = owner(&a, &alice).await;
    b_relay.stop().await.expect("stop b");
    // Three pieces while Bob's relay is down.
    for off in [0, 1 << 20, 2 << 20] {
        let p = c
            .blob_forward_send(0, to_b.clone(), piece(bob_mb, off))
            .await;
        let (stored, complete) = c.blob_put_answer(p).await.expect("answer").expect("stored");
        assert_eq!((stored, complete), ((off + (1 << 20)) as u64, false));
    }
    assert_eq!(
        c.status().await.expect("status").1,
        blob.len() as u64,
        "in Alice's quota, whole from its first piece (as any blob)"
    );
    let q = a_relay_queue(&a_relay).await;
    assert_eq!((q.len(), q[0].items, q[0].bytes), (1, 1, blob.len() as u64));
    let b_relay = relay_on("127.0.0.3", b_port, &dir.path().join("b")).await;
    // Bob's relay takes what Alice's holds before she sends the rest.
    let bob_c = owner(&b, &bob).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while bob_c.blob_status(id).await.expect("status").0 < 3 << 20 {
        assert!(Instant::now() < deadline, "not streamed on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for off in [3 << 20, 4 << 20, 5 << 20] {
        let p = c
            .blob_forward_send(0, to_b.clone(), piece(bob_mb, off))
            .await;
        c.blob_put_answer(p).await.expect("answer").expect("stored");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bob_c.blob_status(id).await.expect("status").1 {
        assert!(Instant::now() < deadline, "not complete at Bob's relay");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut got = Vec::new();
    while got.len() < blob.len() {
        let d = bob_c
            .blob_get(id, got.len() as u64, 1 << 20)
            .await
            .expect("read");
        got.extend_from_slice(&d);
    }
    assert!(got == blob, "Bob reads the blob Alice uploaded");
    // Alice's relay let go of its copy: it expires within ten minutes
    // (kept that long for another recipient of the same file).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a_relay_queue(&a_relay).await.is_empty() {
        assert!(Instant::now() < deadline, "still queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let copy_expires = |b: sealpost_proto::relay::BlobId| {
        let store = a_relay.store();
        async move {
            store
                .ledger()
                .blob(b)
                .await
                .expect("ledger")
                .map(|s| s.expires_at)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while copy_expires(id).await.is_some_and(|e| e > now() + 600) {
        assert!(Instant::now() < deadline, "the copy is kept for good");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A mailbox Bob's relay does not have: its refusal of the first piece
    // comes back, naming that piece.
    let nobody = MailboxId::of(&[7; 32]);
    let other = BlobId([0x43; 16]);
    let mut p0 = piece(nobody, 0);
    p0.blob_id = other;
    let p = c.blob_forward_send(0, to_b.clone(), p0).await;
    c.blob_put_answer(p).await.expect("answer").expect("stored");
    let notices = fetch_n(&a, &alice, 1).await;
    let n = Notice::decode(&notices[0]).expect("notice");
    n.verify(&c_key(&a).await).expect("signed by Alice's relay");
    assert_eq!((n.kind(), n.blob, n.mailbox), (3, Some((other, 0)), nobody));
    match &n.ended {
        notice::Ended::Refused { refusal, .. } => {
            assert_eq!(refusal.code, RefusalCode::UnknownMailbox);
            assert!(refusal.verify(&c_key(&b).await));
        }
        e => panic!("{e:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while copy_expires(other).await.is_some_and(|e| e > now() + 600) {
        assert!(
            Instant::now() < deadline,
            "the refused blob's copy is kept for good"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b_relay.stop().await.expect("stop b");
    a_relay.stop().await.expect("stop a");
}

/// Not an open relay for blobs either: a stranger's `BlobForward` is
/// refused (code 6, naming the piece), and nothing is queued or stored.
#[tokio::test]
async fn only_owners_forward_blobs() {
    use sealpost_proto::relay::{BlobId, BlobPiece};
    let t = two(|_| {}).await;
    let stranger = RelayClient::connect(&t.a).await.expect("connect");
    let p = stranger
        .blob_forward_send(
            0,
            next_of(&t.b),
            BlobPiece {
                blob_id: BlobId([1; 16]),
                mailbox: t.bob_mb,
                total_len: 3,
                blob_hash: *blake3::hash(b"abc").as_bytes(),
                expires_at: now() + 600,
                offset: 0,
                data: b"abc".to_vec(),
            },
        )
        .await;
    match stranger.blob_put_answer(p).await.expect("answer") {
        Err(Submitted::Refused(r)) => assert_eq!(r.code, RefusalCode::NotForwarded),
        other => panic!("{other:?}"),
    }
    assert!(a_relay_queue(&t.a_relay).await.is_empty());
    assert_eq!(
        stranger.blob_status(BlobId([1; 16])).await.expect("status"),
        (0, false)
    );
    let _ = (&t.dir, &t.alice, &t.bob);
    t.b_relay.stop().await.expect("stop b");
    t.a_relay.stop().await.expect("stop a");
}

/// A hostile owner cannot fill its relay's forward queue with blobs that
/// never come: a first piece the relay would not store (above its largest
/// blob, expired, more than the owner's quota) is refused, signed and
/// naming the piece, before anything is queued.
#[tokio::test]
async fn a_first_piece_the_relay_would_refuse_queues_nothing() {
    use sealpost_proto::relay::{BlobId, BlobPiece};
    let t = two(|cfg| {
        cfg.limits.max_blob = 1 << 20;
        cfg.limits.mailbox_quota = 4 << 20;
    })
    .await;
    let c = owner(&t.a, &t.alice).await;
    let piece = |total_len: u64, expires_at: u64| BlobPiece {
        blob_id: BlobId([5; 16]),
        mailbox: t.bob_mb,
        total_len,
        blob_hash: [0; 32],
        expires_at,
        offset: 0,
        data: vec![1; 10],
    };
    for (p, code) in [
        (piece(2 << 20, now() + 600), RefusalCode::TooLarge),
        (piece(100, now() - 1), RefusalCode::Expired),
    ] {
        let sent = c.blob_forward_send(0, next_of(&t.b), p).await;
        match c.blob_put_answer(sent).await.expect("answer") {
            Err(Submitted::Refused(r)) => assert_eq!(r.code, code),
            other => panic!("{other:?}"),
        }
    }
    // Over the owner's quota (its address's share of it, 50 %): two blobs
    // of 1 MiB fit, the next do not.
    for i in 0..4u8 {
        let mut p = piece(1 << 20, now() + 600);
        p.blob_id = BlobId([10 + i; 16]);
        let sent = c.blob_forward_send(0, next_of(&t.b), p).await;
        let answer = c.blob_put_answer(sent).await.expect("answer");
        if i < 2 {
            assert!(answer.is_ok(), "{i}: {answer:?}");
        } else {
            match answer {
                Err(Submitted::Refused(r)) => assert_eq!(r.code, RefusalCode::OverQuota),
                other => panic!("{other:?}"),
            }
        }
    }
    let q = a_relay_queue(&t.a_relay).await;
    assert_eq!(q.iter().map(|h| h.items).sum::<u64>(), 2, "{q:?}");
    let _ = (&t.dir, &t.bob);
    t.b_relay.stop().await.expect("stop b");
    t.a_relay.stop().await.expect("stop a");
}

/// A relay takes forwarded items from the relays its operator allows: a
/// relay key on its deny list, or off its allow list, gets a signed
/// refusal (code 6) naming the item, which comes back to the sender as
/// her relay's notice carrying it; a relay past its rate is told to try
/// again later; a connection that proved no relay key is a sender like
/// any (a relay takes submissions from anyone).
#[tokio::test]
async fn a_relay_takes_forwarded_items_only_from_relays_its_operator_allows() {
    let dir = tempfile::tempdir().expect("tmp");
    let (alice, bob) = (
        Identity::generate(&mut rand_core::OsRng),
        Identity::generate(&mut rand_core::OsRng),
    );
    let a_relay = relay_on("127.0.0.2", 0, &dir.path().join("a")).await;
    let a_key = a_relay.relay_key().to_bytes();
    let (listed, other) = (
        ed25519_dalek::SigningKey::from_bytes(&[8; 32]),
        ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
    );
    let b_relay = relay_with("127.0.0.3", 0, &dir.path().join("b"), |c| {
        c.peers.deny.insert(a_key);
        c.peers.allow = Some([listed.verifying_key().to_bytes()].into());
        c.peers.rate = (0.001, 3.0);
    })
    .await;
    let (a, b) = (a_relay.address().clone(), b_relay.address().clone());
    let bob_mb = owner(&b, &bob).await.register(&bob).await.expect("bob");
    let to_b = next_of(&b);
    // Allowed: three in its burst, then "later".
    let peer = RelayClient::connect(&b).await.expect("connect");
    peer.peer_auth(&listed).await.expect("peer auth");
    let items = (0..4u8)
        .map(|i| item(&to_b, bob_mb, &[b'a', i], now() + 600))
        .collect();
    let r = peer.forward_many(items).await;
    assert!(r[..3].iter().all(accepted), "{r:?}");
    assert!(
        matches!(&r[3], Err(e) if e.to_string().contains("try again later")),
        "{r:?}"
    );
    // Not on the allow list: refused, signed by Bob's relay, naming it.
    let stranger_relay = RelayClient::connect(&b).await.expect("connect");
    stranger_relay.peer_auth(&other).await.expect("peer auth");
    let it = item(&to_b, bob_mb, b"from elsewhere", now() + 600);
    let r = stranger_relay.forward_many(vec![it.clone()]).await;
    match &r[0] {
        Ok(Submitted::Refused(refusal)) => {
            assert_eq!(refusal.code, RefusalCode::NotForwarded);
            assert_eq!(
                (refusal.mailbox, refusal.payload_hash),
                (bob_mb, it.payload_hash)
            );
            assert!(refusal.verify(&c_key(&b).await));
        }
        other => panic!("{other:?}"),
    }
    // The same bytes from a connection that proved no relay key: taken.
    let anyone = RelayClient::connect(&b).await.expect("connect");
    assert!(accepted(&anyone.forward_many(vec![it]).await[0]));
    // Alice's relay is denied: her item ends with a notice carrying Bob's
    // relay's refusal.
    let c = owner(&a, &alice).await;
    let r = c
        .forward_many(vec![item(&to_b, bob_mb, b"denied", now() + 600)])
        .await;
    assert!(accepted(&r[0]), "{r:?}");
    let (_, code) = refusal_notice(&a, &alice, &b).await;
    assert_eq!(code, RefusalCode::NotForwarded);
    assert_eq!(
        fetch_n(&b, &bob, 4).await.len(),
        4,
        "three allowed, one from anyone"
    );
    b_relay.stop().await.expect("stop b");
    a_relay.stop().await.expect("stop a");
}

/// A chain of three relays: Alice's relay (127.0.0.2) hands everything it
/// forwards to its organisation's outbound gateway (127.0.0.4), where it
/// is a mailbox owner with its relay key; the gateway hands it to Bob's
/// relay (127.0.0.3). An item and a two-piece blob reach Bob; a refusal by
/// Bob's relay comes back through the gateway to Alice as her own relay's
/// notice carrying Bob's relay's signed refusal, checkable against its pin
/// alone; Alice's relay's queue is empty once the gateway took everything,
/// and `ForwardStatus` says so.
#[tokio::test]
async fn a_chain_of_three_relays_carries_items_blobs_and_refusals() {
    use sealpost_proto::relay::{BlobId, BlobPiece};
    let dir = tempfile::tempdir().expect("tmp");
    let (alice, bob) = (
        Identity::generate(&mut rand_core::OsRng),
        Identity::generate(&mut rand_core::OsRng),
    );
    let g_relay = relay_on("127.0.0.4", 0, &dir.path().join("g")).await;
    // Bob's relay takes forwarded items from the gateway only: what
    // Alice's relay handed on itself would be refused.
    let g_key = g_relay.relay_key().to_bytes();
    let b_relay = relay_with("127.0.0.3", 0, &dir.path().join("b"), |c| {
        c.peers.allow = Some([g_key].into());
    })
    .await;
    let (b, g) = (b_relay.address().clone(), g_relay.address().clone());
    let a_relay = relay_with("127.0.0.2", 0, &dir.path().join("a"), |c| {
        c.forwarding.via = Some(g.clone());
    })
    .await;
    let a = a_relay.address().clone();
    let bob_mb = owner(&b, &bob).await.register(&bob).await.expect("bob");
    let c = owner(&a, &alice).await;
    c.register(&alice).await.ok();
    let to_b = next_of(&b);
    // An item, and one for a mailbox Bob's relay does not have.
    let nobody = MailboxId::of(&[0xee; 32]);
    let r = c
        .forward_many(vec![
            item(&to_b, bob_mb, b"across three relays", now() + 600),
            item(&to_b, nobody, b"to nobody", now() + 600),
        ])
        .await;
    assert!(r.iter().all(accepted), "{r:?}");
    // A blob of two pieces.
    let blob: Vec<u8> = (0..(1 << 20) + 4321)
        .map(|i| (i * 13 % 251) as u8)
        .collect();
    let hash = *blake3::hash(&blob).as_bytes();
    let id = BlobId([0x51; 16]);
    for off in [0usize, 1 << 20] {
        let end = (off + (1 << 20)).min(blob.len());
        let p = c
            .blob_forward_send(
                0,
                to_b.clone(),
                BlobPiece {
                    blob_id: id,
                    mailbox: bob_mb,
                    total_len: blob.len() as u64,
                    blob_hash: if end == blob.len() { hash } else { [0; 32] },
                    expires_at: now() + 600,
                    offset: off as u64,
                    data: blob[off..end].to_vec(),
                },
            )
            .await;
        c.blob_put_answer(p).await.expect("answer").expect("stored");
    }
    assert_eq!(
        fetch_n(&b, &bob, 1).await,
        vec![b"across three relays".to_vec()]
    );
    let bob_c = owner(&b, &bob).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bob_c.blob_status(id).await.expect("status").1 {
        assert!(
            Instant::now() < deadline,
            "the blob did not reach Bob's relay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut got = Vec::new();
    while got.len() < blob.len() {
        got.extend_from_slice(
            &bob_c
                .blob_get(id, got.len() as u64, 1 << 20)
                .await
                .expect("read"),
        );
    }
    assert!(got == blob, "Bob reads the blob Alice uploaded");
    // The refusal, back through the gateway, as Alice's relay's notice.
    let (n, code) = refusal_notice(&a, &alice, &b).await;
    assert_eq!(code, RefusalCode::UnknownMailbox, "Bob's relay refused it");
    assert_eq!(
        (n.mailbox, n.payload_hash, &n.next),
        (nobody, *blake3::hash(b"to nobody").as_bytes(), &to_b)
    );
    // Alice's relay holds nothing to hand on; the item is not "waiting".
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a_relay_queue(&a_relay).await.is_empty() {
        assert!(Instant::now() < deadline, "still queued at Alice's relay");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let w = owner(&a, &alice)
        .await
        .forward_status(vec![(
            bob_mb,
            *blake3::hash(b"across three relays").as_bytes(),
        )])
        .await
        .expect("status");
    assert_eq!(w, vec![None]);
    a_relay.stop().await.expect("stop a");
    g_relay.stop().await.expect("stop g");
    b_relay.stop().await.expect("stop b");
}

/// One relay as two nodes on one PostgreSQL database (127.0.0.2 and
/// 127.0.0.4, one forward queue): items queued through both while Bob's
/// relay is down are handed on once each when it comes back — the nodes
/// claim the lane to Bob's relay one at a time, so neither sends what the
/// other is sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_of_one_relay_hand_each_item_on_once() {
    let test = "two_nodes_of_one_relay_hand_each_item_on_once";
    let Some(url) = sealpost_store::test_postgres::database(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (alice, bob) = (
        Identity::generate(&mut rand_core::OsRng),
        Identity::generate(&mut rand_core::OsRng),
    );
    let b_relay = relay_on("127.0.0.3", 0, &dir.path().join("b")).await;
    let b = b_relay.address().clone();
    let bob_mb = owner(&b, &bob).await.register(&bob).await.expect("bob");
    let b_port = port_of(&b);
    b_relay.stop().await.expect("stop b");

    let shared = |c: &mut Config| c.database = Some(url.clone());
    let a1 = relay_with("127.0.0.2", 0, &dir.path().join("a1"), shared).await;
    let key = dir.path().join("a1").join("relay-signing.key");
    let a2 = relay_with("127.0.0.4", 0, &dir.path().join("a2"), |c| {
        shared(c);
        c.signing_key_file = Some(key.clone());
    })
    .await;
    let to_b = next_of(&b);
    let mut sent = std::collections::HashSet::new();
    for (k, node) in [&a1, &a2].into_iter().enumerate() {
        let c = owner(node.address(), &alice).await;
        let batch: Vec<Forward> = (0..150)
            .map(|i| {
                let p = format!("node {k} item {i}").into_bytes();
                sent.insert(p.clone());
                item(&to_b, bob_mb, &p, now() + 600)
            })
            .collect();
        assert!(c.forward_many(batch).await.iter().all(accepted));
    }
    // Both nodes have tried and failed at least once; now Bob's relay is
    // back and both see every item due.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b_relay = relay_on("127.0.0.3", b_port, &dir.path().join("b")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let c = owner(&b, &bob).await;
        let mut got = Vec::new();
        loop {
            let after = got.last().map_or(0, |(s, _)| *s);
            let (items, more) = c.fetch(after, 1000).await.expect("fetch");
            got.extend(items.into_iter().map(|i| (i.seq, i.payload)));
            if !more {
                break;
            }
        }
        let queued: u64 = a_relay_queue(&a1).await.iter().map(|q| q.items).sum();
        if (queued == 0 && got.len() >= sent.len()) || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A moment more: a second copy would arrive now.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let c = owner(&b, &bob).await;
    let (more_items, _) = c
        .fetch(got.last().map_or(0, |(s, _)| *s), 1000)
        .await
        .expect("fetch");
    let received: Vec<Vec<u8>> = got
        .into_iter()
        .map(|(_, p)| p)
        .chain(more_items.into_iter().map(|i| i.payload))
        .collect();
    let distinct: std::collections::HashSet<_> = received.iter().cloned().collect();
    assert_eq!(distinct, sent, "every item reached Bob's relay");
    assert_eq!(
        received.len(),
        sent.len(),
        "{} items handed on twice",
        received.len() - sent.len()
    );
    for r in [a1, a2, b_relay] {
        r.stop().await.expect("stop");
    }
}
