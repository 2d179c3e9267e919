//! The seccomp allowlist: the system calls each mode makes once set up,
//! built with rust-vmm's seccompiler and put on every thread (TSYNC).
//!
//! A call outside the list traps (SECCOMP_RET_TRAP) rather than killing the
//! process outright: the SIGSYS handler writes one line naming the call,
//! then the process dies of SIGSYS all the same, as it would with
//! SECCOMP_RET_KILL_PROCESS. A missing entry here is a bug that kills real
//! users; the line is what lets them report it.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use super::{ConfineError, Mode, Result};

/// What every mode does after set-up: memory, threads and futexes (tokio,
/// std, glibc), epoll and eventfd (tokio, vhost-user), timers, signals,
/// randomness (rustls, ring), descriptors, sockets of the allowed families,
/// and the few file calls Landlock then narrows to the mode's paths.
const COMMON: &[libc::c_long] = &[
    // Descriptors, reading and writing.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_openat,
    libc::SYS_getdents64,
    // Rust's panic report (with RUST_BACKTRACE set) shortens paths with it; a
    // panic that is caught at the sandbox boundary must not become SIGSYS.
    libc::SYS_getcwd,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    // Memory (the allocator, thread stacks, vhost-user's guest memory).
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_memfd_create,
    // Threads (tokio's workers and blocking pool, vhost-user's threads).
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    // Waiting: tokio's epoll and eventfd, vhost-user's own loops.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_restart_syscall,
    // Time.
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // Signals (tokio's handlers, abort, the SIGSYS report itself).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    // Randomness: rustls and ring, the stacks' seeds.
    libc::SYS_getrandom,
    // Sockets: TCP, UDP and ICMP flows, the gateway, VMM links. socket()
    // itself is checked by family below.
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
];

/// Older calls x86_64 still has and glibc or std may use.
#[cfg(target_arch = "x86_64")]
const LEGACY: &[libc::c_long] = &[
    libc::SYS_poll,
    libc::SYS_epoll_wait,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_unlink,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_open,
    libc::SYS_readlink,
    libc::SYS_pipe,
    libc::SYS_select,
];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY: &[libc::c_long] = &[];

/// `run`: reap the command, pass signals on to it.
const RUN: &[libc::c_long] = &[libc::SYS_wait4, libc::SYS_waitid, libc::SYS_kill];

/// `serve` with `confine.tap_fd`: take a tap descriptor from the caller.
const TAKE_FDS: &[libc::c_long] = &[libc::SYS_pidfd_open, libc::SYS_pidfd_getfd];

/// Socket families in use: unix (VMM links, control API, socket pairs),
/// IPv4 and IPv6 (flows, gateway, metrics). Not netlink, not packet.
const FAMILIES: &[libc::c_int] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

/// prctl options still used: thread names (std and tokio name their
/// threads), glibc naming its anonymous mappings.
const PRCTL: &[libc::c_int] = &[libc::PR_SET_NAME, libc::PR_GET_NAME, 0x5356_4d41];

fn arg_eq(index: u8, value: u64) -> Result<SeccompRule> {
    let cond = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(ConfineError::Filter)?;
    SeccompRule::new(vec![cond]).map_err(ConfineError::Filter)
}

fn arch() -> Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(ConfineError::Filter)
}

/// The allowlist of `mode`, as BPF.
fn allowlist(mode: Mode, take_fds: bool) -> Result<seccompiler::BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[libc::c_long] = match mode {
        Mode::Run => RUN,
        // serve's run-time file calls (settings re-read on SIGHUP, socket
        // files and vhost-user's private directory) are in COMMON and
        // LEGACY; Landlock narrows them to its paths.
        Mode::Attach | Mode::Serve | Mode::Edge => &[],
    };
    let fds: &[libc::c_long] = if take_fds { TAKE_FDS } else { &[] };
    for &nr in COMMON.iter().chain(LEGACY).chain(extra).chain(fds) {
        rules.insert(nr, Vec::new());
    }
    rules.insert(
        libc::SYS_socket,
        FAMILIES
            .iter()
            .map(|&f| arg_eq(0, f as u64))
            .collect::<Result<_>>()?,
    );
    rules.insert(
        libc::SYS_prctl,
        PRCTL
            .iter()
            .map(|&o| arg_eq(0, o as u64))
            .collect::<Result<_>>()?,
    );
    // New threads, never new processes: clone only with CLONE_THREAD.
    // clone3 passes its flags in memory a filter cannot read; it gets
    // ENOSYS from the second filter and glibc falls back to clone.
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .map_err(ConfineError::Filter)?;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![thread]).map_err(ConfineError::Filter)?],
    );
    rules.insert(libc::SYS_clone3, Vec::new());
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch()?)
        .map_err(ConfineError::Filter)?;
    filter.try_into().map_err(ConfineError::Filter)
}

/// clone3 answers ENOSYS; everything else passes on to the allowlist.
fn no_clone3() -> Result<seccompiler::BpfProgram> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(ConfineError::Filter)?;
    filter.try_into().map_err(ConfineError::Filter)
}

/// Put the mode's filters on every thread of the process.
pub fn install(mode: Mode, take_fds: bool) -> Result<()> {
    let allow = allowlist(mode, take_fds)?;
    let clone3 = no_clone3()?;
    report_refusals()?;
    // clone3's first: installing a filter calls prctl(PR_SET_NO_NEW_PRIVS),
    // which the allowlist refuses once it is in place.
    seccompiler::apply_filter_all_threads(&clone3).map_err(ConfineError::Seccomp)?;
    seccompiler::apply_filter_all_threads(&allow).map_err(ConfineError::Seccomp)?;
    Ok(())
}

/// Calls a compromised or buggy slipway would want, named in the report.
const NAMES: &[(libc::c_long, &str)] = &[
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_wait4, "wait4"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_fchmodat, "fchmodat"),
    (libc::SYS_fchmod, "fchmod"),
    (libc::SYS_fchown, "fchown"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_sysinfo, "sysinfo"),
    (libc::SYS_getrusage, "getrusage"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_splice, "splice"),
    (libc::SYS_sendfile, "sendfile"),
    (libc::SYS_membarrier, "membarrier"),
];

/// SIGSYS: one line naming the refused call, then death by SIGSYS (the
/// handler is reset on entry; the signal sent again is taken once it
/// returns). Only async-signal-safe work: formatting into a stack buffer,
/// write(2), setrlimit(2) (no core file), tgkill(2).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    /// The kernel's `_sigsys` view of siginfo: after signo, errno, code
    /// and padding come the call address, the call number and the arch.
    #[repr(C)]
    struct SigsysInfo {
        signo: libc::c_int,
        errno: libc::c_int,
        code: libc::c_int,
        _pad: libc::c_int,
        call_addr: *mut libc::c_void,
        syscall: libc::c_int,
        arch: libc::c_uint,
    }
    // SAFETY: the kernel hands a valid siginfo for SIGSYS, at least as
    // large as its `_sigsys` member, which this struct mirrors.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let mut line = [0u8; 320];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"slipway: confinement refused system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = i64::from(nr).unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    if let Some((_, name)) = NAMES.iter().find(|(n, _)| *n == libc::c_long::from(nr)) {
        put(b" (");
        put(name.as_bytes());
        put(b")");
    }
    put(b"; this is a bug in slipway's seccomp allowlist unless something made slipway misbehave; --confine false turns confinement off\n");
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: write, setrlimit, getpid, gettid and tgkill are
    // async-signal-safe and read only valid memory.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}

fn report_refusals() -> Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO
    // signature and only async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(ConfineError::Sigsys(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_a_filter() {
        for mode in [Mode::Run, Mode::Attach, Mode::Serve, Mode::Edge] {
            assert!(!allowlist(mode, false).unwrap().is_empty());
        }
        assert!(!allowlist(Mode::Serve, true).unwrap().is_empty());
    }

    #[test]
    fn nothing_that_escapes_is_allowed() {
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_bpf,
            libc::SYS_process_vm_writev,
        ] {
            assert!(
                !COMMON.iter().chain(LEGACY).chain(RUN).any(|&n| n == nr),
                "{nr}"
            );
        }
    }
}
