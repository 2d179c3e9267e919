//! SOCKS5 on the wire (RFC 1928, with RFC 1929's username/password), the
//! client side: the three requests it sends and the one place a proxy's
//! answers become values. The dialer (`driver::dial`) does the I/O.
//!
//! Nothing here panics on any input. `Reply::parse` says how many more
//! bytes it needs before it can decide, so the dialer reads a reply to its
//! last byte and never into the relayed stream behind it; a reply is at
//! most 262 bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const VERSION: u8 = 5;
/// RFC 1929's sub-negotiation version.
const AUTH_VERSION: u8 = 1;
pub const METHOD_NONE: u8 = 0x00;
pub const METHOD_PASSWORD: u8 = 0x02;
const NO_ACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;
/// The longest reply: header, a 255-byte domain with its length, the port.
pub const MAX_REPLY: usize = 4 + 1 + 255 + 2;

/// Why a proxy's answer ended the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    #[error("the proxy does not speak SOCKS5 (version byte {0:#04x})")]
    NotSocks5(u8),
    #[error("the proxy accepts none of the offered authentication methods ({0})")]
    NoAcceptableMethod(&'static str),
    #[error("the proxy chose authentication method {got:#04x}, not the offered {offered:#04x}")]
    UnexpectedMethod { got: u8, offered: u8 },
    #[error("the proxy answered the login in sub-negotiation version {0:#04x}, not 1")]
    BadAuthVersion(u8),
    #[error("the proxy refused the username and password (status {0:#04x})")]
    AuthRefused(u8),
    #[error("the proxy refused the CONNECT: {} (reply {code:#04x})", reply_meaning(*.code))]
    ConnectRefused { code: u8 },
    #[error("the proxy's CONNECT reply has address type {0:#04x}, not 1, 3 or 4")]
    BadAddressType(u8),
    #[error("the proxy's CONNECT reply has an empty bound name")]
    EmptyBoundName,
}

/// RFC 1928's reply codes, in its words.
pub fn reply_meaning(code: u8) -> &'static str {
    match code {
        0x00 => "succeeded",
        0x01 => "general SOCKS server failure",
        0x02 => "connection not allowed by ruleset",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "unassigned reply code",
    }
}

/// Where the proxy should connect: an address, or a name it resolves itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// At most 255 bytes (`Target::name` falls back to the address otherwise).
    Name(String, u16),
}

impl Target {
    /// ATYP=domain for `name` when it fits the one length byte, else the address.
    pub fn name_or_addr(name: Option<&str>, addr: SocketAddr) -> Target {
        match name {
            Some(n) if !n.is_empty() && n.len() <= 255 => Target::Name(n.to_string(), addr.port()),
            _ => Target::Addr(addr),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Name(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

/// The greeting: version 5 and the one method the client will use.
pub fn greeting(password: bool) -> [u8; 3] {
    [
        VERSION,
        1,
        if password {
            METHOD_PASSWORD
        } else {
            METHOD_NONE
        },
    ]
}

/// The proxy's choice of method (2 bytes): it must be the offered one.
pub fn parse_method(reply: [u8; 2], offered: u8) -> Result<(), SocksError> {
    match reply {
        [VERSION, m] if m == offered => Ok(()),
        [VERSION, NO_ACCEPTABLE] => {
            Err(SocksError::NoAcceptableMethod(if offered == METHOD_NONE {
                "no authentication"
            } else {
                "username/password"
            }))
        }
        [VERSION, got] => Err(SocksError::UnexpectedMethod { got, offered }),
        [v, _] => Err(SocksError::NotSocks5(v)),
    }
}

/// RFC 1929's request. Each of `user` and `password` is at most 255 bytes
/// (`EgressProxy` checks it); longer ones are cut, never sent wrong.
pub fn login(user: &str, password: &str) -> Vec<u8> {
    let (u, p) = (clip(user.as_bytes()), clip(password.as_bytes()));
    let mut out = Vec::with_capacity(3 + u.len() + p.len());
    out.push(AUTH_VERSION);
    out.push(u.len() as u8);
    out.extend_from_slice(u);
    out.push(p.len() as u8);
    out.extend_from_slice(p);
    out
}

fn clip(b: &[u8]) -> &[u8] {
    &b[..b.len().min(255)]
}

/// The proxy's answer to the login (2 bytes). Some servers answer with
/// version 5 rather than 1; both are taken.
pub fn parse_login(reply: [u8; 2]) -> Result<(), SocksError> {
    match reply {
        [AUTH_VERSION | VERSION, 0] => Ok(()),
        [AUTH_VERSION | VERSION, status] => Err(SocksError::AuthRefused(status)),
        [v, _] => Err(SocksError::BadAuthVersion(v)),
    }
}

/// The CONNECT request for `target`.
pub fn connect(target: &Target) -> Vec<u8> {
    let mut out = vec![VERSION, CMD_CONNECT, 0];
    let port = match target {
        Target::Addr(SocketAddr::V4(a)) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Addr(SocketAddr::V6(a)) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Target::Name(name, port) => {
            let n = clip(name.as_bytes());
            out.push(ATYP_DOMAIN);
            out.push(n.len() as u8);
            out.extend_from_slice(n);
            *port
        }
    };
    out.extend_from_slice(&port.to_be_bytes());
    out
}

/// The address the proxy connected from, as its reply says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    Addr(SocketAddr),
    /// The name's bytes as sent, lossily printable.
    Name(String, u16),
}

/// A successful CONNECT reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub bound: Bound,
}

/// What `Reply::parse` made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Read exactly this many more bytes, then ask again.
    Need(usize),
    /// The whole reply, which was exactly the bytes given.
    Done(Reply),
}

impl Reply {
    /// The CONNECT reply in `buf` (the bytes read so far, from its first).
    /// A refusal is an error as soon as its code is in; bytes past the
    /// reply's end are not looked at (the dialer never reads them).
    pub fn parse(buf: &[u8]) -> Result<Parsed, SocksError> {
        if buf.len() < 2 {
            return Ok(Parsed::Need(2 - buf.len()));
        }
        if buf[0] != VERSION {
            return Err(SocksError::NotSocks5(buf[0]));
        }
        if buf[1] != 0 {
            return Err(SocksError::ConnectRefused { code: buf[1] });
        }
        if buf.len() < 4 {
            return Ok(Parsed::Need(4 - buf.len()));
        }
        // buf[2] is reserved: some servers put junk there; it is ignored.
        let total = match buf[3] {
            ATYP_V4 => 4 + 4 + 2,
            ATYP_V6 => 4 + 16 + 2,
            ATYP_DOMAIN => {
                let Some(&len) = buf.get(4) else {
                    return Ok(Parsed::Need(1));
                };
                if len == 0 {
                    return Err(SocksError::EmptyBoundName);
                }
                5 + usize::from(len) + 2
            }
            other => return Err(SocksError::BadAddressType(other)),
        };
        if buf.len() < total {
            return Ok(Parsed::Need(total - buf.len()));
        }
        let buf = &buf[..total];
        let port = u16::from_be_bytes([buf[total - 2], buf[total - 1]]);
        let bound = match buf[3] {
            ATYP_V4 => {
                let a: [u8; 4] = buf[4..8].try_into().unwrap_or_default();
                Bound::Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
            }
            ATYP_V6 => {
                let a: [u8; 16] = buf[4..20].try_into().unwrap_or_default();
                Bound::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
            }
            _ => Bound::Name(
                String::from_utf8_lossy(&buf[5..total - 2]).into_owned(),
                port,
            ),
        };
        Ok(Parsed::Done(Reply { bound }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests_carry_each_address_type() {
        let v4 = connect(&Target::Addr("192.0.2.80:80".parse().unwrap()));
        assert_eq!(v4, [5, 1, 0, 1, 192, 0, 2, 80, 0, 80]);
        let v6 = connect(&Target::Addr("[2001:db8::80]:443".parse().unwrap()));
        let mut want = vec![5, 1, 0, 4];
        want.extend_from_slice(&"2001:db8::80".parse::<Ipv6Addr>().unwrap().octets());
        want.extend_from_slice(&[1, 187]);
        assert_eq!(v6, want);
        // A flow allowed by a name: the proxy resolves it (ATYP=domain).
        let name = connect(&Target::name_or_addr(
            Some("app.example.com"),
            "203.0.113.9:8443".parse().unwrap(),
        ));
        let mut want = vec![5, 1, 0, 3, 15];
        want.extend_from_slice(b"app.example.com");
        want.extend_from_slice(&8443u16.to_be_bytes());
        assert_eq!(name, want);
    }

    #[test]
    fn names_that_do_not_fit_fall_back_to_the_address() {
        let addr: SocketAddr = "192.0.2.80:80".parse().unwrap();
        assert_eq!(Target::name_or_addr(None, addr), Target::Addr(addr));
        assert_eq!(Target::name_or_addr(Some(""), addr), Target::Addr(addr));
        let long = "a".repeat(256);
        assert_eq!(Target::name_or_addr(Some(&long), addr), Target::Addr(addr));
    }

    #[test]
    fn greeting_and_login_are_rfc_bytes() {
        assert_eq!(greeting(false), [5, 1, 0]);
        assert_eq!(greeting(true), [5, 1, 2]);
        assert_eq!(login("al", "pw!"), [1, 2, b'a', b'l', 3, b'p', b'w', b'!']);
        assert_eq!(login("u", ""), [1, 1, b'u', 0]);
    }

    #[test]
    fn method_and_login_answers() {
        assert_eq!(parse_method([5, 0], METHOD_NONE), Ok(()));
        assert_eq!(parse_method([5, 2], METHOD_PASSWORD), Ok(()));
        assert_eq!(
            parse_method([5, 0xff], METHOD_PASSWORD),
            Err(SocksError::NoAcceptableMethod("username/password"))
        );
        assert_eq!(
            parse_method([5, 2], METHOD_NONE),
            Err(SocksError::UnexpectedMethod { got: 2, offered: 0 })
        );
        assert_eq!(parse_method([4, 0], 0), Err(SocksError::NotSocks5(4)));
        assert_eq!(parse_method(*b"HT", 0), Err(SocksError::NotSocks5(b'H')));
        assert_eq!(parse_login([1, 0]), Ok(()));
        assert_eq!(parse_login([5, 0]), Ok(()));
        assert_eq!(parse_login([1, 1]), Err(SocksError::AuthRefused(1)));
        assert_eq!(
            parse_login([0x48, 0]),
            Err(SocksError::BadAuthVersion(0x48))
        );
    }

    /// Feed a reply the way the dialer does: exactly what `parse` asks for.
    fn feed(bytes: &[u8]) -> (Result<Parsed, SocksError>, usize) {
        let mut have = 0;
        loop {
            match Reply::parse(&bytes[..have]) {
                Ok(Parsed::Need(n)) if have + n <= bytes.len() => have += n,
                other => return (other, have),
            }
        }
    }

    #[test]
    fn replies_of_each_address_type_are_read_to_their_last_byte() {
        let mut v4 = vec![5, 0, 0, 1, 198, 51, 100, 1, 0x9c, 0x40];
        v4.extend_from_slice(b"relayed bytes behind the reply");
        let (r, used) = feed(&v4);
        assert_eq!(used, 10);
        assert_eq!(
            r,
            Ok(Parsed::Done(Reply {
                bound: Bound::Addr("198.51.100.1:40000".parse().unwrap())
            }))
        );
        let mut v6 = vec![5, 0, 0, 4];
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 7, 0xde, 0xad]);
        let (r, used) = feed(&v6);
        assert_eq!(used, 22);
        assert_eq!(
            r,
            Ok(Parsed::Done(Reply {
                bound: Bound::Addr("[2001:db8::1]:7".parse().unwrap())
            }))
        );
        let mut name = vec![5, 0, 0x77, 3, 4];
        name.extend_from_slice(b"prox\x00\x50junk");
        let (r, used) = feed(&name);
        assert_eq!(used, 11);
        assert_eq!(
            r,
            Ok(Parsed::Done(Reply {
                bound: Bound::Name("prox".into(), 80)
            }))
        );
    }

    #[test]
    fn refusals_and_bad_replies_say_why() {
        for code in 1..=9u8 {
            let (r, used) = feed(&[5, code]);
            assert_eq!(r, Err(SocksError::ConnectRefused { code }));
            assert_eq!(used, 2, "a refusal needs no more than its code");
        }
        let e = SocksError::ConnectRefused { code: 5 }.to_string();
        assert!(e.contains("connection refused"), "{e}");
        assert_eq!(feed(b"HTTP/1.1 400").0, Err(SocksError::NotSocks5(b'H')));
        assert_eq!(feed(&[5, 0, 0, 2, 1]).0, Err(SocksError::BadAddressType(2)));
        assert_eq!(
            feed(&[5, 0, 0, 3, 0, 0, 80]).0,
            Err(SocksError::EmptyBoundName)
        );
        // Short: the parser keeps asking, never guesses.
        assert_eq!(Reply::parse(&[]), Ok(Parsed::Need(2)));
        assert_eq!(Reply::parse(&[5, 0, 0]), Ok(Parsed::Need(1)));
        assert_eq!(Reply::parse(&[5, 0, 0, 1, 1]), Ok(Parsed::Need(5)));
        assert_eq!(Reply::parse(&[5, 0, 0, 3]), Ok(Parsed::Need(1)));
        assert_eq!(Reply::parse(&[5, 0, 0, 3, 255]), Ok(Parsed::Need(257)));
    }
}
