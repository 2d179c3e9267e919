//! What the cluster store holds for one sandbox, and the one place its bytes
//! become validated types. `slipway serve` with a `[cluster]` section writes
//! these records; `slipway edge` reads them. Anyone who can write to the
//! store can write anything under the prefix, so every key and value is
//! hostile input here: parsed with the same validators as a public request
//! (`SandboxId`, `HostMask`), bounded in size, and never a panic.
//!
//! Layout, under `/slipway/v1/`:
//! - `nodes/<node>` = the node's tunnel address, `IP:PORT`;
//! - `sbx/<sandboxId>` = `{"node", "addr", "public", "tokenDigest", "mask"}`.
//!
//! The raw access token never leaves its node: only its SHA-256 digest.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::directory::HostMask;
use crate::target::{GuestPort, SandboxId};
use crate::token::TokenDigest;

/// Where a sandbox's record lives: this, then its id.
pub const SANDBOX_PREFIX: &str = "/slipway/v1/sbx/";
/// Where a node's address lives: this, then its name.
pub const NODE_PREFIX: &str = "/slipway/v1/nodes/";
/// Largest value taken: a real record is about 200 bytes, and the largest
/// a node can write (the longest node name, mask and address, 64 HTTPS
/// ports) about 1.2 KB; a test pins that it fits.
pub const MAX_RECORD_BYTES: usize = 2048;
/// Longest node name: a DNS name.
pub const MAX_NODE_NAME_LEN: usize = 253;

/// Why a stored key or value is not a record: it is skipped, logged and
/// counted by whoever read it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRecord {
    #[error("the key {0:?} is not {SANDBOX_PREFIX}<sandboxId>")]
    Key(String),
    #[error("the value is {0} bytes, more than {MAX_RECORD_BYTES}")]
    TooLong(usize),
    #[error("the value is not a sandbox record: {0}")]
    Json(String),
    #[error(transparent)]
    Node(#[from] BadNodeName),
    #[error("invalid addr {0:?}: give IP:PORT")]
    Addr(String),
    #[error("invalid tokenDigest: give 64 hex digits")]
    Digest,
    #[error("a public sandbox's record carries a tokenDigest")]
    PublicWithDigest,
    #[error("a private sandbox's record carries no tokenDigest")]
    PrivateWithoutDigest,
    /// The mask, cut short: a stored value may be as long as the record.
    #[error("invalid mask {0:?}: give a host[:port], e.g. localhost:${{PORT}}")]
    Mask(String),
    #[error("invalid httpsPorts: {0}")]
    HttpsPorts(#[from] crate::guest_tls::BadHttpsPorts),
}

/// A node's name: a DNS name (lower-case labels of `a-z`, `0-9` and inner
/// `-`, dot-separated). The node's tunnel certificate must name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid node name {0:?}: give a DNS name such as host-a or host-a.example.com (lower case)"
)]
pub struct BadNodeName(pub String);

impl NodeName {
    pub fn parse(s: &str) -> Result<Self, BadNodeName> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NODE_NAME_LEN
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(BadNodeName(echo(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One sandbox as the cluster sees it: which node holds it, where that
/// node's tunnel listens, and what the edge needs to check and rewrite a
/// request before it sends it there.
#[derive(Debug, Clone)]
pub struct SandboxRecord {
    pub node: NodeName,
    pub addr: SocketAddr,
    /// `None`: public traffic is allowed.
    pub token_digest: Option<TokenDigest>,
    pub mask: Option<HostMask>,
    /// Guest ports that serve HTTPS: the edge speaks TLS to the guest on
    /// them, through the tunnel (sorted).
    pub https_ports: Vec<GuestPort>,
}

/// The wire form. Unknown fields are ignored (a newer node may add some);
/// missing ones are errors.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    node: String,
    addr: String,
    public: bool,
    #[serde(default)]
    token_digest: Option<String>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    https_ports: Vec<u16>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireOut<'a> {
    node: &'a str,
    addr: String,
    public: bool,
    token_digest: Option<String>,
    mask: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    https_ports: Vec<u16>,
}

impl SandboxRecord {
    pub fn is_public(&self) -> bool {
        self.token_digest.is_none()
    }

    /// A stored value, checked field by field.
    pub fn parse(value: &[u8]) -> Result<Self, BadRecord> {
        if value.len() > MAX_RECORD_BYTES {
            return Err(BadRecord::TooLong(value.len()));
        }
        let wire: Wire = serde_json::from_slice(value).map_err(|e| {
            // serde's message may quote the input: keep it short and printable.
            BadRecord::Json(echo(&e.to_string()))
        })?;
        let node = NodeName::parse(&wire.node)?;
        let addr = wire
            .addr
            .parse::<SocketAddr>()
            .ok()
            .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
            .ok_or_else(|| BadRecord::Addr(echo(&wire.addr)))?;
        let token_digest = match (wire.public, wire.token_digest) {
            (true, None) => None,
            (true, Some(_)) => return Err(BadRecord::PublicWithDigest),
            (false, None) => return Err(BadRecord::PrivateWithoutDigest),
            (false, Some(hex)) => Some(TokenDigest::from_hex(&hex).ok_or(BadRecord::Digest)?),
        };
        let mask = wire
            .mask
            .as_deref()
            .map(|m| HostMask::parse(m).map_err(|_| BadRecord::Mask(echo(m))))
            .transpose()?;
        let https_ports = crate::guest_tls::https_ports(&wire.https_ports)?;
        Ok(Self {
            node,
            addr,
            token_digest,
            mask,
            https_ports,
        })
    }

    /// The stored value.
    pub fn to_json(&self) -> String {
        let out = WireOut {
            node: self.node.as_str(),
            addr: self.addr.to_string(),
            public: self.is_public(),
            token_digest: self.token_digest.as_ref().map(TokenDigest::to_hex),
            mask: self.mask.as_ref().map(HostMask::as_str),
            https_ports: self.https_ports.iter().map(|p| p.get()).collect(),
        };
        // Strings and a bool only: serialising cannot fail.
        serde_json::to_string(&out).unwrap_or_default()
    }

    /// Whether two records route the same way (same node, address, mask,
    /// HTTPS ports and publicness): then a token change can be applied to
    /// the live route.
    pub fn same_way(&self, other: &SandboxRecord) -> bool {
        self.node == other.node
            && self.addr == other.addr
            && self.mask == other.mask
            && self.https_ports == other.https_ports
            && self.is_public() == other.is_public()
    }
}

/// The store key of a sandbox's record.
pub fn sandbox_key(id: &SandboxId) -> String {
    format!("{SANDBOX_PREFIX}{id}")
}

/// The store key of a node's address.
pub fn node_key(node: &NodeName) -> String {
    format!("{NODE_PREFIX}{node}")
}

/// The sandbox a stored key names: exactly the prefix and an id in its
/// canonical (lower-case) form, so that no two keys name one sandbox.
pub fn parse_sandbox_key(key: &[u8]) -> Result<SandboxId, BadRecord> {
    let bad = || BadRecord::Key(echo(&String::from_utf8_lossy(key)));
    let rest = key
        .strip_prefix(SANDBOX_PREFIX.as_bytes())
        .and_then(|r| std::str::from_utf8(r).ok())
        .ok_or_else(bad)?;
    match SandboxId::parse(rest) {
        Ok(id) if id.as_str() == rest => Ok(id),
        _ => Err(bad()),
    }
}

/// A tunnel's target as the edge names it in its CONNECT (`<id>:<port>`),
/// both parts as strict as in a public request and in canonical form (no
/// upper case, no leading zeros): one target, one spelling.
pub fn parse_tunnel_target(s: &str) -> Option<(SandboxId, GuestPort)> {
    let (id, port) = s.rsplit_once(':')?;
    let sandbox = SandboxId::parse(id).ok().filter(|i| i.as_str() == id)?;
    let guest_port = GuestPort::parse(port)
        .ok()
        .filter(|p| p.to_string() == port)?;
    Some((sandbox, guest_port))
}

/// Hostile input echoed in a message: short, no control characters.
fn echo(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::AccessToken;

    fn digest_hex() -> String {
        AccessToken::generate().unwrap().digest().to_hex()
    }

    #[test]
    fn a_record_goes_to_json_and_back() {
        let token = AccessToken::generate().unwrap();
        let rec = SandboxRecord {
            node: NodeName::parse("host-a").unwrap(),
            addr: "10.1.2.3:7443".parse().unwrap(),
            token_digest: Some(token.digest()),
            mask: Some(HostMask::parse("localhost:${PORT}").unwrap()),
            https_ports: vec![GuestPort::new(8443).unwrap()],
        };
        let json = rec.to_json();
        assert!(!json.contains(token.as_str()), "{json}");
        let back = SandboxRecord::parse(json.as_bytes()).unwrap();
        assert!(back.same_way(&rec));
        assert!(back.token_digest.unwrap().same_as(&token.digest()));
        let public = SandboxRecord {
            token_digest: None,
            mask: None,
            https_ports: Vec::new(),
            ..rec
        };
        let json = public.to_json();
        assert_eq!(
            json,
            r#"{"node":"host-a","addr":"10.1.2.3:7443","public":true,"tokenDigest":null,"mask":null}"#
        );
        assert!(SandboxRecord::parse(json.as_bytes()).unwrap().is_public());
    }

    /// The largest record a node can write is read back by an edge.
    #[test]
    fn the_largest_record_a_node_can_write_fits() {
        let label = |n: usize| "a".repeat(n);
        let node = format!("{}.{}.{}.{}", label(63), label(63), label(63), label(61));
        let mask = format!("{}:{}", label(246), HostMask::PORT);
        let rec = SandboxRecord {
            node: NodeName::parse(&node).unwrap(),
            addr: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"
                .parse()
                .unwrap(),
            token_digest: Some(AccessToken::generate().unwrap().digest()),
            mask: Some(HostMask::parse(&mask).unwrap()),
            https_ports: crate::guest_tls::https_ports(&(65472..=65535).collect::<Vec<u16>>())
                .unwrap(),
        };
        let json = rec.to_json();
        assert!(
            json.len() > 1024 && json.len() <= MAX_RECORD_BYTES,
            "{}",
            json.len()
        );
        assert!(SandboxRecord::parse(json.as_bytes())
            .unwrap()
            .same_way(&rec));
    }

    /// Each bad value, and what the reader is told.
    #[test]
    fn hostile_values_are_refused_with_a_reason() {
        let d = digest_hex();
        let rows: Vec<(String, &str)> = vec![
            ("".into(), "not a sandbox record"),
            ("null".into(), "not a sandbox record"),
            ("{".into(), "not a sandbox record"),
            ("[1,2]".into(), "not a sandbox record"),
            ("\u{0}\u{ff}garbage".into(), "not a sandbox record"),
            (
                r#"{"addr":"10.0.0.1:1","public":true}"#.into(),
                "missing field `node`",
            ),
            (
                r#"{"node":"Host-A","addr":"10.0.0.1:1","public":true}"#.into(),
                "invalid node name",
            ),
            (
                r#"{"node":"a..b","addr":"10.0.0.1:1","public":true}"#.into(),
                "invalid node name",
            ),
            (
                r#"{"node":"a","addr":"10.0.0.1","public":true}"#.into(),
                "invalid addr",
            ),
            (
                r#"{"node":"a","addr":"0.0.0.0:7443","public":true}"#.into(),
                "invalid addr",
            ),
            (
                r#"{"node":"a","addr":"10.0.0.1:0","public":true}"#.into(),
                "invalid addr",
            ),
            (
                r#"{"node":"a","addr":"10.0.0.1:1","public":"yes"}"#.into(),
                "not a sandbox record",
            ),
            (
                format!(r#"{{"node":"a","addr":"10.0.0.1:1","public":true,"tokenDigest":"{d}"}}"#),
                "public sandbox's record carries a tokenDigest",
            ),
            (
                r#"{"node":"a","addr":"10.0.0.1:1","public":false}"#.into(),
                "carries no tokenDigest",
            ),
            (
                r#"{"node":"a","addr":"10.0.0.1:1","public":false,"tokenDigest":"abc"}"#.into(),
                "invalid tokenDigest",
            ),
            (
                r#"{"node":"a","addr":"10.0.0.1:1","public":true,"mask":"a b"}"#.into(),
                "invalid mask",
            ),
            (
                format!(
                    r#"{{"node":"a","addr":"10.0.0.1:1","public":true,"x":"{}"}}"#,
                    "y".repeat(2100)
                ),
                "more than 2048",
            ),
            ("[".repeat(1000), "not a sandbox record"),
            (
                r#"{"node":"a","addr":"10.0.0.1:1","public":true,"httpsPorts":[443,0]}"#.into(),
                "invalid httpsPorts",
            ),
            (
                r#"{"node":"a","addr":"10.0.0.1:1","public":true,"httpsPorts":[443,443]}"#.into(),
                "invalid httpsPorts",
            ),
            (
                r#"{"node":"a","addr":"10.0.0.1:1","public":true,"httpsPorts":[70000]}"#.into(),
                "not a sandbox record",
            ),
            (
                format!(
                    r#"{{"node":"a","addr":"10.0.0.1:1","public":true,"mask":"{}"}}"#,
                    "$".repeat(900)
                ),
                "invalid mask",
            ),
        ];
        for (value, want) in rows {
            let err = SandboxRecord::parse(value.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{value:?}: {err}");
            assert!(
                err.len() < 300 && !err.chars().any(char::is_control),
                "{err:?}"
            );
        }
        // Unknown fields are a newer writer's business, not an error.
        let newer = r#"{"node":"a","addr":"[2001:db8::1]:7443","public":true,"zone":"eu"}"#;
        assert!(SandboxRecord::parse(newer.as_bytes()).is_ok());
    }

    #[test]
    fn keys_name_one_sandbox_in_one_way() {
        let id = SandboxId::parse("abc-1").unwrap();
        assert_eq!(sandbox_key(&id), "/slipway/v1/sbx/abc-1");
        assert_eq!(parse_sandbox_key(b"/slipway/v1/sbx/abc-1").unwrap(), id);
        for bad in [
            &b"/slipway/v1/sbx/"[..],
            b"/slipway/v1/sbx/ABC",
            b"/slipway/v1/sbx/a/b",
            b"/slipway/v1/sbx/-a",
            b"/slipway/v1/nodes/a",
            b"/slipway/v1/sbx/\xff",
        ] {
            assert!(parse_sandbox_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tunnel_targets_are_as_strict_as_public_hosts() {
        let (id, port) = parse_tunnel_target("abc-1:8000").unwrap();
        assert_eq!((id.as_str(), port.get()), ("abc-1", 8000));
        for bad in [
            "abc",
            "ABC:80",
            "abc:0",
            "abc:+80",
            ":80",
            "a b:80",
            "abc:80:1",
            "abc:65536",
            "abc:0080",
        ] {
            assert!(parse_tunnel_target(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn node_names_are_dns_names() {
        for good in ["a", "host-a", "host-a.dc1.example", "h0"] {
            assert!(NodeName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a..b",
            ".a",
            "a.",
            &"a".repeat(64),
            "a b",
        ] {
            assert!(NodeName::parse(bad).is_err(), "{bad}");
        }
    }
}
