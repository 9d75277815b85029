//! The agent's link to its relay: a pinned, authenticated connection that
//! is re-established with exponential backoff when it drops.

use std::time::Duration;

use rand_core::{OsRng, RngCore};
use sealpost_client::client::{ClientError, RelayClient, Timeouts};
use sealpost_client::{RelayAddress, Tcp, Transport};
use sealpost_proto::relay::{ErrorCode, MailboxId};
use sealpost_proto::retry::Backoff;
use sealpost_proto::Identity;
use std::sync::Arc;

/// What a link does after the TLS handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkAuth {
    /// Register the mailbox (idempotent) and authenticate: the home relay.
    Register,
    /// Authenticate to an existing mailbox.
    Auth,
    /// Nothing: submitting to someone else's mailbox needs no account.
    Anonymous,
}

/// A connection to one relay, authenticated to the identity's mailbox.
#[derive(Debug)]
pub struct RelayLink {
    addr: RelayAddress,
    client: Option<RelayClient>,
    backoff: Backoff,
    /// Attempts before an operation gives up and reports the failure.
    pub max_attempts: u32,
    /// How the link proves who it is after connecting.
    pub auth: LinkAuth,
    mailbox: Option<MailboxId>,
    /// How long to wait on the relay before giving up on a connection.
    pub timeouts: Timeouts,
    /// How connections are made (TCP unless a test says otherwise).
    pub transport: Arc<dyn Transport>,
}

/// Failures worth a reconnect: the connection, not the request, failed.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed => true,
        ClientError::Server { code, .. } => {
            matches!(code, ErrorCode::Internal | ErrorCode::RateLimited)
        }
        _ => false,
    }
}

fn unit_random() -> f64 {
    (OsRng.next_u32() as f64) / (u32::MAX as f64 + 1.0)
}

impl RelayLink {
    pub fn new(addr: RelayAddress) -> Self {
        Self {
            addr,
            client: None,
            backoff: Backoff::default(),
            max_attempts: 8,
            auth: LinkAuth::Register,
            mailbox: None,
            timeouts: Timeouts::default(),
            transport: Arc::new(Tcp),
        }
    }

    /// A link for submitting only (no authentication).
    pub fn anonymous(addr: RelayAddress) -> Self {
        let mut l = Self::new(addr);
        l.auth = LinkAuth::Anonymous;
        l
    }

    /// Drops the connection (the next call reconnects).
    pub fn disconnect(&mut self) {
        self.client = None;
    }

    /// True while a connection is up (it may still fail on the next call).
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    pub fn address(&self) -> &RelayAddress {
        &self.addr
    }

    /// The mailbox this link is authenticated to (after the first call).
    pub fn mailbox(&self) -> Option<MailboxId> {
        self.mailbox
    }

    async fn connect(&mut self, me: &Identity) -> Result<(), ClientError> {
        let c = RelayClient::connect_via(&*self.transport, &self.addr, None, self.timeouts).await?;
        self.mailbox = match self.auth {
            LinkAuth::Register => Some(c.register(me).await?),
            LinkAuth::Auth => Some(c.auth(me).await?),
            LinkAuth::Anonymous => None,
        };
        self.client = Some(c);
        Ok(())
    }

    /// The authenticated connection, connecting first if there is none (no
    /// retries: for a caller that drives several requests itself and
    /// resumes from the relay's state after a failure).
    pub async fn client(&mut self, me: &Identity) -> Result<&RelayClient, ClientError> {
        if self.client.is_none() {
            self.connect(me).await?;
        }
        self.client.as_ref().ok_or(ClientError::Closed)
    }

    /// Runs `op` on an authenticated connection, reconnecting with backoff
    /// when the connection fails, up to `max_attempts` times. Errors about
    /// the request itself are returned at once.
    pub async fn call<T>(
        &mut self,
        me: &Identity,
        op: impl AsyncFn(&RelayClient) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut attempt = 0u32;
        loop {
            let result = match self.client.as_ref() {
                Some(c) => op(c).await,
                None => match self.connect(me).await {
                    Ok(()) => match self.client.as_ref() {
                        Some(c) => op(c).await,
                        None => Err(ClientError::Closed),
                    },
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if is_transient(&e) && attempt + 1 < self.max_attempts => {
                    self.client = None;
                    let wait = self.backoff.delay(attempt, unit_random());
                    tracing::debug!("relay {}: {e}; retrying in {wait:?}", self.addr);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    if is_transient(&e) {
                        self.client = None;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A short backoff for tests and demos on loopback.
    pub fn fast_backoff() -> Backoff {
        Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(500),
        }
    }
}
