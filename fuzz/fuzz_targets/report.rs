//! Receipts and rejections: parsed from bytes a recipient (or anyone
//! handing over an exported receipt) chose, in binary and text form.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::report::Report;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Report::decode(data) {
        assert_eq!(r.as_bytes(), data);
        assert_eq!(Report::from_text(&r.to_text()).ok().as_ref(), Some(&r));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(r) = Report::from_text(text) {
            assert!(!r.entries().is_empty());
        }
    }
});
