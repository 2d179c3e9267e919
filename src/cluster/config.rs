//! The `[cluster]` sections: serve's (a node: its name, tunnel addresses,
//! lease) and edge's (the store, the staleness bound), as the file says them
//! and validated into what the process runs on. Certificates are checked
//! here, at start, the way the other side will check them: a node's must
//! name the node and chain to the cluster CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ingress::NodeName;
use serde::{Deserialize, Deserializer, Serialize};

use super::tls;
use crate::serve::config::{ConfigError, Result};
use crate::serve::settings::{in_range, listen_addr, seconds, value};

/// The store's endpoints: one string (comma-separated) or a list.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Endpoints {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Endpoints::deserialize(d)? {
        Endpoints::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        Endpoints::Many(v) => v,
    })
}

/// serve's `[cluster]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeClusterFile {
    /// etcd endpoints, `http://HOST:PORT`; empty: cluster mode off.
    #[serde(deserialize_with = "one_or_many")]
    pub store: Vec<String>,
    /// This node's name: the SAN of its tunnel certificate.
    pub node: String,
    /// Where edges reach this node's tunnel listener, `IP:PORT`.
    pub advertise: String,
    /// Where the tunnel listener binds.
    pub listen: String,
    /// The cluster's CA (PEM): edges' client certificates must chain to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// This node's certificate chain (PEM), naming `node`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Seconds the node's lease outlives its last keep-alive.
    pub lease_ttl: u64,
}

impl Default for NodeClusterFile {
    fn default() -> Self {
        Self {
            store: Vec::new(),
            node: String::new(),
            advertise: String::new(),
            listen: "0.0.0.0:7443".into(),
            ca: None,
            cert: None,
            key: None,
            lease_ttl: 10,
        }
    }
}

/// A node's cluster settings, validated.
#[derive(Clone)]
pub struct NodeCluster {
    pub store: Vec<String>,
    pub node: NodeName,
    pub advertise: SocketAddr,
    pub listen: SocketAddr,
    pub lease_ttl: Duration,
    /// The tunnel listener's TLS: this node's certificate, edges' required.
    pub tls: Arc<rustls::ServerConfig>,
    /// The files read, for confinement (a reload reads them again).
    pub files: Vec<PathBuf>,
}

impl NodeClusterFile {
    /// `None` when `store` is empty: this serve is no cluster's node.
    pub fn validate(&self) -> Result<Option<NodeCluster>> {
        if self.store.is_empty() {
            return Ok(None);
        }
        let store = endpoints(&self.store)?;
        let node = NodeName::parse(&self.node).map_err(|e| {
            value(
                "cluster.node",
                &self.node,
                &format!("{e} (the name its tunnel certificate carries)"),
            )
        })?;
        let advertise = self
            .advertise
            .parse::<SocketAddr>()
            .ok()
            .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
            .ok_or_else(|| {
                value(
                    "cluster.advertise",
                    &self.advertise,
                    "give the IP:PORT where edges reach this node's tunnel listener",
                )
            })?;
        let listen = listen_addr("cluster.listen", &self.listen)?.ok_or_else(|| {
            value(
                "cluster.listen",
                &self.listen,
                "give ADDR:PORT: a node needs its tunnel listener",
            )
        })?;
        let lease_ttl = in_range("cluster.lease_ttl", self.lease_ttl, 2, 600)?;
        let (ca, cert, key) = files("cluster", &self.ca, &self.cert, &self.key)?;
        let tls = tls::node_server(ca, cert, key, &node).map_err(|e| tls_error(&e))?;
        Ok(Some(NodeCluster {
            store,
            node,
            advertise,
            listen,
            lease_ttl: Duration::from_secs(lease_ttl as u64),
            tls,
            files: [ca, cert, key].map(Path::to_path_buf).to_vec(),
        }))
    }
}

/// edge's `[cluster]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeClusterFile {
    /// etcd endpoints, `http://HOST:PORT`.
    #[serde(deserialize_with = "one_or_many")]
    pub store: Vec<String>,
    /// The cluster's CA (PEM): nodes' certificates must chain to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// This edge's client certificate chain (PEM) and key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Seconds without word from the store after which private sandboxes
    /// are refused (503): their tokens may have been rotated meanwhile.
    pub stale_after: f64,
    /// Connections at once into one sandbox through this edge (over it: 429).
    pub max_inbound: u64,
}

impl Default for EdgeClusterFile {
    fn default() -> Self {
        Self {
            store: Vec::new(),
            ca: None,
            cert: None,
            key: None,
            stale_after: 30.0,
            max_inbound: 256,
        }
    }
}

/// An edge's cluster settings, validated.
#[derive(Clone)]
pub struct EdgeCluster {
    pub store: Vec<String>,
    /// The tunnels' TLS: the cluster CA as the only root, this edge's certificate.
    pub tls: Arc<rustls::ClientConfig>,
    pub stale_after: Duration,
    pub max_inbound: usize,
}

impl EdgeClusterFile {
    pub fn validate(&self) -> Result<EdgeCluster> {
        if self.store.is_empty() {
            return Err(value(
                "cluster.store",
                "",
                "give the cluster store's endpoints, e.g. http://127.0.0.1:2379",
            ));
        }
        let store = endpoints(&self.store)?;
        let (ca, cert, key) = files("cluster", &self.ca, &self.cert, &self.key)?;
        let tls = tls::edge_client(ca, cert, key).map_err(|e| tls_error(&e))?;
        Ok(EdgeCluster {
            store,
            tls,
            stale_after: seconds("cluster.stale_after", self.stale_after)?,
            max_inbound: in_range("cluster.max_inbound", self.max_inbound, 1, 65536)?,
        })
    }
}

/// Each endpoint `http://HOST:PORT`: etcd's client URL.
fn endpoints(given: &[String]) -> Result<Vec<String>> {
    given
        .iter()
        .map(|e| {
            let uri = e.parse::<hyper::Uri>().ok();
            let ok = uri.as_ref().is_some_and(|u| {
                u.scheme_str() == Some("http")
                    && u.authority().is_some_and(|a| a.port_u16().is_some())
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none()
            });
            if ok {
                Ok(e.trim_end_matches('/').to_string())
            } else {
                Err(value(
                    "cluster.store",
                    e,
                    "give http://HOST:PORT (an etcd client URL; https is not supported yet)",
                ))
            }
        })
        .collect()
}

fn files<'a>(
    section: &'static str,
    ca: &'a Option<PathBuf>,
    cert: &'a Option<PathBuf>,
    key: &'a Option<PathBuf>,
) -> Result<(&'a Path, &'a Path, &'a Path)> {
    let need = |f: &'a Option<PathBuf>, key: &'static str| {
        f.as_deref().ok_or_else(|| {
            value(
                key,
                "",
                &format!("{section} mode needs the cluster's ca, cert and key (PEM files)"),
            )
        })
    };
    Ok((
        need(ca, "cluster.ca")?,
        need(cert, "cluster.cert")?,
        need(key, "cluster.key")?,
    ))
}

fn tls_error(e: &tls::ClusterTlsError) -> ConfigError {
    value(e.key(), &e.path().display().to_string(), &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_etcd_client_urls() {
        assert_eq!(
            endpoints(&["http://127.0.0.1:2379/".into(), "http://etcd-1:2379".into()]).unwrap(),
            ["http://127.0.0.1:2379", "http://etcd-1:2379"]
        );
        for bad in [
            "127.0.0.1:2379",
            "https://127.0.0.1:2379",
            "http://127.0.0.1",
            "http://127.0.0.1:2379/v3",
            "http://[::1:2379",
            "",
        ] {
            let err = endpoints(&[bad.into()]).unwrap_err().to_string();
            assert!(err.contains("cluster.store"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_store_is_one_string_or_a_list() {
        let f: NodeClusterFile = toml::from_str("store = \"http://a:1, http://b:2\"\n").unwrap();
        assert_eq!(f.store, ["http://a:1", "http://b:2"]);
        let f: NodeClusterFile = toml::from_str("store = [\"http://a:1\"]\n").unwrap();
        assert_eq!(f.store, ["http://a:1"]);
        assert!(NodeClusterFile::default().validate().unwrap().is_none());
    }

    #[test]
    fn every_node_key_is_also_an_environment_variable() {
        let env = |var: &str| {
            Some(
                match var {
                    "SLIPWAY_CLUSTER_STORE" => "http://10.0.0.1:2379, http://10.0.0.2:2379",
                    "SLIPWAY_CLUSTER_NODE" => "host-a",
                    "SLIPWAY_CLUSTER_ADVERTISE" => "10.1.2.3:7443",
                    "SLIPWAY_CLUSTER_LISTEN" => "10.1.2.3:7443",
                    "SLIPWAY_CLUSTER_CA" => "/etc/slipway/ca.pem",
                    "SLIPWAY_CLUSTER_CERT" => "/etc/slipway/host-a.pem",
                    "SLIPWAY_CLUSTER_KEY" => "/etc/slipway/host-a-key.pem",
                    "SLIPWAY_CLUSTER_LEASE_TTL" => "5",
                    _ => return None,
                }
                .to_string(),
            )
        };
        let f = crate::serve::config::load(None, &env).unwrap().cluster;
        assert_eq!(f.store, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!((f.node.as_str(), f.lease_ttl), ("host-a", 5));
        assert_eq!(f.listen, "10.1.2.3:7443");
        assert_eq!(
            f.key.as_deref(),
            Some(Path::new("/etc/slipway/host-a-key.pem"))
        );
        let bad = |var: &str| (var == "SLIPWAY_CLUSTER_LEASE_TTL").then(|| "ten".to_string());
        let err = crate::serve::config::load(None, &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("SLIPWAY_CLUSTER_LEASE_TTL"), "{err}");
    }

    #[test]
    fn a_node_names_itself_and_its_address() {
        let base = NodeClusterFile {
            store: vec!["http://127.0.0.1:2379".into()],
            node: "host-a".into(),
            advertise: "10.1.2.3:7443".into(),
            ..Default::default()
        };
        let err = |f: NodeClusterFile| f.validate().err().unwrap().to_string();
        assert!(err(NodeClusterFile {
            node: "Host A".into(),
            ..base.clone()
        })
        .contains("cluster.node"));
        for bad in ["", "0.0.0.0:7443", "10.1.2.3", "10.1.2.3:0", "host:7443"] {
            let e = err(NodeClusterFile {
                advertise: bad.into(),
                ..base.clone()
            });
            assert!(e.contains("cluster.advertise"), "{bad}: {e}");
        }
        assert!(err(NodeClusterFile {
            lease_ttl: 1,
            ..base.clone()
        })
        .contains("cluster.lease_ttl"));
        assert!(err(base).contains("cluster.ca"));
    }
}
