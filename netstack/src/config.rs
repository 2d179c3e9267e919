//! The address plan and the per-sandbox limits of one stack.
//!
//! The default plan is the same in every sandbox so that snapshots stay
//! portable: guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3, fd00::/64.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Where the guest and the stack's own services live on the sandbox's link.
#[derive(Debug, Clone)]
pub struct AddressPlan {
    /// The MAC the stack answers with (gateway, DNS, every relayed peer).
    pub gateway_mac: [u8; 6],
    pub guest_v4: Ipv4Addr,
    pub prefix_v4: u8,
    pub gateway_v4: Ipv4Addr,
    pub dns_v4: Ipv4Addr,
    pub guest_v6: Ipv6Addr,
    pub prefix_v6: u8,
    pub gateway_v6: Ipv6Addr,
    /// Router advertisements must come from a link-local address.
    pub gateway_v6_link_local: Ipv6Addr,
    pub dns_v6: Ipv6Addr,
}

impl Default for AddressPlan {
    fn default() -> Self {
        Self {
            gateway_mac: [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02],
            guest_v4: Ipv4Addr::new(10, 0, 2, 15),
            prefix_v4: 24,
            gateway_v4: Ipv4Addr::new(10, 0, 2, 2),
            dns_v4: Ipv4Addr::new(10, 0, 2, 3),
            guest_v6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15),
            prefix_v6: 64,
            gateway_v6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2),
            gateway_v6_link_local: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2),
            dns_v6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3),
        }
    }
}

impl AddressPlan {
    /// Addresses that belong to the stack itself rather than to a relayed peer.
    pub fn is_own(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => a == self.gateway_v4 || a == self.dns_v4,
            IpAddr::V6(a) => {
                a == self.gateway_v6 || a == self.gateway_v6_link_local || a == self.dns_v6
            }
        }
    }

    /// The gateway address of `addr`'s family: the source of ICMP errors.
    pub fn gateway_for(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => IpAddr::V4(self.gateway_v4),
            IpAddr::V6(_) => IpAddr::V6(self.gateway_v6),
        }
    }

    pub fn is_dns(&self, addr: IpAddr) -> bool {
        addr == IpAddr::V4(self.dns_v4) || addr == IpAddr::V6(self.dns_v6)
    }
}

/// Everything a guest can make the stack allocate is bounded by one of these.
#[derive(Debug, Clone)]
pub struct Caps {
    /// Open TCP flows, in any state.
    pub max_tcp_flows: usize,
    /// TCP flows whose host connect has not finished yet.
    pub max_half_open: usize,
    /// Bytes of TCP socket buffers, both directions, all flows together.
    pub max_buffer_bytes: usize,
    /// UDP, DNS and ICMP echo flows together.
    pub max_datagram_flows: usize,
    /// Frames queued for the guest before the stack stops reading host
    /// sockets; past it (or `max_queued_bytes`) frames for the guest wait
    /// (TCP) or are dropped and counted.
    pub max_queued_frames: usize,
    /// Bytes of frames queued for the guest.
    pub max_queued_bytes: usize,
    /// Connections into the guest from the public gateway.
    pub max_inbound: usize,
    /// Addresses pinned by DNS answers for allowed names (oldest dropped first).
    pub max_pins: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            max_tcp_flows: 512,
            max_half_open: 128,
            max_buffer_bytes: 256 << 20,
            max_datagram_flows: 512,
            max_queued_frames: 1024,
            max_queued_bytes: 8 << 20,
            max_inbound: 256,
            max_pins: 4096,
        }
    }
}

/// What the link to the guest does for the stack beyond carrying whole,
/// checksummed frames: the offloads a virtio-net header can express (a tap
/// opened with IFF_VNET_HDR, a vhost-user device that negotiated them). The
/// driver sets them from its link with `Stack::set_offloads`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// The link fills in the TCP checksum of every frame to the guest (or
    /// marks it for the guest's kernel to fill), so the stack leaves it zero.
    pub tx_checksum: bool,
    /// The link takes TCP segments to the guest of up to 64 KiB whatever the
    /// MTU and marks them for segmentation (TSO): the stack sends such
    /// segments instead of MTU-sized ones. Needs `tx_checksum`.
    pub tso: bool,
}

/// One sandbox's stack settings.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub plan: AddressPlan,
    /// IP MTU of the sandbox link.
    pub mtu: usize,
    /// Receive and send buffer of each TCP flow, per direction.
    pub tcp_buffer: usize,
    pub connect_timeout: Duration,
    pub udp_idle_timeout: Duration,
    pub dns_timeout: Duration,
    /// The resolver that DNS queries to the stack's DNS address are forwarded to.
    pub dns_upstream: Option<SocketAddr>,
    /// E2B's `dnsServers`: under a policy that holds names, queries the guest
    /// sends to these addresses on port 53 are answered by the stack's
    /// filtering resolver, as if sent to its own DNS address; they are never
    /// opened as destinations. E2B's default is 8.8.8.8; empty: none.
    pub dns_servers: Vec<IpAddr>,
    /// Guest-visible addresses that the operator maps to the host's loopback.
    pub host_loopback_aliases: Vec<IpAddr>,
    pub caps: Caps,
    /// Seed for TCP initial sequence numbers.
    pub random_seed: u64,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            plan: AddressPlan::default(),
            mtu: 65520,
            tcp_buffer: 256 << 10,
            connect_timeout: Duration::from_secs(10),
            udp_idle_timeout: Duration::from_secs(60),
            dns_timeout: Duration::from_secs(10),
            dns_upstream: None,
            dns_servers: vec![IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8))],
            host_loopback_aliases: Vec::new(),
            caps: Caps::default(),
            random_seed: 0x5eed,
        }
    }
}

impl StackConfig {
    /// The host address a guest-visible loopback alias stands for.
    pub fn host_loopback_for(&self, dst: IpAddr) -> Option<IpAddr> {
        if !self.host_loopback_aliases.contains(&dst) {
            return None;
        }
        Some(match dst {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        })
    }
}
