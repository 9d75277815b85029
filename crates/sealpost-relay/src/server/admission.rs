//! Admitting connections: slots per source address, and eviction of the oldest idle unauthenticated connection when the relay is full.

use super::*;

/// One open connection counted against its source address; given back
/// when dropped.
pub(crate) struct AddressSlot {
    pub(crate) shared: Arc<Shared>,
    pub(crate) ip: IpAddr,
}

/// Admits a new connection from `peer` by its address's rate and its
/// share of connections (counted and logged when refused): the slot it
/// holds while open, or why it was refused. The accept loop and
/// [`crate::Door`] both go through here.
pub(crate) fn admit(shared: &Arc<Shared>, peer: SocketAddr) -> Result<AddressSlot, &'static str> {
    let allowed = shared
        .per_address
        .lock()
        .map(|mut p| p.try_take(Source::of_ip(peer.ip()), std::time::Instant::now()))
        .unwrap_or(true);
    if !allowed {
        shared
            .metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        shared.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return Err("too many new connections from this address");
    }
    AddressSlot::take(shared, peer.ip()).ok_or_else(|| {
        shared
            .metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        shared
            .metrics
            .refused_per_address
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "refused: the address holds its share of connections");
        "the address holds its share of connections"
    })
}

impl AddressSlot {
    pub(crate) fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let mut open = shared.open_per_address.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= shared.config.max_connections_per_address {
            return None;
        }
        *n += 1;
        Some(Self {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.shared.open_per_address.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

/// A connection that may be closed to make room: one not authenticated to
/// a mailbox, while it waits idle (in its TLS handshake, or between
/// requests). A connection busy with a request — a sender in the middle
/// of an upload — is never chosen.
pub(crate) struct Evictable {
    pub(crate) shared: Arc<Shared>,
    /// Connection number: the oldest (smallest) idle one goes first.
    pub(crate) id: u64,
    pub(crate) evict: Notify,
}

impl Evictable {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        Self {
            shared: shared.clone(),
            id: shared.next_connection.fetch_add(1, Ordering::Relaxed),
            evict: Notify::new(),
        }
    }

    /// Waits for `fut` while listed as evictable; an eviction ends the
    /// wait with `ConnectionAborted`.
    pub(crate) async fn idle<T>(self: &Arc<Self>, fut: impl Future<Output = T>) -> io::Result<T> {
        if let Ok(mut m) = self.shared.unauthenticated.lock() {
            m.insert(self.id, self.clone());
        }
        // Off the list however the wait ends (even if it is dropped).
        let _listed = Listed(self);
        tokio::select! {
            v = fut => Ok(v),
            _ = self.evict.notified() => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room (relay full)",
            )),
        }
    }
}

/// Removes a connection from the evictable ones when dropped.
pub(crate) struct Listed<'a>(&'a Evictable);

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.shared.unauthenticated.lock() {
            m.remove(&self.0.id);
        }
    }
}

impl Shared {
    /// Tells the oldest connection listed as evictable (unauthenticated
    /// and waiting idle, see [`Evictable`]) to close; it does at once.
    /// False if there is none.
    pub(crate) fn evict_oldest_unauthenticated(&self) -> bool {
        let oldest = self
            .unauthenticated
            .lock()
            .ok()
            .and_then(|mut m| m.pop_first());
        match oldest {
            Some((_, conn)) => {
                conn.evict.notify_one();
                self.metrics.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

pub(crate) fn start_connection<S>(
    s: Arc<Shared>,
    tcp: S,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    slot: AddressSlot,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        s.metrics.connections.fetch_add(1, Ordering::Relaxed);
        s.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        let mut stopping = s.stopping.subscribe();
        tokio::select! {
            r = connection(s.clone(), tcp, peer) => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            }
            // The relay stops: the connection closes where it is (an
            // answer not sent was not an acknowledgement).
            _ = stopping.wait_for(|stop| *stop) => {}
        }
        s.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
        drop(slot);
    });
}
