//! The egress proxy a sandbox's TCP goes through (E2B's `egressProxy`):
//! where it is, how to log in, how to reach it over TLS. Validated here, in
//! one place, from the CLI's URL (`ProxySpec::from_url`) or the API's JSON
//! (a `ProxySpec` built field by field); the driver's dialer only ever sees
//! an `EgressProxy`.
//!
//! The password and the CA are `Secret`s: their Debug is `***`, they are
//! wiped from memory when dropped, and no error message or accessor meant
//! for a log or an answer carries them.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use zeroize::Zeroizing;

use crate::names::canonical_name;
use crate::policy::EgressPolicy;

/// RFC 1929: a username and a password are each 1 to 255 bytes on the wire.
pub const MAX_CREDENTIAL: usize = 255;

/// Why an egress proxy setting was refused. Messages name the input, never
/// the password or the CA's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid egress proxy {0}: give socks5://[user:pass@]host:port or socks5+tls://…")]
    InvalidUrl(String),
    #[error("invalid egress proxy address {0}: give host:port (an IPv6 address in brackets)")]
    InvalidAddress(String),
    #[error("invalid egress proxy username: {0} bytes, give 1 to 255")]
    UsernameLength(usize),
    #[error("invalid egress proxy password: {0} bytes, give at most 255")]
    PasswordLength(usize),
    #[error("invalid egress proxy: a password needs a username")]
    PasswordWithoutUsername,
    #[error("invalid egress proxy TLS server name {0}: give a DNS name or an IP address")]
    InvalidServerName(String),
    #[error("invalid egress proxy CA certificate: {0}")]
    InvalidCa(String),
    #[error("invalid egress proxy: {0} is set but TLS is not (use socks5+tls://)")]
    TlsOptionWithoutTls(&'static str),
    #[error(
        "egress proxy address {0} is in the always-denied internal ranges: \
         only the operator can open it (--allow-internal, sandbox.allow_internal)"
    )]
    Internal(IpAddr),
}

impl ProxyError {
    /// The field at fault, as E2B's sandbox body names it.
    pub fn field(&self) -> &'static str {
        match self {
            ProxyError::InvalidUrl(_) => "network.egressProxy",
            ProxyError::InvalidAddress(_) | ProxyError::Internal(_) => {
                "network.egressProxy.address"
            }
            ProxyError::UsernameLength(_) => "network.egressProxy.username",
            ProxyError::PasswordLength(_) | ProxyError::PasswordWithoutUsername => {
                "network.egressProxy.password"
            }
            ProxyError::InvalidServerName(_) => "network.egressProxy.tls.serverName",
            ProxyError::InvalidCa(_) => "network.egressProxy.tls.caCert",
            ProxyError::TlsOptionWithoutTls(_) => "network.egressProxy.tls",
        }
    }
}

pub type Result<T> = std::result::Result<T, ProxyError>;

/// A value that must not reach a log, a metric or an answer: Debug prints
/// `***`, there is no Display, and the bytes are wiped when it is dropped.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An egress proxy as asked, before validation: what the CLI's URL or the
/// API's JSON say. `EgressProxy::new` checks it.
#[derive(Debug, Clone, Default)]
pub struct ProxySpec {
    /// `host:port`; the host may be a name, an IPv4 address or an IPv6
    /// address in brackets.
    pub address: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `Some`: TLS to the proxy.
    pub tls: Option<TlsSpec>,
}

/// TLS to the proxy, as asked.
#[derive(Debug, Clone, Default)]
pub struct TlsSpec {
    /// The name the proxy's certificate is verified against, and the SNI
    /// [default: the address's host].
    pub server_name: Option<String>,
    /// PEM; replaces the built-in roots.
    pub ca_pem: Option<Secret>,
}

/// The proxy's host: an address, or a name resolved at each dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyHost {
    Ip(IpAddr),
    Name(String),
}

/// A validated egress proxy (SOCKS5, RFC 1928; username/password, RFC
/// 1929; optionally over TLS).
#[derive(Clone)]
pub struct EgressProxy {
    address: String,
    host: ProxyHost,
    port: u16,
    credentials: Option<(String, Secret)>,
    tls: Option<ProxyTls>,
}

/// TLS to the proxy: verified (built-in roots, or only the user's CA), TLS
/// 1.2 or newer, never a fallback to plain TCP.
#[derive(Clone)]
pub struct ProxyTls {
    server_name: ServerName<'static>,
    custom_ca: bool,
    config: Arc<rustls::ClientConfig>,
}

impl ProxyTls {
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// Whether the user's CA replaced the built-in roots.
    pub fn custom_ca(&self) -> bool {
        self.custom_ca
    }
}

impl EgressProxy {
    pub fn new(spec: ProxySpec) -> Result<Self> {
        let (host, port) = parse_address(&spec.address)?;
        let username = spec.username.filter(|u| !u.is_empty());
        let password = spec.password.filter(|p| !p.is_empty());
        let credentials = match (username, password) {
            (None, None) => None,
            (None, Some(_)) => return Err(ProxyError::PasswordWithoutUsername),
            (Some(u), p) => {
                if u.len() > MAX_CREDENTIAL {
                    return Err(ProxyError::UsernameLength(u.len()));
                }
                let p = p.unwrap_or_default();
                if p.len() > MAX_CREDENTIAL {
                    return Err(ProxyError::PasswordLength(p.len()));
                }
                Some((u, p))
            }
        };
        let tls = match spec.tls {
            Some(tls) => Some(tls_settings(tls, &host)?),
            None => None,
        };
        Ok(EgressProxy {
            address: spec.address.trim().to_string(),
            host,
            port,
            credentials,
            tls,
        })
    }

    /// `host:port` as given.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn host(&self) -> &ProxyHost {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn username(&self) -> Option<&str> {
        self.credentials.as_ref().map(|(u, _)| u.as_str())
    }

    /// The username and password, for the one place that sends them.
    pub fn credentials(&self) -> Option<(&str, &Secret)> {
        self.credentials.as_ref().map(|(u, p)| (u.as_str(), p))
    }

    pub fn tls(&self) -> Option<&ProxyTls> {
        self.tls.as_ref()
    }

    /// The name the proxy's certificate is checked against, for answers and
    /// logs (`None` without TLS).
    pub fn tls_server_name(&self) -> Option<String> {
        self.tls.as_ref().map(|t| match &t.server_name {
            ServerName::DnsName(n) => n.as_ref().to_string(),
            ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        })
    }

    /// Refuse an address in the always-denied internal ranges that the
    /// policy's operator holes do not open. A name is checked at each dial,
    /// on what it resolves to.
    pub fn check_address(&self, policy: &EgressPolicy) -> Result<()> {
        match self.host {
            ProxyHost::Ip(ip) if !policy.internal_allowed(ip) => Err(ProxyError::Internal(ip)),
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("address", &self.address)
            .field("username", &self.username())
            .field("password", &self.credentials.as_ref().map(|_| "***"))
            .field("tls_server_name", &self.tls_server_name())
            .field("custom_ca", &self.tls.as_ref().map(|t| t.custom_ca))
            .finish()
    }
}

impl ProxySpec {
    /// `socks5://[user[:pass]@]host:port` or `socks5+tls://…`; user and
    /// password may be percent-encoded. `password` (e.g. from the
    /// environment, to keep it out of argv) is used when the URL has none.
    /// The TLS options come from their own flags.
    pub fn from_url(url: &str, password: Option<Secret>) -> Result<ProxySpec> {
        let bad = || ProxyError::InvalidUrl(redacted(url));
        let (tls, rest) = if let Some(rest) = strip_scheme(url, "socks5://") {
            (false, rest)
        } else if let Some(rest) = strip_scheme(url, "socks5+tls://") {
            (true, rest)
        } else {
            return Err(bad());
        };
        // No path, query or fragment: a proxy URL names a host and a port.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(bad());
        }
        let (userinfo, address) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        let (username, url_password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                let user = percent_decode(user).ok_or_else(bad)?;
                let pass = match pass {
                    Some(p) => Some(Secret::new(percent_decode(p).ok_or_else(bad)?)),
                    None => None,
                };
                (Some(user), pass)
            }
        };
        // The outside password goes with a username the URL gives, never alone.
        let password = url_password.or(password.filter(|_| username.is_some()));
        Ok(ProxySpec {
            address: address.to_string(),
            username,
            password,
            tls: tls.then(TlsSpec::default),
        })
    }
}

fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Option<&'a str> {
    let head = url.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme)
        .then(|| &url[scheme.len()..])
}

/// The URL with any password replaced by `***`, short and printable.
pub fn redacted(url: &str) -> String {
    let shown = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    };
    echo(&shown)
}

/// Hostile input, short and printable, for an error message.
fn echo(s: &str) -> String {
    const MAX: usize = 80;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `host:port`, `[v6]:port`; the host an address or a valid DNS name.
fn parse_address(raw: &str) -> Result<(ProxyHost, u16)> {
    let bad = || ProxyError::InvalidAddress(echo(raw));
    let s = raw.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, port) = rest.split_once("]:").ok_or_else(bad)?;
        let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| bad())?;
        (ProxyHost::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if host.contains(':') {
            return Err(bad());
        }
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => ProxyHost::Ip(ip),
            Err(_) => ProxyHost::Name(canonical_name(host).ok_or_else(bad)?),
        };
        (host, port)
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok((host, port))
}

fn tls_settings(spec: TlsSpec, host: &ProxyHost) -> Result<ProxyTls> {
    let server_name = match spec.server_name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => ServerName::try_from(name.to_string())
            .map_err(|_| ProxyError::InvalidServerName(echo(name)))?,
        _ => match host {
            ProxyHost::Ip(ip) => ServerName::IpAddress((*ip).into()),
            ProxyHost::Name(n) => ServerName::try_from(n.clone())
                .map_err(|_| ProxyError::InvalidServerName(echo(n)))?,
        },
    };
    let custom_ca = spec.ca_pem.as_ref().is_some_and(|p| !p.is_empty());
    let roots = match spec.ca_pem.filter(|p| !p.is_empty()) {
        Some(pem) => Arc::new(ca_roots(pem.expose())?),
        None => builtin_roots(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ProxyError::InvalidCa(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(ProxyTls {
        server_name,
        custom_ca,
        config: Arc::new(config),
    })
}

/// Mozilla's roots, compiled in: a confined slipway reads no file at run time.
fn builtin_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            Arc::new(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        })
        .clone()
}

/// Every certificate of a PEM bundle, as the only roots.
fn ca_roots(pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        let cert = cert.map_err(|e| ProxyError::InvalidCa(format!("PEM block {}: {e}", i + 1)))?;
        roots
            .add(cert)
            .map_err(|e| ProxyError::InvalidCa(format!("certificate {}: {e}", i + 1)))?;
    }
    if roots.is_empty() {
        return Err(ProxyError::InvalidCa(
            "no CERTIFICATE block in it: give PEM".into(),
        ));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySpec;

    fn spec(address: &str) -> ProxySpec {
        ProxySpec {
            address: address.into(),
            ..ProxySpec::default()
        }
    }

    #[test]
    fn addresses_are_host_and_port() {
        for (raw, host, port) in [
            (
                "192.0.2.7:1080",
                ProxyHost::Ip("192.0.2.7".parse().unwrap()),
                1080,
            ),
            (
                "[2001:db8::7]:1080",
                ProxyHost::Ip("2001:db8::7".parse().unwrap()),
                1080,
            ),
            (
                "Proxy.Example.COM.:443",
                ProxyHost::Name("proxy.example.com".into()),
                443,
            ),
            (" proxy.test:1 ", ProxyHost::Name("proxy.test".into()), 1),
        ] {
            let p = EgressProxy::new(spec(raw)).unwrap();
            assert_eq!((p.host(), p.port()), (&host, port), "{raw}");
        }
        for bad in [
            "",
            "proxy.test",
            "proxy.test:",
            "proxy.test:0",
            "proxy.test:65536",
            "proxy.test:+80",
            "2001:db8::7:1080",
            "[2001:db8::7]1080",
            "[192.0.2.7]:1080",
            "exa mple.com:1080",
            "-bad-.com:1080",
            ":1080",
        ] {
            assert!(
                matches!(
                    EgressProxy::new(spec(bad)),
                    Err(ProxyError::InvalidAddress(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn credentials_follow_rfc_1929() {
        let with = |u: Option<&str>, p: Option<&str>| {
            EgressProxy::new(ProxySpec {
                username: u.map(Into::into),
                password: p.map(Secret::new),
                ..spec("192.0.2.7:1080")
            })
        };
        assert_eq!(
            with(Some("alice"), Some("s3cret")).unwrap().username(),
            Some("alice")
        );
        assert_eq!(with(None, None).unwrap().credentials().map(|c| c.0), None);
        // E2B clients send empty strings for "none".
        assert!(with(Some(""), Some("")).unwrap().credentials().is_none());
        assert_eq!(
            with(None, Some("s3cret")).unwrap_err(),
            ProxyError::PasswordWithoutUsername
        );
        let long = "x".repeat(256);
        assert_eq!(
            with(Some(&long), None).unwrap_err(),
            ProxyError::UsernameLength(256)
        );
        assert_eq!(
            with(Some("alice"), Some(&long)).unwrap_err(),
            ProxyError::PasswordLength(256)
        );
        let max = "x".repeat(255);
        assert!(with(Some(&max), Some(&max)).is_ok());
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let p = EgressProxy::new(ProxySpec {
            username: Some("alice".into()),
            password: Some(Secret::new("hunter2-pw")),
            ..spec("192.0.2.7:1080")
        })
        .unwrap();
        let shown = format!("{p:?}");
        assert!(shown.contains("alice") && shown.contains("***"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let s = ProxySpec::from_url("socks5://alice:hunter2-pw@192.0.2.7:1080", None).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        let e = ProxySpec::from_url("socks5://alice:hunter2-pw@proxy/x", None).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("alice:***@"), "{e}");
        let e = EgressProxy::new(ProxySpec {
            tls: Some(TlsSpec {
                server_name: None,
                ca_pem: Some(Secret::new(
                    "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n",
                )),
            }),
            ..spec("192.0.2.7:1080")
        })
        .err()
        .unwrap();
        assert!(!e.to_string().contains("base64 !!"), "{e}");
    }

    #[test]
    fn urls_give_scheme_credentials_and_address() {
        let s = ProxySpec::from_url("socks5://192.0.2.7:1080", None).unwrap();
        assert_eq!(s.address, "192.0.2.7:1080");
        assert!(s.username.is_none() && s.password.is_none() && s.tls.is_none());
        let s = ProxySpec::from_url("SOCKS5+TLS://al%40ice:p%3Ass@proxy.test:443/", None).unwrap();
        assert_eq!(s.address, "proxy.test:443");
        assert_eq!(s.username.as_deref(), Some("al@ice"));
        assert_eq!(s.password.unwrap().expose(), "p:ss");
        assert!(s.tls.is_some());
        // The password from elsewhere (the environment) when the URL has none.
        let s = ProxySpec::from_url("socks5://alice@proxy.test:1080", Some(Secret::new("env")))
            .unwrap();
        assert_eq!(s.password.unwrap().expose(), "env");
        let s = ProxySpec::from_url("socks5://proxy.test:1080", Some(Secret::new("env"))).unwrap();
        assert!(s.password.is_none());
        for bad in [
            "http://proxy.test:1080",
            "socks4://proxy.test:1080",
            "proxy.test:1080",
            "socks5://proxy.test:1080/path",
            "socks5://proxy.test:1080?x=1",
            "socks5://a:%zz@proxy.test:1080",
        ] {
            assert!(
                matches!(
                    ProxySpec::from_url(bad, None),
                    Err(ProxyError::InvalidUrl(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn tls_names_default_to_the_host() {
        let tls = |addr: &str, name: Option<&str>| {
            EgressProxy::new(ProxySpec {
                tls: Some(TlsSpec {
                    server_name: name.map(Into::into),
                    ca_pem: None,
                }),
                ..spec(addr)
            })
        };
        let p = tls("proxy.test:443", None).unwrap();
        assert_eq!(p.tls_server_name().as_deref(), Some("proxy.test"));
        assert!(!p.tls().unwrap().custom_ca());
        let p = tls("192.0.2.7:443", None).unwrap();
        assert_eq!(p.tls_server_name().as_deref(), Some("192.0.2.7"));
        let p = tls("192.0.2.7:443", Some("socks.example.com")).unwrap();
        assert_eq!(p.tls_server_name().as_deref(), Some("socks.example.com"));
        assert!(matches!(
            tls("192.0.2.7:443", Some("bad name")),
            Err(ProxyError::InvalidServerName(_))
        ));
    }

    #[test]
    fn a_ca_must_hold_certificates() {
        let with_ca = |pem: &str| {
            EgressProxy::new(ProxySpec {
                tls: Some(TlsSpec {
                    server_name: None,
                    ca_pem: Some(Secret::new(pem)),
                }),
                ..spec("proxy.test:443")
            })
        };
        let e = with_ca("hello").unwrap_err();
        assert_eq!(e.field(), "network.egressProxy.tls.caCert");
        assert!(e.to_string().contains("no CERTIFICATE block"), "{e}");
        assert!(matches!(
            with_ca("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(ProxyError::InvalidCa(_))
        ));
    }

    #[test]
    fn internal_addresses_need_the_operators_hole() {
        let policy = |holes: &[&str]| {
            EgressPolicy::from_spec(&PolicySpec {
                allow_internal: holes.iter().map(|h| h.to_string()).collect(),
                ..PolicySpec::default()
            })
            .unwrap()
        };
        let local = EgressProxy::new(spec("127.0.0.1:1080")).unwrap();
        assert_eq!(
            local.check_address(&policy(&[])),
            Err(ProxyError::Internal("127.0.0.1".parse().unwrap()))
        );
        assert_eq!(local.check_address(&policy(&["127.0.0.1/32"])), Ok(()));
        let metadata = EgressProxy::new(spec("169.254.169.254:80")).unwrap();
        assert!(metadata.check_address(&policy(&["127.0.0.1/32"])).is_err());
        let public = EgressProxy::new(spec("192.0.2.7:1080")).unwrap();
        assert_eq!(public.check_address(&policy(&[])), Ok(()));
        // A name is checked when it is resolved, at each dial.
        let named = EgressProxy::new(spec("localhost:1080")).unwrap();
        assert_eq!(named.check_address(&policy(&[])), Ok(()));
    }
}
