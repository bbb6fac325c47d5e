//! The control plane's certificates: one CA that signs the API server's serving certificate and
//! the admin client certificate (so it is also the client CA), and the service-account key.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// Files written under one folder.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    /// PEM of the CA, the admin certificate and its key (for kubeconfigs).
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

impl Pki {
    pub fn write(dir: &Path) -> Result<Self> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "tessera-e2e-ca");
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate()?)?;

        let leaf = |names: &[&str], cn: &str, org: Option<&str>, usage| -> Result<(String, String)> {
            let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
            p.distinguished_name.push(DnType::CommonName, cn);
            if let Some(o) = org {
                p.distinguished_name.push(DnType::OrganizationName, o);
            }
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            Ok((p.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
        };
        let (serving, serving_key) = leaf(
            &["127.0.0.1", "localhost", "kubernetes.default.svc", "127.96.0.1"],
            "kube-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (admin, admin_key) =
            leaf(&[], "tessera-e2e-admin", Some("system:masters"), ExtendedKeyUsagePurpose::ClientAuth)?;
        // ECDSA P-256: the API server signs service-account tokens with ES256.
        let sa = KeyPair::generate()?;

        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        Ok(Self {
            ca_cert: write("ca.crt", &ca.pem())?,
            serving_cert: write("apiserver.crt", &serving)?,
            serving_key: write("apiserver.key", &serving_key)?,
            sa_key: write("sa.key", &sa.serialize_pem())?,
            sa_pub: write("sa.pub", &sa.public_key_pem())?,
            ca_pem: ca.pem(),
            admin_cert_pem: admin,
            admin_key_pem: admin_key,
        })
    }
}
