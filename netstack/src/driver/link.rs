//! The driver's side of a transport: a non-blocking source and sink of
//! whole Ethernet frames (a tap, a QEMU socket, vhost-user, a channel).

use std::io;
use std::os::fd::AsRawFd;

use crate::config::Offloads;
use crate::wire::RxMeta;

/// Where the guest's frames come from and go to: a tap, a socket, a channel.
/// Both calls are non-blocking and return `ErrorKind::WouldBlock` when they
/// would wait.
///
/// # Safety
/// `as_raw_fd` must return the same open descriptor for as long as the link
/// lives (the driver registers it with the reactor): own it, do not lend it.
pub unsafe trait Link: AsRawFd {
    /// Read one whole frame into `buf`, which holds
    /// [`MAX_FRAME`](crate::wire::MAX_FRAME) bytes (no frame is longer), and
    /// what the link knows about it (a checksum the guest's kernel vouched
    /// for); `RxMeta::default()` when nothing.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, RxMeta)>;
    /// Write one whole frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// What this link does for the stack (checksums, TSO); none by default.
    /// A link that claims `tx_checksum` must fill in or offload the TCP
    /// checksum of every frame it is given; one that claims `tso` must take
    /// TCP segments of up to 64 KiB and see them cut to the MTU.
    fn offloads(&self) -> Offloads {
        Offloads::default()
    }
}
