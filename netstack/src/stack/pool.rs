//! TCP flow buffers kept for the next flow.
//!
//! A flow's two buffers (256 KiB each by default) are fresh mappings, zero
//! and costing only the pages the flow writes (see `tune_allocator` in
//! vmm-glue). Mapping, faulting in and unmapping them was about an eighth
//! of the stack's CPU per short connection. So the buffers of a flow that ended
//! cleanly after moving little are kept, a few per sandbox, and the next
//! flow takes them: no system call, no page fault.
//!
//! smoltcp gives no buffer back from a socket. So a buffer goes into its
//! socket as a `&'static mut [u8]` over memory the pool allocated, and the
//! pool takes it back from the flow only once that socket is dropped
//! (`give_back` is `unsafe` for that reason). A buffer lost any other way is
//! leaked, never freed under a socket.

use std::ptr::NonNull;

/// A flow's buffers are kept only if it moved at most this many bytes each
/// way: then that is all they hold (from their start, as smoltcp's rings
/// begin there), and it is zeroed before the next flow gets them. A bulk
/// flow's buffers go back to the system, so an idle sandbox keeps at most
/// `KEEP` × this resident. A guest that sends segments far ahead in its
/// window, which smoltcp stores but nobody takes, can leave more of a kept
/// receive buffer resident (and those bytes of its own unzeroed, never
/// read again): at most `KEEP` whole buffers, 2 MiB at the default size.
pub(super) const REUSE_LIMIT: u64 = 16 << 10;
/// Buffers kept per sandbox: enough for a client that opens connections
/// one after another, or a few at a time.
const KEEP: usize = 8;
/// Kept buffers no flow took for this long are freed (`release`).
pub(super) const IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// One buffer's memory, out on loan to a socket. It has no destructor: a
/// chunk dropped without `give_back` is leaked.
pub(super) struct Chunk(NonNull<[u8]>);

// SAFETY: a chunk is memory owned by one flow, like a `Box<[u8]>`; the
// pointer is never shared between threads.
unsafe impl Send for Chunk {}

/// The two buffers of one flow's socket, receive and send.
pub(super) struct FlowBuffers {
    pub(super) rx: Chunk,
    pub(super) tx: Chunk,
}

pub(super) struct BufferPool {
    size: usize,
    free: Vec<Chunk>,
}

impl BufferPool {
    pub(super) fn new(size: usize) -> Self {
        Self {
            size,
            free: Vec::new(),
        }
    }

    /// A buffer of `size` bytes, all zero to the socket that gets it: a kept
    /// one (`true`), or a new allocation. The slice is the only way to it
    /// until the chunk comes back through `give_back`.
    pub(super) fn take(&mut self) -> (Chunk, &'static mut [u8], bool) {
        let (chunk, kept) = match self.free.pop() {
            Some(chunk) => (chunk, true),
            None => {
                let fresh: Box<[u8]> = vec![0u8; self.size].into_boxed_slice();
                (Chunk(NonNull::from(Box::leak(fresh))), false)
            }
        };
        // SAFETY: the chunk's memory is allocated and nothing else refers to
        // it: it is fresh, or it came back through `give_back`, whose
        // contract is that the socket holding the slice made last is gone.
        let buf = unsafe { &mut *chunk.0.as_ptr() };
        (chunk, buf, kept)
    }

    /// Take back a flow's buffers; `moved` is how many bytes went each way
    /// (rx, tx), or `None` if the flow did not end cleanly (its buffers may
    /// hold bytes nobody took): those, and those of a bulk flow, are freed.
    ///
    /// # Safety
    /// The socket that `take`'s slices went into has been dropped (removed
    /// from the socket set, or replaced there), so nothing refers to them.
    pub(super) unsafe fn give_back(&mut self, buffers: FlowBuffers, moved: Option<(u64, u64)>) {
        let FlowBuffers { rx, tx } = buffers;
        let (rx_moved, tx_moved) = moved.unwrap_or((u64::MAX, u64::MAX));
        for (chunk, moved) in [(rx, rx_moved), (tx, tx_moved)] {
            if moved <= REUSE_LIMIT && self.free.len() < KEEP {
                // SAFETY: by the contract above the chunk is ours alone.
                let buf = unsafe { &mut *chunk.0.as_ptr() };
                // The bytes it held, from the start: a reused buffer is as
                // blank as a new one.
                let used = (moved as usize).min(buf.len());
                buf[..used].fill(0);
                self.free.push(chunk);
            } else {
                // SAFETY: the chunk came from `Box::leak` in `take` and,
                // by the contract above, nothing refers to it any more.
                drop(unsafe { Box::from_raw(chunk.0.as_ptr()) });
            }
        }
    }

    /// Buffers kept for the next flow.
    pub(super) fn kept(&self) -> usize {
        self.free.len()
    }

    /// Free the kept buffers: the sandbox has made no flow for a while, and
    /// an idle sandbox should hold no memory it does not use.
    pub(super) fn release(&mut self) {
        for chunk in self.free.drain(..) {
            // SAFETY: a kept chunk is on loan to no socket.
            drop(unsafe { Box::from_raw(chunk.0.as_ptr()) });
        }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(pool: &mut BufferPool) -> (FlowBuffers, &'static mut [u8], &'static mut [u8]) {
        let (rx, rx_buf, _) = pool.take();
        let (tx, tx_buf, _) = pool.take();
        (FlowBuffers { rx, tx }, rx_buf, tx_buf)
    }

    #[test]
    fn a_short_flows_buffers_come_back_zeroed() {
        let mut pool = BufferPool::new(64 << 10);
        let (buffers, rx, tx) = pair(&mut pool);
        let (rx_at, tx_at) = (rx.as_ptr(), tx.as_ptr());
        rx[..100].fill(0xaa);
        tx[..5000].fill(0xbb);
        // SAFETY: the slices are not used after this.
        unsafe { pool.give_back(buffers, Some((100, 5000))) };
        assert_eq!(pool.kept(), 2);
        let (buffers, a, b) = pair(&mut pool);
        // The same memory, blank again.
        let mut got = [a.as_ptr(), b.as_ptr()];
        got.sort();
        let mut want = [rx_at, tx_at];
        want.sort();
        assert_eq!(got, want);
        assert!(a.iter().chain(b.iter()).all(|&x| x == 0));
        assert_eq!(pool.kept(), 0);
        // SAFETY: as above.
        unsafe { pool.give_back(buffers, Some((0, 0))) };
    }

    #[test]
    fn bulk_and_unclean_flows_buffers_are_freed_and_the_pool_is_bounded() {
        let mut pool = BufferPool::new(4096);
        let (buffers, _, _) = pair(&mut pool);
        // SAFETY: the slices are not used after this.
        unsafe { pool.give_back(buffers, Some((REUSE_LIMIT + 1, 0))) };
        assert_eq!(pool.kept(), 1, "only the send buffer moved little");
        let (buffers, _, _) = pair(&mut pool);
        // SAFETY: as above.
        unsafe { pool.give_back(buffers, None) };
        assert_eq!(pool.kept(), 0);
        let mut out = Vec::new();
        for _ in 0..KEEP {
            out.push(pair(&mut pool).0);
        }
        for buffers in out {
            // SAFETY: as above.
            unsafe { pool.give_back(buffers, Some((1, 1))) };
        }
        assert_eq!(pool.kept(), KEEP);
    }
}
