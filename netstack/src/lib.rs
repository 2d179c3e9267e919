//! One sandbox's network: the egress policy, the gateway's services and a
//! sans-IO core over smoltcp (`Stack`), plus a thin tokio driver that owns
//! the host sockets (`driver`).

pub mod config;
mod device;
pub mod dns;
pub mod driver;
pub mod names;
pub mod policy;
pub mod proxy;
mod services;
pub mod sniff;
pub mod socks;
pub mod stack;
pub mod wire;

pub use config::{AddressPlan, Caps, Offloads, StackConfig};
pub use policy::{EgressPolicy, PolicyError, PolicySpec, Verdict};
pub use proxy::{EgressProxy, ProxyError, ProxySpec, Secret, TlsSpec};
pub use stack::{
    ConnectError, DatagramKind, FlowId, HostEvent, HostRequest, InboundError, Stack, Stats,
};
