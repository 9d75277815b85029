//! Many agents online at once: connections that register a mailbox of
//! their own, subscribe and stay idle, as a running `sealpost agent` does,
//! and pushes measured through them while they are held.
//!
//! Everything is seeded, bounded in count and time, and aimed at one relay
//! on loopback; the connections come from several loopback addresses
//! (`127.0.0.x`) so that no address holds more than the relay's share per
//! address.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sealpost_proto::relay::MailboxId;
use sealpost_proto::Identity;
use sealpost_relay::client::{ClientError, RelayClient, Submitted, Timeouts};
use sealpost_relay::RelayAddress;
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;

/// How many agents, from where, and what to measure.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    pub relay: RelayAddress,
    pub seed: u64,
    pub agents: usize,
    /// Loopback addresses the agents connect from, in turn.
    pub sources: Vec<IpAddr>,
    /// Connections opened at once while setting up.
    pub parallel: usize,
    /// Pushes measured once every agent is subscribed.
    pub pushes: usize,
    /// Time allowed for setting up, and for each push.
    pub setup_limit: Duration,
    pub push_limit: Duration,
}

/// One subscribed agent.
pub struct Agent {
    pub client: RelayClient,
    pub mailbox: MailboxId,
    pub notes: UnboundedReceiver<u64>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("mailbox", &self.mailbox)
            .finish()
    }
}

/// What [`connect_all`] and [`measure_pushes`] found.
#[derive(Debug, Default, Clone)]
pub struct IdleReport {
    pub subscribed: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub setup_secs: f64,
    /// Latencies from the submission's answer to the subscriber's `Notify`.
    pub push_ms: Vec<f64>,
    pub push_lost: usize,
    /// Notifications that reached an agent nothing was sent to.
    pub push_stray: usize,
}

impl IdleReport {
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = self.push_ms.clone();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| -> Option<f64> {
            (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize])
        };
        json!({
            "subscribed": self.subscribed,
            "failed": self.failed,
            "first_error": self.first_error,
            "setup_secs": self.setup_secs,
            "pushes": self.push_ms.len(),
            "push_lost": self.push_lost,
            "push_stray": self.push_stray,
            "push_p50_ms": q(0.5),
            "push_p99_ms": q(0.99),
            "push_max_ms": q(1.0),
        })
    }
}

async fn one(relay: &RelayAddress, from: IpAddr, secret: [u8; 32]) -> Result<Agent, ClientError> {
    let t = Timeouts::default();
    let client = RelayClient::connect_from(relay, Some(from), t).await?;
    let mut agreement = secret;
    agreement[0] ^= 0x55;
    let id = Identity::from_secret_bytes(&secret, &agreement);
    let mailbox = client.register(&id).await?;
    let notes = client.subscribe().await?;
    Ok(Agent {
        client,
        mailbox,
        notes,
    })
}

/// Opens `cfg.agents` subscribed connections, `cfg.parallel` at a time.
pub async fn connect_all(cfg: &IdleConfig, report: &mut IdleReport) -> Vec<Agent> {
    let started = Instant::now();
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
    let mut agents = Vec::with_capacity(cfg.agents);
    let mut k = 0usize;
    while k < cfg.agents && started.elapsed() < cfg.setup_limit {
        let n = cfg.parallel.max(1).min(cfg.agents - k);
        let mut set = tokio::task::JoinSet::new();
        for j in 0..n {
            let from = cfg.sources[(k + j) % cfg.sources.len().max(1)];
            let relay = cfg.relay.clone();
            let secret: [u8; 32] = rng.gen();
            set.spawn(async move { one(&relay, from, secret).await });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(a)) => agents.push(a),
                Ok(Err(e)) => {
                    report.failed += 1;
                    report.first_error.get_or_insert_with(|| e.to_string());
                }
                Err(e) => {
                    report.failed += 1;
                    report.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        k += n;
    }
    report.subscribed = agents.len();
    report.setup_secs = started.elapsed().as_secs_f64();
    agents
}

/// Submits `cfg.pushes` items, one at a time, each to a subscribed agent
/// chosen at random, and times its `Notify` from the submission's answer.
pub async fn measure_pushes(
    cfg: &IdleConfig,
    agents: &mut [Agent],
    sender: &RelayClient,
    report: &mut IdleReport,
) {
    if agents.is_empty() {
        return;
    }
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed ^ 0x9e37);
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 600;
    let mut pushed = vec![false; agents.len()];
    for _ in 0..cfg.pushes {
        let i = rng.gen_range(0..agents.len());
        pushed[i] = true;
        let a = &mut agents[i];
        while a.notes.try_recv().is_ok() {}
        let sent = Instant::now();
        match sender.submit(a.mailbox, expires, vec![1; 64]).await {
            Ok(Submitted::Accepted { .. }) => {}
            _ => {
                report.push_lost += 1;
                continue;
            }
        }
        match tokio::time::timeout(cfg.push_limit, a.notes.recv()).await {
            Ok(Some(_)) => report.push_ms.push(sent.elapsed().as_secs_f64() * 1000.0),
            _ => report.push_lost += 1,
        }
    }
    // A push goes to its mailbox's connection only.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (a, was) in agents.iter_mut().zip(pushed) {
        if !was {
            while a.notes.try_recv().is_ok() {
                report.push_stray += 1;
            }
        }
    }
}
