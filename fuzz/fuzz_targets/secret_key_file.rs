//! Secret key files are local, but a damaged one must fail cleanly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::Identity;

fuzz_target!(|data: &[u8]| {
    let _ = Identity::from_secret_file(data);
});
