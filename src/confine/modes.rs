//! What each mode keeps once set up, with the reason next to each right.

use std::path::{Path, PathBuf};

use super::{Cap, Mode, Plan, ServeFence};
use crate::cli::AttachLink;

const TUN: &str = "/dev/net/tun";

/// `run`: the tap is open, the command forked, the gateway's sockets bound
/// and its certificates read. What is left is sockets, the tap's fd, reaping
/// the command and passing signals on: no capability, no path at all.
pub fn run() -> Plan {
    Plan::new(Mode::Run)
}

/// `attach`: the link is opened between [`super::begin`] and
/// [`super::finish`]; afterwards no capability is left. Paths: the socket's
/// directory (a stale socket replaced at start, the socket removed at exit).
pub fn attach(link: &AttachLink, connect: bool) -> Plan {
    let mut plan = Plan::new(Mode::Attach);
    if link.tap.is_some() {
        plan = plan.device(Path::new(TUN)).during_setup(
            Cap::NET_ADMIN,
            "TUNSETIFF creates or attaches the tap named by --tap",
        );
    }
    let listen_stream = link.qemu_stream.as_deref().filter(|_| !connect);
    for path in [listen_stream, link.qemu_dgram.as_deref()]
        .into_iter()
        .flatten()
    {
        plan = plan.sockets(parent(path));
    }
    if let Some(path) = &link.vhost_user {
        // The backend's private socket lives in a directory of its own
        // under the temp dir.
        plan = plan.sockets(parent(path)).scratch(&std::env::temp_dir());
    }
    plan
}

/// What `serve` reads and makes at run time.
pub struct ServePaths<'a> {
    pub config: Option<&'a Path>,
    pub token_file: Option<&'a Path>,
    pub tls: Vec<&'a Path>,
    pub control_socket: &'a Path,
    pub socket_dirs: &'a [PathBuf],
    pub tap_fd: bool,
}

/// `serve`: sandboxes come and go at run time, so it keeps what creating
/// one takes, and what SIGHUP's reload and the metrics read.
pub fn serve(paths: &ServePaths<'_>) -> (Plan, ServeFence) {
    let mut plan = Plan::new(Mode::Serve)
        .keep(
            Cap::NET_ADMIN,
            "a sandbox created with transport.tap makes its tap at run time (TUNSETIFF); vhost-user socket buffers past net.core.wmem_max (SO_SNDBUFFORCE)",
        )
        .device(Path::new(TUN))
        // Metrics: resident memory and open descriptors.
        .read_tree(Path::new("/proc/self"))
        // The default DNS upstream, read again on reload.
        .read_files(Path::new("/etc/resolv.conf"))
        // The control socket, removed at exit.
        .sockets(parent(paths.control_socket))
        // vhost-user's private socket directories.
        .scratch(&std::env::temp_dir());
    if paths.tap_fd {
        plan = plan.take_fds().keep(
            Cap::SYS_PTRACE,
            "transport.tapFd takes the descriptor from a caller that may have other credentials (pidfd_getfd)",
        );
    }
    // Reload reads the settings file and what it names again: their
    // directories, so a file replaced by rename is still readable.
    for file in paths
        .config
        .iter()
        .chain(paths.token_file.iter())
        .chain(paths.tls.iter())
    {
        let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        plan = plan.read_files(parent(&file));
    }
    for dir in paths.socket_dirs {
        plan = plan.sockets(dir);
    }
    // The API holds VMM sockets to the configured directories, although
    // Landlock must also let sockets be made in the control socket's and
    // the temp directory.
    let fence = ServeFence {
        socket_dirs: paths
            .socket_dirs
            .iter()
            .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
            .collect(),
        tap_fd: paths.tap_fd,
    };
    (plan, fence)
}

/// `edge`: its listeners are bound and its certificates read; what is left
/// is sockets, and `/proc/self` for the metrics. No capability, no other path.
pub fn edge() -> Plan {
    Plan::new(Mode::Edge).read_tree(Path::new("/proc/self"))
}

/// The directory a path is in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}
