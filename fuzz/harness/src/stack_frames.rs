//! The whole core under a fuzzer: guest frames (raw or built from fields),
//! a fake clock, host answers to the core's requests and policy swaps, with
//! the core's promises checked after every step: caps hold, every frame to
//! the guest parses, every host connect or datagram flow goes somewhere the
//! policy in force allows, and the core's flow counts match its requests.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use netstack::policy::{EgressPolicy, PolicySpec};
use netstack::wire::RxMeta;
use netstack::wire::Unreachable;
use netstack::{
    Caps, ConnectError, DatagramKind, FlowId, HostEvent as Event, HostRequest, Offloads, Stack,
    StackConfig,
};

use super::check::{self, SegmentSeen};
use super::frames::{GuestFrame, TcpTrack, LOOPBACK_ALIAS_V4, LOOPBACK_ALIAS_V6};
use super::input::{Bytes, List, Text};

const MAX_OPS: usize = 256;

/// Set by `examples/replay.rs` to print each step's requests and frames.
pub static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn tracing() -> bool {
    TRACE.load(std::sync::atomic::Ordering::Relaxed)
}
const TCP_BUFFER: usize = 4096;
/// Frames one step may add to the queue: a reply or two to a guest frame,
/// plus one segment per TCP socket from one `poll`.
const FRAMES_PER_STEP_SLACK: usize = 4;

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Upstream {
    None,
    V4,
    V6,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum PolicyChoice {
    /// The harness default: TEST-NET-1 denied, v4 and v6.
    DenyTestNet1,
    AllowAll,
    /// No internet, but TEST-NET-2 allowed.
    OfflineButTestNet2,
    DenyAllTraffic,
    /// The metadata-like range 169.254.169.0/24 opened by the operator.
    HoleInLinkLocal,
    Lists {
        allow: List<Text>,
        deny: List<Text>,
        internal: List<Text>,
        internet: bool,
    },
}

impl PolicyChoice {
    fn policy(&self) -> Option<EgressPolicy> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let spec = match self {
            PolicyChoice::DenyTestNet1 => PolicySpec {
                deny_out: s(&["192.0.2.0/24", "2001:db8:dead::/48"]),
                ..PolicySpec::new()
            },
            PolicyChoice::AllowAll => PolicySpec::new(),
            PolicyChoice::OfflineButTestNet2 => PolicySpec {
                allow_out: s(&["198.51.100.0/24", "2001:db8:1::/64"]),
                allow_internet_access: false,
                ..PolicySpec::new()
            },
            PolicyChoice::DenyAllTraffic => PolicySpec {
                deny_out: s(&["ALL_TRAFFIC"]),
                ..PolicySpec::new()
            },
            PolicyChoice::HoleInLinkLocal => PolicySpec {
                deny_out: s(&["192.0.2.0/24"]),
                allow_internal: s(&["169.254.169.0/24"]),
                ..PolicySpec::new()
            },
            PolicyChoice::Lists {
                allow,
                deny,
                internal,
                internet,
            } => PolicySpec {
                allow_out: allow.iter().take(4).map(|t| t.0.clone()).collect(),
                deny_out: deny.iter().take(4).map(|t| t.0.clone()).collect(),
                allow_internal: internal.iter().take(2).map(|t| t.0.clone()).collect(),
                allow_internet_access: *internet,
            },
        };
        EgressPolicy::from_spec(&spec).ok()
    }
}

#[derive(Arbitrary, Debug)]
pub struct Setup {
    pub small_mtu: bool,
    pub tight_buffers: bool,
    pub upstream: Upstream,
    pub loopback_alias: bool,
    pub policy: PolicyChoice,
    pub seed: u64,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum HostEvent {
    Connected,
    ConnectFailed(u8),
    Send(Bytes),
    /// A host that has plenty: fill whatever room there is.
    SendFill(u8),
    Recv(u16),
    Eof,
    Reset,
    Datagram(Bytes),
    /// A datagram too large to spell out in the input.
    DatagramBig {
        len: u16,
        fill: u8,
    },
    EchoReply {
        v6: bool,
        seq: u16,
        data: Bytes,
    },
    DatagramError(u8),
}

#[derive(Arbitrary, Debug)]
pub enum Op {
    Frame {
        frame: GuestFrame,
        batch: bool,
    },
    Raw(Bytes),
    AdvanceMillis(u16),
    AdvanceSecs(u8),
    /// Jump the clock to the core's next deadline.
    NextTimer,
    /// `pick` chooses among the flows the core has asked about (stale ones too).
    Host {
        pick: u8,
        event: HostEvent,
    },
    SetPolicy(PolicyChoice),
    /// Stop (or resume) taking frames from the core, as a congested link would.
    Hold(bool),
    /// Give the first queued frame back, as a link that could not take it.
    Unsend,
    Advertise,
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub setup: Setup,
    pub ops: Vec<Op>,
}

impl Setup {
    /// A link with checksum and TSO offloads (a tap with a virtio-net
    /// header): bit 8 of the seed, since a new field would shift every
    /// stored input.
    pub fn offloads(&self) -> Offloads {
        let on = self.seed & (1 << 8) != 0;
        Offloads {
            tx_checksum: on,
            tso: on,
        }
    }
}

pub fn config(setup: &Setup) -> StackConfig {
    let mut cfg = StackConfig {
        mtu: if setup.small_mtu { 1500 } else { 65520 },
        tcp_buffer: TCP_BUFFER,
        random_seed: setup.seed,
        caps: Caps {
            max_tcp_flows: 8,
            max_half_open: 4,
            max_buffer_bytes: if setup.tight_buffers { 5 } else { 8 } * 2 * TCP_BUFFER,
            max_datagram_flows: 8,
            max_queued_frames: 16,
            ..Caps::default()
        },
        ..StackConfig::default()
    };
    cfg.dns_upstream = match setup.upstream {
        Upstream::None => None,
        Upstream::V4 => Some(SocketAddr::new(Ipv4Addr::new(198, 51, 100, 53).into(), 53)),
        Upstream::V6 => Some(SocketAddr::new(
            Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x53).into(),
            53,
        )),
    };
    if setup.loopback_alias {
        cfg.host_loopback_aliases = vec![LOOPBACK_ALIAS_V4.into(), LOOPBACK_ALIAS_V6.into()];
    }
    cfg
}

struct TcpSeen {
    id: FlowId,
    dst: SocketAddr,
    open: bool,
}

struct DatagramSeen {
    id: FlowId,
    kind: DatagramKind,
    dst: SocketAddr,
    open: bool,
}

pub(crate) struct Harness {
    stack: Stack,
    offloads: Offloads,
    cfg: StackConfig,
    policy: EgressPolicy,
    /// Time since `base`, the harness's fake clock.
    now: Duration,
    base: std::time::Instant,
    tcp: Vec<TcpSeen>,
    dgram: Vec<DatagramSeen>,
    tracks: Vec<TcpTrack>,
    hold: bool,
    /// The highest flow id the core has handed out: ids are never reused.
    last_flow: u64,
    /// Addresses an allowed name's DNS answer held (under a policy with
    /// names the stack may pin them; it never pins anything else).
    pinned: std::collections::HashSet<std::net::IpAddr>,
}

fn prune<T>(list: &mut Vec<T>, open: impl Fn(&T) -> bool) {
    while list.len() > 24 {
        match list.iter().position(|f| !open(f)) {
            Some(i) => list.remove(i),
            None => break,
        };
    }
}

/// Decode `data` and run it; the entry point of the fuzz target and of the
/// regression replay alike.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run_input(&input);
}

pub fn run_input(input: &Input) {
    let mut h = Harness::new(&input.setup);
    for op in input.ops.iter().take(MAX_OPS) {
        h.step(op);
    }
    h.finish();
}

impl Harness {
    pub(crate) fn new(setup: &Setup) -> Harness {
        let cfg = config(setup);
        let policy = setup.policy.policy().unwrap_or_else(|| {
            PolicyChoice::DenyTestNet1
                .policy()
                .expect("fixed policy parses")
        });
        let base = std::time::Instant::now();
        let mut stack = Stack::new(cfg.clone(), policy.clone(), base);
        let offloads = setup.offloads();
        stack.set_offloads(offloads);
        Harness {
            stack,
            offloads,
            cfg,
            policy,
            now: Duration::ZERO,
            base,
            tcp: Vec::new(),
            dgram: Vec::new(),
            tracks: Vec::new(),
            hold: false,
            last_flow: 0,
            pinned: Default::default(),
        }
    }

    /// Let the link drain and check everything once more.
    pub(crate) fn finish(mut self) {
        self.hold = false;
        self.settle();
    }

    /// What the harness saw of the connection between these ends.
    pub(crate) fn track(&self, guest: SocketAddr, peer: SocketAddr) -> Option<TcpTrack> {
        self.tracks
            .iter()
            .find(|t| t.guest == guest && t.peer == peer)
            .copied()
    }

    /// The link was replaced: every flow is reset and its host socket is
    /// moot (`Driver::resume`). Nothing may stay open.
    pub(crate) fn reset_flows(&mut self) {
        self.stack.reset_flows(self.at());
        assert_eq!(
            self.stack.tcp_flow_count(),
            0,
            "a tcp flow outlived reset_flows"
        );
        assert_eq!(
            self.stack.datagram_flow_count(),
            0,
            "a datagram flow outlived reset_flows"
        );
        assert_eq!(
            self.stack.half_open_count(),
            0,
            "half-open after reset_flows"
        );
        assert_eq!(
            self.stack.buffer_bytes(),
            0,
            "buffers held after reset_flows"
        );
        for f in &mut self.tcp {
            f.open = false;
        }
        for f in &mut self.dgram {
            f.open = false;
        }
        self.tracks.clear();
        self.stack.discard_transmit();
    }

    /// Over an offloading link the guest's kernel vouches for its checksums.
    fn rx_meta(&self) -> RxMeta {
        RxMeta {
            checksum_trusted: self.offloads.tx_checksum,
        }
    }

    fn at(&self) -> std::time::Instant {
        self.base + self.now
    }

    pub(crate) fn step(&mut self, op: &Op) {
        if tracing() {
            eprintln!("op {op:?}");
        }
        let before = self.stack.queued_frames();
        let mut poll = true;
        match op {
            Op::Frame { frame, batch } => {
                let bytes = frame.build(&self.tracks);
                self.stack.handle_frame(self.at(), &bytes, self.rx_meta());
                poll = !batch;
            }
            Op::Raw(bytes) => self.stack.handle_frame(self.at(), bytes, self.rx_meta()),
            Op::AdvanceMillis(ms) => self.now += Duration::from_millis((*ms).into()),
            Op::AdvanceSecs(s) => self.now += Duration::from_secs((*s).into()),
            Op::NextTimer => {
                if let Some(t) = self.stack.poll_timeout() {
                    self.now = self.now.max(t.saturating_duration_since(self.base));
                }
            }
            Op::Host { pick, event } => self.host_event(*pick, event),
            Op::SetPolicy(choice) => {
                if let Some(p) = choice.policy() {
                    self.policy = p.clone();
                    self.stack.set_policy(self.at(), p);
                    self.stack.handle_timeout(self.at());
                    self.settle();
                    self.assert_open_flows_allowed();
                }
            }
            Op::Hold(h) => self.hold = *h,
            Op::Unsend => {
                if let Some(f) = self.stack.poll_transmit() {
                    let copy = f.clone();
                    self.stack.unsend(f);
                    let again = self.stack.poll_transmit().expect("unsent frame comes back");
                    assert_eq!(again, copy, "unsent frame is not the next one out");
                    self.stack.unsend(again);
                }
            }
            Op::Advertise => self.stack.advertise_router(),
        }
        self.after_step(before, poll, op);
    }

    /// One guest frame as it came, polled at once unless `batch`.
    pub(crate) fn guest_frame(&mut self, frame: &[u8], batch: bool) {
        if tracing() {
            eprintln!("frame {} bytes, batch {batch}", frame.len());
        }
        let before = self.stack.queued_frames();
        self.stack.handle_frame(self.at(), frame, self.rx_meta());
        self.after_step(before, !batch, &"a guest frame");
    }

    fn after_step(&mut self, before: usize, poll: bool, what: &dyn std::fmt::Debug) {
        if poll {
            self.stack.handle_timeout(self.at());
        }
        let grew = self.stack.queued_frames().saturating_sub(before);
        let bound = self.cfg.caps.max_tcp_flows + FRAMES_PER_STEP_SLACK;
        assert!(
            grew <= bound,
            "one step queued {grew} frames (bound {bound}): {what:?}"
        );
        self.settle();
    }

    fn host_event(&mut self, pick: u8, event: &HostEvent) {
        let tcp = |h: &Self| -> FlowId {
            if h.tcp.is_empty() || pick == u8::MAX {
                return FlowId(u64::from(pick) << 32);
            }
            h.tcp[usize::from(pick) % h.tcp.len()].id
        };
        let dgram = |h: &Self| -> FlowId {
            if h.dgram.is_empty() || pick == u8::MAX {
                return FlowId(u64::from(pick) << 32);
            }
            h.dgram[usize::from(pick) % h.dgram.len()].id
        };
        let now = self.at();
        match event {
            HostEvent::Connected => self.stack.handle_host(now, tcp(self), Event::Connected),
            HostEvent::ConnectFailed(why) => {
                let err = match why % 3 {
                    0 => ConnectError::Refused,
                    1 => ConnectError::Unreachable,
                    _ => ConnectError::TimedOut,
                };
                self.stack
                    .handle_host(now, tcp(self), Event::ConnectFailed(err));
            }
            HostEvent::Send(data) => self.host_send(tcp(self), data),
            HostEvent::SendFill(b) => {
                let room = self.stack.tcp_send_capacity(tcp(self));
                self.host_send(tcp(self), &vec![*b; room.min(2 * TCP_BUFFER)]);
            }
            HostEvent::Recv(max) => {
                let flow = tcp(self);
                let pending = self.stack.tcp_recv_pending(flow);
                assert!(
                    pending <= TCP_BUFFER,
                    "{pending} bytes pending in a {TCP_BUFFER}-byte buffer"
                );
                self.stack.tcp_recv_with(flow, |buf| {
                    assert!(buf.len() <= pending, "recv offers more than is pending");
                    (buf.len().min(usize::from(*max)), ())
                });
                assert!(self.stack.tcp_recv_pending(flow) <= pending);
            }
            HostEvent::Eof => self.stack.handle_host(now, tcp(self), Event::Eof),
            HostEvent::Reset => self.stack.handle_host(now, tcp(self), Event::Reset),
            HostEvent::Datagram(p) => self.host_datagram(now, dgram(self), p),
            HostEvent::DatagramBig { len, fill } => {
                self.host_datagram(now, dgram(self), &vec![*fill; usize::from(*len)])
            }
            HostEvent::EchoReply { v6, seq, data } => {
                let mut p = vec![if *v6 { 129 } else { 0 }, 0, 0, 0, 0x12, 0x34];
                p.extend_from_slice(&seq.to_be_bytes());
                p.extend_from_slice(data);
                self.host_datagram(now, dgram(self), &p);
            }
            HostEvent::DatagramError(why) => {
                let why = match why % 3 {
                    0 => Unreachable::Port,
                    1 => Unreachable::Host,
                    _ => Unreachable::Prohibited,
                };
                self.stack
                    .handle_host(now, dgram(self), Event::DatagramError(why));
            }
        }
    }

    fn host_send(&mut self, flow: FlowId, data: &[u8]) {
        let room = self.stack.tcp_send_capacity(flow);
        assert!(
            room <= TCP_BUFFER,
            "send capacity {room} over the {TCP_BUFFER}-byte buffer"
        );
        self.stack.tcp_send_with(flow, |buf| {
            let n = buf.len().min(data.len());
            buf[..n].copy_from_slice(&data[..n]);
            (n, ())
        });
    }

    fn host_datagram(&mut self, now: std::time::Instant, flow: FlowId, payload: &[u8]) {
        if let Some(answer) = netstack::dns::Answer::parse(payload) {
            if answer
                .name
                .as_deref()
                .is_some_and(|n| self.policy.allows_name(n).is_some())
            {
                self.pinned
                    .extend(answer.addresses.iter().map(|(ip, _)| *ip));
            }
        }
        let before = self.stack.queued_frames();
        self.stack.handle_host(now, flow, Event::Datagram(payload));
        if before >= self.cfg.caps.max_queued_frames {
            assert_eq!(
                self.stack.queued_frames(),
                before,
                "a host datagram was queued past max_queued_frames"
            );
        }
    }

    /// Take what the core has for the host and the guest, checking each item.
    fn settle(&mut self) {
        let caps = &self.cfg.caps;
        let s = &self.stack;
        assert!(
            s.tcp_flow_count() <= caps.max_tcp_flows,
            "tcp flows over the cap"
        );
        assert!(
            s.datagram_flow_count() <= caps.max_datagram_flows,
            "datagram flows over the cap"
        );
        assert!(
            s.half_open_count() <= caps.max_half_open,
            "half-open flows over the cap"
        );
        assert!(
            s.half_open_count() <= s.tcp_flow_count(),
            "more half-open than tcp flows"
        );
        assert!(
            s.buffer_bytes() <= caps.max_buffer_bytes,
            "buffer bytes over the cap"
        );
        assert_eq!(
            s.buffer_bytes(),
            s.tcp_flow_count() * 2 * TCP_BUFFER,
            "buffer accounting"
        );
        while let Some(req) = self.stack.poll_request() {
            if tracing() {
                eprintln!("  request {req:?}");
            }
            self.request(req);
        }
        let open_tcp = self.tcp.iter().filter(|f| f.open).count();
        assert_eq!(
            open_tcp,
            self.stack.tcp_flow_count(),
            "tcp connects and closes disagree with the flow count"
        );
        let open_dgram = self.dgram.iter().filter(|f| f.open).count();
        assert_eq!(
            open_dgram,
            self.stack.datagram_flow_count(),
            "datagram opens and closes disagree with the flow count"
        );
        // A link that does not drain (Hold) must not grow the queue past its cap.
        assert!(
            self.stack.queued_frames() <= self.cfg.caps.max_queued_frames,
            "{} frames queued for the guest, over the cap of {}",
            self.stack.queued_frames(),
            self.cfg.caps.max_queued_frames
        );
        if !self.hold {
            while let Some(frame) = self.stack.poll_transmit() {
                let seen = check::frame_to_guest(&frame, self.cfg.mtu, self.offloads.tso);
                if tracing() {
                    eprintln!("  frame {} bytes {:?}", frame.len(), seen);
                }
                if let Some(seg) = seen {
                    self.follow(seg);
                }
                self.stack.recycle(frame);
            }
        }
        // Closed flows stay pickable for a while: a host event for a flow the core
        // already forgot is a race every driver meets.
        prune(&mut self.tcp, |f| f.open);
        prune(&mut self.dgram, |f| f.open);
    }

    fn follow(&mut self, seg: SegmentSeen) {
        let at = self
            .tracks
            .iter()
            .position(|t| t.guest == seg.guest && t.peer == seg.peer);
        match (at, seg.rst) {
            (Some(i), true) => {
                self.tracks.swap_remove(i);
            }
            (Some(i), false) => {
                let t = &mut self.tracks[i];
                if let Some(a) = seg.ack {
                    t.expect = a;
                }
                t.sent_end = seg.seq.wrapping_add(seg.len);
            }
            (None, false) => {
                if self.tracks.len() >= 16 {
                    self.tracks.remove(0);
                }
                self.tracks.push(TcpTrack {
                    guest: seg.guest,
                    peer: seg.peer,
                    expect: seg.ack.unwrap_or(0),
                    sent_end: seg.seq.wrapping_add(seg.len),
                });
            }
            (None, true) => {}
        }
    }

    /// Whether the policy in force lets the host reach `dst`, counting the
    /// operator's redirects (DNS upstream, host-loopback aliases).
    fn allowed(&self, dst: SocketAddr) -> bool {
        let names = !self.policy.names().is_empty();
        // Under names the upstream is the filtering resolver's own.
        if Some(dst) == self.cfg.dns_upstream
            && (names || self.policy.decide(dst.ip(), true).allowed)
        {
            return true;
        }
        let ip = netstack::policy::canonical_ip(dst.ip());
        if names
            && self
                .pinned
                .iter()
                .any(|p| netstack::policy::canonical_ip(*p) == ip)
        {
            return true;
        }
        if dst.ip().is_loopback() {
            let alias_ok = self
                .cfg
                .host_loopback_aliases
                .iter()
                .filter(|a| a.is_ipv4() == dst.is_ipv4())
                .any(|a| self.policy.decide(*a, true).allowed);
            if alias_ok {
                return true;
            }
        }
        self.policy.decide(dst.ip(), false).allowed
    }

    fn request(&mut self, req: HostRequest) {
        match req {
            HostRequest::TcpConnect { flow, dst, .. } => {
                assert!(flow.0 > self.last_flow, "flow id {flow} reused");
                self.last_flow = flow.0;
                assert!(
                    self.allowed(dst),
                    "TcpConnect to {dst}, which the policy denies"
                );
                assert_ne!(dst.port(), 0, "TcpConnect to port 0");
                self.tcp.push(TcpSeen {
                    id: flow,
                    dst,
                    open: true,
                });
            }
            HostRequest::TcpShutdown { flow } => {
                assert!(
                    self.tcp.iter().any(|f| f.id == flow && f.open),
                    "shutdown of unknown flow {flow}"
                );
            }
            HostRequest::TcpClose { flow, .. } => {
                let f = self.tcp.iter_mut().find(|f| f.id == flow && f.open);
                f.unwrap_or_else(|| panic!("close of unknown tcp flow {flow}"))
                    .open = false;
            }
            HostRequest::DatagramOpen { flow, kind, dst } => {
                assert!(flow.0 > self.last_flow, "flow id {flow} reused");
                self.last_flow = flow.0;
                assert!(
                    self.allowed(dst),
                    "DatagramOpen to {dst}, which the policy denies"
                );
                self.dgram.push(DatagramSeen {
                    id: flow,
                    kind,
                    dst,
                    open: true,
                });
            }
            HostRequest::DatagramSend { flow, payload } => {
                let f = self.dgram.iter().find(|f| f.id == flow && f.open);
                let f = f.unwrap_or_else(|| panic!("send on unknown datagram flow {flow}"));
                assert!(payload.len() <= usize::from(u16::MAX), "oversized datagram");
                if f.kind == DatagramKind::IcmpEcho {
                    assert!(payload.len() >= 8, "echo request shorter than its header");
                }
            }
            HostRequest::DatagramClose { flow } => {
                let f = self.dgram.iter_mut().find(|f| f.id == flow && f.open);
                f.unwrap_or_else(|| panic!("close of unknown datagram flow {flow}"))
                    .open = false;
            }
            // Inbound connections are never opened here.
            #[allow(unreachable_patterns)]
            other => panic!("a request the harness never caused: {other:?}"),
        }
    }

    /// After a policy swap, nothing the new policy denies may stay open.
    fn assert_open_flows_allowed(&self) {
        for f in self.tcp.iter().filter(|f| f.open) {
            assert!(
                self.allowed(f.dst),
                "tcp flow {} to {} survived a policy that denies it",
                f.id,
                f.dst
            );
        }
        for f in self.dgram.iter().filter(|f| f.open) {
            assert!(
                self.allowed(f.dst),
                "datagram flow {} to {} survived a policy that denies it",
                f.id,
                f.dst
            );
        }
    }
}
