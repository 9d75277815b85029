//! A pinned contact sends everything the format allows and more (see
//! `sealpost_testkit::contact`) while an honest contact writes too: the
//! victim's agent receipts the honest mail, refuses what is malformed or
//! over its limits with signed rejections, stores the rest only inside its
//! download directory, and settles in a bounded number of passes.
//! The full run is `bench/hostile-contact.sh`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand_core::OsRng;
use sealpost_agent::engine::{self, Engine};
use sealpost_agent::Home;
use sealpost_proto::delivery::State;
use sealpost_relay::{Config, Relay, RelayAddress};
use sealpost_testkit::contact::{ContactAttack, HostileContact};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn engine(dir: &Path, name: &str, addr: &RelayAddress) -> Engine {
    let home = Home::new(dir.join(name));
    let mut agent = home.init(name, &mut OsRng, now()).expect("init");
    agent
        .set_home_relay(&addr.to_string(), engine::pin_of(addr), now())
        .expect("relay");
    let mut e = Engine::new(agent).expect("engine");
    e.timing.submit.base = Duration::from_millis(10);
    e.pass().await.expect("first pass");
    e
}

/// Every regular file and directory under `root`, as paths relative to it.
fn tree(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("meta");
            assert!(
                !m.file_type().is_symlink(),
                "a symbolic link: {}",
                p.display()
            );
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(root).expect("inside").to_path_buf());
        }
    }
    out
}

/// Alice sends bob one message per number, then hands them to the relay.
async fn send_honest(
    alice: &mut Engine,
    numbers: std::ops::Range<usize>,
    ids: &mut Vec<sealpost_proto::MessageId>,
) {
    for i in numbers {
        let text = format!("honest {i}");
        ids.push(
            alice
                .agent_mut()
                .send(&["bob".into()], text.as_bytes(), 3600, "honest")
                .expect("send"),
        );
    }
    alice.pass().await.expect("alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_contact_cannot_jam_escape_or_fill() {
    let dir = tempfile::tempdir().expect("tmp");
    let relay = Relay::bind(Config::new(
        "127.0.0.1:0".parse().expect("addr"),
        dir.path().join("relay"),
    ))
    .await
    .expect("bind")
    .spawn();
    let addr = relay.address().clone();
    let mut alice = engine(dir.path(), "alice", &addr).await;
    let mut bob = engine(dir.path(), "bob", &addr).await;
    let downloads = dir.path().join("bob-downloads");
    std::fs::create_dir_all(&downloads).expect("mkdir");
    bob.agent_mut()
        .db_mut()
        .set_setting(engine::DOWNLOAD_DIR, &downloads.to_string_lossy())
        .expect("downloads");
    let mallory = HostileContact::new(7, addr.clone());
    let (a_card, b_card) = (alice.agent().card().clone(), bob.agent().card().clone());
    alice
        .agent_mut()
        .db_mut()
        .add_contact("bob", &b_card, false, now())
        .expect("pin");
    bob.agent_mut()
        .db_mut()
        .add_contact("alice", &a_card, false, now())
        .expect("pin");
    bob.agent_mut()
        .db_mut()
        .add_contact("mallory", &mallory.card(now()), false, now())
        .expect("pin");

    // Honest mail before and after the attack.
    let mut honest = Vec::new();
    send_honest(&mut alice, 0..3, &mut honest).await;
    let attack = ContactAttack {
        seed: 21,
        flood: 60,
        replays: 10,
        same_file: 4,
    };
    let report = mallory
        .run(b_card.public(), &attack, now())
        .await
        .expect("attack");
    assert_eq!(report.refused, 0, "the relay took everything");
    send_honest(&mut alice, 3..6, &mut honest).await;

    // Bob settles within a bounded number of passes, each bounded in time,
    // and quickly: a file whose blob never comes does not cost every pass
    // a wait (it cost 15 s a pass, delaying every receipt).
    let started = std::time::Instant::now();
    let mut total = sealpost_agent::engine::PassStats::default();
    for _ in 0..10 {
        let s = tokio::time::timeout(Duration::from_secs(60), bob.pass())
            .await
            .expect("a pass ended")
            .expect("pass");
        total.add(&s);
        if s.fetched == 0 && s.files_received == 0 && s.reports_sent == 0 {
            break;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bob took {:?} to settle",
        started.elapsed()
    );
    alice.pass().await.expect("alice");
    for id in &honest {
        let m = alice.agent().db().outbox(Some(id), 1).expect("outbox");
        assert_eq!(
            m[0].deliveries[0].delivery.state,
            State::Delivered,
            "honest mail is receipted whatever mallory sends: {total:?}"
        );
    }
    // Malformed and climbing names, the terabyte and the terabyte of
    // padding, refused (signed).
    assert_eq!(report.accepted["oversized-padding"], 1, "{report:?}");
    let refused_here = report.accepted["malformed-manifest"]
        + report.accepted["invalid-name"]
        + report.accepted["oversized-file"]
        + report.accepted["oversized-padding"];
    assert!(
        total.rejected >= refused_here as u64,
        "{total:?} {report:?}"
    );
    // The flood and one copy of the replayed message are in the inbox;
    // the other copies are duplicates.
    assert!(total.duplicates >= attack.replays as u64, "{total:?}");
    // Files only inside the download directory, none of them the agent's
    // own partial-file name, and nothing outside it.
    let files = tree(&downloads);
    assert!(!files.is_empty());
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(name.len() <= 255, "{}", f.display());
        assert!(
            !name.starts_with(".sealpost-part-")
                || name.ends_with(".part")
                || f.components().count() == 1,
            "a sender's file under the agent's partial name: {}",
            f.display()
        );
    }
    assert!(!dir.path().join("escape.txt").exists());
    assert!(!dir.path().join("b").exists());
    let received = files
        .iter()
        .filter(|f| {
            std::fs::symlink_metadata(downloads.join(f))
                .map(|m| m.is_file())
                .unwrap_or(false)
        })
        .filter(|f| !f.to_string_lossy().starts_with(".sealpost-part-"))
        .count();
    assert_eq!(
        received,
        report.stored_names.len(),
        "every real file stored once, under its own name: {files:?}"
    );
    relay.stop().await.expect("stop");
}
