//! Flows the core hands to an interceptor (`HostRequest::Intercept`): a TLS
//! flow whose SNI a header rule matches. The driver keeps moving the guest's
//! bytes, but into one end of a socket pair instead of the host socket; the
//! interceptor gets the other end and the host connection, and does the
//! rest (terminating TLS, re-originating it, rewriting requests) on tasks of
//! its own. What it does is not the driver's business: it lives outside
//! this crate (slipway's `inject`), so the stack needs no TLS or HTTP.

use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use crate::stack::FlowId;

/// A byte stream to the real server: a host TCP connection, or a tunnel
/// through the egress proxy (plain or TLS).
pub trait UpstreamIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> UpstreamIo for T {}

/// One intercepted flow, handed over whole.
pub struct InterceptedFlow {
    pub flow: FlowId,
    /// The guest's SNI (canonical), which the policy allows.
    pub name: String,
    /// The header rule's key, as written (`api.example.com`, `*.example.com`).
    pub rule: String,
    /// The guest's destination port (the upstream's too).
    pub port: u16,
    /// The guest's side: the flow's bytes, both ways.
    pub guest: UnixStream,
    /// The server's side, connected.
    pub upstream: Pin<Box<dyn UpstreamIo>>,
}

impl std::fmt::Debug for InterceptedFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterceptedFlow")
            .field("flow", &self.flow)
            .field("name", &self.name)
            .field("rule", &self.rule)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// What takes intercepted flows. `intercept` is called on the driver's
/// task and must not block: spawn the work.
pub trait Interceptor: Send + Sync + 'static {
    fn intercept(&self, flow: InterceptedFlow);
}

/// The driver's shared handle to its interceptor.
pub type SharedInterceptor = Arc<dyn Interceptor>;

/// An `Intercept` request whose host connection is not up yet.
pub(super) struct Pending {
    pub(super) name: String,
    pub(super) rule: String,
    pub(super) port: u16,
}

/// Hand `upstream` and the far end of a new socket pair to `interceptor`;
/// the near end is the flow's host stream from now on.
pub(super) fn hand_over(
    interceptor: &dyn Interceptor,
    flow: FlowId,
    pending: Pending,
    upstream: Pin<Box<dyn UpstreamIo>>,
) -> std::io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    interceptor.intercept(InterceptedFlow {
        flow,
        name: pending.name,
        rule: pending.rule,
        port: pending.port,
        guest: theirs,
        upstream,
    });
    Ok(ours)
}
