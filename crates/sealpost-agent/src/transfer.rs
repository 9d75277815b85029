//! File transfers: a file travels as an encrypted blob (64 KiB AEAD chunks,
//! PROTOCOL.md §5) uploaded to the recipient's relay, then a sealed
//! manifest naming it. Everything here runs at constant memory (one piece
//! of at most 1 MiB at a time) and resumes where it stopped:
//!
//! - **upload** asks the relay how much of the blob it has stored and
//!   continues from there, re-encrypting from the source file (a chunk's
//!   ciphertext depends only on the key, its index and its bytes);
//! - **download** writes the decrypted chunks into a partial file in the
//!   download directory, commits its progress every few MiB (after an
//!   fsync), and continues from the last committed chunk;
//! - **completion**: the partial file is fsync'd, its pages dropped, read
//!   back and hashed; only a match with the signed manifest hash moves it
//!   under its final name (never over an existing file) and earns the
//!   sender a receipt carrying that hash.

mod place;
mod receive;
mod send;
pub use place::*;
pub use receive::*;
pub use send::*;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sealpost_proto::blob::{self, BlobLayout, ChunkCipher};
use sealpost_proto::buffers;
use sealpost_proto::relay::MAX_BLOB_PIECE;

/// Progress reports for long transfers (the CLI draws bars with them).
pub trait Progress: Send + Sync {
    /// A stage starts: `what` names it, `total` is its size in bytes and
    /// `done` what was already done before (a resumed transfer).
    fn start(&self, what: &str, total: u64, done: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// A progress display fed blob bytes (sealed chunks) that shows file
/// bytes: a 6-byte file is 6 B, not its 22 sealed bytes.
pub struct FileBytes {
    inner: std::sync::Arc<dyn Progress>,
    layout: BlobLayout,
    at: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBytes")
            .field("layout", &self.layout)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

impl FileBytes {
    pub fn new(inner: std::sync::Arc<dyn Progress>, layout: BlobLayout) -> Self {
        Self {
            inner,
            layout,
            at: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Progress for FileBytes {
    fn start(&self, what: &str, _total: u64, done: u64) {
        self.at.store(done, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .start(what, self.layout.data_len, self.layout.plain_before(done));
    }
    fn advance(&self, bytes: u64) {
        let before = self
            .at
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let shown = self.layout.plain_before(before + bytes) - self.layout.plain_before(before);
        self.inner.advance(shown);
    }
    fn finish(&self) {
        self.inner.finish();
    }
}

/// No progress display.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

// The alignment O_DIRECT needs for offsets, lengths and memory.
use sealpost_proto::buffers::DIRECT_ALIGN;

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use sealpost_proto::blob::BlobKey;

    /// Hashing a file on two threads (subtrees merged) gives BLAKE3 of the
    /// file, at sizes around the split points: one thread below 8 MiB, the
    /// root's two subtrees, the left one split when the right is small.
    #[test]
    fn files_hash_to_blake3_whatever_the_split() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        let max = 24 << 20;
        let data: Vec<u8> = (0..max + 5).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let f = File::open(&path).expect("open");
        for size in [
            0usize,
            1,
            1024,
            1025,
            (8 << 20) - 1,
            8 << 20,
            (8 << 20) + 1,
            (8 << 20) + 1024,
            (11 << 20) + 7,
            (12 << 20) + 3,
            16 << 20,
            (16 << 20) + 1,
            (20 << 20) + 4096,
            max + 5,
        ] {
            assert_eq!(
                hash_file(&f, size as u64).expect("hash"),
                blake3::hash(&data[..size]),
                "size {size}"
            );
        }
    }

    /// Pieces sealed in order give the blob's bytes and, at the end, the
    /// file's and the blob's hashes; catching up to any length (as a
    /// restarted sender does) and going on gives the same.
    #[test]
    fn upload_hashes_match_the_blob_from_any_resume_point() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("f");
        for size in [0usize, 1, 4096, 70_000, 2_500_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 13 % 241) as u8).collect();
            std::fs::write(&src, &data).expect("write");
            let key = BlobKey::random(&mut OsRng);
            let mut whole = Vec::new();
            let s = blob::seal_blob(&key, 4096, &data[..], &mut whole).expect("seal");
            let f = File::open(&src).expect("open");
            let cipher = key.cipher();
            let total = s.layout.blob_len();
            // Resume points: the start, piece ends, odd places, the end.
            let first = piece_len(&s.layout, 0) as u64;
            for resume in [0, first.min(total), 4113.min(total), total / 2, total] {
                let mut h = UploadHashes::default();
                h.catch_up(&f, &cipher, &s.layout, resume)
                    .expect("catch up");
                assert_eq!(h.at(), resume);
                let mut sent = Vec::new();
                while h.at() < total {
                    let n = piece_len(&s.layout, h.at());
                    sent.extend(h.seal_next(&f, &cipher, &s.layout, n).expect("seal"));
                }
                assert_eq!(
                    sent,
                    whole[resume as usize..],
                    "size {size} resume {resume}"
                );
                assert_eq!(
                    h.finish(),
                    (s.plaintext_hash, s.blob_hash),
                    "size {size} resume {resume}"
                );
            }
            // Hashes ahead of the relay's length start over.
            let mut h = UploadHashes::default();
            h.catch_up(&f, &cipher, &s.layout, total)
                .expect("to the end");
            h.catch_up(&f, &cipher, &s.layout, total / 3).expect("back");
            assert_eq!(h.at(), total / 3);
            while h.at() < total {
                let n = piece_len(&s.layout, h.at());
                h.seal_next(&f, &cipher, &s.layout, n).expect("seal");
            }
            assert_eq!(h.finish(), (s.plaintext_hash, s.blob_hash));
        }
    }

    /// A piece is sealed in a reused buffer that is not cleared first: the
    /// padding after a file's last byte is still zeros (PROTOCOL 5.2) when
    /// the kept buffers are full of other bytes, and the pieces are exactly
    /// the blob of the file padded with zeros.
    #[test]
    fn padding_is_zeros_whatever_the_reused_buffer_held() {
        for _ in 0..buffers::KEEP {
            let mut b = buffers::take_len(buffers::MAX_CAPACITY);
            b.fill(0xAA);
            buffers::give(b);
        }
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("f");
        for size in [1000usize, 70_001, 3_000_017] {
            let data: Vec<u8> = (0..size).map(|i| (i * 17 % 239) as u8 | 1).collect();
            std::fs::write(&src, &data).expect("write");
            let layout = BlobLayout::padme(size as u64, 4096).expect("layout");
            assert!(
                layout.plaintext_len > layout.data_len,
                "size {size} is padded"
            );
            let mut padded = data.clone();
            padded.resize(layout.plaintext_len as usize, 0);
            let key = BlobKey::random(&mut OsRng);
            let mut whole = Vec::new();
            let s = blob::seal_blob(&key, 4096, &padded[..], &mut whole).expect("seal");
            assert_eq!(s.layout.blob_len(), layout.blob_len());
            let f = File::open(&src).expect("open");
            let mut h = UploadHashes::default();
            let mut sent = Vec::new();
            while h.at() < layout.blob_len() {
                let n = piece_len(&layout, h.at());
                let piece = h.seal_next(&f, &key.cipher(), &layout, n).expect("seal");
                sent.extend_from_slice(&piece);
                buffers::give(piece);
            }
            assert!(sent == whole, "size {size}");
            assert_eq!(h.finish(), (blake3::hash(&data), s.blob_hash));
        }
    }

    /// Pieces written through `PartWriter` (O_DIRECT where the file system
    /// takes it, here ext4 or tmpfs) give back the file, and a damaged chunk
    /// anywhere in a piece is reported and does not stop the others.
    #[test]
    fn direct_piece_writes_rebuild_the_file_and_report_damage() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("tmp");
        let cs = 65_536u32;
        for size in [0usize, 1, 65_536, 983_040, 983_041, 3 * 983_040 + 70_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let key = BlobKey::random(&mut OsRng);
            let mut whole = Vec::new();
            let s = blob::seal_blob(&key, cs, &data[..], &mut whole).expect("seal");
            for damage in [None, Some(0u64), Some(7), Some(16)] {
                let path = dir.path().join(format!("p{size}-{damage:?}"));
                let part = open_part(&path, 0).expect("part");
                let mut w = PartWriter::new(part.try_clone().expect("clone"), &path);
                let mut blob_bytes = whole.clone();
                let damaged = damage.filter(|&c| c < s.layout.chunk_count());
                if let Some(c) = damaged {
                    blob_bytes[(c * s.layout.sealed_len(0)) as usize] ^= 1;
                }
                let mut off = 0u64;
                let mut bad = Vec::new();
                while off < s.layout.blob_len() {
                    let n = piece_len(&s.layout, off);
                    let first = off / s.layout.sealed_len(0);
                    bad.extend(
                        w.write_chunks(
                            &key.cipher(),
                            &s.layout,
                            first,
                            &mut blob_bytes[off as usize..off as usize + n],
                        )
                        .expect("write"),
                    );
                    off += n as u64;
                }
                part.sync_all().expect("sync");
                assert_eq!(bad, damaged.into_iter().collect::<Vec<_>>(), "size {size}");
                let got = std::fs::read(&path).expect("read");
                for c in 0..s.layout.chunk_count() {
                    let lo = (c * cs as u64) as usize;
                    let hi = (lo + cs as usize).min(data.len());
                    if Some(c) != damaged && hi <= got.len() {
                        assert_eq!(got[lo..hi], data[lo..hi], "size {size} chunk {c}");
                    }
                }
                if damaged.is_none() {
                    assert_eq!(got, data, "size {size}");
                }
            }
        }
    }

    /// The sink's two threads write every piece where it belongs and
    /// report, in the order asked: each piece with its damaged chunks, and
    /// each checkpoint after the pieces put before it.
    #[test]
    fn the_piece_sink_reports_in_order_and_rebuilds_the_file() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("tmp");
        let cs = 65_536u32;
        let size = 7 * 983_040 + 12_345;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 249) as u8).collect();
        let key = BlobKey::random(&mut OsRng);
        let mut whole = Vec::new();
        let s = blob::seal_blob(&key, cs, &data[..], &mut whole).expect("seal");
        // One damaged chunk, in the middle of the third piece.
        let damaged = 2 * 15 + 7;
        whole[(damaged * s.layout.sealed_len(0)) as usize + 100] ^= 1;
        let path = dir.path().join("part");
        let part = open_part(&path, 0).expect("part");
        let w = PartWriter::new(part.try_clone().expect("clone"), &path);
        let mut sink = PieceSink::start(w, key.cipher(), s.layout).expect("sink");
        let (mut off, mut expected, mut k) = (0u64, Vec::new(), 0u64);
        while off < s.layout.blob_len() {
            let n = piece_len(&s.layout, off);
            let first = off / s.layout.sealed_len(0);
            sink.put(off, first, whole[off as usize..off as usize + n].to_vec())
                .expect("put");
            let bad = if (first..first + 15).contains(&damaged) {
                vec![damaged]
            } else {
                vec![]
            };
            expected.push(SinkEvent::Written(off, bad));
            off += n as u64;
            k += 1;
            if k % 3 == 0 {
                sink.checkpoint(k).expect("checkpoint");
                expected.push(SinkEvent::Durable(k));
            }
        }
        let mut got = sink.events().expect("events");
        got.extend(sink.drain().expect("drain"));
        assert_eq!(got, expected);
        drop(sink);
        let file = std::fs::read(&path).expect("read");
        assert_eq!(file.len(), size);
        for c in 0..s.layout.chunk_count() {
            let lo = (c * cs as u64) as usize;
            let hi = (lo + cs as usize).min(size);
            if c != damaged {
                assert_eq!(file[lo..hi], data[lo..hi], "chunk {c}");
            }
        }
    }

    /// Read back while writing: ranges handed over as they become durable
    /// (at any offset, out of step with the writes, or not at all), then
    /// the rest at the end, hash to the whole file.
    #[test]
    fn reading_back_while_writing_hashes_the_whole_file() {
        let dir = tempfile::tempdir().expect("tmp");
        for size in [0usize, 1, 4095, 4096, 5_000_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 11 % 253) as u8).collect();
            for marks in [vec![], vec![1usize, 4096, 4097, 3_000_001], vec![size]] {
                let path = dir.path().join(format!("r{size}-{}", marks.len()));
                let part = open_part(&path, 0).expect("part");
                let mut rb = ReadBack::start(&part, &path).expect("start");
                let mut at = 0usize;
                for &m in marks.iter().filter(|&&m| m <= size) {
                    part.write_all_at(&data[at..m.max(at)], at as u64)
                        .expect("w");
                    at = m.max(at);
                    part.sync_data().expect("sync");
                    rb.durable(at as u64);
                }
                part.write_all_at(&data[at..], at as u64).expect("w");
                part.sync_data().expect("sync");
                let h = rb.finish("verify", size as u64, &Quiet).expect("finish");
                assert_eq!(h, blake3::hash(&data), "size {size} marks {marks:?}");
            }
            // A file shorter than announced is an error, not a hash.
            let path = dir.path().join(format!("short{size}"));
            let part = open_part(&path, 0).expect("part");
            part.write_all_at(&data, 0).expect("w");
            let rb = ReadBack::start(&part, &path).expect("start");
            assert!(rb.finish("verify", size as u64 + 1, &Quiet).is_err());
        }
    }

    /// A read-back carried over to the next pass of a download goes on
    /// only for the same file, with nothing it may have read cut off.
    #[test]
    fn a_read_back_continues_only_over_what_it_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("p");
        let data: Vec<u8> = (0..3 * 4096 + 7).map(|i| (i * 5 % 251) as u8).collect();
        let part = open_part(&path, 0).expect("part");
        part.write_all_at(&data[..8192], 0).expect("w");
        part.sync_data().expect("sync");
        let mut rb = ReadBack::start(&part, &path).expect("start");
        rb.durable(8192);
        // The next pass starts from the committed length.
        let again = open_part(&path, 8192).expect("reopen");
        assert!(rb.continues(&again, 8192));
        // A download reset to an earlier length, or a new file under the
        // same name, starts a new read-back.
        assert!(!rb.continues(&again, 4096));
        std::fs::remove_file(&path).expect("rm");
        let fresh = open_part(&path, 8192).expect("new file");
        assert!(!rb.continues(&fresh, 8192));
        // Carried over, it reads the rest and hashes the whole file.
        again.write_all_at(&data[8192..], 8192).expect("w");
        again.sync_data().expect("sync");
        std::fs::remove_file(&path).expect("rm");
        let h = rb
            .finish("verify", data.len() as u64, &Quiet)
            .expect("finish");
        assert_eq!(h, blake3::hash(&data));
    }

    #[test]
    fn ranges_rebuild_the_blob_exactly() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("f");
        for size in [0usize, 1, 4096, 4097, 3 * 4096 + 5] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
            std::fs::write(&src, &data).expect("write");
            let key = BlobKey::random(&mut OsRng);
            let mut whole = Vec::new();
            let s = blob::seal_blob(&key, 4096, &data[..], &mut whole).expect("seal");
            assert_eq!(
                summarize(&src, 4096).expect("sum"),
                (s.layout, s.plaintext_hash)
            );
            let f = File::open(&src).expect("open");
            // Any offset, any length: the same bytes as the whole blob.
            for off in [0u64, 1, 4111, 4112, 4113, whole.len() as u64] {
                for max in [1usize, 5000, 1 << 20] {
                    let got =
                        seal_range(&f, &key.cipher(), &s.layout, off, max, None).expect("range");
                    let lo = (off as usize).min(whole.len());
                    let hi = (lo + max).min(whole.len());
                    assert_eq!(got, whole[lo..hi], "size {size} off {off} max {max}");
                }
            }
            // Pieces cover the blob on chunk boundaries.
            let mut off = 0u64;
            let mut pieces = 0;
            while off < s.layout.blob_len() {
                let n = piece_len(&s.layout, off);
                assert!(n > 0 && n <= MAX_BLOB_PIECE);
                off += n as u64;
                pieces += 1;
            }
            assert!(pieces >= 1);
            // Writing the chunks back gives the file; a flipped byte is
            // reported by chunk index.
            let part = open_part(&dir.path().join("p"), 0).expect("part");
            let mut bad_blob = whole.clone();
            if size > 4096 {
                bad_blob[4112 + 3] ^= 1;
            }
            let bad =
                write_chunks(&part, &key.cipher(), &s.layout, 0, &mut bad_blob).expect("write");
            if size > 4096 {
                assert_eq!(bad, vec![1]);
            } else {
                assert!(bad.is_empty());
                part.set_len(size as u64).expect("len");
                let h = read_back(&part, &dir.path().join("p"), size as u64, &Quiet)
                    .expect("read back");
                assert_eq!(h, blake3::hash(&data));
            }
        }
    }

    #[test]
    fn repair_blobs_are_the_named_chunks_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("f");
        let data: Vec<u8> = (0..5 * 4096 + 9).map(|i| (i * 13) as u8).collect();
        std::fs::write(&src, &data).expect("write");
        let key = BlobKey::random(&mut OsRng);
        let mut whole = Vec::new();
        let s = blob::seal_blob(&key, 4096, &data[..], &mut whole).expect("seal");
        let f = File::open(&src).expect("open");
        let chunks = [1u64, 3, 5];
        let mut want = Vec::new();
        for &c in &chunks {
            let o = s.layout.offset(c) as usize;
            want.extend_from_slice(&whole[o..o + s.layout.sealed_len(c) as usize]);
        }
        let cipher = key.cipher();
        let (len, h) = repair_summary(&f, &cipher, &s.layout, &chunks).expect("sum");
        assert_eq!((len, h), (want.len() as u64, blake3::hash(&want)));
        for off in [0u64, 1, 4112, 4113, want.len() as u64 - 1] {
            for max in [1usize, 4000, 1 << 20] {
                let got = repair_range(&f, &cipher, &s.layout, &chunks, off, max).expect("range");
                let lo = off as usize;
                let hi = (lo + max).min(want.len());
                assert_eq!(got, want[lo..hi], "off {off} max {max}");
            }
        }
    }

    #[test]
    fn placing_never_clobbers_or_follows() {
        let dir = tempfile::tempdir().expect("tmp");
        let part = dir.path().join(".sealpost-part-x");
        std::fs::write(&part, b"new").expect("w");
        let placed = |name: &str| {
            place(&part, dir.path(), name)
                .expect("place")
                .expect("a free name")
        };
        assert_eq!(placed("a.txt"), dir.path().join("a.txt"));
        assert_eq!(placed("a.txt"), dir.path().join("a (1).txt"));
        assert_eq!(placed("noext"), dir.path().join("noext"));
        assert_eq!(placed("noext"), dir.path().join("noext (1)"));
        // A dangling symbolic link holds its name (and is not followed).
        let outside = dir.path().join("outside");
        std::os::unix::fs::symlink(&outside, dir.path().join("link.txt")).expect("symlink");
        assert_eq!(placed("link.txt"), dir.path().join("link (1).txt"));
        assert!(!outside.exists());
        // The agent's own names are out of a sender's reach.
        assert_eq!(
            placed(".sealpost-part-x"),
            dir.path().join("_.sealpost-part-x")
        );
        assert_eq!(std::fs::read(&part).expect("part"), b"new");
    }

    /// Every name tried fits 255 bytes, multi-byte characters are cut
    /// whole, and the same long name received twice gets two names.
    #[test]
    fn long_names_fit_the_file_system() {
        let dir = tempfile::tempdir().expect("tmp");
        let part = dir.path().join(".sealpost-part-y");
        std::fs::write(&part, b"x").expect("w");
        for name in [
            "n".repeat(251) + ".txt",
            "é".repeat(127),
            "n".repeat(255),
            format!(".{}", "e".repeat(254)),
            format!("{}.{}", "a".repeat(200), "b".repeat(54)),
            format!("{}{}", OWN_PREFIX, "p".repeat(245)),
        ] {
            assert!(name.len() <= NAME_MAX);
            for c in candidate_names(&name).take(20) {
                assert!(c.len() <= NAME_MAX, "{c}");
            }
            let a = place(&part, dir.path(), &name)
                .expect("first")
                .expect("name");
            let b = place(&part, dir.path(), &name)
                .expect("second")
                .expect("name");
            assert_ne!(a, b);
        }
        assert_eq!(candidate_names("x").count(), MAX_NAME_TRIES);
    }
}
