//! A read buffer under TLS that a connection holds only while bytes are in
//! it.
//!
//! rustls reads at most 4 KiB at a time; a 64 KiB buffer under it turns a
//! 1 MiB blob piece into a few `read` calls instead of 256. But a buffer
//! per connection is most of what an idle connection costs (an agent that
//! stays subscribed holds its connection for hours), so the buffer comes
//! from a small shared pool when a read is about to be made and goes back
//! as soon as it is empty — in particular before a read that would wait.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size of a pooled buffer.
pub const BUF_BYTES: usize = 64 * 1024;
/// Buffers kept for reuse, at most (4 MiB).
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take() -> Box<[u8]> {
    POOL.lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_else(|| vec![0u8; BUF_BYTES].into_boxed_slice())
}

fn give(b: Box<[u8]>) {
    if let Ok(mut p) = POOL.lock() {
        if p.len() < POOL_MAX {
            p.push(b);
        }
    }
}

/// `inner` with a read buffer from the pool while it holds bytes.
#[derive(Debug)]
pub struct PooledReader<R> {
    inner: R,
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
}

impl<R> PooledReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: None,
            pos: 0,
            end: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Whether a buffer is held now (for tests).
    pub fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for PooledReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.end {
            if dst.remaining() >= BUF_BYTES {
                return Pin::new(&mut this.inner).poll_read(cx, dst);
            }
            let mut b = this.buf.take().unwrap_or_else(take);
            let mut rb = ReadBuf::new(&mut b);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    this.end = rb.filled().len();
                    this.pos = 0;
                    this.buf = Some(b);
                }
                other => {
                    // Waiting, an error or the end: nothing held meanwhile.
                    give(b);
                    return other;
                }
            }
        }
        let Some(b) = this.buf.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        let n = dst.remaining().min(this.end - this.pos);
        dst.put_slice(&b[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.end {
            this.pos = 0;
            this.end = 0;
            if let Some(b) = this.buf.take() {
                give(b);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncWrite + Unpin> AsyncWrite for PooledReader<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes come through whole and in order, in reads of any size; the
    /// buffer is held only while it has bytes, and not while a read waits.
    #[tokio::test]
    async fn bytes_pass_and_the_buffer_is_held_only_while_full() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = PooledReader::new(b);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        a.write_all(&data).await.expect("write");
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = r
                .read(&mut chunk[..1 + got.len() % 4096])
                .await
                .expect("read");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        assert!(!r.holds_buffer(), "empty after the last byte");
        // A read that waits holds nothing.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut chunk)).await;
        assert!(pending.is_err());
        assert!(!r.holds_buffer());
        a.write_all(b"more").await.expect("write");
        let n = r.read(&mut chunk[..2]).await.expect("read");
        assert_eq!(&chunk[..n], b"mo");
        assert!(r.holds_buffer(), "two bytes still in it");
        drop(a);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, b"re");
        assert!(!r.holds_buffer());
    }
}
