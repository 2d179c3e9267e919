//! The egress proxy end to end (issue 14, item 1): a real kernel inside
//! `slipway run` reaches the world's servers through real SOCKS5 servers
//! from Debian, all inside the test's world namespace on TEST-NET
//! addresses: microsocks, danted with a username login, and stunnel4 in
//! front of microsocks for TLS, with a CA made here by openssl. The
//! servers see the proxy's address; a failure never becomes a direct
//! connection; a flow the policy denies never reaches the proxy.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Run, World};

const PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/probe.py");
/// microsocks listens here and connects out from here.
const MICROSOCKS: &str = "198.51.100.10";
/// danted, the same.
const DANTE: &str = "198.51.100.20";
/// stunnel4, in front of microsocks.
const STUNNEL: &str = "198.51.100.30";
/// A server that writes down every connection it accepts.
const WITNESS: &str = "203.0.113.1";
const WITNESS_PORT: u16 = 8081;
const LOGIN: (&str, &str) = ("proxyuser", "pr0xy-pass-e2e");

/// Skip (or, under SLIPWAY_E2E=required, fail) without the proxies.
fn have_proxies() -> bool {
    let missing: Vec<&str> = ["microsocks", "danted", "stunnel4", "openssl"]
        .into_iter()
        .filter(|t| !common::has_tool(t))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "needs {} (apt-get install microsocks dante-server stunnel4 openssl)",
        missing.join(", ")
    );
    assert_ne!(
        std::env::var("SLIPWAY_E2E").as_deref(),
        Ok("required"),
        "{why}"
    );
    eprintln!("skipped: {why}");
    false
}

/// A server the test started in the world; killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
    /// Files this daemon needed outside the world's directory.
    extra: Option<PathBuf>,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.extra.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn add_address(w: &World, addr: &str) {
    let out = w.exec(&format!("ip addr add {addr}/24 dev w0"));
    assert!(out.status.success(), "{out:?}");
}

/// Start `args` inside the world with stdout and stderr to `log`, and wait
/// until `addr:port` takes connections. `extra`: files it needed outside
/// the world's directory, removed with it.
fn spawn_in_world(
    w: &World,
    args: &[&str],
    log: &Path,
    (addr, port): (&str, u16),
    extra: Option<PathBuf>,
) -> Daemon {
    let file = std::fs::File::create(log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &w.name])
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {args:?}: {e}"));
    // Killed on drop, also when it never comes up.
    let daemon = Daemon {
        child,
        log: log.to_path_buf(),
        extra,
    };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let out = w.exec(&format!("python3 {PROBE} tcp {addr} {port}"));
        if String::from_utf8_lossy(&out.stdout).starts_with("connected") {
            return daemon;
        }
        assert!(
            Instant::now() < until,
            "{args:?} does not listen on {addr}:{port}: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// microsocks on `listen`:1080, connecting out from MICROSOCKS.
fn microsocks(w: &World, listen: &str, login: Option<(&str, &str)>) -> Daemon {
    let log = w.dir.join(format!("microsocks-{listen}.log"));
    let mut args = vec!["microsocks", "-i", listen, "-p", "1080", "-b", MICROSOCKS];
    if let Some((u, p)) = login {
        args.extend_from_slice(&["-u", u, "-P", p]);
    }
    spawn_in_world(w, &args, &log, (listen, 1080), None)
}

/// danted on DANTE:1080 with a username login checked against a password
/// file only the world's processes see (`ip netns exec` mounts
/// /etc/netns/NAME/* over /etc).
fn danted(w: &World) -> Daemon {
    let etc = PathBuf::from("/etc/netns").join(&w.name);
    std::fs::create_dir_all(&etc).unwrap();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap()
        + &format!(
            "{}:x:64123:64123::/nonexistent:/usr/sbin/nologin\n",
            LOGIN.0
        );
    std::fs::write(etc.join("passwd"), passwd).unwrap();
    let hash = Command::new("openssl")
        .args(["passwd", "-6", LOGIN.1])
        .output()
        .unwrap();
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default()
        + &format!(
            "{}:{}:19000:0:99999:7:::\n",
            LOGIN.0,
            String::from_utf8_lossy(&hash.stdout).trim()
        );
    std::fs::write(etc.join("shadow"), shadow).unwrap();
    // danted resolves names (ATYP=domain) with the world's resolver, which
    // answers NAME.test with 192.0.2.128.
    std::fs::write(etc.join("resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
    let log = w.dir.join("danted.log");
    let conf = w.dir.join("danted.conf");
    std::fs::write(
        &conf,
        format!(
            "logoutput: {log}\ninternal: {DANTE} port = 1080\nexternal: {DANTE}\n\
             socksmethod: username\nuser.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  log: connect disconnect error\n}}\n\
             socks pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  command: connect\n  \
             log: connect disconnect error\n}}\n",
            log = log.display()
        ),
    )
    .unwrap();
    let out = w.dir.join("danted.out");
    let pid = w.dir.join("danted.pid");
    let mut daemon = spawn_in_world(
        w,
        &[
            "danted",
            "-f",
            conf.to_str().unwrap(),
            "-p",
            pid.to_str().unwrap(),
        ],
        &out,
        (DANTE, 1080),
        Some(etc),
    );
    daemon.log = log;
    daemon
}

/// A CA and a certificate it signed for `name` (also for STUNNEL's
/// address), made by openssl: (CA, certificate, key).
fn certificates(dir: &Path, tag: &str, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{tag}-{f}"));
    let script = format!(
        "set -e
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
           -subj '/CN=slipway test CA {tag}' -keyout {cakey} -out {ca} 2>/dev/null
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN={name}' \
           -keyout {key} -out {csr} 2>/dev/null
         printf 'subjectAltName=DNS:{name},IP:{STUNNEL}\\nbasicConstraints=CA:FALSE\\n' > {ext}
         openssl x509 -req -in {csr} -CA {ca} -CAkey {cakey} -CAcreateserial -days 2 \
           -extfile {ext} -out {cert} 2>/dev/null",
        ca = p("ca.pem").display(),
        cakey = p("ca.key").display(),
        key = p("key.pem").display(),
        csr = p("req.csr").display(),
        ext = p("ext.cnf").display(),
        cert = p("cert.pem").display(),
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "openssl: {out:?}");
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

/// stunnel4 on STUNNEL:1443, TLS in front of microsocks on MICROSOCKS:1080,
/// and on STUNNEL:1444 in front of danted (which keeps half-closed
/// connections open, as microsocks does not).
fn stunnel(w: &World, cert: &Path, key: &Path) -> Daemon {
    let conf = w.dir.join("stunnel.conf");
    let (cert, key) = (cert.display(), key.display());
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\ndebug = 5\n\
             [socks]\naccept = {STUNNEL}:1443\nconnect = {MICROSOCKS}:1080\ncert = {cert}\nkey = {key}\n\
             [dante]\naccept = {STUNNEL}:1444\nconnect = {DANTE}:1080\ncert = {cert}\nkey = {key}\n"
        ),
    )
    .unwrap();
    let log = w.dir.join("stunnel.log");
    spawn_in_world(
        w,
        &["stunnel4", conf.to_str().unwrap()],
        &log,
        (STUNNEL, 1443),
        None,
    )
}

/// A server on WITNESS:WITNESS_PORT that notes every connection it accepts.
fn witness(w: &World) -> Daemon {
    let log = w.dir.join("witness.log");
    let notes = w.dir.join("witness.notes");
    let script = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{WITNESS}', {WITNESS_PORT}))\ns.listen(16)\nwhile True:\n    c, peer = s.accept()\n    \
         open('{}', 'a').write(f'accepted {{peer}}\\n')\n    c.close()\n",
        notes.display()
    );
    let mut daemon = spawn_in_world(
        w,
        &["python3", "-c", &script],
        &log,
        (WITNESS, WITNESS_PORT),
        None,
    );
    // The readiness probe itself was a connection: start the notes afresh.
    std::thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_file(&notes);
    daemon.log = notes;
    daemon
}

/// `slipway run ARGS -- sh -c SCRIPT` in the world, with `env` set.
fn run(w: &World, args: &[&str], env: &[(&str, &str)], script: &str) -> Run {
    let started = Instant::now();
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "120", "ip", "netns", "exec", &w.name])
        .arg(common::slipway())
        .arg("run")
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("SLIPWAY_LOG", "slipway::flow=info,warn")
        .env_remove("SLIPWAY_EGRESS_PROXY_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run {
        output: cmd.output().expect("run slipway"),
        took: started.elapsed(),
    }
}

fn both(run: &Run) -> String {
    format!("stdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr())
}

/// The milliseconds of a probe line (`ECONNREFUSED 3`) whose result is `want`.
fn probe_ms(out: &str, want: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.strip_prefix(want)?.trim().parse().ok())
}

#[test]
fn through_microsocks_the_server_sees_the_proxy() {
    require_world!();
    if !have_proxies() {
        return;
    }
    let w = World::with_blob(8);
    add_address(&w, MICROSOCKS);
    let _socks = microsocks(&w, MICROSOCKS, None);
    let script = format!(
        "curl -sS --max-time 10 http://192.0.2.80/hello
         curl -sS --max-time 20 http://192.0.2.80/blob | sha256sum
         head -c 3000000 /dev/urandom > /tmp/up
         echo \"up $(sha256sum < /tmp/up | cut -d' ' -f1) 3000000\"
         curl -sS --max-time 20 -T /tmp/up http://192.0.2.80/upload
         python3 {PROBE} udp 198.51.100.1 7"
    );
    let r = run(
        &w,
        &["--egress-proxy", &format!("socks5://{MICROSOCKS}:1080")],
        &[],
        &script,
    );
    r.ok();
    let out = r.stdout();
    assert!(
        out.contains(&format!("you are ::ffff:{MICROSOCKS}")),
        "{}",
        both(&r)
    );
    let blob = common::sha256_file(&w.blob());
    assert!(out.contains(&format!("{blob}  -")), "{}", both(&r));
    let up = out
        .lines()
        .find_map(|l| l.strip_prefix("up "))
        .expect("upload digest");
    assert!(out.contains(&format!("\n{up}\n")), "{}", both(&r));
    // UDP is never tunneled: it still works, directly. (No half-closed TCP
    // here: microsocks ends both directions at the first EOF; see danted.)
    assert!(out.contains("reply"), "{}", both(&r));
}

#[test]
fn danted_takes_the_login_and_wrong_credentials_are_refused() {
    require_world!();
    if !have_proxies() {
        return;
    }
    let w = World::new();
    add_address(&w, DANTE);
    let dante = danted(&w);
    // The password from the environment, not argv.
    let r = run(
        &w,
        &[
            "--egress-proxy",
            &format!("socks5://{}@{DANTE}:1080", LOGIN.0),
        ],
        &[("SLIPWAY_EGRESS_PROXY_PASSWORD", LOGIN.1)],
        &format!(
            "curl -sS --max-time 10 http://192.0.2.80/hello
             python3 {PROBE} tcp-echo 198.51.100.1 7
             echo \"command sees password: ${{SLIPWAY_EGRESS_PROXY_PASSWORD:-no}}\""
        ),
    );
    r.ok();
    assert!(
        r.stdout().contains(&format!("you are ::ffff:{DANTE}")),
        "{}",
        both(&r)
    );
    // The guest half-closes; the echo comes back whole.
    assert!(r.stdout().contains("echo-ok"), "{}", both(&r));
    // The variable is slipway's, not the command's.
    assert!(
        r.stdout().contains("command sees password: no"),
        "{}",
        both(&r)
    );
    let log = dante.log();
    assert!(
        log.contains(&format!("username%{}@", LOGIN.0)) && log.contains("192.0.2.80.80"),
        "danted's log: {log}"
    );

    let wrong = "wr0ng-pass-e2e";
    let r = run(
        &w,
        &[
            "--egress-proxy",
            &format!("socks5://{}:{wrong}@{DANTE}:1080", LOGIN.0),
        ],
        &[],
        &format!("python3 {PROBE} tcp 192.0.2.80 80"),
    );
    r.ok();
    assert!(
        probe_ms(&r.stdout(), "ECONNREFUSED").is_some(),
        "{}",
        both(&r)
    );
    let err = r.stderr();
    assert!(
        err.contains("egress proxy connect failed")
            && err.contains("refused the username and password"),
        "{}",
        both(&r)
    );
    assert!(!err.contains(wrong), "the password was logged: {err}");
    assert!(
        dante.log().contains("password authentication failed"),
        "danted's log: {}",
        dante.log()
    );
}

#[test]
fn with_the_proxy_stopped_connects_fail_at_once_and_nothing_gets_through() {
    require_world!();
    if !have_proxies() {
        return;
    }
    let w = World::new();
    add_address(&w, MICROSOCKS);
    let mut socks = microsocks(&w, MICROSOCKS, None);
    let seen = witness(&w);
    socks.stop();
    let r = run(
        &w,
        &["--egress-proxy", &format!("socks5://{MICROSOCKS}:1080")],
        &[],
        &format!("python3 {PROBE} tcp {WITNESS} {WITNESS_PORT}"),
    );
    r.ok();
    let ms = probe_ms(&r.stdout(), "ECONNREFUSED");
    assert!(ms.is_some_and(|ms| ms < 500), "{}", both(&r));
    assert!(
        r.stderr().contains("cannot connect to the proxy"),
        "{}",
        both(&r)
    );
    // Never a direct connection instead.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(seen.log(), "", "the destination saw a connection");
}

#[test]
fn a_silent_proxy_is_given_up_at_the_connect_timeout_and_its_connection_closed() {
    require_world!();
    if !have_proxies() {
        return;
    }
    let w = World::new();
    add_address(&w, MICROSOCKS);
    // Takes the connection, reads the greeting, never answers; notes when
    // the client hangs up.
    let notes = w.dir.join("silent.notes");
    let script = format!(
        "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{MICROSOCKS}', 1080))\ns.listen(16)\nwhile True:\n    c, _ = s.accept()\n    \
         t = time.monotonic()\n    while c.recv(4096):\n        pass\n    \
         open('{}', 'a').write(f'closed after {{time.monotonic() - t:.1f}} s\\n')\n",
        notes.display()
    );
    let log = w.dir.join("silent.log");
    let _silent = spawn_in_world(
        &w,
        &["python3", "-c", &script],
        &log,
        (MICROSOCKS, 1080),
        None,
    );
    std::thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_file(&notes);
    let r = run(
        &w,
        &[
            "--connect-timeout",
            "1",
            "--egress-proxy",
            &format!("socks5://{MICROSOCKS}:1080"),
        ],
        &[],
        // slipway lives on for 3 s more: a close before that is the drop.
        &format!("python3 {PROBE} tcp 192.0.2.80 80; sleep 3"),
    );
    r.ok();
    // The core's timeout: ICMP host unreachable after about a second.
    let ms = probe_ms(&r.stdout(), "EHOSTUNREACH");
    assert!(
        ms.is_some_and(|ms| (900..3000).contains(&ms)),
        "{}",
        both(&r)
    );
    // The dial was dropped with the flow: the proxy saw its client go.
    let seen = std::fs::read_to_string(&notes).unwrap_or_default();
    let after: Option<f64> = seen
        .strip_prefix("closed after ")
        .and_then(|t| t.split_whitespace().next()?.parse().ok());
    assert!(
        after.is_some_and(|t| (0.9..2.0).contains(&t)),
        "{seen:?}\n{}",
        both(&r)
    );
}

#[test]
fn a_denied_destination_never_reaches_the_proxy() {
    require_world!();
    if !have_proxies() {
        return;
    }
    let w = World::new();
    add_address(&w, DANTE);
    let dante = danted(&w);
    let r = run(
        &w,
        &[
            "--deny-out",
            "203.0.113.0/24",
            "--egress-proxy",
            &format!("socks5://{}:{}@{DANTE}:1080", LOGIN.0, LOGIN.1),
        ],
        &[],
        &format!(
            "python3 {PROBE} tcp {WITNESS} 80
             curl -sS --max-time 10 http://192.0.2.80/hello"
        ),
    );
    r.ok();
    assert!(
        probe_ms(&r.stdout(), "ECONNREFUSED").is_some(),
        "{}",
        both(&r)
    );
    assert!(
        r.stdout().contains(&format!("you are ::ffff:{DANTE}")),
        "{}",
        both(&r)
    );
    let log = dante.log();
    assert!(log.contains("192.0.2.80.80"), "danted's log: {log}");
    assert!(
        !log.contains(WITNESS),
        "the denied flow reached danted: {log}"
    );
}

#[test]
fn tls_to_the_proxy_through_stunnel_needs_the_right_ca() {
    require_world!();
    if !have_proxies() {
        return;
    }
    let w = World::with_blob(8);
    add_address(&w, MICROSOCKS);
    add_address(&w, DANTE);
    add_address(&w, STUNNEL);
    let (ca, cert, key) = certificates(&w.dir, "good", "socks.test");
    let (other_ca, _, _) = certificates(&w.dir, "other", "socks.test");
    let _socks = microsocks(&w, MICROSOCKS, None);
    let _dante = danted(&w);
    let tunnel = stunnel(&w, &cert, &key);
    let url = format!("socks5+tls://{STUNNEL}:1443");
    let script = "curl -sS --max-time 10 http://192.0.2.80/hello
         curl -sS --max-time 20 http://192.0.2.80/blob | sha256sum";
    let r = run(
        &w,
        &[
            "--egress-proxy",
            &url,
            "--egress-proxy-ca",
            ca.to_str().unwrap(),
            "--egress-proxy-server-name",
            "socks.test",
        ],
        &[],
        script,
    );
    r.ok();
    let out = r.stdout();
    assert!(
        out.contains(&format!("you are ::ffff:{MICROSOCKS}")),
        "{}\nstunnel: {}",
        both(&r),
        tunnel.log()
    );
    let blob = common::sha256_file(&w.blob());
    assert!(out.contains(&format!("{blob}  -")), "{}", both(&r));
    // Uploads, and a guest that half-closes (close_notify, then FIN):
    // through stunnel to danted, which keeps the other direction open.
    let r = run(
        &w,
        &[
            "--egress-proxy",
            &format!("socks5+tls://{}:{}@{STUNNEL}:1444", LOGIN.0, LOGIN.1),
            "--egress-proxy-ca",
            ca.to_str().unwrap(),
            "--egress-proxy-server-name",
            "socks.test",
        ],
        &[],
        &format!(
            "head -c 3000000 /dev/urandom > /tmp/up
             echo \"up $(sha256sum < /tmp/up | cut -d' ' -f1) 3000000\"
             curl -sS --max-time 20 -T /tmp/up http://192.0.2.80/upload
             python3 {PROBE} tcp-echo 198.51.100.1 7"
        ),
    );
    r.ok();
    let out = r.stdout();
    let up = out
        .lines()
        .find_map(|l| l.strip_prefix("up "))
        .expect("upload digest");
    assert!(out.contains(&format!("\n{up}\n")), "{}", both(&r));
    assert!(out.contains("echo-ok"), "{}", both(&r));
    // The certificate also names the proxy's address: SNI = the URL's host.
    let r = run(
        &w,
        &[
            "--egress-proxy",
            &url,
            "--egress-proxy-ca",
            ca.to_str().unwrap(),
        ],
        &[],
        "curl -sS --max-time 10 http://192.0.2.80/hello",
    );
    assert!(
        r.stdout().contains(&format!("you are ::ffff:{MICROSOCKS}")),
        "{}",
        both(&r)
    );

    // Another CA, or the built-in roots: refused, never plain TCP instead.
    for ca_flags in [
        vec!["--egress-proxy-ca", other_ca.to_str().unwrap()],
        vec![],
    ] {
        let mut args = vec!["--egress-proxy", &url];
        args.extend_from_slice(&ca_flags);
        let r = run(
            &w,
            &args,
            &[],
            &format!("python3 {PROBE} tcp 192.0.2.80 80"),
        );
        r.ok();
        assert!(
            probe_ms(&r.stdout(), "ECONNREFUSED").is_some(),
            "{}",
            both(&r)
        );
        let err = r.stderr();
        assert!(
            err.contains("TLS to the proxy failed") && err.contains("certificate"),
            "{}",
            both(&r)
        );
    }
}

/// A server on `addr:8080` that answers any request with `marker ADDR`.
fn marker(w: &World, addr: &str) -> Daemon {
    let log = w.dir.join(format!("marker-{addr}.log"));
    let script = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{addr}', 8080))\ns.listen(16)\nwhile True:\n    c, _ = s.accept()\n    \
         c.settimeout(2)\n    try:\n        c.recv(4096)\n        \
         c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 19\\r\\n\\r\\nmarker {addr:<11}\\n')\n    \
         except OSError:\n        pass\n    c.close()\n"
    );
    spawn_in_world(w, &["python3", "-c", &script], &log, (addr, 8080), None)
}

/// dnsmasq on `listen`, answering `records` (`--host-record` values).
fn dnsmasq(w: &World, listen: &str, records: &[&str]) -> Daemon {
    let log = w.dir.join("dnsmasq.log");
    let mut args = vec![
        "dnsmasq".to_string(),
        "-k".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={listen}"),
        "--user=root".into(),
        "--pid-file=".into(),
    ];
    args.extend(records.iter().map(|r| format!("--host-record={r}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_in_world(w, &args, &log, (listen, 53), None)
}

#[test]
fn a_flow_allowed_by_its_name_reaches_the_proxy_as_a_name() {
    require_world!();
    if !have_proxies() || !common::has_tool("dnsmasq") {
        assert_ne!(
            std::env::var("SLIPWAY_E2E").as_deref(),
            Ok("required"),
            "needs dnsmasq (apt-get install dnsmasq-base)"
        );
        return;
    }
    // slipway's resolver says app.allowed.test is 198.51.100.1, where
    // nothing listens on 8080; the proxy's own resolver (the world's) says
    // 192.0.2.128, where the marker server does. The marker answering
    // proves the proxy was handed the name (ATYP=domain), not the address.
    let w = World::new();
    add_address(&w, DANTE);
    add_address(&w, "192.0.2.128");
    add_address(&w, "203.0.113.53");
    let _dns = dnsmasq(&w, "203.0.113.53", &["app.allowed.test,198.51.100.1"]);
    let _marker = marker(&w, "192.0.2.128");
    let dante = danted(&w);
    let r = run(
        &w,
        &[
            "--allow-out",
            "*.allowed.test",
            "--deny-out",
            "ALL_TRAFFIC",
            "--dns-upstream",
            "203.0.113.53",
            "--egress-proxy",
            &format!("socks5://{}:{}@{DANTE}:1080", LOGIN.0, LOGIN.1),
        ],
        &[],
        // The guest's own address for the name does not matter (the stack
        // reads the Host and dials the name); 203.0.113.1 is unpinned.
        "curl -sS --max-time 10 -H 'Host: app.allowed.test:8080' http://203.0.113.1:8080/",
    );
    r.ok();
    assert!(
        r.stdout().contains("marker 192.0.2.128"),
        "{}\ndanted: {}",
        both(&r),
        dante.log()
    );
}

#[test]
fn a_proxy_named_by_a_name_is_resolved_through_the_dns_upstream() {
    require_world!();
    if !have_proxies() {
        return;
    }
    let w = World::new();
    add_address(&w, MICROSOCKS);
    // The world's DNS (192.0.2.53) answers NAME.test with 192.0.2.128 and
    // 2001:db8::80 (where nothing listens on 1080: refused, then the next).
    add_address(&w, "192.0.2.128");
    let _socks = microsocks(&w, "192.0.2.128", None);
    let r = run(
        &w,
        &[
            "--dns-upstream",
            "192.0.2.53",
            "--egress-proxy",
            "socks5://proxy.test:1080",
        ],
        &[],
        "curl -sS --max-time 10 http://198.51.100.1/hello",
    );
    r.ok();
    assert!(
        r.stdout().contains(&format!("you are ::ffff:{MICROSOCKS}")),
        "{}",
        both(&r)
    );
}

#[test]
fn bad_proxy_settings_exit_2_naming_the_input() {
    let dir = common::Scratch::new("proxy-flags");
    let junk = dir.0.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let junk = junk.to_str().unwrap();
    let missing = dir.0.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let secret = "s3kret-in-url";
    let bad_url = format!("socks5://alice:{secret}@proxy.test");
    for (args, want) in [
        (
            vec!["--egress-proxy", "http://192.0.2.1:1080"],
            "invalid egress proxy http://192.0.2.1:1080",
        ),
        (
            vec!["--egress-proxy", &bad_url],
            "invalid egress proxy address proxy.test",
        ),
        (
            vec!["--egress-proxy", "socks5://127.0.0.1:1080"],
            "egress proxy address 127.0.0.1 is in the always-denied internal ranges",
        ),
        (
            vec![
                "--egress-proxy",
                "socks5://169.254.169.254:1080",
                "--allow-internal",
                "127.0.0.1/32",
            ],
            "egress proxy address 169.254.169.254 is in the always-denied internal ranges",
        ),
        (
            vec![
                "--egress-proxy",
                "socks5://192.0.2.1:1080",
                "--egress-proxy-ca",
                junk,
            ],
            "--egress-proxy-ca is set but TLS is not",
        ),
        (
            vec![
                "--egress-proxy",
                "socks5+tls://192.0.2.1:1080",
                "--egress-proxy-ca",
                missing,
            ],
            "cannot read --egress-proxy-ca",
        ),
        (
            vec![
                "--egress-proxy",
                "socks5+tls://192.0.2.1:1080",
                "--egress-proxy-ca",
                junk,
            ],
            "invalid egress proxy CA certificate: no CERTIFICATE block",
        ),
        (
            vec![
                "--egress-proxy",
                "socks5+tls://192.0.2.1:1080",
                "--egress-proxy-server-name",
                "not a name",
            ],
            "invalid egress proxy TLS server name not a name",
        ),
    ] {
        let out = Command::new(common::slipway())
            .arg("run")
            .args(&args)
            .args(["--", "true"])
            .env_remove("SLIPWAY_EGRESS_PROXY_PASSWORD")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !err.contains(secret),
            "{args:?} printed the password: {err}"
        );
    }
}
