//! Command-line flags shared by `run` and `attach`, and how they become a
//! stack configuration and an egress policy. Bad input is a one-line error.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use netstack::{EgressPolicy, EgressProxy, PolicySpec, ProxyError, ProxySpec, Secret, StackConfig};

#[derive(Parser, Debug)]
#[command(
    name = "slipway",
    version,
    about = "A userspace TCP/IP stack per sandbox, with an egress policy checked on every new flow",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run CMD in a new network namespace whose only link is served by slipway.
    ///
    /// Inside: tap0 with 10.0.2.15/24 via 10.0.2.2, fd00::15/64, DNS at 10.0.2.3
    /// (and fd00::3) in /etc/resolv.conf. The exit status is CMD's.
    Run {
        #[command(flatten)]
        net: NetOpts,
        #[command(flatten)]
        rules: crate::rules::RuleOpts,
        #[command(flatten)]
        ingress: IngressOpts,
        #[command(flatten)]
        confine: ConfineOpts,
        /// The command and its arguments: everything after `--`, or from the
        /// first word that is not a flag on. A mistyped flag before it is an
        /// error, never the command.
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Serve one VMM's link: a tap device (the kind Firecracker uses), QEMU's
    /// `-netdev stream` or `-netdev dgram` socket, or a vhost-user-net socket.
    ///
    /// The sandbox outlives its VMM: when a stream or vhost-user connection
    /// ends, its flows are reset and the next connection gets the same
    /// address, lease and policy.
    Attach {
        #[command(flatten)]
        link: AttachLink,
        /// With --qemu-stream: connect to QEMU's listening socket (`server=on`)
        /// instead of listening for QEMU (`server=off`).
        #[arg(long, requires = "qemu_stream")]
        connect: bool,
        /// With --qemu-dgram: QEMU's own socket path (its `local.path`); learned
        /// from the first datagram when not given.
        #[arg(long, value_name = "PATH", requires = "qemu_dgram")]
        peer: Option<std::path::PathBuf>,
        #[command(flatten)]
        net: NetOpts,
        #[command(flatten)]
        rules: crate::rules::RuleOpts,
        #[command(flatten)]
        ingress: IngressOpts,
        #[command(flatten)]
        confine: ConfineOpts,
    },
    /// Serve many sandboxes in one process: a control API on a unix socket,
    /// the public URL gateway, Prometheus metrics.
    Serve(crate::serve::ServeArgs),
    /// The public URL gateway for many hosts: routes from the cluster store
    /// (etcd), requests through mTLS tunnels to the node holding the sandbox.
    Edge(crate::edge::EdgeArgs),
    /// Drive a running `slipway serve` through its control API.
    Ctl(crate::ctl::CtlArgs),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct AttachLink {
    /// Open (or create) the tap device NAME.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// Use the tap device open on inherited file descriptor N.
    #[arg(long = "tap-fd", value_name = "N")]
    pub tap_fd: Option<i32>,
    /// Serve QEMU's `-netdev stream` on the unix socket PATH (4-byte length per frame).
    #[arg(long = "qemu-stream", value_name = "PATH")]
    pub qemu_stream: Option<std::path::PathBuf>,
    /// Serve QEMU's `-netdev dgram` on the unix datagram socket PATH (its `remote.path`).
    #[arg(long = "qemu-dgram", value_name = "PATH")]
    pub qemu_dgram: Option<std::path::PathBuf>,
    /// Be a vhost-user-net backend on the unix socket PATH (QEMU `-netdev
    /// vhost-user`, cloud-hypervisor `--net vhost_user=true`).
    #[arg(long = "vhost-user", value_name = "PATH")]
    pub vhost_user: Option<std::path::PathBuf>,
}

impl AttachLink {
    /// The transport these flags ask for (clap lets one through at most).
    pub fn spec(
        self,
        connect: bool,
        peer: Option<PathBuf>,
    ) -> Result<vmm_glue::TransportSpec, UsageError> {
        use vmm_glue::TransportSpec;
        if let Some(name) = self.tap {
            Ok(TransportSpec::Tap(name))
        } else if let Some(fd) = self.tap_fd {
            Ok(TransportSpec::TapFd(fd))
        } else if let Some(path) = self.qemu_stream {
            Ok(TransportSpec::QemuStream { path, connect })
        } else if let Some(path) = self.qemu_dgram {
            Ok(TransportSpec::QemuDgram { path, peer })
        } else if let Some(path) = self.vhost_user {
            Ok(TransportSpec::VhostUser { path })
        } else {
            Err(UsageError(
                "give one of --tap, --tap-fd, --qemu-stream, --qemu-dgram, --vhost-user".into(),
            ))
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct NetOpts {
    /// Allow new flows to ADDR, CIDR or ALL_TRAFFIC; beats --deny-out whatever the prefix lengths.
    /// Repeatable, or comma-separated.
    #[arg(long = "allow-out", value_name = "CIDR", value_delimiter = ',')]
    pub allow_out: Vec<String>,
    /// Deny new flows to ADDR, CIDR or ALL_TRAFFIC (0.0.0.0/0 and ALL_TRAFFIC cover IPv6 too).
    /// Repeatable, or comma-separated.
    #[arg(long = "deny-out", value_name = "CIDR", value_delimiter = ',')]
    pub deny_out: Vec<String>,
    /// allowInternetAccess = false: deny all traffic except --allow-out.
    #[arg(long = "no-internet")]
    pub no_internet: bool,
    /// Operator only: open a hole in the always-denied internal ranges (127/8, 10/8, 169.254/16, ...).
    #[arg(long = "allow-internal", value_name = "CIDR", value_delimiter = ',')]
    pub allow_internal: Vec<String>,
    /// Operator only: connections to ADDR reach the host's loopback (127.0.0.1 or ::1), same port.
    #[arg(long = "map-host-loopback", value_name = "ADDR")]
    pub map_host_loopback: Vec<IpAddr>,
    /// Resolver that queries to the stack's DNS address go to [default: first nameserver in /etc/resolv.conf].
    #[arg(long = "dns-upstream", value_name = "ADDR[:PORT]")]
    pub dns_upstream: Option<String>,
    /// E2B's dnsServers: with names in --allow-out, DNS to ADDR:53 is answered by the
    /// filtering resolver [default: 8.8.8.8]; repeatable; `none` for no address.
    #[arg(long = "dns-server", value_name = "ADDR", value_delimiter = ',')]
    pub dns_server: Vec<String>,
    /// Send every allowed TCP connection through this SOCKS5 proxy:
    /// socks5://[user[:pass]@]host:port, or socks5+tls://… for TLS to it. The
    /// password may come from SLIPWAY_EGRESS_PROXY_PASSWORD instead (not in argv).
    #[arg(long = "egress-proxy", value_name = "URL")]
    pub egress_proxy: Option<String>,
    /// socks5+tls: the CA certificate(s), PEM, the proxy's certificate must
    /// chain to; replaces the built-in (Mozilla) roots.
    #[arg(
        long = "egress-proxy-ca",
        value_name = "FILE",
        requires = "egress_proxy"
    )]
    pub egress_proxy_ca: Option<PathBuf>,
    /// socks5+tls: the name the proxy's certificate is checked against, and the
    /// SNI [default: the URL's host].
    #[arg(
        long = "egress-proxy-server-name",
        value_name = "NAME",
        requires = "egress_proxy"
    )]
    pub egress_proxy_server_name: Option<String>,
    /// IP MTU of the sandbox link (1280..=65520).
    #[arg(long, default_value_t = 65520, value_parser = clap::value_parser!(u32).range(1280..=65520))]
    pub mtu: u32,
    /// Checksum and TCP segmentation offloads where the link carries a
    /// virtio-net header: run's tap, attach --tap, a --tap-fd attached with
    /// IFF_VNET_HDR, and --vhost-user (TSO offered to the VMM). `false`:
    /// plain frames, every one at most the MTU.
    #[arg(long = "offload", value_name = "BOOL", default_value_t = true,
          action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub offload: bool,
    /// Seconds a host connect may take before the guest gets "host unreachable".
    #[arg(long = "connect-timeout", value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds of silence after which a UDP or ICMP flow is forgotten.
    #[arg(long = "udp-timeout", value_name = "SECS", default_value_t = 60.0)]
    pub udp_timeout: f64,
    /// Cap: open TCP flows.
    #[arg(long = "max-flows", value_name = "N", default_value_t = 512)]
    pub max_flows: usize,
    /// Cap: TCP flows whose host connect is still in progress.
    #[arg(long = "max-half-open", value_name = "N", default_value_t = 128)]
    pub max_half_open: usize,
    /// Cap: UDP, DNS and ICMP echo flows together.
    #[arg(long = "max-udp-flows", value_name = "N", default_value_t = 512)]
    pub max_udp_flows: usize,
    /// Cap: bytes of TCP buffers, all flows and both directions together.
    #[arg(long = "max-buffer-bytes", value_name = "BYTES", default_value_t = 256 << 20)]
    pub max_buffer_bytes: usize,
    /// TCP buffer per flow and direction, in bytes.
    #[arg(long = "tcp-buffer", value_name = "BYTES", default_value_t = 256 << 10,
          value_parser = clap::value_parser!(u32).range(4096..=(16 << 20)))]
    pub tcp_buffer: u32,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `slipway::flow=info`.
    /// Flow decisions are logged at info under the target `slipway::flow`.
    /// [default: `warn` for run, `info` for attach; env SLIPWAY_LOG]
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ConfineOpts {
    /// Confine slipway itself after set-up: seccomp allowlist, no_new_privs,
    /// capabilities dropped, Landlock. `false` turns it all off (debugging).
    #[arg(long = "confine", value_name = "BOOL", default_value_t = true,
          action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub confine: bool,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Public URL gateway")]
pub struct IngressOpts {
    /// Serve the public URL gateway on ADDR (e.g. 127.0.0.1:8443):
    /// http(s)://<port>-<sandboxId>.<domain> reaches the guest's port.
    #[arg(long, value_name = "ADDR")]
    pub ingress: Option<SocketAddr>,
    /// This sandbox's id in public URLs (a-z, 0-9, inner '-') [default: random, printed].
    #[arg(long = "sandbox-id", value_name = "ID")]
    pub sandbox_id: Option<String>,
    /// The domain public URLs live under.
    #[arg(long, value_name = "DOMAIN", default_value = "localhost")]
    pub domain: String,
    /// allowPublicTraffic: with false, requests need the header e2b-traffic-access-token
    /// (the token is printed; SIGUSR1 rotates it).
    #[arg(long = "public-traffic", value_name = "BOOL", default_value_t = true,
          action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub public_traffic: bool,
    /// maskRequestHost: the Host the guest sees, ${PORT} standing for the port (e.g. localhost:${PORT}).
    #[arg(long = "mask-request-host", value_name = "HOST")]
    pub mask_request_host: Option<String>,
    /// TLS certificate chain (PEM) for the gateway, e.g. a wildcard for *.DOMAIN [default: plain HTTP].
    #[arg(long = "tls-cert", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) that goes with --tls-cert.
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// httpsPorts: the gateway speaks TLS to guest port N (the guest's certificate is not
    /// verified; SNI is the Host the guest sees). Repeatable, or comma-separated.
    #[arg(
        long = "https-port",
        value_name = "N",
        requires = "ingress",
        value_delimiter = ','
    )]
    pub https_port: Vec<u16>,
    /// Raw TCP forward from HOSTPORT on the gateway's address (127.0.0.1 without --ingress) to
    /// GUESTPORT; `:proxy-v2` first sends a PROXY protocol v2 header. Repeatable.
    #[arg(long = "forward", value_name = "tcp:HOSTPORT:GUESTPORT[:proxy-v2]")]
    pub forward: Vec<String>,
    /// Cap: requests in flight, upgrades and forwards into the guest at once (more get 429).
    #[arg(long = "max-inbound", value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_inbound: u32,
    /// Cap: public client connections at once (the gateway and all forwards).
    #[arg(long = "ingress-max-connections", value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Cap: public client connections at once from one client address (IPv6: one /64);
    /// over it a new connection gets 429 (plain HTTP) or is closed.
    // A negative count is a bad value of this flag, not an unknown flag `-3`.
    #[arg(long = "ingress-max-connections-per-client", value_name = "N", default_value_t = 256,
          allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_client: u32,
    /// Seconds a client may take to send a request's headers.
    #[arg(
        long = "ingress-header-timeout",
        value_name = "SECS",
        default_value_t = 10.0
    )]
    pub header_timeout: f64,
    /// Seconds without a byte either way after which a public connection is closed.
    #[arg(
        long = "ingress-idle-timeout",
        value_name = "SECS",
        default_value_t = 300.0
    )]
    pub idle_timeout: f64,
}

/// The gateway, validated: what the binary needs to start it.
pub struct IngressPlan {
    pub addr: Option<SocketAddr>,
    pub sandbox: ingress::SandboxId,
    pub gateway: ingress::GatewayConfig,
    pub route: ingress::RouteSpec,
    pub forwards: Vec<ingress::ForwardSpec>,
}

impl IngressOpts {
    /// `None` when neither --ingress nor --forward is given.
    pub fn plan(&self) -> Result<Option<IngressPlan>, UsageError> {
        if self.ingress.is_none() && self.forward.is_empty() {
            return Ok(None);
        }
        let sandbox = match &self.sandbox_id {
            Some(s) => ingress::SandboxId::parse(s).map_err(|e| UsageError(e.to_string()))?,
            None => random_sandbox_id(),
        };
        let domain = ingress::Domain::parse(&self.domain).map_err(|e| UsageError(e.to_string()))?;
        let mask_request_host = match &self.mask_request_host {
            Some(m) => Some(ingress::HostMask::parse(m).map_err(|e| UsageError(e.to_string()))?),
            None => None,
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                ingress::tls::server_config(cert, key).map_err(|e| UsageError(e.to_string()))?,
            ),
            _ => None,
        };
        let https_ports = ingress::https_ports(&self.https_port)
            .map_err(|e| UsageError(format!("invalid --https-port: {e}")))?;
        let forwards = self
            .forward
            .iter()
            .map(|f| ingress::ForwardSpec::parse(f).map_err(|e| UsageError(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let limits = ingress::Limits {
            max_connections: self.max_connections as usize,
            max_connections_per_client: self.max_connections_per_client as usize,
            header_read_timeout: seconds("--ingress-header-timeout", self.header_timeout)?,
            idle_timeout: seconds("--ingress-idle-timeout", self.idle_timeout)?,
            ..ingress::Limits::default()
        };
        Ok(Some(IngressPlan {
            addr: self.ingress,
            sandbox,
            gateway: ingress::GatewayConfig {
                domain,
                tls,
                limits,
            },
            route: ingress::RouteSpec {
                allow_public_traffic: self.public_traffic,
                mask_request_host,
                max_connections: self.max_inbound as usize,
                https_ports,
            },
            forwards,
        }))
    }
}

/// Twelve characters of a-z0-9: short enough to type, ~62 bits.
fn random_sandbox_id() -> ingress::SandboxId {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut seed = random_seed();
    let id: String = (0..12)
        .map(|_| {
            let c = ALPHABET[(seed % ALPHABET.len() as u64) as usize] as char;
            seed /= ALPHABET.len() as u64;
            c
        })
        .collect();
    ingress::SandboxId::parse(&id).expect("the alphabet is valid")
}

/// Flags clap cannot place. A mistyped flag is one line naming it (and the
/// flag it resembles), exit code 2, before anything starts; `--help`,
/// `--version` and the rest keep clap's own words.
pub fn parse_failed(e: clap::Error) -> std::process::ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        e.exit();
    }
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => e.exit(),
    };
    let hint = match e.get(ContextKind::SuggestedArg) {
        Some(ContextValue::String(s)) => format!(" (did you mean {s}?)"),
        _ => String::new(),
    };
    eprintln!("slipway: unknown flag {flag}{hint}");
    std::process::ExitCode::from(2)
}

/// A user error: printed as one line, exit code 2. The message is the domain
/// value: it names the flag and the input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl NetOpts {
    pub fn policy(&self) -> Result<EgressPolicy, UsageError> {
        let spec = PolicySpec {
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
            allow_internet_access: !self.no_internet,
            allow_internal: self.allow_internal.clone(),
        };
        EgressPolicy::from_spec(&spec).map_err(|e| UsageError(e.to_string()))
    }

    /// The egress proxy these flags ask for, validated; its address must be
    /// outside the internal ranges `policy` keeps shut.
    pub fn egress_proxy(&self, policy: &EgressPolicy) -> Result<Option<EgressProxy>, UsageError> {
        let Some(url) = &self.egress_proxy else {
            return Ok(None);
        };
        let spec = egress_proxy_spec(
            url,
            self.egress_proxy_ca.as_deref(),
            self.egress_proxy_server_name.as_deref(),
        )?;
        let ca = self.egress_proxy_ca.as_deref();
        let proxy = EgressProxy::new(spec).map_err(|e| proxy_usage(e, ca))?;
        proxy
            .check_address(policy)
            .map_err(|e| proxy_usage(e, ca))?;
        Ok(Some(proxy))
    }

    /// The MTU to turn offloads on at, or `None` to leave them off.
    pub fn offload_mtu(&self) -> Option<usize> {
        self.offload.then_some(self.mtu as usize)
    }

    pub fn stack_config(&self) -> Result<StackConfig, UsageError> {
        let mut cfg = StackConfig {
            mtu: self.mtu as usize,
            tcp_buffer: self.tcp_buffer as usize,
            connect_timeout: seconds("--connect-timeout", self.connect_timeout)?,
            udp_idle_timeout: seconds("--udp-timeout", self.udp_timeout)?,
            host_loopback_aliases: self.map_host_loopback.clone(),
            random_seed: random_seed(),
            ..StackConfig::default()
        };
        cfg.caps.max_tcp_flows = self.max_flows;
        cfg.caps.max_half_open = self.max_half_open;
        cfg.caps.max_datagram_flows = self.max_udp_flows;
        cfg.caps.max_buffer_bytes = self.max_buffer_bytes;
        cfg.dns_upstream = match &self.dns_upstream {
            Some(s) => Some(parse_upstream(s)?),
            None => vmm_glue::netns::host_resolver(),
        };
        if !self.dns_server.is_empty() {
            cfg.dns_servers = dns_servers(&self.dns_server)?;
        }
        Ok(cfg)
    }
}

/// The environment variable that may hold the egress proxy's password.
pub const PROXY_PASSWORD_ENV: &str = "SLIPWAY_EGRESS_PROXY_PASSWORD";

/// `--egress-proxy URL [--egress-proxy-ca FILE] [--egress-proxy-server-name
/// NAME]` as asked (also `slipway ctl`'s): the password from the URL or the
/// environment, the CA read from its file.
pub fn egress_proxy_spec(
    url: &str,
    ca: Option<&std::path::Path>,
    server_name: Option<&str>,
) -> Result<ProxySpec, UsageError> {
    let env_password = std::env::var(PROXY_PASSWORD_ENV).ok().map(Secret::new);
    let mut spec = ProxySpec::from_url(url, env_password).map_err(|e| proxy_usage(e, ca))?;
    let tls_flag = match (ca, server_name) {
        (Some(_), _) => Some("--egress-proxy-ca"),
        (None, Some(_)) => Some("--egress-proxy-server-name"),
        (None, None) => None,
    };
    match (&mut spec.tls, tls_flag) {
        (None, Some(flag)) => {
            return Err(proxy_usage(ProxyError::TlsOptionWithoutTls(flag), ca));
        }
        (Some(tls), _) => {
            tls.server_name = server_name.map(str::to_string);
            if let Some(path) = ca {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    UsageError(format!(
                        "cannot read --egress-proxy-ca {}: {e}",
                        path.display()
                    ))
                })?;
                tls.ca_pem = Some(Secret::new(pem));
            }
        }
        (None, None) => {}
    }
    Ok(spec)
}

/// A refused egress proxy setting, naming the CA file when it is at fault.
fn proxy_usage(e: ProxyError, ca: Option<&std::path::Path>) -> UsageError {
    match (&e, ca) {
        (ProxyError::InvalidCa(_), Some(path)) => {
            UsageError(format!("{e} (--egress-proxy-ca {})", path.display()))
        }
        _ => UsageError(e.to_string()),
    }
}

/// `--dns-server` values: addresses, or `none` alone for no address.
fn dns_servers(raw: &[String]) -> Result<Vec<IpAddr>, UsageError> {
    if raw.iter().any(|r| r.trim() == "none") {
        if raw.len() > 1 {
            return Err(UsageError(
                "invalid --dns-server none: give `none` alone, or addresses".into(),
            ));
        }
        return Ok(Vec::new());
    }
    raw.iter()
        .map(|r| {
            r.trim().parse::<IpAddr>().map_err(|_| {
                UsageError(format!(
                    "invalid --dns-server {r}: give an IP address, or none"
                ))
            })
        })
        .collect()
}

fn seconds(flag: &str, v: f64) -> Result<Duration, UsageError> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            UsageError(format!(
                "invalid {flag} {v}: give a positive number of seconds"
            ))
        })
}

fn parse_upstream(s: &str) -> Result<SocketAddr, UsageError> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| {
            UsageError(format!(
                "invalid --dns-upstream {s}: give ADDR or ADDR:PORT"
            ))
        })
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    if ingress::token::random_bytes(&mut seed).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id());
    }
    u64::from_ne_bytes(seed)
}
