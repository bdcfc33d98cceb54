//! The certificates meshd holds for its node's workloads and the trust
//! bundle it verifies peers against, kept current: files are re-read when
//! they change (ConfigMap symlink swaps included), and built-in issuer
//! certificates are renewed at half-life. Readers take an immutable snapshot;
//! a refresh swaps in a new one and never disturbs established connections.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
    RootCertStore,
};
use tracing::{info, warn};

use super::{
    ca::{Authority, CA_CERT, TLS_CERT, TLS_KEY},
    Identity,
};
use crate::spiffe::is_dns_label;

/// How often certificate files are checked for changes, and issued
/// certificates for renewal.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// One workload's certificate.
#[derive(Clone)]
pub struct WorkloadCert {
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    /// When it was issued (built-in issuer) or found (files).
    pub issued: SystemTime,
}

impl WorkloadCert {
    /// Seconds until it expires at `now`; negative once it has.
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        }
    }
}

/// An immutable view of the node's certificates.
pub struct Certificates {
    pub by_identity: BTreeMap<Identity, WorkloadCert>,
    /// `Identity::server_name()` → identity, for the TLS server's SNI lookup.
    pub by_server_name: HashMap<String, Identity>,
    pub roots: Arc<RootCertStore>,
    /// Bumped on every change, so TLS configs know when to rebuild.
    pub generation: u64,
}

impl Default for Certificates {
    fn default() -> Self {
        Self {
            by_identity: BTreeMap::new(),
            by_server_name: HashMap::new(),
            roots: Arc::new(RootCertStore::empty()),
            generation: 0,
        }
    }
}

impl Certificates {
    pub fn get(&self, identity: &Identity) -> Option<&Arc<CertifiedKey>> {
        self.by_identity.get(identity).map(|c| &c.key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(transparent)]
    Ca(#[from] super::ca::CaError),
}

fn file_error(path: &Path, message: impl ToString) -> StoreError {
    StoreError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Where certificates come from.
pub enum Source {
    /// `<dir>/<namespace>/<serviceAccount>/{tls.crt,tls.key,ca.crt}`.
    Files { dir: PathBuf },
    /// Minted from this CA for `identities`, `ttl` long, renewed at half-life.
    Issuer {
        ca: Box<Authority>,
        /// Replaced when a config reload changes the node's workloads.
        identities: std::sync::Mutex<Vec<Identity>>,
        ttl: Duration,
    },
}

pub struct CertStore {
    source: Source,
    trust_bundle: Option<PathBuf>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Certificates>,
    /// What the files looked like at the last load.
    fingerprint: std::sync::Mutex<Vec<(PathBuf, SystemTime, u64)>>,
}

impl CertStore {
    pub fn new(
        source: Source,
        trust_bundle: Option<PathBuf>,
        trust_domain: &str,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            source,
            trust_bundle,
            trust_domain: trust_domain.to_owned(),
            provider,
            current: ArcSwap::from_pointee(Certificates::default()),
            fingerprint: Default::default(),
        }
    }

    /// The identities the built-in issuer mints for (ignored for files).
    pub fn set_identities(&self, identities: impl IntoIterator<Item = Identity>) {
        if let Source::Issuer {
            identities: ids, ..
        } = &self.source
        {
            let mut next: Vec<Identity> = identities.into_iter().collect();
            next.sort();
            next.dedup();
            *ids.lock().unwrap_or_else(|p| p.into_inner()) = next;
        }
    }

    pub fn current(&self) -> Arc<Certificates> {
        self.current.load_full()
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Loads or renews what changed; returns whether the snapshot changed.
    pub fn refresh(&self) -> bool {
        let previous = self.current();
        let next = match &self.source {
            Source::Files { dir } => {
                let fingerprint = fingerprint(dir, self.trust_bundle.as_deref());
                let mut last = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
                if *last == fingerprint && previous.generation > 0 {
                    return false;
                }
                *last = fingerprint;
                drop(last);
                self.load_files(dir, &previous)
            }
            Source::Issuer {
                ca,
                identities,
                ttl,
            } => match self.renew(
                ca,
                &identities.lock().unwrap_or_else(|p| p.into_inner()),
                *ttl,
                &previous,
            ) {
                Some(next) => next,
                None => return false,
            },
        };
        for (identity, cert) in &next.by_identity {
            let changed = previous.by_identity.get(identity).is_none_or(|old| {
                old.not_after != cert.not_after || !Arc::ptr_eq(&old.key, &cert.key)
            });
            if changed {
                info!(%identity, not_after = ?humantime::format_rfc3339_seconds(cert.not_after), "certificate loaded");
            }
        }
        self.current.store(Arc::new(next));
        true
    }

    fn roots(&self, mut pems: Vec<(PathBuf, Vec<u8>)>) -> RootCertStore {
        if let Some(bundle) = &self.trust_bundle {
            match fs::read(bundle) {
                Ok(pem) => pems.push((bundle.clone(), pem)),
                Err(err) => {
                    warn!(path = %bundle.display(), error = %err, "trust bundle not readable")
                }
            }
        }
        let mut roots = RootCertStore::empty();
        for (path, pem) in pems {
            for cert in CertificateDer::pem_slice_iter(&pem) {
                match cert
                    .map_err(|e| e.to_string())
                    .and_then(|c| roots.add(c).map_err(|e| e.to_string()))
                {
                    Ok(()) => {}
                    Err(err) => {
                        warn!(path = %path.display(), error = %err, "skipping a trust anchor")
                    }
                }
            }
        }
        roots
    }

    /// Loads every identity directory. What is trusted is the configured
    /// trust bundle only: a directory's `ca.crt` names its own issuer for
    /// whoever reads it, but whoever can write one directory must not
    /// decide whom the whole node trusts.
    fn load_files(&self, dir: &Path, previous: &Certificates) -> Certificates {
        let mut by_identity = BTreeMap::new();
        for (namespace, service_account, path) in identity_dirs(dir) {
            let uri = format!(
                "spiffe://{}/ns/{namespace}/sa/{service_account}",
                self.trust_domain
            );
            let identity = match Identity::parse(&uri) {
                Ok(identity)
                    if is_dns_label(identity.namespace())
                        && is_dns_label(identity.service_account()) =>
                {
                    identity
                }
                _ => {
                    warn!(path = %path.display(), "not an identity directory (<namespace>/<serviceAccount>, DNS labels); skipped");
                    continue;
                }
            };
            match self.load_one(&path, &identity) {
                Ok(cert) => {
                    by_identity.insert(identity, cert);
                }
                Err(err) => {
                    // A half-written update: keep serving what we had.
                    warn!(%identity, error = %err, "certificate not loaded; keeping the previous one");
                    if let Some(old) = previous.by_identity.get(&identity) {
                        by_identity.insert(identity, old.clone());
                    }
                }
            }
        }
        let mut roots = self.roots(Vec::new());
        if roots.is_empty() && !previous.roots.is_empty() {
            warn!("the trust bundle holds no root now; keeping the roots trusted so far");
            roots = (*previous.roots).clone();
        }
        self.snapshot(by_identity, roots, previous)
    }

    fn load_one(&self, dir: &Path, identity: &Identity) -> Result<WorkloadCert, StoreError> {
        let cert_path = dir.join(TLS_CERT);
        let key_path = dir.join(TLS_KEY);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| file_error(&cert_path, e))?;
        let leaf = chain
            .first()
            .ok_or_else(|| file_error(&cert_path, "no certificate"))?;
        let (uris, not_after) = leaf_facts(leaf).map_err(|e| file_error(&cert_path, e))?;
        if !uris.iter().any(|u| u == identity.uri().as_ref()) {
            return Err(file_error(
                &cert_path,
                format!("certificate is for {uris:?}, not {identity}"),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_error(&key_path, e))?;
        let key = CertifiedKey::from_der(chain, key, &self.provider)
            .map_err(|e| file_error(&key_path, e))?;
        Ok(WorkloadCert {
            key: Arc::new(key),
            not_after,
            issued: SystemTime::now(),
        })
    }

    /// Mints certificates that are missing or past half their life.
    fn renew(
        &self,
        ca: &Authority,
        identities: &[Identity],
        ttl: Duration,
        previous: &Certificates,
    ) -> Option<Certificates> {
        let now = SystemTime::now();
        let due = |id: &Identity| {
            previous
                .by_identity
                .get(id)
                .is_none_or(|c| now.duration_since(c.issued).unwrap_or_default() >= ttl / 2)
        };
        if previous.generation > 0 && !identities.iter().any(due) {
            return None;
        }
        let mut by_identity = BTreeMap::new();
        for identity in identities {
            let renewed = if due(identity) {
                // Back-date a little for peers whose clocks run behind.
                let backdate = (ttl / 10).min(Duration::from_secs(60));
                ca.mint(identity, now - backdate, ttl + backdate)
                    .map_err(StoreError::from)
                    .and_then(|(cert, key)| self.certified(cert.as_bytes(), key.as_bytes()))
                    .map(|key| WorkloadCert {
                        key: Arc::new(key),
                        not_after: now + ttl,
                        issued: now,
                    })
            } else {
                let old = &previous.by_identity[identity];
                Ok(old.clone())
            };
            match renewed {
                Ok(cert) => {
                    by_identity.insert(identity.clone(), cert);
                }
                Err(err) => {
                    // The current certificate is still good until it expires.
                    warn!(%identity, error = %err, "cannot issue a certificate; keeping the current one");
                    if let Some(old) = previous.by_identity.get(identity) {
                        by_identity.insert(identity.clone(), old.clone());
                    }
                }
            }
        }
        let roots = self.roots(vec![(
            PathBuf::from("issuer ca.crt"),
            ca.cert_pem().as_bytes().to_vec(),
        )]);
        Some(self.snapshot(by_identity, roots, previous))
    }

    fn certified(&self, cert: &[u8], key: &[u8]) -> Result<CertifiedKey, StoreError> {
        let here = Path::new("issued certificate");
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(here, e))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| file_error(here, e))?;
        CertifiedKey::from_der(chain, key, &self.provider).map_err(|e| file_error(here, e))
    }

    fn snapshot(
        &self,
        by_identity: BTreeMap<Identity, WorkloadCert>,
        roots: RootCertStore,
        previous: &Certificates,
    ) -> Certificates {
        let by_server_name = by_identity
            .keys()
            .map(|id| (id.server_name(), id.clone()))
            .collect();
        Certificates {
            by_identity,
            by_server_name,
            roots: Arc::new(roots),
            generation: previous.generation + 1,
        }
    }
}

/// `(namespace, serviceAccount, path)` for every `<dir>/<ns>/<sa>/` directory.
fn identity_dirs(dir: &Path) -> Vec<(String, String, PathBuf)> {
    let mut found = Vec::new();
    let Ok(namespaces) = fs::read_dir(dir) else {
        return found;
    };
    for ns in namespaces.flatten() {
        let ns_name = ns.file_name().to_string_lossy().into_owned();
        // Kubernetes' projected volumes keep dot-prefixed data directories.
        if ns_name.starts_with('.') || !ns.path().is_dir() {
            continue;
        }
        let Ok(accounts) = fs::read_dir(ns.path()) else {
            continue;
        };
        for sa in accounts.flatten() {
            let sa_name = sa.file_name().to_string_lossy().into_owned();
            if !sa_name.starts_with('.') && sa.path().is_dir() {
                found.push((ns_name.clone(), sa_name, sa.path()));
            }
        }
    }
    found.sort();
    found
}

/// Modification time and size of every file that matters, following
/// symlinks, so any swap shows up.
fn fingerprint(dir: &Path, bundle: Option<&Path>) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut files: Vec<PathBuf> = identity_dirs(dir)
        .into_iter()
        .flat_map(|(_, _, path)| [TLS_CERT, TLS_KEY, CA_CERT].map(|f| path.join(f)))
        .collect();
    files.extend(bundle.map(Path::to_owned));
    files
        .into_iter()
        .map(|path| {
            let meta = fs::metadata(&path).ok();
            let modified = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let len = meta.map_or(0, |m| m.len());
            (path, modified, len)
        })
        .collect()
}

/// The URI SANs and expiry of a leaf certificate.
pub fn leaf_facts(cert: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let uris = parsed.valid_uri_names().map(str::to_owned).collect();
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let not_after = x509.validity().not_after.timestamp();
    let not_after =
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
    Ok((uris, not_after))
}
