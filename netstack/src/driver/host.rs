//! The host side of a sandbox's flows: TCP connects in flight, open
//! streams (a real socket, or one end of a pair for a gateway connection
//! into the guest), datagram sockets, and the byte pumps: zero-copy ones
//! for sockets, and the ones for a TLS tunnel to an egress proxy.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;

use super::dial::Dial;
use super::handle::GuestConnectError;
use crate::stack::{ConnectError, DatagramKind, FlowId, HostEvent, Stack};

pub(super) enum HostTcp {
    /// A non-blocking host connect in flight (the core times it out).
    Connecting(TcpStream),
    /// A dial through the egress proxy in flight; dropping it (the core's
    /// timeout, the guest giving up) ends it.
    Dialing(Dial),
    /// A gateway connection into the guest, waiting for the guest to accept.
    Inbound {
        reply: oneshot::Sender<Result<UnixStream, GuestConnectError>>,
        ours: UnixStream,
        theirs: UnixStream,
    },
    Open(OpenTcp),
    /// Through the egress proxy over TLS.
    OpenTls(OpenTls),
}

pub(super) struct OpenTcp {
    pub(super) stream: HostStream,
    pub(super) read_done: bool,
}

/// The host side of a TCP flow: a real socket for egress, one end of a
/// socket pair for a connection the gateway opened into the guest.
pub(super) enum HostStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HostStream {
    pub(super) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            HostStream::Tcp(s) => s.poll_read_ready(cx),
            HostStream::Unix(s) => s.poll_read_ready(cx),
        }
    }

    pub(super) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            HostStream::Tcp(s) => s.poll_write_ready(cx),
            HostStream::Unix(s) => s.poll_write_ready(cx),
        }
    }

    /// Read what is there into `buf` (not empty); `WouldBlock` when nothing
    /// is. Through tokio's `poll_read`, which on epoll takes a short read as
    /// proof that the socket is drained and clears its readiness: the read
    /// that would only have answered EAGAIN is never made (one system call
    /// less per round trip and per connection).
    pub(super) fn read_some(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let mut rb = ReadBuf::new(buf);
        let polled = match self {
            HostStream::Tcp(s) => Pin::new(s).poll_read(cx, &mut rb),
            HostStream::Unix(s) => Pin::new(s).poll_read(cx, &mut rb),
        };
        match polled {
            Poll::Ready(Ok(())) => Ok(rb.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    pub(super) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.try_write(buf),
            HostStream::Unix(s) => s.try_write(buf),
        }
    }

    pub(super) fn sock(&self) -> SockRef<'_> {
        match self {
            HostStream::Tcp(s) => SockRef::from(s),
            HostStream::Unix(s) => SockRef::from(s),
        }
    }
}

/// A flow's TLS stream to the egress proxy, past the SOCKS5 handshake.
pub(super) struct OpenTls {
    pub(super) stream: Box<TlsStream<TcpStream>>,
    pub(super) read_done: bool,
    pub(super) shutdown: TlsShutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TlsShutdown {
    No,
    /// The guest finished sending: flush, close_notify, then FIN.
    Wanted,
    Done,
}

impl OpenTls {
    pub(super) fn new(stream: Box<TlsStream<TcpStream>>) -> Self {
        Self {
            stream,
            read_done: false,
            shutdown: TlsShutdown::No,
        }
    }

    pub(super) fn sock(&self) -> SockRef<'_> {
        SockRef::from(self.stream.get_ref().0)
    }
}

pub(super) struct HostDatagram {
    pub(super) socket: AsyncFd<Socket>,
}

/// Host → guest: read the host socket straight into the flow's send buffer.
pub(super) fn host_to_guest(
    stack: &mut Stack,
    cx: &mut Context<'_>,
    now: Instant,
    flow: FlowId,
    open: &mut OpenTcp,
) -> bool {
    let mut progress = false;
    while !open.read_done && stack.tcp_send_capacity(flow) > 0 {
        match open.stream.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                stack.handle_host(now, flow, HostEvent::Reset);
                return true;
            }
            Poll::Pending => break,
        }
        let stream = &mut open.stream;
        let read = stack.tcp_send_with(flow, |buf| {
            if buf.is_empty() {
                // Not a read of 0 bytes: that would look like EOF.
                return (0, Err(io::ErrorKind::WouldBlock.into()));
            }
            match stream.read_some(cx, buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            }
        });
        match read {
            None => break,
            Some(Ok(0)) => {
                open.read_done = true;
                stack.handle_host(now, flow, HostEvent::Eof);
                progress = true;
            }
            Some(Ok(_)) => progress = true,
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Some(Err(_)) => {
                open.read_done = true;
                stack.handle_host(now, flow, HostEvent::Reset);
                return true;
            }
        }
    }
    progress
}

/// Guest → host: write what the guest sent straight from the flow's receive buffer.
pub(super) fn guest_to_host(
    stack: &mut Stack,
    cx: &mut Context<'_>,
    now: Instant,
    flow: FlowId,
    open: &mut OpenTcp,
) -> bool {
    let mut progress = false;
    while stack.tcp_recv_pending(flow) > 0 {
        match open.stream.poll_write_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                stack.handle_host(now, flow, HostEvent::Reset);
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
                stack.handle_host(now, flow, HostEvent::Reset);
                return true;
            }
        }
    }
    progress
}

/// Host → guest through a TLS tunnel: decrypt straight into the flow's
/// send buffer.
pub(super) fn tls_to_guest(
    stack: &mut Stack,
    cx: &mut Context<'_>,
    now: Instant,
    flow: FlowId,
    open: &mut OpenTls,
) -> bool {
    let mut progress = false;
    while !open.read_done && stack.tcp_send_capacity(flow) > 0 {
        let stream = &mut open.stream;
        let read = stack.tcp_send_with(flow, |buf| {
            // An empty read buffer would read as end of stream.
            if buf.is_empty() {
                return (0, Err(io::ErrorKind::WouldBlock.into()));
            }
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut **stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    (n, Ok(n))
                }
                Poll::Ready(Err(e)) => (0, Err(e)),
                Poll::Pending => (0, Err(io::ErrorKind::WouldBlock.into())),
            }
        });
        match read {
            None => break,
            Some(Ok(0)) => {
                open.read_done = true;
                stack.handle_host(now, flow, HostEvent::Eof);
                progress = true;
            }
            Some(Ok(_)) => progress = true,
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            // The proxy closed without close_notify: the relayed stream
            // ended there (the guest's own protocol sees any truncation).
            Some(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                open.read_done = true;
                stack.handle_host(now, flow, HostEvent::Eof);
                progress = true;
            }
            Some(Err(e)) => {
                tracing::debug!(%flow, error = %e, "TLS to the egress proxy failed");
                open.read_done = true;
                stack.handle_host(now, flow, HostEvent::Reset);
                return true;
            }
        }
    }
    progress
}

/// Guest → host through a TLS tunnel: encrypt from the flow's receive
/// buffer; then flush what TLS holds back, and close the sending side
/// (close_notify, FIN) once the guest has.
pub(super) fn guest_to_tls(
    stack: &mut Stack,
    cx: &mut Context<'_>,
    now: Instant,
    flow: FlowId,
    open: &mut OpenTls,
) -> bool {
    let mut progress = false;
    let mut failed = false;
    while stack.tcp_recv_pending(flow) > 0 {
        let stream = &mut open.stream;
        let wrote = stack.tcp_recv_with(flow, |buf| {
            if buf.is_empty() {
                return (0, Err(io::ErrorKind::WouldBlock.into()));
            }
            match Pin::new(&mut **stream).poll_write(cx, buf) {
                Poll::Ready(Ok(n)) => (n, Ok(n)),
                Poll::Ready(Err(e)) => (0, Err(e)),
                Poll::Pending => (0, Err(io::ErrorKind::WouldBlock.into())),
            }
        });
        match wrote {
            None | Some(Ok(0)) => break,
            Some(Ok(_)) => progress = true,
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Some(Err(_)) => {
                failed = true;
                break;
            }
        }
    }
    if !failed {
        let flushed = match open.shutdown {
            TlsShutdown::Wanted => Pin::new(&mut *open.stream).poll_shutdown(cx),
            TlsShutdown::No | TlsShutdown::Done => Pin::new(&mut *open.stream).poll_flush(cx),
        };
        match flushed {
            Poll::Ready(Ok(())) if open.shutdown == TlsShutdown::Wanted => {
                open.shutdown = TlsShutdown::Done;
                progress = true;
            }
            Poll::Ready(Ok(())) | Poll::Pending => {}
            Poll::Ready(Err(_)) => failed = true,
        }
    }
    if failed {
        stack.handle_host(now, flow, HostEvent::Reset);
        return true;
    }
    progress
}

/// Start a non-blocking connect; `true` with it when it is already done
/// (loopback peers usually are), else it finishes (or fails) later, see
/// `connect_outcome`.
pub(super) fn start_connect(dst: SocketAddr) -> io::Result<(TcpStream, bool)> {
    let socket = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    let done = match socket.connect(&dst.into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) => return Err(e),
    };
    Ok((TcpStream::from_std(socket.into())?, done))
}

/// Whether a connect in flight has finished: `None` while it has not.
pub(super) fn connect_outcome(stream: &TcpStream) -> Option<Result<(), ConnectError>> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => Some(Err(connect_error(&e))),
        Ok(None) => match stream.peer_addr() {
            Ok(_) => Some(Ok(())),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
            Err(e) => Some(Err(connect_error(&e))),
        },
    }
}

pub(super) fn connect_error(e: &io::Error) -> ConnectError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::TimedOut => ConnectError::TimedOut,
        _ => ConnectError::Unreachable,
    }
}

pub(super) fn open_datagram(kind: DatagramKind, dst: SocketAddr) -> io::Result<AsyncFd<Socket>> {
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
