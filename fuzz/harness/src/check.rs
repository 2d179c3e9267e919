//! What every frame the stack sends to the guest must be: an Ethernet frame
//! from the gateway's MAC carrying ARP or a whole, checksummed IPv4/IPv6
//! packet that smoltcp's own parsers accept. Over a link with offloads a TCP
//! segment may be up to 64 KiB, its checksum left zero for the link.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, Icmpv4Packet, Icmpv6Packet, IpAddress,
    IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpPacket, TcpRepr, UdpPacket, UdpRepr,
};

use super::frames::GATEWAY_MAC;

/// A TCP segment the stack sent, for following the connection from the guest's side.
#[derive(Debug, Clone, Copy)]
pub struct SegmentSeen {
    pub peer: SocketAddr,
    pub guest: SocketAddr,
    pub seq: u32,
    pub ack: Option<u32>,
    /// Sequence space the segment occupies (payload, SYN, FIN).
    pub len: u32,
    pub rst: bool,
}

/// Panics (the fuzzer's "crash") with the reason if `frame` is malformed.
pub fn frame_to_guest(frame: &[u8], mtu: usize, offloaded: bool) -> Option<SegmentSeen> {
    let eth = EthernetFrame::new_checked(frame)
        .unwrap_or_else(|e| panic!("stack sent a short Ethernet frame ({e}): {frame:02x?}"));
    assert_eq!(
        eth.src_addr(),
        GATEWAY_MAC,
        "frame not from the gateway MAC"
    );
    let payload = eth.payload();
    let tcp_segment = match eth.ethertype() {
        EthernetProtocol::Ipv4 => payload.get(9) == Some(&6),
        EthernetProtocol::Ipv6 => payload.get(6) == Some(&6),
        _ => false,
    };
    let limit = if offloaded && tcp_segment { 65535 } else { mtu };
    assert!(
        payload.len() <= limit,
        "stack sent a {}-byte IP packet over a {mtu}-byte MTU link (offloads {offloaded})",
        payload.len()
    );
    let caps = ChecksumCapabilities::default();
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let p = ArpPacket::new_checked(payload).expect("stack sent a short ARP packet");
            ArpRepr::parse(&p).expect("stack sent an invalid ARP packet");
            None
        }
        EthernetProtocol::Ipv4 => {
            let p = Ipv4Packet::new_checked(payload).expect("stack sent a malformed IPv4 header");
            let repr = Ipv4Repr::parse(&p, &caps).expect("stack sent an invalid IPv4 header");
            assert_eq!(
                usize::from(p.total_len()),
                payload.len(),
                "IPv4 total length disagrees with the frame"
            );
            let body = &payload[p.header_len().into()..];
            let (s, d) = (IpAddr::V4(repr.src_addr), IpAddr::V4(repr.dst_addr));
            transport(repr.next_header, s, d, body, offloaded)
        }
        EthernetProtocol::Ipv6 => {
            let p = Ipv6Packet::new_checked(payload).expect("stack sent a malformed IPv6 header");
            let repr = Ipv6Repr::parse(&p).expect("stack sent an invalid IPv6 header");
            assert_eq!(
                40 + repr.payload_len,
                payload.len(),
                "IPv6 payload length disagrees with the frame"
            );
            let (s, d) = (IpAddr::V6(repr.src_addr), IpAddr::V6(repr.dst_addr));
            transport(repr.next_header, s, d, &payload[40..], offloaded)
        }
        other => panic!("stack sent ethertype {other}"),
    }
}

fn transport(
    proto: IpProtocol,
    src: IpAddr,
    dst: IpAddr,
    body: &[u8],
    offloaded: bool,
) -> Option<SegmentSeen> {
    let caps = ChecksumCapabilities::default();
    let (s, d): (IpAddress, IpAddress) = (src.into(), dst.into());
    match proto {
        IpProtocol::Tcp => {
            let p = TcpPacket::new_checked(body).expect("stack sent a malformed TCP header");
            // Our own RSTs are summed; smoltcp's segments are the link's to sum.
            let tcp_caps = if offloaded && !p.verify_checksum(&s, &d) {
                assert_eq!(p.checksum(), 0, "an offloaded checksum must be left zero");
                ChecksumCapabilities::ignored()
            } else {
                caps.clone()
            };
            let repr = TcpRepr::parse(&p, &s, &d, &tcp_caps).unwrap_or_else(|e| {
                panic!("stack sent an invalid TCP segment ({e}) {src} -> {dst}: {body:02x?}")
            });
            Some(SegmentSeen {
                peer: SocketAddr::new(src, repr.src_port),
                guest: SocketAddr::new(dst, repr.dst_port),
                seq: repr.seq_number.0 as u32,
                ack: repr.ack_number.map(|a| a.0 as u32),
                len: repr.segment_len() as u32,
                rst: repr.control == smoltcp::wire::TcpControl::Rst,
            })
        }
        IpProtocol::Udp => {
            let p = UdpPacket::new_checked(body).expect("stack sent a malformed UDP header");
            UdpRepr::parse(&p, &s, &d, &caps).unwrap_or_else(|e| {
                panic!("stack sent an invalid UDP datagram ({e}) {src} -> {dst}: {body:02x?}")
            });
            assert_eq!(usize::from(p.len()), body.len(), "UDP length disagrees");
            None
        }
        IpProtocol::Icmp => {
            let p = Icmpv4Packet::new_checked(body).expect("stack sent a malformed ICMP message");
            assert!(p.verify_checksum(), "stack sent a bad ICMP checksum");
            None
        }
        IpProtocol::Icmpv6 => {
            let p = Icmpv6Packet::new_checked(body).expect("stack sent a malformed ICMPv6 message");
            let (IpAddress::Ipv6(s6), IpAddress::Ipv6(d6)) = (s, d) else {
                panic!("ICMPv6 over IPv4");
            };
            assert!(
                p.verify_checksum(&s6, &d6),
                "stack sent a bad ICMPv6 checksum"
            );
            None
        }
        other => panic!("stack sent IP protocol {other}"),
    }
}
