//! The thin tokio driver around a `Stack`: it owns the link to the guest, the
//! host sockets and the timer, and shuttles bytes between them.
//!
//! Bytes move straight between a host socket and the flow's smoltcp buffer
//! (the closure forms of send/recv), and only as fast as the other side
//! drains: a full guest window stops host reads, a full host socket leaves
//! the guest's bytes in smoltcp and so shuts the guest's window.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::config::Offloads;
use crate::policy::EgressPolicy;
use crate::stack::{
    smol_instant, ConnectError, DatagramKind, FlowId, HostRequest, InboundError, Stack, Stats,
};
use crate::wire::{RxMeta, Unreachable, MAX_FRAME};

/// Where the guest's frames come from and go to: a tap, a socket, a channel.
/// Both calls are non-blocking and return `ErrorKind::WouldBlock` when they
/// would wait.
///
/// # Safety
/// `as_raw_fd` must return the same open descriptor for as long as the link
/// lives (the driver registers it with the reactor): own it, do not lend it.
pub unsafe trait Link: AsRawFd {
    /// Read one whole frame into `buf`, which holds
    /// [`MAX_FRAME`](crate::wire::MAX_FRAME) bytes: no frame is longer.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one whole frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// What this link does for the stack (checksums, TSO); none by default.
    /// A link that claims `tx_checksum` must fill in or offload the TCP
    /// checksum of every frame it is given; one that claims `tso` must take
    /// TCP segments of up to 64 KiB and see them cut to the MTU.
    fn offloads(&self) -> Offloads {
        Offloads::default()
    }
    /// Read one whole frame and what the link knows about it. The default
    /// knows nothing: every checksum is verified.
    fn recv_meta(&mut self, buf: &mut [u8]) -> io::Result<(usize, RxMeta)> {
        Ok((self.recv(buf)?, RxMeta::default()))
    }
}

/// Guest frames taken per round before the stack answers them.
const FRAMES_PER_ROUND: usize = 64;
/// Rounds of work before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 16;

enum HostTcp {
    /// A non-blocking host connect in flight, given up at `deadline`.
    Connecting {
        stream: TcpStream,
        deadline: tokio::time::Instant,
    },
    /// A gateway connection into the guest, waiting for the guest to accept.
    Inbound {
        reply: oneshot::Sender<Result<UnixStream, GuestConnectError>>,
        ours: UnixStream,
        theirs: UnixStream,
    },
    Open(OpenTcp),
}

struct OpenTcp {
    stream: HostStream,
    read_done: bool,
}

/// The host side of a TCP flow: a real socket for egress, one end of a
/// socket pair for a connection the gateway opened into the guest.
enum HostStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HostStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            HostStream::Tcp(s) => s.poll_read_ready(cx),
            HostStream::Unix(s) => s.poll_read_ready(cx),
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            HostStream::Tcp(s) => s.poll_write_ready(cx),
            HostStream::Unix(s) => s.poll_write_ready(cx),
        }
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.try_read(buf),
            HostStream::Unix(s) => s.try_read(buf),
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.try_write(buf),
            HostStream::Unix(s) => s.try_write(buf),
        }
    }

    fn sock(&self) -> SockRef<'_> {
        match self {
            HostStream::Tcp(s) => SockRef::from(s),
            HostStream::Unix(s) => SockRef::from(s),
        }
    }
}

/// Why a connection into the guest failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GuestConnectError {
    #[error("the sandbox's incoming-connection cap is reached")]
    OverCap,
    #[error("nothing listens on that port in the sandbox (the guest answered RST)")]
    Refused,
    #[error("the sandbox did not answer")]
    TimedOut,
    #[error("the sandbox's network is gone")]
    Gone,
}

/// What the rest of the process may ask of a running sandbox network.
pub enum Command {
    ConnectGuest {
        port: u16,
        v6: bool,
        reply: oneshot::Sender<Result<UnixStream, GuestConnectError>>,
    },
    SetPolicy(EgressPolicy),
    Stats(oneshot::Sender<Snapshot>),
}

/// A sandbox network's counters at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub stats: Stats,
    pub tcp_flows: usize,
    pub datagram_flows: usize,
}

/// A cheap, cloneable way in to a running `Driver` from other tasks.
#[derive(Clone)]
pub struct DriverHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl DriverHandle {
    /// Open a TCP connection from the gateway to the guest's `port`; the
    /// stream carries the bytes both ways.
    pub async fn connect_guest(
        &self,
        port: u16,
        v6: bool,
    ) -> Result<UnixStream, GuestConnectError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::ConnectGuest { port, v6, reply })
            .map_err(|_| GuestConnectError::Gone)?;
        answer.await.unwrap_or(Err(GuestConnectError::Gone))
    }

    /// Replace the egress policy; live flows it denies are reset.
    pub fn set_policy(&self, policy: EgressPolicy) -> bool {
        self.tx.send(Command::SetPolicy(policy)).is_ok()
    }

    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Stats(reply)).ok()?;
        answer.await.ok()
    }
}

struct HostDatagram {
    socket: AsyncFd<Socket>,
}

/// A sandbox's stack between two links: see `Driver::serve` and `Driver::resume`.
pub struct Parked {
    pub stack: Stack,
    commands_tx: mpsc::UnboundedSender<Command>,
    commands: mpsc::UnboundedReceiver<Command>,
}

impl Parked {
    /// A sandbox network with no link yet (the VMM has not connected): its
    /// `DriverHandle` works already, and `Driver::resume` serves it once a
    /// link exists.
    pub fn new(stack: Stack) -> Self {
        let (commands_tx, commands) = mpsc::unbounded_channel();
        Self {
            stack,
            commands_tx,
            commands,
        }
    }

    pub fn handle(&self) -> DriverHandle {
        DriverHandle {
            tx: self.commands_tx.clone(),
        }
    }
}

pub struct Driver<L: Link> {
    stack: Stack,
    link: AsyncFd<L>,
    started: std::time::Instant,
    tcp: HashMap<FlowId, HostTcp>,
    datagrams: HashMap<FlowId, HostDatagram>,
    commands_tx: mpsc::UnboundedSender<Command>,
    commands: mpsc::UnboundedReceiver<Command>,
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<tokio::time::Instant>,
    rx_buf: Vec<u8>,
    /// Length of the guest frame in `rx_buf` the stack is taking, for the
    /// log line if it panics.
    rx_len: usize,
    icmp_warned: bool,
}

impl<L: Link> Driver<L> {
    /// Must be called inside a tokio runtime. The link must be non-blocking.
    pub fn new(mut stack: Stack, link: L) -> io::Result<Self> {
        // Continue the stack's own clock, which may have run under an earlier link.
        let started = std::time::Instant::now() - stack.elapsed();
        stack.set_offloads(link.offloads());
        let (commands_tx, commands) = mpsc::unbounded_channel();
        Ok(Self {
            stack,
            // SAFETY: `Link` implementors promise a stable, owned descriptor.
            link: unsafe { AsyncFd::register(link) }.map_err(io::Error::from)?,
            started,
            tcp: HashMap::new(),
            datagrams: HashMap::new(),
            commands_tx,
            commands,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            timer_at: None,
            rx_buf: vec![0; MAX_FRAME],
            rx_len: 0,
            icmp_warned: false,
        })
    }

    pub fn handle(&self) -> DriverHandle {
        DriverHandle {
            tx: self.commands_tx.clone(),
        }
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
        let result = poll_fn(|cx| {
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
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
                HostTcp::Connecting { .. } | HostTcp::Inbound { .. } => {}
            }
        }
        let parked = Parked {
            stack: self.stack,
            commands_tx: self.commands_tx,
            commands: self.commands,
        };
        (parked, result.err())
    }

    /// Serve a parked sandbox over a new link. Its flows are reset (their
    /// host sockets went with the old link); addresses, the DHCP lease, the
    /// policy and every `DriverHandle` stay valid.
    pub fn resume(parked: Parked, link: L) -> io::Result<Self> {
        let Parked {
            mut stack,
            commands_tx,
            commands,
        } = parked;
        stack.reset_flows();
        let mut driver = Self::new(stack, link)?;
        driver.commands_tx = commands_tx;
        driver.commands = commands;
        Ok(driver)
    }

    fn now(&self) -> smoltcp::time::Instant {
        smol_instant(self.started.elapsed())
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
        let now = self.now();
        let mut stack = Stack::new(
            self.stack.config().clone(),
            self.stack.policy().clone(),
            now,
        );
        stack.restore_stats(stats);
        stack.set_offloads(self.link.get_ref().offloads());
        stack.advertise_router();
        self.stack = stack;
        for (_, host) in self.tcp.drain() {
            match host {
                HostTcp::Open(open) => {
                    let _ = open.stream.sock().set_linger(Some(Duration::ZERO));
                }
                HostTcp::Inbound { reply, .. } => {
                    let _ = reply.send(Err(GuestConnectError::Gone));
                }
                HostTcp::Connecting { .. } => {}
            }
        }
        self.datagrams.clear();
        self.rx_len = 0;
    }

    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for _ in 0..ROUNDS_PER_POLL {
            let now = self.now();
            // A vhost-user guest acks its features after the link exists (and
            // again after a reconnect); a change remakes smoltcp's interface.
            self.stack.set_offloads(self.link.get_ref().offloads());
            let mut progress = self.read_link(cx, now)?;
            progress |= self.finish_connects(cx);
            while let Poll::Ready(Some(command)) = self.commands.poll_recv(cx) {
                progress = true;
                self.on_command(now, command);
            }
            progress |= self.pump_tcp(cx);
            progress |= self.pump_datagrams(cx, now);
            self.stack.poll(now);
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

    fn read_link(&mut self, cx: &mut Context<'_>, now: smoltcp::time::Instant) -> io::Result<bool> {
        let mut progress = false;
        for _ in 0..FRAMES_PER_ROUND {
            let mut guard = match self.link.poll_read_ready_mut(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => break,
            };
            let buf = &mut self.rx_buf;
            match guard.try_io(|l| l.get_mut().recv_meta(buf)) {
                Ok(Ok((n, meta))) => {
                    self.rx_len = n;
                    self.stack.handle_frame_meta(now, &self.rx_buf[..n], meta);
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

    fn poll_timer(&mut self, cx: &mut Context<'_>, now: smoltcp::time::Instant) -> bool {
        let stack_at = match self.stack.poll_at(now) {
            Some(at) if at <= now => return true,
            Some(at) => {
                let since_start = Duration::from_micros(at.total_micros().max(0) as u64);
                Some(tokio::time::Instant::from_std(self.started + since_start))
            }
            None => None,
        };
        let Some(deadline) = [stack_at, self.next_connect_deadline()]
            .into_iter()
            .flatten()
            .min()
        else {
            self.timer_at = None;
            return false;
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

    fn on_command(&mut self, now: smoltcp::time::Instant, command: Command) {
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
                            self.stack.tcp_host_reset(flow);
                            let _ = reply.send(Err(GuestConnectError::Gone));
                        }
                    },
                    Err(InboundError::OverCap) | Err(InboundError::NoPort) => {
                        let _ = reply.send(Err(GuestConnectError::OverCap));
                    }
                }
            }
            Command::SetPolicy(policy) => self.stack.set_policy(policy),
            Command::Stats(reply) => {
                let _ = reply.send(Snapshot {
                    stats: self.stack.stats().clone(),
                    tcp_flows: self.stack.tcp_flow_count(),
                    datagram_flows: self.stack.datagram_flow_count(),
                });
            }
        }
    }

    /// Settle host connects that finished (or ran out of time) since the last round.
    fn finish_connects(&mut self, cx: &mut Context<'_>) -> bool {
        let now = tokio::time::Instant::now();
        let mut done = Vec::new();
        for (&flow, host) in &self.tcp {
            let HostTcp::Connecting { stream, deadline } = host else {
                continue;
            };
            match stream.poll_write_ready(cx) {
                Poll::Ready(_) => done.push((flow, connect_outcome(stream))),
                Poll::Pending if now >= *deadline => {
                    done.push((flow, Some(Err(ConnectError::TimedOut))))
                }
                Poll::Pending => {}
            }
        }
        let progress = !done.is_empty();
        for (flow, outcome) in done {
            let Some(outcome) = outcome else { continue };
            let Some(HostTcp::Connecting { stream, .. }) = self.tcp.remove(&flow) else {
                continue;
            };
            self.on_connected(flow, outcome.map(|()| stream));
        }
        progress
    }

    /// The earliest connect deadline, for the timer.
    fn next_connect_deadline(&self) -> Option<tokio::time::Instant> {
        self.tcp
            .values()
            .filter_map(|h| match h {
                HostTcp::Connecting { deadline, .. } => Some(*deadline),
                _ => None,
            })
            .min()
    }

    fn on_connected(&mut self, flow: FlowId, result: Result<TcpStream, ConnectError>) {
        match result {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                self.tcp.insert(
                    flow,
                    HostTcp::Open(OpenTcp {
                        stream: HostStream::Tcp(stream),
                        read_done: false,
                    }),
                );
                self.stack.tcp_connected(flow);
            }
            Err(e) => {
                self.tcp.remove(&flow);
                self.stack.tcp_connect_failed(flow, e);
            }
        }
    }

    fn pump_tcp(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        for (&flow, host) in self.tcp.iter_mut() {
            let HostTcp::Open(open) = host else { continue };
            progress |= host_to_guest(&mut self.stack, cx, flow, open);
            progress |= guest_to_host(&mut self.stack, cx, flow, open);
        }
        progress
    }

    fn pump_datagrams(&mut self, cx: &mut Context<'_>, now: smoltcp::time::Instant) -> bool {
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
                        self.stack.datagram_from_host(now, flow, &self.rx_buf[..n]);
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        progress = true;
                        self.stack.datagram_host_error(flow, Unreachable::Port);
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

    fn serve_requests(&mut self, now: smoltcp::time::Instant) -> bool {
        let mut progress = false;
        while let Some(req) = self.stack.poll_request() {
            progress = true;
            match req {
                HostRequest::TcpConnect { flow, dst } => match start_connect(dst) {
                    Ok(stream) => {
                        // Loopback and other fast peers are done before connect()
                        // returns: answer the guest in this same round.
                        match connect_outcome(&stream) {
                            Some(outcome) => self.on_connected(flow, outcome.map(|()| stream)),
                            None => {
                                let limit = self.stack.config().connect_timeout;
                                let deadline = tokio::time::Instant::now() + limit;
                                self.tcp
                                    .insert(flow, HostTcp::Connecting { stream, deadline });
                            }
                        }
                    }
                    Err(e) => self.stack.tcp_connect_failed(flow, connect_error(&e)),
                },
                HostRequest::TcpShutdown { flow } => {
                    if let Some(HostTcp::Open(open)) = self.tcp.get(&flow) {
                        let _ = open.stream.sock().shutdown(Shutdown::Write);
                    }
                }
                HostRequest::InboundReady { flow } => {
                    if let Some(HostTcp::Inbound {
                        reply,
                        ours,
                        theirs,
                    }) = self.tcp.remove(&flow)
                    {
                        if reply.send(Ok(theirs)).is_err() {
                            // Whoever asked gave up meanwhile.
                            self.stack.tcp_host_reset(flow);
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
                HostRequest::TcpClose { flow, reset } => match self.tcp.remove(&flow) {
                    Some(HostTcp::Connecting { .. }) => {}
                    Some(HostTcp::Open(open)) if reset => {
                        let _ = open.stream.sock().set_linger(Some(Duration::ZERO));
                    }
                    Some(HostTcp::Inbound { reply, .. }) => {
                        let _ = reply.send(Err(GuestConnectError::Refused));
                    }
                    Some(HostTcp::Open(_)) | None => {}
                },
                HostRequest::DatagramOpen { flow, kind, dst } => match open_datagram(kind, dst) {
                    Ok(socket) => {
                        self.datagrams.insert(flow, HostDatagram { socket });
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
                        self.stack.datagram_host_error(flow, Unreachable::Host);
                    }
                },
                HostRequest::DatagramSend { flow, payload } => {
                    if let Some(host) = self.datagrams.get(&flow) {
                        match host.socket.get_ref().send(&payload) {
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                                self.stack.datagram_host_error(flow, Unreachable::Port);
                            }
                            // UDP may lose datagrams; a full host buffer drops this one.
                            Err(e) => tracing::trace!(%flow, error = %e, "datagram send failed"),
                        }
                    }
                }
                HostRequest::DatagramClose { flow } => {
                    self.datagrams.remove(&flow);
                }
            }
        }
        let _ = now;
        progress
    }
}

/// Host → guest: read the host socket straight into the flow's send buffer.
fn host_to_guest(
    stack: &mut Stack,
    cx: &mut Context<'_>,
    flow: FlowId,
    open: &mut OpenTcp,
) -> bool {
    let mut progress = false;
    while !open.read_done && stack.tcp_send_capacity(flow) > 0 {
        match open.stream.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                stack.tcp_host_reset(flow);
                return true;
            }
            Poll::Pending => break,
        }
        let stream = &open.stream;
        let read = stack.tcp_send_with(flow, |buf| match stream.try_read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match read {
            None => break,
            Some(Ok(0)) => {
                open.read_done = true;
                stack.tcp_host_eof(flow);
                progress = true;
            }
            Some(Ok(_)) => progress = true,
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Some(Err(_)) => {
                open.read_done = true;
                stack.tcp_host_reset(flow);
                return true;
            }
        }
    }
    progress
}

/// Guest → host: write what the guest sent straight from the flow's receive buffer.
fn guest_to_host(
    stack: &mut Stack,
    cx: &mut Context<'_>,
    flow: FlowId,
    open: &mut OpenTcp,
) -> bool {
    let mut progress = false;
    while stack.tcp_recv_pending(flow) > 0 {
        match open.stream.poll_write_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                stack.tcp_host_reset(flow);
                return true;
            }
            Poll::Pending => break,
        }
        let stream = &open.stream;
        let wrote = stack.tcp_recv_with(flow, |buf| match stream.try_write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match wrote {
            None => break,
            Some(Ok(_)) => progress = true,
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Some(Err(_)) => {
                stack.tcp_host_reset(flow);
                return true;
            }
        }
    }
    progress
}

/// How much of the frame a panic came with goes into the log line.
const PANIC_FRAME_BYTES: usize = 2048;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Start a non-blocking connect; it finishes (or fails) later, see `connect_outcome`.
fn start_connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    TcpStream::from_std(socket.into())
}

/// Whether a connect in flight has finished: `None` while it has not.
fn connect_outcome(stream: &TcpStream) -> Option<Result<(), ConnectError>> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => Some(Err(connect_error(&e))),
        Ok(None) => match stream.peer_addr() {
            Ok(_) => Some(Ok(())),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
            Err(e) => Some(Err(connect_error(&e))),
        },
    }
}

fn connect_error(e: &io::Error) -> ConnectError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::TimedOut => ConnectError::TimedOut,
        _ => ConnectError::Unreachable,
    }
}

fn open_datagram(kind: DatagramKind, dst: SocketAddr) -> io::Result<AsyncFd<Socket>> {
    let domain = Domain::for_address(dst);
    let protocol = match (kind, dst) {
        (DatagramKind::Udp, _) => Protocol::UDP,
        (DatagramKind::IcmpEcho, SocketAddr::V4(_)) => Protocol::ICMPV4,
        (DatagramKind::IcmpEcho, SocketAddr::V6(_)) => Protocol::ICMPV6,
    };
    let socket = Socket::new(domain, Type::DGRAM.cloexec(), Some(protocol))?;
    socket.set_nonblocking(true)?;
    socket.connect(&dst.into())?;
    // SAFETY: the socket owns its descriptor, which lives as long as the AsyncFd.
    unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)
}
