//! `slipway edge --config FILE`: the public URL gateway for many hosts. It
//! has no sandboxes of its own: its route table is a watched copy of the
//! cluster store's records (`cluster::routes`), and a request goes to the
//! node that holds its sandbox through an mTLS tunnel (`cluster::dial`).
//! Everything else (HTTP/1.1, h2, h2c, upgrades, tokens, masking, status
//! codes and error bodies) is the same `ingress::Gateway` serve runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use hyper::StatusCode;
use ingress::Directory;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use crate::cluster::config::{EdgeCluster, EdgeClusterFile};
use crate::cluster::dial::{DialOutcome, Dialer};
use crate::cluster::routes::RouteTable;
use crate::cluster::store;
use crate::serve::config::{self, ConfigError, GatewayFile, Kind, MetricsFile, RuntimeFile};
use crate::serve::metrics::{self, Family, Pages, PROMETHEUS};
use crate::serve::settings::{listen_addr, value, GatewaySettings};

#[derive(Args, Debug)]
pub struct EdgeArgs {
    /// Settings file (TOML) [env: SLIPWAY_EDGE_CONFIG]. Every key can also be
    /// set as SLIPWAY_<SECTION>_<KEY>, e.g. SLIPWAY_CLUSTER_STORE.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the settings in effect (defaults, file and environment merged) as TOML and exit.
    #[arg(long = "print-config")]
    pub print_config: bool,
    /// Confine slipway after set-up (seccomp, no_new_privs, no capability,
    /// Landlock); overrides confine.enabled. `false`: off, for debugging.
    #[arg(long = "confine", value_name = "BOOL", action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub confine: Option<bool>,
}

/// The edge's file: serve's `[gateway]`, `[metrics]` and `[runtime]` keys,
/// and its own `[cluster]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeFile {
    pub log: String,
    pub gateway: GatewayFile,
    pub cluster: EdgeClusterFile,
    pub metrics: MetricsFile,
    pub runtime: RuntimeFile,
    pub confine: EdgeConfineFile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfineFile {
    pub enabled: bool,
}

impl Default for EdgeConfineFile {
    fn default() -> Self {
        Self { enabled: true }
    }
}

impl Default for EdgeFile {
    fn default() -> Self {
        Self {
            log: "info".into(),
            gateway: GatewayFile::default(),
            cluster: EdgeClusterFile::default(),
            metrics: MetricsFile {
                // Beside a serve's default 9464 on the same host.
                listen: "127.0.0.1:9465".into(),
            },
            runtime: RuntimeFile::default(),
            confine: EdgeConfineFile::default(),
        }
    }
}

/// The edge's own environment keys, besides serve's log, gateway, metrics
/// and runtime ones.
const EDGE_KEYS: &[(&str, &str, Kind)] = &[
    ("cluster", "store", Kind::List),
    ("cluster", "ca", Kind::Str),
    ("cluster", "cert", Kind::Str),
    ("cluster", "key", Kind::Str),
    ("cluster", "stale_after", Kind::Float),
    ("cluster", "max_inbound", Kind::Int),
    ("confine", "enabled", Kind::Bool),
];

/// The settings, validated.
pub struct EdgeSettings {
    pub file: EdgeFile,
    pub gateway: GatewaySettings,
    pub drain_timeout: Duration,
    pub cluster: EdgeCluster,
    pub metrics: Option<SocketAddr>,
    pub worker_threads: usize,
}

fn load(path: Option<&Path>) -> Result<EdgeSettings, ConfigError> {
    let env = |var: &str| std::env::var(var).ok();
    let keys: Vec<(&str, &str, Kind)> = config::ENV_KEYS
        .iter()
        .filter(|(section, ..)| ["", "gateway", "metrics", "runtime"].contains(section))
        .chain(EDGE_KEYS)
        .copied()
        .collect();
    let file: EdgeFile = config::decode(path, config::merge(path, &env, &keys)?)?;
    file.validate()
}

impl EdgeFile {
    pub fn validate(&self) -> Result<EdgeSettings, ConfigError> {
        let gateway = self.gateway.validate()?.ok_or_else(|| {
            value(
                "gateway.listen",
                &self.gateway.listen,
                "an edge is a gateway: give ADDR:PORT",
            )
        })?;
        Ok(EdgeSettings {
            file: self.clone(),
            gateway,
            drain_timeout: self.gateway.drain_timeout()?,
            cluster: self.cluster.validate()?,
            metrics: listen_addr("metrics.listen", &self.metrics.listen)?,
            worker_threads: self.runtime.worker_threads as usize,
        })
    }
}

/// Why the edge could not start; each names what it was doing.
#[derive(Debug, thiserror::Error)]
enum EdgeError {
    #[error("cannot listen on {addr} for {what}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
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
    #[error("cannot use the cluster store")]
    Store(#[source] store::StoreError),
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
}

pub fn main(args: EdgeArgs) -> ExitCode {
    let path = args
        .config
        .clone()
        .or_else(|| std::env::var_os("SLIPWAY_EDGE_CONFIG").map(PathBuf::from));
    let mut settings = match load(path.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("slipway: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(on) = args.confine {
        settings.file.confine.enabled = on;
    }
    if args.print_config {
        return match toml::to_string(&settings.file) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("slipway: cannot print the settings: {e}");
                ExitCode::from(1)
            }
        };
    }
    init_logging(&settings.file.log);
    match run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slipway: {}", vmm_glue::chain(&e));
            ExitCode::from(1)
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .try_init();
}

fn bind(addr: SocketAddr, what: &'static str) -> Result<std::net::TcpListener, EdgeError> {
    let failed = |source| EdgeError::Listen { addr, what, source };
    let l = std::net::TcpListener::bind(addr).map_err(failed)?;
    l.set_nonblocking(true).map_err(failed)?;
    Ok(l)
}

fn run(settings: EdgeSettings) -> Result<(), EdgeError> {
    let gateway = bind(settings.gateway.listen, "the gateway (gateway.listen)")?;
    let metrics = match settings.metrics {
        Some(addr) => Some(bind(addr, "metrics and health (metrics.listen)")?),
        None => None,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("slipway-edge");
    let workers = match settings.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    rt.worker_threads(workers);
    if settings.file.confine.enabled {
        // Before the runtime starts its threads: they inherit it.
        let plan = crate::confine::modes::edge();
        crate::confine::begin(&plan).and_then(|()| crate::confine::finish(&plan))?;
    }
    let rt = rt.build().map_err(EdgeError::Runtime)?;
    rt.block_on(serve(settings, gateway, metrics))
}

async fn serve(
    settings: EdgeSettings,
    gateway: std::net::TcpListener,
    metrics: Option<std::net::TcpListener>,
) -> Result<(), EdgeError> {
    let serving = |what| move |source| EdgeError::Serve { what, source };
    let cluster = &settings.cluster;
    let directory = Arc::new(Directory::new());
    let dialer = Dialer::new(cluster.tls.clone());
    let table = RouteTable::new(
        directory.clone(),
        dialer.clone(),
        cluster.max_inbound,
        cluster.stale_after,
    );
    let client = store::client(&cluster.store)
        .await
        .map_err(EdgeError::Store)?;
    tokio::spawn(table.clone().sync(client));
    tokio::spawn(table.clone().watch_staleness());
    let g = &settings.gateway;
    let gw = ingress::Gateway::new(
        ingress::GatewayConfig {
            domain: g.domain.clone(),
            tls: g.tls.clone(),
            limits: g.limits.clone(),
        },
        directory.clone(),
    );
    let listener = tokio::net::TcpListener::from_std(gateway).map_err(serving("the gateway"))?;
    let accepting = tokio::spawn(gw.clone().serve(listener));
    if let Some(l) = metrics {
        let l = tokio::net::TcpListener::from_std(l).map_err(serving("metrics"))?;
        tokio::spawn(metrics::serve_pages(l, pages(&table, &dialer, &gw)));
    }
    eprintln!(
        "slipway: edge serving: gateway {} (http{}://<port>-<sandboxID>.{}), store {}, metrics {}",
        g.listen,
        if g.tls.is_some() { "s" } else { "" },
        g.domain,
        cluster.store.join(","),
        settings
            .metrics
            .map_or("off".to_string(), |a| format!("{a} (/metrics, /health)")),
    );
    wait_for_stop().await;
    // Drain: no new public connections; what is in flight gets
    // drain_timeout to finish (a second signal cuts it short).
    accepting.abort();
    let in_flight = || {
        let idle: usize = directory
            .ids()
            .iter()
            .filter_map(|id| directory.get(id))
            .map(|r| r.idle_connections())
            .sum();
        dialer.stats.live.load(Relaxed).saturating_sub(idle)
    };
    eprintln!(
        "slipway: edge draining: up to {:?} for {} requests in flight",
        settings.drain_timeout,
        in_flight()
    );
    let settle = async {
        while in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(settings.drain_timeout, settle) => {}
        _ = wait_for_stop() => {}
    }
    eprintln!("slipway: edge drained; bye");
    Ok(())
}

async fn wait_for_stop() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot handle signals; serving until killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `/metrics` and `/health` on the metrics listener.
fn pages(table: &Arc<RouteTable>, dialer: &Arc<Dialer>, gw: &Arc<ingress::Gateway>) -> Pages {
    let (table, dialer, gw) = (table.clone(), dialer.clone(), gw.clone());
    Arc::new(move |path: String| {
        let (table, dialer, gw) = (table.clone(), dialer.clone(), gw.clone());
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => (StatusCode::OK, PROMETHEUS, render(&table, &dialer, &gw)),
                "/health" => health(&table),
                _ => (
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "see /metrics and /health\n".into(),
                ),
            }
        })
    })
}

/// 200 while the copy is fresh; 503 once the store has been silent past
/// `stale_after` (private sandboxes are refused then).
fn health(table: &RouteTable) -> metrics::Page {
    let stale = table.is_stale();
    let body = serde_json::json!({
        "status": if stale { "stale" } else { "ok" },
        "routes": table.len(),
        "badRecords": table.bad_now(),
        "revision": table.stats.revision.load(Relaxed),
        "storeContactAgeSeconds": table.contact_age().map(|d| d.as_secs_f64()),
        "privateSandboxes": if stale { "refused" } else { "served" },
    });
    let status = if stale {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, "application/json", format!("{body}\n"))
}

fn render(table: &RouteTable, dialer: &Dialer, gw: &ingress::Gateway) -> String {
    let mut out = String::new();
    let gauge = |name: &str, help: &str, v: &dyn std::fmt::Display| {
        let mut f = Family::new(name, "gauge", help);
        f.sample(name, "", v);
        f.text
    };
    let counter = |name: &str, help: &str, v: u64| {
        let mut f = Family::new(name, "counter", help);
        f.sample(name, "", v);
        f.text
    };
    let s = &table.stats;
    out.push_str(&gauge(
        "slipway_edge_routes",
        "Sandboxes in the route table.",
        &table.len(),
    ));
    out.push_str(&gauge(
        "slipway_edge_watch_lag_seconds",
        "Seconds since the store last confirmed the route table is current (an event or a progress answer).",
        // Prometheus's infinity before the first answer.
        &table
            .contact_age()
            .map_or("+Inf".to_string(), |d| d.as_secs_f64().to_string()),
    ));
    out.push_str(&gauge(
        "slipway_edge_watch_revision",
        "The store revision the route table is known to be current at.",
        &s.revision.load(Relaxed),
    ));
    out.push_str(&gauge(
        "slipway_edge_stale",
        "1 while the store has been silent past stale_after: private sandboxes are refused.",
        &u8::from(table.is_stale()),
    ));
    out.push_str(&gauge(
        "slipway_edge_bad_records",
        "Keys under the prefix whose value is not a valid record, now.",
        &table.bad_now(),
    ));
    out.push_str(&counter(
        "slipway_edge_bad_records_total",
        "Bad records skipped (each version of a key once).",
        s.bad_records.load(Relaxed),
    ));
    out.push_str(&counter(
        "slipway_edge_store_errors_total",
        "Store calls that failed, and watches that broke.",
        s.store_errors.load(Relaxed),
    ));
    out.push_str(&counter(
        "slipway_edge_lists_total",
        "Full listings of the records (at start, and after a compaction).",
        s.lists.load(Relaxed),
    ));
    out.push_str(&counter(
        "slipway_edge_compactions_total",
        "Watches whose start revision was compacted away (each followed by a listing).",
        s.compactions.load(Relaxed),
    ));
    let mut tunnels = Family::new(
        "slipway_edge_tunnels_total",
        "counter",
        "Tunnels to nodes asked for, by outcome.",
    );
    for o in DialOutcome::ALL {
        tunnels.sample(
            "slipway_edge_tunnels_total",
            &format!("outcome=\"{}\"", o.name()),
            dialer.stats.get(o),
        );
    }
    out.push_str(&tunnels.text);
    let mut handshakes = Family::new(
        "slipway_edge_tunnel_handshakes_total",
        "counter",
        "Tunnel TLS handshakes, by kind (resumed: a session ticket, no certificates).",
    );
    for (kind, n) in [
        ("full", dialer.stats.full_handshakes.load(Relaxed)),
        ("resumed", dialer.stats.resumed.load(Relaxed)),
    ] {
        handshakes.sample(
            "slipway_edge_tunnel_handshakes_total",
            &format!("kind=\"{kind}\""),
            n,
        );
    }
    out.push_str(&handshakes.text);
    out.push_str(&gauge(
        "slipway_edge_tunnels_open",
        "Tunnels open now (in use or kept idle for the next request).",
        &dialer.stats.live.load(Relaxed),
    ));
    out.push_str(&gauge(
        "slipway_edge_links",
        "Liveness links to nodes up now (HTTP/2 pings every second).",
        &dialer.links(),
    ));
    out.push_str(&counter(
        "slipway_edge_links_made_total",
        "Liveness links to nodes made.",
        dialer.stats.links_made.load(Relaxed),
    ));
    out.push_str(&counter(
        "slipway_edge_nodes_silent_total",
        "Times a node left its liveness pings unanswered (its tunnels were closed).",
        dialer.stats.nodes_silent.load(Relaxed),
    ));
    out.push_str(&gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        &metrics::resident_bytes().unwrap_or(0),
    ));
    out.push_str(&gauge(
        "process_open_fds",
        "Open file descriptors.",
        &metrics::open_fds().unwrap_or(0),
    ));
    out.push_str(&metrics::gateway_families(gw));
    out
}
