//! Chains a hostile or buggy driver might post, built with virtio-queue's
//! driver-side mock, and frames that must cross intact.

use super::*;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;

const MEM_SIZE: usize = 16 << 20;
/// Where test buffers live, well past the queue's own rings.
const DATA: u64 = 0x10_0000;
const QUEUE_SIZE: u16 = 64;

const MERGEABLE: NetHeader = NetHeader {
    len: 12,
    mergeable: true,
    data_valid: false,
    guest_tso: false,
    host_tso: false,
};

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// A transmit chain: header in one descriptor, the frame in `pieces`.
fn tx_chain(mem: &GuestMemoryMmap, f: &[u8], pieces: usize, at: u16) -> Vec<RawDescriptor> {
    mem.write_slice(&[0u8; 12], GuestAddress(DATA)).unwrap();
    let mut descs = vec![desc(DATA, 12, VRING_DESC_F_NEXT, at + 1)];
    let step = f.len().div_ceil(pieces);
    for (i, piece) in f.chunks(step).enumerate() {
        let addr = DATA + 0x1000 + (i * 0x1_0000) as u64;
        mem.write_slice(piece, GuestAddress(addr)).unwrap();
        descs.push(desc(
            addr,
            piece.len() as u32,
            VRING_DESC_F_NEXT,
            at + 2 + i as u16,
        ));
    }
    let last = descs.last_mut().unwrap();
    let d = SplitDescriptor::from(*last);
    *last = desc(d.addr().0, d.len(), 0, 0);
    descs
}

fn take_tx(
    mem: &GuestMemoryMmap,
    mq: &MockSplitQueue<GuestMemoryMmap>,
) -> Result<Vec<u8>, BadChain> {
    take_tx_with(mem, mq, MERGEABLE)
}

fn take_tx_with(
    mem: &GuestMemoryMmap,
    mq: &MockSplitQueue<GuestMemoryMmap>,
    hdr: NetHeader,
) -> Result<Vec<u8>, BadChain> {
    let mut q: Queue = mq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(mem).expect("a chain is posted");
    let mut buf = vec![0; MAX_FRAME];
    let mut spans = Vec::new();
    let n = read_frame(chain, mem, hdr, &mut buf, &mut spans)?;
    buf.truncate(n);
    Ok(buf)
}

#[test]
fn tx_frame_is_reassembled_without_its_header() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let f = frame(9000);
    mq.add_desc_chains(&tx_chain(&mem, &f, 3, 0), 0).unwrap();
    assert_eq!(take_tx(&mem, &mq).unwrap(), f);
}

#[test]
fn tx_largest_frame_fits_and_one_byte_more_does_not() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let f = frame(MAX_FRAME);
    mq.add_desc_chains(&tx_chain(&mem, &f, 2, 0), 0).unwrap();
    assert_eq!(take_tx(&mem, &mq).unwrap().len(), MAX_FRAME);

    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mq.add_desc_chains(&tx_chain(&mem, &frame(MAX_FRAME + 1), 2, 0), 0)
        .unwrap();
    assert_eq!(
        take_tx(&mem, &mq),
        Err(BadChain::TooLong {
            limit: 12 + MAX_FRAME
        })
    );
}

#[test]
fn tx_descriptor_outside_guest_memory_is_refused() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let outside = MEM_SIZE as u64 + 0x1000;
    mq.add_desc_chains(
        &[
            desc(DATA, 12, VRING_DESC_F_NEXT, 1),
            desc(outside, 1500, 0, 0),
        ],
        0,
    )
    .unwrap();
    assert_eq!(
        take_tx(&mem, &mq),
        Err(BadChain::OutsideMemory {
            addr: outside,
            len: 1500
        })
    );
}

#[test]
fn tx_descriptor_straddling_the_end_of_memory_is_refused() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let addr = MEM_SIZE as u64 - 100;
    mq.add_desc_chains(&[desc(addr, 1500, 0, 0)], 0).unwrap();
    assert!(matches!(
        take_tx(&mem, &mq),
        Err(BadChain::OutsideMemory { .. })
    ));
}

#[test]
fn tx_descriptor_whose_address_wraps_is_refused() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mq.add_desc_chains(&[desc(u64::MAX - 10, 1500, 0, 0)], 0)
        .unwrap();
    assert!(matches!(
        take_tx(&mem, &mq),
        Err(BadChain::OutsideMemory { .. })
    ));
}

#[test]
fn tx_chain_that_loops_is_refused() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mq.add_desc_chains(
        &[
            desc(DATA, 100, VRING_DESC_F_NEXT, 1),
            desc(DATA, 100, VRING_DESC_F_NEXT, 0),
        ],
        0,
    )
    .unwrap();
    assert_eq!(take_tx(&mem, &mq), Err(BadChain::Unterminated));
}

#[test]
fn tx_chain_whose_next_is_outside_the_table_is_refused() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mq.add_desc_chains(&[desc(DATA, 100, VRING_DESC_F_NEXT, 5000)], 0)
        .unwrap();
    assert_eq!(take_tx(&mem, &mq), Err(BadChain::Unterminated));
}

#[test]
fn tx_indirect_table_outside_guest_memory_is_refused() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mq.add_desc_chains(
        &[desc(MEM_SIZE as u64 * 2, 16 * 4, VRING_DESC_F_INDIRECT, 0)],
        0,
    )
    .unwrap();
    assert_eq!(take_tx(&mem, &mq), Err(BadChain::Unterminated));
}

#[test]
fn tx_zero_length_and_runt_chains_are_refused() {
    for len in [0u32, 12, 12 + 13] {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        mq.add_desc_chains(&[desc(DATA, len, 0, 0)], 0).unwrap();
        assert_eq!(
            take_tx(&mem, &mq),
            Err(BadChain::TooShort {
                len: len as usize,
                need: 12 + MIN_FRAME
            }),
            "{len}-byte chain"
        );
    }
}

#[test]
fn tx_chain_with_a_writable_descriptor_is_refused() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mq.add_desc_chains(&[desc(DATA, 100, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    assert!(matches!(
        take_tx(&mem, &mq),
        Err(BadChain::WrongDirection { .. })
    ));
}

#[test]
fn tx_huge_descriptor_length_is_refused_before_any_copy() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mq.add_desc_chains(&[desc(DATA, u32::MAX, 0, 0)], 0)
        .unwrap();
    assert!(take_tx(&mem, &mq).is_err());
}

/// `count` receive buffers of `size` bytes each, one descriptor per chain
/// (as Linux posts mergeable buffers), starting at table index `at`.
fn post_rx_buffers(mq: &MockSplitQueue<GuestMemoryMmap>, count: u16, size: u32, at: u16) {
    let descs: Vec<_> = (0..count)
        .map(|i| {
            desc(
                DATA + u64::from(at + i) * 0x1_0000,
                size,
                VRING_DESC_F_WRITE,
                0,
            )
        })
        .collect();
    mq.add_desc_chains(&descs, at).unwrap();
}

fn used(mq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = mq.used().idx().load();
    (0..n)
        .map(|i| {
            let e = mq.used().ring().ref_at(usize::from(i)).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

/// What the guest would read back: header and frame over the used buffers.
fn received(mem: &GuestMemoryMmap, used: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(id, len) in used {
        let mut b = vec![0; len as usize];
        mem.read_slice(&mut b, GuestAddress(DATA + u64::from(id) * 0x1_0000))
            .unwrap();
        out.extend_from_slice(&b);
    }
    out
}

struct Rx {
    q: Queue,
    ring: UsedRing,
    scratch: RxScratch,
    bad: Vec<BadChain>,
}

impl Rx {
    fn new(mq: &MockSplitQueue<GuestMemoryMmap>) -> Rx {
        Rx {
            q: mq.create_queue().unwrap(),
            ring: UsedRing::default(),
            scratch: RxScratch::default(),
            bad: Vec::new(),
        }
    }

    fn deliver(&mut self, mem: &GuestMemoryMmap, hdr: NetHeader, f: &[u8]) -> Delivery {
        let mut f = f.to_vec();
        let base = hdr
            .for_frame(&mut f, Some(65520))
            .expect("a frame the guest takes");
        self.deliver_with(mem, hdr, &base, &f)
    }

    fn deliver_with(
        &mut self,
        mem: &GuestMemoryMmap,
        hdr: NetHeader,
        base: &HeaderRepr,
        f: &[u8],
    ) -> Delivery {
        let bad = &mut self.bad;
        deliver_frame(
            &mut self.q,
            mem,
            hdr,
            base,
            f,
            &mut self.ring,
            &mut self.scratch,
            &mut |e| bad.push(e),
        )
        .unwrap()
    }
}

#[test]
fn rx_small_frame_takes_one_buffer_with_its_header() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 4, 1526, 0);
    let mut rx = Rx::new(&mq);
    let f = frame(60);
    assert_eq!(
        rx.deliver(&mem, MERGEABLE, &f),
        Delivery::Delivered { buffers: 1 }
    );
    let u = used(&mq);
    assert_eq!(u, vec![(0, 72)]);
    let got = received(&mem, &u);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &f[..]);
}

#[test]
fn rx_largest_frame_spreads_over_mergeable_buffers_published_at_once() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 40, 4096, 0);
    let mut rx = Rx::new(&mq);
    let f = frame(65534);
    let want = (12 + f.len()).div_ceil(4096) as u16;
    assert_eq!(
        rx.deliver(&mem, MERGEABLE, &f),
        Delivery::Delivered { buffers: want }
    );
    let u = used(&mq);
    assert_eq!(u.len(), usize::from(want));
    let got = received(&mem, &u);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), want, "num_buffers");
    assert_eq!(&got[12..], &f[..]);
    assert_eq!(rx.q.next_used(), want);
}

#[test]
fn rx_without_enough_buffers_consumes_none_and_waits() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 3, 4096, 0);
    let mut rx = Rx::new(&mq);
    let f = frame(65534);
    assert_eq!(
        rx.deliver(&mem, MERGEABLE, &f),
        Delivery::NoRoom { seen_avail: 3 }
    );
    assert_eq!(rx.q.next_avail(), 0, "buffers handed back");
    assert!(used(&mq).is_empty());
    // The guest posts more: now it fits, in the buffers posted first.
    post_rx_buffers(&mq, 30, 4096, 3);
    assert!(matches!(
        rx.deliver(&mem, MERGEABLE, &f),
        Delivery::Delivered { .. }
    ));
    assert_eq!(used(&mq)[0].0, 0);
}

#[test]
fn rx_frame_larger_than_a_lone_buffer_is_dropped_and_the_buffer_kept() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 2, 1526, 0);
    let mut rx = Rx::new(&mq);
    let lone = NetHeader {
        mergeable: false,
        ..MERGEABLE
    };
    assert_eq!(rx.deliver(&mem, lone, &frame(9000)), Delivery::TooBig);
    assert_eq!(rx.q.next_avail(), 0);
    assert_eq!(
        rx.deliver(&mem, lone, &frame(1500)),
        Delivery::Delivered { buffers: 1 }
    );
}

#[test]
fn rx_bad_buffers_go_back_empty_and_the_frame_still_arrives() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let outside = MEM_SIZE as u64 * 4;
    // good, outside memory, device-readable, looping, then good ones.
    mq.add_desc_chains(
        &[
            desc(DATA, 4096, VRING_DESC_F_WRITE, 0),
            desc(outside, 4096, VRING_DESC_F_WRITE, 0),
            desc(DATA + 2 * 0x1_0000, 4096, 0, 0),
            desc(
                DATA + 3 * 0x1_0000,
                4096,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                4,
            ),
            desc(
                DATA + 4 * 0x1_0000,
                4096,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                3,
            ),
        ],
        0,
    )
    .unwrap();
    post_rx_buffers(&mq, 8, 4096, 5);
    let mut rx = Rx::new(&mq);
    let f = frame(9000);
    assert_eq!(
        rx.deliver(&mem, MERGEABLE, &f),
        Delivery::Delivered { buffers: 3 }
    );
    assert_eq!(rx.bad.len(), 3, "{:?}", rx.bad);
    assert!(matches!(rx.bad[0], BadChain::OutsideMemory { .. }));
    assert!(matches!(rx.bad[1], BadChain::WrongDirection { .. }));
    assert_eq!(rx.bad[2], BadChain::Unterminated);
    let u = used(&mq);
    // Buffer 0 was taken for the frame before the bad one: back empty.
    assert_eq!(&u[..4], &[(0, 0), (1, 0), (2, 0), (3, 0)]);
    assert_eq!(received(&mem, &u[4..])[12..], f[..]);
    // And the queue goes on working.
    assert!(matches!(
        rx.deliver(&mem, MERGEABLE, &frame(60)),
        Delivery::Delivered { buffers: 1 }
    ));
}

#[test]
fn rx_head_index_outside_the_queue_is_reported_not_used() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 2, 4096, 0);
    // Overwrite the first available entry with a head past the table.
    mq.avail().ring().ref_at(0).unwrap().store(u16::to_le(999));
    let mut rx = Rx::new(&mq);
    assert_eq!(
        rx.deliver(&mem, MERGEABLE, &frame(60)),
        Delivery::Delivered { buffers: 1 }
    );
    assert_eq!(
        rx.bad,
        vec![BadChain::HeadOutOfRange {
            head: 999,
            size: QUEUE_SIZE
        }]
    );
    assert_eq!(used(&mq), vec![(1, 72)]);
}

#[test]
fn rx_header_marks_data_valid_when_guest_csum_is_acked() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 1, 2048, 0);
    let mut rx = Rx::new(&mq);
    let hdr = NetHeader {
        data_valid: true,
        ..MERGEABLE
    };
    rx.deliver(&mem, hdr, &frame(60));
    let got = received(&mem, &used(&mq));
    assert_eq!(got[0], VIRTIO_NET_HDR_F_DATA_VALID as u8);
}

#[test]
fn legacy_header_is_ten_bytes_without_num_buffers() {
    assert_eq!(NetHeader::for_features(0).len, 10);
    let v1 = NetHeader::for_features(1 << VIRTIO_F_VERSION_1);
    assert_eq!((v1.len, v1.mergeable), (12, false));
    let mrg = NetHeader::for_features(1 << VIRTIO_NET_F_MRG_RXBUF);
    assert_eq!((mrg.len, mrg.mergeable), (12, true));
}

#[test]
fn signal_follows_the_guests_used_event() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 8, 2048, 0);
    let mut rx = Rx::new(&mq);
    rx.q.set_event_idx(true);
    let used_event = GuestAddress(rx.q.avail_ring() + 4 + 2 * u64::from(QUEUE_SIZE));
    // The guest wants an interrupt once entry 2 is used.
    mem.write_obj(u16::to_le(2), used_event).unwrap();
    rx.deliver(&mem, MERGEABLE, &frame(60));
    rx.deliver(&mem, MERGEABLE, &frame(60));
    assert!(!rx.ring.needs_signal(&rx.q, &mem).unwrap());
    rx.deliver(&mem, MERGEABLE, &frame(60));
    assert!(rx.ring.needs_signal(&rx.q, &mem).unwrap());
    assert!(!rx.ring.needs_signal(&rx.q, &mem).unwrap(), "nothing new");
}

#[test]
fn kick_is_armed_at_the_index_seen_not_behind_it() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 2, 4096, 0);
    let mut rx = Rx::new(&mq);
    rx.q.set_event_idx(true);
    let Delivery::NoRoom { seen_avail } = rx.deliver(&mem, MERGEABLE, &frame(65534)) else {
        panic!("two buffers cannot hold 64 KiB");
    };
    assert_eq!(seen_avail, 2);
    assert!(!kick_when_posted(&mut rx.q, &mem, seen_avail).unwrap());
    let avail_event = GuestAddress(rx.q.used_ring() + 4 + 8 * u64::from(QUEUE_SIZE));
    assert_eq!(u16::from_le(mem.read_obj::<u16>(avail_event).unwrap()), 2);
    post_rx_buffers(&mq, 1, 4096, 2);
    assert!(kick_when_posted(&mut rx.q, &mem, seen_avail).unwrap());
}

/// RFC 1071, the slow and obvious way: the check for `complete_checksum`.
fn naive_sum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[test]
fn partial_checksum_is_completed_so_the_receiver_verifies_it() {
    for len in [14 + 20 + 20, 14 + 20 + 21, 65534] {
        let mut f = frame(len);
        let (start, offset) = (34, 16);
        // The guest leaves the pseudo-header sum in the field.
        let pseudo: u16 = 0x1234;
        f[start + offset..start + offset + 2].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut f, start, offset).unwrap();
        let total = u32::from(pseudo) + u32::from(naive_sum(&f[start..]));
        let folded = (total & 0xffff) + (total >> 16);
        assert_eq!(folded, 0xffff, "{len}-byte frame");
    }
}

#[test]
fn checksum_offsets_outside_the_frame_are_refused() {
    let mut f = frame(60);
    for (start, offset) in [(61, 0), (34, 25), (59, 0), (usize::MAX, 2)] {
        assert!(
            matches!(
                complete_checksum(&mut f, start, offset),
                Err(BadChain::ChecksumOutside { .. })
            ),
            "{start}+{offset}"
        );
    }
}

#[test]
fn tx_frame_asking_for_a_checksum_gets_one_and_gso_is_refused() {
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let f = frame(1000);
    let descs = tx_chain(&mem, &f, 1, 0);
    // NEEDS_CSUM, csum_start 34, csum_offset 16.
    let mut hdr = [0u8; 12];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(DATA)).unwrap();
    mq.add_desc_chains(&descs, 0).unwrap();
    let got = take_tx(&mem, &mq).unwrap();
    let mut want = f.clone();
    complete_checksum(&mut want, 34, 16).unwrap();
    assert_eq!(got, want);
    assert_ne!(got, f);

    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let descs = tx_chain(&mem, &f, 1, 0);
    mem.write_slice(&[0, 1], GuestAddress(DATA)).unwrap(); // gso_type TCPV4
    mq.add_desc_chains(&descs, 0).unwrap();
    assert_eq!(take_tx(&mem, &mq), Err(BadChain::Gso(1)));
}

#[test]
fn tx_tcp_super_frame_is_taken_once_host_tso_is_acked() {
    let mem = memory();
    let tso = NetHeader {
        host_tso: true,
        ..MERGEABLE
    };
    let f = frame(40000);
    // TCPV4 and TCPV6 (with or without ECN) are one segment to the stack.
    for gso in [1u8, 4, 0x81] {
        let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs = tx_chain(&mem, &f, 8, 0);
        mem.write_slice(&[0, gso], GuestAddress(DATA)).unwrap();
        mq.add_desc_chains(&descs, 0).unwrap();
        assert_eq!(take_tx_with(&mem, &mq, tso).unwrap(), f, "gso type {gso}");
    }
    // UDP fragmentation (3) and UDP_L4 (5) were never offered.
    for gso in [3u8, 5] {
        let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let descs = tx_chain(&mem, &f, 8, 0);
        mem.write_slice(&[0, gso], GuestAddress(DATA)).unwrap();
        mq.add_desc_chains(&descs, 0).unwrap();
        assert_eq!(take_tx_with(&mem, &mq, tso), Err(BadChain::Gso(gso)));
    }
}

/// An Ethernet frame around an IPv4 TCP segment of `payload` bytes, its
/// checksum left zero (as the stack leaves it for an offloading link).
fn tcp_frame(payload: usize) -> Vec<u8> {
    let tcp_len = 20 + payload;
    let mut f = vec![0u8; 14 + 20 + tcp_len];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[192, 0, 2, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 2, 15]);
    let tcp = &mut f[34..];
    tcp[0..2].copy_from_slice(&443u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    for (i, b) in tcp[20..].iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    f
}

#[test]
fn rx_tcp_goes_with_needs_csum_and_tso_past_the_mtu() {
    let all = NetHeader {
        data_valid: true,
        guest_tso: true,
        ..MERGEABLE
    };
    // Within the MTU: NEEDS_CSUM at the TCP checksum, no segmentation.
    let mut small = tcp_frame(1000);
    let base = wire(all.for_frame(&mut small, Some(1500)).unwrap());
    assert_eq!(base[0], VIRTIO_NET_HDR_F_NEEDS_CSUM as u8);
    assert_eq!(base[1], 0);
    assert_eq!(u16::from_le_bytes([base[6], base[7]]), 34);
    assert_eq!(u16::from_le_bytes([base[8], base[9]]), 16);
    // The field holds the pseudo-header sum: finishing it gives a checksum
    // the segment verifies with.
    let mut finished = small.clone();
    complete_checksum(&mut finished, 34, 16).unwrap();
    assert!(tcp_checksum_ok(&finished));

    // Past the MTU: TCPV4 at the MTU's segment size, into mergeable buffers.
    let mut big = tcp_frame(60000);
    let repr = all.for_frame(&mut big, Some(1500)).unwrap();
    let base = wire(repr);
    assert_eq!(base[1], VIRTIO_NET_HDR_GSO_TCPV4 as u8);
    assert_eq!(u16::from_le_bytes([base[4], base[5]]), 1460);
    let mem = memory();
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    post_rx_buffers(&mq, 48, 1526, 0);
    let mut rx = Rx::new(&mq);
    assert!(matches!(
        rx.deliver_with(&mem, all, &repr, &big),
        Delivery::Delivered { .. }
    ));
    let got = received(&mem, &used(&mq));
    assert_eq!(&got[..10], &base);
    assert_eq!(&got[12..], &big[..]);

    // No GUEST_TSO: a segment past the MTU cannot go; no GUEST_CSUM: the
    // checksum is finished here and the header says nothing.
    let no_tso = NetHeader {
        data_valid: true,
        ..MERGEABLE
    };
    assert_eq!(no_tso.for_frame(&mut tcp_frame(60000), Some(1500)), None);
    let mut plain = tcp_frame(1000);
    assert_eq!(
        MERGEABLE.for_frame(&mut plain, Some(1500)).map(wire),
        Some([0; 10])
    );
    assert!(tcp_checksum_ok(&plain));
    // Offloads off: the frame goes untouched, DATA_VALID as the stack summed it.
    let mut untouched = tcp_frame(1000);
    let mut want = [0u8; 10];
    want[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    assert_eq!(no_tso.for_frame(&mut untouched, None).map(wire), Some(want));
    assert_eq!(untouched, tcp_frame(1000));
}

/// The header's bytes without `num_buffers`, as the guest reads them; the
/// tests read them by offset, against virtio_bindings' constants, to pin
/// the layout independently of `vnet::header`.
fn wire(repr: HeaderRepr) -> [u8; HDR_LEN] {
    let mut b = [0u8; HDR_LEN];
    b.copy_from_slice(&repr.to_bytes()[..HDR_LEN]);
    b
}

fn tcp_checksum_ok(f: &[u8]) -> bool {
    use smoltcp::wire::{Ipv4Address, TcpPacket};
    let tcp = TcpPacket::new_checked(&f[34..]).unwrap();
    tcp.verify_checksum(
        &Ipv4Address::new(192, 0, 2, 1).into(),
        &Ipv4Address::new(10, 0, 2, 15).into(),
    )
}
