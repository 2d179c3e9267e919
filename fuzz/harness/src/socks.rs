//! `socks_reply`: what a hostile SOCKS5 proxy may answer, read as the
//! egress proxy's dialer reads it (`netstack::socks`).
//!
//! Input: byte 0 picks the offered method (bit 0: username/password) for
//! the method and login answers in bytes 1..5; the rest is the CONNECT
//! reply and whatever the proxy relays behind it.

use std::net::{IpAddr, SocketAddr};

use netstack::socks::{self, Bound, Parsed, Reply, SocksError, Target};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() >= 4 {
        answers(mode & 1 == 1, [rest[0], rest[1]], [rest[2], rest[3]]);
    }
    let reply = rest.get(4..).unwrap_or_default();
    connect_reply(reply);
    request_round_trip(mode, reply);
}

/// The method choice and the login answer: accepted exactly when RFC 1928
/// and 1929 say so.
fn answers(password: bool, method: [u8; 2], login: [u8; 2]) {
    let offered = if password {
        socks::METHOD_PASSWORD
    } else {
        socks::METHOD_NONE
    };
    let ok = socks::parse_method(method, offered).is_ok();
    assert_eq!(ok, method == [5, offered], "method answer {method:?}");
    let ok = socks::parse_login(login).is_ok();
    assert_eq!(ok, matches!(login, [1 | 5, 0]), "login answer {login:?}");
}

/// Feed the reply exactly as the dialer does, and check the verdict
/// against the bytes.
fn connect_reply(data: &[u8]) {
    let mut have = 0;
    loop {
        match Reply::parse(&data[..have]) {
            Ok(Parsed::Need(n)) => {
                assert!(n > 0, "asked for nothing");
                assert!(have + n <= socks::MAX_REPLY, "asked past the longest reply");
                if have + n > data.len() {
                    // The proxy stopped short: the dialer waits, then fails.
                    return;
                }
                have += n;
            }
            Ok(Parsed::Done(reply)) => {
                let b = &data[..have];
                assert_eq!((b[0], b[1]), (5, 0), "success without version 5, code 0");
                let (addr_len, at) = match b[3] {
                    1 => (4, 4),
                    4 => (16, 4),
                    3 => (usize::from(b[4]), 5),
                    other => panic!("accepted address type {other}"),
                };
                assert_eq!(have, at + addr_len + 2, "read past or short of the reply");
                let port = u16::from_be_bytes([b[have - 2], b[have - 1]]);
                match &reply.bound {
                    Bound::Addr(SocketAddr::V4(a)) => {
                        assert_eq!(b[3], 1);
                        assert_eq!(a.ip().octets(), b[4..8]);
                        assert_eq!(a.port(), port);
                    }
                    Bound::Addr(SocketAddr::V6(a)) => {
                        assert_eq!(b[3], 4);
                        assert_eq!(a.ip().octets(), b[4..20]);
                        assert_eq!(a.port(), port);
                    }
                    Bound::Name(n, p) => {
                        assert_eq!(b[3], 3);
                        assert!(!n.is_empty());
                        assert_eq!(*p, port);
                    }
                }
                // What the proxy relays behind the reply changes nothing.
                assert_eq!(Reply::parse(data), Ok(Parsed::Done(reply)));
                return;
            }
            Err(e) => {
                let b = &data[..have];
                match e {
                    SocksError::NotSocks5(v) => assert!(v == b[0] && v != 5),
                    SocksError::ConnectRefused { code } => {
                        assert!(b[0] == 5 && b[1] == code && code != 0)
                    }
                    SocksError::BadAddressType(t) => assert!(b[3] == t && ![1, 3, 4].contains(&t)),
                    SocksError::EmptyBoundName => assert!(b[3] == 3 && b[4] == 0),
                    other => panic!("a CONNECT reply cannot fail with {other:?}"),
                }
                return;
            }
        }
    }
}

/// The CONNECT request for a target made of the bytes reads back as that
/// target: the right type, length byte and port.
fn request_round_trip(mode: u8, data: &[u8]) {
    let port = u16::from_be_bytes([mode, data.first().copied().unwrap_or(0)]);
    let name = String::from_utf8_lossy(data.get(1..).unwrap_or_default()).into_owned();
    let addr = match data.get(1..17) {
        Some(b) if mode & 2 == 2 => {
            let a: [u8; 16] = b.try_into().unwrap_or_default();
            SocketAddr::new(IpAddr::from(a), port)
        }
        _ => SocketAddr::new(IpAddr::from([192, 0, 2, mode]), port),
    };
    let target = Target::name_or_addr((mode & 4 == 4).then_some(name.as_str()), addr);
    let req = socks::connect(&target);
    assert_eq!(req[..3], [5, 1, 0]);
    assert_eq!(req[req.len() - 2..], port.to_be_bytes());
    match &target {
        Target::Addr(SocketAddr::V4(a)) => {
            assert_eq!(req[3], 1);
            assert_eq!(req[4..8], a.ip().octets());
            assert_eq!(req.len(), 10);
        }
        Target::Addr(SocketAddr::V6(a)) => {
            assert_eq!(req[3], 4);
            assert_eq!(req[4..20], a.ip().octets());
            assert_eq!(req.len(), 22);
        }
        Target::Name(n, _) => {
            assert!(!n.is_empty() && n.len() <= 255);
            assert_eq!(req[3], 3);
            assert_eq!(usize::from(req[4]), n.len());
            assert_eq!(&req[5..5 + n.len()], n.as_bytes());
            assert_eq!(req.len(), 5 + n.len() + 2);
        }
    }
}
