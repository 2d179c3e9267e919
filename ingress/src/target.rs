//! Where a public request wants to go, parsed from what the client sent (the
//! Host or `:authority`, and the `E2b-Sandbox-*` headers) into validated
//! types. This is the one place that reads those bytes; nothing here panics.
//!
//! Two forms, as E2B's public URLs:
//! - Host `<port>-<sandboxId>.<domain>`;
//! - Host `localhost`, an IP address or `sandbox.<domain>`, with the headers
//!   `E2b-Sandbox-Id` and `E2b-Sandbox-Port`.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU16;

use http::HeaderMap;

/// Longest sandbox id we accept: a DNS label (63) less `65535-`.
pub const MAX_SANDBOX_ID_LEN: usize = 57;

pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

/// Why a request names no valid target: an HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTarget {
    #[error("the request has no Host")]
    NoHost,
    #[error("the request has more than one Host")]
    ManyHosts,
    #[error("invalid Host {0:?}")]
    MalformedHost(String),
    #[error("Host {host:?} is not <port>-<sandboxId>.{domain}")]
    NotOurs { host: String, domain: String },
    #[error("invalid port {0:?}: give a number from 1 to 65535")]
    BadPort(String),
    #[error("invalid sandbox id {0:?}: give 1 to 57 of a-z, 0-9 and inner '-'")]
    BadSandboxId(String),
    #[error("the header {0} is missing (needed when the Host is localhost, an IP address or sandbox.<domain>)")]
    MissingHeader(&'static str),
    #[error("the header {0} is given more than once")]
    RepeatedHeader(&'static str),
}

/// Hostile input echoed in a message is cut short and stripped of control characters.
fn echo(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect::<String>()
}

/// A sandbox id: 1 to 57 of `a-z`, `0-9` and `-` (not first or last).
/// Upper-case input is folded (host names are case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    pub fn parse(s: &str) -> Result<Self, BadTarget> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SANDBOX_ID_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(BadTarget::BadSandboxId(echo(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A TCP port in the guest, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestPort(NonZeroU16);

impl GuestPort {
    pub fn new(port: u16) -> Option<Self> {
        NonZeroU16::new(port).map(Self)
    }

    /// Decimal digits only (no sign, no spaces), 1 to 65535.
    pub fn parse(s: &str) -> Result<Self, BadTarget> {
        let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        digits
            .then(|| s.parse::<u16>().ok())
            .flatten()
            .and_then(Self::new)
            .ok_or_else(|| BadTarget::BadPort(echo(s)))
    }

    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl fmt::Display for GuestPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The public domain sandboxes live under, e.g. `e2b.example.com`: lower
/// case, dot-separated labels of `a-z`, `0-9` and `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid domain {0:?}: give a DNS name such as sandboxes.example.com")]
pub struct BadDomain(pub String);

impl Domain {
    pub fn parse(s: &str) -> Result<Self, BadDomain> {
        let d = s.trim_end_matches('.').to_ascii_lowercase();
        let ok = !d.is_empty()
            && d.len() <= 200
            && d.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if ok {
            Ok(Self(d))
        } else {
            Err(BadDomain(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated destination: which sandbox, which port in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub sandbox: SandboxId,
    pub port: GuestPort,
}

/// The authority the client addressed: the `:authority` of an HTTP/2 request
/// (or an absolute-form URI), else the one Host header.
pub fn authority_of<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Result<&'a str, BadTarget> {
    if let Some(a) = uri.authority() {
        return Ok(a.as_str());
    }
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host = hosts.next().ok_or(BadTarget::NoHost)?;
    if hosts.next().is_some() {
        return Err(BadTarget::ManyHosts);
    }
    host.to_str()
        .map_err(|_| BadTarget::MalformedHost(echo(&String::from_utf8_lossy(host.as_bytes()))))
}

/// Decide the target of a request from its authority and headers.
pub fn parse_target(
    authority: &str,
    headers: &HeaderMap,
    domain: &Domain,
) -> Result<Target, BadTarget> {
    let host = host_part(authority)?;
    let by_headers = host == "localhost"
        || host.parse::<IpAddr>().is_ok()
        || host
            .strip_prefix("sandbox.")
            .is_some_and(|rest| rest == domain.as_str());
    if by_headers {
        let id = one_header(headers, SANDBOX_ID_HEADER)?;
        let port = one_header(headers, SANDBOX_PORT_HEADER)?;
        return Ok(Target {
            port: GuestPort::parse(port.trim())?,
            sandbox: SandboxId::parse(id.trim())?,
        });
    }
    let not_ours = || BadTarget::NotOurs {
        host: echo(&host),
        domain: domain.to_string(),
    };
    let label = host
        .strip_suffix(domain.as_str())
        .and_then(|l| l.strip_suffix('.'))
        .filter(|l| !l.is_empty() && !l.contains('.'))
        .ok_or_else(not_ours)?;
    let (port, id) = label.split_once('-').ok_or_else(not_ours)?;
    Ok(Target {
        port: GuestPort::parse(port)?,
        sandbox: SandboxId::parse(id)?,
    })
}

/// The host of an authority, lower case, without port, brackets or a final dot.
pub(crate) fn host_part(authority: &str) -> Result<String, BadTarget> {
    let malformed = || BadTarget::MalformedHost(echo(authority));
    if authority.is_empty() {
        return Err(BadTarget::NoHost);
    }
    let parsed: http::uri::Authority = authority.parse().map_err(|_| malformed())?;
    if authority.contains('@') {
        return Err(malformed()); // userinfo has no place in a Host
    }
    let host = parsed.host();
    let port_ok = match authority.get(host.len()..) {
        Some("") => true,
        Some(rest) => rest.strip_prefix(':').is_some_and(|p| {
            !p.is_empty()
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok()
        }),
        None => false,
    };
    if !port_ok || !authority.starts_with(host) {
        return Err(malformed());
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(malformed());
    }
    Ok(host.to_ascii_lowercase())
}

fn one_header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, BadTarget> {
    let mut all = headers.get_all(name).iter();
    let v = all.next().ok_or(BadTarget::MissingHeader(name))?;
    if all.next().is_some() {
        return Err(BadTarget::RepeatedHeader(name));
    }
    v.to_str().map_err(|_| match name {
        SANDBOX_PORT_HEADER => BadTarget::BadPort(echo(&String::from_utf8_lossy(v.as_bytes()))),
        _ => BadTarget::BadSandboxId(echo(&String::from_utf8_lossy(v.as_bytes()))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn domain() -> Domain {
        Domain::parse("e2b.test").unwrap()
    }

    fn target(host: &str, headers: &[(&'static str, &str)]) -> Result<Target, BadTarget> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        parse_target(host, &map, &domain())
    }

    fn ok(port: u16, id: &str) -> Result<Target, BadTarget> {
        Ok(Target {
            sandbox: SandboxId::parse(id).unwrap(),
            port: GuestPort::new(port).unwrap(),
        })
    }

    #[test]
    fn port_dash_id_under_the_domain_routes() {
        assert_eq!(target("3000-abc123.e2b.test", &[]), ok(3000, "abc123"));
        assert_eq!(target("3000-abc123.e2b.test:443", &[]), ok(3000, "abc123"));
        assert_eq!(target("3000-ABC123.E2B.test.", &[]), ok(3000, "abc123"));
        assert_eq!(target("1-a.e2b.test", &[]), ok(1, "a"));
        assert_eq!(target("65535-a-b.e2b.test", &[]), ok(65535, "a-b"));
    }

    #[test]
    fn ports_outside_1_to_65535_are_bad() {
        for p in ["0", "65536", "99999", "", "+80", "8o", "123456", "-1"] {
            let host = format!("{p}-abc.e2b.test");
            assert!(
                matches!(target(&host, &[]), Err(BadTarget::BadPort(_))),
                "{host}: {:?}",
                target(&host, &[])
            );
        }
    }

    #[test]
    fn sandbox_ids_outside_the_charset_are_bad() {
        let long = "a".repeat(MAX_SANDBOX_ID_LEN + 1);
        for id in ["", "-abc", "abc-", "a_b", long.as_str()] {
            assert!(SandboxId::parse(id).is_err(), "{id}");
        }
        assert!(matches!(
            target("80-a_b.e2b.test", &[]),
            Err(BadTarget::MalformedHost(_)) | Err(BadTarget::BadSandboxId(_))
        ));
        assert_eq!(
            SandboxId::parse(&"a".repeat(MAX_SANDBOX_ID_LEN))
                .unwrap()
                .as_str()
                .len(),
            MAX_SANDBOX_ID_LEN
        );
    }

    #[test]
    fn hosts_of_other_domains_are_not_ours() {
        for h in [
            "3000-abc.other.test",
            "3000-abc.xe2b.test",
            "e2b.test",
            "a.b.e2b.test",
            "3000abc.e2b.test",
            "x.3000-abc.e2b.test",
        ] {
            assert!(
                matches!(target(h, &[]), Err(BadTarget::NotOurs { .. })),
                "{h}: {:?}",
                target(h, &[])
            );
        }
    }

    #[test]
    fn malformed_authorities_are_bad_hosts() {
        for h in ["user@3000-a.e2b.test", "a b", "[::1", "3000-a.e2b.test:x"] {
            assert!(
                matches!(target(h, &[]), Err(BadTarget::MalformedHost(_))),
                "{h}: {:?}",
                target(h, &[])
            );
        }
        assert_eq!(target("", &[]), Err(BadTarget::NoHost));
    }

    #[test]
    fn localhost_ip_and_sandbox_host_take_the_headers() {
        let h = [(SANDBOX_ID_HEADER, "abc"), (SANDBOX_PORT_HEADER, "8080")];
        for host in [
            "localhost",
            "localhost:8443",
            "127.0.0.1:80",
            "[::1]:80",
            "192.0.2.7",
            "sandbox.e2b.test",
        ] {
            assert_eq!(target(host, &h), ok(8080, "abc"), "{host}");
        }
    }

    #[test]
    fn header_form_needs_both_headers_once_and_valid() {
        assert_eq!(
            target("localhost", &[(SANDBOX_PORT_HEADER, "80")]),
            Err(BadTarget::MissingHeader(SANDBOX_ID_HEADER))
        );
        assert_eq!(
            target("localhost", &[(SANDBOX_ID_HEADER, "abc")]),
            Err(BadTarget::MissingHeader(SANDBOX_PORT_HEADER))
        );
        assert_eq!(
            target(
                "localhost",
                &[
                    (SANDBOX_ID_HEADER, "abc"),
                    (SANDBOX_ID_HEADER, "def"),
                    (SANDBOX_PORT_HEADER, "80")
                ]
            ),
            Err(BadTarget::RepeatedHeader(SANDBOX_ID_HEADER))
        );
        assert!(matches!(
            target(
                "localhost",
                &[(SANDBOX_ID_HEADER, "abc"), (SANDBOX_PORT_HEADER, "0")]
            ),
            Err(BadTarget::BadPort(_))
        ));
        assert!(matches!(
            target(
                "localhost",
                &[(SANDBOX_ID_HEADER, "a/b"), (SANDBOX_PORT_HEADER, "80")]
            ),
            Err(BadTarget::BadSandboxId(_))
        ));
    }

    #[test]
    fn echoed_input_is_short_and_printable() {
        let evil = format!("{}\u{7}", "x".repeat(500));
        let Err(BadTarget::BadSandboxId(shown)) = SandboxId::parse(&evil) else {
            panic!()
        };
        assert_eq!(shown.len(), 64);
        assert!(!shown.contains('\u{7}'));
    }

    #[test]
    fn arbitrary_hosts_and_headers_never_panic() {
        // A small deterministic generator over the bytes that matter here.
        let alphabet = b"0123456789abcAZ-._:[]@%/ \x7f\xff";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let host = String::from_utf8_lossy(&bytes).into_owned();
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                h.insert(SANDBOX_ID_HEADER, v.clone());
                h.insert(SANDBOX_PORT_HEADER, v);
            }
            let _ = parse_target(&host, &h, &domain());
            let _ = parse_target(&format!("{host}.e2b.test"), &h, &domain());
            let _ = parse_target("localhost", &h, &domain());
        }
    }

    #[test]
    fn domains_are_validated_and_folded() {
        assert_eq!(Domain::parse("E2B.Test.").unwrap().as_str(), "e2b.test");
        for bad in ["", ".", "a..b", "-a.b", "a_b.c", "a b"] {
            assert!(Domain::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn authority_prefers_the_uri_then_one_host_header() {
        let mut headers = HeaderMap::new();
        let uri: http::Uri = "/path".parse().unwrap();
        assert_eq!(authority_of(&uri, &headers), Err(BadTarget::NoHost));
        headers.append(http::header::HOST, HeaderValue::from_static("a.test"));
        assert_eq!(authority_of(&uri, &headers), Ok("a.test"));
        headers.append(http::header::HOST, HeaderValue::from_static("b.test"));
        assert_eq!(authority_of(&uri, &headers), Err(BadTarget::ManyHosts));
        let abs: http::Uri = "http://c.test/x".parse().unwrap();
        assert_eq!(authority_of(&abs, &headers), Ok("c.test"));
    }
}
