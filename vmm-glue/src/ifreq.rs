//! `struct ifreq`, the kernel's per-interface ioctl argument, built from a
//! checked interface name. Both the tap device and the `run` namespace's
//! interface setup speak to the kernel through it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Why `name` cannot be a Linux interface name (the kernel's `dev_valid_name`),
/// or `None` when it can. A `%d` in the name is fine: the kernel picks a number.
/// The kernel's isspace() is Latin-1's: 0xa0 (no-break space) counts, so a
/// UTF-8 name with that byte in it is refused as the kernel would refuse it.
pub(crate) fn invalid_name_reason(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() >= libc::IFNAMSIZ {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it is `.` or `..`")
    } else if name
        .bytes()
        .any(|b| matches!(b, b'/' | b':' | 0 | b' ' | b'\t'..=b'\r' | 0xa0))
    {
        Some("it contains `/`, `:`, a NUL or whitespace")
    } else {
        None
    }
}

/// An owned `struct ifreq`. Only the fields an ioctl reads are meaningful;
/// the rest stay zero.
pub(crate) struct IfReq(libc::ifreq);

impl IfReq {
    /// An all-zero request, for ioctls that fill in the name (TUNGETIFF).
    pub(crate) fn zeroed() -> IfReq {
        // SAFETY: `ifreq` is a C struct of integers, byte arrays and a union of
        // those and a raw pointer; all-zero bytes are a valid value of each.
        IfReq(unsafe { std::mem::zeroed() })
    }

    /// A request about interface `name`. The caller checked the name with
    /// [`invalid_name_reason`]; a name that is still too long is cut short,
    /// never overflowed.
    pub(crate) fn new(name: &str) -> IfReq {
        let mut req = IfReq::zeroed();
        for (dst, src) in req
            .0
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req
    }

    /// The interface name the kernel wrote back (TUNSETIFF and TUNGETIFF do).
    pub(crate) fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .0
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// `ifr_flags` as the unsigned 16-bit word the kernel means.
    pub(crate) fn flags(&self) -> libc::c_int {
        // SAFETY: every bit pattern is a valid `c_short`, so reading this union
        // member is sound whichever member the kernel last wrote.
        let flags = unsafe { self.0.ifr_ifru.ifru_flags };
        libc::c_int::from(flags as u16)
    }

    pub(crate) fn set_flags(&mut self, flags: libc::c_int) {
        self.0.ifr_ifru.ifru_flags = flags as u16 as libc::c_short;
    }

    pub(crate) fn set_mtu(&mut self, mtu: libc::c_int) {
        self.0.ifr_ifru.ifru_mtu = mtu;
    }

    pub(crate) fn set_addr(&mut self, addr: libc::sockaddr) {
        self.0.ifr_ifru.ifru_addr = addr;
    }

    pub(crate) fn set_hwaddr(&mut self, mac: [u8; 6]) {
        let mut addr = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (dst, src) in addr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        self.0.ifr_ifru.ifru_hwaddr = addr;
    }

    pub(crate) fn ifindex(&self) -> libc::c_int {
        // SAFETY: every bit pattern is a valid `c_int`.
        unsafe { self.0.ifr_ifru.ifru_ifindex }
    }

    /// Runs ioctl `request` on `fd` with this request as its argument.
    ///
    /// # Safety
    /// `request` must be an ioctl whose argument is a `struct ifreq *` (the
    /// kernel then reads and writes at most `sizeof(struct ifreq)` bytes).
    pub(crate) unsafe fn ioctl(
        &mut self,
        fd: BorrowedFd<'_>,
        request: libc::Ioctl,
    ) -> io::Result<()> {
        // SAFETY: the caller guarantees `request` takes a `struct ifreq *`, and
        // `self.0` is one, alive and exclusively borrowed for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut self.0 as *mut libc::ifreq) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// An IPv4 `struct sockaddr_in` in the generic `struct sockaddr` shape the
/// ifreq and rtentry ioctls take (port 0).
pub(crate) fn sockaddr_v4(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let mut sa = libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // sockaddr_in: sin_port (2 bytes), then sin_addr (4 bytes, network order).
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    sa
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_refuse_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "has space",
            "tab\tname",
            "sixteen-chars-xx",
        ] {
            assert!(
                invalid_name_reason(bad).is_some(),
                "{bad:?} should be invalid"
            );
        }
        for good in ["tap0", "slipway%d", "fifteen-chars-x", "t-a_p.0"] {
            assert_eq!(invalid_name_reason(good), None, "{good:?} should be valid");
        }
    }

    #[test]
    fn name_round_trips_and_flags_are_unsigned() {
        let mut req = IfReq::new("tap0");
        assert_eq!(req.name(), "tap0");
        req.set_flags(0x8002);
        assert_eq!(req.flags(), 0x8002);
    }

    #[test]
    fn sockaddr_v4_puts_the_address_after_the_port() {
        let sa = sockaddr_v4(std::net::Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|&c| c as u8).collect();
        assert_eq!(&bytes[..6], &[0, 0, 10, 0, 2, 15]);
    }
}
