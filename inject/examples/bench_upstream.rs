//! The HTTPS server of `bench/inject.py`: h2 and http/1.1 by ALPN, with a
//! certificate for NAME from a CA made at start (written to CA_OUT for the
//! client and slipway's `--upstream-ca`).
//!
//!   bench_upstream LISTEN NAME CA_OUT
//!
//! `GET /bytes/N` answers N bytes (streamed in 256 KiB frames, nothing held
//! whole); any other request a short `ok`. It prints `ready` once listening.
//! A bench tool, not part of slipway.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

const CHUNK: usize = 256 * 1024;
/// The most one request may ask for (16 GiB).
const MAX_BYTES: u64 = 1 << 34;

/// `left` bytes, in frames of the same shared chunk.
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl hyper::body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

fn answer(req: &Request<Incoming>, chunk: &Bytes) -> Response<Repeat> {
    let n = req
        .uri()
        .path()
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(3, |n| n.min(MAX_BYTES));
    let body = if n == 3 {
        Repeat {
            chunk: Bytes::from_static(b"ok\n"),
            left: 3,
        }
    } else {
        Repeat {
            chunk: chunk.clone(),
            left: n,
        }
    };
    Response::new(body)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, name, ca_out] = args.as_slice() else {
        eprintln!("usage: bench_upstream LISTEN NAME CA_OUT");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse()?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: with rcgen's default DN on both, OpenSSL clients take
    // the leaf for self-signed.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "slipway bench CA");
    let ca = ca_params.self_signed(&ca_key)?;
    std::fs::write(ca_out, ca.pem())?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![name.clone()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, name.as_str());
    let leaf = leaf.signed_by(&key, &ca, &ca_key)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let chunk = Bytes::from(vec![b'x'; CHUNK]);

    // One thread: the server's share of the machine is the same for every
    // path the bench compares.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(listen, acceptor, chunk))?;
    Ok(())
}

async fn serve(
    listen: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    chunk: Bytes,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("ready");
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = answer(&req, &chunk);
                async move { Ok::<_, Infallible>(r) }
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
}
