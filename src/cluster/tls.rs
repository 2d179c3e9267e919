//! The cluster's own mTLS between edges and nodes: one CA for the cluster,
//! a server certificate per node whose name (SAN) is the node's name, a
//! client certificate per edge. Both sides trust nothing but the cluster
//! CA; ALPN says whether a connection is a tunnel or a liveness link (see
//! `tunnel`). Each side's own certificate is checked at start exactly as the
//! other side will check it, so a wrong file is a clear error at start
//! rather than a refused tunnel later. Nodes hand out TLS 1.3 session
//! tickets, so an edge's next tunnel resumes instead of a full handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ingress::NodeName;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::tunnel::{LIVENESS_ALPN, TUNNEL_ALPN};

/// Why the cluster's certificates cannot be used; each names its file.
#[derive(Debug, thiserror::Error)]
pub enum ClusterTlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate in {}", path.display())]
    Empty { key: &'static str, path: PathBuf },
    #[error("the CA {} is not usable: {source}", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate {} is not valid for node {node} under the cluster CA (it must be signed by the CA and name the node): {source}", path.display())]
    NodeCert {
        path: PathBuf,
        node: NodeName,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate {} is not a client certificate of the cluster CA: {source}", path.display())]
    EdgeCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate {} and its key do not go together: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

impl ClusterTlsError {
    /// The settings key the file came from.
    pub fn key(&self) -> &'static str {
        match self {
            ClusterTlsError::Read { key, .. } | ClusterTlsError::Empty { key, .. } => key,
            ClusterTlsError::Ca { .. } => "cluster.ca",
            ClusterTlsError::NodeCert { .. }
            | ClusterTlsError::EdgeCert { .. }
            | ClusterTlsError::Config { .. } => "cluster.cert",
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ClusterTlsError::Read { path, .. }
            | ClusterTlsError::Empty { path, .. }
            | ClusterTlsError::Ca { path, .. }
            | ClusterTlsError::NodeCert { path, .. }
            | ClusterTlsError::EdgeCert { path, .. }
            | ClusterTlsError::Config { path, .. } => path,
        }
    }
}

type Result<T> = std::result::Result<T, ClusterTlsError>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|source| ClusterTlsError::Read {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(ClusterTlsError::Empty {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| ClusterTlsError::Read {
        key: "cluster.key",
        path: path.to_owned(),
        source,
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for cert in certs("cluster.ca", ca)? {
        store.add(cert).map_err(|source| ClusterTlsError::Ca {
            path: ca.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(store))
}

/// The node's tunnel listener: its certificate (which must name `node` and
/// chain to the CA), and a client certificate of the CA required of every
/// peer.
pub fn node_server(
    ca: &Path,
    cert: &Path,
    key: &Path,
    node: &NodeName,
) -> Result<Arc<rustls::ServerConfig>> {
    let roots = roots(ca)?;
    let chain = certs("cluster.cert", cert)?;
    let name =
        ServerName::try_from(node.as_str().to_string()).map_err(|_| ClusterTlsError::NodeCert {
            path: cert.to_owned(),
            node: node.clone(),
            source: rustls::Error::General("not a DNS name".into()),
        })?;
    // What an edge will check: the chain to the CA, and the name.
    let as_edge_sees_it =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| ClusterTlsError::Ca {
                path: ca.to_owned(),
                source: rustls::Error::General(e.to_string()),
            })?;
    as_edge_sees_it
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map_err(|source| ClusterTlsError::NodeCert {
            path: cert.to_owned(),
            node: node.clone(),
            source,
        })?;
    let clients = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| ClusterTlsError::Ca {
            path: ca.to_owned(),
            source: rustls::Error::General(e.to_string()),
        })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| ClusterTlsError::Config {
            path: cert.to_owned(),
            source,
        })?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, private_key(key)?)
        .map_err(|source| ClusterTlsError::Config {
            path: cert.to_owned(),
            source,
        })?;
    cfg.alpn_protocols = vec![TUNNEL_ALPN.to_vec(), LIVENESS_ALPN.to_vec()];
    cfg.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|source| ClusterTlsError::Config {
            path: cert.to_owned(),
            source,
        })?;
    Ok(Arc::new(cfg))
}

/// The edge's side of the tunnels: the CA as the only root (a node is
/// checked by the name in the route, see `dial`), and this edge's client
/// certificate, which must chain to the CA. No ALPN yet: `dial` sets it per
/// kind of connection.
pub fn edge_client(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let roots = roots(ca)?;
    let chain = certs("cluster.cert", cert)?;
    // What a node will check.
    let as_node_sees_it = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| ClusterTlsError::Ca {
            path: ca.to_owned(),
            source: rustls::Error::General(e.to_string()),
        })?;
    as_node_sees_it
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|source| ClusterTlsError::EdgeCert {
            path: cert.to_owned(),
            source,
        })?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| ClusterTlsError::Config {
            path: cert.to_owned(),
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private_key(key)?)
        .map_err(|source| ClusterTlsError::Config {
            path: cert.to_owned(),
            source,
        })?;
    // Tunnels come and go: keep enough tickets for many at once.
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(4096);
    Ok(Arc::new(cfg))
}
