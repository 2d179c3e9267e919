//! Test beds shared by the end-to-end tests: a "world" network namespace with
//! servers on TEST-NET addresses and no route out, and helpers to run
//! `slipway run` inside it. Everything a test creates is removed on drop,
//! also when the test fails.

#![allow(dead_code)]

pub mod microvm;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory under the system's temp dir, unique per process and
/// call (`slipway-TAG-PID-N`), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("slipway-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create scratch dir {}: {e}", dir.display()));
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Why an end-to-end test cannot run here, or None when it can.
pub fn cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (ip netns)".into());
    }
    for tool in ["ip", "python3", "curl"] {
        if !has_tool(tool) {
            return Some(format!(
                "needs `{tool}` (apt-get install iproute2 python3 curl)"
            ));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun".into());
    }
    None
}

pub fn has_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Skip (with the reason printed) when the machine cannot host the test bed.
/// CI sets SLIPWAY_E2E=required so that a skip there is a failure.
#[macro_export]
macro_rules! require_world {
    () => {
        if let Some(why) = common::cannot_run() {
            if std::env::var("SLIPWAY_E2E").as_deref() == Ok("required") {
                panic!("end-to-end test cannot run: {why}");
            }
            eprintln!("skipped: {why}");
            return;
        }
    };
}

pub fn slipway() -> &'static str {
    env!("CARGO_BIN_EXE_slipway")
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace standing in for the internet: 192.0.2.1/24,
/// 198.51.100.1/24, 203.0.113.1/24 and 2001:db8::1/64 on a veth pair whose
/// both ends stay inside (this kernel has no dummy links),
/// 203.0.113.128/25 and 2001:db8:dead::/48 unreachable, nothing routed out.
pub struct World {
    pub name: String,
    pub dir: PathBuf,
    servers: Option<Child>,
}

impl World {
    pub fn new() -> World {
        Self::with_blob(0)
    }

    /// A world whose HTTP server serves `/blob`: `blob_mib` MiB of random bytes.
    pub fn with_blob(blob_mib: usize) -> World {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("slw{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut world = World {
            name: name.clone(),
            dir,
            servers: None,
        };
        ip(&["netns", "add", &name]);
        let x = |cmd: &str| {
            let out = Command::new("ip")
                .args(["netns", "exec", &name, "sh", "-ec", cmd])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        x("ip link set lo up
           ip link add w0 type veth peer name w1
           ip link set w1 up
           ip addr add 192.0.2.1/24 dev w0
           ip addr add 192.0.2.53/24 dev w0
           ip addr add 192.0.2.80/24 dev w0
           ip addr add 198.51.100.1/24 dev w0
           ip addr add 203.0.113.1/24 dev w0
           ip -6 addr add 2001:db8::1/64 dev w0 nodad
           ip -6 addr add 2001:db8::80/64 dev w0 nodad
           ip link set w0 up
           ip route add unreachable 203.0.113.128/25
           ip -6 route add unreachable 2001:db8:dead::/48
           sysctl -qw net.ipv4.ping_group_range='0 2147483647'");
        let blob = world.dir.join("blob");
        if blob_mib > 0 {
            let out = Command::new("sh")
                .args([
                    "-c",
                    &format!("head -c {}M /dev/urandom > {}", blob_mib, blob.display()),
                ])
                .status()
                .unwrap();
            assert!(out.success());
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/world.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &name, "python3", script, "--blob"])
            .arg(&blob)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start world servers");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        world.servers = Some(child);
        assert_eq!(line.trim(), "ready", "world servers did not start");
        world
    }

    pub fn blob(&self) -> PathBuf {
        self.dir.join("blob")
    }

    /// Run a shell script inside the world namespace itself (not behind slipway).
    pub fn exec(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .output()
            .unwrap()
    }

    /// `slipway run ARGS -- sh -c SCRIPT`, from inside the world.
    pub fn run(&self, args: &[&str], script: &str) -> Run {
        let started = Instant::now();
        let mut cmd = Command::new("timeout");
        cmd.args([
            "-k",
            "5",
            "300",
            "ip",
            "netns",
            "exec",
            &self.name,
            slipway(),
            "run",
        ])
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("SLIPWAY_LOG", "slipway::flow=info,warn");
        let output = cmd.output().expect("run slipway");
        Run {
            output,
            took: started.elapsed(),
        }
    }

    /// `run` with the world's resolver as DNS upstream.
    pub fn run_default(&self, script: &str) -> Run {
        self.run(&["--dns-upstream", "192.0.2.53"], script)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut child) = self.servers.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything left running in the namespace (a stuck slipway, a server) goes too.
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!("ip netns pids {} | xargs -r kill -9", self.name),
            ])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Run {
    pub output: Output,
    pub took: Duration,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    /// Panics with everything the run printed unless it exited 0.
    pub fn ok(&self) -> &Self {
        assert!(
            self.output.status.success(),
            "slipway run failed ({:?}) after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.output.status,
            self.took,
            self.stdout(),
            self.stderr()
        );
        self
    }
}

pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// An ordinary (non-root) user for rootless tests, created with useradd when
/// missing: its uid and gid.
pub fn ordinary_user() -> Option<(u32, u32)> {
    const USER: &str = "slipway-rootless";
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id("-u").is_none() {
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .status()
            .ok()?;
        if !made.success() {
            return None;
        }
    }
    Some((id("-u")?, id("-g")?))
}
