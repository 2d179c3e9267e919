//! TLS to the real server: verified against Mozilla's roots (compiled in)
//! plus the operator's own CA bundle (`--upstream-ca`, serve's
//! `upstream_ca`), TLS 1.2 or 1.3, the name the guest asked for. No
//! fallback of any kind: a server that fails verification gets nothing.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use netstack::driver::UpstreamIo;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read the upstream CA bundle {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the upstream CA bundle {0} holds no PEM certificate")]
    Empty(String),
    #[error("the upstream CA bundle {path} holds a certificate rustls refuses")]
    BadCert {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the upstream TLS settings")]
    Config(#[source] rustls::Error),
}

/// What one interceptor offers the server in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    H2AndH1,
    H1,
    H2,
}

/// Client settings, one per ALPN offer, built once.
#[derive(Clone)]
pub struct UpstreamTls {
    configs: [Arc<ClientConfig>; 3],
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamTls")
    }
}

impl UpstreamTls {
    /// Mozilla's roots plus every certificate in `extra_ca` (PEM files).
    pub fn new(extra_ca: &[impl AsRef<Path>]) -> Result<UpstreamTls, UpstreamError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for path in extra_ca {
            let path = path.as_ref();
            let shown = path.display().to_string();
            let bytes = std::fs::read(path).map_err(|source| UpstreamError::Read {
                path: shown.clone(),
                source,
            })?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
                .filter_map(|c| c.ok())
                .collect();
            if certs.is_empty() {
                return Err(UpstreamError::Empty(shown));
            }
            for cert in certs {
                roots.add(cert).map_err(|source| UpstreamError::BadCert {
                    path: shown.clone(),
                    source,
                })?;
            }
        }
        let roots = Arc::new(roots);
        let config = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, UpstreamError> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut c = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(UpstreamError::Config)?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(UpstreamTls {
            configs: [
                config(&[b"h2", b"http/1.1"])?,
                config(&[b"http/1.1"])?,
                config(&[b"h2"])?,
            ],
        })
    }

    /// TLS to `name` over `io`, offering `offer` in ALPN.
    pub(crate) async fn connect(
        &self,
        name: &str,
        offer: Offer,
        io: std::pin::Pin<Box<dyn UpstreamIo>>,
    ) -> std::io::Result<TlsStream<std::pin::Pin<Box<dyn UpstreamIo>>>> {
        let config = match offer {
            Offer::H2AndH1 => &self.configs[0],
            Offer::H1 => &self.configs[1],
            Offer::H2 => &self.configs[2],
        };
        let server = ServerName::try_from(name.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        TlsConnector::from(config.clone()).connect(server, io).await
    }
}

/// Whether a failed handshake was the server's certificate failing
/// verification (counted apart: it may be an attack, or a missing CA).
pub(crate) fn is_verification_failure(e: &std::io::Error) -> bool {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    matches!(
        inner,
        Some(
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::InvalidCertRevocationList(_)
        )
    )
}
