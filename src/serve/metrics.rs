//! Prometheus metrics on their own listener, in the text exposition format:
//! per sandbox the flows by verdict, bytes each way, frames dropped, caps
//! hit and whether its link runs; for the process the sandboxes, resident
//! memory, open descriptors, gateway connections into guests, public
//! connections and the ones the gateway refused.
//!
//! The listener is bounded like the gateway, if smaller: scrapers are few
//! and quick, so a handful of connections, a short header timeout and a
//! small request are all it allows; junk connections cannot pile up.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ingress::idle::{until_idle, Activity, Watched};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Shared;

/// How long one sandbox's driver may take to give its counters to a scrape.
const SCRAPE_WAIT: Duration = Duration::from_millis(250);
/// Connections at once; past them a new one is closed at once.
const MAX_CONNECTIONS: usize = 64;
/// A request's head must be in within this (also the wait for the next
/// request on a kept-alive connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection on which nothing moved this long is closed (a client that
/// stopped reading its answer).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head: hyper's smallest buffer; a scrape's request is a
/// few hundred bytes. Larger heads get 431.
const MAX_REQUEST_BYTES: usize = 8 << 10;

/// What a page answers: its status, content type and text.
pub(crate) type Page = (StatusCode, &'static str, String);
/// The pages a listener serves, by path (GET only).
pub(crate) type Pages = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Page> + Send>>
        + Send
        + Sync,
>;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let pages: Pages = Arc::new(move |path: String| {
        let shared = shared.clone();
        Box::pin(async move {
            if path == "/metrics" {
                (StatusCode::OK, PROMETHEUS, render(&shared).await)
            } else {
                (StatusCode::NOT_FOUND, "text/plain", "see /metrics\n".into())
            }
        })
    });
    serve_pages(listener, pages).await
}

/// The Prometheus text format's content type.
pub(crate) const PROMETHEUS: &str = "text/plain; version=0.0.4";

/// Serve `pages` on the bounded listener (`slipway edge` serves its health
/// and metrics the same way).
pub(crate) async fn serve_pages(listener: TcpListener, pages: Pages) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .max_headers(32);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(client = %peer, "metrics: {MAX_CONNECTIONS} connections open; closing");
            continue;
        };
        let pages = pages.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let pages = pages.clone();
                async move {
                    let (status, kind, text) = if req.method() == Method::GET {
                        pages(req.uri().path().to_string()).await
                    } else {
                        (
                            StatusCode::METHOD_NOT_ALLOWED,
                            "text/plain",
                            "GET only\n".into(),
                        )
                    };
                    let mut r = Response::new(Full::new(Bytes::from(text)));
                    *r.status_mut() = status;
                    r.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
                    Ok::<_, Infallible>(r)
                }
            });
            let activity = Activity::new();
            let io = TokioIo::new(Watched::new(stream, activity.clone()));
            let _ = until_idle(activity, IDLE_TIMEOUT, http.serve_connection(io, service)).await;
            drop(slot);
        });
    }
}

/// One family: its HELP and TYPE lines, then its samples.
pub(crate) struct Family {
    pub text: String,
}

impl Family {
    pub fn new(name: &str, kind: &str, help: &str) -> Self {
        Self {
            text: format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"),
        }
    }

    pub fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.text, "{name} {value}");
        } else {
            let _ = writeln!(self.text, "{name}{{{labels}}} {value}");
        }
    }
}

pub async fn render(shared: &Shared) -> String {
    let sandboxes = shared.registry.all();
    let mut set = tokio::task::JoinSet::new();
    for (i, s) in sandboxes.iter().enumerate() {
        let s = s.clone();
        set.spawn(async move { (i, s.snapshot(SCRAPE_WAIT).await) });
    }
    let mut snapshots = vec![None; sandboxes.len()];
    while let Some(Ok((i, snap))) = set.join_next().await {
        snapshots[i] = snap;
    }

    let mut up = Family::new(
        "slipway_sandbox_up",
        "gauge",
        "1 while the sandbox's link is served.",
    );
    let mut flows = Family::new(
        "slipway_flows_total",
        "counter",
        "New flows decided, by protocol and verdict.",
    );
    let mut open = Family::new(
        "slipway_open_flows",
        "gauge",
        "Flows open now, by protocol.",
    );
    let mut bytes = Family::new(
        "slipway_bytes_total",
        "counter",
        "TCP payload bytes relayed, by direction.",
    );
    let mut dropped = Family::new(
        "slipway_frames_dropped_total",
        "counter",
        "Guest frames (and host datagrams) dropped, by reason.",
    );
    let mut caps = Family::new(
        "slipway_caps_hit_total",
        "counter",
        "New flows refused because a per-sandbox cap was reached, by cap.",
    );
    let mut names = Family::new(
        "slipway_name_decisions_total",
        "counter",
        "Egress by name: DNS queries forwarded and blocked by the filtering resolver, answers rewritten without internal addresses, flows a DNS pin allowed, flows allowed by their TLS SNI or HTTP Host, flows reset for naming no allowed host (fronting_refused: on a pinned address).",
    );
    let mut rules = Family::new(
        "slipway_header_rules_total",
        "counter",
        "Header rules: TLS flows intercepted, requests seen and transformed, requests answered 421 (Host not the SNI), servers whose certificate failed verification, other server failures, requests refused for a secret not set, connections refused over the cap.",
    );
    let mut panics = Family::new(
        "slipway_stack_panics_total",
        "counter",
        "Times a sandbox's stack panicked and was made anew, its flows reset.",
    );
    let mut reused = Family::new(
        "slipway_tcp_buffers_reused_total",
        "counter",
        "TCP buffers (two per flow) new flows took from short flows that ended cleanly, instead of new memory.",
    );
    for (s, snap) in sandboxes.iter().zip(&snapshots) {
        let id = s.id.as_str();
        up.sample(
            "slipway_sandbox_up",
            &format!("sandbox=\"{id}\",transport=\"{}\"", s.transport_kind()),
            u8::from(s.is_running()),
        );
        let Some(snap) = snap else { continue };
        let st = &snap.stats;
        for (proto, verdict, n) in [
            ("tcp", "allowed", st.tcp_allowed),
            ("tcp", "denied", st.tcp_denied),
            ("datagram", "allowed", st.datagram_allowed),
            ("datagram", "denied", st.datagram_denied),
        ] {
            flows.sample(
                "slipway_flows_total",
                &format!("sandbox=\"{id}\",proto=\"{proto}\",verdict=\"{verdict}\""),
                n,
            );
        }
        open.sample(
            "slipway_open_flows",
            &format!("sandbox=\"{id}\",proto=\"tcp\""),
            snap.tcp_flows,
        );
        open.sample(
            "slipway_open_flows",
            &format!("sandbox=\"{id}\",proto=\"datagram\""),
            snap.datagram_flows,
        );
        bytes.sample(
            "slipway_bytes_total",
            &format!("sandbox=\"{id}\",direction=\"to_host\""),
            st.bytes_to_host,
        );
        bytes.sample(
            "slipway_bytes_total",
            &format!("sandbox=\"{id}\",direction=\"to_guest\""),
            st.bytes_to_guest,
        );
        for (why, n) in &st.dropped_by_reason {
            dropped.sample(
                "slipway_frames_dropped_total",
                &format!("sandbox=\"{id}\",reason=\"{}\"", label_value(why)),
                *n,
            );
        }
        for (kind, n) in [
            ("dns_forwarded", st.dns_forwarded),
            ("dns_blocked", st.dns_blocked),
            ("dns_answer_rewritten", st.dns_answers_rewritten),
            ("pinned_flow", st.pinned_flows),
            ("sni_flow", st.sni_flows),
            ("host_flow", st.host_flows),
            ("name_refused", st.name_refused),
            ("fronting_refused", st.fronting_refused),
        ] {
            names.sample(
                "slipway_name_decisions_total",
                &format!("sandbox=\"{id}\",kind=\"{kind}\""),
                n,
            );
        }
        let c = s.injector.counts();
        for (kind, n) in [
            ("intercepted_flow", st.intercepted_flows),
            ("request", c.requests),
            ("transformed", c.transformed),
            ("misdirected", c.misdirected),
            ("upstream_unverified", c.upstream_unverified),
            ("upstream_failed", c.upstream_failed),
            ("missing_secret", c.missing_secret),
            ("over_cap", c.refused_over_cap),
        ] {
            rules.sample(
                "slipway_header_rules_total",
                &format!("sandbox=\"{id}\",kind=\"{kind}\""),
                n,
            );
        }
        panics.sample(
            "slipway_stack_panics_total",
            &format!("sandbox=\"{id}\""),
            st.stack_panics,
        );
        reused.sample(
            "slipway_tcp_buffers_reused_total",
            &format!("sandbox=\"{id}\""),
            st.tcp_buffers_reused,
        );
        for (cap, n) in &st.caps_hit_by_cap {
            caps.sample(
                "slipway_caps_hit_total",
                &format!("sandbox=\"{id}\",cap=\"{cap}\""),
                *n,
            );
        }
    }

    let mut out = String::new();
    let mut count = Family::new(
        "slipway_sandboxes",
        "gauge",
        "Sandboxes served by this process.",
    );
    count.sample("slipway_sandboxes", "", sandboxes.len());
    let mut rss = Family::new(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    rss.sample(
        "process_resident_memory_bytes",
        "",
        resident_bytes().unwrap_or(0),
    );
    let mut fds = Family::new("process_open_fds", "gauge", "Open file descriptors.");
    fds.sample("process_open_fds", "", open_fds().unwrap_or(0));
    let mut inbound = Family::new(
        "slipway_gateway_guest_connections",
        "gauge",
        "Connections from the gateway into guests now (requests in flight and idle kept ones).",
    );
    inbound.sample(
        "slipway_gateway_guest_connections",
        "",
        shared
            .registry
            .guest_connections
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    for f in [
        count, rss, fds, inbound, up, flows, open, bytes, dropped, caps, panics, reused, names,
        rules,
    ] {
        out.push_str(&f.text);
    }
    if let Some(gw) = shared.gateway.get() {
        out.push_str(&gateway_families(gw));
    }
    if let Some(node) = shared.cluster.get() {
        out.push_str(&crate::cluster::node_families(node, &node.tunnels));
    }
    out
}

/// The public gateway's connections and refusals.
pub(crate) fn gateway_families(gw: &ingress::Gateway) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut conns = Family::new(
        "slipway_gateway_connections",
        "gauge",
        "Public client connections open now (HTTP, upgrades, forwards).",
    );
    conns.sample("slipway_gateway_connections", "", gw.open_connections());
    let mut clients = Family::new(
        "slipway_gateway_clients",
        "gauge",
        "Client addresses (IPv6: /64s) with public connections open now.",
    );
    clients.sample("slipway_gateway_clients", "", gw.clients());
    let mut refused = Family::new(
        "slipway_gateway_connections_refused_total",
        "counter",
        "Public connections refused because a gateway cap was reached, by cap.",
    );
    let stats = gw.stats();
    for (cap, n) in [
        ("max_connections", stats.over_max_connections.load(Relaxed)),
        (
            "max_connections_per_client",
            stats.over_max_connections_per_client.load(Relaxed),
        ),
    ] {
        refused.sample(
            "slipway_gateway_connections_refused_total",
            &format!("cap=\"{cap}\""),
            n,
        );
    }
    [conns, clients, refused].map(|f| f.text).concat()
}

/// Resident set size, from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * vmm_glue::sys::page_size()?)
}

pub(crate) fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
