//! Repair requests and offers: parsed from message content a contact chose.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::repair::{RepairOffer, RepairRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = RepairRequest::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Ok(o) = RepairOffer::decode(data) {
        assert_eq!(o.encode(), data);
    }
});
