//! `sealpost-floor`: the cryptographic work of moving a file, with no I/O,
//! for counting its instructions beside the real transfer's
//! (`bench/instructions.sh` with `FILE_MB`, issue 20). Each step runs the
//! same library calls the agent and the relay make on the same amount of
//! data, from memory to memory:
//!
//! - `seal`: the sender's `seal_blob` (BLAKE3 of the plaintext, AES-256-GCM
//!   chunks, BLAKE3 of the blob);
//! - `seal-open`: that, then the recipient's `open_blob` of the result
//!   (its cost alone is the difference);
//! - `hash`: BLAKE3 of the blob (what the relay checks a blob against);
//! - `tls`: AES-256-GCM over 16 KiB records, the record protection TLS 1.3
//!   (`TLS_AES_256_GCM_SHA384`, which the relay's rustls picks) applies
//!   to the bytes of one direction of one connection.
//!
//! - `message`: `--count` messages of 1 KiB (padded, as `send` seals them)
//!   sealed by one identity to another and opened: the X25519 and Ed25519
//!   work, age's and the header's hashing and AEAD of each message — what
//!   a message costs its two ends before any I/O or bookkeeping.
//!
//! Each file step runs once over MB mebibytes; the tool prints what it did
//! so that the compiler cannot drop the work. A measuring tool; it touches
//! no file and no network.

use std::io;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use rand_core::OsRng;
use sealpost_proto::blob::{self, BlobKey};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Step {
    Seal,
    SealOpen,
    Hash,
    Tls,
    Message,
}

#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[arg(value_enum)]
    step: Step,
    /// Mebibytes of file
    #[arg(long, default_value_t = 64)]
    mb: u64,
    /// Messages (`message`)
    #[arg(long, default_value_t = 1000)]
    count: u64,
}

/// `n` bytes of a fixed pattern, read without a copy per byte.
fn plaintext(n: u64) -> impl io::Read {
    io::Read::take(io::repeat(0x5a), n)
}

fn main() -> ExitCode {
    let a = Args::parse();
    let n = a.mb * 1024 * 1024;
    let key = BlobKey::random(&mut OsRng);
    let chunk = blob::DEFAULT_CHUNK_SIZE;
    let done = match a.step {
        Step::Message => messages(a.count),
        Step::Seal => blob::seal_blob(&key, chunk, plaintext(n), io::sink())
            .map(|s| format!("sealed {} bytes, blob {}", n, s.blob_hash)),
        Step::SealOpen => {
            let mut sealed = Vec::new();
            blob::seal_blob(&key, chunk, plaintext(n), &mut sealed).and_then(|s| {
                blob::open_blob(&key, &s.layout, &s.plaintext_hash, &sealed[..], io::sink())
                    .map_err(|e| io::Error::other(e.to_string()))
                    .map(|()| format!("sealed and opened {n} bytes"))
            })
        }
        Step::Hash => {
            let mut h = blake3::Hasher::new();
            let piece = vec![0x5au8; 1024 * 1024];
            for _ in 0..a.mb {
                h.update(&piece);
            }
            Ok(format!("hashed {n} bytes: {}", h.finalize()))
        }
        Step::Tls => {
            let cipher = key.cipher();
            // 16 KiB of plaintext and room for the tag.
            let mut record = vec![0x5au8; 16 * 1024 + 16];
            let mut tags = 0u64;
            for i in 0..n / (16 * 1024) {
                cipher.seal_in_place(i, false, &mut record);
                tags = tags.wrapping_add(u64::from(record[record.len() - 1]));
            }
            Ok(format!("protected {n} bytes in records ({tags})"))
        }
    };
    match done {
        Ok(what) => {
            println!("{what}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Seals `count` 1 KiB messages from one identity to another and opens
/// them, as the sender's and the recipient's agents do.
fn messages(count: u64) -> io::Result<String> {
    use sealpost_proto::message::{open_slice, seal_to_vec, SealRequest};
    use sealpost_proto::{Identity, Kind, MessageId};
    let alice = Identity::generate(&mut OsRng);
    let bob = Identity::generate(&mut OsRng);
    let to = [*bob.public()];
    let content = vec![b'x'; 1024];
    let mut opened = 0u64;
    for i in 0..count {
        let req = SealRequest {
            kind: Kind::Message,
            id: MessageId::random(&mut OsRng),
            created_at: 1_750_000_000 + i,
            expires_at: 1_750_086_400 + i,
            in_reply_to: None,
            reply_relay: None,
            recipients: &to,
            pad_for_len: Some(content.len() as u64),
        };
        let sealed = seal_to_vec(&alice, &req, &content).map_err(io::Error::other)?;
        let (_, plain) = open_slice(&bob, &sealed, 1 << 20).map_err(io::Error::other)?;
        opened += plain.len() as u64;
    }
    Ok(format!(
        "sealed and opened {count} messages, {opened} bytes"
    ))
}
