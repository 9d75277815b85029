//! The engine over a memory net: relays on the in-memory store reached
//! through streams in memory (`sealpost_relay::memory::MemoryNet`), each
//! endpoint on a fake clock. No socket is opened and no relay writes to
//! disk; everything above the stream — TLS with the pin, framing, the
//! relay's request handling, the engine — is the production code. Faults
//! come from the net (cuts after so many bytes) and from the relay's
//! tamper hooks.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{catch_up, now_ms, pin, state};
use sealpost_agent::engine::{Engine, FakeClock, PassStats};
use sealpost_agent::outbox::DownloadState;
use sealpost_proto::delivery::State;
use sealpost_proto::relay::{BlobId, MailboxId};
use sealpost_relay::memory::MemoryNet;
use sealpost_relay::tamper::{ForgedRefusal, Tamper};
use sealpost_relay::RunningRelay;

struct World {
    dir: tempfile::TempDir,
    net: Arc<MemoryNet>,
    relay: RunningRelay,
    clock: Arc<FakeClock>,
    alice: Engine,
    bob: Engine,
}

/// Alice and Bob on one relay in memory, one fake clock (set to now), who
/// have pinned each other; the net cuts every connection after `cut`
/// bytes, if given.
async fn world(tamper: Option<Arc<dyn Tamper>>, cut: Option<u64>) -> World {
    let dir = tempfile::tempdir().expect("tmp");
    let (relay, net) = common::relay(dir.path(), tamper).await;
    net.cut_after(cut);
    let addr = relay.address().clone();
    let clock = Arc::new(FakeClock::new(now_ms()));
    let mut alice = common::engine(dir.path(), "alice", &addr, &net, Some(&clock)).await;
    let mut bob = common::engine(dir.path(), "bob", &addr, &net, Some(&clock)).await;
    pin(&mut alice, "bob", &bob);
    pin(&mut bob, "alice", &alice);
    World {
        dir,
        net,
        relay,
        clock,
        alice,
        bob,
    }
}

fn file(dir: &std::path::Path, name: &str, len: usize, seed: u8) -> (std::path::PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, &data).expect("write");
    (path, data)
}

/// Passes of `e` (the clock moving on a minute between them, so that
/// whatever waits for a retry is due) until `done` says so; their stats
/// summed, and how many passes it took.
async fn passes_until(
    e: &mut Engine,
    clock: &FakeClock,
    max: usize,
    done: impl Fn(&Engine, &PassStats) -> bool,
) -> (PassStats, usize) {
    let mut all = PassStats::default();
    for n in 1..=max {
        let s = e.pass().await.expect("pass");
        all.add(&s);
        if done(e, &s) {
            return (all, n);
        }
        clock.advance(Duration::from_secs(60));
    }
    panic!("not done after {max} passes: {all:?}");
}

/// A file crosses a net that cuts every connection after 1.2 MB: the
/// upload and then the download each resume where the relay's stored
/// length (or the part file) says, over as many connections as it takes;
/// the upload sends again only what was in flight at each cut, the
/// download fetches each byte once. The file arrives whole and the sender
/// holds the receipt.
#[tokio::test(flavor = "current_thread")]
async fn a_file_crosses_a_net_that_cuts_every_connection() {
    let World {
        dir,
        net,
        relay,
        clock,
        mut alice,
        mut bob,
    } = world(None, Some(1_200_000)).await;
    let size = 3 << 20;
    let (path, data) = file(dir.path(), "doc.bin", size, 3);
    let (id, _) = alice
        .agent_mut()
        .send_file(&["bob".into()], &path, 86_400)
        .expect("send");
    catch_up(&clock);
    let (up, _) = passes_until(&mut alice, &clock, 20, |e, _| {
        state(e, &id).0 == State::Submitted
    })
    .await;
    let (made, cut) = net.counts();
    assert!(
        cut >= 2,
        "{made} connections, {cut} cut: the cuts did not bite"
    );
    // 3 MiB sealed: 16 bytes per 64 KiB chunk on top. What was in flight
    // at a cut (the pieces sent ahead of their answers: here the rest of
    // the file, measured 6.5 MB in all for two cuts) is sent again from
    // the stored length, not from the start.
    let blob_len = (size + size / 65_536 * 16) as u64;
    assert!(up.upload_bytes >= blob_len, "{up:?}");
    assert!(
        up.upload_bytes < blob_len + cut * (4 << 20),
        "started over: {} for {blob_len}",
        up.upload_bytes
    );
    let (down, passes) = passes_until(&mut bob, &clock, 20, |_, s| s.files_received == 1).await;
    let (made2, cut2) = net.counts();
    assert!(
        cut2 - cut >= 2,
        "{} connections, {} cut: the cuts did not bite the download ({passes} passes)",
        made2 - made,
        cut2 - cut
    );
    // A download asks for ranges one after the other: after a cut it
    // goes on from what its part file holds, and fetches each byte once.
    assert_eq!(down.download_bytes, blob_len, "{down:?}");
    let got = std::fs::read(dir.path().join("bob/downloads/doc.bin")).expect("received");
    assert!(got == data, "the file arrived whole");
    net.cut_after(None);
    let (s, _) = passes_until(&mut alice, &clock, 5, |_, s| s.confirmed == 1).await;
    assert_eq!(s.confirmed, 1);
    assert_eq!(state(&alice, &id).0, State::Delivered);
    relay.stop().await.expect("stop");
}

/// A relay that damages two chunks of a file on their way out (once
/// each): the recipient finds exactly those, asks the sender for them in
/// a signed message, the sender uploads those two chunks and nothing
/// else, and the file arrives whole.
#[tokio::test(flavor = "current_thread")]
async fn damaged_chunks_are_repaired_end_to_end() {
    let damage = Arc::new(DamageChunks::new([5, 40], 100));
    let World {
        dir,
        relay,
        clock,
        mut alice,
        mut bob,
        ..
    } = world(Some(damage.clone()), None).await;
    let (path, data) = file(dir.path(), "doc.bin", 3 << 20, 7);
    let (id, _) = alice
        .agent_mut()
        .send_file(&["bob".into()], &path, 86_400)
        .expect("send");
    catch_up(&clock);
    alice.pass().await.expect("pass");
    assert_eq!(state(&alice, &id).0, State::Submitted);
    let s = bob.pass().await.expect("pass");
    assert_eq!(s.files_received, 0, "{s:?}");
    assert!(damage.done.iter().all(|d| d.load(Ordering::SeqCst)));
    let downloads = bob.agent().db().downloads(None, 10).expect("downloads");
    assert_eq!(downloads.len(), 1);
    assert_eq!(downloads[0].state, DownloadState::Repairing);
    assert_eq!(downloads[0].bad, vec![5, 40]);
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.upload_bytes, 2 * 65_552, "{s:?}");
    let s = bob.pass().await.expect("pass");
    assert_eq!(s.files_received, 1, "{s:?}");
    assert_eq!(s.download_bytes, 2 * 65_552, "{s:?}");
    let got = std::fs::read(dir.path().join("bob/downloads/doc.bin")).expect("received");
    assert!(got == data, "the file arrived whole");
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.confirmed, 1, "{s:?}");
    assert_eq!(state(&alice, &id).0, State::Delivered);
    relay.stop().await.expect("stop");
}

/// A file sent with padding (`send --pad`): the relay holds a blob of the
/// Padmé bucket's length, not the file's; a chunk damaged in its padding
/// and one in its data are repaired like any; the file placed is exactly
/// the file (no padding), and the receipt names it.
#[tokio::test(flavor = "current_thread")]
async fn a_padded_file_shows_only_its_bucket_and_arrives_exact() {
    let damage = Arc::new(DamageChunks::new([10, 48], 5_000));
    let World {
        dir,
        relay,
        clock,
        mut alice,
        mut bob,
        ..
    } = world(Some(damage.clone()), None).await;
    // 3 MiB + 1000 bytes: Padmé keeps the top 5 bits of its 22, so it
    // rounds up to 49 × 64 KiB; chunk 48 holds the last 1000 bytes of the
    // file and 64,536 of padding.
    let size = (3 << 20) + 1000;
    let padded = 49 * 65_536u64;
    assert_eq!(sealpost_proto::message::padme(size as u64), padded);
    let (path, data) = file(dir.path(), "doc.bin", size, 9);
    alice.agent_mut().set_file_padding(true);
    let (id, _) = alice
        .agent_mut()
        .send_file(&["bob".into()], &path, 86_400)
        .expect("send");
    catch_up(&clock);
    let s = alice.pass().await.expect("pass");
    let blob_len = padded + 49 * 16;
    assert_eq!(s.upload_bytes, blob_len, "{s:?}");
    assert_eq!(state(&alice, &id).0, State::Submitted);
    let s = bob.pass().await.expect("pass");
    assert_eq!(s.download_bytes, blob_len, "{s:?}");
    assert_eq!(s.files_received, 0, "{s:?}");
    let downloads = bob.agent().db().downloads(None, 10).expect("downloads");
    assert_eq!(downloads[0].bad, vec![10, 48]);
    assert_eq!(
        (downloads[0].size, downloads[0].padded_size),
        (size as u64, padded)
    );
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.upload_bytes, 2 * 65_552, "{s:?}");
    let s = bob.pass().await.expect("pass");
    assert_eq!(s.files_received, 1, "{s:?}");
    let got = std::fs::read(dir.path().join("bob/downloads/doc.bin")).expect("received");
    assert_eq!(got.len(), size, "the padding is not written");
    assert!(got == data, "the file arrived whole");
    let s = alice.pass().await.expect("pass");
    assert_eq!(s.confirmed, 1, "{s:?}");
    assert_eq!(state(&alice, &id).0, State::Delivered);
    relay.stop().await.expect("stop");
}

/// Flips a byte in each listed chunk of every blob, the first time that
/// chunk is read.
#[derive(Debug)]
struct DamageChunks {
    chunks: [u64; 2],
    /// The byte of each chunk flipped.
    within: u64,
    done: [AtomicBool; 2],
}

impl DamageChunks {
    /// Flips byte `within` of each of `chunks`, once.
    fn new(chunks: [u64; 2], within: u64) -> Self {
        Self {
            chunks,
            within,
            done: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }
}

impl Tamper for DamageChunks {
    fn blob_data(&self, _: &MailboxId, _: &BlobId, offset: u64, data: &mut Vec<u8>) {
        for (chunk, done) in self.chunks.iter().zip(&self.done) {
            let at = chunk * 65_552 + self.within;
            if at >= offset && at < offset + data.len() as u64 && !done.swap(true, Ordering::SeqCst)
            {
                data[(at - offset) as usize] ^= 0x20;
            }
        }
    }
}

/// Someone Bob has not pinned writes to him: the message never reaches
/// his inbox, and the stranger gets a signed rejection saying why, which
/// its outbox records.
#[tokio::test(flavor = "current_thread")]
async fn a_stranger_gets_a_signed_rejection() {
    let World {
        dir,
        net,
        relay,
        clock,
        mut bob,
        ..
    } = world(None, None).await;
    let addr = relay.address().clone();
    let mut carol = common::engine(dir.path(), "carol", &addr, &net, Some(&clock)).await;
    pin(&mut carol, "bob", &bob);
    let id = carol
        .agent_mut()
        .send(&["bob".into()], b"hello, you do not know me", 3600, "hi")
        .expect("send");
    catch_up(&clock);
    carol.pass().await.expect("pass");
    let s = bob.pass().await.expect("pass");
    assert_eq!((s.rejected, s.delivered), (1, 0), "{s:?}");
    assert_eq!(bob.agent().db().inbox(false, 10).expect("inbox").len(), 0);
    let s = carol.pass().await.expect("pass");
    assert_eq!(s.bounced, 1, "{s:?}");
    assert_eq!(
        state(&carol, &id),
        (State::Failed, Some("rejected:not-a-contact".into()))
    );
    relay.stop().await.expect("stop");
}

/// One file to two recipients on the same relay (one sealed manifest, one
/// blob id): both get it whole and both receipts come back.
#[tokio::test(flavor = "current_thread")]
async fn a_file_to_two_recipients_on_one_relay_reaches_both() {
    let World {
        dir,
        net,
        relay,
        clock,
        mut alice,
        mut bob,
    } = world(None, None).await;
    let mut carol = common::engine(dir.path(), "carol", relay.address(), &net, Some(&clock)).await;
    pin(&mut alice, "carol", &carol);
    pin(&mut carol, "alice", &alice);
    let (path, data) = file(dir.path(), "shared.bin", (2 << 20) + 5, 3);
    let (id, _) = alice
        .agent_mut()
        .send_file(&["bob".into(), "carol".into()], &path, 86_400)
        .expect("send");
    catch_up(&clock);
    alice.pass().await.expect("pass");
    for (who, e) in [("bob", &mut bob), ("carol", &mut carol)] {
        let (s, _) = passes_until(e, &clock, 10, |_, s| s.files_received == 1).await;
        assert_eq!(s.files_received, 1, "{who}: {s:?}");
        let got = std::fs::read(dir.path().join(who).join("downloads/shared.bin")).expect("placed");
        assert!(got == data, "{who} got the file whole");
    }
    passes_until(&mut alice, &clock, 10, |a, _| {
        let m = a.agent().db().outbox(Some(&id), 1).expect("outbox");
        m[0].deliveries
            .iter()
            .all(|d| d.delivery.state == State::Delivered)
    })
    .await;
    relay.stop().await.expect("stop");
}

/// Flips a byte of chunks 0 and 1 the first time each is read (as
/// [`DamageChunks`]), and records the ids of the blobs put for any
/// mailbox.
#[derive(Debug)]
struct DamageAndRecord {
    damage: DamageChunks,
    put: std::sync::Mutex<Vec<BlobId>>,
}

impl Tamper for DamageAndRecord {
    fn blob_put(&self, id: &BlobId, _: &MailboxId, _: u64) -> Option<ForgedRefusal> {
        if let Ok(mut p) = self.put.lock() {
            if !p.contains(id) {
                p.push(*id);
            }
        }
        None
    }

    fn blob_data(&self, m: &MailboxId, id: &BlobId, offset: u64, data: &mut Vec<u8>) {
        self.damage.blob_data(m, id, offset, data)
    }
}

/// A repair offer whose blob is gone from the relay (lost, or an offer
/// that arrived after a newer one): the recipient waits for it a minute —
/// a repair forwarded relay to relay may arrive after its offer — then
/// asks again, and the second repair completes the file. Before, it
/// waited until the message expired.
#[tokio::test(flavor = "current_thread")]
async fn a_repair_whose_blob_is_gone_is_asked_for_again() {
    let tamper = Arc::new(DamageAndRecord {
        damage: DamageChunks::new([0, 1], 100),
        put: std::sync::Mutex::new(Vec::new()),
    });
    let World {
        dir,
        relay,
        clock,
        mut alice,
        mut bob,
        ..
    } = world(Some(tamper.clone()), None).await;
    let (path, data) = file(dir.path(), "two.bin", 2 * 65_536, 3);
    let (id, _) = alice
        .agent_mut()
        .send_file(&["bob".into()], &path, 86_400)
        .expect("send");
    catch_up(&clock);
    alice.pass().await.expect("upload");
    bob.pass().await.expect("damaged: asks for a repair");
    let downloads = bob.agent().db().downloads(None, 10).expect("downloads");
    assert_eq!(downloads[0].bad, vec![0, 1]);
    alice.pass().await.expect("the repair and its offer");
    // The relay loses the repair blob before Bob reads it.
    let puts = tamper.put.lock().expect("lock").clone();
    assert_eq!(puts.len(), 2, "the file's blob and the repair: {puts:?}");
    let bob_mb = MailboxId::of(bob.agent().card().public().signing_bytes());
    let key = relay
        .store()
        .blob_key(&puts[1], &bob_mb)
        .await
        .expect("key");
    assert!(relay
        .store()
        .ledger()
        .blob_delete(key, bob_mb)
        .await
        .expect("delete"));
    let s = bob.pass().await.expect("the offer; waits");
    assert_eq!(s.files_received, 0, "{s:?}");
    clock.advance(Duration::from_secs(30));
    let s = bob.pass().await.expect("still waits");
    assert_eq!(s.files_received, 0, "{s:?}");
    clock.advance(Duration::from_secs(31));
    bob.pass().await.expect("asks again");
    alice.pass().await.expect("the second repair");
    let s = bob.pass().await.expect("repaired");
    assert_eq!(s.files_received, 1, "{s:?}");
    let got = std::fs::read(dir.path().join("bob/downloads/two.bin")).expect("received");
    assert!(got == data, "the file arrived whole");
    alice.pass().await.expect("receipt");
    assert_eq!(state(&alice, &id).0, State::Delivered);
    relay.stop().await.expect("stop");
}

/// A co-recipient learns a file's blob id from its own manifest, and a
/// blob is named by its id within the recipient's mailbox (the relay
/// cannot scope it by sender: it does not know senders). Mallory uploads
/// a complete blob of her own under that id to bob's mailbox before alice
/// does: alice's agent finds it complete and sends the manifest; bob's
/// chunks do not authenticate, bob asks alice for a repair, and the
/// repair (a new blob id only bob learns) brings the file whole. It costs
/// a repair, never the delivery, and bob never takes mallory's bytes.
#[tokio::test(flavor = "current_thread")]
async fn a_blob_taken_first_by_a_co_recipient_costs_a_repair_not_the_file() {
    let World {
        dir,
        net,
        relay,
        clock,
        mut alice,
        mut bob,
    } = world(None, None).await;
    let (path, data) = file(dir.path(), "shared.bin", 3 * 65_536 + 17, 5);
    let (id, _) = alice
        .agent_mut()
        .send_file(&["bob".into()], &path, 86_400)
        .expect("send");
    let f = alice
        .agent()
        .db()
        .file_out(&id)
        .expect("db")
        .expect("file out");
    let total = f.layout().expect("layout").blob_len();
    let garbage = vec![0x5a; total as usize];
    let c = common::client(&net, relay.address()).await;
    let bob_mb = MailboxId::of(bob.agent().identity().public().signing_bytes());
    let put = c
        .blob_put(sealpost_proto::relay::BlobPiece {
            blob_id: f.blob_id,
            mailbox: bob_mb,
            total_len: total,
            blob_hash: *blake3::hash(&garbage).as_bytes(),
            expires_at: now_ms() / 1000 + 86_400,
            offset: 0,
            data: garbage,
        })
        .await
        .expect("put");
    assert_eq!(put.ok(), Some((total, true)), "mallory's blob is complete");
    drop(c);
    catch_up(&clock);
    alice.pass().await.expect("pass");
    // Bob: chunks that do not authenticate, a repair asked of alice,
    // alice's repair, the file whole.
    for _ in 0..10 {
        let s = bob.pass().await.expect("pass");
        if s.files_received == 1 {
            break;
        }
        alice.pass().await.expect("pass");
        clock.advance(Duration::from_secs(60));
    }
    let got = std::fs::read(dir.path().join("bob/downloads/shared.bin")).expect("placed");
    assert!(got == data, "bob got alice's file, whole");
    let caught = bob.agent().db().detection_counts().expect("detections");
    assert!(
        caught.iter().any(|(c, n)| c == "damaged-chunk" && *n > 0),
        "{caught:?}"
    );
    passes_until(&mut alice, &clock, 10, |a, _| {
        state(a, &id).0 == State::Delivered
    })
    .await;
    relay.stop().await.expect("stop");
}
