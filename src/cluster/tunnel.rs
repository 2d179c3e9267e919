//! The node's tunnel listener: edges reach this node's sandboxes through it.
//! Every connection is mTLS under the cluster CA, and ALPN says what it is:
//!
//! - `slipway-tunnel/1`: one tunnel. The edge sends `CONNECT
//!   <sandboxId>:<port>` (HTTP/1.1, with the digest of the token its client
//!   presented); the node checks that digest again (so a rotation here bites
//!   at once, before any edge hears of it), takes a slot under the sandbox's
//!   inbound cap, connects to the guest through the same way in the local
//!   gateway uses, and answers: 200 and the connection becomes the splice,
//!   or the status the local gateway would give and why.
//! - `h2`: the edge's liveness link to this node. Nothing is asked on it;
//!   its HTTP/2 pings tell the edge within seconds that a node stopped
//!   answering, and the edge then closes its kept tunnels here.
//!
//! Why a TLS connection per tunnel and not an HTTP/2 stream: a request on a
//! kept tunnel then crosses no task but the splice's on either side (a
//! stream would go through each side's HTTP/2 connection task too); TLS 1.3
//! resumption keeps a new tunnel's handshake cheap.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ingress::record::parse_tunnel_target;
use ingress::token::TokenDigest;
use ingress::{Directory, GuestError, TokenCheck};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// ALPN of a tunnel connection (HTTP/1.1 CONNECT, then the splice).
pub const TUNNEL_ALPN: &[u8] = b"slipway-tunnel/1";
/// ALPN of an edge's liveness link (HTTP/2, pings only).
pub const LIVENESS_ALPN: &[u8] = b"h2";
/// The header carrying the digest of the token the edge's client presented.
pub const DIGEST_HEADER: &str = "slipway-token-digest";
/// The header naming why a node refused a tunnel (beside the status).
pub const REFUSAL_HEADER: &str = "slipway-refusal";

/// How long a TLS handshake, and then the CONNECT's head, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections at once (tunnels, kept idle ones and liveness links); more
/// are closed at once.
const MAX_CONNECTIONS: usize = 16384;
/// The guest connect, bounded (the stack's own bound is shorter).
const GUEST_CONNECT: Duration = Duration::from_secs(15);

/// How each tunnel request ended, as counted, as the metrics name it and as
/// the refusal header tells the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Opened,
    BadRequest,
    NotFound,
    Forbidden,
    OverCap,
    Draining,
    GuestRefused,
    GuestTimedOut,
    NoPort,
    GuestUnreachable,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Opened,
        Outcome::BadRequest,
        Outcome::NotFound,
        Outcome::Forbidden,
        Outcome::OverCap,
        Outcome::Draining,
        Outcome::GuestRefused,
        Outcome::GuestTimedOut,
        Outcome::NoPort,
        Outcome::GuestUnreachable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Opened => "opened",
            Outcome::BadRequest => "bad_request",
            Outcome::NotFound => "not_found",
            Outcome::Forbidden => "forbidden",
            Outcome::OverCap => "over_cap",
            Outcome::Draining => "draining",
            Outcome::GuestRefused => "port_not_open",
            Outcome::GuestTimedOut => "guest_timed_out",
            Outcome::NoPort => "no_port",
            Outcome::GuestUnreachable => "guest_unreachable",
        }
    }

    /// What the edge reads from an answer's refusal header.
    pub fn from_name(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.name() == s)
    }

    fn status(self) -> StatusCode {
        match self {
            Outcome::Opened => StatusCode::OK,
            Outcome::BadRequest => StatusCode::BAD_REQUEST,
            Outcome::NotFound => StatusCode::NOT_FOUND,
            Outcome::Forbidden => StatusCode::FORBIDDEN,
            Outcome::OverCap => StatusCode::TOO_MANY_REQUESTS,
            Outcome::Draining | Outcome::NoPort => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::GuestRefused | Outcome::GuestUnreachable => StatusCode::BAD_GATEWAY,
            Outcome::GuestTimedOut => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn of_guest(e: GuestError) -> Outcome {
        match e {
            GuestError::Refused => Outcome::GuestRefused,
            GuestError::TimedOut => Outcome::GuestTimedOut,
            GuestError::OverCap => Outcome::OverCap,
            GuestError::NoPort => Outcome::NoPort,
            GuestError::Gone | GuestError::Forbidden => Outcome::GuestUnreachable,
        }
    }
}

/// Tunnel requests by outcome, and connections refused.
#[derive(Default)]
pub struct TunnelStats {
    by_outcome: [AtomicU64; 10],
    pub links_refused: AtomicU64,
    pub handshakes_failed: AtomicU64,
}

impl TunnelStats {
    fn count(&self, o: Outcome) {
        self.by_outcome[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, o: Outcome) -> u64 {
        self.by_outcome[o as usize].load(Ordering::Relaxed)
    }
}

/// What the listener needs from serve.
pub struct TunnelServer {
    pub directory: Arc<Directory>,
    /// True once serve drains: new tunnels are refused.
    pub draining: Box<dyn Fn() -> bool + Send + Sync>,
    pub idle_timeout: Duration,
    pub stats: Arc<TunnelStats>,
}

/// Accept edge connections forever.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, server: TunnelServer) {
    let server = Arc::new(server);
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(target: "slipway::cluster", error = %e, "tunnel listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            server.stats.links_refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, server) = (acceptor.clone(), server.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    server
                        .stats
                        .handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(target: "slipway::cluster", peer = %peer, error = %e,
                        "tunnel connection refused: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    server
                        .stats
                        .handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let liveness = tls.get_ref().1.alpn_protocol() == Some(LIVENESS_ALPN);
            let io = TokioIo::new(tls);
            if liveness {
                // Pings only: every request is refused.
                let service = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(answer(Outcome::BadRequest))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(1)
                    .serve_connection(io, service)
                    .await;
            } else {
                let s = server.clone();
                let service = service_fn(move |req| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(s.open(req, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .max_buf_size(8192)
                    .serve_connection(io, service)
                    .with_upgrades();
                if let Err(e) = conn.await {
                    tracing::debug!(target: "slipway::cluster", peer = %peer, error = %e, "tunnel ended");
                }
            }
            drop(slot);
        });
    }
}

fn answer(outcome: Outcome) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = outcome.status();
    if outcome != Outcome::Opened {
        r.headers_mut().insert(
            REFUSAL_HEADER,
            hyper::header::HeaderValue::from_static(outcome.name()),
        );
    }
    r
}

impl TunnelServer {
    /// One CONNECT: the checks, the guest connect, the answer; on 200 a
    /// task splices the connection to the guest.
    async fn open(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Empty<Bytes>> {
        let refuse = |outcome| {
            self.stats.count(outcome);
            answer(outcome)
        };
        if req.method() != Method::CONNECT {
            return refuse(Outcome::BadRequest);
        }
        if (self.draining)() {
            return refuse(Outcome::Draining);
        }
        let Some((id, port)) = req
            .uri()
            .authority()
            .and_then(|a| parse_tunnel_target(a.as_str()))
        else {
            return refuse(Outcome::BadRequest);
        };
        let presented = match req.headers().get(DIGEST_HEADER) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(TokenDigest::from_hex) {
                Some(d) => Some(d),
                None => return refuse(Outcome::BadRequest),
            },
        };
        let Some(route) = self.directory.get(&id) else {
            return refuse(Outcome::NotFound);
        };
        if route.check_presented(presented.as_ref()) != TokenCheck::Granted {
            return refuse(Outcome::Forbidden);
        }
        let Some(slot) = route.try_slot() else {
            return refuse(Outcome::OverCap);
        };
        let guest = match tokio::time::timeout(GUEST_CONNECT, route.connect(port)).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => return refuse(Outcome::of_guest(e)),
            Err(_) => return refuse(Outcome::GuestTimedOut),
        };
        self.stats.count(Outcome::Opened);
        let upgrade = hyper::upgrade::on(&mut req);
        let mut changes = route.token_changes();
        let idle = self.idle_timeout;
        tokio::spawn(async move {
            let Ok(edge) = upgrade.await else { return };
            // A rotation here ends the tunnels the old token opened: a kept
            // connection at the edge must not outlive the token.
            let revoked = async {
                loop {
                    if changes.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                    if route.check_presented(presented.as_ref()) != TokenCheck::Granted {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = ingress::forward::splice(TokioIo::new(edge), guest, idle) => {}
                _ = revoked => {
                    tracing::info!(target: "slipway::cluster", sandbox = %id, peer = %peer,
                        "tunnel closed: the token it was opened with was rotated");
                }
            }
            drop(slot);
        });
        answer(Outcome::Opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_named_once_and_read_back() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::from_name(o.name()), Some(o));
        }
        assert_eq!(Outcome::from_name("nonsense"), None);
        // The edge tells these apart by the header, not the status.
        assert_eq!(Outcome::Draining.status(), Outcome::NoPort.status());
        assert_eq!(
            Outcome::GuestRefused.status(),
            Outcome::GuestUnreachable.status()
        );
    }
}
