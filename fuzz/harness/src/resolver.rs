//! The filtering resolver and its pins under a fuzzer (issue 12): guest
//! queries (names from a small world of allowed and denied ones, or raw
//! bytes), upstream answers (records built from fields, internal addresses
//! among them, or raw bytes), then new flows to any address, time passing
//! and policy swaps. The promises:
//! - a query is forwarded only if its name is allowed, and unchanged;
//! - a denied name is answered by the stack itself, never forwarded;
//! - no address in the always-denied ranges reaches the guest in an answer,
//!   and none is ever pinned (no flow to one opens);
//! - a flow opens only to a CIDR-allowed address or one that an allowed
//!   name's answer held.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use netstack::policy::{EgressPolicy, PolicySpec};
use netstack::wire::RxMeta;
use netstack::{DatagramKind, FlowId, HostEvent, HostRequest, Stack, StackConfig};

use super::check;
use super::frames::{self, DNS_V4, GUEST_V4};
use super::input::{Bytes, List};
use super::kit;

const MAX_OPS: usize = 64;
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// Allowed by CIDR in every policy here.
const OPEN_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);

const NAMES: [&str; 8] = [
    "app.allowed.test",
    "a.b.allowed.test",
    "allowed.test",
    "exact.test",
    "evil.test",
    "exact.test.evil.test",
    "APP.Allowed.TEST",
    "under_score.allowed.test",
];

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// TEST-NET-2: 198.51.100.x.
    Public(u8),
    /// 10.0.0.x, 169.254.169.x, 127.0.0.x.
    Internal(u8),
    V6(u8),
    /// The CIDR-allowed 203.0.113.x.
    Open(u8),
}

impl Addr {
    pub(crate) fn ip(self) -> IpAddr {
        match self {
            Addr::Public(x) => Ipv4Addr::new(198, 51, 100, x).into(),
            Addr::Internal(x) => match x % 3 {
                0 => Ipv4Addr::new(10, 0, 0, x),
                1 => Ipv4Addr::new(169, 254, 169, x),
                _ => Ipv4Addr::new(127, 0, 0, x),
            }
            .into(),
            Addr::V6(x) => Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, x.into()).into(),
            Addr::Open(x) => Ipv4Addr::new(203, 0, 113, x).into(),
        }
    }
}

#[derive(Arbitrary, Debug)]
pub enum Reply {
    Records {
        addrs: List<(Addr, u16)>,
        cname: bool,
    },
    Raw(Bytes),
}

#[derive(Arbitrary, Debug)]
pub enum Op {
    /// The guest asks for one of `NAMES` (type A or AAAA).
    Ask {
        name: u8,
        aaaa: bool,
    },
    AskRaw(Bytes),
    /// The upstream answers the oldest query in flight.
    Answer(Reply),
    Tcp(Addr),
    Udp(Addr),
    AdvanceSecs(u8),
    /// Swap the names the policy holds (bit 0: `*.allowed.test`, bit 1: `exact.test`, bit 2: `*`).
    Names(u8),
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub names: u8,
    pub ops: Vec<Op>,
}

fn spec(bits: u8) -> PolicySpec {
    let mut allow = vec![format!("{OPEN_NET}/24")];
    if bits & 1 != 0 {
        allow.push("*.allowed.test".into());
    }
    if bits & 2 != 0 {
        allow.push("exact.test".into());
    }
    if bits & 4 != 0 {
        allow.push("*".into());
    }
    PolicySpec {
        allow_out: allow,
        deny_out: vec!["ALL_TRAFFIC".into()],
        ..PolicySpec::new()
    }
}

/// The upstream's answer to `query`: a CNAME first when `cname`, then up
/// to 8 A / AAAA records built from `addrs` (address, TTL).
pub(crate) fn records_answer(query: &[u8], addrs: &[(Addr, u16)], cname: bool) -> Vec<u8> {
    let mut r = query.to_vec();
    r[2] |= 0x80;
    r[3] = 0x80;
    let mut n = 0u16;
    if cname {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 9, 0, 2, 0xc0, 0x0c]);
        n += 1;
    }
    for (a, ttl) in addrs.iter().take(8) {
        r.extend_from_slice(&[0xc0, 0x0c]);
        match a.ip() {
            IpAddr::V4(v4) => {
                r.extend_from_slice(&[0, 1, 0, 1, 0, 0]);
                r.extend_from_slice(&ttl.to_be_bytes());
                r.extend_from_slice(&[0, 4]);
                r.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                r.extend_from_slice(&[0, 28, 0, 1, 0, 0]);
                r.extend_from_slice(&ttl.to_be_bytes());
                r.extend_from_slice(&[0, 16]);
                r.extend_from_slice(&v6.octets());
            }
        }
        n += 1;
    }
    r[6..8].copy_from_slice(&n.to_be_bytes());
    r
}

/// The always-denied ranges as the harnesses model them.
pub(crate) fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private() || a.is_loopback() || a.is_link_local(),
        IpAddr::V6(_) => false,
    }
}

struct Harness {
    stack: Stack,
    policy: EgressPolicy,
    base: std::time::Instant,
    now: Duration,
    /// The resolver's flow to the upstream, and the queries it sent.
    upstream: Option<FlowId>,
    in_flight: Vec<Vec<u8>>,
    /// Every address an answer to an allowed name held (the model's pins,
    /// ignoring expiry: the stack may forget sooner, never allow more).
    pinned: HashSet<IpAddr>,
    port: u16,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let cfg = StackConfig {
        dns_upstream: Some(SocketAddr::new(UPSTREAM.into(), 53)),
        ..StackConfig::default()
    };
    let policy = EgressPolicy::from_spec(&spec(input.names)).expect("the harness's policies parse");
    let base = std::time::Instant::now();
    let mut h = Harness {
        stack: Stack::new(cfg, policy.clone(), base),
        policy,
        base,
        now: Duration::ZERO,
        upstream: None,
        in_flight: Vec::new(),
        pinned: HashSet::new(),
        port: 30_000,
    };
    for frame in frames::guest_hello() {
        h.stack.handle_frame(base, &frame, RxMeta::default());
    }
    for op in input.ops.iter().take(MAX_OPS) {
        h.step(op);
    }
}

impl Harness {
    fn at(&self) -> std::time::Instant {
        self.base + self.now
    }

    fn next_port(&mut self) -> u16 {
        self.port = self.port.wrapping_add(1).max(1024);
        self.port
    }

    fn name_allowed(&self, msg: &[u8]) -> Option<String> {
        let q = netstack::dns::Query::parse(msg)?;
        let name = q.name?;
        self.policy.allows_name(&name).map(|_| name)
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Ask { name: pick, aaaa } => {
                let name = NAMES[usize::from(*pick) % NAMES.len()];
                let mut q = kit::dns_query(0x7000 | u16::from(*pick), name);
                if *aaaa {
                    let at = q.len() - 3;
                    q[at] = 28;
                }
                self.ask(&q);
            }
            Op::AskRaw(b) => self.ask(&b.0),
            Op::Answer(reply) => self.answer(reply),
            Op::Tcp(a) => {
                let dst = SocketAddr::new(a.ip(), 443);
                let src = SocketAddr::new(GUEST_V4.into(), self.next_port());
                if dst.is_ipv4() {
                    let frame = kit::tcp_syn(src, dst, 1);
                    self.stack
                        .handle_frame(self.at(), &frame, RxMeta::default());
                }
            }
            Op::Udp(a) => {
                let dst = SocketAddr::new(a.ip(), 9999);
                let src = SocketAddr::new(GUEST_V4.into(), self.next_port());
                if dst.is_ipv4() {
                    let frame = kit::udp_frame(src, dst, b"x");
                    self.stack
                        .handle_frame(self.at(), &frame, RxMeta::default());
                }
            }
            Op::AdvanceSecs(s) => {
                self.now += Duration::from_secs((*s).into());
                self.stack.handle_timeout(self.at());
            }
            Op::Names(bits) => {
                let p =
                    EgressPolicy::from_spec(&spec(*bits)).expect("the harness's policies parse");
                self.policy = p.clone();
                self.stack.set_policy(self.at(), p);
            }
        }
        self.settle();
    }

    fn ask(&mut self, query: &[u8]) {
        let src = SocketAddr::new(GUEST_V4.into(), self.next_port());
        let frame = kit::udp_frame(src, SocketAddr::new(DNS_V4.into(), 53), query);
        self.stack
            .handle_frame(self.at(), &frame, RxMeta::default());
    }

    fn answer(&mut self, reply: &Reply) {
        let (Some(flow), false) = (self.upstream, self.in_flight.is_empty()) else {
            return;
        };
        let query = self.in_flight.remove(0);
        let msg = match reply {
            Reply::Raw(b) => b.0.clone(),
            Reply::Records { addrs, cname } => records_answer(&query, &addrs.0, *cname),
        };
        // The model pins what an allowed name's answer held, as the stack would.
        if let (Some(_), Some(a)) = (
            self.name_allowed(&query),
            netstack::dns::Answer::parse(&msg),
        ) {
            if a.name
                .as_deref()
                .is_some_and(|n| self.policy.allows_name(n).is_some())
            {
                self.pinned.extend(a.addresses.iter().map(|(ip, _)| *ip));
            }
        }
        self.stack
            .handle_host(self.at(), flow, HostEvent::Datagram(&msg));
    }

    fn settle(&mut self) {
        while let Some(req) = self.stack.poll_request() {
            match req {
                HostRequest::DatagramOpen { flow, kind, dst } => {
                    if dst == SocketAddr::new(UPSTREAM.into(), 53) {
                        assert_eq!(kind, DatagramKind::Udp);
                        self.upstream = Some(flow);
                    } else {
                        self.assert_may_reach(dst.ip(), "a datagram flow");
                    }
                }
                HostRequest::DatagramSend { flow, payload } if Some(flow) == self.upstream => {
                    assert!(
                        self.name_allowed(&payload).is_some(),
                        "a query for a name the policy does not allow was forwarded: {payload:?}"
                    );
                    self.in_flight.push(payload);
                    if self.in_flight.len() > 8 {
                        self.in_flight.remove(0);
                    }
                }
                HostRequest::TcpConnect { dst, .. } => {
                    self.assert_may_reach(dst.ip(), "a TCP connect")
                }
                HostRequest::DatagramClose { flow } if Some(flow) == self.upstream => {
                    self.upstream = None;
                    self.in_flight.clear();
                }
                _ => {}
            }
        }
        while let Some(frame) = self.stack.poll_transmit() {
            check::frame_to_guest(&frame, 65520, false);
            if let Some(udp) = kit::udp_of(&frame) {
                if udp.src == SocketAddr::new(DNS_V4.into(), 53) {
                    if let Some(a) = netstack::dns::Answer::parse(&udp.payload) {
                        for (ip, _) in a.addresses {
                            assert!(!internal(ip), "an internal address {ip} reached the guest");
                        }
                    }
                }
            }
        }
    }

    fn assert_may_reach(&self, ip: IpAddr, what: &str) {
        assert!(!internal(ip), "{what} to the internal address {ip}");
        let open = matches!(ip, IpAddr::V4(a) if a.octets()[..3] == OPEN_NET.octets()[..3]);
        assert!(
            open || self.pinned.contains(&ip),
            "{what} to {ip}, which neither a CIDR nor an allowed name's answer holds"
        );
    }
}
