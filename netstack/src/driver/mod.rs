//! The thin tokio driver around a `Stack`: it owns the link to the guest, the
//! host sockets and the timer, and shuttles bytes between them.
//!
//! Bytes move straight between a host socket and the flow's smoltcp buffer
//! (the closure forms of send/recv), and only as fast as the other side
//! drains: a full guest window stops host reads, a full host socket leaves
//! the guest's bytes in smoltcp and so shuts the guest's window.
//!
//! Rooms: `link` (the transport's trait), `handle` (how the rest of the
//! process reaches a sandbox), `host` (host sockets and byte pumps), `dial`
//! (a flow's way through the egress proxy), `own_wake` (the shutdown
//! future polled only when it asks), and here the loop that feeds the core
//! its inputs and drains its outputs.

mod dial;
mod handle;
mod host;
mod intercept;
mod link;
mod own_wake;

use std::future::{poll_fn, Future};
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

use dial::{DialError, DialPlan, Tunnel, TunnelStream};
pub use handle::{Command, DriverHandle, GuestConnectError, Parked, Snapshot};
use host::{
    connect_error, connect_outcome, guest_to_host, guest_to_tls, host_to_guest, open_datagram,
    start_connect, tls_to_guest, HostDatagram, HostStream, HostTcp, OpenTcp, OpenTls, TlsShutdown,
};
pub use intercept::{InterceptedFlow, Interceptor, SharedInterceptor, UpstreamIo};
pub use link::Link;
use own_wake::OwnWake;

use crate::policy::EgressPolicy;
use crate::proxy::EgressProxy;
use crate::socks::Target;
use crate::stack::{
    ConnectError, DatagramKind, FlowId, FlowMap, HostEvent, HostRequest, InboundError, Stack,
};
use crate::wire::{Unreachable, MAX_FRAME};

/// Guest frames taken per round before the stack answers them.
const FRAMES_PER_ROUND: usize = 64;
/// Rounds of work before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 16;

pub struct Driver<L: Link> {
    stack: Stack,
    link: AsyncFd<L>,
    tcp: FlowMap<HostTcp>,
    datagrams: FlowMap<HostDatagram>,
    commands_tx: mpsc::UnboundedSender<Command>,
    commands: mpsc::UnboundedReceiver<Command>,
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<tokio::time::Instant>,
    rx_buf: Vec<u8>,
    /// Length of the guest frame in `rx_buf` the stack is taking, for the
    /// log line if it panics.
    rx_len: usize,
    icmp_warned: bool,
    /// New TCP flows go through it when set.
    egress_proxy: Option<Arc<EgressProxy>>,
    /// The policy as the dials last saw it (its operator holes decide
    /// which proxy addresses are allowed); made anew after a policy change.
    dial_policy: Option<Arc<EgressPolicy>>,
    /// Where intercepted flows go; without one they are reset.
    interceptor: Option<SharedInterceptor>,
    /// `Intercept` requests whose host connect (or proxy dial) is still in flight.
    intercepts: FlowMap<intercept::Pending>,
    /// Guest datagrams for `outgoing_flow` not sent yet: one round's, sent
    /// together at the end of `serve_requests`.
    outgoing: Vec<Vec<u8>>,
    outgoing_flow: Option<FlowId>,
}

impl<L: Link> Driver<L> {
    /// Must be called inside a tokio runtime. The link must be non-blocking.
    pub fn new(mut stack: Stack, link: L) -> io::Result<Self> {
        stack.set_offloads(link.offloads());
        let (commands_tx, commands) = mpsc::unbounded_channel();
        Ok(Self {
            stack,
            // SAFETY: `Link` implementors promise a stable, owned descriptor.
            link: unsafe { AsyncFd::register(link) }.map_err(io::Error::from)?,
            tcp: FlowMap::default(),
            datagrams: FlowMap::default(),
            commands_tx,
            commands,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            timer_at: None,
            rx_buf: vec![0; MAX_FRAME],
            rx_len: 0,
            icmp_warned: false,
            egress_proxy: None,
            dial_policy: None,
            interceptor: None,
            intercepts: FlowMap::default(),
            outgoing: Vec::new(),
            outgoing_flow: None,
        })
    }

    /// Where the flows the core marks for interception go (see
    /// `HostRequest::Intercept`). Without one, such a flow is reset: its
    /// bytes never go out unchanged.
    pub fn set_interceptor(&mut self, interceptor: SharedInterceptor) {
        self.interceptor = Some(interceptor);
    }

    /// Send the TCP flows opened from now on through `proxy` (`None`:
    /// direct). At run time: `DriverHandle::set_egress_proxy`.
    pub fn set_egress_proxy(&mut self, proxy: Option<EgressProxy>) {
        self.egress_proxy = proxy.map(Arc::new);
    }

    pub fn handle(&self) -> DriverHandle {
        DriverHandle::new(self.commands_tx.clone())
    }

    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    pub fn stack_mut(&mut self) -> &mut Stack {
        &mut self.stack
    }

    /// Serve the sandbox until `shutdown` completes or the link fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<Stack> {
        match self.serve(shutdown).await {
            (parked, None) => Ok(parked.stack),
            (_, Some(e)) => Err(e),
        }
    }

    /// Serve until `shutdown` completes or the link fails (the error). Either
    /// way the sandbox's stack and its command channel come back, parked, so
    /// that a new link (the VMM reconnected, the VM was restored) can
    /// `resume` them; the host sockets of this link's flows are closed.
    pub async fn serve(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> (Parked, Option<io::Error>) {
        self.stack.advertise_router();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut shutdown_wake = OwnWake::new();
        let result = poll_fn(|cx| {
            if let Some(mut scx) = shutdown_wake.due(cx) {
                if shutdown.as_mut().poll(&mut scx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
            }
            self.poll_contained(cx)
        })
        .await;
        // What was queued for this link's guest is not for the next one.
        self.stack.discard_transmit();
        for host in self.tcp.values() {
            match host {
                HostTcp::Open(open) => {
                    let _ = open.stream.sock().set_linger(Some(Duration::ZERO));
                }
                HostTcp::OpenTls(open) => {
                    let _ = open.sock().set_linger(Some(Duration::ZERO));
                }
                HostTcp::Connecting(_) | HostTcp::Dialing(_) | HostTcp::Inbound { .. } => {}
            }
        }
        let mut parked = Parked::from_parts(
            self.stack,
            self.egress_proxy,
            self.commands_tx,
            self.commands,
        );
        if let Some(i) = self.interceptor {
            parked.set_interceptor(i);
        }
        (parked, result.err())
    }

    /// Serve a parked sandbox over a new link. Its flows are reset (their
    /// host sockets went with the old link); addresses, the DHCP lease, the
    /// policy and every `DriverHandle` stay valid.
    pub fn resume(parked: Parked, link: L) -> io::Result<Self> {
        let interceptor = parked.interceptor();
        let (mut stack, egress_proxy, commands_tx, commands) = parked.into_parts();
        stack.reset_flows(Instant::now());
        let mut driver = Self::new(stack, link)?;
        driver.egress_proxy = egress_proxy;
        driver.commands_tx = commands_tx;
        driver.commands = commands;
        driver.interceptor = interceptor;
        Ok(driver)
    }

    /// `poll_drive`, with a panic in the stack kept inside this sandbox: the
    /// stack is made anew with the same settings and policy (every flow is
    /// reset: their host sockets are closed, the guest's segments to them
    /// get RSTs), the panic is counted and logged once with the frame that
    /// was being taken, and the link keeps being served.
    fn poll_contained(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.poll_drive(cx)));
        match result {
            Ok(poll) => poll,
            Err(payload) => {
                self.recover(payload.as_ref());
                // Come back at once: the new stack has a router advertisement to send.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn recover(&mut self, payload: &(dyn std::any::Any + Send)) {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with no message".into());
        let frame = &self.rx_buf[..self.rx_len.min(self.rx_buf.len())];
        let mut stats = self.stack.stats().clone();
        stats.stack_panics += 1;
        tracing::error!(
            panic = %what,
            panics = stats.stack_panics,
            last_guest_frame = %hex(&frame[..frame.len().min(PANIC_FRAME_BYTES)]),
            last_guest_frame_len = frame.len(),
            "the sandbox's stack panicked: its flows are reset and it goes on; \
             please report this with the frame above"
        );
        let now = Instant::now();
        let mut stack = Stack::new(
            self.stack.config().clone(),
            self.stack.policy().clone(),
            now,
        );
        stack.restore_stats(stats);
        stack.set_offloads(self.link.get_ref().offloads());
        stack.advertise_router();
        self.stack = stack;
        self.drop_host_sockets();
        self.rx_len = 0;
    }

    /// Close every host socket, TCP ones with an RST; a connection the
    /// gateway was opening into the guest fails.
    fn drop_host_sockets(&mut self) {
        for (_, host) in self.tcp.drain() {
            match host {
                HostTcp::Open(open) => {
                    let _ = open.stream.sock().set_linger(Some(Duration::ZERO));
                }
                HostTcp::OpenTls(open) => {
                    let _ = open.sock().set_linger(Some(Duration::ZERO));
                }
                HostTcp::Inbound { reply, .. } => {
                    let _ = reply.send(Err(GuestConnectError::Gone));
                }
                HostTcp::Connecting(_) | HostTcp::Dialing(_) => {}
            }
        }
        self.intercepts.clear();
        self.datagrams.clear();
        self.outgoing.clear();
        self.outgoing_flow = None;
    }

    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for _ in 0..ROUNDS_PER_POLL {
            let now = Instant::now();
            // A vhost-user guest acks its features after the link exists (and
            // again after a reconnect); a change remakes smoltcp's interface.
            self.stack.set_offloads(self.link.get_ref().offloads());
            let mut progress = self.read_link(cx, now)?;
            progress |= self.finish_connects(cx, now);
            while let Poll::Ready(Some(command)) = self.commands.poll_recv(cx) {
                progress = true;
                self.on_command(now, command);
            }
            progress |= self.pump_tcp(cx, now);
            progress |= self.pump_datagrams(cx, now);
            self.stack.handle_timeout(now);
            progress |= self.serve_requests(now);
            progress |= self.write_link(cx)?;
            progress |= self.poll_timer(cx, now);
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: let other tasks run, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn read_link(&mut self, cx: &mut Context<'_>, now: Instant) -> io::Result<bool> {
        let mut progress = false;
        for _ in 0..FRAMES_PER_ROUND {
            let mut guard = match self.link.poll_read_ready_mut(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => break,
            };
            let buf = &mut self.rx_buf;
            match guard.try_io(|l| l.get_mut().recv(buf)) {
                Ok(Ok((n, meta))) => {
                    self.rx_len = n;
                    self.stack.handle_frame(now, &self.rx_buf[..n], meta);
                    progress = true;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(progress)
    }

    fn write_link(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut progress = false;
        while let Some(frame) = self.stack.poll_transmit() {
            let mut guard = match self.link.poll_write_ready_mut(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => {
                    self.stack.unsend(frame);
                    break;
                }
            };
            match guard.try_io(|l| l.get_mut().send(&frame)) {
                Ok(Ok(())) => {
                    progress = true;
                    self.stack.recycle(frame);
                }
                Ok(Err(e)) => {
                    // A frame the link refuses (too big, …) is dropped, not retried forever.
                    tracing::debug!(error = %e, len = frame.len(), "link refused a frame");
                    self.stack.recycle(frame);
                }
                Err(_would_block) => self.stack.unsend(frame),
            }
        }
        Ok(progress)
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let deadline = match self.stack.poll_timeout() {
            Some(at) if at <= now => return true,
            Some(at) => tokio::time::Instant::from_std(at),
            None => {
                self.timer_at = None;
                return false;
            }
        };
        if self.timer_at != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.timer_at = Some(deadline);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            self.timer_at = None;
            return true;
        }
        false
    }

    fn on_command(&mut self, now: Instant, command: Command) {
        match command {
            Command::ConnectGuest { port, v6, reply } => {
                match self.stack.connect_to_guest(now, port, v6) {
                    Ok(flow) => match UnixStream::pair() {
                        Ok((ours, theirs)) => {
                            self.tcp.insert(
                                flow,
                                HostTcp::Inbound {
                                    reply,
                                    ours,
                                    theirs,
                                },
                            );
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot make a socket pair");
                            self.stack.handle_host(now, flow, HostEvent::Reset);
                            let _ = reply.send(Err(GuestConnectError::Gone));
                        }
                    },
                    Err(InboundError::OverCap) => {
                        let _ = reply.send(Err(GuestConnectError::OverCap));
                    }
                    Err(InboundError::NoPort) => {
                        let _ = reply.send(Err(GuestConnectError::NoPort));
                    }
                }
            }
            Command::SetPolicy(policy) => {
                self.stack.set_policy(now, policy);
                self.dial_policy = None;
            }
            Command::SetDnsServers(servers) => self.stack.set_dns_servers(now, servers),
            Command::SetEgressProxy(proxy) => {
                match &proxy {
                    Some(p) => tracing::info!(proxy = %p.address(), tls = p.tls().is_some(),
                        "new TCP flows go through the egress proxy"),
                    None => tracing::info!("new TCP flows connect directly (no egress proxy)"),
                }
                self.egress_proxy = proxy.map(Arc::new);
            }
            Command::ResetFlows => {
                // The RSTs to the guest go out with the next frames; the
                // host peers get theirs from the sockets closed here.
                self.stack.reset_flows(now);
                self.drop_host_sockets();
            }
            Command::Stats(reply) => {
                let _ = reply.send(Snapshot {
                    stats: self.stack.stats().clone(),
                    tcp_flows: self.stack.tcp_flow_count(),
                    datagram_flows: self.stack.datagram_flow_count(),
                });
            }
        }
    }

    /// Settle host connects and proxy dials that finished since the last
    /// round (the core times out the ones that take too long, with a
    /// `TcpClose`).
    fn finish_connects(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut done = Vec::new();
        let mut dialed = Vec::new();
        for (&flow, host) in self.tcp.iter_mut() {
            match host {
                HostTcp::Connecting(stream) if stream.poll_write_ready(cx).is_ready() => {
                    done.push((flow, connect_outcome(stream)));
                }
                HostTcp::Dialing(dial) => {
                    if let Poll::Ready(result) = dial.as_mut().poll(cx) {
                        dialed.push((flow, result));
                    }
                }
                _ => {}
            }
        }
        let progress = !done.is_empty() || !dialed.is_empty();
        for (flow, result) in dialed {
            self.tcp.remove(&flow);
            self.on_dialed(now, flow, result);
        }
        for (flow, outcome) in done {
            let Some(outcome) = outcome else { continue };
            let Some(HostTcp::Connecting(stream)) = self.tcp.remove(&flow) else {
                continue;
            };
            self.on_connected(now, flow, outcome.map(|()| stream));
        }
        progress
    }

    fn on_connected(
        &mut self,
        now: Instant,
        flow: FlowId,
        result: Result<TcpStream, ConnectError>,
    ) {
        match result {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let stream = match self.intercepts.remove(&flow) {
                    Some(pending) => match self.hand_over(flow, pending, Box::pin(stream)) {
                        Some(ours) => HostStream::Unix(ours),
                        None => {
                            self.stack.handle_host(now, flow, HostEvent::Reset);
                            return;
                        }
                    },
                    None => HostStream::Tcp(stream),
                };
                self.tcp.insert(
                    flow,
                    HostTcp::Open(OpenTcp {
                        stream,
                        read_done: false,
                    }),
                );
                self.stack.handle_host(now, flow, HostEvent::Connected);
            }
            Err(e) => {
                self.tcp.remove(&flow);
                self.stack
                    .handle_host(now, flow, HostEvent::ConnectFailed(e));
            }
        }
    }

    /// A dial through the egress proxy ended: the tunnel is the flow's
    /// host stream, or the flow fails (never a direct connect instead).
    fn on_dialed(&mut self, now: Instant, flow: FlowId, result: Result<Tunnel, DialError>) {
        match result {
            Ok(tunnel) => {
                tracing::debug!(%flow, bound = ?tunnel.bound, "connected through the egress proxy");
                let host = match (self.intercepts.remove(&flow), tunnel.stream) {
                    // The interceptor's TLS to the server rides in the tunnel.
                    (Some(pending), stream) => {
                        let upstream: Pin<Box<dyn UpstreamIo>> = match stream {
                            TunnelStream::Tcp(s) => Box::pin(s),
                            TunnelStream::Tls(s) => Box::pin(s),
                        };
                        let Some(ours) = self.hand_over(flow, pending, upstream) else {
                            self.stack.handle_host(now, flow, HostEvent::Reset);
                            return;
                        };
                        HostTcp::Open(OpenTcp {
                            stream: HostStream::Unix(ours),
                            read_done: false,
                        })
                    }
                    (None, TunnelStream::Tcp(stream)) => HostTcp::Open(OpenTcp {
                        stream: HostStream::Tcp(stream),
                        read_done: false,
                    }),
                    (None, TunnelStream::Tls(stream)) => HostTcp::OpenTls(OpenTls::new(stream)),
                };
                self.tcp.insert(flow, host);
                self.stack.handle_host(now, flow, HostEvent::Connected);
            }
            Err(e) => {
                let proxy = self.egress_proxy.as_ref().map_or("", |p| p.address());
                tracing::info!(target: "slipway::flow", %flow, proxy, reason = %e.chain(),
                    "egress proxy connect failed");
                let failed = HostEvent::ConnectFailed(e.connect_error());
                self.stack.handle_host(now, flow, failed);
            }
        }
    }

    /// Whether a connect to `dst` goes through the egress proxy, and with
    /// what: every TCP flow but DNS to the stack's upstream (DNS is never
    /// tunneled).
    fn dial_plan(&mut self, dst: SocketAddr, name: Option<&str>) -> Option<DialPlan> {
        let proxy = self.egress_proxy.clone()?;
        let resolver = self.stack.config().dns_upstream;
        if resolver == Some(dst) {
            return None;
        }
        let stack = &self.stack;
        let policy = self
            .dial_policy
            .get_or_insert_with(|| Arc::new(stack.policy().clone()))
            .clone();
        Some(DialPlan {
            proxy,
            target: Target::name_or_addr(name, dst),
            resolver,
            policy,
        })
    }

    fn pump_tcp(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        for (&flow, host) in self.tcp.iter_mut() {
            match host {
                HostTcp::Open(open) => {
                    progress |= host_to_guest(&mut self.stack, cx, now, flow, open);
                    progress |= guest_to_host(&mut self.stack, cx, now, flow, open);
                }
                HostTcp::OpenTls(open) => {
                    progress |= tls_to_guest(&mut self.stack, cx, now, flow, open);
                    progress |= guest_to_tls(&mut self.stack, cx, now, flow, open);
                }
                _ => {}
            }
        }
        progress
    }

    fn pump_datagrams(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        for (&flow, host) in self.datagrams.iter_mut() {
            while self.stack.wants_host_datagrams() {
                let mut guard = match host.socket.poll_read_ready(cx) {
                    Poll::Ready(Ok(g)) => g,
                    _ => break,
                };
                let buf = &mut self.rx_buf;
                match guard.try_io(|s| s.get_ref().read(buf)) {
                    Ok(Ok(n)) => {
                        progress = true;
                        let datagram = HostEvent::Datagram(&self.rx_buf[..n]);
                        self.stack.handle_host(now, flow, datagram);
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        progress = true;
                        let error = HostEvent::DatagramError(Unreachable::Port);
                        self.stack.handle_host(now, flow, error);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%flow, error = %e, "datagram receive failed");
                        break;
                    }
                    Err(_would_block) => {}
                }
            }
        }
        progress
    }

    fn connect_directly(&mut self, now: Instant, flow: FlowId, dst: SocketAddr) {
        match start_connect(dst) {
            // connect() said it is done: no need to ask the socket again.
            Ok((stream, true)) => self.on_connected(now, flow, Ok(stream)),
            Ok((stream, false)) => {
                // Loopback and other fast peers may be done by now: answer
                // the guest in this same round.
                match connect_outcome(&stream) {
                    Some(outcome) => self.on_connected(now, flow, outcome.map(|()| stream)),
                    None => {
                        self.tcp.insert(flow, HostTcp::Connecting(stream));
                    }
                }
            }
            Err(e) => {
                let failed = HostEvent::ConnectFailed(connect_error(&e));
                self.stack.handle_host(now, flow, failed);
            }
        }
    }

    fn serve_requests(&mut self, now: Instant) -> bool {
        let mut progress = false;
        while let Some(req) = self.stack.poll_request() {
            progress = true;
            // A flow's datagrams queue up and go together, but nothing
            // passes them: whatever else comes, they are sent first.
            if !matches!(req, HostRequest::DatagramSend { .. }) {
                self.send_datagrams(now);
            }
            match req {
                HostRequest::TcpConnect { flow, dst, name } => {
                    if let Some(plan) = self.dial_plan(dst, name.as_deref()) {
                        self.tcp.insert(flow, HostTcp::Dialing(dial::start(plan)));
                        continue;
                    }
                    self.connect_directly(now, flow, dst);
                }
                HostRequest::Intercept {
                    flow,
                    name,
                    rule,
                    port,
                } => self.intercept(now, flow, intercept::Pending { name, rule, port }),
                HostRequest::TcpShutdown { flow } => match self.tcp.get_mut(&flow) {
                    Some(HostTcp::Open(open)) => {
                        let _ = open.stream.sock().shutdown(Shutdown::Write);
                    }
                    // Flushed, close_notify and FIN by the pump (`guest_to_tls`).
                    Some(HostTcp::OpenTls(open)) if open.shutdown == TlsShutdown::No => {
                        open.shutdown = TlsShutdown::Wanted;
                    }
                    _ => {}
                },
                HostRequest::InboundReady { flow } => {
                    if let Some(HostTcp::Inbound {
                        reply,
                        ours,
                        theirs,
                    }) = self.tcp.remove(&flow)
                    {
                        if reply.send(Ok(theirs)).is_err() {
                            // Whoever asked gave up meanwhile.
                            self.stack.handle_host(now, flow, HostEvent::Reset);
                        }
                        self.tcp.insert(
                            flow,
                            HostTcp::Open(OpenTcp {
                                stream: HostStream::Unix(ours),
                                read_done: false,
                            }),
                        );
                    }
                }
                HostRequest::InboundFailed { flow, error } => {
                    if let Some(HostTcp::Inbound { reply, .. }) = self.tcp.remove(&flow) {
                        let _ = reply.send(Err(match error {
                            ConnectError::Refused => GuestConnectError::Refused,
                            _ => GuestConnectError::TimedOut,
                        }));
                    }
                }
                HostRequest::TcpClose { flow, reset } => {
                    self.intercepts.remove(&flow);
                    match self.tcp.remove(&flow) {
                        // A dial dropped here ends there: its proxy connection closes.
                        Some(HostTcp::Connecting(_) | HostTcp::Dialing(_)) => {}
                        Some(HostTcp::Open(open)) if reset => {
                            let _ = open.stream.sock().set_linger(Some(Duration::ZERO));
                        }
                        Some(HostTcp::OpenTls(open)) if reset => {
                            let _ = open.sock().set_linger(Some(Duration::ZERO));
                        }
                        Some(HostTcp::Inbound { reply, .. }) => {
                            let _ = reply.send(Err(GuestConnectError::Refused));
                        }
                        Some(HostTcp::Open(_) | HostTcp::OpenTls(_)) | None => {}
                    }
                }
                HostRequest::DatagramOpen { flow, kind, dst } => match open_datagram(kind, dst) {
                    Ok(socket) => {
                        self.datagrams.insert(flow, HostDatagram::new(kind, socket));
                    }
                    Err(e) => {
                        if kind == DatagramKind::IcmpEcho
                            && e.kind() == io::ErrorKind::PermissionDenied
                        {
                            if !self.icmp_warned {
                                self.icmp_warned = true;
                                tracing::warn!(
                                    "ICMP echo is not relayed: this user may not open ICMP sockets \
                                     (widen sysctl net.ipv4.ping_group_range to include its group)"
                                );
                            }
                        } else {
                            tracing::info!(%flow, %dst, error = %e, "cannot open host datagram socket");
                        }
                        let error = HostEvent::DatagramError(Unreachable::Host);
                        self.stack.handle_host(now, flow, error);
                    }
                },
                HostRequest::DatagramSend { flow, payload } => {
                    if self.outgoing_flow != Some(flow) || self.outgoing.len() >= FRAMES_PER_ROUND {
                        self.send_datagrams(now);
                        self.outgoing_flow = Some(flow);
                    }
                    self.outgoing.push(payload);
                    continue;
                }
                HostRequest::DatagramClose { flow } => {
                    self.datagrams.remove(&flow);
                }
            }
        }
        self.send_datagrams(now);
        progress
    }

    /// Send the datagrams queued for `outgoing_flow` (see `HostDatagram::send_all`).
    fn send_datagrams(&mut self, now: Instant) {
        let Some(flow) = self.outgoing_flow.take() else {
            return;
        };
        if let Some(host) = self.datagrams.get_mut(&flow) {
            match host.send_all(&self.outgoing) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    let error = HostEvent::DatagramError(Unreachable::Port);
                    self.stack.handle_host(now, flow, error);
                }
                Err(e) => tracing::trace!(%flow, error = %e, "datagram send failed"),
            }
        }
        self.outgoing.clear();
    }
}

impl<L: Link> Driver<L> {
    /// The core marked `flow` for interception: hand its host connection
    /// over now if it is open (a flow a DNS pin allowed), else when its
    /// connect or proxy dial succeeds.
    fn intercept(&mut self, now: Instant, flow: FlowId, pending: intercept::Pending) {
        let upstream: Pin<Box<dyn UpstreamIo>> = match self.tcp.remove(&flow) {
            Some(HostTcp::Open(OpenTcp {
                stream: HostStream::Tcp(stream),
                read_done: false,
            })) => Box::pin(stream),
            Some(HostTcp::OpenTls(OpenTls {
                stream,
                read_done: false,
                shutdown: TlsShutdown::No,
            })) => Box::pin(stream),
            Some(host @ (HostTcp::Connecting(_) | HostTcp::Dialing(_))) => {
                self.tcp.insert(flow, host);
                self.intercepts.insert(flow, pending);
                return;
            }
            None => {
                self.intercepts.insert(flow, pending);
                return;
            }
            Some(other) => {
                // A host side already closed, or not a connection out: no
                // TLS to terminate here. Reset rather than splice.
                self.tcp.insert(flow, other);
                tracing::info!(target: "slipway::flow", flow = %flow,
                    "reset: cannot intercept a connection whose host side is done");
                self.stack.handle_host(now, flow, HostEvent::Reset);
                return;
            }
        };
        match self.hand_over(flow, pending, upstream) {
            Some(ours) => {
                let open = OpenTcp {
                    stream: HostStream::Unix(ours),
                    read_done: false,
                };
                self.tcp.insert(flow, HostTcp::Open(open));
            }
            None => self.stack.handle_host(now, flow, HostEvent::Reset),
        }
    }

    /// Give the interceptor its flow; the socket pair's near end, or
    /// `None` (the flow is to be reset) when there is none to take it.
    fn hand_over(
        &mut self,
        flow: FlowId,
        pending: intercept::Pending,
        upstream: Pin<Box<dyn UpstreamIo>>,
    ) -> Option<UnixStream> {
        let Some(interceptor) = &self.interceptor else {
            tracing::warn!(target: "slipway::flow", flow = %flow, rule = %pending.rule,
                "reset: a header rule matched but this sandbox has no interceptor");
            return None;
        };
        match intercept::hand_over(interceptor.as_ref(), flow, pending, upstream) {
            Ok(ours) => Some(ours),
            Err(e) => {
                tracing::warn!(flow = %flow, error = %e, "cannot make a socket pair");
                None
            }
        }
    }
}

/// How much of the frame a panic came with goes into the log line.
const PANIC_FRAME_BYTES: usize = 2048;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
