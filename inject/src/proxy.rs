//! One intercepted connection, start to end: read the guest's ClientHello,
//! open verified TLS to the server offering the guest's own ALPN choices,
//! finish the guest's handshake with a leaf of the sandbox's CA and the
//! protocol the server chose, then carry requests across (HTTP/1.1 or
//! HTTP/2), each one checked for its authority and given the rule's headers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
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
use zeroize::Zeroizing;

use netstack::driver::InterceptedFlow;

use crate::rules::echo;
use crate::upstream::{is_verification_failure, Offer};
use crate::{Shared, Stat};

/// Time for each TLS handshake, the guest's and the server's.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head larger than this is refused (HTTP/1.1: 431; HTTP/2:
/// the stream is reset).
const MAX_HEAD: usize = 64 << 10;
/// HTTP/2 streams at once on one guest connection.
const MAX_STREAMS: u32 = 128;
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
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Upstream::H2(send)
        }
    })
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
    if let Err(named) = check_authority(&req, &conn.name, conn.port) {
        conn.shared.count(Stat::Misdirected);
        tracing::info!(target: "slipway::inject", flow = %conn.flow, name = %conn.name,
            asked = %named, "421: the request names another host");
        let message = format!(
            "this connection is for {}; the request names {named} (Host and :authority must equal the TLS server name)",
            conn.name
        );
        return Ok(own_response(StatusCode::MISDIRECTED_REQUEST, message));
    }
    if req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE) {
        let message =
            "upgrades (WebSocket, CONNECT) are not carried on a connection slipway adds headers to"
                .to_string();
        return Ok(own_response(StatusCode::NOT_IMPLEMENTED, message));
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    match add_rule_headers(&conn, &mut parts.headers) {
        Ok(true) => conn.shared.count(Stat::Transformed),
        Ok(false) => {}
        Err(secret) => {
            conn.shared.count(Stat::MissingSecret);
            let message = format!(
                "the header rule for {} names secret {secret}, which is not set; nothing was sent",
                conn.rule
            );
            return Ok(own_response(StatusCode::BAD_GATEWAY, message));
        }
    }
    let authority = authority_of(&parts.uri, &parts.headers, &conn.name);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let sent = match upstream {
        Upstream::H1(send) => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
            if !parts.headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(&authority) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            let mut send = send.lock().await;
            match send.ready().await {
                Ok(()) => send.send_request(Request::from_parts(parts, body)).await,
                Err(e) => Err(e),
            }
        }
        Upstream::H2(send) => {
            parts.version = Version::HTTP_2;
            parts.uri = Uri::try_from(format!("https://{authority}{path}"))
                .unwrap_or_else(|_| Uri::from_static("/"));
            parts.headers.remove(header::HOST);
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
    strip_hop_by_hop(&mut parts.headers);
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

/// The rule's headers, values resolved now (a rotated secret applies to
/// the next request), each replacing what the guest sent under that name.
/// Placeholders the guest wrote itself are left as it wrote them: only the
/// rule's own templates are expanded. `Err(secret)`: one is not set.
fn add_rule_headers(conn: &Conn, headers: &mut HeaderMap) -> Result<bool, String> {
    let rules = conn.shared.rules();
    let Some(rule) = rules.rule(&conn.rule) else {
        // Replaced since the flow was intercepted: nothing to add.
        return Ok(false);
    };
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(rule.headers.len());
    for h in &rule.headers {
        let held: Vec<(String, Arc<crate::secrets::Secret>)> = h
            .value
            .secrets()
            .map(|s| {
                conn.shared
                    .secrets
                    .get(s)
                    .map(|v| (s.to_string(), v))
                    .ok_or(s)
            })
            .collect::<Result<_, _>>()
            .map_err(str::to_string)?;
        let mut value = Zeroizing::new(Vec::new());
        h.value
            .expand_into(&mut value, |name| {
                held.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.expose())
            })
            .map_err(str::to_string)?;
        // The header keeps this very buffer, which is wiped when it is dropped.
        let Ok(mut value) = HeaderValue::from_maybe_shared(Bytes::from_owner(value)) else {
            // Secrets and templates are checked for header bytes when set.
            return Err("(unusable value)".into());
        };
        value.set_sensitive(true);
        out.push((h.name.clone(), value));
    }
    let changed = !out.is_empty();
    for (name, value) in out {
        headers.insert(name, value);
    }
    Ok(changed)
}

/// Every authority the request names (Host, and the URI's for HTTP/2 or an
/// absolute-form target) must be this connection's name, on its port (or
/// none). `Err(what it named)`, short and printable.
fn check_authority<B>(req: &Request<B>, name: &str, port: u16) -> Result<(), String> {
    let mut named = Vec::new();
    if let Some(a) = req.uri().authority() {
        named.push(a.as_str().to_string());
    }
    for v in req.headers().get_all(header::HOST) {
        named.push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    if named.is_empty() {
        return Err("no host".into());
    }
    for a in named {
        if !authority_is(&a, name, port) {
            return Err(echo(&a));
        }
    }
    Ok(())
}

fn authority_is(authority: &str, name: &str, port: u16) -> bool {
    if authority.contains('@') {
        return false;
    }
    let (host, p) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let port_ok = match p {
        None => true,
        Some(p) => p.parse::<u16>() == Ok(port),
    };
    port_ok && host.eq_ignore_ascii_case(name)
}

/// `name[:port]` as the guest named it (already checked to be this name).
fn authority_of(uri: &Uri, headers: &HeaderMap, name: &str) -> String {
    uri.authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| name.to_string())
}

fn connection_closes(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// Headers for one hop only (RFC 9110 7.6.1), and those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(n);
    }
    for n in ["keep-alive", "proxy-connection"] {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_must_be_the_sni_on_the_flows_port() {
        let rows = [
            ("api.example.test", true),
            ("API.Example.Test", true),
            ("api.example.test.", true),
            ("api.example.test:443", true),
            ("api.example.test:8443", false),
            ("api.example.test:x", false),
            ("evil.test", false),
            ("api.example.test.evil.test", false),
            ("user@api.example.test", false),
            ("", false),
        ];
        for (a, ok) in rows {
            assert_eq!(authority_is(a, "api.example.test", 443), ok, "{a}");
        }
        let req = |host: &str| {
            Request::builder()
                .uri("/x")
                .header("host", host)
                .body(())
                .unwrap()
        };
        assert!(check_authority(&req("api.example.test"), "api.example.test", 443).is_ok());
        assert_eq!(
            check_authority(&req("evil.test"), "api.example.test", 443),
            Err("evil.test".into())
        );
        // An absolute-form target and a Host must both name it.
        let both = Request::builder()
            .uri("https://evil.test/x")
            .header("host", "api.example.test")
            .body(())
            .unwrap();
        assert!(check_authority(&both, "api.example.test", 443).is_err());
        let none = Request::builder().uri("/x").body(()).unwrap();
        assert!(check_authority(&none, "api.example.test", 443).is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("authorization", HeaderValue::from_static("guest's own"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["authorization"]);
    }
}
