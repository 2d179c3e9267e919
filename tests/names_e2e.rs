//! Egress by name end to end (issue 12): a real kernel in `slipway run`
//! resolves through the stack's filtering resolver, whose upstream is a real
//! dnsmasq in the world namespace (on a TEST-NET address, its query log on).
//! Allowed names resolve and their addresses open on every port and
//! protocol; a denied name never reaches dnsmasq; a rebinding answer loses
//! its internal address.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::World;

const PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/probe.py");
const DNS_ASK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/dns_ask.py");
/// A `--dns-server` address (TEST-NET-1): nothing listens there; the stack answers.
const DNS_SERVER: &str = "192.0.2.99";
const RESOLVER: &str = "203.0.113.53";

/// dnsmasq in the world, answering for the test's names; killed on drop.
struct Dnsmasq {
    child: Child,
    log: std::path::PathBuf,
}

impl Dnsmasq {
    fn start(w: &World) -> Dnsmasq {
        let out = w.exec(&format!("ip addr add {RESOLVER}/24 dev w0"));
        assert!(out.status.success(), "{out:?}");
        let log = w.dir.join("dnsmasq.log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &w.name,
                "dnsmasq",
                "-k",
                "--no-resolv",
                "--no-hosts",
            ])
            .args(["--bind-interfaces", &format!("--listen-address={RESOLVER}")])
            .args([
                "--host-record=app.allowed.test,198.51.100.1",
                "--host-record=tls.allowed.test,198.51.100.1",
                "--host-record=web.allowed.test,192.0.2.80",
                "--host-record=evil.denied.test,198.51.100.1",
                "--host-record=rebind.allowed.test,10.9.9.9",
                "--host-record=rebind.allowed.test,192.0.2.80",
                "--host-record=secret.denied.test,203.0.113.1",
                "--log-queries",
                "--user=root",
                "--pid-file=",
            ])
            .arg(format!("--log-facility={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq (dnsmasq-base)");
        let d = Dnsmasq { child, log };
        let until = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&d.log).is_ok_and(|l| l.contains("started")) {
            assert!(Instant::now() < until, "dnsmasq did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTPS servers (443, 8443) and the greeter (25) of `tls_world.py`,
/// with a certificate for `*.allowed.test` and `*.denied.test` from a CA
/// made here; killed on drop.
struct TlsWorld {
    child: Child,
    ca: std::path::PathBuf,
}

impl TlsWorld {
    fn start(w: &World) -> TlsWorld {
        let d = &w.dir;
        let script = format!(
            "cd {dir}
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
               -subj /CN=slipway-test-ca -keyout ca.key -out ca.pem \
               -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
               -subj /CN=tls.allowed.test -keyout leaf.key -out leaf.csr
             printf 'subjectAltName=DNS:*.allowed.test,DNS:*.denied.test\n' > leaf.ext
             openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
               -days 2 -extfile leaf.ext -out leaf.pem",
            dir = d.display()
        );
        let out = Command::new("sh").args(["-ec", &script]).output().unwrap();
        assert!(out.status.success(), "openssl: {out:?}");
        let tls_world = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/tls_world.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &w.name, "python3", tls_world])
            .arg("--cert")
            .arg(d.join("leaf.pem"))
            .arg("--key")
            .arg(d.join("leaf.key"))
            .args(["--port", "443", "--port", "8443"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tls_world.py");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let t = TlsWorld {
            child,
            ca: d.join("ca.pem"),
        };
        assert_eq!(line.trim(), "ready", "tls_world.py did not start");
        t
    }
}

impl Drop for TlsWorld {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has_dnsmasq() -> bool {
    Command::new("dnsmasq")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn allowed_names_resolve_and_open_their_addresses_and_denied_ones_never_leave() {
    require_world!();
    if !has_dnsmasq() {
        assert_ne!(
            std::env::var("SLIPWAY_E2E").as_deref(),
            Ok("required"),
            "dnsmasq is missing (apt-get install dnsmasq-base)"
        );
        eprintln!("skipped: no dnsmasq (apt-get install dnsmasq-base)");
        return;
    }
    let w = World::new();
    let dns = Dnsmasq::start(&w);
    let script = [
        "getent ahostsv4 app.allowed.test | head -n1".to_string(),
        // The pinned address on HTTP, a TCP echo, and UDP.
        "curl -sS --max-time 10 http://app.allowed.test/hello; echo".into(),
        format!("python3 {PROBE} tcp-echo 198.51.100.1 7"),
        format!("python3 {PROBE} udp 198.51.100.1 7"),
        // A denied name does not resolve; its address stays shut.
        "getent hosts secret.denied.test; echo denied-exit-$?".into(),
        // An address nobody resolved: the stack takes the connection and
        // resets it, as its first bytes name no host.
        format!("python3 {PROBE} tcp-echo 203.0.113.1 7"),
        // The rebinding answer keeps only its public address.
        "getent ahostsv4 rebind.allowed.test | awk '{print \"rebind \" $1}' | sort -u".into(),
        // Straight to a --dns-server address: the same filtering resolver.
        format!("python3 {DNS_ASK} {DNS_SERVER} app.allowed.test"),
        format!("python3 {DNS_ASK} {DNS_SERVER} other.denied.test"),
    ]
    .join("\n");
    let run = w.run(
        &[
            "--allow-out",
            "*.allowed.test",
            "--deny-out",
            "ALL_TRAFFIC",
            "--dns-upstream",
            RESOLVER,
            "--dns-server",
            DNS_SERVER,
        ],
        &script,
    );
    let (out, log) = (run.stdout(), run.stderr());
    let both = format!("stdout:\n{out}\nstderr:\n{log}");
    assert!(
        out.contains("198.51.100.1    STREAM app.allowed.test"),
        "{both}"
    );
    assert!(out.contains("hello from world"), "{both}");
    assert!(out.contains("echo-ok"), "{both}");
    assert!(out.contains("reply"), "{both}");
    assert!(out.contains("denied-exit-2"), "{both}");
    // Reset after the handshake: the send or the shutdown fails.
    assert!(
        ["ECONNRESET", "ENOTCONN", "EPIPE"]
            .iter()
            .any(|e| out.contains(e)),
        "{both}"
    );
    assert_eq!(out.matches("echo-ok").count(), 1, "{both}");
    assert!(log.contains("no name in the first bytes"), "{both}");
    assert!(out.contains("rebind 192.0.2.80"), "{both}");
    assert!(!out.contains("10.9.9.9"), "{both}");
    assert!(
        out.contains(&format!(
            "dns-server app.allowed.test rcode=0 answers=1 from={DNS_SERVER}"
        )),
        "{both}"
    );
    assert!(
        out.contains(&format!(
            "dns-server other.denied.test rcode=3 answers=0 from={DNS_SERVER}"
        )),
        "{both}"
    );
    // The flow log names the pin; the resolver logs what it blocked.
    assert!(log.contains("rule=dns pin"), "{both}");
    assert!(
        log.contains("name=\"app.allowed.test\"") || log.contains("name=app.allowed.test"),
        "{both}"
    );
    let queries = dns.log();
    assert!(queries.contains("app.allowed.test"), "{queries}");
    assert!(
        !queries.contains("denied.test"),
        "a denied name reached the upstream:\n{queries}"
    );
}

/// The name in a flow's first bytes (issue 12, items 5 and 6), through a
/// real kernel's TLS and HTTP clients: an allowed SNI or Host aimed at an
/// address nobody resolved reaches the server its name resolves to, on any
/// port and over IPv6 too; a denied one is reset; on a pinned address a
/// request naming a denied host is reset while a server-first protocol
/// works; DNS over TCP is filtered too.
#[test]
fn the_name_in_the_first_bytes_is_dialed_and_fronting_is_reset() {
    require_world!();
    if !has_dnsmasq() || !common::has_tool("openssl") {
        assert_ne!(
            std::env::var("SLIPWAY_E2E").as_deref(),
            Ok("required"),
            "dnsmasq or openssl is missing (apt-get install dnsmasq-base openssl)"
        );
        eprintln!("skipped: no dnsmasq or openssl");
        return;
    }
    let w = World::new();
    let dns = Dnsmasq::start(&w);
    let tls = TlsWorld::start(&w);
    let ca = tls.ca.display();
    // 203.0.113.77 and 2001:db8::77: addresses no answer gave the guest.
    let curl = "curl -sS --max-time 10";
    let script = [
        format!("{curl} --cacert {ca} --resolve tls.allowed.test:443:203.0.113.77 https://tls.allowed.test/; echo sni443-exit-$?"),
        format!("{curl} --cacert {ca} --resolve tls.allowed.test:8443:203.0.113.77 https://tls.allowed.test:8443/; echo sni8443-exit-$?"),
        format!("{curl} --resolve web.allowed.test:80:203.0.113.77 http://web.allowed.test/hello; echo host-exit-$?"),
        format!("{curl} -g --resolve 'web.allowed.test:80:[2001:db8::77]' http://web.allowed.test/hello; echo host6-exit-$?"),
        format!("{curl} --cacert {ca} --resolve evil.denied.test:443:203.0.113.77 https://evil.denied.test/; echo sni-denied-exit-$?"),
        // Pin app.allowed.test's address, then front for a denied name on it.
        "getent ahostsv4 app.allowed.test | head -n1".into(),
        format!("{curl} --cacert {ca} --resolve evil.denied.test:443:198.51.100.1 https://evil.denied.test/; echo front-tls-exit-$?"),
        format!("{curl} --resolve evil.denied.test:80:198.51.100.1 http://evil.denied.test/hello; echo front-http-exit-$?"),
        format!("{curl} --cacert {ca} --resolve tls.allowed.test:443:198.51.100.1 https://tls.allowed.test/; echo pinned-tls-exit-$?"),
        format!("python3 {PROBE} greet 198.51.100.1 25"),
        // DNS over TCP to the stack's resolver: filtered like UDP.
        format!("python3 {DNS_ASK} 10.0.2.3 app.allowed.test tcp"),
        format!("python3 {DNS_ASK} 10.0.2.3 secret.denied.test tcp"),
    ]
    .join("\n");
    let run = w.run(
        &[
            "--allow-out",
            "*.allowed.test",
            "--deny-out",
            "ALL_TRAFFIC",
            "--dns-upstream",
            RESOLVER,
        ],
        &script,
    );
    let (out, log) = (run.stdout(), run.stderr());
    let both = format!("stdout:\n{out}\nstderr:\n{log}");
    for port in [443, 8443] {
        assert!(
            out.contains(&format!("hello over tls sni=tls.allowed.test port={port}")),
            "{both}"
        );
        assert!(out.contains(&format!("sni{port}-exit-0")), "{both}");
    }
    // The world's HTTP server at web.allowed.test's address answered.
    assert!(out.contains("host-exit-0"), "{both}");
    assert!(out.contains("host6-exit-0"), "{both}");
    assert_eq!(out.matches("hello from world").count(), 2, "{both}");
    assert!(!out.contains("sni-denied-exit-0"), "{both}");
    assert!(
        out.contains("198.51.100.1    STREAM app.allowed.test"),
        "{both}"
    );
    assert!(!out.contains("front-tls-exit-0"), "{both}");
    assert!(!out.contains("front-http-exit-0"), "{both}");
    assert!(out.contains("pinned-tls-exit-0"), "{both}");
    assert!(out.contains("greet-ok"), "{both}");
    assert!(
        out.contains("dns-tcp app.allowed.test rcode=0 answers=1"),
        "{both}"
    );
    assert!(
        out.contains("dns-tcp secret.denied.test rcode=3 answers=0"),
        "{both}"
    );
    // The flow log says how each was decided.
    assert!(log.contains("rule=domain (sni)"), "{both}");
    assert!(log.contains("rule=domain (host)"), "{both}");
    assert!(log.contains("name evil.denied.test not allowed"), "{both}");
    let queries = dns.log();
    assert!(queries.contains("tls.allowed.test"), "{queries}");
    assert!(
        !queries.contains("denied.test"),
        "a denied name reached the upstream:\n{queries}"
    );
}
