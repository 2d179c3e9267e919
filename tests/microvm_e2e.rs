//! End to end with a whole guest: QEMU `-M microvm` boots a Debian kernel and
//! a busybox initramfs; the guest takes its address by DHCP, fetches a blob
//! from a TEST-NET server in a world namespace and checks its SHA-256, and
//! (behind slipway) meets a denied destination. One transport per test;
//! `-netdev user` is the baseline that proves the bed itself.

mod common;

use std::time::Duration;

use common::microvm::{Attached, MicroVm, VmRun};
use common::World;

/// A boot plus a 50 MiB transfer under TCG fits well inside this.
const RUN_LIMIT: Duration = Duration::from_secs(90);

const BLOB_MIB: usize = 50;

/// Guest side: fetch URL, print `@slipway fetch exit=… ms=…` and
/// `@slipway sha256 HEX`.
fn fetch_and_hash(url: &str) -> String {
    format!(
        "timed fetch sh -c 'set -o pipefail; wget -q -O - {url} | sha256sum >/tmp/sum'
         mark sha256 $(cut -c1-64 /tmp/sum)"
    )
}

/// Host side: what the guest's fetch took and how fast that was.
fn report_transfer(label: &str, run: &VmRun) {
    let ms: u64 = run
        .field("fetch", "ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mbit = (BLOB_MIB as f64 * 8.0 * 1.048_576) / (ms.max(1) as f64 / 1000.0);
    eprintln!(
        "{label}: accel {:?}, boot {:.2?} (guest userspace at {} ms), dhcp {} ms ({}), \
         {BLOB_MIB} MiB fetched and hashed in {ms} ms ({mbit:.0} Mbit/s), whole run {:.1?}",
        run.accel,
        run.boot.unwrap_or_default(),
        run.field("init", "uptime_ms").unwrap_or("?"),
        run.field("dhcp-done", "ms").unwrap_or("?"),
        run.mark("dhcp").unwrap_or("?"),
        run.took
    );
}

fn assert_fetched(run: &VmRun, want_sha: &str) {
    assert_eq!(run.field("fetch", "exit"), Some("0"), "{}", run.report());
    assert_eq!(run.mark("sha256"), Some(want_sha), "{}", run.report());
}

fn in_world(world: &World, script: &str) {
    let out = world.exec(script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn microvm_over_qemu_user_baseline() {
    require_microvm!();
    // QEMU's slirp runs inside the world namespace, so the guest's 10.0.2.2
    // is that namespace's loopback, where the world's HTTP server listens;
    // nothing can leave the namespace.
    let world = World::with_blob(BLOB_MIB);
    let want = common::sha256_file(&world.blob());
    let script = fetch_and_hash("http://10.0.2.2/blob");
    let run = MicroVm::new(&["-netdev".into(), "user,id=n0".into()], &script)
        .netns(&world.name)
        .timeout(RUN_LIMIT)
        .run();
    run.ok();
    assert_eq!(
        run.field("dhcp", "ip"),
        Some("10.0.2.15/24"),
        "{}",
        run.report()
    );
    assert_eq!(
        run.field("dhcp", "router"),
        Some("10.0.2.2"),
        "{}",
        run.report()
    );
    assert_fetched(&run, &want);
    report_transfer("qemu user (slirp)", &run);
}

#[test]
fn microvm_over_tap_served_by_slipway_attach() {
    require_microvm!();
    let world = World::with_blob(BLOB_MIB);
    let want = common::sha256_file(&world.blob());
    // A tap has one userspace end: QEMU holds tapq's, slipway holds tapvm's,
    // and a bridge in the world joins their kernel ends.
    in_world(
        &world,
        "set -e
         ip tuntap add dev tapq mode tap
         ip tuntap add dev tapvm mode tap
         ip link add br0 type bridge forward_delay 0
         for l in tapq tapvm br0; do
           sysctl -qw net.ipv6.conf.$l.disable_ipv6=1
           ip link set $l mtu 65520
         done
         ip link set tapq master br0
         ip link set tapvm master br0
         ip link set br0 up
         ip link set tapq up
         ip link set tapvm up",
    );
    let mut args = vec!["--tap", "tapvm"];
    args.extend(ATTACH_POLICY);
    let slipway = Attached::start(&world.name, &args);
    let script = fetch_and_deny_script();
    let run = MicroVm::new(
        &[
            "-netdev".into(),
            "tap,id=n0,ifname=tapq,script=no,downscript=no".into(),
        ],
        &script,
    )
    .netns(&world.name)
    .timeout(RUN_LIMIT)
    .run();
    assert_served("tap + slipway attach", &run, &want, &slipway);
}

/// The checks every slipway-backed boot shares: the lease, the byte-exact
/// fetch, the allowed connect, and the denied one refused at once.
fn assert_served(label: &str, run: &VmRun, want_sha: &str, slipway: &Attached) {
    let report = || format!("{}\n--- slipway ---\n{}", run.report(), slipway.log());
    // The script's last command decides its exit status: the allowed
    // connect must succeed.
    let deny_ms = run
        .assert_leased_fetched_denied(want_sha, &|| format!("--- slipway ---\n{}", slipway.log()));
    assert_eq!(run.field("dhcp", "dns"), Some("10.0.2.3"), "{}", report());
    report_transfer(label, run);
    assert_eq!(run.field("allowed", "exit"), Some("0"), "{}", report());
    eprintln!(
        "{label}: denied connect to 198.51.100.1:7 failed after {deny_ms} ms: {}",
        run.field("deny", "err").unwrap_or("?")
    );
    assert!(
        slipway.log().contains("deny_out 198.51.100.0/24"),
        "no deny in the flow log: {}",
        slipway.log()
    );
}

fn fetch_and_deny_script() -> String {
    format!(
        "{}
         timed deny nc -w 5 198.51.100.1 7 </dev/null
         timed allowed nc -w 5 192.0.2.1 7 </dev/null",
        fetch_and_hash("http://192.0.2.1/blob")
    )
}

const ATTACH_POLICY: [&str; 4] = [
    "--deny-out",
    "198.51.100.0/24",
    "--dns-upstream",
    "192.0.2.53",
];

#[test]
fn microvm_over_qemu_stream_survives_a_second_vmm() {
    require_microvm!();
    let world = World::with_blob(BLOB_MIB);
    let want = common::sha256_file(&world.blob());
    let sock = world.dir.join("stream.sock");
    let sock = sock.to_str().unwrap();
    let mut args = vec!["--qemu-stream", sock];
    args.extend(ATTACH_POLICY);
    let slipway = Attached::start(&world.name, &args);
    let netdev = format!("stream,id=n0,server=off,addr.type=unix,addr.path={sock}");
    // Two VMMs one after the other on the same sandbox: the second gets the
    // same lease from the stack that outlived the first.
    for boot in ["first", "second"] {
        let run = MicroVm::new(
            &["-netdev".into(), netdev.clone()],
            &fetch_and_deny_script(),
        )
        .netns(&world.name)
        .timeout(RUN_LIMIT)
        .run();
        assert_served(&format!("qemu stream ({boot} VMM)"), &run, &want, &slipway);
    }
    assert!(
        slipway.log().contains("the VMM's stream ended"),
        "slipway did not notice the first VMM leave: {}",
        slipway.log()
    );
}

#[test]
fn microvm_over_qemu_dgram() {
    require_microvm!();
    let world = World::with_blob(BLOB_MIB);
    let want = common::sha256_file(&world.blob());
    let ours = world.dir.join("slipway-dgram.sock");
    let theirs = world.dir.join("qemu-dgram.sock");
    let (ours, theirs) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
    let mut args = vec!["--qemu-dgram", ours, "--peer", theirs];
    args.extend(ATTACH_POLICY);
    let slipway = Attached::start(&world.name, &args);
    let netdev = format!(
        "dgram,id=n0,local.type=unix,local.path={theirs},remote.type=unix,remote.path={ours}"
    );
    let run = MicroVm::new(&["-netdev".into(), netdev], &fetch_and_deny_script())
        .netns(&world.name)
        .timeout(RUN_LIMIT)
        .run();
    assert_served("qemu dgram", &run, &want, &slipway);
}
