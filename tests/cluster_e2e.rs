//! Many hosts end to end: real etcd members, real `slipway serve` nodes with
//! `[cluster]`, real `slipway edge` processes, all on the loopback of a world
//! namespace the test makes (tests/common), and real guests: each sandbox is
//! a tap a node opens, moved into a namespace of its own where the kernel is
//! the guest. Clients are curl and small Python scripts. Every process a
//! test starts is killed when the test ends, passed or failed; every wait is
//! bounded.
//!
//! The issue's fault list, one test each: requests reach guests on two
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

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
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
        guest.serve(server, &format!("{id}@{}", self.name));
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
#[derive(Clone)]
enum Server {
    /// serve_guest.py: "hello from <id>@<node>".
    Ident,
    /// ingress_guest.py: /headers, /sse, /ws, /upload.
    Web,
    /// ingress_guest.py, and the same over TLS on 8443 with this
    /// certificate and key.
    WebTls(PathBuf, PathBuf),
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

    /// Start `server`; an `Ident` server says "hello from NAME".
    fn serve(&self, server: Server, name: &str) {
        let script = match server {
            Server::Ident => IDENT_GUEST,
            Server::Web | Server::WebTls(..) => WEB_GUEST,
        };
        let tls = match &server {
            Server::WebTls(cert, key) => vec![
                "--tls-cert".into(),
                cert.clone().into_os_string(),
                "--tls-key".into(),
                key.clone().into_os_string(),
            ],
            _ => Vec::new(),
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3", script])
            .args(matches!(server, Server::Ident).then_some(name))
            .args(tls)
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
    // httpsPorts: the guest serves TLS on 8443 with a self-signed
    // certificate; the edge speaks TLS to it through the tunnel.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["guest.internal".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_pem, key_pem) = (w.dir.join("guest-cert.pem"), w.dir.join("guest-key.pem"));
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let (_sec, _) = a.sandbox(
        &w,
        "sec",
        &["--https-port", "8443"],
        Server::WebTls(cert_pem, key_pem),
    );
    let token = created["trafficAccessToken"].as_str().unwrap().to_string();
    plain.wait_routes(&w, 5, Duration::from_secs(5));
    tls.wait_routes(&w, 5, Duration::from_secs(5));
    let out = sh(
        &w,
        &format!(
            "curl -sS --max-time 20 -H 'Host: 8443-sec.{DOMAIN}' http://127.0.0.1:{}/headers",
            plain.port
        ),
    );
    assert!(
        out.contains(&format!(
            r#""tls": {{"sni": "8443-sec.{DOMAIN}", "alpn": "http/1.1"}}"#
        )),
        "{out}\n{}",
        plain.proc.log()
    );

    // One on node B, one on node A.
    let (code, body) = plain.get(&w, "hello", "/", "");
    assert_eq!(
        (code, body.as_str()),
        (200, "hello from hello@host-b"),
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
    assert_eq!(out, "hello from hello@host-b 200 2", "{}", tls.proc.log());
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
    assert_eq!(metric(&m, "slipway_edge_routes"), Some(5.0), "{m}");
    // The edge confined itself: no capability, no_new_privs, seccomp.
    let status = std::fs::read_to_string(format!("/proc/{}/status", plain.proc.pid())).unwrap();
    for want in ["NoNewPrivs:\t1", "Seccomp:\t2", "CapEff:\t0000000000000000"] {
        assert!(status.contains(want), "{want}: {status}");
    }
    // After the first tunnel to a node, the next ones resume its TLS session.
    assert!(
        metric(&m, "slipway_edge_tunnel_handshakes_total{kind=\"resumed\"}").unwrap() >= 1.0,
        "{m}"
    );
}

/// Wait (bounded) until `f` holds; how long it took.
fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// What the store holds under a key ("" when nothing).
fn stored(w: &World, endpoints: &str, key: &str) -> String {
    etcdctl_ok(w, endpoints, &["get", key, "--print-value-only"])
}

#[test]
fn a_killed_nodes_routes_leave_every_edge_within_the_ttl_and_a_drained_one_leaves_at_once() {
    require_cluster!();
    let w = World::new();
    let _store = one_store(&w);
    let certs = certs(&w);
    let mut a = Node::start(&w, "host-a", 0, STORE, &certs, "", "lease_ttl = 3");
    let mut b = Node::start(&w, "host-b", 1, STORE, &certs, "", "lease_ttl = 30");
    let edges = [
        Edge::start(&w, 0, STORE, &certs, "", ""),
        Edge::start(&w, 1, STORE, &certs, "", ""),
    ];
    let (_ga, _) = a.sandbox(&w, "on-a", &[], Server::Ident);
    let (_gb, _) = b.sandbox(&w, "on-b", &[], Server::Ident);
    for e in &edges {
        e.wait_routes(&w, 2, Duration::from_secs(5));
        assert_eq!(e.get(&w, "on-a", "/", "").0, 200);
        assert_eq!(e.get(&w, "on-b", "/", "").0, 200);
    }

    a.proc.kill();
    let killed = Instant::now();
    // Its sandboxes get 502 at once (the node refuses), never a hang.
    let asked = Instant::now();
    let (code, body) = edges[0].get(&w, "on-a", "/", "");
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("sandbox_not_found"), "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    // Its routes leave every edge within the TTL (3 s) plus 2 s.
    for e in &edges {
        let left = Duration::from_secs(5).saturating_sub(killed.elapsed());
        e.wait_routes(&w, 1, left);
    }
    eprintln!(
        "node A's routes left both edges {:?} after SIGKILL",
        killed.elapsed()
    );
    for e in &edges {
        let (code, body) = e.get(&w, "on-a", "/", "");
        assert_eq!(code, 502);
        assert!(body.contains("sandbox_not_found"), "{body}");
        assert_eq!(e.get(&w, "on-b", "/", "").1, "hello from on-b@host-b");
    }

    // SIGTERM: B revokes its lease before anything else, so its routes
    // leave at once, not after its 30 s TTL.
    b.proc.signal(libc::SIGTERM);
    let drained = Instant::now();
    for e in &edges {
        e.wait_routes(&w, 0, Duration::from_secs(3));
    }
    eprintln!(
        "node B's routes left both edges {:?} after SIGTERM",
        drained.elapsed()
    );
    assert!(
        b.proc.wait_exit(Duration::from_secs(10)),
        "{}",
        b.proc.log()
    );
    assert!(
        b.proc.log().contains("left the cluster (lease revoked)"),
        "{}",
        b.proc.log()
    );
}

#[test]
fn a_stopped_node_loses_its_routes_and_publishes_them_again_when_it_wakes() {
    require_cluster!();
    let w = World::new();
    let _store = one_store(&w);
    let certs = certs(&w);
    let a = Node::start(&w, "host-a", 0, STORE, &certs, "", "lease_ttl = 6");
    let edge = Edge::start(&w, 0, STORE, &certs, "", "");
    let (_g, _) = a.sandbox(&w, "nap", &[], Server::Ident);
    let (_k, _) = a.sandbox(&w, "kept", &[], Server::Web);
    edge.wait_routes(&w, 2, Duration::from_secs(5));
    assert_eq!(edge.get(&w, "nap", "/", "").1, "hello from nap@host-a");
    // An HTTP/1.1 guest: the edge keeps its connection for the next request.
    assert_eq!(edge.get(&w, "kept", "/headers", "").0, 200);

    a.proc.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    // A node that does not answer: 504 after about a second for a new
    // tunnel; a request on a kept one waits for the link's pings to fail
    // first (about three seconds). Never a hang.
    let asked = Instant::now();
    let (code, body) = edge.get(&w, "nap", "/", "");
    let took = asked.elapsed();
    assert_eq!(code, 504, "{body}\n{}", edge.proc.log());
    assert!(body.contains("sandbox_timed_out"), "{body}");
    assert!(took < Duration::from_secs(3), "the 504 took {took:?}");
    eprintln!("a stopped node's sandbox answered 504 after {took:?}");
    let asked = Instant::now();
    let (code, body) = edge.get(&w, "kept", "/headers", "");
    let took = asked.elapsed();
    assert_eq!(code, 504, "{body}\n{}", edge.proc.log());
    assert!(took < Duration::from_secs(5), "the 504 took {took:?}");
    eprintln!("on a kept connection: 504 after {took:?}");
    // Stopped past its TTL (6 s): its routes vanish within 2 s more.
    edge.wait_routes(
        &w,
        0,
        Duration::from_secs(8).saturating_sub(stopped.elapsed()),
    );
    let (code, body) = edge.get(&w, "nap", "/", "");
    assert_eq!(code, 502);
    assert!(body.contains("sandbox_not_found"), "{body}");

    // Awake: it finds its lease gone, takes a new one and publishes again.
    a.proc.signal(libc::SIGCONT);
    let woke = Instant::now();
    edge.wait_routes(&w, 2, Duration::from_secs(10));
    eprintln!("the routes were back {:?} after SIGCONT", woke.elapsed());
    let (code, body) = edge.get(&w, "nap", "/", "");
    assert_eq!((code, body.as_str()), (200, "hello from nap@host-a"));
    let log = a.proc.log();
    assert!(log.contains("the lease is gone from the store"), "{log}");
    assert!(log.contains("published every sandbox again"), "{log}");
    let m = a.metrics(&w);
    assert_eq!(
        metric(&m, "slipway_cluster_leases_granted_total"),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn edges_ride_out_a_store_restart_and_creates_answer_503_meanwhile() {
    require_cluster!();
    let w = World::new();
    let mut store = one_store(&w);
    let certs = certs(&w);
    let a = Node::start(&w, "host-a", 0, STORE, &certs, "", "");
    let edge = Edge::start(&w, 0, STORE, &certs, "", "stale_after = 4");
    let (_gp, _) = a.sandbox(&w, "open", &[], Server::Ident);
    let (_gs, created) = a.sandbox(&w, "shut", &["--public-traffic=false"], Server::Ident);
    let token = format!(
        "-H 'e2b-traffic-access-token: {}'",
        created["trafficAccessToken"].as_str().unwrap()
    );
    a.ctl_ok(&["create", "gone", "--tap", "cagone"]);
    edge.wait_routes(&w, 3, Duration::from_secs(5));

    store.kill();
    let down = Instant::now();
    // A delete while the store is down is done here at once; its record
    // goes when the store is back.
    a.ctl_ok(&["delete", "gone"]);
    // The edge serves from its copy, private sandboxes too (for now).
    assert_eq!(edge.get(&w, "open", "/", "").0, 200);
    assert_eq!(edge.get(&w, "shut", "/", &token).0, 200);
    // A create answers 503 and leaves nothing behind.
    let asked = Instant::now();
    let out = a.ctl(&["create", "late", "--tap", "calate"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("(503") && err.contains("cluster store"),
        "{err}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "{:?}",
        asked.elapsed()
    );
    let listed = a.ctl_ok(&["list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert!(
        !w.exec("ip link show calate").status.success(),
        "the tap stayed"
    );

    // Past stale_after without the store: private sandboxes are refused,
    // public ones keep working, and the health endpoint says so.
    until("stale", Duration::from_secs(8), || {
        edge.health(&w)["status"] == "stale"
    });
    // The store last answered a progress request at most a second before it died.
    assert!(
        down.elapsed() >= Duration::from_secs(3),
        "{:?}",
        down.elapsed()
    );
    let (code, body) = edge.get(&w, "shut", "/", &token);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("routes_stale"), "{body}");
    assert_eq!(edge.get(&w, "open", "/", "").0, 200);
    let health = w.exec(&format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{}/health",
        edge.metrics
    ));
    assert_eq!(String::from_utf8_lossy(&health.stdout), "503");

    // The store is back (same data directory): everything converges.
    store.restart(&w);
    wait_store(&w, STORE);
    let back = until("fresh", Duration::from_secs(10), || {
        edge.health(&w)["status"] == "ok"
    });
    eprintln!("the edge was fresh again {back:?} after the store came back");
    edge.wait_routes(&w, 2, Duration::from_secs(10));
    assert_eq!(stored(&w, STORE, "/slipway/v1/sbx/gone").trim(), "");
    assert_eq!(edge.get(&w, "shut", "/", &token).0, 200);
    let mut made = None;
    until("a create", Duration::from_secs(10), || {
        let out = a.ctl(&["create", "late", "--tap", "calate"]);
        made = out.status.success().then_some(out);
        made.is_some()
    });
    let g = Guest::adopt(&w, "late", "calate", "host-a");
    g.serve(Server::Ident, "late@host-a");
    edge.wait_routes(&w, 3, Duration::from_secs(5));
    assert_eq!(edge.get(&w, "late", "/", "").1, "hello from late@host-a");
}

#[test]
fn a_compaction_while_the_edge_was_away_loses_no_delete() {
    require_cluster!();
    let w = World::new();
    let mut store = one_store(&w);
    let certs = certs(&w);
    let a = Node::start(&w, "host-a", 0, STORE, &certs, "", "");
    let edge = Edge::start(&w, 0, STORE, &certs, "", "");
    a.ctl_ok(&["create", "x1", "--tap", "cax1"]);
    a.ctl_ok(&["create", "x2", "--tap", "cax2"]);
    edge.wait_routes(&w, 2, Duration::from_secs(5));

    // The edge is away while its watch breaks (the store restarts), x1 is
    // deleted, and the history is compacted past where its watch stood.
    edge.proc.signal(libc::SIGSTOP);
    store.restart(&w);
    wait_store(&w, STORE);
    a.ctl_ok(&["delete", "x1"]);
    until("x1 out of the store", Duration::from_secs(10), || {
        stored(&w, STORE, "/slipway/v1/sbx/x1").trim().is_empty()
    });
    for v in ["a", "b"] {
        etcdctl_ok(&w, STORE, &["put", "/unrelated", v]);
    }
    let rev = revision(&w, STORE).to_string();
    etcdctl_ok(&w, STORE, &["compact", &rev]);
    edge.proc.signal(libc::SIGCONT);

    // Its watch cannot resume: it lists again, and x1 goes.
    edge.wait_routes(&w, 1, Duration::from_secs(10));
    let m = edge.metrics(&w);
    assert!(
        metric(&m, "slipway_edge_compactions_total").unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "slipway_edge_lists_total").unwrap() >= 2.0,
        "{m}"
    );
    assert!(
        edge.proc.log().contains("compacted away"),
        "{}",
        edge.proc.log()
    );
}

#[test]
fn a_rotated_token_is_refused_through_the_edge_at_once() {
    require_cluster!();
    let w = World::new();
    let _store = one_store(&w);
    let certs = certs(&w);
    let a = Node::start(&w, "host-a", 0, STORE, &certs, "", "");
    let edge = Edge::start(&w, 0, STORE, &certs, "", "");
    let (_g, created) = a.sandbox(&w, "sec", &["--public-traffic=false"], Server::Web);
    let old = created["trafficAccessToken"].as_str().unwrap().to_string();
    edge.wait_routes(&w, 1, Duration::from_secs(5));
    let with = |t: &str| format!("-H 'e2b-traffic-access-token: {t}'");
    assert_eq!(edge.get(&w, "sec", "/headers", &with(&old)).0, 200);

    // A stream opened with the old token, through the edge.
    let mut stream = Command::new("ip")
        .args([
            "netns",
            "exec",
            &w.name,
            "timeout",
            "30",
            "python3",
            CLUSTER_CLIENT,
            "stream",
        ])
        .args([
            "127.0.0.1",
            &edge.port.to_string(),
            &format!("8000-sec.{DOMAIN}"),
            &old,
            "15",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = stream.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).ok().as_deref(),
        Some("open")
    );

    let new = a.ctl_ok(&["rotate-token", "sec"])["trafficAccessToken"]
        .as_str()
        .unwrap()
        .to_string();
    let rotated = Instant::now();
    // At once: the old token is refused, and what it opened is closed.
    let (code, body) = edge.get(&w, "sec", "/headers", &with(&old));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("invalid_traffic_access_token"), "{body}");
    let ended = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    assert!(
        ended.starts_with("closed"),
        "the old token's stream: {ended:?}"
    );
    eprintln!(
        "the old token's stream was cut {:?} after the rotation",
        rotated.elapsed()
    );
    // The edge learns the new digest from the watch.
    let learned = until("the new token works", Duration::from_secs(3), || {
        edge.get(&w, "sec", "/headers", &with(&new)).0 == 200
    });
    eprintln!("the new token worked through the edge {learned:?} after the rotation");
    assert_eq!(edge.get(&w, "sec", "/headers", &with(&old)).0, 403);
    let _ = stream.kill();
    let _ = stream.wait();
}

#[test]
fn a_late_delete_cannot_remove_another_nodes_entry() {
    require_cluster!();
    let w = World::new();
    let _store = one_store(&w);
    let certs = certs(&w);
    let a = Node::start(&w, "host-a", 0, STORE, &certs, "", "lease_ttl = 3");
    let b = Node::start(&w, "host-b", 1, STORE, &certs, "", "");
    let edge = Edge::start(&w, 0, STORE, &certs, "", "");
    let (_ga, _) = a.sandbox(&w, "dup", &[], Server::Ident);

    // B cannot take an id A holds: 409, and nothing is left on B.
    let out = b.ctl(&["create", "dup", "--tap", "cbdup"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sandbox id dup taken: node host-a holds it") && err.contains("(409"),
        "{err}"
    );
    assert_eq!(b.ctl_ok(&["list"]), serde_json::json!([]));
    assert!(
        !w.exec("ip link show cbdup").status.success(),
        "the tap stayed"
    );

    // A stops past its TTL; its record expires and B takes the id.
    a.proc.signal(libc::SIGSTOP);
    until("dup out of the store", Duration::from_secs(8), || {
        stored(&w, STORE, "/slipway/v1/sbx/dup").trim().is_empty()
    });
    let (_gb, _) = b.sandbox(&w, "dup", &[], Server::Ident);
    until("dup on B", Duration::from_secs(5), || {
        edge.get(&w, "dup", "/", "").1 == "hello from dup@host-b"
    });

    // A wakes: B holds the id, so A serves its sandbox on, unpublished...
    a.proc.signal(libc::SIGCONT);
    a.proc.wait_for(
        "another node claimed this sandbox's id",
        Duration::from_secs(10),
    );
    // ... and its late delete leaves B's entry alone.
    a.ctl_ok(&["delete", "dup"]);
    std::thread::sleep(Duration::from_millis(500));
    let held = stored(&w, STORE, "/slipway/v1/sbx/dup");
    assert!(held.contains("\"node\":\"host-b\""), "{held}");
    assert_eq!(edge.get(&w, "dup", "/", "").1, "hello from dup@host-b");
    let m = a.metrics(&w);
    assert_eq!(
        metric(&m, "slipway_cluster_ids_lost_total"),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn garbage_under_the_prefix_is_skipped_and_counted() {
    require_cluster!();
    let w = World::new();
    let _store = one_store(&w);
    let certs = certs(&w);
    let a = Node::start(&w, "host-a", 0, STORE, &certs, "", "");
    let edge = Edge::start(&w, 0, STORE, &certs, "", "");
    let (_g, _) = a.sandbox(&w, "good", &[], Server::Ident);
    edge.wait_routes(&w, 1, Duration::from_secs(5));

    let huge = "x".repeat(5000);
    for (key, value) in [
        ("junk", "not json at all"),
        ("NOT_AN_ID", "{}"),
        (
            "wild",
            r#"{"node":"host-a","addr":"0.0.0.0:1","public":true}"#,
        ),
        ("huge", huge.as_str()),
        (
            "half",
            r#"{"node":"host-a","addr":"127.0.0.1:7441","public":false}"#,
        ),
    ] {
        etcdctl_ok(
            &w,
            STORE,
            &["put", &format!("/slipway/v1/sbx/{key}"), value],
        );
    }
    // A well-formed record of a node that is not there.
    etcdctl_ok(
        &w,
        STORE,
        &[
            "put",
            "/slipway/v1/sbx/ghost",
            r#"{"node":"host-c","addr":"127.0.0.1:7449","public":true}"#,
        ],
    );
    until("five bad records", Duration::from_secs(5), || {
        metric(&edge.metrics(&w), "slipway_edge_bad_records") == Some(5.0)
    });
    let m = edge.metrics(&w);
    assert_eq!(
        metric(&m, "slipway_edge_bad_records_total"),
        Some(5.0),
        "{m}"
    );
    assert_eq!(metric(&m, "slipway_edge_routes"), Some(2.0), "{m}");
    assert!(
        edge.proc.log().contains("skipped a bad record"),
        "{}",
        edge.proc.log()
    );
    // The good route keeps working; the ghost's node is gone: 502 at once.
    assert_eq!(edge.get(&w, "good", "/", "").1, "hello from good@host-a");
    let asked = Instant::now();
    let (code, body) = edge.get(&w, "ghost", "/", "");
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("sandbox_not_found"), "{body}");
    assert!(asked.elapsed() < Duration::from_secs(3));

    // A second edge lists the same store: the same table, the same count.
    let e1 = Edge::start(&w, 1, STORE, &certs, "", "");
    let m = e1.metrics(&w);
    assert_eq!(metric(&m, "slipway_edge_bad_records"), Some(5.0), "{m}");
    assert_eq!(metric(&m, "slipway_edge_routes"), Some(2.0), "{m}");
    assert_eq!(e1.get(&w, "good", "/", "").1, "hello from good@host-a");
    // A bad value replaced by a good one is a route; deleted, it is no longer counted.
    etcdctl_ok(&w, STORE, &["del", "/slipway/v1/sbx/junk"]);
    until("four bad records", Duration::from_secs(5), || {
        metric(&edge.metrics(&w), "slipway_edge_bad_records") == Some(4.0)
    });
}

#[test]
fn a_three_member_store_loses_one_member_and_the_edges_do_not_notice() {
    require_cluster!();
    let w = World::new();
    let members = [("m1", 2379, 2380), ("m2", 2479, 2480), ("m3", 2579, 2580)];
    let mut store: Vec<Etcd> = members
        .iter()
        .map(|m| Etcd::start(&w, m.0, &members))
        .collect();
    let all = "http://127.0.0.1:2379,http://127.0.0.1:2479,http://127.0.0.1:2579";
    wait_store(&w, all);
    let certs = certs(&w);
    let a = Node::start(&w, "host-a", 0, all, &certs, "", "lease_ttl = 5");
    let b = Node::start(&w, "host-b", 1, all, &certs, "", "lease_ttl = 5");
    let edge = Edge::start(&w, 0, all, &certs, "", "");
    let (_ga, _) = a.sandbox(&w, "on-a", &[], Server::Ident);
    let (_gb, _) = b.sandbox(&w, "on-b", &[], Server::Ident);
    edge.wait_routes(&w, 2, Duration::from_secs(5));

    // The first member goes (the one every client lists first).
    store[0].kill();
    let killed = Instant::now();
    let mut served = 0;
    while killed.elapsed() < Duration::from_secs(8) {
        for id in ["on-a", "on-b"] {
            let (code, body) = edge.get(&w, id, "/", "");
            assert_eq!(
                code,
                200,
                "{id} {:?} after the kill: {body}",
                killed.elapsed()
            );
            served += 1;
        }
        let h = edge.health(&w);
        assert_eq!(h["status"], "ok", "{h}");
        assert_eq!(h["routes"], 2, "{h}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{served} requests served while one member of three was down");
    // Writes go on through the other two: a create, seen by the edge.
    until("a create", Duration::from_secs(10), || {
        a.ctl(&["create", "later", "--tap", "calater"])
            .status
            .success()
    });
    edge.wait_routes(&w, 3, Duration::from_secs(5));
    // The nodes kept their leases through it.
    for n in [&a, &b] {
        let m = n.metrics(&w);
        assert_eq!(
            metric(&m, "slipway_cluster_leases_granted_total"),
            Some(1.0),
            "{m}"
        );
    }
}

#[test]
fn bad_cluster_settings_are_refused_at_start_naming_the_key() {
    if !common::has_tool("openssl") {
        assert_ne!(
            std::env::var("SLIPWAY_E2E").as_deref(),
            Ok("required"),
            "needs openssl"
        );
        eprintln!("skipped: needs openssl");
        return;
    }
    let dir = common::Scratch::new("cluster-cfg");
    let certs = dir.0.join("certs");
    let made = Command::new(CERTS)
        .arg(&certs)
        .args(["host-a", "host-b"])
        .output()
        .unwrap();
    assert!(made.status.success());
    let c = certs.display();
    let run = |cmd: &str, text: String| {
        let path = dir.0.join(format!("{cmd}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(common::slipway())
            .args([cmd, "--print-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let node = |name: &str, cert: &str, store: &str| {
        run(
            "serve",
            format!(
                "[cluster]\nstore = \"{store}\"\nnode = \"{name}\"\nadvertise = \"127.0.0.1:7441\"\n\
                 ca = \"{c}/ca.pem\"\ncert = \"{c}/{cert}.pem\"\nkey = \"{c}/{cert}-key.pem\"\n"
            ),
        )
    };
    let (code, err) = node("host-a", "host-a", STORE);
    assert_eq!(code, Some(0), "{err}");
    // A node whose certificate names another node.
    let (code, err) = node("host-a", "host-b", STORE);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cluster.cert") && err.contains("not valid for node host-a"),
        "{err}"
    );
    // An edge's client certificate as a node's: not a server certificate.
    let (code, err) = node("edge", "edge", STORE);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster.cert"), "{err}");
    let (code, err) = node("host-a", "host-a", "127.0.0.1:2379");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cluster.store") && err.contains("http://HOST:PORT"),
        "{err}"
    );
    // An edge with a node's (server) certificate as its client certificate.
    let edge = |cert: &str, extra: &str| {
        run(
            "edge",
            format!(
                "[cluster]\nstore = \"{STORE}\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/{cert}.pem\"\n\
                 key = \"{c}/{cert}-key.pem\"\n{extra}"
            ),
        )
    };
    assert_eq!(edge("edge", "").0, Some(0));
    let (code, err) = edge("host-a", "");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("not a client certificate of the cluster CA"),
        "{err}"
    );
    let (code, err) = edge("edge", "stale_after = 0\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster.stale_after"), "{err}");
    let (code, err) = run("edge", "[cluster]\n".into());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster.store"), "{err}");
}
