//! File manifests: what the recipient needs to fetch, decrypt and verify a
//! file blob. A manifest travels as the content of a sealed message of kind
//! [`Kind::FileManifest`](crate::message::Kind), so it is encrypted, signed
//! and bound to its recipients like any message.
//!
//! ```text
//! manifest = "SPMF" 0x02 blob_id:[16] blob_key:[32] chunk_size:u32 size:u64
//!            plaintext_blake3:[32] name_len:u16 name
//!            group_id:[16] index:u32 count:u32       (version 3 only: a
//!                                                     file of a directory)
//! manifest = "SPMF" 0x04 blob_id:[16] blob_key:[32] chunk_size:u32 size:u64
//!            padded_len:u64 plaintext_blake3:[32] name_len:u16 name
//!            group_flag:u8 [group_id:[16] index:u32 count:u32 if 1]
//!                                                    (a padded file)
//! ```

use std::fmt;

use rand_core::CryptoRngCore;

use crate::blob::{BlobKey, BlobLayout};
use crate::codec::{self, DecodeError, Reader};

const MAGIC: &[u8; 4] = b"SPMF";
/// 2: the blob's chunks are AES-256-GCM and the blob's hash is not in the
/// manifest (the sender learns it while uploading and states it with the
/// last piece). Version 1 (ChaCha20-Poly1305, with the blob's hash) is
/// refused: its key would not open the chunks.
const VERSION: u8 = 2;
/// 3: version 2's layout followed by a [`Group`] (a file of a directory
/// sent at once). A manifest without a group is written as version 2.
const VERSION_GROUPED: u8 = 3;
/// 4: a padded file (`send --pad`): version 2's fields with the padded
/// length after the size, then a group flag and the group if there is
/// one. An unpadded file is written as version 2 or 3, byte for byte as
/// before.
const VERSION_PADDED: u8 = 4;
/// A path component is at most 255 bytes, the limit of common file
/// systems.
pub const MAX_NAME_BYTES: usize = 255;
/// A file's name is a relative path of at most this many bytes…
pub const MAX_PATH_BYTES: usize = 1024;
/// …and this many components (a file sent as part of a directory keeps its
/// place in the tree).
pub const MAX_PATH_DEPTH: usize = 32;
/// The group trailer: id, index, count.
pub const GROUP_BYTES: usize = 16 + 4 + 4;
/// The most files one group (one directory sent at once) may have.
pub const MAX_GROUP_FILES: u32 = 100_000;
pub const MAX_MANIFEST_BYTES: usize =
    5 + 16 + 32 + 4 + 8 + 8 + 32 + 2 + MAX_PATH_BYTES + 1 + GROUP_BYTES;

/// The files of one directory sent at once: each manifest names the group
/// (random id, drawn once per send), its place in it and how many there
/// are, so that sender and recipient can show and handle them as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Group {
    pub id: [u8; 16],
    /// 0-based, below `count`.
    pub index: u32,
    /// 1..=[`MAX_GROUP_FILES`].
    pub count: u32,
}

impl Group {
    pub fn new(id: [u8; 16], index: u32, count: u32) -> Result<Self, DecodeError> {
        if count == 0 || count > MAX_GROUP_FILES {
            return Err(DecodeError::Invalid {
                what: "file group",
                why: "must have 1 to 100000 files",
            });
        }
        if index >= count {
            return Err(DecodeError::Invalid {
                what: "file group",
                why: "index must be below the count",
            });
        }
        Ok(Self { id, index, count })
    }
}

/// Identifies a blob at a relay; random, so it reveals nothing about the file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlobId(pub [u8; 16]);

impl BlobId {
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        Self(b)
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileManifest {
    pub blob_id: BlobId,
    pub key: BlobKey,
    pub layout: BlobLayout,
    /// BLAKE3 of the file's bytes: what the recipient checks after writing
    /// and reading back, and what its receipt will carry.
    pub plaintext_hash: blake3::Hash,
    pub name: String,
    /// Set for a file sent as part of a directory.
    pub group: Option<Group>,
}

/// A file name must be one safe path component: a sender must not be able
/// to make the recipient write outside its download directory.
pub fn validate_file_name(name: &str) -> Result<(), DecodeError> {
    let bad = |why| DecodeError::Invalid {
        what: "file name",
        why,
    };
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(bad("must be 1 to 255 bytes"));
    }
    if name == "." || name == ".." {
        return Err(bad("must not be . or .."));
    }
    if name.contains(['/', '\\', '\0']) {
        return Err(bad("must not contain path separators"));
    }
    codec::check_printable(name, "file name")
}

/// A file's name in a manifest: one component, or a relative path of
/// components joined by `/` (a file from a directory). Every component must
/// pass [`validate_file_name`], so the path can never leave the directory
/// it is placed in: no empty, `.` or `..` component, no leading `/`.
pub fn validate_file_path(path: &str) -> Result<(), DecodeError> {
    if path.is_empty() || path.len() > MAX_PATH_BYTES {
        return Err(DecodeError::Invalid {
            what: "file path",
            why: "must be 1 to 1024 bytes",
        });
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > MAX_PATH_DEPTH {
        return Err(DecodeError::Invalid {
            what: "file path",
            why: "must have at most 32 components",
        });
    }
    parts.into_iter().try_for_each(validate_file_name)
}

impl FileManifest {
    pub fn new(
        blob_id: BlobId,
        key: BlobKey,
        layout: BlobLayout,
        plaintext_hash: blake3::Hash,
        name: String,
    ) -> Result<Self, DecodeError> {
        validate_file_path(&name)?;
        Ok(Self {
            blob_id,
            key,
            layout,
            plaintext_hash,
            name,
            group: None,
        })
    }

    /// This manifest as file `group.index` of `group`.
    pub fn in_group(mut self, group: Group) -> Self {
        self.group = Some(group);
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let padded = self.layout.pad_len() > 0;
        let mut out = Vec::with_capacity(MAX_MANIFEST_BYTES);
        out.extend_from_slice(MAGIC);
        out.push(match (padded, self.group.is_some()) {
            (true, _) => VERSION_PADDED,
            (false, true) => VERSION_GROUPED,
            (false, false) => VERSION,
        });
        out.extend_from_slice(&self.blob_id.0);
        out.extend_from_slice(&self.key.0);
        out.extend_from_slice(&self.layout.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.layout.data_len.to_be_bytes());
        if padded {
            out.extend_from_slice(&self.layout.plaintext_len.to_be_bytes());
        }
        out.extend_from_slice(self.plaintext_hash.as_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        if padded {
            out.push(self.group.is_some() as u8);
        }
        if let Some(g) = &self.group {
            out.extend_from_slice(&g.id);
            out.extend_from_slice(&g.index.to_be_bytes());
            out.extend_from_slice(&g.count.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(DecodeError::TooLarge {
                what: "file manifest",
                max: MAX_MANIFEST_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.magic_and_versions(
            MAGIC,
            "file manifest",
            &[VERSION, VERSION_GROUPED, VERSION_PADDED],
        )?;
        let blob_id = BlobId(r.array("blob id")?);
        let key = BlobKey(r.array("blob key")?);
        let chunk_size = r.u32("chunk size")?;
        let size = r.u64("file size")?;
        let layout = if version == VERSION_PADDED {
            let padded_len = r.u64("padded length")?;
            if padded_len == size {
                // Version 4 is for padded files only, so that one file
                // has one encoding.
                return Err(DecodeError::Invalid {
                    what: "padded length",
                    why: "equals the size (an unpadded file is version 2 or 3)",
                });
            }
            BlobLayout::padded(size, padded_len, chunk_size)?
        } else {
            BlobLayout::new(size, chunk_size)?
        };
        let plaintext_hash = blake3::Hash::from_bytes(r.array("file hash")?);
        let name_len = r.u16("name length")? as usize;
        let name = codec::read_text_of_len(&mut r, name_len, "file name", MAX_PATH_BYTES)?;
        validate_file_path(&name)?;
        // Version 3 ends with a group; version 4 says whether one follows.
        let grouped = match version {
            VERSION => false,
            VERSION_GROUPED => true,
            _ => match r.u8("group flag")? {
                0 => false,
                1 => true,
                _ => {
                    return Err(DecodeError::Invalid {
                        what: "group flag",
                        why: "must be 0 or 1",
                    })
                }
            },
        };
        let group = if grouped {
            let id = r.array("group id")?;
            let index = r.u32("group index")?;
            let count = r.u32("group count")?;
            Some(Group::new(id, index, count)?)
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            blob_id,
            key,
            layout,
            plaintext_hash,
            name,
            group,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group trailer round-trips; anything but nothing or exactly one
    /// valid group after the name is refused.
    #[test]
    fn a_group_travels_in_the_manifest_and_is_checked() {
        let m = FileManifest::new(
            BlobId([1; 16]),
            BlobKey([2; 32]),
            BlobLayout::new(10, crate::blob::DEFAULT_CHUNK_SIZE).expect("layout"),
            blake3::hash(b"x"),
            "photos/a.jpg".into(),
        )
        .expect("manifest");
        let plain = m.encode();
        assert_eq!(FileManifest::decode(&plain).expect("plain").group, None);
        let g = Group::new([7; 16], 2, 3).expect("group");
        let grouped = m.clone().in_group(g).encode();
        assert_eq!(grouped.len(), plain.len() + GROUP_BYTES);
        assert!(grouped.len() <= MAX_MANIFEST_BYTES);
        assert_eq!(
            FileManifest::decode(&grouped).expect("grouped").group,
            Some(g)
        );
        assert_eq!((plain[4], grouped[4]), (2, 3), "versions");
        for cut in 1..=GROUP_BYTES {
            assert!(
                FileManifest::decode(&grouped[..grouped.len() - cut]).is_err(),
                "{cut}"
            );
        }
        let mut longer = grouped.clone();
        longer.push(0);
        assert!(FileManifest::decode(&longer).is_err());
        let mut plain_longer = plain.clone();
        plain_longer.extend_from_slice(&grouped[plain.len()..]);
        assert!(
            FileManifest::decode(&plain_longer).is_err(),
            "version 2 has no group"
        );
        for (index, count) in [(3, 3), (0, 0), (0, MAX_GROUP_FILES + 1), (u32::MAX, 1)] {
            let mut bad = plain.clone();
            bad[4] = 3;
            bad.extend_from_slice(&[7; 16]);
            bad.extend_from_slice(&index.to_be_bytes());
            bad.extend_from_slice(&count.to_be_bytes());
            assert!(FileManifest::decode(&bad).is_err(), "{index} of {count}");
        }
        let mut fine = plain.clone();
        fine[4] = 3;
        fine.extend_from_slice(&grouped[plain.len()..]);
        assert_eq!(
            FileManifest::decode(&fine).expect("version 3").group,
            Some(g)
        );
    }

    /// A padded file's manifest is version 4, with or without a group;
    /// an unpadded one stays version 2 or 3; a version 4 that does not pad,
    /// pads to less than the file, or has a bad group flag is refused.
    #[test]
    fn a_padded_file_is_version_4() {
        let cs = crate::blob::DEFAULT_CHUNK_SIZE;
        let m = FileManifest::new(
            BlobId([1; 16]),
            BlobKey([2; 32]),
            BlobLayout::padme(1000, cs).expect("layout"),
            blake3::hash(b"x"),
            "a.bin".into(),
        )
        .expect("manifest");
        assert_eq!((m.layout.data_len, m.layout.plaintext_len), (1000, 1024));
        let g = Group::new([7; 16], 0, 2).expect("group");
        for m in [m.clone(), m.clone().in_group(g)] {
            let bytes = m.encode();
            assert_eq!(bytes[4], 4);
            assert!(bytes.len() <= MAX_MANIFEST_BYTES);
            assert_eq!(FileManifest::decode(&bytes).expect("decodes"), m);
            for cut in 1..bytes.len() {
                assert!(FileManifest::decode(&bytes[..cut]).is_err(), "{cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(FileManifest::decode(&longer).is_err());
        }
        let bytes = m.encode();
        let flag = bytes.len() - 1;
        let mut bad = bytes.clone();
        bad[flag] = 2;
        assert!(FileManifest::decode(&bad).is_err(), "group flag 2");
        // padded_len (bytes 65..73): equal to the size, or below it.
        for padded in [1000u64, 999, 0] {
            let mut bad = bytes.clone();
            bad[65..73].copy_from_slice(&padded.to_be_bytes());
            assert!(FileManifest::decode(&bad).is_err(), "padded to {padded}");
        }
        // Padmé leaves small sizes as they are: such a file is version 2.
        let small = FileManifest::new(
            BlobId([1; 16]),
            BlobKey([2; 32]),
            BlobLayout::padme(7, cs).expect("layout"),
            blake3::hash(b"x"),
            "a.bin".into(),
        )
        .expect("manifest");
        assert_eq!(small.encode()[4], 2);
    }

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a\\b", "a\0b", "a\nb"] {
            assert!(validate_file_name(bad).is_err(), "{bad:?}");
        }
        for good in ["report.pdf", "..hidden", "über ñ.txt", "a b"] {
            assert!(validate_file_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "a/../b",
            "../a",
            "a/.",
            "a/",
            "a\\b/c",
        ] {
            assert!(validate_file_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_file_path(&["d"; 33].join("/")).is_err());
        for good in ["photos/2026/a.jpg", "a", "..x/y"] {
            assert!(validate_file_path(good).is_ok(), "{good:?}");
        }
    }
}
