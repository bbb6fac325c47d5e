//! TLS with client-certificate authentication for the extender verbs (rustls, ring).
//!
//! The verbs bind pods and change MIG layouts, so a listener that other hosts can reach must
//! know who calls it: the server presents `--tls-cert`/`--tls-key` and accepts only clients
//! whose certificate chains to `--client-ca`. Server-only TLS is not offered: it would encrypt
//! the calls of anyone who can connect without keeping anyone out. On loopback (the default,
//! kube-scheduler in the same pod) plain HTTP is the intended setup.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// The three PEM files of a TLS listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign the accepted client certificates.
    pub client_ca: PathBuf,
}

impl TlsFiles {
    /// All three flags or none; a partial set names what is missing.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (cert, key, client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(client_ca)) => Ok(Some(TlsFiles { cert, key, client_ca })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [("--tls-cert", cert.is_none()), ("--tls-key", key.is_none())]
                    .into_iter()
                    .chain([("--client-ca", ca.is_none())])
                    .filter(|(_, m)| *m)
                    .map(|(f, _)| f)
                    .collect();
                Err(format!(
                    "TLS needs --tls-cert, --tls-key and --client-ca together; missing {} (server-only TLS is not \
                     offered: the verbs bind pods, so a TLS listener must authenticate its clients)",
                    missing.join(", ")
                ))
            }
        }
    }
}

/// Why a TLS configuration could not be built. Each message is whole (path and reason), so
/// the cause is kept as a field, not chained as a source that would repeat it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {cause}")]
    Pem { what: &'static str, path: PathBuf, cause: rustls_pki_types::pem::Error },
    #[error("{what} {path}: no {expected} found (is it PEM?)")]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("client CA {path}: {cause}")]
    ClientCa { path: PathBuf, cause: rustls::Error },
    #[error("client CA {path}: {cause}")]
    Verifier { path: PathBuf, cause: rustls::server::VerifierBuilderError },
    #[error("server certificate {cert} with key {key}: {cause}")]
    CertKey { cert: PathBuf, key: PathBuf, cause: rustls::Error },
}

fn pem_error(what: &'static str, path: &Path, expected: &'static str, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty { what, path: path.to_owned(), expected },
        cause => TlsError::Pem { what, path: path.to_owned(), cause },
    }
}

/// Every certificate in a PEM file; at least one.
pub fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let expected = "CERTIFICATE block";
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, expected, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, expected, e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_owned(), expected });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error("private key", path, "PRIVATE KEY block", e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration: our certificate, and only clients signed by the client CA.
/// HTTP/1.1 only, as kube-scheduler speaks to extenders.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert = load_certs("server certificate", &files.cert)?;
    let key = load_key(&files.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs("client CA", &files.client_ca)? {
        roots.add(ca).map_err(|cause| TlsError::ClientCa { path: files.client_ca.clone(), cause })?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|cause| TlsError::Verifier { path: files.client_ca.clone(), cause })?;
    let cert_key = |cause| TlsError::CertKey { cert: files.cert.clone(), key: files.key.clone(), cause };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cert_key)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert, key)
        .map_err(cert_key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_flag_set_names_what_is_missing() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(TlsFiles::from_flags(None, None, None), Ok(None));
        let e = TlsFiles::from_flags(p("c.pem"), p("k.pem"), None).unwrap_err();
        assert!(e.contains("missing --client-ca") && e.contains("server-only"), "{e}");
        let e = TlsFiles::from_flags(p("c.pem"), None, None).unwrap_err();
        assert!(e.contains("missing --tls-key, --client-ca"), "{e}");
        let e = TlsFiles::from_flags(None, None, p("ca.pem")).unwrap_err();
        assert!(e.contains("missing --tls-cert, --tls-key"), "{e}");
        let all = TlsFiles::from_flags(p("c.pem"), p("k.pem"), p("ca.pem")).unwrap().unwrap();
        assert_eq!(all.client_ca, PathBuf::from("ca.pem"));
    }

    #[test]
    fn unreadable_empty_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = load_certs("server certificate", &missing).unwrap_err().to_string();
        assert!(e.starts_with("server certificate ") && e.contains("nope.pem") && e.contains("I/O error"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = load_certs("client CA", &empty).unwrap_err().to_string();
        assert!(e.contains("empty.pem") && e.contains("no CERTIFICATE block"), "{e}");
        let e = load_key(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.pem") && e.contains("no PRIVATE KEY block"), "{e}");

        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n").unwrap();
        let e = load_certs("server certificate", &broken).unwrap_err().to_string();
        assert!(e.contains("broken.pem") && e.contains("base64"), "{e}");

        let cut = dir.path().join("cut.pem");
        std::fs::write(&cut, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let e = load_certs("server certificate", &cut).unwrap_err().to_string();
        assert!(e.contains("cut.pem") && e.contains("end marker"), "{e}");
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::KeyPair::generate().unwrap();
        let ca_cert = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&ca).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&server_key).unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let files = TlsFiles {
            cert: write("server.pem", server.pem()),
            key: write("other-key.pem", other_key.serialize_pem()),
            client_ca: write("ca.pem", ca_cert.pem()),
        };
        let e = server_config(&files).unwrap_err().to_string();
        assert!(e.contains("server.pem") && e.contains("other-key.pem"), "{e}");
        let good = TlsFiles { key: write("server-key.pem", server_key.serialize_pem()), ..files };
        server_config(&good).unwrap();
    }
}
