//! A vhost-user-net backend: QEMU (`-netdev vhost-user`) and
//! cloud-hypervisor (`--net vhost_user=true,socket=PATH`) connect to a unix
//! socket slipway listens on, share the guest's memory, and the guest's
//! virtqueues are served here, on the rust-vmm crates.
//!
//! ```text
//! VMM ─socket─▶ relay ─▶ daemon thread (vhost-user protocol)
//!                        worker thread (rx/tx virtqueues) ◀─▶ backend end ┐
//!                                        SOCK_SEQPACKET pair, a frame a packet │
//!                   netstack Driver ◀─▶ VhostUserLink (stack end) ◀───────────┘
//! ```
//!
//! The stack is untouched: the backend runs in threads of its own
//! (`vhost_user_backend::VhostUserDaemon`) and bridges the receive and
//! transmit queues to a socket pair; the stack's end is a [`Link`] that the
//! slipway [`Driver`](netstack::driver::Driver) serves like any other.
//!
//! ```no_run
//! # async fn doc(mut parked: netstack::driver::Parked) -> Result<(), Box<dyn std::error::Error>> {
//! use netstack::driver::Driver;
//! use vmm_glue::vhost_user::VhostUserNet;
//!
//! let net = VhostUserNet::listen("/run/sandbox-1/net.sock".as_ref())?;
//! loop {
//!     let driver = Driver::resume(parked, net.link()?)?;
//!     let (back, ended) = driver.serve(std::future::pending::<()>()).await;
//!     parked = back;
//!     match ended {
//!         None => break, // shut down
//!         // The VMM left; the guest's flows are reset on resume.
//!         Some(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
//!         Some(e) => return Err(e.into()),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! QEMU: `-object memory-backend-memfd,id=mem,size=<-m>,share=on -machine
//! memory-backend=mem -chardev socket,id=c0,path=PATH -netdev
//! vhost-user,id=n0,chardev=c0 -device virtio-net-device,netdev=n0` (or
//! `virtio-net-pci`). cloud-hypervisor: `--memory size=…,shared=on --net
//! vhost_user=true,socket=PATH,num_queues=2`.
//!
//! The VMM may go and come back (QEMU killed or restarted, the VM rebooted
//! by a new VMM process): the backend accepts the next connection on the
//! same path, one at a time, with fresh device state. The link tells the
//! stack when a VMM left: its `recv` fails once with `ConnectionReset`, so
//! `Driver::serve` ends, and `Driver::resume` with a new [`VhostUserLink`]
//! resets the flows the old guest had while the addresses, the DHCP lease
//! and the policy stay. Frames the stack had queued for the old guest are
//! dropped.
//!
//! Offered: VERSION_1, MRG_RXBUF (a 64 KiB frame spreads over the guest's
//! receive buffers), EVENT_IDX, INDIRECT_DESC, CSUM and GUEST_CSUM, TSO both
//! ways (GUEST_TSO4/6, HOST_TSO4/6, HOST_ECN; see [`Options`]),
//! PROTOCOL_FEATURES with REPLY_ACK and CONFIGURE_MEM_SLOTS; no MQ, no UDP
//! segmentation, no MAC (the VMM owns the guest's address). Messages pass
//! through `relay`, which reorders the one QEMU sends too early for the
//! `vhost` crate.
//!
//! What the guest and the VMM send is hostile: `virtq` checks every
//! descriptor chain (bounds, loops, lengths, direction) and returns bad ones
//! unused, logged and counted in [`Stats`]; a broken VMM connection ends
//! alone and the next one is served.

mod device;
mod message;
mod relay;
// Open to the fuzz target `vhost_queues` (fuzz/src/vhost_queues.rs), which
// drives the queues over mock guest memory; private otherwise.
#[cfg(any(fuzzing, feature = "fuzz-api"))]
#[doc(hidden)]
pub mod virtq;
#[cfg(not(any(fuzzing, feature = "fuzz-api")))]
mod virtq;

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use netstack::driver::Link;
use netstack::wire::RxMeta;
use netstack::wire::{MAX_FRAME, MIN_FRAME};
use socket2::{Domain, Socket, Type};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use device::{Counters, NetDevice, SOCKET_EVENT};

/// The one-byte packet the backend sends the stack when a VMM disconnects.
/// No frame is this short, so it cannot be mistaken for one.
const VMM_GONE: u8 = 0xff;
/// Bytes the frame socket may hold each way; the kernel caps this at
/// `net.core.wmem_max` unless we may force it.
const SOCKET_BUFFER: usize = 4 << 20;

/// Errors setting up the backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} is in use: another backend answers there (remove it if that is stale)", path.display())]
    InUse { path: PathBuf },
    #[error("cannot replace the stale socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen for the VMM on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make the socket pair that carries frames to the stack")]
    SocketPair(#[source] io::Error),
    #[error("cannot make the daemon's private socket (under the temp directory)")]
    Inner(#[source] io::Error),
    #[error("cannot start the vhost-user thread")]
    Thread(#[source] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the device presents itself; `Default` is what slipway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Offer VIRTIO_NET_F_GUEST_CSUM: frames to the guest are marked
    /// DATA_VALID, or for TCP NEEDS_CSUM (the guest's kernel finishes the
    /// checksum, and the stack leaves it undone).
    pub guest_csum: bool,
    /// Offer VIRTIO_NET_F_CSUM: the guest may leave TCP/UDP checksums of the
    /// frames it sends to us (which completes them), and so may use
    /// scatter-gather for large sends.
    pub csum: bool,
    /// Offer TSO both ways (GUEST_TSO4/6 with `guest_csum`, HOST_TSO4/6 and
    /// HOST_ECN with `csum`): TCP segments of up to 64 KiB cross whole, and
    /// TCP to the guest goes with NEEDS_CSUM (the stack leaves the sum).
    /// Off: every frame to the guest is whole and summed by the stack.
    pub tso: bool,
    /// The guest's MTU (what the stack's DHCP tells it): a TCP segment to
    /// the guest past it is marked to be cut to it.
    pub mtu: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            guest_csum: true,
            csum: true,
            tso: true,
            mtu: 65520,
        }
    }
}

/// What the backend has done, over all VMM connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// VMM connections accepted so far.
    pub connections: u64,
    /// Whether a VMM is connected now.
    pub connected: bool,
    /// The virtio features the last VMM acked.
    pub features: u64,
    pub frames_to_guest: u64,
    pub bytes_to_guest: u64,
    pub frames_from_guest: u64,
    pub bytes_from_guest: u64,
    /// The largest frame each way so far: over the MTU plus 14 only with TSO.
    pub largest_frame_to_guest: u64,
    pub largest_frame_from_guest: u64,
    /// Descriptor chains refused (outside guest memory, looping, too long…).
    pub bad_chains: u64,
    /// Frames lost: too big for the guest's buffers, or stale when a VMM left.
    pub dropped_frames: u64,
}

/// State the accept thread shares with the owner.
struct Shared {
    stopping: AtomicBool,
    stop: EventFd,
    /// The connected VMM's session, to cut it on shutdown.
    session: Mutex<Option<ShutdownHandle>>,
    connected: AtomicBool,
    counters: Arc<Counters>,
}

/// A vhost-user-net backend listening on a unix socket; see the module doc.
/// Dropping it disconnects the VMM, stops the threads and removes the socket.
pub struct VhostUserNet {
    path: PathBuf,
    options: Options,
    stack_end: Socket,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserNet {
    /// Listen on `path` (a stale socket file there is replaced) and serve
    /// the VMMs that connect, one at a time, from a thread of its own.
    pub fn listen(path: &Path) -> Result<Self> {
        Self::listen_with(path, Options::default())
    }

    pub fn listen_with(path: &Path, options: Options) -> Result<Self> {
        let listener = bind(path)?;
        let inner = InnerEndpoint::new().map_err(Error::Inner)?;
        let (stack_end, backend_end) = frame_socket_pair().map_err(Error::SocketPair)?;
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            stop: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).map_err(Error::Thread)?,
            session: Mutex::new(None),
            connected: AtomicBool::new(false),
            counters: Arc::new(Counters::default()),
        });
        let backend_end = Arc::new(backend_end);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-accept".into())
            .spawn(move || accept_loop(listener, inner, backend_end, thread_shared, options))
            .map_err(Error::Thread)?;
        Ok(VhostUserNet {
            path: path.to_owned(),
            options,
            stack_end,
            shared,
            thread: Some(thread),
        })
    }

    /// A link for the stack's `Driver`: the same frame socket every time
    /// (a new descriptor on it). Serve one at a time; take a new one after a
    /// `Driver::serve` ended because the VMM left.
    pub fn link(&self) -> io::Result<VhostUserLink> {
        Ok(VhostUserLink {
            sock: self.stack_end.try_clone()?,
            counters: self.shared.counters.clone(),
            offload: self.options.tso,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            connections: get(&c.connections),
            connected: self.shared.connected.load(Ordering::Relaxed),
            features: get(&c.features),
            frames_to_guest: get(&c.frames_to_guest),
            bytes_to_guest: get(&c.bytes_to_guest),
            frames_from_guest: get(&c.frames_from_guest),
            bytes_from_guest: get(&c.bytes_from_guest),
            largest_frame_to_guest: get(&c.largest_to_guest),
            largest_frame_from_guest: get(&c.largest_from_guest),
            bad_chains: get(&c.bad_chains),
            dropped_frames: get(&c.dropped_frames),
        }
    }
}

impl Drop for VhostUserNet {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.shared.stop.write(1);
        if let Some(session) = lock(&self.shared.session).as_ref() {
            session.shutdown();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bind `path`, replacing a socket file nobody answers on.
fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
            path: path.to_owned(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| Error::Listen {
        path: path.to_owned(),
        source,
    })
}

/// Two connected `SOCK_SEQPACKET` ends, non-blocking, with room for a few
/// dozen 64 KiB frames each way where the kernel lets us.
fn frame_socket_pair() -> io::Result<(Socket, Socket)> {
    let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET.nonblocking().cloexec(), None)?;
    for s in [&a, &b] {
        grow_send_buffer(s);
    }
    Ok((a, b))
}

fn grow_send_buffer(s: &Socket) {
    let size = SOCKET_BUFFER as libc::c_int;
    // SAFETY: setsockopt reads one c_int from a valid pointer; SO_SNDBUFFORCE
    // needs CAP_NET_ADMIN and simply fails without it.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        // Capped at net.core.wmem_max; the default still carries ~3 frames.
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
}

/// Where the daemon takes its side of each relayed connection: a socket in
/// a directory only this user can enter, removed with the backend.
struct InnerEndpoint {
    dir: PathBuf,
    path: PathBuf,
    listener: Listener,
}

impl InnerEndpoint {
    fn new() -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mut tries = 0;
        let dir = loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "slipway-vhost-user-{}-{n}-{nanos:x}",
                std::process::id()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
                Err(e) => return Err(e),
            }
        };
        let path = dir.join("daemon.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => Listener::from(l),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        Ok(InnerEndpoint {
            dir,
            path,
            listener,
        })
    }
}

impl Drop for InnerEndpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

const LISTENER_TOKEN: u64 = 1;
const STOP_TOKEN: u64 = 2;

/// Serve VMM connections one after another until told to stop.
fn accept_loop(
    listener: UnixListener,
    mut inner: InnerEndpoint,
    backend_end: Arc<Socket>,
    shared: Arc<Shared>,
    options: Options,
) {
    let epoll = match wait_set(&listener, &shared.stop) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "vhost-user: cannot wait for connections; the backend is down");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "vhost-user: waiting for connections failed; the backend is down");
                return;
            }
        };
        if shared.stopping.load(Ordering::SeqCst)
            || events[..n].iter().any(|e| e.data() == STOP_TOKEN)
        {
            return;
        }
        let vmm = match listener.accept() {
            Ok((vmm, _)) => vmm,
            Err(e) => {
                tracing::warn!(error = %e, "vhost-user: cannot accept the VMM's connection");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match serve_connection(vmm, &mut inner, &backend_end, &shared, options) {
            Ok(()) => tracing::info!("vhost-user: the VMM disconnected; waiting for the next one"),
            Err(e) => tracing::warn!(
                error = %e,
                "vhost-user: the VMM connection ended with an error; waiting for the next one"
            ),
        }
        let stale = drain(&backend_end);
        if stale > 0 {
            bump_dropped(&shared, stale);
        }
        tell_stack_vmm_gone(&backend_end);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

fn wait_set(listener: &UnixListener, stop: &EventFd) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP_TOKEN),
    )?;
    Ok(epoll)
}

/// Why one VMM connection could not be served.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot set up the device")]
    Device(#[source] io::Error),
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot watch the frame socket")]
    Watch(#[source] io::Error),
    #[error("cannot relay the VMM's messages")]
    Relay(#[source] io::Error),
    #[error("{0}")]
    Protocol(String),
}

/// Serve one VMM connection until the VMM goes away. Every connection gets
/// a new daemon and device (vhost-user-backend keeps ownership and ring
/// state per daemon; a new VMM starts over), reached through the relay.
fn serve_connection(
    vmm: UnixStream,
    inner: &mut InnerEndpoint,
    backend_end: &Arc<Socket>,
    shared: &Shared,
    options: Options,
) -> std::result::Result<(), SessionError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let device = Arc::new(
        NetDevice::new(
            backend_end.clone(),
            mem.clone(),
            shared.counters.clone(),
            device::offered_features(options.guest_csum, options.csum, options.tso),
            options.tso.then_some(options.mtu),
        )
        .map_err(SessionError::Device)?,
    );
    let mut daemon = VhostUserDaemon::new("vhost-user-net".into(), device, mem)
        .map_err(|e| SessionError::Daemon(e.to_string()))?;
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(
                backend_end.as_raw_fd(),
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                SOCKET_EVENT,
            )
            .map_err(SessionError::Watch)?;
    }
    // Queue our connection first: the daemon's accept then returns at once.
    let ours = UnixStream::connect(&inner.path).map_err(SessionError::Relay)?;
    daemon
        .start(&mut inner.listener)
        .map_err(|e| SessionError::Daemon(e.to_string()))?;
    let relay = relay::Relay::start(vmm, ours).map_err(SessionError::Relay)?;
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    shared.connected.store(true, Ordering::SeqCst);
    tracing::info!("vhost-user: a VMM connected");
    *lock(&shared.session) = daemon.shutdown_handle();
    // Shut down meanwhile? Then cut this session at once.
    if shared.stopping.load(Ordering::SeqCst) {
        daemon.request_shutdown();
    }
    let ended = daemon.wait();
    *lock(&shared.session) = None;
    shared.connected.store(false, Ordering::SeqCst);
    // Dropping the daemon stops its worker thread and waits for it; the
    // relay ends with the daemon's side of it.
    drop(daemon);
    relay.join();
    match ended {
        // The VMM closed the connection (QEMU quit, was killed, …): normal.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(SessionError::Protocol(e.to_string())),
    }
}

fn bump_dropped(shared: &Shared, n: u64) {
    shared
        .counters
        .dropped_frames
        .fetch_add(n, Ordering::Relaxed);
}

/// Drop what the stack had queued for a guest that is gone.
fn drain(backend_end: &Socket) -> u64 {
    let mut buf = vec![0u8; MAX_FRAME + 1];
    let mut n = 0;
    loop {
        match (&*backend_end).read(&mut buf) {
            Ok(0) => return n,
            Ok(_) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return n,
        }
    }
}

/// Tell the stack its guest is gone, so that it resets the guest's flows.
fn tell_stack_vmm_gone(backend_end: &Socket) {
    for _ in 0..100 {
        match (&*backend_end).write(&[VMM_GONE]) {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "cannot tell the stack that the VMM left");
                return;
            }
        }
    }
    tracing::warn!("the stack does not read its frames: it was not told that the VMM left");
}

/// The stack's end of the frame socket: a [`Link`] for `Driver`. `recv`
/// fails with `ConnectionReset` once each time a VMM disconnects, and with
/// `UnexpectedEof` when the backend is gone.
pub struct VhostUserLink {
    sock: Socket,
    /// The features the VMM acked, for the offloads the stack may use.
    counters: Arc<Counters>,
    /// `Options::tso`: offloads at all.
    offload: bool,
}

// SAFETY: the link owns its descriptor (its own dup of the frame socket)
// for as long as it lives.
unsafe impl Link for VhostUserLink {
    /// The device finished the guest's checksums in software (or checked
    /// them): nothing is left for the stack to trust blindly.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, RxMeta)> {
        loop {
            match (&self.sock).read(buf)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the vhost-user backend is gone",
                    ))
                }
                1 if buf[0] == VMM_GONE => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the VMM disconnected from the vhost-user socket",
                    ))
                }
                n if n < MIN_FRAME => {}
                n => return Ok((n, RxMeta::default())),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte frame (allowed {MIN_FRAME}..={MAX_FRAME})",
                    frame.len()
                ),
            ));
        }
        (&self.sock).write(frame).map(|_| ())
    }

    /// What the connected VMM's guest acked: GUEST_CSUM lets the device send
    /// TCP with NEEDS_CSUM (so the stack leaves the sum), GUEST_TSO4 and
    /// GUEST_TSO6 let it send 64 KiB segments. The driver asks every round,
    /// so a VMM that acks later (or differently after a reconnect) is followed.
    fn offloads(&self) -> netstack::Offloads {
        let hdr = virtq::NetHeader::for_features(self.counters.features.load(Ordering::Relaxed));
        netstack::Offloads {
            tx_checksum: self.offload && hdr.data_valid,
            tso: self.offload && hdr.guest_tso,
        }
    }
}

impl AsRawFd for VhostUserLink {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests;
