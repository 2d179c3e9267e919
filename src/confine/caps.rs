//! Capabilities: the bounding and ambient sets emptied of all but what is
//! kept, and the thread's effective, permitted and inheritable sets cut to
//! the kept ones it actually has. capget/capset have no libc wrapper, hence
//! the raw calls, each behind a safe function.

use std::fmt;
use std::io;

use super::{ConfineError, Result};

/// A Linux capability, by number (linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(u32);

impl Cap {
    pub const SETPCAP: Cap = Cap(8);
    pub const NET_ADMIN: Cap = Cap(12);
    pub const SYS_PTRACE: Cap = Cap(19);

    fn bit(self) -> (usize, u32) {
        ((self.0 / 32) as usize, 1 << (self.0 % 32))
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Cap::SETPCAP => f.write_str("CAP_SETPCAP"),
            Cap::NET_ADMIN => f.write_str("CAP_NET_ADMIN"),
            Cap::SYS_PTRACE => f.write_str("CAP_SYS_PTRACE"),
            Cap(n) => write!(f, "capability {n}"),
        }
    }
}

const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> Result<[Data; 2]> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: a version-3 header and the two data structs it asks for, all
    // valid and exclusive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(ConfineError::Capget(io::Error::last_os_error()));
    }
    Ok(data)
}

fn capset(data: &[Data; 2]) -> Result<()> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: a version-3 header and the two data structs it reads.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(ConfineError::Capset(io::Error::last_os_error()));
    }
    Ok(())
}

fn has(data: &[Data; 2], cap: Cap, set: fn(&Data) -> u32) -> bool {
    let (word, bit) = cap.bit();
    set(&data[word]) & bit != 0
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Cut every set down to `keep` (or what of it this thread has). An
/// unprivileged process has nothing to drop and skips the bounding set,
/// which needs CAP_SETPCAP to change.
pub fn limit(keep: &[Cap]) -> Result<()> {
    let now = capget()?;
    if has(&now, Cap::SETPCAP, |d| d.effective) {
        for n in 0..=last_cap() {
            let cap = Cap(n);
            if keep.contains(&cap) {
                continue;
            }
            // SAFETY: PR_CAPBSET_DROP takes a capability number.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, n as libc::c_ulong, 0, 0, 0) } != 0 {
                let err = io::Error::last_os_error();
                // A number past what the kernel knows: nothing to drop.
                if err.raw_os_error() != Some(libc::EINVAL) {
                    return Err(ConfineError::Bounding {
                        cap: cap.to_string(),
                        source: err,
                    });
                }
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integers only. Kernels before
    // 4.3 have no ambient set (EINVAL): nothing to clear.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut next = [Data::default(); 2];
    for &cap in keep {
        if has(&now, cap, |d| d.permitted) {
            let (word, bit) = cap.bit();
            next[word].permitted |= bit;
            next[word].effective |= bit;
        }
    }
    capset(&next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_have_their_kernel_numbers_and_names() {
        assert_eq!(Cap::NET_ADMIN.bit(), (0, 1 << 12));
        assert_eq!(Cap(40).bit(), (1, 1 << 8));
        assert_eq!(Cap::SYS_PTRACE.to_string(), "CAP_SYS_PTRACE");
    }
}
