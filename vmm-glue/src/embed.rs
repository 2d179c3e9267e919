//! The embedding API for custom VMMs: a sandbox network you hand guest
//! frames to and take frames for the guest from, from your own event loop.
//!
//! ```no_run
//! use vmm_glue::embed::SandboxNet;
//! use netstack::{EgressPolicy, StackConfig};
//!
//! let net = SandboxNet::start(StackConfig::default(), EgressPolicy::allow_all())?;
//! // The guest's virtio-net TX queue produced a frame:
//! # let frame_from_guest = [0u8; 60];
//! net.send_frame(&frame_from_guest)?;
//! // Poll `net.as_raw_fd()` for readability (epoll, mio, tokio's AsyncFd...),
//! // then fill the guest's RX queue:
//! let mut buf = vec![0; vmm_glue::embed::MAX_FRAME];
//! match net.recv_frame(&mut buf) {
//!     Ok(n) => { /* hand buf[..n] to the guest */ }
//!     Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
//!     Err(e) => return Err(e),
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Inside, the stack runs on its own thread (a tokio runtime with the
//! slipway driver and its host sockets); frames cross a `SOCK_SEQPACKET`
//! socket pair, one frame per packet, so the descriptor you poll is an
//! ordinary socket and backpressure is the kernel's socket buffer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::thread::JoinHandle;

use netstack::driver::{DriverHandle, Link, Parked};
use netstack::wire::RxMeta;
use netstack::{EgressPolicy, Stack, StackConfig};

/// The largest frame either side passes: a 64 KiB IP packet plus Ethernet
/// (the stack's own limit, re-exported for VMMs that do not depend on it).
pub use netstack::wire::MAX_FRAME;

/// One end of a `SOCK_SEQPACKET` pair carrying whole frames.
pub struct SeqpacketLink {
    fd: OwnedFd,
}

impl SeqpacketLink {
    /// Two connected ends, both non-blocking and close-on-exec.
    pub fn pair() -> io::Result<(SeqpacketLink, SeqpacketLink)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into a valid array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (a, b) = unsafe {
            use std::os::fd::FromRawFd;
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        for fd in [&a, &b] {
            let size: libc::c_int = 4 << 20;
            // SAFETY: setsockopt reads a c_int from a valid pointer; a failure
            // only leaves the default buffer size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        Ok((SeqpacketLink { fd: a }, SeqpacketLink { fd: b }))
    }

    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other side closed",
            )),
            n if n as usize > buf.len() => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a {n}-byte frame does not fit a {}-byte buffer", buf.len()),
            )),
            n => Ok(n as usize),
        }
    }

    fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send reads frame.len() bytes from frame.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

// SAFETY: the link owns its descriptor for as long as it lives.
unsafe impl Link for SeqpacketLink {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, RxMeta)> {
        Ok((self.recv_frame(buf)?, RxMeta::default()))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.send_frame(frame)
    }
}

impl AsRawFd for SeqpacketLink {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A sandbox's network, running on its own thread, for a VMM to embed.
pub struct SandboxNet {
    vmm_end: SeqpacketLink,
    handle: DriverHandle,
    thread: Option<JoinHandle<()>>,
}

impl SandboxNet {
    /// Start the stack for one sandbox with this address plan, caps and policy.
    pub fn start(cfg: StackConfig, policy: EgressPolicy) -> io::Result<SandboxNet> {
        let (vmm_end, stack_end) = SeqpacketLink::pair()?;
        let parked = Parked::new(Stack::new(cfg, policy, std::time::Instant::now()));
        let handle = parked.handle();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("slipway-net".into())
            .spawn(move || {
                rt.block_on(async move {
                    let driver = match netstack::driver::Driver::resume(parked, stack_end) {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the sandbox network");
                            return;
                        }
                    };
                    // Runs until the VMM's end is dropped (the link reads EOF).
                    let (_, ended) = driver.serve(std::future::pending::<()>()).await;
                    if let Some(e) = ended.filter(|e| e.kind() != io::ErrorKind::UnexpectedEof) {
                        tracing::warn!(error = %e, "the sandbox network stopped");
                    }
                });
            })?;
        Ok(SandboxNet {
            vmm_end,
            handle,
            thread: Some(thread),
        })
    }

    /// Hand the stack one Ethernet frame the guest sent. `WouldBlock` means
    /// the stack is behind: keep the frame in the guest's TX queue and retry
    /// when `as_raw_fd()` is writable. A frame over [`MAX_FRAME`] is refused
    /// (`InvalidInput`): the stack reads frames into buffers of that size.
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        if frame.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte frame from the guest (at most {MAX_FRAME})",
                    frame.len()
                ),
            ));
        }
        self.vmm_end.send_frame(frame)
    }

    /// Take one frame for the guest into `buf` (at least `MAX_FRAME` bytes);
    /// `WouldBlock` when none waits.
    pub fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.vmm_end.recv_frame(buf)
    }

    /// Policy swaps, counters and connections into the guest.
    pub fn handle(&self) -> DriverHandle {
        self.handle.clone()
    }
}

impl AsRawFd for SandboxNet {
    /// Readable when a frame for the guest waits; writable when the stack takes frames.
    fn as_raw_fd(&self) -> RawFd {
        self.vmm_end.as_raw_fd()
    }
}

impl AsFd for SandboxNet {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.vmm_end.fd.as_fd()
    }
}

impl Drop for SandboxNet {
    fn drop(&mut self) {
        // Closing our end ends the driver (EOF on its link), then the thread.
        // SAFETY: shutdown(2) on a descriptor we own; the fd itself closes later.
        unsafe { libc::shutdown(self.vmm_end.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
