//! meshd's certificate authority: `meshd ca init` and `meshd ca issue`, and
//! the built-in issuer's minting. ECDSA P-256 keys; workload certificates
//! carry the SPIFFE ID as their only SAN (a URI) and are valid for both
//! client and server authentication.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::Identity;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Certificate {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0} already holds a CA; refusing to overwrite it")]
    Exists(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A CA loaded from `ca.crt` and `ca.key`.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Authority {
    /// Creates a new self-signed root in `dir`, valid for `validity`.
    pub fn init(dir: &Path, name: &str, validity: Duration) -> Result<(), CaError> {
        if dir.join(CA_KEY).exists() {
            return Err(CaError::Exists(dir.to_owned()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "meshd");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + validity).into();
        let cert = params.self_signed(&key)?;
        fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
        let path = dir.join(CA_CERT);
        fs::write(&path, cert.pem()).map_err(io(&path))?;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::Certificate {
            path: key_path.clone(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| CaError::Certificate {
                path: cert_path.clone(),
                source,
            })?;
        Ok(Self { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Mints a certificate for `identity` valid from `not_before` for
    /// `validity`: (certificate PEM, private key PEM).
    pub fn mint(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        validity: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshd");
        params.distinguished_name = dn;
        let uri = identity.uri().to_string().try_into()?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = (not_before + validity).into();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `tls.crt`, `tls.key` and `ca.crt` for `identity` into `dir`.
    pub fn issue_to(
        &self,
        identity: &Identity,
        dir: &Path,
        not_before: SystemTime,
        validity: Duration,
    ) -> Result<(), CaError> {
        let (cert, key) = self.mint(identity, not_before, validity)?;
        fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&dir.join(TLS_KEY), &key)?;
        let cert_path = dir.join(TLS_CERT);
        fs::write(&cert_path, cert).map_err(io(&cert_path))?;
        let ca_path = dir.join(CA_CERT);
        fs::write(&ca_path, &self.cert_pem).map_err(io(&ca_path))?;
        Ok(())
    }
}

/// Writes a key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(pem.as_bytes()).map_err(io(path))
}
