//! The few process-level system calls the `slipway` binary makes (signals,
//! descriptor checks and hand-overs, limits, the umask, Yama's ptracer),
//! behind safe functions so that the binary holds no `unsafe` outside its
//! confinement. Each call touches only its arguments and the calling process.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Send `signal` to process `pid` (kill(2)); a process that is gone is no error.
pub fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    unsafe { libc::kill(pid, signal) };
}

/// Adopt descriptor `fd`, which this process inherited to own, or `None`
/// when no such descriptor is open.
pub fn adopt_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only asks whether the number is an open descriptor.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open, and the caller was handed it to own
    // (an inherited descriptor nothing else in the process holds).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A duplicate of descriptor `fd` of process `pid` (pidfd_open(2) and
/// pidfd_getfd(2); the caller must be allowed to ptrace `pid`).
pub fn take_fd(pid: libc::pid_t, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `pidfd` is a fresh descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags and
    // returns a new descriptor (close-on-exec) or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `got` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got as RawFd) })
}

/// Lift the soft limit on open descriptors to the hard one.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid, exclusive rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Serve large allocations (a flow's TCP buffers, 256 KiB each by default)
/// with fresh mappings, always. glibc's default raises its mmap threshold
/// after the first such buffer is freed, so every later flow's buffers came
/// from the heap and were zeroed in full at SYN time (`calloc` memsets reused
/// heap memory): a tenth of the CPU a short connection cost, and resident
/// memory for bytes never used. A fresh mapping is zero already and costs
/// only the pages a flow writes. Process-wide; call it before other threads
/// start. No effect where the C library is not glibc.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets one of glibc's allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Run `f` with the file-creation mask set to `mask`, then restore it. The
/// mask is process-wide: call it before other threads create files.
pub fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(mask) };
    let out = f();
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    out
}

/// Under Yama's ptrace_scope 1, let process `pid` ptrace this one (and so
/// take its descriptors with pidfd_getfd), as if it were an ancestor.
pub fn allow_ptracer(pid: libc::pid_t) {
    // SAFETY: prctl(PR_SET_PTRACER) takes a pid by value and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_PTRACER, pid as libc::c_ulong, 0, 0, 0) };
}

/// The size of a memory page in bytes.
pub fn page_size() -> Option<u64> {
    // SAFETY: sysconf has no memory preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_descriptor_is_not_adopted() {
        // (Not a descriptor closed here: another test's thread could open
        // the same number meanwhile, and adopting it would close theirs.)
        assert!(adopt_fd(-1).is_none());
        assert!(adopt_fd(1 << 30).is_none());
    }

    #[test]
    fn our_own_descriptor_can_be_taken_by_pid() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let copy = take_fd(std::process::id() as libc::pid_t, file.as_raw_fd()).unwrap();
        assert_ne!(copy.as_raw_fd(), file.as_raw_fd());
    }

    #[test]
    fn files_made_under_with_umask_get_its_bits() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("slipway-umask-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let made = with_umask(0o177, || std::fs::File::create(&dir)).unwrap();
        drop(made);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(mode, 0o600);
        assert!(page_size().is_some_and(|p| p >= 4096));
    }
}
