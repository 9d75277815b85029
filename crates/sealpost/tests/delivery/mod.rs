//! Delivery end to end with real processes: a relay, agents, `send`,
//! `sync`, receipts, retransmission, expiry, rejections, restarts.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin;
use serde_json::Value;

use super::Env;
use crate::relay::{free_port, start_relay_with};

/// A relay process and homes that use it.
struct Net {
    env: Env,
    relay: Option<Child>,
    port: u16,
    addr: String,
    agents: Vec<Child>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in self.agents.iter_mut().chain(self.relay.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Net {
    fn with_relay_flags(flags: &[&str]) -> Self {
        let env = Env::new();
        let port = free_port();
        let (child, addr) = start_relay_with(&env.path("relay"), port, flags);
        Self {
            env,
            relay: Some(child),
            port,
            addr: addr.to_string(),
            agents: Vec::new(),
        }
    }

    /// SIGKILLs the relay and starts it again on the same data and port.
    fn restart_relay(&mut self) {
        self.restart_relay_with(&[]);
    }

    /// `restart_relay` with other `relay serve` flags.
    fn restart_relay_with(&mut self, flags: &[&str]) {
        self.stop_relay();
        let (child, addr) = start_relay_with(&self.env.path("relay"), self.port, flags);
        assert_eq!(addr.to_string(), self.addr, "the relay keeps its key");
        self.relay = Some(child);
    }

    /// SIGKILLs the relay.
    fn stop_relay(&mut self) {
        if let Some(mut c) = self.relay.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn init(&self, home: &str) -> String {
        let v = self
            .env
            .json(home, &["init", "--name", home, "--relay", &self.addr]);
        v["card"].as_str().expect("card").to_owned()
    }

    /// `home` pins `card` as `name`.
    fn pin(&self, home: &str, name: &str, card: &str) {
        self.env.ok(home, &["contact", "add", card, "--name", name]);
    }

    /// alice and bob, each other's contacts, both on the relay.
    fn pair() -> Self {
        Self::pair_with(&[])
    }

    fn pair_with(flags: &[&str]) -> Self {
        let net = Self::with_relay_flags(flags);
        let a = net.init("alice");
        let b = net.init("bob");
        net.pin("alice", "bob", &b);
        net.pin("bob", "alice", &a);
        net
    }

    fn run(&self, home: &str, args: &[&str]) -> (i32, Vec<u8>, String) {
        self.env.run(home, args, b"")
    }

    fn json(&self, home: &str, args: &[&str]) -> Value {
        self.env.json(home, args)
    }

    fn send(&self, home: &str, to: &str, text: &str, extra: &[&str]) -> String {
        let mut a = vec!["send", to, text];
        a.extend_from_slice(extra);
        self.json(home, &a)["id"].as_str().expect("id").to_owned()
    }

    fn send_file(&self, home: &str, to: &str, file: &str) -> String {
        self.json(home, &["send", to, "--file", file])["id"]
            .as_str()
            .expect("id")
            .to_owned()
    }

    fn sync(&self, home: &str) -> Value {
        self.json(home, &["sync"])
    }

    fn delivery(&self, home: &str, id: &str) -> Value {
        self.json(home, &["status", id])["messages"][0]["deliveries"][0].clone()
    }

    fn state(&self, home: &str, id: &str) -> String {
        self.delivery(home, id)["state"]
            .as_str()
            .expect("state")
            .to_owned()
    }

    fn inbox_len(&self, home: &str) -> usize {
        self.json(home, &["inbox", "--limit", "1000"])["messages"]
            .as_array()
            .expect("list")
            .len()
    }

    /// Starts `sealpost agent` for `home`; killed when the net drops.
    fn start_agent(&mut self, home: &str, retransmit: &str) -> usize {
        let child = Command::new(cargo_bin("sealpost"))
            .arg("--home")
            .arg(self.env.path(home))
            .arg("agent")
            .env("SEALPOST_LOG", "warn")
            .env("SEALPOST_RETRANSMIT_AFTER", retransmit)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent");
        // Ready once it holds the home's lock and listens for wake-ups.
        let sock = self.env.path(home).join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.agents.push(child);
        self.agents.len() - 1
    }

    fn kill_agent(&mut self, i: usize) {
        let _ = self.agents[i].kill();
        let _ = self.agents[i].wait();
    }

    fn wait_for_state(&self, home: &str, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.state(home, id);
            if s == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "message {id} stayed {s}, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_message_is_delivered_with_a_receipt_anyone_can_verify() {
    let net = Net::pair();
    let id = net.send("alice", "bob", "hello bob", &[]);
    assert_eq!(id.len(), 32);
    assert_eq!(net.state("alice", &id), "submitted");
    let s = net.sync("bob");
    assert_eq!(
        (s["delivered"].as_u64(), s["reports_sent"].as_u64()),
        (Some(1), Some(1))
    );
    let (code, content, _) = net.run("bob", &["read", &id[..20]]);
    assert_eq!((code, &content[..]), (0, &b"hello bob"[..]));
    assert_eq!(
        net.state("alice", &id),
        "submitted",
        "no receipt processed yet"
    );
    let s = net.sync("alice");
    assert_eq!(s["confirmed"].as_u64(), Some(1));
    let d = net.delivery("alice", &id);
    assert_eq!(
        (d["state"].as_str(), d["receipt"].as_bool()),
        (Some("delivered"), Some(true))
    );

    // The receipt, exported, verifies offline with bob's card only.
    net.env
        .ok("alice", &["receipt", "export", &id, "-o", "receipt.txt"]);
    let bob_card = net.json("bob", &["id"])["card"]
        .as_str()
        .expect("card")
        .to_owned();
    let alice_card = net.json("alice", &["id"])["card"]
        .as_str()
        .expect("card")
        .to_owned();
    let v = net.json(
        "alice",
        &[
            "receipt",
            "verify",
            "receipt.txt",
            "--card",
            &bob_card,
            "--id",
            &id,
        ],
    );
    let e = &v["entries"][0];
    assert_eq!(e["id"].as_str(), Some(id.as_str()));
    assert_eq!(e["content_len"].as_u64(), Some(9));
    assert_eq!(
        e["content_blake3"].as_str(),
        Some(blake3::hash(b"hello bob").to_hex().as_str())
    );
    let (code, _, err) = net.run(
        "alice",
        &["receipt", "verify", "receipt.txt", "--card", &alice_card],
    );
    assert_eq!(code, 23, "{err}");
    let (code, _, _) = net.run(
        "alice",
        &[
            "receipt",
            "verify",
            "receipt.txt",
            "--card",
            &bob_card,
            "--id",
            "00000000000000000000000000000000",
        ],
    );
    assert_eq!(code, 23);
    // A receipt altered anywhere does not verify.
    let text = std::fs::read_to_string(net.env.path("receipt.txt")).expect("read");
    let prefix = "sealpost-report-v1:".len();
    for pos in [prefix + 3, prefix + 40, text.trim_end().len() - 5] {
        let mut b = text.clone().into_bytes();
        b[pos] = if b[pos] == b'A' { b'B' } else { b'A' };
        std::fs::write(net.env.path("bad.txt"), &b).expect("write");
        let (code, _, _) = net.run(
            "alice",
            &["receipt", "verify", "bad.txt", "--card", &bob_card],
        );
        assert_eq!(code, 23, "altered at {pos}");
    }
    // A second sync changes nothing: exactly once.
    let s = net.sync("bob");
    assert_eq!(s["fetched"].as_u64(), Some(0));
    assert_eq!(net.inbox_len("bob"), 1);
}

#[test]
fn offline_recipient_relay_restart_and_sender_restart_lose_nothing() {
    let mut net = Net::pair();
    // bob is offline; the relay holds the message through a SIGKILL.
    let first = net.send("alice", "bob", "sent while bob was away", &[]);
    net.restart_relay();
    let s = net.sync("bob");
    assert_eq!(s["delivered"].as_u64(), Some(1));
    net.sync("alice");
    assert_eq!(net.state("alice", &first), "delivered");

    // alice's agent is killed right after it submitted; the receipt waits
    // at the relay and the restarted agent takes it.
    let a = net.start_agent("alice", "2m");
    let second = net.send("alice", "bob", "second", &[]);
    net.wait_for_state("alice", &second, "submitted");
    net.kill_agent(a);
    net.sync("bob");
    net.restart_relay();
    assert_eq!(net.state("alice", &second), "submitted");
    net.start_agent("alice", "2m");
    net.wait_for_state("alice", &second, "delivered");
    assert_eq!(net.inbox_len("bob"), 2);

    // Both agents running: send --wait returns with the receipt.
    net.start_agent("bob", "2m");
    let v = net.json(
        "alice",
        &["send", "bob", "third", "--wait", "--timeout", "30s"],
    );
    assert_eq!(v["deliveries"][0]["state"].as_str(), Some("delivered"));
    assert_eq!(net.inbox_len("bob"), 3);
}

#[test]
fn a_retransmitted_copy_is_stored_once_and_receipted_again() {
    let net = Net::pair();
    // With a 100 ms retransmission time the next sync submits it again.
    let fast = |args: &[&str]| {
        let mut c = net.env.cmd("alice");
        c.arg("--json")
            .args(args)
            .env("SEALPOST_RETRANSMIT_AFTER", "100ms");
        let o = c.output().expect("run");
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let v: Value = serde_json::from_slice(&fast(&["send", "bob", "say it twice"])).expect("json");
    let id = v["id"].as_str().expect("id").to_owned();
    std::thread::sleep(Duration::from_millis(300));
    let out = fast(&["sync"]);
    let s: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(s["submitted"].as_u64(), Some(1));
    assert_eq!(net.delivery("alice", &id)["submissions"].as_u64(), Some(2));
    let s = net.sync("bob");
    assert_eq!(
        (
            s["fetched"].as_u64(),
            s["delivered"].as_u64(),
            s["duplicates"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(net.inbox_len("bob"), 1);
    net.sync("alice");
    assert_eq!(net.state("alice", &id), "delivered");
}

/// Messages do not fill the recipient's disk either: with less room than
/// `--keep-free` where its home is, they wait at the relay (not
/// acknowledged, so not lost, and not receipted), and come in once there
/// is room.
#[test]
fn messages_wait_at_the_relay_while_the_disk_is_low() {
    let net = Net::pair();
    let id = net.send("alice", "bob", "hello", &[]);
    let mut c = net.env.cmd("bob");
    c.args(["--json", "sync", "--keep-free", "1000PiB"]);
    let o = c.output().expect("sync");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("messages wait at the relay"), "{err}");
    let s: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(s["fetched"].as_u64(), Some(0), "{s}");
    net.sync("alice");
    assert_eq!(net.state("alice", &id), "submitted");
    net.sync("bob");
    net.sync("alice");
    assert_eq!(net.state("alice", &id), "delivered");
}

#[test]
fn expiry_without_a_receipt_ends_as_failed() {
    let net = Net::pair();
    let id = net.send("alice", "bob", "too late", &["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let s = net.sync("alice");
    assert_eq!(s["expired"].as_u64(), Some(1));
    let d = net.delivery("alice", &id);
    assert_eq!(
        (d["state"].as_str(), d["failure"].as_str()),
        (Some("failed"), Some("expired"))
    );
    // bob gets the stale copy from the relay? The relay dropped it at
    // expiry, or bob refuses it: either way it never reaches his inbox.
    net.sync("bob");
    assert_eq!(net.inbox_len("bob"), 0);
    // --wait reports the failure with its exit code.
    let (code, out, _) = net.run(
        "alice",
        &[
            "--json",
            "send",
            "bob",
            "again",
            "--expires",
            "1s",
            "--wait",
            "--timeout",
            "20s",
        ],
    );
    assert_eq!(code, 21, "{}", String::from_utf8_lossy(&out));
}

#[test]
fn a_stranger_gets_a_signed_rejection() {
    let net = Net::pair();
    let carol = net.init("carol");
    let bob = net.json("bob", &["id"])["card"]
        .as_str()
        .expect("card")
        .to_owned();
    net.pin("carol", "bob", &bob);
    let id = net.send("carol", "bob", "hi, we have not met", &[]);
    let s = net.sync("bob");
    assert_eq!(s["rejected"].as_u64(), Some(1));
    assert_eq!(net.inbox_len("bob"), 0);
    // Bob can see who was refused, by fingerprint.
    let carol_fp = net.json("carol", &["id"])["fingerprint"]
        .as_str()
        .expect("fp")
        .to_owned();
    let r = net.json("bob", &["inbox", "--refused"]);
    assert_eq!(
        r["refused"][0]["fingerprint"].as_str(),
        Some(carol_fp.as_str()),
        "{r}"
    );
    assert_eq!(r["refused"][0]["messages"].as_u64(), Some(1), "{r}");
    let s = net.sync("carol");
    assert_eq!(s["bounced"].as_u64(), Some(1));
    let d = net.delivery("carol", &id);
    assert_eq!(
        (d["state"].as_str(), d["failure"].as_str()),
        (Some("failed"), Some("rejected:not-a-contact"))
    );
    // Once bob pins carol, her next message goes through.
    net.pin("bob", "carol", &carol);
    let id = net.send("carol", "bob", "now we have", &[]);
    net.sync("bob");
    net.sync("carol");
    assert_eq!(net.state("carol", &id), "delivered");
}

#[test]
fn a_second_engine_on_the_same_home_is_refused() {
    let mut net = Net::pair();
    net.start_agent("bob", "2m");
    let (code, _, err) = net.run("bob", &["sync"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already"), "{err}");
}

// ---- files ----

fn write_file(net: &Net, name: &str, size: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect();
    std::fs::write(net.env.path(name), &data).expect("write");
    data
}

/// The relay's stored blob files.
fn relay_blobs(net: &Net) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(net.env.path("relay/store/blobs"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

fn sync_with(net: &Net, home: &str, extra: &[(&str, &str)]) -> Value {
    let mut c = net.env.cmd(home);
    c.args(["--json", "sync", "--downloads"])
        .arg(net.env.path(&format!("{home}-downloads")));
    for (k, v) in extra {
        c.env(k, v);
    }
    let o = c.output().expect("sync");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("json")
}

#[test]
fn files_of_edge_sizes_arrive_verified_and_never_overwrite() {
    let net = Net::pair();
    // 0, 1, a chunk ±1, a relay piece (15 chunks) ±1, several pieces.
    let sizes = [0usize, 1, 65_535, 65_536, 65_537, 983_039, 983_041, 5 << 20];
    let mut sent = Vec::new();
    for (k, size) in sizes.iter().enumerate() {
        let name = format!("f{k}.bin");
        let data = write_file(&net, &name, *size, k as u8);
        let id = net.send_file("alice", "bob", &name);
        sent.push((id, name, data));
    }
    // The same name twice: the second lands beside the first.
    let again = write_file(&net, "f1.bin", 3, 9);
    let id_again = net.send_file("alice", "bob", "f1.bin");
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(
        s["files_received"].as_u64(),
        Some(sizes.len() as u64 + 1),
        "{s}"
    );
    let dl = net.env.path("bob-downloads");
    for (_, name, data) in &sent {
        if name == "f1.bin" {
            continue;
        }
        assert_eq!(&std::fs::read(dl.join(name)).expect("file"), data, "{name}");
    }
    let mut ones: Vec<Vec<u8>> = ["f1.bin", "f1 (1).bin"]
        .iter()
        .map(|n| std::fs::read(dl.join(n)).expect("both copies"))
        .collect();
    ones.sort();
    let mut want = vec![sent[1].2.clone(), again];
    want.sort();
    assert_eq!(ones, want);
    // No partial file is left, and the relay forgot the blobs.
    assert!(std::fs::read_dir(&dl).expect("dir").all(|e| !e
        .expect("e")
        .file_name()
        .to_string_lossy()
        .starts_with(".sealpost-part")));
    assert!(relay_blobs(&net).is_empty());
    // Every receipt names the file's own hash.
    net.sync("alice");
    assert_eq!(net.state("alice", &id_again), "delivered");
    for (id, _, data) in &sent {
        assert_eq!(net.state("alice", id), "delivered");
        let v = net.json("bob", &["read", id]);
        assert_eq!(
            v["file"]["blake3"].as_str(),
            Some(blake3::hash(data).to_hex().as_str())
        );
        assert_eq!(v["file"]["state"].as_str(), Some("done"));
    }
}

#[test]
fn killed_sender_and_recipient_resume_without_starting_over() {
    let net = Net::pair();
    let size = 48usize << 20;
    let data = write_file(&net, "big.bin", size, 1);
    // The sender is killed while uploading.
    let mut child = net
        .env
        .cmd("alice")
        .args(["send", "bob", "--file", "big.bin"])
        .env("SEALPOST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = || -> u64 {
        relay_blobs(&net)
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    let stored_at_kill = loop {
        let stored = held();
        if stored > 8 << 20 {
            let _ = child.kill();
            let _ = child.wait();
            break stored;
        }
        assert!(Instant::now() < deadline, "upload did not start");
        if let Ok(Some(_)) = child.try_wait() {
            panic!("the upload finished before it could be interrupted");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let blob_len = size as u64 + (size as u64).div_ceil(65_536) * 16;
    // The relay goes on storing the pieces it had received whole from the
    // dead connection (the run in progress, and what waited for it): what
    // it holds once that settled is where the upload must resume.
    let mut stored_at_kill = stored_at_kill;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = held();
        if now == stored_at_kill {
            break;
        }
        stored_at_kill = now;
        assert!(Instant::now() < deadline, "the relay did not settle");
    }
    // It resumes from what the relay holds: nothing below it is sent again
    // (the relay may hold a little more than its file's length showed; the
    // file may also run up to one 4 KiB block past what it holds, the
    // padding of a direct write).
    let s = sync_with(&net, "alice", &[]);
    let resent = s["upload_bytes"].as_u64().expect("n");
    assert!(
        resent <= blob_len - stored_at_kill + 4096,
        "{resent} > {}",
        blob_len - stored_at_kill + 4096
    );
    assert!(resent > 0);

    // The recipient is killed while downloading.
    let part_dir = net.env.path("bob-downloads");
    let mut child = net
        .env
        .cmd("bob")
        .args(["sync", "--downloads"])
        .arg(&part_dir)
        .env("SEALPOST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sync");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let part: u64 = std::fs::read_dir(&part_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(".sealpost-part")
                    })
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        if part > 36 << 20 {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        assert!(Instant::now() < deadline, "download did not start");
        if let Ok(Some(_)) = child.try_wait() {
            panic!("the download finished before it could be interrupted");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["files_received"].as_u64(), Some(1), "{s}");
    let fetched = s["download_bytes"].as_u64().expect("n");
    assert!(
        fetched < blob_len - (16 << 20),
        "started over: {fetched} of {blob_len}"
    );
    assert_eq!(std::fs::read(part_dir.join("big.bin")).expect("file"), data);
    let s = net.sync("alice");
    assert_eq!(s["confirmed"].as_u64(), Some(1));
}

#[test]
fn chunks_damaged_at_the_relay_are_sent_again_alone() {
    let mut net = Net::pair();
    let size = 3usize << 20;
    let data = write_file(&net, "doc.bin", size, 7);
    let id = net.send_file("alice", "bob", "doc.bin");
    // The relay's disk flips bits in two chunks (5 and 40).
    let blobs = relay_blobs(&net);
    assert_eq!(blobs.len(), 1);
    let mut b = std::fs::read(&blobs[0]).expect("blob");
    for chunk in [5usize, 40] {
        b[chunk * 65_552 + 100] ^= 0x20;
    }
    std::fs::write(&blobs[0], &b).expect("damage");
    // Restarted, the relay serves the blob from its (damaged) file: a
    // running relay would still serve the last pieces it stored from
    // memory.
    net.restart_relay();
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["files_received"].as_u64(), Some(0), "{s}");
    let v = net.json("bob", &["read", &id]);
    assert_eq!(v["file"]["state"].as_str(), Some("repairing"), "{v}");
    assert_eq!(v["file"]["damaged_chunks"].as_u64(), Some(2));
    // Bob asked Alice, with a signed message, for exactly those chunks:
    // she uploads those two and nothing else.
    let s = sync_with(&net, "alice", &[]);
    assert_eq!(s["upload_bytes"].as_u64(), Some(2 * 65_552), "{s}");
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["files_received"].as_u64(), Some(1), "{s}");
    assert_eq!(s["download_bytes"].as_u64(), Some(2 * 65_552), "{s}");
    assert_eq!(
        std::fs::read(net.env.path("bob-downloads/doc.bin")).expect("file"),
        data
    );
    let s = net.sync("alice");
    assert_eq!(s["confirmed"].as_u64(), Some(1));
    assert_eq!(net.state("alice", &id), "delivered");
    let v = net.json("bob", &["read", &id]);
    assert_eq!(
        v["file"]["blake3"].as_str(),
        Some(blake3::hash(&data).to_hex().as_str())
    );
}

#[test]
fn a_directory_tree_arrives_in_place() {
    let net = Net::pair();
    let root = net.env.path("tree");
    std::fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
    std::fs::write(root.join("a.txt"), b"top level\n").expect("w");
    std::fs::write(root.join("sub/b.bin"), vec![7u8; 200_000]).expect("w");
    std::fs::write(root.join("sub/deeper/empty"), b"").expect("w");
    std::os::unix::fs::symlink("/etc/hostname", root.join("link")).expect("symlink");
    let v = net.json("alice", &["send", "bob", "--file", "tree"]);
    let files: Vec<String> = v["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["path"].as_str().expect("path").to_owned())
        .collect();
    assert_eq!(
        files,
        ["tree/a.txt", "tree/sub/b.bin", "tree/sub/deeper/empty"]
    );
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["files_received"].as_u64(), Some(3), "{s}");
    let dl = net.env.path("bob-downloads/tree");
    assert_eq!(std::fs::read(dl.join("a.txt")).expect("a"), b"top level\n");
    assert_eq!(
        std::fs::read(dl.join("sub/b.bin")).expect("b"),
        vec![7u8; 200_000]
    );
    assert_eq!(std::fs::read(dl.join("sub/deeper/empty")).expect("c"), b"");
    assert!(!dl.join("link").exists(), "symbolic links are not sent");
    let s = net.sync("alice");
    assert_eq!(s["confirmed"].as_u64(), Some(3));
}

/// The relay states its limit before the file is read: `send` refuses at
/// once, naming the file, its size and the limit, and queues nothing.
#[test]
fn a_file_larger_than_the_relay_takes_is_refused_before_it_is_read() {
    let net = Net::pair_with(&["--max-blob", "1000000"]);
    write_file(&net, "big.bin", 2_000_000, 3);
    let (code, _, err) = net.run("alice", &["send", "bob", "--file", "big.bin"]);
    assert_eq!(code, 20, "{err}");
    assert!(err.contains("big.bin is 1.9 MiB (2000000 bytes"), "{err}");
    assert!(
        err.contains("accepts files up to 976.6 KiB (1000000 bytes"),
        "{err}"
    );
    assert!(err.contains("nothing was sent or queued"), "{err}");
    let v = net.json("alice", &["status"]);
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(0), "{v}");
    // Padding counts: 999,500 bytes seal to 999,756 and fit, but padded
    // (to 1,015,808, 62 × 16 KiB) they do not.
    write_file(&net, "edge.bin", 999_500, 4);
    let (code, _, err) = net.run("alice", &["send", "bob", "--file", "edge.bin", "--pad"]);
    assert_eq!(code, 20, "{err}");
    assert!(
        err.contains("edge.bin is 976.1 KiB (999500 bytes; 1016064 sealed)"),
        "{err}"
    );
    let (code, _, err) = net.run("alice", &["send", "bob", "--pad", "hi"]);
    assert_eq!(code, 2, "--pad is for files: {err}");
    let (code, _, err) = net.run("alice", &["send", "bob", "--file", "edge.bin"]);
    assert_eq!(code, 0, "{err}");
    let v = net.json("alice", &["status"]);
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(1), "{v}");
    // A directory with one file too large: none of it is queued.
    let tree = net.env.path("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("small.txt"), b"small").expect("w");
    std::fs::write(tree.join("large.bin"), vec![0u8; 1_500_000]).expect("w");
    let (code, _, err) = net.run("alice", &["--json", "send", "bob", "--file", "tree"]);
    assert_eq!(code, 20, "{err}");
    assert!(err.contains("tree/large.bin is"), "{err}");
    assert!(!err.contains("small.txt"), "{err}");
    let v = net.json("alice", &["status"]);
    assert_eq!(
        v["messages"].as_array().map(Vec::len),
        Some(1),
        "only edge.bin: {v}"
    );
}

/// A relay that could not be asked before the file was queued refuses the
/// upload; the failure states the limit it gave afterwards.
#[test]
fn a_refusal_for_size_states_the_relays_limit() {
    let mut net = Net::pair();
    write_file(&net, "big.bin", 2_000_000, 3);
    net.stop_relay();
    let (code, out, err) = net.run("alice", &["send", "bob", "--file", "big.bin"]);
    assert_eq!(code, 5, "queued, not sent: {err}");
    let id = String::from_utf8_lossy(&out).trim().to_owned();
    net.restart_relay_with(&["--max-blob", "1000000"]);
    // The next attempt waits for its backoff (a second at first).
    let deadline = Instant::now() + Duration::from_secs(20);
    while net.state("alice", &id) == "queued" && Instant::now() < deadline {
        let (code, _, err) = net.run("alice", &["sync"]);
        assert_eq!(code, 0, "{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let d = net.delivery("alice", &id);
    assert_eq!(d["state"].as_str(), Some("failed"), "{d}");
    assert_eq!(d["failure"].as_str(), Some("refused:too_large"), "{d}");
    let text = d.to_string();
    assert!(
        text.contains("it accepts at most 976.6 KiB, 1000000 bytes"),
        "{text}"
    );
    assert!(
        d["uploaded"].as_u64().unwrap_or(0) == 0,
        "nothing was stored: {d}"
    );
}

#[test]
fn a_relay_killed_mid_upload_resumes_from_its_durable_length() {
    let mut net = Net::pair();
    let size = 48usize << 20;
    let data = write_file(&net, "big.bin", size, 5);
    let mut child = net
        .env
        .cmd("alice")
        .args(["send", "bob", "--file", "big.bin"])
        .env("SEALPOST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored: u64 = relay_blobs(&net)
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        if stored > 24 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "upload did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
    net.restart_relay();
    let _ = child.wait();
    let blob_len = size as u64 + (size as u64).div_ceil(65_536) * 16;
    let s = sync_with(&net, "alice", &[]);
    let resent = s["upload_bytes"].as_u64().expect("n");
    assert!(
        resent < blob_len - (8 << 20),
        "started over: {resent} of {blob_len}"
    );
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["files_received"].as_u64(), Some(1), "{s}");
    assert_eq!(
        std::fs::read(net.env.path("bob-downloads/big.bin")).expect("file"),
        data
    );
}

/// A file edited after `send` queued it (same size, one byte) is caught by
/// the sender before the last piece leaves: the delivery fails as
/// `source-changed`, the relay never holds the blob whole, and the
/// recipient gets nothing (the manifest names the file as it was queued).
#[test]
fn a_file_changed_after_it_was_queued_fails_at_the_sender() {
    let mut net = Net::pair();
    let mut data = write_file(&net, "doc.bin", 3 << 20, 7);
    // Queued while the relay is down: hashed, nothing uploaded yet.
    if let Some(mut c) = net.relay.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    // (A short backoff, so that the sync below tries again at once.)
    let fast = [
        ("SEALPOST_RETRANSMIT_AFTER", "100ms"),
        ("SEALPOST_LOG", "error"),
    ];
    let o = net
        .env
        .cmd("alice")
        .args(["--json", "send", "bob", "--file", "doc.bin"])
        .envs(fast)
        .output()
        .expect("send");
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    let id = v["id"].as_str().expect("id").to_owned();
    data[2_000_000] ^= 1;
    std::fs::write(net.env.path("doc.bin"), &data).expect("edit");
    net.restart_relay();
    std::thread::sleep(Duration::from_millis(300));
    sync_with(&net, "alice", &fast);
    let d = net.delivery("alice", &id);
    assert_eq!(d["state"].as_str(), Some("failed"), "{d}");
    assert_eq!(d["failure"].as_str(), Some("local:source-changed"), "{d}");
    assert!(d.to_string().contains("changed since it was queued"), "{d}");
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["files_received"].as_u64(), Some(0), "{s}");
    assert_eq!(net.inbox_len("bob"), 0);
}

/// A contact sends what the format allows and a recipient's disk cannot
/// always take: the longest names, twice; a name a dangling symbolic link
/// holds; a name of the agent's own partial files; and a tree whose path
/// is too long for the recipient's (deep) download directory. The last
/// fails on the recipient's machine, alone: every other file lands under a
/// name that fits, nothing follows the link, `sync` exits 0 and says what
/// failed, and the receipts for everything else go out in the same pass.
#[test]
fn a_contact_cannot_jam_the_recipients_receipts() {
    let net = Net::pair();
    let long = format!("{}.txt", "n".repeat(251));
    write_file(&net, &long, 1000, 1);
    let first = net.send_file("alice", "bob", &long);
    let second = net.send_file("alice", "bob", &long);
    write_file(&net, "link.txt", 10, 2);
    let linked = net.send_file("alice", "bob", "link.txt");
    write_file(&net, ".sealpost-part-00", 10, 3);
    let own = net.send_file("alice", "bob", ".sealpost-part-00");
    let deep = ["t", "u", "v", "w"].map(|c| c.repeat(250));
    let tree = net.env.path("deeptree");
    std::fs::create_dir_all(tree.join(deep[..3].join("/"))).expect("mkdir");
    std::fs::write(tree.join(deep.join("/")), b"deep").expect("w");
    let v = net.json("alice", &["send", "bob", "--file", "deeptree"]);
    let too_deep = v["files"][0]["id"].as_str().expect("id").to_owned();
    let hello = net.send("alice", "bob", "still here", &[]);

    // Bob's download directory: about 3,500 bytes deep, so that the tree's
    // 1,012-byte path passes the system's 4,096-byte limit.
    let mut dl = net.env.path("bob-downloads");
    for k in 0..14 {
        dl.push(format!("{k:02}{}", "d".repeat(240)));
    }
    std::fs::create_dir_all(&dl).expect("deep download dir");
    let outside = net.env.path("outside.txt");
    std::os::unix::fs::symlink(&outside, dl.join("link.txt")).expect("symlink");
    let o = net
        .env
        .cmd("bob")
        .args(["--json", "sync", "--downloads"])
        .arg(&dl)
        .output()
        .expect("sync");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let s: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(s["files_received"].as_u64(), Some(4), "{s}");
    assert_eq!(s["download_errors"].as_u64(), Some(1), "{s}");
    assert!(s["reports_sent"].as_u64().unwrap_or(0) >= 1, "{s}");
    assert!(!outside.exists(), "the link was not followed");
    let names: Vec<String> = std::fs::read_dir(&dl)
        .expect("dir")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.len() <= 255), "{names:?}");
    assert!(names.contains(&long), "{names:?}");
    assert!(
        names
            .iter()
            .any(|n| n.ends_with(" (1).txt") && n.starts_with("nnn")),
        "{names:?}"
    );
    assert!(names.contains(&"link (1).txt".to_owned()), "{names:?}");
    assert!(
        names.contains(&"_.sealpost-part-00".to_owned()),
        "{names:?}"
    );
    // The sender hears of everything but the tree in the same pass.
    net.sync("alice");
    for id in [&first, &second, &linked, &own, &hello] {
        assert_eq!(net.state("alice", id), "delivered", "{id}");
    }
    assert_eq!(net.state("alice", &too_deep), "submitted");
    // The failing download waits before it is tried again (no busy loop),
    // and says why.
    let again = net.json("bob", &["sync", "--downloads", dl.to_str().expect("utf-8")]);
    assert_eq!(again["download_errors"].as_u64(), Some(0), "{again}");
    let r = net.json("bob", &["read", &too_deep]);
    let why = r["file"]["error"].as_str().unwrap_or_default().to_owned();
    assert!(why.contains("too long") || why.contains("File name"), "{r}");
}

/// A file the recipient cannot place (its tree's directory is a file
/// there) fails at once, and its sender is told with a signed rejection
/// instead of retransmitting until the message expires.
#[test]
fn a_file_that_cannot_be_stored_is_rejected_to_its_sender() {
    let net = Net::pair();
    let tree = net.env.path("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("a.txt"), b"a").expect("w");
    let v = net.json("alice", &["send", "bob", "--file", "tree"]);
    let id = v["files"][0]["id"].as_str().expect("id").to_owned();
    let dl = net.env.path("bob-downloads");
    std::fs::create_dir_all(&dl).expect("mkdir");
    std::fs::write(
        dl.join("tree"),
        b"a file where the tree's directory would be",
    )
    .expect("w");
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["files_failed"].as_u64(), Some(1), "{s}");
    assert_eq!(s["reports_sent"].as_u64(), Some(1), "{s}");
    net.sync("alice");
    let d = net.delivery("alice", &id);
    assert_eq!(d["state"].as_str(), Some("failed"), "{d}");
    assert_eq!(d["failure"].as_str(), Some("rejected:not-stored"), "{d}");
}

/// `sealpost sync 2>&1 | head -1`: stderr closed before the pass logs what
/// it received. The pass goes on to its receipts and exits 0 (it panicked
/// with exit 101 after linking the file, before the receipts, on every
/// pass).
#[test]
fn a_closed_stderr_does_not_stop_a_pass() {
    let net = Net::pair();
    write_file(&net, "f.bin", 1000, 1);
    let id = net.send_file("alice", "bob", "f.bin");
    let mut child = net
        .env
        .cmd("bob")
        .args(["sync", "--downloads"])
        .arg(net.env.path("bob-downloads"))
        .env("SEALPOST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stderr.take());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status:?}");
    net.sync("alice");
    assert_eq!(net.state("alice", &id), "delivered");
}

/// A stranger fills a victim's mailbox with junk (submitting needs no
/// account). A contact's message meanwhile is delayed, never failed: an
/// over-quota refusal is retried until expiry, and once the owner's agent
/// has cleared the junk (rejected: not a contact) the message is
/// delivered. (It failed for good before, exit 21, even after the junk
/// was gone.)
#[test]
fn a_full_mailbox_delays_a_message_and_never_fails_it() {
    let net = Net::pair_with(&["--mailbox-quota", "12000"]);
    net.init("carol");
    let bob = net.json("bob", &["id"])["card"]
        .as_str()
        .expect("card")
        .to_owned();
    net.pin("carol", "bob", &bob);
    let junk = "j".repeat(200);
    for _ in 0..30 {
        // Once the mailbox is full, carol's own junk is kept queued (5).
        let (code, _, err) = net.run("carol", &["send", "bob", &junk]);
        assert!(code == 0 || code == 5, "{err}");
    }
    let text = "x".repeat(1500);
    let (code, out, err) = net.run("alice", &["--json", "send", "bob", &text]);
    assert_eq!(code, 5, "queued, not handed over, and no agent runs: {err}");
    assert!(
        err.contains("queued-not-sent") && err.contains("quota"),
        "{err}"
    );
    let v: Value = serde_json::from_slice(&out).expect("the report is printed too");
    let id = v["id"].as_str().expect("id").to_owned();
    let d = net.delivery("alice", &id);
    assert_ne!(d["state"].as_str(), Some("failed"), "{d}");
    let v = net.json("alice", &["status", &id]);
    assert!(v.to_string().contains("quota"), "the reason is shown: {v}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = net.env.cmd("alice");
        c.args(["sync"]).env("SEALPOST_RETRANSMIT_AFTER", "100ms");
        assert!(c.output().expect("sync").status.success());
        net.sync("bob");
        net.sync("alice");
        if net.state("alice", &id) == "delivered" {
            break;
        }
        assert!(Instant::now() < deadline, "{}", net.delivery("alice", &id));
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `send --wait` with the recipient's agent running: the receipt comes
/// back within milliseconds, often between the sender's first pass and
/// its subscription. Subscribed before every pass, the sender never waits
/// for its idle timer (30 s): five in a row each end well under it.
#[test]
fn send_wait_never_misses_a_quick_receipt() {
    let mut net = Net::pair();
    net.start_agent("bob", "2m");
    for k in 0..5 {
        let started = Instant::now();
        let (code, _, err) = net.run(
            "alice",
            &[
                "send",
                "bob",
                &format!("quick {k}"),
                "--wait",
                "--timeout",
                "20s",
            ],
        );
        assert_eq!(code, 0, "send {k}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "send {k} took {:?}",
            started.elapsed()
        );
    }
}

/// `send --wait` with the sender's agent running waits on the agent, not
/// on a timer: the agent tells it after every pass, so each send returns
/// as soon as its receipt is in — well under the 10 s after which it would
/// read the outbox anyway if the agent did not tell it.
#[test]
fn send_wait_is_told_by_the_running_agent() {
    let mut net = Net::pair();
    net.start_agent("bob", "2m");
    net.start_agent("alice", "2m");
    for k in 0..3 {
        let started = Instant::now();
        let v = net.json(
            "alice",
            &[
                "send",
                "bob",
                &format!("told {k}"),
                "--wait",
                "--timeout",
                "30s",
            ],
        );
        assert_eq!(
            v["deliveries"][0]["state"].as_str(),
            Some("delivered"),
            "{v}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "send {k} took {:?}: the agent did not tell it",
            started.elapsed()
        );
    }
}

/// `send` with no agent running and the relay down: the message is kept,
/// and the command says it was not handed over and what will move it
/// (exit 5), instead of exiting 0 silently.
#[test]
fn send_with_the_relay_down_and_no_agent_says_so() {
    let mut net = Net::pair();
    if let Some(mut c) = net.relay.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (code, _, err) = net.run("alice", &["send", "bob", "hello?"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("not yet handed to the relay"), "{err}");
    assert!(err.contains("sealpost agent"), "{err}");
    let v = net.json("alice", &["status"]);
    assert_eq!(
        v["messages"][0]["deliveries"][0]["state"].as_str(),
        Some("queued"),
        "{v}"
    );
    // Once the relay is back, a sync sends it.
    net.restart_relay();
    std::thread::sleep(Duration::from_millis(2500));
    let mut c = net.env.cmd("alice");
    c.args(["sync"]).env("SEALPOST_RETRANSMIT_AFTER", "100ms");
    c.output().expect("sync");
    let id = v["messages"][0]["id"].as_str().expect("id").to_owned();
    let st = net.state("alice", &id);
    assert!(st == "submitted" || st == "queued", "{st}");
}

/// `send --file DIR --wait`: every file is waited for, and a file that
/// fails makes the command fail naming it (it exited 0 when only the last
/// file was delivered).
#[test]
fn send_wait_on_a_directory_waits_for_every_file() {
    let mut net = Net::pair();
    net.start_agent("bob", "2m");
    let tree = net.env.path("dir");
    std::fs::create_dir_all(tree.join("a-sub")).expect("mkdir");
    std::fs::write(tree.join("a-sub/big.bin"), vec![1u8; 300_000]).expect("w");
    std::fs::write(tree.join("b-small.txt"), b"small").expect("w");
    // Bob cannot store dir/a-sub/big.bin (a file holds the directory's
    // name): he rejects it, signed, as not stored.
    let dl = net.env.path("bob").join("downloads");
    std::fs::create_dir_all(dl.join("dir")).expect("mkdir");
    std::fs::write(dl.join("dir/a-sub"), b"in the way").expect("w");
    let (code, out, err) = net.run(
        "alice",
        &[
            "--json",
            "send",
            "bob",
            "--file",
            "dir",
            "--wait",
            "--timeout",
            "20s",
        ],
    );
    assert_eq!(code, 21, "{err}");
    assert!(
        err.contains("dir/a-sub/big.bin"),
        "names the failed file: {err}"
    );
    assert!(err.contains("could not store it"), "{err}");
    assert!(!err.contains("dir/b-small.txt"), "{err}");
    let v: Value = serde_json::from_slice(&out).expect("json");
    let files = v["files"].as_array().expect("files");
    assert_eq!(files.len(), 2, "{v}");
    assert_eq!(
        files[1]["deliveries"][0]["state"].as_str(),
        Some("delivered"),
        "{v}"
    );
    assert_eq!(
        files[0]["deliveries"][0]["state"].as_str(),
        Some("failed"),
        "{v}"
    );
    assert_eq!(
        files[0]["deliveries"][0]["failure"].as_str(),
        Some("rejected:not-stored"),
        "{v}"
    );
}

/// A directory sent at once is one group: `send` names it, `status` shows
/// it as one entry (and each file under its id), the recipient's `inbox`
/// as one line, `read`, `archive` and `delete` take its id, and `cancel`
/// stops all its files. Each file still has its own receipt.
#[test]
fn a_directory_is_one_group_on_both_sides() {
    let net = Net::pair();
    let tree = net.env.path("photos");
    std::fs::create_dir_all(tree.join("2026")).expect("mkdir");
    for (name, n) in [("a.jpg", 3000), ("b.jpg", 4000), ("2026/c.jpg", 5000)] {
        std::fs::write(tree.join(name), vec![7u8; n]).expect("w");
    }
    let v = net.json("alice", &["send", "bob", "--file", "photos"]);
    let gid = v["group"]["id"].as_str().expect("group id").to_owned();
    assert_eq!(v["group"]["count"].as_u64(), Some(3), "{v}");
    let files = v["files"].as_array().expect("files");
    assert_eq!(files.len(), 3);
    let (code, text, err) = net.run("alice", &["send", "bob", "--file", "photos"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        String::from_utf8_lossy(&text).contains("photos/ (3 files, one group"),
        "{}",
        String::from_utf8_lossy(&text)
    );

    // The sender's status: the group by its id, each file with the group.
    let st = net.json("alice", &["status", &gid[..12]]);
    let msgs = st["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 3, "{st}");
    for (k, m) in msgs.iter().enumerate() {
        assert_eq!(m["group"]["id"].as_str(), Some(gid.as_str()), "{st}");
        assert!(m["group"]["index"].as_u64().expect("index") < 3, "{k}");
    }
    let (_, text, _) = net.run("alice", &["status"]);
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains(&format!("{gid}  ")), "{text}");
    assert!(
        text.contains("photos/ (3 of 3 files, 12000 bytes"),
        "{text}"
    );
    assert!(text.contains("to bob: 3 submitted"), "{text}");

    // The recipient: one line for the directory, its files under its id.
    sync_with(&net, "bob", &[]);
    net.sync("alice");
    let st = net.json("alice", &["status", &gid]);
    for m in st["messages"].as_array().expect("messages") {
        assert_eq!(
            m["deliveries"][0]["state"].as_str(),
            Some("delivered"),
            "{st}"
        );
    }
    let (_, text, _) = net.run("bob", &["inbox"]);
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("photos/ 3 of 3 files (12000 bytes): 3 saved"),
        "{text}"
    );
    let r = net.json("bob", &["read", &gid[..12]]);
    let got = r["files"].as_array().expect("files");
    assert_eq!(got.len(), 3, "{r}");
    assert!(
        got.iter().all(|f| f["state"].as_str() == Some("done")),
        "{r}"
    );
    let v = net.json("bob", &["archive", &gid]);
    assert_eq!(v["changed"].as_u64(), Some(3), "{v}");
    assert_eq!(net.inbox_len("bob"), 3, "the second copy of the directory");
    let v = net.json("bob", &["delete", &gid]);
    assert_eq!(v["deleted"].as_array().map(Vec::len), Some(3), "{v}");
    assert!(net
        .env
        .path("bob-downloads")
        .join("photos/2026/c.jpg")
        .exists());

    // Cancel takes the group too: a third copy's three files.
    let third = net.json("alice", &["send", "bob", "--file", "photos"]);
    let second = third["group"]["id"].as_str().expect("group").to_owned();
    assert_ne!(second, gid);
    let c = net.json("alice", &["cancel", &second]);
    assert_eq!(c["cancelled"].as_array().map(Vec::len), Some(3), "{c}");
}

/// `read ID` of a received file reads it again: it says "matches" only
/// when it still does, and says plainly when the file changed or is gone
/// (it printed "verified from disk" for a file changed or deleted since).
#[test]
fn read_rechecks_a_received_file_now() {
    let net = Net::pair();
    write_file(&net, "r.bin", 70_000, 5);
    let id = net.send_file("alice", "bob", "r.bin");
    sync_with(&net, "bob", &[]);
    let v = net.json("bob", &["read", &id]);
    assert_eq!(v["file"]["on_disk_now"].as_str(), Some("matches"), "{v}");
    let path = v["file"]["path"].as_str().expect("path").to_owned();
    let (code, out, _) = net.run("bob", &["read", &id]);
    assert_eq!(code, 0);
    assert!(String::from_utf8_lossy(&out).contains("matches the hash verified on receipt"));
    // One byte changed, same length.
    let mut data = std::fs::read(&path).expect("file");
    data[12_345] ^= 1;
    std::fs::write(&path, &data).expect("w");
    let (code, out, err) = net.run("bob", &["--json", "read", &id]);
    assert_eq!(code, 15, "{err}");
    let v: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["file"]["on_disk_now"].as_str(), Some("changed"), "{v}");
    assert!(err.contains("changed-on-disk"), "{err}");
    std::fs::remove_file(&path).expect("rm");
    let (code, out, _) = net.run("bob", &["read", &id]);
    assert_eq!(code, 6);
    assert!(String::from_utf8_lossy(&out).contains("no longer at"));
}

/// `init --relay` with the relay unreachable keeps the identity and says
/// how to finish; trying `init` again says the same instead of only that
/// an identity exists.
#[test]
fn init_with_an_unreachable_relay_says_how_to_finish() {
    let mut net = Net::with_relay_flags(&[]);
    if let Some(mut c) = net.relay.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let addr = net.addr.clone();
    let (code, _, err) = net.run("dave", &["init", "--name", "dave", "--relay", &addr]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("created identity"), "{err}");
    assert!(err.contains(&format!("sealpost relay use {addr}")), "{err}");
    let (code, _, err) = net.run("dave", &["init", "--name", "dave", "--relay", &addr]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("relay use"), "{err}");
    net.restart_relay();
    let (code, _, err) = net.run("dave", &["relay", "use", &addr]);
    assert_eq!(code, 0, "{err}");
}

/// A relay that comes back is used at once: a message queued while it was
/// down (its retries backing off, the next one several seconds away) is
/// submitted as soon as the sender's agent reaches the relay again, not
/// when its backoff ends.
#[test]
fn a_relay_that_comes_back_wakes_what_waits_for_it() {
    let mut net = Net::pair();
    net.start_agent("alice", "2m");
    if let Some(mut c) = net.relay.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (code, out, err) = net.run("alice", &["--json", "send", "bob", "while you were out"]);
    assert_eq!(code, 0, "an agent runs: {err}");
    let id = serde_json::from_slice::<Value>(&out).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // Down long enough for the retries to back off past 8 s.
    std::thread::sleep(Duration::from_secs(16));
    let before = net.delivery("alice", &id);
    assert_eq!(before["state"].as_str(), Some("queued"), "{before}");
    net.restart_relay();
    let back = Instant::now();
    while net.state("alice", &id) != "submitted" {
        assert!(
            back.elapsed() < Duration::from_secs(4),
            "still waiting for its backoff: {}",
            net.delivery("alice", &id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server at the relay's address with another key is not "cannot reach
/// the relay": it may be an interception. Its own exit code and words, for
/// `relay use` and for a home relay whose key changed.
#[test]
fn a_relay_key_that_does_not_match_the_pin_is_told_as_such() {
    let mut net = Net::pair();
    let port = net.port;
    net.stop_relay();
    // Another relay (another key) answers on the same address.
    let (mut other, other_addr) = start_relay_with(&net.env.path("other-relay"), port, &[]);
    assert_ne!(other_addr.to_string(), net.addr);
    let (code, _, err) = net.run("bob", &["sync"]);
    assert_eq!(code, 24, "{err}");
    assert!(err.contains("interception"), "{err}");
    assert!(
        err.contains(&other_addr.pin.to_text()),
        "names the key seen: {err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("sealpost: home relay: the server at"),
        "{err}"
    );
    assert_eq!(last.matches("interception").count(), 1, "said once: {err}");
    let (code, out, err) = net.run("alice", &["--json", "relay", "use", &net.addr]);
    assert_eq!(code, 24, "{err}");
    let v: Value = serde_json::from_slice(&out).unwrap_or_else(|_| {
        serde_json::from_str(err.lines().last().unwrap_or("")).expect("json error")
    });
    assert_eq!(v["class"].as_str(), Some("relay-key-mismatch"), "{v}");
    let _ = other.kill();
    let _ = other.wait();
}

/// `sync` from cron says nothing when all is well (it wrote INFO lines
/// with module paths on every run); -v says what happened, -q only the
/// error itself; SEALPOST_LOG still overrides both.
#[test]
fn sync_is_quiet_unless_asked() {
    let mut net = Net::pair();
    net.run("alice", &["send", "bob", "hello"]);
    let (code, _, err) = net.run("bob", &["sync"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
    net.run("alice", &["send", "bob", "again"]);
    let (code, _, err) = net.run("bob", &["sync", "-v"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("INFO"), "{err}");
    assert!(!err.contains("sealpost_agent::"), "no module paths: {err}");
    net.stop_relay();
    // The relay down: said once, with its cause, as the error.
    let (code, _, err) = net.run("bob", &["sync"]);
    assert_eq!(code, 5, "{err}");
    assert_eq!(err.lines().count(), 1, "said once: {err}");
    assert!(
        err.starts_with("sealpost: the home relay could not be reached (cannot reach"),
        "{err}"
    );
    let (code, _, err) = net.run("bob", &["-q", "sync"]);
    assert_eq!(code, 5, "{err}");
    assert_eq!(err.lines().count(), 1, "only the error: {err}");
}

/// An agent whose home relay is down says so at the 1st, 2nd, 4th, 8th …
/// failure (it logged two warnings a second), trying every 2 s.
#[test]
fn an_agent_says_less_and_less_about_a_relay_that_is_down() {
    let mut net = Net::pair();
    net.stop_relay();
    let mut child = net
        .env
        .cmd("bob")
        .arg("agent")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    std::thread::sleep(Duration::from_secs(8));
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    let warns = err.lines().filter(|l| l.contains("WARN")).count();
    // Tries at 0, 1, 3, 5, 7 s: failures 1 to 5; warnings at 1, 2, 4.
    assert!((2..=3).contains(&warns), "{warns} warnings in 8 s:\n{err}");
    assert!(err.contains("cannot reach the home relay"), "{err}");
    assert!(err.contains("trying again in"), "{err}");
}

/// An operator chooses who gets a mailbox: on an allow-list relay a key
/// that is not on it is told so in words (exit 3), not "cannot reach the
/// relay"; a key on it registers.
#[test]
fn a_relay_registers_only_whom_its_operator_allows() {
    let env = Env::new();
    // Alice's card, made before the relay exists, goes on the allow-list.
    let card = env.json("alice", &["init", "--name", "alice"])["card"]
        .as_str()
        .expect("card")
        .to_owned();
    env.json("mallory", &["init", "--name", "mallory"]);
    let allow = env.path("allowed.cards");
    std::fs::write(&allow, format!("# who may register\n{card}\n")).expect("write");
    let port = free_port();
    let (mut relay, addr) = start_relay_with(
        &env.path("relay"),
        port,
        &[
            "--registration",
            "allow-list",
            "--allow",
            allow.to_str().expect("utf8"),
        ],
    );
    let addr = addr.to_string();
    let (code, _, err) = env.run("mallory", &["--json", "relay", "use", &addr], b"");
    assert_eq!(code, 3, "{err}");
    let v: Value = serde_json::from_str(err.trim()).expect("json");
    assert_eq!(v["class"].as_str(), Some("registration-refused"), "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("allowed"), "{v}");
    let (code, _, err) = env.run("alice", &["relay", "use", &addr], b"");
    assert_eq!(code, 0, "{err}");
    let _ = relay.kill();
    let _ = relay.wait();
}

/// Ctrl-C during `send` says what happened and what resumes it, and
/// nothing is lost: the relay here accepts connections and never answers,
/// so the send is stuck in its handshake when the signal comes.
#[test]
fn ctrl_c_during_send_says_it_is_kept_and_sync_resumes() {
    let mut net = Net::pair();
    net.stop_relay();
    let hole = std::net::TcpListener::bind(("127.0.0.1", net.port)).expect("bind");
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        hole.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok((c, _)) = hole.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let child = net
        .env
        .cmd("alice")
        .args(["--json", "send", "bob", "kept"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("send");
    std::thread::sleep(Duration::from_millis(1500));
    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let v: Value = serde_json::from_str(err.trim()).expect("json error");
    assert_eq!(v["class"].as_str(), Some("interrupted"), "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("sealpost sync"),
        "{v}"
    );
    held.join().expect("hole");
    // Kept: the relay back, a sync delivers it.
    net.restart_relay();
    let list = net.json("alice", &["status"]);
    let id = list["messages"][0]["id"]
        .as_str()
        .expect("queued")
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while net.state("alice", &id) == "queued" && Instant::now() < deadline {
        net.run("alice", &["sync"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    sync_with(&net, "bob", &[]);
    net.sync("alice");
    assert_eq!(net.state("alice", &id), "delivered");
}

/// Progress bars on a terminal (a pty from `script`) tell the truth: a
/// 6-byte file is 6 B (it showed its 22 sealed bytes), and no rate is
/// absurd.
#[test]
fn progress_bars_on_a_terminal_show_file_bytes() {
    let net = Net::pair();
    std::fs::write(net.env.path("six.txt"), b"sixsix").expect("write");
    let sp = cargo_bin("sealpost");
    let cmd = format!(
        "{} --home {} send bob --file {}",
        sp.display(),
        net.env.path("alice").display(),
        net.env.path("six.txt").display()
    );
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("COLUMNS", "70")
        .env("TERM", "xterm")
        .output()
        .expect("script (util-linux) runs the command on a pty");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("queued message"),
        "the id before the upload: {text}"
    );
    assert!(text.contains("6 B/6 B"), "file bytes: {text}");
    assert!(!text.contains("22 B"), "not the sealed bytes: {text}");
    assert!(!text.contains("TiB/s"), "{text}");
}

/// The agent says where received files go and what arrives, by contact
/// name; `inbox` shows absolute paths even for a home given relative to
/// where the command ran (they were relative to where the agent ran).
#[test]
fn the_agent_says_what_arrives_and_where_it_goes() {
    let net = Net::pair();
    let mut agent = Command::new(cargo_bin("sealpost"))
        .current_dir(net.env.path(""))
        .args(["--home", "bob", "agent"])
        .env_remove("SEALPOST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    write_file(&net, "f.bin", 3000, 9);
    let id = net.send_file("alice", "bob", "f.bin");
    let deadline = Instant::now() + Duration::from_secs(30);
    while net.state("alice", &id) != "delivered" && Instant::now() < deadline {
        net.run("alice", &["sync"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-INT", &agent.id().to_string()])
        .status();
    let status = agent.wait().expect("wait");
    let mut err = String::new();
    use std::io::Read;
    agent
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(status.success(), "{err}");
    let dl = std::fs::canonicalize(net.env.path("bob").join("downloads")).expect("dir");
    assert!(
        err.contains(&format!("received files go to {}", dl.display())),
        "{err}"
    );
    assert!(err.contains("file f.bin from alice (2.9 KiB)"), "{err}");
    let v = net.json("bob", &["inbox"]);
    let path = v["messages"][0]["file"]["path"]
        .as_str()
        .expect("path")
        .to_owned();
    assert!(path.starts_with('/'), "absolute: {path}");
    assert_eq!(
        v["messages"][0]["file"]["percent"].as_u64(),
        Some(100),
        "{v}"
    );
}

/// The queue operations people expect from `postsuper -d` and
/// `postqueue -f`: cancel a message (and a receipt still wins if a copy
/// was already at the relay), flush now, delete received messages, and
/// export a signed rejection as proof, like a receipt.
#[test]
fn cancel_flush_delete_archive_and_export_a_rejection() {
    let mut net = Net::pair();
    // Cancelled before it reached the relay: it never does.
    net.stop_relay();
    let (_, out, _) = net.run("alice", &["send", "bob", "never mind"]);
    let never = String::from_utf8_lossy(&out).trim().to_owned();
    let v = net.json("alice", &["cancel", &never[..20]]);
    assert_eq!(v["cancelled"][0]["was"].as_str(), Some("queued"), "{v}");
    let d = net.delivery("alice", &never);
    assert_eq!(d["state"].as_str(), Some("failed"), "{d}");
    assert_eq!(d["failure"].as_str(), Some("local:cancelled"), "{d}");
    let (code, _, err) = net.run("alice", &["cancel", &never]);
    assert_eq!(code, 6, "nothing left to cancel: {err}");
    net.restart_relay();
    net.sync("alice");
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["delivered"].as_u64(), Some(0), "{s}");

    // Already at the relay when cancelled: bob's receipt still makes it
    // delivered, because it was.
    let at_relay = net.send("alice", "bob", "too late to call back", &[]);
    assert_eq!(net.state("alice", &at_relay), "submitted");
    net.json("alice", &["cancel", &at_relay]);
    assert_eq!(net.state("alice", &at_relay), "failed");
    let s = sync_with(&net, "bob", &[]);
    assert_eq!(s["delivered"].as_u64(), Some(1), "{s}");
    net.sync("alice");
    assert_eq!(net.state("alice", &at_relay), "delivered");

    // Flush: a submitted message waits 2 min for its receipt before it is
    // sent again; `sync --now` sends it again at once.
    let waiting = net.send("alice", "bob", "resend me", &[]);
    net.sync("alice");
    assert_eq!(
        net.delivery("alice", &waiting)["submissions"].as_u64(),
        Some(1)
    );
    net.json("alice", &["sync", "--now"]);
    assert_eq!(
        net.delivery("alice", &waiting)["submissions"].as_u64(),
        Some(2)
    );

    // Delete received messages: gone from the inbox.
    let s = sync_with(&net, "bob", &[]);
    assert!(s["delivered"].as_u64().unwrap_or(0) >= 1, "{s}");
    let inbox = net.json("bob", &["inbox"]);
    let n = inbox["messages"].as_array().map(Vec::len).unwrap_or(0);
    let first = inbox["messages"][0]["id"].as_str().expect("id").to_owned();
    // Ids made in the same millisecond share their first 12 digits (the
    // time, PROTOCOL 4.3): a prefix that reaches into the random part.
    let v = net.json("bob", &["delete", &first[..20]]);
    assert_eq!(v["deleted"][0].as_str(), Some(first.as_str()), "{v}");
    assert_eq!(net.inbox_len("bob"), n - 1);

    // Archive: out of the inbox's list, still listed (--archived) and
    // readable, and back with --undo.
    let second = net.json("bob", &["inbox"])["messages"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let v = net.json("bob", &["archive", &second[..20]]);
    assert_eq!(v["archived"][0].as_str(), Some(second.as_str()), "{v}");
    assert_eq!(v["changed"].as_u64(), Some(1), "{v}");
    assert_eq!(net.inbox_len("bob"), n - 2);
    let archived = net.json("bob", &["inbox", "--archived"]);
    assert_eq!(
        archived["messages"][0]["id"].as_str(),
        Some(second.as_str())
    );
    assert!(
        archived["messages"][0]["archived"].is_string(),
        "{archived}"
    );
    let (code, text, err) = net.run("bob", &["read", &second[..20]]);
    assert_eq!(code, 0, "an archived message is still read: {err}");
    assert!(!text.is_empty());
    // --from: only that contact's messages (each sender chooses its own
    // ids, so two senders' messages may share one).
    let (code, from_alice, err) = net.run("bob", &["read", &second[..20], "--from", "alice"]);
    assert_eq!((code, &from_alice), (0, &text), "{err}");
    let (code, _, err) = net.run("bob", &["read", &second[..20], "--from", "carol"]);
    assert!(code != 0 && err.contains("carol"), "{code}: {err}");
    let v = net.json("bob", &["archive", "--undo", &second]);
    assert_eq!(v["changed"].as_u64(), Some(1), "{v}");
    assert_eq!(net.inbox_len("bob"), n - 1);
    let archived = net.json("bob", &["inbox", "--archived"]);
    assert_eq!(archived["messages"].as_array().map(Vec::len), Some(0));

    // A signed rejection is exported and verified like a receipt.
    let tree = net.env.path("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("a.txt"), b"a").expect("w");
    let v = net.json("alice", &["send", "bob", "--file", "tree"]);
    let rejected = v["files"][0]["id"].as_str().expect("id").to_owned();
    let dl = net.env.path("bob-downloads");
    std::fs::write(dl.join("tree"), b"a file where the directory would be").expect("w");
    sync_with(&net, "bob", &[]);
    net.sync("alice");
    let d = net.delivery("alice", &rejected);
    assert_eq!(d["failure"].as_str(), Some("rejected:not-stored"), "{d}");
    assert_eq!(d["signed_rejection"].as_bool(), Some(true), "{d}");
    assert_eq!(d["receipt"].as_bool(), Some(false), "{d}");
    let proof = net.env.path("rejection.txt");
    let v = net.json(
        "alice",
        &[
            "receipt",
            "export",
            &rejected,
            "-o",
            proof.to_str().expect("utf8"),
        ],
    );
    assert_eq!(v["receipts"][0]["kind"].as_str(), Some("rejection"), "{v}");
    net.env.ok("bob", &["id"]);
    let card = String::from_utf8(net.env.ok("bob", &["id"])).expect("utf8");
    let v = net.json(
        "alice",
        &[
            "receipt",
            "verify",
            proof.to_str().expect("utf8"),
            "--card",
            card.trim(),
            "--id",
            &rejected,
        ],
    );
    assert_eq!(v["entries"][0]["kind"].as_str(), Some("rejection"), "{v}");
    assert_eq!(
        v["entries"][0]["reason"].as_str(),
        Some("not-stored"),
        "{v}"
    );
}

/// Addresses are printed with check characters: a typo in one is told as
/// a typo (it ended in "the relay's key does not match", which reads as an
/// interception), and the checked form is accepted as it is printed.
#[test]
fn a_mistyped_relay_address_is_told_as_a_typo() {
    let net = Net::pair();
    let printed = String::from_utf8(
        Command::new(cargo_bin("sealpost"))
            .args(["relay", "address", "--data"])
            .arg(net.env.path("relay"))
            .output()
            .expect("address")
            .stdout,
    )
    .expect("utf8")
    .trim()
    .to_owned();
    assert_eq!(
        printed.rsplit_once('.').map(|(_, c)| c.len()),
        Some(5),
        "{printed}"
    );
    // One character of the pin changed.
    let at = printed.find('/').expect("pin") + 10;
    let mut typo = printed.clone().into_bytes();
    typo[at] = if typo[at] == b'A' { b'B' } else { b'A' };
    let typo = String::from_utf8(typo).expect("ascii");
    let (code, _, err) = net.run("alice", &["relay", "use", &typo]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has a typo"), "{err}");
    let (code, _, err) = net.run("alice", &["relay", "use", &printed]);
    assert_eq!(code, 0, "the printed form works: {err}");
}

/// A recipient states what it takes: a file larger than `--max-file` is
/// refused (signed, `too-large`) as soon as it is announced, and one that
/// would eat into `--keep-free` waits instead of filling the disk.
#[test]
fn a_recipient_refuses_files_beyond_its_limits() {
    let net = Net::pair();
    write_file(&net, "big.bin", 300_000, 4);
    let id = net.send_file("alice", "bob", "big.bin");
    let mut c = net.env.cmd("bob");
    c.args(["--json", "sync", "--max-file", "200KB", "--downloads"])
        .arg(net.env.path("bob-downloads"));
    let o = c.output().expect("sync");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(s["rejected"].as_u64(), Some(1), "{s}");
    net.sync("alice");
    let d = net.delivery("alice", &id);
    assert_eq!(d["failure"].as_str(), Some("rejected:too-large"), "{d}");
    assert!(!net.env.path("bob-downloads").join("big.bin").exists());

    // Room: a reserve larger than any disk here makes the file wait (here
    // its announcement already, which stays at the relay) ...
    let id = net.send_file("alice", "bob", "big.bin");
    let mut c = net.env.cmd("bob");
    c.args(["--json", "sync", "--keep-free", "1000PiB", "--downloads"])
        .arg(net.env.path("bob-downloads"));
    let o = c.output().expect("sync");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("kept free (--keep-free)"), "{err}");
    assert!(!net.env.path("bob-downloads").join("big.bin").exists());
    net.sync("alice");
    assert_eq!(net.state("alice", &id), "submitted", "waiting, not failed");
    // With room, a pass after the download's backoff (5 s) takes it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while net.state("alice", &id) != "delivered" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        sync_with(&net, "bob", &[]);
        net.sync("alice");
    }
    assert_eq!(net.state("alice", &id), "delivered");
}

/// Forwarding with real processes (PROTOCOL 6.8): Alice's home is relay A,
/// Bob's relay B. With B down, Alice sends a message and a 50 MiB file with
/// forwarding on; relay A has both ("forwarding": at her relay; the file's
/// blob uploaded to A alone) and Alice does nothing more until the
/// end. Relay A is killed (SIGKILL) and restarted with all of it queued. B comes back; A hands the message on; Bob's agent fetches it, and
/// his receipt goes back through B and A (he forwards too); Alice's next
/// sync finds the receipt. Alice and Bob are never running at once, and
/// neither contacts the other's relay (`relay status` of each shows the
/// queue emptied).
#[test]
fn a_message_a_file_and_their_receipts_cross_two_relays_while_the_far_one_was_down() {
    /// Children killed however the test ends.
    struct Kill(Vec<Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let env = Env::new();
    let (port_a, port_b) = (free_port(), free_port());
    let (relay_a, addr_a) = start_relay_with(&env.path("relay-a"), port_a, &[]);
    let mut kill = Kill(vec![relay_a]);
    let (relay_b, addr_b) = start_relay_with(&env.path("relay-b"), port_b, &[]);
    let card = |home: &str, addr: &str| {
        env.json(home, &["init", "--name", home, "--relay", addr])["card"]
            .as_str()
            .expect("card")
            .to_owned()
    };
    let a = card("alice", &addr_a.to_string());
    let b = card("bob", &addr_b.to_string());
    env.ok("alice", &["contact", "add", &b, "--name", "bob"]);
    env.ok("bob", &["contact", "add", &a, "--name", "alice"]);
    // Bob's relay is down while Alice sends.
    drop(Kill(vec![relay_b]));
    env.ok("alice", &["sync", "--forward", "on"]);
    // `send` hands it to relay A in its own pass: exit 0, no agent needed.
    let v = env.json("alice", &["send", "bob", "while you were away"]);
    let id = v["id"].as_str().expect("id").to_owned();
    let d = env.json("alice", &["status", &id])["messages"][0]["deliveries"][0].clone();
    assert_eq!(d["state"].as_str(), Some("forwarding"), "{d}");
    let (_, text, _) = env.run("alice", &["status", &id], b"");
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("at your relay"), "{text}");
    let size = 50usize << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    std::fs::write(env.path("big.bin"), &data).expect("write");
    let v = env.json(
        "alice",
        &[
            "send",
            "bob",
            "--file",
            &env.path("big.bin").to_string_lossy(),
        ],
    );
    let file_id = v["id"].as_str().expect("id").to_owned();
    let d = env.json("alice", &["status", &file_id])["messages"][0]["deliveries"][0].clone();
    assert_eq!(d["state"].as_str(), Some("forwarding"), "{d}");
    // `relay status --json` of a relay's data directory.
    let relay_status = |data: &str| -> Value {
        let o = Command::new(cargo_bin("sealpost"))
            .args(["--json", "relay", "status", "--data"])
            .arg(env.path(data))
            .output()
            .expect("relay status");
        serde_json::from_slice(&o.stdout).expect("json")
    };
    let q = relay_status("relay-a");
    // The message, the file's blob and its manifest.
    assert_eq!(q["forward_queue"][0]["items"].as_u64(), Some(3), "{q}");
    assert!(
        q["forward_queue"][0]["bytes"].as_u64() > Some(size as u64),
        "{q}"
    );
    assert_eq!(
        q["forward_queue"][0]["next_relay"].as_str(),
        Some(format!("127.0.0.1:{port_b}").as_str()),
        "{q}"
    );
    // Alice's relay is killed (SIGKILL) with all of it queued, and starts
    // again: what it acknowledged is on its disk and goes on from there.
    let mut a_child = kill.0.remove(0);
    a_child.kill().expect("kill relay a");
    a_child.wait().expect("wait relay a");
    let (child, again_a) = start_relay_with(&env.path("relay-a"), port_a, &[]);
    kill.0.push(child);
    assert_eq!(again_a.to_string(), addr_a.to_string());
    // Bob's relay is back; Bob syncs (forwarding on) until the message is in.
    let (child, again) = start_relay_with(&env.path("relay-b"), port_b, &[]);
    kill.0.push(child);
    assert_eq!(again.to_string(), addr_b.to_string());
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let dl = env.path("bob-downloads").to_string_lossy().into_owned();
        env.ok("bob", &["sync", "--forward", "on", "--downloads", &dl]);
        let n = env.json("bob", &["inbox"])["messages"]
            .as_array()
            .map_or(0, Vec::len);
        let placed = std::fs::metadata(env.path("bob-downloads").join("big.bin"))
            .is_ok_and(|m| m.len() == size as u64);
        if n == 2 && placed {
            break;
        }
        if Instant::now() > deadline {
            let dl = env.ok("bob", &["--json", "status"]);
            panic!(
                "relay A never handed them on: inbox {n}, A {} B {} bob {}",
                relay_status("relay-a"),
                relay_status("relay-b"),
                String::from_utf8_lossy(&dl)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let got = std::fs::read(env.path("bob-downloads").join("big.bin")).expect("placed");
    assert!(got == data, "the file arrived whole");
    // Alice, back: her sync finds Bob's receipt at her relay.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        env.ok("alice", &["sync"]);
        let d = env.json("alice", &["status", &id])["messages"][0]["deliveries"][0].clone();
        let f = env.json("alice", &["status", &file_id])["messages"][0]["deliveries"][0].clone();
        if d["state"].as_str() == Some("delivered") && f["state"].as_str() == Some("delivered") {
            assert_eq!(d["receipt"].as_bool(), Some(true), "{d}");
            assert_eq!(f["receipt"].as_bool(), Some(true), "{f}");
            break;
        }
        assert!(Instant::now() < deadline, "no receipts came back: {d} {f}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Relay A's queue is empty (its copy of the blob expires within ten
    // minutes: kept for another recipient of the same file).
    let q = relay_status("relay-a");
    assert_eq!(q["forward_queue"].as_array().map(Vec::len), Some(0), "{q}");
}

/// A chain of three relays with real processes: Alice's relay A hands
/// everything it forwards to an outbound gateway G (`--forward-via`);
/// Bob's relay B takes forwarded items from G alone (`--peer-allow` with
/// G's relay key, from `relay address --json`). Alice sends a message and
/// a 3 MiB file with forwarding on and stops; Bob gets both (the file
/// whole) and his receipts come back (B → A); Alice's next sync shows
/// both delivered. A and G end with empty queues.
#[test]
fn a_message_and_a_file_cross_a_chain_of_three_relays() {
    struct Kill(Vec<Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let env = Env::new();
    let (port_a, port_g, port_b) = (free_port(), free_port(), free_port());
    let (relay_g, addr_g) = start_relay_with(&env.path("relay-g"), port_g, &[]);
    let mut kill = Kill(vec![relay_g]);
    let o = Command::new(cargo_bin("sealpost"))
        .args(["--json", "relay", "address", "--data"])
        .arg(env.path("relay-g"))
        .output()
        .expect("relay address");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    let g_key = v["relay_key"].as_str().expect("relay_key").to_owned();
    assert_eq!(g_key.len(), 64, "{v}");
    let (relay_b, addr_b) =
        start_relay_with(&env.path("relay-b"), port_b, &["--peer-allow", &g_key]);
    kill.0.push(relay_b);
    let via = addr_g.to_string();
    let (relay_a, addr_a) =
        start_relay_with(&env.path("relay-a"), port_a, &["--forward-via", &via]);
    kill.0.push(relay_a);
    let card = |home: &str, addr: &str| {
        env.json(home, &["init", "--name", home, "--relay", addr])["card"]
            .as_str()
            .expect("card")
            .to_owned()
    };
    let a = card("alice", &addr_a.to_string());
    let b = card("bob", &addr_b.to_string());
    env.ok("alice", &["contact", "add", &b, "--name", "bob"]);
    env.ok("bob", &["contact", "add", &a, "--name", "alice"]);
    env.ok("alice", &["sync", "--forward", "on"]);
    env.ok("bob", &["sync", "--forward", "on"]);
    let id = env.json("alice", &["send", "bob", "through the gateway"])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let size = 3usize << 20;
    let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    std::fs::write(env.path("doc.bin"), &data).expect("write");
    let file_id = env.json(
        "alice",
        &[
            "send",
            "bob",
            "--file",
            &env.path("doc.bin").to_string_lossy(),
        ],
    )["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let relay_status = |data: &str| -> Value {
        let o = Command::new(cargo_bin("sealpost"))
            .args(["--json", "relay", "status", "--data"])
            .arg(env.path(data))
            .output()
            .expect("relay status");
        serde_json::from_slice(&o.stdout).expect("json")
    };
    let dl = env.path("bob-downloads").to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        env.ok("bob", &["sync", "--downloads", &dl]);
        let n = env.json("bob", &["inbox"])["messages"]
            .as_array()
            .map_or(0, Vec::len);
        let placed = std::fs::metadata(env.path("bob-downloads").join("doc.bin"))
            .is_ok_and(|m| m.len() == size as u64);
        if n == 2 && placed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not across the chain: inbox {n}, A {} G {} B {}",
            relay_status("relay-a"),
            relay_status("relay-g"),
            relay_status("relay-b")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let got = std::fs::read(env.path("bob-downloads").join("doc.bin")).expect("placed");
    assert!(got == data, "the file arrived whole");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        env.ok("alice", &["sync"]);
        let d = env.json("alice", &["status", &id])["messages"][0]["deliveries"][0].clone();
        let f = env.json("alice", &["status", &file_id])["messages"][0]["deliveries"][0].clone();
        if d["state"].as_str() == Some("delivered") && f["state"].as_str() == Some("delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "no receipts came back: {d} {f}");
        std::thread::sleep(Duration::from_millis(300));
    }
    for r in ["relay-a", "relay-g"] {
        let q = relay_status(r);
        assert_eq!(
            q["forward_queue"].as_array().map(Vec::len),
            Some(0),
            "{r}: {q}"
        );
    }
}
