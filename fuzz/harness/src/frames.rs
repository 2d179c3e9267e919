//! Guest frames built from arbitrary fields: structurally valid Ethernet +
//! IPv4/IPv6 + TCP/UDP/ICMP (checksums right unless asked otherwise), so the
//! fuzzer gets past `classify` and deep into the core, with optional
//! malformations of exactly the fields past slirp CVEs lived in (IHL, total
//! length, fragments, TCP data offset, urgent pointer, UDP length).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;

use super::input::{Bytes, List};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress, EthernetProtocol, Icmpv4Packet,
    Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, NdiscRepr,
    RawHardwareAddress, TcpPacket, UdpPacket,
};

pub use super::kit::{
    arp, ethernet_from as ethernet, DNS_V4, DNS_V6, GATEWAY_MAC, GATEWAY_V4, GATEWAY_V6,
    GATEWAY_V6_LL, GUEST_MAC, GUEST_V4, GUEST_V6, GUEST_V6_LL, LOOPBACK_ALIAS_V4,
    LOOPBACK_ALIAS_V6,
};

/// Largest IP packet a structured frame carries; keeps inputs cheap.
const MAX_BODY: usize = 2048;

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Mac {
    Guest,
    Gateway,
    Broadcast,
    Other([u8; 6]),
}

impl Mac {
    fn addr(self) -> EthernetAddress {
        match self {
            Mac::Guest => GUEST_MAC,
            Mac::Gateway => GATEWAY_MAC,
            Mac::Broadcast => EthernetAddress::BROADCAST,
            Mac::Other(b) => EthernetAddress(b),
        }
    }
}

/// Addresses that matter to the stack, and a way out to any other.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Host {
    Guest,
    Gateway,
    Dns,
    LoopbackAlias,
    /// TEST-NET-1 (192.0.2.x / 2001:db8:dead::x): the harness policy denies it.
    Denied(u8),
    /// TEST-NET-2/3 (198.51.100.x, 203.0.113.x / 2001:db8:1::x).
    Public(u8),
    Internal(u8),
    Multicast,
    Broadcast,
    Raw([u8; 16]),
}

impl Host {
    pub fn v4(self) -> Ipv4Addr {
        match self {
            Host::Guest => GUEST_V4,
            Host::Gateway => GATEWAY_V4,
            Host::Dns => DNS_V4,
            Host::LoopbackAlias => LOOPBACK_ALIAS_V4,
            Host::Denied(x) => Ipv4Addr::new(192, 0, 2, x),
            Host::Public(x) if x & 1 == 0 => Ipv4Addr::new(198, 51, 100, x),
            Host::Public(x) => Ipv4Addr::new(203, 0, 113, x),
            Host::Internal(x) => Ipv4Addr::new(169, 254, 169, x),
            Host::Multicast => Ipv4Addr::new(224, 0, 0, 251),
            Host::Broadcast => Ipv4Addr::BROADCAST,
            Host::Raw(b) => Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        }
    }

    pub fn v6(self) -> Ipv6Addr {
        match self {
            Host::Guest => GUEST_V6,
            Host::Gateway => GATEWAY_V6,
            Host::Dns => DNS_V6,
            Host::LoopbackAlias => LOOPBACK_ALIAS_V6,
            Host::Denied(x) => Ipv6Addr::new(0x2001, 0xdb8, 0xdead, 0, 0, 0, 0, x.into()),
            Host::Public(x) => Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, x.into()),
            Host::Internal(x) => Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, x.into()),
            Host::Multicast => Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb),
            Host::Broadcast => Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            Host::Raw(b) => Ipv6Addr::from(b),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Port {
    Well(u8),
    Raw(u16),
}

impl Port {
    fn get(self) -> u16 {
        const WELL: [u16; 9] = [80, 443, 53, 67, 68, 0, 22, 8080, 49152];
        match self {
            Port::Well(i) => WELL[usize::from(i) % WELL.len()],
            Port::Raw(p) => p,
        }
    }
}

/// Overwrites applied to the finished IP packet, before checksums are fixed.
#[derive(Arbitrary, Debug, Clone)]
pub struct Mangle {
    pub pokes: List<(u16, u8)>,
    /// Cut the IP packet to this many bytes (keeps the Ethernet header).
    pub truncate: Option<u16>,
    /// Leave checksums as the mangling left them.
    pub keep_bad_checksums: bool,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct V4Fields {
    pub ident: u16,
    pub ttl: u8,
    pub dont_frag: bool,
    pub more_frags: bool,
    /// In 8-byte units, as on the wire.
    pub frag_offset: u16,
    /// IP options bytes (padded to a multiple of four, at most 40).
    pub options: Bytes,
    pub ihl_override: Option<u8>,
    pub total_len_override: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct V6Fields {
    pub hop_limit: u8,
    pub payload_len_override: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Ip {
    V4 { src: Host, dst: Host },
    V6 { src: Host, dst: Host },
}

/// Where a TCP segment goes: a connection the harness has seen the stack
/// answer on (so seq/ack can follow it), or fresh endpoints.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum TcpEnds {
    Tracked(u8),
    Fresh {
        v6: bool,
        src: Host,
        sport: Port,
        dst: Host,
        dport: Port,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum SeqNo {
    /// What the stack expects next from the guest (its last ACK number).
    Expected,
    /// Expected plus an offset: out of window, overlapping, old.
    Off(i32),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum AckNo {
    /// Everything the stack sent, acknowledged.
    All,
    Off(i32),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct TcpFields {
    pub ends: TcpEnds,
    pub seq: SeqNo,
    pub ack: AckNo,
    pub syn: bool,
    pub ack_flag: bool,
    pub fin: bool,
    pub rst: bool,
    pub psh: bool,
    pub urg: bool,
    pub ece_cwr: u8,
    pub window: u16,
    pub urgent: u16,
    /// Raw options: MSS, window scale, SACK, timestamps or garbage running off the end.
    pub options: Bytes,
    pub data_offset_override: Option<u8>,
    pub payload: Bytes,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum UdpBody {
    Raw(Bytes),
    Dhcp(DhcpFields),
    Dns(DnsQuery),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct UdpFields {
    pub src: Host,
    pub sport: Port,
    pub dst: Host,
    pub dport: Port,
    pub v6: bool,
    pub body: UdpBody,
    pub len_override: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct DhcpFields {
    pub kind: u8,
    pub xid: u32,
    pub requested: Option<Host>,
    pub server_id: Option<Host>,
    pub client_ip: Host,
    pub broadcast: bool,
    /// Extra options appended raw after the emitted ones (lengths may lie).
    pub tail: Bytes,
}

impl DhcpFields {
    pub fn payload(&self) -> Vec<u8> {
        let message_type = match self.kind % 8 {
            0 => DhcpMessageType::Discover,
            1 => DhcpMessageType::Request,
            2 => DhcpMessageType::Decline,
            3 => DhcpMessageType::Release,
            4 => DhcpMessageType::Inform,
            5 => DhcpMessageType::Offer,
            6 => DhcpMessageType::Ack,
            _ => DhcpMessageType::Nak,
        };
        dhcp_payload(
            message_type,
            self.xid,
            self.requested.map(Host::v4),
            self.server_id.map(Host::v4),
            self.client_ip.v4(),
            self.broadcast,
            &self.tail,
        )
    }
}

/// A DHCP client message as a guest's DHCP client writes it.
pub fn dhcp_payload(
    message_type: DhcpMessageType,
    xid: u32,
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    client_ip: Ipv4Addr,
    broadcast: bool,
    tail: &[u8],
) -> Vec<u8> {
    let repr = DhcpRepr {
        message_type,
        transaction_id: xid,
        secs: 0,
        client_hardware_address: GUEST_MAC,
        client_ip,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast,
        requested_ip: requested,
        client_identifier: Some(GUEST_MAC),
        server_identifier: server_id,
        parameter_request_list: Some(&[1, 3, 6, 26]),
        dns_servers: None,
        max_size: Some(1500),
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut body = vec![0u8; repr.buffer_len()];
    if repr
        .emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
        .is_err()
    {
        return body;
    }
    if !tail.is_empty() {
        // Drop the END option and append the raw tail where options continue.
        if let Some(end) = body.iter().rposition(|&b| b == 0xff) {
            body.truncate(end);
        }
        body.extend_from_slice(&tail[..tail.len().min(512)]);
    }
    body
}

#[derive(Arbitrary, Debug, Clone)]
pub struct DnsQuery {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub labels: List<Bytes>,
    pub qtype: u16,
    /// Raw bytes after the question: compression pointers, more questions, junk.
    pub tail: Bytes,
}

impl DnsQuery {
    pub fn payload(&self) -> Vec<u8> {
        let labels: Vec<&[u8]> = self
            .labels
            .iter()
            .take(8)
            .map(|l| &l[..l.len().min(70)])
            .collect();
        dns_payload(
            self.id,
            self.flags,
            self.qdcount,
            &labels,
            self.qtype,
            &self.tail,
        )
    }
}

pub fn dns_payload(
    id: u16,
    flags: u16,
    qdcount: u16,
    labels: &[&[u8]],
    qtype: u16,
    tail: &[u8],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&qdcount.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    for l in labels {
        // A label length byte as it is, so lengths of 64..=255 (pointers, reserved) occur.
        p.push(l.len() as u8);
        p.extend_from_slice(l);
    }
    p.push(0);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&tail[..tail.len().min(256)]);
    p
}

#[derive(Arbitrary, Debug, Clone)]
pub enum IcmpFields {
    Echo {
        ident: u16,
        seq: u16,
        data: Bytes,
    },
    /// Any type and code, the rest raw.
    Raw {
        kind: u8,
        code: u8,
        body: Bytes,
    },
    RouterSolicit {
        lladdr: bool,
    },
    NeighborSolicit {
        target: Host,
        lladdr: bool,
    },
    NeighborAdvert {
        target: Host,
    },
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Transport {
    Tcp(TcpFields),
    Udp(UdpFields),
    Icmp {
        src: Host,
        dst: Host,
        v6: bool,
        f: IcmpFields,
    },
    Other {
        ip: Ip,
        proto: u8,
        body: Bytes,
    },
}

#[derive(Arbitrary, Debug, Clone)]
pub enum GuestFrame {
    Ip {
        src_mac: Mac,
        dst_mac: Mac,
        transport: Transport,
        v4: V4Fields,
        v6: V6Fields,
        mangle: Option<Mangle>,
    },
    Arp {
        request: bool,
        sender_mac: Mac,
        sender: Host,
        target: Host,
    },
    Ether {
        ethertype: u16,
        body: Bytes,
    },
}

/// What the harness knows of one TCP connection from the stack's frames.
#[derive(Debug, Clone, Copy)]
pub struct TcpTrack {
    pub guest: SocketAddr,
    pub peer: SocketAddr,
    /// The stack's last ACK number: the guest's next sequence number.
    pub expect: u32,
    /// The stack's last sequence number plus what it occupied.
    pub sent_end: u32,
}

fn cap(v: &[u8], n: usize) -> &[u8] {
    &v[..v.len().min(n)]
}

fn pad4(opts: &[u8]) -> Vec<u8> {
    let mut o = cap(opts, 40).to_vec();
    o.resize(o.len().div_ceil(4) * 4, 0);
    o
}

impl GuestFrame {
    /// The frame's bytes; `tracks` are the TCP connections seen so far.
    pub fn build(&self, tracks: &[TcpTrack]) -> Vec<u8> {
        match self {
            GuestFrame::Ip {
                src_mac,
                dst_mac,
                transport,
                v4,
                v6,
                mangle,
            } => {
                let Some((src, dst, proto, body)) = transport_bytes(transport, tracks) else {
                    return Vec::new();
                };
                let ip = match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, proto, &body, v4),
                    (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, proto, &body, v6),
                    _ => return Vec::new(),
                };
                let ethertype = if src.is_ipv4() {
                    EthernetProtocol::Ipv4
                } else {
                    EthernetProtocol::Ipv6
                };
                let mut ip = ip;
                if let Some(m) = mangle {
                    for &(at, val) in m.pokes.iter().take(16) {
                        let len = ip.len().max(1);
                        if let Some(b) = ip.get_mut(usize::from(at) % len) {
                            *b = val;
                        }
                    }
                    if !m.keep_bad_checksums {
                        fix_checksums(&mut ip, src, dst, proto);
                    }
                    if let Some(t) = m.truncate {
                        ip.truncate(usize::from(t));
                    }
                }
                ethernet(src_mac.addr(), dst_mac.addr(), ethertype, &ip)
            }
            GuestFrame::Arp {
                request,
                sender_mac,
                sender,
                target,
            } => arp(*request, sender_mac.addr(), sender.v4(), target.v4()),
            GuestFrame::Ether { ethertype, body } => ethernet(
                GUEST_MAC,
                GATEWAY_MAC,
                EthernetProtocol::from(*ethertype),
                cap(body, MAX_BODY),
            ),
        }
    }
}

fn pick_ip(v6: bool, h: Host) -> IpAddr {
    if v6 {
        IpAddr::V6(h.v6())
    } else {
        IpAddr::V4(h.v4())
    }
}

type Body = (IpAddr, IpAddr, IpProtocol, Vec<u8>);

fn transport_bytes(t: &Transport, tracks: &[TcpTrack]) -> Option<Body> {
    match t {
        Transport::Tcp(f) => {
            let (src, dst, track) = match f.ends {
                TcpEnds::Tracked(i) if !tracks.is_empty() => {
                    let t = tracks[usize::from(i) % tracks.len()];
                    (t.guest, t.peer, Some(t))
                }
                TcpEnds::Tracked(_) => (
                    SocketAddr::new(IpAddr::V4(GUEST_V4), 40000),
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 80),
                    None,
                ),
                TcpEnds::Fresh {
                    v6,
                    src,
                    sport,
                    dst,
                    dport,
                } => (
                    SocketAddr::new(pick_ip(v6, src), sport.get()),
                    SocketAddr::new(pick_ip(v6, dst), dport.get()),
                    None,
                ),
            };
            let expect = track.map_or(0x1000, |t| t.expect);
            let sent = track.map_or(0, |t| t.sent_end);
            let seq = match f.seq {
                SeqNo::Expected => expect,
                SeqNo::Off(o) => expect.wrapping_add(o as u32),
                SeqNo::Raw(s) => s,
            };
            let ack = match f.ack {
                AckNo::All => sent,
                AckNo::Off(o) => sent.wrapping_add(o as u32),
                AckNo::Raw(a) => a,
            };
            let body = tcp_segment(src, dst, seq, ack, f);
            Some((src.ip(), dst.ip(), IpProtocol::Tcp, body))
        }
        Transport::Udp(f) => {
            let src = SocketAddr::new(pick_ip(f.v6, f.src), f.sport.get());
            let dst = SocketAddr::new(pick_ip(f.v6, f.dst), f.dport.get());
            let payload = match &f.body {
                UdpBody::Raw(b) => cap(b, MAX_BODY).to_vec(),
                UdpBody::Dhcp(d) => d.payload(),
                UdpBody::Dns(q) => q.payload(),
            };
            let mut body = udp_datagram(src, dst, &payload);
            if let Some(len) = f.len_override {
                UdpPacket::new_unchecked(&mut body[..]).set_len(len);
            }
            Some((src.ip(), dst.ip(), IpProtocol::Udp, body))
        }
        Transport::Icmp { src, dst, v6, f } => {
            let (s, d) = (pick_ip(*v6, *src), pick_ip(*v6, *dst));
            let (proto, body) = match (s, d) {
                (IpAddr::V4(_), IpAddr::V4(_)) => (IpProtocol::Icmp, icmpv4(f)),
                (IpAddr::V6(s6), IpAddr::V6(d6)) => (IpProtocol::Icmpv6, icmpv6(s6, d6, f)),
                _ => return None,
            };
            Some((s, d, proto, body))
        }
        Transport::Other { ip, proto, body } => {
            let (s, d) = match ip {
                Ip::V4 { src, dst } => (pick_ip(false, *src), pick_ip(false, *dst)),
                Ip::V6 { src, dst } => (pick_ip(true, *src), pick_ip(true, *dst)),
            };
            Some((s, d, IpProtocol::from(*proto), cap(body, MAX_BODY).to_vec()))
        }
    }
}

/// A whole guest frame around one TCP segment between explicit ends, with
/// plain IP headers and right checksums.
pub(crate) fn tcp_frame(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    f: &TcpFields,
) -> Vec<u8> {
    let segment = tcp_segment(src, dst, seq, ack, f);
    ip_frame(src.ip(), dst.ip(), IpProtocol::Tcp, &segment)
}

/// The guest's first words on the link, an ARP request and a neighbour
/// solicitation for the gateway, from which the stack learns its MAC.
pub(crate) fn guest_hello() -> [Vec<u8>; 2] {
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: GATEWAY_V6,
        lladdr: Some(RawHardwareAddress::from(GUEST_MAC)),
    });
    let mut b = vec![0u8; ns.buffer_len()];
    ns.emit(
        &GUEST_V6,
        &GATEWAY_V6,
        &mut Icmpv6Packet::new_unchecked(&mut b[..]),
        &ChecksumCapabilities::default(),
    );
    let mut ns = ip_frame(GUEST_V6.into(), GATEWAY_V6.into(), IpProtocol::Icmpv6, &b);
    ns[14 + 7] = 255; // NDP wants hop limit 255
    [arp(true, GUEST_MAC, GUEST_V4, GATEWAY_V4), ns]
}

fn tcp_segment(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, f: &TcpFields) -> Vec<u8> {
    let opts = pad4(&f.options);
    let payload = cap(&f.payload, MAX_BODY);
    let hl = 20 + opts.len();
    let mut b = vec![0u8; hl + payload.len()];
    b[0..2].copy_from_slice(&src.port().to_be_bytes());
    b[2..4].copy_from_slice(&dst.port().to_be_bytes());
    b[4..8].copy_from_slice(&seq.to_be_bytes());
    b[8..12].copy_from_slice(&ack.to_be_bytes());
    let offset = f.data_offset_override.unwrap_or((hl / 4) as u8);
    b[12] = (offset << 4) | (f.ece_cwr & 0x01);
    let flags = u8::from(f.fin)
        | u8::from(f.syn) << 1
        | u8::from(f.rst) << 2
        | u8::from(f.psh) << 3
        | u8::from(f.ack_flag) << 4
        | u8::from(f.urg) << 5
        | (f.ece_cwr & 0xc0);
    b[13] = flags;
    b[14..16].copy_from_slice(&f.window.to_be_bytes());
    b[18..20].copy_from_slice(&f.urgent.to_be_bytes());
    b[20..hl].copy_from_slice(&opts);
    b[hl..].copy_from_slice(payload);
    tcp_checksum(&mut b, src.ip(), dst.ip());
    b
}

fn tcp_checksum(b: &mut [u8], src: IpAddr, dst: IpAddr) {
    if b.len() < 20 {
        return;
    }
    let mut p = TcpPacket::new_unchecked(b);
    p.fill_checksum(&IpAddress::from(src), &IpAddress::from(dst));
}

pub fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 8 + payload.len()];
    let mut p = UdpPacket::new_unchecked(&mut b[..]);
    p.set_src_port(src.port());
    p.set_dst_port(dst.port());
    p.set_len((8 + payload.len()) as u16);
    p.payload_mut().copy_from_slice(payload);
    p.fill_checksum(&src.ip().into(), &dst.ip().into());
    b
}

fn icmpv4(f: &IcmpFields) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    match f {
        IcmpFields::Echo { ident, seq, data } => {
            let repr = Icmpv4Repr::EchoRequest {
                ident: *ident,
                seq_no: *seq,
                data: cap(data, MAX_BODY),
            };
            let mut b = vec![0u8; repr.buffer_len()];
            repr.emit(&mut Icmpv4Packet::new_unchecked(&mut b[..]), &caps);
            b
        }
        IcmpFields::Raw { kind, code, body } => {
            let mut b = vec![*kind, *code, 0, 0];
            b.extend_from_slice(cap(body, MAX_BODY));
            while b.len() < 8 {
                b.push(0);
            }
            Icmpv4Packet::new_unchecked(&mut b[..]).fill_checksum();
            b
        }
        // NDP has no IPv4 form: send an echo instead.
        _ => icmpv4(&IcmpFields::Echo {
            ident: 1,
            seq: 1,
            data: Bytes::default(),
        }),
    }
}

fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, f: &IcmpFields) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let repr = match f {
        IcmpFields::Echo { ident, seq, data } => Icmpv6Repr::EchoRequest {
            ident: *ident,
            seq_no: *seq,
            data: cap(data, MAX_BODY),
        },
        IcmpFields::Raw { kind, code, body } => {
            let mut b = vec![*kind, *code, 0, 0];
            b.extend_from_slice(cap(body, MAX_BODY));
            while b.len() < 8 {
                b.push(0);
            }
            Icmpv6Packet::new_unchecked(&mut b[..]).fill_checksum(&src, &dst);
            return b;
        }
        IcmpFields::RouterSolicit { lladdr } => Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit {
            lladdr: lladdr.then(|| RawHardwareAddress::from(GUEST_MAC)),
        }),
        IcmpFields::NeighborSolicit { target, lladdr } => {
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                target_addr: target.v6(),
                lladdr: lladdr.then(|| RawHardwareAddress::from(GUEST_MAC)),
            })
        }
        IcmpFields::NeighborAdvert { target } => Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: smoltcp::wire::NdiscNeighborFlags::SOLICITED,
            target_addr: target.v6(),
            lladdr: Some(RawHardwareAddress::from(GUEST_MAC)),
        }),
    };
    let mut b = vec![0u8; repr.buffer_len()];
    repr.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut b[..]),
        &caps,
    );
    b
}

fn ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    body: &[u8],
    f: &V4Fields,
) -> Vec<u8> {
    let opts = pad4(&f.options);
    let hl = 20 + opts.len();
    let mut b = vec![0u8; hl + body.len()];
    b[hl..].copy_from_slice(body);
    b[20..hl].copy_from_slice(&opts);
    let total = (hl + body.len()).min(usize::from(u16::MAX)) as u16;
    let mut p = Ipv4Packet::new_unchecked(&mut b[..]);
    p.set_version(4);
    p.set_header_len(hl as u8);
    p.set_total_len(f.total_len_override.unwrap_or(total));
    p.set_ident(f.ident);
    p.clear_flags();
    p.set_dont_frag(f.dont_frag);
    p.set_more_frags(f.more_frags);
    p.set_frag_offset(f.frag_offset.wrapping_mul(8));
    p.set_hop_limit(f.ttl.max(1));
    p.set_next_header(proto);
    p.set_src_addr(src);
    p.set_dst_addr(dst);
    if let Some(ihl) = f.ihl_override {
        b[0] = 0x40 | (ihl & 0x0f);
    }
    ipv4_checksum(&mut b);
    b
}

fn ipv4_checksum(b: &mut [u8]) {
    let hl = usize::from(b.first().map_or(0, |v| v & 0x0f)) * 4;
    if hl < 20 || hl > b.len() {
        return;
    }
    let mut p = Ipv4Packet::new_unchecked(&mut b[..]);
    p.fill_checksum();
}

fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: IpProtocol,
    body: &[u8],
    f: &V6Fields,
) -> Vec<u8> {
    let mut b = vec![0u8; 40 + body.len()];
    b[40..].copy_from_slice(body);
    let mut p = Ipv6Packet::new_unchecked(&mut b[..]);
    p.set_version(6);
    p.set_payload_len(f.payload_len_override.unwrap_or(body.len() as u16));
    p.set_next_header(proto);
    p.set_hop_limit(if f.hop_limit == 0 { 255 } else { f.hop_limit });
    p.set_src_addr(src);
    p.set_dst_addr(dst);
    b
}

/// Recompute the IP and transport checksums after pokes, where the headers still allow it.
fn fix_checksums(ip: &mut [u8], src: IpAddr, dst: IpAddr, proto: IpProtocol) {
    let at = match src {
        IpAddr::V4(_) => {
            ipv4_checksum(ip);
            usize::from(ip.first().map_or(0, |v| v & 0x0f)) * 4
        }
        IpAddr::V6(_) => 40,
    };
    let Some(l4) = ip.get_mut(at..) else {
        return;
    };
    match proto {
        IpProtocol::Tcp => tcp_checksum(l4, src, dst),
        IpProtocol::Udp if l4.len() >= 8 => {
            l4[6] = 0;
            l4[7] = 0;
            let mut p = UdpPacket::new_unchecked(l4);
            if usize::from(p.len()) <= p.as_ref().len() && p.len() >= 8 {
                p.fill_checksum(&src.into(), &dst.into());
            }
        }
        IpProtocol::Icmp if l4.len() >= 4 => Icmpv4Packet::new_unchecked(l4).fill_checksum(),
        IpProtocol::Icmpv6 if l4.len() >= 4 => {
            if let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) {
                Icmpv6Packet::new_unchecked(l4).fill_checksum(&s, &d);
            }
        }
        _ => {}
    }
}

/// A whole guest frame around an IP packet built from plain fields (for seeds and tests).
pub fn ip_frame(src: IpAddr, dst: IpAddr, proto: IpProtocol, body: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let f = V4Fields {
                ident: 1,
                ttl: 64,
                dont_frag: true,
                more_frags: false,
                frag_offset: 0,
                options: Bytes::default(),
                ihl_override: None,
                total_len_override: None,
            };
            ethernet(
                GUEST_MAC,
                GATEWAY_MAC,
                EthernetProtocol::Ipv4,
                &ipv4_packet(s, d, proto, body, &f),
            )
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let f = V6Fields {
                hop_limit: 64,
                payload_len_override: None,
            };
            ethernet(
                GUEST_MAC,
                GATEWAY_MAC,
                EthernetProtocol::Ipv6,
                &ipv6_packet(s, d, proto, body, &f),
            )
        }
        _ => Vec::new(),
    }
}
