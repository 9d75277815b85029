//! TLS 1.3 for relays: a self-signed certificate made on first start,
//! pinned by clients through the BLAKE3 of its public key (the client side,
//! [`Pin`] and [`RelayAddress`] are in `sealpost-client`).

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use sealpost_client::tls::{
    client_config, provider, watched_client_config, AddressError, Pin, PinnedVerifier, RelayAddress,
};

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
