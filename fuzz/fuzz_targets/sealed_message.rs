//! A whole sealed container: container header, age header and stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::{message, Identity};

fuzz_target!(|data: &[u8]| {
    let me = Identity::from_secret_bytes(&[0x33; 32], &[0x44; 32]);
    let _ = message::open_slice(&me, data, 1 << 20);
});
