use sealpost_proto::relay::{BlobPiece, MailboxId, RefusalCode};
use sealpost_store::{BlobPutOutcome, Limits, Source, Store, SubmitOutcome};

const NOW: u64 = 1_750_000_000;

/// Where the submissions of these tests come from.
const SRC: Source = Source::of_v4([127, 0, 0, 1]);

fn limits() -> Limits {
    Limits {
        mailbox_quota: 10_000,
        max_blob: 8_000,
        // These tests are about the whole quota; shares have their own.
        source_share_percent: 100,
        ..Limits::default()
    }
}

fn h(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

#[tokio::test]
async fn submit_fetch_ack_and_refusals() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path(), limits()).expect("open");
    let mb = MailboxId::of(&[1; 32]);
    let other = MailboxId::of(&[2; 32]);
    assert_eq!(
        store.register(mb, [1; 32], NOW).await.expect("reg"),
        sealpost_store::Registered::Created
    );
    assert_eq!(
        store.register(mb, [1; 32], NOW).await.expect("again"),
        sealpost_store::Registered::Existing
    );
    assert_eq!(
        store
            .submit(other, NOW + 10, h(b"x"), b"x".to_vec(), SRC, NOW)
            .await
            .expect("s"),
        SubmitOutcome::Refused(RefusalCode::UnknownMailbox)
    );
    assert_eq!(
        store
            .submit(mb, NOW, h(b"x"), b"x".to_vec(), SRC, NOW)
            .await
            .expect("s"),
        SubmitOutcome::Refused(RefusalCode::Expired)
    );
    assert_eq!(
        store
            .submit(mb, NOW + 10, h(&[0; 10_001]), vec![0; 10_001], SRC, NOW)
            .await
            .expect("s"),
        SubmitOutcome::Refused(RefusalCode::OverQuota)
    );
    let mut seqs = Vec::new();
    for i in 0..5u8 {
        match store
            .submit(mb, NOW + 10, h(&[i; 100]), vec![i; 100], SRC, NOW)
            .await
            .expect("s")
        {
            SubmitOutcome::Stored { seq, .. } => seqs.push(seq),
            other => panic!("{other:?}"),
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let (items, more, damaged) = store.fetch(&mb, 0, 3, 1 << 20).expect("fetch");
    assert_eq!((items.len(), more, damaged), (3, true, 0));
    let (rest, more, _) = store.fetch(&mb, items[2].seq, 10, 1 << 20).expect("fetch");
    assert_eq!((rest.len(), more), (2, false));
    assert_eq!(rest[1].payload, vec![4; 100]);
    // Acking another mailbox's seqs deletes nothing.
    assert_eq!(store.ack(other, seqs.clone()).await.expect("ack"), 0);
    assert_eq!(store.ack(mb, seqs[..2].to_vec()).await.expect("ack"), 2);
    assert_eq!(store.status(&mb).expect("status"), (3, 300, 10_000));
    // Expiry sweeping.
    assert_eq!(store.sweep(NOW + 10).await.expect("sweep"), 3);
    assert_eq!(store.status(&mb).expect("status"), (0, 0, 10_000));
}

#[tokio::test]
async fn writes_survive_a_reopen_and_share_commits() {
    let dir = tempfile::tempdir().expect("tmp");
    let mb = MailboxId::of(&[1; 32]);
    {
        let store = Store::open(dir.path(), Limits::default()).expect("open");
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
    }
    let store = Store::open(dir.path(), Limits::default()).expect("reopen");
    let (items, _, _) = store.fetch(&mb, 0, 1000, 1 << 20).expect("fetch");
    assert_eq!(items.len(), 200);
}

/// A piece of a blob expiring ten seconds from `NOW`.
fn piece(
    blob_id: [u8; 16],
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

#[tokio::test]
async fn blobs_resume_and_check_their_hash() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path(), limits()).expect("open");
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let id = [9u8; 16];
    let put = |off: usize, end: usize, hash: [u8; 32]| {
        let s = store.clone();
        let d = data[off..end].to_vec();
        async move {
            s.blob_put(piece(id, mb, 5000, hash, off as u64, d.to_vec()), SRC, NOW)
                .await
                .expect("put")
        }
    };
    assert_eq!(
        put(0, 2000, h(&data)).await,
        BlobPutOutcome::Stored {
            stored: 2000,
            complete: false
        }
    );
    // A retransmitted or skipping piece is told where to resume.
    assert_eq!(
        put(0, 2000, h(&data)).await,
        BlobPutOutcome::WrongOffset { stored: 2000 }
    );
    assert_eq!(
        put(3000, 4000, h(&data)).await,
        BlobPutOutcome::WrongOffset { stored: 2000 }
    );
    assert_eq!(store.blob_status(&id).expect("st"), Some((2000, false, mb)));
    assert_eq!(
        put(2000, 5000, h(&data)).await,
        BlobPutOutcome::Stored {
            stored: 5000,
            complete: true
        }
    );
    assert_eq!(
        store.blob_read(&id, 4990, 100).expect("read"),
        Some(data[4990..].to_vec())
    );
    // Every range reads the stored bytes, whether the relay still holds the
    // piece in memory or reads it from the file (a reopened store).
    let ranges = [
        (0u64, 2000usize),
        (2000, 3000),
        (100, 50),
        (1990, 20),
        (4999, 10),
    ];
    for &(off, len) in &ranges {
        let end = (off as usize + len).min(data.len());
        assert_eq!(
            store.blob_read(&id, off, len).expect("read"),
            Some(data[off as usize..end].to_vec())
        );
    }
    let reopened = Store::open(dir.path(), limits()).expect("reopen");
    for &(off, len) in &ranges {
        let end = (off as usize + len).min(data.len());
        assert_eq!(
            reopened.blob_read(&id, off, len).expect("read"),
            Some(data[off as usize..end].to_vec())
        );
    }
    reopened.close();
    let report = store.scrub().expect("scrub");
    assert_eq!((report.blobs, report.damaged_blobs.len()), (1, 0));

    // A blob whose bytes do not hash to the stated value is discarded.
    let id2 = [8u8; 16];
    let r = store
        .blob_put(piece(id2, mb, 10, [0; 32], 0, vec![1; 10]), SRC, NOW)
        .await
        .expect("put");
    assert_eq!(r, BlobPutOutcome::HashMismatch);
    assert_eq!(store.blob_status(&id2).expect("st"), None);
    let discarded = dir.path().join("blobs").join("08".repeat(16));
    assert!(!discarded.exists(), "a blob failing its hash is removed");
    // Too large, and over quota.
    let r = store
        .blob_put(piece([7; 16], mb, 9000, [0; 32], 0, vec![1; 10]), SRC, NOW)
        .await
        .expect("put");
    assert_eq!(r, BlobPutOutcome::Refused(RefusalCode::TooLarge));
    let r = store
        .blob_put(piece([6; 16], mb, 6000, [0; 32], 0, vec![1; 10]), SRC, NOW)
        .await
        .expect("put");
    assert_eq!(r, BlobPutOutcome::Refused(RefusalCode::OverQuota));

    // Damage at rest is found by the scrub.
    let path = dir.path().join("blobs").join("09".repeat(16));
    let mut bytes = std::fs::read(&path).expect("blob file");
    bytes[100] ^= 1;
    std::fs::write(&path, bytes).expect("write");
    let report = store.scrub().expect("scrub");
    assert_eq!(report.damaged_blobs, vec![id]);
    assert!(store.blob_delete(id, mb).await.expect("delete"));
    assert_eq!(store.status(&mb).expect("status").1, 0);
    assert!(!path.exists(), "a deleted blob's file is removed");
}

/// Pieces stored together (one fdatasync, one commit) answer as they would
/// one by one: each its own stored length, the last one complete once its
/// stated hash matched (earlier pieces state none); a piece that does not
/// continue the run is told where to resume; a wrong hash on the last
/// piece discards the blob for every piece of its run; the result reads
/// back and scrubs clean after a reopen.
#[tokio::test]
async fn runs_of_pieces_answer_as_pieces_one_by_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path(), limits()).expect("open");
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let data: Vec<u8> = (0..8_000u32).map(|i| (i * 7) as u8).collect();
    let id = [5u8; 16];
    let p = |off: usize, end: usize, hash: [u8; 32]| {
        piece(id, mb, 8_000, hash, off as u64, data[off..end].to_vec())
    };
    let stored = |stored, complete| Ok::<_, ()>(BlobPutOutcome::Stored { stored, complete });
    // The outcomes of one call (errors as `()`: none is expected).
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
    store.close();
    let store = Store::open(dir.path(), limits()).expect("reopen");
    assert_eq!(
        store.blob_read(&id, 0, 20_000).expect("read"),
        Some(data.clone())
    );
    let report = store.scrub().expect("scrub");
    assert_eq!((report.blobs, report.damaged_blobs.len()), (1, 0));

    // The last piece states a hash the blob does not have: the whole run
    // is answered with the mismatch and the blob is gone.
    let id2 = [6u8; 16];
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
    assert_eq!(store.blob_status(&id2).expect("status"), None);
}

/// An upload whose recipient reads the same blob while it arrives waits
/// for it, a little, once the recipient is more than `PACE_HOLD` behind
/// (so the pieces it reads next are still in memory); not when no one
/// reads, not when the recipient is close behind, and never longer than
/// `PACE_MAX_WAIT` for a run.
#[tokio::test]
async fn a_streaming_recipient_holds_an_upload_back_a_little() {
    use sealpost_store::{PACE_HOLD, PACE_MAX_WAIT};
    let dir = tempfile::tempdir().expect("tmp");
    let mib = 1usize << 20;
    let total = 40 * mib;
    let limits = Limits {
        mailbox_quota: 64 << 20,
        max_blob: 64 << 20,
        source_share_percent: 100,
        ..Limits::default()
    };
    let store = Store::open(dir.path(), limits).expect("open");
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let id = [4u8; 16];
    let put = |at: usize| {
        let store = store.clone();
        async move {
            let r = store
                .blob_put(
                    piece(
                        id,
                        mb,
                        total as u64,
                        [0; 32],
                        at as u64,
                        vec![at as u8; mib],
                    ),
                    SRC,
                    NOW,
                )
                .await
                .expect("put");
            assert_eq!(
                r,
                BlobPutOutcome::Stored {
                    stored: (at + mib) as u64,
                    complete: false
                }
            );
        }
    };
    let ahead = PACE_HOLD as usize + 2 * mib;
    // No one reads: nothing waits.
    for at in (0..ahead).step_by(mib) {
        put(at).await;
    }
    assert_eq!(store.pacing_stats(), (0, 0));
    // The recipient has read the first piece, and is now more than
    // PACE_HOLD behind: the next run waits (here for the whole bound, as
    // the recipient reads no further), then is stored.
    assert_eq!(
        store.blob_read(&id, 0, mib).expect("read"),
        Some(vec![0; mib])
    );
    let started = std::time::Instant::now();
    put(ahead).await;
    let (runs, micros) = store.pacing_stats();
    assert_eq!(runs, 1);
    assert!(
        micros >= PACE_MAX_WAIT.as_micros() as u64 * 9 / 10,
        "{micros}"
    );
    assert!(started.elapsed() >= PACE_MAX_WAIT * 9 / 10);
    // Close behind: no wait.
    let stored = ahead + mib;
    store
        .blob_read(&id, (stored - mib) as u64, mib)
        .expect("read");
    put(stored).await;
    assert_eq!(store.pacing_stats().0, 1);
    // A recipient that stops reading is no longer waited for.
    std::thread::sleep(std::time::Duration::from_millis(350));
    for at in (stored + mib..=stored + mib + ahead).step_by(mib) {
        put(at).await;
    }
    assert_eq!(store.pacing_stats().0, 1);
}

/// A blob file no row names (a relay stopped between creating it and
/// committing its first piece, or between deleting a blob's row and its
/// file) is removed once it is old; blobs, young files (an upload about to
/// commit its first piece) and other files stay.
#[tokio::test]
async fn old_orphan_blob_files_are_removed() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path(), limits()).expect("open");
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let id = [3u8; 16];
    let data = vec![7u8; 100];
    let r = store
        .blob_put(piece(id, mb, 100, h(&data), 0, data.clone()), SRC, NOW)
        .await
        .expect("put");
    assert_eq!(
        r,
        BlobPutOutcome::Stored {
            stored: 100,
            complete: true
        }
    );
    store.close();
    let blobs = dir.path().join("blobs");
    let orphan = blobs.join("0c".repeat(16));
    let young = blobs.join("0d".repeat(16));
    let other = blobs.join("notes.txt");
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for (p, bytes) in [
        (&orphan, &b"left behind"[..]),
        (&young, b"first piece"),
        (&other, b"not a blob"),
    ] {
        std::fs::write(p, bytes).expect("write");
    }
    for p in [&orphan, &other] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .and_then(|f| f.set_modified(an_hour_ago))
            .expect("age");
    }
    let reopened = Store::open(dir.path(), limits()).expect("reopen");
    assert_eq!(reopened.remove_orphan_blobs().expect("sweep"), 1);
    assert!(!orphan.exists(), "the orphan is removed");
    assert!(young.exists(), "a young file is left alone");
    assert!(other.exists(), "a file that cannot be a blob is left alone");
    assert_eq!(reopened.blob_read(&id, 0, 100).expect("read"), Some(data));
}

/// One source holds at most its share of a mailbox (items and blobs
/// together), others still have room; acks, deletes and expiry give the
/// share back, and a source's row goes when it holds nothing.
#[tokio::test]
async fn one_source_holds_at_most_its_share_of_a_mailbox() {
    let dir = tempfile::tempdir().expect("tmp");
    let limits = Limits {
        source_share_percent: 30,
        ..limits()
    };
    let store = Store::open(dir.path(), limits).expect("open");
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
    let blob = [9u8; 16];
    let r = store
        .blob_put(
            piece(blob, mb, 1000, [0; 32], 0, vec![1; 10]),
            stranger,
            NOW,
        )
        .await
        .expect("put");
    assert!(matches!(r, BlobPutOutcome::Stored { .. }), "{r:?}");
    assert_eq!(store.share_used(&mb, &stranger).expect("share"), 3000);
    let over = store
        .submit(mb, NOW + 10, h(&[7; 10]), vec![7; 10], stranger, NOW)
        .await
        .expect("submit");
    assert_eq!(over, SubmitOutcome::Refused(RefusalCode::OverQuota));
    let r = store
        .blob_put(
            piece([8; 16], mb, 10, [0; 32], 0, vec![1; 10]),
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
    assert_eq!(store.share_used(&mb, &stranger).expect("share"), 2000);
    assert!(store.blob_delete(blob, mb).await.expect("delete"));
    assert_eq!(store.share_used(&mb, &stranger).expect("share"), 1000);
    // Kept across a restart (the store is the truth, not memory) ...
    store.close();
    let store = Store::open(dir.path(), limits).expect("reopen");
    assert_eq!(store.share_used(&mb, &stranger).expect("share"), 1000);
    assert_eq!(store.share_used(&mb, &friend).expect("share"), 2000);
    // ... and given back by expiry, the rows with it.
    store.sweep(NOW + 10).await.expect("sweep");
    assert_eq!(store.share_used(&mb, &stranger).expect("share"), 0);
    assert_eq!(store.share_used(&mb, &friend).expect("share"), 0);
    assert_eq!(store.share_rows().expect("rows"), 0);
}

/// A store made before sources were kept opens, gains the columns, and
/// its old items (from no known source) count in no share but still in
/// the quota.
#[tokio::test]
async fn a_store_from_before_shares_opens_and_counts_new_items() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let conn = rusqlite::Connection::open(dir.path().join("relay.db")).expect("db");
        conn.execute_batch(
            "CREATE TABLE mailboxes (id BLOB PRIMARY KEY, key BLOB NOT NULL, quota INTEGER NOT NULL,
                 used INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
             CREATE TABLE items (seq INTEGER PRIMARY KEY AUTOINCREMENT, mailbox BLOB NOT NULL,
                 item_id BLOB NOT NULL, received_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
                 hash BLOB NOT NULL, payload BLOB NOT NULL);
             CREATE TABLE blobs (id BLOB PRIMARY KEY, mailbox BLOB NOT NULL, total_len INTEGER NOT NULL,
                 hash BLOB NOT NULL, expires_at INTEGER NOT NULL, stored INTEGER NOT NULL,
                 complete INTEGER NOT NULL);",
        )
        .expect("old schema");
        let mb = MailboxId::of(&[1; 32]);
        conn.execute(
            "INSERT INTO mailboxes VALUES (?1, ?2, 10000, 100, 0)",
            rusqlite::params![mb.0.to_vec(), vec![1u8; 32]],
        )
        .expect("mailbox");
        conn.execute(
            "INSERT INTO items (mailbox, item_id, received_at, expires_at, hash, payload)
             VALUES (?1, ?2, 0, ?3, ?4, ?5)",
            rusqlite::params![
                mb.0.to_vec(),
                vec![0u8; 16],
                (NOW + 10) as i64,
                h(&[0; 100]).to_vec(),
                vec![0u8; 100]
            ],
        )
        .expect("item");
    }
    let store = Store::open(dir.path(), limits()).expect("open old");
    let mb = MailboxId::of(&[1; 32]);
    let r = store
        .submit(mb, NOW + 10, h(&[1; 10]), vec![1; 10], SRC, NOW)
        .await
        .expect("submit");
    let SubmitOutcome::Stored { seq, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(store.share_used(&mb, &SRC).expect("share"), 10);
    assert_eq!(store.status(&mb).expect("status").1, 110);
    let (old, _, _) = store.fetch(&mb, 0, 10, 1 << 20).expect("fetch");
    assert_eq!(old.len(), 2);
    assert_eq!(store.ack(mb, vec![old[0].seq, seq]).await.expect("ack"), 2);
    assert_eq!(store.share_rows().expect("rows"), 0);
    assert_eq!(store.status(&mb).expect("status").1, 0);
}

/// A relay that held a burst gives the space back once the burst is
/// delivered: free database pages are returned in steps while the writer
/// is idle, down to the few it keeps for reuse.
#[tokio::test]
async fn space_is_given_back_after_a_burst_is_delivered() {
    let dir = tempfile::tempdir().expect("tmp");
    let lim = Limits {
        mailbox_quota: 1 << 30,
        ..limits()
    };
    let store = Store::open(dir.path(), lim).expect("open");
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    // 24 MiB of items.
    let mut seqs = Vec::new();
    for i in 0..384u32 {
        let p: Vec<u8> = (0..65_536u32).map(|j| (i ^ j) as u8).collect();
        match store
            .submit(mb, NOW + 3600, h(&p), p, SRC, NOW)
            .await
            .expect("submit")
        {
            SubmitOutcome::Stored { seq, .. } => seqs.push(seq),
            other => panic!("{other:?}"),
        }
    }
    let (full, _) = store.db_space().expect("space");
    assert!(full > 20 << 20, "{full}");
    for chunk in seqs.chunks(64) {
        store.ack(mb, chunk.to_vec()).await.expect("ack");
    }
    let kept = sealpost_store::VACUUM_KEEP_PAGES as u64 * 4096;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (size, free) = store.db_space().expect("space");
        let on_disk = std::fs::metadata(dir.path().join("relay.db"))
            .expect("db")
            .len();
        if size <= kept + (1 << 20) && on_disk <= kept + (1 << 20) {
            assert!(free <= kept, "{free}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {size} bytes in the database ({free} free), {on_disk} on disk"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(store.commit_stats().vacuum_steps >= 8);
    // New items still go in, reusing the kept pages.
    let p = vec![1u8; 1000];
    assert!(matches!(
        store.submit(mb, NOW + 3600, h(&p), p, SRC, NOW).await,
        Ok(SubmitOutcome::Stored { .. })
    ));
    store.close();
}

/// A store made before free space was given back (auto_vacuum off) is
/// rewritten once when opened, and gives space back from then on.
#[tokio::test]
async fn a_store_from_before_gives_space_back_after_its_first_open() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let c = rusqlite::Connection::open(dir.path().join("relay.db")).expect("db");
        c.execute_batch("CREATE TABLE old (x BLOB); INSERT INTO old VALUES (zeroblob(100000));")
            .expect("old");
        let mode: i64 = c
            .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, 0);
    }
    let store = Store::open(dir.path(), limits()).expect("open");
    store.close();
    let c = rusqlite::Connection::open(dir.path().join("relay.db")).expect("db");
    let mode: i64 = c
        .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, 2, "incremental");
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM old", [], |r| r.get(0))
        .expect("kept");
    assert_eq!(n, 1);
}
