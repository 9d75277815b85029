//! The store: every behaviour of the conformance suite against the
//! embedded backend (SQLite + files) and the in-memory one, then what only
//! the embedded store does (pacing, orphan files by name and age, old
//! databases migrated, space given back).

use sealpost_proto::relay::{BlobId, MailboxId};
use std::sync::Arc;

use sealpost_store::conformance::{self, limits, piece, NOW, SRC};
use sealpost_store::memory::{MemBlobs, MemLedger};
use sealpost_store::{BlobPutOutcome, Limits, Store, SubmitOutcome};

/// The embedded store (SQLite + files) in a temporary directory.
struct Embedded(tempfile::TempDir);

impl conformance::Backend for Embedded {
    fn open(&self, limits: Limits) -> Store {
        Store::open(self.0.path(), limits).expect("open")
    }
    fn durable(&self) -> bool {
        true
    }
    fn damage(&self, id: &BlobId, at: u64) {
        Self::damage_in(self.0.path(), id, at);
    }
}

impl Embedded {
    fn damage_in(dir: &std::path::Path, id: &BlobId, at: u64) {
        let hex: String = id.0.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join("blobs").join(hex);
        let mut bytes = std::fs::read(&path).expect("blob file");
        bytes[at as usize] ^= 1;
        std::fs::write(&path, bytes).expect("write");
    }
}

/// The in-memory ledger and blob store (not durable: a store opened again
/// starts empty).
#[derive(Default)]
struct InMemory(std::sync::Mutex<Option<Arc<MemBlobs>>>);

impl conformance::Backend for InMemory {
    fn open(&self, limits: Limits) -> Store {
        let blobs = Arc::new(MemBlobs::default());
        *self.0.lock().expect("lock") = Some(blobs.clone());
        Store::new(
            Arc::new(MemLedger::new(limits)),
            blobs,
            Arc::new(sealpost_store::LocalNotifier::default()),
            limits,
            "memory".into(),
        )
    }
    fn durable(&self) -> bool {
        false
    }
    fn damage(&self, id: &BlobId, at: u64) {
        if let Some(b) = self.0.lock().expect("lock").as_ref() {
            b.flip(id, at as usize);
        }
    }
}

impl InMemory {
    fn age_all(&self) {
        if let Some(b) = self.0.lock().expect("lock").as_ref() {
            b.age_all(std::time::Duration::from_secs(3600));
        }
    }
}

/// The cluster's ledger: PostgreSQL (a throwaway server, a database per
/// test) with blob files in a temporary directory, news between nodes by
/// `NOTIFY`.
struct Postgres {
    url: String,
    dir: tempfile::TempDir,
}

impl Postgres {
    fn new(test: &str) -> Option<Self> {
        let url = sealpost_store::test_postgres::database(test)?;
        Some(Self {
            url,
            dir: tempfile::tempdir().expect("tmp"),
        })
    }
}

impl conformance::Backend for Postgres {
    fn open(&self, limits: Limits) -> Store {
        use sealpost_store::postgres::{self, PgLedger, PgNotifier};
        use sealpost_store::Ledger;
        postgres::setup_blocking(&self.url).expect("schema");
        let ledger = PgLedger::on_schema(&self.url, limits).expect("ledger");
        let blobs = sealpost_store::FileBlobs::open(
            &self.dir.path().join("blobs"),
            ledger.latencies().blob_sync.clone(),
        )
        .expect("blobs");
        let notifier = PgNotifier::start(&self.url, postgres::pool(&self.url, 2).expect("pool"))
            .expect("notifier");
        Store::new(
            Arc::new(ledger),
            Arc::new(blobs),
            Arc::new(notifier),
            limits,
            "postgres".into(),
        )
    }
    fn durable(&self) -> bool {
        true
    }
    fn damage(&self, id: &BlobId, at: u64) {
        Embedded::damage_in(self.dir.path(), id, at);
    }
}

/// The cluster's whole store: PostgreSQL for the ledger, an S3 bucket
/// (Garage) for the blob bytes.
struct PostgresS3 {
    url: String,
    s3: sealpost_store::s3::S3Config,
    blobs: std::sync::Mutex<Option<Arc<sealpost_store::s3::S3Blobs>>>,
}

impl PostgresS3 {
    fn new(test: &str) -> Option<Self> {
        let s3 = sealpost_store::test_s3::bucket(test)?;
        let url = sealpost_store::test_postgres::database(test)?;
        Some(Self {
            url,
            s3,
            blobs: Default::default(),
        })
    }
}

impl conformance::Backend for PostgresS3 {
    fn open(&self, limits: Limits) -> Store {
        use sealpost_store::postgres::{self, PgLedger, PgNotifier};
        postgres::setup_blocking(&self.url).expect("schema");
        let ledger = PgLedger::on_schema(&self.url, limits).expect("ledger");
        let blobs = Arc::new(sealpost_store::s3::S3Blobs::open(&self.s3).expect("bucket"));
        *self.blobs.lock().expect("lock") = Some(blobs.clone());
        let notifier = PgNotifier::start(&self.url, postgres::pool(&self.url, 2).expect("pool"))
            .expect("notifier");
        Store::new(
            Arc::new(ledger),
            blobs,
            Arc::new(notifier),
            limits,
            "postgres+s3".into(),
        )
    }
    fn durable(&self) -> bool {
        true
    }
    fn damage(&self, id: &BlobId, at: u64) {
        if let Some(b) = self.blobs.lock().expect("lock").as_ref() {
            b.damage(id, at).expect("damage");
        }
    }
}

/// Every conformance test, against every backend.
macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let b = Embedded(tempfile::tempdir().expect("tmp"));
                    conformance::$name(&b).await;
                }
            )*
        }
        mod in_memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    conformance::$name(&InMemory::default()).await;
                }
            )*
        }
        mod postgres_s3 {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(b) = PostgresS3::new(concat!("postgres_s3::", stringify!($name))) {
                        conformance::$name(&b).await;
                    }
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(b) = Postgres::new(concat!("postgres::", stringify!($name))) {
                        conformance::$name(&b).await;
                    }
                }
            )*
        }
    };
}

conformance_tests!(
    submit_fetch_ack_and_refusals,
    submissions_together_keep_quota_shares_and_order,
    the_mailbox_cap_holds_under_concurrency,
    writes_survive_a_reopen,
    blobs_resume_and_check_their_hash,
    runs_of_pieces_answer_as_pieces_one_by_one,
    one_source_holds_at_most_its_share_of_a_mailbox,
    blob_lengths_move_by_compare_and_set,
    the_forward_queue_holds_and_ends_items,
    a_forwarded_blob_is_queued_once,
    handed_entries_map_a_gateways_notices_back,
);

#[tokio::test]
async fn orphan_blobs_are_removed_in_memory() {
    let b = InMemory::default();
    conformance::orphan_blobs_are_removed(&b, &|| b.age_all()).await;
}

fn h(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
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
    let id = BlobId([4u8; 16]);
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
        store.blob_read(&id, 0, mib).await.expect("read"),
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
        .await
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
    let id = BlobId([3u8; 16]);
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
    assert_eq!(reopened.remove_orphan_blobs().await.expect("sweep"), 1);
    assert!(!orphan.exists(), "the orphan is removed");
    assert!(young.exists(), "a young file is left alone");
    assert!(other.exists(), "a file that cannot be a blob is left alone");
    assert_eq!(
        reopened.blob_read(&id, 0, 100).await.expect("read"),
        Some(data)
    );
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
    assert_eq!(store.share_used(&mb, &SRC).await.expect("share"), 10);
    assert_eq!(store.status(&mb).await.expect("status").used, 110);
    let old = store.fetch(&mb, 0, 10, 1 << 20).await.expect("fetch").items;
    assert_eq!(old.len(), 2);
    assert_eq!(store.ack(mb, vec![old[0].seq, seq]).await.expect("ack"), 2);
    assert_eq!(store.share_rows().await.expect("rows"), 0);
    assert_eq!(store.status(&mb).await.expect("status").used, 0);
}

/// Submits `n` items of 64 KiB to `mb`; returns their seqs.
async fn submit_64k(store: &Store, mb: MailboxId, from: u32, n: u32) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in from..from + n {
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
    seqs
}

/// A store with one mailbox holding a burst of 24 MiB of items (their seqs).
async fn a_burst() -> (tempfile::TempDir, Store, MailboxId, Vec<u64>) {
    let dir = tempfile::tempdir().expect("tmp");
    let lim = Limits {
        mailbox_quota: 1 << 30,
        ..limits()
    };
    let store = Store::open(dir.path(), lim).expect("open");
    let mb = MailboxId::of(&[1; 32]);
    store.register(mb, [1; 32], NOW).await.expect("reg");
    let seqs = submit_64k(&store, mb, 0, 384).await;
    (dir, store, mb, seqs)
}

/// Waits until the database holds at most `live` bytes besides the free
/// pages it keeps, in the file on disk too.
async fn wait_for_space_back(store: &Store, dir: &std::path::Path, live: u64) {
    let kept = sealpost_store::VACUUM_KEEP_PAGES as u64 * 4096;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let sealpost_store::LedgerSpace { size, free } = store.db_space().await.expect("space");
        let on_disk = std::fs::metadata(dir.join("relay.db")).expect("db").len();
        let given_back = store.commit_stats().pages_given_back;
        if size <= live + kept + (1 << 20)
            && on_disk <= live + kept + (1 << 20)
            && free <= kept
            && given_back > 0
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {size} bytes in the database ({free} free), {on_disk} on disk"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A relay that held a burst gives the space back once the burst is
/// delivered: with little left in use, every free page at once, in one
/// step while the writer is idle.
#[tokio::test]
async fn space_is_given_back_after_a_burst_is_delivered() {
    let (dir, store, mb, seqs) = a_burst().await;
    let full = store.db_space().await.expect("space").size;
    assert!(full > 20 << 20, "{full}");
    for chunk in seqs.chunks(64) {
        store.ack(mb, chunk.to_vec()).await.expect("ack");
    }
    wait_for_space_back(&store, dir.path(), 0).await;
    let stats = store.commit_stats();
    assert!(
        stats.vacuum_steps <= 2 && stats.pages_given_back >= 5_000,
        "{stats:?}"
    );
    // New items still go in, reusing the kept pages.
    let p = vec![1u8; 1000];
    assert!(matches!(
        store.submit(mb, NOW + 3600, h(&p), p, SRC, NOW).await,
        Ok(SubmitOutcome::Stored { .. })
    ));
    store.close();
}

/// With much still in use (more than the pages given back all at once),
/// the space of what was delivered comes back in steps, down to the few
/// free pages kept, and what is still queued stays.
#[tokio::test]
async fn space_comes_back_in_steps_while_much_is_still_queued() {
    // The burst is delivered, then 20 MiB (above the all-at-once bound)
    // are kept.
    let (dir, store, mb, gone) = a_burst().await;
    let stay = submit_64k(&store, mb, 384, 320).await;
    assert!(
        stay.len() as i64 * 16 > sealpost_store::VACUUM_ALL_AT_ONCE_LIVE_PAGES,
        "kept items fill more pages than the bound"
    );
    for chunk in gone.chunks(64) {
        store.ack(mb, chunk.to_vec()).await.expect("ack");
    }
    wait_for_space_back(&store, dir.path(), 22 << 20).await;
    let stats = store.commit_stats();
    assert!(stats.vacuum_steps >= 8, "{stats:?}");
    let status = store.status(&mb).await.expect("status");
    assert_eq!(status.items, 320);
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

/// `sslmode=require`: the ledger talks to PostgreSQL over TLS and checks
/// its certificate (against `sslrootcert`, here a test CA): connected and
/// encrypted with the right CA (pg_stat_ssl says so), refused with another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_checks_the_server_certificate() {
    use sealpost_store::postgres;
    let test = "postgres_over_tls_checks_the_server_certificate";
    let Some(pg) = sealpost_store::test_postgres::own_server(test) else {
        return;
    };
    let make = |name: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    };
    let (cert, key) = make("sealpost test PostgreSQL");
    pg.enable_tls(&cert, &key).expect("TLS on");
    let dir = tempfile::tempdir().expect("tmp");
    let right = dir.path().join("right.pem");
    std::fs::write(&right, &cert).expect("write");
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(&wrong, make("someone else").0).expect("write");
    let url = pg.create_database().expect("database");

    let tls = format!("{url}?sslmode=require&sslrootcert={}", right.display());
    let ledger = postgres::PgLedger::connect(&tls, limits())
        .await
        .expect("connected over TLS");
    use sealpost_store::Ledger;
    ledger
        .register(MailboxId([7; 32]), [8; 32], NOW)
        .await
        .expect("register over TLS");
    let pool = postgres::pool(&tls, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the connection is not encrypted");

    let bad = format!("{url}?sslmode=require&sslrootcert={}", wrong.display());
    let Err(e) = postgres::PgLedger::connect(&bad, limits()).await else {
        panic!("a server whose certificate the CA did not sign was taken");
    };
    assert!(
        e.to_string().to_lowercase().contains("certificate"),
        "the error names the certificate: {e}"
    );
}
