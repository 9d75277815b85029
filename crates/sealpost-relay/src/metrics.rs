//! Prometheus metrics over HTTP on a (by default loopback) address.
//!
//! The exposition format is a few lines of text and the only request is
//! `GET /metrics`, so this is served by hand rather than with an HTTP
//! stack: a bounded read of the request head, one response, close. Nothing
//! here costs the store anything per connection: the figures that need a
//! query (totals) are refreshed by one task every few seconds and served
//! from memory, at most a few requests are served at once, and a failing
//! `accept` is retried after a pause instead of in a busy loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sealpost_proto::relay::RefusalCode;
use sealpost_store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::server::Metrics;

/// How often the store's totals (full-table counts) are refreshed.
pub const TOTALS_EVERY: Duration = Duration::from_secs(10);
/// Requests served at once; more connections are closed at once.
const AT_ONCE: usize = 16;

/// The store's totals: (mailboxes, items, item bytes, blobs).
pub type Totals = Option<(u64, u64, u64, u64)>;

pub fn render(m: &Metrics, store: &Store, totals: Totals) -> String {
    let mut s = String::new();
    let mut by_reason = String::from("# HELP sealpost_relay_refusals_total Signed refusals by reason.\n# TYPE sealpost_relay_refusals_total counter\n");
    for code in [
        RefusalCode::UnknownMailbox,
        RefusalCode::OverQuota,
        RefusalCode::TooLarge,
        RefusalCode::Expired,
        RefusalCode::HashMismatch,
    ] {
        let n = m
            .refused_by_code
            .get(code.code() as usize)
            .map(|a| a.load(Ordering::Relaxed))
            .unwrap_or(0);
        by_reason += &format!(
            "sealpost_relay_refusals_total{{reason=\"{}\"}} {n}\n",
            code.name()
        );
    }
    let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
        s += &format!("# HELP sealpost_relay_{name} {help}\n# TYPE sealpost_relay_{name} {kind}\nsealpost_relay_{name} {v}\n");
    };
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counter(
        "connections_total",
        "Connections accepted.",
        "counter",
        g(&m.connections),
    );
    counter(
        "connections_open",
        "Connections open now.",
        "gauge",
        g(&m.connections_open),
    );
    counter(
        "connections_refused_total",
        "Connections refused by the cap or the per-address rate.",
        "counter",
        g(&m.connections_refused),
    );
    counter(
        "accepted_total",
        "Messages durably stored and acknowledged.",
        "counter",
        g(&m.accepted),
    );
    counter(
        "accepted_bytes_total",
        "Bytes of messages stored.",
        "counter",
        g(&m.accepted_bytes),
    );
    counter(
        "refused_total",
        "Submissions refused with a signed answer.",
        "counter",
        g(&m.refused),
    );
    counter(
        "delivered_total",
        "Items returned by fetches.",
        "counter",
        g(&m.fetched),
    );
    counter(
        "acked_total",
        "Items deleted by their owner.",
        "counter",
        g(&m.acked),
    );
    counter(
        "blob_bytes_total",
        "Blob bytes stored.",
        "counter",
        g(&m.blob_bytes),
    );
    counter(
        "bad_frames_total",
        "Malformed or oversized frames.",
        "counter",
        g(&m.bad_frames),
    );
    counter(
        "auth_failures_total",
        "Failed mailbox authentications.",
        "counter",
        g(&m.auth_failures),
    );
    counter(
        "timeouts_total",
        "Connections cut by a handshake, idle or frame timeout.",
        "counter",
        g(&m.timeouts),
    );
    counter(
        "rate_limited_total",
        "Requests refused by a rate limit.",
        "counter",
        g(&m.rate_limited),
    );
    let c = store.commit_stats();
    counter(
        "commits_total",
        "Store transactions committed (each one fsync).",
        "counter",
        c.commits,
    );
    counter(
        "commit_writes_total",
        "Writes committed; writes/commits is the group-commit batch size.",
        "counter",
        c.writes,
    );
    counter(
        "last_commit_microseconds",
        "Duration of the last commit, fsync included.",
        "gauge",
        c.last_commit_micros,
    );
    let (memory, disk) = store.blob_read_stats();
    counter(
        "blob_reads_memory_total",
        "Blob reads served from the pieces kept in memory since they were stored.",
        "counter",
        memory,
    );
    counter(
        "blob_reads_disk_total",
        "Blob reads served from the blob files.",
        "counter",
        disk,
    );
    let (paced, paced_micros) = store.pacing_stats();
    counter(
        "blob_runs_paced_total",
        "Runs of uploaded pieces held back for a recipient streaming their blob.",
        "counter",
        paced,
    );
    counter(
        "blob_paced_microseconds_total",
        "Time uploads were held back for streaming recipients, in all.",
        "counter",
        paced_micros,
    );
    counter(
        "connections_refused_per_address_total",
        "Connections refused because their address held its share of slots.",
        "counter",
        g(&m.refused_per_address),
    );
    counter(
        "connections_evicted_total",
        "Unauthenticated connections closed to make room for new ones.",
        "counter",
        g(&m.evicted),
    );
    counter(
        "registrations_refused_total",
        "Registrations of new mailboxes refused by the policy or the cap.",
        "counter",
        g(&m.registrations_refused),
    );
    counter(
        "storage_errors_total",
        "Store writes that failed (disk full, I/O errors); each was refused to its client.",
        "counter",
        g(&m.storage_errors),
    );
    if let Some((mailboxes, items, bytes, blobs)) = totals {
        counter("mailboxes", "Mailboxes.", "gauge", mailboxes);
        counter("queue_items", "Items waiting in mailboxes.", "gauge", items);
        counter("queue_bytes", "Bytes of items waiting.", "gauge", bytes);
        counter("blobs", "Blobs stored.", "gauge", blobs);
    }
    s + &by_reason
}

/// Serves metrics until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, store: Store) {
    let totals: Arc<std::sync::Mutex<Totals>> = Arc::default();
    let refresher = {
        let (totals, store) = (totals.clone(), store.clone());
        tokio::spawn(async move {
            loop {
                let st = store.clone();
                let t = tokio::task::spawn_blocking(move || st.totals().ok())
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
        let (metrics, store, totals) = (metrics.clone(), store.clone(), totals.clone());
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
                    let t = totals.lock().ok().and_then(|t| *t);
                    ("200 OK", render(&metrics, &store, t))
                }
                [b"GET", ..] => ("404 Not Found", "only /metrics is served here\n".to_owned()),
                _ => (
                    "405 Method Not Allowed",
                    "only GET /metrics is served here\n".to_owned(),
                ),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
