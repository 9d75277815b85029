//! Sealing and opening, side by side with the age crate alone and with the
//! public-key operations a message costs, in the same run:
//!
//! ```text
//! cargo bench -p sealpost-proto --bench seal
//! ```
//!
//! Groups: `pk_ops` (X25519 ephemeral key, X25519 agreement, Ed25519 sign
//! and verify), `message_1k` (sealpost seal/open vs age encrypt/decrypt of
//! 1 KiB), `stream_256m` (256 MiB through seal_stream/open_stream vs age),
//! `chunk_aead` (a 64 KiB blob chunk sealed in place with the blob cipher,
//! ring's AES-256-GCM, against ring's ChaCha20-Poly1305, the candidates of
//! docs/DESIGN.md).

use std::hint::black_box;
use std::io::{self, Seek, SeekFrom, Write};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sealpost_proto::blob::{self, BlobKey};
use sealpost_proto::message::{self, OpenLimits};
use sealpost_proto::{Identity, Kind, MessageId, SealRequest};

/// A seekable writer that keeps nothing: measures sealing, not memcpy.
struct NullSeek {
    pos: u64,
    len: u64,
}

impl Write for NullSeek {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.pos += b.len() as u64;
        self.len = self.len.max(self.pos);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for NullSeek {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => (self.len as i64 + d) as u64,
            SeekFrom::Current(d) => (self.pos as i64 + d) as u64,
        };
        Ok(self.pos)
    }
}

fn ids() -> (Identity, Identity) {
    (
        Identity::from_secret_bytes(&[1; 32], &[2; 32]),
        Identity::from_secret_bytes(&[3; 32], &[4; 32]),
    )
}

fn req(to: &[sealpost_proto::PublicIdentity]) -> SealRequest<'_> {
    SealRequest {
        kind: Kind::Message,
        id: MessageId([7; 16]),
        created_at: 1_750_000_000,
        expires_at: 1_750_086_400,
        in_reply_to: None,
        reply_relay: None,
        recipients: to,
        pad_for_len: None,
    }
}

fn age_encrypt(to: &age::x25519::Recipient, data: &[u8], out: impl Write) {
    let enc = age::Encryptor::with_recipients(std::iter::once(to as &dyn age::Recipient))
        .expect("recipient");
    let mut w = enc.wrap_output(out).expect("header");
    w.write_all(data).expect("write");
    w.finish().expect("finish");
}

fn age_decrypt(id: &age::x25519::Identity, data: &[u8], out: impl Write) {
    let d = age::Decryptor::new_buffered(data).expect("header");
    let mut r = d
        .decrypt(std::iter::once(id as &dyn age::Identity))
        .expect("decrypt");
    let mut out = out;
    io::copy(&mut r, &mut out).expect("copy");
}

fn pk_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("pk_ops");
    let mut rng = StdRng::seed_from_u64(1);
    g.bench_function("x25519_ephemeral_keygen", |b| {
        b.iter(|| {
            let s = x25519_dalek::EphemeralSecret::random_from_rng(&mut rng);
            black_box(x25519_dalek::PublicKey::from(&s))
        })
    });
    let s = x25519_dalek::StaticSecret::from([9u8; 32]);
    let p = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([8u8; 32]));
    g.bench_function("x25519_agreement", |b| {
        b.iter(|| black_box(s.diffie_hellman(black_box(&p))))
    });
    // What sealpost's age stanzas use (sealpost_proto::identity).
    {
        use aws_lc_rs::agreement as ecdh;
        g.bench_function("x25519_ephemeral_keygen_aws_lc", |b| {
            b.iter(|| {
                let s = ecdh::PrivateKey::generate(&ecdh::X25519).expect("keygen");
                black_box(s.compute_public_key().expect("public"))
            })
        });
        let s = ecdh::PrivateKey::from_private_key(&ecdh::X25519, &[9u8; 32]).expect("secret");
        let p = ecdh::UnparsedPublicKey::new(&ecdh::X25519, *p.as_bytes());
        g.bench_function("x25519_agreement_aws_lc", |b| {
            b.iter(|| ecdh::agree(&s, black_box(&p), (), |k| Ok::<u8, ()>(k[0])).expect("agree"))
        });
    }
    let sk = SigningKey::from_bytes(&[5; 32]);
    let msg = [0u8; 200];
    g.bench_function("ed25519_sign", |b| {
        b.iter(|| black_box(sk.sign(black_box(&msg))))
    });
    let sig = sk.sign(&msg);
    let vk = sk.verifying_key();
    g.bench_function("ed25519_verify_strict", |b| {
        b.iter(|| vk.verify_strict(black_box(&msg), &sig).expect("valid"))
    });
    g.finish();
}

fn message_1k(c: &mut Criterion) {
    let (a, b) = ids();
    let to = [*b.public()];
    let content = vec![0x5au8; 1024];
    let sealed = message::seal_to_vec(&a, &req(&to), &content).expect("seal");
    let age_r = b.public().age_reference_recipient();
    let mut age_ct = Vec::new();
    age_encrypt(&age_r, &content, &mut age_ct);

    let mut g = c.benchmark_group("message_1k");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sealpost_seal", |bch| {
        bch.iter(|| black_box(message::seal_to_vec(&a, &req(&to), &content).expect("seal")))
    });
    g.bench_function("sealpost_open", |bch| {
        bch.iter(|| black_box(message::open_slice(&b, &sealed, 1 << 20).expect("open")))
    });
    g.bench_function("age_encrypt", |bch| {
        bch.iter(|| {
            let mut out = Vec::with_capacity(2048);
            age_encrypt(&age_r, &content, &mut out);
            black_box(out)
        })
    });
    let b_age = b.age_reference_identity();
    g.bench_function("age_decrypt", |bch| {
        bch.iter(|| {
            let mut out = Vec::with_capacity(2048);
            age_decrypt(&b_age, &age_ct, &mut out);
            black_box(out)
        })
    });
    g.finish();
}

fn stream_256m(c: &mut Criterion) {
    const SIZE: usize = 256 << 20;
    let (a, b) = ids();
    let to = [*b.public()];
    let mut data = vec![0u8; SIZE];
    StdRng::seed_from_u64(2).fill_bytes(&mut data);
    let sealed = message::seal_to_vec(&a, &req(&to), &data).expect("seal");
    let age_r = b.public().age_reference_recipient();
    let mut age_ct = Vec::with_capacity(SIZE + (SIZE >> 12) + 1024);
    age_encrypt(&age_r, &data, &mut age_ct);
    let key = BlobKey([6; 32]);
    let mut blob_ct = Vec::with_capacity(SIZE + (SIZE >> 12));
    let summary =
        blob::seal_blob(&key, blob::DEFAULT_CHUNK_SIZE, &data[..], &mut blob_ct).expect("blob");

    let mut g = c.benchmark_group("stream_256m");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("sealpost_seal_stream", |bch| {
        bch.iter(|| {
            let mut out = NullSeek { pos: 0, len: 0 };
            black_box(message::seal_stream(&a, &req(&to), &data[..], &mut out).expect("seal"))
        })
    });
    g.bench_function("sealpost_open_stream", |bch| {
        bch.iter(|| {
            black_box(
                message::open_stream(&b, &sealed[..], io::sink(), OpenLimits::default())
                    .expect("open"),
            )
        })
    });
    g.bench_function("age_encrypt", |bch| {
        bch.iter(|| age_encrypt(&age_r, &data, io::sink()))
    });
    let b_age = b.age_reference_identity();
    g.bench_function("age_decrypt", |bch| {
        bch.iter(|| age_decrypt(&b_age, &age_ct, io::sink()))
    });
    g.bench_function("blob_seal", |bch| {
        bch.iter(|| {
            black_box(
                blob::seal_blob(&key, blob::DEFAULT_CHUNK_SIZE, &data[..], io::sink())
                    .expect("seal"),
            )
        })
    });
    g.bench_function("blob_open", |bch| {
        bch.iter(|| {
            blob::open_blob(
                &key,
                &summary.layout,
                &summary.plaintext_hash,
                &blob_ct[..],
                io::sink(),
            )
            .expect("open")
        })
    });
    g.finish();
}

fn chunk_aead(c: &mut Criterion) {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
    let mut chunk = vec![9u8; blob::DEFAULT_CHUNK_SIZE as usize];
    let mut g = c.benchmark_group("chunk_aead");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    for (name, alg) in [
        ("aes_256_gcm", &AES_256_GCM),
        ("chacha20_poly1305", &CHACHA20_POLY1305),
    ] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &[5; 32]).expect("key"));
        g.bench_function(name, |bch| {
            bch.iter(|| {
                let nonce = Nonce::assume_unique_for_key([0; 12]);
                black_box(
                    key.seal_in_place_separate_tag(nonce, Aad::empty(), &mut chunk)
                        .expect("seal"),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pk_ops, message_1k, stream_256m, chunk_aead);
criterion_main!(benches);
