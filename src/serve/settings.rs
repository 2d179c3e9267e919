//! `slipway serve`'s settings, validated in one place from a `FileConfig`
//! into what the process runs on. SIGHUP validates them again;
//! `Settings::needs_restart` names what a reload cannot change in a running
//! process.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ingress::token::TokenDigest;
use netstack::{EgressPolicy, PolicySpec, StackConfig};

use super::config::{ConfigError, FileConfig, GatewayFile, Result, SandboxFile};

/// The settings, validated: what the process runs on.
#[derive(Clone)]
pub struct Settings {
    /// What they were made from (for `--print-config` and reload diffs).
    pub file: FileConfig,
    pub log: String,
    pub control: ControlSettings,
    pub gateway: Option<GatewaySettings>,
    pub drain_timeout: Duration,
    pub metrics: Option<SocketAddr>,
    pub worker_threads: usize,
    pub sandbox: SandboxDefaults,
    pub confine: ConfineSettings,
    /// `[cluster]`: this node's part in a cluster store, when `store` is set.
    pub cluster: Option<crate::cluster::config::NodeCluster>,
}

#[derive(Clone)]
pub struct ConfineSettings {
    pub enabled: bool,
    pub socket_dirs: Vec<PathBuf>,
    pub tap_fd: bool,
}

#[derive(Clone)]
pub struct ControlSettings {
    pub socket: PathBuf,
    pub mode: u32,
    pub token: Option<TokenDigest>,
}

#[derive(Clone)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub domain: ingress::Domain,
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    pub limits: ingress::Limits,
}

/// What every new sandbox starts from.
#[derive(Clone)]
pub struct SandboxDefaults {
    pub max_sandboxes: usize,
    /// `random_seed` is drawn anew per sandbox.
    pub stack: StackConfig,
    /// Operator holes in the always-denied internal ranges.
    pub allow_internal: Vec<String>,
    /// Connections into each guest at once from the gateway.
    pub max_inbound: usize,
}

impl FileConfig {
    /// Check every value and build what the process runs on.
    pub fn validate(&self) -> Result<Settings> {
        let control = ControlSettings {
            socket: absolute("control.socket", &self.control.socket)?,
            mode: u32::from_str_radix(self.control.mode.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    value(
                        "control.mode",
                        &self.control.mode,
                        "give octal permissions such as 0600",
                    )
                })?,
            token: self.control_token()?,
        };
        let gateway = self.gateway.validate()?;
        let drain_timeout = self.gateway.drain_timeout()?;
        Ok(Settings {
            file: self.clone(),
            log: self.log.clone(),
            confine: ConfineSettings {
                enabled: self.confine.enabled,
                socket_dirs: self
                    .confine
                    .socket_dirs
                    .iter()
                    .map(|d| absolute("confine.socket_dirs", d))
                    .collect::<Result<_>>()?,
                tap_fd: self.confine.tap_fd,
            },
            control,
            gateway,
            drain_timeout,
            metrics: listen_addr("metrics.listen", &self.metrics.listen)?,
            worker_threads: self.runtime.worker_threads as usize,
            sandbox: self.sandbox.validate()?,
            cluster: self.cluster.validate()?,
        })
        .and_then(|s| {
            for (name, source) in &self.secrets {
                if !inject::rules::valid_secret_name(name) {
                    let why = "give 1 to 128 of letters, digits, '_', '-' or '.'";
                    return Err(value("secrets", &inject::rules::echo(name), why));
                }
                if !source.starts_with('@') && !source.starts_with("env:") {
                    // Not echoed: it may be the value itself.
                    let why = "give \"@/path/to/file\" or \"env:VAR\", never the value";
                    return Err(value("secrets", name, why));
                }
            }
            Ok(s)
        })
    }

    fn control_token(&self) -> Result<Option<TokenDigest>> {
        let token = match (&self.control.token, &self.control.token_file) {
            (Some(_), Some(_)) => {
                return Err(value(
                    "control.token",
                    "…",
                    "give token or token_file, not both",
                ))
            }
            (Some(t), None) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
            (None, None) => return Ok(None),
        };
        if token.is_empty() {
            return Err(value("control.token", "", "the token is empty"));
        }
        Ok(Some(TokenDigest::of(token.as_bytes())))
    }
}

impl GatewayFile {
    /// The public gateway's settings; `None` when `listen` is `off`.
    /// `slipway edge` takes the same `[gateway]` keys.
    pub fn validate(&self) -> Result<Option<GatewaySettings>> {
        let limits = ingress::Limits {
            max_connections: positive("gateway.max_connections", self.max_connections)?,
            max_connections_per_client: positive(
                "gateway.max_connections_per_client",
                self.max_connections_per_client,
            )?,
            header_read_timeout: seconds("gateway.header_timeout", self.header_timeout)?,
            idle_timeout: seconds("gateway.idle_timeout", self.idle_timeout)?,
            ..ingress::Limits::default()
        };
        Ok(match listen_addr("gateway.listen", &self.listen)? {
            None => None,
            Some(listen) => Some(GatewaySettings {
                listen,
                domain: ingress::Domain::parse(&self.domain)
                    .map_err(|e| value("gateway.domain", &self.domain, &e.to_string()))?,
                tls: match (&self.tls_cert, &self.tls_key) {
                    (Some(cert), Some(key)) => {
                        Some(ingress::tls::server_config(cert, key).map_err(|e| {
                            value(
                                "gateway.tls_cert",
                                &cert.display().to_string(),
                                &e.to_string(),
                            )
                        })?)
                    }
                    (None, None) => None,
                    _ => {
                        return Err(value(
                            "gateway.tls_cert",
                            "",
                            "give both tls_cert and tls_key, or neither",
                        ))
                    }
                },
                limits,
            }),
        })
    }

    /// On SIGTERM, how long requests in flight may take to finish.
    pub fn drain_timeout(&self) -> Result<Duration> {
        Duration::try_from_secs_f64(self.drain_timeout).map_err(|_| {
            value(
                "gateway.drain_timeout",
                &self.drain_timeout.to_string(),
                "give a number of seconds, 0 or more",
            )
        })
    }
}

impl SandboxFile {
    fn validate(&self) -> Result<SandboxDefaults> {
        let mut stack = StackConfig {
            mtu: in_range("sandbox.mtu", self.mtu, 1280, 65520)?,
            tcp_buffer: in_range("sandbox.tcp_buffer", self.tcp_buffer, 4096, 16 << 20)?,
            connect_timeout: seconds("sandbox.connect_timeout", self.connect_timeout)?,
            udp_idle_timeout: seconds("sandbox.udp_timeout", self.udp_timeout)?,
            ..StackConfig::default()
        };
        stack.caps.max_tcp_flows = positive("sandbox.max_flows", self.max_flows)?;
        stack.caps.max_half_open = positive("sandbox.max_half_open", self.max_half_open)?;
        stack.caps.max_datagram_flows = positive("sandbox.max_udp_flows", self.max_udp_flows)?;
        stack.caps.max_buffer_bytes = positive("sandbox.max_buffer_bytes", self.max_buffer_bytes)?;
        let max_inbound = in_range("sandbox.max_inbound", self.max_inbound, 1, 65536)?;
        // The gateway keeps a few idle connections into the guest besides the
        // ones that serve requests (which its own cap counts).
        stack.caps.max_inbound = max_inbound + ingress::pool::MAX_IDLE;
        stack.dns_upstream = if self.dns_upstream.is_empty() {
            vmm_glue::netns::host_resolver()
        } else {
            Some(upstream(&self.dns_upstream)?)
        };
        stack.host_loopback_aliases = self
            .map_host_loopback
            .iter()
            .map(|a| {
                a.parse::<IpAddr>()
                    .map_err(|_| value("sandbox.map_host_loopback", a, "give an IP address"))
            })
            .collect::<Result<_>>()?;
        let holes = PolicySpec {
            allow_internal: self.allow_internal.clone(),
            ..PolicySpec::new()
        };
        EgressPolicy::from_spec(&holes)
            .map_err(|e| value("sandbox.allow_internal", "", &e.to_string()))?;
        for ca in &self.upstream_ca {
            absolute("sandbox.upstream_ca", ca)?;
        }
        Ok(SandboxDefaults {
            max_sandboxes: positive("sandbox.max_sandboxes", self.max_sandboxes)?,
            stack,
            allow_internal: self.allow_internal.clone(),
            max_inbound,
        })
    }
}

impl Settings {
    /// Keys whose new value only a restart can apply (the sockets already
    /// bound, the runtime already built, the gateway already made).
    pub fn needs_restart(&self, new: &Settings) -> Vec<&'static str> {
        let (a, b) = (&self.file, &new.file);
        let mut keys = Vec::new();
        if a.control.socket != b.control.socket {
            keys.push("control.socket");
        }
        if a.control.mode != b.control.mode {
            keys.push("control.mode");
        }
        let gateway_but_drain = |g: &GatewayFile| GatewayFile {
            drain_timeout: 0.0,
            ..g.clone()
        };
        if gateway_but_drain(&a.gateway) != gateway_but_drain(&b.gateway) {
            keys.push("gateway");
        }
        if a.metrics != b.metrics {
            keys.push("metrics.listen");
        }
        if a.runtime != b.runtime {
            keys.push("runtime.worker_threads");
        }
        if a.confine != b.confine {
            keys.push("confine");
        }
        // Files read before confinement; the API changes secrets live.
        if a.sandbox.upstream_ca != b.sandbox.upstream_ca {
            keys.push("sandbox.upstream_ca");
        }
        if a.secrets != b.secrets {
            keys.push("secrets");
        }
        if a.cluster != b.cluster {
            keys.push("cluster");
        }
        keys
    }
}

pub(crate) fn value(key: &'static str, v: &str, expected: &str) -> ConfigError {
    ConfigError::Value {
        key,
        value: v.to_string(),
        expected: expected.to_string(),
    }
}

pub(crate) fn absolute(key: &'static str, p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Err(value(
            key,
            &p.display().to_string(),
            "give an absolute path",
        ))
    }
}

pub(crate) fn positive(key: &'static str, n: u64) -> Result<usize> {
    if n == 0 {
        return Err(value(key, "0", "give a whole number above 0"));
    }
    usize::try_from(n).map_err(|_| value(key, &n.to_string(), "too large"))
}

pub(crate) fn in_range(key: &'static str, n: u64, lo: u64, hi: u64) -> Result<usize> {
    if !(lo..=hi).contains(&n) {
        return Err(value(key, &n.to_string(), &format!("give {lo} to {hi}")));
    }
    Ok(n as usize)
}

pub(crate) fn seconds(key: &'static str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| value(key, &v.to_string(), "give a positive number of seconds"))
}

/// `off` (or empty) disables a listener.
pub(crate) fn listen_addr(key: &'static str, s: &str) -> Result<Option<SocketAddr>> {
    match s.trim() {
        "" | "off" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .map_err(|_| value(key, s, "give ADDR:PORT, e.g. 127.0.0.1:8080, or off")),
    }
}

fn upstream(s: &str) -> Result<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| value("sandbox.dns_upstream", s, "give ADDR or ADDR:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::config::load;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Load `text` as a config file: each call its own directory (tests run
    /// in parallel), removed afterwards.
    fn load_text(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<FileConfig> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("slipway-cfg-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("slipway.toml");
        std::fs::write(&path, text).unwrap();
        let out = load(Some(&path), env);
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    #[test]
    fn defaults_are_valid_and_private() {
        let s = load(None, &no_env).unwrap().validate().unwrap();
        assert_eq!(s.control.mode, 0o600);
        assert!(s.control.socket.ends_with("slipway/control.sock"));
        assert_eq!(s.gateway.unwrap().listen.ip().to_string(), "127.0.0.1");
        assert!(s.metrics.unwrap().ip().is_loopback());
        assert!(s.control.token.is_none());
    }

    #[test]
    fn the_environment_beats_the_file() {
        let env = |var: &str| match var {
            "SLIPWAY_SANDBOX_MAX_FLOWS" => Some("7".to_string()),
            "SLIPWAY_SANDBOX_ALLOW_INTERNAL" => Some("10.1.0.0/16, 10.2.0.1".to_string()),
            "SLIPWAY_GATEWAY_LISTEN" => Some("off".to_string()),
            _ => None,
        };
        let f = load_text(
            "[sandbox]\nmax_flows = 3\nmax_udp_flows = 9\n[gateway]\ndrain_timeout = 5\n",
            &env,
        )
        .unwrap();
        let s = f.validate().unwrap();
        assert_eq!(s.sandbox.stack.caps.max_tcp_flows, 7);
        assert_eq!(s.sandbox.stack.caps.max_datagram_flows, 9);
        assert_eq!(s.sandbox.allow_internal, ["10.1.0.0/16", "10.2.0.1"]);
        assert!(s.gateway.is_none());
        assert_eq!(s.drain_timeout, Duration::from_secs(5));
    }

    #[test]
    fn typos_and_bad_values_name_the_key() {
        let err = load_text("[sandbox]\nmax_flow = 3\n", &no_env).unwrap_err();
        assert!(err.to_string().contains("max_flow"), "{err}");
        let env = |var: &str| (var == "SLIPWAY_SANDBOX_MTU").then(|| "big".to_string());
        let err = load(None, &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid SLIPWAY_SANDBOX_MTU=\"big\": give a whole number"
        );
        let bad = |text: &str| {
            load_text(text, &no_env)
                .unwrap()
                .validate()
                .err()
                .unwrap()
                .to_string()
        };
        assert!(bad("[sandbox]\nmtu = 100\n").contains("sandbox.mtu"));
        assert!(bad("[control]\nmode = \"rw\"\n").contains("control.mode"));
        assert!(bad("[control]\nsocket = \"rel.sock\"\n").contains("absolute"));
        assert!(
            bad("[sandbox]\nallow_internal = [\"nope\"]\n").contains("invalid internal CIDR nope")
        );
        assert!(bad("[metrics]\nlisten = \"localhost\"\n").contains("metrics.listen"));
    }

    #[test]
    fn the_per_client_connection_cap_is_a_gateway_key() {
        let limits = |s: Settings| s.gateway.unwrap().limits;
        let s = load(None, &no_env).unwrap().validate().unwrap();
        assert_eq!(limits(s).max_connections_per_client, 256);
        let f = load_text("[gateway]\nmax_connections_per_client = 8\n", &no_env).unwrap();
        assert_eq!(limits(f.validate().unwrap()).max_connections_per_client, 8);
        let env = |var: &str| {
            (var == "SLIPWAY_GATEWAY_MAX_CONNECTIONS_PER_CLIENT").then(|| "9".to_string())
        };
        let s = load(None, &env).unwrap().validate().unwrap();
        assert_eq!(limits(s).max_connections_per_client, 9);

        // 0, text and a negative number are refused, naming the key.
        let err = load_text("[gateway]\nmax_connections_per_client = 0\n", &no_env)
            .unwrap()
            .validate()
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "invalid gateway.max_connections_per_client \"0\": give a whole number above 0"
        );
        let err = load_text(
            "[gateway]\nmax_connections_per_client = \"lots\"\n",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.ends_with(
                "invalid type: string \"lots\", expected u64 in `gateway.max_connections_per_client`"
            ),
            "{err}"
        );
        for bad in ["lots", "0", "-1"] {
            let env = |var: &str| {
                (var == "SLIPWAY_GATEWAY_MAX_CONNECTIONS_PER_CLIENT").then(|| bad.to_string())
            };
            let err = load(None, &env).and_then(|f| f.validate()).err();
            let err = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                err.contains("MAX_CONNECTIONS_PER_CLIENT")
                    || err.contains("max_connections_per_client"),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn only_some_keys_need_a_restart() {
        let a = load(None, &no_env).unwrap();
        let mut b = a.clone();
        b.sandbox.max_flows = 3;
        b.gateway.drain_timeout = 1.0;
        b.control.token = Some("t".into());
        let (sa, sb) = (a.validate().unwrap(), b.validate().unwrap());
        assert!(sa.needs_restart(&sb).is_empty());
        b.gateway.listen = "127.0.0.1:1".into();
        b.metrics.listen = "off".into();
        assert_eq!(
            sa.needs_restart(&b.validate().unwrap()),
            ["gateway", "metrics.listen"]
        );
    }
}
