//! Opening a sandbox's transport from its validated spec: a tap by name, a
//! tap descriptor taken from the process that made the request
//! (pidfd_getfd(2); the caller's pid comes from SO_PEERCRED on the control
//! socket, so a client can only hand over its own descriptors), QEMU's
//! stream and dgram sockets, or a vhost-user-net backend.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use hyper::StatusCode;
use vmm_glue::tap::TapError;
use vmm_glue::Tap;

use super::api::{ApiError, TransportSpec};
use crate::transport::{self, Transport};

/// Open the transport; nothing is left behind on error. Taps and vhost-user
/// get checksum and segmentation offloads at `mtu` (a tapFd only when it was
/// attached with a virtio-net header).
pub fn open(spec: &TransportSpec, caller: Option<i32>, mtu: usize) -> Result<Transport, ApiError> {
    match spec {
        TransportSpec::Tap(name) => transport::open_tap(name, Some(mtu))
            .map(Transport::Tap)
            .map_err(|e| tap_error("transport.tap", e)),
        TransportSpec::TapFd(fd) => {
            if let Some(why) = crate::confine::tap_fd_refusal() {
                return Err(ApiError::bad("transport.tapFd", why));
            }
            let pid = caller.ok_or_else(|| {
                ApiError::bad(
                    "transport.tapFd",
                    "tapFd needs a caller whose pid slipway can see (SO_PEERCRED)",
                )
            })?;
            let owned = take_fd(pid, *fd).map_err(|e| {
                ApiError::bad(
                    "transport.tapFd",
                    format!("cannot take descriptor {fd} from the calling process {pid}: {e}"),
                )
            })?;
            Tap::from_fd(owned)
                .map(|tap| transport::offload(tap, Some(mtu)))
                .map(Transport::Tap)
                .map_err(|e| tap_error("transport.tapFd", e))
        }
        TransportSpec::QemuStream { path, connect } => {
            if !connect {
                not_clobbering("transport.qemuStream", path)?;
            }
            transport::qemu_stream(path.clone(), *connect)
                .map_err(|e| ApiError::bad("transport.qemuStream", e))
        }
        TransportSpec::QemuDgram { path, peer } => {
            not_clobbering("transport.qemuDgram", path)?;
            transport::qemu_dgram(path.clone(), peer.clone())
                .map_err(|e| ApiError::bad("transport.qemuDgram", e))
        }
        TransportSpec::VhostUser { path } => {
            not_clobbering("transport.vhostUser", path)?;
            transport::vhost_user(path.clone(), Some(mtu))
                .map_err(|e| ApiError::bad("transport.vhostUser", e))
        }
    }
}

/// The QEMU links replace a stale socket file at their path: make sure
/// that is all they can replace.
fn not_clobbering(field: &'static str, path: &Path) -> Result<(), ApiError> {
    if let Some(why) = crate::confine::socket_refusal(path) {
        return Err(ApiError::bad(field, why));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(ApiError::bad(
            field,
            format!("{} exists and is not a socket", path.display()),
        )),
        _ => Ok(()),
    }
}

fn tap_error(field: &'static str, e: TapError) -> ApiError {
    // The host's own troubles are the operator's (500); the rest is the request's.
    let status = match e {
        TapError::NoTunDevice(_)
        | TapError::TunPermission(_)
        | TapError::OpenTun(_)
        | TapError::NotPermitted { .. }
        | TapError::SetIff { .. }
        | TapError::Configure { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        TapError::Busy { .. } => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError {
        status,
        message: with_causes(&e),
        field: Some(field),
    }
}

/// An error's message and its causes', `msg: cause: …`.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    msg
}

/// A duplicate of descriptor `fd` of process `pid`.
fn take_fd(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `pidfd` is a fresh descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags and
    // returns a new descriptor (close-on-exec) or -1.
    let got = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `got` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}
