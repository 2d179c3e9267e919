//! Frames across split virtqueues, against a driver that may be hostile:
//! every descriptor chain is walked with virtio-queue's bounded iterator (a
//! loop or a `next` outside the table ends the walk) and every guest address
//! goes through vm-memory's checked accessors. A chain that fails a check is
//! handed back to the guest empty and reported; nothing here panics on guest
//! input.
//!
//! The used ring is written here rather than with `QueueT::add_used`, which
//! publishes the ring index after every entry: a merged receive buffer must
//! appear to the guest all at once, or a driver polling the ring meanwhile
//! sees a frame with buffers missing (Linux drops it as a length error).

use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::{fence, Ordering};

use netstack::wire::{MAX_FRAME, MIN_FRAME};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::vnet::{self, header, Gso, HeaderPacket, HeaderRepr, HDR_LEN, HDR_LEN_MRG};

/// The virtio-net header in front of every frame, as the guest negotiated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetHeader {
    /// 12 bytes (with `num_buffers`) for VERSION_1 or MRG_RXBUF, else 10.
    pub len: usize,
    /// A received frame may span several receive buffers.
    pub mergeable: bool,
    /// GUEST_CSUM: received frames carry DATA_VALID (the stack's checksums
    /// are right) or, for TCP, NEEDS_CSUM (the guest finishes the checksum).
    pub data_valid: bool,
    /// GUEST_TSO4 and GUEST_TSO6: TCP segments over the MTU go to the guest
    /// whole, marked for segmentation.
    pub guest_tso: bool,
    /// HOST_TSO4 or HOST_TSO6: the guest may send TCP segments over the MTU.
    pub host_tso: bool,
}

impl NetHeader {
    pub fn for_features(acked: u64) -> Self {
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        let mergeable = has(VIRTIO_NET_F_MRG_RXBUF);
        NetHeader {
            len: if has(VIRTIO_F_VERSION_1) || mergeable {
                HDR_LEN_MRG
            } else {
                HDR_LEN
            },
            mergeable,
            data_valid: has(VIRTIO_NET_F_GUEST_CSUM),
            guest_tso: has(VIRTIO_NET_F_GUEST_CSUM)
                && has(VIRTIO_NET_F_GUEST_TSO4)
                && has(VIRTIO_NET_F_GUEST_TSO6),
            host_tso: has(VIRTIO_NET_F_HOST_TSO4) || has(VIRTIO_NET_F_HOST_TSO6),
        }
    }

    /// The header (without `num_buffers`) for a frame from the stack to the
    /// guest. Without offloads (`offload_mtu` None) the frame is complete:
    /// DATA_VALID with GUEST_CSUM. With them, the guest's MTU: a TCP
    /// segment's checksum field gets the pseudo-header sum, which the guest
    /// finishes (NEEDS_CSUM, with GUEST_CSUM) or which is finished here;
    /// past the MTU it is marked for TSO. `None`: a segment over the MTU that
    /// the guest cannot take (no GUEST_TSO), to be dropped.
    pub fn for_frame(&self, frame: &mut [u8], offload_mtu: Option<usize>) -> Option<HeaderRepr> {
        let plain = HeaderRepr {
            data_valid: self.data_valid,
            ..HeaderRepr::PLAIN
        };
        let Some(mtu) = offload_mtu else {
            return Some(plain);
        };
        let tx = vnet::tx_header(frame, mtu);
        let (Some((at, partial)), Some(csum)) = (tx.patch, tx.repr.partial_csum) else {
            return Some(plain);
        };
        if tx.repr.gso != Gso::None && !self.guest_tso {
            return None;
        }
        frame[at..at + 2].copy_from_slice(&partial);
        if self.data_valid {
            return Some(tx.repr);
        }
        complete_checksum(frame, usize::from(csum.start), usize::from(csum.offset)).ok()?;
        Some(HeaderRepr::PLAIN)
    }

    /// `base` with `num_buffers` when the negotiated header has the field:
    /// the header of a received frame spread over `buffers` receive buffers.
    fn with_buffers(&self, base: &HeaderRepr, buffers: u16) -> HeaderRepr {
        HeaderRepr {
            num_buffers: (self.len >= HDR_LEN_MRG).then_some(buffers),
            ..*base
        }
    }
}

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadChain {
    #[error("the chain does not end: a loop, a `next` outside the table, or a descriptor outside guest memory")]
    Unterminated,
    #[error("a device-{found} descriptor where only device-{wanted} ones belong")]
    WrongDirection {
        found: &'static str,
        wanted: &'static str,
    },
    #[error("descriptor [{addr:#x}, +{len:#x}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("the chain holds more than {limit} bytes")]
    TooLong { limit: usize },
    #[error("the chain holds {len} bytes, short of a {need}-byte minimum")]
    TooShort { len: usize, need: usize },
    #[error("head index {head} is outside the {size}-entry queue")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("GSO type {0} on a frame, but no such GSO was negotiated")]
    Gso(u8),
    #[error("checksum at {start}+{offset} lies outside the {len}-byte frame")]
    ChecksumOutside {
        start: usize,
        offset: usize,
        len: usize,
    },
}

impl From<header::Error> for BadChain {
    fn from(e: header::Error) -> Self {
        match e {
            header::Error::Truncated { len } => BadChain::TooShort { len, need: HDR_LEN },
            header::Error::Gso(raw) => BadChain::Gso(raw),
        }
    }
}

/// One guest-memory span of a chain, already checked to lie in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    addr: GuestAddress,
    len: usize,
}

// For the fuzz target's oracle: what the walk took, to read back.
#[cfg(any(fuzzing, feature = "fuzz-api"))]
impl Span {
    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Walk a chain: every descriptor must go the wanted direction and lie in
/// guest memory, the chain must end, and it may hold at most `limit` bytes.
/// The spans are appended to `spans`; returns the chain's byte count.
fn walk<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    writable: bool,
    limit: usize,
    spans: &mut Vec<Span>,
) -> Result<usize, BadChain>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let (found, wanted) = if writable {
        ("readable", "writable")
    } else {
        ("writable", "readable")
    };
    let mut total = 0usize;
    let mut ended = false;
    for desc in chain {
        if desc.is_write_only() != writable {
            return Err(BadChain::WrongDirection { found, wanted });
        }
        let len = desc.len() as usize;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(BadChain::OutsideMemory {
                addr: desc.addr().raw_value(),
                len: desc.len(),
            });
        }
        total = match total.checked_add(len) {
            Some(t) if t <= limit => t,
            _ => return Err(BadChain::TooLong { limit }),
        };
        if len > 0 {
            spans.push(Span {
                addr: desc.addr(),
                len,
            });
        }
        // virtio-queue stops yielding (instead of failing) on a loop, a bad
        // `next` or an unreadable descriptor: the last one we saw then still
        // says "more follows".
        ended = !desc.has_next();
    }
    if !ended {
        return Err(BadChain::Unterminated);
    }
    Ok(total)
}

/// Copy `len` bytes starting `skip` bytes into `spans` out of guest memory.
fn gather(
    mem: &GuestMemoryMmap,
    spans: &[Span],
    mut skip: usize,
    out: &mut [u8],
) -> Result<(), BadChain> {
    let mut at = 0;
    for span in spans {
        if at == out.len() {
            break;
        }
        if skip >= span.len {
            skip -= span.len;
            continue;
        }
        let n = (span.len - skip).min(out.len() - at);
        let addr = span.addr.unchecked_add(skip as u64);
        mem.read_slice(&mut out[at..at + n], addr)
            .map_err(|_| BadChain::OutsideMemory {
                addr: addr.raw_value(),
                len: n as u32,
            })?;
        at += n;
        skip = 0;
    }
    Ok(())
}

/// Read the frame of one transmit chain into `buf` (at least `MAX_FRAME`
/// bytes), dropping the virtio-net header; returns the frame's length. A
/// frame whose header asks for a checksum (VIRTIO_NET_F_CSUM: the guest left
/// its TCP/UDP checksum to the device) has it completed here.
pub fn read_frame<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    hdr: NetHeader,
    buf: &mut [u8],
    spans: &mut Vec<Span>,
) -> Result<usize, BadChain>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    spans.clear();
    let total = walk(chain, mem, false, hdr.len + MAX_FRAME, spans)?;
    let need = hdr.len + MIN_FRAME;
    if total < need {
        return Err(BadChain::TooShort { len: total, need });
    }
    let frame = total - hdr.len;
    let mut header = [0u8; HDR_LEN_MRG];
    let header = &mut header[..hdr.len];
    gather(mem, spans, 0, header)?;
    gather(mem, spans, hdr.len, &mut buf[..frame])?;
    let packet = HeaderPacket::new_checked(&*header)?;
    let repr = HeaderRepr::parse(&packet)?;
    // A TCP super-frame (HOST_TSO) is one segment to the stack. TCP without
    // HOST_TSO, or the ECN bit without TCP, was never negotiated.
    let segmented = repr.gso != Gso::None;
    if (segmented || repr.ecn) && !(hdr.host_tso && segmented) {
        return Err(BadChain::Gso(packet.gso_type()));
    }
    if let Some(csum) = repr.partial_csum {
        let (start, offset) = (usize::from(csum.start), usize::from(csum.offset));
        complete_checksum(&mut buf[..frame], start, offset)?;
    }
    Ok(frame)
}

/// Finish a partial checksum: the guest put the pseudo-header sum at
/// `start + offset`; the Internet checksum of everything from `start` on
/// goes there (as Linux's skb_checksum_help does, 0 is sent as 0xffff).
pub fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> Result<(), BadChain> {
    let field = start.checked_add(offset).filter(|f| f + 2 <= frame.len());
    let (Some(field), true) = (field, start <= frame.len()) else {
        return Err(BadChain::ChecksumOutside {
            start,
            offset,
            len: frame.len(),
        });
    };
    let sum = !vnet::fold(vnet::ones_sum(&frame[start..]));
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// What became of a frame offered to the receive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// In the guest's buffers, `buffers` of them.
    Delivered { buffers: u16 },
    /// The guest has not posted enough buffers: keep the frame, try again
    /// when it posts more (`kick_when_posted`). No good buffer was consumed;
    /// `seen_avail` is the guest's available index that was looked at.
    NoRoom { seen_avail: u16 },
    /// The frame cannot fit one buffer and buffers do not merge: it is lost
    /// (the guest's MTU is larger than its buffers).
    TooBig,
}

/// Reused between frames so that delivery does not allocate.
#[derive(Default)]
pub struct RxScratch {
    spans: Vec<Span>,
    /// Chains taken for the current frame: head, their spans in `spans`, capacity.
    chains: Vec<(u16, std::ops::Range<usize>, usize)>,
    used: Vec<(u16, u32)>,
}

/// Put one frame into the guest's receive buffers: one chain, or several
/// with mergeable buffers. Bad chains met on the way go back empty and are
/// reported to `bad`. The used ring is published (`ring`) but the guest is
/// not signalled: the caller does that once per batch.
#[allow(clippy::too_many_arguments)]
pub fn deliver_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    hdr: NetHeader,
    base: &HeaderRepr,
    frame: &[u8],
    ring: &mut UsedRing,
    scratch: &mut RxScratch,
    bad: &mut dyn FnMut(BadChain),
) -> Result<Delivery, virtio_queue::Error> {
    let need = hdr.len + frame.len();
    let size = queue.size();
    let RxScratch {
        spans,
        chains,
        used,
    } = scratch;
    spans.clear();
    chains.clear();
    used.clear();
    let mut have = 0usize;
    let mut seen_avail = queue.next_avail();
    while have < need {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Everything up to the guest's index at this moment was taken.
            seen_avail = queue.next_avail();
            break;
        };
        let head = chain.head_index();
        let first = spans.len();
        let checked = if head >= size {
            Err(BadChain::HeadOutOfRange { head, size })
        } else {
            walk(chain, mem, true, usize::MAX, spans).and_then(|cap| {
                // Every buffer must at least hold a header (Linux posts
                // 1.5 KiB or more): an emptier one is a guest bug.
                if cap < hdr.len {
                    Err(BadChain::TooShort {
                        len: cap,
                        need: hdr.len,
                    })
                } else {
                    Ok(cap)
                }
            })
        };
        match checked {
            Ok(cap) if !hdr.mergeable && cap < need => {
                // Keep the buffer for a smaller frame; this one is lost.
                queue.go_to_previous_position();
                spans.truncate(first);
                return Ok(Delivery::TooBig);
            }
            Ok(cap) => {
                chains.push((head, first..spans.len(), cap));
                have += cap;
            }
            Err(e) => {
                spans.truncate(first);
                bad(e);
                // The buffers already taken for this frame go back empty
                // with the bad one, so that what the guest gets stays in
                // order; the frame starts over with the next buffer.
                used.extend(chains.drain(..).map(|(h, _, _)| (h, 0)));
                if head < size {
                    used.push((head, 0));
                }
                spans.clear();
                have = 0;
            }
        }
    }
    if have < need {
        for _ in 0..chains.len() {
            queue.go_to_previous_position();
        }
        ring.publish(queue, mem, used)?;
        return Ok(Delivery::NoRoom { seen_avail });
    }

    let buffers = chains.len() as u16;
    let header = hdr.with_buffers(base, buffers).to_bytes();
    let parts: [&[u8]; 2] = [&header[..hdr.len], frame];
    let mut part = 0;
    let mut off = 0;
    for (head, range, _) in chains.iter() {
        let mut written = 0usize;
        for span in &spans[range.clone()] {
            let mut room = span.len;
            let mut addr = span.addr;
            while room > 0 && part < parts.len() {
                let src = &parts[part][off..];
                let n = src.len().min(room);
                // Checked by `walk`; a failure here means guest memory moved
                // under us, which the memory table protocol does not allow.
                mem.write_slice(&src[..n], addr)
                    .map_err(virtio_queue::Error::GuestMemory)?;
                written += n;
                room -= n;
                addr = addr.unchecked_add(n as u64);
                off += n;
                if off == parts[part].len() {
                    part += 1;
                    off = 0;
                }
            }
        }
        used.push((*head, written as u32));
    }
    ring.publish(queue, mem, used)?;
    Ok(Delivery::Delivered { buffers })
}

/// Ask the guest to kick the queue when it posts buffers beyond
/// `seen_avail`; true when it already has (look again instead of waiting).
///
/// `QueueT::enable_notification` would arm the event at `next_avail`, which
/// after `NoRoom` lies behind buffers already posted: with EVENT_IDX the
/// guest would then never kick.
pub fn kick_when_posted(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    seen_avail: u16,
) -> Result<bool, virtio_queue::Error> {
    if queue.event_idx_enabled() {
        // avail_event sits after the used ring's entries.
        let at = GuestAddress(queue.used_ring())
            .checked_add(4 + 8 * u64::from(queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.store(u16::to_le(seen_avail), at, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?;
    } else {
        // Clears VRING_USED_F_NO_NOTIFY; its own re-check is not ours.
        queue.enable_notification(mem)?;
    }
    // The arming is visible before we look at the guest's index again.
    fence(Ordering::SeqCst);
    let now = queue.avail_idx(mem, Ordering::Acquire)?;
    Ok(now.0 != seen_avail)
}

/// The device's side of a used ring: entries go in, then the index, once.
#[derive(Debug, Default)]
pub struct UsedRing {
    /// The used index when the guest was last considered for a signal.
    checked: Wrapping<u16>,
    /// The queue's `next_used` after our last publish; anything else means
    /// the queue was set up again (the guest reset it) since.
    expected: Option<u16>,
}

impl UsedRing {
    /// Add `entries` (head, bytes written) to the used ring and publish the
    /// new index once, after all of them.
    pub fn publish(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        entries: &[(u16, u32)],
    ) -> Result<(), virtio_queue::Error> {
        let start = queue.next_used();
        if self.expected != Some(start) {
            self.checked = Wrapping(start);
        }
        if entries.is_empty() {
            return Ok(());
        }
        let size = queue.size();
        if size == 0 {
            return Err(virtio_queue::Error::QueueNotReady);
        }
        let used = GuestAddress(queue.used_ring());
        let mut next = Wrapping(start);
        for &(head, len) in entries {
            let slot = u64::from(next.0 % size);
            let addr = used
                .checked_add(4 + slot * 8)
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            mem.write_slice(&elem, addr)
                .map_err(virtio_queue::Error::GuestMemory)?;
            next += Wrapping(1);
        }
        let idx = used
            .checked_add(2)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        // Release: the entries are visible before the index that covers them.
        mem.store(u16::to_le(next.0), idx, Ordering::Release)
            .map_err(virtio_queue::Error::GuestMemory)?;
        queue.set_next_used(next.0);
        self.expected = Some(next.0);
        Ok(())
    }

    /// Whether the guest wants an interrupt for what was published since the
    /// last call: its `used_event` (EVENT_IDX) or its NO_INTERRUPT flag says.
    pub fn needs_signal(
        &mut self,
        queue: &Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, virtio_queue::Error> {
        let new = Wrapping(queue.next_used());
        let old = std::mem::replace(&mut self.checked, new);
        if new == old {
            return Ok(false);
        }
        // The used ring's index before the guest's suppression fields.
        fence(Ordering::SeqCst);
        let avail = GuestAddress(queue.avail_ring());
        if queue.event_idx_enabled() {
            let at = avail
                .checked_add(4 + 2 * u64::from(queue.size()))
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            let used_event: u16 = mem
                .load(at, Ordering::Acquire)
                .map(u16::from_le)
                .map_err(virtio_queue::Error::GuestMemory)?;
            // vring_need_event: did the index pass used_event since `old`?
            Ok(new - Wrapping(used_event) - Wrapping(1) < new - old)
        } else {
            let flags: u16 = mem
                .load(avail, Ordering::Acquire)
                .map(u16::from_le)
                .map_err(virtio_queue::Error::GuestMemory)?;
            Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
        }
    }
}

#[cfg(test)]
mod tests;
