//! The public URL gateway: `<port>-<sandboxId>.<domain>` (or the
//! `E2b-Sandbox-*` headers) is routed into that sandbox's own stack, after the
//! access-token check, with Host masking, for HTTP/1.1, HTTP/2, h2c,
//! upgrades and raw TCP forwards.
//!
//! Hostile bytes (Host, headers) are parsed in `target` and `token` into
//! validated types; the proxy only sees those. Nothing here panics on input.

pub mod clients;
pub mod cookie;
pub mod directory;
pub mod forward;
pub mod guest_tls;
pub mod idle;
pub mod pool;
mod proxy;
pub mod record;
pub mod refusal;
pub mod server;
pub mod target;
pub mod tls;
pub mod token;

pub use directory::{
    BoxGuestStream, ConnectFuture, Directory, GuestConnector, GuestError, HostMask, Route,
    RouteSpec,
};
pub use forward::{Forward, ForwardSpec};
pub use guest_tls::{https_ports, BadHttpsPorts};
pub use record::{NodeName, SandboxRecord};
pub use refusal::Refusal;
pub use server::{Gateway, GatewayConfig, GatewayStats, Limits};
pub use target::{Domain, GuestPort, SandboxId, Target};
pub use token::{AccessToken, TokenCheck, TOKEN_HEADER};

/// Errors a body can carry on its way through.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway gives.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;
