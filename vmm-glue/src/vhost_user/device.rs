//! The vhost-user-net device one VMM connection talks to: the features it
//! offers, and the event handling of its one worker thread, which moves
//! frames between the guest's two virtqueues and the frame socket toward
//! the stack. Backpressure both ways: a frame the guest has no buffers for
//! waits in the socket (and the stack's writes push back), a frame the
//! stack is not reading yet leaves the guest's transmit queue untouched.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netstack::wire::{MAX_FRAME, MIN_FRAME};
use socket2::Socket;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::virtq::{
    deliver_frame, kick_when_posted, read_frame, BadChain, Delivery, NetHeader, RxScratch, Span,
    UsedRing,
};
use crate::vnet::HeaderRepr;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// The frame socket's epoll token: past the queues and past the daemon's
/// own exit / queue-enabled token (which is `NUM_QUEUES`).
pub(super) const SOCKET_EVENT: u64 = NUM_QUEUES as u64 + 1;
/// QEMU's virtio-net allows up to 1024 entries with vhost-user (default 256).
const MAX_QUEUE_SIZE: usize = 1024;
/// Frames moved before the guest is told, mid-batch, so it can start on them.
const SIGNAL_EVERY: usize = 64;
/// At most one warning about bad chains per this long (the rest are counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the device offers. No MAC (the VMM owns the guest's address), no
/// MQ, no UDP segmentation. TSO both ways with `tso` (each direction needs
/// its checksum offload): at MTU 65520 frames are 64 KiB anyway, at 1500 it
/// saves the guest cutting and the stack taking every 1460 bytes.
pub(super) fn offered_features(guest_csum: bool, csum: bool, tso: bool) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_F_ANY_LAYOUT
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if guest_csum {
        f |= 1 << VIRTIO_NET_F_GUEST_CSUM;
    }
    if csum {
        f |= 1 << VIRTIO_NET_F_CSUM;
    }
    if tso && guest_csum {
        f |= 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6;
    }
    if tso && csum {
        f |= 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_ECN;
    }
    f
}

/// Counters over the backend's whole life, all connections.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub connections: AtomicU64,
    pub features: AtomicU64,
    pub frames_to_guest: AtomicU64,
    pub bytes_to_guest: AtomicU64,
    pub frames_from_guest: AtomicU64,
    pub bytes_from_guest: AtomicU64,
    pub largest_to_guest: AtomicU64,
    pub largest_from_guest: AtomicU64,
    pub bad_chains: AtomicU64,
    pub dropped_frames: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// What the guest does wrong is logged, but a guest that does it millions
/// of times must not flood the log: the first time, then at most one line
/// per `WARN_EVERY` (with the count of the ones in between).
#[derive(Default)]
struct Complaints {
    last: Option<Instant>,
    suppressed: u64,
}

impl Complaints {
    fn bad_chain(&mut self, counters: &Counters, queue: &'static str, e: BadChain) {
        bump(&counters.bad_chains, 1);
        self.warn(
            queue,
            &e,
            "the guest posted a bad descriptor chain; returned it unused",
        );
    }

    /// A queue the guest set up so that we cannot use it (its rings are
    /// outside guest memory, …): frames wait until it sets it up again.
    fn bad_queue(&mut self, queue: &'static str, e: virtio_queue::Error) {
        self.warn(queue, &e, "the guest's virtqueue is unusable; frames wait");
    }

    fn warn(&mut self, queue: &'static str, e: &dyn std::fmt::Display, what: &'static str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(queue, error = %e, more_since_last = self.suppressed, "{what}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// The worker thread's working state.
struct DataPath {
    /// A frame from the stack waiting for receive buffers.
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    /// The virtio-net header (without `num_buffers`) of the frame in `rx_buf`.
    rx_base: HeaderRepr,
    rx_ring: UsedRing,
    rx_scratch: RxScratch,
    /// A frame from the guest waiting for room in the socket.
    tx_buf: Vec<u8>,
    tx_len: Option<usize>,
    tx_ring: UsedRing,
    tx_spans: Vec<Span>,
    tx_used: Vec<(u16, u32)>,
    log: Complaints,
}

/// One connection's device. A new VMM connection gets a new one (the
/// daemon's state is per connection); the frame socket and the counters
/// carry over.
pub(super) struct NetDevice {
    sock: Arc<Socket>,
    offered: u64,
    /// With offloads, the guest's MTU: TCP goes with NEEDS_CSUM and, past
    /// the MTU, marked for segmentation. Without, frames go as they are.
    offload_mtu: Option<usize>,
    acked: AtomicU64,
    mem: Mutex<GuestMemoryAtomic<GuestMemoryMmap>>,
    path: Mutex<DataPath>,
    counters: Arc<Counters>,
    /// Handed to the daemon's worker once; it stops the worker on disconnect.
    exit: Mutex<Option<(EventConsumer, EventNotifier)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the data path down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Sent {
    Yes,
    /// The socket is full: keep the frame, wait for EPOLLOUT.
    Full,
    /// Lost (counted); go on.
    Dropped,
}

impl NetDevice {
    pub(super) fn new(
        sock: Arc<Socket>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        counters: Arc<Counters>,
        offered: u64,
        offload_mtu: Option<usize>,
    ) -> io::Result<Self> {
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok(NetDevice {
            sock,
            offered,
            offload_mtu,
            acked: AtomicU64::new(0),
            mem: Mutex::new(mem),
            path: Mutex::new(DataPath {
                rx_buf: vec![0; MAX_FRAME + 1],
                rx_len: None,
                rx_base: HeaderRepr::PLAIN,
                rx_ring: UsedRing::default(),
                rx_scratch: RxScratch::default(),
                tx_buf: vec![0; MAX_FRAME],
                tx_len: None,
                tx_ring: UsedRing::default(),
                tx_spans: Vec::new(),
                tx_used: Vec::new(),
                log: Complaints::default(),
            }),
            counters,
            exit: Mutex::new(Some(exit)),
        })
    }

    fn header(&self) -> NetHeader {
        NetHeader::for_features(self.acked.load(Ordering::Relaxed))
    }

    /// The next frame from the stack, or None when there is none now.
    fn recv_frame(&self, buf: &mut [u8]) -> Option<usize> {
        loop {
            match (&*self.sock).read(buf) {
                // The stack's end is closed: slipway is shutting down.
                Ok(0) => return None,
                Ok(n) if !(MIN_FRAME..=MAX_FRAME).contains(&n) => {
                    bump(&self.counters.dropped_frames, 1);
                    tracing::debug!(
                        len = n,
                        "dropped a frame from the stack of a size no guest takes"
                    );
                }
                Ok(n) => return Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the frame socket failed");
                    return None;
                }
            }
        }
    }

    fn send_frame(&self, frame: &[u8]) -> Sent {
        loop {
            match (&*self.sock).write(frame) {
                Ok(_) => {
                    bump(&self.counters.frames_from_guest, 1);
                    bump(&self.counters.bytes_from_guest, frame.len() as u64);
                    self.counters
                        .largest_from_guest
                        .fetch_max(frame.len() as u64, Ordering::Relaxed);
                    return Sent::Yes;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Sent::Full,
                Err(e) => {
                    bump(&self.counters.dropped_frames, 1);
                    tracing::debug!(error = %e, len = frame.len(), "the frame socket refused a guest frame");
                    return Sent::Dropped;
                }
            }
        }
    }

    /// Stack → guest: frames from the socket into the receive queue, until
    /// either runs dry.
    fn pump_rx(&self, vring: &VringRwLock) {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            // The socket keeps the frames; the queue's enable event brings us back.
            return;
        }
        let atomic = lock(&self.mem).clone();
        let mem = atomic.memory();
        let hdr = self.header();
        let mut path = lock(&self.path);
        let DataPath {
            rx_buf,
            rx_len,
            rx_base,
            rx_ring,
            rx_scratch,
            log,
            ..
        } = &mut *path;
        // Kicks for new receive buffers only matter when we run out.
        let _ = state.get_queue_mut().disable_notification(&*mem);
        let mut moved = 0usize;
        loop {
            let len = match *rx_len {
                Some(n) => n,
                None => match self.recv_frame(rx_buf) {
                    Some(n) => match hdr.for_frame(&mut rx_buf[..n], self.offload_mtu) {
                        Some(base) => {
                            *rx_base = base;
                            n
                        }
                        None => {
                            bump(&self.counters.dropped_frames, 1);
                            tracing::debug!(
                                len = n,
                                "a TCP segment over the MTU for a guest without TSO: dropped"
                            );
                            continue;
                        }
                    },
                    None => break,
                },
            };
            *rx_len = Some(len);
            let queue: &mut Queue = state.get_queue_mut();
            let outcome = deliver_frame(
                queue,
                &mem,
                hdr,
                rx_base,
                &rx_buf[..len],
                rx_ring,
                rx_scratch,
                &mut |e| log.bad_chain(&self.counters, "rx", e),
            );
            match outcome {
                Ok(Delivery::Delivered { .. }) => {
                    *rx_len = None;
                    moved += 1;
                    bump(&self.counters.frames_to_guest, 1);
                    bump(&self.counters.bytes_to_guest, len as u64);
                    self.counters
                        .largest_to_guest
                        .fetch_max(len as u64, Ordering::Relaxed);
                }
                Ok(Delivery::TooBig) => {
                    *rx_len = None;
                    bump(&self.counters.dropped_frames, 1);
                    tracing::debug!(
                        len,
                        "a frame larger than the guest's receive buffer (no mergeable buffers): dropped"
                    );
                }
                Ok(Delivery::NoRoom { seen_avail }) => {
                    match kick_when_posted(queue, &mem, seen_avail) {
                        // More buffers came while we looked: go again.
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            log.bad_queue("rx", e);
                            break;
                        }
                    }
                }
                Err(e) => {
                    log.bad_queue("rx", e);
                    break;
                }
            }
            if moved.is_multiple_of(SIGNAL_EVERY) {
                self.signal_if_wanted(&state, rx_ring, &mem);
            }
        }
        self.signal_if_wanted(&state, rx_ring, &mem);
    }

    /// Interrupt the guest for what was published, if it wants one.
    fn signal_if_wanted(&self, state: &VringState, ring: &mut UsedRing, mem: &GuestMemoryMmap) {
        // An unreadable suppression field: signal, a spurious interrupt is harmless.
        if ring.needs_signal(state.get_queue(), mem).unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                tracing::debug!(error = %e, "cannot signal the guest");
            }
        }
    }

    /// Guest → stack: frames from the transmit queue into the socket, until
    /// the queue is empty or the socket full.
    fn pump_tx(&self, vring: &VringRwLock) {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let atomic = lock(&self.mem).clone();
        let mem = atomic.memory();
        let hdr = self.header();
        let mut path = lock(&self.path);
        let DataPath {
            tx_buf,
            tx_len,
            tx_ring,
            tx_spans,
            tx_used,
            log,
            ..
        } = &mut *path;
        if let Some(n) = *tx_len {
            match self.send_frame(&tx_buf[..n]) {
                Sent::Full => return,
                Sent::Yes | Sent::Dropped => *tx_len = None,
            }
        }
        let queue: &mut Queue = state.get_queue_mut();
        let size = queue.size();
        let mut signal = false;
        let mut full = false;
        loop {
            let _ = queue.disable_notification(&*mem);
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                if head >= size {
                    log.bad_chain(
                        &self.counters,
                        "tx",
                        BadChain::HeadOutOfRange { head, size },
                    );
                    continue;
                }
                // The frame is copied out, so the chain goes back either way.
                tx_used.push((head, 0));
                match read_frame(chain, &mem, hdr, tx_buf, tx_spans) {
                    Ok(n) => match self.send_frame(&tx_buf[..n]) {
                        Sent::Yes | Sent::Dropped => {}
                        Sent::Full => {
                            *tx_len = Some(n);
                            full = true;
                        }
                    },
                    Err(e) => log.bad_chain(&self.counters, "tx", e),
                }
                if tx_used.len() >= SIGNAL_EVERY || full {
                    if let Err(e) = tx_ring.publish(queue, &mem, tx_used) {
                        log.bad_queue("tx", e);
                    }
                    tx_used.clear();
                    signal |= tx_ring.needs_signal(queue, &mem).unwrap_or(true);
                }
                if full {
                    break;
                }
            }
            if let Err(e) = tx_ring.publish(queue, &mem, tx_used) {
                log.bad_queue("tx", e);
            }
            tx_used.clear();
            signal |= tx_ring.needs_signal(queue, &mem).unwrap_or(true);
            if full {
                // EPOLLOUT on the socket brings us back.
                break;
            }
            match queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log.bad_queue("tx", e);
                    break;
                }
            }
        }
        if signal {
            let _ = state.signal_used_queue();
        }
    }
}

impl VhostUserBackend for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        self.counters.features.store(features, Ordering::Relaxed);
        let hdr = NetHeader::for_features(features);
        tracing::info!(
            features = format_args!("{features:#x}"),
            version_1 = features & (1 << VIRTIO_F_VERSION_1) != 0,
            mergeable_rx = hdr.mergeable,
            event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            indirect = features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0,
            guest_csum = hdr.data_valid,
            csum = features & (1 << VIRTIO_NET_F_CSUM) != 0,
            guest_tso = hdr.guest_tso,
            host_tso = hdr.host_tso,
            "the VMM acked vhost-user-net features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The daemon sets it on each queue, which is where it is read.
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *lock(&self.mem) = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        lock(&self.exit).take()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let [rx, tx] = vrings else {
            return Ok(());
        };
        match device_event {
            RX_QUEUE => self.pump_rx(rx),
            TX_QUEUE => self.pump_tx(tx),
            e if u64::from(e) == SOCKET_EVENT => {
                if evset.contains(EventSet::IN) {
                    self.pump_rx(rx);
                }
                if evset.contains(EventSet::OUT) {
                    self.pump_tx(tx);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl AsRawFd for NetDevice {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}
