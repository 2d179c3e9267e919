//! One request's head on an intercepted connection, without I/O: the checks
//! that keep a secret to the server its rule names, the rule's headers, and
//! the head's shape for the server's protocol. `fuzz/harness`'s
//! `header_rewrite` target holds it to that: a secret's value leaves in a
//! head only when every authority the request names is the flow's SNI.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Uri, Version};
use zeroize::Zeroizing;

use crate::rules::{echo, HeaderRules};
use crate::secrets::{Secret, SecretStore};

/// The server's protocol, which shapes the head sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// What the stack said of the flow.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    /// The SNI (canonical), which the policy allows.
    pub name: &'a str,
    /// The rule key the stack matched.
    pub rule: &'a str,
    /// The guest's destination port.
    pub port: u16,
}

/// Why a request is answered by slipway instead of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 421: Host or `:authority` names another host (as named, short and
    /// printable).
    Misdirected(String),
    /// 501: an upgrade or CONNECT.
    Upgrade,
    /// 502: a secret the rule names is not set.
    MissingSecret(String),
}

/// Check the head, give it the rule's headers (resolved now, replacing
/// what the guest sent under those names), and shape it for `upstream`.
/// `Ok(true)` when a rule's header was set. On `Err` the head is to be
/// dropped: nothing of it goes out.
pub fn rewrite(
    parts: &mut Parts,
    flow: &Flow<'_>,
    rules: &HeaderRules,
    secrets: &SecretStore,
    upstream: Protocol,
) -> Result<bool, Refusal> {
    check_authority(parts, flow.name, flow.port).map_err(Refusal::Misdirected)?;
    if parts.method == Method::CONNECT || parts.headers.contains_key(header::UPGRADE) {
        return Err(Refusal::Upgrade);
    }
    strip_hop_by_hop(&mut parts.headers);
    let added = rule_headers(rules, flow.rule, secrets).map_err(Refusal::MissingSecret)?;
    let transformed = !added.is_empty();
    for (name, value) in added {
        parts.headers.insert(name, value);
    }
    let authority = authority_of(&parts.uri, &parts.headers, flow.name);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    match upstream {
        Protocol::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
            if !parts.headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(&authority) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        Protocol::Http2 => {
            parts.version = Version::HTTP_2;
            parts.uri = Uri::try_from(format!("https://{authority}{path}"))
                .unwrap_or_else(|_| Uri::from_static("/"));
            parts.headers.remove(header::HOST);
        }
    }
    Ok(transformed)
}

/// The rule's headers, values resolved now (a rotated secret applies to
/// the next request). Placeholders the guest wrote itself are left as it
/// wrote them: only the rule's own templates are expanded. No rule under
/// that key (replaced since the flow was intercepted): nothing to add.
/// `Err(secret)`: one is not set.
fn rule_headers(
    rules: &HeaderRules,
    key: &str,
    secrets: &SecretStore,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let Some(rule) = rules.rule(key) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(rule.headers.len());
    for h in &rule.headers {
        let held: Vec<(&str, Arc<Secret>)> = h
            .value
            .secrets()
            .map(|s| secrets.get(s).map(|v| (s, v)).ok_or(s))
            .collect::<Result<_, _>>()
            .map_err(str::to_string)?;
        let mut value = Zeroizing::new(Vec::new());
        h.value
            .expand_into(&mut value, |name| {
                held.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.expose())
            })
            .map_err(str::to_string)?;
        // The header keeps this very buffer, which is wiped when dropped.
        let Ok(mut value) = HeaderValue::from_maybe_shared(Bytes::from_owner(value)) else {
            // Secrets and templates are checked for header bytes when set.
            return Err(format!("(an unusable value for {})", h.name));
        };
        value.set_sensitive(true);
        out.push((h.name.clone(), value));
    }
    Ok(out)
}

/// Every authority the request names (Host, and the URI's for HTTP/2 or an
/// absolute-form target) must be this connection's name, on its port (or
/// none). `Err(what it named)`, short and printable.
fn check_authority(parts: &Parts, name: &str, port: u16) -> Result<(), String> {
    let mut named = Vec::new();
    if let Some(a) = parts.uri.authority() {
        named.push(a.as_str().to_string());
    }
    for v in parts.headers.get_all(header::HOST) {
        named.push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    if named.is_empty() {
        return Err("no host".into());
    }
    for a in named {
        if !authority_is(&a, name, port) {
            return Err(echo(&a));
        }
    }
    Ok(())
}

fn authority_is(authority: &str, name: &str, port: u16) -> bool {
    if authority.contains('@') {
        return false;
    }
    let (host, p) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let port_ok = match p {
        None => true,
        Some(p) => p.parse::<u16>() == Ok(port),
    };
    port_ok && host.eq_ignore_ascii_case(name)
}

/// `name[:port]` as the guest named it (already checked to be this name).
fn authority_of(uri: &Uri, headers: &HeaderMap, name: &str) -> String {
    uri.authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| name.to_string())
}

/// Headers for one hop only (RFC 9110 7.6.1), and those `Connection` names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(n);
    }
    for n in ["keep-alive", "proxy-connection"] {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_must_be_the_sni_on_the_flows_port() {
        let rows = [
            ("api.example.test", true),
            ("API.Example.Test", true),
            ("api.example.test.", true),
            ("api.example.test:443", true),
            ("api.example.test:8443", false),
            ("api.example.test:x", false),
            ("evil.test", false),
            ("api.example.test.evil.test", false),
            ("user@api.example.test", false),
            ("", false),
        ];
        for (a, ok) in rows {
            assert_eq!(authority_is(a, "api.example.test", 443), ok, "{a}");
        }
        let head = |uri: &str, host: Option<&str>| {
            let mut b = http::Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            b.body(()).unwrap().into_parts().0
        };
        let check = |p: &Parts| check_authority(p, "api.example.test", 443);
        assert!(check(&head("/x", Some("api.example.test"))).is_ok());
        assert_eq!(
            check(&head("/x", Some("evil.test"))),
            Err("evil.test".into())
        );
        // An absolute-form target and a Host must both name it.
        assert!(check(&head("https://evil.test/x", Some("api.example.test"))).is_err());
        assert!(check(&head("/x", None)).is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("authorization", HeaderValue::from_static("guest's own"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["authorization"]);
    }

    #[test]
    fn a_rule_header_is_added_once_and_the_head_fits_the_servers_protocol() {
        let rules = HeaderRules::from_flags(&[
            "api.example.test=Authorization: Bearer ${e2b.secrets.K}".into(),
        ])
        .unwrap();
        let secrets = SecretStore::new();
        secrets.put("K", b"v1".to_vec()).unwrap();
        let flow = Flow {
            name: "api.example.test",
            rule: "api.example.test",
            port: 443,
        };
        let mut h2 = http::Request::builder()
            .uri("https://api.example.test/a?b")
            .header("authorization", "mine")
            .header("authorization", "mine too")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            rewrite(&mut h2, &flow, &rules, &secrets, Protocol::Http1),
            Ok(true)
        );
        assert_eq!(h2.uri, "/a?b");
        assert_eq!(h2.headers["host"], "api.example.test");
        let auth: Vec<_> = h2.headers.get_all("authorization").iter().collect();
        assert_eq!(auth, ["Bearer v1"]);
        assert!(auth[0].is_sensitive());
        let mut up = http::Request::builder()
            .uri("/u")
            .header("host", "api.example.test")
            .header("upgrade", "websocket")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            rewrite(&mut up, &flow, &rules, &secrets, Protocol::Http2),
            Err(Refusal::Upgrade)
        );
        secrets.remove("K");
        let mut h1 = http::Request::builder()
            .uri("/x")
            .header("host", "api.example.test")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            rewrite(&mut h1, &flow, &rules, &secrets, Protocol::Http2),
            Err(Refusal::MissingSecret("K".into()))
        );
    }
}
