//! The name in a flow's first bytes under a fuzzer (issue 12, items 5, 6
//! and 9): guest TCP flows to unpinned and CIDR-allowed addresses whose
//! first bytes are a ClientHello or an HTTP head naming a host from a small
//! world (or raw bytes), cut into segments of any size; the stack's own
//! lookups answered with records built from fields (internal addresses
//! among them) or raw bytes; host connects that succeed or fail; time
//! passing and policy swaps. The promises:
//! - the parser never panics, and a prefix of the bytes never says
//!   anything but "need more" or what the whole says;
//! - the stack asks its upstream only for names the policy allows;
//! - a host connect for a name goes only to an address an answer for that
//!   name held, never to an internal one, and only while the name is
//!   allowed; any other connect goes to a CIDR-allowed address;
//! - what the host reads of a name-dialed flow is exactly the guest's
//!   bytes, from the first (the replay loses and adds nothing);
//! - half-open flows stay within their cap.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use netstack::policy::{EgressPolicy, PolicySpec};
use netstack::sniff::{sniff, Sniff};
use netstack::wire::RxMeta;
use netstack::{FlowId, HostEvent, HostRequest, Stack, StackConfig};
use smoltcp::wire::TcpControl;

use super::check;
use super::frames::{self, GUEST_V4};
use super::input::{Bytes, List};
use super::kit;
use super::resolver::{internal, records_answer, Addr};

const MAX_OPS: usize = 64;
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
const OPEN_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);

const NAMES: [&str; 6] = [
    "app.allowed.test",
    "a.b.allowed.test",
    "allowed.test",
    "exact.test",
    "evil.test",
    "APP.Allowed.TEST",
];

/// What a flow's guest sends first.
#[derive(Arbitrary, Debug, Clone)]
pub enum First {
    Hello { name: u8, record: u8 },
    Http { host: u8, absolute: Option<u8> },
    Raw(Bytes),
}

impl First {
    fn bytes(&self) -> Vec<u8> {
        let name = |i: &u8| NAMES[usize::from(*i) % NAMES.len()];
        match self {
            First::Hello { name: n, record } => {
                kit::client_hello(name(n), usize::from(*record).max(1) * 8)
            }
            First::Http { host, absolute } => {
                let target = match absolute {
                    Some(a) => format!("http://{}/x", name(a)),
                    None => "/x".into(),
                };
                format!(
                    "GET {target} HTTP/1.1\r\nAccept: */*\r\nHost: {}\r\n\r\nbody",
                    name(host)
                )
                .into_bytes()
            }
            First::Raw(b) => b.0.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
pub enum Reply {
    Records(List<(Addr, u16)>),
    Raw(Bytes),
}

#[derive(Arbitrary, Debug)]
pub enum Op {
    /// A new guest flow to `to`:`port` whose first bytes are `first`.
    Open {
        to: Addr,
        port: u8,
        first: First,
    },
    /// The flow sends its next `len` bytes (at least one) in one segment.
    Send {
        flow: u8,
        len: u16,
    },
    Fin {
        flow: u8,
    },
    Rst {
        flow: u8,
    },
    /// The upstream answers the oldest of the stack's own queries.
    Answer(Reply),
    /// The oldest host connect ends.
    Connect {
        ok: bool,
    },
    AdvanceMs(u16),
    /// Swap the names the policy holds (bit 0 `*.allowed.test`, bit 1 `exact.test`).
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
    PolicySpec {
        allow_out: allow,
        deny_out: vec!["ALL_TRAFFIC".into()],
        ..PolicySpec::new()
    }
}

/// The parser's promise on any bytes: a prefix says "need more" or what
/// the whole says.
fn check_prefixes(bytes: &[u8]) {
    let whole = sniff(bytes);
    if let Sniff::Name { name, .. } = &whole {
        assert_eq!(
            netstack::names::canonical_name(name).as_deref(),
            Some(name.as_str())
        );
    }
    let n = bytes.len();
    for cut in [0, 1, 5, 6, 9, n / 3, n / 2, n.saturating_sub(1)] {
        if cut >= n {
            continue;
        }
        let part = sniff(&bytes[..cut]);
        assert!(
            part == Sniff::NeedMore || part == whole,
            "a prefix of {cut} bytes says {part:?}, the whole {whole:?}"
        );
    }
}

struct GuestFlow {
    src: SocketAddr,
    dst: SocketAddr,
    bytes: Vec<u8>,
    sent: usize,
    /// The stack's sequence number after its SYN-ACK, once seen.
    stack_next: Option<i32>,
    host: Option<FlowId>,
}

struct Lookup {
    name: String,
    queries: Vec<Vec<u8>>,
}

struct Harness {
    stack: Stack,
    policy: EgressPolicy,
    base: std::time::Instant,
    now: Duration,
    flows: Vec<GuestFlow>,
    lookups: HashMap<FlowId, Lookup>,
    /// Addresses each name's answers held.
    answered: HashMap<String, Vec<IpAddr>>,
    /// Host connects not answered yet.
    connects: Vec<FlowId>,
    /// What the host read of each open flow.
    read: HashMap<FlowId, Vec<u8>>,
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
        flows: Vec::new(),
        lookups: HashMap::new(),
        answered: HashMap::new(),
        connects: Vec::new(),
        read: HashMap::new(),
        port: 20_000,
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

    fn frame(&mut self, frame: &[u8]) {
        self.stack.handle_frame(self.at(), frame, RxMeta::default());
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Open { to, port, first } => {
                if self.flows.len() >= 16 {
                    return;
                }
                let bytes = first.bytes();
                check_prefixes(&bytes);
                let ip = to.ip();
                if !ip.is_ipv4() {
                    return;
                }
                self.port = self.port.wrapping_add(1).max(1024);
                let src = SocketAddr::new(GUEST_V4.into(), self.port);
                let dst = SocketAddr::new(ip, [443, 80, 22, 8443][usize::from(*port) % 4]);
                self.flows.push(GuestFlow {
                    src,
                    dst,
                    bytes,
                    sent: 0,
                    stack_next: None,
                    host: None,
                });
                self.frame(&kit::tcp_syn(src, dst, 1000));
            }
            Op::Send { flow, len } => {
                let Some(i) = self.pick(*flow) else { return };
                let f = &self.flows[i];
                let Some(ack) = f.stack_next else { return };
                let end = (f.sent + usize::from(*len).max(1)).min(f.bytes.len());
                if end == f.sent {
                    return;
                }
                let seg = kit::tcp_frame(
                    f.src,
                    f.dst,
                    TcpControl::Psh,
                    1001 + f.sent as i32,
                    Some(ack),
                    &f.bytes[f.sent..end],
                );
                self.flows[i].sent = end;
                self.frame(&seg);
            }
            Op::Fin { flow } | Op::Rst { flow } => {
                let Some(i) = self.pick(*flow) else { return };
                let f = &self.flows[i];
                let Some(ack) = f.stack_next else { return };
                let control = if matches!(op, Op::Fin { .. }) {
                    TcpControl::Fin
                } else {
                    TcpControl::Rst
                };
                let seg =
                    kit::tcp_frame(f.src, f.dst, control, 1001 + f.sent as i32, Some(ack), &[]);
                self.frame(&seg);
            }
            Op::Answer(reply) => self.answer(reply),
            Op::Connect { ok } => {
                if self.connects.is_empty() {
                    return;
                }
                let flow = self.connects.remove(0);
                let event = if *ok {
                    self.read.insert(flow, Vec::new());
                    HostEvent::Connected
                } else {
                    HostEvent::ConnectFailed(netstack::ConnectError::Refused)
                };
                self.stack.handle_host(self.at(), flow, event);
            }
            Op::AdvanceMs(ms) => {
                self.now += Duration::from_millis(u64::from(*ms) * 4);
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

    fn pick(&self, i: u8) -> Option<usize> {
        (!self.flows.is_empty()).then(|| usize::from(i) % self.flows.len())
    }

    fn answer(&mut self, reply: &Reply) {
        let Some((&flow, lookup)) = self.lookups.iter_mut().find(|(_, l)| !l.queries.is_empty())
        else {
            return;
        };
        let query = lookup.queries.remove(0);
        let name = lookup.name.clone();
        let msg = match reply {
            Reply::Raw(b) => b.0.clone(),
            Reply::Records(addrs) => records_answer(&query, &addrs.0, false),
        };
        if let Some(a) = netstack::dns::Answer::parse(&msg) {
            if a.name.as_deref() == Some(name.as_str()) {
                self.answered
                    .entry(name)
                    .or_default()
                    .extend(a.addresses.iter().map(|(ip, _)| *ip));
            }
        }
        self.stack
            .handle_host(self.at(), flow, HostEvent::Datagram(&msg));
    }

    fn settle(&mut self) {
        while let Some(req) = self.stack.poll_request() {
            self.request(req);
        }
        while let Some(frame) = self.stack.poll_transmit() {
            check::frame_to_guest(&frame, 65520, false);
            if let Some(t) = kit::tcp_of(&frame) {
                if t.syn && t.ack.is_some() {
                    if let Some(f) = self
                        .flows
                        .iter_mut()
                        .find(|f| f.src == t.dst && f.dst == t.src)
                    {
                        f.stack_next = Some((t.seq + 1).0);
                        let ack =
                            kit::tcp_frame(f.src, f.dst, TcpControl::None, 1001, f.stack_next, &[]);
                        self.stack
                            .handle_frame(self.base + self.now, &ack, RxMeta::default());
                    }
                }
            }
        }
        // The host side reads what it may, and checks the replay.
        let open: Vec<FlowId> = self.read.keys().copied().collect();
        for flow in open {
            let mut got = Vec::new();
            while let Some(n) = self.stack.tcp_recv_with(flow, |b| {
                got.extend_from_slice(b);
                (b.len(), b.len())
            }) {
                if n == 0 {
                    break;
                }
            }
            let all = self.read.get_mut(&flow).expect("open flow");
            all.extend_from_slice(&got);
            if let Some(f) = self.flows.iter().find(|f| f.host == Some(flow)) {
                assert!(
                    f.bytes.starts_with(all),
                    "the host read {} bytes that are not the guest's first bytes",
                    all.len()
                );
            }
        }
        let caps = &self.stack.config().caps;
        assert!(self.stack.half_open_count() <= caps.max_half_open);
        assert!(self.stack.tcp_flow_count() <= caps.max_tcp_flows);
    }

    fn request(&mut self, req: HostRequest) {
        match req {
            HostRequest::DatagramOpen { flow, dst, .. } => {
                assert_eq!(
                    dst,
                    SocketAddr::new(UPSTREAM.into(), 53),
                    "a datagram flow that is not the stack's lookup"
                );
                self.lookups.insert(
                    flow,
                    Lookup {
                        name: String::new(),
                        queries: Vec::new(),
                    },
                );
            }
            HostRequest::DatagramSend { flow, payload } => {
                let q = netstack::dns::Query::parse(&payload).expect("the stack's query parses");
                let name = q.name.expect("the stack asks for a host name");
                assert!(
                    self.policy.allows_name(&name).is_some(),
                    "the stack asked its upstream for {name}, which the policy does not allow"
                );
                let l = self
                    .lookups
                    .get_mut(&flow)
                    .expect("a send on a lookup flow");
                l.name = name;
                l.queries.push(payload);
            }
            HostRequest::DatagramClose { flow } => {
                self.lookups.remove(&flow);
            }
            HostRequest::TcpConnect { flow, dst, name } => {
                match &name {
                    Some(n) => {
                        assert!(
                            self.policy.allows_name(n).is_some(),
                            "a connect for {n}, which the policy does not allow"
                        );
                        assert!(!internal(dst.ip()), "a connect to the internal {dst}");
                        assert!(
                            self.answered.get(n).is_some_and(|a| a.contains(&dst.ip())),
                            "a connect for {n} to {dst}, which no answer for it held"
                        );
                        // The request does not say which guest flow it
                        // serves: the replay is checked when one alone fits.
                        let fits: Vec<usize> = (0..self.flows.len())
                            .filter(|&i| {
                                let f = &self.flows[i];
                                f.host.is_none()
                                    && f.dst.port() == dst.port()
                                    && matches!(sniff(&f.bytes), Sniff::Name { name: ref m, .. } if m == n)
                            })
                            .collect();
                        if let [only] = fits[..] {
                            self.flows[only].host = Some(flow);
                        }
                    }
                    None => {
                        let open = matches!(dst.ip(), IpAddr::V4(a) if a.octets()[..3] == OPEN_NET.octets()[..3]);
                        assert!(open, "a connect to {dst}, which the policy denies");
                    }
                }
                self.connects.push(flow);
            }
            HostRequest::TcpClose { flow, .. } => {
                self.read.remove(&flow);
                self.connects.retain(|f| *f != flow);
            }
            _ => {}
        }
    }
}
