//! The gateway in-process, no namespaces or root needed: a fake sandbox whose
//! "guest" is a small HTTP server on loopback, and raw HTTP/1.1 clients.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ingress::{
    BoxGuestStream, ConnectFuture, Directory, Domain, Gateway, GatewayConfig, GuestConnector,
    GuestError, GuestPort, HostMask, Limits, Route, RouteSpec, SandboxId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Guest ports map to loopback servers; any other port is refused.
struct FakeSandbox(HashMap<u16, SocketAddr>);

impl GuestConnector for FakeSandbox {
    fn connect(&self, port: GuestPort) -> ConnectFuture<'_> {
        let addr = self.0.get(&port.get()).copied();
        Box::pin(async move {
            let addr = addr.ok_or(GuestError::Refused)?;
            let s = TcpStream::connect(addr)
                .await
                .map_err(|_| GuestError::Refused)?;
            Ok(Box::new(s) as BoxGuestStream)
        })
    }
}

/// The guest's server: answers with the headers it got, one per line;
/// `/slow` answers after a second; `/cookies` sets the cookies of `COOKIES`.
async fn guest_server(accepted: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let mut text = String::new();
                    for (k, v) in req.headers() {
                        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                    }
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
                    if req.uri().path() == "/cookies" {
                        for (sent, _) in COOKIES {
                            let v = hyper::header::HeaderValue::from_bytes(sent).unwrap();
                            resp.headers_mut().append(hyper::header::SET_COOKIE, v);
                        }
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// What the guest's `/cookies` sets, and what the client must get of it
/// through `8000-sbx.gw.test` (`None`: dropped).
const COOKIES: [(&[u8], Option<&[u8]>); 5] = [
    (
        b"parent=1; Domain=gw.test; Path=/",
        Some(b"parent=1; Path=/"),
    ),
    (b"dotted=1; Domain=.GW.test", Some(b"dotted=1")),
    (b"sibling=1; Domain=8000-other.gw.test", Some(b"sibling=1")),
    (
        b"own=1; Domain=8000-sbx.gw.test; HttpOnly",
        Some(b"own=1; Domain=8000-sbx.gw.test; HttpOnly"),
    ),
    (b"raw=\xff\xfe; domain=gw.test", Some(b"raw=\xff\xfe")),
];

async fn gateway(spec: RouteSpec) -> (SocketAddr, Arc<Route>, Option<String>) {
    gateway_counting(spec, Arc::default()).await
}

async fn gateway_counting(
    spec: RouteSpec,
    accepted: Arc<AtomicUsize>,
) -> (SocketAddr, Arc<Route>, Option<String>) {
    let (addr, route, token, _) = gateway_with(spec, accepted, Limits::default()).await;
    (addr, route, token)
}

async fn gateway_with(
    spec: RouteSpec,
    accepted: Arc<AtomicUsize>,
    limits: Limits,
) -> (SocketAddr, Arc<Route>, Option<String>, Arc<Gateway>) {
    let guest = guest_server(accepted).await;
    let directory = Arc::new(Directory::new());
    let sandbox = FakeSandbox(HashMap::from([(8000, guest)]));
    let (route, token) = Route::new(Arc::new(sandbox), spec).unwrap();
    let route = directory.insert(SandboxId::parse("sbx").unwrap(), route);
    let gw = Gateway::new(
        GatewayConfig {
            domain: Domain::parse("gw.test").unwrap(),
            tls: None,
            limits,
        },
        directory,
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(gw.clone().serve(l));
    (addr, route, token.map(|t| t.as_str().to_string()), gw)
}

/// A gateway for `gw.test` over `directory`, with default limits, on loopback.
async fn serve_directory(directory: Arc<Directory>) -> SocketAddr {
    let gw = Gateway::new(
        GatewayConfig {
            domain: Domain::parse("gw.test").unwrap(),
            tls: None,
            limits: Limits::default(),
        },
        directory,
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(gw.serve(l));
    addr
}

fn public() -> RouteSpec {
    RouteSpec {
        allow_public_traffic: true,
        mask_request_host: None,
        max_connections: 16,
        https_ports: Vec::new(),
    }
}

/// One HTTP/1.1 request; the status and the body.
async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let (code, head, body) = get_from([127, 0, 0, 1].into(), addr, host, path, headers).await;
    let _ = head;
    (code, body)
}

/// One HTTP/1.1 request from the source address `from`: the status, the
/// head's raw bytes and the body.
async fn get_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[&str],
) -> (u16, Vec<u8>, String) {
    let mut s = connect_from(from, addr).await;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text[9..12].parse().unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let body = String::from_utf8_lossy(&out[split + 4..]).into_owned();
    (code, out[..split].to_vec(), body)
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test]
async fn routes_by_host_and_sets_forwarded_headers() {
    let (addr, _, _) = gateway(public()).await;
    let (code, body) = get(
        addr,
        "8000-sbx.gw.test",
        "/",
        &["X-Forwarded-For: 203.0.113.1"],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("host: 8000-sbx.gw.test\n"), "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(!body.contains("203.0.113.1"), "{body}");
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
}

#[tokio::test]
async fn status_rows_without_a_kernel() {
    let (addr, _, _) = gateway(public()).await;
    assert_eq!(get(addr, "8001-sbx.gw.test", "/", &[]).await.0, 502);
    assert_eq!(get(addr, "8000-other.gw.test", "/", &[]).await.0, 502);
    assert_eq!(get(addr, "0-sbx.gw.test", "/", &[]).await.0, 400);
    assert_eq!(get(addr, "localhost", "/", &[]).await.0, 400);
    let (code, _) = get(
        addr,
        "localhost",
        "/",
        &["E2b-Sandbox-Id: sbx", "E2b-Sandbox-Port: 8000"],
    )
    .await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn the_token_is_checked_and_never_forwarded_and_the_host_is_masked() {
    let (addr, route, token) = gateway(RouteSpec {
        allow_public_traffic: false,
        mask_request_host: Some(HostMask::parse("localhost:${PORT}").unwrap()),
        max_connections: 16,
        https_ports: Vec::new(),
    })
    .await;
    let token = token.unwrap();
    let host = "8000-sbx.gw.test";
    let (code, body) = get(addr, host, "/", &[]).await;
    assert_eq!(code, 403);
    assert!(body.contains("missing_traffic_access_token"), "{body}");
    let (code, body) = get(addr, host, "/", &["e2b-traffic-access-token: no"]).await;
    assert_eq!(code, 403);
    assert!(body.contains("invalid_traffic_access_token"), "{body}");
    let header = format!("e2b-traffic-access-token: {token}");
    let (code, body) = get(addr, host, "/", &[&header]).await;
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("e2b-traffic-access-token"), "{body}");
    assert!(body.contains("host: localhost:8000\n"), "{body}");
    assert!(
        body.contains("x-forwarded-host: 8000-sbx.gw.test\n"),
        "{body}"
    );
    let fresh = route.rotate_token().unwrap().unwrap();
    assert_eq!(get(addr, host, "/", &[&header]).await.0, 403);
    let header = format!("e2b-traffic-access-token: {}", fresh.as_str());
    assert_eq!(get(addr, host, "/", &[&header]).await.0, 200);
}

#[tokio::test]
async fn over_the_sandbox_cap_is_429_until_a_slot_frees() {
    let (addr, _, _) = gateway(RouteSpec {
        max_connections: 1,
        ..public()
    })
    .await;
    let slow = tokio::spawn(get(addr, "8000-sbx.gw.test", "/slow", &[]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = get(addr, "8000-sbx.gw.test", "/", &[]).await;
    assert_eq!(code, 429, "{body}");
    assert!(
        body.contains(
            "\"message\":\"The sandbox has too many concurrent incoming connections (limit: 1)\""
        ),
        "{body}"
    );
    assert_eq!(slow.await.unwrap().0, 200);
    assert_eq!(get(addr, "8000-sbx.gw.test", "/", &[]).await.0, 200);
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    let (addr, _, _) = gateway(public()).await;
    let big = format!("X-Big: {}", "a".repeat(70 << 10));
    let (code, _) = get(addr, "8000-sbx.gw.test", "/", &[&big]).await;
    assert_eq!(code, 431);
}

#[tokio::test]
async fn keep_alive_requests_reuse_one_guest_connection() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let (addr, route, _) = gateway_counting(public(), accepted.clone()).await;
    for _ in 0..5 {
        assert_eq!(get(addr, "8000-sbx.gw.test", "/", &[]).await.0, 200);
        // The body was read to the end: its connection is kept for the next.
        assert_eq!(route.idle_connections(), 1);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn one_sandbox_over_its_cap_leaves_the_others_alone() {
    let guest = guest_server(Arc::default()).await;
    let directory = Arc::new(Directory::new());
    for (id, cap) in [("busy", 1), ("calm", 4)] {
        let sandbox = FakeSandbox(HashMap::from([(8000, guest)]));
        let spec = RouteSpec {
            max_connections: cap,
            ..public()
        };
        let (route, _) = Route::new(Arc::new(sandbox), spec).unwrap();
        directory.insert(SandboxId::parse(id).unwrap(), route);
    }
    let addr = serve_directory(directory).await;
    let slow = tokio::spawn(get(addr, "8000-busy.gw.test", "/slow", &[]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(addr, "8000-busy.gw.test", "/", &[]).await.0, 429);
    assert_eq!(get(addr, "8000-calm.gw.test", "/", &[]).await.0, 200);
    assert_eq!(slow.await.unwrap().0, 200);
}

#[tokio::test]
async fn one_client_over_its_cap_gets_429_and_other_clients_are_untouched() {
    let limits = Limits {
        max_connections_per_client: 3,
        ..Limits::default()
    };
    let (addr, _, _, gw) = gateway_with(public(), Arc::default(), limits).await;
    let (one, two) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
    // Three silent connections from 127.0.0.1 take its whole cap.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(one, addr).await);
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while gw.open_connections() < 3 {
        assert!(tokio::time::Instant::now() < until, "not admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (code, head, body) = get_from(one, addr, "8000-sbx.gw.test", "/", &[]).await;
    assert_eq!(code, 429, "{body}");
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(
        body.starts_with(r#"{"code":429,"error":"too_many_client_connections""#)
            && body.contains("127.0.0.1"),
        "{body}"
    );
    let (code, _, page) =
        get_from(one, addr, "8000-sbx.gw.test", "/", &["Accept: text/html"]).await;
    assert_eq!(code, 429);
    assert!(page.starts_with("<!doctype html>"), "{page}");
    // Another address is served as before.
    let (code, _, body) = get_from(two, addr, "8000-sbx.gw.test", "/", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        gw.stats()
            .over_max_connections_per_client
            .load(Ordering::Relaxed),
        2
    );
    assert_eq!(gw.stats().over_max_connections.load(Ordering::Relaxed), 0);
    // A closed connection gives its client's slot back.
    drop(held.pop());
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _, _) = get_from(one, addr, "8000-sbx.gw.test", "/", &[]).await;
        if code == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn forwarded_and_x_real_ip_come_from_the_gateway_alone() {
    let (addr, _, _) = gateway(public()).await;
    let (code, body) = get(
        addr,
        "8000-sbx.gw.test",
        "/",
        &[
            "Forwarded: for=203.0.113.9;proto=https",
            "Forwarded: for=203.0.113.10",
            "X-Real-IP: 203.0.113.9",
            "True-Client-IP: 203.0.113.9",
            "X-Forwarded-Port: 443",
        ],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.contains("203.0.113"),
        "a claim reached the guest: {body}"
    );
    assert!(!body.contains("x-forwarded-port"), "{body}");
    assert!(body.contains("x-real-ip: 127.0.0.1\n"), "{body}");
    assert!(
        body.contains("forwarded: for=127.0.0.1;host=\"8000-sbx.gw.test\";proto=http\n"),
        "{body}"
    );
    assert_eq!(body.matches("forwarded:").count(), 1, "{body}");
}

#[tokio::test]
async fn guest_cookies_stay_on_the_sandbox_host_over_http1() {
    let (addr, _, _) = gateway(public()).await;
    let (code, head, _) = get_from(
        [127, 0, 0, 1].into(),
        addr,
        "8000-sbx.gw.test",
        "/cookies",
        &[],
    )
    .await;
    assert_eq!(code, 200);
    let got: Vec<&[u8]> = head
        .split(|&b| b == b'\n')
        .filter_map(|l| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            l.len()
                .checked_sub(12)
                .filter(|_| l[..12].eq_ignore_ascii_case(b"set-cookie: "))
                .map(|_| &l[12..])
        })
        .collect();
    let want: Vec<&[u8]> = COOKIES.iter().filter_map(|(_, w)| *w).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn guest_cookies_stay_on_the_sandbox_host_over_h2c() {
    let (addr, _, _) = gateway(public()).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("http://8000-sbx.gw.test/cookies")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got: Vec<&[u8]> = resp
        .headers()
        .get_all(hyper::header::SET_COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let want: Vec<&[u8]> = COOKIES.iter().filter_map(|(_, w)| *w).collect();
    assert_eq!(got, want);
}

/// A sandbox whose stack has no local port left toward the guest (every
/// ephemeral port of the gateway address is in use), as the driver reports it.
struct OutOfPorts;

impl GuestConnector for OutOfPorts {
    fn connect(&self, _port: GuestPort) -> ConnectFuture<'_> {
        Box::pin(async { Err(GuestError::NoPort) })
    }
}

#[tokio::test]
async fn running_out_of_local_ports_is_503_not_429() {
    let directory = Arc::new(Directory::new());
    let (route, _) = Route::new(Arc::new(OutOfPorts), public()).unwrap();
    directory.insert(SandboxId::parse("sbx").unwrap(), route);
    let addr = serve_directory(directory).await;
    let (code, body) = get(addr, "8000-sbx.gw.test", "/", &[]).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("\"error\":\"gateway_out_of_ports\""),
        "{body}"
    );
    assert!(body.contains("ran out of local ports"), "{body}");
    assert!(!body.contains("too many"), "{body}");
}

/// A guest HTTPS server with a self-signed certificate (rcgen, made now)
/// that offers h2 before http/1.1 and answers with the SNI and ALPN the
/// gateway's ClientHello carried, then the headers it got.
async fn tls_guest_server(accepted: Arc<AtomicUsize>) -> SocketAddr {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["guest.internal".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            accepted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let sni = conn.server_name().unwrap_or("none").to_string();
                let alpn = conn
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or("none".into());
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut text = format!("sni: {sni}\nalpn: {alpn}\n");
                    for (k, v) in req.headers() {
                        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                    }
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// A sandbox whose port 8443 is the TLS guest and 8000 the plain one, with
/// `https` as its httpsPorts: the gateway's address and the TLS guest's
/// accept count.
async fn https_gateway(https: &[u16], mask: Option<&str>) -> (SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let tls = tls_guest_server(accepted.clone()).await;
    let plain = guest_server(Arc::default()).await;
    let directory = Arc::new(Directory::new());
    let sandbox = FakeSandbox(HashMap::from([(8443, tls), (8000, plain)]));
    let spec = RouteSpec {
        mask_request_host: mask.map(|m| HostMask::parse(m).unwrap()),
        https_ports: ingress::https_ports(https).unwrap(),
        ..public()
    };
    let (route, _) = Route::new(Arc::new(sandbox), spec).unwrap();
    directory.insert(SandboxId::parse("sbx").unwrap(), route);
    (serve_directory(directory).await, accepted)
}

#[tokio::test]
async fn https_ports_reach_a_self_signed_guest_with_the_guests_host_as_sni() {
    let (addr, accepted) = https_gateway(&[8443], None).await;
    let host = "8443-sbx.gw.test";
    for _ in 0..3 {
        let (code, body) = get(addr, host, "/", &[]).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("sni: 8443-sbx.gw.test\n"), "{body}");
        // Offered h2 first, the guest still speaks http/1.1: nothing else was offered.
        assert!(body.contains("alpn: http/1.1\n"), "{body}");
        assert!(body.contains("host: 8443-sbx.gw.test\n"), "{body}");
        assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    }
    // Kept-alive: one TLS session served the three.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Another Host the guest sees, another session; an IP literal names none.
    let by_header = ["E2b-Sandbox-Id: sbx", "E2b-Sandbox-Port: 8443"];
    let (code, body) = get(addr, "localhost:8080", "/", &by_header).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("sni: localhost\n"), "{body}");
    let (code, body) = get(addr, "127.0.0.1:8080", "/", &by_header).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("sni: none\n"), "{body}");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    // The plain port beside it stays plain.
    let (code, body) = get(addr, "8000-sbx.gw.test", "/", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("sni:"), "{body}");
}

#[tokio::test]
async fn a_masked_host_is_the_sni_too() {
    let (addr, _) = https_gateway(&[8443], Some("app.internal:${PORT}")).await;
    let (code, body) = get(addr, "8443-sbx.gw.test", "/", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("sni: app.internal\n"), "{body}");
    assert!(body.contains("host: app.internal:8443\n"), "{body}");
}

#[tokio::test]
async fn a_tls_port_not_in_https_ports_and_a_plain_one_in_them_both_fail_as_upstream_errors() {
    // As before httpsPorts: plain HTTP to a TLS server is no HTTP answer.
    let (addr, _) = https_gateway(&[], None).await;
    let (code, body) = get(addr, "8443-sbx.gw.test", "/", &[]).await;
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("\"error\":\"bad_upstream_response\""),
        "{body}"
    );
    // A plain server on an httpsPorts port: the handshake fails, the same 502.
    let (addr, _) = https_gateway(&[8000], None).await;
    let (code, body) = get(addr, "8000-sbx.gw.test", "/", &[]).await;
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("\"error\":\"bad_upstream_response\""),
        "{body}"
    );
}
