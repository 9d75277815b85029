//! How a client reaches a relay: the byte stream under TLS. The real one
//! is TCP ([`Tcp`]); tests hand the client an in-memory one
//! (`sealpost_relay::memory::MemoryNet`) that connects to a relay in the
//! same process without a socket, so the whole path above the stream —
//! TLS with the pin, framing, pipelining, refusals, the agent's engine —
//! is the code that runs in production.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::tls::RelayAddress;

/// A byte stream to a relay.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A connection being made.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<Box<dyn Stream>>> + Send + 'a>>;

/// Opens byte streams to relays.
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// A stream to the relay at `addr`, from the local address `local` if
    /// one is asked for (`None`: the system's choice). The caller bounds
    /// how long this may take.
    fn connect<'a>(&'a self, addr: &'a RelayAddress, local: Option<IpAddr>) -> Connecting<'a>;
}

/// TCP, with `TCP_NODELAY` (whole frames are written at once; without it
/// small requests wait on Nagle and delayed ACKs) and a 256 KiB read
/// buffer under TLS (rustls reads 4 KiB at a time: fewer syscalls for blob
/// pieces and large fetches).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp;

impl Transport for Tcp {
    fn connect<'a>(&'a self, addr: &'a RelayAddress, local: Option<IpAddr>) -> Connecting<'a> {
        Box::pin(async move {
            let tcp = match local {
                None => tokio::net::TcpStream::connect(&addr.host_port).await?,
                Some(local) => {
                    let to = tokio::net::lookup_host(&addr.host_port)
                        .await?
                        .find(|a| a.is_ipv4() == local.is_ipv4())
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::AddrNotAvailable,
                                format!("no address of the relay in the family of {local}"),
                            )
                        })?;
                    let socket = if local.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    socket.bind(std::net::SocketAddr::new(local, 0))?;
                    socket.connect(to).await?
                }
            };
            tcp.set_nodelay(true)?;
            let s: Box<dyn Stream> = Box::new(tokio::io::BufReader::with_capacity(256 * 1024, tcp));
            Ok(s)
        })
    }
}
