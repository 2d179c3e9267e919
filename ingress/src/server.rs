//! The listeners: accept public connections under a global cap and a cap
//! per client address, do TLS when configured, serve HTTP/1.1, HTTP/2 (ALPN)
//! and h2c on each, and serve raw TCP forwards. Every connection is bounded
//! in time (TLS handshake, header read, idle) and in size (header bytes,
//! HTTP/2 streams).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::clients::{ClientSlot, ClientTable};
use crate::directory::Directory;
use crate::forward::{proxy_v2_header, serve_one, Forward};
use crate::idle::{until_idle, Activity, Watched};
use crate::proxy::{handle, Client, Shared};
use crate::refusal::{head_wants_html, Refusal};
use crate::target::Domain;

/// Bounds on what public clients can make the gateway hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Client connections at once, over all sandboxes and forwards.
    pub max_connections: usize,
    /// Client connections at once from one client address (an IPv6 client:
    /// its /64), so that one client cannot take all of `max_connections`.
    pub max_connections_per_client: usize,
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
            max_connections_per_client: 256,
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

/// What the gateway turned away, since it started.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Connections closed at once: `max_connections` were open.
    pub over_max_connections: AtomicU64,
    /// Connections refused (429, or closed) because their client had
    /// `max_connections_per_client` open.
    pub over_max_connections_per_client: AtomicU64,
}

/// Refusals answered at once over all clients; past them a refused
/// connection is only closed, so refusing never costs more than this.
const ANSWERS_AT_ONCE: usize = 64;
/// How long a refused connection may take to send its request head, and
/// then to take the answer.
const ANSWER_TIME: Duration = Duration::from_secs(2);
/// Largest request head read from a refused connection.
const ANSWER_HEAD_BYTES: usize = 8 << 10;

/// What an admitted connection holds while it lives (an upgraded one too):
/// its place under the gateway's cap and under its client's.
pub(crate) struct Admission {
    _all: OwnedSemaphorePermit,
    _client: ClientSlot,
}

/// The public URL gateway over a `Directory` of sandboxes.
pub struct Gateway {
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    connections: Arc<Semaphore>,
    clients: Arc<ClientTable>,
    answering: Arc<Semaphore>,
    stats: GatewayStats,
    started: Instant,
    /// Seconds after `started` of the last per-client refusal logged.
    last_refusal_logged: AtomicU64,
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
            clients: ClientTable::new(limits.max_connections_per_client),
            answering: Arc::new(Semaphore::new(ANSWERS_AT_ONCE)),
            stats: GatewayStats::default(),
            started: Instant::now(),
            last_refusal_logged: AtomicU64::new(u64::MAX),
            limits,
            http,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn stats(&self) -> &GatewayStats {
        &self.stats
    }

    /// Public connections open now (HTTP, upgrades and forwards).
    pub fn open_connections(&self) -> usize {
        self.limits.max_connections - self.connections.available_permits()
    }

    /// Client addresses (IPv6: /64s) with connections open now.
    pub fn clients(&self) -> usize {
        self.clients.clients()
    }

    /// Accept and serve HTTP(S) connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Some((stream, peer, admission)) = self.accept(&listener, true).await else {
                continue;
            };
            let gw = self.clone();
            tokio::spawn(async move {
                gw.serve_http(stream, peer, admission).await;
            });
        }
    }

    /// Accept and forward raw TCP connections to one guest port forever.
    pub async fn serve_forward(self: Arc<Self>, listener: TcpListener, forward: Forward) {
        let local = listener.local_addr().ok();
        let forward = Arc::new(forward);
        loop {
            let Some((stream, peer, admission)) = self.accept(&listener, false).await else {
                continue;
            };
            let gw = self.clone();
            let fwd = forward.clone();
            tokio::spawn(async move {
                gw.forward_one(stream, peer, local, &fwd).await;
                drop(admission);
            });
        }
    }

    /// The next connection under the caps. Over its client's cap, a plain
    /// HTTP connection is answered 429 (a forward or TLS one is closed);
    /// over the global cap it is closed at once (rather than left to fill
    /// the backlog).
    async fn accept(
        &self,
        listener: &TcpListener,
        http: bool,
    ) -> Option<(TcpStream, SocketAddr, Admission)> {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(target: "slipway::ingress", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return None;
            }
        };
        let Some(client) = self.clients.try_admit(peer.ip()) else {
            self.refuse_client(stream, peer, http && self.tls.is_none());
            return None;
        };
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            self.stats
                .over_max_connections
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "slipway::ingress", client = %peer, "connection cap reached; closing");
            return None;
        };
        let _ = stream.set_nodelay(true);
        let admission = Admission {
            _all: permit,
            _client: client,
        };
        Some((stream, peer, admission))
    }

    /// A client over its cap: counted, logged at most once a second (a
    /// flood must not become a flood of log lines), and answered 429 when
    /// that is cheap: plain HTTP, and fewer than `ANSWERS_AT_ONCE` answers
    /// under way. Otherwise the connection is just closed.
    fn refuse_client(&self, stream: TcpStream, peer: SocketAddr, answer: bool) {
        let n = self
            .stats
            .over_max_connections_per_client
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let refusal = Refusal::ClientOverCap(crate::clients::ClientKey::of(peer.ip()));
        let now = self.started.elapsed().as_secs();
        let last = self.last_refusal_logged.load(Ordering::Relaxed);
        if last != now
            && self
                .last_refusal_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                target: "slipway::ingress",
                client = %peer,
                cap = self.clients.max_per_client(),
                refused = n,
                "client over its connection cap (max_connections_per_client); refusing"
            );
        }
        if !answer {
            return;
        }
        let Ok(slot) = self.answering.clone().try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            answer_refused(stream, refusal).await;
            drop(slot);
        });
    }

    async fn serve_http(&self, stream: TcpStream, peer: SocketAddr, admission: Admission) {
        let activity = Activity::new();
        let io = Watched::new(stream, activity.clone());
        match &self.tls {
            None => self.serve_io(io, peer, false, activity, admission).await,
            Some(acceptor) => {
                let handshake = acceptor.accept(io);
                match tokio::time::timeout(self.limits.tls_handshake_timeout, handshake).await {
                    Ok(Ok(tls)) => self.serve_io(tls, peer, true, activity, admission).await,
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

    async fn serve_io<I>(
        &self,
        io: I,
        peer: SocketAddr,
        tls: bool,
        activity: Activity,
        admission: Admission,
    ) where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shared = self.shared.clone();
        // The client (and with it the admission) lives as long as the
        // connection or anything it was upgraded to.
        let client = Arc::new(Client {
            addr: peer,
            tls,
            _admission: admission,
        });
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

/// Answer a refused plain-HTTP connection: read its request head (bounded in
/// bytes and time) to answer in JSON or HTML, send the 429, then read what
/// else came before closing, so the close is a FIN the client reads the
/// answer before, not an RST that can destroy it. An HTTP/2 preface gets no
/// HTTP/1.1 answer, only the close.
async fn answer_refused(mut stream: TcpStream, refusal: Refusal) {
    let mut head = vec![0u8; ANSWER_HEAD_BYTES];
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + ANSWER_TIME;
    while n < head.len() {
        match tokio::time::timeout_at(deadline, stream.read(&mut head[n..])).await {
            Ok(Ok(k)) if k > 0 => {
                // Only the new bytes (and the three before them) can
                // complete the blank line: a byte-at-a-time client costs
                // no more than a fast one.
                let from = n.saturating_sub(3);
                n += k;
                if head[from..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            _ => break,
        }
    }
    if head[..n].starts_with(b"PRI * HTTP/2.0") {
        return;
    }
    let answer = refusal.to_http1(head_wants_html(&head[..n]));
    drop(head);
    let _ = tokio::time::timeout(ANSWER_TIME, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64usize << 10;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                k => left = left.saturating_sub(k),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}
