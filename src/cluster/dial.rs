//! The edge's way into a sandbox on another host: a tunnel is its own mTLS
//! connection to the node (`CONNECT <id>:<port>`, then a splice to the
//! guest); what the gateway does over it (HTTP/1.1, upgrades, keeping it for
//! the next request, errors) is the local gateway's own code: this is only
//! its `GuestConnector`.
//!
//! Beside the tunnels, one HTTP/2 liveness link per node, with pings every
//! second: a node that stops answering them is taken as stopped, and every
//! tunnel to it is closed, so a request on a kept tunnel never waits on a
//! stopped node (an idempotent one goes again, on a new tunnel).
//!
//! Time bounds: a node must take a new tunnel's TCP and TLS handshakes
//! within `NODE_ANSWER`, else the request gets 504; a node that refuses the
//! connection, or is gone, is a 502 `sandbox_not_found`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ingress::token::TokenDigest;
use ingress::{BoxGuestStream, ConnectFuture, GuestConnector, GuestError, GuestPort, NodeName};
use ingress::{SandboxId, SandboxRecord};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::tunnel::{Outcome, DIGEST_HEADER, LIVENESS_ALPN, REFUSAL_HEADER, TUNNEL_ALPN};

/// How long a node may take to take a new connection: TCP and TLS handshakes.
pub const NODE_ANSWER: Duration = Duration::from_secs(1);
/// How long the node may take to answer a CONNECT: its checks and the guest
/// connect (its own bound on that is 10 s).
const GUEST_ANSWER: Duration = Duration::from_secs(16);
/// Liveness pings: every second, and a node that leaves one unanswered for
/// two is taken as stopped.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// How a tunnel attempt ended, as counted and as the metrics name it.
#[derive(Debug, Clone, Copy)]
pub enum DialOutcome {
    Opened,
    NodeUnreachable,
    NodeTimedOut,
    Tls,
    NotOnNode,
    Forbidden,
    OverCap,
    NodeDraining,
    PortNotOpen,
    GuestTimedOut,
    NoPort,
    GuestUnreachable,
    Protocol,
}

impl DialOutcome {
    pub const ALL: [DialOutcome; 13] = [
        DialOutcome::Opened,
        DialOutcome::NodeUnreachable,
        DialOutcome::NodeTimedOut,
        DialOutcome::Tls,
        DialOutcome::NotOnNode,
        DialOutcome::Forbidden,
        DialOutcome::OverCap,
        DialOutcome::NodeDraining,
        DialOutcome::PortNotOpen,
        DialOutcome::GuestTimedOut,
        DialOutcome::NoPort,
        DialOutcome::GuestUnreachable,
        DialOutcome::Protocol,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DialOutcome::Opened => "opened",
            DialOutcome::NodeUnreachable => "node_unreachable",
            DialOutcome::NodeTimedOut => "node_timed_out",
            DialOutcome::Tls => "tls",
            DialOutcome::NotOnNode => "not_on_node",
            DialOutcome::Forbidden => "forbidden",
            DialOutcome::OverCap => "over_cap",
            DialOutcome::NodeDraining => "node_draining",
            DialOutcome::PortNotOpen => "port_not_open",
            DialOutcome::GuestTimedOut => "guest_timed_out",
            DialOutcome::NoPort => "no_port",
            DialOutcome::GuestUnreachable => "guest_unreachable",
            DialOutcome::Protocol => "protocol",
        }
    }

    /// What the gateway makes of it (its status codes and error bodies).
    fn guest_error(self) -> GuestError {
        match self {
            DialOutcome::NodeTimedOut | DialOutcome::GuestTimedOut => GuestError::TimedOut,
            DialOutcome::Forbidden => GuestError::Forbidden,
            DialOutcome::OverCap => GuestError::OverCap,
            DialOutcome::PortNotOpen => GuestError::Refused,
            DialOutcome::NoPort => GuestError::NoPort,
            DialOutcome::Opened
            | DialOutcome::NodeUnreachable
            | DialOutcome::Tls
            | DialOutcome::NotOnNode
            | DialOutcome::NodeDraining
            | DialOutcome::GuestUnreachable
            | DialOutcome::Protocol => GuestError::Gone,
        }
    }

    /// A node's refusal, by its header.
    fn of_node(o: Outcome) -> DialOutcome {
        match o {
            Outcome::Opened | Outcome::BadRequest => DialOutcome::Protocol,
            Outcome::NotFound => DialOutcome::NotOnNode,
            Outcome::Forbidden => DialOutcome::Forbidden,
            Outcome::OverCap => DialOutcome::OverCap,
            Outcome::Draining => DialOutcome::NodeDraining,
            Outcome::GuestRefused => DialOutcome::PortNotOpen,
            Outcome::GuestTimedOut => DialOutcome::GuestTimedOut,
            Outcome::NoPort => DialOutcome::NoPort,
            Outcome::GuestUnreachable => DialOutcome::GuestUnreachable,
        }
    }
}

#[derive(Default)]
pub struct DialStats {
    by_outcome: [AtomicU64; 13],
    /// Liveness links made to nodes.
    pub links_made: AtomicU64,
    /// Times a node stopped answering its liveness pings.
    pub nodes_silent: AtomicU64,
    /// Tunnel TLS handshakes that resumed a session (no certificates sent
    /// or checked) and ones that did not.
    pub resumed: AtomicU64,
    pub full_handshakes: AtomicU64,
    /// Tunnels open now (in use, or kept idle by the gateway's pool).
    pub live: Arc<AtomicUsize>,
}

impl DialStats {
    fn count(&self, o: DialOutcome) {
        self.by_outcome[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, o: DialOutcome) -> u64 {
        self.by_outcome[o as usize].load(Ordering::Relaxed)
    }
}

/// One node as the edge sees it: its liveness link, and a generation that
/// is bumped when the link dies, which closes every tunnel to the node.
struct NodeState {
    /// Held to keep the HTTP/2 connection (and its pings) up.
    link: Mutex<Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>>,
    /// One liveness dial at a time.
    dialing: Arc<tokio::sync::Mutex<()>>,
    generation: watch::Sender<u64>,
}

impl Default for NodeState {
    fn default() -> Self {
        Self {
            link: Mutex::new(None),
            dialing: Arc::default(),
            generation: watch::Sender::new(0),
        }
    }
}

/// Every node this edge reaches.
pub struct Dialer {
    tunnels: TlsConnector,
    liveness: TlsConnector,
    nodes: Mutex<HashMap<(NodeName, SocketAddr), Arc<NodeState>>>,
    pub stats: DialStats,
}

impl Dialer {
    /// `tls`: the cluster's client configuration; the ALPN of each kind of
    /// connection is set here.
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Arc<Self> {
        let with = |alpn: &[u8]| {
            let mut cfg = (*tls).clone();
            cfg.alpn_protocols = vec![alpn.to_vec()];
            TlsConnector::from(Arc::new(cfg))
        };
        Arc::new(Self {
            tunnels: with(TUNNEL_ALPN),
            liveness: with(LIVENESS_ALPN),
            nodes: Mutex::new(HashMap::new()),
            stats: DialStats::default(),
        })
    }

    /// Forget nodes no route names any more (their links close).
    pub fn retain(&self, wanted: &HashSet<(NodeName, SocketAddr)>) {
        lock(&self.nodes).retain(|k, _| wanted.contains(k));
    }

    /// Liveness links up now.
    pub fn links(&self) -> usize {
        lock(&self.nodes)
            .values()
            .filter(|n| lock(&n.link).as_ref().is_some_and(|l| !l.is_closed()))
            .count()
    }

    fn node(&self, node: &NodeName, addr: SocketAddr) -> Arc<NodeState> {
        lock(&self.nodes)
            .entry((node.clone(), addr))
            .or_default()
            .clone()
    }

    /// TCP and TLS to the node, with `connector`'s ALPN.
    async fn connect(
        &self,
        connector: &TlsConnector,
        node: &NodeName,
        addr: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, DialOutcome> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| {
            tracing::info!(target: "slipway::edge", %node, %addr, error = %e, "cannot reach the node");
            DialOutcome::NodeUnreachable
        })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(node.as_str().to_string()).map_err(|_| DialOutcome::Tls)?;
        connector.connect(name, tcp).await.map_err(|e| {
            tracing::warn!(target: "slipway::edge", %node, %addr, error = %e,
                "tunnel refused: TLS (is the node's certificate for this name, under the cluster CA?)");
            DialOutcome::Tls
        })
    }

    /// Make sure a liveness link to the node is up or on its way; never
    /// waits for it.
    fn watch_node(self: &Arc<Self>, node: &NodeName, addr: SocketAddr, state: &Arc<NodeState>) {
        if lock(&state.link).as_ref().is_some_and(|l| !l.is_closed()) {
            return;
        }
        let Ok(dialing) = state.dialing.clone().try_lock_owned() else {
            return;
        };
        let (me, node, state) = (self.clone(), node.clone(), state.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(NODE_ANSWER, me.connect(&me.liveness, &node, addr))
                .await
            {
                Ok(Ok(tls)) => tls,
                _ => return,
            };
            let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(PING_EVERY)
                .keep_alive_timeout(PING_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
                .await;
            let Ok((link, conn)) = handshake else { return };
            me.stats.links_made.fetch_add(1, Ordering::Relaxed);
            *lock(&state.link) = Some(link);
            drop(dialing);
            let ended = conn.await;
            *lock(&state.link) = None;
            // The node stopped answering (or died): whatever is kept open
            // to it would wait forever. Close it all.
            state.generation.send_modify(|g| *g = g.wrapping_add(1));
            if let Err(e) = ended {
                me.stats.nodes_silent.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "slipway::edge", %node, %addr, error = %e,
                    "the node's liveness link ended; closing its tunnels");
            }
        });
    }

    /// A tunnel to `port` of sandbox `id` on the record's node.
    pub async fn open(
        self: &Arc<Self>,
        id: &SandboxId,
        record: &SandboxRecord,
        port: GuestPort,
        presented: Option<TokenDigest>,
    ) -> Result<BoxGuestStream, GuestError> {
        match self.try_open(id, record, port, presented).await {
            Ok(stream) => {
                self.stats.count(DialOutcome::Opened);
                Ok(stream)
            }
            Err(o) => {
                self.stats.count(o);
                tracing::debug!(target: "slipway::edge", sandbox = %id, node = %record.node,
                    outcome = o.name(), "no tunnel");
                Err(o.guest_error())
            }
        }
    }

    async fn try_open(
        self: &Arc<Self>,
        id: &SandboxId,
        record: &SandboxRecord,
        port: GuestPort,
        presented: Option<TokenDigest>,
    ) -> Result<BoxGuestStream, DialOutcome> {
        let state = self.node(&record.node, record.addr);
        self.watch_node(&record.node, record.addr, &state);
        // Subscribed before the connect: a node that goes silent from now
        // on closes this tunnel too.
        let generation = state.generation.subscribe();
        let tls = tokio::time::timeout(
            NODE_ANSWER,
            self.connect(&self.tunnels, &record.node, record.addr),
        )
        .await
        .map_err(|_| DialOutcome::NodeTimedOut)??;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        if resumed {
            &self.stats.resumed
        } else {
            &self.stats.full_handshakes
        }
        .fetch_add(1, Ordering::Relaxed);
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|_| DialOutcome::Protocol)?;
        // Driven until the CONNECT's answer hands the connection over.
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut req = Request::new(Empty::new());
        *req.method_mut() = Method::CONNECT;
        let target = format!("{id}:{port}");
        *req.uri_mut() = target.parse().map_err(|_| DialOutcome::Protocol)?;
        if let Ok(v) = target.parse() {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
        if let Some(d) = presented {
            if let Ok(v) = d.to_hex().parse() {
                req.headers_mut().insert(DIGEST_HEADER, v);
            }
        }
        let mut resp = match tokio::time::timeout(GUEST_ANSWER, sender.send_request(req)).await {
            Err(_) => return Err(DialOutcome::GuestTimedOut),
            Ok(Err(_)) => return Err(DialOutcome::NodeUnreachable),
            Ok(Ok(resp)) => resp,
        };
        if resp.status() != StatusCode::OK {
            let why = resp
                .headers()
                .get(REFUSAL_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(Outcome::from_name);
            return Err(why.map_or(DialOutcome::Protocol, DialOutcome::of_node));
        }
        let upgraded = hyper::upgrade::on(&mut resp)
            .await
            .map_err(|_| DialOutcome::Protocol)?;
        Ok(Box::new(Tunnel::new(
            TokioIo::new(upgraded),
            generation,
            self.stats.live.clone(),
        )))
    }
}

/// One sandbox's way in at the edge: a tunnel to the node its record names.
pub struct TunnelConnector {
    pub dialer: Arc<Dialer>,
    pub id: SandboxId,
    pub record: Arc<SandboxRecord>,
}

impl GuestConnector for TunnelConnector {
    fn connect(&self, port: GuestPort) -> ConnectFuture<'_> {
        self.connect_presenting(port, None)
    }

    fn connect_presenting(
        &self,
        port: GuestPort,
        presented: Option<TokenDigest>,
    ) -> ConnectFuture<'_> {
        Box::pin(self.dialer.open(&self.id, &self.record, port, presented))
    }
}

/// An open tunnel: counted while it lives (drain, metrics), and failed at
/// once when its node stops answering its liveness pings.
struct Tunnel<S> {
    inner: S,
    /// Ready when the node's generation moves on.
    silent: Pin<Box<dyn Future<Output = ()> + Send>>,
    live: Arc<AtomicUsize>,
}

impl<S> Tunnel<S> {
    fn new(inner: S, mut generation: watch::Receiver<u64>, live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        let silent = Box::pin(async move {
            // A closed channel (the node forgotten): the tunnel lives on
            // until it ends by itself.
            if generation.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        Self {
            inner,
            silent,
            live,
        }
    }

    /// What to make of the inner stream's `Pending`: still pending, or an
    /// error once the node went silent. Asked only when the stream would
    /// wait, so bytes that are there cost no more than without it.
    fn or_silent<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.silent.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the node stopped answering",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S> Drop for Tunnel<S> {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tunnel<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => self.or_silent(cx),
            ready => ready,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tunnel<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.or_silent(cx),
            ready => ready,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.or_silent(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
