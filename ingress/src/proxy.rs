//! One public request, end to end: find its target, check the token, take a
//! slot under the sandbox's cap, open a connection into the guest and speak
//! HTTP/1.1 over it (over TLS on the sandbox's httpsPorts, see `guest_tls`). Bodies stream both ways frame by frame; upgrades
//! (WebSocket and others) become a byte splice once both sides said 101.
//!
//! One guest connection per request: the connection into the stack is
//! in-process and cheap, and it keeps the cap exact (a slot is a live
//! connection) and lets no request see another's leftovers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;

use crate::cookie;
use crate::directory::{BoxGuestStream, Directory, GuestError, Route};
use crate::guest_tls::{self, GuestTlsError};
use crate::idle::{until_idle, Activity, Watched};
use crate::pool::PoolKey;
use crate::refusal::{wants_html, Refusal};
use crate::target::{authority_of, host_part, parse_target, Domain, SandboxId, Target};
use crate::token::{TokenCheck, TokenDigest, TOKEN_HEADER};
use crate::Body;

/// What every connection of one gateway shares.
pub(crate) struct Shared {
    pub directory: Arc<Directory>,
    pub domain: Domain,
    pub idle_timeout: Duration,
}

/// Who is on the other end of one client connection.
pub(crate) struct Client {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The connection's place under the gateway's caps, held by whatever
    /// holds the client: the connection, and a WebSocket it became.
    pub _admission: crate::server::Admission,
}

/// hyper's service: never fails, a refusal is a response too.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    client: Arc<Client>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let html = wants_html(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    Ok(match forward(&shared, client.clone(), req).await {
        Ok(resp) => resp,
        Err(refusal) => {
            tracing::info!(
                target: "slipway::ingress",
                client = %client.addr,
                %method,
                path = %path.chars().take(200).collect::<String>(),
                status = refusal.status().as_u16(),
                reason = refusal.reason(),
                "refused"
            );
            refusal.into_response(html)
        }
    })
}

async fn forward(
    shared: &Shared,
    client: Arc<Client>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let authority = authority_of(req.uri(), req.headers())
        .map_err(Refusal::BadTarget)?
        .to_string();
    let target =
        parse_target(&authority, req.headers(), &shared.domain).map_err(Refusal::BadTarget)?;
    let Target { sandbox, port } = target;
    // What cookies the guest sets may name as their Domain (see `cookie`).
    let host = host_part(&authority).map_err(Refusal::BadTarget)?;
    let route = shared
        .directory
        .get(&sandbox)
        .ok_or_else(|| Refusal::UnknownSandbox(sandbox.clone()))?;
    let public = route.is_public();
    if !public && shared.directory.private_refused() {
        return Err(Refusal::RoutesStale(sandbox));
    }
    match route.check_access(req.headers()) {
        TokenCheck::Granted => {}
        TokenCheck::Missing => return Err(Refusal::TokenMissing(sandbox)),
        TokenCheck::Invalid => return Err(Refusal::TokenInvalid(sandbox)),
    }
    // A way in through another host checks the token again there; kept
    // connections are reused only for the token that opened them.
    let presented = (!public)
        .then(|| TokenDigest::presented(req.headers()))
        .flatten();
    let slot = route
        .try_slot()
        .ok_or_else(|| Refusal::OverCap(sandbox.clone(), route.max_connections()))?;
    let broke = || Refusal::GuestBroke(sandbox.clone(), port);
    let idle = shared.idle_timeout;

    let upgrade = upgrade_protocol(&req);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let masked = route.mask().map(|m| m.render(port));
    // On an httpsPorts port the TLS session names the Host the guest sees.
    let tls_host = route
        .is_https(port)
        .then(|| guest_host(masked.as_ref(), &host));
    let key = PoolKey::new(port, presented.as_ref(), tls_host);
    let pooled = match upgrade {
        None => route.pool.take(&key).await,
        Some(_) => None,
    };
    let reused = pooled.is_some();
    let mut sender = match pooled {
        Some(s) => s,
        None => open(&route, &sandbox, &key, presented, idle).await?,
    };
    let upstream = to_guest(req, &authority, masked, &client, upgrade.clone());
    // A kept connection may be closed by the guest just as a request goes
    // out on it; a request that can safely go again (no body, idempotent
    // method) then goes once more on a new connection.
    let again = (reused && upstream.body().is_end_stream() && idempotent(upstream.method()))
        .then(|| empty_copy(&upstream));
    let mut resp = match sender.try_send_request(upstream).await {
        Ok(resp) => resp,
        Err(mut e) => {
            let unsent = e.take_message();
            match (reused, unsent.or(again)) {
                (true, Some(req)) => {
                    sender = open(&route, &sandbox, &key, presented, idle).await?;
                    sender.send_request(req).await.map_err(|e| {
                        tracing::debug!(target: "slipway::ingress", %sandbox, %port, error = %e, "guest answered no HTTP");
                        broke()
                    })?
                }
                _ => {
                    tracing::debug!(target: "slipway::ingress", %sandbox, %port, error = %e.into_error(), "guest answered no HTTP");
                    return Err(broke());
                }
            }
        }
    };

    if let (StatusCode::SWITCHING_PROTOCOLS, Some(client_upgrade)) = (resp.status(), client_upgrade)
    {
        let guest_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(g)) = tokio::join!(client_upgrade, guest_upgrade) else {
                return;
            };
            crate::forward::splice(TokioIo::new(c), TokioIo::new(g), idle).await;
            drop(slot);
            drop(client);
        });
        let mut out = Response::new(empty());
        *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *out.headers_mut() = resp.headers().clone();
        cookie::confine(out.headers_mut(), &host);
        return Ok(out);
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    cookie::confine(&mut parts.headers, &host);
    parts.version = Version::default();
    let keep = upgrade.is_none().then(|| (route.clone(), key, sender));
    let body = Held {
        body,
        done: false,
        keep,
        _slot: slot,
    }
    .map_err(Into::into)
    .boxed();
    Ok(Response::from_parts(parts, body))
}

/// The host (no port) of the Host header the guest will see: the mask's,
/// else the client's. What the TLS session to an httpsPorts port names.
fn guest_host(masked: Option<&HeaderValue>, client_host: &str) -> String {
    match masked {
        Some(m) => m
            .to_str()
            .ok()
            .and_then(|m| host_part(m).ok())
            .unwrap_or_default(),
        None => client_host.to_string(),
    }
}

/// A new HTTP/1.1 connection into the guest (over TLS on an httpsPorts
/// port), served by its own task until it is closed, idle, or taken over by
/// an upgrade.
async fn open(
    route: &Route,
    sandbox: &SandboxId,
    key: &PoolKey,
    presented: Option<TokenDigest>,
    idle: Duration,
) -> Result<SendRequest<Body>, Refusal> {
    let port = key.port;
    let stream = route
        .connect_presenting(port, presented)
        .await
        .map_err(|e| match e {
            GuestError::OverCap => Refusal::OverCap(sandbox.clone(), route.max_connections()),
            GuestError::NoPort => Refusal::NoLocalPort(sandbox.clone(), port),
            GuestError::Refused => Refusal::PortNotOpen(sandbox.clone(), port),
            GuestError::TimedOut => Refusal::GuestTimedOut(sandbox.clone(), port),
            GuestError::Gone => Refusal::UnknownSandbox(sandbox.clone()),
            GuestError::Forbidden => Refusal::TokenInvalid(sandbox.clone()),
        })?;
    let stream: BoxGuestStream = match &key.tls_host {
        None => stream,
        Some(host) => match guest_tls::connect(stream, host).await {
            Ok(tls) => Box::new(tls),
            Err(e) => {
                tracing::debug!(target: "slipway::ingress", %sandbox, %port, error = %e, "https port: no TLS session with the guest");
                return Err(match e {
                    GuestTlsError::TimedOut => Refusal::GuestTimedOut(sandbox.clone(), port),
                    GuestTlsError::Handshake(_) => Refusal::GuestBroke(sandbox.clone(), port),
                });
            }
        },
    };
    let activity = Activity::new();
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(Watched::new(stream, activity.clone())))
        .await
        .map_err(|_| Refusal::GuestBroke(sandbox.clone(), port))?;
    tokio::spawn(async move {
        let conn: Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>> =
            Box::pin(conn.with_upgrades());
        let _ = until_idle(activity, idle, conn).await;
    });
    Ok(sender)
}

fn idempotent(m: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(m)
}

/// The same bodyless request once more.
fn empty_copy(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

fn empty() -> Body {
    http_body_util::Empty::new().map_err(|n| match n {}).boxed()
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade`
/// plus `Upgrade: …`), except h2c, which the gateway answers itself.
fn upgrade_protocol(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 || !connection_has(req.headers(), "upgrade") {
        return None;
    }
    let up = req.headers().get(header::UPGRADE)?;
    let h2c = up
        .to_str()
        .map(|s| s.trim().eq_ignore_ascii_case("h2c"))
        .unwrap_or(false);
    (!h2c).then(|| up.clone())
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Headers that belong to one hop and never travel on.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The request as the guest gets it: HTTP/1.1, origin-form, hop-by-hop and
/// token headers gone, Host masked if asked, X-Forwarded-* set by us alone.
fn to_guest(
    req: Request<Incoming>,
    authority: &str,
    masked: Option<HeaderValue>,
    client: &Client,
    upgrade: Option<HeaderValue>,
) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    let body = body.map_err(Into::into).boxed();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    h.remove(TOKEN_HEADER);
    // HTTP/2 may split cookies over several fields; HTTP/1.1 wants one.
    let cookies: Vec<&[u8]> = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if cookies.len() > 1 {
        if let Ok(joined) = HeaderValue::from_bytes(&cookies.join(&b"; "[..])) {
            h.insert(header::COOKIE, joined);
        }
    }
    if let Some(up) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, up);
    }
    let original = HeaderValue::from_str(authority).ok();
    match (masked, &original) {
        (Some(m), _) => {
            h.insert(header::HOST, m);
        }
        (None, Some(o)) => {
            h.insert(header::HOST, o.clone());
        }
        (None, None) => {}
    }
    // Only the gateway may say who the client is: whatever the client
    // claimed in any of these headers goes, and the ones we set are ours.
    for name in CLIENT_CLAIMS {
        h.remove(name);
    }
    let ip = client_ip(client.addr);
    let proto = if client.tls { "https" } else { "http" };
    if let Ok(v) = HeaderValue::from_str(&forwarded(&ip, authority, proto)) {
        h.insert(header::FORWARDED, v);
    }
    if let Some(o) = original {
        h.insert("x-forwarded-host", o);
    }
    if let Ok(v) = HeaderValue::from_str(&ip) {
        h.insert("x-forwarded-for", v.clone());
        h.insert("x-real-ip", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    Request::from_parts(parts, body)
}

/// Headers in which a client could claim an address, host or scheme for
/// itself: removed from every request, then the gateway sets `Forwarded`,
/// `X-Real-IP` and `X-Forwarded-For/-Host/-Proto` itself.
const CLIENT_CLAIMS: [&str; 12] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
];

/// RFC 7239 `Forwarded`: `for` is the client (an IPv6 address bracketed and
/// quoted), `host` the authority it asked for (quoted: it may hold a colon).
fn forwarded(ip: &str, authority: &str, proto: &str) -> String {
    let node = if ip.contains(':') {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    // The authority passed `parse_target`; a quote or backslash in it would
    // still break the quoted-string, so such a host is left out.
    if authority.is_empty() || authority.contains(['"', '\\']) {
        format!("for={node};proto={proto}")
    } else {
        format!("for={node};host=\"{authority}\";proto={proto}")
    }
}

fn client_ip(addr: SocketAddr) -> String {
    match addr.ip() {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        ip => ip.to_string(),
    }
}

/// A response body that holds the sandbox's cap slot until it is done, and
/// then gives the guest connection back to the pool if it was read to the end.
struct Held<B: HttpBody> {
    body: B,
    done: bool,
    keep: Option<(Arc<Route>, PoolKey, SendRequest<Body>)>,
    _slot: OwnedSemaphorePermit,
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Held<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.done = true,
            Poll::Ready(Some(Err(_))) => self.keep = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: HttpBody> Drop for Held<B> {
    fn drop(&mut self) {
        if self.done || self.body.is_end_stream() {
            if let Some((route, key, sender)) = self.keep.take() {
                route.pool.give_back(key, sender);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::HostMask;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn client_ips_are_plain() {
        assert_eq!(
            client_ip("[::ffff:192.0.2.1]:5".parse().unwrap()),
            "192.0.2.1"
        );
        assert_eq!(client_ip("[2001:db8::1]:5".parse().unwrap()), "2001:db8::1");
        assert_eq!(client_ip("127.0.0.1:5".parse().unwrap()), "127.0.0.1");
    }

    #[test]
    fn forwarded_names_the_client_host_and_scheme() {
        let rows = [
            (
                "192.0.2.1",
                "8000-a.gw.test:8080",
                "http",
                r#"for=192.0.2.1;host="8000-a.gw.test:8080";proto=http"#,
            ),
            (
                "2001:db8::1",
                "8000-a.gw.test",
                "https",
                r#"for="[2001:db8::1]";host="8000-a.gw.test";proto=https"#,
            ),
            ("192.0.2.1", "a\"b", "http", "for=192.0.2.1;proto=http"),
            ("192.0.2.1", "", "http", "for=192.0.2.1;proto=http"),
        ];
        for (ip, authority, proto, want) in rows {
            assert_eq!(forwarded(ip, authority, proto), want);
        }
    }

    #[test]
    fn masks_render_per_port() {
        let m = HostMask::parse("localhost:${PORT}").unwrap();
        assert_eq!(
            m.render(crate::target::GuestPort::new(8080).unwrap()),
            "localhost:8080"
        );
    }
}
