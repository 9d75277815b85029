//! `sealpost demo`: the sealed layer's guarantees, shown one by one on real
//! files in a temporary directory. Every refusal the demo provokes must be
//! the expected one, or the demo fails; it doubles as a smoke test.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context};
use rand_core::{OsRng, RngCore, SeedableRng};
use sealpost_agent::link::RelayLink;
use sealpost_agent::{Agent, Home, ReceiveError};
use sealpost_proto::blob::DEFAULT_CHUNK_SIZE;
use sealpost_proto::message::{self, testing};
use sealpost_proto::relay::{BlobPiece, MailboxId};
use sealpost_proto::{Kind, OpenError, PublicIdentity};
use sealpost_relay::client::Submitted;
use serde_json::json;

use crate::exit::{open_class, Failure};
use crate::output::Out;

struct Demo<'a> {
    out: &'a Out,
    checks: Vec<serde_json::Value>,
    failed: usize,
}

impl Demo<'_> {
    fn say(&self, text: &str) {
        if !self.out.json() {
            println!("{text}");
        }
    }

    /// Records the outcome of one guarantee check.
    fn check(&mut self, what: &str, expected: &str, got: Result<String, String>) {
        let (ok, detail) = match &got {
            Ok(d) => (expected == "accepted", d.clone()),
            Err(class_and_msg) => (class_and_msg.starts_with(expected), class_and_msg.clone()),
        };
        if !ok {
            self.failed += 1;
        }
        self.say(&format!(
            "  {} {what}\n      {}",
            if ok { "ok  " } else { "FAIL" },
            detail
        ));
        self.checks
            .push(json!({"check": what, "expected": expected, "ok": ok, "detail": detail}));
    }
}

fn now() -> u64 {
    super::now()
}

fn refused(e: ReceiveError) -> String {
    match e {
        ReceiveError::Open(o) => {
            let (_, class) = open_class(&o);
            format!("{class}: refused: {o}")
        }
        ReceiveError::Agent(a) => format!("error: {a}"),
    }
}

fn receive(
    agent: &Agent,
    sealed: &Path,
    spool: &Path,
) -> Result<sealpost_agent::Received, ReceiveError> {
    let f = File::open(sealed).map_err(|e| {
        ReceiveError::Open(OpenError::Io {
            context: "reading the demo file",
            source: e,
        })
    })?;
    agent.receive(BufReader::new(f), spool, now())
}

/// A delivery attempt whose outcome is a check: "accepted", or the class
/// and message of the refusal.
fn attempt(agent: &Agent, sealed: &Path, spool: &Path) -> Result<String, String> {
    receive(agent, sealed, spool)
        .map(|_| "accepted".into())
        .map_err(refused)
}

fn seal_text(from: &Agent, to: &[PublicIdentity], text: &[u8], path: &Path) -> anyhow::Result<()> {
    let f = File::create(path)?;
    from.seal(
        to,
        Kind::Message,
        3600,
        now(),
        &mut OsRng,
        text,
        Some(text.len() as u64),
        BufWriter::new(f),
    )?;
    Ok(())
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9)
}

pub fn run(size_mib: u64, out: &Out) -> Result<(), Failure> {
    let dir = tempfile::Builder::new()
        .prefix("sealpost-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let d = dir.path();
    let mut demo = Demo {
        out,
        checks: Vec::new(),
        failed: 0,
    };
    demo.say(&format!("sealpost demo, in {}\n", d.display()));

    // 1. Identities and contacts.
    let mut alice = Home::new(d.join("alice")).init("Alice", &mut OsRng, now())?;
    let mut bob = Home::new(d.join("bob")).init("Bob", &mut OsRng, now())?;
    let mut carol = Home::new(d.join("carol")).init("Carol", &mut OsRng, now())?;
    let mallory = Home::new(d.join("mallory")).init("Mallory", &mut OsRng, now())?;
    demo.say("1. Identities: each is an Ed25519 signing key and an X25519 (age) encryption key.");
    for a in [&alice, &bob, &carol, &mallory] {
        demo.say(&format!(
            "     {:<8} {}",
            a.card().name(),
            a.identity().fingerprint()
        ));
    }
    let (alice_card, bob_card, mallory_card) = (
        alice.card().clone(),
        bob.card().clone(),
        mallory.card().clone(),
    );
    alice.db_mut().add_contact("bob", &bob_card, false, now())?;
    alice
        .db_mut()
        .add_contact("carol", &carol.card().clone(), false, now())?;
    bob.db_mut()
        .add_contact("alice", &alice_card, false, now())?;
    carol
        .db_mut()
        .add_contact("alice", &alice_card, false, now())?;
    carol.db_mut().add_contact("bob", &bob_card, false, now())?;
    demo.say("2. Contacts: Alice and Bob exchange cards and pin each other's keys.");
    let impostor = mallory_card.clone();
    demo.check(
        "Mallory offers her key under Bob's name: the pinned key wins",
        "identity",
        match alice.db_mut().add_contact("bob", &impostor, false, now()) {
            Ok(_) => Ok("accepted".into()),
            Err(e) => Err(format!("identity: {e}")),
        },
    );

    // The relay: on 127.0.0.1, with its own data directory.
    let net = Net::start(&d.join("relay"))?;
    demo.say(&format!(
        "3. A relay on {} (TLS 1.3, key pinned as {}…); it stores and forwards, and sees no content.",
        net.addr.host_port,
        &net.addr.pin.to_text()[..16]
    ));
    let mut alice_link = RelayLink::new(net.addr.clone()).with_backoff(RelayLink::fast_backoff());
    let mut bob_link = RelayLink::new(net.addr.clone()).with_backoff(RelayLink::fast_backoff());
    net.rt
        .block_on(bob_link.call(bob.identity(), async |c| c.status().await))
        .context("Bob cannot reach the relay")?;
    let bob_mailbox = MailboxId::of(bob_card.public().signing_bytes());
    let mallory_mailbox = MailboxId::of(mallory_card.public().signing_bytes());
    let refused_by_relay = net
        .rt
        .block_on(alice_link.call(alice.identity(), async |c| {
            c.submit(mallory_mailbox, now() + 60, b"x".to_vec()).await
        }));
    demo.check(
        "a submission for a mailbox the relay does not have: refused with the relay's signature",
        "refused",
        match refused_by_relay {
            Ok(Submitted::Refused(r)) => Err(format!(
                "refused: {} (signature verified against the relay's key)",
                r.code.describe()
            )),
            Ok(Submitted::Accepted { .. }) => Ok("accepted".into()),
            Err(e) => Err(format!("error: {e}")),
        },
    );

    // A message.
    demo.say("4. A message from Alice to Bob through the relay:");
    let to_bob = [*bob_card.public()];
    let msg = d.join("message.sealed");
    let text = b"Bob, the keys to the archive are in the usual place. -- Alice\n";
    seal_text(&alice, &to_bob, text, &msg)?;
    let inbox = d.join("bob-inbox");
    fs::create_dir(&inbox).context("mkdir")?;
    let sealed_bytes = fs::read(&msg).context("read")?;
    let t = Instant::now();
    match net
        .rt
        .block_on(alice_link.call(alice.identity(), async |c| {
            c.submit(bob_mailbox, now() + 3600, sealed_bytes.clone())
                .await
        })) {
        Ok(Submitted::Accepted { .. }) => {}
        other => return Err(anyhow!("the relay did not take the message: {other:?}").into()),
    }
    let (items, _) = net
        .rt
        .block_on(bob_link.call(bob.identity(), async |c| c.fetch(0, 100).await))
        .context("Bob cannot fetch")?;
    let item = items
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("the message is not at the relay"))?;
    let fetched = inbox.join("fetched.sealed");
    fs::write(&fetched, &item.payload).context("write")?;
    demo.say(&format!(
        "     accepted by the relay only after it was on disk; Bob fetched it ({} bytes) in {:.1} ms",
        item.payload.len(),
        t.elapsed().as_secs_f64() * 1000.0
    ));
    match receive(&bob, &fetched, &inbox) {
        Ok(r) => {
            let content = fs::read(r.content.path()).context("read")?;
            let ok = content == text;
            bob.mark_delivered(&r.opened, now())?;
            // Only now, with the message safe on Bob's side, may the relay
            // forget it.
            net.rt
                .block_on(bob_link.call(bob.identity(), async |c| c.ack(vec![item.seq]).await))
                .context("ack")?;
            let detail = format!(
                "from {} ({}), id {}, {} bytes, content hash {}",
                r.sender.name,
                r.opened.header.sender.fingerprint(),
                r.opened.header.id,
                r.opened.content_len,
                &r.opened.content_hash.to_hex()[..16]
            );
            demo.check(
                "Bob opens it: decrypted, signature verified, sender is his pinned Alice",
                if ok { "accepted" } else { "content-mismatch" },
                Ok(detail),
            );
        }
        Err(e) => demo.check("Bob opens it", "accepted", Err(refused(e))),
    }

    // A file, as manifest + chunked blob.
    let size = size_mib * 1024 * 1024;
    demo.say(&format!(
        "5. A {size_mib} MiB file from Alice to Bob: a sealed manifest plus a blob of {} KiB AEAD chunks:",
        DEFAULT_CHUNK_SIZE / 1024
    ));
    let src = d.join("archive.bin");
    {
        let mut rng = rand_chacha::ChaCha8Rng::from_rng(OsRng).map_err(|e| anyhow!("{e}"))?;
        let mut w = BufWriter::new(File::create(&src).context("create")?);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill_bytes(&mut buf[..n]);
            w.write_all(&buf[..n]).context("write")?;
            left -= n as u64;
        }
        w.flush().context("flush")?;
    }
    let blob_path = d.join("archive.blob");
    let manifest_path = d.join("archive.manifest.sealed");
    let t = Instant::now();
    let (manifest, _) = alice.seal_file(
        &to_bob,
        "archive.bin",
        BufReader::with_capacity(1 << 20, File::open(&src).context("open")?),
        BufWriter::with_capacity(1 << 20, File::create(&blob_path).context("create")?),
        File::create(&manifest_path).context("create")?,
        3600,
        now(),
        &mut OsRng,
    )?;
    let seal_s = t.elapsed().as_secs_f64();
    demo.say(&format!(
        "     sealed in {seal_s:.2} s ({:.0} MiB/s): {} chunks, blob {} bytes",
        mib_per_s(size, seal_s),
        manifest.layout.chunk_count(),
        manifest.layout.blob_len()
    ));
    // Upload: the blob in 1 MiB pieces, then the manifest as a message.
    let t = Instant::now();
    // The blob's hash, stated by the last piece, is learnt on the way.
    let mut blob_hash = blake3::Hasher::new();
    let blob_len = manifest.layout.blob_len();
    let blob_id = manifest.blob_id;
    {
        let mut f = File::open(&blob_path).context("open")?;
        let mut off = 0u64;
        let mut piece = vec![0u8; 1 << 20];
        while off < blob_len {
            let n = (blob_len - off).min(piece.len() as u64) as usize;
            f.seek(SeekFrom::Start(off))
                .and_then(|_| f.read_exact(&mut piece[..n]))
                .context("read blob")?;
            let data = piece[..n].to_vec();
            blob_hash.update(&data);
            let stated = if off + n as u64 == blob_len {
                *blob_hash.finalize().as_bytes()
            } else {
                [0; 32]
            };
            let r = net
                .rt
                .block_on(alice_link.call(alice.identity(), async |c| {
                    c.blob_put(BlobPiece {
                        blob_id,
                        mailbox: bob_mailbox,
                        total_len: blob_len,
                        blob_hash: stated,
                        expires_at: now() + 3600,
                        offset: off,
                        data: data.clone(),
                    })
                    .await
                }));
            match r {
                Ok(Ok((stored, _))) if stored == off + n as u64 => off = stored,
                other => return Err(anyhow!("the relay did not take the blob: {other:?}").into()),
            }
        }
        let m = fs::read(&manifest_path).context("read")?;
        match net
            .rt
            .block_on(alice_link.call(alice.identity(), async |c| {
                c.submit(bob_mailbox, now() + 3600, m.clone()).await
            })) {
            Ok(Submitted::Accepted { .. }) => {}
            other => return Err(anyhow!("the relay did not take the manifest: {other:?}").into()),
        }
    }
    let up_s = t.elapsed().as_secs_f64();
    // Download: the manifest message, then the blob by ranges.
    let t = Instant::now();
    let (items, _) = net
        .rt
        .block_on(bob_link.call(bob.identity(), async |c| c.fetch(0, 100).await))
        .context("fetch")?;
    let manifest_item = items
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("the manifest is not at the relay"))?;
    let fetched_manifest = inbox.join("manifest.sealed");
    fs::write(&fetched_manifest, &manifest_item.payload).context("write")?;
    let spool = d.join("bob-spool");
    fs::create_dir(&spool).context("mkdir")?;
    let downloaded = spool.join("archive.blob");
    {
        let mut f = BufWriter::with_capacity(1 << 20, File::create(&downloaded).context("create")?);
        let mut off = 0u64;
        while off < blob_len {
            let part = net
                .rt
                .block_on(bob_link.call(bob.identity(), async |c| {
                    c.blob_get(blob_id, off, 1 << 20).await
                }))
                .context("download")?;
            if part.is_empty() {
                return Err(anyhow!("the relay's blob ends early").into());
            }
            f.write_all(&part).context("write")?;
            off += part.len() as u64;
        }
        f.into_inner()
            .map_err(|e| anyhow!("{e}"))?
            .sync_all()
            .context("fsync")?;
    }
    let down_s = t.elapsed().as_secs_f64();
    demo.say(&format!(
        "     uploaded through the relay in {up_s:.2} s ({:.0} MiB/s), downloaded by Bob in {down_s:.2} s ({:.0} MiB/s), every piece fsync'd at the relay",
        mib_per_s(blob_len, up_s),
        mib_per_s(blob_len, down_s)
    ));
    let blob_path = downloaded;
    let downloads = d.join("bob-downloads");
    fs::create_dir(&downloads).context("mkdir")?;
    let manifest_msg = receive(&bob, &fetched_manifest, &inbox);
    let manifest_msg = match manifest_msg {
        Ok(m) => m,
        Err(e) => {
            demo.check("Bob opens the file's manifest", "accepted", Err(refused(e)));
            net.stop();
            return finish(demo, out);
        }
    };
    // First a copy damaged in transit or at rest: one bit in the middle.
    let bad_blob = d.join("archive.tampered.blob");
    fs::copy(&blob_path, &bad_blob).context("copy")?;
    let chunk = manifest.layout.chunk_count() / 2;
    flip_bit(
        &bad_blob,
        manifest.layout.offset(chunk) + manifest.layout.sealed_len(chunk) / 2,
    )?;
    let got = File::open(&bad_blob).context("open")?;
    let got = bob
        .receive_file(&manifest_msg, got, &downloads)
        .map(|_| "accepted".to_string())
        .map_err(refused);
    let leftover = fs::read_dir(&downloads).map(|r| r.count()).unwrap_or(0);
    demo.check(
        &format!("a copy of the blob with one bit flipped in chunk {chunk}: refused with the chunk named; files left in the download directory: {leftover}"),
        &format!("tampered: refused: tampered: chunk {chunk}"),
        got,
    );
    // Then the intact blob.
    let t = Instant::now();
    let result = File::open(&blob_path)
        .map_err(|e| {
            OpenError::Io {
                context: "reading the blob",
                source: e,
            }
            .into()
        })
        .and_then(|f| bob.receive_file(&manifest_msg, f, &downloads));
    let open_s = t.elapsed().as_secs_f64();
    match result {
        Ok((m, path)) => {
            bob.mark_delivered(&manifest_msg.opened, now())?;
            net.rt
                .block_on(bob_link.call(bob.identity(), async |c| {
                    c.ack(vec![manifest_item.seq]).await?;
                    c.blob_delete(blob_id).await
                }))
                .context("ack")?;
            let stored = blake3::Hasher::new()
                .update_reader(File::open(&path).context("reopen")?)
                .context("hash")?
                .finalize();
            demo.check(
                "the intact blob: every chunk authenticated, the stored copy hashes to the signed BLAKE3",
                if stored == m.plaintext_hash { "accepted" } else { "hash-mismatch" },
                Ok(format!(
                    "{} written and fsync'd in {open_s:.2} s ({:.0} MiB/s), BLAKE3 {}",
                    path.display(),
                    mib_per_s(size, open_s),
                    &stored.to_hex()[..16]
                )),
            );
        }
        Err(e) => demo.check("the intact blob", "accepted", Err(refused(e))),
    }
    drop(manifest_msg);

    demo.say("6. What an attacker or a broken relay might do, and how each is caught:");
    // A flipped bit in the sealed message.
    let bad_msg = d.join("message.tampered.sealed");
    fs::copy(&msg, &bad_msg).context("copy")?;
    let len = fs::metadata(&bad_msg).context("stat")?.len();
    flip_bit(&bad_msg, len - 30)?;
    demo.check(
        "one bit flipped in the sealed message",
        "tampered",
        attempt(&bob, &bad_msg, &inbox),
    );
    // Cut short.
    let cut = d.join("message.cut.sealed");
    let bytes = fs::read(&msg).context("read")?;
    fs::write(&cut, &bytes[..bytes.len() - 40]).context("write")?;
    demo.check(
        "the sealed message cut short by 40 bytes",
        "truncated",
        attempt(&bob, &cut, &inbox),
    );
    // Someone else.
    demo.check(
        "Carol tries to open Bob's message",
        "not-for-me",
        attempt(&carol, &msg, &inbox),
    );
    // Surreptitious forwarding: Bob re-encrypts Alice's signed plaintext to Carol.
    let plain = testing::decrypt_plaintext(bob.identity(), &bytes)
        .ok_or_else(|| anyhow!("bob cannot decrypt the demo message"))?;
    let fwd = d.join("message.forwarded.sealed");
    fs::write(
        &fwd,
        testing::seal_plaintext(&[*carol.card().public()], &plain),
    )
    .context("write")?;
    demo.check(
        "Bob re-encrypts Alice's signed message to Carol, to make it look as if Alice wrote to her",
        "forwarded",
        attempt(&carol, &fwd, &inbox),
    );
    // Replay.
    demo.check(
        "the same message delivered to Bob a second time",
        "replayed",
        attempt(&bob, &msg, &inbox),
    );
    // Stale.
    let stale = d.join("message.stale.sealed");
    {
        let created = now() - 7200;
        let req = sealpost_proto::SealRequest {
            kind: Kind::Message,
            id: sealpost_proto::MessageId::random(&mut OsRng),
            created_at: created,
            expires_at: created + 3600,
            in_reply_to: None,
            reply_relay: None,
            recipients: &to_bob,
            pad_for_len: Some(8),
        };
        let v = message::seal_to_vec(alice.identity(), &req, b"old news")
            .map_err(|e| anyhow!("{e}"))?;
        fs::write(&stale, v).context("write")?;
    }
    demo.check(
        "a message that expired an hour ago",
        "expired",
        attempt(&bob, &stale, &inbox),
    );
    // Unknown sender.
    let from_mallory = d.join("message.mallory.sealed");
    seal_text(&mallory, &to_bob, b"I am Alice, trust me", &from_mallory)?;
    demo.check(
        "Mallory (not a contact) writes to Bob",
        "unknown-sender",
        attempt(&bob, &from_mallory, &inbox),
    );

    delivery(&mut demo, &net, d)?;
    pairing(&mut demo, &net, d)?;
    net.stop();
    finish(demo, out)
}

/// Section 8: two people pair with a short code read aloud instead of
/// copying cards and comparing fingerprints; a guess fails on both sides.
fn pairing(demo: &mut Demo<'_>, net: &Net, d: &Path) -> Result<(), Failure> {
    use sealpost_agent::engine;
    use sealpost_relay::client::RelayClient;
    demo.say(
        "8. Pairing by code: Dave and Erin pair with a code read aloud, not by copying cards:",
    );
    let pin = engine::pin_of(&net.addr);
    let addr = net.addr.to_string();
    let mut homes = Vec::new();
    for name in ["Dave", "Erin"] {
        let mut a = Home::new(d.join(name.to_lowercase())).init(name, &mut OsRng, now())?;
        a.set_home_relay(&addr, pin.clone(), now())?;
        homes.push(a);
    }
    let mut erin = homes.pop().ok_or_else(|| anyhow!("erin"))?;
    let mut dave = homes.pop().ok_or_else(|| anyhow!("dave"))?;
    let (dave_fp, erin_fp) = (dave.identity().fingerprint(), erin.identity().fingerprint());
    let relay_err = |e| anyhow!("the demo relay: {e}");
    let r = net.rt.block_on(async {
        let cd = RelayClient::connect(&net.addr).await.map_err(relay_err)?;
        cd.register(dave.identity()).await.map_err(relay_err)?;
        let ce = RelayClient::connect(&net.addr).await.map_err(relay_err)?;
        let (code, ex, _) = crate::pair::open_invitation(&cd, 60, Some(2)).await?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        // The inviter leaves the slot when done, as `invite` does.
        let inviter = async {
            let r = crate::pair::invite_rest(&cd, &mut dave, ex, code.slot, deadline, Some("erin"))
                .await;
            let _ = cd.pair_leave(code.slot).await;
            r
        };
        let (i, a) = tokio::join!(
            inviter,
            crate::pair::accept_with(&ce, &mut erin, &code, Some("dave"))
        );
        Ok::<_, Failure>((code.to_text().to_string(), i, a))
    })?;
    let (text, i, a) = r;
    demo.check(
        "Dave invites; Erin types the code he reads her; each gets the other's card, proven by the code",
        "accepted",
        match (i, a) {
            (Ok((_, ci, _)), Ok((_, ca, _))) if ci.public().fingerprint() == erin_fp && ca.public().fingerprint() == dave_fp => Ok(format!(
                "code {text}: Dave pinned erin ({erin_fp}), Erin pinned dave ({dave_fp}); no fingerprints compared"
            )),
            (i, a) => Err(format!("inviter: {:?}, accepter: {:?}", i.err().map(|f| f.class), a.err().map(|f| f.class))),
        },
    );
    // Mallory tries to use the next invitation with a guess: one attempt,
    // refused on both sides, nothing pinned.
    let mut mallory = Home::new(d.join("mallory")).load()?;
    let r = net.rt.block_on(async {
        let cd = RelayClient::connect(&net.addr).await.map_err(relay_err)?;
        cd.auth(dave.identity()).await.map_err(relay_err)?;
        let cm = RelayClient::connect(&net.addr).await.map_err(relay_err)?;
        let (code, ex, _) = crate::pair::open_invitation(&cd, 60, Some(2)).await?;
        let guess = sealpost_proto::pair::Code::words(code.slot, 2, &mut OsRng);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let inviter = async {
            let r =
                crate::pair::invite_rest(&cd, &mut dave, ex, code.slot, deadline, Some("mallory"))
                    .await;
            let _ = cd.pair_leave(code.slot).await;
            r
        };
        let (i, a) = tokio::join!(
            inviter,
            crate::pair::accept_with(&cm, &mut mallory, &guess, Some("dave"))
        );
        Ok::<_, Failure>((guess == code, i, a))
    })?;
    let pinned = dave.db().contact("mallory").is_ok() || mallory.db().contact("dave").is_ok();
    demo.check(
        "Mallory guesses at Dave's next code: both sides refuse, nothing is pinned, the code is used up",
        "pairing-not-confirmed",
        match r {
            (false, Err(i), Err(a)) if !pinned && i.class == a.class => Err(format!(
                "{}: a guess has one chance in 65,536, and costs the code",
                i.class
            )),
            (lucky, i, a) => Ok(format!(
                "guess right: {lucky}, inviter: {:?}, accepter: {:?}, pinned: {pinned}",
                i.err().map(|f| f.class),
                a.err().map(|f| f.class)
            )),
        },
    );
    Ok(())
}

/// Section 7: the agents' delivery engines, end to end with receipts, and
/// a relay that corrupts, replays and forges.
fn delivery(demo: &mut Demo<'_>, net: &Net, d: &Path) -> Result<(), Failure> {
    use sealpost_agent::engine::{self, Engine};
    use sealpost_proto::delivery::State;
    use sealpost_proto::report::{Entries, RejectReason, RejectionEntry, Report};

    demo.say("7. Delivery with proof: Alice's and Bob's agents, receipts, and a hostile relay:");
    let pin = engine::pin_of(&net.addr);
    let addr = net.addr.to_string();
    let mut agents = Vec::new();
    for name in ["alice", "bob"] {
        let mut a = Home::new(d.join(name)).load()?;
        a.set_home_relay(&addr, pin.clone(), now())?;
        agents.push(a);
    }
    let (alice_card, bob_card) = (agents[0].card().clone(), agents[1].card().clone());
    agents[0]
        .db_mut()
        .add_contact("bob", &bob_card, false, now())?;
    agents[1]
        .db_mut()
        .add_contact("alice", &alice_card, false, now())?;
    let mut bob = Engine::new(agents.pop().ok_or_else(|| anyhow!("bob"))?)?
        .with_link_backoff(RelayLink::fast_backoff());
    let mut alice = Engine::new(agents.pop().ok_or_else(|| anyhow!("alice"))?)?
        .with_link_backoff(RelayLink::fast_backoff());
    let rt = &net.rt;
    rt.block_on(bob.pass())?;
    rt.block_on(alice.pass())?;

    let state = |e: &Engine, id: &sealpost_proto::MessageId| -> Result<State, Failure> {
        let m = e.agent().db().outbox(Some(id), 1)?;
        m.first()
            .and_then(|m| m.deliveries.first())
            .map(|d| d.delivery.state)
            .ok_or_else(|| anyhow!("message {id} is not in the outbox").into())
    };
    let text = b"Bob, please confirm you have the minutes of the meeting. -- Alice\n";
    let t = Instant::now();
    let id = alice
        .agent_mut()
        .send(&["bob".into()], text, 3600, "minutes")?;
    // What the relay will be given, kept for its tricks below.
    let original = alice.agent().db().sealed(&id)?.unwrap_or_default();
    rt.block_on(alice.pass())?;
    let s_bob = rt.block_on(bob.pass())?;
    rt.block_on(alice.pass())?;
    let elapsed = t.elapsed();
    let delivered = state(&alice, &id)?;
    demo.check(
        "Alice's agent sends; Bob's stores it, reads it back from disk and signs a receipt; Alice's verifies it",
        "accepted",
        if delivered == State::Delivered && s_bob.delivered == 1 {
            Ok(format!(
                "message {id}: delivered, receipt verified against Alice's own hash, {:.1} ms from send to receipt",
                elapsed.as_secs_f64() * 1000.0
            ))
        } else {
            Err(format!("state {}", delivered.name()))
        },
    );
    let receipt = alice
        .agent()
        .db()
        .outbox(Some(&id), 1)?
        .first()
        .and_then(|m| m.deliveries.first())
        .and_then(|d| d.receipt.clone())
        .ok_or_else(|| anyhow!("no receipt stored"))?;
    let text_form = Report::decode(&receipt)
        .map_err(|e| anyhow!("stored receipt: {e}"))?
        .to_text();
    let offline = Report::from_text(&text_form);
    demo.check(
        "the exported receipt, checked offline with nothing but Bob's card",
        "accepted",
        match offline {
            Ok(r) if r.signed_by(bob_card.public()) => match r.receipt_for(&id) {
                Some(e) if e.content_hash == *blake3::hash(text).as_bytes() => Ok(format!(
                    "signed by Bob ({}): message {id}, {} bytes, BLAKE3 {}…, stored {}",
                    bob_card.public().fingerprint(),
                    e.content_len,
                    &blake3::Hash::from_bytes(e.content_hash).to_hex()[..16],
                    crate::output::time(e.stored_at)
                )),
                _ => Err("wrong entry".into()),
            },
            Ok(_) => Err("not signed by Bob".into()),
            Err(e) => Err(format!("invalid: {e}")),
        },
    );

    // The relay tampers with a stored copy and replays the original.
    let bob_mailbox = MailboxId::of(bob_card.public().signing_bytes());
    let mut flipped = original.clone();
    let n = flipped.len();
    flipped[n / 2] ^= 0x10;
    let anyone = sealpost_proto::Identity::generate(&mut OsRng);
    let hostile = |payload: Vec<u8>, mailbox: MailboxId| -> Result<(), Failure> {
        let mut link = RelayLink::anonymous(net.addr.clone());
        match rt.block_on(link.call(&anyone, async |c| {
            c.submit(mailbox, now() + 3600, payload.clone()).await
        })) {
            Ok(Submitted::Accepted { .. }) => Ok(()),
            other => Err(anyhow!("the relay did not take the test item: {other:?}").into()),
        }
    };
    hostile(flipped, bob_mailbox)?;
    let s = rt.block_on(bob.pass())?;
    demo.check(
        "the relay flips one bit of a stored copy",
        "tampered",
        if s.discarded == 1 && s.delivered == 0 {
            Err("tampered: Bob's agent discards it unread (a sender would retransmit, lacking a receipt)".into())
        } else {
            Ok(format!("{s:?}"))
        },
    );
    hostile(original, bob_mailbox)?;
    let s = rt.block_on(bob.pass())?;
    let once = bob.agent().db().inbox(false, 100)?.len() == 1;
    demo.check(
        "the relay replays a message Bob already stored",
        "replayed",
        if s.duplicates == 1 && s.delivered == 0 && s.reports_sent == 1 && once {
            Err("replayed: not delivered again (Bob's inbox holds it once); its receipt is sent again".into())
        } else {
            Ok(format!("{s:?}"))
        },
    );

    // A forged bounce: a rejection that claims to come from Bob.
    let id3 = alice
        .agent_mut()
        .send(&["bob".into()], b"third", 3600, "third")?;
    rt.block_on(alice.pass())?;
    let mallory = Home::new(d.join("mallory")).load()?;
    let report = Report::sign(
        mallory.identity(),
        alice.agent().identity().public(),
        now(),
        Entries::Rejection(vec![RejectionEntry {
            id: id3,
            reason: RejectReason::NotAContact,
        }]),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let header = sealpost_proto::MessageHeader {
        kind: Kind::Rejection,
        id: sealpost_proto::MessageId::random(&mut OsRng),
        created_at: now(),
        expires_at: now() + 3600,
        in_reply_to: None,
        sender: *bob_card.public(),
        recipients: vec![alice.agent().identity().public().into()],
        reply_relay: None,
    };
    let forged = testing::seal_plaintext(
        &[*alice.agent().identity().public()],
        &testing::signed_plaintext(mallory.identity(), &header, report.as_bytes()),
    );
    hostile(
        forged,
        MailboxId::of(alice.agent().identity().public().signing_bytes()),
    )?;
    let s = rt.block_on(alice.pass())?;
    let still = state(&alice, &id3)?;
    demo.check(
        "a bounce for Alice's next message, signed by Mallory in Bob's name",
        "forged",
        if s.bounced == 0 && s.discarded == 1 && still == State::Submitted {
            Err(format!(
                "forged: the signature is not Bob's; discarded, and the message stays {}",
                still.name()
            ))
        } else {
            Ok(format!("{s:?}, state {}", still.name()))
        },
    );
    rt.block_on(bob.pass())?;
    rt.block_on(alice.pass())?;
    let done = state(&alice, &id3)?;
    demo.check(
        "and the real delivery of that message",
        "accepted",
        if done == State::Delivered {
            Ok("delivered, with Bob's receipt".into())
        } else {
            Err(format!("state {}", done.name()))
        },
    );
    Ok(())
}

/// A relay running in this process, on 127.0.0.1 and a free port.
struct Net {
    rt: tokio::runtime::Runtime,
    addr: sealpost_relay::RelayAddress,
    relay: sealpost_relay::RunningRelay,
}

impl Net {
    fn start(data: &Path) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("runtime")?;
        let config = sealpost_relay::Config::new(([127, 0, 0, 1], 0).into(), data.to_path_buf());
        let relay = rt
            .block_on(async { sealpost_relay::Relay::bind(config).await.map(|r| r.spawn()) })
            .context("cannot start the demo relay")?;
        Ok(Self {
            rt,
            addr: relay.address().clone(),
            relay,
        })
    }

    fn stop(self) {
        let _ = self.rt.block_on(self.relay.stop());
    }
}

fn finish(demo: Demo<'_>, out: &Out) -> Result<(), Failure> {
    let total = demo.checks.len();
    if out.json() {
        println!(
            "{}",
            json!({"checks": demo.checks, "passed": total - demo.failed, "failed": demo.failed})
        );
    } else {
        println!(
            "\n{} of {total} checks behaved as expected.",
            total - demo.failed
        );
    }
    if demo.failed > 0 {
        return Err(anyhow!("{} demo checks did not behave as expected", demo.failed).into());
    }
    Ok(())
}

/// Flips one bit of a file in place, as a failing disk or a hostile relay
/// might.
fn flip_bit(path: &Path, at: u64) -> Result<(), Failure> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .context("open")?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))
        .and_then(|_| f.read_exact(&mut b))
        .context("read")?;
    b[0] ^= 0x04;
    f.seek(SeekFrom::Start(at))
        .and_then(|_| f.write_all(&b))
        .context("write")?;
    Ok(())
}
