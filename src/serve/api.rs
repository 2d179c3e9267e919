//! The control API's requests, with E2B's field names. Bodies are parsed
//! here, in one place, into validated types (`CreateSandbox`,
//! `NetworkUpdate`); the handlers only ever see those. Every rejection is an
//! `ApiError` whose message names the field and the value.

use std::path::PathBuf;

use hyper::StatusCode;
use ingress::{HostMask, SandboxId};
use inject::HeaderRules;
use netstack::{EgressPolicy, PolicyError, PolicySpec};
use serde::Deserialize;
use vmm_glue::{Tap, TransportSpec};

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

/// The egress half of a sandbox's network, as asked and as built.
#[derive(Debug, Clone)]
pub struct Egress {
    pub allow_internet_access: bool,
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNetwork {
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    // A JSON value, so that a bad rule is named whatever its shape.
    rules: Option<serde_json::Value>,
    allow_public_traffic: Option<bool>,
    mask_request_host: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNetworkUpdate {
    allow_internet_access: Option<bool>,
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    rules: Option<serde_json::Value>,
    // Named so that the refusal can say why, rather than "unknown field".
    allow_public_traffic: Option<serde_json::Value>,
    mask_request_host: Option<serde_json::Value>,
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
        raw.allow_internet_access.unwrap_or(true),
        network.allow_out.unwrap_or_default(),
        network.deny_out.unwrap_or_default(),
        network.rules,
        allow_internal,
    )?;
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
        },
    })
}

/// Parse a `PUT /sandboxes/{id}/network` body. As E2B's: it replaces the
/// egress rules whole; an omitted list is cleared.
pub fn parse_network_update(body: &[u8], allow_internal: &[String]) -> Result<NetworkUpdate> {
    let raw: RawNetworkUpdate = json(body)?;
    if raw.allow_public_traffic.is_some() {
        return Err(ApiError::bad(
            "allowPublicTraffic",
            "allowPublicTraffic is fixed when the sandbox is created",
        ));
    }
    if raw.mask_request_host.is_some() {
        return Err(ApiError::bad(
            "maskRequestHost",
            "maskRequestHost is fixed when the sandbox is created",
        ));
    }
    Ok(NetworkUpdate {
        egress: egress(
            raw.allow_internet_access.unwrap_or(true),
            raw.allow_out.unwrap_or_default(),
            raw.deny_out.unwrap_or_default(),
            raw.rules,
            allow_internal,
        )?,
    })
}

fn egress(
    allow_internet_access: bool,
    allow_out: Vec<String>,
    deny_out: Vec<String>,
    rules: Option<serde_json::Value>,
    allow_internal: &[String],
) -> Result<Egress> {
    let spec = PolicySpec {
        allow_out,
        deny_out,
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
    let rules = match rules {
        None | Some(serde_json::Value::Null) => HeaderRules::default(),
        Some(v) => HeaderRules::from_json(&v)
            .and_then(|r| r.check_allowed(&policy).map(|()| r))
            .map_err(|e| ApiError::bad("network.rules", e.to_string()))?,
    };
    let policy = policy.with_intercepts(rules.keys());
    Ok(Egress {
        allow_internet_access,
        allow_out: spec.allow_out,
        deny_out: spec.deny_out,
        rules,
        policy,
    })
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

    #[test]
    fn rules_in_e2b_shape_carry_their_keys_into_the_policy_and_bad_ones_are_named() {
        let network = |rules: &str| {
            format!(
                r#"{{"transport": {{"tap": "t"}}, "network": {{"allowOut": ["*.example.com"],
                   "denyOut": ["ALL_TRAFFIC"], "rules": {rules}}}}}"#
            )
        };
        let c = create(&network(
            r#"{"API.example.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.K}"}}}]}"#,
        ))
        .unwrap();
        assert_eq!(
            c.egress
                .policy
                .intercept_for("api.example.com")
                .map(|k| k.to_string()),
            Some("api.example.com".into())
        );
        assert_eq!(c.egress.rules.secrets().collect::<Vec<_>>(), ["K"]);
        let none = create(&network("null")).unwrap();
        assert!(none.egress.rules.is_empty());
        assert!(none.egress.policy.intercepts().iter().next().is_none());
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
                r#"["a.example.com"]"#.to_string(),
                "rules must be an object",
            ),
        ];
        for (rules, want) in rows {
            let (field, message) = refusal(&network(&rules));
            assert_eq!(field, Some("network.rules"), "{message}");
            assert!(message.contains(want), "{rules}: {message}");
        }
        let u = parse_network_update(
            br#"{"allowOut": ["a.example.com"], "denyOut": ["ALL_TRAFFIC"],
                 "rules": {"a.example.com": [{"transform": {"headers": {"X": "1"}}}]}}"#,
            &[],
        )
        .unwrap();
        assert!(u.egress.policy.intercept_for("a.example.com").is_some());
    }
}
