//! The sans-IO core of one sandbox's network: guest frames and host events go
//! in with an explicit `now`; frames for the guest, requests for the host and
//! the next deadline come out. No sockets, no clock, no runtime in here.
//!
//! TCP is terminated by smoltcp. A guest SYN is decided before smoltcp sees
//! it; an allowed one waits for the host connect (the core times it out), and
//! only then does smoltcp take the SYN and answer it. UDP and ICMP echo are
//! relayed per flow without smoltcp.
//!
//! The API has the shape of quinn-proto's `Connection`:
//! - getters (`stats`, `config`, counts, `tcp_send_capacity`, …);
//! - inputs, each with the caller's `now`: `handle_frame`, `handle_host`,
//!   `handle_timeout`, `connect_to_guest`;
//! - mutators: `set_policy`, `set_offloads`, `reset_flows`, and the byte
//!   moves `tcp_send_with` / `tcp_recv_with`;
//! - outputs: `poll_transmit` (frames for the guest), `poll_request` (work
//!   for the host), `poll_timeout` (when to call `handle_timeout` next).
//!
//! After a batch of inputs, drain every output, in any order: the first
//! output call lets smoltcp send and settles the flows the inputs changed.
//! Call `handle_timeout` when `poll_timeout`'s instant has come (calling it
//! earlier is harmless). Outputs use the time of the last input.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};

use crate::config::{Offloads, StackConfig};
use crate::device::{OneFrame, TxQueue};
use crate::policy::{EgressPolicy, Rule, Verdict};
use crate::services;
use crate::wire::{self, FrameBuilder, GuestPacket, RxMeta, Unreachable};

mod datagram_flow;
mod inspect;
mod pool;
mod resolver;
mod tcp_flow;

use datagram_flow::{DatagramFlow, DatagramKey};
use inspect::OwnQuery;
use resolver::{Pins, QueryFate};
use tcp_flow::{TcpFlow, EPHEMERAL};

/// Identifies one relayed flow between the core and its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

/// A map keyed by flow id. The ids are the stack's own counter, never a
/// value the guest picks, so they need no keyed hash (SipHash, what maps
/// keyed by guest addresses keep): a folded multiply spreads them, and
/// several lookups per frame cost less.
pub type FlowMap<V> = HashMap<FlowId, V, BuildHasherDefault<FlowIdHasher>>;

/// The hasher of a [`FlowMap`]: the 128-bit product of the id and an odd
/// constant, its halves folded together, so that every bit of the id moves
/// the low bits the table indexes by (ids that share their low bits do not
/// share a bucket).
#[derive(Default)]
pub struct FlowIdHasher(u64);

impl Hasher for FlowIdHasher {
    fn finish(&self) -> u64 {
        let product = u128::from(self.0) * 0x9e37_79b9_7f4a_7c15;
        (product as u64) ^ ((product >> 64) as u64)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` comes from `FlowId`; anything else still hashes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How a datagram flow is carried on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatagramKind {
    Udp,
    /// ICMP echo, through an unprivileged ICMP socket: payloads are whole
    /// echo messages (8-byte header + data); the kernel picks the identifier.
    IcmpEcho,
}

/// What the host tells the core about a flow's socket (`Stack::handle_host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostEvent<'a> {
    /// The host connect of a TCP flow succeeded: the guest's SYN is answered.
    Connected,
    /// The host connect failed: the guest learns at once (RST or ICMP).
    ConnectFailed(ConnectError),
    /// The host closed its sending side: FIN to the guest after the data.
    Eof,
    /// The host reset the connection (or gave up on it): RST to the guest.
    Reset,
    /// A datagram arrived on a datagram flow: a UDP payload, or a whole
    /// ICMP echo reply (8-byte header and data).
    Datagram(&'a [u8]),
    /// The host reported an error on a datagram flow (an ICMP error on a
    /// connected UDP socket): the guest is told the same.
    DatagramError(Unreachable),
}

/// What the core needs the host to do.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRequest {
    /// Connect to `dst`; answer with `HostEvent::Connected` or
    /// `ConnectFailed`. A connect not answered within the configured
    /// timeout fails by itself, with a `TcpClose` for the host socket.
    /// `name`: the flow was allowed by this name (a TLS SNI or an HTTP
    /// Host the guest sent), and `dst` is an address the stack resolved it
    /// to; an egress proxy is handed the name rather than the address.
    TcpConnect {
        flow: FlowId,
        dst: SocketAddr,
        name: Option<String>,
    },
    /// The guest finished sending and all its data was taken: half-close the host side.
    TcpShutdown {
        flow: FlowId,
    },
    /// Forget the flow's host socket; `reset` asks for an RST (SO_LINGER 0).
    TcpClose {
        flow: FlowId,
        reset: bool,
    },
    DatagramOpen {
        flow: FlowId,
        kind: DatagramKind,
        dst: SocketAddr,
    },
    DatagramSend {
        flow: FlowId,
        payload: Vec<u8>,
    },
    DatagramClose {
        flow: FlowId,
    },
    /// The flow's TLS is to be terminated and its requests given the
    /// header rule `rule` (the key as written, e.g. `*.example.com`):
    /// `name` is the guest's SNI, which the policy allows, and `port` the
    /// guest's destination port. It comes before the flow's first guest
    /// byte can be taken, and for a flow the host dials by name, before its
    /// `TcpConnect`: the host end of the flow is the interceptor's upstream
    /// (already open for a flow a DNS pin allowed).
    Intercept {
        flow: FlowId,
        name: String,
        rule: String,
        port: u16,
    },
    /// A connection opened with `connect_to_guest` was accepted by the guest.
    InboundReady {
        flow: FlowId,
    },
    /// A connection opened with `connect_to_guest` failed; the flow is gone.
    InboundFailed {
        flow: FlowId,
        error: ConnectError,
    },
}

/// Why `connect_to_guest` could not even start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    #[error("the sandbox's incoming-connection cap is reached")]
    OverCap,
    #[error("no local port is free for a connection to the guest")]
    NoPort,
}

/// Why a host connect failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    Refused,
    Unreachable,
    TimedOut,
}

/// Counters a sandbox exposes.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub tcp_allowed: u64,
    pub tcp_denied: u64,
    pub datagram_allowed: u64,
    pub datagram_denied: u64,
    pub caps_hit: u64,
    pub frames_dropped: u64,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    /// `caps_hit` by the cap's name (`max_tcp_flows`, …).
    pub caps_hit_by_cap: BTreeMap<&'static str, u64>,
    /// `frames_dropped` by why (`IPv4 fragment`, `bad TCP checksum`, …).
    pub dropped_by_reason: BTreeMap<&'static str, u64>,
    /// Flow log lines of refused flows left out by the rate limit.
    pub log_lines_suppressed: u64,
    /// Frames for the guest dropped because the link did not drain its queue.
    pub tx_dropped: u64,
    /// Times the stack panicked and was made anew (see `Driver`).
    pub stack_panics: u64,
    /// Queries the filtering resolver forwarded / answered NXDOMAIN itself.
    pub dns_forwarded: u64,
    pub dns_blocked: u64,
    /// Answers rewritten without addresses in the internal ranges.
    pub dns_answers_rewritten: u64,
    /// New flows allowed by a DNS pin.
    pub pinned_flows: u64,
    /// New flows allowed by the name in their TLS SNI / HTTP Host (the
    /// host dialed the name).
    pub sni_flows: u64,
    pub host_flows: u64,
    /// Flows reset because their first bytes named no allowed host.
    pub name_refused: u64,
    /// ... of which were flows to a pinned address naming another host.
    pub fronting_refused: u64,
    /// TLS flows handed to the interceptor because a header rule matched
    /// their SNI.
    pub intercepted_flows: u64,
    /// TCP buffers (two per flow) a new flow took from those of flows that
    /// ended, instead of new memory.
    pub tcp_buffers_reused: u64,
}

impl Stats {
    fn dropped(&mut self, why: &'static str) {
        self.frames_dropped += 1;
        *self.dropped_by_reason.entry(why).or_default() += 1;
    }

    fn hit_cap(&mut self, cap: &'static str) {
        self.caps_hit += 1;
        *self.caps_hit_by_cap.entry(cap).or_default() += 1;
    }
}

/// One sandbox's network core. Feed it inputs (`handle_frame`,
/// `handle_host`, `handle_timeout`, `connect_to_guest`, each with `now`),
/// then drain every output (`poll_transmit`, `poll_request`) and sleep
/// until `poll_timeout`, or the next input, whichever comes first.
pub struct Stack {
    cfg: StackConfig,
    policy: EgressPolicy,
    iface: Interface,
    sockets: SocketSet<'static>,
    /// The TCP buffers of flows that ended, for the next ones; the
    /// sockets borrow from it (see `Drop`).
    pool: pool::BufferPool,
    /// When the pool's kept buffers are freed unless a flow ends first.
    pool_release_at: Option<Instant>,
    tx: TxQueue,
    gateway_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    tcp: FlowMap<TcpFlow>,
    tcp_by_key: HashMap<(SocketAddr, SocketAddr), FlowId>,
    datagram: FlowMap<DatagramFlow>,
    datagram_by_key: HashMap<DatagramKey, FlowId>,
    requests: std::collections::VecDeque<HostRequest>,
    next_flow: u64,
    half_open: usize,
    inbound: usize,
    next_ephemeral: u16,
    buffer_bytes: usize,
    next_sweep: Option<Instant>,
    /// Host connects in flight (and name dials), by deadline.
    connect_deadlines: BTreeSet<(Instant, FlowId)>,
    /// Flows whose first bytes must name a host by then.
    inspect_deadlines: BTreeSet<(Instant, FlowId)>,
    /// The stack's own queries to its upstream, by their datagram flow.
    own_queries: FlowMap<OwnQuery>,
    query_seq: u64,
    /// The caller's clock at `Instant::ZERO` of smoltcp's.
    epoch: std::time::Instant,
    now: Instant,
    /// An input changed something smoltcp may want to send or settle.
    dirty: bool,
    stats: Stats,
    offloads: Offloads,
    refusal_log: RefusalLog,
    pins: Pins,
}

/// Test builds only (feature `fault-injection`, never in a release): an
/// Ethernet frame of the local experimental type 0x88b5 whose payload starts
/// with this makes the stack panic, so tests can show that a panic stays
/// inside its sandbox.
#[cfg(feature = "fault-injection")]
pub const PANIC_FRAME: &[u8] = b"slipway-fault-injection: panic";

impl Drop for Stack {
    fn drop(&mut self) {
        // The sockets go first: only then may the pool have back the
        // buffers they borrow, and free them.
        self.sockets = SocketSet::new(Vec::new());
        for f in self.tcp.values_mut() {
            if let Some(buffers) = f.buffers.take() {
                // SAFETY: every socket was dropped just above.
                unsafe { self.pool.give_back(buffers, None) };
            }
        }
    }
}

impl Stack {
    /// A sandbox's network as of `now` (the caller's clock, which every
    /// later input continues).
    pub fn new(cfg: StackConfig, policy: EgressPolicy, now: std::time::Instant) -> Self {
        let gateway_mac = EthernetAddress(cfg.plan.gateway_mac);
        let mut tx = TxQueue::new(cfg.caps.max_queued_frames, cfg.caps.max_queued_bytes);
        let offloads = Offloads::default();
        let iface = Self::new_iface(&cfg, &mut tx, offloads, Instant::ZERO);
        Self {
            policy,
            iface,
            sockets: SocketSet::new(Vec::new()),
            pool: pool::BufferPool::new(cfg.tcp_buffer),
            pool_release_at: None,
            tx,
            gateway_mac,
            guest_mac: EthernetAddress::BROADCAST,
            tcp: FlowMap::default(),
            tcp_by_key: HashMap::new(),
            datagram: FlowMap::default(),
            datagram_by_key: HashMap::new(),
            requests: Default::default(),
            next_flow: 1,
            half_open: 0,
            inbound: 0,
            next_ephemeral: EPHEMERAL.start,
            buffer_bytes: 0,
            next_sweep: None,
            connect_deadlines: BTreeSet::new(),
            inspect_deadlines: BTreeSet::new(),
            own_queries: FlowMap::default(),
            query_seq: cfg.random_seed,
            epoch: now,
            now: Instant::ZERO,
            dirty: true,
            stats: Stats::default(),
            offloads,
            refusal_log: RefusalLog::default(),
            pins: Pins::default(),
            cfg,
        }
    }

    /// smoltcp's interface: the gateway's addresses and routes, over a
    /// device with `offloads` (smoltcp reads device capabilities once, here).
    fn new_iface(
        cfg: &StackConfig,
        tx: &mut TxQueue,
        offloads: Offloads,
        now: Instant,
    ) -> Interface {
        let gateway_mac = EthernetAddress(cfg.plan.gateway_mac);
        let mut iface_cfg = IfaceConfig::new(HardwareAddress::Ethernet(gateway_mac));
        // A remade interface must not replay the first one's sequence numbers.
        iface_cfg.random_seed = cfg.random_seed ^ now.total_micros() as u64;
        // (`now` only varies the seed: smoltcp's clock is the core's own.)
        let mut dev = OneFrame {
            rx: None,
            tx,
            mtu: cfg.mtu,
            offloads,
        };
        let mut iface = Interface::new(iface_cfg, &mut dev, now);
        let plan = &cfg.plan;
        iface.update_ip_addrs(|addrs| {
            let v4 = [plan.gateway_v4, plan.dns_v4];
            let v6 = [plan.gateway_v6, plan.dns_v6, plan.gateway_v6_link_local];
            for a in v4 {
                let _ = addrs.push(IpCidr::new(a.into(), plan.prefix_v4));
            }
            for (i, a) in v6.into_iter().enumerate() {
                let len = if i == 2 { 64 } else { plan.prefix_v6 };
                let _ = addrs.push(IpCidr::new(a.into(), len));
            }
        });
        let _ = iface.routes_mut().add_default_ipv4_route(plan.gateway_v4);
        let _ = iface.routes_mut().add_default_ipv6_route(plan.gateway_v6);
        // Accept segments to every address: each relayed peer is "us".
        iface.set_any_ip(true);
        iface
    }

    /// What the link does for the stack (the driver sets it from each new
    /// link). smoltcp takes device capabilities only when its interface is
    /// made, so a change makes a new one: its neighbour cache starts empty,
    /// and open flows keep going (a new link has reset them anyway).
    pub fn set_offloads(&mut self, offloads: Offloads) {
        let offloads = Offloads {
            tso: offloads.tso && offloads.tx_checksum,
            ..offloads
        };
        if offloads != self.offloads {
            self.offloads = offloads;
            self.iface = Self::new_iface(&self.cfg, &mut self.tx, offloads, self.now);
        }
    }

    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    pub fn config(&self) -> &StackConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Carry counters over from a stack this one replaces.
    pub fn restore_stats(&mut self, stats: Stats) {
        self.stats = stats;
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    pub fn tcp_flow_count(&self) -> usize {
        self.tcp.len()
    }

    pub fn datagram_flow_count(&self) -> usize {
        self.datagram.len()
    }

    pub fn half_open_count(&self) -> usize {
        self.half_open
    }

    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    fn builder(&self) -> FrameBuilder {
        FrameBuilder {
            gateway_mac: self.gateway_mac,
            guest_mac: self.guest_mac,
        }
    }

    fn alloc_flow(&mut self) -> FlowId {
        let id = FlowId(self.next_flow);
        self.next_flow += 1;
        id
    }

    fn emit(&mut self, frame: Option<Vec<u8>>) {
        if let Some(f) = frame {
            self.tx.push(f);
        }
    }

    // ----- guest side -------------------------------------------------------

    /// Take one Ethernet frame from the guest, with what its link said about
    /// it (an offloaded checksum). A TSO super-frame is one TCP segment like
    /// any other.
    pub fn handle_frame(&mut self, now: std::time::Instant, frame: &[u8], meta: RxMeta) {
        let now = self.clock(now);
        #[cfg(feature = "fault-injection")]
        if frame.get(12..14) == Some(&[0x88, 0xb5]) && frame[14..].starts_with(PANIC_FRAME) {
            panic!("fault injection: a guest frame asked the stack to panic");
        }
        let parsed = wire::classify(frame, meta);
        if parsed.src_mac.is_unicast() {
            self.guest_mac = parsed.src_mac;
        }
        match parsed.packet {
            GuestPacket::Smoltcp => self.ingest(now, frame),
            GuestPacket::Tcp { src, dst, rst } => self.on_segment(now, frame, src, dst, rst),
            GuestPacket::TcpSyn { src, dst } => self.on_syn(now, frame, parsed.ip, src, dst),
            GuestPacket::Udp { src, dst, payload } => {
                self.on_udp(now, parsed.ip, src, dst, payload)
            }
            GuestPacket::IcmpEcho {
                src,
                dst,
                ident,
                seq,
                data,
            } => self.on_echo(now, parsed.ip, src, dst, ident, seq, data),
            GuestPacket::Arp { sender, target } => {
                // With any_ip smoltcp answers every ARP request; the guest's
                // own address (a probe or an announcement) must stay the guest's.
                let guest = self.cfg.plan.guest_v4;
                if target == guest || sender == target {
                    self.stats.dropped("ARP about the guest's own address");
                } else {
                    self.ingest(now, frame);
                }
            }
            GuestPacket::RouterSolicit { .. } => {
                let ra = services::router_advert(&self.cfg, self.gateway_mac);
                self.emit(ra);
            }
            GuestPacket::Drop(why) => {
                self.stats.dropped(why);
                tracing::trace!(why, len = frame.len(), "dropped guest frame");
            }
        }
        self.count_tx_drops();
    }

    fn ingest(&mut self, now: Instant, frame: &[u8]) {
        let mut dev = OneFrame {
            rx: Some(frame),
            tx: &mut self.tx,
            mtu: self.cfg.mtu,
            offloads: self.offloads,
        };
        self.iface
            .poll_ingress_single(now, &mut dev, &mut self.sockets);
    }

    /// Where a guest-visible destination really goes, and whether the operator chose it.
    fn redirect(&self, dst: SocketAddr) -> Option<(SocketAddr, IpAddr, bool)> {
        if let Some(lo) = self.cfg.host_loopback_for(dst.ip()) {
            return Some((SocketAddr::new(lo, dst.port()), dst.ip(), true));
        }
        if self.is_resolver(dst) {
            let up = self.cfg.dns_upstream?;
            return Some((up, up.ip(), true));
        }
        if self.cfg.plan.is_own(dst.ip()) {
            return None;
        }
        Some((dst, dst.ip(), false))
    }

    // ----- policy -----------------------------------------------------------

    /// smoltcp's clock from the caller's, never going back; every input
    /// calls it first. The core never reads a clock itself.
    fn clock(&mut self, now: std::time::Instant) -> Instant {
        let since = now.saturating_duration_since(self.epoch);
        let t = Instant::from_micros(i64::try_from(since.as_micros()).unwrap_or(i64::MAX));
        self.now = self.now.max(t);
        self.dirty = true;
        self.now
    }

    /// The caller's clock at smoltcp's `at`.
    fn caller_time(&self, at: Instant) -> std::time::Instant {
        self.epoch + Duration::from_micros(u64::try_from(at.total_micros()).unwrap_or(0))
    }

    /// Reset every flow: the link to the guest was replaced, so its
    /// connections are void. TCP flows get an RST (a guest restored from a
    /// snapshot learns at once); datagram flows are forgotten.
    pub fn reset_flows(&mut self, now: std::time::Instant) {
        self.clock(now);
        let tcp: Vec<FlowId> = self.tcp.keys().copied().collect();
        for id in tcp {
            self.tcp_host_reset(id);
        }
        let datagrams: Vec<FlowId> = self.datagram.keys().copied().collect();
        for id in datagrams {
            self.close_datagram(id, "link replaced");
        }
        self.flush();
        // What the old link's host sockets were asked to do is moot now.
        self.requests.clear();
    }

    /// Replace the DNS servers the guest may address (E2B's `dnsServers`):
    /// from now on queries to them are answered by the filtering resolver.
    /// Open flows to an old server keep going until they end.
    pub fn set_dns_servers(&mut self, now: std::time::Instant, servers: Vec<IpAddr>) {
        self.clock(now);
        self.cfg.dns_servers = servers;
    }

    /// Replace the policy atomically; live flows it now denies are reset.
    pub fn set_policy(&mut self, now: std::time::Instant, policy: EgressPolicy) {
        self.clock(now);
        self.policy = policy;
        self.drop_stale_pins();
        let tcp_denied: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, f)| match f.phase {
                // Decided by the policy in force when its first bytes come.
                tcp_flow::TcpPhase::Inspecting => false,
                tcp_flow::TcpPhase::Resolver => !self.filters_names(),
                _ => !self.still_allowed(f.key.1, f.name.as_deref()),
            })
            .map(|(id, _)| *id)
            .collect();
        for id in tcp_denied {
            tracing::info!(target: "slipway::flow", flow = %id, "reset: the new policy denies it");
            self.tcp_host_reset(id);
        }
        let dgram_denied: Vec<FlowId> = self
            .datagram
            .iter()
            .filter(|(_, f)| !self.still_allowed(f.key.peer, f.pin_name.as_deref()))
            .map(|(id, _)| *id)
            .collect();
        for id in dgram_denied {
            self.close_datagram(id, "the new policy denies it");
        }
    }

    /// Whether a live flow to `dst` survives the policy in force: a flow a
    /// pin allowed keeps going while its name is allowed, even after the
    /// pin itself expired.
    fn still_allowed(&self, dst: SocketAddr, pin_name: Option<&str>) -> bool {
        if pin_name.is_some_and(|n| self.policy.allows_name(n).is_some()) {
            return true;
        }
        if self.is_resolver(dst) && self.filters_names() {
            return true;
        }
        match self.redirect(dst) {
            Some((_, on, exempt)) => self.decide(on, exempt).0.allowed,
            None => true,
        }
    }

    /// Where the filtering resolver answers: the stack's own DNS address on
    /// port 53, and, while names are filtered, the `dns_servers` the guest
    /// may have been told about.
    fn is_resolver(&self, dst: SocketAddr) -> bool {
        dst.port() == 53
            && (self.cfg.plan.is_dns(dst.ip())
                || (self.filters_names() && self.cfg.dns_servers.contains(&dst.ip())))
    }

    // ----- driving ----------------------------------------------------------

    /// Time passed: connects past their deadline fail, idle datagram flows
    /// are forgotten, TCP buffers kept for new flows that none took are
    /// freed, smoltcp's timers (retransmits, delayed ACKs, …) run at the
    /// next output.
    pub fn handle_timeout(&mut self, now: std::time::Instant) {
        let now = self.clock(now);
        while let Some(&(at, flow)) = self.connect_deadlines.first() {
            if at > now {
                break;
            }
            self.connect_deadlines.pop_first();
            self.handle_connect_failed(flow, ConnectError::TimedOut);
        }
        while let Some(&(at, flow)) = self.inspect_deadlines.first() {
            if at > now {
                break;
            }
            self.inspect_deadlines.pop_first();
            self.inspect_timed_out(flow);
        }
        if self.next_sweep.is_some_and(|t| now >= t) {
            self.sweep_datagrams(now);
        }
        if self.pool_release_at.is_some_and(|t| now >= t) {
            self.pool.release();
            self.pool_release_at = None;
        }
    }

    /// What the host says about `flow`'s socket.
    pub fn handle_host(&mut self, now: std::time::Instant, flow: FlowId, event: HostEvent<'_>) {
        let now = self.clock(now);
        match event {
            HostEvent::Connected => self.handle_connected(flow),
            HostEvent::ConnectFailed(err) => self.handle_connect_failed(flow, err),
            HostEvent::Eof => self.host_eof(flow),
            HostEvent::Reset => self.tcp_host_reset(flow),
            HostEvent::Datagram(payload) if self.own_queries.contains_key(&flow) => {
                self.own_answer(flow, Some(payload))
            }
            HostEvent::DatagramError(_) if self.own_queries.contains_key(&flow) => {
                self.own_answer(flow, None)
            }
            HostEvent::Datagram(payload) => self.datagram_from_host(now, flow, payload),
            HostEvent::DatagramError(why) => self.datagram_host_error(flow, why),
        }
    }

    /// Let smoltcp send what it has (segments, ACKs, window updates) and
    /// settle flows whose state changed, once per batch of inputs.
    fn flush(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let now = self.now;
        let mut dev = OneFrame {
            rx: None,
            tx: &mut self.tx,
            mtu: self.cfg.mtu,
            offloads: self.offloads,
        };
        self.iface.poll_maintenance(now);
        self.iface.poll_egress(now, &mut dev, &mut self.sockets);
        self.settle_tcp(now);
        self.count_tx_drops();
    }

    /// Frames the full queue to the guest refused, into the counters.
    fn count_tx_drops(&mut self) {
        let dropped = self.tx.take_dropped();
        if dropped > 0 {
            self.stats.tx_dropped += dropped;
            self.stats.frames_dropped += dropped;
            *self
                .stats
                .dropped_by_reason
                .entry("guest link not draining")
                .or_default() += dropped;
        }
    }

    /// When `handle_timeout` is next due, if nothing else happens first.
    /// While the queue to the guest is full, smoltcp's wish to send waits
    /// for the link: call `poll_transmit` again once the link takes frames.
    pub fn poll_timeout(&mut self) -> Option<std::time::Instant> {
        self.flush();
        let now = self.now;
        let smol = self
            .iface
            .poll_at(now, &self.sockets)
            .filter(|&at| at > now || !self.tx.is_full());
        let connect = self.connect_deadlines.first().map(|&(at, _)| at);
        let inspect = self.inspect_deadlines.first().map(|&(at, _)| at);
        let at = [
            smol,
            self.next_sweep,
            connect,
            inspect,
            self.pool_release_at,
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some(self.caller_time(at))
    }

    /// The next request for the host, in order.
    pub fn poll_request(&mut self) -> Option<HostRequest> {
        self.flush();
        let req = self.requests.pop_front()?;
        if let HostRequest::Intercept { flow, .. } = &req {
            // The host knows now: the flow's bytes are for its interceptor.
            if let Some(f) = self.tcp.get_mut(flow) {
                f.intercept_pending = false;
            }
        }
        Some(req)
    }

    /// The next frame for the guest. Hand spent buffers back with `recycle`.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.flush();
        self.tx.pop()
    }

    /// Give back a frame the link could not take yet; it goes out first next time.
    pub fn unsend(&mut self, frame: Vec<u8>) {
        self.tx.unpop(frame);
    }

    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.tx.recycle(buf);
    }

    pub fn queued_frames(&self) -> usize {
        self.tx.len()
    }

    /// Forget the frames queued for the guest: its link is gone, and a new
    /// one (a restored VM, a reconnected VMM) must not get the old guest's
    /// replies.
    pub fn discard_transmit(&mut self) {
        self.tx.discard();
    }

    /// Send an unsolicited router advertisement (at start, and now and then).
    pub fn advertise_router(&mut self) {
        let ra = services::router_advert(&self.cfg, self.gateway_mac);
        self.emit(ra);
    }
}

impl Stack {
    /// Multicast, limited broadcast, or the guest subnet's directed broadcast.
    fn is_broadcast_or_multicast(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => {
                let plan = &self.cfg.plan;
                let host_bits = u32::MAX.checked_shr(u32::from(plan.prefix_v4)).unwrap_or(0);
                let directed = u32::from(plan.guest_v4) | host_bits;
                a.is_multicast() || a.is_broadcast() || (host_bits != 0 && u32::from(a) == directed)
            }
            IpAddr::V6(a) => a.is_multicast(),
        }
    }
}

/// Refused flows cost a guest nothing to make, so their log lines are
/// rate-limited per sandbox: at most `REFUSALS_PER_SECOND` a second; the next
/// line logged says how many were left out before it.
const REFUSALS_PER_SECOND: u32 = 50;

#[derive(Debug, Default)]
struct RefusalLog {
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// Whether to log a refusal now; `Some(n)`: yes, and `n` were left out before it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let second = smoltcp::time::Duration::from_secs(1);
        if self
            .window
            .is_none_or(|start| now >= start + second || now < start)
        {
            self.window = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= REFUSALS_PER_SECOND {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Stack {
    /// The flow log line of a denied flow or one over a cap, rate-limited.
    fn log_refusal(
        &mut self,
        proto: &str,
        src: SocketAddr,
        dst: SocketAddr,
        v: Verdict,
        cap: Option<&str>,
    ) {
        match self.refusal_log.admit(self.now) {
            Some(suppressed) => log_flow(proto, src, dst, v, cap, None, suppressed),
            None => self.stats.log_lines_suppressed += 1,
        }
    }
}

/// The flow log line of a new flow. `name`: the name whose DNS pin allowed
/// it; `suppressed`: refusals left out by the rate limit before this one.
/// Either field appears only when it has a value.
fn log_decision(
    proto: &str,
    src: SocketAddr,
    dst: SocketAddr,
    v: Verdict,
    cap: Option<&str>,
    name: Option<&str>,
) {
    log_flow(proto, src, dst, v, cap, name, 0);
}

fn log_flow(
    proto: &str,
    src: SocketAddr,
    dst: SocketAddr,
    v: Verdict,
    cap: Option<&str>,
    name: Option<&str>,
    suppressed: u64,
) {
    let verdict = match (v.allowed, cap) {
        (true, None) => "allow",
        (true, Some(_)) => "refuse",
        (false, _) => "deny",
    };
    tracing::info!(
        target: "slipway::flow",
        proto,
        %src,
        %dst,
        verdict,
        rule = %v.rule,
        cap = cap.unwrap_or(""),
        name,
        suppressed = (suppressed > 0).then_some(suppressed),
        "new flow"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Ids a guest could keep alive by closing the others (every 2^k-th)
    /// must not pile into a few of a table's buckets.
    #[test]
    fn flow_ids_sharing_low_bits_spread_over_buckets() {
        let build = BuildHasherDefault::<FlowIdHasher>::default();
        for shift in [0u32, 6, 10, 16, 32] {
            let buckets = 1024u64;
            let mut used = std::collections::HashSet::new();
            for i in 0..buckets {
                let id = FlowId(i << shift);
                used.insert(build.hash_one(id) & (buckets - 1));
            }
            // Random hashing fills about 63% of the buckets.
            assert!(
                used.len() > 550,
                "ids spaced 2^{shift} use {} of {buckets} buckets",
                used.len()
            );
        }
    }

    #[test]
    fn flow_map_finds_what_it_holds() {
        let mut map = FlowMap::default();
        for i in 0..5000u64 {
            map.insert(FlowId(i * 7919), i);
        }
        assert!((0..5000u64).all(|i| map.get(&FlowId(i * 7919)) == Some(&i)));
        assert_eq!(map.get(&FlowId(1)), None);
    }
}
