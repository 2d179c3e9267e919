//! UDP, DNS and ICMP echo relayed per flow: idle expiry, denials answered
//! with ICMP, the queue cap on host datagrams, host-loopback aliases.
//! (The core driven from both ends: a smoltcp guest or hand-built frames on
//! the link, the test as the host driver, a fake clock.)

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use netstack::{Caps, DatagramKind, EgressPolicy, HostEvent, HostRequest, StackConfig};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr};

#[test]
fn udp_relay_and_idle_expiry() {
    let mut p = Pair::allow_all();
    let idle = p.stack.config().udp_idle_timeout;
    let (guest, dst) = (sock(GUEST_V4, 40_000), sock(PEER_V4, 7));
    assert!(p.inject(&udp_frame(guest, dst, b"ping")).is_empty());
    let flow = match p.requests.pop_front() {
        Some(HostRequest::DatagramOpen { flow, kind, dst: d }) => {
            assert_eq!((kind, d), (DatagramKind::Udp, dst));
            flow
        }
        other => panic!("expected DatagramOpen, got {other:?}"),
    };
    let send = |payload: &[u8]| HostRequest::DatagramSend {
        flow,
        payload: payload.to_vec(),
    };
    assert_eq!(p.requests.pop_front(), Some(send(b"ping")));

    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(b"pong"));
    let out = p.flush();
    assert_eq!(out.len(), 1);
    let want = UdpSeen {
        dst_mac: GUEST_MAC,
        src: dst,
        dst: guest,
        payload: b"pong".to_vec(),
    };
    assert_eq!(udp_of(&out[0]), Some(want));

    // The same 4-tuple stays one flow.
    p.inject(&udp_frame(guest, dst, b"again"));
    assert_eq!(p.requests.pop_front(), Some(send(b"again")));
    assert!(p.requests.is_empty());

    p.advance(idle - Duration::from_secs(1));
    p.poll_stack();
    assert!(p.requests.is_empty(), "closed before its idle timeout");
    p.advance(Duration::from_secs(2));
    p.poll_stack();
    assert_eq!(
        p.requests.pop_front(),
        Some(HostRequest::DatagramClose { flow })
    );
    assert_eq!(p.stack.datagram_flow_count(), 0);
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(b"late"));
    assert!(p.flush().is_empty(), "a closed flow still delivers");
}

#[test]
fn denied_udp_gets_admin_prohibited() {
    let mut p = Pair::new(StackConfig::default(), deny(&["ALL_TRAFFIC"]));
    let cases = [
        (
            sock(GUEST_V4, 40_000),
            sock(PEER_V4, 7),
            GATEWAY_V4.into(),
            (3, 13),
        ),
        (
            sock(GUEST_V6, 40_000),
            sock(PEER_V6, 7),
            GATEWAY_V6.into(),
            (1, 1),
        ),
    ];
    for (src, dst, gateway, want) in cases {
        let frame = udp_frame(src, dst, b"let me out");
        let out = p.inject(&frame);
        let icmp = icmps(&out);
        assert_eq!(icmp.len(), 1, "{dst}: {icmp:?}");
        assert_eq!((icmp[0].ty, icmp[0].code), want, "{dst}");
        assert_eq!((icmp[0].src, icmp[0].dst), (gateway, src.ip()));
        let ip_header = if src.is_ipv4() { 20 } else { 40 };
        let quote = &frame[14..14 + ip_header + 8];
        assert_eq!(&icmp[0].rest[4..4 + quote.len()], quote, "{dst}: quote");
        assert!(udp_of(&out[0]).is_none());
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    assert_eq!(p.stack.datagram_flow_count(), 0);
    assert_eq!(p.stack.stats().datagram_denied, 2);
}

/// RFC 1122 3.2.2: no ICMP error about a datagram sent to a broadcast address.
#[test]
fn subnet_broadcast_udp_is_dropped_quietly() {
    let mut p = Pair::allow_all();
    let bcast = Ipv4Addr::new(10, 0, 2, 255);
    for dst in [Ipv4Addr::BROADCAST, bcast] {
        let frame = udp_frame_to(
            EthernetAddress::BROADCAST,
            sock(GUEST_V4, 137),
            sock(dst, 137),
            b"who is there",
        );
        let out = p.inject(&frame);
        assert!(out.is_empty(), "{dst} answered: {:?}", icmps(&out));
    }
    assert!(p.requests.is_empty());
}

#[test]
fn host_datagrams_stop_at_the_queued_frames_cap() {
    let cfg = StackConfig {
        caps: Caps {
            max_queued_frames: 4,
            ..Caps::default()
        },
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    p.inject(&udp_frame(sock(GUEST_V4, 40_000), sock(PEER_V4, 7), b"go"));
    let (flow, _, _) = take_datagram_open(&mut p).expect("DatagramOpen");
    for i in 0..10u8 {
        p.stack.handle_host(p.at(), flow, HostEvent::Datagram(&[i]));
    }
    assert!(!p.stack.wants_host_datagrams());
    assert_eq!(p.stack.queued_frames(), 4);
    assert_eq!(p.stack.stats().frames_dropped, 6);
    let firsts: Vec<_> = p
        .flush()
        .iter()
        .map(|f| udp_of(f).unwrap().payload)
        .collect();
    assert_eq!(firsts, [[0], [1], [2], [3]]);
    assert!(p.stack.wants_host_datagrams());
}

#[test]
fn host_loopback_alias_reaches_host_loopback() {
    let alias = Ipv4Addr::new(10, 0, 2, 254);
    let cfg = StackConfig {
        host_loopback_aliases: vec![alias.into()],
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    let h = p.guest_connect(sock(alias, 8080), BUF);
    let (flow, dst) = p.expect_connect();
    assert_eq!(dst, sock(Ipv4Addr::LOCALHOST, 8080));
    p.stack.handle_host(p.at(), flow, HostEvent::Connected);
    p.run_until("the guest to establish", |p| {
        p.guest_state(h) == tcp::State::Established
    });

    let guest = sock(GUEST_V4, 40_000);
    p.inject(&udp_frame(guest, sock(alias, 9000), b"hi"));
    let (flow, _, dst) = take_datagram_open(&mut p).expect("DatagramOpen");
    assert_eq!(dst, sock(Ipv4Addr::LOCALHOST, 9000));
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(b"back"));
    let udp = udp_of(&p.flush()[0]).unwrap();
    assert_eq!((udp.src, udp.dst), (sock(alias, 9000), guest));

    // Other internal addresses stay shut.
    let out = p.inject(&tcp_syn(guest, sock(Ipv4Addr::new(10, 0, 2, 253), 8080), 3));
    assert_eq!(rsts(&out).len(), 1);
}

#[test]
fn ping_to_gateway_answered_locally() {
    let mut p = Pair::allow_all();
    let own: [(IpAddr, IpAddr); 3] = [
        (GUEST_V4.into(), GATEWAY_V4.into()),
        (GUEST_V4.into(), DNS_V4.into()),
        (GUEST_V6.into(), GATEWAY_V6.into()),
    ];
    for (src, dst) in own {
        let out = p.inject(&echo_request(src, dst, 0x1234, 7, b"abcdefgh"));
        assert_eq!(out.len(), 1, "{dst}");
        let ip = ip_of(&out[0]).unwrap();
        assert_eq!((ip.src, ip.dst, ip.dst_mac), (dst, src, GUEST_MAC));
        let (ident, seq_no, data) = match (src, dst) {
            (IpAddr::V4(_), _) => {
                let pkt = Icmpv4Packet::new_checked(&ip.payload[..]).unwrap();
                match Icmpv4Repr::parse(&pkt, &Default::default()).unwrap() {
                    Icmpv4Repr::EchoReply {
                        ident,
                        seq_no,
                        data,
                    } => (ident, seq_no, data.to_vec()),
                    other => panic!("not an echo reply: {other:?}"),
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let pkt = Icmpv6Packet::new_checked(&ip.payload[..]).unwrap();
                match Icmpv6Repr::parse(&d, &s, &pkt, &Default::default()).unwrap() {
                    Icmpv6Repr::EchoReply {
                        ident,
                        seq_no,
                        data,
                    } => (ident, seq_no, data.to_vec()),
                    other => panic!("not an echo reply: {other:?}"),
                }
            }
            _ => unreachable!(),
        };
        assert_eq!((ident, seq_no, &data[..]), (0x1234, 7, &b"abcdefgh"[..]));
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
}

#[test]
fn ping_to_denied_destination_gets_admin_prohibited_not_a_reply() {
    let mut p = Pair::new(StackConfig::default(), deny(&["192.0.2.0/24"]));
    let out = p.inject(&echo_request(GUEST_V4.into(), PEER_V4.into(), 1, 1, b"x"));
    let icmp = icmps(&out);
    assert_eq!(icmp.len(), 1, "{icmp:?}");
    assert_eq!((icmp[0].ty, icmp[0].code), (3, 13));
    assert_eq!(icmp[0].src, IpAddr::V4(GATEWAY_V4));
    assert!(p.requests.is_empty(), "{:?}", p.requests);
}

#[test]
fn ping_to_public_is_relayed_and_reply_gets_the_guest_ident() {
    let mut p = Pair::allow_all();
    let out = p.inject(&echo_request(
        GUEST_V4.into(),
        PEER_V4.into(),
        0x77,
        3,
        b"data",
    ));
    assert!(out.is_empty());
    let (flow, kind, dst) = take_datagram_open(&mut p).expect("DatagramOpen");
    assert_eq!((kind, dst), (DatagramKind::IcmpEcho, sock(PEER_V4, 0)));
    let Some(HostRequest::DatagramSend { payload, .. }) = p.requests.pop_front() else {
        panic!("no DatagramSend");
    };
    assert_eq!(payload, [8, 0, 0, 0, 0, 0x77, 0, 3, b'd', b'a', b't', b'a']);

    // The kernel replies with an identifier of its own choosing.
    let reply = [0, 0, 0, 0, 0x99, 0x99, 0, 3, b'd', b'a', b't', b'a'];
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(&reply));
    let out = p.flush();
    let ip = ip_of(&out[0]).expect("an echo reply");
    assert_eq!(ip.src, IpAddr::V4(PEER_V4));
    let pkt = Icmpv4Packet::new_checked(&ip.payload[..]).unwrap();
    let repr = Icmpv4Repr::parse(&pkt, &Default::default()).unwrap();
    let want = Icmpv4Repr::EchoReply {
        ident: 0x77,
        seq_no: 3,
        data: b"data",
    };
    assert_eq!(repr, want);
}

#[test]
fn dns_to_stack_is_forwarded_to_upstream() {
    let upstream = sock(Ipv4Addr::new(192, 0, 2, 53), 53);
    let cfg = StackConfig {
        dns_upstream: Some(upstream),
        ..StackConfig::default()
    };
    let mut p = Pair::new(cfg, EgressPolicy::allow_all());
    let guest = sock(GUEST_V4, 41_000);
    let dns = sock(DNS_V4, 53);
    let query = dns_query(0xbeef, "example.com");
    assert!(p.inject(&udp_frame(guest, dns, &query)).is_empty());
    let (flow, kind, dst) = take_datagram_open(&mut p).expect("DatagramOpen");
    assert_eq!((kind, dst), (DatagramKind::Udp, upstream));
    let send = HostRequest::DatagramSend {
        flow,
        payload: query.clone(),
    };
    assert_eq!(p.requests.pop_front(), Some(send));

    let mut answer = query.clone();
    answer[2] |= 0x80;
    p.stack
        .handle_host(p.at(), flow, HostEvent::Datagram(&answer));
    let out = p.flush();
    let udp = udp_of(&out[0]).expect("a UDP answer");
    assert_eq!((udp.src, udp.dst), (dns, guest));
    assert_eq!(udp.payload, answer);

    // Garbage to the resolver opens nothing and earns nothing.
    let other = sock(GUEST_V4, 41_001);
    for junk in [&b"\x00\x01garbage"[..], &[0u8; 12][..], &answer[..]] {
        assert!(p.inject(&udp_frame(other, dns, junk)).is_empty());
    }
    assert!(p.requests.is_empty(), "{:?}", p.requests);
    assert_eq!(p.stack.datagram_flow_count(), 1);
}

#[test]
fn dns_without_upstream_gets_port_unreachable() {
    let mut p = Pair::allow_all();
    let query = dns_query(1, "example.com");
    let out = p.inject(&udp_frame(sock(GUEST_V4, 41_000), sock(DNS_V4, 53), &query));
    let icmp = icmps(&out);
    assert_eq!(icmp.len(), 1, "{icmp:?}");
    assert_eq!((icmp[0].ty, icmp[0].code), (3, 3));
    assert_eq!(icmp[0].src, IpAddr::V4(DNS_V4));
    assert!(p.requests.is_empty());
}
