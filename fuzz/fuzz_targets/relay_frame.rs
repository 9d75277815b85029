//! Relay protocol frames, as a relay reads requests and an agent reads
//! responses, fed through the frame splitter in arbitrary pieces.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealpost_proto::relay::{FrameBuffer, Request, Response};

fuzz_target!(|data: &[u8]| {
    let mut fb = FrameBuffer::new();
    for piece in data.chunks(7) {
        fb.extend(piece);
        loop {
            match fb.next_frame() {
                Ok(Some(body)) => {
                    let req = Request::decode(&body);
                    if let Ok(f) = &req {
                        // A request that parses re-encodes to the same bytes.
                        assert_eq!(&f.body.encode(f.id)[4..], &body[..]);
                    }
                    // Decoding a body it owns (what relays and agents do)
                    // agrees with decoding a borrowed one.
                    assert_eq!(Request::decode_owned(body.clone()), req);
                    let resp = Response::decode(&body);
                    // Read in two parts (head, then the data into a buffer
                    // of its own), as relays and agents read pieces.
                    if let Some(&ty) = body.first() {
                        if let Some(h) = Request::head_len(ty).filter(|&h| body.len() > h) {
                            assert_eq!(Request::decode_split(&body[..h], body[h..].to_vec()), req);
                        }
                        if let Some(h) = Response::head_len(ty).filter(|&h| body.len() > h) {
                            assert_eq!(
                                Response::decode_split(&body[..h], body[h..].to_vec()),
                                resp
                            );
                        }
                    }
                    assert_eq!(Response::decode_owned(body), resp);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
