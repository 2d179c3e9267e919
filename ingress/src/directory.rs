//! Which sandboxes the gateway knows and how to reach each: the `Directory`
//! maps a sandbox id to its `Route` (a way into its stack, its access token,
//! its Host mask and its incoming-connection cap). The binary fills it; the
//! gateway only reads it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::pool::GuestPool;
use crate::target::{GuestPort, SandboxId};
use crate::token::{self, AccessToken, NoRandomness, TokenCheck, TokenDigest};

/// A byte stream to a port in the guest.
pub trait GuestStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> GuestStream for T {}

pub type BoxGuestStream = Box<dyn GuestStream>;
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<BoxGuestStream, GuestError>> + Send + 'a>>;

/// Why the guest could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    #[error("the sandbox's incoming-connection cap is reached")]
    OverCap,
    /// The gateway's side ran out of local ports to the sandbox: not the
    /// sandbox's fault, and not a cap it could lower.
    #[error("the gateway has no local port free for another connection to the sandbox")]
    NoPort,
    #[error("nothing listens on that port in the sandbox")]
    Refused,
    #[error("the sandbox did not answer")]
    TimedOut,
    #[error("the sandbox's network is gone")]
    Gone,
}

/// A way into one sandbox's network: opens a TCP connection from the
/// sandbox's gateway address to the guest. How the stack runs is not the
/// gateway's business.
pub trait GuestConnector: Send + Sync + 'static {
    fn connect(&self, port: GuestPort) -> ConnectFuture<'_>;
}

/// `mask_request_host`: the Host the guest sees, `${PORT}` standing for the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMask(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid mask-request-host {0:?}: give a host[:port], e.g. localhost:${{PORT}}")]
pub struct BadHostMask(pub String);

impl HostMask {
    pub const PORT: &'static str = "${PORT}";

    pub fn parse(s: &str) -> Result<Self, BadHostMask> {
        let sample = s.replace(Self::PORT, "65535");
        let ok = !sample.is_empty()
            && sample.len() <= 253
            && !sample.contains(['/', '?', '#', '@', '$'])
            && sample.parse::<http::uri::Authority>().is_ok()
            && http::HeaderValue::from_str(&sample).is_ok();
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(BadHostMask(s.to_string()))
        }
    }

    pub fn render(&self, port: GuestPort) -> http::HeaderValue {
        let host = self.0.replace(Self::PORT, &port.to_string());
        // Checked in `parse` with the widest port.
        http::HeaderValue::from_str(&host).unwrap_or(http::HeaderValue::from_static("localhost"))
    }
}

/// What the operator asks of one sandbox's public URLs.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub allow_public_traffic: bool,
    pub mask_request_host: Option<HostMask>,
    /// Connections into the guest at once (HTTP requests in flight, open
    /// upgrades and forwards); more get 429.
    pub max_connections: usize,
    /// E2B's `httpsPorts`: guest ports the gateway speaks TLS to (see
    /// `guest_tls`); validated by `guest_tls::https_ports`.
    pub https_ports: Vec<GuestPort>,
}

/// One sandbox as the gateway sees it.
pub struct Route {
    guest: Arc<dyn GuestConnector>,
    /// `None`: public traffic is allowed.
    token: RwLock<Option<TokenDigest>>,
    mask: Option<HostMask>,
    max_connections: usize,
    slots: Arc<Semaphore>,
    /// Sorted, without duplicates.
    https_ports: Vec<GuestPort>,
    pub(crate) pool: GuestPool,
}

impl Route {
    /// A route, and the sandbox's new token when public traffic is not allowed.
    pub fn new(
        guest: Arc<dyn GuestConnector>,
        spec: RouteSpec,
    ) -> Result<(Self, Option<AccessToken>), NoRandomness> {
        let token = if spec.allow_public_traffic {
            None
        } else {
            Some(AccessToken::generate()?)
        };
        let mut https_ports = spec.https_ports;
        https_ports.sort();
        https_ports.dedup();
        let route = Self {
            guest,
            token: RwLock::new(token.as_ref().map(AccessToken::digest)),
            mask: spec.mask_request_host,
            max_connections: spec.max_connections,
            slots: Arc::new(Semaphore::new(spec.max_connections)),
            https_ports,
            pool: GuestPool::default(),
        };
        Ok((route, token))
    }

    /// Replace the token; the old one stops working at once. `None` for a
    /// sandbox that allows public traffic (it has no token).
    pub fn rotate_token(&self) -> Result<Option<AccessToken>, NoRandomness> {
        let mut slot = self.token.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            return Ok(None);
        }
        let fresh = AccessToken::generate()?;
        *slot = Some(fresh.digest());
        Ok(Some(fresh))
    }

    pub fn is_public(&self) -> bool {
        self.token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Whether the request may pass.
    pub fn check_access(&self, headers: &http::HeaderMap) -> TokenCheck {
        match *self.token.read().unwrap_or_else(|e| e.into_inner()) {
            None => TokenCheck::Granted,
            Some(ref digest) => token::check(digest, headers),
        }
    }

    pub fn mask(&self) -> Option<&HostMask> {
        self.mask.as_ref()
    }

    /// The incoming-connection cap (E2B's 429 message names it).
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Whether the gateway speaks TLS to the guest on `port` (httpsPorts).
    pub fn is_https(&self, port: GuestPort) -> bool {
        crate::guest_tls::is_https(&self.https_ports, port)
    }

    /// A slot under the incoming-connection cap, held while a connection to
    /// the guest lives; `None` when the cap is reached.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Idle HTTP connections kept into this sandbox now.
    pub fn idle_connections(&self) -> usize {
        self.pool.len()
    }

    pub async fn connect(&self, port: GuestPort) -> Result<BoxGuestStream, GuestError> {
        self.guest.connect(port).await
    }
}

/// Every sandbox the gateway routes to, by id.
#[derive(Default)]
pub struct Directory {
    routes: RwLock<HashMap<SandboxId, Arc<Route>>>,
}

impl Directory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace a sandbox's route.
    pub fn insert(&self, id: SandboxId, route: Route) -> Arc<Route> {
        let route = Arc::new(route);
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, route.clone());
        route
    }

    pub fn remove(&self, id: &SandboxId) -> Option<Arc<Route>> {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
    }

    pub fn get(&self, id: &SandboxId) -> Option<Arc<Route>> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TOKEN_HEADER;

    struct Nowhere;
    impl GuestConnector for Nowhere {
        fn connect(&self, _: GuestPort) -> ConnectFuture<'_> {
            Box::pin(async { Err(GuestError::Gone) })
        }
    }

    fn private(max: usize) -> (Route, AccessToken) {
        let spec = RouteSpec {
            allow_public_traffic: false,
            mask_request_host: None,
            max_connections: max,
            https_ports: Vec::new(),
        };
        let (route, token) = Route::new(Arc::new(Nowhere), spec).unwrap();
        (route, token.unwrap())
    }

    fn presenting(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(TOKEN_HEADER, token.parse().unwrap());
        h
    }

    #[test]
    fn rotation_retires_the_old_token_at_once() {
        let (route, old) = private(1);
        assert_eq!(
            route.check_access(&presenting(old.as_str())),
            TokenCheck::Granted
        );
        let new = route.rotate_token().unwrap().unwrap();
        assert_ne!(old, new);
        assert_eq!(
            route.check_access(&presenting(old.as_str())),
            TokenCheck::Invalid
        );
        assert_eq!(
            route.check_access(&presenting(new.as_str())),
            TokenCheck::Granted
        );
    }

    #[test]
    fn public_routes_have_no_token_to_rotate() {
        let spec = RouteSpec {
            allow_public_traffic: true,
            mask_request_host: None,
            max_connections: 1,
            https_ports: Vec::new(),
        };
        let (route, token) = Route::new(Arc::new(Nowhere), spec).unwrap();
        assert!(token.is_none() && route.is_public());
        assert!(route.rotate_token().unwrap().is_none());
        assert_eq!(
            route.check_access(&http::HeaderMap::new()),
            TokenCheck::Granted
        );
    }

    #[test]
    fn the_cap_gives_out_slots_until_returned() {
        let (route, _) = private(2);
        let a = route.try_slot().unwrap();
        let _b = route.try_slot().unwrap();
        assert!(route.try_slot().is_none());
        drop(a);
        assert!(route.try_slot().is_some());
    }

    #[test]
    fn host_masks_substitute_the_port() {
        let m = HostMask::parse("localhost:${PORT}").unwrap();
        assert_eq!(m.render(GuestPort::new(3000).unwrap()), "localhost:3000");
        let fixed = HostMask::parse("internal.example").unwrap();
        assert_eq!(fixed.render(GuestPort::new(1).unwrap()), "internal.example");
        for bad in ["", "a b", "x/y", "user@h", "h:${PORTS}", "h\r\n"] {
            assert!(HostMask::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directory_finds_what_was_inserted() {
        let d = Directory::new();
        let id = SandboxId::parse("abc").unwrap();
        assert!(d.get(&id).is_none());
        d.insert(id.clone(), private(1).0);
        assert!(d.get(&id).is_some());
        d.remove(&id);
        assert!(d.get(&id).is_none());
    }
}
