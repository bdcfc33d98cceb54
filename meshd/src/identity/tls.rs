//! TLS 1.3 configurations for the tunnel: the destination demands a client
//! certificate chaining to the trust bundle and reads the peer's SPIFFE ID
//! from it; the source presents its workload's certificate and accepts only
//! the identity expected for the endpoint.

use std::{fmt, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    CertificateError, ClientConfig, DigitallySignedStruct, Error, ServerConfig, SignatureScheme,
};

use super::{store::Certificates, Identity};
use crate::spiffe::is_dns_label;

pub const ALPN_H2: &[u8] = b"h2";

/// The rustls provider meshd uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate is loaded for {0}")]
    NoCertificate(Identity),
    #[error("the trust bundle is empty")]
    NoRoots,
    #[error("TLS configuration: {0}")]
    Config(#[from] Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

// === server ===

/// The destination side: TLS 1.3 only, client certificates required.
pub fn server_config(
    certs: Arc<Certificates>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, TlsError> {
    if certs.roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(certs.roots.clone(), provider.clone())
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(BySni(certs)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Presents the certificate of the identity the client named in SNI.
struct BySni(Arc<Certificates>);

impl fmt::Debug for BySni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BySni")
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let identity = self.0.by_server_name.get(hello.server_name()?)?;
        self.0.get(identity).cloned()
    }
}

/// The SPIFFE ID in a verified peer certificate.
pub fn peer_identity(certs: &[CertificateDer<'_>], trust_domain: &str) -> Result<Identity, String> {
    let leaf = certs.first().ok_or("no peer certificate")?;
    let (uris, _) = super::store::leaf_facts(leaf)?;
    // SPIFFE: an SVID carries exactly one SPIFFE ID. With two, which one
    // the peer "is" would be meshd's guess; it is refused instead.
    let ids: Vec<&String> = uris.iter().filter(|u| u.starts_with("spiffe://")).collect();
    let uri = match ids[..] {
        [one] => one,
        [] => {
            return Err(format!(
                "no SPIFFE ID among the certificate's URIs {uris:?}"
            ))
        }
        _ => {
            return Err(format!(
                "{} SPIFFE IDs in one certificate: {ids:?}",
                ids.len()
            ))
        }
    };
    let id = Identity::parse_in(uri, trust_domain).map_err(|e| e.to_string())?;
    if !is_dns_label(id.namespace()) || !is_dns_label(id.service_account()) {
        return Err(format!(
            "{uri}: the namespace and service account must be DNS labels"
        ));
    }
    Ok(id)
}

// === client ===

/// The source side for one (source identity, expected destination identity).
pub fn client_config(
    certs: &Arc<Certificates>,
    source: &Identity,
    expected: &Identity,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let key = certs
        .get(source)
        .cloned()
        .ok_or_else(|| TlsError::NoCertificate(source.clone()))?;
    let verifier = Arc::new(ExpectIdentity {
        certs: certs.clone(),
        expected: expected.clone(),
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Present(key)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Always presents one certificate.
#[derive(Debug)]
struct Present(Arc<CertifiedKey>);

impl ResolvesClientCert for Present {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies the server's chain against the trust bundle, then that its
/// SPIFFE ID is exactly the one expected for the endpoint. (WebPKI's own
/// verifier would look for a DNS name; SPIFFE certificates carry a URI.)
struct ExpectIdentity {
    certs: Arc<Certificates>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for ExpectIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExpectIdentity({})", self.expected)
    }
}

/// The error a source reports when the destination proves another identity.
#[derive(Debug)]
pub struct IdentityMismatch {
    pub expected: Identity,
    pub presented: String,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer presented {}, expected {}",
            self.presented, self.expected
        )
    }
}

impl std::error::Error for IdentityMismatch {}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.certs.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let trust_domain = self.expected.trust_domain();
        match peer_identity(std::slice::from_ref(end_entity), trust_domain) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => Err(mismatch(&self.expected, id.to_string())),
            Err(reason) => Err(mismatch(&self.expected, reason)),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Only TLS 1.3 is enabled.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
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

fn mismatch(expected: &Identity, presented: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        IdentityMismatch {
            expected: expected.clone(),
            presented,
        },
    ))))
}

// === failure reasons ===

/// A bounded label for why a handshake failed, from the error tokio-rustls
/// returned.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    rustls_reason(tls)
}

pub fn rustls_reason(err: &Error) -> &'static str {
    match err {
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_yet_valid",
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::UnknownRevocationStatus,
        ) => "untrusted",
        Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<IdentityMismatch>().is_some() =>
        {
            "identity_mismatch"
        }
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::PeerIncompatible(_) => "protocol_version",
        Error::AlertReceived(
            rustls::AlertDescription::BadCertificate | rustls::AlertDescription::UnknownCA,
        ) => "rejected_by_peer",
        Error::AlertReceived(rustls::AlertDescription::CertificateExpired) => "rejected_by_peer",
        Error::AlertReceived(_) => "alert",
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. } => "not_tls",
        _ => "other",
    }
}
