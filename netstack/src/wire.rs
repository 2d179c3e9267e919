//! The seam where guest bytes become validated values, and where the stack's
//! own frames (UDP relays, ICMP errors, RSTs, service replies) are built.
//!
//! `classify` never panics, whatever the frame: every accessor used after a
//! `new_checked` is in bounds, and anything that does not parse is `Drop`.
//! Checksums are verified except under `cfg(fuzzing)`, so fuzzers reach deeper.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscRepr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

/// An Ethernet header (no VLAN tag).
pub const ETH_HEADER: usize = 14;
/// The smallest frame worth passing on: an Ethernet header.
pub const MIN_FRAME: usize = ETH_HEADER;
/// The largest Ethernet frame any link carries either way: a 65535-byte IP
/// packet (the most its length field can say; TSO super-frames included)
/// plus the Ethernet header. Every transport sizes its buffers with this.
pub const MAX_FRAME: usize = 65535 + ETH_HEADER;
const HOP_LIMIT: u8 = 64;
/// RFC 1812 / RFC 4443: an ICMP error quotes as much of the offending packet as fits in this.
const ICMP_ERROR_MAX: usize = 576;

/// What a guest frame is, as far as the stack's own logic cares.
#[derive(Debug, PartialEq, Eq)]
pub enum GuestPacket<'a> {
    /// Handed to smoltcp as it is (ARP, NDP, TCP segments of known flows, …).
    Smoltcp,
    /// A TCP SYN without ACK: a new flow, to be decided before smoltcp sees it.
    TcpSyn {
        src: SocketAddr,
        dst: SocketAddr,
    },
    /// Any other TCP segment; `rst` when it carries the RST flag.
    Tcp {
        src: SocketAddr,
        dst: SocketAddr,
        rst: bool,
    },
    Udp {
        src: SocketAddr,
        dst: SocketAddr,
        payload: &'a [u8],
    },
    IcmpEcho {
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq: u16,
        data: &'a [u8],
    },
    RouterSolicit {
        src: IpAddr,
    },
    /// An ARP request or reply, for smoltcp unless it concerns the guest's own address.
    Arp {
        sender: std::net::Ipv4Addr,
        target: std::net::Ipv4Addr,
    },
    Drop(&'static str),
}

/// The parsed headers of a guest frame, kept so that replies can quote them.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub src_mac: EthernetAddress,
    pub packet: GuestPacket<'a>,
    /// The guest's IP packet (header + payload), for ICMP errors that quote it.
    pub ip: &'a [u8],
}

/// What the link says about a guest frame beyond its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// The guest's kernel vouched for the transport checksum (virtio-net's
    /// NEEDS_CSUM or DATA_VALID): it is partial or already checked, and is
    /// not verified again. The IPv4 header checksum still is.
    pub checksum_trusted: bool,
}

/// Which checksums `classify` verifies: the IPv4 header's always, the
/// transport's unless the link vouched for it (and none when fuzzing).
fn rx_checksums(l4_trusted: bool) -> ChecksumCapabilities {
    if cfg!(fuzzing) {
        return ChecksumCapabilities::ignored();
    }
    let mut caps = ChecksumCapabilities::default();
    if l4_trusted {
        let ipv4 = caps.ipv4;
        caps = ChecksumCapabilities::ignored();
        caps.ipv4 = ipv4;
    }
    caps
}

/// Classify one Ethernet frame from the guest, with what its link said
/// about it (`RxMeta::default()`: nothing, every checksum is verified).
pub fn classify(frame: &[u8], meta: RxMeta) -> Parsed<'_> {
    let trusted = meta.checksum_trusted;
    let drop = |why| Parsed {
        src_mac: EthernetAddress([0; 6]),
        packet: GuestPacket::Drop(why),
        ip: &[],
    };
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return drop("short ethernet frame");
    };
    let src_mac = eth.src_addr();
    let (packet, ip) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => classify_v4(&frame[ETH_HEADER..], trusted),
        EthernetProtocol::Ipv6 => classify_v6(&frame[ETH_HEADER..], trusted),
        EthernetProtocol::Arp => (classify_arp(&frame[ETH_HEADER..]), &[][..]),
        _ => (GuestPacket::Drop("unsupported ethertype"), &[][..]),
    };
    Parsed {
        src_mac,
        packet,
        ip,
    }
}

fn classify_arp(bytes: &[u8]) -> GuestPacket<'_> {
    match ArpPacket::new_checked(bytes).and_then(|p| ArpRepr::parse(&p)) {
        Ok(ArpRepr::EthernetIpv4 {
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) => GuestPacket::Arp {
            sender: source_protocol_addr,
            target: target_protocol_addr,
        },
        _ => GuestPacket::Drop("malformed ARP"),
    }
}

fn classify_v4(bytes: &[u8], trusted: bool) -> (GuestPacket<'_>, &[u8]) {
    let Ok(ip) = Ipv4Packet::new_checked(bytes) else {
        return (GuestPacket::Drop("malformed IPv4 header"), &[]);
    };
    let checksums = rx_checksums(trusted);
    let Ok(repr) = Ipv4Repr::parse(&ip, &checksums) else {
        return (GuestPacket::Drop("invalid IPv4 header"), &[]);
    };
    // Without reassembly a fragment's payload would be taken for a whole
    // datagram; the stack does not reassemble, so fragments go.
    if ip.more_frags() || ip.frag_offset() != 0 {
        return (GuestPacket::Drop("IPv4 fragment"), &[]);
    }
    let whole = &bytes[..ip.total_len() as usize];
    let payload = &whole[ip.header_len() as usize..];
    let src = IpAddr::V4(repr.src_addr);
    let dst = IpAddr::V4(repr.dst_addr);
    let packet = match repr.next_header {
        IpProtocol::Tcp => classify_tcp(payload, src, dst, &checksums),
        IpProtocol::Udp => classify_udp(payload, src, dst, &checksums),
        IpProtocol::Icmp => {
            let Ok(pkt) = Icmpv4Packet::new_checked(payload) else {
                return (GuestPacket::Drop("malformed ICMP"), &[]);
            };
            match Icmpv4Repr::parse(&pkt, &checksums) {
                Ok(Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                }) => GuestPacket::IcmpEcho {
                    src,
                    dst,
                    ident,
                    seq: seq_no,
                    data,
                },
                Ok(_) => GuestPacket::Drop("ICMP other than echo request"),
                Err(_) => GuestPacket::Drop("invalid ICMP"),
            }
        }
        _ => GuestPacket::Drop("unsupported IPv4 protocol"),
    };
    (packet, whole)
}

fn classify_v6(bytes: &[u8], trusted: bool) -> (GuestPacket<'_>, &[u8]) {
    let checksums = rx_checksums(trusted);
    let Ok(ip) = Ipv6Packet::new_checked(bytes) else {
        return (GuestPacket::Drop("malformed IPv6 header"), &[]);
    };
    let Ok(repr) = Ipv6Repr::parse(&ip) else {
        return (GuestPacket::Drop("invalid IPv6 header"), &[]);
    };
    let whole = &bytes[..40 + repr.payload_len];
    let payload = &whole[40..];
    let src = IpAddr::V6(repr.src_addr);
    let dst = IpAddr::V6(repr.dst_addr);
    let packet = match repr.next_header {
        IpProtocol::Tcp => classify_tcp(payload, src, dst, &checksums),
        IpProtocol::Udp => classify_udp(payload, src, dst, &checksums),
        IpProtocol::Icmpv6 => {
            let Ok(pkt) = Icmpv6Packet::new_checked(payload) else {
                return (GuestPacket::Drop("malformed ICMPv6"), &[]);
            };
            match Icmpv6Repr::parse(&repr.src_addr, &repr.dst_addr, &pkt, &checksums) {
                Ok(Icmpv6Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                }) => GuestPacket::IcmpEcho {
                    src,
                    dst,
                    ident,
                    seq: seq_no,
                    data,
                },
                Ok(Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { .. })) => {
                    GuestPacket::RouterSolicit { src }
                }
                // Neighbour solicitations and adverts: smoltcp answers for the gateway.
                Ok(Icmpv6Repr::Ndisc(_)) => GuestPacket::Smoltcp,
                Ok(_) => GuestPacket::Drop("ICMPv6 other than echo or NDP"),
                Err(_) => GuestPacket::Drop("invalid ICMPv6"),
            }
        }
        // Hop-by-hop carries MLD reports; smoltcp parses and ignores them.
        IpProtocol::HopByHop => GuestPacket::Smoltcp,
        _ => GuestPacket::Drop("unsupported IPv6 next header"),
    };
    (packet, whole)
}

fn classify_tcp<'a>(
    payload: &'a [u8],
    src: IpAddr,
    dst: IpAddr,
    checksums: &ChecksumCapabilities,
) -> GuestPacket<'a> {
    let Ok(tcp) = TcpPacket::new_checked(payload) else {
        return GuestPacket::Drop("malformed TCP header");
    };
    if checksums.tcp.rx() && !tcp.verify_checksum(&src.into(), &dst.into()) {
        return GuestPacket::Drop("bad TCP checksum");
    }
    // Port 0 is no endpoint (smoltcp refuses such segments too); an RST back
    // would itself come from or go to port 0.
    if tcp.src_port() == 0 || tcp.dst_port() == 0 {
        return GuestPacket::Drop("TCP port 0");
    }
    let src = SocketAddr::new(src, tcp.src_port());
    let dst = SocketAddr::new(dst, tcp.dst_port());
    if tcp.syn() && !tcp.ack() && !tcp.rst() && !tcp.fin() {
        GuestPacket::TcpSyn { src, dst }
    } else {
        GuestPacket::Tcp {
            src,
            dst,
            rst: tcp.rst(),
        }
    }
}

fn classify_udp<'a>(
    payload: &'a [u8],
    src: IpAddr,
    dst: IpAddr,
    checksums: &ChecksumCapabilities,
) -> GuestPacket<'a> {
    let Ok(udp) = UdpPacket::new_checked(payload) else {
        return GuestPacket::Drop("malformed UDP header");
    };
    let (s, d): (IpAddress, IpAddress) = (src.into(), dst.into());
    let Ok(repr) = UdpRepr::parse(&udp, &s, &d, checksums) else {
        return GuestPacket::Drop("invalid UDP datagram");
    };
    // Source port 0 means "no replies" (RFC 768): a relayed reply would go to
    // port 0, which no UDP stack accepts.
    if repr.src_port == 0 {
        return GuestPacket::Drop("UDP from port 0");
    }
    GuestPacket::Udp {
        src: SocketAddr::new(src, repr.src_port),
        dst: SocketAddr::new(dst, repr.dst_port),
        payload: udp.payload(),
    }
}

/// Builds frames that the stack sends to the guest on its own account.
#[derive(Debug, Clone, Copy)]
pub struct FrameBuilder {
    pub gateway_mac: EthernetAddress,
    pub guest_mac: EthernetAddress,
}

impl FrameBuilder {
    /// An Ethernet frame around an IP packet whose payload (the last
    /// `payload_len` bytes) is left zeroed for the caller to write.
    pub fn raw_ip(
        &self,
        src: IpAddr,
        dst: IpAddr,
        proto: IpProtocol,
        payload_len: usize,
        hop_limit: u8,
    ) -> Option<Vec<u8>> {
        if src.is_ipv4() != dst.is_ipv4() {
            return None;
        }
        let ip = IpRepr::new(src.into(), dst.into(), proto, payload_len, hop_limit);
        let eth = EthernetRepr {
            src_addr: self.gateway_mac,
            dst_addr: self.guest_mac,
            ethertype: if src.is_ipv4() {
                EthernetProtocol::Ipv4
            } else {
                EthernetProtocol::Ipv6
            },
        };
        let mut frame = vec![0u8; ETH_HEADER + ip.buffer_len()];
        eth.emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        ip.emit(&mut frame[ETH_HEADER..], &ChecksumCapabilities::default());
        Some(frame)
    }

    /// An Ethernet frame around an IP packet whose payload `fill` writes.
    fn ip_frame(
        &self,
        src: IpAddr,
        dst: IpAddr,
        proto: IpProtocol,
        payload_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Option<Vec<u8>> {
        let mut frame = self.raw_ip(src, dst, proto, payload_len, HOP_LIMIT)?;
        let at = frame.len() - payload_len;
        fill(&mut frame[at..]);
        Some(frame)
    }

    /// A UDP datagram from `src` (a peer, or one of the stack's services) to the guest.
    pub fn udp(&self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
        let repr = UdpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
        };
        let len = 8 + payload.len();
        if len > u16::MAX as usize {
            return None;
        }
        let (s, d): (IpAddress, IpAddress) = (src.ip().into(), dst.ip().into());
        self.ip_frame(src.ip(), dst.ip(), IpProtocol::Udp, len, |buf| {
            repr.emit(
                &mut UdpPacket::new_unchecked(buf),
                &s,
                &d,
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            )
        })
    }

    pub fn echo_reply(
        &self,
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq: u16,
        data: &[u8],
    ) -> Option<Vec<u8>> {
        match (src, dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                let repr = Icmpv4Repr::EchoReply {
                    ident,
                    seq_no: seq,
                    data,
                };
                self.ip_frame(src, dst, IpProtocol::Icmp, repr.buffer_len(), |buf| {
                    repr.emit(
                        &mut Icmpv4Packet::new_unchecked(buf),
                        &ChecksumCapabilities::default(),
                    )
                })
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let repr = Icmpv6Repr::EchoReply {
                    ident,
                    seq_no: seq,
                    data,
                };
                self.ip_frame(src, dst, IpProtocol::Icmpv6, repr.buffer_len(), |buf| {
                    repr.emit(
                        &s,
                        &d,
                        &mut Icmpv6Packet::new_unchecked(buf),
                        &ChecksumCapabilities::default(),
                    )
                })
            }
            _ => None,
        }
    }

    /// An ICMP destination-unreachable quoting the guest's packet `offending`
    /// (a whole IP packet as `Parsed::ip` holds it), sent from `from`.
    pub fn unreachable(&self, from: IpAddr, offending: &[u8], why: Unreachable) -> Option<Vec<u8>> {
        match from {
            IpAddr::V4(_) => {
                let pkt = Ipv4Packet::new_checked(offending).ok()?;
                let header = Ipv4Repr::parse(&pkt, &ChecksumCapabilities::ignored()).ok()?;
                let hl = pkt.header_len() as usize;
                let data = &offending[hl..offending.len().min(hl + 8)];
                let reason = match why {
                    Unreachable::Prohibited => Icmpv4DstUnreachable::CommProhibited,
                    Unreachable::Host => Icmpv4DstUnreachable::HostUnreachable,
                    Unreachable::Port => Icmpv4DstUnreachable::PortUnreachable,
                };
                let repr = Icmpv4Repr::DstUnreachable {
                    reason,
                    header,
                    data,
                };
                self.ip_frame(
                    from,
                    IpAddr::V4(header.src_addr),
                    IpProtocol::Icmp,
                    repr.buffer_len(),
                    |buf| {
                        repr.emit(
                            &mut Icmpv4Packet::new_unchecked(buf),
                            &ChecksumCapabilities::default(),
                        )
                    },
                )
            }
            IpAddr::V6(from6) => {
                let pkt = Ipv6Packet::new_checked(offending).ok()?;
                let header = Ipv6Repr::parse(&pkt).ok()?;
                let room = ICMP_ERROR_MAX - 40 - 8 - 40;
                let data = &offending[40..offending.len().min(40 + room)];
                let reason = match why {
                    Unreachable::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
                    Unreachable::Host => Icmpv6DstUnreachable::AddrUnreachable,
                    Unreachable::Port => Icmpv6DstUnreachable::PortUnreachable,
                };
                let repr = Icmpv6Repr::DstUnreachable {
                    reason,
                    header,
                    data,
                };
                let to = header.src_addr;
                self.ip_frame(
                    from,
                    IpAddr::V6(to),
                    IpProtocol::Icmpv6,
                    repr.buffer_len(),
                    |buf| {
                        repr.emit(
                            &from6,
                            &to,
                            &mut Icmpv6Packet::new_unchecked(buf),
                            &ChecksumCapabilities::default(),
                        )
                    },
                )
            }
        }
    }

    /// An RST answering the guest's SYN: the connection was refused or denied.
    pub fn rst_for_syn(
        &self,
        offending: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Option<Vec<u8>> {
        let seq = syn_seq(offending, src.ip(), dst.ip())?;
        let repr = TcpRepr {
            src_port: dst.port(),
            dst_port: src.port(),
            control: TcpControl::Rst,
            seq_number: TcpSeqNumber(0),
            ack_number: Some(seq + 1),
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let (s, d): (IpAddress, IpAddress) = (dst.ip().into(), src.ip().into());
        self.ip_frame(
            dst.ip(),
            src.ip(),
            IpProtocol::Tcp,
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
}

/// The sequence number of the SYN in `ip` (a whole IP packet).
fn syn_seq(ip: &[u8], src: IpAddr, _dst: IpAddr) -> Option<TcpSeqNumber> {
    let hl = match src {
        IpAddr::V4(_) => Ipv4Packet::new_checked(ip).ok()?.header_len() as usize,
        IpAddr::V6(_) => 40,
    };
    let tcp = TcpPacket::new_checked(ip.get(hl..)?).ok()?;
    Some(tcp.seq_number())
}

/// Why a flow could not be relayed, as ICMP tells the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// The policy (or a cap) forbids it.
    Prohibited,
    /// The host could not reach the destination.
    Host,
    /// Nothing listens there.
    Port,
}

/// An IP packet with an empty UDP datagram from `src` to `dst`: what an ICMP
/// error about a UDP flow quotes when the original datagram is gone.
pub fn synthetic_udp(src: SocketAddr, dst: SocketAddr) -> Option<Vec<u8>> {
    let b = FrameBuilder {
        gateway_mac: EthernetAddress([0; 6]),
        guest_mac: EthernetAddress([0; 6]),
    };
    let mut frame = b.udp(src, dst, &[])?;
    frame.drain(..ETH_HEADER);
    Some(frame)
}
