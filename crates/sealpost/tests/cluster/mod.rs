//! Relay nodes on one PostgreSQL database, as real processes (issue 16):
//! any node serves any mailbox, a subscriber on one node is told of an
//! item submitted on another, and what a node acknowledged before it was
//! killed (SIGKILL) is served by the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sealpost_proto::Identity;
use sealpost_relay::client::{RelayClient, Submitted};

use crate::relay::{free_port, start_relay_with, Seeded};

/// Every item of `owner`'s mailbox, fetched through the node at `addr`
/// (each checked against its hash), by payload hash.
async fn fetch_all(
    addr: &sealpost_relay::RelayAddress,
    owner: &Identity,
) -> HashMap<[u8; 32], Vec<u8>> {
    let c = RelayClient::connect(addr).await.expect("connect");
    c.auth(owner).await.expect("auth");
    let mut all = HashMap::new();
    let mut after = 0;
    loop {
        let (items, more) = c.fetch(after, 4096).await.expect("fetch");
        for i in &items {
            assert_eq!(blake3::hash(&i.payload).as_bytes(), &i.payload_hash);
            all.insert(i.payload_hash, i.payload.clone());
        }
        match items.last() {
            Some(last) if more => after = last.seq,
            _ => break,
        }
    }
    all
}

/// Every item of the mailbox `c` is authenticated for, as (seq, payload)
/// in seq order.
async fn fetch_in_order(c: &RelayClient) -> Vec<(u64, Vec<u8>)> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(0, |(s, _)| *s);
        let (items, more) = c.fetch(after, 4096).await.expect("fetch");
        all.extend(items.into_iter().map(|i| (i.seq, i.payload)));
        if !more {
            return all;
        }
    }
}

/// A relay process, SIGKILLed when dropped: a failing assertion must not
/// leave nodes running.
struct Node(std::process::Child);

impl std::ops::Deref for Node {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node(
    (child, addr): (std::process::Child, sealpost_relay::RelayAddress),
) -> (Node, sealpost_relay::RelayAddress) {
    (Node(child), addr)
}

/// A whole blob of `len` bytes read through `c`, 1 MiB at a time (an
/// empty answer before the end fails the test instead of looping).
async fn read_blob(c: &RelayClient, id: sealpost_proto::relay::BlobId, len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < len {
        let part = c
            .blob_get(id, got.len() as u64, 1 << 20)
            .await
            .expect("get");
        assert!(!part.is_empty(), "an empty read at {} of {len}", got.len());
        got.extend_from_slice(&part);
    }
    got
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[test]
fn two_nodes_on_one_database_serve_one_mailbox_and_survive_a_kill() {
    let Some(url) = sealpost_store::test_postgres::database(
        "cluster::two_nodes_on_one_database_serve_one_mailbox_and_survive_a_kill",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
    let port_a = free_port();
    let (mut node_a, addr_a) = node(start_relay_with(&data_a, port_a, &["--database", &url]));
    // The nodes share one relay key (their signed refusals are the
    // relay's); each has its own data directory and certificate here.
    let key = data_a.join("relay-signing.key");
    let key = key.to_str().expect("utf-8");
    let (node_b, addr_b) = node(start_relay_with(
        &data_b,
        free_port(),
        &["--database", &url, "--signing-key", key],
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let owner = Identity::from_secret_bytes(&[7; 32], &[8; 32]);

    // Registered on node A, subscribed on node B; items submitted on A.
    let (mailbox, pushed, fetched) = rt.block_on(async {
        let a = RelayClient::connect(&addr_a).await.expect("connect a");
        let mailbox = a.register(&owner).await.expect("register on a");
        let b = RelayClient::connect(&addr_b).await.expect("connect b");
        assert_eq!(b.auth(&owner).await.expect("auth on b"), mailbox);
        let mut pushes = b.subscribe().await.expect("subscribe on b");
        let sender = RelayClient::connect(&addr_a).await.expect("sender");
        for n in 0..50u32 {
            let r = sender
                .submit(mailbox, now() + 3600, format!("item {n}").into_bytes())
                .await
                .expect("submit on a");
            assert!(matches!(r, Submitted::Accepted { .. }), "{r:?}");
        }
        // Node B hears of them through PostgreSQL (seqs per mailbox: 1..50).
        let mut pushed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pushed.last() != Some(&50) && Instant::now() < deadline {
            if let Ok(Some(seq)) = tokio::time::timeout(Duration::from_secs(1), pushes.recv()).await
            {
                pushed.push(seq);
            }
        }
        let (items, more) = b.fetch(0, 4096).await.expect("fetch on b");
        assert!(!more);
        let fetched: Vec<(u64, Vec<u8>)> = items.into_iter().map(|i| (i.seq, i.payload)).collect();
        let acked = b
            .ack(fetched.iter().map(|(s, _)| *s).collect())
            .await
            .expect("ack on b");
        assert_eq!(acked, 50);
        a.auth(&owner).await.expect("auth on a");
        assert_eq!(
            a.status().await.expect("status on a").0,
            0,
            "acked on b, gone on a"
        );
        (mailbox, pushed, fetched)
    });
    assert_eq!(
        pushed.last(),
        Some(&50),
        "node B was told of node A's items: {pushed:?}"
    );
    assert_eq!(fetched.len(), 50);
    for (n, (seq, payload)) in fetched.iter().enumerate() {
        assert_eq!(*seq, n as u64 + 1, "seqs in order");
        assert_eq!(payload, format!("item {n}").as_bytes());
    }

    // Submitters on node A, which is killed under them: everything it
    // acknowledged is served by node B.
    let acked: Arc<Mutex<HashMap<[u8; 32], Vec<u8>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4u32 {
        let (addr, acked, stop) = (addr_a.clone(), acked.clone(), stop.clone());
        workers.push(rt.spawn(async move {
            let Ok(c) = RelayClient::connect(&addr).await else {
                return;
            };
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let payload = format!("worker {w} item {n}").into_bytes();
                match c.submit(mailbox, now() + 3600, payload.clone()).await {
                    Ok(Submitted::Accepted { .. }) => {
                        acked
                            .lock()
                            .expect("lock")
                            .insert(*blake3::hash(&payload).as_bytes(), payload);
                    }
                    Ok(other) => panic!("refused: {other:?}"),
                    Err(_) => return, // node A died
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(800));
    node_a.kill().expect("kill -9 node a");
    node_a.wait().expect("reap");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for w in workers {
            let _ = w.await;
        }
    });
    let stored = rt.block_on(fetch_all(&addr_b, &owner));
    let acked = acked.lock().expect("lock");
    let lost = acked.keys().filter(|h| !stored.contains_key(*h)).count();
    eprintln!(
        "acknowledged by node A before its SIGKILL: {}, served by node B: {}, lost: {lost}",
        acked.len(),
        stored.len()
    );
    assert!(acked.len() > 20, "too few submissions to mean anything");
    assert_eq!(lost, 0, "an item node A acknowledged is missing on node B");

    // Node A comes back on the same database and serves the mailbox. A
    // submission node A's backend was executing when A was killed may
    // still commit after B's fetch above (PostgreSQL finishes the call
    // before it notices the client is gone): such an item was never
    // acknowledged, and it is now served too — so read the mailbox again
    // through A and check both views agree, and that nothing B served
    // before is missing.
    let (node_a2, addr_a2) = node(start_relay_with(&data_a, port_a, &["--database", &url]));
    let stored_now = rt.block_on(fetch_all(&addr_a2, &owner));
    assert!(
        stored.keys().all(|h| stored_now.contains_key(h)),
        "an item node B served is missing on node A"
    );
    let n = rt.block_on(async {
        let a = RelayClient::connect(&addr_a2)
            .await
            .expect("connect a again");
        a.auth(&owner).await.expect("auth");
        a.status().await.expect("status").0
    });
    assert_eq!(n, stored_now.len() as u64);
    let stored = stored_now;
    // `relay status` of a node reads the shared database.
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("sealpost"))
        .args(["--json", "relay", "status", "--data"])
        .arg(&data_b)
        .args(["--database", &url])
        .output()
        .expect("relay status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["mailboxes"], 1);
    assert_eq!(status["items"], stored.len() as u64);
    assert!(status["db_free_bytes"].is_null(), "{status}");
    for mut c in [node_a2, node_b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Three nodes on one database under submitters spread across them; 30
/// SIGKILLs of nodes at seeded random moments, and PostgreSQL itself
/// crashed (immediate shutdown) for 2.5 s halfway: nothing any node
/// acknowledged is lost, and while the database is down no node
/// acknowledges anything (they answer with an error the client sees).
#[test]
fn three_nodes_under_kills_and_a_database_crash_lose_nothing_acknowledged() {
    let test = "cluster::three_nodes_under_kills_and_a_database_crash_lose_nothing_acknowledged";
    let Some(pg) = sealpost_store::test_postgres::own_server(test) else {
        return;
    };
    let url = pg.create_database().expect("database");
    let dir = tempfile::tempdir().expect("tmp");
    let datas: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("node{i}")))
        .collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let key = datas[0].join("relay-signing.key");
    let key = key.to_str().expect("utf-8").to_owned();
    let flags = |i: usize| -> Vec<String> {
        let mut f = vec!["--database".to_owned(), url.clone()];
        if i > 0 {
            f.extend(["--signing-key".to_owned(), key.clone()]);
        }
        f
    };
    let start = |i: usize| {
        let f = flags(i);
        let f: Vec<&str> = f.iter().map(String::as_str).collect();
        node(start_relay_with(&datas[i], ports[i], &f))
    };
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let (c, a) = start(i);
        nodes.push(c);
        addrs.push(a);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let owner = Identity::from_secret_bytes(&[9; 32], &[10; 32]);
    let mailbox = rt.block_on(async {
        let c = RelayClient::connect(&addrs[0]).await.expect("connect");
        c.register(&owner).await.expect("register")
    });

    let acked: Arc<Mutex<HashMap<[u8; 32], Vec<u8>>>> = Arc::default();
    let refused_while_down = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6u32 {
        let addr = addrs[w as usize % 3].clone();
        let (acked, stop, refused) = (acked.clone(), stop.clone(), refused_while_down.clone());
        workers.push(rt.spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(c) = RelayClient::connect(&addr).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let payload = format!("worker {w} item {n}").into_bytes();
                    match c.submit(mailbox, now() + 3600, payload.clone()).await {
                        Ok(Submitted::Accepted { .. }) => {
                            acked
                                .lock()
                                .expect("lock")
                                .insert(*blake3::hash(&payload).as_bytes(), payload);
                        }
                        Ok(other) => panic!("refused: {other:?}"),
                        Err(sealpost_relay::client::ClientError::Server {
                            code: sealpost_proto::relay::ErrorCode::Internal,
                            message,
                        }) if message.contains("nothing was stored") => {
                            // The node could not store it (the database
                            // is down): said, not acknowledged.
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => break, // the node died: reconnect
                    }
                }
            }
        }));
    }

    let mut rng = Seeded(0x00c1_05e7);
    let mut kills = [0u32; 3];
    let mut down_window = (0usize, 0usize);
    for k in 0..30 {
        std::thread::sleep(Duration::from_millis(150 + rng.next() % 250));
        if k == 15 {
            pg.crash();
            std::thread::sleep(Duration::from_millis(500));
            let before = acked.lock().expect("lock").len();
            std::thread::sleep(Duration::from_millis(2000));
            let after = acked.lock().expect("lock").len();
            down_window = (before, after);
            pg.restart().expect("PostgreSQL restarts");
        }
        let i = (rng.next() % 3) as usize;
        nodes[i].kill().expect("kill -9");
        nodes[i].wait().expect("reap");
        kills[i] += 1;
        let (c, _) = start(i);
        nodes[i] = c;
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for w in workers {
            let _ = w.await;
        }
    });

    let stored = rt.block_on(fetch_all(&addrs[1], &owner));
    let acked = acked.lock().expect("lock");
    let lost = acked.keys().filter(|h| !stored.contains_key(*h)).count();
    let refused = refused_while_down.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "kills per node {kills:?}; acknowledged {}, stored {}, lost {lost}; while PostgreSQL was down: acknowledged {} -> {}, answered with an error {refused} times",
        acked.len(),
        stored.len(),
        down_window.0,
        down_window.1
    );
    assert!(acked.len() > 200, "too few submissions to mean anything");
    assert_eq!(lost, 0, "an acknowledged item is missing");
    assert_eq!(
        down_window.0, down_window.1,
        "a node acknowledged while PostgreSQL was down"
    );
    assert!(
        refused > 0,
        "the nodes said nothing while PostgreSQL was down"
    );
    for mut c in nodes {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Two nodes on one database and one S3 bucket (Garage): a blob upload
/// started through node A resumes through node B, downloads whole through
/// either, and is gone from both once its owner deletes it through one.
#[test]
fn a_file_started_on_one_node_resumes_on_another_and_downloads_anywhere() {
    use sealpost_proto::relay::{BlobId, BlobPiece};
    let test = "cluster::a_file_started_on_one_node_resumes_on_another_and_downloads_anywhere";
    // A Garage node of its own: this test stops it. The nodes read the
    // bucket's key (the shared node's) from their environment.
    let Some(garage) = sealpost_store::test_s3::own_garage(test) else {
        return;
    };
    let garage: &'static _ = Box::leak(Box::new(garage));
    let blobs = garage.url_of(&garage.bucket().expect("bucket"));
    let Some(url) = sealpost_store::test_postgres::database(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
    let (node_a, addr_a) = node(start_relay_with(
        &data_a,
        free_port(),
        &["--database", &url, "--blobs", &blobs],
    ));
    let key = data_a.join("relay-signing.key");
    let (node_b, addr_b) = node(start_relay_with(
        &data_b,
        free_port(),
        &[
            "--database",
            &url,
            "--blobs",
            &blobs,
            "--signing-key",
            key.to_str().expect("utf-8"),
        ],
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let owner = Identity::from_secret_bytes(&[11; 32], &[12; 32]);
    rt.block_on(async {
        let a = RelayClient::connect(&addr_a).await.expect("connect a");
        let mb = a.register(&owner).await.expect("register");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 + 7) as u8).collect();
        let hash = *blake3::hash(&data).as_bytes();
        let blob_id = BlobId([0x5b; 16]);
        let piece = |off: usize| BlobPiece {
            blob_id,
            mailbox: mb,
            total_len: data.len() as u64,
            blob_hash: hash,
            expires_at: now() + 600,
            offset: off as u64,
            data: data[off..(off + (1 << 20)).min(data.len())].to_vec(),
        };
        // The first piece through node A, then the uploader moves.
        let sender_a = RelayClient::connect(&addr_a).await.expect("sender a");
        assert_eq!(
            sender_a.blob_put(piece(0)).await.expect("put"),
            Ok((1 << 20, false))
        );
        drop(sender_a);
        let sender_b = RelayClient::connect(&addr_b).await.expect("sender b");
        let (mut off, _) = sender_b
            .blob_status_for(blob_id, mb)
            .await
            .expect("status on b");
        assert_eq!(off, 1 << 20, "node B knows what node A stored");
        while off < data.len() as u64 {
            let (stored, complete) = sender_b
                .blob_put(piece(off as usize))
                .await
                .expect("put")
                .expect("stored");
            off = stored;
            assert_eq!(complete, off == data.len() as u64);
        }
        // Whole through either node.
        for addr in [&addr_a, &addr_b] {
            let c = RelayClient::connect(addr).await.expect("connect");
            c.auth(&owner).await.expect("auth");
            let got = read_blob(&c, blob_id, data.len()).await;
            assert!(got == data, "the blob read back through a node differs");
        }
        let b = RelayClient::connect(&addr_b).await.expect("connect");
        b.auth(&owner).await.expect("auth");
        b.blob_delete(blob_id).await.expect("delete on b");
        let a = RelayClient::connect(&addr_a).await.expect("connect");
        a.auth(&owner).await.expect("auth");
        assert!(a.blob_get(blob_id, 0, 10).await.is_err(), "gone on a too");

        // The object store stops mid-upload: the node says it could not
        // store the piece (never "stored"); once the store is back, the
        // upload resumes from what was committed and reads back whole.
        let blob_id = BlobId([0x5c; 16]);
        let piece = |off: usize| BlobPiece {
            blob_id,
            ..piece(off)
        };
        let sender = RelayClient::connect(&addr_a).await.expect("sender");
        assert_eq!(
            sender.blob_put(piece(0)).await.expect("put"),
            Ok((1 << 20, false))
        );
        tokio::task::spawn_blocking(|| garage.stop())
            .await
            .expect("stop");
        match sender.blob_put(piece(1 << 20)).await {
            Err(sealpost_relay::client::ClientError::Server { message, .. }) => assert!(
                message.contains("nothing was stored"),
                "the node said: {message}"
            ),
            other => panic!("a piece was answered {other:?} with the object store down"),
        }
        tokio::task::spawn_blocking(|| garage.restart())
            .await
            .expect("join")
            .expect("Garage restarts");
        let sender = RelayClient::connect(&addr_b).await.expect("sender");
        let (mut off, _) = sender.blob_status_for(blob_id, mb).await.expect("status");
        assert_eq!(off, 1 << 20, "what was committed before the outage");
        while off < data.len() as u64 {
            let (stored, _) = sender
                .blob_put(piece(off as usize))
                .await
                .expect("put")
                .expect("stored");
            off = stored;
        }
        let got = read_blob(&b, blob_id, data.len()).await;
        assert!(got == data, "the blob differs after the outage");
    });
    for mut c in [node_a, node_b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `relay migrate`: a single relay's store (items with gaps where some
/// were acknowledged, a complete blob and one half uploaded) moves into
/// PostgreSQL and a bucket. A migration killed part-way leaves both sides
/// refusing to serve (the old store and the database), a second run
/// finishes it, a third only checks; a cluster node then serves the same
/// items at the same seqs, the blob whole, and takes the half-uploaded
/// one up where it stopped.
#[test]
fn a_single_relay_migrates_into_a_cluster_and_is_served_the_same() {
    use sealpost_proto::relay::{BlobId, BlobPiece};
    use std::io::BufRead;
    let test = "cluster::a_single_relay_migrates_into_a_cluster_and_is_served_the_same";
    // The nodes read the bucket's key from their environment.
    let Some(blobs) = sealpost_store::test_s3::bucket_url(test) else {
        return;
    };
    let Some(url) = sealpost_store::test_postgres::database(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
    let (mut single, addr) = node(start_relay_with(&data_a, free_port(), &[]));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let owner = Identity::from_secret_bytes(&[21; 32], &[22; 32]);
    let whole: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let half: Vec<u8> = (0..5_000_000u32).map(|i| (i * 11 + 1) as u8).collect();
    let (whole_id, half_id) = (BlobId([0x6a; 16]), BlobId([0x6b; 16]));
    let piece = |id: BlobId, mb, data: &[u8], off: usize| BlobPiece {
        blob_id: id,
        mailbox: mb,
        total_len: data.len() as u64,
        blob_hash: *blake3::hash(data).as_bytes(),
        expires_at: now() + 3600,
        offset: off as u64,
        data: data[off..(off + (1 << 20)).min(data.len())].to_vec(),
    };
    let (mailbox, before) = rt.block_on(async {
        let c = RelayClient::connect(&addr).await.expect("connect");
        let mb = c.register(&owner).await.expect("register");
        for n in 0..200usize {
            let payload = vec![n as u8; 100 + n * 311];
            assert!(matches!(
                c.submit(mb, now() + 3600, payload).await.expect("submit"),
                Submitted::Accepted { .. }
            ));
        }
        c.auth(&owner).await.expect("auth");
        // Every seventh acknowledged: the seqs left have gaps.
        c.ack((1..=200u64).filter(|s| s % 7 == 0).collect())
            .await
            .expect("ack");
        let mut off = 0;
        while off < whole.len() {
            off = c
                .blob_put(piece(whole_id, mb, &whole, off))
                .await
                .expect("put")
                .expect("stored")
                .0 as usize;
        }
        for off in [0, 1 << 20] {
            c.blob_put(piece(half_id, mb, &half, off))
                .await
                .expect("put")
                .expect("stored");
        }
        (mb, fetch_in_order(&c).await)
    });
    assert_eq!(before.len(), 200 - 28);
    single.kill().expect("kill -9");
    single.wait().expect("reap");

    let sealpost = || {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("sealpost"));
        c.env("SEALPOST_LOG", "warn");
        c
    };
    let migrate_args = |c: &mut std::process::Command| {
        c.args(["relay", "migrate", "--data"])
            .arg(&data_a)
            .args(["--to", &url, "--blobs", &blobs]);
    };
    // Not while a node uses the database.
    let (mut early, _) = node(start_relay_with(
        &dir.path().join("early"),
        free_port(),
        &["--database", &url],
    ));
    let mut refused = sealpost();
    migrate_args(&mut refused);
    let out = refused.output().expect("migrate");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("relay nodes are connected"), "{said}");
    early.kill().expect("kill");
    early.wait().expect("reap");
    std::thread::sleep(Duration::from_millis(1500));
    // Killed once it has started on the items.
    let mut first = sealpost();
    migrate_args(&mut first);
    let mut first = first
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn migrate");
    let stderr = first.stderr.take().expect("stderr");
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.expect("line");
        if line.contains("copying items") {
            break;
        }
    }
    first.kill().expect("kill -9 the migration");
    first.wait().expect("reap");
    // Neither side serves now: not the old store, not the database.
    let out = sealpost()
        .args(["relay", "status", "--data"])
        .arg(&data_a)
        .output()
        .expect("status");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("moved to"), "{said}");
    let out = sealpost()
        .args(["relay", "status", "--data"])
        .arg(&data_b)
        .args(["--database", &url])
        .output()
        .expect("status");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("has not finished"), "{said}");

    // Run again: finished and checked.
    let mut second = sealpost();
    migrate_args(&mut second);
    let out = second.arg("--json").output().expect("migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["resumed"], true, "{r}");
    assert_eq!(r["mailboxes"], 1);
    assert_eq!(r["items"], before.len() as u64);
    assert_eq!(r["blobs_moved"], 2);
    assert_eq!(r["blob_bytes"], (whole.len() + (2 << 20)) as u64);
    // Not with another place for the blobs.
    let out = sealpost()
        .args(["relay", "migrate", "--data"])
        .arg(&data_a)
        .args(["--to", &url])
        .output()
        .expect("migrate");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("give the same --blobs"), "{said}");
    // A third run only checks.
    let mut third = sealpost();
    migrate_args(&mut third);
    let out = third.arg("--json").output().expect("migrate");
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["already_done"], true, "{r}");
    assert_eq!(r["blob_bytes_copied"], 0);

    // A cluster node with the relay's keys and certificate (so agents'
    // pins hold) serves the same.
    let file = |name: &str| data_a.join(name).to_str().expect("utf-8").to_owned();
    std::fs::create_dir_all(&data_b).expect("mkdir");
    for name in ["cert.pem", "key.pem"] {
        std::fs::copy(data_a.join(name), data_b.join(name)).expect("copy");
    }
    let (mut node, addr_b) = node(start_relay_with(
        &data_b,
        free_port(),
        &[
            "--database",
            &url,
            "--blobs",
            &blobs,
            "--signing-key",
            &file("relay-signing.key"),
        ],
    ));
    assert_eq!(addr_b.pin, addr.pin, "the same certificate pin");
    rt.block_on(async {
        let c = RelayClient::connect(&addr_b).await.expect("connect");
        c.auth(&owner).await.expect("auth");
        let after = fetch_in_order(&c).await;
        assert!(after == before, "the items differ after the migration");
        let got = read_blob(&c, whole_id, whole.len()).await;
        assert!(got == whole, "the blob differs after the migration");
        // The half-uploaded blob goes on where it stopped.
        let (mut off, complete) = c.blob_status_for(half_id, mailbox).await.expect("status");
        assert_eq!((off, complete), (2 << 20, false));
        while off < half.len() as u64 {
            off = c
                .blob_put(piece(half_id, mailbox, &half, off as usize))
                .await
                .expect("put")
                .expect("stored")
                .0;
        }
        let got = read_blob(&c, half_id, half.len()).await;
        assert!(got == half, "the resumed blob differs");
        // A new item's seq comes after every seq the single relay gave.
        match c
            .submit(mailbox, now() + 3600, b"after".to_vec())
            .await
            .expect("submit")
        {
            Submitted::Accepted { .. } => {}
            other => panic!("{other:?}"),
        }
        let items = fetch_in_order(&c).await;
        let seqs: Vec<u64> = items.iter().map(|i| i.0).collect();
        assert_eq!(items.len(), before.len() + 1);
        assert!(
            items.last().is_some_and(|i| i.1 == b"after" && i.0 > 200),
            "the new item is not last, after seq 200: {seqs:?}"
        );
    });
    let _ = node.kill();
    let _ = node.wait();
}
