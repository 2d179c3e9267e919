//! Confinement of slipway itself once its set-up is done, the way passt
//! confines itself: no_new_privs, capabilities dropped to what the mode still
//! uses (bounding set included), Landlock over the filesystem, and a seccomp
//! allowlist of the system calls the mode makes. `--confine false` (serve:
//! `confine.enabled = false`) turns all of it off, for debugging.
//!
//! Two steps, because capabilities and Landlock hold per thread while seccomp
//! can be put on every thread at once: [`begin`] runs before the process has
//! any thread of its own (threads started later inherit it), [`finish`]
//! after the last step of set-up that needs more than the mode keeps.

mod caps;
mod fs;
pub mod modes;
mod syscalls;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use caps::Cap;

/// Why slipway could not confine itself. Each is fatal: a process that asked
/// for confinement never runs unconfined without saying so.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot set no_new_privs (prctl PR_SET_NO_NEW_PRIVS)")]
    NoNewPrivs(#[source] io::Error),
    #[error("cannot drop {cap} from the capability bounding set")]
    Bounding {
        cap: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot drop capabilities (capset)")]
    Capset(#[source] io::Error),
    #[error("cannot read this process's capabilities (capget)")]
    Capget(#[source] io::Error),
    #[error("cannot restrict filesystem access with Landlock (rule for {path})")]
    LandlockRule {
        path: PathBuf,
        #[source]
        source: landlock::RulesetError,
    },
    #[error("cannot restrict filesystem access with Landlock")]
    Landlock(#[source] landlock::RulesetError),
    #[error("cannot build the seccomp filter")]
    Filter(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler that reports refused system calls")]
    Sigsys(#[source] io::Error),
}

pub type Result<T> = std::result::Result<T, ConfineError>;

/// Which of slipway's modes is being confined: each makes its own calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Attach,
    Serve,
    Edge,
}

/// A capability kept, and why.
#[derive(Debug, Clone, Copy)]
struct Kept {
    cap: Cap,
    why: &'static str,
}

/// What a mode may still do once confined.
#[derive(Debug, Clone)]
pub struct Plan {
    mode: Mode,
    /// Kept until [`finish`] (set-up between the steps needs them).
    setup: Vec<Kept>,
    /// Kept for good.
    keep: Vec<Kept>,
    fs: fs::Rules,
    /// serve: pidfd_open/pidfd_getfd for `tapFd`.
    take_fds: bool,
}

impl Plan {
    pub fn new(mode: Mode) -> Plan {
        Plan {
            mode,
            setup: Vec::new(),
            keep: Vec::new(),
            fs: fs::Rules::default(),
            take_fds: false,
        }
    }

    /// Keep `cap` for as long as the process lives, for the reason given.
    pub fn keep(mut self, cap: Cap, why: &'static str) -> Plan {
        self.keep.push(Kept { cap, why });
        self
    }

    /// Keep `cap` only until [`finish`].
    pub fn during_setup(mut self, cap: Cap, why: &'static str) -> Plan {
        self.setup.push(Kept { cap, why });
        self
    }

    /// Read the files beneath `dir` (or the file `dir`).
    pub fn read_files(mut self, path: &Path) -> Plan {
        self.fs.push(path, fs::Access::ReadFiles);
        self
    }

    /// Read files and list directories beneath `dir`.
    pub fn read_tree(mut self, dir: &Path) -> Plan {
        self.fs.push(dir, fs::Access::ReadTree);
        self
    }

    /// Make and remove sockets beneath `dir`.
    pub fn sockets(mut self, dir: &Path) -> Plan {
        self.fs.push(dir, fs::Access::Sockets);
        self
    }

    /// Make and remove sockets and directories beneath `dir`.
    pub fn scratch(mut self, dir: &Path) -> Plan {
        self.fs.push(dir, fs::Access::Scratch);
        self
    }

    /// Open, read, write and ioctl the device `path`.
    pub fn device(mut self, path: &Path) -> Plan {
        self.fs.push(path, fs::Access::Device);
        self
    }

    /// serve: take descriptors from callers (pidfd_getfd for `tapFd`).
    pub fn take_fds(mut self) -> Plan {
        self.take_fds = true;
        self
    }
}

/// Step one, while the process has no thread of its own yet: Landlock,
/// no_new_privs, the bounding set, and capabilities down to what set-up
/// still needs.
pub fn begin(plan: &Plan) -> Result<()> {
    // Landlock first: restricting needs no capability, and once the others
    // are gone nothing could loosen it anyway.
    let landlock = if plan.take_fds {
        // Landlock forbids ptrace-class access (pidfd_getfd among them) to
        // processes outside the domain: a serve that takes tap descriptors
        // from its callers goes without it.
        fs::Outcome::Declined("confine.tap_fd = true needs pidfd_getfd on the caller")
    } else {
        plan.fs.restrict()?
    };
    set_no_new_privs()?;
    let mut wanted: Vec<Cap> = plan.keep.iter().map(|k| k.cap).collect();
    wanted.extend(plan.setup.iter().map(|k| k.cap));
    caps::limit(&wanted)?;
    report(plan, &landlock);
    Ok(())
}

/// Step two, set-up done: capabilities down to what the mode keeps, and the
/// seccomp allowlist on every thread.
pub fn finish(plan: &Plan) -> Result<()> {
    let keep: Vec<Cap> = plan.keep.iter().map(|k| k.cap).collect();
    caps::limit(&keep)?;
    syscalls::install(plan.mode, plan.take_fds)?;
    selftest();
    Ok(())
}

fn set_no_new_privs() -> Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(ConfineError::NoNewPrivs(io::Error::last_os_error()));
    }
    Ok(())
}

/// One line at debug on what the mode keeps; a warning, once, when the
/// kernel enforces Landlock only in part or not at all.
fn report(plan: &Plan, landlock: &fs::Outcome) {
    let kept: Vec<String> = plan
        .keep
        .iter()
        .map(|k| format!("{} ({})", k.cap, k.why))
        .collect();
    tracing::debug!(
        mode = ?plan.mode,
        capabilities = %if kept.is_empty() { "none".to_string() } else { kept.join(", ") },
        landlock = %landlock,
        "confined: no_new_privs, seccomp allowlist"
    );
    static WARNED: OnceLock<()> = OnceLock::new();
    match landlock {
        fs::Outcome::Partly(why) | fs::Outcome::Skipped(why) if WARNED.set(()).is_ok() => {
            tracing::warn!(
                "filesystem confinement (Landlock) is {landlock}: {why}; seccomp, capabilities and no_new_privs still apply"
            )
        }
        fs::Outcome::Declined(why) => tracing::info!(
            "filesystem confinement (Landlock) is off: {why}; set confine.tap_fd = false to have it"
        ),
        _ => {}
    }
}

/// What serve's API may still ask for once confined, checked before the
/// kernel would refuse it, so the client hears why.
#[derive(Debug)]
pub struct ServeFence {
    pub socket_dirs: Vec<PathBuf>,
    pub tap_fd: bool,
}

static FENCE: OnceLock<ServeFence> = OnceLock::new();

/// Remember what the confined serve allows (once, when it confines itself).
pub fn set_fence(fence: ServeFence) {
    let _ = FENCE.set(fence);
}

/// Why a socket at `path` cannot be made by this confined process, if it
/// cannot. Unconfined: never.
pub fn socket_refusal(path: &Path) -> Option<String> {
    let fence = FENCE.get()?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    if fence.socket_dirs.iter().any(|d| dir.starts_with(d)) {
        return None;
    }
    let dirs: Vec<String> = fence
        .socket_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    Some(format!(
        "{} is outside confine.socket_dirs ({}); add its directory there",
        path.display(),
        dirs.join(", ")
    ))
}

/// Why `tapFd` cannot be served by this confined process, if it cannot.
pub fn tap_fd_refusal() -> Option<&'static str> {
    match FENCE.get() {
        Some(f) if !f.tap_fd => Some(
            "taking a descriptor from the caller is off while slipway is confined; set confine.tap_fd = true",
        ),
        _ => None,
    }
}

/// Debug builds only: with `SLIPWAY_CONFINE_SELFTEST=execve` in the
/// environment, try a system call the allowlist refuses, right after
/// confinement, so a test can watch the refusal. Release builds have no
/// such door.
fn selftest() {
    #[cfg(debug_assertions)]
    if std::env::var_os("SLIPWAY_CONFINE_SELFTEST").is_some_and(|v| v == "execve") {
        let prog = c"/bin/true";
        let argv = [prog.as_ptr(), std::ptr::null()];
        // SAFETY: a NUL-terminated path and a NULL-terminated argv that live
        // across the call. Confined, the filter refuses it before it runs.
        unsafe { libc::execv(prog.as_ptr(), argv.as_ptr()) };
    }
}
