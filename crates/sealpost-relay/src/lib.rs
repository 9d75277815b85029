//! sealpost's relay: durable store-and-forward of sealed messages and blobs
//! over TLS 1.3. Trusted for availability only: it never sees content,
//! only mailboxes, sizes, expiry times and hashes.
#![forbid(unsafe_code)]

pub mod client;
pub mod limits;
pub mod metrics;
pub mod pooled;
pub mod server;
pub mod tamper;
pub mod tls;

pub use server::{Config, Metrics, Registration, Relay, RunningRelay};
pub use tls::{Pin, RelayAddress};

/// Reads exactly `n` bytes into a reused buffer (blob data: a frame's
/// last field), without zeroing it first: the bytes land in the buffer's
/// spare capacity (`read_to_end` through a `take`), which for a 1 MiB
/// piece saves clearing 1 MiB that is overwritten at once.
pub(crate) async fn read_pooled<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    n: usize,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = sealpost_proto::buffers::take(n);
    let got = rd.take(n as u64).read_to_end(&mut buf).await;
    match got {
        Ok(k) if k == n => Ok(buf),
        Ok(_) => {
            sealpost_proto::buffers::give(buf);
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
        Err(e) => {
            sealpost_proto::buffers::give(buf);
            Err(e)
        }
    }
}
