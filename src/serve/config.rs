//! What `slipway serve`'s settings file says: built-in defaults, then the
//! TOML file, then `SLIPWAY_<SECTION>_<KEY>` environment variables, merged
//! into a `FileConfig`. `settings` validates it into what the process runs on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use netstack::StackConfig;
use serde::{Deserialize, Serialize};

/// A settings problem: printed as one line, exit code 2 at start, a logged
/// warning (the old settings stay) on reload.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid {var}={value:?}: {expected}")]
    Env {
        var: String,
        value: String,
        expected: &'static str,
    },
    #[error("invalid {key} {value:?}: {expected}")]
    Value {
        key: &'static str,
        value: String,
        expected: String,
    },
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// The file's shape; every key is optional (the defaults fill in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// tracing filter, e.g. `info` or `slipway::flow=info,warn`.
    pub log: String,
    pub control: ControlFile,
    pub gateway: GatewayFile,
    pub metrics: MetricsFile,
    pub runtime: RuntimeFile,
    pub sandbox: SandboxFile,
    pub confine: ConfineFile,
    /// Many hosts: this node's lease, records and tunnel listener in the
    /// cluster store (off while `store` is empty).
    pub cluster: crate::cluster::config::NodeClusterFile,
    /// Secrets for header rules, by name: `"@/path/to/file"` or
    /// `"env:VAR"`, never the value itself. Read once at start; the
    /// control API's `PUT /secrets/{name}` changes them live.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

/// Confinement of the serve process itself once its sockets are bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfineFile {
    /// seccomp allowlist, no_new_privs, capabilities, Landlock; false: none.
    pub enabled: bool,
    /// Directories (and below) where the API may place VMM sockets
    /// (qemuStream, qemuDgram, vhostUser).
    pub socket_dirs: Vec<PathBuf>,
    /// Allow `tapFd`: needs pidfd_getfd on the caller, which Landlock
    /// forbids, so Landlock is off then. On by default so the API keeps
    /// every transport it had; false buys Landlock.
    pub tap_fd: bool,
}

impl Default for ConfineFile {
    fn default() -> Self {
        Self {
            enabled: true,
            socket_dirs: vec![PathBuf::from("/tmp"), PathBuf::from("/run")],
            tap_fd: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlFile {
    pub socket: PathBuf,
    /// Octal permissions of the socket file.
    pub mode: String,
    /// Bearer token every request must carry (`Authorization: Bearer …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the bearer token (first line), instead of `token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayFile {
    /// ADDR:PORT, or `off`.
    pub listen: String,
    pub domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    pub max_connections: u64,
    /// Connections at once from one client address (IPv6: one /64).
    pub max_connections_per_client: u64,
    pub header_timeout: f64,
    pub idle_timeout: f64,
    /// On SIGTERM, how long in-flight requests may take to finish.
    pub drain_timeout: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsFile {
    /// ADDR:PORT, or `off`.
    pub listen: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeFile {
    /// Threads that run the sandboxes' stacks and the gateway; 0: one per CPU.
    pub worker_threads: u64,
}

/// Defaults for every sandbox created from now on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxFile {
    pub max_sandboxes: u64,
    pub mtu: u64,
    pub tcp_buffer: u64,
    pub connect_timeout: f64,
    pub udp_timeout: f64,
    pub max_flows: u64,
    pub max_half_open: u64,
    pub max_udp_flows: u64,
    pub max_buffer_bytes: u64,
    pub max_inbound: u64,
    /// ADDR or ADDR:PORT; empty: the first nameserver of /etc/resolv.conf.
    pub dns_upstream: String,
    pub allow_internal: Vec<String>,
    pub map_host_loopback: Vec<String>,
    /// PEM bundles of CAs trusted for the servers behind header rules,
    /// besides Mozilla's roots. Read once at start.
    pub upstream_ca: Vec<PathBuf>,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            log: "info".into(),
            control: ControlFile::default(),
            gateway: GatewayFile::default(),
            metrics: MetricsFile::default(),
            runtime: RuntimeFile::default(),
            sandbox: SandboxFile::default(),
            confine: ConfineFile::default(),
            cluster: Default::default(),
            secrets: BTreeMap::new(),
        }
    }
}

impl Default for ControlFile {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            mode: "0600".into(),
            token: None,
            token_file: None,
        }
    }
}

impl Default for GatewayFile {
    fn default() -> Self {
        let limits = ingress::Limits::default();
        Self {
            listen: "127.0.0.1:8080".into(),
            domain: "localhost".into(),
            tls_cert: None,
            tls_key: None,
            max_connections: limits.max_connections as u64,
            max_connections_per_client: limits.max_connections_per_client as u64,
            header_timeout: limits.header_read_timeout.as_secs_f64(),
            idle_timeout: limits.idle_timeout.as_secs_f64(),
            drain_timeout: 10.0,
        }
    }
}

impl Default for MetricsFile {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl Default for SandboxFile {
    fn default() -> Self {
        let stack = StackConfig::default();
        Self {
            max_sandboxes: 4096,
            mtu: stack.mtu as u64,
            tcp_buffer: stack.tcp_buffer as u64,
            connect_timeout: stack.connect_timeout.as_secs_f64(),
            udp_timeout: stack.udp_idle_timeout.as_secs_f64(),
            max_flows: stack.caps.max_tcp_flows as u64,
            max_half_open: stack.caps.max_half_open as u64,
            max_udp_flows: stack.caps.max_datagram_flows as u64,
            max_buffer_bytes: stack.caps.max_buffer_bytes as u64,
            max_inbound: 256,
            dns_upstream: String::new(),
            allow_internal: Vec::new(),
            map_host_loopback: Vec::new(),
            upstream_ca: Vec::new(),
        }
    }
}

/// `$XDG_RUNTIME_DIR/slipway/control.sock`, else `/run/slipway/control.sock`.
fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("slipway/control.sock"),
        _ => PathBuf::from("/run/slipway/control.sock"),
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Str,
    Int,
    Float,
    /// Comma-separated.
    List,
    /// true or false.
    Bool,
}

/// Every key an environment variable can set: `SLIPWAY_<SECTION>_<KEY>`
/// (`SLIPWAY_LOG` for the top-level `log`).
pub(crate) const ENV_KEYS: &[(&str, &str, Kind)] = &[
    ("", "log", Kind::Str),
    ("control", "socket", Kind::Str),
    ("control", "mode", Kind::Str),
    ("control", "token", Kind::Str),
    ("control", "token_file", Kind::Str),
    ("gateway", "listen", Kind::Str),
    ("gateway", "domain", Kind::Str),
    ("gateway", "tls_cert", Kind::Str),
    ("gateway", "tls_key", Kind::Str),
    ("gateway", "max_connections", Kind::Int),
    ("gateway", "max_connections_per_client", Kind::Int),
    ("gateway", "header_timeout", Kind::Float),
    ("gateway", "idle_timeout", Kind::Float),
    ("gateway", "drain_timeout", Kind::Float),
    ("metrics", "listen", Kind::Str),
    ("runtime", "worker_threads", Kind::Int),
    ("sandbox", "max_sandboxes", Kind::Int),
    ("sandbox", "mtu", Kind::Int),
    ("sandbox", "tcp_buffer", Kind::Int),
    ("sandbox", "connect_timeout", Kind::Float),
    ("sandbox", "udp_timeout", Kind::Float),
    ("sandbox", "max_flows", Kind::Int),
    ("sandbox", "max_half_open", Kind::Int),
    ("sandbox", "max_udp_flows", Kind::Int),
    ("sandbox", "max_buffer_bytes", Kind::Int),
    ("sandbox", "max_inbound", Kind::Int),
    ("sandbox", "dns_upstream", Kind::Str),
    ("sandbox", "allow_internal", Kind::List),
    ("sandbox", "map_host_loopback", Kind::List),
    ("sandbox", "upstream_ca", Kind::List),
    ("confine", "enabled", Kind::Bool),
    ("confine", "socket_dirs", Kind::List),
    ("confine", "tap_fd", Kind::Bool),
    ("cluster", "store", Kind::List),
    ("cluster", "node", Kind::Str),
    ("cluster", "advertise", Kind::Str),
    ("cluster", "listen", Kind::Str),
    ("cluster", "ca", Kind::Str),
    ("cluster", "cert", Kind::Str),
    ("cluster", "key", Kind::Str),
    ("cluster", "lease_ttl", Kind::Int),
];

pub fn env_var_name(section: &str, key: &str) -> String {
    if section.is_empty() {
        format!("SLIPWAY_{}", key.to_ascii_uppercase())
    } else {
        format!(
            "SLIPWAY_{}_{}",
            section.to_ascii_uppercase(),
            key.to_ascii_uppercase()
        )
    }
}

/// The file (if any) with the environment's overrides on top.
pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<FileConfig> {
    decode(path, merge(path, env, ENV_KEYS)?)
}

/// A settings table as `T` (`slipway serve`'s `FileConfig`, `slipway
/// edge`'s file), the error naming the file (or the environment) and key.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    table: toml::Table,
) -> Result<T> {
    let origin = path
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("environment"));
    // Integers where floats are expected (`drain_timeout = 5`) are fine.
    let table = widen_ints(table);
    toml::Value::Table(table)
        .try_into::<T>()
        .map_err(|e| ConfigError::Syntax {
            path: origin,
            // One line that names the key: "… expected u64 in `gateway.max_connections`".
            message: e.to_string().trim_end().replace('\n', " "),
        })
}

/// The file's table (if any) with the environment variables of `keys` on top.
pub(crate) fn merge(
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    keys: &[(&str, &str, Kind)],
) -> Result<toml::Table> {
    let mut table = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.message().to_string(),
                })?
        }
        None => toml::Table::new(),
    };
    for &(section, key, kind) in keys {
        let var = env_var_name(section, key);
        let Some(raw) = env(&var) else { continue };
        let bad = |expected| ConfigError::Env {
            var: var.clone(),
            value: raw.clone(),
            expected,
        };
        let value = match kind {
            Kind::Str => toml::Value::String(raw.clone()),
            Kind::Int => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| bad("give a whole number"))?)
            }
            Kind::Float => toml::Value::Float(
                raw.trim()
                    .parse()
                    .map_err(|_| bad("give a number of seconds"))?,
            ),
            Kind::Bool => {
                toml::Value::Boolean(raw.trim().parse().map_err(|_| bad("give true or false"))?)
            }
            Kind::List => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
        };
        let slot = if section.is_empty() {
            &mut table
        } else {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Value {
                        key: "config",
                        value: section.to_string(),
                        expected: format!("[{section}] must be a table"),
                    })
                }
            }
        };
        slot.insert(key.to_string(), value);
    }
    Ok(table)
}

/// Keys whose value is a float: an integer given there is taken as one.
const FLOAT_KEYS: &[&str] = &[
    "header_timeout",
    "idle_timeout",
    "drain_timeout",
    "connect_timeout",
    "udp_timeout",
    "stale_after",
];

fn widen_ints(mut table: toml::Table) -> toml::Table {
    for (_, section) in table.iter_mut() {
        if let toml::Value::Table(t) = section {
            for (k, v) in t.iter_mut() {
                if let (true, toml::Value::Integer(i)) = (FLOAT_KEYS.contains(&k.as_str()), &*v) {
                    *v = toml::Value::Float(*i as f64);
                }
            }
        }
    }
    table
}
