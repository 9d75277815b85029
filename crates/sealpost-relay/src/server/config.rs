//! What a relay is configured with, and who may register.

use super::*;

/// Everything a relay is configured with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub limits: Limits,
    pub max_connections: usize,
    /// Connections one source address may hold open at once: one address
    /// cannot take every slot.
    pub max_connections_per_address: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a connection that has not authenticated to a mailbox may
    /// stay silent between requests (a sender submits and goes; an owner's
    /// agent authenticates and may then idle for `idle_timeout`).
    pub unauthenticated_idle_timeout: Duration,
    /// Time allowed to receive the rest of a frame once it started, and
    /// for the client to take a batch of answers: a client trickling bytes
    /// (slow loris), or reading none, is cut off after this.
    pub frame_timeout: Duration,
    pub sweep_interval: Duration,
    /// A configured certificate and key (PEM) instead of the self-signed one.
    pub cert_files: Option<(PathBuf, PathBuf)>,
    /// Names for the self-signed certificate.
    pub cert_names: Vec<String>,
    /// The relay's signing key (32 bytes, for signed refusals) from a
    /// file the operator made and several nodes share, instead of
    /// `DATA/relay-signing.key` (created on first start). Must exist.
    pub signing_key_file: Option<PathBuf>,
    /// Submissions one connection may have waiting for their commit.
    pub max_in_flight: usize,
    /// Payload bytes one connection may have waiting for their commit.
    pub max_in_flight_bytes: usize,
    /// Payload bytes all connections together may have waiting: with the
    /// per-connection bound and the response queue bound this caps the
    /// memory a flood of large submissions can take.
    pub max_total_in_flight_bytes: usize,
    /// Requests per second one connection may make (and its burst).
    pub rate_per_connection: (f64, f64),
    /// New connections per second from one address (and its burst).
    pub rate_per_address: (f64, f64),
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Who may register a new mailbox (the cap is `limits.max_mailboxes`).
    pub registration: Registration,
    /// Largest message (sealed container) taken by `Submit`; at most
    /// `relay::MAX_MESSAGE`.
    pub max_message: usize,
    /// A misbehaving relay for tests and demonstrations (never set in
    /// normal operation); see [`crate::tamper`].
    pub tamper: Option<Arc<dyn Tamper>>,
    /// The `HOST:PORT` agents connect to, if known: kept with the key's pin
    /// in `DATA/address` (for `relay address`), written before the
    /// listener is bound so no client can reach a relay whose kept address
    /// is still a previous run's. `None` removes the file.
    pub public_address: Option<String>,
    /// How this relay hands items on to other relays (PROTOCOL 6.8).
    pub forwarding: Forwarding,
    /// Which relays this one takes forwarded items from, and how fast.
    pub peers: Peers,
    /// Rendezvous slots for pairing by code (PROTOCOL §10); `max_slots`
    /// 0 turns pairing off.
    pub pairing: crate::pairing::PairLimits,
    /// The ledger on PostgreSQL (`postgres://…`), shared by every relay
    /// node on the same database, instead of SQLite in `data/store`. Blob
    /// bytes stay in `data/store/blobs` (see docs/OPERATIONS.md).
    pub database: Option<String>,
    /// Blob bytes in an S3-compatible bucket (`s3://BUCKET?endpoint=…`,
    /// keys from `$AWS_ACCESS_KEY_ID`/`$AWS_SECRET_ACCESS_KEY`) instead of
    /// `data/store/blobs`.
    pub blobs: Option<String>,
}

/// What this relay takes from other relays that proved their key
/// (`PeerAuth`, PROTOCOL 6.8) and forward items to its mailboxes.
#[derive(Clone, Debug)]
pub struct Peers {
    /// Relay keys (Ed25519) whose forwarded items are refused (signed,
    /// code 6).
    pub deny: std::collections::HashSet<[u8; 32]>,
    /// If set, only these relay keys may forward items here.
    pub allow: Option<std::collections::HashSet<[u8; 32]>>,
    /// Forwarded items and blob pieces per second one relay key may hand
    /// in, over all its connections (and its burst); past it, error
    /// `RateLimited` (the relay tries again later).
    pub rate: (f64, f64),
}

impl Default for Peers {
    fn default() -> Self {
        Self {
            deny: Default::default(),
            allow: None,
            rate: (5_000.0, 20_000.0),
        }
    }
}

impl Peers {
    /// Whether items forwarded by the relay of `key` are refused.
    pub fn refuses(&self, key: &[u8; 32]) -> bool {
        self.deny.contains(key) || self.allow.as_ref().is_some_and(|a| !a.contains(key))
    }
}

/// Who may register a new mailbox on a relay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Registration {
    /// Any key: a relay anyone may get a mailbox on (the default).
    #[default]
    Open,
    /// Only these Ed25519 signing keys (from contact cards).
    AllowList(std::collections::HashSet<[u8; 32]>),
    /// No new mailboxes; existing ones go on working.
    Closed,
}

impl Registration {
    /// Why a new mailbox for `key` is refused, if it is.
    pub fn refuses(&self, key: &[u8; 32]) -> Option<&'static str> {
        match self {
            Self::Open => None,
            Self::AllowList(keys) if keys.contains(key) => None,
            Self::AllowList(_) => Some(
                "this relay registers only the keys its operator allowed; send them your card (`sealpost id`)",
            ),
            Self::Closed => Some("this relay registers no new mailboxes"),
        }
    }
}

impl Config {
    pub fn new(listen: SocketAddr, data: PathBuf) -> Self {
        Self {
            listen,
            data,
            limits: Limits::default(),
            max_connections: 4096,
            max_connections_per_address: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            unauthenticated_idle_timeout: Duration::from_secs(30),
            frame_timeout: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(60),
            cert_files: None,
            cert_names: Vec::new(),
            signing_key_file: None,
            max_in_flight: 1024,
            max_in_flight_bytes: 16 << 20,
            max_total_in_flight_bytes: 128 << 20,
            rate_per_connection: (50_000.0, 10_000.0),
            rate_per_address: (500.0, 2_000.0),
            metrics: None,
            registration: Registration::Open,
            max_message: relay::MAX_MESSAGE,
            tamper: None,
            public_address: None,
            forwarding: Forwarding::default(),
            peers: Peers::default(),
            pairing: crate::pairing::PairLimits::default(),
            database: None,
            blobs: None,
        }
    }
}
