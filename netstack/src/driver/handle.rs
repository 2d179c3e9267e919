//! How the rest of the process reaches a running sandbox network: a cheap
//! handle that sends commands to its driver, and a sandbox parked between
//! two links.

use std::sync::Arc;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::policy::EgressPolicy;
use crate::proxy::EgressProxy;
use crate::stack::{Stack, Stats};

/// Why a connection into the guest failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GuestConnectError {
    #[error("the sandbox's incoming-connection cap is reached")]
    OverCap,
    /// Every local port of the gateway's address toward this guest port is
    /// in use: the gateway ran out of ports, the guest is not over any cap.
    #[error("the gateway has no local port free for another connection to the sandbox")]
    NoPort,
    #[error("nothing listens on that port in the sandbox (the guest answered RST)")]
    Refused,
    #[error("the sandbox did not answer")]
    TimedOut,
    #[error("the sandbox's network is gone")]
    Gone,
}

/// What the rest of the process may ask of a running sandbox network.
pub enum Command {
    ConnectGuest {
        port: u16,
        v6: bool,
        reply: oneshot::Sender<Result<UnixStream, GuestConnectError>>,
    },
    SetPolicy(EgressPolicy),
    /// Replace the DNS servers the guest may address (`Stack::set_dns_servers`).
    SetDnsServers(Vec<std::net::IpAddr>),
    /// Send new TCP flows through this egress proxy (`None`: direct);
    /// open flows keep their path.
    SetEgressProxy(Option<EgressProxy>),
    /// Reset every flow (RSTs both ways), as when a sandbox is torn down.
    ResetFlows,
    Stats(oneshot::Sender<Snapshot>),
}

/// A sandbox network's counters at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub stats: Stats,
    pub tcp_flows: usize,
    pub datagram_flows: usize,
}

/// A cheap, cloneable way in to a running `Driver` from other tasks.
#[derive(Clone)]
pub struct DriverHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl DriverHandle {
    pub(super) fn new(tx: mpsc::UnboundedSender<Command>) -> Self {
        Self { tx }
    }

    /// Open a TCP connection from the gateway to the guest's `port`; the
    /// stream carries the bytes both ways.
    pub async fn connect_guest(
        &self,
        port: u16,
        v6: bool,
    ) -> Result<UnixStream, GuestConnectError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::ConnectGuest { port, v6, reply })
            .map_err(|_| GuestConnectError::Gone)?;
        answer.await.unwrap_or(Err(GuestConnectError::Gone))
    }

    /// Replace the egress policy; live flows it denies are reset.
    pub fn set_policy(&self, policy: EgressPolicy) -> bool {
        self.tx.send(Command::SetPolicy(policy)).is_ok()
    }

    /// Replace the DNS servers whose queries the filtering resolver answers.
    pub fn set_dns_servers(&self, servers: Vec<std::net::IpAddr>) -> bool {
        self.tx.send(Command::SetDnsServers(servers)).is_ok()
    }

    /// Send the TCP flows opened from now on through `proxy` (`None`:
    /// direct again); flows already open keep their path.
    pub fn set_egress_proxy(&self, proxy: Option<EgressProxy>) -> bool {
        self.tx.send(Command::SetEgressProxy(proxy)).is_ok()
    }

    /// Reset every flow: the guest and the host peers get RSTs.
    pub fn reset_flows(&self) -> bool {
        self.tx.send(Command::ResetFlows).is_ok()
    }

    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Stats(reply)).ok()?;
        answer.await.ok()
    }
}

/// A sandbox's stack between two links: see `Driver::serve` and `Driver::resume`.
pub struct Parked {
    pub stack: Stack,
    egress_proxy: Option<Arc<EgressProxy>>,
    commands_tx: mpsc::UnboundedSender<Command>,
    commands: mpsc::UnboundedReceiver<Command>,
    interceptor: Option<super::SharedInterceptor>,
}

impl Parked {
    /// A sandbox network with no link yet (the VMM has not connected): its
    /// `DriverHandle` works already, and `Driver::resume` serves it once a
    /// link exists.
    pub fn new(stack: Stack) -> Self {
        let (commands_tx, commands) = mpsc::unbounded_channel();
        Self {
            stack,
            egress_proxy: None,
            commands_tx,
            commands,
            interceptor: None,
        }
    }

    /// Where the driver that resumes this sandbox sends intercepted flows
    /// (`Driver::set_interceptor`); kept across links.
    pub fn set_interceptor(&mut self, interceptor: super::SharedInterceptor) {
        self.interceptor = Some(interceptor);
    }

    pub(super) fn interceptor(&self) -> Option<super::SharedInterceptor> {
        self.interceptor.clone()
    }

    pub fn handle(&self) -> DriverHandle {
        DriverHandle::new(self.commands_tx.clone())
    }

    /// The egress proxy the sandbox starts with (see `Driver::set_egress_proxy`).
    pub fn set_egress_proxy(&mut self, proxy: Option<EgressProxy>) {
        self.egress_proxy = proxy.map(Arc::new);
    }

    pub(super) fn from_parts(
        stack: Stack,
        egress_proxy: Option<Arc<EgressProxy>>,
        commands_tx: mpsc::UnboundedSender<Command>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Self {
        Self {
            stack,
            egress_proxy,
            commands_tx,
            commands,
            interceptor: None,
        }
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn into_parts(
        self,
    ) -> (
        Stack,
        Option<Arc<EgressProxy>>,
        mpsc::UnboundedSender<Command>,
        mpsc::UnboundedReceiver<Command>,
    ) {
        (
            self.stack,
            self.egress_proxy,
            self.commands_tx,
            self.commands,
        )
    }
}
