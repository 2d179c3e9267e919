//! The namespace side of the sandbox's network: `lo` up, and the tap with
//! the guest's MAC, MTU, addresses and default routes, set with the classic
//! socket ioctls (no netlink). Runs inside the new network namespace.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::child::SetupError;
use super::GuestNetConfig;
use crate::ifreq::{sockaddr_v4, IfReq};
use crate::tap::Tap;

/// Creates the tap in the current network namespace and configures it and
/// `lo` as `cfg` says. IPv6 is skipped (with a debug log) when the kernel
/// has it turned off.
pub(super) fn configure(cfg: &GuestNetConfig) -> Result<Tap, SetupError> {
    let inet = socket(libc::AF_INET).map_err(|e| step("open an AF_INET socket", e))?;
    let inet = inet.as_fd();
    set_up(inet, "lo").map_err(|e| step("bring lo up", e))?;

    let tap = if cfg.vnet_hdr {
        Tap::open_vnet(&cfg.tap_name)?
    } else {
        Tap::open(&cfg.tap_name)?
    };
    let name = tap.name();
    let mut req = IfReq::new(name);
    req.set_hwaddr(cfg.mac);
    // SAFETY: SIOCSIFHWADDR takes a `struct ifreq *`.
    unsafe { req.ioctl(inet, libc::SIOCSIFHWADDR) }.map_err(|e| {
        step(
            format!("set the MAC address of {name} to {}", mac_text(cfg.mac)),
            e,
        )
    })?;

    let mut req = IfReq::new(name);
    req.set_mtu(cfg.mtu as libc::c_int);
    // SAFETY: SIOCSIFMTU takes a `struct ifreq *`.
    unsafe { req.ioctl(inet, libc::SIOCSIFMTU) }
        .map_err(|e| step(format!("set the MTU of {name} to {}", cfg.mtu), e))?;

    let mut req = IfReq::new(name);
    req.set_addr(sockaddr_v4(cfg.ipv4));
    // SAFETY: SIOCSIFADDR takes a `struct ifreq *`.
    unsafe { req.ioctl(inet, libc::SIOCSIFADDR) }
        .map_err(|e| step(format!("give {name} the address {}", cfg.ipv4), e))?;
    let mut req = IfReq::new(name);
    req.set_addr(sockaddr_v4(netmask_v4(cfg.ipv4_prefix)));
    // SAFETY: SIOCSIFNETMASK takes a `struct ifreq *`.
    unsafe { req.ioctl(inet, libc::SIOCSIFNETMASK) }.map_err(|e| {
        step(
            format!("set the netmask of {name} to /{}", cfg.ipv4_prefix),
            e,
        )
    })?;

    set_up(inet, name).map_err(|e| step(format!("bring {name} up"), e))?;
    add_default_route_v4(inet, name, cfg.gateway_v4).map_err(|e| {
        step(
            format!("add the default route via {} on {name}", cfg.gateway_v4),
            e,
        )
    })?;

    if let Some((addr, prefix)) = cfg.ipv6 {
        configure_ipv6(inet, name, addr, prefix, cfg.gateway_v6)?;
    }
    Ok(tap)
}

fn step(what: impl Into<String>, source: io::Error) -> SetupError {
    SetupError::Configure {
        step: what.into(),
        source,
    }
}

fn configure_ipv6(
    inet: BorrowedFd<'_>,
    name: &str,
    addr: Ipv6Addr,
    prefix: u8,
    gateway: Ipv6Addr,
) -> Result<(), SetupError> {
    let conf = format!("/proc/sys/net/ipv6/conf/{name}");
    match std::fs::read_to_string(format!("{conf}/disable_ipv6")) {
        Ok(value) if value.trim() == "1" => {
            tracing::debug!("IPv6 is disabled on {name}; the sandbox gets IPv4 only");
            return Ok(());
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(
                "this kernel has no IPv6 ({conf} is missing); the sandbox gets IPv4 only"
            );
            return Ok(());
        }
        _ => {}
    }
    let inet6 = match socket(libc::AF_INET6) {
        Ok(sock) => sock,
        Err(err) if err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            tracing::debug!("this kernel has no IPv6 sockets; the sandbox gets IPv4 only");
            return Ok(());
        }
        Err(err) => return Err(step("open an AF_INET6 socket", err)),
    };
    // Without duplicate address detection the address is usable at once,
    // before the command's first connect.
    std::fs::write(format!("{conf}/accept_dad"), "0").map_err(|e| {
        step(
            format!("turn off duplicate address detection on {name} ({conf}/accept_dad)"),
            e,
        )
    })?;

    let ifindex =
        ifindex(inet, name).map_err(|e| step(format!("look up the index of {name}"), e))?;
    let mut req = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        ifr6_prefixlen: u32::from(prefix),
        ifr6_ifindex: ifindex,
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket takes a `struct in6_ifreq *`.
    unsafe { ioctl_with(inet6.as_fd(), libc::SIOCSIFADDR, &mut req) }
        .map_err(|e| step(format!("give {name} the address {addr}/{prefix}"), e))?;

    let mut route = In6Rtmsg {
        rtmsg_dst: libc::in6_addr { s6_addr: [0; 16] },
        rtmsg_src: libc::in6_addr { s6_addr: [0; 16] },
        rtmsg_gateway: libc::in6_addr {
            s6_addr: gateway.octets(),
        },
        rtmsg_type: 0,
        rtmsg_dst_len: 0,
        rtmsg_src_len: 0,
        rtmsg_metric: 1,
        rtmsg_info: 0,
        rtmsg_flags: u32::from(libc::RTF_UP | libc::RTF_GATEWAY),
        rtmsg_ifindex: ifindex,
    };
    // SAFETY: SIOCADDRT on an AF_INET6 socket takes a `struct in6_rtmsg *`,
    // which `In6Rtmsg` lays out exactly.
    unsafe { ioctl_with(inet6.as_fd(), libc::SIOCADDRT, &mut route) }.map_err(|e| {
        step(
            format!("add the IPv6 default route via {gateway} on {name}"),
            e,
        )
    })?;
    Ok(())
}

/// Linux's `struct rtentry` (`<net/route.h>`), the SIOCADDRT argument on an
/// AF_INET socket; libc does not define it for glibc targets.
#[repr(C)]
#[allow(dead_code)] // every field is read, by the kernel
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Linux's `struct in6_rtmsg` (`<linux/ipv6_route.h>`), the SIOCADDRT
/// argument on an AF_INET6 socket; libc's copy has private fields.
#[repr(C)]
#[allow(dead_code)] // every field is read, by the kernel
struct In6Rtmsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

fn add_default_route_v4(inet: BorrowedFd<'_>, name: &str, gateway: Ipv4Addr) -> io::Result<()> {
    let mut dev = name.as_bytes().to_vec();
    dev.push(0);
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr().cast(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT on an AF_INET socket takes a `struct rtentry *`, which
    // `RtEntry` lays out exactly; `rt_dev` points at a NUL-terminated name
    // that outlives the call.
    unsafe { ioctl_with(inet, libc::SIOCADDRT, &mut route) }
}

fn set_up(inet: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let mut req = IfReq::new(name);
    // SAFETY: SIOCGIFFLAGS takes a `struct ifreq *`.
    unsafe { req.ioctl(inet, libc::SIOCGIFFLAGS) }?;
    req.set_flags(req.flags() | libc::IFF_UP);
    // SAFETY: SIOCSIFFLAGS takes a `struct ifreq *`.
    unsafe { req.ioctl(inet, libc::SIOCSIFFLAGS) }
}

fn ifindex(inet: BorrowedFd<'_>, name: &str) -> io::Result<libc::c_int> {
    let mut req = IfReq::new(name);
    // SAFETY: SIOCGIFINDEX takes a `struct ifreq *`.
    unsafe { req.ioctl(inet, libc::SIOCGIFINDEX) }?;
    Ok(req.ifindex())
}

fn socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket has no pointer arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs ioctl `request` on `fd` with `arg`.
///
/// # Safety
/// `request` must take a pointer to a `T` as its argument, and any pointers
/// inside `arg` must be valid for the call.
unsafe fn ioctl_with<T>(fd: BorrowedFd<'_>, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees `request` expects a `T *`; `arg` is one,
    // alive and exclusively borrowed for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn netmask_v4(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0),
    )
}

fn mac_text(mac: [u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmask_from_prefix() {
        assert_eq!(netmask_v4(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask_v4(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask_v4(0), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn route_structs_have_the_kernel_layout() {
        // x86_64 / aarch64 sizes from <net/route.h> and <linux/ipv6_route.h>.
        if cfg!(target_pointer_width = "64") {
            assert_eq!(std::mem::size_of::<RtEntry>(), 120);
            assert_eq!(std::mem::size_of::<In6Rtmsg>(), 80);
        }
    }

    #[test]
    fn mac_prints_in_colon_hex() {
        assert_eq!(
            mac_text([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            "52:54:00:12:34:56"
        );
    }
}
