//! Forward notices: items a sender's relay puts in its mailbox (PROTOCOL
//! 6.9), parsed by the sender's agent from bytes a relay chose.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::notice::Notice;

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = Notice::decode(data) {
        assert_eq!(n.encode(), data);
    }
});
