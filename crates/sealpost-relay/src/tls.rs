//! TLS 1.3 for relays: a self-signed certificate made on first start,
//! pinned by clients through the BLAKE3 of its public key.
//!
//! The pin is over the SubjectPublicKeyInfo, not the whole certificate, so
//! a relay can renew its certificate with the same key without breaking
//! every card that names it.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The 32-byte pin a client checks: BLAKE3 of the certificate's SPKI.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Pin(pub [u8; 32]);

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

/// The relay's certificate and key, loaded or created in `dir`.
pub struct RelayCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub pin: Pin,
}

impl fmt::Debug for RelayCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayCert({:?})", self.pin)
    }
}

fn io_other(e: impl fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Loads `cert.pem` and `key.pem` from `dir`, creating a self-signed pair
/// on first start. Returns the cert and whether it was created now.
///
/// Each file is written to a temporary name, made durable and renamed into
/// place, the key before the certificate: a relay killed during its first
/// start leaves either no certificate (and makes a new pair next time: it
/// never served with the old one) or a whole set. An empty `cert.pem`, left
/// by versions that created it in place, is treated as absent.
pub fn load_or_create(dir: &Path, names: &[String]) -> io::Result<(RelayCert, bool)> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let present = fs::metadata(&cert_path).is_ok_and(|m| m.len() > 0);
    let created = if !present {
        let mut names = names.to_vec();
        if names.is_empty() {
            names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        }
        let ck = rcgen::generate_simple_self_signed(names).map_err(io_other)?;
        write_private(&key_path, ck.signing_key.serialize_pem().as_bytes())?;
        write_private(&cert_path, ck.cert.pem().as_bytes())?;
        true
    } else {
        false
    };
    Ok((load(&cert_path, &key_path)?, created))
}

/// Loads a configured certificate chain and key (PEM).
pub fn load(cert_path: &Path, key_path: &Path) -> io::Result<RelayCert> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(io_other)?
        .collect::<Result<_, _>>()
        .map_err(io_other)?;
    let first = chain
        .first()
        .ok_or_else(|| io_other(format!("no certificate in {}", cert_path.display())))?;
    let pin = Pin::of_cert(first).ok_or_else(|| {
        io_other(format!(
            "cannot parse the certificate in {}",
            cert_path.display()
        ))
    })?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(io_other)?;
    Ok(RelayCert { chain, key, pin })
}

/// Writes `bytes` as `path` (mode 0600) through a temporary file in the
/// same directory that is made durable and renamed into place, then makes
/// the rename durable: after a crash `path` is absent, old or whole.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io_other(format!("{} is not a file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// TLS 1.3 only, ALPN `sealpost/1`.
pub fn server_config(cert: &RelayCert) -> io::Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io_other)?
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(io_other)?;
    cfg.alpn_protocols = vec![sealpost_proto::relay::ALPN.to_vec()];
    Ok(cfg)
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
