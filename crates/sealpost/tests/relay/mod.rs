//! The relay as a real process: kill -9 campaigns and bad input.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use assert_cmd::cargo::cargo_bin;
use sealpost_proto::relay::MailboxId;
use sealpost_proto::Identity;
use sealpost_relay::client::{RelayClient, Submitted};
use sealpost_relay::RelayAddress;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `sealpost relay serve` and waits until it accepts connections.
/// The caller owns the child and reaps it; a panic here fails the test.
#[allow(clippy::zombie_processes)]
pub(crate) fn start_relay(data: &Path, port: u16) -> (Child, RelayAddress) {
    start_relay_with(data, port, &[])
}

/// `start_relay` with more `relay serve` flags.
#[allow(clippy::zombie_processes)]
pub(crate) fn start_relay_with(data: &Path, port: u16, extra: &[&str]) -> (Child, RelayAddress) {
    let mut child = Command::new(cargo_bin("sealpost"))
        .args(["relay", "serve", "--data"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("SEALPOST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn relay");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(o) = Command::new(cargo_bin("sealpost"))
            .args(["relay", "address", "--data"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .output()
        {
            if o.status.success() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let a = RelayAddress::parse(String::from_utf8_lossy(&o.stdout).trim())
                    .expect("address");
                return (child, a);
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relay did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small deterministic generator for the kill schedule (xorshift64*).
pub(crate) struct Seeded(pub(crate) u64);
impl Seeded {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn killed_relay_loses_nothing_it_acknowledged() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("relay");
    let port = free_port();
    let (mut child, addr) = start_relay(&data, port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let owner = Identity::from_secret_bytes(&[4; 32], &[5; 32]);
    let mailbox: MailboxId = rt.block_on(async {
        let c = RelayClient::connect(&addr).await.expect("connect");
        c.register(&owner).await.expect("register")
    });

    // Submitters: each payload is unique; it is recorded only once the
    // relay acknowledged it.
    let acked: Arc<Mutex<HashMap<[u8; 32], Vec<u8>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut submitters = Vec::new();
    for w in 0..8u32 {
        let (addr, acked, stop) = (addr.clone(), acked.clone(), stop.clone());
        submitters.push(rt.spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(c) = RelayClient::connect(&addr).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                loop {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    n += 1;
                    let mut payload = format!("worker {w} message {n} ").into_bytes();
                    payload.resize(200 + (n as usize * 37) % 3000, b'x');
                    match c.submit(mailbox, now() + 3600, payload.clone()).await {
                        Ok(Submitted::Accepted { .. }) => {
                            acked
                                .lock()
                                .expect("lock")
                                .insert(*blake3::hash(&payload).as_bytes(), payload);
                        }
                        Ok(other) => panic!("refused: {other:?}"),
                        Err(_) => break, // the relay died: reconnect
                    }
                }
            }
        }));
    }

    let mut rng = Seeded(0x5ea1_0057);
    let kills = 20;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(100 + rng.next() % 250));
        child.kill().expect("kill -9"); // SIGKILL
        child.wait().expect("reap");
        let (c, _) = start_relay(&data, port);
        child = c;
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for s in submitters {
            let _ = s.await;
        }
    });

    // Everything acknowledged must be there, intact.
    let stored: HashMap<[u8; 32], Vec<u8>> = rt.block_on(async {
        let c = RelayClient::connect(&addr).await.expect("connect");
        c.auth(&owner).await.expect("auth");
        let mut all = HashMap::new();
        let mut after = 0;
        loop {
            let (items, more) = c.fetch(after, 4096).await.expect("fetch");
            for i in &items {
                assert_eq!(
                    blake3::hash(&i.payload).as_bytes(),
                    &i.payload_hash,
                    "item {} damaged",
                    i.seq
                );
                all.insert(i.payload_hash, i.payload.clone());
            }
            match items.last() {
                Some(last) if more => after = last.seq,
                _ => break,
            }
        }
        all
    });
    let acked = acked.lock().expect("lock");
    let lost = acked.keys().filter(|h| !stored.contains_key(*h)).count();
    eprintln!(
        "kills {kills}, acked {}, stored {}, lost {lost}",
        acked.len(),
        stored.len()
    );
    println!("acked {}, lost {lost}", acked.len());
    assert!(acked.len() > 100, "too few submissions to mean anything");
    assert_eq!(lost, 0);
    child.kill().expect("kill");
    let _ = child.wait();
}

#[test]
fn a_thousand_idle_connections_do_not_stop_service() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let (mut child, addr) = start_relay(&dir.path().join("relay"), port);
    let pid = child.id();
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    // From four other addresses, 250 each (one address may hold 256).
    let relay_at: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let idle = rt.block_on(async {
        let mut idle = Vec::new();
        for k in 0..1000u16 {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind(([127, 0, 0, 2 + (k % 4) as u8], 0).into())
                .expect("bind");
            idle.push(s.connect(relay_at).await.expect("idle connection"));
        }
        idle
    });
    rt.block_on(async {
        let c = RelayClient::connect(&addr)
            .await
            .expect("served while 1000 are idle");
        let mb = c
            .register(&Identity::from_secret_bytes(&[1; 32], &[2; 32]))
            .await
            .expect("register");
        for _ in 0..100 {
            assert!(matches!(
                c.submit(mb, now() + 60, vec![1; 1000])
                    .await
                    .expect("submit"),
                Submitted::Accepted { .. }
            ));
        }
    });
    let peak = rss(pid);
    eprintln!("relay peak RSS with 1000 idle connections: {peak} KiB");
    assert!(peak < 256 * 1024, "peak RSS {peak} KiB");
    drop(idle);
    child.kill().expect("kill");
    let _ = child.wait();
}

#[test]
fn config_file_metrics_status_and_scrub() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("relay");
    let (port, mport) = (free_port(), free_port());
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata = \"{}\"\nmetrics = \"127.0.0.1:{mport}\"\nmailbox_quota = 1000000\nidle_timeout = 60\n",
            data.display()
        ),
    )
    .expect("config");
    // An unknown option is refused with the file named.
    std::fs::write(
        dir.path().join("bad.toml"),
        "listen = \"127.0.0.1:1\"\nbogus = 1\n",
    )
    .expect("write");
    let o = Command::new(cargo_bin("sealpost"))
        .args(["relay", "serve", "--config"])
        .arg(dir.path().join("bad.toml"))
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.toml"));

    let mut child = Command::new(cargo_bin("sealpost"))
        .args(["relay", "serve", "--config"])
        .arg(&cfg)
        .env("SEALPOST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relay did not start from its config file");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(cargo_bin("sealpost"))
        .args(["relay", "address", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .expect("address");
    let addr = RelayAddress::parse(String::from_utf8_lossy(&out.stdout).trim()).expect("address");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let c = RelayClient::connect(&addr).await.expect("connect");
        let mb = c
            .register(&Identity::from_secret_bytes(&[1; 32], &[2; 32]))
            .await
            .expect("register");
        assert!(matches!(
            c.submit(mb, now() + 600, vec![3; 500]).await,
            Ok(Submitted::Accepted { .. })
        ));
        // The quota from the file applies.
        assert!(matches!(
            c.submit(mb, now() + 600, vec![3; 999_999]).await,
            Ok(Submitted::Refused(_))
        ));
    });
    let mut m = std::net::TcpStream::connect(("127.0.0.1", mport)).expect("metrics");
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("get");
    let mut body = String::new();
    m.read_to_string(&mut body).expect("read");
    assert!(body.contains("sealpost_relay_accepted_total 1\n"), "{body}");
    assert!(body.contains("sealpost_relay_refused_total 1\n"), "{body}");
    assert!(
        body.contains("sealpost_relay_refusals_total{reason=\"over_quota\"} 1\n"),
        "{body}"
    );
    // Latency histograms: a commit was made (the registration and the
    // accepted message), each counted in its bucket and the total.
    assert!(
        body.contains("# TYPE sealpost_relay_commit_duration_seconds histogram"),
        "{body}"
    );
    // A sample's value, by its name.
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    let commits = value("sealpost_relay_commit_duration_seconds_count");
    assert!(commits >= 2.0, "{body}");
    // Every commit's batch counted, with the writes it carried.
    let batches = value("sealpost_relay_commit_batch_writes_count");
    assert!(batches >= 2.0, "{body}");
    assert!(
        value("sealpost_relay_commit_batch_writes_sum") >= batches,
        "{body}"
    );
    assert!(
        body.contains("sealpost_relay_blob_sync_duration_seconds_bucket{le=\"+Inf\"} 0"),
        "{body}"
    );
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics text: {body}"
    );
    // Only GET /metrics is served.
    for (req, status) in [
        (&b"POST /metrics HTTP/1.1\r\n\r\n"[..], "405"),
        (&b"GET /admin HTTP/1.1\r\n\r\n"[..], "404"),
    ] {
        let mut m = std::net::TcpStream::connect(("127.0.0.1", mport)).expect("metrics");
        m.write_all(req).expect("req");
        let mut answer = String::new();
        m.read_to_string(&mut answer).expect("read");
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }

    // SIGTERM: a clean stop.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    let o = Command::new(cargo_bin("sealpost"))
        .args(["--json", "relay", "status", "--data"])
        .arg(&data)
        .output()
        .expect("status");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (v["mailboxes"].as_u64(), v["items"].as_u64()),
        (Some(1), Some(1))
    );
    let o = Command::new(cargo_bin("sealpost"))
        .args(["relay", "scrub", "--data"])
        .arg(&data)
        .output()
        .expect("scrub");
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 damaged"));
}

#[test]
fn a_hostile_relay_is_only_started_with_a_valid_spec_and_says_so() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let bad = Command::new(cargo_bin("sealpost"))
        .args(["relay", "serve", "--data"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--hostile", "seed=1,teleport=0.5"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("teleport") && err.contains("forge-refusal"),
        "{err}"
    );

    let mut child = Command::new(cargo_bin("sealpost"))
        .args(["relay", "serve", "--data"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--hostile", "seed=1,all=0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("HOSTILE TESTING RELAY"), "{line}");
}

fn sealpost(args: &[&str]) -> std::process::Output {
    Command::new(cargo_bin("sealpost"))
        .args(args)
        .env("SEALPOST_LOG", "warn")
        .output()
        .expect("run")
}

/// Each relay setting is declared once: a flag and the same key in the
/// file, sizes and durations in human units, and every default the help
/// states is the one `relay config` shows in effect (they drifted apart
/// when the file and the flags were declared separately).
#[test]
fn relay_settings_are_declared_once_with_true_defaults() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("d");
    let data = data.to_str().expect("utf8");
    let o = sealpost(&["--json", "relay", "config", "--data", data]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let eff: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let help = String::from_utf8(sealpost(&["relay", "serve", "--help"]).stdout).expect("utf8");
    let mut checked = 0;
    for (key, v) in eff.as_object().expect("object") {
        let flag = format!("--{} <", key.replace('_', "-"));
        let Some(at) = help.find(&flag) else {
            continue;
        };
        // The option's text runs to the next line that starts an option
        // (indented at most 6 columns; its description is indented 10).
        let block: Vec<&str> = help[at..]
            .lines()
            .enumerate()
            .take_while(|(i, l)| {
                *i == 0 || !(l.trim_start().starts_with('-') && l.len() - l.trim_start().len() <= 6)
            })
            .map(|(_, l)| l)
            .collect();
        let text = block
            .join(" ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let Some(d) = text.find("[default: ") else {
            continue;
        };
        let stated = text[d + 10..].split(']').next().unwrap_or("");
        let shown = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if key == "data" || key == "public_address" || key == "max_connections" {
            continue; // described in words, not a value
        }
        assert_eq!(
            stated, shown,
            "--{key}: help says {stated:?}, in effect {shown:?}"
        );
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} defaults checked:\n{help}");

    // Human units in flags and in the file; the file round-trips.
    let o = sealpost(&[
        "relay",
        "config",
        "--data",
        data,
        "--max-blob",
        "1GiB",
        "--idle-timeout",
        "90s",
        "--mailbox-quota",
        "500MB",
    ]);
    let text = String::from_utf8(o.stdout).expect("utf8");
    assert!(text.contains("max_blob = \"1GiB\""), "{text}");
    assert!(text.contains("idle_timeout = \"1m 30s\""), "{text}");
    assert!(text.contains("mailbox_quota = 500000000"), "{text}");
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, &text).expect("write");
    let again = sealpost(&["relay", "config", "--config", file.to_str().expect("utf8")]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), text, "round trip");
    // The file's old key `names` and integer seconds still work.
    std::fs::write(
        &file,
        "names = [\"relay.test\"]\nidle_timeout = 60\nmax_blob = \"3MiB\"\n",
    )
    .expect("write");
    let o = sealpost(&[
        "relay",
        "config",
        "--config",
        file.to_str().expect("utf8"),
        "--data",
        data,
    ]);
    let text = String::from_utf8(o.stdout).expect("utf8");
    assert!(
        text.contains("public_address = \"relay.test:7443\""),
        "{text}"
    );
    assert!(text.contains("idle_timeout = \"1m\""), "{text}");
    assert!(text.contains("max_blob = \"3MiB\""), "{text}");
    // Bad values are usage errors that show examples.
    let o = sealpost(&["relay", "config", "--max-blob", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("2GiB"), "{o:?}");
    let o = sealpost(&["relay", "config", "--data", data, "--max-message", "2MiB"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("at most 1MiB"),
        "{o:?}"
    );
}

/// The address agents pin names the public host, and `relay address`
/// prints it with no flags (it printed the listen address, and forgot
/// --name).
#[test]
fn relay_address_remembers_the_public_address() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("d");
    let port = free_port();
    let (mut child, _) = start_relay_with(&data, port, &["--name", "localhost"]);
    let o = sealpost(&["relay", "address", "--data", data.to_str().expect("utf8")]);
    let _ = child.kill();
    let _ = child.wait();
    let printed = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let a = RelayAddress::parse(&printed).expect("an address");
    assert_eq!(a.host_port, format!("localhost:{port}"), "{printed}");
    // An explicit public address wins over the name.
    let port = free_port();
    let (mut child, _) = start_relay_with(
        &data,
        port,
        &[
            "--name",
            "localhost",
            "--public-address",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let o = sealpost(&["relay", "address", "--data", data.to_str().expect("utf8")]);
    let _ = child.kill();
    let _ = child.wait();
    let a = RelayAddress::parse(String::from_utf8_lossy(&o.stdout).trim()).expect("address");
    assert_eq!(a.host_port, format!("127.0.0.1:{port}"));
}
