//! A TCP proxy on loopback that breaks connections the ways networks do,
//! between an agent and a relay. TLS runs end to end through it, so it
//! can only cut, stall or swallow bytes — exactly a broken network.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to connections accepted from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetFault {
    /// Forward faithfully.
    Pass,
    /// Forward, then close both sides once this many bytes went either way
    /// (cuts mid-frame or mid-TLS-record, depending on the count).
    CutAfter(u64),
    /// Forward this many bytes, then stop forwarding but keep both sockets
    /// open: a half-open connection that never delivers another byte.
    StallAfter(u64),
    /// Accept, never connect onward, never answer: a relay that accepts
    /// and goes silent.
    Blackhole,
}

/// The proxy: listens on 127.0.0.1, forwards to `target`.
#[derive(Debug)]
pub struct FaultyProxy {
    addr: SocketAddr,
    mode: Arc<Mutex<NetFault>>,
    accepted: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: JoinHandle<()>,
}

impl FaultyProxy {
    /// Starts a proxy to `target` (which must be on loopback).
    pub async fn start(target: SocketAddr, mode: NetFault) -> io::Result<FaultyProxy> {
        if !target.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the proxy only forwards to loopback",
            ));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(Mutex::new(mode));
        let accepted = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (m, a, o) = (mode.clone(), accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::Relaxed);
                let now = m.lock().map(|g| *g).unwrap_or(NetFault::Pass);
                let h = tokio::spawn(serve(client, target, now));
                if let Ok(mut o) = o.lock() {
                    o.retain(|h| !h.is_finished());
                    o.push(h.abort_handle());
                }
            }
        });
        Ok(FaultyProxy {
            addr,
            mode,
            accepted,
            open,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes what happens to connections accepted from now on (open
    /// ones keep the fault they were accepted with).
    pub fn set(&self, mode: NetFault) {
        if let Ok(mut g) = self.mode.lock() {
            *g = mode;
        }
    }

    /// Closes every open connection at once (both sides see it end).
    pub fn cut_open(&self) {
        if let Ok(mut o) = self.open.lock() {
            for h in o.drain(..) {
                h.abort();
            }
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(client: TcpStream, target: SocketAddr, mode: NetFault) {
    if mode == NetFault::Blackhole {
        // Hold the socket open, read and discard, never answer.
        let mut client = client;
        let mut buf = [0u8; 4096];
        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let budget = match mode {
        NetFault::CutAfter(n) | NetFault::StallAfter(n) => Some(n),
        _ => None,
    };
    let left = Arc::new(AtomicU64::new(budget.unwrap_or(u64::MAX)));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Both directions inside this task: aborting it closes the connection.
    // A cut ends when either direction gives up.
    tokio::select! {
        () = pipe(cr, sw, left.clone(), mode) => {}
        () = pipe(sr, cw, left, mode) => {}
    }
}

/// Copies until the shared byte budget runs out; then, for a cut, drops
/// both halves (closing the connection), for a stall, keeps reading and
/// discarding so the sender never learns.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    left: Arc<AtomicU64>,
    mode: NetFault,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let allowed = left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                Some(l.saturating_sub(n as u64))
            })
            .unwrap_or(0);
        let pass = (allowed as usize).min(n);
        if pass > 0 && w.write_all(&buf[..pass]).await.is_err() {
            return;
        }
        if pass < n {
            match mode {
                NetFault::StallAfter(_) => {
                    while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
                    // Keep the write half open until the peer goes away.
                    std::future::pending::<()>().await;
                }
                _ => return,
            }
        }
    }
}
