//! A guest for the sans-IO core: a second smoltcp interface on an in-memory
//! link, a fake clock the test moves, and builders and parsers for the frames
//! tests write by hand. Nothing here sleeps or touches a socket.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use netstack::policy::{EgressPolicy, PolicySpec};
use netstack::wire::RxMeta;
use netstack::{FlowId, HostEvent, HostRequest, Offloads, Stack, StackConfig};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr};

pub use slipway_fuzz::kit::*;

pub mod flows;
#[allow(unused_imports)] // Not every test file uses every helper.
pub use flows::*;

/// The guest's link MTU; the stack's own is larger, so MSS is the guest's choice.
const GUEST_MTU: usize = 1500;

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
                HostRequest::TcpConnect { flow, dst, .. } => Some((*flow, *dst)),
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
