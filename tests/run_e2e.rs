//! `slipway run` end to end: a real kernel (a network namespace behind a tap)
//! is the guest, real tools (curl, ping, getent, a Python probe) talk through
//! the stack to servers on TEST-NET addresses in a world namespace.

mod common;

use common::World;

const PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/probe.py");

fn probe(what: &str, host: &str, port: u16) -> String {
    format!("python3 {PROBE} {what} {host} {port}")
}

/// Parse "<result> <ms>" lines of the probe, in order.
fn results(stdout: &str) -> Vec<(String, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let r = w.next()?.to_string();
            let ms = w.next()?.parse().ok()?;
            Some((r, ms))
        })
        .collect()
}

#[test]
fn allowed_flows_work_over_ipv4_and_ipv6() {
    require_world!();
    let w = World::new();
    let script = [
        "set -e".to_string(),
        "curl -sS --max-time 10 http://192.0.2.1/hello".into(),
        "curl -sS --max-time 10 'http://[2001:db8::1]/hello'".into(),
        probe("tcp-echo", "192.0.2.1", 7),
        probe("tcp-echo", "2001:db8::1", 7),
        probe("udp", "198.51.100.1", 7),
        probe("udp", "2001:db8::1", 7),
        probe("udp-burst", "198.51.100.1", 7),
        probe("udp-burst", "2001:db8::1", 7),
        "ping -c1 -W5 192.0.2.1 >/dev/null && echo ping4-ok 0".into(),
        "ping -6 -c1 -W5 2001:db8::1 >/dev/null && echo ping6-ok 0".into(),
        "getent ahostsv4 world.test | head -n1".into(),
        "getent ahostsv6 www.test | head -n1".into(),
    ]
    .join("\n");
    let run = w.run_default(&script);
    run.ok();
    let out = run.stdout();
    // The server sees the guest's traffic come from the world's own side.
    assert!(
        out.contains("hello from world, you are ::ffff:192.0.2.1"),
        "{out}"
    );
    assert!(
        out.contains("hello from world, you are 2001:db8::1"),
        "{out}"
    );
    let got: Vec<String> = results(&out).into_iter().map(|(r, _)| r).collect();
    for want in ["echo-ok", "reply", "ping4-ok", "ping6-ok"] {
        assert!(got.iter().any(|r| r == want), "missing {want} in {out}");
    }
    assert_eq!(got.iter().filter(|r| *r == "echo-ok").count(), 2, "{out}");
    assert_eq!(got.iter().filter(|r| *r == "reply").count(), 2, "{out}");
    // Every datagram of a burst, mixed sizes, each once and in order.
    assert_eq!(got.iter().filter(|r| *r == "burst-ok").count(), 2, "{out}");
    assert!(out.contains("192.0.2.1       STREAM world.test"), "{out}");
    assert!(out.contains("2001:db8::80    STREAM www.test"), "{out}");
}

#[test]
fn denied_flows_fail_at_once_with_the_right_error() {
    require_world!();
    let w = World::new();
    let script = [
        probe("tcp", "192.0.2.1", 80),
        probe("tcp", "2001:db8::1", 80),
        probe("udp", "192.0.2.1", 7),
        probe("udp", "2001:db8::1", 7),
        // Allow beats deny: the /32 inside the denied /24 still works.
        probe("tcp", "192.0.2.80", 80),
        "ping -c1 -W3 192.0.2.1 >/dev/null 2>&1; echo ping-exit-$? 0".into(),
        "curl -sS --max-time 5 http://192.0.2.1/hello >/dev/null 2>&1; echo curl-exit-$? 0".into(),
    ]
    .join("\n");
    let run = w.run(
        &[
            "--deny-out",
            "192.0.2.0/24",
            "--deny-out",
            "2001:db8::/32",
            "--allow-out",
            "192.0.2.80",
        ],
        &script,
    );
    run.ok();
    let r = results(&run.stdout());
    let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "ECONNREFUSED",
            "ECONNREFUSED",
            // ICMP "communication administratively prohibited": v4 maps to
            // EHOSTUNREACH, v6 to EACCES in Linux.
            "EHOSTUNREACH",
            "EACCES",
            "connected",
            "ping-exit-1",
            "curl-exit-7"
        ],
        "{}",
        run.stderr()
    );
    for (name, ms) in &r[..4] {
        assert!(*ms < 1000, "{name} took {ms} ms");
    }
    let log = run.stderr();
    assert!(
        log.contains("verdict=\"deny\""),
        "no deny in flow log: {log}"
    );
    assert!(
        log.contains("deny_out 192.0.2.0/24"),
        "rule missing in flow log: {log}"
    );
}

#[test]
fn internal_ranges_are_denied_by_default() {
    require_world!();
    let w = World::new();
    let targets = [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "fc00::1",
    ];
    let script = targets
        .iter()
        .map(|t| probe("tcp", t, 80))
        .collect::<Vec<_>>()
        .join("\n");
    let run = w.run_default(&script);
    run.ok();
    let r = results(&run.stdout());
    assert_eq!(r.len(), targets.len(), "{}", run.stderr());
    for ((name, ms), target) in r.iter().zip(targets) {
        assert_eq!(name, "ECONNREFUSED", "{target}: {}", run.stderr());
        assert!(*ms < 1000, "{target} took {ms} ms");
    }
    assert!(
        run.stderr().contains("internal 169.254.0.0/16"),
        "{}",
        run.stderr()
    );
}

#[test]
fn host_refusal_and_unreachable_reach_the_guest_at_once() {
    require_world!();
    let w = World::new();
    let script = [
        probe("tcp", "192.0.2.1", 9),
        probe("tcp", "203.0.113.200", 80),
        probe("tcp", "2001:db8:dead::1", 80),
    ]
    .join("\n");
    let run = w.run_default(&script);
    run.ok();
    let r = results(&run.stdout());
    let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["ECONNREFUSED", "EHOSTUNREACH", "EHOSTUNREACH"],
        "{}",
        run.stderr()
    );
    for (name, ms) in &r {
        assert!(*ms < 1000, "{name} took {ms} ms");
    }
}

#[test]
fn no_internet_leaves_only_allow_out() {
    require_world!();
    let w = World::new();
    let script = [
        probe("tcp", "192.0.2.1", 80),
        probe("tcp", "198.51.100.1", 7),
        probe("tcp", "2001:db8::1", 80),
        // DNS is a flow to the upstream resolver: allowed here.
        "getent ahostsv4 world.test >/dev/null && echo dns-ok 0".into(),
    ]
    .join("\n");
    let run = w.run(
        &[
            "--no-internet",
            "--allow-out",
            "198.51.100.0/24,192.0.2.53",
            "--dns-upstream",
            "192.0.2.53",
        ],
        &script,
    );
    run.ok();
    let names: Vec<String> = results(&run.stdout()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["ECONNREFUSED", "connected", "ECONNREFUSED", "dns-ok"],
        "{}",
        run.stderr()
    );
}

#[test]
fn map_host_loopback_reaches_the_hosts_127_0_0_1() {
    require_world!();
    let w = World::new();
    std::fs::write(w.dir.join("index.html"), "from the host's loopback\n").unwrap();
    let out = w.exec(&format!(
        "python3 -m http.server 8081 --bind 127.0.0.1 --directory {} >/dev/null 2>&1 &
         for i in $(seq 50); do python3 {PROBE} tcp 127.0.0.1 8081 | grep -q connected && exit 0; sleep 0.1; done; exit 1",
        w.dir.display()
    ));
    assert!(out.status.success(), "loopback server did not start");
    let with = w.run(
        &["--map-host-loopback", "10.0.2.2"],
        "curl -sS --max-time 5 http://10.0.2.2:8081/index.html",
    );
    with.ok();
    assert_eq!(with.stdout(), "from the host's loopback\n");
    let without = w.run_default(&probe("tcp", "10.0.2.2", 8081));
    without.ok();
    assert!(
        without.stdout().starts_with("ECONNREFUSED"),
        "{}",
        without.stdout()
    );
}

#[test]
fn transfers_100_mb_byte_exact_each_way() {
    require_world!();
    let w = World::with_blob(100);
    let blob = w.blob();
    let want = common::sha256_file(&blob);
    let script = format!(
        "set -e
         curl -sS --max-time 120 http://192.0.2.1/blob | sha256sum | cut -d' ' -f1
         curl -sS --max-time 120 -T {} http://192.0.2.1/upload",
        blob.display()
    );
    let run = w.run_default(&script);
    run.ok();
    let out = run.stdout();
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(want.as_str()),
        "download: {}",
        run.stderr()
    );
    assert_eq!(
        lines.next(),
        Some(format!("{want} {}", 100 << 20).as_str()),
        "upload: {}",
        run.stderr()
    );
}

/// At MTU 1500, 100 MB down over IPv4 and IPv6 and up over IPv4, byte-exact,
/// with tap offloads (the default) and without; returns the average frame
/// size to the guest and from it, from tap0's counters inside the sandbox.
fn transfer_at_mtu_1500(w: &World, offload: &str) -> (u64, u64) {
    let blob = w.blob();
    let want = common::sha256_file(&blob);
    let script = format!(
        "set -e
         s=/sys/class/net/tap0/statistics
         curl -sS --max-time 120 http://192.0.2.1/blob | sha256sum | cut -d' ' -f1
         curl -sS --max-time 120 'http://[2001:db8::1]/blob' | sha256sum | cut -d' ' -f1
         curl -sS --max-time 120 -T {} http://192.0.2.1/upload
         echo $(cat $s/rx_bytes) $(cat $s/rx_packets) $(cat $s/tx_bytes) $(cat $s/tx_packets)",
        blob.display()
    );
    let run = w.run(
        &[
            "--dns-upstream",
            "192.0.2.53",
            "--mtu",
            "1500",
            "--offload",
            offload,
        ],
        &script,
    );
    run.ok();
    let out = run.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "offload {offload}: {out}\n{}", run.stderr());
    assert_eq!(lines[0], want, "offload {offload}: IPv4 download");
    assert_eq!(lines[1], want, "offload {offload}: IPv6 download");
    assert_eq!(
        lines[2],
        format!("{want} {}", 100 << 20),
        "offload {offload}: upload"
    );
    let n: Vec<u64> = lines[3]
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    eprintln!("offload {offload}: tap0 rx bytes, rx frames, tx bytes, tx frames: {n:?}");
    (n[0] / n[1].max(1), n[2] / n[3].max(1))
}

#[test]
fn offloads_carry_64k_segments_at_mtu_1500_byte_exact() {
    require_world!();
    let w = World::with_blob(100);
    let (to_guest, from_guest) = transfer_at_mtu_1500(&w, "true");
    // Segments of up to 64 KiB each way, cut to the MTU by nobody: the
    // guest's kernel takes them whole.
    assert!(to_guest > 8000, "{to_guest} bytes per frame to the guest");
    assert!(
        from_guest > 8000,
        "{from_guest} bytes per frame from the guest"
    );

    let (to_guest, from_guest) = transfer_at_mtu_1500(&w, "false");
    assert!(to_guest <= 1514, "{to_guest} bytes per frame to the guest");
    assert!(
        from_guest <= 1514,
        "{from_guest} bytes per frame from the guest"
    );
}

#[test]
fn exit_status_is_the_commands() {
    require_world!();
    let w = World::new();
    assert_eq!(w.run_default("exit 7").code(), Some(7));
    assert_eq!(w.run_default("kill -TERM $$").code(), Some(128 + 15));
    let missing = w.run_default("exec /nonexistent/cmd");
    assert_eq!(missing.code(), Some(127));
}

#[test]
fn invalid_policy_entries_exit_2_naming_the_entry() {
    let cases = [
        (
            vec!["--deny-out", "10.0.0.0/33"],
            "invalid denied CIDR 10.0.0.0/33",
        ),
        (
            vec!["--allow-out", "not_an_address"],
            "invalid allowed address not_an_address",
        ),
        (
            vec!["--allow-out", "*.example.test"],
            "When specifying allowed domains in allow out, you must include 'ALL_TRAFFIC' in deny out to block all other traffic.",
        ),
        (
            vec!["--allow-out", "a..test", "--deny-out", "ALL_TRAFFIC"],
            "invalid allowed address a..test",
        ),
        (
            vec!["--deny-out", "example.test"],
            "invalid denied CIDR example.test",
        ),
        (
            vec!["--dns-server", "nope"],
            "invalid --dns-server nope: give an IP address, or none",
        ),
        (
            vec!["--dns-server", "none,192.0.2.53"],
            "invalid --dns-server none: give `none` alone, or addresses",
        ),
        (
            vec!["--allow-out", "1.2.3.4", "--deny-out", "300.1.1.1"],
            "invalid denied CIDR 300.1.1.1",
        ),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(common::slipway())
            .arg("run")
            .args(&args)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim(), format!("slipway: {want}"), "{args:?}");
    }
    let no_cmd = std::process::Command::new(common::slipway())
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(no_cmd.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_cmd.stderr).contains("CMD"));
}

#[test]
fn connect_timeout_is_configurable() {
    require_world!();
    let w = World::new();
    // Nobody answers ARP for .99 on the world's link: the host connect hangs
    // until slipway gives up and tells the guest "host unreachable".
    let run = w.run(
        &["--connect-timeout", "1"],
        &probe("tcp", "203.0.113.99", 80),
    );
    run.ok();
    let r = results(&run.stdout());
    assert_eq!(r.len(), 1, "{}", run.stderr());
    let (name, ms) = &r[0];
    assert_eq!(name, "EHOSTUNREACH", "{}", run.stderr());
    assert!((900..2500).contains(ms), "gave up after {ms} ms, not ~1000");
}

#[test]
fn run_works_for_an_ordinary_user() {
    require_world!();
    let Some((uid, gid)) = common::ordinary_user() else {
        if std::env::var("SLIPWAY_E2E").as_deref() == Ok("required") {
            panic!("cannot create an ordinary user with useradd");
        }
        eprintln!("skipped: cannot create an ordinary user with useradd");
        return;
    };
    // As most distributions ship it (this machine's is 0600).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(0o666)).unwrap();
    let w = World::new();
    let script = [
        "id -u".to_string(),
        "curl -sS --max-time 10 http://192.0.2.1/hello".into(),
        probe("udp", "198.51.100.1", 7),
        probe("tcp", "10.1.2.3", 80),
    ]
    .join("\n");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &w.name, "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args([
            "--clear-groups",
            common::slipway(),
            "run",
            "--dns-upstream",
            "192.0.2.53",
        ])
        .args(["--", "sh", "-c", &script])
        .env("SLIPWAY_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let mut lines = stdout.lines();
    // Root inside its own user namespace, an ordinary user outside.
    assert_eq!(lines.next(), Some("0"), "{stdout}");
    assert!(stdout.contains("hello from world"), "{stdout}");
    let names: Vec<String> = results(&stdout).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["reply", "ECONNREFUSED"], "{stdout}\n{stderr}");
}

/// Run as root, the command is root only inside a user namespace of its
/// own: it cannot enter slipway's network namespace (where the policy does
/// not apply) nor any other of the host's, although it still configures its
/// own links and binds low ports.
#[test]
fn run_as_root_confines_the_command() {
    require_world!();
    let w = World::new();
    // $PPID is slipway: the sandbox process it forked became `sh`.
    let script = r#"
        id -u
        readlink /proc/self/ns/user
        nsenter --net=/proc/$PPID/ns/net true 2>/dev/null; echo "enter slipway's netns: $?"
        nsenter --mount=/proc/1/ns/mnt true 2>/dev/null; echo "enter the host's mounts: $?"
        nsenter --net=/proc/1/ns/net true 2>/dev/null; echo "enter the host's netns: $?"
        ip link set lo mtu 1500 && echo "own links: ok"
        python3 -c 'import socket; s = socket.socket(); s.bind(("10.0.2.15", 80)); print("port 80: ok")'
        grep CapEff /proc/self/status
    "#;
    let run = w.run_default(script);
    run.ok();
    let out = run.stdout();
    let host_userns = std::fs::read_link("/proc/self/ns/user").unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"), "{out}");
    let inner_userns = lines.next().unwrap_or_default();
    assert_ne!(inner_userns, host_userns.to_string_lossy(), "{out}");
    for what in [
        "enter slipway's netns",
        "enter the host's mounts",
        "enter the host's netns",
    ] {
        let line = lines.next().unwrap_or_default();
        assert!(line.starts_with(what), "{out}");
        assert!(!line.ends_with(": 0"), "the command could {what}:\n{out}");
    }
    assert_eq!(
        lines.next(),
        Some("own links: ok"),
        "{out}\n{}",
        run.stderr()
    );
    assert_eq!(lines.next(), Some("port 80: ok"), "{out}\n{}", run.stderr());
    // Its capabilities (all of them) are over its own user namespace only.
    assert!(
        lines.next().unwrap_or_default().starts_with("CapEff:"),
        "{out}"
    );
}

/// A mistyped flag is refused before anything starts, never run as the
/// command; words after `--` or after the command's first word are the
/// command's own.
#[test]
fn a_mistyped_flag_exits_2_naming_it() {
    let out = std::process::Command::new(common::slipway())
        .args(["run", "--no-internt", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim(),
        "slipway: unknown flag --no-internt (did you mean --no-internet?)"
    );
    let out = std::process::Command::new(common::slipway())
        .args(["run", "--frobnicate", "echo", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "slipway: unknown flag --frobnicate"
    );
    let out = std::process::Command::new(common::slipway())
        .args(["attach", "--tap", "x", "--no-internt"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("slipway: unknown flag --no-internt"));
}
