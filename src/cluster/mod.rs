//! Many hosts behind one public domain, on an etcd cluster store. A `serve`
//! with a `[cluster]` section is a node: it holds a lease and publishes a
//! record per sandbox (`node`), and serves tunnels to them (`tunnel`).
//! `slipway edge` is the public gateway for all of them: a watch keeps its
//! route table (`routes`), and a request goes to the owning node through an
//! mTLS tunnel (`dial`), with the local gateway's code doing the rest.
//! What the store holds, and its parser, is `ingress::record`.

pub mod config;
pub mod dial;
pub mod node;
pub mod routes;
pub mod store;
pub mod tls;
pub mod tunnel;

use std::sync::atomic::Ordering::Relaxed;

use crate::serve::metrics::Family;

/// serve's cluster metrics: the lease, what is published, the store's
/// errors and the tunnels edges asked for.
pub fn node_families(node: &node::ClusterNode, tunnels: &tunnel::TunnelStats) -> String {
    let mut lease = Family::new(
        "slipway_cluster_lease_held",
        "gauge",
        "1 while this node holds a lease in the cluster store.",
    );
    lease.sample(
        "slipway_cluster_lease_held",
        &format!("node=\"{}\"", node.name()),
        u8::from(node.lease_id().is_some()),
    );
    let mut published = Family::new(
        "slipway_cluster_published_sandboxes",
        "gauge",
        "Sandboxes this node publishes in the cluster store.",
    );
    published.sample("slipway_cluster_published_sandboxes", "", node.published());
    let s = &node.stats;
    let mut counters = String::new();
    for (name, help, n) in [
        (
            "slipway_cluster_store_errors_total",
            "Cluster store calls that failed or timed out.",
            s.store_errors.load(Relaxed),
        ),
        (
            "slipway_cluster_leases_granted_total",
            "Leases taken (more than one: the lease was lost and everything published again).",
            s.leases_granted.load(Relaxed),
        ),
        (
            "slipway_cluster_claims_taken_total",
            "Creates refused because another node holds the id (409).",
            s.claims_taken.load(Relaxed),
        ),
        (
            "slipway_cluster_ids_lost_total",
            "Sandboxes served here whose id another node claimed while this node's lease was gone.",
            s.ids_lost.load(Relaxed),
        ),
    ] {
        let mut f = Family::new(name, "counter", help);
        f.sample(name, "", n);
        counters.push_str(&f.text);
    }
    let mut by = Family::new(
        "slipway_cluster_tunnels_total",
        "counter",
        "Tunnels edges asked this node for, by outcome.",
    );
    for o in tunnel::Outcome::ALL {
        by.sample(
            "slipway_cluster_tunnels_total",
            &format!("outcome=\"{}\"", o.name()),
            tunnels.get(o),
        );
    }
    let mut links = Family::new(
        "slipway_cluster_tunnel_links_refused_total",
        "counter",
        "Tunnel connections closed at once (over the cap) or whose TLS handshake failed, by reason.",
    );
    links.sample(
        "slipway_cluster_tunnel_links_refused_total",
        "reason=\"over_cap\"",
        tunnels.links_refused.load(Relaxed),
    );
    links.sample(
        "slipway_cluster_tunnel_links_refused_total",
        "reason=\"tls\"",
        tunnels.handshakes_failed.load(Relaxed),
    );
    [lease.text, published.text, counters, by.text, links.text].concat()
}
