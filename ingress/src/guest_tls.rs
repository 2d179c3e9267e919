//! TLS from the gateway to a guest's `httpsPorts` (E2B's field): the guest
//! serves HTTPS with whatever certificate it has (self-signed, usually), so
//! its certificate is not verified. The handshake's signature still is,
//! with the provider's algorithms, so the peer proves it holds the key of
//! the certificate it sent. SNI is the Host the guest will see; ALPN offers
//! http/1.1 alone, the one version the gateway speaks to guests.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, DnsName, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::target::GuestPort;

/// At most this many ports per sandbox: each is a lookup on every request.
pub const MAX_HTTPS_PORTS: usize = 64;

/// How long a guest may take to finish the TLS handshake (as long as the
/// stack gives a connect).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A refused `httpsPorts` list; each message names the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHttpsPorts {
    #[error("invalid HTTPS port {0}: give a port from 1 to 65535")]
    Invalid(String),
    #[error("HTTPS port {0} is given twice")]
    Duplicate(u16),
    #[error("too many HTTPS ports ({0}): give at most {MAX_HTTPS_PORTS}")]
    TooMany(usize),
}

/// Validate a sandbox's HTTPS ports: 1..=65535 each, no duplicates, at most
/// [`MAX_HTTPS_PORTS`]. Sorted, for [`is_https`].
pub fn https_ports(ports: &[u16]) -> Result<Vec<GuestPort>, BadHttpsPorts> {
    if ports.len() > MAX_HTTPS_PORTS {
        return Err(BadHttpsPorts::TooMany(ports.len()));
    }
    let mut out = Vec::with_capacity(ports.len());
    for &p in ports {
        let port = GuestPort::new(p).ok_or_else(|| BadHttpsPorts::Invalid(p.to_string()))?;
        if out.contains(&port) {
            return Err(BadHttpsPorts::Duplicate(p));
        }
        out.push(port);
    }
    out.sort();
    Ok(out)
}

/// Whether `port` is among `sorted` (from [`https_ports`]).
pub fn is_https(sorted: &[GuestPort], port: GuestPort) -> bool {
    sorted.binary_search(&port).is_ok()
}

/// The name a ClientHello to the guest carries: the host of the Host header
/// the guest will see (`host` is already without port and brackets). An IP
/// literal, or anything that is not a valid DNS name, gets no SNI.
pub fn server_name(host: &str) -> (ServerName<'static>, bool) {
    if host.parse::<IpAddr>().is_err() {
        if let Ok(name) = DnsName::try_from(host.to_string()) {
            return (ServerName::DnsName(name), true);
        }
    }
    // rustls sends no SNI for an IP address; the verifier looks at no name.
    (
        ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
        false,
    )
}

/// Why the TLS handshake with the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestTlsError {
    #[error("the guest did not finish the TLS handshake in {HANDSHAKE_TIMEOUT:?}")]
    TimedOut,
    #[error("TLS handshake with the guest failed: {0}")]
    Handshake(#[source] std::io::Error),
}

/// TLS over `stream` (a connection into the guest), SNI from `host`.
pub async fn connect<S>(stream: S, host: &str) -> Result<TlsStream<S>, GuestTlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (name, _) = server_name(host);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector().connect(name, stream)).await {
        Err(_) => Err(GuestTlsError::TimedOut),
        Ok(Err(e)) => Err(GuestTlsError::Handshake(e)),
        Ok(Ok(tls)) => Ok(tls),
    }
}

/// One client configuration for every guest connection.
fn connector() -> &'static TlsConnector {
    static CONNECTOR: OnceLock<TlsConnector> = OnceLock::new();
    CONNECTOR.get_or_init(|| TlsConnector::from(Arc::new(client_config())))
}

fn client_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        // The ring provider supports TLS 1.2 and 1.3 alike: cannot fail.
        .expect("the ring provider supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

/// Accepts the guest's certificate whatever it is (E2B's httpsPorts: the
/// sandbox's own, often self-signed, certificate), but checks that the
/// handshake was signed with its key, by the provider's algorithms.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_ports_are_checked_and_sorted() {
        let ports = https_ports(&[8443, 443, 3000]).unwrap();
        let got: Vec<u16> = ports.iter().map(|p| p.get()).collect();
        assert_eq!(got, [443, 3000, 8443]);
        assert!(is_https(&ports, GuestPort::new(3000).unwrap()));
        assert!(!is_https(&ports, GuestPort::new(80).unwrap()));
        assert!(https_ports(&[]).unwrap().is_empty());
        let rows: [(&[u16], &str); 2] = [
            (
                &[443, 0],
                "invalid HTTPS port 0: give a port from 1 to 65535",
            ),
            (&[443, 8443, 443], "HTTPS port 443 is given twice"),
        ];
        for (ports, want) in rows {
            assert_eq!(https_ports(ports).unwrap_err().to_string(), want);
        }
        let many: Vec<u16> = (1..=65).collect();
        assert_eq!(
            https_ports(&many).unwrap_err().to_string(),
            "too many HTTPS ports (65): give at most 64"
        );
        let most: Vec<u16> = (1..=64).collect();
        assert_eq!(https_ports(&most).unwrap().len(), 64);
    }

    #[test]
    fn sni_is_the_host_unless_it_is_an_address_or_no_dns_name() {
        let rows = [
            ("localhost", Some("localhost")),
            ("8000-abc.gw.test", Some("8000-abc.gw.test")),
            ("app.internal", Some("app.internal")),
            ("192.0.2.7", None),
            ("2001:db8::1", None),
            ("bad name", None),
            ("a..b", None),
            ("", None),
        ];
        for (host, want) in rows {
            let (name, sni) = server_name(host);
            match want {
                Some(w) => {
                    assert!(sni, "{host}");
                    assert_eq!(name.to_str(), w, "{host}");
                }
                None => assert!(!sni, "{host}: {name:?}"),
            }
        }
    }

    #[test]
    fn alpn_offers_http1_alone_and_the_verifier_knows_the_providers_schemes() {
        let cfg = client_config();
        assert_eq!(cfg.alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(cfg.enable_sni);
        let v = AnyCertificate(Arc::new(rustls::crypto::ring::default_provider()));
        let schemes = v.supported_verify_schemes();
        assert!(schemes.contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
        assert!(schemes.contains(&SignatureScheme::RSA_PSS_SHA256));
    }
}
