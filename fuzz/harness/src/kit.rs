//! The one kit of guest frames for tests, fuzz harnesses and examples:
//! the default plan's addresses, frames a guest sends built with smoltcp's
//! wire builders (checksums right), and frames the stack sends parsed back
//! with checksums verified. `frames` builds hostile frames from fuzzer
//! fields on top of it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress,
    IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, NdiscRepr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
pub const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);
pub const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
pub const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const GATEWAY_V6_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
pub const DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
pub const GUEST_V6_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0x00ff, 0xfe12, 0x3456);
/// Guest-visible addresses the harness maps to the host's loopback.
pub const LOOPBACK_ALIAS_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 254);
pub const LOOPBACK_ALIAS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

pub fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// An Ethernet frame from `src` to `dst` around `body`.
pub fn ethernet_from(
    src: EthernetAddress,
    dst: EthernetAddress,
    ty: EthernetProtocol,
    body: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; 14 + body.len()];
    let mut e = EthernetFrame::new_unchecked(&mut f[..]);
    e.set_src_addr(src);
    e.set_dst_addr(dst);
    e.set_ethertype(ty);
    e.payload_mut().copy_from_slice(body);
    f
}

/// An ARP request (to broadcast) or reply (to the gateway) from `sender_mac`.
pub fn arp(
    request: bool,
    sender_mac: EthernetAddress,
    sender: Ipv4Addr,
    target: Ipv4Addr,
) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: if request {
            ArpOperation::Request
        } else {
            ArpOperation::Reply
        },
        source_hardware_addr: sender_mac,
        source_protocol_addr: sender,
        target_hardware_addr: if request {
            EthernetAddress([0; 6])
        } else {
            GATEWAY_MAC
        },
        target_protocol_addr: target,
    };
    let mut body = vec![0u8; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut body[..]));
    let dst = if request {
        EthernetAddress::BROADCAST
    } else {
        GATEWAY_MAC
    };
    ethernet_from(sender_mac, dst, EthernetProtocol::Arp, &body)
}

// ----- frames the guest sends, built by hand ----------------------------------

/// An Ethernet frame from the guest to `dst_mac` around `payload`.
pub fn ethernet(dst_mac: EthernetAddress, ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    ethernet_from(GUEST_MAC, dst_mac, ethertype, payload)
}

/// An IP frame from the guest whose L4 part (`len` bytes) `fill` writes.
pub fn ip_frame(
    dst_mac: EthernetAddress,
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    hop_limit: u8,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip = IpRepr::new(src.into(), dst.into(), proto, len, hop_limit);
    let mut packet = vec![0; ip.buffer_len()];
    ip.emit(&mut packet[..], &ChecksumCapabilities::default());
    let at = packet.len() - len;
    fill(&mut packet[at..]);
    let ethertype = match src {
        IpAddr::V4(_) => EthernetProtocol::Ipv4,
        IpAddr::V6(_) => EthernetProtocol::Ipv6,
    };
    ethernet(dst_mac, ethertype, &packet)
}

pub fn udp_frame(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    udp_frame_to(GATEWAY_MAC, src, dst, payload)
}

pub fn udp_frame_to(
    dst_mac: EthernetAddress,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let (s, d): (IpAddress, IpAddress) = (src.ip().into(), dst.ip().into());
    let len = 8 + payload.len();
    ip_frame(
        dst_mac,
        src.ip(),
        dst.ip(),
        IpProtocol::Udp,
        64,
        len,
        |buf| {
            repr.emit(
                &mut UdpPacket::new_unchecked(buf),
                &s,
                &d,
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// A TCP segment from the guest with the given control flag and no options.
pub fn tcp_frame(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: i32,
    ack: Option<i32>,
    payload: &[u8],
) -> Vec<u8> {
    let syn = control == TcpControl::Syn;
    let repr = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: ack.map(TcpSeqNumber),
        window_len: 64_000,
        window_scale: syn.then_some(7),
        max_seg_size: syn.then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let (s, d): (IpAddress, IpAddress) = (src.ip().into(), dst.ip().into());
    ip_frame(
        GATEWAY_MAC,
        src.ip(),
        dst.ip(),
        IpProtocol::Tcp,
        64,
        repr.buffer_len(),
        |buf| {
            repr.emit(
                &mut TcpPacket::new_unchecked(buf),
                &s,
                &d,
                &ChecksumCapabilities::default(),
            )
        },
    )
}

pub fn tcp_syn(src: SocketAddr, dst: SocketAddr, seq: i32) -> Vec<u8> {
    tcp_frame(src, dst, TcpControl::Syn, seq, None, &[])
}

pub fn echo_request(src: IpAddr, dst: IpAddr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            let repr = Icmpv4Repr::EchoRequest {
                ident,
                seq_no,
                data,
            };
            ip_frame(
                GATEWAY_MAC,
                src,
                dst,
                IpProtocol::Icmp,
                64,
                repr.buffer_len(),
                |buf| {
                    repr.emit(
                        &mut Icmpv4Packet::new_unchecked(buf),
                        &ChecksumCapabilities::default(),
                    )
                },
            )
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let repr = Icmpv6Repr::EchoRequest {
                ident,
                seq_no,
                data,
            };
            ip_frame(
                GATEWAY_MAC,
                src,
                dst,
                IpProtocol::Icmpv6,
                64,
                repr.buffer_len(),
                |buf| {
                    repr.emit(
                        &s,
                        &d,
                        &mut Icmpv6Packet::new_unchecked(buf),
                        &ChecksumCapabilities::default(),
                    )
                },
            )
        }
        _ => panic!("echo request across families"),
    }
}

/// The guest asking, by broadcast, who has `target`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    arp(true, GUEST_MAC, sender, target)
}

/// A router solicitation from the guest's link-local address to all routers.
pub fn router_solicit() -> Vec<u8> {
    let repr = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit {
        lladdr: Some(GUEST_MAC.into()),
    });
    let all_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
    ip_frame(
        EthernetAddress([0x33, 0x33, 0, 0, 0, 2]),
        GUEST_V6_LL.into(),
        all_routers.into(),
        IpProtocol::Icmpv6,
        255,
        repr.buffer_len(),
        |buf| {
            repr.emit(
                &GUEST_V6_LL,
                &all_routers,
                &mut Icmpv6Packet::new_unchecked(buf),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// A DHCP message from the unconfigured guest: 0.0.0.0:68 to broadcast :67.
pub fn dhcp_frame(repr: &DhcpRepr) -> Vec<u8> {
    let mut body = vec![0; repr.buffer_len()];
    repr.emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
        .expect("DHCP message emits");
    udp_frame_to(
        EthernetAddress::BROADCAST,
        sock(Ipv4Addr::UNSPECIFIED, 68),
        sock(Ipv4Addr::BROADCAST, 67),
        &body,
    )
}

/// A standard recursive query for `name`, type A, class IN.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

// ----- frames the stack sends, parsed -------------------------------------

/// The IP layer of a frame from the stack, checksums verified.
#[derive(Debug, Clone)]
pub struct IpSeen {
    pub dst_mac: EthernetAddress,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: IpProtocol,
    pub hop_limit: u8,
    pub payload: Vec<u8>,
}

pub fn ip_of(frame: &[u8]) -> Option<IpSeen> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.src_addr() != GATEWAY_MAC {
        return None;
    }
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            assert!(
                ip.verify_checksum(),
                "bad IPv4 header checksum from the stack"
            );
            Some(IpSeen {
                dst_mac: eth.dst_addr(),
                src: IpAddr::V4(ip.src_addr()),
                dst: IpAddr::V4(ip.dst_addr()),
                proto: ip.next_header(),
                hop_limit: ip.hop_limit(),
                payload: ip.payload().to_vec(),
            })
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            Some(IpSeen {
                dst_mac: eth.dst_addr(),
                src: IpAddr::V6(ip.src_addr()),
                dst: IpAddr::V6(ip.dst_addr()),
                proto: ip.next_header(),
                hop_limit: ip.hop_limit(),
                payload: ip.payload().to_vec(),
            })
        }
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSeen {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: TcpSeqNumber,
    pub ack: Option<TcpSeqNumber>,
    pub syn: bool,
    pub rst: bool,
    pub fin: bool,
    pub payload_len: usize,
}

pub fn tcp_of(frame: &[u8]) -> Option<TcpSeen> {
    let ip = ip_of(frame)?;
    if ip.proto != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(&ip.payload[..]).ok()?;
    let (s, d): (IpAddress, IpAddress) = (ip.src.into(), ip.dst.into());
    assert!(
        tcp.verify_checksum(&s, &d),
        "bad TCP checksum from the stack"
    );
    Some(TcpSeen {
        src: SocketAddr::new(ip.src, tcp.src_port()),
        dst: SocketAddr::new(ip.dst, tcp.dst_port()),
        seq: tcp.seq_number(),
        ack: tcp.ack().then(|| tcp.ack_number()),
        syn: tcp.syn(),
        rst: tcp.rst(),
        fin: tcp.fin(),
        payload_len: tcp.payload().len(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSeen {
    pub dst_mac: EthernetAddress,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

pub fn udp_of(frame: &[u8]) -> Option<UdpSeen> {
    let ip = ip_of(frame)?;
    if ip.proto != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(&ip.payload[..]).ok()?;
    let (s, d): (IpAddress, IpAddress) = (ip.src.into(), ip.dst.into());
    assert!(
        udp.verify_checksum(&s, &d),
        "bad UDP checksum from the stack"
    );
    Some(UdpSeen {
        dst_mac: ip.dst_mac,
        src: SocketAddr::new(ip.src, udp.src_port()),
        dst: SocketAddr::new(ip.dst, udp.dst_port()),
        payload: udp.payload().to_vec(),
    })
}

/// An ICMP or ICMPv6 message from the stack: type, code and the bytes after
/// the 4-byte header (for errors: 4 unused bytes, then the quoted packet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpSeen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ty: u8,
    pub code: u8,
    pub rest: Vec<u8>,
}

pub fn icmp_of(frame: &[u8]) -> Option<IcmpSeen> {
    let ip = ip_of(frame)?;
    match (ip.proto, ip.src, ip.dst) {
        (IpProtocol::Icmp, _, _) => {
            let pkt = Icmpv4Packet::new_checked(&ip.payload[..]).ok()?;
            assert!(pkt.verify_checksum(), "bad ICMP checksum from the stack");
        }
        (IpProtocol::Icmpv6, IpAddr::V6(s), IpAddr::V6(d)) => {
            let pkt = Icmpv6Packet::new_checked(&ip.payload[..]).ok()?;
            assert!(
                pkt.verify_checksum(&s, &d),
                "bad ICMPv6 checksum from the stack"
            );
        }
        _ => return None,
    }
    Some(IcmpSeen {
        src: ip.src,
        dst: ip.dst,
        ty: ip.payload[0],
        code: ip.payload[1],
        rest: ip.payload[4..].to_vec(),
    })
}

pub fn rsts(frames: &[Vec<u8>]) -> Vec<TcpSeen> {
    frames
        .iter()
        .filter_map(|f| tcp_of(f))
        .filter(|t| t.rst)
        .collect()
}

pub fn icmps(frames: &[Vec<u8>]) -> Vec<IcmpSeen> {
    frames.iter().filter_map(|f| icmp_of(f)).collect()
}

pub fn dhcp_message(message_type: DhcpMessageType) -> DhcpRepr<'static> {
    DhcpRepr {
        message_type,
        transaction_id: 0x1234_5678,
        secs: 0,
        client_hardware_address: GUEST_MAC,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: None,
        client_identifier: Some(GUEST_MAC),
        server_identifier: None,
        parameter_request_list: Some(&[1, 3, 6, 26]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    }
}

pub fn arp_of(frame: &[u8]) -> Option<(EthernetAddress, ArpRepr)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    let repr = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?;
    Some((eth.dst_addr(), repr))
}

/// A TLS 1.3-style ClientHello naming `sni` (no SNI when empty), cut into
/// handshake records of at most `record` bytes: what a guest's TLS client
/// sends first, for the name-dial and fronting tests.
pub fn client_hello(sni: &str, record: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    // supported_groups first, as real clients send something before SNI.
    exts.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    if !sni.is_empty() {
        let n = sni.len() as u16;
        exts.extend_from_slice(&[0x00, 0x00]);
        exts.extend_from_slice(&(n + 5).to_be_bytes());
        exts.extend_from_slice(&(n + 3).to_be_bytes());
        exts.push(0);
        exts.extend_from_slice(&n.to_be_bytes());
        exts.extend_from_slice(sni.as_bytes());
    }
    // supported_versions: TLS 1.3.
    exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x42; 32]);
    body.push(32);
    body.extend_from_slice(&[0x24; 32]);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut out = Vec::new();
    for chunk in hs.chunks(record.max(1)) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}
