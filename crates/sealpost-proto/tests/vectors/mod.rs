//! Checks the committed test vectors in `testvectors/` (see
//! `testvectors/README.md`). Run with `SEALPOST_WRITE_VECTORS=1` to write
//! them afresh; a format change must then show up as a diff in review.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::*;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testvectors")
}

fn h(b: &[u8]) -> String {
    hex::encode(b)
}

fn unh(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("valid hex")
}

fn alice() -> Identity {
    Identity::from_secret_bytes(&[0x11; 32], &[0x22; 32])
}
fn bob() -> Identity {
    Identity::from_secret_bytes(&[0x33; 32], &[0x44; 32])
}
fn carol() -> Identity {
    Identity::from_secret_bytes(&[0x55; 32], &[0x66; 32])
}

fn identity_json(name: &str, id: &Identity, seed: u8, agr: u8) -> Value {
    json!({
        "name": name,
        "signing_seed": h(&[seed; 32]),
        "agreement_secret": h(&[agr; 32]),
        "signing_public": h(id.public().signing_bytes()),
        "agreement_public": h(id.public().agreement_bytes()),
        "age_recipient": id.public().age_recipient_string(),
        "fingerprint": id.fingerprint().to_string(),
        "secret_file": id.to_secret_file().as_str(),
    })
}

fn vector_header() -> MessageHeader {
    MessageHeader {
        kind: Kind::Message,
        id: MessageId(*b"sealpost-vector1"),
        created_at: 1_750_000_000,
        expires_at: 1_750_604_800,
        in_reply_to: Some(MessageId([0xee; 16])),
        sender: *alice().public(),
        recipients: vec![bob().public().into()],
    }
}

const CONTENT: &[u8] = b"Hello Bob. This message is sealed end to end.\n";

/// Everything that is deterministic, computed from the code.
fn deterministic() -> Value {
    let (a, b, c) = (alice(), bob(), carol());
    let card = ContactCard::create(
        &a,
        CardFields {
            name: "Alice".into(),
            created_at: 1_750_000_000,
            relay: Some(RelayPin {
                address: "127.0.0.1:7443".into(),
                key_hash: [0xab; 32],
            }),
        },
    )
    .expect("card");
    let card_no_relay = ContactCard::create(
        &b,
        CardFields {
            name: "Bob".into(),
            created_at: 1_750_000_001,
            relay: None,
        },
    )
    .expect("card");
    let header = vector_header();
    let plaintext = testing::signed_plaintext(&a, &header, CONTENT);

    let key = BlobKey([0x77; 32]);
    let file: Vec<u8> = (0..10_000u32).map(|i| (i % 256) as u8).collect();
    let mut blob_bytes = Vec::new();
    let s = blob::seal_blob(&key, 4096, &file[..], &mut blob_bytes).expect("blob");
    let manifest =
        FileManifest::new(BlobId([0x88; 16]), key, &s, "numbers.bin".into()).expect("manifest");
    json!({
        "identities": [identity_json("alice", &a, 0x11, 0x22), identity_json("bob", &b, 0x33, 0x44), identity_json("carol", &c, 0x55, 0x66)],
        "cards": [
            {"description": "Alice, with a home relay", "text": card.to_text(), "bytes": h(card.as_bytes()),
             "name": "Alice", "created_at": 1_750_000_000u64, "relay_address": "127.0.0.1:7443", "relay_key_hash": h(&[0xab; 32])},
            {"description": "Bob, no relay", "text": card_no_relay.to_text(), "bytes": h(card_no_relay.as_bytes()),
             "name": "Bob", "created_at": 1_750_000_001u64},
        ],
        "message_plaintext": {
            "description": "The plaintext inside the age layer of a message from alice to bob: header || content || trailer",
            "kind": 1, "id": h(&header.id.0), "created_at": header.created_at, "expires_at": header.expires_at,
            "in_reply_to": h(&[0xee; 16]),
            "header": h(&header.encode()),
            "content": h(CONTENT),
            "content_blake3": blake3::hash(CONTENT).to_hex().to_string(),
            "plaintext": h(&plaintext),
        },
        "blob": {
            "description": "numbers.bin: bytes i mod 256 for i in 0..10000, chunk size 4096, blob key 0x77*32",
            "key": h(&[0x77; 32]), "chunk_size": 4096, "plaintext": h(&file), "blob": h(&blob_bytes),
            "plaintext_blake3": s.plaintext_hash.to_hex().to_string(),
            "blob_blake3": s.blob_hash.to_hex().to_string(),
            "manifest": h(&manifest.encode()),
        },
    })
}

/// Sealed containers (random age layer, so written once and then only read).
fn sealed_cases() -> Value {
    let (a, b, c) = (alice(), bob(), carol());
    let plaintext = testing::signed_plaintext(&a, &vector_header(), CONTENT);
    let good = testing::seal_plaintext(&[*b.public()], &plaintext);
    let payload = testing::age_payload_start(&good).expect("layout");
    let mut tampered = good.clone();
    tampered[payload + 3] ^= 0x40;
    let mut bad_sig = plaintext.clone();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 0x01;
    let forwarded_plain = plaintext.clone();
    json!([
        {"description": "valid: alice to bob", "recipient": "bob", "sealed": h(&good), "expect": "ok"},
        {"description": "opened by carol: not encrypted to her key", "recipient": "carol", "sealed": h(&good), "expect": "not-for-me"},
        {"description": "one payload bit flipped", "recipient": "bob", "sealed": h(&tampered), "expect": "tampered-chunk-0"},
        {"description": "cut short by 20 bytes", "recipient": "bob", "sealed": h(&good[..good.len() - 20]), "expect": "truncated"},
        {"description": "last signature byte flipped, re-encrypted", "recipient": "bob", "sealed": h(&testing::seal_plaintext(&[*b.public()], &bad_sig)), "expect": "bad-signature"},
        {"description": "bob re-encrypted the plaintext to carol", "recipient": "carol", "sealed": h(&testing::seal_plaintext(&[*c.public()], &forwarded_plain)), "expect": "forwarded"},
    ])
}

fn who(name: &str) -> Identity {
    match name {
        "alice" => alice(),
        "bob" => bob(),
        "carol" => carol(),
        _ => panic!("unknown identity {name}"),
    }
}

fn classify(r: &Result<(OpenedMessage, Vec<u8>), OpenError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(OpenError::NotForMe(NotForMeReason::NoMatchingKey)) => "not-for-me".into(),
        Err(OpenError::NotForMe(NotForMeReason::NotInSignedRecipients)) => "forwarded".into(),
        Err(OpenError::Tampered {
            at: TamperedAt::Chunk(i),
        }) => format!("tampered-chunk-{i}"),
        Err(OpenError::Truncated { .. }) => "truncated".into(),
        Err(OpenError::BadSignature) => "bad-signature".into(),
        Err(e) => format!("other: {e}"),
    }
}

#[test]
fn test_vectors_match() {
    let det_path = dir().join("vectors.json");
    let sealed_path = dir().join("sealed.json");
    if std::env::var_os("SEALPOST_WRITE_VECTORS").is_some() {
        std::fs::create_dir_all(dir()).expect("mkdir");
        let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("json") + "\n";
        std::fs::write(&det_path, pretty(&deterministic())).expect("write");
        std::fs::write(&sealed_path, pretty(&sealed_cases())).expect("write");
    }
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(&det_path).expect("testvectors/vectors.json"),
    )
    .expect("json");
    assert_eq!(
        committed,
        deterministic(),
        "the code no longer produces testvectors/vectors.json"
    );

    // Cards parse from their text and bytes and carry the stated fields.
    for c in committed["cards"].as_array().expect("cards") {
        let card = ContactCard::from_text(c["text"].as_str().expect("text")).expect("card parses");
        assert_eq!(card.as_bytes(), unh(&c["bytes"]));
        assert_eq!(card.name(), c["name"].as_str().expect("name"));
    }
    // Identities: secret files parse to the stated public keys.
    for i in committed["identities"].as_array().expect("ids") {
        let id = Identity::from_secret_file(i["secret_file"].as_str().expect("s").as_bytes())
            .expect("parses");
        assert_eq!(
            id.public().signing_bytes().to_vec(),
            unh(&i["signing_public"])
        );
        assert_eq!(
            id.fingerprint().to_string(),
            i["fingerprint"].as_str().expect("fp")
        );
    }
    // The blob opens with the stated key to the stated plaintext.
    let b = &committed["blob"];
    let m = FileManifest::decode(&unh(&b["manifest"])).expect("manifest");
    let mut out = Vec::new();
    blob::open_blob(
        &m.key,
        &m.layout,
        &m.plaintext_hash,
        &unh(&b["blob"])[..],
        &mut out,
    )
    .expect("blob");
    assert_eq!(out, unh(&b["plaintext"]));

    // Sealed cases open (or fail) as stated.
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(&sealed_path).expect("testvectors/sealed.json"),
    )
    .expect("json");
    let expected_plain = unh(&committed["message_plaintext"]["plaintext"]);
    for case in cases.as_array().expect("cases") {
        let me = who(case["recipient"].as_str().expect("recipient"));
        let sealed = unh(&case["sealed"]);
        let r = message::open_slice(&me, &sealed, 1 << 20);
        assert_eq!(
            classify(&r),
            case["expect"].as_str().expect("expect"),
            "{}",
            case["description"]
        );
        if let Ok((m, content)) = r {
            assert_eq!(content, CONTENT);
            assert_eq!(m.header, vector_header());
            assert_eq!(
                testing::decrypt_plaintext(&me, &sealed).expect("age"),
                expected_plain
            );
        }
    }
}
