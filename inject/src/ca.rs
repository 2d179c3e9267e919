//! A sandbox's own certificate authority: made when the sandbox is made
//! (ECDSA P-256, rcgen), its private key kept in this process's memory
//! only. It signs a leaf certificate for each name the interceptor answers
//! as; leaves are cached per name, a bounded number of them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// Leaf certificates kept per sandbox; the oldest goes first.
pub const MAX_CACHED_LEAVES: usize = 64;
/// A leaf is valid this long, and made anew when half of it has passed.
const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// The CA lives as long as its sandbox; ten years is "for good".
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clocks in guests drift: certificates start an hour in the past.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot make the sandbox's CA")]
    Make(#[source] rcgen::Error),
    #[error("cannot make a certificate for {name}")]
    Leaf {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot load the certificate key for {0}")]
    Key(String),
}

struct Leaf {
    key: Arc<CertifiedKey>,
    made: Instant,
}

pub struct SandboxCa {
    cert: Certificate,
    key: KeyPair,
    pem: String,
    leaves: Mutex<(HashMap<String, Leaf>, VecDeque<String>)>,
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa").finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// A new CA named for `sandbox` (its id, shown in the subject).
    pub fn new(sandbox: &str) -> Result<SandboxCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Make)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "slipway");
        dn.push(
            DnType::CommonName,
            format!("slipway sandbox CA {}", crate::rules::echo(sandbox)),
        );
        params.distinguished_name = dn;
        // It signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key).map_err(CaError::Make)?;
        let pem = cert.pem();
        Ok(SandboxCa {
            cert,
            key,
            pem,
            leaves: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    /// The CA certificate, PEM, for the guest to trust.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        self.cert.der()
    }

    /// A leaf for `name` (canonical), from the cache or made now.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let mut guard = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        let (cache, order) = &mut *guard;
        if let Some(leaf) = cache.get(name) {
            if leaf.made.elapsed() < LEAF_LIFETIME / 2 {
                return Ok(leaf.key.clone());
            }
        }
        let key = self.make_leaf(name)?;
        if cache
            .insert(
                name.to_string(),
                Leaf {
                    key: key.clone(),
                    made: Instant::now(),
                },
            )
            .is_none()
        {
            order.push_back(name.to_string());
        }
        while order.len() > MAX_CACHED_LEAVES {
            if let Some(old) = order.pop_front() {
                cache.remove(&old);
            }
        }
        Ok(key)
    }

    pub fn cached_leaves(&self) -> usize {
        let guard = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.len()
    }

    fn make_leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let leaf_err = |source| CaError::Leaf {
            name: name.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(leaf_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let dns = name.to_string().try_into().map_err(leaf_err)?;
        params.subject_alt_names = vec![SanType::DnsName(dns)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(leaf_err)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&der)
            .map_err(|_| CaError::Key(name.to_string()))?;
        let chain = vec![cert.der().clone(), self.cert.der().clone()];
        Ok(Arc::new(CertifiedKey::new(chain, signer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn leaves_chain_to_the_ca_and_verify_for_their_name_only() {
        let ca = SandboxCa::new("sbx1").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let leaf = ca.leaf("api.example.test").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let name = |n: &str| rustls_pki_types::ServerName::try_from(n.to_string()).unwrap();
        let check = |n: &str| {
            verifier.verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name(n), &[], now)
        };
        assert!(check("api.example.test").is_ok());
        assert!(check("other.example.test").is_err());
    }

    #[test]
    fn leaves_are_cached_per_name_and_the_cache_is_bounded() {
        let ca = SandboxCa::new("sbx1").unwrap();
        let a = ca.leaf("a.test").unwrap();
        assert!(Arc::ptr_eq(&a, &ca.leaf("a.test").unwrap()));
        for i in 0..MAX_CACHED_LEAVES + 5 {
            ca.leaf(&format!("n{i}.test")).unwrap();
        }
        assert_eq!(ca.cached_leaves(), MAX_CACHED_LEAVES);
        assert!(!Arc::ptr_eq(&a, &ca.leaf("a.test").unwrap()));
    }

    #[test]
    fn every_sandbox_gets_its_own_ca() {
        let one = SandboxCa::new("a").unwrap();
        let two = SandboxCa::new("a").unwrap();
        assert_ne!(one.cert_pem(), two.cert_pem());
    }
}
