//! The vhost-user-net data path against a hostile driver: descriptor tables,
//! available rings, virtio-net headers and guest bytes all come from the
//! fuzzer, on virtio-queue's driver-side mock over real (mmap) guest memory
//! with a hole in it. The device side is `vmm_glue`'s own `virtq`: transmit
//! chains read with `read_frame`, frames from the stack delivered with
//! `NetHeader::for_frame` + `deliver_frame`, used rings published, kicks
//! armed, the way `vhost_user::device` does it.
//!
//! Promises checked besides "no panic": the device writes guest memory only
//! inside buffers the driver marked device-writable (its descriptor table or
//! an indirect table it points at) and its own used ring, never anywhere
//! else, and never while transmitting; a transmitted frame is exactly the
//! bytes of the chain's spans after the header (its checksum completed when
//! the header asks), every span inside guest memory; a delivered frame
//! fills exactly header + frame bytes across as many buffers as its
//! `num_buffers` says.

use arbitrary::{Arbitrary, Unstructured};
use netstack::wire::{MAX_FRAME, MIN_FRAME};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_glue::vhost_user::virtq::{
    deliver_frame, kick_when_posted, read_frame, Delivery, NetHeader, RxScratch, UsedRing,
};
use vmm_glue::vnet::{self, Gso, HeaderPacket, HeaderRepr};

use super::input::{Bytes, List};

/// Both queues' rings live here: the receive queue's at 0, the transmit
/// queue's at `TX_RING`.
pub const RING_LEN: u64 = 0x2000;
pub const TX_RING: u64 = 0x1000;
/// No memory between the rings and the data region.
pub const HOLE: u64 = RING_LEN;
/// Buffers, headers and indirect tables: room for a 64 KiB frame.
pub const DATA: u64 = 0x4000;
pub const DATA_LEN: u64 = 0x2_0000;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Feature bits the input picks from (virtio 1.x numbering).
const VERSION_1: u64 = 1 << 32;
const MRG_RXBUF: u64 = 1 << 15;
const GUEST_CSUM: u64 = 1 << 1;
const GUEST_TSO4: u64 = 1 << 7;
const GUEST_TSO6: u64 = 1 << 8;
const HOST_TSO4: u64 = 1 << 11;

#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Bit 0 VERSION_1, 1 MRG_RXBUF, 2 GUEST_CSUM, 3 GUEST_TSO4+6, 4
    /// HOST_TSO4, 5 EVENT_IDX.
    pub features: u8,
    /// Queue size `1 << (size_log2 % 7)`: 1 to 64 entries.
    pub size_log2: u8,
    /// The guest's MTU for offloads: `576 + mtu % 65000`.
    pub mtu: u16,
    pub steps: List<Step>,
}

#[derive(Arbitrary, Debug)]
pub enum Step {
    /// The driver writes one descriptor (index modulo the queue size).
    Desc { tx: bool, index: u8, desc: Desc },
    /// The driver puts `head` (any value) in the available ring.
    Post { tx: bool, head: u16 },
    /// The driver sets the available index to anything.
    AvailIdx { tx: bool, idx: u16 },
    /// The driver writes bytes into the data region (headers, frames,
    /// indirect tables), at `at` modulo its size.
    Write { at: u32, bytes: Bytes },
    /// The device takes up to `budget` transmit chains.
    Take { budget: u8 },
    /// The stack hands the device a frame for the guest.
    Deliver { frame: Frame, offload: bool },
    /// The queue is set up again (the device's indices back to 0).
    Reset { tx: bool },
    /// The driver writes `descs` from index `at` on, each `NEXT` the one
    /// after it except the last, and posts the first.
    Chain { tx: bool, at: u8, descs: List<Desc> },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Desc {
    pub addr: Addr,
    pub len: Len,
    /// Low three bits: NEXT, WRITE, INDIRECT.
    pub flags: u8,
    pub next: u16,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// In the data region.
    Data(u32),
    /// Into the rings themselves.
    Ring(u16),
    /// In the hole between rings and data.
    Hole(u16),
    /// Up to 4 KiB before the end of guest memory (straddles with a length).
    End(u16),
    /// Anything at all.
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u16),
    Big(u32),
}

#[derive(Arbitrary, Debug)]
pub enum Frame {
    /// `len` bytes (at least an Ethernet header) of `fill`.
    Raw { len: u16, fill: u8 },
    /// The largest frame.
    Max,
    /// An Ethernet frame around a TCP segment (checksummed), which the
    /// offload path marks NEEDS_CSUM and past the MTU for TSO.
    Tcp { v6: bool, payload: u16, fill: u8 },
}

impl Addr {
    fn resolve(self) -> u64 {
        match self {
            Addr::Data(off) => DATA + u64::from(off) % DATA_LEN,
            Addr::Ring(off) => u64::from(off) % RING_LEN,
            Addr::Hole(off) => HOLE + u64::from(off) % (DATA - HOLE),
            Addr::End(back) => DATA + DATA_LEN - 1 - u64::from(back % 4096),
            Addr::Raw(a) => a,
        }
    }
}

impl Desc {
    fn raw(self, next_override: Option<(bool, u16)>) -> RawDescriptor {
        let len = match self.len {
            Len::Small(n) => u32::from(n),
            Len::Big(n) => n,
        };
        let mut flags = u16::from(self.flags & 7);
        let mut next = self.next;
        if let Some((more, to)) = next_override {
            flags &= !VRING_DESC_F_NEXT;
            if more {
                flags |= VRING_DESC_F_NEXT;
            }
            next = to;
        }
        RawDescriptor::from(SplitDescriptor::new(self.addr.resolve(), len, flags, next))
    }
}

/// Guest memory as the fuzzer sees it: the ring region and the data region,
/// flattened, with a mask of the bytes the device may write.
struct Image {
    bytes: Vec<u8>,
    writable: Vec<bool>,
}

const REGIONS: [(u64, u64); 2] = [(0, RING_LEN), (DATA, DATA_LEN)];

impl Image {
    fn of(mem: &GuestMemoryMmap) -> Image {
        let mut bytes = Vec::with_capacity((RING_LEN + DATA_LEN) as usize);
        for (start, len) in REGIONS {
            let mut part = vec![0u8; len as usize];
            mem.read_slice(&mut part, GuestAddress(start))
                .expect("the regions are guest memory");
            bytes.extend_from_slice(&part);
        }
        let writable = vec![false; bytes.len()];
        Image { bytes, writable }
    }

    /// Mark `[addr, addr + len)` writable, wherever it meets memory.
    fn allow(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        let mut base = 0usize;
        for (start, rlen) in REGIONS {
            let (lo, hi) = (addr.max(start), end.min(start + rlen));
            if lo < hi {
                let (lo, hi) = ((lo - start) as usize + base, (hi - start) as usize + base);
                self.writable[lo..hi].fill(true);
            }
            base += rlen as usize;
        }
    }

    fn guest_address(&self, at: usize) -> u64 {
        let mut base = 0usize;
        for (start, rlen) in REGIONS {
            if at < base + rlen as usize {
                return start + (at - base) as u64;
            }
            base += rlen as usize;
        }
        u64::MAX
    }

    /// Every byte that changed since this image was taken was writable.
    fn check_writes(&self, mem: &GuestMemoryMmap, what: &str) {
        let now = Image::of(mem);
        const CHUNK: usize = 256;
        // Whole chunks compare fast; only a changed one is looked into.
        let chunks = self.bytes.chunks(CHUNK).zip(now.bytes.chunks(CHUNK));
        for (c, (old, new)) in chunks.enumerate() {
            if old == new {
                continue;
            }
            for (i, (o, n)) in old.iter().zip(new).enumerate() {
                let at = c * CHUNK + i;
                if o != n && !self.writable[at] {
                    panic!(
                        "{what}: the device wrote guest memory at {:#x}, outside any device-writable buffer or its used ring",
                        self.guest_address(at)
                    );
                }
            }
        }
    }
}

/// One side's queue: the driver's mock and the device's state.
struct Side<'m> {
    mock: MockSplitQueue<'m, GuestMemoryMmap>,
    queue: Queue,
    ring: UsedRing,
    /// The driver's next available-ring slot.
    posted: u16,
}

impl<'m> Side<'m> {
    fn new(mem: &'m GuestMemoryMmap, at: u64, size: u16, event_idx: bool) -> Side<'m> {
        let mock = MockSplitQueue::create(mem, GuestAddress(at), size);
        let mut queue: Queue = mock.create_queue().expect("a valid queue layout");
        queue.set_event_idx(event_idx);
        Side {
            mock,
            queue,
            ring: UsedRing::default(),
            posted: 0,
        }
    }

    fn size(&self) -> u16 {
        self.queue.size()
    }

    fn store(&self, index: u16, desc: RawDescriptor) {
        let _ = self.mock.desc_table().store(index % self.size(), desc);
    }

    fn post(&mut self, head: u16) {
        let slot = usize::from(self.posted % self.size());
        if let Ok(r) = self.mock.avail().ring().ref_at(slot) {
            r.store(u16::to_le(head));
        }
        self.posted = self.posted.wrapping_add(1);
        self.mock.avail().idx().store(u16::to_le(self.posted));
    }

    /// The used ring with the avail_event after it: the device's own.
    fn allow_used_ring(&self, image: &mut Image) {
        let used = self.mock.used_addr().0;
        image.allow(used, 4 + 8 * u64::from(self.size()) + 2);
    }

    /// What the driver marked device-writable: direct descriptors with
    /// WRITE, and WRITE entries of any indirect table the table points at.
    fn allow_buffers(&self, mem: &GuestMemoryMmap, image: &mut Image) {
        for i in 0..self.size() {
            let Ok(raw) = self.mock.desc_table().load(i) else {
                continue;
            };
            let d = SplitDescriptor::from(raw);
            if d.flags() & VRING_DESC_F_INDIRECT != 0 {
                let entries = (d.len() / 16).min(4096);
                for e in 0..u64::from(entries) {
                    let mut b = [0u8; 16];
                    let Some(at) = d.addr().0.checked_add(16 * e) else {
                        break;
                    };
                    if mem.read_slice(&mut b, GuestAddress(at)).is_err() {
                        break;
                    }
                    let addr = u64::from_le_bytes(b[0..8].try_into().unwrap());
                    let len = u32::from_le_bytes(b[8..12].try_into().unwrap());
                    let flags = u16::from_le_bytes([b[12], b[13]]);
                    if flags & VRING_DESC_F_WRITE != 0 {
                        image.allow(addr, u64::from(len));
                    }
                }
            } else if d.flags() & VRING_DESC_F_WRITE != 0 {
                image.allow(d.addr().0, u64::from(d.len()));
            }
        }
    }

    /// The writable spans of the direct chain at each head, as the table
    /// says before the device touches anything; None where the chain is
    /// indirect, leaves the table, loops or is not all device-writable.
    fn chains(&self) -> Vec<Option<Vec<(u64, u64)>>> {
        (0..self.size())
            .map(|head| {
                let mut spans = Vec::new();
                let mut i = head;
                for _ in 0..self.size() {
                    let d = SplitDescriptor::from(self.mock.desc_table().load(i).ok()?);
                    let f = d.flags();
                    if f & VRING_DESC_F_INDIRECT != 0 || f & VRING_DESC_F_WRITE == 0 {
                        return None;
                    }
                    if d.len() > 0 {
                        spans.push((d.addr().0, u64::from(d.len())));
                    }
                    if f & VRING_DESC_F_NEXT == 0 {
                        return Some(spans);
                    }
                    i = d.next();
                    if i >= self.size() {
                        return None;
                    }
                }
                None
            })
            .collect()
    }

    fn used_entries(&self, from: u16, to: u16) -> Option<Vec<(u32, u32)>> {
        let count = to.wrapping_sub(from);
        if count > self.size() {
            // Entries wrapped over each other: nothing left to check.
            return None;
        }
        (0..count)
            .map(|k| {
                let slot = usize::from(from.wrapping_add(k) % self.size());
                let e = self.mock.used().ring().ref_at(slot).ok()?.load();
                Some((e.id(), e.len()))
            })
            .collect()
    }
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary(&mut u) else {
        return;
    };

    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), RING_LEN as usize),
        (GuestAddress(DATA), DATA_LEN as usize),
    ])
    .expect("guest memory");
    let f = input.features;
    let has = |bit: u8| f & (1 << bit) != 0;
    let mut acked = 0u64;
    for (bit, feature) in [
        (0, VERSION_1),
        (1, MRG_RXBUF),
        (2, GUEST_CSUM),
        (3, GUEST_TSO4 | GUEST_TSO6),
        (4, HOST_TSO4),
    ] {
        if has(bit) {
            acked |= feature;
        }
    }
    let hdr = NetHeader::for_features(acked);
    let size = 1u16 << (input.size_log2 % 7);
    let mtu = 576 + usize::from(input.mtu) % 65000;
    let mut rx = Side::new(&mem, 0, size, has(5));
    let mut tx = Side::new(&mem, TX_RING, size, has(5));
    let mut tx_buf = vec![0u8; MAX_FRAME];
    let mut spans = Vec::new();
    let mut scratch = RxScratch::default();

    for step in input.steps.iter() {
        match step {
            Step::Desc { tx: t, index, desc } => {
                let side = if *t { &tx } else { &rx };
                side.store(u16::from(*index), desc.raw(None));
            }
            Step::Post { tx: t, head } => {
                let side = if *t { &mut tx } else { &mut rx };
                side.post(*head);
            }
            Step::AvailIdx { tx: t, idx } => {
                let side = if *t { &mut tx } else { &mut rx };
                side.posted = *idx;
                side.mock.avail().idx().store(u16::to_le(*idx));
            }
            Step::Write { at, bytes } => {
                let at = u64::from(*at) % DATA_LEN;
                let n = bytes.len().min((DATA_LEN - at) as usize);
                mem.write_slice(&bytes[..n], GuestAddress(DATA + at))
                    .expect("inside the data region");
            }
            Step::Chain { tx: t, at, descs } => {
                let side = if *t { &mut tx } else { &mut rx };
                let first = u16::from(*at) % side.size();
                for (k, d) in descs.iter().enumerate() {
                    let i = first.wrapping_add(k as u16) % side.size();
                    let last = k + 1 == descs.len();
                    let next = i.wrapping_add(1) % side.size();
                    side.store(i, d.raw(Some((!last, next))));
                }
                if !descs.is_empty() {
                    side.post(first);
                }
            }
            Step::Reset { tx: t } => {
                let side = if *t { &mut tx } else { &mut rx };
                let mut queue: Queue = side.mock.create_queue().expect("a valid queue layout");
                queue.set_event_idx(has(5));
                side.queue = queue;
            }
            Step::Take { budget } => take(&mem, &mut tx, hdr, *budget, &mut tx_buf, &mut spans),
            Step::Deliver { frame, offload } => {
                let mut frame = build(frame);
                let offload_mtu = offload.then_some(mtu);
                let Some(base) = hdr.for_frame(&mut frame, offload_mtu) else {
                    assert!(
                        !hdr.guest_tso && offload_mtu.is_some(),
                        "only a TSO frame for a guest without GUEST_TSO is dropped"
                    );
                    continue;
                };
                check_base(&base, hdr, &frame);
                deliver(&mem, &mut rx, hdr, &base, &frame, &mut scratch);
            }
        }
    }
}

fn build(frame: &Frame) -> Vec<u8> {
    match *frame {
        Frame::Raw { len, fill } => vec![fill; usize::from(len).max(MIN_FRAME)],
        Frame::Max => vec![0x5a; MAX_FRAME],
        Frame::Tcp { v6, payload, fill } => {
            let bytes = vec![fill; usize::from(payload) + 1];
            super::vnet::segment(v6, &bytes)
        }
    }
}

/// The header chosen for a frame to the guest says only what was negotiated.
fn check_base(base: &HeaderRepr, hdr: NetHeader, frame: &[u8]) {
    assert_eq!(base.num_buffers, None);
    if base.gso != Gso::None {
        assert!(hdr.guest_tso, "TSO without GUEST_TSO: {base}");
    }
    if let Some(c) = base.partial_csum {
        assert!(hdr.data_valid, "NEEDS_CSUM without GUEST_CSUM: {base}");
        let field = usize::from(c.start) + usize::from(c.offset);
        assert!(field + 2 <= frame.len(), "checksum past the frame: {base}");
    }
}

/// The device's transmit pump: chains out, each back on the used ring.
fn take(
    mem: &GuestMemoryMmap,
    tx: &mut Side<'_>,
    hdr: NetHeader,
    budget: u8,
    buf: &mut [u8],
    spans: &mut Vec<vmm_glue::vhost_user::virtq::Span>,
) {
    let mut image = Image::of(mem);
    tx.allow_used_ring(&mut image);
    let size = tx.size();
    let mut used = Vec::new();
    for _ in 0..budget {
        let Some(chain) = tx.queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        if head >= size {
            continue;
        }
        used.push((head, 0));
        if let Ok(n) = read_frame(chain, mem, hdr, buf, spans) {
            check_tx_frame(mem, hdr, &buf[..n], spans);
        }
    }
    let _ = tx.ring.publish(&mut tx.queue, mem, &used);
    let _ = tx.ring.needs_signal(&tx.queue, mem);
    image.check_writes(mem, "transmit");
}

/// A frame read off a chain is the chain's bytes after the header, read
/// here independently from the spans, with the checksum the header asked
/// for completed.
fn check_tx_frame(
    mem: &GuestMemoryMmap,
    hdr: NetHeader,
    frame: &[u8],
    spans: &[vmm_glue::vhost_user::virtq::Span],
) {
    assert!((MIN_FRAME..=MAX_FRAME).contains(&frame.len()));
    let mut chain = Vec::new();
    for s in spans {
        assert!(
            GuestMemoryBackend::check_range(mem, s.addr(), s.len()),
            "a span outside guest memory: {s:?}"
        );
        let mut part = vec![0u8; s.len()];
        mem.read_slice(&mut part, s.addr()).expect("checked");
        chain.extend_from_slice(&part);
    }
    assert_eq!(
        chain.len(),
        hdr.len + frame.len(),
        "header + frame != chain"
    );
    let packet = HeaderPacket::new_checked(&chain[..hdr.len]).expect("a whole header");
    let repr = HeaderRepr::parse(&packet).expect("read_frame took a header parse refuses");
    if repr.gso != Gso::None {
        assert!(hdr.host_tso, "a GSO frame taken without HOST_TSO");
    }
    let mut want = chain[hdr.len..].to_vec();
    if let Some(c) = repr.partial_csum {
        let start = usize::from(c.start);
        let field = start + usize::from(c.offset);
        assert!(field + 2 <= want.len(), "checksum completed past the frame");
        let sum = !vnet::fold(vnet::ones_sum(&want[start..]));
        let sum = if sum == 0 { 0xffff } else { sum };
        want[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    }
    assert!(want == frame, "the frame read is not the chain's bytes");
}

/// What the guest reads back from the used buffers is the header (with
/// `num_buffers`) and the frame, byte for byte, when the buffers are plain
/// chains that overlap neither each other nor the rings.
fn check_received(
    mem: &GuestMemoryMmap,
    hdr: NetHeader,
    base: &HeaderRepr,
    frame: &[u8],
    filled: &[&(u32, u32)],
    chains: &[Option<Vec<(u64, u64)>>],
    buffers: u16,
) {
    let mut used_spans: Vec<(u64, u64)> = Vec::new();
    let mut per_entry = Vec::new();
    for &&(id, len) in filled {
        let Some(Some(spans)) = chains.get(id as usize) else {
            return;
        };
        let mut left = u64::from(len);
        let mut taken = Vec::new();
        for &(addr, n) in spans {
            if left == 0 {
                break;
            }
            let n = n.min(left);
            taken.push((addr, n));
            left -= n;
        }
        if left > 0 {
            panic!("used entry {id} says {len} bytes, more than its chain holds");
        }
        used_spans.extend_from_slice(&taken);
        per_entry.push(taken);
    }
    let overlaps = |a: (u64, u64), b: (u64, u64)| {
        a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
    };
    for (k, &a) in used_spans.iter().enumerate() {
        if overlaps(a, (0, RING_LEN)) || used_spans[k + 1..].iter().any(|&b| overlaps(a, b)) {
            return;
        }
    }
    let mut got = Vec::new();
    for (addr, n) in per_entry.into_iter().flatten() {
        let mut part = vec![0u8; n as usize];
        mem.read_slice(&mut part, GuestAddress(addr))
            .expect("a used buffer lies in guest memory");
        got.extend_from_slice(&part);
    }
    let header = HeaderRepr {
        num_buffers: (hdr.len == vnet::HDR_LEN_MRG).then_some(buffers),
        ..*base
    };
    let mut want = header.to_bytes()[..hdr.len].to_vec();
    want.extend_from_slice(frame);
    assert!(
        got == want,
        "the guest reads back something else than header + frame"
    );
}

/// The device's receive pump for one frame.
fn deliver(
    mem: &GuestMemoryMmap,
    rx: &mut Side<'_>,
    hdr: NetHeader,
    base: &HeaderRepr,
    frame: &[u8],
    scratch: &mut RxScratch,
) {
    let mut image = Image::of(mem);
    rx.allow_used_ring(&mut image);
    rx.allow_buffers(mem, &mut image);
    let chains = rx.chains();
    let before = rx.queue.next_used();
    let outcome = deliver_frame(
        &mut rx.queue,
        mem,
        hdr,
        base,
        frame,
        &mut rx.ring,
        scratch,
        &mut |_| {},
    );
    let after = rx.queue.next_used();
    let entries = rx.used_entries(before, after);
    match outcome {
        Ok(Delivery::Delivered { buffers }) => {
            if !hdr.mergeable {
                assert_eq!(buffers, 1, "several buffers without MRG_RXBUF");
            }
            if let Some(entries) = entries {
                let filled: Vec<_> = entries.iter().filter(|e| e.1 > 0).collect();
                assert_eq!(filled.len(), usize::from(buffers), "{entries:?}");
                let bytes: u64 = filled.iter().map(|e| u64::from(e.1)).sum();
                assert_eq!(bytes, (hdr.len + frame.len()) as u64, "{entries:?}");
                check_received(mem, hdr, base, frame, &filled, &chains, buffers);
            }
        }
        Ok(Delivery::NoRoom { seen_avail }) => {
            if let Some(entries) = entries {
                assert!(
                    entries.iter().all(|e| e.1 == 0),
                    "no room, yet bytes were handed over: {entries:?}"
                );
            }
            let _ = kick_when_posted(&mut rx.queue, mem, seen_avail);
        }
        Ok(Delivery::TooBig) => assert!(!hdr.mergeable, "TooBig with mergeable buffers"),
        Err(_) => {}
    }
    let _ = rx.ring.needs_signal(&rx.queue, mem);
    image.check_writes(mem, "receive");
}
