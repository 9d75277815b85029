//! Reading frames within a memory budget and timeouts, and each connection's writer, which sends its answers and pushes.

use super::*;

pub(crate) use super::outq::{Out, OutRx};

/// What the writer sends: a whole frame, or a frame's head followed by
/// blob bytes shared from the pieces kept in memory (not copied).
pub(crate) enum Outgoing {
    Frame(Vec<u8>),
    Shared(Vec<u8>, sealpost_store::KeptBytes),
}

pub(crate) async fn send(out: &Out, id: u32, r: Response) -> io::Result<()> {
    send_frame(out, r.encode(id)).await
}

pub(crate) async fn send_frame(out: &Out, frame: Vec<u8>) -> io::Result<()> {
    send_out(out, Outgoing::Frame(frame)).await
}

pub(crate) async fn send_out(out: &Out, o: Outgoing) -> io::Result<()> {
    out.send(o)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))
}

pub(crate) fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

/// The largest frame of a request type read whole (not in two parts): an
/// `Ack` of `MAX_BATCH` seqs. A larger frame of such a type cannot be
/// valid and is refused before its body is read.
pub(crate) const MAX_SMALL_REQUEST: usize = 1 + 4 + 2 + relay::MAX_BATCH * 8;

/// The largest frame taken before `Hello` (which is 6 bytes).
pub(crate) const MAX_BEFORE_HELLO: usize = 16;

/// Where a connection is: what it may send next, and how long it may wait.
#[derive(Clone, Copy)]
pub(crate) struct Stage {
    pub(crate) hello: bool,
    pub(crate) idle: Duration,
    pub(crate) frame: Duration,
}

/// A request read off the wire, with the relay's byte budget its body
/// took (a submission or blob piece), if any.
pub(crate) struct Read {
    pub(crate) frame: Result<Frame<Request>, DecodeError>,
    pub(crate) budget: Option<OwnedSemaphorePermit>,
}

/// Reads one frame body and decodes it; `None` on a clean end of stream
/// between frames.
///
/// Memory is bounded before the peer has proven anything: before `Hello`
/// only a Hello-sized frame is read; a request type read whole is refused
/// above the largest valid one and its buffer grows only as its bytes
/// arrive; a submission's or blob piece's data (up to 1 MiB) is taken from
/// the relay-wide budget of bytes in flight 64 KiB at a time, before each
/// step is read (see [`read_budgeted`]). That data is read straight into a
/// buffer of its own (reused: fresh megabyte buffers cost page faults on
/// every frame), so it is not copied out of the frame afterwards.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    stage: Stage,
    budget: &Arc<Semaphore>,
    evictable: Option<&Arc<Evictable>>,
) -> io::Result<Option<Read>> {
    let mut prefix = [0u8; 4];
    let wait = timeout(stage.idle, rd.read(&mut prefix[..1]));
    let first = match evictable {
        Some(e) => e.idle(wait).await?,
        None => wait.await,
    }
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle timeout"))??;
    if first == 0 {
        return Ok(None);
    }
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    // Boxed: the state of a frame being read is not part of what an idle
    // connection's task holds while it waits for the first byte.
    Box::pin(timeout(stage.frame, async {
        rd.read_exact(&mut prefix[1..]).await?;
        let len = relay::frame_len(prefix).map_err(|e| invalid(e.to_string()))?;
        let mut ty = [0u8; 1];
        rd.read_exact(&mut ty).await?;
        if !stage.hello && (ty[0] != 0x01 || len > MAX_BEFORE_HELLO) {
            return Err(invalid("the first request must be Hello".into()));
        }
        Ok::<_, io::Error>(match Request::head_len(ty[0]) {
            Some(h) if len > h => {
                let mut head = [0u8; 160];
                head[0] = ty[0];
                rd.read_exact(&mut head[1..h]).await?;
                let (rest, taken) = read_budgeted(rd, len - h, budget).await?;
                Read {
                    frame: Request::decode_split(&head[..h], rest),
                    budget: Some(taken),
                }
            }
            Some(_) => read_whole(rd, ty[0], len).await?,
            None if len > MAX_SMALL_REQUEST => {
                return Err(invalid(format!(
                    "a request of type {:#04x} is at most {MAX_SMALL_REQUEST} bytes; this one says {len}",
                    ty[0]
                )));
            }
            None => read_whole(rd, ty[0], len).await?,
        })
    }))
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "frame timeout (too slow)"))?
    .map(Some)
}

/// The step in which a request's data is read and budgeted.
pub(crate) const BUDGET_STEP: usize = 64 * 1024;

/// Reads `n` bytes of a request's data, taking the relay-wide budget for
/// each step of 64 KiB before reading it: what a client holds is what it
/// sent, never what it announced, so a crowd announcing megabytes and
/// sending nothing holds nothing, and honest small requests are not kept
/// waiting behind it. The bytes land in a reused buffer's spare capacity
/// (no zeroing; pages are touched only as data arrives).
pub(crate) async fn read_budgeted<R: AsyncRead + Unpin>(
    rd: &mut R,
    n: usize,
    budget: &Arc<Semaphore>,
) -> io::Result<(Vec<u8>, OwnedSemaphorePermit)> {
    let closing = || io::Error::other("relay shutting down");
    // Starts empty; each step's permits are merged into it.
    let mut taken = budget
        .clone()
        .acquire_many_owned(0)
        .await
        .map_err(|_| closing())?;
    let mut buf = buffers::take(n);
    let read = async {
        while buf.len() < n {
            let step = (n - buf.len()).min(BUDGET_STEP);
            let more = budget
                .clone()
                .acquire_many_owned(step as u32)
                .await
                .map_err(|_| closing())?;
            taken.merge(more);
            if rd.take(step as u64).read_to_end(&mut buf).await? < step {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
    .await;
    match read {
        Ok(()) => Ok((buf, taken)),
        Err(e) => {
            buffers::give(buf);
            Err(e)
        }
    }
}

/// Reads the rest of a small frame whose type byte was `ty`, into a buffer
/// that grows as the bytes arrive (never sized by the announced length).
pub(crate) async fn read_whole<R: AsyncRead + Unpin>(
    rd: &mut R,
    ty: u8,
    len: usize,
) -> io::Result<Read> {
    let mut body = Vec::with_capacity(len.min(256));
    body.push(ty);
    let rest = (len - 1) as u64;
    let got = rd.take(rest).read_to_end(&mut body).await?;
    if got as u64 != rest {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Read {
        frame: Request::decode_owned(body),
        budget: None,
    })
}

/// Writes the connection's answers as they are queued, until every sender
/// is gone. A batch the client does not take within `stall` (the frame
/// timeout: it reads nothing, its receive window full) ends the
/// connection, so a client cannot hold a connection by not reading.
pub(crate) async fn writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: OutRx,
    stall: Duration,
) -> io::Result<()> {
    while let Some(first) = rx.recv().await {
        // Gather what is ready into one write: whole frames, few syscalls;
        // shared blob bytes follow their head without a copy.
        let (mut buf, mut shared) = match first {
            Outgoing::Frame(f) => (f, None),
            Outgoing::Shared(head, kept) => (head, Some(kept)),
        };
        while shared.is_none() && buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Some(Outgoing::Frame(more)) => {
                    buf.extend_from_slice(&more);
                    buffers::give(more);
                }
                Some(Outgoing::Shared(head, kept)) => {
                    buf.extend_from_slice(&head);
                    shared = Some(kept);
                }
                None => break,
            }
        }
        let write = async {
            match shared {
                Some((piece, range)) => {
                    write_both(&mut wr, &buf, &piece[range]).await?;
                    sealpost_store::release(piece);
                }
                None => wr.write_all(&buf).await?,
            }
            wr.flush().await
        };
        taken(stall, write).await?;
        buffers::give(buf);
    }
    // The close (TLS's close_notify) is a write too: a client whose window
    // is full would hold it, and the connection, for ever.
    taken(stall, wr.shutdown()).await
}

/// `write` if the client takes it within `stall`; else `TimedOut`. Boxed:
/// an idle connection's writer holds no write's state.
async fn taken(stall: Duration, write: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    Box::pin(timeout(stall, write)).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took no answer within the frame timeout",
        )
    })?
}

/// Writes `a` then `b` as one stream of bytes (vectored: TLS records span
/// both, no small record for `a` alone, no copy of `b`).
pub(crate) async fn write_both<W: AsyncWrite + Unpin>(
    wr: &mut W,
    a: &[u8],
    b: &[u8],
) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = wr
            .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A client that takes every byte but never the close.
    struct NoClose(usize);

    impl AsyncWrite for NoClose {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0 += buf.len();
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    /// The answers are written, and a close the client does not take ends
    /// the writer after the stall bound instead of holding it for ever.
    #[tokio::test]
    async fn a_close_the_client_does_not_take_is_bounded() {
        let (out, rx) = super::super::outq::channel(4);
        out.send(Outgoing::Frame(vec![1, 2, 3]))
            .await
            .expect("queued");
        drop(out);
        let mut wr = NoClose(0);
        let e = timeout(
            Duration::from_secs(10),
            writer(&mut wr, rx, Duration::from_millis(50)),
        )
        .await
        .expect("the writer ended")
        .expect_err("the close was never taken");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(wr.0, 3);
    }
}
