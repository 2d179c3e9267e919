//! The sandbox process between fork and exec: enter the namespaces, fix the
//! mounts, build the network, hand the tap to the parent, wait for "go",
//! exec. It is a forked copy of a single-threaded parent, so plain Rust is
//! fine here, but it never returns or unwinds into the parent's code: it
//! always ends in exec or `_exit`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::control::{self, Message, Received};
use super::{iface, Plan};
use crate::tap::{Tap, TapError};

/// Directories a scratch tmpfs may cover for a moment while the sandbox's
/// files are made (the first that exists wins); it is gone again before
/// the command runs.
const SCRATCH_DIRS: [&CStr; 4] = [c"/tmp", c"/run", c"/mnt", c"/var/tmp"];

/// Why the sandbox could not be set up. It crosses to the parent as one
/// line of text (see [`one_line`]).
#[derive(Debug, thiserror::Error)]
pub(super) enum SetupError {
    #[error(
        "cannot create a user namespace: {reason}; allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces>0; on Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0), or run as root"
    )]
    UserNamespace {
        reason: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot create user, network and mount namespaces although running as root (user.max_user_namespaces=0, or a container without CAP_SYS_ADMIN?)"
    )]
    Namespaces(#[source] io::Error),
    #[error(
        "cannot write {path} to map this user to root inside the sandbox (AppArmor's kernel.apparmor_restrict_unprivileged_userns=1 forbids it)"
    )]
    IdMap {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("slipway exited while the sandbox was being set up")]
    ParentGone,
    #[error("cannot make the sandbox's mounts private (mount --make-rprivate /)")]
    PrivateMounts(#[source] io::Error),
    #[error("cannot mount a scratch tmpfs for the sandbox's files over any of /tmp, /run, /mnt, /var/tmp")]
    Scratch(#[source] io::Error),
    #[error("cannot put the sandbox's resolv.conf over /etc/resolv.conf{detail}")]
    ResolvConf {
        detail: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot put the sandbox's CA bundle over {} (it must exist inside)",
        super::CA_BUNDLE
    )]
    CaBundle(#[source] io::Error),
    #[error("cannot hide {path} inside the sandbox")]
    Hide {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot {step}")]
    Configure {
        step: String,
        #[source]
        source: io::Error,
    },
}

/// The child's whole life after fork. Never returns.
pub(super) fn run(plan: &Plan<'_>, control: OwnedFd) -> ! {
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sandbox(plan, control.as_fd())
    }))
    .unwrap_or(126);
    // SAFETY: ends this forked process at once, so none of the parent's
    // destructors, atexit handlers or stdio buffers run a second time.
    unsafe { libc::_exit(code) }
}

/// Sets up, reports, waits for "go" and execs; returns the exit status
/// when any of that fails.
fn sandbox(plan: &Plan<'_>, control: BorrowedFd<'_>) -> i32 {
    let tap = match setup(plan) {
        Ok(tap) => tap,
        Err(err) => {
            let _ = control::send(control, Message::SetupFailed(&crate::chain(&err)));
            return 126;
        }
    };
    if control::send(control, Message::Tap(tap.as_fd())).is_err() {
        return 126;
    }
    drop(tap);
    // End of file instead of "go": the parent dropped the gate or died.
    if !matches!(control::recv(control), Ok(Received::Go)) {
        return 126;
    }
    let err = exec(plan);
    if err.raw_os_error() == Some(libc::ENOENT) {
        let _ = control::send(control, Message::CommandNotFound(&plan.command));
        127
    } else {
        let message = format!("cannot run {}: {err}", plan.command);
        let _ = control::send(control, Message::ExecFailed(&message));
        126
    }
}

fn setup(plan: &Plan<'_>) -> Result<Tap, SetupError> {
    enter_namespaces()?;
    die_with_parent(plan.parent)?;
    mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE).map_err(SetupError::PrivateMounts)?;
    // Before the scratch tmpfs covers /tmp and friends, where such files live.
    for path in &plan.cfg.hidden_files {
        hide(path).map_err(|source| SetupError::Hide {
            path: path.display().to_string(),
            source,
        })?;
    }
    {
        let scratch = Scratch::mount()?;
        if let Some(content) = &plan.resolv_conf {
            install_resolv_conf(&scratch, content)?;
        }
        if let Some(bundle) = &plan.cfg.ca_bundle {
            let file = scratch.path("ca-bundle.crt");
            std::fs::write(&file, bundle)
                .and_then(|()| {
                    let (file, target) = (c_path(&file)?, c_path(Path::new(super::CA_BUNDLE))?);
                    mount(Some(&file), &target, None, libc::MS_BIND)
                })
                .map_err(SetupError::CaBundle)?;
        }
        remount_sys(&scratch);
    }
    iface::configure(plan.cfg)
}

/// New user, network and mount namespaces, this user mapped to root inside.
/// Root gets a user namespace too: without one the command would keep
/// CAP_SYS_ADMIN and CAP_NET_ADMIN over the host and could setns() into
/// slipway's own network namespace (or any other) and leave the policy
/// behind. Inside its own user namespace it is root over the namespaces it
/// owns (its links, its mounts, low ports, raw sockets) and has no
/// capability in the initial one.
fn enter_namespaces() -> Result<(), SetupError> {
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWNS).map_err(|source| {
        if uid == 0 {
            return SetupError::Namespaces(source);
        }
        SetupError::UserNamespace {
            reason: userns_refusal(&source),
            source,
        }
    })?;
    // Kernels before 3.19 have no setgroups file and need no "deny".
    match std::fs::write("/proc/self/setgroups", "deny") {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(SetupError::IdMap {
                path: "/proc/self/setgroups",
                source: err,
            })
        }
        _ => {}
    }
    for (path, id) in [("/proc/self/uid_map", uid), ("/proc/self/gid_map", gid)] {
        std::fs::write(path, format!("0 {id} 1"))
            .map_err(|source| SetupError::IdMap { path, source })?;
    }
    Ok(())
}

fn userns_refusal(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => "unprivileged user namespaces are disabled here",
        Some(libc::ENOSPC) => "the limit on user namespaces (user.max_user_namespaces) is reached",
        Some(libc::EUSERS) => "user namespaces are nested too deeply",
        Some(libc::EINVAL) => "this kernel has no user namespaces",
        _ => "the kernel refused",
    }
}

/// The sandbox is useless once slipway is gone, so it dies with it. Set after
/// entering a user namespace, which would clear it.
fn die_with_parent(parent: libc::pid_t) -> Result<(), SetupError> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers; getppid
    // has no preconditions.
    let parent_now = unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        libc::getppid()
    };
    if parent_now == parent {
        Ok(())
    } else {
        Err(SetupError::ParentGone)
    }
}

/// A tmpfs over one of [`SCRATCH_DIRS`] in the sandbox's mount namespace,
/// lazily unmounted on drop; bind mounts taken from it live on.
struct Scratch {
    dir: &'static CStr,
}

impl Scratch {
    fn mount() -> Result<Scratch, SetupError> {
        let mut last_err = io::Error::from_raw_os_error(libc::ENOENT);
        for dir in SCRATCH_DIRS {
            match mount(
                Some(c"slipway"),
                dir,
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
            ) {
                Ok(()) => return Ok(Scratch { dir }),
                Err(err) => last_err = err,
            }
        }
        Err(SetupError::Scratch(last_err))
    }

    /// `name` inside the scratch directory.
    fn path(&self, name: &str) -> std::path::PathBuf {
        Path::new(std::ffi::OsStr::from_bytes(self.dir.to_bytes())).join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: `dir` is a NUL-terminated path; umount2 only reads it.
        unsafe { libc::umount2(self.dir.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Bind-mounts a file holding `content` over /etc/resolv.conf (over the
/// target when it is a symlink: mount follows it).
fn install_resolv_conf(scratch: &Scratch, content: &[u8]) -> Result<(), SetupError> {
    let file = scratch.path("resolv.conf");
    let resolv_conf = |detail: &str, source| SetupError::ResolvConf {
        detail: detail.to_owned(),
        source,
    };
    std::fs::write(&file, content).map_err(|e| resolv_conf(" (writing the scratch copy)", e))?;
    let bound =
        c_path(&file).and_then(|file| mount(Some(&file), c"/etc/resolv.conf", None, libc::MS_BIND));
    bound.map_err(|source| {
        let detail = match std::fs::read_link("/etc/resolv.conf") {
            Ok(target) => format!(" (a symlink to {}, which must exist)", target.display()),
            Err(_) => String::new(),
        };
        resolv_conf(&detail, source)
    })
}

/// Bind-mounts /dev/null over `path`: inside, it reads as empty.
fn hide(path: &Path) -> io::Result<()> {
    mount(Some(c"/dev/null"), &c_path(path)?, None, libc::MS_BIND)
}

/// Mounts a fresh sysfs on /sys so `/sys/class/net` lists the sandbox's
/// links, carrying the cgroup mount over. Best effort: on failure /sys stays
/// the host's and only a debug line says so.
fn remount_sys(scratch: &Scratch) {
    let keep = scratch.path("cgroup");
    let keep = std::fs::create_dir(&keep).and_then(|()| c_path(&keep));
    let kept = keep.and_then(|keep| {
        mount(
            Some(c"/sys/fs/cgroup"),
            &keep,
            None,
            libc::MS_BIND | libc::MS_REC,
        )?;
        Ok(keep)
    });
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if let Err(err) = mount(Some(c"sysfs"), c"/sys", Some(c"sysfs"), flags) {
        tracing::debug!("cannot mount a sysfs for the sandbox ({err}); its /sys/class/net lists the host's links");
        return;
    }
    if let Ok(keep) = kept {
        if let Err(err) = mount(Some(&keep), c"/sys/fs/cgroup", None, libc::MS_MOVE) {
            tracing::debug!("cannot carry /sys/fs/cgroup into the sandbox: {err}");
        }
    }
}

/// Restores what exec keeps but a command should not inherit from slipway,
/// then execs the command. Returns only on failure.
fn exec(plan: &Plan<'_>) -> io::Error {
    // SAFETY: `set` is a valid sigset_t for sigemptyset to fill, and SIG_DFL
    // is a valid disposition for SIGPIPE.
    unsafe {
        // Rust programs ignore SIGPIPE, and an ignored signal stays ignored
        // across exec; the command expects the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|arg| arg.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: the program path and every argument are NUL-terminated strings
    // that outlive the call, and `argv` ends with NULL.
    unsafe { libc::execv(plan.program.as_ptr(), argv.as_ptr()) };
    io::Error::last_os_error()
}

fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes only flags.
    if unsafe { libc::unshare(flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: each pointer is NULL or a NUL-terminated string alive for the
    // call, and no filesystem here takes a data argument.
    let rc = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_user_namespace_says_how_to_fix_it() {
        let source = io::Error::from_raw_os_error(libc::EPERM);
        let err = SetupError::UserNamespace {
            reason: userns_refusal(&source),
            source,
        };
        let line = crate::chain(&err);
        assert!(
            line.starts_with(
                "cannot create a user namespace: unprivileged user namespaces are disabled"
            ),
            "{line}"
        );
        assert!(
            line.contains("kernel.unprivileged_userns_clone=1"),
            "{line}"
        );
        assert!(line.contains("or run as root"), "{line}");
        assert!(
            line.ends_with("Operation not permitted (os error 1)"),
            "{line}"
        );
    }

    #[test]
    fn tap_errors_keep_their_own_words() {
        let err = SetupError::from(TapError::TunPermission(io::Error::from_raw_os_error(
            libc::EACCES,
        )));
        let line = crate::chain(&err);
        assert!(
            line.starts_with("cannot open /dev/net/tun: permission denied"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
