//! The sealed layer's specification, as tests: round trips, and every
//! single-bit flip, truncation, chunk swap or duplication, wrong recipient,
//! forwarding, replay or expiry rejected with the right error.

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use sealpost_proto::blob::{self, BlobKey, BlobLayout};
use sealpost_proto::codec::DecodeError;
use sealpost_proto::manifest::{BlobId, FileManifest};
use sealpost_proto::message::{self, testing, OpenLimits, AGE_CHUNK_SIZE};
use sealpost_proto::*;

mod vectors;

const NOW: u64 = 1_750_000_000;

fn ident(n: u8) -> Identity {
    Identity::from_secret_bytes(&[n; 32], &[n.wrapping_add(100); 32])
}

fn req(recipients: &[PublicIdentity], id: u8) -> SealRequest<'_> {
    SealRequest {
        kind: Kind::Message,
        id: MessageId([id; 16]),
        created_at: NOW,
        expires_at: NOW + 3600,
        in_reply_to: None,
        reply_relay: None,
        recipients,
        pad_for_len: None,
    }
}

fn seal(from: &Identity, to: &[PublicIdentity], content: &[u8]) -> Vec<u8> {
    message::seal_to_vec(from, &req(to, 1), content).expect("seal")
}

fn open(me: &Identity, sealed: &[u8]) -> Result<(OpenedMessage, Vec<u8>), OpenError> {
    message::open_slice(me, sealed, 64 << 20)
}

fn content_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn round_trips_at_the_interesting_sizes() {
    let (a, b) = (ident(1), ident(2));
    let header_len = 5 + 1 + 16 + 8 + 8 + 1 + 64 + 1 + 64;
    let c = AGE_CHUNK_SIZE as usize;
    let sizes = [
        0,
        1,
        c - 1,
        c,
        c + 1,
        c - header_len - 104,
        c - header_len - 104 + 1,
        2 * c - header_len - 104,
        3 * 1024 * 1024 + 17,
        // Past the point where hashing moves to its own thread.
        9 * 1024 * 1024 + 5,
    ];
    for size in sizes {
        let content = content_of(size);
        let sealed = seal(&a, &[*b.public()], &content);
        let (m, got) = open(&b, &sealed).unwrap_or_else(|e| panic!("size {size}: {e}"));
        assert_eq!(got, content, "size {size}");
        assert_eq!(m.content_len, size as u64);
        assert_eq!(m.content_hash, blake3::hash(&content));
        assert_eq!(m.header.sender, *a.public());
        assert_eq!(m.header.id, MessageId([1; 16]));
        assert_eq!(m.sealed_len, sealed.len() as u64);
    }
}

#[test]
fn every_recipient_can_open_and_others_cannot() {
    let (a, b, c, d) = (ident(1), ident(2), ident(3), ident(4));
    let sealed = seal(&a, &[*b.public(), *c.public()], b"to both");
    assert_eq!(open(&b, &sealed).expect("b").1, b"to both");
    assert_eq!(open(&c, &sealed).expect("c").1, b"to both");
    assert!(matches!(
        open(&d, &sealed),
        Err(OpenError::NotForMe(NotForMeReason::NoMatchingKey))
    ));
}

#[test]
fn a_message_re_encrypted_to_someone_else_is_refused() {
    let (a, b, c) = (ident(1), ident(2), ident(3));
    let sealed = seal(&a, &[*b.public()], b"for bob only");
    let plain = testing::decrypt_plaintext(&b, &sealed).expect("bob decrypts");
    let forwarded = testing::seal_plaintext(&[*c.public()], &plain);
    assert!(matches!(
        open(&c, &forwarded),
        Err(OpenError::NotForMe(NotForMeReason::NotInSignedRecipients))
    ));
}

/// PROTOCOL §4.2: a stanza whose ephemeral key is a low-order point (an
/// all-zero agreement) makes the age header malformed, as does one with a
/// non-canonical argument; a stanza changed to another recipient's key
/// (its body no longer authenticates) is not for me.
#[test]
fn a_bad_x25519_stanza_is_malformed_and_a_foreign_one_not_for_me() {
    let (a, b) = (ident(1), ident(2));
    let sealed = seal(&a, &[*b.public()], b"hello");
    let at = sealed
        .windows(10)
        .position(|w| w == b"-> X25519 ")
        .expect("an X25519 stanza")
        + 10;
    let with_epk = |epk: &[u8]| {
        let mut s = sealed.clone();
        s[at..at + 43].copy_from_slice(epk);
        s
    };
    let zero = data_encoding::BASE64_NOPAD.encode(&[0u8; 32]);
    assert!(matches!(
        open(&b, &with_epk(zero.as_bytes())),
        Err(OpenError::Malformed(_))
    ));
    // The last character carries two unused bits: set one.
    let mut loose = sealed[at..at + 43].to_vec();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let v = alphabet.iter().position(|c| *c == loose[42]).expect("b64") as u8;
    loose[42] = alphabet[((v & !3) | 1) as usize];
    assert!(matches!(
        open(&b, &with_epk(&loose)),
        Err(OpenError::Malformed(_))
    ));
    let other = data_encoding::BASE64_NOPAD.encode(ident(3).public().agreement_bytes());
    assert!(matches!(
        open(&b, &with_epk(other.as_bytes())),
        Err(OpenError::NotForMe(NotForMeReason::NoMatchingKey))
    ));
}

#[test]
fn a_changed_header_or_trailer_breaks_the_signature() {
    let (a, b) = (ident(1), ident(2));
    let sealed = seal(&a, &[*b.public()], b"pay 10");
    let plain = testing::decrypt_plaintext(&b, &sealed).expect("decrypts");
    // Every byte of the signed header, the content and the trailer's length
    // and hash: re-encrypted so that only the signature can catch it.
    let sig_start = plain.len() - 64;
    for i in 0..sig_start {
        let mut p = plain.clone();
        p[i] ^= 0x01;
        let forged = testing::seal_plaintext(&[*b.public()], &p);
        match open(&b, &forged) {
            Err(OpenError::BadSignature) | Err(OpenError::Malformed(_)) => {}
            // Flipping the version byte is reported as such.
            Err(OpenError::UnsupportedVersion { .. }) if i == 4 => {}
            other => panic!("byte {i}: {other:?}"),
        }
    }
    // The content alone (header and trailer intact): only the hash check
    // can catch it, and it must.
    let content_at = plain.len() - 104 - 6;
    let mut p = plain.clone();
    p[content_at] ^= 0x20;
    let forged = testing::seal_plaintext(&[*b.public()], &p);
    assert!(matches!(open(&b, &forged), Err(OpenError::Malformed(_))));
}

#[test]
fn every_bit_flip_of_a_small_message_is_rejected() {
    let (a, b) = (ident(1), ident(2));
    let sealed = seal(&a, &[*b.public()], b"a short message");
    let payload = testing::age_payload_start(&sealed).expect("age layout");
    for bit in 0..sealed.len() * 8 {
        let mut s = sealed.clone();
        s[bit / 8] ^= 1 << (bit % 8);
        let byte = bit / 8;
        let r = open(&b, &s);
        let ok = match (&r, byte) {
            (Err(OpenError::Malformed(DecodeError::BadMagic { .. })), 0..=3) => true,
            // Only the container's own version byte reads as a version
            // this build does not know; damage anywhere else never does.
            (Err(OpenError::UnsupportedVersion { .. }), 4) => true,
            // The length field: longer than the data is a cut-short file;
            // shorter leaves trailing bytes or cuts the age stream.
            (
                Err(OpenError::Truncated { .. })
                | Err(OpenError::Malformed(_))
                | Err(OpenError::Tampered { .. })
                | Err(OpenError::TooLarge { .. }),
                5..=12,
            ) => true,
            (
                Err(OpenError::NotForMe(NotForMeReason::NoMatchingKey))
                | Err(OpenError::Tampered {
                    at: TamperedAt::Header,
                })
                | Err(OpenError::Malformed(_)),
                b,
            ) if (13..payload - 16).contains(&b) => true,
            // age's 16-byte nonce feeds the payload key: chunk 0 fails.
            (Err(OpenError::Tampered { at }), b) if b >= payload - 16 => {
                *at == TamperedAt::Chunk(((b.max(payload) - payload) / (65536 + 16)) as u64)
            }
            _ => false,
        };
        assert!(ok, "flip of bit {bit} (byte {byte}) gave {r:?}");
    }
}

#[test]
fn every_truncation_is_reported_as_truncated() {
    let (a, b) = (ident(1), ident(2));
    let sealed = seal(&a, &[*b.public()], &content_of(70_000));
    for n in (0..sealed.len()).step_by(7).chain([sealed.len() - 1]) {
        let r = open(&b, &sealed[..n]);
        match r {
            Err(OpenError::Malformed(DecodeError::BadMagic { .. })) if n < 4 => {}
            Err(OpenError::Truncated { .. }) if n >= 4 => {}
            other => panic!("cut at {n} of {}: {other:?}", sealed.len()),
        }
    }
}

#[test]
fn extra_bytes_after_the_message_are_refused() {
    let (a, b) = (ident(1), ident(2));
    let mut sealed = seal(&a, &[*b.public()], b"x");
    sealed.push(0);
    assert!(matches!(open(&b, &sealed), Err(OpenError::Malformed(_))));
}

fn age_chunk_range(sealed: &[u8], i: usize) -> std::ops::Range<usize> {
    let start = testing::age_payload_start(sealed).expect("layout") + i * (65536 + 16);
    start..(start + 65536 + 16).min(sealed.len())
}

#[test]
fn swapped_and_duplicated_chunks_are_named() {
    let (a, b) = (ident(1), ident(2));
    let sealed = seal(&a, &[*b.public()], &content_of(5 * 65536));
    let (c1, c2) = (age_chunk_range(&sealed, 1), age_chunk_range(&sealed, 2));
    let mut swapped = sealed.clone();
    let chunk1 = sealed[c1.clone()].to_vec();
    swapped[c1.clone()].copy_from_slice(&sealed[c2.clone()]);
    swapped[c2.clone()].copy_from_slice(&chunk1);
    assert!(matches!(
        open(&b, &swapped),
        Err(OpenError::Tampered {
            at: TamperedAt::Chunk(1)
        })
    ));
    // Chunk 1 again in place of chunk 2, with the container length fixed up.
    let mut dup = sealed[..c2.start].to_vec();
    dup.extend_from_slice(&chunk1);
    dup.extend_from_slice(&sealed[c2.start..]);
    let fixed = testing::wrap_container(&dup[13..]);
    assert!(matches!(
        open(&b, &fixed),
        Err(OpenError::Tampered {
            at: TamperedAt::Chunk(2)
        })
    ));
}

#[test]
fn tampering_deep_in_a_long_message_is_named() {
    let (a, b) = (ident(1), ident(2));
    let mut sealed = seal(&a, &[*b.public()], &content_of(12 << 20));
    let chunk = 150; // about 9.4 MiB in: hashing runs on its own thread there
    let r = age_chunk_range(&sealed, chunk);
    sealed[r.start + 7] ^= 0x10;
    assert!(matches!(
        open(&b, &sealed),
        Err(OpenError::Tampered {
            at: TamperedAt::Chunk(150)
        })
    ));
}

#[test]
fn freshness_and_replay_decisions() {
    let (a, b) = (ident(1), ident(2));
    let sealed = seal(&a, &[*b.public()], b"hi");
    let (m, _) = open(&b, &sealed).expect("opens");
    let policy = FreshnessPolicy::default();
    assert!(policy.check(&m.header, NOW).is_ok());
    assert!(policy.check(&m.header, NOW + 3599).is_ok());
    assert!(matches!(
        policy.check(&m.header, NOW + 3600),
        Err(OpenError::Expired { .. })
    ));
    assert!(policy.check(&m.header, NOW - 300).is_ok());
    assert!(matches!(
        policy.check(&m.header, NOW - 301),
        Err(OpenError::FromFuture { .. })
    ));
    let mut cache = ReplayCache::new();
    let until = policy.remember_until(m.header.expires_at);
    cache
        .check_and_insert(m.header.id, until)
        .expect("first time");
    assert!(matches!(
        cache.check_and_insert(m.header.id, until),
        Err(OpenError::Replayed { .. })
    ));
    assert_eq!(cache.prune(until - 1), 0);
    assert_eq!(cache.prune(until), 1);
    assert!(cache.is_empty());
}

#[test]
fn sealing_refuses_bad_requests() {
    let (a, b) = (ident(1), ident(2));
    let to = [*b.public()];
    let mut r = req(&to, 1);
    r.expires_at = r.created_at;
    assert!(message::seal_to_vec(&a, &r, b"").is_err());
    let mut r = req(&to, 1);
    r.expires_at = r.created_at + message::MAX_LIFETIME_SECS + 1;
    assert!(message::seal_to_vec(&a, &r, b"").is_err());
    let twice = [*b.public(), *b.public()];
    assert!(message::seal_to_vec(&a, &req(&twice, 1), b"").is_err());
    assert!(message::seal_to_vec(&a, &req(&[], 1), b"").is_err());
}

/// A message may never expire (`NO_EXPIRY`, for files opened by hand); it
/// opens, and the freshness policy of relay delivery refuses it as such.
#[test]
fn a_message_without_expiry_opens_and_freshness_refuses_it() {
    let (a, b) = (ident(1), ident(2));
    let to = [*b.public()];
    let mut r = req(&to, 1);
    r.expires_at = message::NO_EXPIRY;
    let sealed = message::seal_to_vec(&a, &r, b"kept").expect("seals");
    let (m, content) = message::open_slice(&b, &sealed, 1 << 20).expect("opens");
    assert_eq!(content, b"kept");
    assert_eq!(m.header.expires_at, message::NO_EXPIRY);
    assert!(matches!(
        FreshnessPolicy::default().check(&m.header, m.header.created_at),
        Err(OpenError::NoExpiry)
    ));
    // One second short of it is a lifetime, and far too long.
    let mut r = req(&to, 1);
    r.expires_at = message::NO_EXPIRY - 1;
    assert!(message::seal_to_vec(&a, &r, b"").is_err());
}

#[test]
fn the_in_memory_bound_is_enforced() {
    let (a, b) = (ident(1), ident(2));
    let sealed = seal(&a, &[*b.public()], &content_of(10_000));
    assert!(matches!(
        message::open_slice(&b, &sealed, 9_999),
        Err(OpenError::TooLarge { .. })
    ));
    let limits = OpenLimits {
        max_sealed_len: 100,
    };
    assert!(matches!(
        message::open_stream(&b, &sealed[..], std::io::sink(), limits),
        Err(OpenError::TooLarge { .. })
    ));
}

// ---- file blobs ----

fn blob_of(content: &[u8], cs: u32) -> (BlobKey, Vec<u8>, blob::BlobSummary) {
    let key = BlobKey([42; 32]);
    let mut out = Vec::new();
    let s = blob::seal_blob(&key, cs, content, &mut out).expect("seal blob");
    (key, out, s)
}

fn open_blob(key: &BlobKey, s: &blob::BlobSummary, data: &[u8]) -> Result<Vec<u8>, OpenError> {
    let mut out = Vec::new();
    blob::open_blob(key, &s.layout, &s.plaintext_hash, data, &mut out).map(|_| out)
}

#[test]
fn blob_round_trips_at_the_interesting_sizes() {
    let cs = 4096u32;
    for size in [0usize, 1, 4095, 4096, 4097, 3 * 4096, 5 * 1024 * 1024 + 3] {
        let content = content_of(size);
        let (key, data, s) = blob_of(&content, cs);
        assert_eq!(data.len() as u64, s.layout.blob_len());
        assert_eq!(s.blob_hash, blake3::hash(&data));
        assert_eq!(
            open_blob(&key, &s, &data).expect("opens"),
            content,
            "size {size}"
        );
    }
}

#[test]
fn every_bit_flip_of_a_blob_names_its_chunk() {
    let (key, data, s) = blob_of(&content_of(9000), 4096);
    // One bit in every byte (the bit position rotating); the property test
    // below covers random bits.
    for bit in (0..data.len()).map(|i| i * 8 + i % 8) {
        let mut d = data.clone();
        d[bit / 8] ^= 1 << (bit % 8);
        let chunk = (bit / 8 / (4096 + 16)) as u64;
        match open_blob(&key, &s, &d) {
            Err(OpenError::Tampered {
                at: TamperedAt::Chunk(c),
            }) if c == chunk => {}
            other => panic!("bit {bit}: {other:?}"),
        }
    }
}

#[test]
fn blob_truncation_swap_duplication_and_extension_are_caught() {
    let (key, data, s) = blob_of(&content_of(4 * 4096 + 100), 4096);
    let boundaries = (1..5).flat_map(|i| i * 4112 - 2..i * 4112 + 2);
    for n in (0..data.len()).step_by(13).chain(boundaries) {
        assert!(
            matches!(
                open_blob(&key, &s, &data[..n]),
                Err(OpenError::Truncated { .. })
            ),
            "cut at {n}"
        );
    }
    let c = 4096 + 16;
    let mut swapped = data.clone();
    swapped[c..2 * c].copy_from_slice(&data[2 * c..3 * c]);
    swapped[2 * c..3 * c].copy_from_slice(&data[c..2 * c]);
    assert!(matches!(
        open_blob(&key, &s, &swapped),
        Err(OpenError::Tampered {
            at: TamperedAt::Chunk(1)
        })
    ));
    let mut dup = data[..2 * c].to_vec();
    dup.extend_from_slice(&data[c..]);
    assert!(matches!(
        open_blob(&key, &s, &dup),
        Err(OpenError::Tampered {
            at: TamperedAt::Chunk(2)
        })
    ));
    let mut longer = data.clone();
    longer.extend_from_slice(&data[..c]);
    assert!(matches!(
        open_blob(&key, &s, &longer),
        Err(OpenError::Malformed(_))
    ));
    // A whole final chunk dropped: the previous chunk is not flagged last.
    let l = BlobLayout::new(4 * 4096, 4096).expect("layout");
    let (k2, d2, s2) = blob_of(&content_of(5 * 4096), 4096);
    let mut out = Vec::new();
    assert!(blob::open_blob(&k2, &l, &s2.plaintext_hash, &d2[..4 * c], &mut out).is_err());
}

#[test]
fn manifest_round_trip_inside_a_sealed_message() {
    let (a, b) = (ident(1), ident(2));
    let mut rng = StdRng::seed_from_u64(7);
    let content = content_of(100_000);
    let key = BlobKey::random(&mut rng);
    let mut blob_bytes = Vec::new();
    let s = blob::seal_blob(
        &key,
        blob::DEFAULT_CHUNK_SIZE,
        &content[..],
        &mut blob_bytes,
    )
    .expect("blob");
    let m = FileManifest::new(
        BlobId::random(&mut rng),
        key.clone(),
        s.layout,
        s.plaintext_hash,
        "data.bin".into(),
    )
    .expect("manifest");
    let to = [*b.public()];
    let mut r = req(&to, 9);
    r.kind = Kind::FileManifest;
    let sealed = message::seal_to_vec(&a, &r, &m.encode()).expect("seal");
    let (opened, bytes) = open(&b, &sealed).expect("opens");
    assert_eq!(opened.header.kind, Kind::FileManifest);
    let back = FileManifest::decode(&bytes).expect("decodes");
    assert_eq!(back, m);
    let mut out = Vec::new();
    blob::open_blob(
        &back.key,
        &back.layout,
        &back.plaintext_hash,
        &blob_bytes[..],
        &mut out,
    )
    .expect("blob opens");
    assert_eq!(out, content);
    let enc = m.encode();
    for n in 0..enc.len() {
        assert!(FileManifest::decode(&enc[..n]).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn prop_round_trip(content in proptest::collection::vec(any::<u8>(), 0..200_000)) {
        let (a, b) = (ident(1), ident(2));
        let sealed = seal(&a, &[*b.public()], &content);
        let (_, got) = open(&b, &sealed).expect("opens");
        prop_assert_eq!(got, content);
    }

    #[test]
    fn prop_any_flip_is_rejected(len in 0usize..150_000, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (a, b) = (ident(1), ident(2));
        let mut sealed = seal(&a, &[*b.public()], &content_of(len));
        let i = pos.index(sealed.len());
        sealed[i] ^= 1 << bit;
        prop_assert!(open(&b, &sealed).is_err());
    }

    #[test]
    fn prop_any_truncation_is_truncated(len in 0usize..150_000, cut in any::<prop::sample::Index>()) {
        let (a, b) = (ident(1), ident(2));
        let sealed = seal(&a, &[*b.public()], &content_of(len));
        let n = 4 + cut.index(sealed.len() - 4);
        let truncated = matches!(open(&b, &sealed[..n]), Err(OpenError::Truncated { .. }));
        prop_assert!(truncated);
    }

    #[test]
    fn prop_blob_flip_names_chunk(len in 0usize..40_000, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (key, mut data, s) = blob_of(&content_of(len), 4096);
        let i = pos.index(data.len());
        data[i] ^= 1 << bit;
        let r = open_blob(&key, &s, &data);
        let named = matches!(r, Err(OpenError::Tampered { at: TamperedAt::Chunk(c) }) if c == (i / 4112) as u64);
        prop_assert!(named);
    }

    #[test]
    fn prop_manifest_round_trip(
        size in 0u64..(1 << 40),
        name in "[a-z]{1,20}(/[a-z0-9_-][a-z0-9 ._-]{0,28}[a-z0-9_-]){0,4}",
        group in proptest::option::of((any::<[u8; 16]>(), 1u32..=100_000, any::<prop::sample::Index>())),
    ) {
        let mut m = FileManifest::new(
            BlobId([3; 16]),
            BlobKey([4; 32]),
            sealpost_proto::blob::BlobLayout::new(size, 65536).expect("layout"),
            blake3::hash(name.as_bytes()),
            name,
        ).expect("manifest");
        if let Some((id, count, at)) = group {
            let index = at.index(count as usize) as u32;
            m = m.in_group(sealpost_proto::manifest::Group::new(id, index, count).expect("group"));
        }
        let enc = m.encode();
        prop_assert!(enc.len() <= sealpost_proto::manifest::MAX_MANIFEST_BYTES);
        prop_assert_eq!(FileManifest::decode(&enc).expect("decodes"), m);
    }

    #[test]
    fn prop_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = ContactCard::decode(&bytes);
        let _ = ContactCard::from_text(&String::from_utf8_lossy(&bytes));
        let _ = FileManifest::decode(&bytes);
        let _ = Identity::from_secret_file(&bytes);
        let _ = message::open_slice(&ident(2), &bytes, 1 << 20);
    }
}

/// File bytes carried by a prefix of a blob (what progress shows): 0 at
/// the start, the whole file at the end, never more than the file, never
/// decreasing.
#[test]
fn plain_before_counts_file_bytes_of_a_blob_prefix() {
    use sealpost_proto::blob::{BlobLayout, TAG_LEN};
    for (len, chunk) in [
        (6u64, 4096u32),
        (0, 4096),
        (10_000, 4096),
        (3 << 20, 1 << 20),
    ] {
        let l = BlobLayout::new(len, chunk).expect("layout");
        assert_eq!(l.plain_before(0), 0);
        assert_eq!(l.plain_before(l.blob_len()), len, "{len}");
        let mut last = 0;
        for off in (0..=l.blob_len()).step_by(997) {
            let p = l.plain_before(off);
            assert!(p >= last && p <= len, "{len} at {off}");
            last = p;
        }
    }
    let l = BlobLayout::new(10_000, 4096).expect("layout");
    assert_eq!(l.plain_before(4096 + TAG_LEN), 4096);
}

/// A card's text carries check characters: every single-character change
/// is told as a copying mistake (it read as a forged card), and a card
/// text from before checks existed still parses.
#[test]
fn a_mistyped_card_is_told_as_a_typo() {
    use sealpost_proto::card::{CardFields, ContactCard};
    let id = ident(7);
    let card = ContactCard::create(
        &id,
        CardFields {
            name: "Grace".into(),
            created_at: 1_750_000_000,
            relay: None,
        },
    )
    .expect("card");
    let text = card.to_text();
    let (body, check) = text.rsplit_once('.').expect("checked");
    assert_eq!(check.len(), 5);
    assert_eq!(ContactCard::from_text(body).expect("legacy form"), card);
    assert_eq!(ContactCard::from_text(&text).expect("checked form"), card);
    let prefix = sealpost_proto::card::TEXT_PREFIX.len();
    for at in (prefix..body.len()).step_by(7) {
        let mut t = text.clone().into_bytes();
        t[at] = if t[at] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(t).expect("ascii");
        let e = ContactCard::from_text(&t).expect_err("a typo");
        assert!(e.to_string().contains("check characters"), "at {at}: {e}");
    }
}

fn padded_req(recipients: &[PublicIdentity], len: usize) -> SealRequest<'_> {
    SealRequest {
        pad_for_len: Some(len as u64),
        ..req(recipients, 9)
    }
}

/// Padmé as the paper defines it: never shorter, at most 12 % longer
/// (beyond the smallest lengths), a fixed point once applied, and
/// monotonic; checked at every bucket edge up to 2^20 and beyond.
#[test]
fn padme_rounds_up_within_its_bound_at_every_bucket_edge() {
    let mut prev = 0;
    for len in 0..(1u64 << 20) + 5 {
        let p = message::padme(len);
        assert!(p >= len, "{len}");
        assert!(p >= prev, "monotonic at {len}");
        assert_eq!(message::padme(p), p, "fixed point at {len}");
        if len >= 256 {
            assert!((p - len) * 100 <= len * 12, "{len} -> {p}");
        }
        prev = p;
    }
    for e in 20..63u32 {
        let len = (1u64 << e) + 1;
        let p = message::padme(len);
        assert!(
            p >= len && u128::from(p - len) * 100 <= u128::from(len) * 12,
            "{len}"
        );
        assert_eq!(message::padme(p), p);
    }
    assert_eq!(message::padme(1025), 1088, "a multiple of 64 near 1 KiB");
    assert_eq!(
        message::padme(65_537),
        67_584,
        "a multiple of 2 KiB near 64 KiB"
    );
}

/// A padded message opens to exactly its content, and its plaintext is a
/// Padmé length, for content lengths around many bucket edges.
#[test]
fn padded_messages_round_trip_at_bucket_edges() {
    let (a, b) = (ident(1), ident(2));
    let to = [*b.public()];
    let mut lens: Vec<usize> = (0..200).collect();
    for edge in [1024usize, 4096, 65_536, 200_000] {
        lens.extend(edge.saturating_sub(300)..edge + 300);
    }
    for len in lens.into_iter().step_by(7) {
        let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let sealed = message::seal_to_vec(&a, &padded_req(&to, len), &content).expect("seal");
        let (_, opened) = message::open_slice(&b, &sealed, 1 << 22).expect("opens");
        assert_eq!(opened, content, "{len}");
        let plain = testing::decrypt_plaintext(&b, &sealed).expect("age");
        assert_eq!(
            message::padme(plain.len() as u64),
            plain.len() as u64,
            "{len}: the plaintext is a Padmé length"
        );
    }
}

/// Lengths in one bucket seal to one plaintext size: what the relay sees
/// differs only by age's own random stanza (see PROTOCOL.md §4.5).
#[test]
fn lengths_in_one_bucket_seal_to_one_size() {
    let (a, b) = (ident(1), ident(2));
    let to = [*b.public()];
    let plain = |r: &SealRequest<'_>, len: usize| {
        let s = message::seal_to_vec(&a, r, &vec![7u8; len]).expect("seal");
        testing::decrypt_plaintext(&b, &s).expect("age").len()
    };
    let s = plain(&padded_req(&to, 1000), 1000);
    for len in 960..1000 {
        assert_eq!(plain(&padded_req(&to, len), len), s, "{len}");
    }
    assert_ne!(
        plain(&req(&to, 1), 990),
        plain(&req(&to, 1), 1000),
        "without padding they differ"
    );
}

/// Every bit of the padding is checked: a sender cannot carry anything in
/// it (a relay cannot change it at all: age authenticates it).
#[test]
fn every_bit_flip_of_the_padding_is_refused() {
    let (a, b) = (ident(1), ident(2));
    let to = [*b.public()];
    let header = {
        let s = message::seal_to_vec(&a, &padded_req(&to, 5), b"hello").expect("seal");
        let (m, _) = message::open_slice(&b, &s, 1 << 20).expect("opens");
        m.header
    };
    let pad = 13u32;
    let good = testing::signed_plaintext_padded(&a, &header, b"hello", pad, 0);
    let (_, content) = testing::open_plaintext(&b, &good).expect("zero padding opens");
    assert_eq!(content, b"hello");
    let start = header.encode_padded(Some(pad)).len();
    for byte in start..start + pad as usize {
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            let e = testing::open_plaintext(&b, &bad).expect_err("refused");
            assert!(
                matches!(e, OpenError::Malformed(_)),
                "byte {byte} bit {bit}: {e}"
            );
        }
    }
    // Through the whole path too, re-encrypted so that age accepts it.
    let mut bad = good.clone();
    bad[start] = 1;
    let sealed = testing::seal_plaintext(&to, &bad);
    assert!(matches!(
        message::open_slice(&b, &sealed, 1 << 20),
        Err(OpenError::Malformed(_))
    ));
    // And a relay's flip of the encrypted padding is tampering.
    let sealed = testing::seal_plaintext(&to, &good);
    let at = testing::age_payload_start(&sealed).expect("layout") + 16 + start;
    let mut flipped = sealed.clone();
    flipped[at] ^= 0x80;
    assert!(matches!(
        message::open_slice(&b, &flipped, 1 << 20),
        Err(OpenError::Tampered { .. })
    ));
}

/// A padded header that states more padding than follows is refused; so
/// is content that is not the length stated for padding when sealing.
#[test]
fn padding_lengths_must_hold() {
    let (a, b) = (ident(1), ident(2));
    let to = [*b.public()];
    let s = message::seal_to_vec(&a, &padded_req(&to, 5), b"hello").expect("seal");
    let (m, _) = message::open_slice(&b, &s, 1 << 20).expect("opens");
    let mut short = testing::signed_plaintext_padded(&a, &m.header, b"", 200, 0);
    short.truncate(m.header.encode_padded(Some(200)).len() + 50);
    assert!(testing::open_plaintext(&b, &short).is_err());
    let e = message::seal_to_vec(&a, &padded_req(&to, 6), b"hello").expect_err("length");
    assert!(e.to_string().contains("length stated for padding"), "{e}");
}

// ---- padded file blobs (PROTOCOL 5.2) ----

fn padded_blob_of(content: &[u8], cs: u32) -> (BlobKey, Vec<u8>, blob::BlobSummary) {
    let key = BlobKey([43; 32]);
    let layout = BlobLayout::padme(content.len() as u64, cs).expect("layout");
    let mut out = Vec::new();
    let s = blob::seal_padded_blob(&key, &layout, content, &mut out).expect("seal");
    (key, out, s)
}

/// A padded file round-trips at every Padmé bucket edge near chunk
/// boundaries; its blob has the length of its bucket, so files in one
/// bucket make blobs of one length; the file written is only the file.
#[test]
fn padded_blobs_round_trip_at_bucket_edges() {
    let cs = 4096u32;
    let mut sizes = vec![0u64, 1, 2, 4095, 4096, 4097, 9000];
    for bucket_end in [4096u64 + 256, 65_536 + 4096, 1 << 20, (1 << 20) + 65_536] {
        let p = message::padme(bucket_end);
        sizes.extend([p - 1, p, p + 1]);
    }
    for size in sizes {
        let content = content_of(size as usize);
        let (key, data, s) = padded_blob_of(&content, cs);
        let want = BlobLayout::new(message::padme(size), cs).expect("layout");
        assert_eq!(data.len() as u64, want.blob_len(), "size {size}");
        assert_eq!(s.layout.data_len, size);
        assert_eq!(s.plaintext_hash, blake3::hash(&content));
        assert_eq!(
            open_blob(&key, &s, &data).expect("opens"),
            content,
            "size {size}"
        );
        // Another length in the same bucket seals to a blob of one length.
        let lower = message::padme(size).saturating_sub(1).max(size);
        if message::padme(lower) == message::padme(size) {
            let (_, other, _) = padded_blob_of(&content_of(lower as usize), cs);
            assert_eq!(other.len(), data.len(), "{size} and {lower}");
        }
    }
}

/// Every bit flip in the encrypted padding fails its chunk's tag; padding
/// the sender encrypted with a byte that is not zero authenticates and is
/// refused as malformed, wherever it is; a blob sealed with the file's
/// length as the padded one (no padding) opens as the unpadded blob.
#[test]
fn every_bit_flip_of_a_blobs_padding_is_refused() {
    let cs = 4096u32;
    let content = content_of(5000);
    let (key, data, s) = padded_blob_of(&content, cs);
    let l = s.layout;
    assert_eq!((l.plaintext_len, l.chunk_count()), (5120, 2));
    // The padding is the last 120 bytes of chunk 1's plaintext: bytes
    // 904..1024 of its ciphertext.
    let start = (l.offset(1) + l.data_in(1)) as usize;
    for byte in start..start + l.pad_len() as usize {
        for bit in 0..8 {
            let mut bad = data.clone();
            bad[byte] ^= 1 << bit;
            assert!(
                matches!(
                    open_blob(&key, &s, &bad),
                    Err(OpenError::Tampered {
                        at: TamperedAt::Chunk(1)
                    })
                ),
                "byte {byte} bit {bit}"
            );
        }
    }
    // Re-encrypted with one padding byte not zero: every position.
    let cipher = key.cipher();
    for at in 0..l.pad_len() as usize {
        let mut plain = content[4096..].to_vec();
        plain.resize(l.plain_len(1) as usize, 0);
        plain[l.data_in(1) as usize + at] = 1;
        blob::seal_chunk(&cipher, 1, true, &mut plain);
        let mut bad = data[..l.offset(1) as usize].to_vec();
        bad.extend_from_slice(&plain);
        assert!(
            matches!(open_blob(&key, &s, &bad), Err(OpenError::Malformed(_))),
            "padding byte {at}"
        );
        let mut chunk = plain.clone();
        assert!(blob::open_chunk(&cipher, &l, 1, &mut chunk)
            .and_then(|_| blob::check_padding(&l, 1, &chunk))
            .is_err());
    }
    // The same key and chunks read with the unpadded layout: the padding
    // would be file bytes, so the manifest's hash refuses it.
    let unpadded = blob::BlobSummary {
        layout: BlobLayout::new(l.plaintext_len, cs).expect("layout"),
        ..s.clone()
    };
    assert!(matches!(
        open_blob(&key, &unpadded, &data),
        Err(OpenError::Malformed(_))
    ));
    // Sealing checks the input's length against the layout.
    let mut sink = Vec::new();
    assert!(blob::seal_padded_blob(&key, &l, &content[..4999], &mut sink).is_err());
    let mut longer = content.clone();
    longer.push(0);
    assert!(blob::seal_padded_blob(&key, &l, &longer[..], &mut sink).is_err());
}

fn pair_card(seed: u8, name: &str) -> ContactCard {
    ContactCard::create(
        &ident(seed),
        CardFields {
            name: name.into(),
            created_at: 1_750_000_000,
            relay: None,
        },
    )
    .expect("card")
}

/// Both sides of a pairing with the same code agree and open each other's
/// cards; with different codes neither opens the other's, nor does a
/// relay's altered byte anywhere in a sealed card.
#[test]
fn pairing_succeeds_only_with_the_same_code() {
    use rand_core::OsRng;
    use sealpost_proto::pair::{Code, Exchange, PairError, Side};
    let (ca, cb) = (pair_card(1, "alice"), pair_card(2, "bob"));
    let code = Code::words(12, 2, &mut OsRng);
    let (ea, x) = Exchange::start(Side::Inviter, &code, OsRng);
    let (eb, y) = Exchange::start(Side::Accepter, &code, OsRng);
    let (ka, kb) = (ea.finish(&y).expect("a"), eb.finish(&x).expect("b"));
    assert_eq!(ka.transcript(), kb.transcript());
    let sealed_b = kb.seal_card(&ident(2), &cb);
    assert_eq!(sealed_b.len(), sealpost_proto::pair::SEALED_CARD);
    assert_eq!(ka.open_card(&sealed_b).expect("opens"), cb);
    assert_eq!(
        kb.open_card(&ka.seal_card(&ident(1), &ca)).expect("opens"),
        ca
    );
    // Knowing the code is not owning a card: Bob handing over Carol's card
    // as his own (with his key's signature) is refused.
    let cc = pair_card(3, "carol");
    assert_eq!(
        ka.open_card(&kb.seal_card(&ident(2), &cc)),
        Err(PairError::NotTheirCard)
    );
    // Each direction has its own key: a card cannot be reflected back.
    assert_eq!(kb.open_card(&sealed_b), Err(PairError::NotConfirmed));
    for i in [0, 100, sealed_b.len() - 1] {
        let mut bad = sealed_b.clone();
        bad[i] ^= 1;
        assert_eq!(ka.open_card(&bad), Err(PairError::NotConfirmed));
    }
    // A guess: another code, same slot.
    let guess = Code::words(12, 2, &mut OsRng);
    if guess != code {
        let (eg, _) = Exchange::start(Side::Accepter, &guess, OsRng);
        let kg = eg.finish(&x).expect("finishes");
        assert_eq!(
            ka.open_card(&kg.seal_card(&ident(2), &cb)),
            Err(PairError::NotConfirmed)
        );
    }
    // Malformed SPAKE2 messages are errors, not panics.
    let (ea, _) = Exchange::start(Side::Inviter, &code, OsRng);
    assert_eq!(
        ea.finish(&[0u8; 5]).expect_err("refused"),
        PairError::BadPakeMessage
    );
    let (ea, _) = Exchange::start(Side::Inviter, &code, OsRng);
    // A message from the wrong side ('A' to an inviter).
    assert_eq!(
        ea.finish(&x).expect_err("refused"),
        PairError::BadPakeMessage
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any text: a code or a clear error, never a panic; a code prints
    /// back to itself.
    #[test]
    fn prop_codes_parse_or_fail_cleanly(text in ".{0,300}") {
        use sealpost_proto::pair::{Code, Invitation};
        if let Ok(c) = Code::parse(&text) {
            prop_assert_eq!(Code::parse(&c.to_text()).expect("again"), c);
        }
        if let Ok(i) = Invitation::parse(&text) {
            prop_assert_eq!(Invitation::parse(&i.to_text()).expect("again"), i);
        }
    }

    #[test]
    fn prop_word_codes_round_trip(slot in 1u32..=999_999, words in proptest::collection::vec(any::<u8>(), 2..=8)) {
        use sealpost_proto::pair::{Code, Secret};
        let c = Code { slot, secret: Secret::Words(words) };
        prop_assert_eq!(Code::parse(&c.to_text()).expect("parses"), c);
    }

    /// A sealed card from anyone without the key: refused, never a panic.
    #[test]
    fn prop_sealed_cards_from_strangers_are_refused(
        other in proptest::collection::vec(any::<u8>(), 33),
        sealed in proptest::collection::vec(any::<u8>(), 0..700),
    ) {
        use rand_core::OsRng;
        use sealpost_proto::pair::{Code, Exchange, Side};
        let code = Code::words(3, 2, &mut OsRng);
        let (ea, _) = Exchange::start(Side::Inviter, &code, OsRng);
        if let Ok(k) = ea.finish(&other) {
            prop_assert!(k.open_card(&sealed).is_err());
        }
    }
}

/// What an age identity makes of a stanza, comparable across two.
fn unwrapped(id: &dyn age::Identity, st: &age_core::format::Stanza) -> String {
    use age_core::secrecy::ExposeSecret;
    match id.unwrap_stanza(st) {
        None => "not ours".into(),
        Some(Err(e)) => format!("error: {e:?}"),
        Some(Ok(k)) => format!("key {}", hex::encode(k.expose_secret())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// sealpost's age identity (the public key computed once, AWS-LC's
    /// X25519) answers every stanza exactly as age's own X25519 identity:
    /// its own stanzas, other recipients', and stanzas with a changed tag,
    /// argument or body, non-canonical base64, a low-order ephemeral key —
    /// whether sealpost's recipient (AWS-LC's X25519) or age's own wrapped
    /// the file key.
    #[test]
    fn prop_our_age_identity_is_ages(
        seed in any::<u64>(),
        how in 0u8..10,
        at in any::<usize>(),
        byte in any::<u8>(),
        ages_recipient in any::<bool>(),
    ) {
        use age::Recipient as _;
        use age_core::format::{FileKey, Stanza};
        let mut rng = StdRng::seed_from_u64(seed);
        let me = Identity::generate(&mut rng);
        let other = Identity::generate(&mut rng);
        let mut k = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rng, &mut k);
        let to = if how == 1 { &other } else { &me };
        let file_key = FileKey::new(Box::new(k));
        let (stanzas, labels) = if ages_recipient {
            to.public().age_reference_recipient().wrap_file_key(&file_key)
        } else {
            to.public().age_recipient().wrap_file_key(&file_key)
        }
        .expect("wraps");
        prop_assert!(labels.is_empty());
        prop_assert_eq!(stanzas.len(), 1);
        let mut st: Stanza = stanzas.into_iter().next().expect("a stanza");
        let arg = st.args[0].clone();
        match how {
            2 => { let n = st.body.len(); st.body[at % n] ^= byte | 1; }
            3 => st.body.truncate(at % st.body.len()),
            4 => st.tag = "x25519".into(),
            5 => st.args.push("extra".into()),
            6 => st.args[0] = format!("{arg}="),
            // The last character carries 2 trailing bits: set them.
            7 => {
                let mut a = arg.into_bytes();
                let last = a.len() - 1;
                let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                let v = alphabet.iter().position(|c| *c == a[last]).expect("b64") as u8;
                a[last] = alphabet[((v & !3) | (byte & 3).max(1)) as usize];
                st.args[0] = String::from_utf8(a).expect("ascii");
            }
            // A low-order ephemeral key (the point 0).
            8 => st.args[0] = data_encoding::BASE64_NOPAD.encode(&[0u8; 32]),
            9 => { let mut a = arg.into_bytes(); let n = a.len(); a[at % n] = b"AZaz09+/"[byte as usize % 8]; st.args[0] = String::from_utf8(a).expect("ascii"); }
            _ => {}
        }
        let ours = unwrapped(me.age_identity(), &st);
        let ages = unwrapped(&me.age_reference_identity(), &st);
        prop_assert_eq!(&ours, &ages);
        if how == 0 {
            prop_assert_eq!(ours, format!("key {}", hex::encode(k)));
        }
    }
}

/// A message sealed to two recipients with sealpost's age recipient
/// (AWS-LC's X25519) is an age file each recipient's own age identity
/// (age's, x25519-dalek's X25519) decrypts; a third identity cannot.
#[test]
fn ages_own_identity_opens_what_sealpost_sealed() {
    use std::io::Read;
    let mut rng = StdRng::seed_from_u64(11);
    let a = Identity::generate(&mut rng);
    let b = Identity::generate(&mut rng);
    let c = Identity::generate(&mut rng);
    let plain = vec![0x5au8; 70_000];
    let sealed = testing::seal_plaintext(&[*a.public(), *b.public()], &plain);
    let open = |who: &Identity| -> Option<Vec<u8>> {
        let d = age::Decryptor::new_buffered(&sealed[message::CONTAINER_HEADER_LEN..]).ok()?;
        let id = who.age_reference_identity();
        let mut r = d.decrypt(std::iter::once(&id as &dyn age::Identity)).ok()?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).ok()?;
        Some(out)
    };
    assert_eq!(open(&a).as_deref(), Some(&plain[..]));
    assert_eq!(open(&b).as_deref(), Some(&plain[..]));
    assert_eq!(open(&c), None);
}

proptest! {
    /// Ids for delivery sort by the millisecond they were made (so stores
    /// keyed by them append), carry that time in their first six bytes,
    /// and keep 80 bits that are not the time: two ids made in the same
    /// millisecond differ.
    #[test]
    fn time_ordered_ids_sort_by_time_and_stay_unguessable(
        a in 0u64..(1 << 48), b in 0u64..(1 << 48), seed in any::<u64>()
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = MessageId::time_ordered(a, &mut rng);
        let y = MessageId::time_ordered(b, &mut rng);
        let mut t = [0u8; 8];
        t[2..].copy_from_slice(&x.0[..6]);
        prop_assert_eq!(u64::from_be_bytes(t), a);
        if a < b {
            prop_assert!(x < y);
        }
        let z = MessageId::time_ordered(a, &mut rng);
        prop_assert_eq!(&x.0[..6], &z.0[..6]);
        prop_assert_ne!(&x.0[6..], &z.0[6..]);
    }
}
