//! Pairing (PROTOCOL §10) over arbitrary bytes: byte 0 even, the rest as a
//! code or invitation typed by a person; odd, the other side's SPAKE2
//! message (33 bytes) and a sealed card, as a relay in the middle may send
//! them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rand_chacha::rand_core::SeedableRng;
use sealpost_proto::pair::{Code, Exchange, Invitation, Secret, Side, PAKE_MESSAGE};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let text = String::from_utf8_lossy(rest);
        if let Ok(i) = Invitation::parse(&text) {
            // What parses, prints back to a text that parses to the same.
            assert_eq!(Invitation::parse(&i.to_text()).ok(), Some(i));
        }
        let _ = Code::parse(&text);
        return;
    }
    if rest.len() < PAKE_MESSAGE {
        return;
    }
    let code = Code {
        slot: 47,
        secret: Secret::Words(vec![0xd8, 0xe1]),
    };
    let side = if mode & 2 == 0 {
        Side::Inviter
    } else {
        Side::Accepter
    };
    let (ex, _) = Exchange::start(side, &code, rand_chacha::ChaCha20Rng::from_seed([mode; 32]));
    if let Ok(keys) = ex.finish(&rest[..PAKE_MESSAGE]) {
        let _ = keys.open_card(&rest[PAKE_MESSAGE..]);
    }
});
