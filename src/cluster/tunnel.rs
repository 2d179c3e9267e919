//! The node's tunnel listener: edges reach this node's sandboxes through it.
//! mTLS (both sides under the cluster CA), HTTP/2, and one `CONNECT
//! <sandboxId>:<port>` stream per tunnel: the node checks again the token
//! digest the edge forwards (so a rotation here bites at once, before any
//! edge hears of it), takes a slot under the sandbox's inbound cap, answers
//! 200, and splices the stream to the guest through the same way in the
//! local gateway uses. The first byte on the stream says how the guest
//! connect went.
//!
//! Why HTTP/2 and not a TLS connection per tunnel: a new public connection
//! at the edge costs one stream on a link that is already up, not a TCP and
//! TLS handshake to the node.

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
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// The header carrying the digest of the token the edge's client presented.
pub const DIGEST_HEADER: &str = "slipway-token-digest";
/// The header naming why a node refused a tunnel (beside the status).
pub const REFUSAL_HEADER: &str = "slipway-refusal";

/// How long a TLS handshake on the tunnel listener may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Links (edge connections) at once; more are closed at once.
const MAX_LINKS: usize = 1024;
/// Tunnels at once on one link. The connection-level flow-control window
/// bounds what they can make this side buffer.
pub const MAX_STREAMS: u32 = 8192;
/// Flow-control windows: large enough for a download to run at full speed
/// over one link, small enough that a stalled tunnel holds little.
pub const STREAM_WINDOW: u32 = 2 << 20;
pub const LINK_WINDOW: u32 = 32 << 20;
/// The guest connect, bounded (the stack's own bound is shorter).
const GUEST_CONNECT: Duration = Duration::from_secs(15);

/// The first byte of an accepted tunnel: how the connect to the guest went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Connected,
    Failed(GuestError),
}

impl Opened {
    pub fn to_byte(self) -> u8 {
        match self {
            Opened::Connected => 0,
            Opened::Failed(GuestError::Refused) => 1,
            Opened::Failed(GuestError::TimedOut) => 2,
            Opened::Failed(GuestError::OverCap) => 3,
            Opened::Failed(GuestError::NoPort) => 4,
            Opened::Failed(GuestError::Gone) => 5,
            Opened::Failed(GuestError::Forbidden) => 6,
        }
    }

    /// Any other byte is a node speaking another protocol.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Opened::Connected,
            1 => Opened::Failed(GuestError::Refused),
            2 => Opened::Failed(GuestError::TimedOut),
            3 => Opened::Failed(GuestError::OverCap),
            4 => Opened::Failed(GuestError::NoPort),
            5 => Opened::Failed(GuestError::Gone),
            6 => Opened::Failed(GuestError::Forbidden),
            _ => return None,
        })
    }
}

/// How each tunnel request ended, as counted and as the metrics name it.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Opened,
    BadRequest,
    NotFound,
    Forbidden,
    OverCap,
    Draining,
    GuestRefused,
    GuestTimedOut,
    GuestUnreachable,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Opened,
        Outcome::BadRequest,
        Outcome::NotFound,
        Outcome::Forbidden,
        Outcome::OverCap,
        Outcome::Draining,
        Outcome::GuestRefused,
        Outcome::GuestTimedOut,
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
            Outcome::GuestUnreachable => "guest_unreachable",
        }
    }
}

/// Tunnel requests by outcome, and links refused over the cap.
#[derive(Default)]
pub struct TunnelStats {
    by_outcome: [AtomicU64; 9],
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

/// Accept edge links forever.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, server: TunnelServer) {
    let server = Arc::new(server);
    let acceptor = TlsAcceptor::from(tls);
    let links = Arc::new(Semaphore::new(MAX_LINKS));
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(LINK_WINDOW)
        .max_frame_size(64 << 10)
        .max_send_buf_size(1 << 20)
        .max_pending_accept_reset_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(10));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(target: "slipway::cluster", error = %e, "tunnel listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = links.clone().try_acquire_owned() else {
            server.stats.links_refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, server, http) = (acceptor.clone(), server.clone(), http.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    server
                        .stats
                        .handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(target: "slipway::cluster", peer = %peer, error = %e,
                        "tunnel link refused: TLS handshake failed");
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
            let s = server.clone();
            let service = service_fn(move |req| {
                let s = s.clone();
                async move { Ok::<_, Infallible>(s.open(req, peer)) }
            });
            if let Err(e) = http.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(target: "slipway::cluster", peer = %peer, error = %e, "tunnel link ended");
            }
            drop(slot);
        });
    }
}

fn answer(status: StatusCode, outcome: Outcome) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r.headers_mut().insert(
        REFUSAL_HEADER,
        hyper::header::HeaderValue::from_static(outcome.name()),
    );
    r
}

impl TunnelServer {
    /// One CONNECT: checked at once (the edge is waiting, and bounds the
    /// wait), then the guest connect and the splice go on in a task.
    fn open(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Empty<Bytes>> {
        let refuse = |status, outcome| {
            self.stats.count(outcome);
            answer(status, outcome)
        };
        if req.method() != Method::CONNECT {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, Outcome::BadRequest);
        }
        if (self.draining)() {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, Outcome::Draining);
        }
        let Some((id, port)) = req
            .uri()
            .authority()
            .and_then(|a| parse_tunnel_target(a.as_str()))
        else {
            return refuse(StatusCode::BAD_REQUEST, Outcome::BadRequest);
        };
        let presented = match req.headers().get(DIGEST_HEADER) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(TokenDigest::from_hex) {
                Some(d) => Some(d),
                None => return refuse(StatusCode::BAD_REQUEST, Outcome::BadRequest),
            },
        };
        let Some(route) = self.directory.get(&id) else {
            return refuse(StatusCode::NOT_FOUND, Outcome::NotFound);
        };
        if route.check_presented(presented.as_ref()) != TokenCheck::Granted {
            return refuse(StatusCode::FORBIDDEN, Outcome::Forbidden);
        }
        let Some(slot) = route.try_slot() else {
            return refuse(StatusCode::TOO_MANY_REQUESTS, Outcome::OverCap);
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let mut changes = route.token_changes();
        let (stats, idle) = (self.stats.clone(), self.idle_timeout);
        tokio::spawn(async move {
            let connect = tokio::time::timeout(GUEST_CONNECT, route.connect(port));
            let (edge, guest) = tokio::join!(upgrade, connect);
            let guest = guest.unwrap_or(Err(GuestError::TimedOut));
            let opened = match &guest {
                Ok(_) => Opened::Connected,
                Err(e) => Opened::Failed(*e),
            };
            stats.count(match opened {
                Opened::Connected => Outcome::Opened,
                Opened::Failed(GuestError::Refused) => Outcome::GuestRefused,
                Opened::Failed(GuestError::TimedOut) => Outcome::GuestTimedOut,
                Opened::Failed(GuestError::OverCap) => Outcome::OverCap,
                Opened::Failed(_) => Outcome::GuestUnreachable,
            });
            let Ok(edge) = edge else { return };
            let mut edge = TokioIo::new(edge);
            if edge.write_all(&[opened.to_byte()]).await.is_err() {
                return;
            }
            let Ok(guest) = guest else {
                let _ = edge.shutdown().await;
                return;
            };
            // A rotation here ends the tunnels the old token opened: a
            // kept connection at the edge must not outlive the token.
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
                _ = ingress::forward::splice(edge, guest, idle) => {}
                _ = revoked => {
                    tracing::info!(target: "slipway::cluster", sandbox = %id, peer = %peer,
                        "tunnel closed: the token it was opened with was rotated");
                }
            }
            drop(slot);
        });
        Response::new(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opened_bytes_round_trip_and_nothing_else_parses() {
        let all = [
            Opened::Connected,
            Opened::Failed(GuestError::Refused),
            Opened::Failed(GuestError::TimedOut),
            Opened::Failed(GuestError::OverCap),
            Opened::Failed(GuestError::NoPort),
            Opened::Failed(GuestError::Gone),
            Opened::Failed(GuestError::Forbidden),
        ];
        for o in all {
            assert_eq!(Opened::from_byte(o.to_byte()), Some(o));
        }
        assert!((7..=255).all(|b| Opened::from_byte(b).is_none()));
    }
}
