//! Identities: an Ed25519 signing key and an X25519 key-agreement key.
//!
//! The X25519 half is an age identity/recipient, so the encryption layer is
//! plain age v1 and interoperates with other age implementations. The
//! Ed25519 half signs everything an identity says: its card, its messages,
//! later its receipts. The fingerprint people compare is a hash of the
//! signing key alone, because the signing key is what vouches for the rest.

use std::fmt;

use bech32::{Bech32, Hrp};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use zeroize::{Zeroize, Zeroizing};

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

    pub fn age_recipient(&self) -> age::x25519::Recipient {
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

/// The low-order points of Curve25519 in Montgomery form; a key-agreement
/// with any of them yields an all-zero secret. age refuses those too, but a
/// card carrying one is refused at import so the failure is found early.
fn is_low_order_x25519(key: &[u8; 32]) -> bool {
    let secret = x25519_dalek::StaticSecret::from([
        0x5d, 0x2a, 0x1b, 0x41, 0x7c, 0x33, 0x0e, 0x91, 0x27, 0x6f, 0x58, 0x0a, 0x4d, 0x62, 0x19,
        0x73, 0x2e, 0x55, 0x08, 0x6b, 0x3a, 0x44, 0x11, 0x7e, 0x29, 0x60, 0x05, 0x38, 0x4f, 0x12,
        0x6d, 0x4a,
    ]);
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*key));
    !shared.was_contributory()
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
/// computed once. age's `x25519::Identity` derives it from the secret for
/// every stanza it tries, an X25519 base-point multiplication: 12 % of the
/// instructions of opening a message (`bench/instructions.sh`). A test
/// holds this to age's own identity on valid, damaged and hostile stanzas.
pub struct AgeIdentity {
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
}

impl fmt::Debug for AgeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgeIdentity(secret hidden)")
    }
}

/// The age X25519 stanza's tag and HKDF label (age spec, §X25519).
const AGE_X25519_TAG: &str = "X25519";
const AGE_X25519_LABEL: &[u8] = b"age-encryption.org/v1/X25519";

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
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(epk));
        if !shared.was_contributory() {
            return Some(Err(age::DecryptError::InvalidHeader));
        }
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(&epk);
        salt[32..].copy_from_slice(self.public.as_bytes());
        let key = Zeroizing::new(age_core::primitives::hkdf(
            &salt,
            AGE_X25519_LABEL,
            shared.as_bytes(),
        ));
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
        let x_secret = x25519_dalek::StaticSecret::from(*agreement_secret);
        let x_public = x25519_dalek::PublicKey::from(&x_secret);
        let age = AgeIdentity {
            secret: x_secret,
            public: x_public,
        };
        let public = PublicIdentity {
            signing: signing.verifying_key(),
            agreement: x_public.to_bytes(),
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
        assert_eq!(
            id.age_identity().public.as_bytes(),
            id.public().agreement_bytes()
        );
    }
}
