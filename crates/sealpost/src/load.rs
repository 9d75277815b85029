//! `sealpost relay load`: a bounded load generator for benchmarks. Every
//! submission counts only once the relay acknowledged it, which it does
//! only after the commit (and fsync) that made it durable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Args;
use rand_core::OsRng;
use sealpost_proto::relay::{Request, Response};
use sealpost_proto::Identity;
use sealpost_relay::client::RelayClient;
use sealpost_relay::RelayAddress;
use serde_json::json;

use crate::exit::Failure;
use crate::output::Out;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Relay address (host:port/KEY-FINGERPRINT)
    #[arg(long)]
    address: String,
    /// Concurrent client connections
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    clients: u32,
    /// Submissions in all (bounded)
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    count: u64,
    /// Payload bytes per submission
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    size: u32,
    /// Submissions each client keeps in flight (pipelining)
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    window: u32,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

pub fn run(a: LoadArgs, out: &Out) -> Result<(), Failure> {
    let addr = RelayAddress::parse(&a.address)
        .ok_or_else(|| anyhow!("invalid relay address {:?}", a.address))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let result = rt.block_on(async move {
        let me = Identity::generate(&mut OsRng);
        let setup = RelayClient::connect(&addr).await?;
        let mailbox = setup.register(&me).await?;
        let expires = crate::now() + 3600;
        let payload = vec![0x5au8; a.size as usize];
        let hash = *blake3::hash(&payload).as_bytes();
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(a.count as usize)));
        let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + Duration::from_secs(a.max_seconds);
        let mut tasks = Vec::new();
        for c in 0..a.clients as u64 {
            let n = a.count / a.clients as u64 + u64::from(c < a.count % a.clients as u64);
            let addr = addr.clone();
            let payload = payload.clone();
            let latencies = latencies.clone();
            let failures = failures.clone();
            let window = a.window as usize;
            tasks.push(tokio::spawn(async move {
                let client = Arc::new(RelayClient::connect(&addr).await?);
                let permits = Arc::new(tokio::sync::Semaphore::new(window));
                let mut waits = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    if Instant::now() > deadline {
                        break;
                    }
                    let permit = permits
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|e| anyhow!("{e}"))?;
                    let t0 = Instant::now();
                    let rx = client
                        .send(Request::Submit {
                            mailbox,
                            expires_at: expires,
                            payload_hash: hash,
                            payload: payload.clone(),
                        })
                        .await?;
                    let latencies = latencies.clone();
                    let failures = failures.clone();
                    waits.push(tokio::spawn(async move {
                        match rx.await {
                            Ok(Response::Accepted { .. }) => {
                                let us = t0.elapsed().as_micros() as u64;
                                if let Ok(mut l) = latencies.lock() {
                                    l.push(us);
                                }
                            }
                            _ => {
                                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        drop(permit);
                    }));
                }
                for w in waits {
                    let _ = w.await;
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| anyhow!("{e}"))??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mut l = latencies.lock().map_err(|_| anyhow!("lock"))?.clone();
        l.sort_unstable();
        Ok::<_, anyhow::Error>((
            l,
            elapsed,
            failures.load(std::sync::atomic::Ordering::Relaxed),
        ))
    });
    let (lat, elapsed, failed) = result?;
    let acked = lat.len() as u64;
    let rate = acked as f64 / elapsed;
    out.report(
        json!({
            "acked": acked,
            "failed": failed,
            "seconds": elapsed,
            "msgs_per_sec": rate,
            "mb_per_sec": rate * a.size as f64 / 1e6,
            "p50_ms": percentile(&lat, 0.50),
            "p99_ms": percentile(&lat, 0.99),
            "clients": a.clients,
            "window": a.window,
            "size": a.size,
        }),
        || {
            format!(
                "acked {acked} (failed {failed}) in {elapsed:.2} s: {rate:.0} msg/s, {:.1} MB/s, p50 {:.2} ms, p99 {:.2} ms\n",
                rate * a.size as f64 / 1e6,
                percentile(&lat, 0.50),
                percentile(&lat, 0.99)
            )
        },
    )?;
    if failed > 0 || acked < a.count {
        return Err(anyhow!(
            "{} of {} submissions were not acknowledged",
            a.count - acked,
            a.count
        )
        .into());
    }
    Ok(())
}
