//! One intercepted connection, start to end: read the guest's ClientHello,
//! open verified TLS to the server offering the guest's own ALPN choices,
//! finish the guest's handshake with a leaf of the sandbox's CA and the
//! protocol the server chose, then carry requests across (HTTP/1.1 or
//! HTTP/2), each one checked for its authority and given the rule's headers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::LazyConfigAcceptor;

use netstack::driver::InterceptedFlow;

use crate::rewrite;
use crate::upstream::{is_verification_failure, Offer};
use crate::{Shared, Stat};

/// Time for each TLS handshake, the guest's and the server's.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head larger than this is refused (HTTP/1.1: 431; HTTP/2:
/// the stream is reset).
const MAX_HEAD: usize = 64 << 10;
/// HTTP/2 streams at once on one guest connection.
const MAX_STREAMS: u32 = 128;
/// HTTP/2 flow-control windows, both sides: what one connection may hold
/// unread (hyper's defaults are 1 MiB and more).
const H2_STREAM_WINDOW: u32 = 256 << 10;
const H2_CONN_WINDOW: u32 = 512 << 10;
const H2_SEND_BUF: usize = 256 << 10;
/// Time a guest has to send a request's head on HTTP/1.1.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

type Body = Either<Incoming, Full<Bytes>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

/// Always the one leaf made for this connection's name.
#[derive(Debug)]
struct OneLeaf(Arc<CertifiedKey>);

impl ResolvesServerCert for OneLeaf {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

enum Upstream {
    /// HTTP/1.1 carries one request at a time.
    H1(tokio::sync::Mutex<client1::SendRequest<Incoming>>),
    H2(client2::SendRequest<Incoming>),
}

/// What every request on one connection needs.
struct Conn {
    shared: Arc<Shared>,
    flow: netstack::FlowId,
    name: String,
    rule: String,
    port: u16,
    guest: Proto,
    /// The server's side, or why there is none (every request gets a 502).
    upstream: Result<Upstream, String>,
}

pub(crate) async fn serve(shared: Arc<Shared>, flow: InterceptedFlow) {
    let InterceptedFlow {
        flow: id,
        name,
        rule,
        port,
        guest,
        upstream,
    } = flow;
    let accept = LazyConfigAcceptor::new(Acceptor::default(), guest);
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => return ended(id, &name, &format!("the guest's TLS failed: {e}")),
        Err(_) => return ended(id, &name, "the guest's TLS handshake timed out"),
    };
    let hello = start.client_hello();
    if hello.server_name().map(str::to_ascii_lowercase).as_deref() != Some(name.as_str()) {
        // The stack read this very ClientHello: it cannot differ, but a
        // secret must never ride on an assumption.
        return ended(
            id,
            &name,
            "the ClientHello's SNI is not the one the stack read",
        );
    }
    let offered: Option<Vec<Vec<u8>>> = hello.alpn().map(|i| i.map(<[u8]>::to_vec).collect());
    let (h2, h1) = match &offered {
        Some(list) => (
            list.iter().any(|p| p == b"h2"),
            list.iter().any(|p| p == b"http/1.1"),
        ),
        None => (false, true),
    };
    let offer = match (h2, h1) {
        (true, true) => Offer::H2AndH1,
        (true, false) => Offer::H2,
        (false, true) => Offer::H1,
        (false, false) => {
            return ended(
                id,
                &name,
                "the guest offers neither h2 nor http/1.1 in ALPN",
            )
        }
    };
    let connect = shared.upstream.connect(&name, offer, upstream);
    let (upstream, server_proto) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
        Ok(Ok(tls)) => {
            let proto = match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => Proto::H2,
                _ => Proto::H1,
            };
            (Ok(tls), Some(proto))
        }
        Ok(Err(e)) => {
            let why = if is_verification_failure(&e) {
                shared.count(Stat::UpstreamUnverified);
                format!(
                    "the server's certificate for {name} is not trusted ({e}); nothing was sent"
                )
            } else {
                shared.count(Stat::UpstreamFailed);
                format!("TLS to the server for {name} failed ({e}); nothing was sent")
            };
            tracing::info!(target: "slipway::inject", flow = %id, %name, %rule, error = %e, "upstream TLS refused");
            (Err(why), None)
        }
        Err(_) => {
            shared.count(Stat::UpstreamFailed);
            let why = format!("TLS to the server for {name} timed out; nothing was sent");
            (Err(why), None)
        }
    };
    // The guest speaks what the server chose; a server that chose nothing
    // speaks HTTP/1.1, which a guest that offered only h2 gets translated.
    let guest_proto = match server_proto {
        Some(Proto::H2) => Proto::H2,
        _ if h1 => Proto::H1,
        _ => Proto::H2,
    };
    let leaf = match shared.ca.leaf(&name) {
        Ok(leaf) => leaf,
        Err(e) => return ended(id, &name, &crate::chain(&e)),
    };
    let Ok(config) = server_config(leaf, offered.is_some().then_some(guest_proto)) else {
        return ended(id, &name, "cannot build the guest's TLS settings");
    };
    let guest = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return ended(id, &name, &format!("the guest's TLS failed: {e}")),
        Err(_) => return ended(id, &name, "the guest's TLS handshake timed out"),
    };
    let upstream = match (upstream, server_proto) {
        (Ok(tls), Some(proto)) => start_client(tls, proto).await.map_err(|e| {
            shared.count(Stat::UpstreamFailed);
            format!("the server for {name} failed: {e}")
        }),
        (Err(why), _) => Err(why),
        (Ok(_), None) => Err("no server".into()),
    };
    let conn = Arc::new(Conn {
        shared,
        flow: id,
        name,
        rule,
        port,
        guest: guest_proto,
        upstream,
    });
    let svc = {
        let conn = conn.clone();
        service_fn(move |req| handle(conn.clone(), req))
    };
    let io = TokioIo::new(guest);
    let served = match guest_proto {
        Proto::H1 => {
            server1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(io, svc)
                .await
        }
        Proto::H2 => {
            server2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(MAX_HEAD as u32)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONN_WINDOW)
                .max_send_buf_size(H2_SEND_BUF)
                .serve_connection(io, svc)
                .await
        }
    };
    let why = match served {
        Ok(()) => "closed".to_string(),
        Err(e) => format!("{e}"),
    };
    ended(conn.flow, &conn.name, &why);
}

fn ended(flow: netstack::FlowId, name: &str, why: &str) {
    tracing::debug!(target: "slipway::inject", %flow, %name, why, "intercepted connection ended");
}

fn server_config(
    leaf: Arc<CertifiedKey>,
    alpn: Option<Proto>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneLeaf(leaf)));
    config.alpn_protocols = match alpn {
        Some(Proto::H2) => vec![b"h2".to_vec()],
        Some(Proto::H1) => vec![b"http/1.1".to_vec()],
        None => Vec::new(),
    };
    Ok(Arc::new(config))
}

async fn start_client<IO>(io: IO, proto: Proto) -> hyper::Result<Upstream>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    Ok(match proto {
        Proto::H1 => {
            let (send, conn) = client1::Builder::new()
                .max_buf_size(MAX_HEAD.max(8192))
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Upstream::H1(tokio::sync::Mutex::new(send))
        }
        Proto::H2 => {
            let (send, conn) = client2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEAD as u32)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONN_WINDOW)
                .max_send_buf_size(H2_SEND_BUF)
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Upstream::H2(send)
        }
    })
}

/// The answer to a request the rewrite refused.
fn refused(conn: &Conn, refusal: rewrite::Refusal) -> Response<Body> {
    match refusal {
        rewrite::Refusal::Misdirected(named) => {
            conn.shared.count(Stat::Misdirected);
            tracing::info!(target: "slipway::inject", flow = %conn.flow, name = %conn.name,
                asked = %named, "421: the request names another host");
            let message = format!(
                "this connection is for {}; the request names {named} (Host and :authority must equal the TLS server name)",
                conn.name
            );
            own_response(StatusCode::MISDIRECTED_REQUEST, message)
        }
        rewrite::Refusal::Upgrade => {
            let message = "upgrades (WebSocket, CONNECT) are not carried on a connection slipway adds headers to";
            own_response(StatusCode::NOT_IMPLEMENTED, message.to_string())
        }
        rewrite::Refusal::MissingSecret(secret) => {
            conn.shared.count(Stat::MissingSecret);
            let message = format!(
                "the header rule for {} names secret {secret}, which is not set; nothing was sent",
                conn.rule
            );
            own_response(StatusCode::BAD_GATEWAY, message)
        }
    }
}

/// A response slipway makes itself (never a secret in it).
fn own_response(status: StatusCode, message: String) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(message + "\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    conn.shared.count(Stat::Request);
    let upstream = match &conn.upstream {
        Ok(u) => u,
        Err(why) => return Ok(own_response(StatusCode::BAD_GATEWAY, why.clone())),
    };
    let (mut parts, body) = req.into_parts();
    let flow = rewrite::Flow {
        name: &conn.name,
        rule: &conn.rule,
        port: conn.port,
    };
    let proto = match upstream {
        Upstream::H1(_) => rewrite::Protocol::Http1,
        Upstream::H2(_) => rewrite::Protocol::Http2,
    };
    let rules = conn.shared.rules();
    match rewrite::rewrite(&mut parts, &flow, &rules, &conn.shared.secrets, proto) {
        Ok(true) => conn.shared.count(Stat::Transformed),
        Ok(false) => {}
        Err(refusal) => return Ok(refused(&conn, refusal)),
    }
    let sent = match upstream {
        Upstream::H1(send) => {
            let mut send = send.lock().await;
            match send.ready().await {
                Ok(()) => send.send_request(Request::from_parts(parts, body)).await,
                Err(e) => Err(e),
            }
        }
        Upstream::H2(send) => {
            let mut send = send.clone();
            match send.ready().await {
                Ok(()) => send.send_request(Request::from_parts(parts, body)).await,
                Err(e) => Err(e),
            }
        }
    };
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            conn.shared.count(Stat::UpstreamFailed);
            let message = format!("the server for {} failed: {e}", conn.name);
            return Ok(own_response(StatusCode::BAD_GATEWAY, message));
        }
    };
    let (mut parts, body) = resp.into_parts();
    let closing = connection_closes(&parts.headers);
    rewrite::strip_hop_by_hop(&mut parts.headers);
    parts.version = match conn.guest {
        Proto::H1 => Version::HTTP_11,
        Proto::H2 => Version::HTTP_2,
    };
    if closing && conn.guest == Proto::H1 {
        // The server ends its connection: the guest must open a new one.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(Response::from_parts(parts, Either::Left(body)))
}

fn connection_closes(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}
