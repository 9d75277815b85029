//! Everything behind the age layer: header, content and trailer parsing,
//! signature and recipient checks, reached without valid encryption.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::message::testing;
use sealpost_proto::Identity;

fuzz_target!(|data: &[u8]| {
    let me = Identity::from_secret_bytes(&[0x33; 32], &[0x44; 32]);
    let _ = testing::open_plaintext(&me, data);
});
