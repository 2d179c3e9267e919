//! The sans-IO core of one sandbox's network: guest frames and host events go
//! in with an explicit `now`; frames for the guest, requests for the host and
//! the next deadline come out. No sockets, no clock, no runtime in here.
//!
//! TCP is terminated by smoltcp. A guest SYN is decided before smoltcp sees
//! it; an allowed one gets a listening socket for that exact endpoint whose
//! SYN-ACK stays paused until the host connect succeeded. UDP and ICMP echo
//! are relayed per flow without smoltcp.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};

use crate::config::StackConfig;
use crate::device::{OneFrame, TxQueue};
use crate::policy::{EgressPolicy, Rule, Verdict};
use crate::services;
use crate::wire::{self, FrameBuilder, GuestPacket, Unreachable};

/// Identifies one relayed flow between the core and its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

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

/// What the core needs the host to do.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRequest {
    /// Connect to `dst`; answer with `tcp_connected` or `tcp_connect_failed`.
    TcpConnect {
        flow: FlowId,
        dst: SocketAddr,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpPhase {
    /// Host connect in progress; the guest's SYN-ACK is paused.
    Connecting,
    /// Our SYN to the guest is out (a connection from the public gateway).
    GuestConnecting,
    Open,
}

struct TcpFlow {
    key: (SocketAddr, SocketAddr),
    handle: SocketHandle,
    phase: TcpPhase,
    rule: Rule,
    inbound: bool,
    /// The guest's SYN (whole IP packet), quoted if the connect ends in ICMP.
    syn: Vec<u8>,
    /// The guest's FIN arrived (its bytes may still wait in the buffer).
    guest_fin_seen: bool,
    /// ... and all its bytes were taken, so the host was told.
    guest_fin_reported: bool,
    /// We reset the flow: what the guest still had buffered goes too.
    aborted: bool,
    host_eof: bool,
    started: Instant,
    to_host: u64,
    to_guest: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DatagramKey {
    kind: DatagramKind,
    guest: SocketAddr,
    peer: SocketAddr,
}

struct DatagramFlow {
    key: DatagramKey,
    deadline: Instant,
    idle: Duration,
    started: Instant,
    to_host: u64,
    to_guest: u64,
}

/// One sandbox's network core.
pub struct Stack {
    cfg: StackConfig,
    policy: EgressPolicy,
    iface: Interface,
    sockets: SocketSet<'static>,
    tx: TxQueue,
    gateway_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    tcp: HashMap<FlowId, TcpFlow>,
    tcp_by_key: HashMap<(SocketAddr, SocketAddr), FlowId>,
    datagram: HashMap<FlowId, DatagramFlow>,
    datagram_by_key: HashMap<DatagramKey, FlowId>,
    requests: std::collections::VecDeque<HostRequest>,
    next_flow: u64,
    half_open: usize,
    inbound: usize,
    next_ephemeral: u16,
    buffer_bytes: usize,
    next_sweep: Option<Instant>,
    now: Instant,
    stats: Stats,
}

/// smoltcp's clock from the caller's; the core never reads a clock itself.
pub fn smol_instant(since_start: Duration) -> Instant {
    Instant::from_micros(since_start.as_micros() as i64)
}

const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Local ports the gateway uses for connections into the guest.
const EPHEMERAL: std::ops::Range<u16> = 32768..61000;
/// How long the guest may take to accept a connection from the gateway.
const GUEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Stack {
    pub fn new(cfg: StackConfig, policy: EgressPolicy, now: Instant) -> Self {
        let gateway_mac = EthernetAddress(cfg.plan.gateway_mac);
        let mut iface_cfg = IfaceConfig::new(HardwareAddress::Ethernet(gateway_mac));
        iface_cfg.random_seed = cfg.random_seed;
        let mut tx = TxQueue::default();
        let mut dev = OneFrame {
            rx: None,
            tx: &mut tx,
            mtu: cfg.mtu,
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
        Self {
            policy,
            iface,
            sockets: SocketSet::new(Vec::new()),
            tx,
            gateway_mac,
            guest_mac: EthernetAddress::BROADCAST,
            tcp: HashMap::new(),
            tcp_by_key: HashMap::new(),
            datagram: HashMap::new(),
            datagram_by_key: HashMap::new(),
            requests: Default::default(),
            next_flow: 1,
            half_open: 0,
            inbound: 0,
            next_ephemeral: EPHEMERAL.start,
            buffer_bytes: 0,
            next_sweep: None,
            now,
            stats: Stats::default(),
            cfg,
        }
    }

    pub fn config(&self) -> &StackConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
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

    /// Take one Ethernet frame from the guest.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        self.now = now;
        let parsed = wire::classify(frame);
        if parsed.src_mac.is_unicast() {
            self.guest_mac = parsed.src_mac;
        }
        match parsed.packet {
            GuestPacket::Smoltcp | GuestPacket::Tcp { .. } => self.ingest(now, frame),
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
                    self.stats.frames_dropped += 1;
                } else {
                    self.ingest(now, frame);
                }
            }
            GuestPacket::RouterSolicit { .. } => {
                let ra = services::router_advert(&self.cfg, self.gateway_mac);
                self.emit(ra);
            }
            GuestPacket::Drop(why) => {
                self.stats.frames_dropped += 1;
                tracing::trace!(why, len = frame.len(), "dropped guest frame");
            }
        }
    }

    fn ingest(&mut self, now: Instant, frame: &[u8]) {
        let mut dev = OneFrame {
            rx: Some(frame),
            tx: &mut self.tx,
            mtu: self.cfg.mtu,
        };
        self.iface
            .poll_ingress_single(now, &mut dev, &mut self.sockets);
    }

    /// Where a guest-visible destination really goes, and whether the operator chose it.
    fn redirect(&self, dst: SocketAddr) -> Option<(SocketAddr, IpAddr, bool)> {
        if let Some(lo) = self.cfg.host_loopback_for(dst.ip()) {
            return Some((SocketAddr::new(lo, dst.port()), dst.ip(), true));
        }
        if self.cfg.plan.is_dns(dst.ip()) && dst.port() == 53 {
            let up = self.cfg.dns_upstream?;
            return Some((up, up.ip(), true));
        }
        if self.cfg.plan.is_own(dst.ip()) {
            return None;
        }
        Some((dst, dst.ip(), false))
    }

    fn on_syn(&mut self, now: Instant, frame: &[u8], ip: &[u8], src: SocketAddr, dst: SocketAddr) {
        if self.tcp_by_key.contains_key(&(src, dst)) {
            // A retransmitted SYN of a flow we already hold.
            return self.ingest(now, frame);
        }
        let Some((host_dst, decided_on, exempt)) = self.redirect(dst) else {
            // The gateway's own ports: smoltcp has no socket there and answers RST.
            return self.ingest(now, frame);
        };
        let verdict = self.policy.decide(decided_on, exempt);
        if !verdict.allowed {
            self.stats.tcp_denied += 1;
            log_decision("tcp", src, dst, verdict, None);
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        let need = 2 * self.cfg.tcp_buffer;
        let caps = &self.cfg.caps;
        let over = if self.tcp.len() >= caps.max_tcp_flows {
            Some("max_tcp_flows")
        } else if self.half_open >= caps.max_half_open {
            Some("max_half_open")
        } else if self.buffer_bytes + need > caps.max_buffer_bytes {
            Some("max_buffer_bytes")
        } else {
            None
        };
        if let Some(cap) = over {
            self.stats.caps_hit += 1;
            log_decision("tcp", src, dst, verdict, Some(cap));
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.cfg.tcp_buffer]),
            tcp::SocketBuffer::new(vec![0; self.cfg.tcp_buffer]),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        socket.pause_synack(true);
        let listen = IpListenEndpoint {
            addr: Some(dst.ip().into()),
            port: dst.port(),
        };
        if socket.listen(listen).is_err() {
            // Port 0: nothing to connect to.
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        let handle = self.sockets.add(socket);
        self.ingest(now, frame);
        if self.sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynReceived {
            // smoltcp did not take the SYN (bad options, …): nothing to relay.
            self.sockets.remove(handle);
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        let flow = self.alloc_flow();
        self.stats.tcp_allowed += 1;
        log_decision("tcp", src, dst, verdict, None);
        self.tcp.insert(
            flow,
            TcpFlow {
                key: (src, dst),
                handle,
                phase: TcpPhase::Connecting,
                rule: verdict.rule,
                inbound: false,
                syn: ip.to_vec(),
                guest_fin_seen: false,
                guest_fin_reported: false,
                aborted: false,
                host_eof: false,
                started: now,
                to_host: 0,
                to_guest: 0,
            },
        );
        self.tcp_by_key.insert((src, dst), flow);
        self.half_open += 1;
        self.buffer_bytes += need;
        self.requests.push_back(HostRequest::TcpConnect {
            flow,
            dst: host_dst,
        });
    }

    fn on_udp(
        &mut self,
        now: Instant,
        ip: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) {
        let plan = &self.cfg.plan;
        if dst.port() == 67 && src.port() == 68 {
            let reply = services::dhcp_reply(&self.cfg, self.gateway_mac, payload);
            return self.emit(reply);
        }
        if self.is_broadcast_or_multicast(dst.ip()) {
            // No ICMP errors for these (RFC 1122); the policy never relays them.
            self.stats.frames_dropped += 1;
            return;
        }
        let dns = plan.is_dns(dst.ip()) && dst.port() == 53;
        if dns && !services::looks_like_dns_query(payload) {
            self.stats.frames_dropped += 1;
            return;
        }
        let Some((host_dst, decided_on, exempt)) = self.redirect(dst) else {
            let from = dst.ip();
            let err = self.builder().unreachable(from, ip, Unreachable::Port);
            return self.emit(err);
        };
        let key = DatagramKey {
            kind: DatagramKind::Udp,
            guest: src,
            peer: dst,
        };
        let idle = if dns {
            self.cfg.dns_timeout
        } else {
            self.cfg.udp_idle_timeout
        };
        self.relay_datagram(
            now,
            ip,
            key,
            host_dst,
            decided_on,
            exempt,
            idle,
            payload.to_vec(),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn on_echo(
        &mut self,
        now: Instant,
        ip: &[u8],
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq: u16,
        data: &[u8],
    ) {
        if self.cfg.plan.is_own(dst) {
            let reply = self.builder().echo_reply(dst, src, ident, seq, data);
            return self.emit(reply);
        }
        if self.is_broadcast_or_multicast(dst) {
            self.stats.frames_dropped += 1;
            return;
        }
        let Some((host_dst, decided_on, exempt)) = self.redirect(SocketAddr::new(dst, 0)) else {
            return;
        };
        let key = DatagramKey {
            kind: DatagramKind::IcmpEcho,
            guest: SocketAddr::new(src, ident),
            peer: SocketAddr::new(dst, 0),
        };
        let mut msg = Vec::with_capacity(8 + data.len());
        msg.push(if src.is_ipv4() { 8 } else { 128 });
        msg.extend_from_slice(&[0, 0, 0]);
        msg.extend_from_slice(&ident.to_be_bytes());
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(data);
        let idle = self.cfg.udp_idle_timeout;
        self.relay_datagram(now, ip, key, host_dst, decided_on, exempt, idle, msg);
    }

    #[allow(clippy::too_many_arguments)]
    fn relay_datagram(
        &mut self,
        now: Instant,
        ip: &[u8],
        key: DatagramKey,
        host_dst: SocketAddr,
        decided_on: IpAddr,
        exempt: bool,
        idle: Duration,
        payload: Vec<u8>,
    ) {
        let proto = match key.kind {
            DatagramKind::Udp => "udp",
            DatagramKind::IcmpEcho => "icmp",
        };
        let flow = match self.datagram_by_key.get(&key) {
            Some(&flow) => flow,
            None => {
                let verdict = self.policy.decide(decided_on, exempt);
                let over_cap = self.datagram.len() >= self.cfg.caps.max_datagram_flows;
                if !verdict.allowed || over_cap {
                    if verdict.allowed {
                        self.stats.caps_hit += 1;
                        log_decision(
                            proto,
                            key.guest,
                            key.peer,
                            verdict,
                            Some("max_datagram_flows"),
                        );
                    } else {
                        self.stats.datagram_denied += 1;
                        log_decision(proto, key.guest, key.peer, verdict, None);
                    }
                    let err = self.builder().unreachable(
                        self.cfg.plan.gateway_for(key.peer.ip()),
                        ip,
                        Unreachable::Prohibited,
                    );
                    return self.emit(err);
                }
                self.stats.datagram_allowed += 1;
                log_decision(proto, key.guest, key.peer, verdict, None);
                let flow = self.alloc_flow();
                self.datagram.insert(
                    flow,
                    DatagramFlow {
                        key,
                        deadline: now + idle.into(),
                        idle,
                        started: now,
                        to_host: 0,
                        to_guest: 0,
                    },
                );
                self.datagram_by_key.insert(key, flow);
                self.requests.push_back(HostRequest::DatagramOpen {
                    flow,
                    kind: key.kind,
                    dst: host_dst,
                });
                self.next_sweep.get_or_insert(now + SWEEP_EVERY.into());
                flow
            }
        };
        if let Some(f) = self.datagram.get_mut(&flow) {
            f.deadline = now + f.idle.into();
            f.to_host += payload.len() as u64;
        }
        self.stats.bytes_to_host += payload.len() as u64;
        self.requests
            .push_back(HostRequest::DatagramSend { flow, payload });
    }

    // ----- inbound (gateway → guest) -----------------------------------------

    /// Open a TCP connection from the gateway's address to the guest's `port`
    /// (IPv4, or IPv6 when `v6`). The answer comes later as
    /// `HostRequest::InboundReady` or `InboundFailed`; bytes then move with
    /// the same calls as for outbound flows.
    pub fn connect_to_guest(
        &mut self,
        now: Instant,
        port: u16,
        v6: bool,
    ) -> Result<FlowId, InboundError> {
        self.now = now;
        let caps = &self.cfg.caps;
        let need = 2 * self.cfg.tcp_buffer;
        if self.inbound >= caps.max_inbound
            || self.tcp.len() >= caps.max_tcp_flows
            || self.buffer_bytes + need > caps.max_buffer_bytes
        {
            self.stats.caps_hit += 1;
            return Err(InboundError::OverCap);
        }
        let plan = &self.cfg.plan;
        let (local_ip, guest_ip): (IpAddr, IpAddr) = if v6 {
            (plan.gateway_v6.into(), plan.guest_v6.into())
        } else {
            (plan.gateway_v4.into(), plan.guest_v4.into())
        };
        let guest = SocketAddr::new(guest_ip, port);
        let span = EPHEMERAL.end - EPHEMERAL.start;
        let first = self.next_ephemeral - EPHEMERAL.start;
        let local = (0..span)
            .map(|i| SocketAddr::new(local_ip, EPHEMERAL.start + (first + i) % span))
            .find(|l| !self.tcp_by_key.contains_key(&(guest, *l)))
            .ok_or(InboundError::NoPort)?;
        self.next_ephemeral = EPHEMERAL.start + (local.port() - EPHEMERAL.start + 1) % span;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.cfg.tcp_buffer]),
            tcp::SocketBuffer::new(vec![0; self.cfg.tcp_buffer]),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        socket.set_timeout(Some(GUEST_CONNECT_TIMEOUT.into()));
        let remote = (IpAddress::from(guest.ip()), guest.port());
        let from = (IpAddress::from(local.ip()), local.port());
        if socket.connect(self.iface.context(), remote, from).is_err() {
            return Err(InboundError::NoPort);
        }
        let handle = self.sockets.add(socket);
        let flow = self.alloc_flow();
        self.tcp.insert(
            flow,
            TcpFlow {
                key: (guest, local),
                handle,
                phase: TcpPhase::GuestConnecting,
                rule: Rule::Default,
                inbound: true,
                syn: Vec::new(),
                guest_fin_seen: false,
                guest_fin_reported: false,
                aborted: false,
                host_eof: false,
                started: now,
                to_host: 0,
                to_guest: 0,
            },
        );
        self.tcp_by_key.insert((guest, local), flow);
        self.inbound += 1;
        self.buffer_bytes += need;
        tracing::info!(target: "slipway::flow", flow = %flow, proto = "tcp", %local, %guest, "inbound connection");
        Ok(flow)
    }

    // ----- host side --------------------------------------------------------

    /// The host connect for `flow` succeeded: let the guest's SYN-ACK go.
    pub fn tcp_connected(&mut self, flow: FlowId) {
        let Some(f) = self.tcp.get_mut(&flow) else {
            return;
        };
        if f.phase == TcpPhase::Connecting {
            f.phase = TcpPhase::Open;
            self.half_open -= 1;
            self.sockets
                .get_mut::<tcp::Socket>(f.handle)
                .pause_synack(false);
        }
    }

    /// The host connect failed: the guest learns at once (RST or ICMP).
    pub fn tcp_connect_failed(&mut self, flow: FlowId, err: ConnectError) {
        let Some(f) = self.tcp.get(&flow) else {
            return;
        };
        let (src, dst) = f.key;
        tracing::info!(target: "slipway::flow", proto = "tcp", %src, %dst, error = ?err, "host connect failed");
        match err {
            ConnectError::Refused => self.tcp_host_reset(flow),
            ConnectError::Unreachable | ConnectError::TimedOut => {
                // The guest matches the error to its socket by the quoted SYN's sequence number.
                let err = self.builder().unreachable(
                    self.cfg.plan.gateway_for(dst.ip()),
                    &f.syn,
                    Unreachable::Host,
                );
                let handle = f.handle;
                self.emit(err);
                // No RST after the ICMP: the guest's socket is already gone.
                *self.sockets.get_mut::<tcp::Socket>(handle) = closed_socket();
            }
        }
    }

    fn open_socket(&mut self, flow: FlowId) -> Option<(&mut tcp::Socket<'static>, &mut TcpFlow)> {
        let f = self.tcp.get_mut(&flow)?;
        Some((self.sockets.get_mut::<tcp::Socket>(f.handle), f))
    }

    /// Room for host→guest bytes in the flow's send buffer (0 until established).
    pub fn tcp_send_capacity(&self, flow: FlowId) -> usize {
        let Some(f) = self.tcp.get(&flow) else {
            return 0;
        };
        let s = self.sockets.get::<tcp::Socket>(f.handle);
        if s.may_send() && !f.host_eof {
            s.send_capacity() - s.send_queue()
        } else {
            0
        }
    }

    /// Append host→guest bytes straight into the flow's send buffer: `fill`
    /// gets the free contiguous space and returns how much it wrote.
    pub fn tcp_send_with<R>(
        &mut self,
        flow: FlowId,
        fill: impl FnOnce(&mut [u8]) -> (usize, R),
    ) -> Option<R> {
        let (s, f) = self.open_socket(flow)?;
        if f.host_eof {
            return None;
        }
        let (n, r) = s
            .send(|buf| {
                let (n, r) = fill(buf);
                (n, (n, r))
            })
            .ok()?;
        f.to_guest += n as u64;
        self.stats.bytes_to_guest += n as u64;
        Some(r)
    }

    /// Guest→host bytes waiting in the flow's receive buffer.
    pub fn tcp_recv_pending(&self, flow: FlowId) -> usize {
        self.tcp.get(&flow).map_or(0, |f| {
            self.sockets.get::<tcp::Socket>(f.handle).recv_queue()
        })
    }

    /// Take guest→host bytes: `drain` gets the contiguous pending bytes and
    /// returns how many it consumed (what it leaves stays, so the guest's
    /// window stays shut until the host takes more).
    pub fn tcp_recv_with<R>(
        &mut self,
        flow: FlowId,
        drain: impl FnOnce(&[u8]) -> (usize, R),
    ) -> Option<R> {
        let (s, f) = self.open_socket(flow)?;
        let (n, r) = s
            .recv(|buf| {
                let (n, r) = drain(buf);
                (n, (n, r))
            })
            .ok()?;
        f.to_host += n as u64;
        self.stats.bytes_to_host += n as u64;
        Some(r)
    }

    /// The host closed its sending side: FIN to the guest after the data.
    pub fn tcp_host_eof(&mut self, flow: FlowId) {
        if let Some((s, f)) = self.open_socket(flow) {
            f.host_eof = true;
            s.close();
        }
    }

    /// The host reset the connection: RST to the guest.
    pub fn tcp_host_reset(&mut self, flow: FlowId) {
        let Some(f) = self.tcp.get_mut(&flow) else {
            return;
        };
        f.aborted = true;
        let (src, dst) = f.key;
        let syn = std::mem::take(&mut f.syn);
        let handle = f.handle;
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        if s.state() == tcp::State::SynReceived && !syn.is_empty() {
            // Our SYN-ACK never left: answer the SYN with an RST ourselves,
            // which needs no neighbour entry for the guest.
            *s = closed_socket();
            let rst = self.builder().rst_for_syn(&syn, src, dst);
            self.emit(rst);
        } else {
            s.abort();
        }
    }

    /// Whether the driver may read more datagrams from host sockets now.
    pub fn wants_host_datagrams(&self) -> bool {
        self.tx.len() < self.cfg.caps.max_queued_frames
    }

    /// A datagram (UDP payload, or a whole ICMP echo reply) from the host side of `flow`.
    pub fn datagram_from_host(&mut self, now: Instant, flow: FlowId, payload: &[u8]) {
        let Some(f) = self.datagram.get_mut(&flow) else {
            return;
        };
        // IPv6 header + UDP header is the most any reply adds to the payload.
        if self.tx.len() >= self.cfg.caps.max_queued_frames || payload.len() + 48 > self.cfg.mtu {
            self.stats.frames_dropped += 1;
            return;
        }
        f.deadline = now + f.idle.into();
        f.to_guest += payload.len() as u64;
        self.stats.bytes_to_guest += payload.len() as u64;
        let key = f.key;
        let frame = match key.kind {
            DatagramKind::Udp => self.builder().udp(key.peer, key.guest, payload),
            DatagramKind::IcmpEcho => {
                // Echo reply: type 0 / 129, code, checksum, ident (the kernel's), seq, data.
                if payload.len() < 8 || !(payload[0] == 0 || payload[0] == 129) {
                    return;
                }
                let seq = u16::from_be_bytes([payload[6], payload[7]]);
                self.builder().echo_reply(
                    key.peer.ip(),
                    key.guest.ip(),
                    key.guest.port(),
                    seq,
                    &payload[8..],
                )
            }
        };
        self.emit(frame);
    }

    /// The host reported an error on a datagram flow (e.g. ICMP port unreachable
    /// on a connected UDP socket); tell the guest the same.
    pub fn datagram_host_error(&mut self, flow: FlowId, why: Unreachable) {
        let Some(f) = self.datagram.get(&flow) else {
            return;
        };
        if f.key.kind != DatagramKind::Udp {
            return;
        }
        let Some(quoted) = wire::synthetic_udp(f.key.guest, f.key.peer) else {
            return;
        };
        let err =
            self.builder()
                .unreachable(self.cfg.plan.gateway_for(f.key.peer.ip()), &quoted, why);
        self.emit(err);
    }

    // ----- policy -----------------------------------------------------------

    /// Replace the policy atomically; live flows it now denies are reset.
    pub fn set_policy(&mut self, policy: EgressPolicy) {
        self.policy = policy;
        let tcp_denied: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, f)| !self.flow_still_allowed(f.key.1))
            .map(|(id, _)| *id)
            .collect();
        for id in tcp_denied {
            tracing::info!(target: "slipway::flow", flow = %id, "reset: the new policy denies it");
            self.tcp_host_reset(id);
        }
        let dgram_denied: Vec<FlowId> = self
            .datagram
            .iter()
            .filter(|(_, f)| !self.flow_still_allowed(f.key.peer))
            .map(|(id, _)| *id)
            .collect();
        for id in dgram_denied {
            self.close_datagram(id, "the new policy denies it");
        }
    }

    fn flow_still_allowed(&self, dst: SocketAddr) -> bool {
        match self.redirect(dst) {
            Some((_, on, exempt)) => self.policy.decide(on, exempt).allowed,
            None => true,
        }
    }

    fn close_datagram(&mut self, flow: FlowId, why: &str) {
        if let Some(f) = self.datagram.remove(&flow) {
            self.datagram_by_key.remove(&f.key);
            tracing::info!(
                target: "slipway::flow",
                flow = %flow,
                kind = ?f.key.kind,
                src = %f.key.guest,
                dst = %f.key.peer,
                to_host = f.to_host,
                to_guest = f.to_guest,
                secs = (self.iface_now() - f.started).secs(),
                why,
                "datagram flow closed"
            );
            self.requests.push_back(HostRequest::DatagramClose { flow });
        }
    }

    fn iface_now(&self) -> Instant {
        self.now
    }

    // ----- driving ----------------------------------------------------------

    /// Let smoltcp send what it has (segments, ACKs, window updates) and
    /// settle flows whose state changed. Call after a batch of input.
    pub fn poll(&mut self, now: Instant) {
        self.now = now;
        let mut dev = OneFrame {
            rx: None,
            tx: &mut self.tx,
            mtu: self.cfg.mtu,
        };
        self.iface.poll_maintenance(now);
        self.iface.poll_egress(now, &mut dev, &mut self.sockets);
        self.settle_tcp(now);
        if self.next_sweep.is_some_and(|t| now >= t) {
            self.sweep_datagrams(now);
        }
    }

    fn settle_tcp(&mut self, now: Instant) {
        let mut finished = Vec::new();
        for (&id, f) in self.tcp.iter_mut() {
            let s = self.sockets.get::<tcp::Socket>(f.handle);
            use tcp::State::*;
            let state = s.state();
            if f.phase == TcpPhase::GuestConnecting && !matches!(state, SynSent | Closed) {
                f.phase = TcpPhase::Open;
                // Accepted: the connect timeout must not end an idle connection later.
                self.sockets
                    .get_mut::<tcp::Socket>(f.handle)
                    .set_timeout(None);
                self.requests
                    .push_back(HostRequest::InboundReady { flow: id });
            }
            let s = self.sockets.get::<tcp::Socket>(f.handle);
            if matches!(state, CloseWait | LastAck | Closing | TimeWait) {
                f.guest_fin_seen = true;
            }
            let drained = s.recv_queue() == 0;
            if f.guest_fin_seen && !f.guest_fin_reported && drained {
                f.guest_fin_reported = true;
                self.requests
                    .push_back(HostRequest::TcpShutdown { flow: id });
            }
            // A closed flow lives on until the host took the guest's last
            // bytes, unless it ended in a reset (which discards them).
            let reset = f.aborted || !f.guest_fin_seen;
            if matches!(state, Closed | TimeWait) && (drained || reset) {
                finished.push(id);
            }
        }
        for id in finished {
            let Some(f) = self.tcp.remove(&id) else {
                continue;
            };
            self.tcp_by_key.remove(&f.key);
            self.sockets.remove(f.handle);
            self.buffer_bytes -= 2 * self.cfg.tcp_buffer;
            if f.phase == TcpPhase::Connecting {
                self.half_open -= 1;
            }
            if f.inbound {
                self.inbound -= 1;
            }
            if f.phase == TcpPhase::GuestConnecting {
                // Closed before it ever opened: an RST from the guest, or no answer.
                let error = if now - f.started >= GUEST_CONNECT_TIMEOUT.into() {
                    ConnectError::TimedOut
                } else {
                    ConnectError::Refused
                };
                tracing::info!(target: "slipway::flow", flow = %id, guest = %f.key.0, ?error, "inbound connection failed");
                self.requests
                    .push_back(HostRequest::InboundFailed { flow: id, error });
                continue;
            }
            let clean = f.guest_fin_reported && f.host_eof;
            tracing::info!(
                target: "slipway::flow",
                flow = %id,
                proto = "tcp",
                src = %f.key.0,
                dst = %f.key.1,
                rule = %f.rule,
                to_host = f.to_host,
                to_guest = f.to_guest,
                secs = (now - f.started).total_millis() as f64 / 1000.0,
                end = if clean { "closed" } else { "reset" },
                "tcp flow ended"
            );
            self.requests.push_back(HostRequest::TcpClose {
                flow: id,
                reset: !clean,
            });
        }
    }

    fn sweep_datagrams(&mut self, now: Instant) {
        let expired: Vec<FlowId> = self
            .datagram
            .iter()
            .filter(|(_, f)| now >= f.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.close_datagram(id, "idle");
        }
        self.next_sweep = (!self.datagram.is_empty()).then(|| now + SWEEP_EVERY.into());
    }

    /// When the core next needs `poll`, if nothing else happens first.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let smol = self.iface.poll_at(now, &self.sockets);
        match (smol, self.next_sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next request for the host, in order.
    pub fn poll_request(&mut self) -> Option<HostRequest> {
        self.requests.pop_front()
    }

    /// The next frame for the guest. Hand spent buffers back with `recycle`.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
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

    /// Send an unsolicited router advertisement (at start, and now and then).
    pub fn advertise_router(&mut self) {
        let ra = services::router_advert(&self.cfg, self.gateway_mac);
        self.emit(ra);
    }
}

/// A socket in state Closed with no peer: it sends nothing, and the next
/// `settle_tcp` frees the flow.
fn closed_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(Vec::new()),
        tcp::SocketBuffer::new(Vec::new()),
    )
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

fn log_decision(proto: &str, src: SocketAddr, dst: SocketAddr, v: Verdict, cap: Option<&str>) {
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
        "new flow"
    );
}
