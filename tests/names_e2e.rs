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
        format!("python3 {PROBE} tcp 203.0.113.1 80"),
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
    assert!(out.contains("ECONNREFUSED"), "{both}");
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
