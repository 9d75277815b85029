//! TLS 1.3 to a relay, pinned: a client trusts exactly the certificate key
//! whose BLAKE3 (over its SubjectPublicKeyInfo) is the pin in the relay's
//! address, so a relay can renew its certificate with the same key without
//! breaking every card that names it.

use std::fmt;
use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The 32-byte pin a client checks: BLAKE3 of the certificate's SPKI.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Pin(pub [u8; 32]);

/// The SubjectPublicKeyInfo (DER, with its outer SEQUENCE) of a
/// certificate: what a pin hashes and a key binding carries.
pub fn spki_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(ee.subject_public_key_info().as_ref().to_vec())
}

/// Signs a key binding (PROTOCOL 6.1) with a relay's certificate key
/// `key` (whose certificate is `cert`) for its Ed25519 key `ed25519_key`.
pub fn sign_key_binding(
    cert: &CertificateDer<'_>,
    key: &rustls::pki_types::PrivateKeyDer<'_>,
    ed25519_key: &[u8; 32],
) -> io::Result<sealpost_proto::relay::KeyBinding> {
    let spki = spki_of(cert).ok_or_else(|| io::Error::other("the certificate does not parse"))?;
    let signing = provider::sign::any_supported_type(key).map_err(io::Error::other)?;
    let signer = signing
        .choose_scheme(&BINDING_SCHEMES)
        .ok_or_else(|| io::Error::other("the certificate key signs none of the TLS 1.3 schemes"))?;
    let msg = sealpost_proto::relay::KeyBinding::message(ed25519_key);
    let signature = signer.sign(&msg).map_err(io::Error::other)?;
    Ok(sealpost_proto::relay::KeyBinding {
        scheme: u16::from(signer.scheme()),
        spki,
        signature,
    })
}

/// The schemes a key binding may use: those of TLS 1.3 for the key types
/// a relay's certificate may have (PROTOCOL 6.1).
const BINDING_SCHEMES: [SignatureScheme; 5] = [
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
];

/// Whether `b` proves that the relay pinned by `pin` vouches for the
/// Ed25519 key `ed25519_key`: the binding's key hashes to the pin, and its
/// signature over the key verifies under it with the stated scheme.
pub fn verify_key_binding(
    pin: &[u8; 32],
    ed25519_key: &[u8; 32],
    b: &sealpost_proto::relay::KeyBinding,
) -> bool {
    use webpki::ring as algs;
    if blake3::hash(&b.spki).as_bytes() != pin {
        return false;
    }
    let alg: &dyn rustls::pki_types::SignatureVerificationAlgorithm =
        match SignatureScheme::from(b.scheme) {
            SignatureScheme::ED25519 => algs::ED25519,
            SignatureScheme::ECDSA_NISTP256_SHA256 => algs::ECDSA_P256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384 => algs::ECDSA_P384_SHA384,
            SignatureScheme::RSA_PSS_SHA256 => algs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            SignatureScheme::RSA_PSS_SHA384 => algs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
            _ => return false,
        };
    let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from(b.spki.as_slice());
    let Ok(entity) = webpki::RawPublicKeyEntity::try_from(&spki) else {
        return false;
    };
    let msg = sealpost_proto::relay::KeyBinding::message(ed25519_key);
    entity.verify_signature(alg, &msg, &b.signature).is_ok()
}

impl Pin {
    pub fn of_cert(cert: &CertificateDer<'_>) -> Option<Self> {
        let ee = webpki::EndEntityCert::try_from(cert).ok()?;
        let spki = ee.subject_public_key_info();
        Some(Self(*blake3::hash(spki.as_ref()).as_bytes()))
    }

    /// Base32 without padding (52 characters).
    pub fn to_text(&self) -> String {
        data_encoding::BASE32_NOPAD.encode(&self.0)
    }

    pub fn from_text(s: &str) -> Option<Self> {
        let v = data_encoding::BASE32_NOPAD
            .decode(s.trim().to_ascii_uppercase().as_bytes())
            .ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({})", self.to_text())
    }
}

/// A relay's address as users copy it: `host:port/PIN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayAddress {
    pub host_port: String,
    pub pin: Pin,
}

/// Why text is not a relay address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressError {
    /// Not of the form `host:port/PIN[.CHECK]`.
    NotAnAddress,
    /// The form is right but its check characters do not match: a typo.
    Mistyped,
}

impl RelayAddress {
    /// Parses `host:port/PIN` or, as printed for people, `host:port/PIN.CHECK`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::parse_checked(s).ok()
    }

    /// [`RelayAddress::parse`], telling a typo (check characters that do
    /// not match) from text that is no address at all.
    pub fn parse_checked(s: &str) -> Result<Self, AddressError> {
        let s = s.trim();
        let s = sealpost_proto::codec::strip_check(s).map_err(|_| AddressError::Mistyped)?;
        let (hp, pin) = s.rsplit_once('/').ok_or(AddressError::NotAnAddress)?;
        if hp.is_empty() || hp.len() > 253 || !hp.contains(':') {
            return Err(AddressError::NotAnAddress);
        }
        Ok(Self {
            host_port: hp.to_owned(),
            pin: Pin::from_text(pin).ok_or(AddressError::NotAnAddress)?,
        })
    }

    /// The form to show and hand to people: `host:port/PIN.CHECK`, whose
    /// check characters catch a typo ([`sealpost_proto::codec::text_check`]).
    pub fn to_checked_text(&self) -> String {
        sealpost_proto::codec::with_check(&self.to_string())
    }

    /// The host part, for TLS server name (SNI is not relied on: the pin is).
    pub fn host(&self) -> &str {
        match self.host_port.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => &self.host_port,
        }
    }
}

impl fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host_port, self.pin.to_text())
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(provider::default_provider())
}

fn io_other(e: impl fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Accepts exactly the server whose certificate key hashes to the pin.
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: Pin,
    provider: Arc<CryptoProvider>,
    /// The key a server presented instead of the pinned one, if one did.
    mismatch: Arc<std::sync::Mutex<Option<Pin>>>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match Pin::of_cert(end_entity) {
            Some(p) if p == self.pin => Ok(ServerCertVerified::assertion()),
            Some(p) => {
                if let Ok(mut m) = self.mismatch.lock() {
                    *m = Some(p);
                }
                Err(rustls::Error::General(
                    "the relay's key does not match the pinned fingerprint".into(),
                ))
            }
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config that trusts exactly the pinned relay key.
pub fn client_config(pin: Pin) -> io::Result<rustls::ClientConfig> {
    Ok(watched_client_config(pin)?.0)
}

/// [`client_config`], and where the key a server presented instead of the
/// pinned one is recorded (so a caller can tell a key that does not match
/// the pin, a possible interception, from a relay that cannot be reached).
pub fn watched_client_config(
    pin: Pin,
) -> io::Result<(rustls::ClientConfig, Arc<std::sync::Mutex<Option<Pin>>>)> {
    let provider = provider();
    let mismatch = Arc::new(std::sync::Mutex::new(None));
    let verifier = PinnedVerifier {
        pin,
        provider: provider.clone(),
        mismatch: mismatch.clone(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io_other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![sealpost_proto::relay::ALPN.to_vec()];
    Ok((cfg, mismatch))
}
