//! A guest for the sans-IO core: a second smoltcp interface on an in-memory
//! link, a fake clock the test moves, and builders and parsers for the frames
//! tests write by hand. Nothing here sleeps or touches a socket.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use netstack::policy::{EgressPolicy, PolicySpec};
use netstack::wire::RxMeta;
use netstack::{FlowId, HostEvent, HostRequest, Offloads, Stack, StackConfig};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame,
    EthernetProtocol, EthernetRepr, HardwareAddress, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet,
    Icmpv6Repr, IpAddress, IpCidr, IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, NdiscRepr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
pub const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);
pub const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
pub const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const GATEWAY_V6_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
/// The guest's EUI-64 link-local address, the source of its router solicitations.
pub const GUEST_V6_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0x00ff, 0xfe12, 0x3456);

/// The guest's link MTU; the stack's own is larger, so MSS is the guest's choice.
const GUEST_MTU: usize = 1500;

pub fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A policy from E2B-style lists; panics on a bad entry (tests spell them out).
pub fn policy(allow_out: &[&str], deny_out: &[&str]) -> EgressPolicy {
    let spec = PolicySpec {
        allow_out: allow_out.iter().map(|s| s.to_string()).collect(),
        deny_out: deny_out.iter().map(|s| s.to_string()).collect(),
        ..PolicySpec::new()
    };
    EgressPolicy::from_spec(&spec).expect("test policy parses")
}

/// A small deterministic PRNG (xorshift64*), so no test needs a `rand` dependency.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` for tests; `n` must not be 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

// ----- the guest's link -----------------------------------------------------

/// The guest's NIC: frames wait in one queue per direction.
#[derive(Default)]
pub struct Link {
    pub to_guest: VecDeque<Vec<u8>>,
    pub from_guest: VecDeque<Vec<u8>>,
    /// Like a tap with checksum and TSO offloads, as the guest's kernel sees
    /// it: the guest sends TCP without checksums (64 KiB segments over IPv4),
    /// and takes whole super-frames without checking theirs (local delivery
    /// of CHECKSUM_PARTIAL).
    pub offloaded: bool,
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.to_guest.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.from_guest)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.from_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = GUEST_MTU + netstack::wire::ETH_HEADER;
        if self.offloaded {
            caps.checksum.tcp = phy::Checksum::None;
            // IPv4 only: smoltcp drops IPv6 super-frames over the MTU.
            caps.segmentation.tcpv4 = std::num::NonZeroUsize::new(netstack::wire::MAX_FRAME);
        }
        caps
    }
}

pub struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

// ----- stack + guest --------------------------------------------------------

/// The stack under test, a smoltcp guest wired to it, and the test as driver:
/// host requests pile up in `requests` for the test to answer.
pub struct Pair {
    pub stack: Stack,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub link: Link,
    /// The guest interface's clock; the stack's runs on `base` (see `at`).
    pub now: Instant,
    /// The caller's clock at the guest's `Instant::ZERO`.
    pub base: std::time::Instant,
    pub requests: VecDeque<HostRequest>,
    /// Every frame the stack sent, oldest first, until the test clears it.
    pub sent: Vec<Vec<u8>>,
    /// Every frame the guest interface sent, oldest first.
    pub guest_sent: Vec<Vec<u8>>,
    /// What the link says of each guest frame.
    pub rx_meta: RxMeta,
    next_port: u16,
}

/// How much fake time `run_until` may spend waiting for a condition.
const PATIENCE: Duration = Duration::from_secs(30);
/// The fake clock's step when nothing moves on the link.
const TICK: Duration = Duration::from_millis(10);

impl Pair {
    pub fn new(cfg: StackConfig, policy: EgressPolicy) -> Self {
        Self::with_link(cfg, policy, Link::default())
    }

    /// A pair over a link with checksum and TSO offloads both ways.
    pub fn offloaded(cfg: StackConfig, policy: EgressPolicy) -> Self {
        let link = Link {
            offloaded: true,
            ..Link::default()
        };
        let mut p = Self::with_link(cfg, policy, link);
        p.stack.set_offloads(Offloads {
            tx_checksum: true,
            tso: true,
        });
        p.rx_meta = RxMeta {
            checksum_trusted: true,
        };
        p
    }

    fn with_link(cfg: StackConfig, policy: EgressPolicy, mut link: Link) -> Self {
        let now = Instant::from_secs(1);
        let base = std::time::Instant::now();
        let stack = Stack::new(
            cfg,
            policy,
            base + Duration::from_micros(now.total_micros() as u64),
        );
        let mut iface_cfg = IfaceConfig::new(HardwareAddress::Ethernet(GUEST_MAC));
        iface_cfg.random_seed = 0x6e57;
        let mut iface = Interface::new(iface_cfg, &mut link, now);
        iface.update_ip_addrs(|addrs| {
            addrs.push(IpCidr::new(GUEST_V4.into(), 24)).unwrap();
            addrs.push(IpCidr::new(GUEST_V6.into(), 64)).unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_V4)
            .unwrap();
        iface
            .routes_mut()
            .add_default_ipv6_route(GATEWAY_V6)
            .unwrap();
        Self {
            stack,
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            now,
            requests: VecDeque::new(),
            sent: Vec::new(),
            guest_sent: Vec::new(),
            rx_meta: RxMeta::default(),
            next_port: 40_000,
            base,
        }
    }

    pub fn allow_all() -> Self {
        Self::new(StackConfig::default(), EgressPolicy::allow_all())
    }

    /// The stack's clock, the same moment as the guest's `now`.
    pub fn at(&self) -> std::time::Instant {
        self.base + Duration::from_micros(self.now.total_micros() as u64)
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += smoltcp::time::Duration::from_micros(by.as_micros() as u64);
    }

    /// Take what the stack produced: requests for the driver, frames for the guest.
    fn collect(&mut self, deliver: bool) -> Vec<Vec<u8>> {
        while let Some(r) = self.stack.poll_request() {
            self.requests.push_back(r);
        }
        let mut out = Vec::new();
        while let Some(frame) = self.stack.poll_transmit() {
            self.sent.push(frame.clone());
            if deliver {
                self.link.to_guest.push_back(frame.clone());
            }
            out.push(frame.clone());
            self.stack.recycle(frame);
        }
        out
    }

    /// Poll the stack alone (timers, host events) and deliver what it sends.
    pub fn poll_stack(&mut self) -> Vec<Vec<u8>> {
        self.stack.handle_timeout(self.at());
        self.collect(true)
    }

    /// A hand-built frame from the guest: returns what the stack sent because
    /// of it, which is kept from the guest interface.
    pub fn inject(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        self.stack.handle_frame(self.at(), frame, RxMeta::default());
        self.stack.handle_timeout(self.at());
        self.collect(false)
    }

    /// One round trip over the link; whether any frame moved.
    pub fn step(&mut self) -> bool {
        self.iface.poll(self.now, &mut self.link, &mut self.sockets);
        let mut moved = false;
        while let Some(frame) = self.link.from_guest.pop_front() {
            self.stack.handle_frame(self.at(), &frame, self.rx_meta);
            self.guest_sent.push(frame);
            moved = true;
        }
        self.stack.handle_timeout(self.at());
        moved |= !self.collect(true).is_empty();
        self.iface.poll(self.now, &mut self.link, &mut self.sockets);
        moved | !self.link.from_guest.is_empty()
    }

    /// What the stack has sent since the last look, kept from the guest.
    pub fn flush(&mut self) -> Vec<Vec<u8>> {
        self.collect(false)
    }

    /// Let `d` of fake time pass with the link running.
    pub fn pass_time(&mut self, d: Duration) {
        let mut left = d;
        while !left.is_zero() {
            self.settle();
            let t = left.min(Duration::from_millis(100));
            self.advance(t);
            left -= t;
        }
        self.settle();
    }

    /// Exchange frames until the link is quiet, without moving the clock.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the link never went quiet");
    }

    /// Exchange frames, moving the clock when the link is quiet, until `done`.
    #[track_caller]
    pub fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let mut waited = Duration::ZERO;
        for _ in 0..1_000_000 {
            if done(self) {
                return;
            }
            if !self.step() {
                if waited >= PATIENCE {
                    break;
                }
                self.advance(TICK);
                waited += TICK;
            }
        }
        panic!("gave up waiting for {what}");
    }

    // ----- the guest's TCP --------------------------------------------------

    /// A guest TCP socket connecting to `dst` (sent on the next step).
    pub fn guest_connect(&mut self, dst: SocketAddr, buffer: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buffer]),
            tcp::SocketBuffer::new(vec![0; buffer]),
        );
        s.set_ack_delay(None);
        s.set_nagle_enabled(false);
        let port = self.next_port;
        self.next_port += 1;
        s.connect(self.iface.context(), dst, port)
            .expect("guest connect");
        self.sockets.add(s)
    }

    pub fn guest(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    pub fn guest_state(&self, h: SocketHandle) -> tcp::State {
        self.sockets.get::<tcp::Socket>(h).state()
    }

    /// Remove and return the first request `pick` accepts.
    pub fn take_request<T>(&mut self, pick: impl Fn(&HostRequest) -> Option<T>) -> Option<T> {
        let at = self.requests.iter().position(|r| pick(r).is_some())?;
        let r = self.requests.remove(at)?;
        pick(&r)
    }

    /// Run until the stack asks the host to connect; the flow and its host destination.
    #[track_caller]
    pub fn expect_connect(&mut self) -> (FlowId, SocketAddr) {
        let mut got = None;
        self.run_until("a TcpConnect request", |p| {
            got = p.take_request(|r| match r {
                HostRequest::TcpConnect { flow, dst } => Some((*flow, *dst)),
                _ => None,
            });
            got.is_some()
        });
        got.unwrap()
    }

    /// A guest connection to `dst` that the host accepted, established on both sides.
    #[track_caller]
    pub fn open_tcp(&mut self, dst: SocketAddr, buffer: usize) -> (SocketHandle, FlowId) {
        let h = self.guest_connect(dst, buffer);
        let (flow, host_dst) = self.expect_connect();
        assert_eq!(host_dst, dst);
        self.stack
            .handle_host(self.at(), flow, HostEvent::Connected);
        self.run_until("the guest socket to establish", |p| {
            p.guest_state(h) == tcp::State::Established
        });
        // Let the guest's final ACK of the handshake reach the stack.
        self.settle();
        (h, flow)
    }
}

// ----- frames the guest sends, built by hand -------------------------------

/// An Ethernet frame from the guest to `dst_mac` around `payload`.
pub fn ethernet(dst_mac: EthernetAddress, ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: dst_mac,
        ethertype,
    };
    let mut frame = vec![0; 14 + payload.len()];
    repr.emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    frame[14..].copy_from_slice(payload);
    frame
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

pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: sender,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut body = vec![0; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut body[..]));
    ethernet(EthernetAddress::BROADCAST, EthernetProtocol::Arp, &body)
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
