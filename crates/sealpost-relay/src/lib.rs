//! sealpost's relay: durable store-and-forward of sealed messages and blobs
//! over TLS 1.3. Trusted for availability only: it never sees content,
//! only mailboxes, sizes, expiry times and hashes.
#![forbid(unsafe_code)]

pub mod client;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod tamper;
pub mod tls;

pub use server::{Config, Metrics, Relay, RunningRelay};
pub use tls::{Pin, RelayAddress};
