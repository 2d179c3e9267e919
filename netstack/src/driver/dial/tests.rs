//! The SOCKS5 client against tiny servers on loopback, one per case: what
//! a proxy may answer (well or badly, whole or a byte at a time) and what
//! the dial makes of it. The proxies here are on 127.0.0.1, which the
//! policy opens with an operator hole, as `--allow-internal` would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use super::*;
use crate::policy::PolicySpec;
use crate::proxy::{ProxySpec, Secret, TlsSpec};

fn policy(holes: &[&str]) -> Arc<EgressPolicy> {
    Arc::new(
        EgressPolicy::from_spec(&PolicySpec {
            allow_internal: holes.iter().map(|h| h.to_string()).collect(),
            ..PolicySpec::default()
        })
        .unwrap(),
    )
}

fn proxy(address: &str, login: Option<(&str, &str)>) -> Arc<EgressProxy> {
    Arc::new(
        EgressProxy::new(ProxySpec {
            address: address.into(),
            username: login.map(|l| l.0.into()),
            password: login.map(|l| Secret::new(l.1)),
            tls: None,
        })
        .unwrap(),
    )
}

fn plan(proxy: Arc<EgressProxy>, target: Target) -> DialPlan {
    DialPlan {
        proxy,
        target,
        resolver: None,
        policy: policy(&["127.0.0.0/8"]),
    }
}

fn to_world() -> Target {
    Target::Addr("192.0.2.80:80".parse().unwrap())
}

/// A one-connection proxy on 127.0.0.1 running `script`; the handle gives
/// back what the script returns.
async fn server<F, Fut, T>(script: F) -> (SocketAddr, JoinHandle<T>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
    T: Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        script(s).await
    });
    (addr, task)
}

async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    s.read_exact(&mut b).await.unwrap();
    b
}

/// A well-behaved proxy: checks the greeting (and login), answers the
/// CONNECT with `reply`, then relays `banner` in the same write.
async fn socks_server(
    login: Option<(&'static str, &'static str)>,
    reply: Vec<u8>,
    banner: &'static [u8],
) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    server(move |mut s| async move {
        let method = if login.is_some() { 2 } else { 0 };
        assert_eq!(read_n(&mut s, 3).await, [5, 1, method]);
        s.write_all(&[5, method]).await.unwrap();
        if let Some((u, p)) = login {
            let head = read_n(&mut s, 2).await;
            assert_eq!(head, [1, u.len() as u8]);
            assert_eq!(read_n(&mut s, u.len()).await, u.as_bytes());
            let plen = read_n(&mut s, 1).await[0] as usize;
            assert_eq!(read_n(&mut s, plen).await, p.as_bytes());
            s.write_all(&[1, 0]).await.unwrap();
        }
        let mut request = read_n(&mut s, 4).await;
        let rest = match request[3] {
            1 => 6,
            4 => 18,
            _ => {
                let len = read_n(&mut s, 1).await[0];
                request.push(len);
                usize::from(len) + 2
            }
        };
        request.extend(read_n(&mut s, rest).await);
        let mut out = reply;
        out.extend_from_slice(banner);
        s.write_all(&out).await.unwrap();
        // Hold the connection until the client is done with it.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        request
    })
    .await
}

const OK_V4: [u8; 10] = [5, 0, 0, 1, 198, 51, 100, 1, 0x04, 0x38];

async fn first_bytes(t: Tunnel, n: usize) -> Vec<u8> {
    let TunnelStream::Tcp(mut s) = t.stream else {
        panic!("plain proxy, plain stream");
    };
    read_n(&mut s, n).await
}

#[tokio::test]
async fn no_auth_connect_leaves_the_relayed_bytes_in_the_stream() {
    let (addr, seen) = socks_server(None, OK_V4.to_vec(), b"SSH-2.0-banner").await;
    let t = start(plan(proxy(&addr.to_string(), None), to_world()))
        .await
        .unwrap();
    assert_eq!(t.bound, Bound::Addr("198.51.100.1:1080".parse().unwrap()));
    assert_eq!(first_bytes(t, 14).await, b"SSH-2.0-banner");
    assert_eq!(seen.await.unwrap(), [5, 1, 0, 1, 192, 0, 2, 80, 0, 80]);
}

#[tokio::test]
async fn username_and_password_are_sent_as_rfc_1929() {
    let (addr, seen) = socks_server(Some(("alice", "s3cret")), OK_V4.to_vec(), b"").await;
    let p = proxy(&addr.to_string(), Some(("alice", "s3cret")));
    let target = Target::name_or_addr(Some("app.example.com"), "203.0.113.9:443".parse().unwrap());
    let t = start(plan(p, target)).await.unwrap();
    drop(t);
    let mut want = vec![5, 1, 0, 3, 15];
    want.extend_from_slice(b"app.example.com");
    want.extend_from_slice(&443u16.to_be_bytes());
    assert_eq!(seen.await.unwrap(), want);
}

#[tokio::test]
async fn refused_login_fails_the_dial() {
    let (addr, _) = server(|mut s| async move {
        read_n(&mut s, 3).await;
        s.write_all(&[5, 2]).await.unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b).await;
        s.write_all(&[1, 1]).await.unwrap();
    })
    .await;
    let e = start(plan(
        proxy(&addr.to_string(), Some(("alice", "wrong"))),
        to_world(),
    ))
    .await
    .err()
    .unwrap();
    assert!(
        matches!(e, DialError::Socks(SocksError::AuthRefused(1))),
        "{e}"
    );
    assert_eq!(e.connect_error(), ConnectError::Refused);
    assert!(!e.chain().contains("wrong"), "{}", e.chain());
}

#[tokio::test]
async fn a_server_that_is_not_socks5_is_refused() {
    for answer in [&[4u8, 0][..], b"HTTP/1.1 400 Bad Request\r\n\r\n"] {
        let (addr, _) = server(move |mut s| async move {
            read_n(&mut s, 3).await;
            s.write_all(answer).await.unwrap();
        })
        .await;
        let e = start(plan(proxy(&addr.to_string(), None), to_world()))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(e, DialError::Socks(SocksError::NotSocks5(_))),
            "{e}"
        );
    }
}

#[tokio::test]
async fn no_acceptable_method_is_refused() {
    let (addr, _) = server(|mut s| async move {
        read_n(&mut s, 3).await;
        s.write_all(&[5, 0xff]).await.unwrap();
    })
    .await;
    let e = start(plan(proxy(&addr.to_string(), None), to_world()))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(e, DialError::Socks(SocksError::NoAcceptableMethod(_))),
        "{e}"
    );
}

#[tokio::test]
async fn connect_reply_codes_become_the_guests_answer() {
    for (code, guest) in [
        (1u8, ConnectError::Refused),
        (2, ConnectError::Refused),
        (3, ConnectError::Unreachable),
        (4, ConnectError::Unreachable),
        (5, ConnectError::Refused),
        (6, ConnectError::TimedOut),
        (7, ConnectError::Refused),
        (8, ConnectError::Refused),
        (0x42, ConnectError::Refused),
    ] {
        // Some servers send only version and code, then close.
        let (addr, _) = socks_server(None, vec![5, code], b"").await;
        let e = start(plan(proxy(&addr.to_string(), None), to_world()))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(e, DialError::Socks(SocksError::ConnectRefused { code: c }) if c == code),
            "{e}"
        );
        assert_eq!(e.connect_error(), guest, "reply {code}");
    }
}

#[tokio::test]
async fn replies_in_pieces_are_put_together() {
    let mut reply = vec![5, 0, 0, 4];
    reply.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    reply.extend_from_slice(&[0x1f, 0x90]);
    let (addr, _) = server(move |mut s| async move {
        read_n(&mut s, 3).await;
        for b in [5u8, 0] {
            s.write_all(&[b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        read_n(&mut s, 10).await;
        let mut out = reply;
        out.extend_from_slice(b"after");
        for b in out {
            s.write_all(&[b]).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = s.read(&mut [0u8; 1]).await;
    })
    .await;
    let t = start(plan(proxy(&addr.to_string(), None), to_world()))
        .await
        .unwrap();
    assert_eq!(t.bound, Bound::Addr("[2001:db8::1]:8080".parse().unwrap()));
    assert_eq!(first_bytes(t, 5).await, b"after");
}

#[tokio::test]
async fn a_bound_name_is_read_whole() {
    let mut reply = vec![5, 0, 0, 3, 10];
    reply.extend_from_slice(b"proxy.test");
    reply.extend_from_slice(&[0, 80]);
    let (addr, _) = socks_server(None, reply, b"x").await;
    let t = start(plan(proxy(&addr.to_string(), None), to_world()))
        .await
        .unwrap();
    assert_eq!(t.bound, Bound::Name("proxy.test".into(), 80));
    assert_eq!(first_bytes(t, 1).await, b"x");
}

#[tokio::test]
async fn a_proxy_closing_mid_reply_fails_the_dial() {
    let (addr, _) = server(|mut s| async move {
        read_n(&mut s, 3).await;
        s.write_all(&[5, 0]).await.unwrap();
        read_n(&mut s, 10).await;
        s.write_all(&[5, 0, 0, 1, 198]).await.unwrap();
    })
    .await;
    let e = start(plan(proxy(&addr.to_string(), None), to_world()))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, DialError::Handshake(_)), "{e}");
    assert!(e.chain().contains("closed the connection"), "{}", e.chain());
}

#[tokio::test]
async fn an_unreachable_proxy_fails_at_once() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let started = std::time::Instant::now();
    let e = start(plan(proxy(&addr.to_string(), None), to_world()))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, DialError::Connect { .. }), "{e}");
    assert_eq!(e.connect_error(), ConnectError::Refused);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn an_internal_proxy_address_needs_the_operators_hole() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut p = plan(proxy(&addr.to_string(), None), to_world());
    p.policy = policy(&[]);
    let e = start(p).await.err().unwrap();
    assert!(matches!(e, DialError::Internal(_)), "{e}");
    // Nothing was even tried.
    let accepted = tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
    assert!(accepted.is_err(), "the proxy saw a connection");
}

/// A DNS server on 127.0.0.1 answering every A query with `v4` and every
/// AAAA query with nothing.
async fn dns_server(v4: [u8; 4]) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut b = [0u8; 512];
        loop {
            let Ok((n, peer)) = s.recv_from(&mut b).await else {
                return;
            };
            let q = &b[..n];
            let qtype = u16::from_be_bytes([q[n - 4], q[n - 3]]);
            let mut out = q.to_vec();
            out[2] = 0x81;
            out[3] = 0x80;
            if qtype == TYPE_A {
                out[7] = 1;
                out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                out.extend_from_slice(&v4);
            }
            let _ = s.send_to(&out, peer).await;
        }
    });
    addr
}

#[tokio::test]
async fn a_proxy_name_is_resolved_at_each_dial() {
    let (addr, _) = socks_server(None, OK_V4.to_vec(), b"").await;
    let mut p = plan(
        proxy(&format!("proxy.test:{}", addr.port()), None),
        to_world(),
    );
    p.resolver = Some(dns_server([127, 0, 0, 1]).await);
    start(p).await.unwrap();
}

#[tokio::test]
async fn a_proxy_name_resolving_into_internal_ranges_is_refused() {
    let mut p = plan(proxy("proxy.test:1080", None), to_world());
    p.resolver = Some(dns_server([169, 254, 169, 254]).await);
    let e = start(p).await.err().unwrap();
    assert!(matches!(e, DialError::OnlyInternal { .. }), "{e}");
    let mut p = plan(proxy("proxy.test:1080", None), to_world());
    p.resolver = None;
    let e = start(p).await.err().unwrap();
    assert!(matches!(e, DialError::NoResolver(_)), "{e}");
}

/// A CA, and a certificate for `name` it signed: (CA PEM, cert chain, key).
fn certificates(
    name: &str,
) -> (
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    (ca.pem(), vec![leaf.der().clone()], der.into())
}

/// A SOCKS5 proxy behind TLS on 127.0.0.1 (one connection).
async fn tls_socks_server(name: &str) -> (SocketAddr, String, JoinHandle<bool>) {
    let (ca, chain, key) = certificates(name);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (addr, task) = server(move |s| async move {
        let Ok(mut s) = acceptor.accept(s).await else {
            return false;
        };
        let mut b = [0u8; 3];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(&[5, 0]).await.unwrap();
        let mut req = [0u8; 10];
        s.read_exact(&mut req).await.unwrap();
        s.write_all(&OK_V4).await.unwrap();
        s.write_all(b"over tls").await.unwrap();
        s.flush().await.unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        true
    })
    .await;
    (addr, ca, task)
}

fn tls_proxy(address: &str, server_name: &str, ca: &str) -> Arc<EgressProxy> {
    Arc::new(
        EgressProxy::new(ProxySpec {
            address: address.into(),
            tls: Some(TlsSpec {
                server_name: Some(server_name.into()),
                ca_pem: Some(Secret::new(ca)),
            }),
            ..ProxySpec::default()
        })
        .unwrap(),
    )
}

#[tokio::test]
async fn tls_to_the_proxy_is_verified_against_the_given_ca() {
    let (addr, ca, handled) = tls_socks_server("socks.test").await;
    let t = start(plan(
        tls_proxy(&addr.to_string(), "socks.test", &ca),
        to_world(),
    ))
    .await
    .unwrap();
    let TunnelStream::Tls(mut s) = t.stream else {
        panic!("a TLS proxy gives a TLS stream");
    };
    let mut b = [0u8; 8];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"over tls");
    drop(s);
    assert!(handled.await.unwrap());
}

#[tokio::test]
async fn tls_with_another_ca_or_name_is_refused() {
    let (other_ca, _, _) = certificates("socks.test");
    let (addr, _, handled) = tls_socks_server("socks.test").await;
    let e = start(plan(
        tls_proxy(&addr.to_string(), "socks.test", &other_ca),
        to_world(),
    ))
    .await
    .err()
    .unwrap();
    assert!(matches!(e, DialError::Tls(_)), "{e}");
    assert!(!handled.await.unwrap(), "the handshake must not complete");
    let (addr, ca, handled) = tls_socks_server("socks.test").await;
    let e = start(plan(
        tls_proxy(&addr.to_string(), "other.test", &ca),
        to_world(),
    ))
    .await
    .err()
    .unwrap();
    assert!(matches!(e, DialError::Tls(_)), "{e}");
    assert!(!handled.await.unwrap());
}
