//! The real relay on 127.0.0.1 (port 0), driven by the real client.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sealpost_proto::relay::{
    BlobId, BlobPiece, ErrorCode, MailboxId, RefusalCode, Request, Response,
};
use sealpost_proto::Identity;
use sealpost_relay::client::{ClientError, RelayClient, Submitted};
use sealpost_relay::{Config, Metrics, Relay, RelayAddress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "common/backend.rs"]
mod backend;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Running {
    addr: RelayAddress,
    metrics: std::sync::Arc<Metrics>,
    relay: sealpost_relay::RunningRelay,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    async fn stop(self) {
        self.relay.stop().await.expect("serve");
    }
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().expect("tmp");
    let mut r = start_in(dir.path().join("data"), tweak).await;
    r._dir = Some(dir);
    r
}

async fn start_in(data: std::path::PathBuf, tweak: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = Config::new("127.0.0.1:0".parse().expect("addr"), data);
    backend::on_backend(&mut cfg);
    tweak(&mut cfg);
    let relay = Relay::bind(cfg).await.expect("bind").spawn();
    Running {
        addr: relay.address().clone(),
        metrics: relay.metrics().clone(),
        relay,
        _dir: None,
    }
}

/// A pinned TLS session that has sent Hello, for writing raw bytes.
async fn raw_session(addr: &RelayAddress) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = sealpost_relay::tls::client_config(addr.pin).expect("cfg");
    let tcp = TcpStream::connect(&addr.host_port).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("tls");
    tls.write_all(&Request::Hello { version: 1 }.encode(1))
        .await
        .expect("hello");
    tls
}

/// Everything the relay answers on `tls` until it closes the connection
/// (within 5 s), decoded.
async fn answers_until_closed(
    mut tls: tokio_rustls::client::TlsStream<TcpStream>,
) -> Vec<sealpost_proto::relay::Frame<Response>> {
    tls.flush().await.expect("flush");
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut bytes))
        .await
        .expect("closed by the relay");
    let mut fb = sealpost_proto::relay::FrameBuffer::new();
    fb.extend(&bytes);
    let mut out = Vec::new();
    while let Some(f) = fb.next_frame().expect("frame") {
        out.push(Response::decode(&f).expect("decodes"));
    }
    out
}

fn id(n: u8) -> Identity {
    Identity::from_secret_bytes(&[n; 32], &[n ^ 0x55; 32])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_subscribe_fetch_ack() {
    let relay = start(|_| {}).await;
    let bob = id(2);
    let rx_client = RelayClient::connect(&relay.addr).await.expect("connect");
    let mb = rx_client.register(&bob).await.expect("register");
    assert_eq!(mb, MailboxId::of(bob.public().signing_bytes()));
    let mut notes = rx_client.subscribe().await.expect("subscribe");

    // A sender needs no account.
    let tx_client = RelayClient::connect(&relay.addr).await.expect("connect");
    let mut accepted = 0;
    for i in 0..20u8 {
        match tx_client
            .submit(mb, now() + 3600, vec![i; 1000])
            .await
            .expect("submit")
        {
            Submitted::Accepted { .. } => accepted += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(accepted, 20);
    // Pushed at once, no polling.
    let first = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .expect("notified");
    assert!(first.is_some());

    let (items, more) = rx_client.fetch(0, 15).await.expect("fetch");
    assert_eq!((items.len(), more), (15, true));
    assert_eq!(items[3].payload, vec![3; 1000]);
    assert_eq!(
        items[3].payload_hash,
        *blake3::hash(&items[3].payload).as_bytes()
    );
    let (rest, more) = rx_client.fetch(items[14].seq, 100).await.expect("fetch");
    assert_eq!((rest.len(), more), (5, false));
    let seqs: Vec<u64> = items.iter().chain(&rest).map(|i| i.seq).collect();
    assert_eq!(rx_client.ack(seqs).await.expect("ack"), 20);
    assert_eq!(rx_client.status().await.expect("status").0, 0);
    assert_eq!(relay.metrics.accepted.load(Ordering::Relaxed), 20);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_signed_by_the_relay() {
    let relay = start(|c| {
        c.limits.mailbox_quota = 5000;
        c.limits.max_blob = 70_000;
        c.max_message = 8000;
    })
    .await;
    let client = RelayClient::connect(&relay.addr).await.expect("connect");
    // It states the limits it enforces, to anyone (before any Auth).
    let limits = client.limits().await.expect("limits").expect("stated");
    assert_eq!(
        (limits.max_message, limits.max_blob, limits.mailbox_quota),
        (8000, 70_000, 5000)
    );
    let bob = id(2);
    let mb = client.register(&bob).await.expect("register");
    let unknown = MailboxId::of(&[9; 32]);
    let cases = [
        (unknown, now() + 60, 10usize, RefusalCode::UnknownMailbox),
        (mb, now().saturating_sub(1), 10, RefusalCode::Expired),
        (mb, now() + 60, 6000, RefusalCode::OverQuota),
        (mb, now() + 60, 8001, RefusalCode::TooLarge),
    ];
    for (mailbox, exp, len, code) in cases {
        match client
            .submit(mailbox, exp, vec![1; len])
            .await
            .expect("answer")
        {
            Submitted::Refused(r) => {
                assert_eq!(r.code, code);
                assert!(r.verify(client.relay_key()));
            }
            other => panic!("{code:?}: {other:?}"),
        }
    }
    // A payload that does not match its stated hash.
    let r = client
        .request(Request::Submit {
            mailbox: mb,
            expires_at: now() + 60,
            payload_hash: [0; 32],
            payload: vec![1; 10],
        })
        .await
        .expect("answer");
    assert!(matches!(r, Response::Refused(ref f) if f.code == RefusalCode::HashMismatch));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_key_holder_reads_or_deletes_a_mailbox() {
    let relay = start(|_| {}).await;
    let (alice, bob, mallory) = (id(1), id(2), id(3));
    let bob_conn = RelayClient::connect(&relay.addr).await.expect("connect");
    let bob_mb = bob_conn.register(&bob).await.expect("register");
    let alice_conn = RelayClient::connect(&relay.addr).await.expect("connect");
    alice_conn.register(&alice).await.expect("register");
    for _ in 0..3 {
        alice_conn
            .submit(bob_mb, now() + 60, b"for bob".to_vec())
            .await
            .expect("submit");
    }
    let (bob_items, _) = bob_conn.fetch(0, 10).await.expect("fetch");
    assert_eq!(bob_items.len(), 3);

    // Alice, authenticated to her own mailbox, sees nothing of Bob's and
    // cannot delete his items by guessing their seqs.
    let (alice_items, _) = alice_conn.fetch(0, 10).await.expect("fetch");
    assert!(alice_items.is_empty());
    let guessed: Vec<u64> = (0..100).collect();
    assert_eq!(alice_conn.ack(guessed).await.expect("ack"), 0);
    assert_eq!(bob_conn.status().await.expect("status").0, 3);

    // Unauthenticated: nothing.
    let anon = RelayClient::connect(&relay.addr).await.expect("connect");
    assert!(matches!(
        anon.fetch(0, 10).await,
        Err(ClientError::Server {
            code: ErrorCode::NotAuthenticated,
            ..
        })
    ));
    // Mallory claims Bob's key but cannot sign for it.
    let mut req_sig = [0u8; 64];
    req_sig[0] = 1;
    let r = anon
        .request(Request::Auth {
            key: *bob.public().signing_bytes(),
            signature: req_sig,
        })
        .await;
    assert!(matches!(
        r,
        Err(ClientError::Server {
            code: ErrorCode::BadSignature,
            ..
        })
    ));
    // Auth with a key that has no mailbox.
    assert!(matches!(
        anon.auth(&mallory).await,
        Err(ClientError::Server {
            code: ErrorCode::MailboxState,
            ..
        })
    ));

    // A proof captured on one TLS session is useless on another: it signs
    // that session's exporter value and challenge.
    let victim = RelayClient::connect(&relay.addr).await.expect("connect");
    let captured = victim.proof(&bob, false);
    let other = RelayClient::connect(&relay.addr).await.expect("connect");
    let r = other.request(captured.clone()).await;
    assert!(matches!(
        r,
        Err(ClientError::Server {
            code: ErrorCode::BadSignature,
            ..
        })
    ));
    // On its own session it works, which shows the test is not vacuous.
    assert!(matches!(victim.request(captured).await, Ok(Response::Ok)));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_upload_in_pieces_resume_and_download() {
    let relay = start(|_| {}).await;
    let bob = id(2);
    let bob_conn = RelayClient::connect(&relay.addr).await.expect("connect");
    let mb = bob_conn.register(&bob).await.expect("register");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
    let hash = *blake3::hash(&data).as_bytes();
    let blob_id = BlobId([5u8; 16]);
    let sender = RelayClient::connect(&relay.addr).await.expect("connect");
    let piece = 1 << 20;
    // First piece, then the connection "drops".
    let r = sender
        .blob_put(BlobPiece {
            blob_id,
            mailbox: mb,
            total_len: data.len() as u64,
            blob_hash: hash,
            expires_at: now() + 60,
            offset: 0,
            data: data[..piece].to_vec(),
        })
        .await
        .expect("put");
    assert_eq!(r, Ok((piece as u64, false)));
    drop(sender);
    // A new connection asks where to resume and continues.
    let sender = RelayClient::connect(&relay.addr).await.expect("connect");
    let (mut off, _) = sender.blob_status(blob_id).await.expect("status");
    assert_eq!(off, piece as u64);
    while off < data.len() as u64 {
        let end = (off as usize + piece).min(data.len());
        let (stored, complete) = sender
            .blob_put(BlobPiece {
                blob_id,
                mailbox: mb,
                total_len: data.len() as u64,
                blob_hash: hash,
                expires_at: now() + 60,
                offset: off,
                data: data[off as usize..end].to_vec(),
            })
            .await
            .expect("put")
            .expect("stored");
        off = stored;
        assert_eq!(complete, off == data.len() as u64);
    }
    let mut got = Vec::new();
    while got.len() < data.len() {
        let part = bob_conn
            .blob_get(blob_id, got.len() as u64, 1 << 20)
            .await
            .expect("get");
        assert!(!part.is_empty());
        got.extend_from_slice(&part);
    }
    assert_eq!(got, data);
    // Someone else's mailbox cannot read it.
    let alice_conn = RelayClient::connect(&relay.addr).await.expect("connect");
    alice_conn.register(&id(1)).await.expect("register");
    assert!(matches!(
        alice_conn.blob_get(blob_id, 0, 10).await,
        Err(ClientError::Server {
            code: ErrorCode::NotFound,
            ..
        })
    ));
    bob_conn.blob_delete(blob_id).await.expect("delete");
    relay.stop().await;
}

/// A blob is named by its id within a mailbox: one file sent to two
/// recipients on this relay (one manifest, so one blob id) is two blobs,
/// each uploaded for its mailbox, read by its owner only, and deleted by
/// it alone; an uploader asks `BlobStatus` for the mailbox it uploads for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_blob_id_in_two_mailboxes_is_two_blobs() {
    let relay = start(|_| {}).await;
    let (bob, carol) = (id(2), id(3));
    let bob_conn = RelayClient::connect(&relay.addr).await.expect("connect");
    let bob_mb = bob_conn.register(&bob).await.expect("register");
    let carol_conn = RelayClient::connect(&relay.addr).await.expect("connect");
    let carol_mb = carol_conn.register(&carol).await.expect("register");
    let blob_id = BlobId([6u8; 16]);
    let sender = RelayClient::connect(&relay.addr).await.expect("connect");
    let put = |mailbox, data: &[u8]| BlobPiece {
        blob_id,
        mailbox,
        total_len: data.len() as u64,
        blob_hash: *blake3::hash(data).as_bytes(),
        expires_at: now() + 60,
        offset: 0,
        data: data.to_vec(),
    };
    assert_eq!(
        sender.blob_put(put(bob_mb, b"for bob")).await.expect("put"),
        Ok((7, true))
    );
    assert_eq!(
        sender
            .blob_status_for(blob_id, carol_mb)
            .await
            .expect("status"),
        (0, false),
        "nothing for carol yet"
    );
    assert_eq!(
        sender
            .blob_put(put(carol_mb, b"for carol!"))
            .await
            .expect("put"),
        Ok((10, true))
    );
    assert_eq!(
        sender
            .blob_status_for(blob_id, bob_mb)
            .await
            .expect("status"),
        (7, true)
    );
    assert_eq!(
        bob_conn.blob_get(blob_id, 0, 100).await.expect("bob"),
        b"for bob"
    );
    assert_eq!(
        carol_conn.blob_get(blob_id, 0, 100).await.expect("carol"),
        b"for carol!"
    );
    // Bob's goes; Carol's stays hers.
    bob_conn.blob_delete(blob_id).await.expect("delete");
    assert_eq!(
        bob_conn.blob_status(blob_id).await.expect("status"),
        (0, false)
    );
    assert_eq!(
        carol_conn.blob_status(blob_id).await.expect("status"),
        (10, true)
    );
    assert_eq!(
        carol_conn.blob_get(blob_id, 0, 100).await.expect("carol"),
        b"for carol!"
    );
    relay.stop().await;
}

/// A blob whose last piece states a BLAKE3 the bytes do not have is
/// discarded with the typed error 11 (a client matches the code, not the
/// text), and can be uploaded again from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_hash_is_discarded_with_code_11() {
    let relay = start(|_| {}).await;
    let bob_conn = RelayClient::connect(&relay.addr).await.expect("connect");
    let mb = bob_conn.register(&id(2)).await.expect("register");
    let data = vec![7u8; 4096];
    let piece = |hash: [u8; 32]| BlobPiece {
        blob_id: BlobId([9u8; 16]),
        mailbox: mb,
        total_len: data.len() as u64,
        blob_hash: hash,
        expires_at: now() + 60,
        offset: 0,
        data: data.clone(),
    };
    let sender = RelayClient::connect(&relay.addr).await.expect("connect");
    let r = sender.blob_put(piece([1u8; 32])).await;
    assert!(
        matches!(
            r,
            Err(ClientError::Server {
                code: ErrorCode::BlobHashMismatch,
                ..
            })
        ),
        "{r:?}"
    );
    let (off, _) = sender.blob_status(BlobId([9u8; 16])).await.expect("status");
    assert_eq!(off, 0, "discarded");
    let r = sender
        .blob_put(piece(*blake3::hash(&data).as_bytes()))
        .await
        .expect("put");
    assert_eq!(r, Ok((data.len() as u64, true)));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_others_are_still_served() {
    let relay = start(|c| {
        c.frame_timeout = Duration::from_millis(500);
        c.handshake_timeout = Duration::from_secs(2);
    })
    .await;
    // Garbage instead of a TLS handshake.
    let mut raw = TcpStream::connect(&relay.addr.host_port)
        .await
        .expect("tcp");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(n.map(|n| n < 64).unwrap_or(true));

    // Idle connections that never finish a handshake are cut off by the
    // handshake timeout; meanwhile a real client is served.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            TcpStream::connect(&relay.addr.host_port)
                .await
                .expect("tcp"),
        );
    }
    let bob = id(2);
    let c = RelayClient::connect(&relay.addr)
        .await
        .expect("connect while 200 idle");
    let mb = c.register(&bob).await.expect("register");
    assert!(matches!(
        c.submit(mb, now() + 60, b"hi".to_vec()).await,
        Ok(Submitted::Accepted { .. })
    ));
    drop(idle);

    // An oversized frame and a malformed one each end their connection
    // with an error, and the relay keeps serving.
    let c2 = RelayClient::connect(&relay.addr).await.expect("connect");
    let r = c2
        .request(Request::Submit {
            mailbox: mb,
            expires_at: now() + 60,
            payload_hash: [0; 32],
            payload: vec![0; 2 << 20],
        })
        .await;
    assert!(r.is_err());
    assert!(matches!(
        c.submit(mb, now() + 60, b"still".to_vec()).await,
        Ok(Submitted::Accepted { .. })
    ));
    assert!(relay.metrics.bad_frames.load(Ordering::Relaxed) >= 1);

    // Slow loris: a frame started and never finished is cut off after the
    // frame timeout (500 ms here).
    let mut tls = raw_session(&relay.addr).await;
    tls.write_all(&[0, 0]).await.expect("half a prefix");
    tls.flush().await.expect("flush");
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    // (The frame stays unfinished; the relay must cut it off by itself.)
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut sink))
        .await
        .expect("closed by the relay");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(relay.metrics.timeouts.load(Ordering::Relaxed) >= 1);

    // A well-framed request of an unknown type: an error answer, then close.
    let mut tls = raw_session(&relay.addr).await;
    tls.write_all(&[0, 0, 0, 5, 0x7f, 0, 0, 0, 2])
        .await
        .expect("bad frame");
    let answers = answers_until_closed(tls).await;
    assert_eq!(answers.len(), 2, "HelloOk, the error, then closed");
    assert!(matches!(answers[0].body, Response::HelloOk { .. }));
    let e = &answers[1];
    assert_eq!(e.id, 0, "an error for an unparseable frame carries id 0");
    assert!(matches!(
        e.body,
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));

    // A valid request under id 0 (the relay's pushes): refused the same
    // way, not answered as if it were a request (PROTOCOL 6.2).
    let mut tls = raw_session(&relay.addr).await;
    tls.write_all(&Request::Limits.encode(0))
        .await
        .expect("id 0");
    let answers = answers_until_closed(tls).await;
    assert_eq!(answers.len(), 2, "HelloOk, the error, then closed");
    let e = &answers[1];
    assert_eq!(e.id, 0);
    assert!(
        matches!(&e.body, Response::Error { code: ErrorCode::BadRequest, message } if message.contains("id 0")),
        "{e:?}"
    );
    relay.stop().await;
}

/// A TLS session from `local` (a loopback address of the test's choice),
/// Hello sent and its answer read.
async fn session_from(
    addr: &RelayAddress,
    local: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{local}:0").parse().expect("local addr"))?;
    let tcp = sock
        .connect(addr.host_port.parse().expect("relay addr"))
        .await?;
    let cfg = sealpost_relay::tls::client_config(addr.pin).expect("cfg");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    tls.write_all(&Request::Hello { version: 1 }.encode(1))
        .await?;
    tls.flush().await?;
    let mut fb = sealpost_proto::relay::FrameBuffer::new();
    let mut buf = [0u8; 256];
    loop {
        if let Some(f) = fb.next_frame().map_err(std::io::Error::other)? {
            match Response::decode(&f).map_err(std::io::Error::other)?.body {
                Response::HelloOk { .. } => return Ok(tls),
                other => return Err(std::io::Error::other(format!("{other:?}"))),
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("no HelloOk"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        fb.extend(&buf[..n]);
    }
}

/// Reads until the relay closes the connection (or `within` passes: then
/// panics), returning what it sent.
async fn closed_within(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    within: Duration,
) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(within, tls.read_to_end(&mut got))
        .await
        .expect("the relay closed the connection in time");
    got
}

/// A stranger's frame heads announcing large frames take no memory before
/// Hello (refused at once), and after Hello the relay-wide byte budget is
/// taken as bytes arrive, not as announced: with a budget of one largest
/// frame, eight announcers that send nothing hold none of it, and an
/// honest client is served at once (a first version took the announced
/// length up front, and the honest client waited for the frame timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_lengths_take_no_memory_before_their_bytes() {
    let relay = start(|c| {
        c.frame_timeout = Duration::from_secs(1);
        c.max_total_in_flight_bytes = 0; // the floor: one largest frame
    })
    .await;
    // Before Hello: a 1 MiB Submit head is refused before its body.
    let cfg = sealpost_relay::tls::client_config(relay.addr.pin).expect("cfg");
    let tcp = TcpStream::connect(&relay.addr.host_port)
        .await
        .expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("tls");
    let len = (sealpost_proto::relay::MAX_FRAME as u32).to_be_bytes();
    tls.write_all(&[len[0], len[1], len[2], len[3], 0x04])
        .await
        .expect("head");
    tls.flush().await.expect("flush");
    let answer = closed_within(&mut tls, Duration::from_millis(500)).await;
    let mut fb = sealpost_proto::relay::FrameBuffer::new();
    fb.extend(&answer);
    let e = fb.next_frame().expect("frame").expect("an error");
    assert!(matches!(
        Response::decode(&e).expect("decodes").body,
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    // A small request type announcing a megabyte: refused before its body.
    let mut tls = session_from(&relay.addr, "127.0.0.1")
        .await
        .expect("session");
    tls.write_all(&[len[0], len[1], len[2], len[3], 0x05])
        .await
        .expect("head");
    tls.flush().await.expect("flush");
    closed_within(&mut tls, Duration::from_millis(500)).await;

    // After Hello: eight announcers of 1 MiB submissions that never send
    // their bodies.
    let mut crowd = Vec::new();
    for _ in 0..8 {
        let mut t = session_from(&relay.addr, "127.0.0.1")
            .await
            .expect("session");
        t.write_all(&[len[0], len[1], len[2], len[3], 0x04, 0, 0, 0, 9])
            .await
            .expect("head");
        t.flush().await.expect("flush");
        crowd.push(t);
    }
    let bob = id(2);
    let c = RelayClient::connect(&relay.addr).await.expect("connect");
    let mb = c.register(&bob).await.expect("register");
    let started = std::time::Instant::now();
    assert!(matches!(
        c.submit(mb, now() + 60, vec![7u8; 4096]).await,
        Ok(Submitted::Accepted { .. })
    ));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    for mut t in crowd {
        closed_within(&mut t, Duration::from_secs(12)).await;
    }
    assert!(relay.metrics.timeouts.load(Ordering::Relaxed) >= 8);
    relay.stop().await;
}

/// A client that sends requests and never reads the answers cannot hold
/// its connection: once its receive window and the relay's queue are
/// full, the relay's writer takes no more than a frame timeout before it
/// closes the connection, and others are served meanwhile. (Before, the
/// connection waited on its full socket for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_no_answers_is_closed() {
    let relay = start(|c| {
        c.frame_timeout = Duration::from_secs(1);
        c.rate_per_connection = (1e9, 1e9);
    })
    .await;
    let mut tls = raw_session(&relay.addr).await;
    // KeyBinding answers are about 40 times the size of the request; the
    // socket buffers on both sides fill after a few megabytes.
    let mut batch = Vec::new();
    for i in 0..1000u32 {
        batch.extend_from_slice(&Request::KeyBinding.encode(i + 2));
    }
    let started = std::time::Instant::now();
    let flood = async {
        loop {
            if let Err(e) = tls.write_all(&batch).await {
                return e;
            }
            if let Err(e) = tls.flush().await {
                return e;
            }
        }
    };
    let honest = async {
        // Served while the flood goes on.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = RelayClient::connect(&relay.addr).await.expect("connect");
        c.register(&id(3)).await.expect("register")
    };
    let (closed, _) = tokio::join!(tokio::time::timeout(Duration::from_secs(30), flood), honest);
    let e = closed.expect("the relay closed the connection of a client that reads nothing");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(relay.metrics.timeouts.load(Ordering::Relaxed) >= 1);
    relay.stop().await;
}

/// One address cannot hold every slot: past its share its connections are
/// refused while another address is still served; and when every slot is
/// taken, the oldest connection that has not authenticated makes room,
/// never an authenticated one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_slot() {
    let relay = start(|c| {
        c.max_connections = 6;
        c.max_connections_per_address = 4;
    })
    .await;
    let mut hog = Vec::new();
    for _ in 0..4 {
        hog.push(
            session_from(&relay.addr, "127.0.0.1")
                .await
                .expect("within the share"),
        );
    }
    assert!(session_from(&relay.addr, "127.0.0.1").await.is_err());
    assert!(relay.metrics.refused_per_address.load(Ordering::Relaxed) >= 1);
    // Another address fills the last two slots; a third connection from
    // it evicts the oldest unauthenticated one (the hog's first).
    let mut other = Vec::new();
    for _ in 0..2 {
        other.push(session_from(&relay.addr, "127.0.0.2").await.expect("slot"));
    }
    let mut evicted = hog.remove(0);
    let newcomer = session_from(&relay.addr, "127.0.0.2")
        .await
        .expect("made room");
    closed_within(&mut evicted, Duration::from_secs(2)).await;
    assert_eq!(relay.metrics.evicted.load(Ordering::Relaxed), 1);
    drop((hog, other, newcomer));

    // Authenticated connections are never evicted: four owners (the
    // client's address's share) and two strangers fill the relay; a third
    // stranger evicts a stranger, and every owner keeps its connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut owners = Vec::new();
    for i in 0..4u8 {
        let c = RelayClient::connect(&relay.addr).await.expect("connect");
        c.register(&id(10 + i)).await.expect("register");
        owners.push(c);
    }
    let mut strangers = Vec::new();
    for _ in 0..2 {
        strangers.push(session_from(&relay.addr, "127.0.0.2").await.expect("slot"));
    }
    let _third = session_from(&relay.addr, "127.0.0.2")
        .await
        .expect("made room");
    closed_within(&mut strangers[0], Duration::from_secs(2)).await;
    assert_eq!(relay.metrics.evicted.load(Ordering::Relaxed), 2);
    for c in &owners {
        assert!(c.status().await.is_ok(), "owners keep their connections");
    }
    relay.stop().await;
}

/// Two relays on one data directory: the second is refused with words
/// that say why, and the first keeps its store to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_serves_one_relay_at_a_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = || {
        let mut c = Config::new(
            "127.0.0.1:0".parse().expect("addr"),
            dir.path().join("data"),
        );
        backend::on_backend(&mut c);
        c
    };
    let first = Relay::bind(cfg()).await.expect("bind");
    let e = Relay::bind(cfg())
        .await
        .expect_err("a second relay on the same data");
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    assert!(e.to_string().contains("another relay is running"), "{e}");
    drop(first);
    Relay::bind(cfg())
        .await
        .expect("free again once the first is gone");
}

/// A relay killed during its first start (between its key and its
/// certificate, or with its signing key created but not written, as
/// earlier versions could be) starts next time, with a whole new set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_cut_short_is_recovered() {
    if backend::skipped_on_cluster(
        "a_first_start_cut_short_is_recovered",
        "it checks the embedded store's files in the data directory",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("key.pem"), b"-----BEGIN PRIVATE KEY-----\nAAAA").expect("half key");
    std::fs::write(data.join("relay-signing.key"), b"").expect("empty key");
    std::fs::write(data.join(".cert.pem.tmp"), b"half").expect("left-over temporary file");
    let relay = Relay::bind(Config::new(
        "127.0.0.1:0".parse().expect("addr"),
        data.clone(),
    ))
    .await
    .expect("starts after a cut-short first start");
    assert!(relay.created_cert());
    let pin = relay.pin();
    drop(relay);
    for f in ["key.pem", "cert.pem", "relay-signing.key"] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(data.join(f)).expect("written");
        assert!(m.len() > 0, "{f}");
        assert_eq!(m.permissions().mode() & 0o077, 0, "{f} is private");
    }
    // The data directory, the store and its database too.
    for p in ["", "store", "store/blobs", "store/relay.db"] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(data.join(p)).expect("exists");
        assert_eq!(m.permissions().mode() & 0o077, 0, "{p:?} is private");
    }
    // And a whole set is kept as it is.
    let again = Relay::bind(Config::new("127.0.0.1:0".parse().expect("addr"), data))
        .await
        .expect("restart");
    assert!(!again.created_cert());
    assert_eq!(again.pin(), pin);
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(
            ok.success(),
            "mounting a tmpfs needs root (run as .ci/run does)"
        );
        Self { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// The relay's disk fills up: submissions are refused with words that say
/// so ("the relay's disk is full"), counted, nothing is acknowledged that
/// was not stored, and once the owner fetched and deleted items the relay
/// takes new ones again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a small tmpfs; run with --ignored, as .ci/run does"]
async fn a_full_disk_is_said_in_words_and_recovered_from() {
    if backend::skipped_on_cluster(
        "a_full_disk_is_said_in_words_and_recovered_from",
        "it fills the embedded store's disk (PostgreSQL's full disk is a conformance test of the store)",
    ) {
        return;
    }
    let disk = SmallDisk::mount("3m");
    // 3 MiB of disk, 512 KiB of it kept for deletes.
    let relay = start_in(disk.dir.path().join("data"), |c| {
        c.limits.min_free_space = 512 << 10;
    })
    .await;
    let bob = id(2);
    let c = RelayClient::connect(&relay.addr).await.expect("connect");
    let mb = c.register(&bob).await.expect("register");
    let mut accepted = 0u32;
    let full = loop {
        match c
            .submit(mb, now() + 600, vec![accepted as u8; 64 * 1024])
            .await
        {
            Ok(Submitted::Accepted { .. }) => accepted += 1,
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
        assert!(accepted < 100, "3 MiB never filled");
    };
    assert!(
        matches!(&full, ClientError::Server { code: ErrorCode::Internal, message } if message.contains("disk is full")),
        "{full:?}"
    );
    assert!(relay.metrics.storage_errors.load(Ordering::Relaxed) >= 1);
    // Everything acknowledged is there, and the owner can clear it.
    let mut seqs = Vec::new();
    loop {
        let (items, more) = c
            .fetch(seqs.last().copied().unwrap_or(0), 1000)
            .await
            .expect("fetch");
        seqs.extend(items.iter().map(|i| i.seq));
        if !more {
            break;
        }
    }
    assert_eq!(seqs.len() as u32, accepted);
    c.ack(seqs).await.expect("ack");
    let again = c.submit(mb, now() + 600, vec![9; 64 * 1024]).await;
    assert!(matches!(again, Ok(Submitted::Accepted { .. })), "{again:?}");
    relay.stop().await;
}

/// Eviction takes the oldest *idle* unauthenticated connection: a sender
/// in the middle of a request (here, half a submission) is passed over for
/// a younger idle one, and finishes its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_sender_is_not_evicted() {
    let relay = start(|c| {
        c.max_connections = 2;
        c.frame_timeout = Duration::from_secs(10);
    })
    .await;
    let mut busy = session_from(&relay.addr, "127.0.0.1").await.expect("busy");
    let frame = Request::Submit {
        mailbox: MailboxId([9; 32]),
        expires_at: now() + 60,
        payload_hash: *blake3::hash(&[1u8; 4000]).as_bytes(),
        payload: vec![1u8; 4000],
    }
    .encode(2);
    busy.write_all(&frame[..1000]).await.expect("first half");
    busy.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut idle = session_from(&relay.addr, "127.0.0.2").await.expect("idle");
    let _newcomer = session_from(&relay.addr, "127.0.0.3")
        .await
        .expect("made room");
    closed_within(&mut idle, Duration::from_secs(2)).await;
    // The busy one is still there: it finishes and is answered.
    busy.write_all(&frame[1000..]).await.expect("rest");
    busy.flush().await.expect("flush");
    let mut fb = sealpost_proto::relay::FrameBuffer::new();
    let mut buf = [0u8; 4096];
    let answer = loop {
        if let Some(f) = fb.next_frame().expect("frame") {
            break Response::decode(&f).expect("decodes").body;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), busy.read(&mut buf))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(n > 0, "the busy sender was closed");
        fb.extend(&buf[..n]);
    };
    assert!(matches!(answer, Response::Refused(_)), "{answer:?}");
    relay.stop().await;
}

/// Registration policies: closed, allow-list and a cap refuse new
/// mailboxes with their own error, and never an existing owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_policies_and_the_cap() {
    let refused = |r: Result<MailboxId, sealpost_relay::client::ClientError>| {
        matches!(
            r,
            Err(sealpost_relay::client::ClientError::Server {
                code: ErrorCode::RegistrationRefused,
                ..
            })
        )
    };
    // A cap of two: the third key is refused, the first two may register
    // again.
    let dir = tempfile::tempdir().expect("tmp");
    let relay = start_in(dir.path().to_path_buf(), |c| {
        c.limits.max_mailboxes = Some(2)
    })
    .await;
    let c = RelayClient::connect(&relay.addr).await.expect("connect");
    c.register(&id(1)).await.expect("first");
    c.register(&id(2)).await.expect("second");
    assert!(refused(c.register(&id(3)).await));
    c.register(&id(1))
        .await
        .expect("an existing owner registers again");
    assert_eq!(
        relay.metrics.registrations_refused.load(Ordering::Relaxed),
        1
    );
    drop(c);
    relay.stop().await;
    // Closed: no new mailbox; the ones made before go on.
    let relay = start_in(dir.path().to_path_buf(), |c| {
        c.registration = sealpost_relay::Registration::Closed
    })
    .await;
    let c = RelayClient::connect(&relay.addr).await.expect("connect");
    assert!(refused(c.register(&id(4)).await));
    c.register(&id(2)).await.expect("existing");
    c.auth(&id(1)).await.expect("existing auth");
    relay.stop().await;
    // An allow-list: only its keys.
    let allowed: std::collections::HashSet<[u8; 32]> =
        [*id(5).public().signing_bytes()].into_iter().collect();
    let relay =
        start(move |c| c.registration = sealpost_relay::Registration::AllowList(allowed)).await;
    let c = RelayClient::connect(&relay.addr).await.expect("connect");
    c.register(&id(5)).await.expect("allowed");
    assert!(refused(c.register(&id(6)).await));
    relay.stop().await;
}

/// A stranger flooding a mailbox from one address fills its share of the
/// quota and no more (items and blobs alike, refused with a signed
/// over-quota); a sender from another address still gets in; the owner's
/// acks give the stranger its room back. (Issue 21, finding 4.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_from_one_address_fills_only_its_share_of_a_mailbox() {
    let relay = start(|c| {
        c.limits.mailbox_quota = 10_000;
        c.limits.source_share_percent = 50;
    })
    .await;
    let from = |ip: &str| {
        let ip = ip.parse().expect("ip");
        let addr = relay.addr.clone();
        async move {
            RelayClient::connect_from(&addr, Some(ip), Default::default())
                .await
                .expect("connect")
        }
    };
    let owner = from("127.0.0.1").await;
    let bob = id(2);
    let mb = owner.register(&bob).await.expect("register");
    let stranger = from("127.0.0.2").await;
    let mut accepted = 0;
    let refusal = loop {
        match stranger
            .submit(mb, now() + 600, vec![7; 1000])
            .await
            .expect("answer")
        {
            Submitted::Accepted { .. } => accepted += 1,
            Submitted::Refused(r) => break r,
        }
        assert!(accepted <= 10, "the stranger filled the whole mailbox");
    };
    assert_eq!(accepted, 5, "half of 10,000 bytes in 1,000-byte items");
    assert_eq!(refusal.code, RefusalCode::OverQuota);
    assert!(refusal.verify(stranger.relay_key()));
    // Another connection from the same address shares the share, for
    // blobs too.
    let again = from("127.0.0.2").await;
    let piece = BlobPiece {
        blob_id: BlobId([3; 16]),
        mailbox: mb,
        total_len: 100,
        blob_hash: [0; 32],
        expires_at: now() + 600,
        offset: 0,
        data: vec![1; 50],
    };
    match again.blob_put(piece.clone()).await.expect("answer") {
        Err(Submitted::Refused(r)) => assert_eq!(r.code, RefusalCode::OverQuota),
        other => panic!("{other:?}"),
    }
    // A sender from elsewhere is taken, message and file.
    let friend = from("127.0.0.3").await;
    assert!(matches!(
        friend
            .submit(mb, now() + 600, vec![1; 1000])
            .await
            .expect("answer"),
        Submitted::Accepted { .. }
    ));
    assert!(matches!(
        friend.blob_put(piece).await.expect("answer"),
        Ok((50, false))
    ));
    // The owner takes two of the stranger's items: room for two more.
    let (items, _) = owner.fetch(0, 2).await.expect("fetch");
    owner
        .ack(items.iter().map(|i| i.seq).collect())
        .await
        .expect("ack");
    for _ in 0..2 {
        assert!(matches!(
            stranger
                .submit(mb, now() + 600, vec![7; 1000])
                .await
                .expect("answer"),
            Submitted::Accepted { .. }
        ));
    }
    assert!(matches!(
        stranger
            .submit(mb, now() + 600, vec![7; 1000])
            .await
            .expect("answer"),
        Submitted::Refused(_)
    ));
    relay.stop().await;
}

/// A relay that forges one kind of refusal for every submission.
#[derive(Debug)]
struct Forger(sealpost_relay::tamper::ForgedRefusal);

impl sealpost_relay::tamper::Tamper for Forger {
    fn submit(&self, _: &MailboxId, _: &[u8; 32], _: &[u8]) -> sealpost_relay::tamper::OnSubmit {
        sealpost_relay::tamper::OnSubmit::Forge(self.0)
    }
    fn fetch(&self, _: &MailboxId, _: &mut Vec<sealpost_proto::relay::Item>) -> Vec<u64> {
        Vec::new()
    }
    fn blob_put(
        &self,
        _: &BlobId,
        _: &MailboxId,
        _: u64,
    ) -> Option<sealpost_relay::tamper::ForgedRefusal> {
        None
    }
    fn blob_data(&self, _: &MailboxId, _: &BlobId, _: u64, _: &mut Vec<u8>) {}
}

/// A refusal is the relay's word only if its key signed it over this very
/// submission; the client says which of the two a forged one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_refusals_are_told_apart() {
    use sealpost_relay::client::Forged;
    use sealpost_relay::tamper::ForgedRefusal;
    for (how, why) in [
        (ForgedRefusal::OtherKey, Forged::NotSigned),
        (ForgedRefusal::OtherHash, Forged::OtherSubmission),
        (ForgedRefusal::OtherMailbox, Forged::OtherSubmission),
    ] {
        let relay = start(|c| c.tamper = Some(std::sync::Arc::new(Forger(how)))).await;
        let owner = RelayClient::connect(&relay.addr).await.expect("connect");
        let mb = owner.register(&id(2)).await.expect("register");
        let sender = RelayClient::connect(&relay.addr).await.expect("connect");
        let r = sender.submit(mb, now() + 60, b"hello".to_vec()).await;
        match r {
            Err(ClientError::ForgedRefusal(w)) => {
                assert_eq!(w, why, "{how:?}");
                let text = ClientError::ForgedRefusal(w).to_string();
                let expected = match why {
                    Forged::NotSigned => "not signed by the relay's key",
                    Forged::OtherSubmission => "names another submission",
                };
                assert!(text.contains(expected), "{text}");
            }
            other => panic!("{how:?}: {other:?}"),
        }
        relay.stop().await;
    }
}

/// The relay serves from any store it is handed (here the in-memory
/// ledger and blob store): a submission is pushed to the subscribed owner
/// through the store's notifier, fetched and acknowledged, a blob stored
/// and read back. Nodes given the same signing key file sign with one
/// key; a named key file that is missing stops the start, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_runs_on_any_store_and_shares_its_signing_key() {
    use sealpost_store::memory::{MemBlobs, MemLedger};
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tmp");
    let key_file = dir.path().join("shared-signing.key");
    std::fs::write(&key_file, [7u8; 32]).expect("key");
    let cfg = |name: &str| {
        let mut c = Config::new("127.0.0.1:0".parse().expect("addr"), dir.path().join(name));
        c.signing_key_file = Some(key_file.clone());
        c
    };
    let c = cfg("memory-node");
    let store = sealpost_store::Store::new(
        Arc::new(MemLedger::new(c.limits)),
        Arc::new(MemBlobs::default()),
        Arc::new(sealpost_store::LocalNotifier::default()),
        c.limits,
        "memory".into(),
    );
    let on_memory = Relay::bind_with(c, store).await.expect("bind");
    let embedded = Relay::bind(cfg("disk-node")).await.expect("bind");
    let expected = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    assert_eq!(on_memory.relay_key(), expected);
    assert_eq!(embedded.relay_key(), expected);
    drop(embedded);

    let relay = on_memory.spawn();
    let addr = relay.address().clone();
    let bob = id(2);
    let rx = RelayClient::connect(&addr).await.expect("connect");
    let mb = rx.register(&bob).await.expect("register");
    let mut notes = rx.subscribe().await.expect("subscribe");
    let tx = RelayClient::connect(&addr).await.expect("connect");
    for i in 0..3u8 {
        let r = tx
            .submit(mb, now() + 3600, vec![i; 100])
            .await
            .expect("submit");
        assert!(matches!(r, Submitted::Accepted { .. }), "{r:?}");
    }
    let pushed = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .expect("pushed through the store's notifier");
    assert!(pushed.is_some());
    let (items, more) = rx.fetch(0, 10).await.expect("fetch");
    assert_eq!((items.len(), more), (3, false));
    assert_eq!(items[2].payload, vec![2; 100]);
    let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let piece = BlobPiece {
        blob_id: BlobId([4; 16]),
        mailbox: mb,
        total_len: 3000,
        blob_hash: *blake3::hash(&data).as_bytes(),
        expires_at: now() + 3600,
        offset: 0,
        data: data.clone(),
    };
    assert_eq!(
        tx.blob_put(piece).await.expect("put").expect("stored"),
        (3000, true)
    );
    assert_eq!(
        rx.blob_get(BlobId([4; 16]), 0, 5000).await.expect("get"),
        data
    );
    let seqs = items.iter().map(|i| i.seq).collect();
    assert_eq!(rx.ack(seqs).await.expect("ack"), 3);
    relay.stop().await.expect("stop");

    let mut missing = cfg("third-node");
    missing.signing_key_file = Some(dir.path().join("no-such.key"));
    let e = Relay::bind(missing).await.expect_err("a missing key file");
    assert!(e.to_string().contains("no-such.key"), "{e}");
}
