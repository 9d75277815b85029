//! BLAKE3 over a stream, moved to a second thread once the stream is long.
//!
//! Sealing and opening hash every content byte besides encrypting it. On one
//! thread the hash costs about a fifth of the throughput; on a helper thread
//! it runs beside the cipher and costs almost nothing. Short messages stay
//! on the calling thread: a thread start would cost more than the hash.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Hash inline until this many bytes have gone by.
const THREAD_AFTER: u64 = 4 << 20;
/// Buffer size once threaded: large enough to make channel hand-offs rare.
pub(crate) const BIG_BUF: usize = 1 << 20;
/// Buffers in flight between the caller and the hashing thread.
const BUFFERS: usize = 4;

type Filled = (Vec<u8>, usize);

#[derive(Debug)]
pub(crate) struct StreamHasher {
    state: State,
}

#[derive(Debug)]
enum State {
    Inline {
        // Boxed: a BLAKE3 hasher is about 2 KB, the threaded state tiny.
        hasher: Box<blake3::Hasher>,
        seen: u64,
    },
    Threaded {
        tx: SyncSender<Filled>,
        spare: Receiver<Vec<u8>>,
        allocated: usize,
        handle: JoinHandle<blake3::Hash>,
    },
}

impl StreamHasher {
    pub(crate) fn new() -> Self {
        Self {
            state: State::Inline {
                hasher: Box::default(),
                seen: 0,
            },
        }
    }

    /// Hashes `buf[..len]` and returns a buffer for the next read (the same
    /// one, or a recycled larger one once hashing runs on its own thread).
    pub(crate) fn update(&mut self, buf: Vec<u8>, len: usize) -> Vec<u8> {
        match &mut self.state {
            State::Inline { hasher, seen } => {
                hasher.update(&buf[..len]);
                *seen += len as u64;
                if *seen >= THREAD_AFTER {
                    let hasher = std::mem::take(&mut **hasher);
                    return self.start_thread(hasher, buf);
                }
                buf
            }
            State::Threaded {
                tx,
                spare,
                allocated,
                handle: _,
            } => {
                if tx.send((buf, len)).is_err() {
                    // The thread is gone only if it panicked; finalize
                    // reports that. Carry on with a fresh buffer.
                    return vec![0u8; BIG_BUF];
                }
                if let Ok(b) = spare.try_recv() {
                    return b;
                }
                if *allocated < BUFFERS {
                    *allocated += 1;
                    return vec![0u8; BIG_BUF];
                }
                spare.recv().unwrap_or_else(|_| vec![0u8; BIG_BUF])
            }
        }
    }

    fn start_thread(&mut self, mut hasher: blake3::Hasher, buf: Vec<u8>) -> Vec<u8> {
        let backup = hasher.clone();
        let (tx, rx) = mpsc::sync_channel::<Filled>(BUFFERS);
        let (spare_tx, spare) = mpsc::sync_channel::<Vec<u8>>(BUFFERS + 1);
        let worker = move || {
            for (b, len) in rx {
                hasher.update(&b[..len]);
                // The caller may have stopped taking buffers; that is fine.
                let _ = spare_tx.try_send(b);
            }
            hasher.finalize()
        };
        match std::thread::Builder::new()
            .name("sealpost-hash".into())
            .spawn(worker)
        {
            Ok(handle) => {
                self.state = State::Threaded {
                    tx,
                    spare,
                    allocated: 1,
                    handle,
                };
                drop(buf);
                vec![0u8; BIG_BUF]
            }
            // No thread to be had (a process limit): keep hashing inline
            // and try again after another THREAD_AFTER bytes.
            Err(_) => {
                self.state = State::Inline {
                    hasher: Box::new(backup),
                    seen: 0,
                };
                buf
            }
        }
    }

    pub(crate) fn finalize(self) -> blake3::Hash {
        match self.state {
            State::Inline { hasher, .. } => hasher.finalize(),
            State::Threaded { tx, handle, .. } => {
                drop(tx);
                handle
                    .join()
                    .unwrap_or_else(|_| unreachable!("the hashing thread does not panic"))
            }
        }
    }
}
