//! Prometheus metrics over HTTP on a (by default loopback) address.
//!
//! The figures are encoded by `prometheus-client` (OpenMetrics text:
//! counters, gauges, and histograms of commit and blob-sync latency). The
//! only request is `GET /metrics`, so the HTTP side is served by hand
//! rather than with an HTTP stack: a bounded read of the request line, one
//! response, close. Nothing here costs the store anything per connection:
//! the figures that need a query (totals) are refreshed by one task every
//! few seconds and served from memory, at most a few requests are served at
//! once, and a failing `accept` is retried after a pause instead of in a
//! busy loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sealpost_proto::relay::RefusalCode;
use sealpost_store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::server::Metrics;

/// How often the store's totals (full-table counts) are refreshed.
pub const TOTALS_EVERY: Duration = Duration::from_secs(10);
/// Requests served at once; more connections are closed at once.
const AT_ONCE: usize = 16;

/// The store's totals, once read.
pub type Totals = Option<sealpost_store::Totals>;

/// The relay's figures at scrape time: counters kept as atomics where
/// they happen, the store's counters, and the cached totals. Encoded by
/// `prometheus-client` (names, `_total` suffixes, escaping, `# EOF`).
#[derive(Debug)]
struct Figures {
    metrics: Arc<Metrics>,
    store: Store,
    totals: Arc<std::sync::Mutex<Totals>>,
}

impl Collector for Figures {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.metrics;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, v: u64| -> Result<(), std::fmt::Error> {
            enc.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)
        };
        counter("connections", "Connections accepted.", g(&m.connections))?;
        counter(
            "connections_refused",
            "Connections refused by the cap or the per-address rate.",
            g(&m.connections_refused),
        )?;
        counter(
            "connections_refused_per_address",
            "Connections refused because their address held its share of slots.",
            g(&m.refused_per_address),
        )?;
        counter(
            "connections_evicted",
            "Unauthenticated connections closed to make room for new ones.",
            g(&m.evicted),
        )?;
        counter(
            "accepted",
            "Messages durably stored and acknowledged.",
            g(&m.accepted),
        )?;
        counter(
            "accepted_bytes",
            "Bytes of messages stored.",
            g(&m.accepted_bytes),
        )?;
        counter(
            "refused",
            "Submissions refused with a signed answer.",
            g(&m.refused),
        )?;
        counter("delivered", "Items returned by fetches.", g(&m.fetched))?;
        counter("acked", "Items deleted by their owner.", g(&m.acked))?;
        counter("blob_bytes", "Blob bytes stored.", g(&m.blob_bytes))?;
        counter(
            "bad_frames",
            "Malformed or oversized frames.",
            g(&m.bad_frames),
        )?;
        counter(
            "auth_failures",
            "Failed mailbox authentications.",
            g(&m.auth_failures),
        )?;
        counter(
            "timeouts",
            "Connections cut by a handshake, idle or frame timeout.",
            g(&m.timeouts),
        )?;
        counter(
            "rate_limited",
            "Requests refused by a rate limit.",
            g(&m.rate_limited),
        )?;
        counter(
            "pair_opened",
            "Pairing invitations opened (rendezvous slots, PROTOCOL 10).",
            g(&m.pair_opened),
        )?;
        counter(
            "pair_joined",
            "Pairing invitations joined (each one attempt at a code).",
            g(&m.pair_joined),
        )?;
        counter(
            "registrations_refused",
            "Registrations of new mailboxes refused by the policy or the cap.",
            g(&m.registrations_refused),
        )?;
        counter(
            "storage_errors",
            "Store writes that failed (disk full, I/O errors); each was refused to its client.",
            g(&m.storage_errors),
        )?;
        counter(
            "forward_queued",
            "Items taken into the forward queue for this relay's mailbox owners.",
            g(&m.forward_queued),
        )?;
        counter(
            "forwarded",
            "Items handed on to the next relay (it answered Accepted).",
            g(&m.forwarded),
        )?;
        counter(
            "forward_refused",
            "Items the next relay refused; the sender was told in a notice.",
            g(&m.forward_refused),
        )?;
        counter(
            "forward_given_up",
            "Items that expired before the next relay took them; the sender was told in a notice.",
            g(&m.forward_given_up),
        )?;
        counter(
            "forward_blob_bytes",
            "Bytes of blobs handed on to next relays (durable there).",
            g(&m.forward_blob_bytes),
        )?;
        counter(
            "forward_failures",
            "Attempts to hand items on that failed and will be tried again.",
            g(&m.forward_failures),
        )?;
        let c = self.store.commit_stats();
        counter(
            "commits",
            "Store transactions committed (each one fsync).",
            c.commits,
        )?;
        counter(
            "commit_writes",
            "Writes committed; writes/commits is the group-commit batch size.",
            c.writes,
        )?;
        counter(
            "db_pages_given_back",
            "Free database pages given back to the file system (in steps while the writer is idle).",
            c.pages_given_back,
        )?;
        let (memory, disk) = self.store.blob_read_stats();
        counter(
            "blob_reads_memory",
            "Blob reads served from the pieces kept in memory since they were stored.",
            memory,
        )?;
        counter(
            "blob_reads_disk",
            "Blob reads served from the blob files.",
            disk,
        )?;
        let (paced, paced_micros) = self.store.pacing_stats();
        counter(
            "blob_runs_paced",
            "Runs of uploaded pieces held back for a recipient streaming their blob.",
            paced,
        )?;
        counter(
            "blob_paced_microseconds",
            "Time uploads were held back for streaming recipients, in all.",
            paced_micros,
        )?;
        {
            let mut fam = enc.encode_descriptor(
                "refusals",
                "Signed refusals by reason.",
                None,
                MetricType::Counter,
            )?;
            for code in [
                RefusalCode::UnknownMailbox,
                RefusalCode::OverQuota,
                RefusalCode::TooLarge,
                RefusalCode::Expired,
                RefusalCode::HashMismatch,
                RefusalCode::NotForwarded,
            ] {
                let n = m
                    .refused_by_code
                    .get(code.code() as usize)
                    .map(|a| a.load(Ordering::Relaxed))
                    .unwrap_or(0);
                fam.encode_family(&[("reason", code.name())])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let mut gauge = |name: &str, help: &str, v: u64| -> Result<(), std::fmt::Error> {
            enc.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&v)
        };
        gauge(
            "connections_open",
            "Connections open now.",
            g(&m.connections_open),
        )?;
        gauge(
            "last_commit_microseconds",
            "Duration of the last commit, fsync included.",
            c.last_commit_micros,
        )?;
        if let Some(sealpost_store::Totals {
            mailboxes,
            items,
            item_bytes: bytes,
            blobs,
        }) = self.totals.lock().ok().and_then(|t| *t)
        {
            gauge("mailboxes", "Mailboxes.", mailboxes)?;
            gauge("queue_items", "Items waiting in mailboxes.", items)?;
            gauge("queue_bytes", "Bytes of items waiting.", bytes)?;
            gauge("blobs", "Blobs stored.", blobs)?;
        }
        Ok(())
    }
}

/// Everything `GET /metrics` answers, under the prefix `sealpost_relay`.
fn registry(
    metrics: Arc<Metrics>,
    store: Store,
    totals: Arc<std::sync::Mutex<Totals>>,
) -> Registry {
    let mut r = Registry::with_prefix("sealpost_relay");
    let l = store.latencies().clone();
    r.register(
        "commit_duration_seconds",
        "Store commits (SQLite transaction with its fsync), from begin to durable.",
        l.commit,
    );
    r.register(
        "commit_batch_writes",
        "Writes carried by each commit of the embedded store (group commit: what queued while the previous commit was made durable); empty on PostgreSQL.",
        l.commit_batch,
    );
    r.register(
        "blob_sync_duration_seconds",
        "fdatasync of blob pieces before they are acknowledged.",
        l.blob_sync,
    );
    r.register_collector(Box::new(Figures {
        metrics,
        store,
        totals,
    }));
    r
}

/// Serves metrics until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, store: Store) {
    let totals: Arc<std::sync::Mutex<Totals>> = Arc::default();
    let refresher = {
        let (totals, store) = (totals.clone(), store.clone());
        tokio::spawn(async move {
            loop {
                let st = store.clone();
                // Full-table counts: off the runtime's workers.
                let rt = tokio::runtime::Handle::current();
                let t = tokio::task::spawn_blocking(move || rt.block_on(st.totals()).ok())
                    .await
                    .ok()
                    .flatten();
                if let Ok(mut slot) = totals.lock() {
                    *slot = t;
                }
                tokio::time::sleep(TOTALS_EVERY).await;
            }
        })
    };
    let _stop_refresher = AbortOnDrop(refresher);
    let registry = Arc::new(registry(metrics, store, totals));
    let slots = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}; pausing");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 2048];
            let mut got = 0;
            // The request line is all that matters; read until it ends.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while got < head.len() && !head[..got].contains(&b'\n') {
                    match sock.read(&mut head[got..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = head[..got].split(|&b| b == b'\n').next().unwrap_or(&[]);
            let (status, body) = match line.split(|&b| b == b' ').collect::<Vec<_>>()[..] {
                [b"GET", b"/metrics" | b"/", ..] => {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => ("200 OK", body),
                        Err(_) => ("500 Internal Server Error", "cannot encode\n".to_owned()),
                    }
                }
                [b"GET", ..] => ("404 Not Found", "only /metrics is served here\n".to_owned()),
                _ => (
                    "405 Method Not Allowed",
                    "only GET /metrics is served here\n".to_owned(),
                ),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
            drop(permit);
        });
    }
}

/// Aborts a task when dropped (the refresher ends with the server).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
