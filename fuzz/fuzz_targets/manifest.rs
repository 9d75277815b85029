//! File manifests (inside signed messages, but parsed from sender bytes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::manifest::FileManifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = FileManifest::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
