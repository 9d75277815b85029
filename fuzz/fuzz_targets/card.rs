//! Contact cards arrive from anyone: binary and text forms.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::ContactCard;

fuzz_target!(|data: &[u8]| {
    if let Ok(card) = ContactCard::decode(data) {
        // Whatever parses must re-encode to the same bytes.
        assert_eq!(card.as_bytes(), data);
        assert_eq!(ContactCard::from_text(&card.to_text()).ok(), Some(card));
    }
    let _ = ContactCard::from_text(&String::from_utf8_lossy(data));
});
