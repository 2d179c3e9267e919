//! Writes the committed seed corpora under `fuzz/seeds/<target>/`:
//! `cargo run --example write_seeds` (from `fuzz/`). Frames are built with
//! smoltcp's wire builders; the malformed ones reproduce the classes of bugs
//! libslirp had (fragments, IHL, TCP data offset and options, urgent
//! pointer, bootp option lengths, zero-length and 64 KiB frames).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use slipway_fuzz::frames::{
    self, arp, dhcp_payload, dns_payload, ethernet, ip_frame, udp_datagram, GATEWAY_MAC,
    GATEWAY_V4, GATEWAY_V6_LL, GUEST_MAC, GUEST_V4, GUEST_V6, GUEST_V6_LL,
};
use slipway_fuzz::input::Enc;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DhcpMessageType, EthernetAddress, EthernetProtocol, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet,
    Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, NdiscRepr, RawHardwareAddress, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber,
};

const PEER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const DENIED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

// ----- raw guest frames -------------------------------------------------------

fn tcp(src: SocketAddr, dst: SocketAddr, control: TcpControl, seq: u32, payload: &[u8]) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: None,
        window_len: 64240,
        window_scale: (control == TcpControl::Syn).then_some(7),
        max_seg_size: (control == TcpControl::Syn).then_some(1460),
        sack_permitted: control == TcpControl::Syn,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let mut b = vec![0u8; repr.buffer_len()];
    let (s, d): (IpAddress, IpAddress) = (src.ip().into(), dst.ip().into());
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut b[..]),
        &s,
        &d,
        &ChecksumCapabilities::default(),
    );
    ip_frame(src.ip(), dst.ip(), IpProtocol::Tcp, &b)
}

/// A SYN-ACK, ACK, FIN or RST as a guest would send it with `ack` set.
fn tcp_acking(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let mut f = tcp(src, dst, control, seq, &[]);
    let at = 14 + if src.is_ipv4() { 20 } else { 40 };
    let mut p = TcpPacket::new_unchecked(&mut f[at..]);
    p.set_ack(true);
    p.set_ack_number(TcpSeqNumber(ack as i32));
    p.fill_checksum(&src.ip().into(), &dst.ip().into());
    f
}

fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    ip_frame(
        src.ip(),
        dst.ip(),
        IpProtocol::Udp,
        &udp_datagram(src, dst, payload),
    )
}

fn echo_v4(dst: Ipv4Addr) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoRequest {
        ident: 0x1234,
        seq_no: 1,
        data: b"ping",
    };
    let mut b = vec![0u8; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut b[..]),
        &ChecksumCapabilities::default(),
    );
    ip_frame(GUEST_V4.into(), dst.into(), IpProtocol::Icmp, &b)
}

fn echo_v4_data(dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoRequest {
        ident: 7,
        seq_no: 1,
        data,
    };
    let mut b = vec![0u8; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut b[..]),
        &ChecksumCapabilities::default(),
    );
    ip_frame(GUEST_V4.into(), dst.into(), IpProtocol::Icmp, &b)
}

fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, repr: Icmpv6Repr) -> Vec<u8> {
    let mut b = vec![0u8; repr.buffer_len()];
    repr.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut b[..]),
        &ChecksumCapabilities::default(),
    );
    let mut f = ip_frame(src.into(), dst.into(), IpProtocol::Icmpv6, &b);
    f[14 + 7] = 255; // NDP wants hop limit 255
    f
}

fn echo_v6(dst: Ipv6Addr) -> Vec<u8> {
    icmpv6(
        GUEST_V6,
        dst,
        Icmpv6Repr::EchoRequest {
            ident: 0x1234,
            seq_no: 1,
            data: b"ping6",
        },
    )
}

fn router_solicit() -> Vec<u8> {
    let all_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
    let lladdr = Some(RawHardwareAddress::from(GUEST_MAC));
    let mut f = icmpv6(
        GUEST_V6_LL,
        all_routers,
        Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr }),
    );
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 2]);
    f
}

fn neighbor_solicit(target: Ipv6Addr) -> Vec<u8> {
    let lladdr = Some(RawHardwareAddress::from(GUEST_MAC));
    icmpv6(
        GUEST_V6,
        target,
        Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: target,
            lladdr,
        }),
    )
}

fn dhcp(kind: DhcpMessageType, requested: Option<Ipv4Addr>, server: Option<Ipv4Addr>) -> Vec<u8> {
    let body = dhcp_payload(
        kind,
        0x3903_f326,
        requested,
        server,
        Ipv4Addr::UNSPECIFIED,
        false,
        &[],
    );
    let mut f = udp(
        sock(Ipv4Addr::UNSPECIFIED, 68),
        sock(Ipv4Addr::BROADCAST, 67),
        &body,
    );
    f[0..6].copy_from_slice(&EthernetAddress::BROADCAST.0);
    f
}

fn dns_query(v6: bool, name: &[&[u8]]) -> Vec<u8> {
    let q = dns_payload(0xbeef, 0x0100, 1, name, 1, &[]);
    if v6 {
        udp(sock(GUEST_V6, 5353), sock(frames::DNS_V6, 53), &q)
    } else {
        udp(sock(GUEST_V4, 5353), sock(frames::DNS_V4, 53), &q)
    }
}

/// Rewrite IPv4 header bytes of a whole frame and fix the header checksum.
fn poke_v4(mut f: Vec<u8>, edit: impl FnOnce(&mut Ipv4Packet<&mut [u8]>)) -> Vec<u8> {
    let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
    edit(&mut p);
    let hl = usize::from(p.header_len());
    if (20..=p.as_ref().len()).contains(&hl) {
        p.fill_checksum();
    }
    f
}

fn fragment(offset_bytes: u16, more: bool, body: &[u8]) -> Vec<u8> {
    let f = ip_frame(GUEST_V4.into(), PEER_V4.into(), IpProtocol::Udp, body);
    poke_v4(f, |p| {
        p.set_dont_frag(false);
        p.set_more_frags(more);
        p.set_frag_offset(offset_bytes);
        p.set_ident(0x4242);
    })
}

/// A TCP segment whose header bytes after the ports are given raw.
fn tcp_raw(header_tail: &[u8], payload: &[u8]) -> Vec<u8> {
    let (src, dst) = (sock(GUEST_V4, 40001), sock(PEER_V4, 80));
    let mut b = Vec::new();
    b.extend_from_slice(&src.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    b.extend_from_slice(header_tail);
    b.extend_from_slice(payload);
    if b.len() >= 20 {
        TcpPacket::new_unchecked(&mut b[..]).fill_checksum(&src.ip().into(), &dst.ip().into());
    }
    ip_frame(src.ip(), dst.ip(), IpProtocol::Tcp, &b)
}

fn cve_frames() -> Vec<(&'static str, Vec<u8>)> {
    let udp8 = udp_datagram(sock(GUEST_V4, 4000), sock(PEER_V4, 9), &[0xaa; 16]);
    let syn_tail = |offset_words: u8, flags: u8, urgent: u16| {
        let mut t = vec![
            0,
            0,
            0x10,
            0,
            0,
            0,
            0,
            0,
            offset_words << 4,
            flags,
            0xfa,
            0xf0,
            0,
            0,
        ];
        t.extend_from_slice(&urgent.to_be_bytes());
        t
    };
    let mut out = vec![
        ("frag-first", fragment(0, true, &udp8)),
        ("frag-overlap", fragment(8, true, &udp8)),
        ("frag-last-overlap", fragment(0, false, &udp8[4..])),
        // Offset 65528 plus 24 bytes runs past the 64 KiB an IPv4 datagram can be.
        ("frag-oversized", fragment(65528, false, &udp8)),
        (
            "ihl-below-5",
            poke_v4(echo_v4(PEER_V4), |p| p.set_header_len(16)),
        ),
        (
            "ihl-past-end",
            poke_v4(echo_v4(PEER_V4), |p| p.set_header_len(60)),
        ),
        (
            "total-len-past-frame",
            poke_v4(echo_v4(PEER_V4), |p| p.set_total_len(1500)),
        ),
        (
            "total-len-below-header",
            poke_v4(echo_v4(PEER_V4), |p| p.set_total_len(12)),
        ),
        ("ip-options-nop-eol", {
            let f = ip_frame(GUEST_V4.into(), PEER_V4.into(), IpProtocol::Udp, &udp8);
            let mut ip = f[14..].to_vec();
            ip.splice(20..20, [1, 1, 0x44, 8]);
            let mut f = ethernet(GUEST_MAC, GATEWAY_MAC, EthernetProtocol::Ipv4, &ip);
            let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
            p.set_header_len(24);
            p.set_total_len(ip.len() as u16);
            p.fill_checksum();
            f
        }),
        (
            "tcp-offset-past-segment",
            tcp_raw(&syn_tail(15, 0x02, 0), &[]),
        ),
        ("tcp-offset-below-5", tcp_raw(&syn_tail(2, 0x02, 0), &[])),
        (
            "tcp-header-truncated",
            tcp_raw(&syn_tail(5, 0x02, 0)[..8], &[]),
        ),
        (
            "tcp-mss-off-end",
            tcp_raw(&syn_tail(6, 0x02, 0), &[2, 40, 5, 0xb4]),
        ),
        (
            "tcp-opt-len-zero",
            tcp_raw(&syn_tail(6, 0x02, 0), &[8, 0, 1, 1]),
        ),
        (
            "tcp-wscale-255",
            tcp_raw(&syn_tail(6, 0x02, 0), &[3, 3, 255, 0]),
        ),
        (
            "tcp-sack-garbage",
            tcp_raw(
                &syn_tail(8, 0x02, 0),
                &[5, 34, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        ),
        (
            "tcp-urgent-past-data",
            tcp_raw(&syn_tail(5, 0x38, 0xffff), b"data"),
        ),
        ("tcp-syn-fin-rst", tcp_raw(&syn_tail(5, 0x07, 0), &[])),
        (
            "tcp-syn-with-data",
            tcp_raw(&syn_tail(5, 0x02, 0), b"early data"),
        ),
        ("udp-len-past-end", {
            let mut f = udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9), b"x");
            f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
            f
        }),
        ("udp-len-below-8", {
            let mut f = udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9), b"x");
            f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&3u16.to_be_bytes());
            f
        }),
        ("bootp-truncated", {
            let body = dhcp_payload(
                DhcpMessageType::Discover,
                7,
                None,
                None,
                Ipv4Addr::UNSPECIFIED,
                false,
                &[],
            );
            udp(
                sock(Ipv4Addr::UNSPECIFIED, 68),
                sock(Ipv4Addr::BROADCAST, 67),
                &body[..200],
            )
        }),
        ("dhcp-option-len-overflow", {
            // Message type option, then an option whose length runs 255 bytes past the end.
            let body = dhcp_payload(
                DhcpMessageType::Discover,
                7,
                None,
                None,
                Ipv4Addr::UNSPECIFIED,
                false,
                &[12, 255, b'h'],
            );
            udp(
                sock(Ipv4Addr::UNSPECIFIED, 68),
                sock(Ipv4Addr::BROADCAST, 67),
                &body,
            )
        }),
        ("dhcp-no-end-option", {
            let body = dhcp_payload(
                DhcpMessageType::Request,
                7,
                Some(GUEST_V4),
                Some(GATEWAY_V4),
                Ipv4Addr::UNSPECIFIED,
                false,
                &[50, 4, 10, 0, 2],
            );
            udp(
                sock(Ipv4Addr::UNSPECIFIED, 68),
                sock(Ipv4Addr::BROADCAST, 67),
                &body,
            )
        }),
        ("dns-pointer-loop", {
            let mut q = dns_payload(1, 0x0100, 1, &[], 1, &[]);
            q.splice(12..13, [0xc0, 12]);
            udp(sock(GUEST_V4, 5353), sock(frames::DNS_V4, 53), &q)
        }),
        ("dns-label-64", dns_query(false, &[&[b'a'; 64], b"com"])),
        (
            "dns-no-question",
            udp(
                sock(GUEST_V4, 5353),
                sock(frames::DNS_V4, 53),
                &dns_payload(1, 0x0100, 0, &[], 1, &[]),
            ),
        ),
        (
            "dns-response-flag",
            udp(
                sock(GUEST_V4, 5353),
                sock(frames::DNS_V4, 53),
                &dns_payload(1, 0x8180, 1, &[b"x"], 1, &[]),
            ),
        ),
        ("zero-length", Vec::new()),
        (
            "ethernet-only",
            ethernet(GUEST_MAC, GATEWAY_MAC, EthernetProtocol::Ipv4, &[]),
        ),
        ("ipv6-payload-len-past-end", {
            let mut f = echo_v6(PEER_V6);
            f[14 + 4..14 + 6].copy_from_slice(&4000u16.to_be_bytes());
            f
        }),
        ("ipv6-hop-by-hop", {
            let mut f = echo_v6(PEER_V6);
            f[14 + 6] = 0; // next header: hop-by-hop, whose body is the ICMPv6 bytes
            f
        }),
        ("icmp-echo-broadcast", echo_v4(Ipv4Addr::BROADCAST)),
        ("icmp-dst-unreachable-from-guest", {
            let inner = udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9), b"q");
            let mut b = vec![3, 3, 0, 0, 0, 0, 0, 0];
            b.extend_from_slice(&inner[14..14 + 28]);
            Icmpv4Packet::new_unchecked(&mut b[..]).fill_checksum();
            ip_frame(GUEST_V4.into(), PEER_V4.into(), IpProtocol::Icmp, &b)
        }),
    ];
    out.retain(|(_, f)| f.len() < 4096);
    out
}

fn good_frames() -> Vec<(&'static str, Vec<u8>)> {
    let (g, p) = (sock(GUEST_V4, 40000), sock(PEER_V4, 80));
    vec![
        ("dhcp-discover", dhcp(DhcpMessageType::Discover, None, None)),
        (
            "dhcp-request",
            dhcp(DhcpMessageType::Request, Some(GUEST_V4), Some(GATEWAY_V4)),
        ),
        (
            "dhcp-request-other-ip",
            dhcp(
                DhcpMessageType::Request,
                Some(Ipv4Addr::new(10, 0, 2, 99)),
                None,
            ),
        ),
        ("arp-request", arp(true, GUEST_MAC, GUEST_V4, GATEWAY_V4)),
        ("arp-reply", arp(false, GUEST_MAC, GUEST_V4, GATEWAY_V4)),
        ("tcp-syn", tcp(g, p, TcpControl::Syn, 1000, &[])),
        (
            "tcp-syn-denied",
            tcp(g, sock(DENIED_V4, 443), TcpControl::Syn, 1000, &[]),
        ),
        (
            "tcp-syn-gateway",
            tcp(g, sock(GATEWAY_V4, 22), TcpControl::Syn, 1000, &[]),
        ),
        (
            "tcp-syn-v6",
            tcp(
                sock(GUEST_V6, 40000),
                sock(PEER_V6, 80),
                TcpControl::Syn,
                1000,
                &[],
            ),
        ),
        ("tcp-synack", tcp_acking(g, p, TcpControl::Syn, 1000, 77)),
        ("tcp-ack", tcp_acking(g, p, TcpControl::None, 1001, 78)),
        ("tcp-fin", tcp_acking(g, p, TcpControl::Fin, 1001, 78)),
        ("tcp-rst", tcp(g, p, TcpControl::Rst, 1001, &[])),
        ("udp-dns-query", dns_query(false, &[b"example", b"com"])),
        ("udp-dns-query-v6", dns_query(true, &[b"example", b"org"])),
        (
            "udp-datagram",
            udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9999), b"hello"),
        ),
        ("icmp-echo", echo_v4(PEER_V4)),
        ("icmp-echo-gateway", echo_v4(GATEWAY_V4)),
        ("icmpv6-echo", echo_v6(PEER_V6)),
        ("ipv6-router-solicit", router_solicit()),
        (
            "ipv6-neighbor-solicit",
            neighbor_solicit(frames::GATEWAY_V6),
        ),
        ("ipv6-neighbor-solicit-ll", neighbor_solicit(GATEWAY_V6_LL)),
    ]
}

// ----- stack_frames inputs -----------------------------------------------------

const OPS: u32 = 10;
const EVENTS: u32 = 11;

struct Script(Enc);

impl Script {
    /// Setup: big MTU, roomy buffers, the given upstream (0 none, 1 v4, 2 v6),
    /// loopback aliases, the default policy (TEST-NET-1 denied).
    fn new(small_mtu: bool, upstream: u32) -> Self {
        Self::with_seed(small_mtu, upstream, 0x5eed)
    }
    /// The same over a link with checksum and TSO offloads (seed bit 8).
    fn offloaded(small_mtu: bool, upstream: u32) -> Self {
        Self::with_seed(small_mtu, upstream, 0x5eed | 0x100)
    }
    fn with_seed(small_mtu: bool, upstream: u32, seed: u64) -> Self {
        let mut e = Enc::default();
        e.bool(small_mtu)
            .bool(false)
            .variant(upstream, 3)
            .bool(true);
        e.variant(0, 6).u64(seed);
        Script(e)
    }
    fn raw(&mut self, frame: &[u8]) -> &mut Self {
        self.0.more().variant(1, OPS).bytes(frame);
        self
    }
    fn secs(&mut self, s: u8) -> &mut Self {
        self.0.more().variant(3, OPS).u8(s);
        self
    }
    fn next_timer(&mut self) -> &mut Self {
        self.0.more().variant(4, OPS);
        self
    }
    fn host(&mut self, pick: u8, event: u32) -> &mut Self {
        self.0
            .more()
            .variant(5, OPS)
            .u8(pick)
            .variant(event, EVENTS);
        self
    }
    fn host_bytes(&mut self, pick: u8, event: u32, b: &[u8]) -> &mut Self {
        self.host(pick, event).0.bytes(b);
        self
    }
    fn policy(&mut self, choice: u32) -> &mut Self {
        self.0.more().variant(6, OPS).variant(choice, 6);
        self
    }
    fn hold(&mut self, on: bool) -> &mut Self {
        self.0.more().variant(7, OPS).bool(on);
        self
    }
    /// A structured TCP segment on the first connection the harness follows,
    /// with the sequence and acknowledgement numbers the stack expects.
    fn tracked(&mut self, syn: bool, ack: bool, fin: bool, rst: bool, payload: &[u8]) -> &mut Self {
        let e = &mut self.0;
        e.more().variant(0, OPS); // Op::Frame
        e.variant(0, 3).variant(0, 4).variant(1, 4); // GuestFrame::Ip, guest MAC -> gateway MAC
        e.variant(0, 4); // Transport::Tcp
        e.variant(0, 2).u8(0); // TcpEnds::Tracked(0)
        e.variant(0, 3).variant(0, 3); // SeqNo::Expected, AckNo::All
        e.bool(syn)
            .bool(ack)
            .bool(fin)
            .bool(rst)
            .bool(!payload.is_empty())
            .bool(false);
        e.u8(0)
            .u16(64240)
            .u16(0)
            .bytes(&[])
            .bool(false)
            .bytes(payload);
        // V4Fields, V6Fields, no mangling, not batched.
        e.u16(1)
            .u8(64)
            .bool(true)
            .bool(false)
            .u16(0)
            .bytes(&[])
            .bool(false)
            .bool(false);
        e.u8(64).bool(false);
        e.bool(false).bool(false);
        self
    }
    fn done(&self) -> Vec<u8> {
        self.0 .0.clone()
    }
}

const CONNECTED: u32 = 0;
const CONNECT_FAILED: u32 = 1;
const SEND: u32 = 2;
const RECV: u32 = 4;
const EOF: u32 = 5;
const RESET: u32 = 6;
const DATAGRAM: u32 = 7;
const DATAGRAM_BIG: u32 = 8;
const ECHO_REPLY: u32 = 9;
const DATAGRAM_ERROR: u32 = 10;

fn stack_scripts() -> Vec<(&'static str, Vec<u8>)> {
    let (g, p) = (sock(GUEST_V4, 40000), sock(PEER_V4, 80));
    let (g6, p6) = (sock(GUEST_V6, 40000), sock(PEER_V6, 80));
    let mut out = Vec::new();
    out.push((
        "dhcp",
        Script::new(false, 0)
            .raw(&dhcp(DhcpMessageType::Discover, None, None))
            .raw(&dhcp(
                DhcpMessageType::Request,
                Some(GUEST_V4),
                Some(GATEWAY_V4),
            ))
            .done(),
    ));
    let session = |s: &mut Script| {
        s.host(0, CONNECTED)
            .tracked(false, true, false, false, b"")
            .tracked(false, true, false, false, b"GET / HTTP/1.0\r\n\r\n")
            .host(0, RECV)
            .0
            .u16(4096);
        s.host_bytes(0, SEND, b"HTTP/1.0 200 OK\r\n\r\nhello")
            .tracked(false, true, false, false, b"")
            .tracked(false, true, true, false, b"")
            .host(0, EOF)
            .tracked(false, true, false, false, b"")
            .secs(60)
            .next_timer();
    };
    let mut s = Script::new(false, 0);
    s.raw(&arp(true, GUEST_MAC, GUEST_V4, GATEWAY_V4))
        .raw(&tcp(g, p, TcpControl::Syn, 1000, &[]));
    session(&mut s);
    out.push(("tcp-session-v4", s.done()));
    let mut s = Script::new(true, 0);
    s.raw(&neighbor_solicit(frames::GATEWAY_V6))
        .raw(&tcp(g6, p6, TcpControl::Syn, 1000, &[]));
    session(&mut s);
    out.push(("tcp-session-v6", s.done()));
    // Over an offloading link at MTU 1500: 4 KiB of host bytes go out as one
    // segment for the link to cut.
    let neighbours = [
        arp(true, GUEST_MAC, GUEST_V4, GATEWAY_V4),
        neighbor_solicit(frames::GATEWAY_V6),
    ];
    for (name, guest, peer, hello) in [
        ("tcp-offloaded-v4", g, p, &neighbours[0]),
        ("tcp-offloaded-v6", g6, p6, &neighbours[1]),
    ] {
        let mut s = Script::offloaded(true, 0);
        s.raw(hello)
            .raw(&tcp(guest, peer, TcpControl::Syn, 1000, &[]));
        s.host(0, CONNECTED)
            .tracked(false, true, false, false, b"")
            .host_bytes(0, SEND, &[0x5a; 4000])
            .tracked(false, true, false, false, b"")
            .tracked(false, true, false, false, &[0xa5; 3000])
            .host(0, RECV)
            .0
            .u16(4096);
        s.secs(1).next_timer();
        out.push((name, s.done()));
    }
    let mut s = Script::new(false, 0);
    s.raw(&tcp(g, p, TcpControl::Syn, 1, &[]))
        .host(0, CONNECTED)
        .tracked(false, true, false, false, b"")
        .host(0, RESET)
        .raw(&tcp(sock(GUEST_V4, 40002), p, TcpControl::Syn, 1, &[]))
        .host(1, CONNECTED)
        .tracked(false, true, false, true, b"");
    out.push(("tcp-resets", s.done()));
    let mut s = Script::new(false, 0);
    s.raw(&tcp(g, sock(DENIED_V4, 443), TcpControl::Syn, 1, &[]))
        .raw(&tcp(g, p, TcpControl::Syn, 1, &[]))
        .host(0, CONNECT_FAILED)
        .0
        .u8(0);
    s.raw(&tcp(sock(GUEST_V4, 40003), p, TcpControl::Syn, 1, &[]))
        .host(1, CONNECT_FAILED)
        .0
        .u8(1);
    s.secs(30).next_timer();
    out.push(("tcp-refused-unreachable", s.done()));
    let mut s = Script::new(false, 0);
    for port in 0..10u16 {
        s.raw(&tcp(
            sock(GUEST_V4, 41000 + port),
            p,
            TcpControl::Syn,
            1,
            &[],
        ));
    }
    s.host(0, CONNECTED)
        .host(1, CONNECTED)
        .host(2, CONNECTED)
        .host(3, CONNECTED);
    for port in 10..14u16 {
        s.raw(&tcp(
            sock(GUEST_V4, 41000 + port),
            p,
            TcpControl::Syn,
            1,
            &[],
        ));
    }
    out.push(("tcp-caps", s.done()));
    let mut s = Script::new(true, 0);
    s.raw(&udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9999), b"hello"))
        .host_bytes(0, DATAGRAM, b"world")
        .host(0, DATAGRAM_ERROR)
        .0
        .u8(0);
    s.host(0, DATAGRAM_BIG).0.u16(1600).u8(0x55);
    s.secs(120).next_timer();
    out.push(("udp-relay", s.done()));
    let mut s = Script::new(false, 2);
    s.raw(&udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9999), b"hello"));
    s.host(0, DATAGRAM_BIG).0.u16(65507).u8(0x55);
    s.raw(&dns_query(false, &[b"example", b"com"]));
    s.host(1, DATAGRAM_BIG).0.u16(65527).u8(0);
    out.push(("udp-huge-replies", s.done()));
    let mut s = Script::new(false, 1);
    s.raw(&dns_query(false, &[b"example", b"com"])).host_bytes(
        0,
        DATAGRAM,
        &dns_payload(0xbeef, 0x8180, 1, &[b"example", b"com"], 1, &[]),
    );
    s.raw(&dns_query(true, &[b"example", b"org"]))
        .secs(11)
        .next_timer();
    out.push(("dns-forward", s.done()));
    let mut s = Script::new(false, 0);
    s.raw(&echo_v4(PEER_V4))
        .host(0, ECHO_REPLY)
        .0
        .bool(false)
        .u16(1)
        .bytes(b"ping");
    s.raw(&echo_v4(GATEWAY_V4))
        .raw(&echo_v6(PEER_V6))
        .host(1, ECHO_REPLY)
        .0
        .bool(true)
        .u16(1)
        .bytes(b"ping6");
    s.raw(&echo_v4(DENIED_V4));
    out.push(("icmp-echo", s.done()));
    let mut s = Script::new(false, 0);
    s.raw(&router_solicit())
        .raw(&neighbor_solicit(GATEWAY_V6_LL))
        .0
        .variant(9, OPS);
    out.push(("ipv6-ndp", s.done()));
    let mut s = Script::new(false, 0);
    s.raw(&tcp(g, p, TcpControl::Syn, 1, &[]))
        .host(0, CONNECTED)
        .tracked(false, true, false, false, b"")
        .raw(&udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9999), b"x"))
        .policy(3)
        .raw(&tcp(sock(GUEST_V4, 40009), p, TcpControl::Syn, 1, &[]))
        .policy(2)
        .raw(&udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9999), b"x"));
    out.push(("policy-swap", s.done()));
    let mut s = Script::new(false, 0);
    s.raw(&udp(sock(GUEST_V4, 4000), sock(PEER_V4, 9999), b"x"))
        .hold(true);
    for _ in 0..20 {
        s.host_bytes(0, DATAGRAM, b"flood");
    }
    s.0.more().variant(8, OPS);
    s.hold(false);
    out.push(("queue-cap", s.done()));
    let mut s = Script::new(false, 0);
    for (_, f) in cve_frames() {
        s.raw(&f);
    }
    out.push(("cve-classes", s.done()));
    out
}

// ----- the other targets --------------------------------------------------------

fn policy_inputs() -> Vec<(&'static str, Vec<u8>)> {
    // Entry: Raw(Text) = 0, Net = 1, AllTraffic = 2; Probe: V4 = 0, V6 = 1, Mapped = 2, Listed = 3.
    let raw = |e: &mut Enc, s: &str| {
        e.variant(0, 3).text(s);
    };
    let probes = |e: &mut Enc| {
        e.more().variant(0, 4).u8(192).u8(0).u8(2).u8(7).bool(false);
        e.more().variant(0, 4).u8(8).u8(8).u8(8).u8(8).bool(false);
        e.more().variant(0, 4).u8(10).u8(0).u8(2).u8(2).bool(true);
        e.more().variant(2, 4).u8(192).u8(0).u8(2).u8(7).bool(false);
        e.more()
            .variant(1, 4)
            .rest(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets())
            .bool(false);
        e.more().variant(3, 4).u8(0).bool(false);
        e.more().variant(3, 4).u8(1).bool(true);
    };
    let mut out = Vec::new();
    let mut e = Enc::default();
    e.u8(2);
    raw(&mut e, "192.0.2.7/32");
    raw(&mut e, " 2001:db8::/32 ");
    e.u8(2);
    raw(&mut e, "192.0.2.0/24");
    e.variant(2, 3);
    e.u8(1);
    raw(&mut e, "10.0.2.0/24");
    e.bool(true);
    probes(&mut e);
    out.push(("allow-beats-deny", e.0));
    let mut e = Enc::default();
    e.u8(0).u8(1);
    raw(&mut e, "ALL_TRAFFIC");
    e.u8(0).bool(true);
    probes(&mut e);
    out.push(("deny-all", e.0));
    let mut e = Enc::default();
    e.u8(1);
    raw(&mut e, "::ffff:192.0.2.0/120");
    e.u8(2);
    raw(&mut e, "64:ff9b::198.51.100.7");
    raw(&mut e, "0.0.0.0/0");
    e.u8(0).bool(false);
    probes(&mut e);
    out.push(("embedded-v4", e.0));
    let mut e = Enc::default();
    e.u8(1);
    raw(&mut e, "1.2.3.4/33");
    e.u8(0).u8(0).bool(true);
    out.push(("invalid-entry", e.0));
    out
}

fn dhcp_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let body = |kind, req, srv, tail: &[u8]| {
        let mut e = Enc::default();
        e.variant(0, 2).bytes(&dhcp_payload(
            kind,
            9,
            req,
            srv,
            Ipv4Addr::UNSPECIFIED,
            false,
            tail,
        ));
        e.0
    };
    vec![
        ("discover", body(DhcpMessageType::Discover, None, None, &[])),
        (
            "request",
            body(
                DhcpMessageType::Request,
                Some(GUEST_V4),
                Some(GATEWAY_V4),
                &[],
            ),
        ),
        (
            "request-nak",
            body(
                DhcpMessageType::Request,
                Some(Ipv4Addr::new(10, 0, 2, 99)),
                None,
                &[],
            ),
        ),
        (
            "request-other-server",
            body(
                DhcpMessageType::Request,
                Some(GUEST_V4),
                Some(Ipv4Addr::new(10, 0, 2, 9)),
                &[],
            ),
        ),
        ("release", body(DhcpMessageType::Release, None, None, &[])),
        (
            "option-overflow",
            body(DhcpMessageType::Discover, None, None, &[12, 255, b'h']),
        ),
        ("truncated", {
            let mut e = Enc::default();
            e.variant(0, 2).bytes(
                &dhcp_payload(
                    DhcpMessageType::Discover,
                    9,
                    None,
                    None,
                    Ipv4Addr::UNSPECIFIED,
                    false,
                    &[],
                )[..240],
            );
            e.0
        }),
    ]
}

fn dns_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let case = |v6: bool, q: &[u8], reply: Option<&[u8]>| {
        let mut e = Enc::default();
        e.bool(v6).variant(0, 2).bytes(q);
        match reply {
            Some(r) => e.bool(true).bytes(r),
            None => e.bool(false),
        };
        e.0
    };
    let q = dns_payload(0xbeef, 0x0100, 1, &[b"example", b"com"], 1, &[]);
    let a = dns_payload(0xbeef, 0x8180, 1, &[b"example", b"com"], 1, &[]);
    let mut ptr = dns_payload(1, 0x0100, 1, &[], 1, &[]);
    ptr.splice(12..13, [0xc0, 12]);
    vec![
        ("query-a", case(false, &q, Some(&a))),
        ("query-v6", case(true, &q, None)),
        ("pointer-loop", case(false, &ptr, None)),
        (
            "label-64",
            case(
                false,
                &dns_payload(1, 0x0100, 1, &[&[b'a'; 64]], 1, &[]),
                None,
            ),
        ),
        (
            "no-question",
            case(false, &dns_payload(1, 0x0100, 0, &[], 1, &[]), None),
        ),
        ("response", case(false, &a, None)),
        ("truncated-header", case(false, &q[..7], None)),
    ]
}

// ----- tcp_segments inputs -----------------------------------------------------

const SEG_OPS: u32 = 8;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
/// MSS 1460, SACK permitted, window scale 7.
const SYN_OPTIONS: [u8; 12] = [2, 4, 0x05, 0xb4, 4, 2, 1, 1, 1, 3, 3, 7];

/// Where a segment's sequence or acknowledgement number comes from.
enum Num {
    /// The stack's last ACK (for seq) or last sent end (for ack), plus this.
    Rel(i16),
    Raw(u32),
}

struct Segments(Enc);

impl Segments {
    fn new() -> Self {
        let mut e = Enc::default();
        e.bool(false).bool(false).u64(0x5eed);
        Segments(e)
    }
    fn num(&mut self, n: Num) {
        match n {
            Num::Rel(o) => self.0.variant(0, 3).u16(o as u16),
            Num::Raw(x) => self.0.variant(1, 3).u32(x),
        };
    }
    fn seg(
        &mut self,
        ends: u8,
        flags: u8,
        seq: Num,
        ack: Num,
        payload: u16,
        batch: bool,
    ) -> &mut Self {
        self.0.more().variant(0, SEG_OPS).u8(ends).u8(flags);
        self.num(seq);
        self.num(ack);
        let options: &[u8] = if flags & SYN != 0 { &SYN_OPTIONS } else { &[] };
        self.0.u16(64240).bytes(options).u16(payload).bool(batch);
        self
    }
    fn syn(&mut self, ends: u8, seq: u32) -> &mut Self {
        self.seg(ends, SYN, Num::Raw(seq), Num::Raw(0), 0, false)
    }
    /// A segment with the numbers the stack expects.
    fn next(&mut self, ends: u8, flags: u8, payload: u16) -> &mut Self {
        self.seg(ends, flags, Num::Rel(0), Num::Rel(0), payload, false)
    }
    fn host(&mut self, pick: u8, event: u32) -> &mut Self {
        self.0
            .more()
            .variant(1, SEG_OPS)
            .u8(pick)
            .variant(event, EVENTS);
        self
    }
    fn millis(&mut self, ms: u16) -> &mut Self {
        self.0.more().variant(2, SEG_OPS).u16(ms);
        self
    }
    fn reset_flows(&mut self) -> &mut Self {
        self.0.more().variant(5, SEG_OPS);
        self
    }
    fn policy(&mut self, allow: bool) -> &mut Self {
        self.0.more().variant(6, SEG_OPS).bool(allow);
        self
    }
    fn done(&self) -> Vec<u8> {
        self.0 .0.clone()
    }
}

/// The red-team crash (issue 11): SYN with seq 2^31, the host connect
/// succeeds, the guest resets the SYN-ACK; then a SYN from another port and
/// an RST of seq 2^31+1 in one batch.
fn red_team_crash() -> Vec<u8> {
    Segments::new()
        .syn(0, 0x8000_0000)
        .host(0, CONNECTED)
        .seg(0, RST, Num::Raw(0x8000_0001), Num::Raw(0), 0, false)
        .seg(1, SYN, Num::Raw(0), Num::Raw(0), 0, true)
        .seg(1, RST, Num::Raw(0x8000_0001), Num::Raw(0), 0, false)
        .host(1, CONNECTED)
        .done()
}

fn tcp_segment_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("red-team-crash", red_team_crash()),
        (
            "handshake-data-close",
            Segments::new()
                .syn(0, 1000)
                .host(0, CONNECTED)
                .next(0, ACK, 0)
                .next(0, PSH | ACK, 300)
                .host(0, RECV)
                .next(0, FIN | ACK, 0)
                .host(0, EOF)
                .millis(100)
                .next(0, ACK, 0)
                .done(),
        ),
        (
            "reset-and-reuse",
            Segments::new()
                .syn(2, 7)
                .host(0, CONNECTED)
                .next(2, ACK, 0)
                .reset_flows()
                .syn(2, 7)
                .host(0, CONNECTED)
                .next(2, ACK, 10)
                .done(),
        ),
        (
            "rst-while-connecting",
            Segments::new()
                .syn(3, 5)
                .seg(3, RST, Num::Raw(6), Num::Raw(0), 0, false)
                .syn(3, 5)
                .host(0, CONNECTED)
                .host(1, CONNECTED)
                .done(),
        ),
        (
            "policy-flip-mid-flow",
            Segments::new()
                .syn(1, 99)
                .host(0, CONNECTED)
                .next(1, ACK, 0)
                .policy(false)
                .next(1, PSH | ACK, 10)
                .policy(true)
                .syn(1, 99)
                .done(),
        ),
        (
            "out-of-window-everything",
            Segments::new()
                .syn(0, 1)
                .host(0, CONNECTED)
                .next(0, ACK, 0)
                .seg(0, ACK, Num::Raw(0x7fff_ffff), Num::Rel(-1), 50, true)
                .seg(0, RST | ACK, Num::Rel(1), Num::Rel(0), 0, true)
                .seg(0, SYN | ACK, Num::Rel(-1), Num::Rel(1000), 0, false)
                .done(),
        ),
    ]
}

// ----- resolver inputs ---------------------------------------------------------

const RES_OPS: u32 = 7;

struct Resolver(Enc);

impl Resolver {
    /// `names`: bit 0 `*.allowed.test`, bit 1 `exact.test`, bit 2 `*`.
    fn new(names: u8) -> Self {
        let mut e = Enc::default();
        e.u8(names);
        Resolver(e)
    }
    /// Ask for `NAMES[i]` (0 app.allowed.test, 3 exact.test, 4 evil.test, …).
    fn ask(&mut self, i: u8, aaaa: bool) -> &mut Self {
        self.0.more().variant(0, RES_OPS).u8(i).bool(aaaa);
        self
    }
    /// Answer with A records: (variant of Addr: 0 public, 1 internal, 2 v6, 3 open; byte; ttl).
    fn answer(&mut self, addrs: &[(u32, u8, u16)], cname: bool) -> &mut Self {
        self.0
            .more()
            .variant(2, RES_OPS)
            .variant(0, 2)
            .u8(addrs.len() as u8);
        for &(kind, x, ttl) in addrs {
            self.0.variant(kind, 4).u8(x).u16(ttl);
        }
        self.0.bool(cname);
        self
    }
    fn tcp(&mut self, kind: u32, x: u8) -> &mut Self {
        self.0.more().variant(3, RES_OPS).variant(kind, 4).u8(x);
        self
    }
    fn udp(&mut self, kind: u32, x: u8) -> &mut Self {
        self.0.more().variant(4, RES_OPS).variant(kind, 4).u8(x);
        self
    }
    fn secs(&mut self, s: u8) -> &mut Self {
        self.0.more().variant(5, RES_OPS).u8(s);
        self
    }
    fn names(&mut self, bits: u8) -> &mut Self {
        self.0.more().variant(6, RES_OPS).u8(bits);
        self
    }
    fn done(&self) -> Vec<u8> {
        self.0 .0.clone()
    }
}

fn resolver_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "allowed-answer-pins",
            Resolver::new(1)
                .ask(0, false)
                .answer(&[(0, 7, 300)], false)
                .tcp(0, 7)
                .udp(0, 7)
                .tcp(0, 8)
                .done(),
        ),
        (
            "denied-never-forwarded",
            Resolver::new(3)
                .ask(4, false)
                .ask(5, true)
                .ask(7, false)
                .done(),
        ),
        (
            "rebinding-answer",
            Resolver::new(1)
                .ask(1, false)
                .answer(&[(1, 1, 60), (0, 9, 60), (1, 2, 60)], true)
                .tcp(1, 1)
                .tcp(0, 9)
                .done(),
        ),
        (
            "pin-expires",
            Resolver::new(2)
                .ask(3, false)
                .answer(&[(0, 5, 1)], false)
                .secs(59)
                .tcp(0, 5)
                .secs(2)
                .tcp(0, 5)
                .done(),
        ),
        (
            "policy-swap",
            Resolver::new(7)
                .ask(4, false)
                .answer(&[(0, 4, 600)], false)
                .tcp(0, 4)
                .names(1)
                .tcp(0, 4)
                .tcp(3, 1)
                .done(),
        ),
    ]
}

fn write(dir: &Path, target: &str, seeds: Vec<(&str, Vec<u8>)>) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("create the seed folder");
    for (name, bytes) in seeds {
        std::fs::write(d.join(name), bytes).expect("write a seed");
    }
}

/// Crash inputs found by fuzzing, rewritten in the current input encoding
/// (the first finds predate it); each failed before its fix.
fn regressions() -> Vec<(&'static str, Vec<u8>)> {
    let g = sock(GUEST_V4, 40000);
    vec![
        // Three guest segments panicked smoltcp 0.14 (issue 11).
        ("tcp_segments-red-team-crash", red_team_crash()),
        // A guest SYN to port 0 was answered with an RST from port 0.
        ("stack_frames-rst-from-port-0", {
            let mut s = Script::new(false, 0);
            s.raw(&tcp(g, sock(PEER_V4, 0), TcpControl::Syn, 1, &[]));
            s.raw(&tcp(g, sock(DENIED_V4, 0), TcpControl::Syn, 1, &[]));
            s.raw(&tcp(
                sock(GUEST_V4, 0),
                sock(PEER_V4, 80),
                TcpControl::Syn,
                1,
                &[],
            ));
            s.done()
        }),
        // An echo request to the gateway over the link MTU got an echo reply over it too.
        ("stack_frames-echo-reply-over-mtu", {
            let big = [0x0a; 1500];
            let req = Icmpv6Repr::EchoRequest {
                ident: 1,
                seq_no: 1,
                data: &big,
            };
            let mut s = Script::new(true, 0);
            s.raw(&icmpv6(GUEST_V6, frames::GATEWAY_V6, req));
            s.raw(&echo_v4_data(GATEWAY_V4, &big));
            s.done()
        }),
        // UDP from guest port 0 opened a flow whose replies went to port 0.
        ("stack_frames-udp-reply-to-port-0", {
            let mut s = Script::new(false, 0);
            s.raw(&udp(sock(GUEST_V4, 0), sock(PEER_V4, 9999), b"x"));
            s.host_bytes(0, DATAGRAM, b"y");
            s.done()
        }),
    ]
}

// ----- first_bytes inputs --------------------------------------------------------

const FB_OPS: u32 = 8;

struct FirstBytes(Enc);

impl FirstBytes {
    fn new(names: u8) -> Self {
        let mut e = Enc::default();
        e.u8(names);
        FirstBytes(e)
    }
    /// A flow to an address (Addr variant: 0 public, 1 internal, 2 v6,
    /// 3 open) on port 443/80/22/8443 (0..4), sending a ClientHello.
    fn hello(&mut self, kind: u32, x: u8, port: u8, name: u8) -> &mut Self {
        self.0.more().variant(0, FB_OPS).variant(kind, 4).u8(x).u8(port);
        self.0.variant(0, 3).u8(name).u8(100);
        self
    }
    fn http(&mut self, kind: u32, x: u8, port: u8, host: u8, absolute: Option<u8>) -> &mut Self {
        self.0.more().variant(0, FB_OPS).variant(kind, 4).u8(x).u8(port);
        self.0.variant(1, 3).u8(host);
        match absolute {
            Some(a) => self.0.bool(true).u8(a),
            None => self.0.bool(false),
        };
        self
    }
    fn send(&mut self, flow: u8, len: u16) -> &mut Self {
        self.0.more().variant(1, FB_OPS).u8(flow).u16(len);
        self
    }
    fn fin(&mut self, flow: u8) -> &mut Self {
        self.0.more().variant(2, FB_OPS).u8(flow);
        self
    }
    fn answer(&mut self, addrs: &[(u32, u8, u16)]) -> &mut Self {
        self.0
            .more()
            .variant(4, FB_OPS)
            .variant(0, 2)
            .u8(addrs.len() as u8);
        for &(kind, x, ttl) in addrs {
            self.0.variant(kind, 4).u8(x).u16(ttl);
        }
        self
    }
    fn connect(&mut self, ok: bool) -> &mut Self {
        self.0.more().variant(5, FB_OPS).bool(ok);
        self
    }
    fn ms(&mut self, quarter_ms: u16) -> &mut Self {
        self.0.more().variant(6, FB_OPS).u16(quarter_ms);
        self
    }
    fn names(&mut self, bits: u8) -> &mut Self {
        self.0.more().variant(7, FB_OPS).u8(bits);
        self
    }
    fn done(&self) -> Vec<u8> {
        self.0 .0.clone()
    }
}

fn first_bytes_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "sni-split-dialed",
            FirstBytes::new(1)
                .hello(0, 9, 0, 0)
                .send(0, 3)
                .send(0, 40)
                .send(0, 4000)
                .answer(&[])
                .answer(&[(0, 7, 60)])
                .connect(true)
                .fin(0)
                .done(),
        ),
        (
            "host-dialed-on-8443",
            FirstBytes::new(3)
                .http(0, 9, 3, 3, None)
                .send(0, 10)
                .send(0, 500)
                .answer(&[(0, 5, 60)])
                .connect(true)
                .done(),
        ),
        (
            "denied-and-fronting-names",
            FirstBytes::new(1)
                .hello(0, 9, 0, 4)
                .send(0, 4000)
                .http(0, 9, 1, 0, Some(4))
                .send(1, 4000)
                .hello(3, 9, 0, 4)
                .send(2, 4000)
                .connect(true)
                .done(),
        ),
        (
            "internal-answer-not-dialed",
            FirstBytes::new(1)
                .hello(1, 1, 0, 1)
                .send(0, 4000)
                .answer(&[(1, 1, 60), (1, 2, 60)])
                .answer(&[(1, 3, 60)])
                .done(),
        ),
        (
            "silence-times-out",
            FirstBytes::new(1)
                .hello(0, 9, 2, 0)
                .send(0, 20)
                .ms(1000)
                .ms(1000)
                .done(),
        ),
        (
            "policy-swap-mid-dial",
            FirstBytes::new(1)
                .hello(0, 9, 0, 0)
                .send(0, 4000)
                .names(2)
                .answer(&[(0, 7, 60)])
                .connect(true)
                .done(),
        ),
    ]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regressions_dir = root.join("regressions");
    for (name, bytes) in regressions() {
        std::fs::write(regressions_dir.join(name), bytes).expect("write a regression input");
    }
    let dir = root.join("seeds");
    let mut classify = good_frames();
    classify.extend(cve_frames());
    // The one 64 KiB case lives only here, where inputs are raw frames.
    let mut big = ethernet(
        GUEST_MAC,
        GATEWAY_MAC,
        EthernetProtocol::Ipv4,
        &vec![0u8; 65535 - 14],
    );
    {
        let mut p = Ipv4Packet::new_unchecked(&mut big[14..]);
        p.set_version(4);
        p.set_header_len(20);
        p.set_total_len(65535 - 14);
        p.set_next_header(IpProtocol::Udp);
        p.set_src_addr(GUEST_V4);
        p.set_dst_addr(PEER_V4);
        p.fill_checksum();
    }
    classify.push(("frame-65535", big));
    write(&dir, "classify", classify);
    let mut stack: Vec<(&str, Vec<u8>)> = stack_scripts();
    // Every raw frame as a one-op script too, so the fuzzer has each alone.
    for (name, f) in good_frames() {
        stack.push((name, Script::new(false, 1).raw(&f).done()));
    }
    write(&dir, "stack_frames", stack);
    write(&dir, "policy_parse", policy_inputs());
    write(&dir, "dhcp", dhcp_inputs());
    write(&dir, "dns", dns_inputs());
    write(&dir, "vnet", vnet_inputs());
    write(&dir, "tcp_segments", tcp_segment_inputs());
    write(&dir, "resolver", resolver_inputs());
    write(&dir, "first_bytes", first_bytes_inputs());
    write(&dir, "vhost_queues", vhost_queue_inputs());
    write(&dir, "socks_reply", socks_reply_inputs());
    write(&dir, "header_rewrite", slipway_fuzz::header_rewrite::seeds());
}

/// The socks_reply target: a mode byte (bit 0: username/password offered;
/// bit 1: an IPv6 target; bit 2: a name), the method and login answers,
/// then the CONNECT reply and what the proxy relays behind it.
fn socks_reply_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let with = |mode: u8, reply: &[u8]| [&[mode, 5, 2, 1, 0][..], reply].concat();
    let mut name = vec![5, 0, 0, 3, 10];
    name.extend_from_slice(b"proxy.test");
    name.extend_from_slice(&[0, 80]);
    let mut v6 = vec![5, 0, 0, 4];
    v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    v6.extend_from_slice(&[0x1f, 0x90]);
    vec![
        (
            "v4-then-data",
            with(1, b"\x05\x00\x00\x01\xc6\x33\x64\x01\x04\x38SSH-2.0"),
        ),
        ("v6", with(3, &v6)),
        ("name", with(5, &name)),
        ("refused", with(0, &[5, 5])),
        ("not-socks", with(1, b"HTTP/1.1 400 Bad Request\r\n")),
        ("bad-atyp", with(0, &[5, 0, 0, 2, 1, 2, 3])),
        ("empty-name", with(4, &[5, 0, 0, 3, 0, 0, 80])),
        ("short", with(6, &[5, 0, 0])),
    ]
}

/// The vnet target: a mode byte (bit 0: IPv6; the MTU grows with it), then
/// frame bytes.
fn vnet_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let with = |mode: u8, rest: &[u8]| [&[mode][..], rest].concat();
    vec![
        ("tso-v4", with(2, &[0x11; 3000])),
        ("tso-v6", with(3, &[0x22; 3000])),
        ("small-v4", with(0, b"hello")),
        ("empty", with(1, &[])),
        ("garbage-frame", with(0, &[0x45; 60])),
    ]
}

// ----- vhost_queues -----------------------------------------------------------

/// Where a descriptor points (fuzz/src/vhost_queues.rs: `Addr`).
#[derive(Clone, Copy)]
enum At {
    /// Offset into the data region (guest address 0x4000 + offset).
    Data(u32),
    /// Offset into the ring region (the guest's own rings).
    Ring(u16),
    Hole(u16),
    /// This far before the end of guest memory.
    End(u16),
    Raw(u64),
}

const VQ_DATA: u64 = 0x4000;
const NEXT: u8 = 1;
const WRITE: u8 = 2;
const INDIRECT: u8 = 4;

/// The vhost_queues input (`Input`): features, queue size, MTU, then steps
/// in `Step`'s encoding.
struct Vq {
    head: Enc,
    steps: Vec<Enc>,
}

impl Vq {
    /// `features`: bit 0 VERSION_1, 1 MRG_RXBUF, 2 GUEST_CSUM, 3 GUEST_TSO4+6,
    /// 4 HOST_TSO4, 5 EVENT_IDX; a queue of `1 << size_log2`; MTU 1500.
    fn new(features: u8, size_log2: u8) -> Vq {
        let mut head = Enc::default();
        head.u8(features).u8(size_log2).u16(1500 - 576);
        Vq {
            head,
            steps: Vec::new(),
        }
    }

    fn step(&mut self, variant: u32) -> &mut Enc {
        let mut e = Enc::default();
        e.variant(variant, 8);
        self.steps.push(e);
        self.steps.last_mut().unwrap()
    }

    fn desc(e: &mut Enc, at: At, len: u32, flags: u8, next: u16) {
        match at {
            At::Data(o) => e.variant(0, 5).u32(o),
            At::Ring(o) => e.variant(1, 5).u16(o),
            At::Hole(o) => e.variant(2, 5).u16(o),
            At::End(b) => e.variant(3, 5).u16(b),
            At::Raw(a) => e.variant(4, 5).u64(a),
        };
        match u16::try_from(len) {
            Ok(small) => e.variant(0, 2).u16(small),
            Err(_) => e.variant(1, 2).u32(len),
        };
        e.u8(flags).u16(next);
    }

    fn put(&mut self, tx: bool, index: u8, at: At, len: u32, flags: u8, next: u16) -> &mut Self {
        let e = self.step(0);
        e.bool(tx).u8(index);
        Self::desc(e, at, len, flags, next);
        self
    }

    fn post(&mut self, tx: bool, head: u16) -> &mut Self {
        self.step(1).bool(tx).u16(head);
        self
    }

    fn avail_idx(&mut self, tx: bool, idx: u16) -> &mut Self {
        self.step(2).bool(tx).u16(idx);
        self
    }

    fn write(&mut self, at: u32, bytes: &[u8]) -> &mut Self {
        self.step(3).u32(at).bytes(bytes);
        self
    }

    fn take(&mut self, budget: u8) -> &mut Self {
        self.step(4).u8(budget);
        self
    }

    fn deliver_raw(&mut self, len: u16, offload: bool) -> &mut Self {
        self.step(5).variant(0, 3).u16(len).u8(0x77).bool(offload);
        self
    }

    fn deliver_max(&mut self, offload: bool) -> &mut Self {
        self.step(5).variant(1, 3).bool(offload);
        self
    }

    fn deliver_tcp(&mut self, v6: bool, payload: u16, offload: bool) -> &mut Self {
        self.step(5)
            .variant(2, 3)
            .bool(v6)
            .u16(payload)
            .u8(0x33)
            .bool(offload);
        self
    }

    fn reset(&mut self, tx: bool) -> &mut Self {
        self.step(6).bool(tx);
        self
    }

    /// A chain from `index` on, posted.
    fn chain(&mut self, tx: bool, index: u8, descs: &[(At, u32, u8)]) -> &mut Self {
        let e = self.step(7);
        e.bool(tx).u8(index).u8(descs.len() as u8);
        for &(at, len, flags) in descs {
            Self::desc(e, at, len, flags, 0);
        }
        self
    }

    fn done(&mut self) -> Vec<u8> {
        let mut out = self.head.0.clone();
        out.push(self.steps.len() as u8);
        for s in &self.steps {
            out.extend_from_slice(&s.0);
        }
        out
    }
}

/// A virtio-net header: flags, gso_type, csum_start/offset, num_buffers 0.
fn vnet_header(flags: u8, gso: u8, csum: (u16, u16)) -> Vec<u8> {
    let mut h = vec![flags, gso, 0, 0, 0, 0];
    h.extend_from_slice(&csum.0.to_le_bytes());
    h.extend_from_slice(&csum.1.to_le_bytes());
    h.extend_from_slice(&[0, 0]);
    h
}

/// One split-ring descriptor as the guest lays it out in an indirect table.
fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

fn vhost_queue_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let frame: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let v1_mrg = 0b11;
    vec![
        // A frame behind its header in three descriptors.
        (
            "tx-frame-in-pieces",
            Vq::new(v1_mrg, 3)
                .write(0, &vnet_header(0, 0, (0, 0)))
                .write(0x100, &frame[..60])
                .chain(
                    true,
                    0,
                    &[
                        (At::Data(0), 12, 0),
                        (At::Data(0x100), 30, 0),
                        (At::Data(0x11e), 30, 0),
                    ],
                )
                .take(4)
                .done(),
        ),
        // Header and frame in one descriptor, as Linux lays them out with
        // VERSION_1; then the frame straddles two.
        ("tx-header-and-frame-together", {
            let mut one = vnet_header(0, 0, (0, 0));
            one.extend_from_slice(&frame[..200]);
            Vq::new(v1_mrg, 2)
                .write(0, &one)
                .chain(true, 0, &[(At::Data(0), 212, 0)])
                .chain(true, 1, &[(At::Data(0), 100, 0), (At::Data(100), 112, 0)])
                .take(4)
                .done()
        }),
        // NEEDS_CSUM at 34+16; a TCPV4 super-frame with HOST_TSO; UDP GSO refused.
        (
            "tx-csum-and-gso",
            Vq::new(v1_mrg | 1 << 4, 3)
                .write(0, &vnet_header(1, 0, (34, 16)))
                .write(0x20, &vnet_header(1, 1, (34, 16)))
                .write(0x40, &vnet_header(0, 3, (0, 0)))
                .write(0x100, &frame)
                .chain(true, 0, &[(At::Data(0), 12, 0), (At::Data(0x100), 1000, 0)])
                .chain(
                    true,
                    2,
                    &[(At::Data(0x20), 12, 0), (At::Data(0x100), 1000, 0)],
                )
                .chain(
                    true,
                    4,
                    &[(At::Data(0x40), 12, 0), (At::Data(0x100), 1000, 0)],
                )
                .take(8)
                .done(),
        ),
        // 64 KiB into mergeable 4 KiB buffers; then a TSO segment finds no
        // room (EVENT_IDX: the kick is armed), the guest posts more.
        ("rx-mergeable-64k", {
            let mut q = Vq::new(0b111111, 6);
            for i in 0..20u8 {
                q.chain(false, i, &[(At::Data(u32::from(i) * 0x1000), 4096, WRITE)]);
            }
            q.deliver_max(false).deliver_tcp(false, 60000, true);
            for i in 20..40u8 {
                q.chain(false, i, &[(At::Data(u32::from(i) * 0x1000), 4096, WRITE)]);
            }
            q.deliver_tcp(true, 60000, true).done()
        }),
        // Legacy 10-byte headers, no merging: too big for one buffer, then a fit.
        (
            "rx-legacy-one-buffer",
            Vq::new(0, 1)
                .chain(false, 0, &[(At::Data(0), 1526, WRITE)])
                .chain(false, 1, &[(At::Data(0x1000), 1526, WRITE)])
                .deliver_raw(9000, false)
                .deliver_raw(60, false)
                .deliver_tcp(false, 100, true)
                .done(),
        ),
        // Every kind of bad transmit chain the virtq unit tests know.
        (
            "tx-hostile-chains",
            Vq::new(v1_mrg, 4)
                .put(true, 0, At::Data(0), 100, NEXT, 1)
                .put(true, 1, At::Data(0x100), 100, NEXT, 0)
                .post(true, 0)
                .put(true, 2, At::Data(0), 100, NEXT, 5000)
                .post(true, 2)
                .chain(true, 3, &[(At::Raw(1 << 32), 1500, 0)])
                .chain(true, 4, &[(At::Hole(0x10), 1500, 0)])
                .chain(true, 5, &[(At::End(100), 1500, 0)])
                .chain(true, 6, &[(At::Data(0), u32::MAX, 0)])
                .chain(true, 7, &[(At::Data(0), 100, WRITE)])
                .chain(true, 8, &[(At::Raw(u64::MAX - 10), 1500, INDIRECT)])
                .post(true, 999)
                .take(32)
                .done(),
        ),
        // Receive buffers over the guest's own descriptor table, through an
        // indirect table (and one outside memory), an available index that
        // jumps, and a queue set up again.
        ("rx-hostile-buffers", {
            let mut table = raw_desc(VQ_DATA + 0x9000, 2048, 2 | 1, 1);
            table.extend(raw_desc(VQ_DATA + 0xa000, 2048, 2, 0));
            Vq::new(v1_mrg, 3)
                .chain(false, 0, &[(At::Ring(0), 0x80, WRITE)])
                .write(0x8000, &table)
                .chain(false, 1, &[(At::Data(0x8000), 32, INDIRECT)])
                .chain(false, 2, &[(At::Raw(1 << 40), 64, INDIRECT)])
                .chain(false, 3, &[(At::Data(0x1000), 8, WRITE)])
                .post(false, 200)
                .chain(false, 4, &[(At::Data(0x2000), 4096, WRITE)])
                .deliver_raw(60, false)
                .deliver_raw(3000, false)
                .deliver_raw(1000, false)
                .avail_idx(false, 40000)
                .deliver_raw(60, false)
                .reset(false)
                .avail_idx(false, 2)
                .deliver_raw(60, false)
                .done()
        }),
    ]
}
