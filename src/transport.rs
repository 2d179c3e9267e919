//! `slipway attach`'s transports, and how a sandbox outlives its VMM: when a
//! stream connection ends (the VMM exited, rebooted or was restored from a
//! snapshot), the stack is parked with its address, lease, policy and
//! handles, its flows are reset, and the next connection is served by it.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use netstack::driver::{Driver, Link, Parked};
use vmm_glue::qemu::{DgramLink, StreamEndpoint, StreamLink};
use vmm_glue::tap::TapError;
use vmm_glue::vhost_user::{self, VhostUserNet};
use vmm_glue::Tap;

/// Where a sandbox's frames come from.
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
pub fn open_tap(name: &str, offload_mtu: Option<usize>) -> Result<Tap, TapError> {
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
        let cause = std::error::Error::source(&e)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        tracing::warn!(tap = tap.name(), "offloads stay off: {e}{cause}");
    }
    tap
}

/// Serve `parked` over `transport` until `shutdown`, or until a link that
/// cannot come back (a tap, a dgram socket) fails.
pub async fn serve<F: Future<Output = ()>>(
    mut parked: Parked,
    transport: Transport,
    mut shutdown: Pin<&mut F>,
) -> Result<(), String> {
    match transport {
        Transport::Tap(tap) => serve_once(parked, tap, shutdown, "the tap").await,
        Transport::QemuDgram(link) => serve_once(parked, link, shutdown, "the dgram socket").await,
        Transport::VhostUser(net) => loop {
            // A fresh descriptor on the backend's socket pair for each resume.
            let link = net
                .link()
                .map_err(|e| format!("cannot link to the vhost-user backend: {e}"))?;
            let driver = Driver::resume(parked, link)
                .map_err(|e| format!("cannot serve the vhost-user backend: {e}"))?;
            let (back, ended) = driver.serve(shutdown.as_mut()).await;
            parked = back;
            match ended {
                None => return Ok(()),
                Some(e) if e.kind() == io::ErrorKind::ConnectionReset => tracing::warn!(
                    "the VMM left the vhost-user socket; its flows are reset and the sandbox waits for the next one"
                ),
                Some(e) => return Err(format!("the vhost-user backend failed: {e}")),
            }
        },
        Transport::QemuStream(endpoint) => loop {
            let link = tokio::select! {
                link = next_stream(&endpoint) => link.map_err(|e| format!("cannot take the VMM's stream: {e}"))?,
                _ = shutdown.as_mut() => return Ok(()),
            };
            tracing::info!("the VMM connected");
            let driver = Driver::resume(parked, link)
                .map_err(|e| format!("cannot serve the VMM's stream: {e}"))?;
            let (back, ended) = driver.serve(shutdown.as_mut()).await;
            parked = back;
            match ended {
                None => return Ok(()),
                Some(e) => tracing::warn!(
                    error = %e,
                    "the VMM's stream ended; its flows are reset and the sandbox waits for it to come back"
                ),
            }
        },
    }
}

async fn serve_once<L: Link, F: Future<Output = ()>>(
    parked: Parked,
    link: L,
    shutdown: Pin<&mut F>,
    what: &str,
) -> Result<(), String> {
    let driver = Driver::resume(parked, link).map_err(|e| format!("cannot serve {what}: {e}"))?;
    match driver.serve(shutdown).await {
        (_, None) => Ok(()),
        (_, Some(e)) => Err(format!("{what} failed: {e}")),
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

/// Parse `--qemu-stream PATH` / `--qemu-dgram PATH` into a transport.
pub fn qemu_stream(path: PathBuf, connect: bool) -> Result<Transport, String> {
    if connect {
        return Ok(Transport::QemuStream(StreamEndpoint::Connect(path)));
    }
    StreamEndpoint::listen(&path)
        .map(Transport::QemuStream)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

pub fn qemu_dgram(path: PathBuf, peer: Option<PathBuf>) -> Result<Transport, String> {
    DgramLink::bind(&path, peer)
        .map(Transport::QemuDgram)
        .map_err(|e| format!("cannot bind {}: {e}", path.display()))
}

/// Listen for VMMs on PATH as a vhost-user-net backend.
/// A vhost-user-net backend on `path`; with `offload_mtu` it offers TSO and
/// sends TCP with NEEDS_CSUM (`vhost_user::Options`).
pub fn vhost_user(path: PathBuf, offload_mtu: Option<usize>) -> Result<Transport, String> {
    let defaults = vhost_user::Options::default();
    let options = vhost_user::Options {
        tso: offload_mtu.is_some(),
        mtu: offload_mtu.unwrap_or(defaults.mtu),
        ..defaults
    };
    VhostUserNet::listen_with(&path, options)
        .map(Transport::VhostUser)
        .map_err(|e| match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        })
}
