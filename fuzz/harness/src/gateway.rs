//! The public gateway's routing and token check, fed hostile Host values,
//! sandbox headers and token headers. Besides "no panic": whatever parses is
//! a valid id and port; a Host built from a valid id and port routes back to
//! exactly them; the token check grants exactly the right token.

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderName, HeaderValue};
use ingress::target::{authority_of, parse_target};
use ingress::token::{check, TokenDigest};
use ingress::{Domain, GuestPort, SandboxId, TokenCheck, TOKEN_HEADER};

#[derive(Debug, Arbitrary)]
struct Input {
    host: Vec<u8>,
    headers: Vec<(u8, Vec<u8>)>,
    domain: String,
    /// A well-formed name to route back: id and port.
    id: String,
    port: u16,
    token: Vec<u8>,
    presented: Vec<Vec<u8>>,
}

const NAMES: [&str; 4] = ["e2b-sandbox-id", "e2b-sandbox-port", "host", TOKEN_HEADER];

pub fn gateway(data: &[u8]) {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let domain =
        Domain::parse(&input.domain).unwrap_or_else(|_| Domain::parse("example.test").unwrap());

    // Whatever the client sent.
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(&input.host) {
        headers.append(http::header::HOST, v);
    }
    for (which, value) in &input.headers {
        let name = HeaderName::from_static(NAMES[*which as usize % NAMES.len()]);
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    let uri = http::Uri::from_static("/");
    if let Ok(authority) = authority_of(&uri, &headers) {
        if let Ok(target) = parse_target(authority, &headers, &domain) {
            assert!(SandboxId::parse(target.sandbox.as_str()).is_ok());
            assert!(target.port.get() >= 1);
        }
    }

    // A name built from a valid id and port routes back to them.
    if let (Ok(id), Some(port)) = (SandboxId::parse(&input.id), GuestPort::new(input.port)) {
        let host = format!("{}-{}.{}", port.get(), id.as_str(), domain.as_str());
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_str(&host).unwrap());
        let target = parse_target(&host, &h, &domain)
            .unwrap_or_else(|e| panic!("{host} does not route: {e}"));
        assert_eq!(target.sandbox, id);
        assert_eq!(target.port, port);
    }

    // The token check: missing, right, wrong.
    let digest = TokenDigest::of(&input.token);
    let mut h = HeaderMap::new();
    assert_eq!(check(&digest, &h), TokenCheck::Missing);
    if let Ok(v) = HeaderValue::from_bytes(&input.token) {
        h.insert(TOKEN_HEADER, v);
        assert_eq!(check(&digest, &h), TokenCheck::Granted);
    }
    for other in &input.presented {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(other) {
            h.insert(TOKEN_HEADER, v);
            let want = if *other == input.token {
                TokenCheck::Granted
            } else {
                TokenCheck::Invalid
            };
            assert_eq!(check(&digest, &h), want);
        }
    }
}
