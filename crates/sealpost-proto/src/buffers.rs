//! Reused piece-sized buffers.
//!
//! A file moves through every process as frames and pieces of up to 1 MiB.
//! Allocated fresh each time, such buffers make the C allocator hand their
//! pages back to the kernel when they are freed and fault them in (zeroed)
//! again for the next one: measured on a 1 GiB transfer, page faults and
//! page clearing were about a third of all three processes' CPU. This
//! keeps a few of them for the next piece instead. It is bounded (at most
//! [`KEEP`] buffers, none larger than [`MAX_CAPACITY`]), so what it holds
//! is a constant a process pays once, whatever the file size.

use std::sync::Mutex;

/// Buffers kept at most (about 18 MiB): enough for a window of pipelined
/// pieces to cycle through without new allocations.
pub const KEEP: usize = 16;
/// Buffers smaller than this are not worth keeping (the allocator serves
/// them from its free lists anyway).
pub const MIN_CAPACITY: usize = 64 * 1024;
/// Nor larger than this (a frame of 1 MiB + 1 KiB, with room to spare).
pub const MAX_CAPACITY: usize = 1152 * 1024;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for at least `capacity` bytes, reused when
/// one is kept.
pub fn take(capacity: usize) -> Vec<u8> {
    let mut b = take_kept(capacity);
    b.clear();
    b
}

/// A buffer of exactly `len` bytes for a caller that writes every one of
/// them before reading any: a reused buffer keeps what its last user left
/// (only bytes past that are zeroed), so filling a piece does not first
/// clear a megabyte that is about to be overwritten.
pub fn take_len(len: usize) -> Vec<u8> {
    let mut b = take_kept(len);
    b.truncate(len);
    b.resize(len, 0);
    b
}

/// A kept buffer with room for `capacity` bytes, as its last user left it.
fn take_kept(capacity: usize) -> Vec<u8> {
    if (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        if let Ok(mut pool) = POOL.lock() {
            if let Some(i) = pool.iter().rposition(|b| b.capacity() >= capacity) {
                return pool.swap_remove(i);
            }
        }
        // Allocate the largest size kept, so this buffer can serve any
        // later request.
        return Vec::with_capacity(MAX_CAPACITY);
    }
    Vec::with_capacity(capacity)
}

/// Hands a buffer back for reuse (or frees it, if enough are kept or its
/// size is not one kept).
pub fn give(buf: Vec<u8>) {
    if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&buf.capacity()) {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        if pool.len() < KEEP {
            pool.push(buf);
        }
    }
}

/// The alignment `O_DIRECT` needs for file offsets, lengths and memory on
/// the file systems sealpost writes to (4 KiB covers 512-byte and 4 KiB
/// logical blocks).
pub const DIRECT_ALIGN: usize = 4096;

/// A byte buffer whose start is [`DIRECT_ALIGN`]-aligned in memory, for
/// `O_DIRECT` reads and writes, found inside an ordinary `Vec` with
/// `align_offset` (no unsafe code, no custom allocation).
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    capacity: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `capacity` usable bytes.
    pub fn new(capacity: usize) -> Self {
        let storage = vec![0u8; capacity + DIRECT_ALIGN];
        let start = storage
            .as_ptr()
            .align_offset(DIRECT_ALIGN)
            .min(DIRECT_ALIGN);
        Self {
            storage,
            start,
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The first `len` bytes (at most the capacity), aligned.
    pub fn slice(&self, len: usize) -> &[u8] {
        &self.storage[self.start..self.start + len.min(self.capacity)]
    }

    /// The first `len` bytes (at most the capacity), aligned, writable.
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.start..self.start + len.min(self.capacity)]
    }
}

static ALIGNED_POOL: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());

/// Aligned buffers kept at most for reuse (about 8 MiB).
pub const KEEP_ALIGNED: usize = 8;

/// An aligned buffer of at least `capacity` bytes, reused when one is
/// kept (its bytes are whatever it held), else a fresh zeroed one.
pub fn take_aligned(capacity: usize) -> AlignedBuf {
    if let Ok(mut pool) = ALIGNED_POOL.lock() {
        if let Some(i) = pool.iter().rposition(|b| b.capacity() >= capacity) {
            return pool.swap_remove(i);
        }
    }
    AlignedBuf::new(capacity)
}

/// Hands an aligned buffer back for reuse (or frees it, if enough are
/// kept or it is larger than a frame).
pub fn give_aligned(buf: AlignedBuf) {
    if buf.capacity() > MAX_CAPACITY {
        return;
    }
    if let Ok(mut pool) = ALIGNED_POOL.lock() {
        if pool.len() < KEEP_ALIGNED {
            pool.push(buf);
        }
    }
}

/// `n` rounded down to a multiple of [`DIRECT_ALIGN`].
pub fn round_down_aligned(n: u64) -> u64 {
    n / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64
}

/// `n` rounded up to a multiple of [`DIRECT_ALIGN`].
pub fn round_up_aligned(n: u64) -> u64 {
    n.div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let mut a = take(1 << 20);
        assert!(a.capacity() >= 1 << 20 && a.is_empty());
        a.extend_from_slice(&[1, 2, 3]);
        give(a);
        // Another test may take it in between; only check what must hold:
        // a reused buffer comes back empty and large enough.
        let b = take(100_000);
        assert!(b.is_empty() && b.capacity() >= 100_000);
        // Small and huge buffers pass through untouched.
        assert!(take(10).capacity() >= 10);
        give(Vec::with_capacity(16 << 20));
        for _ in 0..KEEP * 2 {
            give(Vec::with_capacity(MAX_CAPACITY));
        }
        assert!(POOL.lock().map(|p| p.len()).unwrap_or(0) <= KEEP);
        assert!(POOL
            .lock()
            .map(|p| p.iter().all(|b| b.capacity() <= MAX_CAPACITY))
            .unwrap_or(false));
    }

    /// `take_len` gives exactly the length asked for, reusing a kept
    /// buffer without clearing what it held (every caller overwrites it).
    #[test]
    fn a_buffer_taken_at_a_length_has_that_length() {
        for len in [
            0usize,
            10,
            MIN_CAPACITY,
            1 << 20,
            MAX_CAPACITY,
            MAX_CAPACITY + 1,
        ] {
            let b = take_len(len);
            assert_eq!(b.len(), len);
            give(b);
        }
        let mut b = take_len(1 << 20);
        b.fill(7);
        give(b);
        assert_eq!(take_len((1 << 20) + 5).len(), (1 << 20) + 5);
        assert_eq!(take(1 << 20).len(), 0, "take still gives an empty buffer");
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for cap in [1usize, 4096, 1 << 20] {
            let mut b = AlignedBuf::new(cap);
            assert_eq!(b.capacity(), cap);
            assert_eq!(b.slice(cap).len(), cap);
            assert_eq!(b.slice_mut(cap).as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.slice(cap + 5).len(), cap);
        }
        assert_eq!(
            (
                round_up_aligned(0),
                round_up_aligned(1),
                round_up_aligned(4096),
                round_up_aligned(4097)
            ),
            (0, 4096, 4096, 8192)
        );
        assert_eq!(
            (
                round_down_aligned(0),
                round_down_aligned(4095),
                round_down_aligned(4097)
            ),
            (0, 0, 4096)
        );
    }
}
