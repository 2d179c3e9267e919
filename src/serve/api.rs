//! The control API's requests, with E2B's field names. Bodies are parsed
//! here, in one place, into validated types (`CreateSandbox`,
//! `NetworkUpdate`); the handlers only ever see those. Every rejection is an
//! `ApiError` whose message names the field and the value.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use hyper::StatusCode;
use ingress::{BadHttpsPorts, GuestPort, HostMask, SandboxId};
use inject::HeaderRules;
use netstack::{EgressPolicy, EgressProxy, PolicyError, PolicySpec, ProxyError, ProxySpec, Secret};
use serde::Deserialize;
use serde_json::Value;
use vmm_glue::{Tap, TransportSpec};

/// E2B's cap on `dnsServers`.
pub const MAX_DNS_SERVERS: usize = 10;

/// A refused request: the status and a `{"code", "message", "field"}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub field: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }

    pub fn bad(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "code": self.status.as_u16(),
            "message": self.message,
        });
        if let Some(field) = self.field {
            v["field"] = field.into();
        }
        v
    }
}

pub type Result<T> = std::result::Result<T, ApiError>;

/// The egress half of a sandbox's network, as asked and as built. Replaced
/// whole by `PUT /sandboxes/{id}/network`.
#[derive(Debug, Clone)]
pub struct Egress {
    pub allow_internet_access: bool,
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
    /// E2B's `dnsServers`; `None`: not given, the stack's default (8.8.8.8).
    pub dns_servers: Option<Vec<Ipv4Addr>>,
    /// E2B's `egressProxy`; `None`: direct.
    pub egress_proxy: Option<EgressProxy>,
    /// E2B's `rules`: header injection per name. Their keys ride in `policy`.
    pub rules: HeaderRules,
    pub policy: EgressPolicy,
}

/// The public-URL half, fixed when the sandbox is created.
#[derive(Debug, Clone)]
pub struct Public {
    pub allow_public_traffic: bool,
    /// As given, and parsed.
    pub mask_request_host: Option<(String, HostMask)>,
    /// E2B's `httpsPorts`: the gateway speaks TLS to these guest ports. Sorted.
    pub https_ports: Vec<GuestPort>,
}

/// `POST /sandboxes`, validated.
#[derive(Debug, Clone)]
pub struct CreateSandbox {
    /// `None`: the server picks one.
    pub id: Option<SandboxId>,
    pub transport: TransportSpec,
    pub egress: Egress,
    pub public: Public,
}

/// `PUT /sandboxes/{id}/network`, validated: the whole egress policy, replaced.
#[derive(Debug, Clone)]
pub struct NetworkUpdate {
    pub egress: Egress,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCreate {
    #[serde(rename = "sandboxID", alias = "sandboxId")]
    sandbox_id: Option<String>,
    transport: Option<serde_json::Value>,
    #[serde(rename = "allowInternetAccess", alias = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<RawNetwork>,
}

/// E2B's `SandboxNetworkConfig`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNetwork {
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    // Entries as JSON values, so that a bad one is named, whatever its type.
    dns_servers: Option<Vec<Value>>,
    egress_proxy: Option<Value>,
    rules: Option<Value>,
    allow_public_traffic: Option<bool>,
    mask_request_host: Option<String>,
    https_ports: Option<Vec<Value>>,
}

/// E2B's `SandboxNetworkUpdateConfig`: the egress fields, replaced whole.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNetworkUpdate {
    // E2B spells this one in snake case here; slipway's own camel case too.
    #[serde(rename = "allow_internet_access", alias = "allowInternetAccess")]
    allow_internet_access: Option<bool>,
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    dns_servers: Option<Vec<Value>>,
    egress_proxy: Option<Value>,
    rules: Option<Value>,
    // Named so that the refusal can say why, rather than "unknown field".
    allow_public_traffic: Option<Value>,
    mask_request_host: Option<Value>,
    https_ports: Option<Value>,
}

/// The egress fields of either body, as sent.
struct RawEgress {
    allow_internet_access: Option<bool>,
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    dns_servers: Option<Vec<Value>>,
    egress_proxy: Option<Value>,
    rules: Option<Value>,
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad(
            "body",
            "the request body is empty: send a JSON object",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("invalid JSON body: {e}")))
}

/// Parse a `POST /sandboxes` body. `allow_internal` is the operator's holes,
/// which every sandbox's policy carries.
pub fn parse_create(body: &[u8], allow_internal: &[String]) -> Result<CreateSandbox> {
    let raw: RawCreate = json(body)?;
    let id = match raw.sandbox_id {
        Some(s) => Some(SandboxId::parse(&s).map_err(|_| {
            ApiError::bad(
                "sandboxID",
                format!("invalid sandboxID {s:?}: give 1 to 57 of a-z, 0-9 and inner '-'"),
            )
        })?),
        None => None,
    };
    let transport = parse_transport(raw.transport)?;
    let network = raw.network.unwrap_or_default();
    let egress = egress(
        RawEgress {
            allow_internet_access: raw.allow_internet_access,
            allow_out: network.allow_out,
            deny_out: network.deny_out,
            dns_servers: network.dns_servers,
            egress_proxy: network.egress_proxy,
            rules: network.rules,
        },
        allow_internal,
    )?;
    let https_ports = https_ports(network.https_ports.unwrap_or_default())?;
    let mask_request_host = match network.mask_request_host {
        Some(m) => {
            let mask = HostMask::parse(&m)
                .map_err(|e| ApiError::bad("network.maskRequestHost", e.to_string()))?;
            Some((m, mask))
        }
        None => None,
    };
    Ok(CreateSandbox {
        id,
        transport,
        egress,
        public: Public {
            allow_public_traffic: network.allow_public_traffic.unwrap_or(true),
            mask_request_host,
            https_ports,
        },
    })
}

/// Parse a `PUT /sandboxes/{id}/network` body. As E2B's
/// `SandboxNetworkUpdateConfig`, it replaces the egress configuration
/// whole: a field left out goes back to its default (`allowOut`, `denyOut`
/// and `rules` empty, `dnsServers` the stack's default, 8.8.8.8, no
/// `egressProxy`, `allow_internet_access` true). The public-URL fields are fixed at create.
pub fn parse_network_update(body: &[u8], allow_internal: &[String]) -> Result<NetworkUpdate> {
    let raw: RawNetworkUpdate = json(body)?;
    for (field, given) in [
        ("allowPublicTraffic", raw.allow_public_traffic.is_some()),
        ("maskRequestHost", raw.mask_request_host.is_some()),
        ("httpsPorts", raw.https_ports.is_some()),
    ] {
        if given {
            return Err(ApiError::bad(
                field,
                format!("{field} is fixed when the sandbox is created"),
            ));
        }
    }
    Ok(NetworkUpdate {
        egress: egress(
            RawEgress {
                allow_internet_access: raw.allow_internet_access,
                allow_out: raw.allow_out,
                deny_out: raw.deny_out,
                dns_servers: raw.dns_servers,
                egress_proxy: raw.egress_proxy,
                rules: raw.rules,
            },
            allow_internal,
        )?,
    })
}

/// The egress fields, validated; an omitted one is its default.
fn egress(raw: RawEgress, allow_internal: &[String]) -> Result<Egress> {
    let dns_servers = dns_servers(raw.dns_servers)?;
    let allow_internet_access = raw.allow_internet_access.unwrap_or(true);
    let spec = PolicySpec {
        allow_out: raw.allow_out.unwrap_or_default(),
        deny_out: raw.deny_out.unwrap_or_default(),
        allow_internet_access,
        allow_internal: allow_internal.to_vec(),
    };
    let policy = EgressPolicy::from_spec(&spec).map_err(|e| {
        let field = match e {
            PolicyError::InvalidDenied(_) => "network.denyOut",
            PolicyError::InvalidAllowed(_) | PolicyError::NamesNeedAllTrafficDenied => {
                "network.allowOut"
            }
            // Checked when the settings were loaded.
            PolicyError::InvalidInternal(_) => "sandbox.allow_internal",
        };
        ApiError::bad(field, e.to_string())
    })?;
    let egress_proxy = egress_proxy(raw.egress_proxy, &policy)?;
    // E2B's `rules` (`{"api.example.com": [{"transform": {"headers":
    // {"K": "V"}}}]}`), read as a JSON value so that a bad one is named
    // whatever its shape; their keys go into the policy, which marks the
    // flows to intercept.
    let rules = match raw.rules {
        None | Some(Value::Null) => HeaderRules::default(),
        Some(v) => HeaderRules::from_json(&v)
            .and_then(|r| r.check_allowed(&policy).map(|()| r))
            .map_err(|e| ApiError::bad("network.rules", e.to_string()))?,
    };
    let policy = policy.with_intercepts(rules.keys());
    Ok(Egress {
        allow_internet_access,
        allow_out: spec.allow_out,
        deny_out: spec.deny_out,
        dns_servers,
        egress_proxy,
        rules,
        policy,
    })
}

/// E2B's `egressProxy`: `{"address", "username", "password", "tls": true |
/// {"serverName", "caCert"}}`; absent or null: direct. Read by hand, not
/// by serde, so that no message ever quotes the password or the CA.
fn egress_proxy(raw: Option<Value>, policy: &EgressPolicy) -> Result<Option<EgressProxy>> {
    const GIVE: &str = "give {\"address\": \"host:port\", \"username\", \"password\", \"tls\": true | {\"serverName\", \"caCert\"}}";
    let mut map = match raw {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::bad(
                "network.egressProxy",
                format!("invalid egressProxy: {GIVE}"),
            ))
        }
    };
    // A string, or absent; the value itself is never quoted back.
    let text = |map: &mut serde_json::Map<String, Value>, key: &str, field: &'static str| match map
        .remove(key)
    {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad(
            field,
            format!("invalid egressProxy {key}: give a string"),
        )),
    };
    let address = text(&mut map, "address", "network.egressProxy.address")?.ok_or_else(|| {
        ApiError::bad(
            "network.egressProxy.address",
            format!("egressProxy.address is missing: {GIVE}"),
        )
    })?;
    let username = text(&mut map, "username", "network.egressProxy.username")?;
    let password = text(&mut map, "password", "network.egressProxy.password")?.map(Secret::new);
    let tls = match map.remove("tls") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(netstack::TlsSpec::default()),
        Some(Value::Object(mut t)) => {
            let server_name = text(&mut t, "serverName", "network.egressProxy.tls.serverName")?;
            let ca_pem = text(&mut t, "caCert", "network.egressProxy.tls.caCert")?.map(Secret::new);
            if let Some(k) = t.keys().next() {
                return Err(ApiError::bad(
                    "network.egressProxy.tls",
                    format!("unknown field {k:?} in egressProxy.tls: give serverName and caCert"),
                ));
            }
            Some(netstack::TlsSpec {
                server_name,
                ca_pem,
            })
        }
        Some(_) => {
            return Err(ApiError::bad(
                "network.egressProxy.tls",
                "invalid egressProxy tls: give true, false or {\"serverName\", \"caCert\"}",
            ))
        }
    };
    if let Some(k) = map.keys().next() {
        return Err(ApiError::bad(
            "network.egressProxy",
            format!("unknown field {k:?} in egressProxy: {GIVE}"),
        ));
    }
    let spec = ProxySpec {
        address,
        username,
        password,
        tls,
    };
    let refused = |e: ProxyError| ApiError::bad(e.field(), e.to_string());
    let proxy = EgressProxy::new(spec).map_err(refused)?;
    proxy.check_address(policy).map_err(refused)?;
    Ok(Some(proxy))
}

/// E2B's `dnsServers`: IPv4 addresses, at most ten; `None` when not given.
fn dns_servers(raw: Option<Vec<Value>>) -> Result<Option<Vec<Ipv4Addr>>> {
    let field = "network.dnsServers";
    let Some(raw) = raw else {
        return Ok(None);
    };
    if raw.len() > MAX_DNS_SERVERS {
        return Err(ApiError::bad(
            field,
            format!(
                "too many DNS servers ({}): give at most {MAX_DNS_SERVERS}",
                raw.len()
            ),
        ));
    }
    raw.iter()
        .map(|v| {
            v.as_str()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
                .ok_or_else(|| ApiError::bad(field, format!("invalid DNS server {}", shown(v))))
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// E2B's `httpsPorts`: whole numbers 1 to 65535, no duplicates, at most 64.
fn https_ports(raw: Vec<Value>) -> Result<Vec<GuestPort>> {
    let bad = |e: BadHttpsPorts| ApiError::bad("network.httpsPorts", e.to_string());
    if raw.len() > ingress::guest_tls::MAX_HTTPS_PORTS {
        return Err(bad(BadHttpsPorts::TooMany(raw.len())));
    }
    let ports = raw
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| bad(BadHttpsPorts::Invalid(shown(v))))
        })
        .collect::<Result<Vec<u16>>>()?;
    ingress::https_ports(&ports).map_err(bad)
}

/// A value from the request, as a message shows it: strings bare, anything
/// else as JSON; short, without control characters.
fn shown(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    text.chars().filter(|c| !c.is_control()).take(64).collect()
}

const TRANSPORTS: &str = "tap, tapFd, qemuStream, qemuDgram, vhostUser";

fn parse_transport(raw: Option<serde_json::Value>) -> Result<TransportSpec> {
    use serde_json::Value;
    let field = "transport";
    let Some(raw) = raw else {
        return Err(ApiError::bad(
            field,
            format!("transport is missing: give one of {TRANSPORTS}, e.g. {{\"tap\": \"tap0\"}}"),
        ));
    };
    let Value::Object(map) = raw else {
        return Err(ApiError::bad(
            field,
            format!("invalid transport {raw}: give an object with one of {TRANSPORTS}"),
        ));
    };
    let mut entries = map.into_iter();
    let (Some((kind, value)), None) = (entries.next(), entries.next()) else {
        return Err(ApiError::bad(
            field,
            format!("give exactly one transport, one of {TRANSPORTS}"),
        ));
    };
    match (kind.as_str(), value) {
        // The kernel's rules, the same check `slipway attach --tap` meets.
        ("tap", Value::String(name)) => match Tap::check_name(&name) {
            Ok(()) => Ok(TransportSpec::Tap(name)),
            Err(e) => Err(ApiError::bad("transport.tap", e.to_string())),
        },
        ("tapFd", Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| *n >= 0)
            .map(TransportSpec::TapFd)
            .ok_or_else(|| {
                ApiError::bad(
                    "transport.tapFd",
                    format!("invalid tapFd {n}: give a descriptor number"),
                )
            }),
        ("qemuStream", v) => {
            let (path, connect) = path_and(v, "transport.qemuStream", "connect")?;
            let connect = match connect {
                None => false,
                Some(Value::Bool(b)) => b,
                Some(other) => {
                    return Err(ApiError::bad(
                        "transport.qemuStream.connect",
                        format!("invalid connect {other}: give true or false"),
                    ))
                }
            };
            Ok(TransportSpec::QemuStream { path, connect })
        }
        ("qemuDgram", v) => {
            let (path, peer) = path_and(v, "transport.qemuDgram", "peer")?;
            let peer = match peer {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) => Some(absolute("transport.qemuDgram.peer", &p)?),
                Some(other) => {
                    return Err(ApiError::bad(
                        "transport.qemuDgram.peer",
                        format!("invalid peer {other}: give an absolute path"),
                    ))
                }
            };
            Ok(TransportSpec::QemuDgram { path, peer })
        }
        ("vhostUser", v) => {
            let (path, _) = path_and(v, "transport.vhostUser", "path")?;
            Ok(TransportSpec::VhostUser { path })
        }
        ("tap" | "tapFd", v) => Err(ApiError::bad(
            if kind == "tap" {
                "transport.tap"
            } else {
                "transport.tapFd"
            },
            format!(
                "invalid {kind} {v}: give a {}",
                if kind == "tap" {
                    "tap name"
                } else {
                    "descriptor number"
                }
            ),
        )),
        (other, _) => Err(ApiError::bad(
            field,
            format!("unknown transport {other:?}: give one of {TRANSPORTS}"),
        )),
    }
}

/// A transport as the API takes it: what `slipway ctl create` sends, read
/// back by [`parse_create`] as the same spec.
pub fn transport_json(spec: &TransportSpec) -> serde_json::Value {
    use serde_json::json;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    match spec {
        TransportSpec::Tap(name) => json!({"tap": name}),
        TransportSpec::TapFd(fd) => json!({"tapFd": fd}),
        TransportSpec::QemuStream {
            path: p,
            connect: false,
        } => json!({"qemuStream": path(p)}),
        TransportSpec::QemuStream {
            path: p,
            connect: true,
        } => json!({"qemuStream": {"path": path(p), "connect": true}}),
        TransportSpec::QemuDgram {
            path: p,
            peer: None,
        } => json!({"qemuDgram": path(p)}),
        TransportSpec::QemuDgram {
            path: p,
            peer: Some(peer),
        } => json!({"qemuDgram": {"path": path(p), "peer": path(peer)}}),
        TransportSpec::VhostUser { path: p } => json!({"vhostUser": path(p)}),
    }
}

/// `"PATH"` or `{"path": PATH, "<extra>": …}`.
fn path_and(
    v: serde_json::Value,
    field: &'static str,
    extra: &str,
) -> Result<(PathBuf, Option<serde_json::Value>)> {
    use serde_json::Value;
    match v {
        Value::String(p) => Ok((absolute(field, &p)?, None)),
        Value::Object(mut map) => {
            let path = match map.remove("path") {
                Some(Value::String(p)) => absolute(field, &p)?,
                _ => {
                    return Err(ApiError::bad(
                        field,
                        format!("{field}.path is missing: give an absolute path"),
                    ))
                }
            };
            let more = map.remove(extra);
            if let Some(k) = map.keys().next() {
                return Err(ApiError::bad(
                    field,
                    format!("unknown field {k:?} in {field}: give path and {extra}"),
                ));
            }
            Ok((path, more))
        }
        other => Err(ApiError::bad(
            field,
            format!("invalid {field} {other}: give a socket path"),
        )),
    }
}

fn absolute(field: &'static str, p: &str) -> Result<PathBuf> {
    let path = PathBuf::from(p);
    if path.is_absolute() && !p.contains('\0') {
        Ok(path)
    } else {
        Err(ApiError::bad(
            field,
            format!("invalid path {p:?}: give an absolute path"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(body: &str) -> Result<CreateSandbox> {
        parse_create(body.as_bytes(), &[])
    }

    fn refusal(body: &str) -> (Option<&'static str>, String) {
        let e = create(body).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        (e.field, e.message)
    }

    #[test]
    fn e2b_fields_become_a_policy_and_a_route() {
        let c = create(
            r#"{"sandboxID": "Box-1", "transport": {"tap": "tap7"}, "allowInternetAccess": false,
                "network": {"allowOut": ["192.0.2.80"], "denyOut": ["198.51.100.0/24"],
                            "allowPublicTraffic": false, "maskRequestHost": "localhost:${PORT}"}}"#,
        )
        .unwrap();
        assert_eq!(c.id.unwrap().as_str(), "box-1");
        assert_eq!(c.transport, TransportSpec::Tap("tap7".into()));
        assert!(!c.egress.allow_internet_access);
        assert!(
            c.egress
                .policy
                .decide("192.0.2.80".parse().unwrap(), false)
                .allowed
        );
        assert!(
            !c.egress
                .policy
                .decide("192.0.2.81".parse().unwrap(), false)
                .allowed
        );
        assert!(!c.public.allow_public_traffic);
        assert_eq!(c.public.mask_request_host.unwrap().0, "localhost:${PORT}");
    }

    #[test]
    fn defaults_are_e2b_defaults() {
        let c = create(r#"{"transport": {"qemuDgram": "/run/x.sock"}}"#).unwrap();
        assert!(c.id.is_none());
        assert!(c.egress.allow_internet_access);
        assert!(c.public.allow_public_traffic);
        assert_eq!(
            c.transport,
            TransportSpec::QemuDgram {
                path: "/run/x.sock".into(),
                peer: None
            }
        );
        let c = create(r#"{"transport": {"qemuStream": {"path": "/q.sock", "connect": true}}}"#)
            .unwrap();
        assert_eq!(
            c.transport,
            TransportSpec::QemuStream {
                path: "/q.sock".into(),
                connect: true
            }
        );
    }

    #[test]
    fn bad_policy_entries_name_field_and_value() {
        let (field, msg) =
            refusal(r#"{"transport": {"tap": "t"}, "network": {"denyOut": ["10.0.0.0/33"]}}"#);
        assert_eq!(
            (field, msg.as_str()),
            (Some("network.denyOut"), "invalid denied CIDR 10.0.0.0/33")
        );
        let (field, msg) =
            refusal(r#"{"transport": {"tap": "t"}, "network": {"allowOut": ["example..com"]}}"#);
        assert_eq!(
            (field, msg.as_str()),
            (
                Some("network.allowOut"),
                "invalid allowed address example..com"
            )
        );
    }

    #[test]
    fn bad_transports_say_what_to_give() {
        let c = create(r#"{"transport": {"vhostUser": "/v.sock"}}"#).unwrap();
        assert_eq!(
            c.transport,
            TransportSpec::VhostUser {
                path: "/v.sock".into()
            }
        );
        let (f, m) = refusal(r#"{"transport": {"vde": "/x"}}"#);
        assert_eq!(f, Some("transport"));
        assert!(m.starts_with("unknown transport \"vde\""), "{m}");
        let (_, m) = refusal(r#"{}"#);
        assert!(m.starts_with("transport is missing"), "{m}");
        let (_, m) = refusal(r#"{"transport": {"tap": "a", "tapFd": 3}}"#);
        assert!(m.contains("exactly one"), "{m}");
        let (f, m) = refusal(r#"{"transport": {"qemuStream": "rel.sock"}}"#);
        assert_eq!(f, Some("transport.qemuStream"));
        assert!(m.contains("absolute"), "{m}");
        let (f, _) = refusal(r#"{"transport": {"tap": "a/b"}}"#);
        assert_eq!(f, Some("transport.tap"));
        let (f, _) = refusal(r#"{"transport": {"tapFd": -1}}"#);
        assert_eq!(f, Some("transport.tapFd"));
    }

    #[test]
    fn tap_names_are_checked_by_the_kernels_rules() {
        let c = create(r#"{"transport": {"tap": "tap@1+x"}}"#).unwrap();
        assert_eq!(c.transport, TransportSpec::Tap("tap@1+x".into()));
        for bad in [
            r#""""#,
            r#"".""#,
            r#""a:b""#,
            r#""a b""#,
            r#""sixteen-chars-xx""#,
        ] {
            let (f, m) = refusal(&format!(r#"{{"transport": {{"tap": {bad}}}}}"#));
            assert_eq!(f, Some("transport.tap"), "{bad}");
            assert!(m.starts_with("invalid tap name"), "{bad}: {m}");
        }
    }

    #[test]
    fn every_transport_round_trips_through_the_json_ctl_sends() {
        for spec in [
            TransportSpec::Tap("tap0".into()),
            TransportSpec::TapFd(7),
            TransportSpec::QemuStream {
                path: "/run/s.sock".into(),
                connect: false,
            },
            TransportSpec::QemuStream {
                path: "/run/s.sock".into(),
                connect: true,
            },
            TransportSpec::QemuDgram {
                path: "/run/d.sock".into(),
                peer: None,
            },
            TransportSpec::QemuDgram {
                path: "/run/d.sock".into(),
                peer: Some("/run/q.sock".into()),
            },
            TransportSpec::VhostUser {
                path: "/run/v.sock".into(),
            },
        ] {
            let body = serde_json::json!({ "transport": transport_json(&spec) }).to_string();
            assert_eq!(create(&body).unwrap().transport, spec, "{body}");
        }
    }

    #[test]
    fn typos_and_bad_json_are_refused_not_ignored() {
        let (f, m) = refusal(r#"{"transport": {"tap": "t"}, "network": {"allowOUT": []}}"#);
        assert_eq!(f, Some("body"));
        assert!(m.contains("unknown field `allowOUT`"), "{m}");
        let (_, m) = refusal(r#"{"transport": "#);
        assert!(m.starts_with("invalid JSON body"), "{m}");
        let (f, m) = refusal(r#"{"sandboxID": "-x", "transport": {"tap": "t"}}"#);
        assert_eq!(f, Some("sandboxID"));
        assert!(m.contains("\"-x\""), "{m}");
        let (f, _) =
            refusal(r#"{"transport": {"tap": "t"}, "network": {"maskRequestHost": "a b"}}"#);
        assert_eq!(f, Some("network.maskRequestHost"));
    }

    #[test]
    fn network_updates_replace_the_egress_rules_only() {
        let u = parse_network_update(br#"{"denyOut": ["ALL_TRAFFIC"]}"#, &[]).unwrap();
        assert!(
            !u.egress
                .policy
                .decide("192.0.2.1".parse().unwrap(), false)
                .allowed
        );
        let u = parse_network_update(br#"{}"#, &[]).unwrap();
        assert!(
            u.egress
                .policy
                .decide("192.0.2.1".parse().unwrap(), false)
                .allowed
        );
        let e = parse_network_update(br#"{"allowPublicTraffic": false}"#, &[]).unwrap_err();
        assert!(e.message.contains("fixed when the sandbox is created"));
    }

    fn update(body: &str) -> Result<NetworkUpdate> {
        parse_network_update(body.as_bytes(), &[])
    }

    /// A create body with `network` as given, and the refusal's field and message.
    fn network_refusal(network: &str) -> (Option<&'static str>, String) {
        refusal(&format!(
            r#"{{"transport": {{"tap": "t"}}, "network": {network}}}"#
        ))
    }

    #[test]
    fn dns_servers_are_up_to_ten_ipv4_addresses_each_named_when_bad() {
        let with = |list: &str| {
            create(&format!(
                r#"{{"transport": {{"tap": "t"}}, "network": {{"dnsServers": {list}}}}}"#
            ))
        };
        assert_eq!(with("null").unwrap().egress.dns_servers, None);
        assert_eq!(
            create(r#"{"transport": {"tap": "t"}}"#)
                .unwrap()
                .egress
                .dns_servers,
            None
        );
        assert_eq!(with("[]").unwrap().egress.dns_servers, Some(vec![]));
        let ten: Vec<String> = (1..=10).map(|i| format!("\"192.0.2.{i}\"")).collect();
        let ten = with(&format!("[{}]", ten.join(","))).unwrap();
        assert_eq!(ten.egress.dns_servers.unwrap().len(), 10);
        let rows = [
            (r#"["1.1.1.1", "8.8.8"]"#, "invalid DNS server 8.8.8"),
            (r#"["2001:db8::53"]"#, "invalid DNS server 2001:db8::53"),
            (r#"["::ffff:8.8.8.8"]"#, "invalid DNS server ::ffff:8.8.8.8"),
            (r#"["010.0.0.1"]"#, "invalid DNS server 010.0.0.1"),
            (r#"["8.8.8.8 "]"#, "invalid DNS server 8.8.8.8 "),
            (r#"["dns.example"]"#, "invalid DNS server dns.example"),
            ("[53]", "invalid DNS server 53"),
            ("[null]", "invalid DNS server null"),
        ];
        for (list, want) in rows {
            let (field, msg) = network_refusal(&format!(r#"{{"dnsServers": {list}}}"#));
            assert_eq!((field, msg.as_str()), (Some("network.dnsServers"), want));
        }
        let eleven: Vec<String> = (1..=11).map(|i| format!("\"192.0.2.{i}\"")).collect();
        let (field, msg) = network_refusal(&format!(r#"{{"dnsServers": [{}]}}"#, eleven.join(",")));
        assert_eq!(
            (field, msg.as_str()),
            (
                Some("network.dnsServers"),
                "too many DNS servers (11): give at most 10"
            )
        );
        // Hostile values are cut short in the message.
        let (_, msg) = network_refusal(&format!(r#"{{"dnsServers": ["{}"]}}"#, "x".repeat(500)));
        assert_eq!(msg, format!("invalid DNS server {}", "x".repeat(64)));
    }

    #[test]
    fn https_ports_are_ports_once_each_at_most_64() {
        let c = create(
            r#"{"transport": {"tap": "t"}, "network": {"httpsPorts": [8443, 443, 65535, 1]}}"#,
        )
        .unwrap();
        let ports: Vec<u16> = c.public.https_ports.iter().map(|p| p.get()).collect();
        assert_eq!(ports, [1, 443, 8443, 65535]);
        assert!(create(r#"{"transport": {"tap": "t"}}"#)
            .unwrap()
            .public
            .https_ports
            .is_empty());
        let rows = [
            ("[0]", "invalid HTTPS port 0: give a port from 1 to 65535"),
            (
                "[65536]",
                "invalid HTTPS port 65536: give a port from 1 to 65535",
            ),
            (
                "[-443]",
                "invalid HTTPS port -443: give a port from 1 to 65535",
            ),
            (
                "[443.5]",
                "invalid HTTPS port 443.5: give a port from 1 to 65535",
            ),
            (
                r#"["443"]"#,
                "invalid HTTPS port 443: give a port from 1 to 65535",
            ),
            ("[443, 8443, 443]", "HTTPS port 443 is given twice"),
        ];
        for (list, want) in rows {
            let (field, msg) = network_refusal(&format!(r#"{{"httpsPorts": {list}}}"#));
            assert_eq!((field, msg.as_str()), (Some("network.httpsPorts"), want));
        }
        let many: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
        let (field, msg) = network_refusal(&format!(r#"{{"httpsPorts": [{}]}}"#, many.join(",")));
        assert_eq!(
            (field, msg.as_str()),
            (
                Some("network.httpsPorts"),
                "too many HTTPS ports (65): give at most 64"
            )
        );
    }

    #[test]
    fn rules_in_e2bs_shape_carry_their_keys_into_the_policy_and_bad_ones_are_named() {
        let names = r#""allowOut": ["*.example.com"], "denyOut": ["ALL_TRAFFIC"]"#;
        let with = |rules: &str| {
            create(&format!(
                r#"{{"transport": {{"tap": "t"}}, "network": {{{names}, "rules": {rules}}}}}"#
            ))
        };
        let c = with(
            r#"{"API.example.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.K}"}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.egress
                .policy
                .intercept_for("api.example.com")
                .map(|k| k.to_string()),
            Some("api.example.com".into())
        );
        assert_eq!(c.egress.rules.secrets().collect::<Vec<_>>(), ["K"]);
        // No rule at all is nothing to intercept.
        for empty in ["{}", "null", r#"{"a.example.com": []}"#] {
            let c = with(empty).unwrap();
            assert!(c.egress.rules.is_empty(), "{empty}");
            assert!(c.egress.policy.intercepts().iter().next().is_none());
        }
        let headers: Vec<String> = (0..21).map(|i| format!(r#""X-{i}": "v""#)).collect();
        let rows = [
            (
                r#"{"*": [{"transform": {"headers": {"X": "1"}}}]}"#.to_string(),
                "invalid rule domain *",
            ),
            (
                format!(
                    r#"{{"a.example.com": [{{"transform": {{"headers": {{{}}}}}}}]}}"#,
                    headers.join(",")
                ),
                "too many headers (21): at most 20",
            ),
            (
                r#"{"a.other.com": [{"transform": {"headers": {"X": "1"}}}]}"#.to_string(),
                "it covers no name allowOut allows",
            ),
            (
                r#"{"a.example.com": [{"inject": {}}]}"#.to_string(),
                "unknown field inject in a rule",
            ),
            (
                r#"["a.example.com"]"#.to_string(),
                "rules must be an object",
            ),
        ];
        for (rules, want) in rows {
            let (field, message) = network_refusal(&format!(r#"{{{names}, "rules": {rules}}}"#));
            assert_eq!(field, Some("network.rules"), "{message}");
            assert!(message.contains(want), "{rules}: {message}");
        }
        let u = update(
            r#"{"allowOut": ["a.example.com"], "denyOut": ["ALL_TRAFFIC"],
                "rules": {"a.example.com": [{"transform": {"headers": {"X": "1"}}}]}}"#,
        )
        .unwrap();
        assert!(u.egress.policy.intercept_for("a.example.com").is_some());
    }

    #[test]
    fn a_put_replaces_the_whole_egress_configuration() {
        let full = update(
            r#"{"allow_internet_access": false, "allowOut": ["world.test"],
                "denyOut": ["198.51.100.0/24"], "dnsServers": ["192.0.2.53"], "rules": {}}"#,
        )
        .unwrap()
        .egress;
        assert!(!full.allow_internet_access);
        assert_eq!(full.allow_out, ["world.test"]);
        assert_eq!(full.deny_out, ["198.51.100.0/24"]);
        assert_eq!(full.dns_servers, Some(vec![Ipv4Addr::new(192, 0, 2, 53)]));
        // Every field left out goes back to its default.
        let bare = update("{}").unwrap().egress;
        assert!(bare.allow_internet_access);
        assert!(bare.allow_out.is_empty() && bare.deny_out.is_empty());
        assert_eq!(bare.dns_servers, None);
        // slipway's own camel-case spelling is taken too.
        assert!(
            !update(r#"{"allowInternetAccess": false}"#)
                .unwrap()
                .egress
                .allow_internet_access
        );
        // The public-URL fields are the create's alone; unknown ones are refused.
        for (body, field) in [
            (r#"{"httpsPorts": [443]}"#, "httpsPorts"),
            (r#"{"maskRequestHost": "x"}"#, "maskRequestHost"),
        ] {
            let e = update(body).unwrap_err();
            assert_eq!(e.field, Some(field));
            assert_eq!(
                e.message,
                format!("{field} is fixed when the sandbox is created")
            );
        }
        let e = update(r#"{"allowOut": [], "dnsServer": ["8.8.8.8"]}"#).unwrap_err();
        assert_eq!(e.field, Some("body"));
        assert!(
            e.message.contains("unknown field `dnsServer`"),
            "{}",
            e.message
        );
        let e = update(r#"{"dnsServers": ["2001:db8::1"]}"#).unwrap_err();
        assert_eq!(e.field, Some("network.dnsServers"));
    }

    /// Every field of E2B's network object but egressProxy, through the
    /// registry and back out as `GET /sandboxes/{id}` shows it; then a PUT
    /// that leaves fields out, and the GET after it.
    #[test]
    fn an_e2b_body_round_trips_through_create_put_and_get() {
        use crate::serve::registry::Registry;
        let dir = std::env::temp_dir().join(format!("slipway-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("q.sock");
        let defaults = crate::serve::config::FileConfig::default()
            .validate()
            .unwrap()
            .sandbox;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let base = crate::serve::secrets::InjectBase {
                secrets: inject::SecretStore::new(),
                upstream: inject::UpstreamTls::new(&[] as &[std::path::PathBuf]).unwrap(),
            };
            let registry = Registry::new(tokio::runtime::Handle::current(), base);
            let body = serde_json::json!({
                "sandboxID": "e2b-1",
                "transport": {"qemuDgram": sock},
                "allow_internet_access": false,
                "network": {
                    "allowOut": ["world.test", "*.world.test", "198.51.100.0/24"],
                    "denyOut": ["192.0.2.0/24"],
                    "dnsServers": ["192.0.2.53", "203.0.113.53"],
                    "rules": {},
                    "allowPublicTraffic": false,
                    "maskRequestHost": "localhost:${PORT}",
                    "httpsPorts": [8443, 443],
                },
            });
            let req = parse_create(body.to_string().as_bytes(), &[]).unwrap();
            let created =
                serde_json::to_value(registry.create(req, None, &defaults).unwrap()).unwrap();
            assert_eq!(created["allowInternetAccess"], false);
            assert!(created["trafficAccessToken"].is_string(), "{created}");
            let network = serde_json::json!({
                "allowOut": ["world.test", "*.world.test", "198.51.100.0/24"],
                "denyOut": ["192.0.2.0/24"],
                "dnsServers": ["192.0.2.53", "203.0.113.53"],
                "allowPublicTraffic": false,
                "maskRequestHost": "localhost:${PORT}",
                "httpsPorts": [443, 8443],
            });
            assert_eq!(created["network"], network);
            let id = SandboxId::parse("e2b-1").unwrap();
            let got = serde_json::to_value(registry.describe(&id).await.unwrap()).unwrap();
            assert_eq!(got["network"], network);
            assert!(got.get("trafficAccessToken").is_none(), "{got}");

            // A PUT with only allowOut: the rest of the egress goes back to its
            // default, lists shown as [] (never null); the public fields stay.
            let put = update(r#"{"allowOut": ["203.0.113.0/24"]}"#).unwrap();
            registry.set_network(&id, put).unwrap();
            let got = serde_json::to_value(registry.describe(&id).await.unwrap()).unwrap();
            assert_eq!(got["allowInternetAccess"], true);
            assert_eq!(
                got["network"],
                serde_json::json!({
                    "allowOut": ["203.0.113.0/24"],
                    "denyOut": [],
                    "dnsServers": ["8.8.8.8"],
                    "allowPublicTraffic": false,
                    "maskRequestHost": "localhost:${PORT}",
                    "httpsPorts": [443, 8443],
                })
            );
            // `[]` is no DNS server at all.
            registry
                .set_network(&id, update(r#"{"dnsServers": []}"#).unwrap())
                .unwrap();
            let got = serde_json::to_value(registry.describe(&id).await.unwrap()).unwrap();
            assert_eq!(got["network"]["dnsServers"], serde_json::json!([]));
            assert_eq!(got["network"]["allowOut"], serde_json::json!([]));
            registry.delete_all().await;
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_egress_proxy_in_e2bs_shape_is_validated() {
        let c = create(
            r#"{"transport": {"tap": "t"}, "network": {"egressProxy": {
                "address": "proxy.example.com:1080", "username": "alice", "password": "pw-123",
                "tls": {"serverName": "socks.example.com"}}}}"#,
        )
        .unwrap();
        let p = c.egress.egress_proxy.unwrap();
        assert_eq!(p.address(), "proxy.example.com:1080");
        assert_eq!(p.credentials().unwrap().1.expose(), "pw-123");
        assert_eq!(p.tls_server_name().as_deref(), Some("socks.example.com"));
        let c = create(
            r#"{"transport": {"tap": "t"}, "network": {"egressProxy": {"address": "192.0.2.7:1080", "tls": true}}}"#,
        )
        .unwrap();
        let p = c.egress.egress_proxy.unwrap();
        assert_eq!(p.tls_server_name().as_deref(), Some("192.0.2.7"));
        for none in [r#"{}"#, r#"{"egressProxy": null}"#] {
            let body = format!(r#"{{"transport": {{"tap": "t"}}, "network": {none}}}"#);
            assert!(create(&body).unwrap().egress.egress_proxy.is_none());
        }
        // PUT replaces: omitted means direct again.
        let u = parse_network_update(br#"{"egressProxy": {"address": "192.0.2.7:1080"}}"#, &[])
            .unwrap();
        assert!(u.egress.egress_proxy.is_some());
        let u = parse_network_update(br#"{}"#, &[]).unwrap();
        assert!(u.egress.egress_proxy.is_none());
    }

    #[test]
    fn a_bad_egress_proxy_is_refused_naming_the_field_never_the_secret() {
        for (proxy, field, says) in [
            (
                r#""192.0.2.7:1080""#,
                "network.egressProxy",
                "invalid egressProxy",
            ),
            (
                r#"{"username": "a"}"#,
                "network.egressProxy.address",
                "address is missing",
            ),
            (
                r#"{"address": 1080}"#,
                "network.egressProxy.address",
                "give a string",
            ),
            (
                r#"{"address": "proxy"}"#,
                "network.egressProxy.address",
                "invalid egress proxy address proxy",
            ),
            (
                r#"{"address": "169.254.169.254:80"}"#,
                "network.egressProxy.address",
                "always-denied internal ranges",
            ),
            (
                r#"{"address": "192.0.2.7:1080", "password": "pw-123"}"#,
                "network.egressProxy.password",
                "a password needs a username",
            ),
            (
                r#"{"address": "192.0.2.7:1080", "username": "a", "password": 123123}"#,
                "network.egressProxy.password",
                "give a string",
            ),
            (
                r#"{"address": "192.0.2.7:1080", "tls": {"caCert": "pw-123"}}"#,
                "network.egressProxy.tls.caCert",
                "no CERTIFICATE block",
            ),
            (
                r#"{"address": "192.0.2.7:1080", "tls": {"serverName": "a b"}}"#,
                "network.egressProxy.tls.serverName",
                "invalid egress proxy TLS server name a b",
            ),
            (
                r#"{"address": "192.0.2.7:1080", "tls": "yes"}"#,
                "network.egressProxy.tls",
                "give true, false",
            ),
            (
                r#"{"address": "192.0.2.7:1080", "tls": {"ca": "x"}}"#,
                "network.egressProxy.tls",
                "unknown field \"ca\"",
            ),
            (
                r#"{"address": "192.0.2.7:1080", "passwd": "pw-123"}"#,
                "network.egressProxy",
                "unknown field \"passwd\"",
            ),
        ] {
            let (f, m) = refusal(&format!(
                r#"{{"transport": {{"tap": "t"}}, "network": {{"egressProxy": {proxy}}}}}"#
            ));
            assert_eq!(f, Some(field), "{proxy}: {m}");
            assert!(m.contains(says), "{proxy}: {m}");
            assert!(!m.contains("pw-123") && !m.contains("123123"), "{m}");
        }
        // The operator's hole opens an internal proxy address.
        let c = parse_create(
            br#"{"transport": {"tap": "t"}, "network": {"egressProxy": {"address": "127.0.0.1:1080"}}}"#,
            &["127.0.0.1/32".to_string()],
        );
        assert!(c.unwrap().egress.egress_proxy.is_some());
        let e = parse_network_update(br#"{"egressProxy": {"address": "10.1.2.3:1080"}}"#, &[])
            .unwrap_err();
        assert_eq!(e.field, Some("network.egressProxy.address"));
    }
}
