//! A connection's answers waiting for its socket: a bounded queue that
//! holds no memory while it is empty.
//!
//! It replaces a `tokio::sync::mpsc` channel, which allocates a block of 32
//! slots and a cache-padded channel (about 2 KiB) when it is made and keeps
//! them for the connection's life: most of what an agent's idle subscribed
//! connection cost beyond TLS (issue 23). Here the frames wait in a
//! `VecDeque` given back whenever the writer empties it, room is a
//! semaphore of `bound` permits, and the writer waits on a `Notify`. The
//! semantics are the channel's: sends wait for room; the receiver ends when
//! every sender is gone and the queue is empty; once the receiver is gone,
//! sends fail.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, Semaphore, TryAcquireError};

use super::Outgoing;

struct Queue {
    frames: Mutex<VecDeque<Outgoing>>,
    /// Free places: taken by a send, given back when the writer takes the
    /// frame. Closed when the receiver is gone.
    room: Semaphore,
    /// Told when a frame is queued or the last sender leaves.
    ready: Notify,
    senders: AtomicUsize,
}

/// The sending side (cloned for each task that answers on the connection).
pub(crate) struct Out(Arc<Queue>);

/// The receiving side: the connection's writer.
pub(crate) struct OutRx(Arc<Queue>);

/// The receiver is gone (the connection's writer stopped).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Closed;

/// Why [`Out::try_send`] did not queue.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError {
    Full,
    Closed,
}

/// A queue for at most `bound` frames.
pub(crate) fn channel(bound: usize) -> (Out, OutRx) {
    let q = Arc::new(Queue {
        frames: Mutex::new(VecDeque::new()),
        room: Semaphore::new(bound),
        ready: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    (Out(q.clone()), OutRx(q))
}

impl Out {
    /// Queues `o` once there is room.
    pub(crate) async fn send(&self, o: Outgoing) -> Result<(), Closed> {
        self.reserve().await?.send(o);
        Ok(())
    }

    /// Queues `o` if there is room now.
    pub(crate) fn try_send(&self, o: Outgoing) -> Result<(), TrySendError> {
        match self.0.room.try_acquire() {
            Ok(p) => {
                p.forget();
                self.push(o);
                Ok(())
            }
            Err(TryAcquireError::NoPermits) => Err(TrySendError::Full),
            Err(TryAcquireError::Closed) => Err(TrySendError::Closed),
        }
    }

    /// Waits for room and holds it for one frame.
    pub(crate) async fn reserve(&self) -> Result<Room<'_>, Closed> {
        let p = self.0.room.acquire().await.map_err(|_| Closed)?;
        p.forget();
        Ok(Room(Some(self)))
    }

    fn push(&self, o: Outgoing) {
        if let Ok(mut q) = self.0.frames.lock() {
            q.push_back(o);
        }
        self.0.ready.notify_one();
    }
}

/// Room for one frame, held by [`Out::reserve`] (given back if unused).
pub(crate) struct Room<'a>(Option<&'a Out>);

impl Room<'_> {
    pub(crate) fn send(mut self, o: Outgoing) {
        if let Some(out) = self.0.take() {
            out.push(o);
        }
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if let Some(out) = self.0 {
            out.0.room.add_permits(1);
        }
    }
}

impl Clone for Out {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        Out(self.0.clone())
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ready.notify_one();
        }
    }
}

impl OutRx {
    /// The next frame; `None` once every sender is gone and nothing is
    /// left.
    pub(crate) async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            if let Some(o) = self.try_recv() {
                return Some(o);
            }
            if self.0.senders.load(Ordering::Acquire) == 0 {
                // A frame queued just before the last sender left.
                return self.try_recv();
            }
            // `notify_one` keeps its permit when nobody waits, so a frame
            // queued between the look above and this wait is not missed.
            self.0.ready.notified().await;
        }
    }

    /// The next frame if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<Outgoing> {
        let mut q = self.0.frames.lock().ok()?;
        let o = q.pop_front()?;
        if q.is_empty() {
            // Nothing held while nothing waits.
            *q = VecDeque::new();
        }
        drop(q);
        self.0.room.add_permits(1);
        Some(o)
    }
}

impl Drop for OutRx {
    fn drop(&mut self) {
        self.0.room.close();
        if let Ok(mut q) = self.0.frames.lock() {
            *q = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(b: u8) -> Outgoing {
        Outgoing::Frame(vec![b])
    }

    fn byte(o: Option<Outgoing>) -> Option<u8> {
        match o? {
            Outgoing::Frame(f) => f.first().copied(),
            Outgoing::Shared(..) => None,
        }
    }

    /// In order, bounded, ends when the senders are gone and the queue is
    /// drained; sends fail once the receiver is gone; no memory is held
    /// while empty.
    #[tokio::test]
    async fn a_bounded_queue_that_ends_like_a_channel() {
        let (out, mut rx) = channel(2);
        out.send(frame(1)).await.expect("ok");
        out.try_send(frame(2)).expect("ok");
        assert_eq!(out.try_send(frame(3)), Err(TrySendError::Full));
        // A send waiting for room goes through when the writer takes one.
        let o2 = out.clone();
        let waiting = tokio::spawn(async move { o2.send(frame(3)).await });
        tokio::task::yield_now().await;
        assert_eq!(byte(rx.recv().await), Some(1));
        waiting.await.expect("task").expect("sent");
        assert_eq!(byte(rx.recv().await), Some(2));
        assert_eq!(byte(rx.recv().await), Some(3));
        assert_eq!(rx.0.frames.lock().expect("ok").capacity(), 0);
        // Room held and not used is given back.
        drop(out.reserve().await.expect("ok"));
        drop(out.reserve().await.expect("ok"));
        out.reserve().await.expect("ok").send(frame(4));
        drop(out);
        assert_eq!(byte(rx.recv().await), Some(4));
        assert!(rx.recv().await.is_none());

        let (out, rx) = channel(4);
        drop(rx);
        assert_eq!(out.send(frame(1)).await, Err(Closed));
        assert_eq!(out.try_send(frame(1)), Err(TrySendError::Closed));
    }

    /// A writer waiting on an empty queue wakes for a frame sent from
    /// another task, and for the last sender leaving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_wakes_for_frames_and_for_the_end() {
        let (out, mut rx) = channel(64);
        let sender = tokio::spawn(async move {
            for i in 0..200u8 {
                out.send(frame(i)).await.expect("ok");
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut seen = Vec::new();
        while let Some(o) = rx.recv().await {
            seen.push(byte(Some(o)).expect("ok"));
        }
        sender.await.expect("ok");
        assert_eq!(seen, (0..200u8).collect::<Vec<_>>());
    }
}
