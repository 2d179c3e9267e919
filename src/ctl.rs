//! `slipway ctl`: drive a running `slipway serve` through its control API
//! from a shell. Prints the API's JSON; an error is one line on stderr
//! (`slipway: <message>`) and exit status 2 for a refused request (4xx), 1
//! when the server or the socket failed.

use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{ArgAction, Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use vmm_glue::TransportSpec;

use crate::cli::UsageError;
use crate::serve::api::transport_json;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The control socket [env: SLIPWAY_CONTROL_SOCKET; default: as `slipway serve`'s].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Bearer token for the API [env: SLIPWAY_CONTROL_TOKEN].
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Create a sandbox (POST /sandboxes) and print it, with its trafficAccessToken.
    Create {
        /// The sandbox's id [default: the server picks one].
        id: Option<String>,
        #[command(flatten)]
        transport: TransportArgs,
        #[command(flatten)]
        egress: EgressArgs,
        /// allowPublicTraffic: with false, public URLs need the e2b-traffic-access-token header.
        #[arg(long = "public-traffic", value_name = "BOOL", default_value_t = true,
              action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        public_traffic: bool,
        /// maskRequestHost: the Host the guest sees, ${PORT} standing for the port.
        #[arg(long = "mask-request-host", value_name = "HOST")]
        mask_request_host: Option<String>,
        /// httpsPorts: the gateway speaks TLS to guest port N (certificate not verified).
        /// Repeatable, or comma-separated.
        #[arg(long = "https-port", value_name = "N", value_delimiter = ',')]
        https_port: Vec<u16>,
    },
    /// List the sandboxes (GET /sandboxes).
    List,
    /// Show one sandbox with its counters (GET /sandboxes/ID).
    Get { id: String },
    /// Replace a sandbox's egress rules whole (PUT /sandboxes/ID/network): what is not given
    /// goes back to its default; flows the new rules deny are reset.
    SetNetwork {
        id: String,
        #[command(flatten)]
        egress: EgressArgs,
    },
    /// Give a private sandbox a new traffic access token (POST /sandboxes/ID/token).
    RotateToken { id: String },
    /// Tear a sandbox down (DELETE /sandboxes/ID): flows reset, everything freed.
    Delete { id: String },
    /// Print a sandbox's CA certificate, PEM (GET /sandboxes/ID/ca.pem).
    Ca { id: String },
    /// Set or replace a secret for header rules (PUT /secrets/NAME); the
    /// value comes from a file or a variable, never the command line.
    SecretPut {
        name: String,
        /// `@FILE` or `env:VAR`.
        #[arg(value_name = "@FILE|env:VAR")]
        from: String,
    },
    /// List the secrets' names (GET /secrets); values are never shown.
    Secrets,
    /// Forget a secret no sandbox's rules use (DELETE /secrets/NAME).
    SecretDelete { name: String },
}

/// What a request carries.
enum Body {
    None,
    Json(serde_json::Value),
    /// A secret's value: wiped once sent.
    Raw(zeroize::Zeroizing<Vec<u8>>),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct TransportArgs {
    /// A tap by name (created if missing), in slipway serve's namespace.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// A tap open on this process's descriptor N; slipway serve takes a copy (pidfd_getfd).
    #[arg(long = "tap-fd", value_name = "N")]
    tap_fd: Option<i32>,
    /// QEMU -netdev stream: slipway listens on PATH (QEMU: server=off).
    #[arg(long = "qemu-stream", value_name = "PATH")]
    qemu_stream: Option<PathBuf>,
    /// QEMU -netdev dgram: slipway binds PATH (QEMU's remote).
    #[arg(long = "qemu-dgram", value_name = "PATH")]
    qemu_dgram: Option<PathBuf>,
    /// A vhost-user-net backend on PATH (QEMU -netdev vhost-user, cloud-hypervisor).
    #[arg(long = "vhost-user", value_name = "PATH")]
    vhost_user: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EgressArgs {
    /// allowOut: ADDR, CIDR or ALL_TRAFFIC; repeatable or comma-separated.
    #[arg(long = "allow-out", value_name = "CIDR", value_delimiter = ',')]
    allow_out: Vec<String>,
    /// denyOut: ADDR, CIDR or ALL_TRAFFIC; repeatable or comma-separated.
    #[arg(long = "deny-out", value_name = "CIDR", value_delimiter = ',')]
    deny_out: Vec<String>,
    /// allowInternetAccess = false.
    #[arg(long = "no-internet")]
    no_internet: bool,
    /// dnsServers: with names in --allow-out, DNS to ADDR:53 is answered by the filtering
    /// resolver (IPv4, at most 10) [default: 8.8.8.8]; repeatable or comma-separated;
    /// `none` for no address.
    #[arg(long = "dns-server", value_name = "ADDR", value_delimiter = ',')]
    dns_server: Vec<String>,
    /// egressProxy: socks5://[user[:pass]@]host:port or socks5+tls://… (the
    /// password may come from SLIPWAY_EGRESS_PROXY_PASSWORD instead).
    #[arg(long = "egress-proxy", value_name = "URL")]
    egress_proxy: Option<String>,
    /// egressProxy.tls.caCert: read from FILE (PEM).
    #[arg(
        long = "egress-proxy-ca",
        value_name = "FILE",
        requires = "egress_proxy"
    )]
    egress_proxy_ca: Option<PathBuf>,
    /// egressProxy.tls.serverName.
    #[arg(
        long = "egress-proxy-server-name",
        value_name = "NAME",
        requires = "egress_proxy"
    )]
    egress_proxy_server_name: Option<String>,
    /// rules: give HTTPS requests to NAME the header; the value may hold
    /// ${e2b.secrets.X}. One header per flag; repeat NAME for more.
    #[arg(long = "header-rule", value_name = "NAME=Header: value")]
    header_rule: Vec<String>,
}

impl EgressArgs {
    /// E2B's `rules` object, or null when there are none.
    fn rules(&self) -> Result<serde_json::Value, UsageError> {
        if self.header_rule.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        inject::HeaderRules::from_flags(&self.header_rule)
            .map(|r| r.to_json())
            .map_err(|e| UsageError(e.to_string()))
    }

    /// `dnsServers` as the API takes it: absent without the flag (the
    /// default), `[]` for `none`; the server checks the addresses.
    fn dns_servers(&self) -> Option<Vec<String>> {
        match self.dns_server.as_slice() {
            [] => None,
            [only] if only.trim() == "none" => Some(Vec::new()),
            many => Some(many.to_vec()),
        }
    }

    /// E2B's `egressProxy` object for the flags, or null. Checked by the
    /// server; here only the URL is taken apart and the CA file read.
    fn egress_proxy(&self) -> Result<serde_json::Value, UsageError> {
        use serde_json::json;
        let Some(url) = &self.egress_proxy else {
            return Ok(serde_json::Value::Null);
        };
        let spec = crate::cli::egress_proxy_spec(
            url,
            self.egress_proxy_ca.as_deref(),
            self.egress_proxy_server_name.as_deref(),
        )?;
        let mut v = json!({ "address": spec.address });
        if let Some(u) = spec.username {
            v["username"] = u.into();
        }
        if let Some(p) = spec.password {
            v["password"] = p.expose().into();
        }
        if let Some(tls) = spec.tls {
            let mut t = json!({});
            if let Some(n) = tls.server_name {
                t["serverName"] = n.into();
            }
            if let Some(ca) = tls.ca_pem {
                t["caCert"] = ca.expose().into();
            }
            v["tls"] = if t.as_object().is_some_and(|o| o.is_empty()) {
                true.into()
            } else {
                t
            };
        }
        Ok(v)
    }
}

impl TransportArgs {
    /// The transport asked for; clap lets exactly one flag through.
    fn spec(&self) -> Option<TransportSpec> {
        let path = |p: &PathBuf| p.clone();
        if let Some(name) = &self.tap {
            Some(TransportSpec::Tap(name.clone()))
        } else if let Some(fd) = self.tap_fd {
            Some(TransportSpec::TapFd(fd))
        } else if let Some(p) = &self.qemu_stream {
            Some(TransportSpec::QemuStream {
                path: path(p),
                connect: false,
            })
        } else if let Some(p) = &self.qemu_dgram {
            Some(TransportSpec::QemuDgram {
                path: path(p),
                peer: None,
            })
        } else {
            self.vhost_user
                .as_ref()
                .map(|p| TransportSpec::VhostUser { path: path(p) })
        }
    }
}

impl CtlCommand {
    /// The request this command makes.
    fn request(&self) -> Result<(Method, String, Body), UsageError> {
        use serde_json::json;
        Ok(match self {
            CtlCommand::Create {
                id,
                transport,
                egress,
                public_traffic,
                mask_request_host,
                https_port,
            } => {
                let t = transport
                    .spec()
                    .map_or(serde_json::Value::Null, |spec| transport_json(&spec));
                let mut body = json!({
                    "transport": t,
                    "allowInternetAccess": !egress.no_internet,
                    "network": {
                        "allowOut": egress.allow_out,
                        "denyOut": egress.deny_out,
                        "allowPublicTraffic": public_traffic,
                        "maskRequestHost": mask_request_host,
                        "httpsPorts": https_port,
                        "egressProxy": egress.egress_proxy()?,
                        "rules": egress.rules()?,
                    },
                });
                if let Some(servers) = egress.dns_servers() {
                    body["network"]["dnsServers"] = servers.into();
                }
                if let Some(id) = id {
                    body["sandboxID"] = id.clone().into();
                }
                (Method::POST, "/sandboxes".into(), Body::Json(body))
            }
            CtlCommand::List => (Method::GET, "/sandboxes".into(), Body::None),
            CtlCommand::Get { id } => (
                Method::GET,
                format!("/sandboxes/{}", escape(id)),
                Body::None,
            ),
            CtlCommand::SetNetwork { id, egress } => {
                // E2B's update shape; what is left out goes back to its default.
                let mut body = json!({
                    "allow_internet_access": !egress.no_internet,
                    "allowOut": egress.allow_out,
                    "denyOut": egress.deny_out,
                    "egressProxy": egress.egress_proxy()?,
                    "rules": egress.rules()?,
                });
                if let Some(servers) = egress.dns_servers() {
                    body["dnsServers"] = servers.into();
                }
                (
                    Method::PUT,
                    format!("/sandboxes/{}/network", escape(id)),
                    Body::Json(body),
                )
            }
            CtlCommand::RotateToken { id } => (
                Method::POST,
                format!("/sandboxes/{}/token", escape(id)),
                Body::None,
            ),
            CtlCommand::Delete { id } => (
                Method::DELETE,
                format!("/sandboxes/{}", escape(id)),
                Body::None,
            ),
            CtlCommand::Ca { id } => (
                Method::GET,
                format!("/sandboxes/{}/ca.pem", escape(id)),
                Body::None,
            ),
            CtlCommand::SecretPut { name, from } => {
                let (value, _) = crate::rules::secret_source(from).map_err(|why| {
                    UsageError(format!("secret-put {}: {why}", escape_name(name)))
                })?;
                (
                    Method::PUT,
                    format!("/secrets/{}", escape_name(name)),
                    Body::Raw(zeroize::Zeroizing::new(value)),
                )
            }
            CtlCommand::Secrets => (Method::GET, "/secrets".into(), Body::None),
            CtlCommand::SecretDelete { name } => (
                Method::DELETE,
                format!("/secrets/{}", escape_name(name)),
                Body::None,
            ),
        })
    }
}

/// A secret's name in the path: `_` and `.` as well.
fn escape_name(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Ids go into the path as given; anything outside a-z0-9- is escaped so the
/// server can refuse it by name instead of seeing another path.
fn escape(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn main(args: CtlArgs) -> ExitCode {
    let socket = args
        .socket
        .clone()
        .or_else(|| std::env::var_os("SLIPWAY_CONTROL_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| crate::serve::config::FileConfig::default().control.socket);
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var("SLIPWAY_CONTROL_TOKEN").ok());
    let (method, path, body) = match args.command.request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slipway: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("slipway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let sent = rt.block_on(call(&socket, token.as_deref(), method, &path, body));
    match sent {
        Err(e) => {
            eprintln!("slipway: {}", vmm_glue::chain(&e));
            ExitCode::from(1)
        }
        Ok((status, body)) if status.is_success() => {
            if !body.is_empty() {
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                    Err(_) => print!("{}", String::from_utf8_lossy(&body)),
                }
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message")?.as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            eprintln!("slipway: {message} ({status})");
            ExitCode::from(if status.is_client_error() { 2 } else { 1 })
        }
    }
}

/// Why a call to `slipway serve` got no answer. Each names the socket.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("cannot reach slipway serve at {}: {source} (is it running? --socket or SLIPWAY_CONTROL_SOCKET)", socket.display())]
    Reach {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot talk to slipway serve at {}", socket.display())]
    Talk {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("cannot build the request")]
    Build(#[source] hyper::http::Error),
    #[error("slipway serve at {} did not answer", socket.display())]
    NoAnswer {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("slipway serve at {} broke off its answer", socket.display())]
    BrokeOff {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
}

async fn call(
    socket: &std::path::Path,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Body,
) -> Result<(StatusCode, Bytes), CtlError> {
    let at = || socket.to_owned();
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| CtlError::Reach {
            socket: at(),
            source,
        })?;
    allow_server_to_take_fds(&stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| CtlError::Talk {
            socket: at(),
            source,
        })?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "slipway");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Body::Json(v) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
        }
        // The buffer is wiped when the request is done with it.
        Body::Raw(v) => Bytes::from_owner(v),
        Body::None => Bytes::new(),
    };
    let req = req.body(Full::new(body)).map_err(CtlError::Build)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| CtlError::NoAnswer {
            socket: at(),
            source,
        })?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|source| CtlError::BrokeOff {
            socket: at(),
            source,
        })?
        .to_bytes();
    Ok((status, body))
}

/// For `--tap-fd`: under Yama's ptrace_scope 1 only an ancestor may take our
/// descriptors, so name the server (its pid from SO_PEERCRED) as allowed.
fn allow_server_to_take_fds(stream: &tokio::net::UnixStream) {
    if let Some(pid) = stream.peer_cred().ok().and_then(|c| c.pid()) {
        vmm_glue::sys::allow_ptracer(pid);
    }
}
