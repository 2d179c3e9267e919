//! The services the stack itself offers at the gateway: a DHCPv4 server that
//! leases the sandbox's one guest address, and IPv6 router advertisements.
//! ARP and neighbour discovery for the gateway are smoltcp's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Duration as SmolDuration;
use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, Icmpv6Packet, Icmpv6Repr,
    IpProtocol, NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags,
    DHCP_CLIENT_PORT, DHCP_SERVER_PORT,
};

use crate::config::StackConfig;
use crate::wire::FrameBuilder;

/// Every sandbox keeps its one address for as long as it lives, so the lease is long.
const LEASE_SECS: u32 = 86_400;
const DHCP_OPT_DNS: u8 = 6;
const DHCP_OPT_MTU: u8 = 26;

/// Answer a DHCP message from the guest, if it needs an answer.
pub fn dhcp_reply(
    cfg: &StackConfig,
    gateway_mac: EthernetAddress,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let packet = DhcpPacket::new_checked(payload).ok()?;
    let request = DhcpRepr::parse(&packet).ok()?;
    let plan = &cfg.plan;
    let guest = plan.guest_v4;
    let reply_type = match request.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request => {
            let asked = request.requested_ip.unwrap_or(request.client_ip);
            let for_us = request
                .server_identifier
                .is_none_or(|id| id == plan.gateway_v4);
            if !for_us {
                return None;
            }
            if asked == guest {
                DhcpMessageType::Ack
            } else {
                DhcpMessageType::Nak
            }
        }
        _ => return None,
    };
    let mask = prefix_mask_v4(plan.prefix_v4);
    let dns = plan.dns_v4.octets();
    let mtu = (cfg.mtu.min(u16::MAX as usize) as u16).to_be_bytes();
    let options = [
        DhcpOption {
            kind: DHCP_OPT_DNS,
            data: &dns,
        },
        DhcpOption {
            kind: DHCP_OPT_MTU,
            data: &mtu,
        },
    ];
    let ack_like = reply_type != DhcpMessageType::Nak;
    let reply = DhcpRepr {
        message_type: reply_type,
        transaction_id: request.transaction_id,
        secs: 0,
        client_hardware_address: request.client_hardware_address,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: if ack_like {
            guest
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        server_ip: plan.gateway_v4,
        router: ack_like.then_some(plan.gateway_v4),
        subnet_mask: ack_like.then_some(mask),
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(plan.gateway_v4),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: ack_like.then_some(LEASE_SECS),
        renew_duration: ack_like.then_some(LEASE_SECS / 2),
        rebind_duration: ack_like.then_some(LEASE_SECS / 8 * 7),
        additional_options: if ack_like { &options } else { &[] },
    };
    let mut body = vec![0u8; reply.buffer_len()];
    reply
        .emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
        .ok()?;
    // A client with no address yet gets an IP broadcast (unicast at L2); a
    // renewing client (ciaddr set) listens on its address (RFC 2131 §4.1).
    let to = if request.client_ip.is_unspecified() {
        Ipv4Addr::BROADCAST
    } else {
        request.client_ip
    };
    let builder = FrameBuilder {
        gateway_mac,
        guest_mac: request.client_hardware_address,
    };
    builder.udp(
        SocketAddr::new(IpAddr::V4(plan.gateway_v4), DHCP_SERVER_PORT),
        SocketAddr::new(IpAddr::V4(to), DHCP_CLIENT_PORT),
        &body,
    )
}

fn prefix_mask_v4(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// A router advertisement for the sandbox's IPv6 prefix, to all nodes.
pub fn router_advert(cfg: &StackConfig, gateway_mac: EthernetAddress) -> Option<Vec<u8>> {
    let plan = &cfg.plan;
    let prefix_len = plan.prefix_v6.min(128);
    let prefix = Ipv6Addr::from(
        u128::from(plan.guest_v6)
            & u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0),
    );
    let repr = Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
        hop_limit: 64,
        flags: NdiscRouterFlags::empty(),
        router_lifetime: SmolDuration::from_secs(1800),
        reachable_time: SmolDuration::ZERO,
        retrans_time: SmolDuration::ZERO,
        lladdr: Some(gateway_mac.into()),
        mtu: u32::try_from(cfg.mtu).ok(),
        prefix_info: Some(NdiscPrefixInformation {
            prefix_len,
            flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
            valid_lifetime: SmolDuration::from_secs(86_400),
            preferred_lifetime: SmolDuration::from_secs(14_400),
            prefix,
        }),
    });
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let src = plan.gateway_v6_link_local;
    let builder = FrameBuilder {
        gateway_mac,
        guest_mac: EthernetAddress([0x33, 0x33, 0, 0, 0, 1]),
    };
    let mut frame = builder.raw_ip(
        IpAddr::V6(src),
        IpAddr::V6(all_nodes),
        IpProtocol::Icmpv6,
        repr.buffer_len(),
        255,
    )?;
    let at = frame.len() - repr.buffer_len();
    repr.emit(
        &src,
        &all_nodes,
        &mut Icmpv6Packet::new_unchecked(&mut frame[at..]),
        &ChecksumCapabilities::default(),
    );
    Some(frame)
}

/// A DNS query worth forwarding: a well-formed header, a query opcode, not a
/// response, at least one question whose name parses. Garbage is not relayed.
pub fn looks_like_dns_query(payload: &[u8]) -> bool {
    use smoltcp::wire::{DnsFlags, DnsOpcode, DnsPacket, DnsQuestion};
    let Ok(packet) = DnsPacket::new_checked(payload) else {
        return false;
    };
    if packet.flags().contains(DnsFlags::RESPONSE)
        || packet.opcode() != DnsOpcode::Query
        || packet.question_count() == 0
    {
        return false;
    }
    DnsQuestion::parse(packet.payload()).is_ok()
}
