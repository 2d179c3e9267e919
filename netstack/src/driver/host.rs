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
    /// Whether runs of equal-size datagrams go out as one UDP GSO send
    /// (`UDP_SEGMENT`): UDP sockets start with it, and lose it for good
    /// the first time the kernel refuses it (a path MTU under the
    /// datagram size, a device without checksum offload, an old kernel).
    gso: bool,
}

/// The most datagrams one GSO send carries (the kernel's `UDP_MAX_SEGMENTS`
/// is 64 before Linux 6.9, 128 since).
const GSO_MAX_SEGMENTS: usize = 64;
/// The most payload one UDP send carries: 65535 less the IPv4 and UDP headers.
const GSO_MAX_BYTES: usize = 65535 - 20 - 8;

impl HostDatagram {
    pub(super) fn new(kind: DatagramKind, socket: AsyncFd<Socket>) -> Self {
        Self {
            socket,
            gso: kind == DatagramKind::Udp,
        }
    }

    /// Send the datagrams one round of guest frames queued for this flow,
    /// in order: each run of equal-size ones (the last may be shorter) in
    /// one `sendmsg` with UDP GSO, which takes a run through the host's
    /// stack once instead of once per datagram; anything else one
    /// datagram per send. A full socket buffer loses the rest, as UDP may;
    /// any other error ends the batch and is returned (a connection
    /// refused is the guest's to hear about).
    pub(super) fn send_all(&mut self, payloads: &[Vec<u8>]) -> io::Result<()> {
        let mut rest = payloads;
        while !rest.is_empty() {
            let n = if self.gso { gso_run(rest) } else { 1 };
            let (run, later) = rest.split_at(n);
            rest = later;
            let sent = if n > 1 {
                match self.send_gso(run) {
                    Err(e) if gso_refused(&e) => {
                        tracing::debug!(error = %e, "UDP GSO refused: this flow sends one datagram at a time");
                        self.gso = false;
                        run.iter().try_for_each(|p| self.send_one(p))
                    }
                    other => other,
                }
            } else {
                self.send_one(&run[0])
            };
            match sent {
                Ok(()) => {}
                Err(e) if is_full(&e) => {
                    tracing::trace!(error = %e, "host socket full: datagrams dropped");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn send_one(&self, payload: &[u8]) -> io::Result<()> {
        self.socket.get_ref().send(payload).map(drop)
    }

    fn send_gso(&self, run: &[Vec<u8>]) -> io::Result<()> {
        let control = gso_control(run[0].len() as u16);
        let mut iov = [std::io::IoSlice::new(&[]); GSO_MAX_SEGMENTS];
        for (slot, p) in iov.iter_mut().zip(run) {
            *slot = std::io::IoSlice::new(p);
        }
        let msg = socket2::MsgHdr::new()
            .with_buffers(&iov[..run.len()])
            .with_control(&control);
        self.socket.get_ref().sendmsg(&msg, 0).map(drop)
    }
}

// SAFETY: CMSG_SPACE and CMSG_LEN are arithmetic on a length, nothing more.
const GSO_CONTROL_SPACE: usize = unsafe { libc::CMSG_SPACE(2) } as usize;
// SAFETY: as above.
const GSO_CONTROL_LEN: usize = unsafe { libc::CMSG_LEN(2) } as usize;
// SAFETY: as above; where a control message's data starts.
const GSO_CONTROL_DATA: usize = unsafe { libc::CMSG_LEN(0) } as usize;

/// One control message: `SOL_UDP`, `UDP_SEGMENT`, the segment size.
fn gso_control(segment: u16) -> [u8; GSO_CONTROL_SPACE] {
    // SAFETY: cmsghdr is plain integers (and padding on some libcs), for
    // which all zeroes is a valid value.
    let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
    hdr.cmsg_len = GSO_CONTROL_LEN as _;
    hdr.cmsg_level = libc::SOL_UDP;
    hdr.cmsg_type = libc::UDP_SEGMENT;
    // SAFETY: reads the bytes of a live, initialised value of its own size.
    let hdr_bytes = unsafe {
        std::slice::from_raw_parts(
            (&hdr as *const libc::cmsghdr).cast::<u8>(),
            std::mem::size_of::<libc::cmsghdr>(),
        )
    };
    let mut control = [0u8; GSO_CONTROL_SPACE];
    control[..hdr_bytes.len()].copy_from_slice(hdr_bytes);
    control[GSO_CONTROL_DATA..GSO_CONTROL_LEN].copy_from_slice(&segment.to_ne_bytes());
    control
}

/// How many datagrams from the start of `rest` one GSO send can carry:
/// equal sizes, the last possibly shorter (but not empty), within the
/// kernel's bounds on segments and bytes. 1 means send it alone.
fn gso_run(rest: &[Vec<u8>]) -> usize {
    let size = rest[0].len();
    if size == 0 {
        return 1;
    }
    let mut total = 0;
    let mut n = 0;
    for p in rest.iter().take(GSO_MAX_SEGMENTS) {
        if p.is_empty() || p.len() > size || total + p.len() > GSO_MAX_BYTES {
            break;
        }
        total += p.len();
        n += 1;
        if p.len() < size {
            break;
        }
    }
    n.max(1)
}

/// An error that says this socket cannot send with GSO, not that the
/// datagrams could not go.
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
    )
}

/// The host's buffers are full: the datagrams are lost, as UDP may lose them.
fn is_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
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
/// A socket with a peer is connected (one system call, the usual case);
/// one without has failed if it holds an error, else it is still trying.
pub(super) fn connect_outcome(stream: &TcpStream) -> Option<Result<(), ConnectError>> {
    match stream.peer_addr() {
        Ok(_) => Some(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => match stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(Err(connect_error(&e))),
            Ok(None) => None,
        },
        Err(e) => Some(Err(connect_error(&e))),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn sized(sizes: &[usize]) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut p = vec![i as u8; n];
                p.iter_mut().take(2).for_each(|b| *b = (i >> 8) as u8);
                p
            })
            .collect()
    }

    fn runs(payloads: &[Vec<u8>]) -> Vec<usize> {
        let mut rest = payloads;
        let mut out = vec![];
        while !rest.is_empty() {
            let n = gso_run(rest);
            out.push(n);
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn runs_are_one_size_ending_at_most_in_one_shorter_datagram() {
        let p = sized(&[1400, 1400, 1400, 900, 1400, 0, 0, 5, 7, 7, 3, 3]);
        assert_eq!(runs(&p), [4, 1, 1, 1, 1, 3, 1]);
        // The kernel's bounds: 64 segments, 65507 bytes.
        assert_eq!(runs(&sized(&[100; 130])), [64, 64, 2]);
        assert_eq!(runs(&sized(&[1400; 50])), [46, 4]);
        assert_eq!(runs(&sized(&[65507, 65507])), [1, 1]);
    }

    /// A receiver on loopback and a host datagram socket connected to it.
    fn pair() -> (UdpSocket, HostDatagram) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        let socket = open_datagram(DatagramKind::Udp, rx.local_addr().unwrap()).unwrap();
        (rx, HostDatagram::new(DatagramKind::Udp, socket))
    }

    fn receive(rx: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 65536];
        (0..n)
            .map(|_| {
                let got = rx.recv(&mut buf).expect("a datagram");
                buf[..got].to_vec()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_arrives_whole_and_in_order_through_gso() {
        let (rx, mut host) = pair();
        let sent = sized(&[1200, 1200, 1200, 700, 300, 300, 0, 1, 1500, 1500, 1500]);
        host.send_all(&sent).unwrap();
        assert_eq!(receive(&rx, sent.len()), sent);
        assert!(host.gso, "loopback takes GSO sends");
    }

    #[tokio::test]
    async fn a_socket_that_refuses_gso_sends_one_datagram_at_a_time() {
        let (rx, mut host) = pair();
        // SO_NO_CHECK: IPv4 UDP without checksums, which GSO refuses (EINVAL).
        let one: libc::c_int = 1;
        // SAFETY: a valid descriptor and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(host.socket.get_ref()),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        let sent = sized(&[1000; 8]);
        host.send_all(&sent).unwrap();
        assert!(!host.gso, "the refusal is remembered");
        assert_eq!(receive(&rx, sent.len()), sent);
        host.send_all(&sent[..3]).unwrap();
        assert_eq!(receive(&rx, 3), sent[..3]);
    }
}
