//! sealpost's relay: durable store-and-forward of sealed messages and blobs
//! over TLS 1.3. Trusted for availability only: it never sees content,
//! only mailboxes, sizes, expiry times and hashes.
#![forbid(unsafe_code)]

pub mod limits;
pub mod memory;
pub mod metrics;
pub mod pairing;
pub mod pooled;
pub mod server;
pub mod tamper;
pub mod tls;

/// The client (in `sealpost-client`), under the path it had here.
pub use sealpost_client::client;
pub use server::{
    lock_data_dir, open_store, relay_key_in, Config, Door, Metrics, Registration, Relay,
    RunningRelay,
};
pub use tls::{Pin, RelayAddress};
