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
/// `/slow` answers after a second.
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
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn gateway(spec: RouteSpec) -> (SocketAddr, Arc<Route>, Option<String>) {
    gateway_counting(spec, Arc::default()).await
}

async fn gateway_counting(
    spec: RouteSpec,
    accepted: Arc<AtomicUsize>,
) -> (SocketAddr, Arc<Route>, Option<String>) {
    let guest = guest_server(accepted).await;
    let directory = Arc::new(Directory::new());
    let sandbox = FakeSandbox(HashMap::from([(8000, guest)]));
    let (route, token) = Route::new(Arc::new(sandbox), spec).unwrap();
    let route = directory.insert(SandboxId::parse("sbx").unwrap(), route);
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
    (addr, route, token.map(|t| t.as_str().to_string()))
}

fn public() -> RouteSpec {
    RouteSpec {
        allow_public_traffic: true,
        mask_request_host: None,
        max_connections: 16,
    }
}

/// One HTTP/1.1 request; the status and the body.
async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
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
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
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
    let slow = tokio::spawn(get(addr, "8000-busy.gw.test", "/slow", &[]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(addr, "8000-busy.gw.test", "/", &[]).await.0, 429);
    assert_eq!(get(addr, "8000-calm.gw.test", "/", &[]).await.0, 200);
    assert_eq!(slow.await.unwrap().0, 200);
}
