//! The gateway's own services: DHCP, ARP, NDP and router advertisements.
//! (The core driven from both ends: a smoltcp guest or hand-built frames on
//! the link, the test as the host driver, a fake clock.)

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use common::*;
use netstack::StackConfig;
use smoltcp::wire::{
    ArpOperation, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress, Icmpv6Packet,
    Icmpv6Repr, IpProtocol, NdiscPrefixInfoFlags, NdiscRepr,
};

/// The stack's one answer to a DHCP message, checked for its addressing.
#[track_caller]
fn dhcp_answer(p: &mut Pair, repr: &DhcpRepr) -> (DhcpMessageType, Ipv4Addr, Vec<u8>) {
    let out = p.inject(&dhcp_frame(repr));
    assert_eq!(out.len(), 1, "one DHCP answer");
    let udp = udp_of(&out[0]).expect("DHCP answer is UDP");
    assert_eq!(udp.dst_mac, GUEST_MAC);
    assert_eq!(udp.src, sock(GATEWAY_V4, 67));
    // A client with an address (a renewal) is answered there; others by broadcast.
    let to = if repr.client_ip.is_unspecified() {
        Ipv4Addr::BROADCAST
    } else {
        repr.client_ip
    };
    assert_eq!(udp.dst, sock(to, 68));
    let pkt = DhcpPacket::new_checked(&udp.payload[..]).unwrap();
    let reply = DhcpRepr::parse(&pkt).unwrap();
    assert_eq!(reply.transaction_id, repr.transaction_id);
    assert_eq!(reply.client_hardware_address, GUEST_MAC);
    assert_eq!(reply.server_identifier, Some(GATEWAY_V4));
    if reply.message_type != DhcpMessageType::Nak {
        assert_eq!(reply.router, Some(GATEWAY_V4));
        assert_eq!(reply.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        let dns = reply.dns_servers.as_deref().unwrap_or_default();
        assert_eq!(dns, [DNS_V4]);
        assert!(reply.lease_duration.is_some_and(|s| s > 0));
    }
    (reply.message_type, reply.your_ip, udp.payload)
}

#[test]
fn dhcp_discover_gets_offer_and_request_gets_ack() {
    let mut p = Pair::allow_all();
    let discover = dhcp_message(DhcpMessageType::Discover);
    let (kind, yiaddr, _) = dhcp_answer(&mut p, &discover);
    assert_eq!((kind, yiaddr), (DhcpMessageType::Offer, GUEST_V4));

    let request = DhcpRepr {
        requested_ip: Some(GUEST_V4),
        server_identifier: Some(GATEWAY_V4),
        ..dhcp_message(DhcpMessageType::Request)
    };
    let (kind, yiaddr, _) = dhcp_answer(&mut p, &request);
    assert_eq!((kind, yiaddr), (DhcpMessageType::Ack, GUEST_V4));

    // A renewal names the address as ciaddr instead.
    let renew = DhcpRepr {
        client_ip: GUEST_V4,
        ..dhcp_message(DhcpMessageType::Request)
    };
    let (kind, _, _) = dhcp_answer(&mut p, &renew);
    assert_eq!(kind, DhcpMessageType::Ack);

    let other = DhcpRepr {
        requested_ip: Some(Ipv4Addr::new(10, 0, 2, 99)),
        ..request.clone()
    };
    let (kind, yiaddr, _) = dhcp_answer(&mut p, &other);
    assert_eq!(
        (kind, yiaddr),
        (DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED)
    );

    // A request that chose another server is not ours to answer.
    let elsewhere = DhcpRepr {
        server_identifier: Some(Ipv4Addr::new(10, 0, 2, 1)),
        ..request
    };
    assert!(p.inject(&dhcp_frame(&elsewhere)).is_empty());
    assert!(
        p.requests.is_empty(),
        "DHCP reached the host: {:?}",
        p.requests
    );
}

/// RFC 2131 4.1: with ciaddr set (a renewal), the ACK is unicast to ciaddr;
/// a client renewing over a UDP socket bound to its address never sees a broadcast.
#[test]
fn dhcp_renewal_ack_is_unicast_to_ciaddr() {
    let mut p = Pair::allow_all();
    let renew = DhcpRepr {
        client_ip: GUEST_V4,
        ..dhcp_message(DhcpMessageType::Request)
    };
    let renew_frame = udp_frame(sock(GUEST_V4, 68), sock(GATEWAY_V4, 67), &{
        let mut body = vec![0; renew.buffer_len()];
        renew
            .emit(&mut DhcpPacket::new_checked(&mut body[..]).unwrap())
            .unwrap();
        body
    });
    let out = p.inject(&renew_frame);
    let udp = udp_of(&out[0]).expect("a DHCP answer");
    assert_eq!(udp.dst, sock(GUEST_V4, 68));
}

#[test]
fn arp_for_gateway_is_answered() {
    let mut p = Pair::allow_all();
    for target in [GATEWAY_V4, DNS_V4] {
        let out = p.inject(&arp_request(GUEST_V4, target));
        assert_eq!(out.len(), 1, "ARP for {target}");
        let (dst_mac, repr) = arp_of(&out[0]).expect("an ARP reply");
        assert_eq!(dst_mac, GUEST_MAC);
        let want = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: GATEWAY_MAC,
            source_protocol_addr: target,
            target_hardware_addr: GUEST_MAC,
            target_protocol_addr: GUEST_V4,
        };
        assert_eq!(repr, want);
    }
}

/// RFC 5227: a host that hears another MAC claim its address treats it as a conflict.
#[test]
fn arp_announcement_of_the_guest_address_is_not_claimed() {
    let mut p = Pair::allow_all();
    let out = p.inject(&arp_request(GUEST_V4, GUEST_V4));
    let claims: Vec<_> = out.iter().filter_map(|f| arp_of(f)).collect();
    assert!(
        claims.is_empty(),
        "the gateway claimed {GUEST_V4}: {claims:?}"
    );
}

fn neighbor_solicit(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let o = target.octets();
    let tail = u16::from_be_bytes([o[14], o[15]]);
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), tail);
    let lladdr = (!src.is_unspecified()).then(|| GUEST_MAC.into());
    let repr = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr,
    });
    let mac = EthernetAddress([0x33, 0x33, 0xff, o[13], o[14], o[15]]);
    let len = repr.buffer_len();
    ip_frame(
        mac,
        src.into(),
        dst.into(),
        IpProtocol::Icmpv6,
        255,
        len,
        |b| {
            let pkt = &mut Icmpv6Packet::new_unchecked(b);
            repr.emit(&src, &dst, pkt, &Default::default())
        },
    )
}

#[test]
fn neighbor_solicit_for_gateway_answered_but_guest_dad_is_not() {
    let mut p = Pair::allow_all();
    for (src, target) in [(GUEST_V6, GATEWAY_V6), (GUEST_V6_LL, GATEWAY_V6_LL)] {
        let out = p.inject(&neighbor_solicit(src, target));
        assert_eq!(out.len(), 1, "NS for {target}");
        let ip = ip_of(&out[0]).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.dst_mac),
            (target.into(), src.into(), GUEST_MAC)
        );
        let pkt = Icmpv6Packet::new_checked(&ip.payload[..]).unwrap();
        let repr = Icmpv6Repr::parse(&target, &src, &pkt, &Default::default()).unwrap();
        let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            target_addr,
            lladdr,
            ..
        }) = repr
        else {
            panic!("not a neighbour advert: {repr:?}");
        };
        assert_eq!((target_addr, lladdr), (target, Some(GATEWAY_MAC.into())));
    }
    // Duplicate address detection for the guest's own addresses must pass.
    for own in [GUEST_V6, GUEST_V6_LL] {
        let out = p.inject(&neighbor_solicit(Ipv6Addr::UNSPECIFIED, own));
        assert!(out.is_empty(), "the gateway defended {own}");
    }
}

#[test]
fn router_solicit_gets_advert_with_prefix() {
    let mut p = Pair::allow_all();
    let out = p.inject(&router_solicit());
    assert_eq!(out.len(), 1);
    let ip = ip_of(&out[0]).expect("an IPv6 frame");
    assert_eq!(ip.dst_mac, EthernetAddress([0x33, 0x33, 0, 0, 0, 1]));
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    assert_eq!((ip.src, ip.dst), (GATEWAY_V6_LL.into(), all_nodes.into()));
    assert_eq!(
        ip.hop_limit, 255,
        "RFC 4861 drops adverts with another hop limit"
    );
    let pkt = Icmpv6Packet::new_checked(&ip.payload[..]).unwrap();
    let repr = Icmpv6Repr::parse(&GATEWAY_V6_LL, &all_nodes, &pkt, &Default::default());
    let Ok(Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
        router_lifetime,
        lladdr,
        mtu,
        prefix_info,
        ..
    })) = repr
    else {
        panic!("not a router advert: {repr:?}");
    };
    assert!(router_lifetime.secs() > 0, "not a default router");
    assert_eq!(lladdr, Some(GATEWAY_MAC.into()));
    assert_eq!(mtu, Some(StackConfig::default().mtu as u32));
    let prefix = prefix_info.expect("a prefix option");
    assert_eq!(prefix.prefix, Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0));
    assert_eq!(prefix.prefix_len, 64);
    let flags = NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF;
    assert_eq!(prefix.flags, flags);
    assert!(prefix.valid_lifetime >= prefix.preferred_lifetime);
    assert!(prefix.preferred_lifetime.secs() > 0);
}
