//! Raw TCP forwards (`host port → guest port`) and the byte splice that
//! upgraded HTTP connections use too. A forward may first send a PROXY
//! protocol v2 header so the guest learns the client's address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::idle::{until_idle, Activity, Watched};
use crate::target::{GuestPort, SandboxId};

/// `--forward tcp:HOSTPORT:GUESTPORT[:proxy-v2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    pub host_port: u16,
    pub guest_port: GuestPort,
    pub proxy_v2: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid forward {0:?}: give tcp:HOSTPORT:GUESTPORT or tcp:HOSTPORT:GUESTPORT:proxy-v2")]
pub struct BadForward(pub String);

impl ForwardSpec {
    pub fn parse(s: &str) -> Result<Self, BadForward> {
        let bad = || BadForward(s.to_string());
        let mut parts = s.split(':');
        if parts.next() != Some("tcp") {
            return Err(bad());
        }
        let host_port = parts
            .next()
            .and_then(|p| GuestPort::parse(p).ok())
            .ok_or_else(bad)?
            .get();
        let guest_port = parts
            .next()
            .and_then(|p| GuestPort::parse(p).ok())
            .ok_or_else(bad)?;
        let proxy_v2 = match parts.next() {
            None => false,
            Some("proxy-v2") => true,
            Some(_) => return Err(bad()),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self {
            host_port,
            guest_port,
            proxy_v2,
        })
    }
}

/// What a forward serves: which sandbox, and how.
#[derive(Debug, Clone)]
pub struct Forward {
    pub sandbox: SandboxId,
    pub spec: ForwardSpec,
}

const SPLICE_BUF: usize = 64 << 10;

/// Copy bytes both ways until both sides are done or nothing moved for `idle`.
pub async fn splice<A, B>(a: A, b: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let mut a = Watched::new(a, activity.clone());
    let mut b = b;
    // Larger than tokio's 8 KiB default: fewer wakeups per megabyte.
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, SPLICE_BUF, SPLICE_BUF);
    let _ = until_idle(activity, idle, copy).await;
}

const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY protocol v2 header (`PROXY` command, TCP) saying the connection
/// came from `client` to `local`.
pub fn proxy_v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut h = PROXY_V2_SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match (plain(client.ip()), plain(local.ip())) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&src.octets());
            h.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(src).octets());
            h.extend_from_slice(&v6(dst).octets());
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&local.port().to_be_bytes());
    h
}

/// Send the PROXY header, then splice.
pub(crate) async fn serve_one<C, G>(
    client: C,
    mut guest: G,
    header: Option<Vec<u8>>,
    idle: Duration,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    G: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(h) = header {
        if guest.write_all(&h).await.is_err() {
            return;
        }
    }
    splice(client, guest, idle).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs_parse_and_reject() {
        assert_eq!(
            ForwardSpec::parse("tcp:2222:22").unwrap(),
            ForwardSpec {
                host_port: 2222,
                guest_port: GuestPort::new(22).unwrap(),
                proxy_v2: false
            }
        );
        assert!(ForwardSpec::parse("tcp:2222:22:proxy-v2").unwrap().proxy_v2);
        for bad in [
            "udp:1:2",
            "tcp:0:22",
            "tcp:1:0",
            "tcp:1",
            "tcp:1:2:proxy",
            "tcp:1:2:proxy-v2:x",
            "tcp:70000:1",
        ] {
            assert!(ForwardSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proxy_v2_for_ipv4() {
        let h = proxy_v2_header(
            "192.0.2.1:40000".parse().unwrap(),
            "[::ffff:127.0.0.1]:2222".parse().unwrap(),
        );
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[127, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 40000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 2222);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn proxy_v2_for_ipv6_and_mixed() {
        let h = proxy_v2_header(
            "[2001:db8::1]:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        assert_eq!(h[13], 0x21);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(
            &h[32..48],
            &"::ffff:127.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }
}
