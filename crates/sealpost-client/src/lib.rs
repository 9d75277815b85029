//! sealpost's relay client: a TLS 1.3 connection to a relay whose key is
//! pinned, requests pipelined over it, and every refusal's signature
//! checked. What agents (and the test kit) link to talk to relays, without
//! the relay's server, store or certificate making.
#![forbid(unsafe_code)]

pub mod client;
pub mod tls;
pub mod transport;

pub use client::{ClientError, RelayClient, Submitted, Timeouts};
pub use tls::{Pin, RelayAddress};
pub use transport::{Tcp, Transport};

/// Reads exactly `n` bytes into a reused buffer (blob data: a frame's
/// last field), without zeroing it first: the bytes land in the buffer's
/// spare capacity (`read_to_end` through a `take`), which for a 1 MiB
/// piece saves clearing 1 MiB that is overwritten at once.
pub async fn read_pooled<R: tokio::io::AsyncRead + Unpin>(
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
