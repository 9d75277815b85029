//! Blob decryption over arbitrary bytes: the first 9 bytes pick the layout
//! (size; chunk-size exponent in the low 2 bits of byte 8, bit 2 padded to
//! its Padmé length), the rest is the blob.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::blob::{self, BlobKey, BlobLayout};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let size = u64::from_be_bytes(data[..8].try_into().unwrap_or([0; 8])) % (1 << 20);
    let chunk = 1u32 << (12 + data[8] % 4);
    let layout = if data[8] & 4 != 0 {
        BlobLayout::padme(size, chunk)
    } else {
        BlobLayout::new(size, chunk)
    };
    let Ok(layout) = layout else {
        return;
    };
    let key = BlobKey([0x77; 32]);
    let _ = blob::open_blob(
        &key,
        &layout,
        &blake3::Hash::from_bytes([0; 32]),
        &data[9..],
        std::io::sink(),
    );
});
