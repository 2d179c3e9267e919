//! A Linux tap device: whole Ethernet frames in and out through a
//! `/dev/net/tun` fd, opened by name or adopted from an inherited fd.
//! The fd is always non-blocking; `recv` and `send` never wait.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use netstack::wire::RxMeta;
use netstack::Offloads;

use crate::ifreq::{invalid_name_reason, IfReq};
use crate::vnet;

/// Longest virtio-net header accepted on an adopted fd (the largest the
/// kernel defines, `virtio_net_hdr_v1_hash`, is 20 bytes).
const MAX_VNET_HDR_LEN: usize = 32;

/// What went wrong opening or adopting a tap, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "invalid tap name {name:?}: {reason}; give 1 to 15 bytes, none of them '/', ':', \
         whitespace or NUL, and not '.' or '..'"
    )]
    InvalidName { name: String, reason: &'static str },
    #[error(
        "/dev/net/tun does not exist (or the tun driver is not loaded); load the tun module (modprobe tun)"
    )]
    NoTunDevice(#[source] io::Error),
    #[error(
        "cannot open /dev/net/tun: permission denied; it must be readable and writable by this user (as root: chmod 0666 /dev/net/tun)"
    )]
    TunPermission(#[source] io::Error),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error(
        "tap {name} is in use: another process holds its only queue; stop that process or choose another tap name"
    )]
    Busy {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "not allowed to create or attach tap {name}: creating a tap needs CAP_NET_ADMIN, and an existing tap must belong to this user (as root: ip tuntap add dev {name} mode tap user $USER)"
    )]
    NotPermitted {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "interface {name} exists but is not a single-queue tap (a tun, a multi-queue tap or another kind of link); choose another name or remove it (ip link del {name})"
    )]
    NotATapInterface {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create or attach tap {name} (TUNSETIFF)")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is not a tap device (TUNGETIFF refused it); pass a /dev/net/tun fd attached to a tap interface")]
    NotATap {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is a /dev/net/tun fd not attached to any interface; attach it with TUNSETIFF (IFF_TAP|IFF_NO_PI) before passing it")]
    NotAttached {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is attached to {name}, a tun (layer-3) device; slipway needs a tap (Ethernet frames): create it with IFF_TAP")]
    IsTun { fd: RawFd, name: String },
    #[error("fd {fd} ({name}) was attached without IFF_NO_PI, so every frame carries a packet-information header; attach it with IFF_TAP|IFF_NO_PI")]
    PacketInfo { fd: RawFd, name: String },
    #[error("fd {fd} ({name}) has a {len}-byte virtio-net header; at most {MAX_VNET_HDR_LEN} is supported (TUNSETVNETHDRSZ)")]
    VnetHeaderTooLong { fd: RawFd, name: String, len: usize },
    #[error("tap {name} has no virtio-net header (it was not opened with IFF_VNET_HDR), so it cannot carry offloads")]
    NoVnetHeader { name: String },
    #[error("cannot prepare the fd of tap {name} ({what})")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, TapError>;

/// An open tap device. Dropping it closes the fd; a tap the kernel created
/// for it (not persistent) then disappears.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Bytes of virtio-net header in front of each frame on this fd: 0 unless
    /// it was opened or attached with IFF_VNET_HDR.
    vnet_hdr_len: usize,
    /// With offloads on, the MTU that TCP segments are cut to (TSO).
    offload_mtu: Option<usize>,
}

/// What the guest's kernel may hand us once offloads are on: partial
/// checksums and TCP segments of up to 64 KiB, never UDP super-frames.
const RX_OFFLOADS: libc::c_uint =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

impl Tap {
    /// Opens tap `name` in the caller's network namespace, creating it if it
    /// does not exist, with IFF_TAP|IFF_NO_PI; the fd is non-blocking and
    /// close-on-exec. A `%d` in `name` lets the kernel pick a free number;
    /// [`Tap::name`] says which.
    pub fn open(name: &str) -> Result<Tap> {
        Self::open_flags(name, libc::IFF_TAP | libc::IFF_NO_PI)
    }

    /// Like [`Tap::open`], with a virtio-net header in front of each frame
    /// (IFF_VNET_HDR), so that [`Tap::enable_offloads`] can turn on checksum
    /// and segmentation offloads. Until then the header is always empty.
    pub fn open_vnet(name: &str) -> Result<Tap> {
        let mut tap = Self::open_flags(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)?;
        tap.vnet_hdr_len = vnet::HDR_LEN;
        tap.set_offload_flags(0)?;
        Ok(tap)
    }

    /// Refuses a name the kernel would refuse (`dev_valid_name` in
    /// net/core/dev.c), before asking it: the one check for tap names, used
    /// by the control API when it parses a request too.
    pub fn check_name(name: &str) -> Result<()> {
        match invalid_name_reason(name) {
            Some(reason) => Err(TapError::InvalidName {
                name: name.to_owned(),
                reason,
            }),
            None => Ok(()),
        }
    }

    fn open_flags(name: &str, iff: libc::c_int) -> Result<Tap> {
        Self::check_name(name)?;
        let flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the path is a NUL-terminated literal; open has no other
        // preconditions.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), flags) };
        if raw < 0 {
            return Err(open_error(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut req = IfReq::new(name);
        req.set_flags(iff);
        // SAFETY: TUNSETIFF takes a `struct ifreq *`.
        unsafe { req.ioctl(fd.as_fd(), libc::TUNSETIFF) }
            .map_err(|source| set_iff_error(name, source))?;
        Ok(Tap {
            fd,
            name: req.name(),
            vnet_hdr_len: 0,
            offload_mtu: None,
        })
    }

    /// Turns on checksum and TCP segmentation offloads, both ways: the
    /// guest's kernel may hand over frames with partial checksums and TCP
    /// segments of up to 64 KiB, and TCP segments to it go with their
    /// checksum left to its kernel and, past `mtu`, marked to be cut to
    /// `mtu`. Needs a tap with a virtio-net header.
    pub fn enable_offloads(&mut self, mtu: usize) -> Result<()> {
        if self.vnet_hdr_len < vnet::HDR_LEN {
            return Err(TapError::NoVnetHeader {
                name: self.name.clone(),
            });
        }
        // The header's fields are little-endian whatever the host; on a
        // little-endian host that is the default, and older kernels may not
        // know the request.
        let le: libc::c_int = 1;
        // SAFETY: TUNSETVNETLE reads one `int` through the pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETLE, &le) };
        if rc < 0 && cfg!(target_endian = "big") {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "TUNSETVNETLE",
                source: io::Error::last_os_error(),
            });
        }
        self.set_offload_flags(RX_OFFLOADS)?;
        self.offload_mtu = Some(mtu);
        Ok(())
    }

    /// The offloads on: none, or checksums and TSO both ways.
    pub fn offloads(&self) -> Offloads {
        let on = self.offload_mtu.is_some();
        Offloads {
            tx_checksum: on,
            tso: on,
        }
    }

    /// Whether frames on this fd carry a virtio-net header.
    pub fn has_vnet_header(&self) -> bool {
        self.vnet_hdr_len > 0
    }

    fn set_offload_flags(&self, flags: libc::c_uint) -> Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags) };
        if rc < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Adopts an inherited tap fd (one a VMM launcher or a parent process
    /// opened): checks with TUNGETIFF that it is attached to a tap without
    /// packet-information headers, learns the interface's name, and makes the
    /// fd non-blocking. An fd attached with IFF_VNET_HDR is accepted: its
    /// offloads are turned off (until [`Tap::enable_offloads`]) and the header
    /// is added and stripped here, so `recv` and `send` still deal in plain
    /// Ethernet frames.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap> {
        let raw = fd.as_raw_fd();
        let req = match tun_iff(fd.as_fd()) {
            Ok(req) => req,
            Err(source) if source.raw_os_error() == Some(libc::EBADFD) => {
                return Err(TapError::NotAttached { fd: raw, source })
            }
            Err(source) => return Err(TapError::NotATap { fd: raw, source }),
        };
        let name = req.name();
        let flags = req.flags();
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::IsTun { fd: raw, name });
        }
        let configure = |what, source| TapError::Configure {
            name: name.clone(),
            what,
            source,
        };
        if has_packet_info(fd.as_fd()).map_err(|e| configure("checking for IFF_NO_PI", e))? {
            return Err(TapError::PacketInfo { fd: raw, name });
        }
        let mut vnet_hdr_len = 0;
        if flags & libc::IFF_VNET_HDR != 0 {
            let mut len: libc::c_int = 0;
            // SAFETY: TUNGETVNETHDRSZ writes one `int` through the pointer.
            let rc =
                unsafe { libc::ioctl(raw, libc::TUNGETVNETHDRSZ, &mut len as *mut libc::c_int) };
            if rc < 0 {
                return Err(configure("TUNGETVNETHDRSZ", io::Error::last_os_error()));
            }
            vnet_hdr_len = usize::try_from(len).unwrap_or(usize::MAX);
            if vnet_hdr_len > MAX_VNET_HDR_LEN {
                return Err(TapError::VnetHeaderTooLong {
                    fd: raw,
                    name,
                    len: vnet_hdr_len,
                });
            }
            // With no offloads the kernel hands over only whole, checksummed
            // frames; whoever attached the fd may have left others on.
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            let rc = unsafe { libc::ioctl(raw, libc::TUNSETOFFLOAD, 0 as libc::c_uint) };
            if rc < 0 {
                return Err(configure("TUNSETOFFLOAD 0", io::Error::last_os_error()));
            }
        }
        set_nonblocking(fd.as_fd()).map_err(|e| configure("O_NONBLOCK", e))?;
        Ok(Tap {
            fd,
            name,
            vnet_hdr_len,
            offload_mtu: None,
        })
    }

    /// The interface's name (in the namespace it was created in).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`; `Ok(None)` when none is waiting. A frame
    /// longer than `buf` is cut short by the kernel, so size `buf` for the
    /// MTU plus the 14-byte Ethernet header (64 KiB plus it with offloads).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.recv_meta(buf)?.map(|(len, _)| len))
    }

    /// Like [`Tap::recv`], with what the frame's virtio-net header said.
    /// Frames the stack cannot take (a UDP super-frame) are skipped.
    pub fn recv_meta(&self, buf: &mut [u8]) -> io::Result<Option<(usize, RxMeta)>> {
        loop {
            let mut hdr = [0u8; MAX_VNET_HDR_LEN];
            let Some(len) = self.read_frame(&mut hdr, buf)? else {
                return Ok(None);
            };
            match vnet::rx_meta(&hdr[..self.vnet_hdr_len]) {
                Ok(meta) => return Ok(Some((len, meta))),
                Err(why) => tracing::debug!(tap = %self.name, %why, len, "skipped a frame"),
            }
        }
    }

    fn read_frame(
        &self,
        hdr: &mut [u8; MAX_VNET_HDR_LEN],
        buf: &mut [u8],
    ) -> io::Result<Option<usize>> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: self.vnet_hdr_len,
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        loop {
            // SAFETY: both iovecs point into live, exclusively borrowed
            // buffers of at least the lengths given.
            let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
            match Outcome::of(n)? {
                Outcome::Done(n) => return Ok(Some(n.saturating_sub(self.vnet_hdr_len))),
                Outcome::Interrupted => continue,
                Outcome::WouldBlock => return Ok(None),
            }
        }
    }

    /// Writes one frame; `Ok(false)` when the device cannot take it now.
    /// With offloads on, a TCP segment goes with its checksum left to the
    /// guest's kernel, and one longer than the MTU is marked for TSO.
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        let mut hdr = [0u8; MAX_VNET_HDR_LEN];
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 4];
        let iov_of = |bytes: &[u8]| libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        let tx = self.offload_mtu.map(|mtu| vnet::tx_header(frame, mtu));
        if let Some(tx) = &tx {
            tx.repr
                .emit(&mut vnet::HeaderPacket::new_unchecked(&mut hdr[..]));
        }
        iov[0] = iov_of(&hdr[..self.vnet_hdr_len]);
        let count = match tx.as_ref().and_then(|tx| tx.patch.as_ref()) {
            // The checksum field is written over from a separate buffer, so
            // the frame itself is never changed.
            Some((at, bytes)) => {
                iov[1] = iov_of(&frame[..*at]);
                iov[2] = iov_of(bytes);
                iov[3] = iov_of(&frame[at + 2..]);
                4
            }
            None => {
                iov[1] = iov_of(frame);
                2
            }
        };
        loop {
            // SAFETY: every iovec in use points into a live buffer (`hdr`,
            // `frame`, `tx`) of at least the length given; writev only reads.
            let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), count) };
            match Outcome::of(n)? {
                Outcome::Done(_) => return Ok(true),
                Outcome::Interrupted => continue,
                Outcome::WouldBlock => return Ok(false),
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// How a non-blocking read or write on the tap ended.
enum Outcome {
    Done(usize),
    WouldBlock,
    Interrupted,
}

impl Outcome {
    /// Classifies a syscall's return value, reading errno when it failed.
    fn of(n: isize) -> io::Result<Outcome> {
        if let Ok(n) = usize::try_from(n) {
            return Ok(Outcome::Done(n));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => Ok(Outcome::WouldBlock),
            io::ErrorKind::Interrupted => Ok(Outcome::Interrupted),
            _ => Err(err),
        }
    }
}

/// TUNGETIFF: the name and flags `fd` is attached with.
fn tun_iff(fd: BorrowedFd<'_>) -> io::Result<IfReq> {
    let mut req = IfReq::zeroed();
    // SAFETY: TUNGETIFF takes a `struct ifreq *`; on an fd that is not a
    // tun/tap it fails without touching memory.
    unsafe { req.ioctl(fd, libc::TUNGETIFF) }?;
    Ok(req)
}

/// Whether frames on tap `fd` carry a 4-byte packet-information header
/// (it was attached without IFF_NO_PI).
///
/// TUNGETIFF alone cannot say: it also reports IFF_NOFILTER, the same bit,
/// whenever no socket filter is attached. So when no filter was ever set,
/// one that accepts everything is attached for a moment, the bit read, and
/// the filter state put back as it was. When the owner has set a filter
/// that is still attached, the bit already means IFF_NO_PI alone; when it
/// was set and detached again, this cannot tell and answers no.
fn has_packet_info(fd: BorrowedFd<'_>) -> io::Result<bool> {
    if tun_iff(fd)?.flags() & libc::IFF_NO_PI == 0 {
        // A filter is attached, so the bit is IFF_NO_PI's, and it is off.
        return Ok(true);
    }
    let mut current = empty_fprog();
    tun_filter_ioctl(fd, libc::TUNGETFILTER, &mut current)?;
    if current.len > 0 {
        return Ok(false);
    }
    let mut accept_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: u32::MAX,
    }];
    let mut probe = libc::sock_fprog {
        len: 1,
        filter: accept_all.as_mut_ptr(),
    };
    tun_filter_ioctl(fd, libc::TUNATTACHFILTER, &mut probe)?;
    let flags = tun_iff(fd).map(|req| req.flags());
    // SAFETY: TUNDETACHFILTER ignores its argument.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNDETACHFILTER, 0) };
    // Detaching leaves the probe's length on record (TUNGETFILTER would show
    // it); recording an empty program, which the kernel then refuses to
    // attach, clears it.
    let _ = tun_filter_ioctl(fd, libc::TUNATTACHFILTER, &mut empty_fprog());
    Ok(flags? & libc::IFF_NO_PI == 0)
}

fn empty_fprog() -> libc::sock_fprog {
    libc::sock_fprog {
        len: 0,
        filter: std::ptr::null_mut(),
    }
}

/// TUNGETFILTER or TUNATTACHFILTER, whose argument is a `struct sock_fprog`.
fn tun_filter_ioctl(
    fd: BorrowedFd<'_>,
    request: libc::Ioctl,
    prog: &mut libc::sock_fprog,
) -> io::Result<()> {
    debug_assert!(request == libc::TUNGETFILTER || request == libc::TUNATTACHFILTER);
    // SAFETY: both requests take one `struct sock_fprog *`; its `filter`
    // pointer is NULL or points at a program alive for the call (the kernel
    // copies it when attaching).
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, prog as *mut libc::sock_fprog) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the fd's flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an int of file status flags.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The error for a failed `open("/dev/net/tun")`.
fn open_error(source: io::Error) -> TapError {
    match source.raw_os_error() {
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::NoTunDevice(source),
        Some(libc::EACCES | libc::EPERM) => TapError::TunPermission(source),
        _ => TapError::OpenTun(source),
    }
}

/// The error for a failed TUNSETIFF on tap `name`.
fn set_iff_error(name: &str, source: io::Error) -> TapError {
    let name = name.to_owned();
    match source.raw_os_error() {
        Some(libc::EBUSY) => TapError::Busy { name, source },
        Some(libc::EPERM | libc::EACCES) => TapError::NotPermitted { name, source },
        Some(libc::EINVAL) => TapError::NotATapInterface { name, source },
        _ => TapError::SetIff { name, source },
    }
}

// SAFETY: the Tap owns its descriptor for as long as it lives.
unsafe impl netstack::driver::Link for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, RxMeta)> {
        Tap::recv_meta(self, buf)?.ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }

    fn offloads(&self) -> Offloads {
        Tap::offloads(self)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if Tap::send(self, frame)? {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Moves this test's thread into a fresh network namespace, so the taps
    /// it makes never show up on the host. Returns false (and says why) when
    /// the test cannot run here.
    fn private_netns() -> bool {
        if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: needs root and /dev/net/tun");
            return false;
        }
        // SAFETY: unshare(CLONE_NEWNET) only changes this thread's namespace;
        // libtest runs each test on its own thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        true
    }

    /// A /dev/net/tun fd attached with `flags` to a new interface `name`.
    fn raw_tun(name: &str, flags: libc::c_int) -> OwnedFd {
        // SAFETY: a NUL-terminated literal path.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(
            raw >= 0,
            "open /dev/net/tun: {}",
            io::Error::last_os_error()
        );
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if flags != 0 {
            let mut req = IfReq::new(name);
            req.set_flags(flags);
            // SAFETY: TUNSETIFF takes a `struct ifreq *`.
            unsafe { req.ioctl(fd.as_fd(), libc::TUNSETIFF) }.expect("TUNSETIFF");
        }
        fd
    }

    fn link_up(name: &str) {
        // SAFETY: socket has no pointer arguments.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(name);
        // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS take a `struct ifreq *`.
        unsafe {
            req.ioctl(sock.as_fd(), libc::SIOCGIFFLAGS)
                .expect("SIOCGIFFLAGS");
            req.set_flags(req.flags() | libc::IFF_UP);
            req.ioctl(sock.as_fd(), libc::SIOCSIFFLAGS)
                .expect("SIOCSIFFLAGS");
        }
    }

    #[test]
    fn permission_denied_on_tun_says_how_to_fix_it() {
        let err = open_error(io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(err, TapError::TunPermission(_)));
        assert!(err.to_string().contains("chmod 0666 /dev/net/tun"), "{err}");
    }

    #[test]
    fn missing_tun_says_to_load_the_module() {
        let err = open_error(io::Error::from_raw_os_error(libc::ENOENT));
        assert!(err.to_string().contains("modprobe tun"), "{err}");
    }

    #[test]
    fn tunsetiff_errors_name_the_tap_and_the_cause() {
        let busy = set_iff_error("tap7", io::Error::from_raw_os_error(libc::EBUSY));
        assert!(matches!(busy, TapError::Busy { .. }) && busy.to_string().contains("tap7"));
        let eperm = set_iff_error("tap7", io::Error::from_raw_os_error(libc::EPERM));
        assert!(
            eperm
                .to_string()
                .contains("ip tuntap add dev tap7 mode tap"),
            "{eperm}"
        );
    }

    #[test]
    fn invalid_name_is_refused_before_touching_the_kernel() {
        let err = Tap::open("much-too-long-for-linux").unwrap_err();
        assert!(matches!(err, TapError::InvalidName { .. }), "{err}");
    }

    #[test]
    fn a_pipe_is_not_a_tap() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and ours.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let err = Tap::from_fd(r).unwrap_err();
        assert!(matches!(err, TapError::NotATap { .. }), "{err}");
    }

    #[test]
    fn an_unattached_tun_fd_is_refused() {
        if !private_netns() {
            return;
        }
        let err = Tap::from_fd(raw_tun("", 0)).unwrap_err();
        assert!(matches!(err, TapError::NotAttached { .. }), "{err}");
    }

    #[test]
    fn a_tun_device_is_refused() {
        if !private_netns() {
            return;
        }
        let err = Tap::from_fd(raw_tun("tun9", libc::IFF_TUN | libc::IFF_NO_PI)).unwrap_err();
        assert!(
            matches!(err, TapError::IsTun { ref name, .. } if name == "tun9"),
            "{err}"
        );
    }

    #[test]
    fn a_tap_with_packet_info_is_refused() {
        if !private_netns() {
            return;
        }
        let err = Tap::from_fd(raw_tun("tap9", libc::IFF_TAP)).unwrap_err();
        assert!(matches!(err, TapError::PacketInfo { .. }), "{err}");
    }

    /// Attaches a one-instruction accept-all socket filter to tap `fd`.
    fn attach_filter(fd: BorrowedFd<'_>) {
        let mut accept_all = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        }];
        let mut prog = libc::sock_fprog {
            len: 1,
            filter: accept_all.as_mut_ptr(),
        };
        // SAFETY: TUNATTACHFILTER reads one `struct sock_fprog` whose program
        // outlives the call.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNATTACHFILTER,
                &mut prog as *mut libc::sock_fprog,
            )
        };
        assert_eq!(rc, 0, "TUNATTACHFILTER: {}", io::Error::last_os_error());
    }

    fn filter_len(fd: BorrowedFd<'_>) -> u16 {
        // SAFETY: all-zero is a valid `sock_fprog`.
        let mut prog: libc::sock_fprog = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETFILTER writes one `struct sock_fprog`.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNGETFILTER,
                &mut prog as *mut libc::sock_fprog,
            )
        };
        assert_eq!(rc, 0, "TUNGETFILTER: {}", io::Error::last_os_error());
        prog.len
    }

    #[test]
    fn packet_info_is_told_apart_with_or_without_a_filter() {
        if !private_netns() {
            return;
        }
        let plain = raw_tun("nofilter0", libc::IFF_TAP | libc::IFF_NO_PI);
        assert!(!has_packet_info(plain.as_fd()).unwrap());
        assert_eq!(
            filter_len(plain.as_fd()),
            0,
            "the probe filter was left behind"
        );

        let filtered = raw_tun("filter0", libc::IFF_TAP | libc::IFF_NO_PI);
        attach_filter(filtered.as_fd());
        assert!(!has_packet_info(filtered.as_fd()).unwrap());
        assert_eq!(
            filter_len(filtered.as_fd()),
            1,
            "the owner's filter was removed"
        );

        let with_pi = raw_tun("pi0", libc::IFF_TAP);
        assert!(has_packet_info(with_pi.as_fd()).unwrap());
        assert_eq!(
            filter_len(with_pi.as_fd()),
            0,
            "the probe filter was left behind"
        );

        let filtered_pi = raw_tun("pi1", libc::IFF_TAP);
        attach_filter(filtered_pi.as_fd());
        assert!(has_packet_info(filtered_pi.as_fd()).unwrap());
    }

    #[test]
    fn adopted_tap_learns_its_name_and_turns_nonblocking() {
        if !private_netns() {
            return;
        }
        let fd = raw_tun("adopt0", libc::IFF_TAP | libc::IFF_NO_PI);
        let tap = Tap::from_fd(fd).expect("adopt");
        assert_eq!(tap.name(), "adopt0");
        // The link is down: nothing to read, and reading must not block.
        assert_eq!(tap.recv(&mut [0; 2048]).unwrap(), None);
        // SAFETY: F_GETFL only reads the fd's flags.
        let flags = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn adopted_tap_with_vnet_header_deals_in_plain_frames() {
        if !private_netns() {
            return;
        }
        let fd = raw_tun(
            "vnet0",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        let tap = Tap::from_fd(fd).expect("adopt");
        assert_eq!(tap.vnet_hdr_len, 10);
        link_up("vnet0");
        // Once up, the kernel solicits routers and reports multicast
        // listeners: frames to 33:33:xx, which must come without the header.
        let mut buf = [0u8; 2048];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let len = loop {
            if let Some(len) = tap.recv(&mut buf).expect("recv") {
                break len;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no frame from the kernel in 3 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(len > 14, "frame of {len} bytes");
        assert_eq!(&buf[..2], &[0x33, 0x33], "frame starts {:02x?}", &buf[..14]);
        assert_eq!(&buf[12..14], &[0x86, 0xdd]);
        assert!(tap.send(&buf[..len]).expect("send"));
    }

    #[test]
    fn offloads_need_a_vnet_header_and_then_reach_the_interface() {
        if !private_netns() {
            return;
        }
        let mut plain = Tap::open("plain0").expect("open");
        let err = plain.enable_offloads(1500).unwrap_err();
        assert!(matches!(err, TapError::NoVnetHeader { .. }), "{err}");
        assert_eq!(plain.offloads(), Offloads::default());

        let mut tap = Tap::open_vnet("offl0").expect("open with a header");
        assert!(tap.has_vnet_header());
        assert_eq!(tap.offloads(), Offloads::default(), "off until asked");
        tap.enable_offloads(1500).expect("enable");
        assert_eq!(
            tap.offloads(),
            Offloads {
                tx_checksum: true,
                tso: true
            }
        );
        // The kernel now lets the interface send TSO frames: the features
        // file says so (ethtool's view, without ethtool).
        let features = std::fs::read_to_string("/sys/class/net/offl0/features");
        if let Ok(features) = features {
            assert_ne!(features.trim(), "0x0", "no features on the interface");
        }
        // Adopting the same kind of fd turns them off until asked again.
        let fd = raw_tun(
            "offl1",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        let mut adopted = Tap::from_fd(fd).expect("adopt");
        assert_eq!(adopted.offloads(), Offloads::default());
        adopted
            .enable_offloads(9000)
            .expect("enable on an adopted fd");
        assert!(adopted.offloads().tso);
    }

    #[test]
    fn open_creates_and_a_second_open_is_busy() {
        if !private_netns() {
            return;
        }
        let tap = Tap::open("slw%d").expect("open");
        assert_eq!(tap.name(), "slw0");
        let err = Tap::open("slw0").unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("slw0"), "{err}");
    }

    #[test]
    fn an_existing_non_tap_interface_is_refused() {
        if !private_netns() {
            return;
        }
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, TapError::NotATapInterface { .. }), "{err}");
    }
}
