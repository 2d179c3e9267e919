//! TCP flows: a guest SYN decided before smoltcp sees it and held (SYN-ACK
//! paused) until the host connect succeeds; connections the gateway opens
//! into the guest; and the calls the driver moves bytes with.

use super::pool::FlowBuffers;
use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TcpPhase {
    /// Host connect in progress. smoltcp has not seen the guest's SYN yet:
    /// the flow's socket is a closed placeholder, which wants no polling (a
    /// SYN-RECEIVED socket with a paused SYN-ACK asks to be polled at once,
    /// forever) and holds no buffers.
    Connecting,
    /// Our SYN to the guest is out (a connection from the public gateway).
    GuestConnecting,
    Open,
    /// Accepted by the stack itself, reading the guest's first bytes for
    /// a name (the name-dial path); no host socket yet.
    Inspecting,
    /// The first bytes named an allowed name: resolving it, then the host
    /// connect. The guest's bytes wait in the buffer, to be replayed.
    Dialing,
    /// DNS over TCP to the filtering resolver, answered by the stack.
    Resolver,
}

pub(super) struct TcpFlow {
    pub(super) key: (SocketAddr, SocketAddr),
    pub(super) handle: SocketHandle,
    pub(super) phase: TcpPhase,
    pub(super) rule: Rule,
    pub(super) inbound: bool,
    /// The guest's SYN (whole IP packet), quoted if the connect ends in ICMP.
    pub(super) syn: Vec<u8>,
    /// The guest's SYN as it came (Ethernet frame), for smoltcp once the
    /// host connect succeeded.
    pub(super) syn_frame: Vec<u8>,
    /// The guest's FIN arrived (its bytes may still wait in the buffer).
    pub(super) guest_fin_seen: bool,
    /// ... and all its bytes were taken, so the host was told.
    pub(super) guest_fin_reported: bool,
    /// We reset the flow: what the guest still had buffered goes too.
    pub(super) aborted: bool,
    pub(super) host_eof: bool,
    /// While `Connecting`: when the host connect is given up.
    pub(super) connect_deadline: Option<Instant>,
    /// The name that allowed the flow: a DNS pin's, or the SNI / Host
    /// the host dialed.
    pub(super) name: Option<String>,
    /// A pinned flow whose first guest bytes are not yet known not to
    /// name a denied host: the driver gets none of them.
    pub(super) held: bool,
    /// When the first bytes must have said enough.
    pub(super) inspect_deadline: Option<Instant>,
    /// The header rule this flow is intercepted for, and whether the host
    /// has yet to take the `Intercept` request: until it has, none of the
    /// guest's bytes may be taken (they would go to the server unchanged).
    pub(super) intercept: Option<String>,
    pub(super) intercept_pending: bool,
    /// The stack's own query flow to its upstream for this flow.
    pub(super) lookup: Option<FlowId>,
    /// The buffers its socket borrows from the pool, once it has them;
    /// back to the pool when the flow ends.
    pub(super) buffers: Option<FlowBuffers>,
    pub(super) started: Instant,
    pub(super) to_host: u64,
    pub(super) to_guest: u64,
}

/// A pure ACK waits this long for data to ride on (a request's reply
/// usually comes sooner); a second full segment is acked at once anyway.
const ACK_DELAY: Option<smoltcp::time::Duration> = Some(smoltcp::time::Duration::from_millis(1));

/// Local ports the gateway uses for connections into the guest.
pub(super) const EPHEMERAL: std::ops::Range<u16> = 32768..61000;
/// How long the guest may take to accept a connection from the gateway.
pub(super) const GUEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket in state Closed with no peer: it sends nothing, wants no
/// polling, holds no buffers, and the next `settle_tcp` frees the flow.
pub(super) fn closed_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(Vec::new()),
        tcp::SocketBuffer::new(Vec::new()),
    )
}

/// The exact endpoint a relayed flow's socket answers on (never port 0:
/// `classify` drops such segments).
pub(super) fn listen_endpoint(dst: SocketAddr) -> IpListenEndpoint {
    IpListenEndpoint {
        addr: Some(dst.ip().into()),
        port: dst.port(),
    }
}

impl TcpFlow {
    pub(super) fn new(
        key: (SocketAddr, SocketAddr),
        handle: SocketHandle,
        phase: TcpPhase,
        rule: Rule,
        now: Instant,
    ) -> Self {
        Self {
            key,
            handle,
            phase,
            rule,
            inbound: false,
            syn: Vec::new(),
            syn_frame: Vec::new(),
            guest_fin_seen: false,
            guest_fin_reported: false,
            aborted: false,
            host_eof: false,
            connect_deadline: None,
            name: None,
            held: false,
            inspect_deadline: None,
            intercept: None,
            intercept_pending: false,
            lookup: None,
            buffers: None,
            started: now,
            to_host: 0,
            to_guest: 0,
        }
    }
}

impl Stack {
    /// A smoltcp socket for one relayed flow: the configured buffers, from
    /// the pool, no Nagle (the ends do their own), a short ACK delay. The
    /// buffers go back to the pool after the socket is dropped: when the
    /// flow ends (`settle_tcp`), or at once (`discard_flow_socket`).
    pub(super) fn flow_socket(&mut self) -> (tcp::Socket<'static>, FlowBuffers) {
        let (rx, rx_buf, rx_kept) = self.pool.take();
        let (tx, tx_buf, tx_kept) = self.pool.take();
        self.stats.tcp_buffers_reused += u64::from(rx_kept) + u64::from(tx_kept);
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(rx_buf),
            tcp::SocketBuffer::new(tx_buf),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(ACK_DELAY);
        (socket, FlowBuffers { rx, tx })
    }

    /// Drop a socket `flow_socket` made and never put in the set, and
    /// return its buffers.
    pub(super) fn discard_flow_socket(
        &mut self,
        socket: tcp::Socket<'static>,
        buffers: FlowBuffers,
    ) {
        drop(socket);
        // SAFETY: the only socket borrowing the buffers was dropped above.
        unsafe { self.pool.give_back(buffers, None) };
    }

    /// Remove a flow's socket from the set, and return the buffers it
    /// borrowed (`moved` as for `BufferPool::give_back`).
    pub(super) fn remove_flow_socket(
        &mut self,
        handle: SocketHandle,
        buffers: Option<FlowBuffers>,
        moved: Option<(u64, u64)>,
    ) {
        self.sockets.remove(handle);
        if let Some(buffers) = buffers {
            // SAFETY: the socket at `handle`, the only one borrowing these
            // buffers, was removed from the set and dropped just above.
            unsafe { self.pool.give_back(buffers, moved) };
        }
    }

    /// Account a new flow: it holds its buffers until `settle_tcp` frees it.
    pub(super) fn insert_flow(&mut self, flow: FlowId, entry: TcpFlow) {
        self.tcp_by_key.insert(entry.key, flow);
        self.tcp.insert(flow, entry);
        self.buffer_bytes += 2 * self.cfg.tcp_buffer;
    }

    pub(super) fn on_syn(
        &mut self,
        now: Instant,
        frame: &[u8],
        ip: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
    ) {
        if let Some(f) = self
            .tcp_by_key
            .get(&(src, dst))
            .and_then(|id| self.tcp.get(id))
        {
            if f.phase == TcpPhase::Connecting {
                // A retransmitted SYN while the host connect runs: it is
                // answered when the connect ends.
                return;
            }
            // A retransmitted SYN of a flow we already hold.
            return self.ingest_segment(now, frame, (src, dst));
        }
        let Some((host_dst, decided_on, exempt)) = self.redirect(dst) else {
            // The gateway's own ports: smoltcp has no socket there and answers RST.
            return self.ingest(now, frame);
        };
        if self.is_resolver(dst) && self.filters_names() {
            // DNS over TCP under a policy with names: the stack answers it,
            // filtering each query as over UDP.
            return self.accept_locally(now, frame, ip, (src, dst), TcpPhase::Resolver);
        }
        let (verdict, pin_name) = self.decide(decided_on, exempt);
        if !verdict.allowed && self.filters_names() && !exempt {
            // The name-dial path: the first bytes must name an allowed host.
            return self.accept_locally(now, frame, ip, (src, dst), TcpPhase::Inspecting);
        }
        if !verdict.allowed {
            self.stats.tcp_denied += 1;
            self.log_refusal("tcp", src, dst, verdict, None);
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        if let Some(cap) = self.tcp_cap_hit(true) {
            self.stats.hit_cap(cap);
            self.log_refusal("tcp", src, dst, verdict, Some(cap));
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        if !self.smoltcp_takes_syn(now, frame, dst) {
            // Bad options, …: nothing to relay.
            let rst = self.builder().rst_for_syn(ip, src, dst);
            return self.emit(rst);
        }
        // Until the host connect ends, a closed placeholder stands for the
        // flow's socket: smoltcp sees the SYN only when it can answer it.
        let handle = self.sockets.add(closed_socket());
        let flow = self.alloc_flow();
        self.stats.tcp_allowed += 1;
        if pin_name.is_some() {
            self.stats.pinned_flows += 1;
        }
        log_decision("tcp", src, dst, verdict, None, pin_name.as_deref());
        let mut entry = TcpFlow::new((src, dst), handle, TcpPhase::Connecting, verdict.rule, now);
        // A pinned address may serve other names too: what the guest's
        // first bytes name is checked before the host gets them.
        entry.held = pin_name.is_some();
        entry.name = pin_name;
        entry.syn = ip.to_vec();
        entry.syn_frame = frame.to_vec();
        let deadline = now + self.cfg.connect_timeout.into();
        entry.connect_deadline = Some(deadline);
        self.connect_deadlines.insert((deadline, flow));
        self.insert_flow(flow, entry);
        self.half_open += 1;
        self.requests.push_back(HostRequest::TcpConnect {
            flow,
            dst: host_dst,
            name: None,
        });
    }

    /// Whether smoltcp would start a handshake on this SYN, asked of a
    /// bufferless socket that is gone again before anything else arrives.
    fn smoltcp_takes_syn(&mut self, now: Instant, frame: &[u8], dst: SocketAddr) -> bool {
        let mut probe = closed_socket();
        probe.pause_synack(true);
        if probe.listen(listen_endpoint(dst)).is_err() {
            return false;
        }
        let handle = self.sockets.add(probe);
        self.ingest(now, frame);
        let took = self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::SynReceived;
        self.sockets.remove(handle);
        took
    }

    /// A guest segment that is not a new SYN.
    pub(super) fn on_segment(
        &mut self,
        now: Instant,
        frame: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
        rst: bool,
    ) {
        let key = (src, dst);
        if let Some(&id) = self.tcp_by_key.get(&key) {
            if self.tcp[&id].phase == TcpPhase::Connecting {
                if rst {
                    // The guest gave up (a Happy Eyeballs race, a cancelled
                    // connect): free the flow and its host connect now.
                    tracing::debug!(target: "slipway::flow", flow = %id, "guest aborted the handshake");
                    let f = self.tcp.get_mut(&id).expect("flow just found");
                    f.aborted = true;
                    f.syn = Vec::new();
                    f.syn_frame = Vec::new();
                } else {
                    self.stats.dropped("TCP segment before the handshake");
                }
                return;
            }
        }
        self.ingest_segment(now, frame, key);
    }

    /// Hand a segment of a known (or unknown) flow to smoltcp.
    ///
    /// smoltcp 0.14 takes an RST in SYN-RECEIVED back to LISTEN and keeps
    /// that handshake's sequence state; the next SYN to the same endpoint
    /// then lands on that socket, and an RST the stale state finds
    /// acceptable underflows a sequence subtraction (a panic). A flow's
    /// socket that falls back to LISTEN is therefore closed before it can
    /// take another segment: the guest aborted the handshake.
    fn ingest_segment(&mut self, now: Instant, frame: &[u8], key: (SocketAddr, SocketAddr)) {
        self.ingest(now, frame);
        let Some(&id) = self.tcp_by_key.get(&key) else {
            return;
        };
        let Some(f) = self.tcp.get_mut(&id) else {
            return;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(f.handle);
        if s.state() == tcp::State::Listen {
            tracing::debug!(target: "slipway::flow", flow = %id, "guest reset the handshake");
            *s = closed_socket();
            f.aborted = true;
            return;
        }
        self.after_guest_segment(id);
    }

    /// Open a TCP connection from the gateway's address to the guest's `port`
    /// (IPv4, or IPv6 when `v6`). The answer comes later as
    /// `HostRequest::InboundReady` or `InboundFailed`; bytes then move with
    /// the same calls as for outbound flows.
    pub fn connect_to_guest(
        &mut self,
        now: std::time::Instant,
        port: u16,
        v6: bool,
    ) -> Result<FlowId, InboundError> {
        let now = self.clock(now);
        let caps = &self.cfg.caps;
        let need = 2 * self.cfg.tcp_buffer;
        let over = if self.inbound >= caps.max_inbound {
            Some("max_inbound")
        } else if self.tcp.len() >= caps.max_tcp_flows {
            Some("max_tcp_flows")
        } else if self.buffer_bytes + need > caps.max_buffer_bytes {
            Some("max_buffer_bytes")
        } else {
            None
        };
        if let Some(cap) = over {
            self.stats.hit_cap(cap);
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
        let (mut socket, buffers) = self.flow_socket();
        socket.set_timeout(Some(GUEST_CONNECT_TIMEOUT.into()));
        let remote = (IpAddress::from(guest.ip()), guest.port());
        let from = (IpAddress::from(local.ip()), local.port());
        if socket.connect(self.iface.context(), remote, from).is_err() {
            self.discard_flow_socket(socket, buffers);
            return Err(InboundError::NoPort);
        }
        let handle = self.sockets.add(socket);
        let flow = self.alloc_flow();
        let mut entry = TcpFlow::new(
            (guest, local),
            handle,
            TcpPhase::GuestConnecting,
            Rule::Default,
            now,
        );
        entry.inbound = true;
        entry.buffers = Some(buffers);
        self.insert_flow(flow, entry);
        self.inbound += 1;
        tracing::info!(target: "slipway::flow", flow = %flow, proto = "tcp", %local, %guest, "inbound connection");
        Ok(flow)
    }

    /// A connecting flow's connect ended (either way): it no longer times out.
    fn connect_ended(&mut self, flow: FlowId) {
        if let Some(at) = self
            .tcp
            .get_mut(&flow)
            .and_then(|f| f.connect_deadline.take())
        {
            self.connect_deadlines.remove(&(at, flow));
        }
    }

    /// The host connect for `flow` succeeded: smoltcp takes the guest's SYN
    /// now and answers it with a SYN-ACK.
    pub(super) fn handle_connected(&mut self, flow: FlowId) {
        let Some(f) = self.tcp.get(&flow) else {
            return;
        };
        if f.phase == TcpPhase::Dialing && !f.aborted {
            // The guest's connection is up already; its first bytes wait
            // in the buffer and go out as the driver drains it.
            self.connect_ended(flow);
            let f = self.tcp.get_mut(&flow).expect("flow just found");
            f.phase = TcpPhase::Open;
            self.half_open -= 1;
            return;
        }
        if f.phase != TcpPhase::Connecting || f.aborted {
            return;
        }
        self.connect_ended(flow);
        let f = self.tcp.get_mut(&flow).expect("flow just found");
        f.phase = TcpPhase::Open;
        self.half_open -= 1;
        let (handle, dst) = (f.handle, f.key.1);
        let syn_frame = std::mem::take(&mut f.syn_frame);
        let (mut socket, buffers) = self.flow_socket();
        if socket.listen(listen_endpoint(dst)).is_ok() {
            // The placeholder it replaces holds no buffers.
            *self.sockets.get_mut::<tcp::Socket>(handle) = socket;
            self.tcp.get_mut(&flow).expect("flow just found").buffers = Some(buffers);
            let now = self.now;
            self.ingest(now, &syn_frame);
        } else {
            self.discard_flow_socket(socket, buffers);
        }
        if self.sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynReceived {
            // smoltcp took this SYN when it came; it cannot refuse it now,
            // but if it ever does, the guest must not wait for nothing.
            self.tcp_host_reset(flow);
        }
    }

    /// The host connect failed: the guest learns at once (RST or ICMP).
    pub(super) fn handle_connect_failed(&mut self, flow: FlowId, err: ConnectError) {
        if self
            .tcp
            .get(&flow)
            .is_some_and(|f| f.phase == TcpPhase::Dialing && !f.aborted)
        {
            self.connect_ended(flow);
            return self.dial_failed(flow, err);
        }
        match self.tcp.get(&flow) {
            Some(f) if f.phase == TcpPhase::Connecting && !f.aborted => {}
            _ => return,
        }
        self.connect_ended(flow);
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
                if let Some(f) = self.tcp.get_mut(&flow) {
                    f.aborted = true;
                }
            }
        }
    }

    pub(super) fn open_socket(
        &mut self,
        flow: FlowId,
    ) -> Option<(&mut tcp::Socket<'static>, &mut TcpFlow)> {
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
        self.dirty = true;
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
        match self.tcp.get(&flow) {
            Some(f) if f.phase == TcpPhase::Open && !f.held && !f.intercept_pending => {
                self.sockets.get::<tcp::Socket>(f.handle).recv_queue()
            }
            _ => 0,
        }
    }

    /// Take guest→host bytes: `drain` gets the contiguous pending bytes and
    /// returns how many it consumed (what it leaves stays, so the guest's
    /// window stays shut until the host takes more).
    pub fn tcp_recv_with<R>(
        &mut self,
        flow: FlowId,
        drain: impl FnOnce(&[u8]) -> (usize, R),
    ) -> Option<R> {
        self.dirty = true;
        let (s, f) = self.open_socket(flow)?;
        if f.phase != TcpPhase::Open || f.held || f.intercept_pending {
            // Not the host's yet: being inspected, held for a check, or
            // for an interceptor the host has not been told about.
            return None;
        }
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
    pub(super) fn host_eof(&mut self, flow: FlowId) {
        if let Some((s, f)) = self.open_socket(flow) {
            f.host_eof = true;
            s.close();
        }
    }

    /// The host reset the connection: RST to the guest.
    pub(super) fn tcp_host_reset(&mut self, flow: FlowId) {
        let Some(f) = self.tcp.get_mut(&flow) else {
            return;
        };
        f.aborted = true;
        let (src, dst) = f.key;
        let syn = std::mem::take(&mut f.syn);
        let handle = f.handle;
        let connecting = f.phase == TcpPhase::Connecting;
        f.syn_frame = Vec::new();
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        if connecting && !syn.is_empty() {
            // smoltcp never saw the SYN: answer it with an RST ourselves,
            // which needs no neighbour entry for the guest.
            *s = closed_socket();
            let rst = self.builder().rst_for_syn(&syn, src, dst);
            self.emit(rst);
        } else {
            s.abort();
        }
    }

    pub(super) fn settle_tcp(&mut self, now: Instant) {
        let mut finished = Vec::new();
        for (&id, f) in self.tcp.iter_mut() {
            if f.phase == TcpPhase::Connecting && !f.aborted {
                // The placeholder socket is closed until the host connect ends.
                continue;
            }
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
            let hosted = f.phase == TcpPhase::Open;
            if hosted && f.guest_fin_seen && !f.guest_fin_reported && drained {
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
            let Some(mut f) = self.tcp.remove(&id) else {
                continue;
            };
            self.tcp_by_key.remove(&f.key);
            if let Some(at) = f.connect_deadline {
                self.connect_deadlines.remove(&(at, id));
            }
            // Only a flow that ended cleanly took every byte its buffers
            // held: then the counts say what they hold.
            let clean = f.phase == TcpPhase::Open && f.guest_fin_reported && f.host_eof;
            let moved = clean.then_some((f.to_host, f.to_guest));
            let had_buffers = f.buffers.is_some();
            self.remove_flow_socket(f.handle, f.buffers.take(), moved);
            if had_buffers {
                self.pool_release_at = (self.pool.kept() > 0).then(|| now + pool::IDLE.into());
            }
            self.buffer_bytes -= 2 * self.cfg.tcp_buffer;
            self.forget_inspection(id, &f);
            if matches!(
                f.phase,
                TcpPhase::Connecting | TcpPhase::Inspecting | TcpPhase::Dialing
            ) {
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
            if matches!(f.phase, TcpPhase::Inspecting | TcpPhase::Resolver) {
                // Never had a host socket; its refusal was logged already.
                tracing::debug!(target: "slipway::flow", flow = %id, "tcp flow ended without a host side");
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
                intercepted = f.intercept.as_deref(),
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
}
