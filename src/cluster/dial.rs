//! The edge's way into a sandbox on another host: one mTLS HTTP/2 link per
//! node, made when first needed and again when it breaks, and a `CONNECT
//! <id>:<port>` stream on it per connection into the guest. What the
//! gateway does with that stream (HTTP/1.1, upgrades, pooling, errors) is
//! the local gateway's own code: this is only its `GuestConnector`.
//!
//! Time bounds: a node must answer (link up and the CONNECT answered) within
//! `NODE_ANSWER`, else the request gets 504; a node that refuses the
//! connection, or is gone, is a 502 `sandbox_not_found`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ingress::token::TokenDigest;
use ingress::{BoxGuestStream, ConnectFuture, GuestConnector, GuestError, GuestPort, NodeName};
use ingress::{SandboxId, SandboxRecord};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tunnel::{Opened, DIGEST_HEADER, LINK_WINDOW, STREAM_WINDOW};

/// How long a node may take to answer: TCP, TLS and HTTP/2 handshakes for a
/// new link, or the CONNECT's answer on a live one.
pub const NODE_ANSWER: Duration = Duration::from_secs(1);
/// How long the node may take to reach the guest once it accepted the
/// tunnel (its own bound on the guest connect is 10 s).
const GUEST_ANSWER: Duration = Duration::from_secs(16);

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
    GuestUnreachable,
    Protocol,
}

impl DialOutcome {
    pub const ALL: [DialOutcome; 12] = [
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
            DialOutcome::Opened
            | DialOutcome::NodeUnreachable
            | DialOutcome::Tls
            | DialOutcome::NotOnNode
            | DialOutcome::NodeDraining
            | DialOutcome::GuestUnreachable
            | DialOutcome::Protocol => GuestError::Gone,
        }
    }
}

#[derive(Default)]
pub struct DialStats {
    by_outcome: [AtomicU64; 12],
    pub links_made: AtomicU64,
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

type Link = SendRequest<Empty<Bytes>>;

/// One node's link: the live one, and a lock so that one dial at a time
/// replaces it.
#[derive(Default)]
struct LinkSlot {
    live: Mutex<Option<Link>>,
    dialing: tokio::sync::Mutex<()>,
}

/// Every link this edge has to nodes.
pub struct Dialer {
    tls: TlsConnector,
    links: Mutex<HashMap<(NodeName, SocketAddr), Arc<LinkSlot>>>,
    pub stats: DialStats,
}

impl Dialer {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Arc<Self> {
        Arc::new(Self {
            tls: TlsConnector::from(tls),
            links: Mutex::new(HashMap::new()),
            stats: DialStats::default(),
        })
    }

    /// Forget links to nodes no route names any more.
    pub fn retain(&self, wanted: &std::collections::HashSet<(NodeName, SocketAddr)>) {
        lock(&self.links).retain(|k, _| wanted.contains(k));
    }

    pub fn links(&self) -> usize {
        lock(&self.links)
            .values()
            .filter(|s| lock(&s.live).as_ref().is_some_and(|l| !l.is_closed()))
            .count()
    }

    async fn link(&self, node: &NodeName, addr: SocketAddr) -> Result<Link, DialOutcome> {
        let slot = lock(&self.links)
            .entry((node.clone(), addr))
            .or_default()
            .clone();
        if let Some(link) = live(&slot) {
            return Ok(link);
        }
        let _dialing = slot.dialing.lock().await;
        if let Some(link) = live(&slot) {
            return Ok(link);
        }
        let link = self.dial(node, addr).await?;
        self.stats.links_made.fetch_add(1, Ordering::Relaxed);
        *lock(&slot.live) = Some(link.clone());
        Ok(link)
    }

    async fn dial(&self, node: &NodeName, addr: SocketAddr) -> Result<Link, DialOutcome> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| {
            tracing::info!(target: "slipway::edge", %node, %addr, error = %e, "cannot reach the node");
            DialOutcome::NodeUnreachable
        })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(node.as_str().to_string()).map_err(|_| DialOutcome::Tls)?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| {
            tracing::warn!(target: "slipway::edge", %node, %addr, error = %e,
                "tunnel link refused: TLS (is the node's certificate for this name, under the cluster CA?)");
            DialOutcome::Tls
        })?;
        let (link, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(LINK_WINDOW)
            .max_frame_size(64 << 10)
            .max_send_buf_size(1 << 20)
            // A node that stops answering pings is taken as gone within
            // about three seconds: requests on kept tunnels fail then, and
            // an idempotent one goes again on a new tunnel (504 or 502).
            .keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|_| DialOutcome::Protocol)?;
        let (node, node2) = (node.clone(), node.clone());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::info!(target: "slipway::edge", node = %node, error = %e, "tunnel link ended");
            }
        });
        tracing::debug!(target: "slipway::edge", node = %node2, %addr, "tunnel link up");
        Ok(link)
    }

    /// A tunnel to `port` of sandbox `id` on the record's node.
    pub async fn open(
        &self,
        id: &SandboxId,
        record: &SandboxRecord,
        port: GuestPort,
        presented: Option<TokenDigest>,
    ) -> Result<BoxGuestStream, GuestError> {
        let outcome = self.try_open(id, record, port, presented).await;
        match outcome {
            Ok(stream) => {
                self.stats.count(DialOutcome::Opened);
                Ok(stream)
            }
            Err(o) => {
                self.stats.count(o);
                tracing::debug!(target: "slipway::edge", sandbox = %id, node = %record.node, outcome = o.name(), "no tunnel");
                Err(o.guest_error())
            }
        }
    }

    async fn try_open(
        &self,
        id: &SandboxId,
        record: &SandboxRecord,
        port: GuestPort,
        presented: Option<TokenDigest>,
    ) -> Result<BoxGuestStream, DialOutcome> {
        let connect = || {
            let mut req = Request::new(Empty::new());
            *req.method_mut() = Method::CONNECT;
            *req.uri_mut() = format!("{id}:{port}")
                .parse()
                .map_err(|_| DialOutcome::Protocol)?;
            if let Some(d) = presented {
                if let Ok(v) = d.to_hex().parse() {
                    req.headers_mut().insert(DIGEST_HEADER, v);
                }
            }
            Ok::<_, DialOutcome>(req)
        };
        // A link that breaks under the request (the node died, or stopped
        // answering its pings) gets one more try on a new link: that one
        // tells a dead node (refused: 502) from a stopped one (no answer: 504).
        let mut retried = false;
        let mut resp = loop {
            // Each try bounded as a whole: requests queued behind a dial to
            // a stopped node give up together, not one after another.
            let started = tokio::time::Instant::now();
            let mut link = tokio::time::timeout(NODE_ANSWER, self.link(&record.node, record.addr))
                .await
                .map_err(|_| DialOutcome::NodeTimedOut)??;
            // The node answers at once (its checks are in memory): a node
            // that does not is stopped or overloaded, whatever the guest would do.
            let left = NODE_ANSWER.saturating_sub(started.elapsed());
            let req = connect()?;
            let answered = tokio::time::timeout(left.max(Duration::from_millis(100)), async {
                link.ready().await?;
                link.send_request(req).await
            })
            .await;
            match answered {
                Err(_) => return Err(DialOutcome::NodeTimedOut),
                Ok(Ok(resp)) => break resp,
                Ok(Err(e)) if !retried => {
                    tracing::debug!(target: "slipway::edge", node = %record.node, error = %e,
                        "the link broke under a tunnel request; once more on a new link");
                    retried = true;
                }
                Ok(Err(e)) => {
                    tracing::info!(target: "slipway::edge", node = %record.node, error = %e,
                        "tunnel refused by the link");
                    return Err(DialOutcome::NodeUnreachable);
                }
            }
        };
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(DialOutcome::NotOnNode),
            StatusCode::FORBIDDEN => return Err(DialOutcome::Forbidden),
            StatusCode::TOO_MANY_REQUESTS => return Err(DialOutcome::OverCap),
            StatusCode::SERVICE_UNAVAILABLE => return Err(DialOutcome::NodeDraining),
            _ => return Err(DialOutcome::Protocol),
        }
        let upgraded = hyper::upgrade::on(&mut resp)
            .await
            .map_err(|_| DialOutcome::Protocol)?;
        let mut stream = TokioIo::new(upgraded);
        let mut first = [0u8; 1];
        match tokio::time::timeout(GUEST_ANSWER, stream.read_exact(&mut first)).await {
            Err(_) => return Err(DialOutcome::GuestTimedOut),
            Ok(Err(_)) => return Err(DialOutcome::Protocol),
            Ok(Ok(_)) => {}
        }
        match Opened::from_byte(first[0]) {
            Some(Opened::Connected) => Ok(Box::new(Counted::new(stream, self.stats.live.clone()))),
            Some(Opened::Failed(GuestError::Refused)) => Err(DialOutcome::PortNotOpen),
            Some(Opened::Failed(GuestError::TimedOut)) => Err(DialOutcome::GuestTimedOut),
            Some(Opened::Failed(GuestError::OverCap)) => Err(DialOutcome::OverCap),
            Some(Opened::Failed(GuestError::Forbidden)) => Err(DialOutcome::Forbidden),
            Some(Opened::Failed(_)) => Err(DialOutcome::GuestUnreachable),
            None => Err(DialOutcome::Protocol),
        }
    }
}

fn live(slot: &LinkSlot) -> Option<Link> {
    lock(&slot.live)
        .as_ref()
        .filter(|l| !l.is_closed())
        .cloned()
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

/// A tunnel that counts itself while it lives (for the drain and metrics).
struct Counted<S> {
    inner: S,
    live: Arc<AtomicUsize>,
}

impl<S> Counted<S> {
    fn new(inner: S, live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self { inner, live }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
