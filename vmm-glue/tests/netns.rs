//! `slipway run`'s namespace against the real kernel: what a command inside
//! sees, how its status comes back, and that its frames reach the tap's
//! host end. Needs root, or /dev/net/tun open to this user (then the
//! sandbox gets a user namespace); each test says so and passes when it
//! cannot run. `rootless_sandbox_works_for_an_ordinary_user` re-runs
//! `rootless_inner` as an unprivileged user made with `useradd`.

use std::ffi::OsString;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm_glue::netns::{self, GuestNetConfig, NetnsError, Sandboxed};

/// One sandbox at a time: a child forked while another test's control pair
/// is open holds a copy of it until exec, which would delay that test.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const ROOTLESS_USER: &str = "slipway-rootless";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether these tests can run here (as root, or as a user who may open
/// /dev/net/tun: then through a user namespace); prints why not.
fn can_run() -> bool {
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: /dev/net/tun is missing");
        return false;
    }
    // SAFETY: the path is a NUL-terminated literal; access only reads it.
    let tun_usable =
        unsafe { libc::access(c"/dev/net/tun".as_ptr(), libc::R_OK | libc::W_OK) } == 0;
    if !is_root() && !tun_usable {
        eprintln!("skipped: not root, and /dev/net/tun is not readable and writable by this user");
        return false;
    }
    true
}

fn argv(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A fresh directory the sandboxed command can write its output into.
fn scratch_dir() -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("slipway-netns-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `script` with `sh -c` in a sandbox built from `cfg`; returns its
/// exit status and everything it printed.
fn run_sh(cfg: &GuestNetConfig, script: &str) -> (i32, String) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir();
    let out = dir.join("out");
    let wrapped = format!("( {script} ) > {} 2>&1", out.display());
    let Sandboxed { pid, tap, gate } =
        netns::spawn(cfg, &argv(&["sh", "-c", &wrapped])).expect("spawn");
    assert_eq!(tap.name(), cfg.tap_name);
    gate.release().expect("release");
    let status = netns::wait(pid).expect("wait");
    drop(tap);
    let output = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (status, output)
}

/// The `/proc/net/route` rows in `text` as (iface, destination, gateway,
/// mask), addresses decoded from the kernel's host-order hex; other lines
/// (the header, anything else printed) are passed over.
fn ipv4_routes(text: &str) -> Vec<(String, Ipv4Addr, Ipv4Addr, Ipv4Addr)> {
    let addr = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .ok()
            .map(|n| Ipv4Addr::from(n.to_le_bytes()))
    };
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 11 {
                return None;
            }
            Some((f[0].to_owned(), addr(f[1])?, addr(f[2])?, addr(f[7])?))
        })
        .collect()
}

#[test]
fn tap_has_the_guest_mtu_and_mac_and_is_the_only_link_besides_lo() {
    if !can_run() {
        return;
    }
    let cfg = GuestNetConfig::default();
    let (status, out) = run_sh(
        &cfg,
        "cat /sys/class/net/tap0/mtu /sys/class/net/tap0/address /sys/class/net/lo/flags; ls /sys/class/net",
    );
    assert_eq!(status, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "65520", "{out}");
    assert_eq!(lines[1], "52:54:00:12:34:56", "{out}");
    let lo_flags = u32::from_str_radix(lines[2].trim_start_matches("0x"), 16).unwrap();
    assert_ne!(lo_flags & libc::IFF_UP as u32, 0, "lo is down: {out}");
    assert_eq!(&lines[3..], ["lo", "tap0"], "{out}");
}

#[test]
fn ipv4_address_and_default_route_via_the_gateway() {
    if !can_run() {
        return;
    }
    let (status, out) = run_sh(&GuestNetConfig::default(), "cat /proc/net/route");
    assert_eq!(status, 0, "{out}");
    let routes = ipv4_routes(&out);
    let any = Ipv4Addr::UNSPECIFIED;
    assert!(
        routes.contains(&("tap0".into(), any, Ipv4Addr::new(10, 0, 2, 2), any)),
        "no default route via 10.0.2.2: {out}"
    );
    let subnet = (
        "tap0".into(),
        Ipv4Addr::new(10, 0, 2, 0),
        any,
        Ipv4Addr::new(255, 255, 255, 0),
    );
    assert!(routes.contains(&subnet), "no 10.0.2.0/24 on tap0: {out}");

    let ip_exists = Path::new("/usr/sbin/ip").exists() || Path::new("/sbin/ip").exists();
    if ip_exists {
        let (status, out) = run_sh(&GuestNetConfig::default(), "ip -o -4 addr show dev tap0");
        assert_eq!(status, 0, "{out}");
        assert!(out.contains("inet 10.0.2.15/24 brd 10.0.2.255"), "{out}");
    } else {
        let (_, out) = run_sh(&GuestNetConfig::default(), "cat /proc/net/fib_trie");
        assert!(out.contains("10.0.2.15"), "{out}");
    }
}

#[test]
fn ipv6_address_and_default_route_via_the_link_local_gateway() {
    if !can_run() {
        return;
    }
    if !Path::new("/proc/sys/net/ipv6").exists() {
        eprintln!("skipped: this kernel has no IPv6");
        return;
    }
    let (status, out) = run_sh(
        &GuestNetConfig::default(),
        "cat /proc/net/if_inet6; echo --; cat /proc/net/ipv6_route",
    );
    assert_eq!(status, 0, "{out}");
    let (addrs, routes) = out.split_once("--").unwrap();
    // address, ifindex, prefix length (hex), scope, flags, name
    assert!(
        addrs
            .lines()
            .any(|l| l.starts_with("fd000000000000000000000000000015 ")
                && l.contains(" 40 ")
                && l.ends_with("tap0")),
        "no fd00::15/64 on tap0: {addrs}"
    );
    // A permanent address, not a tentative one (DAD is off).
    assert!(
        addrs
            .lines()
            .any(|l| l.starts_with("fd00") && l.split_whitespace().nth(4) == Some("80")),
        "fd00::15 is not plain permanent: {addrs}"
    );
    let default_via_gateway = routes.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() == 10
            && f[0] == "00000000000000000000000000000000"
            && f[1] == "00"
            && f[4] == "fe800000000000000000000000000002"
            && f[5] == "00000001"
            && f[9] == "tap0"
    });
    assert!(
        default_via_gateway,
        "no ::/0 via fe80::2 metric 1 on tap0: {routes}"
    );
}

#[test]
fn ipv6_can_be_left_out() {
    if !can_run() {
        return;
    }
    let cfg = GuestNetConfig {
        ipv6: None,
        ..GuestNetConfig::default()
    };
    let (status, out) = run_sh(&cfg, "cat /proc/net/if_inet6");
    assert_eq!(status, 0, "{out}");
    assert!(!out.contains("fd00"), "{out}");
}

#[test]
fn resolv_conf_lists_the_nameservers() {
    if !can_run() {
        return;
    }
    let cfg = GuestNetConfig {
        nameservers: vec![
            Ipv4Addr::new(10, 0, 2, 3).into(),
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3).into(),
        ],
        ..GuestNetConfig::default()
    };
    let (status, out) = run_sh(&cfg, "cat /etc/resolv.conf");
    assert_eq!(status, 0, "{out}");
    let servers: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("nameserver "))
        .collect();
    assert_eq!(
        servers,
        ["nameserver 10.0.2.3", "nameserver fd00::3"],
        "{out}"
    );
    // The host's file is untouched.
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(!host.contains("written by slipway"), "{host}");
}

#[test]
fn no_nameservers_leave_resolv_conf_alone() {
    if !can_run() {
        return;
    }
    let cfg = GuestNetConfig {
        nameservers: Vec::new(),
        ..GuestNetConfig::default()
    };
    let (status, out) = run_sh(&cfg, "cat /etc/resolv.conf");
    assert_eq!(status, 0, "{out}");
    assert_eq!(
        out,
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
    );
}

#[test]
fn another_tap_name_mtu_and_address() {
    if !can_run() {
        return;
    }
    let cfg = GuestNetConfig {
        tap_name: "eth0".into(),
        mtu: 1500,
        ipv4: Ipv4Addr::new(192, 0, 2, 10),
        ipv4_prefix: 28,
        gateway_v4: Ipv4Addr::new(192, 0, 2, 1),
        ..GuestNetConfig::default()
    };
    let (status, out) = run_sh(&cfg, "cat /sys/class/net/eth0/mtu /proc/net/route");
    assert_eq!(status, 0, "{out}");
    assert!(out.starts_with("1500\n"), "{out}");
    let any = Ipv4Addr::UNSPECIFIED;
    assert!(
        ipv4_routes(&out).contains(&("eth0".into(), any, Ipv4Addr::new(192, 0, 2, 1), any)),
        "{out}"
    );
}

#[test]
fn exit_status_comes_back_like_a_shell_gives_it() {
    if !can_run() {
        return;
    }
    let cfg = GuestNetConfig::default();
    assert_eq!(run_sh(&cfg, "exit 7").0, 7);
    assert_eq!(run_sh(&cfg, "kill -TERM $$").0, 128 + libc::SIGTERM);
}

#[test]
fn missing_command_is_an_error_naming_it() {
    if !can_run() {
        return;
    }
    let err = netns::spawn(
        &GuestNetConfig::default(),
        &argv(&["slipway-no-such-command", "x"]),
    )
    .unwrap_err();
    assert!(matches!(err, NetnsError::CommandNotFound(_)), "{err}");
    assert!(err.to_string().contains("slipway-no-such-command"), "{err}");
    assert_eq!(err.exit_code(), 127);
}

#[test]
fn exec_failure_after_release_is_reported_and_exits_126() {
    if !can_run() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir();
    let bogus = dir.join("not-a-program");
    std::fs::write(&bogus, b"\x7fELF but not really").unwrap();
    std::fs::set_permissions(&bogus, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sandboxed =
        netns::spawn(&GuestNetConfig::default(), &[bogus.clone().into()]).expect("spawn");
    let err = sandboxed.gate.release().unwrap_err();
    assert!(matches!(err, NetnsError::Exec(_)), "{err}");
    assert!(err.to_string().contains("not-a-program"), "{err}");
    assert_eq!(netns::wait(sandboxed.pid).unwrap(), 126);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dropping_the_gate_never_runs_the_command() {
    if !can_run() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir();
    let marker = dir.join("ran");
    let script = format!("touch {}", marker.display());
    let Sandboxed { pid, tap, gate } =
        netns::spawn(&GuestNetConfig::default(), &argv(&["sh", "-c", &script])).expect("spawn");
    drop(gate);
    assert_eq!(netns::wait(pid).unwrap(), 126);
    drop(tap);
    assert!(!marker.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits up to `limit` for a frame on `tap` that `wanted` accepts.
fn frame_within(
    tap: &vmm_glue::Tap,
    limit: Duration,
    wanted: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match tap.recv(&mut buf).expect("recv") {
            Some(len) if wanted(&buf[..len]) => return Some(buf[..len].to_vec()),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    None
}

fn is_arp_request_for(frame: &[u8], target: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0x00, 0x01]
        && frame[38..42] == target.octets()
}

#[test]
fn the_host_end_reads_what_the_command_sends() {
    if !can_run() {
        return;
    }
    if !Path::new("/usr/bin/ping").exists() && !Path::new("/bin/ping").exists() {
        eprintln!("skipped: no ping to make the guest send");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = GuestNetConfig::default();
    let cmd = argv(&[
        "sh",
        "-c",
        "ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; exit 0",
    ]);
    let Sandboxed { pid, tap, gate } = netns::spawn(&cfg, &cmd).expect("spawn");
    gate.release().expect("release");
    let arp = frame_within(&tap, Duration::from_secs(2), |f| {
        is_arp_request_for(f, cfg.gateway_v4)
    });
    let status = netns::wait(pid).unwrap();
    let arp = arp.expect("no ARP request for 10.0.2.2 within 2 s");
    assert_eq!(arp[0..6], [0xff; 6], "not broadcast");
    assert_eq!(arp[6..12], cfg.mac, "source MAC");
    assert_eq!(arp[28..32], cfg.ipv4.octets(), "sender IP");
    assert_eq!(status, 0);
}

/// Runs the tests below as an unprivileged user: re-runs this test binary's
/// `rootless_inner` under `useradd`'s new user, after opening
/// /dev/net/tun to everyone (chmod 0666, as most distributions ship it; it
/// is left that way).
#[test]
fn rootless_sandbox_works_for_an_ordinary_user() {
    if !is_root() || !Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: needs root (to make a user) and /dev/net/tun");
        return;
    }
    let Some((uid, gid)) = ordinary_user() else {
        eprintln!("skipped: cannot create user {ROOTLESS_USER} with useradd");
        return;
    };
    std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(0o666))
        .expect("chmod 0666 /dev/net/tun");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "rootless_inner",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TMPDIR", "/tmp")
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run the test binary as an ordinary user");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rootless run failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "rootless test did not run:\n{text}"
    );
}

/// The uid and gid of [`ROOTLESS_USER`], creating the user when needed.
fn ordinary_user() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = std::process::Command::new("id")
            .args([flag, ROOTLESS_USER])
            .output()
            .ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id("-u").is_none() {
        let made = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                ROOTLESS_USER,
            ])
            .status()
            .ok()?;
        if !made.success() {
            return None;
        }
    }
    Some((id("-u")?, id("-g")?))
}

#[test]
#[ignore = "run as an ordinary user by rootless_sandbox_works_for_an_ordinary_user"]
fn rootless_inner() {
    assert!(!is_root(), "rootless_inner must run as an ordinary user");
    assert!(can_run());
    let cfg = GuestNetConfig::default();
    let (status, out) = run_sh(
        &cfg,
        "id -u; cat /sys/class/net/tap0/mtu /proc/net/route /etc/resolv.conf; exit 3",
    );
    assert_eq!(status, 3, "{out}");
    assert!(
        out.starts_with("0\n65520\n"),
        "not root inside, or wrong MTU: {out}"
    );
    let any = Ipv4Addr::UNSPECIFIED;
    assert!(
        ipv4_routes(&out).contains(&("tap0".into(), any, cfg.gateway_v4, any)),
        "{out}"
    );
    assert!(out.contains("nameserver 10.0.2.3"), "{out}");

    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Raw ICMP sockets work inside (root there); ping may still be refused,
    // but the ARP for the gateway goes out before that matters.
    let cmd = argv(&[
        "sh",
        "-c",
        "ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; exit 0",
    ]);
    let Sandboxed { pid, tap, gate } = netns::spawn(&cfg, &cmd).expect("spawn");
    gate.release().expect("release");
    let arp = frame_within(&tap, Duration::from_secs(2), |f| {
        is_arp_request_for(f, cfg.gateway_v4)
    });
    assert_eq!(netns::wait(pid).unwrap(), 0);
    assert!(arp.is_some(), "no ARP request for 10.0.2.2 within 2 s");
}
