use std::os::unix::fs::PermissionsExt;

use rand::rngs::StdRng;
use rand::SeedableRng;
use sealpost_agent::{AddOutcome, AgentError, Home, ReceiveError};
use sealpost_proto::{CardFields, ContactCard, Identity, Kind, OpenError};

const NOW: u64 = 1_750_000_000;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

#[test]
fn init_creates_a_private_key_file_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tmp");
    let home = Home::new(dir.path().join("h"));
    let agent = home.init("Alice", &mut rng(1), NOW).expect("init");
    let mode = std::fs::metadata(home.key_path())
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let dmode = std::fs::metadata(home.dir())
        .expect("dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dmode, 0o700);
    let fp = agent.identity().fingerprint();
    assert!(matches!(
        home.init("Alice", &mut rng(2), NOW),
        Err(AgentError::IdentityExists(_))
    ));
    assert_eq!(home.load().expect("load").identity().fingerprint(), fp);
}

#[test]
fn a_readable_key_file_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let home = Home::new(dir.path());
    home.init("Alice", &mut rng(1), NOW).expect("init");
    std::fs::set_permissions(home.key_path(), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    assert!(matches!(
        home.load(),
        Err(AgentError::InsecureKeyFile { .. })
    ));
}

#[test]
fn missing_identity_says_how_to_create_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let err = Home::new(dir.path()).load().expect_err("no identity");
    assert!(err.to_string().contains("sealpost init"), "{err}");
}

fn card(seed: u8, name: &str, created_at: u64) -> ContactCard {
    let id = Identity::from_secret_bytes(&[seed; 32], &[seed ^ 0xff; 32]);
    ContactCard::create(
        &id,
        CardFields {
            name: name.into(),
            created_at,
            relay: None,
        },
    )
    .expect("card")
}

#[test]
fn contacts_are_pinned() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut agent = Home::new(dir.path())
        .init("Me", &mut rng(1), NOW)
        .expect("init");
    let bob = card(2, "Bob", NOW);
    let db = agent.db_mut();
    assert_eq!(
        db.add_contact("bob", &bob, false, NOW).expect("add"),
        AddOutcome::Added
    );
    assert_eq!(
        db.add_contact("bob", &bob, false, NOW).expect("again"),
        AddOutcome::AlreadyPinned { refreshed: false }
    );
    assert_eq!(
        db.add_contact("bob", &card(2, "Bob", NOW + 10), false, NOW)
            .expect("newer"),
        AddOutcome::AlreadyPinned { refreshed: true }
    );
    let mallory = card(3, "Bob", NOW);
    let err = db
        .add_contact("bob", &mallory, false, NOW)
        .expect_err("key change");
    assert!(matches!(err, AgentError::KeyChanged { .. }));
    assert!(err.to_string().contains("--replace"));
    assert!(matches!(
        db.add_contact("bob2", &bob, false, NOW),
        Err(AgentError::KeyPinnedUnderOtherName { .. })
    ));
    assert!(matches!(
        db.add_contact("bob", &mallory, true, NOW).expect("replace"),
        AddOutcome::Replaced { .. }
    ));
    assert_eq!(db.contact("bob").expect("get").card, mallory);
    assert_eq!(db.contacts().expect("list").len(), 1);
    db.remove_contact("bob").expect("remove");
    assert!(matches!(
        db.contact("bob"),
        Err(AgentError::UnknownContact(..))
    ));
    assert!(db.remove_contact("bob").is_err());
}

#[test]
fn receive_checks_sender_freshness_and_replay_persistently() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut alice = Home::new(dir.path().join("a"))
        .init("Alice", &mut rng(1), NOW)
        .expect("a");
    let bob_home = Home::new(dir.path().join("b"));
    let mut bob = bob_home.init("Bob", &mut rng(2), NOW).expect("b");
    alice
        .db_mut()
        .add_contact("bob", bob.card(), false, NOW)
        .expect("add");
    let to = alice.recipients(&["bob".into()]).expect("recipients");
    let mut sealed = std::io::Cursor::new(Vec::new());
    alice
        .seal(
            &to,
            Kind::Message,
            3600,
            NOW,
            &mut rng(3),
            &b"hello"[..],
            Some(5),
            &mut sealed,
        )
        .expect("seal");
    let sealed = sealed.into_inner();
    let spool = dir.path();

    // Unknown sender until Alice's card is pinned.
    match bob.receive(&sealed[..], spool, NOW) {
        Err(ReceiveError::Open(OpenError::UnknownSender { fingerprint })) => {
            assert_eq!(fingerprint, alice.identity().fingerprint())
        }
        other => panic!("{other:?}"),
    }
    bob.db_mut()
        .add_contact("alice", alice.card(), false, NOW)
        .expect("pin");
    let r = bob.receive(&sealed[..], spool, NOW + 1).expect("receives");
    assert_eq!(std::fs::read(r.content.path()).expect("content"), b"hello");
    assert_eq!(r.sender.name, "alice");
    assert!(bob.mark_delivered(&r.opened, NOW + 1).expect("mark"));
    drop(r);

    // The replay cache survives a restart of the agent.
    drop(bob);
    let bob = bob_home.load().expect("reload");
    assert!(matches!(
        bob.receive(&sealed[..], spool, NOW + 2),
        Err(ReceiveError::Open(OpenError::Replayed { .. }))
    ));
    assert!(matches!(
        bob.receive(&sealed[..], spool, NOW + 3600),
        Err(ReceiveError::Open(OpenError::Expired { .. }))
    ));
    // Entries are forgotten once their message can no longer be accepted.
    let mut bob = bob;
    let far = NOW + 10 * 3600;
    let other =
        sealpost_agent::outbox::ReceivedId::new([7; 32], sealpost_proto::MessageId([9; 16]));
    assert!(bob
        .db_mut()
        .replay_insert(&other, far + 100, far)
        .expect("insert"));
    assert_eq!(bob.db().replay_len().expect("len"), 1);
    // No temporary files are left behind by refused messages.
    let leftovers: Vec<_> = std::fs::read_dir(spool)
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".sealpost-open-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

mod link {
    use std::time::{SystemTime, UNIX_EPOCH};

    use sealpost_agent::link::RelayLink;
    use sealpost_proto::Identity;
    use sealpost_relay::client::{ClientError, Submitted};
    use sealpost_relay::{Config, Relay};

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    async fn serve(cfg: Config) -> sealpost_relay::RunningRelay {
        Relay::bind(cfg).await.expect("bind").spawn()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_link_reconnects_after_the_relay_restarts() {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = Config::new(
            "127.0.0.1:0".parse().expect("addr"),
            dir.path().to_path_buf(),
        );
        let relay = serve(cfg.clone()).await;
        let addr = relay.address().clone();
        let me = Identity::from_secret_bytes(&[1; 32], &[2; 32]);
        let mut link = RelayLink::new(addr.clone()).with_backoff(RelayLink::fast_backoff());
        let mb = link
            .call(&me, async |c| c.status().await)
            .await
            .expect("status");
        assert_eq!(mb.0, 0);
        let mailbox = link.mailbox().expect("mailbox");
        let submit = async |c: &sealpost_relay::client::RelayClient| {
            c.submit(mailbox, now() + 60, b"hi".to_vec()).await
        };
        assert!(matches!(
            link.call(&me, submit).await,
            Ok(Submitted::Accepted { .. })
        ));

        // The relay goes away: the link gives up after its attempts.
        relay.stop().await.expect("serve");
        link.max_attempts = 3;
        assert!(matches!(
            link.call(&me, submit).await,
            Err(ClientError::Connect { .. })
        ));

        // It comes back on the same port with the same data: the link
        // reconnects, re-authenticates and the earlier item is still there.
        let mut cfg2 = cfg;
        cfg2.listen = addr.host_port.parse().expect("addr");
        let relay = serve(cfg2).await;
        link.max_attempts = 8;
        assert!(matches!(
            link.call(&me, submit).await,
            Ok(Submitted::Accepted { .. })
        ));
        let (items, _) = link
            .call(&me, async |c| c.fetch(0, 10).await)
            .await
            .expect("fetch");
        assert_eq!(items.len(), 2);
        relay.stop().await.expect("serve");
    }
}

/// A home made before the archive opens: its inbox gains the column, and
/// what it held is in the inbox, not the archive.
#[test]
fn a_home_from_before_the_archive_opens() {
    let dir = tempfile::tempdir().expect("tmp");
    let home = Home::new(dir.path().join("h"));
    drop(home.init("Alice", &mut rng(3), NOW).expect("init"));
    {
        let conn = rusqlite::Connection::open(home.db_path()).expect("db");
        conn.execute_batch("ALTER TABLE inbox DROP COLUMN archived_ms")
            .expect("old schema");
    }
    let agent = home.load().expect("load");
    assert!(agent.db().inbox(false, 10).expect("inbox").is_empty());
    assert!(agent
        .db()
        .received(sealpost_agent::outbox::Shelf::Archive, false, 10)
        .expect("archive")
        .is_empty());
}
