//! The smoltcp `Device` the core hands to the interface: at most one guest
//! frame in, any number of frames out into a bounded queue of reused buffers.

use std::collections::VecDeque;
use std::num::NonZeroUsize;

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::config::Offloads;

/// Frames on their way to the guest, with a pool of spent buffers to reuse.
///
/// Bounded in frames and bytes: a guest whose link stops draining (no
/// receive buffers posted, a VMM that stops reading its socket) must not
/// grow the process. Over the bound smoltcp is told the device is busy
/// (its segments wait in their sockets' buffers, already bounded), and
/// frames made outside smoltcp (replies, relayed datagrams) are dropped and
/// counted, as a full NIC ring would.
#[derive(Debug)]
pub struct TxQueue {
    frames: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    dropped: u64,
}

const MAX_SPARE: usize = 64;

impl TxQueue {
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            spare: Vec::new(),
            bytes: 0,
            max_frames: max_frames.max(1),
            max_bytes,
            dropped: 0,
        }
    }

    /// Queue a frame for the guest; over the bound it is dropped and counted.
    pub fn push(&mut self, frame: Vec<u8>) {
        if self.is_full() {
            self.dropped += 1;
            self.recycle(frame);
            return;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let frame = self.frames.pop_front()?;
        self.bytes -= frame.len();
        Some(frame)
    }

    /// Put a frame back at the head, after the link could not take it.
    pub fn unpop(&mut self, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.frames.push_front(frame);
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// No room for another frame until the link takes some.
    pub fn is_full(&self) -> bool {
        self.frames.len() >= self.max_frames || self.bytes >= self.max_bytes
    }

    /// Forget every queued frame (the guest they were for is gone).
    pub fn discard(&mut self) {
        while let Some(frame) = self.pop() {
            self.recycle(frame);
        }
    }

    /// Frames dropped over the bound since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE {
            buf.clear();
            self.spare.push(buf);
        }
    }

    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }
}

pub struct OneFrame<'a> {
    pub rx: Option<&'a [u8]>,
    pub tx: &'a mut TxQueue,
    /// IP MTU of the link to the guest.
    pub mtu: usize,
    pub offloads: Offloads,
}

impl phy::Device for OneFrame<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let frame = self.rx.take()?;
        Some((RxToken(frame), TxToken(self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        // Busy while the queue is full: smoltcp keeps the segment for later.
        (!self.tx.is_full()).then_some(TxToken(self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + crate::wire::ETH_HEADER;
        caps.max_burst_size = None;
        // Every guest frame reaches smoltcp through `wire::classify`, which
        // already verified its IPv4 and TCP checksums: verifying them twice
        // cost a second pass over every 64 KiB segment. Frames out are still
        // summed, unless the link does that.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = if self.offloads.tx_checksum {
            Checksum::None
        } else {
            Checksum::Tx
        };
        // With TSO smoltcp sends segments of up to 64 KiB (the largest
        // frame), each marked with the MSS that the link cuts it to.
        let tso = NonZeroUsize::new(crate::wire::MAX_FRAME)
            .filter(|_| self.offloads.tso && self.offloads.tx_checksum);
        caps.segmentation.tcpv4 = tso;
        caps.segmentation.tcpv6 = tso;
        if tso.is_some() {
            // smoltcp 0.14 drops an IPv6 packet over the MTU even when it is
            // marked for segmentation (IPv4 it lets through). The segment
            // size still follows the guest's MSS, which follows its MTU;
            // only the MSS smoltcp announces grows, and the guest takes the
            // smaller of the two.
            caps.max_transmission_unit = crate::wire::MAX_FRAME;
        }
        caps
    }
}

pub struct RxToken<'a>(&'a [u8]);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

pub struct TxToken<'a>(&'a mut TxQueue);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.0.buffer(len);
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}
