//! Many hosts end to end: real etcd members, real `slipway serve` nodes with
//! `[cluster]`, real `slipway edge` processes, all on the loopback of a world
//! namespace the test makes (tests/common), and real guests: each sandbox is
//! a tap a node opens, moved into a namespace of its own where the kernel is
//! the guest. Clients are curl and small Python scripts. Every process a
//! test starts is killed when the test ends, passed or failed; every wait is
//! bounded.
//!
//! The fault list, one test each: requests reach guests on two
//! nodes; a SIGKILLed node's routes leave every edge within the lease TTL;
//! a SIGSTOPped node loses its routes and publishes them again; edges ride
//! out a store restart (and a compaction while away); a rotated token is
//! refused at once; a late delete cannot remove another node's entry;
//! garbage under the prefix is skipped; a three-member store loses one.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::World;

const DOMAIN: &str = "edge.test";
const CERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster-certs");
const IDENT_GUEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/serve_guest.py");
const WEB_GUEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/ingress_guest.py"
);
const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/ingress_client.py"
);
const CLUSTER_CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/cluster_client.py"
);

/// Why these tests cannot run here (besides `common::cannot_run`).
fn cannot_run() -> Option<String> {
    if let Some(why) = common::cannot_run() {
        return Some(why);
    }
    for (tool, package) in [
        ("etcd", "etcd-server"),
        ("etcdctl", "etcd-client"),
        ("openssl", "openssl"),
    ] {
        if !common::has_tool(tool) {
            return Some(format!("needs `{tool}` (apt-get install {package})"));
        }
    }
    None
}

macro_rules! require_cluster {
    () => {
        if let Some(why) = cannot_run() {
            if std::env::var("SLIPWAY_E2E").as_deref() == Ok("required") {
                panic!("end-to-end test cannot run: {why}");
            }
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// A process in the world namespace, its output collected; stopped (SIGCONT,
/// SIGTERM, then SIGKILL) when dropped.
struct Proc {
    what: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(w: &World, what: &str, program: &str, args: &[String], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &w.name, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut l = sink.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Proc {
            what: what.to_string(),
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait (bounded) until the output holds `needle`.
    fn wait_for(&self, needle: &str, limit: Duration) {
        let until = Instant::now() + limit;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < until,
                "{}: no {needle:?} within {limit:?}:\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: plain kill(2) on our own child (ip netns exec execs it).
            unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait (bounded) for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            match self.child.as_mut().map(|c| c.try_wait()) {
                None | Some(Ok(Some(_))) => {
                    self.child = None;
                    return true;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        if !self.wait_exit(Duration::from_secs(5)) {
            self.kill();
        }
    }
}

/// One etcd member on the world's loopback.
struct Etcd {
    proc: Option<Proc>,
    name: String,
    args: Vec<String>,
    client: String,
}

impl Etcd {
    /// Member `name` of a cluster whose members are `all` (name, client
    /// port, peer port).
    fn start(w: &World, name: &str, all: &[(&str, u16, u16)]) -> Etcd {
        let &(_, client, peer) = all.iter().find(|m| m.0 == name).unwrap();
        let initial: Vec<String> = all
            .iter()
            .map(|(n, _, p)| format!("{n}=http://127.0.0.1:{p}"))
            .collect();
        let data = w.dir.join(format!("etcd-{name}"));
        let args: Vec<String> = [
            "--name",
            name,
            "--data-dir",
            &data.to_string_lossy(),
            "--listen-client-urls",
            &format!("http://127.0.0.1:{client}"),
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{client}"),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-cluster",
            &initial.join(","),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "slipway-test",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut e = Etcd {
            proc: None,
            name: name.to_string(),
            args,
            client: format!("http://127.0.0.1:{client}"),
        };
        e.run(w);
        e
    }

    fn run(&mut self, w: &World) {
        self.proc = Some(Proc::spawn(
            w,
            &format!("etcd {}", self.name),
            "etcd",
            &self.args,
            &[],
        ));
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Start again on the same data directory.
    fn restart(&mut self, w: &World) {
        self.kill();
        self.run(w);
    }
}

/// `etcdctl ARGS` against `endpoints`, from inside the world.
fn etcdctl(w: &World, endpoints: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["20", "ip", "netns", "exec", &w.name, "etcdctl"])
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap()
}

fn etcdctl_ok(w: &World, endpoints: &str, args: &[&str]) -> String {
    let out = etcdctl(w, endpoints, args);
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Wait (bounded) until every member answers healthy.
fn wait_store(w: &World, endpoints: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(w, endpoints, &["endpoint", "health"]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < until,
            "etcd not healthy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The store's current revision.
fn revision(w: &World, endpoints: &str) -> i64 {
    let out = etcdctl_ok(w, endpoints, &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["Status"]["header"]["revision"].as_i64().unwrap()
}

/// One etcd member on 127.0.0.1:2379, started and healthy.
fn one_store(w: &World) -> Etcd {
    let e = Etcd::start(w, "s1", &[("s1", 2379, 2380)]);
    wait_store(w, &e.client);
    e
}

/// The cluster's CA and certificates, made by the README's script.
fn certs(w: &World) -> PathBuf {
    let dir = w.dir.join("certs");
    let out = Command::new(CERTS)
        .arg(&dir)
        .args(["host-a", "host-b", "host-c", "--edge", "edge"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cluster-certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A `slipway serve` node of the cluster.
struct Node {
    proc: Proc,
    name: String,
    socket: PathBuf,
    metrics: u16,
}

impl Node {
    /// Node `name` (host-a, host-b, host-c: certificates exist for those),
    /// its ports at 7441/8081/9461 plus `n`; `sandbox` and `cluster` are
    /// more keys for those sections.
    fn start(
        w: &World,
        name: &str,
        n: u16,
        store: &str,
        certs: &Path,
        sandbox: &str,
        cluster: &str,
    ) -> Node {
        let socket = w.dir.join(format!("{name}.sock"));
        let config = w.dir.join(format!("{name}.toml"));
        let tunnel = 7441 + n;
        let metrics = 9461 + n;
        std::fs::write(
            &config,
            format!(
                "log = \"info\"\n\
                 [control]\nsocket = \"{socket}\"\n\
                 [gateway]\nlisten = \"127.0.0.1:{gw}\"\ndomain = \"{DOMAIN}\"\ndrain_timeout = 2\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
                 [sandbox]\ndns_upstream = \"192.0.2.53\"\n{sandbox}\n\
                 [cluster]\nstore = \"{store}\"\nnode = \"{name}\"\n\
                 advertise = \"127.0.0.1:{tunnel}\"\nlisten = \"127.0.0.1:{tunnel}\"\n\
                 ca = \"{c}/ca.pem\"\ncert = \"{c}/{name}.pem\"\nkey = \"{c}/{name}-key.pem\"\n\
                 {cluster}\n",
                socket = socket.display(),
                gw = 8081 + n,
                c = certs.display(),
            ),
        )
        .unwrap();
        let proc = Proc::spawn(
            w,
            name,
            common::slipway(),
            &[
                "serve".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            &[],
        );
        proc.wait_for("slipway: serving", Duration::from_secs(10));
        proc.wait_for("joined the cluster", Duration::from_secs(10));
        Node {
            proc,
            name: name.to_string(),
            socket,
            metrics,
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(common::slipway())
            .arg("ctl")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn ctl_ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "{}: slipway ctl {args:?}: {}\n--- serve ---\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr),
            self.proc.log()
        );
        if out.stdout.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A sandbox on this node, its guest a namespace with `server` running.
    fn sandbox(
        &self,
        w: &World,
        id: &str,
        flags: &[&str],
        server: Server,
    ) -> (Guest, serde_json::Value) {
        let tap = format!("c{}{id}", &self.name[5..]);
        let mut args = vec!["create", id, "--tap", &tap];
        args.extend_from_slice(flags);
        let created = self.ctl_ok(&args);
        let guest = Guest::adopt(w, id, &tap, &self.name);
        guest.serve(server, id);
        (guest, created)
    }

    fn metrics(&self, w: &World) -> String {
        sh(
            w,
            &format!(
                "curl -sS --max-time 5 http://127.0.0.1:{}/metrics",
                self.metrics
            ),
        )
    }
}

/// What a guest runs on port 8000.
#[derive(Clone, Copy)]
enum Server {
    /// serve_guest.py: "hello from <id>".
    Ident,
    /// ingress_guest.py: /headers, /sse, /ws, /upload.
    Web,
}

/// A guest: the kernel of a namespace of its own, behind a node's tap.
struct Guest {
    ns: String,
    servers: Mutex<Vec<Child>>,
}

impl Guest {
    fn adopt(w: &World, id: &str, tap: &str, node: &str) -> Guest {
        let ns = format!("{}{}{id}", w.name, &node[5..]);
        let guest = Guest {
            ns,
            servers: Mutex::new(Vec::new()),
        };
        run_ok(&format!(
            "ip netns add {ns}
             ip -n {w} link set {tap} netns {ns}
             ip -n {ns} link set lo up
             ip -n {ns} link set {tap} up
             ip -n {ns} addr add 10.0.2.15/24 dev {tap}
             ip -n {ns} route add default via 10.0.2.2",
            ns = guest.ns,
            w = w.name
        ));
        guest
    }

    fn serve(&self, server: Server, id: &str) {
        let script = match server {
            Server::Ident => IDENT_GUEST,
            Server::Web => WEB_GUEST,
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3", script])
            .args(matches!(server, Server::Ident).then_some(id))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            for _ in lines {}
        });
        self.servers.lock().unwrap().push(child);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(20))
                .ok()
                .flatten()
                .as_deref(),
            Some("ready"),
            "the guest's server did not start"
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        for mut c in self.servers.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!("ip netns pids {} | xargs -r kill -9", self.ns),
            ])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A `slipway edge`.
struct Edge {
    proc: Proc,
    port: u16,
    metrics: u16,
}

impl Edge {
    /// Edge `n`: public gateway on 8080 + 10n, metrics and health on 9465 +
    /// n; `gateway` and `cluster` are more keys for those sections.
    fn start(w: &World, n: u16, store: &str, certs: &Path, gateway: &str, cluster: &str) -> Edge {
        let port = 8080 + 10 * n;
        let metrics = 9465 + n;
        let config = w.dir.join(format!("edge{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "log = \"info\"\n\
                 [gateway]\nlisten = \"127.0.0.1:{port}\"\ndomain = \"{DOMAIN}\"\ndrain_timeout = 2\n{gateway}\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
                 [cluster]\nstore = \"{store}\"\nca = \"{c}/ca.pem\"\n\
                 cert = \"{c}/edge.pem\"\nkey = \"{c}/edge-key.pem\"\n{cluster}\n",
                c = certs.display()
            ),
        )
        .unwrap();
        let proc = Proc::spawn(
            w,
            &format!("edge {n}"),
            common::slipway(),
            &[
                "edge".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            &[],
        );
        proc.wait_for("slipway: edge serving", Duration::from_secs(10));
        proc.wait_for("route table listed", Duration::from_secs(10));
        Edge {
            proc,
            port,
            metrics,
        }
    }

    fn health(&self, w: &World) -> serde_json::Value {
        let out = w.exec(&format!(
            "curl -sS --max-time 5 http://127.0.0.1:{}/health",
            self.metrics
        ));
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    fn metrics(&self, w: &World) -> String {
        sh(
            w,
            &format!(
                "curl -sS --max-time 5 http://127.0.0.1:{}/metrics",
                self.metrics
            ),
        )
    }

    fn routes(&self, w: &World) -> i64 {
        self.health(w)["routes"].as_i64().unwrap_or(-1)
    }

    /// Wait (bounded) until the route table holds `n` sandboxes; how long it took.
    fn wait_routes(&self, w: &World, n: i64, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let now = self.routes(w);
            if now == n {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "edge {}: {now} routes, not {n}, after {limit:?}\n{}",
                self.port,
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET `path` on port 8000 of sandbox `id`: (status, body).
    fn get(&self, w: &World, id: &str, path: &str, extra: &str) -> (u16, String) {
        let out = w.exec(&format!(
            "curl -sS --max-time 20 {extra} -H 'Host: 8000-{id}.{DOMAIN}' \
             -w '\\n%{{http_code}}' http://127.0.0.1:{}{path}",
            self.port
        ));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

fn run_ok(script: &str) {
    let out = Command::new("sh").args(["-ec", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh(w: &World, script: &str) -> String {
    let out = w.exec(script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of one metric line `name{labels} value` (or `name value`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The headers the guest's server received, from its /headers JSON.
fn seen_headers(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["headers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|pair| {
                    format!(
                        "{}: {}",
                        pair[0].as_str().unwrap_or(""),
                        pair[1].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A wildcard certificate for the edge's public TLS, under a test CA.
fn public_tls(dir: &Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "public test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![format!("*.{DOMAIN}")])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(path("pub-ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("pub-cert.pem"), leaf.pem()).unwrap();
    std::fs::write(path("pub-key.pem"), key.serialize_pem()).unwrap();
    (
        path("pub-ca.pem"),
        path("pub-cert.pem"),
        path("pub-key.pem"),
    )
}

const STORE: &str = "http://127.0.0.1:2379";

#[test]
fn requests_through_the_edge_reach_guests_on_two_nodes_with_everything_the_gateway_does() {
    require_cluster!();
    let w = World::new();
    let _store = one_store(&w);
    let certs = certs(&w);
    let a = Node::start(&w, "host-a", 0, STORE, &certs, "", "");
    let b = Node::start(&w, "host-b", 1, STORE, &certs, "max_inbound = 3", "");
    let (pub_ca, pub_cert, pub_key) = public_tls(&w.dir);
    // Edge 0: plain HTTP (h1, h2c); edge 1: TLS (h2 by ALPN).
    let plain = Edge::start(&w, 0, STORE, &certs, "", "");
    let tls = Edge::start(
        &w,
        1,
        STORE,
        &certs,
        &format!("tls_cert = \"{pub_cert}\"\ntls_key = \"{pub_key}\""),
        "",
    );

    let (_web, _) = a.sandbox(&w, "web", &[], Server::Web);
    let (_hello, _) = b.sandbox(&w, "hello", &[], Server::Ident);
    let (_priv, created) = b.sandbox(
        &w,
        "priv",
        &[
            "--public-traffic=false",
            "--mask-request-host",
            "localhost:${PORT}",
        ],
        Server::Web,
    );
    let (_few, _) = b.sandbox(&w, "few", &[], Server::Web);
    let token = created["trafficAccessToken"].as_str().unwrap().to_string();
    plain.wait_routes(&w, 4, Duration::from_secs(5));
    tls.wait_routes(&w, 4, Duration::from_secs(5));

    // One on node B, one on node A.
    let (code, body) = plain.get(&w, "hello", "/", "");
    assert_eq!(
        (code, body.as_str()),
        (200, "hello from hello"),
        "{}",
        plain.proc.log()
    );
    let host = format!("8000-web.{DOMAIN}:{}", plain.port);
    let (code, body) = plain.get(&w, "web", "/headers", "--http1.1");
    assert_eq!(code, 200, "{body}");
    let seen = seen_headers(&body);
    for want in [
        format!("x-forwarded-host: 8000-web.{DOMAIN}"),
        "x-forwarded-for: 127.0.0.1".into(),
        "x-forwarded-proto: http".into(),
        format!("host: 8000-web.{DOMAIN}"),
    ] {
        assert!(seen.contains(&want), "guest did not see {want}: {seen:?}");
    }
    // h2c with prior knowledge.
    let out = sh(
        &w,
        &format!(
            "curl -sS --max-time 20 --http2-prior-knowledge -o /dev/null \
             -w '%{{http_code}} %{{http_version}}' -H 'Host: {host}' http://127.0.0.1:{}/headers",
            plain.port
        ),
    );
    assert_eq!(out, "200 2");
    // h2 over TLS (ALPN) at the TLS edge.
    let out = sh(
        &w,
        &format!(
            "curl -sS --max-time 20 --cacert {pub_ca} \
             --resolve 8000-hello.{DOMAIN}:{p}:127.0.0.1 \
             -w ' %{{http_code}} %{{http_version}}' https://8000-hello.{DOMAIN}:{p}/",
            p = tls.port
        ),
    );
    assert_eq!(out, "hello from hello 200 2", "{}", tls.proc.log());
    // A WebSocket (an upgrade, spliced through the tunnel) and SSE
    // (streamed event by event, not buffered).
    let ws = sh(
        &w,
        &format!(
            "timeout 60 python3 {CLIENT} ws 127.0.0.1 {} {host}",
            plain.port
        ),
    );
    assert_eq!(ws.trim(), "ws-ok");
    let sse = sh(
        &w,
        &format!(
            "timeout 60 python3 {CLIENT} sse 127.0.0.1 {} {host} 10 150",
            plain.port
        ),
    );
    let f: Vec<&str> = sse.split_whitespace().collect();
    assert_eq!(&f[..2], ["sse-ok", "10"], "{sse}");
    let (first, last): (u64, u64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
    assert!(first < 1000 && last >= first + 1000, "not streamed: {sse}");
    // A 16 MiB upload streams through and arrives whole.
    let blob = w.dir.join("up.bin");
    run_ok(&format!("head -c 16M /dev/urandom > {}", blob.display()));
    let want = common::sha256_file(&blob);
    let got = sh(
        &w,
        &format!(
            "curl -sS --max-time 60 -T {} -H 'Host: {host}' http://127.0.0.1:{}/upload",
            blob.display(),
            plain.port
        ),
    );
    assert_eq!(got.split_whitespace().next(), Some(want.as_str()), "{got}");

    // The status table through the edge: the gateway's codes and bodies.
    let (code, body) = plain.get(&w, "nobody", "/", "");
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("\"error\":\"sandbox_not_found\""), "{body}");
    let (code, body) = plain.get(&w, "nobody", "/", "-H 'Accept: text/html'");
    assert_eq!(code, 502);
    assert!(
        body.starts_with("<!doctype html>") && body.contains("sandbox_not_found"),
        "{body}"
    );
    let curl_host = |h: &str| {
        sh(
            &w,
            &format!(
                "curl -sS --max-time 20 -H 'Host: {h}' -w '\\n%{{http_code}}' http://127.0.0.1:{}/",
                plain.port
            ),
        )
    };
    let out = curl_host(&format!("8001-web.{DOMAIN}"));
    assert!(
        out.ends_with("\n502") && out.contains("port_not_open"),
        "{out}"
    );
    let out = curl_host("nonsense");
    assert!(
        out.ends_with("\n400") && out.contains("invalid_host"),
        "{out}"
    );

    // A private sandbox on B: token checked at the edge, Host masked, the
    // token header kept from the guest.
    let (code, body) = plain.get(&w, "priv", "/headers", "");
    assert_eq!(code, 403);
    assert!(body.contains("missing_traffic_access_token"), "{body}");
    let (code, body) = plain.get(
        &w,
        "priv",
        "/headers",
        "-H 'e2b-traffic-access-token: guess'",
    );
    assert_eq!(code, 403);
    assert!(body.contains("invalid_traffic_access_token"), "{body}");
    let (code, body) = plain.get(
        &w,
        "priv",
        "/headers",
        &format!("-H 'e2b-traffic-access-token: {token}'"),
    );
    assert_eq!(code, 200, "{body}");
    let seen = seen_headers(&body);
    assert!(
        seen.contains(&"host: localhost:8000".to_string()),
        "{seen:?}"
    );
    assert!(
        !body.contains(&token),
        "the token reached the guest: {body}"
    );

    // Node B's cap of 3 tunnels into one sandbox: the 4th gets 429.
    let held = sh(
        &w,
        &format!(
            "timeout 60 python3 {CLIENT} hold 127.0.0.1 {} 8000-few.{DOMAIN} 3",
            plain.port
        ),
    );
    assert!(
        held.starts_with("held 3 extra 429") && held.contains("too_many_connections"),
        "{held}"
    );
    let m = b.metrics(&w);
    assert!(
        metric(&m, "slipway_cluster_tunnels_total{outcome=\"over_cap\"}").unwrap() >= 1.0,
        "{m}"
    );
    let m = plain.metrics(&w);
    for series in [
        "slipway_edge_tunnels_total{outcome=\"opened\"}",
        "slipway_edge_tunnels_total{outcome=\"port_not_open\"}",
        "slipway_edge_tunnels_total{outcome=\"over_cap\"}",
    ] {
        assert!(metric(&m, series).unwrap_or(0.0) >= 1.0, "{series}: {m}");
    }
    assert_eq!(metric(&m, "slipway_edge_routes"), Some(4.0), "{m}");
}
