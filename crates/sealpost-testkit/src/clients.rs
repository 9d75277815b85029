//! Hostile clients: strangers attacking a relay at every stage of a
//! connection, while honest clients measure whether they are still served.
//!
//! Everything is seeded, bounded in count and time, and aimed at one relay
//! address on loopback; connection floods come from other loopback
//! addresses (`127.0.0.x`) so that one address's share of connections is
//! exercised as well as the relay-wide cap. Kinds of attack:
//!
//! - `tcp_only`: connections that never start TLS;
//! - `half_handshakes`: the first bytes of a TLS ClientHello, then silence;
//! - `hello_idle`: TLS and `Hello`, then silence;
//! - `big_heads`: after `Hello`, a frame head announcing the largest frame
//!   (a `Submit`), and no body;
//! - `slow_bodies`: the same, then one byte of body every 200 ms;
//! - `storm`: one connection pipelining small requests as fast as it can;
//! - `stuffing`: junk submissions to a victim's mailbox (no account needed);
//! - `registrations`: fresh keys registering mailboxes;
//! - `probes`: `BlobStatus` and `BlobGet` of random blob ids.
//!
//! [`run`] holds the attack for `hold`, then closes everything and reports
//! what the relay did to the attackers and what the honest clients saw.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sealpost_proto::relay::{MailboxId, Request, MAX_FRAME};
use sealpost_proto::Identity;
use sealpost_relay::client::{ClientError, RelayClient, Submitted};
use sealpost_relay::RelayAddress;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// What to throw at the relay, and for how long.
#[derive(Debug, Clone)]
pub struct AttackConfig {
    pub relay: RelayAddress,
    pub seed: u64,
    /// Loopback addresses the floods come from, in turn.
    pub sources: Vec<IpAddr>,
    pub tcp_only: usize,
    pub half_handshakes: usize,
    pub hello_idle: usize,
    pub big_heads: usize,
    pub slow_bodies: usize,
    /// Requests the storm connection pipelines.
    pub storm: usize,
    /// Junk submissions (1 KiB each) to `victim`.
    pub stuffing: usize,
    pub victim: Option<MailboxId>,
    pub registrations: usize,
    pub probes: usize,
    /// How long connections are held open (and honest rounds go on).
    pub hold: Duration,
    /// Honest clients, each doing rounds of submit → fetch → ack to its own
    /// mailbox for the whole `hold`.
    pub honest: usize,
}

impl AttackConfig {
    /// A short attack for tests: a few hundred connections, a few seconds.
    pub fn short(relay: RelayAddress, seed: u64) -> Self {
        Self {
            relay,
            seed,
            sources: (2..6).map(|i| IpAddr::from([127, 0, 0, i])).collect(),
            tcp_only: 100,
            half_handshakes: 100,
            hello_idle: 100,
            big_heads: 100,
            slow_bodies: 20,
            storm: 20_000,
            stuffing: 200,
            victim: None,
            registrations: 200,
            probes: 500,
            hold: Duration::from_secs(4),
            honest: 2,
        }
    }
}

/// What happened, per kind of attack and to the honest clients.
#[derive(Debug, Default)]
pub struct AttackReport {
    /// Per flood kind: (opened, refused or closed by the relay before the
    /// end of the hold).
    pub floods: Vec<(&'static str, u64, u64)>,
    pub storm_answered: u64,
    pub storm_rate_limited: u64,
    pub stuffing_accepted: u64,
    pub stuffing_refused: u64,
    pub registered: u64,
    pub probes_not_found: u64,
    pub probes_revealing: u64,
    pub honest_rounds: u64,
    pub honest_failures: u64,
    /// Honest round latencies (submit → fetch → ack), milliseconds.
    pub honest_p50_ms: f64,
    pub honest_p99_ms: f64,
    pub honest_max_ms: f64,
}

impl AttackReport {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "floods": self.floods.iter().map(|(k, o, c)| json!({"kind": k, "opened": o, "closed_by_relay": c})).collect::<Vec<_>>(),
            "storm_answered": self.storm_answered,
            "storm_rate_limited": self.storm_rate_limited,
            "stuffing_accepted": self.stuffing_accepted,
            "stuffing_refused": self.stuffing_refused,
            "registered": self.registered,
            "probes_not_found": self.probes_not_found,
            "probes_revealing": self.probes_revealing,
            "honest_rounds": self.honest_rounds,
            "honest_failures": self.honest_failures,
            "honest_p50_ms": self.honest_p50_ms,
            "honest_p99_ms": self.honest_p99_ms,
            "honest_max_ms": self.honest_max_ms,
        })
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn tcp_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(to).await
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_from(cfg: &AttackConfig, src: IpAddr, to: SocketAddr) -> std::io::Result<Tls> {
    let tcp = tcp_from(src, to).await?;
    let c = sealpost_relay::tls::client_config(cfg.relay.pin)?;
    let name =
        rustls_pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(c))
        .connect(name, tcp)
        .await?;
    tls.write_all(&Request::Hello { version: 1 }.encode(1))
        .await?;
    tls.flush().await?;
    Ok(tls)
}

/// Holds a connection until `until`, doing `step` now and then; counts it
/// as closed by the relay if a read ends (EOF or error) before then.
async fn hold<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    until: Instant,
    trickle: bool,
    closed: Arc<AtomicU64>,
) {
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let step = if trickle {
            Duration::from_millis(200).min(left)
        } else {
            left
        };
        match tokio::time::timeout(step, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Ok(_)) => {}
            Err(_) if trickle => {
                if s.write_all(&[0]).await.is_err() || s.flush().await.is_err() {
                    closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            Err(_) => {}
        }
    }
}

#[derive(Clone, Copy)]
enum Flood {
    TcpOnly,
    HalfHandshake,
    HelloIdle,
    BigHead,
    SlowBody,
}

impl Flood {
    fn name(self) -> &'static str {
        match self {
            Self::TcpOnly => "tcp-only",
            Self::HalfHandshake => "half-handshake",
            Self::HelloIdle => "hello-idle",
            Self::BigHead => "big-head",
            Self::SlowBody => "slow-body",
        }
    }
}

/// Opens `n` connections of one kind (in turn from each source) and holds
/// them until `until`. Returns (opened, closed by the relay early).
async fn flood(cfg: &AttackConfig, kind: Flood, n: usize, until: Instant) -> (u64, u64) {
    let to: SocketAddr = match cfg.relay.host_port.parse() {
        Ok(a) => a,
        Err(_) => return (0, 0),
    };
    let closed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut opened = 0u64;
    for k in 0..n {
        if Instant::now() >= until {
            break;
        }
        let src = cfg.sources[k % cfg.sources.len().max(1)];
        let closed = closed.clone();
        match kind {
            Flood::TcpOnly | Flood::HalfHandshake => {
                let Ok(mut tcp) = tcp_from(src, to).await else {
                    closed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if matches!(kind, Flood::HalfHandshake) {
                    // A TLS record header announcing a 512-byte
                    // handshake message, and a few bytes of it.
                    let _ = tcp
                        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                        .await;
                }
                tasks.spawn(hold(tcp, until, false, closed));
            }
            Flood::HelloIdle | Flood::BigHead | Flood::SlowBody => {
                let Ok(mut tls) = tls_from(cfg, src, to).await else {
                    closed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if !matches!(kind, Flood::HelloIdle) {
                    let len = (MAX_FRAME as u32).to_be_bytes();
                    let _ = tls
                        .write_all(&[len[0], len[1], len[2], len[3], 0x04, 0, 0, 0, 7])
                        .await;
                    let _ = tls.flush().await;
                }
                tasks.spawn(hold(tls, until, matches!(kind, Flood::SlowBody), closed));
            }
        }
        opened += 1;
    }
    while tasks.join_next().await.is_some() {}
    (opened, closed.load(Ordering::Relaxed))
}

/// Honest rounds until `until`: submit 1 KiB to its own mailbox, fetch it,
/// ack it. Returns (latencies in ms, failures).
async fn honest(relay: RelayAddress, n: u8, until: Instant) -> (Vec<f64>, u64) {
    let mut lat = Vec::new();
    let mut failures = 0u64;
    let me = Identity::from_secret_bytes(&[0xA0 ^ n; 32], &[0x5A ^ n; 32]);
    let mut conn: Option<(RelayClient, MailboxId)> = None;
    while Instant::now() < until {
        let started = Instant::now();
        if conn.is_none() {
            match RelayClient::connect(&relay).await {
                Ok(c) => match c.register(&me).await {
                    Ok(mb) => conn = Some((c, mb)),
                    Err(_) => failures += 1,
                },
                Err(_) => failures += 1,
            }
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let Some((c, mb)) = conn.as_ref() else {
            continue;
        };
        let round = async {
            match c.submit(*mb, now_s() + 600, vec![n; 1024]).await? {
                Submitted::Accepted { .. } => {}
                Submitted::Refused(r) => {
                    return Err(ClientError::Protocol(format!("refused: {:?}", r.code)))
                }
            }
            let (items, _) = c.fetch(0, 100).await?;
            c.ack(items.iter().map(|i| i.seq).collect()).await?;
            Ok::<(), ClientError>(())
        };
        match tokio::time::timeout(Duration::from_secs(30), round).await {
            Ok(Ok(())) => lat.push(started.elapsed().as_secs_f64() * 1000.0),
            _ => {
                failures += 1;
                conn = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (lat, failures)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs every attack at once for `cfg.hold`, with the honest clients.
pub async fn run(cfg: AttackConfig) -> AttackReport {
    let until = Instant::now() + cfg.hold;
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
    let honest_tasks: Vec<_> = (0..cfg.honest)
        .map(|n| tokio::spawn(honest(cfg.relay.clone(), n as u8, until)))
        .collect();

    let floods = [
        (Flood::TcpOnly, cfg.tcp_only),
        (Flood::HalfHandshake, cfg.half_handshakes),
        (Flood::HelloIdle, cfg.hello_idle),
        (Flood::BigHead, cfg.big_heads),
        (Flood::SlowBody, cfg.slow_bodies),
    ];
    let flood_tasks: Vec<_> = floods
        .into_iter()
        .map(|(kind, n)| {
            let cfg = cfg.clone();
            tokio::spawn(async move { (kind.name(), flood(&cfg, kind, n, until).await) })
        })
        .collect();

    let mut report = AttackReport::default();
    // Stuffing, registrations, probes and the storm, each on its own
    // connection(s) from 127.0.0.1, all at once.
    let stuffing = tokio::spawn(stuff(cfg.clone(), until));
    let registrations = tokio::spawn(register_many(cfg.clone(), rng.gen(), until));
    let probes = tokio::spawn(probe(cfg.clone(), rng.gen(), until));
    let storm = tokio::spawn(storm(cfg.clone(), until));
    if let Ok((a, r)) = stuffing.await {
        report.stuffing_accepted = a;
        report.stuffing_refused = r;
    }
    report.registered = registrations.await.unwrap_or(0);
    if let Ok((nf, rev)) = probes.await {
        report.probes_not_found = nf;
        report.probes_revealing = rev;
    }
    if let Ok((ans, rl)) = storm.await {
        report.storm_answered = ans;
        report.storm_rate_limited = rl;
    }
    for t in flood_tasks {
        if let Ok((kind, (opened, closed))) = t.await {
            report.floods.push((kind, opened, closed));
        }
    }
    let mut lat = Vec::new();
    for t in honest_tasks {
        if let Ok((l, f)) = t.await {
            lat.extend(l);
            report.honest_failures += f;
        }
    }
    lat.sort_by(f64::total_cmp);
    report.honest_rounds = lat.len() as u64;
    report.honest_p50_ms = percentile(&lat, 0.5);
    report.honest_p99_ms = percentile(&lat, 0.99);
    report.honest_max_ms = lat.last().copied().unwrap_or(0.0);
    report
}

/// Junk submissions to the victim: (accepted, refused).
async fn stuff(cfg: AttackConfig, until: Instant) -> (u64, u64) {
    let (mut accepted, mut refused) = (0, 0);
    let (Some(victim), Ok(c)) = (cfg.victim, RelayClient::connect(&cfg.relay).await) else {
        return (0, 0);
    };
    for k in 0..cfg.stuffing {
        if Instant::now() >= until {
            break;
        }
        match c.submit(victim, now_s() + 600, vec![k as u8; 1024]).await {
            Ok(Submitted::Accepted { .. }) => accepted += 1,
            Ok(Submitted::Refused(_)) => refused += 1,
            Err(_) => break,
        }
    }
    (accepted, refused)
}

/// Fresh keys registering mailboxes, one connection each.
async fn register_many(cfg: AttackConfig, seed: u64, until: Instant) -> u64 {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut n = 0;
    for _ in 0..cfg.registrations {
        if Instant::now() >= until {
            break;
        }
        let id = Identity::from_secret_bytes(&rng.gen::<[u8; 32]>(), &rng.gen::<[u8; 32]>());
        let Ok(c) = RelayClient::connect(&cfg.relay).await else {
            continue;
        };
        if c.register(&id).await.is_ok() {
            n += 1;
        }
    }
    n
}

/// `BlobStatus` and `BlobGet` of random ids by a registered stranger:
/// (answered "nothing here", answered anything else).
async fn probe(cfg: AttackConfig, seed: u64, until: Instant) -> (u64, u64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let stranger = Identity::from_secret_bytes(&rng.gen::<[u8; 32]>(), &rng.gen::<[u8; 32]>());
    let Ok(c) = RelayClient::connect(&cfg.relay).await else {
        return (0, 0);
    };
    if c.register(&stranger).await.is_err() {
        return (0, 0);
    }
    let (mut nothing, mut revealing) = (0, 0);
    for _ in 0..cfg.probes {
        if Instant::now() >= until {
            break;
        }
        let blob = sealpost_proto::relay::BlobId(rng.gen());
        let status = c.blob_status(blob).await;
        let get = c.blob_get(blob, 0, 1024).await;
        match (status, get) {
            (Ok((0, false)), Err(ClientError::Server { .. })) => nothing += 1,
            _ => revealing += 1,
        }
    }
    (nothing, revealing)
}

/// Pipelined requests on one connection: (answered, rate limited).
async fn storm(cfg: AttackConfig, until: Instant) -> (u64, u64) {
    use sealpost_proto::relay::{ErrorCode, Response};
    let Ok(c) = RelayClient::connect(&cfg.relay).await else {
        return (0, 0);
    };
    let (mut answered, mut limited) = (0, 0);
    let mut pending = Vec::with_capacity(1024);
    let mut sent = 0;
    while sent < cfg.storm && Instant::now() < until {
        match c.send(Request::Status).await {
            Ok(rx) => pending.push(rx),
            Err(_) => break,
        }
        sent += 1;
        let last = sent == cfg.storm || Instant::now() >= until;
        if pending.len() >= 1024 || last {
            for rx in pending.drain(..) {
                match rx.await.ok() {
                    Some(Response::Error {
                        code: ErrorCode::RateLimited,
                        ..
                    }) => limited += 1,
                    Some(_) => answered += 1,
                    None => {}
                }
            }
        }
    }
    (answered, limited)
}
