//! Repairing a file whose chunks were damaged at a relay: the recipient asks
//! the sender for exactly those chunks, the sender uploads them as a small
//! repair blob and says so.
//!
//! ```text
//! request = "SPRQ" 0x01 blob_id:[16] n:u16 chunk:u64 * n     (kind 5)
//! offer   = "SPRF" 0x01 blob_id:[16] repair_blob_id:[16] repair_len:u64
//!           repair_blake3:[32] n:u16 chunk:u64 * n           (kind 6)
//! ```
//!
//! Both travel as the content of sealed messages (so they are signed by
//! their sender and bound to their recipient). Chunk indexes are strictly
//! increasing, 1 to 4,096 of them. The repair blob is the sealed chunks
//! (§5.2, same key, same index, same last-chunk flag as in the original
//! blob) concatenated in that order.

use crate::codec::{DecodeError, Reader};
use crate::manifest::BlobId;

const REQUEST_MAGIC: &[u8; 4] = b"SPRQ";
const OFFER_MAGIC: &[u8; 4] = b"SPRF";
const VERSION: u8 = 1;
/// Most chunks one request or offer names.
pub const MAX_CHUNKS: usize = 4096;
/// Largest encoding of either.
pub const MAX_BYTES: usize = 4 + 1 + 16 + 16 + 8 + 32 + 2 + 8 * MAX_CHUNKS;

/// "Send me these chunks of that blob again."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairRequest {
    pub blob_id: BlobId,
    pub chunks: Vec<u64>,
}

/// "They are in this repair blob, in this order."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairOffer {
    pub blob_id: BlobId,
    pub repair_blob_id: BlobId,
    pub repair_len: u64,
    pub repair_hash: [u8; 32],
    pub chunks: Vec<u64>,
}

fn check_chunks(chunks: &[u64]) -> Result<(), DecodeError> {
    if chunks.is_empty() || chunks.len() > MAX_CHUNKS {
        return Err(DecodeError::Invalid {
            what: "chunk list",
            why: "must name 1 to 4096 chunks",
        });
    }
    if chunks.windows(2).any(|w| w[0] >= w[1]) {
        return Err(DecodeError::Invalid {
            what: "chunk list",
            why: "must be strictly increasing",
        });
    }
    Ok(())
}

fn put_chunks(out: &mut Vec<u8>, chunks: &[u64]) {
    out.extend_from_slice(&(chunks.len() as u16).to_be_bytes());
    for c in chunks {
        out.extend_from_slice(&c.to_be_bytes());
    }
}

fn read_chunks(r: &mut Reader<'_>) -> Result<Vec<u64>, DecodeError> {
    let n = r.u16("chunk count")? as usize;
    let mut chunks = Vec::with_capacity(n.min(r.remaining() / 8));
    for _ in 0..n {
        chunks.push(r.u64("chunk index")?);
    }
    check_chunks(&chunks)?;
    Ok(chunks)
}

impl RepairRequest {
    pub fn new(blob_id: BlobId, chunks: Vec<u64>) -> Result<Self, DecodeError> {
        check_chunks(&chunks)?;
        Ok(Self { blob_id, chunks })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(23 + 8 * self.chunks.len());
        out.extend_from_slice(REQUEST_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.blob_id.0);
        put_chunks(&mut out, &self.chunks);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_BYTES {
            return Err(DecodeError::TooLarge {
                what: "repair request",
                max: MAX_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        r.magic_and_version(REQUEST_MAGIC, "repair request", VERSION)?;
        let blob_id = BlobId(r.array("blob id")?);
        let chunks = read_chunks(&mut r)?;
        r.finish()?;
        Ok(Self { blob_id, chunks })
    }
}

impl RepairOffer {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(79 + 8 * self.chunks.len());
        out.extend_from_slice(OFFER_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.blob_id.0);
        out.extend_from_slice(&self.repair_blob_id.0);
        out.extend_from_slice(&self.repair_len.to_be_bytes());
        out.extend_from_slice(&self.repair_hash);
        put_chunks(&mut out, &self.chunks);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_BYTES {
            return Err(DecodeError::TooLarge {
                what: "repair offer",
                max: MAX_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        r.magic_and_version(OFFER_MAGIC, "repair offer", VERSION)?;
        let blob_id = BlobId(r.array("blob id")?);
        let repair_blob_id = BlobId(r.array("repair blob id")?);
        let repair_len = r.u64("repair blob length")?;
        let repair_hash = r.array("repair blob hash")?;
        let chunks = read_chunks(&mut r)?;
        r.finish()?;
        Ok(Self {
            blob_id,
            repair_blob_id,
            repair_len,
            repair_hash,
            chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds_and_order() {
        assert!(RepairRequest::new(BlobId([1; 16]), vec![]).is_err());
        assert!(RepairRequest::new(BlobId([1; 16]), vec![3, 3]).is_err());
        assert!(RepairRequest::new(BlobId([1; 16]), vec![4, 3]).is_err());
        assert!(RepairRequest::new(BlobId([1; 16]), (0..4097).collect()).is_err());
        let big = RepairRequest::new(BlobId([1; 16]), (0..4096).collect()).expect("max");
        assert!(big.encode().len() <= MAX_BYTES);
    }

    proptest! {
        #[test]
        fn round_trip_and_every_truncation_fails(
            set in proptest::collection::btree_set(any::<u64>(), 1..50),
            id in any::<[u8; 16]>(), rid in any::<[u8; 16]>(), len in any::<u64>(), h in any::<[u8; 32]>(),
        ) {
            let chunks: Vec<u64> = set.into_iter().collect();
            let q = RepairRequest::new(BlobId(id), chunks.clone()).expect("valid");
            let qb = q.encode();
            prop_assert_eq!(RepairRequest::decode(&qb).expect("decodes"), q);
            let o = RepairOffer { blob_id: BlobId(id), repair_blob_id: BlobId(rid), repair_len: len, repair_hash: h, chunks };
            let ob = o.encode();
            prop_assert_eq!(RepairOffer::decode(&ob).expect("decodes"), o);
            for cut in 0..qb.len() { prop_assert!(RepairRequest::decode(&qb[..cut]).is_err()); }
            for cut in 0..ob.len() { prop_assert!(RepairOffer::decode(&ob[..cut]).is_err()); }
            prop_assert!(RepairRequest::decode(&ob).is_err());
        }
    }
}
