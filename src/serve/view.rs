//! What the control API answers with: a sandbox, its transport, its guest
//! addresses, its network as asked, and its counters. Field names are E2B's
//! where E2B has one.

use serde::Serialize;

/// A sandbox as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxView {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    pub transport: TransportView,
    pub guest: GuestView,
    pub allow_internet_access: bool,
    pub network: NetworkView,
    /// On create (and rotate) only, and only for private sandboxes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
    /// On create only: the sandbox's CA certificate (PEM), which signs what
    /// the guest sees on connections its header rules apply to; also at
    /// `GET /sandboxes/{id}/ca.pem`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// `GET /sandboxes/{id}` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<CountersView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransportView {
    pub kind: &'static str,
    pub detail: String,
    /// `running`, `stopped` or `failed: <why>`.
    pub state: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestView {
    pub ipv4: String,
    pub gateway_v4: String,
    pub dns_v4: String,
    pub ipv6: String,
    pub gateway_v6: String,
    pub dns_v6: String,
    pub mtu: usize,
}

/// E2B's `SandboxNetworkInfo`: every list present (`[]`, never null), no
/// secret ever.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkView {
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
    /// In force: as asked, or the default (8.8.8.8) when not given.
    pub dns_servers: Vec<String>,
    /// Absent when flows connect directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<EgressProxyView>,
    pub allow_public_traffic: bool,
    pub mask_request_host: Option<String>,
    pub https_ports: Vec<u16>,
    /// E2B's `rules`, as written (placeholders, never a secret); absent
    /// when there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
}

/// E2B's `SandboxEgressProxyInfo`: where the proxy is and who logs in,
/// never the password or the CA.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressProxyView {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ProxyTlsView>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTlsView {
    /// The name the proxy's certificate is checked against.
    pub server_name: String,
}

impl From<&netstack::EgressProxy> for EgressProxyView {
    fn from(p: &netstack::EgressProxy) -> Self {
        Self {
            address: p.address().to_string(),
            username: p.username().map(str::to_string),
            tls: p
                .tls_server_name()
                .map(|server_name| ProxyTlsView { server_name }),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CountersView {
    pub tcp_flows: usize,
    pub datagram_flows: usize,
    pub tcp_allowed: u64,
    pub tcp_denied: u64,
    pub datagram_allowed: u64,
    pub datagram_denied: u64,
    pub caps_hit: u64,
    pub frames_dropped: u64,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    /// Times this sandbox's stack panicked and was made anew (flows reset).
    pub stack_panics: u64,
    /// TCP buffers (two per flow) new flows took from short flows that
    /// ended cleanly, instead of new memory.
    pub tcp_buffers_reused: u64,
    /// The filtering resolver (names in allowOut): queries forwarded and
    /// blocked, answers rewritten without internal addresses, flows a DNS
    /// pin allowed.
    pub dns_forwarded: u64,
    pub dns_blocked: u64,
    pub dns_answers_rewritten: u64,
    pub pinned_flows: u64,
    /// Flows allowed by the name in their TLS SNI / HTTP Host (the host
    /// dialed the name), and flows reset because their first bytes named
    /// no allowed host (`fronting_refused`: of those, on a pinned address).
    pub sni_flows: u64,
    pub host_flows: u64,
    pub name_refused: u64,
    pub fronting_refused: u64,
    /// Header rules: TLS flows intercepted, requests given a rule's
    /// headers, requests answered 421 (their Host was not the SNI), servers
    /// whose certificate failed verification, requests refused because a
    /// secret was not set.
    pub intercepted_flows: u64,
    pub requests_transformed: u64,
    pub requests_misdirected: u64,
    pub upstream_unverified: u64,
    pub upstream_failed: u64,
    pub missing_secret: u64,
}

impl CountersView {
    pub fn new(s: &netstack::driver::Snapshot, inject: inject::InjectCounts) -> Self {
        Self {
            tcp_flows: s.tcp_flows,
            datagram_flows: s.datagram_flows,
            tcp_allowed: s.stats.tcp_allowed,
            tcp_denied: s.stats.tcp_denied,
            datagram_allowed: s.stats.datagram_allowed,
            datagram_denied: s.stats.datagram_denied,
            caps_hit: s.stats.caps_hit,
            frames_dropped: s.stats.frames_dropped,
            bytes_to_host: s.stats.bytes_to_host,
            bytes_to_guest: s.stats.bytes_to_guest,
            stack_panics: s.stats.stack_panics,
            tcp_buffers_reused: s.stats.tcp_buffers_reused,
            dns_forwarded: s.stats.dns_forwarded,
            dns_blocked: s.stats.dns_blocked,
            dns_answers_rewritten: s.stats.dns_answers_rewritten,
            pinned_flows: s.stats.pinned_flows,
            sni_flows: s.stats.sni_flows,
            host_flows: s.stats.host_flows,
            name_refused: s.stats.name_refused,
            fronting_refused: s.stats.fronting_refused,
            intercepted_flows: s.stats.intercepted_flows,
            requests_transformed: inject.transformed,
            requests_misdirected: inject.misdirected,
            upstream_unverified: inject.upstream_unverified,
            upstream_failed: inject.upstream_failed,
            missing_secret: inject.missing_secret,
        }
    }
}
