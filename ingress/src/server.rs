//! The listeners: accept public connections under a global cap, do TLS when
//! configured, serve HTTP/1.1, HTTP/2 (ALPN) and h2c on each, and serve raw
//! TCP forwards. Every connection is bounded in time (TLS handshake, header
//! read, idle) and in size (header bytes, HTTP/2 streams).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::directory::Directory;
use crate::forward::{proxy_v2_header, serve_one, Forward};
use crate::idle::{until_idle, Activity, Watched};
use crate::proxy::{handle, Client, Shared};
use crate::target::Domain;

/// Bounds on what public clients can make the gateway hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Client connections at once, over all sandboxes and forwards.
    pub max_connections: usize,
    /// A request's headers must be in within this (slowloris).
    pub header_read_timeout: Duration,
    /// A connection on which no byte moved this long is closed.
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_h2_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            tls_handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            max_h2_streams: 128,
        }
    }
}

pub struct GatewayConfig {
    pub domain: Domain,
    /// Plain HTTP (and h2c) when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limits: Limits,
}

/// The public URL gateway over a `Directory` of sandboxes.
pub struct Gateway {
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    connections: Arc<Semaphore>,
    http: auto::Builder<TokioExecutor>,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, directory: Arc<Directory>) -> Arc<Self> {
        let limits = cfg.limits;
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .max_headers(128);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_h2_streams)
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_pending_accept_reset_streams(32);
        Arc::new(Self {
            shared: Arc::new(Shared {
                directory,
                domain: cfg.domain,
                idle_timeout: limits.idle_timeout,
            }),
            tls: cfg.tls.map(TlsAcceptor::from),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            http,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Accept and serve HTTP(S) connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Some((stream, peer, permit)) = self.accept(&listener).await else {
                continue;
            };
            let gw = self.clone();
            tokio::spawn(async move {
                gw.serve_http(stream, peer).await;
                drop(permit);
            });
        }
    }

    /// Accept and forward raw TCP connections to one guest port forever.
    pub async fn serve_forward(self: Arc<Self>, listener: TcpListener, forward: Forward) {
        let local = listener.local_addr().ok();
        let forward = Arc::new(forward);
        loop {
            let Some((stream, peer, permit)) = self.accept(&listener).await else {
                continue;
            };
            let gw = self.clone();
            let fwd = forward.clone();
            tokio::spawn(async move {
                gw.forward_one(stream, peer, local, &fwd).await;
                drop(permit);
            });
        }
    }

    /// The next connection under the global cap; over it, the connection
    /// is closed at once (rather than left to fill the backlog).
    async fn accept(
        &self,
        listener: &TcpListener,
    ) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(target: "slipway::ingress", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return None;
            }
        };
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            tracing::warn!(target: "slipway::ingress", client = %peer, "connection cap reached; closing");
            return None;
        };
        let _ = stream.set_nodelay(true);
        Some((stream, peer, permit))
    }

    async fn serve_http(&self, stream: TcpStream, peer: SocketAddr) {
        let activity = Activity::new();
        let io = Watched::new(stream, activity.clone());
        match &self.tls {
            None => self.serve_io(io, peer, false, activity).await,
            Some(acceptor) => {
                let handshake = acceptor.accept(io);
                match tokio::time::timeout(self.limits.tls_handshake_timeout, handshake).await {
                    Ok(Ok(tls)) => self.serve_io(tls, peer, true, activity).await,
                    Ok(Err(e)) => {
                        tracing::debug!(target: "slipway::ingress", client = %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::debug!(target: "slipway::ingress", client = %peer, "TLS handshake timed out")
                    }
                }
            }
        }
    }

    async fn serve_io<I>(&self, io: I, peer: SocketAddr, tls: bool, activity: Activity)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shared = self.shared.clone();
        let client = Arc::new(Client { addr: peer, tls });
        let service = service_fn(move |req| handle(shared.clone(), client.clone(), req));
        let conn = self
            .http
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        match until_idle(activity, self.limits.idle_timeout, conn).await {
            Some(Err(e)) => {
                tracing::debug!(target: "slipway::ingress", client = %peer, error = %e, "connection ended")
            }
            None => {
                tracing::debug!(target: "slipway::ingress", client = %peer, "idle connection closed")
            }
            Some(Ok(())) => {}
        }
    }

    async fn forward_one(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        fwd: &Forward,
    ) {
        let Some(route) = self.shared.directory.get(&fwd.sandbox) else {
            tracing::info!(target: "slipway::ingress", client = %peer, sandbox = %fwd.sandbox, "forward: sandbox not found");
            return;
        };
        let Some(slot) = route.try_slot() else {
            tracing::info!(target: "slipway::ingress", client = %peer, sandbox = %fwd.sandbox, "forward: over the sandbox's cap");
            return;
        };
        let guest = match route.connect(fwd.spec.guest_port).await {
            Ok(g) => g,
            Err(e) => {
                tracing::info!(target: "slipway::ingress", client = %peer, sandbox = %fwd.sandbox, port = %fwd.spec.guest_port, error = %e, "forward: cannot reach the guest");
                return;
            }
        };
        let local = stream.local_addr().ok().or(local);
        let header = match (fwd.spec.proxy_v2, local) {
            (true, Some(local)) => Some(proxy_v2_header(peer, local)),
            _ => None,
        };
        serve_one(stream, guest, header, self.limits.idle_timeout).await;
        drop(slot);
    }
}
