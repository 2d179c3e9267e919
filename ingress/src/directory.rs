//! Which sandboxes the gateway knows and how to reach each: the `Directory`
//! maps a sandbox id to its `Route` (a way into its stack, its access token,
//! its Host mask and its incoming-connection cap). The binary fills it; the
//! gateway only reads it. A route's way in may be local (a stack in this
//! process) or a tunnel to the node that holds the sandbox (`slipway edge`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

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
    /// The node that holds the sandbox refused the token the client
    /// presented (it was rotated there before this gateway learned of it).
    #[error("the sandbox's node refused the access token")]
    Forbidden,
}

/// A way into one sandbox's network: opens a TCP connection from the
/// sandbox's gateway address to the guest. How the stack runs is not the
/// gateway's business.
pub trait GuestConnector: Send + Sync + 'static {
    fn connect(&self, port: GuestPort) -> ConnectFuture<'_>;

    /// Connect on behalf of a client that presented a token with this
    /// digest (`None`: none presented, or the sandbox is public). A way in
    /// that crosses to another host passes it on for that host to check
    /// again; a local one has nothing to do with it.
    fn connect_presenting(
        &self,
        port: GuestPort,
        _presented: Option<TokenDigest>,
    ) -> ConnectFuture<'_> {
        self.connect(port)
    }
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

    /// The mask as given, `${PORT}` and all.
    pub fn as_str(&self) -> &str {
        &self.0
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
    /// Bumped whenever the token changes, so that whoever admitted a
    /// connection with the old one can end it. Made on first use: most
    /// routes (an edge holds one per sandbox of the cluster) never need it.
    token_changes: OnceLock<watch::Sender<u64>>,
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
        let route = Self::with_digest(
            guest,
            token.as_ref().map(AccessToken::digest),
            spec.mask_request_host,
            spec.max_connections,
            spec.https_ports,
        );
        Ok((route, token))
    }

    /// A route whose token is known only by its digest (`None`: public), as
    /// `slipway edge` learns it from the cluster store.
    pub fn with_digest(
        guest: Arc<dyn GuestConnector>,
        digest: Option<TokenDigest>,
        mask: Option<HostMask>,
        max_connections: usize,
        mut https_ports: Vec<GuestPort>,
    ) -> Self {
        https_ports.sort();
        https_ports.dedup();
        Self {
            guest,
            token: RwLock::new(digest),
            token_changes: OnceLock::new(),
            mask,
            max_connections,
            slots: Arc::new(Semaphore::new(max_connections)),
            https_ports,
            pool: GuestPool::default(),
        }
    }

    /// Replace the token; the old one stops working at once. `None` for a
    /// sandbox that allows public traffic (it has no token).
    pub fn rotate_token(&self) -> Result<Option<AccessToken>, NoRandomness> {
        if self.is_public() {
            return Ok(None);
        }
        let fresh = AccessToken::generate()?;
        Ok(self.install_token(&fresh).then_some(fresh))
    }

    /// Make `token` the sandbox's token (a token drawn before the cluster
    /// store took its digest); the old one stops working at once. False, and
    /// nothing changes, for a sandbox that allows public traffic.
    pub fn install_token(&self, token: &AccessToken) -> bool {
        self.set_digest(Some(token.digest()))
    }

    /// Replace the digest a private route checks tokens against (`slipway
    /// edge`, when the store says it was rotated). False, and nothing
    /// changes, for a public route: whether a sandbox is public is fixed.
    pub fn set_digest(&self, digest: Option<TokenDigest>) -> bool {
        let mut slot = self.token.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() || digest.is_none() {
            return false;
        }
        *slot = digest;
        drop(slot);
        if let Some(changes) = self.token_changes.get() {
            changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        true
    }

    /// The digest of the sandbox's token; `None` when it is public.
    pub fn token_digest(&self) -> Option<TokenDigest> {
        *self.token.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes whenever the token changes.
    pub fn token_changes(&self) -> watch::Receiver<u64> {
        self.token_changes
            .get_or_init(|| watch::Sender::new(0))
            .subscribe()
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

    /// Whether a connection may pass on the strength of a token digest a
    /// gateway in front of this one forwarded (compared in constant time).
    pub fn check_presented(&self, presented: Option<&TokenDigest>) -> TokenCheck {
        match (self.token_digest(), presented) {
            (None, _) => TokenCheck::Granted,
            (Some(_), None) => TokenCheck::Missing,
            (Some(d), Some(p)) if d.same_as(p) => TokenCheck::Granted,
            (Some(_), Some(_)) => TokenCheck::Invalid,
        }
    }

    pub fn mask(&self) -> Option<&HostMask> {
        self.mask.as_ref()
    }

    /// The incoming-connection cap (E2B's 429 message names it).
    /// The guest ports that serve HTTPS (sorted).
    pub fn https_ports(&self) -> &[GuestPort] {
        &self.https_ports
    }

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

    /// `connect`, for a client that presented a token with this digest.
    pub async fn connect_presenting(
        &self,
        port: GuestPort,
        presented: Option<TokenDigest>,
    ) -> Result<BoxGuestStream, GuestError> {
        self.guest.connect_presenting(port, presented).await
    }
}

/// Every sandbox the gateway routes to, by id.
#[derive(Default)]
pub struct Directory {
    routes: RwLock<HashMap<SandboxId, Arc<Route>>>,
    /// Private sandboxes are refused (503): the routes may be stale (an edge
    /// that lost its store), and a stale route may hold a revoked token.
    private_refused: AtomicBool,
}

impl Directory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuse (or serve again) every private sandbox; public ones go on.
    pub fn refuse_private(&self, refuse: bool) {
        self.private_refused.store(refuse, Ordering::Relaxed);
    }

    pub fn private_refused(&self) -> bool {
        self.private_refused.load(Ordering::Relaxed)
    }

    /// Sandboxes routed now.
    pub fn len(&self) -> usize {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every id routed now.
    pub fn ids(&self) -> Vec<SandboxId> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.keys().cloned().collect()
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
    fn forwarded_digests_are_checked_and_follow_the_token() {
        let (route, old) = private(1);
        let mut changes = route.token_changes();
        assert_eq!(
            route.check_presented(Some(&old.digest())),
            TokenCheck::Granted
        );
        assert_eq!(route.check_presented(None), TokenCheck::Missing);
        let fresh = AccessToken::generate().unwrap();
        assert!(route.install_token(&fresh));
        assert!(changes.has_changed().unwrap());
        assert_eq!(
            route.check_presented(Some(&old.digest())),
            TokenCheck::Invalid
        );
        assert_eq!(
            route.check_access(&presenting(fresh.as_str())),
            TokenCheck::Granted
        );
        changes.mark_unchanged();
        // A public route stays public whatever it is told.
        let public = Route::with_digest(Arc::new(Nowhere), None, None, 1, Vec::new());
        assert!(!public.set_digest(Some(fresh.digest())));
        assert!(public.is_public());
        assert_eq!(public.check_presented(None), TokenCheck::Granted);
        // And a private one stays private.
        assert!(!route.set_digest(None));
        assert!(!changes.has_changed().unwrap());
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
