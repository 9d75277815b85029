//! The delivery engine against a relay that misbehaves: tampered items,
//! garbage, replays before and after acknowledgement, forged and
//! misdirected rejections, and a stale message from a sender whose clock
//! is behind. Each must end detected, with nothing delivered twice and
//! nothing false accepted. The relay runs on the in-memory store and is
//! reached over a memory net: no socket, no relay disk.

mod common;

use common::{now, pin, state};
use rand_core::OsRng;
use sealpost_agent::engine::{self, Engine, PassStats};
use sealpost_agent::outbox::{QueuedMessage, QueuedRecipient};
use sealpost_proto::delivery::{Sent, State};
use sealpost_proto::message::{self, testing};
use sealpost_proto::relay::MailboxId;
use sealpost_proto::report::{Entries, ReceiptEntry, RejectReason, RejectionEntry, Report};
use sealpost_proto::{Identity, Kind, MessageHeader, MessageId, SealRequest};
use sealpost_relay::client::Submitted;
use sealpost_relay::memory::MemoryNet;
use sealpost_relay::RelayAddress;

async fn submit(net: &MemoryNet, addr: &RelayAddress, to: &Engine, payload: Vec<u8>) {
    let c = common::client(net, addr).await;
    let mb = MailboxId::of(to.agent().identity().public().signing_bytes());
    let r = c.submit(mb, now() + 3600, payload).await.expect("submit");
    assert!(matches!(r, Submitted::Accepted { .. }));
}

fn inbox_len(e: &Engine) -> usize {
    e.agent().db().inbox(false, 1000).expect("inbox").len()
}

/// A relay on the memory net, and alice and bob on it, each with the
/// other pinned as a contact.
struct Pair {
    r: sealpost_relay::RunningRelay,
    net: std::sync::Arc<MemoryNet>,
    addr: RelayAddress,
    alice: Engine,
    bob: Engine,
}

async fn alice_and_bob(dir: &std::path::Path) -> Pair {
    let (r, net) = common::relay(dir, None).await;
    let addr = r.address().clone();
    let mut alice = common::engine(dir, "alice", &addr, &net, None).await;
    let mut bob = common::engine(dir, "bob", &addr, &net, None).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);
    Pair {
        r,
        net,
        addr,
        alice,
        bob,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_hostile_relay_is_caught_at_the_endpoints() {
    let dir = tempfile::tempdir().expect("tmp");
    let Pair {
        r,
        net,
        addr,
        mut alice,
        mut bob,
    } = alice_and_bob(dir.path()).await;
    let mallory = Identity::generate(&mut OsRng);

    // m1, plus what the relay makes of it: a bit-flipped copy, garbage,
    // and a duplicate.
    let m1 = alice
        .agent_mut()
        .send(&["bob".into()], b"the real thing", 3600, "m1")
        .expect("send");
    alice.pass().await.expect("pass");
    let sealed = alice.agent().db().sealed(&m1).expect("db").expect("sealed");
    let mut flipped = sealed.clone();
    let n = flipped.len();
    flipped[n - 40] ^= 1;
    submit(&net, &addr, &bob, flipped).await;
    submit(&net, &addr, &bob, vec![0x42; 500]).await;
    submit(&net, &addr, &bob, sealed.clone()).await;
    let s = bob.pass().await.expect("pass");
    assert_eq!(
        (s.fetched, s.delivered, s.duplicates, s.discarded),
        (4, 1, 1, 2),
        "{s:?}"
    );
    assert_eq!(s.reports_sent, 1, "one receipt covers the message");
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.confirmed, 1);
    assert_eq!(state(&alice, &m1).0, State::Delivered);

    // The relay replays m1 after bob acknowledged it: not delivered again,
    // its receipt is sent again, and alice's state does not move.
    submit(&net, &addr, &bob, sealed).await;
    let s = bob.pass().await.expect("pass");
    assert_eq!((s.delivered, s.duplicates, s.reports_sent), (0, 1, 1));
    assert_eq!(inbox_len(&bob), 1);
    let s = alice.pass().await.expect("pass");
    assert_eq!((s.confirmed, s.forged_reports), (0, 0));

    // m2 is in flight when forged rejections arrive.
    let m2 = alice
        .agent_mut()
        .send(&["bob".into()], b"second", 3600, "m2")
        .expect("send");
    alice.pass().await.expect("pass");
    let rejection = |signer: &Identity, id: MessageId| {
        Report::sign(
            signer,
            alice.agent().identity().public(),
            now(),
            Entries::Rejection(vec![RejectionEntry {
                id,
                reason: RejectReason::NotAContact,
            }]),
        )
        .expect("report")
    };
    let header = |sender: &Identity, kind: Kind| MessageHeader {
        kind,
        id: MessageId::random(&mut OsRng),
        created_at: now(),
        expires_at: now() + 3600,
        in_reply_to: None,
        sender: *sender.public(),
        recipients: vec![alice.agent().identity().public().into()],
        reply_relay: None,
    };
    let to_alice = [*alice.agent().identity().public()];
    // (a) Mallory claims to be bob: the header names bob, mallory signs.
    let claim = header(bob.agent().identity(), Kind::Rejection);
    let forged = testing::seal_plaintext(
        &to_alice,
        &testing::signed_plaintext(&mallory, &claim, rejection(&mallory, m2).as_bytes()),
    );
    // (b) Mallory signs as himself: not a contact of alice.
    let own = header(&mallory, Kind::Rejection);
    let stranger = testing::seal_plaintext(
        &to_alice,
        &testing::signed_plaintext(&mallory, &own, rejection(&mallory, m2).as_bytes()),
    );
    // (c) Bob's genuine envelope around a report mallory signed.
    let wrapped = header(bob.agent().identity(), Kind::Rejection);
    let inner = testing::seal_plaintext(
        &to_alice,
        &testing::signed_plaintext(
            bob.agent().identity(),
            &wrapped,
            rejection(&mallory, m2).as_bytes(),
        ),
    );
    // (d) A genuine rejection by bob of a message alice never sent him.
    let other = header(bob.agent().identity(), Kind::Rejection);
    let unrelated = testing::seal_plaintext(
        &to_alice,
        &testing::signed_plaintext(
            bob.agent().identity(),
            &other,
            rejection(bob.agent().identity(), MessageId([9; 16])).as_bytes(),
        ),
    );
    // (e) A receipt bob really signed for m2, naming other content than
    // alice sent: not delivered, and recorded as caught.
    let wrong = header(bob.agent().identity(), Kind::Receipt);
    let receipt = Report::sign(
        bob.agent().identity(),
        alice.agent().identity().public(),
        now(),
        Entries::Receipt(vec![ReceiptEntry {
            id: m2,
            content_hash: [7; 32],
            content_len: 6,
            stored_at: now(),
        }]),
    )
    .expect("report");
    let mismatched = testing::seal_plaintext(
        &to_alice,
        &testing::signed_plaintext(bob.agent().identity(), &wrong, receipt.as_bytes()),
    );
    for p in [forged, stranger, inner, unrelated] {
        submit(&net, &addr, &alice, p).await;
    }
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.bounced, 0, "{s:?}");
    assert_eq!(s.discarded + s.forged_reports, 4, "{s:?}");
    assert_eq!(state(&alice, &m2).0, State::Submitted);
    submit(&net, &addr, &alice, mismatched).await;
    let s = alice.pass().await.expect("pass");
    assert_eq!((s.confirmed, s.detections), (0, 1), "{s:?}");
    assert_eq!(state(&alice, &m2).0, State::Submitted);
    let caught = alice.agent().db().detections(10).expect("detections");
    assert!(
        caught.iter().any(|d| d.class == "receipt-mismatch"),
        "{caught:?}"
    );
    bob.pass().await.expect("pass");
    alice.pass().await.expect("pass");
    assert_eq!(state(&alice, &m2).0, State::Delivered);

    // A sender whose clock is two days behind: bob refuses the stale
    // message with a signed rejection, and alice's outbox says why.
    let old = now() - 2 * 86_400;
    let id = MessageId::random(&mut OsRng);
    let bob_pub = [*bob.agent().identity().public()];
    let home_pin = engine::pin_of(&addr);
    let mut stale = std::io::Cursor::new(Vec::new());
    let summary = message::seal_stream(
        alice.agent().identity(),
        &SealRequest {
            kind: Kind::Message,
            id,
            created_at: old,
            expires_at: old + 3600,
            in_reply_to: None,
            recipients: &bob_pub,
            reply_relay: Some(&home_pin),
            pad_for_len: None,
        },
        &b"from the past"[..],
        &mut stale,
    )
    .expect("seal");
    let queued_at = now() * 1000;
    alice
        .agent_mut()
        .db_mut()
        .queue(
            &QueuedMessage {
                id,
                kind: "message",
                created_ms: queued_at,
                expires_ms: queued_at + 3_600_000,
                sent: Sent {
                    content_hash: *summary.content_hash.as_bytes(),
                    content_len: summary.content_len,
                },
                summary: "stale",
                sealed: stale.get_ref(),
            },
            &[QueuedRecipient {
                name: "bob".into(),
                signing: *bob.agent().identity().public().signing_bytes(),
                relay: addr.to_string(),
            }],
        )
        .expect("queue");
    alice.pass().await.expect("pass");
    let s = bob.pass().await.expect("pass");
    assert_eq!(s.rejected, 1, "{s:?}");
    let s: PassStats = alice.pass().await.expect("pass");
    assert_eq!(s.bounced, 1, "{s:?}");
    assert_eq!(
        state(&alice, &id),
        (State::Failed, Some("rejected:expired".into()))
    );
    assert_eq!(inbox_len(&bob), 2);
    r.stop().await.expect("stop");
}

/// Once messages are delivered, the sender no longer needs their sealed
/// copies, and the space they took in its database goes back to the file
/// system (a step per pass), not just to SQLite's free list — for small
/// messages too, whose copies sit beside the outbox rows that stay.
#[tokio::test(flavor = "current_thread")]
async fn the_space_of_delivered_messages_is_given_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let Pair {
        r,
        mut alice,
        mut bob,
        ..
    } = alice_and_bob(dir.path()).await;
    let text: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
    let n = 4000;
    for _ in 0..n {
        alice
            .agent_mut()
            .send(&["bob".into()], &text, 3600, "bulk")
            .expect("send");
    }
    let (queued, _) = alice.agent().db().space().expect("space");
    assert!(queued > 8 << 20, "{queued}");
    alice.pass().await.expect("pass");
    let mut delivered = 0;
    for _ in 0..4 {
        delivered += bob.pass().await.expect("pass").delivered;
    }
    assert_eq!(delivered, n, "delivered");
    let mut confirmed = 0;
    for _ in 0..8 {
        confirmed += alice.pass().await.expect("pass").confirmed;
    }
    assert_eq!(confirmed, n);
    let (size, free) = alice.agent().db().space().expect("space");
    assert!(
        size * 3 < queued,
        "{size} bytes ({free} free) after delivery, {queued} queued"
    );
    r.stop().await.expect("stop");
}

/// A burst left many free pages while much is still in use: an idle agent
/// gives them back a short step at a time while it waits (every 100 ms,
/// without a pass or a round trip to the relay), not one step per idle
/// pass — passes 30 s apart, which took an hour to give back what a
/// 130,000-message backlog left. Its last pass was a busy one (it
/// submitted a message), as after a burst.
#[tokio::test(flavor = "current_thread")]
async fn an_idle_agent_gives_space_back_in_steps_while_it_waits() {
    let dir = tempfile::tempdir().expect("tmp");
    let (r, net) = common::relay(dir.path(), None).await;
    let addr = r.address().clone();
    let mut alice = common::engine(dir.path(), "alice", &addr, &net, None).await;
    let bob = common::engine(dir.path(), "bob", &addr, &net, None).await;
    pin(&mut alice, "bob", &bob);
    alice
        .agent_mut()
        .send(&["bob".into()], b"the last of a burst", 3600, "last")
        .expect("send");
    let path = dir.path().join("alice").join("agent.db");
    let side = rusqlite::Connection::open(&path).expect("open");
    side.busy_timeout(std::time::Duration::from_secs(10))
        .expect("busy");
    side.execute_batch("CREATE TABLE filler (tag INTEGER, b BLOB)")
        .expect("table");
    // About 19 MiB stay in use, spread among as much freed.
    for _ in 0..12 {
        for tag in [1, 2] {
            side.execute(
                "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 400) \
                 INSERT INTO filler SELECT ?1, randomblob(3000) FROM k",
                [tag],
            )
            .expect("fill");
        }
    }
    side.execute("DELETE FROM filler WHERE tag = 2", [])
        .expect("delete");
    let free = |c: &rusqlite::Connection| -> i64 {
        c.pragma_query_value(None, "freelist_count", |r| r.get(0))
            .expect("free")
    };
    assert!(free(&side) > 4500, "{}", free(&side));
    drop(side);
    let watched = path.clone();
    let given_back = async move {
        let c = rusqlite::Connection::open(&watched).expect("watch");
        while free(&c) > 256 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let total = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        alice.run(None, given_back, |_| Ok(false)),
    )
    .await
    .expect("the space given back within 15 s (idle passes are 30 s apart)")
    .expect("run");
    assert_eq!(total.submitted, 1, "a busy pass");
    let side = rusqlite::Connection::open(&path).expect("open");
    let rows: i64 = side
        .query_row("SELECT count(*) FROM filler", [], |r| r.get(0))
        .expect("rows");
    assert_eq!(rows, 4800, "what is in use stays");
    let len = std::fs::metadata(&path).expect("len").len();
    assert!(len < 24 << 20, "the file shrank: {len}");
    r.stop().await.expect("stop");
}

/// Commits recorded in a SQLite write-ahead log: frames whose "database
/// size after commit" field is set, among the frames that belong to the
/// log's current generation (their salts match its header's).
fn wal_commits(wal: &std::path::Path) -> usize {
    let b = std::fs::read(wal).unwrap_or_default();
    if b.len() < 32 {
        return 0;
    }
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let page = be(8) as usize;
    let salts = (be(16), be(20));
    let mut commits = 0;
    let mut at = 32;
    while at + 24 + page <= b.len() && (be(at + 8), be(at + 12)) == salts {
        if be(at + 4) != 0 {
            commits += 1;
        }
        at += 24 + page;
    }
    commits
}

/// A receipt completes the sender's delivery and is remembered as acted
/// on (the replay cache) in one commit, so one fsync on the way to the
/// `send --wait` that waits for it (it was two: the delivery, then the
/// replay entry).
#[tokio::test(flavor = "current_thread")]
async fn a_receipt_is_recorded_in_one_commit() {
    let dir = tempfile::tempdir().expect("tmp");
    let Pair {
        r,
        mut alice,
        mut bob,
        ..
    } = alice_and_bob(dir.path()).await;
    let m = alice
        .agent_mut()
        .send(&["bob".into()], b"one commit", 3600, "m")
        .expect("send");
    alice.pass().await.expect("pass");
    let s = bob.pass().await.expect("pass");
    assert_eq!((s.delivered, s.reports_sent), (1, 1), "{s:?}");
    // Alice's log emptied, so what her next pass commits is all in it.
    let db = dir.path().join("alice").join("agent.db");
    let c = rusqlite::Connection::open(&db).expect("open");
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(c);
    let wal = dir.path().join("alice").join("agent.db-wal");
    assert_eq!(wal_commits(&wal), 0);
    let replay = alice.agent().db().replay_len().expect("replay");
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.confirmed, 1, "{s:?}");
    assert_eq!(state(&alice, &m).0, State::Delivered);
    assert_eq!(
        alice.agent().db().replay_len().expect("replay"),
        replay + 1,
        "the receipt's message is remembered"
    );
    assert_eq!(
        wal_commits(&wal),
        1,
        "commits in the pass that took the receipt"
    );
    r.stop().await.expect("stop");
}

/// Each sender chooses its own message ids, and every recipient of a
/// message learns its id: a contact who is a co-recipient (mallory) can
/// send bob a message of its own under alice's id before alice's arrives,
/// or a control message under it (which bob remembers in its replay
/// cache). Neither may cost alice her delivery: bob keys what it records
/// by sender and id, stores both messages and receipts both.
#[tokio::test(flavor = "current_thread")]
async fn a_contact_cannot_take_another_senders_message_id() {
    let dir = tempfile::tempdir().expect("tmp");
    let Pair {
        r,
        net,
        addr,
        mut alice,
        mut bob,
    } = alice_and_bob(dir.path()).await;
    let mut mallory = common::engine(dir.path(), "mallory", &addr, &net, None).await;
    pin(&mut mallory, "bob", &bob);
    pin(&mut bob, "mallory", &mallory);

    // Alice queues two messages; mallory learns their ids (as a
    // co-recipient would) and is at the relay first.
    let m1 = alice
        .agent_mut()
        .send(&["bob".into()], b"alice's first", 3600, "m1")
        .expect("send");
    let m2 = alice
        .agent_mut()
        .send(&["bob".into()], b"alice's second", 3600, "m2")
        .expect("send");
    let to_bob = [*bob.agent().identity().public()];
    let home_pin = engine::pin_of(&addr);
    let mallory_seals = |kind: Kind, id: MessageId, content: &[u8]| {
        let mut out = std::io::Cursor::new(Vec::new());
        message::seal_stream(
            mallory.agent().identity(),
            &SealRequest {
                kind,
                id,
                created_at: now(),
                expires_at: now() + 3600,
                in_reply_to: None,
                recipients: &to_bob,
                reply_relay: Some(&home_pin),
                pad_for_len: None,
            },
            content,
            &mut out,
        )
        .expect("seal");
        out.into_inner()
    };
    // Her own message under m1, and a "receipt" (not a report at all)
    // under m2, which bob acts on once and remembers.
    let taken = mallory_seals(Kind::Message, m1, b"mallory's, under alice's id");
    let control = mallory_seals(Kind::Receipt, m2, b"not a report");
    submit(&net, &addr, &bob, taken.clone()).await;
    submit(&net, &addr, &bob, control).await;
    alice.pass().await.expect("pass");
    let sealed = alice.agent().db().sealed(&m1).expect("db").expect("sealed");

    let s = bob.pass().await.expect("pass");
    assert_eq!((s.fetched, s.delivered), (4, 3), "{s:?}");
    assert_eq!((s.duplicates, s.discarded, s.rejected), (0, 0, 0), "{s:?}");
    assert_eq!(s.forged_reports, 1, "{s:?}");
    assert_eq!(inbox_len(&bob), 3);
    let key = |who: &Engine, id| {
        sealpost_agent::outbox::ReceivedId::new(
            *who.agent().identity().public().signing_bytes(),
            id,
        )
    };
    let db = bob.agent().db();
    let alices = db
        .inbox_entry(&key(&alice, m1))
        .expect("db")
        .expect("alice's m1");
    let malls = db
        .inbox_entry(&key(&mallory, m1))
        .expect("db")
        .expect("mallory's m1");
    assert_ne!(alices.content_hash, malls.content_hash);
    assert!(db.inbox_entry(&key(&alice, m2)).expect("db").is_some());
    assert!(db.inbox_entry(&key(&mallory, m2)).expect("db").is_none());

    // Alice holds receipts for both: bob stored what she sent (the
    // receipt names her content's hash).
    let s = alice.pass().await.expect("pass");
    assert_eq!((s.confirmed, s.forged_reports), (2, 0), "{s:?}");
    assert_eq!(state(&alice, &m1).0, State::Delivered);
    assert_eq!(state(&alice, &m2).0, State::Delivered);

    // Copies are still duplicates, each of its own sender's message: not
    // delivered twice, each answered with its receipt again.
    submit(&net, &addr, &bob, sealed).await;
    submit(&net, &addr, &bob, taken).await;
    let s = bob.pass().await.expect("pass");
    assert_eq!((s.delivered, s.duplicates), (0, 2), "{s:?}");
    assert_eq!(inbox_len(&bob), 3);
    r.stop().await.expect("stop");
}
