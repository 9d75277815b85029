//! Relays and their clients in one process, without sockets: a
//! [`MemoryNet`] is a [`Transport`] that connects a client to a relay's
//! [`Door`] through a stream in memory, with faults on demand (a cut after
//! so many bytes). Everything above the stream is the production code.
//! With the in-memory store (`sealpost_store::memory`) a relay needs no
//! disk either: engine tests on a fake clock run in milliseconds.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use sealpost_client::transport::{Connecting, Stream, Transport};
use sealpost_client::RelayAddress;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::server::Door;

/// Relays reachable in memory, by their `host:port`.
#[derive(Debug, Default)]
pub struct MemoryNet {
    doors: Mutex<HashMap<String, Door>>,
    /// New connections are cut after this many bytes (each way, counted
    /// together); `u64::MAX`: never.
    cut_after: AtomicU64,
    /// Connections made, and connections cut.
    connections: AtomicU64,
    cuts: Arc<AtomicU64>,
}

impl MemoryNet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            cut_after: AtomicU64::new(u64::MAX),
            ..Self::default()
        })
    }

    /// Makes the relay behind `door` reachable at its address.
    pub fn add(&self, door: Door) {
        if let Ok(mut d) = self.doors.lock() {
            d.insert(door.address().host_port.clone(), door);
        }
    }

    /// Takes a relay off the net: connecting to it is refused, as to a
    /// relay that is down (connections already made go on).
    pub fn remove(&self, addr: &RelayAddress) {
        if let Ok(mut d) = self.doors.lock() {
            d.remove(&addr.host_port);
        }
    }

    /// Connections made from now on break after `bytes` bytes have passed
    /// (reads and writes together): the stream then fails as a reset TCP
    /// connection does. `None` heals the net.
    pub fn cut_after(&self, bytes: Option<u64>) {
        self.cut_after
            .store(bytes.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// (connections made, connections cut).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.connections.load(Ordering::SeqCst),
            self.cuts.load(Ordering::SeqCst),
        )
    }
}

impl Transport for MemoryNet {
    fn connect<'a>(&'a self, addr: &'a RelayAddress, local: Option<IpAddr>) -> Connecting<'a> {
        let door = self
            .doors
            .lock()
            .ok()
            .and_then(|d| d.get(&addr.host_port).cloned());
        let budget = self.cut_after.load(Ordering::SeqCst);
        Box::pin(async move {
            let door = door.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("no relay at {} on this memory net", addr.host_port),
                )
            })?;
            let from = local.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let n = self.connections.fetch_add(1, Ordering::SeqCst);
            // A port per connection, as TCP would give.
            let peer = SocketAddr::new(from, 10_000 + (n % 50_000) as u16);
            let stream = door.connect(peer)?;
            let s: Box<dyn Stream> = if budget == u64::MAX {
                Box::new(stream)
            } else {
                Box::new(Cut {
                    inner: stream,
                    left: budget,
                    cuts: self.cuts.clone(),
                    counted: false,
                })
            };
            Ok(s)
        })
    }
}

/// A stream that fails once `left` bytes have passed.
struct Cut<S> {
    inner: S,
    left: u64,
    cuts: Arc<AtomicU64>,
    counted: bool,
}

impl<S> Cut<S> {
    fn spend(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n as u64);
    }

    fn broken(&mut self) -> Option<io::Error> {
        if self.left > 0 {
            return None;
        }
        if !self.counted {
            self.counted = true;
            self.cuts.fetch_add(1, Ordering::SeqCst);
        }
        Some(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "the memory net cut this connection",
        ))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cut<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.broken() {
            return Poll::Ready(Err(e));
        }
        // A read may pass the budget by what one read returns; the next
        // one fails.
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.spend(n);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cut<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.broken() {
            return Poll::Ready(Err(e));
        }
        let allowed = usize::try_from(self.left).unwrap_or(usize::MAX);
        let data = &data[..data.len().min(allowed)];
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.spend(n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
