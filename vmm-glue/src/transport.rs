//! A sandbox's transport, in one place: what the user asked for
//! ([`TransportSpec`], from `slipway attach`'s flags, the control API's JSON
//! or `slipway ctl`), the opened link ([`Transport`]), why opening or serving
//! it failed ([`TransportError`]), and how a sandbox outlives its VMM
//! ([`serve`]): when a stream or vhost-user connection ends (the VMM exited,
//! rebooted or was restored from a snapshot), the stack is parked with its
//! address, lease, policy and handles, its flows are reset, and the next
//! connection is served by it.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use netstack::driver::{Driver, Link, Parked};

use crate::qemu::{DgramLink, StreamEndpoint, StreamLink};
use crate::tap::{Tap, TapError};
use crate::vhost_user::{self, VhostUserNet};

/// Where a sandbox's frames come from, as asked (nothing opened yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportSpec {
    /// A tap by name, opened (created if missing) in slipway's namespace.
    Tap(String),
    /// A tap already open on descriptor N: inherited by this process, or of
    /// the process that asked (see [`FdOwner`]).
    TapFd(i32),
    /// QEMU `-netdev stream`: slipway listens on `path`, or connects to it.
    QemuStream { path: PathBuf, connect: bool },
    /// QEMU `-netdev dgram`: slipway binds `path`; `peer` is QEMU's socket.
    QemuDgram {
        path: PathBuf,
        peer: Option<PathBuf>,
    },
    /// A vhost-user-net backend listening on `path` (QEMU, cloud-hypervisor).
    VhostUser { path: PathBuf },
}

/// Whose descriptor a [`TransportSpec::TapFd`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdOwner {
    /// This process's own, inherited to own (`slipway attach --tap-fd`).
    Inherited,
    /// The process that made the request (its pid from SO_PEERCRED, when
    /// known), copied with pidfd_getfd(2) so a client can hand over only
    /// descriptors of its own.
    Caller(Option<libc::pid_t>),
}

/// How to open a spec: offloads, and whose descriptor a tap fd is.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Checksum and segmentation offloads at this MTU where the link carries
    /// a virtio-net header (taps, vhost-user); `None`: plain frames.
    pub offload_mtu: Option<usize>,
    pub fd_owner: FdOwner,
}

/// Why a transport could not be opened or served. Each message names the
/// input; the OS error behind it is its `source()` (print with [`crate::chain`]).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The tap's own errors name the tap or the descriptor and say the fix.
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("no open file descriptor {fd} to adopt as a tap")]
    NoSuchFd { fd: i32 },
    #[error("tapFd needs a caller whose pid slipway can see (SO_PEERCRED)")]
    NoCaller,
    #[error("cannot take descriptor {fd} from the calling process {pid}")]
    TakeFd {
        fd: i32,
        pid: libc::pid_t,
        #[source]
        source: io::Error,
    },
    #[error("{} exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The backend's errors name the socket path.
    #[error(transparent)]
    VhostUser(#[from] vhost_user::Error),
    #[error("cannot link to the vhost-user backend")]
    VhostUserLink(#[source] io::Error),
    #[error("cannot take the VMM's stream")]
    NextStream(#[source] io::Error),
    #[error("cannot serve {link}")]
    Serve {
        link: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{link} failed")]
    Failed {
        link: &'static str,
        #[source]
        source: io::Error,
    },
}

impl TransportSpec {
    /// The name the control API gives this kind of transport.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportSpec::Tap(_) => "tap",
            TransportSpec::TapFd(_) => "tapFd",
            TransportSpec::QemuStream { .. } => "qemuStream",
            TransportSpec::QemuDgram { .. } => "qemuDgram",
            TransportSpec::VhostUser { .. } => "vhostUser",
        }
    }

    /// The socket file this transport owns, if any: no two sandboxes may share one.
    pub fn socket_path(&self) -> Option<&PathBuf> {
        match self {
            TransportSpec::QemuStream {
                path,
                connect: false,
            }
            | TransportSpec::QemuDgram { path, .. }
            | TransportSpec::VhostUser { path } => Some(path),
            _ => None,
        }
    }

    /// Open the link; nothing is left behind on error.
    pub fn open(&self, options: OpenOptions) -> Result<Transport, TransportError> {
        let mtu = options.offload_mtu;
        if let Some(path) = self.socket_path() {
            not_clobbering(path)?;
        }
        match self {
            TransportSpec::Tap(name) => Ok(Transport::Tap(open_tap(name, mtu)?)),
            TransportSpec::TapFd(fd) => {
                let owned = match options.fd_owner {
                    FdOwner::Inherited => {
                        crate::sys::adopt_fd(*fd).ok_or(TransportError::NoSuchFd { fd: *fd })?
                    }
                    FdOwner::Caller(None) => return Err(TransportError::NoCaller),
                    FdOwner::Caller(Some(pid)) => {
                        crate::sys::take_fd(pid, *fd).map_err(|source| TransportError::TakeFd {
                            fd: *fd,
                            pid,
                            source,
                        })?
                    }
                };
                Ok(Transport::Tap(offload(Tap::from_fd(owned)?, mtu)))
            }
            TransportSpec::QemuStream {
                path,
                connect: true,
            } => Ok(Transport::QemuStream(StreamEndpoint::Connect(path.clone()))),
            TransportSpec::QemuStream {
                path,
                connect: false,
            } => StreamEndpoint::listen(path)
                .map(Transport::QemuStream)
                .map_err(|source| TransportError::Listen {
                    path: path.clone(),
                    source,
                }),
            TransportSpec::QemuDgram { path, peer } => DgramLink::bind(path, peer.clone())
                .map(Transport::QemuDgram)
                .map_err(|source| TransportError::Bind {
                    path: path.clone(),
                    source,
                }),
            TransportSpec::VhostUser { path } => {
                // With offloads it offers TSO and sends TCP with NEEDS_CSUM.
                let defaults = vhost_user::Options::default();
                let options = vhost_user::Options {
                    tso: mtu.is_some(),
                    mtu: mtu.unwrap_or(defaults.mtu),
                    ..defaults
                };
                Ok(Transport::VhostUser(VhostUserNet::listen_with(
                    path, options,
                )?))
            }
        }
    }
}

/// The QEMU and vhost-user links replace a stale socket file at their path:
/// make sure that is all they can replace.
fn not_clobbering(path: &Path) -> Result<(), TransportError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(TransportError::NotASocket {
            path: path.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// An opened link a sandbox's frames come through.
pub enum Transport {
    Tap(Tap),
    QemuStream(StreamEndpoint),
    QemuDgram(DgramLink),
    VhostUser(VhostUserNet),
}

impl Transport {
    pub fn describe(&self) -> String {
        match self {
            Transport::Tap(t) if t.offloads().tso => {
                format!("tap {}, checksum and TSO offloads on", t.name())
            }
            Transport::Tap(t) => format!("tap {}", t.name()),
            Transport::QemuStream(StreamEndpoint::Listen { path, .. }) => {
                format!("qemu stream, listening on {}", path.display())
            }
            Transport::QemuStream(StreamEndpoint::Connect(path)) => {
                format!("qemu stream, connecting to {}", path.display())
            }
            Transport::QemuDgram(_) => "qemu dgram".to_string(),
            Transport::VhostUser(net) => {
                format!("vhost-user, listening on {}", net.path().display())
            }
        }
    }
}

/// Tap `name`, with checksum and segmentation offloads on at `offload_mtu`
/// (`None`: plain frames).
fn open_tap(name: &str, offload_mtu: Option<usize>) -> Result<Tap, TapError> {
    match offload_mtu {
        None => Tap::open(name),
        Some(mtu) => Tap::open_vnet(name).map(|tap| offload(tap, Some(mtu))),
    }
}

/// Turns offloads on for a tap that has a virtio-net header, when
/// `offload_mtu` asks for them; one without a header stays plain. A kernel
/// that refuses them leaves the tap plain too, with a warning.
pub fn offload(mut tap: Tap, offload_mtu: Option<usize>) -> Tap {
    let Some(mtu) = offload_mtu else {
        return tap;
    };
    if !tap.has_vnet_header() {
        tracing::info!(
            tap = tap.name(),
            "no virtio-net header on the tap: offloads stay off"
        );
        return tap;
    }
    if let Err(e) = tap.enable_offloads(mtu) {
        tracing::warn!(tap = tap.name(), "offloads stay off: {}", crate::chain(&e));
    }
    tap
}

/// Serve `parked` over `transport` until `shutdown`, or until a link that
/// cannot come back (a tap, a dgram socket) fails.
pub async fn serve<F: Future<Output = ()>>(
    mut parked: Parked,
    transport: Transport,
    mut shutdown: Pin<&mut F>,
) -> Result<(), TransportError> {
    match transport {
        Transport::Tap(tap) => serve_once(parked, tap, shutdown, "the tap").await,
        Transport::QemuDgram(link) => serve_once(parked, link, shutdown, "the dgram socket").await,
        Transport::VhostUser(net) => loop {
            // A fresh descriptor on the backend's socket pair for each resume.
            let link = net.link().map_err(TransportError::VhostUserLink)?;
            let what = "the vhost-user backend";
            let ended;
            (parked, ended) = resume(parked, link, shutdown.as_mut(), what).await?;
            match ended {
                None => return Ok(()),
                Some(e) if e.kind() == io::ErrorKind::ConnectionReset => tracing::warn!(
                    "the VMM left the vhost-user socket; its flows are reset and the sandbox waits for the next one"
                ),
                Some(source) => return Err(TransportError::Failed { link: what, source }),
            }
        },
        Transport::QemuStream(endpoint) => loop {
            let link = tokio::select! {
                link = next_stream(&endpoint) => link.map_err(TransportError::NextStream)?,
                _ = shutdown.as_mut() => return Ok(()),
            };
            tracing::info!("the VMM connected");
            let ended;
            (parked, ended) = resume(parked, link, shutdown.as_mut(), "the VMM's stream").await?;
            if let Some(e) = ended {
                tracing::warn!(
                    error = %e,
                    "the VMM's stream ended; its flows are reset and the sandbox waits for it to come back"
                );
            } else {
                return Ok(());
            }
        },
    }
}

/// Serve `parked` over one link until `shutdown` or the link's end; the
/// sandbox comes back parked, with why the link ended (`None`: shutdown).
async fn resume<L: Link, F: Future<Output = ()>>(
    parked: Parked,
    link: L,
    shutdown: Pin<&mut F>,
    what: &'static str,
) -> Result<(Parked, Option<io::Error>), TransportError> {
    let driver = Driver::resume(parked, link)
        .map_err(|source| TransportError::Serve { link: what, source })?;
    Ok(driver.serve(shutdown).await)
}

async fn serve_once<L: Link, F: Future<Output = ()>>(
    parked: Parked,
    link: L,
    shutdown: Pin<&mut F>,
    what: &'static str,
) -> Result<(), TransportError> {
    match resume(parked, link, shutdown, what).await? {
        (_, None) => Ok(()),
        (_, Some(source)) => Err(TransportError::Failed { link: what, source }),
    }
}

/// The next stream from the VMM: accepted, or connected (retrying while QEMU starts).
async fn next_stream(endpoint: &StreamEndpoint) -> io::Result<StreamLink> {
    match endpoint {
        StreamEndpoint::Listen { listener, .. } => {
            let listener = listener.try_clone()?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(listener)?;
            let (sock, _) = listener.accept().await?;
            StreamLink::new(sock.into_std()?)
        }
        StreamEndpoint::Connect(path) => loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(sock) => return StreamLink::new(sock),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tap names the kernel takes and refuses (`dev_valid_name`), one
    /// row per rule; `Some(reason)` is the refusal.
    #[test]
    fn tap_names_follow_the_kernels_rules() {
        let rows: &[(&str, Option<&str>)] = &[
            ("tap0", None),
            ("t", None),
            ("fifteen-chars-x", None),
            ("sixteen-chars-xx", Some("it is longer than 15 bytes")),
            ("", Some("it is empty")),
            (".", Some("it is `.` or `..`")),
            ("..", Some("it is `.` or `..`")),
            ("...", None),
            (".tap", None),
            ("a/b", Some("it contains `/`, `:`, a NUL or whitespace")),
            ("a:b", Some("it contains `/`, `:`, a NUL or whitespace")),
            ("a b", Some("it contains `/`, `:`, a NUL or whitespace")),
            ("a\tb", Some("it contains `/`, `:`, a NUL or whitespace")),
            ("a\nb", Some("it contains `/`, `:`, a NUL or whitespace")),
            ("a\x0bb", Some("it contains `/`, `:`, a NUL or whitespace")),
            ("a\x0cb", Some("it contains `/`, `:`, a NUL or whitespace")),
            ("a\rb", Some("it contains `/`, `:`, a NUL or whitespace")),
            ("a\0b", Some("it contains `/`, `:`, a NUL or whitespace")),
            // The kernel's isspace() counts 0xa0 (Latin-1 NBSP): a UTF-8 name
            // with that byte in it (U+00E0 is c3 a0) is refused too.
            (
                "t\u{e0}p",
                Some("it contains `/`, `:`, a NUL or whitespace"),
            ),
            ("t\u{e9}p", None),
            // Anything else goes, as in the kernel: '%d' asks it for a number.
            ("slipway%d", None),
            ("t-a_p.0", None),
            ("tap@1+x=y", None),
            // 15 bytes but fewer characters: bytes are what count.
            ("\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}x", None),
            (
                "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
                Some("it is longer than 15 bytes"),
            ),
        ];
        for (name, want) in rows {
            let got = Tap::check_name(name).err().map(|e| match e {
                TapError::InvalidName { reason, .. } => reason,
                other => panic!("{name:?}: {other}"),
            });
            assert_eq!(got, *want, "{name:?}");
        }
    }

    #[test]
    fn a_bad_tap_name_is_refused_before_the_kernel_is_asked() {
        let opts = OpenOptions {
            offload_mtu: None,
            fd_owner: FdOwner::Inherited,
        };
        let e = TransportSpec::Tap("no/slash".into())
            .open(opts)
            .err()
            .unwrap();
        assert!(
            matches!(e, TransportError::Tap(TapError::InvalidName { .. })),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("invalid tap name \"no/slash\""),
            "{e}"
        );
    }

    #[test]
    fn a_listening_link_never_replaces_a_file_that_is_not_a_socket() {
        let dir = std::env::temp_dir().join(format!("slipway-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let opts = OpenOptions {
            offload_mtu: None,
            fd_owner: FdOwner::Inherited,
        };
        for spec in [
            TransportSpec::QemuStream {
                path: file.clone(),
                connect: false,
            },
            TransportSpec::QemuDgram {
                path: file.clone(),
                peer: None,
            },
            TransportSpec::VhostUser { path: file.clone() },
        ] {
            let e = spec.open(opts).err().unwrap();
            assert!(matches!(e, TransportError::NotASocket { .. }), "{e}");
            assert!(e.to_string().ends_with("exists and is not a socket"), "{e}");
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_tap_fd_names_its_descriptor_or_its_missing_caller() {
        let inherited = OpenOptions {
            offload_mtu: None,
            fd_owner: FdOwner::Inherited,
        };
        let e = TransportSpec::TapFd(-1).open(inherited).err().unwrap();
        assert!(matches!(e, TransportError::NoSuchFd { fd: -1 }), "{e}");
        let no_caller = OpenOptions {
            fd_owner: FdOwner::Caller(None),
            ..inherited
        };
        let e = TransportSpec::TapFd(3).open(no_caller).err().unwrap();
        assert!(matches!(e, TransportError::NoCaller), "{e}");
    }
}
