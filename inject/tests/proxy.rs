//! The interceptor in-process, with real TLS both ways: a test CA's HTTPS
//! server on loopback that records the headers it got (and never echoes
//! them), and a guest that trusts only the sandbox's CA. No stack: the
//! flow is handed over as the driver would hand it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use inject::{HeaderRules, Injector, SecretStore, UpstreamTls};
use netstack::driver::{InterceptedFlow, Interceptor};
use netstack::FlowId;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream, UnixStream};

const NAME: &str = "api.example.test";
const SECRET: &str = "sk-test-6f1c0ffee";

/// What the server got: each request's headers.
type Seen = Arc<Mutex<Vec<HeaderMap>>>;

struct Server {
    addr: SocketAddr,
    seen: Seen,
}

/// A certificate for `names` and its key; signed by `ca` when given.
fn cert(
    names: &[&str],
    ca: Option<(&rcgen::Certificate, &KeyPair)>,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let c = match ca {
        Some((ca, ca_key)) => params.signed_by(&key, ca, ca_key).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (
        c.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    file: PathBuf,
}

fn test_ca(tag: &str) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    // One file per CA: the tests run in parallel in one process, and a
    // shared name let one test's CA replace another's under its feet.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!("inject-{}-{tag}-{n}.pem", std::process::id()));
    std::fs::write(&file, cert.pem()).unwrap();
    TestCa { cert, key, file }
}

/// An HTTPS server (h2 and http/1.1 by ALPN) with this certificate.
async fn server(chain: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Server {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![chain], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = s.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let version = format!("{:?}", req.version());
                        seen.lock().unwrap().push(req.headers().clone());
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let text = format!("ok {version} {} bytes\n", body.map_or(0, |b| b.len()));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(text),
                        )))
                    }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    Server { addr, seen }
}

struct World {
    injector: Injector,
    secrets: SecretStore,
    trusted: Server,
    untrusted: Server,
    _ca: TestCa,
}

async fn world(rule: &str) -> World {
    let ca = test_ca("ca");
    let (chain, key) = cert(&[NAME, "other.example.test"], Some((&ca.cert, &ca.key)));
    let trusted = server(chain, key).await;
    let (chain, key) = cert(&[NAME], None);
    let untrusted = server(chain, key).await;
    let secrets = SecretStore::new();
    secrets.put("KEY", SECRET.as_bytes().to_vec()).unwrap();
    let rules = HeaderRules::from_flags(&[rule.to_string()]).unwrap();
    rules.check_secrets(|n| secrets.contains(n)).unwrap();
    let upstream = UpstreamTls::new(&[&ca.file]).unwrap();
    let injector = Injector::new("sbx-test", rules, secrets.clone(), upstream).unwrap();
    World {
        injector,
        secrets,
        trusted,
        untrusted,
        _ca: ca,
    }
}

/// Hand a flow to `server` over to the interceptor; the guest's stream.
async fn intercepted(w: &World, server: SocketAddr, rule: &str) -> UnixStream {
    let (guest, theirs) = UnixStream::pair().unwrap();
    let upstream = TcpStream::connect(server).await.unwrap();
    w.injector.intercept(InterceptedFlow {
        flow: FlowId(1),
        name: NAME.into(),
        rule: rule.into(),
        port: 443,
        guest: theirs,
        upstream: Box::pin(upstream),
    });
    guest
}

/// Every byte the guest's client read, for scanning.
type Tap = Arc<Mutex<Vec<u8>>>;

/// A stream that keeps a copy of everything read through it.
struct Recording {
    inner: UnixStream,
    tap: Tap,
}

impl tokio::io::AsyncRead for Recording {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.tap.lock().unwrap().extend_from_slice(&new);
        r
    }
}

impl tokio::io::AsyncWrite for Recording {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The guest's TLS: trusts the sandbox CA only, offers `alpn`. The TLS
/// stream, or the handshake's error.
async fn guest_tls(
    w: &World,
    stream: UnixStream,
    alpn: &[&[u8]],
    tap: Tap,
) -> std::io::Result<tokio_rustls::client::TlsStream<Recording>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(w.injector.ca_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(NAME).unwrap();
    connector
        .connect(name, Recording { inner: stream, tap })
        .await
}

/// A request: path, Host (or :authority), extra headers.
type Req<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

/// Send these requests over one guest connection; status and body of each.
async fn requests(
    w: &World,
    server: SocketAddr,
    alpn: &[&[u8]],
    reqs: &[Req<'_>],
) -> (Vec<(StatusCode, String)>, Vec<u8>) {
    let guest = intercepted(w, server, "api.example.test").await;
    let tap = Tap::default();
    let tls = guest_tls(w, guest, alpn, tap.clone()).await.unwrap();
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let mut out = Vec::new();
    if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        for (path, host, extra) in reqs {
            let mut b = Request::builder().uri(format!("https://{host}{path}"));
            for (k, v) in *extra {
                b = b.header(*k, *v);
            }
            let resp = send
                .send_request(b.body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            out.push((status, String::from_utf8_lossy(&body).into_owned()));
        }
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        for (path, host, extra) in reqs {
            let mut b = Request::builder().uri(*path).header("host", *host);
            for (k, v) in *extra {
                b = b.header(*k, *v);
            }
            send.ready().await.unwrap();
            let resp = send
                .send_request(b.body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            out.push((status, String::from_utf8_lossy(&body).into_owned()));
        }
    }
    let seen = tap.lock().unwrap().clone();
    (out, seen)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const RULE: &str = "api.example.test=Authorization: Bearer ${e2b.secrets.KEY}";

#[tokio::test]
async fn http1_requests_get_the_rules_header_and_the_guest_never_sees_the_secret() {
    let w = world(RULE).await;
    let (got, bytes) = requests(
        &w,
        w.trusted.addr,
        &[b"http/1.1"],
        &[
            ("/v1/a", NAME, &[("authorization", "guest's own")]),
            (
                "/v1/b",
                "API.example.test:443",
                &[("x-mine", "${e2b.secrets.KEY}")],
            ),
        ],
    )
    .await;
    assert_eq!(got[0].0, StatusCode::OK, "{got:?}");
    assert!(got[0].1.starts_with("ok HTTP/1.1"), "{got:?}");
    assert_eq!(got[1].0, StatusCode::OK, "{got:?}");
    let seen = w.trusted.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for h in &seen {
        let auth: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(
            auth,
            [&format!("Bearer {SECRET}")],
            "overrides the guest's own"
        );
    }
    // A placeholder the guest writes is sent as written.
    assert_eq!(seen[1]["x-mine"], "${e2b.secrets.KEY}");
    assert!(!contains(&bytes, SECRET.as_bytes()));
    let counts = w.injector.counts();
    assert_eq!((counts.requests, counts.transformed), (2, 2));
}

#[tokio::test]
async fn http2_is_carried_when_the_server_chooses_it() {
    let w = world(RULE).await;
    let (got, bytes) = requests(
        &w,
        w.trusted.addr,
        &[b"h2", b"http/1.1"],
        &[("/v1/a", NAME, &[]), ("/v1/b", NAME, &[])],
    )
    .await;
    assert!(
        got.iter()
            .all(|(s, b)| *s == StatusCode::OK && b.starts_with("ok HTTP/2")),
        "{got:?}"
    );
    let seen = w.trusted.seen.lock().unwrap().clone();
    assert!(seen
        .iter()
        .all(|h| h["authorization"] == format!("Bearer {SECRET}")));
    assert!(!contains(&bytes, SECRET.as_bytes()));
}

#[tokio::test]
async fn a_request_naming_another_host_gets_421_and_nothing_goes_out() {
    let w = world(RULE).await;
    for alpn in [&[&b"http/1.1"[..]][..], &[b"h2"]] {
        let (got, _) = requests(
            &w,
            w.trusted.addr,
            alpn,
            &[
                ("/x", "other.example.test", &[]),
                ("/x", "api.example.test:8443", &[]),
            ],
        )
        .await;
        assert!(
            got.iter()
                .all(|(s, _)| *s == StatusCode::MISDIRECTED_REQUEST),
            "{got:?}"
        );
        assert!(
            got[0].1.contains("the request names other.example.test"),
            "{got:?}"
        );
    }
    assert!(w.trusted.seen.lock().unwrap().is_empty());
    assert_eq!(w.injector.counts().misdirected, 4);
}

#[tokio::test]
async fn an_untrusted_server_gets_nothing_and_the_guest_a_502() {
    let w = world(RULE).await;
    let (got, bytes) = requests(&w, w.untrusted.addr, &[b"http/1.1"], &[("/x", NAME, &[])]).await;
    assert_eq!(got[0].0, StatusCode::BAD_GATEWAY);
    assert!(
        got[0]
            .1
            .contains("certificate for api.example.test is not trusted"),
        "{got:?}"
    );
    assert!(
        w.untrusted.seen.lock().unwrap().is_empty(),
        "no request reached it"
    );
    assert!(!contains(&bytes, SECRET.as_bytes()));
    assert_eq!(w.injector.counts().upstream_unverified, 1);
}

#[tokio::test]
async fn a_rotated_secret_reaches_the_next_request_and_a_removed_one_fails_closed() {
    let w = world(RULE).await;
    requests(&w, w.trusted.addr, &[b"http/1.1"], &[("/a", NAME, &[])]).await;
    w.secrets.put("KEY", b"sk-rotated".to_vec()).unwrap();
    requests(&w, w.trusted.addr, &[b"http/1.1"], &[("/b", NAME, &[])]).await;
    w.secrets.remove("KEY");
    let (got, _) = requests(&w, w.trusted.addr, &[b"http/1.1"], &[("/c", NAME, &[])]).await;
    assert_eq!(got[0].0, StatusCode::BAD_GATEWAY);
    assert!(
        got[0].1.contains("names secret KEY, which is not set"),
        "{got:?}"
    );
    let seen = w.trusted.seen.lock().unwrap().clone();
    let auth: Vec<_> = seen.iter().map(|h| h["authorization"].clone()).collect();
    assert_eq!(
        auth,
        [format!("Bearer {SECRET}"), "Bearer sk-rotated".to_string()]
    );
}

#[tokio::test]
async fn replaced_rules_apply_to_the_next_connection() {
    let w = world(RULE).await;
    w.injector
        .set_rules(HeaderRules::from_flags(&["api.example.test=X-Other: 1".into()]).unwrap());
    requests(&w, w.trusted.addr, &[b"http/1.1"], &[("/a", NAME, &[])]).await;
    let seen = w.trusted.seen.lock().unwrap().clone();
    assert_eq!(seen[0]["x-other"], "1");
    assert!(seen[0].get("authorization").is_none());
}

#[tokio::test]
async fn garbage_after_the_client_hello_costs_one_connection() {
    let w = world(RULE).await;
    let mut guest = intercepted(&w, w.trusted.addr, "api.example.test").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    guest
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    guest.write_all(&[0xff; 4096]).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        guest.read_to_end(&mut buf),
    );
    assert!(read.await.is_ok(), "the interceptor hangs up");
    // The sandbox keeps working.
    let (got, _) = requests(&w, w.trusted.addr, &[b"http/1.1"], &[("/a", NAME, &[])]).await;
    assert_eq!(got[0].0, StatusCode::OK);
}
