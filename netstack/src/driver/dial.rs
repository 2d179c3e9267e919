//! The egress proxy's dialer: one allowed TCP flow's way to its destination
//! through the sandbox's SOCKS5 proxy. Resolve the proxy's name (at each
//! dial, through the stack's DNS upstream), refuse an address in the
//! always-denied internal ranges the operator did not open, connect, TLS
//! when asked (always verified), then the SOCKS5 greeting, login and
//! CONNECT (`crate::socks` holds the bytes).
//!
//! It fails closed: any failure is a `DialError` and the flow fails; there
//! is no direct connect instead. The driver holds the dial as a future in
//! the flow's entry, so the core's connect timeout (a `TcpClose`) drops it.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use zeroize::Zeroizing;

use crate::policy::EgressPolicy;
use crate::proxy::{EgressProxy, ProxyHost};
use crate::socks::{self, Bound, Parsed, Reply, SocksError, Target};
use crate::stack::ConnectError;

/// One try of a resolver query; three tries in all.
const DNS_TRY: Duration = Duration::from_secs(1);
const DNS_TRIES: u32 = 3;
/// After the first answer with addresses, how long the other family's may take.
const DNS_GRACE: Duration = Duration::from_millis(100);
/// A connect to one of several proxy addresses, before the next is tried
/// (the last one has the rest of the core's connect timeout).
const ATTEMPT: Duration = Duration::from_secs(3);

/// Why a dial through the proxy failed. Messages never carry the password.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no DNS upstream to resolve the proxy's name {0} (give --dns-upstream)")]
    NoResolver(String),
    #[error("cannot resolve the proxy's name {name}: {why}")]
    Resolve { name: String, why: String },
    #[error(
        "the proxy's name {name} resolves only into the always-denied internal ranges \
         ({addrs}); only the operator can open them"
    )]
    OnlyInternal { name: String, addrs: String },
    #[error(
        "the proxy's address {0} is in the always-denied internal ranges; \
         only the operator can open it"
    )]
    Internal(IpAddr),
    #[error("cannot connect to the proxy at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS to the proxy failed")]
    Tls(#[source] io::Error),
    #[error("the SOCKS5 handshake with the proxy failed")]
    Handshake(#[source] io::Error),
    #[error(transparent)]
    Socks(#[from] SocksError),
}

impl DialError {
    /// What the guest is told: the proxy's own verdict on the destination
    /// where it gave one, else a refusal (RST), at once.
    pub fn connect_error(&self) -> ConnectError {
        match self {
            DialError::Socks(SocksError::ConnectRefused { code: 0x03 | 0x04 }) => {
                ConnectError::Unreachable
            }
            DialError::Socks(SocksError::ConnectRefused { code: 0x06 }) => ConnectError::TimedOut,
            _ => ConnectError::Refused,
        }
    }

    /// The error and its causes on one line, for the flow log.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// The stream a dial ends with: the proxy's TCP socket (the direct path's
/// zero-copy pumps serve it), or TLS over it.
pub(super) enum TunnelStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A CONNECT the proxy granted.
pub(super) struct Tunnel {
    pub(super) stream: TunnelStream,
    /// The address the proxy connected from, as it said.
    pub(super) bound: Bound,
}

pub(super) type Dial = Pin<Box<dyn Future<Output = Result<Tunnel, DialError>> + Send>>;

/// What one dial needs, taken from the driver when the flow starts.
pub(super) struct DialPlan {
    pub(super) proxy: Arc<EgressProxy>,
    pub(super) target: Target,
    /// The stack's DNS upstream, for a proxy given by name.
    pub(super) resolver: Option<SocketAddr>,
    /// For the operator's holes in the internal ranges.
    pub(super) policy: Arc<EgressPolicy>,
}

pub(super) fn start(plan: DialPlan) -> Dial {
    Box::pin(dial(plan))
}

async fn dial(plan: DialPlan) -> Result<Tunnel, DialError> {
    let addrs = proxy_addresses(&plan).await?;
    let tcp = connect_first(&addrs, plan.proxy.port()).await?;
    let _ = tcp.set_nodelay(true);
    match plan.proxy.tls() {
        None => {
            let mut tcp = tcp;
            let bound = handshake(&mut tcp, &plan.proxy, &plan.target).await?;
            Ok(Tunnel {
                stream: TunnelStream::Tcp(tcp),
                bound,
            })
        }
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.config());
            let mut stream = connector
                .connect(tls.server_name().clone(), tcp)
                .await
                .map_err(DialError::Tls)?;
            let bound = handshake(&mut stream, &plan.proxy, &plan.target).await?;
            Ok(Tunnel {
                stream: TunnelStream::Tls(Box::new(stream)),
                bound,
            })
        }
    }
}

/// The proxy's addresses for this dial, none of them internal unless opened.
async fn proxy_addresses(plan: &DialPlan) -> Result<Vec<IpAddr>, DialError> {
    let name = match plan.proxy.host() {
        ProxyHost::Ip(ip) if plan.policy.internal_allowed(*ip) => return Ok(vec![*ip]),
        ProxyHost::Ip(ip) => return Err(DialError::Internal(*ip)),
        ProxyHost::Name(name) => name,
    };
    let upstream = plan
        .resolver
        .ok_or_else(|| DialError::NoResolver(name.clone()))?;
    let all = resolve(name, upstream).await?;
    tracing::debug!(proxy = %plan.proxy.address(), addrs = %list(&all), "resolved the proxy's name");
    let (open, internal): (Vec<IpAddr>, Vec<IpAddr>) = all
        .into_iter()
        .partition(|ip| plan.policy.internal_allowed(*ip));
    if open.is_empty() {
        if internal.is_empty() {
            return Err(DialError::Resolve {
                name: name.clone(),
                why: "no A or AAAA record".into(),
            });
        }
        return Err(DialError::OnlyInternal {
            name: name.clone(),
            addrs: list(&internal),
        });
    }
    if !internal.is_empty() {
        tracing::warn!(proxy = %plan.proxy.address(), skipped = %list(&internal),
            "the proxy's name also resolves into the always-denied internal ranges; those addresses are not used");
    }
    Ok(open)
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn connect_first(addrs: &[IpAddr], port: u16) -> Result<TcpStream, DialError> {
    let mut last = None;
    for (i, ip) in addrs.iter().enumerate() {
        let addr = SocketAddr::new(*ip, port);
        let attempt = TcpStream::connect(addr);
        let result = if i + 1 < addrs.len() {
            tokio::time::timeout(ATTEMPT, attempt)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
        } else {
            attempt.await
        };
        match result {
            Ok(s) => return Ok(s),
            Err(source) => {
                tracing::debug!(%addr, error = %source, "cannot connect to the proxy");
                last = Some(DialError::Connect { addr, source });
            }
        }
    }
    Err(last.unwrap_or_else(|| DialError::Resolve {
        name: String::new(),
        why: "no address".into(),
    }))
}

/// Greeting, login when there are credentials, CONNECT; the reply is read
/// to its last byte and no further, so what the proxy relays next stays in
/// the stream.
pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    proxy: &EgressProxy,
    target: &Target,
) -> Result<Bound, DialError> {
    let credentials = proxy.credentials();
    let method = if credentials.is_some() {
        socks::METHOD_PASSWORD
    } else {
        socks::METHOD_NONE
    };
    send(s, &socks::greeting(credentials.is_some())).await?;
    socks::parse_method(read2(s).await?, method)?;
    if let Some((user, password)) = credentials {
        let login = Zeroizing::new(socks::login(user, password.expose()));
        send(s, &login).await?;
        socks::parse_login(read2(s).await?)?;
    }
    send(s, &socks::connect(target)).await?;
    let mut buf = [0u8; socks::MAX_REPLY];
    let mut have = 0;
    loop {
        match Reply::parse(&buf[..have])? {
            Parsed::Done(reply) => return Ok(reply.bound),
            Parsed::Need(n) => {
                let Some(more) = buf.get_mut(have..have + n) else {
                    // parse never asks past MAX_REPLY; if it did, refuse.
                    return Err(DialError::Handshake(io::ErrorKind::InvalidData.into()));
                };
                s.read_exact(more).await.map_err(handshake_io)?;
                have += n;
            }
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> Result<(), DialError> {
    s.write_all(bytes).await.map_err(handshake_io)?;
    s.flush().await.map_err(handshake_io)
}

async fn read2<S: AsyncRead + Unpin>(s: &mut S) -> Result<[u8; 2], DialError> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.map_err(handshake_io)?;
    Ok(b)
}

fn handshake_io(e: io::Error) -> DialError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        DialError::Handshake(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the proxy closed the connection",
        ))
    } else {
        DialError::Handshake(e)
    }
}

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// A and AAAA for `name` from the stack's DNS upstream over UDP, the way
/// the filtering resolver reaches it: no getaddrinfo, which a confined
/// slipway could not run (no files, no netlink).
async fn resolve(name: &str, upstream: SocketAddr) -> Result<Vec<IpAddr>, DialError> {
    let failed = |why: String| DialError::Resolve {
        name: name.to_string(),
        why,
    };
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local)
        .await
        .map_err(|e| failed(format!("cannot open a socket: {e}")))?;
    sock.connect(upstream)
        .await
        .map_err(|e| failed(format!("cannot reach the DNS upstream {upstream}: {e}")))?;
    let first = random_u16();
    let ids = [first, first.wrapping_add(1)];
    let queries = [query(ids[0], name, TYPE_A), query(ids[1], name, TYPE_AAAA)];
    let mut answered = [false; 2];
    let mut found: [Vec<IpAddr>; 2] = [Vec::new(), Vec::new()];
    let mut grace_until: Option<Instant> = None;
    let mut buf = vec![0u8; 4096];
    for _ in 0..DNS_TRIES {
        for (q, done) in queries.iter().zip(answered) {
            if !done {
                sock.send(q)
                    .await
                    .map_err(|e| failed(format!("DNS upstream {upstream}: {e}")))?;
            }
        }
        let try_until = Instant::now() + DNS_TRY;
        loop {
            let until = grace_until.map_or(try_until, |g| g.min(try_until));
            let n = match tokio::time::timeout_at(until, sock.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(failed(format!("DNS upstream {upstream}: {e}"))),
                Ok(Ok(n)) => n,
            };
            let Some(answer) = crate::dns::Answer::parse(&buf[..n]) else {
                continue;
            };
            let Some(i) = ids.iter().position(|&id| id == answer.id) else {
                continue;
            };
            if answered[i] || answer.name.as_deref() != Some(name) {
                continue;
            }
            answered[i] = true;
            found[i] = answer.addresses.iter().map(|(ip, _)| *ip).collect();
            if answered.iter().all(|a| *a) {
                break;
            }
            if !found[i].is_empty() && grace_until.is_none() {
                grace_until = Some(Instant::now() + DNS_GRACE);
            }
        }
        if answered.iter().all(|a| *a) || grace_until.is_some_and(|g| Instant::now() >= g) {
            break;
        }
    }
    if !answered.iter().any(|a| *a) {
        return Err(failed(format!(
            "no answer from the DNS upstream {upstream}"
        )));
    }
    let [v4, v6] = found;
    Ok(v4.into_iter().chain(v6).collect())
}

/// A recursive query for one name (canonical: LDH labels, at most 253 bytes).
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let l = &label.as_bytes()[..label.len().min(63)];
        q.push(l.len() as u8);
        q.extend_from_slice(l);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// A query id nobody off the path can guess (std's per-process random keys).
fn random_u16() -> u16 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish() as u16
}

#[cfg(test)]
#[path = "dial/tests.rs"]
mod tests;
