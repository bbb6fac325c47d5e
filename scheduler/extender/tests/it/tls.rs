//! The verbs over real loopback TLS with client-certificate authentication: a CA, a server
//! certificate and client certificates made here with rcgen; a client signed by the CA is
//! answered, one without a certificate, one from another CA and plain HTTP are not.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::Value;
use tessera_scheduler::http::{App, Surface, serve_tls};
use tessera_scheduler::tls::{TlsFiles, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, pki_types::ServerName};

use crate::fixtures::fixture;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Self { issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap() }
    }

    /// A leaf certificate and its key, as PEM.
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Server {
    addr: SocketAddr,
    ca: Ca,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let ca = Ca::new("tessera test CA");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let files = TlsFiles {
        cert: write("tls.crt", &cert),
        key: write("tls.key", &key),
        client_ca: write("ca.crt", &ca.issuer.pem()),
    };
    let config = server_config(&files).unwrap();
    let (sched, _) = tessera_scheduler::demo::scheduler(tessera_core::policy::by_name("tessera").unwrap(), 0);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_tls(listener, App::new(sched, Surface::VERBS), config, std::future::pending()));
    Server { addr, ca, _dir: dir }
}

/// A client trusting `trust` and presenting `identity` (certificate PEM, key PEM), if any.
fn client(trust: &Ca, identity: Option<(String, String)>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.issuer.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends one request over TLS; `Ok(response)` or the first error (handshake, write or read).
async fn over_tls(addr: SocketAddr, connector: tokio_rustls::TlsConnector, req: &[u8]) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let exchange = async {
        let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(req).await.map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.map_err(|e| format!("read: {e}"))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| "timed out".to_owned())?
}

#[tokio::test]
async fn a_client_signed_by_the_client_ca_gets_a_filter_answer() {
    let server = start().await;
    let identity = server.ca.leaf(&["kube-scheduler"], ExtendedKeyUsagePurpose::ClientAuth);
    let resp =
        over_tls(server.addr, client(&server.ca, Some(identity)), &request("/filter", &fixture("filter-args.json")))
            .await
            .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body: Value = serde_json::from_str(resp.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["Error"], "");
    assert_eq!(body["NodeNames"].as_array().unwrap().len(), 1, "{body}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let server = start().await;
    let r = over_tls(server.addr, client(&server.ca, None), &request("/filter", &fixture("filter-args.json"))).await;
    // TLS 1.3 finishes the client's side of the handshake before the server checks the client:
    // the refusal arrives as an alert on the first read. Either way no HTTP answer comes.
    let e = r.expect_err("answered without a client certificate");
    assert!(e.contains("CertificateRequired"), "{e}");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let server = start().await;
    let other = Ca::new("someone else's CA");
    let identity = other.leaf(&["kube-scheduler"], ExtendedKeyUsagePurpose::ClientAuth);
    let r =
        over_tls(server.addr, client(&server.ca, Some(identity)), &request("/filter", &fixture("filter-args.json")))
            .await;
    let e = r.expect_err("answered a client from another CA");
    assert!(e.contains("UnknownCA"), "{e}");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_no_answer() {
    let server = start().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&request("/filter", &fixture("filter-args.json"))).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("server closes");
    assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1"), "plain HTTP was answered: {out:?}");
}

#[tokio::test]
async fn a_server_certificate_the_client_does_not_trust_is_refused_by_the_client() {
    // The other direction: kube-scheduler with `tlsConfig.caFile` refuses a wrong server.
    let server = start().await;
    let other = Ca::new("someone else's CA");
    let identity = server.ca.leaf(&["kube-scheduler"], ExtendedKeyUsagePurpose::ClientAuth);
    let e = over_tls(server.addr, client(&other, Some(identity)), &request("/filter", "{}")).await.unwrap_err();
    assert!(e.contains("handshake"), "{e}");
}
