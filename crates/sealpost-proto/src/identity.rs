//! Identities: an Ed25519 signing key and an X25519 key-agreement key.
//!
//! The X25519 half is an age identity/recipient, so the encryption layer is
//! plain age v1 and interoperates with other age implementations. The
//! Ed25519 half signs everything an identity says: its card, its messages,
//! later its receipts. The fingerprint people compare is a hash of the
//! signing key alone, because the signing key is what vouches for the rest.

use std::collections::HashSet;
use std::fmt;

use bech32::{Bech32, Hrp};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRngCore, RngCore};
use zeroize::{Zeroize, Zeroizing};

use aws_lc_rs::agreement as ecdh;

use crate::codec::DecodeError;

/// Length of the fingerprint in bytes (160 bits, shown as 32 base32 characters).
pub const FINGERPRINT_LEN: usize = 20;

/// The hash people compare to know they hold the right key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; FINGERPRINT_LEN]);

impl Fingerprint {
    /// BLAKE3 in key-derivation mode keeps this hash apart from every other
    /// BLAKE3 use in sealpost.
    /// The fingerprint of a signing key given as its 32 bytes (None if
    /// they are not a valid Ed25519 public key).
    pub fn of_bytes(signing_key: &[u8; 32]) -> Option<Self> {
        VerifyingKey::from_bytes(signing_key)
            .ok()
            .map(|k| Self::of(&k))
    }

    pub fn of(signing_key: &VerifyingKey) -> Self {
        let full = blake3::derive_key("sealpost v1 fingerprint", signing_key.as_bytes());
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(&full[..FINGERPRINT_LEN]);
        Self(out)
    }

    /// The 32 base32 characters without spaces.
    pub fn compact(&self) -> String {
        data_encoding::BASE32_NOPAD.encode(&self.0)
    }
}

/// Shown as eight groups of four base32 characters: `ABCD EFGH …`.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.compact();
        for (i, group) in s.as_bytes().chunks(4).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            // base32 output is ASCII, so every group is valid UTF-8.
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The public half of an identity: what a contact card carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicIdentity {
    signing: VerifyingKey,
    agreement: [u8; 32],
}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({})", self.fingerprint())
    }
}

impl PublicIdentity {
    /// Checks the signing key: a valid, non-weak Ed25519 point. Cheap
    /// enough for every message header; [`PublicIdentity::check_agreement_key`]
    /// is the costlier check made once, when a card is imported.
    pub fn from_bytes(signing: &[u8; 32], agreement: &[u8; 32]) -> Result<Self, DecodeError> {
        let signing = VerifyingKey::from_bytes(signing).map_err(|_| DecodeError::Invalid {
            what: "signing key",
            why: "not a valid Ed25519 public key",
        })?;
        if signing.is_weak() {
            return Err(DecodeError::Invalid {
                what: "signing key",
                why: "a weak (small-order) Ed25519 key",
            });
        }
        Ok(Self {
            signing,
            agreement: *agreement,
        })
    }

    /// Refuses a low-order X25519 agreement key, with which no secret
    /// could be agreed. age refuses such keys when encrypting too; checking
    /// at card import finds the problem before anyone writes.
    pub fn check_agreement_key(&self) -> Result<(), DecodeError> {
        if is_low_order_x25519(&self.agreement) {
            return Err(DecodeError::Invalid {
                what: "agreement key",
                why: "a low-order X25519 point",
            });
        }
        Ok(())
    }

    pub fn signing_key(&self) -> &VerifyingKey {
        &self.signing
    }

    pub fn signing_bytes(&self) -> &[u8; 32] {
        self.signing.as_bytes()
    }

    pub fn agreement_bytes(&self) -> &[u8; 32] {
        &self.agreement
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.signing)
    }

    /// The age recipient (`age1…`) for the agreement key.
    pub fn age_recipient_string(&self) -> String {
        bech32_string("age", &self.agreement)
    }

    /// The age recipient for the agreement key: age's X25519 stanza,
    /// wrapped with AWS-LC's X25519 ([`AgeRecipient`]).
    pub fn age_recipient(&self) -> AgeRecipient {
        AgeRecipient {
            public: self.agreement,
        }
    }

    /// age's own recipient for this key (what `age -r` uses), for
    /// comparing with [`PublicIdentity::age_recipient`].
    pub fn age_reference_recipient(&self) -> age::x25519::Recipient {
        // The string is built from 32 valid bytes, which age always parses.
        self.age_recipient_string()
            .parse()
            .unwrap_or_else(|e| unreachable!("age rejected a recipient we encoded: {e}"))
    }

    /// Verifies an Ed25519 signature with the strict rules (no malleable or
    /// small-order signatures), over `context || message`.
    pub fn verify(&self, context: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
        let mut signed = Vec::with_capacity(context.len() + message.len());
        signed.extend_from_slice(context);
        signed.extend_from_slice(message);
        self.signing
            .verify_strict(&signed, &Signature::from_bytes(signature))
            .is_ok()
    }
}

fn bech32_string(hrp: &str, data: &[u8]) -> String {
    let hrp = Hrp::parse(hrp).unwrap_or_else(|e| unreachable!("constant HRP rejected: {e}"));
    bech32::encode::<Bech32>(hrp, data)
        .unwrap_or_else(|e| unreachable!("32 bytes always fit bech32: {e}"))
}

/// The low-order points of Curve25519 in Montgomery form: an agreement
/// with any of them yields the all-zero secret, which [`x25519`] refuses
/// (as age does). A card carrying one is refused at import so the failure
/// is found before anyone writes.
fn is_low_order_x25519(key: &[u8; 32]) -> bool {
    const ANY_SECRET: [u8; 32] = [
        0x5d, 0x2a, 0x1b, 0x41, 0x7c, 0x33, 0x0e, 0x91, 0x27, 0x6f, 0x58, 0x0a, 0x4d, 0x62, 0x19,
        0x73, 0x2e, 0x55, 0x08, 0x6b, 0x3a, 0x44, 0x11, 0x7e, 0x29, 0x60, 0x05, 0x38, 0x4f, 0x12,
        0x6d, 0x4a,
    ];
    x25519(&x25519_secret(&ANY_SECRET), key).is_none()
}

/// An X25519 secret key held by AWS-LC (which frees it cleansed).
fn x25519_secret(secret: &[u8; 32]) -> ecdh::PrivateKey {
    ecdh::PrivateKey::from_private_key(&ecdh::X25519, secret)
        .unwrap_or_else(|e| unreachable!("AWS-LC refused a 32-byte X25519 secret: {e}"))
}

/// The public key of an X25519 secret held by AWS-LC.
fn x25519_public(secret: &ecdh::PrivateKey) -> [u8; 32] {
    let public = secret
        .compute_public_key()
        .unwrap_or_else(|e| unreachable!("AWS-LC could not compute an X25519 public key: {e}"));
    <[u8; 32]>::try_from(public.as_ref())
        .unwrap_or_else(|_| unreachable!("an X25519 public key is 32 bytes"))
}

/// X25519 (RFC 7748): the shared secret of `secret` and the peer's public
/// key, or None when it is all zero (the peer's key is a low-order point;
/// age's "X25519 recipient stanza" requires refusing it). AWS-LC's X25519
/// computes what x25519-dalek's does (the tests hold the two, and age's
/// own identity, to equal answers) in half the time: AWS-LC's
/// field arithmetic against curve25519-dalek's portable ladder, about
/// 25 against 55 µs here (docs/BENCHMARKS.md). AWS-LC refuses the
/// all-zero secret itself; it is checked here again all the same.
fn x25519(secret: &ecdh::PrivateKey, peer: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    let shared = ecdh::agree(
        secret,
        ecdh::UnparsedPublicKey::new(&ecdh::X25519, peer),
        (),
        |s| {
            let mut out = Zeroizing::new([0u8; 32]);
            if s.len() != out.len() {
                return Err(());
            }
            out.copy_from_slice(s);
            Ok(out)
        },
    )
    .ok()?;
    (shared.iter().fold(0u8, |acc, b| acc | b) != 0).then_some(shared)
}

/// Context strings for each kind of signed object, so a signature made for
/// one can never be taken for another.
pub mod context {
    pub const CARD: &[u8] = b"sealpost v1 card\0";
    pub const MESSAGE: &[u8] = b"sealpost v1 message\0";
    /// A card's key vouching, inside a pairing exchange, that the card it
    /// sends is its own (PROTOCOL §10.2).
    pub const PAIR_PROOF: &[u8] = b"sealpost v1 pair proof\0";
}

/// A full identity with its secret keys. `Debug` shows only the fingerprint.
pub struct Identity {
    signing: SigningKey,
    agreement_secret: Zeroizing<[u8; 32]>,
    age: AgeIdentity,
    public: PublicIdentity,
}

/// This identity's X25519 key as an age identity: age's own X25519
/// stanza unwrapping (the age spec's "X25519 recipient stanza", with
/// age-core's HKDF and ChaCha20-Poly1305), but with the public key
/// computed once and the agreement by AWS-LC ([`x25519`]). age's
/// `x25519::Identity` derives the public key from the secret for every
/// stanza it tries, an X25519 base-point multiplication: 12 % of the
/// instructions of opening a message (`bench/instructions.sh`). A test
/// holds this to age's own identity on valid, damaged and hostile stanzas.
pub struct AgeIdentity {
    secret: ecdh::PrivateKey,
    public: [u8; 32],
}

impl fmt::Debug for AgeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgeIdentity(secret hidden)")
    }
}

/// The age X25519 stanza's tag and HKDF label (age spec, §X25519).
const AGE_X25519_TAG: &str = "X25519";
const AGE_X25519_LABEL: &[u8] = b"age-encryption.org/v1/X25519";

/// The key that wraps the file key in an X25519 stanza (age spec):
/// HKDF-SHA-256 of the shared secret, salted with the ephemeral and the
/// recipient's public keys, under the stanza's label.
fn stanza_key(epk: &[u8; 32], recipient: &[u8; 32], shared: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(epk);
    salt[32..].copy_from_slice(recipient);
    Zeroizing::new(age_core::primitives::hkdf(&salt, AGE_X25519_LABEL, shared))
}

impl age::Identity for AgeIdentity {
    fn unwrap_stanza(
        &self,
        stanza: &age_core::format::Stanza,
    ) -> Option<Result<age_core::format::FileKey, age::DecryptError>> {
        use age_core::format::{FileKey, FILE_KEY_BYTES};
        if stanza.tag != AGE_X25519_TAG {
            return None;
        }
        // Canonical: one argument, unpadded base64 of exactly 32 bytes
        // (no trailing bits); a body of the file key and its tag.
        let epk: [u8; 32] = match &stanza.args[..] {
            [arg] => match data_encoding::BASE64_NOPAD.decode(arg.as_bytes()) {
                Ok(v) => match <[u8; 32]>::try_from(v) {
                    Ok(a) => a,
                    Err(_) => return Some(Err(age::DecryptError::InvalidHeader)),
                },
                Err(_) => return Some(Err(age::DecryptError::InvalidHeader)),
            },
            _ => return Some(Err(age::DecryptError::InvalidHeader)),
        };
        if stanza.body.len() != FILE_KEY_BYTES + 16 {
            return Some(Err(age::DecryptError::InvalidHeader));
        }
        let Some(shared) = x25519(&self.secret, &epk) else {
            return Some(Err(age::DecryptError::InvalidHeader));
        };
        let key = stanza_key(&epk, &self.public, &shared);
        // Not ours (another recipient's stanza): not an error.
        age_core::primitives::aead_decrypt(&key, FILE_KEY_BYTES, &stanza.body)
            .ok()
            .map(|mut pt| {
                Ok(FileKey::init_with_mut(|k| {
                    k.copy_from_slice(&pt);
                    pt.zeroize();
                }))
            })
    }
}

/// A contact's X25519 key as an age recipient: age's own X25519 stanza
/// (a fresh ephemeral key, HKDF-SHA-256 over the ephemeral and the
/// recipient's public keys, the file key under ChaCha20-Poly1305), with
/// the ephemeral key and the agreement by AWS-LC ([`x25519`]) instead of
/// x25519-dalek. A test holds its stanzas to age's own identity.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AgeRecipient {
    public: [u8; 32],
}

impl fmt::Debug for AgeRecipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bech32_string("age", &self.public))
    }
}

impl age::Recipient for AgeRecipient {
    fn wrap_file_key(
        &self,
        file_key: &age_core::format::FileKey,
    ) -> Result<(Vec<age_core::format::Stanza>, HashSet<String>), age::EncryptError> {
        use age_core::secrecy::ExposeSecret;
        // The ephemeral secret comes from the kernel (getrandom), as age's
        // does. Not from AWS-LC's generator: seeding it runs CPU-jitter
        // entropy collection, 420 M instructions (tens of milliseconds) in
        // every process that draws from it first.
        let mut esk_bytes = Zeroizing::new([0u8; 32]);
        rand_core::OsRng
            .try_fill_bytes(esk_bytes.as_mut())
            .map_err(|e| {
                age::EncryptError::Io(std::io::Error::other(format!(
                    "the kernel's random generator failed: {e}"
                )))
            })?;
        let esk = x25519_secret(&esk_bytes);
        let epk = x25519_public(&esk);
        // Only a low-order recipient key gives the all-zero secret (card
        // import refuses those): refused here rather than sealed to.
        let shared = x25519(&esk, &self.public).ok_or_else(|| {
            age::EncryptError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the recipient's X25519 key is a low-order point",
            ))
        })?;
        let key = stanza_key(&epk, &self.public, &shared);
        let body = age_core::primitives::aead_encrypt(&key, file_key.expose_secret());
        Ok((
            vec![age_core::format::Stanza {
                tag: AGE_X25519_TAG.to_owned(),
                args: vec![data_encoding::BASE64_NOPAD.encode(&epk)],
                body,
            }],
            HashSet::new(),
        ))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Identity({}, secret keys hidden)",
            self.public.fingerprint()
        )
    }
}

/// The first line of a secret key file.
pub const SECRET_FILE_HEADER: &str =
    "# sealpost identity v1: SECRET keys. Never share or copy this file.";
const SIGNING_LINE_PREFIX: &str = "sealpost-signing-key-v1 ";
/// Secret key files are tiny; anything larger is not one.
pub const MAX_SECRET_FILE_BYTES: usize = 1024;

impl Identity {
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        let mut agreement = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        rng.fill_bytes(agreement.as_mut());
        Self::from_secret_bytes(&seed, &agreement)
    }

    /// Builds an identity from its two 32-byte secrets.
    pub fn from_secret_bytes(signing_seed: &[u8; 32], agreement_secret: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(signing_seed);
        let x_secret = x25519_secret(agreement_secret);
        let x_public = x25519_public(&x_secret);
        let age = AgeIdentity {
            secret: x_secret,
            public: x_public,
        };
        let public = PublicIdentity {
            signing: signing.verifying_key(),
            agreement: x_public,
        };
        Self {
            signing,
            agreement_secret: Zeroizing::new(*agreement_secret),
            age,
            public,
        }
    }

    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.public.fingerprint()
    }

    pub fn age_identity(&self) -> &AgeIdentity {
        &self.age
    }

    /// age's own identity for this key (what `age -d -i` uses), for
    /// comparing with [`Identity::age_identity`].
    pub fn age_reference_identity(&self) -> age::x25519::Identity {
        let mut s = bech32_string("age-secret-key-", &self.agreement_secret[..]).to_uppercase();
        let id = s
            .parse::<age::x25519::Identity>()
            .unwrap_or_else(|e| unreachable!("age rejected an identity we encoded: {e}"));
        s.zeroize();
        id
    }

    /// Signs `context || message` with the Ed25519 key.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> [u8; 64] {
        let mut signed = Vec::with_capacity(context.len() + message.len());
        signed.extend_from_slice(context);
        signed.extend_from_slice(message);
        self.signing.sign(&signed).to_bytes()
    }

    /// The secret key file: a comment line, the Ed25519 seed in base64, and
    /// the X25519 secret as an age identity line, so `age -d -i` can use
    /// that line directly.
    pub fn to_secret_file(&self) -> Zeroizing<String> {
        let mut seed_b64 = Zeroizing::new(data_encoding::BASE64.encode(self.signing.as_bytes()));
        let age = Zeroizing::new(
            bech32_string("age-secret-key-", self.agreement_secret.as_ref()).to_uppercase(),
        );
        let out = Zeroizing::new(format!(
            "{SECRET_FILE_HEADER}\n{SIGNING_LINE_PREFIX}{}\n{}\n",
            seed_b64.as_str(),
            age.as_str()
        ));
        seed_b64.zeroize();
        out
    }

    pub fn from_secret_file(text: &[u8]) -> Result<Self, DecodeError> {
        if text.len() > MAX_SECRET_FILE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "secret key file",
                max: MAX_SECRET_FILE_BYTES,
            });
        }
        let text = std::str::from_utf8(text).map_err(|_| DecodeError::Invalid {
            what: "secret key file",
            why: "not UTF-8 text",
        })?;
        let mut seed: Option<Zeroizing<[u8; 32]>> = None;
        let mut agreement: Option<Zeroizing<[u8; 32]>> = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(b64) = line.strip_prefix(SIGNING_LINE_PREFIX) {
                let bytes =
                    Zeroizing::new(data_encoding::BASE64.decode(b64.as_bytes()).map_err(|_| {
                        DecodeError::Invalid {
                            what: "signing key line",
                            why: "not base64",
                        }
                    })?);
                let arr: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| DecodeError::Invalid {
                            what: "signing key line",
                            why: "not 32 bytes",
                        })?;
                if seed.replace(Zeroizing::new(arr)).is_some() {
                    return Err(DecodeError::Invalid {
                        what: "secret key file",
                        why: "two signing keys",
                    });
                }
            } else if line.starts_with("AGE-SECRET-KEY-1") {
                let (hrp, bytes) = bech32::decode(line).map_err(|_| DecodeError::Invalid {
                    what: "age identity line",
                    why: "not valid bech32",
                })?;
                let bytes = Zeroizing::new(bytes);
                if !hrp.as_str().eq_ignore_ascii_case("age-secret-key-") {
                    return Err(DecodeError::Invalid {
                        what: "age identity line",
                        why: "wrong bech32 prefix",
                    });
                }
                let arr: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| DecodeError::Invalid {
                            what: "age identity line",
                            why: "not 32 bytes",
                        })?;
                if agreement.replace(Zeroizing::new(arr)).is_some() {
                    return Err(DecodeError::Invalid {
                        what: "secret key file",
                        why: "two age identities",
                    });
                }
            } else {
                return Err(DecodeError::Invalid {
                    what: "secret key file",
                    why: "unknown line",
                });
            }
        }
        match (seed, agreement) {
            (Some(s), Some(a)) => Ok(Self::from_secret_bytes(&s, &a)),
            _ => Err(DecodeError::Invalid {
                what: "secret key file",
                why: "missing the signing key or the age identity",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_file_round_trip_and_fingerprint_format() {
        let id = Identity::from_secret_bytes(&[7; 32], &[9; 32]);
        let text = id.to_secret_file();
        let back = Identity::from_secret_file(text.as_bytes()).expect("parses");
        assert_eq!(back.public(), id.public());
        let fp = id.fingerprint().to_string();
        assert_eq!(fp.len(), 32 + 7);
        assert_eq!(fp.split(' ').count(), 8);
        assert!(!format!("{id:?}").contains(&data_encoding::BASE64.encode(&[7; 32])));
    }

    #[test]
    fn signatures_are_bound_to_their_context() {
        let id = Identity::from_secret_bytes(&[1; 32], &[2; 32]);
        let sig = id.sign(context::CARD, b"hello");
        assert!(id.public().verify(context::CARD, b"hello", &sig));
        assert!(!id.public().verify(context::MESSAGE, b"hello", &sig));
        assert!(!id.public().verify(context::CARD, b"hellO", &sig));
    }

    #[test]
    fn low_order_agreement_keys_are_refused() {
        let id = Identity::from_secret_bytes(&[1; 32], &[2; 32]);
        let check = |a: &[u8; 32]| {
            PublicIdentity::from_bytes(id.public().signing_bytes(), a)
                .expect("signing key fine")
                .check_agreement_key()
        };
        assert!(check(&[0; 32]).is_err());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(check(&one).is_err());
        assert!(check(id.public().agreement_bytes()).is_ok());
    }

    #[test]
    fn age_recipient_matches_age_identity() {
        let id = Identity::from_secret_bytes(&[3; 32], &[4; 32]);
        assert_eq!(
            id.age_reference_identity().to_public().to_string(),
            id.public().age_recipient_string()
        );
        assert_eq!(&id.age_identity().public, id.public().agreement_bytes());
    }

    /// RFC 7748 §5.2's second X25519 vector and §6.1's Diffie-Hellman
    /// example, through AWS-LC.
    #[test]
    fn x25519_gives_rfc_7748s_answers() {
        let h =
            |s: &str| -> [u8; 32] { hex::decode(s).expect("hex").try_into().expect("32 bytes") };
        let k = h("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d");
        let u = h("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493");
        assert_eq!(
            *x25519(&x25519_secret(&k), &u).expect("shared"),
            h("95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957")
        );
        let a = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let b = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
        let a_pub = x25519_public(&x25519_secret(&a));
        let b_pub = x25519_public(&x25519_secret(&b));
        assert_eq!(
            a_pub,
            h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            b_pub,
            h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
        let shared = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(*x25519(&x25519_secret(&a), &b_pub).expect("shared"), shared);
        assert_eq!(*x25519(&x25519_secret(&b), &a_pub).expect("shared"), shared);
    }

    /// Every low-order point (and its non-canonical encodings, and with
    /// the ignored top bit set) gives no secret, exactly where
    /// x25519-dalek's agreement is not contributory.
    #[test]
    fn x25519_refuses_low_order_points_as_dalek_does() {
        let h =
            |s: &str| -> [u8; 32] { hex::decode(s).expect("hex").try_into().expect("32 bytes") };
        let low = [
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0100000000000000000000000000000000000000000000000000000000000000",
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ];
        let secret = [0x42u8; 32];
        let ours = x25519_secret(&secret);
        let dalek = x25519_dalek::StaticSecret::from(secret);
        for p in low {
            for top in [0u8, 0x80] {
                let mut u = h(p);
                u[31] |= top;
                let theirs = dalek.diffie_hellman(&x25519_dalek::PublicKey::from(u));
                assert!(!theirs.was_contributory(), "{p} {top}");
                assert!(x25519(&ours, &u).is_none(), "{p} {top}");
                assert!(is_low_order_x25519(&u));
            }
        }
    }

    /// Sealing to a low-order key is an error (age's own recipient
    /// panics there), never a stanza under the all-zero secret.
    #[test]
    fn wrapping_to_a_low_order_key_is_an_error() {
        use age::Recipient as _;
        let key = age_core::format::FileKey::new(Box::new([7u8; 16]));
        for public in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            assert!(AgeRecipient { public }.wrap_file_key(&key).is_err());
        }
        let ok = Identity::from_secret_bytes(&[3; 32], &[4; 32]);
        assert!(ok.public().age_recipient().wrap_file_key(&key).is_ok());
    }

    proptest::proptest! {
        /// AWS-LC's X25519 and x25519-dalek's agree on every secret and
        /// every 32 bytes of peer key (non-canonical and top-bit-set ones
        /// included), and on the public key of every secret.
        #[test]
        fn prop_x25519_is_dalek(
            secret in proptest::prelude::any::<[u8; 32]>(),
            peer in proptest::prelude::any::<[u8; 32]>(),
            high in 0u8..4,
        ) {
            let mut peer = peer;
            // Values at or above 2^255 - 19 (non-canonical) now and then.
            if high == 0 {
                peer[1..].fill(0xff);
            }
            let ours = x25519_secret(&secret);
            let dalek = x25519_dalek::StaticSecret::from(secret);
            proptest::prop_assert_eq!(
                x25519_public(&ours),
                x25519_dalek::PublicKey::from(&dalek).to_bytes()
            );
            let theirs = dalek.diffie_hellman(&x25519_dalek::PublicKey::from(peer));
            match x25519(&ours, &peer) {
                Some(s) => proptest::prop_assert_eq!(*s, *theirs.as_bytes()),
                None => proptest::prop_assert!(!theirs.was_contributory()),
            }
        }
    }
}
