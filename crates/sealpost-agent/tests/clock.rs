//! The engine on a fake clock: retransmission, backoff, expiry and the
//! recipient's freshness checks, driven by moving time instead of
//! sleeping. A relay runs in-process on the in-memory store, reached over
//! a memory net (no socket); the clocks that move are the endpoints' (the
//! relay's is the system's, and every message here is within its lifetime
//! there).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{catch_up, delivery, now_ms, pin};
use sealpost_agent::engine::{Engine, FakeClock};
use sealpost_proto::delivery::State;
use sealpost_proto::MessageId;
use sealpost_relay::RunningRelay;

/// Two people on one in-process relay, each on a fake clock set to now,
/// who have pinned each other.
struct Pair {
    _dir: tempfile::TempDir,
    relay: RunningRelay,
    alice_clock: Arc<FakeClock>,
    bob_clock: Arc<FakeClock>,
    alice: Engine,
    bob: Engine,
}

async fn pair() -> Pair {
    let dir = tempfile::tempdir().expect("tmp");
    let (relay, net) = common::relay(dir.path(), None).await;
    let addr = relay.address().clone();
    let alice_clock = Arc::new(FakeClock::new(now_ms()));
    let bob_clock = Arc::new(FakeClock::new(now_ms()));
    let mut alice = common::engine(dir.path(), "alice", &addr, &net, Some(&alice_clock)).await;
    let mut bob = common::engine(dir.path(), "bob", &addr, &net, Some(&bob_clock)).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);
    Pair {
        _dir: dir,
        relay,
        alice_clock,
        bob_clock,
        alice,
        bob,
    }
}

/// Moves `clock` to `at` (unix ms).
fn set(clock: &FakeClock, at: u64) {
    use sealpost_agent::engine::Clock;
    let now = clock.now_ms();
    assert!(at >= now, "time only moves forward");
    clock.advance(Duration::from_millis(at - now));
}

/// With no receipt, the sender submits again when the retransmission
/// timer runs out — not a millisecond before — each wait twice the last,
/// and gives up when the message expires, saying so.
#[tokio::test(flavor = "current_thread")]
async fn retransmission_backs_off_and_ends_at_expiry() {
    let Pair {
        _dir,
        relay: r,
        alice_clock,
        mut alice,
        ..
    } = pair().await;
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"are you there?", 3600, "question")
        .expect("send");
    catch_up(&alice_clock);
    let timing = alice.timing;
    // The fake clock's jitter is the middle of the range.
    let wait = |n: u32| timing.retransmit.delay(n, 0.5).as_millis() as u64;

    alice.pass().await.expect("pass");
    let mut d = delivery(&alice, &id);
    assert_eq!((d.state, d.submissions), (State::Submitted, 1));
    assert_eq!(d.next_at, d.changed_at + wait(0));
    let expires = d.expires_at;
    let mut expected_submissions = 1;
    while d.next_at < expires {
        let due = d.next_at;
        set(&alice_clock, due - 1);
        alice.pass().await.expect("pass");
        assert_eq!(
            delivery(&alice, &id).submissions,
            expected_submissions,
            "submitted before it was due"
        );
        set(&alice_clock, due);
        alice.pass().await.expect("pass");
        d = delivery(&alice, &id);
        expected_submissions += 1;
        assert_eq!(d.submissions, expected_submissions);
        assert_eq!(d.next_at, due + wait(expected_submissions - 1), "backoff");
    }
    // 1 h with a first wait of 1.5 min doubling: 0, 1.5, 4.5, 10.5, 22.5
    // and 46.5 min; the next (94.5 min) is past the expiry.
    assert_eq!(expected_submissions, 6);
    set(&alice_clock, expires);
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.expired, 1, "{s:?}");
    let d = delivery(&alice, &id);
    assert_eq!(d.state, State::Failed);
    assert_eq!(d.failure.map(|f| f.code()).as_deref(), Some("expired"));
    r.stop().await.expect("stop");
}

/// A receipt ends retransmission: once delivered, nothing goes out again
/// however long the sender waits.
#[tokio::test(flavor = "current_thread")]
async fn a_receipt_stops_retransmission() {
    let Pair {
        _dir,
        relay: r,
        alice_clock,
        mut alice,
        mut bob,
        ..
    } = pair().await;
    let id = alice
        .agent_mut()
        .send(&["bob".into()], b"hello", 3600, "hello")
        .expect("send");
    catch_up(&alice_clock);
    alice.pass().await.expect("pass");
    let s = bob.pass().await.expect("pass");
    assert_eq!(s.delivered, 1, "{s:?}");
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.confirmed, 1, "{s:?}");
    let d = delivery(&alice, &id);
    assert_eq!((d.state, d.submissions), (State::Delivered, 1));
    alice_clock.advance(Duration::from_secs(2 * 3600));
    alice.pass().await.expect("pass");
    let d = delivery(&alice, &id);
    assert_eq!((d.state, d.submissions), (State::Delivered, 1));
    r.stop().await.expect("stop");
}

/// The recipient judges freshness by its own clock: a message that has
/// expired by it, or that was made well after its now, is refused with a
/// signed rejection saying which, and the sender's outbox says so.
#[tokio::test(flavor = "current_thread")]
async fn the_recipients_clock_decides_freshness() {
    for (ahead, reason) in [
        (true, "rejected:expired"),
        (false, "rejected:from-the-future"),
    ] {
        // Bob registers on the true time, then his clock is two days off.
        let Pair {
            _dir,
            relay: r,
            alice_clock,
            bob_clock,
            mut alice,
            mut bob,
        } = pair().await;
        let id = alice
            .agent_mut()
            .send(&["bob".into()], b"hello", 3600, "hello")
            .expect("send");
        catch_up(&alice_clock);
        alice.pass().await.expect("pass");
        if ahead {
            bob_clock.advance(Duration::from_secs(2 * 86_400));
        } else {
            let behind = FakeClock::new(now_ms() - 2 * 86_400 * 1000);
            bob = bob.with_clock(Arc::new(behind));
        }
        let s = bob.pass().await.expect("pass");
        assert_eq!((s.rejected, s.delivered), (1, 0), "{reason}: {s:?}");
        if ahead {
            // Bob signs his rejection by his clock: a sender whose clock
            // is two days behind it would discard it as from the future,
            // so alice's clock moves on too (the rejection is taken
            // before her pass expires anything).
            alice_clock.advance(Duration::from_secs(2 * 86_400));
        }
        let s = alice.pass().await.expect("pass");
        assert_eq!(s.bounced, 1, "{reason}: {s:?}");
        let d = delivery(&alice, &id);
        assert_eq!(d.state, State::Failed);
        assert_eq!(d.failure.map(|f| f.code()).as_deref(), Some(reason));
        assert_eq!(
            bob.agent().db().inbox(false, 10).expect("inbox").len(),
            0,
            "nothing stale reaches the inbox"
        );
        r.stop().await.expect("stop");
    }
}

/// With a retention setting, received messages older than it are deleted
/// (oldest first), and the inbox segments no message is in any more go
/// back to the file system; what is newer stays readable.
#[tokio::test(flavor = "current_thread")]
async fn received_messages_past_retention_are_deleted_and_their_space_freed() {
    let Pair {
        _dir,
        relay: r,
        alice_clock,
        bob_clock,
        mut alice,
        mut bob,
    } = pair().await;
    // Segments of 4 KiB: each fetched batch below closes one.
    bob.spool_mut().set_segment_bytes(4096);
    let text = vec![b'x'; 3000];
    for _ in 0..2 {
        for _ in 0..5 {
            alice
                .agent_mut()
                .send(&["bob".into()], &text, 3600, "old")
                .expect("send");
            catch_up(&alice_clock);
        }
        alice.pass().await.expect("pass");
        let s = bob.pass().await.expect("pass");
        assert_eq!(s.delivered, 5, "{s:?}");
    }
    assert_eq!(bob.spool().segments().expect("segments"), vec![1, 2]);
    // Twenty minutes later, with a ten-minute retention.
    bob_clock.advance(Duration::from_secs(20 * 60));
    bob.keep_received = Some(Duration::from_secs(10 * 60));
    let new = alice
        .agent_mut()
        .send(&["bob".into()], b"new", 3600, "new")
        .expect("send");
    catch_up(&alice_clock);
    alice.pass().await.expect("pass");
    let s = bob.pass().await.expect("pass");
    assert_eq!((s.delivered, s.pruned), (1, 10), "{s:?}");
    assert!(s.segments_freed_bytes >= 30_000, "{s:?}");
    assert_eq!(bob.spool().segments().expect("segments"), vec![3]);
    let inbox = bob.agent().db().inbox(false, 100).expect("inbox");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].id, new);
    let e = &inbox[0];
    let content = bob
        .spool()
        .read(
            sealpost_agent::spool::Location {
                segment: e.segment,
                offset: e.offset,
            },
            e.content_len,
            &e.content_hash,
        )
        .expect("still readable");
    assert_eq!(content, b"new");
    // The new message's receipt is signed by bob's clock, twenty minutes
    // on: alice's moves on too.
    alice_clock.advance(Duration::from_secs(20 * 60));
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.confirmed, 1, "{s:?}");
    r.stop().await.expect("stop");
}

/// With a retention size, received content beyond it is deleted, oldest
/// message first, as messages arrive; what is newest stays readable.
#[tokio::test(flavor = "current_thread")]
async fn received_content_beyond_the_size_limit_is_deleted_oldest_first() {
    let Pair {
        _dir,
        relay: r,
        alice_clock,
        bob_clock,
        mut alice,
        mut bob,
    } = pair().await;
    bob.keep_received_bytes = Some(7_000);
    let mut ids = Vec::new();
    let mut pruned = 0;
    for k in 0..5u8 {
        let id = alice
            .agent_mut()
            .send(&["bob".into()], &[k; 3000], 3600, "sized")
            .expect("send");
        ids.push(id);
        catch_up(&alice_clock);
        alice.pass().await.expect("pass");
        bob_clock.advance(Duration::from_secs(1));
        let s = bob.pass().await.expect("pass");
        assert_eq!(s.delivered, 1, "{s:?}");
        pruned += s.pruned;
        let kept: u64 = bob
            .agent()
            .db()
            .inbox(false, 100)
            .expect("inbox")
            .iter()
            .map(|e| e.content_len)
            .sum();
        assert!(kept <= 7_000, "{kept} bytes kept after message {k}");
    }
    assert_eq!(pruned, 3);
    let mut left: Vec<MessageId> = bob
        .agent()
        .db()
        .inbox(false, 100)
        .expect("inbox")
        .iter()
        .map(|e| e.id)
        .collect();
    left.sort_by_key(|id| ids.iter().position(|i| i == id));
    assert_eq!(left, ids[3..].to_vec(), "the newest two stay");
    r.stop().await.expect("stop");
}
