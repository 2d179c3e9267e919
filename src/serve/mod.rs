//! `slipway serve`: many sandboxes in one process. Each sandbox's stack is
//! driven by a task of its own on a multi-thread runtime; the public URL
//! gateway routes into all of them through one directory; a control API on a
//! unix socket creates, changes and deletes them; Prometheus metrics go out
//! on their own listener. The control API and the metrics run on a thread of
//! their own, so a flood inside the sandboxes cannot slow the operator down.

pub(crate) mod api;
mod clustered;
pub mod config;
mod control;
pub(crate) mod metrics;
mod registry;
mod secrets;
pub(crate) mod settings;
mod view;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter};

use registry::Registry;
use settings::Settings;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Settings file (TOML) [env: SLIPWAY_CONFIG]; without one, built-in defaults.
    /// Every key can also be set as SLIPWAY_<SECTION>_<KEY>, e.g. SLIPWAY_CONTROL_SOCKET.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the settings in effect (defaults, file and environment merged) as TOML and exit.
    #[arg(long = "print-config")]
    pub print_config: bool,
    /// Confine slipway after set-up (seccomp, no_new_privs, capabilities,
    /// Landlock); overrides confine.enabled. `false`: off, for debugging.
    #[arg(long = "confine", value_name = "BOOL", action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub confine: Option<bool>,
}

/// What the control API, the metrics and the signal handlers share.
pub struct Shared {
    pub registry: Registry,
    settings: RwLock<Arc<Settings>>,
    /// The public gateway, once started (for its counters in the metrics).
    gateway: OnceLock<Arc<ingress::Gateway>>,
    /// This node's part in a cluster (`[cluster]`), once joined.
    cluster: OnceLock<Arc<crate::cluster::node::ClusterNode>>,
}

impl Shared {
    /// The settings in effect now (SIGHUP may replace them).
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

type LogHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

pub fn main(args: ServeArgs) -> ExitCode {
    let path = args
        .config
        .clone()
        .or_else(|| std::env::var_os("SLIPWAY_CONFIG").map(PathBuf::from));
    let settings = match load(path.as_deref()) {
        Ok(mut s) => {
            if let Some(on) = args.confine {
                s.confine.enabled = on;
            }
            s
        }
        Err(e) => {
            eprintln!("slipway: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        let mut shown = settings.file.clone();
        if shown.control.token.is_some() {
            shown.control.token = Some("(set, not shown)".into());
        }
        match toml::to_string(&shown) {
            Ok(text) => print!("{text}"),
            Err(e) => {
                eprintln!("slipway: cannot print the settings: {e}");
                return ExitCode::from(1);
            }
        }
        return ExitCode::SUCCESS;
    }
    let base = match secrets::InjectBase::load(&settings) {
        Ok(base) => base,
        Err(e) => {
            eprintln!("slipway: {e}");
            return ExitCode::from(2);
        }
    };
    let log = init_logging(&settings.log);
    match serve(path, settings, base, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slipway: {}", vmm_glue::chain(&e));
            ExitCode::from(1)
        }
    }
}

fn load(path: Option<&Path>) -> Result<Settings, config::ConfigError> {
    config::load(path, &|var| std::env::var(var).ok())?.validate()
}

fn init_logging(filter: &str) -> LogHandle {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(true),
        )
        .try_init();
    handle
}

/// Why `slipway serve` could not start; each names the socket or address.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("cannot listen on {addr} for {what}")]
    Listen {
        addr: std::net::SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {}", dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} exists and is not a socket; remove it or choose control.socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("another slipway serve answers on {}", path.display())]
    Taken { path: PathBuf },
    #[error("cannot replace {}", path.display())]
    Replace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    ListenControl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the mode of {}", path.display())]
    Mode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot serve {what}")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
    #[error("cannot join the cluster")]
    Cluster(#[source] crate::cluster::store::StoreError),
}

/// Listeners bound before anything runs, so that a taken port or a bad
/// socket path is a clear error at once.
struct Bound {
    control: std::os::unix::net::UnixListener,
    gateway: Option<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
    /// `[cluster]`: the tunnel listener edges reach this node on.
    tunnels: Option<std::net::TcpListener>,
}

fn bind(settings: &Settings) -> Result<Bound, ServeError> {
    let tcp = |addr: std::net::SocketAddr, what: &'static str| {
        let failed = |source| ServeError::Listen { addr, what, source };
        let l = std::net::TcpListener::bind(addr).map_err(failed)?;
        l.set_nonblocking(true).map_err(failed)?;
        Ok::<_, ServeError>(l)
    };
    let gateway = match &settings.gateway {
        Some(g) => Some(tcp(g.listen, "the gateway (gateway.listen)")?),
        None => None,
    };
    let metrics = match settings.metrics {
        Some(addr) => Some(tcp(addr, "metrics (metrics.listen)")?),
        None => None,
    };
    let tunnels = match &settings.cluster {
        Some(c) => Some(tcp(c.listen, "tunnels (cluster.listen)")?),
        None => None,
    };
    let control = bind_control(&settings.control.socket, settings.control.mode)?;
    Ok(Bound {
        control,
        gateway,
        metrics,
        tunnels,
    })
}

/// Bind the control socket with its mode, replacing a stale socket file but
/// never a live one (another slipway serving there) or anything else.
fn bind_control(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener, ServeError> {
    let at = || path.to_owned();
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|source| ServeError::CreateDir {
                    dir: dir.to_owned(),
                    source,
                })?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket { path: at() });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::Taken { path: at() });
        }
        std::fs::remove_file(path).map_err(|source| ServeError::Replace { path: at(), source })?;
    }
    // The socket is made with the umask's bits, then narrowed: create it
    // under a tight umask so it is never wider than asked, not even briefly.
    let bound = vmm_glue::sys::with_umask(0o177, || std::os::unix::net::UnixListener::bind(path));
    let listen_failed = |source| ServeError::ListenControl { path: at(), source };
    let listener = bound.map_err(listen_failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|source| ServeError::Mode { path: at(), source })?;
    listener.set_nonblocking(true).map_err(listen_failed)?;
    Ok(listener)
}

fn serve(
    path: Option<PathBuf>,
    settings: Settings,
    base: secrets::InjectBase,
    log: LogHandle,
) -> Result<(), ServeError> {
    let bound = bind(&settings)?;
    let mut net = tokio::runtime::Builder::new_multi_thread();
    net.enable_all().thread_name("slipway-net");
    // Counted before confinement: std reads the cgroup's CPU quota to do it.
    let workers = match settings.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    net.worker_threads(workers);
    if settings.confine.enabled {
        confine(path.as_deref(), &settings)?;
    }
    let net = net.build().map_err(ServeError::Runtime)?;
    let control_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let serving = |what| move |source| ServeError::Serve { what, source };

    let shared = Arc::new(Shared {
        registry: Registry::new(net.handle().clone(), base),
        settings: RwLock::new(Arc::new(settings.clone())),
        gateway: OnceLock::new(),
        cluster: OnceLock::new(),
    });
    let gateway = match (bound.gateway, &settings.gateway) {
        (Some(listener), Some(g)) => {
            let _in_net = net.enter();
            let listener =
                tokio::net::TcpListener::from_std(listener).map_err(serving("the gateway"))?;
            let gw = ingress::Gateway::new(
                ingress::GatewayConfig {
                    domain: g.domain.clone(),
                    tls: g.tls.clone(),
                    limits: g.limits.clone(),
                },
                shared.registry.directory.clone(),
            );
            let _ = shared.gateway.set(gw.clone());
            Some(net.spawn(gw.serve(listener)))
        }
        _ => None,
    };
    let socket = settings.control.socket.clone();
    let result = control_rt.block_on(async {
        let control = tokio::net::UnixListener::from_std(bound.control)
            .map_err(serving("the control socket"))?;
        tokio::spawn(control::serve(control, shared.clone()));
        if let (Some(listener), Some(cfg)) = (bound.tunnels, &settings.cluster) {
            join_cluster(&shared, cfg, listener, net.handle(), &settings).await?;
        }
        if let Some(l) = bound.metrics {
            let l = tokio::net::TcpListener::from_std(l).map_err(serving("metrics"))?;
            tokio::spawn(metrics::serve(l, shared.clone()));
        }
        let shown =
            |a: Option<std::net::SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
        eprintln!(
            "slipway: serving: control {} (mode {:04o}{}), gateway {}{}, metrics {}",
            socket.display(),
            settings.control.mode,
            if settings.control.token.is_some() {
                ", bearer token"
            } else {
                ""
            },
            shown(settings.gateway.as_ref().map(|g| g.listen)),
            settings
                .gateway
                .as_ref()
                .map(|g| format!(
                    " (http{}://<port>-<sandboxID>.{})",
                    if g.tls.is_some() { "s" } else { "" },
                    g.domain
                ))
                .unwrap_or_default(),
            shown(settings.metrics),
        );
        if let Some(c) = &settings.cluster {
            eprintln!(
                "slipway: cluster node {}: tunnels on {} (advertised {}), store {}",
                c.node,
                c.listen,
                c.advertise,
                c.store.join(",")
            );
        }
        run_until_stopped(&shared, path.as_deref(), &settings, &log, gateway).await;
        Ok::<_, ServeError>(())
    });
    let _ = std::fs::remove_file(&socket);
    net.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Join the cluster: the lease keeper on the control runtime (a flood in
/// the sandboxes cannot starve the keep-alives), the tunnel listener on the
/// sandboxes' runtime (it carries their traffic).
async fn join_cluster(
    shared: &Arc<Shared>,
    cfg: &crate::cluster::config::NodeCluster,
    listener: std::net::TcpListener,
    net: &tokio::runtime::Handle,
    settings: &Settings,
) -> Result<(), ServeError> {
    use crate::cluster::{node::ClusterNode, tunnel};
    let node = ClusterNode::start(cfg.clone())
        .await
        .map_err(ServeError::Cluster)?;
    let _ = shared.cluster.set(node.clone());
    let _in_net = net.enter();
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| ServeError::Serve {
            what: "the tunnel listener",
            source,
        })?;
    let registry = shared.clone();
    let server = tunnel::TunnelServer {
        directory: shared.registry.directory.clone(),
        draining: Box::new(move || registry.registry.is_draining()),
        idle_timeout: settings
            .gateway
            .as_ref()
            .map_or(ingress::Limits::default().idle_timeout, |g| {
                g.limits.idle_timeout
            }),
        stats: node.tunnels.clone(),
    };
    net.spawn(tunnel::serve(listener, cfg.tls.clone(), server));
    Ok(())
}

/// Sockets bound, nothing running yet: confine the process before the
/// runtimes start their threads.
fn confine(path: Option<&Path>, settings: &Settings) -> Result<(), ServeError> {
    let file = &settings.file;
    let paths = crate::confine::modes::ServePaths {
        config: path,
        token_file: file.control.token_file.as_deref(),
        tls: [&file.gateway.tls_cert, &file.gateway.tls_key]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .chain(
                settings
                    .cluster
                    .iter()
                    .flat_map(|c| c.files.iter().map(PathBuf::as_path)),
            )
            .collect(),
        control_socket: &settings.control.socket,
        socket_dirs: &settings.confine.socket_dirs,
        tap_fd: settings.confine.tap_fd,
    };
    let (plan, fence) = crate::confine::modes::serve(&paths);
    crate::confine::begin(&plan).and_then(|()| crate::confine::finish(&plan))?;
    crate::confine::set_fence(fence);
    Ok(())
}

/// Serve until SIGTERM or SIGINT, reloading on SIGHUP; then drain.
async fn run_until_stopped(
    shared: &Arc<Shared>,
    path: Option<&Path>,
    started: &Settings,
    log: &LogHandle,
    gateway: Option<tokio::task::JoinHandle<()>>,
) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot handle signals; serving until killed");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => reload(shared, path, started, log),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Drain: out of the cluster first (the lease revoked, edges stop
    // sending); no new sandboxes, no new public connections; the requests in
    // flight get drain_timeout to finish (a second signal cuts it short);
    // then every sandbox's flows are reset and its stack freed.
    if let Some(node) = shared.cluster.get() {
        node.leave().await;
    }
    let drain_timeout = shared.settings().drain_timeout;
    eprintln!(
        "slipway: draining: {} sandboxes, up to {:?} for {} gateway requests in flight",
        shared.registry.len(),
        drain_timeout,
        shared.registry.requests_in_flight()
    );
    shared.registry.begin_drain();
    if let Some(g) = gateway {
        g.abort();
    }
    let settle = async {
        while shared.registry.requests_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(drain_timeout, settle) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let left = shared.registry.requests_in_flight();
    if left > 0 {
        tracing::warn!(
            requests = left,
            "drain time is up; cutting the requests still in flight"
        );
    }
    shared.registry.delete_all().await;
    eprintln!("slipway: drained; bye");
}

/// SIGHUP: read the settings again. Live: log, control.token, the sandbox
/// defaults (for sandboxes created from now on) and gateway.drain_timeout;
/// the rest needs a restart and keeps its running value.
fn reload(shared: &Shared, path: Option<&Path>, started: &Settings, log: &LogHandle) {
    let new = match load(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("reload refused, the running settings stay: {e}");
            eprintln!("slipway: reload refused: {e}");
            return;
        }
    };
    if let Ok(filter) = EnvFilter::try_new(&new.log) {
        let _ = log.reload(filter);
    }
    let restart = started.needs_restart(&new);
    *shared.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
    eprintln!(
        "slipway: reloaded {}: log, control.token, sandbox defaults (for new sandboxes) and \
         gateway.drain_timeout are in effect{}",
        path.map_or("the environment".to_string(), |p| p.display().to_string()),
        if restart.is_empty() {
            String::new()
        } else {
            format!("; changed but needing a restart: {}", restart.join(", "))
        }
    );
}
