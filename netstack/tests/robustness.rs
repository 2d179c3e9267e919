//! Garbage frames of every kind never panic the core, and what it sends
//! stays well formed.
//! (The core driven from both ends: a smoltcp guest or hand-built frames on
//! the link, the test as the host driver, a fake clock.)

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use netstack::wire::RxMeta;
use netstack::{Caps, ConnectError, FlowId, HostEvent, HostRequest, StackConfig};
use smoltcp::wire::{
    DhcpMessageType, DhcpRepr, EthernetFrame, EthernetProtocol, Icmpv4Packet, Icmpv6Packet,
    IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpControl, TcpPacket, UdpPacket,
};

/// Valid frames of every kind the stack parses, for mutation.
fn seed_frames() -> Vec<Vec<u8>> {
    let g4 = |port| sock(GUEST_V4, port);
    let g6 = |port| sock(GUEST_V6, port);
    let dns = sock(DNS_V4, 53);
    let mut seeds = vec![
        tcp_syn(g4(40_000), peer(), 1),
        tcp_syn(g4(40_001), sock(Ipv4Addr::new(198, 51, 100, 1), 443), 1),
        tcp_syn(g4(40_002), sock(GATEWAY_V4, 22), 1),
        tcp_syn(g6(40_003), sock(PEER_V6, 443), 1),
        tcp_syn(g4(40_004), sock(Ipv4Addr::new(10, 9, 9, 9), 80), 1),
        tcp_frame(g4(40_000), peer(), TcpControl::None, 2, Some(1), b"data"),
        tcp_frame(g4(40_000), peer(), TcpControl::Fin, 2, Some(1), &[]),
        tcp_frame(g4(40_000), peer(), TcpControl::Rst, 2, Some(1), &[]),
        tcp_frame(
            g6(40_003),
            sock(PEER_V6, 443),
            TcpControl::Psh,
            2,
            Some(1),
            b"x",
        ),
        udp_frame(g4(40_100), sock(PEER_V4, 7), b"udp payload"),
        udp_frame(g6(40_101), sock(PEER_V6, 7), b"udp payload"),
        udp_frame(g4(40_102), dns, &dns_query(7, "example.com")),
        udp_frame(
            g4(40_103),
            sock(Ipv4Addr::new(198, 51, 100, 9), 123),
            &[0; 48],
        ),
        udp_frame(
            g4(40_104),
            sock(Ipv4Addr::new(224, 0, 0, 251), 5353),
            b"mdns",
        ),
        echo_request(GUEST_V4.into(), PEER_V4.into(), 9, 1, b"ping"),
        echo_request(GUEST_V4.into(), GATEWAY_V4.into(), 9, 1, b"ping"),
        echo_request(GUEST_V6.into(), PEER_V6.into(), 9, 1, b"ping"),
        arp_request(GUEST_V4, GATEWAY_V4),
        router_solicit(),
        dhcp_frame(&dhcp_message(DhcpMessageType::Discover)),
        dhcp_frame(&DhcpRepr {
            requested_ip: Some(GUEST_V4),
            ..dhcp_message(DhcpMessageType::Request)
        }),
    ];
    seeds.push(udp_frame(g4(40_105), sock(PEER_V4, 9), &[0xab; 1400]));
    seeds
}

/// Recompute IP and L4 checksums after a mutation, so it gets past them.
fn fix_checksums(frame: &mut [u8]) {
    let Ok(eth) = EthernetFrame::new_checked(&*frame) else {
        return;
    };
    let ethertype = eth.ethertype();
    let ip = &mut frame[14..];
    let (src, dst, proto, l4): (IpAddress, IpAddress, _, &mut [u8]) = match ethertype {
        EthernetProtocol::Ipv4 => {
            let Ok(mut pkt) = Ipv4Packet::new_checked(&mut *ip) else {
                return;
            };
            pkt.fill_checksum();
            let (s, d, proto) = (pkt.src_addr(), pkt.dst_addr(), pkt.next_header());
            let (hl, tl) = (pkt.header_len() as usize, pkt.total_len() as usize);
            (s.into(), d.into(), proto, &mut ip[hl..tl])
        }
        EthernetProtocol::Ipv6 => {
            let Ok(pkt) = Ipv6Packet::new_checked(&*ip) else {
                return;
            };
            let (s, d, proto) = (pkt.src_addr(), pkt.dst_addr(), pkt.next_header());
            let len = pkt.payload_len() as usize;
            (s.into(), d.into(), proto, &mut ip[40..40 + len])
        }
        _ => return,
    };
    match (proto, src, dst) {
        (IpProtocol::Tcp, _, _) => {
            if let Ok(mut t) = TcpPacket::new_checked(l4) {
                t.fill_checksum(&src, &dst);
            }
        }
        (IpProtocol::Udp, _, _) => {
            if let Ok(mut u) = UdpPacket::new_checked(l4) {
                u.fill_checksum(&src, &dst);
            }
        }
        (IpProtocol::Icmp, _, _) => {
            if let Ok(mut i) = Icmpv4Packet::new_checked(l4) {
                i.fill_checksum();
            }
        }
        (IpProtocol::Icmpv6, IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            if let Ok(mut i) = Icmpv6Packet::new_checked(l4) {
                i.fill_checksum(&s, &d);
            }
        }
        _ => {}
    }
}

/// Every frame the stack sends parses, with correct checksums.
#[track_caller]
fn assert_well_formed(frame: &[u8]) {
    let eth = EthernetFrame::new_checked(frame).expect("a whole Ethernet frame");
    assert_eq!(eth.src_addr(), GATEWAY_MAC);
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            assert!(arp_of(frame).is_some(), "malformed ARP");
        }
        EthernetProtocol::Ipv4 | EthernetProtocol::Ipv6 => {
            let ip = ip_of(frame).expect("a whole IP packet");
            let ok = match ip.proto {
                IpProtocol::Tcp => tcp_of(frame).is_some(),
                IpProtocol::Udp => udp_of(frame).is_some(),
                IpProtocol::Icmp | IpProtocol::Icmpv6 => icmp_of(frame).is_some(),
                other => panic!("the stack sent {other}"),
            };
            assert!(ok, "malformed {} from the stack", ip.proto);
        }
        other => panic!("the stack sent ethertype {other}"),
    }
}

#[test]
fn garbage_frames_never_panic() {
    let caps = Caps {
        max_tcp_flows: 8,
        max_half_open: 4,
        max_buffer_bytes: 6 * 2 * 4096,
        max_datagram_flows: 8,
        max_queued_frames: 64,
        max_queued_bytes: 1 << 20,
        max_inbound: 4,
        max_pins: 16,
    };
    let cfg = StackConfig {
        tcp_buffer: 4096,
        dns_upstream: Some(sock(Ipv4Addr::new(192, 0, 2, 53), 53)),
        caps: caps.clone(),
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, deny(&["198.51.100.0/24"]));
    let seeds = seed_frames();
    let mut rng = XorShift::new(0x5a5a_1234);
    let mut tcp_flows: Vec<FlowId> = Vec::new();
    let mut dgram_flows: Vec<FlowId> = Vec::new();
    let (mut opened_tcp, mut opened_dgram) = (0, 0);

    for round in 0..5_000 {
        let seed = &seeds[rng.below(seeds.len())];
        let frame = match rng.below(6) {
            0 => {
                let len = rng.below(200);
                rng.bytes(len)
            }
            1 => seed[..rng.below(seed.len() + 1)].to_vec(),
            2 | 3 => {
                let mut f = seed.clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(f.len());
                    f[at] ^= 1 << rng.below(8);
                }
                if rng.below(4) != 0 {
                    fix_checksums(&mut f);
                }
                f
            }
            _ => seed.clone(),
        };
        p.stack.handle_frame(p.at(), &frame, RxMeta::default());

        // Play a driver that answers at random.
        while let Some(r) = p.stack.poll_request() {
            match r {
                HostRequest::TcpConnect { flow, .. } => {
                    opened_tcp += 1;
                    match rng.below(4) {
                        0 => p.stack.handle_host(
                            p.at(),
                            flow,
                            HostEvent::ConnectFailed(ConnectError::Refused),
                        ),
                        1 => p.stack.handle_host(
                            p.at(),
                            flow,
                            HostEvent::ConnectFailed(ConnectError::TimedOut),
                        ),
                        _ => tcp_flows.push(flow),
                    }
                }
                HostRequest::DatagramOpen { flow, .. } => {
                    opened_dgram += 1;
                    dgram_flows.push(flow);
                }
                _ => {}
            }
        }
        if let Some(&flow) = tcp_flows.get(rng.below(tcp_flows.len() + 1)) {
            match rng.below(8) {
                0 => p.stack.handle_host(p.at(), flow, HostEvent::Eof),
                1 => p.stack.handle_host(p.at(), flow, HostEvent::Reset),
                2 => drop(host_write(&mut p, flow, b"from the host")),
                3 => host_read(&mut p, flow, &mut Vec::new()),
                _ => p.stack.handle_host(p.at(), flow, HostEvent::Connected),
            }
        }
        if let Some(&flow) = dgram_flows.get(rng.below(dgram_flows.len() + 1)) {
            let len = rng.below(64);
            let payload = rng.bytes(len);
            p.stack
                .handle_host(p.at(), flow, HostEvent::Datagram(&payload));
        }
        if rng.chance(500) {
            let list = if rng.chance(2) {
                "192.0.2.0/24"
            } else {
                "203.0.113.0/24"
            };
            p.stack.set_policy(p.at(), deny(&[list]));
        }
        if rng.chance(20) {
            p.advance(Duration::from_millis(rng.below(3_000) as u64));
        }
        p.stack.handle_timeout(p.at());
        p.requests.clear();
        for out in p.flush() {
            assert_well_formed(&out);
        }

        let s = &p.stack;
        assert!(s.tcp_flow_count() <= caps.max_tcp_flows, "round {round}");
        assert!(s.half_open_count() <= caps.max_half_open, "round {round}");
        assert!(s.half_open_count() <= s.tcp_flow_count(), "round {round}");
        assert!(
            s.datagram_flow_count() <= caps.max_datagram_flows,
            "round {round}"
        );
        assert!(s.buffer_bytes() <= caps.max_buffer_bytes, "round {round}");
        assert_eq!(
            s.buffer_bytes(),
            2 * 4096 * s.tcp_flow_count(),
            "round {round}"
        );
    }
    // Not vacuous: flows were opened, refused and dropped along the way.
    let stats = p.stack.stats();
    assert!(
        opened_tcp > 10 && opened_dgram > 10,
        "{opened_tcp} {opened_dgram}"
    );
    assert!(stats.tcp_denied > 0 && stats.datagram_denied > 0);
    assert!(stats.caps_hit > 0 && stats.frames_dropped > 0);
    // The breakdowns add up to the totals.
    assert_eq!(stats.caps_hit_by_cap.values().sum::<u64>(), stats.caps_hit);
    assert_eq!(
        stats.dropped_by_reason.values().sum::<u64>(),
        stats.frames_dropped
    );
}
