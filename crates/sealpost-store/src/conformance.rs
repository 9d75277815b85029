//! The behaviour every ledger and blob store must show, as test functions
//! any backend runs (`tests/store.rs` runs them against the embedded
//! SQLite + files store and the in-memory one; a PostgreSQL + S3 backend
//! runs the same). They panic on a failure, like the tests they are;
//! built only with the `conformance` feature.
//!
//! What a backend provides is a [`Backend`]: stores opened on its storage
//! (again on the same storage after a restart, if it is durable) and a way
//! to damage a blob at rest.

use sealpost_proto::relay::{BlobId, BlobPiece, Forward, MailboxId, NextHop, RefusalCode};

use crate::{
    Advanced, BlobAdvance, BlobPutOutcome, Ended, Enqueued, Limits, MailboxUse, NewItem,
    Registered, Source, Store, SubmitOutcome,
};

/// A storage backend under test.
pub trait Backend {
    /// A store on this backend's storage with `limits`: empty the first
    /// time; later, for a durable backend, holding everything the stores
    /// opened before committed (as after a restart; the previous store
    /// was closed).
    fn open(&self, limits: Limits) -> Store;
    /// Whether a store opened again holds what was committed before.
    fn durable(&self) -> bool;
    /// Flips a bit of byte `at` of blob `id` at rest.
    fn damage(&self, id: &BlobId, at: u64);
}

pub const NOW: u64 = 1_750_000_000;

/// Where the submissions come from.
pub const SRC: Source = Source::of_v4([127, 0, 0, 1]);

/// A mailbox of 10,000 bytes, blobs up to 8,000, no per-source share.
pub fn limits() -> Limits {
    Limits {
        mailbox_quota: 10_000,
        max_blob: 8_000,
        source_share_percent: 100,
        ..Limits::default()
    }
}

fn h(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

/// A piece of a blob expiring ten seconds from `NOW`.
pub fn piece(
    blob_id: BlobId,
    mailbox: MailboxId,
    total_len: u64,
    blob_hash: [u8; 32],
    offset: u64,
    data: Vec<u8>,
) -> BlobPiece {
    BlobPiece {
        blob_id,
        mailbox,
        total_len,
        blob_hash,
        expires_at: NOW + 10,
        offset,
        data,
    }
}

fn used(u: MailboxUse) -> (u64, u64, u64) {
    (u.items, u.used, u.quota)
}

/// Submissions arriving together (one group commit, one batch) to two
/// mailboxes, from two sources, past one mailbox's quota: exactly what
/// fits is stored, each mailbox's seqs are distinct and rise, its use is
/// the sum of what was stored, each source's share what it stored, and the
/// other mailbox is unaffected.
pub async fn submissions_together_keep_quota_shares_and_order(b: &dyn Backend) {
    let store = b.open(limits());
    let (full, other) = (MailboxId::of(&[5; 32]), MailboxId::of(&[6; 32]));
    store.register(full, [5; 32], NOW).await.expect("reg");
    store.register(other, [6; 32], NOW).await.expect("reg");
    let second = Source::of_v4([127, 0, 0, 2]);
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let s = store.clone();
        let (mb, src) = match i % 4 {
            0 => (other, SRC),
            1 => (full, second),
            _ => (full, SRC),
        };
        tasks.push(async move {
            let mut p = format!("item {i:03}").into_bytes();
            p.resize(270, b'.');
            (
                mb,
                src,
                s.submit(mb, NOW + 10, h(&p), p, src, NOW)
                    .await
                    .expect("submit"),
            )
        });
    }
    let outcomes = futures_join_all(tasks).await;
    let mut stored: std::collections::HashMap<MailboxId, Vec<u64>> = Default::default();
    let mut by_source: std::collections::HashMap<Source, u64> = Default::default();
    for (mb, src, o) in &outcomes {
        match o {
            SubmitOutcome::Stored { seq, .. } => {
                stored.entry(*mb).or_default().push(*seq);
                if *mb == full {
                    *by_source.entry(*src).or_default() += 270;
                }
            }
            SubmitOutcome::Refused(RefusalCode::OverQuota) => {
                assert_eq!(*mb, full, "only the full mailbox refuses")
            }
            other => panic!("{other:?}"),
        }
    }
    // 48 items of 270 bytes for a quota of 10,000: 37 fit.
    assert_eq!(stored[&full].len(), 37, "exactly what fits is stored");
    assert_eq!(stored[&other].len(), 16);
    for seqs in stored.values() {
        let mut s = seqs.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), seqs.len(), "seqs are distinct");
    }
    assert_eq!(
        used(store.status(&full).await.expect("status")),
        (37, 37 * 270, 10_000)
    );
    assert_eq!(
        used(store.status(&other).await.expect("status")),
        (16, 16 * 270, 10_000)
    );
    for (src, bytes) in by_source {
        assert_eq!(store.share_used(&full, &src).await.expect("share"), bytes);
    }
    let f = store.fetch(&full, 0, 4096, 1 << 20).await.expect("fetch");
    assert_eq!(f.items.len(), 37);
    assert!(
        f.items.windows(2).all(|w| w[0].seq < w[1].seq),
        "in seq order"
    );
    store.close();
}

/// Runs futures concurrently on the current task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Registration is idempotent; submissions are refused for an unknown
/// mailbox, expiry and quota; fetch pages in order; an ack deletes only
/// the acking mailbox's items; expiry sweeps.
pub async fn submit_fetch_ack_and_refusals(b: &dyn Backend) {
    let store = b.open(limits());
    let mb = MailboxId::of(&[1; 32]);
    let other = MailboxId::of(&[2; 32]);
    assert_eq!(
        store.register(mb, [1; 32], NOW).await.expect("reg"),
        Registered::Created
    );
    assert_eq!(
        store.register(mb, [1; 32], NOW).await.expect("again"),
        Registered::Existing
    );
    assert_eq!(store.mailbox_key(&mb).await.expect("key"), Some([1; 32]));
    assert!(!store.has_mailbox(&other).await.expect("has"));
    let submit = |mb, exp, p: Vec<u8>| {
        let s = store.clone();
        async move { s.submit(mb, exp, h(&p), p, SRC, NOW).await.expect("s") }
    };
    assert_eq!(
        submit(other, NOW + 10, b"x".to_vec()).await,
        SubmitOutcome::Refused(RefusalCode::UnknownMailbox)
    );
    assert_eq!(
        submit(mb, NOW, b"x".to_vec()).await,
        SubmitOutcome::Refused(RefusalCode::Expired)
    );
    assert_eq!(
        submit(mb, NOW + 10, vec![0; 10_001]).await,
        SubmitOutcome::Refused(RefusalCode::OverQuota)
    );
    let mut seqs = Vec::new();
    for i in 0..5u8 {
        match submit(mb, NOW + 10, vec![i; 100]).await {
            SubmitOutcome::Stored { seq, .. } => seqs.push(seq),
            other => panic!("{other:?}"),
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let f = store.fetch(&mb, 0, 3, 1 << 20).await.expect("fetch");
    assert_eq!((f.items.len(), f.more, f.damaged), (3, true, 0));
    let rest = store
        .fetch(&mb, f.items[2].seq, 10, 1 << 20)
        .await
        .expect("fetch");
    assert_eq!((rest.items.len(), rest.more), (2, false));
    assert_eq!(rest.items[1].payload, vec![4; 100]);
    // The byte budget: at least one item, then no more than it allows.
    let small = store.fetch(&mb, 0, 10, 150).await.expect("fetch");
    assert_eq!((small.items.len(), small.more), (1, true));
    // Acking another mailbox's seqs deletes nothing.
    assert_eq!(store.ack(other, seqs.clone()).await.expect("ack"), 0);
    assert_eq!(store.ack(mb, seqs[..2].to_vec()).await.expect("ack"), 2);
    assert_eq!(
        used(store.status(&mb).await.expect("status")),
        (3, 300, 10_000)
    );
    let t = store.totals().await.expect("totals");
    assert_eq!((t.mailboxes, t.items, t.item_bytes), (1, 3, 300));
    // Expiry sweeping.
    assert_eq!(store.sweep(NOW + 10).await.expect("sweep"), 3);
    assert_eq!(
        used(store.status(&mb).await.expect("status")),
        (0, 0, 10_000)
    );
    store.close();
}

/// The registration cap holds, including for registrations racing.
pub async fn the_mailbox_cap_holds_under_concurrency(b: &dyn Backend) {
    let store = b.open(Limits {
        max_mailboxes: Some(5),
        ..limits()
    });
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.register(MailboxId::of(&[i; 32]), [i; 32], NOW).await
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.expect("join").expect("register") {
            Registered::Created => created += 1,
            Registered::Full => {}
            Registered::Existing => panic!("new keys"),
        }
    }
    assert_eq!(created, 5);
    store.close();
}

/// Concurrent submissions all commit, and (for a durable backend) are all
/// there after a restart.
pub async fn writes_survive_a_reopen(b: &dyn Backend) {
    let mb = MailboxId::of(&[1; 32]);
    let store = b.open(Limits::default());
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let p = i.to_be_bytes().to_vec();
            s.submit(mb, NOW + 10, h(&p), p, SRC, NOW).await
        }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.expect("join").expect("submit"),
            SubmitOutcome::Stored { .. }
        ));
    }
    let stats = store.commit_stats();
    assert_eq!(stats.writes, 201);
    assert!(stats.commits <= stats.writes);
    store.close();
    if b.durable() {
        let store = b.open(Limits::default());
        let f = store.fetch(&mb, 0, 1000, 1 << 20).await.expect("fetch");
        assert_eq!(f.items.len(), 200);
        store.close();
    }
}

/// A blob resumes where it is stored, reads back any range (from memory
/// or the blob store, and after a restart), is checked against its stated
/// hash (a mismatch discards it), is refused when too large or over
/// quota, scrubs clean and finds damage at rest, and is deleted with its
/// bytes.
pub async fn blobs_resume_and_check_their_hash(b: &dyn Backend) {
    let store = b.open(limits());
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let id = BlobId([9u8; 16]);
    let put = |off: usize, end: usize, hash: [u8; 32]| {
        let s = store.clone();
        let d = data[off..end].to_vec();
        async move {
            s.blob_put(piece(id, mb, 5000, hash, off as u64, d), SRC, NOW)
                .await
                .expect("put")
        }
    };
    let stored = |stored, complete| BlobPutOutcome::Stored { stored, complete };
    assert_eq!(put(0, 2000, h(&data)).await, stored(2000, false));
    // A retransmitted or skipping piece is told where to resume.
    assert_eq!(
        put(0, 2000, h(&data)).await,
        BlobPutOutcome::WrongOffset { stored: 2000 }
    );
    assert_eq!(
        put(3000, 4000, h(&data)).await,
        BlobPutOutcome::WrongOffset { stored: 2000 }
    );
    assert_eq!(
        store.blob_status(&id).await.expect("st"),
        Some((2000, false, mb))
    );
    assert_eq!(
        store.blob_status_settled(&id).await.expect("st"),
        Some((2000, false, mb))
    );
    // Only the stored part reads, and only by its mailbox.
    assert_eq!(
        store.blob_read(&id, 1990, 100).await.expect("read"),
        Some(data[1990..2000].to_vec())
    );
    let stranger = MailboxId::of(&[3; 32]);
    assert!(matches!(
        store
            .blob_locate(&id, &stranger, 0, 10)
            .await
            .expect("locate"),
        crate::BlobRead::Missing
    ));
    assert_eq!(put(2000, 5000, h(&data)).await, stored(5000, true));
    // Complete: a piece sent again is told so.
    assert_eq!(put(2000, 5000, h(&data)).await, stored(5000, true));
    let ranges = [
        (0u64, 2000usize),
        (2000, 3000),
        (100, 50),
        (1990, 20),
        (4990, 100),
    ];
    for &(off, len) in &ranges {
        let end = (off as usize + len).min(data.len());
        assert_eq!(
            store.blob_read(&id, off, len).await.expect("read"),
            Some(data[off as usize..end].to_vec())
        );
    }
    let report = store.scrub().await.expect("scrub");
    assert_eq!((report.blobs, report.damaged_blobs.len()), (1, 0));
    store.close();
    let store = if b.durable() {
        // Every range reads from the blob store after a restart.
        let reopened = b.open(limits());
        for &(off, len) in &ranges {
            let end = (off as usize + len).min(data.len());
            assert_eq!(
                reopened.blob_read(&id, off, len).await.expect("read"),
                Some(data[off as usize..end].to_vec())
            );
        }
        reopened
    } else {
        let s = b.open(limits());
        s.register(mb, [1; 32], NOW).await.expect("reg");
        for (off, end) in [(0, 2000), (2000, 5000)] {
            let p = piece(id, mb, 5000, h(&data), off as u64, data[off..end].to_vec());
            s.blob_put(p, SRC, NOW).await.expect("put");
        }
        s
    };

    // A blob whose bytes do not hash to the stated value is discarded,
    // bytes and all.
    let id2 = BlobId([8u8; 16]);
    let r = store
        .blob_put(piece(id2, mb, 10, [0; 32], 0, vec![1; 10]), SRC, NOW)
        .await
        .expect("put");
    assert_eq!(r, BlobPutOutcome::HashMismatch);
    assert_eq!(store.blob_status(&id2).await.expect("st"), None);
    let mut out = Vec::new();
    assert!(
        store.blobs().read(&id2, 0, 1, &mut out).is_err(),
        "a blob failing its hash is removed"
    );
    // Too large, and over quota.
    let r = store
        .blob_put(
            piece(BlobId([7; 16]), mb, 9000, [0; 32], 0, vec![1; 10]),
            SRC,
            NOW,
        )
        .await
        .expect("put");
    assert_eq!(r, BlobPutOutcome::Refused(RefusalCode::TooLarge));
    let r = store
        .blob_put(
            piece(BlobId([6; 16]), mb, 6000, [0; 32], 0, vec![1; 10]),
            SRC,
            NOW,
        )
        .await
        .expect("put");
    assert_eq!(r, BlobPutOutcome::Refused(RefusalCode::OverQuota));

    // Damage at rest is found by the scrub.
    b.damage(&id, 100);
    let report = store.scrub().await.expect("scrub");
    assert_eq!(report.damaged_blobs, vec![id]);
    assert!(store.blob_delete(id, mb).await.expect("delete"));
    assert_eq!(store.status(&mb).await.expect("status").used, 0);
    assert!(
        store.blobs().read(&id, 0, 1, &mut out).is_err(),
        "a deleted blob's bytes are removed"
    );
    store.close();
}

/// Pieces stored together (one sync, one commit) answer as they would one
/// by one: each its own stored length, the last one complete once its
/// stated hash matched; a piece that does not continue the run is told
/// where to resume; a wrong hash on the last piece discards the blob for
/// every piece of its run.
pub async fn runs_of_pieces_answer_as_pieces_one_by_one(b: &dyn Backend) {
    let store = b.open(limits());
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let data: Vec<u8> = (0..8_000u32).map(|i| (i * 7) as u8).collect();
    let id = BlobId([5u8; 16]);
    let p = |off: usize, end: usize, hash: [u8; 32]| {
        piece(id, mb, 8_000, hash, off as u64, data[off..end].to_vec())
    };
    let stored = |stored, complete| Ok::<_, ()>(BlobPutOutcome::Stored { stored, complete });
    let put_many = |store: &Store, pieces: Vec<BlobPiece>| {
        let store = store.clone();
        async move {
            let got = store.blob_put_many(pieces, SRC, NOW).await;
            got.into_iter()
                .map(|r| r.map_err(|_| ()))
                .collect::<Vec<_>>()
        }
    };
    let got = put_many(
        &store,
        vec![
            p(0, 3000, [0; 32]),
            p(3000, 4097, [0; 32]),
            // A gap: not stored, the length to resume from.
            p(5000, 6000, [0; 32]),
            p(4097, 6000, [0; 32]),
        ],
    )
    .await;
    assert_eq!(
        got,
        vec![
            stored(3000, false),
            stored(4097, false),
            Ok(BlobPutOutcome::WrongOffset { stored: 4097 }),
            stored(6000, false),
        ]
    );
    let got = put_many(
        &store,
        vec![p(6000, 7000, [0; 32]), p(7000, 8_000, h(&data))],
    )
    .await;
    assert_eq!(got, vec![stored(7000, false), stored(8_000, true)]);
    assert_eq!(
        store.blob_read(&id, 0, 20_000).await.expect("read"),
        Some(data.clone())
    );
    let report = store.scrub().await.expect("scrub");
    assert_eq!((report.blobs, report.damaged_blobs.len()), (1, 0));

    // The last piece states a hash the blob does not have: the whole run
    // is answered with the mismatch and the blob is gone.
    let id2 = BlobId([6u8; 16]);
    let mb2 = MailboxId::of(&[2; 32]);
    store.register(mb2, [2; 32], NOW).await.expect("reg");
    let bad = |off: usize, end: usize, hash: [u8; 32]| {
        piece(id2, mb2, 8_000, hash, off as u64, data[off..end].to_vec())
    };
    let got = put_many(
        &store,
        vec![
            bad(0, 4000, [0; 32]),
            bad(4000, 6000, [0; 32]),
            bad(6000, 8_000, [9; 32]),
        ],
    )
    .await;
    assert_eq!(got, vec![Ok(BlobPutOutcome::HashMismatch); 3]);
    assert_eq!(store.blob_status(&id2).await.expect("status"), None);
    assert_eq!(store.status(&mb2).await.expect("status").used, 0);
    store.close();
}

/// One source holds at most its share of a mailbox (items and blobs
/// together), others still have room; acks, deletes and expiry give the
/// share back, and a source's row goes when it holds nothing.
pub async fn one_source_holds_at_most_its_share_of_a_mailbox(b: &dyn Backend) {
    let limits = Limits {
        source_share_percent: 30,
        ..limits()
    };
    let store = b.open(limits);
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let stranger = Source::of_ip("127.0.0.9".parse().expect("ip"));
    let friend = Source::of_ip("::ffff:127.0.0.3".parse().expect("ip"));
    assert_eq!(friend, Source::of_v4([127, 0, 0, 3]), "mapped IPv4 is IPv4");
    // 3,000 of 10,000 per source: two items of 1,000 and a blob of 1,000.
    let mut seqs = Vec::new();
    for i in 0..2u8 {
        match store
            .submit(mb, NOW + 10, h(&[i; 1000]), vec![i; 1000], stranger, NOW)
            .await
            .expect("submit")
        {
            SubmitOutcome::Stored { seq, .. } => seqs.push(seq),
            other => panic!("{other:?}"),
        }
    }
    let blob = BlobId([9u8; 16]);
    let r = store
        .blob_put(
            piece(blob, mb, 1000, [0; 32], 0, vec![1; 10]),
            stranger,
            NOW,
        )
        .await
        .expect("put");
    assert!(matches!(r, BlobPutOutcome::Stored { .. }), "{r:?}");
    assert_eq!(store.share_used(&mb, &stranger).await.expect("share"), 3000);
    let over = store
        .submit(mb, NOW + 10, h(&[7; 10]), vec![7; 10], stranger, NOW)
        .await
        .expect("submit");
    assert_eq!(over, SubmitOutcome::Refused(RefusalCode::OverQuota));
    let r = store
        .blob_put(
            piece(BlobId([8; 16]), mb, 10, [0; 32], 0, vec![1; 10]),
            stranger,
            NOW,
        )
        .await
        .expect("put");
    assert_eq!(r, BlobPutOutcome::Refused(RefusalCode::OverQuota));
    // The mailbox itself has room: another source is taken.
    let ok = store
        .submit(mb, NOW + 10, h(&[5; 2000]), vec![5; 2000], friend, NOW)
        .await
        .expect("submit");
    assert!(matches!(ok, SubmitOutcome::Stored { .. }), "{ok:?}");
    // An ack gives the stranger's share back; so does a blob's delete.
    assert_eq!(store.ack(mb, vec![seqs[0]]).await.expect("ack"), 1);
    assert_eq!(store.share_used(&mb, &stranger).await.expect("share"), 2000);
    assert!(store.blob_delete(blob, mb).await.expect("delete"));
    assert_eq!(store.share_used(&mb, &stranger).await.expect("share"), 1000);
    // Kept across a restart (the ledger is the truth, not memory) ...
    let store = if b.durable() {
        store.close();
        let store = b.open(limits);
        assert_eq!(store.share_used(&mb, &stranger).await.expect("share"), 1000);
        assert_eq!(store.share_used(&mb, &friend).await.expect("share"), 2000);
        store
    } else {
        store
    };
    // ... and given back by expiry, the rows with it.
    store.sweep(NOW + 10).await.expect("sweep");
    assert_eq!(store.share_used(&mb, &stranger).await.expect("share"), 0);
    assert_eq!(store.share_used(&mb, &friend).await.expect("share"), 0);
    assert_eq!(store.share_rows().await.expect("rows"), 0);
    store.close();
}

/// Who may append to a blob is the ledger's compare-and-set, not one
/// process's lock: a writer that saw an older length, a second creator
/// and a writer of a completed blob all change nothing; new blobs racing
/// for the last of a quota cannot pass it together.
pub async fn blob_lengths_move_by_compare_and_set(b: &dyn Backend) {
    let store = b.open(limits());
    let ledger = store.ledger().clone();
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let adv = |id: BlobId, total_len, from, to, complete| BlobAdvance {
        blob_id: id,
        mailbox: mb,
        total_len,
        expires_at: NOW + 10,
        from,
        to,
        complete,
        hash: [0; 32],
        source: SRC,
    };
    let id = BlobId([1u8; 16]);
    assert_eq!(
        ledger
            .blob_advance(adv(id, 100, None, 10, false))
            .await
            .expect("new"),
        Advanced::Committed
    );
    // A second creator of the same blob.
    assert_eq!(
        ledger
            .blob_advance(adv(id, 100, None, 20, false))
            .await
            .expect("again"),
        Advanced::Conflict { stored: Some(10) }
    );
    // Two writers saw 10: the first wins, the second is told 30.
    assert_eq!(
        ledger
            .blob_advance(adv(id, 100, Some(10), 30, false))
            .await
            .expect("a"),
        Advanced::Committed
    );
    assert_eq!(
        ledger
            .blob_advance(adv(id, 100, Some(10), 40, false))
            .await
            .expect("b"),
        Advanced::Conflict { stored: Some(30) }
    );
    // Another total length is another blob: refused as a conflict.
    assert_eq!(
        ledger
            .blob_advance(adv(id, 99, Some(30), 40, false))
            .await
            .expect("c"),
        Advanced::Conflict { stored: Some(30) }
    );
    assert_eq!(
        ledger
            .blob_advance(adv(id, 100, Some(30), 100, true))
            .await
            .expect("d"),
        Advanced::Committed
    );
    assert_eq!(
        ledger
            .blob_advance(adv(id, 100, Some(100), 100, true))
            .await
            .expect("e"),
        Advanced::Conflict { stored: Some(100) },
        "a complete blob does not move"
    );
    assert_eq!(
        ledger
            .blob_advance(adv(BlobId([2; 16]), 10, Some(0), 10, true))
            .await
            .expect("f"),
        Advanced::Conflict { stored: None },
        "no blob to advance"
    );
    let st = ledger.blob(id).await.expect("blob").expect("row");
    assert_eq!((st.stored, st.complete, st.total_len), (100, true, 100));
    // Quota: 10,000 − 100 used; ten blobs of 2,000 race for 9,900.
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let l = ledger.clone();
        let a = adv(BlobId([10 + i; 16]), 2000, None, 1, false);
        tasks.push(tokio::spawn(async move { l.blob_advance(a).await }));
    }
    let mut committed = 0;
    for t in tasks {
        match t.await.expect("join").expect("advance") {
            Advanced::Committed => committed += 1,
            Advanced::Refused(RefusalCode::OverQuota) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(committed, 4);
    assert_eq!(store.status(&mb).await.expect("status").used, 8_100);
    assert_eq!(
        ledger
            .blob_advance(BlobAdvance {
                mailbox: MailboxId::of(&[7; 32]),
                ..adv(BlobId([30; 16]), 10, None, 10, false)
            })
            .await
            .expect("unknown"),
        Advanced::Refused(RefusalCode::UnknownMailbox)
    );
    store.close();
}

/// Blob bytes no ledger row names are removed once old, and only then;
/// bytes a row names are kept.
pub async fn orphan_blobs_are_removed(b: &dyn Backend, age_all: &dyn Fn()) {
    let store = b.open(limits());
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let data = vec![7u8; 100];
    let kept = BlobId([3u8; 16]);
    let r = store
        .blob_put(piece(kept, mb, 100, h(&data), 0, data.clone()), SRC, NOW)
        .await
        .expect("put");
    assert_eq!(
        r,
        BlobPutOutcome::Stored {
            stored: 100,
            complete: true
        }
    );
    // Bytes written, and their row gone (a stop between the two steps of
    // a delete leaves this).
    let orphan = BlobId([12u8; 16]);
    store
        .blobs()
        .write_run(
            &orphan,
            0,
            true,
            &[piece(orphan, mb, 5, [0; 32], 0, vec![1; 5])],
            false,
        )
        .expect("write");
    assert_eq!(
        store.remove_orphan_blobs().await.expect("sweep"),
        0,
        "young bytes are left alone"
    );
    age_all();
    assert_eq!(store.remove_orphan_blobs().await.expect("sweep"), 1);
    let mut out = Vec::new();
    assert!(store.blobs().read(&orphan, 0, 1, &mut out).is_err());
    assert_eq!(
        store.blob_read(&kept, 0, 100).await.expect("read"),
        Some(data)
    );
    store.close();
}

fn forward(mailbox: MailboxId, next: &str, payload: &[u8], expires_at: u64) -> Forward {
    Forward {
        hops: 0,
        next: NextHop {
            addr: next.into(),
            pin: [next.len() as u8; 32],
        },
        mailbox,
        expires_at,
        payload_hash: h(payload),
        payload: payload.to_vec(),
    }
}

/// The forward queue (PROTOCOL 6.8): an item counts in its sender's quota
/// until it is ended; due items come back in order, put off ones only when
/// due again (or expired); `forward_end` stores the notice for the sender
/// in the same write and releases the bytes, once; the queue per next relay
/// adds up; all of it survives a reopen on a durable backend.
pub async fn the_forward_queue_holds_and_ends_items(b: &dyn Backend) {
    let store = b.open(limits());
    let alice = MailboxId::of(&[1; 32]);
    let dest = MailboxId::of(&[9; 32]);
    store.register(alice, [1; 32], NOW).await.expect("reg");
    let refused = |e: Enqueued| match e {
        Enqueued::Refused(c) => c,
        Enqueued::Queued { .. } => panic!("queued"),
    };
    let queued = |e: Enqueued| match e {
        Enqueued::Queued { id } => id,
        Enqueued::Refused(c) => panic!("refused {c:?}"),
    };
    // Refused: an origin with no mailbox, an expired item, over quota.
    let nobody = MailboxId::of(&[3; 32]);
    let r = store
        .forward_enqueue(nobody, forward(dest, "b:1", b"x", NOW + 10), None, NOW)
        .await
        .expect("enqueue");
    assert_eq!(refused(r), RefusalCode::UnknownMailbox);
    let r = store
        .forward_enqueue(alice, forward(dest, "b:1", b"x", NOW), None, NOW)
        .await
        .expect("enqueue");
    assert_eq!(refused(r), RefusalCode::Expired);
    let r = store
        .forward_enqueue(
            alice,
            forward(dest, "b:1", &[0; 10_001], NOW + 10),
            None,
            NOW,
        )
        .await
        .expect("enqueue");
    assert_eq!(refused(r), RefusalCode::OverQuota);
    // Three queued (two for one relay, one for another): 6,000 bytes of
    // Alice's 10,000, so her own mailbox takes no more than 4,000 now.
    let a = queued(
        store
            .forward_enqueue(
                alice,
                forward(dest, "b:1", &[1; 2000], NOW + 100),
                None,
                NOW,
            )
            .await
            .expect("a"),
    );
    let b2 = queued(
        store
            .forward_enqueue(
                alice,
                forward(dest, "b:1", &[2; 2000], NOW + 100),
                None,
                NOW + 1,
            )
            .await
            .expect("b"),
    );
    let c = queued(
        store
            .forward_enqueue(
                alice,
                forward(dest, "cc:2", &[3; 2000], NOW + 5),
                None,
                NOW + 2,
            )
            .await
            .expect("c"),
    );
    assert!(a < b2 && b2 < c, "ids grow: {a} {b2} {c}");
    // A retransmission of a waiting item is the same entry, counted once.
    let again = queued(
        store
            .forward_enqueue(
                alice,
                forward(dest, "b:1", &[1; 2000], NOW + 100),
                None,
                NOW + 3,
            )
            .await
            .expect("again"),
    );
    assert_eq!(again, a, "queued once while it waits");
    // What waits, asked by its sender (and no one else's).
    let w = store
        .forward_waiting(
            alice,
            vec![
                (dest, h(&[1; 2000])),
                (dest, h(&[9; 10])),
                (MailboxId::of(&[8; 32]), h(&[1; 2000])),
            ],
        )
        .await
        .expect("waiting");
    assert_eq!(
        w.iter()
            .map(|x| x.as_ref().map(|w| w.attempts))
            .collect::<Vec<_>>(),
        vec![Some(0), None, None]
    );
    assert_eq!(
        store
            .forward_waiting(nobody, vec![(dest, h(&[1; 2000]))])
            .await
            .expect("waiting"),
        vec![None],
        "another sender's item is not seen"
    );
    assert_eq!(store.status(&alice).await.expect("status").used, 6000);
    let r = store
        .submit(alice, NOW + 10, h(&[4; 4001]), vec![4; 4001], SRC, NOW)
        .await
        .expect("submit");
    assert_eq!(r, SubmitOutcome::Refused(RefusalCode::OverQuota));
    // Due at NOW + 2: all three, in order, as queued.
    let due = store.forward_due(NOW + 2, 10, 1 << 20).await.expect("due");
    assert_eq!(due.iter().map(|q| q.id).collect::<Vec<_>>(), vec![a, b2, c]);
    assert_eq!(due[0].item, forward(dest, "b:1", &[1; 2000], NOW + 100));
    assert_eq!(
        (due[0].origin, due[0].received_at, due[0].attempts),
        (alice, NOW, 0)
    );
    assert_eq!(
        store
            .forward_due(NOW + 2, 2, 1 << 20)
            .await
            .expect("due")
            .len(),
        2
    );
    // The byte bound: two items of 2,000 exceed 3,000, so one comes back;
    // a bound below the first item still gives that one.
    assert_eq!(
        store
            .forward_due(NOW + 2, 10, 3000)
            .await
            .expect("due")
            .len(),
        1
    );
    assert_eq!(
        store.forward_due(NOW + 2, 10, 10).await.expect("due").len(),
        1
    );
    // Put off: not due before next_at, except once expired.
    store
        .forward_later(vec![a, c], NOW + 60, "connection refused".into(), true)
        .await
        .expect("later");
    let due = store.forward_due(NOW + 3, 10, 1 << 20).await.expect("due");
    assert_eq!(due.iter().map(|q| q.id).collect::<Vec<_>>(), vec![b2]);
    let due = store.forward_due(NOW + 5, 10, 1 << 20).await.expect("due");
    assert_eq!(
        due.iter().map(|q| q.id).collect::<Vec<_>>(),
        vec![b2, c],
        "c expired"
    );
    let due = store.forward_due(NOW + 60, 10, 1 << 20).await.expect("due");
    assert_eq!(due.len(), 3);
    assert_eq!(
        (
            due[0].attempts,
            due[0].next_at,
            due[0].last_error.as_deref()
        ),
        (1, NOW + 60, Some("connection refused"))
    );
    let q = store.forward_queue().await.expect("queue");
    assert_eq!(q.len(), 2);
    assert_eq!(
        (
            q[0].next.addr.as_str(),
            q[0].items,
            q[0].bytes,
            q[0].oldest,
            q[0].attempts
        ),
        ("b:1", 2, 4000, NOW, 1)
    );
    assert_eq!(q[0].last_error.as_deref(), Some("connection refused"));
    assert_eq!(
        (q[1].next.addr.as_str(), q[1].items, q[1].bytes),
        ("cc:2", 1, 2000)
    );
    // Ended: handed on (no notice), refused (a notice for Alice).
    assert_eq!(
        store.forward_end(b2, None).await.expect("end"),
        Ended::Ended { notice_seq: None }
    );
    assert_eq!(
        store.forward_end(b2, None).await.expect("again"),
        Ended::Gone
    );
    assert_eq!(store.status(&alice).await.expect("status").used, 4000);
    let notice = NewItem {
        mailbox: alice,
        expires_at: NOW + 100,
        hash: h(b"notice"),
        payload: b"notice".to_vec(),
        source: SRC,
        now: NOW,
    };
    let ended = store.forward_end(c, Some(notice)).await.expect("end");
    let Ended::Ended {
        notice_seq: Some(seq),
    } = ended
    else {
        panic!("no notice: {ended:?}");
    };
    let got = store.fetch(&alice, 0, 10, 1 << 20).await.expect("fetch");
    assert_eq!(got.items.len(), 1);
    assert_eq!(
        (got.items[0].seq, &got.items[0].payload[..]),
        (seq, &b"notice"[..])
    );
    assert_eq!(store.status(&alice).await.expect("status").used, 2000 + 6);
    if b.durable() {
        store.close();
        let store = b.open(limits());
        let due = store.forward_due(NOW + 60, 10, 1 << 20).await.expect("due");
        assert_eq!(due.iter().map(|q| q.id).collect::<Vec<_>>(), vec![a]);
        assert_eq!(due[0].item.payload, vec![1; 2000]);
        assert_eq!(due[0].attempts, 1);
        assert_eq!(store.status(&alice).await.expect("status").used, 2006);
        store.close();
    }
}

/// A forwarded blob's entry (PROTOCOL 6.8): queued once however often its
/// first piece comes (the same id back), counted in the queue by the
/// blob's length but not in the origin's quota (its blob is), and put off
/// without counting an attempt while it waits for its sender's upload.
pub async fn a_forwarded_blob_is_queued_once(b: &dyn Backend) {
    let store = b.open(limits());
    let alice = MailboxId::of(&[1; 32]);
    let dest = MailboxId::of(&[9; 32]);
    store.register(alice, [1; 32], NOW).await.expect("reg");
    let blob = BlobId([7; 16]);
    let entry = || forward(dest, "b:1", b"", NOW + 100);
    let id = |e: Enqueued| match e {
        Enqueued::Queued { id } => id,
        Enqueued::Refused(c) => panic!("refused {c:?}"),
    };
    let first = id(store
        .forward_enqueue(alice, entry(), Some((blob, 1 << 20)), NOW)
        .await
        .expect("enqueue"));
    let again = id(store
        .forward_enqueue(alice, entry(), Some((blob, 1 << 20)), NOW + 1)
        .await
        .expect("again"));
    assert_eq!(first, again, "one entry per blob and mailbox");
    let carol = MailboxId::of(&[10; 32]);
    let for_carol = id(store
        .forward_enqueue(
            alice,
            forward(carol, "c:1", b"", NOW + 100),
            Some((blob, 1 << 20)),
            NOW,
        )
        .await
        .expect("carol"));
    assert_ne!(first, for_carol, "the same blob for another mailbox");
    assert!(store.forward_blob_queued(blob).await.expect("queued"));
    store.forward_end(for_carol, None).await.expect("end");
    assert!(store.forward_blob_queued(blob).await.expect("queued"));
    assert!(!store
        .forward_blob_queued(BlobId([9; 16]))
        .await
        .expect("queued"));
    let other = id(store
        .forward_enqueue(alice, entry(), Some((BlobId([8; 16]), 10)), NOW)
        .await
        .expect("other"));
    assert_ne!(first, other);
    assert_eq!(store.status(&alice).await.expect("status").used, 0);
    let due = store.forward_due(NOW, 10, 1 << 20).await.expect("due");
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].blob, Some((blob, 1 << 20)));
    assert_eq!(due[0].item, entry());
    let q = store.forward_queue().await.expect("queue");
    assert_eq!((q[0].items, q[0].bytes), (2, (1 << 20) + 10));
    // Waiting is not failing; failing is.
    store
        .forward_later(vec![first], NOW + 1, "waiting".into(), false)
        .await
        .expect("wait");
    store
        .forward_later(vec![other], NOW + 1, "refused".into(), true)
        .await
        .expect("fail");
    let due = store.forward_due(NOW + 1, 10, 1 << 20).await.expect("due");
    assert_eq!(
        due.iter().map(|q| (q.id, q.attempts)).collect::<Vec<_>>(),
        vec![(first, 0), (other, 1)]
    );
    if b.durable() {
        store.close();
        let store = b.open(limits());
        let due = store.forward_due(NOW + 1, 10, 1 << 20).await.expect("due");
        assert_eq!(due[0].blob, Some((blob, 1 << 20)));
        store.close();
    }
}

/// Entries handed to an outbound gateway (PROTOCOL 6.8): they leave the
/// queue and the sender's quota, are found by what a gateway's notice
/// names (an item by mailbox and hash, a blob by id and mailbox), end once
/// with the notice stored for their sender, and are forgotten after
/// their time; a retransmission of the same item queues it again.
pub async fn handed_entries_map_a_gateways_notices_back(b: &dyn Backend) {
    let store = b.open(limits());
    let alice = MailboxId::of(&[1; 32]);
    let dest = MailboxId::of(&[9; 32]);
    store.register(alice, [1; 32], NOW).await.expect("reg");
    let id = |e: Enqueued| match e {
        Enqueued::Queued { id } => id,
        Enqueued::Refused(c) => panic!("refused {c:?}"),
    };
    let item = forward(dest, "d:1", b"through the gateway", NOW + 100);
    let first = id(store
        .forward_enqueue(alice, item.clone(), None, NOW)
        .await
        .expect("enqueue"));
    assert_eq!(store.status(&alice).await.expect("status").used, 19);
    let blob = BlobId([7; 16]);
    let with_blob = id(store
        .forward_enqueue(
            alice,
            forward(dest, "d:1", b"", NOW + 100),
            Some((blob, 5)),
            NOW,
        )
        .await
        .expect("blob"));
    for e in [first, with_blob] {
        assert_eq!(
            store.forward_handed(e, NOW + 700).await.expect("handed"),
            Ended::Ended { notice_seq: None }
        );
    }
    assert_eq!(
        store.forward_handed(first, NOW + 700).await.expect("again"),
        Ended::Gone
    );
    assert_eq!(store.status(&alice).await.expect("status").used, 0);
    assert!(store
        .forward_due(NOW + 1000, 10, 1 << 20)
        .await
        .expect("due")
        .is_empty());
    assert!(!store.forward_blob_queued(blob).await.expect("queued"));
    let found = store
        .handed_find(dest, item.payload_hash, None)
        .await
        .expect("find")
        .expect("the item");
    assert_eq!(
        (found.id, found.origin, &found.next, found.blob, found.until),
        (first, alice, &item.next, None, NOW + 700)
    );
    let b_found = store
        .handed_find(dest, [0; 32], Some(blob))
        .await
        .expect("find")
        .expect("the blob");
    assert_eq!((b_found.id, b_found.blob), (with_blob, Some(blob)));
    assert!(store
        .handed_find(MailboxId::of(&[3; 32]), item.payload_hash, None)
        .await
        .expect("find")
        .is_none());
    // A retransmission while it is handed is queued again.
    let again = id(store
        .forward_enqueue(alice, item.clone(), None, NOW + 2)
        .await
        .expect("again"));
    assert_ne!(again, first);
    // The notice goes to the sender, once.
    let notice = || NewItem {
        mailbox: alice,
        expires_at: NOW + 500,
        hash: h(b"notice"),
        payload: b"notice".to_vec(),
        source: Source::of_v4([0, 0, 0, 0]),
        now: NOW + 3,
    };
    let ended = store.handed_end(first, Some(notice())).await.expect("end");
    assert!(
        matches!(
            ended,
            Ended::Ended {
                notice_seq: Some(_)
            }
        ),
        "{ended:?}"
    );
    assert_eq!(
        store.handed_end(first, Some(notice())).await.expect("end"),
        Ended::Gone
    );
    if b.durable() {
        store.close();
        let store = b.open(limits());
        assert!(store
            .handed_find(dest, [0; 32], Some(blob))
            .await
            .expect("find")
            .is_some());
        assert_eq!(store.handed_expire(NOW + 701).await.expect("expire"), 1);
        assert!(store
            .handed_find(dest, [0; 32], Some(blob))
            .await
            .expect("find")
            .is_none());
        store.close();
    } else {
        assert_eq!(store.handed_expire(NOW + 701).await.expect("expire"), 1);
    }
}
